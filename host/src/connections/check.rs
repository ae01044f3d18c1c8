//! "Test connection": run the connector's `check` on a tenant's live
//! connection, so an admin can see that ledgerport reaches their
//! organisation (and which one) before any document depends on it, and an
//! operator can tell a broken grant from a broken connector.
//!
//! A check writes nothing in the accounting system, but it is a real call
//! with the connection's credentials: it may refresh the access token, and
//! a grant the provider refuses marks the connection needs-reauth, as a
//! delivery would. It spends the provider's request budget, so a connection
//! is checked at most once every [`CHECK_COOLDOWN`].

use super::{ConnectError, Connections, connector_said};
use crate::runtime::v0_1::ledgerport::connector::types as wit;
use crate::store::{ConnectionState, StoreError};
use std::time::{Duration, Instant};

/// The shortest time between two checks of one connection.
pub const CHECK_COOLDOWN: Duration = Duration::from_secs(5);

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
        /// Its state in words ("disconnected", "waiting for re-authorisation").
        state: &'static str,
    },
    /// The provider no longer accepts the grant (409): connect again.
    #[error("the connection needs re-authorisation: {0}")]
    NeedsReauth(String),
    /// Checked moments ago (429): the provider's request budget is shared
    /// with deliveries.
    #[error("this connection was checked moments ago; try again in {0} s")]
    TooSoon(u64),
    /// The connector is not installed on this daemon (409).
    #[error("the {0} connector is not installed on this daemon")]
    NotInstalled(String),
    /// The connector ran and could not confirm the connection (502): what
    /// it or the provider said.
    #[error("{0}")]
    Failed(String),
    /// Storage failed (503).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CheckError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            CheckError::NotConnected { .. } => 404,
            CheckError::NotActive { .. }
            | CheckError::NotInstalled(_)
            | CheckError::NeedsReauth(_) => 409,
            CheckError::TooSoon(_) => 429,
            CheckError::Failed(_) => 502,
            CheckError::Store(_) => 503,
        }
    }
}

impl Connections {
    /// Run the connector's `check` on the tenant's connection to
    /// `connector`: the organisation it writes to and the connector's facts
    /// about it. Nothing is written at the provider (see the module's
    /// comment for what the credentials may do).
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
        let state = match conn.state {
            ConnectionState::Active => None,
            ConnectionState::NeedsReauth => Some("waiting for re-authorisation"),
            ConnectionState::Disconnected => Some("disconnected"),
        };
        if let Some(state) = state {
            return Err(CheckError::NotActive {
                connector: connector.to_string(),
                state,
            });
        }
        let p = self
            .plugin(connector)
            .ok_or_else(|| CheckError::NotInstalled(connector.to_string()))?;
        {
            let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if let Some(at) = checked.get(&conn.id)
                && let Some(left) = CHECK_COOLDOWN.checked_sub(now.duration_since(*at))
                && !left.is_zero()
            {
                return Err(CheckError::TooSoon(left.as_secs().max(1)));
            }
            checked.retain(|_, at| now.duration_since(*at) < CHECK_COOLDOWN);
            checked.insert(conn.id.clone(), now);
        }
        let ctx = self.call_context(&conn.id).await.map_err(|e| match e {
            ConnectError::Store(s) => CheckError::Store(s),
            other => CheckError::Failed(other.to_string()),
        })?;
        let checked = p.runtime.check(&p.plugin, &ctx).await.map(|r| {
            r.map(crate::runtime::clean::check_report)
                .map_err(crate::runtime::clean::error)
        });
        match checked {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(wit::DeliveryError::NeedsReauth(m))) => {
                self.mark_needs_reauth(&conn, &m).await;
                Err(CheckError::NeedsReauth(m))
            }
            Ok(Err(e)) => Err(CheckError::Failed(connector_said(e))),
            Err(e) => Err(CheckError::Failed(e.to_string())),
        }
    }
}

impl Connections {
    /// The connector said, outside a delivery (a check, the account list),
    /// that the provider no longer accepts the connection: mark it
    /// needs-reauth as a delivery would, so the card offers Connect and
    /// the deliveries wait for it, unless it was connected again meanwhile.
    pub(crate) async fn mark_needs_reauth(&self, conn: &crate::store::Connection, why: &str) {
        let Some(seen) = conn.connected_at else {
            return;
        };
        match self
            .store()
            .mark_needs_reauth_if_unchanged(&conn.id, seen, why, self.clock().now_secs())
            .await
        {
            Ok(Some(_)) => {
                tracing::warn!(connection = %conn.id, reason = %why, "the connector says the connection needs re-authorisation")
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "recording needs-reauth failed"),
        }
    }
}
