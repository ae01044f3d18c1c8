//! What a connector answers, made safe to store and to show: the one place
//! where a receipt's, a check's or an error's text from the guest is checked
//! before the host keeps it (the dispatcher applies it to every delivery's
//! answer, the connections service to every check's and account list's;
//! the runtime itself returns answers as the guest gave them, so tests of a
//! connector see its own words).
//!
//! A connector is untrusted code. Its strings end up in the database (a NUL
//! is a write error on PostgreSQL: the delivery would be re-run every lease
//! for ever), in e-mails (an empty refusal reads "Invoice X: ") and as a
//! link on the customer's Integrations page (a `javascript:` address would
//! run script on the daemon's own origin). So: control characters other
//! than newline and tab are dropped, every text is bounded, an empty reason
//! is replaced by one that says the connector gave none, and a receipt's
//! address is kept only when it is an absolute `http`/`https` URL.

use super::v0_1::ledgerport::connector::types as wit;

/// The longest text kept from one field of a connector's answer (chars).
pub const MAX_TEXT: usize = 2_000;
/// The longest external id or address kept (chars).
pub const MAX_ID: usize = 2_048;
/// The most notes, field errors or kinds kept from one answer.
pub const MAX_ITEMS: usize = 100;
/// What stands for a reason the connector did not give.
pub const NO_REASON: &str = "the connector gave no reason";

/// `s` without control characters (newline and tab kept), at most `max`
/// characters (an ellipsis marks a cut). Not trimmed: an id or a kind is
/// kept as the connector wrote it.
pub fn text(s: &str, max: usize) -> String {
    let kept: String = s
        .chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect();
    if kept.chars().count() <= max {
        return kept;
    }
    let mut out: String = kept.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// As [`text`], on one line (newlines and tabs become spaces): a name
/// stored and shown in tables, headers and a page's select.
fn line(s: &str, max: usize) -> String {
    text(s, max).replace(['\n', '\t'], " ")
}

/// As [`text`], with [`NO_REASON`] for an empty or blank one.
pub fn reason(s: &str) -> String {
    let t = text(s, MAX_TEXT);
    if t.trim().is_empty() {
        NO_REASON.into()
    } else {
        t
    }
}

/// `u` when it is an absolute `http`/`https` URL of at most [`MAX_ID`]
/// characters without control characters or spaces; `None` otherwise.
pub fn link(u: &str) -> Option<String> {
    if u.len() > MAX_ID || u.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return None;
    }
    let parsed = url::Url::parse(u).ok()?;
    // As written (a stored address compares equal to what was given).
    (matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some())
        .then(|| u.to_string())
}

/// A list of sentences as the host keeps it: at most [`MAX_ITEMS`], each
/// cleaned by [`text`], the blank ones left out.
fn texts(items: &[String]) -> Vec<String> {
    items
        .iter()
        .take(MAX_ITEMS)
        .map(|n| text(n, MAX_TEXT))
        .filter(|n| !n.trim().is_empty())
        .collect()
}

/// A receipt as the host keeps it. `plugin` names the connector in the log
/// line that says what was dropped.
pub fn receipt(plugin: &str, r: wit::Receipt) -> wit::Receipt {
    let external_url = match r.external_url {
        Some(u) => {
            let kept = link(&u);
            if kept.is_none() {
                tracing::warn!(
                    plugin,
                    "a receipt's external_url was not an http(s) address; dropped"
                );
            }
            kept
        }
        None => None,
    };
    wit::Receipt {
        external_id: text(&r.external_id, MAX_ID),
        external_url,
        notes: texts(&r.notes),
    }
}

/// The longest organisation name kept from a connector's check (chars).
pub const MAX_NAME: usize = 200;

/// A check's report as the host keeps it: the organisation's name (stored
/// on the connection, shown on the page and in notices) and its details
/// cleaned and bounded.
pub fn check_report(r: wit::CheckReport) -> wit::CheckReport {
    wit::CheckReport {
        // One line: it is stored and shown in tables and headers.
        organisation_name: line(&r.organisation_name, MAX_NAME),
        details: texts(&r.details),
    }
}

/// The longest account code or tax type a mapping may store (bytes; the
/// admin API's bound on `account_code` and `tax_type`).
pub const MAX_CODE: usize = 64;
/// The most accounts, and the most tax rates, kept from one account list.
pub const MAX_ACCOUNTS: usize = 10_000;

