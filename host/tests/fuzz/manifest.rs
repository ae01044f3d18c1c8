//! The plugin manifest parser (`Manifest::parse`): TOML-ish text, byte
//! edits of a real manifest, and structured edits of a valid one. Nothing
//! panics; an accepted manifest satisfies every rule `validate` states and
//! round-trips; a refusal names the key it is about.

use crate::arb;
use ledgerport::manifest::{
    Manifest, ManifestError, SUPPORTED_CONTRACTS, contract_line, parse_origin,
};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use toml::{Table, Value};

/// Keys a manifest knows, at any level (for the text generator).
const KEYS: &[&str] = &[
    "id",
    "name",
    "version",
    "contract",
    "component",
    "sha256",
    "allowed_hosts",
    "document_kinds",
    "requests_per_minute",
    "concurrent_per_connection",
    "authorize_url",
    "token_url",
    "revoke_url",
    "connections_url",
    "scopes",
    "broad_scopes",
    "pkce",
    "signed_by",
    "signature",
    "status",
    "bogus",
    "",
];

/// Value texts, well- and ill-formed.
const VALUES: &[&str] = &[
    "\"xero\"",
    "\"0.1.0\"",
    "\"0.2.7\"",
    "\"0.1\"",
    "\"9.9.9\"",
    "\"0.1.x\"",
    "\"0.1.99999999999\"",
    "\"..\"",
    "\"../x.wasm\"",
    "\"/etc/passwd\"",
    "\"x.wasm\"",
    "[\"https://api.xero.com\"]",
    "[\"ftp://x\"]",
    "[\"https://[::1]:99999\"]",
    "[\"https://exa mple.com\"]",
    "[\"https://bücher.example\"]",
    "[\"http://a.b/path?q\"]",
    "[\"invoice\", \"credit-note\"]",
    "[\"receipt\"]",
    "[]",
    "[1, \"a\"]",
    "[[[[[[[[1]]]]]]]]",
    "0",
    "-1",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "1_000",
    "0x1F",
    "nan",
    "inf",
    "-0.0",
    "1e308",
    "true",
    "1979-05-27T07:32:00Z",
    "{ a = 1 }",
    "{",
    "\"unterminated",
    "'literal'",
    "\"\"\"multi\nline\"\"\"",
    "\"\\u0000\"",
    "\"\\uD800\"",
    "\"\\x\"",
    "\"0000000000000000000000000000000000000000000000000000000000000000\"",
    "\"é000000000000000000000000000000000000000000000000000000000000000\"",
];

const HEADERS: &[&str] = &[
    "[limits]",
    "[oauth]",
    "[settings]",
    "[[limits]]",
    "[limits.deep]",
    "[a.b.c]",
    "[",
    "[]",
    "[oauth]\n[oauth]",
];

fn toml_line() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (prop::sample::select(KEYS), prop::sample::select(VALUES))
            .prop_map(|(k, v)| format!("{k} = {v}")),
        1 => prop::sample::select(HEADERS).prop_map(str::to_string),
        1 => arb::odd_chars(30),
        1 => (prop::sample::select(KEYS), arb::odd_string())
            .prop_map(|(k, v)| format!("{k} = {}", toml::Value::String(v))),
    ]
}

