//! The `mapping` capability: the admin's line-item kind -> account code
//! mappings for the call's tenant and connector, read through the
//! [`MappingStore`] trait (in memory here; SQL in the store).

use crate::runtime::v0_1::ledgerport::connector::mapping as wit;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// Where one line kind goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountMapping {
    /// Line-item kind.
    pub kind: String,
    /// Account code.
    pub account_code: String,
    /// Tax type, when chosen.
    pub tax_type: Option<String>,
}

/// Whose mappings: one tenant, one connector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MappingScope {
    /// The platform tenant.
    pub tenant_id: String,
    /// The connector id.
    pub connector_id: String,
}

/// Source of mappings for the capability.
#[async_trait]
pub trait MappingStore: Send + Sync {
    /// Every mapping of the scope, sorted by kind.
    async fn all(&self, scope: &MappingScope) -> anyhow::Result<Vec<AccountMapping>>;
}

/// Mappings held in memory.
#[derive(Default)]
pub struct MemoryMappings {
    inner: RwLock<BTreeMap<MappingScope, BTreeMap<String, AccountMapping>>>,
}

impl MemoryMappings {
    /// Set (or replace) one mapping.
    pub fn set(&self, scope: &MappingScope, m: AccountMapping) {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        g.entry(scope.clone())
            .or_default()
            .insert(m.kind.clone(), m);
    }
}

#[async_trait]
impl MappingStore for MemoryMappings {
    async fn all(&self, scope: &MappingScope) -> anyhow::Result<Vec<AccountMapping>> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        Ok(g.get(scope)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default())
    }
}

/// Per-call state of the `mapping` capability. The tenant's mappings are
/// read once per call, so a delivery sees one consistent set.
pub struct MappingCapability {
    store: Arc<dyn MappingStore>,
    scope: MappingScope,
    cache: Option<Vec<AccountMapping>>,
}

impl MappingCapability {
    /// Serve `scope`'s mappings from `store`.
    pub fn new(store: Arc<dyn MappingStore>, scope: MappingScope) -> Self {
        Self {
            store,
            scope,
            cache: None,
        }
    }

    async fn load(&mut self) -> &[AccountMapping] {
        if self.cache.is_none() {
            let all = match self.store.all(&self.scope).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "reading mappings failed; the connector sees none");
                    Vec::new()
                }
            };
            self.cache = Some(all);
        }
        self.cache.as_deref().unwrap_or_default()
    }
}

fn to_wit(m: &AccountMapping) -> wit::AccountMapping {
    wit::AccountMapping {
        kind: m.kind.clone(),
        account_code: m.account_code.clone(),
        tax_type: m.tax_type.clone(),
    }
}

impl wit::Host for MappingCapability {
    async fn lookup(&mut self, kind: String) -> Option<wit::AccountMapping> {
        self.load()
            .await
            .iter()
            .find(|m| m.kind == kind)
            .map(to_wit)
    }

    async fn all(&mut self) -> Vec<wit::AccountMapping> {
        self.load().await.iter().map(to_wit).collect()
    }
}