/// Whether `code` can be stored as a mapping's account code or tax type:
/// 1-[`MAX_CODE`] bytes, no space at either end (the page's form trims
/// what it sends: `"200 "` could be offered but never saved), no control
/// character (a NUL cannot be stored on PostgreSQL).
pub fn code_ok(code: &str) -> bool {
    !code.is_empty()
        && code.trim() == code
        && code.len() <= MAX_CODE
        && !code.chars().any(char::is_control)
}

/// An account list as the host shows and checks mappings against: accounts
/// and tax rates whose code no mapping could store ([`code_ok`]) are left
/// out (an admin could pick one and never save it), the first of a repeated code is
/// kept, names and types are one bounded line, at most [`MAX_ACCOUNTS`] of
/// each. `plugin` names the connector in the log line that says what was
/// dropped.
pub fn account_list(plugin: &str, l: wit::AccountList) -> wit::AccountList {
    let (n_accounts, n_rates) = (l.accounts.len(), l.tax_rates.len());
    let accounts: Vec<wit::Account> = storable(l.accounts, |a| &a.code)
        .map(|a| wit::Account {
            name: line(&a.name, MAX_NAME),
            account_type: line(&a.account_type, 100),
            tax_type: a.tax_type.filter(|t| code_ok(t)),
            description: a
                .description
                .map(|d| text(&d, MAX_TEXT))
                .filter(|d| !d.trim().is_empty()),
            code: a.code,
        })
        .collect();
    let tax_rates: Vec<wit::TaxRate> = storable(l.tax_rates, |r| &r.tax_type)
        .map(|r| wit::TaxRate {
            name: line(&r.name, MAX_NAME),
            rate: line(&r.rate, 40),
            tax_type: r.tax_type,
        })
        .collect();
    if accounts.len() < n_accounts || tax_rates.len() < n_rates {
        tracing::warn!(
            plugin,
            accounts_dropped = n_accounts - accounts.len(),
            tax_rates_dropped = n_rates - tax_rates.len(),
            "an account list held codes no mapping can store (empty, over 64 bytes, with spaces at an end or control characters, or repeated), or too many; left out"
        );
    }
    wit::AccountList {
        accounts,
        tax_rates,
    }
}

/// The items whose `code` a mapping can store ([`code_ok`]), the first of
/// a repeated code, at most [`MAX_ACCOUNTS`].
fn storable<T>(items: Vec<T>, code: impl Fn(&T) -> &String) -> impl Iterator<Item = T> {
    let mut seen = std::collections::HashSet::new();
    items
        .into_iter()
        .filter(move |i| code_ok(code(i)) && seen.insert(code(i).clone()))
        .take(MAX_ACCOUNTS)
}

