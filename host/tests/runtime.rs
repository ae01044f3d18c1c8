//! The plugin runtime against real components: containment of hostile
//! connectors, the good path with an injected credential, manifest refusals
//! and the precompiled-component cache.

mod common;

use common::*;
use ledgerport::capabilities::http::{Credential, CredentialError, CredentialProvider};
use ledgerport::runtime::v0_1::ledgerport::connector::types::DeliveryError;
use ledgerport::runtime::{CallError, LoadError, RuntimeConfig};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const HOSTILE: &str = r#"
id = "hostile"
name = "Hostile"
version = "0.0.0"
contract = "0.1.0"
allowed_hosts = ["https://allowed.test"]
document_kinds = ["invoice"]
"#;

const MINIMAL: &str = r#"
id = "minimal"
name = "Minimal webhook"
version = "0.1.0"
contract = "0.1.0"
allowed_hosts = ["https://hooks.example.com"]
document_kinds = ["invoice", "credit-note"]
"#;

/// The hostile connector's manifest with an `[oauth]` table, so its
/// connections hold a token for `with-credentials`.
fn hostile_with_oauth() -> String {
    format!(
        "{HOSTILE}\n[oauth]\nauthorize_url = \"https://login.allowed.test/authorize\"\ntoken_url = \"https://login.allowed.test/token\"\nscopes = [\"bills.write\"]\n"
    )
}

fn overrides(from: &str, to: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(from.to_string(), to.to_string())])
}

/// A small runtime. Its deadline is past any stall of a loaded machine
/// for ordinary calls; the tests of the deadline itself use
/// [`two_second_deadline`].
fn small_config() -> RuntimeConfig {
    RuntimeConfig {
        deadline: Duration::from_secs(10),
        memory_limit: 32 * 1024 * 1024,
        max_concurrent_instances: 16,
        ..RuntimeConfig::default()
    }
}

/// [`small_config`] with a 2 s deadline, for the tests that reach it.
fn two_second_deadline() -> RuntimeConfig {
    RuntimeConfig {
        deadline: Duration::from_secs(2),
        ..small_config()
    }
}

/// The example connector delivers; its manifest declares no `[oauth]`, so
/// it asks for no token and none is sent (the injected credential's path
/// is `a_token_is_attached_only_for_a_connector_that_declares_oauth`).
#[tokio::test]
async fn example_connector_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let manifest = install(dir.path(), "minimal_connector", MINIMAL);
    let rt = runtime(small_config());
    let plugin = rt
        .load(
            &manifest,
            &overrides("https://hooks.example.com", &listener.base),
        )
        .unwrap();
    let ctx = context("secret-token-123", &[]);
    let receipt = rt
        .deliver(&plugin, &ctx, delivery("dlv-1"), invoice("INV-2026-0042"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(receipt.external_id, "ext-1");
    let reqs = listener.all();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/ledgerport");
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.header("idempotency-key"), Some("dlv-1"));
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["number"], "INV-2026-0042");
    assert_eq!(body["lines"].as_array().unwrap().len(), 10);
    assert_eq!(body["total"], "9950.49");
}

