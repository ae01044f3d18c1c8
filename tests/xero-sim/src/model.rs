//! One organisation's accounting data (chart of accounts, tax rates,
//! contacts, invoices, credit notes, attachments, allocations) and its
//! rendering as Xero JSON.

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use uuid::Uuid;

use crate::config::OrgConfig;
use crate::xjson::{day_string, ms_date, ms_day, num};

/// A chart-of-accounts entry.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: Uuid,
    pub code: String,
    pub name: String,
    pub kind: &'static str,
    pub class: &'static str,
    pub status: &'static str,
    pub tax_type: &'static str,
    pub system: Option<&'static str>,
    pub updated: DateTime<Utc>,
}

/// A tax rate.
#[derive(Debug, Clone)]
pub struct TaxRate {
    pub name: &'static str,
    pub tax_type: &'static str,
    pub rate: Decimal,
    pub status: &'static str,
    pub report: &'static str,
}

/// A contact.
#[derive(Debug, Clone)]
pub struct Contact {
    pub id: Uuid,
    pub name: String,
    pub status: String,
    /// Simple optional string fields kept verbatim (ContactNumber, EmailAddress, ...).
    pub fields: Map<String, Value>,
    pub addresses: Vec<Value>,
    pub phones: Vec<Value>,
    pub is_supplier: bool,
    pub is_customer: bool,
    pub updated: DateTime<Utc>,
}

/// String fields of a contact kept as sent.
pub const CONTACT_STRING_FIELDS: &[&str] = &[
    "ContactNumber",
    "AccountNumber",
    "FirstName",
    "LastName",
    "CompanyNumber",
    "EmailAddress",
    "BankAccountDetails",
    "TaxNumber",
    "AccountsReceivableTaxType",
    "AccountsPayableTaxType",
    "DefaultCurrency",
    "Website",
    "PurchasesDefaultAccountCode",
    "SalesDefaultAccountCode",
];

impl Contact {
    /// Contact number, if any.
    pub fn number(&self) -> Option<&str> {
        self.fields.get("ContactNumber").and_then(Value::as_str)
    }

    /// Full Xero JSON.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("ContactID".into(), json!(self.id));
        m.insert("ContactStatus".into(), json!(self.status));
        m.insert("Name".into(), json!(self.name));
        for (k, v) in &self.fields {
            m.insert(k.clone(), v.clone());
        }
        m.insert("Addresses".into(), Value::Array(self.addresses.clone()));
        m.insert("Phones".into(), Value::Array(self.phones.clone()));
        m.insert("UpdatedDateUTC".into(), json!(ms_date(self.updated)));
        m.insert("ContactGroups".into(), json!([]));
        m.insert("IsSupplier".into(), json!(self.is_supplier));
        m.insert("IsCustomer".into(), json!(self.is_customer));
        m.insert("ContactPersons".into(), json!([]));
        m.insert("HasAttachments".into(), json!(false));
        m.insert("HasValidationErrors".into(), json!(false));
        Value::Object(m)
    }

    /// The short form embedded in documents.
    pub fn summary_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("ContactID".into(), json!(self.id));
        if let Some(n) = self.number() {
            m.insert("ContactNumber".into(), json!(n));
        }
        m.insert("Name".into(), json!(self.name));
        m.insert("Addresses".into(), json!([]));
        m.insert("Phones".into(), json!([]));
        m.insert("ContactGroups".into(), json!([]));
        m.insert("ContactPersons".into(), json!([]));
        m.insert("HasValidationErrors".into(), json!(false));
        Value::Object(m)
    }
}

/// One line of an invoice or credit note.
#[derive(Debug, Clone)]
pub struct Line {
    pub id: Uuid,
    pub description: Option<String>,
    pub quantity: Option<Decimal>,
    pub unit_amount: Option<Decimal>,
    pub item_code: Option<String>,
    pub account_code: Option<String>,
    pub tax_type: Option<String>,
    pub tax_amount: Decimal,
    pub line_amount: Decimal,
    pub discount_rate: Option<Decimal>,
}

/// Invoice or credit note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocKind {
    /// `/Invoices`.
    Invoice,
    /// `/CreditNotes`.
    CreditNote,
}

