//! libFuzzer target: the plugin boundary. The input drives one call into a
//! real connector (`target/plugins/<id>/manifest.toml`, built by
//! `cargo xtask wasm`; `FUZZ_PLUGIN=minimal` picks the example connector,
//! default `xero`): a contract document of arbitrary strings and lines,
//! then the provider's answers (status, Retry-After, body bytes) to each
//! request the connector makes. The call must never trap or fail in the
//! runtime, and a delivery error must carry words. See README, "Fuzzing".

#![no_main]

use async_trait::async_trait;
use ledgerport::capabilities::connection::ConnectionInfo;
use ledgerport::capabilities::http::{
    HttpTransport, InboundResponse, OutboundRequest, StaticCredentials, TransportError,
};
use ledgerport::capabilities::kv::MemoryKv;
use ledgerport::capabilities::mapping::{AccountMapping, MappingScope, MemoryMappings};
use ledgerport::runtime::v0_1::ledgerport::connector::types as wit;
use ledgerport::runtime::{CallContext, Plugin, Runtime, RuntimeConfig};
use libfuzzer_sys::arbitrary::{Result as AResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Answers requests from a queue filled from the fuzz input; `{}` after.
#[derive(Default)]
struct Scripted {
    replies: Mutex<VecDeque<InboundResponse>>,
}

#[async_trait]
impl HttpTransport for Scripted {
    async fn send(
        &self,
        _req: OutboundRequest,
        max: u64,
        _timeout: Duration,
    ) -> Result<InboundResponse, TransportError> {
        let r = self.replies.lock().unwrap().pop_front();
        let r = r.unwrap_or(InboundResponse {
            status: 200,
            headers: vec![],
            body: b"{}".to_vec(),
        });
        if r.status == 0 {
            return Err(TransportError::Connection("reset".into()));
        }
        if r.body.len() as u64 > max {
            return Err(TransportError::TooLarge(max));
        }
        Ok(r)
    }
}

struct Harness {
    id: String,
    rt: Runtime,
    plugin: Plugin,
    transport: Arc<Scripted>,
    tokio: tokio::runtime::Runtime,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let id = std::env::var("FUZZ_PLUGIN").unwrap_or_else(|_| "xero".into());
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/plugins")
            .join(&id)
            .join("manifest.toml");
        assert!(
            manifest.exists(),
            "{} missing: run `cargo xtask wasm`",
            manifest.display()
        );
        let transport = Arc::new(Scripted::default());
        let rt = Runtime::new(RuntimeConfig::default(), transport.clone()).expect("runtime");
        let plugin = rt.load(&manifest, &BTreeMap::new()).expect("load");
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        Harness {
            id,
            rt,
            plugin,
            transport,
            tokio,
        }
    })
}

const KINDS: &[&str] = &["gross-salary", "management-fee", "fx-fee", "deposit-refund"];

/// A decimal text: usually plain, sometimes arbitrary.
fn amount(u: &mut Unstructured) -> AResult<String> {
    Ok(if u.ratio(7, 8)? {
        let m: i64 = u.int_in_range(-10_000_000..=100_000_000)?;
        let s: u32 = u.int_in_range(0..=4)?;
        let digits = m.unsigned_abs().to_string();
        let digits = format!(
            "{}{digits}",
            "0".repeat((s as usize + 1).saturating_sub(digits.len()))
        );
        let (i, f) = digits.split_at(digits.len() - s as usize);
        let sign = if m < 0 { "-" } else { "" };
        if s == 0 {
            format!("{sign}{i}")
        } else {
            format!("{sign}{i}.{f}")
        }
    } else {
        u.arbitrary()?
    })
}

fn text(u: &mut Unstructured) -> AResult<String> {
    Ok(if u.ratio(1, 2)? {
        "x".into()
    } else {
        u.arbitrary()?
    })
}

