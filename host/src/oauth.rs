//! OAuth 2.0 with a connector's provider (authorization-code flow, built on
//! the `oauth2` crate): the authorization URL, code exchange, refresh,
//! revocation and the provider's connection list ([`OAuthProvider`]), and the
//! minimal browser-facing routes of the flow ([`oauth_router`]):
//!
//! - `GET /oauth/callback?code&state` — the provider's redirect; exchanges
//!   the code and either connects (one organisation) or redirects to the
//!   picker (several);
//! - `GET /oauth/pick?pick=...` — a small server-rendered organisation picker;
//! - `POST /oauth/pick` (form `pick`, `organisation`) — the admin's choice.
//!
//! Endpoints and scopes come from the plugin manifest's `[oauth]` table; the
//! operator's base-URL overrides (e.g. to a sandbox or the simulator) apply
//! to them as they do to the connector's HTTP. Tokens never appear in logs,
//! errors or `Debug` output.

use crate::connections::{CallbackOutcome, CallbackQuery, ConnectError, Connections};
use crate::crypto::Secret;
use crate::manifest::{Manifest, origin_of, parse_origin};
use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, Scope, TokenResponse as _,
    TokenUrl,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Time for one request to a provider's token endpoint in the daemon and
/// the CLI: the same as the connector call's default deadline. A refresh
/// answer that does not come in time is treated as lost.
pub const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How ledgerport is registered with a provider, and where the provider
/// really is.
#[derive(Clone)]
pub struct OAuthApp {
    /// The app's client id.
    pub client_id: String,
    /// The app's client secret (None for a public, PKCE-only client).
    pub client_secret: Option<Secret>,
    /// Where the provider sends the admin back (`.../oauth/callback`).
    pub redirect_uri: String,
    /// Ask for the manifest's `broad_scopes` instead of `scopes` (older apps).
    pub broad_scopes: bool,
    /// Canonical origin -> base URL the requests really go to.
    pub base_urls: BTreeMap<String, String>,
    /// Time for one request to the provider.
    pub timeout: Duration,
}

impl std::fmt::Debug for OAuthApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthApp")
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("redirect_uri", &self.redirect_uri)
            .field("broad_scopes", &self.broad_scopes)
            .field("base_urls", &self.base_urls)
            .finish()
    }
}

/// Why a call to the provider failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OAuthError {
    /// The provider refused the grant (code or refresh token): `invalid_grant`.
    #[error("the provider refused the grant (invalid_grant){}", describe(.0))]
    InvalidGrant(String),
    /// Another OAuth error answer (e.g. `invalid_client`).
    #[error("the provider answered {error}{}", describe(.description))]
    Refused {
        /// The OAuth error code.
        error: String,
        /// Its description, if any.
        description: String,
    },
    /// No usable answer: network error, timeout, 5xx, unreadable body. The
    /// request may or may not have taken effect.
    #[error("no usable answer from the provider: {0}")]
    Transient(String),
    /// The configuration is wrong (manifest or app settings).
    #[error("OAuth configuration: {0}")]
    Config(String),
}

fn describe(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(": {d}")
    }
}

/// A token endpoint's answer.
#[derive(Debug, Clone)]
pub struct TokenAnswer {
    /// The access token.
    pub access_token: Secret,
    /// The (rotated) refresh token, if any.
    pub refresh_token: Option<Secret>,
    /// Access token lifetime in seconds, if given.
    pub expires_in: Option<i64>,
    /// Scopes granted, if given.
    pub scopes: Option<Vec<String>>,
    /// The grant's id (Xero `authentication_event_id`, read from the JWT).
    pub auth_event_id: Option<String>,
}

/// An organisation the grant covers, as the provider lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderOrganisation {
    /// The provider's id of the app-to-organisation link.
    pub connection_id: String,
    /// The organisation id.
    pub tenant_id: String,
    /// Its name.
    pub name: String,
    /// The grant it belongs to.
    pub auth_event_id: Option<String>,
}

