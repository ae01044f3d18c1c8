//! Telling people: failure incidents become e-mails (plain text and HTML)
//! that say which documents, what went wrong in plain words, what the
//! accounting system said, and what to do next. E-mails go through the
//! durable mail outbox and are sent over SMTP (lettre), retried while the
//! server is down.

use crate::oauth::escape as esc;
use crate::store::Store;
use crate::store::outbox::{IncidentRow, NewMail};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::client::Tls;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::collections::BTreeMap;
use std::time::Duration;

/// Where mail goes and what it links to.
#[derive(Debug, Clone)]
pub struct MailConfig {
    /// SMTP host.
    pub smtp_host: String,
    /// SMTP port.
    pub smtp_port: u16,
    /// Use STARTTLS (required for anything but loopback).
    pub starttls: bool,
    /// SMTP user and password, when the server needs them.
    pub credentials: Option<(String, String)>,
    /// The From address.
    pub from: String,
    /// Base URL of the Integrations page (links in e-mails).
    pub integrations_url: String,
    /// The installed connectors by id, as notices speak of them.
    pub connectors: BTreeMap<String, NoticeConnector>,
}

/// How notices speak of one installed connector, from its manifest.
#[derive(Debug, Clone)]
pub struct NoticeConnector {
    /// Its display name (the manifest's `name`, e.g. "Xero"): a notice
    /// names the system its documents were meant for.
    pub name: String,
    /// It connects without an OAuth grant (no `[oauth]`, e.g. the JSON
    /// webhook): when it pauses for re-authorisation it is its settings
    /// that need fixing, and the notice says so instead of speaking of
    /// revoked access.
    pub grantless: bool,
}

impl NoticeConnector {
    /// The connectors of `manifests`, by id.
    pub fn of<'a>(
        manifests: impl IntoIterator<Item = &'a crate::manifest::Manifest>,
    ) -> BTreeMap<String, NoticeConnector> {
        manifests
            .into_iter()
            .map(|m| {
                (
                    m.id.clone(),
                    NoticeConnector {
                        name: m.name.clone(),
                        grantless: m.oauth.is_none(),
                    },
                )
            })
            .collect()
    }
}

impl MailConfig {
    /// The display name of a connector, or its id when it is not installed
    /// (any more): a notice still says where its documents were going.
    pub fn provider_name<'a>(&'a self, connector_id: &'a str) -> &'a str {
        self.connectors
            .get(connector_id)
            .map(|c| c.name.as_str())
            .unwrap_or(connector_id)
    }
}

/// A composed e-mail.
#[derive(Debug, Clone, PartialEq)]
pub struct Email {
    /// Subject.
    pub subject: String,
    /// Plain text.
    pub text: String,
    /// HTML.
    pub html: String,
}

