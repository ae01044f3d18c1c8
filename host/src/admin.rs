//! The admin HTTP API behind the platform's Integrations page and for
//! operators: tenants, connection status, connect / disconnect, mappings
//! with the organisation's accounts, connector settings per connection
//! (secrets write-only), the delivery log with retry, and the audit log. Every route needs a bearer key: an operator key reaches every
//! tenant, a tenant key only its own (anything else is 403 naming the
//! tenant), an ingest key none.
//!
//! Changes act for a named admin that the platform asserts in two headers:
//! `X-Ledgerport-Admin` (who, e.g. an e-mail) and `X-Ledgerport-Role`, which
//! must be `super-admin` to connect, configure or disconnect. Every change
//! is written to the audit log with actor and time.

use crate::api::error;
use crate::capabilities::mapping::{AccountMapping, MappingScope};
use crate::connections::Connections;
use crate::ingest::FieldProblem;
use crate::rejections::JsonObject;
use crate::store::Store;
use crate::store::admin::{KeyInfo, KeyScope};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::Arc;

/// Shared state of the admin API.
pub struct AdminState {
    /// The store.
    pub store: Store,
    /// The connections service.
    pub connections: Arc<Connections>,
    /// Called when deliveries were queued again.
    pub on_retry: Box<dyn Fn() + Send + Sync>,
    /// The daemon's public URL (`https://ledgerport.example.com`): the
    /// origin the Integrations page's forms must come from, and whether
    /// its cookie is `Secure`.
    pub public_url: String,
}

type S = State<Arc<AdminState>>;

fn problem(field: &str, message: impl Into<String>) -> Vec<FieldProblem> {
    vec![FieldProblem {
        field: field.into(),
        message: message.into(),
    }]
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The caller's key, or 401.
pub async fn authenticate(store: &Store, headers: &HeaderMap) -> Result<KeyInfo, Box<Response>> {
    let Some(key) = crate::api::bearer(headers) else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing key",
            &problem("authorization", "send `Authorization: Bearer <key>`"),
        )));
    };
    match store.verify_key(key).await {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "unknown or revoked key",
            &problem("authorization", "the key is not valid"),
        ))),
        Err(e) => Err(Box::new(unavailable(e))),
    }
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "admin request failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "storage is unavailable; retry later"})),
    )
        .into_response()
}

/// May this key act on `tenant`?
fn allowed(key: &KeyInfo, tenant: &str) -> Result<(), Box<Response>> {
    match &key.scope {
        KeyScope::Operator => Ok(()),
        KeyScope::Tenant(t) if t == tenant => Ok(()),
        KeyScope::Tenant(_) => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "this key belongs to another tenant",
            &problem(
                "tenant",
                format!("the key may not read or change tenant {tenant:?}"),
            ),
        ))),
        KeyScope::Ingest => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "an ingest key cannot use the admin API",
            &problem("authorization", "use a tenant or operator key"),
        ))),
    }
}

async fn guard(
    st: &AdminState,
    headers: &HeaderMap,
    tenant: &str,
) -> Result<KeyInfo, Box<Response>> {
    let key = authenticate(&st.store, headers).await?;
    allowed(&key, tenant)?;
    match st.store.tenant(tenant).await {
        Ok(Some(_)) => Ok(key),
        Ok(None) => Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "unknown tenant",
            &problem("tenant", format!("{tenant:?} is not a tenant")),
        ))),
        Err(e) => Err(Box::new(unavailable(e))),
    }
}

/// The acting Super Admin, from the platform's headers.
fn super_admin(headers: &HeaderMap) -> Result<String, Box<Response>> {
    let who = headers
        .get("x-ledgerport-admin")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let role = headers
        .get("x-ledgerport-role")
        .and_then(|v| v.to_str().ok());
    match (who, role) {
        (None, _) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "who is acting must be named",
            &problem(
                "x-ledgerport-admin",
                "the platform must name the acting admin",
            ),
        ))),
        (Some(_), r) if r != Some("super-admin") => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "only a Super Admin may change integrations",
            &problem("x-ledgerport-role", "must be super-admin"),
        ))),
        (Some(w), _) => Ok(w.to_string()),
    }
}

macro_rules! try_box {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return *r,
        }
    };
}

/// The admin routes.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/v1/admin/tenants", get(tenants))
        .route("/v1/admin/tenants/{tenant}/status", get(status))
        .route("/v1/admin/tenants/{tenant}/deliveries", get(deliveries))
        .route("/v1/admin/tenants/{tenant}/deliveries/retry", post(retry))
        .route("/v1/admin/tenants/{tenant}/mappings", get(mappings))
        .route(
            "/v1/admin/tenants/{tenant}/mappings/{kind}",
            put(set_mapping).delete(unset_mapping),
        )
        .route(
            "/v1/admin/tenants/{tenant}/confirm-mappings",
            post(confirm_mappings),
        )
        .route(
            "/v1/admin/tenants/{tenant}/settings/{connector}",
            get(settings),
        )
        .route(
            "/v1/admin/tenants/{tenant}/settings/{connector}/{key}",
            put(set_setting).delete(unset_setting),
        )
        .route(
            "/v1/admin/tenants/{tenant}/connect/{connector}",
            post(connect),
        )
        .route(
            "/v1/admin/tenants/{tenant}/disconnect/{connector}",
            post(disconnect),
        )
        .route("/v1/admin/tenants/{tenant}/check/{connector}", post(check))
        .route("/v1/admin/tenants/{tenant}/audit", get(audit))
        .route("/v1/admin/tenants/{tenant}/missed/{connector}", get(missed))
        .route(
            "/v1/admin/tenants/{tenant}/missed/{connector}/send",
            post(send_missed),
        )
        .route(
            "/v1/admin/tenants/{tenant}/page-sessions",
            post(page_session).delete(end_page_sessions),
        )
        // The key is checked before any query or body is read: a caller
        // without one gets 401, not a 400 about its input.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin_key,
        ))
        // Described without a key.
        .route("/openapi.json", get(openapi))
        .layer(axum::middleware::from_fn(crate::rejections::as_json))
        .with_state(state)
}

