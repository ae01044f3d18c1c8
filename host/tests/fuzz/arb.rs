//! Generators shared by the fuzz properties: odd strings, decimal texts
//! (plain, extreme and malformed), odd JSON values, near-valid platform
//! documents, and structured mutations of a JSON tree.

use proptest::prelude::*;
use proptest::test_runner::Config;
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};

/// Cases per property: `PROPTEST_CASES` when set (long runs), else the
/// short default the property chose for CI.
pub fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        // Failures are turned into named regression tests instead.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Characters that break naive text handling: NUL, controls, bidi
/// overrides, zero-width and combining marks, astral emoji, full-width and
/// Arabic-Indic digits, quotes and backslashes, the last code point.
pub const ODD_CHARS: &[char] = &[
    '\0',
    '\u{1}',
    '\t',
    '\n',
    '\r',
    '\u{7f}',
    '\u{85}',
    '\u{200B}',
    '\u{200D}',
    '\u{202E}',
    '\u{FEFF}',
    '\u{301}',
    '\u{FFFD}',
    '\u{10FFFF}',
    '😀',
    '👩',
    'é',
    'ß',
    '中',
    'ع',
    '५',
    '٣',
    '５',
    '𝟘',
    '"',
    '\'',
    '\\',
    '/',
    '#',
    '%',
    '&',
    '=',
    '?',
    ' ',
    '-',
    '.',
    '_',
    'a',
    'Z',
    '0',
    '9',
];

/// A string of odd characters (0..max chars).
pub fn odd_chars(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ODD_CHARS), 0..max)
        .prop_map(|v| v.into_iter().collect())
}

/// Any string: plain, odd, arbitrary Unicode, empty or blank.
pub fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[A-Za-z0-9 .-]{0,24}",
        2 => odd_chars(24),
        1 => any::<String>(),
        1 => Just(String::new()),
        1 => Just("   ".to_string()),
    ]
}

/// A long string of multi-byte characters around `len` bytes, to catch
/// cuts that split a character.
pub fn long_unicode(len: usize) -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!['é', '中', '😀', 'a']),
        0usize..8,
        odd_chars(8),
    )
        .prop_map(move |(c, pad, tail)| {
            let mut s = "a".repeat(pad);
            while s.len() < len {
                s.push(c);
            }
            s.push_str(&tail);
            s
        })
}

/// Decimal texts that look like amounts but are not quite, or are at the
/// edges of what a 96-bit decimal holds.
pub const WEIRD_AMOUNTS: &[&str] = &[
    "",
    "-",
    ".",
    "5.",
    ".5",
    "+5",
    "1_000",
    "1e3",
    "1E-2",
    " 5",
    "5 ",
    "NaN",
    "inf",
    "-0",
    "-0.00",
    "0.000",
    "00012.50",
    "--1",
    "1.2.3",
    "1,5",
    "５",
    "١٢٣",
    "79228162514264337593543950335",
    "-79228162514264337593543950335",
    "79228162514264337593543950336",
    "7922816251426433759354395033.5",
    "0.0000000000000000000000000001",
    "0.00000000000000000000000000001",
    "1.00000000000000000000000000001",
    "0.00000000000000000000000000000000000000",
    "12345678901234567890123456789012345",
    "99999999999999999999999999999999999999999999999999",
    "1234567890123456789012345678",
    "0.1234567890123456789012345678",
];

/// Amount texts: ordinary decimals, weird ones, and long digit runs.
pub fn amount_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (-10_000_000i64..10_000_000, 0u32..6).prop_map(|(m, s)| Decimal::new(m, s).to_string()),
        2 => prop::sample::select(WEIRD_AMOUNTS).prop_map(str::to_string),
        1 => "-?[0-9]{1,40}(\\.[0-9]{1,40})?",
        1 => odd_string(),
    ]
}

