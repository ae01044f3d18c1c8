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

use super::outbox::{Finish, IngestOutcome, WORK_CHANNEL, delivery_id, state};
use super::{BeginWrite, Pool, StoreError};
use sqlx::Row;
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
    pub connections: Vec<(String, String)>,
    pub now: i64,
}

/// An attempt's outcome to record, if `worker` still holds the lease.
#[derive(Debug, Clone)]
pub(crate) struct FinishOp {
    pub id: String,
    pub worker: String,
    pub started_at: i64,
    pub now: i64,
    pub finish: Finish,
}

/// One write.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Ingest(IngestOp),
    Finish(FinishOp),
}

/// What a write did.
#[derive(Debug)]
pub(crate) enum Done {
    Ingest(IngestOutcome),
    Finish(bool),
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
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let ops: Vec<&Op> = jobs.iter().map(|j| &j.op).collect();
        stats.transactions.fetch_add(1, Ordering::Relaxed);
        match run(&pool, &ops).await {
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
                    let r = run(&pool, &[&job.op]).await.map(|mut d| d.remove(0));
                    if r.is_ok() {
                        stats.writes.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = job.reply.send(r);
                }
            }
        }
    }
}

/// The statements of one write, on the batch's transaction (`$tx`), for
/// either engine.
macro_rules! write_one {
    ($tx:expr, $op:expr, $notify:expr) => {
        match $op {
            Op::Ingest(i) => {
                let note = if i.connections.is_empty() {
                    Some("not sent: not connected")
                } else {
                    None
                };
                // Insert first: the usual case is a new document, and only
                // a repeated id needs the stored one.
                let inserted = sqlx::query("INSERT INTO documents (tenant_id, id, kind, number, credits_invoice_number, body, body_hash, note, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (tenant_id, id) DO NOTHING")
                    .bind(&i.tenant_id).bind(&i.document_id).bind(&i.kind).bind(&i.number).bind(&i.credits_invoice_number)
                    .bind(&i.body).bind(&i.body_hash).bind(note).bind(i.now)
                    .execute(&mut *$tx).await?.rows_affected();
                if inserted == 0 {
                    let row = sqlx::query("SELECT body, body_hash FROM documents WHERE tenant_id = $1 AND id = $2")
                        .bind(&i.tenant_id)
                        .bind(&i.document_id)
                        .fetch_one(&mut *$tx)
                        .await?;
                    let hash: String = row.try_get("body_hash")?;
                    Done::Ingest(if hash == i.body_hash {
                        IngestOutcome::Existing
                    } else {
                        IngestOutcome::Conflict(row.try_get("body")?)
                    })
                } else {
                    for (connection_id, connector_id) in &i.connections {
                        let id = delivery_id(&i.tenant_id, &i.document_id, connection_id);
                        sqlx::query("INSERT INTO deliveries (id, tenant_id, document_id, connection_id, connector_id, document_number, document_kind, state, attempts, next_attempt_at, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 0, $8, $8, $8)")
                            .bind(&id).bind(&i.tenant_id).bind(&i.document_id).bind(connection_id).bind(connector_id)
                            .bind(&i.number).bind(&i.kind).bind(i.now)
                            .execute(&mut *$tx).await?;
                    }
                    $notify |= !i.connections.is_empty();
                    Done::Ingest(IngestOutcome::Created { deliveries: i.connections.len() })
                }
            }
            Op::Finish(f) => {
                let fin = &f.finish;
                let attempt_inc: i64 = if fin.counts { 1 } else { 0 };
                let row = sqlx::query("UPDATE deliveries SET state = $1, pause_reason = $2, attempts = attempts + $3, next_attempt_at = $4, lease_owner = NULL, lease_until = NULL, external_id = COALESCE($5, external_id), external_url = COALESCE($6, external_url), last_error = $7, updated_at = $8, delivered_at = CASE WHEN $1 = 'delivered' THEN $8 ELSE delivered_at END, pause_detail = $11 WHERE id = $9 AND lease_owner = $10 AND state = 'working' RETURNING attempts")
                    .bind(fin.state).bind(&fin.pause_reason).bind(attempt_inc).bind(fin.next_attempt_at)
                    .bind(&fin.external_id).bind(&fin.external_url)
                    .bind(if fin.state == state::DELIVERED { None } else { fin.message.clone() })
                    .bind(f.now).bind(&f.id).bind(&f.worker).bind(&fin.pause_detail)
                    .fetch_optional(&mut *$tx).await?;
                match row {
                    // Another worker owns it now: nothing is recorded.
                    None => Done::Finish(false),
                    Some(row) => {
                        let attempts: i64 = row.try_get("attempts")?;
                        sqlx::query("INSERT INTO delivery_attempts (delivery_id, attempt, worker, started_at, finished_at, outcome, message, details, external_id, external_url) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
                            .bind(&f.id).bind(if fin.counts { attempts } else { 0 }).bind(&f.worker).bind(f.started_at).bind(f.now)
                            .bind(&fin.outcome).bind(&fin.message).bind(&fin.details).bind(&fin.external_id).bind(&fin.external_url)
                            .execute(&mut *$tx).await?;
                        Done::Finish(true)
                    }
                }
            }
        }
    };
}

/// Write `ops` in one transaction; their results in order.
async fn run(pool: &Pool, ops: &[&Op]) -> Result<Vec<Done>, StoreError> {
    let mut out = Vec::with_capacity(ops.len());
    let mut notify = false;
    match pool {
        Pool::Sqlite(p) => {
            let mut tx = p.begin_write().await?;
            for op in ops {
                out.push(write_one!(tx, op, notify));
            }
            // SQLite has no other daemons to wake.
            let _ = notify;
            tx.commit().await?;
        }
        Pool::Postgres(p) => {
            let mut tx = p.begin_write().await?;
            for op in ops {
                out.push(write_one!(tx, op, notify));
            }
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
    Ok(out)
}