/// Every admin route's key check, run before the route's extractors: the
/// key (401), its scope over the route's `{tenant}` (403) and that tenant
/// (404), as [`guard`]; without a `{tenant}`, the key alone. The verified
/// key reaches the handler as an extension.
async fn admin_key(
    State(st): S,
    Path(params): Path<std::collections::HashMap<String, String>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // A NUL character in the path or query (PostgreSQL cannot hold one):
    // 400 naming it, once the key is known to be good (401 first).
    if let Some(refusal) = crate::rejections::nul_in_uri(req.uri()) {
        return match authenticate(&st.store, req.headers()).await {
            Ok(_) => refusal,
            Err(r) => *r,
        };
    }
    let key = match params.get("tenant") {
        Some(tenant) => guard(&st, req.headers(), tenant).await,
        None => authenticate(&st.store, req.headers()).await,
    };
    match key {
        Ok(key) => {
            req.extensions_mut().insert(key);
            next.run(req).await
        }
        Err(r) => *r,
    }
}

async fn tenants(Extension(key): Extension<KeyInfo>, State(st): S) -> Response {
    if matches!(key.scope, KeyScope::Ingest) {
        return *allowed(&key, "").unwrap_err();
    }
    let all = match st.store.tenants().await {
        Ok(t) => t,
        Err(e) => return unavailable(e),
    };
    let visible: Vec<Value> = all
        .into_iter()
        .filter(|t| allowed(&key, &t.id).is_ok())
        .map(|t| json!({"id": t.id, "name": t.name, "emails": t.emails}))
        .collect();
    Json(json!({ "tenants": visible })).into_response()
}

async fn status(State(st): S, Path(tenant): Path<String>) -> Response {
    let conns = match st.store.connections(Some(&tenant)).await {
        Ok(c) => c,
        Err(e) => return unavailable(e),
    };
    // The tenant's recent deliveries, read once and split by connection;
    // a connection with none among them (a quieter connector beside a busy
    // one) is asked on its own.
    let delivered = match st
        .store
        .list_deliveries(Some(&tenant), None, Some("delivered"), 200)
        .await
    {
        Ok(d) => d,
        Err(e) => return unavailable(e),
    };
    let mut out = Vec::new();
    for c in conns {
        let counts = match st.store.delivery_counts(Some(&c.id)).await {
            Ok(c) => c,
            Err(e) => return unavailable(e),
        };
        let n = |s: &str| {
            counts
                .iter()
                .find(|(k, _)| k == s)
                .map(|(_, n)| *n)
                .unwrap_or(0)
        };
        let reasons = match st.store.pause_reasons(&c.id).await {
            Ok(r) => r,
            Err(e) => return unavailable(e),
        };
        let missed = match st.connections.manifest(&c.connector_id) {
            Some(m) => match st.store.missed_documents(&c.id, &m.document_kinds, 0).await {
                Ok((n, _)) => n,
                Err(e) => return unavailable(e),
            },
            None => 0,
        };
        let recent = delivered
            .iter()
            .filter(|d| d.connection_id == c.id)
            .filter_map(|d| d.delivered_at)
            .max();
        let last_success = match recent {
            Some(t) => Some(t),
            None => match st.store.last_delivered_at(&c.id).await {
                Ok(t) => t,
                Err(e) => return unavailable(e),
            },
        };
        out.push(json!({
            "connection_id": c.id, "connector": c.connector_id, "state": c.state,
            "organisation": c.external_tenant_name, "connected_by": c.connected_by,
            "connected_at": c.connected_at, "reason": c.state_reason,
            "last_success_at": last_success,
            "backlog": n("pending") + n("working"), "paused": n("paused"), "failed": n("failed"),
            "paused_reasons": reasons, "mappings_review": c.mappings_review,
            "missed": missed,
        }));
    }
    Json(json!({ "tenant": tenant, "connections": out })).into_response()
}

#[derive(serde::Deserialize)]
struct LogQuery {
    number: Option<String>,
    state: Option<String>,
    limit: Option<i64>,
    /// The `next` of the previous page.
    after: Option<String>,
}

/// Attempts shown per delivery in the log (the latest; `attempts_total`
/// counts them all).
const LOG_ATTEMPTS: i64 = 50;

