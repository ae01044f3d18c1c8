//! Encryption of secrets at rest (OAuth tokens, PKCE verifiers): AES-256-GCM
//! under a [`KeyRing`] of 32-byte keys.
//!
//! Every ciphertext names the key that made it: `lp1:<key id>:<base64(nonce
//! || ciphertext+tag)>`, where the key id is derived from the key (a hash,
//! never the key). The newest key encrypts, every key decrypts, so keys can
//! be rotated (`ledgerport keys rotate`) while old rows are re-encrypted.
//! Each ciphertext is bound to where it lives by associated data (e.g.
//! `connection_tokens.access:<connection id>`), so a ciphertext copied into
//! another row does not decrypt.
//!
//! Keys come from `LEDGERPORT_SECRET_KEY` (base64 of 32 bytes; several may be
//! given separated by commas, the newest last) and/or a key file (one base64
//! key per line, `#` comments, the newest last).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The environment variable holding the secret key(s).
pub const KEY_ENV: &str = "LEDGERPORT_SECRET_KEY";
/// The environment variable naming a key file.
pub const KEY_FILE_ENV: &str = "LEDGERPORT_SECRET_KEY_FILE";

const PREFIX: &str = "lp1";

/// Why a key ring could not be built or a secret not decrypted.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// No key was configured.
    #[error(
        "no secret key: set {KEY_ENV} (base64 of 32 random bytes) or give a key file ({KEY_FILE_ENV})"
    )]
    NoKey,
    /// A configured key is malformed.
    #[error("secret key {which} is invalid: {why}")]
    BadKey {
        /// Which key (env var or file and line).
        which: String,
        /// What is wrong (never the key itself).
        why: String,
    },
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    KeyFile {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The ciphertext was made with a key the ring does not hold.
    #[error("secret was encrypted with key {0}, which is not in the key ring")]
    UnknownKey(String),
    /// The ciphertext is malformed or was tampered with.
    #[error("secret cannot be decrypted: {0}")]
    Corrupt(&'static str),
}

/// A secret string in memory: `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself (only to send it where it belongs).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// One 32-byte key with its id.
#[derive(Clone)]
struct RingKey {
    id: String,
    cipher: Aes256Gcm,
}

/// AES-256-GCM keys: the last one encrypts, all of them decrypt.
///
/// A ring loaded from a key file ([`KeyRing::load`]) follows the file:
/// when it meets a secret under a key it does not hold, and before it
/// encrypts, it looks at the file (its size and modification time) and
/// reads it again when it changed, so a running daemon picks up the key
/// `keys rotate` added and re-encrypted with, and encrypts with it, without
/// a restart. Keys it held are kept, so nothing it could read becomes
/// unreadable.
pub struct KeyRing {
    keys: RwLock<Arc<Vec<RingKey>>>,
    /// Where the keys came from, to read them again; `None` for a fixed ring.
    source: Option<KeySource>,
}

/// The environment's keys (fixed for the process) and the key file.
struct KeySource {
    env: Vec<String>,
    file: PathBuf,
    seen: Mutex<Seen>,
    /// At most one warning about an unreadable file per this long.
    every: Duration,
}

/// What a ring last saw of its key file.
#[derive(Default)]
struct Seen {
    /// The file's modification time and length when last read.
    signature: Option<(std::time::SystemTime, u64)>,
    /// When it last warned that the file could not be read.
    warned_at: Option<Instant>,
}

/// A file's modification time and length (`None`: cannot be read).
fn file_signature(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Clone for KeyRing {
    /// The same keys (as they are now) and the same key file to follow.
    fn clone(&self) -> Self {
        Self {
            keys: RwLock::new(self.snapshot()),
            source: self.source.as_ref().map(|s| KeySource {
                env: s.env.clone(),
                file: s.file.clone(),
                seen: Mutex::new(Seen::default()),
                every: s.every,
            }),
        }
    }
}

/// How often a ring warns at most that its key file cannot be read.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

/// The id of a key: a hash of it, safe to store and print.
pub fn key_id(key: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"ledgerport-key-id\0");
    h.update(key);
    hex::encode(&h.finalize()[..8])
}

/// A fresh random key, base64-encoded (for a key file or the env var).
pub fn generate_key() -> String {
    let mut k = [0u8; 32];
    rand::rng().fill_bytes(&mut k);
    STANDARD.encode(k)
}

/// A random URL-safe token of `bytes` random bytes (states, pick ids).
pub fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// SHA-256 of a string, hex (how one-time tokens are looked up without
/// storing them).
pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn parse_key(text: &str, which: &str) -> Result<[u8; 32], CryptoError> {
    let bytes = STANDARD
        .decode(text.trim())
        .or_else(|_| URL_SAFE_NO_PAD.decode(text.trim().trim_end_matches('=')))
        .map_err(|_| CryptoError::BadKey {
            which: which.into(),
            why: "not base64".into(),
        })?;
    bytes.try_into().map_err(|b: Vec<u8>| CryptoError::BadKey {
        which: which.into(),
        why: format!("decodes to {} bytes, expected 32", b.len()),
    })
}

fn parse_keys(keys: &[String], source: &str) -> Result<Vec<[u8; 32]>, CryptoError> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| parse_key(k, &format!("{source} #{}", i + 1)))
        .collect()
}

