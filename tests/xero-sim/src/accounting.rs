//! The Accounting API (`/api.xro/2.0/...`): organisation, accounts, tax
//! rates, currencies, contacts, invoices, credit notes, attachments and
//! allocations, with Xero's envelopes and validation errors.

use axum::body::Bytes;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

use crate::filter::{eval, parse_where, sort_by_order};
use crate::guard::Ctx;
use crate::model::{
    Allocation, Attachment, CONTACT_STRING_FIELDS, Contact, Doc, DocKind, HistoryRecord, Line,
    TenantData, account_json, tax_rate_json,
};
use crate::state::Shared;
use crate::xjson::{
    as_decimal, ms_date_plain, opt_str, parse_day, str_field, validation_errors,
    validation_exception,
};

type Params = Vec<(String, String)>;
/// One element of a batch write: the rendered resource, or the request element and its errors.
type ElementResult = Result<Value, (Map<String, Value>, Vec<String>)>;
/// A validated contact write: the contact to update (if any) and the element.
/// Xero's refusal of a new invoice or credit note for an archived (or
/// merged-away) contact.
const ARCHIVED_CONTACT: &str = "The contact with the specified contact details has been archived. The contact must be un-archived before creating new invoices or credit notes.";

type ContactPlan = Result<(Option<Uuid>, Map<String, Value>), (Map<String, Value>, Vec<String>)>;

fn params(q: Option<String>) -> Params {
    serde_urlencoded::from_str(&q.unwrap_or_default()).unwrap_or_default()
}

fn qget<'a>(p: &'a Params, key: &str) -> Option<&'a str> {
    p.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.trim().is_empty())
}

fn unitdp4(p: &Params) -> bool {
    qget(p, "unitdp") == Some("4")
}

/// A 200 JSON response.
fn ok_json(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

/// Xero's success envelope around a collection.
fn envelope(shared: &Shared, ctx: &Ctx, key: &str, items: Vec<Value>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("Id".into(), json!(Uuid::new_v4()));
    m.insert("Status".into(), json!("OK"));
    m.insert("ProviderName".into(), json!(ctx.app_name));
    m.insert(
        "DateTimeUTC".into(),
        json!(ms_date_plain(shared.clock.now())),
    );
    m.insert(key.into(), Value::Array(items));
    m
}

/// A 400 ValidationException with no element, just a message.
pub(crate) fn validation_400(msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({
            "ErrorNumber": 10, "Type": "ValidationException", "Message": msg, "Elements": []
        })),
    )
        .into_response()
}

fn query_parse_error(msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({
            "ErrorNumber": 16, "Type": "QueryParseException", "Message": msg
        })),
    )
        .into_response()
}

fn post_data_invalid(msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({
            "ErrorNumber": 14, "Type": "PostDataInvalidException", "Message": msg
        })),
    )
        .into_response()
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        "The resource you're looking for cannot be found",
    )
        .into_response()
}

/// Filter (`where`), order and page a rendered list. `Err` is the error response.
fn list_response(
    shared: &Shared,
    ctx: &Ctx,
    key: &str,
    mut items: Vec<Value>,
    p: &Params,
) -> Response {
    if let Some(w) = qget(p, "where") {
        match parse_where(w) {
            Ok(e) => items.retain(|v| eval(&e, v)),
            Err(msg) => return query_parse_error(&format!("Invalid where clause: {msg}")),
        }
    }
    if let Some(o) = qget(p, "order") {
        sort_by_order(&mut items, o);
    }
    let mut pagination = None;
    if let Some(page) = qget(p, "page") {
        let Ok(page) = page.trim().parse::<usize>() else {
            return query_parse_error("page must be a positive integer");
        };
        let page = page.max(1);
        let size = qget(p, "pageSize")
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|s| *s > 0)
            .unwrap_or(shared.config.page_size)
            .min(1000);
        let count = items.len();
        let start = (page - 1).saturating_mul(size).min(count);
        let end = (start + size).min(count);
        items = items[start..end].to_vec();
        pagination = Some(json!({
            "page": page, "pageSize": size,
            "pageCount": count.div_ceil(size), "itemCount": count
        }));
    }
    let mut env = envelope(shared, ctx, key, items);
    if let Some(pg) = pagination {
        env.insert("pagination".into(), pg);
    }
    ok_json(Value::Object(env))
}

fn parse_body(body: &Bytes) -> Result<Value, Response> {
    if body.is_empty() {
        return Err(post_data_invalid("The request body is empty"));
    }
    serde_json::from_slice(body).map_err(|e| post_data_invalid(&format!("Invalid JSON: {e}")))
}

/// The elements of a batch body: `{"<Key>": [..]}` or a single object.
fn elements(v: Value, key: &str) -> Result<Vec<Map<String, Value>>, Response> {
    let Value::Object(mut m) = v else {
        return Err(post_data_invalid("The request body must be a JSON object"));
    };
    let list = match m.remove(key) {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(post_data_invalid(&format!("{key} must be an array"))),
        None => vec![Value::Object(m)],
    };
    list.into_iter()
        .map(|e| match e {
            Value::Object(o) => Ok(o),
            _ => Err(post_data_invalid(&format!(
                "Each of {key} must be an object"
            ))),
        })
        .collect()
}

fn summarize(p: &Params) -> bool {
    !qget(p, "summarizeErrors").is_some_and(|v| v.eq_ignore_ascii_case("false"))
}

/// Assemble the answer of a batch write.
fn batch_response(
    shared: &Shared,
    ctx: &Ctx,
    key: &str,
    results: Vec<ElementResult>,
    summarize: bool,
    error_flag: &str,
) -> Response {
    if summarize {
        let errs: Vec<Value> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|(el, msgs)| {
                let mut el = el.clone();
                el.insert("ValidationErrors".into(), validation_errors(msgs));
                Value::Object(el)
            })
            .collect();
        if !errs.is_empty() {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(validation_exception(errs)),
            )
                .into_response();
        }
    }
    let items = results
        .into_iter()
        .map(|r| match r {
            Ok(mut v) => {
                if !summarize && let Some(m) = v.as_object_mut() {
                    m.insert("StatusAttributeString".into(), json!("OK"));
                }
                v
            }
            Err((mut el, msgs)) => {
                el.insert("StatusAttributeString".into(), json!("ERROR"));
                el.insert(error_flag.into(), json!(true));
                el.insert("ValidationErrors".into(), validation_errors(&msgs));
                Value::Object(el)
            }
        })
        .collect();
    ok_json(Value::Object(envelope(shared, ctx, key, items)))
}

