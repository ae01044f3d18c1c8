//! The platform's documents (invoices and credit notes) as the platform
//! sends them (JSON), and their conversion to the contract's types.

use crate::runtime::v0_1::ledgerport::connector::types as wit;
use base64::Engine as _;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Invoice or credit note.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DocumentKind {
    /// An invoice.
    Invoice,
    /// A credit note.
    CreditNote,
}

/// How line amounts treat tax.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TaxBasis {
    /// Amounts exclude tax.
    #[default]
    Exclusive,
    /// Amounts include tax.
    Inclusive,
    /// No tax.
    NoTax,
}

/// A party on a document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Party {
    /// The platform's id for the party.
    pub id: String,
    /// Name.
    pub name: String,
    /// Tax registration number.
    #[serde(default)]
    pub tax_number: Option<String>,
    /// E-mail.
    #[serde(default)]
    pub email: Option<String>,
    /// Address lines.
    #[serde(default)]
    pub address_lines: Vec<String>,
    /// ISO country code.
    #[serde(default)]
    pub country: Option<String>,
}

/// A document line; amounts are exact decimals.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Line {
    /// Line-item kind from the catalogue.
    pub kind: String,
    /// Description.
    pub description: String,
    /// Quantity.
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    /// Unit amount.
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_amount: Decimal,
    /// Tax amount.
    #[serde(with = "rust_decimal::serde::str")]
    pub tax_amount: Decimal,
    /// Line amount.
    #[serde(with = "rust_decimal::serde::str")]
    pub line_amount: Decimal,
    /// Employee the line is for.
    #[serde(default)]
    pub employee: Option<String>,
    /// Country of employment.
    #[serde(default)]
    pub country: Option<String>,
}

/// The PDF copy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Pdf {
    /// Base64 of the PDF bytes.
    Base64(String),
    /// A URL where the PDF is served.
    Url(String),
}

/// A document as the platform sends it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Document {
    /// The platform's document id.
    pub id: String,
    /// The customer company (tenant) it was issued to.
    pub tenant_id: String,
    /// Invoice or credit note.
    pub kind: DocumentKind,
    /// Document number.
    pub number: String,
    /// Issue date (YYYY-MM-DD).
    pub issue_date: String,
    /// Due date (YYYY-MM-DD).
    #[serde(default)]
    pub due_date: Option<String>,
    /// ISO 4217 currency.
    pub currency: String,
    /// Tax basis.
    #[serde(default)]
    pub tax_basis: TaxBasis,
    /// The platform as supplier.
    pub supplier: Party,
    /// The customer.
    pub customer: Party,
    /// Lines.
    pub lines: Vec<Line>,
    /// Subtotal.
    #[serde(with = "rust_decimal::serde::str")]
    pub subtotal: Decimal,
    /// Total tax.
    #[serde(with = "rust_decimal::serde::str")]
    pub total_tax: Decimal,
    /// Total.
    #[serde(with = "rust_decimal::serde::str")]
    pub total: Decimal,
    /// Link to the document on the platform.
    #[serde(default)]
    pub url: Option<String>,
    /// For a credit note, the invoice number it credits.
    #[serde(default)]
    pub credits_invoice_number: Option<String>,
    /// The PDF copy.
    #[serde(default)]
    pub pdf: Option<Pdf>,
    /// The customer's purchase-order reference. Contract 0.1 has no place
    /// for it; 0.2 connectors get it through [`Document::extras`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purchase_order: Option<String>,
}

/// Why a document cannot be converted for a connector.
#[derive(Debug, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct ConvertError {
    /// The field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Document {
    /// Parse a document from JSON, naming the field on error.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConvertError> {
        serde_json::from_slice(bytes).map_err(|e| ConvertError {
            field: "document".into(),
            message: e.to_string(),
        })
    }

    /// What newer contracts carry beside the canonical (0.1) document.
    pub fn extras(&self) -> crate::runtime::DocumentExtras {
        crate::runtime::DocumentExtras {
            purchase_order: self.purchase_order.clone(),
        }
    }

    /// The contract's view of this document.
    pub fn to_wit(&self) -> Result<wit::Document, ConvertError> {
        let pdf = match &self.pdf {
            None => None,
            Some(Pdf::Url(u)) => Some(wit::Pdf::Reference(u.clone())),
            Some(Pdf::Base64(b)) => Some(wit::Pdf::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .map_err(|e| ConvertError {
                        field: "pdf.base64".into(),
                        message: format!("not valid base64: {e}"),
                    })?,
            )),
        };
        Ok(wit::Document {
            id: self.id.clone(),
            kind: match self.kind {
                DocumentKind::Invoice => wit::DocumentKind::Invoice,
                DocumentKind::CreditNote => wit::DocumentKind::CreditNote,
            },
            number: self.number.clone(),
            issue_date: self.issue_date.clone(),
            due_date: self.due_date.clone(),
            currency: self.currency.clone(),
            tax_basis: match self.tax_basis {
                TaxBasis::Exclusive => wit::TaxBasis::Exclusive,
                TaxBasis::Inclusive => wit::TaxBasis::Inclusive,
                TaxBasis::NoTax => wit::TaxBasis::NoTax,
            },
            supplier: party(&self.supplier),
            customer: party(&self.customer),
            lines: self
                .lines
                .iter()
                .map(|l| wit::Line {
                    kind: l.kind.clone(),
                    description: l.description.clone(),
                    quantity: l.quantity.to_string(),
                    unit_amount: l.unit_amount.to_string(),
                    tax_amount: l.tax_amount.to_string(),
                    line_amount: l.line_amount.to_string(),
                    employee: l.employee.clone(),
                    country: l.country.clone(),
                })
                .collect(),
            subtotal: self.subtotal.to_string(),
            total_tax: self.total_tax.to_string(),
            total: self.total.to_string(),
            url: self.url.clone(),
            credits_invoice_number: self.credits_invoice_number.clone(),
            pdf,
        })
    }
}

fn party(p: &Party) -> wit::Party {
    wit::Party {
        id: p.id.clone(),
        name: p.name.clone(),
        tax_number: p.tax_number.clone(),
        email: p.email.clone(),
        address_lines: p.address_lines.clone(),
        country: p.country.clone(),
    }
}
