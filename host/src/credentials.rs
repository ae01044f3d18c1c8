//! Connection credentials for the `http` capability: [`TokenManager`]
//! implements [`CredentialProvider`] over the store's encrypted tokens.
//!
//! - `bearer` hands out the stored access token, refreshing it first when
//!   it expires within the margin (120 s by default).
//! - Refreshes are single-flight per connection: an async mutex per
//!   connection in this process, and across processes the store's
//!   [`TokenLease`] (PostgreSQL: the connection
//!   row `FOR UPDATE` inside a transaction; SQLite is one process). After
//!   taking the locks the row is re-read, so a refresh another task or
//!   daemon already did is reused, not repeated.
//! - The rotated refresh token is committed before the new access token is
//!   handed out. A refresh whose answer is lost (network error, timeout,
//!   5xx) is retried with the same old refresh token: Xero keeps a
//!   rotated-out refresh token usable for 30 minutes and answers it with
//!   the current token set.
//! - `invalid_grant` puts the connection in `needs-reauth` (kept, not
//!   deleted), records a `needs-reauth` event and publishes it on the
//!   [`EventBus`].
//!
//! Tokens never appear in logs or errors.

use crate::capabilities::http::{Credential, CredentialError, CredentialProvider};
use crate::connections::{Clock, DEFAULT_EXPIRES_IN, DisconnectReport, EventBus};
use crate::crypto::KeyRing;
use crate::oauth::{OAuthError, OAuthProvider, Providers};
use crate::store::{
    Connection, ConnectionEvent, ConnectionState, Store, StoreError, StoredTokens, TokenLease,
    TokenSet, event_kind,
};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// When and how to refresh.
#[derive(Debug, Clone)]
pub struct RefreshPolicy {
    /// Refresh when the access token expires within this many seconds.
    pub margin_secs: i64,
    /// Attempts of one refresh when the answer is lost (same refresh token).
    pub attempts: u32,
    /// Pause before the first retry (doubles each time).
    pub backoff: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            margin_secs: 120,
            attempts: 4,
            backoff: Duration::from_millis(250),
        }
    }
}

/// Counters, for tests and metrics.
#[derive(Debug, Default)]
pub struct TokenStats {
    /// Refreshes this process sent that succeeded.
    pub refreshes: std::sync::atomic::AtomicU64,
    /// Refresh attempts whose answer was lost.
    pub lost_answers: std::sync::atomic::AtomicU64,
    /// Refreshes avoided because the row was already fresh after the lock.
    pub reused: std::sync::atomic::AtomicU64,
}

/// What one refresh under a lease came to.
enum Refreshed {
    /// New tokens, written into the lease.
    Tokens(TokenSet),
    /// `invalid_grant`: state set in the lease, with the event to publish after commit.
    NeedsReauth(String, Option<ConnectionEvent>),
    /// No answer or not stored: nothing changed.
    Failed(CredentialError),
}

/// Hands out and refreshes connections' access tokens.
pub struct TokenManager {
    store: Store,
    keys: Arc<KeyRing>,
    providers: Arc<Providers>,
    clock: Clock,
    events: EventBus,
    policy: RefreshPolicy,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Token leases held at once (see [`LEASES_AT_ONCE`]).
    leases: Arc<tokio::sync::Semaphore>,
    stats: TokenStats,
}

/// How many connections' token leases this daemon holds at once. On
/// PostgreSQL a lease is an open transaction on a pooled connection, held
/// across the call to the provider (up to its timeout, and retries): after
/// an outage, when every connection's token expires together, refreshes
/// without a bound took the whole pool (16) and starved ingest, claims and
/// lease renewals. The others wait here, holding no database connection.
pub const LEASES_AT_ONCE: usize = 4;

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("store", &self.store.kind())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> CredentialError {
    CredentialError::Unavailable(e.to_string())
}

