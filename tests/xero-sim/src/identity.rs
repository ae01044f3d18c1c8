//! Xero identity: the consent page (`login.xero.com/identity/connect/authorize`),
//! the token and revocation endpoints (`identity.xero.com/connect/...`) and the
//! connections API (`api.xero.com/connections`).

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use uuid::Uuid;

use crate::config::{AppConfig, ScopeMode};
use crate::state::{
    AccessEntry, AuthCode, ConnectionInfo, Grant, IdentityState, RefreshEntry, Shared, TokenSet,
};
use crate::xjson::problem;

const COMMON_SCOPES: &[&str] = &["openid", "profile", "email", "offline_access"];
const SHARED_SCOPES: &[&str] = &[
    "accounting.settings",
    "accounting.settings.read",
    "accounting.contacts",
    "accounting.contacts.read",
    "accounting.attachments",
    "accounting.attachments.read",
    "accounting.reports.read",
    "accounting.journals.read",
    "accounting.budgets.read",
];
const GRANULAR_SCOPES: &[&str] = &[
    "accounting.invoices",
    "accounting.invoices.read",
    "accounting.payments",
    "accounting.payments.read",
    "accounting.banktransactions",
    "accounting.banktransactions.read",
    "accounting.manualjournals",
    "accounting.manualjournals.read",
    "accounting.reports.aged.read",
    "accounting.reports.balancesheet.read",
    "accounting.reports.profitandloss.read",
    "accounting.reports.trialbalance.read",
];
const BROAD_SCOPES: &[&str] = &["accounting.transactions", "accounting.transactions.read"];

/// Check a space-separated scope list against an app's scope mode; returns the normalised list.
pub(crate) fn validate_scope(mode: ScopeMode, scope: &str) -> Result<String, String> {
    let mut out: Vec<&str> = Vec::new();
    for s in scope.split_whitespace() {
        let ok = COMMON_SCOPES.contains(&s)
            || SHARED_SCOPES.contains(&s)
            || (mode != ScopeMode::Broad && GRANULAR_SCOPES.contains(&s))
            || (mode != ScopeMode::Granular && BROAD_SCOPES.contains(&s));
        if !ok {
            return Err(format!("unknown or not allowed scope '{s}'"));
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    if out.is_empty() {
        return Err("scope is required".into());
    }
    Ok(out.join(" "))
}

fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

fn jwt(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{body}.")
}

fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).unwrap_or_default()
}

fn get<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn oauth_error(status: StatusCode, error: &str) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn error_page(msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Html(format!(
            "<!doctype html><html><head><title>Xero | Error</title></head><body>\
             <h1>Sorry, something went wrong</h1><p id=\"error\">{}</p></body></html>",
            html_escape(msg)
        )),
    )
        .into_response()
}

fn redirect_with(redirect_uri: &str, params: &[(&str, &str)]) -> Response {
    let q = serde_urlencoded::to_string(params).unwrap_or_default();
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    // Built by hand: `Redirect::to` panics on a URI that is not a valid header value.
    match HeaderValue::from_str(&format!("{redirect_uri}{sep}{q}")) {
        Ok(v) => (StatusCode::FOUND, [(header::LOCATION, v)]).into_response(),
        Err(_) => error_page("Invalid redirect_uri"),
    }
}

/// The parameters of an authorization request, validated.
struct AuthRequest {
    app: AppConfig,
    redirect_uri: String,
    scope: String,
    state: Option<String>,
    challenge: Option<(String, String)>,
    nonce: Option<String>,
}

