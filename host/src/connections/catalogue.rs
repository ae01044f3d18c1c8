//! The platform's catalogue of line-item kinds (what admins map to account
//! codes), read from TOML (`[[kind]] key = "...", name = "..."`). The
//! built-in default is the sample in `examples/catalogue.toml`.

use serde::Deserialize;
use std::path::Path;

/// One line-item kind.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueKind {
    /// The key documents carry (`gross-salary`).
    pub key: String,
    /// Display name.
    pub name: String,
    /// Longer explanation.
    #[serde(default)]
    pub description: Option<String>,
}

/// The catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    /// The kinds, in display order.
    #[serde(rename = "kind", default)]
    pub kinds: Vec<CatalogueKind>,
}

const SAMPLE: &str = include_str!("../../../examples/catalogue.toml");

impl Catalogue {
    /// Parse and check (keys 1-64 of a-z, 0-9, '-'; no duplicates).
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Catalogue = toml::from_str(text).map_err(|e| format!("catalogue: {e}"))?;
        let mut seen = std::collections::BTreeSet::new();
        for k in &c.kinds {
            if k.key.is_empty()
                || k.key.len() > 64
                || !k
                    .key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(format!(
                    "catalogue: kind key {:?} must be 1-64 of a-z, 0-9 and '-'",
                    k.key
                ));
            }
            if !seen.insert(k.key.clone()) {
                return Err(format!("catalogue: kind {:?} appears twice", k.key));
            }
        }
        if c.kinds.is_empty() {
            return Err("catalogue: no [[kind]] entries".into());
        }
        Ok(c)
    }

    /// Read a catalogue file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("catalogue {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{} ({})", e, path.display()))
    }

    /// The sample catalogue (`examples/catalogue.toml`).
    pub fn sample() -> Self {
        // The sample is checked by a test; fall back to empty rather than panic.
        Self::parse(SAMPLE).unwrap_or(Catalogue { kinds: Vec::new() })
    }

    /// Every kind's key: what the ingest API accepts on a line.
    pub fn keys(&self) -> std::collections::BTreeSet<String> {
        self.kinds.iter().map(|k| k.key.clone()).collect()
    }

    /// A kind by key.
    pub fn get(&self, key: &str) -> Option<&CatalogueKind> {
        self.kinds.iter().find(|k| k.key == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_has_the_design_kinds() {
        let c = Catalogue::parse(SAMPLE).unwrap();
        for k in [
            "gross-salary",
            "management-fee",
            "fx-fee",
            "vat",
            "expense-reimbursement",
        ] {
            assert!(c.get(k).is_some(), "{k}");
        }
        assert_eq!(c.kinds.len(), 14);
        assert!(
            Catalogue::parse("[[kind]]\nkey = \"Bad Key\"\nname = \"x\"\n")
                .unwrap_err()
                .contains("Bad Key")
        );
    }
}
