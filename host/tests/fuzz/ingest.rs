//! The ingest validator (`ingest::validate`, `Document`) and the HTTP ingest
//! route: near-valid documents with random mutations, raw bytes and mangled
//! JSON text. Nothing panics; an accepted document keeps the documented
//! invariants and round-trips; a refused one names its fields.

use crate::arb::{self, Mutation};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use ledgerport::api::{ApiState, router};
use ledgerport::document::{Document, DocumentKind, Pdf, TaxBasis};
use ledgerport::ingest::{FieldProblem, validate};
use ledgerport::store::Store;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;
use tower::ServiceExt;

/// Fields the validator requires; a document missing one must be refused
/// naming it.
const REQUIRED: &[&str] = &[
    "id",
    "tenant_id",
    "kind",
    "number",
    "issue_date",
    "currency",
    "subtotal",
    "total_tax",
    "total",
    "supplier",
    "customer",
    "lines",
];

/// `-?digits(.digits)?` with leading zeros of the integer part and trailing
/// zeros of the fraction dropped, `-0` as `0`: two texts are the same amount
/// exactly when their canonical forms are equal (no floats, no Decimal).
fn canonical(text: &str) -> Option<String> {
    let (neg, body) = match text.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, text),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || (body.contains('.') && frac.is_empty()) {
        return None;
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let zero = int == "0" && frac.is_empty();
    let sign = if neg && !zero { "-" } else { "" };
    Some(if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

/// An amount the platform sent and the one ledgerport kept are the same
/// number, digit for digit.
fn assert_exact(sent: Option<&Value>, kept: Decimal, field: &str) {
    let sent = sent.and_then(Value::as_str).unwrap_or_default();
    let c = canonical(sent);
    assert!(
        c.is_some(),
        "{field}: accepted {sent:?}, which is not a plain decimal"
    );
    assert_eq!(
        c,
        canonical(&kept.to_string()),
        "{field}: {sent:?} was kept as {kept}"
    );
}

fn is_date(s: &str) -> bool {
    s.len() == 10
        && s.bytes().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
        && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

/// What an accepted document must satisfy (README, "Running the daemon":
/// ISO 4217 currency, decimal strings, line totals and tax reconciling with
/// the document totals, dates, a credit note's invoice).
fn check_accepted(json: &Value, doc: &Document, catalogue: Option<&BTreeSet<String>>) {
    for key in ["id", "tenant_id", "number"] {
        let v = json[key].as_str().unwrap();
        assert!(!v.trim().is_empty() && v.len() <= 255, "{key}: {v:?}");
    }
    assert!(ledgerport::ingest::is_currency(&doc.currency));
    assert!(is_date(&doc.issue_date), "issue_date {:?}", doc.issue_date);
    if let Some(d) = &doc.due_date {
        assert!(is_date(d) && d >= &doc.issue_date, "due_date {d:?}");
    }
    assert!(!doc.lines.is_empty());
    // Money in the currency's decimals.
    let minor = ledgerport::ingest::minor_units(&doc.currency);
    for (what, amount) in [
        ("subtotal", doc.subtotal),
        ("total_tax", doc.total_tax),
        ("total", doc.total),
    ]
    .into_iter()
    .chain(
        doc.lines
            .iter()
            .flat_map(|l| [("line_amount", l.line_amount), ("tax_amount", l.tax_amount)]),
    ) {
        assert!(
            amount.normalize().scale() <= minor,
            "{what} {amount} in {}",
            doc.currency
        );
    }
    assert_exact(json.get("subtotal"), doc.subtotal, "subtotal");
    assert_exact(json.get("total_tax"), doc.total_tax, "total_tax");
    assert_exact(json.get("total"), doc.total, "total");
    let (mut sum_la, mut sum_tax) = (Decimal::ZERO, Decimal::ZERO);
    for (i, l) in doc.lines.iter().enumerate() {
        let raw = &json["lines"][i];
        assert_exact(raw.get("quantity"), l.quantity, "quantity");
        assert_exact(raw.get("unit_amount"), l.unit_amount, "unit_amount");
        assert_exact(raw.get("tax_amount"), l.tax_amount, "tax_amount");
        assert_exact(raw.get("line_amount"), l.line_amount, "line_amount");
        let expected = l
            .quantity
            .checked_mul(l.unit_amount)
            .expect("an accepted line's quantity x unit_amount fits")
            .round_dp(minor);
        let diff = l
            .line_amount
            .checked_sub(expected)
            .expect("difference fits");
        assert!(
            diff.abs() <= Decimal::new(1, minor),
            "lines[{i}] does not reconcile"
        );
        if let Some(cat) = catalogue {
            assert!(
                cat.contains(&l.kind),
                "lines[{i}].kind {:?} not in catalogue",
                l.kind
            );
        }
        sum_la = sum_la.checked_add(l.line_amount).expect("sum fits");
        sum_tax = sum_tax.checked_add(l.tax_amount).expect("sum fits");
    }
    assert_eq!(sum_tax, doc.total_tax);
    match doc.tax_basis {
        TaxBasis::Inclusive => {
            assert_eq!(sum_la, doc.total);
            assert_eq!(doc.total.checked_sub(doc.total_tax), Some(doc.subtotal));
        }
        TaxBasis::Exclusive | TaxBasis::NoTax => {
            assert_eq!(sum_la, doc.subtotal);
            assert_eq!(doc.subtotal.checked_add(doc.total_tax), Some(doc.total));
        }
    }
    if doc.tax_basis == TaxBasis::NoTax {
        assert!(doc.total_tax.is_zero());
        assert!(
            doc.lines.iter().all(|l| l.tax_amount.is_zero()),
            "a no-tax document with tax on a line"
        );
    }
    assert!(
        !doc.total.is_sign_negative() || doc.total.is_zero(),
        "a document below zero: {}",
        doc.total
    );
    match doc.kind {
        DocumentKind::CreditNote => assert!(
            doc.credits_invoice_number
                .as_deref()
                .is_some_and(|n| !n.trim().is_empty())
        ),
        DocumentKind::Invoice => assert!(doc.credits_invoice_number.is_none()),
    }
    // The contract's view carries the same amounts, as plain decimals.
    let w = doc.to_wit().expect("an accepted document converts");
    assert_eq!(w.lines.len(), doc.lines.len());
    for (wl, l) in w.lines.iter().zip(&doc.lines) {
        assert_eq!(
            canonical(&wl.line_amount),
            canonical(&l.line_amount.to_string())
        );
        assert_eq!(
            canonical(&wl.unit_amount),
            canonical(&l.unit_amount.to_string())
        );
    }
    assert_eq!(canonical(&w.total), canonical(&doc.total.to_string()));
    if let Some(Pdf::Base64(_)) = &doc.pdf {
        assert!(matches!(
            w.pdf,
            Some(ledgerport::runtime::v0_1::ledgerport::connector::types::Pdf::Bytes(_))
        ));
    }
    // Round trip: what is stored (the canonical JSON) validates to the
    // same document.
    let stored = serde_json::to_value(doc).unwrap();
    let again =
        validate(&stored, catalogue).expect("the stored form of an accepted document is valid");
    assert_eq!(&again, doc);
    assert!(ledgerport::ingest::differences(doc, &again).is_empty());
}

/// A field path: `key`, `party.key`, `lines[3]`, `lines[3].key`.
fn is_field_path(f: &str) -> bool {
    let seg = |s: &str| {
        let name = s.split('[').next().unwrap_or("");
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
            && s[name.len()..].strip_prefix('[').is_none_or(|rest| {
                rest.strip_suffix(']')
                    .is_some_and(|n| n.parse::<usize>().is_ok())
            })
    };
    f.split('.').all(seg)
}

/// Whether `field` is `key`, `supplier.key`, `customer.key` or
/// `lines[i].key` for a key present in that object of `json`.
fn names_a_present_key(json: &Value, field: &str) -> bool {
    let has = |v: &Value, k: &str| v.as_object().is_some_and(|o| o.contains_key(k));
    if has(json, field) {
        return true;
    }
    for party in ["supplier", "customer"] {
        if let Some(k) = field.strip_prefix(party).and_then(|r| r.strip_prefix('.'))
            && has(&json[party], k)
        {
            return true;
        }
    }
    if let Some(rest) = field.strip_prefix("lines[")
        && let Some((i, k)) = rest.split_once("].")
        && let Ok(i) = i.parse::<usize>()
    {
        return has(&json["lines"][i], k);
    }
    false
}

/// What a refusal must satisfy: at least one problem, each naming a field
/// (never the whole document when the input is an object), in words.
fn check_refused(json: &Value, problems: &[FieldProblem]) {
    assert!(!problems.is_empty(), "refused without a reason");
    for p in problems {
        if p.message.starts_with("is not a field here") {
            // An unknown key is named as sent, whatever its characters.
            assert!(
                names_a_present_key(json, &p.field),
                "{:?} is not a key of the document",
                p.field
            );
            continue;
        }
        assert!(is_field_path(&p.field), "not a field: {:?}", p.field);
        assert!(!p.message.trim().is_empty(), "{}: no message", p.field);
        if json.is_object() {
            assert_ne!(
                p.field, "document",
                "{}: the field at fault is not named",
                p.message
            );
        }
    }
    if let Some(obj) = json.as_object() {
        for key in REQUIRED {
            if !obj.contains_key(*key) {
                assert!(
                    problems.iter().any(|p| p.field == *key),
                    "missing {key} is not named: {problems:?}"
                );
            }
        }
    }
}

fn check(json: &Value, catalogue: Option<&BTreeSet<String>>) -> bool {
    match validate(json, catalogue) {
        Ok(doc) => {
            check_accepted(json, &doc, catalogue);
            true
        }
        Err(problems) => {
            check_refused(json, &problems);
            false
        }
    }
}

fn catalogue() -> impl Strategy<Value = Option<BTreeSet<String>>> {
    prop::option::of(prop::sample::subsequence(arb::KINDS, 0..=arb::KINDS.len()))
        .prop_map(|o| o.map(|v| v.into_iter().map(str::to_string).collect()))
}

#[test]
fn generated_documents_are_accepted_and_round_trip() {
    TestRunner::new(arb::config(256))
        .run(&arb::valid_document(), |doc| {
            let doc_ok = validate(&doc, None);
            prop_assert!(doc_ok.is_ok(), "{doc_ok:?}\n{doc:#}");
            check(&doc, None);
            Ok(())
        })
        .unwrap();
}

#[test]
fn mutated_documents_never_panic_and_keep_the_invariants() {
    let strategy = (arb::valid_document(), arb::mutations(4), catalogue());
    TestRunner::new(arb::config(768))
        .run(
            &strategy,
            |(mut doc, ms, cat): (Value, Vec<Mutation>, _)| {
                arb::apply(&mut doc, &ms);
                check(&doc, cat.as_ref());
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn any_json_value_never_panics() {
    TestRunner::new(arb::config(256))
        .run(&arb::odd_value(), |v| {
            check(&v, None);
            Ok(())
        })
        .unwrap();
}

fn parse_and_check(bytes: &[u8]) {
    let _ = Document::from_json(bytes);
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        check(&v, None);
    }
}

#[test]
fn raw_bytes_never_panic() {
    TestRunner::new(arb::config(512))
        .run(&prop::collection::vec(any::<u8>(), 0..512), |bytes| {
            parse_and_check(&bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn mangled_document_text_never_panics() {
    let strategy = (arb::valid_document(), arb::byte_edits());
    TestRunner::new(arb::config(512))
        .run(&strategy, |(doc, edits)| {
            let mut bytes = serde_json::to_vec(&doc).unwrap();
            arb::apply_bytes(&mut bytes, &edits);
            parse_and_check(&bytes);
            Ok(())
        })
        .unwrap();
}

/// The ingest route end to end (router, auth, validation, SQLite store):
/// every answer is one of the documented statuses, 4xx name their fields,
/// and a document is stored exactly when the validator accepts it.
#[test]
fn http_ingest_answers_every_body_with_a_documented_status() {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fuzz.db");
    let store = tokio
        .block_on(Store::open_and_migrate(db.to_str().unwrap()))
        .unwrap();
    tokio
        .block_on(store.upsert_tenant("acme", "Acme", &[], 0))
        .unwrap();
    let key = "fuzz-service-key";
    let app = router(Arc::new(ApiState {
        store,
        service_key_hashes: vec![ledgerport::crypto::sha256_hex(key)],
        catalogue: None,
        kinds: Default::default(),
        on_ingest: Box::new(|| {}),
    }));
    let body = prop_oneof![
        4 => (arb::valid_document(), arb::mutations(3), 0usize..4).prop_map(|(mut d, ms, id)| {
            arb::apply(&mut d, &ms);
            // A small pool of ids, so the same id comes back (200 / 409).
            if d.get("id").is_some_and(Value::is_string) {
                d["id"] = Value::String(format!("doc-{id}"));
            }
            serde_json::to_vec(&d).unwrap()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => (arb::valid_document(), arb::byte_edits()).prop_map(|(d, e)| {
            let mut b = serde_json::to_vec(&d).unwrap();
            arb::apply_bytes(&mut b, &e);
            b
        }),
    ];
    TestRunner::new(arb::config(192))
        .run(&body, |bytes| {
            let req = Request::post("/v1/documents")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Body::from(bytes.clone()))
                .unwrap();
            let resp = tokio.block_on(app.clone().oneshot(req)).unwrap();
            let status = resp.status();
            let body = tokio
                .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
                .unwrap();
            let answer: Value = serde_json::from_slice(&body).expect("the answer is JSON");
            let parsed = serde_json::from_slice::<Value>(&bytes).ok();
            let valid = parsed.as_ref().map(|v| validate(v, None));
            match status {
                StatusCode::ACCEPTED | StatusCode::OK => {
                    prop_assert!(matches!(valid, Some(Ok(_))), "stored an invalid document");
                    prop_assert_eq!(answer["tenant_id"].as_str(), Some("acme"));
                }
                StatusCode::BAD_REQUEST => prop_assert!(parsed.is_none()),
                StatusCode::UNPROCESSABLE_ENTITY | StatusCode::CONFLICT => {
                    if status == StatusCode::CONFLICT {
                        prop_assert!(matches!(valid, Some(Ok(_))));
                    }
                    let problems = answer["problems"].as_array().expect("problems listed");
                    prop_assert!(!problems.is_empty());
                    for p in problems {
                        let f = p["field"].as_str().unwrap_or_default();
                        let unknown = p["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("is not a field here"));
                        prop_assert!(
                            if unknown {
                                parsed.as_ref().is_some_and(|v| names_a_present_key(v, f))
                            } else {
                                is_field_path(f)
                            },
                            "not a field: {f:?}"
                        );
                        prop_assert!(!p["message"].as_str().unwrap_or_default().is_empty());
                    }
                }
                other => prop_assert!(false, "unexpected status {other}: {answer}"),
            }
            Ok(())
        })
        .unwrap();
}

// Regression cases found by the properties above (each panicked or was
// accepted wrongly before the fix in `ingest.rs`).

fn sample() -> Value {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/documents/invoice.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn regression_quantity_times_unit_amount_overflow_is_refused_not_a_panic() {
    let mut v = sample();
    v["lines"][0]["quantity"] = "79228162514264337593543950335".into();
    v["lines"][0]["unit_amount"] = "2".into();
    let errs = validate(&v, None).unwrap_err();
    assert!(
        errs.iter().any(|e| e.field == "lines[0].line_amount"),
        "{errs:?}"
    );
}

#[test]
fn regression_totals_that_overflow_are_refused_not_a_panic() {
    let mut v = sample();
    let max = "79228162514264337593543950335";
    for i in 0..2 {
        v["lines"][i]["quantity"] = "1".into();
        v["lines"][i]["unit_amount"] = max.into();
        v["lines"][i]["line_amount"] = max.into();
    }
    v["subtotal"] = max.into();
    v["total"] = max.into();
    let errs = validate(&v, None).unwrap_err();
    assert!(errs.iter().any(|e| e.field == "subtotal"), "{errs:?}");
    // subtotal + total_tax overflowing, every line fine on its own.
    let mut v = sample();
    v["total_tax"] = max.into();
    v["subtotal"] = max.into();
    assert!(validate(&v, None).is_err());
}

#[test]
fn regression_amounts_are_never_rounded_or_loosely_parsed() {
    for bad in [
        "0.00000000000000000000000000001",
        "1_000",
        "+5",
        "5.",
        ".5",
        " 5",
    ] {
        let mut v = sample();
        v["lines"][0]["tax_amount"] = bad.into();
        let errs = validate(&v, None).unwrap_err();
        assert!(
            errs.iter().any(|e| e.field == "lines[0].tax_amount"),
            "{bad:?}: {errs:?}"
        );
    }
}

#[test]
fn regression_dates_must_be_yyyy_mm_dd() {
    for bad in ["2026-1-2", "+2026-01-02"] {
        let mut v = sample();
        v["issue_date"] = bad.into();
        v.as_object_mut().unwrap().remove("due_date");
        let errs = validate(&v, None).unwrap_err();
        assert_eq!(errs[0].field, "issue_date", "{bad:?}");
    }
}

#[test]
fn regression_wrongly_typed_optional_fields_are_named() {
    for (path, value, field) in [
        ("/tax_basis", Value::Null, "tax_basis"),
        ("/tax_basis", "gross".into(), "tax_basis"),
        ("/url", 5.into(), "url"),
        ("/pdf", "x".into(), "pdf"),
        ("/supplier/email", true.into(), "supplier.email"),
        (
            "/supplier/address_lines",
            Value::Null,
            "supplier.address_lines",
        ),
        ("/lines/1/employee", 1.into(), "lines[1].employee"),
        ("/lines/2", 7.into(), "lines[2]"),
    ] {
        let mut v = sample();
        *v.pointer_mut(path).unwrap_or_else(|| panic!("{path}")) = value;
        let errs = validate(&v, None).unwrap_err();
        assert!(errs.iter().any(|e| e.field == field), "{field}: {errs:?}");
    }
}
