//! Shared helpers for the storage and connection tests: a fresh database
//! per test on either engine, the Xero simulator wired to a
//! [`Connections`] service with its OAuth routes served locally, and a
//! driver for the browser side of the OAuth dance.
//!
//! PostgreSQL: `LEDGERPORT_TEST_PG` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`, the maintenance database)
//! is used to create a uniquely named database per test, dropped at the
//! end. When it is unreachable the PostgreSQL variants are skipped with a
//! loud message, unless `CI` is set, in which case they fail.

use ledgerport::connections::{Clock, Connections};
use ledgerport::credentials::RefreshPolicy;
use ledgerport::crypto::KeyRing;
use ledgerport::manifest::Manifest;
use ledgerport::oauth::{OAuthApp, OAuthProvider, Providers, oauth_router};
use ledgerport::store::Store;
use ledgerport::store::outbox::NewDocument;
use sha2::{Digest, Sha256};
use sqlx::Connection as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use xero_sim::{Sim, SimConfig, SimHandle};

/// The one number `sql` answers (a `SELECT COUNT(*) ...`), on either
/// engine.
pub async fn count(store: &Store, sql: &str) -> i64 {
    match store.pool() {
        ledgerport::store::Pool::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await,
        ledgerport::store::Pool::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await,
    }
    .unwrap()
}

/// Run `sql` (a test's own change behind the store's back), on either
/// engine.
pub async fn exec(store: &Store, sql: &str) {
    match store.pool() {
        ledgerport::store::Pool::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
        ledgerport::store::Pool::Postgres(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
    }
    .unwrap();
}

/// An invoice to ingest: the tests' shorthand for a [`NewDocument`] of kind
/// `invoice` crediting nothing.
pub fn new_doc<'a>(
    tenant_id: &'a str,
    document_id: &'a str,
    number: &'a str,
    body: &'a str,
    body_hash: &'a str,
    now: i64,
) -> NewDocument<'a> {
    NewDocument {
        tenant_id,
        document_id,
        kind: "invoice",
        number,
        credits_invoice_number: None,
        body,
        body_hash,
        now,
        skip_connectors: &[],
    }
}

/// The maintenance database URL.
pub fn pg_admin_url() -> String {
    std::env::var("LEDGERPORT_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A database for one test.
pub enum TestDb {
    /// A temp SQLite file.
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    /// A fresh PostgreSQL database.
    Postgres { name: String, url: String },
}

impl TestDb {
    /// A temp SQLite file.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledgerport.db");
        TestDb::Sqlite { _dir: dir, path }
    }

    /// A fresh PostgreSQL database, or None (skipped) when the server is
    /// unreachable outside CI.
    pub async fn postgres() -> Option<Self> {
        let admin = pg_admin_url();
        let mut c = match sqlx::PgConnection::connect(&admin).await {
            Ok(c) => c,
            Err(e) => {
                if in_ci() {
                    panic!("PostgreSQL at {admin} is unreachable and CI is set: {e}");
                }
                eprintln!(
                    "\n!!!!! SKIPPING a PostgreSQL storage test: {admin} is unreachable ({e}). \
                     Set LEDGERPORT_TEST_PG or start PostgreSQL; under CI=true this fails. !!!!!\n"
                );
                return None;
            }
        };
        let name = format!("lp_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await
            .unwrap();
        let _ = c.close().await;
        let mut u = url::Url::parse(&admin).unwrap();
        u.set_path(&format!("/{name}"));
        Some(TestDb::Postgres {
            name,
            url: u.to_string(),
        })
    }

    /// The URL to give `Store::open`.
    pub fn url(&self) -> String {
        match self {
            TestDb::Sqlite { path, .. } => path.display().to_string(),
            TestDb::Postgres { url, .. } => url.clone(),
        }
    }

    /// The SQLite file, if it is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            TestDb::Sqlite { path, .. } => Some(path),
            _ => None,
        }
    }

    /// Open and migrate a store on it.
    pub async fn store(&self) -> Store {
        Store::open_and_migrate(&self.url()).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { name, .. } = self {
            let name = name.clone();
            let admin = pg_admin_url();
            // Drop from a separate thread with its own runtime: we may be inside one.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut c)
                                .await;
                    }
                });
            })
            .join();
        }
    }
}

/// A fixed test key ring.
pub fn keys(seed: u8) -> KeyRing {
    KeyRing::from_keys(&[[seed; 32]]).unwrap()
}

/// The three Xero origins, all sent to the simulator.
pub fn sim_overrides(sim: &SimHandle) -> BTreeMap<String, String> {
    let mut o = BTreeMap::new();
    for h in [
        "https://login.xero.com",
        "https://identity.xero.com",
        "https://api.xero.com",
    ] {
        o.insert(h.to_string(), sim.base_url());
    }
    o
}

