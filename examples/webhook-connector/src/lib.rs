//! A generic JSON webhook connector, and the proof that the contract is not
//! Xero-shaped: it POSTs each document as a stable JSON rendering (every
//! line with the account its kind is mapped to) to one endpoint, signed with
//! HMAC-SHA256 the way Stripe signs its webhooks.
//!
//! Connection settings:
//! - `endpoint`: where to POST, a full URL on an allowed host or a path on
//!   `https://hooks.example.com` (default `/ledgerport`).
//! - `signing_secret`: the shared secret both sides sign with (at least 16
//!   characters). It is a connector *setting*, visible to this connector,
//!   unlike OAuth tokens, which never enter a guest: see README.md.
//!
//! Every request carries
//! - `X-Ledgerport-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//! - `X-Ledgerport-Delivery: <delivery key>`, the same on every retry, so the
//!   receiver can drop duplicates (the key is also inside the signed body).
//!
//! Outcomes: 2xx → delivered (the receiver's `id` when it sends one); 409 →
//! delivered (the receiver already had this delivery); 401/403 → needs
//! re-authorisation (the receiver refused the signature); 429 → rate limited
//! with `Retry-After`; any other 4xx → rejected, naming the fields of a JSON
//! error body when there is one; 408, 5xx, timeouts and resets → transient.
//! Unmapped line kinds → needs-mapping naming all of them, before anything
//! is sent.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use ledgerport_sdk::mapping::AccountMapping;
use ledgerport_sdk::{
    AccountList, CheckReport, Connector, ConnectorInfo, Delivery, DeliveryError, Document,
    DocumentKind, FieldError, Party, Pdf, Receipt, TaxBasis, connection, errors, http, mapping,
};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;
use std::collections::BTreeMap;

/// The canonical origin of the receiver (moved by the operator's `base_urls`).
const DEFAULT_ORIGIN: &str = "https://hooks.example.com";
/// Where documents go when the connection names no endpoint.
const DEFAULT_ENDPOINT: &str = "https://hooks.example.com/ledgerport";
/// The shortest signing secret accepted.
const MIN_SECRET_CHARS: usize = 16;
/// What the body announces.
const EVENT: &str = "document.issued";

/// The connector (public so a native build, as `cargo test --workspace`
/// makes one, sees it used: only the wasm build exports it).
pub struct Webhook;

/// The connection's settings, checked.
struct Settings {
    endpoint: String,
    secret: String,
}

fn settings() -> Result<Settings, DeliveryError> {
    let info = connection::info();
    let endpoint = match connection::setting(&info, "endpoint") {
        None => DEFAULT_ENDPOINT.to_string(),
        Some(e) if e.trim().is_empty() => DEFAULT_ENDPOINT.to_string(),
        Some(e) if e.starts_with('/') => format!("{DEFAULT_ORIGIN}{e}"),
        Some(e) => e,
    };
    let secret = connection::setting(&info, "signing_secret").unwrap_or_default();
    if secret.chars().count() < MIN_SECRET_CHARS {
        // A configuration problem of the whole connection, not of one
        // document: pause until an admin sets it, then resume.
        return Err(errors::needs_reauth(format!(
            "the webhook connection has no usable signing secret: set the connection setting \
             `signing_secret` (at least {MIN_SECRET_CHARS} characters) to the secret the receiver verifies with"
        )));
    }
    Ok(Settings { endpoint, secret })
}

/// The `X-Ledgerport-Signature` value for `body` sent at `timestamp`:
/// `t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> Option<String> {
    // HMAC takes keys of any length; the error case cannot happen.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).ok()?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    ))
}

/// Seconds since the Unix epoch (WASI's wall clock).
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A party as sent.
#[derive(Serialize)]
struct PartyOut<'a> {
    id: &'a str,
    name: &'a str,
    tax_number: Option<&'a str>,
    email: Option<&'a str>,
    address_lines: &'a [String],
    country: Option<&'a str>,
}

impl<'a> PartyOut<'a> {
    fn new(p: &'a Party) -> Self {
        Self {
            id: &p.id,
            name: &p.name,
            tax_number: p.tax_number.as_deref(),
            email: p.email.as_deref(),
            address_lines: &p.address_lines,
            country: p.country.as_deref(),
        }
    }
}

