//! Validation of documents handed over by the platform: every problem is
//! named by its field, all at once, so the platform can fix a document in
//! one round trip. Amounts are exact decimals (`-?digits(.digits)?`, never
//! rounded); totals must reconcile; dates are `YYYY-MM-DD`.

use crate::document::{Document, DocumentKind, TaxBasis};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeSet;

/// One problem with a document.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FieldProblem {
    /// Where (`lines[2].unit_amount`, `currency`, ...).
    pub field: String,
    /// What is wrong, in plain words.
    pub message: String,
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> FieldProblem {
    FieldProblem {
        field: field.into(),
        message: message.into(),
    }
}

/// ISO 4217 codes of currencies in circulation.
const ISO_4217: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG ZWL";

/// Every string value holding a NUL character, by its path. Only keys that
/// can be fields are followed (any other is refused as unknown already).
fn nul_characters(v: &Value, path: String, problems: &mut Vec<FieldProblem>) {
    let at = |path: &str, key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match v {
        Value::String(s) if s.contains('\0') => {
            let field = if path.is_empty() { "document" } else { &path };
            problems.push(problem(field, "must not contain a NUL character"));
        }
        // An array of a field, not an array inside an array (the shape is
        // refused by the field's own check).
        Value::Array(items) if !path.is_empty() && !path.ends_with(']') => {
            for (i, item) in items.iter().enumerate() {
                nul_characters(item, format!("{path}[{i}]"), problems);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                let field_like = !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if field_like {
                    nul_characters(item, at(&path, k), problems);
                }
            }
        }
        _ => {}
    }
}

/// Whether `code` is an ISO 4217 currency code.
pub fn is_currency(code: &str) -> bool {
    code.len() == 3 && ISO_4217.split(' ').any(|c| c == code)
}

/// The decimals of a currency's minor unit (ISO 4217): none for the yen,
/// the won and the others without one, three for the dinars and the rial
/// that have them, two for the rest.
pub fn minor_units(code: &str) -> u32 {
    const NONE: &[&str] = &[
        "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "VND", "VUV",
        "XAF", "XOF", "XPF",
    ];
    const THREE: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
    if NONE.contains(&code) {
        0
    } else if THREE.contains(&code) {
        3
    } else {
        2
    }
}

/// An amount of money with more decimals than its currency has (trailing
/// zeros aside: `1000.00` yen is fine, `1000.50` is not).
/// The most decimal places of a quantity or unit price (trailing zeros
/// aside).
pub const MAX_UNIT_DECIMALS: u32 = 4;

fn too_precise(amount: Decimal, minor: u32) -> bool {
    amount.normalize().scale() > minor
}

fn parse_date(s: &str) -> Option<chrono::NaiveDate> {
    // chrono alone also takes `2026-1-2` and `+2026-01-02`.
    let b = s.as_bytes();
    let shape = b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        });
    shape
        .then(|| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
        .flatten()
}

/// Parse an amount exactly: `-?digits(.digits)?`, at most 28 decimal places
/// and within `Decimal`'s range. Anything else (`+1`, `1_000`, `1e3`, `.5`,
/// spaces, digits that would have to be rounded away) is None.
pub fn parse_amount(s: &str) -> Option<Decimal> {
    let body = s.strip_prefix('-').unwrap_or(s);
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let ok = match body.split_once('.') {
        Some((int, frac)) => digits(int) && digits(frac),
        None => digits(body),
    };
    if !ok {
        return None;
    }
    Decimal::from_str_exact(s).ok()
}

/// Optional string fields: absent, null or a string.
fn check_optional_strings(
    v: &Value,
    prefix: &str,
    keys: &[&str],
    problems: &mut Vec<FieldProblem>,
) {
    for key in keys {
        if !matches!(v.get(*key), None | Some(Value::Null | Value::String(_))) {
            problems.push(problem(format!("{prefix}{key}"), "must be a string"));
        }
    }
}

