//! The platform-facing HTTP API: ingest of issued documents and delivery
//! status, behind a service key. Every 4xx names the fields at fault.

use crate::ingest::{self, FieldProblem};
use crate::store::Store;
use crate::store::outbox::IngestOutcome;
use crate::store::outbox::{DeliveryRow, LogCursor, state as delivery_state};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Shared state of the API.
pub struct ApiState {
    /// The store.
    pub store: Store,
    /// Hashes (SHA-256, hex) of accepted service keys.
    pub service_key_hashes: Vec<String>,
    /// The line-item catalogue, when configured.
    pub catalogue: Option<BTreeSet<String>>,
    /// Called after a document was stored (wakes the dispatcher).
    pub on_ingest: Box<dyn Fn() + Send + Sync>,
    /// The document kinds each installed connector takes (its manifest's
    /// `document_kinds`), by connector id: a document goes to no connection
    /// of a connector that does not take its kind. A connector not named
    /// (installed on another daemon only) takes every kind.
    pub kinds: BTreeMap<String, Vec<String>>,
}

/// A JSON error with the problems named.
pub fn error(status: StatusCode, message: &str, problems: &[FieldProblem]) -> Response {
    (
        status,
        Json(json!({ "error": message, "problems": problems })),
    )
        .into_response()
}

/// The key of an `Authorization: Bearer <key>` header (the scheme's case
/// does not matter, RFC 9110 §11.1).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?.trim_start();
    let (scheme, key) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

#[allow(clippy::result_large_err)] // a Response is the natural error of a handler helper
async fn authorised(state: &ApiState, headers: &HeaderMap) -> Result<(), Response> {
    let key = bearer(headers);
    match key {
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "missing service key",
            &[FieldProblem {
                field: "authorization".into(),
                message: "send `Authorization: Bearer <service key>`".into(),
            }],
        )),
        Some(k)
            if state
                .service_key_hashes
                .contains(&crate::crypto::sha256_hex(k)) =>
        {
            Ok(())
        }
        Some(k)
            if matches!(
                state.store.verify_key(k).await,
                Ok(Some(crate::store::admin::KeyInfo {
                    scope: crate::store::admin::KeyScope::Ingest
                        | crate::store::admin::KeyScope::Operator,
                    ..
                }))
            ) =>
        {
            Ok(())
        }
        Some(_) => Err(error(
            StatusCode::UNAUTHORIZED,
            "unknown or revoked service key",
            &[FieldProblem {
                field: "authorization".into(),
                message: "the key is not valid".into(),
            }],
        )),
    }
}

/// The ingest and delivery-status routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route(
            "/v1/documents",
            post(post_document).layer(axum::extract::DefaultBodyLimit::max(
                crate::rejections::INGEST_BODY_LIMIT,
            )),
        )
        .route("/v1/tenants/{tenant}/deliveries", get(list_deliveries))
        // The key is checked before a body is read: an anonymous client
        // cannot make the daemon buffer 16 MiB.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            service_key,
        ))
        .layer(axum::middleware::from_fn(crate::rejections::as_json))
        .with_state(state)
}

/// Middleware: the service key (or an ingest or operator key), or 401.
async fn service_key(
    State(state): State<Arc<ApiState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorised(&state, req.headers()).await {
        // A NUL character in the path or query: 400 naming it (after the
        // key: a caller without one gets 401 whatever it sent).
        Ok(()) => match crate::rejections::nul_in_uri(req.uri()) {
            Some(refusal) => refusal,
            None => next.run(req).await,
        },
        Err(r) => r,
    }
}