/// One line as sent, with the account its kind is mapped to.
#[derive(Serialize)]
struct LineOut<'a> {
    kind: &'a str,
    description: &'a str,
    quantity: &'a str,
    unit_amount: &'a str,
    tax_amount: &'a str,
    line_amount: &'a str,
    employee: Option<&'a str>,
    country: Option<&'a str>,
    account_code: &'a str,
    tax_type: Option<&'a str>,
}

/// The PDF as sent: a link, or the bytes in base64.
#[derive(Serialize)]
struct PdfOut<'a> {
    url: Option<&'a str>,
    base64: Option<String>,
}

/// The document as sent. Field order is fixed and every field is always
/// present (`null` when absent), so the same document renders to the same
/// bytes on every retry.
#[derive(Serialize)]
struct DocumentOut<'a> {
    id: &'a str,
    kind: &'static str,
    number: &'a str,
    issue_date: &'a str,
    due_date: Option<&'a str>,
    currency: &'a str,
    tax_basis: &'static str,
    supplier: PartyOut<'a>,
    customer: PartyOut<'a>,
    lines: Vec<LineOut<'a>>,
    subtotal: &'a str,
    total_tax: &'a str,
    total: &'a str,
    url: Option<&'a str>,
    credits_invoice_number: Option<&'a str>,
    pdf: Option<PdfOut<'a>>,
}

/// The envelope: what happened, the delivery key (signed, for
/// de-duplication) and the document.
#[derive(Serialize)]
struct Envelope<'a> {
    event: &'static str,
    delivery_key: &'a str,
    document: DocumentOut<'a>,
}

fn render(
    delivery: &Delivery,
    doc: &Document,
    accounts: &BTreeMap<String, AccountMapping>,
) -> Result<Vec<u8>, DeliveryError> {
    let lines = doc
        .lines
        .iter()
        .map(|l| {
            let m = accounts.get(&l.kind);
            LineOut {
                kind: &l.kind,
                description: &l.description,
                quantity: &l.quantity,
                unit_amount: &l.unit_amount,
                tax_amount: &l.tax_amount,
                line_amount: &l.line_amount,
                employee: l.employee.as_deref(),
                country: l.country.as_deref(),
                account_code: m.map(|m| m.account_code.as_str()).unwrap_or_default(),
                tax_type: m.and_then(|m| m.tax_type.as_deref()),
            }
        })
        .collect();
    let envelope = Envelope {
        event: EVENT,
        delivery_key: &delivery.key,
        document: DocumentOut {
            id: &doc.id,
            kind: match doc.kind {
                DocumentKind::Invoice => "invoice",
                DocumentKind::CreditNote => "credit-note",
            },
            number: &doc.number,
            issue_date: &doc.issue_date,
            due_date: doc.due_date.as_deref(),
            currency: &doc.currency,
            tax_basis: match doc.tax_basis {
                TaxBasis::Exclusive => "exclusive",
                TaxBasis::Inclusive => "inclusive",
                TaxBasis::NoTax => "no-tax",
            },
            supplier: PartyOut::new(&doc.supplier),
            customer: PartyOut::new(&doc.customer),
            lines,
            subtotal: &doc.subtotal,
            total_tax: &doc.total_tax,
            total: &doc.total,
            url: doc.url.as_deref(),
            credits_invoice_number: doc.credits_invoice_number.as_deref(),
            pdf: doc.pdf.as_ref().map(|p| match p {
                Pdf::Reference(u) => PdfOut {
                    url: Some(u),
                    base64: None,
                },
                Pdf::Bytes(b) => PdfOut {
                    url: None,
                    base64: Some(base64::engine::general_purpose::STANDARD.encode(b)),
                },
            }),
        },
    };
    serde_json::to_vec(&envelope)
        .map_err(|e| errors::transient(format!("could not render the document as JSON: {e}")))
}