impl DocKind {
    /// The collection name (`Invoices` / `CreditNotes`).
    pub fn collection(self) -> &'static str {
        match self {
            DocKind::Invoice => "Invoices",
            DocKind::CreditNote => "CreditNotes",
        }
    }
    /// The id field name.
    pub fn id_field(self) -> &'static str {
        match self {
            DocKind::Invoice => "InvoiceID",
            DocKind::CreditNote => "CreditNoteID",
        }
    }
    /// The number field name.
    pub fn number_field(self) -> &'static str {
        match self {
            DocKind::Invoice => "InvoiceNumber",
            DocKind::CreditNote => "CreditNoteNumber",
        }
    }
    /// The word used in messages.
    pub fn noun(self) -> &'static str {
        match self {
            DocKind::Invoice => "Invoice",
            DocKind::CreditNote => "Credit Note",
        }
    }
    /// Types valid for this kind.
    pub fn types(self) -> &'static [&'static str] {
        match self {
            DocKind::Invoice => &["ACCPAY", "ACCREC"],
            DocKind::CreditNote => &["ACCPAYCREDIT", "ACCRECCREDIT"],
        }
    }
}

/// An invoice or a credit note.
#[derive(Debug, Clone)]
pub struct Doc {
    pub kind: DocKind,
    pub id: Uuid,
    pub doc_type: String,
    pub contact_id: Uuid,
    pub date: NaiveDate,
    pub due_date: Option<NaiveDate>,
    pub line_amount_types: String,
    pub number: Option<String>,
    pub reference: Option<String>,
    pub url: Option<String>,
    pub currency: String,
    pub currency_rate: Option<Decimal>,
    pub status: String,
    pub lines: Vec<Line>,
    pub sub_total: Decimal,
    pub total_tax: Decimal,
    pub total: Decimal,
    /// Invoice: amount due; credit note: remaining credit.
    pub outstanding: Decimal,
    /// Invoice: amount credited; credit note: amount applied.
    pub credited: Decimal,
    pub fully_paid_on: Option<NaiveDate>,
    pub updated: DateTime<Utc>,
    pub has_attachments: bool,
    pub sent_to_contact: bool,
    /// Notes added through `PUT .../{id}/History`, oldest first.
    pub history: Vec<HistoryRecord>,
}

