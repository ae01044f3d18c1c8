//! Shared simulator state: identity (codes, grants, tokens, connections),
//! per-tenant accounting data, idempotency keys, rate-limit windows,
//! counters and the request log. Locks are short and never held across
//! an `.await`.

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use uuid::Uuid;

use crate::clock::SimClock;
use crate::config::{AppConfig, OrgConfig, RateLimitConfig, SimConfig};
use crate::faults::{FaultState, RateProblem};
use crate::model::TenantData;

/// A tenant connection made by a grant (`GET /connections` item).
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionInfo {
    /// Connection id (what `DELETE /connections/{id}` takes).
    pub id: Uuid,
    /// The organisation's tenant id.
    pub tenant_id: Uuid,
    /// The organisation's name.
    pub tenant_name: String,
    /// When the connection was made (sim clock).
    pub created: DateTime<Utc>,
}

/// A summary of one OAuth grant (one consent = one `authEventId`).
#[derive(Clone, Debug, Serialize)]
pub struct GrantInfo {
    /// The grant's id, reported as `authEventId`.
    pub auth_event_id: Uuid,
    /// The app's client id.
    pub client_id: String,
    /// Granted scopes, space separated.
    pub scope: String,
    /// Live connections.
    pub connections: Vec<ConnectionInfo>,
    /// How many refreshes rotated this grant's tokens.
    pub refresh_count: u64,
    /// Whether the grant was revoked.
    pub revoked: bool,
    /// The current refresh token, if the grant has `offline_access`.
    pub refresh_token: Option<String>,
    /// The current access token.
    pub access_token: String,
}

/// A token endpoint answer.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct TokenSet {
    /// Bearer access token.
    pub access_token: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    /// Always `Bearer`.
    pub token_type: String,
    /// Refresh token (present with `offline_access`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub refresh_token: Option<String>,
    /// Granted scopes.
    pub scope: String,
    /// Unsigned JWT with the user's identity claims.
    pub id_token: String,
}

#[derive(Debug, Clone)]
pub(crate) struct AuthCode {
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: String,
    pub tenants: Vec<Uuid>,
    pub challenge: Option<(String, String)>,
    pub expires: DateTime<Utc>,
    pub used_by: Option<Uuid>,
    pub nonce: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub id: Uuid,
    pub client_id: String,
    pub scope: String,
    pub connections: Vec<ConnectionInfo>,
    pub refresh_token: Option<String>,
    pub refresh_expires: DateTime<Utc>,
    pub access_token: String,
    pub access_expires: DateTime<Utc>,
    pub id_token: String,
    pub refresh_count: u64,
    pub revoked: bool,
}

