//! `xero-sim`: a stateful, loopback-only stand-in for Xero used by
//! ledgerport's tests, benchmarks and demo.
//!
//! One listener serves the paths of every Xero host the daemon talks to
//! (`login.xero.com`, `identity.xero.com`, `api.xero.com`), so a client only
//! has to rewrite the origin. A test-only control API lives under `/_sim`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let sim = xero_sim::Sim::start(xero_sim::SimConfig::default()).await?;
//! let grant = sim.issue_grant(xero_sim::GrantRequest::default())?;
//! println!("{} {}", sim.base_url(), grant.tokens.access_token);
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
// Handlers return `Result<_, Response>` so an early error is the HTTP answer itself.
#![allow(clippy::result_large_err)]

mod accounting;
mod clock;
mod config;
mod control;
mod faults;
mod filter;
mod guard;
mod identity;
mod model;
mod server;
mod state;
mod xjson;

use std::net::SocketAddr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use clock::SimClock;
pub use config::{
    AppConfig, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT_HOLDINGS,
    DEFAULT_TENANT_TRADING, LifetimeConfig, OrgConfig, RateLimitConfig, ScopeMode, SimConfig,
    UserConfig,
};
pub use control::{
    AutoApproveRequest, ClockRequest, DEFAULT_SCOPE, GrantRequest, IssuedGrant, TenantDocuments,
};
pub use faults::{FaultConfig, FaultRule, RateProblem};
pub use state::{ConnectionInfo, Counters, GrantInfo, LoggedRequest, TokenSet};

use state::Shared;

/// Entry point: starts simulators.
pub struct Sim;

impl Sim {
    /// Bind `127.0.0.1:<config.port>` (0 = any free port) and serve in the
    /// background on the current tokio runtime.
    pub async fn start(config: SimConfig) -> anyhow::Result<SimHandle> {
        let listener = TcpListener::bind(("127.0.0.1", config.port)).await?;
        let addr = listener.local_addr()?;
        let base_url = format!("http://{addr}");
        let shared = Arc::new(Shared::new(config, base_url));
        let app = server::router(shared.clone());
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(server::serve(listener, app, rx));
        Ok(SimHandle {
            shared,
            addr,
            shutdown: tx,
            task: Some(task),
        })
    }
}

/// A running simulator. Dropping it stops the server.
pub struct SimHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configuration the simulator started with.
    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// Tenant ids of the configured organisations, in config order.
    pub fn tenant_ids(&self) -> Vec<Uuid> {
        self.shared
            .config
            .orgs
            .iter()
            .map(|o| o.tenant_id)
            .collect()
    }

    // ----- clock

    /// The simulated clock.
    pub fn clock(&self) -> &SimClock {
        &self.shared.clock
    }

    /// Current simulated time.
    pub fn now(&self) -> DateTime<Utc> {
        self.shared.clock.now()
    }

    /// Move the simulated clock forward by `secs` seconds.
    pub fn advance_secs(&self, secs: i64) {
        self.shared.clock.advance_secs(secs);
    }

    /// Set the clock's speed factor.
    pub fn set_clock_speed(&self, speed: f64) {
        self.shared.clock.set_speed(speed);
    }

    // ----- identity

    /// Create a grant (as if the user had consented) and return its tokens.
    pub fn issue_grant(&self, req: GrantRequest) -> anyhow::Result<IssuedGrant> {
        control::issue(&self.shared, req).map_err(anyhow::Error::msg)
    }

    /// All grants with their connections and refresh counts.
    pub fn grants(&self) -> Vec<GrantInfo> {
        control::grants(&self.shared)
    }

    /// Revoke a grant (as the revocation endpoint does). Returns whether it existed.
    pub fn revoke_grant(&self, auth_event_id: Uuid) -> bool {
        identity::revoke_grant(&mut self.shared.identity.lock(), auth_event_id)
    }

    /// Auto-approve the consent page: `None` shows the page, `Some(vec![])`
    /// approves all the user's tenants, `Some(list)` those tenants.
    pub fn set_auto_approve(&self, tenants: Option<Vec<Uuid>>) {
        *self.shared.auto_approve.lock() = tenants;
    }

    // ----- faults and limits

    /// Replace the faults in force (reseeds the fault RNG).
    pub fn set_faults(&self, faults: FaultConfig) {
        self.shared.faults.lock().replace(faults);
    }

    /// Faults in force (with burst counters as consumed so far).
    pub fn faults(&self) -> FaultConfig {
        self.shared.faults.lock().config.clone()
    }

    /// Remove every fault.
    pub fn clear_faults(&self) {
        self.set_faults(FaultConfig::default());
    }

    /// Replace the rate limits.
    pub fn set_limits(&self, limits: RateLimitConfig) {
        *self.shared.limits.write() = limits;
    }

    /// Current rate limits.
    pub fn limits(&self) -> RateLimitConfig {
        self.shared.limits.read().clone()
    }

    // ----- inspection

    /// Counters.
    pub fn counters(&self) -> Counters {
        self.shared.counters()
    }

    /// The request log (oldest first), entries with `seq > since`.
    pub fn requests(&self, since: u64) -> Vec<LoggedRequest> {
        control::requests_since(&self.shared, since, None)
    }

    /// Empty the request log.
    pub fn clear_requests(&self) {
        self.shared.log.lock().clear();
    }

    /// Everything one organisation holds, as Xero JSON.
    pub fn documents(&self, tenant: Uuid) -> Option<TenantDocuments> {
        control::documents(&self.shared, tenant)
    }

    /// Back to the initial state: data, grants, faults, limits, counters, log, clock.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Stop serving and wait for the accept loop to end.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