impl Doc {
    /// Xero JSON. `unitdp4` keeps four decimals of unit amounts.
    pub fn to_json(&self, t: &TenantData, unitdp4: bool) -> Value {
        let mut m = Map::new();
        let k = self.kind;
        m.insert("Type".into(), json!(self.doc_type));
        m.insert(k.id_field().into(), json!(self.id));
        m.insert(
            k.number_field().into(),
            json!(self.number.clone().unwrap_or_default()),
        );
        // Reference is "ACCREC only" / "ACCRECCREDIT only" (Invoice and
        // CreditNote in xero_accounting.yaml): bills and supplier credit
        // notes have none.
        if self.doc_type.starts_with("ACCREC") {
            m.insert(
                "Reference".into(),
                json!(self.reference.clone().unwrap_or_default()),
            );
        }
        if let Some(u) = &self.url {
            m.insert("Url".into(), json!(u));
        }
        let contact = t
            .contact(self.contact_id)
            .map(Contact::summary_json)
            .unwrap_or_else(|| json!({ "ContactID": self.contact_id }));
        m.insert("Contact".into(), contact);
        m.insert("DateString".into(), json!(day_string(self.date)));
        m.insert("Date".into(), json!(ms_day(self.date)));
        if let Some(d) = self.due_date {
            m.insert("DueDateString".into(), json!(day_string(d)));
            m.insert("DueDate".into(), json!(ms_day(d)));
        }
        m.insert("Status".into(), json!(self.status));
        m.insert("LineAmountTypes".into(), json!(self.line_amount_types));
        let lines: Vec<Value> = self.lines.iter().map(|l| line_json(l, unitdp4)).collect();
        m.insert("LineItems".into(), Value::Array(lines));
        m.insert("SubTotal".into(), num(self.sub_total));
        m.insert("TotalTax".into(), num(self.total_tax));
        m.insert("Total".into(), num(self.total));
        m.insert("UpdatedDateUTC".into(), json!(ms_date(self.updated)));
        m.insert("CurrencyCode".into(), json!(self.currency));
        m.insert(
            "CurrencyRate".into(),
            num(self.currency_rate.unwrap_or(Decimal::ONE)),
        );
        if let Some(d) = self.fully_paid_on {
            m.insert("FullyPaidOnDate".into(), json!(ms_day(d)));
        }
        m.insert("HasAttachments".into(), json!(self.has_attachments));
        m.insert("HasErrors".into(), json!(false));
        m.insert("SentToContact".into(), json!(self.sent_to_contact));
        m.insert("Payments".into(), json!([]));
        let allocs: Vec<&Allocation> = t
            .allocations
            .iter()
            .filter(|a| match k {
                DocKind::Invoice => a.invoice_id == self.id,
                DocKind::CreditNote => a.credit_note_id == self.id,
            })
            .collect();
        match k {
            DocKind::Invoice => {
                m.insert("AmountDue".into(), num(self.outstanding));
                m.insert("AmountPaid".into(), num(Decimal::ZERO));
                m.insert("AmountCredited".into(), num(self.credited));
                m.insert("IsDiscounted".into(), json!(false));
                m.insert("Prepayments".into(), json!([]));
                m.insert("Overpayments".into(), json!([]));
                let cns: Vec<Value> = allocs
                    .iter()
                    .filter_map(|a| {
                        let cn = t.credit_notes.iter().find(|c| c.id == a.credit_note_id)?;
                        Some(json!({
                            "CreditNoteID": cn.id,
                            "CreditNoteNumber": cn.number.clone().unwrap_or_default(),
                            "Type": cn.doc_type,
                            "Total": num(cn.total),
                            "AppliedAmount": num(a.amount),
                            "Date": ms_day(a.date),
                        }))
                    })
                    .collect();
                m.insert("CreditNotes".into(), Value::Array(cns));
            }
            DocKind::CreditNote => {
                m.insert("RemainingCredit".into(), num(self.outstanding));
                m.insert("AppliedAmount".into(), num(self.credited));
                let list: Vec<Value> = allocs.iter().map(|a| a.to_json(t, false)).collect();
                m.insert("Allocations".into(), Value::Array(list));
            }
        }
        Value::Object(m)
    }
}

fn line_json(l: &Line, unitdp4: bool) -> Value {
    let mut m = Map::new();
    m.insert("LineItemID".into(), json!(l.id));
    if let Some(d) = &l.description {
        m.insert("Description".into(), json!(d));
    }
    if let Some(q) = l.quantity {
        m.insert("Quantity".into(), num(q));
    }
    if let Some(u) = l.unit_amount {
        let u = if unitdp4 { u } else { u.round_dp(2) };
        m.insert("UnitAmount".into(), num(u));
    }
    if let Some(c) = &l.item_code {
        m.insert("ItemCode".into(), json!(c));
    }
    if let Some(c) = &l.account_code {
        m.insert("AccountCode".into(), json!(c));
    }
    if let Some(t) = &l.tax_type {
        m.insert("TaxType".into(), json!(t));
    }
    m.insert("TaxAmount".into(), num(l.tax_amount));
    m.insert("LineAmount".into(), num(l.line_amount));
    if let Some(d) = l.discount_rate {
        m.insert("DiscountRate".into(), num(d));
    }
    m.insert("Tracking".into(), json!([]));
    Value::Object(m)
}

/// A note in a document's history (`HistoryRecord` in the spec).
#[derive(Debug, Clone)]
pub struct HistoryRecord {
    pub changes: String,
    pub user: String,
    pub details: String,
    pub date: DateTime<Utc>,
}

impl HistoryRecord {
    /// Xero JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "Changes": self.changes,
            "DateUTCString": self.date.format("%Y-%m-%dT%H:%M:%S").to_string(),
            "DateUTC": ms_date(self.date),
            "User": self.user,
            "Details": self.details,
        })
    }
}