/// A nested value `depth` levels deep (arrays and objects alternating).
pub fn nested(depth: usize, leaf: Value) -> Value {
    let mut v = leaf;
    for i in 0..depth {
        v = if i % 2 == 0 {
            json!([v])
        } else {
            json!({ "a": v })
        };
    }
    v
}

/// A JSON value of the wrong shape for most fields.
pub fn odd_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        odd_string().prop_map(Value::String),
        amount_text().prop_map(Value::String),
        date_text().prop_map(Value::String),
        Just(json!([])),
        Just(json!({})),
        (1usize..200).prop_map(|d| nested(d, json!("x"))),
        prop::collection::vec(odd_string().prop_map(Value::String), 0..4).prop_map(Value::Array),
        prop::collection::btree_map(odd_string(), odd_string().prop_map(Value::String), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
    ]
}

/// Date texts: valid, impossible, wrongly shaped.
pub fn date_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (1990i32..2100, 1u32..13, 1u32..29).prop_map(|(y, m, d)| format!("{y:04}-{m:02}-{d:02}")),
        1 => prop::sample::select(&[
            "2026-02-30", "2026-13-01", "2026-1-2", "+2026-01-02", "20260102", "2026/01/02",
            "02/11/2026", "2026-01-02T00:00:00Z", " 2026-01-02", "0000-01-01", "9999-12-31",
            "-001-01-01", "２０２６-01-02", "",
        ][..]).prop_map(str::to_string),
        1 => odd_string(),
    ]
}

/// Currencies: ISO codes and near misses.
pub fn currency() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(&["EUR", "USD", "GBP", "JPY", "KWD", "CHF", "NZD"][..]).prop_map(str::to_string),
        1 => prop::sample::select(&["eur", "EURO", "XXX", "EU", "€", "ＥＵＲ", "", "E U"][..]).prop_map(str::to_string),
    ]
}

/// Line-item kinds of the sample catalogue.
pub const KINDS: &[&str] = &[
    "gross-salary",
    "employer-social-contributions",
    "employee-benefits",
    "management-fee",
    "fx-fee",
    "expense-reimbursement",
    "deposit-refund",
];

fn ident() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9][A-Za-z0-9-]{0,15}",
        1 => ("[A-Za-z0-9]{1,4}", odd_chars(6)).prop_map(|(a, b)| format!("{a}{b}")),
    ]
}

/// One generated line: quantity, unit amount, tax; the line amount is
/// derived so the line reconciles.
#[derive(Debug, Clone)]
struct GenLine {
    kind: String,
    description: String,
    quantity: Decimal,
    unit: Decimal,
    tax: Decimal,
    employee: Option<String>,
}

fn gen_line() -> impl Strategy<Value = GenLine> {
    (
        prop::sample::select(KINDS),
        prop_oneof![3 => "[A-Za-z ]{0,30}", 1 => odd_chars(40), 1 => any::<String>()],
        (1i64..100_000, 0u32..3),
        (-10_000_000i64..100_000_000, 0u32..5),
        (0i64..1_000_000, Just(2u32)),
        prop::option::of(odd_string()),
    )
        .prop_map(|(kind, description, q, u, t, employee)| GenLine {
            kind: kind.to_string(),
            description,
            quantity: Decimal::new(q.0, q.1),
            unit: Decimal::new(u.0, u.1),
            tax: Decimal::new(t.0, t.1),
            employee,
        })
}

