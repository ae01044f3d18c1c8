//! Contract versions side by side: one runtime serves a connector built
//! against `ledgerport:connector@0.1.0` (the minimal example) and one built
//! against `@0.2.0` (`tests/plugins/v02-connector`) at once; each version's
//! data reaches only the connector that speaks it, a manifest naming the
//! other line is refused, and an unknown line is refused by name.

mod common;

use common::*;
use ledgerport::capabilities::kv::{KvStore, MemoryKv};
use ledgerport::capabilities::mapping::{AccountMapping, MappingScope, MemoryMappings};
use ledgerport::document::Document;
use ledgerport::runtime::v0_1::ledgerport::connector::types::{DeliveryError, DocumentKind};
use ledgerport::runtime::{LoadError, RuntimeConfig};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const MINIMAL: &str = r#"
id = "minimal"
name = "Minimal webhook"
version = "0.1.0"
contract = "0.1.0"
allowed_hosts = ["https://hooks.example.com"]
document_kinds = ["invoice", "credit-note"]
"#;

const V02: &str = r#"
id = "v02"
name = "Contract 0.2 test connector"
version = "0.1.0"
contract = "0.2.0"
allowed_hosts = ["https://hooks.example.com"]
document_kinds = ["invoice", "credit-note"]

[oauth]
authorize_url = "https://login.hooks.example.com/authorize"
token_url = "https://login.hooks.example.com/token"
scopes = ["bills.write"]
"#;

fn hooks(listener: &Listener) -> BTreeMap<String, String> {
    BTreeMap::from([(
        "https://hooks.example.com".to_string(),
        listener.base.clone(),
    )])
}

fn config() -> RuntimeConfig {
    RuntimeConfig {
        deadline: Duration::from_secs(5),
        memory_limit: 32 * 1024 * 1024,
        max_concurrent_instances: 8,
        ..RuntimeConfig::default()
    }
}

/// The sample invoice as the platform sends it, with a purchase order.
fn platform_invoice(purchase_order: &str) -> Document {
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/documents/invoice.json"),
    )
    .unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["purchase_order"] = purchase_order.into();
    Document::from_json(&serde_json::to_vec(&v).unwrap()).unwrap()
}

