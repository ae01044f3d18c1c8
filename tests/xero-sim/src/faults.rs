//! Fault injection: per-route error rates, latency, hangs, connection resets,
//! forced 429 bursts and forced `invalid_grant`, drawn from a seeded RNG so a
//! run can be replayed.

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a 429 burst or a rate-limit refusal was about (`X-Rate-Limit-Problem`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RateProblem {
    /// Too many requests in flight for the tenant.
    Concurrent,
    /// Per-tenant minute limit.
    #[default]
    Minute,
    /// Per-tenant daily limit.
    Daily,
    /// App-wide minute limit.
    Appminute,
}

impl RateProblem {
    /// The header value Xero sends.
    pub fn as_str(self) -> &'static str {
        match self {
            RateProblem::Concurrent => "concurrent",
            RateProblem::Minute => "minute",
            RateProblem::Daily => "daily",
            RateProblem::Appminute => "appminute",
        }
    }
}

/// One fault rule. A rule applies to a request when its `route` matches:
/// `None`/`"*"` matches everything, `"/api.xro/2.0/Invoices"` is a path prefix,
/// `"POST /api.xro/2.0/Invoices"` also requires the method. `*` inside a
/// pattern matches one path segment (`"PUT /api.xro/2.0/Invoices/*/Attachments"`).
/// `/_sim` requests are never faulted.
#[derive(Clone, Debug, Serialize, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRule {
    /// Route pattern (see the type docs).
    pub route: Option<String>,
    /// Probability (0..=1) of answering 500.
    pub error_500_rate: f64,
    /// Probability (0..=1) of answering 503 (organisation offline).
    pub error_503_rate: f64,
    /// Latency added before answering, in milliseconds (real time).
    pub latency_ms: u64,
    /// Probability (0..=1) that the request never gets an answer.
    pub hang_rate: f64,
    /// Probability (0..=1) that the connection is reset instead of answered.
    pub reset_rate: f64,
    /// The next N matching requests have their connection reset (like
    /// `force_429`: a test that must see resets gets them whatever the
    /// seed draws).
    pub force_reset: u32,
    /// The next N matching requests are refused with 429.
    pub force_429: u32,
    /// Which limit the forced 429s claim to hit.
    pub force_429_kind: RateProblem,
    /// `Retry-After` seconds sent with forced 429s.
    pub retry_after_secs: u64,
}

/// All faults in force.
#[derive(Clone, Debug, Serialize, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Rules, all of which are checked in order for every request.
    pub rules: Vec<FaultRule>,
    /// Token requests by these client ids fail with `invalid_grant`.
    pub invalid_grant_clients: Vec<String>,
    /// Refresh/code exchanges of these grants (auth event ids) fail with `invalid_grant`.
    pub invalid_grant_grants: Vec<Uuid>,
}

/// The decision for one request.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FaultDecision {
    /// Sleep this long first.
    pub latency_ms: u64,
    /// Never answer.
    pub hang: bool,
    /// Reset the connection.
    pub reset: bool,
    /// Answer with this status (500 or 503).
    pub error_status: Option<u16>,
    /// Answer 429 with this problem and retry-after.
    pub force_429: Option<(RateProblem, u64)>,
}

/// Live fault state: the config plus the seeded RNG and burst counters.
#[derive(Debug)]
pub struct FaultState {
    /// Faults in force.
    pub config: FaultConfig,
    rng: StdRng,
    seed: u64,
}

impl FaultState {
    /// Faults from `config` with an RNG seeded by `seed`.
    pub fn new(config: FaultConfig, seed: u64) -> Self {
        FaultState {
            config,
            rng: StdRng::seed_from_u64(seed),
            seed,
        }
    }

    /// Replace the config and reseed the RNG (so the same config + seed replays).
    pub fn replace(&mut self, config: FaultConfig) {
        self.config = config;
        self.rng = StdRng::seed_from_u64(self.seed);
    }

