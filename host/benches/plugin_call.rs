//! Benchmark: the cost of one connector call — fresh store + instantiate +
//! `deliver` of the 10-line sample invoice — with a stub HTTP transport, so
//! only the runtime and the guest's translation are measured.
//!
//! Run: `cargo xtask wasm && cargo bench -p ledgerport --bench plugin_call`.
//! Prints median, p99 and mean per connector. `BENCH_ITERATIONS` sets the
//! number of measured calls (default 20000: on this shared 2-core machine a
//! 5,000-call median moved by several µs from run to run).
//! `BENCH_ONLY=minimal` (or `xero`) measures one connector, e.g. for `perf`
//! with `LEDGERPORT_PERFMAP=1` (names the guest functions).
//! `BENCH_COMPARE=<plugins dir>` also loads each of the two connectors
//! from another installed plugin directory (another build of it: other
//! optimisation settings, another SDK) and alternates the two call by call, so both
//! rows see the same machine: on this shared VM the speed moves by half
//! within minutes, which swamps a comparison of separate runs.
//!
//! Each connector is also measured natively: the same crate compiled for
//! this machine, its `deliver` called directly with the SDK's native host
//! stand-in answering exactly like the stub transport. The ratio (sandboxed
//! over native median) is what the sandbox costs (issue B1: goal ≤ 3×).
//! Native and sandboxed calls alternate, so the ratio holds still while the
//! machine's speed moves.
//!
//! The stub answers like Xero for the Xero connector (contact found, no
//! existing bill, bill created, no attachment yet, attachment stored), so
//! its figure covers the whole exactly-once path: 3 HTTP calls through the
//! host capability (look-up, create, attach; a bill created by the call
//! needs no attachment look-up) with the contact id and the organisation's
//! short code (for the link to the bill) cached in kv (steady state).

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

/// mimalloc instead of glibc malloc: a connector call allocates and frees
/// many small strings (lowering, capability records); glibc's malloc and
/// free were 12 % of a call in the B1 profile, mimalloc's are 6 %. Built
/// without transparent huge pages (`no_thp`): with them an idle daemon held
/// 109 MiB instead of 50 (B5), and freed pages came back as 2 MiB pages
/// zeroed by the kernel.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Stub;

fn json(body: &str) -> InboundResponse {
    InboundResponse {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.as_bytes().to_vec(),
    }
}

/// What the stub answers, by method and path (shared by the sandboxed and
/// the native runs, so both do the same work).
fn answer(method: &str, path: &str) -> &'static str {
    match (method, path) {
        ("GET", p) if p.ends_with("/Contacts") => {
            r#"{"Contacts":[{"ContactID":"c0ffee00-0000-0000-0000-000000000001","ContactStatus":"ACTIVE"}]}"#
        }
        ("GET", p) if p.ends_with("/Invoices") => r#"{"Invoices":[]}"#,
        ("GET", p) if p.ends_with("/Organisation") => {
            r#"{"Organisations":[{"Name":"Stub Ltd","ShortCode":"!stub1"}]}"#
        }
        ("PUT", p) if p.ends_with("/Invoices") => {
            r#"{"Invoices":[{"InvoiceID":"b111b111-0000-0000-0000-000000000001","Status":"AUTHORISED"}]}"#
        }
        ("GET", p) if p.ends_with("/Attachments") => r#"{"Attachments":[]}"#,
        ("PUT", _) => r#"{"Attachments":[{"AttachmentID":"a-1"}]}"#,
        _ => r#"{"id":"stub-1"}"#,
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
        Ok(json(answer(req.method, req.url.path())))
    }
}

/// The same connectors compiled natively, against the SDK's host stand-in.
mod native {
    use ledgerport::runtime::v0_1::ledgerport::connector::types as host;
    use ledgerport_sdk::native::{AccountMapping, ConnectionInfo, Error, Host, Request, Response};
    use ledgerport_sdk::{Connector, Delivery, Document, DocumentKind, Line, Party, Pdf, TaxBasis};
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    struct StubHost {
        mappings: Vec<AccountMapping>,
        kv: HashMap<String, Vec<u8>>,
    }

