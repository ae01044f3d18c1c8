//! The Integrations page, served by the daemon and rendered on the server
//! (no front-end build): one card per installed connector (Xero first) with
//! Connect, a 3-dot menu with Configure (a mapping form whose choices are
//! the organisation's accounts, or typed codes for a connector without a
//! chart of accounts), Test connection and Disconnect, the connection's
//! status, its settings (the connector's declared settings with a small
//! form; secrets write-only), and the delivery log with failed items and
//! Retry.
//!
//! Connect sends the admin to the provider's consent screen for an OAuth
//! connector; one without OAuth (the JSON webhook) is checked with the
//! tenant's settings and connected at once. A card's actions name their
//! connector with `?connector=<id>` (absent: `xero`); the Xero card's
//! elements keep unprefixed ids (`#xero`, `#status`, `#connect`, ...),
//! another card's are `<id>_<name>` (`#webhook_card`, `#webhook_status`).
//!
//! The platform opens it for a tenant admin with a one-time sign-in link
//! it asks for server to server (`POST /v1/admin/tenants/{t}/page-sessions`
//! with the tenant's key, naming the admin and role): the link's ticket
//! becomes a session whose token is the page's HttpOnly cookie, so the
//! browser never sees the key and cannot change who it acts as. Changes
//! need the `super-admin` role and are audited, exactly like the admin API.

// Handlers return a whole page as their error: boxing it buys nothing here.
#![allow(clippy::result_large_err)]

use crate::admin::AdminState;
use crate::capabilities::mapping::{AccountMapping, MappingScope};
use crate::oauth::escape as esc;
use crate::store::outbox::{LogCursor, state};
use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::BTreeMap;
use std::sync::Arc;

type S = State<Arc<AdminState>>;

/// `?connector=` of a card's actions: which connector (absent: `xero`).
#[derive(Debug, Default, serde::Deserialize)]
struct Which {
    connector: Option<String>,
}

impl Which {
    fn id(&self) -> &str {
        self.connector.as_deref().unwrap_or("xero")
    }
}

/// What admins call connector `id`: its manifest's name, else the id.
fn display_name(st: &AdminState, id: &str) -> String {
    st.connections
        .manifest(id)
        .map(|m| m.name)
        .unwrap_or_else(|| id.to_string())
}

const COOKIE: &str = "lp_session";
/// Prefix of the Configure form's hidden fields that carry the code each
/// row was shown with.
const WAS: &str = "shown:";
/// The form field of a row's tax rate (`tax:<kind>`).
const TAX: &str = "tax:";
/// The tax rate a row was shown with (`shown-tax:<kind>`).
const WAS_TAX: &str = "shown-tax:";

struct Session {
    tenant: String,
    admin: String,
    super_admin: bool,
}

