//! A stand-in host for native builds, so a connector's own code runs outside
//! wasm: in plain `cargo test` unit tests and in native benchmarks that
//! compare the same translation code with and without the sandbox.
//!
//! In a wasm32 build the SDK's capability functions are the component's
//! imports; in a native build they call the [`Host`] installed on the
//! current thread with [`with_host`]. Calling one with no host installed
//! panics with a message saying so (it is a test set-up mistake).
//!
//! ```
//! use ledgerport_sdk::native::{Error, Host, Request, Response, with_host};
//!
//! struct Echo;
//! impl Host for Echo {
//!     fn send(&mut self, req: &Request) -> Result<Response, Error> {
//!         Ok(Response { status: 200, headers: vec![], body: req.url.clone().into_bytes() })
//!     }
//! }
//! let (status, _host) = with_host(Echo, || {
//!     ledgerport_sdk::http::get("https://example.com/x").send().unwrap().status
//! });
//! assert_eq!(status, 200);
//! ```

pub use crate::bindings::ledgerport::connector::connection::ConnectionInfo;
pub use crate::bindings::ledgerport::connector::http::{Error, Method, Request, Response};
pub use crate::bindings::ledgerport::connector::log::Level;
pub use crate::bindings::ledgerport::connector::mapping::AccountMapping;
use std::cell::RefCell;

/// What the host provides to a connector, for native runs. Every method
/// has a default that behaves like an empty connection (no mappings, empty
/// kv, logs dropped, requests refused), so a test implements only what it
/// scripts.
pub trait Host: std::any::Any {
    /// `http.send`.
    fn send(&mut self, req: &Request) -> Result<Response, Error> {
        Err(Error::Denied(format!(
            "no HTTP stand-in for {} in this native host",
            req.url
        )))
    }
    /// `mapping.all`.
    fn mappings(&mut self) -> Vec<AccountMapping> {
        Vec::new()
    }
    /// `kv.get`.
    fn kv_get(&mut self, _key: &str) -> Option<Vec<u8>> {
        None
    }
    /// `kv.set`.
    fn kv_set(&mut self, _key: &str, _value: &[u8]) -> Result<(), String> {
        Ok(())
    }
    /// `kv.delete`.
    fn kv_delete(&mut self, _key: &str) {}
    /// `log.log`.
    fn log(&mut self, _level: Level, _message: &str) {}
    /// `connection.info`.
    fn connection(&mut self) -> ConnectionInfo {
        ConnectionInfo {
            connection_id: "native".into(),
            tenant_id: "native".into(),
            external_tenant_id: None,
            external_tenant_name: None,
            settings: Vec::new(),
        }
    }
}

thread_local! {
    static HOST: RefCell<Option<Box<dyn Host>>> = const { RefCell::new(None) };
}

/// Run `f` with `host` standing in for the real host on this thread, and
/// give the host back afterwards (to inspect what it recorded).
pub fn with_host<H: Host, R>(host: H, f: impl FnOnce() -> R) -> (R, H) {
    let previous = HOST.with(|h| h.borrow_mut().replace(Box::new(host)));
    let out = f();
    let host: Box<dyn std::any::Any> = HOST
        .with(|h| std::mem::replace(&mut *h.borrow_mut(), previous))
        .expect("the native host was removed during the call");
    let host = host
        .downcast::<H>()
        .expect("the native host was replaced during the call");
    (out, *host)
}

fn host<R>(f: impl FnOnce(&mut dyn Host) -> R) -> R {
    HOST.with(|h| {
        let mut h = h.borrow_mut();
        let h = h.as_deref_mut().expect(
            "a connector capability was called natively with no host; wrap the call in ledgerport_sdk::native::with_host",
        );
        f(h)
    })
}

/// Native `http` import.
pub mod http {
    use super::*;
    /// See the WIT `http.send`.
    pub fn send(req: &Request) -> Result<Response, Error> {
        host(|h| h.send(req))
    }
}

/// Native `mapping` import.
pub mod mapping {
    use super::*;
    /// See the WIT `mapping.lookup`.
    pub fn lookup(kind: &str) -> Option<AccountMapping> {
        host(|h| h.mappings().into_iter().find(|m| m.kind == kind))
    }
    /// See the WIT `mapping.all`.
    pub fn all() -> Vec<AccountMapping> {
        host(|h| h.mappings())
    }
}

/// Native `kv` import.
pub mod kv {
    use super::*;
    /// See the WIT `kv.get`.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        host(|h| h.kv_get(key))
    }
    /// See the WIT `kv.set`.
    pub fn set(key: &str, value: &[u8]) -> Result<(), String> {
        host(|h| h.kv_set(key, value))
    }
    /// See the WIT `kv.delete`.
    pub fn delete(key: &str) {
        host(|h| h.kv_delete(key))
    }
}

/// Native `log` import.
pub mod log {
    use super::*;
    /// See the WIT `log.log`.
    pub fn log(level: Level, message: &str) {
        host(|h| h.log(level, message))
    }
}

/// Native `connection` import.
pub mod connection {
    use super::*;
    /// See the WIT `connection.info`.
    pub fn info() -> ConnectionInfo {
        host(|h| h.connection())
    }
}
