//! The test-only control and inspection API under `/_sim/...` (JSON), and the
//! snapshot types shared with [`crate::SimHandle`].

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use uuid::Uuid;

use crate::config::{DEFAULT_CLIENT_ID, RateLimitConfig};
use crate::faults::FaultConfig;
use crate::identity::{create_grant, revoke_grant};
use crate::model::DocKind;
use crate::state::{GrantInfo, LoggedRequest, Shared, TokenSet};

/// Everything one organisation holds, rendered as Xero JSON.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct TenantDocuments {
    /// The tenant id.
    pub tenant_id: Uuid,
    /// Invoices (Xero JSON).
    pub invoices: Vec<Value>,
    /// Credit notes (Xero JSON).
    pub credit_notes: Vec<Value>,
    /// Contacts (Xero JSON).
    pub contacts: Vec<Value>,
    /// Attachments (Xero JSON: AttachmentID, FileName, Url, MimeType, ContentLength) plus `Owner` (`Invoices/<id>`).
    pub attachments: Vec<Value>,
    /// Allocations (Xero JSON with `CreditNote` and `Invoice`).
    pub allocations: Vec<Value>,
    /// History notes (Xero JSON `HistoryRecord`) plus `Owner`
    /// (`CreditNotes/<id>`), oldest first per document.
    #[serde(default)]
    pub history: Vec<Value>,
}

/// A grant created without the consent dance (`POST /_sim/grants`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IssuedGrant {
    /// The grant's auth event id.
    pub auth_event_id: Uuid,
    /// The tokens.
    pub tokens: TokenSet,
}

/// Request body of `POST /_sim/grants`.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct GrantRequest {
    /// Client id (default `ledgerport-demo`).
    pub client_id: Option<String>,
    /// Tenants to connect (default: all the user's).
    pub tenants: Option<Vec<Uuid>>,
    /// Scopes (default: granular invoices/contacts/settings/attachments + offline_access).
    pub scope: Option<String>,
}

/// The default scope of programmatic grants.
pub const DEFAULT_SCOPE: &str = "openid profile email offline_access accounting.invoices accounting.settings.read accounting.contacts accounting.attachments";

pub(crate) fn documents(shared: &Shared, tenant: Uuid) -> Option<TenantDocuments> {
    let t = shared.tenant(tenant)?;
    let t = t.lock();
    Some(TenantDocuments {
        tenant_id: tenant,
        invoices: t.invoices.iter().map(|d| d.to_json(&t, true)).collect(),
        credit_notes: t.credit_notes.iter().map(|d| d.to_json(&t, true)).collect(),
        contacts: t.contacts.iter().map(|c| c.to_json()).collect(),
        attachments: t
            .attachments
            .iter()
            .map(|a| {
                let mut v = a.to_json(&shared.base_url);
                if let Some(m) = v.as_object_mut() {
                    let coll = match a.owner_kind {
                        DocKind::Invoice => "Invoices",
                        DocKind::CreditNote => "CreditNotes",
                    };
                    m.insert("Owner".into(), json!(format!("{coll}/{}", a.owner_id)));
                }
                v
            })
            .collect(),
        allocations: t.allocations.iter().map(|a| a.to_json(&t, true)).collect(),
        history: t
            .invoices
            .iter()
            .chain(t.credit_notes.iter())
            .flat_map(|d| {
                d.history.iter().map(move |h| {
                    let mut v = h.to_json();
                    v["Owner"] = json!(format!("{}/{}", d.kind.collection(), d.id));
                    v
                })
            })
            .collect(),
    })
}

pub(crate) fn grants(shared: &Shared) -> Vec<GrantInfo> {
    let ids = shared.identity.lock();
    let mut v: Vec<GrantInfo> = ids.grants.values().map(|g| g.info()).collect();
    v.sort_by_key(|g| g.connections.first().map(|c| c.created));
    v
}

pub(crate) fn issue(shared: &Shared, req: GrantRequest) -> Result<IssuedGrant, String> {
    let client_id = req.client_id.unwrap_or_else(|| DEFAULT_CLIENT_ID.into());
    let app = shared
        .app(&client_id)
        .ok_or_else(|| format!("unknown client_id {client_id}"))?;
    let scope = crate::identity::validate_scope(
        app.scope_mode,
        req.scope.as_deref().unwrap_or(DEFAULT_SCOPE),
    )?;
    let tenants = req.tenants.unwrap_or_else(|| shared.user_tenants());
    if let Some(t) = tenants.iter().find(|t| shared.org(**t).is_none()) {
        return Err(format!("unknown tenant {t}"));
    }
    let tokens = create_grant(shared, &client_id, &scope, &tenants);
    let auth_event_id = shared
        .identity
        .lock()
        .access
        .get(&tokens.access_token)
        .map(|a| a.grant)
        .unwrap_or_default();
    Ok(IssuedGrant {
        auth_event_id,
        tokens,
    })
}

fn bad(msg: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": msg.into() })),
    )
        .into_response()
}

fn parse_json<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON: {e}")))
}

type S = State<Arc<Shared>>;

/// `GET /_sim/health`.
pub(crate) async fn health() -> Response {
    Json(json!({ "ok": true })).into_response()
}

/// `GET /_sim/config`: apps (without secrets' absence hidden), orgs, user.
pub(crate) async fn config(State(s): S) -> Response {
    Json(json!({
        "base_url": s.base_url,
        "apps": s.config.apps,
        "orgs": s.config.orgs,
        "user": s.config.user,
        "seed": s.config.seed,
    }))
    .into_response()
}