    impl Host for StubHost {
        fn send(&mut self, req: &Request) -> Result<Response, Error> {
            let method = req.method.as_str();
            let path = req.url.split('?').next().unwrap_or_default();
            Ok(Response {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
                body: super::answer(method, path).as_bytes().to_vec(),
            })
        }
        fn mappings(&mut self) -> Vec<AccountMapping> {
            self.mappings.clone()
        }
        fn kv_get(&mut self, key: &str) -> Option<Vec<u8>> {
            self.kv.get(key).cloned()
        }
        fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
            self.kv.insert(key.into(), value.to_vec());
            Ok(())
        }
        fn connection(&mut self) -> ConnectionInfo {
            ConnectionInfo {
                connection_id: "bench".into(),
                tenant_id: "acme".into(),
                external_tenant_id: Some("5b3ca1e0-0d1f-4c5e-9a11-000000000002".into()),
                external_tenant_name: None,
                settings: Vec::new(),
            }
        }
    }

    fn party(p: &host::Party) -> Party {
        Party {
            id: p.id.clone(),
            name: p.name.clone(),
            tax_number: p.tax_number.clone(),
            email: p.email.clone(),
            address_lines: p.address_lines.clone(),
            country: p.country.clone(),
        }
    }

    /// The host's document in the guest SDK's types.
    fn document(d: &host::Document) -> Document {
        Document {
            id: d.id.clone(),
            kind: match d.kind {
                host::DocumentKind::Invoice => DocumentKind::Invoice,
                host::DocumentKind::CreditNote => DocumentKind::CreditNote,
            },
            number: d.number.clone(),
            issue_date: d.issue_date.clone(),
            due_date: d.due_date.clone(),
            currency: d.currency.clone(),
            tax_basis: match d.tax_basis {
                host::TaxBasis::Exclusive => TaxBasis::Exclusive,
                host::TaxBasis::Inclusive => TaxBasis::Inclusive,
                host::TaxBasis::NoTax => TaxBasis::NoTax,
            },
            supplier: party(&d.supplier),
            customer: party(&d.customer),
            lines: d
                .lines
                .iter()
                .map(|l| Line {
                    kind: l.kind.clone(),
                    description: l.description.clone(),
                    quantity: l.quantity.clone(),
                    unit_amount: l.unit_amount.clone(),
                    tax_amount: l.tax_amount.clone(),
                    line_amount: l.line_amount.clone(),
                    employee: l.employee.clone(),
                    country: l.country.clone(),
                })
                .collect(),
            subtotal: d.subtotal.clone(),
            total_tax: d.total_tax.clone(),
            total: d.total.clone(),
            url: d.url.clone(),
            credits_invoice_number: d.credits_invoice_number.clone(),
            pdf: d.pdf.as_ref().map(|p| match p {
                host::Pdf::Bytes(b) => Pdf::Bytes(b.clone()),
                host::Pdf::Reference(r) => Pdf::Reference(r.clone()),
            }),
        }
    }

    /// Runs `body` with a `call` that times one native `deliver` of
    /// connector `id` (call `i` gets delivery key `k{i}`), so the native
    /// calls can be interleaved with the sandboxed ones: both then see the
    /// same machine, and the ratio does not move with its speed.
    pub fn interleaved<R>(
        id: &str,
        doc: &host::Document,
        kinds: &[&str],
        body: impl FnOnce(&mut dyn FnMut(usize) -> Duration) -> R,
    ) -> R {
        let doc = document(doc);
        let stub = StubHost {
            mappings: kinds
                .iter()
                .map(|k| AccountMapping {
                    kind: k.to_string(),
                    account_code: "477".into(),
                    tax_type: None,
                })
                .collect(),
            kv: HashMap::new(),
        };
        let deliver: fn(
            Delivery,
            Document,
        ) -> Result<ledgerport_sdk::Receipt, ledgerport_sdk::DeliveryError> = match id {
            "xero" => xero_connector::Xero::deliver,
            _ => minimal_connector::Minimal::deliver,
        };
        let (out, _) = ledgerport_sdk::native::with_host(stub, || {
            let mut call = |i: usize| {
                let d = Delivery {
                    key: format!("k{i}"),
                    attempt: 1,
                };
                let doc = doc.clone();
                let t = Instant::now();
                let r = deliver(d, doc);
                let el = t.elapsed();
                assert!(r.is_ok(), "{r:?}");
                el
            };
            body(&mut call)
        });
        out
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
        .unwrap_or(20000);
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| connector | calls | median µs | p99 µs | mean µs | native median µs | sandboxed / native |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (id, label) in [
        ("minimal", "minimal (POST the document as JSON)"),
        (
            "xero",
            "xero (contact cached, look-up, create bill, attach PDF)",
        ),
    ] {
        if std::env::var("BENCH_ONLY").is_ok_and(|only| only != id) {
            continue;
        }
        let manifest = plugins.join(id).join("manifest.toml");
        if !manifest.exists() {
            eprintln!(
                "{} missing: run `cargo xtask wasm` first",
                manifest.display()
            );
            std::process::exit(2);
        }
        let mut variants = vec![(
            label.to_string(),
            rt.load(&manifest, &BTreeMap::new()).expect("load"),
        )];
        if let Ok(other) = std::env::var("BENCH_COMPARE") {
            let m = Path::new(&other).join(id).join("manifest.toml");
            let plugin = rt
                .load(&m, &BTreeMap::new())
                .expect("load the compared build");
            variants.push((format!("{label}, {}", m.display()), plugin));
        }
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
        let mut samples: Vec<Vec<Duration>> = variants
            .iter()
            .map(|_| Vec::with_capacity(iterations))
            .collect();
        let describe = std::env::var("BENCH_DESCRIBE").is_ok();
        let mut native = Vec::with_capacity(iterations);
        native::interleaved(id, &doc, KINDS, |native_call| {
            for i in 0..(iterations + 500) {
                let el = native_call(i);
                if i >= 500 {
                    native.push(el);
                }
                // The builds take turns going first, so neither always
                // follows the same code (a self-comparison, one build
                // against itself, agreed within 0.2 % either way).
                for k in 0..variants.len() {
                    let v = if i % 2 == 0 {
                        k
                    } else {
                        variants.len() - 1 - k
                    };
                    let plugin = &variants[v].1;
                    let d = Delivery {
                        key: format!("k{i}"),
                        attempt: 1,
                    };
                    let doc = doc.clone();
                    let el = tokio.block_on(async {
                        let t = Instant::now();
                        if describe {
                            let r = rt.describe(plugin, &ctx).await;
                            assert!(r.is_ok());
                            let _ = (d, doc);
                        } else {
                            let r = rt.deliver(plugin, &ctx, d, doc).await;
                            assert!(matches!(r, Ok(Ok(_))), "{r:?}");
                        }
                        t.elapsed()
                    });
                    if i >= 500 {
                        samples[v].push(el);
                    }
                }
            }
        });
        native.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let native_median = us(native[native.len() / 2]);
        for ((label, _), mut samples) in variants.into_iter().zip(samples) {
            samples.sort();
            let median = us(samples[samples.len() / 2]);
            let p99 = us(samples[samples.len() * 99 / 100]);
            let mean: f64 = samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64;
            // `describe` against a native `deliver` is no ratio.
            let ratio = if describe {
                "-".to_string()
            } else {
                format!("{:.1}×", median / native_median.max(0.001))
            };
            println!(
                "| {label} | {} | {median:.1} | {p99:.1} | {mean:.1} | {native_median:.1} | {ratio} |",
                samples.len(),
            );
        }
    }
}
