//! Helpers shared by the simulator's integration tests.
#![allow(dead_code)]

use reqwest::{Client, Method, Response};
use serde_json::Value;
use uuid::Uuid;
use xero_sim::{GrantRequest, Sim, SimConfig, SimHandle};

pub const HOLDINGS: Uuid = xero_sim::DEFAULT_TENANT_HOLDINGS;
pub const TRADING: Uuid = xero_sim::DEFAULT_TENANT_TRADING;

pub fn client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub async fn start(config: SimConfig) -> SimHandle {
    Sim::start(config).await.expect("sim starts")
}

/// A started sim plus an access token connected to both default tenants.
pub async fn start_with_token(config: SimConfig) -> (SimHandle, String) {
    let sim = start(config).await;
    let g = sim.issue_grant(GrantRequest::default()).expect("grant");
    (sim, g.tokens.access_token)
}

pub struct Api<'a> {
    pub sim: &'a SimHandle,
    pub token: String,
    pub tenant: Uuid,
    pub http: Client,
}

impl<'a> Api<'a> {
    pub fn new(sim: &'a SimHandle, token: &str, tenant: Uuid) -> Self {
        Api {
            sim,
            token: token.to_string(),
            tenant,
            http: client(),
        }
    }

    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(
                method,
                format!("{}/api.xro/2.0{}", self.sim.base_url(), path),
            )
            .bearer_auth(&self.token)
            .header("xero-tenant-id", self.tenant.to_string())
            .header("accept", "application/json")
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        parse(self.req(Method::GET, path).send().await.expect("send")).await
    }

    pub async fn send(&self, method: Method, path: &str, body: Value) -> (u16, Value) {
        parse(
            self.req(method, path)
                .json(&body)
                .send()
                .await
                .expect("send"),
        )
        .await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(Method::PUT, path, body).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(Method::POST, path, body).await
    }
}

pub async fn parse(r: Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

/// All validation messages of a ValidationException or summarizeErrors=false body.
pub fn messages(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let lists = ["Elements", "Invoices", "CreditNotes", "Contacts"];
    for l in lists {
        if let Some(a) = v[l].as_array() {
            for el in a {
                if let Some(errs) = el["ValidationErrors"].as_array() {
                    for e in errs {
                        out.push(e["Message"].as_str().unwrap_or_default().to_string());
                    }
                }
            }
        }
    }
    out
}
