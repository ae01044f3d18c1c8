//! The plugin runtime: one wasmtime [`Engine`] for the daemon (pooling
//! allocator, epoch interruption driven by a ticker thread), an on-disk
//! cache of precompiled components, and a fresh, bounded [`Store`] for every
//! call into a connector.
//!
//! Every call is bounded: a wall-clock deadline (epoch interruption, plus a
//! host-side timeout for a guest stuck in a host call), a memory cap
//! ([`StoreLimits`]), instance/table limits, and the HTTP and log budgets of
//! the capabilities. A connector that loops, bloats or traps fails its one
//! call with a [`CallError`] that says why; the engine goes on serving.

mod cache;
pub mod clean;
mod output;
pub mod v0_1;
pub mod v0_2;

use crate::capabilities::connection::{ConnectionCapability, ConnectionInfo};
use crate::capabilities::http::{
    CredentialProvider, HttpCapability, HttpLimits, HttpPolicy, HttpTransport,
};
use crate::capabilities::kv::{KvCapability, KvStore};
use crate::capabilities::log::{LogCapability, LogLimits};
use crate::capabilities::mapping::{MappingCapability, MappingScope, MappingStore};
use crate::manifest::{Manifest, ManifestError, contract_line};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use v0_1::ledgerport::connector::types as wit;
use wasmtime::component::{Component, HasData, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use output::OutputTail;
pub use v0_2::DocumentExtras;

/// Settings of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where precompiled components are kept (None: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Wall-clock deadline of one call.
    pub deadline: Duration,
    /// Linear memory a call may use, in bytes.
    pub memory_limit: usize,
    /// Instances alive at once across the engine (pool size).
    pub max_concurrent_instances: u32,
    /// HTTP bounds per call.
    pub http: HttpLimits,
    /// Log bounds per call.
    pub log: LogLimits,
    /// Bytes of stdout/stderr kept per call.
    pub output_bytes: usize,
    /// Ed25519 public keys (base64) whose signatures are trusted; when
    /// non-empty, unsigned or otherwise signed plugins are refused.
    pub trusted_keys: Vec<String>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            deadline: Duration::from_secs(30),
            memory_limit: 64 * 1024 * 1024,
            max_concurrent_instances: 256,
            http: HttpLimits::default(),
            log: LogLimits::default(),
            output_bytes: 16 * 1024,
            trusted_keys: Vec::new(),
        }
    }
}

impl RuntimeConfig {
    /// The most bytes one transfer from the guest may make the host hold:
    /// one request a connector sends, or one answer it returns (wasmtime's
    /// "hostcall fuel", counted as the host's copy: bytes of text and list
    /// items). The request-body cap and 1 MiB for the rest.
    ///
    /// Memory alone does not bound it: every string of a list may point at
    /// the same bytes of the guest's memory, so 64 notes that are one 1 MiB
    /// string are 1 MiB to the guest and 64 MiB to a host that copies each
    /// (wasmtime's own default bound is 128 MiB per transfer).
    pub fn transfer_limit(&self) -> usize {
        self.http.max_request_bytes.saturating_add(1 << 20)
    }
}

