//! The smallest useful ledgerport connector: it POSTs each document as JSON
//! to an endpoint (connection setting `endpoint`, default
//! `https://hooks.example.com/ledgerport`, declared in its manifest), with an
//! `Idempotency-Key` derived from the delivery. It asks for no credentials:
//! its manifest declares no `[oauth]`, so its connections hold no tokens (a
//! receiver's key would be a secret setting, as in the webhook example).
//! Start a new connector from this file.

use ledgerport_sdk::{
    AccountList, CheckReport, Connector, ConnectorInfo, Delivery, DeliveryError, Document,
    DocumentKind, Pdf, Receipt, connection, errors, http, mapping,
};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

const DEFAULT_ENDPOINT: &str = "https://hooks.example.com/ledgerport";

/// The connector (public so native tests and benchmarks can call it).
pub struct Minimal;

fn endpoint() -> String {
    connection::setting(&connection::info(), "endpoint").unwrap_or_else(|| DEFAULT_ENDPOINT.into())
}

/// One line as sent (borrowed from the document: no copies).
#[derive(Serialize)]
struct LineOut<'a> {
    kind: &'a str,
    description: &'a str,
    quantity: &'a str,
    unit_amount: &'a str,
    tax_amount: &'a str,
    line_amount: &'a str,
    account_code: Option<&'a str>,
}

/// The JSON this connector sends for a document.
#[derive(Serialize)]
struct DocumentOut<'a> {
    id: &'a str,
    kind: &'static str,
    number: &'a str,
    issue_date: &'a str,
    due_date: Option<&'a str>,
    currency: &'a str,
    supplier: &'a str,
    customer: &'a str,
    lines: Vec<LineOut<'a>>,
    subtotal: &'a str,
    total_tax: &'a str,
    total: &'a str,
    credits_invoice_number: Option<&'a str>,
    pdf_bytes: Option<usize>,
}

fn to_json(doc: &Document, accounts: &BTreeMap<String, String>) -> Vec<u8> {
    let out = DocumentOut {
        id: &doc.id,
        kind: match doc.kind {
            DocumentKind::Invoice => "invoice",
            DocumentKind::CreditNote => "credit-note",
        },
        number: &doc.number,
        issue_date: &doc.issue_date,
        due_date: doc.due_date.as_deref(),
        currency: &doc.currency,
        supplier: &doc.supplier.name,
        customer: &doc.customer.name,
        lines: doc
            .lines
            .iter()
            .map(|l| LineOut {
                kind: &l.kind,
                description: &l.description,
                quantity: &l.quantity,
                unit_amount: &l.unit_amount,
                tax_amount: &l.tax_amount,
                line_amount: &l.line_amount,
                account_code: accounts.get(&l.kind).map(String::as_str),
            })
            .collect(),
        subtotal: &doc.subtotal,
        total_tax: &doc.total_tax,
        total: &doc.total,
        credits_invoice_number: doc.credits_invoice_number.as_deref(),
        pdf_bytes: match &doc.pdf {
            Some(Pdf::Bytes(b)) => Some(b.len()),
            _ => None,
        },
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// Turn a non-2xx answer into the contract's outcome.
fn classify(resp: &http::Response) -> DeliveryError {
    let text = resp.text();
    match resp.status {
        401 | 403 => errors::needs_reauth(format!("the endpoint answered {}", resp.status)),
        429 => {
            let secs = resp
                .header("retry-after")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(60);
            errors::rate_limited(secs, "endpoint")
        }
        400..=499 => errors::rejected(
            "document",
            format!("the endpoint refused the document ({})", resp.status),
            Some(text),
        ),
        _ => errors::transient(format!("the endpoint answered {}: {text}", resp.status)),
    }
}

impl Connector for Minimal {
    fn describe() -> ConnectorInfo {
        ConnectorInfo {
            id: "minimal".into(),
            name: "Minimal webhook".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            document_kinds: vec![DocumentKind::Invoice, DocumentKind::CreditNote],
        }
    }

    fn list_accounts() -> Result<AccountList, DeliveryError> {
        Ok(AccountList {
            accounts: vec![],
            tax_rates: vec![],
        })
    }

    fn check() -> Result<CheckReport, DeliveryError> {
        Ok(CheckReport {
            organisation_name: endpoint(),
            details: vec![],
        })
    }

    fn deliver(delivery: Delivery, doc: Document) -> Result<Receipt, DeliveryError> {
        // One host call for all mappings (optional here: unmapped lines go
        // without an account code).
        let accounts: BTreeMap<String, String> = mapping::all()
            .into_iter()
            .map(|m| (m.kind, m.account_code))
            .collect();
        let resp = http::post(endpoint())
            .header("idempotency-key", &delivery.key)
            .header("content-type", "application/json")
            .body(to_json(&doc, &accounts))
            .send()
            .map_err(errors::from_http)?;
        if !resp.is_success() {
            return Err(classify(&resp));
        }
        let external_id = resp
            .json::<Value>()
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str().map(String::from)))
            .filter(|id| !id.is_empty())
            .unwrap_or(delivery.key);
        Ok(Receipt {
            external_id,
            external_url: None,
            notes: vec![],
        })
    }
}

ledgerport_sdk::export_connector!(Minimal);