async fn deliveries(
    State(st): S,
    Path(tenant): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    let after = match crate::api::log_query(q.state.as_deref(), q.after.as_deref()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match st
        .store
        .list_deliveries_page(
            Some(&tenant),
            q.number.as_deref(),
            q.state.as_deref(),
            after.as_ref(),
            limit,
        )
        .await
    {
        Ok(rows) => {
            let next = crate::api::next_page(&rows, limit);
            let mut out = Vec::new();
            for r in rows {
                let (attempts, total) = match (
                    st.store.recent_attempts(&r.id, LOG_ATTEMPTS).await,
                    st.store.attempt_count(&r.id).await,
                ) {
                    (Ok(a), Ok(n)) => (a, n),
                    (Err(e), _) | (_, Err(e)) => return unavailable(e),
                };
                out.push(json!({ "delivery": r, "attempts": attempts, "attempts_total": total }));
            }
            Json(json!({ "deliveries": out, "next": next })).into_response()
        }
        Err(e) => unavailable(e),
    }
}

async fn retry(
    State(st): S,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    body: JsonObject,
) -> Response {
    let actor = headers
        .get("x-ledgerport-admin")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("api")
        .to_string();
    // No body (or `{}`) retries every failed delivery; `{"id"}` one. A body
    // that says anything else is refused rather than read as "all".
    if let Err(r) = body.only(&["id"]) {
        return r;
    }
    if body
        .0
        .as_ref()
        .is_some_and(|m| m.get("id") == Some(&Value::Null))
    {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "wrong type",
            &problem(
                "id",
                "must be a delivery's id (a string); send no body to retry every failed delivery",
            ),
        );
    }
    let id = match body.string("id") {
        Ok(id) => id.map(String::from),
        Err(r) => return r,
    };
    let now_ms = crate::dispatch::now_ms();
    match st.store.retry_failed(&tenant, id.as_deref(), now_ms).await {
        Ok(0) if id.is_some() => {
            let id = id.unwrap_or_default();
            match st.store.delivery_state(&tenant, &id).await {
                Ok(None) => error(
                    StatusCode::NOT_FOUND,
                    "no such delivery",
                    &problem(
                        "id",
                        format!("{id:?} is not a delivery of tenant {tenant:?}"),
                    ),
                ),
                Ok(Some(state)) => error(
                    StatusCode::CONFLICT,
                    "the delivery is not failed",
                    &problem(
                        "id",
                        format!("{id:?} is {state}; only failed or paused deliveries are retried"),
                    ),
                ),
                Err(e) => unavailable(e),
            }
        }
        Ok(n) => {
            let _ = st
                .store
                .audit(
                    &actor,
                    Some(&tenant),
                    "retry",
                    &format!(
                        "{n} delivery(ies){}",
                        id.map(|i| format!(" ({i})")).unwrap_or_default()
                    ),
                    now(),
                )
                .await;
            (st.on_retry)();
            Json(json!({ "requeued": n })).into_response()
        }
        Err(e) => unavailable(e),
    }
}

/// The tenant's connection to `connector` and the document kinds its
/// connector takes: what [`Store::missed_documents`] needs. 404 naming
/// `connector` when it is not installed or the tenant never connected it.
async fn missed_scope(
    st: &AdminState,
    tenant: &str,
    connector: &str,
) -> Result<(crate::store::Connection, Vec<String>), Response> {
    let Some(manifest) = st.connections.manifest(connector) else {
        return Err(not_installed(connector));
    };
    match st.store.connection_for(tenant, connector).await {
        Ok(Some(c)) => Ok((c, manifest.document_kinds)),
        Ok(None) => Err(error(
            StatusCode::NOT_FOUND,
            "not connected",
            &problem(
                "connector",
                format!(
                    "tenant {tenant:?} has never connected {connector:?}, so it missed nothing"
                ),
            ),
        )),
        Err(e) => Err(unavailable(e)),
    }
}

#[derive(serde::Deserialize)]
struct MissedQuery {
    limit: Option<i64>,
}

/// Documents issued while the connection was disconnected: never sent to
/// it (see [`crate::store::missed`]).
async fn missed(
    State(st): S,
    Path((tenant, connector)): Path<(String, String)>,
    Query(q): Query<MissedQuery>,
) -> Response {
    let (conn, kinds) = match missed_scope(&st, &tenant, &connector).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let (too_old, too_old_documents) = match st.store.missed_too_old(&conn.id, &kinds, limit).await
    {
        Ok(t) => t,
        Err(e) => return unavailable(e),
    };
    match st.store.missed_documents(&conn.id, &kinds, limit).await {
        Ok((count, documents)) => Json(json!({
            "connector": connector, "connection_id": conn.id, "state": conn.state,
            "count": count, "documents": documents,
            "too_old": too_old, "too_old_documents": too_old_documents,
        }))
        .into_response(),
        Err(e) => unavailable(e),
    }
}

