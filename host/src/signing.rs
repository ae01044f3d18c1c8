//! Signed plugins: an Ed25519 signature over the installed manifest (which
//! names the component's SHA-256, so it covers the component too). When the
//! operator lists trusted keys, the runtime refuses unsigned plugins and
//! plugins signed by anyone else, saying which.

use crate::manifest::Manifest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// The bytes that are signed: the manifest without its signature keys.
pub fn signed_bytes(m: &Manifest) -> Vec<u8> {
    let mut clean = m.clone();
    clean.signature = None;
    clean.signed_by = None;
    let body = toml::to_string(&clean).unwrap_or_default();
    let mut out = b"ledgerport-plugin-signature-v1\n".to_vec();
    out.extend_from_slice(body.as_bytes());
    out
}

/// A new signing key: (secret, public), both base64.
pub fn generate() -> (String, String) {
    let mut seed = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut seed);
    let sk = SigningKey::from_bytes(&seed);
    (
        B64.encode(sk.to_bytes()),
        B64.encode(sk.verifying_key().to_bytes()),
    )
}

fn key32(b64: &str, what: &str) -> Result<[u8; 32], String> {
    let v = B64
        .decode(b64.trim())
        .map_err(|e| format!("{what} is not base64: {e}"))?;
    v.try_into().map_err(|_| format!("{what} must be 32 bytes"))
}

/// Sign a manifest with a base64 secret key (sets `signed_by` and `signature`).
pub fn sign(m: &mut Manifest, secret_b64: &str) -> Result<(), String> {
    let sk = SigningKey::from_bytes(&key32(secret_b64, "the signing key")?);
    let sig = sk.sign(&signed_bytes(m));
    m.signed_by = Some(B64.encode(sk.verifying_key().to_bytes()));
    m.signature = Some(B64.encode(sig.to_bytes()));
    Ok(())
}

/// Check a manifest's signature against the trusted public keys (base64).
pub fn verify(m: &Manifest, trusted: &[String]) -> Result<(), String> {
    let (Some(by), Some(sig)) = (&m.signed_by, &m.signature) else {
        return Err("the plugin is not signed, and this host only loads signed plugins".into());
    };
    if !trusted.iter().any(|t| t.trim() == by.trim()) {
        return Err(format!(
            "the plugin is signed by {by}, which is not a trusted key"
        ));
    }
    let vk = VerifyingKey::from_bytes(&key32(by, "signed_by")?)
        .map_err(|e| format!("signed_by is not an Ed25519 key: {e}"))?;
    let sig = B64
        .decode(sig.trim())
        .map_err(|e| format!("signature is not base64: {e}"))?;
    let sig = Signature::from_slice(&sig).map_err(|e| format!("signature is malformed: {e}"))?;
    vk.verify(&signed_bytes(m), &sig).map_err(|_| {
        "the signature does not match the manifest (changed after signing?)".to_string()
    })
}
