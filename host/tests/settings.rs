//! Connector settings per connection: the store on both engines (round
//! trip, values encrypted at rest, key rotation), the admin API (secrets
//! masked, every refusal naming the key, audited, kept across disconnect
//! and reconnect), and end to end: a connection with `status = DRAFT` makes
//! the Xero connector create a DRAFT bill in the simulator while another
//! connection gets the manifest's default, AUTHORISED. And a connector
//! without OAuth (the JSON webhook): connected at once once its settings
//! pass the connector's check, delivering signed documents to a loopback
//! receiver, pausing when its secret goes and resuming on reconnect.

mod common;
#[allow(dead_code)]
mod storage_support;

use ledgerport::capabilities::mapping::MappingScope;
use ledgerport::connections::Clock;
use ledgerport::connections::settings;
use ledgerport::crypto::KeyRing;
use ledgerport::daemon::Daemon;
use ledgerport::manifest::Manifest;
use ledgerport::store::admin::KeyScope;
use ledgerport::store::{Pool, Store};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use storage_support::{TestDb, keys};
use xero_sim::{DEFAULT_TENANT_TRADING, Sim, SimConfig, SimHandle};

const SECRET: &str = "whsec-0123456789abcdef-do-not-leak";
const SERVICE_KEY: &str = "settings-test-service-key";

macro_rules! both {
    ($sqlite:ident, $pg:ident, $f:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            $f(TestDb::sqlite()).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $pg() {
            if let Some(db) = TestDb::postgres().await {
                $f(db).await
            }
        }
    };
}

fn repo_manifest(rel: &str) -> Manifest {
    Manifest::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)).unwrap()
}

/// Every stored value as the database holds it.
async fn raw_values(s: &Store) -> Vec<(String, String, String)> {
    let q = "SELECT key, key_id, value FROM connection_settings ORDER BY key";
    match s.pool() {
        Pool::Sqlite(p) => sqlx::query_as(q).fetch_all(p).await.unwrap(),
        Pool::Postgres(p) => sqlx::query_as(q).fetch_all(p).await.unwrap(),
    }
}

async fn storage_round_trip(db: TestDb) {
    let s = db.store().await;
    let ring = keys(7);
    let webhook = repo_manifest("examples/webhook-connector/manifest.toml");
    let xero = repo_manifest("plugins/xero/manifest.toml");
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();

    // Nothing stored: the connector gets the manifest's defaults.
    let eff = settings::effective(&s, &ring, Some(&xero), "acme", "xero")
        .await
        .unwrap();
    assert_eq!(eff.get("status").map(String::as_str), Some("AUTHORISED"));

    settings::set(&s, &ring, &xero, "acme", "status", "DRAFT", "alice", 10)
        .await
        .unwrap();
    settings::set(
        &s,
        &ring,
        &webhook,
        "acme",
        "signing_secret",
        SECRET,
        "alice",
        11,
    )
    .await
    .unwrap();
    // Replaced in place.
    settings::set(&s, &ring, &xero, "acme", "status", "SUBMITTED", "bob", 12)
        .await
        .unwrap();
    let stored = s.connection_settings(&ring, "acme", "xero").await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].value.expose(), "SUBMITTED");
    assert_eq!(
        (stored[0].updated_by.as_deref(), stored[0].updated_at),
        (Some("bob"), 12)
    );
    let eff = settings::effective(&s, &ring, Some(&webhook), "acme", "webhook")
        .await
        .unwrap();
    assert_eq!(eff["signing_secret"], SECRET);
    assert_eq!(eff["endpoint"], "https://hooks.example.com/ledgerport");
    // Another tenant and another connector are apart.
    assert!(
        s.connection_settings(&ring, "globex", "xero")
            .await
            .unwrap()
            .is_empty()
    );

    // At rest: ciphertexts under the ring's key, no plaintext anywhere.
    let raw = raw_values(&s).await;
    assert_eq!(raw.len(), 2);
    for (key, key_id, value) in &raw {
        assert!(value.starts_with("lp1:"), "{key}: {value}");
        assert_eq!(*key_id, ring.current_key_id());
        assert!(!value.contains(SECRET) && !value.contains("SUBMITTED"));
    }
    // A ciphertext copied into another row does not decrypt there.
    let status_ct = &raw.iter().find(|r| r.0 == "status").unwrap().2;
    assert!(
        ring.decrypt(status_ct, &settings_ctx("acme", "webhook", "status"))
            .is_err()
    );

    // The admin's view masks the secret.
    let view = settings::view(&s, &ring, &webhook, "acme").await.unwrap();
    let secret = view.iter().find(|v| v.key == "signing_secret").unwrap();
    assert_eq!(
        (secret.value.as_deref(), secret.stored, secret.secret),
        (Some("set"), true, true)
    );
    assert!(!format!("{view:?}").contains(SECRET));

    // Key rotation re-encrypts settings, and the old key is no longer in use.
    let rotated = KeyRing::from_keys(&[[7; 32], [8; 32]]).unwrap();
    assert!(s.reencrypt_all(&rotated).await.unwrap() >= 2);
    assert_eq!(
        s.key_ids_in_use().await.unwrap(),
        vec![rotated.current_key_id().to_string()]
    );
    let new_only = KeyRing::from_keys(&[[8; 32]]).unwrap();
    let eff = settings::effective(&s, &new_only, Some(&webhook), "acme", "webhook")
        .await
        .unwrap();
    assert_eq!(eff["signing_secret"], SECRET);

    // Unset: the default applies again; a second unset names the key.
    settings::unset(&s, "xero", "acme", "status", "alice", 20)
        .await
        .unwrap();
    let eff = settings::effective(&s, &new_only, Some(&xero), "acme", "xero")
        .await
        .unwrap();
    assert_eq!(eff["status"], "AUTHORISED");
    let e = settings::unset(&s, "xero", "acme", "status", "alice", 21)
        .await
        .unwrap_err();
    assert_eq!(e.field(), "status");
    // Audited, the secret's value never.
    let audit = s.audit_log(Some("acme"), 10).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(
        actions,
        vec!["setting.unset", "setting.set", "setting.set", "setting.set"]
    );
    assert!(audit.iter().all(|a| !a.detail.contains(SECRET)));
    assert!(audit.iter().any(|a| a.detail == "xero status = SUBMITTED"));
}

both!(
    storage_round_trip_on_sqlite,
    storage_round_trip_on_postgres,
    storage_round_trip
);

fn settings_ctx(tenant: &str, connector: &str, key: &str) -> String {
    ledgerport::store::settings::ctx_setting(tenant, connector, key)
}

/// A daemon on SQLite with every installed connector and the simulator.
struct Env {
    sim: SimHandle,
    /// The webhook connector's receiver (its allowed origin points here).
    hooks: common::Listener,
    /// Where the daemon's notices go (incidents mailed at once).
    smtp: smtp_sink::SmtpSink,
    d: Daemon,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    _db: TestDb,
}

