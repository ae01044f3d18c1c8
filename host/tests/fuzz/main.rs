//! Property-based fuzzing of ledgerport's untrusted inputs: the ingest
//! validator and HTTP route (documents in), the plugin manifest parser, and
//! the plugin boundary (documents into the real connectors, provider
//! responses back through them).
//!
//! Short run (CI, part of `cargo nextest run`): a few hundred cases per
//! property. Long run: `PROPTEST_CASES=100000 cargo nextest run -p ledgerport
//! --test fuzz` (the boundary properties need `cargo xtask wasm` first).
//! A failure prints the minimal input; add it as a `regression_*` test.

mod arb;
mod boundary;
mod ingest;
mod manifest;
