//! A function author's first steps, as docs/FUNCTIONS.md gives them: `thaw new` writes each
//! skeleton (Rust reactor, Rust command, C, JavaScript, Python), the docs show exactly those
//! files, and each builds with its own toolchain (cargo for wasm32-wasip1; clang with wasi-libc;
//! none for JavaScript and Python) and answers cold, from a snapshot and under QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{Run, THAW, run};

fn docs() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/FUNCTIONS.md")).unwrap()
}

/// The toolchain rust-toolchain.toml pins: the build of a skeleton, outside this workspace, uses
/// it too.
fn pinned_toolchain() -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../rust-toolchain.toml")).unwrap();
    let line = text.lines().find(|l| l.starts_with("channel")).expect("a channel line");
    line.split('"').nth(1).expect("a quoted channel").to_string()
}

fn thaw_in(dir: &Path, args: &[&str]) -> Run {
    if matches!(args[0], "invoke" | "snapshot") {
        assert!(Path::new("/dev/kvm").exists(), "thaw {} boots a guest under KVM and needs /dev/kvm", args[0]);
    }
    run(Command::new(THAW).args(args).current_dir(dir))
}

/// `thaw new my-fn` with `options` in a fresh directory: (directory guard, the function's dir).
fn new(options: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let parent = tempfile::tempdir().unwrap();
    let mut args = vec!["new", "my-fn"];
    args.extend_from_slice(options);
    let made = thaw_in(parent.path(), &args);
    assert_eq!(made.code, Some(0), "{made:#?}");
    assert!(made.stdout.contains("thaw invoke my-fn.thaw"), "{made:#?}");
    let dir = parent.path().join("my-fn");
    (parent, dir)
}

/// Every file `thaw new` wrote (but .gitignore) appears whole in docs/FUNCTIONS.md.
fn assert_documented(dir: &Path, files: &[&str]) {
    let docs = docs();
    for file in files {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(
            docs.contains(&format!("\n{text}```\n")),
            "docs/FUNCTIONS.md does not show {file} as thaw new writes it:\n{text}"
        );
    }
}

/// Builds a Rust skeleton with the pinned toolchain, offline, into a target directory kept
/// between test runs.
fn cargo_build(dir: &Path, name: &str) {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("skeleton-{name}"));
    let built = run(Command::new("cargo")
        .args(["build", "--release", "--target", "wasm32-wasip1", "--offline", "--quiet"])
        .env("RUSTUP_TOOLCHAIN", pinned_toolchain())
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(dir));
    assert_eq!(built.code, Some(0), "{built:#?}");
    let wasm = target.join("wasm32-wasip1/release").join(format!("{name}.wasm"));
    std::fs::copy(&wasm, dir.join("my-fn.wasm")).unwrap_or_else(|e| panic!("{}: {e}", wasm.display()));
}

/// Packs `my-fn.wasm` in `dir` (as `my-fn.thaw`, thaw pack's default) and checks the answer to
/// `request` cold, from a snapshot and under QEMU.
fn assert_answers(dir: &Path, request: &str, expected: &str) {
    let packed = thaw_in(dir, &["pack", "my-fn.wasm"]);
    assert_eq!(packed.code, Some(0), "{packed:#?}");
    assert!(dir.join("my-fn.thaw").is_file(), "thaw pack writes NAME.thaw without -o");
    assert_bundle_answers(dir, request, expected);
}

/// `my-fn.thaw` in `dir` answers `request` with `expected` cold, from its snapshot (written to
/// `my-fn.snap`) and under QEMU.
fn assert_bundle_answers(dir: &Path, request: &str, expected: &str) {
    let cold = thaw_in(dir, &["invoke", "my-fn.thaw", "--data", request]);
    assert_eq!((cold.code, cold.stdout.as_str()), (Some(0), expected), "{cold:#?}");
    let snap = thaw_in(dir, &["snapshot", "my-fn.thaw", "-o", "my-fn.snap"]);
    assert_eq!(snap.code, Some(0), "{snap:#?}");
    let restored = thaw_in(dir, &["invoke", "my-fn.snap", "--data", request]);
    assert_eq!((restored.code, restored.stdout.as_str()), (Some(0), expected), "{restored:#?}");
    let qemu = thaw_in(dir, &["qemu", "my-fn.thaw", "--data", request, "--timeout", "120"]);
    assert_eq!((qemu.code, qemu.stdout.as_str()), (Some(0), expected), "{qemu:#?}");
}

#[test]
fn the_rust_reactor_skeleton_builds_packs_and_answers_as_documented() {
    let (_guard, dir) = new(&[]);
    assert_documented(&dir, &["Cargo.toml", "src/lib.rs"]);
    cargo_build(&dir, "my_fn");
    let expected = "{\"saved_bytes\":10,\"words\":2}\n";
    assert!(docs().contains("prints {\"saved_bytes\":10,\"words\":2}"), "the docs say what it prints");
    assert_answers(&dir, "hello thaw", expected);
    // What init wrote to stderr shows where init runs (a cold invoke, a snapshot, QEMU), and
    // not again in every VM restored from the snapshot.
    let cold = thaw_in(&dir, &["invoke", "my-fn.thaw", "--data", "x"]);
    assert_eq!(cold.stderr, "init: ready\n", "{cold:#?}");
    let snap = thaw_in(&dir, &["snapshot", "my-fn.thaw", "-o", "again.snap"]);
    assert!(snap.stderr.starts_with("init: ready\nthaw: snapshot of my-fn"), "{snap:#?}");
    let restored = thaw_in(&dir, &["invoke", "again.snap", "--data", "x"]);
    assert_eq!(restored.stderr, "", "{restored:#?}");
    let qemu = thaw_in(&dir, &["qemu", "my-fn.thaw", "--data", "x", "--timeout", "120"]);
    assert_eq!(qemu.stderr, "init: ready\n", "{qemu:#?}");
}