#[tokio::test]
async fn one_runtime_delivers_through_a_v0_1_and_a_v0_2_connector() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let rt = runtime(config());
    let v1 = rt
        .load(
            &install(dir.path(), "minimal_connector", MINIMAL),
            &hooks(&listener),
        )
        .unwrap();
    let v2 = rt
        .load(
            &install(dir.path(), "v02_connector", V02),
            &hooks(&listener),
        )
        .unwrap();

    let doc = platform_invoice("PO-7781");
    assert_eq!(doc.extras().purchase_order.as_deref(), Some("PO-7781"));
    let mut ctx = context("secret-token-123", &[]);
    let kv = Arc::new(MemoryKv::default());
    ctx.kv = kv.clone();
    let mappings = Arc::new(MemoryMappings::default());
    mappings.set(
        &MappingScope {
            tenant_id: "acme".into(),
            connector_id: "v02".into(),
        },
        AccountMapping {
            kind: "management-fee".into(),
            account_code: "610".into(),
            tax_type: None,
        },
    );
    ctx.mappings = mappings;

    // 0.1: the extras are not part of its contract and never reach it.
    let r1 = rt
        .deliver_with(
            &v1,
            &ctx,
            delivery("dlv-1"),
            doc.to_wit().unwrap(),
            doc.extras(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r1.external_id, "ext-1");
    assert!(r1.notes.is_empty(), "{:?}", r1.notes);

    // 0.2: same document, same runtime, plus the purchase order.
    let r2 = rt
        .deliver_with(
            &v2,
            &ctx,
            delivery("dlv-2"),
            doc.to_wit().unwrap(),
            doc.extras(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r2.external_id, "v02-dlv-2");
    assert_eq!(
        r2.notes,
        vec!["Warning: purchase order PO-7781 was not checked against open orders".to_string()]
    );

    let reqs = listener.all();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let (b1, b2) = (&reqs[0], &reqs[1]);
    assert_eq!(b1.path, "/ledgerport");
    let body1 = String::from_utf8_lossy(&b1.body);
    assert!(!body1.contains("PO-7781"), "0.1 saw 0.2 data: {body1}");

    // Every 0.2 import went through the host's capabilities: http with the
    // injected credential, mapping, kv (and connection, log).
    assert_eq!(b2.path, "/v02");
    assert_eq!(b2.header("authorization"), Some("Bearer secret-token-123"));
    assert_eq!(b2.header("idempotency-key"), Some("dlv-2"));
    let body2: serde_json::Value = serde_json::from_slice(&b2.body).unwrap();
    assert_eq!(body2["contract"], "0.2");
    assert_eq!(body2["purchase_order"], "PO-7781");
    assert_eq!(body2["number"], "INV-2026-0042");
    assert_eq!(body2["total"], "9950.49");
    assert_eq!(body2["lines"], 10);
    assert_eq!(body2["accounts"]["management-fee"], "610");
    assert_eq!(
        kv.get("conn-1", "last-number").await.unwrap().as_deref(),
        Some(&b"INV-2026-0042"[..])
    );

    // Through the unchanged `deliver`, a 0.2 connector gets no purchase order.
    let r3 = rt
        .deliver(&v2, &ctx, delivery("dlv-3"), invoice("INV-2026-0043"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        r3.notes,
        vec!["Warning: INV-2026-0043 has no purchase order".to_string()]
    );
    let body3: serde_json::Value = serde_json::from_slice(&listener.all()[2].body).unwrap();
    assert_eq!(body3["purchase_order"], serde_json::Value::Null);
}

#[tokio::test]
async fn v0_2_exports_answer_in_the_canonical_types() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::start().await;
    let rt = runtime(config());
    let v2 = rt
        .load(
            &install(dir.path(), "v02_connector", V02),
            &hooks(&listener),
        )
        .unwrap();
    let ctx = context("t", &[]);
    let info = rt.describe(&v2, &ctx).await.unwrap();
    assert_eq!(info.id, "v02");
    assert_eq!(
        info.document_kinds,
        vec![DocumentKind::Invoice, DocumentKind::CreditNote]
    );
    let accounts = rt.list_accounts(&v2, &ctx).await.unwrap().unwrap();
    assert_eq!(accounts.accounts.len(), 1);
    assert_eq!(accounts.accounts[0].code, "400");
    match rt.check(&v2, &ctx).await.unwrap() {
        Err(DeliveryError::NeedsReauth(m)) => assert_eq!(m, "contract 0.2 says reconnect"),
        other => panic!("expected needs-reauth, got {other:?}"),
    }
}

#[test]
fn a_manifest_naming_the_other_line_is_a_contract_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config());
    for (stem, manifest, found) in [
        (
            "v02_connector",
            V02.replace("contract = \"0.2.0\"", "contract = \"0.1.0\""),
            "@0.2.0",
        ),
        (
            "minimal_connector",
            MINIMAL.replace("contract = \"0.1.0\"", "contract = \"0.2.0\""),
            "@0.1.0",
        ),
    ] {
        let err = rt
            .load(&install(dir.path(), stem, &manifest), &BTreeMap::new())
            .err()
            .unwrap_or_else(|| panic!("{stem} loaded with the wrong contract"));
        match &err {
            LoadError::ContractMismatch {
                manifest, found: f, ..
            } => {
                assert_ne!(manifest, "", "{err}");
                assert!(f.contains(found), "{stem}: {err}");
            }
            other => panic!("{stem}: expected ContractMismatch, got {other}"),
        }
    }
}

#[test]
fn an_unknown_contract_line_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(config());
    for version in ["0.3.0", "1.0.0"] {
        let manifest = V02.replace("contract = \"0.2.0\"", &format!("contract = \"{version}\""));
        let err = rt
            .load(
                &install(dir.path(), "v02_connector", &manifest),
                &BTreeMap::new(),
            )
            .err()
            .unwrap_or_else(|| panic!("contract {version} was accepted"));
        assert!(matches!(err, LoadError::Manifest(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("contract") && text.contains(version) && text.contains("0.1.x, 0.2.x"),
            "{text}"
        );
    }
}
