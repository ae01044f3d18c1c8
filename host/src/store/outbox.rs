//! The outbox: documents, one delivery per (document, connection), every
//! attempt, incidents and the mail outbox; plus the request log that holds
//! provider limits across daemons. Times here are Unix milliseconds.
//!
//! Claims are leases: a worker owns a delivery until `lease_until`, renews
//! it while working, and a crashed worker's claim is taken over once the
//! lease expires. On PostgreSQL claims run under one advisory transaction
//! lock (so the per-connection concurrency cap holds across daemons) and
//! lock rows `FOR UPDATE SKIP LOCKED`; SQLite has one writer anyway.

use super::{BeginWrite, Pool, Store, StoreError, StoreKind, on_pool};
use sqlx::Row;
use std::collections::HashMap;

/// The PostgreSQL channel on which new work is announced.
pub const WORK_CHANNEL: &str = "ledgerport_outbox";

/// Delivery states.
pub mod state {
    /// Waiting for its turn (maybe after a retry delay).
    pub const PENDING: &str = "pending";
    /// Claimed by a worker.
    pub const WORKING: &str = "working";
    /// In the accounting system.
    pub const DELIVERED: &str = "delivered";
    /// Failed for good; a person was told.
    pub const FAILED: &str = "failed";
    /// Waiting for a person (mapping, re-authorisation).
    pub const PAUSED: &str = "paused";
    /// Every state, in the order a delivery log offers them.
    pub const ALL: [&str; 5] = [FAILED, PAUSED, PENDING, WORKING, DELIVERED];
}

/// Where a page of the delivery log ends: the last row's change time and
/// id (the log's order), written `<updated_at>.<id>` in links and the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogCursor {
    /// The row's last change (ms).
    pub updated_at: i64,
    /// The row's id (ties on the time are broken by id).
    pub id: String,
}

impl LogCursor {
    /// The cursor after `row`.
    pub fn after(row: &DeliveryRow) -> Self {
        LogCursor {
            updated_at: row.updated_at,
            id: row.id.clone(),
        }
    }

    /// Read a cursor written by [`LogCursor::to_string`]; `None` when it
    /// is not one.
    pub fn parse(s: &str) -> Option<Self> {
        let (at, id) = s.split_once('.')?;
        let updated_at = at.parse().ok()?;
        if id.is_empty() || id.len() > 64 {
            return None;
        }
        Some(LogCursor {
            updated_at,
            id: id.to_string(),
        })
    }
}

impl std::fmt::Display for LogCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.updated_at, self.id)
    }
}

/// What ingest did with a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Stored, with this many deliveries.
    Created {
        /// Deliveries created (0: not connected).
        deliveries: usize,
    },
    /// The same document was already stored.
    Existing,
    /// A different document with the same id exists; its stored body.
    Conflict(String),
    /// No such tenant: nothing was stored.
    UnknownTenant,
}

/// A delivery a worker claimed.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Delivery id (also the connector's delivery key).
    pub id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Document id.
    pub document_id: String,
    /// Connection.
    pub connection_id: String,
    /// Connector.
    pub connector_id: String,
    /// Attempts counted so far.
    pub attempts: i64,
    /// Attempts made before the last resume of a pause: the retry ladder
    /// counts from here.
    pub ladder_base: i64,
    /// The document's stored JSON.
    pub body: String,
    /// Document kind.
    pub document_kind: String,
    /// Document number.
    pub document_number: String,
    /// For a credit note, the invoice it credits.
    pub credits_invoice_number: Option<String>,
    /// This claim's lease token (the worker id and a number unique to the
    /// claim): renewals and the outcome are written only while the
    /// delivery is still leased under it, so an attempt whose lease lapsed
    /// and was claimed again (by another daemon, or by this one) cannot
    /// write over the newer attempt's outcome.
    pub lease: String,
}

/// A new lease token for a claim by `worker`: unique within the process
/// (worker ids are unique across processes).
fn lease_token(worker: &str) -> String {
    static CLAIMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = CLAIMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{worker}#{n}")
}

/// The worker a lease token belongs to (what the attempt log records).
pub(super) fn lease_worker(lease: &str) -> &str {
    lease.rsplit_once('#').map_or(lease, |(w, _)| w)
}

/// What an incident's detail says went wrong, without the document it
/// names ("Invoice INV-1: <cause>"; the label never holds ": " before the
/// number, and a number holding one only makes causes look different).
fn incident_cause(detail: &str) -> &str {
    detail.split_once(": ").map_or(detail, |(_, cause)| cause)
}

/// What a pause waits for, item by item: each kind the dispatcher's
/// mapping messages name ("no account is mapped for: a, b"; "the account
/// mapped for a cannot be used ..."), else each clause as a whole. A pause
/// is told again only for an item no open, told incident named.
fn cause_items(cause: &str) -> Vec<String> {
    let mut out = Vec::new();
    for clause in cause.split("; ") {
        if let Some(kinds) = clause.strip_prefix("no account is mapped for: ") {
            out.extend(kinds.split(", ").map(|k| format!("unmapped {k}")));
        } else if let Some((kinds, _)) = clause
            .strip_prefix("the account mapped for ")
            .and_then(|rest| rest.split_once(" cannot be used"))
        {
            out.extend(kinds.split(", ").map(|k| format!("unusable {k}")));
        } else {
            out.push(clause.to_string());
        }
    }
    out
}

/// An outcome whose incident is still to be recorded ([`Store::incidents_owed`]).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct IncidentOwed {
    /// The delivery.
    #[sqlx(rename = "id")]
    pub delivery_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Connection.
    pub connection_id: String,
    /// The incident's kind ([`Finish::incident_kind`]).
    #[sqlx(rename = "incident_due")]
    pub kind: String,
    /// Document kind.
    pub document_kind: String,
    /// Document number.
    pub document_number: String,
    /// The outcome's message in words.
    #[sqlx(rename = "last_error")]
    pub message: Option<String>,
}

/// A delivery as the log shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeliveryRow {
    /// Delivery id.
    pub id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Document id.
    pub document_id: String,
    /// Document number.
    pub document_number: String,
    /// Document kind.
    pub document_kind: String,
    /// Connection.
    pub connection_id: String,
    /// Connector.
    pub connector_id: String,
    /// State.
    pub state: String,
    /// Why paused.
    pub pause_reason: Option<String>,
    /// Attempts counted.
    pub attempts: i64,
    /// Next attempt (ms).
    pub next_attempt_at: i64,
    /// External id.
    pub external_id: Option<String>,
    /// External URL.
    pub external_url: Option<String>,
    /// Last error, in words.
    pub last_error: Option<String>,
    /// When delivered (ms).
    pub delivered_at: Option<i64>,
    /// Last change (ms).
    pub updated_at: i64,
}

/// One recorded attempt.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptRow {
    /// Attempt number (0 for attempts that did not count, e.g. 429).
    pub attempt: i64,
    /// Worker.
    pub worker: String,
    /// Start (ms).
    pub started_at: i64,
    /// End (ms).
    pub finished_at: i64,
    /// Outcome keyword.
    pub outcome: String,
    /// Message in words.
    pub message: Option<String>,
    /// Details (JSON: provider messages, notes).
    pub details: Option<String>,
    /// External id.
    pub external_id: Option<String>,
    /// External URL.
    pub external_url: Option<String>,
}

/// How an attempt ended, as the store records it.
#[derive(Debug, Clone)]
pub struct Finish {
    /// New state.
    pub state: &'static str,
    /// Pause reason when paused.
    pub pause_reason: Option<String>,
    /// What must change for a pause to end (JSON), when paused.
    pub pause_detail: Option<String>,
    /// Whether the attempt counts against the retry ladder.
    pub counts: bool,
    /// Next attempt time (ms) when pending.
    pub next_attempt_at: i64,
    /// Outcome keyword for the attempt log.
    pub outcome: String,
    /// Message in words.
    pub message: Option<String>,
    /// Details JSON.
    pub details: Option<String>,
    /// External id when delivered.
    pub external_id: Option<String>,
    /// External URL when delivered.
    pub external_url: Option<String>,
}