/// Send what the connection missed: `{"documents": [ids]}` those, no body
/// all of them. A Super Admin's decision, as connecting and disconnecting
/// are (a disconnect may have been meant to keep a period out of the
/// books).
async fn send_missed(
    State(st): S,
    headers: HeaderMap,
    Path((tenant, connector)): Path<(String, String)>,
    body: JsonObject,
) -> Response {
    let actor = try_box!(super_admin(&headers));
    if let Err(r) = body.only(&["documents"]) {
        return r;
    }
    let ids: Option<Vec<String>> = match body.0.as_ref().and_then(|m| m.get("documents")) {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "no documents named",
                    &problem(
                        "documents",
                        "is empty: name at least one document's id, or send no body to send every missed document",
                    ),
                );
            }
            if items.len() > crate::store::missed::SEND_IDS_MAX {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "too many documents",
                    &problem(
                        "documents",
                        format!(
                            "names {} documents; at most {} at once (send no body to send them all)",
                            items.len(),
                            crate::store::missed::SEND_IDS_MAX
                        ),
                    ),
                );
            }
            let mut ids = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(id)
                        if !id.is_empty() && !id.contains('\0') && id.len() <= 200 =>
                    {
                        ids.push(id.clone())
                    }
                    other => {
                        return error(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "not a document id",
                            &problem(
                                &format!("documents[{i}]"),
                                format!(
                                    "must be a document's id (a non-empty string of at most 200 bytes, no NUL), not {other}"
                                ),
                            ),
                        );
                    }
                }
            }
            Some(ids)
        }
        Some(other) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "wrong type",
                &problem(
                    "documents",
                    format!(
                        "must be a list of document ids, not {other}; send no body to send every missed document"
                    ),
                ),
            );
        }
    };
    let (conn, kinds) = match missed_scope(&st, &tenant, &connector).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match st
        .store
        .send_missed(&conn.id, &kinds, ids.as_deref(), crate::dispatch::now_ms())
        .await
    {
        Ok(r) if !r.not_missed.is_empty() => {
            let all = ids.unwrap_or_default();
            let problems: Vec<FieldProblem> = r
                .not_missed
                .iter()
                .map(|id| FieldProblem {
                    field: format!(
                        "documents[{}]",
                        all.iter().position(|a| a == id).unwrap_or_default()
                    ),
                    message: format!(
                        "{id:?} is not a document this connection missed: not the tenant's, sent to it already, of a kind {connector} does not take, issued before it was first disconnected, or too old to send (its content is no longer kept); nothing was sent"
                    ),
                })
                .collect();
            error(StatusCode::NOT_FOUND, "not a missed document", &problems)
        }
        Ok(r) => {
            let _ = st
                .store
                .audit(
                    &actor,
                    Some(&tenant),
                    "send-missed",
                    &format!("{} document(s) to {connector}", r.queued),
                    now(),
                )
                .await;
            if r.queued > 0 {
                (st.on_retry)();
            }
            Json(json!({ "queued": r.queued })).into_response()
        }
        Err(crate::store::StoreError::Conflict(m)) => error(
            StatusCode::CONFLICT,
            "disconnected",
            &problem("connector", m),
        ),
        Err(crate::store::StoreError::NotFound(_)) => error(
            StatusCode::NOT_FOUND,
            "not connected",
            &problem(
                "connector",
                format!("tenant {tenant:?} has no {connector:?} connection"),
            ),
        ),
        Err(e) => unavailable(e),
    }
}

/// 404 naming `connector`: no such connector is installed here.
fn not_installed(connector: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such connector",
        &problem(
            "connector",
            format!("{connector:?} is not installed on this daemon"),
        ),
    )
}

/// `?connector=` of the mapping routes: whose mappings (default `xero`,
/// the first connector, for callers written before there were others).
#[derive(Debug, serde::Deserialize)]
struct ConnectorQuery {
    connector: Option<String>,
}

/// The mapping scope of `tenant` and the query's connector, or 404 naming
/// `connector` when no such connector is installed (a typo must not file
/// mappings nobody reads).
fn mapping_scope(
    st: &AdminState,
    tenant: &str,
    q: ConnectorQuery,
) -> Result<MappingScope, Box<Response>> {
    let connector = q.connector.unwrap_or_else(|| "xero".into());
    if st.connections.manifest(&connector).is_none() {
        return Err(Box::new(not_installed(&connector)));
    }
    Ok(MappingScope {
        tenant_id: tenant.to_string(),
        connector_id: connector,
    })
}

async fn mappings(
    State(st): S,
    Path(tenant): Path<String>,
    Query(q): Query<ConnectorQuery>,
) -> Response {
    let scope = try_box!(mapping_scope(&st, &tenant, q));
    let current = match st.connections.mappings(&scope).await {
        Ok(m) => m,
        Err(e) => return unavailable(e),
    };
    let accounts = match st.connections.account_list(&scope).await {
        Ok(Some((org, list))) => json!({
            "organisation": org,
            "accounts": list.accounts.iter().map(|a| json!({"code": a.code, "name": a.name, "type": a.account_type, "tax_type": a.tax_type})).collect::<Vec<_>>(),
            "tax_rates": list.tax_rates.iter().map(|t| json!({"tax_type": t.tax_type, "name": t.name, "rate": t.rate})).collect::<Vec<_>>(),
        }),
        Ok(None) => Value::Null,
        Err(e) => json!({"error": e.to_string()}),
    };
    let kinds: Vec<Value> = st
        .connections
        .catalogue()
        .map(|c| {
            c.kinds
                .iter()
                .map(|k| json!({"key": k.key, "name": k.name}))
                .collect()
        })
        .unwrap_or_default();
    Json(json!({
        "mappings": current.iter().map(|m| json!({"kind": m.mapping.kind, "account_code": m.mapping.account_code, "tax_type": m.mapping.tax_type, "updated_by": m.updated_by, "updated_at": m.updated_at})).collect::<Vec<_>>(),
        "choices": accounts,
        "kinds": kinds,
    }))
    .into_response()
}

