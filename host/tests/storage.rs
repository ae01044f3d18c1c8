//! Storage tests, run on both engines: SQLite (a temp file) and PostgreSQL
//! (a fresh database per test; see `storage_support`).

#[allow(dead_code)]
mod storage_support;
use storage_support::{count, exec};

use ledgerport::capabilities::kv::KvStore;
use ledgerport::capabilities::mapping::{AccountMapping, MappingScope, MappingStore};
use ledgerport::crypto::{KeyRing, Secret};
use ledgerport::store::settings::SettingChange;
use ledgerport::store::{
    ConnectionState, NewConnection, Organisation, StateRefusal, Store, StoreKind, TokenSet,
};
use proptest::strategy::Strategy;
use storage_support::{TestDb, keys, new_doc};

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

fn scope() -> MappingScope {
    MappingScope {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
    }
}

fn new_conn(tokens: TokenSet, org: &str) -> NewConnection {
    NewConnection {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
        admin: "alice@acme.test".into(),
        scopes: vec!["offline_access".into(), "accounting.invoices".into()],
        organisation: Organisation {
            tenant_id: org.into(),
            name: format!("Org {org}"),
            connection_id: Some("link-1".into()),
        },
        auth_event_id: Some(format!("grant-{org}")),
        tokens: Some(tokens),
    }
}

/// Connect `c` (at time 10); the new connection's id.
async fn connected(s: &Store, k: &KeyRing, c: &NewConnection) -> String {
    s.finish_connect(k, c, 10).await.unwrap().connection.id
}

fn tokens(a: &str, r: &str, exp: i64) -> TokenSet {
    TokenSet {
        access_token: Secret::new(a),
        refresh_token: Some(Secret::new(r)),
        expires_at: exp,
    }
}

async fn migrations_tenants(db: TestDb) {
    let s = db.store().await;
    // Idempotent, and a second Store on the same database sees the same data.
    s.migrate().await.unwrap();
    let t = s
        .upsert_tenant(
            "acme",
            "Acme Ltd",
            &["ap@acme.test".into(), "cfo@acme.test".into()],
            100,
        )
        .await
        .unwrap();
    assert_eq!(t.emails, vec!["ap@acme.test", "cfo@acme.test"]);
    let t = s
        .upsert_tenant("acme", "Acme Limited", &["ap@acme.test".into()], 200)
        .await
        .unwrap();
    assert_eq!(
        (t.name.as_str(), t.created_at, t.emails.len()),
        ("Acme Limited", 100, 1)
    );
    let e = s
        .upsert_tenant("acme", "x", &["not-an-address".into()], 1)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("email"), "{e}");
    let e = s.upsert_tenant("a b", "x", &[], 1).await.unwrap_err();
    assert!(e.to_string().contains("tenant id"), "{e}");
    let s2 = Store::open_and_migrate(&db.url()).await.unwrap();
    assert_eq!(s2.tenants().await.unwrap().len(), 1);
    assert_eq!(
        s.kind(),
        if db.sqlite_path().is_some() {
            StoreKind::Sqlite
        } else {
            StoreKind::Postgres
        }
    );
}
both!(
    migrations_tenants_sqlite,
    migrations_tenants_postgres,
    migrations_tenants
);

/// The database's clock as this machine sees it: on PostgreSQL (one
/// machine here, so the same clock) within a second of ours, and a clock a
/// minute ahead shows as a minute ahead; SQLite has no other clock.
async fn clock_skew_is_measured_against_the_database(db: TestDb) {
    let s = db.store().await;
    // Each reading is taken just before its query, whose time (a pool
    // connection, a round trip: seconds on a stalled machine) makes ours
    // look behind: the bounds allow that much, not a clock a minute off.
    let now = || chrono::Utc::now().timestamp_millis();
    match s.clock_skew_ms(now()).await.unwrap() {
        None => assert!(db.sqlite_path().is_some()),
        Some(skew) => {
            assert!((-5_000..1_000).contains(&skew), "{skew}");
            let ahead = s.clock_skew_ms(now() + 60_000).await.unwrap().unwrap();
            assert!((55_000..61_000).contains(&ahead), "{ahead}");
            assert!(
                ledgerport::store::check_clock_skew(ahead, std::time::Duration::from_secs(90))
                    .is_err()
            );
        }
    }
}
both!(
    clock_skew_sqlite,
    clock_skew_postgres,
    clock_skew_is_measured_against_the_database
);

async fn mappings_crud(db: TestDb) {
    let s = db.store().await;
    let m = |k: &str, c: &str, t: Option<&str>| AccountMapping {
        kind: k.into(),
        account_code: c.into(),
        tax_type: t.map(String::from),
    };
    s.set_mapping(&scope(), &m("gross-salary", "477", None), "alice", 1)
        .await
        .unwrap();
    s.set_mapping(&scope(), &m("fx-fee", "404", Some("INPUT2")), "alice", 1)
        .await
        .unwrap();
    s.set_mapping(&scope(), &m("gross-salary", "478", None), "bob", 2)
        .await
        .unwrap();
    let all = MappingStore::all(&s, &scope()).await.unwrap();
    assert_eq!(
        all,
        vec![
            m("fx-fee", "404", Some("INPUT2")),
            m("gross-salary", "478", None)
        ]
    );
    let listed = s.mappings(&scope()).await.unwrap();
    assert_eq!(listed[1].updated_by.as_deref(), Some("bob"));
    // Other scopes are separate.
    let other = MappingScope {
        tenant_id: "other".into(),
        connector_id: "xero".into(),
    };
    assert!(MappingStore::all(&s, &other).await.unwrap().is_empty());
    assert!(s.delete_mapping(&scope(), "fx-fee").await.unwrap());
    assert!(!s.delete_mapping(&scope(), "fx-fee").await.unwrap());
    s.replace_mappings(
        &scope(),
        &[m("vat", "820", None), m("management-fee", "400", None)],
        "carol",
        3,
        ledgerport::store::mappings::Confirm { checked_org: None },
    )
    .await
    .unwrap();
    let kinds: Vec<String> = s
        .mappings(&scope())
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.mapping.kind)
        .collect();
    assert_eq!(kinds, vec!["management-fee", "vat"]);
}
both!(mappings_crud_sqlite, mappings_crud_postgres, mappings_crud);

async fn kv_roundtrip(db: TestDb) {
    let s = db.store().await;
    assert_eq!(KvStore::get(&s, "c1", "contact").await.unwrap(), None);
    s.set("c1", "contact", b"abc").await.unwrap();
    s.set("c1", "contact", &[0, 159, 146, 150]).await.unwrap();
    s.set("c2", "contact", b"other").await.unwrap();
    assert_eq!(
        KvStore::get(&s, "c1", "contact").await.unwrap(),
        Some(vec![0, 159, 146, 150])
    );
    s.delete("c1", "contact").await.unwrap();
    assert_eq!(KvStore::get(&s, "c1", "contact").await.unwrap(), None);
    assert_eq!(s.kv_keys("c2").await.unwrap(), vec!["contact"]);
}
both!(kv_roundtrip_sqlite, kv_roundtrip_postgres, kv_roundtrip);

/// A connection's kv store holds at most its limit of keys: a new key past
/// it takes the place of the one written longest ago (kv is a cache), an
/// existing key is replaced in place, and another connection is not
/// affected.
async fn kv_holds_at_most_its_limit_of_keys(db: TestDb) {
    use ledgerport::store::kv::MAX_KEYS_PER_CONNECTION;
    let s = db.store().await;
    // All but one key at once (a thousand single writes are slow to sync).
    let fill = format!(
        "INSERT INTO kv (connection_id, key, value, updated_at)
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {})
         SELECT 'c1', 'k' || i, CAST('v' AS {}), i FROM n",
        MAX_KEYS_PER_CONNECTION - 1,
        if matches!(db, TestDb::Postgres { .. }) {
            "BYTEA"
        } else {
            "BLOB"
        }
    );
    exec(&s, &fill).await;
    s.set("c1", "last", b"fits").await.unwrap();
    let count = || async { s.kv_keys("c1").await.unwrap().len() as i64 };
    assert_eq!(count().await, MAX_KEYS_PER_CONNECTION);
    // Replaced in place: nothing evicted.
    s.set("c1", "last", b"replaced").await.unwrap();
    assert_eq!(count().await, MAX_KEYS_PER_CONNECTION);
    assert_eq!(
        KvStore::get(&s, "c1", "k1").await.unwrap(),
        Some(b"v".to_vec())
    );
    // A new key: the oldest (k1) makes room.
    s.set("c1", "one-more", b"x").await.unwrap();
    assert_eq!(count().await, MAX_KEYS_PER_CONNECTION);
    assert_eq!(KvStore::get(&s, "c1", "k1").await.unwrap(), None);
    assert_eq!(
        KvStore::get(&s, "c1", "last").await.unwrap(),
        Some(b"replaced".to_vec())
    );
    assert_eq!(
        KvStore::get(&s, "c1", "one-more").await.unwrap(),
        Some(b"x".to_vec())
    );
    s.set("c2", "contact", b"other").await.unwrap();
    assert_eq!(
        KvStore::get(&s, "c1", "k2").await.unwrap(),
        Some(b"v".to_vec())
    );
}
both!(
    kv_limit_sqlite,
    kv_limit_postgres,
    kv_holds_at_most_its_limit_of_keys
);

async fn states_are_single_use_and_expire(db: TestDb) {
    let s = db.store().await;
    let k = keys(1);
    let v = Secret::new("verifier-xyz");
    s.create_oauth_state(&k, "h1", "acme", "xero", "alice", Some(&v), 100, 700)
        .await
        .unwrap();
    s.create_oauth_state(&k, "h2", "acme", "xero", "alice", None, 100, 700)
        .await
        .unwrap();
    let r = s.consume_oauth_state(&k, "h1", 200).await.unwrap().unwrap();
    assert_eq!(r.pkce_verifier.unwrap().expose(), "verifier-xyz");
    assert_eq!(r.admin, "alice");
    assert_eq!(
        s.consume_oauth_state(&k, "h1", 201)
            .await
            .unwrap()
            .unwrap_err(),
        StateRefusal::AlreadyUsed
    );
    assert_eq!(
        s.consume_oauth_state(&k, "nope", 201)
            .await
            .unwrap()
            .unwrap_err(),
        StateRefusal::Unknown
    );
    assert_eq!(
        s.consume_oauth_state(&k, "h2", 700)
            .await
            .unwrap()
            .unwrap_err(),
        StateRefusal::Expired
    );
    // The daemon's housekeeping removes expired states (their encrypted
    // PKCE verifiers with them) and keeps live ones.
    s.create_oauth_state(&k, "h3", "acme", "xero", "alice", Some(&v), 100, 5_000)
        .await
        .unwrap();
    // Organisation picks (their parked grant tokens): one expired, one
    // used, one live.
    let pick = |expires: i64| ledgerport::store::PendingPick {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
        admin: "alice".into(),
        scopes: vec!["accounting.transactions".into()],
        auth_event_id: None,
        organisations: vec![Organisation {
            tenant_id: "org-1".into(),
            name: "Org".into(),
            connection_id: None,
        }],
        tokens: TokenSet {
            access_token: Secret::new("parked-access"),
            refresh_token: Some(Secret::new("parked-refresh")),
            expires_at: 2_000,
        },
        pick_expires_at: expires,
    };
    for (hash, expires) in [("p-old", 500), ("p-used", 5_000), ("p-live", 5_000)] {
        s.create_pending_pick(&k, hash, &pick(expires))
            .await
            .unwrap();
    }
    assert!(
        s.pending_pick(&k, "p-used", 200, true)
            .await
            .unwrap()
            .is_some()
    );
    // The expired pick is the abandoned-pick clean-up's (its grant's links
    // are removed at the provider first), taken once; the purge removes
    // the used one.
    let (taken, abandoned) = s.take_abandoned_picks(&k, 1_000, 50).await.unwrap();
    assert_eq!(taken, 1);
    assert_eq!(
        abandoned[0].tokens.refresh_token.as_ref().unwrap().expose(),
        "parked-refresh"
    );
    assert_eq!(
        s.open_pick_organisations(1_000).await.unwrap().len(),
        1,
        "the live pick's organisation"
    );
    assert_eq!(s.take_abandoned_picks(&k, 1_000, 50).await.unwrap().0, 0);
    assert_eq!(s.purge_oauth(1_000).await.unwrap(), 3, "2 states, 1 pick");
    assert!(
        s.pending_pick(&k, "p-used", 800, false)
            .await
            .unwrap()
            .is_none()
    );
    let live = s.pending_pick(&k, "p-live", 800, false).await.unwrap();
    assert_eq!(live.unwrap().tokens.access_token.expose(), "parked-access");
    assert_eq!(
        s.purge_oauth(1_000).await.unwrap(),
        0,
        "nothing left to purge"
    );
    assert_eq!(
        s.consume_oauth_state(&k, "h2", 800)
            .await
            .unwrap()
            .unwrap_err(),
        StateRefusal::Unknown
    );
    assert!(s.consume_oauth_state(&k, "h3", 800).await.unwrap().is_ok());
}
both!(
    states_sqlite,
    states_postgres,
    states_are_single_use_and_expire
);

