//! Account mappings through the connections service: set, replace, delete
//! and list a tenant's line-item kind -> account code (+ tax type) mappings
//! for a connector. When the tenant is connected, a mapping is checked
//! against the connector's `list-accounts` first: an unknown or archived
//! code (archived accounts are not listed) is refused with the nearest
//! account names. Without a live connection mappings are stored unchecked
//! (an admin may prepare them before connecting).

use super::{ConnectError, Connections};
use crate::capabilities::mapping::{AccountMapping, MappingScope};
use crate::runtime::v0_1::ledgerport::connector::types as wit;
use crate::store::{
    ConnectionState, StoreError,
    mappings::{Confirm, StoredMapping},
};
use std::collections::BTreeMap;

/// Why a mapping was refused.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// A field is malformed.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The kind is not in the platform's catalogue.
    #[error("kind: {kind:?} is not a line-item kind of the catalogue{}", nearest(.suggestions))]
    UnknownKind {
        /// The kind given.
        kind: String,
        /// The nearest catalogue kinds.
        suggestions: Vec<String>,
    },
    /// The account code is not an active account of the organisation.
    #[error("account_code: {code:?} is not an active account in {organisation} (unknown or archived){}", nearest(.suggestions))]
    UnknownAccount {
        /// The code given.
        code: String,
        /// The organisation checked.
        organisation: String,
        /// The nearest accounts ("CODE Name").
        suggestions: Vec<String>,
    },
    /// The tax type is not offered by the organisation.
    #[error("tax_type: {tax_type:?} is not a tax rate of {organisation}{}", nearest(.suggestions))]
    UnknownTaxType {
        /// The tax type given.
        tax_type: String,
        /// The organisation checked.
        organisation: String,
        /// The nearest tax types ("TYPE Name").
        suggestions: Vec<String>,
    },
    /// The account list could not be read to check the mapping.
    #[error("account_code: cannot be checked now, the account list is unavailable: {0}")]
    Unverifiable(String),
    /// The provider no longer accepts the connection (the grant was
    /// revoked, the app removed from the organisation): it is marked
    /// needs-reauth, and the admin must connect again (409).
    #[error("connection: {0}; connect again")]
    NeedsReauth(String),
    /// The mappings are due a review after a switch of organisation and
    /// the connection cannot check them now (disconnected, waiting to be
    /// connected again, its connector not loaded): confirming them
    /// unchecked would send the other organisation's codes to this one
    /// (409). Why, in words.
    #[error("connection: {0}")]
    Uncheckable(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl MappingError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            MappingError::Unverifiable(_) => 503,
            MappingError::NeedsReauth(_) | MappingError::Uncheckable(_) => 409,
            MappingError::Store(_) => 500,
            _ => 400,
        }
    }

    /// The field at fault (`account_code`, `tax_type`, `kind`, ...).
    pub fn field(&self) -> &'static str {
        match self {
            MappingError::Invalid { field, .. } => field,
            MappingError::UnknownKind { .. } => "kind",
            MappingError::UnknownAccount { .. } | MappingError::Unverifiable(_) => "account_code",
            MappingError::UnknownTaxType { .. } => "tax_type",
            MappingError::NeedsReauth(_) | MappingError::Uncheckable(_) => "connection",
            MappingError::Store(_) => "storage",
        }
    }

    /// What is wrong, without the field's name in front.
    pub fn message(&self) -> String {
        let text = self.to_string();
        let prefix = format!("{}: ", self.field());
        text.strip_prefix(&prefix)
            .map(str::to_owned)
            .unwrap_or(text)
    }
}

impl From<ConnectError> for MappingError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Store(s) => MappingError::Store(s),
            other => MappingError::Unverifiable(other.to_string()),
        }
    }
}

fn nearest(s: &[String]) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!("; nearest: {}", s.join(", "))
    }
}

/// What a successful change was checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingOutcome {
    /// The organisation whose account list validated it (None: unchecked,
    /// no live connection).
    pub validated_against: Option<String>,
}

/// Levenshtein distance (characters).
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

