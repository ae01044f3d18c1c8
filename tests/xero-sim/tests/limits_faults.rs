//! Rate limits, fault injection, the `/_sim` control API and the binary.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use xero_sim::{FaultConfig, FaultRule, RateProblem, SimConfig};

#[tokio::test]
async fn minute_limit_gives_429_with_headers() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    sim.set_clock_speed(0.0); // stay inside one sim minute
    let api = Api::new(&sim, &at, HOLDINGS);
    for i in 0..60 {
        let r = api
            .req(reqwest::Method::GET, "/Organisation")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        let rem: i64 = r.headers()["x-minlimit-remaining"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(rem, 59 - i);
        assert!(r.headers().contains_key("x-daylimit-remaining"));
        assert!(r.headers().contains_key("x-appminlimit-remaining"));
    }
    let r = api
        .req(reqwest::Method::GET, "/Organisation")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-rate-limit-problem"], "minute");
    let retry: i64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(r.headers()["x-minlimit-remaining"], "0");
    // The other tenant has its own budget.
    assert_eq!(
        Api::new(&sim, &at, TRADING).get("/Organisation").await.0,
        200
    );
    assert_eq!(sim.counters().rate_limited["minute"], 1);
    // A new minute resets the budget.
    sim.advance_secs(60);
    assert_eq!(api.get("/Organisation").await.0, 200);
    // Limits can be turned off.
    let mut l = sim.limits();
    l.enabled = false;
    sim.set_limits(l);
    for _ in 0..100 {
        assert_eq!(api.get("/Organisation").await.0, 200);
    }
}

#[tokio::test]
async fn daily_and_concurrent_limits() {
    let mut cfg = SimConfig::default();
    cfg.limits.per_day = 3;
    cfg.limits.concurrent = 1;
    // Midday on the simulator's clock: a run across UTC midnight would
    // start a new day between the third and fourth request.
    cfg.clock_start = Some("2026-11-25T12:00:00Z".parse().unwrap());
    let (sim, at) = start_with_token(cfg).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    for _ in 0..3 {
        assert_eq!(api.get("/Organisation").await.0, 200);
    }
    let r = api
        .req(reqwest::Method::GET, "/Organisation")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-rate-limit-problem"], "daily");
    assert!(r.headers().contains_key("retry-after"));

    // Concurrency: a slow request holds the only slot.
    let api2 = Api::new(&sim, &at, TRADING);
    sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            route: Some("GET /api.xro/2.0/Accounts".into()),
            latency_ms: 3_000,
            ..Default::default()
        }],
        ..Default::default()
    });
    let slow = api2.req(reqwest::Method::GET, "/Accounts").send();
    // The fast request goes once the slow one is inside the gate (its
    // injected latency counted), not after a fixed pause that a loaded
    // machine can outlast; the slow one then holds the slot for 3 s.
    let fast = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while sim.counters().faults.get("latency").copied().unwrap_or(0) == 0 {
            assert!(Instant::now() < deadline, "the slow request never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        api2.req(reqwest::Method::GET, "/Organisation").send().await
    };
    let (a, b) = tokio::join!(slow, fast);
    // Injected latency is slept inside the gate, so the slow request holds the only slot.
    assert_eq!(a.unwrap().status(), 200);
    let b = b.unwrap();
    assert_eq!(b.status(), 429);
    assert_eq!(b.headers()["x-rate-limit-problem"], "concurrent");
    assert!(!b.headers().contains_key("retry-after"));
    assert_eq!(api2.get("/Organisation").await.0, 200, "slot freed");
    sim.clear_faults();
}

#[tokio::test]
async fn forced_429_burst() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            route: Some("/api.xro/2.0/Invoices".into()),
            force_429: 2,
            force_429_kind: RateProblem::Daily,
            retry_after_secs: 120,
            ..Default::default()
        }],
        ..Default::default()
    });
    for _ in 0..2 {
        let r = api
            .req(reqwest::Method::GET, "/Invoices")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-rate-limit-problem"], "daily");
        assert_eq!(r.headers()["retry-after"], "120");
    }
    assert_eq!(api.get("/Invoices").await.0, 200);
    assert_eq!(api.get("/Organisation").await.0, 200);
    assert_eq!(sim.counters().rate_limited["daily"], 2);
}

