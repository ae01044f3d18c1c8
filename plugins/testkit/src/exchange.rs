//! Scripted HTTP: the [`Exchange`]s a test expects, the [`SentRequest`]s the
//! connector really sent, and the [`HttpTransport`] that answers the one
//! with the other.
//!
//! The transport sits *under* the host's `http` capability, so everything
//! the host does before a request leaves (the manifest's allow-list, the ban
//! on `Authorization` and other headers, the size and call caps, attaching
//! the bearer token) runs exactly as in the daemon: a request the host
//! refuses never reaches the script, and the connector gets the host's
//! refusal.

use async_trait::async_trait;
use ledgerport::capabilities::http::{
    HttpTransport, InboundResponse, OutboundRequest, TransportError,
};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the scripted "server" does with a matching request.
#[derive(Debug, Clone)]
enum Reply {
    /// Answer with a status, headers and a body.
    Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// No answer within the host's timeout.
    Timeout,
    /// The connection failed (refused, reset).
    ConnectionError(String),
}

type Predicate = Arc<dyn Fn(&SentRequest) -> bool + Send + Sync>;

/// One expected request and the answer to give it.
///
/// A request matches when its method is the exchange's and its URL is the
/// exchange's URL: exactly when that URL has a query (`?`), ignoring the
/// request's query when it has none, and as a prefix when it ends with `*`.
/// [`Exchange::when`] adds a condition of your own. Each exchange answers
/// once; the first unused one that matches wins, in the order they were
/// added.
///
/// ```text
/// Exchange::post("https://hooks.example.com/ledgerport").respond(201, json!({"id": "r-1"}))
/// Exchange::get("https://api.xero.com/api.xro/2.0/Invoices").respond(429, json!({})).header("retry-after", "30")
/// Exchange::put("https://api.xero.com/api.xro/2.0/Invoices/*").timeout()
/// ```
#[derive(Clone)]
pub struct Exchange {
    method: String,
    url: String,
    conditions: Vec<(String, Predicate)>,
    reply: Reply,
}

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.url)?;
        for (what, _) in &self.conditions {
            write!(f, " (when {what})")?;
        }
        match &self.reply {
            Reply::Response { status, .. } => write!(f, " -> {status}"),
            Reply::Timeout => write!(f, " -> timeout"),
            Reply::ConnectionError(m) => write!(f, " -> connection error {m:?}"),
        }
    }
}

impl Exchange {
    /// Expect a request with this method (`GET`, `POST`, ...) and URL. It
    /// answers 200 with an empty body until told otherwise.
    pub fn new(method: &str, url: &str) -> Self {
        Self {
            method: method.to_ascii_uppercase(),
            url: normalise(url),
            conditions: Vec::new(),
            reply: Reply::Response {
                status: 200,
                headers: Vec::new(),
                body: Vec::new(),
            },
        }
    }
    /// Expect a GET.
    pub fn get(url: &str) -> Self {
        Self::new("GET", url)
    }
    /// Expect a POST.
    pub fn post(url: &str) -> Self {
        Self::new("POST", url)
    }
    /// Expect a PUT.
    pub fn put(url: &str) -> Self {
        Self::new("PUT", url)
    }
    /// Expect a PATCH.
    pub fn patch(url: &str) -> Self {
        Self::new("PATCH", url)
    }
    /// Expect a DELETE.
    pub fn delete(url: &str) -> Self {
        Self::new("DELETE", url)
    }

    /// Match only requests for which `pred` holds; `what` names the
    /// condition in failure messages (e.g. `"the query names the supplier"`).
    pub fn when(
        mut self,
        what: &str,
        pred: impl Fn(&SentRequest) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.conditions.push((what.to_string(), Arc::new(pred)));
        self
    }

    /// Answer with `status` and a JSON body (`content-type: application/json`).
    pub fn respond(self, status: u16, body: serde_json::Value) -> Self {
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        self.respond_raw(status, bytes)
            .header("content-type", "application/json")
    }

    /// Answer with `status` and these body bytes (no content type).
    pub fn respond_raw(mut self, status: u16, body: impl Into<Vec<u8>>) -> Self {
        let headers = match self.reply {
            Reply::Response { headers, .. } => headers,
            _ => Vec::new(),
        };
        self.reply = Reply::Response {
            status,
            headers,
            body: body.into(),
        };
        self
    }

    /// Add a response header (after [`Exchange::respond`], which sets the
    /// body; names are sent in lower case, as the host delivers them).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        if let Reply::Response { headers, .. } = &mut self.reply {
            headers.push((name.to_ascii_lowercase(), value.to_string()));
        }
        self
    }

    /// Do not answer: the host reports a timeout to the connector.
    pub fn timeout(mut self) -> Self {
        self.reply = Reply::Timeout;
        self
    }

    /// Fail the connection (refused, reset): the host reports it to the
    /// connector.
    pub fn connection_error(mut self, why: &str) -> Self {
        self.reply = Reply::ConnectionError(why.to_string());
        self
    }

    fn matches(&self, req: &SentRequest) -> bool {
        if self.method != req.method {
            return false;
        }
        let url_ok = if let Some(prefix) = self.url.strip_suffix('*') {
            req.url.starts_with(prefix)
        } else if self.url.contains('?') {
            req.url == self.url
        } else {
            req.url.split('?').next() == Some(self.url.as_str())
        };
        url_ok && self.conditions.iter().all(|(_, p)| p(req))
    }
}

