//! The command-line side of tenants, connections, mappings and keys:
//! `ledgerport tenant add|list`, `connect` (prints the authorization URL, or
//! connects at once a connector that needs no OAuth grant),
//! `mappings set|list|delete`, `settings get|set|unset` (connector settings
//! per connection, checked against the plugin's manifest) and `keys rotate`. `main.rs` flattens
//! [`ConnectionsCommand`] into its subcommands and calls [`run`].
//!
//! Exit codes: 0 success, 2 bad input or a refusal, 3 internal error.

use super::mappings::MappingError;
use super::{Catalogue, Clock, Connections};
use crate::capabilities::mapping::{AccountMapping, MappingScope};
use crate::crypto::{KEY_ENV, KEY_FILE_ENV, KeyRing, Secret, generate_key};
use crate::manifest::Manifest;
use crate::oauth::{OAuthApp, OAuthProvider, Providers};
use crate::store::Store;
use clap::{Args, Subcommand};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Where the database and the secret keys are.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// The database: a SQLite file path or a postgres:// URL. Commands that
    /// write create a missing SQLite file (and say so); those that only read,
    /// and `keys rotate`/`keys revoke`, need it to exist.
    #[arg(long, env = "LEDGERPORT_DATABASE", default_value = "ledgerport.db")]
    pub database: String,
    /// The key file (one base64 key per line, newest last); keys may also
    /// come from LEDGERPORT_SECRET_KEY.
    #[arg(long, env = KEY_FILE_ENV)]
    pub key_file: Option<PathBuf>,
}

/// The connector and how the app is registered with its provider.
#[derive(Args, Debug, Clone)]
pub struct ProviderArgs {
    /// The installed plugin's manifest (for OAuth endpoints, scopes and account checks).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// The OAuth client id.
    #[arg(long, env = "LEDGERPORT_OAUTH_CLIENT_ID")]
    pub client_id: Option<String>,
    /// The OAuth client secret.
    #[arg(long, env = "LEDGERPORT_OAUTH_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,
    /// Where the provider sends the admin back (the daemon's /oauth/callback).
    #[arg(long, env = "LEDGERPORT_OAUTH_REDIRECT_URI")]
    pub redirect_uri: Option<String>,
    /// Ask for the manifest's broad scopes (apps created before granular scopes).
    #[arg(long)]
    pub broad_scopes: bool,
    /// Send an allowed origin elsewhere: ORIGIN=URL (repeatable).
    #[arg(long = "base-url", value_name = "ORIGIN=URL")]
    pub base_urls: Vec<String>,
    /// The signers whose plugins this command runs.
    #[command(flatten)]
    pub trust: TrustArgs,
}

/// The signers a command that runs a `--plugin` trusts: the daemon reads
/// them from its config's `trusted_keys`, a command reads no config. The
/// manifest names the token endpoint the client secret goes to and the
/// hosts the connection's token is sent to, so an operator whose daemon
/// only loads signed connectors gives the same keys here.
#[derive(Args, Debug, Clone, Default)]
pub struct TrustArgs {
    /// Refuse a --plugin not signed by one of these Ed25519 public keys
    /// (base64; the daemon's `trusted_keys`). Repeatable;
    /// LEDGERPORT_TRUSTED_KEYS takes them comma-separated.
    #[arg(
        long = "trusted-key",
        value_name = "KEY",
        env = "LEDGERPORT_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    pub trusted_keys: Vec<String>,
}

impl TrustArgs {
    /// The keys, trimmed and otherwise as given: a blank key matches no
    /// signer, so it refuses every plugin (as a blank key in the daemon's
    /// `trusted_keys` does) rather than turning the check off.
    pub fn keys(&self) -> Vec<String> {
        self.trusted_keys
            .iter()
            .map(|k| k.trim().to_string())
            .collect()
    }