async fn connections_tokens_events(db: TestDb) {
    let s = db.store().await;
    let k = keys(1);
    s.upsert_tenant("acme", "Acme", &[], 1).await.unwrap();
    let e = s
        .finish_connect(&k, &new_conn(tokens("A1", "R1", 1000), "org-1"), 10)
        .await;
    assert!(e.is_ok());
    let done = e.unwrap();
    assert!(!done.reconnected);
    assert_eq!(done.event.kind, "connected");
    let id = done.connection.id.clone();
    assert_eq!(done.connection.state, ConnectionState::Active);
    assert_eq!(
        done.connection.scopes,
        vec!["offline_access", "accounting.invoices"]
    );
    // A lease reads, saves and commits.
    let mut lease = s.lock_tokens(&id).await.unwrap();
    let (c, t) = lease.read(&k).await.unwrap();
    assert_eq!(c.external_tenant_id.as_deref(), Some("org-1"));
    let t = t.unwrap();
    assert_eq!(t.tokens.access_token.expose(), "A1");
    lease.save(&k, &tokens("A2", "R2", 2000), 20).await.unwrap();
    lease.commit().await.unwrap();
    let (_, snap) = s.token_snapshot(&k, &id).await.unwrap().unwrap();
    let snap = snap.unwrap();
    assert_eq!(
        (snap.tokens.access_token.expose(), snap.generation),
        ("A2", t.generation + 1)
    );
    // An uncommitted PostgreSQL lease rolls back.
    if s.kind() == StoreKind::Postgres {
        let mut lease = s.lock_tokens(&id).await.unwrap();
        lease.save(&k, &tokens("A3", "R3", 3000), 30).await.unwrap();
        drop(lease);
        let (_, snap) = s.token_snapshot(&k, &id).await.unwrap().unwrap();
        assert_eq!(snap.unwrap().tokens.access_token.expose(), "A2");
    }
    // Reconnecting to another organisation reuses the row and clears kv.
    s.set(&id, "contact", b"x").await.unwrap();
    let again = s
        .finish_connect(&k, &new_conn(tokens("B1", "S1", 5000), "org-2"), 40)
        .await
        .unwrap();
    assert!(again.reconnected);
    assert_eq!(again.connection.id, id);
    assert_eq!(
        again.replaced.unwrap().refresh_token.unwrap().expose(),
        "R2"
    );
    assert!(s.kv_keys(&id).await.unwrap().is_empty());
    let kinds: Vec<String> = s
        .connection_events(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, vec!["connected", "reconnected"]);
    assert_eq!(s.unhandled_events(10).await.unwrap().len(), 2);
    // Key rotation re-encrypts everything; the old key can then go.
    let both = KeyRing::from_keys(&[[1; 32], [2; 32]]).unwrap();
    s.create_oauth_state(
        &k,
        "h1",
        "acme",
        "xero",
        "alice",
        Some(&Secret::new("v")),
        1,
        10_000,
    )
    .await
    .unwrap();
    let n = s.reencrypt_all(&both).await.unwrap();
    assert_eq!(n, 3);
    assert_eq!(
        s.key_ids_in_use().await.unwrap(),
        vec![both.current_key_id().to_string()]
    );
    let new_only = keys(2);
    let (_, snap) = s.token_snapshot(&new_only, &id).await.unwrap().unwrap();
    assert_eq!(snap.unwrap().tokens.access_token.expose(), "B1");
    assert!(
        s.token_snapshot(&k, &id).await.is_err(),
        "the old key alone no longer decrypts"
    );
    assert_eq!(
        s.consume_oauth_state(&new_only, "h1", 2)
            .await
            .unwrap()
            .unwrap()
            .pkce_verifier
            .unwrap()
            .expose(),
        "v"
    );
}
both!(
    connections_sqlite,
    connections_postgres,
    connections_tokens_events
);

/// A connection without a grant (a connector without OAuth) and the
/// generation `connected_at` gives: it grows with every reconnect, even two
/// in one second, and a connector's needs-reauth lands only on the
/// generation the call ran on.
async fn grantless_connections_and_reconnect_generations(db: TestDb) {
    let s = db.store().await;
    let k = keys(1);
    s.upsert_tenant("acme", "Acme", &[], 1).await.unwrap();
    // An OAuth grant first, then the same tenant and connector without one:
    // the row is reused and no token lingers.
    let id = connected(&s, &k, &new_conn(tokens("A1", "R1", 1000), "org-1")).await;
    let mut grantless = new_conn(tokens("x", "y", 0), "https://hooks.example.com/in");
    grantless.tokens = None;
    grantless.auth_event_id = None;
    grantless.organisation.name = grantless.organisation.tenant_id.clone();
    let again = s.finish_connect(&k, &grantless, 10).await.unwrap();
    assert_eq!(again.connection.id, id);
    assert!(again.reconnected && again.replaced.is_some());
    assert!(matches!(
        s.token_snapshot(&k, &id).await.unwrap(),
        Some((_, None))
    ));
    assert_eq!(again.connection.connected_at, Some(11), "10 was taken");
    assert_eq!(
        again.event.detail,
        "alice@acme.test connected https://hooks.example.com/in"
    );
    // A call that ran on generation 10 cannot mark generation 11.
    assert!(
        s.mark_needs_reauth_if_unchanged(&id, 10, "stale", 12)
            .await
            .unwrap()
            .is_none()
    );
    let c = s.connection(&id).await.unwrap().unwrap();
    assert_eq!(c.state, ConnectionState::Active);
    let ev = s
        .mark_needs_reauth_if_unchanged(&id, 11, "set signing_secret", 12)
        .await
        .unwrap()
        .expect("marked");
    assert_eq!(
        (ev.kind.as_str(), ev.detail.as_str()),
        ("needs-reauth", "set signing_secret")
    );
    let c = s.connection(&id).await.unwrap().unwrap();
    assert_eq!(c.state, ConnectionState::NeedsReauth);
    assert_eq!(c.state_reason.as_deref(), Some("set signing_secret"));
    // Marked once: a second call finds it no longer active.
    assert!(
        s.mark_needs_reauth_if_unchanged(&id, 11, "again", 13)
            .await
            .unwrap()
            .is_none()
    );
    // Reconnecting (at an earlier clock even) moves past every generation.
    let back = s.finish_connect(&k, &grantless, 5).await.unwrap();
    assert_eq!(back.connection.state, ConnectionState::Active);
    assert_eq!(back.connection.connected_at, Some(12));
}
both!(
    grantless_sqlite,
    grantless_postgres,
    grantless_connections_and_reconnect_generations
);

/// Two first connects of one tenant and connector at once (a double click
/// on Connect): both succeed, one row, the second a reconnect.
async fn concurrent_first_connects_make_one_connection(db: TestDb) {
    let s = db.store().await;
    let k = keys(1);
    s.upsert_tenant("acme", "Acme", &[], 1).await.unwrap();
    for round in 0..5 {
        let mut c = new_conn(tokens("A", "R", 1000), "org-1");
        c.connector_id = format!("hook-{round}");
        c.tokens = None;
        let (ida, idb) = (format!("a-{round}"), format!("b-{round}"));
        let (a, b) = tokio::join!(
            s.finish_connect_as(&k, &c, Some(&ida), 10),
            s.finish_connect_as(&k, &c, Some(&idb), 10)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.connection.id, b.connection.id);
        assert!(
            a.reconnected != b.reconnected,
            "one connected, one reconnected"
        );
    }
}
both!(
    concurrent_connects_sqlite,
    concurrent_connects_postgres,
    concurrent_first_connects_make_one_connection
);

async fn unknown_tenant_is_refused(db: TestDb) {
    let s = db.store().await;
    let e = s
        .finish_connect(&keys(1), &new_conn(tokens("A", "R", 1), "o"), 1)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("tenant acme"), "{e}");
}
both!(
    unknown_tenant_sqlite,
    unknown_tenant_postgres,
    unknown_tenant_is_refused
);

/// The outbox claim leaves out the connections it is told to (their rate
/// window is full), on both engines; a repeated document id is recognised
/// as the same document or a conflicting one.
/// Ingest document `d{i}` of tenant acme with one delivery on `conn`; its
/// delivery id.
async fn ingest_on(
    s: &Store,
    i: usize,
    conn: &str,
) -> (ledgerport::store::outbox::IngestOutcome, String) {
    let conns = vec![(conn.to_string(), "xero".to_string())];
    let doc = format!("d{i}");
    let r = s
        .ingest_document(
            new_doc("acme", &doc, &format!("INV-{i}"), "{}", "h", 1),
            &conns,
        )
        .await
        .unwrap();
    (
        r,
        ledgerport::store::outbox::delivery_id("acme", &doc, conn),
    )
}

async fn claims_skip_excluded_connections(db: TestDb) {
    use ledgerport::store::outbox::IngestOutcome;
    let s = db.store().await;
    assert_eq!(s.ingest_targets("acme").await.unwrap(), None);
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    assert_eq!(s.ingest_targets("acme").await.unwrap(), Some(vec![]));
    for (i, conn) in ["conn-a", "conn-a", "conn-a", "conn-b", "conn-b"]
        .iter()
        .enumerate()
    {
        let (r, _) = ingest_on(&s, i, conn).await;
        assert!(matches!(r, IngestOutcome::Created { deliveries: 1 }));
    }
    let again = |hash: &'static str| {
        let s = s.clone();
        async move {
            s.ingest_document(new_doc("acme", "d0", "INV-0", "{\"x\":1}", hash, 2), &[])
                .await
                .unwrap()
        }
    };
    assert!(matches!(again("h").await, IngestOutcome::Existing));
    assert!(matches!(again("other").await, IngestOutcome::Conflict(b) if b == "{}"));
    let claimed = s
        .claim_deliveries(
            "w",
            10,
            60_000,
            10,
            &ledgerport::store::outbox::ConnectionCaps::uniform(5),
            &["conn-a".to_string()],
        )
        .await
        .unwrap();
    let conns: Vec<&str> = claimed.iter().map(|c| c.connection_id.as_str()).collect();
    assert_eq!(conns, ["conn-b", "conn-b"]);
    let claimed = s
        .claim_deliveries(
            "w",
            10,
            60_000,
            10,
            &ledgerport::store::outbox::ConnectionCaps::uniform(5),
            &[],
        )
        .await
        .unwrap();
    let conns: Vec<&str> = claimed.iter().map(|c| c.connection_id.as_str()).collect();
    assert_eq!(conns, ["conn-a", "conn-a", "conn-a"]);
}
both!(
    claims_skip_excluded_sqlite,
    claims_skip_excluded_postgres,
    claims_skip_excluded_connections
);

