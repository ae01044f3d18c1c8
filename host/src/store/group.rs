//! Group commit for the outbox's two busiest writes: storing an ingested
//! document (with its deliveries) and recording a delivery's outcome.
//!
//! Each is a short write transaction, and there is one per document at
//! each end of the pipeline. Under load they queue for the database's write
//! lock (SQLite has one writer; on PostgreSQL each commit is a round trip
//! and a WAL flush), and every statement is a hand-off to the driver's
//! connection thread. So callers hand their write to one task per store,
//! which writes whatever has queued up meanwhile (up to [`MAX_BATCH`]) in
//! one transaction and answers each caller after the commit. A lone write
//! goes at once, as before; a burst shares one `BEGIN`/`COMMIT` and one
//! turn at the lock.
//!
//! Every write keeps its own meaning: an ingest still stores a document
//! and its deliveries or recognises a repeat, a finish still records
//! nothing when the worker lost its lease. If a batch fails (a constraint,
//! a deadlock between daemons, a full disk), it is rolled back and each of
//! its writes is retried alone, so one bad write never fails the others.

use super::outbox::{
    CLAIM_RETURNING, Claimed, Finish, IngestOutcome, WORK_CHANNEL, claimed_from, delivery_id, state,
};
use super::{BeginWrite, Pool, StoreError};
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

/// Most writes in one transaction.
pub const MAX_BATCH: usize = 64;

/// A document to store, with one delivery per (connection, connector).
#[derive(Debug, Clone)]
pub(crate) struct IngestOp {
    pub tenant_id: String,
    pub document_id: String,
    pub kind: String,
    pub number: String,
    pub credits_invoice_number: Option<String>,
    pub body: String,
    pub body_hash: String,
    /// The deliveries to create: (connection id, connector id); None to
    /// fan out to the tenant's connections as they are at the commit (a
    /// tenant that does not exist is [`IngestOutcome::UnknownTenant`]).
    pub connections: Option<Vec<(String, String)>>,
    /// Connectors that do not take this kind: none of the fan-out's
    /// deliveries goes to their connections.
    pub skip_connectors: Vec<String>,
    pub now: i64,
}

/// An attempt's outcome to record, if the delivery is still leased under
/// `lease` (a claim's token; the attempt log records its worker).
#[derive(Debug, Clone)]
pub(crate) struct FinishOp {
    pub id: String,
    pub lease: String,
    pub started_at: i64,
    pub now: i64,
    pub finish: Finish,
}

/// Deliveries to lease under `lease` (SQLite: the candidates were picked
/// from a read; the update re-checks that each is still due).
#[derive(Debug, Clone)]
pub(crate) struct ClaimOp {
    pub lease: String,
    pub now: i64,
    pub lease_until: i64,
    pub ids: Vec<String>,
}

/// One write.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Ingest(IngestOp),
    Finish(FinishOp),
    Claim(ClaimOp),
}

/// What a write did.
#[derive(Debug)]
pub(crate) enum Done {
    Ingest(IngestOutcome),
    Finish(bool),
    Claim(Vec<Claimed>),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// The queue in front of a store's writer task (started at the first
/// write, and again if its runtime went away).
#[derive(Debug, Default)]
pub(crate) struct Group {
    queue: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    stats: std::sync::Arc<GroupStats>,
}

/// How the grouped writes went (for tests and benchmarks).
#[derive(Debug, Default)]
pub struct GroupStats {
    /// Writes committed.
    pub writes: AtomicU64,
    /// Transactions they took (a batch, or a write retried alone).
    pub transactions: AtomicU64,
    /// Batches that failed and were written one by one.
    pub split: AtomicU64,
}

impl Group {
    /// Queue `op` and wait until it is committed (or failed).
    pub(crate) async fn write(&self, pool: &Pool, op: Op) -> Result<Done, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(pool, Job { op, reply });
        answer.await.map_err(|_| crashed())?
    }

    /// The counters.
    pub(crate) fn stats(&self) -> &GroupStats {
        &self.stats
    }