/// A stored attachment.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub id: Uuid,
    pub owner_kind: DocKind,
    pub owner_id: Uuid,
    pub file_name: String,
    pub mime_type: String,
    pub include_online: bool,
    pub bytes: Vec<u8>,
}

impl Attachment {
    /// Xero JSON (`Url` built on `base_url`).
    pub fn to_json(&self, base_url: &str) -> Value {
        json!({
            "AttachmentID": self.id,
            "FileName": self.file_name,
            "Url": format!(
                "{base_url}/api.xro/2.0/{}/{}/Attachments/{}",
                self.owner_kind.collection(),
                self.owner_id,
                self.file_name
            ),
            "MimeType": self.mime_type,
            "ContentLength": self.bytes.len(),
            "IncludeOnline": self.include_online,
        })
    }
}

/// A credit-note-to-invoice allocation.
#[derive(Debug, Clone)]
pub struct Allocation {
    pub id: Uuid,
    pub credit_note_id: Uuid,
    pub invoice_id: Uuid,
    pub amount: Decimal,
    pub date: NaiveDate,
}

impl Allocation {
    /// Xero JSON; `with_credit_note` adds the credit note reference.
    pub fn to_json(&self, t: &TenantData, with_credit_note: bool) -> Value {
        let inv_number = t
            .invoices
            .iter()
            .find(|i| i.id == self.invoice_id)
            .and_then(|i| i.number.clone())
            .unwrap_or_default();
        let mut v = json!({
            "AllocationID": self.id,
            "Amount": num(self.amount),
            "Date": ms_day(self.date),
            "IsDeleted": false,
            "Invoice": {
                "InvoiceID": self.invoice_id,
                "InvoiceNumber": inv_number,
                "Payments": [], "CreditNotes": [], "Prepayments": [], "Overpayments": [],
                "HasErrors": false, "IsDiscounted": false,
                "LineItems": []
            },
        });
        if with_credit_note && let Some(m) = v.as_object_mut() {
            m.insert(
                "CreditNote".into(),
                json!({ "CreditNoteID": self.credit_note_id, "LineItems": [] }),
            );
        }
        v
    }
}

/// Everything one organisation holds.
#[derive(Debug, Clone)]
pub struct TenantData {
    pub org: OrgConfig,
    pub created: DateTime<Utc>,
    pub accounts: Vec<Account>,
    pub tax_rates: Vec<TaxRate>,
    pub contacts: Vec<Contact>,
    pub contact_index: HashMap<Uuid, usize>,
    pub invoices: Vec<Doc>,
    pub credit_notes: Vec<Doc>,
    pub attachments: Vec<Attachment>,
    pub allocations: Vec<Allocation>,
    /// Cached rendering of the full chart of accounts (hot path for benchmarks).
    pub accounts_json: Vec<Value>,
}

/// code, name, type, class, status, default tax type, system account.
type ChartRow = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
);

fn d(s: &str) -> Decimal {
    s.parse().unwrap_or_default()
}