/// A valid platform document as JSON: random parties, lines, basis, kind,
/// dates, currency and PDF, with totals that reconcile.
pub fn valid_document() -> impl Strategy<Value = Value> {
    (
        (ident(), prop::sample::select(&["acme", "globex"][..]), ident(), any::<bool>()),
        (1990i32..2090, 0i64..365, prop::option::of(0i64..120)),
        currency().prop_filter("valid currency", |c| ledgerport::ingest::is_currency(c)),
        prop::sample::select(&["exclusive", "inclusive", "no-tax", ""][..]),
        (ident(), ident(), prop::option::of(odd_string())),
        prop::collection::vec(gen_line(), 1..8),
        prop_oneof![
            Just(None),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| Some(json!({
                "base64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b)
            }))),
            "https://[a-z]{1,8}\\.example/[a-z]{0,8}".prop_map(|u| Some(json!({ "url": u }))),
        ],
    )
        .prop_map(
            |((id, tenant, number, credit), (year, day, due), currency, basis, (sid, cid, email), lines, pdf)| {
                let issue = chrono::NaiveDate::from_ymd_opt(year, 1, 1).unwrap()
                    + chrono::Duration::days(day);
                let no_tax = basis == "no-tax";
                // Money in the currency's decimals (none for the yen).
                let minor = ledgerport::ingest::minor_units(&currency);
                // Lines may be negative (a discount), the document's total
                // may not: with a negative total every line is turned over.
                let build = |sign: Decimal| {
                    let mut out = Vec::new();
                    let (mut sum_la, mut sum_tax) = (Decimal::ZERO, Decimal::ZERO);
                    for l in &lines {
                        let unit = l.unit * sign;
                        let la = (l.quantity * unit).round_dp(minor);
                        let tax = if no_tax { Decimal::ZERO } else { (l.tax * sign).round_dp(minor) };
                        sum_la += la;
                        sum_tax += tax;
                        let mut line = json!({
                            "kind": l.kind,
                            "description": l.description,
                            "quantity": l.quantity.to_string(),
                            "unit_amount": unit.to_string(),
                            "tax_amount": tax.to_string(),
                            "line_amount": la.to_string(),
                        });
                        if let Some(e) = &l.employee {
                            line["employee"] = json!(e);
                        }
                        out.push(line);
                    }
                    let (subtotal, total) = if basis == "inclusive" {
                        (sum_la - sum_tax, sum_la)
                    } else {
                        (sum_la, sum_la + sum_tax)
                    };
                    (out, sum_tax, subtotal, total)
                };
                let (mut out, mut sum_tax, mut subtotal, mut total) = build(Decimal::ONE);
                if total < Decimal::ZERO {
                    (out, sum_tax, subtotal, total) = build(Decimal::NEGATIVE_ONE);
                }
                let mut doc = json!({
                    "id": id,
                    "tenant_id": tenant,
                    "kind": if credit { "credit-note" } else { "invoice" },
                    "number": number,
                    "issue_date": issue.format("%Y-%m-%d").to_string(),
                    "currency": currency,
                    "supplier": { "id": sid, "name": "Platform Ltd", "email": email },
                    "customer": { "id": cid, "name": "Acme GmbH", "address_lines": ["1 Road", "Berlin"] },
                    "lines": out,
                    "subtotal": subtotal.to_string(),
                    "total_tax": sum_tax.to_string(),
                    "total": total.to_string(),
                });
                if !basis.is_empty() {
                    doc["tax_basis"] = json!(basis);
                }
                if let Some(d) = due {
                    doc["due_date"] = json!((issue + chrono::Duration::days(d)).format("%Y-%m-%d").to_string());
                }
                if credit {
                    doc["credits_invoice_number"] = json!(format!("INV-{number}"));
                }
                if let Some(p) = pdf {
                    doc["pdf"] = p;
                }
                without_nul(doc)
            },
        )
}

/// The value with every NUL character in its strings replaced: a valid
/// document holds none (PostgreSQL cannot store one, so ingest refuses it).
fn without_nul(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(s.replace('\0', "\u{1}")),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nul).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k.replace('\0', "\u{1}"), without_nul(v)))
                .collect(),
        ),
        other => other,
    }
}

/// One edit of a JSON tree. `at` picks a node (modulo the number of nodes,
/// in a fixed walk order).
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Remove the node from its parent.
    Remove { at: usize },
    /// Replace the node's value.
    Replace { at: usize, value: Value },
    /// Add a key to the object at (or above) the node.
    Insert {
        at: usize,
        key: String,
        value: Value,
    },
    /// Replace an amount-like text with another amount text.
    Amount { at: usize, text: String },
}

