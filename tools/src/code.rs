//! The bundle rule: thaw runs only native code it compiled itself.
//!
//! A bundle carries its wasm and the code compiled from it, each with a SHA-256 in the manifest,
//! but anyone who edits a bundle can recompute both. So before a bundle's code runs, [`own`]
//! makes sure this thaw compiled it: the code this thaw's engine makes from the bundle's wasm
//! is looked up in the [`CodeCache`] (or compiled, and then cached), and the bundle's code must
//! be exactly those bytes. When it is not, the bundle is re-encoded with the code made here, so
//! the wasm a user inspects is always what runs. Compilation is deterministic, so a bundle
//! packed by this thaw, anywhere, keeps its code.
//!
//! The cache is a directory of files named by a key over the wasm's SHA-256 and the engine's
//! compatibility hash (Wasmtime's version, its compiler's target and flags, and every setting
//! the code depends on, fuel metering among them). Each file is the code's SHA-256 followed by
//! the code; a file whose hash does not match is a miss, so a damaged cache costs a compile,
//! never a wrong answer. The cache only saves time: an entry that cannot be read is compiled
//! again, and one that cannot be written costs one warning.

use std::hash::{Hash as _, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use abi::bundle::{self, Manifest};
use host_vmm::Function;
use host_vmm::function::{self, FunctionError};
use sha2::{Digest as _, Sha256};

/// Most bytes the cache keeps; past it, the oldest entries are removed.
pub const CACHE_LIMIT_BYTES: u64 = 4 << 30;

/// Why code could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// The guest's engine could not be set up on this host.
    #[error("setting up the compiler: {}", chain(.0))]
    Engine(wasmtime::Error),
    /// Cranelift could not compile the module.
    #[error("compiling the module: {}", chain(.0))]
    Compile(wasmtime::Error),
    /// The bundle's framing or manifest is invalid.
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    /// The bundle's wasm is not a function thaw runs.
    #[error(transparent)]
    Function(#[from] FunctionError),
}

/// A Wasmtime error with its causes, on one line.
fn chain(e: &wasmtime::Error) -> String {
    e.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

/// Where compiled code is kept between commands.
#[derive(Debug, Clone)]
pub struct CodeCache {
    /// The directory, or none: every lookup misses and nothing is stored.
    dir: Option<PathBuf>,
}

impl CodeCache {
    /// The user's cache: `$XDG_CACHE_HOME/thaw/code`, or `~/.cache/thaw/code`; none when
    /// neither variable is set to an absolute path.
    pub fn user() -> Self {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")).filter(|p| p.is_absolute()));
        Self { dir: base.map(|b| b.join("thaw").join("code")) }
    }

    /// A cache in `dir`.
    pub fn at(dir: PathBuf) -> Self {
        Self { dir: Some(dir) }
    }

    /// No cache: every function is compiled.
    #[cfg(test)]
    pub fn none() -> Self {
        Self { dir: None }
    }

    /// The cached code for `key`, if its entry is whole (and no larger than any code may be).
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        use std::io::Read as _;
        let file = std::fs::File::open(self.dir.as_ref()?.join(key)).ok()?;
        let mut entry = Vec::new();
        file.take(32 + bundle::MAX_CODE_BYTES + 1).read_to_end(&mut entry).ok()?;
        let (sha, code) = entry.split_at_checked(32)?;
        (sha == Sha256::digest(code).as_slice()).then(|| code.to_vec())
    }

    /// Whether `key`'s entry is `sha` and `code` (`None`: no entry), read in small pieces:
    /// reading a large entry whole costs more in page faults than the comparison. The entry's
    /// own hash is not checked: it equals the caller's, which the caller checks.
    fn holds(&self, key: &str, sha: &[u8; 32], code: &[u8]) -> Option<bool> {
        use std::io::Read as _;
        let mut file = std::fs::File::open(self.dir.as_ref()?.join(key)).ok()?;
        if file.metadata().ok()?.len() != 32 + code.len() as u64 {
            return Some(false);
        }
        let mut piece = vec![0; 64 << 10];
        file.read_exact(&mut piece[..32]).ok()?;
        if piece[..32] != sha[..] {
            return Some(false);
        }
        for expected in code.chunks(piece.len()) {
            let read = &mut piece[..expected.len()];
            file.read_exact(read).ok()?;
            if read != expected {
                return Some(false);
            }
        }
        Some(true)
    }

    /// Keeps `code` under `key`, then trims the cache to [`CACHE_LIMIT_BYTES`]; a failure is
    /// one warning, since the code is in hand.
    fn put(&self, key: &str, code: &[u8]) {
        let Some(dir) = &self.dir else { return };
        let stored = std::fs::create_dir_all(dir).and_then(|()| {
            let draft = host_vmm::files::Draft::new_in(dir, ".draft-", "")?;
            draft.file().write_all(&Sha256::digest(code))?;
            draft.file().write_all(code)?;
            draft.persist(&dir.join(key))
        });
        match stored {
            Ok(()) => trim(dir, CACHE_LIMIT_BYTES),
            Err(e) => eprintln!("thaw: warning: could not cache compiled code in {}: {e}", dir.display()),
        }
    }
}

/// Removes the oldest entries of `dir` until the rest fit `limit` bytes. Age is since an entry
/// was written: marking each use would need a system call (`utimensat`) that `thaw serve`'s
/// seccomp filter does not allow, for a cache that rarely fills.
fn trim(dir: &Path, limit: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            // Another process's draft is not an entry yet.
            if e.file_name().as_encoded_bytes().starts_with(b".") {
                return None;
            }
            let meta = e.metadata().ok().filter(|m| m.is_file())?;
            Some((meta.modified().ok()?, meta.len(), e.path()))
        })
        .collect();
    let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
    entries.sort();
    for (_, len, path) in entries {
        if total <= limit {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

/// Feeds what is hashed into a SHA-256.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
    }
}

