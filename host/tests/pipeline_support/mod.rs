//! The whole pipeline in one process, shared by the dispatch and torture
//! tests: a daemon (store, runtime, the Xero connector, dispatcher,
//! notifier, HTTP API) on a test database, the Xero simulator and a real
//! SMTP server on loopback; tenants connected through the real OAuth flow
//! with their accounts mapped; the platform's documents.
#![allow(dead_code)]

use crate::storage_support::{self, TestDb};
use ledgerport::capabilities::mapping::MappingScope;
use ledgerport::connections::Clock;
use ledgerport::daemon::{Config, Daemon};
use ledgerport::dispatch::DispatchConfig;
use serde_json::{Value, json};
use smtp_sink::SmtpSink;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use xero_sim::{Sim, SimConfig, SimHandle};

/// The platform's service key.
pub const SERVICE_KEY: &str = "test-service-key";

/// Daemons on one database, the simulator, the SMTP sink.
pub struct Pipeline {
    /// The Xero simulator.
    pub sim: SimHandle,
    /// The SMTP sink (stop and restart it to simulate an outage).
    pub smtp: SmtpSink,
    /// The daemons (all on the same database).
    pub daemons: Vec<Daemon>,
    /// The platform's HTTP client.
    pub http: reqwest::Client,
    /// The database.
    pub db: TestDb,
    _keys: tempfile::TempDir,
}

/// A daemon config on `db` with the simulator and the SMTP sink.
pub fn config(db: &TestDb, sim: &SimHandle, smtp: &SmtpSink, key_file: &Path) -> Config {
    let mut cfg = storage_support::daemon_config(db.url(), sim, key_file);
    cfg.service_keys = vec![SERVICE_KEY.into()];
    cfg.mail = Some(storage_support::sink_mail(smtp.addr().port()));
    cfg
}

/// Fast retries for tests.
pub fn dispatch_config(worker: &str) -> DispatchConfig {
    DispatchConfig {
        worker_id: worker.into(),
        concurrency: 16,
        // 16 tries: under the load tests' injected 5xx (10 % of requests,
        // 3 or 4 requests an attempt) a delivery fails an attempt about a
        // third of the time, so 10 tries gave up on about 2 % of runs'
        // worth of documents (0.34^10 x 1,000 deliveries); 16 make it
        // about 3 in 100,000.
        ladder: [0u64, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2]
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect(),
        jitter: 0.1,
        coalesce: Duration::from_millis(300),
        poll: Duration::from_millis(100),
        lease: Duration::from_secs(10),
        ..DispatchConfig::default()
    }
}

impl Pipeline {
    /// Start `daemons` daemons on `db` with a simulator configured by `sim_config`.
    pub async fn start(db: TestDb, daemons: usize, sim_config: SimConfig) -> Self {
        Self::start_with(db, daemons, sim_config, |_| {}).await
    }

    /// [`Pipeline::start`] with the dispatcher's settings changed by `tweak`.
    pub async fn start_with(
        db: TestDb,
        daemons: usize,
        sim_config: SimConfig,
        tweak: impl Fn(&mut DispatchConfig),
    ) -> Self {
        Self::start_full(db, daemons, sim_config, tweak, |_| {}).await
    }

    /// [`Pipeline::start_with`] with the daemon's config changed by `tweak_config`.
    pub async fn start_full(
        db: TestDb,
        daemons: usize,
        sim_config: SimConfig,
        tweak: impl Fn(&mut DispatchConfig),
        tweak_config: impl Fn(&mut Config),
    ) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("LEDGERPORT_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let sim = Sim::start(sim_config).await.unwrap();
        let smtp = SmtpSink::start().await.unwrap();
        let keys = tempfile::tempdir().unwrap();
        let key_file = keys.path().join("key");
        std::fs::write(&key_file, ledgerport::crypto::generate_key()).unwrap();
        let mut ds = Vec::new();
        for i in 0..daemons {
            let mut cfg = config(&db, &sim, &smtp, &key_file);
            tweak_config(&mut cfg);
            let d = Daemon::start(
                cfg,
                Clock::system(),
                Some({
                    let mut dc = dispatch_config(&format!("w{i}"));
                    tweak(&mut dc);
                    dc
                }),
            )
            .await
            .unwrap();
            ds.push(d);
        }
        Pipeline {
            sim,
            smtp,
            daemons: ds,
            http: reqwest::Client::new(),
            db,
            _keys: keys,
        }
    }

    /// The daemons' key ring (secrets at rest).
    pub fn key_ring(&self) -> ledgerport::crypto::KeyRing {
        ledgerport::crypto::KeyRing::load(Some(&self._keys.path().join("key"))).unwrap()
    }

    /// The first daemon.
    pub fn d(&self) -> &Daemon {
        &self.daemons[0]
    }