/// Compose the e-mail for an incident; `provider` is the display name of
/// the system the documents were meant for (see
/// [`MailConfig::provider_name`]), `grantless` whether its connector
/// connects without OAuth (see [`NoticeConnector::grantless`]),
/// `disconnected` whether an admin disconnected the connection (documents
/// waiting behind a disconnect are not a revoked access).
pub fn compose(
    incident: &IncidentRow,
    tenant_name: &str,
    provider: &str,
    grantless: bool,
    disconnected: bool,
    cfg: &MailConfig,
) -> Email {
    let more = usize::try_from(incident.more_documents).unwrap_or(0);
    let n = incident.documents.len() + more;
    let mut docs = incident.documents.join(", ");
    if more > 0 {
        docs.push_str(&format!(" and {more} more"));
    }
    let plural = if n == 1 { "document" } else { "documents" };
    let these = if n == 1 { "This" } else { "These" };
    let these_lc = if n == 1 { "this" } else { "these" };
    let waiting = if n == 1 { "is waiting" } else { "are waiting" };
    let them = if n == 1 { "it" } else { "them" };
    let base = cfg.integrations_url.trim_end_matches('/');
    let (subject, what, todo, link_label, link) = match incident.kind.as_str() {
        "paused-mapping" => (
            format!("Action needed: {n} {plural} waiting for account mapping in {provider}"),
            format!(
                "{these} {plural} could not be sent to {provider} because some line types are not mapped to an account yet, or the mappings must be checked first (see above)."
            ),
            format!(
                "Open the Integrations page, choose Configure on the {provider} card, map the line types listed above (or check the accounts shown) and save. The waiting {plural} will then be sent automatically; you do not need to do anything else."
            ),
            "Map accounts",
            format!("{base}/integrations?configure={}", incident.connection_id),
        ),
        "paused-reauth" if disconnected => (
            format!("{n} {plural} waiting: {provider} is disconnected"),
            format!(
                "{provider} was disconnected from ledgerport on the Integrations page, so {these_lc} {plural} {waiting} to be sent."
            ),
            format!(
                "If you do not want {them} sent, nothing needs doing. To send {them}, open the Integrations page and choose Connect on the {provider} card: the waiting {plural} will then be sent automatically."
            ),
            "Open Integrations",
            format!("{base}/integrations"),
        ),
        "paused-reauth" if grantless => (
            format!("Action needed: fix the {provider} connection ({n} {plural} waiting)"),
            format!(
                "ledgerport cannot send to {provider} with the connection's current settings, so {these_lc} {plural} {waiting}."
            ),
            format!(
                "Open the Integrations page, correct the settings on the {provider} card as described above, then choose Connect on the card. The waiting {plural} will be sent automatically once it is connected again."
            ),
            "Fix the connection",
            format!("{base}/integrations"),
        ),
        "paused-reauth" => (
            format!("Action needed: reconnect {provider} ({n} {plural} waiting)"),
            format!(
                "{provider} no longer accepts ledgerport's access to your organisation (the connection was revoked or has expired), so {these_lc} {plural} {waiting}."
            ),
            format!(
                "Open the Integrations page and choose Connect on the {provider} card. The waiting {plural} will be sent automatically once you have reconnected."
            ),
            "Reconnect",
            format!("{base}/integrations"),
        ),
        "retries-exhausted" => (
            format!("{n} {plural} could not be sent to {provider}"),
            format!(
                "ledgerport tried to send {these_lc} {plural} to {provider} several times and {provider} kept failing."
            ),
            format!(
                "Check {provider}'s status page; then use Retry on the Integrations page. If it keeps failing, contact support and quote the document numbers above."
            ),
            "Open the delivery log",
            format!("{base}/integrations?log=failed#log-heading"),
        ),
        _ => (
            format!("{n} {plural} could not be sent to {provider}"),
            format!(
                "{provider} refused {these_lc} {plural}; sending {them} again unchanged will not help."
            ),
            format!(
                "Read what {provider} said above, fix it there or in your mapping, then use Retry on the Integrations page. If you are unsure, contact support and quote the document numbers above."
            ),
            "Open the delivery log",
            format!("{base}/integrations?log=failed#log-heading"),
        ),
    };
    let pdf_note = "Your PDF copies still arrive by e-mail as always; only the copy in your accounting system is missing.";
    let mut text =
        format!("Hello {tenant_name} team,\n\n{what}\n\nDocuments: {docs}\n\nWhat went wrong:\n");
    for d in &incident.details {
        text.push_str(&format!("  - {d}\n"));
    }
    text.push_str(&format!("\nWhat to do: {todo}\n\n{link_label}: {link}\n\n{pdf_note}\n\n-- ledgerport, on behalf of your EOR platform\n"));
    let mut html = format!(
        "<!doctype html><html><body style=\"font-family:sans-serif\"><p>Hello {} team,</p><p>{}</p><p><b>Documents:</b> {}</p><p><b>What went wrong:</b></p><ul>",
        esc(tenant_name),
        esc(&what),
        esc(&docs)
    );
    for d in &incident.details {
        html.push_str(&format!("<li>{}</li>", esc(d)));
    }
    html.push_str(&format!(
        "</ul><p><b>What to do:</b> {}</p><p><a href=\"{}\">{}</a></p><p style=\"color:#555\">{}</p></body></html>",
        esc(&todo),
        esc(&link),
        esc(link_label),
        esc(pdf_note)
    ));
    Email {
        subject,
        text,
        html,
    }
}