impl Finish {
    /// The incident people must hear of this outcome in, if any: a pause
    /// for a mapping or a reconnection, a refusal, retries given up.
    pub fn incident_kind(&self) -> Option<&'static str> {
        match (
            self.state,
            self.pause_reason.as_deref(),
            self.outcome.as_str(),
        ) {
            (state::PAUSED, Some("mapping"), _) => Some("paused-mapping"),
            (state::PAUSED, Some("reauth"), _) => Some("paused-reauth"),
            // Refused before sending (a kind the connector does not take):
            // a refusal, not retries given up; its detail says nothing was
            // sent.
            (state::FAILED, _, "rejected" | "not-accepted") => Some("failed"),
            (state::FAILED, _, _) => Some("retries-exhausted"),
            _ => None,
        }
    }

    /// Not an attempt, a wait: pending again at `next_attempt_at`, not
    /// counted against the retry ladder.
    pub fn wait(outcome: &str, message: String, next_attempt_at: i64) -> Self {
        Self {
            state: state::PENDING,
            pause_reason: None,
            pause_detail: None,
            counts: false,
            next_attempt_at,
            outcome: outcome.into(),
            message: Some(message),
            details: None,
            external_id: None,
            external_url: None,
        }
    }

    /// Failed for good at `now`: counted, `details` kept with the attempt.
    pub fn failed(outcome: &str, message: String, details: Option<String>, now: i64) -> Self {
        Self {
            state: state::FAILED,
            pause_reason: None,
            pause_detail: None,
            counts: true,
            next_attempt_at: now,
            outcome: outcome.into(),
            message: Some(message),
            details,
            external_id: None,
            external_url: None,
        }
    }

    /// Paused at `now` for `reason` (`mapping`, `reauth`) until a person
    /// fixes it; `detail` is what `resume_paused` reads to know when.
    pub fn paused(reason: &str, outcome: &str, message: String, detail: String, now: i64) -> Self {
        Self {
            state: state::PAUSED,
            pause_reason: Some(reason.into()),
            pause_detail: Some(detail.clone()),
            counts: true,
            next_attempt_at: now,
            outcome: outcome.into(),
            message: Some(message),
            details: Some(detail),
            external_id: None,
            external_url: None,
        }
    }
}

/// Outcomes whose attempts are not written to the delivery's log: a wait
/// for a daemon that has the connector comes back every minute for as long
/// as the connector is missing (1,000 such deliveries wrote 1.4 million
/// attempt rows a day); the delivery's `last_error` says why it waits.
pub const UNRECORDED_OUTCOMES: &[&str] = &["not-installed"];

/// What [`Store::purge_delivered`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PurgeReport {
    /// Document bodies dropped.
    pub bodies: u64,
    /// Attempts of delivered deliveries deleted.
    pub attempts: u64,
    /// Sent mails deleted.
    pub mails: u64,
    /// Closed incidents deleted.
    pub incidents: u64,
}

/// A mail waiting to be sent.
#[derive(Debug, Clone)]
pub struct OutgoingMail {
    /// Id.
    pub id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Recipients.
    pub recipients: Vec<String>,
    /// Subject.
    pub subject: String,
    /// Plain text.
    pub text_body: String,
    /// HTML.
    pub html_body: String,
    /// Attempts so far.
    pub attempts: i64,
}

/// A paused delivery and what must change to resume it.
#[derive(Debug, Clone)]
pub struct PausedRow {
    /// Delivery id.
    pub id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Connector.
    pub connector_id: String,
    /// Connection.
    pub connection_id: String,
    /// `mapping` or `reauth`.
    pub reason: String,
    /// JSON: `{"unmapped": [...]}` or `{"connected_at": n}`.
    pub detail: Option<String>,
}

/// An incident ready to be told.
#[derive(Debug, Clone)]
pub struct IncidentRow {
    /// Id.
    pub id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Connection.
    pub connection_id: String,
    /// Kind: failed, paused-mapping, paused-reauth, retries-exhausted.
    pub kind: String,
    /// Document numbers (JSON array of strings).
    pub documents: Vec<String>,
    /// Details (JSON array of strings: what went wrong, what the provider said).
    pub details: Vec<String>,
    /// Documents of the incident past the first
    /// [`MAX_INCIDENT_DOCUMENTS`], counted, not named.
    pub more_documents: i64,
    /// The two lists and the count as stored when read: telling the
    /// incident checks that nothing was added since.
    pub(crate) read_as: (String, String, i64),
}

/// The most document numbers one incident names; more are counted
/// ([`IncidentRow::more_documents`]). A notice lists them all: a weekend of
/// paused deliveries would otherwise be one e-mail of 20,000 numbers, and
/// every pause behind a told incident rewrote the whole list.
pub const MAX_INCIDENT_DOCUMENTS: usize = 200;

/// A mail to queue with an incident (see [`Store::tell_incident`]).
#[derive(Debug, Clone)]
pub struct NewMail {
    /// Recipients.
    pub recipients: Vec<String>,
    /// Subject.
    pub subject: String,
    /// Plain text.
    pub text: String,
    /// HTML.
    pub html: String,
}

const DELIVERY_COLUMNS: &str = "id, tenant_id, document_id, document_number, document_kind, connection_id, connector_id, state, pause_reason, attempts, next_attempt_at, external_id, external_url, last_error, delivered_at, updated_at";

macro_rules! delivery_row {
    ($r:expr) => {
        DeliveryRow {
            id: $r.try_get("id")?,
            tenant_id: $r.try_get("tenant_id")?,
            document_id: $r.try_get("document_id")?,
            document_number: $r.try_get("document_number")?,
            document_kind: $r.try_get("document_kind")?,
            connection_id: $r.try_get("connection_id")?,
            connector_id: $r.try_get("connector_id")?,
            state: $r.try_get("state")?,
            pause_reason: $r.try_get("pause_reason")?,
            attempts: $r.try_get("attempts")?,
            next_attempt_at: $r.try_get("next_attempt_at")?,
            external_id: $r.try_get("external_id")?,
            // Only an http(s) address (rows stored before the dispatcher
            // checked receipts may hold anything; API callers render it).
            external_url: $r
                .try_get::<Option<String>, _>("external_url")?
                .and_then(|u| crate::runtime::clean::link(&u)),
            last_error: $r.try_get("last_error")?,
            delivered_at: $r.try_get("delivered_at")?,
            updated_at: $r.try_get("updated_at")?,
        }
    };
}

/// A document to store: what the ingest API validated, in its canonical
/// form, with the hash that tells a repeat from a conflicting change.
#[derive(Debug, Clone, Copy)]
pub struct NewDocument<'a> {
    /// The tenant it was issued to.
    pub tenant_id: &'a str,
    /// The platform's id of the document (unique within the tenant).
    pub document_id: &'a str,
    /// `invoice` or `credit-note`.
    pub kind: &'a str,
    /// Its number, as printed.
    pub number: &'a str,
    /// For a credit note, the number of the invoice it credits.
    pub credits_invoice_number: Option<&'a str>,
    /// The canonical JSON body.
    pub body: &'a str,
    /// SHA-256 of `body`, hex.
    pub body_hash: &'a str,
    /// When it was received (ms since the epoch).
    pub now: i64,
    /// Connectors that do not take this kind of document (their manifest's
    /// `document_kinds`): the fan-out makes no delivery to their
    /// connections.
    pub skip_connectors: &'a [String],
}

impl NewDocument<'_> {
    fn op(self, connections: Option<Vec<(String, String)>>) -> super::group::IngestOp {
        super::group::IngestOp {
            tenant_id: self.tenant_id.to_string(),
            document_id: self.document_id.to_string(),
            kind: self.kind.to_string(),
            number: self.number.to_string(),
            credits_invoice_number: self.credits_invoice_number.map(String::from),
            body: self.body.to_string(),
            body_hash: self.body_hash.to_string(),
            connections,
            skip_connectors: self.skip_connectors.to_vec(),
            now: self.now,
        }
    }
}

/// The lock that serialises claims on PostgreSQL.
const CLAIM_LOCK: i64 = 7215001;

/// The lock that serialises adding documents to incidents
/// ([`Store::record_incident`]) with taking them to be told
/// ([`Store::tell_incident`]): PostgreSQL's advisory lock with this
/// key; on SQLite the write lock does the same. Public for the test that
/// holds it.
pub const INCIDENT_LOCK: i64 = 7215002;

/// The first key of the two-key advisory locks that serialise one
/// connection's rate-window updates across daemons (the second key is the
/// connection id's `hashtext`). PostgreSQL keeps two-key locks apart from
/// single-key ones, so no connection id can hash onto [`CLAIM_LOCK`] or
/// [`INCIDENT_LOCK`] and wait on every daemon's claims or notices.
const RATE_LOCK_SPACE: i32 = 7215003;

/// The lock that serialises retention's body purge with making deliveries
/// for documents already stored ([`Store::send_missed`]): PostgreSQL's
/// advisory lock with this key (the purge's `NOT EXISTS` could not see a
/// delivery made in a transaction still open, and would empty the body
/// under it); on SQLite the write lock does the same.
pub(super) const BODY_LOCK: i64 = 7215004;

impl Store {
    /// Store a document and one delivery per `(connection id, connector id)`
    /// in one transaction (shared with other ingests and outcomes queued at
    /// the same moment: see [`super::group`]). Idempotent on (tenant,
    /// document id).
    pub async fn ingest_document(
        &self,
        doc: NewDocument<'_>,
        connections: &[(String, String)],
    ) -> Result<IngestOutcome, StoreError> {
        self.grouped_ingest(doc.op(Some(connections.to_vec())))
            .await
    }

