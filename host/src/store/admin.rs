//! API keys (hashed, scoped, revocable) and the audit log of admin changes.

use super::{BeginWrite, Store, StoreError, on_pool};
use sqlx::Row;

/// What a key may do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum KeyScope {
    /// Hand over documents (the platform backend).
    Ingest,
    /// Administer one tenant (the platform's Integrations page on behalf of it).
    Tenant(String),
    /// Everything, every tenant (the platform operator).
    Operator,
}

/// A verified key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    /// Key id (not secret).
    pub id: String,
    /// Scope.
    pub scope: KeyScope,
    /// Label.
    pub label: String,
}

/// One audit entry.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    /// Its place in the log (a page's `before`).
    pub id: i64,
    /// When (Unix seconds).
    pub at: i64,
    /// Who.
    pub actor: String,
    /// Which tenant.
    pub tenant_id: Option<String>,
    /// What.
    pub action: String,
    /// Details.
    pub detail: String,
}

/// End the connections begun and not finished (`$1` tenant, `$2` admin;
/// NULL for every one): a consent still open at the provider is forgotten,
/// so it comes back refused; an organisation pick is expired, not deleted,
/// so the purge removes its grant's links at the provider
/// ([`Store::take_abandoned_picks`]).
const END_UNFINISHED_FLOWS: [&str; 2] = [
    "DELETE FROM oauth_states WHERE ($1 IS NULL OR tenant_id = $1) AND ($2 IS NULL OR admin = $2) AND used_at IS NULL",
    "UPDATE oauth_pending SET pick_expires_at = 0 WHERE ($1 IS NULL OR tenant_id = $1) AND ($2 IS NULL OR admin = $2) AND used_at IS NULL",
];

fn hash(key: &str) -> String {
    crate::crypto::sha256_hex(key)
}