/// Ingests from many tasks at once share transactions (group commit), and
/// each still gets its own answer: new, repeated, conflicting; a write that
/// fails (an unknown tenant) fails alone, and the others sent with it are
/// stored.
async fn concurrent_ingests_share_transactions_and_keep_their_answers(db: TestDb) {
    use ledgerport::store::outbox::IngestOutcome;
    use std::sync::atomic::Ordering;
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let conns = vec![("conn-a".to_string(), "xero".to_string())];
    let body = |round: usize| if round == 2 { "{\"v\":2}" } else { "{}" };
    let hash = |round: usize| if round == 2 { "other" } else { "h" };
    let mut tasks = tokio::task::JoinSet::new();
    // 60 documents, each sent twice with the same body, 10 of them a third
    // time with another body, and 5 for a tenant that does not exist.
    for round in 0..3 {
        for i in 0..60 {
            if round == 2 && i >= 10 {
                continue;
            }
            let (s, conns) = (s.clone(), conns.clone());
            tasks.spawn(async move {
                let r = s
                    .ingest_document(
                        new_doc(
                            "acme",
                            &format!("d{i}"),
                            &format!("INV-{i}"),
                            body(round),
                            hash(round),
                            1,
                        ),
                        &conns,
                    )
                    .await;
                (i, round, r.map_err(|e| e.to_string()))
            });
        }
    }
    let mut answers: std::collections::BTreeMap<usize, Vec<(usize, IngestOutcome)>> =
        Default::default();
    while let Some(r) = tasks.join_next().await {
        let (i, round, r) = r.unwrap();
        answers
            .entry(i)
            .or_default()
            .push((round, r.unwrap_or_else(|e| panic!("d{i}: {e}"))));
    }
    assert_eq!(answers.len(), 60, "every document answered");
    for (i, got) in &answers {
        let winners: Vec<usize> = got
            .iter()
            .filter(|(_, o)| matches!(o, IngestOutcome::Created { deliveries: 1 }))
            .map(|(r, _)| *r)
            .collect();
        assert_eq!(winners.len(), 1, "document {i} stored once: {got:?}");
        let w = winners[0];
        for (round, o) in got.iter().filter(|(r, _)| *r != w) {
            match o {
                IngestOutcome::Existing => assert_eq!(hash(*round), hash(w), "d{i}: {got:?}"),
                IngestOutcome::Conflict(stored) => {
                    assert_ne!(hash(*round), hash(w), "d{i}: {got:?}");
                    assert_eq!(stored, body(w), "the stored body comes back");
                }
                other => panic!("d{i}: unexpected {other:?}"),
            }
        }
    }
    let pending: i64 = s
        .delivery_counts(None)
        .await
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "pending")
        .map(|(_, n)| n)
        .unwrap_or(0);
    assert_eq!(pending, 60, "one delivery per document");
    let stats = s.group_stats();
    let writes = stats.writes.load(Ordering::Relaxed);
    let txs = stats.transactions.load(Ordering::Relaxed);
    assert_eq!(writes, 130, "every good write committed");
    assert!(
        txs < writes,
        "writes were grouped: {txs} transactions for {writes} writes"
    );
    // Writes for a tenant that does not exist fail, each alone; the good
    // ones sent with them are stored.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..30 {
        let (s, conns) = (s.clone(), conns.clone());
        tasks.spawn(async move {
            let tenant = if i % 6 == 0 { "ghost" } else { "acme" };
            let r = s
                .ingest_document(
                    new_doc(tenant, &format!("n{i}"), "N-1", "{}", "h", 1),
                    &conns,
                )
                .await;
            (tenant, r.map_err(|e| e.to_string()))
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            ("acme", Ok(IngestOutcome::Created { deliveries: 1 })) => ok += 1,
            ("ghost", Err(_)) => failed += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, failed), (25, 5));
}
both!(
    grouped_ingests_sqlite,
    grouped_ingests_postgres,
    concurrent_ingests_share_transactions_and_keep_their_answers
);

/// The dispatcher's read-ahead returns, for each connection of a batch, the
/// same connection, settings, tokens and mappings the per-delivery reads
/// do, and nothing of other tenants or connectors.
async fn read_ahead_matches_the_single_reads(db: TestDb) {
    let s = db.store().await;
    let k = keys(1);
    for t in ["acme", "beta"] {
        s.upsert_tenant(t, t, &[], 1).await.unwrap();
    }
    let a = connected(&s, &k, &new_conn(tokens("A1", "R1", 1000), "org-a")).await;
    let mut other = new_conn(tokens("B1", "S1", 2000), "org-b");
    other.tenant_id = "beta".into();
    let b = connected(&s, &k, &other).await;
    s.set_connection_setting(&k, "acme", "xero", "status", "DRAFT", "alice", 5)
        .await
        .unwrap();
    s.set_connection_setting(&k, "acme", "webhook", "status", "NO", "alice", 5)
        .await
        .unwrap();
    let map = |kind: &str, code: &str| AccountMapping {
        kind: kind.into(),
        account_code: code.into(),
        tax_type: None,
    };
    s.set_mapping(&scope(), &map("fx-fee", "404"), "alice", 5)
        .await
        .unwrap();
    s.set_mapping(&scope(), &map("gross-salary", "477"), "alice", 5)
        .await
        .unwrap();
    // A tax type, and text that JSON escapes (the read-ahead carries a
    // tenant's mappings as one JSON array).
    let taxed = AccountMapping {
        kind: "employer-taxes".into(),
        account_code: "4\"7\\8 é".into(),
        tax_type: Some("INPUT2".into()),
    };
    s.set_mapping(&scope(), &taxed, "alice", 5).await.unwrap();
    let beta = MappingScope {
        tenant_id: "beta".into(),
        connector_id: "xero".into(),
    };
    s.set_mapping(&beta, &map("gross-salary", "500"), "bob", 5)
        .await
        .unwrap();
    // kv: small values are read ahead, a value over the bound is not.
    {
        use ledgerport::capabilities::kv::KvStore;
        use ledgerport::store::ahead::KV_AHEAD_VALUE_BYTES;
        s.set(&a, "contact", b"c-1").await.unwrap();
        s.set(&a, "edge", &[7u8; KV_AHEAD_VALUE_BYTES])
            .await
            .unwrap();
        s.set(&a, "large", &[7u8; KV_AHEAD_VALUE_BYTES + 1])
            .await
            .unwrap();
    }
    let ids = vec![a.clone(), b.clone(), a.clone(), "no-such".to_string()];
    let got = s.call_data(&k, &ids).await.unwrap();
    assert_eq!(got.len(), 2, "the two connections that exist");
    let da = &got[&a];
    assert_eq!(
        Some(&da.connection),
        s.connection(&a).await.unwrap().as_ref()
    );
    let settings: Vec<(String, String)> = da
        .settings
        .iter()
        .map(|x| (x.key.clone(), x.value.expose().to_string()))
        .collect();
    assert_eq!(settings, [("status".to_string(), "DRAFT".to_string())]);
    assert_eq!(
        da.mappings,
        [
            taxed.clone(),
            map("fx-fee", "404"),
            map("gross-salary", "477")
        ],
        "acme's xero mappings, by kind"
    );
    assert_eq!(
        da.mappings,
        s.all(&scope()).await.unwrap(),
        "as the single read"
    );
    let ta = da.tokens.as_ref().unwrap();
    let (_, snap) = s.token_snapshot(&k, &a).await.unwrap().unwrap();
    let snap = snap.unwrap();
    assert_eq!(ta.tokens.access_token.expose(), "A1");
    assert_eq!(
        (ta.tokens.expires_at, ta.generation),
        (snap.tokens.expires_at, snap.generation)
    );
    let mut kv_keys: Vec<&String> = da.kv.values().keys().collect();
    kv_keys.sort();
    assert_eq!(kv_keys, ["contact", "edge"], "values up to the bound");
    assert_eq!(da.kv.values()["contact"], b"c-1");
    let db_ = &got[&b];
    assert!(db_.kv.is_empty(), "b has no kv values");
    assert!(db_.settings.is_empty());
    assert_eq!(db_.mappings, [map("gross-salary", "500")]);
    assert_eq!(
        db_.tokens.as_ref().unwrap().tokens.access_token.expose(),
        "B1"
    );
    assert!(s.call_data(&k, &[]).await.unwrap().is_empty());
}
both!(
    read_ahead_sqlite,
    read_ahead_postgres,
    read_ahead_matches_the_single_reads
);

/// Outcomes recorded at the same moment share transactions and each keeps
/// its meaning: counted attempts are numbered 1, 2, ... with one attempt
/// row each, uncounted ones (rate-limited) add a row numbered 0, and an
/// outcome from a worker that no longer holds the lease records nothing.
async fn concurrent_finishes_share_transactions_and_number_attempts(db: TestDb) {
    use ledgerport::store::outbox::{Finish, state};
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    for i in 0..40 {
        ingest_on(&s, i, &format!("conn-{}", i % 8)).await;
    }
    let finish = |st: &'static str, counts: bool| Finish {
        state: st,
        pause_reason: None,
        pause_detail: None,
        counts,
        next_attempt_at: 0,
        outcome: if counts {
            "transient".into()
        } else {
            "rate-limited".into()
        },
        message: Some("m".into()),
        details: None,
        external_id: None,
        external_url: None,
    };
    for round in 1..=3i64 {
        let claimed = s
            .claim_deliveries(
                "w",
                10 + round,
                60_000,
                100,
                &ledgerport::store::outbox::ConnectionCaps::uniform(100),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(claimed.len(), 40, "round {round}");
        let mut tasks = tokio::task::JoinSet::new();
        for (n, c) in claimed.into_iter().enumerate() {
            let s = s.clone();
            let f = match n % 4 {
                0 => finish(state::PENDING, false),
                _ => finish(state::PENDING, true),
            };
            // Every fifth outcome comes from a worker that lost the lease.
            let holder = n % 5 != 4;
            let lease = if holder {
                c.lease.clone()
            } else {
                "someone-else#1".to_string()
            };
            tasks.spawn(async move {
                let r = s.finish_delivery(&c.id, &lease, 1, 2, &f).await.unwrap();
                (holder, c, r)
            });
        }
        let mut lost = Vec::new();
        while let Some(r) = tasks.join_next().await {
            let (holder, c, recorded) = r.unwrap();
            assert_eq!(recorded, holder);
            if !holder {
                lost.push(c);
            }
        }
        // The lost ones are still working under w's lease: give them back.
        for c in lost {
            s.release(&c.id, &c.lease, 0).await.unwrap();
        }
        assert!(
            s.list_deliveries(None, None, Some("working"), 100)
                .await
                .unwrap()
                .is_empty()
        );
    }
    for d in s.list_deliveries(None, None, None, 100).await.unwrap() {
        let attempts = s.list_attempts(&d.id).await.unwrap();
        let counted: Vec<i64> = attempts
            .iter()
            .map(|a| a.attempt)
            .filter(|a| *a > 0)
            .collect();
        let expected: Vec<i64> = (1..=d.attempts).collect();
        assert_eq!(counted, expected, "{}: {attempts:?}", d.id);
        assert!(attempts.iter().all(|a| a.worker == "w"));
    }
    let writes = s
        .group_stats()
        .transactions
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(writes < 160, "outcomes were grouped: {writes} transactions");
}
both!(
    grouped_finishes_sqlite,
    grouped_finishes_postgres,
    concurrent_finishes_share_transactions_and_number_attempts
);

/// Ingest that fans out in its own transaction: one delivery per connection
/// the tenant has (a disconnected one gets none), a tenant without
/// connections stores the document with none, an unknown tenant stores
/// nothing; the same as reading the targets first.
async fn ingest_fans_out_to_the_tenants_connections_at_commit(db: TestDb) {
    use ledgerport::store::outbox::IngestOutcome;
    let s = db.store().await;
    let k = keys(1);
    for t in ["acme", "beta"] {
        s.upsert_tenant(t, t, &[], 1).await.unwrap();
    }
    let xero = connected(&s, &k, &new_conn(tokens("A", "R", 1000), "org-1")).await;
    let mut other = new_conn(tokens("B", "S", 1000), "org-2");
    other.connector_id = "webhook".into();
    let webhook = connected(&s, &k, &other).await;
    let ingest = |tenant: &'static str, id: &'static str| {
        let s = s.clone();
        async move {
            s.ingest_for_tenant(new_doc(tenant, id, "N-1", "{}", "h", 5))
                .await
                .unwrap()
        }
    };
    let mut expected = s.ingest_targets("acme").await.unwrap().unwrap();
    expected.sort();
    assert_eq!(expected.len(), 2);
    assert!(matches!(
        ingest("acme", "a1").await,
        IngestOutcome::Created { deliveries: 2 }
    ));
    let mut made: Vec<(String, String)> = s
        .list_deliveries(Some("acme"), None, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.connection_id, d.connector_id))
        .collect();
    made.sort();
    assert_eq!(made, expected, "the same targets as the single read");
    let mut lease = s.lock_tokens(&webhook).await.unwrap();
    lease.disconnect("alice", "test", 20).await.unwrap();
    lease.commit().await.unwrap();
    assert!(matches!(
        ingest("acme", "a2").await,
        IngestOutcome::Created { deliveries: 1 }
    ));
    let a2: Vec<String> = s
        .list_deliveries(Some("acme"), None, None, 10)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.document_id == "a2")
        .map(|d| d.connection_id)
        .collect();
    assert_eq!(a2, [xero]);
    assert!(matches!(
        ingest("beta", "b1").await,
        IngestOutcome::Created { deliveries: 0 }
    ));
    assert!(matches!(
        ingest("beta", "b1").await,
        IngestOutcome::Existing
    ));
    assert!(matches!(
        ingest("ghost", "g1").await,
        IngestOutcome::UnknownTenant
    ));
}
both!(
    fan_out_sqlite,
    fan_out_postgres,
    ingest_fans_out_to_the_tenants_connections_at_commit
);