/// The `n` candidates nearest to `input`: each candidate is (label, the
/// strings it may be matched by). Smaller edit distance (to the whole
/// string or one of its words, case-insensitive) first, then longer common
/// prefix.
pub fn nearest_names(input: &str, candidates: &[(String, Vec<String>)], n: usize) -> Vec<String> {
    let input = input.to_lowercase();
    let mut scored: Vec<(usize, std::cmp::Reverse<usize>, &String)> = candidates
        .iter()
        .map(|(label, keys)| {
            let mut best = (usize::MAX, 0usize);
            for k in keys {
                let k = k.to_lowercase();
                // Whole text, or any word of it (a name is often searched by one word).
                let d = std::iter::once(k.as_str())
                    .chain(
                        k.split(|c: char| !c.is_alphanumeric())
                            .filter(|w| !w.is_empty()),
                    )
                    .map(|w| levenshtein(&input, w))
                    .min()
                    .unwrap_or(usize::MAX);
                let p = common_prefix(&input, &k);
                if d < best.0 || (d == best.0 && p > best.1) {
                    best = (d, p);
                }
            }
            (best.0, std::cmp::Reverse(best.1), label)
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(n)
        .map(|(_, _, l)| l.clone())
        .collect()
}

fn check_fields(m: &AccountMapping) -> Result<(), MappingError> {
    let bad = |field, message: &str| {
        Err(MappingError::Invalid {
            field,
            message: message.into(),
        })
    };
    if m.kind.trim().is_empty() || m.kind.len() > 64 {
        return bad("kind", "must be 1-64 characters");
    }
    // A line-item kind is a key like the catalogue's (`gross-salary`):
    // letters, digits, '-', '_' and '.', also when no catalogue is loaded
    // (the Configure form's own fields are named `shown:<kind>`).
    if !m
        .kind
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return bad("kind", "may hold only letters, digits, '-', '_' and '.'");
    }
    // What an account list offers is bounded the same way
    // (`clean::account_list`): a code no mapping can store is not offered.
    use crate::runtime::clean::code_ok;
    if !code_ok(&m.account_code) {
        return bad(
            "account_code",
            "must be 1-64 bytes, without spaces at either end or control characters",
        );
    }
    if let Some(t) = &m.tax_type
        && !code_ok(t)
    {
        return bad(
            "tax_type",
            "must be 1-64 bytes, without spaces at either end or control characters, when given",
        );
    }
    Ok(())
}

impl Connections {
    fn check_kind(&self, kind: &str) -> Result<(), MappingError> {
        let Some(c) = self.catalogue() else {
            return Ok(());
        };
        if c.get(kind).is_some() {
            return Ok(());
        }
        let cands: Vec<(String, Vec<String>)> = c
            .kinds
            .iter()
            .map(|k| (k.key.clone(), vec![k.key.clone(), k.name.clone()]))
            .collect();
        Err(MappingError::UnknownKind {
            kind: kind.to_string(),
            suggestions: nearest_names(kind, &cands, 3),
        })
    }

    /// The account list of the tenant's live connection to the connector,
    /// with the organisation's name; None when there is no active
    /// connection or the connector is not loaded.
    pub async fn account_list(
        &self,
        scope: &MappingScope,
    ) -> Result<Option<(String, wit::AccountList)>, MappingError> {
        let Some(conn) = self
            .store()
            .connection_for(&scope.tenant_id, &scope.connector_id)
            .await?
        else {
            return Ok(None);
        };
        if conn.state != ConnectionState::Active {
            return Ok(None);
        }
        let Some(p) = self.plugin(&scope.connector_id) else {
            return Ok(None);
        };
        let ctx = self.call_context(&conn.id).await?;
        let org = conn
            .external_tenant_name
            .clone()
            .unwrap_or_else(|| scope.connector_id.clone());
        let listed = p
            .runtime
            .list_accounts(&p.plugin, &ctx)
            .await
            .map(|r| r.map_err(crate::runtime::clean::error));
        match listed {
            Ok(Ok(list)) => Ok(Some((
                org,
                crate::runtime::clean::account_list(&scope.connector_id, list),
            ))),
            Ok(Err(wit::DeliveryError::NeedsReauth(m))) => {
                self.mark_needs_reauth(&conn, &m).await;
                Err(MappingError::NeedsReauth(m))
            }
            Ok(Err(e)) => Err(MappingError::Unverifiable(super::connector_said(e))),
            Err(e) => Err(MappingError::Unverifiable(e.to_string())),
        }
    }

    fn check_against(
        org: &str,
        list: &wit::AccountList,
        m: &AccountMapping,
    ) -> Result<(), MappingError> {
        if !list.accounts.iter().any(|a| a.code == m.account_code) {
            let cands: Vec<(String, Vec<String>)> = list
                .accounts
                .iter()
                .map(|a| {
                    (
                        format!("{} {}", a.code, a.name),
                        vec![a.code.clone(), a.name.clone()],
                    )
                })
                .collect();
            return Err(MappingError::UnknownAccount {
                code: m.account_code.clone(),
                organisation: org.to_string(),
                suggestions: nearest_names(&m.account_code, &cands, 3),
            });
        }
        if let Some(t) = &m.tax_type
            && !list.tax_rates.is_empty()
            && !list.tax_rates.iter().any(|r| &r.tax_type == t)
        {
            let cands: Vec<(String, Vec<String>)> = list
                .tax_rates
                .iter()
                .map(|r| {
                    (
                        format!("{} {}", r.tax_type, r.name),
                        vec![r.tax_type.clone(), r.name.clone()],
                    )
                })
                .collect();
            return Err(MappingError::UnknownTaxType {
                tax_type: t.clone(),
                organisation: org.to_string(),
                suggestions: nearest_names(t, &cands, 3),
            });
        }
        Ok(())
    }

    /// Set (or replace) the mapping of one kind, checked against the live
    /// connection's accounts when there is one.
    pub async fn set_mapping(
        &self,
        scope: &MappingScope,
        mapping: AccountMapping,
        actor: &str,
    ) -> Result<MappingOutcome, MappingError> {
        self.change_mappings(scope, std::slice::from_ref(&mapping), &[], actor)
            .await
            .map_err(|(_, e)| e)
    }

    /// Replace every mapping of the scope at once (all checked first).
    pub async fn replace_mappings(
        &self,
        scope: &MappingScope,
        mappings: &[AccountMapping],
        actor: &str,
    ) -> Result<MappingOutcome, MappingError> {
        let (review, org) = self.review_due(scope).await?;
        let validated_against = self
            .check_all(scope, mappings, review)
            .await
            .map_err(|(_, e)| e)?;
        self.store()
            .replace_mappings(
                scope,
                mappings,
                actor,
                self.clock().now_secs(),
                Confirm {
                    checked_org: org.as_deref(),
                },
            )
            .await?;
        self.switched_meanwhile(scope, org.as_deref(), "were saved but not confirmed")
            .await?;
        Ok(MappingOutcome { validated_against })
    }

    /// Set `set` and delete the mappings of the kinds in `clear`, all or
    /// nothing: every mapping in `set` is checked (against the live
    /// account list when there is one) before anything is written, and the
    /// writes are one transaction. A refusal names the kind it is about.
    ///
    /// This changes some kinds; it does not confirm the others after a
    /// switch of organisation (see [`Connections::save_mapping_form`] and
    /// [`Connections::confirm_mappings`]).
    pub async fn change_mappings(
        &self,
        scope: &MappingScope,
        set: &[AccountMapping],
        clear: &[String],
        actor: &str,
    ) -> Result<MappingOutcome, (Option<String>, MappingError)> {
        self.check_and_write(scope, set, set, clear, actor, None, false)
            .await
    }

    /// Check `to_check` (against the live account list when there is
    /// one; while a `review` is due, only against it), then write `set`
    /// and `clear` in one transaction; `confirm` (the organisation checked
    /// against) ends a review due after a switch of organisation.
    #[allow(clippy::too_many_arguments)]
    async fn check_and_write(
        &self,
        scope: &MappingScope,
        to_check: &[AccountMapping],
        set: &[AccountMapping],
        clear: &[String],
        actor: &str,
        confirm: Option<Confirm<'_>>,
        review: bool,
    ) -> Result<MappingOutcome, (Option<String>, MappingError)> {
        let validated_against = if to_check.is_empty() {
            None
        } else {
            self.check_all(scope, to_check, review).await?
        };
        self.store()
            .change_mappings(scope, set, clear, actor, self.clock().now_secs(), confirm)
            .await
            .map_err(|e| (None, MappingError::from(e)))?;
        if let Some(c) = confirm {
            self.switched_meanwhile(scope, c.checked_org, "were saved but not confirmed")
                .await
                .map_err(|e| (None, e))?;
        }
        Ok(MappingOutcome { validated_against })
    }

    /// The Configure form saved: like [`Connections::change_mappings`],
    /// and the whole set as it will stand confirmed. While a review is due
    /// after a switch of organisation, every mapping (the unchanged rows
    /// too, chosen from the other organisation's chart) is checked against
    /// this organisation's accounts first; a refusal names the kind.
    pub async fn save_mapping_form(
        &self,
        scope: &MappingScope,
        set: &[AccountMapping],
        clear: &[String],
        actor: &str,
    ) -> Result<MappingOutcome, (Option<String>, MappingError)> {
        let (review, org) = self.review_due(scope).await.map_err(|e| (None, e))?;
        let to_check: Vec<AccountMapping> = if review {
            let mut all: BTreeMap<String, AccountMapping> = self
                .store()
                .mappings(scope)
                .await
                .map_err(|e| (None, MappingError::from(e)))?
                .into_iter()
                .map(|m| (m.mapping.kind.clone(), m.mapping))
                .filter(|(k, _)| !clear.contains(k))
                .collect();
            for m in set {
                all.insert(m.kind.clone(), m.clone());
            }
            all.into_values().collect()
        } else {
            set.to_vec()
        };
        let confirm = Confirm {
            checked_org: org.as_deref(),
        };
        self.check_and_write(scope, &to_check, set, clear, actor, Some(confirm), review)
            .await
    }

    /// Confirm the mappings as they stand (the admin API's way to end a
    /// review after a switch of organisation): each checked against the
    /// live organisation's accounts first, a refusal naming the kind.
    /// While a review is due and the connection cannot check them (it is
    /// not active), nothing is confirmed: [`MappingError::Uncheckable`].
    /// Returns whether a review was due.
    pub async fn confirm_mappings(
        &self,
        scope: &MappingScope,
    ) -> Result<(bool, MappingOutcome), (Option<String>, MappingError)> {
        let (review, org) = self.review_due(scope).await.map_err(|e| (None, e))?;
        let all: Vec<AccountMapping> = self
            .store()
            .mappings(scope)
            .await
            .map_err(|e| (None, MappingError::from(e)))?
            .into_iter()
            .map(|m| m.mapping)
            .collect();
        let validated_against = if all.is_empty() {
            None
        } else {
            self.check_all(scope, &all, review).await?
        };
        let was_due = self
            .store()
            .confirm_mappings(
                scope,
                Confirm {
                    checked_org: org.as_deref(),
                },
            )
            .await
            .map_err(|e| (None, MappingError::from(e)))?;
        self.switched_meanwhile(scope, org.as_deref(), "were not confirmed")
            .await
            .map_err(|e| (None, e))?;
        Ok((was_due, MappingOutcome { validated_against }))
    }

    /// After a write meant to end a review: an error when the review is
    /// still due because the connection now points at another organisation
    /// than `checked` (switched while the mappings were checked), so the
    /// admin does not believe them confirmed. `done` says what became of
    /// the write ("were saved but not confirmed", "were not confirmed").
    async fn switched_meanwhile(
        &self,
        scope: &MappingScope,
        checked: Option<&str>,
        done: &str,
    ) -> Result<(), MappingError> {
        let (due, now) = self.review_due(scope).await?;
        if due && now.as_deref() != checked {
            return Err(MappingError::Uncheckable(format!(
                "the account mappings {done}: the connection was switched to another organisation while they were checked; check them again against it (nothing is sent until then)"
            )));
        }
        Ok(())
    }

    /// Whether the scope's connection has its mappings due a review after
    /// a switch of organisation, and the organisation it points at now
    /// (what a check begun now is made against: a review ends only if the
    /// connection still points at it when the result is written).
    async fn review_due(
        &self,
        scope: &MappingScope,
    ) -> Result<(bool, Option<String>), MappingError> {
        Ok(self
            .store()
            .connection_for(&scope.tenant_id, &scope.connector_id)
            .await?
            .map_or((false, None), |c| (c.mappings_review, c.external_tenant_id)))
    }

    /// Why the scope's connection cannot check mappings due a review, in
    /// words for the admin.
    async fn uncheckable(&self, scope: &MappingScope) -> MappingError {
        let name = self
            .manifest(&scope.connector_id)
            .map(|m| m.name)
            .unwrap_or_else(|| scope.connector_id.clone());
        let why = match self
            .store()
            .connection_for(&scope.tenant_id, &scope.connector_id)
            .await
        {
            Err(e) => return MappingError::Store(e),
            Ok(None) => format!("there is no {name} connection"),
            Ok(Some(c)) => match c.state {
                ConnectionState::Disconnected => format!("{name} is disconnected"),
                ConnectionState::NeedsReauth => {
                    format!("{name} needs you to connect it again")
                }
                ConnectionState::Active => {
                    format!("the {name} connector is not loaded on this daemon")
                }
            },
        };
        MappingError::Uncheckable(format!(
            "the account mappings were chosen from another organisation's accounts and cannot be checked while {why}; \
             connect {name} again, then check and save them (nothing is sent until then, and nothing was changed)"
        ))
    }

    /// Check every mapping; the organisation whose account list checked
    /// them (None: none to check against). A refusal carries its kind.
    /// While a `review` is due after a switch of organisation, a
    /// connection that cannot list the organisation's accounts refuses
    /// ([`MappingError::Uncheckable`]) rather than passing them unchecked.
    async fn check_all(
        &self,
        scope: &MappingScope,
        mappings: &[AccountMapping],
        review: bool,
    ) -> Result<Option<String>, (Option<String>, MappingError)> {
        for m in mappings {
            check_fields(m).map_err(|e| (Some(m.kind.clone()), e))?;
            self.check_kind(&m.kind)
                .map_err(|e| (Some(m.kind.clone()), e))?;
        }
        let list = self.account_list(scope).await.map_err(|e| (None, e))?;
        if review && list.is_none() {
            return Err((None, self.uncheckable(scope).await));
        }
        // A connector with no chart of accounts (an empty list, e.g. the
        // JSON webhook's) leaves the codes to the admin: nothing to check.
        let list = list.filter(|(_, l)| !l.accounts.is_empty());
        if let Some((org, l)) = &list {
            for m in mappings {
                Self::check_against(org, l, m).map_err(|e| (Some(m.kind.clone()), e))?;
            }
        }
        Ok(list.map(|(o, _)| o))
    }

    /// Delete the mapping of one kind; returns whether there was one.
    pub async fn delete_mapping(
        &self,
        scope: &MappingScope,
        kind: &str,
    ) -> Result<bool, MappingError> {
        Ok(self.store().delete_mapping(scope, kind).await?)
    }

    /// Every mapping of the scope, sorted by kind.
    pub async fn mappings(&self, scope: &MappingScope) -> Result<Vec<StoredMapping>, MappingError> {
        Ok(self.store().mappings(scope).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_is_a_key_not_any_text() {
        let m = |kind: &str| AccountMapping {
            kind: kind.into(),
            account_code: "477".into(),
            tax_type: None,
        };
        assert!(check_fields(&m("gross-salary")).is_ok());
        assert!(check_fields(&m("fx_fee.v2")).is_ok());
        for bad in ["shown:gross-salary", "a b", "kind/1", "ü"] {
            let e = check_fields(&m(bad)).unwrap_err();
            assert_eq!(e.field(), "kind", "{bad}");
        }
    }

    /// A code with a control character is refused naming its field (a NUL
    /// was a database error on PostgreSQL when no live account list
    /// refused it first).
    #[test]
    fn a_code_holds_no_control_character() {
        let m = |code: &str, tax: Option<&str>| AccountMapping {
            kind: "gross-salary".into(),
            account_code: code.into(),
            tax_type: tax.map(str::to_string),
        };
        assert!(check_fields(&m("477", Some("INPUT"))).is_ok());
        for (code, tax, field) in [
            ("4\u{0}77", None, "account_code"),
            ("477\n", None, "account_code"),
            (" ", None, "account_code"),
            (" 477", None, "account_code"),
            ("477", Some("IN\u{0}PUT"), "tax_type"),
            ("477", Some(""), "tax_type"),
        ] {
            let e = check_fields(&m(code, tax)).unwrap_err();
            assert_eq!(e.field(), field, "{code:?} {tax:?}");
        }
    }

    #[test]
    fn nearest_prefers_small_edits_then_prefixes() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        let c = vec![
            (
                "477 Wages and Salaries".to_string(),
                vec!["477".into(), "Wages and Salaries".into()],
            ),
            (
                "478 Superannuation".to_string(),
                vec!["478".into(), "Superannuation".into()],
            ),
            (
                "800 Accounts Payable".to_string(),
                vec!["800".into(), "Accounts Payable".into()],
            ),
        ];
        let n = nearest_names("479", &c, 2);
        assert_eq!(n, vec!["477 Wages and Salaries", "478 Superannuation"]);
        assert_eq!(
            nearest_names("wages", &c, 1),
            vec!["477 Wages and Salaries"]
        );
    }
}
