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
/// re-authorise; a refusal by the host, a response over the size cap and
/// the per-delivery call limit fail the same way on every attempt (a
/// connector or configuration problem: retrying for a day would only delay
/// the notice); a timeout or a connection error is worth a retry.
pub fn from_http(err: HttpError) -> DeliveryError {
    match err {
        HttpError::Unauthorized(why) => needs_reauth(why),
        HttpError::Denied(why) => rejected(
            "connector",
            format!("the host refused a request: {why}"),
            None,
        ),
        HttpError::TooLarge(cap) => rejected(
            "connector",
            format!("the provider's answer was larger than the host takes ({cap} bytes)"),
            None,
        ),
        HttpError::CallLimit(n) => rejected(
            "connector",
            format!("the connector made more requests than one delivery may ({n})"),
            None,
        ),
        other => transient(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_may_pass_is_retried() {
        assert!(matches!(
            from_http(HttpError::Timeout),
            DeliveryError::Transient(_)
        ));
        assert!(matches!(
            from_http(HttpError::Connection("reset".into())),
            DeliveryError::Transient(_)
        ));
        assert!(matches!(
            from_http(HttpError::Unauthorized("gone".into())),
            DeliveryError::NeedsReauth(_)
        ));
        for e in [
            HttpError::Denied("host".into()),
            HttpError::TooLarge(8),
            HttpError::CallLimit(50),
        ] {
            assert!(matches!(from_http(e), DeliveryError::Rejected(_)));
        }
    }
}