// ---------------------------------------------------------------- settings

/// `GET /Organisation`.
pub(crate) async fn organisation(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
) -> Response {
    let org = ctx.tenant.lock().organisation_json();
    ok_json(Value::Object(envelope(
        &shared,
        &ctx,
        "Organisations",
        vec![org],
    )))
}

/// `GET /Accounts`.
pub(crate) async fn accounts(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    RawQuery(q): RawQuery,
) -> Response {
    let p = params(q);
    let items = ctx.tenant.lock().accounts_json.clone();
    list_response(&shared, &ctx, "Accounts", items, &p)
}

/// `GET /Accounts/{AccountID}`.
pub(crate) async fn account(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
) -> Response {
    let found = {
        let t = ctx.tenant.lock();
        t.accounts
            .iter()
            .find(|a| a.id.to_string().eq_ignore_ascii_case(&id))
            .map(account_json)
    };
    match found {
        Some(a) => ok_json(Value::Object(envelope(&shared, &ctx, "Accounts", vec![a]))),
        None => not_found(),
    }
}

/// `GET /TaxRates`.
pub(crate) async fn tax_rates(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    RawQuery(q): RawQuery,
) -> Response {
    let p = params(q);
    let items: Vec<Value> = ctx
        .tenant
        .lock()
        .tax_rates
        .iter()
        .map(tax_rate_json)
        .collect();
    list_response(&shared, &ctx, "TaxRates", items, &p)
}

/// `GET /Currencies`.
pub(crate) async fn currencies(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    RawQuery(q): RawQuery,
) -> Response {
    let p = params(q);
    let items: Vec<Value> = {
        let t = ctx.tenant.lock();
        let mut codes = vec![t.org.base_currency.clone()];
        for c in &t.org.currencies {
            if !codes.iter().any(|x| x.eq_ignore_ascii_case(c)) {
                codes.push(c.clone());
            }
        }
        codes
            .into_iter()
            .map(|c| json!({ "Code": c, "Description": currency_name(&c) }))
            .collect()
    };
    list_response(&shared, &ctx, "Currencies", items, &p)
}

fn currency_name(code: &str) -> &'static str {
    match code {
        "GBP" => "British Pound",
        "EUR" => "Euro",
        "USD" => "United States Dollar",
        "AUD" => "Australian Dollar",
        "NZD" => "New Zealand Dollar",
        "CAD" => "Canadian Dollar",
        "CHF" => "Swiss Franc",
        _ => "Currency",
    }
}

// ---------------------------------------------------------------- contacts

/// `GET /Contacts`.
pub(crate) async fn contacts(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    RawQuery(q): RawQuery,
) -> Response {
    let p = params(q);
    let include_archived =
        qget(&p, "includeArchived").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let ids: Option<Vec<String>> =
        qget(&p, "IDs").map(|s| s.split(',').map(|x| x.trim().to_lowercase()).collect());
    let term = qget(&p, "searchTerm").map(str::to_lowercase);
    let items: Vec<Value> = {
        let t = ctx.tenant.lock();
        t.contacts
            .iter()
            .filter(|c| include_archived || c.status != "ARCHIVED" || ids.is_some())
            .filter(|c| ids.as_ref().is_none_or(|l| l.contains(&c.id.to_string())))
            .filter(|c| {
                term.as_ref().is_none_or(|term| {
                    std::iter::once(c.name.as_str())
                        .chain(
                            [
                                "FirstName",
                                "LastName",
                                "ContactNumber",
                                "CompanyNumber",
                                "EmailAddress",
                            ]
                            .iter()
                            .filter_map(|k| c.fields.get(*k).and_then(Value::as_str)),
                        )
                        .any(|s| s.to_lowercase().contains(term.as_str()))
                })
            })
            .map(Contact::to_json)
            .collect()
    };
    list_response(&shared, &ctx, "Contacts", items, &p)
}

fn find_contact<'a>(t: &'a TenantData, key: &str) -> Option<&'a Contact> {
    if let Ok(id) = key.parse::<Uuid>()
        && let Some(c) = t.contact(id)
    {
        return Some(c);
    }
    t.contacts.iter().find(|c| c.number() == Some(key))
}

/// `GET /Contacts/{ContactID or ContactNumber}`.
pub(crate) async fn contact(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    Path(key): Path<String>,
) -> Response {
    let found = find_contact(&ctx.tenant.lock(), &key).map(Contact::to_json);
    match found {
        Some(c) => ok_json(Value::Object(envelope(&shared, &ctx, "Contacts", vec![c]))),
        None => not_found(),
    }
}

/// `PUT /Contacts` (create).
pub(crate) async fn contacts_put(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    contacts_write(&shared, &ctx, params(q), body, false, None)
}

/// `POST /Contacts` (create or update).
pub(crate) async fn contacts_post(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    contacts_write(&shared, &ctx, params(q), body, true, None)
}

/// `POST /Contacts/{ContactID}` (update).
pub(crate) async fn contact_post(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    contacts_write(&shared, &ctx, params(q), body, true, Some(id))
}

fn sanitize_list(v: Option<&Value>, fields: &[&str], enum_field: (&str, &[&str])) -> Vec<Value> {
    let Some(Value::Array(a)) = v else {
        return Vec::new();
    };
    a.iter()
        .filter_map(Value::as_object)
        .map(|o| {
            let mut m = Map::new();
            for f in fields {
                if let Some(s) = o.get(*f).and_then(Value::as_str) {
                    if *f == enum_field.0 && !enum_field.1.contains(&s) {
                        continue;
                    }
                    m.insert((*f).into(), json!(s));
                }
            }
            Value::Object(m)
        })
        .collect()
}