async fn set_mapping(
    State(st): S,
    headers: HeaderMap,
    Path((tenant, kind)): Path<(String, String)>,
    Query(q): Query<ConnectorQuery>,
    body: JsonObject,
) -> Response {
    let actor = try_box!(super_admin(&headers));
    let scope = try_box!(mapping_scope(&st, &tenant, q));
    if let Err(r) = body.only(&["account_code", "tax_type"]) {
        return r;
    }
    let code = match body.string("account_code") {
        Ok(Some(code)) => code.to_string(),
        Ok(None) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "account_code is required",
                &problem(
                    "account_code",
                    "is required: send {\"account_code\": \"...\"}",
                ),
            );
        }
        Err(r) => return r,
    };
    let tax = match body.string("tax_type") {
        Ok(t) => t.map(String::from),
        Err(r) => return r,
    };
    let m = AccountMapping {
        kind: kind.clone(),
        account_code: code.clone(),
        tax_type: tax.clone(),
    };
    match st.connections.set_mapping(&scope, m, &actor).await {
        Ok(outcome) => {
            let _ = st
                .store
                .audit(
                    &actor,
                    Some(&tenant),
                    "mapping.set",
                    &format!(
                        "{} {kind} -> {code}{}",
                        scope.connector_id,
                        tax.map(|t| format!(" ({t})")).unwrap_or_default()
                    ),
                    now(),
                )
                .await;
            Json(json!({"connector": scope.connector_id, "kind": kind, "account_code": code, "validated_against": outcome.validated_against})).into_response()
        }
        Err(e) if e.status() == 500 => unavailable(e),
        Err(e) => error(
            mapping_refusal_status(&e),
            "the mapping was refused",
            &problem(e.field(), e.message()),
        ),
    }
}

/// The status of a refused mapping: 503 when the account list could not
/// be read to check it (it may be fine: retry later), 409 when the
/// provider no longer accepts the connection, else 422.
fn mapping_refusal_status(e: &crate::connections::mappings::MappingError) -> StatusCode {
    match e.status() {
        503 => StatusCode::SERVICE_UNAVAILABLE,
        409 => StatusCode::CONFLICT,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

/// Confirm the tenant's mappings as they stand, each checked against the
/// live organisation's accounts: after the connection switched to another
/// organisation nothing is sent until this (or the page's Save) is done.
/// 422 names the kind whose code the organisation does not have.
async fn confirm_mappings(
    State(st): S,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    Query(q): Query<ConnectorQuery>,
) -> Response {
    let actor = try_box!(super_admin(&headers));
    let scope = try_box!(mapping_scope(&st, &tenant, q));
    match st.connections.confirm_mappings(&scope).await {
        Ok((was_due, outcome)) => {
            let _ = st
                .store
                .audit(
                    &actor,
                    Some(&tenant),
                    "mapping.confirm",
                    &scope.connector_id,
                    now(),
                )
                .await;
            Json(json!({
                "connector": scope.connector_id,
                "confirmed": true,
                "review_was_due": was_due,
                "validated_against": outcome.validated_against,
            }))
            .into_response()
        }
        Err((_, e)) if e.status() == 500 => unavailable(e),
        Err((kind, e)) => {
            let status = mapping_refusal_status(&e);
            let field = kind
                .map(|k| format!("mappings.{k}"))
                .unwrap_or_else(|| e.field().to_string());
            error(
                status,
                "the mappings were not confirmed",
                &problem(&field, e.message()),
            )
        }
    }
}

async fn unset_mapping(
    State(st): S,
    headers: HeaderMap,
    Path((tenant, kind)): Path<(String, String)>,
    Query(q): Query<ConnectorQuery>,
) -> Response {
    let actor = try_box!(super_admin(&headers));
    let scope = try_box!(mapping_scope(&st, &tenant, q));
    match st.connections.delete_mapping(&scope, &kind).await {
        Ok(true) => {
            let _ = st
                .store
                .audit(
                    &actor,
                    Some(&tenant),
                    "mapping.delete",
                    &format!("{} {kind}", scope.connector_id),
                    now(),
                )
                .await;
            Json(json!({"connector": scope.connector_id, "kind": kind, "deleted": true}))
                .into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "no such mapping",
            &problem(
                "kind",
                format!("{kind:?} has no mapping for {}", scope.connector_id),
            ),
        ),
        Err(e) => unavailable(e),
    }
}

/// How long a sign-in link of the Integrations page may wait to be
/// opened, and how long the session it opens lasts (seconds).
pub const PAGE_TICKET_TTL: i64 = 120;
/// See [`PAGE_TICKET_TTL`].
pub const PAGE_SESSION_TTL: i64 = 8 * 3600;

/// `POST /page-sessions`: a one-time sign-in link to the Integrations page
/// for a named admin (`{"admin": "...", "role": "super-admin"}`), asked for
/// by the platform's backend with the tenant's key. The link carries a
/// ticket, not the key: the browser never sees the key, and the admin and
/// role are kept by the daemon, not in a cookie the browser could edit.
async fn page_session(
    Extension(key): Extension<KeyInfo>,
    State(st): S,
    Path(tenant): Path<String>,
    body: JsonObject,
) -> Response {
    if let Err(r) = body.only(&["admin", "role"]) {
        return r;
    }
    let admin = match body.string("admin") {
        Ok(Some(a)) if !a.trim().is_empty() && a.len() <= 320 => a.trim().to_string(),
        Ok(Some(_)) | Ok(None) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "who signs in must be named",
                &problem(
                    "admin",
                    "is required: the admin the page acts for (at most 320 characters), as the audit log will name them",
                ),
            );
        }
        Err(r) => return r,
    };
    let role = match body.string("role") {
        Ok(r) if r.is_none_or(|r| r.len() <= 64) => r.unwrap_or("").trim().to_string(),
        Ok(_) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "role too long",
                &problem(
                    "role",
                    "at most 64 characters; \"super-admin\" may change integrations",
                ),
            );
        }
        Err(r) => return r,
    };
    match st
        .store
        .create_page_ticket(&tenant, &admin, &role, &key.id, PAGE_TICKET_TTL, now())
        .await
    {
        Ok(ticket) => (
            StatusCode::CREATED,
            Json(json!({
                "login": format!("/integrations/login?ticket={ticket}"),
                "expires_in": PAGE_TICKET_TTL,
                "session_seconds": PAGE_SESSION_TTL,
            })),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}

/// `?admin=` of `DELETE /page-sessions` (a misspelt parameter must not
/// read as "everyone").
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminQuery {
    admin: Option<String>,
}

/// `DELETE /page-sessions[?admin=<who>]`: sign out one admin (or every
/// admin) of the tenant from the Integrations page, at once: the platform
/// removed or demoted them. Unused sign-in links go too.
async fn end_page_sessions(
    State(st): S,
    Path(tenant): Path<String>,
    Query(q): Query<AdminQuery>,
) -> Response {
    let admin = q.admin.as_deref().map(str::trim);
    if admin == Some("") {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty admin",
            &problem(
                "admin",
                "name the admin to sign out, or leave ?admin= out for everyone",
            ),
        );
    }
    match st.store.end_page_sessions(&tenant, admin).await {
        Ok(n) => Json(json!({"ended": n})).into_response(),
        Err(e) => unavailable(e),
    }
}

