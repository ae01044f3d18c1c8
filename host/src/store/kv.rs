//! The per-connection key-value store behind the `kv` capability
//! (e.g. a connector's cached contact id). Implements [`KvStore`].

use super::{BeginWrite, Store, on_pool};
use crate::capabilities::kv::KvStore;
use async_trait::async_trait;

/// The most keys one connection's kv store holds.
pub const MAX_KEYS_PER_CONNECTION: i64 = 1_000;

impl Store {
    /// Every key of a connection, sorted (for inspection and tests).
    pub async fn kv_keys(&self, connection_id: &str) -> Result<Vec<String>, super::StoreError> {
        let rows: Vec<(String,)> = on_pool!(self, p => {
            sqlx::query_as("SELECT key FROM kv WHERE connection_id = $1 ORDER BY key")
                .bind(connection_id)
                .fetch_all(p)
                .await?
        });
        Ok(rows.into_iter().map(|(k,)| k).collect())
    }
}

#[async_trait]
impl KvStore for Store {
    async fn get(&self, connection_id: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let row: Option<(Vec<u8>,)> = on_pool!(self, p => {
            sqlx::query_as("SELECT value FROM kv WHERE connection_id = $1 AND key = $2")
                .bind(connection_id)
                .bind(key)
                .fetch_optional(p)
                .await?
        });
        Ok(row.map(|(v,)| v))
    }

    async fn set(&self, connection_id: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let now = chrono::Utc::now().timestamp();
        // A connection holds at most its limit of keys (a connector writing
        // a new key at every delivery would grow the database without end):
        // a new key past it takes the place of the one written longest ago.
        // kv is a cache, which a connector must work without.
        on_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            sqlx::query(
                "DELETE FROM kv WHERE connection_id = $1 AND key IN (
                   SELECT key FROM kv WHERE connection_id = $1
                   ORDER BY updated_at, key LIMIT 1)
                 AND (SELECT COUNT(*) FROM kv WHERE connection_id = $1) >= $3
                 AND NOT EXISTS (SELECT 1 FROM kv WHERE connection_id = $1 AND key = $2)",
            )
            .bind(connection_id)
            .bind(key)
            .bind(MAX_KEYS_PER_CONNECTION)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO kv (connection_id, key, value, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (connection_id, key) DO UPDATE SET value = excluded.value,
                   updated_at = excluded.updated_at",
            )
            .bind(connection_id)
            .bind(key)
            .bind(value)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    async fn delete(&self, connection_id: &str, key: &str) -> anyhow::Result<()> {
        on_pool!(self, p => {
            sqlx::query("DELETE FROM kv WHERE connection_id = $1 AND key = $2")
                .bind(connection_id)
                .bind(key)
                .execute(p)
                .await?;
        });
        Ok(())
    }
}
