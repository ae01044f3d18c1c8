//! The connector test kit: run your real `.wasm` in ledgerport's real
//! runtime inside a normal `cargo test`, against scripted HTTP exchanges,
//! in-memory mappings and kv and a static credential, then assert on the
//! requests it sent and the outcome it returned.
//!
//! Nothing is mocked on the host side: the component is verified and loaded
//! like the daemon loads it (imports, exports, contract version), every call
//! runs in a fresh, bounded instance, and the `http` capability applies the
//! manifest's allow-list, refuses `Authorization` from the guest and
//! attaches the bearer token itself. Only the network is replaced: each
//! request that leaves the host is answered by the first unused
//! [`Exchange`] that matches it, and recorded as a [`SentRequest`]. A
//! request no exchange matches fails the test, naming the request and the
//! exchanges still waiting.
//!
//! ```no_run
//! use ledgerport_testkit::{Exchange, TestKit, sample_invoice};
//! use serde_json::json;
//!
//! # async fn example() -> anyhow::Result<()> {
//! // `cargo xtask wasm` (or `ledgerport plugin install`) put it there;
//! // `TestKit::from_component(manifest, wasm)` skips the install.
//! let kit = TestKit::installed("webhook")?;
//! let run = kit
//!     .connection()
//!     .setting("endpoint", "https://hooks.example.com/erp")
//!     .setting("signing_secret", "a-test-secret-of-enough-length")
//!     .mappings_for(&sample_invoice(), "6000")
//!     .expect(Exchange::post("https://hooks.example.com/erp").respond(201, json!({"id": "r-1"})));
//! let out = run.deliver(&sample_invoice()).await;
//! assert_eq!(out.unwrap().external_id, "r-1");
//! let sent = &run.requests()[0];
//! assert!(sent.header("x-ledgerport-signature").unwrap().starts_with("t="));
//! run.assert_all_exchanges_used();
//! # Ok(())
//! # }
//! ```

mod exchange;

pub use exchange::{Exchange, SentRequest};
pub use ledgerport::runtime::DocumentExtras;
pub use ledgerport::runtime::v0_1::ledgerport::connector::types as wit;
pub use wit::{
    AccountList, CheckReport, ConnectorInfo, Delivery, DeliveryError, Document, Receipt,
};

use anyhow::Context as _;
use exchange::{Script, ScriptedTransport};
use ledgerport::capabilities::connection::ConnectionInfo;
use ledgerport::capabilities::http::{
    Credential, CredentialError, CredentialProvider, StaticCredentials,
};
use ledgerport::capabilities::kv::KvStore;
use ledgerport::capabilities::mapping::{AccountMapping, MappingScope, MemoryMappings};
use ledgerport::manifest::Manifest;
use ledgerport::runtime::{CallContext, CallError, Plugin, Runtime, RuntimeConfig};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A connector loaded into a real runtime whose network is a script.
///
/// Load it once per test (or share one between tests of a file); make one
/// [`TestConnection`] per scenario with [`TestKit::connection`]. Calls on
/// one kit take turns, so connections of one kit may be used from
/// concurrent tests.
pub struct TestKit {
    runtime: Runtime,
    plugin: Plugin,
    transport: Arc<ScriptedTransport>,
    turn: tokio::sync::Mutex<()>,
}

impl TestKit {
    /// Load an installed plugin: a manifest carrying the component's
    /// `sha256`, as `ledgerport plugin install` and `cargo xtask wasm`
    /// write them (`target/plugins/<id>/manifest.toml`).
    pub fn load(manifest: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = manifest.as_ref();
        let (runtime, transport) = runtime()?;
        let plugin = runtime
            .load(path, &BTreeMap::new())
            .with_context(|| format!("loading {} (after changing the connector, rebuild and reinstall it: `cargo xtask wasm`)", path.display()))?;
        Ok(Self::new(runtime, plugin, transport))
    }