/// `GET /_sim/counters`.
pub(crate) async fn counters(State(s): S) -> Response {
    Json(s.counters()).into_response()
}

/// Filter the request log: entries after `since`, optionally by path prefix.
pub(crate) fn requests_since(
    shared: &Shared,
    since: u64,
    prefix: Option<&str>,
) -> Vec<LoggedRequest> {
    shared
        .log
        .lock()
        .iter()
        .filter(|r| r.seq > since)
        .filter(|r| prefix.is_none_or(|p| r.uri.starts_with(p)))
        .cloned()
        .collect()
}

/// `GET /_sim/requests?since=N&prefix=/api.xro`.
pub(crate) async fn requests(State(s): S, RawQuery(q): RawQuery) -> Response {
    let p: Vec<(String, String)> =
        serde_urlencoded::from_str(&q.unwrap_or_default()).unwrap_or_default();
    let since = p
        .iter()
        .find(|(k, _)| k == "since")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let prefix = p
        .iter()
        .find(|(k, _)| k == "prefix")
        .map(|(_, v)| v.as_str());
    Json(requests_since(&s, since, prefix)).into_response()
}

/// `DELETE /_sim/requests`.
pub(crate) async fn clear_requests(State(s): S) -> Response {
    s.log.lock().clear();
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /_sim/tenants`.
pub(crate) async fn tenants(State(s): S) -> Response {
    Json(&s.config.orgs).into_response()
}

/// `GET /_sim/tenants/{tenant}/documents`.
pub(crate) async fn tenant_documents(State(s): S, Path(t): Path<String>) -> Response {
    match t.parse().ok().and_then(|t| documents(&s, t)) {
        Some(d) => Json(d).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "unknown tenant"})),
        )
            .into_response(),
    }
}

/// `GET /_sim/grants`.
pub(crate) async fn grants_list(State(s): S) -> Response {
    Json(grants(&s)).into_response()
}

/// `POST /_sim/grants`.
pub(crate) async fn grants_create(State(s): S, body: axum::body::Bytes) -> Response {
    let req: GrantRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match issue(&s, req) {
        Ok(g) => Json(g).into_response(),
        Err(e) => bad(e),
    }
}

/// `POST /_sim/grants/{id}/revoke`.
pub(crate) async fn grants_revoke(State(s): S, Path(id): Path<String>) -> Response {
    let ok = id
        .parse()
        .ok()
        .is_some_and(|g| revoke_grant(&mut s.identity.lock(), g));
    if ok {
        StatusCode::NO_CONTENT.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

/// Body of `POST /_sim/clock`.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ClockRequest {
    /// Seconds to move forward (negative: back).
    pub advance_secs: Option<i64>,
    /// New speed factor.
    pub speed: Option<f64>,
    /// Absolute time to jump to.
    pub set: Option<DateTime<Utc>>,
}

fn clock_json(s: &Shared) -> Value {
    json!({ "now": s.clock.now(), "speed": s.clock.speed() })
}

/// `GET /_sim/clock`.
pub(crate) async fn clock_get(State(s): S) -> Response {
    Json(clock_json(&s)).into_response()
}

/// `POST /_sim/clock`.
pub(crate) async fn clock_post(State(s): S, body: axum::body::Bytes) -> Response {
    let req: ClockRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Some(t) = req.set {
        s.clock.set(t);
    }
    if let Some(a) = req.advance_secs {
        s.clock.advance_secs(a);
    }
    if let Some(sp) = req.speed {
        s.clock.set_speed(sp);
    }
    Json(clock_json(&s)).into_response()
}

/// `GET /_sim/faults`.
pub(crate) async fn faults_get(State(s): S) -> Response {
    Json(s.faults.lock().config.clone()).into_response()
}

/// `POST /_sim/faults`: replace the fault config (and reseed).
pub(crate) async fn faults_post(State(s): S, body: axum::body::Bytes) -> Response {
    let cfg: FaultConfig = match parse_json(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    s.faults.lock().replace(cfg.clone());
    Json(cfg).into_response()
}

/// `DELETE /_sim/faults`.
pub(crate) async fn faults_delete(State(s): S) -> Response {
    s.faults.lock().replace(FaultConfig::default());
    StatusCode::NO_CONTENT.into_response()
}

/// Body of `POST /_sim/auto-approve`.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AutoApproveRequest {
    /// `null`: show the consent page; `[]`: approve all the user's tenants; a list: those tenants.
    pub tenants: Option<Vec<Uuid>>,
}

/// `GET /_sim/auto-approve`.
pub(crate) async fn auto_approve_get(State(s): S) -> Response {
    Json(AutoApproveRequest {
        tenants: s.auto_approve.lock().clone(),
    })
    .into_response()
}

/// `POST /_sim/auto-approve`.
pub(crate) async fn auto_approve_post(State(s): S, body: axum::body::Bytes) -> Response {
    let req: AutoApproveRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    *s.auto_approve.lock() = req.tenants.clone();
    Json(req).into_response()
}

/// `GET /_sim/limits`.
pub(crate) async fn limits_get(State(s): S) -> Response {
    Json(s.limits.read().clone()).into_response()
}

/// `POST /_sim/limits`: replace the rate limits.
pub(crate) async fn limits_post(State(s): S, body: axum::body::Bytes) -> Response {
    let l: RateLimitConfig = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => return bad(format!("invalid JSON: {e}")),
    };
    *s.limits.write() = l.clone();
    Json(l).into_response()
}

/// `POST /_sim/reset`.
pub(crate) async fn reset(State(s): S) -> Response {
    s.reset();
    StatusCode::NO_CONTENT.into_response()
}
