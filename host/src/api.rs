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
use std::collections::BTreeSet;
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
}

/// A JSON error with the problems named.
pub fn error(status: StatusCode, message: &str, problems: &[FieldProblem]) -> Response {
    (
        status,
        Json(json!({ "error": message, "problems": problems })),
    )
        .into_response()
}

#[allow(clippy::result_large_err)] // a Response is the natural error of a handler helper
async fn authorised(state: &ApiState, headers: &HeaderMap) -> Result<(), Response> {
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
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
        .route("/v1/documents", post(post_document))
        .route("/v1/tenants/{tenant}/deliveries", get(list_deliveries))
        .with_state(state)
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
        })
        .await;
    match outcome {
        Ok(IngestOutcome::Created { deliveries }) => {
            crate::metrics::DOCUMENTS_INGESTED.inc();
            (state.on_ingest)();
            (
                StatusCode::ACCEPTED,
                Json(json!({
                    "tenant_id": doc.tenant_id, "id": doc.id, "number": doc.number,
                    "deliveries": deliveries,
                    "note": if deliveries == 0 { Some("not sent: not connected") } else { None },
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

async fn post_document(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorised(&state, &headers).await {
        return r;
    }
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
    headers: HeaderMap,
    Path(tenant): Path<String>,
    Query(q): Query<DeliveryQuery>,
) -> Response {
    if let Err(r) = authorised(&state, &headers).await {
        return r;
    }
    let after = match log_query(q.state.as_deref(), q.after.as_deref()) {
        Ok(a) => a,
        Err(r) => return r,
    };
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