/// `with-credentials` gets the connection's token attached by the host (the
/// guest never sees it) only for a connector whose manifest declares
/// `[oauth]`. Without it the connection holds no token, and the request is
/// refused saying so: before, the token look-up answered "reconnect", the
/// connection paused, a reconnect (which cannot bring a token) resumed it,
/// and it paused again, for ever.
#[tokio::test]
async fn a_token_is_attached_only_for_a_connector_that_declares_oauth() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let oauth = hostile_with_oauth();
    let rt = runtime(small_config());
    let allowed = overrides("https://allowed.test", &listener.base);
    let with = rt
        .load(&install(dir.path(), "hostile_connector", &oauth), &allowed)
        .unwrap();
    let ctx = context("secret-token-123", &[]);
    let receipt = rt
        .deliver(&with, &ctx, delivery("dlv-1"), invoice("credentials"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(receipt.external_id, "status 200");
    let reqs = listener.all();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(
        reqs[0].header("authorization"),
        Some("Bearer secret-token-123")
    );

    let dir2 = tempfile::tempdir().unwrap();
    let without = rt
        .load(
            &install(dir2.path(), "hostile_connector", HOSTILE),
            &allowed,
        )
        .unwrap();
    let err = rt
        .deliver(&without, &ctx, delivery("dlv-2"), invoice("credentials"))
        .await
        .unwrap()
        .unwrap_err();
    let DeliveryError::Rejected(fields) = &err else {
        panic!("a connector bug is no reason to pause the connection: {err:?}");
    };
    let why = format!("{fields:?}");
    assert!(
        why.contains("[oauth]") && why.contains("with-credentials"),
        "{why}"
    );
    assert_eq!(listener.all().len(), 1, "nothing left the host");
}

#[tokio::test]
async fn example_connector_classifies_provider_answers() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let manifest = install(dir.path(), "minimal_connector", MINIMAL);
    let rt = runtime(small_config());
    let plugin = rt
        .load(
            &manifest,
            &overrides("https://hooks.example.com", &listener.base),
        )
        .unwrap();
    for (code, want) in [
        ("503", "transient"),
        ("422", "rejected"),
        ("403", "reauth"),
        ("429", "rate"),
    ] {
        let ctx = context(
            "t",
            &[(
                "endpoint",
                &format!("https://hooks.example.com/status/{code}"),
            )],
        );
        let err = rt
            .deliver(&plugin, &ctx, delivery("d"), invoice("X"))
            .await
            .unwrap()
            .unwrap_err();
        let got = match err {
            DeliveryError::Transient(_) => "transient",
            DeliveryError::Rejected(_) => "rejected",
            DeliveryError::NeedsReauth(_) => "reauth",
            DeliveryError::RateLimited(_) => "rate",
            DeliveryError::NeedsMapping(_) => "mapping",
        };
        assert_eq!(got, want, "status {code}");
    }
}

/// A redirect is not followed: the allowed host answering 302 to a host
/// the manifest does not allow sends nothing there (following it would
/// leave `allowed_hosts`); the connector sees the 302.
#[tokio::test]
async fn redirects_are_not_followed_out_of_the_allowed_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = Listener::start().await;
    let outside = Listener::start().await;
    let manifest = install(dir.path(), "minimal_connector", MINIMAL);
    let rt = runtime(small_config());
    let plugin = rt
        .load(
            &manifest,
            &overrides("https://hooks.example.com", &allowed.base),
        )
        .unwrap();
    let ctx = context(
        "t",
        &[(
            "endpoint",
            &format!(
                "https://hooks.example.com/redirect?to={}/stolen",
                outside.base
            ),
        )],
    );
    let out = rt
        .deliver(&plugin, &ctx, delivery("d"), invoice("X"))
        .await
        .unwrap();
    assert!(out.is_err(), "a 302 is not a receipt: {out:?}");
    assert_eq!(allowed.count(), 1, "the allowed host was asked once");
    assert_eq!(outside.count(), 0, "the redirect was followed");
}

/// After each hostile call, the same runtime still delivers a good document.
async fn still_works(rt: &ledgerport::runtime::Runtime, plugin: &ledgerport::runtime::Plugin) {
    let r = rt
        .deliver(
            plugin,
            &context("t", &[]),
            delivery("after"),
            invoice("fine"),
        )
        .await
        .expect("engine still works")
        .expect("good delivery");
    assert_eq!(r.external_id, "ok-after");
}

