//! What the JSON APIs answer when a request cannot even be read. axum's
//! own extractors refuse such requests in plain text ("Failed to
//! deserialize query string: limit: invalid digit found in string", an
//! empty 405); here those answers become the APIs' JSON shape,
//! `{"error", "problems": [{"field", "message"}]}`, with the field at
//! fault named, and a JSON body is read by one extractor that names
//! `body` or `content-type` when it cannot be.

use crate::ingest::FieldProblem;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

/// The most the ingest route reads: a document with a PDF of about 11 MiB
/// (base64 grows it by a third). The other routes keep axum's 2 MiB.
pub const INGEST_BODY_LIMIT: usize = 16 * 1024 * 1024;

fn refusal(status: StatusCode, error: &str, field: &str, message: String) -> Response {
    crate::api::error(
        status,
        error,
        &[FieldProblem {
            field: field.into(),
            message,
        }],
    )
}

/// A request's JSON object body: `None` when the request has no body
/// (some routes take an empty body to mean "all"). A body that is not a
/// JSON object is a 400 naming `body`; one sent as another content type a
/// 415 naming `content-type`; one over the limit a 413 naming `body`.
pub struct JsonObject(pub Option<Map<String, Value>>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let content_type = content_type(req.headers());
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonObject(None));
        }
        if let Some(ct) = content_type
            && !is_json(&ct)
        {
            return Err(refusal(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON",
                "content-type",
                format!("{ct:?} is not JSON; send `Content-Type: application/json`"),
            ));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(Some(map))),
            Ok(_) => Err(refusal(
                StatusCode::BAD_REQUEST,
                "the body must be a JSON object",
                "body",
                "send a JSON object, {...}".into(),
            )),
            Err(e) => Err(refusal(
                StatusCode::BAD_REQUEST,
                "the body is not JSON",
                "body",
                e.to_string(),
            )),
        }
    }
}

impl JsonObject {
    /// Refuse (422 naming the key) any key of the body not in `known`: a
    /// misspelt field must not be dropped silently.
    #[allow(clippy::result_large_err)] // a Response is the natural error of a handler helper
    pub fn only(&self, known: &[&str]) -> Result<(), Response> {
        let Some(map) = &self.0 else { return Ok(()) };
        match map.keys().find(|k| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => Err(refusal(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown field",
                k,
                format!("is not a field here; the fields are {}", known.join(", ")),
            )),
        }
    }