/// The ring's keys, oldest first, each once.
fn ring_keys(keys: &[[u8; 32]]) -> Result<Vec<RingKey>, CryptoError> {
    if keys.is_empty() {
        return Err(CryptoError::NoKey);
    }
    let mut ring: Vec<RingKey> = Vec::new();
    for k in keys {
        let id = key_id(k);
        if ring.iter().any(|r| r.id == id) {
            continue;
        }
        let cipher = Aes256Gcm::new_from_slice(k).map_err(|_| CryptoError::BadKey {
            which: id.clone(),
            why: "wrong length".into(),
        })?;
        ring.push(RingKey { id, cipher });
    }
    Ok(ring)
}

impl KeyRing {
    /// A ring of the given keys, oldest first (the last encrypts).
    pub fn from_keys(keys: &[[u8; 32]]) -> Result<Self, CryptoError> {
        if keys.is_empty() {
            return Err(CryptoError::NoKey);
        }
        Ok(Self {
            keys: RwLock::new(Arc::new(ring_keys(keys)?)),
            source: None,
        })
    }

    /// Parse base64 keys, oldest first; `source` names them in errors.
    pub fn from_base64(keys: &[String], source: &str) -> Result<Self, CryptoError> {
        Self::from_keys(&parse_keys(keys, source)?)
    }