/// Sends mail over SMTP.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    /// A mailer for `cfg`.
    pub fn new(cfg: &MailConfig) -> anyhow::Result<Self> {
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.smtp_host)
            .port(cfg.smtp_port)
            .timeout(Some(Duration::from_secs(10)));
        if cfg.starttls {
            let params =
                lettre::transport::smtp::client::TlsParameters::new(cfg.smtp_host.clone())?;
            b = b.tls(Tls::Required(params));
        }
        if let Some((u, p)) = &cfg.credentials {
            b = b.credentials(lettre::transport::smtp::authentication::Credentials::new(
                u.clone(),
                p.clone(),
            ));
        }
        Ok(Self {
            transport: b.build(),
            from: cfg
                .from
                .parse()
                .map_err(|e| anyhow::anyhow!("mail `from` {:?}: {e}", cfg.from))?,
        })
    }

    /// Send one e-mail to `to`.
    /// Send one message to `to`. An address that cannot be parsed is left
    /// out (the others still get it); none left, or the server refusing it
    /// for good (an SMTP 5xx: unknown mailbox, policy), is a permanent
    /// [`SendError`]; anything else (server down, 4xx) a temporary one.
    pub async fn send(
        &self,
        to: &[String],
        subject: &str,
        text: &str,
        html: &str,
    ) -> Result<(), SendError> {
        let mut b = Message::builder().from(self.from.clone()).subject(subject);
        let mut any = false;
        for t in to {
            match t.parse() {
                Ok(a) => {
                    b = b.to(a);
                    any = true;
                }
                Err(e) => {
                    tracing::warn!(recipient = %t, error = %e, "a notice address is not an e-mail address; left out")
                }
            }
        }
        if !any {
            return Err(SendError {
                message: format!("no recipient is an e-mail address ({})", to.join(", ")),
                permanent: true,
                replied: false,
            });
        }
        let msg = b
            .multipart(MultiPart::alternative_plain_html(
                text.to_string(),
                html.to_string(),
            ))
            .map_err(|e| SendError {
                message: e.to_string(),
                permanent: true,
                replied: false,
            })?;
        self.transport
            .send(msg)
            .await
            .map(|_| ())
            .map_err(|e| SendError {
                permanent: e.is_permanent(),
                replied: e.is_permanent() || e.is_transient(),
                message: e.to_string(),
            })
    }
}

