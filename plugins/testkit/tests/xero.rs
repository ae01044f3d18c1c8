//! The Xero connector through the test kit: scripted Xero answers instead
//! of the simulator (which `host/tests/xero_connector.rs` uses), to pin the
//! exact requests of a delivery and the outcomes of Xero's refusals.
//!
//! Needs the connectors built and installed: `cargo xtask wasm`.

use ledgerport_testkit::{
    DeliveryError, Exchange, TestConnection, TestKit, delivery, sample_invoice,
};
use serde_json::json;

const API: &str = "https://api.xero.com/api.xro/2.0";
const ORG: &str = "5b3ca1e0-0d1f-4c5e-9a11-000000000002";

fn kit() -> TestKit {
    TestKit::installed("xero").unwrap_or_else(|e| panic!("{e:#}"))
}

/// A connected organisation with every kind of the sample invoice mapped.
fn connection(kit: &TestKit) -> TestConnection<'_> {
    kit.connection()
        .organisation(ORG, "Acme Holdings")
        .token("xero-access-token")
        .mappings_for(&sample_invoice(), "400")
        .mapping("management-fee", "470", Some("INPUT2"))
}

#[tokio::test]
async fn a_bill_uses_the_cached_contact_and_carries_token_tenant_and_keys() {
    let kit = kit();
    let run = connection(&kit)
        .kv("contact:eor-platform", "contact-9")
        .expect(
            Exchange::get(&format!("{API}/Invoices"))
                .when("it looks for the bill of this supplier", |r| {
                    r.query().iter().any(|(k, v)| {
                        k == "where"
                            && v.contains("InvoiceNumber==\"INV-2026-0042\"")
                            && v.contains("guid(\"contact-9\")")
                    })
                })
                .respond(200, json!({"Invoices": []})),
        )
        .expect(Exchange::put(&format!("{API}/Invoices")).respond(
            200,
            json!({"Invoices": [{"InvoiceID": "bill-1", "Status": "AUTHORISED"}]}),
        ))
        // A bill this call created has no attachment to look for.
        .expect(
            Exchange::put(&format!(
                "{API}/Invoices/bill-1/Attachments/INV-2026-0042.pdf"
            ))
            .respond(
                200,
                json!({"Attachments": [{"FileName": "INV-2026-0042.pdf"}]}),
            ),
        )
        // The organisation's short code, for a link that opens this
        // organisation (asked once, then kept in kv).
        .expect(Exchange::get(&format!("{API}/Organisation")).respond(
            200,
            json!({"Organisations": [{"Name": "Acme Holdings", "ShortCode": "!AbC12"}]}),
        ));

    let receipt = run
        .deliver_as(delivery("dlv-7", 1), &sample_invoice())
        .await
        .expect("delivered");
    assert_eq!(receipt.external_id, "bill-1");
    assert_eq!(
        receipt.external_url.as_deref(),
        Some(
            "https://go.xero.com/organisationlogin/default.aspx?shortcode=%21AbC12&redirecturl=%2FAccountsPayable%2FView.aspx%3FInvoiceID%3Dbill-1"
        )
    );
    run.assert_all_exchanges_used();

    let sent = run.requests();
    assert!(
        sent.iter().all(|r| !r.url.contains("/Contacts")),
        "the cached contact is reused: {sent:?}"
    );
    for r in &sent {
        // The host attached the token; the connector never saw it.
        assert_eq!(r.header("authorization"), Some("Bearer xero-access-token"));
        assert_eq!(r.header("xero-tenant-id"), Some(ORG));
    }
    let create = &sent[1];
    // The delivery key, then a digest of the request body (a changed
    // request is not refused as a reused key).
    let key = create.header("idempotency-key").unwrap_or_default();
    let digest = key.strip_prefix("dlv-7-create-").unwrap_or_default();
    assert!(
        digest.len() == 16 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{key}"
    );
    assert!(
        create.url.contains("unitdp=4"),
        "a 4-decimal unit amount: {}",
        create.url
    );
    let bill = &create.body_json()["Invoices"][0];
    assert_eq!(bill["Type"], "ACCPAY");
    assert_eq!(bill["Contact"]["ContactID"], "contact-9");
    assert!(bill["Url"].as_str().unwrap().ends_with("#ledgerport=dlv-7"));
    let fee = bill["LineItems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["Description"] == "EOR management fee")
        .expect("the management fee line");
    assert_eq!(fee["AccountCode"], "470");
    assert_eq!(fee["TaxType"], "INPUT2");
    assert_eq!(sent[2].header("content-type"), Some("application/pdf"));
    assert!(sent[2].body.starts_with(b"%PDF"));
}

#[tokio::test]
async fn every_unmapped_kind_is_named_before_any_request() {
    let kit = kit();
    let run =
        kit.connection()
            .organisation(ORG, "Acme Holdings")
            .mapping("gross-salary", "400", None);
    let Err(DeliveryError::NeedsMapping(kinds)) = run.deliver(&sample_invoice()).await else {
        panic!("expected needs-mapping");
    };
    assert_eq!(kinds.len(), 9, "{kinds:?}");
    assert!(kinds.contains(&"management-fee".to_string()));
    assert!(!kinds.contains(&"gross-salary".to_string()));
    assert!(run.requests().is_empty(), "nothing was asked of Xero");
}

#[tokio::test]
async fn forbidden_means_reconnect() {
    let kit = kit();
    let run = connection(&kit).expect(Exchange::get(&format!("{API}/Contacts")).respond(
        403,
        json!({"Type": "AuthorizationUnsuccessful", "Detail": "AuthorizationUnsuccessful"}),
    ));
    let Err(DeliveryError::NeedsReauth(why)) = run.deliver(&sample_invoice()).await else {
        panic!("expected needs-reauth");
    };
    assert!(why.contains("AuthorizationUnsuccessful"), "{why}");
    assert!(why.contains("reconnect"), "{why}");
    run.assert_all_exchanges_used();
}

#[tokio::test]
async fn a_401_is_refreshed_and_retried_once_by_the_host() {
    let kit = kit();
    let run = connection(&kit)
        .refreshes_to("stale-token", "fresh-token")
        .kv("contact:eor-platform", "contact-9")
        .expect(Exchange::get(&format!("{API}/Invoices")).respond(401, json!({})))
        .expect(Exchange::get(&format!("{API}/Invoices")).respond(429, json!({})));
    let out = run.deliver(&sample_invoice()).await;
    assert!(matches!(out, Err(DeliveryError::RateLimited(_))), "{out:?}");
    let sent = run.requests();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].header("authorization"), Some("Bearer stale-token"));
    assert_eq!(sent[1].header("authorization"), Some("Bearer fresh-token"));
    assert_eq!(sent[0].url, sent[1].url);
}

