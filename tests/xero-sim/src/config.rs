//! Configuration of a simulator run: seeded apps, organisations and user,
//! lifetimes, rate limits, faults and the clock. Every field has a default
//! that "just works", and the whole thing can be read from TOML.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::faults::FaultConfig;

/// Tenant id of the default organisation "Acme Holdings Ltd" (GBP).
pub const DEFAULT_TENANT_HOLDINGS: Uuid =
    Uuid::from_u128(0x5b3c_a1e0_0d1f_4c5e_9a11_0000_0000_0001);
/// Tenant id of the default organisation "Acme Trading GmbH" (EUR).
pub const DEFAULT_TENANT_TRADING: Uuid = Uuid::from_u128(0x5b3c_a1e0_0d1f_4c5e_9a11_0000_0000_0002);
/// Client id of the default app.
pub const DEFAULT_CLIENT_ID: &str = "ledgerport-demo";
/// Client secret of the default app.
pub const DEFAULT_CLIENT_SECRET: &str = "demo-secret";

/// Which family of OAuth scopes an app may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScopeMode {
    /// Granular scopes (`accounting.invoices`, `accounting.settings.read`, ...), as apps created from 2026 use.
    #[default]
    Granular,
    /// The older broad scopes (`accounting.transactions`, `accounting.settings`, ...).
    Broad,
    /// Both families.
    Any,
}

/// A registered OAuth app.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret. Empty means a public (PKCE-only) client.
    pub client_secret: String,
    /// Display name, reported as `ProviderName` in accounting envelopes.
    pub name: String,
    /// Allowed redirect URIs; empty allows any.
    pub redirect_uris: Vec<String>,
    /// Accepted scope family.
    pub scope_mode: ScopeMode,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            client_id: DEFAULT_CLIENT_ID.into(),
            client_secret: DEFAULT_CLIENT_SECRET.into(),
            name: "ledgerport demo".into(),
            redirect_uris: Vec::new(),
            scope_mode: ScopeMode::Granular,
        }
    }
}

/// A Xero organisation (tenant).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrgConfig {
    /// The tenant id (`xero-tenant-id` header, `OrganisationID`).
    pub tenant_id: Uuid,
    /// Organisation name.
    pub name: String,
    /// Base currency, e.g. `GBP`.
    pub base_currency: String,
    /// Currencies enabled for documents (the base currency is always enabled).
    pub currencies: Vec<String>,
    /// Country code, e.g. `GB`.
    pub country_code: String,
    /// Xero version (`UK`, `GLOBAL`, `AU`, `NZ`, `US`).
    pub version: String,
}

impl Default for OrgConfig {
    fn default() -> Self {
        OrgConfig {
            tenant_id: DEFAULT_TENANT_HOLDINGS,
            name: "Acme Holdings Ltd".into(),
            base_currency: "GBP".into(),
            currencies: ["GBP", "EUR", "USD", "AUD", "NZD"]
                .map(String::from)
                .to_vec(),
            country_code: "GB".into(),
            version: "UK".into(),
        }
    }
}

/// The (single) Xero user who logs in on the consent page.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    /// Xero user id (the id_token `xero_userid`).
    pub user_id: Uuid,
    /// E-mail address.
    pub email: String,
    /// Given name.
    pub given_name: String,
    /// Family name.
    pub family_name: String,
    /// Tenants the user can connect; empty means every configured organisation.
    pub tenants: Vec<Uuid>,
}

impl Default for UserConfig {
    fn default() -> Self {
        UserConfig {
            user_id: Uuid::from_u128(0x7e57_0000_0000_4000_8000_0000_0000_a11c),
            email: "alice@example.com".into(),
            given_name: "Alice".into(),
            family_name: "Admin".into(),
            tenants: Vec::new(),
        }
    }
}

/// Xero's API rate limits.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// `false` turns every limit off (benchmarks).
    pub enabled: bool,
    /// Concurrent requests per tenant and app.
    pub concurrent: u32,
    /// Requests per sim-clock minute per tenant and app.
    pub per_minute: u32,
    /// Requests per sim-clock day per tenant and app.
    pub per_day: u32,
    /// Requests per sim-clock minute per app, across tenants.
    pub app_per_minute: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: true,
            concurrent: 5,
            per_minute: 60,
            per_day: 5000,
            app_per_minute: 10_000,
        }
    }
}

/// Token, code and key lifetimes, in sim-clock seconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifetimeConfig {
    /// Access token lifetime (Xero: 1800).
    pub access_token_secs: i64,
    /// Authorization code lifetime (Xero: 300).
    pub auth_code_secs: i64,
    /// How long a rotated-out refresh token keeps working (Xero: 1800).
    pub refresh_grace_secs: i64,
    /// Lifetime of an unused refresh token (Xero: 60 days).
    pub refresh_token_secs: i64,
    /// How long an `Idempotency-Key` is remembered (Xero: a few minutes; default 360).
    pub idempotency_secs: i64,
}