fn page(title: &str, body: &str) -> Response {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem;color:#1b1f24}}\
         .card{{border:1px solid #d0d7de;border-radius:10px;padding:1rem 1.25rem;margin:1rem 0;position:relative}}\
         .state{{display:inline-block;padding:.1rem .5rem;border-radius:1rem;background:#eef}}\
         .state.active{{background:#dafbe1}}.state.needs-reauth{{background:#fff8c5}}.state.disconnected{{background:#ffebe9}}\
         details.menu{{position:absolute;right:1rem;top:1rem}} details.menu summary{{list-style:none;cursor:pointer;font-size:1.4rem}}\
         details.menu div{{position:absolute;right:0;background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:.5rem;min-width:9rem}}\
         table{{border-collapse:collapse;width:100%}} td,th{{border-bottom:1px solid #eee;padding:.35rem;text-align:left;font-size:.9rem}}\
         .failed{{color:#cf222e}} .delivered{{color:#1a7f37}} .paused{{color:#9a6700}} button{{cursor:pointer}}\
         </style></head><body><h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    ))
    .into_response()
}

fn message(status: StatusCode, title: &str, text: &str) -> Response {
    let mut r = page(
        title,
        &format!(
            "<p id=\"message\">{}</p><p><a href=\"/integrations\">Back</a></p>",
            esc(text)
        ),
    );
    *r.status_mut() = status;
    r
}

fn redirect(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    cookie(headers, COOKIE)
}

/// The value of the request's cookie `name` (every `Cookie` header read).
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|raw| raw.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

/// The cookie remembering where a link opened without a session pointed.
const NEXT_COOKIE: &str = "lp_next";

/// A `Set-Cookie` value: HttpOnly, SameSite=Lax, for `path` and
/// `max_age` seconds, and `Secure` when the daemon is reached over https
/// (never sent over plain http).
fn set_cookie(name: &str, value: &str, path: &str, max_age: i64, public_url: &str) -> String {
    format!(
        "{name}={value}; HttpOnly; SameSite=Lax; Path={path}; Max-Age={max_age}{}",
        if url::Url::parse(public_url).is_ok_and(|u| u.scheme() == "https") {
            "; Secure"
        } else {
            ""
        }
    )
}

async fn session(st: &AdminState, headers: &HeaderMap) -> Result<Session, Response> {
    let Some(v) = cookie_value(headers) else {
        return Err(message(
            StatusCode::UNAUTHORIZED,
            "Sign in through the platform",
            "Open Integrations from the platform to sign in.",
        ));
    };
    match st
        .store
        .page_session(&v, chrono::Utc::now().timestamp())
        .await
    {
        Ok(Some((tenant, admin, role))) => Ok(Session {
            tenant,
            admin,
            super_admin: role == "super-admin",
        }),
        Ok(None) => Err(message(
            StatusCode::UNAUTHORIZED,
            "Signed out",
            "The session has ended (it expired, or the key it was opened with was revoked); open Integrations from the platform again.",
        )),
        Err(_) => Err(message(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "Storage is unavailable; try again shortly.",
        )),
    }
}

/// The session, when it is a Super Admin's (who alone may connect,
/// configure or disconnect).
async fn super_admin_session(st: &AdminState, headers: &HeaderMap) -> Result<Session, Response> {
    let s = session(st, headers).await?;
    if s.super_admin && s.admin.trim().is_empty() {
        // A Super Admin nobody named: the audit log could not say who.
        Err(message(
            StatusCode::FORBIDDEN,
            "Who is acting?",
            "admin: the session names no admin; open Integrations again from the platform",
        ))
    } else if s.super_admin {
        Ok(s)
    } else {
        Err(message(
            StatusCode::FORBIDDEN,
            "Super Admin only",
            "Only a Super Admin can connect, configure or disconnect integrations.",
        ))
    }
}

/// A form field holding a NUL character (which PostgreSQL's text cannot
/// store): a 400 page naming it, before anything is stored.
fn nul_in_form<'a>(mut fields: impl Iterator<Item = (&'a str, &'a str)>) -> Option<Response> {
    let (k, _) = fields.find(|(k, v)| k.contains('\0') || v.contains('\0'))?;
    Some(message(
        StatusCode::BAD_REQUEST,
        "Not saved",
        &format!(
            "{}: must not contain a NUL character. Nothing was changed.",
            k.replace('\0', "")
        ),
    ))
}

/// The page's routes.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/integrations", get(index))
        .route("/integrations/login", get(login).post(login_confirmed))
        .route("/integrations/configure", get(configure))
        .route("/integrations/mappings", post(save_mappings))
        .route("/integrations/settings", post(save_settings))
        .route("/integrations/connect", post(connect))
        .route("/integrations/disconnect", post(disconnect))
        .route("/integrations/check", post(check))
        .route("/integrations/retry", post(retry))
        .route("/integrations/send-missed", post(send_missed))
        .route("/integrations/logout", post(logout))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            same_origin,
        ))
        .layer(axum::middleware::from_fn(crate::rejections::no_nul))
        .layer(axum::middleware::from_fn(page_headers))
        .with_state(state)
}

/// The policy of every HTML page the daemon serves: no script at all (the
/// pages have none; a connector's text that slipped through as markup could
/// not run), styles only inline, images only from the daemon, never inside
/// another site's frame (the page's buttons disconnect and retry).
pub const PAGE_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
     base-uri 'none'; frame-ancestors 'none'";

/// Middleware for the HTML pages: [`PAGE_CSP`], no framing, no MIME
/// sniffing, and no `Referer` to other sites (a picker's address holds its
/// one-time token). `same-origin`, not `no-referrer`: under `no-referrer`
/// a browser sends `Origin: null` with the page's own forms, which the
/// origin check refuses.
pub async fn page_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// Forms are taken only from this site's own pages: a POST whose `Origin`
/// (current browsers send one with every form) is not the daemon's, or is
/// `null`, is refused, on top of the session cookie's `SameSite=Lax`. The
/// daemon's origin is its public URL (behind a reverse proxy the `Host`
/// it sees is the proxy's upstream), or the host the request was sent to
/// (`Host`, the first `X-Forwarded-Host`, or the URI's authority), default
/// ports filled in on both sides. A request without `Origin` (a script,
/// not a browser) passes to the session check as before.
async fn same_origin(
    State(st): S,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.method() == axum::http::Method::POST
        && let Some(origin) = req.headers().get(header::ORIGIN)
    {
        let origin = origin.to_str().ok().and_then(|o| url::Url::parse(o).ok());
        let same = origin.is_some_and(|o| {
            if !matches!(o.scheme(), "http" | "https") {
                return false;
            }
            let port = o.port_or_known_default();
            let theirs = o.host_str().map(|h| (h.to_ascii_lowercase(), port));
            // The public URL: scheme, host and port.
            if let Ok(public) = url::Url::parse(&st.public_url)
                && public.scheme() == o.scheme()
                && public
                    .host_str()
                    .map(|h| (h.to_ascii_lowercase(), public.port_or_known_default()))
                    == theirs
            {
                return true;
            }
            // The host the request was sent to, with the Origin's scheme's
            // default port when it names none; only for the scheme the
            // daemon is reached by (the proxy's X-Forwarded-Proto, else its
            // public URL's), so a page on plain http for the same host
            // cannot post to an https daemon.
            let reached_by = req
                .headers()
                .get("x-forwarded-proto")
                .and_then(|h| h.to_str().ok())
                .map(|h| {
                    h.split(',')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                })
                .or_else(|| {
                    url::Url::parse(&st.public_url)
                        .ok()
                        .map(|u| u.scheme().to_string())
                });
            if reached_by.as_deref() != Some(o.scheme()) {
                return false;
            }
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|h| h.to_str().ok())
                    .map(|h| h.split(',').next().unwrap_or("").trim().to_string())
            };
            let sent_to = [
                header("host"),
                header("x-forwarded-host"),
                req.uri().authority().map(|a| a.to_string()),
            ];
            sent_to.into_iter().flatten().any(|h| {
                url::Url::parse(&format!("{}://{h}", o.scheme()))
                    .ok()
                    .and_then(|u| {
                        u.host_str()
                            .map(|x| (x.to_ascii_lowercase(), u.port_or_known_default()))
                    })
                    == theirs
            })
        });
        if !same {
            return message(
                StatusCode::FORBIDDEN,
                "Refused",
                "origin: this form was sent from another site; open the Integrations page from the platform and try again",
            );
        }
    }
    next.run(req).await
}

/// A sign-in ticket as the link carries it, or the page refusing it
/// (naming `ticket`).
fn ticket_of(q: &BTreeMap<String, String>) -> Result<&str, Response> {
    if q.contains_key("key") {
        // The old link put the tenant's key in the address bar and the
        // admin and role in a cookie the browser could edit.
        return Err(message(
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "key: the page no longer signs in with a key in the address; the platform asks for a sign-in link (POST /v1/admin/tenants/{tenant}/page-sessions) and opens it",
        ));
    }
    let ticket = q.get("ticket").map(String::as_str).unwrap_or("");
    if ticket.is_empty() {
        return Err(message(
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "ticket: is missing; open Integrations from the platform",
        ));
    }
    if ticket.len() > 128 {
        return Err(message(
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "ticket: is not a sign-in ticket; open Integrations from the platform",
        ));
    }
    Ok(ticket)
}

/// A storage failure while `doing`: logged with its detail, answered
/// 503 without it (the database's text is not the customer's business).
fn store_failed(doing: &str, e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "{doing} on the Integrations page: the store failed");
    storage_unavailable()
}

fn storage_unavailable() -> Response {
    message(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "Storage is unavailable; try again shortly.",
    )
}

/// The field of the sign-in confirmation that ties it to the browser it
/// was shown in: derived from that browser's session cookie (which a
/// page on another site neither knows nor, `SameSite=Lax`, sends with
/// its POST) and the ticket.
fn login_confirmation(session_cookie: &str, ticket: &str) -> String {
    crate::crypto::sha256_hex(&format!(
        "ledgerport-login-confirm\0{session_cookie}\0{ticket}"
    ))
}

/// "Admin for Tenant name (id)", for the page's header and the sign-in
/// confirmation (the id alone when the tenant cannot be read).
async fn who_for(st: &AdminState, tenant: &str, admin: &str) -> Result<String, Response> {
    let name = match st.store.tenant(tenant).await {
        Ok(t) => t.map(|t| t.name).filter(|n| !n.is_empty() && n != tenant),
        Err(_) => return Err(storage_unavailable()),
    };
    Ok(format!(
        "<strong>{}</strong> for <strong>{}</strong>",
        esc(admin),
        match name {
            Some(n) => format!("{} ({})", esc(&n), esc(tenant)),
            None => esc(tenant),
        }
    ))
}

/// `GET /integrations/login?ticket=`: the platform's one-time link. A
/// browser with no session (or one for the same tenant and admin) is
/// signed in at once. One signed in as someone else, or for another
/// tenant, is not switched by a plain link (someone could send theirs,
/// and what the admin connects next would go to that tenant): a page
/// names both and asks, its button posting back here.
async fn login(
    State(st): S,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let ticket = match ticket_of(&q) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let now = chrono::Utc::now().timestamp();
    if let Some(cookie) = cookie_value(&headers) {
        let current = match st.store.page_session(&cookie, now).await {
            Ok(c) => c,
            Err(_) => return storage_unavailable(),
        };
        let link = match st.store.page_ticket(ticket, now).await {
            Ok(l) => l,
            Err(_) => return storage_unavailable(),
        };
        if let (Some((t0, a0, _)), Some((t1, a1, _))) = (current, link)
            && (t0 != t1 || a0 != a1)
        {
            let (now_as, link_as) =
                match (who_for(&st, &t0, &a0).await, who_for(&st, &t1, &a1).await) {
                    (Ok(n), Ok(l)) => (n, l),
                    (Err(r), _) | (_, Err(r)) => return r,
                };
            let mut r = page(
                "Switch sign-in?",
                &format!(
                    "<p id=\"signed-in-now\">This browser is signed in to Integrations as {now_as}.</p>\
                     <p id=\"link-signs-in\">The link you opened signs in as {link_as} instead. \
                     Whatever you do next (connect an accounting system, change account mappings) is then done for that company. \
                     Continue only if you expected to work for it.</p>\
                     <form method=\"post\" action=\"/integrations/login\">\
                     <input type=\"hidden\" name=\"ticket\" value=\"{ticket}\">\
                     <input type=\"hidden\" name=\"confirm\" value=\"{confirm}\">\
                     <button type=\"submit\" id=\"switch\">Continue as {admin}</button></form>\
                     <p><a id=\"stay\" href=\"/integrations\">Stay signed in as {admin0}</a></p>",
                    ticket = esc(ticket),
                    confirm = login_confirmation(&cookie, ticket),
                    admin = esc(&a1),
                    admin0 = esc(&a0),
                ),
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return r;
        }
    }
    redeem(&st, &headers, ticket, None).await
}

/// The sign-in confirmation's button: the same browser (its session
/// cookie and the page's `confirm` field agree, and the form came from
/// this site) switches to the link's session; the one it had ends.
async fn login_confirmed(
    State(st): S,
    headers: HeaderMap,
    Form(f): Form<BTreeMap<String, String>>,
) -> Response {
    if let Some(r) = nul_in_form(f.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        return r;
    }
    let ticket = match ticket_of(&f) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let cookie = cookie_value(&headers);
    let confirmed = cookie.as_deref().is_some_and(|c| {
        f.get("confirm").map(String::as_str) == Some(login_confirmation(c, ticket).as_str())
    });
    if !confirmed {
        return message(
            StatusCode::FORBIDDEN,
            "Sign-in failed",
            "confirm: this confirmation was not shown in this browser; open the sign-in link from the platform again",
        );
    }
    redeem(&st, &headers, ticket, cookie.as_deref()).await
}

/// Spend `ticket` and sign this browser in with the session it opens
/// (ending `replaced`, the session it had, when switching).
async fn redeem(
    st: &AdminState,
    headers: &HeaderMap,
    ticket: &str,
    replaced: Option<&str>,
) -> Response {
    let now = chrono::Utc::now().timestamp();
    match st
        .store
        .redeem_page_ticket(ticket, crate::admin::PAGE_SESSION_TTL, now)
        .await
    {
        Ok(Some(token)) => {
            if let Some(old) = replaced {
                let _ = st.store.end_page_session(old).await;
            }
            // Back to where a notice's link was opened before signing in
            // (only a query of this page: never another site).
            let next = cookie(headers, NEXT_COOKIE)
                .and_then(|q| {
                    url::form_urlencoded::parse(format!("q={q}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                })
                .filter(|q| !q.is_empty())
                .map(|q| {
                    let q: String = url::form_urlencoded::parse(q.as_bytes())
                        .fold(
                            url::form_urlencoded::Serializer::new(String::new()),
                            |mut s, (k, v)| {
                                s.append_pair(&k, &v);
                                s
                            },
                        )
                        .finish();
                    format!("/integrations?{q}")
                })
                .unwrap_or_else(|| "/integrations".to_string());
            let mut r = (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, session_cookie(&token, &st.public_url)),
                    (header::LOCATION, next),
                ],
            )
                .into_response();
            if let Ok(v) = axum::http::HeaderValue::from_str(&set_cookie(
                NEXT_COOKIE,
                "",
                "/integrations",
                0,
                &st.public_url,
            )) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r
        }
        Ok(None) => message(
            StatusCode::UNAUTHORIZED,
            "Sign-in failed",
            "ticket: this sign-in link was used already or has expired; open Integrations from the platform again",
        ),
        Err(_) => storage_unavailable(),
    }
}

/// The page's session cookie: HttpOnly, SameSite=Lax, for the session's
/// life, and `Secure` when the daemon is reached over https (never sent
/// over plain http).
fn session_cookie(token: &str, public_url: &str) -> String {
    set_cookie(
        COOKIE,
        token,
        "/",
        crate::admin::PAGE_SESSION_TTL,
        public_url,
    )
}

/// Sign out: the session ends here (not only in this browser) and its
/// cookie is cleared.
async fn logout(State(st): S, headers: HeaderMap) -> Response {
    if let Some(token) = cookie_value(&headers) {
        let _ = st.store.end_page_session(&token).await;
    }
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                set_cookie(COOKIE, "", "/", 0, &st.public_url),
            ),
            (header::LOCATION, "/integrations".to_string()),
        ],
    )
        .into_response()
}

async fn index(
    State(st): S,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(mut r) => {
            // A notice's link (`?configure=`, `?log=failed`) opened without
            // a session: remembered for ten minutes, so signing in through
            // the platform lands there rather than on the bare page.
            if r.status() == StatusCode::UNAUTHORIZED
                && let Some(query) = uri.query().filter(|q| !q.is_empty() && q.len() <= 1024)
                && let Ok(v) = axum::http::HeaderValue::from_str(&set_cookie(
                    NEXT_COOKIE,
                    &url::form_urlencoded::byte_serialize(query.as_bytes()).collect::<String>(),
                    "/integrations",
                    600,
                    &st.public_url,
                ))
            {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            return r;
        }
    };
    // A mapping notice links `?configure=<connection id>`: straight to that
    // connection's Configure, when it is this tenant's.
    if let Some(id) = q.get("configure")
        && let Ok(Some(c)) = st.store.connection(id).await
        && c.tenant_id == s.tenant
    {
        return redirect(&format!(
            "/integrations/configure?connector={}",
            url::form_urlencoded::byte_serialize(c.connector_id.as_bytes()).collect::<String>()
        ));
    }
    // The delivery log's filters: `?log=<state>` (a notice links
    // `?log=failed`) and `?number=<document number>`.
    let filter = match q.get("log").map(String::as_str) {
        None | Some("") | Some("all") => None,
        Some(s) if state::ALL.contains(&s) => Some(s),
        Some(other) => {
            return message(
                StatusCode::BAD_REQUEST,
                "Delivery log",
                &format!(
                    "log: {other:?} is not a delivery state; use all, {}",
                    state::ALL.join(", ")
                ),
            );
        }
    };
    let number = q.get("number").map(|n| n.trim()).filter(|n| !n.is_empty());
    let after = match q.get("after").map(String::as_str) {
        None | Some("") => None,
        Some(a) => match LogCursor::parse(a) {
            Some(c) => Some(c),
            None => {
                return message(
                    StatusCode::BAD_REQUEST,
                    "Delivery log",
                    &format!(
                        "after: {a:?} is not a page of the delivery log; start from the newest"
                    ),
                );
            }
        },
    };
    let mut connectors = st.connections.connectors();
    connectors.sort_by_key(|m| (m.id != "xero", m.id.clone()));
    // Display names for the delivery log, looked up once.
    let names: BTreeMap<&str, &str> = connectors
        .iter()
        .map(|m| (m.id.as_str(), m.name.as_str()))
        .collect();
    // What cannot be read is said (503), not shown as "not connected" or
    // an empty log with nothing failed.
    let unavailable = |e: crate::store::StoreError| {
        tracing::warn!(error = %e, "the Integrations page could not read the store");
        message(
            StatusCode::SERVICE_UNAVAILABLE,
            "Integrations unavailable",
            "The delivery records cannot be read just now; reload the page in a minute.",
        )
    };
    let mut cards = String::new();
    for m in &connectors {
        match card(&st, &s.tenant, m).await {
            Ok(c) => cards.push_str(&c),
            Err(e) => return unavailable(e),
        }
    }
    if connectors.is_empty() {
        cards.push_str("<p id=\"no-connectors\">No connector is installed on this daemon yet; ask the operator.</p>");
    }
    let rows = match st
        .store
        .list_deliveries_page(Some(&s.tenant), number, filter, after.as_ref(), LOG_ROWS)
        .await
    {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    let counts: BTreeMap<String, i64> = match st.store.tenant_delivery_counts(&s.tenant).await {
        Ok(c) => c.into_iter().collect(),
        Err(e) => return unavailable(e),
    };
    let mut log = log_filters(filter, number, &counts);
    log.push_str(
        "<table id=\"log\"><tr><th>Document</th><th>To</th><th>State</th><th>When (UTC)</th><th>In the accounting system / what went wrong</th><th></th></tr>",
    );
    for r in &rows {
        let detail = match (&r.external_url, &r.last_error) {
            // (Only ever an http(s) address: the store filters rows
            // stored before receipts were checked.)
            (Some(u), _) if r.state == "delivered" => {
                format!(
                    "<a href=\"{}\">{}</a>",
                    esc(u),
                    esc(r.external_id.as_deref().unwrap_or(""))
                )
            }
            (_, Some(e)) => esc(e),
            // Delivered without a (usable) address: its id alone.
            (_, None) if r.state == "delivered" => esc(r.external_id.as_deref().unwrap_or("")),
            _ => String::new(),
        };
        let action = if r.state == "failed" {
            format!(
                "<form method=\"post\" action=\"/integrations/retry\"><input type=\"hidden\" name=\"id\" value=\"{}\"><button type=\"submit\" class=\"retry\">Retry</button></form>",
                esc(&r.id)
            )
        } else {
            String::new()
        };
        log.push_str(&format!(
            "<tr data-number=\"{n}\" data-connector=\"{c}\"><td>{n}</td><td>{to}</td><td class=\"{st}\">{words}</td><td class=\"when\">{when}</td><td>{detail}</td><td>{action}</td></tr>",
            n = esc(&r.document_number),
            c = esc(&r.connector_id),
            to = esc(names
                .get(r.connector_id.as_str())
                .copied()
                .unwrap_or(&r.connector_id)),
            st = esc(&r.state),
            words = delivery_words(&r.state, r.pause_reason.as_deref()),
            // Delivered: when it reached the accounting system; else its
            // last change.
            when = log_time(r.delivered_at.filter(|_| r.state == state::DELIVERED).unwrap_or(r.updated_at)),
        ));
    }
    if rows.is_empty() {
        let none = match (filter, number) {
            (_, Some(n)) => format!("No document numbered {} here.", esc(n)),
            (Some(f), None) => format!("No {f} documents."),
            (None, None) => "No documents yet.".to_string(),
        };
        log.push_str(&format!(
            "<tr><td colspan=\"6\" id=\"log-empty\">{none}</td></tr>"
        ));
    }
    log.push_str("</table>");
    // Paging: older rows after the last one shown, and back to the newest.
    let here = |after: Option<&LogCursor>| {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query.append_pair("log", filter.unwrap_or("all"));
        if let Some(n) = number {
            query.append_pair("number", n);
        }
        if let Some(a) = after {
            query.append_pair("after", &a.to_string());
        }
        esc(&format!("/integrations?{}#log-heading", query.finish()))
    };
    let mut pages = Vec::new();
    if after.is_some() {
        pages.push(format!(
            "<a href=\"{}\" id=\"log-newest\">Newest</a>",
            here(None)
        ));
    }
    if rows.len() as i64 == LOG_ROWS
        && let Some(last) = rows.last()
    {
        pages.push(format!(
            "<a href=\"{}\" id=\"log-older\">Older</a>",
            here(Some(&LogCursor::after(last)))
        ));
    }
    if !pages.is_empty() {
        log.push_str(&format!("<p id=\"log-pages\">{}</p>", pages.join(" · ")));
    }
    let who = match signed_in(&st, &s).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    page("Integrations", &format!("{who}{cards}{log}"))
}

/// The page's header: who is signed in, for which tenant (its name and
/// id: a sign-in link for another tenant must not go unnoticed), and Sign
/// out.
async fn signed_in(st: &AdminState, s: &Session) -> Result<String, Response> {
    Ok(format!(
        "<form method=\"post\" action=\"/integrations/logout\" id=\"who\"><small>Signed in as <span id=\"signed-in\">{}</span>{} <button type=\"submit\" id=\"logout\">Sign out</button></small></form>",
        who_for(st, &s.tenant, &s.admin).await?,
        if s.super_admin { " (Super Admin)" } else { "" }
    ))
}

/// A connection's state as the card says it (the API and the element's
/// `data-state` keep the code).
fn connection_words(state: &str) -> &str {
    match state {
        "active" => "Connected",
        "needs-reauth" => "Needs you to reconnect",
        "disconnected" => "Disconnected",
        "not connected" => "Not connected",
        other => other,
    }
}

/// A delivery's state (and why it is paused) as the log says it (the
/// API and the cell's class keep the codes).
fn delivery_words(state: &str, pause_reason: Option<&str>) -> &'static str {
    match (state, pause_reason) {
        (state::PAUSED, Some("mapping")) => "Waiting for an account mapping",
        (state::PAUSED, Some("reauth")) => "Waiting for you to reconnect",
        (state::PAUSED, _) => "Waiting for you",
        (state::PENDING, _) => "Waiting to be sent",
        (state::WORKING, _) => "Being sent",
        (state::DELIVERED, _) => "Delivered",
        (state::FAILED, _) => "Failed",
        _ => "Unknown",
    }
}

/// A time of the delivery log (Unix milliseconds) in UTC, to the minute.
fn log_time(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => format!(
            "<time datetime=\"{}\">{}</time>",
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            t.format("%Y-%m-%d %H:%M UTC")
        ),
        None => String::new(),
    }
}