fn refused_state(c: &Connection) -> CredentialError {
    let why = c.state_reason.clone().unwrap_or_default();
    match c.state {
        ConnectionState::Disconnected => CredentialError::NeedsReauth(format!(
            "the connection was disconnected; reconnect it ({why})"
        )),
        _ => CredentialError::NeedsReauth(format!(
            "the accounting system no longer accepts this connection's authorisation; an admin must reconnect ({why})"
        )),
    }
}

impl TokenManager {
    /// A manager over `store`.
    pub fn new(
        store: Store,
        keys: Arc<KeyRing>,
        providers: Arc<Providers>,
        clock: Clock,
        events: EventBus,
        policy: RefreshPolicy,
    ) -> Self {
        Self {
            store,
            keys,
            providers,
            clock,
            events,
            policy,
            locks: Mutex::new(HashMap::new()),
            leases: Arc::new(tokio::sync::Semaphore::new(LEASES_AT_ONCE)),
            stats: TokenStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &TokenStats {
        &self.stats
    }

    fn lock_of(&self, connection_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        g.entry(connection_id.to_string()).or_default().clone()
    }

    fn fresh(&self, t: &TokenSet) -> bool {
        t.expires_at - self.policy.margin_secs > self.clock.now_secs()
    }

    fn credential(t: &TokenSet) -> Credential {
        Credential {
            access_token: t.access_token.expose().to_string(),
        }
    }

    /// Refresh under the locks unless the re-read row shows it is no longer
    /// needed: `rejected` is the token the provider refused (forces a
    /// refresh if it is still the stored one).
    async fn refresh_locked(
        &self,
        connection_id: &str,
        rejected: Option<&str>,
    ) -> Result<Credential, CredentialError> {
        let m = self.lock_of(connection_id);
        let _g = m.lock().await;
        // Cheap re-check without a database lock: another task of this process may have refreshed.
        if let Some((ConnectionState::Active, Some(s))) = self
            .store
            .token_snapshot(&self.keys, connection_id)
            .await
            .map_err(unavailable)?
            && self.usable(&s, rejected)
        {
            self.stats
                .reused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(Self::credential(&s.tokens));
        }
        let _slot = self.leases.acquire().await.map_err(unavailable)?;
        let mut lease = self
            .store
            .lock_tokens(connection_id)
            .await
            .map_err(|e| match e {
                StoreError::NotFound(w) => {
                    CredentialError::NeedsReauth(format!("{w} does not exist"))
                }
                e => unavailable(e),
            })?;
        let (conn, stored) = lease.read(&self.keys).await.map_err(unavailable)?;
        if conn.state != ConnectionState::Active {
            return Err(refused_state(&conn));
        }
        let stored = stored.ok_or_else(|| {
            CredentialError::NeedsReauth("the connection holds no tokens; reconnect it".into())
        })?;
        if self.usable(&stored, rejected) {
            // Another daemon refreshed while we waited for the row lock.
            self.stats
                .reused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(Self::credential(&stored.tokens));
        }
        let provider = self.providers.get(&conn.connector_id).ok_or_else(|| {
            unavailable(format!(
                "no OAuth provider is configured for {}",
                conn.connector_id
            ))
        })?;
        match self
            .refresh_in_lease(&mut lease, &conn, &stored, &provider)
            .await
        {
            Refreshed::Tokens(t) => {
                // Durable before anyone uses the new access token.
                lease.commit().await.map_err(unavailable)?;
                Ok(Self::credential(&t))
            }
            Refreshed::NeedsReauth(why, ev) => {
                lease.commit().await.map_err(unavailable)?;
                if let Some(ev) = ev {
                    self.events.emit(ev);
                }
                Err(CredentialError::NeedsReauth(why))
            }
            Refreshed::Failed(e) => {
                drop(lease);
                // Replaced meanwhile (an admin reconnected while the old
                // grant was being refreshed): the new grant's token serves
                // this call, rather than failing it.
                if let Ok(Some((ConnectionState::Active, Some(s)))) =
                    self.store.token_snapshot(&self.keys, connection_id).await
                    && self.usable(&s, rejected)
                {
                    return Ok(Self::credential(&s.tokens));
                }
                Err(e)
            }
        }
    }

    fn usable(&self, s: &StoredTokens, rejected: Option<&str>) -> bool {
        match rejected {
            Some(r) => s.tokens.access_token.expose() != r && self.fresh(&s.tokens),
            None => self.fresh(&s.tokens),
        }
    }

    /// Send the refresh (retrying a lost answer with the same refresh
    /// token), then write the new tokens into the lease, or mark the
    /// connection `needs-reauth` on `invalid_grant`. The caller commits.
    async fn refresh_in_lease(
        &self,
        lease: &mut TokenLease,
        conn: &Connection,
        stored: &StoredTokens,
        provider: &OAuthProvider,
    ) -> Refreshed {
        let Some(refresh_token) = stored.tokens.refresh_token.clone() else {
            return self
                .mark_needs_reauth(
                    lease,
                    conn,
                    "the grant has no refresh token (offline_access)",
                )
                .await;
        };
        let mut delay = self.policy.backoff;
        let mut attempt = 0;
        let answer = loop {
            attempt += 1;
            match provider.refresh(&refresh_token).await {
                Ok(a) => break a,
                Err(OAuthError::InvalidGrant(d)) => {
                    let why = if d.is_empty() {
                        "the accounting system refused the refresh token (invalid_grant)"
                            .to_string()
                    } else {
                        format!(
                            "the accounting system refused the refresh token (invalid_grant: {d})"
                        )
                    };
                    return self.mark_needs_reauth(lease, conn, &why).await;
                }
                Err(OAuthError::Transient(why)) if attempt < self.policy.attempts.max(1) => {
                    self.stats
                        .lost_answers
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(connection = %conn.id, attempt, error = %why,
                        "token refresh got no answer; retrying with the same refresh token");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                }
                Err(e) => {
                    if matches!(e, OAuthError::Transient(_)) {
                        self.stats
                            .lost_answers
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::warn!(connection = %conn.id, error = %e, "token refresh failed");
                    return Refreshed::Failed(unavailable(format!("token refresh failed: {e}")));
                }
            }
        };
        let now = self.clock.now_secs();
        let tokens = TokenSet {
            access_token: answer.access_token,
            // A provider that does not rotate keeps the old refresh token valid.
            refresh_token: answer.refresh_token.or(Some(refresh_token)),
            expires_at: now.saturating_add(answer.expires_in.unwrap_or(DEFAULT_EXPIRES_IN)),
        };
        if let Err(e) = lease.save(&self.keys, &tokens, now).await {
            // Not stored: the old refresh token stays valid for the grace period.
            return Refreshed::Failed(unavailable(e));
        }
        self.stats
            .refreshes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(connection = %conn.id, expires_at = tokens.expires_at, "access token refreshed");
        Refreshed::Tokens(tokens)
    }

    async fn mark_needs_reauth(
        &self,
        lease: &mut TokenLease,
        conn: &Connection,
        why: &str,
    ) -> Refreshed {
        let now = self.clock.now_secs();
        tracing::warn!(connection = %conn.id, tenant = %conn.tenant_id, reason = %why, "connection needs re-authorisation");
        match lease
            .set_state(
                ConnectionState::NeedsReauth,
                event_kind::NEEDS_REAUTH,
                why,
                now,
            )
            .await
        {
            Ok(ev) => Refreshed::NeedsReauth(why.to_string(), Some(ev)),
            // Reconnected meanwhile: the refused grant is the old one, and
            // the new one is not to be judged by it. Tried again, the call
            // uses the new grant.
            Err(e @ StoreError::Conflict(_)) => {
                tracing::info!(connection = %conn.id, error = %e, "the refused grant was replaced meanwhile");
                Refreshed::Failed(unavailable(e))
            }
            Err(e) => {
                tracing::error!(connection = %conn.id, error = %e, "recording needs-reauth failed");
                Refreshed::NeedsReauth(why.to_string(), None)
            }
        }
    }

    /// The stored access token of a connection, refreshed first when it
    /// is about to expire.
    pub async fn access_token(&self, connection_id: &str) -> Result<Credential, CredentialError> {
        let snap = self
            .store
            .token_snapshot(&self.keys, connection_id)
            .await
            .map_err(unavailable)?;
        match snap {
            None => Err(CredentialError::NeedsReauth(format!(
                "connection {connection_id} does not exist"
            ))),
            Some((ConnectionState::Active, Some(s))) if self.fresh(&s.tokens) => {
                Ok(Self::credential(&s.tokens))
            }
            Some((ConnectionState::Active, _)) => self.refresh_locked(connection_id, None).await,
            Some((_, _)) => {
                let conn = self
                    .store
                    .connection(connection_id)
                    .await
                    .map_err(unavailable)?
                    .ok_or_else(|| CredentialError::NeedsReauth("gone".into()))?;
                Err(refused_state(&conn))
            }
        }
    }

    /// Revoke at the provider and drop the tokens (see
    /// [`crate::connections::Connections::disconnect`]). Returns what was done
    /// and the `disconnected` event (None when it already was).
    pub async fn revoke_and_drop(
        &self,
        connection_id: &str,
        actor: &str,
        provider: Option<&OAuthProvider>,
    ) -> Result<(DisconnectReport, Option<ConnectionEvent>), StoreError> {
        let m = self.lock_of(connection_id);
        let _g = m.lock().await;
        let _slot = self
            .leases
            .acquire()
            .await
            .map_err(|e| StoreError::Conflict(e.to_string()))?;
        let mut lease = self.store.lock_tokens(connection_id).await?;
        let (conn, stored) = lease.read(&self.keys).await?;
        let mut report = DisconnectReport::default();
        if conn.state == ConnectionState::Disconnected {
            return Ok((report, None));
        }
        let held_grant = stored.is_some();
        match (provider, stored) {
            // A connection without a grant (a connector that needs no
            // OAuth): nothing to revoke anywhere.
            (None, None) => {}
            (None, Some(_)) => report.problems.push(format!(
                "no OAuth provider is configured for {}; nothing was revoked there",
                conn.connector_id
            )),
            (Some(_), None) => report.problems.push("the connection held no tokens".into()),
            (Some(p), Some(mut s)) => {
                // The organisation link needs a valid access token.
                if conn.state == ConnectionState::Active && !self.fresh(&s.tokens) {
                    match self.refresh_in_lease(&mut lease, &conn, &s, p).await {
                        Refreshed::Tokens(t) => s.tokens = t,
                        Refreshed::NeedsReauth(why, _) => report
                            .problems
                            .push(format!("the grant was already refused: {why}")),
                        Refreshed::Failed(e) => report
                            .problems
                            .push(format!("refreshing before revocation: {e}")),
                    }
                }
                // One provider user may connect the same organisation for
                // two tenants here, and the provider may hand back the same
                // link (Xero: one per user, app and organisation). Removing
                // it, by deleting it or by revoking this grant (at Xero a
                // revocation removes the user's connections), would cut the
                // other tenant off: both are left in place at the provider
                // (the tokens are still dropped here), and this is said.
                let kept = match &conn.external_connection_id {
                    None => None,
                    Some(link) => match self
                        .store
                        .organisations_in_use(self.clock.now_secs(), Some(&conn.id))
                        .await
                    {
                        Ok(in_use) if in_use.contains(link) => {
                            Some("another connection here uses the same link to the organisation")
                        }
                        Ok(_) => None,
                        Err(e) => {
                            tracing::warn!(connection = %conn.id, error = %e, "the organisation link and the grant were left in place: the store could not say whether another connection uses them");
                            Some(
                                "whether another connection here uses the same link could not be read",
                            )
                        }
                    },
                };
                if let Some(why) = kept {
                    report.problems.push(format!(
                        "the link to the organisation and the access were left in place at the accounting system: {why}"
                    ));
                } else {
                    if let Some(link) = &conn.external_connection_id {
                        match p.delete_connection(&s.tokens.access_token, link).await {
                            Ok(removed) => report.organisation_link_removed = removed,
                            Err(e) => report.problems.push(disconnect_problem(
                                "The link to the organisation was not removed",
                                &e,
                            )),
                        }
                    }
                    if let Some(rt) = &s.tokens.refresh_token {
                        match p.revoke(rt).await {
                            Ok(done) => report.token_revoked = done,
                            Err(e) => report
                                .problems
                                .push(disconnect_problem("The access was not revoked", &e)),
                        }
                    }
                }
            }
        }
        let detail = if !held_grant && report.problems.is_empty() {
            format!("{actor} disconnected")
        } else if report.problems.is_empty() {
            format!("{actor} disconnected; the grant was revoked at the accounting system")
        } else {
            format!(
                "{actor} disconnected; at the accounting system: {}",
                report.problems.join("; ")
            )
        };
        let ev = lease
            .disconnect(actor, &detail, self.clock.now_secs())
            .await?;
        lease.commit().await?;
        Ok((report, Some(ev)))
    }
}

/// What went wrong at the provider while disconnecting, in words: what
/// was not done, then what the provider said.
fn disconnect_problem(what: &str, e: &crate::oauth::OAuthError) -> String {
    use crate::oauth::OAuthError as E;
    match e {
        // A status in words (`oauth::http_words`), or why no answer came.
        E::Transient(m) => format!("{what}: {m}"),
        E::Refused { error, description } if description.is_empty() => {
            format!("{what}: the accounting system refused ({error})")
        }
        E::Refused { error, description } => {
            format!("{what}: the accounting system refused ({error}: {description})")
        }
        E::InvalidGrant(_) => format!("{what}: the accounting system had already ended the access"),
        E::Config(m) => format!("{what}: ledgerport's OAuth set-up for it is wrong ({m})"),
    }
}

#[async_trait]
impl CredentialProvider for TokenManager {
    async fn bearer(&self, connection_id: &str) -> Result<Credential, CredentialError> {
        self.access_token(connection_id).await
    }

    /// The same freshness rule as [`TokenManager::access_token`]; a token
    /// about to expire goes through the refresh path instead.
    fn ahead(&self, access_token: &str, expires_at: i64) -> Option<Credential> {
        (expires_at - self.policy.margin_secs > self.clock.now_secs()).then(|| Credential {
            access_token: access_token.to_string(),
        })
    }

    async fn refresh(
        &self,
        connection_id: &str,
        rejected: &Credential,
    ) -> Result<Credential, CredentialError> {
        self.refresh_locked(connection_id, Some(&rejected.access_token))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::disconnect_problem;
    use crate::oauth::{OAuthError, http_words};

    /// What a disconnect could not do at the provider is said in words,
    /// the provider's status after them (once "answered HTTP 401").
    #[test]
    fn disconnect_problems_are_words() {
        let p = disconnect_problem(
            "The link to the organisation was not removed",
            &OAuthError::Transient(http_words(401)),
        );
        assert_eq!(
            p,
            "The link to the organisation was not removed: it no longer accepts ledgerport's access (HTTP 401)"
        );
        let p = disconnect_problem(
            "The access was not revoked",
            &OAuthError::Transient(http_words(503)),
        );
        assert_eq!(
            p,
            "The access was not revoked: it had a problem on its side (HTTP 503)"
        );
        let p = disconnect_problem(
            "The access was not revoked",
            &OAuthError::Refused {
                error: "unsupported_token_type".into(),
                description: String::new(),
            },
        );
        assert_eq!(
            p,
            "The access was not revoked: the accounting system refused (unsupported_token_type)"
        );
    }
}
