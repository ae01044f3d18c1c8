//! libFuzzer target: bytes as a document handed to ingest. Nothing may
//! panic; an accepted document must survive its own round trip (stored
//! form validates to the same document) and convert to the contract.
//!
//! Seeds: `examples/documents`. See README, "Fuzzing".

#![no_main]

use ledgerport::document::Document;
use ledgerport::ingest::validate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Document::from_json(data);
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    match validate(&json, None) {
        Ok(doc) => {
            let stored = serde_json::to_value(&doc).expect("serialises");
            let again = validate(&stored, None).expect("the stored form is valid");
            assert_eq!(again, doc, "round trip changed the document");
            doc.to_wit().expect("an accepted document converts");
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a reason");
            for p in &problems {
                assert!(!p.field.is_empty() && !p.message.is_empty(), "{p:?}");
                if json.is_object() {
                    assert_ne!(p.field, "document", "field not named: {p:?}");
                }
            }
        }
    }
});