    /// Decide what happens to a request. Draws one random number per non-zero
    /// rate of each matching rule, in a fixed order.
    pub fn decide(&mut self, method: &str, path: &str) -> FaultDecision {
        let mut d = FaultDecision::default();
        if path.starts_with("/_sim") {
            return d;
        }
        for rule in self.config.rules.iter_mut() {
            if !route_matches(rule.route.as_deref(), method, path) {
                continue;
            }
            d.latency_ms = d.latency_ms.saturating_add(rule.latency_ms);
            let mut roll = |rate: f64| rate > 0.0 && self.rng.random::<f64>() < rate;
            if roll(rule.hang_rate) {
                d.hang = true;
            }
            if roll(rule.reset_rate) {
                d.reset = true;
            }
            if rule.force_reset > 0 {
                rule.force_reset -= 1;
                d.reset = true;
            }
            if roll(rule.error_503_rate) && d.error_status.is_none() {
                d.error_status = Some(503);
            }
            if roll(rule.error_500_rate) && d.error_status.is_none() {
                d.error_status = Some(500);
            }
            if rule.force_429 > 0 && d.force_429.is_none() {
                rule.force_429 -= 1;
                let retry = if rule.retry_after_secs == 0 {
                    60
                } else {
                    rule.retry_after_secs
                };
                d.force_429 = Some((rule.force_429_kind, retry));
            }
        }
        d
    }

    /// Whether a token request for this client / grant must fail with `invalid_grant`.
    pub fn forced_invalid_grant(&self, client_id: &str, grant: Option<Uuid>) -> bool {
        self.config
            .invalid_grant_clients
            .iter()
            .any(|c| c == client_id)
            || grant.is_some_and(|g| self.config.invalid_grant_grants.contains(&g))
    }
}

/// Whether a rule's route pattern matches a request.
pub fn route_matches(pattern: Option<&str>, method: &str, path: &str) -> bool {
    let Some(pattern) = pattern.map(str::trim) else {
        return true;
    };
    if pattern.is_empty() || pattern == "*" {
        return true;
    }
    let (want_method, prefix) = match pattern.split_once(' ') {
        Some((m, p)) => (Some(m.trim()), p.trim()),
        None => (None, pattern),
    };
    if let Some(m) = want_method
        && m != "*"
        && !m.eq_ignore_ascii_case(method)
    {
        return false;
    }
    let want: Vec<&str> = prefix.trim_end_matches('/').split('/').collect();
    let got: Vec<&str> = path.split('/').collect();
    if want.len() > got.len() {
        return false;
    }
    want.iter()
        .zip(got.iter())
        .all(|(w, g)| *w == "*" || w.eq_ignore_ascii_case(g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(route_matches(None, "GET", "/x"));
        assert!(route_matches(
            Some("/api.xro/2.0/Invoices"),
            "GET",
            "/api.xro/2.0/Invoices/abc"
        ));
        assert!(!route_matches(
            Some("POST /api.xro/2.0/Invoices"),
            "GET",
            "/api.xro/2.0/Invoices"
        ));
        assert!(route_matches(
            Some("PUT /api.xro/2.0/Invoices/*/Attachments"),
            "PUT",
            "/api.xro/2.0/Invoices/1/Attachments/a.pdf"
        ));
        assert!(!route_matches(
            Some("/api.xro/2.0/Contacts"),
            "GET",
            "/api.xro/2.0/Invoices"
        ));
    }

    #[test]
    fn seeded_is_replayable() {
        let cfg = FaultConfig {
            rules: vec![FaultRule {
                error_500_rate: 0.5,
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut a = FaultState::new(cfg.clone(), 7);
        let mut b = FaultState::new(cfg, 7);
        let ra: Vec<_> = (0..50)
            .map(|_| a.decide("GET", "/x").error_status)
            .collect();
        let rb: Vec<_> = (0..50)
            .map(|_| b.decide("GET", "/x").error_status)
            .collect();
        assert_eq!(ra, rb);
        assert!(ra.iter().any(Option::is_some) && ra.iter().any(Option::is_none));
    }
}
