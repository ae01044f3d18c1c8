//! Shared helpers for tests that run a real `ledgerport serve` process (kill
//! -9, SIGTERM, storage trouble): a config file on a SQLite database with
//! the Xero simulator behind it, a tenant `acme` connected to the
//! simulator's Trading organisation with its accounts mapped (set up once by
//! an in-process daemon on the same database), starting the process
//! (optionally through a wrapper such as `nsenter`), waiting until it is
//! ready, posting documents the way the platform does, and a graceful stop.
#![allow(dead_code)]

use ledgerport::capabilities::mapping::{AccountMapping, MappingScope};
use ledgerport::connections::Clock;
use ledgerport::daemon::{Config, Daemon};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use xero_sim::{DEFAULT_TENANT_TRADING, FaultConfig, FaultRule, Sim, SimConfig, SimHandle};

/// The service key the platform uses in these tests.
pub const KEY: &str = "serve-service-key";

/// A free loopback port for a daemon that is killed and started again on
/// it: below the kernel's ephemeral range, so no outgoing connection of a
/// parallel test takes it while the daemon is down.
pub fn free_port() -> u16 {
    smtp_sink::restartable_port().expect("a free loopback port")
}

/// A simulator with its limits out of the way, auto-approving the Trading
/// organisation, and some latency so kills land while requests are in
/// flight.
pub async fn sim() -> SimHandle {
    let mut sim_cfg = SimConfig::default();
    sim_cfg.limits.per_minute = 1_000_000;
    sim_cfg.limits.per_day = 1_000_000;
    sim_cfg.limits.app_per_minute = 1_000_000;
    let sim = Sim::start(sim_cfg).await.unwrap();
    sim.set_auto_approve(Some(vec![DEFAULT_TENANT_TRADING]));
    sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            route: Some("/api.xro".into()),
            latency_ms: 5,
            ..Default::default()
        }],
        ..Default::default()
    });
    sim
}

/// One daemon's files: its config (database at `db`), key file, port.
pub struct Serve {
    /// Holds the files.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// Where the daemon listens (`http://127.0.0.1:<port>`).
    pub base: String,
    /// The daemon's stderr (every start appends).
    pub log: PathBuf,
}

/// The mapping every test tenant gets.
pub const MAPPINGS: &[(&str, &str)] = &[
    ("gross-salary", "477"),
    ("employer-social-contributions", "478"),
    ("employee-benefits", "479"),
    ("allowances-and-bonuses", "477"),
    ("statutory-payments", "477"),
    ("management-fee", "429"),
    ("onboarding-fee", "429"),
    ("fx-fee", "404"),
    ("expense-reimbursement", "493"),
    ("security-deposit", "620"),
];

impl Serve {
    /// Write the config for a daemon on `<dir>/ledgerport.db` and set the
    /// tenant up there.
    pub async fn new(sim: &SimHandle) -> Self {
        Self::with_db(sim, None).await
    }

    /// Like [`Serve::new`], but the daemon's database is `<dir>/<sub>` (its
    /// directory is created, e.g. as a mount point) while the tenant is set
    /// up in `<dir>/setup.db`, for the test to put in place.
    pub async fn with_db(sim: &SimHandle, sub: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (db, setup_db) = match sub {
            Some(sub) => {
                let db = dir.path().join(sub);
                std::fs::create_dir_all(db.parent().unwrap()).unwrap();
                (db, dir.path().join("setup.db"))
            }
            None => (
                dir.path().join("ledgerport.db"),
                dir.path().join("ledgerport.db"),
            ),
        };
        let key_file = dir.path().join("secret.key");
        std::fs::write(&key_file, ledgerport::crypto::generate_key()).unwrap();
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let overrides = crate::storage_support::sim_overrides(sim);
        let plugin_dir = crate::common::target_dir().join("plugins");
        // Precompiled components: restarts take a moment, not a compile.
        let cache_dir = dir.path().join("cache");
        let toml_overrides: String = overrides
            .iter()
            .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
            .collect();
        let text = |db: &Path| {
            format!(
                "database = \"{}\"\nlisten = \"127.0.0.1:{port}\"\nplugin_dir = \"{}\"\ncache_dir = \"{}\"\nkey_file = \"{}\"\nservice_keys = [\"{KEY}\"]\n\n[dispatch]\nlease_secs = 3\nladder_secs = [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]\nenforce_rate = false\n\n[plugins.xero]\nclient_id = \"{}\"\nclient_secret = \"{}\"\n\n[plugins.xero.base_urls]\n{toml_overrides}",
                db.display(),
                plugin_dir.display(),
                cache_dir.display(),
                key_file.display(),
                xero_sim::DEFAULT_CLIENT_ID,
                xero_sim::DEFAULT_CLIENT_SECRET,
            )
        };
        let config = dir.path().join("ledgerport.toml");
        let setup_config = dir.path().join("setup.toml");
        std::fs::write(&config, text(&db)).unwrap();
        std::fs::write(&setup_config, text(&setup_db)).unwrap();
        setup_tenant(&setup_config).await;
        let log = dir.path().join("serve.log");
        Serve {
            dir,
            config,
            base,
            log,
        }
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Start `ledgerport serve` on this config.
    pub fn spawn(&self) -> Child {
        self.spawn_via(&[])
    }

    /// Start `ledgerport serve` through `wrapper` (e.g. `nsenter -t PID -m --`).
    pub fn spawn_via(&self, wrapper: &[&str]) -> Child {
        let bin = env!("CARGO_BIN_EXE_ledgerport");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("LEDGERPORT_LOG", "error")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .unwrap(),
            )
            .spawn()
            .expect("start ledgerport serve")
    }
}

