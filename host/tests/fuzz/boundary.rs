//! The plugin boundary: the real Xero and minimal connectors (built by
//! `cargo xtask wasm`) in the real runtime, driven with arbitrary contract
//! documents and answered by a scripted transport with arbitrary provider
//! responses (random statuses, truncated, garbage or odd JSON bodies,
//! wrongly typed and huge fields, Retry-After garbage, transport failures).
//! A call never traps and never fails in the runtime; every outcome is a
//! receipt or a well-formed delivery error.

use crate::arb;
use async_trait::async_trait;
use ledgerport::capabilities::connection::ConnectionInfo;
use ledgerport::capabilities::http::{
    HttpTransport, InboundResponse, OutboundRequest, StaticCredentials, TransportError,
};
use ledgerport::capabilities::kv::{KvStore, MemoryKv};
use ledgerport::capabilities::mapping::{AccountMapping, MappingScope, MemoryMappings};
use ledgerport::runtime::v0_1::ledgerport::connector::types as wit;
use ledgerport::runtime::{CallContext, CallError, Plugin, Runtime, RuntimeConfig};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the scripted transport answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// As the provider would (a plausible success for that endpoint).
    Valid,
    /// A chosen status, headers and body.
    Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: BodyGen,
    },
    /// The transport fails.
    Fail(u8),
}

/// A response body, possibly derived from the valid one.
#[derive(Debug, Clone)]
pub enum BodyGen {
    /// The valid body.
    Valid,
    /// The valid body cut after this fraction (0-255 of 256).
    Truncated(u8),
    /// The valid body with one node replaced.
    Mutated(usize, Value),
    /// Any JSON, from the provider's vocabulary.
    Json(Value),
    /// Raw bytes.
    Bytes(Vec<u8>),
}

/// Field names the Xero connector reads, for odd-but-plausible bodies.
const VOCAB: &[&str] = &[
    "Contacts",
    "ContactID",
    "ContactStatus",
    "ContactNumber",
    "Name",
    "Invoices",
    "InvoiceID",
    "CreditNotes",
    "CreditNoteID",
    "Status",
    "Total",
    "Url",
    "AmountDue",
    "RemainingCredit",
    "Attachments",
    "AttachmentID",
    "FileName",
    "Allocations",
    "Accounts",
    "Code",
    "Type",
    "TaxType",
    "Description",
    "TaxRates",
    "EffectiveRate",
    "DisplayTaxRate",
    "CanApplyToExpenses",
    "Organisations",
    "BaseCurrency",
    "OrganisationType",
    "Message",
    "Detail",
    "ValidationErrors",
    "Elements",
    "LineItems",
    "id",
];

const ODD_JSON_TEXT: &[&str] = &[
    "1e999999",
    "-1e999999",
    "123456789012345678901234567890123456789012345678901234567890",
    "0.000000000000000000000000000000000000000001",
    "-0",
    "1E+2",
    "\"AUTHORISED\"",
    "\"\"",
    "null",
    "[]",
    "{}",
    "true",
    "\"\\ud800\"",
    "\"0.0000000000000000000000000001\"",
    "\"79228162514264337593543950335\"",
    "\"1234567890123456789012345678\"",
];

fn vocab_json(depth: u32) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        prop::sample::select(ODD_JSON_TEXT)
            .prop_map(|t| serde_json::from_str(t).unwrap_or(Value::Null)),
        arb::odd_string().prop_map(Value::String),
        any::<i64>().prop_map(|n| json!(n)),
        prop::sample::select(
            &[
                "ACTIVE",
                "ARCHIVED",
                "AUTHORISED",
                "PAID",
                "DRAFT",
                "SUBMITTED",
                "DELETED",
                "VOIDED",
                "EXPENSE"
            ][..]
        )
        .prop_map(|s| json!(s)),
        arb::amount_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(depth, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(VOCAB), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
    .boxed()
}

