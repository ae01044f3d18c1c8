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

/// mimalloc instead of glibc malloc: a connector call allocates and frees
/// many small strings (lowering, capability records); glibc's malloc and
/// free were 12 % of a call in the B1 profile, mimalloc's are 6 %. Built
/// without transparent huge pages (`no_thp`): with them an idle daemon held
/// 109 MiB instead of 50 (B5), and freed pages came back as 2 MiB pages
/// zeroed by the kernel.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Map a line kind to an account: KIND=CODE or KIND=CODE:TAXTYPE (repeatable).
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
        /// The signers whose plugins it runs.
        #[command(flatten)]
        trust: ledgerport::connections::cli::TrustArgs,
    },
    /// Run the demo on embedded defaults: the Xero simulator, an SMTP sink
    /// and a daemon on SQLite; connect, map, issue, and show what happened.
    Demo {
        /// Exit after the summary instead of serving until Ctrl-C.
        #[arg(long)]
        exit: bool,
        /// Port for the daemon (0: any free port).
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Run the daemon.
    Serve {
        /// The configuration file (TOML); `LEDGERPORT_*` variables override it.
        #[arg(long, short, env = "LEDGERPORT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Hand one document to ledgerport, as the platform would.
    Issue {
        /// The document (platform JSON).
        #[arg(long)]
        file: PathBuf,
        /// The configuration file.
        #[arg(long, short, env = "LEDGERPORT_CONFIG")]
        config: Option<PathBuf>,
        /// The database (overrides the config's `database`).
        #[arg(long)]
        database: Option<String>,
    },
    /// Create or upgrade the database schema.
    Migrate {
        /// The configuration file.
        #[arg(long, short, env = "LEDGERPORT_CONFIG")]
        config: Option<PathBuf>,
        /// The database (overrides the config's `database`).
        #[arg(long)]
        database: Option<String>,
    },
    /// What support asks for about one tenant: connection states, recent
    /// errors as the accounting system worded them, documents that did not
    /// sync. No secrets.
    SupportReport {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The configuration file.
        #[arg(long, short, env = "LEDGERPORT_CONFIG")]
        config: Option<PathBuf>,
        /// The database (overrides the config's `database`).
        #[arg(long)]
        database: Option<String>,
    },
    /// The delivery log.
    Deliveries {
        #[command(subcommand)]
        command: DeliveriesCommand,
    },
    /// The notices that tell a customer's admins a document could not be
    /// sent: list them, and send again those given up.
    Mail {
        #[command(subcommand)]
        command: MailCommand,
    },
    #[command(flatten)]
    Connections(ledgerport::connections::cli::ConnectionsCommand),
}

#[derive(Subcommand)]
enum MailCommand {
    /// List notices, newest first, with their state and the SMTP server's
    /// last answer.
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this state (unsent, given-up, sent).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(ledgerport::store::mail::state::ALL))]
        state: Option<String>,
        /// At most this many (1 to 10,000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        /// The configuration file.
        #[arg(long, short, env = "LEDGERPORT_CONFIG")]
        config: Option<PathBuf>,
        /// The database (overrides the config's `database`).
        #[arg(long)]
        database: Option<String>,
    },
    /// Send again the notices given up (the SMTP server refused them for
    /// about a day), once what was wrong is fixed: all, one tenant's, or
    /// one by id. The running daemon sends them at its next round.
    Retry {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this notice (its id, from `mail list`).
        #[arg(long)]
        id: Option<String>,
        /// The configuration file.
        #[arg(long, short, env = "LEDGERPORT_CONFIG")]
        config: Option<PathBuf>,
        /// The database (overrides the config's `database`).
        #[arg(long)]
        database: Option<String>,
    },
}