/// The claim holds the per-connection cap across claims (live leases count)
/// and takes lapsed leases back before new work, on both engines.
async fn claims_hold_the_cap_and_take_lapsed_leases_first(db: TestDb) {
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let mut ids = std::collections::HashMap::new();
    for (i, conn) in ["conn-a", "conn-a", "conn-a", "conn-b", "conn-b"]
        .iter()
        .enumerate()
    {
        ids.insert(ingest_on(&s, i, conn).await.1, *conn);
    }
    let per_conn = |claimed: &[ledgerport::store::outbox::Claimed]| {
        let mut n = std::collections::BTreeMap::new();
        for c in claimed {
            assert_eq!(ids[&c.id], c.connection_id);
            *n.entry(c.connection_id.clone()).or_insert(0) += 1;
        }
        n
    };
    // Cap 2: two of A's three, both of B's.
    let first = s
        .claim_deliveries(
            "w1",
            10,
            1_000,
            10,
            &ledgerport::store::outbox::ConnectionCaps::uniform(2),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        per_conn(&first),
        [("conn-a".into(), 2), ("conn-b".into(), 2)].into()
    );
    // Their leases are live: A's third stays where it is.
    assert!(
        s.claim_deliveries(
            "w2",
            20,
            1_000,
            10,
            &ledgerport::store::outbox::ConnectionCaps::uniform(2),
            &[]
        )
        .await
        .unwrap()
        .is_empty()
    );
    // The leases lapse: the four come back (to w3) before A's third.
    let again = s
        .claim_deliveries(
            "w3",
            5_000,
            1_000,
            10,
            &ledgerport::store::outbox::ConnectionCaps::uniform(2),
            &[],
        )
        .await
        .unwrap();
    let mut a: Vec<&str> = again.iter().map(|c| c.id.as_str()).collect();
    let mut b: Vec<&str> = first.iter().map(|c| c.id.as_str()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    // A limit smaller than the work: the earliest first, still capped.
    let last = s
        .claim_deliveries(
            "w4",
            10_000,
            1_000,
            1,
            &ledgerport::store::outbox::ConnectionCaps::uniform(2),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(last.len(), 1);
}
both!(
    claims_cap_sqlite,
    claims_cap_postgres,
    claims_hold_the_cap_and_take_lapsed_leases_first
);

/// Each connector's own cap: a connector declaring one delivery at a time
/// per connection does not hold Xero's connections to one (the smallest
/// cap of every installed connector was applied to all), nor does Xero's
/// five let the careful connector run five.
async fn claims_cap_each_connector_by_its_own_limit(db: TestDb) {
    use ledgerport::store::outbox::ConnectionCaps;
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let k = keys(1);
    let xero = connected(&s, &k, &new_conn(tokens("A1", "R1", 1000), "org-1")).await;
    let careful = connected(
        &s,
        &k,
        &NewConnection {
            connector_id: "careful".into(),
            ..new_conn(tokens("A2", "R2", 1000), "org-2")
        },
    )
    .await;
    for i in 0..8 {
        let (conn, connector) = if i < 4 {
            (&xero, "xero")
        } else {
            (&careful, "careful")
        };
        let doc = format!("d{i}");
        s.ingest_document(
            new_doc("acme", &doc, &format!("INV-{i}"), "{}", "h", 1),
            &[(conn.clone(), connector.to_string())],
        )
        .await
        .unwrap();
    }
    let caps = ConnectionCaps {
        default: 1,
        by_connector: [("xero".to_string(), 3), ("careful".to_string(), 1)].into(),
    };
    let claimed = s
        .claim_deliveries("w1", 10, 60_000, 10, &caps, &[])
        .await
        .unwrap();
    let n = |c: &str| claimed.iter().filter(|d| d.connection_id == c).count();
    assert_eq!((n(&xero), n(&careful)), (3, 1), "{claimed:?}");
    // The live leases count: both connections are at their cap.
    let more = s
        .claim_deliveries("w2", 20, 60_000, 10, &caps, &[])
        .await
        .unwrap();
    assert!(more.is_empty(), "{more:?}");
    // A connector not named takes the default.
    assert_eq!(caps.of(Some("other")), 1);
    assert_eq!(caps.of(None), 1);
}
both!(
    claims_per_connector_sqlite,
    claims_per_connector_postgres,
    claims_cap_each_connector_by_its_own_limit
);

/// A document's stored body, read directly.
async fn body_of(s: &Store, id: &str) -> String {
    let q = "SELECT body FROM documents WHERE tenant_id = 'acme' AND id = $1";
    match s.pool() {
        ledgerport::store::Pool::Sqlite(p) => sqlx::query_scalar(q).bind(id).fetch_one(p).await,
        ledgerport::store::Pool::Postgres(p) => sqlx::query_scalar(q).bind(id).fetch_one(p).await,
    }
    .unwrap()
}

/// An attempt's outcome as the retention test records it (next attempt at
/// 100 s, no message).
fn finished(
    st: &'static str,
    outcome: &str,
    external_id: Option<String>,
) -> ledgerport::store::outbox::Finish {
    ledgerport::store::outbox::Finish {
        state: st,
        pause_reason: None,
        pause_detail: None,
        counts: true,
        next_attempt_at: 100_000,
        outcome: outcome.into(),
        message: None,
        details: None,
        external_id,
        external_url: None,
    }
}

/// A pause ended by a person (resumed) starts the retry ladder again, as a
/// retry by hand does: before, each pause counted as a failed attempt, so
/// a delivery paused and resumed often was failed by its first 5xx after.
/// Attempts keep counting (the log's numbers stay distinct).
async fn a_resume_starts_the_retry_ladder_again(db: TestDb) {
    use ledgerport::store::outbox::{ConnectionCaps, Finish};
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let (_, id) = ingest_on(&s, 0, "conn-a").await;
    let caps = ConnectionCaps::uniform(5);
    for round in 0..3i64 {
        let now = 100 * (round + 1);
        let c = s
            .claim_deliveries("w", now, 50, 10, &caps, &[])
            .await
            .unwrap();
        assert_eq!(c.len(), 1, "round {round}");
        assert_eq!(
            c[0].attempts, round,
            "round {round}: attempts keep counting"
        );
        assert_eq!(
            c[0].ladder_base, round,
            "round {round}: attempts before the pause still count against the ladder"
        );
        let f = Finish::paused(
            "reauth",
            "needs-reauth",
            "reconnect".into(),
            "{}".into(),
            now + 1,
        );
        assert!(
            s.finish_delivery(&id, &c[0].lease, now, now + 1, &f)
                .await
                .unwrap()
        );
        assert_eq!(
            s.resume(std::slice::from_ref(&id), now + 2).await.unwrap(),
            1
        );
    }
    let numbers: Vec<i64> = s
        .list_attempts(&id)
        .await
        .unwrap()
        .iter()
        .map(|a| a.attempt)
        .collect();
    assert_eq!(numbers, vec![1, 2, 3], "attempt numbers stay distinct");
}
both!(
    resume_ladder_sqlite,
    resume_ladder_postgres,
    a_resume_starts_the_retry_ladder_again
);

/// An outcome people must hear of is marked with its incident in the
/// outcome's own transaction; recording the incident clears the mark in
/// its transaction, once: a mark left by a crash is found and recorded
/// later, and never twice.
async fn an_outcome_owes_its_incident_until_it_is_recorded(db: TestDb) {
    use ledgerport::store::outbox::{ConnectionCaps, Finish, state};
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let (_, refused) = ingest_on(&s, 0, "conn-a").await;
    ingest_on(&s, 1, "conn-a").await;
    let c = s
        .claim_deliveries("w", 10, 1_000, 10, &ConnectionCaps::uniform(5), &[])
        .await
        .unwrap();
    assert_eq!(c.len(), 2);
    for c in &c {
        let f = if c.id == refused {
            Finish::failed("rejected", "Xero refused it".into(), None, 20)
        } else {
            finished(state::DELIVERED, "delivered", Some("X-1".into()))
        };
        assert!(
            s.finish_delivery(&c.id, &c.lease, 10, 20, &f)
                .await
                .unwrap()
        );
    }
    assert!(
        s.incidents_owed(20, 10).await.unwrap().is_empty(),
        "marked just now"
    );
    let owed = s.incidents_owed(21, 10).await.unwrap();
    assert_eq!(owed.len(), 1, "{owed:?}");
    let o = &owed[0];
    assert_eq!(
        (o.delivery_id.as_str(), o.kind.as_str()),
        (refused.as_str(), "failed")
    );
    assert_eq!(o.document_number, "INV-0");
    assert_eq!(o.message.as_deref(), Some("Xero refused it"));
    let record = || {
        s.record_incident_of(
            Some(&refused),
            "acme",
            "conn-a",
            "failed",
            "INV-0",
            "Invoice INV-0: Xero refused it",
            30,
            0,
        )
    };
    assert!(record().await.unwrap());
    assert!(!record().await.unwrap(), "recorded twice");
    assert!(s.incidents_owed(i64::MAX, 10).await.unwrap().is_empty());
    let due = s.due_incidents(100).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0].documents, vec!["INV-0".to_string()]);
}
both!(
    incident_owed_sqlite,
    incident_owed_postgres,
    an_outcome_owes_its_incident_until_it_is_recorded
);

/// SQLite syncs every commit (FULL in WAL mode) on every connection of
/// the pool: a document acknowledged as stored survives a power cut, not
/// only a crash of the daemon.
#[tokio::test]
async fn sqlite_commits_are_synced_before_they_are_answered() {
    let db = TestDb::sqlite();
    let s = db.store().await;
    let ledgerport::store::Pool::Sqlite(pool) = s.pool().clone() else {
        unreachable!()
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = pool.acquire().await.unwrap();
        let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
            .fetch_one(&mut *c)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let (sync,): (i64,) = sqlx::query_as("PRAGMA synchronous")
            .fetch_one(&mut *c)
            .await
            .unwrap();
        assert_eq!(sync, 2, "synchronous must be FULL (2)");
        held.push(c);
    }
}

/// A lease is fenced by its claim, not by the worker: an attempt whose
/// lease lapsed (its renewals failed) and was claimed again, here by the
/// same worker, can neither renew nor record its outcome over the newer
/// attempt's; and a daemon does not claim again what it is still working
/// on itself.
async fn a_lapsed_attempt_cannot_write_over_the_next_claim(db: TestDb) {
    use ledgerport::store::outbox::{ConnectionCaps, state};
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let (_, id) = ingest_on(&s, 0, "conn-a").await;
    let caps = ConnectionCaps::uniform(5);
    let first = s
        .claim_deliveries("w", 10, 10, 10, &caps, &[])
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    // Lapsed at 20; still running here, so this daemon leaves it alone.
    let again = s
        .claim_deliveries_but("w", 30, 1_000, 10, &caps, &[], std::slice::from_ref(&id))
        .await
        .unwrap();
    assert!(again.is_empty(), "claimed its own running delivery again");
    // Another claim (another daemon, or this one once the first attempt
    // is given up) takes it over.
    let second = s
        .claim_deliveries("w", 30, 1_000, 10, &caps, &[])
        .await
        .unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].id, id);
    assert_ne!(first[0].lease, second[0].lease);
    assert!(!s.renew_lease(&id, &first[0].lease, 5_000).await.unwrap());
    let late = finished(state::DELIVERED, "delivered", Some("X-late".into()));
    assert!(
        !s.finish_delivery(&id, &first[0].lease, 10, 31, &late)
            .await
            .unwrap()
    );
    s.release(&id, &first[0].lease, 32).await.unwrap();
    // The newer attempt still holds it, and its outcome is the one kept.
    assert!(s.renew_lease(&id, &second[0].lease, 5_000).await.unwrap());
    let now = finished(state::DELIVERED, "delivered", Some("X-now".into()));
    assert!(
        s.finish_delivery(&id, &second[0].lease, 30, 33, &now)
            .await
            .unwrap()
    );
    let attempts = s.list_attempts(&id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].external_id.as_deref(), Some("X-now"));
    assert_eq!(attempts[0].worker, "w");
}
both!(
    lease_fence_sqlite,
    lease_fence_postgres,
    a_lapsed_attempt_cannot_write_over_the_next_claim
);

