//! Tenants' connections to accounting systems: connect (authorization URL
//! with a one-time `state` bound to tenant and admin, PKCE), the callback
//! (code exchange, the grant's organisations, the picker when there are
//! several), disconnect (revocation at the provider, tokens dropped,
//! mappings and history kept), reconnect (the same connection back to
//! active), the [`CallContext`] a connector call runs with, and account
//! mappings validated against the connector's account list ([`mappings`]),
//! and the connector settings a connection overrides ([`settings`]).
//!
//! [`Connections`] is the service; it owns a [`TokenManager`] (the
//! connections' `CredentialProvider`) and reports what happens to
//! connections on an [`EventBus`] (and in the `connection_events` table).

pub mod catalogue;
pub mod check;
pub mod cli;
pub mod direct;
pub mod mappings;
pub mod settings;

use crate::capabilities::http::{CredentialProvider, RateLimit};
use crate::credentials::{RefreshPolicy, TokenManager};
use crate::crypto::{KeyRing, random_token, sha256_hex};
use crate::oauth::{OAuthError, Providers};
use crate::runtime::{CallContext, Plugin, Runtime};
use crate::store::{
    Connection, ConnectionEvent, NewConnection, Organisation, PendingPick, Store, StoreError,
    TokenSet,
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use tokio::sync::broadcast;

pub use catalogue::{Catalogue, CatalogueKind};
pub use check::CheckError;
pub use mappings::{MappingError, MappingOutcome};
pub use settings::{SettingError, SettingView};

/// How long a connect `state` is accepted.
pub const STATE_TTL_SECS: i64 = 600;

/// How a `state` bound to the browser that started it begins.
pub const BOUND_STATE_PREFIX: &str = "b.";

/// The name of the cookie that holds a bound `state` (one per sign-in, so
/// two started in one browser do not displace each other).
pub fn flow_cookie_name(state: &str) -> String {
    format!("lp_oauth_{}", &sha256_hex(state)[..12])
}
/// How long an organisation pick is accepted.
pub const PICK_TTL_SECS: i64 = 900;
/// Access-token lifetime assumed when the provider does not say.
pub const DEFAULT_EXPIRES_IN: i64 = 1800;

/// The time source (the system clock, or a test's simulated one).
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(Arc::new(Utc::now))
    }
    /// A clock reading `f`.
    pub fn from_fn(f: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
    /// Now.
    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
    /// Now, in Unix seconds.
    pub fn now_secs(&self) -> i64 {
        self.now().timestamp()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now())
    }
}

/// In-process hook for connection events (the same events are in the
/// `connection_events` table, which is the durable record).
#[derive(Clone, Debug)]
pub struct EventBus {
    tx: broadcast::Sender<ConnectionEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus keeping up to 256 events for slow subscribers.
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(256).0,
        }
    }
    /// Receive events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.tx.subscribe()
    }
    /// Publish (no subscriber is fine).
    pub fn emit(&self, e: ConnectionEvent) {
        tracing::info!(connection = %e.connection_id, tenant = %e.tenant_id, kind = %e.kind, detail = %e.detail, "connection event");
        let _ = self.tx.send(e);
    }
}

/// Why a connection operation was refused or failed. Every refusal names
/// the field or cause.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Bad input (400).
    #[error("{field}: {message}")]
    BadRequest {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Not found (404).
    #[error("{0} not found")]
    NotFound(String),
    /// The provider refused or failed (502).
    #[error("the accounting system: {0}")]
    Provider(#[from] OAuthError),
    /// The connector refused the connection as configured (422): what it
    /// said (e.g. a setting it needs is missing).
    #[error("the connector refuses this configuration: {0}")]
    Refused(String),
    /// The connector ran and could not confirm the connection (502): what
    /// it or the system it calls said.
    #[error("the connector could not confirm the connection: {0}")]
    Unconfirmed(String),
    /// Storage failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ConnectError {
    /// A 400 naming `field`.
    pub fn bad(field: &'static str, message: impl Into<String>) -> Self {
        ConnectError::BadRequest {
            field,
            message: message.into(),
        }
    }
    /// Whether ledgerport's own storage failed (not a row that is missing
    /// or changed meanwhile): callers answer 503 "storage is unavailable",
    /// blaming neither the request nor the accounting system.
    pub fn is_storage_failure(&self) -> bool {
        matches!(self, ConnectError::Store(e) if !matches!(e, StoreError::NotFound(_) | StoreError::Conflict(_)))
    }

    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            ConnectError::BadRequest { .. } => 400,
            ConnectError::NotFound(_) => 404,
            ConnectError::Refused(_) => 422,
            ConnectError::Provider(_) | ConnectError::Unconfirmed(_) => 502,
            ConnectError::Store(StoreError::NotFound(_)) => 404,
            ConnectError::Store(StoreError::Conflict(_)) => 409,
            ConnectError::Store(_) => 500,
        }
    }
}

