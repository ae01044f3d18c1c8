//! Guest SDK for ledgerport connectors.
//!
//! A connector is a type implementing [`Connector`], exported with
//! [`export_connector!`]. The SDK re-exports the generated WIT bindings
//! ([`bindings`]), wraps the host capabilities in small typed helpers
//! ([`http`], [`mapping`], [`kv`], [`log`], [`connection`]) and offers
//! constructors for every [`DeliveryError`] ([`errors`]).
//!
//! ```ignore
//! struct Hello;
//! impl ledgerport_sdk::Connector for Hello { /* ... */ }
//! ledgerport_sdk::export_connector!(Hello);
//! ```

extern crate self as ledgerport_sdk;

/// The bindings generated from `wit/v0.1` (world `plugin`).
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/v0.1",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "ledgerport_sdk::bindings",
        runtime_path: "ledgerport_sdk::__wit_bindgen_rt",
        generate_all,
    });
}

#[doc(hidden)]
pub use wit_bindgen::rt as __wit_bindgen_rt;

pub use bindings::ledgerport::connector::types::{
    Account, AccountList, CheckReport, ConnectorInfo, Delivery, DeliveryError, Document,
    DocumentKind, FieldError, Line, Party, Pdf, RateLimit, Receipt, TaxBasis, TaxRate,
};

/// What a connector implements. Each method runs in a fresh instance for one
/// call; keep nothing in statics between calls (use [`kv`] instead).
pub trait Connector {
    /// Identity and capabilities (must match the manifest).
    fn describe() -> ConnectorInfo;
    /// Accounts and tax rates for the admin's mapping screen.
    fn list_accounts() -> Result<AccountList, DeliveryError>;
    /// Whether the connection works, and which organisation it writes to.
    fn check() -> Result<CheckReport, DeliveryError>;
    /// Deliver one document, exactly once per `delivery.key`.
    fn deliver(delivery: Delivery, doc: Document) -> Result<Receipt, DeliveryError>;
}

/// Adapter from [`Connector`] to the generated export trait.
#[doc(hidden)]
pub struct Export<T>(core::marker::PhantomData<T>);

impl<T: Connector> bindings::exports::ledgerport::connector::connector::Guest for Export<T> {
    fn describe() -> ConnectorInfo {
        T::describe()
    }
    fn list_accounts() -> Result<AccountList, DeliveryError> {
        T::list_accounts()
    }
    fn check() -> Result<CheckReport, DeliveryError> {
        T::check()
    }
    fn deliver(delivery: Delivery, doc: Document) -> Result<Receipt, DeliveryError> {
        T::deliver(delivery, doc)
    }
}

/// Export a [`Connector`] implementation as this component's `connector`.
///
/// The export exists only in the wasm build, so the same crate also builds
/// and unit-tests natively (`cargo test`).
#[macro_export]
macro_rules! export_connector {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        type __LedgerportExport = $crate::Export<$ty>;
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::__export_plugin!(__LedgerportExport with_types_in $crate::bindings);
    };
}

pub mod alloc;
pub mod errors;
pub mod http;

/// Every instance lives for one call: see [`alloc`].
#[cfg(all(target_arch = "wasm32", feature = "bump-alloc"))]
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::allocator();
#[cfg(not(target_arch = "wasm32"))]
pub mod native;

/// Account mappings of the connection's tenant.
pub mod mapping {
    pub use crate::bindings::ledgerport::connector::mapping::AccountMapping;
    #[cfg(target_arch = "wasm32")]
    pub use crate::bindings::ledgerport::connector::mapping::{all, lookup};
    #[cfg(not(target_arch = "wasm32"))]
    pub use crate::native::mapping::{all, lookup};
    use std::collections::BTreeMap;

    /// Resolve the mapping of every kind in `kinds`, or return every kind
    /// that has none (sorted, without repeats), so the admin sees the whole
    /// list at once.
    pub fn resolve<'a>(
        kinds: impl IntoIterator<Item = &'a str>,
    ) -> Result<BTreeMap<String, AccountMapping>, Vec<String>> {
        let known: BTreeMap<String, AccountMapping> =
            all().into_iter().map(|m| (m.kind.clone(), m)).collect();
        let mut found = BTreeMap::new();
        let mut missing = Vec::new();
        for kind in kinds {
            match known.get(kind) {
                Some(m) => {
                    found.insert(kind.to_string(), m.clone());
                }
                None => {
                    if !missing.iter().any(|k: &String| k == kind) {
                        missing.push(kind.to_string());
                    }
                }
            }
        }
        if missing.is_empty() {
            Ok(found)
        } else {
            missing.sort();
            Err(missing)
        }
    }
}

/// Per-connection small state, with JSON helpers.
pub mod kv {
    #[cfg(target_arch = "wasm32")]
    pub use crate::bindings::ledgerport::connector::kv::{delete, get, set};
    #[cfg(not(target_arch = "wasm32"))]
    pub use crate::native::kv::{delete, get, set};

    /// Read a UTF-8 string value.
    pub fn get_string(key: &str) -> Option<String> {
        get(key).and_then(|v| String::from_utf8(v).ok())
    }

    /// Write a UTF-8 string value.
    pub fn set_string(key: &str, value: &str) -> Result<(), String> {
        set(key, value.as_bytes())
    }

    /// Read a JSON value (None when absent or unreadable).
    pub fn get_json<T: serde::de::DeserializeOwned>(key: &str) -> Option<T> {
        get(key).and_then(|v| serde_json::from_slice(&v).ok())
    }

    /// Write a JSON value.
    pub fn set_json<T: serde::Serialize>(key: &str, value: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        set(key, &bytes)
    }
}

/// Logging into the host's logs.
pub mod log {
    pub use crate::bindings::ledgerport::connector::log::Level;
    #[cfg(target_arch = "wasm32")]
    pub use crate::bindings::ledgerport::connector::log::log;
    #[cfg(not(target_arch = "wasm32"))]
    pub use crate::native::log::log;

    /// Log at debug level.
    pub fn debug(msg: impl AsRef<str>) {
        log(Level::Debug, msg.as_ref())
    }
    /// Log at info level.
    pub fn info(msg: impl AsRef<str>) {
        log(Level::Info, msg.as_ref())
    }
    /// Log at warn level.
    pub fn warn(msg: impl AsRef<str>) {
        log(Level::Warn, msg.as_ref())
    }
    /// Log at error level.
    pub fn error(msg: impl AsRef<str>) {
        log(Level::Error, msg.as_ref())
    }
}

/// Facts about the connection the call runs for.
pub mod connection {
    pub use crate::bindings::ledgerport::connector::connection::ConnectionInfo;
    #[cfg(target_arch = "wasm32")]
    pub use crate::bindings::ledgerport::connector::connection::info;
    #[cfg(not(target_arch = "wasm32"))]
    pub use crate::native::connection::info;

    /// One connector setting by key.
    pub fn setting(info: &ConnectionInfo, key: &str) -> Option<String> {
        info.settings
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}