/// The guest's engine, metering fuel or not, and the cache key of `wasm_sha256` compiled by it.
fn engine_and_key(fuel: bool, wasm_sha256: &[u8; 32]) -> Result<(wasmtime::Engine, String), CodeError> {
    let engine = abi::engine::compiler(fuel).map_err(CodeError::Engine)?;
    let mut hasher = Sha256Hasher(Sha256::new());
    hasher.write(b"thaw code cache 1\0");
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.write(wasm_sha256);
    Ok((engine, hex::encode(hasher.0.finalize())))
}

/// Code for the guest's engine.
#[derive(Debug)]
pub struct Code {
    /// The compiled module.
    pub bytes: Vec<u8>,
    /// Whether it came from the cache rather than the compiler.
    pub cached: bool,
}

/// `wasm` compiled for the guest's engine, metering fuel or not: from `cache`, or compiled
/// (tens of milliseconds to seconds for a large module) and then cached.
pub fn compile(wasm: &[u8], fuel: bool, cache: &CodeCache) -> Result<Code, CodeError> {
    let (engine, key) = engine_and_key(fuel, &function::sha256(wasm))?;
    compile_as(&engine, &key, wasm, cache)
}

/// [`compile`] with the engine and the key in hand.
fn compile_as(engine: &wasmtime::Engine, key: &str, wasm: &[u8], cache: &CodeCache) -> Result<Code, CodeError> {
    if let Some(bytes) = cache.get(key) {
        return Ok(Code { bytes, cached: true });
    }
    let bytes = engine.precompile_module(wasm).map_err(CodeError::Compile)?;
    cache.put(key, &bytes);
    Ok(Code { bytes, cached: false })
}

