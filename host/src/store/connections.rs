//! Connections and everything that hangs off them: the encrypted token row
//! (with a [`TokenLease`] that serialises refreshes across processes), the
//! `connection_events` journal a later dispatch layer turns into pauses and
//! e-mails, the one-time OAuth `state`s, the pending organisation picks,
//! and re-encryption under a new key.
//!
//! Secrets cross this API as [`Secret`]s and are stored only as ciphertexts
//! bound to their row (see [`crate::crypto`]).

use super::{Pool, Store, StoreError, StoreKind, on_pool};
use crate::crypto::{KeyRing, Secret};
use serde::{Deserialize, Serialize};
use sqlx::Row;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectionState {
    /// Tokens are held; deliveries may run.
    Active,
    /// The provider refused the grant (`invalid_grant`); an admin must reconnect.
    NeedsReauth,
    /// An admin disconnected it; tokens were revoked and dropped.
    Disconnected,
}

impl ConnectionState {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Active => "active",
            ConnectionState::NeedsReauth => "needs-reauth",
            ConnectionState::Disconnected => "disconnected",
        }
    }
    /// Parse the stored text.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(ConnectionState::Active),
            "needs-reauth" => Some(ConnectionState::NeedsReauth),
            "disconnected" => Some(ConnectionState::Disconnected),
            _ => None,
        }
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tenant's connection to one connector's provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Connection {
    /// ledgerport's id.
    pub id: String,
    /// The platform tenant.
    pub tenant_id: String,
    /// The connector (plugin id).
    pub connector_id: String,
    /// State.
    pub state: ConnectionState,
    /// The provider's organisation id (Xero tenant id).
    pub external_tenant_id: Option<String>,
    /// The provider's organisation name.
    pub external_tenant_name: Option<String>,
    /// The provider's id of the app-to-organisation link (Xero connection id).
    pub external_connection_id: Option<String>,
    /// The provider's id of the grant (Xero `authentication_event_id`).
    pub auth_event_id: Option<String>,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// The admin who connected it last.
    pub connected_by: Option<String>,
    /// When it was connected last (Unix seconds).
    pub connected_at: Option<i64>,
    /// When it was disconnected (Unix seconds), while disconnected.
    pub disconnected_at: Option<i64>,
    /// Why it is in its state, in words (e.g. the provider's refusal).
    pub state_reason: Option<String>,
    /// Last change (Unix seconds).
    pub updated_at: i64,
    /// Switched to another organisation since its account mappings were
    /// last confirmed: nothing is sent until an admin has checked and
    /// confirmed them (they were chosen from the other organisation's
    /// accounts).
    pub mappings_review: bool,
    /// While a review is due, the organisation the mappings were made for
    /// (connecting back to it ends the review).
    pub mappings_org: Option<String>,
}

#[derive(sqlx::FromRow)]
pub(super) struct ConnectionRow {
    id: String,
    tenant_id: String,
    connector_id: String,
    state: String,
    external_tenant_id: Option<String>,
    external_tenant_name: Option<String>,
    external_connection_id: Option<String>,
    auth_event_id: Option<String>,
    scopes: String,
    connected_by: Option<String>,
    connected_at: Option<i64>,
    disconnected_at: Option<i64>,
    state_reason: Option<String>,
    updated_at: i64,
    mappings_review: i64,
    mappings_org: Option<String>,
}

/// Store a connection's (encrypted) tokens, bumping their generation:
/// `$1` connection, `$2` key id, `$3` access, `$4` refresh, `$5` expiry,
/// `$6` now.
const UPSERT_TOKENS: &str = "INSERT INTO connection_tokens
       (connection_id, key_id, access_token, refresh_token, expires_at, refreshed_at, generation)
     VALUES ($1, $2, $3, $4, $5, $6, 1)
     ON CONFLICT (connection_id) DO UPDATE SET
       key_id = excluded.key_id, access_token = excluded.access_token,
       refresh_token = excluded.refresh_token, expires_at = excluded.expires_at,
       refreshed_at = excluded.refreshed_at,
       generation = connection_tokens.generation + 1";

pub(super) const CONNECTION_COLUMNS: &str = "id, tenant_id, connector_id, state, external_tenant_id, \
    external_tenant_name, external_connection_id, auth_event_id, scopes, connected_by, \
    connected_at, disconnected_at, state_reason, updated_at, mappings_review, mappings_org";

impl From<ConnectionRow> for Connection {
    fn from(r: ConnectionRow) -> Self {
        Connection {
            id: r.id,
            tenant_id: r.tenant_id,
            connector_id: r.connector_id,
            // An unknown state (a newer daemon's) reads as needing attention.
            state: ConnectionState::parse(&r.state).unwrap_or(ConnectionState::NeedsReauth),
            external_tenant_id: r.external_tenant_id,
            external_tenant_name: r.external_tenant_name,
            external_connection_id: r.external_connection_id,
            auth_event_id: r.auth_event_id,
            scopes: r.scopes.split_whitespace().map(String::from).collect(),
            connected_by: r.connected_by,
            connected_at: r.connected_at,
            disconnected_at: r.disconnected_at,
            state_reason: r.state_reason,
            updated_at: r.updated_at,
            mappings_review: r.mappings_review != 0,
            mappings_org: r.mappings_org,
        }
    }
}

/// A connection's tokens, decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSet {
    /// The access token.
    pub access_token: Secret,
    /// The refresh token, when the grant has one.
    pub refresh_token: Option<Secret>,
    /// When the access token expires (Unix seconds).
    pub expires_at: i64,
}

/// A token row as stored.
#[derive(Debug, Clone)]
pub struct StoredTokens {
    /// The tokens.
    pub tokens: TokenSet,
    /// When they were last written (Unix seconds).
    pub refreshed_at: i64,
    /// Bumped by every write; tells a re-read whether another refresh happened.
    pub generation: i64,
    /// The key that encrypts them.
    pub key_id: String,
}

/// The provider organisation a connection points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Organisation {
    /// The provider's organisation id (Xero tenant id).
    pub tenant_id: String,
    /// Its name.
    pub name: String,
    /// The provider's id of the app-to-organisation link (Xero connection id).
    pub connection_id: Option<String>,
}