/// Retention drops what documents delivered everywhere no longer need
/// (bodies, attempts) and keeps the rest: a document still waiting keeps
/// its body and attempts, the same document posted again is still
/// recognised, a changed one still refused.
async fn retention_drops_only_what_delivered_documents_no_longer_need(db: TestDb) {
    use ledgerport::store::outbox::{ConnectionCaps, IngestOutcome, state};
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    for (i, conn) in ["conn-a", "conn-a", "conn-b"].iter().enumerate() {
        ingest_on(&s, i, conn).await;
    }
    let claimed = s
        .claim_deliveries("w", 10, 60_000, 10, &ConnectionCaps::uniform(5), &[])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    for c in &claimed {
        let delivered = c.document_id != "d1";
        let f = if delivered {
            finished(
                state::DELIVERED,
                "delivered",
                Some(format!("X-{}", c.document_id)),
            )
        } else {
            finished(state::PENDING, "transient", None)
        };
        assert!(
            s.finish_delivery(&c.id, &c.lease, 11, 12, &f)
                .await
                .unwrap()
        );
    }
    // Nothing received before the cut: nothing removed.
    let r = s.purge_delivered(1).await.unwrap();
    assert_eq!(r, Default::default());
    let r = s.purge_delivered(1_000).await.unwrap();
    assert_eq!((r.bodies, r.attempts), (2, 2), "{r:?}");
    assert_eq!(body_of(&s, "d0").await, "");
    assert_eq!(body_of(&s, "d2").await, "");
    assert_eq!(
        body_of(&s, "d1").await,
        "{}",
        "a document still waiting keeps its body"
    );
    let attempts = |id: &str| {
        let s = s.clone();
        let id = ledgerport::store::outbox::delivery_id(
            "acme",
            id,
            if id == "d2" { "conn-b" } else { "conn-a" },
        );
        async move { s.list_attempts(&id).await.unwrap().len() }
    };
    assert_eq!((attempts("d0").await, attempts("d1").await), (0, 1));
    // The log's line stays, with the provider's id.
    let rows = s
        .list_deliveries(Some("acme"), Some("INV-0"), None, 10)
        .await
        .unwrap();
    assert_eq!(rows[0].external_id.as_deref(), Some("X-d0"));
    // Posted again: recognised; changed: refused (no stored copy to compare).
    let conns = [("conn-a".to_string(), "xero".to_string())];
    let again = s
        .ingest_document(new_doc("acme", "d0", "INV-0", "{}", "h", 5), &conns)
        .await
        .unwrap();
    assert!(matches!(again, IngestOutcome::Existing), "{again:?}");
    let changed = s
        .ingest_document(new_doc("acme", "d0", "INV-0", "{\"x\":1}", "h2", 5), &conns)
        .await
        .unwrap();
    assert!(
        matches!(&changed, IngestOutcome::Conflict(b) if b.is_empty()),
        "{changed:?}"
    );
    // Again: nothing more to remove.
    assert_eq!(s.purge_delivered(1_000).await.unwrap(), Default::default());

    // More than a batch; and a document delivered on one connection but
    // not on the other keeps its body.
    let two = [
        ("conn-c".to_string(), "xero".to_string()),
        ("conn-d".to_string(), "xero".to_string()),
    ];
    s.ingest_document(new_doc("acme", "split", "INV-S", "{}", "hs", 1), &two)
        .await
        .unwrap();
    for i in 0..520 {
        let doc = format!("b{i}");
        s.ingest_document(
            new_doc("acme", &doc, &format!("INV-B{i}"), "{}", "h", 1),
            &[("conn-c".to_string(), "xero".to_string())],
        )
        .await
        .unwrap();
    }
    let claimed = s
        .claim_deliveries("w", 20, 60_000, 1_000, &ConnectionCaps::uniform(1_000), &[])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 522);
    for c in &claimed {
        let failed = c.document_id == "split" && c.connection_id == "conn-d";
        let f = if failed {
            finished(state::FAILED, "rejected", None)
        } else {
            finished(state::DELIVERED, "delivered", None)
        };
        assert!(
            s.finish_delivery(&c.id, &c.lease, 21, 22, &f)
                .await
                .unwrap()
        );
    }
    // Mails and incidents: sent and closed ones go; an incident whose mail
    // is not sent stays, with its mail.
    exec(&s, "INSERT INTO incidents (id, tenant_id, connection_id, kind, documents, details, opened_at, updated_at, notify_after, closed_at) VALUES ('i-old', 'acme', 'conn-a', 'failed', '[]', '{}', 1, 1, 1, 5)").await;
    exec(&s, "INSERT INTO incidents (id, tenant_id, connection_id, kind, documents, details, opened_at, updated_at, notify_after, closed_at) VALUES ('i-mail', 'acme', 'conn-a', 'failed', '[]', '{}', 1, 1, 1, 5)").await;
    exec(&s, "INSERT INTO incidents (id, tenant_id, connection_id, kind, documents, details, opened_at, updated_at, notify_after) VALUES ('i-open', 'acme', 'conn-a', 'failed', '[]', '{}', 1, 1, 1)").await;
    exec(&s, "INSERT INTO mail_outbox (id, tenant_id, incident_id, recipients, subject, text_body, html_body, created_at, next_attempt_at, sent_at) VALUES ('m-sent', 'acme', 'i-old', '[]', 's', 't', 'h', 1, 1, 5)").await;
    exec(&s, "INSERT INTO mail_outbox (id, tenant_id, incident_id, recipients, subject, text_body, html_body, created_at, next_attempt_at) VALUES ('m-unsent', 'acme', 'i-mail', '[]', 's', 't', 'h', 1, 1)").await;
    let r = s.purge_delivered(1_000).await.unwrap();
    assert_eq!(
        (r.bodies, r.attempts, r.mails, r.incidents),
        // 520 delivered alone, and the split document's delivered attempt.
        (520, 521, 1, 1),
        "{r:?}"
    );
    assert_eq!(body_of(&s, "split").await, "{}", "failed on one connection");
    assert_eq!(body_of(&s, "b519").await, "");
    assert_eq!(
        count(
            &s,
            "SELECT COUNT(*) FROM incidents WHERE id IN ('i-mail', 'i-open')"
        )
        .await,
        2
    );
    assert_eq!(
        count(&s, "SELECT COUNT(*) FROM mail_outbox WHERE id = 'm-unsent'").await,
        1
    );
    // The split document's delivered attempt went, its failed one stayed.
    assert_eq!(
        attempts_of(
            &s,
            &ledgerport::store::outbox::delivery_id("acme", "split", "conn-d")
        )
        .await,
        1
    );
}

async fn attempts_of(s: &Store, delivery: &str) -> usize {
    s.list_attempts(delivery).await.unwrap().len()
}
both!(
    retention_sqlite,
    retention_postgres,
    retention_drops_only_what_delivered_documents_no_longer_need
);

/// One delivery of the claim model: its connection, and pending due at
/// `at` or working with a lease until `at`.
#[derive(Debug, Clone)]
struct ModelRow {
    conn: usize,
    working: bool,
    at: i64,
}

fn claim_case(rows: &[ModelRow], cap: i64, limit: i64, exclude: &[usize]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = TestDb::sqlite();
        let s = db.store().await;
        s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
        let ledgerport::store::Pool::Sqlite(pool) = s.pool().clone() else {
            unreachable!()
        };
        let now = 10;
        // id -> (connection, working, at)
        let mut model = std::collections::HashMap::new();
        for (i, r) in rows.iter().enumerate() {
            let conn = format!("c{}", r.conn);
            let (_, id) = ingest_on(&s, i, &conn).await;
            let sql = if r.working {
                "UPDATE deliveries SET state = 'working', lease_owner = 'other', lease_until = $1 WHERE id = $2"
            } else {
                "UPDATE deliveries SET next_attempt_at = $1 WHERE id = $2"
            };
            sqlx::query(sql).bind(r.at).bind(&id).execute(&pool).await.unwrap();
            model.insert(id, (conn, r.working, r.at));
        }
        let excluded: Vec<String> = exclude.iter().map(|c| format!("c{c}")).collect();
        let claimed = s
            .claim_deliveries("w", now, 1_000, limit, &ledgerport::store::outbox::ConnectionCaps::uniform(cap), &excluded)
            .await
            .unwrap();
        let got: std::collections::HashSet<&str> = claimed.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(got.len(), claimed.len(), "claimed twice");
        assert!(claimed.len() as i64 <= limit);
        let eligible = |id: &str| {
            let (c, working, at) = &model[id];
            !excluded.contains(c) && if *working { *at < now } else { *at <= now }
        };
        let mut used: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
        for (id, (c, working, at)) in &model {
            if *working && *at >= now {
                *used.entry(c.as_str()).or_default() += 1;
            }
            if got.contains(id.as_str()) {
                assert!(eligible(id), "claimed {id} was not eligible: {:?}", model[id]);
                *used.entry(c.as_str()).or_default() += 1;
            }
        }
        for (c, n) in &used {
            let live_before = model.values().filter(|(mc, w, at)| mc == c && *w && *at >= now).count() as i64;
            assert!(*n <= cap.max(live_before), "connection {c} has {n} working over the cap {cap}");
        }
        // Nothing eligible is left behind while there is room and limit.
        for (id, (c, working, at)) in &model {
            if got.contains(id.as_str()) || !eligible(id) {
                continue;
            }
            let room = used.get(c.as_str()).copied().unwrap_or(0) < cap;
            if room {
                assert_eq!(
                    claimed.len() as i64, limit,
                    "{id} ({c}) was eligible with room and the limit was not reached"
                );
                // And what was claimed instead came no later (pending; ties
                // in any order) or was a lapsed lease.
                if !working {
                    for e in &claimed {
                        let (_, ew, eat) = &model[&e.id];
                        assert!(*ew || *eat <= *at, "{} claimed before earlier {id}", e.id);
                    }
                }
            }
        }
        // Within a connection, pending work is claimed earliest first.
        for (id, (c, working, at)) in &model {
            if got.contains(id.as_str()) || !eligible(id) || *working {
                continue;
            }
            for e in &claimed {
                let (ec, ew, eat) = &model[&e.id];
                if ec == c && !*ew {
                    assert!(*eat <= *at, "{} claimed before earlier {id} of {c}", e.id);
                }
            }
        }
    });
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// The index claim against a model: the cap, the limit, exclusions,
    /// nothing eligible left behind with room, earliest first (found a
    /// lapsed lease skipped when the first `limit` lapsed ones were all on
    /// connections at their cap).
    #[test]
    fn the_claim_matches_its_model(
        rows in proptest::collection::vec(
            (0usize..5, proptest::bool::weighted(0.3), 0i64..20)
                .prop_map(|(conn, working, at)| ModelRow { conn, working, at }),
            0..30,
        ),
        cap in 1i64..4,
        limit in 1i64..10,
        exclude in proptest::collection::vec(0usize..5, 0..2),
    ) {
        claim_case(&rows, cap, limit, &exclude);
    }
}

/// The PostgreSQL pool does not ping a connection before every use (a round
/// trip each time), only one idle for a while: connections the server
/// dropped while idle (a restart, a firewall) are replaced, not handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_dropped_while_idle_are_replaced() {
    use sqlx::Connection;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let store = db.store().await;
    let ledgerport::store::Pool::Postgres(pool) = store.pool().clone() else {
        panic!("a PostgreSQL store");
    };
    // Several connections in the pool, all idle afterwards.
    let mut busy = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let p = pool.clone();
        busy.spawn(async move { sqlx::query("SELECT pg_sleep(0.2)").execute(&p).await });
    }
    while let Some(r) = busy.join_next().await {
        r.unwrap().unwrap();
    }
    // sqlx hands a dropped connection back to the pool from a task of its
    // own, so the last query finishing does not mean its connection is idle
    // yet: on a loaded machine the check ran before the hand-back (CI saw 1).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pool.num_idle() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        pool.num_idle() >= 2,
        "idle connections: {}",
        pool.num_idle()
    );
    // The server drops every one of them.
    let name = match &db {
        TestDb::Postgres { name, .. } => name.clone(),
        TestDb::Sqlite { .. } => unreachable!(),
    };
    let mut admin = sqlx::PgConnection::connect(&storage_support::pg_admin_url())
        .await
        .unwrap();
    let killed: Vec<(bool,)> =
        sqlx::query_as("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(&name)
            .fetch_all(&mut admin)
            .await
            .unwrap();
    assert!(killed.len() >= 2, "backends terminated: {}", killed.len());
    let _ = admin.close().await;
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    // Every use after that gets a live connection.
    for _ in 0..6 {
        store
            .paused_deliveries("")
            .await
            .expect("a live connection");
    }
}

/// A notice names every document added to its incident before it was taken.
/// A second failure being recorded is caught half-way (PostgreSQL: the
/// incident lock held, the longer list written, not yet committed) while
/// the mail task tells the incident it read before. The telling must wait
/// for it and then leave the incident for the next round: before, READ
/// COMMITTED let it mark the incident told with the old list once the
/// addition committed, so INV-2 was in no e-mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_taken_while_a_document_is_added_names_it() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let store = db.store().await;
    store
        .record_incident("acme", "conn-1", "failed", "INV-1", "first", 0, 0)
        .await
        .unwrap();
    let read = store.due_incidents(1).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].documents, vec!["INV-1"]);
    let ledgerport::store::Pool::Postgres(pool) = store.pool().clone() else {
        panic!("a PostgreSQL store");
    };
    let mut adding = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ledgerport::store::outbox::INCIDENT_LOCK)
        .execute(&mut *adding)
        .await
        .unwrap();
    sqlx::query("UPDATE incidents SET documents = $1 WHERE tenant_id = 'acme'")
        .bind(r#"["INV-1","INV-2"]"#)
        .execute(&mut *adding)
        .await
        .unwrap();
    let s2 = store.clone();
    let inc = read[0].clone();
    let telling = tokio::spawn(async move { s2.tell_incident(&inc, Some(&mail()), 1).await });
    // The addition commits once the telling is waiting on a lock in the
    // database.
    let mut watch = pool.acquire().await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut *watch)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the telling never reached the database"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(watch);
    adding.commit().await.unwrap();
    assert!(
        !telling.await.unwrap().unwrap(),
        "told with a list that no longer holds"
    );
    assert!(store.claim_due_mail(1, 2).await.unwrap().is_none());
    let again = store.due_incidents(2).await.unwrap();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].documents, vec!["INV-1", "INV-2"]);
    assert!(
        store
            .tell_incident(&again[0], Some(&mail()), 2)
            .await
            .unwrap()
    );
    assert!(store.due_incidents(3).await.unwrap().is_empty());
}