    /// A URL on the first daemon.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.d().addr, path)
    }

    /// Add a tenant and connect it to the simulator's Trading organisation
    /// through the real OAuth flow (the simulator auto-approves).
    pub async fn tenant(&self, id: &str, org: uuid::Uuid) {
        let store = &self.d().store;
        store
            .upsert_tenant(
                id,
                &format!("{id} Ltd"),
                &[format!("finance@{id}.example")],
                chrono::Utc::now().timestamp(),
            )
            .await
            .unwrap();
        self.connect(id, org).await;
        let scope = MappingScope {
            tenant_id: id.into(),
            connector_id: "xero".into(),
        };
        for m in ledgerport::demo::sample_mappings() {
            store
                .set_mapping(&scope, &m, "test", chrono::Utc::now().timestamp())
                .await
                .unwrap();
        }
    }

    /// Connect `tenant` to the organisation `org` through the real OAuth flow.
    pub async fn connect(&self, tenant: &str, org: uuid::Uuid) {
        self.sim.set_auto_approve(Some(vec![org]));
        let url = self
            .d()
            .connections
            .begin_connect(tenant, "xero", "alice@example.com")
            .await
            .unwrap();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let r = client.get(url.as_str()).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 302, "{}", r.text().await.unwrap());
        let back = r.headers()["location"].to_str().unwrap().to_string();
        let r = client.get(&back).send().await.unwrap();
        assert!(
            r.status().is_success() || r.status().is_redirection(),
            "{}: {}",
            r.status(),
            r.text().await.unwrap()
        );
        let conns = self.d().store.connections(Some(tenant)).await.unwrap();
        assert_eq!(conns.len(), 1);
        assert_eq!(conns[0].state, ledgerport::store::ConnectionState::Active);
    }

    /// Post a document as the platform: status and body.
    pub async fn post(&self, doc: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url("/v1/documents"))
            .bearer_auth(SERVICE_KEY)
            .json(doc)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Deliveries by state, now.
    pub async fn counts(&self) -> BTreeMap<String, i64> {
        self.d()
            .store
            .delivery_counts(None)
            .await
            .unwrap()
            .into_iter()
            .collect()
    }

    /// Poll the counts until `done` holds (failing with `what` after
    /// `limit`); return them.
    pub async fn wait_counts(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&BTreeMap<String, i64>) -> bool,
    ) -> BTreeMap<String, i64> {
        let started = Instant::now();
        loop {
            let counts = self.counts().await;
            if done(&counts) {
                return counts;
            }
            assert!(
                started.elapsed() < limit,
                "{what} after {limit:?}: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until no delivery is pending or working; return counts by state.
    pub async fn settle(&self, limit: Duration) -> BTreeMap<String, i64> {
        self.wait_counts(limit, "not settled", |c| {
            c.get("pending").copied().unwrap_or(0) + c.get("working").copied().unwrap_or(0) == 0
        })
        .await
    }

    /// Wait until `n` deliveries are delivered; return counts by state.
    pub async fn wait_delivered(&self, n: i64, limit: Duration) -> BTreeMap<String, i64> {
        self.wait_counts(limit, &format!("not {n} delivered"), |c| {
            c.get("delivered") == Some(&n)
        })
        .await
    }

    /// Wait until the sink holds `n` mails.
    pub async fn wait_mail(&self, n: usize, limit: Duration) -> Vec<smtp_sink::Mail> {
        let started = Instant::now();
        loop {
            let m = self.smtp.mails();
            if m.len() >= n {
                return m;
            }
            assert!(
                started.elapsed() < limit,
                "expected {n} mails, got {}",
                m.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop every daemon.
    pub async fn stop(self) {
        for d in self.daemons {
            d.stop().await;
        }
    }
}

/// A sample document from `examples/documents`.
pub fn sample(file: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/documents")
        .join(file);
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// The sample invoice as `tenant`'s invoice `n`.
pub fn invoice(tenant: &str, n: usize) -> Value {
    let mut d = sample("invoice.json");
    d["tenant_id"] = json!(tenant);
    d["id"] = json!(format!("{tenant}-inv-{n}"));
    d["number"] = json!(format!("INV-{tenant}-{n:04}"));
    d
}

/// The sample credit note as `tenant`'s credit note `n`, crediting invoice `credits`.
pub fn credit_note(tenant: &str, n: usize, credits: usize) -> Value {
    let mut d = sample("credit-note.json");
    d["tenant_id"] = json!(tenant);
    d["id"] = json!(format!("{tenant}-cn-{n}"));
    d["number"] = json!(format!("CN-{tenant}-{n:04}"));
    d["credits_invoice_number"] = json!(format!("INV-{tenant}-{credits:04}"));
    d
}