type Client = BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// One connector's provider, ready to talk to.
pub struct OAuthProvider {
    connector_id: String,
    name: String,
    authorize_url: url::Url,
    token_url: url::Url,
    revoke_url: Option<url::Url>,
    connections_url: Option<url::Url>,
    organisation_param: Option<String>,
    scopes: Vec<String>,
    pkce: bool,
    client_id: String,
    client_secret: Option<Secret>,
    redirect_uri: url::Url,
    http: reqwest::Client,
}

impl std::fmt::Debug for OAuthProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthProvider")
            .field("connector_id", &self.connector_id)
            .field("token_url", &self.token_url.as_str())
            .field("scopes", &self.scopes)
            .field("pkce", &self.pkce)
            .finish_non_exhaustive()
    }
}

/// Apply base-URL overrides to a provider URL.
pub fn rewrite_url(raw: &str, overrides: &BTreeMap<String, String>) -> Result<url::Url, String> {
    let u = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    let origin = origin_of(&u).ok_or_else(|| format!("{raw:?} has no host"))?;
    for (from, to) in overrides {
        if parse_origin(from).ok().as_deref() == Some(origin.as_str()) {
            let base = url::Url::parse(to).map_err(|e| format!("override {to:?}: {e}"))?;
            let mut out = base.clone();
            let base_path = base.path().trim_end_matches('/');
            out.set_path(&format!("{base_path}{}", u.path()));
            out.set_query(u.query());
            return Ok(out);
        }
    }
    Ok(u)
}

/// The `authentication_event_id` claim of a JWT access token, if it is one.
fn auth_event_of(access_token: &str) -> Option<String> {
    let payload = access_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("authentication_event_id")?.as_str().map(String::from)
}

type TokenError = oauth2::RequestTokenError<
    oauth2::HttpClientError<reqwest::Error>,
    oauth2::basic::BasicErrorResponse,
>;

fn map_token_error(e: TokenError) -> OAuthError {
    match e {
        oauth2::RequestTokenError::ServerResponse(r) => {
            let description = r.error_description().cloned().unwrap_or_default();
            match r.error() {
                BasicErrorResponseType::InvalidGrant => OAuthError::InvalidGrant(description),
                other => OAuthError::Refused {
                    error: other.to_string(),
                    description,
                },
            }
        }
        oauth2::RequestTokenError::Request(e) => OAuthError::Transient(match e {
            oauth2::HttpClientError::Reqwest(r) => r.without_url().to_string(),
            other => other.to_string(),
        }),
        // Never include the body: it might hold tokens.
        oauth2::RequestTokenError::Parse(e, _) => {
            OAuthError::Transient(format!("unreadable token response ({})", e.path()))
        }
        oauth2::RequestTokenError::Other(s) => OAuthError::Transient(s),
    }
}

impl OAuthProvider {
    /// Build from a manifest's `[oauth]` table and the app registration.
    pub fn new(manifest: &Manifest, app: OAuthApp) -> Result<Self, OAuthError> {
        let o = manifest.oauth.as_ref().ok_or_else(|| {
            OAuthError::Config(format!("plugin {} has no [oauth] table", manifest.id))
        })?;
        let rw = |key: &str, u: &str| {
            rewrite_url(u, &app.base_urls).map_err(|e| OAuthError::Config(format!("{key}: {e}")))
        };
        let scopes = if app.broad_scopes && !o.broad_scopes.is_empty() {
            o.broad_scopes.clone()
        } else {
            o.scopes.clone()
        };
        if scopes.is_empty() {
            return Err(OAuthError::Config("oauth.scopes is empty".into()));
        }
        let redirect_uri = url::Url::parse(&app.redirect_uri)
            .map_err(|e| OAuthError::Config(format!("redirect_uri {:?}: {e}", app.redirect_uri)))?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(app.timeout)
            .user_agent(concat!("ledgerport/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OAuthError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            connector_id: manifest.id.clone(),
            name: manifest.name.clone(),
            authorize_url: rw("oauth.authorize_url", &o.authorize_url)?,
            token_url: rw("oauth.token_url", &o.token_url)?,
            revoke_url: o
                .revoke_url
                .as_deref()
                .map(|u| rw("oauth.revoke_url", u))
                .transpose()?,
            connections_url: o
                .connections_url
                .as_deref()
                .map(|u| rw("oauth.connections_url", u))
                .transpose()?,
            organisation_param: o.organisation_param.clone(),
            scopes,
            pkce: o.pkce,
            client_id: app.client_id,
            client_secret: app.client_secret,
            redirect_uri,
            http,
        })
    }