/// At most 500 bytes of `s`, cut on a character boundary.
fn snippet(s: &str) -> &str {
    let mut end = s.len().min(500);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A string or number field of a JSON object.
fn text_field(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn receipt(body: Option<&Value>, delivery: &Delivery, notes: Vec<String>) -> Receipt {
    Receipt {
        external_id: body
            .and_then(|b| text_field(b, "id"))
            .unwrap_or_else(|| delivery.key.clone()),
        external_url: body.and_then(|b| text_field(b, "url")),
        notes,
    }
}

/// The receiver's reasons for a 4xx, field by field when its body says
/// `{"errors": [{"field": ..., "message": ...}]}`, else its `error` or
/// `message`, else its raw text.
fn field_errors(status: u16, body: Option<&Value>, text: &str) -> Vec<FieldError> {
    let mut out = Vec::new();
    if let Some(list) = body.and_then(|b| b.get("errors")).and_then(Value::as_array) {
        for e in list {
            let (field, message) = match e {
                Value::String(m) => ("document".to_string(), m.clone()),
                other => (
                    text_field(other, "field").unwrap_or_else(|| "document".into()),
                    text_field(other, "message").unwrap_or_else(|| other.to_string()),
                ),
            };
            out.push(errors::field(
                &field,
                format!("The receiver refused {field}: {message}"),
                Some(message.clone()),
            ));
        }
    }
    if out.is_empty() {
        let raw = body
            .and_then(|b| text_field(b, "error").or_else(|| text_field(b, "message")))
            .unwrap_or_else(|| snippet(text).to_string());
        out.push(errors::field(
            "document",
            format!("The receiver refused the document ({status}): {raw}"),
            Some(raw),
        ));
    }
    out
}

/// Turn the receiver's answer into the contract's outcome.
fn outcome(resp: &http::Response, delivery: &Delivery) -> Result<Receipt, DeliveryError> {
    let body: Option<Value> = resp.json().ok();
    let status = resp.status;
    match status {
        200..=299 => Ok(receipt(body.as_ref(), delivery, Vec::new())),
        409 => Ok(receipt(
            body.as_ref(),
            delivery,
            vec![
                "the receiver had already received this delivery (409); it was not recorded twice"
                    .into(),
            ],
        )),
        401 | 403 => Err(errors::needs_reauth(format!(
            "the receiver refused the request ({status}): the connection's signing_secret must be \
             the secret the receiver verifies X-Ledgerport-Signature with"
        ))),
        408 => Err(errors::transient(
            "the receiver timed out reading the request (408)",
        )),
        429 => {
            let secs = resp
                .header("retry-after")
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(60);
            Err(errors::rate_limited(secs, "receiver"))
        }
        300..=399 => Err(errors::rejected(
            "endpoint",
            format!(
                "the endpoint answered {status} (a redirect to {}), which is not followed; set the connection's endpoint to the final URL",
                resp.header("location").unwrap_or("nowhere")
            ),
            None,
        )),
        400..=499 => Err(DeliveryError::Rejected(field_errors(
            status,
            body.as_ref(),
            &resp.text(),
        ))),
        _ => Err(errors::transient(format!(
            "the receiver answered {status}: {}",
            snippet(&resp.text())
        ))),
    }
}

impl Connector for Webhook {
    fn describe() -> ConnectorInfo {
        ConnectorInfo {
            id: "webhook".into(),
            name: "JSON webhook".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            document_kinds: vec![DocumentKind::Invoice, DocumentKind::CreditNote],
        }
    }

    fn list_accounts() -> Result<AccountList, DeliveryError> {
        // A webhook has no chart of accounts: admins type account codes.
        Ok(AccountList {
            accounts: vec![],
            tax_rates: vec![],
        })
    }

    fn check() -> Result<CheckReport, DeliveryError> {
        let s = settings()?;
        Ok(CheckReport {
            organisation_name: s.endpoint,
            details: vec!["documents are signed with HMAC-SHA256 (X-Ledgerport-Signature)".into()],
        })
    }

    fn deliver(delivery: Delivery, doc: Document) -> Result<Receipt, DeliveryError> {
        // Every unmapped kind, named at once, before anything is sent.
        let accounts = mapping::resolve(doc.lines.iter().map(|l| l.kind.as_str()))
            .map_err(errors::needs_mapping)?;
        let s = settings()?;
        let body = render(&delivery, &doc, &accounts)?;
        let sig = signature(s.secret.as_bytes(), now(), &body)
            .ok_or_else(|| errors::transient("could not compute the signature"))?;
        let resp = http::post(&s.endpoint)
            .header("content-type", "application/json")
            .header("x-ledgerport-signature", sig)
            .header("x-ledgerport-delivery", &delivery.key)
            .header("idempotency-key", &delivery.key)
            .body(body)
            .send()
            .map_err(errors::from_http)?;
        outcome(&resp, &delivery)
    }
}

ledgerport_sdk::export_connector!(Webhook);