/// What a connector answers is cleaned before the host keeps it: a
/// `javascript:` receipt address is dropped (it became a link on the
/// customer's page), NUL characters go (PostgreSQL cannot store one: the
/// delivery was re-run every lease for ever), and a refusal or failure
/// without a reason gets one that says so. The runtime returns the guest's
/// own words (a connector's tests see them); the dispatcher cleans them.
#[tokio::test]
async fn a_connectors_answer_is_cleaned_before_the_host_keeps_it() {
    use ledgerport::runtime::clean;
    let dir = tempfile::tempdir().unwrap();
    let manifest = install(dir.path(), "hostile_connector", HOSTILE);
    let rt = runtime(small_config());
    let plugin = rt.load(&manifest, &BTreeMap::new()).unwrap();
    let raw = |number: &'static str| {
        let (rt, plugin) = (&rt, &plugin);
        async move {
            rt.deliver(plugin, &context("t", &[]), delivery("d"), invoice(number))
                .await
                .expect("the call runs")
        }
    };
    let call = |number: &'static str| async move {
        raw(number)
            .await
            .map(|r| clean::receipt("hostile", r))
            .map_err(clean::error)
    };
    // As the guest gave them.
    let r = raw("js-link").await.expect("a receipt");
    assert!(
        r.external_url.is_some() && r.external_id.contains('\0'),
        "{r:?}"
    );
    let r = call("js-link").await.expect("a receipt");
    assert_eq!(r.external_url, None, "a javascript: address was kept");
    assert_eq!(r.external_id, "BILL-1");
    assert_eq!(r.notes, vec!["ab".to_string()]);

    match call("nul-reject").await {
        Err(DeliveryError::Rejected(v)) => {
            assert_eq!(v.len(), 1);
            assert_eq!(v[0].field, "lines[0]");
            assert_eq!(v[0].message, "bad account");
            assert_eq!(v[0].provider_message.as_deref(), Some("Xero said no"));
        }
        other => panic!("{other:?}"),
    }
    match call("empty-reject").await {
        Err(DeliveryError::Rejected(v)) => {
            assert_eq!(v.len(), 1, "{v:?}");
            assert_eq!(v[0].field, "document");
            assert!(v[0].message.contains("without saying why"), "{v:?}");
        }
        other => panic!("{other:?}"),
    }
    match call("empty-transient").await {
        Err(DeliveryError::Transient(m)) => {
            assert_eq!(m, ledgerport::runtime::clean::NO_REASON)
        }
        other => panic!("{other:?}"),
    }
}

/// Linear memory is reset in place between calls (dirty pages found with
/// PAGEMAP_SCAN and kept resident): no call may see what an earlier call in
/// the same pool slot left behind, on its heap or in its statics.
#[tokio::test]
async fn a_call_never_sees_memory_left_by_an_earlier_call() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = install(dir.path(), "hostile_connector", HOSTILE);
    // One instance slot: every call reuses the slot the previous one used.
    let rt = runtime(RuntimeConfig {
        max_concurrent_instances: 1,
        ..small_config()
    });
    let plugin = rt.load(&manifest, &BTreeMap::new()).unwrap();
    for i in 0..4 {
        let r = rt
            .deliver(
                &plugin,
                &context("t", &[]),
                delivery(&format!("left-{i}")),
                invoice("leftover"),
            )
            .await
            .expect("call runs")
            .expect("receipt");
        assert_eq!(
            r.external_id, "seen 0",
            "call {i} saw an earlier call's memory"
        );
    }
}