    /// The redirect's query parameter naming the company connected, for a
    /// provider without an organisation list (QuickBooks: `realmId`).
    pub fn organisation_param(&self) -> Option<&str> {
        self.organisation_param.as_deref()
    }

    /// The connector id.
    pub fn connector_id(&self) -> &str {
        &self.connector_id
    }
    /// The connector's display name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Scopes requested.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }
    /// Whether PKCE is used.
    pub fn pkce(&self) -> bool {
        self.pkce
    }

    fn client(&self) -> Client {
        let c = BasicClient::new(ClientId::new(self.client_id.clone()))
            .set_auth_uri(AuthUrl::from_url(self.authorize_url.clone()))
            .set_token_uri(TokenUrl::from_url(self.token_url.clone()))
            .set_redirect_uri(RedirectUrl::from_url(self.redirect_uri.clone()));
        match &self.client_secret {
            Some(s) => c.set_client_secret(ClientSecret::new(s.expose().to_string())),
            None => c,
        }
    }

    /// The URL to send the admin to, and the PKCE verifier to keep (when
    /// the provider supports PKCE).
    pub fn authorize_url(&self, state: &str) -> (url::Url, Option<Secret>) {
        let client = self.client();
        let mut req = client.authorize_url(|| CsrfToken::new(state.to_string()));
        for s in &self.scopes {
            req = req.add_scope(Scope::new(s.clone()));
        }
        let mut verifier = None;
        if self.pkce {
            let (challenge, v) = PkceCodeChallenge::new_random_sha256();
            req = req.set_pkce_challenge(challenge);
            verifier = Some(Secret::new(v.secret().clone()));
        }
        let (url, _) = req.url();
        (url, verifier)
    }

    fn answer(t: &oauth2::basic::BasicTokenResponse) -> TokenAnswer {
        let access = t.access_token().secret().clone();
        TokenAnswer {
            auth_event_id: auth_event_of(&access),
            access_token: Secret::new(access),
            refresh_token: t.refresh_token().map(|r| Secret::new(r.secret().clone())),
            // A provider's lifetime is believed up to a year: a larger one
            // (u64::MAX, "forever") would overflow the expiry time.
            expires_in: t
                .expires_in()
                .map(|d| d.as_secs().min(MAX_EXPIRES_IN as u64) as i64),
            scopes: t
                .scopes()
                .map(|s| s.iter().map(|x| x.to_string()).collect()),
        }
    }

    /// Exchange an authorization code.
    pub async fn exchange_code(
        &self,
        code: &str,
        verifier: Option<&Secret>,
    ) -> Result<TokenAnswer, OAuthError> {
        let client = self.client();
        let mut req = client.exchange_code(AuthorizationCode::new(code.to_string()));
        if let Some(v) = verifier {
            req = req.set_pkce_verifier(PkceCodeVerifier::new(v.expose().to_string()));
        }
        let t = req
            .request_async(&self.http)
            .await
            .map_err(map_token_error)?;
        Ok(Self::answer(&t))
    }

    /// Use a refresh token (one attempt; the caller decides about retries).
    pub async fn refresh(&self, refresh_token: &Secret) -> Result<TokenAnswer, OAuthError> {
        let client = self.client();
        let rt = RefreshToken::new(refresh_token.expose().to_string());
        let t = client
            .exchange_refresh_token(&rt)
            .request_async(&self.http)
            .await
            .map_err(map_token_error)?;
        Ok(Self::answer(&t))
    }

