//! Connecting a connector that needs no OAuth grant: one whose manifest has
//! no `[oauth]` table, such as the JSON webhook connector, which signs its
//! requests with a secret kept in the connection's settings.
//!
//! There is no consent screen to send the admin to, so connecting is one
//! step: the host runs the connector's `check` with the tenant's settings
//! (a refusal, e.g. a missing signing secret, is returned and nothing is
//! stored), then records the connection as active without tokens. Doing it
//! again reconnects: a connection paused because its settings were wrong
//! resumes, and mappings (kept per tenant and connector) stay. The check of
//! a connection that does not exist yet keeps its kv values in a scratch
//! store that is dropped: they are a cache, and a refusal must leave no
//! trace under an id that never becomes a connection.

use super::{ConnectError, Connections, connector_said};
use crate::capabilities::kv::MemoryKv;
use crate::runtime::v0_1::ledgerport::connector::types as wit;
use crate::store::{Connected, Connection, ConnectionState, NewConnection, Organisation};

impl Connections {
    /// Whether `connector_id` is installed here and connects without an
    /// OAuth grant (see the module's comment). `None` when not installed.
    pub fn connects_without_grant(&self, connector_id: &str) -> Option<bool> {
        self.manifest(connector_id).map(|m| m.oauth.is_none())
    }

    /// Connect `tenant_id` to `connector_id`, a connector that needs no
    /// OAuth grant, on `admin`'s behalf: check the configuration with the
    /// connector, then store the connection as active (or reactivate the
    /// earlier one). Refusals name their field or quote the connector.
    pub async fn connect_without_grant(
        &self,
        tenant_id: &str,
        connector_id: &str,
        admin: &str,
    ) -> Result<Connected, ConnectError> {
        if admin.trim().is_empty() {
            return Err(ConnectError::bad(
                "admin",
                "who is connecting must be named",
            ));
        }
        if self.store().tenant(tenant_id).await?.is_none() {
            return Err(ConnectError::bad(
                "tenant",
                format!("unknown tenant {tenant_id:?}"),
            ));
        }
        let p = self.plugin(connector_id).ok_or_else(|| {
            ConnectError::NotFound(format!("connector {connector_id:?} (not installed)"))
        })?;
        if p.plugin.manifest().oauth.is_some() {
            return Err(ConnectError::bad(
                "connector",
                format!(
                    "{connector_id} connects through its provider's consent screen (OAuth), \
                     not directly"
                ),
            ));
        }
        // The connection as it will be stored, so that the check sees the
        // same id, tenant and settings a delivery will.
        let existing = self.store().connection_for(tenant_id, connector_id).await?;
        let now = self.clock().now_secs();
        let prospective = existing.clone().unwrap_or_else(|| Connection {
            id: uuid::Uuid::new_v4().to_string(),
            tenant_id: tenant_id.to_string(),
            connector_id: connector_id.to_string(),
            state: ConnectionState::Active,
            external_tenant_id: None,
            external_tenant_name: None,
            external_connection_id: None,
            auth_event_id: None,
            scopes: Vec::new(),
            connected_by: None,
            connected_at: None,
            disconnected_at: None,
            state_reason: None,
            updated_at: now,
            mappings_review: false,
            mappings_org: None,
        });
        let mut ctx = self.context_for(&prospective).await?;
        if existing.is_none() {
            // Not a connection yet: what the check keeps goes to a scratch
            // store, dropped afterwards, so that a refused first connect
            // leaves nothing under an id that never becomes a connection.
            ctx.kv = std::sync::Arc::new(MemoryKv::default());
        }
        let checked = p.runtime.check(&p.plugin, &ctx).await.map(|r| {
            r.map(crate::runtime::clean::check_report)
                .map_err(crate::runtime::clean::error)
        });
        let report = match checked {
            Ok(Ok(report)) => report,
            // Its words without the "needs re-authorisation" framing: there
            // is no grant here, only settings to fix.
            Ok(Err(wit::DeliveryError::NeedsReauth(m))) => return Err(ConnectError::Refused(m)),
            Ok(Err(e @ wit::DeliveryError::Rejected(_))) => {
                return Err(ConnectError::Refused(connector_said(e)));
            }
            Ok(Err(e)) => return Err(ConnectError::Unconfirmed(connector_said(e))),
            Err(e) => return Err(ConnectError::Unconfirmed(e.to_string())),
        };
        let reached = report.organisation_name.trim();
        let reached = if reached.is_empty() {
            p.plugin.manifest().name.clone()
        } else {
            reached.to_string()
        };
        let done = self
            .store()
            .finish_connect_as(
                &self.keys,
                &NewConnection {
                    tenant_id: tenant_id.to_string(),
                    connector_id: connector_id.to_string(),
                    admin: admin.to_string(),
                    scopes: Vec::new(),
                    // What the connector reaches stands for the organisation:
                    // when it changes (a new endpoint), the connection's kv
                    // cache, which belongs to the old one, is cleared.
                    organisation: Organisation {
                        tenant_id: reached.clone(),
                        name: reached,
                        connection_id: None,
                    },
                    auth_event_id: None,
                    tokens: None,
                },
                Some(&prospective.id),
                now,
            )
            .await?;
        self.events().emit(done.event.clone());
        Ok(done)
    }
}
