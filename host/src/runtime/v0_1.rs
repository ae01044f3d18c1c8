//! Host bindings for the frozen contract `ledgerport:connector@0.1.x`.
//!
//! One module per contract version (like Zed's extension host): a new
//! version gets its own module and bindings; this one does not change.

wasmtime::component::bindgen!({
    path: "../wit/v0.1",
    world: "plugin",
    imports: { default: async },
    exports: { default: async },
});