#[tokio::test]
async fn hostile_connectors_are_contained() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let manifest = install(dir.path(), "hostile_connector", HOSTILE);
    let hosts = overrides("https://allowed.test", &listener.base);

    // Infinite loop: stopped soon after the 2 s deadline (generous bound).
    let rt = runtime(two_second_deadline());
    let plugin = rt.load(&manifest, &hosts).unwrap();
    let started = Instant::now();
    let e = rt
        .deliver(&plugin, &context("t", &[]), delivery("d"), invoice("loop"))
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::Deadline { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("deadline"));
    still_works(&rt, &plugin).await;

    // The rest with the default deadline: each must be stopped by its own
    // bound, and the heavy ones (50 requests, 20,000 log lines) may take
    // more than 2 s in a debug build on a loaded machine.
    let rt = runtime(RuntimeConfig {
        deadline: RuntimeConfig::default().deadline,
        ..small_config()
    });
    let plugin = rt.load(&manifest, &hosts).unwrap();

    // Memory bomb: the memory cap stops it.
    let e = rt
        .deliver(&plugin, &context("t", &[]), delivery("d"), invoice("bomb"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, CallError::MemoryLimit { limit_mib: 32, .. }),
        "{e}"
    );
    still_works(&rt, &plugin).await;

    // Stack overflow: a clean trap (the shadow stack in linear memory runs
    // out first, which wasm reports as an out-of-bounds access).
    let e = rt
        .deliver(&plugin, &context("t", &[]), delivery("d"), invoice("stack"))
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::Trap { .. }), "{e}");
    assert!(e.to_string().contains("stack overflow"), "{e}");
    still_works(&rt, &plugin).await;

    // Panic: a clean error that carries the panic message.
    let e = rt
        .deliver(&plugin, &context("t", &[]), delivery("d"), invoice("panic"))
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::Trap { .. }), "{e}");
    assert!(e.to_string().contains("panicked on purpose"), "{e}");
    still_works(&rt, &plugin).await;
    // Its last output is in the message without control characters (a NUL
    // made the outcome unstorable on PostgreSQL: the delivery ran again
    // every lease for ever, never counted, never failed).
    let e = rt
        .deliver(
            &plugin,
            &context("t", &[]),
            delivery("d"),
            invoice("nul-panic"),
        )
        .await
        .unwrap_err();
    let m = e.to_string();
    assert!(m.contains("Xero said no") && !m.contains('\0'), "{m:?}");

    // Disallowed host: refused by the host, nothing reaches the listener.
    let before = listener.count();
    let ctx = context("t", &[("target", &format!("{}/steal", listener.base))]);
    let err = rt
        .deliver(&plugin, &ctx, delivery("d"), invoice("evil-host"))
        .await
        .unwrap()
        .unwrap_err();
    let DeliveryError::Transient(msg) = err else {
        panic!("{err:?}")
    };
    assert!(
        msg.contains("Denied") && msg.contains("allowed_hosts"),
        "{msg}"
    );
    assert_eq!(listener.count(), before, "nothing may arrive");
    still_works(&rt, &plugin).await;

    // Forged Authorization header: refused, nothing sent.
    let before = listener.count();
    let err = rt
        .deliver(&plugin, &context("t", &[]), delivery("d"), invoice("auth"))
        .await
        .unwrap()
        .unwrap_err();
    let DeliveryError::Transient(msg) = err else {
        panic!("{err:?}")
    };
    assert!(
        msg.contains("Denied") && msg.contains("authorization"),
        "{msg}"
    );
    assert_eq!(listener.count(), before);
    still_works(&rt, &plugin).await;

    // Call flood: the per-delivery cap stops it at 50.
    let before = listener.count();
    let err = rt
        .deliver(&plugin, &context("t", &[]), delivery("d"), invoice("calls"))
        .await
        .unwrap()
        .unwrap_err();
    let DeliveryError::Transient(msg) = err else {
        panic!("{err:?}")
    };
    assert!(
        msg.contains("after 50 calls") && msg.contains("CallLimit"),
        "{msg}"
    );
    assert_eq!(listener.count() - before, 50);
    still_works(&rt, &plugin).await;

    // Log flood: bounded.
    let dropped_before = rt.stats().log_lines_dropped.load(Ordering::Relaxed);
    let lines_before = rt.stats().log_lines.load(Ordering::Relaxed);
    rt.deliver(
        &plugin,
        &context("t", &[]),
        delivery("d"),
        invoice("logflood"),
    )
    .await
    .unwrap()
    .unwrap();
    let emitted = rt.stats().log_lines.load(Ordering::Relaxed) - lines_before;
    let dropped = rt.stats().log_lines_dropped.load(Ordering::Relaxed) - dropped_before;
    assert_eq!(emitted, 200);
    assert_eq!(dropped, 20_000 - 200);
    assert!(rt.stats().output_bytes_dropped.load(Ordering::Relaxed) > 30_000_000);
    still_works(&rt, &plugin).await;
}

