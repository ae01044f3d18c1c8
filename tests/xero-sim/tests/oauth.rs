//! OAuth: consent, code exchange (PKCE, single use, expiry), refresh
//! rotation with grace, revocation, connections, 401 vs 403.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use xero_sim::{FaultConfig, GrantRequest, SimConfig};

const REDIRECT: &str = "http://localhost:8080/callback";
const SCOPE: &str = "openid profile email offline_access accounting.invoices accounting.settings.read accounting.contacts accounting.attachments";

fn authorize_url(base: &str, extra: &[(&str, &str)]) -> String {
    let mut p = vec![
        ("response_type", "code"),
        ("client_id", "ledgerport-demo"),
        ("redirect_uri", REDIRECT),
        ("scope", SCOPE),
        ("state", "st4te"),
    ];
    p.extend_from_slice(extra);
    format!(
        "{base}/identity/connect/authorize?{}",
        serde_urlencoded::to_string(&p).unwrap()
    )
}

fn query_of(location: &str) -> Vec<(String, String)> {
    let q = location.split_once('?').map(|x| x.1).unwrap_or("");
    serde_urlencoded::from_str(q).unwrap()
}

fn q<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

async fn get_code(base: &str, extra: &[(&str, &str)]) -> String {
    let r = client()
        .get(authorize_url(base, extra))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302, "auto-approve redirects");
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert!(loc.starts_with(REDIRECT));
    let p = query_of(&loc);
    assert_eq!(q(&p, "state"), Some("st4te"));
    q(&p, "code").unwrap().to_string()
}