#[derive(Subcommand)]
enum DeliveriesCommand {
    /// List deliveries, newest first.
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this document number.
        #[arg(long)]
        number: Option<String>,
        /// Only this state (pending, working, delivered, failed, paused).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(ledgerport::store::outbox::state::ALL))]
        state: Option<String>,
        /// At most this many (1 to 10,000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        /// The configuration file.
        #[arg(long, short, env = "LEDGERPORT_CONFIG")]
        config: Option<PathBuf>,
        /// The database (overrides the config's `database`).
        #[arg(long)]
        database: Option<String>,
    },
    /// Retention: drop what documents delivered everywhere no longer need
    /// (their bodies with the PDFs, their attempts), sent mails and closed
    /// incidents, older than the given number of days. Rows, numbers and
    /// the delivery log's lines stay; anything not yet delivered stays.
    Purge {
        /// Older than this many days (at least 1).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        older_than_days: u32,
        /// The configuration file.
        #[arg(long, short, env = "LEDGERPORT_CONFIG")]
        config: Option<PathBuf>,
        /// The database (overrides the config's `database`).
        #[arg(long)]
        database: Option<String>,
    },
    /// Documents a connection missed: issued while it was disconnected,
    /// stored but never sent to it (reconnecting does not send them by
    /// itself). With --send, send them (all, or those named by --document).
    Missed {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The connector.
        #[arg(long, default_value = "xero")]
        connector: String,
        /// Send them now (the connection must be connected).
        #[arg(long)]
        send: bool,
        /// With --send: only this document (its id); repeat for more.
        #[arg(long = "document", requires = "send")]
        documents: Vec<String>,
        /// List at most this many (1 to 10,000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        /// The configuration file.
        #[arg(long, short, env = "LEDGERPORT_CONFIG")]
        config: Option<PathBuf>,
        /// The database (overrides the config's `database`).
        #[arg(long)]
        database: Option<String>,
    },
    /// Retry one failed delivery, or all of a tenant's.
    Retry {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// One delivery id (default: all failed).
        #[arg(long)]
        id: Option<String>,
        /// The configuration file.
        #[arg(long, short, env = "LEDGERPORT_CONFIG")]
        config: Option<PathBuf>,
        /// The database (overrides the config's `database`).
        #[arg(long)]
        database: Option<String>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Make an Ed25519 signing key: the secret goes to a file, the public
    /// key (for operators' `trusted_keys`) is printed.
    Keygen {
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign an installed plugin's manifest (covers the component's hash).
    Sign {
        /// The installed manifest.
        manifest: PathBuf,
        /// The secret key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify an installed plugin's signature against trusted public keys.
    Verify {
        /// The installed manifest.
        manifest: PathBuf,
        /// A trusted public key, base64 (repeatable).
        #[arg(long = "trusted", required = true)]
        trusted: Vec<String>,
    },
    /// Start a new connector crate (manifest, connector, passing test).
    New {
        /// The connector's name (becomes its plugin id).
        name: String,
        /// Where to create it.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Path to the `ledgerport-sdk` crate (default: plugins/sdk here, or
        /// the one this binary was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// List the plugins installed in a directory and whether they load.
    List {
        /// The plugin directory.
        #[arg(long, default_value = "target/plugins")]
        dir: PathBuf,
    },
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
        /// The plugin directory (the default is the daemon's and `plugin
        /// list`'s, so what is installed without `--dir` is what they load).
        #[arg(long, default_value = "target/plugins")]
        dir: PathBuf,
    },
}

/// Whether logs are JSON: `serve` reads its config's `json_logs` (which
/// LEDGERPORT_JSON_LOGS overrides); other commands read only the variable.
/// A config that does not load is reported by the command itself.
fn json_logs(command: &Command) -> bool {
    if let Command::Serve { config } = command
        && let Ok(cfg) = ledgerport::daemon::Config::load(config.as_deref())
    {
        return cfg.json_logs;
    }
    std::env::var("LEDGERPORT_JSON_LOGS").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LEDGERPORT_LOG")
        .unwrap_or_else(|_| default_level.into());
    // Structured JSON logs (one object per line, with the delivery span's
    // fields) when `serve`'s config says `json_logs = true` or
    // LEDGERPORT_JSON_LOGS is 1, true or yes (the config's own rule).
    if json_logs(&cli.command) {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
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
    runtime_trusting(Vec::new())
}

/// A runtime that loads only plugins signed by one of `trusted_keys` (any
/// plugin when there are none).
fn runtime_trusting(trusted_keys: Vec<String>) -> anyhow::Result<Runtime> {
    Runtime::new(
        RuntimeConfig {
            trusted_keys,
            ..RuntimeConfig::default()
        },
        Arc::new(ReqwestTransport::new()?),
    )
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Plugin { command } => match command {
            PluginCommand::Check { manifest } => plugin_check(manifest, cli.json).await,
            PluginCommand::List { dir } => plugin_list(dir, cli.json).await,
            PluginCommand::Keygen { out } => {
                if out.exists() {
                    eprintln!("error: {} exists; not overwritten", out.display());
                    return ExitCode::from(2);
                }
                let (secret, public) = ledgerport::signing::generate();
                if let Err(e) = write_private(&out, format!("{secret}\n").as_bytes()) {
                    eprintln!("error: cannot write {}: {e}", out.display());
                    return ExitCode::from(2);
                }
                println!("secret key written to {} (keep it private)", out.display());
                println!("public key: {public}");
                ExitCode::SUCCESS
            }
            PluginCommand::Sign { manifest, key } => {
                let r = (|| -> Result<String, String> {
                    let mut m = ledgerport::manifest::Manifest::from_file(&manifest)
                        .map_err(|e| e.to_string())?;
                    if m.sha256.is_none() {
                        return Err("sha256: install the plugin first (`plugin install`), then sign the installed manifest".into());
                    }
                    let secret = std::fs::read_to_string(&key)
                        .map_err(|e| format!("key: cannot read {}: {e}", key.display()))?;
                    ledgerport::signing::sign(&mut m, &secret)?;
                    let text = toml::to_string(&m).map_err(|e| e.to_string())?;
                    std::fs::write(&manifest, text).map_err(|e| e.to_string())?;
                    Ok(m.signed_by.unwrap_or_default())
                })();
                match r {
                    Ok(by) => {
                        println!("signed {} (signer {by})", manifest.display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            PluginCommand::Verify { manifest, trusted } => {
                match ledgerport::manifest::Manifest::from_file(&manifest)
                    .map_err(|e| e.to_string())
                    .and_then(|m| ledgerport::signing::verify(&m, &trusted))
                {
                    Ok(()) => {
                        println!("signature ok");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("refused: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            PluginCommand::New { name, dir, sdk } => {
                let sdk = sdk.unwrap_or_else(|| {
                    let here = PathBuf::from("plugins/sdk");
                    if here.join("Cargo.toml").exists() {
                        here
                    } else {
                        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/sdk"))
                    }
                });
                match ledgerport::scaffold::new_connector(&name, &dir, &sdk) {
                    Ok(root) => {
                        println!("created {}", root.display());
                        println!(
                            "  cd {} && cargo test && cargo build --target wasm32-wasip2 --release",
                            root.display()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        ExitCode::from(2)
                    }
                }
            }
            PluginCommand::Install {
                manifest,
                component,
                dir,
            } => install(&manifest, &component, &dir, cli.json).await,
        },
        Command::Deliver {
            plugin,
            document,
            base_urls,
            settings,
            maps,
            token,
            key,
            trust,
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
                plugin,
                document,
                base_urls,
                settings,
                maps,
                token,
                key,
                trust.keys(),
                cli.json,
            )
            .await
        }
        Command::Connections(c) => ledgerport::connections::cli::run(c, cli.json).await,
        Command::Serve { config } => serve(config).await,
        Command::Issue {
            file,
            config,
            database,
        } => issue(file, config, database, cli.json).await,
        Command::Deliveries { command } => deliveries(command, cli.json).await,
        Command::Mail { command } => mail(command, cli.json).await,
        Command::Migrate { config, database } => {
            let cfg = match load_config(config, database) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match ledgerport::store::Store::open_and_migrate(&cfg.database).await {
                Ok(_) => {
                    println!("database is up to date");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(3)
                }
            }
        }
        Command::SupportReport {
            tenant,
            config,
            database,
        } => support_report(tenant, config, database, cli.json).await,
        Command::Demo { exit, port } => match ledgerport::demo::run(exit, port).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo failed: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

/// `plugin install`: the connector is installed and checked in a staging
/// directory beside the installed ones (which the daemon does not load:
/// it has no manifest at its top), and only a connector that passes is
/// moved into place, by renaming, so the checked bytes are the installed
/// ones and a refused upgrade leaves the installed version as it was.
async fn install(
    manifest: &std::path::Path,
    component: &std::path::Path,
    dir: &std::path::Path,
    json: bool,
) -> ExitCode {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    remove_stale_staging(dir);
    let staging = dir.join(format!(".staging-{}-{nanos}", std::process::id()));
    let code = match ledgerport::plugin_store::install(manifest, component, &staging) {
        Ok(path) => match plugin_check(path.clone(), json).await {
            c if c == ExitCode::SUCCESS => match commit_install(&path, dir) {
                Ok(installed) => {
                    if !json {
                        println!("installed {}", installed.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(3)
                }
            },
            c => {
                eprintln!("not installed");
                c
            }
        },
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    };
    let _ = std::fs::remove_dir_all(&staging);
    code
}

/// Staging directories an interrupted `plugin install` left in `dir` (the
/// daemon ignores them), removed once they are an hour old: younger ones
/// may belong to an install still running.
fn remove_stale_staging(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(3600));
        if stale && e.file_name().to_string_lossy().starts_with(".staging-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Move a checked, staged plugin (`<staging>/<id>/manifest.toml`) to
/// `dir/<id>`: the installed version is moved aside first and removed
/// after. Returns the installed manifest's path.
fn commit_install(
    staged_manifest: &std::path::Path,
    dir: &std::path::Path,
) -> Result<PathBuf, String> {
    let staged = staged_manifest
        .parent()
        .ok_or("the staged plugin has no directory")?;
    let staging = staged
        .parent()
        .ok_or("the staged plugin has no staging directory")?;
    let id = staged.file_name().ok_or("the staged plugin has no id")?;
    let target = dir.join(id);
    let old = staging.join(".replaced");
    if target.exists() {
        std::fs::rename(&target, &old)
            .map_err(|e| format!("cannot move {} aside: {e}", target.display()))?;
    }
    if let Err(e) = std::fs::rename(staged, &target) {
        // Put the installed version back.
        let _ = std::fs::rename(&old, &target);
        return Err(format!("cannot install into {}: {e}", target.display()));
    }
    Ok(target.join("manifest.toml"))
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
            // The connector's own account of itself must agree with its
            // manifest: the host routes by the manifest, the connector acts
            // on what it believes it is.
            let info = match describe(&rt, &p).await {
                Ok(info) => info,
                Err(e) => {
                    if json {
                        println!("{}", serde_json::json!({"ok": false, "error": e}));
                    } else {
                        eprintln!("refused: {e}");
                    }
                    return ExitCode::from(2);
                }
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "manifest": m, "sha256": p.sha256(), "describe": info})
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
                println!(
                    "  describe()     {} version {}, documents {}",
                    info["name"].as_str().unwrap_or_default(),
                    info["version"].as_str().unwrap_or_default(),
                    m.document_kinds.join(", ")
                );
                println!(
                    "  signature      {}",
                    if m.signature.is_some() {
                        "signed (checked by a daemon with trusted_keys)"
                    } else {
                        "unsigned: a daemon with trusted_keys refuses it"
                    }
                );
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

/// Call the connector's `describe` (outside any connection) and check it
/// against the manifest: the same id and the same document kinds. The
/// answer as JSON, or why the plugin is refused.
async fn describe(
    rt: &Runtime,
    plugin: &ledgerport::runtime::Plugin,
) -> Result<serde_json::Value, String> {
    use ledgerport::runtime::v0_1::ledgerport::connector::types::DocumentKind;
    let m = plugin.manifest();
    let ctx = CallContext {
        connection: ConnectionInfo {
            connection_id: "plugin-check".into(),
            tenant_id: "plugin-check".into(),
            external_tenant_id: None,
            external_tenant_name: None,
            settings: BTreeMap::new(),
        },
        credentials: Arc::new(StaticCredentials(String::new())),
        mappings: Arc::new(MemoryMappings::default()),
        kv: Arc::new(MemoryKv::default()),
        rate: None,
    };
    let info = rt
        .describe(plugin, &ctx)
        .await
        .map_err(|e| format!("describe() failed: {e}"))?;
    if info.id != m.id {
        return Err(format!(
            "describe() says the connector is {:?} but the manifest's id is {:?}",
            info.id, m.id
        ));
    }
    let mut said: Vec<&str> = info
        .document_kinds
        .iter()
        .map(|k| match k {
            DocumentKind::Invoice => "invoice",
            DocumentKind::CreditNote => "credit-note",
        })
        .collect();
    said.sort_unstable();
    said.dedup();
    let mut declared: Vec<&str> = m.document_kinds.iter().map(String::as_str).collect();
    declared.sort_unstable();
    declared.dedup();
    if said != declared {
        return Err(format!(
            "describe() accepts documents [{}] but the manifest's document_kinds are [{}]",
            said.join(", "),
            declared.join(", ")
        ));
    }
    Ok(serde_json::json!({
        "id": info.id,
        "name": info.name,
        "version": info.version,
        "document_kinds": said,
    }))
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
    trusted_keys: Vec<String>,
    json: bool,
) -> ExitCode {
    let rt = match runtime_trusting(trusted_keys) {
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
    match rt
        .deliver_with(&p, &ctx, delivery, wit_doc, doc.extras())
        .await
    {
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

fn load_config(
    path: Option<PathBuf>,
    database: Option<String>,
) -> Result<ledgerport::daemon::Config, ExitCode> {
    let mut cfg = ledgerport::daemon::Config::load(path.as_deref()).map_err(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })?;
    if let Some(db) = database {
        cfg.database = db;
    }
    Ok(cfg)
}

async fn serve(config: Option<PathBuf>) -> ExitCode {
    let cfg = match load_config(config, None) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let daemon = match ledgerport::daemon::Daemon::start(
        cfg,
        ledgerport::connections::Clock::system(),
        None,
    )
    .await
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    // Starting may have compiled connectors in-process (an empty compiled-
    // component cache): give the compiler's freed memory back now rather
    // than whenever mimalloc next purges.
    // SAFETY: mi_collect takes no pointers and may be called at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
    eprintln!("ledgerport serving on http://{}", daemon.addr);
    wait_for_signal().await;
    eprintln!("shutting down: no new work is claimed; in-flight deliveries finish or are released");
    daemon.stop().await;
    ExitCode::SUCCESS
}

/// Ctrl-C or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn issue(
    file: PathBuf,
    config: Option<PathBuf>,
    database: Option<String>,
    json: bool,
) -> ExitCode {
    let cfg = match load_config(config, database) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let body: serde_json::Value = match std::fs::read(&file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| format!("{} is not JSON: {e}", file.display()))
        }) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // The daemon's catalogue, so that `issue` refuses what the ingest API
    // would (a line kind the platform does not have); read before the
    // database is opened, so a bad path changes nothing.
    let catalogue = match &cfg.catalogue {
        Some(path) => match ledgerport::connections::Catalogue::from_file(path) {
            Ok(c) => Some(c.keys()),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let store = match ledgerport::store::Store::open_and_migrate(&cfg.database).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(3);
        }
    };
    let state = ledgerport::api::ApiState {
        store,
        service_key_hashes: Vec::new(),
        catalogue,
        // What each installed connector takes, as the daemon would: a
        // credit note makes no delivery to an invoice-only connector.
        kinds: ledgerport::manifest::document_kinds_in(&cfg.plugin_dir),
        on_ingest: Box::new(|| {}),
    };
    let resp = ledgerport::api::ingest_json(&state, &body).await;
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if json {
        println!("{v}");
    } else if status.is_success() {
        if v["existing"] == true {
            println!(
                "{} was already issued (nothing changed)",
                v["number"].as_str().unwrap_or("?")
            );
        } else {
            println!(
                "stored {}: {} delivery(ies) queued{}",
                v["number"].as_str().unwrap_or("?"),
                v["deliveries"],
                v["note"]
                    .as_str()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            );
        }
    } else {
        eprintln!("refused: {}", v["error"].as_str().unwrap_or("error"));
        for p in v["problems"].as_array().cloned().unwrap_or_default() {
            eprintln!(
                "  {}: {}",
                p["field"].as_str().unwrap_or(""),
                p["message"].as_str().unwrap_or("")
            );
        }
    }
    match status.as_u16() {
        200..=299 => ExitCode::SUCCESS,
        400..=499 => ExitCode::from(2),
        _ => ExitCode::from(3),
    }
}

async fn deliveries(cmd: DeliveriesCommand, json: bool) -> ExitCode {
    let (config, database) = match &cmd {
        DeliveriesCommand::List {
            config, database, ..
        }
        | DeliveriesCommand::Retry {
            config, database, ..
        }
        | DeliveriesCommand::Missed {
            config, database, ..
        }
        | DeliveriesCommand::Purge {
            config, database, ..
        } => (config.clone(), database.clone()),
    };
    let cfg = match load_config(config, database) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The delivery log of a database that exists, on this version's schema:
    // neither created (a mistyped path read as "no deliveries") nor migrated.
    let store = match ledgerport::store::Store::open_existing(&cfg.database).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(3);
        }
    };
    match cmd {
        DeliveriesCommand::List {
            tenant,
            number,
            state,
            limit,
            ..
        } => match store
            .list_deliveries(
                tenant.as_deref(),
                number.as_deref(),
                state.as_deref(),
                limit,
            )
            .await
        {
            Ok(rows) => {
                if json {
                    println!("{}", serde_json::json!({ "deliveries": rows }));
                } else {
                    for r in &rows {
                        // The id first: what `deliveries retry --id` takes.
                        println!(
                            "{} {:<10} {:<22} {:<10} {:<10} attempts {:<2} {}",
                            r.id,
                            r.tenant_id,
                            r.document_number,
                            r.connector_id,
                            r.state,
                            r.attempts,
                            r.external_id
                                .clone()
                                .or(r.last_error.clone())
                                .unwrap_or_default()
                        );
                    }
                    if rows.is_empty() {
                        println!("no deliveries");
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(3)
            }
        },
        DeliveriesCommand::Purge {
            older_than_days, ..
        } => {
            let before = ledgerport::dispatch::now_ms() - i64::from(older_than_days) * 86_400_000;
            match store.purge_delivered(before).await {
                Ok(r) => {
                    let _ = store
                        .audit(
                            &cli_actor(),
                            None,
                            "purge",
                            &format!(
                                "older than {older_than_days} days: {} bodies, {} attempts, {} mails, {} incidents",
                                r.bodies, r.attempts, r.mails, r.incidents
                            ),
                            chrono::Utc::now().timestamp(),
                        )
                        .await;
                    if json {
                        println!("{}", serde_json::json!(r));
                    } else {
                        println!(
                            "removed {} document bodies, {} attempts, {} sent mails, {} closed incidents older than {older_than_days} days",
                            r.bodies, r.attempts, r.mails, r.incidents
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(3)
                }
            }
        }
        DeliveriesCommand::Missed {
            tenant,
            connector,
            send,
            documents,
            limit,
            ..
        } => {
            if let Err(code) = known_tenant(&store, &tenant).await {
                return code;
            }
            let Some(kinds) =
                ledgerport::manifest::document_kinds_in(&cfg.plugin_dir).remove(&connector)
            else {
                eprintln!(
                    "error: connector: {connector:?} is not installed in {}",
                    cfg.plugin_dir.display()
                );
                return ExitCode::from(2);
            };
            let conn = match store.connection_for(&tenant, &connector).await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    eprintln!(
                        "error: connector: tenant {tenant:?} never connected {connector:?}, so it missed nothing"
                    );
                    return ExitCode::from(2);
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(3);
                }
            };
            if !send {
                let (too_old, old_docs) = match store.missed_too_old(&conn.id, &kinds, limit).await
                {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(3);
                    }
                };
                return match store.missed_documents(&conn.id, &kinds, limit).await {
                    Ok((count, docs)) => {
                        if json {
                            println!(
                                "{}",
                                serde_json::json!({ "count": count, "documents": docs, "too_old": too_old, "too_old_documents": old_docs })
                            );
                        } else {
                            println!(
                                "{count} document(s) issued while {connector} was disconnected, never sent to it"
                            );
                            if too_old > 0 {
                                println!(
                                    "{too_old} other(s) issued while {connector} was disconnected cannot be sent any more: their content was removed by retention (retention.delivered_days){}",
                                    if old_docs.is_empty() { "" } else { ":" }
                                );
                                for d in &old_docs {
                                    println!(
                                        "  {:<24} {:<16} {:<12} (content removed)",
                                        d.id, d.number, d.kind
                                    );
                                }
                            }
                            for d in &docs {
                                println!(
                                    "  {:<24} {:<16} {:<12} received {}",
                                    d.id,
                                    d.number,
                                    d.kind,
                                    chrono::DateTime::from_timestamp_millis(d.received_at)
                                        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                                        .unwrap_or_default()
                                );
                            }
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(3)
                    }
                };
            }
            if documents.len() > ledgerport::store::missed::SEND_IDS_MAX {
                eprintln!(
                    "error: document: {} named; at most {} at once (leave --document out to send them all)",
                    documents.len(),
                    ledgerport::store::missed::SEND_IDS_MAX
                );
                return ExitCode::from(2);
            }
            let ids = (!documents.is_empty()).then_some(documents.as_slice());
            match store
                .send_missed(&conn.id, &kinds, ids, ledgerport::dispatch::now_ms())
                .await
            {
                Ok(r) if !r.not_missed.is_empty() => {
                    for id in &r.not_missed {
                        eprintln!(
                            "error: document: {id:?} is not a document {connector} missed (not the tenant's, sent to it already, of a kind it does not take, issued before it was first disconnected, or too old to send)"
                        );
                    }
                    eprintln!("nothing was sent");
                    ExitCode::from(2)
                }
                Ok(r) => {
                    let _ = store
                        .audit(
                            &cli_actor(),
                            Some(&tenant),
                            "send-missed",
                            &format!("{} document(s) to {connector}", r.queued),
                            chrono::Utc::now().timestamp(),
                        )
                        .await;
                    if json {
                        println!("{}", serde_json::json!({ "queued": r.queued }));
                    } else {
                        println!("{} document(s) queued for {connector}", r.queued);
                    }
                    ExitCode::SUCCESS
                }
                Err(ledgerport::store::StoreError::Conflict(m)) => {
                    eprintln!("error: connector: {m}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(3)
                }
            }
        }
        DeliveriesCommand::Retry { tenant, id, .. } => {
            // A mistyped tenant is an error, not "0 queued again".
            if let Err(code) = known_tenant(&store, &tenant).await {
                return code;
            }
            match store
                .retry_failed(&tenant, id.as_deref(), ledgerport::dispatch::now_ms())
                .await
            {
                Ok(n) => {
                    if n > 0 {
                        // Audited as the API's retries are.
                        let _ = store
                            .audit(
                                &cli_actor(),
                                Some(&tenant),
                                "retry",
                                &format!(
                                    "{n} delivery(ies){}",
                                    id.as_deref().map(|i| format!(" ({i})")).unwrap_or_default()
                                ),
                                chrono::Utc::now().timestamp(),
                            )
                            .await;
                    }
                    if json {
                        println!("{}", serde_json::json!({ "requeued": n }));
                    } else {
                        println!("{n} delivery(ies) queued again");
                    }
                    if let (0, Some(id)) = (n, id.as_deref()) {
                        // Say why: no such delivery, or not a failed one.
                        let why = match store.delivery_state(&tenant, id).await {
                            Ok(None) => format!("id: tenant {tenant:?} has no delivery {id:?}"),
                            Ok(Some(state)) => format!(
                                "id: delivery {id:?} is {state}, not failed: only failed deliveries are retried"
                            ),
                            Err(e) => e.to_string(),
                        };
                        eprintln!("error: {why}");
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(3)
                }
            }
        }
    }
}

/// A time for people (UTC, to the second), from Unix milliseconds.
fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// `ledgerport mail list|retry`.
async fn mail(cmd: MailCommand, json: bool) -> ExitCode {
    let (MailCommand::List {
        config, database, ..
    }
    | MailCommand::Retry {
        config, database, ..
    }) = &cmd;
    let cfg = match load_config(config.clone(), database.clone()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store = match ledgerport::store::Store::open_existing(&cfg.database).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(3);
        }
    };
    let tenant = match &cmd {
        MailCommand::List { tenant, .. } | MailCommand::Retry { tenant, .. } => tenant.clone(),
    };
    // A mistyped tenant is an error, not "no notices".
    if let Some(t) = &tenant
        && let Err(code) = known_tenant(&store, t).await
    {
        return code;
    }
    match cmd {
        MailCommand::List { state, limit, .. } => {
            match store
                .mail_list(tenant.as_deref(), state.as_deref(), limit)
                .await
            {
                Ok(rows) => {
                    if json {
                        println!("{}", serde_json::json!({ "mail": rows }));
                    } else {
                        for m in &rows {
                            let detail = match m.state {
                                ledgerport::store::mail::state::SENT => {
                                    format!("sent {}", when(m.sent_at.unwrap_or_default()))
                                }
                                _ => {
                                    let next = m
                                        .next_attempt_at
                                        .map(|t| format!("next try {}; ", when(t)))
                                        .unwrap_or_default();
                                    format!("{next}{}", m.last_error.as_deref().unwrap_or(""))
                                }
                            };
                            // The id first: what `mail retry --id` takes.
                            println!(
                                "{} {} {:<10} {:<8} attempts {:<3} to {} | {} | {}",
                                m.id,
                                when(m.created_at),
                                m.tenant_id,
                                m.state,
                                m.attempts,
                                m.recipients.join(", "),
                                m.subject,
                                detail
                            );
                        }
                        if rows.is_empty() {
                            println!("no notices");
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(3)
                }
            }
        }
        MailCommand::Retry { id, .. } => {
            let now = ledgerport::dispatch::now_ms();
            match store
                .retry_given_up_mail(tenant.as_deref(), id.as_deref(), now)
                .await
            {
                Ok(Ok(tenants)) => {
                    let n = tenants.len();
                    // Audited under each tenant whose notices went back, so
                    // each tenant's own log shows it.
                    let mut per_tenant = std::collections::BTreeMap::<String, usize>::new();
                    for t in tenants {
                        *per_tenant.entry(t).or_default() += 1;
                    }
                    for (t, k) in &per_tenant {
                        let _ = store
                            .audit(
                                &cli_actor(),
                                Some(t),
                                "mail-retry",
                                &format!(
                                    "{k} given-up notice(s){}",
                                    id.as_deref().map(|i| format!(" ({i})")).unwrap_or_default()
                                ),
                                chrono::Utc::now().timestamp(),
                            )
                            .await;
                    }
                    if json {
                        println!("{}", serde_json::json!({ "requeued": n }));
                    } else {
                        println!(
                            "{n} given-up notice(s) queued again (the daemon sends them at its next round)"
                        );
                    }
                    ExitCode::SUCCESS
                }
                Ok(Err(why)) => {
                    let id = id.unwrap_or_default();
                    match why {
                        ledgerport::store::mail::NotRetried::Unknown => {
                            eprintln!(
                                "error: id: no notice {id:?}{}",
                                tenant
                                    .map(|t| format!(" of tenant {t:?}"))
                                    .unwrap_or_default()
                            );
                            ExitCode::from(1)
                        }
                        ledgerport::store::mail::NotRetried::NotGivenUp(m) => {
                            let state = match m.next_attempt_at {
                                Some(t) => format!(
                                    "not given up: the daemon tries it again by {} (or is sending it now)",
                                    when(t)
                                ),
                                None => format!(
                                    "not given up: it was sent at {}",
                                    when(m.sent_at.unwrap_or_default())
                                ),
                            };
                            eprintln!(
                                "error: id: notice {id:?} is {state}; only given-up notices are retried"
                            );
                            ExitCode::from(1)
                        }
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(3)
                }
            }
        }
    }
}

/// The tenant `id`, or the exit code of its refusal, said on stderr: 2
/// naming `tenant` when there is none, 3 when the database did not answer.
async fn known_tenant(
    store: &ledgerport::store::Store,
    id: &str,
) -> Result<ledgerport::store::Tenant, ExitCode> {
    match store.tenant(id).await {
        Ok(Some(t)) => Ok(t),
        Ok(None) => {
            eprintln!("error: tenant: unknown tenant {id:?}");
            Err(ExitCode::from(2))
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(3))
        }
    }
}

/// Who a CLI change is audited as: the operating system's user.
fn cli_actor() -> String {
    match std::env::var("USER") {
        Ok(u) if !u.trim().is_empty() => format!("{u} (cli)"),
        _ => "operator (cli)".into(),
    }
}

async fn plugin_list(dir: PathBuf, json: bool) -> ExitCode {
    let rt = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(3);
        }
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    };
    let mut out = Vec::new();
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path().join("manifest.toml"))
        .filter(|p| p.exists())
        .collect();
    paths.sort();
    let mut all_ok = true;
    for p in paths {
        match rt.load(&p, &BTreeMap::new()) {
            Ok(pl) => out.push(serde_json::json!({"id": pl.manifest().id, "name": pl.manifest().name, "version": pl.manifest().version, "contract": pl.manifest().contract, "ok": true})),
            Err(e) => {
                all_ok = false;
                out.push(serde_json::json!({"manifest": p.display().to_string(), "ok": false, "error": e.to_string()}))
            }
        }
    }
    if json {
        println!("{}", serde_json::json!({ "plugins": out }));
    } else {
        for p in &out {
            if p["ok"] == true {
                println!(
                    "{:<10} {:<20} {:<8} contract {}",
                    p["id"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or(""),
                    p["version"].as_str().unwrap_or(""),
                    p["contract"].as_str().unwrap_or("")
                );
            } else {
                println!(
                    "refused    {}: {}",
                    p["manifest"].as_str().unwrap_or(""),
                    p["error"].as_str().unwrap_or("")
                );
            }
        }
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn support_report(
    tenant: String,
    config: Option<PathBuf>,
    database: Option<String>,
    json: bool,
) -> ExitCode {
    let cfg = match load_config(config, database) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store = match ledgerport::store::Store::open_existing(&cfg.database).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(3);
        }
    };
    let t = match known_tenant(&store, &tenant).await {
        Ok(t) => t,
        Err(code) => return code,
    };
    // A database error fails the report: "documents not synced: 0" read
    // from a database that could not answer would mislead support.
    let gathered = async {
        let conns = store.connections(Some(&tenant)).await?;
        let mut not_synced = Vec::new();
        for s in ["failed", "paused", "pending"] {
            not_synced.extend(
                store
                    .list_deliveries(Some(&tenant), None, Some(s), 200)
                    .await?,
            );
        }
        let mut errors = Vec::new();
        for d in not_synced.iter().take(20) {
            for a in store.list_attempts(&d.id).await? {
                if a.outcome != "delivered" && a.outcome != "waiting" {
                    errors.push(serde_json::json!({"document": d.document_number, "outcome": a.outcome, "message": a.message, "provider": a.details, "at_ms": a.finished_at}));
                }
            }
        }
        // Notices the tenant's admins have not received (yet, or at all).
        let mut unsent_mail = Vec::new();
        for s in [
            ledgerport::store::mail::state::GIVEN_UP,
            ledgerport::store::mail::state::UNSENT,
        ] {
            unsent_mail.extend(store.mail_list(Some(&tenant), Some(s), 20).await?);
        }
        Ok::<_, ledgerport::store::StoreError>((conns, not_synced, errors, unsent_mail))
    }
    .await;
    let (conns, not_synced, errors, unsent_mail) = match gathered {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(3);
        }
    };
    let report = serde_json::json!({
        "tenant": {"id": t.id, "name": t.name, "notice_addresses": t.emails},
        "connections": conns.iter().map(|c| serde_json::json!({"id": c.id, "connector": c.connector_id, "state": c.state, "organisation": c.external_tenant_name, "organisation_id": c.external_tenant_id, "connected_by": c.connected_by, "connected_at": c.connected_at, "reason": c.state_reason})).collect::<Vec<_>>(),
        "documents_not_synced": not_synced.iter().map(|d| serde_json::json!({"number": d.document_number, "kind": d.document_kind, "state": d.state, "reason": d.pause_reason, "last_error": d.last_error, "attempts": d.attempts})).collect::<Vec<_>>(),
        "recent_errors": errors,
        "notices_not_sent": unsent_mail.iter().map(|m| serde_json::json!({"id": m.id, "state": m.state, "subject": m.subject, "recipients": m.recipients, "attempts": m.attempts, "last_error": m.last_error, "created_at_ms": m.created_at})).collect::<Vec<_>>(),
    });
    if json {
        println!("{report}");
    } else {
        println!("support report for {} ({})", t.name, t.id);
        for c in &conns {
            println!(
                "  connection {} to {}: {} ({})",
                c.connector_id,
                c.external_tenant_name.clone().unwrap_or_default(),
                c.state,
                c.state_reason.clone().unwrap_or_default()
            );
        }
        println!("  documents not synced: {}", not_synced.len());
        for d in &not_synced {
            println!(
                "    {} {} {}: {}",
                d.document_number,
                d.state,
                d.pause_reason.clone().unwrap_or_default(),
                d.last_error.clone().unwrap_or_default()
            );
        }
        println!("  recent errors as the accounting system worded them:");
        for e in &errors {
            println!(
                "    {} {}: {}",
                e["document"].as_str().unwrap_or(""),
                e["outcome"].as_str().unwrap_or(""),
                e["provider"]
                    .as_str()
                    .or(e["message"].as_str())
                    .unwrap_or("")
            );
        }
        println!(
            "  notices not sent to the tenant's admins: {}{}",
            unsent_mail.len(),
            // At most 20 of each state are read: say so when that may not be all.
            if unsent_mail.len() >= 20 {
                " (the newest 20 of each state; `ledgerport mail list` shows all)"
            } else {
                ""
            }
        );
        for m in &unsent_mail {
            println!(
                "    {} {} \"{}\" to {}: {}",
                m.id,
                m.state,
                m.subject,
                m.recipients.join(", "),
                m.last_error.clone().unwrap_or_default()
            );
        }
    }
    ExitCode::SUCCESS
}

/// Create `path` readable by its owner only (a signing key), refusing to
/// follow or replace anything already there.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)?.write_all(bytes)
}
