//! Benchmark: the cost of one connector call — fresh store + instantiate +
//! `deliver` of the 10-line sample invoice — with a stub HTTP transport, so
//! only the runtime and the guest's translation are measured.
//!
//! Run: `cargo xtask wasm && cargo bench -p ledgerport --bench plugin_call`.
//! Prints median, p99 and mean per connector.

use async_trait::async_trait;
use ledgerport::capabilities::connection::ConnectionInfo;
use ledgerport::capabilities::http::{
    HttpTransport, InboundResponse, OutboundRequest, StaticCredentials, TransportError,
};
use ledgerport::capabilities::kv::MemoryKv;
use ledgerport::capabilities::mapping::MemoryMappings;
use ledgerport::runtime::v0_1::ledgerport::connector::types::Delivery;
use ledgerport::runtime::{CallContext, Runtime, RuntimeConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Stub;

#[async_trait]
impl HttpTransport for Stub {
    async fn send(
        &self,
        _req: OutboundRequest,
        _max: u64,
        _timeout: Duration,
    ) -> Result<InboundResponse, TransportError> {
        Ok(InboundResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"id":"stub-1"}"#.to_vec(),
        })
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn main() {
    let plugins = root().join("target/plugins");
    let manifest = plugins.join("minimal/manifest.toml");
    if !manifest.exists() {
        eprintln!(
            "{} missing: run `cargo xtask wasm` first",
            manifest.display()
        );
        std::process::exit(2);
    }
    let rt = Runtime::new(RuntimeConfig::default(), Arc::new(Stub)).expect("runtime");
    let plugin = rt.load(&manifest, &BTreeMap::new()).expect("load");
    let bytes = std::fs::read(root().join("examples/documents/invoice.json")).unwrap();
    let doc = ledgerport::document::Document::from_json(&bytes)
        .unwrap()
        .to_wit()
        .unwrap();
    let ctx = CallContext {
        connection: ConnectionInfo {
            connection_id: "bench".into(),
            tenant_id: "acme".into(),
            ..Default::default()
        },
        credentials: Arc::new(StaticCredentials("t".into())),
        mappings: Arc::new(MemoryMappings::default()),
        kv: Arc::new(MemoryKv::default()),
        rate: None,
    };
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let mut samples = Vec::with_capacity(iterations);
    tokio.block_on(async {
        for i in 0..(iterations + 500) {
            let d = Delivery {
                key: format!("k{i}"),
                attempt: 1,
            };
            let doc = doc.clone();
            let t = Instant::now();
            if std::env::var("BENCH_DESCRIBE").is_ok() {
                let r = rt.describe(&plugin, &ctx).await;
                assert!(r.is_ok());
                let _ = (d, doc);
            } else {
                let r = rt.deliver(&plugin, &ctx, d, doc).await;
                assert!(matches!(r, Ok(Ok(_))), "{r:?}");
            }
            let el = t.elapsed();
            if i >= 500 {
                samples.push(el);
            }
        }
    });
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let median = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    let mean: f64 = samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64;
    println!("| connector | calls | median µs | p99 µs | mean µs |");
    println!("|---|---|---|---|---|");
    println!(
        "| minimal (fresh store + instantiate + deliver, 10-line invoice) | {} | {:.1} | {:.1} | {:.1} |",
        samples.len(),
        us(median),
        us(p99),
        mean
    );
}
