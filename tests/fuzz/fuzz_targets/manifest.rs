//! libFuzzer target: bytes as a plugin manifest. Nothing may panic; an
//! accepted manifest must round-trip through TOML; a refusal says why.
//!
//! Seeds: `plugins/xero` and `examples/minimal-connector` (their
//! `manifest.toml`). See README, "Fuzzing".

#![no_main]

use ledgerport::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Manifest::parse(text) {
        Ok(m) => {
            let back = toml::to_string(&m).expect("serialises");
            let again = Manifest::parse(&back).expect("the written form parses");
            assert_eq!(again, m, "round trip changed the manifest");
        }
        Err(e) => assert!(!e.to_string().trim().is_empty()),
    }
});
