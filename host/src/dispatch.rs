//! The dispatcher: workers claim due deliveries from the outbox with a
//! lease, renew it while the connector works, and record what happened.
//!
//! What follows an outcome is decided here: `transient` climbs the retry
//! ladder (with jitter) until it runs out; `rate-limited` waits for
//! `Retry-After` without counting an attempt; `rejected` fails at once;
//! `needs-mapping` and `needs-reauth` pause until the admin acts, then
//! resume by themselves. A credit note waits until the invoice it credits
//! was delivered on the same connection. Failures open incidents that the
//! notifier turns into one e-mail each.

use crate::capabilities::http::{CredentialProvider, Parking, RateGate, RateLimit};
use crate::capabilities::kv::{KvStore, ReadAheadKv};
use crate::capabilities::mapping::MappingStore;
use crate::crypto::KeyRing;
use crate::document::Document;
use crate::manifest::Manifest;
use crate::runtime::v0_1::ledgerport::connector::types::{Delivery, DeliveryError};
use crate::runtime::{CallContext, Plugin, Runtime};
use crate::store::Store;
use crate::store::ahead::CallData;
use crate::store::outbox::{Claimed, Finish, state};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tracing::Instrument;

/// How long a credit note waits before looking again at the invoice it
/// credits while that invoice is paused (for a mapping or a reconnect).
const WAIT_BEHIND_PAUSED_MS: i64 = 60_000;

/// How long a delivery for a connector this daemon does not have waits
/// before any daemon claims it again.
const NOT_INSTALLED_WAIT_MS: i64 = 60_000;

/// How often a daemon says again that a connector is not installed here.
const NOT_INSTALLED_LOG_EVERY: Duration = Duration::from_secs(600);

/// The claim's caps from each connector's `concurrent_per_connection`: one
/// number when they agree (or an override is set), else each connector's
/// own with the smallest for a connector not installed here.
fn connection_caps(
    override_cap: Option<u32>,
    caps: impl Iterator<Item = (String, u32)>,
) -> crate::store::outbox::ConnectionCaps {
    use crate::store::outbox::ConnectionCaps;
    if let Some(n) = override_cap {
        return ConnectionCaps::uniform(i64::from(n));
    }
    let by_connector: HashMap<String, i64> = caps.map(|(id, n)| (id, i64::from(n))).collect();
    let mut distinct: Vec<i64> = by_connector.values().copied().collect();
    distinct.sort();
    distinct.dedup();
    match distinct.as_slice() {
        [] => ConnectionCaps::uniform(5),
        [one] => ConnectionCaps::uniform(*one),
        _ => ConnectionCaps {
            default: distinct[0],
            by_connector,
        },
    }
}

/// Whether `key` was not marked in `seen` within `every`; marks it if so.
fn due_again(
    seen: &std::sync::Mutex<HashMap<String, Instant>>,
    key: &str,
    every: Duration,
) -> bool {
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    match seen.get(key) {
        Some(at) if at.elapsed() < every => false,
        _ => {
            seen.insert(key.to_string(), Instant::now());
            true
        }
    }
}

/// A mapping as compared across a pause: its account code and tax type.
fn mapping_signature(m: &crate::capabilities::mapping::AccountMapping) -> String {
    format!("{}|{}", m.account_code, m.tax_type.as_deref().unwrap_or(""))
}

