//! The `kv` capability: small per-connection state a connector keeps
//! between deliveries (e.g. a cached contact id), through the [`KvStore`]
//! trait. Bounded: keys 256 bytes, values 64 KiB.

use crate::runtime::v0_1::ledgerport::connector::kv as wit;
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

/// Longest key accepted.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest value accepted.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// The most sets one call makes: a connector caches a few values a
/// delivery; thousands in one call are a runaway loop, each a write to the
/// shared database. (Deletes are not counted.)
pub const MAX_WRITES_PER_CALL: u32 = 100;

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

/// A connection's kv values read ahead with a batch of claimed deliveries
/// (`Store::call_data`), shared by every call of that connection in the
/// batch, with the keys any of those calls has written or deleted since.
#[derive(Debug, Default)]
pub struct KvAhead {
    values: HashMap<String, Vec<u8>>,
    written: Mutex<HashSet<String>>,
}

impl KvAhead {
    /// Values as read.
    pub fn new(values: HashMap<String, Vec<u8>>) -> Self {
        Self {
            values,
            written: Mutex::default(),
        }
    }

    /// The values as read (a later write of the batch is not in them).
    pub fn values(&self) -> &HashMap<String, Vec<u8>> {
        &self.values
    }

    /// Whether nothing was read.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// One call's view of the store when its connection's kv values were read
/// ahead with the delivery's batch ([`KvAhead`]). A key found in the read
/// is answered from it, as of the claim, until a call of the batch writes
/// or deletes that key; from then on, and for any key not in the read
/// (absent, or left out of it for its size), the store answers. Writes
/// always go to the store. Other connections' keys are the store's.
///
/// A delivery sees what an earlier one of its connection wrote, whether
/// that one finished before the claim (the read follows it) or ran in the
/// same batch (its write ends the read of the key for the whole batch: a
/// contact id replaced by the first delivery is not the second one's from
/// the stale read). Deliveries running at the same time never had an
/// order between them.
pub struct ReadAheadKv {
    inner: Arc<dyn KvStore>,
    connection_id: String,
    ahead: Arc<KvAhead>,
}

impl ReadAheadKv {
    /// `ahead` (values of `connection_id`) in front of `inner`.
    pub fn new(inner: Arc<dyn KvStore>, connection_id: String, ahead: Arc<KvAhead>) -> Self {
        Self {
            inner,
            connection_id,
            ahead,
        }
    }

    fn read_value(&self, connection_id: &str, key: &str) -> Option<Vec<u8>> {
        if connection_id != self.connection_id {
            return None;
        }
        let written = self.ahead.written.lock().unwrap_or_else(|e| e.into_inner());
        if written.contains(key) {
            return None;
        }
        self.ahead.values.get(key).cloned()
    }

    fn mark_written(&self, connection_id: &str, key: &str) {
        if connection_id == self.connection_id {
            self.ahead
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.to_string());
        }
    }
}

#[async_trait]
impl KvStore for ReadAheadKv {
    async fn get(&self, connection_id: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match self.read_value(connection_id, key) {
            Some(v) => Ok(Some(v)),
            None => self.inner.get(connection_id, key).await,
        }
    }
    async fn set(&self, connection_id: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
        // Marked first: if the write fails half-way, the store is asked.
        self.mark_written(connection_id, key);
        self.inner.set(connection_id, key, value).await
    }
    async fn delete(&self, connection_id: &str, key: &str) -> anyhow::Result<()> {
        self.mark_written(connection_id, key);
        self.inner.delete(connection_id, key).await
    }
}

/// Per-call state of the `kv` capability.
pub struct KvCapability {
    store: Arc<dyn KvStore>,
    connection_id: String,
    /// Sets made in this call.
    writes: u32,
}