/// How many rows the delivery log shows at once (the latest first).
const LOG_ROWS: i64 = 50;

/// The delivery log's heading and filters: one link per state with its
/// count (the current one marked), a search by document number, and Retry
/// for every failed document when there are any.
fn log_filters(
    filter: Option<&str>,
    number: Option<&str>,
    counts: &BTreeMap<String, i64>,
) -> String {
    let title = match (filter, number) {
        (_, Some(n)) => format!("Delivery log: {}", esc(n)),
        (Some(f), None) => format!("Delivery log: {f}"),
        (None, None) => "Delivery log".to_string(),
    };
    let mut out = format!("<h2 id=\"log-heading\">{title}</h2><p id=\"log-filter\">Show:");
    let all: i64 = counts.values().sum();
    let link = |key: &str, label: &str, n: i64, current: bool| {
        format!(
            " <a href=\"/integrations?log={key}#log-heading\" id=\"log-{key}\"{}>{label} ({n})</a>",
            if current {
                " class=\"current\" aria-current=\"page\""
            } else {
                ""
            }
        )
    };
    out.push_str(&link(
        "all",
        "All",
        all,
        filter.is_none() && number.is_none(),
    ));
    for st in state::ALL {
        let mut label = st.to_string();
        label[..1].make_ascii_uppercase();
        let n = counts.get(st).copied().unwrap_or(0);
        out.push_str(&link(st, &label, n, filter == Some(st) && number.is_none()));
    }
    out.push_str(&format!(
        "</p><form method=\"get\" action=\"/integrations\" id=\"log-find\"><input type=\"hidden\" name=\"log\" value=\"{}\"><input type=\"search\" name=\"number\" value=\"{}\" placeholder=\"Document number\" aria-label=\"Document number\"> <button type=\"submit\">Find</button></form>",
        filter.unwrap_or("all"),
        esc(number.unwrap_or(""))
    ));
    let failed = counts.get(state::FAILED).copied().unwrap_or(0);
    if filter == Some(state::FAILED) && failed > 0 {
        out.push_str(&format!(
            "<form method=\"post\" action=\"/integrations/retry\" id=\"retry-all\"><button type=\"submit\">Retry all {failed} failed</button></form>"
        ));
    }
    out
}

