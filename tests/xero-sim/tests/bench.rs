//! Throughput check (ignored by default): GET /Accounts with limits off.
//! Run: `cargo test --release -p xero-sim --test bench -- --ignored --nocapture`.

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use xero_sim::SimConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run in release"]
async fn get_accounts_throughput() {
    let mut cfg = SimConfig::default();
    cfg.limits.enabled = false;
    cfg.request_log_limit = 10_000;
    let (sim, at) = start_with_token(cfg).await;
    let url = format!("{}/api.xro/2.0/Accounts", sim.base_url());
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (url, at, done) = (url.clone(), at.clone(), done.clone());
        let http = client();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let r = http
                    .get(&url)
                    .bearer_auth(&at)
                    .header("xero-tenant-id", HOLDINGS.to_string())
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await.expect("body");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let rps = done.load(Ordering::Relaxed) as f64 / 3.0;
    println!("GET /Accounts: {rps:.0} requests/s (client and server share 2 cores)");
    assert!(rps > 500.0, "{rps}");
}