/// A string crosses the boundary as a pointer and a length, so every note
/// of a receipt, or every header of a request, may be the same bytes of the
/// guest's memory: 1 MiB to the guest, 64 MiB to a host that copies each.
/// What one transfer may make the host copy is bounded (the request-body
/// cap and 1 MiB; wasmtime's own default is 128 MiB); past it the call
/// stops with an error that says so, and nothing is sent.
#[tokio::test]
async fn aliased_strings_cannot_multiply_what_the_host_copies() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let manifest = install(dir.path(), "hostile_connector", HOSTILE);
    let mut cfg = small_config();
    cfg.http.max_request_bytes = 8 * 1024 * 1024;
    assert_eq!(cfg.transfer_limit(), 9 * 1024 * 1024);
    let rt = runtime(cfg);
    let plugin = rt
        .load(
            &manifest,
            &overrides("https://allowed.test", &listener.base),
        )
        .unwrap();
    for case in ["alias-notes", "alias-headers"] {
        let before = listener.count();
        let e = rt
            .deliver(&plugin, &context("t", &[]), delivery("d"), invoice(case))
            .await
            .expect_err(case);
        assert!(
            matches!(e, CallError::Transfer { limit_mib: 9, .. }),
            "{case}: {e}"
        );
        assert_eq!(e.kind(), "transfer");
        assert!(e.to_string().contains("more than 9 MiB"), "{e}");
        assert_eq!(listener.count(), before, "{case}: nothing may be sent");
        still_works(&rt, &plugin).await;
    }
}

#[tokio::test]
async fn host_bounds_responses_and_hanging_requests() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let manifest = install(dir.path(), "hostile_connector", HOSTILE);
    let mut cfg = small_config();
    cfg.http.max_response_bytes = 1024 * 1024;
    // Short enough to end the hang well inside the call's deadline, long
    // enough that the huge answer (a fresh connection and 1 MiB read) and
    // the normal one finish on a loaded machine (500 ms was close).
    cfg.http.timeout = Duration::from_millis(1_500);
    cfg.deadline = Duration::from_secs(6);
    let rt = runtime(cfg);
    let plugin = rt
        .load(
            &manifest,
            &overrides("https://allowed.test", &listener.base),
        )
        .unwrap();
    let mut doc = invoice("fetch");
    doc.lines[0].description = "huge".into();
    let err = rt
        .deliver(&plugin, &context("t", &[]), delivery("d"), doc.clone())
        .await
        .unwrap()
        .unwrap_err();
    assert!(format!("{err:?}").contains("TooLarge"), "{err:?}");
    doc.lines[0].description = "hang".into();
    let err = rt
        .deliver(&plugin, &context("t", &[]), delivery("d"), doc.clone())
        .await
        .unwrap()
        .unwrap_err();
    assert!(format!("{err:?}").contains("Timeout"), "{err:?}");
    doc.lines[0].description = "hello".into();
    let ok = rt
        .deliver(&plugin, &context("tok", &[]), delivery("d"), doc)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ok.external_id,
        format!("status 200 bytes {}", "{\"id\":\"ext-1\"}".len())
    );
    still_works(&rt, &plugin).await;
}

