//! Durable storage: one [`Store`] over SQLite (the default; a file created on
//! first start, WAL journal) or PostgreSQL (several daemons sharing the work),
//! with embedded migrations per engine.
//!
//! # Pattern
//!
//! `Store` wraps a pool of either engine. Every table family lives in its own
//! submodule that adds `impl Store { ... }` methods: [`tenants`],
//! [`connections`] (connections, encrypted tokens, events, pending OAuth
//! flows, key rotation), [`mappings`], [`settings`] (connector settings
//! per connection, encrypted) and [`kv`]. SQL is written once with
//! `$1`-style placeholders, which both engines accept, and run through the
//! crate-private `on_pool!` macro, which expands the same body for the SQLite
//! pool and for the PostgreSQL pool. Times are Unix seconds (`i64`) passed in
//! by the caller (so tests can drive a simulated clock). Engine-specific SQL
//! (e.g. `FOR UPDATE`) branches on [`Store::kind`].
//!
//! The outbox's busiest writes (ingests, delivery outcomes, SQLite's
//! claims) go through [`group`], one writer task per store that writes
//! whatever has queued in one transaction; [`ahead`] reads what a claimed
//! batch of deliveries needs in a few statements for the whole batch.
//!
//! To add tables (e.g. the outbox): put `0002_<name>.sql` in both
//! `host/migrations/sqlite/` and `host/migrations/postgres/` and write
//! `host/src/store/<name>.rs` with `impl Store { ... }` using `on_pool!`.

pub mod admin;
pub mod ahead;
pub mod connections;
pub mod group;
pub mod kv;
pub mod mail;
pub mod mappings;
pub mod missed;
pub mod outbox;
pub mod settings;
pub mod tenants;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub use connections::*;
pub use tenants::Tenant;

/// `$first, $first+1, ...` for `n` values: an `IN (...)` list of bound
/// parameters, numbered the same on both engines.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Which database engine a [`Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// Embedded SQLite (one daemon).
    Sqlite,
    /// PostgreSQL (one or several daemons).
    Postgres,
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened.
    #[error("cannot open the database {target}: {message}")]
    Open {
        /// The database (URL without password).
        target: String,
        /// Why.
        message: String,
    },
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A row does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with what is stored.
    #[error("{0}")]
    Conflict(String),
    /// A stored secret could not be decrypted.
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
}

/// Whether a query failed because a table it names does not exist
/// (PostgreSQL's `undefined_table`, SQLite's "no such table").
fn is_undefined_table(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| {
        d.code().as_deref() == Some("42P01") || d.message().starts_with("no such table")
    })
}

/// The connection pool of one engine.
#[derive(Clone, Debug)]
pub enum Pool {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// Run the same body against whichever pool the store holds: `$p` is bound
/// to `&SqlitePool` in one expansion and `&PgPool` in the other.
macro_rules! on_pool {
    ($store:expr, $p:ident => $body:expr) => {
        match $store.pool() {
            $crate::store::Pool::Sqlite($p) => $body,
            $crate::store::Pool::Postgres($p) => $body,
        }
    };
}
pub(crate) use on_pool;

/// The durable store. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    /// The writer task that groups ingests and outcomes into shared
    /// transactions (see [`group`]).
    group: Arc<group::Group>,
}

/// A database address for messages: `postgres://user:pw@host/db` without
/// the password, in the user part or as a parameter (`?password=`,
/// `?sslpassword=`). A `postgres` address that does not parse is shown
/// as its scheme alone (it may hold a password where no parser finds
/// it); a SQLite file path as it is.
pub fn redact_url(url: &str) -> String {
    let secret =
        |k: &str| k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword");
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query_pairs().any(|(k, _)| secret(&k)) {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if secret(&k) {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) if url.contains("://") => format!(
            "{}://(an address that could not be read)",
            url.split("://").next().unwrap_or_default()
        ),
        Err(_) => url.to_string(),
    }
}

/// A PostgreSQL connection idle at least this long is pinged before use.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

