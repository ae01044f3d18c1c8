//! The Xero connector. The platform is the supplier: its invoices become
//! bills (`ACCPAY`) and its credit notes supplier credit notes
//! (`ACCPAYCREDIT`) in the customer's Xero, each line on the account the
//! admin mapped for its kind.
//!
//! Exactly once: before creating, the connector looks for a document it (or
//! anyone) already created for this number and supplier; creates carry an
//! `Idempotency-Key` derived from the host's delivery key. Xero keeps those
//! keys for minutes only and bill numbers are not unique there, so the
//! look-up is what makes a retry after a crash safe.
//!
//! A credit note names the bill it corrects in its history (a note), as
//! Xero keeps no `Reference` on a supplier credit note, and is allocated
//! to that bill when both are approved.
//!
//! Connection settings (all optional):
//! - `status`: `DRAFT`, `SUBMITTED` or `AUTHORISED` (default `AUTHORISED`:
//!   the document is already issued and final, its amounts are exact, and
//!   Xero allocates credit only between authorised documents; choose `DRAFT`
//!   for a review-first workflow).

mod amounts;
mod xero;

use amounts::Amount;
use ledgerport_sdk::mapping::AccountMapping;
use ledgerport_sdk::{
    Account, AccountList, CheckReport, Connector, ConnectorInfo, Delivery, DeliveryError, Document,
    DocumentKind, Pdf, Receipt, TaxBasis, TaxRate, errors, kv, log,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use xero::{Api, Which};

/// Xero's limit on a line description.
const MAX_DESCRIPTION: usize = 4000;
/// Xero's limit on an invoice / credit note number.
const MAX_NUMBER: usize = 255;

/// The connector (public so native tests and benchmarks can call it).
pub struct Xero;

/// Account types a bill line may be posted to.
const BILL_ACCOUNT_TYPES: &[&str] = &[
    "EXPENSE",
    "OVERHEADS",
    "DIRECTCOSTS",
    // Australian organisations' payroll accounts ("477 Wages and
    // Salaries", "478 Superannuation" in Xero's default chart): where an
    // employer-of-record bill's salary lines belong. Not in the OpenAPI
    // enum, which lists only `PAYG`; named on Xero's Account Types page.
    "WAGESEXPENSE",
    "SUPERANNUATIONEXPENSE",
    "SUPERANNUATIONLIABILITY",
    "PAYGLIABILITY",
    "CURRLIAB",
    "LIABILITY",
    "TERMLIAB",
    "FIXED",
    "CURRENT",
    "PREPAYMENT",
    "NONCURRENT",
    "INVENTORY",
];

impl Connector for Xero {
    fn describe() -> ConnectorInfo {
        ConnectorInfo {
            id: "xero".into(),
            name: "Xero".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            document_kinds: vec![DocumentKind::Invoice, DocumentKind::CreditNote],
        }
    }

    fn list_accounts() -> Result<AccountList, DeliveryError> {
        let api = Api::connect()?;
        let accounts = api.get_json("/Accounts?where=Status%3D%3D%22ACTIVE%22")?;
        let mut out = Vec::new();
        for a in items(&accounts, "Accounts") {
            let ty = s(a, "Type");
            if !BILL_ACCOUNT_TYPES.contains(&ty.as_str()) || s(a, "Status") != "ACTIVE" {
                continue;
            }
            // System accounts (Accounts Receivable and Payable, the tax
            // control account, historical adjustment...) are kept by Xero
            // itself: no bill line belongs on them.
            if !s(a, "SystemAccount").is_empty() {
                continue;
            }
            let code = s(a, "Code");
            if code.is_empty() {
                continue;
            }
            out.push(Account {
                code,
                name: s(a, "Name"),
                account_type: ty,
                tax_type: Some(s(a, "TaxType")).filter(|t| !t.is_empty()),
                description: Some(s(a, "Description")).filter(|t| !t.is_empty()),
            });
        }
        let rates = api.get_json("/TaxRates")?;
        let mut tax_rates = Vec::new();
        for r in items(&rates, "TaxRates") {
            if s(r, "Status") != "ACTIVE" && !s(r, "Status").is_empty() {
                continue;
            }
            if r.get("CanApplyToExpenses").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            tax_rates.push(TaxRate {
                tax_type: s(r, "TaxType"),
                name: s(r, "Name"),
                rate: r
                    .get("EffectiveRate")
                    .or_else(|| r.get("DisplayTaxRate"))
                    .map(number_text)
                    .unwrap_or_default(),
            });
        }
        Ok(AccountList {
            accounts: out,
            tax_rates,
        })
    }

    fn check() -> Result<CheckReport, DeliveryError> {
        let api = Api::connect()?;
        let org = api.get_json("/Organisation")?;
        let o = items(&org, "Organisations")
            .into_iter()
            .next()
            .ok_or_else(|| errors::transient("Xero returned no organisation"))?;
        let _ = remember_short_code(&api, o);
        Ok(CheckReport {
            organisation_name: s(o, "Name"),
            details: vec![
                format!("base currency {}", s(o, "BaseCurrency")),
                format!("organisation type {}", s(o, "OrganisationType")),
            ],
        })
    }

    fn deliver(delivery: Delivery, doc: Document) -> Result<Receipt, DeliveryError> {
        // Everything that can be checked without Xero comes first, so a
        // document that cannot go is refused before anything is written.
        let mappings = ledgerport_sdk::mapping::resolve(doc.lines.iter().map(|l| l.kind.as_str()))
            .map_err(errors::needs_mapping)?;
        let lines = build_lines(&doc, &mappings)?;
        let api = Api::connect()?;
        let which = match doc.kind {
            DocumentKind::Invoice => Which::Bill,
            DocumentKind::CreditNote => Which::Credit,
        };
        let mut contact_id = supplier_contact(&api, &doc, &delivery)?;
        let mut notes = Vec::new();
        let mut existing = find_existing(&api, which, &doc, &contact_id, &delivery)?;
        let mut made = None;
        if existing.is_none() {
            match create(&api, which, &doc, &contact_id, &delivery, &lines, &mappings) {
                Ok(created) => made = Some(created),
                // The cached contact was archived or merged away in Xero
                // since: look it up again (a merge leaves an active
                // contact with our number or name), or say how to restore it.
                Err(e) if contact_archived(&e) => {
                    kv::delete(&contact_cache_key(&doc));
                    let again = find_or_create_contact(&api, &doc, &delivery)?;
                    if again == contact_id {
                        return Err(e);
                    }
                    contact_id = again;
                    existing = find_existing(&api, which, &doc, &contact_id, &delivery)?;
                    if existing.is_none() {
                        made = Some(create(
                            &api,
                            which,
                            &doc,
                            &contact_id,
                            &delivery,
                            &lines,
                            &mappings,
                        )?);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        // `fresh`: created by this call, so it cannot have an attachment yet.
        let (created, fresh) = match (made, existing) {
            (Some(created), _) => (created, true),
            (None, Some((id, ours))) => {
                if !ours {
                    // A credit note has no Url in Xero to carry our marker,
                    // so ours and one keyed in by hand look the same.
                    let whence = match which {
                        Which::Bill => "",
                        Which::Credit => " (from an earlier attempt, or entered there by hand)",
                    };
                    notes.push(format!(
                        "{} {} from this supplier with the same total was already in Xero{whence}; it was kept and not created again",
                        which.noun(),
                        doc_number(&doc)
                    ));
                }
                log::info(format!(
                    "{} {} already in Xero as {id}",
                    which.noun(),
                    doc_number(&doc)
                ));
                // Created by an earlier attempt whose answer was lost: its
                // count of refusals (see `create`) is done with.
                kv::delete(&refusals_key(&delivery));
                (api.get_one(which, &id)?, false)
            }
            (None, None) => return Err(errors::transient("Xero's answer held no document")),
        };
        let id = s(&created, which.id_field());
        if id.is_empty() {
            return Err(errors::transient("Xero's answer had no document id"));
        }
        if fresh && which == Which::Bill && doc.due_date.is_none() {
            notes.push(format!(
                "the document has no due date, so the bill is due on its issue date ({}) in Xero",
                doc.issue_date
            ));
        }
        // From here on the document is in Xero. A refusal of what follows
        // (an attachment Xero will not take, an allocation it refuses)
        // becomes a note on the receipt: failing the delivery would leave
        // a document in Xero that the delivery log says was not sent, and
        // every retry would be refused the same way. Passing troubles
        // (5xx, 429, a lost token) still fail the attempt: the retry finds
        // the document and finishes the job.
        if let Some(pdf) = &doc.pdf {
            match pdf {
                Pdf::Bytes(bytes) => {
                    if let Err(e) =
                        attach_pdf(&api, which, &id, doc_number(&doc), bytes, &delivery, fresh)
                    {
                        notes.push(after_creation(e, || {
                            format!(
                                "the PDF could not be attached to the {} in Xero",
                                which.noun()
                            )
                        })?);
                    }
                }
                Pdf::Reference(url) => notes.push(format!(
                    "the PDF is served by the platform ({url}) and was not attached in Xero"
                )),
            }
        }
        if fresh {
            // What Xero made of the amounts: the checks in `build_lines`
            // should leave nothing for it to change, so a difference is a
            // surprise worth telling the admin about (it also defeats the
            // look-up of a credit note by its total on a retry).
            let total = Amount::parse(&doc.total);
            let theirs = created.get("Total").and_then(Amount::from_json);
            if let (Some(ours), Some(theirs)) = (total, theirs)
                && ours != theirs
            {
                notes.push(format!(
                    "Xero's total for the {} is {} but the document's is {}; check the {} in Xero",
                    which.noun(),
                    theirs.text(),
                    doc.total,
                    which.noun()
                ));
            }
        }
        if which == Which::Credit
            && let Some(invoice_number) = credited_number(&doc)
        {
            if let Err(e) = note_credited_bill(&api, &id, invoice_number, &delivery, fresh) {
                notes.push(after_creation(e, || {
                    format!(
                        "the credit note is in Xero but the note naming bill {invoice_number} could not be added to its history"
                    )
                })?);
            }
            match allocate(&api, &created, &doc, &contact_id, &delivery) {
                Ok(Some(note)) => notes.push(note),
                Ok(None) => {}
                Err(e) => notes.push(after_creation(e, || {
                    format!(
                        "the credit note is in Xero but could not be allocated to bill {invoice_number}; allocate it in Xero"
                    )
                })?),
            }
        }
        Ok(Receipt {
            external_url: Some(which.deep_link(&id, short_code(&api).as_deref())),
            external_id: id,
            notes,
        })
    }
}

ledgerport_sdk::export_connector!(Xero);

/// A string field of a JSON object ("" when absent).
fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn number_text(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => String::new(),
    }
}

/// The array under `key` in a Xero envelope.
fn items<'a>(v: &'a Value, key: &str) -> Vec<&'a Value> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

/// Cut `s` to `max` bytes without splitting a character.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The document number as Xero keeps it: Xero trims the spaces around a
/// number it stores, so the look-up, the create and the history note use
/// the trimmed number (an untrimmed look-up found nothing and a retry
/// after the idempotency window created a second bill).
fn doc_number(doc: &Document) -> &str {
    doc.number.trim()
}

/// The number of the invoice a credit note corrects, trimmed like
/// [`doc_number`] (the bill in Xero has its number trimmed).
fn credited_number(doc: &Document) -> Option<&str> {
    doc.credits_invoice_number
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
}

/// Cut `s` to `max` characters (Xero's limits count characters).
fn cut_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

/// A line ready for Xero, with the amounts kept exact.
struct LineOut {
    kind: String,
    description: String,
    quantity: Amount,
    unit_amount: Amount,
    tax_amount: Amount,
    line_amount: Amount,
    account_code: String,
    tax_type: Option<String>,
}

fn build_lines(
    doc: &Document,
    mappings: &BTreeMap<String, AccountMapping>,
) -> Result<Vec<LineOut>, DeliveryError> {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    if doc.lines.is_empty() {
        problems.push(errors::field("lines", "the document has no lines", None));
    }
    // Xero's limit is in characters (200 "é" are 400 bytes and fit).
    let number = doc_number(doc);
    if number.is_empty() || number.chars().count() > MAX_NUMBER {
        problems.push(errors::field(
            "number",
            format!("the document number must be 1 to {MAX_NUMBER} characters"),
            None,
        ));
    }
    for (i, l) in doc.lines.iter().enumerate() {
        let mut amount = |name: &str, text: &str| match Amount::parse(text) {
            Some(a) => Some(a),
            None => {
                problems.push(errors::field(
                    &format!("lines[{i}].{name}"),
                    format!("{text:?} is not a decimal amount"),
                    None,
                ));
                None
            }
        };
        let (q, u, t, la) = (
            amount("quantity", &l.quantity),
            amount("unit_amount", &l.unit_amount),
            amount("tax_amount", &l.tax_amount),
            amount("line_amount", &l.line_amount),
        );
        if let Some(u) = &u
            && u.scale() > 4
        {
            problems.push(errors::field(
                &format!("lines[{i}].unit_amount"),
                format!(
                    "Xero accepts unit amounts with at most 4 decimals, not {}",
                    l.unit_amount
                ),
                None,
            ));
        }
        // Xero keeps money to 2 decimal places and would round the rest
        // away (a 3-decimal currency's amounts pass the platform's
        // checks); the bill would then differ from the document.
        for (name, text, a) in [
            ("line_amount", &l.line_amount, &la),
            ("tax_amount", &l.tax_amount, &t),
        ] {
            if let Some(a) = a
                && !a.fits_decimals(2)
            {
                problems.push(errors::field(
                    &format!("lines[{i}].{name}"),
                    format!(
                        "line {} has the {} {text}, with more than 2 decimal places; Xero keeps amounts to 2 decimal places and would round it, so the bill would not match the document",
                        i + 1,
                        name.replace('_', " ")
                    ),
                    None,
                ));
            }
        }
        // With no tax (LineAmountTypes NoTax) Xero drops a line's tax
        // without a word; the platform only checks that the lines' tax
        // adds up to a zero total_tax.
        if doc.tax_basis == TaxBasis::NoTax
            && let Some(t) = &t
            && !t.is_zero()
        {
            problems.push(errors::field(
                &format!("lines[{i}].tax_amount"),
                format!(
                    "line {} carries tax ({}) but the document is marked as having no tax; Xero would drop the line's tax, so the bill would not match the document",
                    i + 1,
                    l.tax_amount
                ),
                None,
            ));
        }
        let (Some(q), Some(u), Some(t), Some(la)) = (q, u, t, la) else {
            continue;
        };
        let Some(m) = mappings.get(&l.kind) else {
            continue;
        };
        let description = if l.description.trim().is_empty() {
            l.kind.clone()
        } else {
            cut_chars(&l.description, MAX_DESCRIPTION).to_string()
        };
        out.push(LineOut {
            kind: l.kind.clone(),
            description,
            quantity: q,
            unit_amount: u,
            tax_amount: t,
            line_amount: la,
            account_code: m.account_code.clone(),
            tax_type: m.tax_type.clone(),
        });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(DeliveryError::Rejected(problems))
    }
}

/// The kv key caching an organisation's short code. Named by the
/// organisation: the host empties a connection's kv when it is switched to
/// another organisation, but a call still running against the old one
/// could write its code after that.
fn short_code_key(organisation: &str) -> String {
    format!("organisation:{organisation}:short-code")
}

/// Keep the short code of `api`'s organisation from an `/Organisation`
/// answer; it, when there is one.
fn remember_short_code(api: &Api, org: &Value) -> Option<String> {
    let code = s(org, "ShortCode");
    if code.is_empty() || code.len() > 32 {
        return None;
    }
    let _ = kv::set_string(&short_code_key(&api.tenant), &code);
    Some(code)
}

/// The organisation's short code, for links that open the right
/// organisation: from kv, else asked of Xero once. A document already
/// created is not failed for it: without it the link is Xero's plain one.
fn short_code(api: &Api) -> Option<String> {
    if let Some(code) = kv::get_string(&short_code_key(&api.tenant)) {
        return Some(code);
    }
    match api.get_json("/Organisation") {
        Ok(org) => remember_short_code(api, items(&org, "Organisations").into_iter().next()?),
        Err(e) => {
            log::info(format!(
                "the organisation's short code could not be read ({e:?}); the link to the document opens Xero's last-used organisation"
            ));
            None
        }
    }
}

/// The kv key caching the supplier's contact id.
fn contact_cache_key(doc: &Document) -> String {
    format!("contact:{}", doc.supplier.id)
}

/// The supplier contact: kv cache, else [`find_or_create_contact`].
fn supplier_contact(
    api: &Api,
    doc: &Document,
    delivery: &Delivery,
) -> Result<String, DeliveryError> {
    if let Some(id) = kv::get_string(&contact_cache_key(doc)) {
        return Ok(id);
    }
    find_or_create_contact(api, doc, delivery)
}

/// Whether Xero refused a new document because its contact is archived
/// (archived by hand, or merged into another contact).
fn contact_archived(e: &DeliveryError) -> bool {
    let DeliveryError::Rejected(errs) = e else {
        return false;
    };
    errs.iter().any(|f| {
        let m = f.provider_message.as_deref().unwrap_or(&f.message);
        m.contains("contact") && m.contains("has been archived")
    })
}

/// The supplier contact, looked up in Xero (by ContactNumber, then by
/// name) or created, and cached. Our contact archived in Xero (by hand,
/// or merged into another) with no active one to use is a refusal that
/// says how to restore it: creating a second contact for the supplier
/// behind the admin's back would undo their tidying.
fn find_or_create_contact(
    api: &Api,
    doc: &Document,
    delivery: &Delivery,
) -> Result<String, DeliveryError> {
    let supplier = &doc.supplier;
    let cache_key = contact_cache_key(doc);
    // Xero trims what it stores: a name or number with spaces around it
    // would never be found again as it was sent.
    let number = cut(supplier.id.trim(), 50).to_string();
    let by_number = api.get_json(&format!(
        "/Contacts?includeArchived=true&where={}",
        xero::encode(&format!("ContactNumber==\"{}\"", xero::quote(&number)))
    ))?;
    let numbered = items(&by_number, "Contacts");
    let mut found = numbered
        .iter()
        .find(|c| s(c, "ContactStatus") != "ARCHIVED")
        .map(|c| s(c, "ContactID"));
    // An archived contact of ours: (its name, found by our number).
    let mut archived = numbered
        .iter()
        .find(|c| s(c, "ContactStatus") == "ARCHIVED")
        .map(|c| (s(c, "Name"), true));
    let mut name = cut(supplier.name.trim(), 255).to_string();
    if found.is_none() {
        // Xero compares strings as they are, but a contact's name is unique
        // whatever its case: "GLOBE EOR LTD" keyed in by hand is the same
        // name (creating ours would be refused as already assigned).
        let by_name = api.get_json(&format!(
            "/Contacts?includeArchived=true&where={}",
            xero::encode(&format!(
                "Name.ToLower()==\"{}\"",
                xero::quote(&name.to_lowercase())
            ))
        ))?;
        let named = items(&by_name, "Contacts");
        // One entered by hand (no number, or ours) and archived since is
        // ours archived too.
        if archived.is_none() {
            archived = named
                .iter()
                .find(|c| {
                    s(c, "ContactStatus") == "ARCHIVED" && {
                        let n = s(c, "ContactNumber");
                        n.is_empty() || n == number
                    }
                })
                .map(|c| (s(c, "Name"), false));
        }
        if let Some(c) = named
            .into_iter()
            .find(|c| s(c, "ContactStatus") != "ARCHIVED")
        {
            let their_number = s(c, "ContactNumber");
            if their_number.is_empty() || their_number == number {
                // The same supplier, entered by hand: adopt it.
                found = Some(s(c, "ContactID"));
            } else {
                // Another contact already has this name: ours gets a name
                // that says which supplier it is.
                name = format!("{} ({number})", cut(supplier.name.trim(), 200));
                log::info(format!(
                    "contact name {:?} is taken by an unrelated contact; using {name:?}",
                    supplier.name
                ));
            }
        }
    }
    let id = match (found, archived) {
        (Some(id), _) => id,
        (None, Some((name, by_number))) => {
            kv::delete(&cache_key);
            let which = if by_number {
                format!(" (contact number {number})")
            } else {
                String::new()
            };
            return Err(errors::rejected(
                "supplier",
                format!(
                    "The supplier's contact \"{name}\"{which} is archived in Xero (archived, or merged into another contact). Restore it in Xero (Contacts > All contacts > Archived > Restore), then retry"
                ),
                None,
            ));
        }
        (None, None) => {
            let mut contact = json!({ "Name": name, "ContactNumber": number, "IsSupplier": true });
            if let Some(e) = &supplier.email {
                contact["EmailAddress"] = json!(e);
            }
            if let Some(t) = &supplier.tax_number {
                contact["TaxNumber"] = json!(t);
            }
            // Keyed by the delivery and the request (rule 4): a replay of
            // this request within Xero's minutes gets the contact it
            // created, and a retry whose body changed (the name taken
            // meanwhile) or that follows a refusal is not refused for the
            // earlier request (see [`keyed_create`]).
            let body = serde_json::to_vec(&json!({ "Contacts": [contact] }))
                .map_err(|e| errors::transient(format!("the request could not be written: {e}")))?;
            let refusals = format!("{}:contact", refusals_key(delivery));
            let key = format!("{}-contact", delivery.key);
            match keyed_create(api, "/Contacts", body, &key, &refusals) {
                Ok(created) => {
                    let c = items(&created, "Contacts")
                        .into_iter()
                        .next()
                        .ok_or_else(|| errors::transient("Xero created no contact"))?;
                    s(c, "ContactID")
                }
                // Another delivery created it a moment ago (Xero refuses a
                // second contact with the same name): use that one.
                Err(DeliveryError::Rejected(errs))
                    if errs.iter().any(|e| e.message.contains("already assigned")) =>
                {
                    let again = api.get_json(&format!(
                        "/Contacts?where={}",
                        xero::encode(&format!("ContactNumber==\"{}\"", xero::quote(&number)))
                    ))?;
                    let id = items(&again, "Contacts")
                        .into_iter()
                        .next()
                        .map(|c| s(c, "ContactID"))
                        .ok_or(DeliveryError::Rejected(errs))?;
                    kv::delete(&refusals);
                    id
                }
                Err(e) => return Err(e),
            }
        }
    };
    if id.is_empty() {
        return Err(errors::transient("Xero returned a contact without an id"));
    }
    let _ = kv::set_string(&cache_key, &id);
    Ok(id)
}

/// Our marker in the document's Url, so a retry recognises its own work
/// (bills only: Xero's credit notes have no Url, and one sent is ignored;
/// a credit note is recognised by number, supplier and total).
fn marker(delivery: &Delivery) -> String {
    format!("ledgerport={}", xero::encode(&delivery.key))
}

fn url_for(doc: &Document, delivery: &Delivery) -> String {
    let base = doc
        .url
        .clone()
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
        .unwrap_or_else(|| "https://ledgerport.invalid/documents".into());
    let base = base.split('#').next().unwrap_or_default().to_string();
    format!("{base}#{}", marker(delivery))
}

/// A document already in Xero for this number and supplier: (id, made by us).
fn find_existing(
    api: &Api,
    which: Which,
    doc: &Document,
    contact_id: &str,
    delivery: &Delivery,
) -> Result<Option<(String, bool)>, DeliveryError> {
    let filter = format!(
        "Type==\"{}\" AND {}==\"{}\" AND Contact.ContactID==guid(\"{}\")",
        which.xero_type(),
        which.number_field(),
        xero::quote(doc_number(doc)),
        xero::quote(contact_id)
    );
    let found = api.get_json(&format!("{}?where={}", which.path(), xero::encode(&filter)))?;
    let mark = marker(delivery);
    let total = Amount::parse(&doc.total);
    let mut same_total = None;
    for d in items(&found, which.collection()) {
        let status = s(d, "Status");
        if status == "DELETED" || status == "VOIDED" {
            continue;
        }
        let id = s(d, which.id_field());
        if s(d, "Url").contains(&mark) {
            return Ok(Some((id, true)));
        }
        if same_total.is_none()
            && total.is_some()
            && d.get("Total").and_then(Amount::from_json) == total
        {
            same_total = Some(id);
        }
    }
    Ok(same_total.map(|id| (id, false)))
}

/// The create request's envelope: `{"Invoices": [..]}` or `{"CreditNotes": [..]}`.
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct Envelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    invoices: Option<[DocumentBody<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credit_notes: Option<[DocumentBody<'a>; 1]>,
}

/// A bill or supplier credit note as Xero's create request wants it
/// (typed, so no JSON tree is built in between).
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct DocumentBody<'a> {
    #[serde(rename = "Type")]
    kind: &'a str,
    contact: ContactRef<'a>,
    date: &'a str,
    currency_code: &'a str,
    line_amount_types: &'a str,
    status: &'a str,
    line_items: Vec<LineItemBody<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    invoice_number: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credit_note_number: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    due_date: Option<&'a str>,
    /// Bills only: Xero's CreditNote has no Url.
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct ContactRef<'a> {
    #[serde(rename = "ContactID")]
    contact_id: &'a str,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct LineItemBody<'a> {
    description: &'a str,
    quantity: Amount,
    unit_amount: Amount,
    line_amount: Amount,
    account_code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tax_amount: Option<Amount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tax_type: Option<&'a str>,
}

fn create(
    api: &Api,
    which: Which,
    doc: &Document,
    contact_id: &str,
    delivery: &Delivery,
    lines: &[LineOut],
    mappings: &BTreeMap<String, AccountMapping>,
) -> Result<Value, DeliveryError> {
    let status = api
        .status_setting()
        .map(|s| s.to_ascii_uppercase())
        .filter(|s| ["DRAFT", "SUBMITTED", "AUTHORISED"].contains(&s.as_str()))
        .unwrap_or_else(|| "AUTHORISED".into());
    let line_items: Vec<LineItemBody> = lines
        .iter()
        .map(|l| LineItemBody {
            description: &l.description,
            quantity: l.quantity,
            unit_amount: l.unit_amount,
            line_amount: l.line_amount,
            account_code: &l.account_code,
            tax_amount: (doc.tax_basis != TaxBasis::NoTax).then_some(l.tax_amount),
            tax_type: l.tax_type.as_deref(),
        })
        .collect();
    let number = cut_chars(doc_number(doc), MAX_NUMBER);
    let url = url_for(doc, delivery);
    let body = DocumentBody {
        kind: which.xero_type(),
        contact: ContactRef { contact_id },
        date: &doc.issue_date,
        currency_code: &doc.currency,
        line_amount_types: match doc.tax_basis {
            TaxBasis::Exclusive => "Exclusive",
            TaxBasis::Inclusive => "Inclusive",
            TaxBasis::NoTax => "NoTax",
        },
        status: &status,
        line_items,
        invoice_number: (which == Which::Bill).then_some(number),
        credit_note_number: (which == Which::Credit).then_some(number),
        // Xero wants a due date on an approved bill: a document without
        // one is due on its issue date (and the receipt says so).
        due_date: (which == Which::Bill)
            .then(|| doc.due_date.as_deref().unwrap_or(&doc.issue_date)),
        url: (which == Which::Bill).then_some(url.as_str()),
    };
    let unitdp4 = lines.iter().any(|l| l.unit_amount.scale() > 2);
    let path = format!(
        "{}?summarizeErrors=true{}",
        which.path(),
        if unitdp4 { "&unitdp=4" } else { "" }
    );
    let envelope = match which {
        Which::Bill => Envelope {
            invoices: Some([body]),
            credit_notes: None,
        },
        Which::Credit => Envelope {
            invoices: None,
            credit_notes: Some([body]),
        },
    };
    let body = serde_json::to_vec(&envelope)
        .map_err(|e| errors::transient(format!("the request could not be written: {e}")))?;
    // The look-up above already found anything an earlier attempt created.
    let answer = keyed_create(
        api,
        &path,
        body,
        &format!("{}-create", delivery.key),
        &refusals_key(delivery),
    )
    .map_err(|e| explain_rejection(e, lines, mappings))?;
    items(&answer, which.collection())
        .into_iter()
        .next()
        .cloned()
        .ok_or_else(|| errors::transient("Xero's answer held no document"))
}

/// The kv key counting a delivery's refused creates (see [`keyed_create`]).
fn refusals_key(delivery: &Delivery) -> String {
    format!("refusals:{}", delivery.key)
}

/// PUT a JSON create under an idempotency key that names the request, not
/// only the delivery: `{key}-{digest of the body}`, then `-{n}` after `n`
/// refusals of it. Xero answers a key reused with another body with 400 for
/// minutes, so a retry whose body changed (a mapping fixed, a name taken
/// meanwhile) would be refused for the earlier request; and it replays a
/// refusal for the same key and body, so a retry after a fix made in Xero
/// itself (a contact restored or renamed, a currency enabled) would be
/// refused again for what was wrong before. The refusals are counted in kv
/// under `refusals` until a create succeeds. A replay within Xero's minutes
/// of a create that succeeded still gets what it created.
fn keyed_create(
    api: &Api,
    path: &str,
    body: Vec<u8>,
    key: &str,
    refusals: &str,
) -> Result<Value, DeliveryError> {
    let refused: u32 = kv::get_string(refusals)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut key = format!("{key}-{:016x}", xero::digest(&body));
    if refused > 0 {
        key.push_str(&format!("-{refused}"));
    }
    match api.put_bytes(path, body, "application/json", &key) {
        Ok(answer) => {
            if refused > 0 {
                kv::delete(refusals);
            }
            Ok(answer)
        }
        Err(e) => {
            if matches!(e, DeliveryError::Rejected(_)) {
                let _ = kv::set_string(refusals, &(refused + 1).to_string());
            }
            Err(e)
        }
    }
}

/// Tie Xero's validation messages to the lines and kinds they concern,
/// in plain words, keeping Xero's text alongside. When every message is
/// about a mapped account code or tax type (archived, deleted, unknown in
/// this organisation) and names the kinds mapped to it, the answer is
/// needs-mapping for those kinds: the host pauses the delivery and resumes
/// it once the admin maps them to something else. Anything else, or a
/// message it cannot tie to a kind, stays a refusal.
fn explain_rejection(
    e: DeliveryError,
    lines: &[LineOut],
    mappings: &BTreeMap<String, AccountMapping>,
) -> DeliveryError {
    let DeliveryError::Rejected(errs) = e else {
        return e;
    };
    let mut out = Vec::new();
    let mut kinds: Vec<String> = Vec::new();
    let mut all_mapping = true;
    for fe in errs {
        let raw = fe
            .provider_message
            .clone()
            .unwrap_or_else(|| fe.message.clone());
        let mut matched = false;
        for (kind, m) in mappings {
            let code = &m.account_code;
            let mentions_code =
                raw.contains(&format!("'{code}'")) || raw.contains(&format!(" {code} "));
            if mentions_code && raw.to_ascii_lowercase().contains("account code") {
                let idx = lines.iter().position(|l| &l.kind == kind).unwrap_or(0);
                let what = if raw.contains("archived") {
                    format!(
                        "Account code {code} is archived in Xero — choose another account for '{kind}'"
                    )
                } else {
                    format!(
                        "Account code {code} does not exist in this Xero organisation — choose another account for '{kind}'"
                    )
                };
                out.push(errors::field(
                    &format!("lines[{idx}].kind"),
                    what,
                    Some(raw.clone()),
                ));
                kinds.push(kind.clone());
                matched = true;
            }
            if let Some(t) = &m.tax_type
                && raw.contains(&format!("'{t}'"))
                && raw.contains("TaxType")
            {
                let idx = lines.iter().position(|l| &l.kind == kind).unwrap_or(0);
                out.push(errors::field(
                    &format!("lines[{idx}].kind"),
                    format!("Tax type {t} cannot be used in this Xero organisation — choose another tax rate for '{kind}'"),
                    Some(raw.clone()),
                ));
                kinds.push(kind.clone());
                matched = true;
            }
        }
        if !matched {
            all_mapping = false;
            let plain = if raw.contains("not subscribed to currency") {
                "This currency is not enabled in the customer's Xero organisation — enable it in Xero (Settings > Currencies), then retry".to_string()
            } else {
                format!("Xero refused the document: {raw}")
            };
            out.push(errors::field(&fe.field, plain, Some(raw)));
        }
    }
    if all_mapping && !kinds.is_empty() {
        // The contract's needs-mapping carries kinds only: Xero's words
        // go to the log.
        for f in &out {
            log::warn(format!(
                "{} (Xero: {})",
                f.message,
                f.provider_message.as_deref().unwrap_or_default()
            ));
        }
        kinds.sort();
        kinds.dedup();
        return errors::needs_mapping(kinds);
    }
    DeliveryError::Rejected(out)
}

/// What to do with an error after the document was created: a refusal
/// becomes a note (`what`, then Xero's reasons); anything else still
/// fails the attempt.
fn after_creation(
    e: DeliveryError,
    what: impl FnOnce() -> String,
) -> Result<String, DeliveryError> {
    match e {
        DeliveryError::Rejected(fields) => {
            let why: Vec<String> = fields
                .iter()
                .map(|f| match &f.provider_message {
                    Some(p) if !p.is_empty() && !f.message.contains(p.as_str()) => {
                        format!("{} (Xero: {p})", f.message)
                    }
                    _ => f.message.clone(),
                })
                .collect();
            Ok(format!("{}: {}", what(), why.join("; ")))
        }
        other => Err(other),
    }
}

/// Attach the PDF unless it is already there. A bill this call created
/// (`fresh`) has no attachments, so the look-up is skipped: one request
/// less per document against the organisation's 60 a minute. A retry finds
/// the bill instead of creating it, so it always looks; and the upload's
/// idempotency key covers a replayed create within Xero's 6 minutes.
fn attach_pdf(
    api: &Api,
    which: Which,
    id: &str,
    number: &str,
    bytes: &[u8],
    delivery: &Delivery,
    fresh: bool,
) -> Result<(), DeliveryError> {
    let file = format!("{}.pdf", cut(number, 200).replace(['/', '\\'], "-"));
    if !fresh {
        let existing = api.get_json(&format!("{}/{id}/Attachments", which.path()))?;
        if items(&existing, "Attachments")
            .iter()
            .any(|a| s(a, "FileName") == file)
        {
            return Ok(());
        }
    }
    api.put_bytes(
        &format!("{}/{id}/Attachments/{}", which.path(), xero::encode(&file)),
        bytes.to_vec(),
        "application/pdf",
        &format!("{}-pdf", delivery.key),
    )?;
    Ok(())
}

/// The history note that names the bill a credit note corrects.
fn credited_bill_note(invoice_number: &str) -> String {
    format!("Credit note for bill {invoice_number} (recorded by ledgerport)")
}

/// Name the corrected bill in the credit note's history. Xero keeps no
/// `Reference` on a supplier credit note (`ACCRECCREDIT only`), and an
/// allocation is made only between approved documents, so without this a
/// draft credit note would not say what it corrects. A credit note this
/// call created (`fresh`) has no note yet; a retry looks first, so the
/// note is added once.
fn note_credited_bill(
    api: &Api,
    credit_id: &str,
    invoice_number: &str,
    delivery: &Delivery,
    fresh: bool,
) -> Result<(), DeliveryError> {
    let details = credited_bill_note(invoice_number);
    let path = format!("/CreditNotes/{}/History", xero::encode(credit_id));
    if !fresh {
        let existing = api.get_json(&path)?;
        if items(&existing, "HistoryRecords")
            .iter()
            .any(|r| s(r, "Details") == details)
        {
            return Ok(());
        }
    }
    api.put_json(
        &path,
        &json!({ "HistoryRecords": [{ "Details": details }] }),
        Some(&format!("{}-history", delivery.key)),
    )?;
    Ok(())
}

/// Allocate a credit note to the bill it credits, up to what is due.
/// Returns a note for the receipt when it could not (fully) be allocated.
fn allocate(
    api: &Api,
    credit: &Value,
    doc: &Document,
    contact_id: &str,
    delivery: &Delivery,
) -> Result<Option<String>, DeliveryError> {
    let Some(invoice_number) = credited_number(doc) else {
        return Ok(None);
    };
    let credit_id = s(credit, "CreditNoteID");
    // Read it again: allocations already made (on an earlier attempt) show here.
    let credit = api.get_one(Which::Credit, &credit_id)?;
    // PAID: fully allocated already (by an earlier attempt of this delivery,
    // or by someone in Xero): nothing left to do, and nothing to explain.
    if s(&credit, "Status") == "PAID" {
        return Ok(None);
    }
    if s(&credit, "Status") != "AUTHORISED" {
        return Ok(Some(format!(
            "the credit note is {} in Xero, so it was not allocated to bill {invoice_number}; allocate it in Xero once approved",
            s(&credit, "Status")
        )));
    }
    let remaining = credit
        .get("RemainingCredit")
        .and_then(Amount::from_json)
        .unwrap_or_default();
    if remaining.is_zero() {
        return Ok(None);
    }
    let filter = format!(
        "Type==\"ACCPAY\" AND InvoiceNumber==\"{}\" AND Contact.ContactID==guid(\"{}\")",
        xero::quote(invoice_number),
        xero::quote(contact_id)
    );
    let bills = api.get_json(&format!("/Invoices?where={}", xero::encode(&filter)))?;
    let all = items(&bills, "Invoices");
    let bill = all
        .iter()
        .filter(|b| matches!(s(b, "Status").as_str(), "AUTHORISED" | "PAID"))
        .max_by_key(|b| {
            b.get("AmountDue")
                .and_then(Amount::from_json)
                .unwrap_or_default()
        });
    let Some(bill) = bill else {
        if let Some(pending) = all
            .iter()
            .find(|b| matches!(s(b, "Status").as_str(), "DRAFT" | "SUBMITTED"))
        {
            return Ok(Some(format!(
                "bill {invoice_number} is {} in Xero, so the credit was left unallocated; allocate it in Xero once the bill is approved",
                s(pending, "Status")
            )));
        }
        return Ok(Some(format!(
            "bill {invoice_number} is not in Xero, so the credit was left unallocated"
        )));
    };
    let due = bill
        .get("AmountDue")
        .and_then(Amount::from_json)
        .unwrap_or_default();
    if due.is_zero() {
        // Paid by this credit note on an earlier attempt whose answer was
        // lost (the bill then PAID, credit left over): say what was
        // allocated, not that nothing was.
        let bill_id = s(bill, "InvoiceID");
        let allocated = items(&credit, "Allocations")
            .into_iter()
            .filter(|a| {
                a.get("Invoice")
                    .is_some_and(|i| s(i, "InvoiceID") == bill_id)
            })
            .filter_map(|a| a.get("Amount").and_then(Amount::from_json))
            .try_fold(Amount::default(), |sum, a| sum.checked_add(&a));
        if let Some(allocated) = allocated.filter(|a| !a.is_zero()) {
            return Ok(Some(format!(
                "{} of the credit was allocated to bill {invoice_number} (all that was due); the rest stays as credit in Xero",
                allocated.text()
            )));
        }
        return Ok(Some(format!(
            "bill {invoice_number} has nothing left to pay, so the credit was left unallocated"
        )));
    }
    let amount = if due < remaining { due } else { remaining };
    let body = json!({ "Allocations": [{
        "Amount": amount,
        "Date": doc.issue_date,
        "Invoice": { "InvoiceID": s(bill, "InvoiceID") },
    }]});
    // Keyed by the delivery and the amount: a replay within Xero's
    // minutes is answered from its key store, not allocated twice (the
    // re-read above covers a retry after that).
    api.put_json(
        &format!("/CreditNotes/{credit_id}/Allocations"),
        &body,
        Some(&format!("{}-allocate-{}", delivery.key, amount.text())),
    )?;
    if amount < remaining {
        Ok(Some(format!(
            "{} of the credit was allocated to bill {invoice_number} (all that was due); the rest stays as credit in Xero",
            amount.text()
        )))
    } else {
        Ok(Some(format!(
            "the credit was allocated to bill {invoice_number}"
        )))
    }
}