fn mail() -> ledgerport::store::outbox::NewMail {
    ledgerport::store::outbox::NewMail {
        recipients: vec!["ap@acme.test".into()],
        subject: "Documents could not be sent".into(),
        text: "text".into(),
        html: "<p>html</p>".into(),
    }
}

/// A told pause collects later documents waiting for the same fix
/// silently, but a new cause on the same connection (another kind left
/// unmapped, months later) is a new incident, told in its turn: before, it
/// was added to the old, already mailed one and nobody heard of it.
async fn a_new_cause_of_a_told_pause_is_told(db: TestDb) {
    let s = db.store().await;
    let rec = |n: &'static str, cause: &'static str, at: i64| {
        let s = s.clone();
        async move {
            s.record_incident(
                "acme",
                "conn-1",
                "paused-mapping",
                n,
                &format!("Invoice {n}: {cause}"),
                at,
                0,
            )
            .await
            .unwrap()
        }
    };
    rec("INV-1", "no account is mapped for: fx-fee", 0).await;
    let due = s.due_incidents(1).await.unwrap();
    assert_eq!(due.len(), 1);
    assert!(s.tell_incident(&due[0], Some(&mail()), 1).await.unwrap());
    // The same cause: collected silently.
    rec("INV-2", "no account is mapped for: fx-fee", 2).await;
    assert!(s.due_incidents(3).await.unwrap().is_empty());
    // A new cause: a new incident to tell, naming its document alone.
    rec("INV-3", "no account is mapped for: vat", 4).await;
    let due = s.due_incidents(5).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0].documents, vec!["INV-3".to_string()]);
    // Documents sharing the new cause join it while it is not yet told.
    rec("INV-4", "no account is mapped for: vat", 5).await;
    let due = s.due_incidents(6).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(
        due[0].documents,
        vec!["INV-3".to_string(), "INV-4".to_string()]
    );
    assert!(s.tell_incident(&due[0], Some(&mail()), 6).await.unwrap());
    // Told of both kinds now (in two incidents): a document waiting for the
    // older one, or for any mix of the two, is collected silently.
    rec("INV-5", "no account is mapped for: fx-fee", 7).await;
    rec("INV-6", "no account is mapped for: fx-fee, vat", 8).await;
    assert!(s.due_incidents(10).await.unwrap().is_empty());
    // The account mapped for a kind turning unusable is news.
    rec(
        "INV-7",
        "the account mapped for vat cannot be used by the accounting system (the connector asks for another one): choose another account on the Configure page; no account is mapped for: fx-fee",
        11,
    )
    .await;
    let due = s.due_incidents(12).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0].documents, vec!["INV-7".to_string()]);
}
both!(
    new_pause_cause_sqlite,
    new_pause_cause_postgres,
    a_new_cause_of_a_told_pause_is_told
);

/// Telling an incident and queueing its mail are one step: a mail that
/// cannot be queued leaves the incident due (before, it was marked told
/// first and the notice was lost); an incident is told once, however many
/// daemons try; one resolved before it was told (a pause the admin fixed
/// within the grouping window) is not told at all; and a queued mail is
/// leased to one sender at a time (before, every daemon's poll read it and
/// each sent it).
async fn incidents_are_told_once_and_never_lost(db: TestDb) {
    let store = db.store().await;
    let other = db.store().await;
    store
        .record_incident(
            "acme",
            "conn-1",
            "failed",
            "INV-1",
            "the endpoint answered 422",
            0,
            0,
        )
        .await
        .unwrap();
    let due = store.due_incidents(1).await.unwrap();
    assert_eq!(due.len(), 1);

    // The mail cannot be queued (a full disk, say): nothing is told.
    let break_it = match store.kind() {
        StoreKind::Sqlite => {
            "CREATE TRIGGER refuse_mail BEFORE INSERT ON mail_outbox BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        }
        StoreKind::Postgres => {
            "ALTER TABLE mail_outbox ADD CONSTRAINT refuse_mail CHECK (subject = '') NOT VALID"
        }
    };
    let mend = match store.kind() {
        StoreKind::Sqlite => "DROP TRIGGER refuse_mail",
        StoreKind::Postgres => "ALTER TABLE mail_outbox DROP CONSTRAINT refuse_mail",
    };
    exec(&store, break_it).await;
    assert!(
        store
            .tell_incident(&due[0], Some(&mail()), 1)
            .await
            .is_err()
    );
    exec(&store, mend).await;
    let due = store.due_incidents(2).await.unwrap();
    assert_eq!(due.len(), 1, "the failed queueing lost the notice");

    // Two daemons tell it: one mail.
    assert!(
        store
            .tell_incident(&due[0], Some(&mail()), 2)
            .await
            .unwrap()
    );
    assert!(
        !other
            .tell_incident(&due[0], Some(&mail()), 2)
            .await
            .unwrap()
    );
    assert!(store.due_incidents(3).await.unwrap().is_empty());
    assert_eq!(store.unsent_mail_count().await.unwrap(), 1);

    // The mail is leased to one sender; the other gets it only once the
    // lease has run out without a result.
    let m = store.claim_due_mail(3, 1_000).await.unwrap().expect("due");
    assert_eq!(m.subject, "Documents could not be sent");
    assert!(other.claim_due_mail(3, 1_000).await.unwrap().is_none());
    assert!(other.claim_due_mail(999, 2_000).await.unwrap().is_none());
    let again = other
        .claim_due_mail(1_000, 2_000)
        .await
        .unwrap()
        .expect("lease ran out");
    assert_eq!(again.id, m.id);
    other.mail_result(&again.id, 1_000, Ok(())).await.unwrap();
    assert!(
        store
            .claim_due_mail(10_000, 20_000)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.unsent_mail_count().await.unwrap(), 0);

    // A pause resolved within the grouping window is not told: resolved by
    // the admin's fix (resume) or by a retry of the delivery by id (which
    // also leaves its pause behind).
    store.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    for (i, by_id) in [(1, false), (2, true)] {
        let id = ingest_on(&store, i, "conn-1").await.1;
        exec(
            &store,
            &format!(
                "UPDATE deliveries SET state = 'paused', pause_reason = 'mapping', pause_detail = '{{\"unmapped\":[\"fx-fee\"]}}' WHERE id = '{id}'"
            ),
        )
        .await;
        assert_eq!(
            store.unmapped_kinds_waiting("acme", "xero").await.unwrap(),
            ["fx-fee"]
        );
        let at = 10_000 * i as i64;
        store
            .record_incident(
                "acme",
                "conn-1",
                "paused-mapping",
                &format!("INV-{i}"),
                "fx-fee is not mapped",
                at,
                60_000,
            )
            .await
            .unwrap();
        if by_id {
            assert_eq!(
                store.retry_failed("acme", Some(&id), at + 1).await.unwrap(),
                1
            );
        } else {
            assert_eq!(
                store
                    .resume(std::slice::from_ref(&id), at + 1)
                    .await
                    .unwrap(),
                1
            );
        }
        assert!(
            store.due_incidents(at + 100_000).await.unwrap().is_empty(),
            "resolved by {}: not told",
            if by_id { "a retry" } else { "resume" }
        );
        assert!(store.paused_deliveries("").await.unwrap().is_empty());
        assert!(
            store
                .unmapped_kinds_waiting("acme", "xero")
                .await
                .unwrap()
                .is_empty()
        );
    }
}
both!(
    incidents_told_once_sqlite,
    incidents_told_once_postgres,
    incidents_are_told_once_and_never_lost
);

/// Paused deliveries are read page by page in id order, so every one is
/// seen (before, only the first 10,000 by id were: the rest, random ids
/// of any tenant, never resumed after the admin fixed what paused them).
async fn paused_deliveries_are_paged(db: TestDb) {
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(ingest_on(&s, i, "conn-a").await.1);
    }
    ids.sort();
    exec(
        &s,
        "UPDATE deliveries SET state = 'paused', pause_reason = 'mapping', pause_detail = '{}'",
    )
    .await;
    let all: Vec<String> = s
        .paused_deliveries("")
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(all, ids);
    let rest: Vec<String> = s
        .paused_deliveries(&ids[0])
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(rest, ids[1..]);
    assert!(s.paused_deliveries(&ids[2]).await.unwrap().is_empty());
}
both!(
    paused_paged_sqlite,
    paused_paged_postgres,
    paused_deliveries_are_paged
);

/// A claim across more connections than SQLite takes in one compound
/// SELECT (500) or one expression (1,000 deep): every due delivery is
/// claimed, with its document (one statement for them all failed every
/// time, and nothing was delivered while the backlog lasted).
async fn a_claim_across_hundreds_of_connections_takes_them_all(db: TestDb) {
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..1_100 {
        ids.insert(ingest_on(&s, i, &format!("conn-{i:04}")).await.1);
    }
    let claimed = s
        .claim_deliveries(
            "w",
            10,
            60_000,
            2_000,
            &ledgerport::store::outbox::ConnectionCaps::uniform(1),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1_100);
    assert!(claimed.iter().all(|c| c.body == "{}"));
    let got: std::collections::BTreeSet<String> = claimed.into_iter().map(|c| c.id).collect();
    assert_eq!(got, ids);
}
both!(
    claim_many_connections_sqlite,
    claim_many_connections_postgres,
    a_claim_across_hundreds_of_connections_takes_them_all
);

/// Resuming more paused deliveries than one statement takes: every paused
/// one is resumed (and counted), one not paused is left as it is.
async fn a_resume_of_thousands_takes_them_all(db: TestDb) {
    let s = db.store().await;
    s.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..1_100 {
        ids.push(ingest_on(&s, i, "conn-a").await.1);
    }
    exec(
        &s,
        "UPDATE deliveries SET state = 'paused', pause_reason = 'reauth', pause_detail = '{}'",
    )
    .await;
    exec(
        &s,
        &format!(
            "UPDATE deliveries SET state = 'failed' WHERE id = '{}'",
            ids[700]
        ),
    )
    .await;
    assert_eq!(s.resume(&ids, 50).await.unwrap(), 1_099);
    assert_eq!(
        count(
            &s,
            "SELECT COUNT(*) FROM deliveries WHERE state = 'pending' AND next_attempt_at = 50"
        )
        .await,
        1_099
    );
    assert_eq!(
        count(&s, "SELECT COUNT(*) FROM deliveries WHERE state = 'failed'").await,
        1
    );
}
both!(
    resume_thousands_sqlite,
    resume_thousands_postgres,
    a_resume_of_thousands_takes_them_all
);

/// An incident names its first 200 documents and counts the rest; one
/// counted after it was read is not told from the stale read.
async fn an_incident_counts_documents_past_its_list(db: TestDb) {
    let s = db.store().await;
    for i in 0..250 {
        s.record_incident(
            "acme",
            "conn-1",
            "paused-mapping",
            &format!("INV-{i}"),
            "no account is mapped for: fx-fee",
            i,
            0,
        )
        .await
        .unwrap();
    }
    let due = s.due_incidents(1_000).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(
        due[0].documents.len(),
        ledgerport::store::outbox::MAX_INCIDENT_DOCUMENTS
    );
    assert_eq!(due[0].documents[199], "INV-199");
    assert_eq!(due[0].more_documents, 50);
    // Named already: not counted again.
    s.record_incident(
        "acme",
        "conn-1",
        "paused-mapping",
        "INV-3",
        "no account is mapped for: fx-fee",
        1_001,
        0,
    )
    .await
    .unwrap();
    assert_eq!(s.due_incidents(1_002).await.unwrap()[0].more_documents, 50);
    // One more counted after the read: telling from the read is refused.
    s.record_incident(
        "acme",
        "conn-1",
        "paused-mapping",
        "INV-999",
        "no account is mapped for: fx-fee",
        1_003,
        0,
    )
    .await
    .unwrap();
    assert!(
        !s.tell_incident(&due[0], Some(&mail()), 1_004)
            .await
            .unwrap()
    );
    let due = s.due_incidents(1_005).await.unwrap();
    assert_eq!(due[0].more_documents, 51);
    assert!(
        s.tell_incident(&due[0], Some(&mail()), 1_006)
            .await
            .unwrap()
    );
}
both!(
    incident_documents_sqlite,
    incident_documents_postgres,
    an_incident_counts_documents_past_its_list
);