/// What a connector's answer to a call made for an admin (an account list,
/// a connection check) says, in words for that admin.
pub(crate) fn connector_said(
    e: crate::runtime::v0_1::ledgerport::connector::types::DeliveryError,
) -> String {
    use crate::runtime::v0_1::ledgerport::connector::types::DeliveryError as E;
    match e {
        E::NeedsReauth(m) => format!("the connection needs re-authorisation: {m}"),
        E::Transient(m) => m,
        E::RateLimited(_) => "the accounting system is rate-limiting; try again shortly".into(),
        E::Rejected(problems) => problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect::<Vec<_>>()
            .join("; "),
        E::NeedsMapping(kinds) => format!("unmapped line kinds: {}", kinds.join(", ")),
    }
}

/// The audit log's action and detail for a completed OAuth connection:
/// `connect` naming the organisation, or `connect.switch` naming the one
/// before too (and that the mappings wait for a check).
fn completed_detail(done: &crate::store::Connected) -> (&'static str, String) {
    let org = |c: &Connection| match (&c.external_tenant_name, &c.external_tenant_id) {
        (Some(n), Some(id)) if n != id => format!("{n} ({id})"),
        (Some(n), _) => n.clone(),
        (None, Some(id)) => id.clone(),
        (None, None) => "an unnamed organisation".into(),
    };
    let c = &done.connection;
    let now = org(c);
    match &done.previous {
        Some(p)
            if p.external_tenant_id.is_some() && p.external_tenant_id != c.external_tenant_id =>
        {
            (
                "connect.switch",
                format!(
                    "{}: switched from {} to {now}{}",
                    c.connector_id,
                    org(p),
                    if c.mappings_review {
                        "; nothing is sent until the account mappings are checked"
                    } else {
                        ""
                    }
                ),
            )
        }
        Some(_) => (
            "connect",
            format!("{}: connected again to {now}", c.connector_id),
        ),
        None => ("connect", format!("{}: connected {now}", c.connector_id)),
    }
}

/// The query of the provider's redirect to `/oauth/callback`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct CallbackQuery {
    /// The authorization code.
    #[serde(default)]
    pub code: Option<String>,
    /// The state we issued.
    #[serde(default)]
    pub state: Option<String>,
    /// The provider's error (e.g. `access_denied`).
    #[serde(default)]
    pub error: Option<String>,
    /// Its description.
    #[serde(default)]
    pub error_description: Option<String>,
    /// The redirect's other parameters (one may name the company connected:
    /// a manifest's `oauth.organisation_param`, QuickBooks' `realmId`).
    #[serde(flatten)]
    pub extra: BTreeMap<String, String>,
}

/// What a successful callback leads to.
#[derive(Debug, Clone)]
pub enum CallbackOutcome {
    /// Connected (the grant covered one organisation).
    Connected(Box<Connection>),
    /// The grant covers several organisations: show the picker with this token.
    Pick {
        /// The one-time pick token.
        pick: String,
    },
}

/// What a disconnect did at the provider.
#[derive(Debug, Clone, Default)]
pub struct DisconnectReport {
    /// The provider's app-to-organisation link was removed.
    pub organisation_link_removed: bool,
    /// The refresh token was revoked.
    pub token_revoked: bool,
    /// What could not be done at the provider, in words.
    pub problems: Vec<String>,
}

