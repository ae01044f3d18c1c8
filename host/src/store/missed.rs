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
//! tenants that never disconnected.

use super::{BeginWrite, Pool, Store, StoreError, on_pool};
use sqlx::Row;

/// A document a connection missed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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

/// The predicate and order of a connection's missed documents. Binds: `$1`
/// the connection id, `$2..` the connector's kinds (`kinds` of them), and
/// after them the document ids when `ids` is given. The body check is the
/// last term: the cheap ones rule out nearly every row before a (possibly
/// large) body is read.
fn missed_sql(select: &str, kinds: usize, ids: Option<usize>, tail: &str) -> String {
    let kind_list = (0..kinds)
        .map(|i| format!("${}", i + 2))
        .collect::<Vec<_>>()
        .join(", ");
    let id_terms = match ids {
        Some(n) => format!(
            " AND doc.id IN ({})",
            (0..n)
                .map(|i| format!("${}", i + 2 + kinds))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => String::new(),
    };
    format!(
        "SELECT {select} FROM documents doc JOIN connections c ON c.tenant_id = doc.tenant_id
         WHERE c.id = $1 AND doc.kind IN ({kind_list}){id_terms}
           AND doc.received_at >= (SELECT MIN(e.created_at) FROM connection_events e
                                   WHERE e.connection_id = $1 AND e.kind = 'disconnected') * 1000
           AND NOT EXISTS (SELECT 1 FROM deliveries d
                           WHERE d.tenant_id = doc.tenant_id AND d.document_id = doc.id AND d.connection_id = $1)
           AND doc.body <> ''{tail}"
    )
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
        if kinds.is_empty() {
            return Ok((0, Vec::new()));
        }
        let count_sql = missed_sql("COUNT(*)", kinds.len(), None, "");
        let page_sql = missed_sql(
            "doc.id, doc.number, doc.kind, doc.received_at",
            kinds.len(),
            None,
            &format!(
                " ORDER BY doc.received_at, doc.id LIMIT ${}",
                kinds.len() + 2
            ),
        );
        on_pool!(self, p => {
            let mut q = sqlx::query_scalar::<_, i64>(&count_sql).bind(connection_id);
            for k in kinds {
                q = q.bind(k);
            }
            let count = q.fetch_one(p).await?;
            if count == 0 || limit <= 0 {
                return Ok((count, Vec::new()));
            }
            let mut q = sqlx::query(&page_sql).bind(connection_id);
            for k in kinds {
                q = q.bind(k);
            }
            let rows = q.bind(limit.max(0)).fetch_all(p).await?;
            let docs = rows
                .iter()
                .map(|r| {
                    Ok(MissedDocument {
                        id: r.try_get("id")?,
                        number: r.try_get("number")?,
                        kind: r.try_get("kind")?,
                        received_at: r.try_get("received_at")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            Ok((count, docs))
        })
    }

    /// Send what connection `connection_id` missed: a pending delivery for
    /// each of its missed documents (`ids`: only these, at most
    /// [`SEND_IDS_MAX`]; `None`: all), in one transaction that first
    /// checks the connection is not disconnected ([`StoreError::Conflict`] when it
    /// is disconnected, [`StoreError::NotFound`] when there is none).
    /// Idempotent: a document sent already is not missed any more, and two
    /// calls at once make one delivery of it (its id is the delivery's
    /// stable id). Ids that are not missed documents are named in
    /// [`SentMissed::not_missed`], and nothing is queued then.
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
            "doc.tenant_id, doc.id, doc.number, doc.kind, c.connector_id",
            kinds.len().max(1),
            ids.map(<[String]>::len),
            " ORDER BY doc.received_at, doc.id",
        );
        macro_rules! send {
            ($tx:ident, $lock:literal) => {{
                let state: Option<String> =
                    sqlx::query_scalar(concat!("SELECT state FROM connections WHERE id = $1", $lock))
                        .bind(connection_id)
                        .fetch_optional(&mut *$tx)
                        .await?;
                match state.as_deref() {
                    None => {
                        return Err(StoreError::NotFound(format!("connection {connection_id}")));
                    }
                    Some("disconnected") => {
                        return Err(StoreError::Conflict(
                            "the connection is disconnected: reconnect it first, then send what it missed".into(),
                        ));
                    }
                    Some(_) => {}
                }
                let mut q = sqlx::query(&sql).bind(connection_id);
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
                let mut found = std::collections::HashSet::new();
                let mut docs = Vec::with_capacity(rows.len());
                for r in &rows {
                    let doc: (String, String, String, String, String) = (
                        r.try_get("tenant_id")?,
                        r.try_get("id")?,
                        r.try_get("number")?,
                        r.try_get("kind")?,
                        r.try_get("connector_id")?,
                    );
                    found.insert(doc.1.clone());
                    docs.push(doc);
                }
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
                for (tenant, id, number, kind, connector) in &docs {
                    queued += sqlx::query(
                        "INSERT INTO deliveries (id, tenant_id, document_id, connection_id, connector_id, document_number, document_kind, next_attempt_at, state, attempts, created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', 0, $8, $8)
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(super::outbox::delivery_id(tenant, id, connection_id))
                    .bind(tenant)
                    .bind(id)
                    .bind(connection_id)
                    .bind(connector)
                    .bind(number)
                    .bind(kind)
                    .bind(now)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected();
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
                let mut tx = p.begin_write().await?;
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