fn validate_auth_request(
    shared: &Shared,
    params: &[(String, String)],
) -> Result<AuthRequest, Response> {
    let Some(client_id) = get(params, "client_id") else {
        return Err(error_page("unauthorized_client: client_id is missing"));
    };
    let Some(app) = shared.app(client_id).cloned() else {
        return Err(error_page("unauthorized_client: Invalid client_id"));
    };
    let Some(redirect_uri) = get(params, "redirect_uri").map(String::from) else {
        return Err(error_page("invalid_request: redirect_uri is missing"));
    };
    if !app.redirect_uris.is_empty() && !app.redirect_uris.contains(&redirect_uri) {
        return Err(error_page("Invalid redirect_uri"));
    }
    let state = get(params, "state").map(String::from);
    let fail = |err: &str, desc: &str| {
        let mut p = vec![("error", err), ("error_description", desc)];
        if let Some(s) = &state {
            p.push(("state", s));
        }
        redirect_with(&redirect_uri, &p)
    };
    if get(params, "response_type") != Some("code") {
        return Err(fail(
            "unsupported_response_type",
            "response_type must be code",
        ));
    }
    let scope = match validate_scope(app.scope_mode, get(params, "scope").unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return Err(fail("invalid_scope", &e)),
    };
    let challenge = match get(params, "code_challenge") {
        None => None,
        Some(c) => {
            let m = get(params, "code_challenge_method").unwrap_or("plain");
            if m != "S256" && m != "plain" {
                return Err(fail("invalid_request", "unsupported code_challenge_method"));
            }
            Some((c.to_string(), m.to_string()))
        }
    };
    Ok(AuthRequest {
        app,
        redirect_uri,
        scope,
        state,
        challenge,
        nonce: get(params, "nonce").map(String::from),
    })
}

fn issue_code(shared: &Shared, req: &AuthRequest, tenants: Vec<Uuid>) -> Response {
    let code = random_token(24);
    let now = shared.clock.now();
    shared.identity.lock().codes.insert(
        code.clone(),
        AuthCode {
            client_id: req.app.client_id.clone(),
            redirect_uri: req.redirect_uri.clone(),
            scope: req.scope.clone(),
            tenants,
            challenge: req.challenge.clone(),
            expires: crate::clock::add_secs(now, shared.config.lifetimes.auth_code_secs),
            used_by: None,
            nonce: req.nonce.clone(),
        },
    );
    let session_state = random_token(16);
    let mut p = vec![
        ("code", code.as_str()),
        ("scope", req.scope.as_str()),
        ("session_state", session_state.as_str()),
    ];
    if let Some(s) = &req.state {
        p.push(("state", s));
    }
    redirect_with(&req.redirect_uri, &p)
}

/// `GET /identity/connect/authorize`: the consent page (or an immediate redirect when auto-approving).
pub(crate) async fn authorize(
    State(shared): State<Arc<Shared>>,
    RawQuery(q): RawQuery,
) -> Response {
    let params = parse_form(q.unwrap_or_default().as_bytes());
    let req = match validate_auth_request(&shared, &params) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let user_tenants = shared.user_tenants();
    let auto = shared.auto_approve.lock().clone();
    if let Some(list) = auto {
        let tenants: Vec<Uuid> = if list.is_empty() {
            user_tenants
        } else {
            list.into_iter()
                .filter(|t| user_tenants.contains(t))
                .collect()
        };
        return issue_code(&shared, &req, tenants);
    }
    let mut hidden = String::new();
    for key in [
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
        "nonce",
        "response_type",
    ] {
        if let Some(v) = get(&params, key) {
            hidden.push_str(&format!(
                "<input type=\"hidden\" name=\"{key}\" value=\"{}\">\n",
                html_escape(v)
            ));
        }
    }
    let input_type = if user_tenants.len() > 1 {
        "checkbox"
    } else {
        "radio"
    };
    let mut orgs = String::new();
    for (i, t) in user_tenants.iter().enumerate() {
        let name = shared.org(*t).map(|o| o.name.clone()).unwrap_or_default();
        let checked = if i == 0 { " checked" } else { "" };
        orgs.push_str(&format!(
            "<label><input type=\"{input_type}\" name=\"tenant\" value=\"{t}\"{checked}> {}</label><br>\n",
            html_escape(&name)
        ));
    }
    let user = &shared.config.user;
    Html(format!(
        "<!doctype html><html><head><title>Xero | Authorise {app}</title></head><body>\n\
         <h1>{app} wants access to your Xero organisations</h1>\n\
         <p>Logged in as {email}. Requested scopes: <code>{scope}</code></p>\n\
         <form method=\"post\" action=\"/identity/connect/authorize\">\n{hidden}\
         <fieldset><legend>Select organisations</legend>\n{orgs}</fieldset>\n\
         <button type=\"submit\" name=\"action\" value=\"allow\" id=\"approve\">Allow access</button>\n\
         <button type=\"submit\" name=\"action\" value=\"deny\" id=\"deny\">Cancel</button>\n\
         </form></body></html>",
        app = html_escape(&req.app.name),
        email = html_escape(&user.email),
        scope = html_escape(&req.scope),
    ))
    .into_response()
}