/// The numbers of the `shown` documents of `count`, escaped and joined,
/// and " and N more" for the rest (empty when all are shown).
fn named(shown: &[crate::store::missed::MissedDocument], count: i64) -> (String, String) {
    let numbers = shown
        .iter()
        .map(|d| esc(&d.number))
        .collect::<Vec<_>>()
        .join(", ");
    let more = if count > shown.len() as i64 {
        format!(" and {} more", count - shown.len() as i64)
    } else {
        String::new()
    };
    (numbers, more)
}

/// One connector's card: status and organisation, Connect while not
/// active, the menu once there is a connection, and the settings form.
async fn card(
    st: &AdminState,
    tenant: &str,
    m: &crate::manifest::Manifest,
) -> Result<String, crate::store::StoreError> {
    let id = m.id.as_str();
    let xero = id == "xero";
    // Element ids: the Xero card's unprefixed (what the page always had);
    // another card's `<id>_<name>`. Connector ids never hold '_', and no
    // unprefixed id does, so no two cards' elements can share an id.
    let el = |name: &str| {
        if xero {
            name.to_string()
        } else {
            format!("{}_{name}", esc(id))
        }
    };
    let q = if xero {
        String::new()
    } else {
        format!("?connector={}", esc(id))
    };
    let conn = st.store.connection_for(tenant, id).await?;
    let (state, org) = match &conn {
        Some(c) => (
            c.state.as_str().to_string(),
            c.external_tenant_name.clone().unwrap_or_default(),
        ),
        None => ("not connected".to_string(), String::new()),
    };
    let mut card = format!(
        "<div class=\"card\" id=\"{cid}\"><h2>{name}</h2>\
         <p>Status: <span class=\"state {cls}\" id=\"{sid}\" data-state=\"{code}\">{words}</span>{org}</p>",
        cid = if xero { "xero".to_string() } else { el("card") },
        name = esc(&m.name),
        cls = esc(&state.replace(' ', "-")),
        sid = el("status"),
        code = esc(&state),
        words = esc(connection_words(&state)),
        org = if org.is_empty() {
            String::new()
        } else {
            format!(
                " — <span id=\"{}\">{}</span>",
                el("organisation"),
                esc(&org)
            )
        },
    );
    // Why it needs attention, in the provider's or the host's words.
    if let Some(c) = &conn
        && state != "active"
        && let Some(why) = &c.state_reason
    {
        card.push_str(&format!(
            "<p class=\"reason\" id=\"{}\">{}</p>",
            el("reason"),
            esc(why)
        ));
    }
    if conn.as_ref().is_some_and(|c| c.mappings_review) {
        card.push_str(&format!(
            "<p class=\"review\" id=\"{}\">Connected to another organisation: nothing is sent until you have checked the account mappings — <a href=\"/integrations/configure{q}\">Configure</a>, check and save.</p>",
            el("review")
        ));
    }
    // Documents issued while it was disconnected: never sent to it, and
    // not sent by reconnecting either; the admin decides.
    if let Some(c) = &conn {
        let (count, docs) = st
            .store
            .missed_documents(&c.id, &m.document_kinds, MISSED_SHOWN)
            .await?;
        if count > 0 {
            let (numbers, more) = named(&docs, count);
            let name = esc(&m.name);
            let (n, were, them) = if count == 1 {
                ("1 document".to_string(), "was", "it")
            } else {
                (format!("{count} documents"), "were", "them")
            };
            if c.state == crate::store::ConnectionState::Disconnected {
                card.push_str(&format!(
                    "<p class=\"missed\" id=\"{}\" data-count=\"{count}\">{n} issued since {name} was disconnected {were} not sent to it ({numbers}{more}). Once you reconnect, you can send {them} from here.</p>",
                    el("missed"),
                ));
            } else {
                card.push_str(&format!(
                    "<p class=\"missed\" id=\"{}\" data-count=\"{count}\">{n} issued while {name} was disconnected {were} never sent to it: {numbers}{more}. Reconnecting does not send {them} by itself.</p>\
                     <form method=\"post\" action=\"/integrations/send-missed{q}\"><button id=\"{}\" type=\"submit\">Send {them} to {name}</button></form>",
                    el("missed"),
                    el("send_missed"),
                ));
            }
        }
        // Missed too long ago: retention removed what would be sent. Said,
        // so they do not vanish from the admin's view unsaid.
        let (too_old, old_docs) = st
            .store
            .missed_too_old(&c.id, &m.document_kinds, MISSED_SHOWN)
            .await?;
        if too_old > 0 {
            let name = esc(&m.name);
            let (numbers, more) = named(&old_docs, too_old);
            let (n, were, its, they, belong) = if too_old == 1 {
                ("1 document".to_string(), "was", "its", "it", "it belongs")
            } else {
                (
                    format!("{too_old} documents"),
                    "were",
                    "their",
                    "they",
                    "they belong",
                )
            };
            card.push_str(&format!(
                "<p class=\"missed-old\" id=\"{}\" data-count=\"{too_old}\">{n} issued while {name} was disconnected ({numbers}{more}) {were} never sent to it, and {its} content has since been removed (the retention period), so {they} can no longer be sent from here. If {belong} in {name}, enter {they} there by hand.</p>",
                el("missed_old"),
            ));
        }
    }
    if state != "active" {
        card.push_str(&format!(
            "<form method=\"post\" action=\"/integrations/connect{q}\"><button id=\"{}\" type=\"submit\">Connect</button></form>",
            el("connect")
        ));
    }
    if conn.is_some() {
        card.push_str(&format!(
            "<details class=\"menu\" id=\"{menu}\"><summary aria-label=\"More\">&#8942;</summary><div>\
             <p><a id=\"{configure}\" href=\"/integrations/configure{q}\">Configure</a></p>\
             <form method=\"post\" action=\"/integrations/check{q}\"><button id=\"{check}\" type=\"submit\">Test connection</button></form>\
             <form method=\"post\" action=\"/integrations/disconnect{q}\"><button id=\"{disconnect}\" type=\"submit\">Disconnect</button></form>\
             </div></details>",
            menu = el("menu"),
            configure = el("configure"),
            check = el("check"),
            disconnect = el("disconnect"),
        ));
    }
    card.push_str(&settings_form(st, tenant, id, &el, &q).await);
    card.push_str("</div>");
    Ok(card)
}

