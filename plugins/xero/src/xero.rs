//! Talking to Xero's Accounting API through the host: the tenant header,
//! credentials, idempotency keys, and the translation of every answer that
//! is not a success into one of the contract's outcomes.

use ledgerport_sdk::http::{self, RequestBuilder, Response};
use ledgerport_sdk::{DeliveryError, FieldError, connection, errors};
use serde_json::Value;

/// The Accounting API's base. The operator may point the host elsewhere
/// (e.g. the simulator); the connector always uses Xero's real URL.
pub const API: &str = "https://api.xero.com/api.xro/2.0";

/// Bills or supplier credit notes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// `ACCPAY` invoices.
    Bill,
    /// `ACCPAYCREDIT` credit notes.
    Credit,
}

impl Which {
    /// The API path.
    pub fn path(self) -> &'static str {
        match self {
            Which::Bill => "/Invoices",
            Which::Credit => "/CreditNotes",
        }
    }
    /// The envelope's collection key.
    pub fn collection(self) -> &'static str {
        match self {
            Which::Bill => "Invoices",
            Which::Credit => "CreditNotes",
        }
    }
    /// The id field.
    pub fn id_field(self) -> &'static str {
        match self {
            Which::Bill => "InvoiceID",
            Which::Credit => "CreditNoteID",
        }
    }
    /// The number field.
    pub fn number_field(self) -> &'static str {
        match self {
            Which::Bill => "InvoiceNumber",
            Which::Credit => "CreditNoteNumber",
        }
    }
    /// Xero's type code.
    pub fn xero_type(self) -> &'static str {
        match self {
            Which::Bill => "ACCPAY",
            Which::Credit => "ACCPAYCREDIT",
        }
    }
    /// For people.
    pub fn noun(self) -> &'static str {
        match self {
            Which::Bill => "bill",
            Which::Credit => "credit note",
        }
    }
    /// A link that opens the document in Xero. With the organisation's
    /// short code it goes through Xero's organisation login, so it opens
    /// in the right organisation for someone who works in several (an
    /// accountant); without, in whichever organisation they last used.
    pub fn deep_link(self, id: &str, short_code: Option<&str>) -> String {
        let page = match self {
            Which::Bill => format!("/AccountsPayable/View.aspx?InvoiceID={}", encode(id)),
            Which::Credit => format!(
                "/AccountsPayable/ViewCreditNote.aspx?creditNoteID={}",
                encode(id)
            ),
        };
        match short_code {
            Some(code) => format!(
                "https://go.xero.com/organisationlogin/default.aspx?shortcode={}&redirecturl={}",
                encode(code),
                encode(&page)
            ),
            None => format!("https://go.xero.com{page}"),
        }
    }
}

/// Percent-encode for a URL path segment or query value.
pub fn encode(s: &str) -> String {
    http::encode(s)
}

/// Escape a value inside a double-quoted `where` string literal. Xero's
/// `where` is .NET Dynamic LINQ: a quote is written twice and a backslash
/// is an ordinary character (`\"` is a syntax error there).
pub fn quote(s: &str) -> String {
    s.replace('"', "\"\"")
}

/// A client bound to the connection's Xero organisation.
pub struct Api {
    /// The organisation's id (Xero's tenant id).
    pub tenant: String,
    status: Option<String>,
}

impl Api {
    /// Bind to the connection's organisation, or ask for a reconnect.
    pub fn connect() -> Result<Self, DeliveryError> {
        let info = connection::info();
        let status = connection::setting(&info, "status");
        match info.external_tenant_id {
            Some(t) if !t.is_empty() => Ok(Self { status, tenant: t }),
            _ => Err(errors::needs_reauth(
                "the connection has no Xero organisation selected; connect Xero again and pick one",
            )),
        }
    }

    /// The connection's `status` setting, as configured (read once, with
    /// the organisation, instead of asking the host again).
    pub fn status_setting(&self) -> Option<&str> {
        self.status.as_deref()
    }