/// `bundle` as a function with code this thaw compiled: its own code when that is exactly what
/// this thaw makes from its wasm (found in `cache`, or compiled to tell), and otherwise the code
/// made here, re-encoded into it (an older bundle then comes out as the current version, with
/// the filesystem settings it had). [`Function::from_bundle`] validates the result whole.
pub fn own(bundle: Vec<u8>, cache: &CodeCache) -> Result<Function, CodeError> {
    let parsed = bundle::parse(&bundle)?;
    // The key is made from the manifest's wasm hash before anything checks it: a false one
    // finds nothing, or fails `from_bundle`, which checks both hashes the cache was matched on.
    let (engine, key) = engine_and_key(parsed.manifest.fuel.is_some(), &parsed.manifest.wasm_sha256)?;
    if parsed.manifest.code_sha256.is_some_and(|sha| cache.holds(&key, &sha, parsed.code) == Some(true)) {
        return Ok(Function::from_bundle(bundle)?);
    }
    // Nothing invalid is compiled.
    function::check_wasm(&parsed)?;
    let code = compile_as(&engine, &key, parsed.wasm, cache)?.bytes;
    if parsed.manifest.code_sha256.is_some() && parsed.code == code.as_slice() {
        return Ok(Function::from_bundle(bundle)?);
    }
    let manifest = Manifest { code_sha256: Some(function::sha256(&code)), ..parsed.manifest };
    let volume = parsed.volume.unwrap_or_default();
    Ok(Function::from_bundle(bundle::encode(&manifest, parsed.wasm, &code, volume))?)
}

