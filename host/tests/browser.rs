//! The Integrations page in real headless Chromium (Debian's `chromium`,
//! driven by `playwright-core` from npm; `tests/browser/integrations.mjs`):
//! connect -> pick organisation -> map -> issue a document -> see it
//! delivered -> disconnect, against the Xero simulator, then the JSON
//! webhook (no OAuth) connected from its own card. Screenshots land in
//! `target/screenshots/`. `cargo xtask test` installs Chromium and the npm
//! package when they are missing; run alone without them, the test says so
//! and is skipped (under CI=true it fails instead).

mod common;
#[allow(dead_code)]
mod storage_support;

use ledgerport::connections::Clock;
use ledgerport::daemon::Daemon;
use ledgerport::store::admin::KeyScope;
use std::path::Path;
use storage_support::TestDb;
use xero_sim::{DEFAULT_TENANT_TRADING, Sim, SimConfig};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrations_page_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("tests/browser/integrations.mjs");
    let have_node_modules = root
        .join("tests/browser/node_modules/playwright-core")
        .exists();
    let have_chromium = Path::new("/usr/bin/chromium").exists();
    if !(have_node_modules && have_chromium) {
        let why = format!(
            "chromium present: {have_chromium}, playwright-core installed: {have_node_modules} (cargo xtask test installs both)"
        );
        assert!(!in_ci(), "browser test cannot run: {why}");
        eprintln!("\n!!!!! SKIPPING the browser test: {why} !!!!!\n");
        return;
    }
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k");
    std::fs::write(&key_file, ledgerport::crypto::generate_key()).unwrap();
    let mut cfg = storage_support::daemon_config(db.url(), &sim, &key_file);
    cfg.catalogue = Some(root.join("examples/catalogue.toml"));
    cfg.service_keys = vec!["browser-service-key".into()];
    let d = Daemon::start(cfg, Clock::system(), None).await.unwrap();
    let base = format!("http://{}", d.addr);
    d.store
        .upsert_tenant("acme", "Acme Trading GmbH", &[], 0)
        .await
        .unwrap();
    let (_, key) = d
        .store
        .issue_key(&KeyScope::Tenant("acme".into()), "integrations page", 0)
        .await
        .unwrap();
    // As the platform does: ask for a one-time sign-in link, server to
    // server, with the tenant's key (the browser never sees the key).
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/admin/tenants/acme/page-sessions"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"admin": "alice@acme.example", "role": "super-admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    let login = format!("{base}{}", v["login"].as_str().unwrap());
    let mappings = serde_json::json!({
        "gross-salary": "477", "employer-social-contributions": "478", "employee-benefits": "479",
        "allowances-and-bonuses": "477", "statutory-payments": "477", "management-fee": "429",
        "onboarding-fee": "429", "fx-fee": "404", "expense-reimbursement": "493", "security-deposit": "620",
    });
    let shots = common::target_dir().join("screenshots");
    // The checks below read this run's screenshots, not an earlier run's.
    let _ = std::fs::remove_dir_all(&shots);
    let out = tokio::process::Command::new("node")
        .arg(&script)
        .env("BASE", &base)
        .env("LOGIN_URL", &login)
        .env("SERVICE_KEY", "browser-service-key")
        .env("DOCUMENT", root.join("examples/documents/invoice.json"))
        .env("SHOTS", &shots)
        .env("MAPPINGS", mappings.to_string())
        .env("ORG_NAME", "Acme Trading GmbH")
        .env("WEBHOOK_SECRET", "whsec-browser-0123456789")
        .output()
        .await
        .expect("run node");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "browser flow failed (screenshots in {}):\n{text}",
        shots.display()
    );
    assert!(text.contains("browser flow ok"), "{text}");
    // What the clicks did, seen from outside the browser.
    let docs = sim.documents(DEFAULT_TENANT_TRADING).unwrap();
    assert_eq!(docs.invoices.len(), 1);
    assert_eq!(docs.invoices[0]["InvoiceNumber"], "INV-2026-0042");
    let conn = d
        .store
        .connection_for("acme", "xero")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(conn.state, ledgerport::store::ConnectionState::Disconnected);
    let hook = d
        .store
        .connection_for("acme", "webhook")
        .await
        .unwrap()
        .expect("the webhook was connected from its card");
    assert_eq!(hook.state, ledgerport::store::ConnectionState::Active);
    assert_eq!(hook.connected_by.as_deref(), Some("alice@acme.example"));
    let audit = d.store.audit_log(Some("acme"), 50).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert!(
        actions.contains(&"disconnect")
            && actions.contains(&"mapping.set")
            && actions.contains(&"connect.start")
            && actions.contains(&"connect")
            && actions.contains(&"setting.set"),
        "{actions:?}"
    );
    for name in [
        "1-integrations",
        "2-consent",
        "3-connected",
        "4-configure",
        "5-delivered",
        "6-disconnected",
        "7-webhook-connected",
    ] {
        assert!(shots.join(format!("{name}.png")).exists(), "{name}.png");
    }
    d.stop().await;
}