/// Store a document and fan it out to the tenant's active connections.
pub async fn ingest_json(state: &ApiState, body: &Value) -> Response {
    let doc = match ingest::validate(body, state.catalogue.as_ref()) {
        Ok(d) => d,
        Err(problems) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the document is not valid",
                &problems,
            );
        }
    };
    let canonical = match serde_json::to_string(&doc) {
        Ok(c) => c,
        Err(e) => return server_error(e),
    };
    let hash = crate::crypto::sha256_hex(&canonical);
    let kind = match doc.kind {
        crate::document::DocumentKind::Invoice => "invoice",
        crate::document::DocumentKind::CreditNote => "credit-note",
    };
    let skip: Vec<String> = state
        .kinds
        .iter()
        .filter(|(_, kinds)| !kinds.iter().any(|k| k == kind))
        .map(|(id, _)| id.clone())
        .collect();
    let outcome = state
        .store
        .ingest_for_tenant(crate::store::outbox::NewDocument {
            tenant_id: &doc.tenant_id,
            document_id: &doc.id,
            kind,
            number: &doc.number,
            credits_invoice_number: doc.credits_invoice_number.as_deref(),
            body: &canonical,
            body_hash: &hash,
            now: crate::dispatch::now_ms(),
            skip_connectors: &skip,
        })
        .await;
    match outcome {
        Ok(IngestOutcome::Created { deliveries }) => {
            crate::metrics::DOCUMENTS_INGESTED.inc();
            (state.on_ingest)();
            // Why nothing was sent, as the stored note says: no connection,
            // or none whose connector takes this kind.
            let note = if deliveries > 0 {
                None
            } else {
                let connected = state
                    .store
                    .connections(Some(&doc.tenant_id))
                    .await
                    .map(|cs| {
                        cs.iter()
                            .any(|c| c.state != crate::store::ConnectionState::Disconnected)
                    })
                    .unwrap_or(false);
                Some(if connected {
                    "not sent: no connected accounting system takes this kind of document"
                } else {
                    "not sent: not connected"
                })
            };
            (
                StatusCode::ACCEPTED,
                Json(json!({
                    "tenant_id": doc.tenant_id, "id": doc.id, "number": doc.number,
                    "deliveries": deliveries,
                    "note": note,
                })),
            )
                .into_response()
        }
        Ok(IngestOutcome::UnknownTenant) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown tenant",
            &[FieldProblem {
                field: "tenant_id".into(),
                message: format!("{:?} is not a tenant of this daemon", doc.tenant_id),
            }],
        ),
        Ok(IngestOutcome::Existing) => (
            StatusCode::OK,
            Json(json!({"tenant_id": doc.tenant_id, "id": doc.id, "number": doc.number, "existing": true})),
        )
            .into_response(),
        Ok(IngestOutcome::Conflict(stored)) if stored.is_empty() => error(
            StatusCode::CONFLICT,
            "a different document with this id was already issued",
            &[FieldProblem {
                field: "document".into(),
                message: "differs from the document already delivered under this id (its content is no longer kept under the retention setting, so the fields that differ cannot be named)".into(),
            }],
        ),
        Ok(IngestOutcome::Conflict(stored)) => {
            let differs = serde_json::from_str(&stored)
                .map(|old| ingest::differences(&old, &doc))
                .unwrap_or_else(|_| vec!["document".into()]);
            let problems: Vec<FieldProblem> = differs
                .into_iter()
                .map(|f| FieldProblem {
                    message: "differs from the document already stored under this id".into(),
                    field: f,
                })
                .collect();
            error(
                StatusCode::CONFLICT,
                "a different document with this id was already issued",
                &problems,
            )
        }
        Err(e) => server_error(e),
    }
}

fn server_error(e: impl std::fmt::Display) -> Response {
    let e = e.to_string();
    tracing::error!(error = %e, "request failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "error": format!("{}; nothing was stored, retry later", storage_cause(&e))
        })),
    )
        .into_response()
}

/// The cause of a storage failure in words an operator can act on (the
/// full error is logged): disk full, read-only, locked, or unavailable.
pub fn storage_cause(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("disk is full") || e.contains("no space left") {
        "the database's disk is full"
    } else if e.contains("readonly") || e.contains("read-only") {
        "the database is read-only"
    } else if e.contains("database is locked") {
        "the database is locked by another process"
    } else {
        "storage is unavailable"
    }
}

async fn post_document(State(state): State<Arc<ApiState>>, body: axum::body::Bytes) -> Response {
    let json: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the body is not JSON",
                &[FieldProblem {
                    field: "body".into(),
                    message: e.to_string(),
                }],
            );
        }
    };
    ingest_json(&state, &json).await
}