async fn exchange(base: &str, form: &[(&str, &str)]) -> (u16, Value) {
    parse(
        client()
            .post(format!("{base}/connect/token"))
            .basic_auth("ledgerport-demo", Some("demo-secret"))
            .form(form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn consent_page_lists_orgs_and_form_submit_redirects_with_code() {
    let sim = start(SimConfig::default()).await;
    let base = sim.base_url();
    let r = client()
        .get(authorize_url(&base, &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("Acme Holdings Ltd") && html.contains("Acme Trading GmbH"));
    assert!(html.contains("type=\"checkbox\""));
    // Submit choosing only the GmbH.
    let form = [
        ("response_type", "code"),
        ("client_id", "ledgerport-demo"),
        ("redirect_uri", REDIRECT),
        ("scope", SCOPE),
        ("state", "st4te"),
        ("tenant", &TRADING.to_string()),
        ("action", "allow"),
    ];
    let r = client()
        .post(format!("{base}/identity/connect/authorize"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let p = query_of(r.headers()["location"].to_str().unwrap());
    assert_eq!(q(&p, "state"), Some("st4te"));
    let code = q(&p, "code").unwrap().to_string();
    let (s, tok) = exchange(
        &base,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    assert_eq!(s, 200, "{tok}");
    assert_eq!(tok["token_type"], "Bearer");
    assert_eq!(tok["expires_in"], 1800);
    assert_eq!(tok["id_token"].as_str().unwrap().split('.').count(), 3);
    let (s, conns) = parse(
        client()
            .get(format!("{base}/connections"))
            .bearer_auth(tok["access_token"].as_str().unwrap())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    let conns = conns.as_array().unwrap();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0]["tenantId"], TRADING.to_string());
    assert_eq!(conns[0]["tenantType"], "ORGANISATION");
    assert_eq!(conns[0]["tenantName"], "Acme Trading GmbH");

    // Deny.
    let mut deny = form.to_vec();
    deny.retain(|(k, _)| *k != "action");
    deny.push(("action", "deny"));
    let r = client()
        .post(format!("{base}/identity/connect/authorize"))
        .form(&deny)
        .send()
        .await
        .unwrap();
    let p = query_of(r.headers()["location"].to_str().unwrap());
    assert_eq!(q(&p, "error"), Some("access_denied"));
}

#[tokio::test]
async fn authorize_validates_request() {
    let sim = start(SimConfig::auto_approving()).await;
    let base = sim.base_url();
    // Unknown scope -> invalid_scope redirect with state.
    let r = client()
        .get(authorize_url(&base, &[]).replace("accounting.invoices", "accounting.bogus"))
        .send()
        .await
        .unwrap();
    let p = query_of(r.headers()["location"].to_str().unwrap());
    assert_eq!(q(&p, "error"), Some("invalid_scope"));
    assert_eq!(q(&p, "state"), Some("st4te"));
    // Broad scope on a granular app -> invalid_scope.
    let r = client()
        .get(authorize_url(&base, &[]).replace("accounting.invoices", "accounting.transactions"))
        .send()
        .await
        .unwrap();
    let p = query_of(r.headers()["location"].to_str().unwrap());
    assert_eq!(q(&p, "error"), Some("invalid_scope"));
    // Bad response_type.
    let r = client()
        .get(authorize_url(&base, &[]).replace("response_type=code", "response_type=token"))
        .send()
        .await
        .unwrap();
    let p = query_of(r.headers()["location"].to_str().unwrap());
    assert_eq!(q(&p, "error"), Some("unsupported_response_type"));
    // Unknown client -> error page, no redirect.
    let r = client()
        .get(authorize_url(&base, &[]).replace("ledgerport-demo", "nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn broad_scope_app_accepts_old_scopes() {
    let mut cfg = SimConfig::auto_approving();
    cfg.apps[0].scope_mode = xero_sim::ScopeMode::Broad;
    let sim = start(cfg).await;
    let url = authorize_url(&sim.base_url(), &[]).replace(
        &serde_urlencoded::to_string([("scope", SCOPE)]).unwrap()[6..],
        &serde_urlencoded::to_string([(
            "scope",
            "offline_access accounting.transactions accounting.settings accounting.contacts accounting.attachments",
        )])
        .unwrap()[6..],
    );
    let r = client().get(url).send().await.unwrap();
    let p = query_of(r.headers()["location"].to_str().unwrap());
    assert!(q(&p, "code").is_some(), "{p:?}");
}

#[tokio::test]
async fn code_is_single_use_and_expires_and_pkce_is_enforced() {
    let sim = start(SimConfig::auto_approving()).await;
    let base = sim.base_url();
    let code = get_code(&base, &[]).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
    ];
    let (s, _) = exchange(&base, &form).await;
    assert_eq!(s, 200);
    let (s, body) = exchange(&base, &form).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "second use fails"
    );

    // Expiry after 5 minutes of sim time.
    let code = get_code(&base, &[]).await;
    sim.advance_secs(301);
    let (s, body) = exchange(
        &base,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    assert_eq!((s, body["error"].as_str()), (400, Some("invalid_grant")));

    // Wrong redirect_uri.
    let code = get_code(&base, &[]).await;
    let (s, _) = exchange(
        &base,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://evil/"),
        ],
    )
    .await;
    assert_eq!(s, 400);

    // PKCE S256.
    let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let code = get_code(
        &base,
        &[
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    let (s, body) = exchange(
        &base,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "missing verifier"
    );
    let code = get_code(
        &base,
        &[
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    let (s, _) = exchange(
        &base,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            (
                "code_verifier",
                "wrong-verifier-wrong-verifier-wrong-verifier",
            ),
        ],
    )
    .await;
    assert_eq!(s, 400, "wrong verifier");
    let code = get_code(
        &base,
        &[
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    let (s, body) = exchange(
        &base,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
        ],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(body["refresh_token"].is_string());
    assert!(sim.counters().invalid_grants >= 4);
}

#[tokio::test]
async fn client_auth_and_grant_type_errors() {
    let sim = start(SimConfig::default()).await;
    let base = sim.base_url();
    let http = client();
    let (s, b) = parse(
        http.post(format!("{base}/connect/token"))
            .basic_auth("ledgerport-demo", Some("wrong"))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", "x")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (401, Some("invalid_client")));
    let (s, b) = parse(
        http.post(format!("{base}/connect/token"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", "x"),
                ("client_id", "ledgerport-demo"),
                ("client_secret", "nope"),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_client")));
    let (s, b) = exchange(&base, &[("grant_type", "password")]).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    let (s, b) = exchange(&base, &[("code", "x")]).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_request")));
    // Secret in the form body works.
    let g = sim.issue_grant(GrantRequest::default()).unwrap();
    let (s, _) = parse(
        http.post(format!("{base}/connect/token"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", g.tokens.refresh_token.as_deref().unwrap()),
                ("client_id", "ledgerport-demo"),
                ("client_secret", "demo-secret"),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn refresh_rotates_with_grace_then_invalid_grant() {
    let sim = start(SimConfig::default()).await;
    let base = sim.base_url();
    let g = sim.issue_grant(GrantRequest::default()).unwrap();
    let r0 = g.tokens.refresh_token.clone().unwrap();
    let (s, t1) = exchange(
        &base,
        &[("grant_type", "refresh_token"), ("refresh_token", &r0)],
    )
    .await;
    assert_eq!(s, 200);
    let r1 = t1["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(r0, r1, "rotated");
    assert_ne!(
        t1["access_token"],
        Value::String(g.tokens.access_token.clone())
    );
    // Old token within grace: returns the current set, no rotation.
    sim.advance_secs(29 * 60);
    let (s, t_again) = exchange(
        &base,
        &[("grant_type", "refresh_token"), ("refresh_token", &r0)],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(t_again["refresh_token"], r1.as_str());
    assert_eq!(t_again["access_token"], t1["access_token"]);
    // After the grace: invalid_grant.
    sim.advance_secs(2 * 60);
    let (s, b) = exchange(
        &base,
        &[("grant_type", "refresh_token"), ("refresh_token", &r0)],
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_grant")));
    // Current still rotates.
    let (s, t2) = exchange(
        &base,
        &[("grant_type", "refresh_token"), ("refresh_token", &r1)],
    )
    .await;
    assert_eq!(s, 200);
    assert_ne!(t2["refresh_token"], r1.as_str());
    let c = sim.counters();
    assert_eq!(c.refreshes, 2);
    assert_eq!(c.refreshes_by_grant[&g.auth_event_id], 2);
    assert_eq!(c.invalid_grants, 1);
    assert_eq!(sim.grants()[0].refresh_count, 2);

    // Forced invalid_grant fault.
    sim.set_faults(FaultConfig {
        invalid_grant_grants: vec![g.auth_event_id],
        ..Default::default()
    });
    let r2 = t2["refresh_token"].as_str().unwrap();
    let (s, b) = exchange(
        &base,
        &[("grant_type", "refresh_token"), ("refresh_token", r2)],
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_grant")));
    sim.clear_faults();
    let (s, _) = exchange(
        &base,
        &[("grant_type", "refresh_token"), ("refresh_token", r2)],
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn revocation_removes_connections_and_tokens() {
    let sim = start(SimConfig::default()).await;
    let base = sim.base_url();
    let g = sim.issue_grant(GrantRequest::default()).unwrap();
    let at = g.tokens.access_token.clone();
    let api = Api::new(&sim, &at, HOLDINGS);
    assert_eq!(api.get("/Organisation").await.0, 200);
    let r = client()
        .post(format!("{base}/connect/revocation"))
        .basic_auth("ledgerport-demo", Some("demo-secret"))
        .form(&[("token", g.tokens.refresh_token.as_deref().unwrap())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(sim.grants()[0].revoked);
    assert!(sim.grants()[0].connections.is_empty());
    assert_eq!(api.get("/Organisation").await.0, 401);
    let (s, b) = exchange(
        &base,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", g.tokens.refresh_token.as_deref().unwrap()),
        ],
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_grant")));
}

#[tokio::test]
async fn delete_connection_by_id_only() {
    let sim = start(SimConfig::default()).await;
    let base = sim.base_url();
    let g = sim.issue_grant(GrantRequest::default()).unwrap();
    let at = g.tokens.access_token.as_str();
    let http = client();
    let (_, conns) = parse(
        http.get(format!("{base}/connections"))
            .bearer_auth(at)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let conns = conns.as_array().unwrap().clone();
    assert_eq!(conns.len(), 2);
    assert_eq!(conns[0]["authEventId"], g.auth_event_id.to_string());
    // A tenant id is not a connection id.
    let r = http
        .delete(format!(
            "{base}/connections/{}",
            conns[0]["tenantId"].as_str().unwrap()
        ))
        .bearer_auth(at)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .delete(format!(
            "{base}/connections/{}",
            conns[0]["id"].as_str().unwrap()
        ))
        .bearer_auth(at)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (_, after) = parse(
        http.get(format!("{base}/connections"))
            .bearer_auth(at)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(after.as_array().unwrap().len(), 1);
    // The disconnected tenant is now forbidden.
    let gone: uuid::Uuid = conns[0]["tenantId"].as_str().unwrap().parse().unwrap();
    assert_eq!(Api::new(&sim, at, gone).get("/Organisation").await.0, 403);
}

#[tokio::test]
async fn expired_token_is_401_and_bad_tenant_is_403() {
    let (sim, at) = start_with_token(SimConfig::default()).await;
    let api = Api::new(&sim, &at, HOLDINGS);
    let (s, b) = api.get("/Organisation").await;
    assert_eq!(s, 200);
    assert_eq!(b["Organisations"][0]["Name"], "Acme Holdings Ltd");
    // Wrong / missing tenant -> 403.
    let (s, b) = Api::new(&sim, &at, uuid::Uuid::new_v4())
        .get("/Organisation")
        .await;
    assert_eq!(s, 403);
    assert_eq!(b["Title"], "Forbidden");
    assert_eq!(b["Detail"], "AuthenticationUnsuccessful");
    assert!(b["Instance"].is_string());
    let r = client()
        .get(format!("{}/api.xro/2.0/Organisation", sim.base_url()))
        .bearer_auth(&at)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Unknown token -> 401.
    assert_eq!(
        Api::new(&sim, "garbage", HOLDINGS)
            .get("/Organisation")
            .await
            .0,
        401
    );
    // Expired -> 401 TokenExpired with WWW-Authenticate.
    sim.advance_secs(1801);
    let r = api
        .req(reqwest::Method::GET, "/Organisation")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let www = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(www.contains("error=\"invalid_token\""), "{www}");
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["Title"], "Unauthorized");
    assert_eq!(b["Status"], 401);
    assert!(
        b["Detail"]
            .as_str()
            .unwrap()
            .starts_with("TokenExpired: token expired at ")
    );
    assert!(b["Type"].is_null());
}

#[tokio::test]
async fn hostile_redirect_uri_does_not_panic() {
    let sim = start(SimConfig::auto_approving()).await;
    let url = format!(
        "{}/identity/connect/authorize?response_type=code&client_id=ledgerport-demo&redirect_uri=http%3A%2F%2Fx%2F%0Aevil&scope=offline_access",
        sim.base_url()
    );
    let r = client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 400);
    // The server is still alive.
    let r = client()
        .get(format!("{}/_sim/health", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