impl Store {
    /// Issue a key; returns (id, the key itself — shown once, never stored).
    pub async fn issue_key(
        &self,
        scope: &KeyScope,
        label: &str,
        now: i64,
    ) -> Result<(String, String), StoreError> {
        let id = format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let secret = format!("lp_{}", crate::crypto::random_token(24));
        let (s, tenant) = match scope {
            KeyScope::Ingest => ("ingest", None),
            KeyScope::Tenant(t) => ("tenant", Some(t.clone())),
            KeyScope::Operator => ("operator", None),
        };
        on_pool!(self, p => sqlx::query("INSERT INTO api_keys (id, key_hash, scope, tenant_id, label, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&id).bind(hash(&secret)).bind(s).bind(tenant).bind(label).bind(now)
            .execute(p).await.map(|_| ()))?;
        Ok((id, secret))
    }

    /// The key's scope, if it exists and is not revoked.
    pub async fn verify_key(&self, secret: &str) -> Result<Option<KeyInfo>, StoreError> {
        let row: Option<(String, String, Option<String>, String)> = on_pool!(self, p => {
            match sqlx::query("SELECT id, scope, tenant_id, label FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL")
                .bind(hash(secret)).fetch_optional(p).await? {
                Some(r) => Some((r.try_get("id")?, r.try_get("scope")?, r.try_get("tenant_id")?, r.try_get("label")?)),
                None => None,
            }
        });
        Ok(row.and_then(|(id, scope, tenant, label)| {
            let scope = match (scope.as_str(), tenant) {
                ("ingest", _) => KeyScope::Ingest,
                ("operator", _) => KeyScope::Operator,
                ("tenant", Some(t)) => KeyScope::Tenant(t),
                _ => return None,
            };
            Some(KeyInfo { id, scope, label })
        }))
    }

    /// Revoke a key. False when there was no such active key.
    ///
    /// What the key could have begun ends with it: its page sessions, and
    /// the connections begun and not finished for the tenants it could act
    /// for (a tenant key: its tenant's; an operator key: every tenant's),
    /// as a sign-out does: a consent still open at the provider comes back
    /// refused, an organisation picker is refused at once and its grant's
    /// links are removed by the next purge. A leaked key, once revoked,
    /// must not still finish connecting a tenant to someone else's
    /// organisation. (Flows do not record the key that began them, so an
    /// admin's flow begun with another key of the same tenant is ended too,
    /// and is simply started again.)
    pub async fn revoke_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let n = on_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            let scope: Option<(String, Option<String>)> = sqlx::query_as(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL RETURNING scope, tenant_id",
            )
            .bind(now)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            // The tenants whose unfinished flows end: None = every tenant.
            let ends: Option<Option<String>> = match &scope {
                Some((s, t)) if s == "tenant" => t.clone().map(Some),
                Some((s, _)) if s == "operator" => Some(None),
                _ => None,
            };
            if let Some(tenant) = ends {
                for end in END_UNFINISHED_FLOWS {
                    sqlx::query(end).bind(&tenant).bind(None::<&str>).execute(&mut *tx).await?;
                }
            }
            if scope.is_some() {
                sqlx::query("DELETE FROM page_sessions WHERE key_id = $1")
                    .bind(id).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            u64::from(scope.is_some())
        });
        Ok(n == 1)
    }

    /// Record an admin change.
    pub async fn audit(
        &self,
        actor: &str,
        tenant_id: Option<&str>,
        action: &str,
        detail: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query("INSERT INTO audit_log (at, actor, tenant_id, action, detail) VALUES ($1, $2, $3, $4, $5)")
            .bind(now).bind(actor).bind(tenant_id).bind(action).bind(detail)
            .execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// A one-time sign-in ticket for the Integrations page, for `admin`
    /// acting as `role` in `tenant_id`, asked for with the key `key_id`;
    /// valid `ttl` seconds. Returns the ticket (only its hash is stored).
    pub async fn create_page_ticket(
        &self,
        tenant_id: &str,
        admin: &str,
        role: &str,
        key_id: &str,
        ttl: i64,
        now: i64,
    ) -> Result<String, StoreError> {
        let ticket = format!("pt_{}", crate::crypto::random_token(24));
        on_pool!(self, p => {
            // Expired tickets and sessions go as new ones come.
            sqlx::query("DELETE FROM page_sessions WHERE expires_at <= $1")
                .bind(now).execute(p).await?;
            sqlx::query("INSERT INTO page_sessions (token_hash, kind, tenant_id, admin, role, key_id, expires_at) VALUES ($1, 'ticket', $2, $3, $4, $5, $6)")
                .bind(hash(&ticket)).bind(tenant_id).bind(admin).bind(role).bind(key_id).bind(now.saturating_add(ttl))
                .execute(p).await.map(|_| ())
        })?;
        Ok(ticket)
    }

    /// Use a sign-in ticket: it is spent at once (a second use finds
    /// nothing), and when it was still valid a session of `ttl` seconds
    /// for the same tenant, admin and role is made. Returns the session
    /// token, or `None` for a ticket unknown, spent or expired.
    pub async fn redeem_page_ticket(
        &self,
        ticket: &str,
        ttl: i64,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        let token = format!("ps_{}", crate::crypto::random_token(24));
        // One transaction: a failure after the ticket is spent leaves it
        // unspent. The key that asked must still be valid.
        let made = on_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            let row = sqlx::query("DELETE FROM page_sessions WHERE token_hash = $1 AND kind = 'ticket' RETURNING tenant_id, admin, role, key_id, expires_at")
                .bind(hash(ticket)).fetch_optional(&mut *tx).await?;
            let mut made = false;
            if let Some(r) = row {
                let expires_at: i64 = r.try_get("expires_at")?;
                let key_id: String = r.try_get("key_id")?;
                let live: Option<(String,)> = sqlx::query_as("SELECT id FROM api_keys WHERE id = $1 AND revoked_at IS NULL")
                    .bind(&key_id).fetch_optional(&mut *tx).await?;
                if expires_at > now && live.is_some() {
                    sqlx::query("INSERT INTO page_sessions (token_hash, kind, tenant_id, admin, role, key_id, expires_at) VALUES ($1, 'session', $2, $3, $4, $5, $6)")
                        .bind(hash(&token))
                        .bind(r.try_get::<String, _>("tenant_id")?)
                        .bind(r.try_get::<String, _>("admin")?)
                        .bind(r.try_get::<String, _>("role")?)
                        .bind(&key_id)
                        .bind(now.saturating_add(ttl))
                        .execute(&mut *tx).await?;
                    made = true;
                }
            }
            tx.commit().await?;
            made
        });
        Ok(made.then_some(token))
    }

    /// Whom an unspent, unexpired sign-in ticket signs in as: (tenant,
    /// admin, role), without spending it (the page asks before a link
    /// replaces a session the browser already has).
    pub async fn page_ticket(
        &self,
        ticket: &str,
        now: i64,
    ) -> Result<Option<(String, String, String)>, StoreError> {
        let row = on_pool!(self, p => {
            match sqlx::query("SELECT s.tenant_id, s.admin, s.role FROM page_sessions s JOIN api_keys k ON k.id = s.key_id WHERE s.token_hash = $1 AND s.kind = 'ticket' AND s.expires_at > $2 AND k.revoked_at IS NULL")
                .bind(hash(ticket)).bind(now).fetch_optional(p).await? {
                Some(r) => Some((r.try_get("tenant_id")?, r.try_get("admin")?, r.try_get("role")?)),
                None => None,
            }
        });
        Ok(row)
    }

    /// End the page sessions of `tenant_id` (of one admin, when named), and
    /// their unused tickets: the platform signs out an admin it removed or
    /// demoted. Connections they started and have not finished go too (a
    /// consent still open at the provider, an organisation not yet picked),
    /// in the same transaction: someone signed out must not connect the
    /// tenant's books a minute later by finishing a flow begun before. A
    /// pick is expired rather than deleted, so the daemon's purge removes
    /// its grant's links at the provider with its tokens
    /// ([`Store::take_abandoned_picks`]). Returns how many sessions and
    /// tickets ended.
    pub async fn end_page_sessions(
        &self,
        tenant_id: &str,
        admin: Option<&str>,
    ) -> Result<u64, StoreError> {
        let n = on_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            let n = sqlx::query("DELETE FROM page_sessions WHERE tenant_id = $1 AND ($2 IS NULL OR admin = $2)")
                .bind(tenant_id).bind(admin).execute(&mut *tx).await?.rows_affected();
            for end in END_UNFINISHED_FLOWS {
                sqlx::query(end).bind(Some(tenant_id)).bind(admin).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            n
        });
        Ok(n)
    }

    /// The page session a token names: (tenant, admin, role), while it has
    /// not expired and the key that asked for it is not revoked.
    pub async fn page_session(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Option<(String, String, String)>, StoreError> {
        let row = on_pool!(self, p => {
            match sqlx::query("SELECT s.tenant_id, s.admin, s.role FROM page_sessions s JOIN api_keys k ON k.id = s.key_id WHERE s.token_hash = $1 AND s.kind = 'session' AND s.expires_at > $2 AND k.revoked_at IS NULL")
                .bind(hash(token)).bind(now).fetch_optional(p).await? {
                Some(r) => Some((r.try_get("tenant_id")?, r.try_get("admin")?, r.try_get("role")?)),
                None => None,
            }
        });
        Ok(row)
    }

    /// End a page session (sign out). False when there was none.
    pub async fn end_page_session(&self, token: &str) -> Result<bool, StoreError> {
        let n = on_pool!(self, p => sqlx::query("DELETE FROM page_sessions WHERE token_hash = $1 AND kind = 'session'")
            .bind(hash(token)).execute(p).await?.rows_affected());
        Ok(n == 1)
    }

    /// A tenant's audit log (or everyone's), newest first.
    pub async fn audit_log(
        &self,
        tenant_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.audit_page(tenant_id, None, limit).await
    }

    /// A page of the audit log, newest first: the `limit` entries older
    /// than entry `before` (its [`AuditEntry::id`]; `None`: the newest).
    pub async fn audit_page(
        &self,
        tenant_id: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT id, at, actor, tenant_id, action, detail FROM audit_log WHERE ($1 IS NULL OR tenant_id = $1) AND id < $3 ORDER BY id DESC LIMIT $2")
            .bind(tenant_id)
            .bind(limit)
            .bind(before.unwrap_or(i64::MAX))
            .fetch_all(p)
            .await?),
        )
    }
}