    fn submit(&self, pool: &Pool, job: Job) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let job = match queue.as_ref() {
            Some(q) => match q.send(job) {
                Ok(()) => return,
                // The writer's runtime is gone: start another.
                Err(mpsc::error::SendError(back)) => back,
            },
            // The first write starts the writer.
            None => job,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(pool.clone(), rx, self.stats.clone()));
        // A fresh channel whose receiver is alive: this cannot fail.
        let _ = tx.send(job);
        *queue = Some(tx);
    }
}

/// How often a busy SQLite writer has the WAL copied back into the
/// database (see [`checkpoint`]).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Copy the write-ahead log back into the database file beside the writer
/// (`PASSIVE`: it takes no lock a reader or the writer waits for). Left to
/// SQLite, the commit that crosses the WAL's threshold does it, inside the
/// write lock every other write is queued behind; measured in B2, about
/// 40 % of the time a commit took. SQLite's own threshold stays as the
/// fallback (see `Store::open`).
async fn checkpoint(
    pool: sqlx::SqlitePool,
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
        .execute(&pool)
        .await
    {
        tracing::debug!(error = %e, "WAL checkpoint failed; SQLite's own will run");
    }
    running.store(false, Ordering::Release);
}

fn crashed() -> StoreError {
    StoreError::Db(sqlx::Error::WorkerCrashed)
}

/// The writer task: take what has queued, write it in one transaction,
/// answer each caller. Ends when every store handle is gone.
async fn writer(
    pool: Pool,
    mut rx: mpsc::UnboundedReceiver<Job>,
    stats: std::sync::Arc<GroupStats>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let checkpointing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut last_checkpoint = std::time::Instant::now();
    let mut writer = Writer::new(pool.clone());
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if let Pool::Sqlite(p) = &pool
            && last_checkpoint.elapsed() >= CHECKPOINT_EVERY
            && !checkpointing.swap(true, Ordering::AcqRel)
        {
            last_checkpoint = std::time::Instant::now();
            tokio::spawn(checkpoint(p.clone(), checkpointing.clone()));
        }
        let ops: Vec<&Op> = jobs.iter().map(|j| &j.op).collect();
        stats.transactions.fetch_add(1, Ordering::Relaxed);
        match writer.run(&ops).await {
            Ok(done) => {
                stats.writes.fetch_add(done.len() as u64, Ordering::Relaxed);
                for (job, d) in jobs.drain(..).zip(done) {
                    let _ = job.reply.send(Ok(d));
                }
            }
            Err(e) if jobs.len() == 1 => {
                let job = jobs.remove(0);
                let _ = job.reply.send(Err(e));
            }
            Err(e) => {
                tracing::debug!(error = %e, writes = jobs.len(), "a grouped write failed; writing each alone");
                stats.split.fetch_add(1, Ordering::Relaxed);
                for job in jobs.drain(..) {
                    stats.transactions.fetch_add(1, Ordering::Relaxed);
                    let r = writer.run(&[&job.op]).await.map(|mut d| d.remove(0));
                    if r.is_ok() {
                        stats.writes.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = job.reply.send(r);
                }
            }
        }
    }
}