    fn request(&self, rb: RequestBuilder) -> RequestBuilder {
        rb.header("xero-tenant-id", &self.tenant)
            .header("accept", "application/json")
            .with_credentials()
    }

    fn send(&self, rb: RequestBuilder) -> Result<Response, DeliveryError> {
        let resp = self.request(rb).send().map_err(errors::from_http)?;
        if resp.is_success() {
            Ok(resp)
        } else {
            Err(classify(&resp))
        }
    }

    fn parse(resp: Response) -> Result<Value, DeliveryError> {
        resp.json::<Value>().map_err(|e| {
            errors::transient(format!(
                "Xero answered {} with a body that is not JSON ({e}): {}",
                resp.status,
                snippet(&resp.text())
            ))
        })
    }

    /// GET a JSON resource (path relative to the API base).
    pub fn get_json(&self, path: &str) -> Result<Value, DeliveryError> {
        Self::parse(self.send(http::get(format!("{API}{path}")))?)
    }

    /// GET one invoice or credit note by id.
    pub fn get_one(&self, which: Which, id: &str) -> Result<Value, DeliveryError> {
        let v = self.get_json(&format!("{}/{}", which.path(), encode(id)))?;
        v.get(which.collection())
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .cloned()
            .ok_or_else(|| errors::transient(format!("Xero did not return {} {id}", which.noun())))
    }

    /// PUT JSON (create), with an idempotency key when given.
    pub fn put_json(
        &self,
        path: &str,
        body: &impl serde::Serialize,
        key: Option<&str>,
    ) -> Result<Value, DeliveryError> {
        let mut rb = http::put(format!("{API}{path}")).json(body);
        if let Some(k) = key {
            rb = rb.header("idempotency-key", idempotency_key(k));
        }
        Self::parse(self.send(rb)?)
    }

    /// PUT raw bytes (attachments).
    pub fn put_bytes(
        &self,
        path: &str,
        bytes: Vec<u8>,
        content_type: &str,
        key: &str,
    ) -> Result<Value, DeliveryError> {
        let rb = http::put(format!("{API}{path}"))
            .header("content-type", content_type)
            .header("idempotency-key", idempotency_key(key))
            .body(bytes);
        Self::parse(self.send(rb)?)
    }
}

/// A stable 64-bit digest of a request body (FNV-1a): the same bytes give
/// the same digest in every build and on every machine.
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Xero accepts idempotency keys up to 128 characters: keep the last 128
/// bytes at most, starting on a character boundary (a key is any string).
fn idempotency_key(k: &str) -> String {
    let mut start = k.len().saturating_sub(128);
    while !k.is_char_boundary(start) {
        start += 1;
    }
    k[start..].to_string()
}