    /// Store a document with one delivery per connection its tenant has
    /// (not disconnected) at the commit: [`Store::ingest_document`] with
    /// the fan-out read in the same transaction as the writes (one read
    /// for every tenant in the group). [`IngestOutcome::UnknownTenant`]
    /// when there is no such tenant.
    pub async fn ingest_for_tenant(
        &self,
        doc: NewDocument<'_>,
    ) -> Result<IngestOutcome, StoreError> {
        self.grouped_ingest(doc.op(None)).await
    }

    async fn grouped_ingest(
        &self,
        op: super::group::IngestOp,
    ) -> Result<IngestOutcome, StoreError> {
        match self.grouped(super::group::Op::Ingest(op)).await? {
            super::group::Done::Ingest(outcome) => Ok(outcome),
            _ => unreachable!("an ingest answers with an ingest outcome"),
        }
    }

    /// Claim up to `limit` due deliveries (pending and due, or working with
    /// an expired lease) for `worker`, never more working at once on one
    /// connection (across every daemon) than `caps` allows its connector,
    /// none of the connections in `exclude` (their provider's rate is used
    /// up). Each claim leases under a token of its own ([`Claimed::lease`]).
    pub async fn claim_deliveries(
        &self,
        worker: &str,
        now: i64,
        lease_ms: i64,
        limit: i64,
        caps: &ConnectionCaps,
        exclude: &[String],
    ) -> Result<Vec<Claimed>, StoreError> {
        self.claim_deliveries_but(worker, now, lease_ms, limit, caps, exclude, &[])
            .await
    }

