//! Process metrics in the Prometheus text format, served at `/metrics`:
//! deliveries by outcome, delivery latency, plugin call time, token
//! refreshes, SMTP failures (queue depth is read from the store when
//! scraped). Hand-written (a few atomics) rather than a registry crate: the
//! set is small and fixed.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
pub struct Counter(AtomicU64);

impl Counter {
    /// A zero counter.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    /// Add one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

/// A value that goes up and down.
pub struct Gauge(std::sync::atomic::AtomicI64);

impl Gauge {
    /// A zero gauge.
    pub const fn new() -> Self {
        Self(std::sync::atomic::AtomicI64::new(0))
    }
    /// Add one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Take one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// The value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Gauge {
    fn default() -> Self {
        Self::new()
    }
}

/// Upper bounds of the latency histograms, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// A latency histogram with fixed buckets.
pub struct Histogram {
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// An empty histogram.
    pub const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; 12],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
    /// Record one observation.
    pub fn observe(&self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }
    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (i, b) in BUCKETS.iter().enumerate() {
            out.push_str(&format!(
                "{name}_bucket{{le=\"{b}\"}} {}\n",
                self.buckets[i].load(Ordering::Relaxed)
            ));
        }
        let c = self.count.load(Ordering::Relaxed);
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {c}\n"));
        out.push_str(&format!(
            "{name}_sum {}\n{name}_count {c}\n",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        ));
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// Outcomes counted by [`DELIVERIES`].
pub const OUTCOMES: [&str; 8] = [
    "delivered",
    "rejected",
    "needs-mapping",
    "needs-reauth",
    "rate-limited",
    "transient",
    "crashed",
    "waiting",
];

/// Delivery attempts by outcome (indexed like [`OUTCOMES`]).
pub static DELIVERIES: [Counter; 8] = [const { Counter::new() }; 8];
/// Time from claim to recorded outcome.
pub static DELIVERY_SECONDS: Histogram = Histogram::new();
/// Time spent inside connector calls.
pub static PLUGIN_CALL_SECONDS: Histogram = Histogram::new();
/// SMTP sends that failed.
pub static SMTP_FAILURES: Counter = Counter::new();
/// Documents accepted by ingest.
pub static DOCUMENTS_INGESTED: Counter = Counter::new();
/// Deliveries waiting for a rate slot (their dispatcher slot lent out).
pub static PARKED: Gauge = Gauge::new();

/// Count one attempt outcome.
pub fn delivery(outcome: &str) {
    if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
        DELIVERIES[i].inc();
    }
}

/// Render everything; `queue` is (state, count) from the store and
/// `token_refreshes` the token manager's count.
pub fn render(queue: Option<&[(String, i64)]>, token_refreshes: u64) -> String {
    let mut out = String::new();
    out.push_str("# HELP ledgerport_deliveries_total Delivery attempts by outcome.\n# TYPE ledgerport_deliveries_total counter\n");
    for (i, o) in OUTCOMES.iter().enumerate() {
        out.push_str(&format!(
            "ledgerport_deliveries_total{{outcome=\"{o}\"}} {}\n",
            DELIVERIES[i].get()
        ));
    }
    // Whether the store answered: without it the queue is unknown, which
    // is not the same as empty.
    out.push_str(&format!(
        "# HELP ledgerport_store_up Whether the database answered this scrape.\n# TYPE ledgerport_store_up gauge\nledgerport_store_up {}\n",
        u8::from(queue.is_some())
    ));
    if let Some(queue) = queue {
        out.push_str(
            "# HELP ledgerport_queue_depth Deliveries by state.\n# TYPE ledgerport_queue_depth gauge\n",
        );
        // Every state, 0 included: a series that vanishes at 0 reads as
        // "no data", not "none".
        for state in crate::store::outbox::state::ALL {
            let n = queue
                .iter()
                .find(|(s, _)| s == state)
                .map_or(0, |(_, n)| *n);
            out.push_str(&format!(
                "ledgerport_queue_depth{{state=\"{state}\"}} {n}\n"
            ));
        }
    }
    DELIVERY_SECONDS.render(
        "ledgerport_delivery_seconds",
        "Time from claim to recorded outcome.",
        &mut out,
    );
    PLUGIN_CALL_SECONDS.render(
        "ledgerport_plugin_call_seconds",
        "Time inside connector calls.",
        &mut out,
    );
    out.push_str(&format!(
        "# HELP ledgerport_token_refreshes_total OAuth token refreshes.\n# TYPE ledgerport_token_refreshes_total counter\nledgerport_token_refreshes_total {}\n",
        token_refreshes
    ));
    for (name, help, c) in [
        (
            "ledgerport_smtp_failures_total",
            "Failed SMTP sends.",
            &SMTP_FAILURES,
        ),
        (
            "ledgerport_documents_ingested_total",
            "Documents accepted.",
            &DOCUMENTS_INGESTED,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
            c.get()
        ));
    }
    out.push_str(&format!(
        "# HELP ledgerport_deliveries_parked Deliveries waiting for a provider rate slot.\n# TYPE ledgerport_deliveries_parked gauge\nledgerport_deliveries_parked {}\n",
        PARKED.get()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scrape says whether the database answered, and every state's
    /// depth, 0 included (it used to answer an empty queue when the
    /// database was down, and drop a state whose count fell to 0).
    #[test]
    fn a_scrape_tells_an_unknown_queue_from_an_empty_one() {
        let down = render(None, 0);
        assert!(down.contains("ledgerport_store_up 0"), "{down}");
        assert!(!down.contains("ledgerport_queue_depth{"), "{down}");
        let up = render(Some(&[("pending".to_string(), 3)]), 0);
        assert!(up.contains("ledgerport_store_up 1"), "{up}");
        assert!(
            up.contains("ledgerport_queue_depth{state=\"pending\"} 3"),
            "{up}"
        );
        for state in ["failed", "paused", "working", "delivered"] {
            assert!(
                up.contains(&format!("ledgerport_queue_depth{{state=\"{state}\"}} 0")),
                "{state}: {up}"
            );
        }
    }
}