/// `https://host` and `https://host/` are the same URL; the transport sees
/// the parsed form.
fn normalise(url: &str) -> String {
    if url.ends_with('*') {
        return url.to_string();
    }
    url::Url::parse(url)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| url.to_string())
}

/// A request as the connector sent it, after the host's policy: the final
/// URL, the headers including the `authorization` the host attached for
/// `with-credentials`, and the body.
#[derive(Debug, Clone)]
pub struct SentRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The URL the request went to.
    pub url: String,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body (empty when there was none).
    pub body: Vec<u8>,
    /// Which exchange answered it (index in the order added), if any.
    pub answered_by: Option<usize>,
}

impl SentRequest {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy UTF-8).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (`Value::Null` when it is not JSON, so a
    /// field look-up in a test simply finds nothing).
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The URL's query string, decoded into (name, value) pairs.
    pub fn query(&self) -> Vec<(String, String)> {
        url::Url::parse(&self.url)
            .map(|u| u.query_pairs().into_owned().collect())
            .unwrap_or_default()
    }
}

impl fmt::Display for SentRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.url)
    }
}

/// The exchanges of one test connection and what happened to them.
#[derive(Default)]
pub(crate) struct Script {
    exchanges: Vec<Exchange>,
    used: Vec<bool>,
    requests: Vec<SentRequest>,
    /// Requests no exchange matched, described for the failure message.
    unmatched: Vec<String>,
}

impl Script {
    pub(crate) fn push(&mut self, e: Exchange) {
        self.exchanges.push(e);
        self.used.push(false);
    }

    pub(crate) fn requests(&self) -> Vec<SentRequest> {
        self.requests.clone()
    }

    pub(crate) fn unused(&self) -> Vec<String> {
        self.exchanges
            .iter()
            .zip(&self.used)
            .filter(|(_, used)| !**used)
            .map(|(e, _)| e.to_string())
            .collect()
    }

    /// Unmatched requests seen since the last call to this (and forget them).
    pub(crate) fn take_unmatched(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unmatched)
    }

    fn answer(
        &mut self,
        mut req: SentRequest,
        max_bytes: u64,
    ) -> Result<InboundResponse, TransportError> {
        let found =
            (0..self.exchanges.len()).find(|&i| !self.used[i] && self.exchanges[i].matches(&req));
        let Some(i) = found else {
            let unused = self.unused();
            self.unmatched.push(format!(
                "the connector sent {req}, which no scripted exchange matches.\n  scripted and not yet used: {}",
                if unused.is_empty() {
                    "none".to_string()
                } else {
                    unused.join("; ")
                }
            ));
            let described = req.to_string();
            self.requests.push(req);
            return Err(TransportError::Connection(format!(
                "testkit: no scripted exchange for {described}"
            )));
        };
        self.used[i] = true;
        req.answered_by = Some(i);
        self.requests.push(req);
        match &self.exchanges[i].reply {
            Reply::Timeout => Err(TransportError::Timeout),
            Reply::ConnectionError(m) => Err(TransportError::Connection(m.clone())),
            Reply::Response { body, .. } if body.len() as u64 > max_bytes => {
                Err(TransportError::TooLarge(max_bytes))
            }
            Reply::Response {
                status,
                headers,
                body,
            } => Ok(InboundResponse {
                status: *status,
                headers: headers.clone(),
                body: body.clone(),
            }),
        }
    }
}

/// The transport the kit's runtime sends through: it hands each request to
/// the script of the test connection whose call is running (calls on one
/// kit take turns, see `TestKit`).
#[derive(Default)]
pub(crate) struct ScriptedTransport {
    current: Mutex<Option<Arc<Mutex<Script>>>>,
}

impl ScriptedTransport {
    /// Route requests to `script` until [`ScriptedTransport::clear`].
    pub(crate) fn route_to(&self, script: Arc<Mutex<Script>>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(script);
    }

    /// Stop routing.
    pub(crate) fn clear(&self) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[async_trait]
impl HttpTransport for ScriptedTransport {
    async fn send(
        &self,
        req: OutboundRequest,
        max_bytes: u64,
        _timeout: Duration,
    ) -> Result<InboundResponse, TransportError> {
        let script = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(script) = script else {
            return Err(TransportError::Connection(
                "testkit: a request outside any test call".into(),
            ));
        };
        let sent = SentRequest {
            method: req.method.to_string(),
            url: req.url.to_string(),
            headers: req.headers,
            body: req.body.unwrap_or_default(),
            answered_by: None,
        };
        let mut s = script.lock().unwrap_or_else(|e| e.into_inner());
        s.answer(sent, max_bytes)
    }
}