/// `($first, ..., $first+width-1), (...)` for `rows` rows.
fn values(rows: usize, width: usize) -> String {
    (0..rows)
        .map(|r| {
            let cols = (0..width)
                .map(|c| format!("${}", r * width + c + 1))
                .collect::<Vec<_>>()
                .join(", ");
            format!("({cols})")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows per multi-row `INSERT` of deliveries (8 parameters each).
const DELIVERY_ROWS: usize = 200;

/// The batch's statements on its transaction (`$tx`), for either engine:
/// every document in one `INSERT`, every delivery in one more, the stored
/// copies of repeated documents in one `SELECT`; every outcome in one
/// `UPDATE ... FROM (VALUES ...)` and the attempts in one `INSERT`; then
/// the claim. Fills
/// `$out` (by position in the batch) and sets `$notify` when deliveries
/// were created.
macro_rules! write_all {
    ($tx:expr, $ops:expr, $out:expr, $notify:expr) => {{
        // --- Ingests. Fan-out targets first: every connection (not
        // disconnected) of each tenant the batch ingests for, in one read.
        let tenants: Vec<&str> = $ops
            .iter()
            .filter_map(|op| match op {
                Op::Ingest(i) if i.connections.is_none() => Some(i.tenant_id.as_str()),
                _ => None,
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut targets: HashMap<String, Vec<(String, String)>> = HashMap::new();
        if !tenants.is_empty() {
            let sql = super::tenants::ingest_targets_sql(tenants.len());
            let mut q = sqlx::query(&sql);
            for t in &tenants {
                q = q.bind(*t);
            }
            for r in q.fetch_all(&mut *$tx).await? {
                let conns = targets.entry(r.try_get("tenant_id")?).or_default();
                let c: Option<String> = r.try_get("connection_id")?;
                let k: Option<String> = r.try_get("connector_id")?;
                if let (Some(c), Some(k)) = (c, k) {
                    conns.push((c, k));
                }
            }
        }
        // (the connections to deliver to, whether the tenant has any at all)
        let connections_of = |i: &IngestOp| -> Option<(Vec<(String, String)>, bool)> {
            let all = match &i.connections {
                Some(c) => c.clone(),
                None => targets.get(&i.tenant_id).cloned()?,
            };
            let any = !all.is_empty();
            let kept = all
                .into_iter()
                .filter(|(_, k)| !i.skip_connectors.contains(k))
                .collect();
            Some((kept, any))
        };
        // The first write of a (tenant, document) in the batch is inserted;
        // later ones are repeats of it.
        let mut firsts: Vec<(usize, &IngestOp, Vec<(String, String)>, bool)> = Vec::new();
        let mut repeats: Vec<(usize, &IngestOp, Option<usize>)> = Vec::new();
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        for (at, op) in $ops.iter().enumerate() {
            if let Op::Ingest(i) = op {
                let Some((conns, any)) = connections_of(i) else {
                    $out[at] = Some(Done::Ingest(IngestOutcome::UnknownTenant));
                    continue;
                };
                match seen.get(&(i.tenant_id.as_str(), i.document_id.as_str())) {
                    Some(&first) => repeats.push((at, i, Some(first))),
                    None => {
                        seen.insert((i.tenant_id.as_str(), i.document_id.as_str()), at);
                        firsts.push((at, i, conns, any));
                    }
                }
            }
        }
        let mut inserted: HashSet<(String, String)> = HashSet::new();
        if !firsts.is_empty() {
            let sql = format!(
                "INSERT INTO documents (tenant_id, id, kind, number, credits_invoice_number, body, body_hash, note, received_at) VALUES {} ON CONFLICT (tenant_id, id) DO NOTHING RETURNING tenant_id, id",
                values(firsts.len(), 9)
            );
            let mut q = sqlx::query(&sql);
            for (_, i, conns, any) in &firsts {
                let note = match (conns.is_empty(), *any) {
                    (false, _) => None,
                    (true, true) => Some("not sent: no connected accounting system takes this kind of document"),
                    (true, false) => Some("not sent: not connected"),
                };
                q = q.bind(&i.tenant_id).bind(&i.document_id).bind(&i.kind).bind(&i.number)
                    .bind(&i.credits_invoice_number).bind(&i.body).bind(&i.body_hash).bind(note).bind(i.now);
            }
            for r in q.fetch_all(&mut *$tx).await? {
                inserted.insert((r.try_get("tenant_id")?, r.try_get("id")?));
            }
        }
        let mut rows: Vec<(String, &IngestOp, &str, &str)> = Vec::new();
        for (at, i, conns, _) in &firsts {
            if inserted.contains(&(i.tenant_id.clone(), i.document_id.clone())) {
                for (connection_id, connector_id) in conns {
                    rows.push((delivery_id(&i.tenant_id, &i.document_id, connection_id), i, connection_id, connector_id));
                }
                $notify |= !conns.is_empty();
                $out[*at] = Some(Done::Ingest(IngestOutcome::Created { deliveries: conns.len() }));
            } else {
                // Stored before this batch: compare with the stored copy.
                repeats.push((*at, i, None));
            }
        }
        for chunk in rows.chunks(DELIVERY_ROWS) {
            let sql = format!(
                "INSERT INTO deliveries (id, tenant_id, document_id, connection_id, connector_id, document_number, document_kind, next_attempt_at, state, attempts, created_at, updated_at) SELECT column1, column2, column3, column4, column5, column6, column7, column8, 'pending', 0, column8, column8 FROM (VALUES {}) AS v",
                values(chunk.len(), 8)
            );
            let mut q = sqlx::query(&sql);
            for (id, i, connection_id, connector_id) in chunk {
                q = q.bind(id).bind(&i.tenant_id).bind(&i.document_id).bind(*connection_id).bind(*connector_id)
                    .bind(&i.number).bind(&i.kind).bind(i.now);
            }
            q.execute(&mut *$tx).await?;
        }
        // Repeats of a document this batch inserted compare with that write;
        // the others with what was stored before.
        let stored_keys: Vec<(&str, &str)> = repeats
            .iter()
            .filter(|(_, _, first)| match first {
                Some(f) => !matches!($out[*f], Some(Done::Ingest(IngestOutcome::Created { .. }))),
                None => true,
            })
            .map(|(_, i, _)| (i.tenant_id.as_str(), i.document_id.as_str()))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut stored: HashMap<(String, String), (String, String)> = HashMap::new();
        if !stored_keys.is_empty() {
            let terms = (0..stored_keys.len())
                .map(|k| format!("(tenant_id = ${} AND id = ${})", 2 * k + 1, 2 * k + 2))
                .collect::<Vec<_>>()
                .join(" OR ");
            let sql = format!("SELECT tenant_id, id, body, body_hash FROM documents WHERE {terms}");
            let mut q = sqlx::query(&sql);
            for (t, d) in &stored_keys {
                q = q.bind(*t).bind(*d);
            }
            for r in q.fetch_all(&mut *$tx).await? {
                stored.insert((r.try_get("tenant_id")?, r.try_get("id")?), (r.try_get("body")?, r.try_get("body_hash")?));
            }
        }
        for (at, i, first) in &repeats {
            let (body, hash) = match first.filter(|f| matches!($out[*f], Some(Done::Ingest(IngestOutcome::Created { .. })))) {
                Some(f) => match &$ops[f] {
                    Op::Ingest(o) => (o.body.clone(), o.body_hash.clone()),
                    Op::Finish(_) | Op::Claim(_) => unreachable!("`first` indexes an ingest"),
                },
                None => stored
                    .get(&(i.tenant_id.clone(), i.document_id.clone()))
                    .cloned()
                    .ok_or_else(|| StoreError::NotFound(format!("document {} of tenant {}", i.document_id, i.tenant_id)))?,
            };
            $out[*at] = Some(Done::Ingest(if hash == i.body_hash {
                IngestOutcome::Existing
            } else {
                IngestOutcome::Conflict(body)
            }));
        }
        // --- Outcomes, recorded only where the worker still holds the lease.
        let finishes: Vec<(usize, &FinishOp)> = $ops
            .iter()
            .enumerate()
            .filter_map(|(at, op)| match op {
                Op::Finish(f) => Some((at, f)),
                Op::Ingest(_) | Op::Claim(_) => None,
            })
            .collect();
        if !finishes.is_empty() {
            let sql = format!(
                "UPDATE deliveries SET state = v.column3, pause_reason = v.column4, attempts = attempts + v.column5, next_attempt_at = v.column6, lease_owner = NULL, lease_until = NULL, external_id = COALESCE(v.column7, external_id), external_url = COALESCE(v.column8, external_url), last_error = v.column9, updated_at = v.column10, delivered_at = CASE WHEN v.column3 = 'delivered' THEN v.column10 ELSE delivered_at END, pause_detail = v.column11, incident_due = v.column12 FROM (VALUES {}) AS v WHERE deliveries.id = v.column1 AND deliveries.lease_owner = v.column2 AND deliveries.state = 'working' RETURNING id, attempts",
                values(finishes.len(), 12)
            );
            let mut q = sqlx::query(&sql);
            for (_, f) in &finishes {
                let fin = &f.finish;
                q = q.bind(&f.id).bind(&f.lease).bind(fin.state).bind(&fin.pause_reason)
                    .bind(i64::from(fin.counts)).bind(fin.next_attempt_at)
                    .bind(&fin.external_id).bind(&fin.external_url)
                    .bind(if fin.state == state::DELIVERED { None } else { fin.message.clone() })
                    .bind(f.now).bind(&fin.pause_detail)
                    // People hear of it: marked with the outcome, cleared
                    // once the incident is recorded (see `record_incident`).
                    .bind(fin.incident_kind());
            }
            let mut attempts: HashMap<String, i64> = HashMap::new();
            for r in q.fetch_all(&mut *$tx).await? {
                attempts.insert(r.try_get("id")?, r.try_get("attempts")?);
            }
            let recorded: Vec<(&FinishOp, i64)> = finishes
                .iter()
                .filter(|(_, f)| !super::outbox::UNRECORDED_OUTCOMES.contains(&f.finish.outcome.as_str()))
                .filter_map(|(_, f)| attempts.get(&f.id).map(|a| (*f, *a)))
                .collect();
            if !recorded.is_empty() {
                let sql = format!(
                    "INSERT INTO delivery_attempts (delivery_id, attempt, worker, started_at, finished_at, outcome, message, details, external_id, external_url) VALUES {}",
                    values(recorded.len(), 10)
                );
                let mut q = sqlx::query(&sql);
                for (f, a) in &recorded {
                    let fin = &f.finish;
                    q = q.bind(&f.id).bind(if fin.counts { *a } else { 0 }).bind(super::outbox::lease_worker(&f.lease)).bind(f.started_at).bind(f.now)
                        .bind(&fin.outcome).bind(&fin.message).bind(&fin.details).bind(&fin.external_id).bind(&fin.external_url);
                }
                q.execute(&mut *$tx).await?;
            }
            for (at, f) in &finishes {
                // Not updated: another worker owns it now; nothing recorded.
                $out[*at] = Some(Done::Finish(attempts.contains_key(&f.id)));
            }
        }
        // --- Claims (SQLite's dispatcher, at most one a batch), last: an
        // outcome in the same batch as a claim of its lapsed lease lands
        // first, and the claim then finds the delivery finished (claimed
        // first, it took the lease over and the outcome was dropped: the
        // document went out again).
        for (at, op) in $ops.iter().enumerate() {
            if let Op::Claim(c) = op {
                let mut rows = Vec::new();
                if !c.ids.is_empty() {
                    let list = super::placeholders(4, c.ids.len());
                    let sql = format!(
                        "UPDATE deliveries SET state = 'working', lease_owner = $1, lease_until = $2, updated_at = $3 WHERE id IN ({list}) AND ((state = 'pending' AND next_attempt_at <= $3) OR (state = 'working' AND lease_until < $3)) {CLAIM_RETURNING}"
                    );
                    let mut q = sqlx::query(&sql).bind(&c.lease).bind(c.lease_until).bind(c.now);
                    for id in &c.ids {
                        q = q.bind(id);
                    }
                    for r in q.fetch_all(&mut *$tx).await? {
                        rows.push(claimed_from(&r)?);
                    }
                }
                $out[at] = Some(Done::Claim(rows));
            }
        }
    }};
}

/// The writer's hold on its database. On SQLite it keeps one connection
/// of the pool for itself: SQLite empties a connection's page cache
/// whenever another connection has written, so a writer taking any pooled
/// connection read most pages of each batch back from the WAL (a `pread`
/// each); writing always on the same one keeps them cached. A connection
/// a failed batch may have left inside a transaction is closed, and the
/// next batch takes another.
struct Writer {
    pool: Pool,
    own: Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>,
}

impl Writer {
    fn new(pool: Pool) -> Self {
        Self { pool, own: None }
    }

    /// Write `ops` in one transaction; their results in order.
    async fn run(&mut self, ops: &[&Op]) -> Result<Vec<Done>, StoreError> {
        let r = self.write(ops).await;
        if r.is_err()
            && let Some(mut conn) = self.own.take()
        {
            conn.close_on_drop();
        }
        r
    }

    async fn write(&mut self, ops: &[&Op]) -> Result<Vec<Done>, StoreError> {
        let mut out: Vec<Option<Done>> = (0..ops.len()).map(|_| None).collect();
        let mut notify = false;
        match &self.pool {
            Pool::Sqlite(p) => {
                let conn = match &mut self.own {
                    Some(c) => c,
                    own => own.insert(p.acquire().await?),
                };
                // Writers of this process take turns (see `BeginWrite`).
                let _turn = super::sqlite_write_turn(p).lock_owned().await;
                let mut tx = sqlx::Connection::begin_with(&mut **conn, "BEGIN IMMEDIATE").await?;
                write_all!(tx, ops, out, notify);
                // SQLite has no other daemons to wake.
                let _ = notify;
                tx.commit().await?;
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin_write().await?;
                write_all!(tx, ops, out, notify);
                if notify {
                    // Delivered with the commit: other daemons wake up.
                    sqlx::query("SELECT pg_notify($1, '')")
                        .bind(WORK_CHANNEL)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
        }
        out.into_iter()
            .map(|d| d.ok_or_else(|| StoreError::Conflict("a grouped write got no answer".into())))
            .collect()
    }
}

/// Write `ops` in one transaction on a connection of its own (tests).
#[cfg(test)]
async fn run(pool: &Pool, ops: &[&Op]) -> Result<Vec<Done>, StoreError> {
    Writer::new(pool.clone()).run(ops).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SQLite store in a temporary directory, with tenant `acme`.
    async fn acme_store() -> (tempfile::TempDir, super::super::Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("group.db").display());
        let store = super::super::Store::open_and_migrate(&url)
            .await
            .expect("store");
        store
            .upsert_tenant("acme", "Acme", &[], 0)
            .await
            .expect("tenant");
        (dir, store)
    }

    fn finish_delivered() -> Finish {
        Finish {
            state: state::DELIVERED,
            pause_reason: None,
            pause_detail: None,
            counts: true,
            next_attempt_at: 0,
            outcome: "delivered".into(),
            message: None,
            details: None,
            external_id: Some("BILL-1".into()),
            external_url: None,
        }
    }

    fn ingest_op(tenant: &str, doc: &str) -> Op {
        Op::Ingest(IngestOp {
            tenant_id: tenant.into(),
            document_id: doc.into(),
            kind: "invoice".into(),
            number: format!("INV-{doc}"),
            credits_invoice_number: None,
            body: "{}".into(),
            body_hash: "h".into(),
            connections: Some(vec![("conn-1".into(), "xero".into())]),
            skip_connectors: vec![],
            now: 1_000,
        })
    }

    /// Whether the writer's own SQLite connection holds the `mark` table
    /// (a temporary table lives and dies with its connection).
    async fn marked(w: &mut Writer) -> bool {
        let conn = w.own.as_mut().expect("the writer holds a connection");
        sqlx::query("SELECT COUNT(*) FROM temp.mark")
            .execute(&mut **conn)
            .await
            .is_ok()
    }

    /// The SQLite writer writes every batch on one connection of its own
    /// (so that connection's page cache stays valid), and after a batch
    /// fails it takes a fresh one: the failed one may still be inside the
    /// transaction SQLite rolled back by itself, and every later BEGIN on
    /// it would fail.
    #[tokio::test]
    async fn the_sqlite_writer_keeps_its_connection_until_a_write_fails() {
        let (_dir, store) = acme_store().await;
        let mut w = Writer::new(store.pool().clone());
        w.run(&[&ingest_op("acme", "doc-1")])
            .await
            .expect("first write");
        {
            let conn = w.own.as_mut().expect("kept after a write");
            sqlx::query("CREATE TEMP TABLE mark (x)")
                .execute(&mut **conn)
                .await
                .expect("mark the connection");
        }
        w.run(&[&ingest_op("acme", "doc-2")])
            .await
            .expect("second write");
        assert!(
            marked(&mut w).await,
            "the second batch took another connection"
        );
        // No such tenant: the foreign key fails the batch.
        let e = w.run(&[&ingest_op("nobody", "doc-3")]).await;
        assert!(e.is_err(), "{e:?}");
        assert!(
            w.own.is_none(),
            "the connection of a failed batch is let go"
        );
        w.run(&[&ingest_op("acme", "doc-4")])
            .await
            .expect("a write after the failure");
        assert!(
            !marked(&mut w).await,
            "a fresh connection after the failure"
        );
        let n: i64 = match store.pool() {
            Pool::Sqlite(p) => sqlx::query_scalar("SELECT COUNT(*) FROM documents")
                .fetch_one(p)
                .await
                .expect("count"),
            Pool::Postgres(_) => unreachable!("a SQLite store"),
        };
        assert_eq!(n, 3, "doc-1, doc-2 and doc-4 stored, doc-3 not");
    }

    /// A store closes while its writer still holds its connection (sqlx's
    /// close is documented to wait for checked-out connections: were it to,
    /// a daemon's stop would wait for ever).
    #[tokio::test]
    async fn a_store_closes_while_its_writer_holds_a_connection() {
        let (_dir, store) = acme_store().await;
        store
            .group
            .write(store.pool(), ingest_op("acme", "doc-1"))
            .await
            .expect("a grouped write");
        tokio::time::timeout(std::time::Duration::from_secs(10), store.close())
            .await
            .expect("closed within 10 s");
    }

    /// An outcome and a claim of the same delivery's lapsed lease in one
    /// batch (a worker whose lease renewals failed finishes just as another
    /// claim picks it up): the outcome is recorded and the claim finds
    /// nothing to take; the document is not sent again.
    #[tokio::test]
    async fn an_outcome_lands_before_a_claim_in_the_same_batch() {
        let (_dir, store) = acme_store().await;
        let pool = store.pool();
        let ingest = ingest_op("acme", "doc-1");
        let done = run(pool, &[&ingest]).await.expect("ingest");
        assert!(
            matches!(
                done[0],
                Done::Ingest(IngestOutcome::Created { deliveries: 1 })
            ),
            "{done:?}"
        );
        let id = delivery_id("acme", "doc-1", "conn-1");
        let claim = |lease: &str, now: i64| {
            Op::Claim(ClaimOp {
                lease: lease.into(),
                now,
                lease_until: now + 1_000,
                ids: vec![id.clone()],
            })
        };
        let first = run(pool, &[&claim("a#1", 2_000)]).await.expect("claim");
        assert!(
            matches!(&first[0], Done::Claim(rows) if rows.len() == 1),
            "{first:?}"
        );
        // The lease ran out at 3,000; at 4,000 the worker's outcome and
        // another claim meet in one batch (the claim first in the queue).
        let finish = Op::Finish(FinishOp {
            id: id.clone(),
            lease: "a#1".into(),
            started_at: 2_000,
            now: 4_000,
            finish: finish_delivered(),
        });
        let done = run(pool, &[&claim("b#1", 4_000), &finish])
            .await
            .expect("batch");
        assert!(
            matches!(&done[0], Done::Claim(rows) if rows.is_empty()),
            "nothing left to claim: {done:?}"
        );
        assert!(matches!(done[1], Done::Finish(true)), "{done:?}");
        let Pool::Sqlite(p) = pool else {
            panic!("a SQLite store")
        };
        let (st, external): (String, Option<String>) =
            sqlx::query_as("SELECT state, external_id FROM deliveries WHERE id = $1")
                .bind(&id)
                .fetch_one(p)
                .await
                .expect("row");
        assert_eq!(st, "delivered");
        assert_eq!(external.as_deref(), Some("BILL-1"));
    }
}