/// Every key of the object `v` that is not in `known` is a problem: a
/// misspelt field (`purchse_order`) must not be dropped silently.
fn check_known(v: &Value, prefix: &str, known: &[&str], problems: &mut Vec<FieldProblem>) {
    if let Some(o) = v.as_object() {
        for key in o.keys().filter(|k| !known.contains(&k.as_str())) {
            problems.push(problem(
                format!("{prefix}{key}"),
                format!("is not a field here; the fields are {}", known.join(", ")),
            ));
        }
    }
}

const DOCUMENT_FIELDS: &[&str] = &[
    "id",
    "tenant_id",
    "kind",
    "number",
    "issue_date",
    "due_date",
    "currency",
    "tax_basis",
    "supplier",
    "customer",
    "lines",
    "subtotal",
    "total_tax",
    "total",
    "url",
    "credits_invoice_number",
    "pdf",
    "purchase_order",
];
const PARTY_FIELDS: &[&str] = &[
    "id",
    "name",
    "tax_number",
    "email",
    "address_lines",
    "country",
];
const LINE_FIELDS: &[&str] = &[
    "kind",
    "description",
    "quantity",
    "unit_amount",
    "tax_amount",
    "line_amount",
    "employee",
    "country",
];

fn get_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Validate a document's JSON. `catalogue`, when given, lists the line kinds
/// the platform may use. Returns the document, or every problem found.
pub fn validate(
    json: &Value,
    catalogue: Option<&BTreeSet<String>>,
) -> Result<Document, Vec<FieldProblem>> {
    let mut problems = Vec::new();
    if !json.is_object() {
        return Err(vec![problem("document", "must be a JSON object")]);
    }

    // Field-level checks on the raw JSON first, so that every bad field is
    // named (serde stops at the first).
    for key in [
        "id",
        "tenant_id",
        "kind",
        "number",
        "issue_date",
        "currency",
        "subtotal",
        "total_tax",
        "total",
    ] {
        match json.get(key) {
            None | Some(Value::Null) => problems.push(problem(key, "is required")),
            Some(Value::String(s)) if s.trim().is_empty() => {
                problems.push(problem(key, "must not be empty"))
            }
            Some(Value::String(_)) => {}
            Some(_) => problems.push(problem(key, "must be a string")),
        }
    }
    for key in ["id", "tenant_id", "number"] {
        if let Some(s) = get_str(json, key)
            && s.chars().count() > 255
        {
            problems.push(problem(key, "must be at most 255 characters"));
        }
    }
    if let Some(k) = get_str(json, "kind")
        && k != "invoice"
        && k != "credit-note"
    {
        problems.push(problem(
            "kind",
            format!("{k:?} is not \"invoice\" or \"credit-note\""),
        ));
    }
    if let Some(c) = get_str(json, "currency")
        && !is_currency(c)
    {
        problems.push(problem(
            "currency",
            format!("{c:?} is not an ISO 4217 currency code"),
        ));
    }
    let issue = get_str(json, "issue_date");
    if let Some(d) = issue
        && parse_date(d).is_none()
    {
        problems.push(problem(
            "issue_date",
            format!("{d:?} is not a date (YYYY-MM-DD)"),
        ));
    }
    match json.get("due_date") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) => match (parse_date(d), issue.and_then(parse_date)) {
            (None, _) => problems.push(problem(
                "due_date",
                format!("{d:?} is not a date (YYYY-MM-DD)"),
            )),
            (Some(due), Some(iss)) if due < iss => {
                problems.push(problem("due_date", "is before issue_date"))
            }
            _ => {}
        },
        Some(_) => problems.push(problem("due_date", "must be a string")),
    }
    // The currency's decimals, once it is known to be one.
    let currency = get_str(json, "currency").filter(|c| is_currency(c));
    let minor = currency.map(minor_units).unwrap_or(2);
    let precision = |amount: &str| {
        format!(
            "{amount} has more decimals than {} has ({minor})",
            currency.unwrap_or("the currency")
        )
    };
    for key in ["subtotal", "total_tax", "total"] {
        if let Some(s) = get_str(json, key) {
            match parse_amount(s) {
                None => problems.push(problem(key, format!("{s:?} is not a decimal amount"))),
                Some(d) if currency.is_some() && too_precise(d, minor) => {
                    problems.push(problem(key, precision(s)))
                }
                Some(_) => {}
            }
        }
    }
    check_known(json, "", DOCUMENT_FIELDS, &mut problems);
    check_optional_strings(
        json,
        "",
        &["url", "credits_invoice_number", "purchase_order"],
        &mut problems,
    );
    match json.get("tax_basis") {
        None => {}
        Some(Value::String(b)) if ["exclusive", "inclusive", "no-tax"].contains(&b.as_str()) => {}
        Some(_) => problems.push(problem(
            "tax_basis",
            "must be \"exclusive\", \"inclusive\" or \"no-tax\"",
        )),
    }
    match json.get("pdf") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o))
            if o.len() == 1
                && o.iter()
                    .all(|(k, v)| (k == "base64" || k == "url") && v.is_string()) => {}
        Some(_) => problems.push(problem(
            "pdf",
            "must be {\"base64\": \"...\"} or {\"url\": \"...\"}",
        )),
    }
    for party in ["supplier", "customer"] {
        match json.get(party) {
            Some(p) if p.is_object() => {
                check_known(p, &format!("{party}."), PARTY_FIELDS, &mut problems);
                for key in ["id", "name"] {
                    if get_str(p, key).is_none_or(|s| s.trim().is_empty()) {
                        problems.push(problem(format!("{party}.{key}"), "is required"));
                    }
                }
                check_optional_strings(
                    p,
                    &format!("{party}."),
                    &["tax_number", "email", "country"],
                    &mut problems,
                );
                match p.get("address_lines") {
                    None => {}
                    Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
                    Some(_) => problems.push(problem(
                        format!("{party}.address_lines"),
                        "must be a list of strings",
                    )),
                }
            }
            _ => problems.push(problem(party, "is required (an object with id and name)")),
        }
    }
    match json.get("lines").and_then(Value::as_array) {
        None => problems.push(problem("lines", "is required (a list of lines)")),
        Some(lines) if lines.is_empty() => problems.push(problem("lines", "must not be empty")),
        Some(lines) => {
            for (i, l) in lines.iter().enumerate() {
                let f = |k: &str| format!("lines[{i}].{k}");
                if !l.is_object() {
                    problems.push(problem(format!("lines[{i}]"), "must be an object"));
                    continue;
                }
                check_known(l, &format!("lines[{i}]."), LINE_FIELDS, &mut problems);
                check_optional_strings(
                    l,
                    &format!("lines[{i}]."),
                    &["employee", "country"],
                    &mut problems,
                );
                match get_str(l, "kind") {
                    None => problems.push(problem(f("kind"), "is required")),
                    Some(k) => {
                        if let Some(cat) = catalogue
                            && !cat.contains(k)
                        {
                            problems.push(problem(
                                f("kind"),
                                format!("{k:?} is not in the line-item catalogue"),
                            ));
                        }
                    }
                }
                if get_str(l, "description").is_none() {
                    problems.push(problem(f("description"), "is required"));
                }
                let mut amounts = [None; 4];
                for (j, key) in ["quantity", "unit_amount", "tax_amount", "line_amount"]
                    .iter()
                    .enumerate()
                {
                    match get_str(l, key) {
                        None => problems.push(problem(f(key), "is required (a decimal string)")),
                        Some(s) => match parse_amount(s) {
                            // Money (not the quantity or unit price, which
                            // may be finer) in the currency's decimals.
                            Some(d) if j >= 2 && currency.is_some() && too_precise(d, minor) => {
                                problems.push(problem(f(key), precision(s)))
                            }
                            // A quantity or unit price: at most four
                            // decimals (the contract's promise to
                            // connectors, and what accounting systems
                            // such as Xero take).
                            Some(d) if j < 2 && too_precise(d, MAX_UNIT_DECIMALS) => {
                                problems.push(problem(
                                    f(key),
                                    format!(
                                        "{s:?} has more than {MAX_UNIT_DECIMALS} decimal places (accounting systems take at most {MAX_UNIT_DECIMALS})"
                                    ),
                                ))
                            }
                            Some(d) => amounts[j] = Some(d),
                            None => problems
                                .push(problem(f(key), format!("{s:?} is not a decimal amount"))),
                        },
                    }
                }
                if let [Some(q), Some(u), _, Some(la)] = amounts {
                    // Checked: Decimal's operators panic on overflow.
                    match q.checked_mul(u).map(|p| p.round_dp(minor)) {
                        None => problems.push(problem(
                            f("line_amount"),
                            "quantity x unit_amount is too large",
                        )),
                        Some(expected)
                            if la
                                .checked_sub(expected)
                                .is_none_or(|d| d.abs() > Decimal::new(1, minor)) =>
                        {
                            problems.push(problem(
                                f("line_amount"),
                                format!("{la} is not quantity x unit_amount ({expected})"),
                            ))
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }
    // PostgreSQL's text cannot hold a NUL character: such a document would
    // fail at the insert, answered 503 "retry later" for ever.
    nul_characters(json, String::new(), &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    let doc: Document = match serde_json::from_value(json.clone()) {
        Ok(d) => d,
        Err(e) => return Err(vec![problem("document", e.to_string())]),
    };
    // Totals reconcile. Checked arithmetic: Decimal's operators panic on
    // overflow, and amounts near its range are valid on their own.
    fn sum(mut amounts: impl Iterator<Item = Decimal>) -> Option<Decimal> {
        amounts.try_fold(Decimal::ZERO, |acc, a| acc.checked_add(a))
    }
    let too_large = |field: &str| problem(field, "the amounts are too large to add up");
    let sum_lines = sum(doc.lines.iter().map(|l| l.line_amount));
    let sum_tax = sum(doc.lines.iter().map(|l| l.tax_amount));
    match sum_tax {
        None => problems.push(too_large("total_tax")),
        Some(sum_tax) if sum_tax != doc.total_tax => problems.push(problem(
            "total_tax",
            format!(
                "{} is not the sum of the lines' tax ({sum_tax})",
                doc.total_tax
            ),
        )),
        Some(_) => {}
    }
    match doc.tax_basis {
        TaxBasis::Exclusive | TaxBasis::NoTax => {
            match sum_lines {
                None => problems.push(too_large("subtotal")),
                Some(sum_lines) if sum_lines != doc.subtotal => problems.push(problem(
                    "subtotal",
                    format!(
                        "{} is not the sum of the line amounts ({sum_lines})",
                        doc.subtotal
                    ),
                )),
                Some(_) => {}
            }
            match doc.subtotal.checked_add(doc.total_tax) {
                None => problems.push(too_large("total")),
                Some(t) if t != doc.total => problems.push(problem(
                    "total",
                    format!("{} is not subtotal + total_tax ({t})", doc.total),
                )),
                Some(_) => {}
            }
        }
        TaxBasis::Inclusive => {
            match sum_lines {
                None => problems.push(too_large("total")),
                Some(sum_lines) if sum_lines != doc.total => problems.push(problem(
                    "total",
                    format!(
                        "{} is not the sum of the tax-inclusive line amounts ({sum_lines})",
                        doc.total
                    ),
                )),
                Some(_) => {}
            }
            match doc.total.checked_sub(doc.total_tax) {
                None => problems.push(too_large("subtotal")),
                Some(s) if s != doc.subtotal => problems.push(problem(
                    "subtotal",
                    format!("{} is not total - total_tax ({s})", doc.subtotal),
                )),
                Some(_) => {}
            }
        }
    }
    if doc.tax_basis == TaxBasis::NoTax {
        if !doc.total_tax.is_zero() {
            problems.push(problem("total_tax", "must be 0 when tax_basis is no-tax"));
        }
        // Per line too: tax on lines of a no-tax document (cancelling out
        // in the total) is dropped by an accounting system, or refused.
        for (i, l) in doc.lines.iter().enumerate() {
            if !l.tax_amount.is_zero() {
                problems.push(problem(
                    format!("lines[{i}].tax_amount"),
                    "must be 0 when tax_basis is no-tax",
                ));
            }
        }
    }
    // Lines may be negative (a discount, a refund line), a document may
    // not: an accounting system takes no bill or credit note below zero. A
    // credit's amounts are written positive, as its invoice's were.
    if doc.total.is_sign_negative() && !doc.total.is_zero() {
        problems.push(problem(
            "total",
            match doc.kind {
                DocumentKind::CreditNote => {
                    "must not be negative: a credit note's amounts are written positive, as the invoice's were"
                }
                DocumentKind::Invoice => {
                    "must not be negative: an invoice below zero is a credit note"
                }
            },
        ));
    }
    match (doc.kind, &doc.credits_invoice_number) {
        (DocumentKind::CreditNote, None) => problems.push(problem(
            "credits_invoice_number",
            "a credit note must name the invoice it credits",
        )),
        (DocumentKind::CreditNote, Some(n)) if n.trim().is_empty() => {
            problems.push(problem("credits_invoice_number", "must not be empty"))
        }
        (DocumentKind::Invoice, Some(_)) => problems.push(problem(
            "credits_invoice_number",
            "only a credit note credits an invoice",
        )),
        _ => {}
    }
    if let Err(e) = doc.to_wit() {
        problems.push(problem(e.field, e.message));
    }
    if problems.is_empty() {
        Ok(doc)
    } else {
        Err(problems)
    }
}

/// The top-level fields in which two versions of a document differ.
pub fn differences(a: &Document, b: &Document) -> Vec<String> {
    let (Ok(Value::Object(x)), Ok(Value::Object(y))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["document".into()];
    };
    let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
    keys.into_iter()
        .filter(|k| x.get(*k) != y.get(*k))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Value {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/documents")
            .join(name);
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    #[test]
    fn the_samples_are_valid() {
        validate(&sample("invoice.json"), None).unwrap();
        validate(&sample("credit-note.json"), None).unwrap();
    }

    /// A NUL character anywhere is refused naming where (PostgreSQL's text
    /// cannot hold one: the insert failed and the platform was told 503,
    /// "retry later", for a document that can never be stored).
    #[test]
    fn a_nul_character_is_refused_naming_the_field() {
        let mut v = sample("invoice.json");
        v["number"] = "INV\u{0}1".into();
        v["lines"][3]["description"] = "fee\u{0}".into();
        v["supplier"]["name"] = "Globe\u{0}".into();
        let errs = validate(&v, None).unwrap_err();
        let mut fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        fields.sort();
        assert_eq!(
            fields,
            vec!["lines[3].description", "number", "supplier.name"]
        );
        assert!(errs.iter().all(|e| e.message.contains("NUL")));
    }

    /// A document below zero is refused naming `total` (a credit note
    /// written with negative amounts, an invoice that should have been a
    /// credit note): no accounting system takes one. A negative line (a
    /// discount) in a positive document is fine.
    #[test]
    fn a_negative_document_is_refused_and_a_negative_line_is_not() {
        let mut cn = sample("credit-note.json");
        let neg = |v: &Value| format!("-{}", v.as_str().unwrap());
        for key in ["subtotal", "total_tax", "total"] {
            cn[key] = neg(&cn[key]).into();
        }
        let n = cn["lines"].as_array().unwrap().len();
        for i in 0..n {
            for key in ["unit_amount", "tax_amount", "line_amount"] {
                let v = neg(&cn["lines"][i][key]);
                cn["lines"][i][key] = v.replace("--", "").into();
            }
        }
        let errs = validate(&cn, None).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["total"], "{errs:?}");
        assert!(errs[0].message.contains("positive"), "{errs:?}");

        // One negative line inside a positive invoice: accepted.
        let mut inv = sample("invoice.json");
        let total: Decimal = inv["total"].as_str().unwrap().parse().unwrap();
        let sub: Decimal = inv["subtotal"].as_str().unwrap().parse().unwrap();
        let la: Decimal = inv["lines"][0]["line_amount"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let d = Decimal::new(10000, 2);
        assert!(la > d);
        inv["lines"][0]["quantity"] = "1".into();
        inv["lines"][0]["unit_amount"] = (-d).to_string().into();
        inv["lines"][0]["line_amount"] = (-d).to_string().into();
        inv["subtotal"] = (sub - la - d).to_string().into();
        inv["total"] = (total - la - d).to_string().into();
        validate(&inv, None).unwrap();
    }

    /// A no-tax document carries no tax on any line, even when the lines'
    /// tax cancels out in the total.
    #[test]
    fn a_no_tax_document_has_no_tax_on_any_line() {
        let mut v = sample("invoice.json");
        v["tax_basis"] = "no-tax".into();
        v["total_tax"] = "0".into();
        let n = v["lines"].as_array().unwrap().len();
        for i in 0..n {
            v["lines"][i]["tax_amount"] = "0".into();
        }
        v["lines"][0]["tax_amount"] = "5.00".into();
        v["lines"][1]["tax_amount"] = "-5.00".into();
        v["total"] = v["subtotal"].clone();
        let errs = validate(&v, None).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["lines[0].tax_amount", "lines[1].tax_amount"],
            "{errs:?}"
        );
    }

    /// The 255-character limits count characters, not bytes: a number in
    /// CJK script fits when it has 255 characters or fewer.
    #[test]
    fn lengths_count_characters() {
        let mut v = sample("invoice.json");
        v["number"] = "請".repeat(200).into();
        validate(&v, None).unwrap();
        v["number"] = "請".repeat(256).into();
        let errs = validate(&v, None).unwrap_err();
        assert_eq!(errs[0].field, "number");
    }

    /// Currencies introduced lately are known (the Caribbean guilder
    /// replaced ANG in 2025).
    #[test]
    fn recent_currencies_are_accepted() {
        for code in ["XCG", "ZWG", "VED"] {
            assert!(is_currency(code), "{code}");
        }
    }

    #[test]
    fn every_bad_field_is_named_at_once() {
        let mut v = sample("invoice.json");
        v["currency"] = "EURO".into();
        v["issue_date"] = "02/11/2026".into();
        v["lines"][1]["unit_amount"] = "12,50".into();
        v["lines"][2]["line_amount"] = "999.00".into();
        v.as_object_mut().unwrap().remove("number");
        let errs = validate(&v, None).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "number",
                "currency",
                "issue_date",
                "lines[1].unit_amount",
                "lines[2].line_amount"
            ]
        );
    }

    #[test]
    fn a_misspelt_or_mistyped_field_is_named_not_dropped() {
        let mut v = sample("invoice.json");
        v["purchse_order"] = "PO-1".into();
        v["supplier"]["vat_number"] = "GB1".into();
        v["lines"][0]["amount"] = "1.00".into();
        let errs = validate(&v, None).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["purchse_order", "supplier.vat_number", "lines[0].amount"]
        );
        assert!(errs[0].message.contains("purchase_order"), "{errs:?}");
        // A purchase order of the wrong type is named, not "document".
        let mut v = sample("invoice.json");
        v["purchase_order"] = 123.into();
        let errs = validate(&v, None).unwrap_err();
        assert_eq!(errs[0].field, "purchase_order", "{errs:?}");
        assert_eq!(errs[0].message, "must be a string");
    }

    #[test]
    fn money_has_the_decimals_of_its_currency() {
        // The sample has cents: in yen each amount with cents is named.
        let mut v = sample("invoice.json");
        v["currency"] = "JPY".into();
        let errs = validate(&v, None).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"lines[4].line_amount"), "{fields:?}");
        assert!(fields.contains(&"lines[5].tax_amount"), "{fields:?}");
        assert!(
            fields.contains(&"subtotal") && fields.contains(&"total"),
            "{fields:?}"
        );
        assert!(
            !fields.contains(&"lines[0].line_amount"),
            "6250.00 is whole: {fields:?}"
        );
        assert!(
            !fields.iter().any(|f| f.ends_with("unit_amount")),
            "{fields:?}"
        );
        let e = errs.iter().find(|e| e.field == "total").unwrap();
        assert_eq!(e.message, "9950.49 has more decimals than JPY has (0)");
        // Whole yen: valid, a unit price in fractions of a yen included.
        let yen = serde_json::json!({
            "id": "d-1", "tenant_id": "acme", "kind": "invoice", "number": "INV-1",
            "issue_date": "2026-11-01", "currency": "JPY",
            "supplier": {"id": "s", "name": "S"}, "customer": {"id": "c", "name": "C"},
            "lines": [{"kind": "fx-fee", "description": "d", "quantity": "3",
                       "unit_amount": "333.4", "tax_amount": "100", "line_amount": "1000"}],
            "subtotal": "1000.00", "total_tax": "100", "total": "1100"
        });
        validate(&yen, None).unwrap();
        // Three decimals for the Kuwaiti dinar; four are too many.
        let mut kwd = yen.clone();
        kwd["currency"] = "KWD".into();
        kwd["lines"][0]["line_amount"] = "1000.125".into();
        kwd["lines"][0]["unit_amount"] = "333.375".into();
        kwd["subtotal"] = "1000.125".into();
        kwd["total"] = "1100.125".into();
        validate(&kwd, None).unwrap();
        kwd["lines"][0]["tax_amount"] = "100.0001".into();
        let errs = validate(&kwd, None).unwrap_err();
        assert_eq!(errs[0].field, "lines[0].tax_amount", "{errs:?}");
    }

    #[test]
    fn quantities_and_unit_prices_have_at_most_four_decimals() {
        let mut v = sample("invoice.json");
        v["lines"][0]["quantity"] = "1.00000".into(); // trailing zeros: fine
        validate(&v, None).unwrap();
        v["lines"][0]["quantity"] = "1.00001".into();
        v["lines"][1]["unit_amount"] = "10.12345".into();
        let errs = validate(&v, None).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"lines[0].quantity"), "{errs:?}");
        assert!(fields.contains(&"lines[1].unit_amount"), "{errs:?}");
        let e = errs
            .iter()
            .find(|e| e.field == "lines[1].unit_amount")
            .unwrap();
        assert!(e.message.contains("more than 4 decimal places"), "{e:?}");
    }

    #[test]
    fn totals_must_reconcile() {
        let mut v = sample("invoice.json");
        v["total"] = "9950.60".into();
        v["total_tax"] = "169.81".into();
        let errs = validate(&v, None).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["total_tax", "total"]);
    }

    #[test]
    fn credit_notes_name_their_invoice_and_kinds_come_from_the_catalogue() {
        let mut v = sample("credit-note.json");
        v.as_object_mut().unwrap().remove("credits_invoice_number");
        let errs = validate(&v, None).unwrap_err();
        assert_eq!(errs[0].field, "credits_invoice_number");
        let cat: BTreeSet<String> = ["management-fee".to_string()].into();
        let errs = validate(&sample("credit-note.json"), Some(&cat)).unwrap_err();
        assert_eq!(errs[0].field, "lines[1].kind");
        assert!(errs[0].message.contains("deposit-refund"));
    }

    #[test]
    fn differences_name_the_fields() {
        let a = validate(&sample("invoice.json"), None).unwrap();
        let mut b = a.clone();
        b.total = Decimal::new(1, 0);
        b.due_date = None;
        assert_eq!(differences(&a, &b), vec!["due_date", "total"]);
    }
}