    /// Load from a source manifest and a component file, computing the
    /// component's hash here, so no `plugin install` step is needed.
    pub fn from_component(
        manifest: impl AsRef<Path>,
        component: impl AsRef<Path>,
    ) -> anyhow::Result<Self> {
        let mut m = Manifest::from_file(manifest.as_ref())?;
        let bytes = std::fs::read(component.as_ref()).with_context(|| {
            format!(
                "reading {} (build it for wasm32-wasip2 first)",
                component.as_ref().display()
            )
        })?;
        m.sha256 = Some(hex::encode(Sha256::digest(&bytes)));
        let (runtime, transport) = runtime()?;
        let plugin = runtime.load_bytes(m, &bytes, &BTreeMap::new())?;
        Ok(Self::new(runtime, plugin, transport))
    }

    /// Load the plugin `cargo xtask wasm` installed as
    /// `target/plugins/<id>/manifest.toml`, looking for `target/` in
    /// `CARGO_TARGET_DIR`, then in the current directory and its parents.
    /// When it is missing the error says to run `cargo xtask wasm`.
    pub fn installed(id: &str) -> anyhow::Result<Self> {
        let rel = Path::new("plugins").join(id).join("manifest.toml");
        let Some(target) = target_dir() else {
            anyhow::bail!(
                "no target/ directory found from {}: build and install the connectors with `cargo xtask wasm`",
                std::env::current_dir().unwrap_or_default().display()
            );
        };
        let path = target.join(&rel);
        if !path.exists() {
            anyhow::bail!(
                "{} is missing: build and install the connectors with `cargo xtask wasm`",
                path.display()
            );
        }
        Self::load(path)
    }

    fn new(runtime: Runtime, plugin: Plugin, transport: Arc<ScriptedTransport>) -> Self {
        Self {
            runtime,
            plugin,
            transport,
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// The plugin's manifest.
    pub fn manifest(&self) -> &Manifest {
        self.plugin.manifest()
    }

    /// A new connection to test with: tenant `acme`, connection id
    /// `test-connection`, the manifest's default settings, bearer token
    /// `test-token`, no mappings, empty kv, no exchanges.
    pub fn connection(&self) -> TestConnection<'_> {
        TestConnection {
            kit: self,
            info: ConnectionInfo {
                connection_id: "test-connection".into(),
                tenant_id: "acme".into(),
                ..Default::default()
            },
            credentials: Arc::new(StaticCredentials("test-token".into())),
            mappings: Vec::new(),
            kv: Arc::new(Kv::default()),
            script: Arc::default(),
        }
    }
}

/// A runtime with the daemon's defaults (deadline, memory, HTTP caps), a
/// small instance pool and the scripted transport.
fn runtime() -> anyhow::Result<(Runtime, Arc<ScriptedTransport>)> {
    let transport = Arc::new(ScriptedTransport::default());
    let config = RuntimeConfig {
        max_concurrent_instances: 4,
        // Precompiled components are kept beside the build, so each test
        // process does not compile the same component again.
        cache_dir: target_dir().map(|t| t.join("testkit-cache")),
        ..RuntimeConfig::default()
    };
    Ok((Runtime::new(config, transport.clone())?, transport))
}

/// `CARGO_TARGET_DIR`, else the nearest `target/` from the current directory up.
fn target_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(d));
    }
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .map(|d| d.join("target"))
        .find(|t| t.is_dir())
}

/// A credential provider with no credentials: `with-credentials` requests
/// fail with the host's "unauthorized" error.
struct NoCredentials;

#[async_trait::async_trait]
impl CredentialProvider for NoCredentials {
    async fn bearer(&self, _connection_id: &str) -> Result<Credential, CredentialError> {
        Err(CredentialError::NeedsReauth(
            "the connection was disconnected (testkit)".into(),
        ))
    }
    async fn refresh(
        &self,
        _connection_id: &str,
        _rejected: &Credential,
    ) -> Result<Credential, CredentialError> {
        Err(CredentialError::NeedsReauth(
            "the connection was disconnected (testkit)".into(),
        ))
    }
}

/// A token that refreshes once, to another.
struct Refreshing {
    first: String,
    second: String,
}