/// The Xero manifest from the repository.
pub fn xero_manifest() -> Manifest {
    Manifest::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/xero/manifest.toml"),
    )
    .unwrap()
}

/// A Xero provider against the simulator, giving up on a token request
/// after `timeout`.
pub fn xero_provider(
    sim: &SimHandle,
    redirect_uri: &str,
    base_urls: Option<BTreeMap<String, String>>,
    timeout: Duration,
) -> OAuthProvider {
    OAuthProvider::new(
        &xero_manifest(),
        OAuthApp {
            client_id: xero_sim::DEFAULT_CLIENT_ID.into(),
            client_secret: Some(ledgerport::crypto::Secret::new(
                xero_sim::DEFAULT_CLIENT_SECRET,
            )),
            redirect_uri: redirect_uri.into(),
            broad_scopes: false,
            base_urls: base_urls.unwrap_or_else(|| sim_overrides(sim)),
            timeout,
        },
    )
    .unwrap()
}

/// The Xero connector loaded into a runtime, requests going to the simulator.
pub fn xero_plugin(
    sim: &SimHandle,
) -> (
    Arc<ledgerport::runtime::Runtime>,
    Arc<ledgerport::runtime::Plugin>,
) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let wasm = target.join("wasm32-wasip2/wasm/xero_connector.wasm");
    let bytes = std::fs::read(&wasm).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the connectors with `cargo xtask wasm`",
            wasm.display()
        )
    });
    let mut m = xero_manifest();
    m.sha256 = Some(hex::encode(Sha256::digest(&bytes)));
    let rt = ledgerport::runtime::Runtime::new(
        ledgerport::runtime::RuntimeConfig::default(),
        Arc::new(ledgerport::capabilities::http::ReqwestTransport::new().unwrap()),
    )
    .unwrap();
    let mut o = BTreeMap::new();
    o.insert("https://api.xero.com".to_string(), sim.base_url());
    let plugin = rt.load_bytes(m, &bytes, &o).unwrap();
    (Arc::new(rt), Arc::new(plugin))
}

/// One daemon's view: a store, the service, its routes on a local port.
pub struct Daemon {
    pub store: Store,
    pub conns: Arc<Connections>,
    pub base: String,
}

/// Fast retries for tests.
pub fn test_policy() -> RefreshPolicy {
    RefreshPolicy {
        margin_secs: 120,
        attempts: 4,
        backoff: Duration::from_millis(50),
    }
}

/// Start a daemon view over `db_url` with `keys`, the clock of `sim`: a
/// store, the token manager and the OAuth callback, the simulator as Xero.
/// Token requests wait as long as the daemon's own: a short timeout made a
/// token endpoint slowed on purpose (the refresh storm's 300 ms) look lost
/// on a loaded machine, and the host then asked a second time.
pub async fn daemon(
    sim: &Arc<SimHandle>,
    db_url: &str,
    keys: KeyRing,
    base_urls: Option<BTreeMap<String, String>>,
) -> Daemon {
    daemon_with_timeout(
        sim,
        db_url,
        keys,
        base_urls,
        ledgerport::oauth::TOKEN_REQUEST_TIMEOUT,
    )
    .await
}

