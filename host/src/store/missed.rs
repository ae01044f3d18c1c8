//! Documents a connection missed: issued (and stored) while the tenant's
//! connection to that connector was disconnected, so ingest made no
//! delivery to it (rule 6 of the design: disconnecting stops sending).
//! Reconnecting does not send them by itself (the admin may have
//! disconnected on purpose, e.g. to keep a period out of the books); the
//! admin is shown them and sends them, all or some, when they choose.
//!
//! A document is missed by connection C when it is the tenant's, C's
//! connector takes its kind, it has no delivery to C, it was received
//! after C was first disconnected, and its body is still kept (retention
//! drops the bodies of documents with no delivery once they are old; such
//! a document cannot be sent any more and is not offered). Deliveries are
//! never deleted, so "no delivery to C" is exact; the time bound keeps
//! documents from before the first connection out (ledgerport pushes newly
//! issued documents, not the tenant's history) and keeps the query off
//! tenants that never disconnected. Both reads go by index (migration
//! 0010) and neither reads a document's body, which may hold a PDF: its
//! emptiness is told by its length (`octet_length`, from the row's header
//! on SQLite and the TOAST pointer on PostgreSQL).

use super::{BeginWrite, Pool, Store, StoreError, on_pool};
use sqlx::Row;

/// A document a connection missed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct MissedDocument {
    /// The platform's id of the document.
    pub id: String,
    /// Its number, as printed.
    pub number: String,
    /// `invoice` or `credit-note`.
    pub kind: String,
    /// When it was received (Unix milliseconds, as the delivery log's times).
    pub received_at: i64,
}

/// What [`Store::send_missed`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentMissed {
    /// Deliveries made (pending now).
    pub queued: u64,
    /// Ids asked for that are not missed documents of the connection (not
    /// the tenant's, already sent to it, of a kind its connector does not
    /// take, from before it was first disconnected, or too old to send).
    pub not_missed: Vec<String>,
}

/// Most documents one [`Store::send_missed`] names by id.
pub const SEND_IDS_MAX: usize = 500;

/// Deliveries made per INSERT statement when sending.
const INSERT_ROWS: usize = 100;

/// A connection's missed documents. Binds: `$1` the tenant, `$2` the
/// first disconnect (ms), `$3` the connection id, `$4..` the connector's
/// kinds (`kinds` of them), and after them the document ids when `ids` is
/// given.
fn missed_sql(select: &str, kinds: usize, ids: Option<usize>, tail: &str) -> String {
    missed_sql_kept(select, kinds, ids, tail, true)
}

/// As [`missed_sql`], for the documents whose body is still kept (`kept`)
/// or those whose body retention has removed (`!kept`: missed, but too old
/// to be sent).
fn missed_sql_kept(
    select: &str,
    kinds: usize,
    ids: Option<usize>,
    tail: &str,
    kept: bool,
) -> String {
    let id_terms = match ids {
        Some(n) => format!(" AND doc.id IN ({})", super::placeholders(4 + kinds, n)),
        None => String::new(),
    };
    format!(
        "SELECT {select} FROM documents doc
         WHERE doc.tenant_id = $1 AND doc.received_at >= $2 AND doc.kind IN ({kinds}){id_terms}
           AND NOT EXISTS (SELECT 1 FROM deliveries d
                           WHERE d.tenant_id = doc.tenant_id AND d.document_id = doc.id AND d.connection_id = $3)
           AND octet_length(doc.body) {body}{tail}",
        kinds = super::placeholders(4, kinds),
        body = if kept { "> 0" } else { "= 0" },
    )
}

/// The connection's tenant, connector, state and first disconnect (ms;
/// `None`: never disconnected), read through `ex`; `lock` is appended to the connection's
/// read (`FOR SHARE` on PostgreSQL when sending).
macro_rules! scope_of {
    ($ex:expr, $connection_id:expr, $lock:literal) => {{
        let row: Option<(String, String, String)> = sqlx::query_as(concat!(
            "SELECT tenant_id, connector_id, state FROM connections WHERE id = $1",
            $lock
        ))
        .bind($connection_id)
        .fetch_optional(&mut *$ex)
        .await?;
        match row {
            None => None,
            Some((tenant, connector, state)) => {
                let first: Option<i64> = sqlx::query_scalar(
                    "SELECT MIN(created_at) FROM connection_events WHERE connection_id = $1 AND kind = 'disconnected'",
                )
                .bind($connection_id)
                .fetch_one(&mut *$ex)
                .await?;
                Some((tenant, connector, state, first.map(|s| s.saturating_mul(1000))))
            }
        }
    }};
}

