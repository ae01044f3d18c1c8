//! On-disk cache of precompiled components, keyed by the component's
//! SHA-256 and the engine's compatibility hash: the second start of the same
//! plugin on the same engine deserializes instead of compiling.
//!
//! The cache directory belongs to the operator (like the plugin directory):
//! deserializing trusts its contents. Entries are written atomically
//! (temporary file, then rename) so a crash never leaves a torn entry.

use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The file a component's precompiled form is kept in.
pub fn entry_path(engine: &Engine, dir: &Path, component_sha256: &str) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let compat = h.finish();
    let key = hex::encode(Sha256::digest(format!("{component_sha256}:{compat:016x}")));
    dir.join(format!("{}.cwasm", &key[..32]))
}

/// Load a component, from the cache when possible. Returns whether it came
/// from the cache.
pub fn load_component(
    engine: &Engine,
    dir: Option<&Path>,
    component_sha256: &str,
    bytes: &[u8],
) -> wasmtime::Result<(Component, bool)> {
    let Some(dir) = dir else {
        return Ok((Component::from_binary(engine, bytes)?, false));
    };
    let path = entry_path(engine, dir, component_sha256);
    if path.exists() {
        // SAFETY: the cache directory is written only by this code (see the
        // module comment); entries are keyed by engine compatibility.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => return Ok((c, true)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable precompiled component");
            }
        }
    }
    let component = Component::from_binary(engine, bytes)?;
    match component.serialize() {
        Ok(data) => {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &data)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .is_err()
            {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(path = %path.display(), "could not write the precompiled component cache");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not serialize component for the cache"),
    }
    Ok((component, false))
}
