//! Engine configuration and compilation: what wasmtime settings an app's code is built and run
//! with, compiling a component to native code, and what a pool must know about that code
//! before it loads it (`CodeFacts`). The supervisor compiles here (`Compiler`) and never runs
//! guest code; a pool builds its engine from the same settings (`code_config`,
//! `pooled_config`), so code precompiled here is what the pool loads. `check_component` is the
//! validation `admission` runs on every component that comes in.

use crate::spec::Limits;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Core instances one component may create (real toolchains emit a handful to a few dozen).
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the file is not WebAssembly (it does not start with the `\\0asm` magic bytes)")]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component: build for wasm32-wasip2 \
         (or wrap it with `wasm-tools component new`) so it exports wasi:http/incoming-handler"
    )]
    CoreModule,
    #[error("the component is not valid: {0}")]
    Invalid(String),
    #[error(
        "the component exports neither wasi:http/incoming-handler@0.2.x nor wasi:cli/run@0.2.x, \
         so it can neither serve HTTP nor run as a command (it exports: {exports}); build it for \
         the wasi:http/proxy world or as a wasi:cli command"
    )]
    NoEntryPoint { exports: String },
    #[error(
        "the component does not export wasi:http/incoming-handler@0.2.x, so it cannot serve HTTP: \
         it is a command (it exports wasi:cli/run). Leave out the [http] table to deploy it as a \
         command app, which `cairnctl run` and its [[schedule]]s run"
    )]
    NotHttp,
    #[error(
        "the manifest has no [http] table, so the app is a command, but the component does not \
         export wasi:cli/run@0.2.x: it serves HTTP. Add an [http] table (listen = \"127.0.0.1:8080\"), \
         or give `cairnctl deploy` --listen ADDR, to deploy it as an HTTP app"
    )]
    NotCommand,
    #[error("the component cannot be linked: {0}")]
    Link(String),
    #[error("the component could not be instantiated: {0}")]
    Instantiate(String),
    #[error("wasmtime could not be configured: {0}")]
    Engine(String),
    #[error("the pool could not be sandboxed: {0}")]
    Sandbox(String),
}

/// Checks that `bytes` are a well-formed component: WebAssembly at all, a component rather than
/// a core module, and valid. It does not compile; the engine's own checks come at deploy.
pub fn check_component(bytes: &[u8]) -> Result<(), RuntimeError> {
    check_component_header(bytes)?;
    wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
        .validate_all(bytes)
        .map(drop)
        .map_err(|error| RuntimeError::Invalid(error.to_string()))
}

/// Checks the header of `bytes`: WebAssembly at all, and a component rather than a core module.
pub fn check_component_header(bytes: &[u8]) -> Result<(), RuntimeError> {
    if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
        return Err(RuntimeError::NotWasm);
    }
    // Bytes 4..8: version (u16) and layer (u16). Core modules are layer 0, components layer 1.
    match u16::from_le_bytes([bytes[6], bytes[7]]) {
        0 => Err(RuntimeError::CoreModule),
        1 => Ok(()),
        layer => Err(RuntimeError::Invalid(format!(
            "unknown WebAssembly layer {layer}"
        ))),
    }
}

/// Compiles components for apps, one engine per code setting; counts what it compiled and
/// what it found compiled.
pub struct Compiler {
    compile_engines: Mutex<HashMap<u64, Engine>>,
    pub compiled: AtomicU64,
    pub cache_hits: AtomicU64,
}

impl Compiler {
    pub fn new() -> Arc<Compiler> {
        Arc::new(Compiler {
            compile_engines: Mutex::default(),
            compiled: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
        })
    }

    /// The engine used to compile (and inspect) code for apps with these limits.
    fn compile_engine(&self, limits: &Limits) -> Result<Engine, RuntimeError> {
        let key = memory_reservation(limits);
        let mut engines = self
            .compile_engines
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(engine) = engines.get(&key) {
            return Ok(engine.clone());
        }
        let engine = Engine::new(&code_config(limits))
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        engines.insert(key, engine.clone());
        Ok(engine)
    }

    /// Names the native code an app with these limits runs: equal fingerprints mean precompiled
    /// code can be reused. It changes with the wasmtime version, the CPU's features and any
    /// setting that changes code generation, so stale code is never loaded.
    pub fn fingerprint(&self, limits: &Limits) -> Result<String, RuntimeError> {
        let engine = self.compile_engine(limits)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(format!("wasmtime-{:016x}", hasher.finish()))
    }

