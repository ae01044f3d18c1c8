//! The notice outbox as the operator sees it: the e-mails that tell a
//! customer's admins a document could not be sent, listed with their state
//! and last error, and the ones given up sent again.
//!
//! The mail task ([`crate::notify`]) retries a notice the SMTP server
//! refuses for about a day, then gives it up: it stays unsent in the outbox
//! with its error and is never claimed again ([`crate::notify::GIVEN_UP`]).
//! After the operator has fixed what was wrong (a rotated SMTP password, a
//! refused sender address), [`Store::retry_given_up_mail`] hands such
//! notices back to the mail task, which sends them at its next round.

use super::{Store, StoreError, on_pool};
use crate::notify::GIVEN_UP;

/// States of a notice, as [`MailEntry::state`] names them.
pub mod state {
    /// Waiting for its first or next try.
    pub const UNSENT: &str = "unsent";
    /// Refused for about a day; not tried again until retried by hand.
    pub const GIVEN_UP: &str = "given-up";
    /// Sent (to every address that accepted it).
    pub const SENT: &str = "sent";
    /// Every state.
    pub const ALL: &[&str] = &[UNSENT, GIVEN_UP, SENT];
}

/// One notice in the outbox (its bodies left out).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MailEntry {
    /// Its id.
    pub id: String,
    /// The tenant it is about.
    pub tenant_id: String,
    /// Where it goes (those still owed it, when it was sent to some).
    pub recipients: Vec<String>,
    /// Its subject.
    pub subject: String,
    /// When it was queued (Unix milliseconds).
    pub created_at: i64,
    /// Tries so far.
    pub attempts: i64,
    /// `unsent`, `given-up` or `sent` (see [`state`]).
    pub state: &'static str,
    /// When it is tried next (unsent only; Unix milliseconds).
    pub next_attempt_at: Option<i64>,
    /// When it was sent (Unix milliseconds).
    pub sent_at: Option<i64>,
    /// What the SMTP server (or the message builder) said last.
    pub last_error: Option<String>,
}

#[derive(sqlx::FromRow)]
struct MailRow {
    id: String,
    tenant_id: String,
    recipients: String,
    subject: String,
    created_at: i64,
    attempts: i64,
    next_attempt_at: i64,
    sent_at: Option<i64>,
    last_error: Option<String>,
}

impl From<MailRow> for MailEntry {
    fn from(r: MailRow) -> Self {
        let state = match (r.sent_at, r.next_attempt_at >= GIVEN_UP) {
            (Some(_), _) => state::SENT,
            (None, true) => state::GIVEN_UP,
            (None, false) => state::UNSENT,
        };
        MailEntry {
            id: r.id,
            tenant_id: r.tenant_id,
            recipients: super::outbox::split_recipients(&r.recipients),
            subject: r.subject,
            created_at: r.created_at,
            attempts: r.attempts,
            state,
            next_attempt_at: (state == state::UNSENT).then_some(r.next_attempt_at),
            sent_at: r.sent_at,
            last_error: r.last_error,
        }
    }
}

const COLUMNS: &str = "id, tenant_id, recipients, subject, created_at, attempts, next_attempt_at, sent_at, last_error";

/// The SQL condition of a state; `$2` is [`GIVEN_UP`].
fn state_condition(state: &str) -> Option<&'static str> {
    match state {
        state::UNSENT => Some("sent_at IS NULL AND next_attempt_at < $2"),
        state::GIVEN_UP => Some("sent_at IS NULL AND next_attempt_at >= $2"),
        state::SENT => Some("sent_at IS NOT NULL"),
        _ => None,
    }
}

/// What [`Store::retry_given_up_mail`] found for one notice named by id
/// that it could not retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRetried {
    /// No notice has that id (for that tenant, when one was named).
    Unknown,
    /// It is not given up (it is `unsent` or `sent`).
    NotGivenUp(MailEntry),
}

impl Store {
    /// Notices, newest first: of one tenant or all, in one state or any
    /// (an unknown state is a [`StoreError::Conflict`] naming it), at most
    /// `limit`.
    pub async fn mail_list(
        &self,
        tenant_id: Option<&str>,
        state: Option<&str>,
        limit: i64,
    ) -> Result<Vec<MailEntry>, StoreError> {
        let mut conditions = vec!["($1 IS NULL OR tenant_id = $1)"];
        if let Some(s) = state {
            conditions.push(state_condition(s).ok_or_else(|| {
                StoreError::Conflict(format!(
                    "state: {s:?} is not one of {}",
                    state::ALL.join(", ")
                ))
            })?);
        } else {
            // $2 is bound whatever the filter; every engine wants it used.
            conditions.push("$2 = $2");
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM mail_outbox WHERE {} ORDER BY created_at DESC, id DESC LIMIT $3",
            conditions.join(" AND ")
        );
        let rows: Vec<MailRow> = on_pool!(self, p => sqlx::query_as(&sql)
            .bind(tenant_id)
            .bind(GIVEN_UP)
            .bind(limit.max(0))
            .fetch_all(p)
            .await?);
        Ok(rows.into_iter().map(MailEntry::from).collect())
    }

    /// One notice by id, of `tenant_id` when one is given.
    pub async fn mail_entry(
        &self,
        tenant_id: Option<&str>,
        id: &str,
    ) -> Result<Option<MailEntry>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM mail_outbox WHERE id = $1 AND ($2 IS NULL OR tenant_id = $2)"
        );
        let row: Option<MailRow> = on_pool!(self, p => sqlx::query_as(&sql)
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(p)
            .await?);
        Ok(row.map(MailEntry::from))
    }

    /// Hand given-up notices back to the mail task, due at `now` with
    /// their tries counted afresh (so a server still refusing them gives
    /// them up again after about a day, not at once): those of `tenant_id`
    /// (or all), or the one named by `id`. Returns the tenant of each
    /// notice handed back (for the audit log). Only given-up
    /// notices are touched: an unsent one is the mail task's (it may be
    /// being sent this moment, under a lease that its due time holds).
    /// `Err(NotRetried)` inside the result says why a notice named by id
    /// was not retried.
    pub async fn retry_given_up_mail(
        &self,
        tenant_id: Option<&str>,
        id: Option<&str>,
        now: i64,
    ) -> Result<Result<Vec<String>, NotRetried>, StoreError> {
        let rows: Vec<(String,)> = on_pool!(self, p => sqlx::query_as(
            "UPDATE mail_outbox SET next_attempt_at = $1, attempts = 0
             WHERE sent_at IS NULL AND next_attempt_at >= $2
               AND ($3 IS NULL OR tenant_id = $3) AND ($4 IS NULL OR id = $4)
             RETURNING tenant_id",
        )
        .bind(now)
        .bind(GIVEN_UP)
        .bind(tenant_id)
        .bind(id)
        .fetch_all(p)
        .await?);
        if let (true, Some(id)) = (rows.is_empty(), id) {
            return Ok(Err(match self.mail_entry(tenant_id, id).await? {
                None => NotRetried::Unknown,
                Some(e) => NotRetried::NotGivenUp(e),
            }));
        }
        Ok(Ok(rows.into_iter().map(|(t,)| t).collect()))
    }
}
