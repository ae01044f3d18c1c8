//! The webhook connector (`examples/webhook-connector`) through the test
//! kit: its real component in the real runtime, every outcome of the
//! contract, the HMAC signature checked here independently, and the kit's
//! own promises (unmatched requests and unused exchanges fail clearly).
//!
//! Needs the connectors built and installed: `cargo xtask wasm`.

use hmac::{Hmac, Mac};
use ledgerport_testkit::{
    DeliveryError, Exchange, KitError, SentRequest, TestConnection, TestKit, delivery,
    sample_credit_note, sample_invoice,
};
use serde_json::{Value, json};
use sha2::Sha256;

const ENDPOINT: &str = "https://hooks.example.com/ledgerport";
const SECRET: &str = "whsec-test-0123456789abcdef";

fn kit() -> TestKit {
    TestKit::installed("webhook").unwrap_or_else(|e| panic!("{e:#}"))
}

/// A connection with a secret and every kind of the sample documents mapped
/// (management-fee to 470 with a tax type, the rest to 6000).
fn connection(kit: &TestKit) -> TestConnection<'_> {
    kit.connection()
        .setting("signing_secret", SECRET)
        .mappings_for(&sample_invoice(), "6000")
        .mappings_for(&sample_credit_note(), "6000")
        .mapping("management-fee", "470", Some("INPUT2"))
}

/// Check `X-Ledgerport-Signature` the way a receiver would: recompute
/// HMAC-SHA256(secret, "<t>.<body>") and compare; return `t`.
fn verify_signature(req: &SentRequest, secret: &str) -> u64 {
    let header = req
        .header("x-ledgerport-signature")
        .expect("the request carries X-Ledgerport-Signature");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("signature header {header:?} is not t=<ts>,v1=<hex>"));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(&req.body);
    mac.verify_slice(&hex::decode(v1).expect("v1 is hex"))
        .expect("the signature verifies with the shared secret");
    t.parse().expect("t is unix seconds")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn delivers_a_signed_stable_json_document_with_each_lines_account() {
    let kit = kit();
    let doc = sample_invoice();
    let run = connection(&kit)
        .expect(Exchange::post(ENDPOINT).respond(
            201,
            json!({"id": "rcv-42", "url": "https://erp.example/docs/42"}),
        ))
        .expect(Exchange::post(ENDPOINT).respond(201, json!({"id": "rcv-42"})));

    let receipt = run
        .deliver_as(delivery("dlv-1", 1), &doc)
        .await
        .expect("delivered");
    assert_eq!(receipt.external_id, "rcv-42");
    assert_eq!(
        receipt.external_url.as_deref(),
        Some("https://erp.example/docs/42")
    );
    // A retry of the same delivery (e.g. after a lost answer).
    run.deliver_as(delivery("dlv-1", 2), &doc)
        .await
        .expect("delivered again");
    run.assert_all_exchanges_used();

    let sent = run.requests();
    assert_eq!(sent.len(), 2);
    let first = &sent[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.url, ENDPOINT);
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.header("x-ledgerport-delivery"), Some("dlv-1"));
    assert_eq!(
        first.header("authorization"),
        None,
        "a webhook asks for no credentials"
    );
    let t = verify_signature(first, SECRET);
    assert!(t.abs_diff(now()) < 300, "t={t} is the current time");
    // The body is a stable rendering: the same bytes on every attempt.
    assert_eq!(first.body, sent[1].body);
    verify_signature(&sent[1], SECRET);

    let body = first.body_json();
    assert_eq!(body["event"], "document.issued");
    assert_eq!(body["delivery_key"], "dlv-1");
    let d = &body["document"];
    assert_eq!(d["number"], "INV-2026-0042");
    assert_eq!(d["kind"], "invoice");
    assert_eq!(d["tax_basis"], "exclusive");
    assert_eq!(d["total"], "9950.49");
    assert_eq!(d["supplier"]["id"], "eor-platform");
    let lines = d["lines"].as_array().unwrap();
    assert_eq!(lines.len(), doc.lines.len());
    for (out, line) in lines.iter().zip(&doc.lines) {
        let (code, tax) = if line.kind == "management-fee" {
            ("470", json!("INPUT2"))
        } else {
            ("6000", Value::Null)
        };
        assert_eq!(out["kind"], line.kind.as_str());
        assert_eq!(out["account_code"], code, "line {}", line.kind);
        assert_eq!(out["tax_type"], tax, "line {}", line.kind);
        // Amounts travel as the exact decimal strings.
        assert_eq!(out["unit_amount"], line.unit_amount.as_str());
    }
    assert!(lines.iter().any(|l| l["unit_amount"] == "41.3119"));
    assert!(
        d["pdf"]["base64"]
            .as_str()
            .is_some_and(|b| b.starts_with("JVBERi0"))
    );
}