impl TenantData {
    /// The seeded state of an organisation.
    pub fn seeded(org: &OrgConfig, now: DateTime<Utc>) -> Self {
        let chart: &[ChartRow] = &[
            // code, name, type, class, status, tax type, system account
            (
                "090",
                "Business Bank Account",
                "BANK",
                "ASSET",
                "ACTIVE",
                "NONE",
                None,
            ),
            (
                "200", "Sales", "REVENUE", "REVENUE", "ACTIVE", "OUTPUT2", None,
            ),
            (
                "260",
                "Other Revenue",
                "REVENUE",
                "REVENUE",
                "ACTIVE",
                "OUTPUT2",
                None,
            ),
            (
                "270",
                "Interest Income",
                "REVENUE",
                "REVENUE",
                "ACTIVE",
                "NONE",
                None,
            ),
            (
                "310",
                "Cost of Goods Sold",
                "DIRECTCOSTS",
                "EXPENSE",
                "ACTIVE",
                "INPUT2",
                None,
            ),
            (
                "320",
                "Direct Wages",
                "DIRECTCOSTS",
                "EXPENSE",
                "ACTIVE",
                "NONE",
                None,
            ),
            (
                "400",
                "Advertising & Marketing",
                "OVERHEADS",
                "EXPENSE",
                "ACTIVE",
                "INPUT2",
                None,
            ),
            (
                "401",
                "Audit & Accountancy fees",
                "OVERHEADS",
                "EXPENSE",
                "ARCHIVED",
                "INPUT2",
                None,
            ),
            (
                "404",
                "Bank Fees",
                "OVERHEADS",
                "EXPENSE",
                "ACTIVE",
                "EXEMPTEXPENSES",
                None,
            ),
            (
                "412",
                "Consulting",
                "OVERHEADS",
                "EXPENSE",
                "ACTIVE",
                "INPUT2",
                None,
            ),
            (
                "429",
                "General Expenses",
                "OVERHEADS",
                "EXPENSE",
                "ACTIVE",
                "INPUT2",
                None,
            ),
            (
                "461",
                "Printing & Stationery",
                "OVERHEADS",
                "EXPENSE",
                "ACTIVE",
                "INPUT2",
                None,
            ),
            (
                "477", "Salaries", "EXPENSE", "EXPENSE", "ACTIVE", "NONE", None,
            ),
            (
                "478",
                "Employer Social Contributions",
                "EXPENSE",
                "EXPENSE",
                "ACTIVE",
                "NONE",
                None,
            ),
            (
                "479",
                "Employee Benefits",
                "EXPENSE",
                "EXPENSE",
                "ACTIVE",
                "EXEMPTEXPENSES",
                None,
            ),
            (
                "480",
                "Staff Training",
                "EXPENSE",
                "EXPENSE",
                "ACTIVE",
                "INPUT2",
                None,
            ),
            (
                "485",
                "Subscriptions",
                "OVERHEADS",
                "EXPENSE",
                "ACTIVE",
                "INPUT2",
                None,
            ),
            (
                "493",
                "Travel - National",
                "EXPENSE",
                "EXPENSE",
                "ACTIVE",
                "INPUT2",
                None,
            ),
            (
                "494",
                "Travel - International",
                "EXPENSE",
                "EXPENSE",
                "ACTIVE",
                "ZERORATEDINPUT",
                None,
            ),
            (
                "499",
                "Old Payroll Costs",
                "EXPENSE",
                "EXPENSE",
                "ARCHIVED",
                "NONE",
                None,
            ),
            (
                "610",
                "Accounts Receivable",
                "CURRENT",
                "ASSET",
                "ACTIVE",
                "NONE",
                Some("DEBTORS"),
            ),
            (
                "620",
                "Prepayments",
                "CURRENT",
                "ASSET",
                "ACTIVE",
                "NONE",
                None,
            ),
            (
                "720",
                "Computer Equipment",
                "FIXED",
                "ASSET",
                "ACTIVE",
                "INPUT2",
                None,
            ),
            (
                "800",
                "Accounts Payable",
                "CURRLIAB",
                "LIABILITY",
                "ACTIVE",
                "NONE",
                Some("CREDITORS"),
            ),
            (
                "820",
                "VAT",
                "CURRLIAB",
                "LIABILITY",
                "ACTIVE",
                "NONE",
                Some("GST"),
            ),
            (
                "830",
                "Security Deposits Held",
                "CURRLIAB",
                "LIABILITY",
                "ACTIVE",
                "NONE",
                None,
            ),
            (
                "840",
                "Historical Adjustment",
                "CURRLIAB",
                "LIABILITY",
                "ACTIVE",
                "NONE",
                Some("HISTORICAL"),
            ),
            (
                "900",
                "Loan",
                "TERMLIAB",
                "LIABILITY",
                "ACTIVE",
                "NONE",
                None,
            ),
            (
                "970",
                "Owner A Funds Introduced",
                "EQUITY",
                "EQUITY",
                "ACTIVE",
                "NONE",
                None,
            ),
        ];
        // An Australian organisation's default chart keeps its payroll on
        // payroll account types (Xero's Account Types page; the OpenAPI
        // enum lists only `PAYG`): wages and superannuation are expenses of
        // their own type, and two liabilities hold what is withheld.
        let au: &[ChartRow] = &[
            (
                "477",
                "Wages and Salaries",
                "WAGESEXPENSE",
                "EXPENSE",
                "ACTIVE",
                "NONE",
                None,
            ),
            (
                "478",
                "Superannuation",
                "SUPERANNUATIONEXPENSE",
                "EXPENSE",
                "ACTIVE",
                "NONE",
                None,
            ),
            (
                "825",
                "PAYG Withholdings Payable",
                "PAYGLIABILITY",
                "LIABILITY",
                "ACTIVE",
                "NONE",
                None,
            ),
            (
                "826",
                "Superannuation Payable",
                "SUPERANNUATIONLIABILITY",
                "LIABILITY",
                "ACTIVE",
                "NONE",
                None,
            ),
        ];
        let mut rows: Vec<ChartRow> = chart.to_vec();
        if org.version == "AU" {
            for row in au {
                match rows.iter_mut().find(|r| r.0 == row.0) {
                    Some(r) => *r = *row,
                    None => rows.push(*row),
                }
            }
            rows.sort_by_key(|r| r.0);
        }
        let accounts: Vec<Account> = rows
            .iter()
            .map(|(code, name, kind, class, status, tax, system)| Account {
                id: Uuid::new_v5(&org.tenant_id, code.as_bytes()),
                code: (*code).into(),
                name: (*name).into(),
                kind,
                class,
                status,
                tax_type: tax,
                system: *system,
                updated: now,
            })
            .collect();
        let tax_rates = vec![
            tr("20% (VAT on Expenses)", "INPUT2", "20", "INPUT"),
            tr("20% (VAT on Income)", "OUTPUT2", "20", "OUTPUT"),
            tr("5% (VAT on Expenses)", "INPUT", "5", "INPUT"),
            tr("5% (VAT on Income)", "OUTPUT", "5", "OUTPUT"),
            tr("Exempt Expenses", "EXEMPTEXPENSES", "0", "EXEMPTEXPENSES"),
            tr("Exempt Income", "EXEMPTOUTPUT", "0", "EXEMPTOUTPUT"),
            tr("Zero Rated Expenses", "ZERORATEDINPUT", "0", "INPUT"),
            tr("Zero Rated Income", "ZERORATEDOUTPUT", "0", "OUTPUT"),
            tr("No VAT", "NONE", "0", "NONE"),
            TaxRate {
                status: "DELETED",
                ..tr("15% (Old VAT)", "TAX001", "15", "INPUT")
            },
        ];
        let mut t = TenantData {
            org: org.clone(),
            created: now,
            accounts,
            tax_rates,
            contacts: Vec::new(),
            contact_index: HashMap::new(),
            invoices: Vec::new(),
            credit_notes: Vec::new(),
            attachments: Vec::new(),
            allocations: Vec::new(),
            accounts_json: Vec::new(),
        };
        t.accounts_json = t.accounts.iter().map(account_json).collect();
        t
    }

