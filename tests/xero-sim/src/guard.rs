//! The gate in front of the accounting API: bearer token (401), tenant
//! header (403), rate limits (429 + `X-*Limit-Remaining` headers) and
//! `Idempotency-Key` replay.

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use uuid::Uuid;

use crate::faults::RateProblem;
use crate::identity::check_bearer;
use crate::model::TenantData;
use crate::state::{IdemEntry, Shared, Window};

/// What handlers know about the caller.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub app_name: String,
    pub tenant: Arc<Mutex<TenantData>>,
}

/// Latency a fault rule adds to an accounting request (slept after the rate gate).
#[derive(Clone, Copy)]
pub(crate) struct InjectedLatency(pub u64);

/// The 403 Xero sends for a missing/unknown/unconnected tenant.
pub(crate) fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        axum::Json(json!({
            "Type": null, "Title": "Forbidden", "Status": 403,
            "Detail": "AuthenticationUnsuccessful",
            "Instance": Uuid::new_v4(), "Extensions": {}
        })),
    )
        .into_response()
}

struct Remaining {
    minute: i64,
    day: i64,
    app_minute: i64,
}

/// Decrements the tenant's in-flight count when the request finishes.
struct InFlight {
    shared: Arc<Shared>,
    key: (String, Uuid),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(w) = self.shared.rate.lock().tenants.get_mut(&self.key) {
            w.in_flight = w.in_flight.saturating_sub(1);
        }
    }
}

fn roll(w: &mut Window, minute: i64, day: i64) {
    if w.minute != minute {
        w.minute = minute;
        w.minute_count = 0;
    }
    if w.day != day {
        w.day = day;
        w.day_count = 0;
    }
}

type Refusal = (RateProblem, Option<i64>, Remaining);

fn rate_check(
    shared: &Arc<Shared>,
    client_id: &str,
    tenant: Uuid,
) -> Result<(Option<InFlight>, Remaining), Refusal> {
    let limits = shared.limits.read().clone();
    if !limits.enabled {
        let big = i64::from(u32::MAX);
        return Ok((
            None,
            Remaining {
                minute: big,
                day: big,
                app_minute: big,
            },
        ));
    }
    let now = shared.clock.now().timestamp();
    let (minute, day) = (now.div_euclid(60), now.div_euclid(86_400));
    let key = (client_id.to_string(), tenant);
    let mut rs = shared.rate.lock();
    let app_count = {
        let aw = rs.apps.entry(client_id.to_string()).or_default();
        roll(aw, minute, day);
        aw.minute_count
    };
    let w = rs.tenants.entry(key.clone()).or_default();
    roll(w, minute, day);
    let rem = |w: &Window, app: u32| Remaining {
        minute: i64::from(limits.per_minute) - i64::from(w.minute_count),
        day: i64::from(limits.per_day) - i64::from(w.day_count),
        app_minute: i64::from(limits.app_per_minute) - i64::from(app),
    };
    if w.in_flight >= limits.concurrent {
        return Err((RateProblem::Concurrent, None, rem(w, app_count)));
    }
    if w.day_count >= limits.per_day {
        return Err((
            RateProblem::Daily,
            Some(86_400 - now.rem_euclid(86_400)),
            rem(w, app_count),
        ));
    }
    if w.minute_count >= limits.per_minute {
        return Err((
            RateProblem::Minute,
            Some(60 - now.rem_euclid(60)),
            rem(w, app_count),
        ));
    }
    if app_count >= limits.app_per_minute {
        return Err((
            RateProblem::Appminute,
            Some(60 - now.rem_euclid(60)),
            rem(w, app_count),
        ));
    }
    w.minute_count += 1;
    w.day_count += 1;
    w.in_flight += 1;
    let r = rem(w, app_count + 1);
    if let Some(aw) = rs.apps.get_mut(client_id) {
        aw.minute_count += 1;
    }
    Ok((
        Some(InFlight {
            shared: shared.clone(),
            key,
        }),
        r,
    ))
}

fn set_limit_headers(h: &mut HeaderMap, r: &Remaining) {
    for (name, v) in [
        ("x-minlimit-remaining", r.minute),
        ("x-daylimit-remaining", r.day),
        ("x-appminlimit-remaining", r.app_minute),
    ] {
        if let Ok(v) = HeaderValue::from_str(&v.max(0).to_string()) {
            h.insert(name, v);
        }
    }
}