fn document(u: &mut Unstructured) -> AResult<wit::Document> {
    let party = |u: &mut Unstructured| -> AResult<wit::Party> {
        Ok(wit::Party {
            id: text(u)?,
            name: text(u)?,
            tax_number: u.arbitrary()?,
            email: u.arbitrary()?,
            address_lines: vec![],
            country: None,
        })
    };
    let n = u.int_in_range(0..=12)?;
    let mut lines = Vec::with_capacity(n);
    for _ in 0..n {
        lines.push(wit::Line {
            kind: if u.ratio(7, 8)? {
                (*u.choose(KINDS)?).into()
            } else {
                u.arbitrary()?
            },
            description: u.arbitrary()?,
            quantity: amount(u)?,
            unit_amount: amount(u)?,
            tax_amount: amount(u)?,
            line_amount: amount(u)?,
            employee: u.arbitrary()?,
            country: None,
        });
    }
    Ok(wit::Document {
        id: text(u)?,
        kind: if u.arbitrary()? {
            wit::DocumentKind::CreditNote
        } else {
            wit::DocumentKind::Invoice
        },
        number: text(u)?,
        issue_date: "2026-11-02".into(),
        due_date: u.arbitrary()?,
        currency: "EUR".into(),
        tax_basis: *u.choose(&[
            wit::TaxBasis::Exclusive,
            wit::TaxBasis::Inclusive,
            wit::TaxBasis::NoTax,
        ])?,
        supplier: party(u)?,
        customer: party(u)?,
        lines,
        subtotal: amount(u)?,
        total_tax: amount(u)?,
        total: amount(u)?,
        url: u.arbitrary()?,
        credits_invoice_number: u.arbitrary()?,
        pdf: if u.arbitrary()? {
            Some(wit::Pdf::Bytes(u.arbitrary()?))
        } else {
            None
        },
    })
}

fn replies(u: &mut Unstructured) -> AResult<VecDeque<InboundResponse>> {
    let mut out = VecDeque::new();
    while !u.is_empty() && out.len() < 12 {
        let status = if u.ratio(2, 3)? {
            200
        } else {
            u.int_in_range(0..=599)?
        };
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if u.arbitrary()? {
            headers.push(("retry-after".into(), u.arbitrary()?));
        }
        let body: Vec<u8> = u.arbitrary()?;
        out.push_back(InboundResponse {
            status,
            headers,
            body,
        });
    }
    Ok(out)
}

fn run(data: &[u8]) -> AResult<()> {
    let h = harness();
    let mut u = Unstructured::new(data);
    let doc = document(&mut u)?;
    let key: String = if u.arbitrary()? {
        "k-1".into()
    } else {
        u.arbitrary()?
    };
    *h.transport.replies.lock().unwrap() = replies(&mut u)?;
    let mappings = Arc::new(MemoryMappings::default());
    let scope = MappingScope {
        tenant_id: "acme".into(),
        connector_id: h.id.clone(),
    };
    for l in &doc.lines {
        mappings.set(
            &scope,
            AccountMapping {
                kind: l.kind.clone(),
                account_code: "477".into(),
                tax_type: None,
            },
        );
    }
    let ctx = CallContext {
        connection: ConnectionInfo {
            connection_id: "fuzz".into(),
            tenant_id: "acme".into(),
            external_tenant_id: Some("5b3ca1e0-0d1f-4c5e-9a11-000000000002".into()),
            ..Default::default()
        },
        credentials: Arc::new(StaticCredentials("t".into())),
        mappings,
        kv: Arc::new(MemoryKv::default()),
        rate: None,
    };
    let out =
        h.tokio
            .block_on(h.rt.deliver(&h.plugin, &ctx, wit::Delivery { key, attempt: 1 }, doc));
    match out {
        Err(e) => panic!("the call failed in the runtime ({}): {e}", e.kind()),
        Ok(Ok(_)) => {}
        Ok(Err(wit::DeliveryError::Rejected(f))) => {
            assert!(!f.is_empty(), "rejected without fields")
        }
        Ok(Err(wit::DeliveryError::NeedsMapping(k))) => assert!(!k.is_empty()),
        Ok(Err(wit::DeliveryError::NeedsReauth(m) | wit::DeliveryError::Transient(m))) => {
            assert!(!m.is_empty())
        }
        Ok(Err(wit::DeliveryError::RateLimited(_))) => {}
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