/// What a completed authorisation stores.
#[derive(Debug, Clone)]
pub struct NewConnection {
    /// The platform tenant.
    pub tenant_id: String,
    /// The connector.
    pub connector_id: String,
    /// The admin who connected.
    pub admin: String,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// The organisation chosen.
    pub organisation: Organisation,
    /// The provider's grant id.
    pub auth_event_id: Option<String>,
    /// The tokens; `None` for a connector that authenticates without an
    /// OAuth grant (its requests carry no bearer token; see
    /// [`crate::connections::Connections::connect_without_grant`]).
    pub tokens: Option<TokenSet>,
}

/// The outcome of [`Store::finish_connect`].
#[derive(Debug, Clone)]
pub struct Connected {
    /// The connection as now stored.
    pub connection: Connection,
    /// Whether an earlier connection of the tenant and connector was reused.
    pub reconnected: bool,
    /// Tokens of an earlier, different grant that were replaced (revoke them).
    pub replaced: Option<TokenSet>,
    /// The event recorded.
    pub event: ConnectionEvent,
    /// The tenant's connection to the connector as it was before (None:
    /// a first connection), e.g. the organisation it was connected to.
    pub previous: Option<Connection>,
}

/// A row of `connection_events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionEvent {
    /// Sequence number.
    pub id: i64,
    /// The connection.
    pub connection_id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// What happened: `connected`, `reconnected`, `needs-reauth`, `disconnected`.
    pub kind: String,
    /// Details in words (never secrets).
    pub detail: String,
    /// When (Unix seconds).
    pub created_at: i64,
}

/// Event kinds recorded by this module.
pub mod event_kind {
    /// A first connection.
    pub const CONNECTED: &str = "connected";
    /// A connection reconnected (mappings kept).
    pub const RECONNECTED: &str = "reconnected";
    /// The grant was refused; an admin must reconnect.
    pub const NEEDS_REAUTH: &str = "needs-reauth";
    /// An admin disconnected.
    pub const DISCONNECTED: &str = "disconnected";
}

/// A pending authorisation, as read back when its `state` returns.
#[derive(Debug, Clone)]
pub struct OAuthStateRecord {
    /// The tenant it is for.
    pub tenant_id: String,
    /// The connector.
    pub connector_id: String,
    /// The admin who started it.
    pub admin: String,
    /// The PKCE verifier, when PKCE is used.
    pub pkce_verifier: Option<Secret>,
    /// When the state stops being accepted (Unix seconds).
    pub expires_at: i64,
}

/// Why a returning `state` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateRefusal {
    /// Never issued (or garbage).
    #[error("state is unknown: this authorisation was not started here")]
    Unknown,
    /// Already used once.
    #[error("state was already used: start the connection again")]
    AlreadyUsed,
    /// Older than its expiry.
    #[error("state has expired: start the connection again")]
    Expired,
}

/// A grant that covers several organisations, waiting for the admin's pick.
#[derive(Debug, Clone)]
pub struct PendingPick {
    /// The tenant.
    pub tenant_id: String,
    /// The connector.
    pub connector_id: String,
    /// The admin.
    pub admin: String,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// The provider's grant id.
    pub auth_event_id: Option<String>,
    /// The organisations to pick from.
    pub organisations: Vec<Organisation>,
    /// The grant's tokens.
    pub tokens: TokenSet,
    /// When the pick stops being accepted (Unix seconds).
    pub pick_expires_at: i64,
}

/// A stored organisation pick as read, its tokens still encrypted.
#[derive(sqlx::FromRow)]
struct PickRow {
    pick_hash: String,
    tenant_id: String,
    connector_id: String,
    admin: String,
    scopes: String,
    auth_event_id: Option<String>,
    organisations: String,
    access_token: String,
    refresh_token: Option<String>,
    expires_at: i64,
    pick_expires_at: i64,
}

/// The columns of a [`PickRow`].
const PICK_COLUMNS: &str = "pick_hash, tenant_id, connector_id, admin, scopes, auth_event_id, \
                            organisations, access_token, refresh_token, expires_at, pick_expires_at";

impl PickRow {
    /// The pick, its organisations parsed and its tokens decrypted.
    fn decode(self, keys: &KeyRing) -> Result<PendingPick, StoreError> {
        let organisations: Vec<Organisation> = serde_json::from_str(&self.organisations)
            .map_err(|e| StoreError::Conflict(format!("stored organisations unreadable: {e}")))?;
        let access_token =
            keys.decrypt(&self.access_token, &ctx_pending_access(&self.pick_hash))?;
        let refresh_token = match &self.refresh_token {
            Some(r) => Some(keys.decrypt(r, &ctx_pending_refresh(&self.pick_hash))?),
            None => None,
        };
        Ok(PendingPick {
            tenant_id: self.tenant_id,
            connector_id: self.connector_id,
            admin: self.admin,
            scopes: self.scopes.split_whitespace().map(String::from).collect(),
            auth_event_id: self.auth_event_id,
            organisations,
            tokens: TokenSet {
                access_token,
                refresh_token,
                expires_at: self.expires_at,
            },
            pick_expires_at: self.pick_expires_at,
        })
    }
}

/// Encryption context of a connection's access token.
pub fn ctx_access(connection_id: &str) -> String {
    format!("connection_tokens.access:{connection_id}")
}
/// Encryption context of a connection's refresh token.
pub fn ctx_refresh(connection_id: &str) -> String {
    format!("connection_tokens.refresh:{connection_id}")
}
fn ctx_pkce(state_hash: &str) -> String {
    format!("oauth_states.pkce:{state_hash}")
}
fn ctx_pending_access(h: &str) -> String {
    format!("oauth_pending.access:{h}")
}
fn ctx_pending_refresh(h: &str) -> String {
    format!("oauth_pending.refresh:{h}")
}

#[derive(sqlx::FromRow)]
pub(super) struct TokenRow {
    key_id: String,
    access_token: String,
    refresh_token: Option<String>,
    expires_at: i64,
    refreshed_at: i64,
    generation: i64,
}

