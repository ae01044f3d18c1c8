//! The `ledgerport` command line, run as a real process: plugin checks and
//! refusals, a smoke delivery, tenants and mappings, `issue` and the
//! delivery log with retry. Exit codes: 0 ok, 1 failed, 2 bad input.

mod common;
#[allow(dead_code)]
mod storage_support;

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use storage_support::new_doc;

fn ledgerport(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ledgerport"));
    c.args(args)
        .env_remove("LEDGERPORT_CONFIG")
        .env("LEDGERPORT_LOG", "error");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run ledgerport")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const MINIMAL: &str = r#"
id = "minimal"
name = "Minimal webhook"
version = "0.1.0"
contract = "0.1.0"
allowed_hosts = ["https://hooks.example.com"]
document_kinds = ["invoice", "credit-note"]
"#;

#[test]
fn plugin_check_prints_identity_or_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::install(dir.path(), "minimal_connector", MINIMAL);
    let o = ledgerport(&["plugin", "check", m.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("Minimal webhook (minimal)")
            && t.contains("https://hooks.example.com")
            && t.contains("0.1.0"),
        "{t}"
    );
    // The connector's describe() was called and agrees with the manifest.
    assert!(t.contains("describe()     Minimal webhook version"), "{t}");
    // JSON for scripts.
    let o = ledgerport(&["--json", "plugin", "check", m.to_str().unwrap()], &[]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["describe"]["id"], "minimal", "{v}");
    // A manifest that disagrees with the connector's describe(): refused,
    // saying what each says (id, then document kinds).
    for (manifest, said) in [
        (
            MINIMAL.replace("id = \"minimal\"", "id = \"webhook\""),
            "\"webhook\"",
        ),
        (
            MINIMAL.replace("[\"invoice\", \"credit-note\"]", "[\"invoice\"]"),
            "document_kinds are [invoice]",
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        let m = common::install(d.path(), "minimal_connector", &manifest);
        let o = ledgerport(&["plugin", "check", m.to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(
            text(&o).contains("describe()") && text(&o).contains(said),
            "{}",
            text(&o)
        );
    }
    // Tampered: exit 2 and the reason.
    let wasm = dir.path().join("minimal_connector.wasm");
    let mut b = std::fs::read(&wasm).unwrap();
    let n = b.len();
    b[n - 1] ^= 1;
    std::fs::write(&wasm, b).unwrap();
    let o = ledgerport(&["plugin", "check", m.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("hash mismatch"), "{}", text(&o));
}

/// `ledgerport plugin install <manifest> --component <wasm> --dir <dir>`.
fn plugin_install(manifest: &Path, wasm: &Path, dir: &Path) -> Output {
    ledgerport(
        &[
            "plugin",
            "install",
            manifest.to_str().unwrap(),
            "--component",
            wasm.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ],
        &[],
    )
}

#[test]
fn plugin_install_records_the_hash_and_deliver_runs_a_smoke_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/minimal-connector/manifest.toml");
    let wasm = common::wasm("minimal_connector");
    // What an interrupted install left: removed once an hour old, kept
    // while it may still be in use.
    let stale = dir.path().join(".staging-1-1");
    let fresh = dir.path().join(".staging-2-2");
    for d in [&stale, &fresh] {
        std::fs::create_dir_all(d.join("minimal")).unwrap();
    }
    std::fs::File::open(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();
    let o = plugin_install(&src, &wasm, dir.path());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // "will load" holds only for daemons without a trust list: said so.
    assert!(
        text(&o).contains("unsigned: a daemon with trusted_keys refuses it"),
        "{}",
        text(&o)
    );
    assert!(!stale.exists() && fresh.exists());
    std::fs::remove_dir_all(&fresh).unwrap();
    let installed = dir.path().join("minimal/manifest.toml");
    assert!(
        std::fs::read_to_string(&installed)
            .unwrap()
            .contains("sha256")
    );
    // An upgrade whose manifest disagrees with the connector's describe()
    // is refused and leaves the installed version as it was.
    let before = std::fs::read_to_string(&installed).unwrap();
    let bad = dir.path().join("bad-manifest.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&src)
            .unwrap()
            .replace("[\"invoice\", \"credit-note\"]", "[\"invoice\"]"),
    )
    .unwrap();
    assert_ne!(
        std::fs::read_to_string(&bad).unwrap(),
        std::fs::read_to_string(&src).unwrap()
    );
    let o = plugin_install(&bad, &wasm, dir.path());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("document_kinds") && text(&o).contains("not installed"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), before);
    // A mistake in the author's file is reported against that file and
    // its line (it used to name "<text>", a rewritten copy's line).
    let typo = dir.path().join("typo-manifest.toml");
    let source = std::fs::read_to_string(&src).unwrap();
    let lines: Vec<&str> = source.lines().collect();
    let at = lines.iter().position(|l| l.starts_with("version")).unwrap();
    let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    edited.insert(at, "verison = \"0.1.0\"".into());
    std::fs::write(&typo, edited.join("\n")).unwrap();
    let o = plugin_install(&typo, &wasm, dir.path());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("typo-manifest.toml")
            && t.contains(&format!("line {}", at + 1))
            && t.contains("verison")
            && !t.contains("<text>"),
        "{t}"
    );
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), before);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".staging"))
        .collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
    // A delivery to a port nobody listens on: a clear transient failure, exit 1.
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/documents/invoice.json");
    let o = ledgerport(
        &[
            "deliver",
            "--plugin",
            installed.to_str().unwrap(),
            "--document",
            doc.to_str().unwrap(),
            "--base-url",
            "https://hooks.example.com=http://127.0.0.1:9",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("not delivered"), "{}", text(&o));
    // A bad argument: exit 2, named.
    let o = ledgerport(
        &[
            "deliver",
            "--plugin",
            installed.to_str().unwrap(),
            "--document",
            doc.to_str().unwrap(),
            "--base-url",
            "nonsense",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--base-url"), "{}", text(&o));
}

/// Commands that only read neither create a database (a mistyped
/// `--database` answered "no deliveries" from a new, empty file) nor
/// migrate one (a newer binary upgraded the schema under older daemons);
/// a command that writes says when it created a new file.
#[test]
fn reading_commands_need_an_existing_database_on_this_schema() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("typo.db");
    let db = db.to_str().unwrap();
    let key = ledgerport::crypto::generate_key();
    let env = [("LEDGERPORT_SECRET_KEY", key.as_str())];
    for args in [
        vec!["deliveries", "list", "--database", db],
        vec!["tenant", "list", "--database", db],
        vec!["keys", "status", "--database", db],
        vec!["support-report", "--tenant", "acme", "--database", db],
    ] {
        let o = ledgerport(&args, &env);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains("no such database file"),
            "{args:?}: {}",
            text(&o)
        );
        assert!(!Path::new(db).exists(), "{args:?} created {db}");
    }
    // A database without the schema (a file that is not ledgerport's).
    let other = dir.path().join("other.db");
    let o = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('CREATE TABLE t (x)'); c.commit()",
            other.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = ledgerport(
        &["deliveries", "list", "--database", other.to_str().unwrap()],
        &env,
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("holds no ledgerport schema"),
        "{}",
        text(&o)
    );
    // A command that writes creates it, and says so; then reading works.
    let o = ledgerport(
        &["tenant", "add", "acme", "--name", "Acme", "--database", db],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("created a new database"), "{}", text(&o));
    let o = ledgerport(&["tenant", "list", "--database", db], &env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("acme"), "{}", text(&o));
    let o = ledgerport(
        &["tenant", "add", "beta", "--name", "Beta", "--database", db],
        &env,
    );
    assert!(!text(&o).contains("created a new database"), "{}", text(&o));
}