/// A provider's pause holds the connection's shared rate window until its
/// end: the gate answers "wait until then" (on any daemon), then lets
/// requests through again; a shorter hold does not cut a longer one; one
/// row a connection whatever the limit.
async fn a_hold_fills_the_rate_window_until_its_end(db: TestDb) {
    let s = db.store().await;
    let (limit, window) = (60, 60_000);
    s.hold_rate_window("conn-1", 1_000_000).await.unwrap();
    s.hold_rate_window("conn-1", 500_000).await.unwrap();
    let n = count(&s, "SELECT COUNT(*) FROM rate_log").await;
    assert_eq!(n, 1, "one row holds the connection");
    assert_eq!(
        s.take_rate_slot("conn-1", limit, window, 10_000)
            .await
            .unwrap(),
        Err(990_000)
    );
    assert_eq!(
        s.take_rate_slot("conn-1", limit, window, 999_999)
            .await
            .unwrap(),
        Err(1)
    );
    assert_eq!(
        s.take_rate_slot("conn-1", limit, window, 1_000_000)
            .await
            .unwrap(),
        Ok(())
    );
    // Another connection is not held.
    assert_eq!(
        s.take_rate_slot("conn-2", limit, window, 10_000)
            .await
            .unwrap(),
        Ok(())
    );
}
both!(
    rate_hold_sqlite,
    rate_hold_postgres,
    a_hold_fills_the_rate_window_until_its_end
);

/// A connection's rate-window lock cannot be another lock of the store's.
/// `rl-41385eef` is a connection id whose `hashtext` is 7215002, the
/// incident lock's key (found by brute force over `hashtext`); with the
/// rate lock in the single-key space it waited for every incident
/// being recorded or told, on every daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_slot_never_waits_on_the_incident_lock() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let store = db.store().await;
    let ledgerport::store::Pool::Postgres(pool) = store.pool().clone() else {
        panic!("a PostgreSQL store");
    };
    let id = "rl-41385eef";
    let (h,): (i32,) = sqlx::query_as("SELECT hashtext($1)")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        i64::from(h),
        ledgerport::store::outbox::INCIDENT_LOCK,
        "the id no longer collides: the test proves nothing"
    );
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ledgerport::store::outbox::INCIDENT_LOCK)
        .execute(&mut *holder)
        .await
        .unwrap();
    let taken = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.take_rate_slot(id, 5, 60_000, 1_000),
    )
    .await
    .expect("the rate slot waited on the incident lock");
    assert_eq!(taken.unwrap(), Ok(()));
    holder.rollback().await.unwrap();
}

/// The delivery log pages by cursor: every delivery exactly once and in the
/// log's order, also when many share one change time (the id breaks the
/// tie) and when a state filter applies; a cursor reads back as written.
async fn delivery_log_pages(db: TestDb) {
    use ledgerport::store::outbox::LogCursor;
    let s = db.store().await;
    let k = keys(1);
    s.upsert_tenant("acme", "acme", &[], 1).await.unwrap();
    connected(&s, &k, &new_conn(tokens("A", "R", 1000), "org-1")).await;
    // Seven documents stored at the same moment: their deliveries tie on
    // the change time.
    for i in 0..7 {
        s.ingest_for_tenant(new_doc(
            "acme",
            &format!("d{i}"),
            &format!("N-{i}"),
            "{}",
            "h",
            5,
        ))
        .await
        .unwrap();
    }
    let all = s
        .list_deliveries(Some("acme"), None, None, 100)
        .await
        .unwrap();
    assert_eq!(all.len(), 7);
    for state in [None, Some("pending")] {
        let mut paged = Vec::new();
        let mut after: Option<LogCursor> = None;
        loop {
            let page = s
                .list_deliveries_page(Some("acme"), None, state, after.as_ref(), 3)
                .await
                .unwrap();
            assert!(page.len() <= 3);
            let Some(last) = page.last() else { break };
            let cursor = LogCursor::after(last);
            assert_eq!(LogCursor::parse(&cursor.to_string()), Some(cursor.clone()));
            after = Some(cursor);
            paged.extend(page.into_iter().map(|d| d.id));
        }
        let ids: Vec<String> = all.iter().map(|d| d.id.clone()).collect();
        assert_eq!(paged, ids, "{state:?}: each once, in the log's order");
    }
    let none = s
        .list_deliveries_page(Some("acme"), None, Some("failed"), None, 3)
        .await
        .unwrap();
    assert!(none.is_empty());
    for bad in ["", "12", ".x", "x.y", "12."] {
        assert_eq!(LogCursor::parse(bad), None, "{bad:?}");
    }
}
both!(
    delivery_log_pages_sqlite,
    delivery_log_pages_postgres,
    delivery_log_pages
);

/// A form's setting changes and their audit entries are written in one
/// transaction: all of them, or (when a statement fails part-way) none.
/// The failure is made with a NUL byte in an audit entry, which PostgreSQL
/// refuses in text (SQLite stores it, so there only the whole is checked).
/// Removing a key with nothing stored does nothing and is not audited.
async fn setting_changes_are_all_or_nothing(db: TestDb) {
    let s = db.store().await;
    let k = keys(1);
    s.upsert_tenant("acme", "Acme", &[], 1).await.unwrap();
    s.set_connection_setting(
        &k,
        "acme",
        "webhook",
        "endpoint",
        "https://a.example/x",
        "alice",
        5,
    )
    .await
    .unwrap();
    let stored = |s: Store| {
        let k = k.clone();
        async move {
            s.connection_settings(&k, "acme", "webhook")
                .await
                .unwrap()
                .into_iter()
                .map(|v| (v.key, v.value.expose().to_string()))
                .collect::<Vec<_>>()
        }
    };
    let change = |key, value, action, detail: &str| SettingChange {
        key,
        value,
        action,
        detail: detail.to_string(),
    };
    // Set one, remove another, with their audit entries.
    let done = s
        .change_connection_settings(
            &k,
            "acme",
            "webhook",
            &[
                change(
                    "signing_secret",
                    Some("0123456789abcdef"),
                    "setting.set",
                    "webhook signing_secret (secret, changed)",
                ),
                change("endpoint", None, "setting.unset", "webhook endpoint"),
                change("retries", None, "setting.unset", "webhook retries"),
            ],
            "bob",
            6,
        )
        .await
        .unwrap();
    assert_eq!(done, vec!["signing_secret", "endpoint"]);
    assert_eq!(
        stored(s.clone()).await,
        vec![("signing_secret".to_string(), "0123456789abcdef".to_string())]
    );
    let audit = s.audit_log(Some("acme"), 10).await.unwrap();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert!(audit.iter().all(|e| e.actor == "bob"));
    assert!(!audit.iter().any(|e| e.detail.contains("retries")));
    if s.kind() == StoreKind::Postgres {
        let r = s
            .change_connection_settings(
                &k,
                "acme",
                "webhook",
                &[
                    change(
                        "signing_secret",
                        None,
                        "setting.unset",
                        "webhook signing_secret",
                    ),
                    change(
                        "endpoint",
                        Some("https://b.example/y"),
                        "setting.set",
                        "webhook endpoint = \0",
                    ),
                ],
                "carol",
                7,
            )
            .await;
        assert!(r.is_err(), "PostgreSQL refuses NUL in text");
        assert_eq!(
            stored(s.clone()).await,
            vec![("signing_secret".to_string(), "0123456789abcdef".to_string())],
            "nothing of the failed change was kept"
        );
        assert_eq!(s.audit_log(Some("acme"), 10).await.unwrap().len(), 2);
    }
}
both!(
    setting_changes_are_all_or_nothing_sqlite,
    setting_changes_are_all_or_nothing_postgres,
    setting_changes_are_all_or_nothing
);

/// Documents issued while a connection was disconnected are listed as
/// missed (only since its first disconnect, only of kinds its connector
/// takes, only while their content is kept) and sent on request, all or
/// some, once it is connected again; never twice.
async fn documents_missed_while_disconnected_are_offered_and_sent_once(db: TestDb) {
    use ledgerport::store::StoreError;
    use ledgerport::store::outbox::delivery_id;
    let s = db.store().await;
    let k = keys(1);
    for t in ["acme", "beta"] {
        s.upsert_tenant(t, t, &[], 1).await.unwrap();
    }
    let both_kinds = ["invoice".to_string(), "credit-note".to_string()];
    let invoices = ["invoice".to_string()];
    let doc = |tenant: &'static str, id: &'static str, kind: &'static str, at: i64| {
        let mut d = new_doc(tenant, id, id, "{\"x\":1}", "h", at);
        d.kind = kind;
        d
    };
    // Before the first connection: not the connection's business.
    s.ingest_for_tenant(doc("acme", "before", "invoice", 5_000))
        .await
        .unwrap();
    let c = connected(&s, &k, &new_conn(tokens("A", "R", 1000), "org-1")).await;
    s.ingest_for_tenant(doc("acme", "sent", "invoice", 10_500))
        .await
        .unwrap();
    let missed = |kinds: &[String]| {
        let s = s.clone();
        let c = c.clone();
        let kinds = kinds.to_vec();
        async move {
            let (n, docs) = s.missed_documents(&c, &kinds, 100).await.unwrap();
            let ids: Vec<String> = docs.into_iter().map(|d| d.id).collect();
            assert_eq!(n as usize, ids.len());
            ids
        }
    };
    assert!(missed(&both_kinds).await.is_empty(), "never disconnected");

    let mut lease = s.lock_tokens(&c).await.unwrap();
    lease.disconnect("alice", "test", 20).await.unwrap();
    lease.commit().await.unwrap();
    s.ingest_for_tenant(doc("acme", "d1", "invoice", 21_000))
        .await
        .unwrap();
    s.ingest_for_tenant(doc("acme", "d2", "credit-note", 22_000))
        .await
        .unwrap();
    s.ingest_for_tenant(doc("beta", "other", "invoice", 23_000))
        .await
        .unwrap();
    assert_eq!(missed(&both_kinds).await, ["d1", "d2"], "oldest first");
    assert_eq!(missed(&invoices).await, ["d1"], "only kinds it takes");
    let (n, page) = s.missed_documents(&c, &both_kinds, 1).await.unwrap();
    assert_eq!(
        (n, page.len()),
        (2, 1),
        "the count is of all, the page is limited"
    );
    assert_eq!(page[0].number, "d1");
    assert_eq!(page[0].received_at, 21_000);
    match s.send_missed(&c, &both_kinds, None, 24_000).await {
        Err(StoreError::Conflict(m)) => assert!(m.contains("disconnected"), "{m}"),
        other => panic!("sent to a disconnected connection: {other:?}"),
    }
    assert_eq!(
        missed(&both_kinds).await,
        ["d1", "d2"],
        "nothing lost by the refusal"
    );

    // Reconnected: nothing is sent by itself.
    s.finish_connect(&k, &new_conn(tokens("A2", "R2", 1000), "org-1"), 30)
        .await
        .unwrap();
    assert_eq!(missed(&both_kinds).await, ["d1", "d2"]);
    // Ids that are not missed: named, and nothing is sent.
    let asked = ["d1", "nope", "sent", "before", "other", "nope"].map(String::from);
    let r = s
        .send_missed(&c, &both_kinds, Some(&asked), 31_000)
        .await
        .unwrap();
    assert_eq!(r.queued, 0);
    assert_eq!(r.not_missed, ["nope", "sent", "before", "other"]);
    assert_eq!(missed(&both_kinds).await, ["d1", "d2"]);
    // One by id, then the rest.
    let r = s
        .send_missed(&c, &both_kinds, Some(&["d1".to_string()]), 32_000)
        .await
        .unwrap();
    assert_eq!((r.queued, r.not_missed.len()), (1, 0));
    assert_eq!(missed(&both_kinds).await, ["d2"]);
    let r = s.send_missed(&c, &invoices, None, 33_000).await.unwrap();
    assert_eq!(r.queued, 0, "the credit note is not of a kind it takes");
    let r = s.send_missed(&c, &both_kinds, None, 33_000).await.unwrap();
    assert_eq!(r.queued, 1);
    assert!(missed(&both_kinds).await.is_empty());
    assert_eq!(
        s.send_missed(&c, &both_kinds, None, 34_000)
            .await
            .unwrap()
            .queued,
        0,
        "never twice"
    );
    let sent: Vec<(String, String, String)> = s
        .list_deliveries(Some("acme"), None, Some("pending"), 10)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.document_id.starts_with('d'))
        .map(|d| (d.id, d.document_id, d.document_kind))
        .collect();
    let mut sent = sent;
    sent.sort();
    let mut want = vec![
        (
            delivery_id("acme", "d1", &c),
            "d1".to_string(),
            "invoice".to_string(),
        ),
        (
            delivery_id("acme", "d2", &c),
            "d2".to_string(),
            "credit-note".to_string(),
        ),
    ];
    want.sort();
    assert_eq!(sent, want, "pending deliveries under their stable ids");

    // Disconnected again: a document whose content retention dropped is
    // not offered (it could not be sent).
    let mut lease = s.lock_tokens(&c).await.unwrap();
    lease.disconnect("alice", "test", 40).await.unwrap();
    lease.commit().await.unwrap();
    s.ingest_for_tenant(doc("acme", "old", "invoice", 41_000))
        .await
        .unwrap();
    s.ingest_for_tenant(doc("acme", "new", "invoice", 60_000))
        .await
        .unwrap();
    s.ingest_for_tenant(doc("acme", "old-cn", "credit-note", 42_000))
        .await
        .unwrap();
    assert_eq!(missed(&both_kinds).await, ["old", "old-cn", "new"]);
    assert_eq!(s.missed_too_old(&c, &both_kinds, 10).await.unwrap().0, 0);
    s.purge_delivered(50_000).await.unwrap();
    assert_eq!(missed(&both_kinds).await, ["new"]);
    // ... but counted, so the admin is told they will not come; only
    // those of kinds the connector takes, received since the first
    // disconnect ("before" was emptied too, and the delivered ones).
    let (n, old) = s.missed_too_old(&c, &both_kinds, 1).await.unwrap();
    assert_eq!(n, 2);
    let numbers: Vec<&str> = old.iter().map(|d| d.number.as_str()).collect();
    assert_eq!(numbers, ["old"], "oldest first, limited");
    assert_eq!(s.missed_too_old(&c, &invoices, 10).await.unwrap().0, 1);
    assert_eq!(s.missed_too_old(&c, &[], 10).await.unwrap().0, 0);
    assert_eq!(
        s.send_missed("no-such-connection", &both_kinds, None, 61_000)
            .await
            .map(|r| r.queued)
            .map_err(|e| matches!(e, StoreError::NotFound(_))),
        Err(true)
    );
}
both!(
    missed_documents_sqlite,
    missed_documents_postgres,
    documents_missed_while_disconnected_are_offered_and_sent_once
);

