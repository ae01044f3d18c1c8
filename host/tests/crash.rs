//! kill -9 of a real `ledgerport serve` process in the middle of a run,
//! restarted each time: every document reaches Xero exactly once (the
//! simulator's counters), nothing is lost.

mod common;
mod serve_support;
#[allow(dead_code)]
mod storage_support;

use serve_support::*;
use std::time::Duration;
use xero_sim::DEFAULT_TENANT_TRADING;

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
    let sim = serve_support::sim().await;
    let serve = Serve::new(&sim).await;
    let mut child = serve.spawn();
    wait_ready(&serve, &mut child).await;
    let http = client();
    let kill_every = docs / (kills + 1);
    let mut killed = 0;
    for n in 0..docs {
        // The platform retries until the document is accepted.
        post_until_accepted(&http, &serve.base, &invoice("crash", n)).await;
        if killed < kills && n > 0 && n % kill_every == 0 {
            // Let work get under way, then kill -9 mid-flight and restart.
            tokio::time::sleep(Duration::from_millis(50 + (n as u64 * 37) % 200)).await;
            kill_9(&mut child);
            killed += 1;
            child = serve.spawn();
            wait_ready(&serve, &mut child).await;
        }
    }
    assert_eq!(killed, kills);
    // Wait for everything to arrive (leases of killed workers expire in 3 s).
    wait_bills(&sim, docs, Duration::from_secs(180)).await;
    wait_attachments(&sim, docs, Duration::from_secs(180)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A graceful stop: SIGTERM, and the daemon exits cleanly by itself.
    sigterm_and_wait(&mut child).await;
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

/// SIGTERM while deliveries wait on a Xero that does not answer: the
/// daemon stops claiming, gives what is in flight its grace (20 s), then
/// releases it (pending, no lease) rather than leaving it "working" for
/// another daemon's lease to run out, and exits cleanly; the next start
/// sends each document once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_what_it_could_not_finish() {
    use xero_sim::{FaultConfig, FaultRule};
    let sim = serve_support::sim().await;
    sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            route: Some("/api.xro".into()),
            latency_ms: 40_000,
            ..Default::default()
        }],
        ..Default::default()
    });
    let serve = Serve::new(&sim).await;
    let mut child = serve.spawn();
    wait_ready(&serve, &mut child).await;
    let http = client();
    for n in 0..3 {
        post_until_accepted(&http, &serve.base, &invoice("term", n)).await;
    }
    let started = std::time::Instant::now();
    while sim.counters().accounting_requests == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no delivery reached Xero"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sigterm_and_wait(&mut child).await;
    let db = serve.dir.path().join("ledgerport.db");
    let store = ledgerport::store::Store::open_and_migrate(&format!("sqlite:{}", db.display()))
        .await
        .unwrap();
    let ledgerport::store::Pool::Sqlite(pool) = store.pool() else {
        unreachable!()
    };
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT document_number, state, lease_owner FROM deliveries")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (number, state, owner) in &rows {
        assert_eq!(state, "pending", "{number}: {rows:?}");
        assert_eq!(owner, &None, "{number} released: {rows:?}");
    }
    store.close().await;

    sim.clear_faults();
    child = serve.spawn();
    wait_ready(&serve, &mut child).await;
    wait_bills(&sim, 3, Duration::from_secs(60)).await;
    sigterm_and_wait(&mut child).await;
    assert!(bills_per_number(&sim).values().all(|n| *n == 1));
    assert_eq!(sim.counters().duplicates, 0);
}