async fn statuses(api: &Api<'_>, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(api.get("/Organisation").await.0);
    }
    out
}

#[tokio::test]
async fn seeded_500_rate_is_replayable_and_reset_clears() {
    let mut cfg = SimConfig::default();
    cfg.limits.enabled = false;
    cfg.seed = 1234;
    let (sim, at) = start_with_token(cfg).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    let faults = FaultConfig {
        rules: vec![FaultRule {
            route: Some("GET /api.xro/2.0/Organisation".into()),
            error_500_rate: 0.3,
            ..Default::default()
        }],
        ..Default::default()
    };
    sim.set_faults(faults.clone());
    let a = statuses(&api, 60).await;
    let fails = a.iter().filter(|s| **s == 500).count();
    assert!((5..=35).contains(&fails), "{fails} failures of 60");
    // Same seed + config => same sequence (via the HTTP control API this time).
    let http = client();
    let r = http
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b = statuses(&api, 60).await;
    assert_eq!(a, b);
    assert_eq!(sim.counters().faults["500"] as usize, fails * 2);
    // 503 body is plain text.
    sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            error_503_rate: 1.0,
            ..Default::default()
        }],
        ..Default::default()
    });
    let r = api
        .req(reqwest::Method::GET, "/Organisation")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    // Reset clears faults, grants and counters.
    let r = http
        .post(format!("{}/_sim/reset", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(sim.faults(), FaultConfig::default());
    assert_eq!(sim.counters().requests, 0);
    assert_eq!(
        api.get("/Organisation").await.0,
        401,
        "grants are gone after reset"
    );
}

#[tokio::test]
async fn latency_hang_and_reset_faults() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            route: Some("/api.xro/2.0/Organisation".into()),
            latency_ms: 250,
            ..Default::default()
        }],
        ..Default::default()
    });
    let t = Instant::now();
    assert_eq!(api.get("/Organisation").await.0, 200);
    assert!(t.elapsed() >= Duration::from_millis(250));
    // Other routes are not delayed: counted by the simulator rather than
    // timed, which a loaded machine could stretch past 250 ms.
    let delayed = sim.counters().faults.get("latency").copied().unwrap_or(0);
    assert_eq!(delayed, 1);
    assert_eq!(api.get("/Accounts").await.0, 200);
    assert_eq!(
        sim.counters().faults.get("latency").copied().unwrap_or(0),
        delayed,
        "other routes unaffected"
    );

    sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            route: Some("/api.xro/2.0/Organisation".into()),
            hang_rate: 1.0,
            ..Default::default()
        }],
        ..Default::default()
    });
    let r = api
        .req(reqwest::Method::GET, "/Organisation")
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(r.unwrap_err().is_timeout());

    sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            route: Some("/api.xro/2.0/Organisation".into()),
            reset_rate: 1.0,
            ..Default::default()
        }],
        ..Default::default()
    });
    let r = client()
        .get(format!("{}/api.xro/2.0/Organisation", sim.base_url()))
        .bearer_auth(&at)
        .header("xero-tenant-id", HOLDINGS.to_string())
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    let e = r.unwrap_err();
    assert!(!e.is_timeout(), "reset, not a hang: {e:?}");
    let c = sim.counters();
    assert_eq!(c.faults["hang"], 1);
    assert_eq!(c.faults["reset"], 1);

    // Forced resets: exactly the next N matching requests.
    sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            route: Some("/api.xro/2.0/Organisation".into()),
            force_reset: 2,
            ..Default::default()
        }],
        ..Default::default()
    });
    let get = || {
        client()
            .get(format!("{}/api.xro/2.0/Organisation", sim.base_url()))
            .bearer_auth(&at)
            .header("xero-tenant-id", HOLDINGS.to_string())
            .timeout(Duration::from_secs(5))
            .send()
    };
    assert!(get().await.is_err());
    assert!(get().await.is_err());
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(sim.counters().faults["reset"], 3);
}

