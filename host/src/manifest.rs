//! Plugin manifests: the TOML file beside a connector's `.wasm` that says
//! who the connector is, which contract it speaks, where it may send HTTP,
//! how its provider authorises, and how fast it may go.
//!
//! Parsing never panics: every refusal is a [`ManifestError`] naming the key.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Contract versions this host serves (major.minor; any patch is accepted).
pub const SUPPORTED_CONTRACTS: &[&str] = &["0.1", "0.2"];

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read manifest {path}: {source}")]
    Read {
        /// The manifest path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or a key has the wrong type.
    #[error("manifest {path} is not valid: {message}")]
    Parse {
        /// The manifest path.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// A key has a value the host does not accept.
    #[error("manifest key `{key}` is invalid: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Provider rate limits the host enforces per connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute per connection.
    #[serde(default = "default_rpm")]
    pub requests_per_minute: u32,
    /// Concurrent requests per connection.
    #[serde(default = "default_concurrent")]
    pub concurrent_per_connection: u32,
}

fn default_rpm() -> u32 {
    60
}
fn default_concurrent() -> u32 {
    5
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests_per_minute: default_rpm(),
            concurrent_per_connection: default_concurrent(),
        }
    }
}

/// How the provider authorises (OAuth 2.0 authorization code flow).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OAuth {
    /// The authorization (consent) endpoint.
    pub authorize_url: String,
    /// The token endpoint.
    pub token_url: String,
    /// The token revocation endpoint, when the provider has one.
    #[serde(default)]
    pub revoke_url: Option<String>,
    /// Where the grant's organisations are listed (Xero: `/connections`).
    #[serde(default)]
    pub connections_url: Option<String>,
    /// For a provider without such a list: the query parameter of its
    /// redirect back that names the company connected (QuickBooks:
    /// `realmId`). Its value becomes the connection's organisation id
    /// (`external-tenant-id` in `connection::info`). Not with
    /// `connections_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organisation_param: Option<String>,
    /// Scopes requested for new apps.
    pub scopes: Vec<String>,
    /// Scopes for older apps that still use the broad set.
    #[serde(default)]
    pub broad_scopes: Vec<String>,
    /// Whether the provider supports PKCE (S256).
    #[serde(default)]
    pub pkce: bool,
}

/// Longest connector setting value the host stores.
pub const MAX_SETTING_CHARS: usize = 2048;

/// One connector setting a manifest declares. The plain form
/// `[settings] key = "value"` declares a default only; the table form
/// `[settings.key] default = "...", allowed = [...], description = "...",
/// secret = true, min_length = 16, max_length = 200` says more. A plain
/// declaration serialises back to the plain form (so signatures over
/// manifests written before the table form stay valid).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SettingSpec {
    /// What the connector gets when the connection sets nothing.
    pub default: Option<String>,
    /// What it is for, in words for an admin.
    pub description: Option<String>,
    /// A secret: encrypted at rest like every stored setting, and never
    /// shown back (the admin API and page say only whether it is set).
    pub secret: bool,
    /// The only values accepted (any value when empty).
    pub allowed: Vec<String>,
    /// Shortest value accepted, in characters.
    pub min_length: Option<u32>,
    /// Longest value accepted, in characters (at most [`MAX_SETTING_CHARS`]).
    pub max_length: Option<u32>,
}

/// The table form of a [`SettingSpec`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingTable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    secret: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    allowed: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_length: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_length: Option<u32>,
}

impl SettingSpec {
    /// Only a default: the plain form.
    fn is_plain(&self) -> bool {
        self.default.is_some()
            && self.description.is_none()
            && !self.secret
            && self.allowed.is_empty()
            && self.min_length.is_none()
            && self.max_length.is_none()
    }

    /// The longest value accepted, in characters.
    pub fn max_chars(&self) -> usize {
        self.max_length
            .map(|m| (m as usize).min(MAX_SETTING_CHARS))
            .unwrap_or(MAX_SETTING_CHARS)
    }
}