/// A token row with its connection's state (see `Store::token_snapshot`).
#[derive(sqlx::FromRow)]
struct SnapshotRow {
    #[sqlx(flatten)]
    token: TokenRow,
    conn_state: Option<String>,
}

impl TokenRow {
    pub(super) fn decrypt(
        self,
        keys: &KeyRing,
        connection_id: &str,
    ) -> Result<StoredTokens, StoreError> {
        let access_token = keys.decrypt(&self.access_token, &ctx_access(connection_id))?;
        let refresh_token = match &self.refresh_token {
            Some(c) => Some(keys.decrypt(c, &ctx_refresh(connection_id))?),
            None => None,
        };
        Ok(StoredTokens {
            tokens: TokenSet {
                access_token,
                refresh_token,
                expires_at: self.expires_at,
            },
            refreshed_at: self.refreshed_at,
            generation: self.generation,
            key_id: self.key_id,
        })
    }
}

pub(super) const TOKEN_COLUMNS: &str =
    "key_id, access_token, refresh_token, expires_at, refreshed_at, generation";

/// Holds a connection's token row for one refresh: on PostgreSQL an open
/// transaction with the connection row locked (`SELECT ... FOR UPDATE`), so
/// a second daemon waits and then re-reads what the first one wrote. On
/// SQLite (one daemon) the caller's in-process lock serialises refreshes,
/// but not a reconnect (the OAuth callback does not take it): each of the
/// lease's writes is one short write transaction that first checks the
/// connection was not reconnected since [`TokenLease::read`] (else
/// [`StoreError::Conflict`]: a refresh of the old grant must not overwrite
/// the new grant's tokens, nor its `invalid_grant` mark a fresh connection
/// as needing re-authorisation). Short, because a lease may be held across
/// calls to the provider, and SQLite has one writer. Dropping a lease
/// without [`TokenLease::commit`] rolls back (PostgreSQL).
pub struct TokenLease {
    connection_id: String,
    conn: LeaseConn,
}

enum LeaseConn {
    Sqlite {
        pool: sqlx::SqlitePool,
        /// `connected_at` as [`TokenLease::read`] saw it.
        seen: Option<Option<i64>>,
    },
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// Reads on the lease.
macro_rules! on_lease {
    ($lease:expr, $c:ident => $body:expr) => {
        match &mut $lease.conn {
            LeaseConn::Sqlite { pool, .. } => {
                let $c = &*pool;
                $body
            }
            LeaseConn::Postgres(tx) => {
                let $c = &mut **tx;
                $body
            }
        }
    };
}

/// One write on the lease (`$body` may hold several statements): on
/// SQLite in a write transaction of its own that first checks the
/// connection is as it was read; on PostgreSQL in the lease's transaction.
macro_rules! on_lease_write {
    ($lease:expr, $c:ident => $body:expr) => {{
        match &mut $lease.conn {
            LeaseConn::Sqlite { pool, seen } => {
                let mut t = checked_write(pool, &$lease.connection_id, *seen).await?;
                let out = {
                    let $c = &mut *t;
                    $body
                };
                t.commit().await?;
                out
            }
            LeaseConn::Postgres(tx) => {
                let $c = &mut **tx;
                $body
            }
        }
    }};
}

/// A SQLite write transaction in which connection `id` is as a lease read
/// it (`seen`: its `connected_at`; None when the lease never read it).
async fn checked_write(
    pool: &sqlx::SqlitePool,
    id: &str,
    seen: Option<Option<i64>>,
) -> Result<super::WriteTx<sqlx::Sqlite>, StoreError> {
    use super::BeginWrite;
    let mut t = pool.begin_write().await?;
    if let Some(seen) = seen {
        let now: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT connected_at FROM connections WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *t)
                .await?;
        if now.map(|r| r.0) != Some(seen) {
            return Err(StoreError::Conflict(format!(
                "connection {id} was reconnected or removed while its tokens were in use; the new state is kept"
            )));
        }
    }
    Ok(t)
}

