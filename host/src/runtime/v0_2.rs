//! Host bindings for the frozen contract `ledgerport:connector@0.2.x`.
//!
//! One module per contract version (like Zed's extension host): everything
//! that knows about 0.2 lives here, and this module does not change once
//! 0.2 is released. The rest of the host speaks the 0.1 types (the
//! canonical ones); this module converts at the edge:
//!
//! - imports: 0.2's `http`, `mapping`, `kv`, `log` and `connection` are the
//!   same as 0.1's, so their `Host` impls delegate to the 0.1 impls of the
//!   same capability structs (`crate::capabilities`), converting the
//!   (structurally identical) types;
//! - exports: `describe`, `list_accounts`, `check` and `deliver`
//!   call the 0.2 export and convert the result to the 0.1 types. A
//!   document goes in with its 0.2-only data from [`DocumentExtras`]; a
//!   receipt's 0.2-only `warnings` come back as notes prefixed with
//!   [`WARNING_PREFIX`].

use super::v0_1::ledgerport::connector as v1;
use super::{ConnectionData, HostState, HttpData, KvData, LogData, MappingData, TypesData};
use wasmtime::Store;
use wasmtime::component::Linker;

wasmtime::component::bindgen!({
    path: "../wit/v0.2",
    world: "plugin",
    imports: { default: async },
    exports: { default: async },
});

use self::ledgerport::connector as v2;

/// How a 0.2 receipt's warnings appear among the canonical receipt's notes.
pub const WARNING_PREFIX: &str = "Warning: ";

/// Document data the canonical (0.1) document cannot carry, passed
/// alongside it to [`super::Runtime::deliver_with`]. A 0.1 connector never
/// sees it; a 0.2 connector gets it in its document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocumentExtras {
    /// The customer's purchase-order reference (0.2 `document.purchase-order`).
    pub purchase_order: Option<String>,
}

/// Add 0.2's host interfaces to the linker (beside 0.1's: the names differ
/// by version, so both live in one linker).
pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    v2::types::add_to_linker::<_, TypesData>(linker, |s| s)?;
    v2::http::add_to_linker::<_, HttpData>(linker, |s| &mut s.http)?;
    v2::mapping::add_to_linker::<_, MappingData>(linker, |s| &mut s.mapping)?;
    v2::kv::add_to_linker::<_, KvData>(linker, |s| &mut s.kv)?;
    v2::log::add_to_linker::<_, LogData>(linker, |s| &mut s.log)?;
    v2::connection::add_to_linker::<_, ConnectionData>(linker, |s| &mut s.connection)?;
    Ok(())
}

// ---- imports: delegate to the 0.1 capability impls ----

impl v2::types::Host for HostState {}

impl v2::http::Host for crate::capabilities::http::HttpCapability {
    async fn send(
        &mut self,
        req: v2::http::Request,
    ) -> Result<v2::http::Response, v2::http::Error> {
        use v1::http::{Method as M1, Request};
        use v2::http::Method as M2;
        let req = Request {
            method: match req.method {
                M2::Get => M1::Get,
                M2::Post => M1::Post,
                M2::Put => M1::Put,
                M2::Patch => M1::Patch,
                M2::Delete => M1::Delete,
            },
            url: req.url,
            headers: req.headers,
            body: req.body,
            with_credentials: req.with_credentials,
        };
        match v1::http::Host::send(self, req).await {
            Ok(r) => Ok(v2::http::Response {
                status: r.status,
                headers: r.headers,
                body: r.body,
            }),
            Err(e) => Err(match e {
                v1::http::Error::Denied(s) => v2::http::Error::Denied(s),
                v1::http::Error::Timeout => v2::http::Error::Timeout,
                v1::http::Error::Connection(s) => v2::http::Error::Connection(s),
                v1::http::Error::TooLarge(n) => v2::http::Error::TooLarge(n),
                v1::http::Error::CallLimit(n) => v2::http::Error::CallLimit(n),
                v1::http::Error::Unauthorized(s) => v2::http::Error::Unauthorized(s),
            }),
        }
    }
}

fn account_mapping(m: v1::mapping::AccountMapping) -> v2::mapping::AccountMapping {
    v2::mapping::AccountMapping {
        kind: m.kind,
        account_code: m.account_code,
        tax_type: m.tax_type,
    }
}