    /// Revoke a refresh token at the provider (RFC 7009, client
    /// authentication by HTTP Basic like the token endpoint). `Ok(false)`
    /// when the provider has no revocation endpoint. Done by hand rather
    /// than through `oauth2`, which insists on HTTPS and so cannot reach a
    /// local sandbox.
    pub async fn revoke(&self, refresh_token: &Secret) -> Result<bool, OAuthError> {
        let Some(url) = &self.revoke_url else {
            return Ok(false);
        };
        // One form: reqwest's `form` replaces the body, so a public
        // (PKCE) client's id must go in the same call as the token.
        let mut form = vec![
            ("token", refresh_token.expose()),
            ("token_type_hint", "refresh_token"),
        ];
        if self.client_secret.is_none() {
            form.push(("client_id", self.client_id.as_str()));
        }
        let mut req = self.http.post(url.clone()).form(&form);
        if let Some(s) = &self.client_secret {
            req = req.basic_auth(&self.client_id, Some(s.expose()));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| OAuthError::Transient(e.without_url().to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(true);
        }
        if status.is_server_error() {
            return Err(OAuthError::Transient(http_words(status.as_u16())));
        }
        #[derive(Deserialize, Default)]
        struct ErrBody {
            #[serde(default)]
            error: String,
            #[serde(default)]
            error_description: String,
        }
        let b: ErrBody = resp.json().await.unwrap_or_default();
        if b.error.is_empty() {
            // No OAuth error code: what the status says.
            return Err(OAuthError::Transient(http_words(status.as_u16())));
        }
        Err(OAuthError::Refused {
            error: b.error,
            description: b.error_description,
        })
    }

    /// The organisations the grant covers (Xero `GET /connections`), those of
    /// `auth_event_id` when given. Without a connections endpoint, one
    /// organisation named after the connector.
    pub async fn organisations(
        &self,
        access_token: &Secret,
        auth_event_id: Option<&str>,
    ) -> Result<Vec<ProviderOrganisation>, OAuthError> {
        let Some(base) = &self.connections_url else {
            return Ok(vec![ProviderOrganisation {
                connection_id: String::new(),
                tenant_id: self.connector_id.clone(),
                name: self.name.clone(),
                auth_event_id: auth_event_id.map(String::from),
            }]);
        };
        let mut u = base.clone();
        if let Some(a) = auth_event_id {
            u.query_pairs_mut().append_pair("authEventId", a);
        }
        let resp = self
            .http
            .get(u)
            .bearer_auth(access_token.expose())
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| OAuthError::Transient(e.without_url().to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(OAuthError::Transient(format!(
                "listing the grant's organisations: {}",
                http_words(status.as_u16())
            )));
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Conn {
            id: String,
            tenant_id: String,
            #[serde(default)]
            tenant_name: Option<String>,
            #[serde(default)]
            auth_event_id: Option<String>,
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| OAuthError::Transient(e.without_url().to_string()))?;
        let list: Vec<Conn> = serde_json::from_slice(&body).map_err(|e| {
            OAuthError::Transient(format!("the organisation list is not readable: {e}"))
        })?;
        Ok(list
            .into_iter()
            .filter(|c| {
                auth_event_id.is_none()
                    || c.auth_event_id.is_none()
                    || c.auth_event_id.as_deref() == auth_event_id
            })
            .map(|c| ProviderOrganisation {
                name: c.tenant_name.unwrap_or_else(|| c.tenant_id.clone()),
                connection_id: c.id,
                tenant_id: c.tenant_id,
                auth_event_id: c.auth_event_id,
            })
            .collect())
    }

    /// Remove the app's link to one organisation (Xero `DELETE
    /// /connections/{id}`). `Ok(false)` when the provider has no such
    /// endpoint or the link is already gone.
    pub async fn delete_connection(
        &self,
        access_token: &Secret,
        connection_id: &str,
    ) -> Result<bool, OAuthError> {
        let Some(base) = &self.connections_url else {
            return Ok(false);
        };
        let mut u = base.clone();
        u.path_segments_mut()
            .map_err(|_| OAuthError::Config("connections_url cannot have a path".into()))?
            .pop_if_empty()
            .push(connection_id);
        let resp = self
            .http
            .delete(u)
            .bearer_auth(access_token.expose())
            .send()
            .await
            .map_err(|e| OAuthError::Transient(e.without_url().to_string()))?;
        match resp.status().as_u16() {
            200..=299 => Ok(true),
            404 => Ok(false),
            s => Err(OAuthError::Transient(http_words(s))),
        }
    }
}

/// What an HTTP status from the provider means, in words for an admin,
/// with the status itself after them (what the provider said).
pub(crate) fn http_words(status: u16) -> String {
    let words = match status {
        400 => "it refused the request as malformed",
        401 => "it no longer accepts ledgerport's access",
        403 => "it does not allow ledgerport to do this",
        404 => "it does not know what was asked for",
        429 => "it is limiting requests just now",
        500..=599 => "it had a problem on its side",
        _ => "it answered in a way ledgerport did not expect",
    };
    format!("{words} (HTTP {status})")
}

/// The providers the daemon knows, by connector id.
#[derive(Default, Debug)]
pub struct Providers {
    map: BTreeMap<String, Arc<OAuthProvider>>,
}

impl Providers {
    /// No providers.
    pub fn new() -> Self {
        Self::default()
    }
    /// Add (or replace) a provider.
    pub fn insert(&mut self, p: OAuthProvider) {
        self.map.insert(p.connector_id.clone(), Arc::new(p));
    }
    /// The provider of a connector.
    pub fn get(&self, connector_id: &str) -> Option<Arc<OAuthProvider>> {
        self.map.get(connector_id).cloned()
    }
}

/// Escape text for HTML (element content and quoted attributes); shared by
/// every server-rendered page and e-mail.
pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Html(format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
             <body><h1>{t}</h1>{body}</body></html>",
            t = escape(title)
        )),
    )
        .into_response()
}