/// A valid manifest as a TOML table, with random values that obey every rule.
fn valid_manifest() -> impl Strategy<Value = Table> {
    (
        "[a-z0-9-]{1,64}",
        // A name people see: not blank, at most 100 characters.
        arb::odd_string().prop_map(|s| {
            let s: String = s.chars().take(100).collect();
            if s.trim().is_empty() {
                format!("Name{s}").chars().take(100).collect()
            } else {
                s
            }
        }),
        (
            prop::sample::select(SUPPORTED_CONTRACTS),
            prop::option::of(0u32..1000),
        ),
        "[a-z_]{1,12}\\.wasm",
        prop::option::of("[0-9a-fA-F]{64}"),
        prop::collection::vec(
            (
                "https?",
                "[a-z]{1,10}\\.(com|example|io)",
                prop::option::of(1u16..=65535),
            )
                .prop_map(|(s, h, p)| match p {
                    Some(p) => format!("{s}://{h}:{p}"),
                    None => format!("{s}://{h}"),
                }),
            0..4,
        ),
        prop::sample::subsequence(vec!["invoice", "credit-note"], 1..=2),
        prop::option::of((1u32..=u32::MAX, 1u32..=u32::MAX)),
        prop::option::of(("[a-z]{1,8}", any::<bool>())),
        // Defaults a saved value could be: not empty, no control character.
        prop::collection::btree_map(
            "[a-z_]{1,8}",
            arb::odd_string().prop_map(|s| {
                let s: String = s.chars().filter(|c| !c.is_control()).take(2048).collect();
                if s.is_empty() { "x".to_string() } else { s }
            }),
            0..3,
        ),
    )
        .prop_map(
            |(id, name, (line, patch), component, sha, hosts, kinds, limits, oauth, settings)| {
                let mut t = Table::new();
                t.insert("id".into(), id.into());
                t.insert("name".into(), name.into());
                t.insert("version".into(), "1.0.0".into());
                let contract = match patch {
                    Some(p) => format!("{line}.{p}"),
                    None => line.to_string(),
                };
                t.insert("contract".into(), contract.into());
                t.insert("component".into(), component.into());
                if let Some(s) = sha {
                    t.insert("sha256".into(), s.into());
                }
                t.insert(
                    "allowed_hosts".into(),
                    Value::Array(hosts.into_iter().map(Value::from).collect()),
                );
                t.insert(
                    "document_kinds".into(),
                    Value::Array(kinds.into_iter().map(Value::from).collect()),
                );
                if let Some((rpm, conc)) = limits {
                    let mut l = Table::new();
                    l.insert("requests_per_minute".into(), i64::from(rpm).into());
                    l.insert("concurrent_per_connection".into(), i64::from(conc).into());
                    t.insert("limits".into(), Value::Table(l));
                }
                if let Some((host, pkce)) = oauth {
                    let mut o = Table::new();
                    o.insert(
                        "authorize_url".into(),
                        format!("https://{host}.example/authorize").into(),
                    );
                    o.insert(
                        "token_url".into(),
                        format!("https://{host}.example/token").into(),
                    );
                    o.insert("scopes".into(), Value::Array(vec!["offline_access".into()]));
                    o.insert("pkce".into(), pkce.into());
                    t.insert("oauth".into(), Value::Table(o));
                }
                let s: Table = settings
                    .into_iter()
                    .map(|(k, v)| (k, Value::from(v)))
                    .collect();
                t.insert("settings".into(), Value::Table(s));
                t
            },
        )
}

fn odd_toml() -> impl Strategy<Value = Value> {
    prop_oneof![
        arb::odd_string().prop_map(Value::String),
        prop::sample::select(
            &[
                "",
                "0.1",
                "0.1.x",
                "0.1.-1",
                "..",
                "../x",
                "/x",
                "ftp://x",
                "https://a/b",
                "https://",
                "not a url",
                "invoice",
                "credit-note",
                "receipt",
                "0000000000000000000000000000000000000000000000000000000000000000",
            ][..]
        )
        .prop_map(|s| Value::String(s.into())),
        prop::sample::select(&[0i64, -1, 1, i64::MAX, i64::MIN, 1 << 32, u32::MAX as i64][..])
            .prop_map(Value::Integer),
        prop::sample::select(&[f64::NAN, f64::INFINITY, -0.0, 1e300, 0.5][..])
            .prop_map(Value::Float),
        any::<bool>().prop_map(Value::Boolean),
        Just(Value::Array(vec![])),
        prop::collection::vec(arb::odd_string().prop_map(Value::String), 1..4)
            .prop_map(Value::Array),
        Just(Value::Array(vec![
            Value::Integer(1),
            Value::String("a".into())
        ])),
        Just(Value::Table(Table::new())),
        (arb::odd_string(), arb::odd_string()).prop_map(|(k, v)| {
            let mut t = Table::new();
            t.insert(k, Value::String(v));
            Value::Table(t)
        }),
    ]
}

/// Every key path of a table (`["oauth", "scopes"]`, ...), arrays included
/// as their key.
fn key_paths(t: &Table, here: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for (k, v) in t {
        here.push(k.clone());
        out.push(here.clone());
        if let Value::Table(inner) = v {
            key_paths(inner, here, out);
        }
        here.pop();
    }
}

/// A key as TOML writes it (quoted and escaped when it has to be).
fn toml_key(k: &str) -> String {
    let mut t = Table::new();
    t.insert(k.to_string(), Value::Integer(0));
    let text = toml::to_string(&t).unwrap_or_default();
    text.rsplit_once(" = ")
        .map(|(k, _)| k.to_string())
        .unwrap_or(text)
}

/// Every key of every table inside `v`.
fn keys_in(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Table(t) => {
            for (k, inner) in t {
                out.push(k.clone());
                keys_in(inner, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|inner| keys_in(inner, out)),
        _ => {}
    }
}

fn table_at<'a>(t: &'a mut Table, path: &[String]) -> Option<&'a mut Table> {
    let mut cur = t;
    for k in path {
        cur = cur.get_mut(k)?.as_table_mut()?;
    }
    Some(cur)
}

