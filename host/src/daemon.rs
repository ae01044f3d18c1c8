//! The daemon: configuration (a TOML file plus `LEDGERPORT_*` environment
//! variables, with errors that name the key) and the wiring of store,
//! runtime, plugins, connections, dispatcher, notifier and HTTP server.

use crate::api::ApiState;
use crate::capabilities::http::{CredentialProvider, DEFAULT_IDLE_PER_HOST, ReqwestTransport};
use crate::capabilities::kv::KvStore;
use crate::capabilities::mapping::MappingStore;
use crate::connections::{Clock, Connections};
use crate::crypto::{KeyRing, Secret};
use crate::dispatch::{DispatchConfig, Dispatcher, now_ms};
use crate::notify::{MailConfig, Mailer};
use crate::oauth::{OAuthApp, OAuthProvider, Providers};
use crate::runtime::{Plugin, Runtime, RuntimeConfig};
use crate::store::Store;
use anyhow::Context;
use axum::Router;
use axum::routing::get;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often expired sign-in flows (OAuth states, organisation picks) are
/// removed.
const OAUTH_PURGE_EVERY: Duration = Duration::from_secs(600);

/// Per-plugin operator settings. `Debug` shows whether a client secret is
/// set, never the secret.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSettings {
    /// Canonical origin -> where requests really go (sandbox, simulator).
    #[serde(default)]
    pub base_urls: BTreeMap<String, String>,
    /// OAuth client id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// OAuth client secret (better: `LEDGERPORT_<ID>_CLIENT_SECRET`).
    #[serde(default)]
    pub client_secret: Option<String>,
    /// Use the manifest's broad scopes (older apps).
    #[serde(default)]
    pub broad_scopes: bool,
}

/// SMTP settings. `Debug` shows whether a password is set, never the
/// password.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailSettings {
    /// SMTP host.
    pub smtp_host: String,
    /// SMTP port.
    #[serde(default = "default_smtp_port")]
    pub smtp_port: u16,
    /// STARTTLS required.
    #[serde(default)]
    pub starttls: bool,
    /// From address.
    pub from: String,
    /// SMTP user.
    #[serde(default)]
    pub username: Option<String>,
    /// SMTP password (better: `LEDGERPORT_SMTP_PASSWORD`).
    #[serde(default)]
    pub password: Option<String>,
}

/// What `Debug` shows in place of a secret that is set.
fn redacted(v: &Option<String>) -> Option<&'static str> {
    v.as_ref().map(|_| "<redacted>")
}

impl std::fmt::Debug for PluginSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginSettings")
            .field("base_urls", &self.base_urls)
            .field("client_id", &self.client_id)
            .field("client_secret", &redacted(&self.client_secret))
            .field("broad_scopes", &self.broad_scopes)
            .finish()
    }
}

impl std::fmt::Debug for MailSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailSettings")
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("starttls", &self.starttls)
            .field("from", &self.from)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .finish()
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database", &crate::store::redact_url(&self.database))
            .field("listen", &self.listen)
            .field("public_url", &self.public_url)
            .field("plugin_dir", &self.plugin_dir)
            .field("cache_dir", &self.cache_dir)
            .field(
                "service_keys",
                &format!("{} key(s)", self.service_keys.len()),
            )
            .field("key_file", &self.key_file)
            .field("catalogue", &self.catalogue)
            .field("plugins", &self.plugins)
            .field("mail", &self.mail)
            .field("dispatch", &self.dispatch)
            .field("json_logs", &self.json_logs)
            .field("trusted_keys", &self.trusted_keys)
            .field("retention", &self.retention)
            .finish()
    }
}

fn default_smtp_port() -> u16 {
    25
}

/// Dispatcher settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DispatchSettings {
    /// Deliveries at once.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Retry ladder in seconds.
    #[serde(default)]
    pub ladder_secs: Option<Vec<u64>>,
    /// Incident coalescing window in seconds.
    #[serde(default)]
    pub coalesce_secs: Option<u64>,
    /// Lease in seconds.
    #[serde(default)]
    pub lease_secs: Option<u64>,
    /// Enforce provider request rates (default true).
    #[serde(default)]
    pub enforce_rate: Option<bool>,
    /// Deliveries alive beyond `concurrency` (default 64): one waiting for
    /// a provider rate slot lends its place to work that can run but keeps
    /// its plugin instance and memory.
    #[serde(default)]
    pub max_parked: Option<usize>,
}