fn body_gen() -> impl Strategy<Value = BodyGen> {
    prop_oneof![
        2 => Just(BodyGen::Valid),
        2 => any::<u8>().prop_map(BodyGen::Truncated),
        4 => (any::<usize>(), vocab_json(3)).prop_map(|(at, v)| BodyGen::Mutated(at, v)),
        3 => vocab_json(4).prop_map(BodyGen::Json),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(BodyGen::Bytes),
        1 => (1usize..130, prop::sample::select(VOCAB)).prop_map(|(d, k)| {
            // Nesting past serde_json's recursion limit.
            BodyGen::Bytes(format!("{}1{}", format!("{{\"{k}\":[").repeat(d), "]}".repeat(d)).into_bytes())
        }),
    ]
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(
            &[
                "",
                "0",
                "1",
                "30",
                " 30 ",
                "-1",
                "1.5",
                "abc",
                "4294967295",
                "4294967296",
                "99999999999999999999",
                "Wed, 21 Oct 2015 07:28:00 GMT",
                "３０",
            ][..]
        )
        .prop_map(str::to_string),
        arb::odd_string(),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    let status = prop_oneof![
        6 => Just(200u16),
        4 => prop::sample::select(&[201u16, 204, 400, 401, 403, 404, 409, 429, 500, 502, 503, 504][..]),
        1 => 100u16..600,
    ];
    let headers = prop::collection::vec(
        (
            prop::sample::select(
                &[
                    "retry-after",
                    "x-rate-limit-problem",
                    "content-type",
                    "Retry-After",
                ][..],
            )
            .prop_map(str::to_string),
            header_value(),
        ),
        0..3,
    );
    prop_oneof![
        3 => Just(Reply::Valid),
        6 => (status, headers, body_gen()).prop_map(|(status, headers, body)| Reply::Answer { status, headers, body }),
        1 => (0u8..3).prop_map(Reply::Fail),
    ]
}

/// One request as the transport saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

/// The scripted transport: the i-th request gets the i-th reply of the
/// script (valid answers once the script is used up). It records requests.
struct Scripted {
    connector: &'static str,
    script: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
}

fn json_body(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

/// What Xero would answer, per endpoint.
fn xero_valid(method: &str, path: &str) -> Value {
    let segs: Vec<&str> = path
        .trim_start_matches("/api.xro/2.0/")
        .split('/')
        .collect();
    match (method, segs.as_slice()) {
        ("GET", ["Contacts"]) => {
            json!({"Contacts": [{"ContactID": "c0ffee00-0000-0000-0000-000000000001", "ContactStatus": "ACTIVE", "ContactNumber": "sup-1"}]})
        }
        ("PUT", ["Contacts"]) => {
            json!({"Contacts": [{"ContactID": "c0ffee00-0000-0000-0000-000000000002"}]})
        }
        ("GET", ["Invoices"]) => {
            json!({"Invoices": [{"InvoiceID": "b111b111-0000-0000-0000-000000000009", "Status": "AUTHORISED", "AmountDue": 100.00, "Total": "1.00", "Url": "https://x.example/#other"}]})
        }
        ("PUT", ["Invoices"]) => {
            json!({"Invoices": [{"InvoiceID": "b111b111-0000-0000-0000-000000000001", "Status": "AUTHORISED"}]})
        }
        ("GET", ["Invoices", id]) => {
            json!({"Invoices": [{"InvoiceID": id, "Status": "AUTHORISED"}]})
        }
        ("GET", ["CreditNotes"]) => json!({"CreditNotes": []}),
        ("PUT", ["CreditNotes"]) => {
            json!({"CreditNotes": [{"CreditNoteID": "c2c2c2c2-0000-0000-0000-000000000001", "Status": "AUTHORISED", "RemainingCredit": 50.00}]})
        }
        ("GET", ["CreditNotes", id]) => {
            json!({"CreditNotes": [{"CreditNoteID": id, "Status": "AUTHORISED", "RemainingCredit": 50.00}]})
        }
        ("PUT", ["CreditNotes", _, "Allocations"]) => json!({"Allocations": [{"Amount": 50.00}]}),
        ("GET", [_, _, "Attachments"]) => json!({"Attachments": []}),
        ("PUT", [_, _, "Attachments", _]) => json!({"Attachments": [{"AttachmentID": "a-1"}]}),
        ("GET", ["Accounts"]) => {
            json!({"Accounts": [{"Code": "477", "Name": "Wages", "Type": "EXPENSE", "Status": "ACTIVE"}]})
        }
        ("GET", ["TaxRates"]) => {
            json!({"TaxRates": [{"TaxType": "INPUT2", "Name": "GST", "Status": "ACTIVE", "EffectiveRate": 15.0}]})
        }
        ("GET", ["Organisation"]) => {
            json!({"Organisations": [{"Name": "Acme", "BaseCurrency": "NZD", "OrganisationType": "COMPANY"}]})
        }
        _ => json!({}),
    }
}

/// Replace the `at`-th node (in walk order) of `v` with `with`.
fn replace_node(v: &mut Value, at: usize, with: Value) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn walk(v: &mut Value, mut at: usize, with: Value) {
        if at == 0 {
            *v = with;
            return;
        }
        at -= 1;
        let children: Vec<&mut Value> = match v {
            Value::Array(a) => a.iter_mut().collect(),
            Value::Object(o) => o.values_mut().collect(),
            _ => return,
        };
        for c in children {
            let n = count(c);
            if at < n {
                return walk(c, at, with);
            }
            at -= n;
        }
    }
    let n = count(v);
    walk(v, at % n, with);
}

