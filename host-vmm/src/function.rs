//! Function bundles on the host: validating one before it is packed or booted, and the memory a
//! VM needs to run it.
//!
//! A bundle is untrusted: `thaw pack` and the VMM both run [`Function::from_bundle`], which
//! checks the framing and manifest (`abi::bundle`), the SHA-256s of the wasm and of its compiled
//! code, and the module itself (with wasmparser, the validator Wasmtime uses): it must validate,
//! import only WASI preview1 functions with their exact signatures, and export `handle` (a
//! reactor) or `_start` (a command), each taking and returning nothing. Whether the code fits
//! the guest's engine is checked by the guest, which refuses it in one line.

use abi::bundle::{self, BundleError, Manifest};
use sha2::{Digest, Sha256};
use wasmparser::types::{EntityType, TypesRef};
use wasmparser::{CompositeInnerType, FuncType, ValType, Validator};

/// Guest memory a function's VM gets on top of the linear memory and the scratch filesystem its
/// manifest allows and its code (see [`Function::vm_memory_mib`]): the kernel, its heap and the
/// runtime's own state.
pub const RUNTIME_OVERHEAD_MIB: u64 = 48;

/// What is wrong with a function.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// The bundle's framing or manifest is invalid.
    #[error("{0}")]
    Bundle(#[from] BundleError),
    /// The bundle predates compiled code (format version 5).
    #[error(
        "bundle format version {0} carries no compiled code, which this thaw runs; repack it with this thaw (`thaw pack`)"
    )]
    NoCode(u32),
    /// The compiled code does not match the manifest's hash.
    #[error("bundle: code SHA-256 {actual} does not match the manifest's {expected} (corrupted)")]
    CodeSha256 {
        /// From the manifest.
        expected: String,
        /// Of the bytes present.
        actual: String,
    },
    /// The wasm bytes do not match the manifest's hash.
    #[error("bundle: wasm SHA-256 {actual} does not match the manifest's {expected} (corrupted)")]
    Sha256 {
        /// From the manifest.
        expected: String,
        /// Of the bytes present.
        actual: String,
    },
    /// The bytes are not a valid wasm module.
    #[error("not a valid WebAssembly module: {0}")]
    Invalid(String),
    /// The bytes are a wasm component (the component model, WASI preview 2).
    #[error("a WebAssembly component: components are not supported yet; build for wasm32-wasip1")]
    Component,
    /// The module imports something thaw does not provide.
    #[error("import {module}.{name}: {reason}")]
    Import {
        /// The import's module.
        module: String,
        /// The import's name.
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// The module has no usable entry point.
    #[error("{0}")]
    Entry(String),
    /// The module's memory starts larger than the function may use.
    #[error(
        "memory {name:?} starts at {pages} {unit} ({mib} MiB), more than the {limit_mib} MiB the function may use (pack with --memory {mib} or more)",
        unit = if *pages == 1 { "page" } else { "pages" }
    )]
    Memory {
        /// The memory's export name.
        name: String,
        /// Its minimum, in 64 KiB pages.
        pages: u64,
        /// The same in MiB, rounded up.
        mib: u64,
        /// The function's limit (`thaw pack --memory`).
        limit_mib: u32,
    },
    /// The data volume does not match the manifest's hash.
    #[error("bundle: data volume SHA-256 {actual} does not match the manifest's {expected} (corrupted)")]
    VolumeSha256 {
        /// From the manifest.
        expected: String,
        /// Of the bytes present.
        actual: String,
    },
    /// The data volume is malformed.
    #[error("bundle: data volume: {0}")]
    Volume(#[from] abi::volume::VolumeError),
    /// The data volume's bytes are missing.
    #[error("bundle: the data volume's {0} bytes are missing")]
    VolumeMissing(u64),
}

/// How the guest enters a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionKind {
    /// Exports `handle`, and maybe `_initialize` and `init`.
    Reactor,
    /// Exports only `_start`.
    Command,
}

/// A validated bundle.
#[derive(Debug, Clone)]
pub struct Function {
    /// The bundle's bytes.
    pub bundle: Vec<u8>,
    /// Its manifest.
    pub manifest: Manifest,
    /// How the guest enters it.
    pub kind: FunctionKind,
    /// Where its data volume is in `bundle` (offset, length), if it has one.
    pub volume: Option<(u64, u64)>,
}

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The function type of `entity`, if it is a function.
fn func_type<'a>(types: &'a TypesRef<'_>, entity: &EntityType) -> Option<&'a FuncType> {
    let (EntityType::Func(id) | EntityType::FuncExact(id)) = entity else { return None };
    match &types[*id].composite_type.inner {
        CompositeInnerType::Func(ty) => Some(ty),
        _ => None,
    }
}

