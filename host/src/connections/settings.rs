//! Connector settings per connection: what a manifest declares
//! (`[settings]`), what an admin stored for a tenant's connector (encrypted,
//! `store::settings`), the checks a new value passes (a declared key, an
//! allowed value, a length), the view admins get (secrets only as "set" /
//! "not set"), and the one function that builds the [`ConnectionInfo`] a
//! connector call sees: the manifest's defaults overlaid with the stored
//! values ([`connection_info`], used by the connections service and the
//! dispatcher alike).
//!
//! Values are never logged; the audit log records who changed which key,
//! and the new value only when the key is not a secret.

use crate::capabilities::connection::ConnectionInfo;
use crate::crypto::KeyRing;
use crate::manifest::{Manifest, SettingSpec};
use crate::store::settings::{SettingChange, StoredSetting};
use crate::store::{Connection, Store, StoreError};
use serde::Serialize;
use std::collections::BTreeMap;

/// What an admin sees for a secret that is set.
pub const MASK_SET: &str = "set";
/// What an admin sees for a secret that is not set.
pub const MASK_NOT_SET: &str = "not set";

/// Why a setting change was refused. Every refusal names the field: the
/// setting's key, or `connector` / `value` / `actor`.
#[derive(Debug, thiserror::Error)]
pub enum SettingError {
    /// The change is not acceptable (422).
    #[error("{field}: {message}")]
    Invalid {
        /// The setting's key (or `value`, `actor`).
        field: String,
        /// What is wrong, in words.
        message: String,
    },
    /// No such connector on this host (404).
    #[error("connector: {0:?} is not installed")]
    UnknownConnector(String),
    /// Storage failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SettingError {
    fn invalid(field: &str, message: impl Into<String>) -> Self {
        SettingError::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// The field the refusal names.
    pub fn field(&self) -> &str {
        match self {
            SettingError::Invalid { field, .. } => field,
            SettingError::UnknownConnector(_) => "connector",
            SettingError::Store(_) => "settings",
        }
    }

    /// The message without the field.
    pub fn message(&self) -> String {
        match self {
            SettingError::Invalid { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            SettingError::Invalid { .. } => 422,
            SettingError::UnknownConnector(_) => 404,
            SettingError::Store(_) => 500,
        }
    }
}

/// One setting as an admin sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SettingView {
    /// The key.
    pub key: String,
    /// What it is for.
    pub description: Option<String>,
    /// A secret (write-only: `value` says only "set" / "not set").
    pub secret: bool,
    /// The values accepted (any when empty).
    pub allowed: Vec<String>,
    /// The manifest's default.
    pub default: Option<String>,
    /// What the connector gets: the stored value, else the default; for a
    /// secret "set" or "not set".
    pub value: Option<String>,
    /// Whether the connection stores its own value (else the default applies).
    pub stored: bool,
    /// Whether the manifest still declares the key (a stored value of a
    /// key it no longer declares is still passed on, and can be unset).
    pub declared: bool,
    /// Who stored the value.
    pub updated_by: Option<String>,
    /// When (Unix seconds).
    pub updated_at: Option<i64>,
}

/// Check `value` for `key` against the manifest's declaration.
pub fn validate(manifest: &Manifest, key: &str, value: &str) -> Result<(), SettingError> {
    let Some(spec) = manifest.settings.get(key) else {
        let known: Vec<&str> = manifest.settings.keys().map(String::as_str).collect();
        return Err(SettingError::invalid(
            key,
            if known.is_empty() {
                format!(
                    "unknown setting: the {} connector declares no settings",
                    manifest.name
                )
            } else {
                format!(
                    "unknown setting: the {} connector declares {}",
                    manifest.name,
                    known.join(", ")
                )
            },
        ));
    };
    check_value(key, spec, value)
}

fn check_value(key: &str, spec: &SettingSpec, value: &str) -> Result<(), SettingError> {
    let chars = value.chars().count();
    if value.is_empty() {
        return Err(SettingError::invalid(
            key,
            "is empty; unset it to use the default",
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(SettingError::invalid(
            key,
            "contains a control character (line break, tab, ...)",
        ));
    }
    if chars > spec.max_chars() {
        return Err(SettingError::invalid(
            key,
            format!(
                "is too long: {chars} characters, at most {}",
                spec.max_chars()
            ),
        ));
    }
    if let Some(min) = spec.min_length
        && chars < min as usize
    {
        return Err(SettingError::invalid(
            key,
            format!("is too short: {chars} characters, at least {min}"),
        ));
    }
    if !spec.allowed.is_empty() && !spec.allowed.iter().any(|a| a == value) {
        // A secret's value is not repeated back.
        let shown = if spec.secret {
            "this value".to_string()
        } else {
            format!("{value:?}")
        };
        return Err(SettingError::invalid(
            key,
            format!(
                "{shown} is not allowed; choose one of {}",
                spec.allowed.join(", ")
            ),
        ));
    }
    Ok(())
}

/// The settings of `tenant_id`'s connector as an admin sees them: every
/// declared key, then stored keys the manifest no longer declares.
pub async fn view(
    store: &Store,
    keys: &KeyRing,
    manifest: &Manifest,
    tenant_id: &str,
) -> Result<Vec<SettingView>, StoreError> {
    let mut stored: BTreeMap<String, _> = store
        .connection_settings(keys, tenant_id, &manifest.id)
        .await?
        .into_iter()
        .map(|s| (s.key.clone(), s))
        .collect();
    let mut out = Vec::new();
    for (key, spec) in manifest.settings.specs() {
        let own = stored.remove(key);
        let value = if spec.secret {
            Some(
                if own.is_some() {
                    MASK_SET
                } else {
                    MASK_NOT_SET
                }
                .to_string(),
            )
        } else {
            own.as_ref()
                .map(|s| s.value.expose().to_string())
                .or_else(|| spec.default.clone())
        };
        out.push(SettingView {
            key: key.clone(),
            description: spec.description.clone(),
            secret: spec.secret,
            allowed: spec.allowed.clone(),
            default: spec.default.clone(),
            value,
            stored: own.is_some(),
            declared: true,
            updated_by: own.as_ref().and_then(|s| s.updated_by.clone()),
            updated_at: own.as_ref().map(|s| s.updated_at),
        });
    }
    // Keys the manifest stopped declaring: shown masked (nobody says
    // whether they are secret any more).
    for (key, s) in stored {
        out.push(SettingView {
            key,
            description: None,
            secret: true,
            allowed: Vec::new(),
            default: None,
            value: Some(MASK_SET.to_string()),
            stored: true,
            declared: false,
            updated_by: s.updated_by,
            updated_at: Some(s.updated_at),
        });
    }
    Ok(out)
}

/// Check and store `key = value` for `tenant_id`'s connector, and record
/// it in the audit log (the value only when the key is not a secret).
#[allow(clippy::too_many_arguments)]
pub async fn set(
    store: &Store,
    keys: &KeyRing,
    manifest: &Manifest,
    tenant_id: &str,
    key: &str,
    value: &str,
    actor: &str,
    now: i64,
) -> Result<(), SettingError> {
    change(
        store,
        keys,
        manifest,
        tenant_id,
        &[(key, Some(value))],
        actor,
        now,
    )
    .await
}

/// Refuse a change by nobody: the audit log names who made each one.
fn check_actor(actor: &str) -> Result<(), SettingError> {
    if actor.trim().is_empty() {
        return Err(SettingError::invalid(
            "actor",
            "who is changing the setting must be named",
        ));
    }
    Ok(())
}

/// Set and remove several settings at once (`None`: remove), each checked
/// against the declaration first, then written with their audit entries in
/// one transaction: all or nothing.
#[allow(clippy::too_many_arguments)]
pub async fn change(
    store: &Store,
    keys: &KeyRing,
    manifest: &Manifest,
    tenant_id: &str,
    changes: &[(&str, Option<&str>)],
    actor: &str,
    now: i64,
) -> Result<(), SettingError> {
    check_actor(actor)?;
    let mut planned = Vec::new();
    for (key, value) in changes {
        match value {
            Some(value) => {
                validate(manifest, key, value)?;
                let secret = manifest.settings.get(key).is_some_and(|s| s.secret);
                planned.push(SettingChange {
                    key,
                    value: Some(value),
                    action: "setting.set",
                    detail: if secret {
                        format!("{} {key} (secret, changed)", manifest.id)
                    } else {
                        format!("{} {key} = {value}", manifest.id)
                    },
                });
            }
            None => {
                if manifest.settings.get(key).is_none() {
                    return Err(SettingError::invalid(key, "unknown setting"));
                }
                planned.push(SettingChange {
                    key,
                    value: None,
                    action: "setting.unset",
                    detail: format!("{} {key}", manifest.id),
                });
            }
        }
    }
    let done = store
        .change_connection_settings(keys, tenant_id, &manifest.id, &planned, actor, now)
        .await?;
    for key in done {
        tracing::info!(tenant = %tenant_id, connector = %manifest.id, key, actor, "connection setting changed");
    }
    Ok(())
}

/// Remove the stored value of `key` (the default applies again) and record
/// it in the audit log. Refused naming the key when nothing is stored.
pub async fn unset(
    store: &Store,
    connector_id: &str,
    tenant_id: &str,
    key: &str,
    actor: &str,
    now: i64,
) -> Result<(), SettingError> {
    check_actor(actor)?;
    if !store
        .unset_connection_setting(tenant_id, connector_id, key)
        .await?
    {
        return Err(SettingError::invalid(
            key,
            "is not set on this connection (the default already applies)",
        ));
    }
    store
        .audit(
            actor,
            Some(tenant_id),
            "setting.unset",
            &format!("{connector_id} {key}"),
            now,
        )
        .await?;
    tracing::info!(tenant = %tenant_id, connector = %connector_id, key, actor, "connection setting removed");
    Ok(())
}

/// What a connector call on `tenant_id`'s `connector_id` sees: the
/// manifest's defaults (when the connector is known) overlaid with the
/// stored values.
pub async fn effective(
    store: &Store,
    keys: &KeyRing,
    manifest: Option<&Manifest>,
    tenant_id: &str,
    connector_id: &str,
) -> Result<BTreeMap<String, String>, StoreError> {
    Ok(overlay(
        manifest,
        store
            .connection_settings(keys, tenant_id, connector_id)
            .await?,
    ))
}

/// The manifest's defaults overlaid with `stored` (see [`effective`]).
pub fn overlay(
    manifest: Option<&Manifest>,
    stored: impl IntoIterator<Item = StoredSetting>,
) -> BTreeMap<String, String> {
    let mut out = manifest.map(|m| m.settings.defaults()).unwrap_or_default();
    for s in stored {
        out.insert(s.key, s.value.expose().to_string());
    }
    out
}

/// [`connection_info`] from settings already read (the dispatcher reads a
/// batch's ahead: see [`crate::store::ahead`]).
pub fn connection_info_with(
    manifest: Option<&Manifest>,
    conn: &Connection,
    stored: impl IntoIterator<Item = StoredSetting>,
) -> ConnectionInfo {
    ConnectionInfo {
        connection_id: conn.id.clone(),
        tenant_id: conn.tenant_id.clone(),
        external_tenant_id: conn.external_tenant_id.clone(),
        external_tenant_name: conn.external_tenant_name.clone(),
        settings: overlay(manifest, stored),
    }
}

/// The [`ConnectionInfo`] a connector call on `conn` runs with: its
/// organisation and its [`effective`] settings. The one place both the
/// connections service and the dispatcher build it.
pub async fn connection_info(
    store: &Store,
    keys: &KeyRing,
    manifest: Option<&Manifest>,
    conn: &Connection,
) -> Result<ConnectionInfo, StoreError> {
    Ok(ConnectionInfo {
        connection_id: conn.id.clone(),
        tenant_id: conn.tenant_id.clone(),
        external_tenant_id: conn.external_tenant_id.clone(),
        external_tenant_name: conn.external_tenant_name.clone(),
        settings: effective(store, keys, manifest, &conn.tenant_id, &conn.connector_id).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest::parse(
            r#"
id = "webhook"
name = "JSON webhook"
version = "0.1.0"
contract = "0.1.0"
component = "w.wasm"
allowed_hosts = ["https://hooks.example.com"]
document_kinds = ["invoice"]

[settings]
endpoint = "https://hooks.example.com/x"

[settings.status]
default = "AUTHORISED"
allowed = ["DRAFT", "AUTHORISED"]

[settings.signing_secret]
secret = true
min_length = 16
max_length = 64
"#,
        )
        .unwrap()
    }

    fn refused(key: &str, value: &str) -> SettingError {
        validate(&manifest(), key, value).unwrap_err()
    }

    #[test]
    fn accepts_declared_values() {
        let m = manifest();
        validate(&m, "status", "DRAFT").unwrap();
        validate(&m, "endpoint", "/elsewhere").unwrap();
        validate(&m, "signing_secret", "0123456789abcdef").unwrap();
    }

    #[test]
    fn every_refusal_names_the_key() {
        for (key, value, words) in [
            ("bogus", "1", "unknown setting"),
            ("status", "FINAL", "not allowed"),
            ("status", "draft", "DRAFT, AUTHORISED"),
            ("signing_secret", "short", "too short"),
            ("signing_secret", &"x".repeat(65), "too long"),
            ("endpoint", &"x".repeat(5000), "at most 2048"),
            ("endpoint", "", "empty"),
            ("endpoint", "a\nb", "control character"),
        ] {
            let e = refused(key, value);
            assert_eq!(e.field(), key, "{e}");
            assert_eq!(e.status(), 422);
            assert!(e.message().contains(words), "{key}: {e}");
        }
    }

    #[test]
    fn unknown_key_lists_the_declared_ones() {
        let e = refused("bogus", "1");
        assert!(
            e.message().contains("endpoint, signing_secret, status"),
            "{e}"
        );
    }
}