/// Counters of the runtime, for tests and metrics.
#[derive(Debug, Default)]
pub struct RuntimeStats {
    /// Components compiled from wasm.
    pub compiled: AtomicU64,
    /// Components loaded from the precompiled cache.
    pub deserialized: AtomicU64,
    /// Calls started.
    pub calls: AtomicU64,
    /// Calls that failed with a [`CallError`].
    pub call_errors: AtomicU64,
    /// Guest log lines emitted.
    pub log_lines: AtomicU64,
    /// Guest log lines dropped over the limit.
    pub log_lines_dropped: AtomicU64,
    /// Guest stdout/stderr bytes dropped over the limit.
    pub output_bytes_dropped: AtomicU64,
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The manifest is wrong.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The component file is missing or unreadable.
    #[error("cannot read component {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// The manifest has no hash.
    #[error("manifest of {id} has no sha256; install the plugin with `ledgerport plugin install`")]
    NoHash {
        /// Plugin id.
        id: String,
    },
    /// The component is not the one the manifest names.
    #[error(
        "component hash mismatch for {id}: the manifest says {expected}, the file is {actual} (tampered or rebuilt component; reinstall it)"
    )]
    HashMismatch {
        /// Plugin id.
        id: String,
        /// From the manifest.
        expected: String,
        /// Of the file.
        actual: String,
    },
    /// The bytes are not a valid component.
    #[error("{id}: not a valid WebAssembly component: {message}")]
    Invalid {
        /// Plugin id.
        id: String,
        /// Why.
        message: String,
    },
    /// The component imports something outside the contract.
    #[error(
        "{id} imports {import:?}, which is outside the contract (ledgerport:connector@0.1 or @0.2 and the WASI interfaces a wasm32-wasip2 guest needs); refused"
    )]
    ForbiddenImport {
        /// Plugin id.
        id: String,
        /// The import.
        import: String,
    },
    /// The component speaks another contract version than the manifest says.
    #[error("{id}: the manifest says contract {manifest}, but the component {found}")]
    ContractMismatch {
        /// Plugin id.
        id: String,
        /// From the manifest.
        manifest: String,
        /// What the component uses.
        found: String,
    },
    /// An import does not match what the host provides.
    #[error(
        "{id} imports something the host does not provide in that shape (a WIT edited by hand, or a newer WASI than the host's?): {message}"
    )]
    Import {
        /// Plugin id.
        id: String,
        /// wasmtime's explanation, naming the import.
        message: String,
    },
    /// A required export is missing or has the wrong type.
    #[error("{id} does not export the contract's connector interface correctly: {message}")]
    MissingExport {
        /// Plugin id.
        id: String,
        /// Details.
        message: String,
    },
    /// A trust list is set and the signature does not satisfy it.
    #[error("{id}: refused: {message}")]
    Signature {
        /// Plugin id.
        id: String,
        /// Why.
        message: String,
    },
    /// Operator overrides or hosts are wrong.
    #[error("{id}: {message}")]
    Policy {
        /// Plugin id.
        id: String,
        /// Details.
        message: String,
    },
}

/// Why a call into a connector failed (as opposed to the connector
/// returning a delivery error).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The call ran past its deadline.
    #[error("connector {plugin} ran past its {}s deadline and was stopped", .deadline.as_secs_f32())]
    Deadline {
        /// Plugin id.
        plugin: String,
        /// The deadline.
        deadline: Duration,
    },
    /// The call tried to use more memory than allowed.
    #[error("connector {plugin} tried to use more than {limit_mib} MiB of memory and was stopped")]
    MemoryLimit {
        /// Plugin id.
        plugin: String,
        /// The cap in MiB.
        limit_mib: usize,
    },
    /// One request or answer would have made the host copy more than
    /// [`RuntimeConfig::transfer_limit`] bytes out of the guest.
    #[error(
        "connector {plugin} passed more than {limit_mib} MiB to the host in one request or answer and was stopped"
    )]
    Transfer {
        /// Plugin id.
        plugin: String,
        /// The bound in MiB (rounded down).
        limit_mib: usize,
    },
    /// The guest trapped (panic, stack overflow, bad memory access...).
    #[error("connector {plugin} crashed: {message}")]
    Trap {
        /// Plugin id.
        plugin: String,
        /// The trap and the tail of the guest's stderr.
        message: String,
    },
    /// The engine could not instantiate (e.g. pool exhausted).
    #[error("connector {plugin} could not start: {message}")]
    Instantiate {
        /// Plugin id.
        plugin: String,
        /// Why.
        message: String,
    },
}

impl CallError {
    /// A short machine-readable kind, for metrics and the delivery log.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Deadline { .. } => "deadline",
            CallError::MemoryLimit { .. } => "memory",
            CallError::Transfer { .. } => "transfer",
            CallError::Trap { .. } => "trap",
            CallError::Instantiate { .. } => "instantiate",
        }
    }
}

/// What a call needs besides the plugin: whose connection it is and where
/// its capabilities read and write.
#[derive(Clone)]
pub struct CallContext {
    /// The connection.
    pub connection: ConnectionInfo,
    /// Its credentials.
    pub credentials: Arc<dyn CredentialProvider>,
    /// Mappings store.
    pub mappings: Arc<dyn MappingStore>,
    /// Kv store.
    pub kv: Arc<dyn KvStore>,
    /// The provider's request-rate gate, when limits are enforced.
    pub rate: Option<crate::capabilities::http::RateLimit>,
}

/// The per-call store data: WASI (empty) and the capabilities.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    /// The memory cap across all of the component's linear memories
    /// (`StoreLimits` caps each one; a component may have several).
    memory: MemoryBudget,
    memory_denied: bool,
    http: HttpCapability,
    mapping: MappingCapability,
    kv: KvCapability,
    log: LogCapability,
    connection: ConnectionCapability,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Linear memory a call's component holds, all its memories together,
