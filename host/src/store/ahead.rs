//! What a batch of claimed deliveries needs before their connectors run,
//! read ahead in one go: each connection's row, its stored settings, its
//! tokens, its tenant's mappings and its small kv values — five statements
//! for the whole batch instead of five per delivery (each statement is a
//! hand-off to the driver's connection thread and back).
//!
//! The reads are what a delivery would have read a few milliseconds later,
//! so nothing changes in what a connector sees. The per-connection kv
//! store is read ahead within bounds ([`KV_AHEAD_VALUE_BYTES`],
//! [`KV_AHEAD_KEYS`]), as of the claim: what deliveries of the connection
//! that finished before the claim wrote is in it. A key in the read is
//! answered from it; a key a delivery of the batch wrote since, or one not
//! in the read, is the store's (see [`crate::capabilities::kv::ReadAheadKv`]).
//! The steady-state Xero delivery reads one kv key (its cached contact
//! id): one statement per delivery less.

use super::connections::{CONNECTION_COLUMNS, ConnectionRow, TOKEN_COLUMNS, TokenRow};
use super::settings::{SettingRow, StoredSetting, ctx_setting};
use super::{Connection, Store, StoreError, StoredTokens, on_pool, placeholders};
use crate::capabilities::mapping::AccountMapping;
use crate::crypto::KeyRing;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// One connection's data for a delivery.
#[derive(Debug, Clone)]
pub struct CallData {
    /// The connection.
    pub connection: Connection,
    /// Its tenant's stored settings for its connector (decrypted).
    pub settings: Vec<StoredSetting>,
    /// Its tokens (decrypted), when it has any.
    pub tokens: Option<StoredTokens>,
    /// Its tenant's mappings for its connector.
    pub mappings: Vec<AccountMapping>,
    /// Part of its kv store: values of at most [`KV_AHEAD_VALUE_BYTES`],
    /// at most [`KV_AHEAD_KEYS`] keys a connection in the batch. A key
    /// missing here may still be in the store. Shared by the batch's
    /// deliveries of the connection (a write by one ends the read of its
    /// key for all).
    pub kv: Arc<crate::capabilities::kv::KvAhead>,
}

/// Largest kv value read ahead (larger ones are read when asked for).
pub const KV_AHEAD_VALUE_BYTES: usize = 1024;
/// Most kv keys read ahead, on average, per connection of a batch (the
/// statement's `LIMIT`; which ones it keeps is the database's choice).
pub const KV_AHEAD_KEYS: usize = 16;

