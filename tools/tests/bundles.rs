//! Hostile bundles and modules: `thaw pack` and `thaw invoke` must refuse each with exit code
//! 125 and one line naming the problem, before any VM is booted.

use std::path::{Path, PathBuf};
use std::process::Command;

const THAW: &str = env!("CARGO_BIN_EXE_thaw");

const HANDLER: &str = r#"(module (func (export "handle")) (memory (export "memory") 1))"#;

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// A valid bundle of `HANDLER`, packed by the real CLI.
    fn bundle(&self) -> Vec<u8> {
        let wat = self.file("f.wat", HANDLER.as_bytes());
        let out = self.dir.path().join("f.thaw");
        let status =
            Command::new(THAW).args(["pack", wat.to_str().unwrap(), "-o", out.to_str().unwrap()]).output().unwrap();
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        std::fs::read(out).unwrap()
    }
}

fn refused(args: &[&str]) -> String {
    let output = Command::new(THAW).args(args).output().expect("thaw must start");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(125), "args {args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "args {args:?}: expected one line, got {stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.stdout.is_empty(), "{args:?}");
    stderr
}

fn invoke(bundle: &Path) -> String {
    refused(&["invoke", bundle.to_str().unwrap(), "--data", "x"])
}

#[test]
fn invoke_refuses_truncated_bundles() {
    let s = Scratch::new();
    let good = s.bundle();
    for len in [0, 10, 63, 64, 100, good.len() - 1] {
        let line = invoke(&s.file("cut.thaw", &good[..len]));
        assert!(line.contains("bundle"), "{len}: {line}");
    }
}

#[test]
fn invoke_refuses_a_wrong_magic_and_a_wrong_version() {
    let s = Scratch::new();
    let mut bytes = s.bundle();
    bytes[0] = b'X';
    assert!(
        invoke(&s.file("magic.thaw", &bytes)).contains("neither a function bundle (THAWFUNC) nor a snapshot image")
    );
    let mut bytes = s.bundle();
    bytes[8] = 8;
    assert!(invoke(&s.file("version.thaw", &bytes)).contains("format version 8 is not supported"));
}

#[test]
fn invoke_refuses_a_manifest_that_lies_about_its_lengths() {
    let s = Scratch::new();
    let good = s.bundle();
    // The manifest length grows by a page while the total stays: the header no longer adds up.
    let mut bytes = good.clone();
    let manifest_len = u32::from_le_bytes(bytes[16..20].try_into().unwrap());
    bytes[16..20].copy_from_slice(&(manifest_len + 4096).to_le_bytes());
    assert!(invoke(&s.file("lie1.thaw", &bytes)).contains("total length"));
    // The name's length prefix points past the manifest (and the checksum is fixed up, so only
    // the lie remains).
    let mut bytes = good.clone();
    bytes[64..66].copy_from_slice(&60_000u16.to_le_bytes());
    let crc = abi::codec::crc32(&[&bytes[..40], &bytes[64..64 + manifest_len as usize]]);
    bytes[40..44].copy_from_slice(&crc.to_le_bytes());
    assert!(invoke(&s.file("lie2.thaw", &bytes)).contains("name runs past the end of the manifest"));
    // A flipped manifest byte without a fixed-up checksum.
    let mut bytes = good;
    bytes[70] ^= 0x20;
    assert!(invoke(&s.file("crc.thaw", &bytes)).contains("checksum"));
}

