//! The example connector written in Python (`examples/python-connector`,
//! built with componentize-py by `cargo xtask wasm`) against the real
//! runtime: the same WIT contract as the Rust connectors, so the same host
//! loads it, injects the credential, serves its mappings and log lines, and
//! gets the contract's outcomes back. Proves the contract is language-neutral.

mod common;

use axum::Router;
use axum::http::{StatusCode, Uri};
use common::*;
use ledgerport::capabilities::mapping::{AccountMapping, MappingScope, MemoryMappings};
use ledgerport::runtime::v0_1::ledgerport::connector::types::{DeliveryError, DocumentKind};
use ledgerport::runtime::{CallContext, Plugin, Runtime, RuntimeConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const ALLOWED: &str = "https://hooks.example.com";

fn source_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python-connector/manifest.toml")
}

/// Install the real manifest with the built component into `dir` (what
/// `ledgerport plugin install` does) and return the installed manifest.
fn install_python(dir: &Path) -> PathBuf {
    ledgerport::plugin_store::install(&source_manifest(), &wasm("python_connector"), dir)
        .expect("install the Python connector")
}

/// Precompiled components shared by this file's tests (nextest runs each in
/// its own process): compiling the Python component takes ~20 s, so the
/// first test compiles it under a file lock and the others deserialize.
/// Entries older than the component or this test binary (so from an earlier
/// build of either: another hash or another engine) are removed.
fn cache_dir() -> PathBuf {
    let dir = target_dir().join("test-cache/python-connector");
    std::fs::create_dir_all(&dir).unwrap();
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).unwrap();
    let built = mtime(&wasm("python_connector")).max(mtime(&std::env::current_exe().unwrap()));
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < built);
        if stale && entry.path().extension().is_some_and(|e| e == "cwasm") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    dir
}

/// A runtime over real sockets sharing the tests' precompiled cache.
fn python_runtime() -> Runtime {
    runtime(RuntimeConfig {
        deadline: Duration::from_secs(10),
        max_concurrent_instances: 8,
        cache_dir: Some(cache_dir()),
        ..RuntimeConfig::default()
    })
}

/// Load the Python connector with its allowed host sent to `base`.
fn load(rt: &Runtime, dir: &Path, base: &str) -> Plugin {
    let lock =
        std::fs::File::create(rt.config().cache_dir.as_ref().unwrap().join(".lock")).unwrap();
    lock.lock().unwrap();
    let started = Instant::now();
    let plugin = rt
        .load(
            &install_python(dir),
            &BTreeMap::from([(ALLOWED.to_string(), base.to_string())]),
        )
        .expect("the host loads the Python connector");
    eprintln!(
        "python connector: {} in {:?}",
        if plugin.from_cache() {
            "deserialized from the cache"
        } else {
            "compiled"
        },
        started.elapsed()
    );
    plugin
}

/// A context whose tenant mapped every kind of the sample invoice except
/// `unmapped`.
fn mapped_context(token: &str, settings: &[(&str, &str)], unmapped: &[&str]) -> CallContext {
    let mappings = MemoryMappings::default();
    let scope = MappingScope {
        tenant_id: "acme".into(),
        connector_id: "python-webhook".into(),
    };
    for (i, line) in invoice("x").lines.iter().enumerate() {
        if !unmapped.contains(&line.kind.as_str()) {
            mappings.set(
                &scope,
                AccountMapping {
                    kind: line.kind.clone(),
                    account_code: format!("{}", 400 + i),
                    tax_type: (line.kind == "management-fee").then(|| "OUTPUT2".to_string()),
                },
            );
        }
    }
    let mut ctx = context(token, settings);
    ctx.mappings = Arc::new(mappings);
    ctx
}