impl DispatchSettings {
    /// Refuse values the dispatcher cannot work with, naming the key: a
    /// lease or retry step of centuries overflows the time it is added to,
    /// and a concurrency of millions the instance pool's size.
    pub fn check(&self) -> anyhow::Result<()> {
        const DAY: u64 = 86_400;
        let within = |key: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "dispatch.{key}: must be {lo} to {hi}, not {v}"
                ))
            }
        };
        if let Some(c) = self.concurrency {
            within("concurrency", c as u64, 0, 4_096)?;
        }
        if let Some(p) = self.max_parked {
            within("max_parked", p as u64, 0, 100_000)?;
        }
        if let Some(l) = self.lease_secs {
            within("lease_secs", l, 1, DAY)?;
        }
        if let Some(c) = self.coalesce_secs {
            within("coalesce_secs", c, 0, DAY)?;
        }
        if let Some(ladder) = &self.ladder_secs {
            if ladder.is_empty() || ladder.len() > 100 {
                anyhow::bail!(
                    "dispatch.ladder_secs: must list 1 to 100 steps, not {}",
                    ladder.len()
                );
            }
            for step in ladder {
                within("ladder_secs", *step, 0, 30 * DAY)?;
            }
        }
        Ok(())
    }
}

/// The daemon's configuration. `Debug` shows how many service keys there
/// are, never the keys (nor the plugins' and mail's secrets).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Database URL (`sqlite:PATH` or `postgres://...`).
    #[serde(default = "default_database")]
    pub database: String,
    /// Listen address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The URL people and providers reach the daemon at.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Installed plugins (each `<dir>/<id>/manifest.toml`).
    #[serde(default = "default_plugin_dir")]
    pub plugin_dir: PathBuf,
    /// Precompiled component cache.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Service keys accepted by the ingest API (better: `LEDGERPORT_SERVICE_KEY`).
    #[serde(default)]
    pub service_keys: Vec<String>,
    /// Key file for secrets at rest (else `LEDGERPORT_SECRET_KEY`).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The line-item catalogue file.
    #[serde(default)]
    pub catalogue: Option<PathBuf>,
    /// Per-plugin settings by plugin id.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginSettings>,
    /// SMTP.
    #[serde(default)]
    pub mail: Option<MailSettings>,
    /// Dispatcher.
    #[serde(default)]
    pub dispatch: DispatchSettings,
    /// Log as JSON.
    #[serde(default)]
    pub json_logs: bool,
    /// Ed25519 public keys (base64) of trusted plugin signers; when set,
    /// unsigned or otherwise signed plugins are refused.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// What is kept of delivered documents, and for how long.
    #[serde(default)]
    pub retention: RetentionSettings,
}

/// Retention of what delivered documents no longer need (see
/// [`Store::purge_delivered`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Drop the bodies (with their PDFs) of documents delivered everywhere,
    /// their attempts, sent mails and closed incidents this many days
    /// after they were received; checked hourly. Unset: kept for ever.
    #[serde(default)]
    pub delivered_days: Option<u32>,
}

/// How often the daemon applies `retention.delivered_days`.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

fn default_database() -> String {
    "sqlite:ledgerport.db".into()
}
fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_plugin_dir() -> PathBuf {
    PathBuf::from("target/plugins")
}