impl Store {
    /// One round trip to the database (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Open a database: `postgres://...` / `postgresql://...` for
    /// PostgreSQL; `sqlite:PATH`, `sqlite://PATH` or a plain file path for
    /// SQLite (created if missing, WAL journal, foreign keys on). Does not
    /// migrate: call [`Store::migrate`].
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let open_err = |e: sqlx::Error| StoreError::Open {
            target: redact_url(url),
            message: e.to_string(),
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url).map_err(open_err)?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(30))
                // sqlx pings every connection it hands out: a round trip
                // to the server before each statement or transaction. A
                // connection in steady use is known to be alive; one idle
                // for a while (the server may have restarted, a firewall
                // dropped it) is still checked, and replaced if dead.
                .test_before_acquire(false)
                .before_acquire(|conn, meta| {
                    Box::pin(async move {
                        if meta.idle_for >= PING_IF_IDLE_FOR {
                            use sqlx::Connection;
                            conn.ping().await?;
                        }
                        Ok(true)
                    })
                })
                .connect_with(opts)
                .await
                .map_err(open_err)?;
            return Ok(Self {
                pool: Pool::Postgres(pool),
                group: Arc::default(),
            });
        }
        let opts = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url).map_err(open_err)?
        } else {
            SqliteConnectOptions::new().filename(url)
        };
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A commit is on disk before it is answered (the WAL synced at
            // each commit): an ingest's 202 says the document is stored,
            // and that must hold through a power cut, not only a crash of
            // this process (NORMAL's promise). Group commit keeps it to
            // one sync per batch of writes.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // The group writer checkpoints beside the write path (see
            // `group::checkpoint`); SQLite's own checkpoint, inside a
            // commit, only runs when that falls behind (16 MiB of WAL).
            .pragma("wal_autocheckpoint", "4000")
            // Grouped writes are multi-row statements whose text varies
            // with the batch size: room for every size of each.
            .statement_cache_capacity(1024)
            // 16 MiB of pages per connection (SQLite's default is 2 MiB):
            // a claim reads back the bodies of documents ingested moments
            // before, which otherwise come from the OS by a read() each.
            .pragma("cache_size", "-16384")
            // Statement journals (kept so that one statement of a grouped
            // transaction can fail alone) in memory: by default a journal
            // past 64 KiB spills to a temporary file, created, written and
            // deleted inside the write lock (2 % of B2's CPU, with the
            // open/unlink system calls). A grouped multi-row write touches
            // enough pages to spill every time.
            .pragma("temp_store", "MEMORY")
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            // A SQLite connection is a library handle on a local file: it
            // cannot go away like a socket, so the ping sqlx makes before
            // handing one out (a round trip to the connection's thread on
            // every acquire) checks nothing.
            .test_before_acquire(false)
            // SQLite rolls a transaction back by itself on some errors (disk
            // full, I/O error); sqlx still counts the connection as inside
            // it, its ROLLBACK then fails, and every later BEGIN on that
            // connection fails too ("begin_with at non-zero transaction
            // depth") long after the disk has room again. Such a connection
            // is closed on release instead of going back to the pool (the
            // ping runs after any rollback still queued for it). The ping
            // is a round trip to the connection's thread, so it is only
            // made when the connection may be in a transaction: sqlx counts
            // a transaction down only when its rollback has run, so at
            // depth 0 nothing is queued (pinging on every release was 3 %
            // of B2's CPU).
            .after_release(|conn, _| {
                Box::pin(async move {
                    use sqlx::Connection;
                    if !conn.is_in_transaction() {
                        return Ok(true);
                    }
                    conn.ping().await?;
                    Ok(!conn.is_in_transaction())
                })
            })
            .connect_with(opts)
            .await
            .map_err(open_err)?;
        Ok(Self {
            pool: Pool::Sqlite(pool),
            group: Arc::default(),
        })
    }

    /// The file of a SQLite address (`None` for PostgreSQL and for an
    /// in-memory database).
    pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return None;
        }
        let path = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url)
                .ok()?
                .get_filename()
                .to_path_buf()
        } else {
            std::path::PathBuf::from(url)
        };
        (!path.as_os_str().is_empty() && path.as_os_str() != ":memory:").then_some(path)
    }

    /// Open a database that exists and holds this ledgerport's schema,
    /// exactly: for the commands that only read. They neither create a
    /// database (a mistyped `--database` printed "no deliveries" from a
    /// new, empty file) nor migrate one (a newer binary's `deliveries
    /// list` upgraded the production schema under older daemons).
    pub async fn open_existing(url: &str) -> Result<Self, StoreError> {
        if let Some(file) = Self::sqlite_file(url)
            && !file.exists()
        {
            return Err(StoreError::Open {
                target: redact_url(url),
                message: "no such database file (check --database or LEDGERPORT_DATABASE; a daemon creates its database at its first start, `ledgerport migrate` an empty one)".into(),
            });
        }
        let s = Self::open(url).await?;
        s.check_schema().await?;
        Ok(s)
    }

    /// That the database's applied migrations are exactly this binary's;
    /// an error that says what to do otherwise.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let migrator = match &self.pool {
            Pool::Sqlite(_) => &SQLITE_MIGRATIONS,
            Pool::Postgres(_) => &POSTGRES_MIGRATIONS,
        };
        let known: std::collections::BTreeSet<i64> = migrator.iter().map(|m| m.version).collect();
        let q = "SELECT version FROM _sqlx_migrations WHERE success";
        let applied: Result<Vec<(i64,)>, sqlx::Error> = on_pool!(self, p => {
            sqlx::query_as(q).fetch_all(p).await
        });
        let applied: std::collections::BTreeSet<i64> = match applied {
            Ok(rows) => rows.into_iter().map(|(v,)| v).collect(),
            // No migrations table: an empty database, or another program's.
            Err(e) if is_undefined_table(&e) => {
                return Err(StoreError::Conflict(
                    "the database holds no ledgerport schema: run `ledgerport migrate` (or start the daemon) on it first, or check --database".into(),
                ));
            }
            // Anything else (a role without the right to read, a locked or
            // damaged file, a lost connection) is the database's own error:
            // "run migrate" would send the operator the wrong way.
            Err(e) => return Err(StoreError::Db(e)),
        };
        if let Some(newer) = applied.iter().find(|v| !known.contains(v)) {
            return Err(StoreError::Conflict(format!(
                "the database was migrated by a newer ledgerport (migration {newer} is unknown to this one): use that version"
            )));
        }
        let missing = known.difference(&applied).count();
        if missing > 0 {
            return Err(StoreError::Conflict(format!(
                "the database's schema is behind this ledgerport ({} of {} migrations applied): run `ledgerport migrate` (with every daemon on it upgraded)",
                known.len() - missing,
                known.len()
            )));
        }
        Ok(())
    }

    /// Open and migrate in one step.
    pub async fn open_and_migrate(url: &str) -> Result<Self, StoreError> {
        let s = Self::open(url).await?;
        s.migrate().await?;
        Ok(s)
    }

    /// Apply the engine's pending migrations (`host/migrations/<engine>/`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.pool {
            Pool::Sqlite(p) => SQLITE_MIGRATIONS.run(p).await?,
            Pool::Postgres(p) => POSTGRES_MIGRATIONS.run(p).await?,
        }
        Ok(())
    }

    /// The engine.
    pub fn kind(&self) -> StoreKind {
        match &self.pool {
            Pool::Sqlite(_) => StoreKind::Sqlite,
            Pool::Postgres(_) => StoreKind::Postgres,
        }
    }

    /// Write through the group-commit task.
    pub(crate) async fn grouped(&self, op: group::Op) -> Result<group::Done, StoreError> {
        self.group.write(&self.pool, op).await
    }

    /// How grouped writes (ingests, outcomes) shared transactions.
    pub fn group_stats(&self) -> &group::GroupStats {
        self.group.stats()
    }

    /// How far `local_ms` (this machine's clock, Unix ms) is ahead of the
    /// database server's clock, in ms (negative: behind); `None` on SQLite,
    /// where one daemon is the only clock. Daemons sharing a PostgreSQL
    /// database judge each other's leases by their own clocks, so a clock
    /// far enough ahead takes over deliveries another daemon is still
    /// working on (see [`check_clock_skew`]).
    pub async fn clock_skew_ms(&self, local_ms: i64) -> Result<Option<i64>, StoreError> {
        match &self.pool {
            Pool::Sqlite(_) => Ok(None),
            Pool::Postgres(p) => {
                let db: i64 = sqlx::query_scalar(
                    "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
                )
                .fetch_one(p)
                .await?;
                Ok(Some(local_ms - db))
            }
        }
    }

    /// The pool, for engine-specific work in store submodules.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Close every pooled connection (waits for them to be returned).
    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }
}

