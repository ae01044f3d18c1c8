//! Account mappings: per tenant and connector, line-item kind -> account
//! code (+ optional tax type). Keyed by tenant and connector, not by
//! connection, so they outlive a disconnect and are found again on
//! reconnect. Implements the runtime's [`MappingStore`].

use super::{BeginWrite, Store, StoreError, on_pool};
use crate::capabilities::mapping::{AccountMapping, MappingScope, MappingStore};
use async_trait::async_trait;

type MappingRow = (String, String, Option<String>, Option<String>, i64);

/// A stored mapping with who changed it last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMapping {
    /// The mapping.
    pub mapping: AccountMapping,
    /// Who set it.
    pub updated_by: Option<String>,
    /// When (Unix seconds).
    pub updated_at: i64,
}

/// Set one kind's mapping (insert, or replace the one there), with who
/// and when: `$1` tenant, `$2` connector, `$3` kind, `$4` code, `$5` tax
/// type, `$6` actor, `$7` time.
const UPSERT: &str = "INSERT INTO mappings (tenant_id, connector_id, kind, account_code, tax_type, updated_by, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT (tenant_id, connector_id, kind) DO UPDATE SET
       account_code = excluded.account_code, tax_type = excluded.tax_type,
       updated_by = excluded.updated_by, updated_at = excluded.updated_at";

/// End a connection's mappings review (`$1` tenant, `$2` connector), if it
/// still points at the organisation the mappings were checked against
/// (`$3`, its id; NULL for none): a reconnect to another organisation
/// while they were checked leaves the review due.
const CONFIRM: &str = "UPDATE connections SET mappings_review = 0, mappings_org = NULL WHERE tenant_id = $1 AND connector_id = $2 AND mappings_review <> 0 AND COALESCE(external_tenant_id, '') = COALESCE($3, '')";

/// A write that ends a mappings review after a switch of organisation:
/// the organisation the mappings were checked against (the connection's
/// provider organisation id when the check began). The review ends only
/// if the connection still points at it.
#[derive(Debug, Clone, Copy)]
pub struct Confirm<'a> {
    /// The provider's organisation id checked against (None: none).
    pub checked_org: Option<&'a str>,
}

impl Store {
    /// Set or replace the mapping of one kind.
    pub async fn set_mapping(
        &self,
        scope: &MappingScope,
        mapping: &AccountMapping,
        actor: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self, p => {
            sqlx::query(UPSERT)
            .bind(&scope.tenant_id)
            .bind(&scope.connector_id)
            .bind(&mapping.kind)
            .bind(&mapping.account_code)
            .bind(&mapping.tax_type)
            .bind(actor)
            .bind(now)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Replace every mapping of the scope at once (in one transaction).
    pub async fn replace_mappings(
        &self,
        scope: &MappingScope,
        mappings: &[AccountMapping],
        actor: &str,
        now: i64,
        confirm: Confirm<'_>,
    ) -> Result<(), StoreError> {
        self.write_mappings(scope, mappings, None, actor, now, Some(confirm))
            .await
    }

    /// Set some mappings and delete others, in one transaction: the
    /// Integrations page's form saves all of its rows or none. `confirm`:
    /// the whole set was saved and checked (the page's form), which ends a
    /// review due after the connection switched organisation
    /// ([`super::Connection::mappings_review`]), as
    /// [`Store::replace_mappings`] does.
    pub async fn change_mappings(
        &self,
        scope: &MappingScope,
        set: &[AccountMapping],
        clear: &[String],
        actor: &str,
        now: i64,
        confirm: Option<Confirm<'_>>,
    ) -> Result<(), StoreError> {
        self.write_mappings(scope, set, Some(clear), actor, now, confirm)
            .await
    }

    /// The mappings confirmed as they are, checked by the caller against
    /// `confirm`'s organisation: a review due after a switch of
    /// organisation is done. Returns whether one was (and ended).
    pub async fn confirm_mappings(
        &self,
        scope: &MappingScope,
        confirm: Confirm<'_>,
    ) -> Result<bool, StoreError> {
        let n = on_pool!(self, p => {
            sqlx::query(CONFIRM)
                .bind(&scope.tenant_id)
                .bind(&scope.connector_id)
                .bind(confirm.checked_org)
                .execute(p)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    /// One transaction: delete the kinds in `clear` (`None`: every
    /// mapping of the scope), then set `set`; `confirm` ends a review
    /// (see [`Confirm`]).
    async fn write_mappings(
        &self,
        scope: &MappingScope,
        set: &[AccountMapping],
        clear: Option<&[String]>,
        actor: &str,
        now: i64,
        confirm: Option<Confirm<'_>>,
    ) -> Result<(), StoreError> {
        on_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            match clear {
                None => {
                    sqlx::query("DELETE FROM mappings WHERE tenant_id = $1 AND connector_id = $2")
                        .bind(&scope.tenant_id)
                        .bind(&scope.connector_id)
                        .execute(&mut *tx)
                        .await?;
                }
                Some(kinds) => {
                    for kind in kinds {
                        sqlx::query("DELETE FROM mappings WHERE tenant_id = $1 AND connector_id = $2 AND kind = $3")
                            .bind(&scope.tenant_id)
                            .bind(&scope.connector_id)
                            .bind(kind)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
            for m in set {
                sqlx::query(UPSERT)
                .bind(&scope.tenant_id)
                .bind(&scope.connector_id)
                .bind(&m.kind)
                .bind(&m.account_code)
                .bind(&m.tax_type)
                .bind(actor)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            // The whole set saved (the page's form, a replace): checked by
            // an admin, so a review due after a switch of organisation is
            // done. One kind changed is not a review of the others.
            if let Some(c) = confirm {
                sqlx::query(CONFIRM)
                    .bind(&scope.tenant_id)
                    .bind(&scope.connector_id)
                    .bind(c.checked_org)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Delete the mapping of one kind; returns whether there was one.
    pub async fn delete_mapping(
        &self,
        scope: &MappingScope,
        kind: &str,
    ) -> Result<bool, StoreError> {
        let n = on_pool!(self, p => {
            sqlx::query("DELETE FROM mappings WHERE tenant_id = $1 AND connector_id = $2 AND kind = $3")
                .bind(&scope.tenant_id)
                .bind(&scope.connector_id)
                .bind(kind)
                .execute(p)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    /// Every mapping of the scope, sorted by kind.
    pub async fn mappings(&self, scope: &MappingScope) -> Result<Vec<StoredMapping>, StoreError> {
        let rows: Vec<MappingRow> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT kind, account_code, tax_type, updated_by, updated_at FROM mappings
                 WHERE tenant_id = $1 AND connector_id = $2 ORDER BY kind",
            )
            .bind(&scope.tenant_id)
            .bind(&scope.connector_id)
            .fetch_all(p)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(kind, account_code, tax_type, updated_by, updated_at)| StoredMapping {
                    mapping: AccountMapping {
                        kind,
                        account_code,
                        tax_type,
                    },
                    updated_by,
                    updated_at,
                },
            )
            .collect())
    }
}

#[async_trait]
impl MappingStore for Store {
    async fn all(&self, scope: &MappingScope) -> anyhow::Result<Vec<AccountMapping>> {
        Ok(self
            .mappings(scope)
            .await?
            .into_iter()
            .map(|m| m.mapping)
            .collect())
    }
}
