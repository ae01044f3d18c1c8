//! A small, real SMTP server (RFC 5321 subset: EHLO/HELO, MAIL, RCPT, DATA,
//! RSET, NOOP, QUIT) on loopback that keeps every message it receives.
//! Tests and the demo send to it with a real SMTP client (lettre) over a
//! real socket, then read back envelope, headers and body.
//!
//! A recipient whose local part is `nobody` (`nobody@acme.test`) is
//! refused as an unknown mailbox (`550 5.1.1`), as a real server refuses
//! one, for tests of notices to an address that does not exist; one whose
//! local part is `busy` is refused for now (`451 4.2.1`, a mailbox
//! over its rate), as greylisting or a busy mailbox is.
//!
//! It can be stopped and started again on the same port, to play an SMTP
//! server that is down for a while. Its port lies below the kernel's
//! ephemeral range (see [`restartable_port`]), so no outgoing connection of
//! another test can take it while the sink is down.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One received message.
#[derive(Debug, Clone)]
pub struct Mail {
    /// Envelope sender.
    pub from: String,
    /// Envelope recipients.
    pub to: Vec<String>,
    /// The raw message (headers and body, dot-unstuffed).
    pub data: String,
}

impl Mail {
    /// A header's value (first occurrence, unfolded).
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or("");
        let mut out: Option<String> = None;
        for line in head.split("\r\n") {
            if line.starts_with(' ') || line.starts_with('\t') {
                if let Some(o) = out.as_mut() {
                    o.push_str(line.trim_start());
                }
                continue;
            }
            if out.is_some() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case(name)
            {
                out = Some(v.trim().to_string());
            }
        }
        out
    }
}

/// A running sink.
pub struct SmtpSink {
    addr: SocketAddr,
    mails: Arc<Mutex<Vec<Mail>>>,
    task: Option<JoinHandle<()>>,
}

impl SmtpSink {
    /// Start on a free loopback port that a restart can have again (see
    /// [`restartable_port`]).
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], restartable_port()?))).await
    }

    /// Start on a given address (e.g. the port of a stopped sink).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mails: Arc<Mutex<Vec<Mail>>> = Arc::default();
        let m2 = mails.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    break;
                };
                let m3 = m2.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(sock, m3).await {
                        tracing::debug!(error = %e, "smtp session ended");
                    }
                });
            }
        });
        Ok(Self {
            addr,
            mails,
            task: Some(task),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything received so far.
    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stop listening (the port is free again).
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback port below the kernel's ephemeral range, for a server
/// that is stopped and started again on the same port (a killed daemon, an
/// SMTP server that is down for a while).
///
/// A port the kernel hands out for `127.0.0.1:0` comes from the ephemeral
/// range, the same range it picks the local ports of outgoing connections
/// from: while the server is down, any client connection on the machine
/// (other tests run in parallel) may take that port, and the restart then
/// fails with "address in use". Below the range only another explicit
/// bind can take it: another test's pick, while this one's server is down.
/// So each pick is also reserved, for the life of the process, by a lock
/// on a file named by the port ([`reserve`]), which every other test
/// process's picker honours. The port is chosen at random and checked
/// free by binding it; an error only if none of 200 tries was free.
pub fn restartable_port() -> std::io::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    // Linux's default range starts at 32768; a narrowed range moves it.
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16;
    let high = ephemeral_start.max(low + 1_000);
    let mut last = None;
    for i in 0..200u64 {
        // RandomState is randomly keyed per process; hashing the try's
        // number gives a fresh pick each time without a rand dependency.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        let port = low + (h.finish() % u64::from(high - low)) as u16;
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => match reserve(port) {
                Ok(true) => return Ok(port),
                Ok(false) => {}
                Err(e) => last = Some(e),
            },
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
}

/// Reserve `port` for this process: an exclusive lock on
/// [`ports_dir`]`/<port>`, held until the process exits (the kernel drops
/// it then, however the process ends). False when another process (or an
/// earlier pick of this one) holds it.
pub fn reserve(port: u16) -> std::io::Result<bool> {
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let dir = ports_dir()?;
    let path = dir.join(port.to_string());
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    std::fs::create_dir_all(&dir).map_err(named)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(named)?;
    match file.try_lock() {
        Ok(()) => {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
            Ok(true)
        }
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(named(e)),
    }
}

/// Where the port reservations are: one directory per user in the temp
/// directory (a directory shared by the users of one machine would be
/// writable only by the first to run the tests). Test processes of
/// different users do not see each other's picks; their binds still do.
pub fn ports_dir() -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")?.uid();
    Ok(std::env::temp_dir().join(format!("ledgerport-test-ports-{uid}")))
}

async fn session(sock: TcpStream, mails: Arc<Mutex<Vec<Mail>>>) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 smtp-sink ESMTP ready\r\n").await?;
    let mut from = String::new();
    let mut to: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if line.len() > 4096 {
            w.write_all(b"500 line too long\r\n").await?;
            continue;
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            w.write_all(b"250-smtp-sink\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 10485760\r\n")
                .await?;
        } else if upper.starts_with("HELO") {
            w.write_all(b"250 smtp-sink\r\n").await?;
        } else if upper.starts_with("MAIL FROM:") {
            from = addr_of(&cmd[10..]);
            to.clear();
            w.write_all(b"250 OK\r\n").await?;
        } else if upper.starts_with("RCPT TO:") {
            let a = addr_of(&cmd[8..]);
            if a.to_ascii_lowercase().starts_with("nobody@") {
                w.write_all(b"550 5.1.1 no such mailbox\r\n").await?;
                continue;
            }
            if a.to_ascii_lowercase().starts_with("busy@") {
                w.write_all(b"451 4.2.1 mailbox busy, try again later\r\n")
                    .await?;
                continue;
            }
            to.push(a);
            w.write_all(b"250 OK\r\n").await?;
        } else if upper == "DATA" {
            if to.is_empty() {
                w.write_all(b"503 need RCPT first\r\n").await?;
                continue;
            }
            w.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
            let mut data = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" || line == ".\n" {
                    break;
                }
                let l = line.strip_prefix('.').unwrap_or(&line);
                data.push_str(l);
                if data.len() > 10 * 1024 * 1024 {
                    w.write_all(b"552 too big\r\n").await?;
                    return Ok(());
                }
            }
            mails.lock().unwrap_or_else(|e| e.into_inner()).push(Mail {
                from: from.clone(),
                to: std::mem::take(&mut to),
                data,
            });
            w.write_all(b"250 OK queued\r\n").await?;
        } else if upper == "RSET" {
            from.clear();
            to.clear();
            w.write_all(b"250 OK\r\n").await?;
        } else if upper == "NOOP" {
            w.write_all(b"250 OK\r\n").await?;
        } else if upper == "QUIT" {
            w.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            w.write_all(b"502 command not implemented\r\n").await?;
        }
    }
}

fn addr_of(s: &str) -> String {
    let s = s.trim();
    let s = s.split_whitespace().next().unwrap_or("");
    s.trim_start_matches('<').trim_end_matches('>').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A picked port stays reserved: no other pick (here or in another
    /// process, which opens the file as this does) can have it while the
    /// server that uses it is down.
    #[test]
    fn a_picked_port_is_reserved_until_the_process_ends() {
        let a = restartable_port().unwrap();
        assert!(!reserve(a).unwrap(), "port {a} was reserved twice");
        // A handle of its own, as another process would open it.
        let other = std::fs::File::open(ports_dir().unwrap().join(a.to_string())).unwrap();
        assert!(matches!(
            other.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        let b = restartable_port().unwrap();
        assert_ne!(a, b);
    }
}