/// A write transaction. On SQLite it also holds this process's write turn
/// (see [`BeginWrite`]); it derefs to the connection (`&mut *tx`), and a
/// drop without [`WriteTx::commit`] rolls back.
pub(crate) struct WriteTx<DB: sqlx::Database> {
    // Dropped first: the rollback is queued before the turn is handed on.
    tx: sqlx::Transaction<'static, DB>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<DB: sqlx::Database> WriteTx<DB> {
    /// Commit.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    /// Roll back.
    pub(crate) async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl<DB: sqlx::Database> std::ops::Deref for WriteTx<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<DB: sqlx::Database> std::ops::DerefMut for WriteTx<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}

/// The write turn of each SQLite database file open in this process.
fn sqlite_write_turn(pool: &SqlitePool) -> Arc<tokio::sync::Mutex<()>> {
    static TURNS: std::sync::LazyLock<
        std::sync::Mutex<HashMap<std::path::PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    > = std::sync::LazyLock::new(Default::default);
    let options = pool.connect_options();
    let file = options.get_filename();
    let mut turns = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    match turns.get(file) {
        Some(t) => t.clone(),
        None => turns.entry(file.to_path_buf()).or_default().clone(),
    }
}

/// Start a write transaction. On SQLite it is `BEGIN IMMEDIATE`: taking the
/// write lock up front lets the busy timeout queue writers, where a
/// deferred transaction that upgrades from read to write fails at once
/// with `SQLITE_BUSY` under concurrency. Writers of one process first take
/// turns on an async lock (FIFO): SQLite's busy handler waits by sleeping
/// 1 to 100 ms at a time, which under load left the CPU idle between
/// commits; it now only arbitrates between processes.
pub(crate) trait BeginWrite {
    /// The database.
    type Db: sqlx::Database;
    /// Begin.
    fn begin_write(
        &self,
    ) -> impl std::future::Future<Output = Result<WriteTx<Self::Db>, sqlx::Error>> + Send;