impl Store {
    /// How many documents connection `connection_id` missed, and the
    /// oldest `limit` of them (received first, first). `kinds`: the
    /// document kinds its connector takes (its manifest's).
    pub async fn missed_documents(
        &self,
        connection_id: &str,
        kinds: &[String],
        limit: i64,
    ) -> Result<(i64, Vec<MissedDocument>), StoreError> {
        self.missed_page(connection_id, kinds, limit, true).await
    }

    /// [`Store::missed_documents`] (`kept`) or [`Store::missed_too_old`].
    async fn missed_page(
        &self,
        connection_id: &str,
        kinds: &[String],
        limit: i64,
        kept: bool,
    ) -> Result<(i64, Vec<MissedDocument>), StoreError> {
        if kinds.is_empty() {
            return Ok((0, Vec::new()));
        }
        let count_sql = missed_sql_kept("COUNT(*)", kinds.len(), None, "", kept);
        let page_sql = missed_sql_kept(
            "doc.id, doc.number, doc.kind, doc.received_at",
            kinds.len(),
            None,
            &format!(
                " ORDER BY doc.received_at, doc.id LIMIT ${}",
                kinds.len() + 4
            ),
            kept,
        );
        on_pool!(self, p => {
            let mut c = p.acquire().await?;
            let Some((tenant, _, _, Some(since))) = scope_of!(c, connection_id, "") else {
                return Ok((0, Vec::new()));
            };
            let mut q = sqlx::query_scalar::<_, i64>(&count_sql)
                .bind(&tenant)
                .bind(since)
                .bind(connection_id);
            for k in kinds {
                q = q.bind(k);
            }
            let count = q.fetch_one(&mut *c).await?;
            if count == 0 || limit <= 0 {
                return Ok((count, Vec::new()));
            }
            let mut q = sqlx::query_as(&page_sql).bind(&tenant).bind(since).bind(connection_id);
            for k in kinds {
                q = q.bind(k);
            }
            Ok((count, q.bind(limit).fetch_all(&mut *c).await?))
        })
    }

    /// The documents connection `connection_id` missed that can no longer
    /// be sent, counted and the oldest `limit` of them: retention removed
    /// their bodies (they had no delivery, and were older than
    /// `retention.delivered_days`). Told to the admin beside the missed
    /// ones, with their numbers, so they do not vanish unsaid.
    pub async fn missed_too_old(
        &self,
        connection_id: &str,
        kinds: &[String],
        limit: i64,
    ) -> Result<(i64, Vec<MissedDocument>), StoreError> {
        self.missed_page(connection_id, kinds, limit, false).await
    }