/// A 429 as Xero sends it.
pub(crate) fn too_many(problem: RateProblem, retry_after: Option<i64>) -> Response {
    let mut r = (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(json!({
            "Title": "Too Many Requests", "Status": 429,
            "Detail": format!("You have exceeded the {} rate limit", problem.as_str())
        })),
    )
        .into_response();
    r.headers_mut().insert(
        "x-rate-limit-problem",
        HeaderValue::from_static(problem.as_str()),
    );
    if let Some(s) = retry_after
        && let Ok(v) = HeaderValue::from_str(&s.max(1).to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Middleware for `/api.xro/2.0/*`.
pub(crate) async fn accounting_guard(
    State(shared): State<Arc<Shared>>,
    mut req: Request,
    next: Next,
) -> Response {
    shared
        .counters
        .accounting_requests
        .fetch_add(1, Ordering::Relaxed);
    let who = match check_bearer(&shared, req.headers()) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let tenant_id = req
        .headers()
        .get("xero-tenant-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<Uuid>().ok());
    let Some(tenant_id) = tenant_id.filter(|t| who.tenants.contains(t)) else {
        return forbidden();
    };
    let Some(tenant) = shared.tenant(tenant_id) else {
        return forbidden();
    };
    let (guard, remaining) = match rate_check(&shared, &who.client_id, tenant_id) {
        Ok(x) => x,
        Err((p, retry, rem)) => {
            shared.counters.bump_429(p);
            let mut r = too_many(p, retry);
            set_limit_headers(r.headers_mut(), &rem);
            return r;
        }
    };
    if let Some(InjectedLatency(ms)) = req.extensions().get::<InjectedLatency>().copied() {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let app_name = shared
        .app(&who.client_id)
        .map(|a| a.name.clone())
        .unwrap_or_default();
    req.extensions_mut().insert(Ctx { app_name, tenant });
    let idem_key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|k| !k.is_empty());
    let mut resp = match idem_key {
        Some(key) if req.method() == Method::POST || req.method() == Method::PUT => {
            idempotent(&shared, &who.client_id, tenant_id, key, req, next).await
        }
        _ => next.run(req).await,
    };
    drop(guard);
    set_limit_headers(resp.headers_mut(), &remaining);
    resp
}

async fn idempotent(
    shared: &Arc<Shared>,
    client_id: &str,
    tenant: Uuid,
    key: String,
    req: Request,
    next: Next,
) -> Response {
    if key.len() > 128 {
        return crate::accounting::validation_400("Idempotency-Key must be at most 128 characters");
    }
    let (parts, body) = req.into_parts();
    let limit = shared.config.max_attachment_bytes + 1024 * 1024;
    let Ok(bytes) = to_bytes(body, limit).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "The request was too large").into_response();
    };
    let mut h = Sha256::new();
    h.update(parts.method.as_str());
    h.update([0]);
    h.update(parts.uri.to_string());
    h.update([0]);
    h.update(tenant.as_bytes());
    h.update(&bytes);
    let fp = hex::encode(h.finalize());
    let now = shared.clock.now();
    let map_key = (client_id.to_string(), key);
    {
        let mut store = shared.idempotency.lock();
        // Expired entries are ignored on look-up and swept every 30
        // seconds (sweeping on every request cost the simulator more than
        // serving it under load).
        {
            let mut swept = shared.idempotency_swept.lock();
            if now < *swept || now - *swept >= chrono::TimeDelta::seconds(30) {
                store.retain(|_, e| e.expires > now);
                *swept = now;
            }
        }
        if let Some(e) = store.get(&map_key).filter(|e| e.expires > now) {
            if e.fingerprint != fp {
                return crate::accounting::validation_400(
                    "Idempotency key has been used with a different request",
                );
            }
            shared
                .counters
                .idempotent_replays
                .fetch_add(1, Ordering::Relaxed);
            let mut r = Response::new(Body::from(e.body.clone()));
            *r.status_mut() = StatusCode::from_u16(e.status).unwrap_or(StatusCode::OK);
            if let Some(ct) = e
                .content_type
                .as_deref()
                .and_then(|c| HeaderValue::from_str(c).ok())
            {
                r.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            return r;
        }
    }
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let (rparts, rbody) = resp.into_parts();
    let Ok(rbytes) = to_bytes(rbody, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let status = rparts.status.as_u16();
    if status < 500 && status != 429 {
        let ttl = shared.config.lifetimes.idempotency_secs;
        shared.idempotency.lock().insert(
            map_key,
            IdemEntry {
                fingerprint: fp,
                status,
                content_type: rparts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from),
                body: rbytes.to_vec(),
                expires: crate::clock::add_secs(now, ttl),
            },
        );
    }
    Response::from_parts(rparts, Body::from(rbytes))
}