#[test]
fn the_rust_command_skeleton_builds_packs_and_answers_as_documented() {
    let (_guard, dir) = new(&["--kind", "command"]);
    assert_documented(&dir, &["Cargo.toml", "src/main.rs"]);
    cargo_build(&dir, "my-fn");
    assert_answers(&dir, "thaw", "hello, thaw\n");
    let empty = thaw_in(&dir, &["invoke", "my-fn.thaw", "--data", ""]);
    assert_eq!(empty.code, Some(2), "{empty:#?}");
    // `--input -`: the request from standard input.
    let mut child = Command::new(THAW)
        .args(["invoke", "my-fn.thaw", "--input", "-"])
        .current_dir(&dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"stdin").unwrap();
    let piped = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&piped.stdout), "hello, stdin\n");
}

#[test]
fn the_c_skeleton_builds_with_clang_and_wasi_libc_and_answers_as_documented() {
    let (_guard, dir) = new(&["--lang", "c"]);
    assert_documented(&dir, &["main.c", "Makefile"]);
    let built = run(Command::new("make").current_dir(&dir));
    assert_eq!(built.code, Some(0), "needs clang, lld, wasi-libc and libclang-rt-dev-wasm32: {built:#?}");
    assert!(docs().contains("prints {\"bytes\": 10, \"saved_bytes\": 10}"), "the docs say what it prints");
    assert_answers(&dir, "hello thaw", "{\"bytes\": 10, \"saved_bytes\": 10}\n");
}

#[test]
fn thaw_new_refuses_bad_names_existing_directories_and_a_c_reactor() {
    let parent = tempfile::tempdir().unwrap();
    for (args, error) in [
        (vec!["new", "../escape"], "is not a function name"),
        (vec!["new", "f", "--lang", "c", "--kind", "reactor"], "a C function is a command"),
        (vec!["new", "f", "--lang", "js", "--kind", "command"], "a JavaScript function is a module"),
        (vec!["new", "f", "--lang", "python", "--kind", "reactor"], "a Python function is a module"),
    ] {
        let run = thaw_in(parent.path(), &args);
        assert_eq!(run.code, Some(125), "{run:#?}");
        assert!(run.stderr.contains(error), "{run:#?}");
    }
    std::fs::create_dir(parent.path().join("taken")).unwrap();
    std::fs::write(parent.path().join("taken/keep"), "mine").unwrap();
    let run = thaw_in(parent.path(), &["new", "taken"]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
    assert_eq!(std::fs::read_to_string(parent.path().join("taken/keep")).unwrap(), "mine");
}

#[test]
fn the_javascript_skeleton_packs_and_answers_as_documented() {
    let (_guard, dir) = new(&["--lang", "js"]);
    assert_documented(&dir, &["index.mjs", "greetings.json"]);
    let request = r#"{"name": "thaw", "lang": "fr"}"#;
    let expected = r#"{"message":"Bonjour, thaw!"}"#;
    assert!(docs().contains(&format!("--data '{request}'   # prints {expected}")), "the docs say what it prints");
    for round in 0..2 {
        // Packing again must not take the first bundle into the function's files.
        let packed = thaw_in(&dir, &["pack", "."]);
        assert_eq!(packed.code, Some(0), "{packed:#?}");
        assert!(packed.stderr.contains("a 2560-byte data volume"), "round {round}: {packed:#?}");
    }
    assert_bundle_answers(&dir, request, expected);
    let restored = thaw_in(&dir, &["invoke", "my-fn.snap", "--data", r#"{"lang": "de"}"#]);
    assert_eq!((restored.code, restored.stdout.as_str()), (Some(0), r#"{"message":"Hallo, world!"}"#), "{restored:#?}");
}

#[test]
fn the_python_skeleton_packs_and_answers_as_documented() {
    let (_guard, dir) = new(&["--lang", "python"]);
    assert_documented(&dir, &["handler.py", "greetings.json", "requirements.txt"]);
    let request = r#"{"name": "thaw", "lang": "fr"}"#;
    let expected = r#"{"message": "Bonjour, thaw!"}"#;
    assert!(docs().contains(&format!("--data '{request}'   # prints {expected}")), "the docs say what it prints");
    let mut volumes = Vec::new();
    for round in 0..2 {
        // Packing again must not take the first bundle into the function's files.
        let packed = thaw_in(&dir, &["pack", "."]);
        assert_eq!(packed.code, Some(0), "{packed:#?}");
        assert!(packed.stderr.contains("(Python, module /app/handler.py"), "round {round}: {packed:#?}");
        let inspect = thaw_in(&dir, &["inspect", "my-fn.thaw", "--json"]);
        let manifest: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
        assert_eq!(manifest["init_until_read"], true, "{inspect:#?}");
        volumes.push(manifest["volume"]["sha256"].clone());
    }
    assert!(volumes[0].is_string(), "a volume: {volumes:?}");
    assert_eq!(volumes[0], volumes[1], "the second pack's volume is the first's");
    assert_bundle_answers(&dir, request, expected);
    let restored = thaw_in(&dir, &["invoke", "my-fn.snap", "--data", r#"{"lang": "de"}"#]);
    assert_eq!(
        (restored.code, restored.stdout.as_str()),
        (Some(0), r#"{"message": "Hallo, world!"}"#),
        "{restored:#?}"
    );
}