/// A connector's declared settings with a form to change them:
/// a choice where the manifest lists the allowed values, a text field
/// otherwise, and for a secret an empty password field (write-only) and a
/// box to clear it. Empty when the connector declares no settings.
async fn settings_form(
    st: &AdminState,
    tenant: &str,
    connector: &str,
    el: &(dyn Fn(&str) -> String + Sync),
    q: &str,
) -> String {
    let Ok(list) = st.connections.settings(tenant, connector).await else {
        return String::new();
    };
    let list: Vec<_> = list.into_iter().filter(|v| v.declared).collect();
    if list.is_empty() {
        return String::new();
    }
    let mut f = format!(
        "<h3>Settings</h3><form method=\"post\" action=\"/integrations/settings{q}\" id=\"{}\"><table>",
        el("settings")
    );
    for v in &list {
        let key = esc(&v.key);
        let default_label = v
            .default
            .as_deref()
            .map(|d| format!("default ({})", esc(d)))
            .unwrap_or_else(|| "not set".into());
        let own = if v.stored { v.value.clone() } else { None };
        let input = if v.secret {
            format!(
                "<input type=\"password\" name=\"{key}\" value=\"\" autocomplete=\"off\" placeholder=\"{p}\"> \
                 <span class=\"secret-state\" data-key=\"{key}\">{p}</span>{clear}",
                p = esc(v.value.as_deref().unwrap_or("")),
                clear = if v.stored {
                    format!(
                        " <label><input type=\"checkbox\" name=\"unset\" value=\"{key}\"> clear</label>"
                    )
                } else {
                    String::new()
                },
            )
        } else if !v.allowed.is_empty() {
            let mut o = format!("<option value=\"\">{default_label}</option>");
            for a in &v.allowed {
                let sel = if own.as_deref() == Some(a) {
                    " selected"
                } else {
                    ""
                };
                o.push_str(&format!(
                    "<option value=\"{a}\"{sel}>{a}</option>",
                    a = esc(a)
                ));
            }
            format!("<select name=\"{key}\">{o}</select>")
        } else {
            format!(
                "<input type=\"text\" name=\"{key}\" value=\"{val}\" placeholder=\"{default_label}\">",
                val = esc(own.as_deref().unwrap_or(""))
            )
        };
        f.push_str(&format!(
            "<tr><td><label>{key}</label><br><small>{d}</small></td><td>{input}</td></tr>",
            d = esc(v.description.as_deref().unwrap_or(""))
        ));
    }
    f.push_str(&format!(
        "</table><p><button id=\"{}\" type=\"submit\">Save settings</button></p></form>",
        el("save-settings")
    ));
    f
}

