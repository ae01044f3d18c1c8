//! "Test connection": run the connector's `check` on a tenant's live
//! connection, so an admin can see that ledgerport reaches their
//! organisation (and which one) before any document depends on it, and an
//! operator can tell a broken grant from a broken connector.

use super::{ConnectError, Connections};
use crate::runtime::v0_1::ledgerport::connector::types as wit;
use crate::store::{ConnectionState, StoreError};

/// Why a connection could not be checked, or what the check found wrong.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The tenant has no connection to this connector (404).
    #[error("{tenant} has no {connector} connection")]
    NotConnected {
        /// The tenant.
        tenant: String,
        /// The connector.
        connector: String,
    },
    /// The connection exists but is not live (409).
    #[error("the {connector} connection is {state}: connect it again first")]
    NotActive {
        /// The connector.
        connector: String,
        /// Its state ("needs-reauth", "disconnected").
        state: &'static str,
    },
    /// The connector is not installed on this daemon (409).
    #[error("the {0} connector is not installed on this daemon")]
    NotInstalled(String),
    /// The connector ran and could not confirm the connection (502): what
    /// it or the provider said.
    #[error("{0}")]
    Failed(String),
    /// Storage failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CheckError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            CheckError::NotConnected { .. } => 404,
            CheckError::NotActive { .. } | CheckError::NotInstalled(_) => 409,
            CheckError::Failed(_) => 502,
            CheckError::Store(_) => 500,
        }
    }
}

impl Connections {
    /// Run the connector's `check` on the tenant's connection to
    /// `connector`: the organisation it writes to and the connector's facts
    /// about it. Nothing is written, here or at the provider.
    pub async fn check_connection(
        &self,
        tenant: &str,
        connector: &str,
    ) -> Result<wit::CheckReport, CheckError> {
        let conn = self
            .store()
            .connection_for(tenant, connector)
            .await?
            .ok_or_else(|| CheckError::NotConnected {
                tenant: tenant.to_string(),
                connector: connector.to_string(),
            })?;
        if conn.state != ConnectionState::Active {
            return Err(CheckError::NotActive {
                connector: connector.to_string(),
                state: conn.state.as_str(),
            });
        }
        let p = self
            .plugin(connector)
            .ok_or_else(|| CheckError::NotInstalled(connector.to_string()))?;
        let ctx = self.call_context(&conn.id).await.map_err(|e| match e {
            ConnectError::Store(s) => CheckError::Store(s),
            other => CheckError::Failed(other.to_string()),
        })?;
        match p.runtime.check(&p.plugin, &ctx).await {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(e)) => Err(CheckError::Failed(match e {
                wit::DeliveryError::NeedsReauth(m) => {
                    format!("the connection needs re-authorisation: {m}")
                }
                wit::DeliveryError::Transient(m) => m,
                wit::DeliveryError::RateLimited(_) => {
                    "the accounting system is rate-limiting; try again shortly".into()
                }
                wit::DeliveryError::Rejected(problems) => problems
                    .iter()
                    .map(|p| format!("{}: {}", p.field, p.message))
                    .collect::<Vec<_>>()
                    .join("; "),
                wit::DeliveryError::NeedsMapping(kinds) => {
                    format!("unmapped line kinds: {}", kinds.join(", "))
                }
            })),
            Err(e) => Err(CheckError::Failed(e.to_string())),
        }
    }
}