/// A delivery log query's state filter and page cursor, checked: a 400
/// naming `state` or `after` when either is not one.
#[allow(clippy::result_large_err)] // a Response is the natural error of a handler helper
pub(crate) fn log_query(
    state: Option<&str>,
    after: Option<&str>,
) -> Result<Option<LogCursor>, Response> {
    if let Some(s) = state
        && !delivery_state::ALL.contains(&s)
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "unknown delivery state",
            &[FieldProblem {
                field: "state".into(),
                message: format!(
                    "{s:?} is not a delivery state; use one of {}",
                    delivery_state::ALL.join(", ")
                ),
            }],
        ));
    }
    match after {
        None => Ok(None),
        Some(a) => LogCursor::parse(a).map(Some).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "not a page cursor",
                &[FieldProblem {
                    field: "after".into(),
                    message: format!("{a:?} is not the `next` of an earlier page of this list"),
                }],
            )
        }),
    }
}

/// The cursor of the page after `rows`, when it was full (there may be
/// more); `None` on the last page.
pub(crate) fn next_page(rows: &[DeliveryRow], limit: i64) -> Option<String> {
    if rows.len() as i64 == limit {
        rows.last().map(|r| LogCursor::after(r).to_string())
    } else {
        None
    }
}

#[derive(serde::Deserialize)]
struct DeliveryQuery {
    number: Option<String>,
    state: Option<String>,
    limit: Option<i64>,
    /// The `next` of the previous page.
    after: Option<String>,
}

async fn list_deliveries(
    State(state): State<Arc<ApiState>>,
    Path(tenant): Path<String>,
    Query(q): Query<DeliveryQuery>,
) -> Response {
    let after = match log_query(q.state.as_deref(), q.after.as_deref()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    match state.store.tenant(&tenant).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown tenant",
                &[FieldProblem {
                    field: "tenant".into(),
                    message: format!("{tenant:?} is not a tenant"),
                }],
            );
        }
        Err(e) => return server_error(e),
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match state
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
            let next = next_page(&rows, limit);
            Json(json!({ "deliveries": rows, "next": next })).into_response()
        }
        Err(e) => server_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::storage_cause;

    /// The ingest route's body limit and what is answered past it: a 413
    /// naming `body` in the API's JSON (axum's own is plain text), while a
    /// body just under it is read (here refused as not JSON, a 400).
    #[tokio::test]
    async fn a_body_over_the_limit_is_a_413_naming_body() {
        use axum::body::Body;
        use axum::http::Request;
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("db").display());
        let store = crate::store::Store::open_and_migrate(&url).await.unwrap();
        let key = "k";
        let app = super::router(std::sync::Arc::new(super::ApiState {
            store,
            service_key_hashes: vec![crate::crypto::sha256_hex(key)],
            catalogue: None,
            kinds: Default::default(),
            on_ingest: Box::new(|| {}),
        }));
        let post = |len: usize| {
            Request::post("/v1/documents")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Body::from(vec![b'x'; len]))
                .unwrap()
        };
        let limit = crate::rejections::INGEST_BODY_LIMIT;
        // Without the key: 401 before the body is read.
        let mut anonymous = post(limit + 1);
        anonymous.headers_mut().remove("authorization");
        let r = app.clone().oneshot(anonymous).await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
        for (len, status, field) in [(limit + 1, 413, "body"), (limit, 400, "body")] {
            let r = app.clone().oneshot(post(len)).await.unwrap();
            assert_eq!(r.status().as_u16(), status, "{len}");
            let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["problems"][0]["field"], field, "{len}: {v}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        let with = |v: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert("authorization", v.parse().unwrap());
            super::bearer(&h).map(str::to_owned)
        };
        assert_eq!(with("Bearer k1").as_deref(), Some("k1"));
        assert_eq!(with("bearer k1 ").as_deref(), Some("k1"));
        assert_eq!(with("BEARER  k1").as_deref(), Some("k1"));
        assert_eq!(with("Basic k1"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(with("Bearerk1"), None);
    }

    #[test]
    fn storage_failures_name_their_cause() {
        for (error, cause) in [
            (
                "database error: error returned from database: (code: 13) database or disk is full",
                "the database's disk is full",
            ),
            (
                "database error: error returned from database: (code: 8) attempt to write a readonly database",
                "the database is read-only",
            ),
            (
                "database error: error returned from database: (code: 5) database is locked",
                "the database is locked by another process",
            ),
            ("database error: pool timed out", "storage is unavailable"),
        ] {
            assert_eq!(storage_cause(error), cause, "{error}");
        }
    }
}