fn snippet(s: &str) -> String {
    let mut end = s.len().min(500);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Map a non-2xx answer to an outcome of the contract.
pub fn classify(resp: &Response) -> DeliveryError {
    let text = resp.text();
    let body: Option<Value> = serde_json::from_str(&text).ok();
    match resp.status {
        400 => {
            let Some(b) = body else {
                return errors::rejected(
                    "document",
                    format!("Xero refused the request: {}", snippet(&text)),
                    Some(snippet(&text)),
                );
            };
            let mut out: Vec<FieldError> = Vec::new();
            collect_validation(&b, "document", &mut out);
            if out.is_empty() {
                let msg = b
                    .get("Message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let detail = b
                    .get("Detail")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let raw = if msg.is_empty() { detail } else { msg };
                let raw = if raw.is_empty() { snippet(&text) } else { raw };
                out.push(errors::field(
                    "document",
                    format!("Xero refused the request: {raw}"),
                    Some(raw.clone()),
                ));
            }
            DeliveryError::Rejected(out)
        }
        401 => errors::needs_reauth(
            "Xero did not accept the connection's token even after a refresh; reconnect Xero",
        ),
        403 => {
            let detail = body
                .as_ref()
                .and_then(|b| b.get("Detail").and_then(Value::as_str))
                .unwrap_or("Forbidden")
                .to_string();
            errors::needs_reauth(format!(
                "Xero refused access to the organisation ({detail}); reconnect Xero and pick the organisation again"
            ))
        }
        404 => errors::transient(format!("Xero answered 404 Not Found: {}", snippet(&text))),
        429 => {
            // Xero's words for the limit ("minute", "daily", "concurrent",
            // "appminute") are compared and passed on in lower case,
            // whatever case they arrive in.
            let limit = resp
                .header("x-rate-limit-problem")
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .unwrap_or("unknown")
                .to_ascii_lowercase();
            let secs = resp
                .header("retry-after")
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or_else(|| fallback_wait(&limit));
            errors::rate_limited(secs, limit)
        }
        503 => errors::transient(format!("Xero is unavailable (503): {}", snippet(&text))),
        s if s >= 500 => errors::transient(format!("Xero answered {s}: {}", snippet(&text))),
        s => errors::rejected(
            "document",
            format!("Xero answered {s}, which ledgerport does not expect"),
            Some(snippet(&text)),
        ),
    }
}

/// Seconds to wait after a 429 that came without `Retry-After`.
/// - `concurrent` (5 calls at once): one finishing is a matter of moments.
/// - `daily` (calls per organisation per day, over a rolling 24 hours):
///   nothing frees up within a minute, and trying every minute would spend
///   the day's first calls on refusals; an hour, so the wait is bounded
///   (the connector has no clock to count to a reset it cannot see).
/// - anything else (`minute`, `appminute`, unknown): a minute.
pub fn fallback_wait(limit: &str) -> u32 {
    match limit {
        "concurrent" => 2,
        "daily" | "day" => 3600,
        _ => 60,
    }
}

/// Every `ValidationErrors[].Message` in a Xero error body.
fn collect_validation(v: &Value, field: &str, out: &mut Vec<FieldError>) {
    if let Some(errs) = v.get("ValidationErrors").and_then(Value::as_array) {
        for e in errs {
            if let Some(m) = e.get("Message").and_then(Value::as_str) {
                out.push(errors::field(
                    field,
                    format!("Xero: {m}"),
                    Some(m.to_string()),
                ));
            }
        }
    }
    if let Some(elements) = v.get("Elements").and_then(Value::as_array) {
        for el in elements {
            collect_validation(el, field, out);
            if let Some(lines) = el.get("LineItems").and_then(Value::as_array) {
                for (i, li) in lines.iter().enumerate() {
                    collect_validation(li, &format!("lines[{i}]"), out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn too_many(headers: &[(&str, &str)]) -> (u32, String) {
        let resp = Response {
            status: 429,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
        };
        match classify(&resp) {
            DeliveryError::RateLimited(rl) => (rl.retry_after_seconds, rl.limit),
            other => panic!("{other:?}"),
        }
    }

    /// The limit's name is compared whatever its case: "Concurrent" is a
    /// moment's wait, not a minute; a daily limit without Retry-After is
    /// not tried again within the minute.
    #[test]
    fn rate_limit_problem_is_read_whatever_its_case() {
        assert_eq!(
            too_many(&[("x-rate-limit-problem", "Concurrent")]),
            (2, "concurrent".into())
        );
        assert_eq!(
            too_many(&[("x-rate-limit-problem", " DAILY ")]),
            (3600, "daily".into())
        );
        assert_eq!(
            too_many(&[("x-rate-limit-problem", "Minute")]),
            (60, "minute".into())
        );
        // Retry-After, when given, wins.
        assert_eq!(
            too_many(&[("x-rate-limit-problem", "Daily"), ("retry-after", "5400")]),
            (5400, "daily".into())
        );
        assert_eq!(too_many(&[]), (60, "unknown".into()));
    }
}