fn contacts_write(
    shared: &Shared,
    ctx: &Ctx,
    p: Params,
    body: Bytes,
    upsert: bool,
    path_id: Option<String>,
) -> Response {
    let els = match parse_body(&body).and_then(|v| elements(v, "Contacts")) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let summarize = summarize(&p);
    let now = shared.clock.now();
    let mut t = ctx.tenant.lock();
    // Validate all first (atomic when summarizing), then apply.
    let mut plans: Vec<ContactPlan> = Vec::new();
    let mut batch_names: Vec<(String, Option<Uuid>)> = Vec::new();
    for el in els {
        let mut msgs = Vec::new();
        let mut existing: Option<Uuid> = None;
        let id_key = path_id.clone().or_else(|| opt_str(&el, "ContactID"));
        if let Some(k) = id_key {
            if !upsert {
                msgs.push("ContactID cannot be specified when creating a contact".to_string());
            } else {
                match find_contact(&t, &k) {
                    Some(c) => existing = Some(c.id),
                    None => msgs.push(format!("The contact with ContactID {k} could not be found")),
                }
            }
        } else if upsert
            && let Some(n) = str_field(&el, "ContactNumber")
            && let Some(c) = t.contacts.iter().find(|c| c.number() == Some(n))
        {
            existing = Some(c.id);
        }
        let name = str_field(&el, "Name")
            .map(String::from)
            .or_else(|| existing.and_then(|id| t.contact(id).map(|c| c.name.clone())));
        match &name {
            None => msgs.push("The contact name must be specified".into()),
            Some(n) => {
                let status = str_field(&el, "ContactStatus").unwrap_or("ACTIVE");
                let clash = t.contacts.iter().any(|c| {
                    c.status == "ACTIVE" && Some(c.id) != existing && c.name.eq_ignore_ascii_case(n)
                }) || batch_names
                    .iter()
                    .any(|(b, id)| b.eq_ignore_ascii_case(n) && *id != existing);
                if clash && status == "ACTIVE" {
                    msgs.push(format!(
                        "The contact name {n} is already assigned to another contact. The contact name must be unique across all active contacts."
                    ));
                }
            }
        }
        if let Some(s) = str_field(&el, "ContactStatus")
            && !["ACTIVE", "ARCHIVED"].contains(&s)
        {
            msgs.push(format!("ContactStatus '{s}' is not valid"));
        }
        if let Some(e) = str_field(&el, "EmailAddress")
            && (!e.contains('@') || e.contains(' '))
        {
            msgs.push("Email address must be valid.".into());
        }
        if let Some(c) = str_field(&el, "DefaultCurrency")
            && !t.currency_enabled(c)
        {
            msgs.push(format!("Organisation is not subscribed to currency {c}"));
        }
        if msgs.is_empty() {
            if let Some(n) = &name {
                batch_names.push((n.clone(), existing));
            }
            plans.push(Ok((existing, el)));
        } else {
            plans.push(Err((el, msgs)));
        }
    }
    if summarize && plans.iter().any(Result::is_err) {
        let results = plans.into_iter().map(|r| r.map(|_| Value::Null)).collect();
        return batch_response(
            shared,
            ctx,
            "Contacts",
            results,
            true,
            "HasValidationErrors",
        );
    }
    let mut results = Vec::new();
    for plan in plans {
        match plan {
            Err(e) => results.push(Err(e)),
            Ok((existing, el)) => {
                let id = match existing {
                    Some(id) => id,
                    None => {
                        let id = Uuid::new_v4();
                        t.push_contact(Contact {
                            id,
                            name: String::new(),
                            status: "ACTIVE".into(),
                            fields: Map::new(),
                            addresses: Vec::new(),
                            phones: Vec::new(),
                            is_supplier: false,
                            is_customer: false,
                            updated: now,
                        });
                        id
                    }
                };
                if let Some(c) = t.contact_mut(id) {
                    if let Some(n) = str_field(&el, "Name") {
                        c.name = n.to_string();
                    }
                    if let Some(s) = str_field(&el, "ContactStatus") {
                        c.status = s.to_string();
                    }
                    for f in CONTACT_STRING_FIELDS {
                        if let Some(v) = el.get(*f).and_then(Value::as_str) {
                            c.fields.insert((*f).into(), json!(v));
                        }
                    }
                    if el.contains_key("Addresses") {
                        c.addresses = sanitize_list(
                            el.get("Addresses"),
                            &[
                                "AddressType",
                                "AddressLine1",
                                "AddressLine2",
                                "AddressLine3",
                                "AddressLine4",
                                "City",
                                "Region",
                                "PostalCode",
                                "Country",
                                "AttentionTo",
                            ],
                            ("AddressType", &["POBOX", "STREET"]),
                        );
                    }
                    if el.contains_key("Phones") {
                        c.phones = sanitize_list(
                            el.get("Phones"),
                            &[
                                "PhoneType",
                                "PhoneNumber",
                                "PhoneAreaCode",
                                "PhoneCountryCode",
                            ],
                            ("PhoneType", &["DEFAULT", "DDI", "MOBILE", "FAX", "OFFICE"]),
                        );
                    }
                    if let Some(b) = el.get("IsSupplier").and_then(Value::as_bool) {
                        c.is_supplier = b;
                    }
                    if let Some(b) = el.get("IsCustomer").and_then(Value::as_bool) {
                        c.is_customer = b;
                    }
                    c.updated = now;
                    results.push(Ok(c.to_json()));
                }
            }
        }
    }
    drop(t);
    batch_response(
        shared,
        ctx,
        "Contacts",
        results,
        summarize,
        "HasValidationErrors",
    )
}

// ---------------------------------------------------------------- documents

/// `a.to_lowercase() == lowered`, without allocating for ASCII `a` (the
/// look-up before create compares every document's number of the
/// organisation with the one pinned by `where`).
fn eq_lowered(a: &str, lowered: &str) -> bool {
    if a.is_ascii() {
        a.eq_ignore_ascii_case(lowered) && !lowered.bytes().any(|b| b.is_ascii_uppercase())
    } else {
        a.to_lowercase() == lowered
    }
}

fn render_docs(t: &TenantData, kind: DocKind, p: &Params) -> Vec<Value> {
    let dp4 = unitdp4(p);
    let list = |name: &str| -> Option<Vec<String>> {
        qget(p, name).map(|s| s.split(',').map(|x| x.trim().to_lowercase()).collect())
    };
    let ids = list("IDs");
    let numbers = list(match kind {
        DocKind::Invoice => "InvoiceNumbers",
        DocKind::CreditNote => "CreditNoteNumbers",
    });
    let contact_ids = list("ContactIDs");
    let statuses = list("Statuses");
    // A `where` that pins the number (what a look-up before create sends)
    // skips rendering every other document; `list_response` still applies
    // the whole clause to what is left.
    let pinned_number = qget(p, "where")
        .and_then(|w| crate::filter::parse_where(w).ok())
        .and_then(|e| crate::filter::required_equal(&e, kind.number_field()));
    t.docs(kind)
        .iter()
        .filter(|d| {
            pinned_number
                .as_ref()
                .is_none_or(|n| eq_lowered(d.number.as_deref().unwrap_or_default(), n))
        })
        .filter(|d| ids.as_ref().is_none_or(|l| l.contains(&d.id.to_string())))
        .filter(|d| {
            numbers.as_ref().is_none_or(|l| {
                let n = d.number.as_deref().unwrap_or_default();
                l.iter().any(|x| eq_lowered(n, x))
            })
        })
        .filter(|d| {
            contact_ids
                .as_ref()
                .is_none_or(|l| l.contains(&d.contact_id.to_string()))
        })
        .filter(|d| {
            statuses
                .as_ref()
                .is_none_or(|l| l.contains(&d.status.to_lowercase()))
        })
        .map(|d| d.to_json(t, dp4))
        .collect()
}

