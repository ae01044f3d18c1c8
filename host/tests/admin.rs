//! The admin API: keys and scopes (a tenant key never reaches another
//! tenant, on every route), Super Admin changes with the audit log, and
//! connect → status → disconnect keeping mappings, against the simulator.

mod common;
#[allow(dead_code)]
mod storage_support;

use ledgerport::connections::Clock;
use ledgerport::daemon::Daemon;
use ledgerport::store::admin::KeyScope;
use serde_json::{Value, json};
use storage_support::TestDb;
use xero_sim::{DEFAULT_TENANT_TRADING, Sim, SimConfig};

/// Every tenant route the daemon describes (`/openapi.json`), as method
/// and path for tenant `{t}`: a route added later is covered without
/// anyone remembering to list it here.
async fn tenant_routes(http: &reqwest::Client, base: &str) -> Vec<(String, String)> {
    let spec: Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut out = Vec::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/admin/tenants/{tenant}") {
            continue;
        }
        let concrete = path
            .replace("{tenant}", "{t}")
            .replace("{connector}", "xero")
            .replace("{kind}", "gross-salary")
            .replace("{key}", "status");
        assert!(!concrete.replace("{t}", "").contains('{'), "{path}");
        for method in ops.as_object().unwrap().keys() {
            out.push((method.to_uppercase(), concrete.clone()));
        }
    }
    out
}

