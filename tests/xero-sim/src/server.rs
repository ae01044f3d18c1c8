//! HTTP plumbing: the router that serves every Xero host's paths on one
//! listener, the outer middleware (request log + fault injection) and the
//! accept loop, which can reset a connection on demand.

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{DefaultBodyLimit, Extension, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tower_service::Service;
use uuid::Uuid;

use crate::accounting as acc;
use crate::control as ctl;
use crate::guard::{Ctx, accounting_guard, too_many};
use crate::identity as idn;
use crate::model::DocKind;
use crate::state::{LoggedRequest, Shared};

/// Lets a handler drop the TCP connection it arrived on.
#[derive(Clone)]
struct ConnKill(Arc<Notify>);

type S = State<Arc<Shared>>;
type C = Extension<Ctx>;

macro_rules! doc_routes {
    ($router:expr, $kind:expr, $coll:literal) => {
        $router
            .route(
                concat!("/", $coll),
                get(|State(s): S, Extension(c): C, RawQuery(q): RawQuery| {
                    acc::docs_list($kind, s, c, q)
                })
                .put(|State(s): S, Extension(c): C, RawQuery(q): RawQuery, b: axum::body::Bytes| async move {
                    acc::docs_write($kind, &s, &c, q, b, false, None)
                })
                .post(|State(s): S, Extension(c): C, RawQuery(q): RawQuery, b: axum::body::Bytes| async move {
                    acc::docs_write($kind, &s, &c, q, b, true, None)
                }),
            )
            .route(
                concat!("/", $coll, "/{id}"),
                get(|State(s): S, Extension(c): C, Path(id): Path<String>, RawQuery(q): RawQuery| {
                    acc::doc_get($kind, s, c, id, q)
                })
                .post(
                    |State(s): S, Extension(c): C, Path(id): Path<String>, RawQuery(q): RawQuery, b: axum::body::Bytes| async move {
                        acc::docs_write($kind, &s, &c, q, b, true, Some(id))
                    },
                ),
            )
            .route(
                concat!("/", $coll, "/{id}/History"),
                get(|State(s): S, Extension(c): C, Path(id): Path<String>| {
                    acc::history_get($kind, s, c, id)
                })
                .put(
                    |State(s): S, Extension(c): C, Path(id): Path<String>, b: axum::body::Bytes| async move {
                        acc::history_put($kind, &s, &c, id, b)
                    },
                ),
            )
            .route(
                concat!("/", $coll, "/{id}/Attachments"),
                get(|State(s): S, Extension(c): C, Path(id): Path<String>| {
                    acc::attachments_list($kind, s, c, id)
                }),
            )
            .route(
                concat!("/", $coll, "/{id}/Attachments/{file}"),
                get(|Extension(c): C, Path((id, file)): Path<(String, String)>| {
                    acc::attachment_get($kind, c, id, file)
                })
                .put(
                    |State(s): S, Extension(c): C, Path((id, file)): Path<(String, String)>, RawQuery(q): RawQuery, h: HeaderMap, b: axum::body::Bytes| async move {
                        acc::attachment_put($kind, &s, &c, id, file, q, &h, b)
                    },
                )
                .post(
                    |State(s): S, Extension(c): C, Path((id, file)): Path<(String, String)>, RawQuery(q): RawQuery, h: HeaderMap, b: axum::body::Bytes| async move {
                        acc::attachment_put($kind, &s, &c, id, file, q, &h, b)
                    },
                ),
            )
    };
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        "The resource you're looking for cannot be found",
    )
        .into_response()
}

/// Build the whole router.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let acct: Router<Arc<Shared>> = Router::new()
        .route("/Organisation", get(acc::organisation))
        .route("/Accounts", get(acc::accounts))
        .route("/Accounts/{id}", get(acc::account))
        .route("/TaxRates", get(acc::tax_rates))
        .route("/Currencies", get(acc::currencies))
        .route(
            "/Contacts",
            get(acc::contacts)
                .put(acc::contacts_put)
                .post(acc::contacts_post),
        )
        .route("/Contacts/{id}", get(acc::contact).post(acc::contact_post))
        .route("/CreditNotes/{id}/Allocations", put(acc::allocations_put));
    let acct = doc_routes!(acct, DocKind::Invoice, "Invoices");
    let acct = doc_routes!(acct, DocKind::CreditNote, "CreditNotes");
    let acct = acct.route_layer(from_fn_with_state(shared.clone(), accounting_guard));

    let sim: Router<Arc<Shared>> = Router::new()
        .route("/health", get(ctl::health))
        .route("/config", get(ctl::config))
        .route("/counters", get(ctl::counters))
        .route("/requests", get(ctl::requests).delete(ctl::clear_requests))
        .route("/tenants", get(ctl::tenants))
        .route("/tenants/{tenant}/documents", get(ctl::tenant_documents))
        .route("/grants", get(ctl::grants_list).post(ctl::grants_create))
        .route("/grants/{id}/revoke", post(ctl::grants_revoke))
        .route("/clock", get(ctl::clock_get).post(ctl::clock_post))
        .route(
            "/faults",
            get(ctl::faults_get)
                .post(ctl::faults_post)
                .delete(ctl::faults_delete),
        )
        .route(
            "/auto-approve",
            get(ctl::auto_approve_get).post(ctl::auto_approve_post),
        )
        .route("/limits", get(ctl::limits_get).post(ctl::limits_post))
        .route("/reset", post(ctl::reset));

    let max_body = shared.config.max_attachment_bytes + 1024 * 1024;
    Router::new()
        .route(
            "/identity/connect/authorize",
            get(idn::authorize).post(idn::authorize_submit),
        )
        .route("/connect/token", post(idn::token))
        .route("/connect/revocation", post(idn::revocation))
        .route("/connections", get(idn::connections))
        .route("/Connections", get(idn::connections))
        .route(
            "/connections/{id}",
            axum::routing::delete(idn::delete_connection),
        )
        .route(
            "/Connections/{id}",
            axum::routing::delete(idn::delete_connection),
        )
        .nest("/api.xro/2.0", acct)
        .nest("/_sim", sim)
        .fallback(not_found)
        .layer(from_fn_with_state(shared.clone(), outer))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

