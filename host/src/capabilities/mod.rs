//! The host capabilities a connector may import, one module each, one shape:
//! a per-call state struct that implements the generated `Host` trait of its
//! WIT interface, plus (where storage is involved) a trait the rest of the
//! daemon implements.
//!
//! - [`http`]: outbound HTTP to allow-listed hosts, credentials injected.
//! - [`mapping`]: line-item kind -> account code / tax type.
//! - [`kv`]: small per-connection state.
//! - [`log`]: bounded logging into `tracing`.
//! - [`connection`]: facts about the connection (no secrets).

pub mod connection;
pub mod http;
pub mod kv;
pub mod log;
pub mod mapping;