/// `GET /Invoices` and `GET /CreditNotes`.
pub(crate) async fn docs_list(
    kind: DocKind,
    shared: Arc<Shared>,
    ctx: Ctx,
    q: Option<String>,
) -> Response {
    let p = params(q);
    let items = render_docs(&ctx.tenant.lock(), kind, &p);
    list_response(&shared, &ctx, kind.collection(), items, &p)
}

fn find_doc(t: &TenantData, kind: DocKind, key: &str) -> Option<usize> {
    if let Ok(id) = key.parse::<Uuid>()
        && let Some(i) = t.docs(kind).iter().position(|d| d.id == id)
    {
        return Some(i);
    }
    t.docs(kind)
        .iter()
        .position(|d| d.number.as_deref() == Some(key))
}

/// `GET /Invoices/{id}` and `GET /CreditNotes/{id}` (id or number).
pub(crate) async fn doc_get(
    kind: DocKind,
    shared: Arc<Shared>,
    ctx: Ctx,
    key: String,
    q: Option<String>,
) -> Response {
    let p = params(q);
    let found = {
        let t = ctx.tenant.lock();
        find_doc(&t, kind, &key).map(|i| t.docs(kind)[i].to_json(&t, unitdp4(&p)))
    };
    match found {
        Some(v) => ok_json(Value::Object(envelope(
            &shared,
            &ctx,
            kind.collection(),
            vec![v],
        ))),
        None => not_found(),
    }
}

enum ContactRef {
    Existing(Uuid),
    New(String),
}

struct PlannedDoc {
    existing: Option<usize>,
    doc: Doc,
    contact: ContactRef,
}

fn dec_field(el: &Map<String, Value>, key: &str, msgs: &mut Vec<String>) -> Option<Decimal> {
    match el.get(key) {
        None | Some(Value::Null) => None,
        Some(v) => match as_decimal(v) {
            // Bounded so that line arithmetic can never overflow a Decimal.
            Some(d) if d.abs() >= Decimal::from(10_000_000_000i64) => {
                msgs.push(format!("{key} must be less than 10,000,000,000"));
                None
            }
            Some(d) => Some(d.round_dp(6)),
            None => {
                msgs.push(format!("{key} must be a number"));
                None
            }
        },
    }
}

fn tax_for(line_amount: Decimal, rate: Decimal, lat: &str) -> Decimal {
    let hundred = Decimal::ONE_HUNDRED;
    match lat {
        "Inclusive" => (line_amount * rate / (hundred + rate)).round_dp(2),
        "NoTax" => Decimal::ZERO,
        _ => (line_amount * rate / hundred).round_dp(2),
    }
}