/// A provider's Retry-After in milliseconds, at least 1 s and at most a day.
fn retry_after_ms(secs: u32) -> i64 {
    i64::from(secs.clamp(1, 86_400)) * 1000
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Whether a provider's 429 for `limit` holds the whole connection until
/// its Retry-After: a per-minute or daily limit does; too many requests at
/// once (`concurrent`, in whatever case a connector writes it) only the
/// call that got it.
fn holds_the_connection(limit: &str) -> bool {
    !limit.trim().eq_ignore_ascii_case("concurrent")
}

/// The window a provider's requests-per-minute limit is held over.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// How old an outcome's mark must be before the sweep records its
/// incident (the dispatcher records it itself moments after the outcome),
/// and how often the sweep runs.
pub const INCIDENT_SWEEP_AFTER: Duration = Duration::from_secs(30);

/// The default retry ladder for transient failures: now, 5 s, 5 min,
/// 30 min, 2 h, 5 h, 10 h, 10 h.
pub fn default_ladder() -> Vec<Duration> {
    [0u64, 5, 300, 1800, 7200, 18000, 36000, 36000]
        .iter()
        .map(|s| Duration::from_secs(*s))
        .collect()
}

/// Settings of the dispatcher.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// This daemon's worker id (in leases and the attempt log).
    pub worker_id: String,
    /// Deliveries worked on at once by this daemon.
    pub concurrency: usize,
    /// Lease length; renewed every third of it.
    pub lease: Duration,
    /// Delay before attempt n+1 after n transient failures (n = index).
    pub ladder: Vec<Duration>,
    /// Jitter as a fraction of each delay (0.2 = +/-20 %).
    pub jitter: f64,
    /// How long an incident collects documents before its e-mail.
    pub coalesce: Duration,
    /// Poll interval when nothing wakes the dispatcher.
    pub poll: Duration,
    /// Enforce the manifest's request rate per connection.
    pub enforce_rate: bool,
    /// Use the manifest's concurrency per connection (else this cap).
    pub per_connection_override: Option<u32>,
    /// Use this request rate per minute instead of the manifest's (tests
    /// and benchmarks against a simulator with other limits).
    pub rate_override: Option<u32>,
    /// The window the per-minute rate applies to (one minute; shorter only
    /// against a simulator whose clock runs faster).
    pub rate_window: Duration,
    /// Deliveries alive beyond `concurrency`: a delivery waiting for a rate
    /// slot lends its dispatcher slot to work that can run but keeps its
    /// plugin instance, so at most `concurrency + max_parked` are alive at
    /// once (the runtime's pool must hold them all).
    pub max_parked: usize,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            // The host and process for a person reading the leases, and
            // a random part: `HOSTNAME` is often not exported (systemd),
            // and cloned machines start the service with the same pid.
            // Two daemons with one id would renew and finish each other's
            // leases (a document delivered twice).
            worker_id: format!(
                "{}-{}-{}",
                hostname(),
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            // 64: a delivery spends most of its time waiting (on the
            // provider, on the grouped write of its outcome), and the
            // dispatcher claims again only as places free up. Measured
            // with B2 on SQLite: 32 -> 64 places, +8 % documents a second;
            // each running delivery holds one plugin instance (B5: 100 in
            // flight cost 58 MiB).
            concurrency: 64,
            lease: Duration::from_secs(90),
            ladder: default_ladder(),
            jitter: 0.2,
            coalesce: Duration::from_secs(60),
            poll: Duration::from_millis(500),
            enforce_rate: true,
            per_connection_override: None,
            rate_override: None,
            rate_window: RATE_WINDOW,
            max_parked: 64,
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ledgerport".into())
}

/// The store as a [`RateGate`]: a sliding window (one minute, or shorter in
/// tests against a simulator on a sped-up clock) per connection, shared by
/// every daemon on the database.
pub struct StoreRateGate {
    /// The store.
    pub store: Store,
    /// The window the limit applies to.
    pub window: Duration,
}

#[async_trait]
impl RateGate for StoreRateGate {
    async fn try_take(
        &self,
        connection_id: &str,
        per_minute: u32,
    ) -> Result<Option<Duration>, String> {
        match self
            .store
            .take_rate_slot(
                connection_id,
                i64::from(per_minute),
                self.window.as_millis() as i64,
                now_ms(),
            )
            .await
        {
            Ok(Ok(())) => Ok(None),
            Ok(Err(wait_ms)) => Ok(Some(Duration::from_millis(wait_ms.max(1) as u64))),
            Err(e) => Err(format!("rate gate unavailable: {e}")),
        }
    }
}

/// What a call needs about its connection: the row, the connector's view
/// of it, credentials and mappings (None: the connection is gone).
type CallInputs = Option<(
    crate::store::Connection,
    crate::capabilities::connection::ConnectionInfo,
    Arc<dyn CredentialProvider>,
    Arc<dyn MappingStore>,
)>;

/// Credentials whose first token was read ahead with the batch; refreshes
/// (and anything after one) go to the provider.
struct ReadAheadCredentials {
    inner: Arc<dyn CredentialProvider>,
    first: crate::capabilities::http::Credential,
}

#[async_trait]
impl CredentialProvider for ReadAheadCredentials {
    async fn bearer(
        &self,
        _connection_id: &str,
    ) -> Result<crate::capabilities::http::Credential, crate::capabilities::http::CredentialError>
    {
        Ok(self.first.clone())
    }

    async fn refresh(
        &self,
        connection_id: &str,
        rejected: &crate::capabilities::http::Credential,
    ) -> Result<crate::capabilities::http::Credential, crate::capabilities::http::CredentialError>
    {
        self.inner.refresh(connection_id, rejected).await
    }
}

/// A tenant's mappings as read ahead with the batch.
struct ReadAheadMappings(Vec<crate::capabilities::mapping::AccountMapping>);

#[async_trait]
impl MappingStore for ReadAheadMappings {
    async fn all(
        &self,
        _scope: &crate::capabilities::mapping::MappingScope,
    ) -> anyhow::Result<Vec<crate::capabilities::mapping::AccountMapping>> {
        Ok(self.0.clone())
    }
}

/// How long the dispatcher waits for more deliveries to finish before it
/// claims for the slots already free.
const CLAIM_GATHER: Duration = Duration::from_millis(2);

/// Everything the dispatcher needs to run deliveries.
pub struct Dispatcher {
    store: Store,
    runtime: Arc<Runtime>,
    plugins: BTreeMap<String, Arc<Plugin>>,
    credentials: Arc<dyn CredentialProvider>,
    mappings: Arc<dyn MappingStore>,
    kv: Arc<dyn KvStore>,
    keys: Arc<KeyRing>,
    config: DispatchConfig,
    wake: Notify,
    rate_gate: Arc<dyn RateGate>,
    /// Connections whose rate window is full, until when (ms): not claimed
    /// from until then, so their work does not crowd out the rest.
    blocked: std::sync::Mutex<HashMap<String, i64>>,
    /// When this daemon last logged that a connector is not installed
    /// here, by connector: once in [`NOT_INSTALLED_LOG_EVERY`], not once a
    /// minute per waiting delivery (1,000 of them made 1.4 million warnings
    /// a day).
    not_installed_logged: std::sync::Mutex<HashMap<String, Instant>>,
}

/// A running delivery's dispatcher slot, lent out while the delivery waits
/// for a rate slot (it keeps its plugin instance and its lease).
struct Slot {
    dispatcher: Arc<Dispatcher>,
    running: Arc<Semaphore>,
    /// The dispatcher slot; None while lent out (counted as parked).
    held: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

impl Slot {
    fn held(&self) -> std::sync::MutexGuard<'_, Option<OwnedSemaphorePermit>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held().is_none() {
            crate::metrics::PARKED.dec();
        }
    }
}

#[async_trait]
impl Parking for Slot {
    fn park(&self, connection_id: &str, wait: Duration) {
        if self.held().take().is_some() {
            crate::metrics::PARKED.inc();
        }
        self.dispatcher
            .block_until(connection_id, now_ms() + wait.as_millis() as i64);
        // The lent slot can take other work now.
        self.dispatcher.wake.notify_one();
    }

    async fn unpark(&self) {
        // Still parked while it waits for a slot to run in.
        if self.held().is_none()
            && let Ok(p) = self.running.clone().acquire_owned().await
        {
            *self.held() = Some(p);
            crate::metrics::PARKED.dec();
        }
    }
}