#[tokio::test]
async fn a_credit_note_names_the_invoice_it_credits_and_a_path_setting_picks_the_endpoint() {
    let kit = kit();
    let run = connection(&kit)
        .setting("endpoint", "/erp/acme")
        .expect(Exchange::post("https://hooks.example.com/erp/acme").respond(200, json!({})));
    let receipt = run.deliver(&sample_credit_note()).await.expect("delivered");
    // No id from the receiver: the delivery key identifies it.
    assert_eq!(receipt.external_id, "delivery-doc-cn-0007");
    let body = run.requests()[0].body_json();
    assert_eq!(body["document"]["kind"], "credit-note");
    assert_eq!(body["document"]["credits_invoice_number"], "INV-2026-0042");
    assert_eq!(body["document"]["pdf"], Value::Null);
    verify_signature(&run.requests()[0], SECRET);
}

#[tokio::test]
async fn conflict_means_the_receiver_already_has_it() {
    let kit = kit();
    let run = connection(&kit).expect(
        Exchange::post(ENDPOINT).respond(409, json!({"id": "rcv-7", "error": "already received"})),
    );
    let receipt = run.deliver(&sample_invoice()).await.expect("a success");
    assert_eq!(receipt.external_id, "rcv-7");
    assert!(receipt.notes[0].contains("already received"));
}

#[tokio::test]
async fn client_errors_are_rejections_naming_the_receivers_fields() {
    let kit = kit();
    let run = connection(&kit)
        .expect(Exchange::post(ENDPOINT).respond(
            422,
            json!({"errors": [
                {"field": "document.lines[5].account_code", "message": "account 470 is closed"},
                {"field": "document.currency", "message": "EUR is not enabled"}
            ]}),
        ))
        .expect(Exchange::post(ENDPOINT).respond_raw(400, "bad request: missing tenant"));

    let Err(DeliveryError::Rejected(errs)) = run.deliver(&sample_invoice()).await else {
        panic!("expected a rejection");
    };
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[0].field, "document.lines[5].account_code");
    assert!(errs[0].message.contains("account 470 is closed"));
    assert_eq!(
        errs[0].provider_message.as_deref(),
        Some("account 470 is closed")
    );
    assert_eq!(errs[1].field, "document.currency");

    // Without a JSON body the receiver's text is kept.
    let Err(DeliveryError::Rejected(errs)) = run.deliver(&sample_invoice()).await else {
        panic!("expected a rejection");
    };
    assert_eq!(errs[0].field, "document");
    assert!(errs[0].message.contains("(400)"));
    assert_eq!(
        errs[0].provider_message.as_deref(),
        Some("bad request: missing tenant")
    );
    run.assert_all_exchanges_used();
}

#[tokio::test]
async fn a_refused_signature_asks_an_admin_to_fix_the_secret() {
    let kit = kit();
    let run = connection(&kit)
        .expect(Exchange::post(ENDPOINT).respond(401, json!({"error": "bad signature"})));
    let Err(DeliveryError::NeedsReauth(why)) = run.deliver(&sample_invoice()).await else {
        panic!("expected needs-reauth");
    };
    assert!(why.contains("signing_secret"), "{why}");
}

#[tokio::test]
async fn rate_limited_with_the_receivers_retry_after() {
    let kit = kit();
    let run = connection(&kit)
        .expect(
            Exchange::post(ENDPOINT)
                .respond(429, json!({}))
                .header("Retry-After", "17"),
        )
        .expect(Exchange::post(ENDPOINT).respond(429, json!({})));
    let Err(DeliveryError::RateLimited(rl)) = run.deliver(&sample_invoice()).await else {
        panic!("expected rate-limited");
    };
    assert_eq!(
        (rl.retry_after_seconds, rl.limit.as_str()),
        (17, "receiver")
    );
    // No Retry-After: a minute.
    let Err(DeliveryError::RateLimited(rl)) = run.deliver(&sample_invoice()).await else {
        panic!("expected rate-limited");
    };
    assert_eq!(rl.retry_after_seconds, 60);
}