/// [`daemon`] whose token requests give up after `timeout` (for a test of
/// a token answer that never arrives).
pub async fn daemon_with_timeout(
    sim: &Arc<SimHandle>,
    db_url: &str,
    keys: KeyRing,
    base_urls: Option<BTreeMap<String, String>>,
    timeout: Duration,
) -> Daemon {
    let store = Store::open_and_migrate(db_url).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut providers = Providers::new();
    providers.insert(xero_provider(
        sim,
        &format!("{base}/oauth/callback"),
        base_urls,
        timeout,
    ));
    let s2 = sim.clone();
    let conns = Arc::new(
        Connections::with_policy(
            store.clone(),
            Arc::new(keys),
            Arc::new(providers),
            Clock::from_fn(move || s2.now()),
            test_policy(),
        )
        .with_catalogue(ledgerport::connections::Catalogue::sample()),
    );
    let app = oauth_router(conns.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Daemon { store, conns, base }
}

/// Start a simulator (consent page shown unless auto-approving).
pub async fn sim() -> Arc<SimHandle> {
    Arc::new(Sim::start(SimConfig::default()).await.unwrap())
}

/// An HTTP client that does not follow redirects (like a browser we drive by hand).
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The `name=value` of the cookie a response sets (the session a sign-in
/// link or a switch of sign-in answers with).
pub fn session_cookie(r: &reqwest::Response) -> String {
    r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let start = tag.find(&key)? + key.len();
    let end = tag[start..].find('"')? + start;
    Some(unescape(&tag[start..end]))
}

/// `<input>` tags of an HTML page as (type, name, value).
pub fn inputs(html: &str) -> Vec<(String, String, String)> {
    html.split("<input")
        .skip(1)
        .filter_map(|rest| {
            let tag = &rest[..rest.find('>')?];
            Some((
                attr(tag, "type").unwrap_or_default(),
                attr(tag, "name")?,
                attr(tag, "value").unwrap_or_default(),
            ))
        })
        .collect()
}

fn location(r: &reqwest::Response) -> String {
    r.headers()
        .get("location")
        .unwrap_or_else(|| panic!("no Location in a {} answer", r.status()))
        .to_str()
        .unwrap()
        .to_string()
}

/// Drive the provider's authorize page: follow an auto-approval, or submit
/// the consent form approving `tenants` (None: every organisation offered).
/// Returns the redirect back to our callback (not yet followed).
pub async fn authorize(
    b: &reqwest::Client,
    sim: &SimHandle,
    url: &url::Url,
    tenants: Option<&[uuid::Uuid]>,
) -> String {
    let r = b.get(url.clone()).send().await.unwrap();
    if r.status().as_u16() == 302 {
        return location(&r);
    }
    assert_eq!(r.status().as_u16(), 200, "authorize page");
    let html = r.text().await.unwrap();
    let mut form: Vec<(String, String)> = Vec::new();
    for (ty, name, value) in inputs(&html) {
        if ty == "hidden" {
            form.push((name, value));
        } else if name == "tenant" {
            let pick = match tenants {
                None => true,
                Some(list) => list.iter().any(|t| t.to_string() == value),
            };
            if pick {
                form.push((name, value));
            }
        }
    }
    form.push(("action".into(), "allow".into()));
    let r = b
        .post(format!("{}/identity/connect/authorize", sim.base_url()))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 302, "consent submit");
    location(&r)
}

/// Follow the redirect to our callback; if it leads to the picker, pick
/// `pick` (an organisation id). Returns the final page's status and body.
pub async fn finish(
    b: &reqwest::Client,
    base: &str,
    callback: &str,
    pick: Option<&str>,
) -> (u16, String) {
    let r = b.get(callback).send().await.unwrap();
    if r.status().as_u16() != 303 {
        let s = r.status().as_u16();
        return (s, r.text().await.unwrap());
    }
    let loc = location(&r);
    let page = b.get(format!("{base}{loc}")).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200, "picker page");
    let html = page.text().await.unwrap();
    let ins = inputs(&html);
    let token = ins
        .iter()
        .find(|(_, n, _)| n == "pick")
        .map(|(_, _, v)| v.clone())
        .unwrap();
    let org = pick.map(String::from).unwrap_or_else(|| {
        ins.iter()
            .find(|(_, n, _)| n == "organisation")
            .unwrap()
            .2
            .clone()
    });
    let r = b
        .post(format!("{base}/oauth/pick"))
        .form(&[("pick", token.as_str()), ("organisation", org.as_str())])
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.text().await.unwrap())
}

/// A daemon configuration for tests: the database at `db_url`, any free
/// loopback port, the connectors `cargo xtask wasm` installed, and Xero's
/// three origins pointed at the simulator with its default app.
/// Mail settings for a daemon whose notices go to the SMTP sink listening
/// on `port` of loopback.
pub fn sink_mail(port: u16) -> ledgerport::daemon::MailSettings {
    ledgerport::daemon::MailSettings {
        smtp_host: "127.0.0.1".into(),
        smtp_port: port,
        starttls: false,
        from: "ledgerport <integrations@platform.example>".into(),
        username: None,
        password: None,
    }
}

pub fn daemon_config(
    db_url: String,
    sim: &SimHandle,
    key_file: &Path,
) -> ledgerport::daemon::Config {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let mut cfg: ledgerport::daemon::Config = toml::from_str("").unwrap();
    cfg.database = db_url;
    // Any free port, bound by the daemon itself (`Daemon::addr` tells
    // which): choosing one here and binding it later let another test take
    // it in between.
    cfg.listen = "127.0.0.1:0".into();
    cfg.plugin_dir = target.join("plugins");
    cfg.key_file = Some(key_file.to_path_buf());
    cfg.plugins.insert(
        "xero".into(),
        ledgerport::daemon::PluginSettings {
            base_urls: sim_overrides(sim),
            client_id: Some(xero_sim::DEFAULT_CLIENT_ID.into()),
            client_secret: Some(xero_sim::DEFAULT_CLIENT_SECRET.into()),
            broad_scopes: false,
        },
    );
    cfg
}
