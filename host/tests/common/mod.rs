//! Shared helpers for the host's integration tests: locate the connectors
//! built for wasm32-wasip2, install them with a manifest carrying their
//! hash, and run a local HTTP listener that records what reaches it.
#![allow(dead_code)]

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use ledgerport::capabilities::connection::ConnectionInfo;
use ledgerport::capabilities::http::{ReqwestTransport, StaticCredentials};
use ledgerport::capabilities::kv::MemoryKv;
use ledgerport::capabilities::mapping::MemoryMappings;
use ledgerport::runtime::{CallContext, Runtime, RuntimeConfig};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A connector built by `cargo xtask wasm` (profile `wasm`).
pub fn wasm(crate_file: &str) -> PathBuf {
    let p = target_dir()
        .join("wasm32-wasip2/wasm")
        .join(format!("{crate_file}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: build the connectors first with `cargo xtask wasm` (the README's test command does)",
        p.display()
    );
    p
}

/// Copy a component into `dir` and write a manifest with its hash.
/// `manifest` is TOML without `component` and `sha256`.
pub fn install(dir: &Path, crate_file: &str, manifest: &str) -> PathBuf {
    let bytes = std::fs::read(wasm(crate_file)).unwrap();
    let name = format!("{crate_file}.wasm");
    std::fs::write(dir.join(&name), &bytes).unwrap();
    let sha = hex::encode(Sha256::digest(&bytes));
    let path = dir.join(format!("{crate_file}.toml"));
    std::fs::write(
        &path,
        format!("component = \"{name}\"\nsha256 = \"{sha}\"\n{manifest}"),
    )
    .unwrap();
    path
}

/// One request that reached the listener.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A local HTTP listener. `/hang` never answers, `/huge` answers 20 MiB,
/// `/status/N` answers N; everything else answers 200 `{"id":"ext-1"}`.
pub struct Listener {
    pub base: String,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
}

impl Listener {
    pub async fn start() -> Self {
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let r2 = requests.clone();
        let app = Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let r2 = r2.clone();
                async move {
                    r2.lock().unwrap().push(Recorded {
                        method: method.to_string(),
                        path: uri.path().to_string(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.to_string(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect(),
                        body: body.to_vec(),
                    });
                    let path = uri.path().to_string();
                    if path == "/hang" {
                        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                    }
                    use axum::response::IntoResponse;
                    if path == "/huge" {
                        return (axum::http::StatusCode::OK, vec![b'x'; 20 * 1024 * 1024])
                            .into_response();
                    }
                    // `/redirect?to=<url>`: a 302 to anywhere (a redirect
                    // followed would leave the connector's allowed hosts).
                    if path == "/redirect" {
                        let to = uri
                            .query()
                            .and_then(|q| q.strip_prefix("to="))
                            .unwrap_or("/")
                            .to_string();
                        return (
                            axum::http::StatusCode::FOUND,
                            [(axum::http::header::LOCATION, to)],
                            b"{}".to_vec(),
                        )
                            .into_response();
                    }
                    if let Some(code) = path.strip_prefix("/status/") {
                        let code = code.parse().unwrap_or(500);
                        return (
                            axum::http::StatusCode::from_u16(code).unwrap(),
                            b"{\"error\":\"as asked\"}".to_vec(),
                        )
                            .into_response();
                    }
                    (axum::http::StatusCode::OK, b"{\"id\":\"ext-1\"}".to_vec()).into_response()
                }
            },
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        Self { base, requests }
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn all(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// A runtime over real sockets with the given config.
pub fn runtime(config: RuntimeConfig) -> Runtime {
    Runtime::new(config, Arc::new(ReqwestTransport::new().unwrap())).unwrap()
}

/// A call context with a static token and in-memory stores.
pub fn context(token: &str, settings: &[(&str, &str)]) -> CallContext {
    CallContext {
        connection: ConnectionInfo {
            connection_id: "conn-1".into(),
            tenant_id: "acme".into(),
            external_tenant_id: None,
            external_tenant_name: None,
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
        credentials: Arc::new(StaticCredentials(token.into())),
        mappings: Arc::new(MemoryMappings::default()),
        kv: Arc::new(MemoryKv::default()),
        rate: None,
    }
}

/// The sample invoice with another number (the hostile connector's switch).
pub fn invoice(number: &str) -> ledgerport::runtime::v0_1::ledgerport::connector::types::Document {
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/documents/invoice.json"),
    )
    .unwrap();
    let mut d = ledgerport::document::Document::from_json(&bytes)
        .unwrap()
        .to_wit()
        .unwrap();
    d.number = number.to_string();
    d
}

pub fn delivery(key: &str) -> ledgerport::runtime::v0_1::ledgerport::connector::types::Delivery {
    ledgerport::runtime::v0_1::ledgerport::connector::types::Delivery {
        key: key.into(),
        attempt: 1,
    }
}