    /// Refuse `manifest` (read from `path`) unless one of the keys signed
    /// it; anything passes when none is given.
    pub fn check(&self, manifest: &Manifest, path: &Path) -> Result<(), String> {
        let keys = self.keys();
        if keys.is_empty() {
            return Ok(());
        }
        crate::signing::verify(manifest, &keys).map_err(|why| {
            format!(
                "plugin: {}: {why} (trusted keys from --trusted-key or LEDGERPORT_TRUSTED_KEYS)",
                path.display()
            )
        })
    }
}

/// Tenant subcommands.
#[derive(Subcommand, Debug)]
pub enum TenantCommand {
    /// Add a tenant or update its name and notice addresses.
    Add {
        /// The platform's id of the company.
        id: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// An address that receives integration notices (repeatable).
        #[arg(long = "email")]
        emails: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List tenants and their connections.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Mapping subcommands.
// Parsed once per command: boxing the larger variant would save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum MappingsCommand {
    /// Set (or replace) mappings: KIND=CODE or KIND=CODE:TAXTYPE (repeatable). Checked
    /// against the connected organisation's accounts when --plugin is given.
    Set {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The connector.
        #[arg(long, default_value = "xero")]
        connector: String,
        /// KIND=CODE or KIND=CODE:TAXTYPE.
        #[arg(required = true, value_name = "KIND=CODE[:TAXTYPE]")]
        mappings: Vec<String>,
        /// Replace every mapping of the tenant and connector with these.
        #[arg(long)]
        replace: bool,
        /// Who is changing them.
        #[arg(long, default_value = "cli")]
        actor: String,
        /// The catalogue of line-item kinds (default: the built-in sample).
        #[arg(long)]
        catalogue: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        provider: ProviderArgs,
    },
    /// List the mappings of a tenant and connector.
    List {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The connector.
        #[arg(long, default_value = "xero")]
        connector: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete the mapping of one kind.
    Delete {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The connector.
        #[arg(long, default_value = "xero")]
        connector: String,
        /// The line-item kind.
        kind: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Connector settings subcommands. The plugin's manifest says which keys
/// exist, which values are allowed and which are secrets.
#[derive(Subcommand, Debug)]
pub enum SettingsCommand {
    /// Show the connector's settings for a tenant (secrets only as "set" / "not set").
    Get {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The installed plugin's manifest.
        #[arg(long)]
        plugin: PathBuf,
        /// The signers whose manifests this command reads (it says which
        /// settings are secrets, shown only as set or not set).
        #[command(flatten)]
        trust: TrustArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Set settings: KEY=VALUE (repeatable; VALUE `-` reads the value from
    /// standard input, so a secret stays out of the process list). All are
    /// checked before any is stored.
    Set {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The installed plugin's manifest.
        #[arg(long)]
        plugin: PathBuf,
        /// The signers whose manifests this command reads (it says which
        /// settings are secrets, shown only as set or not set).
        #[command(flatten)]
        trust: TrustArgs,
        /// KEY=VALUE.
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
        /// Who is changing them.
        #[arg(long, default_value = "cli")]
        actor: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove stored settings (the manifest's defaults apply again).
    Unset {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The installed plugin's manifest.
        #[arg(long)]
        plugin: PathBuf,
        /// The signers whose manifests this command reads (it says which
        /// settings are secrets, shown only as set or not set).
        #[command(flatten)]
        trust: TrustArgs,
        /// The keys.
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
        /// Who is changing them.
        #[arg(long, default_value = "cli")]
        actor: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Key subcommands.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Add a new key to the key file and re-encrypt every stored secret under it.
    Rotate {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// The ring's keys (newest last) and which still protect stored secrets.
    Status {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Issue an API key (shown once; stored hashed).
    Issue {
        /// `ingest` (the platform backend), `operator` (everything), or
        /// `tenant` (one tenant's admin; needs --tenant).
        #[arg(long)]
        scope: String,
        /// The tenant of a tenant key.
        #[arg(long)]
        tenant: Option<String>,
        /// A label for people.
        #[arg(long, default_value = "")]
        label: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke an API key by id.
    Revoke {
        /// The key id (from `keys issue`).
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// The subcommands this module adds to `ledgerport`.
#[derive(Subcommand, Debug)]
pub enum ConnectionsCommand {
    /// Platform tenants (customer companies).
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Connect a tenant: for an OAuth connector, prints the URL to open in
    /// the admin's browser; for one without OAuth (the JSON webhook), checks
    /// the tenant's settings with the connector and connects at once.
    Connect {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// Who is connecting.
        #[arg(long)]
        admin: String,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        provider: ProviderArgs,
    },
    /// Account mappings.
    Mappings {
        #[command(subcommand)]
        command: MappingsCommand,
    },
    /// Connector settings of a tenant's connection.
    Settings {
        #[command(subcommand)]
        command: SettingsCommand,
    },
    /// Secret keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

/// A failure with its exit code.
struct Fail(u8, String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(3, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> Fail {
    Fail(2, msg.into())
}

/// Open the store for a command that writes: migrated, and created when
/// missing (said on stderr, so a mistyped `--database` is noticed).
async fn open(store: &StoreArgs) -> Result<(Store, KeyRing), Fail> {
    let keys = KeyRing::load(store.key_file.as_deref()).map_err(|e| bad(e.to_string()))?;
    let new_file = Store::sqlite_file(&store.database).filter(|f| !f.exists());
    let s = Store::open_and_migrate(&store.database).await?;
    if let Some(f) = new_file {
        eprintln!("note: created a new database {}", f.display());
    }
    Ok((s, keys))
}

/// Open the store for a command that only reads: it must exist and hold
/// this version's schema ([`Store::open_existing`]).
async fn open_read(store: &StoreArgs) -> Result<(Store, KeyRing), Fail> {
    let keys = KeyRing::load(store.key_file.as_deref()).map_err(|e| bad(e.to_string()))?;
    let s = Store::open_existing(&store.database).await?;
    Ok((s, keys))
}

fn parse_pairs(items: &[String]) -> Result<BTreeMap<String, String>, Fail> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| bad(format!("--base-url {s:?} must look like ORIGIN=URL")))
        })
        .collect()
}

/// The connections service for a CLI command: providers and (for account
/// checks) the plugin, when the arguments allow.
async fn service(
    store: Store,
    keys: KeyRing,
    p: Option<&ProviderArgs>,
    need_provider: bool,
) -> Result<Connections, Fail> {
    let mut providers = Providers::new();
    let mut plugin = None;
    if let Some(p) = p
        && let Some(path) = &p.plugin
    {
        let manifest = Manifest::from_file(path).map_err(|e| bad(e.to_string()))?;
        // Checked before anything of the manifest is used: its OAuth
        // endpoints as much as its component.
        p.trust.check(&manifest, path).map_err(bad)?;
        let base_urls = parse_pairs(&p.base_urls)?;
        // A connector without `[oauth]` has no provider, whatever the
        // OAuth variables of this host (set for Xero) say.
        if manifest.oauth.is_some()
            && let (Some(id), Some(redirect)) = (&p.client_id, &p.redirect_uri)
        {
            providers.insert(
                OAuthProvider::new(
                    &manifest,
                    OAuthApp {
                        client_id: id.clone(),
                        client_secret: p.client_secret.clone().map(Secret::new),
                        redirect_uri: redirect.clone(),
                        broad_scopes: p.broad_scopes,
                        base_urls: base_urls.clone(),
                        timeout: crate::oauth::TOKEN_REQUEST_TIMEOUT,
                    },
                )
                .map_err(|e| bad(e.to_string()))?,
            );
        } else if need_provider {
            return Err(bad(
                "client_id and redirect_uri: both are needed (--client-id / LEDGERPORT_OAUTH_CLIENT_ID, --redirect-uri / LEDGERPORT_OAUTH_REDIRECT_URI)",
            ));
        }
        plugin = Some((path.clone(), base_urls));
    } else if need_provider {
        return Err(bad("plugin: --plugin <manifest> is needed"));
    }
    let conns = Connections::new(store, Arc::new(keys), Arc::new(providers), Clock::system());
    if let Some((path, base_urls)) = plugin
        && !need_provider
    {
        let rt = crate::runtime::Runtime::new(
            crate::runtime::RuntimeConfig {
                trusted_keys: p.map(|p| p.trust.keys()).unwrap_or_default(),
                ..crate::runtime::RuntimeConfig::default()
            },
            Arc::new(crate::capabilities::http::ReqwestTransport::new()?),
        )?;
        let loaded = rt.load(&path, &base_urls).map_err(|e| bad(e.to_string()))?;
        conns.register_plugin(Arc::new(rt), Arc::new(loaded));
    }
    Ok(conns)
}

fn parse_mapping(s: &str) -> Result<AccountMapping, Fail> {
    let (kind, rest) = s
        .split_once('=')
        .ok_or_else(|| bad(format!("mapping {s:?} must look like KIND=CODE[:TAXTYPE]")))?;
    let (code, tax) = match rest.split_once(':') {
        Some((c, t)) => (c, Some(t.trim().to_string())),
        None => (rest, None),
    };
    Ok(AccountMapping {
        kind: kind.trim().to_string(),
        account_code: code.trim().to_string(),
        tax_type: tax,
    })
}

/// Append a key to the key file, creating it (mode 0600) if needed.
fn append_key(path: &Path, key: &str) -> Result<(), Fail> {
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| bad(format!("key file {}: {e}", path.display())))?;
    writeln!(
        f,
        "# added by `ledgerport keys rotate` at {}",
        chrono::Utc::now().to_rfc3339()
    )?;
    writeln!(f, "{key}")?;
    f.sync_all()?;
    Ok(())
}

async fn run_inner(cmd: ConnectionsCommand, json: bool) -> Result<(), Fail> {
    let now = chrono::Utc::now().timestamp();
    match cmd {
        ConnectionsCommand::Tenant { command } => match command {
            TenantCommand::Add {
                id,
                name,
                emails,
                store,
            } => {
                let (s, _) = open(&store).await?;
                let t = s
                    .upsert_tenant(&id, &name, &emails, now)
                    .await
                    .map_err(|e| match e {
                        crate::store::StoreError::Conflict(m) => bad(m),
                        e => Fail(3, e.to_string()),
                    })?;
                println!(
                    "tenant {} ({}), notices to: {}",
                    t.id,
                    t.name,
                    t.emails.join(", ")
                );
            }
            TenantCommand::List { store } => {
                let (s, _) = open_read(&store).await?;
                let tenants = s.tenants().await?;
                let conns = s.connections(None).await?;
                if json {
                    let v: Vec<serde_json::Value> = tenants
                        .iter()
                        .map(|t| {
                            serde_json::json!({
                                "id": t.id, "name": t.name, "emails": t.emails,
                                "connections": conns.iter().filter(|c| c.tenant_id == t.id).collect::<Vec<_>>(),
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    for t in &tenants {
                        println!("{}\t{}\t{}", t.id, t.name, t.emails.join(","));
                        for c in conns.iter().filter(|c| c.tenant_id == t.id) {
                            println!(
                                "  {} {} {} {} ({})",
                                c.connector_id,
                                c.id,
                                c.state,
                                c.external_tenant_name.as_deref().unwrap_or("-"),
                                c.external_tenant_id.as_deref().unwrap_or("-")
                            );
                        }
                    }
                }
            }
        },
        ConnectionsCommand::Connect {
            tenant,
            admin,
            store,
            provider,
        } => {
            let (s, keys) = open(&store).await?;
            let path = provider
                .plugin
                .clone()
                .ok_or_else(|| bad("plugin: --plugin <manifest> is needed"))?;
            let manifest = Manifest::from_file(&path).map_err(|e| bad(e.to_string()))?;
            let id = manifest.id;
            let fail = |e: super::ConnectError| {
                if e.status() < 500 || e.status() == 502 {
                    bad(e.to_string())
                } else {
                    Fail(3, e.to_string())
                }
            };
            if manifest.oauth.is_none() {
                // No consent screen: the connector checks the settings and
                // the connection is made now.
                let conns = service(s, keys, Some(&provider), false).await?;
                let done = conns
                    .connect_without_grant(&tenant, &id, &admin)
                    .await
                    .map_err(fail)?;
                println!(
                    "{} {tenant} to {id} ({}); connection {}",
                    if done.reconnected {
                        "reconnected"
                    } else {
                        "connected"
                    },
                    done.connection
                        .external_tenant_name
                        .as_deref()
                        .unwrap_or_default(),
                    done.connection.id
                );
                return Ok(());
            }
            let conns = service(s, keys, Some(&provider), true).await?;
            let url = conns
                .begin_connect(&tenant, &id, &admin)
                .await
                .map_err(fail)?;
            println!("{url}");
        }
        ConnectionsCommand::Mappings { command } => match command {
            MappingsCommand::Set {
                tenant,
                connector,
                mappings,
                replace,
                actor,
                catalogue,
                store,
                provider,
            } => {
                let (s, keys) = open(&store).await?;
                let cat = match catalogue {
                    Some(p) => Catalogue::from_file(&p).map_err(bad)?,
                    None => Catalogue::sample(),
                };
                let conns = service(s, keys, Some(&provider), false)
                    .await?
                    .with_catalogue(cat);
                let scope = MappingScope {
                    tenant_id: tenant,
                    connector_id: connector,
                };
                let parsed = mappings
                    .iter()
                    .map(|m| parse_mapping(m))
                    .collect::<Result<Vec<_>, _>>()?;
                // All or nothing, as on the page and the API: every pair is
                // checked before any is written (one at a time left the
                // pairs before a bad one saved).
                let out = if replace {
                    conns.replace_mappings(&scope, &parsed, &actor).await
                } else {
                    conns
                        .change_mappings(&scope, &parsed, &[], &actor)
                        .await
                        .map_err(|(kind, e)| match kind {
                            Some(k) => MappingError::Invalid {
                                field: "mapping",
                                message: format!("{k}: {e}"),
                            },
                            None => e,
                        })
                };
                match out {
                    Ok(o) => {
                        let now = chrono::Utc::now().timestamp();
                        if replace {
                            let _ = conns
                                .store()
                                .audit(
                                    &actor,
                                    Some(&scope.tenant_id),
                                    "mapping.replace",
                                    &format!("{} ({} kinds)", scope.connector_id, parsed.len()),
                                    now,
                                )
                                .await;
                        }
                        for m in &parsed {
                            let _ = conns
                                .store()
                                .audit(
                                    &actor,
                                    Some(&scope.tenant_id),
                                    "mapping.set",
                                    &format!(
                                        "{} {} -> {}",
                                        scope.connector_id, m.kind, m.account_code
                                    ),
                                    now,
                                )
                                .await;
                        }
                        match o.validated_against {
                            Some(org) => println!("saved (checked against {org})"),
                            None => {
                                println!("saved (not checked: no live connection or no --plugin)")
                            }
                        }
                    }
                    Err(e) if e.status() < 500 => {
                        return Err(bad(format!("{e}; nothing was saved")));
                    }
                    Err(e) => return Err(Fail(3, e.to_string())),
                }
            }
            MappingsCommand::List {
                tenant,
                connector,
                store,
            } => {
                let (s, _) = open_read(&store).await?;
                let list = s
                    .mappings(&MappingScope {
                        tenant_id: tenant,
                        connector_id: connector,
                    })
                    .await?;
                for m in list {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"kind": m.mapping.kind, "account_code": m.mapping.account_code,
                                "tax_type": m.mapping.tax_type, "updated_by": m.updated_by, "updated_at": m.updated_at})
                        );
                    } else {
                        println!(
                            "{}\t{}\t{}",
                            m.mapping.kind,
                            m.mapping.account_code,
                            m.mapping.tax_type.as_deref().unwrap_or("")
                        );
                    }
                }
            }
            MappingsCommand::Delete {
                tenant,
                connector,
                kind,
                store,
            } => {
                let (s, _) = open(&store).await?;
                let gone = s
                    .delete_mapping(
                        &MappingScope {
                            tenant_id: tenant,
                            connector_id: connector,
                        },
                        &kind,
                    )
                    .await?;
                if !gone {
                    return Err(bad(format!("kind: no mapping for {kind:?}")));
                }
                println!("deleted {kind}");
            }
        },
        ConnectionsCommand::Settings { command } => settings_cli(command, json, now).await?,
        ConnectionsCommand::Keys {
            command: KeysCommand::Rotate { store },
        } => {
            let path = store.key_file.clone().ok_or_else(|| {
                bad(format!(
                    "key_file: keys rotate adds the new key to a key file; give --key-file or {KEY_FILE_ENV}"
                ))
            })?;
            // An existing database only: rotating against a mistyped or
            // missing --database added a key to the shared key file and
            // re-encrypted nothing, and `keys status` then called the key
            // still in use "no longer used".
            let s = Store::open_existing(&store.database).await?;
            let new_key = generate_key();
            append_key(&path, &new_key)?;
            // The env's keys, then the file's; the key just added is the newest.
            let ring = KeyRing::load(Some(&path)).map_err(|e| bad(e.to_string()))?;
            let n = s.reencrypt_all(&ring).await?;
            println!(
                "new key {} added to {}; {n} secrets re-encrypted; keys still in use: {}",
                ring.current_key_id(),
                path.display(),
                s.key_ids_in_use().await?.join(", ")
            );
            println!(
                "running daemons that read this key file use the new key from their next encryption or decryption under it; restart any daemon given its keys only by {KEY_ENV}, with the new key; remove an older key from the file only once `keys status` says it is no longer used"
            );
        }
        ConnectionsCommand::Keys {
            command: KeysCommand::Status { store },
        } => {
            let (s, ring) = open_read(&store).await?;
            let ring_ids = ring.key_ids();
            let current = ring.current_key_id();
            let in_use = s.key_ids_in_use().await?;
            let unknown: Vec<&String> = in_use.iter().filter(|k| !ring_ids.contains(k)).collect();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "keys": ring_ids.iter().map(|k| serde_json::json!({
                            "id": k,
                            "encrypts": *k == current,
                            "in_use": in_use.contains(k),
                        })).collect::<Vec<_>>(),
                        "in_use_not_in_ring": unknown,
                    })
                );
            } else {
                for k in &ring_ids {
                    let role = if *k == current {
                        "encrypts"
                    } else if in_use.contains(k) {
                        "still protects stored secrets: keep it"
                    } else {
                        "no longer used: may be removed"
                    };
                    println!("{k}  {role}");
                }
                for k in &unknown {
                    println!("{k}  protects stored secrets but is NOT in this ring");
                }
            }
            if !unknown.is_empty() {
                return Err(Fail(
                    3,
                    "some stored secrets are under keys this ring does not hold".into(),
                ));
            }
        }
        ConnectionsCommand::Keys {
            command:
                KeysCommand::Issue {
                    scope,
                    tenant,
                    label,
                    store,
                },
        } => {
            use crate::store::admin::KeyScope;
            let scope = match (scope.as_str(), tenant) {
                ("ingest", _) => KeyScope::Ingest,
                ("operator", _) => KeyScope::Operator,
                ("tenant", Some(t)) => KeyScope::Tenant(t),
                ("tenant", None) => return Err(bad("tenant: a tenant key needs --tenant")),
                (other, _) => {
                    return Err(bad(format!(
                        "scope: {other:?} is not ingest, tenant or operator"
                    )));
                }
            };
            let new_file = Store::sqlite_file(&store.database).filter(|f| !f.exists());
            let s = Store::open_and_migrate(&store.database).await?;
            if let Some(f) = new_file {
                eprintln!("note: created a new database {}", f.display());
            }
            if let KeyScope::Tenant(t) = &scope
                && s.tenant(t).await?.is_none()
            {
                return Err(bad(format!("tenant: unknown tenant {t:?}")));
            }
            let (id, secret) = s
                .issue_key(&scope, &label, chrono::Utc::now().timestamp())
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"id": id, "key": secret, "scope": scope})
                );
            } else {
                println!(
                    "key id {id}\nkey    {secret}\n(shown once; ledgerport keeps only its hash)"
                );
            }
        }
        ConnectionsCommand::Keys {
            command: KeysCommand::Revoke { id, store },
        } => {
            let s = Store::open_existing(&store.database).await?;
            if !s.revoke_key(&id, chrono::Utc::now().timestamp()).await? {
                return Err(bad(format!("id: no active key {id:?}")));
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

fn setting_fail(e: super::SettingError) -> Fail {
    if e.status() < 500 {
        bad(e.to_string())
    } else {
        Fail(3, e.to_string())
    }
}

async fn settings_cli(cmd: SettingsCommand, json: bool, now: i64) -> Result<(), Fail> {
    use super::settings;
    // Checked against the trust list like every command's --plugin: the
    // manifest decides which values are secrets (never printed), so an
    // altered one could have `get` print a secret.
    let manifest_of = |p: &Path, trust: &TrustArgs| {
        let m = Manifest::from_file(p).map_err(|e| bad(e.to_string()))?;
        trust.check(&m, p).map_err(bad)?;
        Ok::<_, Fail>(m)
    };
    match cmd {
        SettingsCommand::Get {
            tenant,
            plugin,
            trust,
            store,
        } => {
            let m = manifest_of(&plugin, &trust)?;
            let (s, keys) = open_read(&store).await?;
            let list = settings::view(&s, &keys, &m, &tenant).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for v in list {
                    println!(
                        "{}\t{}\t{}",
                        v.key,
                        v.value.as_deref().unwrap_or("-"),
                        if v.stored {
                            "(this connection)"
                        } else {
                            "(default)"
                        }
                    );
                }
            }
        }
        SettingsCommand::Set {
            tenant,
            plugin,
            trust,
            settings: pairs,
            actor,
            store,
        } => {
            let m = manifest_of(&plugin, &trust)?;
            let mut parsed = Vec::new();
            for p in &pairs {
                let (k, v) = p
                    .split_once('=')
                    .ok_or_else(|| bad(format!("setting {p:?} must look like KEY=VALUE")))?;
                let v = if v == "-" {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                } else {
                    v.to_string()
                };
                settings::validate(&m, k.trim(), &v).map_err(setting_fail)?;
                parsed.push((k.trim().to_string(), v));
            }
            let (s, keys) = open(&store).await?;
            if s.tenant(&tenant).await?.is_none() {
                return Err(bad(format!("tenant: unknown tenant {tenant:?}")));
            }
            for (k, v) in parsed {
                settings::set(&s, &keys, &m, &tenant, &k, &v, &actor, now)
                    .await
                    .map_err(setting_fail)?;
                println!("set {k}");
            }
        }
        SettingsCommand::Unset {
            tenant,
            plugin,
            trust,
            keys: names,
            actor,
            store,
        } => {
            let m = manifest_of(&plugin, &trust)?;
            let (s, _) = open(&store).await?;
            for k in names {
                settings::unset(&s, &m.id, &tenant, &k, &actor, now)
                    .await
                    .map_err(setting_fail)?;
                println!("unset {k}");
            }
        }
    }
    Ok(())
}

/// Run one of this module's subcommands.
pub async fn run(cmd: ConnectionsCommand, json: bool) -> ExitCode {
    match run_inner(cmd, json).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}