/// What an accepted manifest must satisfy (the rules of `validate`).
fn check_accepted(m: &Manifest) {
    assert!(
        !m.id.is_empty()
            && m.id.len() <= 64
            && m.id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "id {:?}",
        m.id
    );
    assert!(
        contract_line(&m.contract).is_some(),
        "contract {:?}",
        m.contract
    );
    assert!(
        !m.component.is_empty() && !m.component.contains("..") && !m.component.starts_with('/'),
        "component {:?}",
        m.component
    );
    if let Some(h) = &m.sha256 {
        assert!(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    for h in &m.allowed_hosts {
        assert!(parse_origin(h).is_ok(), "host {h:?}");
    }
    assert!(!m.document_kinds.is_empty());
    assert!(
        m.document_kinds
            .iter()
            .all(|k| k == "invoice" || k == "credit-note")
    );
    assert!(m.limits.requests_per_minute >= 1 && m.limits.concurrent_per_connection >= 1);
    if let Some(o) = &m.oauth {
        assert!(url::Url::parse(&o.authorize_url).is_ok() && url::Url::parse(&o.token_url).is_ok());
    }
    // Round trip: written back and read again, the same manifest.
    let text = toml::to_string(m).expect("an accepted manifest serialises");
    let again =
        Manifest::parse(&text).unwrap_or_else(|e| panic!("round trip refused: {e}\n{text}"));
    assert_eq!(&again, m);
}

fn check_refused(e: &ManifestError) {
    let text = e.to_string();
    assert!(!text.trim().is_empty());
    match e {
        ManifestError::Invalid { key, message } => {
            assert!(!key.is_empty() && !message.trim().is_empty(), "{text}");
        }
        ManifestError::Parse { message, .. } => assert!(!message.trim().is_empty()),
        ManifestError::Read { .. } => panic!("parse never reads a file: {text}"),
    }
}

fn check_text(text: &str) -> Result<Manifest, String> {
    match Manifest::parse(text) {
        Ok(m) => {
            check_accepted(&m);
            Ok(m)
        }
        Err(e) => {
            check_refused(&e);
            Err(e.to_string())
        }
    }
}

#[test]
fn valid_manifests_are_accepted_and_round_trip() {
    TestRunner::new(arb::config(256))
        .run(&valid_manifest(), |t| {
            let text = toml::to_string(&t).unwrap();
            let r = check_text(&text);
            prop_assert!(r.is_ok(), "{r:?}\n{text}");
            Ok(())
        })
        .unwrap();
}

/// One edit of one key: the refusal, if any, names that key (or the table
/// it sits in).
#[test]
fn edited_manifests_never_panic_and_name_the_key() {
    #[derive(Debug, Clone)]
    enum Edit {
        Remove,
        Replace(Value),
        Insert(String, Value),
    }
    let edit = prop_oneof![
        1 => Just(Edit::Remove),
        4 => odd_toml().prop_map(Edit::Replace),
        1 => (arb::odd_string(), odd_toml()).prop_map(|(k, v)| Edit::Insert(k, v)),
    ];
    let strategy = (valid_manifest(), any::<usize>(), edit);
    TestRunner::new(arb::config(768))
        .run(&strategy, |(mut t, at, edit)| {
            let mut all = Vec::new();
            key_paths(&t, &mut Vec::new(), &mut all);
            let path = all[at % all.len()].clone();
            let (leaf, parent) = path.split_last().unwrap();
            let Some(table) = table_at(&mut t, parent) else {
                return Ok(());
            };
            let (mut named, value): (Vec<String>, Option<&Value>) = match &edit {
                Edit::Remove => {
                    table.remove(leaf);
                    (path.clone(), None)
                }
                Edit::Replace(v) => {
                    table.insert(leaf.clone(), v.clone());
                    (path.clone(), Some(v))
                }
                Edit::Insert(k, v) => {
                    table.insert(k.clone(), v.clone());
                    let mut p = parent.to_vec();
                    p.push(k.clone());
                    (p, Some(v))
                }
            };
            // A table put in may be refused for a key inside it.
            if let Some(v) = value {
                keys_in(v, &mut named);
            }
            let Ok(text) = toml::to_string(&t) else {
                return Ok(());
            };
            if let Err(e) = check_text(&text) {
                // The key itself, or a table above it (`limits`), or for a
                // new key the table it was put in, appears in the message.
                // An empty key cannot be named; toml shows its line.
                let names_it = named.iter().any(|k| {
                    k.trim().is_empty()
                        || e.contains(k.as_str())
                        || e.contains(toml_key(k).as_str())
                });
                prop_assert!(names_it, "the refusal does not name {named:?}: {e}\n{text}");
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn toml_ish_text_never_panics() {
    TestRunner::new(arb::config(512))
        .run(&prop::collection::vec(toml_line(), 0..16), |lines| {
            let _ = check_text(&lines.join("\n"));
            Ok(())
        })
        .unwrap();
}

#[test]
fn mangled_manifest_text_never_panics() {
    let real = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/xero/manifest.toml"),
    )
    .unwrap();
    TestRunner::new(arb::config(512))
        .run(&arb::byte_edits(), |edits| {
            let mut bytes = real.clone();
            arb::apply_bytes(&mut bytes, &edits);
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = check_text(text);
            }
            Ok(())
        })
        .unwrap();
}