    /// A contact by id.
    pub fn contact(&self, id: Uuid) -> Option<&Contact> {
        self.contact_index
            .get(&id)
            .and_then(|i| self.contacts.get(*i))
    }

    /// A mutable contact by id.
    pub fn contact_mut(&mut self, id: Uuid) -> Option<&mut Contact> {
        let i = *self.contact_index.get(&id)?;
        self.contacts.get_mut(i)
    }

    /// Add a contact.
    pub fn push_contact(&mut self, c: Contact) {
        self.contact_index.insert(c.id, self.contacts.len());
        self.contacts.push(c);
    }

    /// The tax rate of a tax type, if it exists and is active.
    pub fn tax_rate(&self, tax_type: &str) -> Option<&TaxRate> {
        self.tax_rates
            .iter()
            .find(|t| t.tax_type.eq_ignore_ascii_case(tax_type) && t.status == "ACTIVE")
    }

    /// Whether a currency is enabled.
    pub fn currency_enabled(&self, code: &str) -> bool {
        self.org.base_currency.eq_ignore_ascii_case(code)
            || self
                .org
                .currencies
                .iter()
                .any(|c| c.eq_ignore_ascii_case(code))
    }

    /// Documents of a kind.
    pub fn docs(&self, k: DocKind) -> &Vec<Doc> {
        match k {
            DocKind::Invoice => &self.invoices,
            DocKind::CreditNote => &self.credit_notes,
        }
    }

