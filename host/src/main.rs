//! The `ledgerport` command line: plugin checks and installs, one-off
//! deliveries for smoke tests, and the demo.
//!
//! Exit codes: 0 success, 1 a delivery or check failed, 2 bad input
//! (manifest, document, arguments), 3 internal error.

use clap::{Parser, Subcommand};
use ledgerport::capabilities::connection::ConnectionInfo;
use ledgerport::capabilities::http::{ReqwestTransport, StaticCredentials};
use ledgerport::capabilities::kv::MemoryKv;
use ledgerport::capabilities::mapping::{AccountMapping, MappingScope, MemoryMappings};
use ledgerport::runtime::{CallContext, Runtime, RuntimeConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "ledgerport",
    version,
    about = "Pushes issued invoices and credit notes into customers' accounting systems through sandboxed connectors"
)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with connector plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Run one delivery through a connector (smoke test).
    Deliver {
        /// The installed plugin's manifest.
        #[arg(long)]
        plugin: PathBuf,
        /// The document (platform JSON).
        #[arg(long)]
        document: PathBuf,
        /// Send an allowed origin elsewhere: ORIGIN=URL (repeatable).
        #[arg(long = "base-url", value_name = "ORIGIN=URL")]
        base_urls: Vec<String>,
        /// A connector setting: KEY=VALUE (repeatable).
        #[arg(long = "setting", value_name = "KEY=VALUE")]
        settings: Vec<String>,
        /// Map a line kind to an account: KIND=CODE[:TAXTYPE] (repeatable).
        #[arg(long = "map", value_name = "KIND=CODE")]
        maps: Vec<String>,
        /// Bearer token to inject (smoke tests only; read from this env var).
        #[arg(
            long,
            env = "LEDGERPORT_SMOKE_TOKEN",
            hide_env_values = true,
            default_value = "smoke-token"
        )]
        token: String,
        /// The delivery key.
        #[arg(long, default_value = "smoke-1")]
        key: String,
    },
    /// Run the demo: the example connector delivers the sample documents to
    /// a local endpoint, and what arrived is printed.
    Demo,
    #[command(flatten)]
    Connections(ledgerport::connections::cli::ConnectionsCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Load a plugin and print what it is, or why it is refused.
    Check {
        /// The installed plugin's manifest.
        manifest: PathBuf,
    },
    /// Install a built component with its manifest into a plugin directory.
    Install {
        /// The source manifest (without sha256).
        manifest: PathBuf,
        /// The built `.wasm` component.
        #[arg(long)]
        component: PathBuf,
        /// The plugin directory.
        #[arg(long, default_value = "plugins.d")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LEDGERPORT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    rt.block_on(run(cli))
}

fn parse_pairs(items: &[String], what: &str) -> Result<Vec<(String, String)>, String> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("{what} {s:?} must look like KEY=VALUE"))
        })
        .collect()
}

fn runtime() -> anyhow::Result<Runtime> {
    Runtime::new(RuntimeConfig::default(), Arc::new(ReqwestTransport::new()?))
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Plugin { command } => match command {
            PluginCommand::Check { manifest } => plugin_check(manifest, cli.json).await,
            PluginCommand::Install {
                manifest,
                component,
                dir,
            } => match ledgerport::plugin_store::install(&manifest, &component, &dir) {
                Ok(path) => {
                    println!("installed {}", path.display());
                    plugin_check(path, cli.json).await
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            },
        },
        Command::Deliver {
            plugin,
            document,
            base_urls,
            settings,
            maps,
            token,
            key,
        } => {
            let parsed = (|| {
                Ok::<_, String>((
                    parse_pairs(&base_urls, "--base-url")?,
                    parse_pairs(&settings, "--setting")?,
                    parse_pairs(&maps, "--map")?,
                ))
            })();
            let (base_urls, settings, maps) = match parsed {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            deliver(
                plugin, document, base_urls, settings, maps, token, key, cli.json,
            )
            .await
        }
        Command::Connections(c) => ledgerport::connections::cli::run(c, cli.json).await,
        Command::Demo => match ledgerport::demo::run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo failed: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

async fn plugin_check(manifest: PathBuf, json: bool) -> ExitCode {
    let rt = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(3);
        }
    };
    match rt.load(&manifest, &BTreeMap::new()) {
        Ok(p) => {
            let m = p.manifest();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "manifest": m, "sha256": p.sha256()})
                );
            } else {
                println!("{} ({}) version {}", m.name, m.id, m.version);
                println!("  contract       ledgerport:connector@{}", m.contract);
                println!("  component      {} (sha256 {})", m.component, p.sha256());
                println!("  allowed hosts  {}", m.allowed_hosts.join(", "));
                println!("  documents      {}", m.document_kinds.join(", "));
                println!(
                    "  limits         {} requests/minute, {} concurrent per connection",
                    m.limits.requests_per_minute, m.limits.concurrent_per_connection
                );
                if let Some(o) = &m.oauth {
                    println!("  oauth scopes   {}", o.scopes.join(" "));
                }
                println!("ok: the host will load this plugin");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "error": e.to_string()})
                );
            } else {
                eprintln!("refused: {e}");
            }
            ExitCode::from(2)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn deliver(
    plugin: PathBuf,
    document: PathBuf,
    base_urls: Vec<(String, String)>,
    settings: Vec<(String, String)>,
    maps: Vec<(String, String)>,
    token: String,
    key: String,
    json: bool,
) -> ExitCode {
    let rt = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(3);
        }
    };
    let overrides: BTreeMap<String, String> = base_urls.into_iter().collect();
    let p = match rt.load(&plugin, &overrides) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("refused: {e}");
            return ExitCode::from(2);
        }
    };
    let doc = match std::fs::read(&document)
        .map_err(|e| format!("cannot read {}: {e}", document.display()))
        .and_then(|b| ledgerport::document::Document::from_json(&b).map_err(|e| e.to_string()))
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let wit_doc = match doc.to_wit() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mappings = Arc::new(MemoryMappings::default());
    let scope = MappingScope {
        tenant_id: doc.tenant_id.clone(),
        connector_id: p.manifest().id.clone(),
    };
    for (kind, target) in maps {
        let (code, tax) = match target.split_once(':') {
            Some((c, t)) => (c.to_string(), Some(t.to_string())),
            None => (target, None),
        };
        mappings.set(
            &scope,
            AccountMapping {
                kind,
                account_code: code,
                tax_type: tax,
            },
        );
    }
    let ctx = CallContext {
        connection: ConnectionInfo {
            connection_id: "smoke".into(),
            tenant_id: doc.tenant_id.clone(),
            external_tenant_id: None,
            external_tenant_name: None,
            settings: settings.into_iter().collect(),
        },
        credentials: Arc::new(StaticCredentials(token)),
        mappings,
        kv: Arc::new(MemoryKv::default()),
        rate: None,
    };
    let delivery =
        ledgerport::runtime::v0_1::ledgerport::connector::types::Delivery { key, attempt: 1 };
    match rt.deliver(&p, &ctx, delivery, wit_doc).await {
        Ok(Ok(r)) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"outcome": "delivered", "external_id": r.external_id, "external_url": r.external_url, "notes": r.notes})
                );
            } else {
                println!("delivered {} as {}", doc.number, r.external_id);
                if let Some(u) = r.external_url {
                    println!("  {u}");
                }
                for n in r.notes {
                    println!("  note: {n}");
                }
            }
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"outcome": "failed", "error": e.to_string()})
                );
            } else {
                println!("not delivered: {e}");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("connector failed: {e}");
            ExitCode::from(1)
        }
    }
}