fn error_page(e: &ConnectError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    if status.is_server_error() {
        tracing::error!(error = %e, "oauth flow failed");
    } else {
        tracing::info!(error = %e, "oauth flow refused");
    }
    page(
        status,
        "The connection was not made",
        &format!("<p id=\"error\">{}</p>", escape(&e.to_string())),
    )
}

fn connected_page(c: &crate::store::Connection) -> Response {
    page(
        StatusCode::OK,
        "Connected",
        &format!(
            "<p id=\"connected\">Connected to {} ({}).</p><p><a id=\"back\" href=\"/integrations\">Back to Integrations</a></p>",
            escape(c.external_tenant_name.as_deref().unwrap_or("")),
            escape(c.external_tenant_id.as_deref().unwrap_or(""))
        ),
    )
}

async fn callback(
    State(c): State<Arc<Connections>>,
    headers: axum::http::HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let flow = q.state.as_deref().and_then(|state| {
        crate::integrations::cookie(&headers, &crate::connections::flow_cookie_name(state))
    });
    match c.complete_callback(&q, flow.as_deref()).await {
        Ok(CallbackOutcome::Connected(conn)) => connected_page(&conn),
        Ok(CallbackOutcome::Pick { pick }) => {
            let loc = format!("/oauth/pick?{}", serde_urlencoded_pair("pick", &pick));
            (StatusCode::SEE_OTHER, [(header::LOCATION, loc)]).into_response()
        }
        Err(e) => error_page(&e),
    }
}

fn serde_urlencoded_pair(k: &str, v: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair(k, v)
        .finish()
}

/// Query of `GET /oauth/pick`.
#[derive(Debug, Deserialize)]
pub struct PickQuery {
    /// The pick token from the callback's redirect.
    #[serde(default)]
    pub pick: Option<String>,
}

/// Form of `POST /oauth/pick`.
#[derive(Debug, Deserialize)]
pub struct PickForm {
    /// The pick token.
    #[serde(default)]
    pub pick: Option<String>,
    /// The chosen organisation's id.
    #[serde(default)]
    pub organisation: Option<String>,
}