/// `POST /identity/connect/authorize`: the consent form submission.
pub(crate) async fn authorize_submit(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let params = parse_form(&body);
    let req = match validate_auth_request(&shared, &params) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if get(&params, "action") == Some("deny") {
        let mut p = vec![
            ("error", "access_denied"),
            ("error_description", "The user denied access"),
        ];
        if let Some(s) = &req.state {
            p.push(("state", s));
        }
        return redirect_with(&req.redirect_uri, &p);
    }
    let user_tenants = shared.user_tenants();
    let mut tenants: Vec<Uuid> = params
        .iter()
        .filter(|(k, _)| k == "tenant")
        .filter_map(|(_, v)| v.parse().ok())
        .filter(|t| user_tenants.contains(t))
        .collect();
    tenants.dedup();
    if tenants.is_empty() {
        return error_page("Select at least one organisation");
    }
    issue_code(&shared, &req, tenants)
}

/// Client authentication for the token and revocation endpoints.
/// Returns the app, or the error response (401 for bad Basic auth, 400 otherwise).
fn client_auth(
    shared: &Shared,
    headers: &HeaderMap,
    form: &[(String, String)],
    allow_public: bool,
) -> Result<AppConfig, Response> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
        .map(|b| {
            STANDARD
                .decode(b.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .and_then(|s| {
                    s.split_once(':')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                })
        });
    let (id, secret, via_basic) = match basic {
        Some(Some((id, secret))) => (id, Some(secret), true),
        Some(None) => return Err(oauth_error(StatusCode::UNAUTHORIZED, "invalid_client")),
        None => match get(form, "client_id") {
            Some(id) => (
                id.to_string(),
                get(form, "client_secret").map(String::from),
                false,
            ),
            None => return Err(oauth_error(StatusCode::BAD_REQUEST, "invalid_client")),
        },
    };
    let status = if via_basic {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    };
    let Some(app) = shared.app(&id) else {
        return Err(oauth_error(status, "invalid_client"));
    };
    match secret {
        Some(s) if s == app.client_secret => Ok(app.clone()),
        None if allow_public && app.client_secret.is_empty() => Ok(app.clone()),
        _ => Err(oauth_error(status, "invalid_client")),
    }
}