/// Apply the settings form: a changed value is stored, an emptied
/// (non-secret) field or a ticked "clear" removes the stored value, an
/// empty secret field leaves the secret as it is. Every change is audited.
async fn save_settings(
    State(st): S,
    headers: HeaderMap,
    Query(which): Query<Which>,
    Form(f): Form<Vec<(String, String)>>,
) -> Response {
    let s = match super_admin_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Some(r) = nul_in_form(f.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        return r;
    }
    let connector = which.id();
    let current = match st.connections.settings(&s.tenant, connector).await {
        Ok(c) => c,
        Err(e) if e.status() >= 500 => return store_failed("saving settings", &e),
        Err(e) => return message(StatusCode::NOT_FOUND, "No settings", &e.to_string()),
    };
    let clear: Vec<&str> = f
        .iter()
        .filter(|(k, _)| k == "unset")
        .map(|(_, v)| v.as_str())
        .collect();
    // Every change is worked out and checked first, then made: one bad
    // value refuses the form, naming its key, with nothing changed (they
    // were once saved one by one up to the bad one).
    let mut changes: Vec<(&str, Option<&str>)> = Vec::new();
    for (key, value) in f.iter().filter(|(k, _)| k != "unset") {
        let Some(v) = current.iter().find(|v| &v.key == key && v.declared) else {
            return message(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Settings not saved",
                &format!("{key}: unknown setting. Nothing was changed."),
            );
        };
        let change = if v.secret {
            (!value.is_empty() && !clear.contains(&key.as_str())).then_some(Some(value.as_str()))
        } else if value.is_empty() {
            v.stored.then_some(None)
        } else {
            (!(v.stored && v.value.as_deref() == Some(value.as_str())))
                .then_some(Some(value.as_str()))
        };
        // Values are checked with the writes (all before any).
        if let Some(change) = change {
            changes.push((key.as_str(), change));
        }
    }
    // Clears: a key the connector does not declare refuses the form; one
    // with nothing stored (another admin cleared it since this form was
    // shown) is already as asked; each key once.
    for key in clear {
        let Some(v) = current.iter().find(|v| v.key == key && v.declared) else {
            return message(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Settings not saved",
                &format!("{key}: unknown setting. Nothing was changed."),
            );
        };
        if v.stored && !changes.iter().any(|(k, _)| *k == key) {
            changes.push((key, None));
        }
    }
    // Written in one transaction with their audit entries.
    if let Err(e) = st
        .connections
        .change_settings(&s.tenant, connector, &changes, &s.admin)
        .await
    {
        if e.status() >= 500 {
            return store_failed("saving settings", &e);
        }
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Settings not saved",
            &format!("{e} Nothing was changed."),
        );
    }
    let changed = changes.len();
    tracing::info!(tenant = %s.tenant, connector, changed, "settings saved from the Integrations page");
    redirect("/integrations")
}

async fn configure(State(st): S, headers: HeaderMap, Query(which): Query<Which>) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let name = display_name(&st, which.id());
    let scope = MappingScope {
        tenant_id: s.tenant.clone(),
        connector_id: which.id().to_string(),
    };
    let (org, list) = match st.connections.account_list(&scope).await {
        Ok(Some(ol)) => ol,
        Ok(None) => {
            return message(
                StatusCode::CONFLICT,
                "Not connected",
                &format!("Connect {name} first: the choices are the organisation's accounts."),
            );
        }
        Err(crate::connections::mappings::MappingError::NeedsReauth(why)) => {
            return message(
                StatusCode::CONFLICT,
                &format!("Connect {name} again"),
                &format!(
                    "{name} no longer accepts this connection ({why}). Choose Connect on the {name} card, then configure."
                ),
            );
        }
        Err(e @ crate::connections::mappings::MappingError::Store(_)) => {
            return store_failed("reading the account list", &e);
        }
        Err(e) => {
            return message(
                StatusCode::BAD_GATEWAY,
                &format!("{name} did not answer"),
                &e.to_string(),
            );
        }
    };
    // Not read: no form (shown empty, saving it would clear every row).
    let mapped: BTreeMap<String, AccountMapping> = match st.connections.mappings(&scope).await {
        Ok(list) => list
            .into_iter()
            .map(|m| (m.mapping.kind.clone(), m.mapping))
            .collect(),
        Err(e) => return store_failed("reading mappings", &e),
    };
    let current: BTreeMap<String, String> = mapped
        .iter()
        .map(|(k, m)| (k.clone(), m.account_code.clone()))
        .collect();
    let kinds: Vec<(String, String)> = match st.connections.catalogue() {
        Some(c) => c
            .kinds
            .iter()
            .map(|k| (k.key.clone(), k.name.clone()))
            .collect(),
        // No catalogue configured: the kinds mapped so far and those the
        // tenant's documents wait for (else a new kind could not be mapped
        // here at all).
        None => {
            let waiting = match st
                .store
                .unmapped_kinds_waiting(&scope.tenant_id, &scope.connector_id)
                .await
            {
                Ok(k) => k,
                Err(e) => return store_failed("reading the kinds waiting", &e),
            };
            let mut all: std::collections::BTreeSet<String> = current.keys().cloned().collect();
            all.extend(waiting);
            all.into_iter().map(|k| (k.clone(), k)).collect()
        }
    };
    let q = which
        .connector
        .as_deref()
        .map(|c| format!("?connector={}", esc(c)))
        .unwrap_or_default();
    // Each row carries the code it was shown with: saving changes only
    // the rows the admin changed, so a row another admin changed since is
    // left as they set it.
    let was = |key: &str| {
        format!(
            "<input type=\"hidden\" name=\"{WAS}{}\" value=\"{}\">",
            esc(key),
            esc(current.get(key).map(String::as_str).unwrap_or(""))
        )
    };
    // The tax rate of a row: the account's default unless one is chosen
    // (a choice made through the API is shown and kept).
    let tax_cell = |key: &str| -> String {
        if list.tax_rates.is_empty() {
            return String::new();
        }
        let now = mapped.get(key).and_then(|m| m.tax_type.clone());
        let mut options = String::from("<option value=\"\">— the account's default —</option>");
        if let Some(t) = &now
            && !list.tax_rates.iter().any(|r| &r.tax_type == t)
        {
            options.push_str(&format!(
                "<option value=\"{t}\" selected>{t} (not an active tax rate)</option>",
                t = esc(t)
            ));
        }
        for r in &list.tax_rates {
            let sel = if now.as_deref() == Some(r.tax_type.as_str()) {
                " selected"
            } else {
                ""
            };
            options.push_str(&format!(
                "<option value=\"{t}\"{sel}>{n} ({rate} %)</option>",
                t = esc(&r.tax_type),
                n = esc(&r.name),
                rate = esc(&r.rate)
            ));
        }
        format!(
            "<td><select name=\"{TAX}{k}\" aria-label=\"Tax rate\">{options}</select><input type=\"hidden\" name=\"{WAS_TAX}{k}\" value=\"{t}\"></td>",
            k = esc(key),
            t = esc(now.as_deref().unwrap_or(""))
        )
    };
    let tax_head = if list.tax_rates.is_empty() {
        ""
    } else {
        "<th>Tax rate</th>"
    };
    let review = match st
        .store
        .connection_for(&scope.tenant_id, &scope.connector_id)
        .await
    {
        Ok(c) => c.is_some_and(|c| c.mappings_review),
        Err(e) => return store_failed("reading mappings", &e),
    };
    let mut form = if review {
        format!(
            "<p class=\"review\" id=\"review\">These mappings were chosen from another organisation's accounts. Check each line against {}'s accounts and save: nothing is sent until you do.</p>",
            esc(&org)
        )
    } else {
        String::new()
    };
    form.push_str(&format!(
        "<form method=\"post\" action=\"/integrations/mappings{q}\" id=\"mapping\"><table><tr><th>Line type</th><th>Account</th>{tax_head}</tr>",
    ));
    for (key, name) in kinds {
        if list.accounts.is_empty() {
            // No chart of accounts to choose from: the admin types codes.
            form.push_str(&format!(
                "<tr><td>{}</td><td><input type=\"text\" name=\"{}\" value=\"{}\" placeholder=\"account code\">{}</td>{}</tr>",
                esc(&name),
                esc(&key),
                esc(current.get(&key).map(String::as_str).unwrap_or("")),
                was(&key),
                tax_cell(&key)
            ));
            continue;
        }
        let mut options = String::from("<option value=\"\">— not mapped —</option>");
        // A mapped code that is no longer an active account stays chosen
        // (saving the form must not clear it unasked), marked as such.
        if let Some(code) = current.get(&key)
            && !list.accounts.iter().any(|a| &a.code == code)
        {
            options.push_str(&format!(
                "<option value=\"{c}\" selected>{c} (not an active account)</option>",
                c = esc(code)
            ));
        }
        for a in &list.accounts {
            let sel = if current.get(&key) == Some(&a.code) {
                " selected"
            } else {
                ""
            };
            options.push_str(&format!(
                "<option value=\"{c}\"{sel}>{c} {n}</option>",
                c = esc(&a.code),
                n = esc(&a.name)
            ));
        }
        form.push_str(&format!(
            "<tr><td>{}</td><td><select name=\"{}\">{options}</select>{}</td>{}</tr>",
            esc(&name),
            esc(&key),
            was(&key),
            tax_cell(&key)
        ));
    }
    form.push_str(
        "</table><p><button id=\"save\" type=\"submit\">Save mappings</button></p></form>",
    );
    let who = match signed_in(&st, &s).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    page(&format!("Configure {name}"), &format!("{who}{form}"))
}

