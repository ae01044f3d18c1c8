//! Connector settings a tenant's connection overrides (table
//! `connection_settings`): per tenant and connector, like mappings, so they
//! outlive a disconnect and are found again on reconnect. Every value is
//! encrypted with the [`KeyRing`] (some are secrets, such as a webhook's
//! signing secret, and which ones is the manifest's business, not the
//! store's), bound to its row by the associated data
//! [`ctx_setting`]. Validation against the manifest lives in
//! `connections::settings`.

use super::{BeginWrite, Store, StoreError, on_pool};
use crate::crypto::{KeyRing, Secret};

/// One stored setting, decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSetting {
    /// The setting's key.
    pub key: String,
    /// Its value (a [`Secret`]: `Debug` never shows it).
    pub value: Secret,
    /// Who set it.
    pub updated_by: Option<String>,
    /// When (Unix seconds).
    pub updated_at: i64,
}

/// Encryption context of a setting's value: the row it lives in
/// (unambiguous, whatever the ids contain).
pub fn ctx_setting(tenant_id: &str, connector_id: &str, key: &str) -> String {
    format!(
        "connection_settings.value:{}",
        serde_json::json!([tenant_id, connector_id, key])
    )
}

/// Set one setting (insert, or replace the one there): `$1` tenant, `$2`
/// connector, `$3` key, `$4` the sealing key's id, `$5` the sealed value,
/// `$6` actor, `$7` time.
const UPSERT: &str = "INSERT INTO connection_settings (tenant_id, connector_id, key, key_id, value, updated_by, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT (tenant_id, connector_id, key) DO UPDATE SET
       key_id = excluded.key_id, value = excluded.value,
       updated_by = excluded.updated_by, updated_at = excluded.updated_at";

/// One change of [`Store::change_connection_settings`].
#[derive(Debug, Clone)]
pub struct SettingChange<'a> {
    /// The setting.
    pub key: &'a str,
    /// Its new value (`None`: remove it).
    pub value: Option<&'a str>,
    /// The audit log's action (`setting.set`, `setting.unset`).
    pub action: &'static str,
    /// The audit log's detail (never a secret's value).
    pub detail: String,
}

pub(super) type SettingRow = (String, String, Option<String>, i64);

impl Store {
    /// Set (or replace) one setting of `tenant_id`'s `connector_id`,
    /// encrypted under the newest key.
    #[allow(clippy::too_many_arguments)]
    pub async fn set_connection_setting(
        &self,
        keys: &KeyRing,
        tenant_id: &str,
        connector_id: &str,
        key: &str,
        value: &str,
        actor: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let sealed = keys.encrypt(value, &ctx_setting(tenant_id, connector_id, key));
        on_pool!(self, p => {
            sqlx::query(UPSERT)
            .bind(tenant_id)
            .bind(connector_id)
            .bind(key)
            .bind(KeyRing::key_of(&sealed).unwrap_or_default())
            .bind(&sealed)
            .bind(actor)
            .bind(now)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Set and remove several settings of `tenant_id`'s `connector_id`
    /// (`value` `None`: remove), each with its audit entry (action,
    /// detail), all in one transaction: a form's changes are saved whole or
    /// not at all. A removal of a key with nothing stored does nothing and
    /// is not audited. Returns the keys that changed.
    #[allow(clippy::too_many_arguments)]
    pub async fn change_connection_settings(
        &self,
        keys: &KeyRing,
        tenant_id: &str,
        connector_id: &str,
        changes: &[SettingChange<'_>],
        actor: &str,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let done = on_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            let mut done = Vec::new();
            for c in changes {
                let changed = match c.value {
                    Some(value) => {
                        let sealed = keys.encrypt(value, &ctx_setting(tenant_id, connector_id, c.key));
                        sqlx::query(UPSERT)
                        .bind(tenant_id)
                        .bind(connector_id)
                        .bind(c.key)
                        .bind(KeyRing::key_of(&sealed).unwrap_or_default())
                        .bind(&sealed)
                        .bind(actor)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                        true
                    }
                    None => {
                        sqlx::query(
                            "DELETE FROM connection_settings WHERE tenant_id = $1 AND connector_id = $2 AND key = $3",
                        )
                        .bind(tenant_id)
                        .bind(connector_id)
                        .bind(c.key)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                            > 0
                    }
                };
                if changed {
                    sqlx::query("INSERT INTO audit_log (at, actor, tenant_id, action, detail) VALUES ($1, $2, $3, $4, $5)")
                        .bind(now).bind(actor).bind(tenant_id).bind(c.action).bind(&c.detail)
                        .execute(&mut *tx).await?;
                    done.push(c.key.to_string());
                }
            }
            tx.commit().await?;
            done
        });
        Ok(done)
    }

    /// Remove one setting (the connector gets the manifest's default
    /// again); returns whether there was one.
    pub async fn unset_connection_setting(
        &self,
        tenant_id: &str,
        connector_id: &str,
        key: &str,
    ) -> Result<bool, StoreError> {
        let n = on_pool!(self, p => {
            sqlx::query(
                "DELETE FROM connection_settings WHERE tenant_id = $1 AND connector_id = $2 AND key = $3",
            )
            .bind(tenant_id)
            .bind(connector_id)
            .bind(key)
            .execute(p)
            .await?
            .rows_affected()
        });
        Ok(n > 0)
    }

    /// Every stored setting of `tenant_id`'s `connector_id`, decrypted,
    /// sorted by key.
    pub async fn connection_settings(
        &self,
        keys: &KeyRing,
        tenant_id: &str,
        connector_id: &str,
    ) -> Result<Vec<StoredSetting>, StoreError> {
        let rows: Vec<SettingRow> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT key, value, updated_by, updated_at FROM connection_settings
                 WHERE tenant_id = $1 AND connector_id = $2 ORDER BY key",
            )
            .bind(tenant_id)
            .bind(connector_id)
            .fetch_all(p)
            .await?
        });
        rows.into_iter()
            .map(|(key, sealed, updated_by, updated_at)| {
                let value = keys.decrypt(&sealed, &ctx_setting(tenant_id, connector_id, &key))?;
                Ok(StoredSetting {
                    key,
                    value,
                    updated_by,
                    updated_at,
                })
            })
            .collect()
    }

    /// Re-encrypt every setting not under `keys`' newest key; returns how
    /// many were rewritten. A value changed meanwhile is left for the next
    /// pass (compare-and-swap on the old ciphertext).
    pub(crate) async fn reencrypt_settings(&self, keys: &KeyRing) -> Result<u64, StoreError> {
        let current = keys.current_key_id().to_string();
        let rows: Vec<(String, String, String, String)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT tenant_id, connector_id, key, value FROM connection_settings WHERE key_id <> $1",
            )
            .bind(&current)
            .fetch_all(p)
            .await?
        });
        let mut n = 0;
        for (tenant, connector, key, sealed) in rows {
            let again = keys.reencrypt(&sealed, &ctx_setting(&tenant, &connector, &key))?;
            n += on_pool!(self, p => {
                sqlx::query(
                    "UPDATE connection_settings SET key_id = $1, value = $2
                     WHERE tenant_id = $3 AND connector_id = $4 AND key = $5 AND value = $6",
                )
                .bind(&current)
                .bind(&again)
                .bind(&tenant)
                .bind(&connector)
                .bind(&key)
                .bind(&sealed)
                .execute(p)
                .await?
                .rows_affected()
            });
        }
        Ok(n)
    }
}