/// Make a new token set for a grant (rotating the refresh token) and index it.
fn mint_tokens(
    shared: &Shared,
    ids: &mut IdentityState,
    grant_id: Uuid,
    now: DateTime<Utc>,
) -> Option<TokenSet> {
    let lt = &shared.config.lifetimes;
    let user = &shared.config.user;
    let g = ids.grants.get_mut(&grant_id)?;
    let exp = crate::clock::add_secs(now, lt.access_token_secs);
    let scopes: Vec<&str> = g.scope.split_whitespace().collect();
    let access = jwt(&json!({
        "nbf": now.timestamp(), "exp": exp.timestamp(), "iss": "https://identity.xero.com",
        "aud": "https://identity.xero.com/resources", "client_id": g.client_id,
        "sub": user.user_id.simple().to_string(), "auth_time": now.timestamp(),
        "xero_userid": user.user_id, "global_session_id": random_token(12),
        "sid": random_token(12), "jti": random_token(16),
        "authentication_event_id": g.id, "scope": scopes,
    }));
    let id_token = jwt(&json!({
        "nbf": now.timestamp(), "exp": crate::clock::add_secs(now, 300).timestamp(),
        "iss": "https://identity.xero.com", "aud": g.client_id, "iat": now.timestamp(),
        "at_hash": random_token(16), "sid": random_token(12),
        "sub": user.user_id.simple().to_string(), "auth_time": now.timestamp(),
        "xero_userid": user.user_id, "global_session_id": random_token(12),
        "preferred_username": user.email, "email": user.email,
        "given_name": user.given_name, "family_name": user.family_name,
        "name": format!("{} {}", user.given_name, user.family_name),
        "amr": ["pwd"],
    }));
    g.access_token = access.clone();
    g.access_expires = exp;
    g.id_token = id_token.clone();
    let old_refresh = g.refresh_token.take();
    let new_refresh = g
        .scope
        .split_whitespace()
        .any(|s| s == "offline_access")
        .then(|| random_token(32));
    g.refresh_token = new_refresh.clone();
    g.refresh_expires = crate::clock::add_secs(now, lt.refresh_token_secs);
    let scope = g.scope.clone();
    if let Some(old) = old_refresh
        && let Some(e) = ids.refresh.get_mut(&old)
    {
        e.retired_until = Some(crate::clock::add_secs(now, lt.refresh_grace_secs));
    }
    if let Some(r) = &new_refresh {
        ids.refresh.insert(
            r.clone(),
            RefreshEntry {
                grant: grant_id,
                retired_until: None,
            },
        );
    }
    ids.access
        .retain(|_, a| crate::clock::add_secs(a.expires, 86_400) > now);
    ids.access.insert(
        access.clone(),
        AccessEntry {
            grant: grant_id,
            expires: exp,
        },
    );
    Some(TokenSet {
        access_token: access,
        expires_in: lt.access_token_secs,
        token_type: "Bearer".into(),
        refresh_token: new_refresh,
        scope,
        id_token,
    })
}

/// Create a grant with connections to `tenants` and mint its first tokens.
pub(crate) fn create_grant(
    shared: &Shared,
    client_id: &str,
    scope: &str,
    tenants: &[Uuid],
) -> TokenSet {
    let now = shared.clock.now();
    let id = Uuid::new_v4();
    let connections = tenants
        .iter()
        .map(|t| ConnectionInfo {
            id: Uuid::new_v4(),
            tenant_id: *t,
            tenant_name: shared.org(*t).map(|o| o.name.clone()).unwrap_or_default(),
            created: now,
        })
        .collect();
    let mut ids = shared.identity.lock();
    ids.grants.insert(
        id,
        Grant {
            id,
            client_id: client_id.into(),
            scope: scope.into(),
            connections,
            refresh_token: None,
            refresh_expires: now,
            access_token: String::new(),
            access_expires: now,
            id_token: String::new(),
            refresh_count: 0,
            revoked: false,
        },
    );
    mint_tokens(shared, &mut ids, id, now).unwrap_or_else(|| TokenSet {
        access_token: String::new(),
        expires_in: 0,
        token_type: "Bearer".into(),
        refresh_token: None,
        scope: scope.into(),
        id_token: String::new(),
    })
}

fn invalid_grant(shared: &Shared) -> Response {
    shared
        .counters
        .invalid_grants
        .fetch_add(1, Ordering::Relaxed);
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant")
}

fn token_json(t: &TokenSet) -> Response {
    let mut resp = axum::Json(t).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `POST /connect/token`.
pub(crate) async fn token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&body);
    let grant_type = get(&form, "grant_type");
    let app = match client_auth(
        &shared,
        &headers,
        &form,
        grant_type == Some("authorization_code"),
    ) {
        Ok(a) => a,
        Err(r) => return r,
    };
    match grant_type {
        None => oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
        Some("authorization_code") => exchange_code(&shared, &app, &form),
        Some("refresh_token") => refresh(&shared, &app, &form),
        Some(_) => oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
    }
}