/// The most line kinds one save of the mapping form may hold.
const MAX_FORM_ROWS: usize = 1_000;

async fn save_mappings(
    State(st): S,
    headers: HeaderMap,
    Query(which): Query<Which>,
    Form(f): Form<Vec<(String, String)>>,
) -> Response {
    let s = match super_admin_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Some(r) = nul_in_form(f.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        return r;
    }
    if st.connections.manifest(which.id()).is_none() {
        return message(
            StatusCode::NOT_FOUND,
            "No such connector",
            &format!("connector: {:?} is not installed", which.id()),
        );
    }
    let scope = MappingScope {
        tenant_id: s.tenant.clone(),
        connector_id: which.id().to_string(),
    };
    let current: BTreeMap<String, AccountMapping> = match st.connections.mappings(&scope).await {
        Ok(list) => list
            .into_iter()
            .map(|m| (m.mapping.kind.clone(), m.mapping))
            .collect(),
        Err(e) => return store_failed("reading mappings", &e),
    };
    // Only the rows the admin changed: a changed code is set (and
    // checked), "not mapped" clears a mapping, an unchanged row is left
    // as it is (with its tax type and who set it).
    let field = |prefix: &str| -> BTreeMap<String, String> {
        f.iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.trim().to_string())))
            .collect()
    };
    let (shown, taxes, shown_taxes) = (field(WAS), field(TAX), field(WAS_TAX));
    let mut set: Vec<AccountMapping> = Vec::new();
    let mut clear: Vec<String> = Vec::new();
    // One row per kind, the last one sent winning (in the order sent),
    // and no more rows than a chart could need: each row may cost a check
    // and an audit line.
    let mut seen = std::collections::HashSet::new();
    let mut rows: Vec<(String, String)> = f
        .into_iter()
        .rev()
        .filter(|(k, _)| ![WAS, TAX, WAS_TAX].iter().any(|p| k.starts_with(p)))
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    rows.reverse();
    if rows.len() > MAX_FORM_ROWS {
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Mappings not saved",
            &format!(
                "mappings: the form holds {} line kinds; at most {MAX_FORM_ROWS} are saved at once. Nothing was changed.",
                rows.len()
            ),
        );
    }
    for (kind, code) in rows {
        let code = code.trim();
        let now = current.get(&kind);
        let now_code = now.map(|m| m.account_code.as_str());
        let now_tax = now.and_then(|m| m.tax_type.as_deref()).unwrap_or("");
        // A row is changed when its code or its tax rate differs from what
        // it was shown with (or, from a form without those, from storage);
        // an unchanged row is left as it is now (with who set it).
        let code_changed = shown
            .get(&kind)
            .map(String::as_str)
            .unwrap_or(now_code.unwrap_or(""))
            != code;
        let tax = taxes.get(&kind).map(String::as_str);
        let tax_changed = tax.is_some_and(|t| {
            shown_taxes
                .get(&kind)
                .map(String::as_str)
                .unwrap_or(now_tax)
                != t
        });
        if !code_changed && !tax_changed {
            continue;
        }
        // Only the field the admin changed is written; the other is kept
        // as it stands now (another admin may have changed it since the
        // form was shown). A row another admin removed since keeps the
        // code it was shown with when only its tax rate changed here.
        let code = if code_changed {
            code
        } else {
            now_code.unwrap_or(code)
        };
        let tax_type = match tax {
            Some(t) if tax_changed => (!t.is_empty()).then(|| t.to_string()),
            _ => (!now_tax.is_empty()).then(|| now_tax.to_string()),
        };
        match now_code {
            Some(c) if c == code && now_tax == tax_type.as_deref().unwrap_or("") => {}
            Some(_) if code.is_empty() => clear.push(kind),
            None if code.is_empty() => {}
            _ => set.push(AccountMapping {
                kind,
                account_code: code.to_string(),
                tax_type,
            }),
        }
    }
    if let Err((kind, e)) = st
        .connections
        .save_mapping_form(&scope, &set, &clear, &s.admin)
        .await
    {
        // The connection cannot check them (409: not active, or no
        // longer accepted), storage (logged, not shown) or the account
        // list unavailable (503), else a refused row (422).
        if matches!(e, crate::connections::mappings::MappingError::Store(_)) {
            return store_failed("saving mappings", &e);
        }
        let status = match e.status() {
            503 => StatusCode::SERVICE_UNAVAILABLE,
            409 => StatusCode::CONFLICT,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        let about = kind.map(|k| format!("{k}: ")).unwrap_or_default();
        return message(
            status,
            "Mappings not saved",
            &format!("{about}{e} Nothing was changed."),
        );
    }
    let now = chrono::Utc::now().timestamp();
    for m in &set {
        let _ = st
            .store
            .audit(
                &s.admin,
                Some(&s.tenant),
                "mapping.set",
                &match &m.tax_type {
                    Some(t) => format!(
                        "{} {} -> {} ({t})",
                        scope.connector_id, m.kind, m.account_code
                    ),
                    None => format!("{} {} -> {}", scope.connector_id, m.kind, m.account_code),
                },
                now,
            )
            .await;
    }
    for kind in &clear {
        let _ = st
            .store
            .audit(
                &s.admin,
                Some(&s.tenant),
                "mapping.delete",
                &format!("{} {kind}", scope.connector_id),
                now,
            )
            .await;
    }
    tracing::info!(tenant = %s.tenant, set = set.len(), cleared = clear.len(), "mappings saved from the Integrations page");
    redirect("/integrations")
}

/// A connect error's page, with the error's own status: a bad request 400,
/// a refusal 422, a provider that did not answer 502, a storage failure
/// 503 (not 500: it passes).
fn connect_refused(e: &crate::connections::ConnectError) -> Response {
    if e.is_storage_failure() {
        tracing::error!(error = %e, "connecting from the Integrations page: the store failed");
        return storage_unavailable();
    }
    message(
        match e.status() {
            500 => StatusCode::SERVICE_UNAVAILABLE,
            s => StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_REQUEST),
        },
        "Cannot connect",
        &e.to_string(),
    )
}

