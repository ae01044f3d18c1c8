//! A full run (connect with the consent form, a connector call with the
//! connection's credentials, a refresh, a 401-driven refresh, disconnect)
//! with every log line of every crate captured at TRACE, then grepped for
//! every token, code and the client secret the run handled: none may appear.

#[allow(dead_code)]
mod storage_support;

use ledgerport::capabilities::http::{Credential, CredentialProvider};
use std::io::Write;
use std::sync::{Arc, Mutex};
use storage_support::*;
use xero_sim::DEFAULT_TENANT_HOLDINGS;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn full_run(db: &TestDb, secrets: &mut Vec<String>) {
    let sim = sim().await;
    let d = daemon(&sim, &db.url(), keys(3), None).await;
    d.store.upsert_tenant("acme", "Acme", &[], 1).await.unwrap();
    let (rt, plugin) = xero_plugin(&sim);
    d.conns.register_plugin(rt.clone(), plugin.clone());
    sim.set_auto_approve(None);
    let url = d
        .conns
        .begin_connect("acme", "xero", "alice")
        .await
        .unwrap();
    let b = browser();
    let cb = authorize(&b, &sim, &url, Some(&[DEFAULT_TENANT_HOLDINGS])).await;
    let code = url::Url::parse(&cb)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .to_string();
    secrets.push(code);
    let (status, body) = finish(&b, &d.base, &cb, None).await;
    assert_eq!(status, 200, "{body}");
    let c = d
        .store
        .connection_for("acme", "xero")
        .await
        .unwrap()
        .unwrap();
    let mut grab = |sim: &xero_sim::SimHandle| {
        for g in sim.grants() {
            secrets.push(g.access_token.clone());
            secrets.extend(g.refresh_token.clone());
        }
    };
    grab(&sim);
    // A connector call with the connection's credentials.
    let ctx = d.conns.call_context(&c.id).await.unwrap();
    rt.list_accounts(&plugin, &ctx).await.unwrap().unwrap();
    // Expiry, refresh, then a 401-driven refresh.
    sim.advance_secs(1800);
    let t = d.conns.tokens().bearer(&c.id).await.unwrap();
    grab(&sim);
    d.conns
        .tokens()
        .refresh(
            &c.id,
            &Credential {
                access_token: t.access_token,
            },
        )
        .await
        .unwrap();
    grab(&sim);
    rt.list_accounts(&plugin, &ctx).await.unwrap().unwrap();
    d.conns.disconnect(&c.id, "alice").await.unwrap();
    secrets.push(pkce_verifier_of(&sim));
}

/// The PKCE verifier the code exchange carried (from the simulator's request log).
fn pkce_verifier_of(sim: &xero_sim::SimHandle) -> String {
    let body = sim
        .requests(0)
        .into_iter()
        .find(|r| {
            r.body_text
                .as_deref()
                .unwrap_or("")
                .contains("code_verifier=")
        })
        .unwrap()
        .body_text
        .unwrap();
    url::form_urlencoded::parse(body.as_bytes())
        .find(|(k, _)| k == "code_verifier")
        .unwrap()
        .1
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_the_logs_of_a_full_run() {
    let cap = Capture::default();
    let w = cap.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "trace,xero_sim=off,cranelift_codegen=info,cranelift_frontend=info,regalloc2=info,wasmtime=info,wasmtime_cranelift=info,wasmtime_environ=info,cranelift=info",
        ))
        .with_writer(move || w.clone())
        .try_init()
        .unwrap();
    let mut secrets = vec![xero_sim::DEFAULT_CLIENT_SECRET.to_string()];
    full_run(&TestDb::sqlite(), &mut secrets).await;
    if let Some(pg) = TestDb::postgres().await {
        full_run(&pg, &mut secrets).await;
    }
    let logs = String::from_utf8_lossy(&cap.0.lock().unwrap()).into_owned();
    // The capture is real: our own lines and other crates' are there.
    assert!(logs.contains("access token refreshed"), "capture works");
    assert!(logs.contains("connection event"));
    assert!(logs.lines().count() > 100, "{} lines", logs.lines().count());
    for s in &secrets {
        assert!(s.len() >= 10, "{s:?}");
        assert!(!logs.contains(s.as_str()), "a secret appears in the logs");
        for part in s.split('.').filter(|p| p.len() > 20) {
            assert!(!logs.contains(part), "part of a token appears in the logs");
        }
    }
}