#[tokio::test]
async fn manifest_refusals_name_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(small_config());
    let none = BTreeMap::new();

    // Tampered component: one byte changed after install.
    let m = install(dir.path(), "minimal_connector", MINIMAL);
    let wasm_path = dir.path().join("minimal_connector.wasm");
    let mut bytes = std::fs::read(&wasm_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&wasm_path, &bytes).unwrap();
    let e = rt.load(&m, &none).err().expect("tampered must be refused");
    assert!(matches!(e, LoadError::HashMismatch { .. }), "{e}");
    assert!(e.to_string().contains("hash mismatch"), "{e}");

    // Wrong contract version in the manifest.
    let d2 = tempfile::tempdir().unwrap();
    let m = install(
        d2.path(),
        "minimal_connector",
        &MINIMAL.replace("contract = \"0.1.0\"", "contract = \"0.9.0\""),
    );
    let e = rt.load(&m, &none).err().unwrap();
    assert!(e.to_string().contains("unknown contract version"), "{e}");

    // Extra import outside the contract.
    let d3 = tempfile::tempdir().unwrap();
    let m = install(
        d3.path(),
        "extra_import_connector",
        &MINIMAL.replace("\"minimal\"", "\"extra\""),
    );
    let e = rt.load(&m, &none).err().unwrap();
    assert!(matches!(e, LoadError::ForbiddenImport { .. }), "{e}");
    assert!(e.to_string().contains("test:extra/backdoor"), "{e}");

    // A core module (built for the wrong target) says what to do, not only
    // that wasmtime could not parse it.
    let core = b"\0asm\x01\0\0\0".to_vec();
    let mut manifest =
        ledgerport::manifest::Manifest::parse(&format!("component = \"c.wasm\"\n{MINIMAL}"))
            .unwrap();
    manifest.sha256 = Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&core)));
    let e = rt.load_bytes(manifest, &core, &none).err().unwrap();
    assert!(matches!(e, LoadError::Invalid { .. }), "{e}");
    assert!(
        e.to_string().contains("not a component") && e.to_string().contains("wasm32-wasip2"),
        "{e}"
    );

    // No hash at all.
    let d4 = tempfile::tempdir().unwrap();
    let m = install(d4.path(), "minimal_connector", MINIMAL);
    let text = std::fs::read_to_string(&m).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("sha256"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&m, text).unwrap();
    let e = rt.load(&m, &none).err().unwrap();
    assert!(e.to_string().contains("plugin install"), "{e}");

    // An override for a host the manifest does not allow.
    let d5 = tempfile::tempdir().unwrap();
    let m = install(d5.path(), "minimal_connector", MINIMAL);
    let e = rt
        .load(
            &m,
            &overrides("https://evil.example.com", "http://127.0.0.1:1"),
        )
        .err()
        .unwrap();
    assert!(e.to_string().contains("does not allow"), "{e}");
}

#[tokio::test]
async fn second_load_deserializes_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let m = install(dir.path(), "minimal_connector", MINIMAL);
    let cfg = RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..small_config()
    };
    let rt = runtime(cfg.clone());
    let p1 = rt.load(&m, &BTreeMap::new()).unwrap();
    assert!(!p1.from_cache());
    assert_eq!(rt.stats().compiled.load(Ordering::Relaxed), 1);
    drop(rt);
    // A second start: a new engine, same cache directory.
    let rt2 = runtime(cfg);
    let p2 = rt2.load(&m, &BTreeMap::new()).unwrap();
    assert!(p2.from_cache());
    assert_eq!(
        rt2.stats().compiled.load(Ordering::Relaxed),
        0,
        "must not compile again"
    );
    assert_eq!(rt2.stats().deserialized.load(Ordering::Relaxed), 1);
    let info = rt2.describe(&p2, &context("t", &[])).await.unwrap();
    assert_eq!(info.id, "minimal");
}

/// A gate whose slots free slowly: each request waits `waits` times
/// `step` for its slot.
struct SlowGate {
    step: Duration,
    waits: u32,
    asked: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl ledgerport::capabilities::http::RateGate for SlowGate {
    async fn try_take(&self, _: &str, _: u32) -> Result<Option<Duration>, String> {
        let n = self.asked.fetch_add(1, Ordering::Relaxed);
        Ok((n < self.waits).then_some(self.step))
    }
}

/// Waiting for the provider's rate slots does not count against the call's
/// deadline (it bounds the connector's own time): a delivery that waits
/// 3 s for its slot under a 2 s deadline is delivered, and an infinite loop
/// under the same limit is still stopped.
#[tokio::test]
async fn waiting_for_a_rate_slot_does_not_count_against_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let rt = runtime(two_second_deadline());
    let rate = |waits: u32| {
        ledgerport::capabilities::http::RateLimit::new(
            std::sync::Arc::new(SlowGate {
                step: Duration::from_millis(500),
                waits,
                asked: 0.into(),
            }),
            60,
            Duration::from_secs(30),
        )
    };
    let minimal = rt
        .load(
            &install(dir.path(), "minimal_connector", MINIMAL),
            &overrides("https://hooks.example.com", &listener.base),
        )
        .unwrap();
    let mut ctx = context("t", &[]);
    let limit = rate(6);
    ctx.rate = Some(limit.clone());
    let receipt = rt
        .deliver(&minimal, &ctx, delivery("slow"), invoice("INV-SLOW"))
        .await
        .expect("not stopped by the deadline")
        .expect("delivered");
    assert_eq!(receipt.external_id, "ext-1");
    assert!(
        limit.waited_ms.load(Ordering::Relaxed) >= 2_900,
        "waited {} ms",
        limit.waited_ms.load(Ordering::Relaxed)
    );
    assert_eq!(listener.count(), 1);

