//! Constructors for every [`DeliveryError`], and the usual mapping of a host
//! HTTP error to one.

use crate::http::Error as HttpError;
use crate::{DeliveryError, FieldError, RateLimit};

/// The provider refused the document for one reason.
pub fn rejected(
    field: &str,
    message: impl Into<String>,
    provider: Option<String>,
) -> DeliveryError {
    DeliveryError::Rejected(vec![FieldError {
        field: field.to_string(),
        message: message.into(),
        provider_message: provider,
    }])
}

/// One field-level problem.
pub fn field(field: &str, message: impl Into<String>, provider: Option<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        message: message.into(),
        provider_message: provider,
    }
}

/// These kinds have no mapping.
pub fn needs_mapping(kinds: Vec<String>) -> DeliveryError {
    DeliveryError::NeedsMapping(kinds)
}

/// The admin must reconnect.
pub fn needs_reauth(why: impl Into<String>) -> DeliveryError {
    DeliveryError::NeedsReauth(why.into())
}

/// The provider asked us to wait.
pub fn rate_limited(retry_after_seconds: u32, limit: impl Into<String>) -> DeliveryError {
    DeliveryError::RateLimited(RateLimit {
        retry_after_seconds,
        limit: limit.into(),
    })
}

/// Try again later.
pub fn transient(why: impl Into<String>) -> DeliveryError {
    DeliveryError::Transient(why.into())
}

/// The usual outcome for a failed host HTTP call: no credentials means
/// re-authorise; a refusal by the host is a permanent configuration problem;
/// everything else is worth a retry.
pub fn from_http(err: HttpError) -> DeliveryError {
    match err {
        HttpError::Unauthorized(why) => needs_reauth(why),
        HttpError::Denied(why) => rejected(
            "connector",
            format!("the host refused a request: {why}"),
            None,
        ),
        other => transient(other.to_string()),
    }
}