impl Config {
    /// Read a TOML file (optional) and apply `LEDGERPORT_*` overrides.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?,
            None => String::new(),
        };
        let mut cfg: Config = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "config {}: {e}",
                path.map(|p| p.display().to_string()).unwrap_or_default()
            )
        })?;
        cfg.dispatch.check().map_err(|e| {
            anyhow::anyhow!(
                "config {}: {e}",
                path.map(|p| p.display().to_string()).unwrap_or_default()
            )
        })?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.check().map_err(|e| {
            anyhow::anyhow!(
                "config {}: {e}",
                path.map(|p| p.display().to_string()).unwrap_or_default()
            )
        })?;
        Ok(cfg)
    }

    /// What the file and the environment give together, checked: the SMTP
    /// user and password come as a pair and never cross the network in
    /// clear text, the sender is an address, and the public URL is an
    /// absolute http(s) URL. Each refusal names its key.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(m) = &self.mail {
            match (&m.username, &m.password) {
                (Some(_), None) => anyhow::bail!(
                    "mail.password: mail.username is set but no password (give mail.password or LEDGERPORT_SMTP_PASSWORD)"
                ),
                (None, Some(_)) => anyhow::bail!(
                    "mail.username: a password is set (mail.password or LEDGERPORT_SMTP_PASSWORD) but no user"
                ),
                (Some(_), Some(_)) if !m.starttls && !is_loopback_host(&m.smtp_host) => {
                    anyhow::bail!(
                        "mail.starttls: the SMTP password would cross the network to {} in clear text; set starttls = true",
                        m.smtp_host
                    )
                }
                _ => {}
            }
            m.from.parse::<lettre::message::Mailbox>().map_err(|e| {
                anyhow::anyhow!("mail.from: {:?} is not an e-mail address: {e}", m.from)
            })?;
        }
        if self.retention.delivered_days == Some(0) {
            anyhow::bail!(
                "retention.delivered_days: must be at least 1 (leave it out to keep everything)"
            );
        }
        if let Some(u) = &self.public_url {
            let parsed = url::Url::parse(u).map_err(|e| {
                anyhow::anyhow!(
                    "public_url: {u:?} is not an absolute URL ({e}); write it as https://host[:port]"
                )
            })?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                anyhow::bail!("public_url: {u:?} must be an http or https URL with a host");
            }
        }
        Ok(())
    }

    /// Apply `LEDGERPORT_*` variables (read through `get`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        if let Some(v) = get("LEDGERPORT_DATABASE") {
            self.database = v;
        }
        if let Some(v) = get("LEDGERPORT_LISTEN") {
            // What the file's `listen` takes: an address or a host name,
            // with a port.
            check_listen(&v).map_err(|e| anyhow::anyhow!("LEDGERPORT_LISTEN={v:?}: {e}"))?;
            self.listen = v;
        }
        if let Some(v) = get("LEDGERPORT_PUBLIC_URL") {
            self.public_url = Some(v);
        }
        if let Some(v) = get("LEDGERPORT_PLUGIN_DIR") {
            self.plugin_dir = v.into();
        }
        if let Some(v) = get("LEDGERPORT_SERVICE_KEY") {
            self.service_keys.push(v);
        }
        if let Some(v) = get("LEDGERPORT_SMTP_PASSWORD")
            && let Some(m) = self.mail.as_mut()
        {
            m.password = Some(v);
        }
        let ids: Vec<String> = self.plugins.keys().cloned().collect();
        for id in ids {
            let up = id.to_ascii_uppercase().replace('-', "_");
            if let Some(v) = get(&format!("LEDGERPORT_{up}_CLIENT_ID")) {
                self.plugins.entry(id.clone()).or_default().client_id = Some(v);
            }
            if let Some(v) = get(&format!("LEDGERPORT_{up}_CLIENT_SECRET")) {
                self.plugins.entry(id.clone()).or_default().client_secret = Some(v);
            }
        }
        // The signers whose plugins load, comma-separated, as the CLI's
        // `--trusted-key` reads them; a blank value leaves the file's list.
        if let Some(v) = get("LEDGERPORT_TRUSTED_KEYS")
            && !v.trim().is_empty()
        {
            self.trusted_keys = v.split(',').map(|k| k.trim().to_string()).collect();
        }
        if let Some(v) = get("LEDGERPORT_JSON_LOGS") {
            self.json_logs = matches!(v.as_str(), "1" | "true" | "yes");
        }
        Ok(())
    }

    /// The public URL of a daemon listening on `bound`. Defaults to
    /// `http://<listen>` as written (a host name stays a host name: an
    /// OAuth redirect must match the registered one exactly), with the
    /// port the system chose when `listen` asks for port 0.
    pub fn public_url(&self, bound: SocketAddr) -> String {
        let raw = self
            .public_url
            .clone()
            .unwrap_or_else(|| match self.listen.rsplit_once(':') {
                Some((host, "0")) => format!("http://{host}:{}", bound.port()),
                _ => format!("http://{}", self.listen),
            });
        // As parsed (`validate` has checked it parses): a scheme or host in
        // capitals, or a space around the address, would otherwise reach
        // the OAuth redirect address (which the provider compares with the
        // registered one) and the links in notices as written.
        url::Url::parse(&raw)
            .map(|u| u.to_string())
            .unwrap_or(raw)
            .trim_end_matches('/')
            .to_string()
    }
}

/// Deliveries by state as last counted for `/metrics`, and when.
type QueueDepths = tokio::sync::Mutex<Option<(std::time::Instant, Vec<(String, i64)>)>>;

/// How long `/metrics` answers with the queue depths it counted last.
pub const QUEUE_DEPTHS_TTL: Duration = Duration::from_secs(5);

/// The deliveries by state for `/metrics`: counted at most once every
/// [`QUEUE_DEPTHS_TTL`], by one request at a time (the others wait for its
/// count). A count reads an index of every delivery ever made, and
/// `/metrics` needs no key: requests in a loop would otherwise keep the
/// database busy counting while the dispatcher waits. `None` when the
/// database did not answer (not kept: the next request asks again).
async fn queue_depths(store: &Store, counted: &QueueDepths) -> Option<Vec<(String, i64)>> {
    let mut last = counted.lock().await;
    if let Some((at, q)) = last.as_ref()
        && at.elapsed() < QUEUE_DEPTHS_TTL
    {
        return Some(q.clone());
    }
    match store.delivery_counts(None).await {
        Ok(q) => {
            *last = Some((std::time::Instant::now(), q.clone()));
            Some(q)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: the database did not answer");
            None
        }
    }
}

