//! A typed HTTP client over the host's `http` capability.
//!
//! Requests go through the host: it checks the allow-list, attaches the
//! connection's credentials when asked ([`RequestBuilder::with_credentials`]),
//! and bounds time, size and count. The guest never sees a token.

use crate::bindings::ledgerport::connector::http as wit;
pub use wit::{Error, Method};

impl Method {
    /// The method's name on the wire (`"GET"`, `"PUT"`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

/// A response from the host.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// First header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Parse the body as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// Builds one request; finish with [`RequestBuilder::send`].
#[derive(Debug, Clone)]
pub struct RequestBuilder {
    req: wit::Request,
    /// Why the request cannot be sent (a body that could not be built):
    /// [`RequestBuilder::send`] answers it without calling the host.
    invalid: Option<String>,
}

impl RequestBuilder {
    /// A request with any method.
    pub fn new(method: Method, url: impl Into<String>) -> Self {
        Self {
            req: wit::Request {
                method,
                url: url.into(),
                headers: Vec::new(),
                body: None,
                with_credentials: false,
            },
            invalid: None,
        }
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.req.headers.push((name.into(), value.into()));
        self
    }

    /// Add a query parameter (percent-encoded).
    pub fn query(mut self, name: &str, value: &str) -> Self {
        let sep = if self.req.url.contains('?') { '&' } else { '?' };
        self.req.url.push(sep);
        self.req.url.push_str(&encode(name));
        self.req.url.push('=');
        self.req.url.push_str(&encode(value));
        self
    }

    /// Set a JSON body and `content-type: application/json`.
    /// A value that cannot be serialised (a map with non-string keys, a
    /// failing `Serialize`) makes [`RequestBuilder::send`] fail with
    /// [`Error::Denied`] saying so; nothing is sent (before, `null` was).
    pub fn json<T: serde::Serialize>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => self.req.body = Some(body),
            Err(e) => self.invalid = Some(format!("the JSON body could not be serialised: {e}")),
        }
        self.header("content-type", "application/json")
    }

    /// Set a raw body.
    pub fn body(mut self, bytes: Vec<u8>) -> Self {
        self.req.body = Some(bytes);
        self
    }

    /// Ask the host to attach the connection's credentials.
    pub fn with_credentials(mut self) -> Self {
        self.req.with_credentials = true;
        self
    }

    /// The request as it will be sent.
    pub fn request(&self) -> &wit::Request {
        &self.req
    }

    /// Send it through the host.
    pub fn send(self) -> Result<Response, Error> {
        if let Some(why) = self.invalid {
            return Err(Error::Denied(why));
        }
        #[cfg(target_arch = "wasm32")]
        let r = wit::send(&self.req)?;
        #[cfg(not(target_arch = "wasm32"))]
        let r = crate::native::http::send(&self.req)?;
        Ok(Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
        })
    }
}

/// A GET request.
pub fn get(url: impl Into<String>) -> RequestBuilder {
    RequestBuilder::new(Method::Get, url)
}
/// A POST request.
pub fn post(url: impl Into<String>) -> RequestBuilder {
    RequestBuilder::new(Method::Post, url)
}
/// A PUT request.
pub fn put(url: impl Into<String>) -> RequestBuilder {
    RequestBuilder::new(Method::Put, url)
}
/// A PATCH request.
pub fn patch(url: impl Into<String>) -> RequestBuilder {
    RequestBuilder::new(Method::Patch, url)
}
/// A DELETE request.
pub fn delete(url: impl Into<String>) -> RequestBuilder {
    RequestBuilder::new(Method::Delete, url)
}

/// Percent-encode a query component (RFC 3986 unreserved kept as is).
pub fn encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len() + s.len() / 2);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => {
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_body_that_cannot_be_serialised_is_not_sent() {
        // JSON object keys must be strings.
        let bad: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
        let r = super::post("https://a.example/").json(&bad).send();
        assert!(
            matches!(&r, Err(super::Error::Denied(why)) if why.contains("could not be serialised")),
            "{r:?}"
        );
        assert!(matches!(
            super::patch("https://a.example/").request().method,
            super::Method::Patch
        ));
    }

    #[test]
    fn encode_keeps_unreserved_and_escapes_the_rest_in_upper_hex() {
        assert_eq!(super::encode("aZ09-_.~"), "aZ09-_.~");
        assert_eq!(
            super::encode("Name==\"A&B\" é/?"),
            "Name%3D%3D%22A%26B%22%20%C3%A9%2F%3F"
        );
        assert_eq!(super::encode(""), "");
    }
}