/// Add tenant `acme`, connect it to the simulator's Trading organisation
/// through the real OAuth flow and map its accounts, with an in-process
/// daemon on the config's database; then stop that daemon.
async fn setup_tenant(config: &Path) {
    let cfg = Config::load(Some(config)).unwrap();
    let d = Daemon::start(cfg, Clock::system(), None).await.unwrap();
    d.store
        .upsert_tenant(
            "acme",
            "Acme",
            &["finance@acme.example".to_string()],
            chrono::Utc::now().timestamp(),
        )
        .await
        .unwrap();
    let url = d
        .connections
        .begin_connect("acme", "xero", "alice")
        .await
        .unwrap();
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c.get(url.as_str()).send().await.unwrap();
    let back = r.headers()["location"].to_str().unwrap().to_string();
    c.get(&back).send().await.unwrap();
    let scope = MappingScope {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
    };
    for (kind, code) in MAPPINGS {
        d.store
            .set_mapping(
                &scope,
                &AccountMapping {
                    kind: kind.to_string(),
                    account_code: code.to_string(),
                    tax_type: None,
                },
                "t",
                chrono::Utc::now().timestamp(),
            )
            .await
            .unwrap();
    }
    d.stop().await;
}

/// Wait until `/readyz` answers 200 (60 s at most). Panics with the
/// daemon's stderr if it exited instead.
pub async fn wait_ready(serve: &Serve, child: &mut Child) {
    let base = &serve.base;
    let started = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/readyz")).await
            && r.status().is_success()
        {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("serve exited with {status}: {}", serve.stderr());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "daemon did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// kill -9 and reap.
pub fn kill_9(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// SIGTERM: the daemon must exit cleanly by itself within 30 s.
pub async fn sigterm_and_wait(child: &mut Child) {
    let term = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let stopped = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "serve exited with {status} after SIGTERM");
            return;
        }
        // The daemon's grace is 20 s; what follows it (aborted tasks,
        // leases released) gets the rest on a loaded machine.
        assert!(
            stopped.elapsed() < Duration::from_secs(60),
            "serve did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sample invoice as document `n` of a run named `run`.
pub fn invoice(run: &str, n: usize) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/documents/invoice.json");
    let mut d: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    d["id"] = json!(format!("{run}-{n}"));
    d["number"] = json!(invoice_number(run, n));
    d
}

/// The number of [`invoice`] `n`.
pub fn invoice_number(run: &str, n: usize) -> String {
    format!("INV-{}-{n:05}", run.to_ascii_uppercase())
}

/// An HTTP client for the platform's side.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Post one document; the status and body, or None when the daemon could
/// not be reached.
pub async fn post(http: &reqwest::Client, base: &str, doc: &Value) -> Option<(u16, Value)> {
    let r = http
        .post(format!("{base}/v1/documents"))
        .bearer_auth(KEY)
        .json(doc)
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.unwrap_or(Value::Null)))
}

/// Post as the platform does: retry until the document is accepted (the
/// daemon may be down for a moment). Any refusal other than "unreachable"
/// fails the test.
pub async fn post_until_accepted(http: &reqwest::Client, base: &str, doc: &Value) {
    loop {
        match post(http, base, doc).await {
            Some((s, _)) if (200..300).contains(&s) => return,
            Some((s, body)) => panic!("refused: {s} {body}"),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// How many bills each invoice number has in the simulator's organisation.
pub fn bills_per_number(sim: &SimHandle) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for inv in sim.documents(DEFAULT_TENANT_TRADING).unwrap().invoices {
        if let Some(n) = inv["InvoiceNumber"].as_str() {
            *m.entry(n.to_string()).or_default() += 1;
        }
    }
    m
}

/// Wait until the simulator holds at least `n` bills (`limit` at most).
pub async fn wait_bills(sim: &SimHandle, n: usize, limit: Duration) {
    wait_for(sim, n, limit, "bills", |d| d.invoices.len()).await;
}

/// Wait until the Trading organisation holds `n` attachments (a bill's
/// PDF is attached after the bill is created, so a delivery killed between
/// the two is finished by the next claim of its lapsed lease).
pub async fn wait_attachments(sim: &SimHandle, n: usize, limit: Duration) {
    wait_for(sim, n, limit, "attachments", |d| d.attachments.len()).await;
}

async fn wait_for(
    sim: &SimHandle,
    n: usize,
    limit: Duration,
    what: &str,
    count: impl Fn(&xero_sim::TenantDocuments) -> usize,
) {
    let started = Instant::now();
    loop {
        let have = count(&sim.documents(DEFAULT_TENANT_TRADING).unwrap());
        if have >= n {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "only {have} of {n} {what} arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