#[tokio::test]
async fn control_api_roundtrip() {
    let sim = start(SimConfig::default()).await;
    let base = sim.base_url();
    let http = client();
    let g: Value = http
        .post(format!("{base}/_sim/grants"))
        .json(&json!({"tenants": [HOLDINGS]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let at = g["tokens"]["access_token"].as_str().unwrap().to_string();
    let api = Api::new(&sim, &at, HOLDINGS);
    let (s, _) = api.put("/Contacts", json!({"Name": "Ctl Ltd"})).await;
    assert_eq!(s, 200);
    assert_eq!(
        Api::new(&sim, &at, TRADING).get("/Organisation").await.0,
        403
    );
    let docs: Value = http
        .get(format!("{base}/_sim/tenants/{HOLDINGS}/documents"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(docs["contacts"][0]["Name"], "Ctl Ltd");
    let log: Value = http
        .get(format!("{base}/_sim/requests?prefix=/api.xro"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["method"], "PUT");
    assert_eq!(log[0]["status"], 200);
    assert!(log[0]["body_text"].as_str().unwrap().contains("Ctl Ltd"));
    assert!(
        log[0]["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "xero-tenant-id")
    );
    let clock: Value = http
        .post(format!("{base}/_sim/clock"))
        .json(&json!({"advance_secs": 1801}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(clock["now"].is_string());
    assert_eq!(
        api.get("/Organisation").await.0,
        401,
        "expired via /_sim/clock"
    );
    let counters: Value = http
        .get(format!("{base}/_sim/counters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counters["accounting_requests"], 3);
    let grants: Value = http
        .get(format!("{base}/_sim/grants"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(grants[0]["connections"].as_array().unwrap().len(), 1);
    // Auto-approve switch via /_sim.
    let r = http
        .post(format!("{base}/_sim/auto-approve"))
        .json(&json!({"tenants": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!(
            "{base}/identity/connect/authorize?response_type=code&client_id=ledgerport-demo&redirect_uri=http://x/cb&scope=offline_access%20accounting.invoices"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let r = http
        .post(format!("{base}/_sim/limits"))
        .body("{bad")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A misspelt control field is refused naming it, not ignored (a test
    // that advanced the clock by `advance` would silently not advance it).
    let r = http
        .post(format!("{base}/_sim/clock"))
        .json(&json!({"advance": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("advance"), "{v}");
    let r = http
        .post(format!("{base}/_sim/faults"))
        .json(&json!({"rules": [{"route": "POST /x", "error_500": 1.0}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn starts_and_shuts_down() {
    // How fast it starts is not a test's business (speed goals live in
    // benchmarks): that it answers once started, and stops answering once
    // shut down, is.
    let sim = start(SimConfig::default()).await;
    let base = sim.base_url();
    assert_eq!(
        client()
            .get(format!("{base}/_sim/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sim.shutdown().await;
    let r = client()
        .get(format!("{base}/_sim/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(r.is_err());
}

#[test]
fn config_from_toml() {
    let cfg = xero_sim::SimConfig::from_toml(
        r#"
        port = 0
        seed = 9
        auto_approve = []
        [limits]
        per_minute = 1000
        [[apps]]
        client_id = "other"
        client_secret = "s"
        name = "Other"
        scope_mode = "broad"
        [[faults.rules]]
        route = "POST /api.xro/2.0/Invoices"
        error_500_rate = 0.1
        "#,
    )
    .unwrap();
    assert_eq!(cfg.seed, 9);
    assert_eq!(cfg.limits.per_minute, 1000);
    assert_eq!(cfg.limits.per_day, 5000);
    assert_eq!(cfg.apps[0].client_id, "other");
    assert_eq!(cfg.orgs.len(), 2);
    assert_eq!(cfg.faults.rules[0].error_500_rate, 0.1);
    // Values the simulator cannot compute with are refused by name.
    for (text, key) in [
        ("page_size = 0", "page_size"),
        (
            "max_attachment_bytes = 9223372036854775807",
            "max_attachment_bytes",
        ),
        (
            "[lifetimes]\naccess_token_secs = 9223372036854775807",
            "lifetimes.access_token_secs",
        ),
        (
            "[lifetimes]\nidempotency_secs = -1",
            "lifetimes.idempotency_secs",
        ),
    ] {
        let e = xero_sim::SimConfig::from_toml(text)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("{key}:")), "{text}: {e}");
    }
}