async fn pick_page(State(c): State<Arc<Connections>>, Query(q): Query<PickQuery>) -> Response {
    let Some(pick) = q.pick.filter(|p| !p.is_empty()) else {
        return error_page(&ConnectError::bad("pick", "is missing"));
    };
    match c.pending_organisations(&pick).await {
        Ok((orgs, current)) => {
            // The organisation connected now is chosen (one click must not
            // switch organisations), else the first; a switch is said.
            let chosen = current
                .as_deref()
                .filter(|id| orgs.iter().any(|o| o.tenant_id == *id))
                .or(orgs.first().map(|o| o.tenant_id.as_str()));
            let mut items = String::new();
            for o in &orgs {
                let now = if current.as_deref() == Some(o.tenant_id.as_str()) {
                    " (connected now)"
                } else {
                    ""
                };
                items.push_str(&format!(
                    "<label><input type=\"radio\" name=\"organisation\" value=\"{}\"{}> {}{now}</label><br>\n",
                    escape(&o.tenant_id),
                    if chosen == Some(o.tenant_id.as_str()) { " checked" } else { "" },
                    escape(&o.name)
                ));
            }
            if current.is_some() {
                items.push_str(
                    "<p>Choosing another organisation keeps your account mappings, but nothing is sent to it until you have checked them on the Configure page and saved them.</p>\n",
                );
            }
            page(
                StatusCode::OK,
                "Choose the organisation to connect",
                &format!(
                    "<form method=\"post\" action=\"/oauth/pick\">\n\
                     <input type=\"hidden\" name=\"pick\" value=\"{}\">\n{items}\
                     <button type=\"submit\" id=\"connect\">Connect</button></form>",
                    escape(&pick)
                ),
            )
        }
        Err(e) => error_page(&e),
    }
}

async fn pick_submit(State(c): State<Arc<Connections>>, Form(f): Form<PickForm>) -> Response {
    let Some(pick) = f.pick.filter(|p| !p.is_empty()) else {
        return error_page(&ConnectError::bad("pick", "is missing"));
    };
    let Some(org) = f.organisation.filter(|p| !p.is_empty()) else {
        return error_page(&ConnectError::bad(
            "organisation",
            "choose one organisation",
        ));
    };
    match c.pick_organisation(&pick, &org).await {
        Ok(conn) => connected_page(&conn),
        Err(e) => error_page(&e),
    }
}

/// The OAuth routes: `GET /oauth/callback`, `GET /oauth/pick`, `POST /oauth/pick`.
pub fn oauth_router(state: Arc<Connections>) -> Router {
    Router::new()
        .route("/oauth/callback", get(callback))
        .route("/oauth/pick", get(pick_page).post(pick_submit))
        .layer(axum::middleware::from_fn(crate::integrations::page_headers))
        .with_state(state)
}

/// The longest access-token lifetime believed from a token endpoint: a
/// year, in seconds.
pub const MAX_EXPIRES_IN: i64 = 365 * 24 * 3600;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_lifetime_past_a_year_is_taken_as_a_year() {
        for (expires_in, believed) in [
            ("1800", Some(1800)),
            ("18446744073709551615", Some(MAX_EXPIRES_IN)),
            ("9223372036854775807", Some(MAX_EXPIRES_IN)),
        ] {
            let t: oauth2::basic::BasicTokenResponse = serde_json::from_str(&format!(
                r#"{{"access_token":"a","token_type":"Bearer","expires_in":{expires_in}}}"#
            ))
            .unwrap();
            let answer = OAuthProvider::answer(&t);
            assert_eq!(answer.expires_in, believed, "{expires_in}");
            // And the expiry time it gives cannot overflow.
            assert!(i64::MAX - answer.expires_in.unwrap() > 4_102_444_800);
        }
    }

    #[test]
    fn rewrites_follow_overrides() {
        let mut o = BTreeMap::new();
        o.insert(
            "https://identity.xero.com".to_string(),
            "http://127.0.0.1:9/sim".to_string(),
        );
        assert_eq!(
            rewrite_url("https://identity.xero.com/connect/token", &o)
                .unwrap()
                .as_str(),
            "http://127.0.0.1:9/sim/connect/token"
        );
        assert_eq!(
            rewrite_url("https://login.xero.com/a?b=c", &o)
                .unwrap()
                .as_str(),
            "https://login.xero.com/a?b=c"
        );
    }

    #[test]
    fn reads_the_grant_id_from_a_jwt() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"authentication_event_id":"abc"}"#);
        assert_eq!(auth_event_of(&format!("h.{claims}.")), Some("abc".into()));
        assert_eq!(auth_event_of("opaque"), None);
    }
}
