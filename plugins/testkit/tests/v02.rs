//! A connector built against contract 0.2 (`tests/plugins/v02-connector`)
//! through the test kit: the 0.2-only purchase order reaches it through
//! `deliver_with`, as the host passes it, and its warnings come back as
//! notes; through plain `deliver` it sees none, as a document without one.
//!
//! Needs the connectors built: `cargo xtask wasm`.

use ledgerport_testkit::{Exchange, TestKit, delivery, document_and_extras_from_json};
use serde_json::json;
use std::path::PathBuf;

const MANIFEST: &str = r#"
id = "v02"
name = "Contract 0.2 test connector"
version = "0.1.0"
contract = "0.2.0"
component = "v02_connector.wasm"
allowed_hosts = ["https://hooks.example.com"]
document_kinds = ["invoice", "credit-note"]

[oauth]
authorize_url = "https://login.hooks.example.com/authorize"
token_url = "https://login.hooks.example.com/token"
scopes = ["bills.write"]
"#;

fn kit() -> TestKit {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target")));
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.toml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    TestKit::from_component(
        &manifest,
        target.join("wasm32-wasip2/wasm/v02_connector.wasm"),
    )
    .unwrap_or_else(|e| panic!("{e:#} (run `cargo xtask wasm`)"))
}

#[tokio::test]
async fn a_purchase_order_reaches_a_0_2_connector_through_deliver_with() {
    let kit = kit();
    let mut raw: serde_json::Value =
        serde_json::from_slice(include_bytes!("../../../examples/documents/invoice.json")).unwrap();
    raw["purchase_order"] = json!("PO-7");
    let (doc, extras) = document_and_extras_from_json(raw.to_string().as_bytes()).unwrap();
    assert_eq!(extras.purchase_order.as_deref(), Some("PO-7"));
    let run = kit
        .connection()
        .token("tok")
        .mappings_for(&doc, "400")
        .expect(Exchange::post("https://hooks.example.com/v02").respond(201, json!({})))
        .expect(Exchange::post("https://hooks.example.com/v02").respond(201, json!({})));
    let r = run
        .deliver_with(delivery("dlv-1", 1), &doc, extras)
        .await
        .expect("delivered");
    assert_eq!(r.external_id, "v02-dlv-1");
    assert_eq!(
        r.notes,
        vec!["Warning: purchase order PO-7 was not checked against open orders".to_string()]
    );
    // Plain deliver: no extras, as for a document without a purchase order.
    let r = run
        .deliver_as(delivery("dlv-2", 1), &doc)
        .await
        .expect("delivered");
    assert_eq!(
        r.notes,
        vec![format!("Warning: {} has no purchase order", doc.number)]
    );
    run.assert_all_exchanges_used();
    let sent = run.requests();
    assert_eq!(sent[0].body_json()["purchase_order"], "PO-7");
    assert_eq!(
        sent[1].body_json()["purchase_order"],
        serde_json::Value::Null
    );
}