    /// Validates and compiles a component; returns native code to keep and later `load`.
    pub fn compile(&self, wasm: &[u8], limits: &Limits) -> Result<Vec<u8>, RuntimeError> {
        check_component_header(wasm)?;
        let engine = self.compile_engine(limits)?;
        let code = engine
            .precompile_component(wasm)
            .map_err(|e| RuntimeError::Invalid(format!("{e:#}")))?;
        self.compiled.fetch_add(1, Ordering::Relaxed);
        Ok(code)
    }

    /// What a pool needs to know about precompiled code before it loads it: the code is an
    /// HTTP handler, and how many memories and tables one instance needs (to size the pooling
    /// allocator). Done once, where the code is compiled or first taken from the store, so a
    /// pool deserialises its code exactly once.
    pub fn inspect(&self, code: &[u8], limits: &Limits) -> Result<CodeFacts, RuntimeError> {
        let engine = self.compile_engine(limits)?;
        // SAFETY: `code` was produced by `precompile_component` of an engine with the same code
        // settings (the fingerprint says so), and the store checks its checksum before handing
        // it out, so it is exactly what wasmtime wrote.
        let component = unsafe { Component::deserialize(&engine, code) }
            .map_err(|e| RuntimeError::Invalid(format!("{e:#}")))?;
        let (http, command) = entry_points(&engine, &component)?;
        Ok(CodeFacts {
            http,
            command,
            ..CodeFacts::of(component.resources_required().as_ref())
        })
    }
}

/// Settings that change the generated code. Engines that share them share precompiled code.
/// What it reads of `limits` must be part of `Sizing`.
pub fn code_config(limits: &Limits) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // Reserve only what the app may use, not wasmtime's default multi-GiB slot per memory:
    // cairn must start on 39-bit-address ARM boards with many apps. Bounds checks are then
    // explicit in the code, which costs a little guest speed and no address space.
    config.memory_reservation(memory_reservation(limits));
    config.memory_guard_size(64 << 10);
    config.memory_reservation_for_growth(0);
    config
}

/// Settings of the engine an app runs in: its code settings and a pooling allocator sized
/// for it.
pub fn pooled_config(limits: &Limits, facts: &CodeFacts) -> Config {
    let mut config = code_config(limits);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling_config(
        limits, facts,
    )));
    config
}

/// Everything an app's engine settings depend on: equal sizings, interchangeable engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    memory: u64,
    instances: u32,
    facts: CodeFacts,
}

impl Sizing {
    pub fn of(limits: &Limits, facts: &CodeFacts) -> Sizing {
        Sizing {
            memory: memory_reservation(limits),
            instances: limits.instances,
            facts: *facts,
        }
    }
}

/// What `LoadedApp::allocator` says when the pooling allocator took the app's sizing.
pub const POOLING_ALLOCATOR: &str = "pooling";

/// The most of each instance slot's linear memory kept resident between requests.
const KEEP_RESIDENT: usize = 8 << 20;

pub fn memory_reservation(limits: &Limits) -> u64 {
    const PAGE: u64 = 64 << 10;
    limits.memory.0.div_ceil(PAGE) * PAGE
}

impl CodeFacts {
    /// Whether an app of `spec` can run this code: an HTTP app needs the HTTP handler, a
    /// command app `wasi:cli/run`.
    pub fn fits(&self, spec: &crate::spec::AppSpec) -> Result<(), RuntimeError> {
        match (spec.is_command(), self.http, self.command) {
            (false, false, _) => Err(RuntimeError::NotHttp),
            (true, _, false) => Err(RuntimeError::NotCommand),
            _ => Ok(()),
        }
    }
}

/// What sizing a pool needs to know about a component (see `Runtime::inspect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CodeFacts {
    pub memories: u32,
    pub tables: u32,
    /// The largest initial table size, when wasmtime can tell it.
    pub max_initial_table_size: Option<u64>,
    /// It exports `wasi:http/incoming-handler` (it can serve HTTP)…
    pub http: bool,
    /// …and `wasi:cli/run` (it can be run as a command). At least one of them. Neither has a
    /// serde default: facts stored by a cairnd that did not record them are learnt again.
    pub command: bool,
}

impl CodeFacts {
    fn of(resources: Option<&wasmtime::ResourcesRequired>) -> CodeFacts {
        CodeFacts {
            // Without an answer (imported memories or tables), room for a few of each.
            memories: resources.map(|r| r.num_memories).unwrap_or(4).max(1),
            tables: resources.map(|r| r.num_tables).unwrap_or(8).max(1),
            max_initial_table_size: resources.and_then(|r| r.max_initial_table_size),
            http: true,
            command: false,
        }
    }
}

