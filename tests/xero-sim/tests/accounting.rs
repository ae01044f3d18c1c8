//! Accounting API behaviour: contacts, invoices, credit notes, validation,
//! summarizeErrors, idempotency, attachments, allocations, queries.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use xero_sim::SimConfig;

async fn supplier(api: &Api<'_>, name: &str) -> String {
    let (s, b) = api
        .put(
            "/Contacts",
            json!({"Contacts": [{"Name": name, "ContactNumber": format!("SUP-{name}")}]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    b["Contacts"][0]["ContactID"].as_str().unwrap().to_string()
}

fn bill(contact: &str, number: &str, lines: Value) -> Value {
    json!({"Invoices": [{
        "Type": "ACCPAY", "Contact": {"ContactID": contact}, "InvoiceNumber": number,
        "Date": "2026-11-25", "DueDate": "2026-12-25", "Status": "AUTHORISED",
        "LineAmountTypes": "Exclusive", "CurrencyCode": "GBP", "Reference": "EOR Nov",
        "Url": "https://platform.example/invoices/1", "LineItems": lines
    }]})
}

#[tokio::test]
async fn reference_data() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    let (s, b) = api.get("/Accounts").await;
    assert_eq!(s, 200);
    assert_eq!(b["Status"], "OK");
    assert_eq!(b["ProviderName"], "ledgerport demo");
    assert!(b["DateTimeUTC"].as_str().unwrap().starts_with("/Date("));
    let all = b["Accounts"].as_array().unwrap();
    assert!(all.iter().any(|a| a["Status"] == "ARCHIVED"));
    let (_, b) = api.get("/Accounts?where=Status%3D%3D%22ACTIVE%22%20AND%20Type%3D%3D%22EXPENSE%22&order=Code%20DESC").await;
    let exp = b["Accounts"].as_array().unwrap();
    assert!(
        !exp.is_empty()
            && exp
                .iter()
                .all(|a| a["Type"] == "EXPENSE" && a["Status"] == "ACTIVE")
    );
    assert!(exp[0]["Code"].as_str() > exp[1]["Code"].as_str());
    let (_, b) = api.get("/Accounts?where=Code%3D%3D%22400%22").await;
    assert_eq!(b["Accounts"].as_array().unwrap().len(), 1);
    assert_eq!(b["Accounts"][0]["TaxType"], "INPUT2");
    let (s, b) = api.get("/Accounts?where=Code%3D%3D").await;
    assert_eq!(s, 400);
    assert_eq!(b["Type"], "QueryParseException");
    let (_, b) = api.get("/TaxRates").await;
    let types: Vec<&str> = b["TaxRates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["TaxType"].as_str().unwrap())
        .collect();
    for t in ["INPUT", "INPUT2", "NONE", "EXEMPTEXPENSES"] {
        assert!(types.contains(&t), "{t}");
    }
    let (s, b) = Api::new(&sim, &at, TRADING).get("/Organisation").await;
    assert_eq!(s, 200);
    assert_eq!(b["Organisations"][0]["BaseCurrency"], "EUR");
}

#[tokio::test]
async fn contacts_create_find_and_duplicate_name() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    let id = supplier(&api, "Globex EOR").await;
    let (s, b) = api.put("/Contacts", json!({"Name": "globex eor"})).await;
    assert_eq!(s, 400);
    assert_eq!(b["Type"], "ValidationException");
    assert_eq!(b["ErrorNumber"], 10);
    assert_eq!(b["Message"], "A validation exception occurred");
    assert_eq!(
        messages(&b),
        vec![
            "The contact name globex eor is already assigned to another contact. The contact name must be unique across all active contacts."
        ]
    );
    let (s, b) = api.get(&format!("/Contacts/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(b["Contacts"][0]["Name"], "Globex EOR");
    let (_, b) = api.get("/Contacts/SUP-Globex%20EOR").await;
    assert_eq!(b["Contacts"][0]["ContactID"], id.as_str());
    let (_, b) = api
        .get("/Contacts?where=ContactNumber%3D%3D%22SUP-Globex%20EOR%22")
        .await;
    assert_eq!(b["Contacts"].as_array().unwrap().len(), 1);
    let (_, b) = api.get("/Contacts?where=Name%3D%3D%22Nobody%22").await;
    assert_eq!(b["Contacts"].as_array().unwrap().len(), 0);
    let (_, b) = api.get("/Contacts?searchTerm=globex").await;
    assert_eq!(b["Contacts"].as_array().unwrap().len(), 1);
    // POST updates by ContactID.
    let (s, b) = api
        .post(
            "/Contacts",
            json!({"Contacts": [{"ContactID": id, "EmailAddress": "ap@globex.example"}]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["Contacts"][0]["EmailAddress"], "ap@globex.example");
    assert_eq!(sim.documents(HOLDINGS).unwrap().contacts.len(), 1);
    let (s, _) = api
        .get(&format!("/Contacts/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn accpay_invoice_totals_and_unitdp() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    let c = supplier(&api, "Initech").await;
    let lines = json!([
        {"Description": "Gross salary", "Quantity": 1, "UnitAmount": 5000.00, "AccountCode": "477", "TaxType": "NONE", "LineAmount": 5000.00},
        {"Description": "Management fee", "Quantity": 2, "UnitAmount": 249.995, "AccountCode": "412", "TaxType": "INPUT2"}
    ]);
    let (s, b) = api
        .put("/Invoices?unitdp=4", bill(&c, "EOR-1001", lines))
        .await;
    assert_eq!(s, 200, "{b}");
    let inv = &b["Invoices"][0];
    assert_eq!(inv["Type"], "ACCPAY");
    assert_eq!(inv["Status"], "AUTHORISED");
    assert_eq!(inv["LineItems"][1]["UnitAmount"], json!(249.995));
    assert_eq!(inv["LineItems"][1]["LineAmount"], json!(499.99));
    assert_eq!(inv["LineItems"][1]["TaxAmount"], json!(100.0));
    assert_eq!(inv["SubTotal"], json!(5499.99));
    assert_eq!(inv["TotalTax"], json!(100.0));
    assert_eq!(inv["Total"], json!(5599.99));
    assert_eq!(inv["AmountDue"], json!(5599.99));
    // Reference is ACCREC only (xero_accounting.yaml): ignored on a bill,
    // without an error.
    assert!(inv.get("Reference").is_none(), "{inv}");
    assert_eq!(inv["Url"], "https://platform.example/invoices/1");
    assert_eq!(inv["DateString"], "2026-11-25T00:00:00");
    assert_eq!(inv["Date"], "/Date(1795564800000+0000)/");
    assert_eq!(inv["Contact"]["ContactID"], c.as_str());
    let id = inv["InvoiceID"].as_str().unwrap();
    // Inclusive.
    let mut body = bill(
        &c,
        "EOR-1002",
        json!([{"Description": "Fee", "Quantity": 1, "UnitAmount": 120, "AccountCode": "412", "TaxType": "INPUT2"}]),
    );
    body["Invoices"][0]["LineAmountTypes"] = json!("Inclusive");
    let (_, b) = api.put("/Invoices", body).await;
    assert_eq!(b["Invoices"][0]["Total"], json!(120.0));
    assert_eq!(b["Invoices"][0]["TotalTax"], json!(20.0));
    assert_eq!(b["Invoices"][0]["SubTotal"], json!(100.0));
    // NoTax.
    let mut body = bill(
        &c,
        "EOR-1003",
        json!([{"Description": "Deposit", "Quantity": 1, "UnitAmount": 300, "AccountCode": "830", "TaxType": "INPUT2"}]),
    );
    body["Invoices"][0]["LineAmountTypes"] = json!("NoTax");
    let (_, b) = api.put("/Invoices", body).await;
    assert_eq!(b["Invoices"][0]["Total"], json!(300.0));
    assert_eq!(b["Invoices"][0]["LineItems"][0]["TaxType"], "NONE");
    // GET by id, by number, and list with where.
    let (s, b) = api.get(&format!("/Invoices/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(b["Invoices"][0]["InvoiceNumber"], "EOR-1001");
    let (_, b) = api.get(&format!("/Invoices?where=InvoiceNumber%3D%3D%22EOR-1001%22%20AND%20Contact.ContactID%3D%3DGuid(%22{c}%22)")).await;
    assert_eq!(b["Invoices"].as_array().unwrap().len(), 1);
    let (_, b) = api
        .get("/Invoices?where=Type%3D%3D%22ACCPAY%22&page=1")
        .await;
    assert_eq!(b["Invoices"].as_array().unwrap().len(), 3);
    assert_eq!(b["pagination"]["itemCount"], 3);
    let (_, b) = api.get("/Invoices?page=2").await;
    assert_eq!(b["Invoices"].as_array().unwrap().len(), 0);
    // Update via POST with InvoiceID.
    let (s, b) = api
        .post(
            "/Invoices",
            json!({"Invoices": [{"InvoiceID": id, "Reference": "changed"}]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert!(b["Invoices"][0].get("Reference").is_none(), "{b}");
    assert_eq!(b["Invoices"][0]["Total"], json!(5599.99));
    // Duplicates counter: same Type + number + contact twice.
    let (s, _) = api
        .put(
            "/Invoices",
            bill(
                &c,
                "EOR-1001",
                json!([{"Description": "x", "Quantity": 1, "UnitAmount": 1, "AccountCode": "412"}]),
            ),
        )
        .await;
    assert_eq!(s, 200, "ACCPAY numbers are not unique in Xero");
    assert_eq!(sim.counters().duplicates, 1);
    assert_eq!(sim.documents(HOLDINGS).unwrap().invoices.len(), 4);
}

#[tokio::test]
async fn validation_exceptions() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    let c = supplier(&api, "Umbrella").await;
    let cases = [
        (
            json!([{"Description": "a", "Quantity": 1, "UnitAmount": 10, "AccountCode": "401"}]),
            "GBP",
            "Account code '401' has been archived, or has been deleted. Each line item must reference a valid account.",
        ),
        (
            json!([{"Description": "a", "Quantity": 1, "UnitAmount": 10, "AccountCode": "999"}]),
            "GBP",
            "Account code '999' is not a valid code for this document.",
        ),
        (
            json!([{"Description": "a", "Quantity": 1, "UnitAmount": 10, "AccountCode": "412", "TaxType": "BOGUS"}]),
            "GBP",
            "The TaxType code 'BOGUS' does not exist or cannot be used for this type of transaction.",
        ),
        (
            json!([{"Description": "a", "Quantity": 1, "UnitAmount": 10, "AccountCode": "412"}]),
            "JPY",
            "Organisation is not subscribed to currency JPY",
        ),
        (
            json!([{"Description": "a", "Quantity": 2, "UnitAmount": 10, "AccountCode": "412", "LineAmount": 25}]),
            "GBP",
            "The line total 25 does not match the expected line total 20",
        ),
        // Once a panic ("Multiplication overflowed"): 1e10 x 1e10 x 1e10.
        (
            json!([{"Description": "a", "Quantity": 9999999999u64, "UnitAmount": 9999999999u64, "DiscountRate": -9999999999i64, "AccountCode": "412"}]),
            "GBP",
            "Discount rate must be between 0 and 100",
        ),
    ];
    for (lines, cur, msg) in cases {
        let mut body = bill(&c, "B-1", lines);
        body["Invoices"][0]["CurrencyCode"] = json!(cur);
        let (s, b) = api.put("/Invoices", body).await;
        assert_eq!(s, 400, "{b}");
        assert_eq!(b["Type"], "ValidationException");
        let m = messages(&b);
        assert!(m.iter().any(|x| x.starts_with(msg)), "{m:?} vs {msg}");
        assert_eq!(b["Elements"][0]["InvoiceNumber"], "B-1");
    }
    // Missing contact, bad date.
    let (s, b) = api
        .put(
            "/Invoices",
            json!({"Type": "ACCPAY", "Date": "25/11/2026", "LineItems": []}),
        )
        .await;
    assert_eq!(s, 400);
    let m = messages(&b);
    assert!(
        m.contains(&"A Contact must be specified for this type of transaction".to_string()),
        "{m:?}"
    );
    assert!(m.iter().any(|x| x.contains("not a valid date")), "{m:?}");
    // Nothing was created.
    assert!(sim.documents(HOLDINGS).unwrap().invoices.is_empty());
    // Malformed JSON.
    let r = api
        .req(Method::PUT, "/Invoices")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The simulator is still up and answering.
    assert_eq!(api.get("/Organisation").await.0, 200);
}

#[tokio::test]
async fn hostile_where_and_order_are_answered_not_a_crash() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    // 60,000 `!`s (a URI stays under 64 KiB) once overflowed the parser's
    // stack and took the process (and the demo's daemon with it) down.
    let deep = format!("/Contacts?where={}Name%3D%3D%22x%22", "!".repeat(60_000));
    let r = api.req(Method::GET, &deep).send().await.unwrap();
    assert_eq!(r.status(), 400);
    // Names that once made the order inconsistent (a date against text
    // that looks like one), over the 20 items where sort_by checks.
    for i in 0..25 {
        let name = if i % 2 == 0 {
            format!("/Date({}000+0000)/", 99999999999u64 - i)
        } else {
            format!("2000-01-01 {i}")
        };
        let (s, b) = api
            .put("/Contacts", json!({"Contacts": [{"Name": name}]}))
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, b) = api.get("/Contacts?order=Name").await;
    assert_eq!(s, 200, "{b}");
    assert!(b["Contacts"].as_array().unwrap().len() >= 25);
    let (s, _) = api.get("/Contacts?order=Name%20DESC").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn summarize_errors_false_reports_per_element() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    let c = supplier(&api, "Hooli").await;
    let good = bill(
        &c,
        "OK-1",
        json!([{"Description": "a", "Quantity": 1, "UnitAmount": 10, "AccountCode": "412"}]),
    )["Invoices"][0]
        .clone();
    let bad = bill(
        &c,
        "BAD-1",
        json!([{"Description": "a", "Quantity": 1, "UnitAmount": 10, "AccountCode": "401"}]),
    )["Invoices"][0]
        .clone();
    let (s, b) = api
        .put(
            "/Invoices?summarizeErrors=false",
            json!({"Invoices": [good, bad]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let items = b["Invoices"].as_array().unwrap();
    assert_eq!(items[0]["StatusAttributeString"], "OK");
    assert_eq!(items[1]["StatusAttributeString"], "ERROR");
    assert_eq!(items[1]["HasErrors"], true);
    assert!(
        items[1]["ValidationErrors"][0]["Message"]
            .as_str()
            .unwrap()
            .contains("archived")
    );
    assert_eq!(sim.documents(HOLDINGS).unwrap().invoices.len(), 1);
}

#[tokio::test]
async fn idempotency_replay_and_mismatch() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    let c = supplier(&api, "Stark").await;
    let body = bill(
        &c,
        "ID-1",
        json!([{"Description": "a", "Quantity": 1, "UnitAmount": 10, "AccountCode": "412"}]),
    );
    let send = |b: &Value, key: &str| {
        api.req(Method::PUT, "/Invoices")
            .header("Idempotency-Key", key)
            .json(b)
            .send()
    };
    let (s1, b1) = parse(send(&body, "k-1").await.unwrap()).await;
    let (s2, b2) = parse(send(&body, "k-1").await.unwrap()).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(b1, b2, "replay returns the first response");
    assert_eq!(sim.documents(HOLDINGS).unwrap().invoices.len(), 1);
    assert_eq!(sim.counters().idempotent_replays, 1);
    let mut other = body.clone();
    other["Invoices"][0]["InvoiceNumber"] = json!("ID-2");
    let (s, b) = parse(send(&other, "k-1").await.unwrap()).await;
    assert_eq!(s, 400);
    assert!(
        b["Message"]
            .as_str()
            .unwrap()
            .contains("Idempotency key has been used with a different request")
    );
    // After the TTL the key is forgotten.
    sim.advance_secs(361);
    let (s, _) = parse(send(&other, "k-1").await.unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(sim.documents(HOLDINGS).unwrap().invoices.len(), 2);
}

#[tokio::test]
async fn attachments_on_invoices_and_credit_notes() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    let c = supplier(&api, "Wayne").await;
    let (_, b) = api.put("/Invoices", bill(&c, "AT-1", json!([{"Description": "a", "Quantity": 1, "UnitAmount": 10, "AccountCode": "412"}]))).await;
    let id = b["Invoices"][0]["InvoiceID"].as_str().unwrap().to_string();
    let pdf = b"%PDF-1.4 fake\x00\xff".to_vec();
    let r = api
        .req(Method::PUT, &format!("/Invoices/{id}/Attachments/AT-1.pdf"))
        .header("content-type", "application/pdf")
        .body(pdf.clone())
        .send()
        .await
        .unwrap();
    let (s, b) = parse(r).await;
    assert_eq!(s, 200, "{b}");
    let a = &b["Attachments"][0];
    assert_eq!(a["FileName"], "AT-1.pdf");
    assert_eq!(a["MimeType"], "application/pdf");
    assert_eq!(a["ContentLength"], pdf.len());
    assert!(
        a["Url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/Invoices/{id}/Attachments/AT-1.pdf"))
    );
    let (_, b) = api.get(&format!("/Invoices/{id}/Attachments")).await;
    assert_eq!(b["Attachments"].as_array().unwrap().len(), 1);
    let got = api
        .req(Method::GET, &format!("/Invoices/{id}/Attachments/AT-1.pdf"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.bytes().await.unwrap().to_vec(), pdf);
    let (_, b) = api.get(&format!("/Invoices/{id}")).await;
    assert_eq!(b["Invoices"][0]["HasAttachments"], true);
    // Credit note too.
    let (_, b) = api.put("/CreditNotes", json!({"CreditNotes": [{"Type": "ACCPAYCREDIT", "Contact": {"ContactID": c}, "Date": "2026-11-26", "Status": "AUTHORISED", "CreditNoteNumber": "CN-9", "LineItems": [{"Description": "refund", "Quantity": 1, "UnitAmount": 5, "AccountCode": "412"}]}]})).await;
    let cn = b["CreditNotes"][0]["CreditNoteID"]
        .as_str()
        .unwrap()
        .to_string();
    let r = api
        .req(
            Method::POST,
            &format!("/CreditNotes/{cn}/Attachments/cn.pdf"),
        )
        .body(pdf.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, b) = api.get(&format!("/CreditNotes/{cn}/Attachments")).await;
    assert_eq!(b["Attachments"][0]["FileName"], "cn.pdf");
    assert_eq!(sim.documents(HOLDINGS).unwrap().attachments.len(), 2);
    // Unknown document.
    let r = api
        .req(
            Method::PUT,
            &format!("/Invoices/{}/Attachments/x.pdf", uuid::Uuid::new_v4()),
        )
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn allocations_full_partial_and_too_big() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    let c = supplier(&api, "Acme Payroll").await;
    let (_, b) = api.put("/Invoices", bill(&c, "AL-1", json!([{"Description": "a", "Quantity": 1, "UnitAmount": 100, "AccountCode": "412", "TaxType": "NONE"}]))).await;
    let inv = b["Invoices"][0]["InvoiceID"].as_str().unwrap().to_string();
    let cn_body = |n: &str, amt: i64| json!({"CreditNotes": [{"Type": "ACCPAYCREDIT", "Contact": {"ContactID": c}, "Date": "2026-11-26", "Status": "AUTHORISED", "CreditNoteNumber": n, "LineItems": [{"Description": "r", "Quantity": 1, "UnitAmount": amt, "AccountCode": "412", "TaxType": "NONE"}]}]});
    let (_, b) = api.put("/CreditNotes", cn_body("CN-1", 30)).await;
    let cn1 = b["CreditNotes"][0]["CreditNoteID"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(b["CreditNotes"][0]["RemainingCredit"], json!(30.0));
    // Too big for the credit note.
    let (s, b) = api.put(&format!("/CreditNotes/{cn1}/Allocations"), json!({"Allocations": [{"Amount": 40, "Date": "2026-11-26", "Invoice": {"InvoiceID": inv}}]})).await;
    assert_eq!(s, 400);
    assert_eq!(b["Type"], "ValidationException");
    assert!(
        messages(&b).iter().any(|m| m.contains("remaining credit")),
        "{b}"
    );
    // Partial.
    let (s, b) = api.put(&format!("/CreditNotes/{cn1}/Allocations"), json!({"Allocations": [{"Amount": 10, "Date": "2026-11-26", "Invoice": {"InvoiceID": inv}}]})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["Allocations"][0]["Amount"], json!(10.0));
    let (_, b) = api.get(&format!("/Invoices/{inv}")).await;
    assert_eq!(b["Invoices"][0]["AmountDue"], json!(90.0));
    assert_eq!(b["Invoices"][0]["AmountCredited"], json!(10.0));
    let (_, b) = api.get(&format!("/CreditNotes/{cn1}")).await;
    assert_eq!(b["CreditNotes"][0]["RemainingCredit"], json!(20.0));
    // Full remaining credit.
    let (s, _) = api.put(&format!("/CreditNotes/{cn1}/Allocations"), json!({"Allocations": [{"Amount": 20, "Date": "2026-11-26", "Invoice": {"InvoiceID": inv}}]})).await;
    assert_eq!(s, 200);
    let (_, b) = api.get(&format!("/CreditNotes/{cn1}")).await;
    assert_eq!(b["CreditNotes"][0]["RemainingCredit"], json!(0.0));
    assert_eq!(b["CreditNotes"][0]["Status"], "PAID");
    // Too big for the invoice (70 due, 80 credit).
    let (_, b) = api.put("/CreditNotes", cn_body("CN-2", 80)).await;
    let cn2 = b["CreditNotes"][0]["CreditNoteID"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, b) = api.put(&format!("/CreditNotes/{cn2}/Allocations"), json!({"Allocations": [{"Amount": 75, "Date": "2026-11-26", "Invoice": {"InvoiceID": inv}}]})).await;
    assert_eq!(s, 400);
    assert!(messages(&b).iter().any(|m| m.contains("amount due")), "{b}");
    // Exactly the amount due pays the invoice.
    let (s, _) = api.put(&format!("/CreditNotes/{cn2}/Allocations"), json!({"Allocations": [{"Amount": 70, "Date": "2026-11-27", "Invoice": {"InvoiceID": inv}}]})).await;
    assert_eq!(s, 200);
    let (_, b) = api.get(&format!("/Invoices/{inv}")).await;
    assert_eq!(b["Invoices"][0]["AmountDue"], json!(0.0));
    assert_eq!(b["Invoices"][0]["Status"], "PAID");
    assert_eq!(sim.documents(HOLDINGS).unwrap().allocations.len(), 3);
}

/// `Reference` is "ACCREC only" on an invoice and "ACCRECCREDIT only" on a
/// credit note (xero_accounting.yaml): a sales invoice and a sales credit
/// note keep it, a supplier credit note ignores it (no error), and what a
/// supplier credit note corrects can be written in its history instead.
#[tokio::test]
async fn reference_is_for_sales_documents_and_history_notes_are_kept() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    let c = supplier(&api, "Hooli").await;
    let line = json!([{"Description": "a", "Quantity": 1, "UnitAmount": 10, "AccountCode": "412"}]);
    let mut sale = bill(&c, "INV-S-1", line.clone());
    sale["Invoices"][0]["Type"] = json!("ACCREC");
    sale["Invoices"][0]["LineItems"][0]["AccountCode"] = json!("200");
    let (s, b) = api.put("/Invoices", sale).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["Invoices"][0]["Reference"], "EOR Nov");
    for (ty, code, kept) in [
        ("ACCRECCREDIT", "200", true),
        ("ACCPAYCREDIT", "412", false),
    ] {
        let (s, b) = api
            .put(
                "/CreditNotes",
                json!({"CreditNotes": [{
                    "Type": ty, "Contact": {"ContactID": c}, "Date": "2026-11-25",
                    "Status": "DRAFT", "Reference": "INV-S-1", "CreditNoteNumber": format!("CN-{ty}"),
                    "LineItems": [{"Description": "a", "Quantity": 1, "UnitAmount": 10, "AccountCode": code}]
                }]}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let cn = &b["CreditNotes"][0];
        if kept {
            assert_eq!(cn["Reference"], "INV-S-1", "{cn}");
        } else {
            assert!(cn.get("Reference").is_none(), "{cn}");
        }
    }
    let id = sim.documents(HOLDINGS).unwrap().credit_notes[1]["CreditNoteID"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, b) = api.get(&format!("/CreditNotes/{id}/History")).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["HistoryRecords"], json!([]));
    let (s, b) = api
        .put(
            &format!("/CreditNotes/{id}/History"),
            json!({"HistoryRecords": [{"Details": "Credits bill INV-S-1"}]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["HistoryRecords"][0]["Details"], "Credits bill INV-S-1");
    assert_eq!(b["HistoryRecords"][0]["ValidationErrors"], json!([]));
    let (_, b) = api.get(&format!("/CreditNotes/{id}/History")).await;
    let records = b["HistoryRecords"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{b}");
    assert_eq!(records[0]["Changes"], "Note");
    assert_eq!(records[0]["Details"], "Credits bill INV-S-1");
    let docs = sim.documents(HOLDINGS).unwrap();
    assert_eq!(docs.history.len(), 1);
    assert_eq!(docs.history[0]["Owner"], format!("CreditNotes/{id}"));
    // A note needs words; an unknown document is 404.
    let (s, b) = api
        .put(
            &format!("/CreditNotes/{id}/History"),
            json!({"HistoryRecords": [{"Details": " "}]}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(messages(&b), vec!["The Details field is required."]);
    let (s, _) = api
        .put(
            &format!("/CreditNotes/{}/History", uuid::Uuid::new_v4()),
            json!({"HistoryRecords": [{"Details": "x"}]}),
        )
        .await;
    assert_eq!(s, 404);
}