#[async_trait]
impl HttpTransport for Scripted {
    async fn send(
        &self,
        req: OutboundRequest,
        max: u64,
        _timeout: Duration,
    ) -> Result<InboundResponse, TransportError> {
        let path = req.url.path().to_string();
        self.seen.lock().unwrap().push(Seen {
            method: req.method.to_string(),
            path: path.clone(),
            headers: req.headers.clone(),
            body: req.body.clone(),
        });
        let valid = if self.connector == "xero" {
            xero_valid(req.method, &path)
        } else {
            json!({"id": "stub-1"})
        };
        let next = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Reply::Valid);
        let (status, headers, body) = match next {
            Reply::Valid => (200, vec![], json_body(valid)),
            Reply::Fail(0) => return Err(TransportError::Timeout),
            Reply::Fail(1) => return Err(TransportError::Connection("reset by peer".into())),
            Reply::Fail(_) => return Err(TransportError::TooLarge(max)),
            Reply::Answer {
                status,
                headers,
                body,
            } => {
                let body = match body {
                    BodyGen::Valid => json_body(valid),
                    BodyGen::Truncated(f) => {
                        let b = json_body(valid);
                        let n = b.len() * usize::from(f) / 256;
                        b[..n].to_vec()
                    }
                    BodyGen::Mutated(at, with) => {
                        let mut v = valid;
                        replace_node(&mut v, at, with);
                        json_body(v)
                    }
                    BodyGen::Json(v) => json_body(v),
                    BodyGen::Bytes(b) => b,
                };
                (status, headers, body)
            }
        };
        if body.len() as u64 > max {
            return Err(TransportError::TooLarge(max));
        }
        let mut headers: Vec<(String, String)> = headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        headers.push(("content-type".into(), "application/json".into()));
        Ok(InboundResponse {
            status,
            headers,
            body,
        })
    }
}

/// Amounts the connector should take: plain decimals of up to 4 places,
/// and a few at the edges of 28 digits.
fn plain_amount() -> BoxedStrategy<String> {
    prop_oneof![
        12 => (-1_000_000i64..10_000_000, 0u32..5)
            .prop_map(|(m, s)| rust_decimal::Decimal::new(m, s).to_string()),
        1 => prop::sample::select(
            &["0", "-0.00", "1234567890123456789012345678", "0.0001", "-9999999999999999999999999999"][..]
        )
        .prop_map(str::to_string),
    ]
    .boxed()
}

fn line(amount: BoxedStrategy<String>) -> impl Strategy<Value = wit::Line> {
    (
        prop_oneof![4 => prop::sample::select(arb::KINDS).prop_map(str::to_string), 1 => arb::odd_string()],
        prop_oneof![
            4 => arb::odd_string(),
            1 => prop::sample::select(vec![3990usize, 3999, 4000, 4001, 4003, 9000]).prop_flat_map(arb::long_unicode),
        ],
        (amount.clone(), amount.clone(), amount.clone(), amount),
        (prop::option::of(arb::odd_string()), prop::option::of(arb::odd_string())),
    )
        .prop_map(|(kind, description, (q, u, t, la), (employee, country))| wit::Line {
            kind,
            description,
            quantity: q,
            unit_amount: u,
            tax_amount: t,
            line_amount: la,
            employee,
            country,
        })
}