async fn connect(State(st): S, headers: HeaderMap, Query(which): Query<Which>) -> Response {
    let s = match super_admin_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let connector = which.id();
    let Some(grantless) = st.connections.connects_without_grant(connector) else {
        return message(
            StatusCode::NOT_FOUND,
            "No such connector",
            &format!("connector: {connector:?} is not installed"),
        );
    };
    if grantless {
        // No consent screen: the connector checks the settings, and the
        // connection is made now.
        let name = display_name(&st, connector);
        return match st
            .connections
            .connect_without_grant(&s.tenant, connector, &s.admin)
            .await
        {
            Ok(done) => {
                let _ = st
                    .store
                    .audit(
                        &s.admin,
                        Some(&s.tenant),
                        "connect",
                        connector,
                        chrono::Utc::now().timestamp(),
                    )
                    .await;
                page(
                    "Connected",
                    &format!(
                        "<p id=\"connected\">{name} is connected: documents go to <strong id=\"organisation\">{}</strong>.</p>\
                         <p><a id=\"back\" href=\"/integrations\">Back to Integrations</a></p>",
                        esc(done
                            .connection
                            .external_tenant_name
                            .as_deref()
                            .unwrap_or("")),
                        name = esc(&name),
                    ),
                )
            }
            Err(e) => connect_refused(&e),
        };
    }
    match st
        .connections
        .begin_connect_in_browser(&s.tenant, connector, &s.admin)
        .await
    {
        Ok((url, state)) => {
            let _ = st
                .store
                .audit(
                    &s.admin,
                    Some(&s.tenant),
                    "connect.start",
                    connector,
                    chrono::Utc::now().timestamp(),
                )
                .await;
            // The state goes with this browser too: the callback completes
            // only where the sign-in started.
            let cookie = set_cookie(
                &crate::connections::flow_cookie_name(&state),
                &state,
                "/oauth",
                crate::connections::STATE_TTL_SECS,
                &st.public_url,
            );
            let mut r = redirect(url.as_str());
            if let Ok(v) = header::HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => connect_refused(&e),
    }
}

/// Test connection: the connector's `check` on the live connection, shown
/// as the organisation it reaches (and the connector's facts about it) or
/// what is wrong. Any admin of the tenant may run it: it writes nothing in
/// the accounting system (see [`crate::connections::check`]).
async fn check(State(st): S, headers: HeaderMap, Query(which): Query<Which>) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let name = display_name(&st, which.id());
    match st.connections.check_connection(&s.tenant, which.id()).await {
        Ok(report) => {
            let details: String = report
                .details
                .iter()
                .map(|d| format!("<li>{}</li>", esc(d)))
                .collect();
            page(
                "Connection works",
                &format!(
                    "<p id=\"message\">ledgerport reaches <strong id=\"organisation\">{}</strong> in {}.</p>\
                     <ul id=\"details\">{details}</ul><p><a href=\"/integrations\">Back</a></p>",
                    esc(&report.organisation_name),
                    esc(&name)
                ),
            )
        }
        Err(crate::connections::CheckError::Store(e)) => {
            tracing::error!(error = %e, "connection check: the store failed");
            message(
                StatusCode::SERVICE_UNAVAILABLE,
                "Connection check failed",
                "ledgerport's database is not available right now; try again shortly.",
            )
        }
        Err(e) => message(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY),
            "Connection check failed",
            &e.to_string(),
        ),
    }
}

async fn disconnect(State(st): S, headers: HeaderMap, Query(which): Query<Which>) -> Response {
    let s = match super_admin_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let connector = which.id();
    let conn = match st.store.connection_for(&s.tenant, connector).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return message(
                StatusCode::NOT_FOUND,
                "Not connected",
                &format!(
                    "connector: there is no {} connection to disconnect.",
                    display_name(&st, connector)
                ),
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "disconnecting from the Integrations page: the store failed");
            return storage_unavailable();
        }
    };
    match st.connections.disconnect(&conn.id, &s.admin).await {
        Ok(report) => {
            let _ = st
                .store
                .audit(
                    &s.admin,
                    Some(&s.tenant),
                    "disconnect",
                    connector,
                    chrono::Utc::now().timestamp(),
                )
                .await;
            if report.problems.is_empty() {
                return redirect("/integrations");
            }
            // Disconnected here, but the provider may still list the app:
            // the admin is told what to remove there.
            let name = display_name(&st, connector);
            let items: String = report
                .problems
                .iter()
                .map(|p| format!("<li>{}</li>", esc(p)))
                .collect();
            page(
                "Disconnected",
                &format!(
                    "<p id=\"disconnected\">{n} is disconnected: nothing more is sent to it.</p>\
                     <p>{n} did not confirm everything:</p><ul id=\"problems\">{items}</ul>\
                     <p>To be sure ledgerport has no access left, remove it from the connected apps in {n} too.</p>\
                     <p><a href=\"/integrations\">Back to Integrations</a></p>",
                    n = esc(&name)
                ),
            )
        }
        // ledgerport's own database failed: the accounting system is not
        // to blame, and trying again is the answer.
        Err(e) if e.is_storage_failure() => {
            tracing::error!(error = %e, "disconnecting from the Integrations page: the store failed");
            storage_unavailable()
        }
        Err(e) => message(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY),
            "Disconnect failed",
            &e.to_string(),
        ),
    }
}

/// Missed documents named on a card (the count says how many there are).
const MISSED_SHOWN: i64 = 10;

/// Send every document the connection missed while it was disconnected
/// (the card's button; a Super Admin's decision, as Connect and Disconnect
/// are).
async fn send_missed(State(st): S, headers: HeaderMap, Query(which): Query<Which>) -> Response {
    let s = match super_admin_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let connector = which.id();
    let name = display_name(&st, connector);
    let Some(manifest) = st.connections.manifest(connector) else {
        return message(
            StatusCode::NOT_FOUND,
            "Not sent",
            &format!("connector: {connector:?} is not installed here."),
        );
    };
    let conn = match st.store.connection_for(&s.tenant, connector).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return message(
                StatusCode::NOT_FOUND,
                "Not sent",
                &format!("connector: you never connected {name}, so it missed nothing."),
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "sending missed documents: the store failed");
            return storage_unavailable();
        }
    };
    match st
        .store
        .send_missed(
            &conn.id,
            &manifest.document_kinds,
            None,
            crate::dispatch::now_ms(),
        )
        .await
    {
        Ok(r) => {
            let _ = st
                .store
                .audit(
                    &s.admin,
                    Some(&s.tenant),
                    "send-missed",
                    &format!("{} document(s) to {connector}", r.queued),
                    chrono::Utc::now().timestamp(),
                )
                .await;
            if r.queued > 0 {
                (st.on_retry)();
            }
            redirect("/integrations")
        }
        Err(crate::store::StoreError::Conflict(_)) => message(
            StatusCode::CONFLICT,
            "Not sent",
            &format!(
                "connector: {name} is disconnected. Reconnect it first, then send what it missed."
            ),
        ),
        Err(e) => {
            tracing::error!(error = %e, "sending missed documents: the store failed");
            storage_unavailable()
        }
    }
}

async fn retry(
    State(st): S,
    headers: HeaderMap,
    Form(f): Form<BTreeMap<String, String>>,
) -> Response {
    let s = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Some(r) = nul_in_form(f.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        return r;
    }
    let id = f.get("id").cloned();
    match st
        .store
        .retry_failed(&s.tenant, id.as_deref(), crate::dispatch::now_ms())
        .await
    {
        Ok(0) if id.is_some() => {
            let id = id.unwrap_or_default();
            match st.store.delivery_state(&s.tenant, &id).await {
                Ok(None) => message(
                    StatusCode::NOT_FOUND,
                    "Retry failed",
                    &format!("id: {id:?} is not one of your deliveries"),
                ),
                Ok(Some(state)) => message(
                    StatusCode::CONFLICT,
                    "Retry failed",
                    &format!("id: {id:?} is {state}; only failed or paused documents are retried"),
                ),
                Err(e) => store_failed("retrying", &e),
            }
        }
        Ok(n) => {
            let _ = st
                .store
                .audit(
                    &s.admin,
                    Some(&s.tenant),
                    "retry",
                    &format!("{n}"),
                    chrono::Utc::now().timestamp(),
                )
                .await;
            (st.on_retry)();
            redirect("/integrations")
        }
        Err(e) => store_failed("retrying", &e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_session_cookie_is_secure_over_https() {
        let c = super::session_cookie("ps_x", "https://lp.example.com");
        assert!(c.contains("; Secure"), "{c}");
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax"), "{c}");
        let c = super::session_cookie("ps_x", "http://127.0.0.1:8080");
        assert!(!c.contains("Secure"), "{c}");
        // However the address is spelled (the daemon accepts both).
        for spelled in ["HTTPS://lp.example.com", " https://lp.example.com"] {
            let c = super::session_cookie("ps_x", spelled);
            assert!(c.contains("; Secure"), "{spelled:?}: {c}");
        }
    }
}
