//! The `kv` capability: small per-connection state a connector keeps
//! between deliveries (e.g. a cached contact id), through the [`KvStore`]
//! trait. Bounded: keys 256 bytes, values 64 KiB.

use crate::runtime::v0_1::ledgerport::connector::kv as wit;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// Longest key accepted.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest value accepted.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Storage behind the capability, keyed by connection.
#[async_trait]
pub trait KvStore: Send + Sync {
    /// Read a value.
    async fn get(&self, connection_id: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
    /// Write a value.
    async fn set(&self, connection_id: &str, key: &str, value: &[u8]) -> anyhow::Result<()>;
    /// Remove a value.
    async fn delete(&self, connection_id: &str, key: &str) -> anyhow::Result<()>;
}

/// Values held in memory.
#[derive(Default)]
pub struct MemoryKv {
    inner: RwLock<BTreeMap<(String, String), Vec<u8>>>,
}

impl MemoryKv {
    /// Remove every value of a connection (e.g. to simulate a lost cache).
    pub fn clear(&self, connection_id: &str) {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        g.retain(|(c, _), _| c != connection_id);
    }
}

#[async_trait]
impl KvStore for MemoryKv {
    async fn get(&self, connection_id: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        Ok(g.get(&(connection_id.to_string(), key.to_string()))
            .cloned())
    }
    async fn set(&self, connection_id: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        g.insert((connection_id.to_string(), key.to_string()), value.to_vec());
        Ok(())
    }
    async fn delete(&self, connection_id: &str, key: &str) -> anyhow::Result<()> {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        g.remove(&(connection_id.to_string(), key.to_string()));
        Ok(())
    }
}

/// Per-call state of the `kv` capability.
pub struct KvCapability {
    store: Arc<dyn KvStore>,
    connection_id: String,
}

impl KvCapability {
    /// Serve `connection_id`'s values from `store`.
    pub fn new(store: Arc<dyn KvStore>, connection_id: String) -> Self {
        Self {
            store,
            connection_id,
        }
    }
}

impl wit::Host for KvCapability {
    async fn get(&mut self, key: String) -> Option<Vec<u8>> {
        match self.store.get(&self.connection_id, &key).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "kv read failed; treated as absent");
                None
            }
        }
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(format!("kv key must be 1 to {MAX_KEY_BYTES} bytes"));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "kv value of {} bytes is over the {MAX_VALUE_BYTES}-byte limit",
                value.len()
            ));
        }
        self.store
            .set(&self.connection_id, &key, &value)
            .await
            .map_err(|e| format!("kv write failed: {e}"))
    }

    async fn delete(&mut self, key: String) {
        if let Err(e) = self.store.delete(&self.connection_id, &key).await {
            tracing::warn!(error = %e, "kv delete failed");
        }
    }
}
