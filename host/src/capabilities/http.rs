//! The `http` capability: outbound HTTP performed by the host for a guest.
//!
//! Fail-closed like wasmCloud's `allowed_hosts`: a request goes out only when
//! its origin is one of the manifest's allowed hosts. An operator may move an
//! origin elsewhere (a sandbox, the simulator) with a base-URL override; the
//! allow-list follows the override, the guest keeps using the canonical URL.
//! The guest may not set `Authorization`: with `with-credentials` the host
//! attaches the connection's bearer token, and on a 401 refreshes it and
//! retries once. Each call is bounded: request and response size, time, and
//! the number of calls one delivery may make.

use crate::manifest::{origin_of, parse_origin};
use crate::runtime::v0_1::ledgerport::connector::http as wit;
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Headers a guest may never set.
const FORBIDDEN_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
];

/// Bounds on one call's HTTP use.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest response body accepted.
    pub max_response_bytes: u64,
    /// Largest request body accepted.
    pub max_request_bytes: usize,
    /// Calls one delivery may make.
    pub max_calls: u32,
    /// Time for one request, connect to last byte. The default is shorter
    /// than the call's default deadline (30 s), so a provider that never
    /// answers is the request's `Timeout`, which the connector reports in
    /// its own words, and not the whole call cut off at its deadline.
    pub timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_response_bytes: 8 * 1024 * 1024,
            max_request_bytes: 32 * 1024 * 1024,
            max_calls: 50,
            timeout: Duration::from_secs(25),
        }
    }
}

/// Where a plugin may send requests, after operator overrides.
#[derive(Debug, Clone, Default)]
pub struct HttpPolicy {
    /// Canonical origins (`scheme://host:port`) from the manifest.
    allowed: BTreeSet<String>,
    /// Canonical origin -> the base URL requests really go to.
    rewrite: BTreeMap<String, url::Url>,
    /// Whether the plugin declares `[oauth]`: only then do its connections
    /// hold tokens for `with-credentials` to attach.
    oauth: bool,
}

impl HttpPolicy {
    /// Build from the manifest's `allowed_hosts` and operator overrides
    /// (canonical origin -> replacement base URL). An override for an origin
    /// the manifest does not allow is an error: overrides move hosts, they
    /// never add them.
    pub fn new(
        allowed_hosts: &[String],
        overrides: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let mut allowed = BTreeSet::new();
        for h in allowed_hosts {
            allowed.insert(parse_origin(h)?);
        }
        let mut rewrite = BTreeMap::new();
        for (from, to) in overrides {
            let from = parse_origin(from).map_err(|e| format!("override {from:?}: {e}"))?;
            if !allowed.contains(&from) {
                return Err(format!(
                    "override for {from} names a host the manifest does not allow"
                ));
            }
            let to_url = url::Url::parse(to).map_err(|e| format!("override target {to:?}: {e}"))?;
            rewrite.insert(from, to_url);
        }
        Ok(Self {
            allowed,
            rewrite,
            oauth: false,
        })
    }

    /// Say whether the plugin declares `[oauth]` (see [`HttpPolicy`]).
    pub fn with_oauth(mut self, declared: bool) -> Self {
        self.oauth = declared;
        self
    }

    /// The URL to really send to, or why not.
    pub fn resolve(&self, raw: &str) -> Result<url::Url, String> {
        let u = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a valid URL: {e}"))?;
        if !u.username().is_empty() || u.password().is_some() {
            return Err("URLs with user info are not allowed".into());
        }
        let origin = origin_of(&u).ok_or_else(|| format!("{raw:?} has no host"))?;
        if !self.allowed.contains(&origin) {
            return Err(format!(
                "host {origin} is not in the manifest's allowed_hosts"
            ));
        }
        match self.rewrite.get(&origin) {
            None => Ok(u),
            Some(base) => {
                let mut out = base.clone();
                let base_path = base.path().trim_end_matches('/');
                out.set_path(&format!("{base_path}{}", u.path()));
                out.set_query(u.query());
                Ok(out)
            }
        }
    }
}

/// A request as the transport sends it.
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    /// Method name.
    pub method: &'static str,
    /// Final URL.
    pub url: url::Url,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Option<Vec<u8>>,
}