#[tokio::test]
async fn a_401_that_cannot_be_refreshed_needs_reauth() {
    let kit = kit();
    // The default static token cannot be refreshed: the host's refresh
    // fails and the connector hears the connection is unauthorised.
    let run = connection(&kit)
        .kv("contact:eor-platform", "contact-9")
        .expect(Exchange::get(&format!("{API}/Invoices")).respond(401, json!({})));
    let out = run.deliver(&sample_invoice()).await;
    assert!(matches!(out, Err(DeliveryError::NeedsReauth(_))), "{out:?}");
    assert_eq!(run.requests().len(), 1, "no retry without a new token");
}

#[tokio::test]
async fn rate_limited_with_xeros_retry_after_and_limit() {
    let kit = kit();
    let run = connection(&kit)
        .kv("contact:eor-platform", "contact-9")
        .expect(
            Exchange::get(&format!("{API}/Invoices"))
                .respond(429, json!({}))
                .header("Retry-After", "42")
                .header("X-Rate-Limit-Problem", "minute"),
        );
    let Err(DeliveryError::RateLimited(rl)) = run.deliver(&sample_invoice()).await else {
        panic!("expected rate-limited");
    };
    assert_eq!(rl.retry_after_seconds, 42);
    assert_eq!(rl.limit, "minute");
}

#[tokio::test]
async fn a_new_supplier_contact_is_created_and_cached() {
    let kit = kit();
    let run = connection(&kit)
        .expect(Exchange::get(&format!("{API}/Contacts")).respond(200, json!({"Contacts": []})))
        .expect(Exchange::get(&format!("{API}/Contacts")).respond(200, json!({"Contacts": []})))
        .expect(
            Exchange::put(&format!("{API}/Contacts"))
                .respond(200, json!({"Contacts": [{"ContactID": "contact-new"}]})),
        )
        .expect(Exchange::get(&format!("{API}/Invoices")).respond_raw(503, "down"));
    let out = run.deliver(&sample_invoice()).await;
    assert!(matches!(out, Err(DeliveryError::Transient(_))), "{out:?}");
    assert_eq!(
        run.kv_get("contact:eor-platform").as_deref(),
        Some(&b"contact-new"[..]),
        "the contact is cached for the retry"
    );
    let created = &run.requests()[2].body_json()["Contacts"][0];
    assert_eq!(created["ContactNumber"], "eor-platform");
    assert_eq!(created["Name"], "Globe EOR Services Ltd");
    run.assert_all_exchanges_used();
}