/// A listener answering `/s/<code>/documents` with that status (429 with
/// `Retry-After: 7`), for the classification test.
async fn status_listener() -> String {
    let app = Router::new().fallback(|uri: Uri| async move {
        let code = uri
            .path()
            .strip_prefix("/s/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|c| c.parse::<u16>().ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::NOT_FOUND);
        let mut headers = axum::http::HeaderMap::new();
        if code == StatusCode::TOO_MANY_REQUESTS {
            headers.insert("retry-after", "7".parse().unwrap());
        }
        (code, headers, "{\"error\":\"as asked\"}")
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    base
}

#[tokio::test]
async fn python_connector_delivers_the_sample_invoice_with_injected_credential() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let rt = python_runtime();
    let plugin = load(&rt, dir.path(), &listener.base);
    let ctx = mapped_context("secret-token-py", &[], &[]);
    let logs_before = rt.stats().log_lines.load(Ordering::Relaxed);
    let started = Instant::now();
    let receipt = rt
        .deliver(
            &plugin,
            &ctx,
            delivery("dlv-py-1"),
            invoice("INV-2026-0042"),
        )
        .await
        .expect("no trap")
        .expect("delivered");
    eprintln!(
        "python connector: first deliver call {:?}",
        started.elapsed()
    );
    assert_eq!(receipt.external_id, "ext-1");
    assert_eq!(
        rt.stats().log_lines.load(Ordering::Relaxed) - logs_before,
        1,
        "one log line through the log import"
    );
    let reqs = listener.all();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/documents");
    // No [oauth] in its manifest: it asks for no token, and gets none.
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.header("idempotency-key"), Some("dlv-py-1"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["number"], "INV-2026-0042");
    assert_eq!(body["kind"], "invoice");
    assert_eq!(body["total"], "9950.49");
    assert_eq!(body["customer"], "Acme Holdings Ltd");
    let lines = body["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 10);
    assert_eq!(lines[0]["kind"], "gross-salary");
    assert_eq!(lines[0]["account_code"], "400");
    assert_eq!(lines[5]["account_code"], "405");
    assert_eq!(lines[5]["tax_type"], "OUTPUT2");
    assert_eq!(lines[7]["unit_amount"], "41.3119");
    assert!(body["pdf_bytes"].as_u64().unwrap() > 0);
    // The guest never saw the token: it is nowhere in what it sent.
    assert!(!String::from_utf8_lossy(&r.body).contains("secret-token-py"));

    // A second connection whose endpoint setting names a path under the
    // allowed host: the connector posts below it.
    let ctx = mapped_context("t2", &[("endpoint", &format!("{ALLOWED}/tenant-7/"))], &[]);
    rt.deliver(&plugin, &ctx, delivery("dlv-py-2"), invoice("INV-2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listener.all()[1].path, "/tenant-7/documents");

    // Rough per-call cost of a fresh Python instance (printed, not asserted).
    let n = 10u32;
    let started = Instant::now();
    for _ in 0..n {
        rt.describe(&plugin, &ctx).await.unwrap();
    }
    eprintln!(
        "python connector: describe {:?} per call (fresh instance each)",
        started.elapsed() / n
    );
    let started = Instant::now();
    for i in 0..n {
        rt.deliver(&plugin, &ctx, delivery(&format!("b{i}")), invoice("B"))
            .await
            .unwrap()
            .unwrap();
    }
    eprintln!(
        "python connector: deliver {:?} per call (fresh instance, loopback HTTP)",
        started.elapsed() / n
    );
}

#[tokio::test]
async fn python_connector_names_every_unmapped_kind() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let rt = python_runtime();
    let plugin = load(&rt, dir.path(), &listener.base);
    let ctx = mapped_context("t", &[], &["fx-fee", "gross-salary", "security-deposit"]);
    let err = rt
        .deliver(&plugin, &ctx, delivery("d"), invoice("INV-UNMAPPED"))
        .await
        .unwrap()
        .unwrap_err();
    let DeliveryError::NeedsMapping(kinds) = err else {
        panic!("want needs-mapping, got {err:?}")
    };
    // Every one of them, in the order they appear on the invoice.
    assert_eq!(kinds, ["gross-salary", "fx-fee", "security-deposit"]);
    assert_eq!(
        listener.count(),
        0,
        "nothing is sent while kinds are unmapped"
    );
}

#[tokio::test]
async fn python_connector_classifies_provider_answers() {
    let dir = tempfile::tempdir().unwrap();
    let base = status_listener().await;
    let rt = python_runtime();
    let plugin = load(&rt, dir.path(), &base);
    for code in [400u16, 422, 429, 500, 503, 401] {
        let ctx = mapped_context("t", &[("endpoint", &format!("{ALLOWED}/s/{code}"))], &[]);
        let err = rt
            .deliver(&plugin, &ctx, delivery("d"), invoice("X"))
            .await
            .unwrap()
            .unwrap_err();
        match (code, &err) {
            (400 | 422, DeliveryError::Rejected(fields)) => {
                assert_eq!(fields.len(), 1);
                assert_eq!(fields[0].field, "document");
                assert!(fields[0].message.contains(&code.to_string()), "{err:?}");
                assert_eq!(
                    fields[0].provider_message.as_deref(),
                    Some("{\"error\":\"as asked\"}")
                );
            }
            (429, DeliveryError::RateLimited(r)) => {
                assert_eq!(r.retry_after_seconds, 7);
                assert_eq!(r.limit, "endpoint");
            }
            (500 | 503, DeliveryError::Transient(msg)) => {
                assert!(msg.contains(&code.to_string()), "{msg}");
            }
            (401, DeliveryError::NeedsReauth(_)) => {}
            _ => panic!("status {code}: unexpected {err:?}"),
        }
    }
    // A host the manifest does not allow: the host refuses, the connector
    // reports it as a rejection naming the refusal.
    let ctx = mapped_context("t", &[("endpoint", "https://evil.example.net")], &[]);
    let err = rt
        .deliver(&plugin, &ctx, delivery("d"), invoice("X"))
        .await
        .unwrap()
        .unwrap_err();
    let DeliveryError::Rejected(fields) = &err else {
        panic!("{err:?}")
    };
    assert!(
        fields[0].message.contains("the host refused"),
        "{:?}",
        fields[0]
    );
}

#[tokio::test]
async fn python_connector_describes_itself_and_checks() {
    let dir = tempfile::tempdir().unwrap();
    let rt = python_runtime();
    let plugin = load(&rt, dir.path(), "http://127.0.0.1:9");
    let ctx = context("t", &[]);
    let info = rt.describe(&plugin, &ctx).await.unwrap();
    assert_eq!(info.id, "python-webhook");
    assert_eq!(
        info.id,
        plugin.manifest().id,
        "describe matches the manifest"
    );
    assert_eq!(info.name, "Python webhook");
    assert_eq!(info.version, "0.1.0");
    assert_eq!(
        info.document_kinds,
        [DocumentKind::Invoice, DocumentKind::CreditNote]
    );
    let report = rt.check(&plugin, &ctx).await.unwrap().unwrap();
    assert_eq!(report.organisation_name, ALLOWED);
    let accounts = rt.list_accounts(&plugin, &ctx).await.unwrap().unwrap();
    assert!(accounts.accounts.is_empty() && accounts.tax_rates.is_empty());
}

#[test]
fn python_connector_manifest_passes_plugin_check() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = install_python(dir.path());
    let o = Command::new(env!("CARGO_BIN_EXE_ledgerport"))
        .args(["plugin", "check"])
        .arg(&manifest)
        .env_remove("LEDGERPORT_CONFIG")
        .env("LEDGERPORT_LOG", "error")
        .output()
        .expect("run ledgerport");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(
        text.contains("Python webhook (python-webhook) version 0.1.0")
            && text.contains("ledgerport:connector@0.1.0")
            && text.contains(ALLOWED)
            && text.contains("ok: the host will load this plugin"),
        "{text}"
    );
}