#[async_trait::async_trait]
impl CredentialProvider for Refreshing {
    async fn bearer(&self, _connection_id: &str) -> Result<Credential, CredentialError> {
        Ok(Credential {
            access_token: self.first.clone(),
        })
    }
    async fn refresh(
        &self,
        _connection_id: &str,
        rejected: &Credential,
    ) -> Result<Credential, CredentialError> {
        if rejected.access_token == self.second {
            return Err(CredentialError::NeedsReauth(
                "the refreshed token was refused too (testkit)".into(),
            ));
        }
        Ok(Credential {
            access_token: self.second.clone(),
        })
    }
}

/// Why a test call could not produce an outcome.
#[derive(Debug)]
pub enum KitError {
    /// The call itself failed (trap, deadline, memory cap).
    Call(CallError),
    /// The connector sent requests no scripted exchange matches.
    Unmatched(Vec<String>),
}

impl std::fmt::Display for KitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KitError::Call(e) => write!(f, "the call failed: {e}"),
            KitError::Unmatched(all) => write!(f, "{}", all.join("\n")),
        }
    }
}

impl std::error::Error for KitError {}

/// One connection under test: its settings, mappings, kv, credential and
/// the HTTP exchanges it expects. Configure it with the builder methods,
/// then call the connector ([`TestConnection::deliver`], `check`, ...) as
/// often as the scenario needs: kv and the record of requests carry over
/// between calls, like a real connection's.
pub struct TestConnection<'k> {
    kit: &'k TestKit,
    info: ConnectionInfo,
    credentials: Arc<dyn CredentialProvider>,
    mappings: Vec<AccountMapping>,
    kv: Arc<Kv>,
    script: Arc<Mutex<Script>>,
}