impl Default for LifetimeConfig {
    fn default() -> Self {
        LifetimeConfig {
            access_token_secs: 1800,
            auth_code_secs: 300,
            refresh_grace_secs: 1800,
            refresh_token_secs: 60 * 24 * 3600,
            idempotency_secs: 360,
        }
    }
}

/// Everything a simulator run is started with.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Seed for every random decision (fault injection), so runs are replayable.
    pub seed: u64,
    /// Registered OAuth apps.
    pub apps: Vec<AppConfig>,
    /// Organisations.
    pub orgs: Vec<OrgConfig>,
    /// The user on the consent page.
    pub user: UserConfig,
    /// When set, the consent page approves at once for these tenants (empty = all of the user's).
    pub auto_approve: Option<Vec<Uuid>>,
    /// Rate limits.
    pub limits: RateLimitConfig,
    /// Lifetimes.
    pub lifetimes: LifetimeConfig,
    /// Faults in force from the start.
    pub faults: FaultConfig,
    /// Simulated start time; default the real current time.
    pub clock_start: Option<DateTime<Utc>>,
    /// Clock speed factor (1.0 = real time).
    pub clock_speed: f64,
    /// Page size of paged GETs (Xero: 100).
    pub page_size: usize,
    /// Most requests kept in the request log (oldest dropped first).
    pub request_log_limit: usize,
    /// Largest attachment accepted, in bytes (Xero: 25 MB).
    pub max_attachment_bytes: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            port: 0,
            seed: 42,
            apps: vec![AppConfig::default()],
            orgs: vec![
                OrgConfig::default(),
                OrgConfig {
                    tenant_id: DEFAULT_TENANT_TRADING,
                    name: "Acme Trading GmbH".into(),
                    base_currency: "EUR".into(),
                    currencies: ["EUR", "GBP", "USD"].map(String::from).to_vec(),
                    country_code: "DE".into(),
                    version: "GLOBAL".into(),
                },
            ],
            user: UserConfig::default(),
            auto_approve: None,
            limits: RateLimitConfig::default(),
            lifetimes: LifetimeConfig::default(),
            faults: FaultConfig::default(),
            clock_start: None,
            clock_speed: 1.0,
            page_size: 100,
            request_log_limit: 100_000,
            max_attachment_bytes: 25 * 1024 * 1024,
        }
    }
}

impl SimConfig {
    /// Parse a TOML configuration (missing fields take their defaults).
    /// Values that would break the simulator's arithmetic (a page size of
    /// 0 divides by zero; a lifetime near `i64::MAX` overflows a time) are
    /// refused, naming the key.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let config: SimConfig = toml::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    /// Refuse values outside what the simulator can compute with.
    pub fn check(&self) -> anyhow::Result<()> {
        const TEN_YEARS: i64 = 10 * 366 * 24 * 3600;
        if self.page_size == 0 || self.page_size > 10_000 {
            anyhow::bail!("page_size: must be 1 to 10000, not {}", self.page_size);
        }
        if self.max_attachment_bytes > 1 << 30 {
            anyhow::bail!(
                "max_attachment_bytes: must be at most 1 GiB, not {}",
                self.max_attachment_bytes
            );
        }
        let l = &self.lifetimes;
        for (key, secs) in [
            ("lifetimes.access_token_secs", l.access_token_secs),
            ("lifetimes.auth_code_secs", l.auth_code_secs),
            ("lifetimes.refresh_grace_secs", l.refresh_grace_secs),
            ("lifetimes.refresh_token_secs", l.refresh_token_secs),
            ("lifetimes.idempotency_secs", l.idempotency_secs),
        ] {
            if !(0..=TEN_YEARS).contains(&secs) {
                anyhow::bail!("{key}: must be 0 to ten years in seconds, not {secs}");
            }
        }
        Ok(())
    }

    /// The default config with auto-approval of all the user's organisations switched on.
    pub fn auto_approving() -> Self {
        SimConfig {
            auto_approve: Some(Vec::new()),
            ..Self::default()
        }
    }

    /// Replace the organisations with `n` like the default Trading one
    /// (ids `first_id`, `first_id + 1`, ..., names "Org 0", ...), all the
    /// user's. Returns their tenant ids.
    pub fn with_orgs(&mut self, n: usize, first_id: u128) -> Vec<Uuid> {
        let ids: Vec<Uuid> = (0..n as u128)
            .map(|i| Uuid::from_u128(first_id + i))
            .collect();
        let template = SimConfig::default().orgs[1].clone();
        self.orgs = ids
            .iter()
            .enumerate()
            .map(|(i, id)| OrgConfig {
                tenant_id: *id,
                name: format!("Org {i}"),
                ..template.clone()
            })
            .collect();
        self.user.tenants = ids.clone();
        ids
    }
}
