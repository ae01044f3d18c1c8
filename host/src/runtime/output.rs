//! A guest's stdout and stderr: kept in a small bounded buffer per call,
//! then written to `tracing` with the plugin id. Writes past the bound are
//! counted and dropped (never an error to the guest, so a chatty connector
//! cannot crash itself or flood the daemon).

use super::RuntimeStats;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

struct Buffers {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    dropped: u64,
}

/// The bounded output of one call.
#[derive(Clone)]
pub struct OutputTail {
    plugin: Arc<str>,
    cap: usize,
    inner: Arc<Mutex<Buffers>>,
    stats: Arc<RuntimeStats>,
}

impl OutputTail {
    /// An empty buffer of `cap` bytes per stream.
    pub fn new(plugin: Arc<str>, cap: usize, stats: Arc<RuntimeStats>) -> Self {
        Self {
            plugin,
            cap,
            inner: Arc::new(Mutex::new(Buffers {
                stdout: Vec::new(),
                stderr: Vec::new(),
                dropped: 0,
            })),
            stats,
        }
    }

    /// A WASI stream writing into this buffer.
    pub fn stream(&self, which: &'static str) -> Sink {
        Sink {
            tail: self.clone(),
            which,
        }
    }

    /// The last `max` bytes of stderr, as text.
    pub fn stderr_tail(&self, max: usize) -> String {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let start = g.stderr.len().saturating_sub(max);
        String::from_utf8_lossy(&g.stderr[start..]).into_owned()
    }

    /// Write what the guest printed to the log and empty the buffer.
    pub fn flush_to_log(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (name, buf) in [("stdout", &g.stdout), ("stderr", &g.stderr)] {
            for line in String::from_utf8_lossy(buf)
                .lines()
                .filter(|l| !l.trim().is_empty())
            {
                let line = crate::capabilities::log::one_line(line);
                tracing::info!(target: "plugin", plugin = %self.plugin, stream = name, "{line}");
            }
        }
        if g.dropped > 0 {
            tracing::warn!(plugin = %self.plugin, bytes = g.dropped, "connector output over the limit was dropped");
        }
        g.stdout.clear();
        g.stderr.clear();
        g.dropped = 0;
    }

    fn write(&self, which: &str, data: &[u8]) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let cap = self.cap;
        let buf = if which == "stdout" {
            &mut g.stdout
        } else {
            &mut g.stderr
        };
        let room = cap.saturating_sub(buf.len());
        let take = room.min(data.len());
        buf.extend_from_slice(&data[..take]);
        let dropped = (data.len() - take) as u64;
        if dropped > 0 {
            g.dropped += dropped;
            self.stats
                .output_bytes_dropped
                .fetch_add(dropped, Ordering::Relaxed);
        }
    }
}

/// One of a guest's output streams.
pub struct Sink {
    tail: OutputTail,
    which: &'static str,
}

impl IsTerminal for Sink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Sink {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(Writer {
            tail: self.tail.clone(),
            which: self.which,
        })
    }
}

struct Writer {
    tail: OutputTail,
    which: &'static str,
}

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.tail.write(self.which, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