/// Signing an admin out from the platform ends what they started and had
/// not finished: their sign-in links, their consents still open at the
/// provider and their organisation picks (with the parked tokens); another
/// admin's, and another tenant's, are left alone.
async fn signing_out_ends_the_connects_under_way(db: TestDb) {
    let s = db.store().await;
    let k = keys(1);
    for t in ["acme", "globex"] {
        s.upsert_tenant(t, t, &[], 1).await.unwrap();
    }
    let now = chrono::Utc::now().timestamp();
    for (hash, tenant, admin) in [
        ("s-alice", "acme", "alice"),
        ("s-bob", "acme", "bob"),
        ("s-globex", "globex", "alice"),
    ] {
        s.create_oauth_state(&k, hash, tenant, "xero", admin, None, now, now + 600)
            .await
            .unwrap();
        s.create_pending_pick(
            &k,
            &format!("p{hash}"),
            &ledgerport::store::PendingPick {
                tenant_id: tenant.into(),
                connector_id: "xero".into(),
                admin: admin.into(),
                scopes: vec![],
                auth_event_id: None,
                organisations: vec![Organisation {
                    tenant_id: "org-1".into(),
                    name: "Org".into(),
                    connection_id: None,
                }],
                tokens: tokens("parked", "parked-r", now + 1800),
                pick_expires_at: now + 600,
            },
        )
        .await
        .unwrap();
    }
    let (key_id, _) = s
        .issue_key(
            &ledgerport::store::admin::KeyScope::Tenant("acme".into()),
            "p",
            0,
        )
        .await
        .unwrap();
    let ticket = s
        .create_page_ticket("acme", "alice", "super-admin", &key_id, 120, now)
        .await
        .unwrap();
    assert_eq!(s.end_page_sessions("acme", Some("alice")).await.unwrap(), 1);
    assert!(s.page_ticket(&ticket, now).await.unwrap().is_none());
    assert_eq!(
        s.consume_oauth_state(&k, "s-alice", now + 1)
            .await
            .unwrap()
            .unwrap_err(),
        StateRefusal::Unknown
    );
    assert!(
        s.pending_pick(&k, "ps-alice", now + 1, false)
            .await
            .unwrap()
            .is_none()
    );
    for (state, pick) in [("s-bob", "ps-bob"), ("s-globex", "ps-globex")] {
        assert!(
            s.pending_pick(&k, pick, now + 1, false)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            s.consume_oauth_state(&k, state, now + 1)
                .await
                .unwrap()
                .is_ok(),
            "{state}"
        );
    }
    // Everyone of the tenant.
    s.create_oauth_state(&k, "s-carol", "acme", "xero", "carol", None, now, now + 600)
        .await
        .unwrap();
    s.end_page_sessions("acme", None).await.unwrap();
    assert!(
        s.pending_pick(&k, "ps-bob", now + 1, false)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.consume_oauth_state(&k, "s-carol", now + 1)
            .await
            .unwrap()
            .is_err()
    );
    assert!(
        s.pending_pick(&k, "ps-globex", now + 1, false)
            .await
            .unwrap()
            .is_some()
    );
    // The ended picks are left for the purge to remove their grants' links
    // (with their tokens); the one still open is not.
    let (_, taken) = s.take_abandoned_picks(&k, now + 1, 50).await.unwrap();
    let mut admins: Vec<(&str, &str)> = taken
        .iter()
        .map(|p| (p.tenant_id.as_str(), p.admin.as_str()))
        .collect();
    admins.sort();
    assert_eq!(admins, [("acme", "alice"), ("acme", "bob")]);
    assert!(
        taken
            .iter()
            .all(|p| p.tokens.access_token.expose() == "parked")
    );
    assert_eq!(s.take_abandoned_picks(&k, now + 1, 50).await.unwrap().0, 0);
}
both!(
    sign_out_ends_connects_sqlite,
    sign_out_ends_connects_postgres,
    signing_out_ends_the_connects_under_way
);

/// A read-only command run by a role that may not read ledgerport's tables
/// is told the database's own words ("permission denied"), not that the
/// database holds no schema and wants `ledgerport migrate` (which that role
/// could not run either, and which the schema does not need). A database
/// with no schema at all is still told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_not_read_is_not_told_to_migrate() {
    use sqlx::Connection;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    drop(db.store().await);
    let role = format!("lp_noread_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&db.url()).await.unwrap();
    sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
        .execute(&mut admin)
        .await
        .unwrap();
    let mut url = url::Url::parse(&db.url()).unwrap();
    url.set_username(&role).unwrap();
    let refused = Store::open_existing(url.as_str()).await.map(|_| ());
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;
    let message = refused.expect_err("the role may not read").to_string();
    assert!(message.contains("permission denied"), "{message}");
    assert!(!message.contains("migrate"), "{message}");

    let Some(empty) = TestDb::postgres().await else {
        return;
    };
    let message = Store::open_existing(&empty.url())
        .await
        .map(|_| ())
        .expect_err("no schema")
        .to_string();
    assert!(message.contains("holds no ledgerport schema"), "{message}");
}

/// Notices the SMTP server refused for a day are given up. The operator
/// lists them with the server's words and, once the cause is fixed, hands
/// them back to the mail task: due again, their tries counted afresh. An
/// unsent notice (the mail task's, perhaps being sent under its lease) and
/// a sent one are left alone, and a notice named by id that is not given
/// up is said to be so.
async fn given_up_notices_are_listed_and_sent_again(db: TestDb) {
    use ledgerport::store::mail::{NotRetried, state};
    let s = db.store().await;
    for (tenant, conn, n) in [
        ("acme", "conn-1", "INV-1"),
        ("beta", "conn-2", "INV-2"),
        ("acme", "conn-3", "INV-3"),
        ("beta", "conn-4", "INV-4"),
    ] {
        s.record_incident(tenant, conn, "failed", n, "the endpoint answered 422", 0, 0)
            .await
            .unwrap();
    }
    let due = s.due_incidents(1).await.unwrap();
    assert_eq!(due.len(), 4);
    for (i, inc) in due.iter().enumerate() {
        assert!(
            s.tell_incident(inc, Some(&mail()), 100 + i as i64)
                .await
                .unwrap()
        );
    }
    // Oldest first: two given up, one sent, one waiting for its next try.
    let mut claimed = Vec::new();
    for _ in 0..4 {
        claimed.push(s.claim_due_mail(1_000, 2_000).await.unwrap().unwrap());
    }
    for m in &claimed[..2] {
        s.mail_result(
            &m.id,
            1_000,
            Err((
                "given up: 550 5.7.1 sender refused".into(),
                ledgerport::notify::GIVEN_UP,
            )),
        )
        .await
        .unwrap();
    }
    s.mail_result(&claimed[2].id, 1_000, Ok(())).await.unwrap();
    s.mail_result(&claimed[3].id, 1_000, Err(("421 try later".into(), 5_000)))
        .await
        .unwrap();

    let all = s.mail_list(None, None, 10).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|m| m.id.as_str()).collect();
    let newest_first: Vec<&str> = claimed.iter().rev().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, newest_first);
    let given_up = s.mail_list(None, Some(state::GIVEN_UP), 10).await.unwrap();
    assert_eq!(given_up.len(), 2, "{given_up:?}");
    for m in &given_up {
        assert_eq!(m.state, state::GIVEN_UP);
        assert_eq!(m.next_attempt_at, None);
        assert_eq!(m.recipients, vec!["ap@acme.test".to_string()]);
        assert!(m.last_error.as_deref().unwrap().contains("550"), "{m:?}");
    }
    let unsent = s.mail_list(None, Some(state::UNSENT), 10).await.unwrap();
    assert_eq!(unsent.len(), 1);
    assert_eq!(unsent[0].next_attempt_at, Some(5_000));
    let sent = s.mail_list(None, Some(state::SENT), 10).await.unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].sent_at, Some(1_000));
    let first_tenant = claimed[0].tenant_id.clone();
    let of_tenant = s.mail_list(Some(&first_tenant), None, 10).await.unwrap();
    assert_eq!(of_tenant.len(), 2);
    assert!(of_tenant.iter().all(|m| m.tenant_id == first_tenant));
    let e = s.mail_list(None, Some("bogus"), 10).await.unwrap_err();
    assert!(e.to_string().starts_with("state:"), "{e}");

    // Named by id: a sent one, the unsent one, an unknown one, and a given-up
    // one under another tenant are not retried, each for its reason.
    match s
        .retry_given_up_mail(None, Some(&claimed[2].id), 3_000)
        .await
        .unwrap()
    {
        Err(NotRetried::NotGivenUp(m)) => assert_eq!(m.state, state::SENT),
        other => panic!("{other:?}"),
    }
    match s
        .retry_given_up_mail(None, Some(&claimed[3].id), 3_000)
        .await
        .unwrap()
    {
        Err(NotRetried::NotGivenUp(m)) => assert_eq!(m.state, state::UNSENT),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.retry_given_up_mail(None, Some("no-such-mail"), 3_000)
            .await
            .unwrap(),
        Err(NotRetried::Unknown)
    );
    let other_tenant = if first_tenant == "acme" {
        "beta"
    } else {
        "acme"
    };
    assert_eq!(
        s.retry_given_up_mail(Some(other_tenant), Some(&claimed[0].id), 3_000)
            .await
            .unwrap(),
        Err(NotRetried::Unknown)
    );
    assert!(s.claim_due_mail(3_000, 4_000).await.unwrap().is_none());

    // One tenant's, then the rest: due again with their tries counted afresh.
    let tenant_of_second = claimed[1].tenant_id.clone();
    let n = s
        .retry_given_up_mail(Some(&first_tenant), None, 3_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        n.len(),
        if tenant_of_second == first_tenant {
            2
        } else {
            1
        }
    );
    assert!(n.iter().all(|t| *t == first_tenant));
    let n2 = s
        .retry_given_up_mail(None, None, 3_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.len() + n2.len(), 2);
    let mut again = Vec::new();
    while let Some(m) = s.claim_due_mail(3_000, 4_000).await.unwrap() {
        again.push(m);
    }
    let mut got: Vec<&str> = again.iter().map(|m| m.id.as_str()).collect();
    got.sort();
    let mut want = vec![claimed[0].id.as_str(), claimed[1].id.as_str()];
    want.sort();
    assert_eq!(got, want, "only the given-up notices are due");
    assert!(again.iter().all(|m| m.attempts == 0));
    // The unsent one keeps its own time.
    let unsent = s.mail_list(None, Some(state::UNSENT), 10).await.unwrap();
    assert!(
        unsent
            .iter()
            .any(|m| m.id == claimed[3].id && m.next_attempt_at == Some(5_000))
    );
}
both!(
    given_up_notices_are_listed_and_sent_again_sqlite,
    given_up_notices_are_listed_and_sent_again_postgres,
    given_up_notices_are_listed_and_sent_again
);