    /// Begin, holding `lock` until the transaction ends, so that writers
    /// taking the same lock run one after another. PostgreSQL: the advisory
    /// transaction lock with that key (a writer not taking it still runs
    /// beside). SQLite: every write transaction holds the one write lock
    /// already, so this is [`BeginWrite::begin_write`].
    fn begin_write_locked(
        &self,
        lock: i64,
    ) -> impl std::future::Future<Output = Result<WriteTx<Self::Db>, sqlx::Error>> + Send;
}

impl BeginWrite for SqlitePool {
    type Db = sqlx::Sqlite;
    async fn begin_write(&self) -> Result<WriteTx<sqlx::Sqlite>, sqlx::Error> {
        let turn = sqlite_write_turn(self).lock_owned().await;
        Ok(WriteTx {
            tx: self.begin_with("BEGIN IMMEDIATE").await?,
            _turn: Some(turn),
        })
    }

    async fn begin_write_locked(&self, _lock: i64) -> Result<WriteTx<sqlx::Sqlite>, sqlx::Error> {
        self.begin_write().await
    }
}

impl BeginWrite for PgPool {
    type Db = sqlx::Postgres;
    async fn begin_write(&self) -> Result<WriteTx<sqlx::Postgres>, sqlx::Error> {
        Ok(WriteTx {
            tx: self.begin().await?,
            _turn: None,
        })
    }