#[test]
fn invoke_refuses_wasm_bytes_that_do_not_match_or_are_not_wasm() {
    let s = Scratch::new();
    let mut bytes = s.bundle();
    let wasm_at = 64 + u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
    bytes[wasm_at + 20] ^= 0xff;
    let line = invoke(&s.file("sha.thaw", &bytes));
    assert!(line.contains("wasm SHA-256") && line.contains("does not match the manifest's"), "{line}");
    // A damaged byte of the code does not matter: the code is replaced by this thaw's (the
    // bundle rule), and the function runs.
    let mut bytes = s.bundle();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let damaged = s.file("code.thaw", &bytes);
    let output = Command::new(THAW).args(["invoke", damaged.to_str().unwrap(), "--data", "x"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    // Well framed and correctly hashed, but the payload is not WebAssembly.
    let junk = b"#!/bin/sh\necho not wasm\n";
    let code = b"compiled";
    let manifest = abi::bundle::Manifest {
        name: "junk".into(),
        wasm_sha256: host_vmm::function::sha256(junk),
        memory_mib: 1,
        fuel: None,
        args: vec![],
        env: vec![],
        connections: Vec::new(),
        volume_sha256: None,
        sample_request: None,
        code_sha256: Some(host_vmm::function::sha256(code)),
        scratch_mib: abi::bundle::DEFAULT_SCRATCH_MIB,
        scratch_dirs: vec!["/".into(), "/tmp".into()],
        data_mount: abi::bundle::DEFAULT_DATA_MOUNT.into(),
        init_until_read: false,
    };
    let line = invoke(&s.file("junk.thaw", &abi::bundle::encode(&manifest, junk, code, &[])));
    assert!(line.contains("not a valid WebAssembly module"), "{line}");
}

#[test]
fn pack_refuses_what_is_not_a_thaw_function() {
    let s = Scratch::new();
    let out = s.dir.path().join("out.thaw");
    let out = out.to_str().unwrap();
    let pack = |input: &Path| refused(&["pack", input.to_str().unwrap(), "-o", out]);
    assert!(pack(&s.file("junk.wasm", b"\0asm\x01\0\0\0garbage")).contains("not a valid WebAssembly module"));
    assert!(pack(&s.file("text.wat", b"(module (func")).contains("not valid WAT"));
    let no_entry = s.file("noentry.wat", b"(module (func (export \"other\")))");
    assert!(pack(&no_entry).contains("exports neither handle nor _start"));
    let env_import = s.file("env.wat", b"(module (import \"env\" \"f\" (func)) (func (export \"handle\")))");
    assert!(pack(&env_import).contains("import env.f: only wasi_snapshot_preview1 functions can be imported"));
    let bad_sig = s.file(
        "sig.wat",
        b"(module (import \"wasi_snapshot_preview1\" \"fd_write\" (func)) (func (export \"handle\")))",
    );
    assert!(pack(&bad_sig).contains("does not match WASI's"));
    let handler = s.file("ok.wat", HANDLER.as_bytes());
    assert!(refused(&["pack", handler.to_str().unwrap(), "--env", "NOEQUALS", "-o", out]).contains("is not KEY=VALUE"));
    // Issue 28, defect 11: refused as the flag's value, not as a memory of "1 pages (1 MiB)".
    let zero = refused(&["pack", handler.to_str().unwrap(), "--memory", "0", "-o", out]);
    assert!(zero.contains("invalid value '0' for '--memory <MIB>': 0 is not in 1..=4096"), "{zero}");
    assert!(!Path::new(out).exists(), "a refused pack must not leave a bundle behind");
}

#[test]
fn a_sample_request_is_carried_in_the_bundle_and_capped() {
    let s = Scratch::new();
    let wat = s.file("f.wat", HANDLER.as_bytes());
    let out = s.dir.path().join("s.thaw");
    let pack = |sample: &str| {
        Command::new(THAW)
            .args(["pack", wat.to_str().unwrap(), "-o", out.to_str().unwrap(), "--sample-data", sample])
            .output()
            .unwrap()
    };
    let packed = pack(r#"{"n": 1}"#);
    assert!(String::from_utf8_lossy(&packed.stderr).contains("a 8-byte sample request"), "{packed:?}");
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..12], b"THAWFUNC\x06\0\0\0");
    let manifest = abi::bundle::parse(&bytes).unwrap().manifest;
    assert_eq!(manifest.sample_request.as_deref(), Some(&br#"{"n": 1}"#[..]));
    let plain = s.bundle();
    assert_eq!(&plain[..12], b"THAWFUNC\x06\0\0\0", "every bundle carries code: version 6");
    assert_eq!(abi::bundle::parse(&plain).unwrap().manifest.sample_request, None);
    let big = pack(&"x".repeat(abi::bundle::MAX_SAMPLE_BYTES + 1));
    assert_eq!(big.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&big.stderr).contains("sample request: 65537 bytes, more than 65536"), "{big:?}");
}

/// Issue 14, defect 3: `-o` replaced whatever was there, a device node included, and replaced a
/// symbolic link instead of writing where it points. Now it writes through a link, and refuses
/// anything that is not a regular file, leaving it as it was.
#[test]
fn pack_writes_through_a_link_and_refuses_to_replace_what_is_not_a_regular_file() {
    let scratch = Scratch::new();
    let wat = scratch.file("f.wat", HANDLER.as_bytes());
    let fifo = scratch.dir.path().join("fifo");
    let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `name` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    let line = refused(&["pack", wat.to_str().unwrap(), "-o", fifo.to_str().unwrap()]);
    assert!(line.contains("is a FIFO, not a regular file"), "{line}");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::symlink_metadata(&fifo).unwrap().file_type()));

    let target = scratch.file("target.thaw", b"old");
    let link = scratch.dir.path().join("link.thaw");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let output =
        Command::new(THAW).args(["pack", wat.to_str().unwrap(), "-o", link.to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
    assert!(std::fs::read(&target).unwrap().starts_with(&abi::bundle::MAGIC), "the bundle went where it points");
}

/// Issue 14, defect 5: a module whose memory starts larger than `--memory` packed fine and then
/// panicked the guest at instantiation. `thaw pack` refuses it, naming what to pack it with.
#[test]
fn pack_refuses_a_memory_that_starts_larger_than_the_limit() {
    let scratch = Scratch::new();
    let big = r#"(module (func (export "handle")) (memory (export "memory") 1024))"#;
    let wat = scratch.file("big.wat", big.as_bytes());
    let out = scratch.dir.path().join("big.thaw");
    let line = refused(&["pack", wat.to_str().unwrap(), "--memory", "16", "-o", out.to_str().unwrap()]);
    assert!(
        line.contains(r#"memory "memory" starts at 1024 pages (64 MiB), more than the 16 MiB the function may use (pack with --memory 64 or more)"#),
        "{line}"
    );
    assert!(!out.exists());
    let output = Command::new(THAW)
        .args(["pack", wat.to_str().unwrap(), "--memory", "64", "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// A bundle from before compiled code runs: thaw compiles every bundle's wasm itself (the bundle
/// rule, docs/SECURITY.md §3), so code a bundle lacks is no more missing than code it carries
/// is trusted. Before the rule it was refused with a line that said to repack it.
#[test]
fn a_bundle_from_before_compiled_code_runs_compiled_here() {
    let s = Scratch::new();
    let bundle = s.bundle();
    let parsed = abi::bundle::parse(&bundle).unwrap();
    // The same function as a format 4 bundle: no code, a sample request.
    let manifest =
        abi::bundle::Manifest { code_sha256: None, sample_request: Some(b"x".to_vec()), ..parsed.manifest.clone() };
    let old = abi::bundle::encode(&manifest, parsed.wasm, &[], &[]);
    assert_eq!(old[8], 4);
    let old = s.file("old.thaw", &old);
    let output = Command::new(THAW).args(["invoke", old.to_str().unwrap(), "--data", "x"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let shown = Command::new(THAW).args(["inspect", old.to_str().unwrap()]).output().unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("code        none: thaw compiles the wasm when it runs"), "{shown}");
}

#[test]
fn pack_records_the_filesystem_settings_and_refuses_bad_ones_naming_the_flag() {
    let s = Scratch::new();
    let wat = s.file("f.wat", HANDLER.as_bytes());
    let data = s.dir.path().join("my:data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("a.txt"), b"x").unwrap();
    let (wat, data) = (wat.to_str().unwrap(), data.to_str().unwrap());
    let out = s.dir.path().join("fs.thaw");
    let out = out.to_str().unwrap();
    let pack = |extra: &[&str]| {
        let output = Command::new(THAW).args(["pack", wat, "-o", out]).args(extra).output().unwrap();
        assert!(output.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&output.stderr));
        abi::bundle::parse(&std::fs::read(out).unwrap()).unwrap().manifest
    };
    let defaults = pack(&[]);
    assert_eq!(
        (defaults.scratch_mib, defaults.scratch_dirs, defaults.data_mount),
        (16, vec!["/".into(), "/tmp".into()], "/data".into())
    );
    let mount = format!("{data}:/srv/files");
    let set = pack(&["--scratch-dir", "/work", "--scratch-dir", "/tmp/x", "--scratch-mib", "64", "--data-dir", &mount]);
    assert_eq!((set.scratch_mib, set.data_mount.as_str()), (64, "/srv/files"));
    assert_eq!(set.preopens(), ["/work", "/tmp/x", "/srv/files"]);
    // A directory whose name holds a colon, with no guest path after it, mounts at /data.
    let bare = pack(&["--data-dir", data, "--no-scratch-dirs"]);
    assert_eq!((bare.scratch_dirs.len(), bare.preopens()), (0, vec!["/data"]));
    let shown = Command::new(THAW).args(["inspect", out]).output().unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("thaw function bundle, format version 6"), "{shown}");
    assert!(shown.contains("scratch     none preopened; in-memory files up to 16 MiB\n"), "{shown}");
    assert!(shown.contains("data mount  /data: a ") && shown.contains("preopens    fd 3 /data\n"), "{shown}");

    let nine: Vec<String> = (1..=9).flat_map(|i| ["--scratch-dir".to_string(), format!("/d{i}")]).collect();
    let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
    let relative = format!("{data}:/a/../b");
    for (extra, message) in [
        (&["--scratch-dir", "tmp"][..], r#"--scratch-dir tmp: path "tmp" is not absolute"#),
        (&["--scratch-dir", "/a//b"], r#"--scratch-dir /a//b: path "/a//b" has an empty component"#),
        (&["--scratch-dir", "/a", "--scratch-dir", "/a"], "--scratch-dir /a: given twice"),
        (&nine, "--scratch-dir: given 9 times, more than the 8"),
        (&["--scratch-mib", "0"], "--scratch-mib 0: outside 1..=1024 MiB"),
        (&["--scratch-mib", "1025"], "--scratch-mib 1025: outside 1..=1024 MiB"),
        (&["--data-dir", &relative], r#":/a/../b: path "/a/../b" has a ".." component"#),
    ] {
        let line = refused(&[&["pack", wat, "-o", out][..], extra].concat());
        assert!(line.starts_with("thaw: error: --") && line.contains(message), "{extra:?}: {line}");
    }
    let both = ["pack", wat, "-o", out, "--scratch-dir", "/a", "--no-scratch-dirs"];
    let code = Command::new(THAW).args(both).output().unwrap().status.code();
    assert_eq!(code, Some(125), "--scratch-dir and --no-scratch-dirs conflict: a usage error");
}
