//! The refresh storm across real OS processes: two child processes (this
//! test binary re-run with `storm_child`) each fire 50 concurrent `bearer()`
//! calls at one expired connection in a shared PostgreSQL database. The
//! simulator must see exactly one refresh request.

#[allow(dead_code)]
mod storage_support;

use ledgerport::capabilities::http::CredentialProvider;
use ledgerport::connections::{Clock, EventBus};
use ledgerport::credentials::TokenManager;
use ledgerport::oauth::{OAuthApp, OAuthProvider, Providers};
use ledgerport::store::Store;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use storage_support::*;
use xero_sim::DEFAULT_TENANT_HOLDINGS;

const ENV_DB: &str = "LP_STORM_CHILD_DB";
const ENV_SIM: &str = "LP_STORM_CHILD_SIM";
const ENV_CONN: &str = "LP_STORM_CHILD_CONNECTION";
const ENV_GO: &str = "LP_STORM_CHILD_GO_AT_MS";

/// The child side: does nothing unless run by the parent test.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_child() {
    let (Ok(db), Ok(sim), Ok(conn), Ok(go)) = (
        std::env::var(ENV_DB),
        std::env::var(ENV_SIM),
        std::env::var(ENV_CONN),
        std::env::var(ENV_GO),
    ) else {
        return;
    };
    // The simulator's clock, as an offset from ours.
    let v: serde_json::Value = reqwest::get(format!("{sim}/_sim/clock"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sim_now: chrono::DateTime<chrono::Utc> = v["now"].as_str().unwrap().parse().unwrap();
    let offset = sim_now - chrono::Utc::now();
    let mut o = BTreeMap::new();
    for h in [
        "https://login.xero.com",
        "https://identity.xero.com",
        "https://api.xero.com",
    ] {
        o.insert(h.to_string(), sim.clone());
    }
    let mut providers = Providers::new();
    providers.insert(
        OAuthProvider::new(
            &xero_manifest(),
            OAuthApp {
                client_id: xero_sim::DEFAULT_CLIENT_ID.into(),
                client_secret: Some(ledgerport::crypto::Secret::new(
                    xero_sim::DEFAULT_CLIENT_SECRET,
                )),
                redirect_uri: "http://127.0.0.1:1/oauth/callback".into(),
                broad_scopes: false,
                base_urls: o,
                timeout: Duration::from_secs(5),
            },
        )
        .unwrap(),
    );
    let store = Store::open_and_migrate(&db).await.unwrap();
    let tm = Arc::new(TokenManager::new(
        store,
        Arc::new(keys(7)),
        Arc::new(providers),
        Clock::from_fn(move || chrono::Utc::now() + offset),
        EventBus::new(),
        test_policy(),
    ));
    // Start together.
    let go: i64 = go.parse().unwrap();
    let wait = go - chrono::Utc::now().timestamp_millis();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let tm = tm.clone();
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move { tm.bearer(&conn).await }));
    }
    for t in tasks {
        let tok = t.await.unwrap().unwrap().access_token;
        println!(
            "STORM-TOKEN {}",
            hex::encode(Sha256::digest(tok.as_bytes()))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_storm_two_os_processes_postgres() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let sim = sim().await;
    let d = daemon(&sim, &db.url(), keys(7), None).await;
    d.store.upsert_tenant("acme", "Acme", &[], 1).await.unwrap();
    sim.set_auto_approve(Some(vec![DEFAULT_TENANT_HOLDINGS]));
    let url = d
        .conns
        .begin_connect("acme", "xero", "alice")
        .await
        .unwrap();
    let b = browser();
    let cb = authorize(&b, &sim, &url, None).await;
    assert_eq!(finish(&b, &d.base, &cb, None).await.0, 200);
    let c = d
        .store
        .connection_for("acme", "xero")
        .await
        .unwrap()
        .unwrap();
    let old = d.conns.tokens().bearer(&c.id).await.unwrap().access_token;
    let before = sim.counters();
    sim.advance_secs(1800);
    // A slow token endpoint widens the race window a missing lock would lose.
    sim.set_faults(xero_sim::FaultConfig {
        rules: vec![xero_sim::FaultRule {
            route: Some("POST /connect/token".into()),
            latency_ms: 300,
            ..Default::default()
        }],
        ..Default::default()
    });
    let go = chrono::Utc::now().timestamp_millis() + 1500;
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            let exe = exe.clone();
            let (dbu, simu, conn) = (db.url(), sim.base_url(), c.id.clone());
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(exe)
                    .args(["--exact", "storm_child", "--nocapture", "--test-threads=1"])
                    .env(ENV_DB, dbu)
                    .env(ENV_SIM, simu)
                    .env(ENV_CONN, conn)
                    .env(ENV_GO, go.to_string())
                    .output()
                    .unwrap()
            })
        })
        .collect();
    let mut hashes = std::collections::BTreeSet::new();
    let mut lines = 0;
    for ch in children {
        let out = ch.await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // libtest may print "test storm_child ... " on the same line.
        for l in stdout
            .lines()
            .filter_map(|l| l.split_once("STORM-TOKEN ").map(|(_, h)| h))
        {
            hashes.insert(l.trim().to_string());
            lines += 1;
        }
    }
    assert_eq!(lines, 100, "both children ran their 50 calls");
    assert_eq!(hashes.len(), 1, "every call got the same token");
    let after = sim.counters();
    assert_eq!(after.refreshes - before.refreshes, 1, "exactly one refresh");
    assert_eq!(after.invalid_grants, 0);
    let refresh_requests = sim
        .requests(0)
        .iter()
        .filter(|r| {
            r.body_text
                .as_deref()
                .unwrap_or("")
                .contains("grant_type=refresh_token")
        })
        .count();
    assert_eq!(refresh_requests, 1, "one refresh request in all");
    let new = d.conns.tokens().bearer(&c.id).await.unwrap().access_token;
    assert_ne!(new, old);
    assert_eq!(
        hex::encode(Sha256::digest(new.as_bytes())),
        hashes.into_iter().next().unwrap()
    );
}