    /// [`Store::claim_deliveries`], leaving alone the lapsed leases of
    /// `running`: deliveries this daemon is still working on (a lease that
    /// lapsed because renewals failed must not start a second attempt
    /// beside the first in the same process).
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_deliveries_but(
        &self,
        worker: &str,
        now: i64,
        lease_ms: i64,
        limit: i64,
        caps: &ConnectionCaps,
        exclude: &[String],
        running: &[String],
    ) -> Result<Vec<Claimed>, StoreError> {
        let lease = lease_token(worker);
        let exclude: std::collections::HashSet<&str> = exclude.iter().map(String::as_str).collect();
        let running: std::collections::HashSet<&str> = running.iter().map(String::as_str).collect();
        // Each connection's connector, read only when connectors differ in
        // their caps (for the connections that have work).
        let mut connector_of: HashMap<String, String> = HashMap::new();
        // The candidates, under the write lock: lapsed leases first, then
        // each connection's earliest due deliveries, never more per
        // connection than its free places, the earliest `limit` of all.
        // Found by index (a loose scan over the connections with pending
        // work, then a few rows each), not by ranking every pending row.
        macro_rules! pick_candidates {
            ($tx:expr) => {{
                let mut used: HashMap<String, i64> = HashMap::new();
                for r in sqlx::query(LIVE_LEASES)
                    .bind(now)
                    .fetch_all(&mut *$tx)
                    .await?
                {
                    used.insert(r.try_get("connection_id")?, r.try_get("n")?);
                }
                let pending_heads = sqlx::query(PENDING_HEADS)
                    .bind(now)
                    .fetch_all(&mut *$tx)
                    .await?;
                let lapsed = sqlx::query(LAPSED_LEASES)
                    .bind(now)
                    .fetch_all(&mut *$tx)
                    .await?;
                if !caps.by_connector.is_empty() {
                    let mut ids: Vec<String> = Vec::new();
                    for r in pending_heads.iter().chain(lapsed.iter()) {
                        let c: String = r.try_get("connection_id")?;
                        if !connector_of.contains_key(&c) && !ids.contains(&c) {
                            ids.push(c);
                        }
                    }
                    for chunk in ids.chunks(500) {
                        let sql = format!(
                            "SELECT id, connector_id FROM connections WHERE id IN ({})",
                            (1..=chunk.len())
                                .map(|i| format!("${i}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                        let mut q = sqlx::query(&sql);
                        for c in chunk {
                            q = q.bind(c);
                        }
                        for r in q.fetch_all(&mut *$tx).await? {
                            connector_of.insert(r.try_get("id")?, r.try_get("connector_id")?);
                        }
                    }
                }
                let cap_of = |c: &str| caps.of(connector_of.get(c).map(String::as_str));
                // (0 for a lapsed lease, 1 for pending work; due at; id):
                // lapsed leases sort first, so the cut to `limit` never
                // drops one for pending work after it has used up its
                // connection's room (a pending row of that connection, due
                // earlier than the pending work taken, would be left
                // behind: found by `the_claim_matches_its_model`).
                let mut picked: Vec<(u8, i64, String)> = Vec::new();
                // Every lapsed lease (few: at most the working ones), not the
                // first `limit`: those could all be on connections at their cap.
                for r in &lapsed {
                    let c: String = r.try_get("connection_id")?;
                    let id: String = r.try_get("id")?;
                    if running.contains(id.as_str()) {
                        // Still running here: it holds its connection's place.
                        *used.entry(c).or_insert(0) += 1;
                        continue;
                    }
                    if exclude.contains(c.as_str()) {
                        continue;
                    }
                    let cap = cap_of(&c);
                    let n = used.entry(c).or_insert(0);
                    if *n < cap {
                        *n += 1;
                        picked.push((0, r.try_get("next_attempt_at")?, id));
                    }
                }
                let mut heads: Vec<(i64, String)> = Vec::new();
                for r in &pending_heads {
                    let c: String = r.try_get("connection_id")?;
                    // Due by `now` (the query's filter), so never NULL.
                    let h: i64 = r.try_get("head")?;
                    if !exclude.contains(c.as_str())
                        && used.get(&c).copied().unwrap_or(0) < cap_of(&c)
                    {
                        heads.push((h, c));
                    }
                }
                // A connection whose earliest row comes after `limit` other
                // connections' earliest rows cannot make the cut.
                heads.sort();
                heads.truncate(usize::try_from(limit).unwrap_or(0));
                // A statement per [`PICKS_PER_STATEMENT`] connections
                // (SQLite refuses a compound SELECT of more than 500).
                for chunk in heads.chunks(PICKS_PER_STATEMENT) {
                    let sql = pending_picks_sql(chunk.len());
                    let mut q = sqlx::query(&sql).bind(now);
                    for (_, c) in chunk {
                        let room = (cap_of(c) - used.get(c).copied().unwrap_or(0)).min(limit);
                        q = q.bind(c.clone()).bind(room);
                    }
                    for r in q.fetch_all(&mut *$tx).await? {
                        picked.push((1, r.try_get("next_attempt_at")?, r.try_get("id")?));
                    }
                }
                picked.sort();
                picked.truncate(usize::try_from(limit).unwrap_or(0));
                picked
                    .into_iter()
                    .map(|(_, _, id)| id)
                    .collect::<Vec<String>>()
            }};
        }
        let returning = CLAIM_RETURNING;
        let rows = match self.pool() {
            Pool::Sqlite(p) => {
                // One daemon claims from a SQLite database, one claim at a
                // time: the candidates are picked from a plain read (the
                // working counts it sees can only have gone down since),
                // and the lease is written with the other grouped writes,
                // re-checking that each candidate is still due.
                let ids = {
                    let mut conn = p.acquire().await?;
                    pick_candidates!(conn)
                };
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let op = super::group::Op::Claim(super::group::ClaimOp {
                    lease: lease.clone(),
                    now,
                    lease_until: now + lease_ms,
                    ids,
                });
                match self.grouped(op).await? {
                    super::group::Done::Claim(rows) => rows,
                    _ => unreachable!("a claim answers with claimed rows"),
                }
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin_write_locked(CLAIM_LOCK).await?;
                let ids = pick_candidates!(tx);
                let rs = sqlx::query(&format!("UPDATE deliveries SET state = 'working', lease_owner = $1, lease_until = $2, updated_at = $3 WHERE id IN (SELECT id FROM deliveries WHERE id = ANY($4) AND ((state = 'pending' AND next_attempt_at <= $3) OR (state = 'working' AND lease_until < $3)) FOR UPDATE SKIP LOCKED) {returning}"))
                    .bind(&lease).bind(now + lease_ms).bind(now).bind(&ids)
                    .fetch_all(&mut *tx).await?;
                tx.commit().await?;
                rs.iter().map(claimed_from).collect::<Result<Vec<_>, _>>()?
            }
        };
        self.attach_bodies(rows).await
    }

    /// Fill in the claimed deliveries' document bodies with one query for
    /// the whole batch (outside the claim's write turn), not one per
    /// delivery.
    async fn attach_bodies(&self, mut rows: Vec<Claimed>) -> Result<Vec<Claimed>, StoreError> {
        if rows.is_empty() {
            return Ok(rows);
        }
        // A statement per [`PICKS_PER_STATEMENT`] rows (SQLite refuses an
        // expression deeper than 1,000: the chain of ORs).
        let mut by_key: HashMap<(String, String), (String, Option<String>)> = HashMap::new();
        for chunk in rows.chunks(PICKS_PER_STATEMENT) {
            let terms = (0..chunk.len())
                .map(|i| format!("(tenant_id = ${} AND id = ${})", 2 * i + 1, 2 * i + 2))
                .collect::<Vec<_>>()
                .join(" OR ");
            let sql = format!(
                "SELECT tenant_id, id, body, credits_invoice_number FROM documents WHERE {terms}"
            );
            let found: Vec<(String, String, String, Option<String>)> = on_pool!(self, p => {
                let mut q = sqlx::query_as(&sql);
                for c in chunk {
                    q = q.bind(&c.tenant_id).bind(&c.document_id);
                }
                q.fetch_all(p).await?
            });
            by_key.extend(
                found
                    .into_iter()
                    .map(|(t, id, body, credits)| ((t, id), (body, credits))),
            );
        }
        for c in &mut rows {
            let key = (c.tenant_id.clone(), c.document_id.clone());
            // Several deliveries of one document (one per connection) share it.
            let (body, credits) = by_key.get(&key).cloned().ok_or_else(|| {
                StoreError::NotFound(format!(
                    "document {} of tenant {} (claimed by delivery {})",
                    c.document_id, c.tenant_id, c.id
                ))
            })?;
            c.body = body;
            c.credits_invoice_number = credits;
        }
        Ok(rows)
    }

    /// Extend a lease still held under `lease` (the claim's
    /// [`Claimed::lease`]). False when it was lost.
    pub async fn renew_lease(&self, id: &str, lease: &str, until: i64) -> Result<bool, StoreError> {
        let n = on_pool!(self, p => sqlx::query("UPDATE deliveries SET lease_until = $1 WHERE id = $2 AND lease_owner = $3 AND state = 'working'")
            .bind(until).bind(id).bind(lease).execute(p).await?.rows_affected());
        Ok(n == 1)
    }

    /// Give a claimed delivery back untouched (graceful shutdown), if it is
    /// still leased under `lease`.
    pub async fn release(&self, id: &str, lease: &str, now: i64) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query("UPDATE deliveries SET state = 'pending', lease_owner = NULL, lease_until = NULL, next_attempt_at = $1, updated_at = $1 WHERE id = $2 AND lease_owner = $3 AND state = 'working'")
            .bind(now).bind(id).bind(lease).execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Record an attempt and move the delivery on, if it is still leased
    /// under `lease` (the claim's [`Claimed::lease`]; grouped with other
    /// writes: see [`super::group`]). Returns false (and records nothing)
    /// when the lease was lost.
    pub async fn finish_delivery(
        &self,
        id: &str,
        lease: &str,
        started_at: i64,
        now: i64,
        f: &Finish,
    ) -> Result<bool, StoreError> {
        let op = super::group::Op::Finish(super::group::FinishOp {
            id: id.to_string(),
            lease: lease.to_string(),
            started_at,
            now,
            finish: f.clone(),
        });
        match self.grouped(op).await? {
            super::group::Done::Finish(recorded) => Ok(recorded),
            _ => unreachable!("a finish answers with a finish outcome"),
        }
    }

    /// Where the delivery of invoice `number` on `connection_id` stands:
    /// None when ledgerport never saw that invoice.
    pub async fn invoice_delivery_state(
        &self,
        tenant_id: &str,
        connection_id: &str,
        number: &str,
    ) -> Result<Option<(String, i64)>, StoreError> {
        let r: Option<(String, i64)> = on_pool!(self, p => sqlx::query_as(INVOICE_STATE)
            .bind(tenant_id).bind(connection_id).bind(number).fetch_optional(p).await)?;
        Ok(r)
    }

    /// Paused deliveries: (id, tenant, connector, connection, reason, detail).
    /// Paused deliveries in id order after `after` (`""` for the first),
    /// at most [`PAUSED_PAGE`]: read page by page, every paused delivery is
    /// seen however many there are.
    pub async fn paused_deliveries(&self, after: &str) -> Result<Vec<PausedRow>, StoreError> {
        on_pool!(self, p => {
            let rows = sqlx::query(PAUSED)
                .bind(after).fetch_all(p).await?;
            let mut out = Vec::new();
            for r in rows {
                out.push(PausedRow {
                    id: r.try_get("id")?,
                    tenant_id: r.try_get("tenant_id")?,
                    connector_id: r.try_get("connector_id")?,
                    connection_id: r.try_get("connection_id")?,
                    reason: r.try_get::<Option<String>, _>("pause_reason")?.unwrap_or_default(),
                    detail: r.try_get("pause_detail")?,
                });
            }
            Ok(out)
        })
    }

    /// The line kinds a tenant's documents wait for a mapping of, for one
    /// connector (what the Integrations page offers to map when no
    /// catalogue is configured).
    pub async fn unmapped_kinds_waiting(
        &self,
        tenant_id: &str,
        connector_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        let details: Vec<(Option<String>,)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT DISTINCT pause_detail FROM deliveries
                 WHERE tenant_id = $1 AND connector_id = $2 AND state = 'paused'
                   AND pause_reason = 'mapping'",
            )
            .bind(tenant_id)
            .bind(connector_id)
            .fetch_all(p)
            .await?
        });
        let mut kinds: Vec<String> = details
            .into_iter()
            .filter_map(|(d,)| serde_json::from_str::<serde_json::Value>(&d?).ok())
            .flat_map(|d| {
                d["unmapped"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|k| k.as_str().map(String::from))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .collect();
        kinds.sort();
        kinds.dedup();
        Ok(kinds)
    }

    /// Why a connection's paused deliveries are paused (each reason once).
    pub async fn pause_reasons(&self, connection_id: &str) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(Option<String>,)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT DISTINCT pause_reason FROM deliveries WHERE state = 'paused' AND connection_id = $1",
            )
            .bind(connection_id)
            .fetch_all(p)
            .await?
        });
        let mut out: Vec<String> = rows.into_iter().filter_map(|(r,)| r).collect();
        out.sort();
        Ok(out)
    }

    /// Retention: what a delivered document no longer needs, from before
    /// `before` (ms). Kept: every document's row (tenant, id, number, the
    /// body's hash: the same document posted again is still recognised,
    /// and a changed one still refused), every delivery's row (the log's
    /// line, with the provider's id and address), and all of a document
    /// not yet delivered everywhere. Dropped: the bodies (the canonical
    /// JSON with its PDF, up to 16 MiB each) of documents received before
    /// `before` whose every delivery is delivered, or that had none; the
    /// attempts of delivered deliveries finished before it; mails sent and
    /// incidents closed before it. In batches, so no write waits long.
    pub async fn purge_delivered(&self, before: i64) -> Result<PurgeReport, StoreError> {
        const BATCH: i64 = 500;
        let mut report = PurgeReport::default();
        // Bodies: one pass over the documents in key order (a cursor, not
        // a rescan from the start per batch), each batch read, then
        // written by key in a short statement.
        let mut after: (String, String) = (String::new(), String::new());
        loop {
            let keys: Vec<(String, String)> = on_pool!(self, p => sqlx::query_as(
                "SELECT doc.tenant_id, doc.id FROM documents doc
                 WHERE (doc.tenant_id, doc.id) > ($2, $3) AND doc.received_at < $1 AND doc.body <> ''
                   AND NOT EXISTS (SELECT 1 FROM deliveries d
                     WHERE d.tenant_id = doc.tenant_id AND d.document_number = doc.number
                       AND d.document_id = doc.id AND d.state <> 'delivered')
                 ORDER BY doc.tenant_id, doc.id LIMIT $4",
            )
            .bind(before)
            .bind(&after.0)
            .bind(&after.1)
            .bind(BATCH)
            .fetch_all(p)
            .await?);
            let Some(last) = keys.last().cloned() else {
                break;
            };
            for chunk in keys.chunks(100) {
                let terms = (0..chunk.len())
                    .map(|i| format!("(tenant_id = ${} AND id = ${})", 2 * i + 2, 2 * i + 3))
                    .collect::<Vec<_>>()
                    .join(" OR ");
                // Checked again at the write: a delivery made meanwhile
                // (a new connection's) keeps the body.
                let sql = format!(
                    "UPDATE documents SET body = '' WHERE body <> '' AND received_at < $1 AND ({terms})
                     AND NOT EXISTS (SELECT 1 FROM deliveries d
                       WHERE d.tenant_id = documents.tenant_id AND d.document_number = documents.number
                         AND d.document_id = documents.id AND d.state <> 'delivered')"
                );
                report.bodies += on_pool!(self, p => {
                    let mut tx = p.begin_write_locked(BODY_LOCK).await?;
                    let mut q = sqlx::query(&sql).bind(before);
                    for (t, id) in chunk {
                        q = q.bind(t).bind(id);
                    }
                    let n = q.execute(&mut *tx).await?.rows_affected();
                    tx.commit().await?;
                    n
                });
            }
            if (keys.len() as i64) < BATCH {
                break;
            }
            after = last;
        }
        // Attempts of delivered deliveries: by id, in order.
        let mut after_id: i64 = 0;
        loop {
            let ids: Vec<(i64,)> = on_pool!(self, p => sqlx::query_as(
                "SELECT a.id FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
                 WHERE a.id > $2 AND d.state = 'delivered' AND a.finished_at < $1
                 ORDER BY a.id LIMIT $3",
            )
            .bind(before)
            .bind(after_id)
            .bind(BATCH)
            .fetch_all(p)
            .await?);
            let Some(&(last,)) = ids.last() else {
                break;
            };
            let list = ids
                .iter()
                .map(|(id,)| id.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            report.attempts += on_pool!(self, p => sqlx::query(&format!(
                "DELETE FROM delivery_attempts WHERE id IN ({list})"
            ))
            .execute(p)
            .await?
            .rows_affected());
            if (ids.len() as i64) < BATCH {
                break;
            }
            after_id = last;
        }
        report.mails = on_pool!(self, p => sqlx::query(
            "DELETE FROM mail_outbox WHERE (sent_at IS NOT NULL AND sent_at < $1)
               OR (sent_at IS NULL AND next_attempt_at >= $2 AND created_at < $1)",
        )
        .bind(before)
        .bind(crate::notify::GIVEN_UP)
        .execute(p)
        .await?
        .rows_affected());
        report.incidents = on_pool!(self, p => sqlx::query(
            "DELETE FROM incidents WHERE closed_at IS NOT NULL AND closed_at < $1
               AND NOT EXISTS (SELECT 1 FROM mail_outbox m WHERE m.incident_id = incidents.id)",
        )
        .bind(before)
        .execute(p)
        .await?
        .rows_affected());
        Ok(report)
    }

    /// When a connection last delivered a document (ms), if ever.
    pub async fn last_delivered_at(&self, connection_id: &str) -> Result<Option<i64>, StoreError> {
        let row: (Option<i64>,) = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT MAX(delivered_at) FROM deliveries WHERE state = 'delivered' AND connection_id = $1",
            )
            .bind(connection_id)
            .fetch_one(p)
            .await?
        });
        Ok(row.0)
    }

    /// Put paused deliveries back in the queue, and close the incidents
    /// that no longer have anything paused. Like a retry by hand, a resume
    /// starts the retry ladder again (what paused it was fixed by a
    /// person): attempts before the pause do not count against it
    /// ([`Claimed::ladder_base`]), so a delivery paused and resumed a few
    /// times is not failed by its first 5xx afterwards. Attempts keep
    /// counting, for the log and the connector's attempt number.
    pub async fn resume(&self, ids: &[String], now: i64) -> Result<u64, StoreError> {
        // A statement (and a commit) per 500 ids, not per id: a reconnect
        // after a weekend may resume tens of thousands.
        let mut n = 0;
        for chunk in ids.chunks(500) {
            let sql = format!(
                "UPDATE deliveries SET state = 'pending', ladder_base = attempts, pause_reason = NULL, pause_detail = NULL, incident_due = NULL, next_attempt_at = $1, updated_at = $1 WHERE state = 'paused' AND id IN ({})",
                super::placeholders(2, chunk.len())
            );
            n += on_pool!(self, p => {
                let mut q = sqlx::query(&sql).bind(now);
                for id in chunk {
                    q = q.bind(id);
                }
                q.execute(p).await?.rows_affected()
            });
        }
        if n > 0 {
            self.close_resolved_incidents(now).await?;
        }
        Ok(n)
    }

    /// Put failed deliveries back in the queue: one by id, or all of a tenant's.
    pub async fn retry_failed(
        &self,
        tenant_id: &str,
        delivery_id: Option<&str>,
        now: i64,
    ) -> Result<u64, StoreError> {
        // A paused one retried by id leaves its pause behind (reason and
        // detail), and its incident is closed once nothing of it is paused:
        // else the notice of a pause already resolved would still be sent,
        // or an incident left open would swallow the next pause's notice.
        let n = on_pool!(self, p => match delivery_id {
            Some(id) => sqlx::query("UPDATE deliveries SET state = 'pending', attempts = 0, ladder_base = 0, pause_reason = NULL, pause_detail = NULL, incident_due = NULL, next_attempt_at = $1, updated_at = $1 WHERE tenant_id = $2 AND id = $3 AND state IN ('failed', 'paused')")
                .bind(now).bind(tenant_id).bind(id).execute(p).await?.rows_affected(),
            None => sqlx::query("UPDATE deliveries SET state = 'pending', attempts = 0, ladder_base = 0, incident_due = NULL, next_attempt_at = $1, updated_at = $1 WHERE tenant_id = $2 AND state = 'failed'")
                .bind(now).bind(tenant_id).execute(p).await?.rows_affected(),
        });
        if n > 0 && delivery_id.is_some() {
            self.close_resolved_incidents(now).await?;
        }
        Ok(n)
    }

    /// The state of one of a tenant's deliveries (`None`: no such delivery
    /// of that tenant).
    pub async fn delivery_state(
        &self,
        tenant_id: &str,
        delivery_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = on_pool!(self, p => sqlx::query_as("SELECT state FROM deliveries WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id).bind(delivery_id).fetch_optional(p).await?);
        Ok(row.map(|(s,)| s))
    }

    /// List deliveries, the latest change first (for the log, the API and
    /// the CLI).
    pub async fn list_deliveries(
        &self,
        tenant_id: Option<&str>,
        number: Option<&str>,
        state: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        self.list_deliveries_page(tenant_id, number, state, None, limit)
            .await
    }

    /// One page of [`Store::list_deliveries`]: the rows after `after` (a
    /// [`LogCursor`] taken from the last row of the previous page).
    pub async fn list_deliveries_page(
        &self,
        tenant_id: Option<&str>,
        number: Option<&str>,
        state: Option<&str>,
        after: Option<&LogCursor>,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        let sql = delivery_log_sql(
            tenant_id.is_some(),
            number.is_some(),
            state.is_some(),
            after.is_some(),
        );
        on_pool!(self, p => {
            let mut q = sqlx::query(&sql);
            for v in [tenant_id, number, state].into_iter().flatten() {
                q = q.bind(v);
            }
            if let Some(c) = after {
                q = q.bind(c.updated_at).bind(&c.id);
            }
            let rows = q.bind(limit).fetch_all(p).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(delivery_row!(r));
            }
            Ok(out)
        })
    }

    /// The attempts of one delivery, oldest first.
    pub async fn list_attempts(&self, delivery_id: &str) -> Result<Vec<AttemptRow>, StoreError> {
        self.recent_attempts(delivery_id, i64::MAX).await
    }

    /// The last `limit` attempts of a delivery, oldest first (a credit note
    /// behind a paused invoice gathers one a minute: the log shows the
    /// latest, with [`Store::attempt_count`] for the whole).
    pub async fn recent_attempts(
        &self,
        delivery_id: &str,
        limit: i64,
    ) -> Result<Vec<AttemptRow>, StoreError> {
        on_pool!(self, p => {
            let rows = sqlx::query("SELECT * FROM (SELECT id, attempt, worker, started_at, finished_at, outcome, message, details, external_id, external_url FROM delivery_attempts WHERE delivery_id = $1 ORDER BY id DESC LIMIT $2) AS a ORDER BY id")
                .bind(delivery_id).bind(limit).fetch_all(p).await?;
            let mut out = Vec::new();
            for r in rows {
                out.push(AttemptRow {
                    attempt: r.try_get("attempt")?,
                    worker: r.try_get("worker")?,
                    started_at: r.try_get("started_at")?,
                    finished_at: r.try_get("finished_at")?,
                    outcome: r.try_get("outcome")?,
                    message: r.try_get("message")?,
                    details: r.try_get("details")?,
                    external_id: r.try_get("external_id")?,
                    external_url: r.try_get("external_url")?,
                });
            }
            Ok(out)
        })
    }

    /// How many attempts a delivery has had.
    pub async fn attempt_count(&self, delivery_id: &str) -> Result<i64, StoreError> {
        let (n,): (i64,) = on_pool!(self, p => {
            sqlx::query_as("SELECT COUNT(*) FROM delivery_attempts WHERE delivery_id = $1")
                .bind(delivery_id)
                .fetch_one(p)
                .await?
        });
        Ok(n)
    }

    /// Count deliveries by state (for metrics and status).
    pub async fn delivery_counts(
        &self,
        connection_id: Option<&str>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        on_pool!(self, p => {
            // Only the conditions given: `$1 IS NULL OR ...` keeps SQLite
            // from using an index, and the table holds every delivery.
            let rows = match connection_id {
                Some(c) => sqlx::query(CONNECTION_COUNTS)
                    .bind(c).fetch_all(p).await?,
                None => sqlx::query("SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state ORDER BY state")
                    .fetch_all(p).await?,
            };
            let mut out = Vec::new();
            for r in rows {
                out.push((r.try_get("state")?, r.try_get("n")?));
            }
            Ok(out)
        })
    }

    /// Count one tenant's deliveries by state (the delivery log's filters).
    pub async fn tenant_delivery_counts(
        &self,
        tenant_id: &str,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        on_pool!(self, p => {
            let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM deliveries WHERE tenant_id = $1 GROUP BY state ORDER BY state")
                .bind(tenant_id).fetch_all(p).await?;
            let mut out = Vec::new();
            for r in rows {
                out.push((r.try_get("state")?, r.try_get("n")?));
            }
            Ok(out)
        })
    }

    /// Open an incident for (tenant, connection, kind) or add a document to
    /// the open one. A new incident is told after `coalesce_ms`, so that
    /// documents failing together arrive in one e-mail.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    pub async fn record_incident(
        &self,
        tenant_id: &str,
        connection_id: &str,
        kind: &str,
        document_number: &str,
        detail: &str,
        now: i64,
        coalesce_ms: i64,
    ) -> Result<(), StoreError> {
        self.record_incident_of(
            None,
            tenant_id,
            connection_id,
            kind,
            document_number,
            detail,
            now,
            coalesce_ms,
        )
        .await
        .map(|_| ())
    }

    /// [`Store::record_incident`] for the outcome of `delivery`, when given:
    /// recorded only while the delivery is still marked as owing it
    /// (`incident_due`), and the mark cleared in the same transaction, so
    /// the dispatcher and the sweep of marks left behind
    /// ([`Store::incidents_owed`]) never record one outcome twice. False
    /// when there was nothing (left) to record.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_incident_of(
        &self,
        delivery: Option<&str>,
        tenant_id: &str,
        connection_id: &str,
        kind: &str,
        document_number: &str,
        detail: &str,
        now: i64,
        coalesce_ms: i64,
    ) -> Result<bool, StoreError> {
        on_pool!(self, p => {
            let mut tx = p.begin_write_locked(INCIDENT_LOCK).await?;
            if let Some(id) = delivery {
                let n = sqlx::query("UPDATE deliveries SET incident_due = NULL WHERE id = $1 AND incident_due = $2")
                    .bind(id).bind(kind).execute(&mut *tx).await?.rows_affected();
                if n == 0 {
                    // Dropped: rolled back.
                    return Ok(false);
                }
            }
            // An incident not yet told takes more documents; once told, a
            // pause keeps collecting silently what the open, told incidents
            // named (more documents waiting for the same mappings or
            // reconnection, in any mix), but a new cause (a kind none of
            // them named) starts a new one, told in its turn; a failure
            // always starts a new one.
            let open_ones = sqlx::query("SELECT id, documents, documents_more, details, notified_at FROM incidents WHERE tenant_id = $1 AND connection_id = $2 AND kind = $3 AND closed_at IS NULL ORDER BY opened_at DESC")
                .bind(tenant_id).bind(connection_id).bind(kind).fetch_all(&mut *tx).await?;
            let mut untold = None;
            let mut newest = None;
            let mut told_items: std::collections::HashSet<String> = Default::default();
            for r in open_ones {
                let notified: Option<i64> = r.try_get("notified_at")?;
                if notified.is_none() {
                    untold.get_or_insert(r);
                    continue;
                }
                let told: Vec<String> = serde_json::from_str(&r.try_get::<String, _>("details")?).unwrap_or_default();
                told_items.extend(told.iter().flat_map(|d| cause_items(incident_cause(d))));
                newest.get_or_insert(r);
            }
            let open = match untold {
                Some(r) => Some(r),
                // Told already of everything this one is waiting for.
                None if kind.starts_with("paused")
                    && cause_items(incident_cause(detail)).iter().all(|i| told_items.contains(i)) => newest,
                None => None,
            };
            if let Some(r) = open {
                let id: String = r.try_get("id")?;
                let mut docs: Vec<String> = serde_json::from_str(&r.try_get::<String, _>("documents")?).unwrap_or_default();
                let mut details: Vec<String> = serde_json::from_str(&r.try_get::<String, _>("details")?).unwrap_or_default();
                let mut more: i64 = r.try_get("documents_more")?;
                if !docs.iter().any(|d| d == document_number) {
                    if docs.len() < MAX_INCIDENT_DOCUMENTS {
                        docs.push(document_number.to_string());
                    } else {
                        // Counted once per outcome recorded (a document
                        // paused again after a retry counts again).
                        more = more.saturating_add(1);
                    }
                }
                if !details.iter().any(|d| d == detail) && details.len() < 50 {
                    details.push(detail.to_string());
                }
                sqlx::query("UPDATE incidents SET documents = $1, details = $2, updated_at = $3, documents_more = $5 WHERE id = $4")
                    .bind(serde_json::to_string(&docs).unwrap_or_default())
                    .bind(serde_json::to_string(&details).unwrap_or_default())
                    .bind(now).bind(&id).bind(more).execute(&mut *tx).await?;
            } else {
                sqlx::query("INSERT INTO incidents (id, tenant_id, connection_id, kind, documents, details, opened_at, updated_at, notify_after) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)")
                    .bind(uuid::Uuid::new_v4().to_string()).bind(tenant_id).bind(connection_id).bind(kind)
                    .bind(serde_json::to_string(&[document_number]).unwrap_or_default())
                    .bind(serde_json::to_string(&[detail]).unwrap_or_default())
                    .bind(now).bind(now + coalesce_ms)
                    .execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Outcomes whose incident was never recorded (the daemon stopped
    /// between recording the outcome and its incident, or the incident's
    /// write failed): marked before `before`, at most `limit`, oldest first.
    pub async fn incidents_owed(
        &self,
        before: i64,
        limit: i64,
    ) -> Result<Vec<IncidentOwed>, StoreError> {
        Ok(on_pool!(self, p => sqlx::query_as(INCIDENTS_OWED)
            .bind(before)
            .bind(limit)
            .fetch_all(p)
            .await?))
    }

    /// Incidents due to be told: open, not told yet, past their grouping
    /// window. Only read: [`Store::tell_incident`] marks each one told
    /// together with queueing its mail.
    pub async fn due_incidents(&self, now: i64) -> Result<Vec<IncidentRow>, StoreError> {
        on_pool!(self, p => {
            let rows = sqlx::query("SELECT id, tenant_id, connection_id, kind, documents, documents_more, details FROM incidents WHERE notified_at IS NULL AND closed_at IS NULL AND notify_after <= $1 ORDER BY opened_at LIMIT 500")
                .bind(now).fetch_all(p).await?;
            let mut out = Vec::new();
            for r in rows {
                let documents: String = r.try_get("documents")?;
                let details: String = r.try_get("details")?;
                let more: i64 = r.try_get("documents_more")?;
                out.push(IncidentRow {
                    id: r.try_get("id")?,
                    tenant_id: r.try_get("tenant_id")?,
                    connection_id: r.try_get("connection_id")?,
                    kind: r.try_get("kind")?,
                    documents: serde_json::from_str(&documents).unwrap_or_default(),
                    details: serde_json::from_str(&details).unwrap_or_default(),
                    more_documents: more,
                    read_as: (documents, details, more),
                });
            }
            Ok(out)
        })
    }

    /// Mark an incident told and queue its mail (`None`: nobody to tell)
    /// in one transaction, so a notice is neither lost (told, mail never
    /// queued: a crash or a failed insert in between) nor queued twice
    /// (two daemons telling the same incident). Done only if the incident
    /// is still untold, open, and exactly as `inc` was read: a document
    /// added since (or a pause resolved since) leaves it for the next
    /// round, which reads it anew. Serialised with
    /// [`Store::record_incident`] by the incident lock (PostgreSQL's
    /// advisory lock; SQLite's write lock). Returns whether it was told.
    pub async fn tell_incident(
        &self,
        inc: &IncidentRow,
        mail: Option<&NewMail>,
        now: i64,
    ) -> Result<bool, StoreError> {
        on_pool!(self, p => {
            let mut tx = p.begin_write_locked(INCIDENT_LOCK).await?;
            let told = sqlx::query("UPDATE incidents SET notified_at = $1, closed_at = CASE WHEN kind LIKE 'paused%' THEN closed_at ELSE $1 END WHERE id = $2 AND notified_at IS NULL AND closed_at IS NULL AND documents = $3 AND details = $4 AND documents_more = $5")
                .bind(now).bind(&inc.id).bind(&inc.read_as.0).bind(&inc.read_as.1).bind(inc.read_as.2)
                .execute(&mut *tx).await?.rows_affected() == 1;
            if told && let Some(m) = mail {
                sqlx::query(INSERT_MAIL)
                    .bind(uuid::Uuid::new_v4().to_string()).bind(&inc.tenant_id).bind(&inc.id)
                    .bind(m.recipients.join(",")).bind(&m.subject).bind(&m.text).bind(&m.html).bind(now)
                    .execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(told)
        })
    }

    /// Close pause incidents whose deliveries are no longer paused.
    pub async fn close_resolved_incidents(&self, now: i64) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query(CLOSE_RESUMED_INCIDENTS)
            .bind(now).execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Lease the oldest mail due to be (re)sent to this caller until
    /// `lease_until` (its next attempt moves there), so that another
    /// daemon polling meanwhile does not send it too; a daemon that dies
    /// mid-send leaves it to be sent again once the lease ends.
    pub async fn claim_due_mail(
        &self,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<OutgoingMail>, StoreError> {
        let sql = claim_mail_sql(match self.kind() {
            StoreKind::Sqlite => "",
            StoreKind::Postgres => " FOR UPDATE SKIP LOCKED",
        });
        on_pool!(self, p => {
            let Some(r) = sqlx::query(&sql).bind(now).bind(lease_until).fetch_optional(p).await? else {
                return Ok(None);
            };
            Ok(Some(OutgoingMail {
                id: r.try_get("id")?,
                tenant_id: r.try_get("tenant_id")?,
                recipients: split_recipients(&r.try_get::<String, _>("recipients")?),
                subject: r.try_get("subject")?,
                text_body: r.try_get("text_body")?,
                html_body: r.try_get("html_body")?,
                attempts: r.try_get("attempts")?,
            }))
        })
    }

    /// Record a mail's sending (Ok) or failure (Err, with the next try).
    pub async fn mail_result(
        &self,
        id: &str,
        now: i64,
        result: Result<(), (String, i64)>,
    ) -> Result<(), StoreError> {
        on_pool!(self, p => match result {
            Ok(()) => sqlx::query("UPDATE mail_outbox SET sent_at = $1, attempts = attempts + 1, last_error = NULL WHERE id = $2")
                .bind(now).bind(id).execute(p).await.map(|_| ()),
            Err((e, next)) => sqlx::query("UPDATE mail_outbox SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2 WHERE id = $3")
                .bind(e).bind(next).bind(id).execute(p).await.map(|_| ()),
        })?;
        Ok(())
    }

    /// A mail sent to some of its addresses: only `recipients` are still
    /// owed it, tried again at `next`.
    pub async fn mail_owed(
        &self,
        id: &str,
        recipients: &[String],
        error: &str,
        next: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query("UPDATE mail_outbox SET recipients = $1, attempts = attempts + 1, last_error = $2, next_attempt_at = $3 WHERE id = $4")
            .bind(recipients.join(",")).bind(error).bind(next).bind(id).execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Mails not yet sent (for status and tests).
    pub async fn unsent_mail_count(&self) -> Result<i64, StoreError> {
        Ok(
            on_pool!(self, p => sqlx::query_scalar("SELECT COUNT(*) FROM mail_outbox WHERE sent_at IS NULL").fetch_one(p).await)?,
        )
    }

    /// Hold a connection's requests until `until` (the provider asked for
    /// that pause): [`Store::take_rate_slot`] answers "wait" on every daemon
    /// until then. One row per connection (`hold:<id>` in the rate log),
    /// replaced by the next hold; a later `until` than the one held wins.
    pub async fn hold_rate_window(
        &self,
        connection_id: &str,
        until: i64,
    ) -> Result<(), StoreError> {
        let key = hold_key(connection_id);
        on_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            if matches!(self.kind(), StoreKind::Postgres) {
                sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))").bind(RATE_LOCK_SPACE).bind(connection_id).execute(&mut *tx).await?;
            }
            let held: Option<i64> = sqlx::query_scalar("SELECT MAX(at) FROM rate_log WHERE connection_id = $1")
                .bind(&key).fetch_one(&mut *tx).await?;
            if held.is_none_or(|h| h < until) {
                sqlx::query("DELETE FROM rate_log WHERE connection_id = $1").bind(&key).execute(&mut *tx).await?;
                sqlx::query("INSERT INTO rate_log (connection_id, at) VALUES ($1, $2)")
                    .bind(&key).bind(until).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Take one request slot of a connection's sliding window (`limit`
    /// requests per `window_ms`), shared by every daemon on this database.
    /// Ok(()) when taken; Err(ms) to wait before trying again.
    pub async fn take_rate_slot(
        &self,
        connection_id: &str,
        limit: i64,
        window_ms: i64,
        now: i64,
    ) -> Result<Result<(), i64>, StoreError> {
        on_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            if matches!(self.kind(), StoreKind::Postgres) {
                sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))").bind(RATE_LOCK_SPACE).bind(connection_id).execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM rate_log WHERE connection_id = $1 AND at <= $2")
                .bind(connection_id).bind(now - window_ms).execute(&mut *tx).await?;
            let (n, oldest, hold): (i64, Option<i64>, Option<i64>) = {
                let r = sqlx::query("SELECT COUNT(*) AS n, MIN(at) AS oldest, (SELECT MAX(at) FROM rate_log WHERE connection_id = $2) AS hold FROM rate_log WHERE connection_id = $1")
                    .bind(connection_id).bind(hold_key(connection_id)).fetch_one(&mut *tx).await?;
                (r.try_get("n")?, r.try_get("oldest")?, r.try_get("hold")?)
            };
            // The provider asked for a pause (see `hold_rate_window`).
            if let Some(until) = hold.filter(|&u| u > now) {
                tx.rollback().await?;
                return Ok(Err(until - now));
            }
            if n >= limit {
                tx.rollback().await?;
                let wait = oldest.map(|o| o + window_ms - now + 1).unwrap_or(100).max(1);
                return Ok(Err(wait));
            }
            sqlx::query("INSERT INTO rate_log (connection_id, at) VALUES ($1, $2)")
                .bind(connection_id).bind(now).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(Ok(()))
        })
    }
}

pub(super) fn claimed_from<R: Row>(r: &R) -> Result<Claimed, sqlx::Error>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Claimed {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        document_id: r.try_get("document_id")?,
        connection_id: r.try_get("connection_id")?,
        connector_id: r.try_get("connector_id")?,
        attempts: r.try_get("attempts")?,
        ladder_base: r.try_get("ladder_base")?,
        body: String::new(),
        document_kind: r.try_get("document_kind")?,
        document_number: r.try_get("document_number")?,
        credits_invoice_number: None,
        lease: r.try_get("lease_owner")?,
    })
}

/// Deliveries still owing their incident (`$1`: marked before, `$2`: at most).
const INCIDENTS_OWED: &str = "SELECT id, tenant_id, connection_id, incident_due, document_kind, document_number, last_error FROM deliveries WHERE incident_due IS NOT NULL AND updated_at < $1 ORDER BY updated_at LIMIT $2";

/// The columns a claim returns (see [`claimed_from`]).
pub(super) const CLAIM_RETURNING: &str = "RETURNING id, tenant_id, document_id, connection_id, connector_id, attempts, ladder_base, document_kind, document_number, lease_owner";

/// Live leases by connection (`$1`: now): the places each connection has in use.
const LIVE_LEASES: &str = "SELECT connection_id, COUNT(*) AS n FROM deliveries WHERE state = 'working' AND lease_until >= $1 GROUP BY connection_id";

/// How many deliveries may work at once on one connection: each
/// connector's own limit (its manifest's `concurrent_per_connection`), or
/// the default for a connector not named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionCaps {
    /// The cap of a connector not in `by_connector`.
    pub default: i64,
    /// Caps by connector id (empty: `default` for every connection, and no
    /// connector is read during a claim).
    pub by_connector: HashMap<String, i64>,
}

