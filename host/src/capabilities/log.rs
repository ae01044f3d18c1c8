//! The `log` capability: a connector's log lines go to `tracing`, tagged
//! with the plugin id, bounded in count and length per call so a flooding
//! connector cannot drown the daemon's logs.

use crate::runtime::RuntimeStats;
use crate::runtime::v0_1::ledgerport::connector::log as wit;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Bounds on a connector's logging per call.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    /// Lines emitted per call; the rest are counted and dropped.
    pub max_lines: u32,
    /// Bytes kept of one line.
    pub max_line_bytes: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_lines: 200,
            max_line_bytes: 2048,
        }
    }
}

/// Per-call state of the `log` capability.
pub struct LogCapability {
    plugin_id: Arc<str>,
    limits: LogLimits,
    emitted: u32,
    dropped: u64,
    stats: Arc<RuntimeStats>,
}

impl LogCapability {
    /// A fresh budget for one call.
    pub fn new(plugin_id: Arc<str>, limits: LogLimits, stats: Arc<RuntimeStats>) -> Self {
        Self {
            plugin_id,
            limits,
            emitted: 0,
            dropped: 0,
            stats,
        }
    }

    /// Lines dropped in this call.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Cut `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` on one line: control characters (a newline, a carriage return, an
/// escape sequence) written as escapes, so a guest cannot write lines that
/// look like the daemon's own in a plain-text log.
pub fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

impl wit::Host for LogCapability {
    async fn log(&mut self, level: wit::Level, message: String) {
        if self.emitted >= self.limits.max_lines {
            self.dropped += 1;
            self.stats.log_lines_dropped.fetch_add(1, Ordering::Relaxed);
            if self.dropped == 1 {
                tracing::warn!(plugin = %self.plugin_id, "connector log limit reached; further lines of this call are dropped");
            }
            return;
        }
        self.emitted += 1;
        self.stats.log_lines.fetch_add(1, Ordering::Relaxed);
        let msg = one_line(truncate_utf8(&message, self.limits.max_line_bytes));
        let plugin = &*self.plugin_id;
        match level {
            wit::Level::Trace => tracing::trace!(target: "plugin", plugin, "{msg}"),
            wit::Level::Debug => tracing::debug!(target: "plugin", plugin, "{msg}"),
            wit::Level::Info => tracing::info!(target: "plugin", plugin, "{msg}"),
            wit::Level::Warn => tracing::warn!(target: "plugin", plugin, "{msg}"),
            wit::Level::Error => tracing::error!(target: "plugin", plugin, "{msg}"),
        }
    }
}

#[cfg(test)]
mod one_line_tests {
    use super::one_line;

    /// A guest's message cannot start a line of its own in the log.
    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            one_line("a\nINFO ledgerport: delivered\r\u{1b}[0m"),
            "a\\nINFO ledgerport: delivered\\r\\u{1b}[0m"
        );
        assert!(matches!(
            one_line("plain é 中"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
