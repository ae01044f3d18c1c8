//! `ledgerport demo`: a zero-setup run of the whole path a document takes,
//! on embedded defaults. It loads the installed example connector, starts a
//! local endpoint standing in for the customer's system, delivers the sample
//! invoice and credit note through the sandbox, and prints what arrived.

use crate::capabilities::connection::ConnectionInfo;
use crate::capabilities::http::{ReqwestTransport, StaticCredentials};
use crate::capabilities::kv::MemoryKv;
use crate::capabilities::mapping::MemoryMappings;
use crate::document::Document;
use crate::runtime::v0_1::ledgerport::connector::types::Delivery;
use crate::runtime::{CallContext, Runtime, RuntimeConfig};
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where installed plugins are looked for: `$LEDGERPORT_PLUGIN_DIR`, else
/// `target/plugins` (where `cargo xtask wasm` installs them).
pub fn plugin_dir() -> PathBuf {
    std::env::var_os("LEDGERPORT_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/plugins"))
}

/// Where the sample documents are: `$LEDGERPORT_EXAMPLES`, else `examples/documents`.
pub fn examples_dir() -> PathBuf {
    std::env::var_os("LEDGERPORT_EXAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("examples/documents"))
}

fn load_doc(path: &Path) -> anyhow::Result<Document> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Document::from_json(&bytes)?)
}

/// Run the demo.
pub async fn run() -> anyhow::Result<()> {
    let received: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    let r2 = received.clone();
    let app = axum::Router::new().fallback(
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let r2 = r2.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(|v| {
                        if v.starts_with("Bearer ") {
                            "Bearer <token>"
                        } else {
                            "other"
                        }
                    })
                    .unwrap_or("none")
                    .to_string();
                let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                let mut g = r2.lock().unwrap_or_else(|e| e.into_inner());
                g.push((auth, json));
                format!("{{\"id\":\"webhook-{}\"}}", g.len())
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let rt = Runtime::new(RuntimeConfig::default(), Arc::new(ReqwestTransport::new()?))?;
    let manifest = plugin_dir().join("minimal/manifest.toml");
    let overrides = BTreeMap::from([("https://hooks.example.com".to_string(), base.clone())]);
    let plugin = rt.load(&manifest, &overrides).with_context(|| {
        format!(
            "loading {} (build and install the connectors with `cargo xtask wasm`)",
            manifest.display()
        )
    })?;
    println!("ledgerport demo");
    println!(
        "  connector  {} {} (sha256 {}…)",
        plugin.manifest().name,
        plugin.manifest().version,
        &plugin.sha256()[..12]
    );
    println!("  endpoint   {base} (stands in for https://hooks.example.com)");
    let ctx = CallContext {
        connection: ConnectionInfo {
            connection_id: "demo".into(),
            tenant_id: "acme".into(),
            ..Default::default()
        },
        credentials: Arc::new(StaticCredentials("demo-access-token".into())),
        mappings: Arc::new(MemoryMappings::default()),
        kv: Arc::new(MemoryKv::default()),
        rate: None,
    };
    for file in ["invoice.json", "credit-note.json"] {
        let doc = load_doc(&examples_dir().join(file))?;
        let delivery = Delivery {
            key: format!("demo-{}", doc.id),
            attempt: 1,
        };
        let started = std::time::Instant::now();
        match rt.deliver(&plugin, &ctx, delivery, doc.to_wit()?).await {
            Ok(Ok(r)) => println!(
                "  delivered  {} {} {} -> {} in {:.1} ms",
                doc.number,
                doc.currency,
                doc.total,
                r.external_id,
                started.elapsed().as_secs_f64() * 1000.0
            ),
            Ok(Err(e)) => println!("  failed     {}: {e}", doc.number),
            Err(e) => println!("  crashed    {}: {e}", doc.number),
        }
    }
    let g = received.lock().unwrap_or_else(|e| e.into_inner());
    println!("\nthe endpoint received {} request(s):", g.len());
    for (auth, json) in g.iter() {
        println!(
            "  {} {} with {} lines, total {} (authorization: {auth}, injected by the host)",
            json["kind"].as_str().unwrap_or("?"),
            json["number"].as_str().unwrap_or("?"),
            json["lines"].as_array().map(|a| a.len()).unwrap_or(0),
            json["total"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}