/// against the call's cap.
#[derive(Debug, Clone, Copy)]
struct MemoryBudget {
    limit: usize,
    used: usize,
}

impl MemoryBudget {
    /// Whether a memory may grow from `current` to `desired` bytes.
    fn fits(&self, current: usize, desired: usize) -> bool {
        self.used
            .checked_add(desired.saturating_sub(current))
            .is_some_and(|total| total <= self.limit)
    }

    /// Count a growth that happened.
    fn grow(&mut self, current: usize, desired: usize) {
        self.used = self.used.saturating_add(desired.saturating_sub(current));
    }
}

impl wasmtime::ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Past the cap of all memories together: a trap, as `StoreLimits`
        // traps for one memory past it.
        if !self.memory.fits(current, desired) {
            self.memory_denied = true;
            return Err(wasmtime::Error::msg(format!(
                "the memory limit of {} bytes for all of the connector's memories together is reached",
                self.memory.limit
            )));
        }
        let ok = self.limits.memory_growing(current, desired, maximum);
        if matches!(ok, Ok(true)) {
            self.memory.grow(current, desired);
        } else {
            self.memory_denied = true;
        }
        ok
    }
    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }
    fn instances(&self) -> usize {
        self.limits.instances()
    }
    fn tables(&self) -> usize {
        self.limits.tables()
    }
    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

macro_rules! projection {
    ($name:ident, $ty:ty) => {
        struct $name;
        impl HasData for $name {
            type Data<'a> = &'a mut $ty;
        }
    };
}
projection!(HttpData, HttpCapability);
projection!(MappingData, MappingCapability);
projection!(KvData, KvCapability);
projection!(LogData, LogCapability);
projection!(ConnectionData, ConnectionCapability);
struct TypesData;
impl HasData for TypesData {
    type Data<'a> = &'a mut HostState;
}
impl v0_1::ledgerport::connector::types::Host for HostState {}

/// WASI interfaces (package-relative, version-less) a Rust wasm32-wasip2
/// guest may import. Sockets, HTTP and the rest are refused.
const ALLOWED_WASI: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// Core module instances one connector component may create. A Rust
/// connector has 3; a Python one built with componentize-py has 38
/// (libpython, libc and its companions, the trapping WASI stubs, the
/// canonical-ABI shims), all sharing one memory and two tables.
const MAX_CORE_INSTANCES: u32 = 64;

/// Contract interfaces a connector may import.
const CONTRACT_IMPORTS: &[&str] = &["types", "http", "mapping", "kv", "log", "connection"];

/// A component pre-linked against the bindings of its contract version.
enum Pre {
    V0_1(v0_1::PluginPre<HostState>),
    V0_2(v0_2::PluginPre<HostState>),
}

/// A fresh instance of a plugin, by contract version.
enum Instance {
    V0_1(v0_1::Plugin),
    V0_2(v0_2::Plugin),
}

impl Pre {
    async fn instantiate_async(&self, store: &mut Store<HostState>) -> wasmtime::Result<Instance> {
        Ok(match self {
            Pre::V0_1(p) => Instance::V0_1(p.instantiate_async(store).await?),
            Pre::V0_2(p) => Instance::V0_2(p.instantiate_async(store).await?),
        })
    }
}

/// A loaded, verified plugin, ready to instantiate.
pub struct Plugin {
    manifest: Manifest,
    sha256: String,
    pre: Pre,
    policy: Arc<HttpPolicy>,
    id: Arc<str>,
    from_cache: bool,
}

impl Plugin {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// SHA-256 of the component.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
    /// Whether it was loaded from the precompiled cache (not compiled).
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }
}

struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Dirty linear-memory bytes a pool slot keeps resident between calls (see
/// `Runtime::new`). Both Rust connectors dirty well under 256 KiB per call;
/// the cap bounds the memory idle slots hold (B5 counts it).
const LINEAR_MEMORY_KEEP_RESIDENT: usize = 512 * 1024;

/// Epoch tick length: the deadline's resolution.
const TICK: Duration = Duration::from_millis(10);

/// Ticks of guest code between two yields to the executor.
const YIELD_TICKS: u64 = 1;

/// Epoch ticks due `elapsed` after the ticker started: whole ticks only,
/// so a deadline of n ticks never fires before n ticks of wall time.
fn ticks_due(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_nanos() / TICK.as_nanos()).unwrap_or(u64::MAX)
}

