//! The Xero connector — the real `.wasm` in the real runtime — against the
//! Xero simulator over real sockets: bills and supplier credit notes,
//! contacts, exactly-once, PDF, allocation, and every outcome.

mod common;

use async_trait::async_trait;
use base64::Engine as _;
use ledgerport::capabilities::connection::ConnectionInfo;
use ledgerport::capabilities::http::{
    Credential, CredentialError, CredentialProvider, ReqwestTransport, StaticCredentials,
};
use ledgerport::capabilities::kv::MemoryKv;
use ledgerport::capabilities::mapping::{AccountMapping, MappingScope, MemoryMappings};
use ledgerport::runtime::v0_1::ledgerport::connector::types::{Delivery, DeliveryError, Document};
use ledgerport::runtime::{CallContext, Plugin, Runtime, RuntimeConfig};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use xero_sim::{
    DEFAULT_TENANT_TRADING, FaultConfig, FaultRule, GrantRequest, Sim, SimConfig, SimHandle,
};

struct Env {
    sim: SimHandle,
    rt: Runtime,
    plugin: Plugin,
    mappings: Arc<MemoryMappings>,
    kv: Arc<MemoryKv>,
    token: String,
}

fn plugin_manifest() -> std::path::PathBuf {
    let p = common::target_dir().join("plugins/xero/manifest.toml");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask wasm`",
        p.display()
    );
    p
}

async fn env() -> Env {
    env_with(SimConfig::default()).await
}

/// An environment whose organisation (`DEFAULT_TENANT_TRADING`) is `cfg`'s.
async fn env_with(cfg: SimConfig) -> Env {
    let sim = Sim::start(cfg).await.unwrap();
    let grant = sim
        .issue_grant(GrantRequest {
            tenants: Some(vec![DEFAULT_TENANT_TRADING]),
            ..Default::default()
        })
        .unwrap();
    let rt = Runtime::new(
        RuntimeConfig::default(),
        Arc::new(ReqwestTransport::new().unwrap()),
    )
    .unwrap();
    let overrides = BTreeMap::from([(
        "https://api.xero.com".to_string(),
        sim.base_url().to_string(),
    )]);
    let plugin = rt.load(&plugin_manifest(), &overrides).unwrap();
    let mappings = Arc::new(MemoryMappings::default());
    let scope = MappingScope {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
    };
    for m in ledgerport::demo::sample_mappings() {
        mappings.set(&scope, m);
    }
    Env {
        sim,
        rt,
        plugin,
        mappings,
        kv: Arc::new(MemoryKv::default()),
        token: grant.tokens.access_token,
    }
}

impl Env {
    fn ctx_with(
        &self,
        creds: Arc<dyn CredentialProvider>,
        tenant: Option<String>,
        settings: &[(&str, &str)],
    ) -> CallContext {
        CallContext {
            connection: ConnectionInfo {
                connection_id: "conn-xero".into(),
                tenant_id: "acme".into(),
                external_tenant_id: tenant,
                external_tenant_name: Some("Acme Trading GmbH".into()),
                settings: settings
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
            credentials: creds,
            mappings: self.mappings.clone(),
            kv: self.kv.clone(),
            rate: None,
        }
    }

    fn ctx(&self) -> CallContext {
        self.ctx_with(
            Arc::new(StaticCredentials(self.token.clone())),
            Some(DEFAULT_TENANT_TRADING.to_string()),
            &[],
        )
    }

    async fn deliver(
        &self,
        key: &str,
        doc: Document,
    ) -> Result<ledgerport::runtime::v0_1::ledgerport::connector::types::Receipt, DeliveryError>
    {
        self.deliver_ctx(&self.ctx(), key, doc).await
    }

    async fn deliver_ctx(
        &self,
        ctx: &CallContext,
        key: &str,
        doc: Document,
    ) -> Result<ledgerport::runtime::v0_1::ledgerport::connector::types::Receipt, DeliveryError>
    {
        self.rt
            .deliver(
                &self.plugin,
                ctx,
                Delivery {
                    key: key.into(),
                    attempt: 1,
                },
                doc,
            )
            .await
            .expect("the connector must not crash")
    }

    fn docs(&self) -> xero_sim::TenantDocuments {
        self.sim.documents(DEFAULT_TENANT_TRADING).unwrap()
    }

    /// Writes (PUT/POST) the connector sent to the Accounting API.
    fn writes(&self) -> Vec<xero_sim::LoggedRequest> {
        self.sim
            .requests(0)
            .into_iter()
            .filter(|r| (r.method == "PUT" || r.method == "POST") && r.uri.starts_with("/api.xro"))
            .collect()
    }

    /// Keep the accounting request log for the schema check (pytest
    /// `test_connector_requests.py` validates every body against Xero's
    /// OpenAPI description).
    fn save_requests(&self, name: &str) {
        let dir = common::target_dir().join("connector-requests");
        std::fs::create_dir_all(&dir).unwrap();
        let reqs: Vec<Value> = self
            .sim
            .requests(0)
            .into_iter()
            .filter(|r| r.uri.starts_with("/api.xro"))
            .map(|r| serde_json::json!({"method": r.method, "uri": r.uri, "body_text": r.body_text, "status": r.status}))
            .collect();
        std::fs::write(
            dir.join(format!("{name}.json")),
            serde_json::to_vec_pretty(&reqs).unwrap(),
        )
        .unwrap();
    }
}

fn sample(file: &str) -> Document {
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/documents")
            .join(file),
    )
    .unwrap();
    ledgerport::document::Document::from_json(&bytes)
        .unwrap()
        .to_wit()
        .unwrap()
}

/// A JSON amount, normalised (exact decimal, trailing zeros dropped).
fn num(v: &Value) -> String {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    text.parse::<rust_decimal::Decimal>()
        .map(|d| d.normalize().to_string())
        .unwrap_or(text)
}

/// How many times the connector listed a document's attachments.
fn attachment_lookups(e: &Env) -> usize {
    e.sim
        .requests(0)
        .iter()
        .filter(|r| r.method == "GET" && r.uri.contains("/Attachments"))
        .count()
}

#[tokio::test]
async fn invoice_becomes_an_authorised_bill_with_mapped_lines_and_pdf() {
    let e = env().await;
    let r = e
        .deliver("dlv-inv-1", sample("invoice.json"))
        .await
        .unwrap();
    let docs = e.docs();
    assert_eq!(docs.invoices.len(), 1);
    let bill = &docs.invoices[0];
    assert_eq!(bill["InvoiceID"], r.external_id.as_str());
    // The link goes through Xero's organisation login with the
    // organisation's short code, so it opens in the right organisation
    // (asked of Xero once, then kept in kv).
    let short: String = DEFAULT_TENANT_TRADING
        .simple()
        .to_string()
        .chars()
        .take(5)
        .collect();
    let url = r.external_url.unwrap();
    assert_eq!(
        url,
        format!(
            "https://go.xero.com/organisationlogin/default.aspx?shortcode=%21{short}&redirecturl=%2FAccountsPayable%2FView.aspx%3FInvoiceID%3D{}",
            r.external_id
        )
    );
    let orgs = |e: &Env| {
        e.sim
            .requests(0)
            .iter()
            .filter(|q| q.uri.ends_with("/Organisation"))
            .count()
    };
    assert_eq!(orgs(&e), 1);
    assert_eq!(bill["Type"], "ACCPAY");
    assert_eq!(bill["InvoiceNumber"], "INV-2026-0042");
    assert_eq!(bill["Status"], "AUTHORISED");
    assert_eq!(bill["CurrencyCode"], "EUR");
    assert_eq!(bill["LineAmountTypes"], "Exclusive");
    assert_eq!(num(&bill["Total"]), "9950.49");
    assert_eq!(num(&bill["TotalTax"]), "169.8");
    let lines = bill["LineItems"].as_array().unwrap();
    assert_eq!(lines.len(), 10);
    assert_eq!(lines[0]["AccountCode"], "477");
    assert_eq!(lines[5]["AccountCode"], "429");
    assert_eq!(lines[5]["TaxType"], "INPUT2");
    // 4-decimal unit amount kept exactly (unitdp=4).
    assert_eq!(num(&lines[7]["UnitAmount"]), "41.3119");
    assert!(
        bill["Url"]
            .as_str()
            .unwrap()
            .contains("ledgerport=dlv-inv-1")
    );
    // The supplier contact was created with the platform's supplier id.
    assert_eq!(docs.contacts.len(), 1);
    assert_eq!(docs.contacts[0]["ContactNumber"], "eor-platform");
    assert_eq!(docs.contacts[0]["Name"], "Globe EOR Services Ltd");
    // PDF attached once, named after the number.
    assert_eq!(docs.attachments.len(), 1);
    assert_eq!(docs.attachments[0]["FileName"], "INV-2026-0042.pdf");
    // The bill was created by this call, so it had no attachment to look for.
    assert_eq!(
        attachment_lookups(&e),
        0,
        "a fresh bill's attachments were looked up"
    );
    // Every create carried an idempotency key.
    for w in e.writes() {
        if w.uri.starts_with("/api.xro/2.0/Invoices") {
            assert!(
                w.headers.iter().any(|(k, _)| k == "idempotency-key"),
                "{}",
                w.uri
            );
        }
    }
    e.save_requests("invoice");
    let mut again = sample("invoice.json");
    again.number = "INV-2026-0043".into();
    let r2 = e.deliver("dlv-inv-2", again).await.unwrap();
    assert!(r2.external_url.unwrap().contains("shortcode=%21"));
    assert_eq!(orgs(&e), 1, "the short code is kept");
    let e2 = env().await;
    let cn = e2
        .deliver("dlv-cn-link", sample("credit-note.json"))
        .await
        .unwrap();
    assert!(cn.external_url.unwrap().ends_with(&format!(
        "ViewCreditNote.aspx%3FcreditNoteID%3D{}",
        cn.external_id
    )),);
}

/// The SDK's allocator starts in a 256 KiB arena and then grows memory: a
/// PDF many times that size (lowered into the guest, copied into the
/// request body) goes through whole, byte for byte.
#[tokio::test]
async fn a_large_pdf_is_attached_whole() {
    use ledgerport::runtime::v0_1::ledgerport::connector::types::Pdf;
    let e = env().await;
    let mut doc = sample("invoice.json");
    let pdf: Vec<u8> = (0..6 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    doc.pdf = Some(Pdf::Bytes(pdf.clone()));
    e.deliver("dlv-big-pdf", doc).await.unwrap();
    let docs = e.docs();
    assert_eq!(docs.attachments.len(), 1);
    assert_eq!(docs.attachments[0]["ContentLength"], pdf.len());
    let sent = e
        .writes()
        .into_iter()
        .find(|w| w.uri.contains("/Attachments/"))
        .expect("the attachment upload");
    let body = sent
        .body_base64
        .map(|b| base64::engine::general_purpose::STANDARD.decode(b).unwrap())
        .expect("a binary body");
    assert!(body == pdf, "the uploaded PDF differs from the document's");
}

#[tokio::test]
async fn a_retry_is_exactly_once_even_after_the_idempotency_window_with_empty_kv() {
    let e = env().await;
    let first = e
        .deliver("dlv-crash", sample("invoice.json"))
        .await
        .unwrap();
    // Same delivery again straight away: nothing new.
    let again = e
        .deliver("dlv-crash", sample("invoice.json"))
        .await
        .unwrap();
    assert_eq!(first.external_id, again.external_id);
    // The retry found the bill, so it looked before attaching (and did not).
    assert_eq!(attachment_lookups(&e), 1);
    // The worker crashed after creating: its kv is gone and Xero forgot the
    // idempotency key (kept 6 minutes).
    e.kv.clear("conn-xero");
    e.sim.advance_secs(7 * 60);
    let after_crash = e
        .deliver("dlv-crash", sample("invoice.json"))
        .await
        .unwrap();
    assert_eq!(first.external_id, after_crash.external_id);
    let docs = e.docs();
    assert_eq!(docs.invoices.len(), 1, "exactly one bill");
    assert_eq!(docs.attachments.len(), 1, "PDF attached once");
    assert_eq!(docs.contacts.len(), 1, "contact reused, not duplicated");
    assert_eq!(e.sim.counters().duplicates, 0);
}

/// Quotes and backslashes in a supplier's name, supplier id and document
/// number reach Xero's `where` clauses written the way Xero reads them
/// (Dynamic LINQ: a quote doubled, a backslash as is). Written with
/// backslash escapes, as before, Xero answers 400 "Syntax error": the
/// contact look-up failed and the document was rejected.
#[tokio::test]
async fn quotes_in_names_and_numbers_are_found_again_exactly_once() {
    let e = env().await;
    let mut doc = sample("invoice.json");
    doc.supplier.name = r#"Globe "EOR" Services \ Ltd"#.into();
    doc.supplier.id = r#"eor-"platform"\1"#.into();
    doc.number = r#"INV-"7"\2026"#.into();
    let first = e.deliver("dlv-quotes", doc.clone()).await.unwrap();
    // Again after the idempotency window, with the kv cache gone: every
    // look-up by name, supplier id and number must find what exists.
    e.kv.clear("conn-xero");
    e.sim.advance_secs(7 * 60);
    let again = e.deliver("dlv-quotes", doc).await.unwrap();
    assert_eq!(first.external_id, again.external_id);
    let docs = e.docs();
    assert_eq!(docs.invoices.len(), 1, "exactly one bill");
    assert_eq!(docs.invoices[0]["InvoiceNumber"], r#"INV-"7"\2026"#);
    assert_eq!(docs.contacts.len(), 1, "the contact was found again");
    assert_eq!(docs.contacts[0]["Name"], r#"Globe "EOR" Services \ Ltd"#);
    assert_eq!(e.sim.counters().duplicates, 0);
}

/// Xero wants a due date on an approved bill: an invoice without one is
/// sent due on its issue date, and the receipt says so.
#[tokio::test]
async fn an_invoice_without_a_due_date_is_due_on_its_issue_date() {
    let e = env().await;
    let mut doc = sample("invoice.json");
    doc.due_date = None;
    let r = e.deliver("dlv-no-due", doc.clone()).await.unwrap();
    let bill = &e.docs().invoices[0];
    assert_eq!(
        bill["DueDateString"].as_str().map(|d| &d[..10]),
        Some(doc.issue_date.as_str()),
        "{bill}"
    );
    assert!(
        r.notes.iter().any(|n| n.contains("no due date")),
        "{:?}",
        r.notes
    );
}

#[tokio::test]
async fn unmapped_kinds_are_all_named_before_anything_is_written() {
    let e = env().await;
    let mut doc = sample("invoice.json");
    doc.lines[2].kind = "new-kind-b".into();
    doc.lines[4].kind = "new-kind-a".into();
    doc.lines[6].kind = "new-kind-b".into();
    let err = e.deliver("dlv-map", doc).await.unwrap_err();
    match err {
        DeliveryError::NeedsMapping(kinds) => assert_eq!(kinds, vec!["new-kind-a", "new-kind-b"]),
        other => panic!("{other:?}"),
    }
    assert!(e.sim.requests(0).is_empty(), "nothing may reach Xero");
}

/// Create a contact in the simulator (PUT), as the admin would in Xero.
async fn sim_put_contact(e: &Env, body: Value) {
    sim_contact(e, reqwest::Method::PUT, "", body).await;
}

#[tokio::test]
async fn an_existing_supplier_contact_is_reused_and_a_name_clash_is_handled() {
    // The admin typed the supplier in by hand (same name, no number): reuse.
    let e = env().await;
    sim_put_contact(&e, serde_json::json!({"Name": "Globe EOR Services Ltd"})).await;
    e.deliver("dlv-c1", sample("invoice.json")).await.unwrap();
    let docs = e.docs();
    assert_eq!(docs.contacts.len(), 1);
    assert_eq!(
        docs.invoices[0]["Contact"]["ContactID"],
        docs.contacts[0]["ContactID"]
    );

    // Typed in with other capitals: the same name to Xero (names are unique
    // whatever their case), though its `==` compares exactly: adopted,
    // not refused as "already assigned".
    let e = env().await;
    sim_put_contact(&e, serde_json::json!({"Name": "GLOBE EOR SERVICES LTD"})).await;
    e.deliver("dlv-c3", sample("invoice.json")).await.unwrap();
    let docs = e.docs();
    assert_eq!(docs.contacts.len(), 1, "{:?}", docs.contacts);
    assert_eq!(
        docs.invoices[0]["Contact"]["ContactID"],
        docs.contacts[0]["ContactID"]
    );

    // An unrelated contact already has the name: ours gets a distinct name.
    let e = env().await;
    sim_put_contact(
        &e,
        serde_json::json!({"Name": "Globe EOR Services Ltd", "ContactNumber": "someone-else"}),
    )
    .await;
    e.deliver("dlv-c2", sample("invoice.json")).await.unwrap();
    let docs = e.docs();
    assert_eq!(docs.contacts.len(), 2);
    let ours = docs
        .contacts
        .iter()
        .find(|c| c["ContactNumber"] == "eor-platform")
        .unwrap();
    assert_eq!(ours["Name"], "Globe EOR Services Ltd (eor-platform)");
    assert_eq!(docs.invoices[0]["Contact"]["ContactID"], ours["ContactID"]);
}

/// Between the connector's look-ups of the supplier and its create, someone
/// creates an unrelated contact with the supplier's name, so Xero refuses
/// the create. The retry must not be refused for that earlier request:
/// - nothing changed in Xero: the retry names ours "Name (number)", a new
///   body, which Xero refuses under a key it saw with another body;
/// - the admin renamed the other contact: the retry sends the same body as
///   before, whose refusal Xero replays under the same key.
#[tokio::test]
async fn a_contact_create_refused_in_a_race_is_retried_under_a_new_key() {
    for renamed in [false, true] {
        let e = env().await;
        // The create waits, so the other contact lands between look-up and create.
        e.sim.set_faults(FaultConfig {
            rules: vec![FaultRule {
                route: Some("PUT /api.xro/2.0/Contacts".into()),
                latency_ms: 1500,
                ..Default::default()
            }],
            ..Default::default()
        });
        let race = async {
            while e
                .sim
                .requests(0)
                .iter()
                .filter(|r| r.method == "GET" && r.uri.starts_with("/api.xro/2.0/Contacts"))
                .count()
                < 2
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            sim_contact(
                &e,
                reqwest::Method::POST,
                "",
                serde_json::json!({"Name": "Globe EOR Services Ltd", "ContactNumber": "someone-else"}),
            )
            .await
        };
        let (first, other) = tokio::join!(e.deliver("dlv-race", sample("invoice.json")), race);
        let DeliveryError::Rejected(errs) = first.unwrap_err() else {
            panic!("expected a refusal")
        };
        assert!(
            errs.iter().any(|f| f.message.contains("already assigned")
                || f.provider_message
                    .as_deref()
                    .unwrap_or("")
                    .contains("already assigned")),
            "{errs:?}"
        );
        e.sim.clear_faults();
        if renamed {
            sim_contact(
                &e,
                reqwest::Method::POST,
                &other,
                serde_json::json!({"ContactID": other, "Name": "Someone Else Ltd"}),
            )
            .await;
        }
        e.deliver("dlv-race", sample("invoice.json"))
            .await
            .unwrap_or_else(|err| panic!("renamed {renamed}: the retry was refused: {err:?}"));
        let docs = e.docs();
        let ours = docs
            .contacts
            .iter()
            .find(|c| c["ContactNumber"] == "eor-platform")
            .expect("our contact");
        let name = if renamed {
            "Globe EOR Services Ltd"
        } else {
            "Globe EOR Services Ltd (eor-platform)"
        };
        assert_eq!(ours["Name"], name);
        assert_eq!(docs.invoices.len(), 1);
        assert_eq!(docs.invoices[0]["Contact"]["ContactID"], ours["ContactID"]);
        // The refusal counter is gone once the contact exists: a later
        // delivery's create keys start afresh.
        use ledgerport::capabilities::kv::KvStore as _;
        let counter =
            e.kv.get("conn-xero", "refusals:dlv-race:contact")
                .await
                .unwrap();
        assert_eq!(counter, None);
    }
}

/// Send a contact to the simulator as the admin would in Xero: `PUT`
/// creates, `POST` creates (no `id`) or updates contact `id`. Returns its id.
async fn sim_contact(e: &Env, method: reqwest::Method, id: &str, body: Value) -> String {
    let path = if id.is_empty() {
        String::new()
    } else {
        format!("/{id}")
    };
    let resp = reqwest::Client::new()
        .request(
            method,
            format!("{}/api.xro/2.0/Contacts{path}", e.sim.base_url()),
        )
        .bearer_auth(&e.token)
        .header("xero-tenant-id", DEFAULT_TENANT_TRADING.to_string())
        .json(&serde_json::json!({"Contacts": [body]}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["Contacts"][0]["ContactID"].as_str().unwrap().to_string()
}

/// Set a contact's status in the simulator, as the admin would in Xero.
async fn sim_contact_status(e: &Env, id: &str, status: &str) {
    sim_contact(
        e,
        reqwest::Method::POST,
        id,
        serde_json::json!({"ContactID": id, "ContactStatus": status}),
    )
    .await;
}

/// The admin archives our supplier contact in Xero (Xero then refuses new
/// bills for it): the next document is refused in words that say how to
/// restore it, no second contact is created behind their back, and once
/// restored the same contact is used again. Merged into a contact typed in
/// by hand with the supplier's name: that one is followed.
#[tokio::test]
async fn an_archived_supplier_contact_is_explained_and_a_merged_one_followed() {
    let e = env().await;
    e.deliver("dlv-a1", sample("invoice.json")).await.unwrap();
    let ours = e.docs().contacts[0]["ContactID"]
        .as_str()
        .unwrap()
        .to_string();
    sim_contact_status(&e, &ours, "ARCHIVED").await;

    let mut doc = sample("invoice.json");
    doc.number = "INV-ARCH-2".into();
    let err = e.deliver("dlv-a2", doc.clone()).await.unwrap_err();
    let DeliveryError::Rejected(errs) = err else {
        panic!("expected a refusal, got {err:?}");
    };
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].field, "supplier");
    assert!(
        errs[0].message.contains("is archived in Xero") && errs[0].message.contains("Restore"),
        "{}",
        errs[0].message
    );
    // A second try without the cache says the same, and creates nothing.
    let err = e.deliver("dlv-a2", doc.clone()).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("is archived in Xero"),
        "{err:?}"
    );
    let docs = e.docs();
    assert_eq!(
        docs.contacts.len(),
        1,
        "no second contact: {:?}",
        docs.contacts
    );
    assert_eq!(docs.invoices.len(), 1);

    // Restored in Xero: the retry goes to the same contact.
    sim_contact_status(&e, &ours, "ACTIVE").await;
    e.deliver("dlv-a2", doc).await.unwrap();
    let docs = e.docs();
    assert_eq!(docs.invoices.len(), 2);
    assert_eq!(docs.invoices[1]["Contact"]["ContactID"], ours.as_str());

    // Merged away into the admin's own contact of the same name (the cache
    // still names ours): the bill goes to theirs.
    sim_contact_status(&e, &ours, "ARCHIVED").await;
    sim_put_contact(&e, serde_json::json!({"Name": "Globe EOR Services Ltd"})).await;
    let theirs = e
        .docs()
        .contacts
        .iter()
        .find(|c| c["ContactID"] != ours.as_str())
        .map(|c| c["ContactID"].as_str().unwrap().to_string())
        .unwrap();
    let mut doc = sample("invoice.json");
    doc.number = "INV-ARCH-3".into();
    e.deliver("dlv-a3", doc).await.unwrap();
    let docs = e.docs();
    assert_eq!(docs.contacts.len(), 2, "{:?}", docs.contacts);
    assert_eq!(docs.invoices.len(), 3);
    assert_eq!(docs.invoices[2]["Contact"]["ContactID"], theirs.as_str());
    e.save_requests("archived_contact");

    // A contact typed in by hand (no number), adopted by name, archived
    // since: refused the same way, not replaced by a second contact.
    let e = env().await;
    sim_put_contact(&e, serde_json::json!({"Name": "Globe EOR Services Ltd"})).await;
    e.deliver("dlv-b1", sample("invoice.json")).await.unwrap();
    let hand = e.docs().contacts[0]["ContactID"]
        .as_str()
        .unwrap()
        .to_string();
    sim_contact_status(&e, &hand, "ARCHIVED").await;
    let mut doc = sample("invoice.json");
    doc.number = "INV-ARCH-4".into();
    for attempt in 0..2 {
        let err = e.deliver("dlv-b2", doc.clone()).await.unwrap_err();
        assert!(
            format!("{err:?}").contains("is archived in Xero"),
            "attempt {attempt}: {err:?}"
        );
    }
    let docs = e.docs();
    assert_eq!(
        docs.contacts.len(),
        1,
        "no second contact: {:?}",
        docs.contacts
    );
    assert_eq!(docs.invoices.len(), 1);
}

/// Xero refuses a line whose mapped account is archived (its own words:
/// "Account code '499' has been archived, or has been deleted...") or whose
/// mapped tax type it does not know: the admin must map those kinds to
/// something else, so the answer is needs-mapping naming them (the host
/// pauses the delivery and resumes it once they are mapped otherwise), not
/// a refusal that fails the document for good.
#[tokio::test]
async fn an_archived_account_or_unknown_tax_type_asks_for_another_mapping() {
    let e = env().await;
    let scope = MappingScope {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
    };
    e.mappings.set(
        &scope,
        AccountMapping {
            kind: "management-fee".into(),
            account_code: "499".into(),
            tax_type: None,
        },
    );
    let err = e
        .deliver("dlv-arch", sample("invoice.json"))
        .await
        .unwrap_err();
    let DeliveryError::NeedsMapping(kinds) = err else {
        panic!("{err:?}")
    };
    assert_eq!(kinds, vec!["management-fee"]);
    assert!(e.docs().invoices.is_empty());
    // The admin maps another account and retries at once: delivered (the
    // create's idempotency key used to be the same for the new request,
    // and Xero refuses a key reused with another body for minutes).
    e.mappings.set(
        &scope,
        AccountMapping {
            kind: "management-fee".into(),
            account_code: "429".into(),
            tax_type: Some("INPUT2".into()),
        },
    );
    e.deliver("dlv-arch", sample("invoice.json"))
        .await
        .expect("delivered after the fix");
    assert_eq!(e.docs().invoices.len(), 1);

    // A tax type Xero does not know, mapped for two kinds: both named.
    let e = env().await;
    for kind in ["management-fee", "fx-fee"] {
        e.mappings.set(
            &scope,
            AccountMapping {
                kind: kind.into(),
                account_code: "429".into(),
                tax_type: Some("BOGUS".into()),
            },
        );
    }
    let err = e
        .deliver("dlv-tax", sample("invoice.json"))
        .await
        .unwrap_err();
    let DeliveryError::NeedsMapping(kinds) = err else {
        panic!("{err:?}")
    };
    assert_eq!(kinds, vec!["fx-fee", "management-fee"]);
    assert!(e.docs().invoices.is_empty());
    e.save_requests("needs_mapping");
}

#[tokio::test]
async fn a_disabled_currency_is_rejected_in_plain_words() {
    let e = env().await;
    let mut doc = sample("invoice.json");
    doc.currency = "JPY".into();
    let err = e.deliver("dlv-jpy", doc).await.unwrap_err();
    let DeliveryError::Rejected(errs) = err else {
        panic!("{err:?}")
    };
    assert!(
        errs.iter()
            .any(|f| f.message.contains("currency is not enabled")
                && f.provider_message.as_deref().unwrap_or("").contains("JPY")),
        "{errs:?}"
    );
    e.save_requests("rejections");
}

#[tokio::test]
async fn bad_amounts_are_refused_before_anything_is_written() {
    let e = env().await;
    let mut doc = sample("invoice.json");
    doc.lines[1].unit_amount = "1e5".into();
    doc.lines[3].unit_amount = "1.23456".into();
    let err = e.deliver("dlv-amt", doc).await.unwrap_err();
    let DeliveryError::Rejected(errs) = err else {
        panic!("{err:?}")
    };
    let fields: Vec<&str> = errs.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(fields, vec!["lines[1].unit_amount", "lines[3].unit_amount"]);
    assert!(e.sim.requests(0).is_empty());
}

fn credit(number: &str, credits: &str, total: &str) -> Document {
    let mut d = sample("credit-note.json");
    d.number = number.into();
    d.credits_invoice_number = Some(credits.into());
    // One line carrying the whole amount.
    d.lines.truncate(1);
    d.lines[0].kind = "management-fee".into();
    d.lines[0].unit_amount = total.into();
    d.lines[0].line_amount = total.into();
    d.lines[0].tax_amount = "0.00".into();
    d.subtotal = total.into();
    d.total_tax = "0.00".into();
    d.total = total.into();
    d
}

#[tokio::test]
async fn credit_notes_are_allocated_fully_partially_or_explained() {
    let e = env().await;
    e.deliver("dlv-inv", sample("invoice.json")).await.unwrap();
    // Full: the sample credit note (620.00) against the 9950.49 bill.
    let r = e
        .deliver("dlv-cn-1", sample("credit-note.json"))
        .await
        .unwrap();
    let docs = e.docs();
    assert_eq!(docs.credit_notes.len(), 1);
    assert_eq!(docs.credit_notes[0]["Type"], "ACCPAYCREDIT");
    assert_eq!(docs.credit_notes[0]["CreditNoteNumber"], "CN-2026-0007");
    assert_eq!(num(&docs.invoices[0]["AmountDue"]), "9330.49");
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("allocated to bill INV-2026-0042")),
        "{:?}",
        r.notes
    );
    // Retrying the credit note does not allocate twice, and does not claim
    // that the (fully allocated, so PAID) credit note was left unallocated.
    let again = e
        .deliver("dlv-cn-1", sample("credit-note.json"))
        .await
        .unwrap();
    assert!(
        !again.notes.iter().any(|n| n.contains("not allocated")),
        "{:?}",
        again.notes
    );
    // Xero's credit notes carry no Url (our marker): the retry found it by
    // number, supplier and total, and says it cannot tell whose it was.
    assert!(e.docs().credit_notes[0].get("Url").is_none());
    assert_eq!(e.docs().credit_notes.len(), 1);
    assert!(
        again.notes.iter().any(|n| n.contains("earlier attempt")),
        "{:?}",
        again.notes
    );
    assert_eq!(num(&e.docs().invoices[0]["AmountDue"]), "9330.49");
    assert_eq!(e.docs().allocations.len(), 1);

    // Partial: more credit than is still due. Retried (its answer lost),
    // the bill is paid by this credit note, and the receipt says what was
    // allocated, not that nothing was.
    let partial = || {
        e.deliver(
            "dlv-cn-2",
            credit("CN-2026-0008", "INV-2026-0042", "10000.00"),
        )
    };
    let r = partial().await.unwrap();
    let says_partial = |notes: &[String]| {
        notes
            .iter()
            .any(|n| n.contains("9330.49") && n.contains("rest stays as credit"))
    };
    assert!(says_partial(&r.notes), "{:?}", r.notes);
    assert_eq!(num(&e.docs().invoices[0]["AmountDue"]), "0");
    let again = partial().await.unwrap();
    assert!(says_partial(&again.notes), "{:?}", again.notes);
    assert!(
        !again.notes.iter().any(|n| n.contains("left unallocated")),
        "{:?}",
        again.notes
    );
    assert_eq!(e.docs().allocations.len(), 2, "not allocated twice");

    // Impossible: the bill it names is not in Xero.
    let r = e
        .deliver("dlv-cn-3", credit("CN-2026-0009", "INV-NOPE", "10.00"))
        .await
        .unwrap();
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("INV-NOPE") && n.contains("unallocated")),
        "{:?}",
        r.notes
    );
    // Nothing left due: explained too.
    let r = e
        .deliver("dlv-cn-4", credit("CN-2026-0010", "INV-2026-0042", "10.00"))
        .await
        .unwrap();
    assert!(
        r.notes.iter().any(|n| n.contains("nothing left to pay")),
        "{:?}",
        r.notes
    );
    assert_eq!(e.docs().credit_notes.len(), 4);

    // Xero refuses the allocation (here: a USD credit note for a EUR
    // bill) after the credit note was created: delivered, with a note
    // quoting Xero, not a rejection (which left a credit note in Xero that
    // the log said was not sent, refused again on every retry).
    let mut bill = sample("invoice.json");
    bill.number = "INV-2026-0050".into();
    e.deliver("dlv-inv-50", bill).await.unwrap();
    let mut usd = credit("CN-2026-0011", "INV-2026-0050", "10.00");
    usd.currency = "USD".into();
    let r = e.deliver("dlv-cn-5", usd).await.unwrap();
    assert!(
        r.notes.iter().any(
            |n| n.contains("could not be allocated to bill INV-2026-0050")
                && n.contains("same currency")
        ),
        "{:?}",
        r.notes
    );
    assert_eq!(e.docs().credit_notes.len(), 5);
    assert_eq!(e.sim.counters().duplicates, 0);
    e.save_requests("credit-notes");
}

#[tokio::test]
async fn draft_status_is_a_connection_setting() {
    let e = env().await;
    let ctx = e.ctx_with(
        Arc::new(StaticCredentials(e.token.clone())),
        Some(DEFAULT_TENANT_TRADING.to_string()),
        &[("status", "DRAFT")],
    );
    e.deliver_ctx(&ctx, "dlv-draft", sample("invoice.json"))
        .await
        .unwrap();
    assert_eq!(e.docs().invoices[0]["Status"], "DRAFT");
    let r = e
        .deliver_ctx(&ctx, "dlv-draft-cn", sample("credit-note.json"))
        .await
        .unwrap();
    assert!(r.notes.iter().any(|n| n.contains("DRAFT")), "{:?}", r.notes);
}

#[tokio::test]
async fn provider_answers_map_to_outcomes() {
    let e = env().await;
    // 403: the organisation is not (or no longer) connected.
    let ctx = e.ctx_with(
        Arc::new(StaticCredentials(e.token.clone())),
        Some(uuid::Uuid::new_v4().to_string()),
        &[],
    );
    let err = e
        .deliver_ctx(&ctx, "d403", sample("invoice.json"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeliveryError::NeedsReauth(m) if m.contains("AuthenticationUnsuccessful")),
        "{err:?}"
    );
    // No organisation picked at all.
    let ctx = e.ctx_with(Arc::new(StaticCredentials(e.token.clone())), None, &[]);
    assert!(matches!(
        e.deliver_ctx(&ctx, "dnone", sample("invoice.json")).await,
        Err(DeliveryError::NeedsReauth(_))
    ));

    // 429 burst: rate-limited with the limit and Retry-After.
    e.sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            force_429: 1,
            retry_after_secs: 42,
            ..Default::default()
        }],
        ..Default::default()
    });
    let err = e.deliver("d429", sample("invoice.json")).await.unwrap_err();
    let DeliveryError::RateLimited(rl) = err else {
        panic!("{err:?}")
    };
    assert_eq!(rl.retry_after_seconds, 42);
    assert!(!rl.limit.is_empty());
    // Xero's concurrent limit comes without Retry-After: a moment's wait,
    // not the minute assumed for the others.
    e.sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            force_429: 1,
            force_429_kind: xero_sim::RateProblem::Concurrent,
            ..Default::default()
        }],
        ..Default::default()
    });
    let err = e
        .deliver("d429c", sample("invoice.json"))
        .await
        .unwrap_err();
    let DeliveryError::RateLimited(rl) = err else {
        panic!("{err:?}")
    };
    assert_eq!(
        (rl.retry_after_seconds, rl.limit.as_str()),
        (2, "concurrent")
    );

    // 500 and 503: transient.
    for (r500, r503) in [(1.0, 0.0), (0.0, 1.0)] {
        e.sim.set_faults(FaultConfig {
            rules: vec![FaultRule {
                error_500_rate: r500,
                error_503_rate: r503,
                ..Default::default()
            }],
            ..Default::default()
        });
        let err = e.deliver("d5xx", sample("invoice.json")).await.unwrap_err();
        assert!(matches!(err, DeliveryError::Transient(_)), "{err:?}");
    }
    // A connection reset: transient too.
    e.sim.set_faults(FaultConfig {
        rules: vec![FaultRule {
            reset_rate: 1.0,
            ..Default::default()
        }],
        ..Default::default()
    });
    let err = e
        .deliver("dreset", sample("invoice.json"))
        .await
        .unwrap_err();
    assert!(matches!(err, DeliveryError::Transient(_)), "{err:?}");
    e.sim.clear_faults();
    assert!(e.docs().invoices.is_empty());
}

/// Hands out a token, and on refresh a new one from the simulator.
struct Refreshing {
    sim_token: Mutex<String>,
    fresh: String,
    refreshes: AtomicU32,
}

#[async_trait]
impl CredentialProvider for Refreshing {
    async fn bearer(&self, _c: &str) -> Result<Credential, CredentialError> {
        Ok(Credential {
            access_token: self.sim_token.lock().unwrap().clone(),
        })
    }
    async fn refresh(
        &self,
        _c: &str,
        _rejected: &Credential,
    ) -> Result<Credential, CredentialError> {
        self.refreshes.fetch_add(1, Ordering::SeqCst);
        *self.sim_token.lock().unwrap() = self.fresh.clone();
        Ok(Credential {
            access_token: self.fresh.clone(),
        })
    }
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_by_the_host_and_the_call_retried() {
    let e = env().await;
    // The token expires (30 minutes on the sim clock).
    e.sim.advance_secs(31 * 60);
    let fresh = e
        .sim
        .issue_grant(GrantRequest {
            tenants: Some(vec![DEFAULT_TENANT_TRADING]),
            ..Default::default()
        })
        .unwrap()
        .tokens
        .access_token;
    let creds = Arc::new(Refreshing {
        sim_token: Mutex::new(e.token.clone()),
        fresh,
        refreshes: AtomicU32::new(0),
    });
    let ctx = e.ctx_with(creds.clone(), Some(DEFAULT_TENANT_TRADING.to_string()), &[]);
    e.deliver_ctx(&ctx, "d401", sample("invoice.json"))
        .await
        .unwrap();
    assert_eq!(creds.refreshes.load(Ordering::SeqCst), 1);
    assert_eq!(e.docs().invoices.len(), 1);

    // A token that cannot be refreshed: the admin must reconnect.
    e.sim.advance_secs(31 * 60);
    let err = e
        .deliver("d401b", sample("invoice.json"))
        .await
        .unwrap_err();
    assert!(matches!(err, DeliveryError::NeedsReauth(_)), "{err:?}");
}

#[tokio::test]
async fn list_accounts_offers_active_bill_accounts_and_tax_rates_and_check_names_the_org() {
    let e = env().await;
    let list =
        e.rt.list_accounts(&e.plugin, &e.ctx())
            .await
            .unwrap()
            .unwrap();
    let codes: Vec<&str> = list.accounts.iter().map(|a| a.code.as_str()).collect();
    assert!(
        codes.contains(&"477")
            && codes.contains(&"429")
            && codes.contains(&"620")
            && codes.contains(&"830"),
        "{codes:?}"
    );
    assert!(!codes.contains(&"499"), "archived accounts are not offered");
    assert!(!codes.contains(&"200"), "revenue accounts are not offered");
    for system in ["610", "800", "820", "840"] {
        assert!(
            !codes.contains(&system),
            "system account {system} is offered: {codes:?}"
        );
    }
    let salaries = list.accounts.iter().find(|a| a.code == "477").unwrap();
    assert_eq!(salaries.name, "Salaries");
    assert_eq!(salaries.account_type, "EXPENSE");
    let taxes: Vec<&str> = list.tax_rates.iter().map(|t| t.tax_type.as_str()).collect();
    assert!(
        taxes.contains(&"INPUT2") && !taxes.contains(&"TAX001"),
        "{taxes:?}"
    );
    let report = e.rt.check(&e.plugin, &e.ctx()).await.unwrap().unwrap();
    assert_eq!(report.organisation_name, "Acme Trading GmbH");
    assert!(report.details.iter().any(|d| d.contains("EUR")));
}

/// An Australian organisation keeps wages and superannuation on payroll
/// account types (`WAGESEXPENSE`, `SUPERANNUATIONEXPENSE`) and what is
/// withheld on payroll liabilities: those are where an employer-of-record
/// bill's salary lines belong, so they are offered for mapping, and a bill
/// posted to them is taken.
#[tokio::test]
async fn an_australian_organisations_payroll_accounts_are_offered_and_used() {
    let mut cfg = SimConfig::default();
    let org = cfg
        .orgs
        .iter_mut()
        .find(|o| o.tenant_id == DEFAULT_TENANT_TRADING)
        .unwrap();
    org.name = "Acme Trading Pty Ltd".into();
    org.base_currency = "AUD".into();
    org.currencies = ["AUD", "EUR", "GBP", "USD"].map(String::from).to_vec();
    org.country_code = "AU".into();
    org.version = "AU".into();
    let e = env_with(cfg).await;
    let list =
        e.rt.list_accounts(&e.plugin, &e.ctx())
            .await
            .unwrap()
            .unwrap();
    let ty = |code: &str| {
        list.accounts
            .iter()
            .find(|a| a.code == code)
            .map(|a| a.account_type.clone())
    };
    assert_eq!(ty("477").as_deref(), Some("WAGESEXPENSE"));
    assert_eq!(ty("478").as_deref(), Some("SUPERANNUATIONEXPENSE"));
    assert_eq!(ty("825").as_deref(), Some("PAYGLIABILITY"));
    assert_eq!(ty("826").as_deref(), Some("SUPERANNUATIONLIABILITY"));
    // The sample mappings put salaries on 477, contributions on 478.
    e.deliver("dlv-au", sample("invoice.json")).await.unwrap();
    let docs = e.docs();
    let codes: Vec<&str> = docs.invoices[0]["LineItems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["AccountCode"].as_str())
        .collect();
    assert!(
        codes.contains(&"477") && codes.contains(&"478"),
        "{codes:?}"
    );
}

/// A supplier name with spaces around it (Xero stores names trimmed) still
/// finds the contact typed in by hand, rather than being refused as
/// "already assigned" on every document.
#[tokio::test]
async fn spaces_around_the_supplier_name_do_not_defeat_the_look_up() {
    let e = env().await;
    sim_put_contact(&e, serde_json::json!({"Name": "Globe EOR Services Ltd"})).await;
    let mut doc = sample("invoice.json");
    doc.supplier.name = format!("  {} ", doc.supplier.name);
    e.deliver("dlv-name-space", doc).await.unwrap();
    let docs = e.docs();
    assert_eq!(docs.contacts.len(), 1, "{:?}", docs.contacts);
    assert_eq!(
        docs.invoices[0]["Contact"]["ContactID"],
        docs.contacts[0]["ContactID"]
    );
}

/// Xero keeps no Reference on a supplier credit note ("ACCRECCREDIT
/// only"), and a draft is not allocated: the credited bill is named in the
/// credit note's history, once, however often the delivery is retried.
#[tokio::test]
async fn a_draft_credit_note_names_the_bill_it_corrects_in_its_history() {
    let e = env().await;
    let ctx = e.ctx_with(
        Arc::new(StaticCredentials(e.token.clone())),
        Some(DEFAULT_TENANT_TRADING.to_string()),
        &[("status", "DRAFT")],
    );
    let r = e
        .deliver_ctx(&ctx, "dlv-cn-draft", sample("credit-note.json"))
        .await
        .unwrap();
    let docs = e.docs();
    assert_eq!(docs.credit_notes.len(), 1);
    assert_eq!(docs.credit_notes[0]["Status"], "DRAFT");
    assert!(docs.allocations.is_empty());
    assert_eq!(docs.history.len(), 1, "{:?}", docs.history);
    assert_eq!(
        docs.history[0]["Owner"],
        format!("CreditNotes/{}", r.external_id)
    );
    let details = docs.history[0]["Details"].as_str().unwrap();
    assert!(details.contains("INV-2026-0042"), "{details}");
    // Retried at once, and after a crash past Xero's idempotency window:
    // the note is found, not added again.
    e.deliver_ctx(&ctx, "dlv-cn-draft", sample("credit-note.json"))
        .await
        .unwrap();
    e.kv.clear("conn-xero");
    e.sim.advance_secs(7 * 60);
    e.deliver_ctx(&ctx, "dlv-cn-draft", sample("credit-note.json"))
        .await
        .unwrap();
    let docs = e.docs();
    assert_eq!(docs.credit_notes.len(), 1);
    assert_eq!(docs.history.len(), 1, "{:?}", docs.history);
    e.save_requests("credit_note_history");
}

/// Xero trims the spaces around a number it stores: the look-up before
/// create must send the number trimmed too, or a retry after the
/// idempotency window (kv gone) finds nothing and creates a second bill.
#[tokio::test]
async fn spaces_around_a_number_do_not_defeat_the_look_up() {
    let e = env().await;
    let mut doc = sample("invoice.json");
    doc.number = "INV-2026-0099 ".into();
    let first = e.deliver("dlv-space", doc.clone()).await.unwrap();
    e.kv.clear("conn-xero");
    e.sim.advance_secs(7 * 60);
    let again = e.deliver("dlv-space", doc).await.unwrap();
    assert_eq!(first.external_id, again.external_id);
    let docs = e.docs();
    assert_eq!(docs.invoices.len(), 1, "exactly one bill");
    assert_eq!(docs.invoices[0]["InvoiceNumber"], "INV-2026-0099");
    assert_eq!(e.sim.counters().duplicates, 0);
    // A credit note naming the bill with spaces around its number finds it.
    let mut cn = sample("credit-note.json");
    cn.credits_invoice_number = Some(" INV-2026-0099 ".into());
    let r = e.deliver("dlv-space-cn", cn).await.unwrap();
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("allocated to bill INV-2026-0099")),
        "{:?}",
        r.notes
    );
}

/// DESIGN rule 4: every write carries an idempotency key derived from the
/// delivery, one per kind of request (contact, create, PDF, history note,
/// allocation).
#[tokio::test]
async fn every_write_carries_its_own_idempotency_key() {
    let e = env().await;
    e.deliver("dlv-keys-inv", sample("invoice.json"))
        .await
        .unwrap();
    e.deliver("dlv-keys-cn", sample("credit-note.json"))
        .await
        .unwrap();
    let writes = e.writes();
    let mut keys = std::collections::BTreeSet::new();
    for w in &writes {
        let key = w
            .headers
            .iter()
            .find(|(k, _)| k == "idempotency-key")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{} {} carries no idempotency key", w.method, w.uri));
        assert!(
            key.starts_with("dlv-keys-"),
            "{} {}: {key}",
            w.method,
            w.uri
        );
        assert!(keys.insert(key.clone()), "{key} used twice");
    }
    for path in [
        "/Contacts",
        "/Invoices",
        "/Attachments/",
        "/CreditNotes",
        "/History",
        "/Allocations",
    ] {
        assert!(
            writes.iter().any(|w| w.uri.contains(path)),
            "no write to {path}: {:?}",
            writes.iter().map(|w| &w.uri).collect::<Vec<_>>()
        );
    }
}