impl KvCapability {
    /// Serve `connection_id`'s values from `store`.
    pub fn new(store: Arc<dyn KvStore>, connection_id: String) -> Self {
        Self {
            store,
            connection_id,
            writes: 0,
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
        self.writes += 1;
        if self.writes > MAX_WRITES_PER_CALL {
            return Err(format!(
                "more than {MAX_WRITES_PER_CALL} kv sets in one call"
            ));
        }
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
        // Not counted: a delete does not grow the database, and one dropped
        // would leave a stale value behind.
        if let Err(e) = self.store.delete(&self.connection_id, &key).await {
            tracing::warn!(error = %e, "kv delete failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Arc<KvAhead> {
        Arc::new(KvAhead::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        ))
    }

    async fn get(kv: &dyn KvStore, c: &str, k: &str) -> Option<String> {
        kv.get(c, k)
            .await
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    }

    /// One call makes at most its limit of kv sets: a runaway loop is
    /// refused past it, each set being a write to the shared database.
    #[tokio::test]
    async fn a_call_makes_at_most_its_limit_of_writes() {
        use wit::Host;
        let store = Arc::new(MemoryKv::default());
        let mut cap = KvCapability::new(store.clone(), "c1".into());
        for i in 0..MAX_WRITES_PER_CALL {
            cap.set(format!("k{i}"), b"v".to_vec()).await.unwrap();
        }
        let e = cap.set("one-more".into(), b"v".to_vec()).await.unwrap_err();
        assert!(e.contains("kv sets in one call"), "{e}");
        // A delete still works (not counted: it leaves nothing stale).
        cap.delete("k0".into()).await;
        assert!(store.get("c1", "k0").await.unwrap().is_none());
        assert!(store.get("c1", "one-more").await.unwrap().is_none());
        // The next call has its own budget.
        let mut next = KvCapability::new(store.clone(), "c1".into());
        next.set("one-more".into(), b"v".to_vec()).await.unwrap();
    }

    /// The read answers its keys (the store holds something else for
    /// them, so an answer from the store would show); a key the call wrote
    /// or deleted, a key not in the read and another connection's keys
    /// are the store's; writes reach the store.
    #[tokio::test]
    async fn read_ahead_answers_until_the_call_writes() {
        let store = Arc::new(MemoryKv::default());
        store.set("c1", "contact", b"in-store").await.unwrap();
        store.set("c1", "big", b"large value").await.unwrap();
        store.set("c2", "contact", b"other").await.unwrap();
        let kv = ReadAheadKv::new(
            store.clone(),
            "c1".into(),
            read(&[("contact", "as-read"), ("gone", "as-read")]),
        );
        assert_eq!(get(&kv, "c1", "contact").await.as_deref(), Some("as-read"));
        assert_eq!(get(&kv, "c1", "big").await.as_deref(), Some("large value"));
        assert_eq!(get(&kv, "c1", "absent").await, None);
        assert_eq!(get(&kv, "c2", "contact").await.as_deref(), Some("other"));
        kv.set("c1", "contact", b"new").await.unwrap();
        assert_eq!(get(&kv, "c1", "contact").await.as_deref(), Some("new"));
        assert_eq!(get(&*store, "c1", "contact").await.as_deref(), Some("new"));
        assert_eq!(get(&kv, "c1", "gone").await.as_deref(), Some("as-read"));
        kv.delete("c1", "gone").await.unwrap();
        assert_eq!(get(&kv, "c1", "gone").await, None);
        // A write to another connection leaves this one's read alone.
        kv.set("c2", "gone", b"x").await.unwrap();
        let kv2 = ReadAheadKv::new(store.clone(), "c1".into(), read(&[("gone", "as-read")]));
        kv2.set("c2", "gone", b"y").await.unwrap();
        assert_eq!(get(&kv2, "c1", "gone").await.as_deref(), Some("as-read"));
    }

    /// Two deliveries of one connection in one batch share its read: what
    /// the first writes (a contact id it had to replace) is what the second
    /// reads, not the value read before either ran.
    #[tokio::test]
    async fn a_write_ends_the_read_for_the_whole_batch() {
        let store = Arc::new(MemoryKv::default());
        store.set("c1", "contact", b"old").await.unwrap();
        let batch = read(&[("contact", "old"), ("other", "as-read")]);
        let first = ReadAheadKv::new(store.clone(), "c1".into(), batch.clone());
        let second = ReadAheadKv::new(store.clone(), "c1".into(), batch);
        assert_eq!(
            get(&second, "c1", "other").await.as_deref(),
            Some("as-read")
        );
        first.set("c1", "contact", b"new").await.unwrap();
        assert_eq!(get(&second, "c1", "contact").await.as_deref(), Some("new"));
        first.delete("c1", "other").await.unwrap();
        assert_eq!(get(&second, "c1", "other").await, None);
    }
}