/// A loaded connector plugin, for calls made on a connection's behalf
/// (account lists for mapping validation).
#[derive(Clone)]
pub struct ConnectorRuntime {
    /// The runtime.
    pub runtime: Arc<Runtime>,
    /// The plugin.
    pub plugin: Arc<Plugin>,
}

/// The longest an admin's call to the provider waits for a slot of the
/// connection's request rate.
pub const ADMIN_RATE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The connections service. Share it behind an `Arc`.
pub struct Connections {
    store: Store,
    keys: Arc<KeyRing>,
    providers: Arc<Providers>,
    tokens: Arc<TokenManager>,
    clock: Clock,
    events: EventBus,
    plugins: RwLock<BTreeMap<String, ConnectorRuntime>>,
    catalogue: Option<Catalogue>,
    /// Whether admin calls hold the provider's rate, and at what rate when
    /// the operator overrides the manifest's (as the dispatcher does).
    rate: (bool, Option<u32>),
    /// When each connection was last checked (see [`check`]).
    checked: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl Connections {
    /// The service over `store`, with its own [`TokenManager`].
    pub fn new(store: Store, keys: Arc<KeyRing>, providers: Arc<Providers>, clock: Clock) -> Self {
        Self::with_policy(store, keys, providers, clock, RefreshPolicy::default())
    }

    /// As [`Connections::new`], with a refresh policy.
    pub fn with_policy(
        store: Store,
        keys: Arc<KeyRing>,
        providers: Arc<Providers>,
        clock: Clock,
        policy: RefreshPolicy,
    ) -> Self {
        let events = EventBus::new();
        let tokens = Arc::new(TokenManager::new(
            store.clone(),
            keys.clone(),
            providers.clone(),
            clock.clone(),
            events.clone(),
            policy,
        ));
        Self {
            store,
            keys,
            providers,
            tokens,
            clock,
            events,
            plugins: RwLock::new(BTreeMap::new()),
            catalogue: None,
            rate: (true, None),
            checked: std::sync::Mutex::default(),
        }
    }

    /// Use a catalogue of line-item kinds for mapping validation.
    pub fn with_catalogue(mut self, catalogue: Catalogue) -> Self {
        self.catalogue = Some(catalogue);
        self
    }

    /// Admin calls hold the provider's request rate as the dispatcher
    /// does: not at all when `enforce` is off, at `per_minute` instead of
    /// the manifest's when given (the default: on, the manifest's).
    pub fn with_rate(mut self, enforce: bool, per_minute: Option<u32>) -> Self {
        self.rate = (enforce, per_minute);
        self
    }

    /// Register a loaded connector (for account lists and call contexts).
    pub fn register_plugin(&self, runtime: Arc<Runtime>, plugin: Arc<Plugin>) {
        let id = plugin.manifest().id.clone();
        let mut g = self.plugins.write().unwrap_or_else(|e| e.into_inner());
        g.insert(id, ConnectorRuntime { runtime, plugin });
    }

    fn plugin(&self, connector_id: &str) -> Option<ConnectorRuntime> {
        let g = self.plugins.read().unwrap_or_else(|e| e.into_inner());
        g.get(connector_id).cloned()
    }

    /// The manifest of a registered connector.
    pub fn manifest(&self, connector_id: &str) -> Option<crate::manifest::Manifest> {
        self.plugin(connector_id)
            .map(|p| p.plugin.manifest().clone())
    }

    /// The manifests of every registered connector, ordered by id.
    pub fn connectors(&self) -> Vec<crate::manifest::Manifest> {
        let g = self.plugins.read().unwrap_or_else(|e| e.into_inner());
        g.values().map(|p| p.plugin.manifest().clone()).collect()
    }

    /// The key ring secrets at rest are encrypted with.
    pub fn keys(&self) -> Arc<KeyRing> {
        self.keys.clone()
    }

    /// The settings of `tenant_id`'s `connector_id` as an admin sees them
    /// (secrets masked).
    pub async fn settings(
        &self,
        tenant_id: &str,
        connector_id: &str,
    ) -> Result<Vec<SettingView>, SettingError> {
        let m = self
            .manifest(connector_id)
            .ok_or_else(|| SettingError::UnknownConnector(connector_id.into()))?;
        Ok(settings::view(&self.store, &self.keys, &m, tenant_id).await?)
    }

    /// Check and store one setting of `tenant_id`'s `connector_id` (audited).
    pub async fn set_setting(
        &self,
        tenant_id: &str,
        connector_id: &str,
        key: &str,
        value: &str,
        actor: &str,
    ) -> Result<(), SettingError> {
        let m = self
            .manifest(connector_id)
            .ok_or_else(|| SettingError::UnknownConnector(connector_id.into()))?;
        settings::set(
            &self.store,
            &self.keys,
            &m,
            tenant_id,
            key,
            value,
            actor,
            self.clock.now_secs(),
        )
        .await
    }

    /// Set and remove several settings of `tenant_id`'s `connector_id` in
    /// one transaction, all checked first (audited; `None`: remove).
    pub async fn change_settings(
        &self,
        tenant_id: &str,
        connector_id: &str,
        changes: &[(&str, Option<&str>)],
        actor: &str,
    ) -> Result<(), SettingError> {
        let m = self
            .manifest(connector_id)
            .ok_or_else(|| SettingError::UnknownConnector(connector_id.into()))?;
        settings::change(
            &self.store,
            &self.keys,
            &m,
            tenant_id,
            changes,
            actor,
            self.clock.now_secs(),
        )
        .await
    }

    /// Remove one stored setting of `tenant_id`'s `connector_id` (audited).
    pub async fn unset_setting(
        &self,
        tenant_id: &str,
        connector_id: &str,
        key: &str,
        actor: &str,
    ) -> Result<(), SettingError> {
        if self.plugin(connector_id).is_none() {
            return Err(SettingError::UnknownConnector(connector_id.into()));
        }
        settings::unset(
            &self.store,
            connector_id,
            tenant_id,
            key,
            actor,
            self.clock.now_secs(),
        )
        .await
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }
    /// The token manager (the connections' credential provider).
    pub fn tokens(&self) -> Arc<TokenManager> {
        self.tokens.clone()
    }
    /// The event hook.
    pub fn events(&self) -> &EventBus {
        &self.events
    }
    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }
    /// The catalogue in use, if any.
    pub fn catalogue(&self) -> Option<&Catalogue> {
        self.catalogue.as_ref()
    }

