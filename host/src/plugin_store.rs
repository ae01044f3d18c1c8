//! Installing plugins: copy a built component beside its manifest and
//! record the component's SHA-256 in the manifest, so the runtime can refuse
//! anything that changed afterwards.

use crate::manifest::Manifest;
use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Install `component` with the manifest at `source_manifest` into
/// `dir/<id>/`. Returns the installed manifest's path.
pub fn install(source_manifest: &Path, component: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(source_manifest)
        .with_context(|| format!("reading {}", source_manifest.display()))?;
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", source_manifest.display()))?;
    // A mistake in the author's own file is reported against it, with its
    // line numbers (the check below reads the rewritten copy). Only the
    // keys install fills in may be missing here.
    if let Err(e) = toml::from_str::<Manifest>(&text) {
        let message = e.to_string();
        if !message.contains("missing field `component`") {
            bail!("manifest {}: {message}", source_manifest.display());
        }
    }
    let bytes = std::fs::read(component)
        .with_context(|| format!("reading component {}", component.display()))?;
    if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
        bail!("{} is not a WebAssembly file", component.display());
    }
    let sha = hex::encode(Sha256::digest(&bytes));
    let Some(id) = table.get("id").and_then(|v| v.as_str()).map(String::from) else {
        bail!("manifest key `id` is missing");
    };
    let file = format!("{id}.wasm");
    table.insert("component".into(), toml::Value::String(file.clone()));
    table.insert("sha256".into(), toml::Value::String(sha));
    let out_text = toml::to_string_pretty(&table)?;
    // Validate before writing anything.
    Manifest::parse(&out_text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let target = dir.join(&id);
    std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    let tmp = target.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, target.join(&file))?;
    let manifest_path = target.join("manifest.toml");
    std::fs::write(
        &manifest_path,
        format!(
            "# Installed by `ledgerport plugin install`; sha256 is the component's hash.\n{out_text}"
        ),
    )?;
    Ok(manifest_path)
}