/// Why a notice was not sent.
#[derive(Debug, Clone)]
pub struct SendError {
    /// What the SMTP server or the message builder said.
    pub message: String,
    /// Whether sending it again cannot help (a 5xx answer, no usable
    /// recipient): the notice is then given up, not retried for ever.
    pub permanent: bool,
    /// Whether the SMTP server answered (a 4xx or 5xx reply), rather than
    /// not being reached at all: only then is a refusal possibly about one
    /// of several addresses.
    pub replied: bool,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// How long a notice waits after its `attempts`-th failed try: 5 s, 10 s,
/// 20 s ... capped at 5 minutes.
fn retry_wait_ms(attempts: i64) -> i64 {
    (5_000i64 << attempts.clamp(0, 6)).min(300_000)
}

/// The `next_attempt_at` of a notice given up: never claimed again (it
/// stays in the outbox, unsent, with its error, for an operator to see,
/// until retention removes it).
pub const GIVEN_UP: i64 = i64::MAX / 2;

/// Attempts after which a notice the server refuses for good (a 5xx) is
/// given up: about a day at the 5-minute cap of the retry wait.
pub const GIVE_UP_AFTER: i64 = 300;

/// How long one notice may take to be sent to its addresses one by one:
/// half its claim ([`MAIL_LEASE_MS`]), so no other daemon takes it meanwhile.
const MAIL_RESEND_BUDGET: Duration = Duration::from_millis(MAIL_LEASE_MS as u64 / 2);

/// Mails one round sends at most.
const MAILS_PER_ROUND: usize = 50;

/// How long one round may go on claiming mails.
const MAIL_ROUND: Duration = Duration::from_secs(15);

/// How long a claimed mail is this daemon's to send (its SMTP exchange is
/// bounded by 10 s a command): another daemon sends it only after that.
const MAIL_LEASE_MS: i64 = 120_000;

/// Turn due incidents into queued mails, then send what is due.
/// Returns (mails queued, mails sent).
pub async fn pump(
    store: &Store,
    mailer: &Mailer,
    cfg: &MailConfig,
    now_ms: i64,
) -> anyhow::Result<(usize, usize)> {
    let mut queued = 0;
    for inc in store.due_incidents(now_ms).await? {
        // A storage error is this round's failure (the incident stays due),
        // not "no address": that would mark it told and lose the notice.
        let tenant = store.tenant(&inc.tenant_id).await?;
        let (name, emails) = match tenant {
            Some(t) => (t.name, t.emails),
            None => (inc.tenant_id.clone(), Vec::new()),
        };
        if emails.is_empty() {
            if store.tell_incident(&inc, None, now_ms).await? {
                tracing::warn!(tenant = %inc.tenant_id, kind = %inc.kind, "no notification address for this tenant; incident not e-mailed");
            }
            continue;
        }
        // The connection row outlives a disconnect, so its connector is
        // known; without it the notice says "your accounting system"
        // rather than an id the customer has never seen.
        let connection = store.connection(&inc.connection_id).await?;
        let disconnected = connection
            .as_ref()
            .is_some_and(|c| c.state == crate::store::ConnectionState::Disconnected);
        let connector = connection.map(|c| c.connector_id);
        let provider = match &connector {
            Some(id) => cfg.provider_name(id),
            None => "your accounting system",
        };
        let grantless = connector
            .as_ref()
            .and_then(|id| cfg.connectors.get(id))
            .is_some_and(|c| c.grantless);
        let email = compose(&inc, &name, provider, grantless, disconnected, cfg);
        let mail = NewMail {
            recipients: emails,
            subject: email.subject,
            text: email.text,
            html: email.html,
        };
        if store.tell_incident(&inc, Some(&mail), now_ms).await? {
            queued += 1;
        }
    }
    let mut sent = 0;
    let round = std::time::Instant::now();
    for _ in 0..MAILS_PER_ROUND {
        // A round against a slow SMTP server ends early (the daemon's
        // shutdown waits for it); the rest go in the next one.
        if round.elapsed() > MAIL_ROUND {
            break;
        }
        // The clock as the mail is claimed, not as the round began: a
        // lease taken late in a long round must still run its length, and
        // a failed send's next try is counted from its failure.
        let now_ms = now_ms.max(crate::dispatch::now_ms());
        let Some(m) = store.claim_due_mail(now_ms, now_ms + MAIL_LEASE_MS).await? else {
            break;
        };
        let result = mailer
            .send(&m.recipients, &m.subject, &m.text_body, &m.html_body)
            .await;
        let e = match result {
            Ok(()) => {
                store.mail_result(&m.id, now_ms, Ok(())).await?;
                sent += 1;
                continue;
            }
            Err(e) => e,
        };
        // Refused with several recipients (lettre gives up on the whole
        // message when one RCPT is refused, for good or for now: a full
        // mailbox, greylisting): one at a time, within half the lease, so
        // the good addresses still get it.
        // Only when the server answered: one that cannot be reached is
        // not asked again once per address.
        if e.replied && m.recipients.len() > 1 {
            let started = std::time::Instant::now();
            let (mut delivered, mut owed, mut refused) = (0, Vec::new(), Vec::new());
            for (i, r) in m.recipients.iter().enumerate() {
                if started.elapsed() > MAIL_RESEND_BUDGET {
                    owed.extend(m.recipients[i..].iter().cloned());
                    break;
                }
                match mailer
                    .send(
                        std::slice::from_ref(r),
                        &m.subject,
                        &m.text_body,
                        &m.html_body,
                    )
                    .await
                {
                    Ok(()) => delivered += 1,
                    Err(e) if e.permanent => refused.push(format!("{r}: {e}")),
                    Err(_) => owed.push(r.clone()),
                }
            }
            // The server takes this mail: what it refused for good are bad
            // addresses, dropped; what failed for now is still owed.
            if delivered > 0 {
                if !refused.is_empty() {
                    tracing::warn!(refused = %refused.join("; "), "a notice was refused for some of its addresses; sent to the others");
                }
                if owed.is_empty() {
                    store.mail_result(&m.id, now_ms, Ok(())).await?;
                } else {
                    let backoff = retry_wait_ms(m.attempts);
                    store
                        .mail_owed(&m.id, &owed, &e.message, now_ms + backoff)
                        .await?;
                }
                sent += 1;
                continue;
            }
        }
        match e {
            // A 5xx may be the address (gone) or the server's setup (a
            // rotated password, a refused sender): retried like any failure
            // for about a day, then given up, kept with its error.
            e if e.permanent && m.attempts + 1 >= GIVE_UP_AFTER => {
                tracing::error!(error = %e, attempts = m.attempts + 1, "the SMTP server has refused a notice for a day; it is given up (it stays unsent in the outbox, with its error)");
                crate::metrics::SMTP_FAILURES.inc();
                store
                    .mail_result(&m.id, now_ms, Err((format!("given up: {e}"), GIVEN_UP)))
                    .await?;
            }
            e => {
                let backoff = retry_wait_ms(m.attempts);
                tracing::warn!(error = %e, attempts = m.attempts + 1, "sending a notice failed; will retry");
                crate::metrics::SMTP_FAILURES.inc();
                store
                    .mail_result(&m.id, now_ms, Err((e.message, now_ms + backoff)))
                    .await?;
            }
        }
    }
    Ok((queued, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MailConfig {
        MailConfig {
            smtp_host: "127.0.0.1".into(),
            smtp_port: 25,
            starttls: false,
            credentials: None,
            from: "ledgerport@platform.example".into(),
            integrations_url: "https://platform.example/".into(),
            connectors: [("xero", "Xero", false), ("webhook", "JSON webhook", true)]
                .into_iter()
                .map(|(id, name, grantless)| {
                    (
                        id.to_string(),
                        NoticeConnector {
                            name: name.into(),
                            grantless,
                        },
                    )
                })
                .collect(),
        }
    }

    fn incident(kind: &str) -> IncidentRow {
        IncidentRow {
            id: "inc-1".into(),
            tenant_id: "acme".into(),
            connection_id: "conn-1".into(),
            kind: kind.into(),
            documents: vec!["INV-1".into(), "INV-2".into()],
            details: vec!["the endpoint answered 500".into()],
            more_documents: 0,
            read_as: Default::default(),
        }
    }

    #[test]
    fn a_notice_names_the_connector_its_documents_were_for() {
        let cfg = config();
        assert_eq!(cfg.provider_name("xero"), "Xero");
        assert_eq!(cfg.provider_name("webhook"), "JSON webhook");
        // A connector no longer installed is named by its id.
        assert_eq!(cfg.provider_name("acme-books"), "acme-books");
        for kind in [
            "paused-mapping",
            "paused-reauth",
            "retries-exhausted",
            "failed",
        ] {
            let m = compose(
                &incident(kind),
                "Acme",
                cfg.provider_name("webhook"),
                true,
                false,
                &cfg,
            );
            assert!(m.subject.contains("JSON webhook"), "{kind}: {}", m.subject);
            assert!(!m.subject.contains("Xero"), "{kind}: {}", m.subject);
            assert!(!m.text.contains("Xero"), "{kind}: {}", m.text);
            assert!(m.text.contains("INV-1") && m.text.contains("INV-2"));
        }
    }

    /// An incident's documents past those it names are counted in the
    /// subject and said in the list.
    #[test]
    fn a_notice_counts_the_documents_it_does_not_name() {
        let cfg = config();
        let mut inc = incident("paused-mapping");
        inc.more_documents = 5;
        let m = compose(&inc, "Acme", "Xero", false, false, &cfg);
        assert!(m.subject.contains("7 documents"), "{}", m.subject);
        assert!(m.text.contains("INV-1, INV-2 and 5 more"), "{}", m.text);
        assert!(m.html.contains("INV-1, INV-2 and 5 more"), "{}", m.html);
    }

    #[test]
    fn a_paused_connection_without_oauth_asks_for_its_settings_not_a_reauthorisation() {
        let cfg = config();
        let mut inc = incident("paused-reauth");
        inc.details = vec!["set the connection setting `signing_secret`".into()];
        let grant = compose(&inc, "Acme", "Xero", false, false, &cfg);
        assert!(grant.subject.starts_with("Action needed: reconnect Xero"));
        assert!(grant.text.contains("no longer accepts ledgerport's access"));
        let settings = compose(&inc, "Acme", "JSON webhook", true, false, &cfg);
        // Disconnected by an admin: said so, not "access revoked".
        let away = compose(&inc, "Acme", "Xero", false, true, &cfg);
        assert_eq!(away.subject, "2 documents waiting: Xero is disconnected");
        assert!(!away.text.contains("no longer accepts"), "{}", away.text);
        assert!(away.text.contains("choose Connect"), "{}", away.text);
        assert_eq!(
            settings.subject,
            "Action needed: fix the JSON webhook connection (2 documents waiting)"
        );
        assert!(!settings.text.contains("access"), "{}", settings.text);
        assert!(
            settings
                .text
                .contains("correct the settings on the JSON webhook card")
        );
        assert!(
            settings.text.contains("`signing_secret`"),
            "what went wrong is quoted"
        );
        assert!(settings.html.contains("Fix the connection"));
    }
}
