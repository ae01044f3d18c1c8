//! Tenants: the platform's customer companies, with the e-mail addresses
//! that receive integration notices.

use super::{BeginWrite, Store, StoreError, on_pool};
use sqlx::Row;

/// A platform tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// The platform's id of the company.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Addresses that receive integration notices, sorted.
    pub emails: Vec<String>,
    /// When it was added (Unix seconds).
    pub created_at: i64,
}

/// Check a tenant id: 1-128 printable characters without spaces.
pub fn validate_tenant_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "tenant id {id:?} must be 1-128 characters without spaces"
        ));
    }
    Ok(())
}

/// Check an e-mail address: `local@domain.tld`, as the mailer will take it
/// (lettre's parser: an address it refuses would fail, at send time, the
/// whole notice to every address of the tenant), with a domain of at
/// least two non-empty labels.
pub fn validate_email(e: &str) -> Result<(), String> {
    let ok = e.len() <= 254
        && !e.chars().any(|c| c.is_whitespace() || c.is_control())
        && e.parse::<lettre::Address>().is_ok()
        && e.rsplit_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && d.contains('.') && d.split('.').all(|label| !label.is_empty())
        });
    if ok {
        Ok(())
    } else {
        Err(format!("email {e:?} is not an e-mail address"))
    }
}

impl Store {
    /// Add a tenant, or update its name and replace its e-mail addresses.
    pub async fn upsert_tenant(
        &self,
        id: &str,
        name: &str,
        emails: &[String],
        now: i64,
    ) -> Result<Tenant, StoreError> {
        validate_tenant_id(id).map_err(StoreError::Conflict)?;
        for e in emails {
            validate_email(e).map_err(StoreError::Conflict)?;
        }
        on_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            sqlx::query(
                "INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name",
            )
            .bind(id)
            .bind(name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM tenant_emails WHERE tenant_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            for e in emails {
                sqlx::query(
                    "INSERT INTO tenant_emails (tenant_id, email) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                )
                .bind(id)
                .bind(e.trim())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        self.tenant(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("tenant {id}")))
    }

    /// One tenant.
    pub async fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        let row: Option<(String, String, i64)> = on_pool!(self, p => {
            sqlx::query_as("SELECT id, name, created_at FROM tenants WHERE id = $1")
                .bind(id)
                .fetch_optional(p)
                .await?
        });
        let Some((id, name, created_at)) = row else {
            return Ok(None);
        };
        let emails = self.tenant_emails(&id).await?;
        Ok(Some(Tenant {
            id,
            name,
            emails,
            created_at,
        }))
    }

    /// Where a document of tenant `id` goes, in one query: None when the
    /// tenant is unknown, else its connections that are not disconnected
    /// as (connection id, connector id).
    pub async fn ingest_targets(
        &self,
        id: &str,
    ) -> Result<Option<Vec<(String, String)>>, StoreError> {
        let sql = ingest_targets_sql(1);
        let rows: Vec<(String, Option<String>, Option<String>)> = on_pool!(self, p => {
            sqlx::query_as(&sql)
            .bind(id)
            .fetch_all(p)
            .await?
        });
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            rows.into_iter()
                .filter_map(|(_, c, k)| Some((c?, k?)))
                .collect(),
        ))
    }

    /// The notice addresses of a tenant, sorted.
    pub async fn tenant_emails(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let rows = on_pool!(self, p => {
            sqlx::query("SELECT email FROM tenant_emails WHERE tenant_id = $1 ORDER BY email")
                .bind(id)
                .fetch_all(p)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>("email"))
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(rows)
    }

    /// Every tenant, by id.
    pub async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let ids: Vec<(String,)> = on_pool!(self, p => {
            sqlx::query_as("SELECT id FROM tenants ORDER BY id").fetch_all(p).await?
        });
        let mut out = Vec::with_capacity(ids.len());
        for (id,) in ids {
            if let Some(t) = self.tenant(&id).await? {
                out.push(t);
            }
        }
        Ok(out)
    }
}

/// Where documents of `tenants` tenants (bound as `$1`..`$n`) go: a row
/// (tenant_id, connection_id, connector_id) for each of their connections
/// that is not disconnected, and a row with no connection for a tenant that
/// has none; an unknown tenant has no row. Ingest reads it for its whole
/// batch in the grouped transaction ([`super::group`]).
pub(super) fn ingest_targets_sql(tenants: usize) -> String {
    let list = (1..=tenants)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT t.id AS tenant_id, c.id AS connection_id, c.connector_id FROM tenants t LEFT JOIN connections c ON c.tenant_id = t.id AND c.state <> 'disconnected' WHERE t.id IN ({list}) ORDER BY c.connector_id"
    )
}

#[cfg(test)]
mod tests {
    use super::validate_email;

    #[test]
    fn an_address_the_mailer_would_refuse_is_refused_when_given() {
        for good in [
            "jane@acme.com",
            "jane.doe+ap@mail.acme.co.uk",
            "a@b.example",
        ] {
            assert_eq!(validate_email(good), Ok(()), "{good}");
        }
        for bad in [
            "jane@@acme.com",
            "jane@acme..com",
            "jane@.acme.com",
            "jane@acme.com.",
            "jane@acme",
            "@acme.com",
            "jane acme@acme.com",
            "jane@acme.com\n",
            "jane@ac\0me.com",
            "jane",
        ] {
            let e = validate_email(bad).unwrap_err();
            assert!(e.contains("is not an e-mail address"), "{bad:?}: {e}");
        }
    }
}