impl Dispatcher {
    /// A dispatcher over `store` with the loaded `plugins` (by connector
    /// id); `keys` decrypt the connections' stored settings.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        runtime: Arc<Runtime>,
        plugins: BTreeMap<String, Arc<Plugin>>,
        credentials: Arc<dyn CredentialProvider>,
        mappings: Arc<dyn MappingStore>,
        kv: Arc<dyn KvStore>,
        keys: Arc<KeyRing>,
        config: DispatchConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            blocked: Default::default(),
            not_installed_logged: Default::default(),
            rate_gate: Arc::new(StoreRateGate {
                store: store.clone(),
                window: config.rate_window,
            }),
            store,
            runtime,
            plugins,
            credentials,
            mappings,
            kv,
            keys,
            config,
            wake: Notify::new(),
        })
    }

    /// Wake the workers (new work arrived in this process).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The configuration.
    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// Run until `shutdown` turns true: claim, deliver, record. On shutdown
    /// stop claiming and give in-flight work `grace` to finish; whatever is
    /// left is released for another worker.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>, grace: Duration) {
        // Running deliveries; and alive ones (running or waiting for a rate
        // slot, each holding a plugin instance).
        let running = Arc::new(Semaphore::new(self.config.concurrency));
        let alive = Arc::new(Semaphore::new(
            self.config.concurrency + self.config.max_parked,
        ));
        let mut in_flight = tokio::task::JoinSet::new();
        // Deliveries being worked on here, with their claims' lease tokens.
        let working: Arc<std::sync::Mutex<HashMap<String, String>>> = Arc::default();
        let per_connection = self.per_connection_cap();
        let claim_batch = (self.config.concurrency / 8).max(1);
        // Deliveries that can start now: a running place and an instance.
        let free = || running.available_permits().min(alive.available_permits());
        let mut last_resume = Instant::now() - Duration::from_secs(10);
        let mut last_sweep = Instant::now();
        // On PostgreSQL, work ingested by another daemon wakes this one
        // (LISTEN/NOTIFY); polling stays as the fallback.
        let listener = self.clone().listen_for_work(shutdown.clone());
        loop {
            if *shutdown.borrow() {
                break;
            }
            if last_sweep.elapsed() > INCIDENT_SWEEP_AFTER {
                last_sweep = Instant::now();
                match self.record_owed_incidents().await {
                    Ok(n) if n > 0 => tracing::warn!(
                        recorded = n,
                        "incidents recorded late (their outcomes' own recording had not happened)"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "looking for incidents owed failed"),
                }
            }
            if last_resume.elapsed() > Duration::from_secs(1) {
                last_resume = Instant::now();
                match self.resume_paused().await {
                    Ok(n) if n > 0 => tracing::info!(resumed = n, "paused deliveries resumed"),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "resuming paused deliveries failed"),
                }
            }
            let mut claimed = Vec::new();
            if free() > 0 {
                let now = now_ms();
                let exclude: Vec<String> = {
                    let mut b = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
                    b.retain(|_, until| *until > now);
                    b.keys().cloned().collect()
                };
                let running_here: Vec<String> = working
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                match self
                    .store
                    .claim_deliveries_but(
                        &self.config.worker_id,
                        now,
                        self.config.lease.as_millis() as i64,
                        free() as i64,
                        &per_connection,
                        &exclude,
                        &running_here,
                    )
                    .await
                {
                    Ok(c) => claimed = c,
                    Err(e) => {
                        tracing::error!(error = %e, "claiming deliveries failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            let got = claimed.len();
            let claimed_at = Instant::now();
            // What these deliveries' calls need, read for the batch at once
            // (a failure here only means each reads its own).
            let ahead: HashMap<String, Arc<CallData>> = if claimed.is_empty() {
                HashMap::new()
            } else {
                let ids: Vec<String> = claimed.iter().map(|c| c.connection_id.clone()).collect();
                match self.store.call_data(&self.keys, &ids).await {
                    Ok(m) => m.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading ahead for claimed deliveries failed; each reads its own");
                        HashMap::new()
                    }
                }
            };
            for c in claimed {
                let (Ok(instance), Ok(permit)) = (
                    alive.clone().acquire_owned().await,
                    running.clone().acquire_owned().await,
                ) else {
                    break;
                };
                let slot = Arc::new(Slot {
                    dispatcher: self.clone(),
                    running: running.clone(),
                    held: std::sync::Mutex::new(Some(permit)),
                });
                let me = self.clone();
                let entry = WorkingEntry::new(&working, &c.id, &c.lease);
                let data = ahead.get(&c.connection_id).cloned();
                in_flight.spawn(async move {
                    me.work(c, slot, data, entry, claimed_at).await;
                    drop(instance);
                });
            }
            while let Some(r) = in_flight.try_join_next() {
                log_join(r);
            }
            if got == 0 || free() == 0 {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.config.poll) => {}
                    _ = shutdown.changed() => {}
                    Some(r) = in_flight.join_next(), if !in_flight.is_empty() => {
                        log_join(r);
                        // Claim in batches: a claim is a write transaction,
                        // and one per finished delivery cost more than a
                        // short wait for a few more to finish.
                        let until = tokio::time::Instant::now() + CLAIM_GATHER;
                        while free() < claim_batch {
                            match tokio::time::timeout_at(until, in_flight.join_next()).await {
                                Ok(Some(r)) => log_join(r),
                                _ => break,
                            }
                        }
                    }
                }
            }
        }
        if let Some(l) = listener {
            l.abort();
        }
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = in_flight.join_next() => if r.is_none() { break },
                _ = &mut deadline => {
                    tracing::warn!(left = in_flight.len(), "shutdown grace over; releasing in-flight deliveries");
                    in_flight.abort_all();
                    while in_flight.join_next().await.is_some() {}
                    let leases: Vec<(String, String)> = working.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
                    for (id, lease) in leases {
                        let _ = self.store.release(&id, &lease, now_ms()).await;
                    }
                    break;
                }
            }
        }
    }

    fn listen_for_work(
        self: Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let crate::store::Pool::Postgres(pool) = self.store.pool().clone() else {
            return None;
        };
        Some(tokio::spawn(async move {
            while !*shutdown.borrow() {
                match sqlx::postgres::PgListener::connect_with(&pool).await {
                    Ok(mut l) => {
                        if l.listen(crate::store::outbox::WORK_CHANNEL).await.is_ok() {
                            while l.recv().await.is_ok() {
                                self.wake();
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "LISTEN failed; polling only"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }))
    }

    /// Resume what a person fixed: deliveries paused for mapping once every
    /// kind they missed is mapped; those paused for re-authorisation once
    /// the connection was connected again (later than when they paused).
    pub async fn resume_paused(&self) -> anyhow::Result<u64> {
        let mut ready = Vec::new();
        let mut mapped: BTreeMap<(String, String), BTreeMap<String, String>> = BTreeMap::new();
        // One read per connection, not per paused delivery.
        let mut conns: HashMap<String, Option<crate::store::Connection>> = HashMap::new();
        let store = &self.store;
        let connection_of =
            async |conns: &mut HashMap<String, Option<crate::store::Connection>>,
                   id: &str|
                   -> anyhow::Result<Option<crate::store::Connection>> {
                if let Some(c) = conns.get(id) {
                    return Ok(c.clone());
                }
                let c = store.connection(id).await?;
                conns.insert(id.to_string(), c.clone());
                Ok(c)
            };
        let mut after = String::new();
        loop {
            let page = self.store.paused_deliveries(&after).await?;
            let full = page.len() >= crate::store::outbox::PAUSED_PAGE;
            if let Some(last) = page.last() {
                after = last.id.clone();
            }
            for p in page {
                let detail: serde_json::Value = p
                    .detail
                    .as_deref()
                    .and_then(|d| serde_json::from_str(d).ok())
                    .unwrap_or_default();
                match p.reason.as_str() {
                    "mapping" => {
                        // Not while the mappings are due a review after a
                        // switch of organisation.
                        if connection_of(&mut conns, &p.connection_id)
                            .await?
                            .is_some_and(|c| c.mappings_review)
                        {
                            continue;
                        }
                        // Held for the review only: it is done. (Any kind
                        // the connector cannot map pauses it again, named.)
                        if detail["review"] == serde_json::Value::Bool(true) {
                            ready.push(p.id);
                            continue;
                        }
                        let key = (p.tenant_id.clone(), p.connector_id.clone());
                        if !mapped.contains_key(&key) {
                            let scope = crate::capabilities::mapping::MappingScope {
                                tenant_id: p.tenant_id.clone(),
                                connector_id: p.connector_id.clone(),
                            };
                            let kinds = self
                                .mappings
                                .all(&scope)
                                .await?
                                .iter()
                                .map(|m| (m.kind.clone(), mapping_signature(m)))
                                .collect();
                            mapped.insert(key.clone(), kinds);
                        }
                        let have = &mapped[&key];
                        let missing = detail["unmapped"].as_array().cloned().unwrap_or_default();
                        // Each kind mapped, and mapped otherwise than when
                        // the connector could not use its account ("was").
                        if missing.iter().all(|k| {
                            k.as_str().is_some_and(|k| {
                                have.get(k).is_some_and(|now| {
                                    detail["was"][k].as_str() != Some(now.as_str())
                                })
                            })
                        }) {
                            ready.push(p.id);
                        }
                    }
                    "reauth" => {
                        let before = detail["connected_at"].as_i64().unwrap_or(i64::MIN);
                        // When it was connected, if it is active now.
                        let at = connection_of(&mut conns, &p.connection_id)
                            .await?
                            .filter(|c| c.state == crate::store::ConnectionState::Active)
                            .map(|c| c.connected_at.unwrap_or(i64::MIN));
                        if at.is_some_and(|at| at > before) {
                            ready.push(p.id);
                        }
                    }
                    _ => {}
                }
            }
            if !full {
                break;
            }
        }
        if ready.is_empty() {
            return Ok(0);
        }
        Ok(self.store.resume(&ready, now_ms()).await?)
    }

    /// Each connector's own cap on deliveries working at once on one
    /// connection (before, the smallest of every installed connector's
    /// applied to all: one connector declaring 1 slowed Xero to one at a
    /// time). One number when they agree, so a claim reads no connector.
    fn per_connection_cap(&self) -> crate::store::outbox::ConnectionCaps {
        connection_caps(
            self.config.per_connection_override,
            self.plugins
                .iter()
                .map(|(id, p)| (id.clone(), p.manifest().limits.concurrent_per_connection)),
        )
    }

    /// One claimed delivery, start to finish. `entry` marks it running
    /// here until its outcome goes to the store; `claimed_at` is when its
    /// lease was taken.
    async fn work(
        &self,
        c: Claimed,
        slot: Arc<Slot>,
        ahead: Option<Arc<CallData>>,
        entry: WorkingEntry,
        claimed_at: Instant,
    ) {
        // A claimed delivery may wait for a running slot (parked deliveries
        // resuming take the slots first). Its lease was not renewed while
        // it waited: past a third of it, renew before calling the
        // connector, and leave it if another daemon has taken it meanwhile
        // (it would be sent twice, with only the idempotency key to save
        // it). A fresh claim costs no write.
        let lease = self.config.lease;
        if claimed_at.elapsed() >= lease / 3 {
            match self
                .store
                .renew_lease(&c.id, &c.lease, now_ms() + lease.as_millis() as i64)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(delivery = %c.id, "the lease lapsed while the delivery waited for a slot (another worker owns it, or it changed); left alone");
                    entry.done();
                    return;
                }
                // Still ours by time (a third of it left at least): go
                // on; the renewals during the call try again.
                Err(e) if claimed_at.elapsed() + lease / 3 < lease => {
                    tracing::warn!(delivery = %c.id, error = %e, "renewing a lease that waited for a slot failed; going on while it is still ours")
                }
                Err(e) => {
                    tracing::warn!(delivery = %c.id, error = %e, "renewing a lease that waited for a slot failed; left for its lease to lapse");
                    entry.done();
                    return;
                }
            }
        }
        let started = now_ms();
        let clock = Instant::now();
        // Renew the lease while working.
        let renew = {
            let store = self.store.clone();
            let id = c.id.clone();
            let token = c.lease.clone();
            let lease = self.config.lease;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    match store
                        .renew_lease(&id, &token, now_ms() + lease.as_millis() as i64)
                        .await
                    {
                        Ok(true) => {}
                        // Another worker owns it now: nothing left to renew.
                        Ok(false) => break,
                        // A busy or briefly unreachable database must not
                        // end the renewals: the lease would lapse mid-call
                        // and a second worker start the same delivery.
                        Err(e) => {
                            tracing::warn!(delivery = %id, error = %e, "renewing the lease failed; trying again")
                        }
                    }
                }
            })
        };
        // Stopped however `work` ends, even if it unwinds or is dropped: a
        // renewal left running would hold the lease for the life of the
        // process.
        let renew = AbortOnDrop(renew);
        let f = self.attempt(&c, slot, ahead).await;
        drop(renew);
        // No longer released at a shutdown: once its outcome is queued for
        // the store, a release written beside it could land first and the
        // outcome would be lost (its lease no longer matching).
        entry.done();
        let now = now_ms();
        {
            {
                crate::metrics::DELIVERY_SECONDS.observe(clock.elapsed().as_secs_f64());
                match self
                    .store
                    .finish_delivery(&c.id, &c.lease, started, now, &f)
                    .await
                {
                    Ok(true) => self.after(&c, &f, now).await,
                    Ok(false) => {
                        tracing::warn!(delivery = %c.id, "lease lost before the outcome was recorded; another worker owns it")
                    }
                    Err(e) => {
                        tracing::error!(delivery = %c.id, error = %e, "recording the outcome failed; the lease will expire and the delivery be retried")
                    }
                }
            }
        }
    }

    /// Open incidents for outcomes people must hear about (marked on the
    /// delivery with its outcome: a mark left by a failure here is picked
    /// up by [`Dispatcher::record_owed_incidents`]).
    async fn after(&self, c: &Claimed, f: &Finish, now: i64) {
        let Some(kind) = f.incident_kind() else {
            return;
        };
        self.record_incident_for(
            &c.id,
            &c.tenant_id,
            &c.connection_id,
            kind,
            &c.document_kind,
            &c.document_number,
            f.message.as_deref(),
            now,
        )
        .await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_incident_for(
        &self,
        delivery: &str,
        tenant: &str,
        connection: &str,
        kind: &str,
        document_kind: &str,
        number: &str,
        message: Option<&str>,
        now: i64,
    ) -> bool {
        let label = format!(
            "{} {number}",
            if document_kind == "credit-note" {
                "Credit note"
            } else {
                "Invoice"
            },
        );
        let detail = format!("{label}: {}", message.unwrap_or_default());
        match self
            .store
            .record_incident_of(
                Some(delivery),
                tenant,
                connection,
                kind,
                number,
                &detail,
                now,
                self.config.coalesce.as_millis() as i64,
            )
            .await
        {
            Ok(recorded) => recorded,
            Err(e) => {
                tracing::error!(delivery = %delivery, error = %e, "recording an incident failed; it will be recorded later");
                false
            }
        }
    }

    /// Record the incidents of outcomes whose own recording never happened
    /// (this or another daemon stopped between the outcome and its
    /// incident, or the incident's write failed): outcomes marked more than
    /// [`INCIDENT_SWEEP_AFTER`] ago. The number recorded.
    pub async fn record_owed_incidents(&self) -> Result<usize, crate::store::StoreError> {
        let now = now_ms();
        let owed = self
            .store
            .incidents_owed(now - INCIDENT_SWEEP_AFTER.as_millis() as i64, 200)
            .await?;
        let mut n = 0;
        for o in owed {
            if self
                .record_incident_for(
                    &o.delivery_id,
                    &o.tenant_id,
                    &o.connection_id,
                    &o.kind,
                    &o.document_kind,
                    &o.document_number,
                    o.message.as_deref(),
                    now,
                )
                .await
            {
                n += 1;
            }
        }
        Ok(n)
    }

    fn retry_at(&self, attempts_after: i64, now: i64) -> Option<i64> {
        let idx = attempts_after as usize;
        let d = self.config.ladder.get(idx)?;
        let base = d.as_millis() as f64;
        let j = if self.config.jitter > 0.0 {
            let r: f64 = rand::random::<f64>() * 2.0 - 1.0;
            base * self.config.jitter * r
        } else {
            0.0
        };
        Some(now + (base + j).max(0.0) as i64)
    }

    /// Run the connector and decide what follows.
    async fn attempt(&self, c: &Claimed, slot: Arc<Slot>, ahead: Option<Arc<CallData>>) -> Finish {
        let now = now_ms();
        let fail = |outcome: &str, msg: String| Finish::failed(outcome, msg, None, now);
        let Some(plugin) = self.plugins.get(&c.connector_id).cloned() else {
            // The operator's matter, not the document's: during a rolling
            // upgrade another daemon may have the connector. Failing it
            // told the customer their system refused the document.
            if self.first_in_a_while(&c.connector_id) {
                tracing::warn!(delivery = %c.id, connector = %c.connector_id,
                    "the connector is not installed on this daemon; its deliveries wait for one that has it (said again in 10 minutes if it goes on)");
            }
            crate::metrics::delivery("waiting");
            return Finish::wait(
                "not-installed",
                format!(
                    "the connector {:?} is not installed on daemon {}; waiting for a daemon that has it",
                    c.connector_id, self.config.worker_id
                ),
                now + NOT_INSTALLED_WAIT_MS,
            );
        };
        // A kind the connector does not take (a delivery made before the
        // fan-out looked at document_kinds, or by a daemon that did not
        // have the connector): never handed to it.
        if !plugin.manifest().document_kinds.contains(&c.document_kind) {
            crate::metrics::delivery("rejected");
            return fail(
                "not-accepted",
                format!(
                    "{} does not take documents of kind {} (its manifest's document_kinds): nothing was sent",
                    plugin.manifest().name,
                    c.document_kind
                ),
            );
        }
        // A credit note waits for the invoice it credits on this connection.
        if c.document_kind == "credit-note"
            && let Some(inv) = &c.credits_invoice_number
        {
            match self
                .store
                .invoice_delivery_state(&c.tenant_id, &c.connection_id, inv)
                .await
            {
                Ok(Some((s, invoice_next)))
                    if s == state::PENDING || s == state::WORKING || s == state::PAUSED =>
                {
                    crate::metrics::delivery("waiting");
                    // Look again soon after the invoice's own next attempt
                    // (2 s while it is being sent; after its retry wait,
                    // which can be hours), or once a minute while it is
                    // paused for a person: each look is a claim and a row
                    // in the delivery's attempts, and a fixed 2 s made
                    // 43,000 of them a day behind a paused invoice.
                    let next = if s == state::PAUSED {
                        now + WAIT_BEHIND_PAUSED_MS
                    } else {
                        invoice_next.max(now) + 2_000
                    };
                    return Finish::wait(
                        "waiting",
                        format!("waiting for invoice {inv} to be delivered first"),
                        next,
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    return self.transient(c, format!("storage error: {e}"), now);
                }
            }
        }
        let doc: Document = match serde_json::from_str(&c.body) {
            Ok(d) => d,
            Err(e) => {
                return fail(
                    "rejected",
                    format!("the stored document cannot be read: {e}"),
                );
            }
        };
        let wit_doc = match doc.to_wit() {
            Ok(d) => d,
            Err(e) => return fail("rejected", e.to_string()),
        };
        // The connection's kv values read with the batch, in front of the
        // store for this call.
        let kv: Arc<dyn KvStore> = match &ahead {
            Some(d) if !d.kv.is_empty() => Arc::new(ReadAheadKv::new(
                self.kv.clone(),
                c.connection_id.clone(),
                d.kv.clone(),
            )),
            _ => self.kv.clone(),
        };
        let read = match ahead {
            Some(d) => Ok(self.read_ahead(plugin.manifest(), &d)),
            None => self.read_now(plugin.manifest(), &c.connection_id).await,
        };
        let (conn, connection, credentials, mappings) = match read {
            Ok(Some(r)) => r,
            Ok(None) => return fail("rejected", "the connection no longer exists".into()),
            Err(e) => {
                return self.transient(
                    c,
                    format!("the connection or its settings cannot be read: {e}"),
                    now,
                );
            }
        };
        if conn.state != crate::store::ConnectionState::Active {
            // Disconnected or waiting for re-authorisation: nothing is sent
            // until it is connected again, then this resumes. Tokens kept
            // this for OAuth connectors; one without (a webhook) has none.
            let why = conn.state_reason.clone().unwrap_or_else(|| {
                format!(
                    "the connection is {}; connect it again",
                    conn.state.as_str()
                )
            });
            return self.classified(
                c,
                &plugin.manifest().name,
                conn.connected_at,
                DeliveryError::NeedsReauth(why),
                now_ms(),
            );
        }
        if conn.mappings_review {
            // Switched to another organisation: its mappings were chosen
            // from the other one's accounts. Paused for mapping, resumed
            // once an admin has saved them (`resume_paused`).
            crate::metrics::delivery("needs-mapping");
            let mut kinds: Vec<String> = doc.lines.iter().map(|l| l.kind.clone()).collect();
            kinds.sort();
            kinds.dedup();
            let org = conn
                .external_tenant_name
                .clone()
                .unwrap_or_else(|| "the organisation".into());
            return Finish::paused(
                "mapping",
                "needs-mapping",
                format!(
                    "the connection now points at {org}, not the organisation the account mappings were chosen for: check them on the Configure page and save them"
                ),
                serde_json::json!({"unmapped": kinds, "review": true}).to_string(),
                now,
            );
        }
        let per_minute = self
            .config
            .rate_override
            .unwrap_or(plugin.manifest().limits.requests_per_minute);
        let rate = self.config.enforce_rate.then(|| RateLimit {
            parking: Some(slot as Arc<dyn Parking>),
            // A connection whose window is full frees a slot within the
            // window; twice that is a gate in trouble.
            ..RateLimit::new(
                self.rate_gate.clone(),
                per_minute,
                self.config.rate_window * 2,
            )
        });
        let held_until = rate.as_ref().map(|r| r.held_until_ms.clone());
        let ctx = CallContext {
            connection,
            credentials,
            mappings,
            kv,
            rate,
        };
        let delivery = Delivery {
            key: c.id.clone(),
            attempt: (c.attempts + 1).clamp(1, u32::MAX as i64) as u32,
        };
        let span = tracing::info_span!("delivery", id = %c.id, tenant = %c.tenant_id, document = %c.document_number, connector = %c.connector_id);
        let t = Instant::now();
        // Everything the connector and the capabilities log carries the
        // delivery's fields (one span per delivery).
        let result = self
            .runtime
            .deliver_with(&plugin, &ctx, delivery, wit_doc, doc.extras())
            .instrument(span.clone())
            .await
            // What the connector answered, made safe to store and show
            // (no control characters, bounded, a reason always, only an
            // http(s) address as a link).
            .map(|r| {
                r.map(|receipt| crate::runtime::clean::receipt(&c.connector_id, receipt))
                    .map_err(crate::runtime::clean::error)
            });
        crate::metrics::PLUGIN_CALL_SECONDS.observe(t.elapsed().as_secs_f64());
        let now = now_ms();
        // When a request of this call got no rate slot in time: the slot's
        // due time, if still ahead.
        let held = held_until
            .map(|h| h.load(std::sync::atomic::Ordering::Relaxed))
            .filter(|&until| until > now);
        match result {
            Ok(Ok(receipt)) => {
                crate::metrics::delivery("delivered");
                tracing::info!(parent: &span, external_id = %receipt.external_id, "delivered");
                Finish {
                    state: state::DELIVERED,
                    pause_reason: None,
                    pause_detail: None,
                    counts: true,
                    next_attempt_at: now,
                    outcome: "delivered".into(),
                    message: (!receipt.notes.is_empty()).then(|| receipt.notes.join("; ")),
                    details: Some(serde_json::json!({"notes": receipt.notes}).to_string()),
                    external_id: Some(receipt.external_id),
                    external_url: receipt.external_url,
                }
            }
            // A temporary failure because a request got no slot in time:
            // the connection is held (Xero's daily limit, a long
            // Retry-After another delivery met, on this daemon or another)
            // or its window is full. Not the document's fault: it waits
            // for the slot, uncounted, and this daemon claims nothing more
            // of the connection until then (the retry ladder would
            // otherwise be spent on waiting, and the delivery fail).
            Ok(Err(DeliveryError::Transient(m))) if held.is_some() => {
                let until = held.unwrap_or(now);
                crate::metrics::delivery("rate-limited");
                self.block_until(&c.connection_id, until);
                Finish::wait("rate-limited", m, until)
            }
            Ok(Err(err)) => {
                if let DeliveryError::NeedsReauth(why) = &err
                    && let Some(seen) = conn.connected_at
                {
                    // The connection itself must be connected again (its
                    // grant or its settings no longer work): say so on the
                    // connection, not only on this document, so the admin
                    // sees it and is offered Connect.
                    match self
                        .store
                        .mark_needs_reauth_if_unchanged(&conn.id, seen, why, now / 1000)
                        .await
                    {
                        Ok(Some(_)) => {
                            tracing::warn!(parent: &span, connection = %conn.id, reason = %why,
                                "the connector says the connection needs re-authorisation")
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(parent: &span, error = %e, "recording needs-reauth failed")
                        }
                    }
                }
                if let DeliveryError::RateLimited(rl) = &err
                    && self.config.enforce_rate
                    && holds_the_connection(&rl.limit)
                {
                    self.hold_connection(&c.connection_id, rl.retry_after_seconds)
                        .await;
                }
                let was = match &err {
                    DeliveryError::NeedsMapping(kinds)
                        if !kinds.is_empty() && !kinds.iter().any(|k| k.trim().is_empty()) =>
                    {
                        self.mapped_now(&ctx, c, kinds).await
                    }
                    _ => BTreeMap::new(),
                };
                if let DeliveryError::NeedsMapping(kinds) = &err
                    && !was.is_empty()
                {
                    return self.needs_mapping_of_mapped(kinds, &was, now);
                }
                self.classified(c, &plugin.manifest().name, conn.connected_at, err, now)
            }
            Err(call_err) => {
                crate::metrics::delivery("crashed");
                // Cleaned like an answer: a trap's message carries the
                // guest's last output, which a NUL would make unstorable on
                // PostgreSQL (the outcome never written, the delivery run
                // again every lease).
                let message = crate::runtime::clean::text(
                    &format!("the connector failed: {call_err}"),
                    crate::runtime::clean::MAX_TEXT,
                );
                self.transient(c, message, now)
            }
        }
    }

    /// Claim nothing of `connection_id` on this daemon until `until` (a
    /// later block already in force stays).
    fn block_until(&self, connection_id: &str, until: i64) {
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(connection_id.to_string())
            .and_modify(|u| *u = (*u).max(until))
            .or_insert(until);
    }

    /// The provider said to wait (a per-minute or daily limit, not the
    /// concurrent one): every daemon's rate gate holds the connection's
    /// requests until then (one row in the shared rate log), and this daemon claims none of its deliveries
    /// meanwhile. Before, only the delivery that got the 429 waited: every
    /// other one of the connection went on calling and got 429 too (a
    /// daily limit's hours-long wait, once per pending document).
    async fn hold_connection(&self, connection_id: &str, secs: u32) {
        let until = now_ms() + retry_after_ms(secs);
        self.block_until(connection_id, until);
        if let Err(e) = self.store.hold_rate_window(connection_id, until).await {
            tracing::warn!(connection = %connection_id, error = %e, "holding the connection's rate window failed");
        }
    }

    /// A call's connection, settings, credentials and mappings from the
    /// batch's read-ahead.
    fn read_ahead(&self, manifest: &Manifest, d: &CallData) -> CallInputs {
        let connection = crate::connections::settings::connection_info_with(
            Some(manifest),
            &d.connection,
            d.settings.iter().cloned(),
        );
        let first = match (&d.tokens, d.connection.state) {
            (Some(t), crate::store::ConnectionState::Active) => self
                .credentials
                .ahead(t.tokens.access_token.expose(), t.tokens.expires_at),
            _ => None,
        };
        let credentials: Arc<dyn CredentialProvider> = match first {
            Some(first) => Arc::new(ReadAheadCredentials {
                inner: self.credentials.clone(),
                first,
            }),
            // Not usable as read (expiring, not active): the provider decides.
            None => self.credentials.clone(),
        };
        Some((
            d.connection.clone(),
            connection,
            credentials,
            Arc::new(ReadAheadMappings(d.mappings.clone())) as Arc<dyn MappingStore>,
        ))
    }

    /// The same, read for this call alone.
    async fn read_now(
        &self,
        manifest: &Manifest,
        connection_id: &str,
    ) -> Result<CallInputs, crate::store::StoreError> {
        let Some(conn) = self.store.connection(connection_id).await? else {
            return Ok(None);
        };
        // The manifest's defaults overlaid with the connection's settings.
        let connection = crate::connections::settings::connection_info(
            &self.store,
            &self.keys,
            Some(manifest),
            &conn,
        )
        .await?;
        // The mappings as they are now, one copy for the call: what the
        // connector saw is what a needs-mapping is compared with afterwards
        // (a live read then could take a mapping an admin saved during the
        // call for the one the connector could not use).
        let scope = crate::capabilities::mapping::MappingScope {
            tenant_id: conn.tenant_id.clone(),
            connector_id: conn.connector_id.clone(),
        };
        let mappings =
            self.mappings.all(&scope).await.map_err(|e| {
                crate::store::StoreError::Conflict(format!("reading mappings: {e}"))
            })?;
        Ok(Some((
            conn,
            connection,
            self.credentials.clone(),
            Arc::new(ReadAheadMappings(mappings)) as Arc<dyn MappingStore>,
        )))
    }

    fn transient(&self, c: &Claimed, msg: String, now: i64) -> Finish {
        let after = c.attempts + 1;
        // The ladder counts from the last resume of a pause.
        match self.retry_at((after - c.ladder_base).max(1), now) {
            Some(at) => Finish {
                state: state::PENDING,
                pause_reason: None,
                pause_detail: None,
                counts: true,
                next_attempt_at: at,
                outcome: "transient".into(),
                message: Some(msg),
                details: None,
                external_id: None,
                external_url: None,
            },
            None => Finish::failed(
                "retries-exhausted",
                format!("gave up after {after} attempts; the last error was: {msg}"),
                None,
                now,
            ),
        }
    }

    /// Whether to log, now, that `connector` is not installed here: the
    /// first time, then once in [`NOT_INSTALLED_LOG_EVERY`].
    fn first_in_a_while(&self, connector: &str) -> bool {
        due_again(
            &self.not_installed_logged,
            connector,
            NOT_INSTALLED_LOG_EVERY,
        )
    }

    /// The mappings the connector used, of the kinds it says need one: a
    /// kind mapped now that a connector calls unmapped is one whose account
    /// it could not use (archived, of the wrong type in the provider). Each
    /// as [`mapping_signature`]; empty when they cannot be read (the pause
    /// then waits for the kinds to be mapped, as before).
    async fn mapped_now(
        &self,
        ctx: &CallContext,
        c: &Claimed,
        kinds: &[String],
    ) -> BTreeMap<String, String> {
        let scope = crate::capabilities::mapping::MappingScope {
            tenant_id: c.tenant_id.clone(),
            connector_id: c.connector_id.clone(),
        };
        match ctx.mappings.all(&scope).await {
            Ok(all) => all
                .iter()
                .filter(|m| kinds.contains(&m.kind))
                .map(|m| (m.kind.clone(), mapping_signature(m)))
                .collect(),
            Err(e) => {
                tracing::warn!(delivery = %c.id, error = %e, "reading the mappings of a paused delivery failed");
                BTreeMap::new()
            }
        }
    }

    /// A connector named kinds that are mapped: their accounts do not work
    /// in the accounting system. Paused for mapping all the same (an admin
    /// fixes it by choosing other accounts), but resumed only once each
    /// such kind is mapped differently (and every other named kind mapped);
    /// resumed because they are mapped, it would pause again at once, for
    /// ever.
    fn needs_mapping_of_mapped(
        &self,
        kinds: &[String],
        was: &BTreeMap<String, String>,
        now: i64,
    ) -> Finish {
        crate::metrics::delivery("needs-mapping");
        let (bad, unmapped): (Vec<&String>, Vec<&String>) =
            kinds.iter().partition(|k| was.contains_key(*k));
        let join = |v: &[&String]| v.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
        let mut message = format!(
            "the account mapped for {} cannot be used by the accounting system (the connector asks for another one): choose another account on the Configure page",
            join(&bad)
        );
        if !unmapped.is_empty() {
            message.push_str(&format!("; no account is mapped for: {}", join(&unmapped)));
        }
        Finish::paused(
            "mapping",
            "needs-mapping",
            message,
            serde_json::json!({"unmapped": kinds, "was": was}).to_string(),
            now,
        )
    }

    fn classified(
        &self,
        c: &Claimed,
        provider: &str,
        connected_at: Option<i64>,
        err: DeliveryError,
        now: i64,
    ) -> Finish {
        match err {
            DeliveryError::Transient(m) => {
                crate::metrics::delivery("transient");
                self.transient(c, m, now)
            }
            DeliveryError::RateLimited(rl) => {
                crate::metrics::delivery("rate-limited");
                Finish::wait(
                    "rate-limited",
                    format!(
                        "the provider asked to wait {} s ({} limit)",
                        rl.retry_after_seconds, rl.limit
                    ),
                    now + retry_after_ms(rl.retry_after_seconds),
                )
            }
            DeliveryError::Rejected(errs) => {
                crate::metrics::delivery("rejected");
                let msg = errs
                    .iter()
                    .map(|e| match &e.provider_message {
                        Some(p) if !e.message.contains(p.as_str()) => {
                            format!("{} ({} said: \"{p}\")", e.message, provider)
                        }
                        _ => e.message.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                let details = serde_json::json!(errs
                    .iter()
                    .map(|e| serde_json::json!({"field": e.field, "message": e.message, "provider_message": e.provider_message}))
                    .collect::<Vec<_>>())
                .to_string();
                Finish::failed("rejected", msg, Some(details), now)
            }
            // Nothing an admin maps could resume it (every kind it names is
            // mapped, so it would resume at once and pause again, for ever):
            // a fault in the connector, failed so that it is seen.
            DeliveryError::NeedsMapping(kinds)
                if kinds.is_empty() || kinds.iter().any(|k| k.trim().is_empty()) =>
            {
                crate::metrics::delivery("rejected");
                Finish::failed(
                    "rejected",
                    "the connector asked for account mappings without naming a line kind, or naming a blank one (a fault in the connector)".into(),
                    None,
                    now,
                )
            }
            DeliveryError::NeedsMapping(kinds) => {
                crate::metrics::delivery("needs-mapping");
                Finish::paused(
                    "mapping",
                    "needs-mapping",
                    format!("no account is mapped for: {}", kinds.join(", ")),
                    serde_json::json!({"unmapped": kinds}).to_string(),
                    now,
                )
            }
            DeliveryError::NeedsReauth(m) => {
                crate::metrics::delivery("needs-reauth");
                Finish::paused(
                    "reauth",
                    "needs-reauth",
                    m,
                    serde_json::json!({ "connected_at": connected_at }).to_string(),
                    now,
                )
            }
        }
    }
}

/// A delivery running on this daemon, in the dispatcher's `working` map
/// (excluded from claims of lapsed leases; its lease released at a
/// shutdown) until [`WorkingEntry::done`], called when its outcome is about
/// to be written, or until its task panics. A task aborted at shutdown
/// keeps its entry, so its lease is released.
struct WorkingEntry {
    map: Arc<std::sync::Mutex<HashMap<String, String>>>,
    id: String,
}

impl WorkingEntry {
    fn new(map: &Arc<std::sync::Mutex<HashMap<String, String>>>, id: &str, lease: &str) -> Self {
        map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), lease.to_string());
        Self {
            map: map.clone(),
            id: id.to_string(),
        }
    }

    fn remove(&self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }

    /// No longer running here.
    fn done(self) {
        self.remove();
    }
}

impl Drop for WorkingEntry {
    fn drop(&mut self) {
        // A panic: nothing will write its outcome; its lease lapses and it
        // may be claimed again. Not unwinding: dropped by a shutdown's
        // abort, and kept for the release.
        if std::thread::panicking() {
            self.remove();
        }
    }
}

/// Log a delivery task that panicked (its delivery is retried once its
/// lease lapses).
fn log_join(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r
        && e.is_panic()
    {
        tracing::error!(error = %e, "a delivery task panicked; the delivery is retried once its lease lapses");
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_concurrency_429_does_not_hold_the_connection_whatever_its_case() {
        for l in ["concurrent", "Concurrent", " CONCURRENT"] {
            assert!(!super::holds_the_connection(l), "{l}");
        }
        for l in ["minute", "Daily", "day", ""] {
            assert!(super::holds_the_connection(l), "{l}");
        }
    }

    #[test]
    fn two_daemons_of_one_process_id_never_share_a_worker_id() {
        let (a, b) = (DispatchConfig::default(), DispatchConfig::default());
        assert_ne!(a.worker_id, b.worker_id);
        assert!(
            a.worker_id.contains(&format!("-{}-", std::process::id())),
            "{}",
            a.worker_id
        );
    }

    #[test]
    fn each_connector_keeps_its_own_cap() {
        let caps = |list: &[(&str, u32)], o: Option<u32>| {
            connection_caps(o, list.iter().map(|(k, n)| (k.to_string(), *n)))
        };
        let c = caps(&[("xero", 5), ("careful", 1)], None);
        assert_eq!((c.of(Some("xero")), c.of(Some("careful"))), (5, 1));
        assert_eq!(
            c.of(Some("elsewhere")),
            1,
            "the most careful for the unknown"
        );
        let same = caps(&[("xero", 5), ("webhook", 5)], None);
        assert!(
            same.by_connector.is_empty(),
            "one number: no connector read"
        );
        assert_eq!(same.default, 5);
        assert_eq!(caps(&[], None).default, 5);
        let o = caps(&[("xero", 5), ("careful", 1)], Some(9));
        assert_eq!((o.of(Some("careful")), o.by_connector.len()), (9, 0));
    }

    #[test]
    fn a_missing_connector_is_logged_once_in_a_while_per_connector() {
        let seen = std::sync::Mutex::default();
        let every = Duration::from_secs(600);
        assert!(due_again(&seen, "webhook", every));
        assert!(!due_again(&seen, "webhook", every), "again at once");
        assert!(due_again(&seen, "other", every), "another connector");
        assert!(
            due_again(&seen, "webhook", Duration::ZERO),
            "once the time is up"
        );
    }

    #[test]
    fn a_mapping_is_compared_by_its_account_and_tax_type() {
        let m = |code: &str, tax: Option<&str>| crate::capabilities::mapping::AccountMapping {
            kind: "fee".into(),
            account_code: code.into(),
            tax_type: tax.map(String::from),
        };
        assert_eq!(
            mapping_signature(&m("400", None)),
            mapping_signature(&m("400", None))
        );
        assert_ne!(
            mapping_signature(&m("400", None)),
            mapping_signature(&m("401", None))
        );
        assert_ne!(
            mapping_signature(&m("400", None)),
            mapping_signature(&m("400", Some("INPUT")))
        );
    }
}