fn unit_func(types: &TypesRef<'_>, entity: &EntityType) -> bool {
    func_type(types, entity).is_some_and(|f| f.params().is_empty() && f.results().is_empty())
}

/// Bytes in a WebAssembly memory page.
const WASM_PAGE_BYTES: u64 = 64 << 10;

/// Validates `wasm` as a thaw function that may use `memory_mib` MiB of linear memory, and
/// tells how it is entered.
pub fn validate_wasm(wasm: &[u8], memory_mib: u32) -> Result<FunctionKind, FunctionError> {
    if wasm.len() > bundle::MAX_WASM_BYTES {
        return Err(FunctionError::Invalid(format!(
            "{} bytes, more than the {}-byte limit",
            wasm.len(),
            bundle::MAX_WASM_BYTES
        )));
    }
    if !wasm.starts_with(b"\0asm") {
        let head: Vec<String> = wasm.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(FunctionError::Invalid(format!(
            "it starts with [{}], not the wasm magic [00 61 73 6d]",
            head.join(" ")
        )));
    }
    // A component's preamble: the magic, then version 0x0d and layer 1.
    if wasm.get(4..8) == Some(&[0x0d, 0, 1, 0]) {
        return Err(FunctionError::Component);
    }
    let types = Validator::new().validate_all(wasm).map_err(|e| FunctionError::Invalid(e.to_string()))?;
    let types = types.as_ref();
    let (Some(imports), Some(exports)) = (types.core_imports(), types.core_exports()) else {
        return Err(FunctionError::Component);
    };
    for (module, name, entity) in imports {
        let refuse = |reason: String| FunctionError::Import { module: module.into(), name: name.into(), reason };
        if module != abi::wasi::MODULE {
            return Err(refuse(format!("only {} functions can be imported", abi::wasi::MODULE)));
        }
        let Some(expected) = abi::wasi::lookup(name) else {
            return Err(refuse("not a WASI preview1 function".into()));
        };
        let Some(ty) = func_type(&types, &entity) else {
            return Err(refuse("imported as something other than a function".into()));
        };
        let params: Vec<ValType> = expected
            .params
            .iter()
            .map(|t| match t {
                abi::wasi::ValType::I32 => ValType::I32,
                abi::wasi::ValType::I64 => ValType::I64,
            })
            .collect();
        let results: &[ValType] = if expected.returns_errno { &[ValType::I32] } else { &[] };
        if ty.params() != params.as_slice() || ty.results() != results {
            return Err(refuse(format!(
                "signature {:?} -> {:?} does not match WASI's {params:?} -> {results:?}",
                ty.params(),
                ty.results()
            )));
        }
    }
    let mut entry = (None, None);
    for (name, entity) in exports {
        match (name, &entity) {
            (_, EntityType::Memory(memory))
                if memory.initial.saturating_mul(WASM_PAGE_BYTES) > u64::from(memory_mib) << 20 =>
            {
                let pages = memory.initial;
                let mib = pages.saturating_mul(WASM_PAGE_BYTES).div_ceil(1 << 20);
                return Err(FunctionError::Memory { name: name.into(), pages, mib, limit_mib: memory_mib });
            }
            ("handle", _) => entry.0 = Some(unit_func(&types, &entity)),
            ("_start", _) => entry.1 = Some(unit_func(&types, &entity)),
            _ => {}
        }
    }
    match entry {
        (Some(true), _) => Ok(FunctionKind::Reactor),
        (Some(false), _) => {
            Err(FunctionError::Entry("export handle must be a function taking and returning nothing".into()))
        }
        (None, Some(true)) => Ok(FunctionKind::Command),
        (None, Some(false)) => {
            Err(FunctionError::Entry("export _start must be a function taking and returning nothing".into()))
        }
        (None, None) => Err(FunctionError::Entry("the module exports neither handle nor _start".into())),
    }
}

