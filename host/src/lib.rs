//! ledgerport: a daemon that hosts sandboxed WebAssembly connector plugins
//! and pushes a platform's invoices and credit notes into its customers'
//! accounting systems.
//!
//! This crate is the host: the plugin [`runtime`], the [`capabilities`] a
//! connector may import, plugin [`manifest`]s and the platform
//! [`document`] model.

pub mod admin;
pub mod api;
pub mod capabilities;
pub mod connections;
pub mod credentials;
pub mod crypto;
pub mod daemon;
pub mod demo;
pub mod dispatch;
pub mod document;
pub mod ingest;
pub mod integrations;
pub mod manifest;
pub mod metrics;
pub mod notify;
pub mod oauth;
pub mod plugin_store;
pub mod rejections;
pub mod runtime;
pub mod scaffold;
pub mod signing;
pub mod store;