fn party() -> impl Strategy<Value = wit::Party> {
    (
        prop_oneof![3 => "sup-[0-9]{1,3}", 1 => arb::odd_string(), 1 => arb::long_unicode(60)],
        prop_oneof![3 => "[A-Za-z ]{1,20}", 1 => arb::odd_string(), 1 => arb::long_unicode(300)],
        prop::option::of(arb::odd_string()),
        prop::option::of(arb::odd_string()),
    )
        .prop_map(|(id, name, tax_number, email)| wit::Party {
            id,
            name,
            tax_number,
            email,
            address_lines: vec![],
            country: None,
        })
}

/// Any contract document: many lines, odd kinds, long Unicode, extreme
/// and malformed decimals, odd numbers, dates and PDFs.
fn document() -> BoxedStrategy<wit::Document> {
    prop_oneof![
        3 => document_with(plain_amount()),
        1 => document_with(arb::amount_text().boxed()),
    ]
    .boxed()
}

/// A document whose amounts come from `amount`.
fn document_with(amount: BoxedStrategy<String>) -> BoxedStrategy<wit::Document> {
    (
        (arb::odd_string(), any::<bool>(), prop_oneof![3 => "INV-[0-9]{1,4}".boxed(), 1 => arb::odd_string().boxed(), 1 => arb::long_unicode(256).boxed()]),
        (arb::date_text(), prop::option::of(arb::date_text()), arb::currency(), 0u8..3),
        (party(), party()),
        prop_oneof![
            4 => prop::collection::vec(line(amount.clone()), 0..6),
            1 => prop::collection::vec(line(amount.clone()), 0..60),
        ],
        (amount.clone(), amount.clone(), amount),
        (prop::option::of(arb::odd_string()), prop::option::of(arb::odd_string())),
        prop_oneof![
            Just(None),
            prop::collection::vec(any::<u8>(), 0..2048).prop_map(|b| Some(wit::Pdf::Bytes(b))),
            arb::odd_string().prop_map(|u| Some(wit::Pdf::Reference(u))),
        ],
    )
        .prop_map(
            |((id, credit, number), (issue, due, currency, basis), (supplier, customer), lines, (subtotal, total_tax, total), (url, credits), pdf)| {
                wit::Document {
                    id,
                    kind: if credit { wit::DocumentKind::CreditNote } else { wit::DocumentKind::Invoice },
                    number,
                    issue_date: issue,
                    due_date: due,
                    currency,
                    tax_basis: match basis {
                        0 => wit::TaxBasis::Exclusive,
                        1 => wit::TaxBasis::Inclusive,
                        _ => wit::TaxBasis::NoTax,
                    },
                    supplier,
                    customer,
                    lines,
                    subtotal,
                    total_tax,
                    total,
                    url,
                    credits_invoice_number: credits,
                    pdf,
                }
            },
        )
        .boxed()
}

/// Which export is called.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a test input, built once per case
enum Op {
    Deliver(wit::Document, String, u32),
    ListAccounts,
    Check,
}

/// The connection a call runs for.
#[derive(Debug, Clone)]
struct Conn {
    tenant: Option<String>,
    status: Option<String>,
    /// Whether each kind (by position in the document) is mapped.
    mapped: Vec<bool>,
    account: String,
    tax_type: Option<String>,
    cached_contact: Option<String>,
}