impl<'k> TestConnection<'k> {
    /// Set a connector setting (overrides the manifest's default).
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.info.settings.insert(key.into(), value.into());
        self
    }

    /// The platform tenant the connection belongs to.
    pub fn tenant(mut self, tenant_id: &str) -> Self {
        self.info.tenant_id = tenant_id.into();
        self
    }

    /// The provider's organisation (id and name) the connection writes to.
    pub fn organisation(mut self, id: &str, name: &str) -> Self {
        self.info.external_tenant_id = Some(id.into());
        self.info.external_tenant_name = Some(name.into());
        self
    }

    /// Map a line kind to an account code (and optionally a tax type).
    pub fn mapping(mut self, kind: &str, account_code: &str, tax_type: Option<&str>) -> Self {
        self.mappings.retain(|m| m.kind != kind);
        self.mappings.push(AccountMapping {
            kind: kind.into(),
            account_code: account_code.into(),
            tax_type: tax_type.map(Into::into),
        });
        self
    }

    /// Map every line kind of `doc` to `account_code` (no tax type), for
    /// tests where the accounts do not matter.
    pub fn mappings_for(self, doc: &Document, account_code: &str) -> Self {
        doc.lines.iter().fold(self, |c, l| {
            let kind = l.kind.clone();
            c.mapping(&kind, account_code, None)
        })
    }

    /// Put a value in the connection's kv before the first call.
    pub fn kv(self, key: &str, value: impl AsRef<[u8]>) -> Self {
        self.kv.map().insert(key.into(), value.as_ref().to_vec());
        self
    }

    /// The bearer token the host attaches for `with-credentials` (default
    /// `test-token`). It cannot be refreshed: on a 401 the host's refresh
    /// fails and the connector gets "unauthorized" (see
    /// [`TestConnection::refreshes_to`]).
    pub fn token(mut self, token: &str) -> Self {
        self.credentials = Arc::new(StaticCredentials(token.into()));
        self
    }

    /// Bearer token `first`, refreshed to `second` when the provider
    /// answers 401: the host then retries the request once with `second`,
    /// as it does in the daemon.
    pub fn refreshes_to(mut self, first: &str, second: &str) -> Self {
        self.credentials = Arc::new(Refreshing {
            first: first.into(),
            second: second.into(),
        });
        self
    }

    /// No credentials at all (a disconnected connection): every
    /// `with-credentials` request fails with the host's "unauthorized".
    pub fn without_credentials(mut self) -> Self {
        self.credentials = Arc::new(NoCredentials);
        self
    }

    /// Script one more HTTP exchange.
    pub fn expect(self, exchange: Exchange) -> Self {
        self.script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(exchange);
        self
    }

    fn context(&self) -> CallContext {
        let mappings = MemoryMappings::default();
        let scope = MappingScope {
            tenant_id: self.info.tenant_id.clone(),
            connector_id: self.kit.manifest().id.clone(),
        };
        for m in &self.mappings {
            mappings.set(&scope, m.clone());
        }
        CallContext {
            connection: self.info.clone(),
            credentials: self.credentials.clone(),
            mappings: Arc::new(mappings),
            kv: self.kv.clone(),
            rate: None,
        }
    }

    /// Run one call with this connection's script answering its requests.
    async fn run<R, F, Fut>(&self, f: F) -> Result<R, KitError>
    where
        F: FnOnce(&'k Runtime, &'k Plugin, CallContext) -> Fut,
        Fut: std::future::Future<Output = Result<R, CallError>>,
    {
        let kit = self.kit;
        let _turn = kit.turn.lock().await;
        kit.transport.route_to(self.script.clone());
        let result = f(&kit.runtime, &kit.plugin, self.context()).await;
        kit.transport.clear();
        let unmatched = self
            .script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_unmatched();
        if !unmatched.is_empty() {
            return Err(KitError::Unmatched(unmatched));
        }
        result.map_err(KitError::Call)
    }

    /// Deliver `doc` with the delivery key `delivery-<doc.id>`, attempt 1.
    ///
    /// # Panics
    ///
    /// Fails the test when the connector sent a request no exchange matches
    /// or the call itself failed; [`TestConnection::try_deliver`] returns
    /// those instead.
    pub async fn deliver(&self, doc: &Document) -> Result<Receipt, DeliveryError> {
        let key = delivery(&format!("delivery-{}", doc.id), 1);
        self.deliver_as(key, doc).await
    }

    /// Deliver `doc` as this delivery (key and attempt), failing the test
    /// like [`TestConnection::deliver`].
    pub async fn deliver_as(
        &self,
        delivery: Delivery,
        doc: &Document,
    ) -> Result<Receipt, DeliveryError> {
        self.try_deliver(delivery, doc)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Deliver, returning an unmatched request or a failed call as a
    /// [`KitError`] (e.g. to test that a connector traps on bad input).
    pub async fn try_deliver(
        &self,
        delivery: Delivery,
        doc: &Document,
    ) -> Result<Result<Receipt, DeliveryError>, KitError> {
        self.try_deliver_with(delivery, doc, DocumentExtras::default())
            .await
    }

    /// Deliver with what only contract 0.2 carries (a purchase order), as
    /// the host does: a 0.2 connector gets `extras` in its document (a 0.1
    /// connector never sees them), and its receipt's warnings come back as
    /// notes starting with `"Warning: "`. Fails the test like
    /// [`TestConnection::deliver`]. [`document_and_extras_from_json`]
    /// reads both from the platform's JSON.
    pub async fn deliver_with(
        &self,
        delivery: Delivery,
        doc: &Document,
        extras: DocumentExtras,
    ) -> Result<Receipt, DeliveryError> {
        self.try_deliver_with(delivery, doc, extras)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`TestConnection::deliver_with`], returning an unmatched request or
    /// a failed call as a [`KitError`].
    pub async fn try_deliver_with(
        &self,
        delivery: Delivery,
        doc: &Document,
        extras: DocumentExtras,
    ) -> Result<Result<Receipt, DeliveryError>, KitError> {
        let doc = doc.clone();
        self.run(
            move |rt, p, ctx| async move { rt.deliver_with(p, &ctx, delivery, doc, extras).await },
        )
        .await
    }

    /// Call `check` (panics like [`TestConnection::deliver`]).
    pub async fn check(&self) -> Result<CheckReport, DeliveryError> {
        self.run(|rt, p, ctx| async move { rt.check(p, &ctx).await })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Call `list-accounts` (panics like [`TestConnection::deliver`]).
    pub async fn list_accounts(&self) -> Result<AccountList, DeliveryError> {
        self.run(|rt, p, ctx| async move { rt.list_accounts(p, &ctx).await })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Call `describe` (panics like [`TestConnection::deliver`]).
    pub async fn describe(&self) -> ConnectorInfo {
        self.run(|rt, p, ctx| async move { rt.describe(p, &ctx).await })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every request the connector sent so far, in order (those the host
    /// refused before sending are not here: they never left).
    pub fn requests(&self) -> Vec<SentRequest> {
        self.script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests()
    }

    /// A kv value of the connection, as the connector left it.
    pub fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        self.kv.map().get(key).cloned()
    }

    /// Scripted exchanges no request has used yet, described.
    pub fn unused_exchanges(&self) -> Vec<String> {
        self.script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unused()
    }

    /// Fail the test when a scripted exchange was never used, naming it
    /// and listing the requests that were sent.
    pub fn assert_all_exchanges_used(&self) {
        let unused = self.unused_exchanges();
        if !unused.is_empty() {
            let sent: Vec<String> = self.requests().iter().map(|r| r.to_string()).collect();
            panic!(
                "scripted exchanges never used:\n  {}\nrequests the connector sent:\n  {}",
                unused.join("\n  "),
                if sent.is_empty() {
                    "none".to_string()
                } else {
                    sent.join("\n  ")
                }
            );
        }
    }
}

/// The connection's kv, in memory. (One connection per store, so the
/// connection id is not part of the key.)
#[derive(Default)]
struct Kv(Mutex<BTreeMap<String, Vec<u8>>>);

impl Kv {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl KvStore for Kv {
    async fn get(&self, _connection: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.map().get(key).cloned())
    }
    async fn set(&self, _connection: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
        self.map().insert(key.into(), value.to_vec());
        Ok(())
    }
    async fn delete(&self, _connection: &str, key: &str) -> anyhow::Result<()> {
        self.map().remove(key);
        Ok(())
    }
}

/// A delivery with this key and attempt number.
pub fn delivery(key: &str, attempt: u32) -> Delivery {
    Delivery {
        key: key.into(),
        attempt,
    }
}

/// Parse a document in the platform's JSON (the ingest API's format, like
/// `examples/documents/*.json`) into the contract's document.
pub fn document_from_json(json: &[u8]) -> anyhow::Result<Document> {
    let d = ledgerport::document::Document::from_json(json)?;
    Ok(d.to_wit()?)
}

/// A document in the platform's JSON as the contract's document and what
/// only contract 0.2 carries (its purchase order): for
/// [`TestConnection::deliver_with`].
pub fn document_and_extras_from_json(json: &[u8]) -> anyhow::Result<(Document, DocumentExtras)> {
    let d = ledgerport::document::Document::from_json(json)?;
    Ok((d.to_wit()?, d.extras()))
}

/// Read a document in the platform's JSON from a file.
pub fn document_from_file(path: impl AsRef<Path>) -> anyhow::Result<Document> {
    let bytes = std::fs::read(path.as_ref())
        .with_context(|| format!("reading {}", path.as_ref().display()))?;
    document_from_json(&bytes).with_context(|| format!("parsing {}", path.as_ref().display()))
}

/// The sample invoice (`examples/documents/invoice.json`: ten lines of ten
/// kinds, EUR, a PDF).
pub fn sample_invoice() -> Document {
    document_from_json(include_bytes!("../../../examples/documents/invoice.json"))
        .unwrap_or_else(|e| panic!("the sample invoice no longer parses: {e:#}"))
}

/// The sample credit note (`examples/documents/credit-note.json`, crediting
/// the sample invoice).
pub fn sample_credit_note() -> Document {
    document_from_json(include_bytes!(
        "../../../examples/documents/credit-note.json"
    ))
    .unwrap_or_else(|e| panic!("the sample credit note no longer parses: {e:#}"))
}