fn exchange_code(shared: &Shared, app: &AppConfig, form: &[(String, String)]) -> Response {
    let (Some(code), Some(redirect_uri)) = (get(form, "code"), get(form, "redirect_uri")) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let now = shared.clock.now();
    let entry = {
        let mut ids = shared.identity.lock();
        let Some(c) = ids.codes.get_mut(code) else {
            drop(ids);
            return invalid_grant(shared);
        };
        if c.used_by.is_some() || c.expires <= now || c.client_id != app.client_id {
            drop(ids);
            return invalid_grant(shared);
        }
        if c.redirect_uri != redirect_uri {
            drop(ids);
            return invalid_grant(shared);
        }
        if let Some((challenge, method)) = &c.challenge {
            let Some(verifier) = get(form, "code_verifier") else {
                drop(ids);
                return invalid_grant(shared);
            };
            let computed = if method == "S256" {
                URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
            } else {
                verifier.to_string()
            };
            if &computed != challenge {
                drop(ids);
                return invalid_grant(shared);
            }
        } else if app.client_secret.is_empty() {
            // Public clients must use PKCE.
            drop(ids);
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_client");
        }
        c.used_by = Some(Uuid::nil());
        c.clone()
    };
    if shared
        .faults
        .lock()
        .forced_invalid_grant(&app.client_id, None)
    {
        return invalid_grant(shared);
    }
    let _ = &entry.nonce;
    let tokens = create_grant(shared, &app.client_id, &entry.scope, &entry.tenants);
    token_json(&tokens)
}