impl Env {
    async fn start() -> Self {
        let sim = Sim::start(SimConfig::default()).await.unwrap();
        let db = TestDb::sqlite();
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("k");
        std::fs::write(&key_file, ledgerport::crypto::generate_key()).unwrap();
        let mut cfg = storage_support::daemon_config(db.url(), &sim, &key_file);
        cfg.service_keys = vec![SERVICE_KEY.into()];
        let hooks = common::Listener::start().await;
        let smtp = smtp_sink::SmtpSink::start().await.unwrap();
        cfg.mail = Some(storage_support::sink_mail(smtp.addr().port()));
        cfg.dispatch.coalesce_secs = Some(0);
        cfg.plugins.insert(
            "webhook".into(),
            ledgerport::daemon::PluginSettings {
                base_urls: [("https://hooks.example.com".to_string(), hooks.base.clone())].into(),
                client_id: None,
                client_secret: None,
                broad_scopes: false,
            },
        );
        // Only the connectors these tests use (compiling every installed
        // one, the Python connector among them, costs tens of seconds).
        let plugins = dir.path().join("plugins");
        for id in ["xero", "webhook"] {
            let (from, to) = (cfg.plugin_dir.join(id), plugins.join(id));
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(&from)
                .unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask wasm`", from.display()))
            {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        }
        cfg.plugin_dir = plugins;
        let d = Daemon::start(cfg, Clock::system(), None).await.unwrap();
        Env {
            base: format!("http://{}", d.addr),
            sim,
            hooks,
            smtp,
            d,
            http: reqwest::Client::new(),
            _dir: dir,
            _db: db,
        }
    }

    /// A tenant connected to the simulator's Trading organisation through
    /// the real OAuth flow, its accounts mapped.
    async fn tenant(&self, id: &str) {
        let s = &self.d.store;
        s.upsert_tenant(id, &format!("{id} Ltd"), &[], 0)
            .await
            .unwrap();
        self.connect(id).await;
        let scope = MappingScope {
            tenant_id: id.into(),
            connector_id: "xero".into(),
        };
        for m in ledgerport::demo::sample_mappings() {
            s.set_mapping(&scope, &m, "test", 0).await.unwrap();
        }
    }

    async fn connect(&self, tenant: &str) {
        self.connect_to(tenant, DEFAULT_TENANT_TRADING).await;
    }

    /// Connect `tenant` to the simulator's organisation `org` (the grant
    /// covers that one alone).
    async fn connect_to(&self, tenant: &str, org: uuid::Uuid) {
        self.sim.set_auto_approve(Some(vec![org]));
        let url = self
            .d
            .connections
            .begin_connect(tenant, "xero", "alice@example.com")
            .await
            .unwrap();
        let b = storage_support::browser();
        let r = b.get(url.as_str()).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 302);
        let back = r.headers()["location"].to_str().unwrap().to_string();
        let r = b.get(&back).send().await.unwrap();
        assert!(r.status().is_success() || r.status().is_redirection());
        let c = self
            .d
            .store
            .connection_for(tenant, "xero")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.state, ledgerport::store::ConnectionState::Active);
    }

    async fn key(&self, tenant: &str) -> String {
        let scope = KeyScope::Tenant(tenant.into());
        self.d.store.issue_key(&scope, "page", 0).await.unwrap().1
    }

    /// An admin API call as a Super Admin: status and body.
    async fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self
            .http
            .request(m, format!("{}{path}", self.base))
            .bearer_auth(key)
            .header("x-ledgerport-admin", "alice@acme.example")
            .header("x-ledgerport-role", "super-admin");
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let s = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            s,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, doc: &Value) {
        let r = self
            .http
            .post(format!("{}/v1/documents", self.base))
            .bearer_auth(SERVICE_KEY)
            .json(doc)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
    }

    /// Wait until nothing is pending or working; the counts by state.
    async fn settle(&self) -> Vec<(String, i64)> {
        let started = Instant::now();
        loop {
            let counts = self.d.store.delivery_counts(None).await.unwrap();
            if counts
                .iter()
                .all(|(s, n)| *n == 0 || (s != "pending" && s != "working"))
            {
                return counts;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "not settled: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The Status of the bill numbered `number` in the simulator.
    fn bill_status(&self, number: &str) -> String {
        let docs = self.sim.documents(DEFAULT_TENANT_TRADING).unwrap();
        let bill = docs
            .invoices
            .iter()
            .find(|i| i["InvoiceNumber"] == number)
            .unwrap_or_else(|| panic!("no bill {number} in the simulator"));
        bill["Status"].as_str().unwrap().to_string()
    }
}

fn invoice(tenant: &str, n: usize) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/documents/invoice.json");
    let mut d: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    d["tenant_id"] = json!(tenant);
    d["id"] = json!(format!("{tenant}-inv-{n}"));
    d["number"] = json!(format!("INV-{tenant}-{n:04}"));
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_masks_secrets_and_names_the_key_of_every_refusal() {
    let env = Env::start().await;
    env.d
        .store
        .upsert_tenant("acme", "Acme", &[], 0)
        .await
        .unwrap();
    let key = env.key("acme").await;
    let at = |rest: &str| format!("/v1/admin/tenants/acme/settings/{rest}");

    // Declared settings with their descriptions, defaults and choices.
    let (s, v) = env.call("GET", &at("xero"), &key, None).await;
    assert_eq!(s, 200, "{v}");
    let status = &v["settings"][0];
    assert_eq!(status["key"], "status");
    assert_eq!(status["value"], "AUTHORISED");
    assert_eq!(status["stored"], false);
    assert_eq!(
        status["allowed"],
        json!(["DRAFT", "SUBMITTED", "AUTHORISED"])
    );
    assert!(status["description"].as_str().unwrap().contains("DRAFT"));

    // Refusals: 4xx, the key (or field) named, nothing stored.
    for (path, body, code, field, words) in [
        (
            at("xero/status"),
            json!({"value": "FINAL"}),
            422,
            "status",
            "DRAFT, SUBMITTED, AUTHORISED",
        ),
        (
            at("xero/colour"),
            json!({"value": "red"}),
            422,
            "colour",
            "unknown setting",
        ),
        (
            at("webhook/endpoint"),
            json!({"value": "x".repeat(3000)}),
            422,
            "endpoint",
            "too long",
        ),
        (
            at("webhook/signing_secret"),
            json!({"value": "short"}),
            422,
            "signing_secret",
            "too short",
        ),
        (
            at("xero/status"),
            json!({"status": "DRAFT"}),
            422,
            "status",
            "the fields are value",
        ),
        (
            at("xero/status"),
            json!({"value": 7}),
            422,
            "value",
            "string",
        ),
        (
            at("nosuch/status"),
            json!({"value": "DRAFT"}),
            404,
            "connector",
            "not installed",
        ),
    ] {
        let (s, v) = env.call("PUT", &path, &key, Some(body)).await;
        assert_eq!(s, code, "{path}: {v}");
        assert_eq!(v["problems"][0]["field"], field, "{path}: {v}");
        let msg = v["problems"][0]["message"].as_str().unwrap();
        assert!(msg.contains(words), "{path}: {msg}");
    }
    let (s, v) = env.call("DELETE", &at("xero/status"), &key, None).await;
    assert_eq!(
        (s, &v["problems"][0]["field"]),
        (422, &json!("status")),
        "{v}"
    );
    let (s, _) = env.call("GET", &at("nosuch"), &key, None).await;
    assert_eq!(s, 404);
    assert!(
        env.d
            .store
            .audit_log(Some("acme"), 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Only a Super Admin changes settings.
    let r = env
        .http
        .put(format!("{}{}", env.base, at("xero/status")))
        .bearer_auth(&key)
        .header("x-ledgerport-admin", "bob@acme.example")
        .header("x-ledgerport-role", "finance-manager")
        .json(&json!({"value": "DRAFT"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // A secret is write-only: the API says "set", never the value.
    let (s, v) = env
        .call(
            "PUT",
            &at("webhook/signing_secret"),
            &key,
            Some(json!({"value": SECRET})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = env.call("GET", &at("webhook"), &key, None).await;
    assert!(!v.to_string().contains(SECRET), "{v}");
    let secret = v["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == "signing_secret")
        .unwrap();
    assert_eq!(
        (&secret["value"], &secret["secret"]),
        (&json!("set"), &json!(true))
    );
    let (_, audit) = env
        .call("GET", "/v1/admin/tenants/acme/audit", &key, None)
        .await;
    assert_eq!(audit["audit"][0]["action"], "setting.set");
    assert_eq!(audit["audit"][0]["actor"], "alice@acme.example");
    assert!(!audit.to_string().contains(SECRET));

    // The Integrations page shows the settings; the secret field is empty.
    let b = storage_support::browser();
    let cookie = page_session(&env, &b, "acme").await;
    let integrations_page = || async {
        b.get(format!("{}/integrations", env.base))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let html = integrations_page().await;
    assert!(html.contains("id=\"settings\""), "{html}");
    assert!(html.contains("<select name=\"status\">"), "{html}");
    // ... and changes them, audited.
    let r = b
        .post(format!("{}/integrations/settings", env.base))
        .header("cookie", &cookie)
        .form(&[("status", "DRAFT")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let (_, v) = env.call("GET", &at("xero"), &key, None).await;
    assert_eq!(v["settings"][0]["value"], "DRAFT");
    assert_eq!(v["settings"][0]["updated_by"], "alice");
    let r = b
        .post(format!("{}/integrations/settings", env.base))
        .header("cookie", &cookie)
        .form(&[("status", "LATER")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    assert!(r.text().await.unwrap().contains("status: "));
    // A form is saved whole or not at all: a good endpoint beside a secret
    // too short leaves both as they were (the endpoint was once saved).
    let r = b
        .post(format!(
            "{}/integrations/settings?connector=webhook",
            env.base
        ))
        .header("cookie", &cookie)
        .form(&[
            ("endpoint", "https://hooks.example.com/other"),
            ("signing_secret", "short"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let text = r.text().await.unwrap();
    assert!(text.contains("signing_secret: "), "{text}");
    assert!(text.contains("Nothing was changed."), "{text}");
    let (_, v) = env.call("GET", &at("webhook"), &key, None).await;
    let endpoint = v["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == "endpoint")
        .unwrap();
    assert_eq!(endpoint["stored"], false, "{v}");
    // Clearing a value that is not stored refuses the form before anything
    // is saved (the status change beside it was once made first).
    let r = b
        .post(format!("{}/integrations/settings", env.base))
        .header("cookie", &cookie)
        .form(&[("status", "SUBMITTED"), ("unset", "status_of_nothing")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let (_, v) = env.call("GET", &at("xero"), &key, None).await;
    assert_eq!(v["settings"][0]["value"], "DRAFT", "{v}");
    // Clearing what another admin cleared since the form was shown is
    // already done, not a refusal.
    let r = b
        .post(format!(
            "{}/integrations/settings?connector=webhook",
            env.base
        ))
        .header("cookie", &cookie)
        .form(&[("unset", "endpoint"), ("unset", "endpoint")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let check = || {
        b.post(format!("{}/integrations/check", env.base))
            .header("cookie", &cookie)
            .send()
    };
    // Not connected: the menu has no Test connection, and a check says why.
    assert!(!html.contains("id=\"check\""), "{html}");
    let r = check().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.text().await.unwrap().contains("no xero connection"));
    // Connected: Test connection from the menu shows the organisation the
    // connection reaches, for any admin of the tenant.
    env.connect("acme").await;
    let html = integrations_page().await;
    assert!(html.contains("id=\"check\""), "{html}");
    let r = check().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let html = r.text().await.unwrap();
    assert!(
        html.contains("<strong id=\"organisation\">Acme Trading GmbH</strong>"),
        "{html}"
    );
    // Xero down: the check says what Xero answered (502), once the 5 s
    // between two checks of a connection have passed.
    env.sim.set_faults(xero_sim::FaultConfig {
        rules: vec![xero_sim::FaultRule {
            route: Some("GET /api.xro/2.0/Organisation".into()),
            error_503_rate: 1.0,
            ..Default::default()
        }],
        ..Default::default()
    });
    tokio::time::sleep(ledgerport::connections::check::CHECK_COOLDOWN).await;
    let r = check().await.unwrap();
    assert_eq!(r.status().as_u16(), 502);
    let html = r.text().await.unwrap();
    assert!(html.contains("Connection check failed"), "{html}");
    assert!(html.contains("503"), "what Xero answered: {html}");
    env.sim.set_faults(xero_sim::FaultConfig::default());
    // After a disconnect it says so instead.
    env.d
        .connections
        .disconnect(
            &env.d
                .store
                .connection_for("acme", "xero")
                .await
                .unwrap()
                .unwrap()
                .id,
            "alice",
        )
        .await
        .unwrap();
    let r = check().await.unwrap();
    assert_eq!(r.status().as_u16(), 409);
    assert!(r.text().await.unwrap().contains("disconnected"));
    env.d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_connection_creates_draft_bills_and_others_stay_authorised() {
    let env = Env::start().await;
    env.tenant("review").await;
    env.tenant("direct").await;
    let key = env.key("review").await;
    let (s, v) = env
        .call(
            "PUT",
            "/v1/admin/tenants/review/settings/xero/status",
            &key,
            Some(json!({"value": "DRAFT"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    env.post(&invoice("review", 1)).await;
    env.post(&invoice("direct", 1)).await;
    let counts = env.settle().await;
    assert!(counts.contains(&("delivered".into(), 2)), "{counts:?}");
    assert_eq!(env.bill_status("INV-review-0001"), "DRAFT");
    assert_eq!(env.bill_status("INV-direct-0001"), "AUTHORISED");

    // Settings are remembered across disconnect and reconnect, like mappings.
    let (s, v) = env
        .call(
            "POST",
            "/v1/admin/tenants/review/disconnect/xero",
            &key,
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = env
        .call("GET", "/v1/admin/tenants/review/settings/xero", &key, None)
        .await;
    assert_eq!(v["settings"][0]["value"], "DRAFT");
    env.connect("review").await;
    env.post(&invoice("review", 2)).await;
    env.settle().await;
    assert_eq!(env.bill_status("INV-review-0002"), "DRAFT");
    env.d.stop().await;
}

/// The arguments of `connect` for acme of the plugin at `manifest`, on the
/// database at `url`, with `extra` arguments.
fn connect_args(manifest: &str, url: &str, extra: &[&str]) -> Vec<String> {
    [
        "connect",
        "--tenant",
        "acme",
        "--admin",
        "ops@platform.example",
        "--plugin",
        manifest,
        "--database",
        url,
    ]
    .iter()
    .chain(extra)
    .map(|a| a.to_string())
    .collect()
}

/// `ledgerport settings get|set|unset` as a real process.
fn cli(args: &[&str], key: &str, stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut c = Command::new(env!("CARGO_BIN_EXE_ledgerport"))
        .args(args)
        .env("LEDGERPORT_SECRET_KEY", key)
        .env_remove("LEDGERPORT_SECRET_KEY_FILE")
        .env_remove("LEDGERPORT_TRUSTED_KEYS")
        // As on a host set up for Xero: commands for other connectors must
        // not trip over its OAuth settings.
        .env("LEDGERPORT_OAUTH_CLIENT_ID", xero_sim::DEFAULT_CLIENT_ID)
        .env(
            "LEDGERPORT_OAUTH_REDIRECT_URI",
            "http://127.0.0.1:9/oauth/callback",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(c.stdin.take());
    let o = c.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sets_gets_and_unsets_settings() {
    let db = TestDb::sqlite();
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let key = ledgerport::crypto::generate_key();
    let url = db.url();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let xero = root.join("plugins/xero/manifest.toml");
    let webhook = root.join("examples/webhook-connector/manifest.toml");
    let (xero, webhook) = (xero.to_str().unwrap(), webhook.to_str().unwrap());
    let run = |args: Vec<&str>, stdin: Option<&str>| {
        let mut a = vec!["settings"];
        a.extend(args);
        a.extend(["--tenant", "acme", "--database", url.as_str()]);
        cli(&a, &key, stdin)
    };

    let (code, _, err) = run(vec!["set", "--plugin", xero, "status=FINAL"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("status: \"FINAL\" is not allowed"), "{err}");
    let (code, out, err) = run(vec!["set", "--plugin", xero, "status=DRAFT"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("set status"), "{out}");
    // `connect` of a connector without OAuth: refused with the connector's
    // words while the secret is missing, exit 2, nothing stored.
    let installed = common::target_dir().join("plugins/webhook/manifest.toml");
    let connect = || {
        let args = connect_args(installed.to_str().unwrap(), &url, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args, &key, None)
    };
    let (code, out, err) = connect();
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("signing_secret"), "{err}");
    assert!(s.connection_for("acme", "webhook").await.unwrap().is_none());
    // A secret from standard input, never echoed back.
    let (code, _, err) = run(
        vec!["set", "--plugin", webhook, "signing_secret=-"],
        Some(&format!("{SECRET}\n")),
    );
    assert_eq!(code, 0, "{err}");
    // Now it connects at once, and again reconnects.
    let (code, out, err) = connect();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("connected acme to webhook (https://hooks.example.com/ledgerport)"),
        "{out}"
    );
    let (code, out, err) = connect();
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("reconnected acme"), "{out}");
    let c = s.connection_for("acme", "webhook").await.unwrap().unwrap();
    assert_eq!(c.state, ledgerport::store::ConnectionState::Active);
    assert_eq!(c.connected_by.as_deref(), Some("ops@platform.example"));
    let (code, out, _) = run(vec!["get", "--plugin", webhook, "--json"], None);
    assert_eq!(code, 0);
    assert!(!out.contains(SECRET), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[1]["key"], "signing_secret");
    assert_eq!(v[1]["value"], "set");
    let eff = settings::effective(
        &s,
        &KeyRing::from_base64(std::slice::from_ref(&key), "test").unwrap(),
        None,
        "acme",
        "webhook",
    )
    .await
    .unwrap();
    assert_eq!(
        eff["signing_secret"], SECRET,
        "stdin's line, without the newline"
    );
    let (code, out, _) = run(vec!["get", "--plugin", xero], None);
    assert_eq!(code, 0);
    assert!(out.contains("status\tDRAFT\t(this connection)"), "{out}");
    let (code, _, _) = run(vec!["unset", "--plugin", xero, "status"], None);
    assert_eq!(code, 0);
    let (code, out, _) = run(vec!["get", "--plugin", xero], None);
    assert_eq!(code, 0);
    assert!(out.contains("status\tAUTHORISED\t(default)"), "{out}");
    let (code, _, err) = run(vec!["unset", "--plugin", xero, "status"], None);
    assert_eq!(code, 2);
    assert!(err.contains("status: is not set"), "{err}");
}

/// `connect --plugin` under a trust list (`--trusted-key`, the daemon's
/// `trusted_keys`): an unsigned manifest is refused before anything of it
/// is used (its OAuth endpoints, its component), a signed one connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_connect_refuses_a_plugin_its_trust_list_does_not_cover() {
    let db = TestDb::sqlite();
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let key = ledgerport::crypto::generate_key();
    let url = db.url();
    let dir = tempfile::tempdir().unwrap();
    // A copy of the installed webhook connector, to sign.
    let plugin = dir.path().join("webhook");
    std::fs::create_dir_all(&plugin).unwrap();
    for e in std::fs::read_dir(common::target_dir().join("plugins/webhook")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), plugin.join(e.file_name())).unwrap();
        }
    }
    let manifest = plugin.join("manifest.toml");
    let m = manifest.to_str().unwrap();
    let signer = dir.path().join("signer.key");
    let (code, out, err) = cli(
        &["plugin", "keygen", "--out", signer.to_str().unwrap()],
        &key,
        None,
    );
    assert_eq!(code, 0, "{err}");
    let public = out
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .unwrap()
        .to_string();
    let (_, stranger) = ledgerport::signing::generate();
    let (code, _, err) = cli(
        &[
            "settings",
            "set",
            "--plugin",
            m,
            "--tenant",
            "acme",
            "--database",
            &url,
            "signing_secret=-",
        ],
        &key,
        Some(&format!("{SECRET}\n")),
    );
    assert_eq!(code, 0, "{err}");
    let connect_with = |manifest: &str, extra: &[&str]| {
        let args = connect_args(manifest, &url, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args, &key, None)
    };
    let connect =
        |manifest: &str, trusted: &str| connect_with(manifest, &["--trusted-key", trusted]);
    let (code, out, err) = connect(m, &public);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("not signed"), "{err}");
    assert!(s.connection_for("acme", "webhook").await.unwrap().is_none());
    // An OAuth connector's manifest too, before any consent address.
    let xero = common::target_dir().join("plugins/xero/manifest.toml");
    let (code, out, err) = connect(xero.to_str().unwrap(), &public);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("not signed"), "{err}");
    assert!(!out.contains("http"), "{out}");
    // Signed: refused by a list without its signer, connected by one with it.
    let (code, _, err) = cli(
        &["plugin", "sign", m, "--key", signer.to_str().unwrap()],
        &key,
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = connect(m, &stranger);
    assert_eq!(code, 2);
    assert!(err.contains("not a trusted key"), "{err}");
    // A blank key matches no signer: it refuses, it does not switch the
    // check off.
    let (code, _, err) = connect(m, " ");
    assert_eq!(code, 2);
    assert!(err.contains("not a trusted key"), "{err}");
    // `mappings set` and the `deliver` smoke test check it too.
    let unsigned = common::target_dir().join("plugins/webhook/manifest.toml");
    let unsigned = unsigned.to_str().unwrap();
    let (code, _, err) = cli(
        &[
            "mappings",
            "set",
            "--tenant",
            "acme",
            "--connector",
            "webhook",
            "fx-fee=404",
            "--plugin",
            unsigned,
            "--database",
            &url,
            "--trusted-key",
            &public,
        ],
        &key,
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not signed"), "{err}");
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/documents/invoice.json");
    let (code, _, err) = cli(
        &[
            "deliver",
            "--plugin",
            unsigned,
            "--document",
            doc.to_str().unwrap(),
            "--trusted-key",
            &public,
        ],
        &key,
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not signed"), "{err}");
    // The keys from the environment, comma-separated.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ledgerport"))
        .args(connect_args(m, &url, &[]))
        .env("LEDGERPORT_SECRET_KEY", &key)
        .env("LEDGERPORT_TRUSTED_KEYS", &stranger)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("LEDGERPORT_TRUSTED_KEYS"),
        "the refusal says where the list came from"
    );
    let (code, out, err) = connect(m, &format!("{stranger},{public}"));
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("connected acme to webhook"), "{out}");
    // Changed after signing (another allowed host): refused.
    let changed = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("https://hooks.example.com", "https://evil.example.com");
    assert!(
        changed.contains("evil.example.com"),
        "the manifest names its host"
    );
    let signed = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, changed).unwrap();
    let (code, _, err) = connect(m, &public);
    assert_eq!(code, 2);
    assert!(err.contains("does not match"), "{err}");
    // `settings` reads the manifest to know which values are secrets: an
    // altered one that no longer marks the signing secret would have
    // `get` print it. Refused, and nothing printed.
    let unmarked = signed.replace("secret = true\n", "");
    assert_ne!(unmarked, signed, "the manifest marks its secret");
    std::fs::write(&manifest, &unmarked).unwrap();
    let settings = |verb: &str, extra: &[&str], trusted: &str| {
        let mut args = vec![
            "settings",
            verb,
            "--plugin",
            m,
            "--tenant",
            "acme",
            "--database",
            &url,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--trusted-key", trusted]);
        cli(&args, &key, None)
    };
    let (code, out, err) = settings("get", &[], &public);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("does not match"), "{err}");
    assert!(!out.contains(SECRET) && !err.contains(SECRET), "{out}{err}");
    let (code, _, err) = settings("set", &["endpoint=https://hooks.example.com/x"], &public);
    assert_eq!(code, 2);
    assert!(err.contains("does not match"), "{err}");
    let (code, _, err) = settings("unset", &["endpoint"], &public);
    assert_eq!(code, 2);
    assert!(err.contains("does not match"), "{err}");
    std::fs::write(&manifest, &signed).unwrap();
    // As signed: shown, the secret only as set.
    let (code, out, err) = settings("get", &[], &public);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("signing_secret"), "{out}");
    assert!(!out.contains(SECRET), "{out}");
    let (code, _, err) = settings("get", &[], &stranger);
    assert_eq!(code, 2);
    assert!(err.contains("not a trusted key"), "{err}");
    // Without a trust list the CLI loads what it is given, as before.
    let (code, out, err) = connect_with(m, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("reconnected acme"), "{out}");
}

/// What `probe` finds, polling every 100 ms for at most 30 s (then the
/// test fails naming `what`).
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited 30 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sign in to the Integrations page as a Super Admin of `tenant`: the
/// session cookie.
async fn page_session(env: &Env, b: &reqwest::Client, tenant: &str) -> String {
    page_session_as(env, b, tenant, "alice", "super-admin").await
}

/// Sign in to the Integrations page as the platform does: ask for a
/// one-time link with the tenant's key, open it; the session cookie.
async fn page_session_as(
    env: &Env,
    b: &reqwest::Client,
    tenant: &str,
    admin: &str,
    role: &str,
) -> String {
    let page_key = env.key(tenant).await;
    let (s, v) = env
        .call(
            "POST",
            &format!("/v1/admin/tenants/{tenant}/page-sessions"),
            &page_key,
            Some(json!({"admin": admin, "role": role})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let r = b
        .get(format!("{}{}", env.base, v["login"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    storage_support::session_cookie(&r)
}

/// A connector without OAuth, end to end through the admin API and the
/// Integrations page: connecting is refused (and stores nothing) while the
/// connector's check refuses the settings; once they pass it connects at
/// once without tokens; its mappings are its own and unchecked (no chart of
/// accounts); a document reaches the loopback receiver signed with the
/// tenant's secret; without the secret the connection pauses, and
/// reconnecting from the page resumes it with nothing lost; disconnecting
/// has nothing to revoke and keeps the mappings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_connects_without_oauth_delivers_signed_and_resumes_on_reconnect() {
    use hmac::{Hmac, Mac};
    let env = Env::start().await;
    env.d
        .store
        .upsert_tenant("acme", "Acme", &["finance@acme.example".into()], 0)
        .await
        .unwrap();
    let key = env.key("acme").await;
    let at = |rest: &str| format!("/v1/admin/tenants/acme/{rest}");
    let secret = |v: Option<&str>| {
        let env = &env;
        let key = &key;
        let path = at("settings/webhook/signing_secret");
        let v = v.map(|v| json!({ "value": v }));
        async move {
            let method = if v.is_some() { "PUT" } else { "DELETE" };
            let (s, body) = env.call(method, &path, key, v).await;
            assert_eq!(s, 200, "{body}");
        }
    };

    // No signing secret: refused with the connector's words, nothing stored.
    let (s, v) = env.call("POST", &at("connect/webhook"), &key, None).await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["problems"][0]["field"], "settings", "{v}");
    assert!(
        v["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("signing_secret"),
        "{v}"
    );
    let store = &env.d.store;
    assert!(
        store
            .connection_for("acme", "webhook")
            .await
            .unwrap()
            .is_none()
    );
    // An unknown connector is 404 naming it; Xero still answers with the
    // consent screen's URL.
    let (s, v) = env.call("POST", &at("connect/nope"), &key, None).await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["problems"][0]["field"], "connector", "{v}");
    let (s, v) = env.call("POST", &at("connect/xero"), &key, None).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["authorize_url"].as_str().is_some(), "{v}");

    // With the secret: connected at once, active, no tokens stored.
    secret(Some(SECRET)).await;
    let (s, v) = env.call("POST", &at("connect/webhook"), &key, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["connected"], true);
    assert_eq!(v["reconnected"], false);
    assert_eq!(v["state"], "active");
    assert_eq!(v["organisation"], "https://hooks.example.com/ledgerport");
    assert!(!v.to_string().contains(SECRET));
    let conn_id = v["connection_id"].as_str().unwrap().to_string();
    let snap = store
        .token_snapshot(&env.d.connections.keys(), &conn_id)
        .await
        .unwrap();
    assert!(matches!(snap, Some((_, None))), "no tokens: {snap:?}");

    // Its mappings: typed codes, not checked against a chart of accounts
    // (it has none), kept apart from Xero's; an unknown connector is 404.
    let (s, v) = env
        .call(
            "PUT",
            &at("mappings/gross-salary?connector=nope"),
            &key,
            Some(json!({"account_code": "6000"})),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["problems"][0]["field"], "connector");
    let doc = invoice("acme", 1);
    let kinds: Vec<String> = doc["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap().to_string())
        .collect();
    for (i, kind) in kinds.iter().enumerate() {
        let (s, v) = env
            .call(
                "PUT",
                &at(&format!("mappings/{kind}?connector=webhook")),
                &key,
                Some(json!({"account_code": format!("6{i:03}")})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["connector"], "webhook");
        assert_eq!(v["validated_against"], Value::Null, "{v}");
    }
    let (_, v) = env.call("GET", &at("mappings"), &key, None).await;
    assert_eq!(v["mappings"].as_array().unwrap().len(), 0, "Xero's: {v}");
    let (_, v) = env
        .call("GET", &at("mappings?connector=webhook"), &key, None)
        .await;
    assert_eq!(v["mappings"].as_array().unwrap().len(), kinds.len(), "{v}");

    // A mapping's fields are checked by name (a code that is not a string,
    // a misspelt key: once stored without it); one kind's mapping can be
    // removed (404 naming kind when there is none) and set again.
    let one = at(&format!("mappings/{}?connector=webhook", kinds[0]));
    for (body, field) in [
        (json!({"account_code": 6000}), "account_code"),
        (json!({"account_code": "6000", "tax_tipe": "X"}), "tax_tipe"),
        (json!({"account_code": "6000", "tax_type": 7}), "tax_type"),
    ] {
        let (s, v) = env.call("PUT", &one, &key, Some(body.clone())).await;
        assert_eq!(s, 422, "{body}: {v}");
        assert_eq!(v["problems"][0]["field"], field, "{body}: {v}");
    }
    let (s, v) = env.call("DELETE", &one, &key, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["deleted"], true);
    let (s, v) = env.call("DELETE", &one, &key, None).await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["problems"][0]["field"], "kind", "{v}");
    let (_, v) = env
        .call("GET", &at("mappings?connector=webhook"), &key, None)
        .await;
    assert_eq!(
        v["mappings"].as_array().unwrap().len(),
        kinds.len() - 1,
        "{v}"
    );
    let (s, v) = env
        .call("PUT", &one, &key, Some(json!({"account_code": "6000"})))
        .await;
    assert_eq!(s, 200, "{v}");

    // A document reaches the receiver, signed with the tenant's secret.
    env.post(&doc).await;
    let counts = env.settle().await;
    assert!(counts.contains(&("delivered".into(), 1)), "{counts:?}");
    let got = env.hooks.all();
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!(r.path, "/ledgerport");
    let sig = r.header("x-ledgerport-signature").unwrap();
    let (t, v1) = sig
        .split_once(",v1=")
        .and_then(|(t, v1)| Some((t.strip_prefix("t=")?, v1)))
        .unwrap_or_else(|| panic!("signature header {sig:?}"));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    assert_eq!(hex::encode(mac.finalize().into_bytes()), v1, "signature");
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["document"]["number"], "INV-acme-0001");
    assert_eq!(body["document"]["lines"][0]["account_code"], "6000");
    assert!(!String::from_utf8_lossy(&r.body).contains(SECRET));

    // Without its secret the connector cannot sign: the connection pauses
    // and the document waits.
    secret(None).await;
    env.post(&invoice("acme", 2)).await;
    let c = eventually("the connection needs re-authorisation", || async {
        let c = store.connection_for("acme", "webhook").await.unwrap()?;
        (c.state == ledgerport::store::ConnectionState::NeedsReauth).then_some(c)
    })
    .await;
    assert!(
        c.state_reason
            .unwrap_or_default()
            .contains("signing_secret"),
        "the reason names the setting"
    );
    assert_eq!(env.hooks.count(), 1);
    // The tenant is told to fix the connection, not to re-authorise.
    let mail = eventually("a notice", || async { env.smtp.mails().pop() }).await;
    assert_eq!(mail.to, vec!["finance@acme.example".to_string()]);
    let subject = mail.header("subject").unwrap_or_default();
    assert!(
        subject.starts_with("Action needed: fix the JSON webhook connection"),
        "{subject}"
    );
    assert!(!mail.data.contains(SECRET));

    // The page: the webhook's own card, waiting; reconnecting from it is
    // refused while the secret is missing, then connects and resumes.
    let b = storage_support::browser();
    let cookie = page_session(&env, &b, "acme").await;
    let get = |path: &str| {
        b.get(format!("{}{path}", env.base))
            .header("cookie", &cookie)
            .send()
    };
    let post = |path: &str| {
        b.post(format!("{}{path}", env.base))
            .header("cookie", &cookie)
            .send()
    };
    let html = get("/integrations").await.unwrap().text().await.unwrap();
    assert!(
        html.contains("<div class=\"card\" id=\"webhook_card\"><h2>JSON webhook</h2>"),
        "{html}"
    );
    assert!(
        html.contains(
            "id=\"webhook_status\" data-state=\"needs-reauth\">Needs you to reconnect</span>"
        ),
        "{html}"
    );
    assert!(
        html.contains("id=\"status\" data-state=\"not connected\">Not connected</span>"),
        "Xero's card: {html}"
    );
    assert!(
        html.contains("action=\"/integrations/connect?connector=webhook\""),
        "{html}"
    );
    let r = post("/integrations/connect?connector=webhook")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    assert!(r.text().await.unwrap().contains("signing_secret"));
    secret(Some(SECRET)).await;
    // The secret is back, but until the connection is connected again a
    // new document waits as well: nothing is sent on a connection that is
    // not active (a webhook has no tokens to stop it).
    env.post(&invoice("acme", 3)).await;
    eventually("the new document paused", || async {
        let counts = store.delivery_counts(None).await.unwrap();
        counts.contains(&("paused".into(), 2)).then_some(())
    })
    .await;
    assert_eq!(env.hooks.count(), 1);
    let r = post("/integrations/connect?connector=nope").await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = post("/integrations/connect?connector=webhook")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let html = r.text().await.unwrap();
    assert!(
        html.contains("id=\"connected\">JSON webhook is connected"),
        "{html}"
    );
    // The paused document resumes by itself (the dispatcher looks each
    // second) and is delivered.
    eventually("every document delivered", || async {
        let counts = store.delivery_counts(None).await.unwrap();
        counts.contains(&("delivered".into(), 3)).then_some(())
    })
    .await;
    let got = env.hooks.all();
    assert_eq!(got.len(), 3, "each paused document, once");
    let mut numbers: Vec<String> = got[1..]
        .iter()
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            body["document"]["number"].as_str().unwrap().to_string()
        })
        .collect();
    numbers.sort();
    assert_eq!(numbers, ["INV-acme-0002", "INV-acme-0003"]);
    let html = get("/integrations").await.unwrap().text().await.unwrap();
    assert!(
        html.contains("id=\"webhook_status\" data-state=\"active\">Connected</span>"),
        "{html}"
    );
    assert!(
        html.contains("<tr data-number=\"INV-acme-0002\" data-connector=\"webhook\"><td>INV-acme-0002</td><td>JSON webhook</td><td class=\"delivered\">"),
        "{html}"
    );
    // Test connection and Configure on its card.
    let r = post("/integrations/check?connector=webhook").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let html = r.text().await.unwrap();
    assert!(
        html.contains("<strong id=\"organisation\">https://hooks.example.com/ledgerport</strong> in JSON webhook"),
        "{html}"
    );
    // A mapping notice's link opens that connection's Configure; an id that
    // is not this tenant's connection just shows the page.
    let r = get(&format!("/integrations?configure={conn_id}"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(
        r.headers()["location"],
        "/integrations/configure?connector=webhook"
    );
    let r = get("/integrations?configure=someone-elses").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let html = get("/integrations/configure?connector=webhook")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("<input type=\"text\" name=\"gross-salary\" value=\"6000\""),
        "typed codes: {html}"
    );

    // Disconnect: nothing to revoke, no problems; the mappings stay.
    let (s, v) = env
        .call("POST", &at("disconnect/webhook"), &key, None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["problems"], json!([]), "{v}");
    assert_eq!(v["already_disconnected"], false, "{v}");
    assert_eq!(v["token_revoked"], false, "nothing to revoke: {v}");
    let c = store
        .connection_for("acme", "webhook")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.state, ledgerport::store::ConnectionState::Disconnected);
    let (_, v) = env
        .call("GET", &at("mappings?connector=webhook"), &key, None)
        .await;
    assert_eq!(v["mappings"].as_array().unwrap().len(), kinds.len(), "{v}");
    let events = store.connection_events(&conn_id).await.unwrap();
    let kinds_of: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert!(kinds_of.contains(&"connected"), "{kinds_of:?}");
    assert!(kinds_of.contains(&"reconnected"), "{kinds_of:?}");
    assert_eq!(
        events.last().map(|e| e.detail.as_str()),
        Some("alice@acme.example disconnected"),
        "{events:?}"
    );
    let (_, audit) = env.call("GET", &at("audit"), &key, None).await;
    let actions: Vec<(&str, &str)> = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["action"].as_str().unwrap(),
                a["detail"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(actions.contains(&("connect", "webhook")), "{actions:?}");
    assert!(
        actions.contains(&("mapping.set", "webhook gross-salary -> 6000")),
        "{actions:?}"
    );
    env.d.stop().await;
}

/// The delivery log on the Integrations page filters by state (the link in
/// a failure notice, `?log=failed`, shows just the failed documents) and
/// finds a document by its number; each filter shows its count; an unknown
/// state is refused naming `log` (the API's list naming `state`), never an
/// empty list that reads as "nothing failed". The page and the API page
/// through older deliveries, each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_log_filters_by_state_and_finds_by_number() {
    let env = Env::start().await;
    env.tenant("acme").await;
    env.post(&invoice("acme", 1)).await;
    env.post(&invoice("acme", 2)).await;
    let mut yen = invoice("acme", 3);
    yen["currency"] = json!("CHF"); // not enabled in the organisation
    env.post(&yen).await;
    let counts = env.settle().await;
    assert!(counts.contains(&("delivered".into(), 2)), "{counts:?}");
    assert!(counts.contains(&("failed".into(), 1)), "{counts:?}");

    let b = storage_support::browser();
    let cookie = page_session(&env, &b, "acme").await;
    let get = |path: String| {
        let b = b.clone();
        let cookie = cookie.clone();
        let url = format!("{}{path}", env.base);
        async move {
            let r = b.get(url).header("cookie", cookie).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let row = |n: usize| format!("<tr data-number=\"INV-acme-{n:04}\"");

    // A delivered row's address is a link only when it is http(s): one
    // stored before the runtime checked receipts may hold anything.
    let ledgerport::store::Pool::Sqlite(pool) = env.d.store.pool() else {
        unreachable!("SQLite here")
    };
    sqlx::query(
        "UPDATE deliveries SET external_url = 'javascript:alert(document.domain)' WHERE document_number = 'INV-acme-0001'",
    )
    .execute(pool)
    .await
    .unwrap();
    let r = b
        .get(format!("{}/integrations", env.base))
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap();
    // The page's policy: no script, no framing.
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    // Not `no-referrer`: a browser then sends `Origin: null` with the
    // page's own forms (the browser test's Connect was refused so).
    assert_eq!(r.headers()["referrer-policy"], "same-origin");
    let html = r.text().await.unwrap();
    assert!(!html.contains("javascript:"), "{html}");
    assert!(html.contains(&row(1)), "{html}");
    // The other delivered row keeps its link to the simulator's bill.
    assert!(html.contains("<a href=\"http"), "{html}");

    // Everything, with a count per state.
    let (s, html) = get("/integrations".into()).await;
    assert_eq!(s, 200);
    for n in 1..=3 {
        assert!(html.contains(&row(n)), "{n}: {html}");
    }
    assert!(
        html.contains("id=\"log-all\" class=\"current\" aria-current=\"page\">All (3)</a>"),
        "{html}"
    );
    assert!(html.contains("id=\"log-failed\">Failed (1)</a>"), "{html}");
    assert!(
        html.contains("id=\"log-delivered\">Delivered (2)</a>"),
        "{html}"
    );
    assert!(html.contains("id=\"log-paused\">Paused (0)</a>"), "{html}");
    assert!(!html.contains("id=\"retry-all\""), "{html}");

    // The notice's link: only the failed one, and Retry for all of them.
    let (s, html) = get("/integrations?log=failed".into()).await;
    assert_eq!(s, 200);
    assert!(html.contains(&row(3)), "{html}");
    assert!(!html.contains(&row(1)) && !html.contains(&row(2)), "{html}");
    assert!(
        html.contains("<h2 id=\"log-heading\">Delivery log: failed</h2>"),
        "{html}"
    );
    assert!(
        html.contains("class=\"current\" aria-current=\"page\">Failed (1)</a>"),
        "{html}"
    );
    assert!(html.contains("Retry all 1 failed"), "{html}");
    assert!(html.contains("CHF"), "Xero's words in the row: {html}");
    let (_, html) = get("/integrations?log=delivered".into()).await;
    assert!(html.contains(&row(1)) && html.contains(&row(2)), "{html}");
    assert!(!html.contains(&row(3)), "{html}");
    let (_, html) = get("/integrations?log=paused".into()).await;
    assert!(
        html.contains("id=\"log-empty\">No paused documents."),
        "{html}"
    );

    // Find by number (whitespace around it ignored); escaped when shown.
    let (_, html) = get("/integrations?log=all&number=+INV-acme-0002+".into()).await;
    assert!(html.contains(&row(2)), "{html}");
    assert!(!html.contains(&row(1)) && !html.contains(&row(3)), "{html}");
    assert!(
        html.contains("value=\"INV-acme-0002\""),
        "kept in the box: {html}"
    );
    let (_, html) = get("/integrations?number=%3Cb%3Enope".into()).await;
    assert!(
        html.contains("No document numbered &lt;b&gt;nope here."),
        "{html}"
    );

    // An unknown state is refused, naming the parameter.
    let (s, html) = get("/integrations?log=broken".into()).await;
    assert_eq!(s, 400);
    assert!(
        html.contains("log: &quot;broken&quot; is not a delivery state"),
        "{html}"
    );
    let r = env
        .http
        .get(format!(
            "{}/v1/tenants/acme/deliveries?state=broken",
            env.base
        ))
        .bearer_auth(SERVICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["problems"][0]["field"], "state", "{v}");
    let r = env
        .http
        .get(format!(
            "{}/v1/tenants/acme/deliveries?state=failed",
            env.base
        ))
        .bearer_auth(SERVICE_KEY)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let rows = v["deliveries"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v}");
    assert_eq!(rows[0]["document_number"], "INV-acme-0003");

    // The API pages with `next`: every delivery once, then no `next`.
    let list = |query: String| {
        let url = format!("{}/v1/tenants/acme/deliveries?{query}", env.base);
        let http = env.http.clone();
        async move {
            let r = http.get(url).bearer_auth(SERVICE_KEY).send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }
    };
    let (s, first) = list("limit=2".into()).await;
    assert_eq!(s, 200);
    assert_eq!(first["deliveries"].as_array().unwrap().len(), 2, "{first}");
    let next = first["next"].as_str().expect("a full page has a next");
    let (_, second) = list(format!("limit=2&after={next}")).await;
    assert_eq!(
        second["deliveries"].as_array().unwrap().len(),
        1,
        "{second}"
    );
    assert_eq!(second["next"], Value::Null, "{second}");
    let mut seen: Vec<String> = [&first, &second]
        .iter()
        .flat_map(|p| p["deliveries"].as_array().unwrap().clone())
        .map(|r| r["document_number"].as_str().unwrap().to_string())
        .collect();
    seen.sort();
    assert_eq!(seen, ["INV-acme-0001", "INV-acme-0002", "INV-acme-0003"]);
    let (s, v) = list("after=yesterday".into()).await;
    assert_eq!(s, 400);
    assert_eq!(v["problems"][0]["field"], "after", "{v}");
    // The admin API's log (with attempts) checks and pages the same way.
    let key = env.key("acme").await;
    let at = |q: &str| format!("/v1/admin/tenants/acme/deliveries?{q}");
    let (s, v) = env.call("GET", &at("state=broken"), &key, None).await;
    assert_eq!(s, 400);
    assert_eq!(v["problems"][0]["field"], "state", "{v}");
    let (s, v) = env.call("GET", &at("after=x"), &key, None).await;
    assert_eq!(s, 400);
    assert_eq!(v["problems"][0]["field"], "after", "{v}");
    let (s, page) = env.call("GET", &at("limit=2"), &key, None).await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(page["deliveries"].as_array().unwrap().len(), 2);
    assert!(page["deliveries"][0]["attempts"].is_array(), "{page}");
    let next = page["next"].as_str().unwrap();
    let (_, last) = env
        .call("GET", &at(&format!("limit=2&after={next}")), &key, None)
        .await;
    assert_eq!(last["deliveries"].as_array().unwrap().len(), 1, "{last}");
    assert_eq!(last["next"], Value::Null);
    // Retry refuses a body that says something else (`{"id": 42}` once
    // requeued every failed delivery), an id that is not the tenant's (404)
    // and one that is not failed (409), each naming id; a body that is not
    // JSON names body, one sent as a form content-type.
    let retry = "/v1/admin/tenants/acme/deliveries/retry";
    let delivered = page["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .chain(last["deliveries"].as_array().unwrap())
        .find(|d| d["delivery"]["state"] == "delivered")
        .map(|d| d["delivery"]["id"].as_str().unwrap().to_string())
        .expect("a delivered row");
    for (body, status, field) in [
        (json!({"id": 42}), 422, "id"),
        (json!({"id": null}), 422, "id"),
        (json!({"ids": ["x"]}), 422, "ids"),
        (json!({"id": "dlv-nope"}), 404, "id"),
        (json!({"id": delivered}), 409, "id"),
        (json!([1]), 400, "body"),
    ] {
        let (s, v) = env.call("POST", retry, &key, Some(body.clone())).await;
        assert_eq!(s, status, "{body}: {v}");
        assert_eq!(v["problems"][0]["field"], field, "{body}: {v}");
    }
    for (content_type, body, status, field) in [
        ("application/json", "{nope", 400, "body"),
        (
            "application/x-www-form-urlencoded",
            "id=x",
            415,
            "content-type",
        ),
    ] {
        let r = env
            .http
            .post(format!("{}{retry}", env.base))
            .bearer_auth(&key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["problems"][0]["field"], field, "{body}: {v}");
    }
    let (_, v) = env.call("GET", &at("state=failed"), &key, None).await;
    assert_eq!(
        v["deliveries"].as_array().unwrap().len(),
        1,
        "the refusals requeued nothing: {v}"
    );
    // Another tenant's admin cannot retry acme's failed delivery by its id.
    let failed_id = v["deliveries"][0]["delivery"]["id"]
        .as_str()
        .expect("acme's failed delivery")
        .to_string();
    env.d
        .store
        .upsert_tenant("globex", "Globex", &[], 0)
        .await
        .unwrap();
    let globex = env.key("globex").await;
    let (s, g) = env
        .call(
            "POST",
            "/v1/admin/tenants/globex/deliveries/retry",
            &globex,
            Some(json!({"id": failed_id})),
        )
        .await;
    assert_eq!(s, 404, "{g}");
    assert_eq!(g["problems"][0]["field"], "id", "{g}");
    let (_, v) = env.call("GET", &at("state=failed"), &key, None).await;
    assert_eq!(
        v["deliveries"][0]["delivery"]["id"], failed_id,
        "still failed, not requeued by another tenant: {v}"
    );
    // What axum itself refuses is JSON naming the field too: a query value
    // of the wrong type, a method the route does not take.
    let (s, v) = env.call("GET", &at("limit=many"), &key, None).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["problems"][0]["field"], "limit", "{v}");
    // Without a key the answer is 401, before the input is looked at (and
    // a body is never read).
    for (method, path) in [
        ("GET", at("limit=many")),
        (
            "POST",
            "/v1/admin/tenants/acme/deliveries/retry".to_string(),
        ),
    ] {
        let r = env
            .http
            .request(method.parse().unwrap(), format!("{}{path}", env.base))
            .header("content-type", "application/json")
            .body("{nope")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{method} {path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["problems"][0]["field"], "authorization", "{v}");
    }
    let (s, v) = list("limit=many".into()).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["problems"][0]["field"], "limit", "{v}");
    let r = env
        .http
        .get(format!("{}{retry}", env.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["problems"][0]["field"], "method", "{v}");
    assert!(
        v["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("GET"),
        "{v}"
    );
    // The platform's list answers 404 for a tenant that does not exist
    // (it answered an empty list, as for a tenant with nothing sent).
    let r = env
        .http
        .get(format!("{}/v1/tenants/nobody/deliveries", env.base))
        .bearer_auth(SERVICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["problems"][0]["field"], "tenant", "{v}");

    let (_, api) = env.call("GET", "/openapi.json", &key, None).await;
    assert!(
        api["paths"]["/v1/tenants/{tenant}/deliveries"]["get"]["summary"]
            .as_str()
            .unwrap()
            .contains("?after="),
        "{api}"
    );

    // The page shows the latest 50, then older ones a page at a time. (The
    // grant is revoked first, so that the 50 more pause at once instead of
    // waiting on Xero's rate limit.)
    for g in env.sim.grants() {
        env.sim.revoke_grant(g.auth_event_id);
    }
    for n in 4..=53 {
        env.post(&invoice("acme", n)).await;
    }
    let counts = env.settle().await;
    assert!(counts.contains(&("paused".into(), 50)), "{counts:?}");
    let numbers = |html: &str| -> Vec<String> {
        html.split("<tr data-number=\"")
            .skip(1)
            .map(|r| r.split('"').next().unwrap().to_string())
            .collect()
    };
    let (_, html) = get("/integrations".into()).await;
    let mut shown = numbers(&html);
    assert_eq!(shown.len(), 50, "{html}");
    assert!(!html.contains("id=\"log-newest\""), "{html}");
    let older = html
        .split(" id=\"log-older\"")
        .next()
        .and_then(|h| h.rsplit("<a href=\"").next())
        .map(|h| h.trim_end_matches('"').replace("&amp;", "&"))
        .unwrap_or_else(|| panic!("no Older link: {html}"));
    assert!(older.starts_with("/integrations?log=all&after="), "{older}");
    let (s, html) = get(older).await;
    assert_eq!(s, 200);
    let rest = numbers(&html);
    assert_eq!(rest.len(), 3, "{html}");
    assert!(html.contains("id=\"log-newest\">Newest</a>"), "{html}");
    assert!(!html.contains("id=\"log-older\""), "{html}");
    shown.extend(rest);
    shown.sort();
    shown.dedup();
    assert_eq!(shown.len(), 53, "every delivery on one page or the other");
    let (s, html) = get("/integrations?after=nope".into()).await;
    assert_eq!(s, 400);
    assert!(html.contains("after: &quot;nope&quot;"), "{html}");
    env.d.stop().await;
}

/// The page's Configure form saves the rows the admin changed, all or
/// none: one code that is not an account refuses the whole form, naming
/// its line type, and changes nothing (the rows before it were saved one
/// by one); "not mapped" clears a mapping; an unchanged row keeps its tax
/// type and who set it; a mapped code that is no longer an active account
/// is shown chosen, so saving the form does not clear it unasked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mapping_form_saves_every_changed_row_or_none() {
    let env = Env::start().await;
    env.tenant("acme").await;
    let b = storage_support::browser();
    let cookie = page_session(&env, &b, "acme").await;
    let scope = MappingScope {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
    };
    let mapped = || async {
        env.d
            .store
            .mappings(&scope)
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.mapping.kind.clone(), m))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let post = |form: Vec<(&'static str, &'static str)>| {
        let b = b.clone();
        let cookie = cookie.clone();
        let url = format!("{}/integrations/mappings", env.base);
        async move {
            let r = b
                .post(url)
                .header("cookie", cookie)
                .form(&form)
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            (s, r.text().await.unwrap())
        }
    };
    let before = mapped().await;
    assert_eq!(before["gross-salary"].mapping.account_code, "477");

    // A form posted from another site (its Origin) is refused, even with
    // the admin's cookie; one from the page's own origin is taken.
    for origin in ["http://evil.example", "null"] {
        let r = b
            .post(format!("{}/integrations/mappings", env.base))
            .header("cookie", &cookie)
            .header("origin", origin)
            .form(&[("gross-salary", "478")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{origin}");
        assert!(r.text().await.unwrap().contains("origin: "));
    }
    assert_eq!(mapped().await["gross-salary"].mapping.account_code, "477");
    let r = b
        .post(format!("{}/integrations/retry", env.base))
        .header("cookie", &cookie)
        .header("origin", &env.base)
        .form(&[("id", "dlv-none")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404, "same origin: on to the handler");

    // A good change, then a code that is not an account: nothing is saved.
    let (s, html) = post(vec![
        ("gross-salary", "478"),
        ("fx-fee", "999"),
        ("management-fee", "429"),
    ])
    .await;
    assert_eq!(s, 422, "{html}");
    assert!(html.contains("fx-fee: "), "{html}");
    assert!(html.contains("999"), "{html}");
    assert!(html.contains("Nothing was changed."), "{html}");
    let after = mapped().await;
    assert_eq!(
        after["gross-salary"].mapping.account_code, "477",
        "not half saved"
    );
    assert_eq!(after["fx-fee"].mapping.account_code, "404");

    // More rows than any chart needs: refused whole, naming the field.
    let many: Vec<(String, String)> = (0..1_001)
        .map(|i| (format!("kind-{i}"), "477".to_string()))
        .collect();
    let r = b
        .post(format!("{}/integrations/mappings", env.base))
        .header("cookie", &cookie)
        .form(&many)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let html = r.text().await.unwrap();
    assert!(
        html.contains("mappings: the form holds 1001 line kinds"),
        "{html}"
    );
    assert_eq!(mapped().await.len(), after.len(), "nothing saved");

    // A change and a clear, with an unchanged row beside them (a kind
    // sent twice: the last one counts).
    let (s, html) = post(vec![
        ("gross-salary", "999"),
        ("gross-salary", "478"),
        ("fx-fee", ""),
        ("management-fee", "429"),
    ])
    .await;
    assert_eq!(s, 303, "{html}");
    let after = mapped().await;
    assert_eq!(after["gross-salary"].mapping.account_code, "478");
    assert_eq!(after["gross-salary"].updated_by.as_deref(), Some("alice"));
    assert!(!after.contains_key("fx-fee"), "cleared: {:?}", after.keys());
    let fee = &after["management-fee"];
    assert_eq!(
        fee.mapping.tax_type.as_deref(),
        Some("INPUT2"),
        "tax type kept"
    );
    assert_eq!(
        fee.updated_by.as_deref(),
        Some("test"),
        "an unchanged row is not rewritten"
    );
    let actions: Vec<(String, String)> = env
        .d
        .store
        .audit_log(Some("acme"), 20)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.action, e.detail))
        .collect();
    assert!(
        actions.contains(&("mapping.set".into(), "xero gross-salary -> 478".into())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("mapping.delete".into(), "xero fx-fee".into())),
        "{actions:?}"
    );
    assert!(
        !actions.iter().any(|(_, d)| d.contains("management-fee")),
        "{actions:?}"
    );

    // A form shown before another admin changed a row, saved with that
    // row untouched, leaves their change (the row carries the code it was
    // shown with).
    let (s, v) = env
        .call(
            "PUT",
            "/v1/admin/tenants/acme/mappings/employee-benefits",
            &env.key("acme").await,
            Some(json!({"account_code": "477"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, html) = post(vec![
        ("employee-benefits", "479"),
        ("shown:employee-benefits", "479"),
        ("gross-salary", "477"),
        ("shown:gross-salary", "478"),
    ])
    .await;
    assert_eq!(s, 303, "{html}");
    let after = mapped().await;
    assert_eq!(
        after["employee-benefits"].mapping.account_code, "477",
        "theirs kept"
    );
    assert_eq!(
        after["gross-salary"].mapping.account_code, "477",
        "mine saved"
    );
    // The form the page renders carries those fields.
    let r = b
        .get(format!("{}/integrations/configure", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let html = r.text().await.unwrap();
    assert!(
        html.contains("<input type=\"hidden\" name=\"shown:gross-salary\" value=\"477\">"),
        "{html}"
    );

    // A code archived since it was mapped (401 is archived in the
    // simulator's chart) stays chosen on the form, marked, and a save that
    // leaves it alone keeps it.
    let archived = ledgerport::capabilities::mapping::AccountMapping {
        kind: "security-deposit".into(),
        account_code: "401".into(),
        tax_type: None,
    };
    env.d
        .store
        .set_mapping(&scope, &archived, "test", 0)
        .await
        .unwrap();
    let r = b
        .get(format!("{}/integrations/configure", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let html = r.text().await.unwrap();
    assert!(
        html.contains("<option value=\"401\" selected>401 (not an active account)</option>"),
        "{html}"
    );
    let (s, html) = post(vec![("security-deposit", "401"), ("fx-fee", "404")]).await;
    assert_eq!(s, 303, "{html}");
    let after = mapped().await;
    assert_eq!(after["security-deposit"].mapping.account_code, "401");
    assert_eq!(after["fx-fee"].mapping.account_code, "404");

    // A row's tax rate: shown chosen, kept when only the code changes (a
    // form without the column, too), changed or reset to the account's
    // default from its own choice.
    let r = b
        .get(format!("{}/integrations/configure", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let html = r.text().await.unwrap();
    assert!(html.contains("<th>Tax rate</th>"), "{html}");
    assert!(
        html.contains("<input type=\"hidden\" name=\"shown-tax:management-fee\" value=\"INPUT2\">"),
        "{html}"
    );
    assert!(
        html.contains("<option value=\"INPUT2\" selected>"),
        "{html}"
    );
    let (s, html) = post(vec![("management-fee", "404")]).await;
    assert_eq!(s, 303, "{html}");
    let fee = &mapped().await["management-fee"];
    assert_eq!(fee.mapping.account_code, "404");
    assert_eq!(fee.mapping.tax_type.as_deref(), Some("INPUT2"), "tax kept");
    let (s, html) = post(vec![
        ("management-fee", "404"),
        ("shown:management-fee", "404"),
        ("tax:management-fee", ""),
        ("shown-tax:management-fee", "INPUT2"),
    ])
    .await;
    assert_eq!(s, 303, "{html}");
    let fee = &mapped().await["management-fee"];
    assert_eq!(fee.mapping.account_code, "404");
    assert_eq!(fee.mapping.tax_type, None, "the account's default again");
    let (s, html) = post(vec![
        ("management-fee", "404"),
        ("shown:management-fee", "404"),
        ("tax:management-fee", "INPUT2"),
        ("shown-tax:management-fee", ""),
    ])
    .await;
    assert_eq!(s, 303, "{html}");
    assert_eq!(
        mapped().await["management-fee"].mapping.tax_type.as_deref(),
        Some("INPUT2")
    );
    // Confirming the mappings as they stand checks every one against the
    // organisation's chart: the archived 401 is named.
    let (s, v) = env
        .call(
            "POST",
            "/v1/admin/tenants/acme/confirm-mappings",
            &env.key("acme").await,
            None,
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(
        v["problems"][0]["field"], "mappings.security-deposit",
        "{v}"
    );
    let (s, html) = post(vec![("security-deposit", "620")]).await;
    assert_eq!(s, 303, "{html}");
    let (s, v) = env
        .call(
            "POST",
            "/v1/admin/tenants/acme/confirm-mappings",
            &env.key("acme").await,
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["review_was_due"], false, "{v}");
    assert!(v["validated_against"].is_string(), "{v}");
    // A NUL character in a field is refused by name, nothing stored.
    let (s, html) = post(vec![("management-fee", "4\u{0}04")]).await;
    assert_eq!(s, 400, "{html}");
    assert!(
        html.contains("management-fee: must not contain a NUL"),
        "{html}"
    );
    env.d.stop().await;
}

/// The page signs in with a one-time link the platform asks for server to
/// server, not with the tenant's key in the address: the key never reaches
/// the browser, the cookie holds a random token (once it held the key, the
/// admin and the role, so anyone the platform let open the page could make
/// themselves a Super Admin by editing it), a link works once and for two
/// minutes, and revoking the key ends its sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_signs_in_with_a_one_time_link_not_the_key() {
    let env = Env::start().await;
    let store = &env.d.store;
    store.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    store
        .upsert_tenant("globex", "Globex", &[], 0)
        .await
        .unwrap();
    let (key_id, key) = store
        .issue_key(&KeyScope::Tenant("acme".into()), "platform", 0)
        .await
        .unwrap();
    let links = "/v1/admin/tenants/acme/page-sessions";
    // Who signs in must be named; the role is short; another tenant's key
    // cannot ask.
    for (body, status, field) in [
        (json!({"role": "super-admin"}), 422, "admin"),
        (json!({"admin": "  ", "role": "super-admin"}), 422, "admin"),
        (json!({"admin": "a", "role": "x".repeat(65)}), 422, "role"),
        (json!({"admin": "a", "rank": "super-admin"}), 422, "rank"),
    ] {
        let (s, v) = env.call("POST", links, &key, Some(body.clone())).await;
        assert_eq!(s, status, "{body}: {v}");
        assert_eq!(v["problems"][0]["field"], field, "{body}: {v}");
    }
    let globex = env.key("globex").await;
    let (s, v) = env
        .call("POST", links, &globex, Some(json!({"admin": "a"})))
        .await;
    assert_eq!(s, 403, "{v}");

    let (s, v) = env
        .call(
            "POST",
            links,
            &key,
            Some(json!({"admin": "alice", "role": "super-admin"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["expires_in"], 120);
    let login = format!("{}{}", env.base, v["login"].as_str().unwrap());
    assert!(!login.contains(&key), "the key is not in the link");
    let b = storage_support::browser();
    let r = b.get(&login).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for secret in [key.as_str(), "alice", "super-admin"] {
        assert!(!set_cookie.contains(secret), "{secret} in {set_cookie}");
    }
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let page = |cookie: String| {
        let b = b.clone();
        let url = format!("{}/integrations", env.base);
        async move {
            let r = b.get(url).header("cookie", cookie).send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.text().await.unwrap())
        }
    };
    assert_eq!(page(cookie.clone()).await.0, 200);
    // Once only.
    let r = b.get(&login).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await.unwrap().contains("ticket: "));
    // The old link with the key in the address is refused naming key.
    let r = b
        .get(format!(
            "{}/integrations/login?key={key}&admin=mallory&role=super-admin",
            env.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.headers().get("set-cookie").is_none());
    assert!(r.text().await.unwrap().contains("key: "));
    // A cookie made up in the browser is no session.
    let (s, _) = page("lp_session=ps_forged".into()).await;
    assert_eq!(s, 401);
    // An expired link (asked for three minutes ago) does not sign in.
    let now = chrono::Utc::now().timestamp();
    let stale = store
        .create_page_ticket("acme", "alice", "super-admin", &key_id, 120, now - 180)
        .await
        .unwrap();
    let r = b
        .get(format!("{}/integrations/login?ticket={stale}", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // An admin without the Super Admin role reads but cannot change.
    let viewer = page_session_as(&env, &b, "acme", "bob", "finance-manager").await;
    assert_eq!(page(viewer.clone()).await.0, 200);
    let r = b
        .post(format!("{}/integrations/settings", env.base))
        .header("cookie", &viewer)
        .form(&[("status", "DRAFT")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // Behind a reverse proxy the daemon sees the proxy's upstream as Host:
    // a form from the public URL's origin is taken, with default ports
    // written or not; one from elsewhere is still refused.
    // (A proxy sends X-Forwarded-Host and X-Forwarded-Proto; `None`: no
    // header.)
    let post_from = |origin: &'static str,
                     host: &'static str,
                     forwarded: Option<(&'static str, &'static str)>| {
        let b = b.clone();
        let cookie = viewer.clone();
        let url = format!("{}/integrations/retry", env.base);
        async move {
            let mut rb = b
                .post(url)
                .header("cookie", cookie)
                .header("origin", origin)
                .header("host", host)
                .form(&[("id", "dlv-none")]);
            if let Some((fhost, proto)) = forwarded {
                rb = rb
                    .header("x-forwarded-host", fhost)
                    .header("x-forwarded-proto", proto);
            }
            rb.send().await.unwrap().status().as_u16()
        }
    };
    // 404: past the origin check (the id is unknown); 403: refused.
    for (origin, host, forwarded, status) in [
        (
            "https://lp.example.com",
            "upstream:8080",
            Some(("lp.example.com, internal", "https")),
            404,
        ),
        (
            "https://lp.example.com:443",
            "upstream:8080",
            Some(("lp.example.com", "https")),
            404,
        ),
        ("http://lp.example.com", "lp.example.com:80", None, 404),
        (
            "https://evil.example",
            "upstream:8080",
            Some(("lp.example.com", "https")),
            403,
        ),
        (
            "https://lp.example.com:8443",
            "upstream:8080",
            Some(("lp.example.com", "https")),
            403,
        ),
        // A page on plain http for the host an https daemon is reached at.
        (
            "http://lp.example.com",
            "upstream:8080",
            Some(("lp.example.com", "https")),
            403,
        ),
        // https without a proxy saying so, to a daemon whose URL is http.
        ("https://lp.example.com", "lp.example.com", None, 403),
    ] {
        assert_eq!(
            post_from(origin, host, forwarded).await,
            status,
            "{origin} {host} {forwarded:?}"
        );
    }
    let public = env.base.clone();
    let r = b
        .post(format!("{}/integrations/retry", env.base))
        .header("cookie", &viewer)
        .header("origin", &public)
        .header("host", "upstream:8080")
        .form(&[("id", "dlv-none")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        404,
        "the public URL's origin, whatever Host says"
    );

    // The platform signs an admin out (removed or demoted): their sessions
    // end at once, others' stay; signing out ends the session, not only the
    // cookie.
    let carol = page_session_as(&env, &b, "acme", "carol", "super-admin").await;
    // A misspelt parameter is refused naming it, not read as "everyone".
    let (s, v) = env
        .call(
            "DELETE",
            &format!("{links}?admn=bob"),
            &env.key("acme").await,
            None,
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["problems"][0]["field"], "admn", "{v}");
    let (s, v) = env
        .call(
            "DELETE",
            &format!("{links}?admin=bob"),
            &env.key("acme").await,
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ended"], 1);
    assert_eq!(page(viewer).await.0, 401);
    assert_eq!(page(carol.clone()).await.0, 200);
    let r = b
        .post(format!("{}/integrations/logout", env.base))
        .header("cookie", &carol)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert_eq!(page(carol).await.0, 401, "the token itself no longer works");

    // A notice's link opened before signing in (`?log=failed`): the sign-in
    // lands there, not on the bare page; a cookie naming another site
    // still lands on this page.
    let r = b
        .get(format!(
            "{}/integrations?log=failed&number=INV%201",
            env.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let next = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("lp_next="))
        .expect("the link is remembered")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    for (cookie, to) in [
        (next.as_str(), "/integrations?log=failed&number=INV+1"),
        (
            "lp_next=%2F%2Fevil.example%2F",
            "/integrations?%2F%2Fevil.example%2F=",
        ),
    ] {
        let (s, v) = env
            .call("POST", links, &key, Some(json!({"admin": "alice"})))
            .await;
        assert_eq!(s, 201, "{v}");
        let r = b
            .get(format!("{}{}", env.base, v["login"].as_str().unwrap()))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 303);
        assert_eq!(r.headers()["location"], to);
    }

    // Revoking the key that asked for a session ends it, and a link it
    // asked for no longer signs in.
    let (s, v) = env
        .call("POST", links, &key, Some(json!({"admin": "alice"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let unused = format!("{}{}", env.base, v["login"].as_str().unwrap());
    assert!(store.revoke_key(&key_id, now).await.unwrap());
    let (s, html) = page(cookie).await;
    assert_eq!(s, 401, "{html}");
    assert!(html.contains("revoked"), "{html}");
    let r = b.get(&unused).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    env.d.stop().await;
}

/// Connecting from the page binds the sign-in to the browser that started
/// it (a cookie holding the state): the consent link forwarded to someone
/// else, whose consent would connect *their* organisation to this tenant,
/// is refused when it comes back; the browser that started it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_started_on_the_page_completes_only_in_that_browser() {
    let env = Env::start().await;
    env.d
        .store
        .upsert_tenant("acme", "Acme Ltd", &[], 0)
        .await
        .unwrap();
    env.sim.set_auto_approve(Some(vec![DEFAULT_TENANT_TRADING]));
    let b = storage_support::browser();
    let cookie = page_session(&env, &b, "acme").await;
    let r = b
        .post(format!("{}/integrations/connect?connector=xero", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let set = r
        .headers()
        .get("set-cookie")
        .expect("a flow cookie")
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        set.starts_with("lp_oauth_") && set.contains("HttpOnly") && set.contains("Path=/oauth"),
        "{set}"
    );
    let flow = set.split(';').next().unwrap().to_string();
    let authorize = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    // Someone else's browser consents and comes back without the cookie.
    let other = storage_support::browser();
    let callback = storage_support::authorize(&other, &env.sim, &authorize, None).await;
    let r = other.get(&callback).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body = r.text().await.unwrap();
    assert!(body.contains("another browser"), "{body}");
    assert!(
        env.d
            .store
            .connection_for("acme", "xero")
            .await
            .unwrap()
            .is_none(),
        "connected from a forwarded link"
    );
    // A cookie for another sign-in does not do either.
    let r = other
        .get(&callback)
        .header(
            "cookie",
            format!("{}=b.forged", flow.split('=').next().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // The browser that started it completes.
    let r = b
        .get(&callback)
        .header("cookie", &flow)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body = r.text().await.unwrap();
    assert!(body.contains("id=\"connected\""), "{body}");
}

/// A tenant key revoked (leaked, say) ends the connects begun with it and
/// not finished: the consent comes back refused, naming `state`, and no
/// connection is made. A connect begun afterwards with another key of the
/// tenant completes; revoking an unknown or already revoked key ends
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_ends_the_connects_it_began() {
    let env = Env::start().await;
    env.d
        .store
        .upsert_tenant("acme", "Acme Ltd", &[], 0)
        .await
        .unwrap();
    env.sim.set_auto_approve(Some(vec![DEFAULT_TENANT_TRADING]));
    let (leaked_id, leaked) = env
        .d
        .store
        .issue_key(&KeyScope::Tenant("acme".into()), "leaked", 0)
        .await
        .unwrap();
    let connect = |key: String| {
        let env = &env;
        async move {
            let (s, v) = env
                .call("POST", "/v1/admin/tenants/acme/connect/xero", &key, None)
                .await;
            assert_eq!(s, 200, "{v}");
            url::Url::parse(v["authorize_url"].as_str().unwrap()).unwrap()
        }
    };
    // The admin consents in a browser; the callback's status and page.
    let consent = |authorize: url::Url| {
        let env = &env;
        async move {
            let b = storage_support::browser();
            let callback = storage_support::authorize(&b, &env.sim, &authorize, None).await;
            let r = b.get(&callback).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let connected = || async {
        env.d
            .store
            .connection_for("acme", "xero")
            .await
            .unwrap()
            .is_some()
    };
    let begun = connect(leaked.clone()).await;
    let now = chrono::Utc::now().timestamp();
    assert!(env.d.store.revoke_key(&leaked_id, now).await.unwrap());
    assert!(!env.d.store.revoke_key(&leaked_id, now).await.unwrap());
    let (s, body) = consent(begun).await;
    assert_eq!(s, 400);
    assert!(body.contains("state"), "{body}");
    assert!(!connected().await, "connected through a revoked key's flow");
    let (s, _) = env
        .call("POST", "/v1/admin/tenants/acme/connect/xero", &leaked, None)
        .await;
    assert_eq!(s, 401, "the revoked key itself is refused");
    // An operator key reaches every tenant: revoked, it ends their flows.
    let (op_id, op) = env
        .d
        .store
        .issue_key(&KeyScope::Operator, "ops", 0)
        .await
        .unwrap();
    let begun = connect(op).await;
    assert!(env.d.store.revoke_key(&op_id, now).await.unwrap());
    let (s, _) = consent(begun).await;
    assert_eq!(s, 400, "an operator key's flow outlived it");

    let (s, body) = consent(connect(env.key("acme").await).await).await;
    assert_eq!(s, 200, "{body}");
    assert!(connected().await);
}

/// The customer removed the app from the organisation in Xero (Xero then
/// answers 403): "Test connection" says to connect again *and* marks the
/// connection needs-reauth (as a delivery would), so the card says why and
/// offers Connect; the Configure page says the same, not "did not answer".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_xero_no_longer_accepts_is_marked_by_a_check() {
    let env = Env::start().await;
    env.tenant("acme").await;
    let conn = env
        .d
        .store
        .connection_for("acme", "xero")
        .await
        .unwrap()
        .unwrap();
    use ledgerport::capabilities::http::CredentialProvider;
    let token = env.d.connections.tokens().bearer(&conn.id).await.unwrap();
    let r = env
        .http
        .delete(format!(
            "{}/connections/{}",
            env.sim.base_url(),
            conn.external_connection_id.clone().unwrap()
        ))
        .bearer_auth(&token.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let b = storage_support::browser();
    let cookie = page_session(&env, &b, "acme").await;
    let r = b
        .get(format!("{}/integrations/configure", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    assert!(r.text().await.unwrap().contains("Connect Xero again"));
    let key = env.key("acme").await;
    let (s, v) = env
        .call("GET", "/v1/admin/tenants/acme/status", &key, None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["connections"][0]["state"], "needs-reauth", "{v}");
    assert!(
        v["connections"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("Xero refused access"),
        "{v}"
    );
    let html = b
        .get(format!("{}/integrations", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("id=\"reason\""), "{html}");
    assert!(html.contains("Xero refused access"), "{html}");
    assert!(html.contains("id=\"connect\""), "Connect offered: {html}");
    env.d.stop().await;
}

/// Without a catalogue configured, the Configure page offers the line
/// kinds the tenant's documents wait for (before, only kinds already
/// mapped: a new kind could not be mapped on the page at all); mapping it
/// there sends the document. A NUL character in a query is refused by
/// name; a store that cannot be read is a 503, not an empty page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_catalogue_the_page_offers_the_kinds_documents_wait_for() {
    let env = Env::start().await;
    env.tenant("acme").await;
    let mut doc = invoice("acme", 1);
    doc["lines"][0]["kind"] = json!("relocation-fee");
    env.post(&doc).await;
    let counts = env.settle().await;
    assert!(counts.contains(&("paused".to_string(), 1)), "{counts:?}");
    let b = storage_support::browser();
    let cookie = page_session(&env, &b, "acme").await;
    let html = b
        .get(format!("{}/integrations/configure", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("name=\"relocation-fee\""), "{html}");
    let r = b
        .post(format!("{}/integrations/mappings", env.base))
        .header("cookie", &cookie)
        .form(&[("relocation-fee", "477")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303, "{}", r.text().await.unwrap());
    eventually("the document delivered", || async {
        let rows = env
            .d
            .store
            .list_deliveries(Some("acme"), Some("INV-acme-0001"), None, 1)
            .await
            .unwrap();
        (rows[0].state == "delivered").then_some(())
    })
    .await;

    let key = env.key("acme").await;
    for path in [
        "/v1/admin/tenants/acme/deliveries?number=INV%00",
        "/v1/tenants/acme/deliveries?number=%00",
    ] {
        let k = if path.starts_with("/v1/admin") {
            key.clone()
        } else {
            SERVICE_KEY.to_string()
        };
        let (s, v) = env.call("GET", path, &k, None).await;
        assert_eq!(s, 400, "{path}: {v}");
        assert_eq!(v["problems"][0]["field"], "number", "{v}");
    }
    let (s, v) = env
        .call("GET", "/v1/admin/tenants/ac%00me/status", &key, None)
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["problems"][0]["field"], "path", "{v}");
    let (s, v) = env
        .call(
            "POST",
            "/v1/admin/tenants/acme/deliveries/retry",
            &key,
            Some(json!({"id": "dlv-\u{0}"})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["problems"][0]["field"], "id", "{v}");

    // The deliveries cannot be read (the table gone from under the
    // daemon): the page and the API's status answer 503, not an empty log
    // with nothing failed.
    let ledgerport::store::Pool::Sqlite(pool) = env.d.store.pool() else {
        unreachable!("the test runs on SQLite")
    };
    sqlx::query("ALTER TABLE deliveries RENAME TO deliveries_away")
        .execute(pool)
        .await
        .unwrap();
    let r = b
        .get(format!("{}/integrations", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body = r.text().await.unwrap();
    assert!(!body.contains("No documents yet"), "{body}");
    let (s, v) = env
        .call("GET", "/v1/admin/tenants/acme/status", &key, None)
        .await;
    assert_eq!(s, 503, "{v}");
    sqlx::query("ALTER TABLE deliveries_away RENAME TO deliveries")
        .execute(pool)
        .await
        .unwrap();
    env.d.stop().await;
}

/// After a switch of organisation the mappings are due a review, and a
/// review is a check against the new organisation's chart: while the
/// connection cannot make one (disconnected), neither the admin API's
/// confirm nor the Configure form's Save ends it (409 naming
/// `connection`, in words), and nothing is changed. Before, both answered
/// as confirmed with nothing checked, and once connected again the first
/// organisation's codes went to the second unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_is_not_ended_while_the_connection_cannot_check_it() {
    let env = Env::start().await;
    env.tenant("acme").await;
    env.connect_to("acme", xero_sim::DEFAULT_TENANT_HOLDINGS)
        .await;
    let review = || async {
        env.d
            .store
            .connection_for("acme", "xero")
            .await
            .unwrap()
            .unwrap()
            .mappings_review
    };
    assert!(review().await, "switched: a review is due");
    // Meanwhile a document waits; the page says so in words, with when
    // (the API keeps the codes).
    env.post(&invoice("acme", 1)).await;
    let counts = env.settle().await;
    assert!(counts.contains(&("paused".to_string(), 1)), "{counts:?}");
    let b = storage_support::browser();
    let cookie = page_session(&env, &b, "acme").await;
    let html = b
        .get(format!("{}/integrations", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("id=\"status\" data-state=\"active\">Connected</span>"),
        "{html}"
    );
    assert!(html.contains("<th>When (UTC)</th>"), "{html}");
    let row = html
        .split("<tr data-number=\"INV-acme-0001\"")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_else(|| panic!("no row: {html}"));
    assert!(
        row.contains("<td class=\"paused\">Waiting for an account mapping</td><td class=\"when\"><time datetime=\""),
        "{row}"
    );
    assert!(row.contains(" UTC</time></td>"), "{row}");
    assert!(!row.contains("(mapping)"), "{row}");
    let key = env.key("acme").await;
    let (s, v) = env
        .call("GET", "/v1/admin/tenants/acme/deliveries", &key, None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["deliveries"][0]["delivery"]["pause_reason"], "mapping");
    let (s, v) = env
        .call("POST", "/v1/admin/tenants/acme/disconnect/xero", &key, None)
        .await;
    assert_eq!(s, 200, "{v}");

    let (s, v) = env
        .call(
            "POST",
            "/v1/admin/tenants/acme/confirm-mappings",
            &key,
            None,
        )
        .await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["problems"][0]["field"], "connection", "{v}");
    let words = v["problems"][0]["message"].as_str().unwrap_or_default();
    assert!(words.contains("Xero is disconnected"), "{words}");
    assert!(words.contains("connect Xero again"), "{words}");
    assert!(review().await, "the review is still due");

    // The Configure form's Save (a form shown before the disconnect).
    let html = b
        .get(format!("{}/integrations", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("id=\"status\" data-state=\"disconnected\">Disconnected</span>"),
        "{html}"
    );
    let scope = MappingScope {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
    };
    let before: Vec<_> = env
        .d
        .store
        .mappings(&scope)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.mapping)
        .collect();
    let r = b
        .post(format!("{}/integrations/mappings", env.base))
        .header("cookie", &cookie)
        .form(&[("gross-salary", "478"), ("shown:gross-salary", "477")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let html = r.text().await.unwrap();
    assert!(html.contains("connection: "), "{html}");
    assert!(html.contains("Nothing was changed."), "{html}");
    assert!(review().await, "the review is still due");
    let after: Vec<_> = env
        .d
        .store
        .mappings(&scope)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.mapping)
        .collect();
    assert_eq!(before, after, "nothing was changed");

    // Connected again (to Holdings): the review is still due, and now a
    // confirm checks the codes against Holdings' chart.
    env.connect_to("acme", xero_sim::DEFAULT_TENANT_HOLDINGS)
        .await;
    assert!(review().await, "still due after reconnecting");
    let (s, v) = env
        .call(
            "POST",
            "/v1/admin/tenants/acme/confirm-mappings",
            &key,
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["review_was_due"], true, "{v}");
    assert!(v["validated_against"].is_string(), "checked: {v}");
    assert!(!review().await);
    env.d.stop().await;
}

/// A connection completed through OAuth is in the audit log, naming the
/// admin who started it and the organisation (before, only the start was:
/// who connected which organisation, or switched to another one, could
/// not be read back): the callback's one organisation, then a switch made
/// on the picker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_connection_is_audited_with_the_admin_and_organisation() {
    let env = Env::start().await;
    env.tenant("acme").await;
    let key = env.key("acme").await;
    let audit = || async {
        let (s, v) = env
            .call("GET", "/v1/admin/tenants/acme/audit", &key, None)
            .await;
        assert_eq!(s, 200, "{v}");
        v["audit"].as_array().unwrap().clone()
    };
    let entries = audit().await;
    let first = entries
        .iter()
        .find(|e| e["action"] == "connect")
        .unwrap_or_else(|| panic!("no connect entry: {entries:?}"));
    assert_eq!(first["actor"], "alice@example.com", "{first}");
    let detail = first["detail"].as_str().unwrap();
    assert!(detail.starts_with("xero: connected "), "{detail}");
    assert!(detail.contains("Acme Trading GmbH"), "{detail}");
    assert!(
        detail.contains(&DEFAULT_TENANT_TRADING.to_string()),
        "{detail}"
    );

    // Through the picker, to the other organisation, by another admin.
    env.sim.set_auto_approve(None);
    let url = env
        .d
        .connections
        .begin_connect("acme", "xero", "bob@acme.example")
        .await
        .unwrap();
    let b = storage_support::browser();
    let holdings = xero_sim::DEFAULT_TENANT_HOLDINGS;
    let cb = storage_support::authorize(
        &b,
        &env.sim,
        &url,
        Some(&[holdings, DEFAULT_TENANT_TRADING]),
    )
    .await;
    let (s, body) = storage_support::finish(&b, &env.base, &cb, Some(&holdings.to_string())).await;
    assert_eq!(s, 200, "{body}");
    let entries = audit().await;
    let switch = entries
        .iter()
        .find(|e| e["action"] == "connect.switch")
        .unwrap_or_else(|| panic!("no switch entry: {entries:?}"));
    assert_eq!(switch["actor"], "bob@acme.example", "{switch}");
    assert_eq!(switch["tenant_id"], "acme", "{switch}");
    let detail = switch["detail"].as_str().unwrap();
    assert!(
        detail.contains("switched from Acme Trading GmbH")
            && detail.contains("to Acme Holdings Ltd"),
        "{detail}"
    );
    assert!(detail.contains("account mappings are checked"), "{detail}");
    env.d.stop().await;
}

/// The Configure form writes only the field of a row the admin changed:
/// a tax-only change keeps the account code another admin set through the
/// API since the form was shown, and a code-only change keeps their tax
/// rate (before, the form wrote back the code or tax rate it had shown,
/// undoing their change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mapping_form_writes_only_the_field_changed_in_a_row() {
    let env = Env::start().await;
    env.tenant("acme").await;
    let b = storage_support::browser();
    let cookie = page_session(&env, &b, "acme").await;
    let key = env.key("acme").await;
    let scope = MappingScope {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
    };
    let mapped = |kind: &'static str| {
        let scope = scope.clone();
        let store = env.d.store.clone();
        async move {
            store
                .mappings(&scope)
                .await
                .unwrap()
                .into_iter()
                .find(|m| m.mapping.kind == kind)
                .unwrap()
                .mapping
        }
    };
    // The form as shown: what each row carries.
    let html = b
        .get(format!("{}/integrations/configure", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let shown: std::collections::BTreeMap<String, String> = storage_support::inputs(&html)
        .into_iter()
        .filter(|(ty, _, _)| ty == "hidden")
        .map(|(_, n, v)| (n, v))
        .collect();
    assert_eq!(shown["shown:gross-salary"], "477");
    assert_eq!(shown["shown-tax:gross-salary"], "");
    assert_eq!(shown["shown:management-fee"], "429");
    assert_eq!(shown["shown-tax:management-fee"], "INPUT2");

    // Another admin changes both rows through the API meanwhile.
    let (s, v) = env
        .call(
            "PUT",
            "/v1/admin/tenants/acme/mappings/gross-salary",
            &key,
            Some(json!({"account_code": "478"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = env
        .call(
            "PUT",
            "/v1/admin/tenants/acme/mappings/management-fee",
            &key,
            Some(json!({"account_code": "429", "tax_type": "NONE"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");

    // This admin saves the form shown before: gross-salary's tax rate
    // only, management-fee's code only.
    let r = b
        .post(format!("{}/integrations/mappings", env.base))
        .header("cookie", &cookie)
        .form(&[
            ("gross-salary", "477"),
            ("shown:gross-salary", "477"),
            ("tax:gross-salary", "INPUT2"),
            ("shown-tax:gross-salary", ""),
            ("management-fee", "404"),
            ("shown:management-fee", "429"),
            ("tax:management-fee", "INPUT2"),
            ("shown-tax:management-fee", "INPUT2"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303, "{}", r.text().await.unwrap());
    let salary = mapped("gross-salary").await;
    assert_eq!(salary.account_code, "478", "their code kept");
    assert_eq!(salary.tax_type.as_deref(), Some("INPUT2"), "my tax rate");
    let fee = mapped("management-fee").await;
    assert_eq!(fee.account_code, "404", "my code");
    assert_eq!(fee.tax_type.as_deref(), Some("NONE"), "their tax rate kept");
    env.d.stop().await;
}

/// ledgerport's own database failing under connect or disconnect is a 503
/// "storage is unavailable", on the admin API and on the page, as
/// everywhere else: not a 500 blaming `connector` with the driver's text,
/// nor a 502 blaming the accounting system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_failure_on_connect_or_disconnect_is_a_503() {
    let env = Env::start().await;
    env.tenant("acme").await;
    let key = env.key("acme").await;
    let b = storage_support::browser();
    let cookie = page_session(&env, &b, "acme").await;
    let ledgerport::store::Pool::Sqlite(pool) = env.d.store.pool() else {
        unreachable!("the test runs on SQLite")
    };
    let rename = |from: &'static str, to: &'static str| async move {
        sqlx::query(&format!("ALTER TABLE {from} RENAME TO {to}"))
            .execute(pool)
            .await
            .unwrap();
    };
    let unavailable = |s: u16, v: &Value| {
        assert_eq!(s, 503, "{v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains("storage is unavailable"), "{v}");
        assert!(!v.to_string().contains("no such table"), "{v}");
    };
    let page_unavailable = |r: reqwest::Response| async move {
        assert_eq!(r.status().as_u16(), 503);
        let html = r.text().await.unwrap();
        assert!(html.contains("Storage is unavailable"), "{html}");
        assert!(!html.contains("no such table"), "{html}");
        assert!(!html.contains("Disconnect failed"), "{html}");
    };

    // Connect: the sign-in's state cannot be stored.
    rename("oauth_states", "oauth_states_away").await;
    let (s, v) = env
        .call("POST", "/v1/admin/tenants/acme/connect/xero", &key, None)
        .await;
    unavailable(s, &v);
    let r = b
        .post(format!("{}/integrations/connect", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    page_unavailable(r).await;
    rename("oauth_states_away", "oauth_states").await;

    // Disconnect: the connection's tokens cannot be read.
    rename("connection_tokens", "connection_tokens_away").await;
    let (s, v) = env
        .call("POST", "/v1/admin/tenants/acme/disconnect/xero", &key, None)
        .await;
    unavailable(s, &v);
    let r = b
        .post(format!("{}/integrations/disconnect", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    page_unavailable(r).await;
    rename("connection_tokens_away", "connection_tokens").await;
    let c = env
        .d
        .store
        .connection_for("acme", "xero")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.state, ledgerport::store::ConnectionState::Active);

    // Mappings: neither the Configure form nor a save can read them (a
    // 503 without the driver's text, not "Xero did not answer").
    rename("mappings", "mappings_away").await;
    let r = b
        .get(format!("{}/integrations/configure", env.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    page_unavailable(r).await;
    let r = b
        .post(format!("{}/integrations/mappings", env.base))
        .header("cookie", &cookie)
        .form(&[("gross-salary", "477")])
        .send()
        .await
        .unwrap();
    page_unavailable(r).await;
    rename("mappings_away", "mappings").await;
    env.d.stop().await;
}

/// A sign-in link opened in a browser already signed in for another
/// tenant (or as another admin) does not switch it on a plain GET: anyone
/// could send theirs, and what the admin connects next would go to that
/// tenant. A page names both and asks; its button (a POST from this site,
/// tied to this browser's session) switches. The page's header names the
/// tenant next to the admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_link_for_another_tenant_asks_before_switching() {
    let env = Env::start().await;
    let store = &env.d.store;
    store
        .upsert_tenant("acme", "Acme Ltd", &[], 0)
        .await
        .unwrap();
    store
        .upsert_tenant("globex", "Globex Corp", &[], 0)
        .await
        .unwrap();
    let b = storage_support::browser();
    let acme = page_session(&env, &b, "acme").await;
    let page = |cookie: String| {
        let b = b.clone();
        let url = format!("{}/integrations", env.base);
        async move {
            let r = b.get(url).header("cookie", cookie).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (s, html) = page(acme.clone()).await;
    assert_eq!(s, 200, "{html}");
    assert!(
        html.contains("<strong>alice</strong> for <strong>Acme Ltd (acme)</strong>"),
        "the header names the tenant: {html}"
    );

    // A fresh link for globex (as its platform would make it).
    let globex_key = env.key("globex").await;
    let link = || async {
        let (s, v) = env
            .call(
                "POST",
                "/v1/admin/tenants/globex/page-sessions",
                &globex_key,
                Some(json!({"admin": "gina@globex.example", "role": "super-admin"})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        format!("{}{}", env.base, v["login"].as_str().unwrap())
    };
    let login = link().await;
    let r = b.get(&login).header("cookie", &acme).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("set-cookie").is_none(), "not switched");
    let html = r.text().await.unwrap();
    assert!(
        html.contains("<strong>alice</strong> for <strong>Acme Ltd (acme)</strong>"),
        "{html}"
    );
    assert!(
        html.contains(
            "<strong>gina@globex.example</strong> for <strong>Globex Corp (globex)</strong>"
        ),
        "{html}"
    );
    let (s, html_now) = page(acme.clone()).await;
    assert_eq!(s, 200);
    assert!(html_now.contains("Acme Ltd (acme)"), "still acme");
    let form: Vec<(String, String)> = storage_support::inputs(&html)
        .into_iter()
        .filter(|(ty, _, _)| ty == "hidden")
        .map(|(_, n, v)| (n, v))
        .collect();
    assert!(form.iter().any(|(n, _)| n == "confirm"), "{form:?}");

    // Posted from another site, or without this browser's session (a
    // page elsewhere posting a link of its own): refused, naming why.
    let r = b
        .post(format!("{}/integrations/login", env.base))
        .header("cookie", &acme)
        .header("origin", "http://evil.example")
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().await.unwrap().contains("origin: "));
    let r = b
        .post(format!("{}/integrations/login", env.base))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.headers().get("set-cookie").is_none());
    assert!(r.text().await.unwrap().contains("confirm: "));

    // The admin's own choice: switched, and the acme session ends.
    let r = b
        .post(format!("{}/integrations/login", env.base))
        .header("cookie", &acme)
        .header("origin", &env.base)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let globex = storage_support::session_cookie(&r);
    let (s, html) = page(globex.clone()).await;
    assert_eq!(s, 200, "{html}");
    assert!(
        html.contains(
            "<strong>gina@globex.example</strong> for <strong>Globex Corp (globex)</strong>"
        ),
        "{html}"
    );
    let (s, _) = page(acme.clone()).await;
    assert_eq!(s, 401, "the session switched from has ended");

    // A link for the same tenant and admin, or opened without a session,
    // signs in at once as before.
    let r = b.get(link().await).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let r = b
        .get(link().await)
        .header("cookie", &globex)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert!(r.headers().get("set-cookie").is_some());
    env.d.stop().await;
}