/// A delivery error as the host keeps it: every reason non-empty and
/// bounded, a refusal with at least one field error.
pub fn error(e: wit::DeliveryError) -> wit::DeliveryError {
    use wit::DeliveryError as E;
    match e {
        E::Rejected(errs) => {
            let mut out: Vec<wit::FieldError> = errs
                .iter()
                .take(MAX_ITEMS)
                .map(|f| wit::FieldError {
                    field: {
                        let t = text(&f.field, 200);
                        if t.trim().is_empty() {
                            "document".into()
                        } else {
                            t
                        }
                    },
                    message: reason(&f.message),
                    provider_message: f
                        .provider_message
                        .as_deref()
                        .map(|p| text(p, MAX_TEXT))
                        .filter(|p| !p.trim().is_empty()),
                })
                .collect();
            if out.is_empty() {
                out.push(wit::FieldError {
                    field: "document".into(),
                    message: "the connector refused the document without saying why".into(),
                    provider_message: None,
                });
            }
            E::Rejected(out)
        }
        E::NeedsMapping(kinds) => {
            // In the connector's order (the notice lists them so), once each.
            let mut out: Vec<String> = Vec::new();
            for k in kinds.iter().take(MAX_ITEMS).map(|k| text(k, 200)) {
                if !out.contains(&k) {
                    out.push(k);
                }
            }
            E::NeedsMapping(out)
        }
        E::NeedsReauth(m) => E::NeedsReauth(reason(&m)),
        E::Transient(m) => E::Transient(reason(&m)),
        E::RateLimited(rl) => E::RateLimited(wit::RateLimit {
            retry_after_seconds: rl.retry_after_seconds,
            limit: {
                let t = text(&rl.limit, 100);
                if t.trim().is_empty() {
                    "provider".into()
                } else {
                    t
                }
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_drops_nul_and_control_characters_and_bounds_the_length() {
        assert_eq!(text("a\0b\u{7}c\nd\te", 100), "abc\nd\te");
        assert_eq!(text("  x  ", 100), "  x  ", "kept as written");
        assert_eq!(reason("  \0 "), NO_REASON);
        let long = "é".repeat(50);
        let cut = text(&long, 10);
        assert_eq!(cut.chars().count(), 10);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn only_absolute_http_addresses_are_links() {
        assert_eq!(
            link("https://go.xero.com/x?id=1").as_deref(),
            Some("https://go.xero.com/x?id=1")
        );
        assert!(link("http://127.0.0.1:9/a").is_some());
        for bad in [
            "javascript:alert(document.domain)",
            "JAVASCRIPT:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "/relative/path",
            "//evil.example/x",
            "https://a.example/\0",
            "https://a.example/ x",
            "vbscript:x",
            "file:///etc/passwd",
        ] {
            assert_eq!(link(bad), None, "{bad:?} must not be kept");
        }
        assert_eq!(
            link(&format!("https://a.example/{}", "a".repeat(MAX_ID))),
            None
        );
    }

    #[test]
    fn a_receipt_keeps_only_what_is_safe() {
        let r = receipt(
            "t",
            wit::Receipt {
                external_id: "INV\0-1".into(),
                external_url: Some("javascript:alert(1)".into()),
                notes: vec!["".into(), "n\0ote".into()],
            },
        );
        assert_eq!(r.external_id, "INV-1");
        assert_eq!(r.external_url, None);
        assert_eq!(r.notes, vec!["note".to_string()]);
    }

    #[test]
    fn an_account_list_keeps_only_codes_a_mapping_can_store() {
        let account = |code: &str, name: &str| wit::Account {
            code: code.into(),
            name: name.into(),
            account_type: "EXPENSE".into(),
            tax_type: Some("IN\0PUT".into()),
            description: Some("\0".into()),
        };
        let l = account_list(
            "t",
            wit::AccountList {
                accounts: vec![
                    account("400", "Wages\nand\0 salaries"),
                    account("4\u{0}00", "NUL in the code"),
                    account(" ", "blank"),
                    account(&"9".repeat(65), "too long"),
                    account("200 ", "a space after"),
                    account("400", "repeated"),
                    account("477", &"n".repeat(500)),
                ],
                tax_rates: vec![
                    wit::TaxRate {
                        tax_type: "INPUT".into(),
                        name: "GST\non expenses".into(),
                        rate: "10".into(),
                    },
                    wit::TaxRate {
                        tax_type: "".into(),
                        name: "no code".into(),
                        rate: "0".into(),
                    },
                ],
            },
        );
        let codes: Vec<&str> = l.accounts.iter().map(|a| a.code.as_str()).collect();
        assert_eq!(codes, ["400", "477"]);
        assert_eq!(l.accounts[0].name, "Wages and salaries");
        assert_eq!(
            l.accounts[0].tax_type, None,
            "a code with a NUL is no tax type"
        );
        assert_eq!(l.accounts[0].description, None);
        assert_eq!(l.accounts[1].name.chars().count(), MAX_NAME);
        assert_eq!(l.tax_rates.len(), 1);
        assert_eq!(l.tax_rates[0].name, "GST on expenses");
        assert!(code_ok(&"9".repeat(64)) && !code_ok("a\tb"));
    }

    #[test]
    fn every_error_says_something() {
        use wit::DeliveryError as E;
        match error(E::Rejected(vec![])) {
            E::Rejected(v) => {
                assert_eq!(v.len(), 1);
                assert_eq!(v[0].field, "document");
                assert!(v[0].message.contains("without saying why"));
            }
            other => panic!("{other:?}"),
        }
        match error(E::Rejected(vec![wit::FieldError {
            field: "".into(),
            message: "\0".into(),
            provider_message: Some("said\0 no".into()),
        }])) {
            E::Rejected(v) => {
                assert_eq!(v[0].field, "document");
                assert_eq!(v[0].message, NO_REASON);
                assert_eq!(v[0].provider_message.as_deref(), Some("said no"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(error(E::Transient("".into())), E::Transient(m) if m == NO_REASON));
        assert!(matches!(error(E::NeedsReauth("x\0y".into())), E::NeedsReauth(m) if m == "xy"));
        assert!(
            matches!(error(E::NeedsMapping(vec!["b".into(), "".into(), "a".into(), "b".into()])), E::NeedsMapping(k) if k == vec!["b".to_string(), "".to_string(), "a".to_string()])
        );
        assert!(matches!(
            error(E::RateLimited(wit::RateLimit { retry_after_seconds: 5, limit: "\0".into() })),
            E::RateLimited(r) if r.limit == "provider" && r.retry_after_seconds == 5
        ));
    }
}