impl ConnectionCaps {
    /// The same cap for every connection.
    pub fn uniform(cap: i64) -> Self {
        Self {
            default: cap,
            by_connector: HashMap::new(),
        }
    }

    /// The cap of a connection of `connector` (unknown: the default).
    pub fn of(&self, connector: Option<&str>) -> i64 {
        connector
            .and_then(|c| self.by_connector.get(c))
            .copied()
            .unwrap_or(self.default)
    }
}

/// Every lapsed lease (`$1`: now), earliest first.
const LAPSED_LEASES: &str = "SELECT id, connection_id, next_attempt_at FROM deliveries WHERE state = 'working' AND lease_until < $1 ORDER BY next_attempt_at, id";

/// The state of the latest delivery of invoice `$3` of tenant `$1` on
/// connection `$2`.
const INVOICE_STATE: &str = "SELECT state, next_attempt_at FROM deliveries WHERE tenant_id = $1 AND connection_id = $2 AND document_number = $3 AND document_kind = 'invoice' ORDER BY created_at DESC LIMIT 1";

/// Most paused deliveries read in one page.
pub const PAUSED_PAGE: usize = 5_000;

/// Paused deliveries after id `$1`, one page.
const PAUSED: &str = "SELECT id, tenant_id, connector_id, connection_id, pause_reason, pause_detail FROM deliveries WHERE state = 'paused' AND id > $1 ORDER BY id LIMIT 5000";