#[tokio::test]
async fn server_errors_timeouts_and_resets_are_transient() {
    let kit = kit();
    let run = connection(&kit)
        .expect(Exchange::post(ENDPOINT).respond_raw(503, "maintenance"))
        .expect(Exchange::post(ENDPOINT).timeout())
        .expect(Exchange::post(ENDPOINT).connection_error("connection reset by peer"));
    for expected in ["503: maintenance", "timeout", "connection reset"] {
        match run.deliver(&sample_invoice()).await {
            Err(DeliveryError::Transient(why)) => {
                assert!(
                    why.to_lowercase().contains(expected),
                    "{why:?} mentions {expected:?}"
                )
            }
            other => panic!("expected transient ({expected}), got {other:?}"),
        }
    }
    run.assert_all_exchanges_used();
}

#[tokio::test]
async fn unmapped_kinds_are_all_named_before_anything_is_sent() {
    let kit = kit();
    let run = kit
        .connection()
        .setting("signing_secret", SECRET)
        .mapping("gross-salary", "6000", None)
        .mapping("management-fee", "470", None);
    let Err(DeliveryError::NeedsMapping(kinds)) = run.deliver(&sample_invoice()).await else {
        panic!("expected needs-mapping");
    };
    assert_eq!(
        kinds,
        [
            "allowances-and-bonuses",
            "employee-benefits",
            "employer-social-contributions",
            "expense-reimbursement",
            "fx-fee",
            "onboarding-fee",
            "security-deposit",
            "statutory-payments",
        ]
    );
    assert!(run.requests().is_empty());
}

#[tokio::test]
async fn without_a_signing_secret_nothing_is_sent() {
    let kit = kit();
    let run = kit
        .connection()
        .mappings_for(&sample_invoice(), "6000")
        .setting("signing_secret", "short");
    let Err(DeliveryError::NeedsReauth(why)) = run.deliver(&sample_invoice()).await else {
        panic!("expected needs-reauth");
    };
    assert!(why.contains("signing_secret"), "{why}");
    assert!(run.requests().is_empty());
    assert!(matches!(
        run.check().await,
        Err(DeliveryError::NeedsReauth(_))
    ));
}

#[tokio::test]
async fn the_hosts_allow_list_still_holds_under_the_kit() {
    let kit = kit();
    let run = connection(&kit).setting("endpoint", "https://evil.example.com/steal");
    let Err(DeliveryError::Rejected(errs)) = run.deliver(&sample_invoice()).await else {
        panic!("expected a rejection");
    };
    assert!(errs[0].message.contains("allowed_hosts"), "{errs:?}");
    assert!(run.requests().is_empty(), "the request never left the host");
}

#[tokio::test]
async fn an_unmatched_request_fails_naming_it_and_what_was_expected() {
    let kit = kit();
    let run = connection(&kit)
        .setting("endpoint", "/other")
        .expect(Exchange::post(ENDPOINT).respond(201, json!({})));
    let err = run
        .try_deliver(delivery("k", 1), &sample_invoice())
        .await
        .expect_err("the request matches nothing");
    assert!(matches!(err, KitError::Unmatched(_)));
    let text = err.to_string();
    assert!(
        text.contains("POST https://hooks.example.com/other"),
        "{text}"
    );
    assert!(text.contains(&format!("POST {ENDPOINT} -> 201")), "{text}");
    // It is still recorded, so the test can look at it.
    assert_eq!(run.requests().len(), 1);
    assert_eq!(run.requests()[0].answered_by, None);

    let unused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run.assert_all_exchanges_used()
    }))
    .expect_err("an exchange was never used");
    let msg = unused.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains(&format!("POST {ENDPOINT} -> 201")), "{msg}");
    assert!(
        msg.contains("POST https://hooks.example.com/other"),
        "{msg}"
    );
}

#[tokio::test]
async fn describe_matches_the_manifest() {
    let kit = kit();
    let info = kit.connection().describe().await;
    assert_eq!(info.id, kit.manifest().id);
    assert_eq!(info.id, "webhook");
}

#[tokio::test]
async fn loads_from_a_source_manifest_and_a_component_without_install() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let wasm = target.join("wasm32-wasip2/wasm/webhook_connector.wasm");
    assert!(
        wasm.exists(),
        "{} is missing: run `cargo xtask wasm`",
        wasm.display()
    );
    let kit = TestKit::from_component(root.join("examples/webhook-connector/manifest.toml"), &wasm)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(kit.connection().describe().await.id, "webhook");
    // The manifest's default endpoint applies when the connection sets none.
    let run = connection(&kit).expect(Exchange::post(ENDPOINT).respond(202, json!({"id": 7})));
    assert_eq!(
        run.deliver(&sample_invoice()).await.unwrap().external_id,
        "7"
    );
}