/// A few mutations (0 leaves the document as it is).
pub fn mutations(max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        2 => any::<usize>().prop_map(|at| Mutation::Remove { at }),
        3 => (any::<usize>(), odd_value()).prop_map(|(at, value)| Mutation::Replace { at, value }),
        1 => (any::<usize>(), odd_string(), odd_value()).prop_map(|(at, key, value)| Mutation::Insert { at, key, value }),
        3 => (any::<usize>(), amount_text()).prop_map(|(at, text)| Mutation::Amount { at, text }),
    ];
    prop::collection::vec(one, 0..=max)
}

/// Paths of every node, root first (keys and indices).
fn paths(v: &Value, here: &mut Vec<PathSeg>, out: &mut Vec<Vec<PathSeg>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                here.push(PathSeg::Key(k.clone()));
                paths(c, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(PathSeg::Index(i));
                paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum PathSeg {
    Key(String),
    Index(usize),
}

fn node_mut<'a>(v: &'a mut Value, path: &[PathSeg]) -> Option<&'a mut Value> {
    let mut cur = v;
    for seg in path {
        cur = match seg {
            PathSeg::Key(k) => cur.get_mut(k)?,
            PathSeg::Index(i) => cur.get_mut(*i)?,
        };
    }
    Some(cur)
}

/// Apply mutations in order. Paths are taken below `min_depth` only
/// (1 keeps the root itself), so most edits hit fields, not the document.
pub fn apply(v: &mut Value, ms: &[Mutation]) {
    for m in ms {
        let mut all = Vec::new();
        paths(v, &mut Vec::new(), &mut all);
        let pick = |at: usize| all[at % all.len()].clone();
        match m {
            Mutation::Remove { at } => {
                let p = pick(*at);
                let Some((last, parent)) = p.split_last() else {
                    continue;
                };
                match (node_mut(v, parent), last) {
                    (Some(Value::Object(o)), PathSeg::Key(k)) => {
                        o.remove(k);
                    }
                    (Some(Value::Array(a)), PathSeg::Index(i)) if *i < a.len() => {
                        a.remove(*i);
                    }
                    _ => {}
                }
            }
            Mutation::Replace { at, value } => {
                let p = pick(*at);
                if p.is_empty() {
                    continue;
                }
                if let Some(n) = node_mut(v, &p) {
                    *n = value.clone();
                }
            }
            Mutation::Insert { at, key, value } => {
                let mut p = pick(*at);
                loop {
                    if let Some(Value::Object(o)) = node_mut(v, &p) {
                        o.insert(key.clone(), value.clone());
                        break;
                    }
                    if p.pop().is_none() {
                        break;
                    }
                }
            }
            Mutation::Amount { at, text } => {
                // Prefer the amount-like strings (decimal digits inside).
                let amounts: Vec<_> = all
                    .iter()
                    .filter(|p| {
                        matches!(p.last(), Some(PathSeg::Key(k)) if k.contains("amount") || k.contains("total") || k == "quantity")
                    })
                    .cloned()
                    .collect();
                if amounts.is_empty() {
                    continue;
                }
                let p = amounts[at % amounts.len()].clone();
                if let Some(n) = node_mut(v, &p) {
                    *n = Value::String(text.clone());
                }
            }
        }
    }
}

/// Byte-level edits of a text: flips, inserts, deletions and a truncation.
pub fn byte_edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), 0u8..4, any::<u8>()), 1..6)
}

/// Apply [`byte_edits`] to `bytes`.
pub fn apply_bytes(bytes: &mut Vec<u8>, edits: &[(usize, u8, u8)]) {
    for (at, op, b) in edits {
        if bytes.is_empty() {
            bytes.push(*b);
            continue;
        }
        let i = at % bytes.len();
        match op {
            0 => bytes[i] = *b,
            1 => bytes.insert(i, *b),
            2 => {
                bytes.remove(i);
            }
            _ => bytes.truncate(i),
        }
    }
}