/// Insert a `connection_events` row through any executor of either engine
/// and evaluate to the [`ConnectionEvent`] (with `?` on errors).
macro_rules! insert_event {
    ($ex:expr, $connection_id:expr, $tenant_id:expr, $kind:expr, $detail:expr, $now:expr) => {{
        let (connection_id, tenant_id, kind, detail, now): (&str, &str, &str, &str, i64) =
            ($connection_id, $tenant_id, $kind, $detail, $now);
        let row = sqlx::query(
            "INSERT INTO connection_events (connection_id, tenant_id, kind, detail, created_at)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(connection_id)
        .bind(tenant_id)
        .bind(kind)
        .bind(detail)
        .bind(now)
        .fetch_one($ex)
        .await?;
        let id: i64 = row.try_get(0)?;
        ConnectionEvent {
            id,
            connection_id: connection_id.into(),
            tenant_id: tenant_id.into(),
            kind: kind.into(),
            detail: detail.into(),
            created_at: now,
        }
    }};
}

impl TokenLease {
    /// The connection it holds.
    pub fn connection_id(&self) -> &str {
        &self.connection_id
    }

    /// Read the connection and its tokens (fresh, under the lock).
    pub async fn read(
        &mut self,
        keys: &KeyRing,
    ) -> Result<(Connection, Option<StoredTokens>), StoreError> {
        let id = self.connection_id.clone();
        let conn: Option<ConnectionRow> = on_lease!(self, c => {
            sqlx::query_as(&format!("SELECT {CONNECTION_COLUMNS} FROM connections WHERE id = $1"))
                .bind(&id)
                .fetch_optional(c)
                .await?
        });
        let conn: Connection = conn
            .ok_or_else(|| StoreError::NotFound(format!("connection {id}")))?
            .into();
        if let LeaseConn::Sqlite { seen, .. } = &mut self.conn {
            *seen = Some(conn.connected_at);
        }
        let row: Option<TokenRow> = on_lease!(self, c => {
            sqlx::query_as(&format!(
                "SELECT {TOKEN_COLUMNS} FROM connection_tokens WHERE connection_id = $1"
            ))
            .bind(&id)
            .fetch_optional(c)
            .await?
        });
        let tokens = match row {
            Some(r) => Some(r.decrypt(keys, &id)?),
            None => None,
        };
        Ok((conn, tokens))
    }

    /// Store new tokens (a refresh's answer), encrypted under the newest key.
    pub async fn save(
        &mut self,
        keys: &KeyRing,
        tokens: &TokenSet,
        now: i64,
    ) -> Result<(), StoreError> {
        let id = self.connection_id.clone();
        let access = keys.encrypt(tokens.access_token.expose(), &ctx_access(&id));
        let refresh = tokens
            .refresh_token
            .as_ref()
            .map(|r| keys.encrypt(r.expose(), &ctx_refresh(&id)));
        // The key that sealed them (the ring may change meanwhile).
        let key_id = KeyRing::key_of(&access).unwrap_or_default().to_string();
        on_lease_write!(self, c => {
            sqlx::query(UPSERT_TOKENS)
            .bind(&id)
            .bind(&key_id)
            .bind(&access)
            .bind(&refresh)
            .bind(tokens.expires_at)
            .bind(now)
            .execute(c)
            .await?;
        });
        Ok(())
    }

    /// Set the connection's state (with a reason in words) and record an event.
    pub async fn set_state(
        &mut self,
        state: ConnectionState,
        event_kind: &str,
        reason: &str,
        now: i64,
    ) -> Result<ConnectionEvent, StoreError> {
        let id = self.connection_id.clone();
        // The state and its event in one write.
        Ok(on_lease_write!(self, c => {
            let tenant: String = sqlx::query(
                "UPDATE connections SET state = $2, state_reason = $3, updated_at = $4
                 WHERE id = $1 RETURNING tenant_id",
            )
            .bind(&id)
            .bind(state.as_str())
            .bind(reason)
            .bind(now)
            .fetch_one(&mut *c)
            .await?
            .try_get(0)?;
            insert_event!(&mut *c, &id, &tenant, event_kind, reason, now)
        }))
    }

    /// Drop the tokens, mark the connection disconnected and record why
    /// (in one write: never a connection left active without its tokens).
    pub async fn disconnect(
        &mut self,
        actor: &str,
        detail: &str,
        now: i64,
    ) -> Result<ConnectionEvent, StoreError> {
        let id = self.connection_id.clone();
        Ok(on_lease_write!(self, c => {
            sqlx::query("DELETE FROM connection_tokens WHERE connection_id = $1")
                .bind(&id)
                .execute(&mut *c)
                .await?;
            let tenant: String = sqlx::query(
                "UPDATE connections SET state = 'disconnected', state_reason = $2,
                   disconnected_at = $3, updated_at = $3
                 WHERE id = $1 RETURNING tenant_id",
            )
            .bind(&id)
            .bind(format!("disconnected by {actor}"))
            .bind(now)
            .fetch_one(&mut *c)
            .await?
            .try_get(0)?;
            insert_event!(&mut *c, &id, &tenant, event_kind::DISCONNECTED, detail, now)
        }))
    }

    /// Make the changes durable and release the lock.
    pub async fn commit(self) -> Result<(), StoreError> {
        match self.conn {
            LeaseConn::Sqlite { .. } => Ok(()),
            LeaseConn::Postgres(tx) => Ok(tx.commit().await?),
        }
    }
}

impl Store {
    /// One connection by id.
    pub async fn connection(&self, id: &str) -> Result<Option<Connection>, StoreError> {
        let row: Option<ConnectionRow> = on_pool!(self, p => {
            sqlx::query_as(&format!("SELECT {CONNECTION_COLUMNS} FROM connections WHERE id = $1"))
                .bind(id)
                .fetch_optional(p)
                .await?
        });
        Ok(row.map(Into::into))
    }

    /// The connection of a tenant to a connector, if there ever was one.
    pub async fn connection_for(
        &self,
        tenant_id: &str,
        connector_id: &str,
    ) -> Result<Option<Connection>, StoreError> {
        let row: Option<ConnectionRow> = on_pool!(self, p => {
            sqlx::query_as(&format!(
                "SELECT {CONNECTION_COLUMNS} FROM connections WHERE tenant_id = $1 AND connector_id = $2"
            ))
            .bind(tenant_id)
            .bind(connector_id)
            .fetch_optional(p)
            .await?
        });
        Ok(row.map(Into::into))
    }

    /// Connections, of one tenant or of all, by tenant and connector.
    pub async fn connections(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<Vec<Connection>, StoreError> {
        let rows: Vec<ConnectionRow> = on_pool!(self, p => {
            sqlx::query_as(&format!(
                "SELECT {CONNECTION_COLUMNS} FROM connections
                 WHERE ($1 IS NULL OR tenant_id = $1) ORDER BY tenant_id, connector_id"
            ))
            .bind(tenant_id)
            .fetch_all(p)
            .await?
        });
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// The connection's state and tokens, without locking (the fast path of
    /// `bearer`). `None` when the connection does not exist.
    pub async fn token_snapshot(
        &self,
        keys: &KeyRing,
        connection_id: &str,
    ) -> Result<Option<(ConnectionState, Option<StoredTokens>)>, StoreError> {
        // One statement on the common path (the connection has tokens):
        // the token row with its connection's state.
        let row: Option<SnapshotRow> = on_pool!(self, p => {
            sqlx::query_as(&format!(
                "SELECT {TOKEN_COLUMNS}, (SELECT c.state FROM connections c WHERE c.id = t.connection_id) AS conn_state \
                 FROM connection_tokens t WHERE t.connection_id = $1"
            ))
            .bind(connection_id)
            .fetch_optional(p)
            .await?
        });
        if let Some(r) = row
            && let Some(state) = r.conn_state.as_deref().and_then(ConnectionState::parse)
        {
            return Ok(Some((state, Some(r.token.decrypt(keys, connection_id)?))));
        }
        // No tokens (or no connection): the connection row says which.
        let Some(conn) = self.connection(connection_id).await? else {
            return Ok(None);
        };
        let row: Option<TokenRow> = on_pool!(self, p => {
            sqlx::query_as(&format!(
                "SELECT {TOKEN_COLUMNS} FROM connection_tokens WHERE connection_id = $1"
            ))
            .bind(connection_id)
            .fetch_optional(p)
            .await?
        });
        let tokens = match row {
            Some(r) => Some(r.decrypt(keys, connection_id)?),
            None => None,
        };
        Ok(Some((conn.state, tokens)))
    }

    /// Take the connection's token lock (see [`TokenLease`]).
    pub async fn lock_tokens(&self, connection_id: &str) -> Result<TokenLease, StoreError> {
        let conn = match self.pool() {
            Pool::Sqlite(p) => LeaseConn::Sqlite {
                pool: p.clone(),
                seen: None,
            },
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                let found = sqlx::query("SELECT id FROM connections WHERE id = $1 FOR UPDATE")
                    .bind(connection_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                if found.is_none() {
                    return Err(StoreError::NotFound(format!("connection {connection_id}")));
                }
                LeaseConn::Postgres(tx)
            }
        };
        Ok(TokenLease {
            connection_id: connection_id.to_string(),
            conn,
        })
    }

    /// Store a completed authorisation: create the tenant's connection to the
    /// connector, or reuse the earlier one (state back to active; mappings,
    /// which are keyed by tenant and connector, stay), replace its tokens and
    /// record `connected` / `reconnected`. `connected_at` strictly grows
    /// with every reconnect (by a second when two fall in one), so it tells
    /// calls made before a reconnect from those after it. When the organisation changed, the
    /// connection's kv cache is cleared (its ids belong to the old one).
    pub async fn finish_connect(
        &self,
        keys: &KeyRing,
        new: &NewConnection,
        now: i64,
    ) -> Result<Connected, StoreError> {
        self.finish_connect_as(keys, new, None, now).await
    }

    /// As [`Store::finish_connect`]; a new connection (the tenant has none
    /// to this connector yet) gets the id `id_if_new` when given (the id a
    /// call made before connecting ran under).
    pub async fn finish_connect_as(
        &self,
        keys: &KeyRing,
        new: &NewConnection,
        id_if_new: Option<&str>,
        now: i64,
    ) -> Result<Connected, StoreError> {
        match self.finish_connect_once(keys, new, id_if_new, now).await {
            // Another first connect of this tenant and connector (a double
            // click) created the row in between: this one reconnects it.
            Err(StoreError::Db(sqlx::Error::Database(e))) if e.is_unique_violation() => {
                self.finish_connect_once(keys, new, None, now).await
            }
            other => other,
        }
    }

    async fn finish_connect_once(
        &self,
        keys: &KeyRing,
        new: &NewConnection,
        id_if_new: Option<&str>,
        now: i64,
    ) -> Result<Connected, StoreError> {
        if self.tenant(&new.tenant_id).await?.is_none() {
            return Err(StoreError::NotFound(format!("tenant {}", new.tenant_id)));
        }
        let existing = self
            .connection_for(&new.tenant_id, &new.connector_id)
            .await?;
        let id = existing
            .as_ref()
            .map(|c| c.id.clone())
            .or_else(|| id_if_new.map(String::from))
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // Tokens of an earlier, different grant: returned for revocation.
        let mut replaced = None;
        if let Some(c) = &existing
            && c.auth_event_id != new.auth_event_id
            && let Some((_, Some(old))) = self.token_snapshot(keys, &c.id).await?
        {
            replaced = Some(old.tokens);
        }
        let org_changed = existing
            .as_ref()
            .is_some_and(|c| c.external_tenant_id.as_deref() != Some(&new.organisation.tenant_id));
        // Mappings chosen from another organisation's accounts are to be
        // checked before anything is sent to this one; connected back to
        // the organisation they were made for, they are its own again.
        let made_for = existing.as_ref().and_then(|c| {
            if c.mappings_review {
                c.mappings_org.clone()
            } else {
                c.external_tenant_id.clone()
            }
        });
        let review = made_for
            .as_deref()
            .is_some_and(|org| org != new.organisation.tenant_id)
            && !self
                .mappings(&crate::capabilities::mapping::MappingScope {
                    tenant_id: new.tenant_id.clone(),
                    connector_id: new.connector_id.clone(),
                })
                .await?
                .is_empty();
        let review_org = if review { made_for } else { None };
        let scopes = new.scopes.join(" ");
        let sealed = new.tokens.as_ref().map(|t| {
            (
                keys.encrypt(t.access_token.expose(), &ctx_access(&id)),
                t.refresh_token
                    .as_ref()
                    .map(|r| keys.encrypt(r.expose(), &ctx_refresh(&id))),
                t.expires_at,
            )
        });
        let kind = if existing.is_some() {
            event_kind::RECONNECTED
        } else {
            event_kind::CONNECTED
        };
        let org = &new.organisation;
        let detail = if org.name == org.tenant_id {
            format!("{} connected {}", new.admin, org.name)
        } else {
            format!("{} connected {} ({})", new.admin, org.name, org.tenant_id)
        };
        let event = on_pool!(self, p => {
            let mut tx = p.begin().await?;
            sqlx::query(
                "INSERT INTO connections (id, tenant_id, connector_id, state, external_tenant_id,
                   external_tenant_name, external_connection_id, auth_event_id, scopes,
                   connected_by, connected_at, disconnected_at, state_reason, updated_at,
                   mappings_review, mappings_org)
                 VALUES ($1, $2, $3, 'active', $4, $5, $6, $7, $8, $9, $10, NULL, NULL, $10, $11, $12)
                 ON CONFLICT (id) DO UPDATE SET state = 'active',
                   external_tenant_id = excluded.external_tenant_id,
                   external_tenant_name = excluded.external_tenant_name,
                   external_connection_id = excluded.external_connection_id,
                   auth_event_id = excluded.auth_event_id, scopes = excluded.scopes,
                   connected_by = excluded.connected_by,
                   connected_at = CASE WHEN connections.connected_at >= excluded.connected_at
                     THEN connections.connected_at + 1 ELSE excluded.connected_at END,
                   disconnected_at = NULL, state_reason = NULL, updated_at = excluded.updated_at,
                   mappings_review = excluded.mappings_review,
                   mappings_org = excluded.mappings_org",
            )
            .bind(&id)
            .bind(&new.tenant_id)
            .bind(&new.connector_id)
            .bind(&new.organisation.tenant_id)
            .bind(&new.organisation.name)
            .bind(&new.organisation.connection_id)
            .bind(&new.auth_event_id)
            .bind(&scopes)
            .bind(&new.admin)
            .bind(now)
            .bind(i64::from(review))
            .bind(&review_org)
            .execute(&mut *tx)
            .await?;
            if let Some((access, refresh, expires_at)) = &sealed {
                sqlx::query(UPSERT_TOKENS)
                .bind(&id)
                .bind(KeyRing::key_of(access).unwrap_or_default())
                .bind(access)
                .bind(refresh)
                .bind(expires_at)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            } else {
                // No grant: no tokens may linger from an earlier one.
                sqlx::query("DELETE FROM connection_tokens WHERE connection_id = $1")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            }
            if org_changed {
                sqlx::query("DELETE FROM kv WHERE connection_id = $1")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            }
            let ev = insert_event!(&mut *tx, &id, &new.tenant_id, kind, &detail, now);
            tx.commit().await?;
            ev
        });
        let connection = self
            .connection(&id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("connection {id}")))?;
        Ok(Connected {
            connection,
            reconnected: existing.is_some(),
            replaced,
            event,
            previous: existing,
        })
    }

    /// The connector said the connection must be connected again: mark it
    /// `needs-reauth` with `reason` and record the event, but only while it
    /// is still the connection the call ran on (active, connected at
    /// `seen_connected_at`): a reconnect since then wins. Returns the event
    /// when the state changed.
    pub async fn mark_needs_reauth_if_unchanged(
        &self,
        connection_id: &str,
        seen_connected_at: i64,
        reason: &str,
        now: i64,
    ) -> Result<Option<ConnectionEvent>, StoreError> {
        Ok(on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let tenant: Option<String> = sqlx::query(
                "UPDATE connections SET state = 'needs-reauth', state_reason = $2, updated_at = $3
                 WHERE id = $1 AND state = 'active' AND connected_at = $4 RETURNING tenant_id",
            )
            .bind(connection_id)
            .bind(reason)
            .bind(now)
            .bind(seen_connected_at)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
            let ev = match tenant {
                Some(t) => Some(insert_event!(
                    &mut *tx,
                    connection_id,
                    &t,
                    event_kind::NEEDS_REAUTH,
                    reason,
                    now
                )),
                None => None,
            };
            tx.commit().await?;
            ev
        }))
    }

    /// Record an event by hand (e.g. a provider-side failure during disconnect).
    pub async fn record_event(
        &self,
        connection_id: &str,
        tenant_id: &str,
        kind: &str,
        detail: &str,
        now: i64,
    ) -> Result<ConnectionEvent, StoreError> {
        Ok(on_pool!(self, p => insert_event!(p, connection_id, tenant_id, kind, detail, now)))
    }

    /// Events with an id above `after`, oldest first (at most `limit`).
    pub async fn events_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<ConnectionEvent>, StoreError> {
        let rows: Vec<(i64, String, String, String, String, i64)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT id, connection_id, tenant_id, kind, detail, created_at
                 FROM connection_events WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(p)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(id, connection_id, tenant_id, kind, detail, created_at)| ConnectionEvent {
                    id,
                    connection_id,
                    tenant_id,
                    kind,
                    detail,
                    created_at,
                },
            )
            .collect())
    }

    /// Events of one connection, oldest first.
    pub async fn connection_events(
        &self,
        connection_id: &str,
    ) -> Result<Vec<ConnectionEvent>, StoreError> {
        let rows: Vec<(i64, String, String, String, String, i64)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT id, connection_id, tenant_id, kind, detail, created_at
                 FROM connection_events WHERE connection_id = $1 ORDER BY id",
            )
            .bind(connection_id)
            .fetch_all(p)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(id, connection_id, tenant_id, kind, detail, created_at)| ConnectionEvent {
                    id,
                    connection_id,
                    tenant_id,
                    kind,
                    detail,
                    created_at,
                },
            )
            .collect())
    }

    /// Mark an event as handled (by the dispatch layer).
    pub async fn mark_event_handled(&self, id: i64, now: i64) -> Result<(), StoreError> {
        on_pool!(self, p => {
            sqlx::query("UPDATE connection_events SET handled_at = $2 WHERE id = $1")
                .bind(id)
                .bind(now)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// Events not yet handled, oldest first.
    pub async fn unhandled_events(&self, limit: i64) -> Result<Vec<ConnectionEvent>, StoreError> {
        let rows: Vec<(i64, String, String, String, String, i64)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT id, connection_id, tenant_id, kind, detail, created_at
                 FROM connection_events WHERE handled_at IS NULL ORDER BY id LIMIT $1",
            )
            .bind(limit)
            .fetch_all(p)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(id, connection_id, tenant_id, kind, detail, created_at)| ConnectionEvent {
                    id,
                    connection_id,
                    tenant_id,
                    kind,
                    detail,
                    created_at,
                },
            )
            .collect())
    }

    /// Remember a new authorisation's `state` (stored hashed) and PKCE
    /// verifier (encrypted).
    #[allow(clippy::too_many_arguments)]
    pub async fn create_oauth_state(
        &self,
        keys: &KeyRing,
        state_hash: &str,
        tenant_id: &str,
        connector_id: &str,
        admin: &str,
        pkce_verifier: Option<&Secret>,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let verifier = pkce_verifier.map(|v| keys.encrypt(v.expose(), &ctx_pkce(state_hash)));
        on_pool!(self, p => {
            sqlx::query(
                "INSERT INTO oauth_states (state_hash, tenant_id, connector_id, admin, key_id,
                   pkce_verifier, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(state_hash)
            .bind(tenant_id)
            .bind(connector_id)
            .bind(admin)
            .bind(
                verifier
                    .as_deref()
                    .and_then(KeyRing::key_of)
                    .map(str::to_string)
                    .unwrap_or_else(|| keys.current_key_id()),
            )
            .bind(&verifier)
            .bind(now)
            .bind(expires_at)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Use a `state` once: the first call gets its record, every later call
    /// (and any call after its expiry) a [`StateRefusal`].
    pub async fn consume_oauth_state(
        &self,
        keys: &KeyRing,
        state_hash: &str,
        now: i64,
    ) -> Result<Result<OAuthStateRecord, StateRefusal>, StoreError> {
        let row: Option<(String, String, String, Option<String>, i64)> = on_pool!(self, p => {
            sqlx::query_as(
                "UPDATE oauth_states SET used_at = $2 WHERE state_hash = $1 AND used_at IS NULL
                 RETURNING tenant_id, connector_id, admin, pkce_verifier, expires_at",
            )
            .bind(state_hash)
            .bind(now)
            .fetch_optional(p)
            .await?
        });
        let Some((tenant_id, connector_id, admin, verifier, expires_at)) = row else {
            let exists: Option<(String,)> = on_pool!(self, p => {
                sqlx::query_as("SELECT state_hash FROM oauth_states WHERE state_hash = $1")
                    .bind(state_hash)
                    .fetch_optional(p)
                    .await?
            });
            return Ok(Err(if exists.is_some() {
                StateRefusal::AlreadyUsed
            } else {
                StateRefusal::Unknown
            }));
        };
        if verifier.is_some() {
            // Used up: the verifier is not needed at rest any more.
            on_pool!(self, p => {
                sqlx::query("UPDATE oauth_states SET pkce_verifier = NULL WHERE state_hash = $1")
                    .bind(state_hash)
                    .execute(p)
                    .await?;
            });
        }
        if expires_at <= now {
            return Ok(Err(StateRefusal::Expired));
        }
        let pkce_verifier = match verifier {
            Some(v) => Some(keys.decrypt(&v, &ctx_pkce(state_hash))?),
            None => None,
        };
        Ok(Ok(OAuthStateRecord {
            tenant_id,
            connector_id,
            admin,
            pkce_verifier,
            expires_at,
        }))
    }

    /// Park a grant that covers several organisations until the admin picks one.
    pub async fn create_pending_pick(
        &self,
        keys: &KeyRing,
        pick_hash: &str,
        pick: &PendingPick,
    ) -> Result<(), StoreError> {
        let orgs = serde_json::to_string(&pick.organisations)
            .map_err(|e| StoreError::Conflict(format!("organisations: {e}")))?;
        let access = keys.encrypt(
            pick.tokens.access_token.expose(),
            &ctx_pending_access(pick_hash),
        );
        let refresh = pick
            .tokens
            .refresh_token
            .as_ref()
            .map(|r| keys.encrypt(r.expose(), &ctx_pending_refresh(pick_hash)));
        on_pool!(self, p => {
            sqlx::query(
                "INSERT INTO oauth_pending (pick_hash, tenant_id, connector_id, admin, scopes,
                   auth_event_id, organisations, key_id, access_token, refresh_token, expires_at,
                   pick_expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(pick_hash)
            .bind(&pick.tenant_id)
            .bind(&pick.connector_id)
            .bind(&pick.admin)
            .bind(pick.scopes.join(" "))
            .bind(&pick.auth_event_id)
            .bind(&orgs)
            .bind(KeyRing::key_of(&access).unwrap_or_default())
            .bind(&access)
            .bind(&refresh)
            .bind(pick.tokens.expires_at)
            .bind(pick.pick_expires_at)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// A pending pick, unused and unexpired; `consume` marks it used.
    pub async fn pending_pick(
        &self,
        keys: &KeyRing,
        pick_hash: &str,
        now: i64,
        consume: bool,
    ) -> Result<Option<PendingPick>, StoreError> {
        let row: Option<PickRow> = if consume {
            on_pool!(self, p => {
                sqlx::query_as(&format!(
                    "UPDATE oauth_pending SET used_at = $2
                     WHERE pick_hash = $1 AND used_at IS NULL AND pick_expires_at > $2
                     RETURNING {PICK_COLUMNS}"
                ))
                .bind(pick_hash)
                .bind(now)
                .fetch_optional(p)
                .await?
            })
        } else {
            on_pool!(self, p => {
                sqlx::query_as(&format!(
                    "SELECT {PICK_COLUMNS} FROM oauth_pending
                     WHERE pick_hash = $1 AND used_at IS NULL AND pick_expires_at > $2"
                ))
                .bind(pick_hash)
                .bind(now)
                .fetch_optional(p)
                .await?
            })
        };
        row.map(|r| r.decode(keys)).transpose()
    }

    /// Take (delete and return) up to `limit` picks that expired unused
    /// before `now`: the admin started connecting, consented to several
    /// organisations, and never chose one. Their grants still link this
    /// app to those organisations at the provider, so the caller removes
    /// the links ([`crate::connections::Connections::clean_abandoned_picks`]).
    /// Deleted in the statement that reads them, so two daemons never
    /// take the same pick. Returns how many were deleted, and those that
    /// could be read: a pick whose tokens cannot be decrypted (its key
    /// retired) is deleted and left out.
    pub async fn take_abandoned_picks(
        &self,
        keys: &KeyRing,
        now: i64,
        limit: i64,
    ) -> Result<(usize, Vec<PendingPick>), StoreError> {
        let rows: Vec<PickRow> = on_pool!(self, p => sqlx::query_as(&format!(
            "DELETE FROM oauth_pending WHERE pick_hash IN (
               SELECT pick_hash FROM oauth_pending
               WHERE used_at IS NULL AND pick_expires_at < $1
               ORDER BY pick_expires_at LIMIT $2)
             AND used_at IS NULL
             RETURNING {PICK_COLUMNS}"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(p)
        .await?);
        let taken = rows.len();
        let mut out = Vec::new();
        for row in rows {
            let tenant = row.tenant_id.clone();
            match row.decode(keys) {
                Ok(pick) => out.push(pick),
                Err(e) => {
                    tracing::warn!(tenant = %tenant, error = %e, "an abandoned pick could not be read (its key retired?); dropped without removing its links")
                }
            }
        }
        Ok((taken, out))
    }

    /// The organisations offered by picks still open at `now` (unused,
    /// unexpired): an admin may be choosing among them this moment, so
    /// their links at the provider must stay.
    pub async fn open_pick_organisations(&self, now: i64) -> Result<Vec<Organisation>, StoreError> {
        let rows: Vec<(String,)> = on_pool!(self, p => sqlx::query_as(
            "SELECT organisations FROM oauth_pending WHERE used_at IS NULL AND pick_expires_at >= $1",
        )
        .bind(now)
        .fetch_all(p)
        .await?);
        Ok(rows
            .into_iter()
            .filter_map(|(o,)| serde_json::from_str::<Vec<Organisation>>(&o).ok())
            .flatten()
            .collect())
    }

    /// The organisations and provider links in use here: those of every
    /// connection not disconnected (`except` aside: the one being
    /// disconnected), and those offered by picks still open at `now`. One
    /// provider user may connect the same organisation for two tenants, and
    /// the provider may hand back the same link for both: removing a link
    /// in this set would cut another tenant off.
    pub async fn organisations_in_use(
        &self,
        now: i64,
        except: Option<&str>,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let all = self.connections(None).await?;
        let offered = self.open_pick_organisations(now).await?;
        Ok(all
            .into_iter()
            .filter(|c| c.state != ConnectionState::Disconnected && Some(c.id.as_str()) != except)
            .flat_map(|c| [c.external_tenant_id, c.external_connection_id])
            .flatten()
            .chain(
                offered
                    .into_iter()
                    .flat_map(|o| [Some(o.tenant_id), o.connection_id])
                    .flatten(),
            )
            .collect())
    }

    /// Delete states that expired before `before`, and picks that were
    /// used. Picks that expired unused are [`Store::take_abandoned_picks`]'s:
    /// their grants' links are removed at the provider before they are
    /// forgotten.
    pub async fn purge_oauth(&self, before: i64) -> Result<u64, StoreError> {
        let n = on_pool!(self, p => {
            let a = sqlx::query("DELETE FROM oauth_states WHERE expires_at < $1")
                .bind(before)
                .execute(p)
                .await?
                .rows_affected();
            let b = sqlx::query("DELETE FROM oauth_pending WHERE used_at IS NOT NULL")
                .execute(p)
                .await?
                .rows_affected();
            a + b
        });
        Ok(n)
    }

    /// Re-encrypt every stored secret under `keys`' newest key; returns how
    /// many secrets were rewritten. Rows written concurrently by a daemon
    /// are compared-and-swapped, so a refresh in flight is never lost.
    pub async fn reencrypt_all(&self, keys: &KeyRing) -> Result<u64, StoreError> {
        let current = keys.current_key_id().to_string();
        let mut n = 0u64;
        // Tokens.
        for _pass in 0..5 {
            let rows: Vec<(String, String, Option<String>)> = on_pool!(self, p => {
                sqlx::query_as(
                    "SELECT connection_id, access_token, refresh_token FROM connection_tokens
                     WHERE key_id <> $1",
                )
                .bind(&current)
                .fetch_all(p)
                .await?
            });
            if rows.is_empty() {
                break;
            }
            for (id, access, refresh) in rows {
                let a = keys.reencrypt(&access, &ctx_access(&id))?;
                let r = match &refresh {
                    Some(r) => Some(keys.reencrypt(r, &ctx_refresh(&id))?),
                    None => None,
                };
                let done = on_pool!(self, p => {
                    sqlx::query(
                        "UPDATE connection_tokens SET key_id = $2, access_token = $3, refresh_token = $4
                         WHERE connection_id = $1 AND access_token = $5",
                    )
                    .bind(&id)
                    .bind(&current)
                    .bind(&a)
                    .bind(&r)
                    .bind(&access)
                    .execute(p)
                    .await?
                    .rows_affected()
                });
                n += done * (1 + u64::from(refresh.is_some()));
            }
        }
        // PKCE verifiers of pending authorisations.
        let rows: Vec<(String, String)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT state_hash, pkce_verifier FROM oauth_states
                 WHERE key_id <> $1 AND pkce_verifier IS NOT NULL",
            )
            .bind(&current)
            .fetch_all(p)
            .await?
        });
        for (h, v) in rows {
            let v2 = keys.reencrypt(&v, &ctx_pkce(&h))?;
            on_pool!(self, p => {
                sqlx::query("UPDATE oauth_states SET key_id = $2, pkce_verifier = $3 WHERE state_hash = $1")
                    .bind(&h)
                    .bind(&current)
                    .bind(&v2)
                    .execute(p)
                    .await?;
            });
            n += 1;
        }
        // Tokens of pending organisation picks.
        let rows: Vec<(String, String, Option<String>)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT pick_hash, access_token, refresh_token FROM oauth_pending WHERE key_id <> $1",
            )
            .bind(&current)
            .fetch_all(p)
            .await?
        });
        for (h, access, refresh) in rows {
            let a = keys.reencrypt(&access, &ctx_pending_access(&h))?;
            let r = match &refresh {
                Some(r) => Some(keys.reencrypt(r, &ctx_pending_refresh(&h))?),
                None => None,
            };
            on_pool!(self, p => {
                sqlx::query(
                    "UPDATE oauth_pending SET key_id = $2, access_token = $3, refresh_token = $4
                     WHERE pick_hash = $1",
                )
                .bind(&h)
                .bind(&current)
                .bind(&a)
                .bind(&r)
                .execute(p)
                .await?;
            });
            n += 1 + u64::from(refresh.is_some());
        }
        // Connector settings.
        n += self.reencrypt_settings(keys).await?;
        Ok(n)
    }

    /// Key ids still in use by stored secrets (to tell when an old key may go).
    pub async fn key_ids_in_use(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT key_id FROM connection_tokens
                 UNION SELECT key_id FROM oauth_states WHERE pkce_verifier IS NOT NULL
                 UNION SELECT key_id FROM oauth_pending
                 UNION SELECT key_id FROM connection_settings ORDER BY 1",
            )
            .fetch_all(p)
            .await?
        });
        Ok(rows.into_iter().map(|(k,)| k).collect())
    }
}

/// Whether the engine serialises refreshes across processes by row locks.
pub fn cross_process_locking(kind: StoreKind) -> bool {
    kind == StoreKind::Postgres
}