    /// Start connecting `tenant_id` to `connector_id` on behalf of `admin`:
    /// the URL to send the admin's browser to. The `state` in it is single
    /// use and expires after [`STATE_TTL_SECS`].
    pub async fn begin_connect(
        &self,
        tenant_id: &str,
        connector_id: &str,
        admin: &str,
    ) -> Result<url::Url, ConnectError> {
        Ok(self
            .start_connect(tenant_id, connector_id, admin, false)
            .await?
            .0)
    }

    /// [`Connections::begin_connect`] for the browser that asks (the
    /// Integrations page): also the `state`, which the caller puts in a
    /// cookie named [`flow_cookie_name`] for that browser. The callback
    /// then completes only in a browser holding it: a link forwarded to
    /// someone else (whose consent would connect *their* organisation to
    /// this tenant) is refused.
    pub async fn begin_connect_in_browser(
        &self,
        tenant_id: &str,
        connector_id: &str,
        admin: &str,
    ) -> Result<(url::Url, String), ConnectError> {
        self.start_connect(tenant_id, connector_id, admin, true)
            .await
    }

    async fn start_connect(
        &self,
        tenant_id: &str,
        connector_id: &str,
        admin: &str,
        bound: bool,
    ) -> Result<(url::Url, String), ConnectError> {
        if admin.trim().is_empty() {
            return Err(ConnectError::bad(
                "admin",
                "who is connecting must be named",
            ));
        }
        if self.store.tenant(tenant_id).await?.is_none() {
            return Err(ConnectError::bad(
                "tenant",
                format!("unknown tenant {tenant_id:?}"),
            ));
        }
        let provider = self.providers.get(connector_id).ok_or_else(|| {
            ConnectError::bad(
                "connector",
                format!("{connector_id:?} has no OAuth provider configured"),
            )
        })?;
        let state = if bound {
            format!("{BOUND_STATE_PREFIX}{}", random_token(32))
        } else {
            random_token(32)
        };
        let (url, verifier) = provider.authorize_url(&state);
        let now = self.clock.now_secs();
        self.store
            .create_oauth_state(
                &self.keys,
                &sha256_hex(&state),
                tenant_id,
                connector_id,
                admin,
                verifier.as_ref(),
                now,
                now + STATE_TTL_SECS,
            )
            .await?;
        Ok((url, state))
    }