    /// Documents of a kind, mutable.
    pub fn docs_mut(&mut self, k: DocKind) -> &mut Vec<Doc> {
        match k {
            DocKind::Invoice => &mut self.invoices,
            DocKind::CreditNote => &mut self.credit_notes,
        }
    }

    /// Extra documents sharing Type + number + contact with an earlier one.
    pub fn duplicates(&self) -> u64 {
        let mut seen: HashMap<(String, String, Uuid), u64> = HashMap::new();
        for d in self.invoices.iter().chain(self.credit_notes.iter()) {
            if let Some(n) = d.number.as_deref().filter(|n| !n.is_empty()) {
                *seen
                    .entry((d.doc_type.clone(), n.to_string(), d.contact_id))
                    .or_default() += 1;
            }
        }
        seen.values().map(|n| n.saturating_sub(1)).sum()
    }

    /// The `Organisation` JSON.
    pub fn organisation_json(&self) -> Value {
        let o = &self.org;
        let short: String = o.tenant_id.simple().to_string().chars().take(5).collect();
        json!({
            "OrganisationID": o.tenant_id,
            "APIKey": "",
            "Name": o.name,
            "LegalName": o.name,
            "PaysTax": true,
            "Version": o.version,
            "OrganisationType": "COMPANY",
            "BaseCurrency": o.base_currency,
            "CountryCode": o.country_code,
            "IsDemoCompany": false,
            "OrganisationStatus": "ACTIVE",
            "FinancialYearEndDay": 31,
            "FinancialYearEndMonth": 12,
            "SalesTaxBasis": "ACCRUALS",
            "SalesTaxPeriod": "QUARTERLY1",
            "DefaultSalesTax": "Tax Exclusive",
            "DefaultPurchasesTax": "Tax Exclusive",
            "CreatedDateUTC": ms_date(self.created),
            "OrganisationEntityType": "COMPANY",
            "Timezone": "GMTSTANDARDTIME",
            "ShortCode": format!("!{short}"),
            "Edition": "BUSINESS",
            "Class": "PREMIUM",
            "LineOfBusiness": "Employer of record services",
            "Addresses": [],
            "Phones": [],
            "ExternalLinks": [],
            "PaymentTerms": {},
        })
    }
}

fn tr(name: &'static str, tax_type: &'static str, rate: &str, report: &'static str) -> TaxRate {
    TaxRate {
        name,
        tax_type,
        rate: d(rate),
        status: "ACTIVE",
        report,
    }
}

/// Xero JSON of an account.
pub fn account_json(a: &Account) -> Value {
    json!({
        "AccountID": a.id,
        "Code": a.code,
        "Name": a.name,
        "Status": a.status,
        "Type": a.kind,
        "TaxType": a.tax_type,
        "Class": a.class,
        "EnablePaymentsToAccount": false,
        "ShowInExpenseClaims": a.class == "EXPENSE",
        "BankAccountType": if a.kind == "BANK" { "BANK" } else { "" },
        "ReportingCode": a.class,
        "ReportingCodeName": a.class,
        "SystemAccount": a.system.unwrap_or(""),
        "HasAttachments": false,
        "UpdatedDateUTC": ms_date(a.updated),
        "AddToWatchlist": false,
    })
}

/// Xero JSON of a tax rate.
pub fn tax_rate_json(t: &TaxRate) -> Value {
    json!({
        "Name": t.name,
        "TaxType": t.tax_type,
        "ReportTaxType": t.report,
        "CanApplyToAssets": true,
        "CanApplyToEquity": true,
        "CanApplyToExpenses": true,
        "CanApplyToLiabilities": true,
        "CanApplyToRevenue": true,
        "DisplayTaxRate": num(t.rate),
        "EffectiveRate": num(t.rate),
        "Status": t.status,
        "TaxComponents": [{ "Name": "VAT", "Rate": num(t.rate), "IsCompound": false, "IsNonRecoverable": false }],
    })
}