/// Close pause incidents (`$1`: now) whose connection has no delivery
/// paused for that reason any more.
/// The rate log's row that holds a connection's requests until its `at`.
fn hold_key(connection_id: &str) -> String {
    format!("hold:{connection_id}")
}

/// Queue a mail: id, tenant, incident, recipients, subject, text, html, now.
const INSERT_MAIL: &str = "INSERT INTO mail_outbox (id, tenant_id, incident_id, recipients, subject, text_body, html_body, created_at, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)";

/// A mail's stored recipients (comma-separated) as a list.
pub(crate) fn split_recipients(stored: &str) -> Vec<String> {
    stored
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Lease the oldest due mail (`$1` now, `$2` the lease's end); `lock` is
/// PostgreSQL's row lock clause. The outer conditions repeat the inner
/// ones so that an update that waited for another daemon's lease
/// re-checks the row as that lease left it.
fn claim_mail_sql(lock: &str) -> String {
    format!(
        "UPDATE mail_outbox SET next_attempt_at = $2 WHERE id = (SELECT id FROM mail_outbox WHERE sent_at IS NULL AND next_attempt_at <= $1 ORDER BY created_at LIMIT 1{lock}) AND sent_at IS NULL AND next_attempt_at <= $1 RETURNING id, tenant_id, recipients, subject, text_body, html_body, attempts"
    )
}

/// One connection's deliveries by state, found by the index that begins
/// with (state, connection_id): one range per state, not a read of every
/// delivery (no index begins with connection_id).
const CONNECTION_COUNTS: &str = "SELECT state, COUNT(*) AS n FROM deliveries WHERE state IN ('pending', 'working', 'delivered', 'paused', 'failed') AND connection_id = $1 GROUP BY state ORDER BY state";

const CLOSE_RESUMED_INCIDENTS: &str = "UPDATE incidents SET closed_at = $1 WHERE closed_at IS NULL AND kind LIKE 'paused%' AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.connection_id = incidents.connection_id AND d.state = 'paused' AND ('paused-' || d.pause_reason) = incidents.kind)";

/// The delivery log's statement with only the filters given, in this
/// order: tenant, document number, state, the cursor (`updated_at`, `id`),
/// then the limit. A condition written `($1 IS NULL OR tenant_id = $1)`
/// keeps SQLite from using any index: every page read the whole table,
/// which keeps every delivery ever made.
pub(crate) fn delivery_log_sql(tenant: bool, number: bool, state: bool, after: bool) -> String {
    let mut conds: Vec<String> = Vec::new();
    let mut n = 0;
    let mut arg = || {
        n += 1;
        format!("${n}")
    };
    if tenant {
        conds.push(format!("tenant_id = {}", arg()));
    }
    if number {
        conds.push(format!("document_number = {}", arg()));
    }
    if state {
        conds.push(format!("state = {}", arg()));
    }
    if after {
        let (at, id) = (arg(), arg());
        conds.push(format!(
            "(updated_at < {at} OR (updated_at = {at} AND id > {id}))"
        ));
    }
    let limit = arg();
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {} ", conds.join(" AND "))
    };
    format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries {filter}ORDER BY updated_at DESC, id LIMIT {limit}"
    )
}