fn header_list(h: &HeaderMap) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in h {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match out.iter_mut().find(|(n, _)| n == k.as_str()) {
            Some((_, existing)) => {
                existing.push_str(", ");
                existing.push_str(&v);
            }
            None => out.push((k.as_str().to_string(), v)),
        }
    }
    out
}

/// Request log + fault injection for every non-`/_sim` request.
async fn outer(State(shared): S, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if path.starts_with("/_sim") {
        return next.run(req).await;
    }
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    let kill = req.extensions().get::<ConnKill>().cloned();
    let (parts, body) = req.into_parts();
    let limit = shared.config.max_attachment_bytes + 1024 * 1024;
    let Ok(bytes) = to_bytes(body, limit).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "The request was too large").into_response();
    };
    let (body_text, body_base64) = if bytes.is_empty() {
        (None, None)
    } else {
        match std::str::from_utf8(&bytes) {
            Ok(s) => (Some(s.to_string()), None),
            Err(_) => (None, Some(STANDARD.encode(&bytes))),
        }
    };
    let method = parts.method.as_str().to_string();
    let entry = LoggedRequest {
        seq: 0,
        at: shared.clock.now(),
        method: method.clone(),
        uri: parts.uri.to_string(),
        headers: header_list(&parts.headers),
        body_text,
        body_base64,
        status: 0,
    };
    shared.push_log(entry);
    let seq = shared.log_seq.load(Ordering::Relaxed);
    let decision = shared.faults.lock().decide(&method, &path);
    let mut parts = parts;
    if decision.latency_ms > 0 {
        shared.counters.bump_fault("latency");
        if path.starts_with("/api.xro/") {
            // Slept inside the accounting gate, so a slow request holds a concurrency slot.
            parts
                .extensions
                .insert(crate::guard::InjectedLatency(decision.latency_ms));
        } else {
            tokio::time::sleep(Duration::from_millis(decision.latency_ms)).await;
        }
    }
    if decision.hang {
        shared.counters.bump_fault("hang");
        std::future::pending::<()>().await;
    }
    if decision.reset {
        shared.counters.bump_fault("reset");
        if let Some(k) = kill {
            k.0.notify_one();
        }
        std::future::pending::<()>().await;
    }
    let resp = if let Some(status) = decision.error_status {
        shared.counters.bump_fault(&status.to_string());
        if status == 503 {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "The Xero API is currently unavailable: the organisation is offline for maintenance. Please try again later.",
            )
                .into_response()
        } else {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({
                    "Title": "An error occurred", "Status": 500,
                    "Detail": "An error occurred in Xero. Check the API Status page http://status.developer.xero.com for current service status.",
                    "Instance": Uuid::new_v4()
                })),
            )
                .into_response()
        }
    } else if let Some((problem, retry)) = decision.force_429 {
        shared.counters.bump_fault("429");
        shared.counters.bump_429(problem);
        let retry = (problem != crate::faults::RateProblem::Concurrent).then_some(retry as i64);
        too_many(problem, retry)
    } else {
        next.run(Request::from_parts(parts, Body::from(bytes)))
            .await
    };
    let status = resp.status().as_u16();
    if let Some(e) = shared.log.lock().iter_mut().rev().find(|e| e.seq == seq) {
        e.status = status;
    }
    resp
}

/// Accept connections until `shutdown` flips to true.
pub(crate) async fn serve(listener: TcpListener, app: Router, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            // Keep a duplicate of the socket so a reset fault can set SO_LINGER=0
            // (close => RST) on it without owning the stream hyper reads from.
            let (stream, dup) = match stream.into_std().and_then(|s| {
                let d = s.try_clone()?;
                Ok((s, d))
            }) {
                Ok((s, d)) => match tokio::net::TcpStream::from_std(s) {
                    Ok(s) => (s, Some(d)),
                    Err(_) => return,
                },
                Err(_) => return,
            };
            let kill = Arc::new(Notify::new());
            let k2 = kill.clone();
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnKill(k2.clone()));
                    let mut app = app.clone();
                    async move { app.call(req.map(Body::new)).await }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = kill.notified() => {
                    if let Some(d) = dup
                        && let Ok(t) = tokio::net::TcpStream::from_std(d)
                    {
                        let _ = t.set_zero_linger();
                    }
                }
                _ = stop.changed() => {}
            }
        });
    }
}