    /// The string at `key`: `None` when absent or null, a 422 naming `key`
    /// when it is there but not a string.
    #[allow(clippy::result_large_err)] // a Response is the natural error of a handler helper
    pub fn string(&self, key: &str) -> Result<Option<&str>, Response> {
        match self.0.as_ref().and_then(|m| m.get(key)) {
            None | Some(Value::Null) => Ok(None),
            // PostgreSQL's text cannot hold one: refused here, naming the
            // field, not answered 503 "retry later" by the store.
            Some(Value::String(s)) if s.contains('\0') => Err(refusal(
                StatusCode::UNPROCESSABLE_ENTITY,
                "NUL character",
                key,
                "must not contain a NUL character (\\u0000)".into(),
            )),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(refusal(
                StatusCode::UNPROCESSABLE_ENTITY,
                "wrong type",
                key,
                format!("must be a string, not {other}"),
            )),
        }
    }
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn is_json(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// Middleware for the JSON APIs (`axum::middleware::from_fn`): a 4xx that axum wrote in plain text (or
/// with no body, as its 405) is answered again as JSON naming the field:
/// `body` (413), `content-type` (415), `method` (405, with the methods the
/// route takes), or the query or path parameter axum's message names.
/// The APIs' own answers are JSON already and pass unchanged.
pub async fn as_json(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let response = next.run(req).await;
    let status = response.status();
    if !status.is_client_error() {
        return response;
    }
    let plain = match response.headers().get(header::CONTENT_TYPE) {
        None => true,
        Some(ct) => ct.as_bytes().starts_with(b"text/plain"),
    };
    if !plain {
        return response;
    }
    let allow = response
        .headers()
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (_, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => String::new(),
    };
    let (error, field, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "the body is too large",
            "body".to_string(),
            format!(
                "is over this route's limit ({} MiB for a document with its PDF in base64, 2 MiB elsewhere)",
                INGEST_BODY_LIMIT / (1024 * 1024)
            ),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported content type",
            "content-type".to_string(),
            text.clone(),
        ),
        // axum adds the Allow header (the methods the route takes) after
        // this layer has run, so the message points to it.
        StatusCode::METHOD_NOT_ALLOWED => (
            "method not allowed",
            "method".to_string(),
            match &allow {
                Some(a) => format!("this route does not take {method}; it takes {a}"),
                None => format!(
                    "this route does not take {method} (the Allow header lists those it takes)"
                ),
            },
        ),
        StatusCode::NOT_FOUND if text.is_empty() => (
            "no such route",
            "path".to_string(),
            "no route has this path".into(),
        ),
        _ => {
            let (field, message) = named_in(&text);
            ("the request could not be read", field, message)
        }
    };
    let mut answer = refusal(status, error, &field, message);
    if let Some(a) = allow
        && let Ok(v) = a.parse()
    {
        answer.headers_mut().insert(header::ALLOW, v);
    }
    answer
}

/// The field an axum rejection's text names: the query parameter in
/// "Failed to deserialize query string: limit: invalid digit…", the path
/// parameter in "Invalid UTF-8 in `tenant`"; else `request`.
fn named_in(text: &str) -> (String, String) {
    if let Some(rest) = text.strip_prefix("Failed to deserialize query string: ") {
        if let Some((field, message)) = rest.split_once(": ")
            && !field.is_empty()
            && !field.contains(' ')
        {
            return (field.to_string(), message.to_string());
        }
        // serde names a missing or repeated parameter in its message.
        if let Some(field) = between_backticks(rest) {
            return (field, rest.to_string());
        }
        return ("query".into(), rest.to_string());
    }
    if let Some(field) = between_backticks(text) {
        return (field, text.to_string());
    }
    ("request".into(), text.to_string())
}

fn between_backticks(text: &str) -> Option<String> {
    let start = text.find('`')? + 1;
    let len = text[start..].find('`')?;
    Some(text[start..start + len].to_string()).filter(|f| !f.is_empty())
}

/// Middleware for every route: a NUL character in the path (`%00`) or in a
/// query parameter is a 400 naming the parameter (or `path`), before any
/// handler passes it to the store (PostgreSQL's text cannot hold one: it
/// was answered 503 "retry later", for ever).
pub async fn no_nul(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match nul_in_uri(req.uri()) {
        Some(r) => r,
        None => next.run(req).await,
    }
}

/// [`no_nul`]'s check, for a route that must answer an unauthenticated
/// caller 401 before looking at its input: the refusal, if any.
pub fn nul_in_uri(uri: &axum::http::Uri) -> Option<Response> {
    if uri.path().contains("%00") {
        return Some(refusal(
            StatusCode::BAD_REQUEST,
            "NUL character",
            "path",
            "must not contain a NUL character (%00)".into(),
        ));
    }
    if let Some(q) = uri.query()
        && let Some((k, _)) = url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, v)| k.contains('\0') || v.contains('\0'))
    {
        return Some(refusal(
            StatusCode::BAD_REQUEST,
            "NUL character",
            &k.replace('\0', ""),
            "must not contain a NUL character (%00)".into(),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_is_read_from_axums_rejections() {
        assert_eq!(
            named_in("Failed to deserialize query string: limit: invalid digit found in string"),
            ("limit".into(), "invalid digit found in string".into())
        );
        assert_eq!(
            named_in("Failed to deserialize query string: duplicate field `connector`").0,
            "connector"
        );
        assert_eq!(named_in("Invalid UTF-8 in `tenant`").0, "tenant");
        assert_eq!(named_in("something else").0, "request");
    }

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("application/x-www-form-urlencoded"));
        assert!(!is_json("text/plain"));
    }
}