#[test]
fn tenants_mappings_issue_and_the_delivery_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lp.db");
    let db = db.to_str().unwrap();
    let key = ledgerport::crypto::generate_key();
    let env = [("LEDGERPORT_SECRET_KEY", key.as_str())];
    let o = ledgerport(
        &[
            "tenant",
            "add",
            "acme",
            "--name",
            "Acme Ltd",
            "--email",
            "finance@acme.example",
            "--database",
            db,
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = ledgerport(&["--json", "tenant", "list", "--database", db], &env);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("finance@acme.example"),
        "{}",
        text(&o)
    );
    // Mappings (not connected: stored unchecked).
    let o = ledgerport(
        &[
            "mappings",
            "set",
            "--tenant",
            "acme",
            "gross-salary=477",
            "management-fee=429:INPUT2",
            "--database",
            db,
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = ledgerport(
        &["mappings", "list", "--tenant", "acme", "--database", db],
        &env,
    );
    let t = text(&o);
    assert!(
        t.contains("gross-salary") && t.contains("477") && t.contains("INPUT2"),
        "{t}"
    );
    // All or nothing: a bad pair leaves the good ones before it unsaved.
    let o = ledgerport(
        &[
            "mappings",
            "set",
            "--tenant",
            "acme",
            "allowances-and-bonuses=478",
            "no-such-kind=1",
            "--database",
            db,
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no-such-kind"), "{}", text(&o));
    assert!(text(&o).contains("nothing was saved"), "{}", text(&o));
    let o = ledgerport(
        &["mappings", "list", "--tenant", "acme", "--database", db],
        &env,
    );
    assert!(!text(&o).contains("allowances-and-bonuses"), "{}", text(&o));

    // issue: a bad document is refused naming the fields, exit 2.
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/documents/invoice.json");
    let mut bad: Value = serde_json::from_slice(&std::fs::read(&sample).unwrap()).unwrap();
    bad["currency"] = "EURO".into();
    let bad_path = dir.path().join("bad.json");
    std::fs::write(&bad_path, serde_json::to_vec(&bad).unwrap()).unwrap();
    let o = ledgerport(
        &[
            "issue",
            "--file",
            bad_path.to_str().unwrap(),
            "--database",
            db,
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("currency"), "{}", text(&o));
    // A good one is stored (no connection: kept, not sent).
    let o = ledgerport(
        &[
            "issue",
            "--file",
            sample.to_str().unwrap(),
            "--database",
            db,
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("not sent: not connected"), "{}", text(&o));
    // Again: unchanged.
    let o = ledgerport(
        &[
            "issue",
            "--file",
            sample.to_str().unwrap(),
            "--database",
            db,
        ],
        &env,
    );
    assert!(text(&o).contains("already issued"), "{}", text(&o));

    // With the daemon's config, `issue` refuses what the ingest API would:
    // a line kind the platform's catalogue does not have.
    let catalogue = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/catalogue.toml");
    let config = dir.path().join("ledgerport.toml");
    std::fs::write(
        &config,
        format!(
            "database = {:?}\ncatalogue = {:?}\n",
            db,
            catalogue.to_str().unwrap()
        ),
    )
    .unwrap();
    let mut odd: Value = serde_json::from_slice(&std::fs::read(&sample).unwrap()).unwrap();
    odd["id"] = "doc-odd-kind".into();
    odd["number"] = "INV-ODD-1".into();
    odd["lines"][0]["kind"] = "yacht-rental".into();
    let odd_path = dir.path().join("odd.json");
    std::fs::write(&odd_path, serde_json::to_vec(&odd).unwrap()).unwrap();
    let issue_odd = || {
        ledgerport(
            &[
                "issue",
                "--file",
                odd_path.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
            &env,
        )
    };
    let o = issue_odd();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("lines[0].kind") || text(&o).contains("yacht-rental"),
        "{}",
        text(&o)
    );
    // A catalogue that cannot be read is an error naming it, not "no catalogue".
    std::fs::write(
        &config,
        format!("database = {:?}\ncatalogue = \"/nonexistent/c.toml\"\n", db),
    )
    .unwrap();
    let o = issue_odd();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("/nonexistent/c.toml"), "{}", text(&o));
}

#[tokio::test]
async fn deliveries_list_and_retry() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("lp.db");
    let db = db_path.to_str().unwrap().to_string();
    let store = ledgerport::store::Store::open_and_migrate(&db)
        .await
        .unwrap();
    store.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let conns = vec![("conn-1".to_string(), "xero".to_string())];
    store
        .ingest_document(new_doc("acme", "d1", "INV-1", "{}", "h", 1), &conns)
        .await
        .unwrap();
    let claimed = store
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
    assert_eq!(claimed.len(), 1);
    let failed = ledgerport::store::outbox::Finish {
        state: "failed",
        pause_reason: None,
        pause_detail: None,
        counts: true,
        next_attempt_at: 20,
        outcome: "rejected".into(),
        message: Some("Xero refused it".into()),
        details: None,
        external_id: None,
        external_url: None,
    };
    assert!(
        store
            .finish_delivery(&claimed[0].id, &claimed[0].lease, 10, 20, &failed)
            .await
            .unwrap()
    );
    store.close().await;

    let o = ledgerport(
        &[
            "--json",
            "deliveries",
            "list",
            "--tenant",
            "acme",
            "--number",
            "INV-1",
            "--database",
            &db,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["deliveries"][0]["state"], "failed");
    assert_eq!(v["deliveries"][0]["last_error"], "Xero refused it");
    let o = ledgerport(
        &["deliveries", "retry", "--tenant", "acme", "--database", &db],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("1 delivery(ies) queued again"),
        "{}",
        text(&o)
    );
    let o = ledgerport(
        &[
            "--json",
            "deliveries",
            "list",
            "--tenant",
            "acme",
            "--database",
            &db,
        ],
        &[],
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["deliveries"][0]["state"], "pending");
    let id = v["deliveries"][0]["id"].as_str().unwrap().to_string();
    // The text list shows the id `retry --id` takes.
    let o = ledgerport(
        &["deliveries", "list", "--tenant", "acme", "--database", &db],
        &[],
    );
    assert!(text(&o).starts_with(&id), "{}", text(&o));
    // Retry says why nothing was queued: not failed, no such id, no such tenant.
    let retry = |tenant: &str, id: &str| {
        ledgerport(
            &[
                "deliveries",
                "retry",
                "--tenant",
                tenant,
                "--id",
                id,
                "--database",
                &db,
            ],
            &[],
        )
    };
    let o = retry("acme", &id);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("is pending, not failed"), "{}", text(&o));
    let o = retry("acme", "nope");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("has no delivery \"nope\""),
        "{}",
        text(&o)
    );
    let o = retry("acmee", &id);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("unknown tenant \"acmee\""),
        "{}",
        text(&o)
    );
    let o = ledgerport(
        &["deliveries", "list", "--limit", "-1", "--database", &db],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // Retention by hand: nothing here is a day old, and a pending
    // document is never touched; zero days is refused.
    let o = ledgerport(
        &[
            "--json",
            "deliveries",
            "purge",
            "--older-than-days",
            "1",
            "--database",
            &db,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bodies"], 0, "{v}");
    let o = ledgerport(
        &[
            "deliveries",
            "purge",
            "--older-than-days",
            "0",
            "--database",
            &db,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // The retry and the purge are audited, as the API's changes are.
    let store = ledgerport::store::Store::open_existing(&db).await.unwrap();
    let log = store.audit_log(None, 50).await.unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert!(
        actions.contains(&"retry") && actions.contains(&"purge"),
        "{actions:?}"
    );
    assert!(log.iter().all(|e| e.actor.ends_with("(cli)")), "{log:?}");
    store.close().await;
    // A state that does not exist is refused, not an empty list.
    let o = ledgerport(
        &["deliveries", "list", "--state", "broken", "--database", &db],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("invalid value 'broken' for '--state <STATE>'"),
        "{}",
        text(&o)
    );
    // Retrying a delivery that is not failed: exit 1.
    let o = ledgerport(
        &[
            "deliveries",
            "retry",
            "--tenant",
            "acme",
            "--id",
            "nope",
            "--database",
            &db,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
}

/// The README's first command ends in `ledgerport demo`: it must keep
/// working end to end (simulator, OAuth, mappings, issue, pause, e-mail),
/// also when its port is taken (it then takes any free one).
#[test]
fn the_demo_runs_end_to_end() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let plugins = common::target_dir().join("plugins");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_ledgerport"))
        .args(["demo", "--exit", "--port", &taken_port])
        .current_dir(&root)
        .env("LEDGERPORT_PLUGIN_DIR", &plugins)
        .env("LEDGERPORT_LOG", "error")
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let daemon = t
        .lines()
        .find(|l| l.trim_start().starts_with("daemon "))
        .unwrap_or_else(|| panic!("no daemon line: {t}"));
    assert!(
        daemon.contains("http://127.0.0.1:") && !daemon.contains(&format!(":{taken_port} ")),
        "the demo fell back to another port: {daemon}"
    );
    drop(taken);
    assert!(t.contains("INV-2026-0042  delivered to Xero as"), "{t}");
    assert!(t.contains("CN-2026-0007   delivered to Xero as"), "{t}");
    assert!(
        t.contains("the credit was allocated to bill INV-2026-0042"),
        "{t}"
    );
    assert!(t.contains("INV-2026-0043  paused (mapping)"), "{t}");
    assert!(
        t.contains("Subject: Action needed: 1 document waiting for account mapping in Xero"),
        "{t}"
    );
    assert!(
        t.contains("1 bill(s), 1 supplier credit note(s), 1 attachment(s), 1 allocation(s)"),
        "{t}"
    );
}

/// Without the Xero connector installed the demo says what to run, before
/// it starts anything.
#[test]
fn the_demo_without_connectors_says_how_to_build_them() {
    let empty = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ledgerport"))
        .args(["demo", "--exit", "--port", "0"])
        .env("LEDGERPORT_PLUGIN_DIR", empty.path())
        .env("LEDGERPORT_LOG", "error")
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("the Xero connector is not installed"), "{t}");
    assert!(t.contains("cargo xtask wasm"), "{t}");
    assert!(!t.contains("xero simulator"), "nothing was started: {t}");
}

/// A daemon whose plugin_dir holds no connector still serves (an operator
/// may install connectors later) but says so at the start.
#[test]
fn serve_with_no_connector_warns_naming_plugin_dir() {
    let (warned, plugins) = serve_until_no_connector_warning("");
    assert!(
        warned.contains(&plugins.display().to_string()),
        "the warning names the directory: {warned}"
    );
}

#[test]
fn serve_logs_json_when_its_config_says_json_logs() {
    let (warned, plugins) = serve_until_no_connector_warning("json_logs = true\n");
    let v: Value = serde_json::from_str(&warned)
        .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {warned}"));
    assert_eq!(v["level"], "WARN", "{v}");
    assert_eq!(
        v["fields"]["plugin_dir"].as_str(),
        Some(plugins.display().to_string().as_str()),
        "{v}"
    );
}

/// Start `serve` on an empty plugin directory with `extra` config lines and
/// return the warning about it (the whole stderr line) and the directory.
fn serve_until_no_connector_warning(extra: &str) -> (String, std::path::PathBuf) {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let key_file = dir.path().join("secret.key");
    std::fs::write(&key_file, ledgerport::crypto::generate_key()).unwrap();
    let config = dir.path().join("ledgerport.toml");
    std::fs::write(
        &config,
        format!(
            "database = \"{}\"\nlisten = \"127.0.0.1:0\"\nplugin_dir = \"{}\"\nkey_file = \"{}\"\n{extra}",
            dir.path().join("lp.db").display(),
            plugins.display(),
            key_file.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ledgerport"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("LEDGERPORT_LOG", "warn")
        .env_remove("LEDGERPORT_JSON_LOGS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let warned = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(line) if line.contains("no connector in plugin_dir") => break line,
            Ok(line) => seen.push(line),
            Err(_) => break String::new(),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(!warned.is_empty(), "no warning; stderr: {seen:?}");
    (warned, plugins)
}

#[tokio::test]
async fn support_report_names_what_did_not_sync_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lp.db").to_str().unwrap().to_string();
    let store = ledgerport::store::Store::open_and_migrate(&db)
        .await
        .unwrap();
    store
        .upsert_tenant("acme", "Acme", &["finance@acme.example".into()], 0)
        .await
        .unwrap();
    let conns = vec![("conn-1".to_string(), "xero".to_string())];
    store
        .ingest_document(new_doc("acme", "d1", "INV-9", "{}", "h", 1), &conns)
        .await
        .unwrap();
    let c = store
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
    let f = ledgerport::store::outbox::Finish {
        state: "failed",
        pause_reason: None,
        pause_detail: None,
        counts: true,
        next_attempt_at: 20,
        outcome: "rejected".into(),
        message: Some("Account code 499 is archived in Xero".into()),
        details: Some(
            "[{\"provider_message\":\"Account code '499' has been archived, or deleted.\"}]".into(),
        ),
        external_id: None,
        external_url: None,
    };
    store
        .finish_delivery(&c[0].id, &c[0].lease, 10, 20, &f)
        .await
        .unwrap();
    store.close().await;
    let o = ledgerport(
        &[
            "--json",
            "support-report",
            "--tenant",
            "acme",
            "--database",
            &db,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["documents_not_synced"][0]["number"], "INV-9");
    assert!(
        v["recent_errors"][0]["provider"]
            .as_str()
            .unwrap()
            .contains("has been archived")
    );
    let o = ledgerport(
        &["support-report", "--tenant", "nobody", "--database", &db],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    // plugin list and migrate.
    let o = ledgerport(
        &[
            "--json",
            "plugin",
            "list",
            "--dir",
            common::target_dir().join("plugins").to_str().unwrap(),
        ],
        &[],
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "xero" && p["ok"] == true),
        "{v}"
    );
    let o = ledgerport(&["migrate", "--database", &db], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// `plugin new` scaffolds a crate whose own test passes, which builds for
/// wasm32-wasip2, installs, and loads in the host.
#[test]
fn plugin_new_scaffolds_a_connector_that_tests_builds_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    let o = ledgerport(
        &[
            "plugin",
            "new",
            "acme-books",
            "--dir",
            dir.path().to_str().unwrap(),
            "--sdk",
            sdk.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let root = dir.path().join("acme-books");
    // Refuses to overwrite, and bad names.
    let o = ledgerport(
        &[
            "plugin",
            "new",
            "acme-books",
            "--dir",
            dir.path().to_str().unwrap(),
            "--sdk",
            sdk.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    let o = ledgerport(
        &[
            "plugin",
            "new",
            "Acme Books",
            "--dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("name"), "{}", text(&o));
    // Cargo refuses a package named `2books-connector`: refused here first.
    let o = ledgerport(
        &[
            "plugin",
            "new",
            "2books",
            "--dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("starting with a letter"), "{}", text(&o));
    assert!(!dir.path().join("2books").exists());
    let target = common::target_dir().join("scaffold-test");
    // The workspace's lock file pins the scaffold's dependencies (the SDK's
    // and serde's) to the versions this build has: a release on the day of
    // the run (one needing a newer Rust, say) cannot break the test.
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"),
        root.join("Cargo.lock"),
    )
    .unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let t = Command::new(&cargo)
        .args(["test", "--quiet"])
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(t.status.success(), "{}", text(&t));
    assert!(
        String::from_utf8_lossy(&t.stdout).contains("1 passed"),
        "{}",
        text(&t)
    );
    let b = Command::new(&cargo)
        .args(["build", "--quiet", "--target", "wasm32-wasip2", "--release"])
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(b.status.success(), "{}", text(&b));
    let wasm = target.join("wasm32-wasip2/release/acme_books_connector.wasm");
    let plugins = dir.path().join("plugins.d");
    let o = ledgerport(
        &[
            "plugin",
            "install",
            root.join("manifest.toml").to_str().unwrap(),
            "--component",
            wasm.to_str().unwrap(),
            "--dir",
            plugins.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("ok: the host will load this plugin"),
        "{}",
        text(&o)
    );
    // And it delivers as scaffolded: to its `endpoint` setting's default,
    // asking for no token (its manifest has no [oauth]; before, it asked
    // for one and every delivery paused the connection for a reconnect).
    let (port, seen) = answer_once("201 Created", r#"{"id":"b-1"}"#);
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/documents/invoice.json");
    let o = ledgerport(
        &[
            "deliver",
            "--plugin",
            plugins.join("acme-books/manifest.toml").to_str().unwrap(),
            "--document",
            doc.to_str().unwrap(),
            "--base-url",
            &format!("https://api.example.com=http://127.0.0.1:{port}"),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let request = seen.join().unwrap().to_ascii_lowercase();
    assert!(request.starts_with("post /documents "), "{request}");
    assert!(!request.contains("authorization:"), "{request}");
    assert!(
        request.contains("\"number\":\"inv-2026-0042\""),
        "{request}"
    );
}

/// A one-request HTTP server on a free loopback port: answers `status`
/// with `body` and hands back the request it read (head and body).
fn answer_once(status: &'static str, body: &'static str) -> (u16, std::thread::JoinHandle<String>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    break;
                }
            }
        }
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(answer.as_bytes()).unwrap();
        String::from_utf8_lossy(&buf).to_string()
    });
    (port, handle)
}

/// Signed plugins: keygen, sign, verify; a runtime with a trust list loads
/// only plugins signed by a trusted key, unchanged since signing.
#[test]
fn signed_plugins_and_the_trust_list() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::install(dir.path(), "minimal_connector", MINIMAL);
    let key = dir.path().join("signer.key");
    let o = ledgerport(&["plugin", "keygen", "--out", key.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // The secret key is readable by its owner only, whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    let public = String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("public key: ").map(String::from))
        .unwrap();
    let (_, other_public) = ledgerport::signing::generate();
    // Unsigned: refused under a trust list, fine without one.
    let rt = |trusted: Vec<String>| {
        common::runtime(ledgerport::runtime::RuntimeConfig {
            trusted_keys: trusted,
            ..Default::default()
        })
    };
    let none = std::collections::BTreeMap::new();
    let e = rt(vec![public.clone()])
        .load(&m, &none)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not signed"), "{e}");
    assert!(rt(vec![]).load(&m, &none).is_ok());
    let o = ledgerport(
        &[
            "plugin",
            "sign",
            m.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(rt(vec![public.clone()]).load(&m, &none).is_ok());
    let o = ledgerport(
        &[
            "plugin",
            "verify",
            m.to_str().unwrap(),
            "--trusted",
            &public,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Signed by someone else.
    let e = rt(vec![other_public.clone()])
        .load(&m, &none)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a trusted key"), "{e}");
    let o = ledgerport(
        &[
            "plugin",
            "verify",
            m.to_str().unwrap(),
            "--trusted",
            &other_public,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    // Changed after signing (a new allowed host): refused.
    let text_m = std::fs::read_to_string(&m)
        .unwrap()
        .replace("https://hooks.example.com", "https://evil.example.com");
    std::fs::write(&m, text_m).unwrap();
    let e = rt(vec![public.clone()])
        .load(&m, &none)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not match"), "{e}");
}

/// `deliveries missed` lists what a connection missed while it was
/// disconnected and, with `--send`, sends it once it is connected again:
/// some by id, then the rest; what cannot be sent is named, and nothing
/// is sent then.
#[tokio::test]
async fn deliveries_missed_lists_and_sends() {
    use ledgerport::store::{NewConnection, Organisation};
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("lp.db");
    let db = db_path.to_str().unwrap().to_string();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(plugins.join("minimal")).unwrap();
    // As `plugin install` leaves it: the component's file and hash filled in.
    std::fs::write(
        plugins.join("minimal/manifest.toml"),
        format!(
            "{MINIMAL}component = \"minimal.wasm\"\nsha256 = \"{}\"\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let store = ledgerport::store::Store::open_and_migrate(&db)
        .await
        .unwrap();
    store.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    let keys = storage_support::keys(1);
    let new = NewConnection {
        tenant_id: "acme".into(),
        connector_id: "minimal".into(),
        admin: "alice".into(),
        scopes: vec![],
        organisation: Organisation {
            tenant_id: "hook".into(),
            name: "Hook".into(),
            connection_id: None,
        },
        auth_event_id: None,
        tokens: None,
    };
    let conn = store
        .finish_connect(&keys, &new, 10)
        .await
        .unwrap()
        .connection
        .id;
    let mut lease = store.lock_tokens(&conn).await.unwrap();
    lease.disconnect("alice", "test", 20).await.unwrap();
    lease.commit().await.unwrap();
    for (id, at) in [("d1", 21_000), ("d2", 22_000)] {
        store
            .ingest_for_tenant(new_doc("acme", id, &format!("INV-{id}"), "{}", "h", at))
            .await
            .unwrap();
    }
    let plugin_dir = plugins.to_str().unwrap().to_string();
    let env = [("LEDGERPORT_PLUGIN_DIR", plugin_dir.as_str())];
    let missed = |extra: &[&str]| {
        let mut args = vec![
            "--json",
            "deliveries",
            "missed",
            "--tenant",
            "acme",
            "--connector",
            "minimal",
            "--database",
            &db,
        ];
        args.extend_from_slice(extra);
        ledgerport(&args, &env)
    };
    let o = missed(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["count"], 2, "{v}");
    assert_eq!(v["too_old"], 0, "{v}");
    assert_eq!(v["documents"][1]["number"], "INV-d2", "{v}");
    // Still disconnected: refused naming the connector.
    let o = missed(&["--send"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("connector: "), "{}", text(&o));
    // A connector not installed, a tenant unknown: named.
    let o = ledgerport(
        &[
            "deliveries",
            "missed",
            "--tenant",
            "acme",
            "--connector",
            "xero",
            "--database",
            &db,
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("connector: \"xero\" is not installed"),
        "{}",
        text(&o)
    );
    let o = ledgerport(
        &[
            "deliveries",
            "missed",
            "--tenant",
            "nobody",
            "--database",
            &db,
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("tenant: "), "{}", text(&o));

    store.finish_connect(&keys, &new, 30).await.unwrap();
    let o = missed(&["--send", "--document", "d2", "--document", "d9"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("\"d9\" is not a document"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("\"d2\" is not"), "{}", text(&o));
    let o = missed(&["--send", "--document", "d2"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["queued"], 1, "{v}");
    let o = missed(&["--send"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["queued"], 1, "{v}");
    let o = missed(&[]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["count"], 0, "{v}");
    let pending = store
        .list_deliveries(Some("acme"), None, Some("pending"), 10)
        .await
        .unwrap();
    assert_eq!(pending.len(), 2);
    assert!(pending.iter().all(|d| d.connection_id == conn));
    let audit = store.audit_log(Some("acme"), 10).await.unwrap();
    assert_eq!(
        audit.iter().filter(|e| e.action == "send-missed").count(),
        2,
        "{audit:?}"
    );
}

/// `mail list` shows the notices with their state and the SMTP server's
/// words; `mail retry` hands the given-up ones back to the daemon (audited),
/// and says why a notice named by id is not retried.
#[tokio::test]
async fn mail_list_shows_given_up_notices_and_retry_sends_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("lp.db");
    let db = db_path.to_str().unwrap().to_string();
    let store = ledgerport::store::Store::open_and_migrate(&db)
        .await
        .unwrap();
    store.upsert_tenant("acme", "Acme", &[], 0).await.unwrap();
    for n in ["INV-1", "INV-2"] {
        store
            .record_incident("acme", n, "failed", n, "the endpoint answered 422", 0, 0)
            .await
            .unwrap();
    }
    for inc in store.due_incidents(1).await.unwrap() {
        let mail = ledgerport::store::outbox::NewMail {
            recipients: vec!["ap@acme.test".into()],
            subject: format!("{} could not be sent", inc.documents[0]),
            text: "text".into(),
            html: "<p>html</p>".into(),
        };
        assert!(store.tell_incident(&inc, Some(&mail), 1).await.unwrap());
    }
    let now = ledgerport::dispatch::now_ms();
    let given_up = store.claim_due_mail(now, now + 1).await.unwrap().unwrap();
    store
        .mail_result(
            &given_up.id,
            now,
            Err((
                "given up: 550 5.7.1 sender refused".into(),
                ledgerport::notify::GIVEN_UP,
            )),
        )
        .await
        .unwrap();
    let sent = store.claim_due_mail(now, now + 1).await.unwrap().unwrap();
    store.mail_result(&sent.id, now, Ok(())).await.unwrap();
    let env: [(&str, &str); 0] = [];

    let o = ledgerport(
        &["mail", "list", "--state", "given-up", "--database", &db],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = text(&o);
    assert!(out.starts_with(&given_up.id), "{out}");
    assert!(out.contains("given-up"), "{out}");
    assert!(out.contains("550 5.7.1 sender refused"), "{out}");
    assert!(out.contains(&given_up.subject), "{out}");
    assert!(!out.contains(&sent.id), "{out}");
    let o = ledgerport(&["--json", "mail", "list", "--database", &db], &env);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mail"].as_array().unwrap().len(), 2, "{v}");
    let o = ledgerport(
        &["mail", "list", "--tenant", "nobody", "--database", &db],
        &env,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("tenant: "), "{}", text(&o));
    let o = ledgerport(
        &["mail", "list", "--state", "lost", "--database", &db],
        &env,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // Support sees the notice the tenant's admins never received.
    let o = ledgerport(
        &[
            "--json",
            "support-report",
            "--tenant",
            "acme",
            "--database",
            &db,
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let notices = v["notices_not_sent"].as_array().unwrap();
    assert_eq!(notices.len(), 1, "{v}");
    assert_eq!(notices[0]["id"], given_up.id.as_str());
    assert_eq!(notices[0]["state"], "given-up");

    // Named by id: the sent one is not retried, and that is said.
    let o = ledgerport(
        &["mail", "retry", "--id", &sent.id, "--database", &db],
        &env,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("it was sent at"), "{}", text(&o));
    let o = ledgerport(
        &["mail", "retry", "--id", "no-such", "--database", &db],
        &env,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("id: no notice"), "{}", text(&o));

    let o = ledgerport(
        &[
            "--json",
            "mail",
            "retry",
            "--tenant",
            "acme",
            "--database",
            &db,
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["requeued"], 1, "{v}");
    // Due now for the daemon's mail task, tries counted afresh.
    let again = store
        .claim_due_mail(ledgerport::dispatch::now_ms(), now + 60_000)
        .await
        .unwrap()
        .expect("due again");
    assert_eq!(again.id, given_up.id);
    assert_eq!(again.attempts, 0);
    let audit = store.audit_log(Some("acme"), 10).await.unwrap();
    assert_eq!(
        audit.iter().filter(|e| e.action == "mail-retry").count(),
        1,
        "{audit:?}"
    );
}