/// A response as the transport received it.
#[derive(Debug, Clone)]
pub struct InboundResponse {
    /// Status.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// Why the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Timed out.
    #[error("timed out")]
    Timeout,
    /// Connection failed.
    #[error("connection failed: {0}")]
    Connection(String),
    /// The body was over the cap.
    #[error("response over {0} bytes")]
    TooLarge(u64),
}

/// Sends requests; reqwest in the daemon, a stub in benchmarks and tests.
#[async_trait]
pub trait HttpTransport: Send + Sync {
    /// Send one request, reading at most `max_bytes` of body within `timeout`.
    async fn send(
        &self,
        req: OutboundRequest,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<InboundResponse, TransportError>;
}

/// Idle connections per host kept by [`ReqwestTransport::new`]: twice the
/// dispatcher's default concurrency (see
/// [`ReqwestTransport::with_idle_per_host`]).
pub const DEFAULT_IDLE_PER_HOST: usize = 128;

/// The real transport over reqwest (no redirects followed: a redirect could
/// leave the allow-list).
#[derive(Clone)]
pub struct ReqwestTransport {
    client: reqwest::Client,
}

impl ReqwestTransport {
    /// A client with no redirects, keeping up to
    /// [`DEFAULT_IDLE_PER_HOST`] idle connections per host.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_idle_per_host(DEFAULT_IDLE_PER_HOST)
    }

    /// A client with no redirects, keeping up to `idle` idle connections
    /// per host, so that a burst of deliveries reuses the connections of
    /// the burst before. The daemon passes twice its dispatcher's
    /// concurrency. Measured in B2 (64 deliveries at once, 10,000
    /// documents, `perf stat -e syscalls:sys_enter_connect`): with 32 idle
    /// connections every burst closed the surplus as it came back and
    /// opened it again for the next, 3,447 `connect` calls; with 64, 711
    /// (a connection can be briefly neither in use nor counted idle); with
    /// 128, 200. Over plain HTTP on loopback that made no measurable
    /// difference to B2's rate; against Xero every new connection is a TLS
    /// handshake.
    pub fn with_idle_per_host(idle: usize) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ledgerport/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(idle)
            .build()?;
        Ok(Self { client })
    }
}