    async fn begin_write_locked(&self, lock: i64) -> Result<WriteTx<sqlx::Postgres>, sqlx::Error> {
        let mut tx = self.begin_write().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}

/// Refuse a clock `skew_ms` away from the database's by more than a sixth
/// of the `lease`, so that any two daemons' clocks differ by at most a
/// third of it (one whose clock runs further ahead of another's sees the
/// other's live leases as lapsed after one late renewal, and sends their
/// documents a second time); warn past 5 s.
pub fn check_clock_skew(skew_ms: i64, lease: std::time::Duration) -> Result<(), String> {
    let limit = i64::try_from(lease.as_millis() / 6).unwrap_or(i64::MAX);
    let off = skew_ms.unsigned_abs();
    let way = if skew_ms > 0 { "ahead of" } else { "behind" };
    if off > limit.unsigned_abs() {
        return Err(format!(
            "this machine's clock is {:.1} s {way} the PostgreSQL server's; daemons sharing the database judge each other's delivery leases by their own clocks, and past {:.1} s (a sixth of the {} s lease: two daemons off in opposite directions then differ by a third) one could take over deliveries another is still sending: set the clock right (NTP) and start again",
            off as f64 / 1000.0,
            limit as f64 / 1000.0,
            lease.as_secs()
        ));
    }
    if off > 5_000 {
        tracing::warn!(
            skew_ms,
            "this machine's clock is {:.1} s {way} the PostgreSQL server's; keep the daemons' clocks in step (NTP)",
            off as f64 / 1000.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    /// Past a sixth of the lease, the daemon does not start (with another
    /// as far off the other way, it would take over that one's live
    /// leases); within it, it does, either way.
    #[test]
    fn a_clock_a_sixth_of_a_lease_off_the_databases_is_refused() {
        let lease = std::time::Duration::from_secs(90);
        assert!(super::check_clock_skew(0, lease).is_ok());
        assert!(super::check_clock_skew(14_000, lease).is_ok());
        assert!(super::check_clock_skew(-14_000, lease).is_ok());
        let e = super::check_clock_skew(16_000, lease).unwrap_err();
        assert!(e.contains("16.0 s ahead of") && e.contains("NTP"), "{e}");
        let e = super::check_clock_skew(-16_000, lease).unwrap_err();
        assert!(e.contains("16.0 s behind"), "{e}");
        assert!(super::check_clock_skew(i64::MIN, lease).is_err());
    }

    #[test]
    fn a_database_address_in_a_message_never_shows_a_password() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/lp"),
            "postgres://app:***@db:5432/lp"
        );
        let r = redact_url("postgres://app@db:5432/lp?password=s3cret&sslmode=require");
        assert!(!r.contains("s3cret"), "{r}");
        assert!(r.contains("sslmode=require"), "{r}");
        let r = redact_url("postgresql://app@db/lp?sslpassword=s3cret");
        assert!(!r.contains("s3cret"), "{r}");
        let r = redact_url("postgres://app:s3cret@[bad/lp");
        assert!(!r.contains("s3cret"), "{r}");
        assert!(r.starts_with("postgres://"), "{r}");
        assert_eq!(
            redact_url("/var/lib/ledgerport.db"),
            "/var/lib/ledgerport.db"
        );
    }
}

#[cfg(test)]
mod frozen_migrations {
    use sha2::{Digest, Sha256};

