//! The `connection` capability: what a connector may know about the
//! connection a call runs for. Never secrets.

use crate::runtime::v0_1::ledgerport::connector::connection as wit;
use std::collections::BTreeMap;

/// The connection a call runs for, as the host knows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectionInfo {
    /// ledgerport's connection id.
    pub connection_id: String,
    /// The platform tenant (customer company).
    pub tenant_id: String,
    /// The provider's organisation id.
    pub external_tenant_id: Option<String>,
    /// The provider's organisation name.
    pub external_tenant_name: Option<String>,
    /// Connector settings (manifest defaults overlaid with the connection's).
    pub settings: BTreeMap<String, String>,
}

/// Per-call state of the `connection` capability.
pub struct ConnectionCapability {
    info: ConnectionInfo,
}

impl ConnectionCapability {
    /// Serve `info` to the guest.
    pub fn new(info: ConnectionInfo) -> Self {
        Self { info }
    }
}

impl wit::Host for ConnectionCapability {
    async fn info(&mut self) -> wit::ConnectionInfo {
        wit::ConnectionInfo {
            connection_id: self.info.connection_id.clone(),
            tenant_id: self.info.tenant_id.clone(),
            external_tenant_id: self.info.external_tenant_id.clone(),
            external_tenant_name: self.info.external_tenant_name.clone(),
            settings: self
                .info
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}