impl Store {
    /// [`CallData`] of every connection in `ids` that exists, by id.
    pub async fn call_data(
        &self,
        keys: &KeyRing,
        ids: &[String],
    ) -> Result<HashMap<String, CallData>, StoreError> {
        let ids: Vec<&String> = ids.iter().collect::<BTreeSet<_>>().into_iter().collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let in_ids = placeholders(1, ids.len());
        let conns: Vec<ConnectionRow> = on_pool!(self, p => {
            let sql = format!("SELECT {CONNECTION_COLUMNS} FROM connections WHERE id IN ({in_ids})");
            let mut q = sqlx::query_as(&sql);
            for id in &ids {
                q = q.bind(*id);
            }
            q.fetch_all(p).await?
        });
        let conns: Vec<Connection> = conns.into_iter().map(Into::into).collect();
        if conns.is_empty() {
            return Ok(HashMap::new());
        }
        let tenants: Vec<&str> = conns
            .iter()
            .map(|c| c.tenant_id.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let in_tenants = placeholders(1, tenants.len());
        let tokens: Vec<(String, TokenRow)> = on_pool!(self, p => {
            let sql = format!("SELECT connection_id, {TOKEN_COLUMNS} FROM connection_tokens WHERE connection_id IN ({in_ids})");
            let mut q = sqlx::query(&sql);
            for id in &ids {
                q = q.bind(*id);
            }
            let mut out = Vec::new();
            for r in q.fetch_all(p).await? {
                use sqlx::{FromRow, Row};
                out.push((r.try_get("connection_id")?, TokenRow::from_row(&r)?));
            }
            out
        });
        type Scoped<T> = Vec<(String, String, T)>;
        let settings: Scoped<SettingRow> = on_pool!(self, p => {
            let sql = format!("SELECT tenant_id, connector_id, key, value, updated_by, updated_at FROM connection_settings WHERE tenant_id IN ({in_tenants}) ORDER BY key");
            let mut q = sqlx::query_as::<_, (String, String, String, String, Option<String>, i64)>(&sql);
            for t in &tenants {
                q = q.bind(*t);
            }
            q.fetch_all(p).await?.into_iter().map(|(t, c, k, v, by, at)| (t, c, (k, v, by, at))).collect()
        });
        // One row per (tenant, connector), its mappings as a JSON array
        // of [kind, account code, tax type] in kind order: every row is a
        // message from the driver's connection thread, and a batch's
        // tenants have a dozen mappings each (most of the rows of the
        // whole read-ahead, one row a mapping).
        let grouped = match self.pool() {
            super::Pool::Sqlite(_) => {
                "json_group_array(json_array(kind, account_code, tax_type) ORDER BY kind)"
            }
            super::Pool::Postgres(_) => {
                "json_agg(json_build_array(kind, account_code, tax_type) ORDER BY kind)::text"
            }
        };
        let grouped: Vec<(String, String, String)> = on_pool!(self, p => {
            let sql = format!("SELECT tenant_id, connector_id, {grouped} FROM mappings WHERE tenant_id IN ({in_tenants}) GROUP BY tenant_id, connector_id");
            let mut q = sqlx::query_as(&sql);
            for t in &tenants {
                q = q.bind(*t);
            }
            q.fetch_all(p).await?
        });
        let mut mappings: Scoped<AccountMapping> = Vec::new();
        for (t, c, list) in grouped {
            let rows: Vec<(String, String, Option<String>)> = serde_json::from_str(&list)
                .map_err(|e| StoreError::Conflict(format!("mappings of {t}/{c}: {e}")))?;
            mappings.extend(rows.into_iter().map(|(kind, account_code, tax_type)| {
                (
                    t.clone(),
                    c.clone(),
                    AccountMapping {
                        kind,
                        account_code,
                        tax_type,
                    },
                )
            }));
        }
        let kv: Vec<(String, String, Vec<u8>)> = on_pool!(self, p => {
            let sql = format!(
                "SELECT connection_id, key, value FROM kv WHERE connection_id IN ({in_ids}) AND length(value) <= {KV_AHEAD_VALUE_BYTES} LIMIT {}",
                KV_AHEAD_KEYS * ids.len()
            );
            let mut q = sqlx::query_as(&sql);
            for id in &ids {
                q = q.bind(*id);
            }
            q.fetch_all(p).await?
        });
        let mut kv_of: HashMap<String, HashMap<String, Vec<u8>>> = HashMap::new();
        for (connection_id, key, value) in kv {
            kv_of.entry(connection_id).or_default().insert(key, value);
        }
        let mut tokens: HashMap<String, TokenRow> = tokens.into_iter().collect();
        let mut out = HashMap::with_capacity(conns.len());
        for connection in conns {
            let scope =
                |t: &str, c: &str| t == connection.tenant_id && c == connection.connector_id;
            let mut stored = Vec::new();
            for (t, c, (key, sealed, updated_by, updated_at)) in &settings {
                if scope(t, c) {
                    let value = keys.decrypt(sealed, &ctx_setting(t, c, key))?;
                    stored.push(StoredSetting {
                        key: key.clone(),
                        value,
                        updated_by: updated_by.clone(),
                        updated_at: *updated_at,
                    });
                }
            }
            let mapped = mappings
                .iter()
                .filter(|(t, c, _)| scope(t, c))
                .map(|(_, _, m)| m.clone())
                .collect();
            let tokens = match tokens.remove(&connection.id) {
                Some(row) => Some(row.decrypt(keys, &connection.id)?),
                None => None,
            };
            let kv = Arc::new(crate::capabilities::kv::KvAhead::new(
                kv_of.remove(&connection.id).unwrap_or_default(),
            ));
            out.insert(
                connection.id.clone(),
                CallData {
                    connection,
                    settings: stored,
                    tokens,
                    mappings: mapped,
                    kv,
                },
            );
        }
        Ok(out)
    }
}
