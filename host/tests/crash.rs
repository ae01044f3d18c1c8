//! kill -9 of a real `ledgerport serve` process in the middle of a run,
//! restarted each time: every document reaches Xero exactly once (the
//! simulator's counters), nothing is lost.

mod common;
#[allow(dead_code)]
mod storage_support;

use ledgerport::capabilities::mapping::{AccountMapping, MappingScope};
use ledgerport::connections::Clock;
use ledgerport::daemon::{Config, Daemon};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use xero_sim::{DEFAULT_TENANT_TRADING, FaultConfig, FaultRule, Sim, SimConfig};

const KEY: &str = "crash-service-key";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ledgerport"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("LEDGERPORT_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ledgerport serve")
}

async fn wait_ready(base: &str) {
    let started = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/readyz")).await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "daemon did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn invoice(n: usize) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/documents/invoice.json");
    let mut d: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    d["id"] = json!(format!("crash-{n}"));
    d["number"] = json!(format!("INV-CRASH-{n:05}"));
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_loses_nothing_and_sends_nothing_twice() {
    let docs: usize = std::env::var("CRASH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let kills: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut sim_cfg = SimConfig::default();
    sim_cfg.limits.per_minute = 1_000_000;
    sim_cfg.limits.per_day = 1_000_000;
    sim_cfg.limits.app_per_minute = 1_000_000;
    let sim = Sim::start(sim_cfg).await.unwrap();
    sim.set_auto_approve(Some(vec![DEFAULT_TENANT_TRADING]));
    // Some latency, so kills land while requests are in flight.
    sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            route: Some("/api.xro".into()),
            latency_ms: 5,
            ..Default::default()
        }],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledgerport.db");
    let key_file = dir.path().join("secret.key");
    std::fs::write(&key_file, ledgerport::crypto::generate_key()).unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let overrides = storage_support::sim_overrides(&sim);
    let plugin_dir = common::target_dir().join("plugins");
    let toml_overrides: String = overrides
        .iter()
        .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
        .collect();
    let config_text = format!(
        "database = \"{}\"\nlisten = \"127.0.0.1:{port}\"\nplugin_dir = \"{}\"\nkey_file = \"{}\"\nservice_keys = [\"{KEY}\"]\n\n[dispatch]\nlease_secs = 3\nladder_secs = [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]\nenforce_rate = false\n\n[plugins.xero]\nclient_id = \"{}\"\nclient_secret = \"{}\"\n\n[plugins.xero.base_urls]\n{toml_overrides}",
        db.display(),
        plugin_dir.display(),
        key_file.display(),
        xero_sim::DEFAULT_CLIENT_ID,
        xero_sim::DEFAULT_CLIENT_SECRET,
    );
    let config_path = dir.path().join("ledgerport.toml");
    std::fs::write(&config_path, &config_text).unwrap();

    // Set up the tenant, its Xero connection and mappings with an
    // in-process daemon on the same database, then stop it.
    {
        let cfg = Config::load(Some(&config_path)).unwrap();
        let d = Daemon::start(cfg, Clock::system(), None).await.unwrap();
        d.store
            .upsert_tenant("acme", "Acme", &[], chrono::Utc::now().timestamp())
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
        for (kind, code) in [
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
        ] {
            d.store
                .set_mapping(
                    &scope,
                    &AccountMapping {
                        kind: kind.into(),
                        account_code: code.into(),
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

    let mut child = spawn(&config_path);
    wait_ready(&base).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let kill_every = docs / (kills + 1);
    let mut killed = 0;
    for n in 0..docs {
        // The platform retries until the document is accepted.
        loop {
            match http
                .post(format!("{base}/v1/documents"))
                .bearer_auth(KEY)
                .json(&invoice(n))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => panic!(
                    "refused: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        if killed < kills && n > 0 && n % kill_every == 0 {
            // Let work get under way, then kill -9 mid-flight and restart.
            tokio::time::sleep(Duration::from_millis(50 + (n as u64 * 37) % 200)).await;
            child.kill().unwrap();
            child.wait().unwrap();
            killed += 1;
            child = spawn(&config_path);
            wait_ready(&base).await;
        }
    }
    assert_eq!(killed, kills);
    // Wait for everything to arrive (leases of killed workers expire in 3 s).
    let started = Instant::now();
    loop {
        let n = sim
            .documents(DEFAULT_TENANT_TRADING)
            .unwrap()
            .invoices
            .len();
        if n >= docs {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "only {n} of {docs} bills arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A graceful stop: SIGTERM, and the daemon exits cleanly by itself.
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
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "serve did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let docs_in_xero = sim.documents(DEFAULT_TENANT_TRADING).unwrap();
    assert_eq!(
        docs_in_xero.invoices.len(),
        docs,
        "nothing lost, nothing twice"
    );
    assert_eq!(sim.counters().duplicates, 0);
    // One PDF per bill too.
    assert_eq!(docs_in_xero.attachments.len(), docs);
}