/// The plugin runtime. Cheap to share behind an `Arc`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    transport: Arc<dyn HttpTransport>,
    stats: Arc<RuntimeStats>,
    _ticker: Ticker,
}

impl Runtime {
    /// Build the engine, the linker and the epoch ticker.
    pub fn new(config: RuntimeConfig, transport: Arc<dyn HttpTransport>) -> anyhow::Result<Self> {
        let mut cfg = wasmtime::Config::new();
        cfg.epoch_interruption(true);
        cfg.wasm_component_model(true);
        cfg.max_wasm_stack(1024 * 1024);
        // Copy-on-write memory images: a fresh instance maps its initial
        // memory instead of copying the data segments. Measured with the call
        // benchmark, interleaved runs: minimal connector 51 -> 49 µs, Xero
        // 93 -> 86 µs; and a componentize-py connector starts with 12 MiB of
        // memory that would otherwise be copied on every call.
        cfg.memory_init_cow(true);
        // `LEDGERPORT_PERFMAP=1` writes /tmp/perf-<pid>.map so that `perf`
        // names guest functions (for plugin authors profiling a connector).
        if std::env::var_os("LEDGERPORT_PERFMAP").is_some_and(|v| v == "1") {
            cfg.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        let n = config.max_concurrent_instances.max(1);
        pool.total_component_instances(n);
        // Only a counter (instance metadata is allocated per instance):
        // sized so that `n` components of any language fit, leaving the
        // component, memory and stack pools as the real bounds.
        pool.total_core_instances(n * MAX_CORE_INSTANCES);
        pool.total_memories(n * 2);
        pool.total_tables(n * 4);
        pool.total_stacks(n);
        pool.max_memory_size(config.memory_limit);
        pool.max_memories_per_component(2);
        pool.max_core_instances_per_component(MAX_CORE_INSTANCES);
        // A finished call's dirty linear-memory pages are reset in place
        // (up to LINEAR_MEMORY_KEEP_RESIDENT bytes of them, found with
        // Linux's PAGEMAP_SCAN where the kernel has it, 6.7+) instead of
        // being given back with madvise, so the next call in that slot takes
        // no page faults. Measured with the call benchmark: 8 page faults and
        // about a fifth of the CPU time per call gone (87,600 -> 5,300 faults
        // over 11,000 calls; sys time 0.52 s -> 0.10 s). Without PAGEMAP_SCAN
        // the low pages are memset instead, which costs more than it saves,
        // so the budget is only kept where the scan is available.
        // Decommits are batched (fewer TLB shootdowns); table pages are
        // kept resident.
        pool.decommit_batch_size(32);
        let scan = wasmtime::PoolingAllocationConfig::is_pagemap_scan_available();
        pool.pagemap_scan(wasmtime::Enabled::Auto);
        pool.linear_memory_keep_resident(if scan { LINEAR_MEMORY_KEEP_RESIDENT } else { 0 });
        pool.table_keep_resident(16 * 1024);
        pool.async_stack_keep_resident(0);
        cfg.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;

        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| anyhow::anyhow!("{e}"))?;
        use v0_1::ledgerport::connector as c;
        let l = &mut linker;
        c::types::add_to_linker::<_, TypesData>(l, |s| s).map_err(|e| anyhow::anyhow!("{e}"))?;
        c::http::add_to_linker::<_, HttpData>(l, |s| &mut s.http)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        c::mapping::add_to_linker::<_, MappingData>(l, |s| &mut s.mapping)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        c::kv::add_to_linker::<_, KvData>(l, |s| &mut s.kv).map_err(|e| anyhow::anyhow!("{e}"))?;
        c::log::add_to_linker::<_, LogData>(l, |s| &mut s.log)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        c::connection::add_to_linker::<_, ConnectionData>(l, |s| &mut s.connection)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        v0_2::add_to_linker(l).map_err(|e| anyhow::anyhow!("{e}"))?;

        let stop = Arc::new(AtomicBool::new(false));
        let (e2, s2) = (engine.weak(), stop.clone());
        std::thread::Builder::new()
            .name("ledgerport-epoch".into())
            .spawn(move || {
                // Ticks follow the wall clock, not the count of sleeps: a
                // sleep on a loaded machine overruns, and a ticker that
                // only counted its sleeps would let deadlines drift late.
                let start = Instant::now();
                let mut sent = 0u64;
                while !s2.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    let Some(e) = e2.upgrade() else { break };
                    let due = ticks_due(start.elapsed());
                    while sent < due {
                        e.increment_epoch();
                        sent += 1;
                    }
                }
            })?;
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                anyhow::anyhow!("cache_dir {}: cannot be created: {e}", dir.display())
            })?;
        }
        Ok(Self {
            engine,
            linker,
            config,
            transport,
            stats: Arc::new(RuntimeStats::default()),
            _ticker: Ticker { stop },
        })
    }

    /// The runtime's counters.
    pub fn stats(&self) -> &Arc<RuntimeStats> {
        &self.stats
    }

    /// The configuration in force.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Load and verify a plugin from its manifest. `overrides` maps allowed
    /// origins to the base URLs requests really go to.
    pub fn load(
        &self,
        manifest_path: &Path,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Plugin, LoadError> {
        let manifest = Manifest::from_file(manifest_path)?;
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        let wasm_path = dir.join(&manifest.component);
        let bytes = std::fs::read(&wasm_path).map_err(|source| LoadError::Read {
            path: wasm_path.clone(),
            source,
        })?;
        self.load_bytes(manifest, &bytes, overrides)
    }

    /// Load and verify a plugin from a manifest and the component's bytes.
    pub fn load_bytes(
        &self,
        manifest: Manifest,
        bytes: &[u8],
        overrides: &BTreeMap<String, String>,
    ) -> Result<Plugin, LoadError> {
        let id = manifest.id.clone();
        if !self.config.trusted_keys.is_empty() {
            crate::signing::verify(&manifest, &self.config.trusted_keys).map_err(|message| {
                LoadError::Signature {
                    id: id.clone(),
                    message,
                }
            })?;
        }
        let expected = manifest
            .sha256
            .clone()
            .ok_or_else(|| LoadError::NoHash { id: id.clone() })?
            .to_ascii_lowercase();
        let actual = hex::encode(Sha256::digest(bytes));
        if expected != actual {
            return Err(LoadError::HashMismatch {
                id,
                expected,
                actual,
            });
        }
        let policy = HttpPolicy::new(&manifest.allowed_hosts, overrides)
            .map_err(|message| LoadError::Policy {
                id: id.clone(),
                message,
            })?
            .with_oauth(manifest.oauth.is_some());
        // A core module (a build for wasm32-wasip1 or -unknown-unknown) has
        // the same magic as a component but layer 0 and version 1; wasmtime's
        // own words for it ("failed to parse WebAssembly module") do not say
        // what to do.
        if bytes.get(0..8) == Some(b"\0asm\x01\0\0\0") {
            return Err(LoadError::Invalid {
                id,
                message: "this is a core WebAssembly module, not a component: build the connector for the wasm32-wasip2 target (`cargo build --target wasm32-wasip2 --release`)".into(),
            });
        }
        let (component, from_cache) = cache::load_component(
            &self.engine,
            self.config.cache_dir.as_deref(),
            &actual,
            bytes,
        )
        .map_err(|e| LoadError::Invalid {
            id: id.clone(),
            message: format!("{e:#}"),
        })?;
        if from_cache {
            self.stats.deserialized.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.compiled.fetch_add(1, Ordering::Relaxed);
        }
        check_component(&self.engine, &component, &manifest)?;
        // Linking fails on an import: one the contract names but with
        // another signature (a locally edited WIT), or a WASI version newer
        // than the host's.
        let instance_pre =
            self.linker
                .instantiate_pre(&component)
                .map_err(|e| LoadError::Import {
                    id: id.clone(),
                    message: format!("{e:#}"),
                })?;
        let missing = |e: wasmtime::Error| LoadError::MissingExport {
            id: id.clone(),
            message: format!("{e:#}"),
        };
        // check_component made sure the component speaks the manifest's line.
        let pre = match contract_line(&manifest.contract) {
            Some("0.2") => Pre::V0_2(v0_2::PluginPre::new(instance_pre).map_err(missing)?),
            _ => Pre::V0_1(v0_1::PluginPre::new(instance_pre).map_err(missing)?),
        };
        Ok(Plugin {
            id: Arc::from(manifest.id.as_str()),
            manifest,
            sha256: actual,
            pre,
            policy: Arc::new(policy),
            from_cache,
        })
    }

    fn new_store(&self, plugin: &Plugin, ctx: &CallContext) -> (Store<HostState>, OutputTail) {
        let tail = OutputTail::new(
            plugin.id.clone(),
            self.config.output_bytes,
            self.stats.clone(),
        );
        let mut b = WasiCtx::builder();
        b.stdout(tail.stream("stdout"))
            .stderr(tail.stream("stderr"));
        let state = HostState {
            wasi: b.build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.config.memory_limit)
                .instances(MAX_CORE_INSTANCES as usize)
                .tables(32)
                .memories(4)
                .trap_on_grow_failure(true)
                .build(),
            memory: MemoryBudget {
                limit: self.config.memory_limit,
                used: 0,
            },
            memory_denied: false,
            http: HttpCapability::new(
                plugin.id.clone(),
                ctx.connection.connection_id.clone(),
                plugin.policy.clone(),
                self.transport.clone(),
                ctx.credentials.clone(),
                self.config.http,
                ctx.rate.clone(),
            ),
            mapping: MappingCapability::new(
                ctx.mappings.clone(),
                MappingScope {
                    tenant_id: ctx.connection.tenant_id.clone(),
                    connector_id: plugin.manifest.id.clone(),
                },
            ),
            kv: KvCapability::new(ctx.kv.clone(), ctx.connection.connection_id.clone()),
            log: LogCapability::new(plugin.id.clone(), self.config.log, self.stats.clone()),
            connection: ConnectionCapability::new(connection_with_defaults(
                plugin,
                &ctx.connection,
            )),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        store.set_hostcall_fuel(self.config.transfer_limit());
        // Guest code gives its thread back to the executor every tick: a
        // connector spinning on one document must not hold one of the
        // daemon's few worker threads (ingest, the admin API, lease
        // renewals and every other tenant's calls) until its deadline. The
        // deadline is absolute, from the store's creation: time spent
        // waiting for the provider's rate slots is added to it (credited
        // once, however long the wait).
        let budget = self.config.deadline;
        let started = Instant::now();
        let mut credit = WaitCredit::of(ctx);
        let mut credited = Duration::ZERO;
        store.epoch_deadline_callback(move |_| {
            if let Some(c) = credit.as_mut() {
                credited += c.take();
            }
            if started.elapsed().saturating_sub(credited) >= budget {
                return Ok(UpdateDeadline::Interrupt);
            }
            Ok(UpdateDeadline::YieldCustom(
                YIELD_TICKS,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        store.set_epoch_deadline(YIELD_TICKS);
        (store, tail)
    }

    /// Run one export in a fresh instance, bounded by the deadline.
    async fn call<R, F>(&self, plugin: &Plugin, ctx: &CallContext, f: F) -> Result<R, CallError>
    where
        F: for<'a> FnOnce(
            &'a Instance,
            &'a mut Store<HostState>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = wasmtime::Result<R>> + Send + 'a>,
        >,
    {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let (mut store, tail) = self.new_store(plugin, ctx);
        let deadline = self.config.deadline;
        let work = async {
            let instance = plugin
                .pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| (true, e))?;
            f(&instance, &mut store).await.map_err(|e| (false, e))
        };
        // The epoch deadline stops guest code; this stops a guest waiting in
        // a host call that never returns. Both leave out the time the call
        // waited for the provider's rate slots.
        let mut credit = WaitCredit::of(ctx);
        let guard = async {
            let mut until = tokio::time::Instant::now() + deadline + Duration::from_secs(1);
            loop {
                tokio::time::sleep_until(until).await;
                match credit.as_mut().map(WaitCredit::take) {
                    Some(more) if !more.is_zero() => until += more,
                    _ => break,
                }
            }
        };
        let outcome = tokio::select! {
            r = work => Ok(r),
            () = guard => Err(()),
        };
        let memory_denied = store.data().memory_denied;
        let result = match outcome {
            Err(_) => Err(CallError::Deadline {
                plugin: plugin.id.to_string(),
                deadline,
            }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err((instantiating, e))) => {
                Err(self.classify(plugin, e, memory_denied, instantiating, &tail))
            }
        };
        tail.flush_to_log();
        if let Err(e) = &result {
            self.stats.call_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(plugin = %plugin.id, error = %crate::capabilities::log::one_line(&e.to_string()), "connector call failed");
        }
        result
    }

    fn classify(
        &self,
        plugin: &Plugin,
        e: wasmtime::Error,
        memory_denied: bool,
        instantiating: bool,
        tail: &OutputTail,
    ) -> CallError {
        let pid = plugin.id.to_string();
        if memory_denied {
            return CallError::MemoryLimit {
                plugin: pid,
                limit_mib: self.config.memory_limit / (1024 * 1024),
            };
        }
        // wasmtime's error type for spent hostcall fuel is private: its
        // text is what says so.
        if format!("{e:#}").contains("fuel allocated for hostcalls has been exhausted") {
            return CallError::Transfer {
                plugin: pid,
                limit_mib: self.config.transfer_limit() / (1024 * 1024),
            };
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallError::Deadline {
                plugin: pid,
                deadline: self.config.deadline,
            },
            Some(t) => {
                let mut message = match t {
                    Trap::StackOverflow => "stack overflow".to_string(),
                    Trap::UnreachableCodeReached => "it panicked or aborted".to_string(),
                    Trap::MemoryOutOfBounds => {
                        "out-of-bounds memory access (most often a stack overflow in the connector)"
                            .to_string()
                    }
                    other => other.to_string(),
                };
                // The guest's own bytes: without control characters (a NUL
                // cannot be stored on PostgreSQL).
                let stderr = clean::text(&tail.stderr_tail(600), 600);
                if !stderr.trim().is_empty() {
                    message.push_str(": ");
                    message.push_str(stderr.trim());
                }
                CallError::Trap {
                    plugin: pid,
                    message,
                }
            }
            None if instantiating => CallError::Instantiate {
                plugin: pid,
                message: format!("{e:#}"),
            },
            None => CallError::Trap {
                plugin: pid,
                message: format!("{e:#}"),
            },
        }
    }

    /// Ask the connector who it is.
    pub async fn describe(
        &self,
        plugin: &Plugin,
        ctx: &CallContext,
    ) -> Result<wit::ConnectorInfo, CallError> {
        self.call(plugin, ctx, |i, s| {
            Box::pin(async move {
                match i {
                    Instance::V0_1(i) => i.ledgerport_connector_connector().call_describe(s).await,
                    Instance::V0_2(i) => v0_2::describe(i, s).await,
                }
            })
        })
        .await
    }

    /// Accounts and tax rates for the mapping screen.
    pub async fn list_accounts(
        &self,
        plugin: &Plugin,
        ctx: &CallContext,
    ) -> Result<Result<wit::AccountList, wit::DeliveryError>, CallError> {
        self.call(plugin, ctx, |i, s| {
            Box::pin(async move {
                match i {
                    Instance::V0_1(i) => {
                        i.ledgerport_connector_connector()
                            .call_list_accounts(s)
                            .await
                    }
                    Instance::V0_2(i) => v0_2::list_accounts(i, s).await,
                }
            })
        })
        .await
    }

    /// Check the connection.
    pub async fn check(
        &self,
        plugin: &Plugin,
        ctx: &CallContext,
    ) -> Result<Result<wit::CheckReport, wit::DeliveryError>, CallError> {
        self.call(plugin, ctx, |i, s| {
            Box::pin(async move {
                match i {
                    Instance::V0_1(i) => i.ledgerport_connector_connector().call_check(s).await,
                    Instance::V0_2(i) => v0_2::check(i, s).await,
                }
            })
        })
        .await
    }

    /// Deliver one document (without data only newer contracts carry).
    pub async fn deliver(
        &self,
        plugin: &Plugin,
        ctx: &CallContext,
        delivery: wit::Delivery,
        doc: wit::Document,
    ) -> Result<Result<wit::Receipt, wit::DeliveryError>, CallError> {
        self.deliver_with(plugin, ctx, delivery, doc, DocumentExtras::default())
            .await
    }

    /// Deliver one document with the data the canonical (0.1) document
    /// cannot carry: a 0.2 connector gets `extras` in its document, a 0.1
    /// connector never sees them. A 0.2 receipt's warnings come back as
    /// notes (see [`v0_2::WARNING_PREFIX`]).
    pub async fn deliver_with(
        &self,
        plugin: &Plugin,
        ctx: &CallContext,
        delivery: wit::Delivery,
        doc: wit::Document,
        extras: DocumentExtras,
    ) -> Result<Result<wit::Receipt, wit::DeliveryError>, CallError> {
        self.call(plugin, ctx, move |i, s| {
            Box::pin(async move {
                match i {
                    Instance::V0_1(i) => {
                        i.ledgerport_connector_connector()
                            .call_deliver(s, &delivery, &doc)
                            .await
                    }
                    Instance::V0_2(i) => v0_2::deliver(i, s, &delivery, &doc, &extras).await,
                }
            })
        })
        .await
    }
}

/// The time a call has waited for rate slots, credited once each: what the
/// deadline moves on by.
struct WaitCredit {
    waited_ms: Arc<AtomicU64>,
    credited_ms: u64,
}

impl WaitCredit {
    /// None when the call has no rate limit (it never waits).
    fn of(ctx: &CallContext) -> Option<Self> {
        ctx.rate.as_ref().map(|r| Self {
            waited_ms: r.waited_ms.clone(),
            credited_ms: 0,
        })
    }

    /// The wait since the last call.
    fn take(&mut self) -> Duration {
        let total = self.waited_ms.load(Ordering::Relaxed);
        let more = total.saturating_sub(self.credited_ms);
        self.credited_ms = total;
        Duration::from_millis(more)
    }
}

fn connection_with_defaults(plugin: &Plugin, info: &ConnectionInfo) -> ConnectionInfo {
    let mut out = info.clone();
    for (k, v) in &plugin.manifest.settings {
        out.settings.entry(k.clone()).or_insert_with(|| v.clone());
    }
    out
}

/// Split `ns:pkg/iface@ver` into (`ns:pkg/iface`, `ver`).
fn split_version(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (name, None),
    }
}

/// Refuse imports outside the contract and WASI's safe subset, a contract
/// version other than the manifest's, and a missing `connector` export.
fn check_component(
    engine: &Engine,
    component: &Component,
    manifest: &Manifest,
) -> Result<(), LoadError> {
    let id = manifest.id.clone();
    let manifest_line = contract_line(&manifest.contract).unwrap_or("?");
    let ty = component.component_type();
    for (name, _) in ty.imports(engine) {
        let (base, version) = split_version(name);
        if let Some(iface) = base.strip_prefix("ledgerport:connector/") {
            if !CONTRACT_IMPORTS.contains(&iface) {
                return Err(LoadError::ForbiddenImport {
                    id,
                    import: name.to_string(),
                });
            }
            let v = version.unwrap_or("");
            if contract_line(v) != Some(manifest_line) {
                return Err(LoadError::ContractMismatch {
                    id,
                    manifest: manifest.contract.clone(),
                    found: format!("imports {name}"),
                });
            }
            continue;
        }
        let wasi_ok =
            ALLOWED_WASI.contains(&base) && version.is_some_and(|v| v.starts_with("0.2."));
        if !wasi_ok {
            return Err(LoadError::ForbiddenImport {
                id,
                import: name.to_string(),
            });
        }
    }
    let mut found = None;
    for (name, _) in ty.exports(engine) {
        let (base, version) = split_version(name);
        if base == "ledgerport:connector/connector" {
            found = Some(version.unwrap_or("").to_string());
        }
    }
    match found {
        None => Err(LoadError::MissingExport {
            id,
            message: "no export named ledgerport:connector/connector".into(),
        }),
        Some(v) if contract_line(&v) != Some(manifest_line) => Err(LoadError::ContractMismatch {
            id,
            manifest: manifest.contract.clone(),
            found: format!("exports ledgerport:connector/connector@{v}"),
        }),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_cap_counts_every_memory_together() {
        let mut b = MemoryBudget {
            limit: 64 << 20,
            used: 0,
        };
        // Two memories of 40 MiB do not fit a 64 MiB cap together.
        assert!(b.fits(0, 40 << 20));
        b.grow(0, 40 << 20);
        assert!(!b.fits(0, 40 << 20));
        assert!(b.fits(0, 24 << 20));
        b.grow(0, 24 << 20);
        assert!(!b.fits(24 << 20, (24 << 20) + 65_536));
        assert_eq!(b.used, 64 << 20);
        assert!(!b.fits(0, usize::MAX));
    }

    #[test]
    fn epoch_ticks_follow_the_wall_clock() {
        assert_eq!(ticks_due(Duration::ZERO), 0);
        assert_eq!(ticks_due(TICK - Duration::from_nanos(1)), 0);
        assert_eq!(ticks_due(TICK), 1);
        // A ticker whose sleeps overran (here 3.5 ticks of wall time after
        // the first) owes the missed ticks at once.
        assert_eq!(ticks_due(TICK * 4 + TICK / 2), 4);
        // The call deadline of 30 s is 3,000 ticks of wall time.
        assert_eq!(ticks_due(RuntimeConfig::default().deadline), 3_000);
    }
}