impl v2::mapping::Host for crate::capabilities::mapping::MappingCapability {
    async fn lookup(&mut self, kind: String) -> Option<v2::mapping::AccountMapping> {
        v1::mapping::Host::lookup(self, kind)
            .await
            .map(account_mapping)
    }
    async fn all(&mut self) -> Vec<v2::mapping::AccountMapping> {
        v1::mapping::Host::all(self)
            .await
            .into_iter()
            .map(account_mapping)
            .collect()
    }
}

impl v2::kv::Host for crate::capabilities::kv::KvCapability {
    async fn get(&mut self, key: String) -> Option<Vec<u8>> {
        v1::kv::Host::get(self, key).await
    }
    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        v1::kv::Host::set(self, key, value).await
    }
    async fn delete(&mut self, key: String) {
        v1::kv::Host::delete(self, key).await
    }
}

impl v2::log::Host for crate::capabilities::log::LogCapability {
    async fn log(&mut self, level: v2::log::Level, message: String) {
        use v1::log::Level as L1;
        use v2::log::Level as L2;
        let level = match level {
            L2::Trace => L1::Trace,
            L2::Debug => L1::Debug,
            L2::Info => L1::Info,
            L2::Warn => L1::Warn,
            L2::Error => L1::Error,
        };
        v1::log::Host::log(self, level, message).await
    }
}

impl v2::connection::Host for crate::capabilities::connection::ConnectionCapability {
    async fn info(&mut self) -> v2::connection::ConnectionInfo {
        let i = v1::connection::Host::info(self).await;
        v2::connection::ConnectionInfo {
            connection_id: i.connection_id,
            tenant_id: i.tenant_id,
            external_tenant_id: i.external_tenant_id,
            external_tenant_name: i.external_tenant_name,
            settings: i.settings,
        }
    }
}

// ---- exports: call the 0.2 connector, answer in the canonical types ----

use v1::types as c;
use v2::types as t;

/// `describe`, answered in the canonical types.
pub(super) async fn describe(
    i: &Plugin,
    s: &mut Store<HostState>,
) -> wasmtime::Result<c::ConnectorInfo> {
    let info = i.ledgerport_connector_connector().call_describe(s).await?;
    Ok(c::ConnectorInfo {
        id: info.id,
        name: info.name,
        version: info.version,
        document_kinds: info.document_kinds.into_iter().map(kind_out).collect(),
    })
}

/// `list-accounts`, answered in the canonical types.
pub(super) async fn list_accounts(
    i: &Plugin,
    s: &mut Store<HostState>,
) -> wasmtime::Result<Result<c::AccountList, c::DeliveryError>> {
    let r = i
        .ledgerport_connector_connector()
        .call_list_accounts(s)
        .await?;
    Ok(r.map(|l| c::AccountList {
        accounts: l
            .accounts
            .into_iter()
            .map(|a| c::Account {
                code: a.code,
                name: a.name,
                account_type: a.account_type,
                tax_type: a.tax_type,
                description: a.description,
            })
            .collect(),
        tax_rates: l
            .tax_rates
            .into_iter()
            .map(|r| c::TaxRate {
                tax_type: r.tax_type,
                name: r.name,
                rate: r.rate,
            })
            .collect(),
    })
    .map_err(error_out))
}

/// `check`, answered in the canonical types.
pub(super) async fn check(
    i: &Plugin,
    s: &mut Store<HostState>,
) -> wasmtime::Result<Result<c::CheckReport, c::DeliveryError>> {
    let r = i.ledgerport_connector_connector().call_check(s).await?;
    Ok(r.map(|r| c::CheckReport {
        organisation_name: r.organisation_name,
        details: r.details,
    })
    .map_err(error_out))
}

/// `deliver` of a canonical document plus its 0.2-only data; the receipt's
/// warnings come back as notes starting with [`WARNING_PREFIX`].
pub(super) async fn deliver(
    i: &Plugin,
    s: &mut Store<HostState>,
    delivery: &c::Delivery,
    doc: &c::Document,
    extras: &DocumentExtras,
) -> wasmtime::Result<Result<c::Receipt, c::DeliveryError>> {
    let delivery = t::Delivery {
        key: delivery.key.clone(),
        attempt: delivery.attempt,
    };
    let doc = document_in(doc, extras);
    let r = i
        .ledgerport_connector_connector()
        .call_deliver(s, &delivery, &doc)
        .await?;
    Ok(r.map(receipt_out).map_err(error_out))
}