#[allow(clippy::too_many_arguments)]
fn plan_doc(
    t: &TenantData,
    kind: DocKind,
    el: &Map<String, Value>,
    path_id: Option<&str>,
    upsert: bool,
    dp4: bool,
    today: NaiveDate,
    now: chrono::DateTime<chrono::Utc>,
    batch_numbers: &[(String, String)],
) -> Result<PlannedDoc, Vec<String>> {
    let mut msgs: Vec<String> = Vec::new();
    let noun = kind.noun();
    let id_key = path_id
        .map(String::from)
        .or_else(|| opt_str(el, kind.id_field()));
    let existing = match &id_key {
        Some(k) if upsert => match find_doc(t, kind, k) {
            Some(i) => Some(i),
            None => return Err(vec![format!("{noun} could not be found: {k}")]),
        },
        Some(_) => {
            return Err(vec![format!(
                "{} cannot be specified when creating a new {}",
                kind.id_field(),
                noun.to_lowercase()
            )]);
        }
        None => None,
    };
    let base: Option<&Doc> = existing.map(|i| &t.docs(kind)[i]);
    // Type
    let doc_type = match (str_field(el, "Type"), base) {
        (Some(ty), _) if kind.types().contains(&ty) => {
            if let Some(b) = base
                && b.doc_type != ty
            {
                msgs.push(format!("The {noun} type cannot be changed"));
            }
            ty.to_string()
        }
        (Some(ty), _) => {
            msgs.push(format!(
                "'{ty}' is not a valid {} type",
                noun.to_lowercase()
            ));
            String::new()
        }
        (None, Some(b)) => b.doc_type.clone(),
        (None, None) => {
            msgs.push(format!("{noun} Type must be specified"));
            String::new()
        }
    };
    // Contact
    let contact = match el.get("Contact") {
        Some(Value::Object(c)) => {
            if let Some(cid) = str_field(c, "ContactID") {
                match cid.parse::<Uuid>().ok().and_then(|id| t.contact(id)) {
                    Some(c) if c.status == "ARCHIVED" && base.is_none() => {
                        msgs.push(ARCHIVED_CONTACT.into());
                        None
                    }
                    Some(c) => Some(ContactRef::Existing(c.id)),
                    None => {
                        msgs.push(format!(
                            "The contact with ContactID {cid} could not be found"
                        ));
                        None
                    }
                }
            } else if let Some(n) = str_field(c, "ContactNumber") {
                match t.contacts.iter().find(|x| x.number() == Some(n)) {
                    Some(x) if x.status == "ARCHIVED" && base.is_none() => {
                        msgs.push(ARCHIVED_CONTACT.into());
                        None
                    }
                    Some(x) => Some(ContactRef::Existing(x.id)),
                    None => match str_field(c, "Name") {
                        Some(name) => Some(ContactRef::New(name.to_string())),
                        None => {
                            msgs.push(format!(
                                "The contact with ContactNumber {n} could not be found"
                            ));
                            None
                        }
                    },
                }
            } else if let Some(name) = str_field(c, "Name") {
                match t
                    .contacts
                    .iter()
                    .find(|x| x.status == "ACTIVE" && x.name.eq_ignore_ascii_case(name))
                {
                    Some(x) => Some(ContactRef::Existing(x.id)),
                    None => Some(ContactRef::New(name.to_string())),
                }
            } else {
                msgs.push("A Contact must be specified for this type of transaction".into());
                None
            }
        }
        Some(_) => {
            msgs.push("A Contact must be specified for this type of transaction".into());
            None
        }
        None => match base {
            Some(b) => Some(ContactRef::Existing(b.contact_id)),
            None => {
                msgs.push("A Contact must be specified for this type of transaction".into());
                None
            }
        },
    };
    // Dates
    let date = match el.get("Date") {
        None | Some(Value::Null) => base.map(|b| b.date).unwrap_or(today),
        Some(v) => match v.as_str().and_then(parse_day) {
            Some(d) => d,
            None => {
                msgs.push(format!("The Date '{}' is not a valid date", value_text(v)));
                today
            }
        },
    };
    let due_date = match el.get("DueDate") {
        None | Some(Value::Null) => base.and_then(|b| b.due_date),
        Some(v) => match v.as_str().and_then(parse_day) {
            Some(d) => Some(d),
            None => {
                msgs.push(format!(
                    "The DueDate '{}' is not a valid date",
                    value_text(v)
                ));
                None
            }
        },
    };
    if let Some(dd) = due_date
        && dd < date
    {
        msgs.push("Due Date cannot be earlier than the invoice Date".into());
    }
    // Status
    let status = match str_field(el, "Status") {
        None => base
            .map(|b| b.status.clone())
            .unwrap_or_else(|| "DRAFT".into()),
        Some(s) => {
            let s = s.to_uppercase();
            let ok_new = ["DRAFT", "SUBMITTED", "AUTHORISED"].contains(&s.as_str());
            let ok_upd = ok_new || ["DELETED", "VOIDED"].contains(&s.as_str());
            if base.is_none() && !ok_new {
                msgs.push(format!("{noun} not of valid status for creation"));
            } else if base.is_some() && !ok_upd {
                msgs.push(format!("{noun} not of valid status for modification"));
            }
            s
        }
    };
    if let Some(b) = base
        && ["DELETED", "VOIDED", "PAID"].contains(&b.status.as_str())
    {
        msgs.push(format!(
            "This document cannot be edited as it is {}.",
            b.status.to_lowercase()
        ));
    }
    // Line amount types
    let lat = match str_field(el, "LineAmountTypes") {
        None => base
            .map(|b| b.line_amount_types.clone())
            .unwrap_or_else(|| "Exclusive".into()),
        Some(s) => match s.to_ascii_lowercase().as_str() {
            "exclusive" => "Exclusive".into(),
            "inclusive" => "Inclusive".into(),
            "notax" => "NoTax".into(),
            _ => {
                msgs.push(format!("LineAmountTypes '{s}' is not valid"));
                "Exclusive".into()
            }
        },
    };
    // Currency
    let currency = match str_field(el, "CurrencyCode") {
        None => base
            .map(|b| b.currency.clone())
            .unwrap_or_else(|| t.org.base_currency.clone()),
        Some(c) => {
            let c = c.to_uppercase();
            if !t.currency_enabled(&c) {
                msgs.push(format!("Organisation is not subscribed to currency {c}"));
            }
            c
        }
    };
    let currency_rate =
        dec_field(el, "CurrencyRate", &mut msgs).or(base.and_then(|b| b.currency_rate));
    // Number
    let number = match str_field(el, kind.number_field()) {
        Some(n) => Some(n.to_string()),
        None => base.and_then(|b| b.number.clone()),
    };
    let number = match number {
        Some(n) => Some(n),
        None if doc_type == "ACCREC" || doc_type == "ACCRECCREDIT" => {
            let prefix = if kind == DocKind::Invoice {
                "INV"
            } else {
                "CN"
            };
            let n = t
                .docs(kind)
                .iter()
                .filter(|d| d.doc_type == doc_type)
                .count()
                + 1;
            Some(format!("{prefix}-{n:04}"))
        }
        None => None,
    };
    if doc_type == "ACCREC"
        && let Some(n) = &number
    {
        let taken = t.invoices.iter().enumerate().any(|(i, d)| {
            Some(i) != existing
                && d.doc_type == "ACCREC"
                && d.number.as_deref() == Some(n.as_str())
                && !["DELETED", "VOIDED"].contains(&d.status.as_str())
        }) || batch_numbers
            .iter()
            .any(|(ty, bn)| ty == "ACCREC" && bn == n);
        if taken {
            msgs.push("Invoice # must be unique.".into());
        }
    }
    // Xero's CreditNote has no Url (xero_accounting.yaml, CreditNote): one
    // sent is ignored like any unknown property, and none comes back.
    let url = match str_field(el, "Url").filter(|_| kind != DocKind::CreditNote) {
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(u.to_string()),
        Some(u) => {
            msgs.push(format!("The Url '{u}' is not a valid URL"));
            None
        }
        None => base.and_then(|b| b.url.clone()),
    };
    // Reference is "ACCREC only" on an invoice and "ACCRECCREDIT only" on
    // a credit note (xero_accounting.yaml): Xero ignores one sent for a
    // bill or a supplier credit note, as it does any property it does not
    // keep, without an error.
    let reference = if doc_type.starts_with("ACCREC") {
        opt_str(el, "Reference").or(base.and_then(|b| b.reference.clone()))
    } else {
        None
    };
    // Lines
    let approving = ["SUBMITTED", "AUTHORISED"].contains(&status.as_str());
    let lines: Vec<Line> = match el.get("LineItems") {
        Some(Value::Array(items)) => {
            if let Some(b) = base
                && b.credited > Decimal::ZERO
            {
                msgs.push(
                    "This document cannot be edited as it has a payment or credit note allocated to it."
                        .into(),
                );
            }
            let mut out = Vec::new();
            for item in items {
                let Some(li) = item.as_object() else {
                    msgs.push("Each line item must be an object".into());
                    continue;
                };
                out.push(plan_line(t, li, &lat, dp4, approving, &mut msgs));
            }
            out
        }
        Some(Value::Null) | None => match base {
            Some(b) => b.lines.clone(),
            None => Vec::new(),
        },
        Some(_) => {
            msgs.push("LineItems must be an array".into());
            Vec::new()
        }
    };
    if approving && lines.is_empty() {
        msgs.push(format!(
            "{noun} must have at least one line item to be approved"
        ));
    }
    let sum_line: Decimal = lines.iter().map(|l| l.line_amount).sum();
    let total_tax: Decimal = lines.iter().map(|l| l.tax_amount).sum();
    let (sub_total, total) = match lat.as_str() {
        "Inclusive" => (sum_line - total_tax, sum_line),
        _ => (sum_line, sum_line + total_tax),
    };
    for (key, computed) in [
        ("SubTotal", sub_total),
        ("TotalTax", total_tax),
        ("Total", total),
    ] {
        if let Some(given) = dec_field(el, key, &mut msgs)
            && el.contains_key("LineItems")
            && given.round_dp(2) != computed
        {
            msgs.push(format!(
                "The document {key} {given} does not equal the sum of the line items {computed}"
            ));
        }
    }
    if !msgs.is_empty() {
        return Err(msgs);
    }
    let credited = base.map(|b| b.credited).unwrap_or_default();
    let doc = Doc {
        kind,
        id: base.map(|b| b.id).unwrap_or_else(Uuid::new_v4),
        doc_type,
        contact_id: Uuid::nil(),
        date,
        due_date,
        line_amount_types: lat,
        number,
        reference,
        url,
        currency,
        currency_rate,
        status,
        lines,
        sub_total,
        total_tax,
        total,
        outstanding: total - credited,
        credited,
        fully_paid_on: base.and_then(|b| b.fully_paid_on),
        updated: now,
        has_attachments: base.is_some_and(|b| b.has_attachments),
        sent_to_contact: el
            .get("SentToContact")
            .and_then(Value::as_bool)
            .unwrap_or(base.is_some_and(|b| b.sent_to_contact)),
        history: base.map(|b| b.history.clone()).unwrap_or_default(),
    };
    Ok(PlannedDoc {
        existing,
        doc,
        contact: contact.unwrap_or(ContactRef::Existing(Uuid::nil())),
    })
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn plan_line(
    t: &TenantData,
    li: &Map<String, Value>,
    lat: &str,
    dp4: bool,
    approving: bool,
    msgs: &mut Vec<String>,
) -> Line {
    let account_code = opt_str(li, "AccountCode");
    let mut default_tax: Option<&str> = None;
    match &account_code {
        Some(code) => match t.accounts.iter().find(|a| a.code.eq_ignore_ascii_case(code)) {
            None => msgs.push(format!(
                "Account code '{code}' is not a valid code for this document."
            )),
            Some(a) if a.status != "ACTIVE" => msgs.push(format!(
                "Account code '{code}' has been archived, or has been deleted. Each line item must reference a valid account."
            )),
            Some(a) => default_tax = Some(a.tax_type),
        },
        None if approving => msgs.push("Account code must be specified".into()),
        None => {}
    }
    let mut tax_type = opt_str(li, "TaxType").map(|s| s.to_uppercase());
    let rate = if lat == "NoTax" {
        tax_type = Some("NONE".into());
        Decimal::ZERO
    } else {
        match &tax_type {
            Some(tt) => match t.tax_rate(tt) {
                Some(r) => r.rate,
                None => {
                    msgs.push(format!(
                        "The TaxType code '{tt}' does not exist or cannot be used for this type of transaction."
                    ));
                    Decimal::ZERO
                }
            },
            None => {
                let tt = default_tax.unwrap_or("NONE");
                tax_type = Some(tt.to_string());
                t.tax_rate(tt).map(|r| r.rate).unwrap_or_default()
            }
        }
    };
    let mut quantity = dec_field(li, "Quantity", msgs);
    let unit = dec_field(li, "UnitAmount", msgs).map(|u| u.round_dp(if dp4 { 4 } else { 2 }));
    // A rate outside 0-100 is refused (it would also let a line's amount
    // outgrow the bound dec_field keeps for line arithmetic).
    let discount = dec_field(li, "DiscountRate", msgs).filter(|d| {
        let ok = (Decimal::ZERO..=Decimal::ONE_HUNDRED).contains(d);
        if !ok {
            msgs.push("Discount rate must be between 0 and 100".into());
        }
        ok
    });
    let given_line = dec_field(li, "LineAmount", msgs);
    if let Some(q) = quantity
        && q.scale() > 4
    {
        quantity = Some(q.round_dp(4));
    }
    let line_amount = match (quantity, unit) {
        (q, Some(u)) => {
            let q = q.unwrap_or(Decimal::ONE);
            quantity = Some(q);
            let mut expected = q * u;
            if let Some(dr) = discount {
                expected = expected * (Decimal::ONE_HUNDRED - dr) / Decimal::ONE_HUNDRED;
            }
            let expected = expected.round_dp(2);
            if let Some(g) = given_line
                && (g - expected).abs() > Decimal::new(1, 2)
            {
                msgs.push(format!(
                    "The line total {} does not match the expected line total {}",
                    g.round_dp(2),
                    expected
                ));
            }
            given_line.map(|g| g.round_dp(2)).unwrap_or(expected)
        }
        (_, None) => given_line.map(|g| g.round_dp(2)).unwrap_or_default(),
    };
    let tax_amount = match dec_field(li, "TaxAmount", msgs) {
        Some(x) if lat != "NoTax" => x.round_dp(2),
        _ => tax_for(line_amount, rate, lat),
    };
    Line {
        id: opt_str(li, "LineItemID")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(Uuid::new_v4),
        description: opt_str(li, "Description"),
        quantity,
        unit_amount: unit,
        item_code: opt_str(li, "ItemCode"),
        account_code,
        tax_type,
        tax_amount,
        line_amount,
        discount_rate: discount,
    }
}

/// `PUT`/`POST /Invoices`, `/CreditNotes`, and `POST /Invoices/{id}`, `/CreditNotes/{id}`.
pub(crate) fn docs_write(
    kind: DocKind,
    shared: &Shared,
    ctx: &Ctx,
    q: Option<String>,
    body: Bytes,
    upsert: bool,
    path_id: Option<String>,
) -> Response {
    let p = params(q);
    let els = match parse_body(&body).and_then(|v| elements(v, kind.collection())) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let dp4 = unitdp4(&p);
    let summarize = summarize(&p);
    let now = shared.clock.now();
    let today = now.date_naive();
    let mut t = ctx.tenant.lock();
    let mut plans = Vec::new();
    let mut batch_numbers: Vec<(String, String)> = Vec::new();
    for el in els {
        match plan_doc(
            &t,
            kind,
            &el,
            path_id.as_deref(),
            upsert,
            dp4,
            today,
            now,
            &batch_numbers,
        ) {
            Ok(pd) => {
                if let Some(n) = &pd.doc.number {
                    batch_numbers.push((pd.doc.doc_type.clone(), n.clone()));
                }
                plans.push(Ok(pd));
            }
            Err(msgs) => plans.push(Err((el, msgs))),
        }
    }
    if summarize && plans.iter().any(Result::is_err) {
        let results = plans.into_iter().map(|r| r.map(|_| Value::Null)).collect();
        return batch_response(shared, ctx, kind.collection(), results, true, "HasErrors");
    }
    let mut results = Vec::new();
    for plan in plans {
        match plan {
            Err(e) => results.push(Err(e)),
            Ok(mut pd) => {
                let contact_id =
                    match pd.contact {
                        ContactRef::Existing(id) => id,
                        ContactRef::New(name) => {
                            match t.contacts.iter().find(|c| {
                                c.status == "ACTIVE" && c.name.eq_ignore_ascii_case(&name)
                            }) {
                                Some(c) => c.id,
                                None => {
                                    let id = Uuid::new_v4();
                                    t.push_contact(Contact {
                                        id,
                                        name,
                                        status: "ACTIVE".into(),
                                        fields: Map::new(),
                                        addresses: Vec::new(),
                                        phones: Vec::new(),
                                        is_supplier: false,
                                        is_customer: false,
                                        updated: now,
                                    });
                                    id
                                }
                            }
                        }
                    };
                pd.doc.contact_id = contact_id;
                let supplier = pd.doc.doc_type.starts_with("ACCPAY");
                if let Some(c) = t.contact_mut(contact_id) {
                    if supplier {
                        c.is_supplier = true;
                    } else {
                        c.is_customer = true;
                    }
                }
                let id = pd.doc.id;
                match pd.existing {
                    Some(i) => t.docs_mut(kind)[i] = pd.doc,
                    None => t.docs_mut(kind).push(pd.doc),
                }
                if let Some(d) = t.docs(kind).iter().find(|d| d.id == id) {
                    results.push(Ok(d.to_json(&t, dp4)));
                }
            }
        }
    }
    drop(t);
    batch_response(
        shared,
        ctx,
        kind.collection(),
        results,
        summarize,
        "HasErrors",
    )
}

// ---------------------------------------------------------------- attachments

/// `GET /{Invoices|CreditNotes}/{id}/Attachments`.
pub(crate) async fn attachments_list(
    kind: DocKind,
    shared: Arc<Shared>,
    ctx: Ctx,
    key: String,
) -> Response {
    let items = {
        let t = ctx.tenant.lock();
        let Some(i) = find_doc(&t, kind, &key) else {
            return not_found();
        };
        let id = t.docs(kind)[i].id;
        t.attachments
            .iter()
            .filter(|a| a.owner_kind == kind && a.owner_id == id)
            .map(|a| a.to_json(&shared.base_url))
            .collect()
    };
    ok_json(Value::Object(envelope(&shared, &ctx, "Attachments", items)))
}

/// `GET /{Invoices|CreditNotes}/{id}/Attachments/{FileName or AttachmentID}`: the bytes.
pub(crate) async fn attachment_get(kind: DocKind, ctx: Ctx, key: String, file: String) -> Response {
    let t = ctx.tenant.lock();
    let Some(i) = find_doc(&t, kind, &key) else {
        return not_found();
    };
    let id = t.docs(kind)[i].id;
    let Some(a) = t.attachments.iter().find(|a| {
        a.owner_kind == kind
            && a.owner_id == id
            && (a.file_name == file || a.id.to_string().eq_ignore_ascii_case(&file))
    }) else {
        return not_found();
    };
    let mut r = Response::new(axum::body::Body::from(a.bytes.clone()));
    if let Ok(v) = HeaderValue::from_str(&a.mime_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// `PUT`/`POST /{Invoices|CreditNotes}/{id}/Attachments/{FileName}`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attachment_put(
    kind: DocKind,
    shared: &Shared,
    ctx: &Ctx,
    key: String,
    file: String,
    q: Option<String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let p = params(q);
    if body.len() > shared.config.max_attachment_bytes {
        return (StatusCode::PAYLOAD_TOO_LARGE, "The request was too large").into_response();
    }
    if file.trim().is_empty() {
        return validation_400("A file name must be specified");
    }
    if body.is_empty() {
        return validation_400("The attachment is empty");
    }
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "application/octet-stream".into());
    let include_online = qget(&p, "IncludeOnline").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let json = {
        let mut t = ctx.tenant.lock();
        let Some(i) = find_doc(&t, kind, &key) else {
            return not_found();
        };
        let owner_id = t.docs(kind)[i].id;
        t.docs_mut(kind)[i].has_attachments = true;
        let count = t
            .attachments
            .iter()
            .filter(|a| a.owner_kind == kind && a.owner_id == owner_id)
            .count();
        let pos = t
            .attachments
            .iter()
            .position(|a| a.owner_kind == kind && a.owner_id == owner_id && a.file_name == file);
        if pos.is_none() && count >= 10 {
            return validation_400("A document can have at most 10 attachments");
        }
        let att = Attachment {
            id: pos
                .map(|p| t.attachments[p].id)
                .unwrap_or_else(Uuid::new_v4),
            owner_kind: kind,
            owner_id,
            file_name: file,
            mime_type: mime,
            include_online,
            bytes: body.to_vec(),
        };
        let json = att.to_json(&shared.base_url);
        match pos {
            Some(p) => t.attachments[p] = att,
            None => t.attachments.push(att),
        }
        json
    };
    ok_json(Value::Object(envelope(
        shared,
        ctx,
        "Attachments",
        vec![json],
    )))
}

// ---------------------------------------------------------------- history

/// Xero's limit on a history note's `Details`.
const MAX_HISTORY_DETAILS: usize = 2500;

/// `GET /{Invoices|CreditNotes}/{id}/History`.
pub(crate) async fn history_get(
    kind: DocKind,
    shared: Arc<Shared>,
    ctx: Ctx,
    key: String,
) -> Response {
    let items = {
        let t = ctx.tenant.lock();
        let Some(i) = find_doc(&t, kind, &key) else {
            return not_found();
        };
        t.docs(kind)[i]
            .history
            .iter()
            .map(HistoryRecord::to_json)
            .collect()
    };
    ok_json(Value::Object(envelope(
        &shared,
        &ctx,
        "HistoryRecords",
        items,
    )))
}

/// `PUT /{Invoices|CreditNotes}/{id}/History`: add notes
/// (`{"HistoryRecords": [{"Details": ".."}]}`), each recorded as a
/// "Note" by the calling app.
pub(crate) fn history_put(
    kind: DocKind,
    shared: &Shared,
    ctx: &Ctx,
    key: String,
    body: Bytes,
) -> Response {
    let els = match parse_body(&body).and_then(|v| elements(v, "HistoryRecords")) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let now = shared.clock.now();
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for el in els {
        match str_field(&el, "Details") {
            None => {
                let mut el = el;
                el.insert(
                    "ValidationErrors".into(),
                    validation_errors(&["The Details field is required.".into()]),
                );
                errors.push(Value::Object(el));
            }
            Some(d) if d.chars().count() > MAX_HISTORY_DETAILS => {
                let msg =
                    format!("The Details field must be at most {MAX_HISTORY_DETAILS} characters.");
                let mut el = el;
                el.insert("ValidationErrors".into(), validation_errors(&[msg]));
                errors.push(Value::Object(el));
            }
            Some(d) => records.push(HistoryRecord {
                changes: "Note".into(),
                user: ctx.app_name.clone(),
                details: d.to_string(),
                date: now,
            }),
        }
    }
    if !errors.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(validation_exception(errors)),
        )
            .into_response();
    }
    let out = {
        let mut t = ctx.tenant.lock();
        let Some(i) = find_doc(&t, kind, &key) else {
            return not_found();
        };
        let out: Vec<Value> = records
            .iter()
            .map(|r| {
                let mut v = r.to_json();
                v["ValidationErrors"] = json!([]);
                v
            })
            .collect();
        t.docs_mut(kind)[i].history.extend(records);
        out
    };
    ok_json(Value::Object(envelope(shared, ctx, "HistoryRecords", out)))
}

