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