/// Connections picked from, or claimed rows whose documents are read, in
/// one statement: SQLite refuses a compound SELECT of more than 500 terms
/// and an expression deeper than 1,000 (a claim may take up to 4,096 rows
/// over as many connections).
const PICKS_PER_STATEMENT: usize = 200;

/// The earliest due pending deliveries of `n` connections: `$1` is now,
/// then each connection's id and room (`$2`, `$3`; `$4`, `$5`; ...).
fn pending_picks_sql(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "SELECT * FROM (SELECT id, next_attempt_at FROM deliveries WHERE state = 'pending' AND connection_id = ${} AND next_attempt_at <= $1 ORDER BY next_attempt_at, id LIMIT ${}) AS c{i}",
                2 * i + 2,
                2 * i + 3
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

/// Each connection with pending deliveries due by `$1` and its earliest
/// one, by a loose index scan (`deliveries_pending_by_connection`): two
/// index look-ups per connection, whatever the backlog.
/// Connections whose earliest pending row is not due yet are left out.
const PENDING_HEADS: &str = "WITH RECURSIVE conns(cid) AS (
        SELECT (SELECT MIN(connection_id) FROM deliveries WHERE state = 'pending')
        UNION ALL
        SELECT (SELECT MIN(d.connection_id) FROM deliveries d
                WHERE d.state = 'pending' AND d.connection_id > conns.cid)
        FROM conns WHERE conns.cid IS NOT NULL)
    SELECT connection_id, head FROM (
        SELECT cid AS connection_id,
               (SELECT MIN(d.next_attempt_at) FROM deliveries d
                WHERE d.state = 'pending' AND d.connection_id = conns.cid) AS head
        FROM conns WHERE cid IS NOT NULL) AS heads
    WHERE head <= $1";