fn refresh(shared: &Shared, app: &AppConfig, form: &[(String, String)]) -> Response {
    let Some(rt) = get(form, "refresh_token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let now = shared.clock.now();
    let mut ids = shared.identity.lock();
    let Some(entry) = ids.refresh.get(rt).cloned() else {
        drop(ids);
        return invalid_grant(shared);
    };
    let Some(g) = ids.grants.get(&entry.grant) else {
        drop(ids);
        return invalid_grant(shared);
    };
    if g.revoked
        || g.client_id != app.client_id
        || shared
            .faults
            .lock()
            .forced_invalid_grant(&app.client_id, Some(g.id))
    {
        drop(ids);
        return invalid_grant(shared);
    }
    if let Some(until) = entry.retired_until {
        if now > until {
            drop(ids);
            return invalid_grant(shared);
        }
        // Grace: hand back the current token set without rotating.
        let t = TokenSet {
            access_token: g.access_token.clone(),
            expires_in: (g.access_expires - now).num_seconds().max(0),
            token_type: "Bearer".into(),
            refresh_token: g.refresh_token.clone(),
            scope: g.scope.clone(),
            id_token: g.id_token.clone(),
        };
        return token_json(&t);
    }
    if g.refresh_expires <= now {
        drop(ids);
        return invalid_grant(shared);
    }
    let gid = g.id;
    let Some(t) = mint_tokens(shared, &mut ids, gid, now) else {
        drop(ids);
        return invalid_grant(shared);
    };
    if let Some(g) = ids.grants.get_mut(&gid) {
        g.refresh_count += 1;
    }
    drop(ids);
    shared.counters.refreshes.fetch_add(1, Ordering::Relaxed);
    *shared
        .counters
        .refreshes_by_grant
        .lock()
        .entry(gid)
        .or_default() += 1;
    token_json(&t)
}

/// Revoke a grant: drop its tokens and connections. Returns whether it existed.
pub(crate) fn revoke_grant(ids: &mut IdentityState, grant: Uuid) -> bool {
    let Some(g) = ids.grants.get_mut(&grant) else {
        return false;
    };
    g.revoked = true;
    g.connections.clear();
    g.refresh_token = None;
    ids.refresh.retain(|_, e| e.grant != grant);
    ids.access.retain(|_, e| e.grant != grant);
    true
}

/// `POST /connect/revocation`.
pub(crate) async fn revocation(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&body);
    let app = match client_auth(&shared, &headers, &form, true) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let Some(token) = get(&form, "token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let mut ids = shared.identity.lock();
    let grant = ids
        .refresh
        .get(token)
        .map(|e| e.grant)
        .or_else(|| ids.access.get(token).map(|e| e.grant));
    if let Some(g) = grant
        && ids
            .grants
            .get(&g)
            .is_some_and(|g| g.client_id == app.client_id)
    {
        revoke_grant(&mut ids, g);
    }
    StatusCode::OK.into_response()
}

/// Who a bearer token belongs to.
#[derive(Debug, Clone)]
pub(crate) struct BearerInfo {
    pub client_id: String,
    pub tenants: Vec<Uuid>,
}

/// A 401 like Xero's.
pub(crate) fn unauthorized(detail: &str, www: &str) -> Response {
    let mut body = problem("Unauthorized", 401, detail);
    if let Some(m) = body.as_object_mut() {
        m.insert("Instance".into(), json!(Uuid::new_v4()));
        m.insert("Extensions".into(), json!({}));
    }
    let mut r = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(www) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// Resolve the bearer token of a request.
pub(crate) fn check_bearer(shared: &Shared, headers: &HeaderMap) -> Result<BearerInfo, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token else {
        return Err(unauthorized("AuthenticationUnsuccessful", "Bearer"));
    };
    let now = shared.clock.now();
    let ids = shared.identity.lock();
    let Some(a) = ids.access.get(token) else {
        return Err(unauthorized(
            "AuthenticationUnsuccessful",
            "Bearer error=\"invalid_token\"",
        ));
    };
    if a.expires <= now {
        let at = a.expires.format("%m/%d/%Y %H:%M:%S").to_string();
        return Err(unauthorized(
            &format!("TokenExpired: token expired at {at}"),
            &format!(
                "Bearer error=\"invalid_token\", error_description=\"The token expired at '{at}'\""
            ),
        ));
    }
    let Some(g) = ids.grants.get(&a.grant).filter(|g| !g.revoked) else {
        return Err(unauthorized(
            "AuthenticationUnsuccessful",
            "Bearer error=\"invalid_token\"",
        ));
    };
    // Connections belong to the user + app, so any live grant of the app counts.
    let tenants = ids
        .grants
        .values()
        .filter(|x| x.client_id == g.client_id && !x.revoked)
        .flat_map(|x| x.connections.iter().map(|c| c.tenant_id))
        .collect();
    Ok(BearerInfo {
        client_id: g.client_id.clone(),
        tenants,
    })
}

fn connection_json(c: &ConnectionInfo, grant: Uuid) -> Value {
    let ts = format!(
        "{}.{:07}",
        c.created.format("%Y-%m-%dT%H:%M:%S"),
        c.created.timestamp_subsec_nanos() / 100
    );
    json!({
        "id": c.id,
        "authEventId": grant,
        "tenantId": c.tenant_id,
        "tenantType": "ORGANISATION",
        "tenantName": c.tenant_name,
        "createdDateUtc": ts,
        "updatedDateUtc": ts,
    })
}

/// `GET /connections`.
pub(crate) async fn connections(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let who = match check_bearer(&shared, &headers) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let params = parse_form(q.unwrap_or_default().as_bytes());
    let filter: Option<Uuid> = get(&params, "authEventId").and_then(|s| s.parse().ok());
    let ids = shared.identity.lock();
    // Connections are per user + app: list those of every live grant of this app.
    let mut list: Vec<Value> = ids
        .grants
        .values()
        .filter(|g| g.client_id == who.client_id && !g.revoked)
        .filter(|g| filter.is_none_or(|f| f == g.id))
        .flat_map(|g| g.connections.iter().map(move |c| connection_json(c, g.id)))
        .collect();
    list.sort_by(|a, b| {
        a["createdDateUtc"]
            .as_str()
            .cmp(&b["createdDateUtc"].as_str())
    });
    axum::Json(Value::Array(list)).into_response()
}

/// `DELETE /connections/{id}`.
pub(crate) async fn delete_connection(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let who = match check_bearer(&shared, &headers) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let Ok(id) = id.parse::<Uuid>() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut ids = shared.identity.lock();
    for g in ids.grants.values_mut() {
        if g.client_id != who.client_id {
            continue;
        }
        if let Some(pos) = g.connections.iter().position(|c| c.id == id) {
            g.connections.remove(pos);
            return StatusCode::NO_CONTENT.into_response();
        }
    }
    StatusCode::NOT_FOUND.into_response()
}