// ---------------------------------------------------------------- allocations

/// `PUT /CreditNotes/{id}/Allocations`.
pub(crate) async fn allocations_put(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<Ctx>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    let els = match parse_body(&body).and_then(|v| elements(v, "Allocations")) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let today = shared.clock.now().date_naive();
    let now = shared.clock.now();
    let mut t = ctx.tenant.lock();
    let Some(ci) = find_doc(&t, DocKind::CreditNote, &key) else {
        return not_found();
    };
    let cn = t.credit_notes[ci].clone();
    let mut remaining = cn.outstanding;
    let mut due: HashMap<usize, Decimal> = HashMap::new();
    let mut planned: Vec<(usize, Decimal, NaiveDate)> = Vec::new();
    let mut errors: Vec<Value> = Vec::new();
    for el in els {
        let mut msgs: Vec<String> = Vec::new();
        let amount = dec_field(&el, "Amount", &mut msgs);
        let date = match el.get("Date") {
            None | Some(Value::Null) => today,
            Some(v) => v.as_str().and_then(parse_day).unwrap_or_else(|| {
                msgs.push(format!("The Date '{}' is not a valid date", value_text(v)));
                today
            }),
        };
        let inv = el
            .get("Invoice")
            .and_then(Value::as_object)
            .and_then(|o| str_field(o, "InvoiceID"))
            .and_then(|k| find_doc(&t, DocKind::Invoice, k));
        if cn.status != "AUTHORISED" {
            msgs.push("Only AUTHORISED credit notes can be allocated.".into());
        }
        match (amount, inv) {
            (None, _) => msgs.push("Amount must be specified".into()),
            (Some(a), _) if a <= Decimal::ZERO => {
                msgs.push("Amount must be greater than zero".into())
            }
            (_, None) => msgs.push("The Invoice could not be found".into()),
            (Some(a), Some(ii)) => {
                let invoice = &t.invoices[ii];
                let expected_type = if cn.doc_type == "ACCPAYCREDIT" {
                    "ACCPAY"
                } else {
                    "ACCREC"
                };
                if invoice.doc_type != expected_type {
                    msgs.push("The credit note type does not match the invoice type".into());
                }
                if invoice.status != "AUTHORISED" {
                    msgs.push("Only AUTHORISED invoices can have credit allocated.".into());
                }
                if invoice.currency != cn.currency {
                    msgs.push(
                        "The credit note and the invoice must be in the same currency".into(),
                    );
                }
                if invoice.contact_id != cn.contact_id {
                    msgs.push(
                        "The credit note and the invoice must be for the same contact".into(),
                    );
                }
                let inv_due = *due.entry(ii).or_insert(invoice.outstanding);
                if a > inv_due {
                    msgs.push(format!(
                        "The amount allocated ({a}) exceeds the amount due on the invoice ({inv_due})"
                    ));
                }
                if a > remaining {
                    msgs.push(format!(
                        "The amount allocated ({a}) exceeds the remaining credit on the credit note ({remaining})"
                    ));
                }
                if msgs.is_empty() {
                    remaining -= a;
                    due.insert(ii, inv_due - a);
                    planned.push((ii, a, date));
                }
            }
        }
        if !msgs.is_empty() {
            let mut el = el;
            el.insert("ValidationErrors".into(), validation_errors(&msgs));
            errors.push(Value::Object(el));
        }
    }
    if !errors.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(validation_exception(errors)),
        )
            .into_response();
    }
    let mut out = Vec::new();
    for (ii, amount, date) in planned {
        let alloc = Allocation {
            id: Uuid::new_v4(),
            credit_note_id: cn.id,
            invoice_id: t.invoices[ii].id,
            amount,
            date,
        };
        {
            let inv = &mut t.invoices[ii];
            inv.outstanding -= amount;
            inv.credited += amount;
            inv.updated = now;
            if inv.outstanding.is_zero() {
                inv.status = "PAID".into();
                inv.fully_paid_on = Some(date);
            }
        }
        {
            let c = &mut t.credit_notes[ci];
            c.outstanding -= amount;
            c.credited += amount;
            c.updated = now;
            if c.outstanding.is_zero() {
                c.status = "PAID".into();
                c.fully_paid_on = Some(date);
            }
        }
        t.allocations.push(alloc.clone());
        out.push(alloc.to_json(&t, true));
    }
    drop(t);
    ok_json(Value::Object(envelope(&shared, &ctx, "Allocations", out)))
}

#[cfg(test)]
mod tests {
    use super::eq_lowered;

    #[test]
    fn eq_lowered_matches_to_lowercase() {
        let cases = [
            ("INV-0001", "inv-0001"),
            ("inv-0001", "inv-0001"),
            ("INV-0001", "INV-0001"),
            ("INV-0001", "inv-0002"),
            ("INV-0001", "inv-00011"),
            ("ÄRGER-1", "ärger-1"),
            ("ÄRGER-1", "Ärger-1"),
            ("\u{212A}-1", "k-1"),
            ("K-1", "\u{212A}-1"),
            ("", ""),
        ];
        for (a, b) in cases {
            assert_eq!(eq_lowered(a, b), a.to_lowercase() == b, "{a:?} vs {b:?}");
        }
    }
}