/// A pool holding exactly what `instances` concurrent requests of this component need. What
/// it reads of `limits` and `facts` must be part of `Sizing`.
fn pooling_config(limits: &Limits, facts: &CodeFacts) -> PoolingAllocationConfig {
    // One slot more than the concurrency cap, for the probe made while the app is prepared.
    let slots = limits.instances + 1;
    let (memories, tables) = (facts.memories, facts.tables);
    let table_elements = facts
        .max_initial_table_size
        .map(|size| (size as usize).saturating_mul(2))
        .unwrap_or(0)
        .max(20_000);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(slots)
        .total_core_instances(slots * 16)
        .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
        .total_memories(slots * memories)
        .max_memories_per_component(memories)
        .max_memories_per_module(memories)
        .total_tables(slots * tables)
        .max_tables_per_component(tables)
        .max_tables_per_module(tables)
        .table_elements(table_elements)
        .total_stacks(slots)
        .max_memory_size(memory_reservation(limits) as usize);
    // Reset a freed slot's memory with memset up to this size instead of madvise: unmapping
    // pages in a multi-threaded pool costs TLB-shootdown IPIs to every core running it, which
    // profiled as the largest cost of a fresh instance per request. The price is that the
    // slots that served requests keep up to this much resident (BENCHMARKS.md has the figures).
    let keep = (memory_reservation(limits) as usize).min(KEEP_RESIDENT);
    pool.linear_memory_keep_resident(keep)
        .table_keep_resident(keep.min(1 << 20))
        // Only the pages actually touched are reset, where the kernel has PAGEMAP_SCAN (6.7+).
        .pagemap_scan(wasmtime::Enabled::Auto);
    pool
}

/// Which entry points the component exports: `wasi:http/incoming-handler` and `wasi:cli/run`
/// (at 0.2.x); an error naming what it exports when it has neither.
fn entry_points(engine: &Engine, component: &Component) -> Result<(bool, bool), RuntimeError> {
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let exported = |interface: &str| exports.iter().any(|name| name.starts_with(interface));
    let (http, command) = (
        exported("wasi:http/incoming-handler@0.2"),
        exported("wasi:cli/run@0.2"),
    );
    if http || command {
        return Ok((http, command));
    }
    Err(RuntimeError::NoEntryPoint {
        exports: if exports.is_empty() {
            "nothing".to_string()
        } else {
            exports.join(", ")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_component_is_invalid() {
        // The smallest component: header only. Valid. Cut into it: invalid.
        assert!(check_component(b"\0asm\x0d\0\x01\0").is_ok());
        let err = check_component(b"\0asm\x0d\0\x01\0\x00\x05ab").unwrap_err();
        assert!(matches!(err, RuntimeError::Invalid(_)), "{err}");
    }

    #[test]
    fn an_app_runs_only_code_of_its_kind() {
        let digest = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let http = crate::spec::AppSpec::from_manifest(&format!(
            "name = \"a\"\ncomponent = \"{digest}\"\n[http]\nlisten = \"127.0.0.1:1\"\n"
        ))
        .unwrap();
        let command = crate::spec::AppSpec::from_manifest(&format!(
            "name = \"a\"\ncomponent = \"{digest}\"\n"
        ))
        .unwrap();
        let facts = |http, command| CodeFacts {
            memories: 1,
            tables: 1,
            max_initial_table_size: None,
            http,
            command,
        };
        assert!(facts(true, false).fits(&http).is_ok());
        assert!(facts(true, true).fits(&http).is_ok());
        assert!(facts(true, true).fits(&command).is_ok());
        assert!(facts(false, true).fits(&command).is_ok());
        assert!(matches!(
            facts(false, true).fits(&http),
            Err(RuntimeError::NotHttp)
        ));
        assert!(matches!(
            facts(true, false).fits(&command),
            Err(RuntimeError::NotCommand)
        ));
        // Facts stored by a cairnd that did not know the two kinds are learnt again.
        assert!(serde_json::from_str::<CodeFacts>(
            r#"{"memories":1,"tables":1,"max_initial_table_size":null}"#
        )
        .is_err());
    }

    #[test]
    fn headers_tell_modules_components_and_garbage_apart() {
        assert!(matches!(
            check_component_header(b"hello world"),
            Err(RuntimeError::NotWasm)
        ));
        assert!(matches!(
            check_component_header(b"\0asm\x01\0\0\0"),
            Err(RuntimeError::CoreModule)
        ));
        assert!(check_component_header(b"\0asm\x0d\0\x01\0").is_ok());
        assert!(matches!(
            check_component_header(b"\0asm"),
            Err(RuntimeError::NotWasm)
        ));
    }
}