    /// Send what connection `connection_id` missed: a pending delivery for
    /// each of its missed documents (`ids`: only these, at most
    /// [`SEND_IDS_MAX`]; `None`: all), in one transaction that first
    /// checks the connection is not disconnected ([`StoreError::Conflict`]
    /// when it is, [`StoreError::NotFound`] when there is none).
    /// Idempotent: a document sent already is not missed any more, and two
    /// calls at once make one delivery of it (its id is the delivery's
    /// stable id). Ids that are not missed documents are named in
    /// [`SentMissed::not_missed`], and nothing is queued then. On
    /// PostgreSQL it holds [`super::outbox::BODY_LOCK`], as retention's
    /// body purge does, so no body is dropped under a delivery being made.
    pub async fn send_missed(
        &self,
        connection_id: &str,
        kinds: &[String],
        ids: Option<&[String]>,
        now: i64,
    ) -> Result<SentMissed, StoreError> {
        if let Some(ids) = ids
            && ids.len() > SEND_IDS_MAX
        {
            return Err(StoreError::Conflict(format!(
                "at most {SEND_IDS_MAX} documents are sent by id at once"
            )));
        }
        let sql = missed_sql(
            "doc.id, doc.number, doc.kind",
            kinds.len().max(1),
            ids.map(<[String]>::len),
            " ORDER BY doc.received_at, doc.id",
        );
        macro_rules! send {
            ($tx:ident, $lock:literal) => {{
                let (tenant, connector, since) = match scope_of!($tx, connection_id, $lock) {
                    None => {
                        return Err(StoreError::NotFound(format!("connection {connection_id}")));
                    }
                    Some((_, _, state, _)) if state == "disconnected" => {
                        return Err(StoreError::Conflict(
                            "the connection is disconnected: reconnect it first, then send what it missed".into(),
                        ));
                    }
                    // Never disconnected: nothing is missed (a time no
                    // document has).
                    Some((tenant, connector, _, since)) => {
                        (tenant, connector, since.unwrap_or(i64::MAX))
                    }
                };
                let mut q = sqlx::query(&sql).bind(&tenant).bind(since).bind(connection_id);
                if kinds.is_empty() {
                    // No kind the connector takes: nothing is missed.
                    q = q.bind("");
                }
                for k in kinds {
                    q = q.bind(k);
                }
                for id in ids.unwrap_or_default() {
                    q = q.bind(id);
                }
                let rows = q.fetch_all(&mut *$tx).await?;
                let mut docs: Vec<(String, String, String)> = Vec::with_capacity(rows.len());
                for r in &rows {
                    docs.push((r.try_get("id")?, r.try_get("number")?, r.try_get("kind")?));
                }
                let found: std::collections::HashSet<&str> =
                    docs.iter().map(|d| d.0.as_str()).collect();
                let mut named = std::collections::HashSet::new();
                let not_missed: Vec<String> = ids
                    .unwrap_or_default()
                    .iter()
                    .filter(|id| !found.contains(id.as_str()) && named.insert(id.as_str()))
                    .cloned()
                    .collect();
                if !not_missed.is_empty() {
                    return Ok(SentMissed { queued: 0, not_missed });
                }
                let mut queued = 0;
                for chunk in docs.chunks(INSERT_ROWS) {
                    let values = (0..chunk.len())
                        .map(|i| {
                            let b = i * 4;
                            format!(
                                "(${}, $1, ${}, $2, $3, ${}, ${}, $4, 'pending', 0, $4, $4)",
                                b + 5,
                                b + 6,
                                b + 7,
                                b + 8
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    let insert = format!(
                        "INSERT INTO deliveries (id, tenant_id, document_id, connection_id, connector_id, document_number, document_kind, next_attempt_at, state, attempts, created_at, updated_at)
                         VALUES {values} ON CONFLICT DO NOTHING"
                    );
                    let mut q = sqlx::query(&insert)
                        .bind(&tenant)
                        .bind(connection_id)
                        .bind(&connector)
                        .bind(now);
                    for (id, number, kind) in chunk {
                        q = q
                            .bind(super::outbox::delivery_id(&tenant, id, connection_id))
                            .bind(id)
                            .bind(number)
                            .bind(kind);
                    }
                    queued += q.execute(&mut *$tx).await?.rows_affected();
                }
                queued
            }};
        }
        let queued = match self.pool() {
            Pool::Sqlite(p) => {
                let mut tx = p.begin_write().await?;
                let queued = send!(tx, "");
                tx.commit().await?;
                queued
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin_write_locked(super::outbox::BODY_LOCK).await?;
                // FOR SHARE: a disconnect committing meanwhile waits for
                // this transaction, so no delivery is queued to a
                // connection that was disconnected after the check.
                let queued = send!(tx, " FOR SHARE");
                if queued > 0 {
                    // Delivered with the commit: other daemons wake up.
                    sqlx::query("SELECT pg_notify($1, '')")
                        .bind(super::outbox::WORK_CHANNEL)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                queued
            }
        };
        Ok(SentMissed {
            queued,
            not_missed: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Neither read scans a table: the documents are found by tenant and
    /// time (a tenant's documents are many, their bodies large), the
    /// deliveries by the unique (tenant, document, connection), the first
    /// disconnect by connection.
    #[tokio::test]
    async fn the_missed_queries_use_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("plan.db").display());
        let store = Store::open_and_migrate(&url).await.expect("store");
        let Pool::Sqlite(p) = store.pool() else {
            panic!("a SQLite store")
        };
        for sql in [
            missed_sql("COUNT(*)", 2, None, ""),
            missed_sql_kept("COUNT(*)", 2, None, "", false),
            missed_sql("doc.id", 2, Some(3), " ORDER BY doc.received_at, doc.id"),
            "SELECT MIN(created_at) FROM connection_events WHERE connection_id = $1 AND kind = 'disconnected'".to_string(),
        ] {
            let steps: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
                .fetch_all(p)
                .await
                .expect("the statement compiles")
                .iter()
                .map(|r| r.try_get::<String, _>("detail").expect("detail"))
                .collect();
            for s in &steps {
                assert!(
                    !s.starts_with("SCAN"),
                    "a table is read whole ({s}): {steps:?}\n{sql}"
                );
            }
            let reads = steps.iter().filter(|s| s.starts_with("SEARCH")).count();
            assert!(reads >= 1, "{steps:?}");
            if sql.contains("FROM documents") {
                assert!(
                    steps
                        .iter()
                        .any(|s| s.contains("doc USING INDEX documents_by_received")),
                    "{steps:?}"
                );
            }
        }
    }
}