fn setting_refused(e: crate::connections::SettingError) -> Response {
    if e.status() >= 500 {
        return unavailable(e);
    }
    error(
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
        "the setting was refused",
        &problem(e.field(), e.message()),
    )
}

async fn settings(State(st): S, Path((tenant, connector)): Path<(String, String)>) -> Response {
    match st.connections.settings(&tenant, &connector).await {
        Ok(list) => Json(json!({"connector": connector, "settings": list})).into_response(),
        Err(e) => setting_refused(e),
    }
}

async fn set_setting(
    State(st): S,
    headers: HeaderMap,
    Path((tenant, connector, key)): Path<(String, String, String)>,
    body: JsonObject,
) -> Response {
    let actor = try_box!(super_admin(&headers));
    if let Err(r) = body.only(&["value"]) {
        return r;
    }
    let value = match body.string("value") {
        Ok(Some(v)) => v,
        Ok(None) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "value is required",
                &problem("value", "send {\"value\": \"...\"} (a string)"),
            );
        }
        Err(r) => return r,
    };
    match st
        .connections
        .set_setting(&tenant, &connector, &key, value, &actor)
        .await
    {
        Ok(()) => Json(json!({"connector": connector, "key": key, "stored": true})).into_response(),
        Err(e) => setting_refused(e),
    }
}

async fn unset_setting(
    State(st): S,
    headers: HeaderMap,
    Path((tenant, connector, key)): Path<(String, String, String)>,
) -> Response {
    let actor = try_box!(super_admin(&headers));
    match st
        .connections
        .unset_setting(&tenant, &connector, &key, &actor)
        .await
    {
        Ok(()) => {
            Json(json!({"connector": connector, "key": key, "stored": false})).into_response()
        }
        Err(e) => setting_refused(e),
    }
}