/// The stable id of a delivery: the same on every retry and every daemon,
/// and the connector's idempotency base.
pub fn delivery_id(tenant_id: &str, document_id: &str, connection_id: &str) -> String {
    let ns = uuid::Uuid::from_u128(0x6c65_6467_6572_706f_7274_0000_0000_0001);
    let name = format!("{}\u{1f}{}\u{1f}{}", tenant_id, document_id, connection_id);
    format!("dlv-{}", uuid::Uuid::new_v5(&ns, name.as_bytes()).simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal before anything was sent (a kind the connector does not
    /// take) is told as a refusal, not as "tried several times and kept
    /// failing".
    #[test]
    fn a_kind_not_accepted_is_a_refusal_not_retries_given_up() {
        let kind = |outcome: &str| Finish::failed(outcome, "m".into(), None, 0).incident_kind();
        assert_eq!(kind("not-accepted"), Some("failed"));
        assert_eq!(kind("rejected"), Some("failed"));
        assert_eq!(kind("transient"), Some("retries-exhausted"));
        assert_eq!(
            Finish::wait("rate-limited", "m".into(), 0).incident_kind(),
            None
        );
    }

    /// SQLite's plan for `sql`, one line per step.
    async fn plan(store: &Store, sql: &str) -> Vec<String> {
        let Pool::Sqlite(p) = store.pool() else {
            panic!("a SQLite store")
        };
        sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
            .fetch_all(p)
            .await
            .expect("the statement compiles")
            .iter()
            .map(|r| r.try_get::<String, _>("detail").expect("detail"))
            .collect()
    }

    /// Every query the dispatcher runs against deliveries by state finds its
    /// rows by an index, not by reading the table: the claim runs inside
    /// the write lock, and the table holds every document ever delivered.
    /// (Guards migration 0006, which dropped two indexes these queries no
    /// longer need.)
    #[tokio::test]
    async fn delivery_queries_use_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("plan.db").display());
        let store = Store::open_and_migrate(&url).await.expect("store");
        let checks = [
            ("live leases", LIVE_LEASES.to_string()),
            ("lapsed leases", LAPSED_LEASES.to_string()),
            ("incidents owed", INCIDENTS_OWED.to_string()),
            ("pending heads", PENDING_HEADS.to_string()),
            ("pending picks", pending_picks_sql(3)),
            ("paused", PAUSED.to_string()),
            ("invoice state", INVOICE_STATE.to_string()),
            (
                "close resumed incidents",
                CLOSE_RESUMED_INCIDENTS.to_string(),
            ),
            (
                "a tenant's log",
                delivery_log_sql(true, false, false, false),
            ),
            (
                "a tenant's log, next page of one state",
                delivery_log_sql(true, false, true, true),
            ),
            (
                "a tenant's document's deliveries",
                delivery_log_sql(true, true, false, false),
            ),
        ];
        for (name, sql) in checks {
            let steps = plan(&store, &sql).await;
            let on_deliveries: Vec<&String> = steps
                .iter()
                .filter(|s| {
                    let mut w = s.split_whitespace();
                    matches!(w.next(), Some("SCAN" | "SEARCH"))
                        && matches!(w.next(), Some("deliveries" | "d"))
                })
                .collect();
            assert!(
                !on_deliveries.is_empty(),
                "{name}: no step reads deliveries: {steps:?}"
            );
            for s in on_deliveries {
                assert!(
                    s.contains("USING INDEX") || s.contains("USING COVERING INDEX"),
                    "{name} reads deliveries without an index ({s}); plan: {steps:?}"
                );
            }
        }
        // Statements run once per connection (the status page) must find
        // their rows, not scan a whole index either.
        for (name, sql) in [("a connection's counts", CONNECTION_COUNTS)] {
            let steps = plan(&store, sql).await;
            assert!(
                steps.iter().any(|s| s.starts_with("SEARCH"))
                    && !steps.iter().any(|s| s.starts_with("SCAN")),
                "{name}: {steps:?}"
            );
        }
        // And they count every state there is.
        for st in state::ALL {
            assert!(CONNECTION_COUNTS.contains(&format!("'{st}'")), "{st}");
        }
    }
}
