//! A connector built against contract `ledgerport:connector@0.2.0`
//! (bindings generated straight from `wit/v0.2`; the SDK speaks 0.1), for
//! the host's side-by-side contract tests. `deliver` POSTs the document's
//! number, total, 0.2-only `purchase-order` and the mapped account codes to
//! the connection's `endpoint` (default `https://hooks.example.com/v02`),
//! caches the last delivered number in kv, and answers a 0.2 receipt with a
//! warning about the purchase order.

wit_bindgen::generate!({ path: "../../../wit/v0.2", world: "plugin" });

use exports::ledgerport::connector::connector::Guest;
use ledgerport::connector::types::*;
use ledgerport::connector::{connection, http, kv, log, mapping};

struct V02;

fn endpoint() -> String {
    connection::info()
        .settings
        .into_iter()
        .find(|(k, _)| k == "endpoint")
        .map(|(_, v)| v)
        .unwrap_or_else(|| "https://hooks.example.com/v02".into())
}

/// A JSON string literal (enough for the test's plain values).
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn transient(e: http::Error) -> DeliveryError {
    DeliveryError::Transient(format!("{e:?}"))
}

impl Guest for V02 {
    fn describe() -> ConnectorInfo {
        ConnectorInfo {
            id: "v02".into(),
            name: "Contract 0.2 test connector".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            document_kinds: vec![DocumentKind::Invoice, DocumentKind::CreditNote],
        }
    }

    fn list_accounts() -> Result<AccountList, DeliveryError> {
        Ok(AccountList {
            accounts: vec![Account {
                code: "400".into(),
                name: "Contract 0.2".into(),
                account_type: "EXPENSE".into(),
                tax_type: None,
                description: None,
            }],
            tax_rates: vec![],
        })
    }

    fn check() -> Result<CheckReport, DeliveryError> {
        Err(DeliveryError::NeedsReauth(
            "contract 0.2 says reconnect".into(),
        ))
    }

    fn deliver(delivery: Delivery, doc: Document) -> Result<Receipt, DeliveryError> {
        log::log(log::Level::Info, &format!("delivering {}", doc.number));
        let accounts: Vec<String> = mapping::all()
            .into_iter()
            .map(|m| format!("{}:{}", quote(&m.kind), quote(&m.account_code)))
            .collect();
        let body = format!(
            "{{\"contract\":\"0.2\",\"number\":{},\"total\":{},\"purchase_order\":{},\"lines\":{},\"accounts\":{{{}}}}}",
            quote(&doc.number),
            quote(&doc.total),
            doc.purchase_order
                .as_deref()
                .map(quote)
                .unwrap_or_else(|| "null".into()),
            doc.lines.len(),
            accounts.join(",")
        );
        let resp = http::send(&http::Request {
            method: http::Method::Post,
            url: endpoint(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("idempotency-key".into(), delivery.key.clone()),
            ],
            body: Some(body.into_bytes()),
            with_credentials: true,
        })
        .map_err(transient)?;
        if !(200..300).contains(&resp.status) {
            return Err(DeliveryError::Transient(format!(
                "the endpoint answered {}",
                resp.status
            )));
        }
        kv::set("last-number", doc.number.as_bytes()).map_err(DeliveryError::Transient)?;
        let warnings = match &doc.purchase_order {
            Some(po) => vec![format!(
                "purchase order {po} was not checked against open orders"
            )],
            None => vec![format!("{} has no purchase order", doc.number)],
        };
        Ok(Receipt {
            external_id: format!("v02-{}", delivery.key),
            external_url: None,
            notes: vec![],
            warnings,
        })
    }
}

export!(V02);