async fn connect(
    State(st): S,
    headers: HeaderMap,
    Path((tenant, connector)): Path<(String, String)>,
) -> Response {
    let actor = try_box!(super_admin(&headers));
    let Some(grantless) = st.connections.connects_without_grant(&connector) else {
        return not_installed(&connector);
    };
    if grantless {
        // No consent screen: check the settings and connect now.
        return match st
            .connections
            .connect_without_grant(&tenant, &connector, &actor)
            .await
        {
            Ok(done) => {
                let c = &done.connection;
                let _ = st
                    .store
                    .audit(&actor, Some(&tenant), "connect", &connector, now())
                    .await;
                Json(json!({
                    "connected": true, "reconnected": done.reconnected,
                    "connection_id": c.id, "connector": c.connector_id, "state": c.state,
                    "organisation": c.external_tenant_name, "connected_by": c.connected_by,
                    "connected_at": c.connected_at,
                }))
                .into_response()
            }
            Err(e) if e.is_storage_failure() => unavailable(e),
            Err(e) => error(
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
                "cannot connect",
                &problem(
                    match &e {
                        crate::connections::ConnectError::BadRequest { field, .. } => field,
                        crate::connections::ConnectError::Refused(_) => "settings",
                        _ => "connector",
                    },
                    e.to_string(),
                ),
            ),
        };
    }
    match st
        .connections
        .begin_connect(&tenant, &connector, &actor)
        .await
    {
        Ok(url) => {
            let _ = st
                .store
                .audit(&actor, Some(&tenant), "connect.start", &connector, now())
                .await;
            Json(json!({"authorize_url": url.to_string()})).into_response()
        }
        Err(e) if e.is_storage_failure() => unavailable(e),
        Err(e) => error(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            "cannot start connecting",
            &problem("connector", e.to_string()),
        ),
    }
}

async fn disconnect(
    State(st): S,
    headers: HeaderMap,
    Path((tenant, connector)): Path<(String, String)>,
) -> Response {
    let actor = try_box!(super_admin(&headers));
    let conn = match st.store.connection_for(&tenant, &connector).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "not connected",
                &problem(
                    "connector",
                    format!("{tenant} has no {connector} connection"),
                ),
            );
        }
        Err(e) => return unavailable(e),
    };
    match st.connections.disconnect(&conn.id, &actor).await {
        Ok(report) => {
            let _ = st
                .store
                .audit(&actor, Some(&tenant), "disconnect", &connector, now())
                .await;
            Json(json!({
                "disconnected": true,
                "already_disconnected": conn.state == crate::store::ConnectionState::Disconnected,
                "organisation_link_removed": report.organisation_link_removed,
                "token_revoked": report.token_revoked,
                "problems": report.problems,
            }))
            .into_response()
        }
        Err(e) if e.is_storage_failure() => unavailable(e),
        Err(e) => error(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            "cannot disconnect",
            &problem("connector", e.to_string()),
        ),
    }
}

/// "Test connection": the connector's `check` on the live connection. Any
/// admin of the tenant may run it (it writes nothing in the accounting
/// system; see [`crate::connections::check`]); the answer names the
/// organisation, or says why the connection does not work.
async fn check(State(st): S, Path((tenant, connector)): Path<(String, String)>) -> Response {
    match st.connections.check_connection(&tenant, &connector).await {
        Ok(report) => Json(json!({
            "ok": true,
            "connector": connector,
            "organisation": report.organisation_name,
            "details": report.details,
        }))
        .into_response(),
        Err(crate::connections::CheckError::Store(e)) => unavailable(e),
        Err(e) => error(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY),
            "connection check failed",
            &problem("connector", e.to_string()),
        ),
    }
}

#[derive(serde::Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
    /// The `next` of the previous page.
    before: Option<String>,
}

async fn audit(State(st): S, Path(tenant): Path<String>, Query(q): Query<AuditQuery>) -> Response {
    let before = match q.before.as_deref().map(|b| b.parse::<i64>()) {
        None => None,
        Some(Ok(b)) if b > 0 => Some(b),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "not a page",
                &problem(
                    "before",
                    "must be the `next` of a previous page (a positive whole number)",
                ),
            );
        }
    };
    let limit = q.limit.unwrap_or(200).clamp(1, 1000);
    match st.store.audit_page(Some(&tenant), before, limit).await {
        Ok(entries) => {
            let next = (entries.len() as i64 == limit)
                .then(|| entries.last().map(|e| e.id))
                .flatten();
            Json(json!({ "audit": entries, "next": next })).into_response()
        }
        Err(e) => unavailable(e),
    }
}