/// Whether `parsed`'s code is what this thaw compiled from its wasm, as far as `cache` knows
/// (`None`: not in the cache, so it would be compiled to tell).
pub fn is_own(parsed: &bundle::Bundle<'_>, cache: &CodeCache) -> Result<Option<bool>, CodeError> {
    let (_, key) = engine_and_key(parsed.manifest.fuel.is_some(), &parsed.manifest.wasm_sha256)?;
    let sha = parsed.manifest.code_sha256.unwrap_or_default();
    Ok(match cache.holds(&key, &sha, parsed.code) {
        // A damaged entry tells nothing.
        Some(false) => cache.get(&key).map(|_| false),
        known => known,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAT: &str = r#"(module (func (export "handle")) (memory (export "memory") 1))"#;
    const OTHER: &str = r#"(module (func (export "handle") nop nop) (memory (export "memory") 1))"#;

    fn manifest(wasm: &[u8], code: &[u8]) -> Manifest {
        Manifest {
            name: "f".into(),
            wasm_sha256: function::sha256(wasm),
            memory_mib: 16,
            fuel: None,
            args: vec!["f".into()],
            env: Vec::new(),
            connections: Vec::new(),
            volume_sha256: None,
            sample_request: None,
            code_sha256: Some(function::sha256(code)),
            scratch_mib: bundle::DEFAULT_SCRATCH_MIB,
            scratch_dirs: Vec::new(),
            data_mount: bundle::DEFAULT_DATA_MOUNT.into(),
            init_until_read: false,
        }
    }

    #[test]
    fn compiling_is_deterministic_so_a_bundle_packed_here_keeps_its_code() {
        let wasm = wat::parse_str(WAT).unwrap();
        let code = compile(&wasm, false, &CodeCache::none()).unwrap().bytes;
        assert_eq!(code, compile(&wasm, false, &CodeCache::none()).unwrap().bytes);
        let bundle = bundle::encode(&manifest(&wasm, &code), &wasm, &code, &[]);
        assert_eq!(own(bundle.clone(), &CodeCache::none()).unwrap().bundle, bundle);
    }

    #[test]
    fn a_bundle_whose_code_is_another_modules_runs_its_own_wasm_compiled_here() {
        let wasm = wat::parse_str(WAT).unwrap();
        let other = compile(&wat::parse_str(OTHER).unwrap(), false, &CodeCache::none()).unwrap().bytes;
        let mine = compile(&wasm, false, &CodeCache::none()).unwrap().bytes;
        assert_ne!(other, mine);
        // The tamperer recomputed every hash: the bundle is well formed.
        let tampered = bundle::encode(&manifest(&wasm, &other), &wasm, &other, &[]);
        Function::from_bundle(tampered.clone()).unwrap();
        let owned = own(tampered, &CodeCache::none()).unwrap().bundle;
        let parsed = bundle::parse(&owned).unwrap();
        assert_eq!(parsed.code, mine.as_slice());
        assert_eq!(parsed.manifest.code_sha256, Some(function::sha256(&mine)));
        assert_eq!(parsed.wasm, wasm.as_slice());
    }

    #[test]
    fn a_cached_entry_is_used_only_for_the_wasm_whose_hash_made_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CodeCache::at(dir.path().to_path_buf());
        let wasm = wat::parse_str(WAT).unwrap();
        let other = wat::parse_str(OTHER).unwrap();
        let other_code = compile(&other, false, &cache).unwrap().bytes;
        // The manifest names the other wasm, whose code the cache holds and the bundle carries.
        let lying = Manifest { wasm_sha256: function::sha256(&other), ..manifest(&wasm, &other_code) };
        let e = own(bundle::encode(&lying, &wasm, &other_code, &[]), &cache).unwrap_err().to_string();
        assert!(e.contains("wasm SHA-256") && e.contains("does not match"), "{e}");
        // Told the truth, the same bundle gets its own wasm's code, whatever the cache holds.
        let tampered = bundle::encode(&manifest(&wasm, &other_code), &wasm, &other_code, &[]);
        for _ in 0..2 {
            let owned = own(tampered.clone(), &cache).unwrap();
            assert_eq!(owned.bundle, own(tampered.clone(), &CodeCache::none()).unwrap().bundle);
            assert_ne!(bundle::parse(&owned.bundle).unwrap().code, other_code.as_slice());
        }
    }

    #[test]
    fn the_cache_keeps_code_by_wasm_and_engine_and_a_damaged_entry_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CodeCache::at(dir.path().join("code"));
        let wasm = wat::parse_str(WAT).unwrap();
        let code = compile(&wasm, false, &cache).unwrap();
        assert!(!code.cached);
        let code = code.bytes;
        let metered = compile(&wasm, true, &cache).unwrap().bytes;
        let again = compile(&wasm, false, &cache).unwrap();
        assert!(again.cached);
        assert_eq!(again.bytes, code);
        assert_ne!(code, metered, "fuel metering is part of the key");
        let entries: Vec<PathBuf> =
            std::fs::read_dir(dir.path().join("code")).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(entries.len(), 2);

        let bundle = bundle::encode(&manifest(&wasm, &code), &wasm, &code, &[]);
        assert_eq!(is_own(&bundle::parse(&bundle).unwrap(), &cache).unwrap(), Some(true));
        assert_eq!(is_own(&bundle::parse(&bundle).unwrap(), &CodeCache::none()).unwrap(), None);

        // Every entry damaged: each is a miss, compiled and stored again.
        for entry in &entries {
            let mut bytes = std::fs::read(entry).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            std::fs::write(entry, bytes).unwrap();
        }
        assert_eq!(is_own(&bundle::parse(&bundle).unwrap(), &cache).unwrap(), None);
        let again = compile(&wasm, false, &cache).unwrap();
        assert!(!again.cached);
        assert_eq!(again.bytes, code);
        assert_eq!(is_own(&bundle::parse(&bundle).unwrap(), &cache).unwrap(), Some(true));
    }

    #[test]
    fn an_unwritable_cache_only_costs_a_compile() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        let cache = CodeCache::at(file.join("code"));
        let wasm = wat::parse_str(WAT).unwrap();
        let code = compile(&wasm, false, &cache).unwrap();
        assert!(!code.cached);
        assert_eq!(code.bytes, compile(&wasm, false, &CodeCache::none()).unwrap().bytes);
        assert!(!compile(&wasm, false, &cache).unwrap().cached);
    }

    #[test]
    fn trimming_removes_the_oldest_entries_first() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        for (name, age) in [("a", 3), ("b", 1), ("c", 2)] {
            let path = dir.path().join(name);
            std::fs::write(&path, [0u8; 100]).unwrap();
            let f = std::fs::File::options().append(true).open(&path).unwrap();
            f.set_modified(old - std::time::Duration::from_secs(age)).unwrap();
        }
        trim(dir.path(), 150);
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["b"]);
    }
}