    let hostile = rt
        .load(
            &install(dir.path(), "hostile_connector", HOSTILE),
            &overrides("https://allowed.test", &listener.base),
        )
        .unwrap();
    let mut ctx = context("t", &[]);
    ctx.rate = Some(rate(0));
    let started = Instant::now();
    let e = rt
        .deliver(&hostile, &ctx, delivery("d"), invoice("loop"))
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::Deadline { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// A connector spinning on a document gives its thread back to the
/// executor while it runs: on a runtime with one worker thread, a timer
/// elsewhere still fires on time (before, the loop held the thread until
/// its deadline, and with it ingest, the admin API and every other
/// tenant's calls), and the loop is still stopped at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_looping_connector_does_not_hold_its_thread() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = install(dir.path(), "hostile_connector", HOSTILE);
    // A 5 s deadline: a loop that held the thread would delay the timer
    // by seconds, far past any stall of a loaded machine.
    let rt = std::sync::Arc::new(runtime(RuntimeConfig {
        deadline: Duration::from_secs(5),
        ..small_config()
    }));
    let plugin = std::sync::Arc::new(rt.load(&manifest, &BTreeMap::new()).unwrap());
    let started = Instant::now();
    let looping = {
        let (rt, plugin) = (rt.clone(), plugin.clone());
        tokio::spawn(async move {
            rt.deliver(&plugin, &context("t", &[]), delivery("d"), invoice("loop"))
                .await
        })
    };
    // Another task on the same (only) worker: a short timer, twice.
    let timer = tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        t.elapsed()
    });
    let took = timer.await.unwrap();
    assert!(
        took < Duration::from_millis(2_000),
        "a 50 ms timer took {took:?} beside a looping connector"
    );
    assert!(!looping.is_finished(), "the loop ended early");
    let e = looping.await.unwrap().unwrap_err();
    assert!(matches!(e, CallError::Deadline { .. }), "{e}");
    let all = started.elapsed();
    assert!(
        all >= Duration::from_millis(4_900) && all < Duration::from_secs(12),
        "stopped after {all:?} (deadline 5 s)"
    );
}

/// Credentials whose token endpoint never answers (bearer and refresh
/// wait forever).
struct HungTokenEndpoint;

#[async_trait::async_trait]
impl CredentialProvider for HungTokenEndpoint {
    async fn bearer(&self, _: &str) -> Result<Credential, CredentialError> {
        std::future::pending().await
    }
    async fn refresh(&self, _: &str, _: &Credential) -> Result<Credential, CredentialError> {
        std::future::pending().await
    }
}

/// A token endpoint that never answers fails the request within the
/// per-request timeout, and the connector reports it (a retryable error
/// that says the token endpoint did not answer); the call is not held until
/// its deadline stops the connector as if the connector had hung, and
/// nothing is sent without a token.
#[tokio::test]
async fn a_hung_token_endpoint_is_a_request_error_not_the_connectors_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let mut cfg = small_config();
    cfg.deadline = Duration::from_secs(20);
    cfg.http.timeout = Duration::from_millis(300);
    let rt = runtime(cfg);
    let plugin = rt
        .load(
            &install(dir.path(), "hostile_connector", &hostile_with_oauth()),
            &overrides("https://allowed.test", &listener.base),
        )
        .unwrap();
    let mut ctx = context("unused", &[]);
    ctx.credentials = std::sync::Arc::new(HungTokenEndpoint);
    let started = Instant::now();
    let outcome = rt
        .deliver(&plugin, &ctx, delivery("d"), invoice("credentials"))
        .await
        .expect("the connector returned (not stopped at its deadline)");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    match outcome {
        Err(DeliveryError::Transient(why)) => {
            assert!(why.contains("token endpoint did not answer"), "{why}")
        }
        other => panic!("expected a transient error naming the token endpoint: {other:?}"),
    }
    assert_eq!(listener.count(), 0, "nothing is sent without a token");
}
