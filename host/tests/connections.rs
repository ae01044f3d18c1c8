//! Connections end to end against the Xero simulator, on SQLite and
//! PostgreSQL: the OAuth dance over HTTP (with and without the organisation
//! picker), refused states and codes, the refresh storm, lost refresh
//! answers, revoked grants, disconnect/reconnect with mappings, key
//! rotation, and no token text in the database.

#[allow(dead_code)]
mod storage_support;

use ledgerport::capabilities::http::{Credential, CredentialError, CredentialProvider};
use ledgerport::capabilities::mapping::{AccountMapping, MappingScope};
use ledgerport::connections::MappingError;
use ledgerport::crypto::KeyRing;
use ledgerport::store::{Connection, ConnectionState};
use std::sync::Arc;
use storage_support::*;
use xero_sim::{DEFAULT_TENANT_HOLDINGS, DEFAULT_TENANT_TRADING, SimHandle};

macro_rules! both {
    ($sqlite:ident, $pg:ident, $f:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $sqlite() {
            $f(TestDb::sqlite()).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $pg() {
            if let Some(db) = TestDb::postgres().await {
                $f(db).await
            }
        }
    };
}

const ADMIN: &str = "alice@acme.test";

async fn setup(db: &TestDb) -> (Arc<SimHandle>, Daemon) {
    let sim = sim().await;
    let d = daemon(&sim, &db.url(), keys(7), None).await;
    d.store
        .upsert_tenant("acme", "Acme Ltd", &["ap@acme.test".into()], 1)
        .await
        .unwrap();
    (sim, d)
}

/// Connect `acme` to one organisation (auto-approved) and return the connection.
async fn connect_one(sim: &SimHandle, d: &Daemon, org: uuid::Uuid) -> Connection {
    connect_tenant(sim, d, "acme", org).await
}

/// Connect `tenant` to one organisation (auto-approved) and return the connection.
async fn connect_tenant(sim: &SimHandle, d: &Daemon, tenant: &str, org: uuid::Uuid) -> Connection {
    sim.set_auto_approve(Some(vec![org]));
    let url = d.conns.begin_connect(tenant, "xero", ADMIN).await.unwrap();
    let b = browser();
    let cb = authorize(&b, sim, &url, None).await;
    let (status, body) = finish(&b, &d.base, &cb, None).await;
    assert_eq!(status, 200, "{body}");
    d.store
        .connection_for(tenant, "xero")
        .await
        .unwrap()
        .unwrap()
}

/// Start connecting `acme` in browser `b`, consent to Holdings and
/// Trading on the provider's form: the picker's page and its `pick` token.
async fn open_picker(sim: &SimHandle, d: &Daemon, b: &reqwest::Client) -> (String, String) {
    sim.set_auto_approve(None); // the consent form is shown and submitted
    let url = d.conns.begin_connect("acme", "xero", ADMIN).await.unwrap();
    let cb = authorize(
        b,
        sim,
        &url,
        Some(&[DEFAULT_TENANT_HOLDINGS, DEFAULT_TENANT_TRADING]),
    )
    .await;
    let r = b.get(&cb).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let pick_url = format!("{}{}", d.base, r.headers()["location"].to_str().unwrap());
    let html = b.get(&pick_url).send().await.unwrap().text().await.unwrap();
    let token = inputs(&html).into_iter().find(|i| i.1 == "pick").unwrap().2;
    (html, token)
}

/// Whether the simulator accepts a bearer token (GET /connections).
async fn accepted(sim: &SimHandle, token: &str) -> bool {
    reqwest::Client::new()
        .get(format!("{}/connections", sim.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .is_success()
}

fn grant_of(sim: &SimHandle, c: &Connection) -> xero_sim::GrantInfo {
    let id: uuid::Uuid = c.auth_event_id.as_deref().unwrap().parse().unwrap();
    sim.grants()
        .into_iter()
        .find(|g| g.auth_event_id == id)
        .unwrap()
}

async fn connect_single_org(db: TestDb) {
    let (sim, d) = setup(&db).await;
    let mut events = d.conns.events().subscribe();
    sim.set_auto_approve(Some(vec![DEFAULT_TENANT_HOLDINGS]));
    let url = d.conns.begin_connect("acme", "xero", ADMIN).await.unwrap();
    let q: std::collections::BTreeMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(
        q["code_challenge_method"], "S256",
        "PKCE, as the manifest says"
    );
    assert!(q["scope"].contains("accounting.invoices") && q["scope"].contains("offline_access"));
    let b = browser();
    let cb = authorize(&b, &sim, &url, None).await;
    assert!(
        cb.starts_with(&format!("{}/oauth/callback?", d.base)),
        "{cb}"
    );
    let (status, body) = finish(&b, &d.base, &cb, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Acme Holdings Ltd"), "{body}");
    let c = d
        .store
        .connection_for("acme", "xero")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.state, ConnectionState::Active);
    assert_eq!(
        c.external_tenant_id.as_deref(),
        Some(DEFAULT_TENANT_HOLDINGS.to_string().as_str())
    );
    assert_eq!(c.external_tenant_name.as_deref(), Some("Acme Holdings Ltd"));
    assert_eq!(c.connected_by.as_deref(), Some(ADMIN));
    assert!(c.connected_at.is_some());
    assert!(
        c.scopes.iter().any(|s| s == "accounting.invoices"),
        "{:?}",
        c.scopes
    );
    let g = grant_of(&sim, &c);
    assert_eq!(
        c.external_connection_id,
        Some(g.connections[0].id.to_string())
    );
    // The code exchange carried the PKCE verifier.
    let token_req = sim
        .requests(0)
        .into_iter()
        .find(|r| r.uri.starts_with("/connect/token"))
        .unwrap();
    assert!(
        token_req
            .body_text
            .unwrap_or_default()
            .contains("code_verifier=")
    );
    // The stored token is the grant's, and works.
    let cred = d.conns.tokens().bearer(&c.id).await.unwrap();
    assert_eq!(cred.access_token, g.access_token);
    assert!(accepted(&sim, &cred.access_token).await);
    let ev = events.recv().await.unwrap();
    assert_eq!(
        (ev.kind.as_str(), ev.connection_id.as_str()),
        ("connected", c.id.as_str())
    );
    // Replaying the callback is refused, naming the state.
    let (status, body) = finish(&b, &d.base, &cb, None).await;
    assert_eq!(status, 400);
    assert!(
        body.contains("state") && body.contains("already used"),
        "{body}"
    );
}
both!(
    connect_single_org_sqlite,
    connect_single_org_postgres,
    connect_single_org
);

async fn connect_with_picker(db: TestDb) {
    let (sim, d) = setup(&db).await;
    let b = browser();
    let (html, token) = open_picker(&sim, &d, &b).await;
    assert!(
        html.contains("Acme Holdings Ltd") && html.contains("Acme Trading GmbH"),
        "{html}"
    );
    // A choice outside the grant is refused, naming the field; the pick stays usable.
    let r = b
        .post(format!("{}/oauth/pick", d.base))
        .form(&[("pick", token.as_str()), ("organisation", "not-an-org")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("organisation"));
    assert!(
        d.store
            .connection_for("acme", "xero")
            .await
            .unwrap()
            .is_none()
    );
    let trading = DEFAULT_TENANT_TRADING.to_string();
    let r = b
        .post(format!("{}/oauth/pick", d.base))
        .form(&[("pick", token.as_str()), ("organisation", trading.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let c = d
        .store
        .connection_for("acme", "xero")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.external_tenant_id.as_deref(), Some(trading.as_str()));
    assert_eq!(c.external_tenant_name.as_deref(), Some("Acme Trading GmbH"));
    let g = grant_of(&sim, &c);
    let link = g
        .connections
        .iter()
        .find(|x| x.tenant_id == DEFAULT_TENANT_TRADING)
        .unwrap();
    assert_eq!(c.external_connection_id, Some(link.id.to_string()));
    // The link to the organisation not picked was removed at Xero: the
    // grant ledgerport keeps reaches Trading only.
    let orgs: Vec<uuid::Uuid> = g.connections.iter().map(|x| x.tenant_id).collect();
    assert_eq!(orgs, [DEFAULT_TENANT_TRADING]);
    // The pick is single use.
    let r = b
        .post(format!("{}/oauth/pick", d.base))
        .form(&[("pick", token.as_str()), ("organisation", trading.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("pick"));
}
both!(
    connect_with_picker_sqlite,
    connect_with_picker_postgres,
    connect_with_picker
);

/// An organisation not picked that another tenant of this daemon is
/// connected to keeps its link (one Xero user may have connected both, and
/// removing the link could cut the other tenant off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organisation_not_picked_but_used_by_another_tenant_keeps_its_link() {
    let db = TestDb::sqlite();
    let (sim, d) = setup(&db).await;
    d.store
        .upsert_tenant("globex", "Globex", &[], 1)
        .await
        .unwrap();
    let globex = connect_tenant(&sim, &d, "globex", DEFAULT_TENANT_HOLDINGS).await;
    let b = browser();
    let (_, token) = open_picker(&sim, &d, &b).await;
    let trading = DEFAULT_TENANT_TRADING.to_string();
    let r = b
        .post(format!("{}/oauth/pick", d.base))
        .form(&[("pick", token.as_str()), ("organisation", trading.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let acme = d
        .store
        .connection_for("acme", "xero")
        .await
        .unwrap()
        .unwrap();
    let mut orgs: Vec<uuid::Uuid> = grant_of(&sim, &acme)
        .connections
        .iter()
        .map(|x| x.tenant_id)
        .collect();
    orgs.sort();
    let mut both = vec![DEFAULT_TENANT_HOLDINGS, DEFAULT_TENANT_TRADING];
    both.sort();
    assert_eq!(orgs, both, "Holdings is Globex's: its link is kept");
    let kept: Vec<uuid::Uuid> = grant_of(&sim, &globex)
        .connections
        .iter()
        .map(|x| x.tenant_id)
        .collect();
    assert_eq!(kept, [DEFAULT_TENANT_HOLDINGS]);
}

/// Two tenants here connected to the same organisation. Through one link
/// (one Xero user connected it for both, and Xero keeps one link per user,
/// app and organisation): one tenant disconnecting leaves the link and its
/// grant in place at Xero (deleting the link, or revoking the grant, which
/// at Xero removes the user's connections, would cut the other tenant
/// off), drops its own tokens and says so. Through links of their own (two
/// Xero users): a disconnect removes its own link and revokes its grant, as
/// ever, and the other stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_keeps_the_link_another_tenant_uses() {
    let db = TestDb::sqlite();
    let (sim, d) = setup(&db).await;
    for t in ["globex", "initech"] {
        d.store.upsert_tenant(t, t, &[], 1).await.unwrap();
    }
    let globex = connect_tenant(&sim, &d, "globex", DEFAULT_TENANT_HOLDINGS).await;
    let acme = connect_tenant(&sim, &d, "acme", DEFAULT_TENANT_HOLDINGS).await;
    let deletes = |since: u64| {
        sim.requests(since)
            .into_iter()
            .filter(|r| r.method == "DELETE" && r.uri.starts_with("/connections/"))
            .count()
    };
    let last = || sim.requests(0).last().map_or(0, |r| r.seq);

    // Links of their own: acme's goes, globex's stays.
    let seq = last();
    let report = d.conns.disconnect(&acme.id, ADMIN).await.unwrap();
    assert!(
        report.organisation_link_removed && report.token_revoked && report.problems.is_empty(),
        "{report:?}"
    );
    assert_eq!(deletes(seq), 1);
    assert!(grant_of(&sim, &acme).revoked);
    assert!(!grant_of(&sim, &globex).revoked);
    assert!(d.conns.tokens().bearer(&globex.id).await.is_ok());

    // One link for two tenants (as Xero hands back for one user): set
    // initech's to globex's, as Xero's answer would have.
    let initech = connect_tenant(&sim, &d, "initech", DEFAULT_TENANT_HOLDINGS).await;
    let ledgerport::store::Pool::Sqlite(pool) = d.store.pool() else {
        unreachable!("SQLite here")
    };
    sqlx::query("UPDATE connections SET external_connection_id = $1 WHERE id = $2")
        .bind(globex.external_connection_id.as_deref().unwrap())
        .bind(&initech.id)
        .execute(pool)
        .await
        .unwrap();
    let seq = last();
    let report = d.conns.disconnect(&initech.id, ADMIN).await.unwrap();
    assert!(
        !report.organisation_link_removed && !report.token_revoked,
        "{report:?}"
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("left in place") && p.contains("same link")),
        "{report:?}"
    );
    assert_eq!(deletes(seq), 0, "the shared link was deleted");
    assert!(
        !sim.requests(seq)
            .iter()
            .any(|r| r.uri.starts_with("/connect/revocation")),
        "the grant was revoked"
    );
    assert!(
        d.store
            .token_snapshot(&keys(7), &initech.id)
            .await
            .unwrap()
            .unwrap()
            .1
            .is_none(),
        "initech's tokens are dropped here all the same"
    );
    assert_eq!(
        d.store
            .connection(&initech.id)
            .await
            .unwrap()
            .unwrap()
            .state,
        ConnectionState::Disconnected
    );
    let kept = grant_of(&sim, &globex);
    assert!(!kept.revoked);
    assert_eq!(
        kept.connections
            .iter()
            .map(|x| x.tenant_id)
            .collect::<Vec<_>>(),
        [DEFAULT_TENANT_HOLDINGS]
    );
    assert!(d.conns.tokens().bearer(&globex.id).await.is_ok());
}

/// The admin consents to two organisations and never picks one (closes the
/// tab). Once the pick has expired, the daemon removes the grant's links at
/// the provider, except the one to an organisation another tenant here is
/// connected to; with the access token past its time it refreshes first.
/// Before the expiry nothing is taken, and a pick is taken once. A pick
/// still open (an admin choosing this moment) keeps the links of the
/// organisations it offers.
async fn abandoned_picks_have_their_grants_links_removed(db: TestDb) {
    let (sim, d) = setup(&db).await;
    d.store
        .upsert_tenant("globex", "Globex", &[], 1)
        .await
        .unwrap();
    let globex = connect_tenant(&sim, &d, "globex", DEFAULT_TENANT_HOLDINGS).await;
    let new_grant = |before: &std::collections::HashSet<uuid::Uuid>| {
        sim.grants()
            .into_iter()
            .find(|g| !before.contains(&g.auth_event_id))
            .expect("the pick's grant")
    };
    let grants_now = || -> std::collections::HashSet<uuid::Uuid> {
        sim.grants().iter().map(|g| g.auth_event_id).collect()
    };
    let orgs_of = |g: &xero_sim::GrantInfo| {
        let mut o: Vec<uuid::Uuid> = g.connections.iter().map(|c| c.tenant_id).collect();
        o.sort();
        o
    };
    let mut both = vec![DEFAULT_TENANT_HOLDINGS, DEFAULT_TENANT_TRADING];
    both.sort();
    // Past the pick's 15 minutes; then past the access token's 30 as well.
    for wait in [901, 1900] {
        let before = grants_now();
        let _ = open_picker(&sim, &d, &browser()).await;
        assert_eq!(orgs_of(&new_grant(&before)), both);
        assert_eq!(d.conns.clean_abandoned_picks().await, 0, "not expired yet");
        sim.advance_secs(wait);
        assert_eq!(d.conns.clean_abandoned_picks().await, 1);
        let g = new_grant(&before);
        assert_eq!(
            orgs_of(&g),
            [DEFAULT_TENANT_HOLDINGS],
            "after {wait} s: Trading's link removed, Holdings (Globex's) kept"
        );
        assert_eq!(
            g.refresh_count,
            u64::from(wait > 1800),
            "refreshed only when the access token had expired"
        );
        assert_eq!(d.conns.clean_abandoned_picks().await, 0, "taken once");
        assert_eq!(grant_of(&sim, &globex).connections.len(), 1);
    }
    // Abandoned while another pick offering the same organisations is open.
    let by_id = |id: uuid::Uuid| {
        sim.grants()
            .into_iter()
            .find(|g| g.auth_event_id == id)
            .unwrap()
    };
    let before = grants_now();
    let _ = open_picker(&sim, &d, &browser()).await;
    let first = new_grant(&before).auth_event_id;
    sim.advance_secs(800);
    let before = grants_now();
    let _ = open_picker(&sim, &d, &browser()).await;
    let second = new_grant(&before).auth_event_id;
    sim.advance_secs(200);
    assert_eq!(d.conns.clean_abandoned_picks().await, 1, "the first one");
    assert_eq!(
        orgs_of(&by_id(first)),
        both,
        "Trading is offered by the open pick: kept"
    );
    sim.advance_secs(800);
    assert_eq!(d.conns.clean_abandoned_picks().await, 1, "the second one");
    assert_eq!(orgs_of(&by_id(second)), [DEFAULT_TENANT_HOLDINGS]);
}
both!(
    abandoned_picks_sqlite,
    abandoned_picks_postgres,
    abandoned_picks_have_their_grants_links_removed
);

async fn bad_expired_states_and_codes_refused(db: TestDb) {
    let (sim, d) = setup(&db).await;
    sim.set_auto_approve(Some(vec![DEFAULT_TENANT_HOLDINGS]));
    let b = browser();
    // Unknown / missing state.
    for q in ["code=abc&state=forged", "code=abc"] {
        let r = b
            .get(format!("{}/oauth/callback?{q}", d.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        assert!(r.text().await.unwrap().contains("state"));
    }
    // A state past its 10 minutes.
    let url = d.conns.begin_connect("acme", "xero", ADMIN).await.unwrap();
    let cb = authorize(&b, &sim, &url, None).await;
    sim.advance_secs(601);
    let (status, body) = finish(&b, &d.base, &cb, None).await;
    assert_eq!(status, 400);
    assert!(body.contains("state") && body.contains("expired"), "{body}");
    // An authorization code past its 5 minutes (the state is still valid).
    let url = d.conns.begin_connect("acme", "xero", ADMIN).await.unwrap();
    let cb = authorize(&b, &sim, &url, None).await;
    sim.advance_secs(301);
    let (status, body) = finish(&b, &d.base, &cb, None).await;
    assert_eq!(status, 400);
    assert!(body.contains("code") && body.contains("refused"), "{body}");
    // The admin denying consent is reported as such.
    let url = d.conns.begin_connect("acme", "xero", ADMIN).await.unwrap();
    let state = url
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .to_string();
    let r = b
        .get(format!(
            "{}/oauth/callback?error=access_denied&state={state}",
            d.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("access_denied"));
    // Refused with a state already used (the back button): the state is
    // named, and the provider's error code is still shown.
    let r = b
        .get(format!(
            "{}/oauth/callback?error=access_denied&error_description=The+user+cancelled&state={state}",
            d.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("state"), "{text}");
    assert!(text.contains("access_denied"), "{text}");
    assert!(
        !text.contains("The user cancelled"),
        "free text is shown only with a valid state: {text}"
    );
    let r = b
        .get(format!(
            "{}/oauth/callback?error=Your+account+is+locked,+call+0800&state=made-up",
            d.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let text = r.text().await.unwrap();
    assert!(!text.contains("locked"), "not an error code: {text}");
    // Unknown tenant / connector are refused naming the field.
    let e = d
        .conns
        .begin_connect("nobody", "xero", ADMIN)
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("tenant"), "{e}");
    let e = d
        .conns
        .begin_connect("acme", "quickbooks", ADMIN)
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("connector"), "{e}");
    assert!(
        d.store
            .connection_for("acme", "xero")
            .await
            .unwrap()
            .is_none()
    );
}
both!(
    refusals_sqlite,
    refusals_postgres,
    bad_expired_states_and_codes_refused
);

/// Refresh requests the simulator's token endpoint received so far.
fn refresh_requests(sim: &SimHandle) -> usize {
    sim.requests(0)
        .iter()
        .filter(|r| {
            r.uri.starts_with("/connect/token")
                && r.body_text
                    .as_deref()
                    .unwrap_or("")
                    .contains("grant_type=refresh_token")
        })
        .count()
}

/// 50 concurrent bearer()/refresh() calls in each of two daemons (two
/// stores and token managers on one database) after expiry: one refresh.
async fn storm(db: TestDb, two_daemons: bool) {
    let (sim, a) = setup(&db).await;
    let b = daemon(&sim, &db.url(), keys(7), None).await;
    let c = connect_one(&sim, &a, DEFAULT_TENANT_HOLDINGS).await;
    for round in 1..=2u64 {
        let before = sim.counters();
        let refresh_requests_before = refresh_requests(&sim);
        // A slow token endpoint widens the race window a missing lock would lose.
        sim.set_faults(xero_sim::FaultConfig {
            rules: vec![xero_sim::FaultRule {
                route: Some("POST /connect/token".into()),
                latency_ms: 300,
                ..Default::default()
            }],
            ..Default::default()
        });
        let old = a.conns.tokens().bearer(&c.id).await.unwrap();
        sim.advance_secs(1800);
        let mut tasks = Vec::new();
        for i in 0..100 {
            let d = if two_daemons && i % 2 == 1 { &b } else { &a };
            let tm = d.conns.tokens();
            let id = c.id.clone();
            let old = old.clone();
            tasks.push(tokio::spawn(async move {
                if i % 3 == 0 {
                    tm.refresh(&id, &old).await
                } else {
                    tm.bearer(&id).await
                }
            }));
        }
        let mut got = std::collections::BTreeSet::new();
        for t in tasks {
            got.insert(t.await.unwrap().unwrap().access_token);
        }
        let after = sim.counters();
        assert_eq!(
            after.refreshes - before.refreshes,
            1,
            "round {round}: exactly one refresh"
        );
        // Not even a second request answered from the grace period.
        assert_eq!(
            refresh_requests(&sim) - refresh_requests_before,
            1,
            "round {round}: one token request"
        );
        assert_eq!(after.invalid_grants, 0);
        assert_eq!(got.len(), 1, "everyone got the same new token");
        let tok = got.into_iter().next().unwrap();
        assert_ne!(tok, old.access_token);
        assert!(accepted(&sim, &tok).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_storm_two_daemons_postgres() {
    if let Some(db) = TestDb::postgres().await {
        storm(db, true).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_storm_one_daemon_sqlite() {
    storm(TestDb::sqlite(), false).await
}

/// A proxy in front of the token endpoint that passes the first refresh to
/// the simulator and then loses its answer (never replies).
/// A token request passed on to the simulator's token endpoint `target`,
/// and its answer as the proxy gives it back.
async fn forward_token(
    target: &str,
    headers: &axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> impl axum::response::IntoResponse + use<> {
    let mut req = reqwest::Client::new().post(target).body(body);
    for (k, v) in headers.iter() {
        if k != "host" && k != "content-length" {
            req = req.header(k, v);
        }
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.bytes().await.unwrap();
    (
        axum::http::StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        text,
    )
}

/// Serve `app` on a loopback port of its own: its base URL.
async fn serve(app: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    base
}

async fn lossy_token_proxy(sim: &SimHandle) -> String {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    use std::sync::atomic::{AtomicU32, Ordering};
    let target = format!("{}/connect/token", sim.base_url());
    let lost = Arc::new(AtomicU32::new(0));
    let app = axum::Router::new().route(
        "/connect/token",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let target = target.clone();
            let lost = lost.clone();
            async move {
                let answer = forward_token(&target, &headers, body.clone()).await;
                let refresh = String::from_utf8_lossy(&body).contains("grant_type=refresh_token");
                if refresh && lost.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The provider did the refresh; its answer never arrives.
                    std::future::pending::<()>().await;
                }
                answer
            }
        }),
    );
    serve(app).await
}

async fn lost_answer_then_revoked(db: TestDb) {
    let sim = sim().await;
    let proxy = lossy_token_proxy(&sim).await;
    let mut o = sim_overrides(&sim);
    o.insert("https://identity.xero.com".into(), proxy);
    // A short timeout: the lost answer is only noticed when it runs out.
    let d = daemon_with_timeout(
        &sim,
        &db.url(),
        keys(7),
        Some(o),
        std::time::Duration::from_secs(2),
    )
    .await;
    d.store
        .upsert_tenant("acme", "Acme Ltd", &[], 1)
        .await
        .unwrap();
    let c = connect_one(&sim, &d, DEFAULT_TENANT_HOLDINGS).await;
    let old = d.conns.tokens().bearer(&c.id).await.unwrap();
    let before = sim.counters();
    sim.advance_secs(1790);
    // The first refresh rotates at the provider but its answer is lost; the
    // retry with the old refresh token gets the current set (grace period).
    let cred = d.conns.tokens().bearer(&c.id).await.unwrap();
    let after = sim.counters();
    assert_eq!(
        after.refreshes - before.refreshes,
        1,
        "one rotation at the provider"
    );
    assert_eq!(after.invalid_grants, 0);
    assert!(
        d.conns
            .tokens()
            .stats()
            .lost_answers
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_ne!(cred.access_token, old.access_token);
    assert!(accepted(&sim, &cred.access_token).await);
    // The rotated refresh token was stored: the next refresh works too.
    let g = grant_of(&sim, &c);
    sim.advance_secs(3600);
    let cred2 = d.conns.tokens().bearer(&c.id).await.unwrap();
    assert!(accepted(&sim, &cred2.access_token).await);
    assert_eq!(sim.counters().invalid_grants, 0);
    assert_eq!(grant_of(&sim, &c).refresh_count, g.refresh_count + 1);

    // The grant is revoked at the provider: needs-reauth, kept, event recorded.
    let mut events = d.conns.events().subscribe();
    d.store
        .set_mapping(
            &MappingScope {
                tenant_id: "acme".into(),
                connector_id: "xero".into(),
            },
            &AccountMapping {
                kind: "vat".into(),
                account_code: "820".into(),
                tax_type: None,
            },
            ADMIN,
            1,
        )
        .await
        .unwrap();
    assert!(sim.revoke_grant(c.auth_event_id.as_deref().unwrap().parse().unwrap()));
    let rejected = Credential {
        access_token: cred2.access_token.clone(),
    };
    let e = d
        .conns
        .tokens()
        .refresh(&c.id, &rejected)
        .await
        .unwrap_err();
    assert!(matches!(e, CredentialError::NeedsReauth(_)), "{e}");
    let now = d.store.connection(&c.id).await.unwrap().unwrap();
    assert_eq!(now.state, ConnectionState::NeedsReauth);
    assert!(now.state_reason.unwrap().contains("invalid_grant"));
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.kind, "needs-reauth");
    let kinds: Vec<String> = d
        .store
        .connection_events(&c.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds.last().map(String::as_str), Some("needs-reauth"));
    // Later calls do not hammer the provider.
    let n = sim.counters().invalid_grants;
    assert!(matches!(
        d.conns.tokens().bearer(&c.id).await,
        Err(CredentialError::NeedsReauth(_))
    ));
    assert_eq!(sim.counters().invalid_grants, n);
    assert_eq!(
        d.store
            .mappings(&MappingScope {
                tenant_id: "acme".into(),
                connector_id: "xero".into()
            })
            .await
            .unwrap()
            .len(),
        1
    );
    // Reconnecting brings it back to active.
    let c2 = connect_one(&sim, &d, DEFAULT_TENANT_HOLDINGS).await;
    assert_eq!(
        (c2.id.as_str(), c2.state),
        (c.id.as_str(), ConnectionState::Active)
    );
}
both!(
    lost_answer_then_revoked_sqlite,
    lost_answer_then_revoked_postgres,
    lost_answer_then_revoked
);

/// A token proxy that holds every refresh's request until `gate` opens
/// (code exchanges pass at once).
async fn gated_token_proxy(sim: &SimHandle, gate: Arc<tokio::sync::Semaphore>) -> String {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    let target = format!("{}/connect/token", sim.base_url());
    let app = axum::Router::new().route(
        "/connect/token",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let target = target.clone();
            let gate = gate.clone();
            async move {
                if String::from_utf8_lossy(&body).contains("grant_type=refresh_token") {
                    let _ = gate.acquire().await.unwrap();
                }
                forward_token(&target, &headers, body).await
            }
        }),
    );
    serve(app).await
}

/// An admin reconnects while a refresh of the old grant is on its way,
/// and the provider refuses the old grant: the connection stays active on
/// the new grant. (On SQLite the refresh's `invalid_grant` used to mark the
/// freshly reconnected connection as needing re-authorisation, so its
/// deliveries paused until a second, pointless reconnect; on PostgreSQL
/// the row lock orders the two.)
async fn a_reconnect_during_a_refresh_of_the_old_grant_wins(db: TestDb) {
    let sim = sim().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let proxy = gated_token_proxy(&sim, gate.clone()).await;
    let mut o = sim_overrides(&sim);
    o.insert("https://identity.xero.com".into(), proxy);
    let d = Arc::new(daemon(&sim, &db.url(), keys(7), Some(o)).await);
    d.store
        .upsert_tenant("acme", "Acme Ltd", &[], 1)
        .await
        .unwrap();
    let c = connect_one(&sim, &d, DEFAULT_TENANT_HOLDINGS).await;
    let old = d.conns.tokens().bearer(&c.id).await.unwrap();
    // The provider has dropped the old grant; a call's 401 asks for a refresh.
    assert!(sim.revoke_grant(c.auth_event_id.as_deref().unwrap().parse().unwrap()));
    let refresh = {
        let d = d.clone();
        let id = c.id.clone();
        tokio::spawn(async move { d.conns.tokens().refresh(&id, &old).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // The admin reconnects meanwhile (on PostgreSQL this waits for the
    // refresh's row lock).
    let reconnect = {
        let d = d.clone();
        let sim = sim.clone();
        tokio::spawn(async move { connect_one(&sim, &d, DEFAULT_TENANT_HOLDINGS).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    gate.add_permits(100);
    let refreshed = refresh.await.unwrap();
    let c2 = reconnect.await.unwrap();
    assert_eq!(c2.id, c.id);
    let now = d.store.connection(&c.id).await.unwrap().unwrap();
    assert_eq!(
        now.state,
        ConnectionState::Active,
        "refresh answered {refreshed:?}; reason {:?}",
        now.state_reason
    );
    assert!(now.connected_at > c.connected_at);
    let cred = d.conns.tokens().bearer(&c.id).await.unwrap();
    assert!(accepted(&sim, &cred.access_token).await);
}
both!(
    reconnect_during_refresh_sqlite,
    reconnect_during_refresh_postgres,
    a_reconnect_during_a_refresh_of_the_old_grant_wins
);

/// An admin's calls to the provider (the account list behind the mapping
/// screen) count in the connection's request rate with the dispatcher's,
/// on every daemon: with the organisation's minute used up, the list is
/// refused at once, saying why, and Xero is not called (before, admin calls
/// went past the limit and Xero's 429 held the connection's deliveries).
async fn admin_calls_count_in_the_provider_rate(db: TestDb) {
    let (sim, d) = setup(&db).await;
    let (rt, plugin) = xero_plugin(&sim);
    d.conns.register_plugin(rt, plugin);
    let c = connect_one(&sim, &d, DEFAULT_TENANT_HOLDINGS).await;
    let scope = MappingScope {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
    };
    let calls = || sim.counters().accounting_requests;
    let before = calls();
    assert!(d.conns.account_list(&scope).await.unwrap().is_some());
    assert!(calls() > before, "the list asks Xero");
    // The deliveries (here: the test) use up the rest of the minute.
    let now = chrono::Utc::now().timestamp_millis();
    let mut taken = 0;
    while d
        .store
        .take_rate_slot(&c.id, 60, 60_000, now)
        .await
        .unwrap()
        .is_ok()
    {
        taken += 1;
        assert!(taken <= 60);
    }
    assert!(taken < 60, "the list's own calls were not counted");
    let before = calls();
    let started = std::time::Instant::now();
    let e = d.conns.account_list(&scope).await.unwrap_err();
    assert!(e.to_string().contains("60 requests a minute"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert_eq!(calls(), before, "Xero was called past its limit");
}
both!(
    admin_rate_sqlite,
    admin_rate_postgres,
    admin_calls_count_in_the_provider_rate
);

/// After an outage every connection's token expires together. On
/// PostgreSQL a refresh holds a pooled connection (its row lock) across the
/// call to the provider, so with the provider slow, unbounded refreshes
/// took the whole pool (16) and the rest of the daemon (ingest, claims,
/// lease renewals) waited up to the pool's 30 s timeout. Refreshes now
/// hold at most a few at once; the store stays usable meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_refreshes_do_not_take_the_whole_pool() {
    use ledgerport::crypto::Secret;
    use ledgerport::store::{NewConnection, Organisation, TokenSet};
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let sim = sim().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let proxy = gated_token_proxy(&sim, gate.clone()).await;
    let mut o = sim_overrides(&sim);
    o.insert("https://identity.xero.com".into(), proxy);
    let d = Arc::new(daemon(&sim, &db.url(), keys(7), Some(o)).await);
    let mut ids = Vec::new();
    for i in 0..20 {
        let t = format!("t{i}");
        d.store.upsert_tenant(&t, &t, &[], 1).await.unwrap();
        let c = d
            .store
            .finish_connect(
                &keys(7),
                &NewConnection {
                    tenant_id: t.clone(),
                    connector_id: "xero".into(),
                    admin: ADMIN.into(),
                    scopes: vec![],
                    organisation: Organisation {
                        tenant_id: format!("org-{i}"),
                        name: format!("Org {i}"),
                        connection_id: None,
                    },
                    auth_event_id: None,
                    // Expired: the first call refreshes.
                    tokens: Some(TokenSet {
                        access_token: Secret::new(format!("old-access-{i}")),
                        refresh_token: Some(Secret::new(format!("old-refresh-{i}"))),
                        expires_at: 0,
                    }),
                },
                1,
            )
            .await
            .unwrap();
        ids.push(c.connection.id);
    }
    let mut calls = tokio::task::JoinSet::new();
    for id in &ids {
        let d = d.clone();
        let id = id.clone();
        calls.spawn(async move { d.conns.tokens().bearer(&id).await });
    }
    // Every refresh is waiting for the provider now.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let started = std::time::Instant::now();
    let write = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        d.store.upsert_tenant("late", "Late", &[], 2),
    )
    .await;
    assert!(
        matches!(write, Ok(Ok(_))),
        "the store was not usable while refreshes waited: {write:?} after {:?}",
        started.elapsed()
    );
    gate.add_permits(1000);
    while let Some(r) = calls.join_next().await {
        // The simulator knows none of these grants: each is refused, and
        // that is all right here.
        let _ = r.unwrap();
    }
}

async fn disconnect_then_reconnect_keeps_mappings(db: TestDb) {
    let (sim, d) = setup(&db).await;
    let (rt, plugin) = xero_plugin(&sim);
    d.conns.register_plugin(rt, plugin);
    let c = connect_one(&sim, &d, DEFAULT_TENANT_HOLDINGS).await;
    let scope = MappingScope {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
    };
    let m = |k: &str, code: &str, t: Option<&str>| AccountMapping {
        kind: k.into(),
        account_code: code.into(),
        tax_type: t.map(String::from),
    };
    // Validated against the organisation's accounts.
    let ok = d
        .conns
        .set_mapping(&scope, m("gross-salary", "477", None), ADMIN)
        .await
        .unwrap();
    assert_eq!(ok.validated_against.as_deref(), Some("Acme Holdings Ltd"));
    d.conns
        .set_mapping(&scope, m("management-fee", "400", Some("INPUT2")), ADMIN)
        .await
        .unwrap();
    // Archived and unknown codes are refused with the nearest names.
    let e = d
        .conns
        .set_mapping(&scope, m("fx-fee", "499", None), ADMIN)
        .await
        .unwrap_err();
    assert!(matches!(e, MappingError::UnknownAccount { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.starts_with("account_code")
            && text.contains("nearest")
            && text.contains("Acme Holdings Ltd"),
        "{text}"
    );
    let e = d
        .conns
        .set_mapping(&scope, m("fx-fee", "salary", None), ADMIN)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nearest: 477 Salaries"), "{e}");
    let e = d
        .conns
        .set_mapping(&scope, m("fx-fee", "404", Some("BOGUS")), ADMIN)
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("tax_type"), "{e}");
    let e = d
        .conns
        .set_mapping(&scope, m("gross-salaries", "477", None), ADMIN)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("gross-salary"), "{e}");
    let before = d.conns.mappings(&scope).await.unwrap();
    assert_eq!(before.len(), 2);

    let g = grant_of(&sim, &c);
    let report = d.conns.disconnect(&c.id, ADMIN).await.unwrap();
    assert!(
        report.organisation_link_removed && report.token_revoked,
        "{report:?}"
    );
    // The provider really forgot us.
    let g2 = sim
        .grants()
        .into_iter()
        .find(|x| x.auth_event_id == g.auth_event_id)
        .unwrap();
    assert!(g2.revoked && g2.connections.is_empty(), "{g2:?}");
    assert!(!accepted(&sim, &g.access_token).await);
    let now = d.store.connection(&c.id).await.unwrap().unwrap();
    assert_eq!(now.state, ConnectionState::Disconnected);
    assert!(
        d.store
            .token_snapshot(&keys(7), &c.id)
            .await
            .unwrap()
            .unwrap()
            .1
            .is_none(),
        "tokens dropped"
    );
    assert!(matches!(
        d.conns.tokens().bearer(&c.id).await,
        Err(CredentialError::NeedsReauth(_))
    ));
    assert_eq!(
        d.conns.mappings(&scope).await.unwrap(),
        before,
        "mappings kept"
    );
    // Without a live connection mappings can still be prepared (unchecked).
    let out = d
        .conns
        .set_mapping(&scope, m("vat", "820", None), ADMIN)
        .await
        .unwrap();
    assert_eq!(out.validated_against, None);

    let c2 = connect_one(&sim, &d, DEFAULT_TENANT_HOLDINGS).await;
    assert_eq!(c2.id, c.id, "the same connection comes back");
    assert_eq!(c2.state, ConnectionState::Active);
    assert_eq!(d.conns.mappings(&scope).await.unwrap().len(), 3);
    let kinds: Vec<String> = d
        .store
        .connection_events(&c.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, vec!["connected", "disconnected", "reconnected"]);
    // The connector works on the reconnected connection with the SQL stores.
    let ctx = d.conns.call_context(&c.id).await.unwrap();
    let (rt, plugin) = xero_plugin(&sim);
    let list = rt.list_accounts(&plugin, &ctx).await.unwrap().unwrap();
    assert!(list.accounts.iter().any(|a| a.code == "477"));
    assert!(
        !list.accounts.iter().any(|a| a.code == "499"),
        "archived accounts are not offered"
    );
}
both!(
    disconnect_reconnect_sqlite,
    disconnect_reconnect_postgres,
    disconnect_then_reconnect_keeps_mappings
);

async fn key_rotation_and_restart(db: TestDb) {
    let (sim, d) = setup(&db).await;
    let c = connect_one(&sim, &d, DEFAULT_TENANT_HOLDINGS).await;
    let token = d.conns.tokens().bearer(&c.id).await.unwrap();
    let old_id = keys(7).current_key_id().to_string();
    let ring = KeyRing::from_keys(&[[7; 32], [8; 32]]).unwrap();
    let n = d.store.reencrypt_all(&ring).await.unwrap();
    assert_eq!(n, 2, "access and refresh token");
    assert_eq!(
        d.store.key_ids_in_use().await.unwrap(),
        vec![ring.current_key_id().to_string()]
    );
    assert_ne!(ring.current_key_id(), old_id);
    d.store.close().await;
    // "Restart" with only the new key.
    let d2 = daemon(&sim, &db.url(), keys(8), None).await;
    assert_eq!(
        d2.conns.tokens().bearer(&c.id).await.unwrap().access_token,
        token.access_token
    );
    sim.advance_secs(1800);
    let fresh = d2.conns.tokens().bearer(&c.id).await.unwrap();
    assert!(accepted(&sim, &fresh.access_token).await);
    // The old key alone cannot read the store any more.
    let d3 = daemon(&sim, &db.url(), keys(7), None).await;
    assert!(matches!(
        d3.conns.tokens().bearer(&c.id).await,
        Err(CredentialError::Unavailable(_))
    ));
}
both!(
    key_rotation_sqlite,
    key_rotation_postgres,
    key_rotation_and_restart
);

/// `ledgerport keys <command>` on `database` with `key_file` (and no key
/// from the environment): what it printed, once it succeeded.
fn keys_cli(command: &str, database: &str, key_file: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ledgerport"))
        .args(["keys", command, "--database", database, "--key-file"])
        .arg(key_file)
        .env_remove("LEDGERPORT_SECRET_KEY")
        .env_remove("LEDGERPORT_CONFIG")
        .env("LEDGERPORT_LOG", "error")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "keys {command}: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said
}

/// `keys rotate` or `keys revoke` against a database that does not exist
/// (a mistyped or forgotten `--database`) fails, naming it, and neither
/// creates a database nor adds a key to the key file: a rotation that
/// re-encrypted nothing made `keys status` call the key in use "no longer
/// used".
#[test]
fn key_commands_refuse_a_database_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys");
    std::fs::write(
        &key_file,
        format!("{}\n", ledgerport::crypto::generate_key()),
    )
    .unwrap();
    let before = std::fs::read_to_string(&key_file).unwrap();
    let db = dir.path().join("typo.db");
    let url = format!("sqlite://{}", db.display());
    for args in [
        vec!["keys", "rotate", "--database", url.as_str(), "--key-file"],
        vec![
            "keys",
            "revoke",
            "k-1",
            "--database",
            url.as_str(),
            "--key-file",
        ],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ledgerport"))
            .args(&args)
            .arg(&key_file)
            .env_remove("LEDGERPORT_SECRET_KEY")
            .env_remove("LEDGERPORT_CONFIG")
            .env("LEDGERPORT_LOG", "error")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains("no such database file"), "{args:?}: {err}");
        assert!(!db.exists(), "{args:?} created {}", db.display());
        assert_eq!(std::fs::read_to_string(&key_file).unwrap(), before);
    }
}

/// `ledgerport keys rotate` while a daemon runs: the daemon, whose ring
/// came from the same key file, reads the file again when it meets the new
/// key, so its connections keep working without a restart, and what it
/// writes from then on is under the new key.
async fn key_rotation_while_running(db: TestDb) {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys");
    std::fs::write(
        &key_file,
        format!(
            "{}\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32])
        ),
    )
    .unwrap();
    let ring = KeyRing::load(Some(&key_file)).unwrap();
    let old_id = ring.current_key_id();
    let d = daemon(&sim, &db.url(), ring, None).await;
    d.store
        .upsert_tenant("acme", "Acme Ltd", &["ap@acme.test".into()], 1)
        .await
        .unwrap();
    let c = connect_one(&sim, &d, DEFAULT_TENANT_HOLDINGS).await;
    let token = d.conns.tokens().bearer(&c.id).await.unwrap();

    let said = keys_cli("rotate", &db.url(), &key_file);
    assert!(said.contains("2 secrets re-encrypted"), "{said}");
    let in_use = d.store.key_ids_in_use().await.unwrap();
    assert_eq!(in_use.len(), 1);
    assert_ne!(in_use[0], old_id);

    // The running daemon reads what was re-encrypted, and a refresh (the
    // provider's rotated refresh token written back) goes under the new key.
    sim.advance_secs(1800);
    let fresh = d.conns.tokens().bearer(&c.id).await.unwrap();
    assert_ne!(fresh.access_token, token.access_token);
    assert!(accepted(&sim, &fresh.access_token).await);
    assert_eq!(d.conns.keys().current_key_id(), in_use[0]);
    assert_eq!(d.store.key_ids_in_use().await.unwrap(), in_use);
    // `keys status` says which key encrypts and that the old one may go.
    let said = keys_cli("status", &db.url(), &key_file);
    assert!(said.contains(&format!("{}  encrypts", in_use[0])), "{said}");
    assert!(
        said.contains(&format!("{old_id}  no longer used")),
        "{said}"
    );
}
both!(
    key_rotation_running_sqlite,
    key_rotation_running_postgres,
    key_rotation_while_running
);

/// Every byte the database holds, as text (SQLite: the file and its WAL;
/// PostgreSQL: every row of every table as text).
async fn raw_database(db: &TestDb, d: &Daemon) -> String {
    if let Some(p) = db.sqlite_path() {
        let mut all = std::fs::read(p).unwrap();
        if let Ok(w) = std::fs::read(p.with_extension("db-wal")) {
            all.extend(w);
        }
        return String::from_utf8_lossy(&all).into_owned();
    }
    let ledgerport::store::Pool::Postgres(pool) = d.store.pool() else {
        unreachable!()
    };
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out = String::new();
    for (t,) in tables {
        let rows: Vec<(String,)> = sqlx::query_as(&format!("SELECT (x.*)::text FROM {t} x"))
            .fetch_all(pool)
            .await
            .unwrap();
        for (r,) in rows {
            out.push_str(&r);
            out.push('\n');
        }
    }
    out
}

async fn no_token_text_in_the_database(db: TestDb) {
    let (sim, d) = setup(&db).await;
    let c = connect_one(&sim, &d, DEFAULT_TENANT_HOLDINGS).await;
    let mut secrets = Vec::new();
    let g = grant_of(&sim, &c);
    secrets.push(g.access_token.clone());
    secrets.extend(g.refresh_token.clone());
    sim.advance_secs(1800);
    d.conns.tokens().bearer(&c.id).await.unwrap();
    let g = grant_of(&sim, &c);
    secrets.push(g.access_token.clone());
    secrets.extend(g.refresh_token.clone());
    // A pending pick holds tokens too.
    sim.set_auto_approve(Some(vec![]));
    let url = d.conns.begin_connect("acme", "xero", ADMIN).await.unwrap();
    let b = browser();
    let cb = authorize(&b, &sim, &url, None).await;
    assert_eq!(b.get(&cb).send().await.unwrap().status().as_u16(), 303);
    for g in sim.grants() {
        secrets.push(g.access_token.clone());
        secrets.extend(g.refresh_token.clone());
    }
    let raw = raw_database(&db, &d).await;
    assert!(raw.contains(&c.id), "the dump is real");
    assert!(raw.contains("lp1:"), "ciphertexts are there");
    for s in &secrets {
        assert!(s.len() > 20);
        // The JWT payload part is the distinctive bit; check both whole and parts.
        assert!(!raw.contains(s.as_str()), "a token is stored in plaintext");
        for part in s.split('.').filter(|p| p.len() > 20) {
            assert!(!raw.contains(part), "a token part is stored in plaintext");
        }
    }
    // Debug output redacts.
    let snap = d
        .store
        .token_snapshot(&keys(7), &c.id)
        .await
        .unwrap()
        .unwrap()
        .1
        .unwrap();
    let dbg = format!("{snap:?} {:?}", d.conns.tokens());
    assert!(
        !dbg.contains(snap.tokens.access_token.expose()) && dbg.contains("redacted"),
        "{dbg}"
    );
}
both!(
    no_plaintext_sqlite,
    no_plaintext_postgres,
    no_token_text_in_the_database
);

/// A public (PKCE-only) client revokes with its `client_id` in the same form
/// as the token: the form used to be replaced by a second one holding only
/// the client id, so the provider got no token, answered 400, and the
/// refresh token stayed valid after "disconnect".
#[tokio::test]
async fn a_public_client_revokes_its_refresh_token() {
    let mut config = xero_sim::SimConfig::default();
    config.apps.push(xero_sim::AppConfig {
        client_id: "public-app".into(),
        client_secret: String::new(),
        ..xero_sim::AppConfig::default()
    });
    let sim = xero_sim::Sim::start(config).await.unwrap();
    let grant = sim
        .issue_grant(xero_sim::GrantRequest {
            client_id: Some("public-app".into()),
            ..Default::default()
        })
        .unwrap();
    let refresh = grant.tokens.refresh_token.clone().unwrap();
    let provider = ledgerport::oauth::OAuthProvider::new(
        &xero_manifest(),
        ledgerport::oauth::OAuthApp {
            client_id: "public-app".into(),
            client_secret: None,
            redirect_uri: "http://127.0.0.1:1/callback".into(),
            broad_scopes: false,
            base_urls: sim_overrides(&sim),
            timeout: std::time::Duration::from_secs(10),
        },
    )
    .unwrap();
    let revoked = provider
        .revoke(&ledgerport::crypto::Secret::new(&refresh))
        .await;
    assert!(matches!(revoked, Ok(true)), "{revoked:?}");
    let g = sim
        .grants()
        .into_iter()
        .find(|g| g.auth_event_id == grant.auth_event_id)
        .unwrap();
    assert!(g.revoked, "the provider still holds the grant: {g:?}");
    assert!(!accepted(&sim, &grant.tokens.access_token).await);
}

/// A provider without an organisation list names the company connected in
/// its redirect (QuickBooks: `realmId`); a manifest says which parameter
/// (`oauth.organisation_param`), and its value becomes the connection's
/// organisation. A redirect without it connects nothing, saying why.
#[tokio::test]
async fn a_provider_that_names_the_company_in_its_redirect() {
    use ledgerport::connections::{Clock, Connections};
    use ledgerport::oauth::{OAuthApp, OAuthProvider, Providers, oauth_router};
    let db = TestDb::sqlite();
    let sim = sim().await;
    let store = ledgerport::store::Store::open_and_migrate(&db.url())
        .await
        .unwrap();
    store
        .upsert_tenant("acme", "Acme Ltd", &[], 1)
        .await
        .unwrap();
    // Xero's endpoints (the simulator's), as a provider without /connections.
    let mut m = xero_manifest();
    m.id = "books".into();
    m.name = "Books".into();
    let o = m.oauth.as_mut().unwrap();
    o.connections_url = None;
    o.organisation_param = Some("realmId".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut providers = Providers::new();
    providers.insert(
        OAuthProvider::new(
            &m,
            OAuthApp {
                client_id: xero_sim::DEFAULT_CLIENT_ID.into(),
                client_secret: Some(ledgerport::crypto::Secret::new(
                    xero_sim::DEFAULT_CLIENT_SECRET,
                )),
                redirect_uri: format!("{base}/oauth/callback"),
                broad_scopes: false,
                base_urls: sim_overrides(&sim),
                timeout: ledgerport::oauth::TOKEN_REQUEST_TIMEOUT,
            },
        )
        .unwrap(),
    );
    let s2 = sim.clone();
    let conns = Arc::new(Connections::with_policy(
        store.clone(),
        Arc::new(keys(7)),
        Arc::new(providers),
        Clock::from_fn(move || s2.now()),
        test_policy(),
    ));
    let app = oauth_router(conns.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    sim.set_auto_approve(Some(vec![DEFAULT_TENANT_HOLDINGS]));
    let b = browser();
    // Without the parameter: refused, naming it; nothing connected.
    let url = conns.begin_connect("acme", "books", ADMIN).await.unwrap();
    let cb = authorize(&b, &sim, &url, None).await;
    let (status, body) = finish(&b, &base, &cb, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("realmId is missing"), "{body}");
    assert!(
        store
            .connection_for("acme", "books")
            .await
            .unwrap()
            .is_none()
    );
    // A value a connector could not put in a URL path: refused.
    let url = conns.begin_connect("acme", "books", ADMIN).await.unwrap();
    let cb = authorize(&b, &sim, &url, None).await;
    let (status, body) = finish(&b, &base, &format!("{cb}&realmId=..%2Fadmin"), None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("realmId is not a company id"), "{body}");
    // With it: connected to that company.
    let url = conns.begin_connect("acme", "books", ADMIN).await.unwrap();
    let cb = authorize(&b, &sim, &url, None).await;
    let (status, body) = finish(&b, &base, &format!("{cb}&realmId=9130354"), None).await;
    assert_eq!(status, 200, "{body}");
    let c = store
        .connection_for("acme", "books")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.external_tenant_id.as_deref(), Some("9130354"));
    assert_eq!(c.external_tenant_name.as_deref(), Some("Books 9130354"));
    assert_eq!(c.state, ConnectionState::Active);
}
