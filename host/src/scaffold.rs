//! `ledgerport plugin new <name>`: a connector crate to start from — a
//! manifest, a connector built on the SDK (it POSTs each document as JSON to
//! a configurable endpoint with an idempotency key), and a passing test of
//! its pure parts.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};

const LIB: &str = include_str!("scaffold/lib.rs.txt");

/// Write a new connector crate `<dir>/<name>`; `sdk` is the path to the
/// `ledgerport-sdk` crate. Returns the crate's directory.
pub fn new_connector(name: &str, dir: &Path, sdk: &Path) -> anyhow::Result<PathBuf> {
    // The crate is `<name>-connector`: cargo refuses a package name that
    // starts with a digit, so the name starts with a letter.
    if !name.starts_with(|c: char| c.is_ascii_lowercase())
        || name.len() > 48
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!(
            "name: {name:?} must be 1-48 of a-z, 0-9 and '-', starting with a letter (it becomes the plugin id and the crate `<name>-connector`)"
        );
    }
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists; nothing was written", root.display());
    }
    let sdk = sdk.canonicalize().with_context(|| {
        format!(
            "sdk: {} not found (pass --sdk <path to plugins/sdk>)",
            sdk.display()
        )
    })?;
    std::fs::create_dir_all(root.join("src"))?;
    let crate_name = format!("{name}-connector");
    std::fs::write(
        root.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{crate_name}\"\nedition = \"2024\"\nversion = \"0.1.0\"\npublish = false\n\n\
             [lib]\ncrate-type = [\"cdylib\", \"rlib\"]\n\n\
             [dependencies]\nledgerport-sdk = {{ path = {sdk:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\nserde_json = \"1\"\n\n\
             # A workspace of its own, so it builds where it lies.\n[workspace]\n\n\
             # Fast over small: the connector runs, in a fresh instance, on every delivery.\n\
             [profile.release]\nopt-level = 3\nstrip = true\nlto = true\ncodegen-units = 1\npanic = \"abort\"\n"
        ),
    )?;
    std::fs::write(root.join("src/lib.rs"), LIB.replace("{{ID}}", name))?;
    std::fs::write(
        root.join("manifest.toml"),
        format!(
            "# Install with: ledgerport plugin install manifest.toml --component target/wasm32-wasip2/release/{}.wasm --dir plugins.d\n\
             id = \"{name}\"\nname = \"{name}\"\nversion = \"0.1.0\"\ncontract = \"0.1.0\"\ncomponent = \"{name}.wasm\"\n\
             allowed_hosts = [\"https://api.example.com\"]\ndocument_kinds = [\"invoice\", \"credit-note\"]\n\n\
             [limits]\nrequests_per_minute = 60\nconcurrent_per_connection = 5\n\n\
             [settings]\nendpoint = \"https://api.example.com/documents\"\n",
            crate_name.replace('-', "_")
        ),
    )?;
    std::fs::write(
        root.join("README.md"),
        format!(
            "# {name}\n\nA ledgerport connector. Build: `cargo build --target wasm32-wasip2 --release`; \
             test: `cargo test`; install: see manifest.toml. Guide: docs/PLUGIN_GUIDE.md in ledgerport.\n"
        ),
    )?;
    Ok(root)
}