async fn call(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    admin: bool,
) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut rb = http.request(m, format!("{base}{path}"));
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    if admin {
        rb = rb
            .header("x-ledgerport-admin", "alice@acme.example")
            .header("x-ledgerport-role", "super-admin");
    }
    if method != "GET" {
        rb = rb.json(&json!({"account_code": "477"}));
    }
    let r = rb.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_scopes_audit_and_the_connection_lifecycle() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    sim.set_auto_approve(Some(vec![DEFAULT_TENANT_TRADING]));
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k");
    std::fs::write(&key_file, ledgerport::crypto::generate_key()).unwrap();
    let cfg = storage_support::daemon_config(db.url(), &sim, &key_file);
    let d = Daemon::start(cfg, Clock::system(), None).await.unwrap();
    let base = format!("http://{}", d.addr);
    let http = reqwest::Client::new();
    let s = &d.store;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    s.upsert_tenant("globex", "Globex", &[], 0).await.unwrap();
    let (_, operator) = s.issue_key(&KeyScope::Operator, "ops", 0).await.unwrap();
    let (_, acme) = s
        .issue_key(&KeyScope::Tenant("acme".into()), "acme page", 0)
        .await
        .unwrap();
    let (_, ingest) = s.issue_key(&KeyScope::Ingest, "backend", 0).await.unwrap();
    let (revoked_id, revoked) = s
        .issue_key(&KeyScope::Tenant("acme".into()), "old", 0)
        .await
        .unwrap();
    assert!(s.revoke_key(&revoked_id, 1).await.unwrap());

    // Every tenant route: no key 401, revoked 401, ingest key 403, another
    // tenant's key 403 naming the tenant (and nothing changed).
    let routes = tenant_routes(&http, &base).await;
    for expected in [
        ("DELETE", "/v1/admin/tenants/{t}/mappings/gross-salary"),
        ("DELETE", "/v1/admin/tenants/{t}/page-sessions"),
        ("POST", "/v1/admin/tenants/{t}/deliveries/retry"),
        ("PUT", "/v1/admin/tenants/{t}/settings/xero/status"),
    ] {
        assert!(
            routes
                .iter()
                .any(|(m, p)| m == expected.0 && p == expected.1),
            "{expected:?} not described: {routes:?}"
        );
    }
    assert!(routes.len() >= 15, "{routes:?}");
    for (m, tpl) in &routes {
        let path = tpl.replace("{t}", "globex");
        assert_eq!(
            call(&http, &base, m, &path, None, true).await.0,
            401,
            "{m} {path}"
        );
        assert_eq!(
            call(&http, &base, m, &path, Some(&revoked), true).await.0,
            401,
            "{m} {path}"
        );
        assert_eq!(
            call(&http, &base, m, &path, Some(&ingest), true).await.0,
            403,
            "{m} {path}"
        );
        let (st, body) = call(&http, &base, m, &path, Some(&acme), true).await;
        assert_eq!(st, 403, "{m} {path}: {body}");
        assert_eq!(body["problems"][0]["field"], "tenant");
    }
    assert!(
        s.audit_log(Some("globex"), 10).await.unwrap().is_empty(),
        "nothing was changed"
    );
    // The platform's routes take the service, ingest or operator key, not
    // a tenant's (a tenant must not post documents).
    for (m, path) in [
        ("POST", "/v1/documents"),
        ("GET", "/v1/tenants/acme/deliveries"),
    ] {
        let (st, body) = call(&http, &base, m, path, Some(&acme), false).await;
        assert_eq!(st, 401, "{m} {path}: {body}");
        assert_eq!(body["problems"][0]["field"], "authorization", "{body}");
    }
    assert!(
        s.mappings(&ledgerport::capabilities::mapping::MappingScope {
            tenant_id: "globex".into(),
            connector_id: "xero".into()
        })
        .await
        .unwrap()
        .is_empty()
    );
    // Tenant lists: operator sees both, a tenant key only its own.
    let (_, v) = call(
        &http,
        &base,
        "GET",
        "/v1/admin/tenants",
        Some(&operator),
        false,
    )
    .await;
    assert_eq!(v["tenants"].as_array().unwrap().len(), 2);
    let (_, v) = call(&http, &base, "GET", "/v1/admin/tenants", Some(&acme), false).await;
    assert_eq!(v["tenants"].as_array().unwrap().len(), 1);
    assert_eq!(v["tenants"][0]["id"], "acme");

    // Changes need the Super Admin role, and are audited.
    let (st, body) = call(
        &http,
        &base,
        "PUT",
        "/v1/admin/tenants/acme/mappings/gross-salary",
        Some(&acme),
        false,
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["problems"][0]["field"], "x-ledgerport-admin");
    let r = http
        .put(format!(
            "{base}/v1/admin/tenants/acme/mappings/gross-salary"
        ))
        .bearer_auth(&acme)
        .header("x-ledgerport-admin", "bob@acme.example")
        .header("x-ledgerport-role", "finance-manager")
        .json(&json!({"account_code": "477"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (st, body) = call(
        &http,
        &base,
        "PUT",
        "/v1/admin/tenants/acme/mappings/gross-salary",
        Some(&acme),
        true,
    )
    .await;
    assert_eq!(st, 200, "{body}");

    // Test connection before there is one: 404 naming the connector.
    let check = || {
        call(
            &http,
            &base,
            "POST",
            "/v1/admin/tenants/acme/check/xero",
            Some(&acme),
            false,
        )
    };
    let (st, body) = check().await;
    assert_eq!(st, 404, "{body}");
    assert_eq!(body["problems"][0]["field"], "connector", "{body}");
    assert!(
        body["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("no xero connection"),
        "{body}"
    );

    // Connect through the API and the provider's consent.
    let (st, body) = call(
        &http,
        &base,
        "POST",
        "/v1/admin/tenants/acme/connect/xero",
        Some(&acme),
        true,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c
        .get(body["authorize_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let back = r.headers()["location"].to_str().unwrap().to_string();
    // `listen` was port 0: the callback names the port really bound.
    assert!(
        back.starts_with(&format!("{base}/oauth/callback?")),
        "{back}"
    );
    assert!(c.get(&back).send().await.unwrap().status().is_success());
    let (_, st_body) = call(
        &http,
        &base,
        "GET",
        "/v1/admin/tenants/acme/status",
        Some(&acme),
        false,
    )
    .await;
    assert_eq!(st_body["connections"][0]["state"], "active", "{st_body}");
    assert_eq!(
        st_body["connections"][0]["organisation"],
        "Acme Trading GmbH"
    );
    // Test connection: the connector's check reaches the organisation
    // (any admin of the tenant; it changes nothing).
    let (st, body) = check().await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["ok"], true, "{body}");
    assert_eq!(body["organisation"], "Acme Trading GmbH", "{body}");
    assert!(!body["details"].as_array().unwrap().is_empty(), "{body}");
    // Again at once: 429 (the provider's request budget is the deliveries').
    let (st, body) = check().await;
    assert_eq!(st, 429, "{body}");
    assert!(
        body["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("checked moments ago"),
        "{body}"
    );
    // Mappings now come with the organisation's accounts; an archived code is refused.
    let (_, m) = call(
        &http,
        &base,
        "GET",
        "/v1/admin/tenants/acme/mappings",
        Some(&acme),
        false,
    )
    .await;
    assert!(
        m["choices"]["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["code"] == "477"),
        "{m}"
    );
    let r = http
        .put(format!(
            "{base}/v1/admin/tenants/acme/mappings/management-fee"
        ))
        .bearer_auth(&acme)
        .header("x-ledgerport-admin", "alice@acme.example")
        .header("x-ledgerport-role", "super-admin")
        .json(&json!({"account_code": "499"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["problems"][0]["field"], "account_code", "{v}");
    // Disconnect keeps the mappings and shows disconnected.
    let (st, body) = call(
        &http,
        &base,
        "POST",
        "/v1/admin/tenants/acme/disconnect/xero",
        Some(&acme),
        true,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (_, st_body) = call(
        &http,
        &base,
        "GET",
        "/v1/admin/tenants/acme/status",
        Some(&operator),
        false,
    )
    .await;
    assert_eq!(st_body["connections"][0]["state"], "disconnected");
    // Test connection after the disconnect: 409 saying so.
    let (st, body) = check().await;
    assert_eq!(st, 409, "{body}");
    assert!(
        body["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("disconnected"),
        "{body}"
    );
    let (_, m) = call(
        &http,
        &base,
        "GET",
        "/v1/admin/tenants/acme/mappings",
        Some(&acme),
        false,
    )
    .await;
    assert_eq!(m["mappings"][0]["kind"], "gross-salary");
    // The audit log names actor and action for every change.
    let (_, a) = call(
        &http,
        &base,
        "GET",
        "/v1/admin/tenants/acme/audit",
        Some(&acme),
        false,
    )
    .await;
    let actions: Vec<&str> = a["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec!["disconnect", "connect", "connect.start", "mapping.set"],
        "{a}"
    );
    assert!(
        a["audit"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == "alice@acme.example")
    );
    // Paged: the next page starts where the last one ended.
    let mut paged = Vec::new();
    let mut path = "/v1/admin/tenants/acme/audit?limit=3".to_string();
    loop {
        let (st, page) = call(&http, &base, "GET", &path, Some(&acme), false).await;
        assert_eq!(st, 200, "{page}");
        let entries = page["audit"].as_array().unwrap();
        assert!(entries.len() <= 3, "{page}");
        paged.extend(
            entries
                .iter()
                .map(|e| e["action"].as_str().unwrap().to_string()),
        );
        match page["next"].as_i64() {
            Some(next) => path = format!("/v1/admin/tenants/acme/audit?limit=3&before={next}"),
            None => break,
        }
    }
    assert_eq!(paged, actions, "every entry once, in order");
    for bad in ["abc", "0", "-4"] {
        let (st, body) = call(
            &http,
            &base,
            "GET",
            &format!("/v1/admin/tenants/acme/audit?before={bad}"),
            Some(&acme),
            false,
        )
        .await;
        assert_eq!(st, 400, "{bad}: {body}");
        assert_eq!(body["problems"][0]["field"], "before", "{body}");
    }
    // Ingest accepts an issued ingest key; the OpenAPI description is served.
    let (st, _) = call(
        &http,
        &base,
        "GET",
        "/v1/tenants/acme/deliveries",
        Some(&ingest),
        false,
    )
    .await;
    assert_eq!(st, 200);
    let (st, o) = call(&http, &base, "GET", "/openapi.json", None, false).await;
    assert_eq!(st, 200);
    assert!(o["paths"]["/v1/admin/tenants/{tenant}/status"].is_object());
    assert!(o["paths"]["/v1/admin/tenants/{tenant}/check/{connector}"]["post"].is_object());
    d.stop().await;
}

/// A port already in use stops the start at once, naming the key, before
/// the database is opened or any connector compiled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_fails_the_start_first_naming_listen() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let db = TestDb::sqlite();
    let TestDb::Sqlite { path, .. } = &db else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k");
    std::fs::write(&key_file, ledgerport::crypto::generate_key()).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = storage_support::daemon_config(db.url(), &sim, &key_file);
    cfg.listen = taken.local_addr().unwrap().to_string();
    let Err(e) = Daemon::start(cfg, Clock::system(), None).await else {
        panic!("started on a port in use");
    };
    let e = format!("{e:#}");
    let port = taken.local_addr().unwrap().port().to_string();
    assert!(e.contains("key `listen`") && e.contains(&port), "{e}");
    assert!(!path.exists(), "the database was opened first");
}

/// Plugin configuration the daemon cannot honour stops the start, named:
/// a base URL for an origin the connector neither calls nor signs in with
/// (a typo: it used to be dropped, and requests went to the real
/// provider), and one connector id installed twice (a backup copy beside
/// it: which one ran depended on the directory's order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_configuration_that_cannot_hold_stops_the_start() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k");
    std::fs::write(&key_file, ledgerport::crypto::generate_key()).unwrap();

    let db = TestDb::sqlite();
    let mut cfg = storage_support::daemon_config(db.url(), &sim, &key_file);
    let xero = cfg.plugins.get_mut("xero").unwrap();
    xero.base_urls
        .insert("https://api.xero.co".into(), sim.base_url());
    let Err(e) = Daemon::start(cfg, Clock::system(), None).await else {
        panic!("started with a base URL for an origin nobody calls");
    };
    let e = format!("{e:#}");
    assert!(
        e.contains("plugins.xero.base_urls") && e.contains("https://api.xero.co"),
        "{e}"
    );

    let plugins = tempfile::tempdir().unwrap();
    let installed = common::target_dir().join("plugins/xero");
    for name in ["xero", "xero.bak"] {
        std::os::unix::fs::symlink(&installed, plugins.path().join(name)).unwrap();
    }
    let db2 = TestDb::sqlite();
    let mut cfg = storage_support::daemon_config(db2.url(), &sim, &key_file);
    cfg.plugin_dir = plugins.path().to_path_buf();
    let Err(e) = Daemon::start(cfg, Clock::system(), None).await else {
        panic!("started with one connector id installed twice");
    };
    let e = format!("{e:#}");
    assert!(
        e.contains("installed twice") && e.contains("xero.bak"),
        "{e}"
    );

    // trusted_keys in the daemon's config reach the runtime: the unsigned
    // connectors of the build are refused, naming why.
    let db3 = TestDb::sqlite();
    let mut cfg = storage_support::daemon_config(db3.url(), &sim, &key_file);
    cfg.trusted_keys = vec![ledgerport::signing::generate().1];
    let Err(e) = Daemon::start(cfg, Clock::system(), None).await else {
        panic!("started unsigned connectors with trusted_keys set");
    };
    let e = format!("{e:#}");
    assert!(e.contains("is not signed"), "{e}");
}
