//! The Xero connector's translation run natively against the SDK's host
//! stand-in: what it sends for a bill, without wasm or a simulator (the
//! sandboxed runs are in `host/tests/xero_connector.rs` and the test kit).

use ledgerport_sdk::native::{
    AccountMapping, ConnectionInfo, Error, Host, Method, Request, Response, with_host,
};
use ledgerport_sdk::{
    Connector, Delivery, DeliveryError, Document, DocumentKind, Line, Party, TaxBasis,
};
use serde_json::Value;
use xero_connector::Xero;

#[derive(Default)]
struct Recorder {
    mappings: Vec<AccountMapping>,
    settings: Vec<(String, String)>,
    sent: Vec<(String, String, Option<Value>)>,
}

fn ok(body: &str) -> Response {
    Response {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.as_bytes().to_vec(),
    }
}

impl Host for Recorder {
    fn send(&mut self, req: &Request) -> Result<Response, Error> {
        let method = req.method.as_str().to_string();
        let body = req
            .body
            .as_ref()
            .and_then(|b| serde_json::from_slice(b).ok());
        self.sent.push((method, req.url.clone(), body));
        let path = req.url.split('?').next().unwrap_or_default();
        Ok(match req.method {
            Method::Get if path.ends_with("/Contacts") => ok(
                r#"{"Contacts":[{"ContactID":"c0ffee00-0000-0000-0000-000000000001","ContactStatus":"ACTIVE"}]}"#,
            ),
            Method::Get => ok(r#"{"Invoices":[]}"#),
            Method::Put => ok(
                r#"{"Invoices":[{"InvoiceID":"b111b111-0000-0000-0000-000000000001","Status":"AUTHORISED"}]}"#,
            ),
            _ => ok("{}"),
        })
    }
    fn mappings(&mut self) -> Vec<AccountMapping> {
        self.mappings.clone()
    }
    fn connection(&mut self) -> ConnectionInfo {
        ConnectionInfo {
            connection_id: "c1".into(),
            tenant_id: "acme".into(),
            external_tenant_id: Some("org-1".into()),
            external_tenant_name: None,
            settings: self.settings.clone(),
        }
    }
}

fn party(id: &str, name: &str) -> Party {
    Party {
        id: id.into(),
        name: name.into(),
        tax_number: None,
        email: None,
        address_lines: vec![],
        country: None,
    }
}

fn line(kind: &str, unit: &str) -> Line {
    Line {
        kind: kind.into(),
        description: format!("{kind} for November"),
        quantity: "1".into(),
        unit_amount: unit.into(),
        tax_amount: "0.00".into(),
        line_amount: unit.into(),
        employee: None,
        country: None,
    }
}

fn invoice(lines: Vec<Line>) -> Document {
    Document {
        id: "doc-1".into(),
        kind: DocumentKind::Invoice,
        number: "INV-7".into(),
        issue_date: "2026-11-01".into(),
        due_date: Some("2026-11-15".into()),
        currency: "EUR".into(),
        tax_basis: TaxBasis::Exclusive,
        supplier: party("eor-1", "EOR Platform Ltd"),
        customer: party("acme", "Acme"),
        lines,
        subtotal: "6250.1234".into(),
        total_tax: "0.00".into(),
        total: "6250.1234".into(),
        url: None,
        credits_invoice_number: None,
        pdf: None,
    }
}

fn mapping(kind: &str, code: &str) -> AccountMapping {
    AccountMapping {
        kind: kind.into(),
        account_code: code.into(),
        tax_type: Some("INPUT".into()),
    }
}

#[test]
fn a_bill_goes_out_with_exact_decimals_mapped_accounts_and_the_configured_status() {
    let host = Recorder {
        mappings: vec![mapping("fee", "470"), mapping("salary", "477")],
        settings: vec![("status".into(), "draft".into())],
        ..Default::default()
    };
    let mut salary = line("salary", "6000.1234");
    salary.line_amount = "6000.12".into();
    let doc = invoice(vec![salary, line("fee", "250.00")]);
    let delivery = Delivery {
        key: "key-1".into(),
        attempt: 1,
    };
    let (receipt, host) = with_host(host, || Xero::deliver(delivery, doc));
    let receipt = receipt.expect("delivered");
    assert_eq!(receipt.external_id, "b111b111-0000-0000-0000-000000000001");
    let (_, url, body) = host
        .sent
        .iter()
        .find(|(m, _, _)| m == "PUT")
        .expect("a PUT creates the bill");
    assert!(url.contains("unitdp=4"), "4-decimal unit amounts: {url}");
    let bill = &body.as_ref().expect("JSON body")["Invoices"][0];
    assert_eq!(bill["Type"], "ACCPAY");
    assert_eq!(bill["Status"], "DRAFT");
    assert_eq!(bill["InvoiceNumber"], "INV-7");
    assert_eq!(bill["DueDate"], "2026-11-15");
    assert_eq!(
        bill["Contact"]["ContactID"],
        "c0ffee00-0000-0000-0000-000000000001"
    );
    assert!(bill["Url"].as_str().unwrap().contains("#ledgerport=key-1"));
    let items = bill["LineItems"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    // Exact digits, never through a float.
    assert_eq!(items[0]["UnitAmount"].to_string(), "6000.1234");
    assert_eq!(items[0]["AccountCode"], "477");
    assert_eq!(items[1]["UnitAmount"].to_string(), "250.00");
    assert_eq!(items[1]["AccountCode"], "470");
    assert_eq!(items[1]["TaxType"], "INPUT");
    assert_eq!(items[1]["TaxAmount"].to_string(), "0.00");
}

#[test]
fn unmapped_kinds_are_all_named_before_any_request() {
    let host = Recorder {
        mappings: vec![mapping("fee", "470")],
        ..Default::default()
    };
    let doc = invoice(vec![
        line("salary", "1"),
        line("fee", "1"),
        line("bonus", "1"),
    ]);
    let delivery = Delivery {
        key: "k".into(),
        attempt: 1,
    };
    let (out, host) = with_host(host, || Xero::deliver(delivery, doc));
    match out {
        Err(DeliveryError::NeedsMapping(kinds)) => assert_eq!(kinds, ["bonus", "salary"]),
        other => panic!("expected needs-mapping, got {other:?}"),
    }
    assert!(host.sent.is_empty(), "nothing may be sent");
}

fn refused(doc: Document) -> Vec<ledgerport_sdk::FieldError> {
    let host = Recorder {
        mappings: vec![mapping("fee", "470"), mapping("salary", "477")],
        ..Default::default()
    };
    let delivery = Delivery {
        key: "k".into(),
        attempt: 1,
    };
    let (out, host) = with_host(host, || Xero::deliver(delivery, doc));
    assert!(host.sent.is_empty(), "nothing may be sent: {:?}", host.sent);
    match out {
        Err(DeliveryError::Rejected(errs)) => errs,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Xero keeps money to 2 decimal places: a line or tax amount with more
/// (a 3-decimal currency passes the platform's checks) would be rounded
/// there and the bill would not match the document, so it is refused
/// naming the line. Trailing zeros are not more decimals.
#[test]
fn amounts_xero_would_round_are_refused_naming_the_line() {
    let mut doc = invoice(vec![line("salary", "1000.125"), line("fee", "250.00")]);
    doc.currency = "KWD".into();
    doc.lines[1].tax_amount = "50.005".into();
    let errs = refused(doc.clone());
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["lines[0].line_amount", "lines[1].tax_amount"]);
    assert!(
        errs[0].message.contains("line 1")
            && errs[0].message.contains("1000.125")
            && errs[0].message.contains("2 decimal places"),
        "{}",
        errs[0].message
    );
    assert!(errs[1].message.contains("line 2"), "{}", errs[1].message);
    // 1000.120 is 1000.12: sent.
    doc.lines[0].line_amount = "1000.120".into();
    doc.lines[0].unit_amount = "1000.12".into();
    doc.lines[1].tax_amount = "50.000".into();
    let host = Recorder {
        mappings: vec![mapping("fee", "470"), mapping("salary", "477")],
        ..Default::default()
    };
    let delivery = Delivery {
        key: "k".into(),
        attempt: 1,
    };
    let (out, _) = with_host(host, || Xero::deliver(delivery, doc));
    out.expect("trailing zeros are not more decimals");
}

/// With no tax (LineAmountTypes NoTax) Xero drops a line's tax without a
/// word; the platform only checks that the lines' tax adds up to zero.
#[test]
fn tax_on_a_line_of_a_no_tax_document_is_refused() {
    let mut doc = invoice(vec![line("salary", "100.00"), line("fee", "250.00")]);
    doc.tax_basis = TaxBasis::NoTax;
    doc.lines[0].tax_amount = "10.00".into();
    doc.lines[1].tax_amount = "-10.00".into();
    let errs = refused(doc);
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["lines[0].tax_amount", "lines[1].tax_amount"]);
    assert!(
        errs[0].message.contains("no tax") && errs[0].message.contains("10.00"),
        "{}",
        errs[0].message
    );
}

/// Xero's limit on a number is 255 characters, not bytes: 200 "é" (400
/// bytes) is a valid number and goes out whole; 256 characters do not.
#[test]
fn the_number_limit_counts_characters() {
    let host = Recorder {
        mappings: vec![mapping("fee", "470"), mapping("salary", "477")],
        ..Default::default()
    };
    let mut doc = invoice(vec![line("fee", "250.00")]);
    doc.number = "é".repeat(200);
    let delivery = Delivery {
        key: "k".into(),
        attempt: 1,
    };
    let (out, host) = with_host(host, || Xero::deliver(delivery, doc));
    out.expect("200 characters fit");
    let (_, _, body) = host.sent.iter().find(|(m, _, _)| m == "PUT").unwrap();
    assert_eq!(
        body.as_ref().unwrap()["Invoices"][0]["InvoiceNumber"],
        "é".repeat(200)
    );
    let mut doc = invoice(vec![line("fee", "250.00")]);
    doc.number = "é".repeat(256);
    let errs = refused(doc);
    assert_eq!(errs[0].field, "number");
}