fn conn() -> impl Strategy<Value = Conn> {
    (
        prop_oneof![6 => Just(Some("5b3ca1e0-0d1f-4c5e-9a11-000000000002".to_string())), 1 => prop::option::of(arb::odd_string())],
        prop::option::of(prop_oneof![
            prop::sample::select(&["DRAFT", "authorised", "SUBMITTED", "VOIDED"][..]).prop_map(str::to_string),
            arb::odd_string()
        ]),
        prop_oneof![
            4 => Just(vec![true; 60]),
            1 => prop::collection::vec(prop::bool::weighted(0.7), 60),
        ],
        prop_oneof![3 => Just("477".to_string()), 1 => arb::odd_string()],
        prop::option::of(prop_oneof![Just("INPUT2".to_string()), arb::odd_string()]),
        prop::option::of(prop_oneof![Just("c0ffee00-0000-0000-0000-000000000001".to_string()), arb::odd_string()]),
    )
        .prop_map(|(tenant, status, mapped, account, tax_type, cached_contact)| Conn {
            tenant,
            status,
            mapped,
            account,
            tax_type,
            cached_contact,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (
            document(),
            prop_oneof![
                4 => "[a-f0-9-]{36}".boxed(),
                1 => arb::odd_string().boxed(),
                1 => arb::long_unicode(140).boxed(),
            ],
            any::<u32>(),
        )
            .prop_map(|(d, k, a)| Op::Deliver(d, k, a)),
        1 => Just(Op::ListAccounts),
        1 => Just(Op::Check),
    ]
}

/// A delivery of a document the platform would send: one ingest accepts,
/// in the contract's shape (most arbitrary documents are refused before a
/// request is made, so these are what reach the provider's answers).
fn platform_deliver() -> impl Strategy<Value = Op> {
    (arb::valid_document(), "[a-f0-9-]{36}", 1u32..6).prop_map(|(json, key, attempt)| {
        let doc = ledgerport::ingest::validate(&json, None)
            .expect("the generator's documents pass ingest")
            .to_wit()
            .expect("an ingested document converts");
        Op::Deliver(doc, key, attempt)
    })
}

/// A connection set up as an admin would: the organisation chosen, every
/// kind mapped to an account Xero has.
fn sound_conn() -> impl Strategy<Value = Conn> {
    (
        prop::option::of(Just("INPUT2".to_string())),
        prop::option::of(Just("c0ffee00-0000-0000-0000-000000000001".to_string())),
    )
        .prop_map(|(tax_type, cached_contact)| Conn {
            tenant: Some("5b3ca1e0-0d1f-4c5e-9a11-000000000002".to_string()),
            status: None,
            mapped: vec![true; 60],
            account: "477".to_string(),
            tax_type,
            cached_contact,
        })
}

/// A loaded connector with its transport.
struct Harness {
    id: &'static str,
    rt: Runtime,
    plugin: Plugin,
    transport: Arc<Scripted>,
    tokio: tokio::runtime::Runtime,
}

fn plugin_manifest(id: &str) -> PathBuf {
    let p = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("plugins")
        .join(id)
        .join("manifest.toml");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask wasm`",
        p.display()
    );
    p
}

impl Harness {
    fn new(id: &'static str) -> Self {
        let transport = Arc::new(Scripted {
            connector: id,
            script: Mutex::new(VecDeque::new()),
            seen: Mutex::new(Vec::new()),
        });
        let rt = Runtime::new(RuntimeConfig::default(), transport.clone()).unwrap();
        let plugin = rt.load(&plugin_manifest(id), &BTreeMap::new()).unwrap();
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Self {
            id,
            rt,
            plugin,
            transport,
            tokio,
        }
    }

    /// One call with a fresh script, kv and mappings.
    fn call(&self, op: &Op, conn: &Conn, script: Vec<Reply>) -> Outcome {
        *self.transport.script.lock().unwrap() = script.into();
        self.transport.seen.lock().unwrap().clear();
        let mappings = Arc::new(MemoryMappings::default());
        let scope = MappingScope {
            tenant_id: "acme".into(),
            connector_id: self.id.into(),
        };
        if let Op::Deliver(doc, ..) = op {
            for (l, mapped) in doc.lines.iter().zip(&conn.mapped) {
                if *mapped {
                    mappings.set(
                        &scope,
                        AccountMapping {
                            kind: l.kind.clone(),
                            account_code: conn.account.clone(),
                            tax_type: conn.tax_type.clone(),
                        },
                    );
                }
            }
        }
        let kv = Arc::new(MemoryKv::default());
        let mut settings = BTreeMap::new();
        if let Some(s) = &conn.status {
            settings.insert("status".to_string(), s.clone());
            settings.insert("endpoint".to_string(), s.clone());
        }
        let ctx = CallContext {
            connection: ConnectionInfo {
                connection_id: "fuzz".into(),
                tenant_id: "acme".into(),
                external_tenant_id: conn.tenant.clone(),
                external_tenant_name: Some("Acme".into()),
                settings,
            },
            credentials: Arc::new(StaticCredentials("t".into())),
            mappings,
            kv: kv.clone(),
            rate: None,
        };
        self.tokio.block_on(async {
            if let (Some(c), Op::Deliver(doc, ..)) = (&conn.cached_contact, op) {
                let _ = kv
                    .set(
                        "fuzz",
                        &format!("contact:{}", doc.supplier.id),
                        c.as_bytes(),
                    )
                    .await;
            }
            match op {
                Op::Deliver(doc, key, attempt) => Outcome::Deliver(
                    self.rt
                        .deliver(
                            &self.plugin,
                            &ctx,
                            wit::Delivery {
                                key: key.clone(),
                                attempt: *attempt,
                            },
                            doc.clone(),
                        )
                        .await,
                ),
                Op::ListAccounts => {
                    Outcome::Accounts(self.rt.list_accounts(&self.plugin, &ctx).await)
                }
                Op::Check => Outcome::Check(self.rt.check(&self.plugin, &ctx).await),
            }
        })
    }

    fn requests(&self) -> Vec<Seen> {
        self.transport.seen.lock().unwrap().clone()
    }
}

#[derive(Debug)]
enum Outcome {
    Deliver(Result<Result<wit::Receipt, wit::DeliveryError>, CallError>),
    Accounts(Result<Result<wit::AccountList, wit::DeliveryError>, CallError>),
    Check(Result<Result<wit::CheckReport, wit::DeliveryError>, CallError>),
}

/// A short name of an outcome, for the coverage summary.
fn label(out: &Outcome) -> String {
    let err = |e: &wit::DeliveryError| match e {
        wit::DeliveryError::Rejected(_) => "rejected",
        wit::DeliveryError::NeedsMapping(_) => "needs-mapping",
        wit::DeliveryError::NeedsReauth(_) => "needs-reauth",
        wit::DeliveryError::RateLimited(_) => "rate-limited",
        wit::DeliveryError::Transient(_) => "transient",
    };
    match out {
        Outcome::Deliver(Ok(Ok(r))) if !r.notes.is_empty() => "deliver: receipt with notes".into(),
        Outcome::Deliver(Ok(Ok(_))) => "deliver: receipt".into(),
        Outcome::Deliver(Ok(Err(e))) => format!("deliver: {}", err(e)),
        Outcome::Accounts(Ok(Ok(_))) => "list-accounts: ok".into(),
        Outcome::Accounts(Ok(Err(e))) => format!("list-accounts: {}", err(e)),
        Outcome::Check(Ok(Ok(_))) => "check: ok".into(),
        Outcome::Check(Ok(Err(e))) => format!("check: {}", err(e)),
        _ => "runtime error".into(),
    }
}

/// A delivery error an admin can act on: non-empty lists and words.
fn check_error(e: &wit::DeliveryError, doc: Option<&wit::Document>) -> Result<(), TestCaseError> {
    match e {
        wit::DeliveryError::Rejected(fields) => {
            prop_assert!(!fields.is_empty(), "rejected without a field");
            for f in fields {
                prop_assert!(!f.field.trim().is_empty(), "rejected: no field in {f:?}");
                prop_assert!(
                    !f.message.trim().is_empty(),
                    "rejected: no message in {f:?}"
                );
            }
        }
        wit::DeliveryError::NeedsMapping(kinds) => {
            prop_assert!(!kinds.is_empty(), "needs-mapping without kinds");
            let mut sorted = kinds.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(&sorted, kinds, "kinds not sorted or repeated");
            if let Some(doc) = doc {
                for k in kinds {
                    prop_assert!(
                        doc.lines.iter().any(|l| &l.kind == k),
                        "{k:?} is no line's kind"
                    );
                }
            }
        }
        wit::DeliveryError::NeedsReauth(m) | wit::DeliveryError::Transient(m) => {
            prop_assert!(!m.trim().is_empty(), "{e:?} without words")
        }
        wit::DeliveryError::RateLimited(r) => {
            prop_assert!(!r.limit.is_empty(), "rate-limited without the limit")
        }
    }
    Ok(())
}

fn check_outcome(h: &Harness, op: &Op, conn: &Conn, out: Outcome) -> Result<(), TestCaseError> {
    let doc = match op {
        Op::Deliver(d, ..) => Some(d),
        _ => None,
    };
    match out {
        Outcome::Deliver(Err(e)) | Outcome::Accounts(Err(e)) | Outcome::Check(Err(e)) => {
            prop_assert!(false, "the call failed in the runtime ({}): {e}", e.kind());
        }
        Outcome::Deliver(Ok(Ok(r))) => {
            // (The minimal connector falls back to the delivery key.)
            let key_empty = matches!(op, Op::Deliver(_, k, _) if k.is_empty());
            prop_assert!(
                !r.external_id.is_empty() || (h.id == "minimal" && key_empty),
                "receipt without an id: {r:?}"
            );
            if h.id == "xero" {
                prop_assert!(
                    r.external_url
                        .as_deref()
                        .is_some_and(|u| u.starts_with("https://go.xero.com/"))
                );
            }
        }
        Outcome::Deliver(Ok(Err(e))) => check_error(&e, doc)?,
        Outcome::Accounts(Ok(Ok(list))) => {
            for a in &list.accounts {
                prop_assert!(!a.code.is_empty(), "account without a code");
            }
        }
        Outcome::Accounts(Ok(Err(e))) | Outcome::Check(Ok(Err(e))) => check_error(&e, None)?,
        Outcome::Check(Ok(Ok(_))) => {}
    }
    // Xero: every unmapped kind is named before anything is sent.
    if h.id == "xero"
        && let Some(doc) = doc
    {
        let mapped: Vec<&String> = doc
            .lines
            .iter()
            .zip(&conn.mapped)
            .filter(|(_, m)| **m)
            .map(|(l, _)| &l.kind)
            .collect();
        let unmapped = doc.lines.iter().any(|l| !mapped.contains(&&l.kind));
        if unmapped {
            prop_assert!(h.requests().is_empty(), "sent requests with unmapped kinds");
        }
    }
    Ok(())
}

fn run(id: &'static str, cases: u32) {
    // proptest's value trees for these nested strategies need more than a
    // test thread's 2 MiB of stack in a debug build.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || {
            let h = Harness::new(id);
            let seen = std::cell::RefCell::new(BTreeMap::new());
            // Arbitrary calls; the platform's documents on a sound
            // connection with arbitrary answers (the provider's side of
            // the boundary); and some of those answered as the provider
            // would, so that every run reaches receipts by design rather
            // than by the luck of its seed (a run of 512 arbitrary cases
            // once reached none).
            let strategy = prop_oneof![
                6 => (op(), conn(), prop::collection::vec(reply(), 0..10)),
                3 => (platform_deliver(), sound_conn(), prop::collection::vec(reply(), 0..10)),
                1 => (platform_deliver(), sound_conn(), Just(Vec::new())),
            ];
            let config = arb::config(cases);
            let run_cases = config.cases;
            TestRunner::new(config)
                .run(&strategy, |(op, conn, script)| {
                    let out = h.call(&op, &conn, script);
                    *seen.borrow_mut().entry(label(&out)).or_insert(0u32) += 1;
                    check_outcome(&h, &op, &conn, out)
                })
                .unwrap();
            // Which outcomes the run reached (shown with --no-capture).
            let seen = seen.into_inner();
            eprintln!("{id}: {seen:?}");
            // A harness that only ever ended one way (every call refused,
            // say) would pass the properties without testing much: a run
            // of some size reaches receipts and several kinds of refusal.
            if run_cases >= 200 {
                assert!(
                    seen.keys().any(|l| l.starts_with("deliver: receipt")),
                    "{id}: no delivery succeeded in {run_cases} cases: {seen:?}"
                );
                assert!(
                    seen.keys().filter(|l| l.starts_with("deliver: ")).count() >= 3,
                    "{id}: too few kinds of delivery outcome: {seen:?}"
                );
                assert!(!seen.contains_key("runtime error"), "{id}: {seen:?}");
            }
        })
        .unwrap()
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

#[test]
fn xero_connector_never_traps_on_any_document_or_response() {
    run("xero", 512);
}

#[test]
fn minimal_connector_never_traps_on_any_document_or_response() {
    run("minimal", 256);
}

// Regression cases found by the properties above.

fn sample_doc() -> wit::Document {
    sample("invoice.json")
}

fn sample(file: &str) -> wit::Document {
    let bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/documents")
            .join(file),
    )
    .unwrap();
    ledgerport::document::Document::from_json(&bytes)
        .unwrap()
        .to_wit()
        .unwrap()
}

fn all_mapped() -> Conn {
    Conn {
        tenant: Some("5b3ca1e0-0d1f-4c5e-9a11-000000000002".into()),
        status: None,
        mapped: vec![true; 60],
        account: "477".into(),
        tax_type: None,
        cached_contact: None,
    }
}

/// The Xero connector cut a delivery key over 128 bytes inside a
/// multi-byte character for its Idempotency-Key and panicked (trap).
#[test]
fn regression_xero_long_unicode_delivery_key_does_not_trap() {
    let h = Harness::new("xero");
    let key = "中".repeat(50);
    let op = Op::Deliver(sample_doc(), key.clone(), 1);
    let out = h.call(&op, &all_mapped(), vec![]);
    assert!(matches!(&out, Outcome::Deliver(Ok(Ok(_)))), "{out:?}");
    let create = h
        .requests()
        .into_iter()
        .find(|r| r.method == "PUT" && r.path.ends_with("/Invoices"))
        .expect("the bill was created");
    let idem = create
        .headers
        .iter()
        .find(|(k, _)| k == "idempotency-key")
        .map(|(_, v)| v.clone())
        .unwrap();
    // The key's tail: the delivery key's end, `-create-`, the body's digest.
    let (head, digest) = idem.rsplit_once("-create-").expect("a create key");
    assert!(
        idem.len() <= 128
            && head.ends_with('中')
            && digest.len() == 16
            && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{idem}"
    );
    assert!(format!("{key}-create-{digest}").ends_with(&idem));
}

/// The minimal connector returned a receipt with an empty external id when
/// the endpoint answered `{"id": ""}`.
#[test]
fn regression_minimal_empty_id_falls_back_to_the_delivery_key() {
    let h = Harness::new("minimal");
    let op = Op::Deliver(sample_doc(), "delivery-1".into(), 1);
    let script = vec![Reply::Answer {
        status: 200,
        headers: vec![],
        body: BodyGen::Json(json!({"id": ""})),
    }];
    match h.call(&op, &all_mapped(), script) {
        Outcome::Deliver(Ok(Ok(r))) => assert_eq!(r.external_id, "delivery-1"),
        other => panic!("{other:?}"),
    }
}

/// The Xero connector compares amounts by rescaling to a common scale in
/// i128; with 28 digits on one side and 28 decimals on the other that
/// overflowed (wrapped in the wasm build), so a tiny remaining credit could
/// look larger than a huge amount due and the allocation took the wrong one.
#[test]
fn regression_xero_compares_amounts_of_extreme_scales_exactly() {
    let h = Harness::new("xero");
    let op = Op::Deliver(sample("credit-note.json"), "cn-1".into(), 1);
    let answer = |v: Value| Reply::Answer {
        status: 200,
        headers: vec![],
        body: BodyGen::Json(v),
    };
    // Contact look-up, existing credit notes, create, the history note
    // naming the bill: as Xero would; then the credit note read again, and
    // the bill it credits.
    let script = vec![
        Reply::Valid,
        Reply::Valid,
        Reply::Valid,
        Reply::Valid,
        answer(
            json!({"CreditNotes": [{"CreditNoteID": "c2", "Status": "AUTHORISED",
            "RemainingCredit": "1.000000000000000000000000001"}]}),
        ),
        answer(
            json!({"Invoices": [{"InvoiceID": "b1", "Status": "AUTHORISED",
            "AmountDue": "4531102612324095290565716222"}]}),
        ),
    ];
    let out = h.call(&op, &all_mapped(), script);
    let Outcome::Deliver(Ok(Ok(receipt))) = &out else {
        panic!("{out:?}");
    };
    assert_eq!(
        receipt.notes,
        vec!["the credit was allocated to bill INV-2026-0042".to_string()]
    );
    let alloc = h
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/Allocations"))
        .expect("allocated");
    let body: Value = serde_json::from_slice(&alloc.body.unwrap()).unwrap();
    assert_eq!(
        body["Allocations"][0]["Amount"].to_string(),
        "1.000000000000000000000000001"
    );
}

/// A 429 whose `X-Rate-Limit-Problem` header was empty gave a rate-limit
/// outcome that did not say which limit.
#[test]
fn regression_xero_429_with_an_empty_limit_header_names_one() {
    let h = Harness::new("xero");
    let script = vec![Reply::Answer {
        status: 429,
        headers: vec![
            ("x-rate-limit-problem".into(), " ".into()),
            ("retry-after".into(), "garbage".into()),
        ],
        body: BodyGen::Bytes(vec![]),
    }];
    match h.call(&Op::Check, &all_mapped(), script) {
        Outcome::Check(Ok(Err(wit::DeliveryError::RateLimited(r)))) => {
            assert_eq!((r.retry_after_seconds, r.limit.as_str()), (60, "unknown"))
        }
        other => panic!("{other:?}"),
    }
}
