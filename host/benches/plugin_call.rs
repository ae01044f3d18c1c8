//! Benchmark: the cost of one connector call — fresh store + instantiate +
//! `deliver` of the 10-line sample invoice — with a stub HTTP transport, so
//! only the runtime and the guest's translation are measured.
//!
//! Run: `cargo xtask wasm && cargo bench -p ledgerport --bench plugin_call`.
//! Prints median, p99 and mean per connector. `BENCH_ITERATIONS` sets the
//! number of measured calls (default 5000).
//!
//! The stub answers like Xero for the Xero connector (contact found, no
//! existing bill, bill created, no attachment yet, attachment stored), so
//! its figure covers the whole exactly-once path: 4 HTTP calls through the
//! host capability with the contact id cached in kv (steady state).

use async_trait::async_trait;
use ledgerport::capabilities::connection::ConnectionInfo;
use ledgerport::capabilities::http::{
    HttpTransport, InboundResponse, OutboundRequest, StaticCredentials, TransportError,
};
use ledgerport::capabilities::kv::MemoryKv;
use ledgerport::capabilities::mapping::{AccountMapping, MappingScope, MemoryMappings};
use ledgerport::runtime::v0_1::ledgerport::connector::types::Delivery;
use ledgerport::runtime::{CallContext, Runtime, RuntimeConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Stub;

fn json(body: &str) -> InboundResponse {
    InboundResponse {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.as_bytes().to_vec(),
    }
}

#[async_trait]
impl HttpTransport for Stub {
    async fn send(
        &self,
        req: OutboundRequest,
        _max: u64,
        _timeout: Duration,
    ) -> Result<InboundResponse, TransportError> {
        let path = req.url.path();
        Ok(match (req.method, path) {
            ("GET", p) if p.ends_with("/Contacts") => json(
                r#"{"Contacts":[{"ContactID":"c0ffee00-0000-0000-0000-000000000001","ContactStatus":"ACTIVE"}]}"#,
            ),
            ("GET", p) if p.ends_with("/Invoices") => json(r#"{"Invoices":[]}"#),
            ("PUT", p) if p.ends_with("/Invoices") => json(
                r#"{"Invoices":[{"InvoiceID":"b111b111-0000-0000-0000-000000000001","Status":"AUTHORISED"}]}"#,
            ),
            ("GET", p) if p.ends_with("/Attachments") => json(r#"{"Attachments":[]}"#),
            ("PUT", _) => json(r#"{"Attachments":[{"AttachmentID":"a-1"}]}"#),
            _ => json(r#"{"id":"stub-1"}"#),
        })
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const KINDS: &[&str] = &[
    "gross-salary",
    "employer-social-contributions",
    "employee-benefits",
    "allowances-and-bonuses",
    "statutory-payments",
    "management-fee",
    "onboarding-fee",
    "fx-fee",
    "expense-reimbursement",
    "security-deposit",
];

fn main() {
    let plugins = root().join("target/plugins");
    let rt = Runtime::new(RuntimeConfig::default(), Arc::new(Stub)).expect("runtime");
    let bytes = std::fs::read(root().join("examples/documents/invoice.json")).unwrap();
    let doc = ledgerport::document::Document::from_json(&bytes)
        .unwrap()
        .to_wit()
        .unwrap();
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("| connector | calls | median µs | p99 µs | mean µs |");
    println!("|---|---|---|---|---|");
    for (id, label) in [
        ("minimal", "minimal (POST the document as JSON)"),
        (
            "xero",
            "xero (contact cached, look-up, create bill, attach PDF)",
        ),
    ] {
        let manifest = plugins.join(id).join("manifest.toml");
        if !manifest.exists() {
            eprintln!(
                "{} missing: run `cargo xtask wasm` first",
                manifest.display()
            );
            std::process::exit(2);
        }
        let plugin = rt.load(&manifest, &BTreeMap::new()).expect("load");
        let mappings = Arc::new(MemoryMappings::default());
        let scope = MappingScope {
            tenant_id: "acme".into(),
            connector_id: id.into(),
        };
        for k in KINDS {
            mappings.set(
                &scope,
                AccountMapping {
                    kind: k.to_string(),
                    account_code: "477".into(),
                    tax_type: None,
                },
            );
        }
        let ctx = CallContext {
            connection: ConnectionInfo {
                connection_id: "bench".into(),
                tenant_id: "acme".into(),
                external_tenant_id: Some("5b3ca1e0-0d1f-4c5e-9a11-000000000002".into()),
                ..Default::default()
            },
            credentials: Arc::new(StaticCredentials("t".into())),
            mappings,
            kv: Arc::new(MemoryKv::default()),
            rate: None,
        };
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
        println!(
            "| {label} | {} | {:.1} | {:.1} | {:.1} |",
            samples.len(),
            us(median),
            us(p99),
            mean
        );
    }
}