    /// Keys of a key file (one base64 key per line, `#` comments, newest last).
    pub fn read_key_file(path: &Path) -> Result<Vec<String>, CryptoError> {
        let text = std::fs::read_to_string(path).map_err(|source| CryptoError::KeyFile {
            path: path.display().to_string(),
            source,
        })?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect())
    }

    /// The ring from the environment and/or a key file: the env keys
    /// (`LEDGERPORT_SECRET_KEY`, comma separated) first, then the file's
    /// (`key_file`, or `LEDGERPORT_SECRET_KEY_FILE`); the last key encrypts.
    pub fn load(key_file: Option<&Path>) -> Result<Self, CryptoError> {
        let mut keys: Vec<String> = Vec::new();
        if let Ok(v) = std::env::var(KEY_ENV) {
            keys.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            );
        }
        let env = keys.clone();
        let env_file = std::env::var_os(KEY_FILE_ENV).map(PathBuf::from);
        let file = key_file.map(Path::to_path_buf).or(env_file);
        if let Some(p) = &file {
            if p.exists() {
                keys.extend(Self::read_key_file(p)?);
            } else if keys.is_empty() {
                // The only place keys could come from is missing: say which
                // file, not "give a key file" (one was given).
                return Err(CryptoError::KeyFile {
                    path: p.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("does not exist, and {KEY_ENV} is not set"),
                    ),
                });
            } else {
                // Keys from the environment, and a file `keys rotate` will
                // create: followed once it appears.
                tracing::warn!(path = %p.display(), "the key file does not exist (yet); using the keys of {KEY_ENV} until it does");
            }
        }
        let mut ring = Self::from_base64(&keys, "secret key")?;
        ring.source = file.map(|file| KeySource {
            env,
            seen: Mutex::new(Seen {
                signature: file_signature(&file),
                warned_at: None,
            }),
            file,
            every: RELOAD_EVERY,
        });
        Ok(ring)
    }

    fn snapshot(&self) -> Arc<Vec<RingKey>> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Read the key file again if it changed since it was last read (a
    /// ring from [`KeyRing::load`] only): its newest key encrypts from now
    /// on; keys no longer in the file still decrypt. Returns whether the
    /// ring changed. A file that cannot be read or holds a bad key leaves
    /// the ring as it was (and is said, at most once a second).
    pub fn reload(&self) -> bool {
        let Some(src) = &self.source else {
            return false;
        };
        // One reader at a time: a caller that waited finds the file seen.
        let mut seen = match src.seen.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now_sig = file_signature(&src.file);
        if now_sig.is_some() && now_sig == seen.signature {
            return false;
        }
        let quiet = seen.warned_at.is_some_and(|t| t.elapsed() < src.every);
        let mut texts = src.env.clone();
        match Self::read_key_file(&src.file) {
            Ok(k) => texts.extend(k),
            Err(e) => {
                if !quiet {
                    seen.warned_at = Some(Instant::now());
                    tracing::warn!(error = %e, "key file not read again; keeping the keys loaded");
                }
                return false;
            }
        }
        seen.signature = now_sig;
        let fresh = match parse_keys(&texts, "secret key").and_then(|k| ring_keys(&k)) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "key file not read again; keeping the keys loaded");
                return false;
            }
        };
        let old = self.snapshot();
        // Keys held before and gone from the file still decrypt; the
        // file's newest key encrypts.
        let mut merged: Vec<RingKey> = old
            .iter()
            .filter(|k| !fresh.iter().any(|f| f.id == k.id))
            .cloned()
            .collect();
        merged.extend(fresh);
        if merged.len() == old.len() && merged.iter().zip(old.iter()).all(|(a, b)| a.id == b.id) {
            return false;
        }
        tracing::info!(
            key_ids = ?merged.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
            "key file read again: newest key now encrypts"
        );
        match self.keys.write() {
            Ok(mut k) => *k = Arc::new(merged),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(merged),
        }
        true
    }

    /// Ids of the keys, oldest first.
    pub fn key_ids(&self) -> Vec<String> {
        self.snapshot().iter().map(|k| k.id.clone()).collect()
    }

    /// The id of the key that encrypts.
    pub fn current_key_id(&self) -> String {
        // from_keys refuses an empty ring.
        self.snapshot()
            .last()
            .map(|k| k.id.clone())
            .unwrap_or_default()
    }

    /// Encrypt `plain`, bound to `context` (where it will be stored). A
    /// ring following a key file looks at the file first (its size and
    /// time: a key added by `keys rotate` is the one to encrypt with, even
    /// in a daemon that has not yet read a secret under it).
    pub fn encrypt(&self, plain: &str, context: &str) -> String {
        self.reload();
        let keys = self.snapshot();
        let Some(key) = keys.last() else {
            return String::new();
        };
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        // Encryption with a valid key and nonce cannot fail for our sizes.
        let ct = key
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut blob = Vec::with_capacity(12 + ct.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        format!("{PREFIX}:{}:{}", key.id, STANDARD.encode(blob))
    }

    /// The key id a ciphertext names.
    pub fn key_of(ciphertext: &str) -> Option<&str> {
        let mut parts = ciphertext.splitn(3, ':');
        (parts.next()? == PREFIX).then_some(())?;
        parts.next()
    }

    /// Decrypt a ciphertext made by [`KeyRing::encrypt`] with the same context.
    pub fn decrypt(&self, ciphertext: &str, context: &str) -> Result<Secret, CryptoError> {
        let mut parts = ciphertext.splitn(3, ':');
        if parts.next() != Some(PREFIX) {
            return Err(CryptoError::Corrupt("unknown format"));
        }
        let id = parts.next().ok_or(CryptoError::Corrupt("no key id"))?;
        let body = parts.next().ok_or(CryptoError::Corrupt("no body"))?;
        let mut keys = self.snapshot();
        if !keys.iter().any(|k| k.id == id) {
            // Another caller may have read the file meanwhile: the ring as
            // it is after this, whatever this read found.
            self.reload();
            keys = self.snapshot();
        }
        let key = keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| CryptoError::UnknownKey(id.to_string()))?;
        let blob = STANDARD
            .decode(body)
            .map_err(|_| CryptoError::Corrupt("not base64"))?;
        if blob.len() < 12 + 16 {
            return Err(CryptoError::Corrupt("too short"));
        }
        let (nonce, ct) = blob.split_at(12);
        let plain = key
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| {
                CryptoError::Corrupt("authentication failed (wrong key, row or tampering)")
            })?;
        String::from_utf8(plain)
            .map(Secret)
            .map_err(|_| CryptoError::Corrupt("not UTF-8"))
    }

    /// Re-encrypt under the current key (no-op in effect when it already is).
    pub fn reencrypt(&self, ciphertext: &str, context: &str) -> Result<String, CryptoError> {
        let plain = self.decrypt(ciphertext, context)?;
        Ok(self.encrypt(plain.expose(), context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_rotation_and_binding() {
        let old = KeyRing::from_keys(&[[1u8; 32]]).unwrap();
        let ct = old.encrypt("tok-123", "ctx:a");
        assert!(!ct.contains("tok-123"));
        assert_eq!(old.decrypt(&ct, "ctx:a").unwrap().expose(), "tok-123");
        assert!(old.decrypt(&ct, "ctx:b").is_err(), "bound to its row");
        let both = KeyRing::from_keys(&[[1u8; 32], [2u8; 32]]).unwrap();
        assert_eq!(both.decrypt(&ct, "ctx:a").unwrap().expose(), "tok-123");
        let ct2 = both.reencrypt(&ct, "ctx:a").unwrap();
        assert_eq!(KeyRing::key_of(&ct2), Some(both.current_key_id().as_str()));
        let new_only = KeyRing::from_keys(&[[2u8; 32]]).unwrap();
        assert_eq!(new_only.decrypt(&ct2, "ctx:a").unwrap().expose(), "tok-123");
        assert!(matches!(
            new_only.decrypt(&ct, "ctx:a"),
            Err(CryptoError::UnknownKey(_))
        ));
        assert!(format!("{:?}", Secret::new("tok-123")).contains("redacted"));
        assert!(KeyRing::from_base64(&["short".into()], "env").is_err());
        assert!(matches!(KeyRing::from_keys(&[]), Err(CryptoError::NoKey)));
    }

    fn b64(k: [u8; 32]) -> String {
        STANDARD.encode(k)
    }

    #[test]
    fn a_key_file_that_does_not_exist_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("no-such-keys");
        match (std::env::var(KEY_ENV), KeyRing::load(Some(&file))) {
            (Err(_), Err(e)) => {
                let m = e.to_string();
                assert!(
                    m.contains("no-such-keys") && m.contains("does not exist"),
                    "{m}"
                );
            }
            // Keys from the environment: the file is awaited, not an error.
            (Ok(_), Ok(ring)) => assert!(!ring.key_ids().is_empty()),
            (env, r) => panic!("{:?} with {KEY_ENV} {}", r.map(|_| ()), env.is_ok()),
        }
    }

    #[test]
    fn a_ring_from_a_key_file_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, format!("# first\n{}\n", b64([1; 32]))).unwrap();
        let mut ring = KeyRing::load(Some(&file)).unwrap();
        if let Some(src) = &mut ring.source {
            src.every = Duration::ZERO;
        }
        let env_keys = ring.key_ids().len() - 1;
        let under_a = ring.encrypt("tok-a", "ctx");
        assert_eq!(KeyRing::key_of(&under_a), Some(key_id(&[1; 32]).as_str()));
        // Another process rotates: the file gains key B, which seals a secret.
        let both = KeyRing::from_keys(&[[1; 32], [2; 32]]).unwrap();
        let under_b = both.encrypt("tok-b", "ctx");
        std::fs::write(&file, format!("{}\n{}\n", b64([1; 32]), b64([2; 32]))).unwrap();
        // Before it has read anything under B, the next encryption is
        // under B (it looks at the file first).
        assert_eq!(
            KeyRing::key_of(&ring.encrypt("x", "ctx")),
            Some(key_id(&[2; 32]).as_str())
        );
        assert_eq!(ring.current_key_id(), key_id(&[2; 32]), "B encrypts now");
        assert_eq!(ring.decrypt(&under_b, "ctx").unwrap().expose(), "tok-b");
        // A is removed from the file: what the ring held still decrypts.
        std::fs::write(&file, format!("{}\n", b64([2; 32]))).unwrap();
        let under_c = KeyRing::from_keys(&[[3; 32]])
            .unwrap()
            .encrypt("tok-c", "ctx");
        assert!(matches!(
            ring.decrypt(&under_c, "ctx"),
            Err(CryptoError::UnknownKey(_))
        ));
        assert_eq!(ring.decrypt(&under_a, "ctx").unwrap().expose(), "tok-a");
        assert_eq!(ring.key_ids().len(), env_keys + 2);
        // A file that no longer parses leaves the ring as it was.
        std::fs::write(&file, "not a key\n").unwrap();
        assert!(!ring.reload());
        assert_eq!(ring.current_key_id(), key_id(&[2; 32]));
        // A fixed ring never reads anything.
        assert!(!both.reload());
    }
}