#[async_trait]
impl HttpTransport for ReqwestTransport {
    async fn send(
        &self,
        req: OutboundRequest,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<InboundResponse, TransportError> {
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|e| TransportError::Connection(e.to_string()))?;
        let mut b = self.client.request(method, req.url.clone());
        for (k, v) in &req.headers {
            b = b.header(k, v);
        }
        if let Some(body) = req.body {
            b = b.body(body);
        }
        let work = async {
            let mut resp = b.send().await.map_err(classify_reqwest)?;
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_ascii_lowercase(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            if let Some(len) = resp.content_length()
                && len > max_bytes
            {
                return Err(TransportError::TooLarge(max_bytes));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(classify_reqwest)? {
                if body.len() as u64 + chunk.len() as u64 > max_bytes {
                    return Err(TransportError::TooLarge(max_bytes));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(InboundResponse {
                status,
                headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout),
        }
    }
}

fn classify_reqwest(e: reqwest::Error) -> TransportError {
    if e.is_timeout() {
        TransportError::Timeout
    } else {
        // Without the URL: it may carry query text we do not want in logs.
        TransportError::Connection(e.without_url().to_string())
    }
}

/// A bearer credential for one connection.
#[derive(Clone)]
pub struct Credential {
    /// The access token (never logged; `Debug` hides it).
    pub access_token: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

/// Why no credential could be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The grant is gone; an admin must reconnect.
    #[error("the connection needs to be re-authorised: {0}")]
    NeedsReauth(String),
    /// A temporary problem (provider or storage); retry later.
    #[error("credentials temporarily unavailable: {0}")]
    Unavailable(String),
}

/// Gives the http capability a connection's credentials.
#[async_trait]
pub trait CredentialProvider: Send + Sync {
    /// The current access token (refreshed first when about to expire).
    async fn bearer(&self, connection_id: &str) -> Result<Credential, CredentialError>;
    /// The provider refused `rejected`; refresh (once, single-flight) and
    /// return the new token.
    async fn refresh(
        &self,
        connection_id: &str,
        rejected: &Credential,
    ) -> Result<Credential, CredentialError>;
    /// A credential from an access token read ahead of the call (the
    /// dispatcher reads a batch's tokens at once), if it can be used as it
    /// is; None sends the call through [`CredentialProvider::bearer`].
    fn ahead(&self, _access_token: &str, _expires_at: i64) -> Option<Credential> {
        None
    }
}

/// A fixed token, for smoke runs and tests.
pub struct StaticCredentials(pub String);

#[async_trait]
impl CredentialProvider for StaticCredentials {
    async fn bearer(&self, _connection_id: &str) -> Result<Credential, CredentialError> {
        Ok(Credential {
            access_token: self.0.clone(),
        })
    }
    async fn refresh(
        &self,
        _connection_id: &str,
        _rejected: &Credential,
    ) -> Result<Credential, CredentialError> {
        Err(CredentialError::NeedsReauth(
            "a static token cannot be refreshed".into(),
        ))
    }
}

/// Holds a provider's request rate per connection (e.g. Xero's 60 per
/// minute), across every daemon sharing the store.
#[async_trait]
pub trait RateGate: Send + Sync {
    /// Take one request slot for `connection_id` (`per_minute` allowed):
    /// `Ok(None)` when taken, `Ok(Some(wait))` when the next slot frees in
    /// `wait`, `Err` when the gate itself is unavailable.
    async fn try_take(
        &self,
        connection_id: &str,
        per_minute: u32,
    ) -> Result<Option<Duration>, String>;
}

/// What a call holds while it runs, given back while it waits for a rate
/// slot: a delivery waiting for the provider's next minute should not
/// keep a dispatcher slot that a connection with budget could use.
#[async_trait]
pub trait Parking: Send + Sync {
    /// The call is about to wait `wait` for a slot of `connection_id`.
    fn park(&self, connection_id: &str, wait: Duration);
    /// The wait is over: take back what running needs (may wait for it).
    async fn unpark(&self);
}

/// A gate and the limit it enforces for one call.
#[derive(Clone)]
pub struct RateLimit {
    /// The gate.
    pub gate: Arc<dyn RateGate>,
    /// Requests per minute.
    pub per_minute: u32,
    /// Told when the call waits for a slot and when it resumes.
    pub parking: Option<Arc<dyn Parking>>,
    /// The longest one request waits for a slot before it fails.
    pub max_wait: Duration,
    /// Milliseconds this call spent waiting for slots: the runtime adds
    /// them to the call's deadline (which bounds the connector's own time,
    /// not the provider's rate).
    pub waited_ms: Arc<std::sync::atomic::AtomicU64>,
    /// When a request of this call was refused a slot because none was
    /// due in time (a full window, a pause the provider asked for on the
    /// connection): when the next one is due (Unix ms), else 0. The
    /// dispatcher makes such a failure a wait, not a counted attempt.
    pub held_until_ms: Arc<std::sync::atomic::AtomicI64>,
}

impl RateLimit {
    /// A limit of `per_minute` through `gate`, waiting up to `max_wait`.
    pub fn new(gate: Arc<dyn RateGate>, per_minute: u32, max_wait: Duration) -> Self {
        Self {
            gate,
            per_minute,
            parking: None,
            max_wait,
            waited_ms: Arc::default(),
            held_until_ms: Arc::default(),
        }
    }

    /// Wait for a slot: give up after `max_wait`, parking the call while it
    /// sleeps.
    async fn acquire(&self, connection_id: &str) -> Result<(), String> {
        let started = Instant::now();
        let give_up = started + self.max_wait;
        loop {
            let Some(wait) = self.gate.try_take(connection_id, self.per_minute).await? else {
                return Ok(());
            };
            // Judged by the gate's own wait: a call that cannot have a
            // slot in time fails at once, not after waiting in vain.
            if Instant::now() + wait > give_up {
                let due = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .saturating_add(wait)
                    .as_millis()
                    .min(i64::MAX as u128) as i64;
                self.held_until_ms
                    .fetch_max(due, std::sync::atomic::Ordering::Relaxed);
                return Err(format!(
                    "no request to the provider is due for {} s (its limit of {} requests a minute used up, or a pause it asked for); try later",
                    wait.as_secs().max(1),
                    self.per_minute
                ));
            }
            let wait = wait.clamp(Duration::from_millis(5), Duration::from_secs(1));
            let slept = Instant::now();
            match &self.parking {
                Some(p) => {
                    p.park(connection_id, wait);
                    tokio::time::sleep(wait).await;
                    p.unpark().await;
                }
                None => tokio::time::sleep(wait).await,
            }
            self.waited_ms.fetch_add(
                slept.elapsed().as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}

/// Per-call state of the `http` capability.
pub struct HttpCapability {
    plugin_id: Arc<str>,
    connection_id: String,
    policy: Arc<HttpPolicy>,
    transport: Arc<dyn HttpTransport>,
    credentials: Arc<dyn CredentialProvider>,
    limits: HttpLimits,
    rate: Option<RateLimit>,
    calls: u32,
    /// The connection's credential, fetched at the first request that
    /// asks for it and reused by the rest of this call (a delivery makes
    /// several requests; each fetch reads and decrypts the stored token).
    credential: Option<Credential>,
    /// A 401 already made this call refresh the token: a later 401 goes
    /// back to the connector as it is (a connector looping on an endpoint
    /// that answers 401 would otherwise rotate the grant at every request).
    refreshed: bool,
}

impl HttpCapability {
    /// A fresh call budget.
    pub fn new(
        plugin_id: Arc<str>,
        connection_id: String,
        policy: Arc<HttpPolicy>,
        transport: Arc<dyn HttpTransport>,
        credentials: Arc<dyn CredentialProvider>,
        limits: HttpLimits,
        rate: Option<RateLimit>,
    ) -> Self {
        Self {
            plugin_id,
            connection_id,
            policy,
            transport,
            credentials,
            limits,
            rate,
            calls: 0,
            credential: None,
            refreshed: false,
        }
    }

    /// Calls made so far in this call.
    pub fn calls(&self) -> u32 {
        self.calls
    }

    fn denied(&self, why: String) -> wit::Error {
        tracing::warn!(plugin = %self.plugin_id, reason = %why, "http request refused");
        wit::Error::Denied(why)
    }

    async fn send_inner(&mut self, req: wit::Request) -> Result<wit::Response, wit::Error> {
        self.calls += 1;
        if self.calls > self.limits.max_calls {
            return Err(wit::Error::CallLimit(self.limits.max_calls));
        }
        let url = self.policy.resolve(&req.url).map_err(|w| self.denied(w))?;
        let mut headers = Vec::with_capacity(req.headers.len() + 1);
        for (k, v) in req.headers {
            let name = k.to_ascii_lowercase();
            if FORBIDDEN_HEADERS.contains(&name.as_str()) {
                let instead = match name.as_str() {
                    "authorization" | "proxy-authorization" | "cookie" => {
                        "ask for the connection's token with with-credentials"
                    }
                    _ => "the host sets it",
                };
                return Err(self.denied(format!(
                    "a connector may not set the {name:?} header; {instead}"
                )));
            }
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(&v).is_err()
            {
                return Err(self.denied(format!("header {name:?} is not a valid HTTP header")));
            }
            headers.push((name, v));
        }
        if let Some(b) = &req.body
            && b.len() > self.limits.max_request_bytes
        {
            return Err(self.denied(format!(
                "request body of {} bytes is over the {}-byte limit",
                b.len(),
                self.limits.max_request_bytes
            )));
        }
        let method = match req.method {
            wit::Method::Get => "GET",
            wit::Method::Post => "POST",
            wit::Method::Put => "PUT",
            wit::Method::Patch => "PATCH",
            wit::Method::Delete => "DELETE",
        };
        let mut credential = None;
        if req.with_credentials {
            if !self.policy.oauth {
                // Without [oauth] a connection never holds tokens: asking
                // for them would answer "reconnect" forever, and the
                // connection would pause, resume on reconnect, and pause
                // again.
                return Err(self.denied(
                    "with-credentials asks for the connection's OAuth token, but this connector's manifest declares no [oauth], so its connections hold none; send the request without it (an API key belongs in a secret setting)".into(),
                ));
            }
            if self.credential.is_none() {
                let bearer = self.credentials.bearer(&self.connection_id);
                self.credential = Some(self.bounded(bearer).await?);
            }
            credential = self.credential.clone();
        }
        let mut out = OutboundRequest {
            method,
            url,
            headers,
            body: req.body,
        };
        let mut resp = self.round_trip(&out, credential.as_ref()).await?;
        if resp.status == 401
            && !self.refreshed
            && let Some(old) = &credential
        {
            let fresh = self
                .bounded(self.credentials.refresh(&self.connection_id, old))
                .await?;
            // Spent only by a refresh that gave a token (one that failed,
            // a token endpoint timing out, may be tried again).
            self.refreshed = true;
            out.headers.retain(|(k, _)| k != "authorization");
            resp = self.round_trip(&out, Some(&fresh)).await?;
            self.credential = Some(fresh);
        }
        Ok(wit::Response {
            status: resp.status,
            headers: resp.headers,
            body: resp.body,
        })
    }

    /// A credential, within the per-request timeout: a token endpoint
    /// that does not answer fails this request with an error that says
    /// so (the connector sees a connection error, retried later) instead
    /// of holding the call until its deadline stops it as if the connector
    /// had hung. A refresh cut off here is safe: its answer, if it came,
    /// is fetched again with the same refresh token (see `credentials`).
    async fn bounded(
        &self,
        get: impl std::future::Future<Output = Result<Credential, CredentialError>>,
    ) -> Result<Credential, wit::Error> {
        match tokio::time::timeout(self.limits.timeout, get).await {
            Ok(r) => r.map_err(cred_error),
            Err(_) => {
                tracing::warn!(
                    plugin = %self.plugin_id, connection = %self.connection_id,
                    timeout_s = self.limits.timeout.as_secs_f32(),
                    "no access token in time: the token endpoint did not answer"
                );
                Err(wit::Error::Connection(format!(
                    "no access token within {}s: the provider's token endpoint did not answer",
                    self.limits.timeout.as_secs_f32()
                )))
            }
        }
    }

    async fn round_trip(
        &self,
        out: &OutboundRequest,
        credential: Option<&Credential>,
    ) -> Result<InboundResponse, wit::Error> {
        if let Some(rl) = &self.rate {
            rl.acquire(&self.connection_id)
                .await
                .map_err(wit::Error::Connection)?;
        }
        let mut req = out.clone();
        if let Some(c) = credential {
            req.headers
                .push(("authorization".into(), format!("Bearer {}", c.access_token)));
        }
        let started = Instant::now();
        let result = self
            .transport
            .send(req, self.limits.max_response_bytes, self.limits.timeout)
            .await;
        let ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(r) => tracing::debug!(
                plugin = %self.plugin_id, method = out.method, host = out.url.host_str().unwrap_or(""),
                path = out.url.path(), status = r.status, ms, "http"
            ),
            Err(e) => tracing::info!(
                plugin = %self.plugin_id, method = out.method, host = out.url.host_str().unwrap_or(""),
                path = out.url.path(), error = %e, ms, "http failed"
            ),
        }
        result.map_err(|e| match e {
            TransportError::Timeout => wit::Error::Timeout,
            TransportError::Connection(m) => wit::Error::Connection(m),
            TransportError::TooLarge(n) => wit::Error::TooLarge(n),
        })
    }
}

fn cred_error(e: CredentialError) -> wit::Error {
    match e {
        CredentialError::NeedsReauth(m) => wit::Error::Unauthorized(m),
        CredentialError::Unavailable(m) => wit::Error::Connection(m),
    }
}

impl wit::Host for HttpCapability {
    async fn send(&mut self, req: wit::Request) -> Result<wit::Response, wit::Error> {
        self.send_inner(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider that answers 401 to everything.
    struct Refusing;

    #[async_trait]
    impl HttpTransport for Refusing {
        async fn send(
            &self,
            _: OutboundRequest,
            _: u64,
            _: Duration,
        ) -> Result<InboundResponse, TransportError> {
            Ok(InboundResponse {
                status: 401,
                headers: vec![],
                body: vec![],
            })
        }
    }

    /// Credentials that count refreshes.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicU32);

    #[async_trait]
    impl CredentialProvider for Counting {
        async fn bearer(&self, _: &str) -> Result<Credential, CredentialError> {
            Ok(Credential {
                access_token: "t0".into(),
            })
        }
        async fn refresh(&self, _: &str, _: &Credential) -> Result<Credential, CredentialError> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            Ok(Credential {
                access_token: format!("t{n}"),
            })
        }
    }

    /// A 401 refreshes the token and retries once per call: a connector
    /// looping on an endpoint that keeps answering 401 gets the 401 back
    /// from then on, rather than rotating the grant at every request.
    #[tokio::test]
    async fn a_401_refreshes_once_per_call() {
        let policy = HttpPolicy::new(&["https://api.example.com".into()], &BTreeMap::new())
            .unwrap()
            .with_oauth(true);
        let creds = Arc::new(Counting::default());
        let mut cap = HttpCapability::new(
            "p".into(),
            "c".into(),
            Arc::new(policy),
            Arc::new(Refusing),
            creds.clone(),
            HttpLimits::default(),
            None,
        );
        for _ in 0..3 {
            let r = cap
                .send_inner(wit::Request {
                    method: wit::Method::Get,
                    url: "https://api.example.com/x".into(),
                    headers: vec![],
                    body: None,
                    with_credentials: true,
                })
                .await
                .unwrap();
            assert_eq!(r.status, 401);
        }
        assert_eq!(creds.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A request that hangs ends as the connector's `Timeout` (which it
    /// reports in its own words), not as the call cut off at its deadline.
    #[test]
    fn a_request_times_out_before_the_call_does() {
        let request = HttpLimits::default().timeout;
        let call = crate::runtime::RuntimeConfig::default().deadline;
        assert!(request < call, "{request:?} against {call:?}");
    }

    /// A loopback HTTP/1.1 server that answers every request after 100 ms
    /// (so a burst is really in flight at once) and counts connections.
    async fn counting_server() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        // Requests carry no body: one ends at its blank line.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if sock.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Bursts as wide as the dispatcher's concurrency reuse the connections
    /// of the burst before (a smaller idle pool closed the surplus and
    /// opened new ones: against Xero, a TLS handshake each).
    #[tokio::test]
    async fn bursts_of_deliveries_reuse_pooled_connections() {
        let (addr, accepted) = counting_server().await;
        let transport = Arc::new(ReqwestTransport::new().unwrap());
        let url = url::Url::parse(&format!("http://{addr}/ping")).unwrap();
        for burst in 0..3 {
            if burst > 0 {
                // Between bursts, as between a dispatcher's batches: the
                // connections are back in the pool (hyper returns one when
                // its dispatch task has seen the response end, which can
                // trail the body's last byte).
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let calls = (0..64).map(|_| {
                let (t, url) = (transport.clone(), url.clone());
                tokio::spawn(async move {
                    let req = OutboundRequest {
                        method: "GET",
                        url,
                        headers: Vec::new(),
                        body: None,
                    };
                    t.send(req, 1024, Duration::from_secs(10)).await
                })
            });
            for call in calls.collect::<Vec<_>>() {
                let resp = call.await.unwrap().unwrap();
                assert_eq!((resp.status, resp.body.as_slice()), (200, &b"ok"[..]));
            }
        }
        let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            (33..=80).contains(&n),
            "3 bursts of 64 requests opened {n} connections (more than 32: the bursts were in flight at once; 64 and a few at most: later bursts reuse them, where a pool that kept 32 idle would open 128)"
        );
    }

    #[test]
    fn allow_list_is_fail_closed_and_follows_overrides() {
        let mut o = BTreeMap::new();
        o.insert(
            "https://api.xero.com".to_string(),
            "http://127.0.0.1:9999/x".to_string(),
        );
        let p = HttpPolicy::new(&["https://api.xero.com".into()], &o).unwrap();
        let u = p
            .resolve("https://api.xero.com/api.xro/2.0/Invoices?where=a")
            .unwrap();
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:9999/x/api.xro/2.0/Invoices?where=a"
        );
        assert!(
            p.resolve("https://evil.example.com/")
                .unwrap_err()
                .contains("allowed_hosts")
        );
        // The override target itself is not reachable directly.
        assert!(p.resolve("http://127.0.0.1:9999/x").is_err());
        assert!(p.resolve("https://user:pw@api.xero.com/").is_err());
        // Overrides cannot add hosts.
        let mut bad = BTreeMap::new();
        bad.insert(
            "https://other.com".to_string(),
            "http://127.0.0.1:1".to_string(),
        );
        assert!(HttpPolicy::new(&["https://api.xero.com".into()], &bad).is_err());
    }
}
