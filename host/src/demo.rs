//! `ledgerport demo`: the whole product on embedded defaults, with zero
//! set-up. It starts the Xero simulator and an SMTP sink on loopback and a
//! daemon on SQLite; creates a demo tenant; connects it to Xero through the
//! real OAuth flow; maps the line kinds to accounts (all but one); issues
//! the sample invoice and credit note plus an invoice with an unmapped kind
//! (which pauses and produces the e-mail); then prints what happened and
//! keeps serving until Ctrl-C.

use crate::capabilities::mapping::{AccountMapping, MappingScope};
use crate::connections::Clock;
use crate::daemon::{Config, Daemon, MailSettings, PluginSettings};
use anyhow::Context;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where installed plugins are looked for: `$LEDGERPORT_PLUGIN_DIR`, else
/// `target/plugins` (where `cargo xtask wasm` installs them).
pub fn plugin_dir() -> PathBuf {
    std::env::var_os("LEDGERPORT_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/plugins"))
}

/// Where the sample documents are: `$LEDGERPORT_EXAMPLES`, else `examples/documents`.
pub fn examples_dir() -> PathBuf {
    std::env::var_os("LEDGERPORT_EXAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("examples/documents"))
}

/// What an admin maps for the sample documents (`examples/documents`), on
/// Xero's demo company: kind, account code, tax type. `late-payment-fee` is
/// left out on purpose (the demo shows the needs-mapping pause with it).
const SAMPLE_MAPPINGS: &[(&str, &str, Option<&str>)] = &[
    ("gross-salary", "477", None),
    ("employer-social-contributions", "478", None),
    ("employee-benefits", "479", None),
    ("allowances-and-bonuses", "477", None),
    ("statutory-payments", "477", None),
    ("management-fee", "429", Some("INPUT2")),
    ("onboarding-fee", "429", Some("INPUT2")),
    ("fx-fee", "404", None),
    ("expense-reimbursement", "493", None),
    ("security-deposit", "620", None),
    ("deposit-refund", "620", None),
];

/// The sample mappings (`SAMPLE_MAPPINGS`) as mappings: what the demo, the tests and the
/// benchmarks set for a tenant.
pub fn sample_mappings() -> Vec<AccountMapping> {
    SAMPLE_MAPPINGS
        .iter()
        .map(|(kind, code, tax)| AccountMapping {
            kind: kind.to_string(),
            account_code: code.to_string(),
            tax_type: tax.map(String::from),
        })
        .collect()
}

fn load(path: &Path) -> anyhow::Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Run the demo. With `exit`, return after the summary.
pub async fn run(exit: bool, port: u16) -> anyhow::Result<()> {
    // Checked first: without it the daemon starts fine and the demo would
    // only fail later, on connecting, with a less helpful message.
    let xero = plugin_dir().join("xero").join("manifest.toml");
    if !xero.is_file() {
        anyhow::bail!(
            "the Xero connector is not installed ({} is missing): build and install the connectors with `cargo xtask wasm`, or run the demo with `cargo xtask demo`",
            xero.display()
        );
    }
    let sim = xero_sim::Sim::start(xero_sim::SimConfig::default()).await?;
    sim.set_auto_approve(Some(vec![xero_sim::DEFAULT_TENANT_TRADING]));
    let smtp = smtp_sink::SmtpSink::start().await?;
    let work = std::env::temp_dir().join(format!("ledgerport-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let key_file = work.join("secret.key");
    std::fs::write(&key_file, crate::crypto::generate_key())?;
    // The asked-for port, or any free one when it is taken (port 0: the
    // daemon binds whatever the kernel gives and its public URL follows).
    let port = match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => port,
        Err(_) => 0,
    };
    let mut cfg: Config = toml::from_str("")?;
    cfg.database = work.join("ledgerport.db").display().to_string();
    cfg.listen = format!("127.0.0.1:{port}");
    cfg.plugin_dir = plugin_dir();
    cfg.key_file = Some(key_file);
    cfg.cache_dir = Some(PathBuf::from("target/ledgerport-cache"));
    cfg.service_keys = vec!["demo-service-key".into()];
    let mut overrides = std::collections::BTreeMap::new();
    for h in [
        "https://login.xero.com",
        "https://identity.xero.com",
        "https://api.xero.com",
    ] {
        overrides.insert(h.to_string(), sim.base_url());
    }
    cfg.plugins.insert(
        "xero".into(),
        PluginSettings {
            base_urls: overrides,
            client_id: Some(xero_sim::DEFAULT_CLIENT_ID.into()),
            client_secret: Some(xero_sim::DEFAULT_CLIENT_SECRET.into()),
            broad_scopes: false,
        },
    );
    cfg.mail = Some(MailSettings {
        smtp_host: "127.0.0.1".into(),
        smtp_port: smtp.addr().port(),
        starttls: false,
        from: "ledgerport <integrations@globe-eor.example>".into(),
        username: None,
        password: None,
    });
    let dispatch = crate::dispatch::DispatchConfig {
        coalesce: Duration::from_secs(1),
        poll: Duration::from_millis(100),
        ..Default::default()
    };
    let daemon = Daemon::start(cfg, Clock::system(), Some(dispatch))
        .await
        .context("starting the daemon")?;
    let base = format!("http://{}", daemon.addr);
    println!("ledgerport demo");
    println!("  xero simulator  {}", sim.base_url());
    println!("  smtp sink       {}", smtp.addr());
    println!(
        "  daemon          {base} (SQLite at {})",
        work.join("ledgerport.db").display()
    );

    // The tenant and its admin connect Xero.
    let store = &daemon.store;
    store
        .upsert_tenant(
            "acme",
            "Acme Trading GmbH",
            &["finance@acme.example".to_string()],
            chrono::Utc::now().timestamp(),
        )
        .await?;
    let url = daemon
        .connections
        .begin_connect("acme", "xero", "alice@acme.example")
        .await?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let consent = client.get(url.as_str()).send().await?;
    let back = consent
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("the simulator did not redirect back")?
        .to_string();
    client.get(&back).send().await?;
    let conn = store
        .connections(Some("acme"))
        .await?
        .into_iter()
        .next()
        .context("no connection after the OAuth flow")?;
    println!(
        "\n1. connected acme to Xero organisation {:?} (state {}, scopes {})",
        conn.external_tenant_name.clone().unwrap_or_default(),
        conn.state,
        conn.scopes.join(" ")
    );
    let scope = MappingScope {
        tenant_id: "acme".into(),
        connector_id: "xero".into(),
    };
    for m in sample_mappings() {
        store
            .set_mapping(
                &scope,
                &m,
                "alice@acme.example",
                chrono::Utc::now().timestamp(),
            )
            .await?;
    }
    println!(
        "2. mapped {} line kinds to Xero accounts (late-payment-fee left unmapped on purpose)",
        SAMPLE_MAPPINGS.len()
    );

    // The platform issues documents.
    let invoice = load(&examples_dir().join("invoice.json"))?;
    let credit = load(&examples_dir().join("credit-note.json"))?;
    let mut late = invoice.clone();
    late["id"] = json!("doc-inv-0043");
    late["number"] = json!("INV-2026-0043");
    late["lines"] = json!([{ "kind": "late-payment-fee", "description": "Late payment fee (October)", "quantity": "1", "unit_amount": "40.00", "tax_amount": "0.00", "line_amount": "40.00" }]);
    late["subtotal"] = json!("40.00");
    late["total_tax"] = json!("0.00");
    late["total"] = json!("40.00");
    late.as_object_mut().map(|o| o.remove("pdf"));
    for doc in [&invoice, &credit, &late] {
        let r = client
            .post(format!("{base}/v1/documents"))
            .bearer_auth("demo-service-key")
            .json(doc)
            .send()
            .await?;
        println!(
            "3. issued {} -> HTTP {}",
            doc["number"].as_str().unwrap_or("?"),
            r.status().as_u16()
        );
    }
    // Wait for the outcomes and the e-mail.
    let started = Instant::now();
    loop {
        let counts = store.delivery_counts(None).await?;
        let busy: i64 = counts
            .iter()
            .filter(|(s, _)| s == "pending" || s == "working")
            .map(|(_, n)| n)
            .sum();
        if busy == 0 && !smtp.mails().is_empty() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            println!("(still waiting after 60 s: {counts:?})");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("\n4. what happened:");
    for r in store
        .list_deliveries(Some("acme"), None, None, 20)
        .await?
        .iter()
        .rev()
    {
        match r.state.as_str() {
            "delivered" => println!(
                "   {:<14} delivered to Xero as {} ({})",
                r.document_number,
                r.external_id.clone().unwrap_or_default(),
                r.external_url.clone().unwrap_or_default()
            ),
            other => println!(
                "   {:<14} {other}{}: {}",
                r.document_number,
                r.pause_reason
                    .as_ref()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default(),
                r.last_error.clone().unwrap_or_default()
            ),
        }
        for a in store.list_attempts(&r.id).await? {
            if let Some(m) = a.message.filter(|_| a.outcome == "delivered") {
                println!("   {:<14}   note: {m}", "");
            }
        }
    }
    let docs = sim
        .documents(xero_sim::DEFAULT_TENANT_TRADING)
        .unwrap_or_default();
    println!(
        "   in the simulated Xero: {} bill(s), {} supplier credit note(s), {} attachment(s), {} allocation(s)",
        docs.invoices.len(),
        docs.credit_notes.len(),
        docs.attachments.len(),
        docs.allocations.len()
    );
    println!("\n5. the e-mail the customer received:");
    for m in smtp.mails() {
        println!("   To: {}", m.to.join(", "));
        println!("   Subject: {}", m.header("Subject").unwrap_or_default());
        let text = plain_part(&m.data);
        for line in text.lines() {
            println!("   | {line}");
        }
    }
    let (page_key_id, _) = store
        .issue_key(
            &crate::store::admin::KeyScope::Tenant("acme".into()),
            "demo Integrations page",
            chrono::Utc::now().timestamp(),
        )
        .await?;
    // What the platform would ask for when an admin opens Integrations
    // (POST /v1/admin/tenants/acme/page-sessions); one-time, and valid
    // for a day here so there is time to open it.
    let ticket = store
        .create_page_ticket(
            "acme",
            "alice@acme.example",
            "super-admin",
            &page_key_id,
            24 * 3600,
            chrono::Utc::now().timestamp(),
        )
        .await?;
    println!("\n6. try it:");
    println!("   Integrations  {base}/integrations/login?ticket={ticket}  (one-time sign-in link)");
    println!(
        "   delivery log  curl -H 'Authorization: Bearer demo-service-key' {base}/v1/tenants/acme/deliveries"
    );
    println!("   metrics       {base}/metrics");
    println!("   fix the mapping and watch INV-2026-0043 go out by itself:");
    println!(
        "   ledgerport mappings set --database {} --key-file {} --tenant acme late-payment-fee=404",
        work.join("ledgerport.db").display(),
        work.join("secret.key").display()
    );
    if exit {
        daemon.stop().await;
        return Ok(());
    }
    println!("\nserving until Ctrl-C ...");
    let _ = tokio::signal::ctrl_c().await;
    daemon.stop().await;
    Ok(())
}

/// The text/plain part of a MIME message, decoded when quoted-printable.
fn plain_part(data: &str) -> String {
    let Some(start) = data.find("Content-Type: text/plain") else {
        return data.to_string();
    };
    let rest = &data[start..];
    let body_start = rest.find("\r\n\r\n").map(|i| i + 4).unwrap_or(0);
    let qp = rest[..body_start].contains("quoted-printable");
    let body = &rest[body_start..];
    let end = body.find("\r\n--").unwrap_or(body.len());
    let body = &body[..end];
    if !qp {
        return body.replace("\r\n", "\n");
    }
    let mut out = String::new();
    let joined = body.replace("=\r\n", "");
    let bytes = joined.as_bytes();
    let mut i = 0;
    let mut buf = Vec::new();
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&joined[i + 1..i + 3], 16)
        {
            buf.push(b);
            i += 3;
            continue;
        }
        buf.push(bytes[i]);
        i += 1;
    }
    out.push_str(&String::from_utf8_lossy(&buf));
    out.replace("\r\n", "\n")
}