async fn openapi() -> Json<Value> {
    let tenant_param =
        json!([{"name": "tenant", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let op = |summary: &str| json!({"summary": summary, "security": [{"bearer": []}], "parameters": tenant_param, "responses": {"200": {"description": "ok"}, "401": {"description": "no or bad key"}, "403": {"description": "another tenant's key, or not a Super Admin"}}});
    Json(json!({
        "openapi": "3.0.3",
        "info": {"title": "ledgerport", "version": env!("CARGO_PKG_VERSION")},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/documents": {"post": {"summary": "Hand over an issued invoice or credit note (ingest key)", "security": [{"bearer": []}], "responses": {"202": {"description": "stored"}, "200": {"description": "already stored"}, "409": {"description": "a different document with this id"}, "422": {"description": "invalid; every field named"}}}},
            "/v1/admin/tenants": {"get": {"summary": "Tenants this key may see", "security": [{"bearer": []}], "responses": {"200": {"description": "ok"}}}},
            "/v1/admin/tenants/{tenant}/status": {"get": op("Connections: state (and reason), connected_at (Unix seconds), last_success_at (Unix milliseconds, as the delivery log's times), backlog, paused, failed, paused_reasons, mappings_review (switched organisation: nothing is sent until the mappings are confirmed, POST confirm-mappings or the page's Save), missed (documents issued while the connection was disconnected and never sent to it: see missed/{connector}); 503 when the store cannot be read")},
            "/v1/admin/tenants/{tenant}/missed/{connector}": {"get": op("Documents issued while the connection was disconnected and never sent to it (ingest made no delivery while disconnected; reconnecting does not send them by itself): {count, documents: [{id, number, kind, received_at}]}, oldest first, ?limit= (1-1000, default 100); only documents received since the connection was first disconnected, of kinds its connector takes, whose content is still kept; 404 naming connector when it is not installed or was never connected")},
            "/v1/admin/tenants/{tenant}/missed/{connector}/send": {"post": op("Send what the connection missed: {\"documents\": [ids]} those (at most 500; 404 naming documents[i] for an id that is not a missed document, and then nothing is sent), no body every one; answers {queued}; 409 naming connector while it is disconnected; Super Admin")},
            "/v1/tenants/{tenant}/deliveries": {"get": {"summary": "The tenant's deliveries, the latest change first (ingest key); ?number= ?state= ?limit= (1-1000, default 100) ?after=<next of the previous page>; answers {deliveries, next}, next null on the last page; 400 names state or after when it is not one", "security": [{"bearer": []}], "parameters": tenant_param, "responses": {"200": {"description": "ok"}, "400": {"description": "the parameter named"}, "401": {"description": "no or bad key"}}}},
            "/v1/admin/tenants/{tenant}/deliveries": {"get": op("Delivery log with each delivery's last 50 attempts (attempts_total counts those kept: retention drops a delivered delivery's), the latest change first; ?number= ?state= ?limit= ?after=<next of the previous page>; answers {deliveries, next}; 400 names state or after when it is not one")},
            "/v1/admin/tenants/{tenant}/deliveries/retry": {"post": op("Retry one failed or paused delivery ({\"id\"}; 404 when it is not the tenant's, 409 when it is not failed or paused) or, with no body, every failed one")},
            "/v1/admin/tenants/{tenant}/confirm-mappings": {"post": op("Confirm the mappings as they stand for ?connector= (default xero), each checked against the live organisation's accounts (422 naming mappings.<kind> when it has no such account; 409 naming connection while a review is due and the connection cannot check them, e.g. disconnected): after the connection switched to another organisation nothing is sent until this or the Integrations page's Save is done; Super Admin")},
            "/v1/admin/tenants/{tenant}/mappings": {"get": op("Mappings, the catalogue and the organisation's accounts; ?connector= (default xero), 404 naming connector when it is not installed")},
            "/v1/admin/tenants/{tenant}/page-sessions": {"post": op("A one-time sign-in link to the Integrations page ({\"admin\", \"role\"}; 201 with login, a path valid for 120 s; the session lasts 8 h, until the admin signs out or is signed out, or until the key that asked is revoked)"), "delete": op("Sign out ?admin= (or every admin of the tenant) from the Integrations page at once, with their unused sign-in links and the connections they started and have not finished (a consent still open at the provider, an organisation not yet picked)")},
            "/v1/admin/tenants/{tenant}/mappings/{kind}": {"put": op("Map a kind ({\"account_code\", \"tax_type\"}) for ?connector= (default xero), checked against its chart of accounts when it has one (422 naming the field; 503 when the chart cannot be read); Super Admin"), "delete": op("Remove a kind's mapping for ?connector= (404 naming kind when there is none); Super Admin")},
            "/v1/admin/tenants/{tenant}/settings/{connector}": {"get": op("The connector's settings: every declared key with description, allowed values, default and the connection's value (secrets only \"set\" / \"not set\")")},
            "/v1/admin/tenants/{tenant}/settings/{connector}/{key}": {
                "put": op("Set one setting ({\"value\"}); 422 names the key when it is unknown, not allowed, too short or too long; Super Admin"),
                "delete": op("Unset one setting (the manifest's default applies again); Super Admin"),
            },
            "/v1/admin/tenants/{tenant}/connect/{connector}": {"post": op("Connect; Super Admin. A connector with OAuth: 200 {authorize_url}, where to send the admin. One without (e.g. the JSON webhook): the connector checks the tenant's settings and the connection is made at once, 200 {connected, reconnected, state, organisation}; 422 names what the connector refused (e.g. a missing setting), 502 what it could not reach, 404 not installed")},
            "/v1/admin/tenants/{tenant}/disconnect/{connector}": {"post": op("Disconnect (revokes at the provider, keeps mappings); Super Admin")},
            "/v1/admin/tenants/{tenant}/check/{connector}": {"post": op("Test the connection: the connector's check on the live connection; 200 names the organisation, 404 not connected, 409 not active, needing re-authorisation or not installed, 429 checked less than 5 s ago, 502 what the provider said, 503 database unavailable")},
            "/v1/admin/tenants/{tenant}/audit": {"get": op("Audit log, newest first: {audit: [{id, at (Unix seconds), actor, tenant_id, action, detail}], next}; ?limit= (1-1000, default 200) ?before=<next of the previous page>, next null on the last page; 400 naming before when it is not one")},
            "/oauth/callback": {"get": {"summary": "The provider's redirect (no key)", "responses": {"200": {"description": "connected or organisation picker"}}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {"get": {"summary": "Readiness (database)", "responses": {"200": {"description": "ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
        }
    }))
}