    /// Every migration as it was first committed. A database records the
    /// checksum of each migration it applied, and sqlx refuses to open one
    /// whose applied migration has since changed (a daemon upgraded onto it
    /// would not start): a change goes into a new migration, never into an
    /// old one. A new migration is added here as it is committed.
    const MIGRATIONS: &[(&str, &str)] = &[
        (
            "sqlite/0001_connections.sql",
            "7d70cbc2bdf8b6186726ac8a2af5fddc50b23541977a69ec8e5dd94442de6bb0",
        ),
        (
            "sqlite/0002_outbox.sql",
            "12890e36c351d830483f4b1bf0b51a776c2eea1e8639f2aa32a5793c444c7f5a",
        ),
        (
            "sqlite/0003_admin.sql",
            "a8a28a093068be26d42ab3fe88f9c5bbac4e5b44b0bbf37b78fb488b93877044",
        ),
        (
            "sqlite/0004_connection_settings.sql",
            "d595a1c67cedd963819b0d4bde3459bf66fa686a65e265a0c01ed2591d4f0cb3",
        ),
        (
            "sqlite/0005_claim_index.sql",
            "140336e68d8fec0acd8244c625f247b703053f035c4bfff53be37bf0b0161b9e",
        ),
        (
            "sqlite/0006_fewer_delivery_indexes.sql",
            "f2a68803f223e8205db55b3c0ecc9f7f6e3ad8564c5709192d91de56c3d0cf16",
        ),
        (
            "sqlite/0007_page_sessions.sql",
            "1037d6e68d1d72a791b425c93168577b74d65fe916c2cbbf5539d456aebc4c6a",
        ),
        (
            "sqlite/0008_mappings_review.sql",
            "6a16a1ffb5fc4f76bd390ea58de55624294603d3bc78eb9abef4f7874fed7c5a",
        ),
        (
            "sqlite/0009_incident_due.sql",
            "2afb467f35b04a30d11bcf8726a00edf83a374abf2356d6970a519da8b58995b",
        ),
        (
            "sqlite/0010_missed_documents.sql",
            "59a7a7e3fa4a6e460ae88d76639722435304072464f83d790b99d945cc498055",
        ),
        (
            "sqlite/0011_incident_documents.sql",
            "7de7c21b8e3836257f58417db94824c20f3afd52cb61916d6b3f4e94f0e9a695",
        ),
        (
            "postgres/0001_connections.sql",
            "c3b18f40f5d39509c91fa2641f5d64e7d2ee664a6125e86f540d559e92e48e0d",
        ),
        (
            "postgres/0002_outbox.sql",
            "c21432c83a06d79b312889966ff97a181ebc7b316a0f209678a493c04815fb78",
        ),
        (
            "postgres/0003_admin.sql",
            "39a32c0d7790e360aab896ed473b99be7dab2a11db284dfb2cfa5fe226386213",
        ),
        (
            "postgres/0004_connection_settings.sql",
            "e5ceb246259b50c65d6d2e8934855886d0d156d9004b01198e384c300000d544",
        ),
        (
            "postgres/0005_claim_index.sql",
            "140336e68d8fec0acd8244c625f247b703053f035c4bfff53be37bf0b0161b9e",
        ),
        (
            "postgres/0006_fewer_delivery_indexes.sql",
            "f2a68803f223e8205db55b3c0ecc9f7f6e3ad8564c5709192d91de56c3d0cf16",
        ),
        (
            "postgres/0007_page_sessions.sql",
            "268d5d559a43df8aa453ed20a0aa813247cd8127bd037d13da787c47239e7f1a",
        ),
        (
            "postgres/0008_mappings_review.sql",
            "c8746e4e022836da0aa5ddbb19ebbf565d43584cb4946b199379feeda76ed4fb",
        ),
        (
            "postgres/0009_incident_due.sql",
            "04f4e1082ce5ef035689cd048654538be8da7aa13444c71130edd6dae7c94fd9",
        ),
        (
            "postgres/0010_missed_documents.sql",
            "59a7a7e3fa4a6e460ae88d76639722435304072464f83d790b99d945cc498055",
        ),
        (
            "postgres/0011_incident_documents.sql",
            "84cf0c38373aaec8b7d5a87be4687e90dcba5083b729465aa011fa0eefcce350",
        ),
    ];

    #[test]
    fn applied_migrations_never_change() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut found = Vec::new();
        for engine in ["sqlite", "postgres"] {
            let mut files: Vec<_> = std::fs::read_dir(root.join(engine))
                .expect("migrations")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            for f in files {
                let name = format!("{engine}/{f}");
                let bytes = std::fs::read(root.join(&name)).expect("read");
                let hash = hex::encode(Sha256::digest(&bytes));
                match MIGRATIONS.iter().find(|(n, _)| *n == name) {
                    Some((_, want)) => assert_eq!(
                        &hash, want,
                        "{name} changed after it was committed: databases that applied it will refuse to open; put the change in a new migration"
                    ),
                    None => panic!("{name} is new: add it to MIGRATIONS with its SHA-256 {hash}"),
                }
                found.push(name);
            }
        }
        for (n, _) in MIGRATIONS {
            assert!(
                found.iter().any(|f| f == n),
                "{n} is gone: a migration a database applied must stay"
            );
        }
    }
}