impl Grant {
    pub fn info(&self) -> GrantInfo {
        GrantInfo {
            auth_event_id: self.id,
            client_id: self.client_id.clone(),
            scope: self.scope.clone(),
            connections: self.connections.clone(),
            refresh_count: self.refresh_count,
            revoked: self.revoked,
            refresh_token: self.refresh_token.clone(),
            access_token: self.access_token.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RefreshEntry {
    pub grant: Uuid,
    /// `Some(t)`: rotated out, usable until `t`.
    pub retired_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub(crate) struct AccessEntry {
    pub grant: Uuid,
    pub expires: DateTime<Utc>,
}

#[derive(Debug, Default)]
pub(crate) struct IdentityState {
    pub codes: HashMap<String, AuthCode>,
    pub grants: HashMap<Uuid, Grant>,
    pub refresh: HashMap<String, RefreshEntry>,
    pub access: HashMap<String, AccessEntry>,
}

/// One logged request.
#[derive(Clone, Debug, Serialize)]
pub struct LoggedRequest {
    /// Sequence number, from 1.
    pub seq: u64,
    /// Sim-clock time of arrival.
    pub at: DateTime<Utc>,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers (lower-case names; repeated headers joined by `, `).
    pub headers: Vec<(String, String)>,
    /// Body as UTF-8 text, when it is text.
    pub body_text: Option<String>,
    /// Body as base64, when it is not UTF-8.
    pub body_base64: Option<String>,
    /// Response status.
    pub status: u16,
}

/// Counters, as returned by `GET /_sim/counters`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Counters {
    /// Requests served (excluding `/_sim`).
    pub requests: u64,
    /// Accounting API requests.
    pub accounting_requests: u64,
    /// 429s by kind (`concurrent`, `minute`, `daily`, `appminute`).
    pub rate_limited: HashMap<String, u64>,
    /// Successful refresh-token rotations.
    pub refreshes: u64,
    /// Refreshes per grant (auth event id).
    pub refreshes_by_grant: HashMap<Uuid, u64>,
    /// `invalid_grant` answers.
    pub invalid_grants: u64,
    /// Extra documents sharing Type + number + contact with an earlier one, over all tenants.
    pub duplicates: u64,
    /// Idempotent replays served from the key store.
    pub idempotent_replays: u64,
    /// Faults injected by kind (`500`, `503`, `hang`, `reset`, `latency`, `429`).
    pub faults: HashMap<String, u64>,
}

#[derive(Debug, Default)]
pub(crate) struct CounterState {
    pub requests: AtomicU64,
    pub accounting_requests: AtomicU64,
    pub refreshes: AtomicU64,
    pub invalid_grants: AtomicU64,
    pub idempotent_replays: AtomicU64,
    pub rate_limited: Mutex<HashMap<String, u64>>,
    pub refreshes_by_grant: Mutex<HashMap<Uuid, u64>>,
    pub faults: Mutex<HashMap<String, u64>>,
}

impl CounterState {
    pub fn bump_429(&self, p: RateProblem) {
        *self
            .rate_limited
            .lock()
            .entry(p.as_str().into())
            .or_default() += 1;
    }
    pub fn bump_fault(&self, kind: &str) {
        *self.faults.lock().entry(kind.into()).or_default() += 1;
    }
}

/// A remembered idempotent response.
#[derive(Debug, Clone)]
pub(crate) struct IdemEntry {
    pub fingerprint: String,
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    pub expires: DateTime<Utc>,
}

#[derive(Debug, Default)]
pub(crate) struct Window {
    pub minute: i64,
    pub minute_count: u32,
    pub day: i64,
    pub day_count: u32,
    pub in_flight: u32,
}

#[derive(Debug, Default)]
pub(crate) struct RateState {
    /// Keyed by (client id, tenant id).
    pub tenants: HashMap<(String, Uuid), Window>,
    /// Keyed by client id.
    pub apps: HashMap<String, Window>,
}

/// Everything the handlers share.
pub(crate) struct Shared {
    pub config: SimConfig,
    pub base_url: String,
    pub clock: SimClock,
    pub identity: Mutex<IdentityState>,
    pub tenants: RwLock<HashMap<Uuid, Arc<Mutex<TenantData>>>>,
    pub faults: Mutex<FaultState>,
    pub limits: RwLock<RateLimitConfig>,
    pub rate: Mutex<RateState>,
    pub idempotency: Mutex<HashMap<(String, String), IdemEntry>>,
    /// When expired idempotency entries were last swept (sim clock).
    pub idempotency_swept: Mutex<DateTime<Utc>>,
    pub counters: CounterState,
    pub log: Mutex<VecDeque<LoggedRequest>>,
    pub log_seq: AtomicU64,
    pub auto_approve: Mutex<Option<Vec<Uuid>>>,
}

impl Shared {
    pub fn new(config: SimConfig, base_url: String) -> Self {
        let clock = SimClock::new(config.clock_start, config.clock_speed);
        let now = clock.now();
        let tenants = Self::seed_tenants(&config, now);
        Shared {
            faults: Mutex::new(FaultState::new(config.faults.clone(), config.seed)),
            limits: RwLock::new(config.limits.clone()),
            auto_approve: Mutex::new(config.auto_approve.clone()),
            tenants: RwLock::new(tenants),
            clock,
            base_url,
            identity: Mutex::new(IdentityState::default()),
            rate: Mutex::new(RateState::default()),
            idempotency: Mutex::new(HashMap::new()),
            idempotency_swept: Mutex::new(now),
            counters: CounterState::default(),
            log: Mutex::new(VecDeque::new()),
            log_seq: AtomicU64::new(0),
            config,
        }
    }

    fn seed_tenants(
        config: &SimConfig,
        now: DateTime<Utc>,
    ) -> HashMap<Uuid, Arc<Mutex<TenantData>>> {
        config
            .orgs
            .iter()
            .map(|o| {
                (
                    o.tenant_id,
                    Arc::new(Mutex::new(TenantData::seeded(o, now))),
                )
            })
            .collect()
    }

    /// Back to the configured initial state (clock included).
    pub fn reset(&self) {
        self.clock.set_speed(self.config.clock_speed);
        if let Some(start) = self.config.clock_start {
            self.clock.set(start);
        }
        let now = self.clock.now();
        *self.tenants.write() = Self::seed_tenants(&self.config, now);
        *self.identity.lock() = IdentityState::default();
        *self.faults.lock() = FaultState::new(self.config.faults.clone(), self.config.seed);
        *self.limits.write() = self.config.limits.clone();
        *self.rate.lock() = RateState::default();
        self.idempotency.lock().clear();
        *self.auto_approve.lock() = self.config.auto_approve.clone();
        self.log.lock().clear();
        self.log_seq.store(0, Ordering::SeqCst);
        let c = &self.counters;
        for a in [
            &c.requests,
            &c.accounting_requests,
            &c.refreshes,
            &c.invalid_grants,
            &c.idempotent_replays,
        ] {
            a.store(0, Ordering::SeqCst);
        }
        c.rate_limited.lock().clear();
        c.refreshes_by_grant.lock().clear();
        c.faults.lock().clear();
    }

    pub fn app(&self, client_id: &str) -> Option<&AppConfig> {
        self.config.apps.iter().find(|a| a.client_id == client_id)
    }

    pub fn org(&self, tenant: Uuid) -> Option<&OrgConfig> {
        self.config.orgs.iter().find(|o| o.tenant_id == tenant)
    }

    pub fn tenant(&self, tenant: Uuid) -> Option<Arc<Mutex<TenantData>>> {
        self.tenants.read().get(&tenant).cloned()
    }

    /// Tenants the user may connect.
    pub fn user_tenants(&self) -> Vec<Uuid> {
        if self.config.user.tenants.is_empty() {
            self.config.orgs.iter().map(|o| o.tenant_id).collect()
        } else {
            self.config.user.tenants.clone()
        }
    }

    pub fn counters(&self) -> Counters {
        let c = &self.counters;
        let duplicates = self
            .tenants
            .read()
            .values()
            .map(|t| t.lock().duplicates())
            .sum();
        Counters {
            requests: c.requests.load(Ordering::Relaxed),
            accounting_requests: c.accounting_requests.load(Ordering::Relaxed),
            rate_limited: c.rate_limited.lock().clone(),
            refreshes: c.refreshes.load(Ordering::Relaxed),
            refreshes_by_grant: c.refreshes_by_grant.lock().clone(),
            invalid_grants: c.invalid_grants.load(Ordering::Relaxed),
            duplicates,
            idempotent_replays: c.idempotent_replays.load(Ordering::Relaxed),
            faults: c.faults.lock().clone(),
        }
    }

    pub fn push_log(&self, mut entry: LoggedRequest) {
        entry.seq = self.log_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let mut log = self.log.lock();
        log.push_back(entry);
        while log.len() > self.config.request_log_limit.max(1) {
            log.pop_front();
        }
    }
}