impl Serialize for SettingSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.default {
            Some(d) if self.is_plain() => s.serialize_str(d),
            _ => SettingTable {
                default: self.default.clone(),
                description: self.description.clone(),
                secret: self.secret,
                allowed: self.allowed.clone(),
                min_length: self.min_length,
                max_length: self.max_length,
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for SettingSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = SettingSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a default value (string) or a table with default, description, secret, allowed, min_length, max_length")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SettingSpec, E> {
                Ok(SettingSpec {
                    default: Some(v.to_string()),
                    ..SettingSpec::default()
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<SettingSpec, A::Error> {
                let t =
                    SettingTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(SettingSpec {
                    default: t.default,
                    description: t.description,
                    secret: t.secret,
                    allowed: t.allowed,
                    min_length: t.min_length,
                    max_length: t.max_length,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// The settings a manifest declares, by key. Iterating a `&Settings` yields
/// the declared defaults as `(key, value)`: what a connection that stores
/// nothing gets.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Settings(BTreeMap<String, SettingSpec>);

type DefaultsIter<'a> = std::iter::FilterMap<
    std::collections::btree_map::Iter<'a, String, SettingSpec>,
    fn((&'a String, &'a SettingSpec)) -> Option<(&'a String, &'a String)>,
>;

impl Settings {
    /// The declaration of `key`.
    pub fn get(&self, key: &str) -> Option<&SettingSpec> {
        self.0.get(key)
    }
    /// Every declaration, by key.
    pub fn specs(&self) -> impl Iterator<Item = (&String, &SettingSpec)> {
        self.0.iter()
    }
    /// The declared keys.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
    /// Whether nothing is declared.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The declared defaults (key -> value).
    pub fn defaults(&self) -> BTreeMap<String, String> {
        self.into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    /// Declare (or replace) `key`.
    pub fn insert(&mut self, key: impl Into<String>, spec: SettingSpec) {
        self.0.insert(key.into(), spec);
    }
}

impl<'a> IntoIterator for &'a Settings {
    type Item = (&'a String, &'a String);
    type IntoIter = DefaultsIter<'a>;
    fn into_iter(self) -> Self::IntoIter {
        fn default_of<'a>(
            (k, s): (&'a String, &'a SettingSpec),
        ) -> Option<(&'a String, &'a String)> {
            s.default.as_ref().map(|d| (k, d))
        }
        self.0.iter().filter_map(default_of as fn(_) -> _)
    }
}

/// A parsed, validated plugin manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Stable id (lower-case letters, digits, `-`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// The connector's version.
    pub version: String,
    /// The contract version it was built against (e.g. "0.1.0").
    pub contract: String,
    /// The component file, relative to the manifest.
    pub component: String,
    /// SHA-256 of the component, lower-case hex.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Origins (`scheme://host[:port]`) the connector may call.
    pub allowed_hosts: Vec<String>,
    /// Document kinds it accepts ("invoice", "credit-note").
    pub document_kinds: Vec<String>,
    /// Provider limits.
    #[serde(default)]
    pub limits: Limits,
    /// OAuth settings, for connectors whose provider uses OAuth.
    #[serde(default)]
    pub oauth: Option<OAuth>,
    /// The connector settings it reads, each with its default, and for the
    /// declared form its description, allowed values and whether it is a
    /// secret; an admin overrides them per connection.
    #[serde(default)]
    pub settings: Settings,
    /// Ed25519 public key (base64) of whoever signed this manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
    /// Ed25519 signature (base64) over the manifest without these two keys
    /// (which covers the component through `sha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Manifest {
    /// Read and validate a manifest file.
    pub fn from_file(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ManifestError::Parse { message, .. } => ManifestError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parse and validate manifest text.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let m: Manifest = toml::from_str(text).map_err(|e| ManifestError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        m.validate()?;
        Ok(m)
    }

    /// Check every value the types alone cannot.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |key, message: String| Err(ManifestError::Invalid { key, message });
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return invalid(
                "id",
                format!("{:?} must be 1-64 of a-z, 0-9 and '-'", self.id),
            );
        }
        // The name is what admins and notices see ("Invoice X was not sent
        // to <name>").
        if self.name.trim().is_empty() || self.name.chars().count() > 100 {
            return invalid("name", "must be 1-100 characters, not blank".into());
        }
        if contract_line(&self.contract).is_none() {
            return invalid(
                "contract",
                format!(
                    "unknown contract version {:?}; this host serves {}",
                    self.contract,
                    SUPPORTED_CONTRACTS
                        .iter()
                        .map(|v| format!("{v}.x"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        if self.component.is_empty()
            || self.component.contains("..")
            || self.component.starts_with('/')
        {
            return invalid(
                "component",
                format!(
                    "{:?} must be a file name beside the manifest",
                    self.component
                ),
            );
        }
        if let Some(h) = &self.sha256
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return invalid("sha256", "must be 64 hex digits".into());
        }
        for h in &self.allowed_hosts {
            if let Err(e) = parse_origin(h) {
                return invalid("allowed_hosts", format!("{h:?}: {e}"));
            }
        }
        if self.document_kinds.is_empty() {
            return invalid("document_kinds", "must name at least one kind".into());
        }
        for k in &self.document_kinds {
            if k != "invoice" && k != "credit-note" {
                return invalid(
                    "document_kinds",
                    format!("{k:?} is not \"invoice\" or \"credit-note\""),
                );
            }
        }
        if self.limits.requests_per_minute == 0 {
            return invalid("limits.requests_per_minute", "must be at least 1".into());
        }
        if self.limits.concurrent_per_connection == 0 {
            return invalid(
                "limits.concurrent_per_connection",
                "must be at least 1".into(),
            );
        }
        for (key, spec) in self.settings.specs() {
            if let Err(message) = check_setting(key, spec) {
                return invalid("settings", format!("{key:?}: {message}"));
            }
        }
        if let Some(o) = &self.oauth {
            let optional = [
                ("oauth.revoke_url", &o.revoke_url),
                ("oauth.connections_url", &o.connections_url),
            ];
            let urls = [
                ("oauth.authorize_url", Some(&o.authorize_url)),
                ("oauth.token_url", Some(&o.token_url)),
            ]
            .into_iter()
            .chain(optional.into_iter().map(|(k, u)| (k, u.as_ref())));
            for (key, u) in urls {
                if let Some(u) = u
                    && url::Url::parse(u).is_err()
                {
                    return invalid(key, format!("{u:?} is not a URL"));
                }
            }
            if let Some(p) = &o.organisation_param {
                if p.is_empty()
                    || p.len() > 64
                    || !p
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
                {
                    return invalid(
                        "oauth.organisation_param",
                        format!(
                            "{p:?} is not a query parameter name (letters, digits, _ - ., at most 64)"
                        ),
                    );
                }
                if matches!(p.as_str(), "code" | "state" | "error" | "error_description") {
                    return invalid(
                        "oauth.organisation_param",
                        format!("{p:?} is a parameter of OAuth itself"),
                    );
                }
                if o.connections_url.is_some() {
                    return invalid(
                        "oauth.organisation_param",
                        "give connections_url (an organisation list) or organisation_param (a redirect parameter), not both".into(),
                    );
                }
            }
            // The daemon would refuse to start with it once an operator
            // configures the client: say so at install instead.
            if o.scopes.is_empty() || o.scopes.iter().any(|s| s.trim().is_empty()) {
                return invalid(
                    "oauth.scopes",
                    "must name at least one scope, none of them empty".into(),
                );
            }
        }
        Ok(())
    }
}

/// Refuse a setting declaration that contradicts itself.
fn check_setting(key: &str, s: &SettingSpec) -> Result<(), String> {
    if key.is_empty()
        || key.len() > 64
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err("a setting name is 1-64 of a-z, A-Z, 0-9, '_', '-' and '.'".into());
    }
    if s.secret && s.default.is_some() {
        return Err("a secret has no default (a manifest is not a place for secrets)".into());
    }
    if s.max_length == Some(0) || s.max_length.is_some_and(|m| m as usize > MAX_SETTING_CHARS) {
        return Err(format!("max_length must be 1-{MAX_SETTING_CHARS}"));
    }
    if let (Some(min), Some(max)) = (s.min_length, s.max_length)
        && min > max
    {
        return Err("min_length is above max_length".into());
    }
    if s.allowed.iter().any(String::is_empty) {
        return Err("allowed values are not empty".into());
    }
    if let Some(d) = &s.default
        && !s.allowed.is_empty()
        && !s.allowed.contains(d)
    {
        return Err(format!(
            "the default {d:?} is not one of the allowed values"
        ));
    }
    // A default its own bounds refuse: every connection would start with a
    // value an admin could not save again.
    if let Some(d) = &s.default {
        let n = d.chars().count();
        if d.is_empty() || d.chars().any(char::is_control) || n > MAX_SETTING_CHARS {
            return Err(format!(
                "the default {d:?} is empty, holds a control character or is longer than {MAX_SETTING_CHARS} characters"
            ));
        }
        if s.min_length.is_some_and(|m| n < m as usize)
            || s.max_length.is_some_and(|m| n > m as usize)
        {
            return Err(format!(
                "the default {d:?} is outside min_length/max_length"
            ));
        }
    }
    Ok(())
}

/// The served contract line ("0.1") a version string belongs to, if any.
pub fn contract_line(version: &str) -> Option<&'static str> {
    let mut parts = version.split('.');
    let major = parts.next()?;
    let minor = parts.next()?;
    if let Some(patch) = parts.next()
        && patch.parse::<u32>().is_err()
    {
        return None;
    }
    let line = format!("{major}.{minor}");
    SUPPORTED_CONTRACTS.iter().copied().find(|s| *s == line)
}

/// Normalise an origin (`scheme://host[:port]`, no path) to `scheme://host:port`.
pub fn parse_origin(s: &str) -> Result<String, String> {
    let u = url::Url::parse(s).map_err(|e| e.to_string())?;
    if u.scheme() != "https" && u.scheme() != "http" {
        return Err("scheme must be http or https".into());
    }
    if u.path() != "/" && !u.path().is_empty() || u.query().is_some() {
        return Err("an origin has no path or query".into());
    }
    origin_of(&u).ok_or_else(|| "no host".into())
}

/// `scheme://host:port` of a URL (port made explicit).
pub fn origin_of(u: &url::Url) -> Option<String> {
    let host = u.host_str()?;
    let port = u.port_or_known_default()?;
    Some(format!(
        "{}://{}:{}",
        u.scheme(),
        host.to_ascii_lowercase(),
        port
    ))
}

/// The document kinds of every connector installed in `plugin_dir` (each
/// `<dir>/<folder>/manifest.toml`), by manifest id. A manifest that cannot
/// be read is left out (that connector then takes every kind here; the
/// daemon refuses to start with it).
pub fn document_kinds_in(plugin_dir: &Path) -> BTreeMap<String, Vec<String>> {
    let Ok(dir) = std::fs::read_dir(plugin_dir) else {
        return BTreeMap::new();
    };
    dir.flatten()
        .filter_map(|e| Manifest::from_file(&e.path().join("manifest.toml")).ok())
        .map(|m| (m.id.clone(), m.document_kinds.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = "xero"
name = "Xero"
version = "0.1.0"
contract = "0.1.0"
component = "xero.wasm"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
allowed_hosts = ["https://api.xero.com"]
document_kinds = ["invoice", "credit-note"]
"#;

    #[test]
    fn parses_a_good_manifest() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.id, "xero");
        assert_eq!(m.limits, Limits::default());
    }

    /// An `[oauth]` table the daemon could not use is refused at install,
    /// naming the key (an empty scope list used to pass here and then stop
    /// `serve` once the operator configured the client).
    #[test]
    fn refuses_an_unusable_oauth_table_naming_the_key() {
        let oauth = |scopes: &str, extra: &str| {
            format!(
                "{GOOD}\n[oauth]\nauthorize_url = \"https://login.xero.com/a\"\ntoken_url = \"https://identity.xero.com/t\"\nscopes = {scopes}\n{extra}"
            )
        };
        assert!(Manifest::parse(&oauth("[\"offline_access\"]", "")).is_ok());
        let qb = Manifest::parse(&oauth("[\"a\"]", "organisation_param = \"realmId\"")).unwrap();
        assert_eq!(
            qb.oauth.unwrap().organisation_param.as_deref(),
            Some("realmId")
        );
        for (scopes, extra, key) in [
            ("[]", "", "oauth.scopes"),
            ("[\" \"]", "", "oauth.scopes"),
            ("[\"a\"]", "revoke_url = \"not a url\"", "oauth.revoke_url"),
            (
                "[\"a\"]",
                "connections_url = \"::\"",
                "oauth.connections_url",
            ),
            (
                "[\"a\"]",
                "organisation_param = \"realm id\"",
                "oauth.organisation_param",
            ),
            (
                "[\"a\"]",
                "organisation_param = \"state\"",
                "oauth.organisation_param",
            ),
            (
                "[\"a\"]",
                "organisation_param = \"realmId\"\nconnections_url = \"https://api.xero.com/connections\"",
                "oauth.organisation_param",
            ),
        ] {
            let e = Manifest::parse(&oauth(scopes, extra))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{scopes} {extra}: {e}");
        }
    }

    #[test]
    fn refuses_unknown_contract_naming_the_key() {
        let e = Manifest::parse(&GOOD.replace("contract = \"0.1.0\"", "contract = \"9.0.0\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("contract") && e.contains("9.0.0"), "{e}");
    }

    #[test]
    fn refuses_bad_hosts_kinds_and_ids() {
        for (from, to, key) in [
            ("https://api.xero.com\"", "ftp://x\"", "allowed_hosts"),
            ("\"invoice\",", "\"receipt\",", "document_kinds"),
            ("id = \"xero\"", "id = \"Xero Inc\"", "id"),
            ("xero.wasm", "../x.wasm", "component"),
            ("name = \"Xero\"", "name = \"  \"", "name"),
        ] {
            let e = Manifest::parse(&GOOD.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn a_zero_limit_is_refused_naming_its_key() {
        for key in ["requests_per_minute", "concurrent_per_connection"] {
            let e = Manifest::parse(&format!("{GOOD}\n[limits]\n{key} = 0\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("limits.{key}")), "{e}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Manifest::parse(&format!("{GOOD}\nbogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn settings_plain_and_declared_forms() {
        let text = format!(
            "{GOOD}\n[settings]\nregion = \"eu\"\n\n[settings.status]\ndefault = \"AUTHORISED\"\n\
             allowed = [\"DRAFT\", \"AUTHORISED\"]\ndescription = \"Bill status\"\n\n\
             [settings.signing_secret]\nsecret = true\nmin_length = 16\n"
        );
        let m = Manifest::parse(&text).unwrap();
        assert_eq!(
            m.settings.get("region").unwrap().default.as_deref(),
            Some("eu")
        );
        let status = m.settings.get("status").unwrap();
        assert_eq!(status.allowed, vec!["DRAFT", "AUTHORISED"]);
        assert_eq!(status.description.as_deref(), Some("Bill status"));
        assert!(m.settings.get("signing_secret").unwrap().secret);
        // Iterating yields the defaults only (the secret has none).
        let defaults: Vec<(String, String)> = (&m.settings)
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(
            defaults,
            vec![
                ("region".to_string(), "eu".to_string()),
                ("status".to_string(), "AUTHORISED".to_string())
            ]
        );
        // Round trip; the plain form stays plain.
        let out = toml::to_string(&m).unwrap();
        assert!(out.contains("region = \"eu\""), "{out}");
        assert_eq!(Manifest::parse(&out).unwrap(), m);
    }

    #[test]
    fn contradictory_settings_are_refused_naming_them() {
        for (decl, why) in [
            (
                "[settings.status]\ndefault = \"FINAL\"\nallowed = [\"DRAFT\"]",
                "allowed",
            ),
            ("[settings.token]\nsecret = true\ndefault = \"x\"", "secret"),
            ("[settings.x]\nmin_length = 5\nmax_length = 2", "min_length"),
            ("[settings.x]\nmax_length = 999999", "max_length"),
            (
                "[settings.x]\ndefault = \"abc\"\nmin_length = 5",
                "outside min_length/max_length",
            ),
            (
                "[settings.x]\ndefault = \"abcdef\"\nmax_length = 3",
                "outside min_length/max_length",
            ),
            ("[settings]\nregion = \"\"", "is empty"),
            ("[settings]\nregion = \"a\\tb\"", "control character"),
            ("[settings.x]\nbogus = 1", "bogus"),
            ("[settings]\n\"a b\" = \"1\"", "setting name"),
        ] {
            let e = Manifest::parse(&format!("{GOOD}\n{decl}\n"))
                .unwrap_err()
                .to_string();
            // A parse error names the key and line; a refusal names `settings`.
            assert!(
                e.contains(why) && (e.contains("settings") || e.contains("line")),
                "{decl}: {e}"
            );
        }
    }

    #[test]
    fn origins_are_normalised() {
        assert_eq!(
            parse_origin("https://API.xero.com").unwrap(),
            "https://api.xero.com:443"
        );
        assert!(parse_origin("https://api.xero.com/path").is_err());
        assert_eq!(contract_line("0.1.7"), Some("0.1"));
        assert_eq!(contract_line("0.2.3"), Some("0.2"));
        assert_eq!(contract_line("0.3.0"), None);
        assert_eq!(contract_line("1.0.0"), None);
    }
}