/// The 0.2 receipt as a canonical one: warnings join the notes, prefixed.
pub fn receipt_out(r: t::Receipt) -> c::Receipt {
    let mut notes = r.notes;
    notes.extend(
        r.warnings
            .into_iter()
            .map(|w| format!("{WARNING_PREFIX}{w}")),
    );
    c::Receipt {
        external_id: r.external_id,
        external_url: r.external_url,
        notes,
    }
}

/// The canonical document plus its extras, as a 0.2 document.
pub fn document_in(d: &c::Document, extras: &DocumentExtras) -> t::Document {
    t::Document {
        id: d.id.clone(),
        kind: match d.kind {
            c::DocumentKind::Invoice => t::DocumentKind::Invoice,
            c::DocumentKind::CreditNote => t::DocumentKind::CreditNote,
        },
        number: d.number.clone(),
        issue_date: d.issue_date.clone(),
        due_date: d.due_date.clone(),
        currency: d.currency.clone(),
        tax_basis: match d.tax_basis {
            c::TaxBasis::Exclusive => t::TaxBasis::Exclusive,
            c::TaxBasis::Inclusive => t::TaxBasis::Inclusive,
            c::TaxBasis::NoTax => t::TaxBasis::NoTax,
        },
        supplier: party_in(&d.supplier),
        customer: party_in(&d.customer),
        lines: d
            .lines
            .iter()
            .map(|l| t::Line {
                kind: l.kind.clone(),
                description: l.description.clone(),
                quantity: l.quantity.clone(),
                unit_amount: l.unit_amount.clone(),
                tax_amount: l.tax_amount.clone(),
                line_amount: l.line_amount.clone(),
                employee: l.employee.clone(),
                country: l.country.clone(),
            })
            .collect(),
        subtotal: d.subtotal.clone(),
        total_tax: d.total_tax.clone(),
        total: d.total.clone(),
        url: d.url.clone(),
        credits_invoice_number: d.credits_invoice_number.clone(),
        pdf: d.pdf.as_ref().map(|p| match p {
            c::Pdf::Bytes(b) => t::Pdf::Bytes(b.clone()),
            c::Pdf::Reference(u) => t::Pdf::Reference(u.clone()),
        }),
        purchase_order: extras.purchase_order.clone(),
    }
}

fn party_in(p: &c::Party) -> t::Party {
    t::Party {
        id: p.id.clone(),
        name: p.name.clone(),
        tax_number: p.tax_number.clone(),
        email: p.email.clone(),
        address_lines: p.address_lines.clone(),
        country: p.country.clone(),
    }
}

fn kind_out(k: t::DocumentKind) -> c::DocumentKind {
    match k {
        t::DocumentKind::Invoice => c::DocumentKind::Invoice,
        t::DocumentKind::CreditNote => c::DocumentKind::CreditNote,
    }
}

fn error_out(e: t::DeliveryError) -> c::DeliveryError {
    match e {
        t::DeliveryError::Rejected(v) => c::DeliveryError::Rejected(
            v.into_iter()
                .map(|f| c::FieldError {
                    field: f.field,
                    message: f.message,
                    provider_message: f.provider_message,
                })
                .collect(),
        ),
        t::DeliveryError::NeedsMapping(k) => c::DeliveryError::NeedsMapping(k),
        t::DeliveryError::NeedsReauth(s) => c::DeliveryError::NeedsReauth(s),
        t::DeliveryError::RateLimited(r) => c::DeliveryError::RateLimited(c::RateLimit {
            retry_after_seconds: r.retry_after_seconds,
            limit: r.limit,
        }),
        t::DeliveryError::Transient(s) => c::DeliveryError::Transient(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_join_the_notes_after_them_with_a_prefix() {
        let r = receipt_out(t::Receipt {
            external_id: "x".into(),
            external_url: None,
            notes: vec!["credit not allocated".into()],
            warnings: vec!["tax number differs".into()],
        });
        assert_eq!(
            r.notes,
            vec![
                "credit not allocated".to_string(),
                "Warning: tax number differs".to_string()
            ]
        );
    }
}