/// A `listen` value: `host:port` (an IP address, `[v6]`, or a host name)
/// with a port number.
fn check_listen(v: &str) -> Result<(), String> {
    if v.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match v.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok() =>
        {
            Ok(())
        }
        _ => Err("not host:port (e.g. 127.0.0.1:8080 or localhost:8080)".into()),
    }
}

/// The address in a `listen` value is every interface (`0.0.0.0`, `[::]`):
/// no browser or provider can be sent there.
fn listens_on_every_interface(listen: &str) -> bool {
    listen
        .parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified())
}

/// `localhost` or a loopback address: a server on this machine.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A running daemon.
pub struct Daemon {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The store.
    pub store: Store,
    /// The connections service.
    pub connections: Arc<Connections>,
    /// The dispatcher.
    pub dispatcher: Arc<Dispatcher>,
    /// The runtime.
    pub runtime: Arc<Runtime>,
    /// The API state (ingest from Rust, e.g. the demo).
    pub api: Arc<ApiState>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Daemon {
    /// Bind `listen`, open the store, load plugins, and start serving.
    /// `clock` drives OAuth and token lifetimes (the system clock outside
    /// tests). The port is bound first, so it accepts connections while
    /// connectors compile; `/readyz` says when the daemon is ready.
    pub async fn start(
        cfg: Config,
        clock: Clock,
        dispatch: Option<DispatchConfig>,
    ) -> anyhow::Result<Self> {
        // Bound first: a port in use fails at once, not after the
        // connectors have compiled, and `listen` on port 0 (any free port)
        // gets its real address into the public URL.
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("listening on {} (key `listen`)", cfg.listen))?;
        let addr = listener.local_addr()?;
        let store = Store::open_and_migrate(&cfg.database)
            .await
            .with_context(|| "opening the database (key `database`)")?;
        let keys = Arc::new(KeyRing::load(cfg.key_file.as_deref()).map_err(|e| {
            anyhow::anyhow!("secret key (key `key_file` or LEDGERPORT_SECRET_KEY): {e}")
        })?);
        let mut dcfg = dispatch.unwrap_or_default();
        if let Some(c) = cfg.dispatch.concurrency {
            dcfg.concurrency = c.max(1);
        }
        if let Some(l) = &cfg.dispatch.ladder_secs {
            dcfg.ladder = l.iter().map(|s| Duration::from_secs(*s)).collect();
        }
        if let Some(c) = cfg.dispatch.coalesce_secs {
            dcfg.coalesce = Duration::from_secs(c);
        }
        if let Some(l) = cfg.dispatch.lease_secs {
            dcfg.lease = Duration::from_secs(l.max(3));
        }
        if let Some(e) = cfg.dispatch.enforce_rate {
            dcfg.enforce_rate = e;
        }
        if let Some(p) = cfg.dispatch.max_parked {
            dcfg.max_parked = p;
        }
        if let Some(skew) = store
            .clock_skew_ms(crate::dispatch::now_ms())
            .await
            .with_context(|| "reading the database's clock")?
        {
            crate::store::check_clock_skew(skew, dcfg.lease).map_err(|e| anyhow::anyhow!(e))?;
        }
        let runtime_defaults = RuntimeConfig::default();
        let runtime = Arc::new(Runtime::new(
            RuntimeConfig {
                cache_dir: cfg.cache_dir.clone(),
                trusted_keys: cfg.trusted_keys.clone(),
                // Every delivery alive at once (running or waiting for a
                // rate slot) holds an instance; admin calls need a few more.
                max_concurrent_instances: runtime_defaults.max_concurrent_instances.max(
                    u32::try_from(dcfg.concurrency + dcfg.max_parked + 32).unwrap_or(u32::MAX),
                ),
                ..runtime_defaults
            },
            Arc::new(ReqwestTransport::with_idle_per_host(
                dcfg.concurrency
                    .saturating_mul(2)
                    .max(DEFAULT_IDLE_PER_HOST),
            )?),
        )?);
        let public = cfg.public_url(addr);
        if cfg.public_url.is_none() && listens_on_every_interface(&cfg.listen) {
            tracing::warn!(listen = %cfg.listen, public_url = %public,
                "public_url is not set and listen is every interface: OAuth redirects and the links in notices point at {public}, which no browser can reach; set public_url");
        }
        let mut providers = Providers::new();
        let mut plugins: BTreeMap<String, Arc<Plugin>> = BTreeMap::new();
        let mut loaded_from: BTreeMap<String, PathBuf> = BTreeMap::new();
        let dir = std::fs::read_dir(&cfg.plugin_dir)
            .with_context(|| format!("reading plugin_dir {}", cfg.plugin_dir.display()))?;
        let mut entries: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let manifest = path.join("manifest.toml");
            if !manifest.exists() {
                continue;
            }
            let folder = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let parsed = crate::manifest::Manifest::from_file(&manifest)
                .map_err(|e| anyhow::anyhow!("plugin {}: {e}", manifest.display()))?;
            // `[plugins.<id>]` by the manifest's id: a connector copied by
            // hand into a folder named otherwise (`xero-2.1/`) keeps its
            // settings (its simulator or sandbox base URLs above all:
            // without them its requests would go to the real provider).
            // A table named after the folder is still read.
            let id = parsed.id.clone();
            let settings = cfg
                .plugins
                .get(&id)
                .or_else(|| cfg.plugins.get(&folder))
                .cloned()
                .unwrap_or_default();
            // Two folders with one id (a backup copy, say): which one ran
            // would depend on the directory's order.
            if let Some(first) = loaded_from.insert(parsed.id.clone(), path.clone()) {
                anyhow::bail!(
                    "plugin id {:?} is installed twice in plugin_dir: {} and {}; remove one",
                    parsed.id,
                    first.display(),
                    path.display()
                );
            }
            // The runtime takes the overrides of the hosts the connector may
            // call; OAuth takes all of them (login, identity, ...). Any
            // other origin is a mistake (a typo would leave requests going
            // to the real provider), refused naming the key.
            let origins = |urls: &[&String]| {
                urls.iter()
                    .filter_map(|u| url::Url::parse(u).ok())
                    .filter_map(|u| crate::manifest::origin_of(&u))
                    .collect::<Vec<_>>()
            };
            let allowed = origins(&parsed.allowed_hosts.iter().collect::<Vec<_>>());
            let oauth_origins = parsed
                .oauth
                .as_ref()
                .map(|o| {
                    let mut urls = vec![&o.authorize_url, &o.token_url];
                    urls.extend(o.revoke_url.iter());
                    urls.extend(o.connections_url.iter());
                    origins(&urls)
                })
                .unwrap_or_default();
            for from in settings.base_urls.keys() {
                let known = crate::manifest::parse_origin(from)
                    .is_ok_and(|o| allowed.contains(&o) || oauth_origins.contains(&o));
                if !known {
                    anyhow::bail!(
                        "plugins.{id}.base_urls: {from:?} is neither a host the connector may call ({}) nor one of its OAuth endpoints",
                        parsed.allowed_hosts.join(", ")
                    );
                }
            }
            let runtime_overrides: BTreeMap<String, String> = settings
                .base_urls
                .iter()
                .filter(|(k, _)| {
                    crate::manifest::parse_origin(k).is_ok_and(|o| allowed.contains(&o))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let plugin = runtime
                .load(&manifest, &runtime_overrides)
                .map_err(|e| anyhow::anyhow!("plugin {}: {e}", manifest.display()))?;
            if let Some(_oauth) = &plugin.manifest().oauth {
                if let Some(client_id) = settings.client_id.clone() {
                    let app = OAuthApp {
                        client_id,
                        client_secret: settings.client_secret.clone().map(Secret::new),
                        redirect_uri: format!("{public}/oauth/callback"),
                        broad_scopes: settings.broad_scopes,
                        base_urls: settings.base_urls.clone(),
                        timeout: crate::oauth::TOKEN_REQUEST_TIMEOUT,
                    };
                    providers.insert(
                        OAuthProvider::new(plugin.manifest(), app)
                            .map_err(|e| anyhow::anyhow!("plugin {id}: {e}"))?,
                    );
                } else {
                    tracing::warn!(plugin = %id, "no client_id configured: admins cannot connect this provider (set plugins.{id}.client_id)");
                }
            }
            tracing::info!(plugin = %id, from_cache = plugin.from_cache(), "plugin loaded");
            plugins.insert(plugin.manifest().id.clone(), Arc::new(plugin));
        }
        for id in cfg.plugins.keys() {
            let installed = loaded_from.contains_key(id)
                || loaded_from.values().any(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy() == id.as_str())
                });
            if !installed {
                tracing::warn!(plugin = %id, plugin_dir = %cfg.plugin_dir.display(),
                    "[plugins.{id}] is configured but no such connector is installed; its settings are not used");
            }
        }
        let kinds: BTreeMap<String, Vec<String>> = plugins
            .iter()
            .map(|(id, p)| (id.clone(), p.manifest().document_kinds.clone()))
            .collect();
        if plugins.is_empty() {
            tracing::warn!(plugin_dir = %cfg.plugin_dir.display(),
                "no connector in plugin_dir (each is a directory holding manifest.toml and its .wasm): nothing can be connected or delivered");
        }
        let mut connections = Connections::new(store.clone(), keys, Arc::new(providers), clock)
            .with_rate(dcfg.enforce_rate, dcfg.rate_override);
        if let Some(cat) = &cfg.catalogue {
            connections = connections.with_catalogue(
                crate::connections::Catalogue::from_file(cat)
                    .map_err(|e| anyhow::anyhow!("catalogue {}: {e}", cat.display()))?,
            );
        }
        let connections = Arc::new(connections);
        for p in plugins.values() {
            connections.register_plugin(runtime.clone(), p.clone());
        }
        let tokens = connections.tokens();
        let notice_connectors =
            crate::notify::NoticeConnector::of(plugins.values().map(|p| p.manifest()));
        let dispatcher = Dispatcher::new(
            store.clone(),
            runtime.clone(),
            plugins,
            tokens as Arc<dyn CredentialProvider>,
            Arc::new(store.clone()) as Arc<dyn MappingStore>,
            Arc::new(store.clone()) as Arc<dyn KvStore>,
            connections.keys(),
            dcfg,
        );
        let d2 = dispatcher.clone();
        let api = Arc::new(ApiState {
            store: store.clone(),
            service_key_hashes: cfg
                .service_keys
                .iter()
                .map(|k| crate::crypto::sha256_hex(k))
                .collect(),
            catalogue: connections.catalogue().map(|c| c.keys()),
            on_ingest: Box::new(move || d2.wake()),
            kinds,
        });
        // The mailer is built before any work starts: a bad `mail.from`
        // stopped the start after the dispatcher had claimed deliveries,
        // which then stayed "working" until their leases ran out.
        let mail = match &cfg.mail {
            Some(m) => {
                let mail_cfg = MailConfig {
                    smtp_host: m.smtp_host.clone(),
                    smtp_port: m.smtp_port,
                    starttls: m.starttls,
                    credentials: m.username.clone().zip(m.password.clone()),
                    from: m.from.clone(),
                    integrations_url: public.clone(),
                    connectors: notice_connectors,
                };
                let mailer = Mailer::new(&mail_cfg)?;
                Some((mail_cfg, mailer))
            }
            None => None,
        };
        let (tx, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        // Dispatcher.
        tasks.push(tokio::spawn(
            dispatcher.clone().run(rx.clone(), Duration::from_secs(20)),
        ));
        // Notifier.
        if let Some((mail_cfg, mailer)) = mail {
            let store2 = store.clone();
            let mut rx2 = rx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    if let Err(e) = crate::notify::pump(&store2, &mailer, &mail_cfg, now_ms()).await
                    {
                        tracing::error!(error = %e, "notifier failed; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = rx2.changed() => break,
                    }
                }
            }));
        }
        // Housekeeping: sign-in flows that were never finished keep their
        // PKCE verifier (states) or the grant's tokens (an organisation
        // pick nobody made) only until they expire, not for ever.
        {
            let store4 = store.clone();
            let conns4 = connections.clone();
            let mut rx4 = rx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    // Abandoned picks first: their grants' links are removed
                    // at the provider before the purge forgets them.
                    while !rx4.has_changed().unwrap_or(true)
                        && conns4.clean_abandoned_picks().await == 50
                    {}
                    let now = chrono::Utc::now().timestamp();
                    match store4.purge_oauth(now).await {
                        Ok(n) if n > 0 => {
                            tracing::info!(removed = n, "expired sign-in flows removed")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "removing expired sign-in flows failed")
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(OAUTH_PURGE_EVERY) => {}
                        _ = rx4.changed() => break,
                    }
                }
            }));
        }
        // Retention: what delivered documents no longer need, hourly.
        if let Some(days) = cfg.retention.delivered_days {
            let store5 = store.clone();
            let mut rx5 = rx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let before = now_ms() - i64::from(days) * 86_400_000;
                    match store5.purge_delivered(before).await {
                        Ok(r) if r != Default::default() => {
                            tracing::info!(
                                bodies = r.bodies,
                                attempts = r.attempts,
                                mails = r.mails,
                                incidents = r.incidents,
                                days,
                                "retention: delivered documents' data removed"
                            )
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "retention: removing old data failed"),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(RETENTION_EVERY) => {}
                        _ = rx5.changed() => break,
                    }
                }
            }));
        }
        // HTTP (the listener was bound at the start).
        let store3 = store.clone();
        let admin_state = Arc::new(crate::admin::AdminState {
            store: store.clone(),
            connections: connections.clone(),
            public_url: public.clone(),
            on_retry: {
                let d = dispatcher.clone();
                Box::new(move || d.wake())
            },
        });
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get({
                    let s = store.clone();
                    move || async move {
                        // One round trip, not a count over every delivery
                        // ever made (probes run every few seconds).
                        match s.ping().await {
                            Ok(()) => (axum::http::StatusCode::OK, "ready"),
                            Err(_) => (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                "database unavailable",
                            ),
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                get({
                    let tokens = connections.tokens();
                    let counted = Arc::new(tokio::sync::Mutex::new(None));
                    move || {
                        let s = store3.clone();
                        let tokens = tokens.clone();
                        let counted = counted.clone();
                        async move {
                            let q = queue_depths(&s, &counted).await;
                            let refreshes = tokens
                                .stats()
                                .refreshes
                                .load(std::sync::atomic::Ordering::Relaxed);
                            crate::metrics::render(q.as_deref(), refreshes)
                        }
                    }
                }),
            )
            .merge(crate::api::router(api.clone()))
            .merge(crate::admin::router(admin_state.clone()))
            .merge(crate::integrations::router(admin_state))
            .merge(crate::oauth::oauth_router(connections.clone()));
        let mut rx3 = rx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx3.changed().await;
                })
                .await;
        }));
        Ok(Self {
            addr,
            store,
            connections,
            dispatcher,
            runtime,
            api,
            shutdown: tx,
            tasks,
        })
    }

    /// Stop: no new claims, in-flight work finishes or is released.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.store.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_key() {
        let e = toml::from_str::<Config>("databse = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("databse"), "{e}");
        let e = toml::from_str::<Config>("[mail]\nsmtp_host = 1\nfrom = \"a@b.c\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("smtp_host"), "{e}");
        let mut c: Config = toml::from_str("").unwrap();
        let env = |k: &str| match k {
            "LEDGERPORT_LISTEN" => Some("not an address".to_string()),
            _ => None,
        };
        let e = c.apply_env(env).unwrap_err().to_string();
        assert!(e.contains("LEDGERPORT_LISTEN"), "{e}");
        // A host name, as the file takes it.
        c.apply_env(|k| (k == "LEDGERPORT_LISTEN").then(|| "localhost:8080".to_string()))
            .unwrap();
        assert_eq!(c.listen, "localhost:8080");
        for bad in ["localhost", ":8080", "host:port", "a b:80"] {
            assert!(check_listen(bad).is_err(), "{bad}");
        }
        assert!(listens_on_every_interface("0.0.0.0:8080"));
        assert!(listens_on_every_interface("[::]:8080"));
        assert!(!listens_on_every_interface("127.0.0.1:8080"));
        assert!(!listens_on_every_interface("localhost:8080"));
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let c: Config = toml::from_str(
            "database = \"postgres://lp:dbpw-1@db/lp\"\nservice_keys = [\"svc-key-1\"]\n[plugins.xero]\nclient_id = \"id\"\nclient_secret = \"cs-1\"\n[mail]\nsmtp_host = \"h\"\nfrom = \"a@b.example\"\nusername = \"u\"\npassword = \"pw-1\"",
        )
        .unwrap();
        let d = format!("{c:?}");
        for secret in ["dbpw-1", "svc-key-1", "cs-1", "pw-1"] {
            assert!(!d.contains(secret), "{secret} in {d}");
        }
        assert!(d.contains("<redacted>") && d.contains("1 key(s)"), "{d}");
    }

    #[test]
    fn mail_credentials_and_the_public_url_are_checked_by_name() {
        let check = |text: &str| {
            toml::from_str::<Config>(text)
                .unwrap()
                .check()
                .err()
                .map(|e| e.to_string())
        };
        let mail = |rest: &str| {
            format!("[mail]\nsmtp_host = \"smtp.example.com\"\nfrom = \"lp@example.com\"\n{rest}")
        };
        assert_eq!(check(&mail("")), None);
        let e = check(&mail("username = \"lp\"")).unwrap();
        assert!(e.starts_with("mail.password:"), "{e}");
        let e = check(&mail("password = \"pw\"")).unwrap();
        assert!(e.starts_with("mail.username:"), "{e}");
        let e = check(&mail("username = \"lp\"\npassword = \"pw\"")).unwrap();
        assert!(e.starts_with("mail.starttls:") && !e.contains("pw"), "{e}");
        assert_eq!(
            check(&mail(
                "username = \"lp\"\npassword = \"pw\"\nstarttls = true"
            )),
            None
        );
        // A server on this machine may take a password without TLS.
        assert_eq!(
            check(
                "[mail]\nsmtp_host = \"127.0.0.1\"\nfrom = \"a@b.example\"\nusername = \"u\"\npassword = \"p\""
            ),
            None
        );
        let e = check("[mail]\nsmtp_host = \"h\"\nfrom = \"not an address\"").unwrap();
        assert!(e.starts_with("mail.from:"), "{e}");
        for bad in ["lp.example.com", "ftp://lp.example.com", "https://"] {
            let e = check(&format!("public_url = \"{bad}\"")).unwrap();
            assert!(e.starts_with("public_url:"), "{bad}: {e}");
        }
        assert_eq!(check("public_url = \"https://lp.example.com/\""), None);
        let e = check("[retention]\ndelivered_days = 0").unwrap();
        assert!(e.starts_with("retention.delivered_days:"), "{e}");
        assert_eq!(check("[retention]\ndelivered_days = 90"), None);
        // The password from the environment completes the pair.
        let mut c: Config = toml::from_str(&mail("username = \"lp\"\nstarttls = true")).unwrap();
        c.apply_env(|k| (k == "LEDGERPORT_SMTP_PASSWORD").then(|| "pw".to_string()))
            .unwrap();
        assert!(c.check().is_ok());
        assert!(
            is_loopback_host("localhost")
                && is_loopback_host("::1")
                && !is_loopback_host("10.0.0.1")
        );
    }

    #[test]
    fn dispatch_values_that_would_overflow_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (text, key) in [
            (
                "ladder_secs = [9223372036854775807]",
                "dispatch.ladder_secs",
            ),
            ("ladder_secs = []", "dispatch.ladder_secs"),
            ("lease_secs = 9223372036854775", "dispatch.lease_secs"),
            ("lease_secs = 0", "dispatch.lease_secs"),
            ("coalesce_secs = 9223372036854775", "dispatch.coalesce_secs"),
            ("concurrency = 67108864", "dispatch.concurrency"),
            ("max_parked = 9223372036854775807", "dispatch.max_parked"),
        ] {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, format!("[dispatch]\n{text}\n")).unwrap();
            let e = Config::load(Some(&path)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{key}: must be")) || e.contains(&format!("{key}: must list")),
                "{text}: {e}"
            );
        }
        // The defaults and ordinary values pass.
        let path = dir.path().join("ok.toml");
        std::fs::write(
            &path,
            "[dispatch]\nladder_secs = [0, 5, 300]\nlease_secs = 90\nconcurrency = 16\n",
        )
        .unwrap();
        assert!(Config::load(Some(&path)).is_ok());
    }

    #[test]
    fn env_overrides_the_file() {
        let mut c: Config =
            toml::from_str("database = \"sqlite:a.db\"\n[plugins.xero]\nclient_id = \"file\"")
                .unwrap();
        c.apply_env(|k| match k {
            "LEDGERPORT_DATABASE" => Some("postgres://db/x".into()),
            "LEDGERPORT_XERO_CLIENT_SECRET" => Some("s3cret".into()),
            "LEDGERPORT_SERVICE_KEY" => Some("k".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.database, "postgres://db/x");
        assert_eq!(c.plugins["xero"].client_secret.as_deref(), Some("s3cret"));
        assert_eq!(c.plugins["xero"].client_id.as_deref(), Some("file"));
        assert_eq!(c.service_keys, vec!["k"]);
        assert!(c.trusted_keys.is_empty());
        c.apply_env(|k| (k == "LEDGERPORT_TRUSTED_KEYS").then(|| " a, b ".to_string()))
            .unwrap();
        assert_eq!(
            c.trusted_keys,
            vec!["a", "b"],
            "the signers from the environment"
        );
        c.apply_env(|k| (k == "LEDGERPORT_TRUSTED_KEYS").then(|| " ".to_string()))
            .unwrap();
        assert_eq!(
            c.trusted_keys,
            vec!["a", "b"],
            "a blank value changes nothing"
        );
        let bound = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(c.public_url(bound), "http://127.0.0.1:8080");
        // A host name is kept as written; port 0 becomes the bound port.
        c.listen = "localhost:8080".into();
        assert_eq!(c.public_url(bound), "http://localhost:8080");
        c.listen = "localhost:0".into();
        let chosen = "127.0.0.1:41234".parse().unwrap();
        assert_eq!(c.public_url(chosen), "http://localhost:41234");
        c.listen = "[::1]:0".into();
        let chosen = "[::1]:41234".parse().unwrap();
        assert_eq!(c.public_url(chosen), "http://[::1]:41234");
        c.public_url = Some("https://lp.example.com/".into());
        assert_eq!(c.public_url(bound), "https://lp.example.com");
        c.public_url = Some(" HTTPS://LP.example.com/ ".into());
        assert_eq!(c.public_url(bound), "https://lp.example.com");
        c.public_url = Some("https://lp.example.com/ledgerport/".into());
        assert_eq!(c.public_url(bound), "https://lp.example.com/ledgerport");
    }
}