/// Checks a parsed bundle's wasm against the manifest's SHA-256 and validates it for the
/// manifest's memory; tells how the function is entered.
pub fn check_wasm(parsed: &bundle::Bundle<'_>) -> Result<FunctionKind, FunctionError> {
    let actual = sha256(parsed.wasm);
    if actual != parsed.manifest.wasm_sha256 {
        return Err(FunctionError::Sha256 {
            expected: hex::encode(parsed.manifest.wasm_sha256),
            actual: hex::encode(actual),
        });
    }
    let kind = validate_wasm(parsed.wasm, parsed.manifest.memory_mib)?;
    check_entry(&parsed.manifest, kind)?;
    Ok(kind)
}

/// Checks that the manifest's way of entering the module fits its `kind`: only a command can be
/// initialized up to its first read of stdin (a reactor's init is its init exports).
pub fn check_entry(manifest: &Manifest, kind: FunctionKind) -> Result<(), FunctionError> {
    if manifest.init_until_read && kind == FunctionKind::Reactor {
        return Err(FunctionError::Entry(
            "init until the first read applies to commands (which export _start), but this module exports handle: its init is _initialize and init".into(),
        ));
    }
    Ok(())
}

impl Function {
    /// Validates `bundle` completely.
    pub fn from_bundle(bundle: Vec<u8>) -> Result<Self, FunctionError> {
        let parsed = bundle::parse(&bundle)?;
        let kind = check_wasm(&parsed)?;
        let Some(code_sha256) = parsed.manifest.code_sha256 else {
            return Err(FunctionError::NoCode(parsed.manifest.format_version()));
        };
        let actual = sha256(parsed.code);
        if actual != code_sha256 {
            return Err(FunctionError::CodeSha256 { expected: hex::encode(code_sha256), actual: hex::encode(actual) });
        }
        let volume = match (parsed.manifest.volume_sha256, parsed.volume) {
            (None, _) => None,
            (Some(_), None) => return Err(FunctionError::VolumeMissing(parsed.volume_len)),
            (Some(expected), Some(volume)) => {
                let actual = sha256(volume);
                if actual != expected {
                    return Err(FunctionError::VolumeSha256 {
                        expected: hex::encode(expected),
                        actual: hex::encode(actual),
                    });
                }
                abi::volume::parse(volume)?;
                Some(((bundle.len() - volume.len()) as u64, volume.len() as u64))
            }
        };
        let manifest = parsed.manifest;
        Ok(Self { bundle, manifest, kind, volume })
    }

    /// What the guest receives as its ramdisk: the bundle without its data volume, which the
    /// guest reads through the block device instead.
    pub fn ramdisk(&self) -> &[u8] {
        let end = self.volume.map_or(self.bundle.len() as u64, |(offset, _)| offset);
        &self.bundle[..end as usize]
    }

    /// `base` set up to cold-boot this function: its memory, and the bundle as the ramdisk,
    /// with `timeout` and `requests`.
    pub fn boot_config(
        &self,
        base: crate::VmConfig,
        timeout: std::time::Duration,
        requests: Vec<Vec<u8>>,
    ) -> crate::VmConfig {
        crate::VmConfig {
            memory_mib: self.vm_memory_mib(),
            timeout,
            ramdisk: Some(self.ramdisk().to_vec()),
            requests,
            ..base
        }
    }