    /// Handle the provider's redirect: check and use up the `state`,
    /// exchange the code, read the organisations the grant covers.
    /// `flow_cookie`: the value of the browser's [`flow_cookie_name`]
    /// cookie for this state, which a state from
    /// [`Connections::begin_connect_in_browser`] requires.
    pub async fn complete_callback(
        &self,
        q: &CallbackQuery,
        flow_cookie: Option<&str>,
    ) -> Result<CallbackOutcome, ConnectError> {
        // What the provider said, when it refused: shown even when the
        // state is also bad, so the admin learns why (access_denied, ...).
        let refused = q.error.as_deref().filter(|e| !e.is_empty()).map(|err| {
            format!(
                "{err}{}",
                q.error_description
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )
        });
        // Without a valid state anyone could have written the link: only
        // the error's code is shown then, cut short, not its free text.
        let also = |m: &str| match q.error.as_deref().filter(|e| {
            !e.is_empty() && e.len() <= 64 && e.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        }) {
            Some(code) => format!("{m}; the accounting system also answered: {code}"),
            None => m.to_string(),
        };
        let state = q
            .state
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ConnectError::bad("state", also("is missing")))?;
        if state.len() > 512 {
            return Err(ConnectError::bad("state", also("is unknown")));
        }
        if state.starts_with(BOUND_STATE_PREFIX) && flow_cookie != Some(state) {
            return Err(ConnectError::bad(
                "state",
                also(
                    "belongs to a sign-in started in another browser: start connecting again from the Integrations page, in this browser",
                ),
            ));
        }
        let now = self.clock.now_secs();
        let record = self
            .store
            .consume_oauth_state(&self.keys, &sha256_hex(state), now)
            .await?
            .map_err(|r| {
                ConnectError::bad("state", also(r.to_string().trim_start_matches("state ")))
            })?;
        if let Some(refused) = refused {
            return Err(ConnectError::bad(
                "error",
                format!("the accounting system did not authorise the connection: {refused}"),
            ));
        }
        let code = q
            .code
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ConnectError::bad("code", "is missing"))?;
        let provider = self.providers.get(&record.connector_id).ok_or_else(|| {
            ConnectError::bad(
                "connector",
                format!("{:?} is no longer configured", record.connector_id),
            )
        })?;
        // The company the provider names in its redirect (before the code
        // is used: a redirect without it connects nothing).
        let named_org = match provider.organisation_param() {
            None => None,
            Some(param) => {
                let v = q
                    .extra
                    .get(param)
                    .map(|v| v.trim())
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        ConnectError::bad("organisation", format!("{param} is missing from the accounting system's redirect (it names the company connected); start the connection again"))
                    })?;
                // It comes through the browser, unsigned (the token's own
                // binding to the company is the provider's check), and a
                // connector puts it in URL paths: letters, digits, . _ -.
                if v.len() > 128
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
                {
                    return Err(ConnectError::bad(
                        "organisation",
                        format!(
                            "{param} is not a company id (letters, digits, . _ -; at most 128)"
                        ),
                    ));
                }
                Some(v.to_string())
            }
        };
        let answer = match provider
            .exchange_code(code, record.pkce_verifier.as_ref())
            .await
        {
            Ok(a) => a,
            Err(OAuthError::InvalidGrant(d)) => {
                return Err(ConnectError::bad(
                    "code",
                    format!(
                        "the accounting system refused the authorization code (expired, already used or not issued for this app){}; start the connection again",
                        if d.is_empty() {
                            String::new()
                        } else {
                            format!(": {d}")
                        }
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let now = self.clock.now_secs();
        let tokens = TokenSet {
            access_token: answer.access_token.clone(),
            refresh_token: answer.refresh_token.clone(),
            expires_at: now.saturating_add(answer.expires_in.unwrap_or(DEFAULT_EXPIRES_IN)),
        };
        let scopes = answer
            .scopes
            .clone()
            .unwrap_or_else(|| provider.scopes().to_vec());
        let orgs = match named_org {
            Some(id) => vec![crate::oauth::ProviderOrganisation {
                connection_id: String::new(),
                name: format!("{} {id}", provider.name()),
                tenant_id: id,
                auth_event_id: answer.auth_event_id.clone(),
            }],
            None => {
                provider
                    .organisations(&answer.access_token, answer.auth_event_id.as_deref())
                    .await?
            }
        };
        let organisations: Vec<Organisation> = orgs
            .into_iter()
            .map(|o| Organisation {
                tenant_id: o.tenant_id,
                name: o.name,
                connection_id: Some(o.connection_id).filter(|c| !c.is_empty()),
            })
            .collect();
        match organisations.len() {
            0 => Err(ConnectError::bad(
                "organisation",
                "the authorisation covers no organisation; choose one on the accounting system's consent page",
            )),
            1 => {
                let new = NewConnection {
                    tenant_id: record.tenant_id,
                    connector_id: record.connector_id,
                    admin: record.admin,
                    scopes,
                    organisation: organisations.into_iter().next().unwrap_or_else(|| {
                        Organisation {
                            tenant_id: String::new(),
                            name: String::new(),
                            connection_id: None,
                        }
                    }),
                    auth_event_id: answer.auth_event_id,
                    tokens: Some(tokens),
                };
                Ok(CallbackOutcome::Connected(Box::new(
                    self.finish(new).await?,
                )))
            }
            _ => {
                let pick = random_token(32);
                self.store
                    .create_pending_pick(
                        &self.keys,
                        &sha256_hex(&pick),
                        &PendingPick {
                            tenant_id: record.tenant_id,
                            connector_id: record.connector_id,
                            admin: record.admin,
                            scopes,
                            auth_event_id: answer.auth_event_id,
                            organisations,
                            tokens,
                            pick_expires_at: now + PICK_TTL_SECS,
                        },
                    )
                    .await?;
                Ok(CallbackOutcome::Pick { pick })
            }
        }
    }

    /// The organisations of a pending pick (for the picker page).
    pub async fn pending_organisations(
        &self,
        pick: &str,
    ) -> Result<(Vec<Organisation>, Option<String>), ConnectError> {
        let p = self
            .store
            .pending_pick(&self.keys, &sha256_hex(pick), self.clock.now_secs(), false)
            .await?
            .ok_or_else(|| {
                ConnectError::bad(
                    "pick",
                    "is unknown, used or expired; start the connection again",
                )
            })?;
        // The organisation the tenant is connected to now, if any: the one
        // to keep unless the admin means to switch.
        let current = self
            .store
            .connection_for(&p.tenant_id, &p.connector_id)
            .await?
            .and_then(|c| c.external_tenant_id);
        Ok((p.organisations, current))
    }

    /// The admin picked `organisation_id` from a pending pick: connect it.
    pub async fn pick_organisation(
        &self,
        pick: &str,
        organisation_id: &str,
    ) -> Result<Connection, ConnectError> {
        let h = sha256_hex(pick);
        let now = self.clock.now_secs();
        // Check the choice before using up the pick, so a wrong choice can be corrected.
        let peek = self
            .store
            .pending_pick(&self.keys, &h, now, false)
            .await?
            .ok_or_else(|| {
                ConnectError::bad(
                    "pick",
                    "is unknown, used or expired; start the connection again",
                )
            })?;
        if !peek
            .organisations
            .iter()
            .any(|o| o.tenant_id == organisation_id)
        {
            return Err(ConnectError::bad(
                "organisation",
                format!(
                    "{organisation_id:?} is not one of the organisations this authorisation covers"
                ),
            ));
        }
        let p = self
            .store
            .pending_pick(&self.keys, &h, now, true)
            .await?
            .ok_or_else(|| ConnectError::bad("pick", "was already used"))?;
        let organisation = p
            .organisations
            .iter()
            .find(|o| o.tenant_id == organisation_id)
            .cloned()
            .ok_or_else(|| ConnectError::bad("organisation", "not covered"))?;
        let access = p.tokens.access_token.clone();
        let connector_id = p.connector_id.clone();
        let unpicked: Vec<Organisation> = p
            .organisations
            .iter()
            .filter(|o| o.tenant_id != organisation_id)
            .cloned()
            .collect();
        let connection = self
            .finish(NewConnection {
                tenant_id: p.tenant_id,
                connector_id: p.connector_id,
                admin: p.admin,
                scopes: p.scopes,
                organisation,
                auth_event_id: p.auth_event_id,
                tokens: Some(p.tokens),
            })
            .await?;
        self.remove_unpicked_links(&connector_id, &access, &unpicked)
            .await;
        Ok(connection)
    }

    /// The consent covered organisations the admin did not pick: remove
    /// the app's links to them at the provider (best effort; a failure is
    /// logged), so the grant ledgerport keeps reaches only the
    /// organisation it writes to. A link to an organisation that one of
    /// this daemon's connections (of any tenant, not disconnected) uses, or
    /// that a pick still open offers (an admin may be choosing it), is
    /// left alone: one user of the provider may have connected it for
    /// another tenant, and the provider can hand back that same link.
    async fn remove_unpicked_links(
        &self,
        connector_id: &str,
        access_token: &crate::crypto::Secret,
        unpicked: &[Organisation],
    ) {
        let Some(provider) = self.providers.get(connector_id) else {
            return;
        };
        if unpicked.iter().all(|o| o.connection_id.is_none()) {
            return;
        }
        let now = self.clock.now_secs();
        let in_use = match self.store.organisations_in_use(now, None).await {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(error = %e, "the links to organisations not picked were kept: the store could not say which are in use");
                return;
            }
        };
        for o in unpicked {
            let Some(link) = &o.connection_id else {
                continue;
            };
            if in_use.contains(&o.tenant_id) || in_use.contains(link) {
                tracing::info!(organisation = %o.tenant_id, "an organisation not picked is connected for another tenant: its link is kept");
                continue;
            }
            match provider.delete_connection(access_token, link).await {
                Ok(_) => {
                    tracing::info!(organisation = %o.tenant_id, "removed the link to an organisation not picked")
                }
                Err(e) => {
                    tracing::warn!(organisation = %o.tenant_id, error = %e, "removing the link to an organisation not picked failed")
                }
            }
        }
    }

    /// Remove the provider's links of grants whose pick expired unused:
    /// the admin consented to several organisations and never chose one
    /// (closed the tab). The grant would otherwise keep this app linked to
    /// all of them at the provider (Xero lists it under the organisations'
    /// connected apps) though ledgerport no longer holds its tokens. Links
    /// another connection here uses are kept, as after a pick
    /// ([`Connections::remove_unpicked_links`]). An access token past its
    /// time is refreshed first; a grant that cannot be used any more (the
    /// refresh refused: revoked at the provider) has nothing left to
    /// remove. Best effort: failures are logged. Returns how many
    /// abandoned picks were taken (read or not; at most 50 a call). A
    /// daemon that dies meanwhile leaves the links of the picks it had
    /// taken. Called by the daemon's sign-in purge.
    pub async fn clean_abandoned_picks(&self) -> usize {
        let now = self.clock.now_secs();
        let (taken, picks) = match self.store.take_abandoned_picks(&self.keys, now, 50).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "abandoned organisation picks could not be read");
                return 0;
            }
        };
        for pick in &picks {
            let Some(provider) = self.providers.get(&pick.connector_id) else {
                continue;
            };
            // A minute of margin: the removals must not meet an expiry.
            let access = if pick.tokens.expires_at > now + 60 {
                pick.tokens.access_token.clone()
            } else if let Some(rt) = &pick.tokens.refresh_token {
                match provider.refresh(rt).await {
                    Ok(t) => t.access_token,
                    Err(e) => {
                        tracing::info!(tenant = %pick.tenant_id, error = %e, "an abandoned organisation pick's grant could not be refreshed; its links were left");
                        continue;
                    }
                }
            } else {
                tracing::info!(tenant = %pick.tenant_id, "an abandoned organisation pick's access token has expired and it has no refresh token; its links were left");
                continue;
            };
            tracing::info!(tenant = %pick.tenant_id, organisations = pick.organisations.len(), "an organisation pick expired unused: removing its grant's links");
            self.remove_unpicked_links(&pick.connector_id, &access, &pick.organisations)
                .await;
        }
        taken
    }

    async fn finish(&self, new: NewConnection) -> Result<Connection, ConnectError> {
        let connector_id = new.connector_id.clone();
        let now = self.clock.now_secs();
        let done = self.store.finish_connect(&self.keys, &new, now).await?;
        self.events.emit(done.event.clone());
        // The audit log names who connected which organisation (the admin
        // who started the flow, kept with its state and pick), and a
        // switch from another one.
        let (action, detail) = completed_detail(&done);
        if let Err(e) = self
            .store
            .audit(&new.admin, Some(&new.tenant_id), action, &detail, now)
            .await
        {
            tracing::warn!(connection = %done.connection.id, error = %e, "the connection was made; its audit entry was not written");
        }
        // An earlier grant replaced by this one: revoke it (best effort).
        if let (Some(old), Some(provider)) = (done.replaced, self.providers.get(&connector_id))
            && let Some(rt) = old.refresh_token
            && let Err(e) = provider.revoke(&rt).await
        {
            tracing::warn!(connection = %done.connection.id, error = %e, "revoking the replaced grant failed");
        }
        Ok(done.connection)
    }

    /// Disconnect: remove the provider's link to the organisation and revoke
    /// the grant there, then drop the tokens and mark the connection
    /// disconnected. Mappings, documents and history stay. Problems at the
    /// provider are reported (and recorded in the event), not fatal.
    pub async fn disconnect(
        &self,
        connection_id: &str,
        actor: &str,
    ) -> Result<DisconnectReport, ConnectError> {
        if actor.trim().is_empty() {
            return Err(ConnectError::bad(
                "actor",
                "who is disconnecting must be named",
            ));
        }
        let conn = self
            .store
            .connection(connection_id)
            .await?
            .ok_or_else(|| ConnectError::NotFound(format!("connection {connection_id}")))?;
        let provider = self.providers.get(&conn.connector_id);
        let (report, event) = self
            .tokens
            .revoke_and_drop(connection_id, actor, provider.as_deref())
            .await?;
        if let Some(e) = event {
            self.events.emit(e);
        }
        Ok(report)
    }

    /// The context a connector call for this connection runs with: the
    /// connection's info and settings (manifest defaults overlaid with the
    /// stored ones, [`settings::connection_info`]), its credentials (this service's
    /// [`TokenManager`]), and the SQL mapping and kv stores.
    pub async fn call_context(&self, connection_id: &str) -> Result<CallContext, ConnectError> {
        let conn = self
            .store
            .connection(connection_id)
            .await?
            .ok_or_else(|| ConnectError::NotFound(format!("connection {connection_id}")))?;
        Ok(self.context_for(&conn).await?)
    }

    /// As [`Connections::call_context`], for a connection in hand (also one
    /// not stored yet: the check before a connection without a grant).
    async fn context_for(&self, conn: &Connection) -> Result<CallContext, StoreError> {
        let plugin = self.plugin(&conn.connector_id);
        let manifest = plugin.as_ref().map(|p| p.plugin.manifest());
        let connection = settings::connection_info(&self.store, &self.keys, manifest, conn).await?;
        // An admin's calls (the account list behind the mapping screen, the
        // check) count in the connection's provider rate like the
        // dispatcher's, on every daemon: a burst of mapping changes must
        // not push the organisation past its limit (a 429 holds its
        // deliveries). One that cannot have a slot soon fails at once.
        let (enforce, per_minute) = self.rate;
        let rate = manifest.filter(|_| enforce).map(|m| {
            RateLimit::new(
                Arc::new(crate::dispatch::StoreRateGate {
                    store: self.store.clone(),
                    window: crate::dispatch::RATE_WINDOW,
                }),
                per_minute.unwrap_or(m.limits.requests_per_minute),
                ADMIN_RATE_WAIT,
            )
        });
        Ok(CallContext {
            connection,
            credentials: self.tokens.clone() as Arc<dyn CredentialProvider>,
            mappings: Arc::new(self.store.clone()),
            kv: Arc::new(self.store.clone()),
            rate,
        })
    }
}