    /// Guest memory for a VM running this function: its linear-memory allowance (the guest
    /// allocates a memory at the whole allowance, so it never moves), its scratch filesystem's
    /// cap (the in-memory files live on the guest heap), the runtime overhead, and the ramdisk,
    /// whose code runs where it lies. Pages the guest never touches cost nothing.
    pub fn vm_memory_mib(&self) -> u64 {
        let ramdisk_mib = (self.ramdisk().len() as u64).div_ceil(1 << 20);
        u64::from(self.manifest.memory_mib) + u64::from(self.manifest.scratch_mib) + RUNTIME_OVERHEAD_MIB + ramdisk_mib
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module with one import and a `handle` export, assembled by hand.
    fn module(import_name: &[u8], import_type: &[u8], export: &[u8]) -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        // Type section: type 0 = import_type, type 1 = () -> ().
        let mut types = vec![2];
        types.extend_from_slice(import_type);
        types.extend_from_slice(&[0x60, 0, 0]);
        m.extend_from_slice(&[1, types.len() as u8]);
        m.extend_from_slice(&types);
        // Import section: wasi_snapshot_preview1.<name> : type 0.
        let mut imports = vec![1, 22];
        imports.extend_from_slice(b"wasi_snapshot_preview1");
        imports.push(import_name.len() as u8);
        imports.extend_from_slice(import_name);
        imports.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&[2, imports.len() as u8]);
        m.extend_from_slice(&imports);
        // Function section: one function of type 1; export it; code: empty body.
        m.extend_from_slice(&[3, 2, 1, 1]);
        let mut exports = vec![1, export.len() as u8];
        exports.extend_from_slice(export);
        exports.extend_from_slice(&[0, 1]);
        m.extend_from_slice(&[7, exports.len() as u8]);
        m.extend_from_slice(&exports);
        m.extend_from_slice(&[10, 4, 1, 2, 0, 0x0b]);
        m
    }

    const PROC_EXIT: &[u8] = &[0x60, 1, 0x7f, 0];

    #[test]
    fn accepts_reactors_and_commands() {
        assert_eq!(validate_wasm(&module(b"proc_exit", PROC_EXIT, b"handle"), 16).unwrap(), FunctionKind::Reactor);
        assert_eq!(validate_wasm(&module(b"proc_exit", PROC_EXIT, b"_start"), 16).unwrap(), FunctionKind::Command);
    }

    #[test]
    fn rejects_bad_modules_with_named_problems() {
        let e = validate_wasm(b"not wasm at all", 16).unwrap_err().to_string();
        assert!(e.starts_with("not a valid WebAssembly module"), "{e}");
        let e = validate_wasm(&module(b"proc_exit", PROC_EXIT, b"other"), 16).unwrap_err().to_string();
        assert_eq!(e, "the module exports neither handle nor _start");
        let e = validate_wasm(&module(b"no_such_call", PROC_EXIT, b"handle"), 16).unwrap_err().to_string();
        assert_eq!(e, "import wasi_snapshot_preview1.no_such_call: not a WASI preview1 function");
        let e = validate_wasm(&module(b"proc_exit", &[0x60, 0, 0], b"handle"), 16).unwrap_err().to_string();
        assert!(e.contains("does not match WASI's"), "{e}");
    }

    #[test]
    fn rejects_a_bundle_whose_wasm_or_code_does_not_match_its_hash_or_that_has_no_code() {
        let wasm = module(b"proc_exit", PROC_EXIT, b"handle");
        let code = b"compiled".as_slice();
        let manifest = Manifest {
            name: "t".into(),
            wasm_sha256: sha256(b"something else"),
            memory_mib: 1,
            fuel: None,
            args: vec![],
            env: vec![],
            connections: Vec::new(),
            volume_sha256: None,
            sample_request: None,
            code_sha256: Some(sha256(code)),
            scratch_mib: bundle::DEFAULT_SCRATCH_MIB,
            scratch_dirs: bundle::DEFAULT_SCRATCH_DIRS.iter().map(|d| d.to_string()).collect(),
            data_mount: bundle::DEFAULT_DATA_MOUNT.into(),
            init_until_read: false,
        };
        let e = Function::from_bundle(bundle::encode(&manifest, &wasm, code, &[])).unwrap_err().to_string();
        assert!(e.contains("wasm SHA-256") && e.contains("does not match the manifest's"), "{e}");
        let good = Manifest { wasm_sha256: sha256(&wasm), ..manifest };
        let function = Function::from_bundle(bundle::encode(&good, &wasm, code, &[])).unwrap();
        assert_eq!(function.kind, FunctionKind::Reactor);
        // 1 MiB of linear memory, 16 of scratch files, the overhead, and the 1-MiB ramdisk.
        assert_eq!(function.vm_memory_mib(), 1 + 16 + RUNTIME_OVERHEAD_MIB + 1);
        let e = Function::from_bundle(bundle::encode(&good, &wasm, b"compiLed", &[])).unwrap_err().to_string();
        assert!(e.starts_with("bundle: code SHA-256"), "{e}");
        let old = Manifest { code_sha256: None, ..good };
        let e = Function::from_bundle(bundle::encode(&old, &wasm, &[], &[])).unwrap_err().to_string();
        assert_eq!(
            e,
            "bundle format version 1 carries no compiled code, which this thaw runs; repack it with this thaw (`thaw pack`)"
        );
    }

    #[test]
    fn refuses_a_component() {
        // A component's preamble: the wasm magic, then version 0x0d and layer 1.
        let e = validate_wasm(b"\0asm\x0d\0\x01\0", 16).unwrap_err().to_string();
        assert_eq!(e, "a WebAssembly component: components are not supported yet; build for wasm32-wasip1");
    }
}
