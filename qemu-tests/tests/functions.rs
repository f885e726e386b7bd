//! Real functions (Rust compiled to wasm32-wasip1 by this build, and WAT fixtures) packed with
//! `thaw pack`, then served one request with `thaw invoke` under KVM and with `thaw qemu` under
//! QEMU: both must print the same response, stderr and exit code.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

mod common;

use common::{Run, both, run_thaw};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fixtures").join(name)
}

fn thaw(args: &[&str]) -> Run {
    match args[0] {
        "invoke" => assert!(Path::new("/dev/kvm").exists(), "thaw invoke boots a guest under KVM and needs /dev/kvm"),
        "qemu" => assert!(
            Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success()),
            "thaw qemu needs qemu-system-x86_64 (apt-get install qemu-system-x86)"
        ),
        _ => {}
    }
    run_thaw(args)
}

/// Packs `source` (a file, or `--example NAME`) into a bundle in a fresh directory and returns
/// (directory guard, bundle path).
fn pack_args(source: &[&str], extra: &[&str]) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("function.thaw").to_str().unwrap().to_string();
    let mut args = vec!["pack"];
    args.extend_from_slice(source);
    args.extend_from_slice(&["-o", &bundle]);
    args.extend_from_slice(extra);
    let run = thaw(&args);
    assert_eq!(run.code, Some(0), "pack failed: {run:#?}");
    (dir, bundle)
}

fn pack(input: &Path, extra: &[&str]) -> (tempfile::TempDir, String) {
    pack_args(&[input.to_str().unwrap()], extra)
}

/// Packs one of the example functions built into thaw.
fn example(name: &str, extra: &[&str]) -> (tempfile::TempDir, String) {
    pack_args(&["--example", name], extra)
}

fn invoke(bundle: &str, data: &str, extra: &[&str]) -> Run {
    let mut args = vec!["invoke", bundle, "--data", data];
    args.extend_from_slice(extra);
    thaw(&args)
}

fn qemu(bundle: &str, data: &str) -> Run {
    thaw(&["qemu", bundle, "--data", data, "--timeout", "120"])
}

#[test]
fn hello_greets_by_name() {
    let (_dir, bundle) = example("hello", &[]);
    let run = both(&bundle, r#"{"name": "thaw"}"#);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stdout, "{\"greeting\":\"Hello, thaw!\"}\n");
    assert_eq!(run.stderr, "hello: greeted thaw\n");
}

#[test]
fn json_transform_parses_transforms_and_serializes() {
    let (_dir, bundle) = example("json-transform", &[]);
    let order = r#"{"customer": "ada", "items": [
        {"sku": "pen", "price_cents": 150, "quantity": 4},
        {"sku": "book", "price_cents": 2500, "quantity": 1},
        {"sku": "ink", "price_cents": 300, "quantity": 2}]}"#;
    let run = both(&bundle, order);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(
        run.stdout,
        "{\"customer\":\"ADA\",\"lines\":[{\"sku\":\"book\",\"total_cents\":2500},{\"sku\":\"ink\",\"total_cents\":600},{\"sku\":\"pen\",\"total_cents\":600}],\"item_count\":7,\"total_cents\":3700}\n"
    );
    let bad = both(&bundle, "not json");
    assert_eq!(bad.code, Some(2), "{bad:#?}");
    assert!(bad.stderr.contains("json-transform: bad order"), "{bad:#?}");
}

/// The compute-heavy example (issue 15): regexes and SHA-256, as a new user writes them. The
/// counts follow from the text; the digest is computed here, independently of the guest.
#[test]
fn text_analysis_counts_words_emails_and_urls_and_digests_with_the_stretched_key() {
    use sha2::{Digest, Sha256};
    let text = "Ada wrote to ada@example.org: see https://example.org/notes, then wrote to bob@example.net again.";
    let mut key: [u8; 32] = Sha256::digest(b"thaw text-analysis").into();
    for _ in 0..20_000 {
        key = Sha256::digest(key).into();
    }
    let digest: String =
        Sha256::new().chain_update(key).chain_update(text).finalize().iter().map(|b| format!("{b:02x}")).collect();
    let (_dir, bundle) = example("text-analysis", &[]);
    let run = both(&bundle, text);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let answer: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    let expected = serde_json::json!({
        "words": 18,
        "distinct_words": 12,
        "top_words": [["example", 3], ["ada", 2], ["org", 2], ["to", 2], ["wrote", 2]],
        "emails": ["ada@example.org", "bob@example.net"],
        "urls": 1,
        "digest": digest,
    });
    assert_eq!(answer, expected);
}

#[test]
fn random_gives_fresh_bytes_and_the_hosts_wall_clock() {
    let (_dir, bundle) = example("random", &[]);
    let mut seen = Vec::new();
    let runs: [&dyn Fn() -> Run; 3] =
        [&|| invoke(&bundle, "", &[]), &|| invoke(&bundle, "", &[]), &|| qemu(&bundle, "")];
    for run in runs {
        let run = run();
        assert_eq!(run.code, Some(0), "{run:#?}");
        let line = run.stdout.trim();
        let hex = line.split('"').nth(3).expect("random field");
        assert_eq!(hex.len(), 32, "{line}");
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
        let unix_ms: u128 = line.rsplit(": ").next().unwrap().trim_end_matches('}').parse().expect("unix_ms");
        let host_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert!(host_ms.abs_diff(unix_ms) < 5_000, "guest clock {unix_ms} vs host {host_ms}");
        seen.push(hex.to_string());
    }
    assert_ne!(seen[0], seen[1], "two VMs must not share random state");
    assert_ne!(seen[1], seen[2], "two VMs must not share random state");
}

#[test]
fn heavy_init_answers_from_the_index_built_in_init() {
    let (_dir, bundle) = example("heavy-init", &["--memory", "64"]);
    let run = both(&bundle, "10");
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stdout, "{\"n\": 10, \"primes_below\": 4, \"nth_prime\": 29}\n");
    let run = invoke(&bundle, "10", &["--json"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let stats: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(stats["stdout"], "{\"n\": 10, \"primes_below\": 4, \"nth_prime\": 29}\n");
    assert_eq!((&stats["status"], &stats["exit_code"]), (&"ok".into(), &0.into()), "{stats}");
    let every_phase = [
        "kernel_load_us",
        "vm_create_us",
        "vcpu_create_us",
        "ring0_boot_us",
        "ring3_to_ready_us",
        "compile_us",
        "instantiate_us",
        "init_us",
        "handle_us",
        "total_us",
    ];
    for key in every_phase {
        assert!(stats["phases"][key].is_u64(), "{key} missing from {stats}");
    }
    assert!(stats["exits"]["vm"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn a_trap_is_reported_with_its_message() {
    let (_dir, bundle) = pack(&fixture("trap.wat"), &[]);
    let run = both(&bundle, "");
    assert_eq!(run.code, Some(abi::exit_code::FUNCTION_TRAPPED as i32), "{run:#?}");
    assert!(run.stderr.starts_with("thaw: function trapped: "), "{run:#?}");
    assert!(run.stderr.contains("unreachable"), "{run:#?}");
}

/// The bundle rule (docs/SECURITY.md §3): a bundle whose code is not what this thaw compiles
/// from its wasm, with every hash recomputed so that it is well formed, runs its wasm, compiled
/// here. On d51ce75 it ran the other code: json-transform's answer to hello's request. Code
/// compiled with other engine settings (fuel metering the manifest does not ask for) is
/// replaced the same way, and `thaw inspect` says which code is which.
#[test]
fn a_bundle_runs_its_wasm_compiled_here_never_the_code_it_carries() {
    let cache = tempfile::tempdir().unwrap();
    let thaw_cached =
        |args: &[&str]| common::run(Command::new(common::THAW).args(args).env("XDG_CACHE_HOME", cache.path()));
    let (dir, hello) = example("hello", &[]);
    let (_json_dir, json) = example("json-transform", &[]);
    let (_fuel_dir, fueled) = pack(&fixture("trap.wat"), &["--fuel", "1000"]);
    let hello_bytes = std::fs::read(&hello).unwrap();
    let hello_parsed = abi::bundle::parse(&hello_bytes).unwrap();
    let json_bytes = std::fs::read(&json).unwrap();
    let json_code = abi::bundle::parse(&json_bytes).unwrap().code.to_vec();
    let sha = |b: &[u8]| -> [u8; 32] { <sha2::Sha256 as sha2::Digest>::digest(b).into() };
    let manifest = abi::bundle::Manifest { code_sha256: Some(sha(&json_code)), ..hello_parsed.manifest.clone() };
    let swapped = dir.path().join("swapped.thaw");
    std::fs::write(&swapped, abi::bundle::encode(&manifest, hello_parsed.wasm, &json_code, &[])).unwrap();
    let swapped = swapped.to_str().unwrap();

    let shown = thaw_cached(&["inspect", swapped]);
    assert!(shown.stdout.contains("; thaw runs it only if it is what thaw compiles from the wasm"), "{shown:#?}");
    let request = r#"{"name": "ada"}"#;
    let answers = |bundle: &str| {
        let kvm = thaw_cached(&["invoke", bundle, "--data", request]);
        let emulated = thaw_cached(&["qemu", bundle, "--data", request, "--timeout", "120"]);
        assert_eq!((&kvm.stdout, kvm.code), (&emulated.stdout, emulated.code), "{kvm:#?}\n{emulated:#?}");
        kvm
    };
    let run = answers(swapped);
    assert_eq!((run.stdout.as_str(), run.code), ("{\"greeting\":\"Hello, ada!\"}\n", Some(0)), "{run:#?}");
    // Running it compiled hello's wasm into the cache: now inspect can tell.
    let shown = thaw_cached(&["inspect", &hello]);
    assert!(shown.stdout.contains("; compiled by this thaw from the wasm\n"), "{shown:#?}");
    let shown = thaw_cached(&["inspect", swapped]);
    assert!(shown.stdout.contains("; not what this thaw compiles from the wasm, so it never runs"), "{shown:#?}");

    let bytes = std::fs::read(&fueled).unwrap();
    let parsed = abi::bundle::parse(&bytes).unwrap();
    let manifest = abi::bundle::Manifest { fuel: None, ..parsed.manifest.clone() };
    let unmetered = dir.path().join("unmetered.thaw");
    std::fs::write(&unmetered, abi::bundle::encode(&manifest, parsed.wasm, parsed.code, &[])).unwrap();
    let run = answers(unmetered.to_str().unwrap());
    assert_eq!(
        run.code,
        Some(abi::exit_code::FUNCTION_TRAPPED as i32),
        "the fixture's trap, not the engine's refusal: {run:#?}"
    );
    assert!(!run.stderr.contains("does not fit this thaw's engine"), "{run:#?}");
}

#[test]
fn an_infinite_loop_ends_by_timeout_or_by_fuel() {
    let (_dir, bundle) = pack(&fixture("loop.wat"), &[]);
    let run = invoke(&bundle, "", &["--timeout", "3"]);
    assert_eq!(run.code, Some(abi::exit_code::TIMEOUT as i32), "{run:#?}");
    // Only why it ended: the kernel's banner is for --verbose.
    assert_eq!(run.stderr, "thaw: guest timed out after 3.0 s\n");

    let (_dir, bundle) = pack(&fixture("loop.wat"), &["--fuel", "1000000"]);
    let run = both(&bundle, "");
    assert_eq!(run.code, Some(abi::exit_code::FUNCTION_TRAPPED as i32), "{run:#?}");
    assert!(run.stderr.contains("fuel"), "{run:#?}");
}

#[test]
fn growing_memory_past_the_limit_traps_instead_of_crashing_the_guest() {
    let (_dir, bundle) = pack(&fixture("grow.wat"), &["--memory", "8"]);
    let run = both(&bundle, "");
    assert_eq!(run.code, Some(abi::exit_code::FUNCTION_TRAPPED as i32), "{run:#?}");
    assert_eq!(run.stderr, "thaw: function trapped: growth operation limited\n");
}

/// Issue 14, defect 5: `proc_exit(256)` made `thaw invoke` exit 0, and 101-125 read as thaw's
/// own codes. A code above 100 is now 105, under KVM and QEMU alike, with the code on stderr.
#[test]
fn an_exit_code_above_100_is_105_never_0_or_one_of_thaws() {
    let dir = tempfile::tempdir().unwrap();
    for code in [100u32, 101, 104, 124, 125, 256, 4_294_967_295] {
        let wat = dir.path().join(format!("exit{code}.wat"));
        let source = std::fs::read_to_string(fixture("exit3.wat"))
            .unwrap()
            .replace("(i32.const 3)", &format!("(i32.const {})", code as i32));
        std::fs::write(&wat, source).unwrap();
        let (_bundle_dir, bundle) = pack(&wat, &[]);
        let run = if code == 256 { both(&bundle, "") } else { invoke(&bundle, "", &[]) };
        let expected = if code <= 100 { code as i32 } else { 105 };
        assert_eq!(run.code, Some(expected), "proc_exit({code}): {run:#?}");
        assert_eq!(run.stderr, format!("thaw: function exited with code {code}\n"), "{run:#?}");
    }
}

/// Issue 14, defect 5: a trap, `proc_exit` or fuel running out in `init` was reported as
/// "guest panicked" (101) with a guest-kernel source path. It is the function's failure, under
/// KVM and QEMU alike: a trap is 104 with its message, an exit is its code, with what the init
/// wrote on stderr; `thaw snapshot` refuses it with one line saying so.
#[test]
fn a_failing_init_is_the_functions_failure_not_a_kernel_panic() {
    let dir = tempfile::tempdir().unwrap();
    let source = std::fs::read_to_string(fixture("init-fails.wat")).unwrap();
    for (name, failure, pack_extra, code, line) in [
        ("trap", "", &[][..], 104, "thaw: function trapped: in init: wasm `unreachable` instruction executed"),
        ("exit", "(call $proc_exit (i32.const 3))", &[], 3, "thaw: function exited with code 3"),
        (
            "fuel",
            "(loop $forever (br $forever))",
            &["--fuel", "100000"],
            104,
            "thaw: function trapped: in init: all fuel consumed by WebAssembly",
        ),
    ] {
        let wat = dir.path().join(format!("{name}.wat"));
        std::fs::write(&wat, source.replace(";; FAIL", failure)).unwrap();
        let (_bundle_dir, bundle) = pack(&wat, pack_extra);
        let run = both(&bundle, "x");
        assert_eq!(run.code, Some(code), "{name}: {run:#?}");
        assert_eq!(run.stderr, format!("starting up\n{line}\n"), "{name}: {run:#?}");
        let image = dir.path().join(format!("{name}.snap"));
        let run = thaw(&["snapshot", &bundle, "-o", image.to_str().unwrap()]);
        assert_eq!(run.code, Some(125), "{name}: {run:#?}");
        let last = run.stderr.lines().last().unwrap_or_default();
        assert!(last.contains("the function ended before reaching its checkpoint: the function "), "{name}: {last}");
        assert!(last.ends_with("; it wrote: starting up"), "what init wrote is in the error: {last}");
        assert!(!run.stderr.contains("guest-kernel/src") && !run.stderr.contains("panicked"), "{run:#?}");
        assert!(!image.exists());
    }
}

/// A start function (a wasm module's own constructor) that traps fails the function the same
/// way, under KVM and QEMU.
#[test]
fn a_trapping_start_function_is_the_functions_failure_too() {
    let dir = tempfile::tempdir().unwrap();
    let wat = dir.path().join("start.wat");
    let module =
        r#"(module (memory (export "memory") 1) (func $start unreachable) (start $start) (func (export "handle")))"#;
    std::fs::write(&wat, module).unwrap();
    let (_bundle_dir, bundle) = pack(&wat, &[]);
    let run = both(&bundle, "x");
    assert_eq!(run.code, Some(104), "{run:#?}");
    assert_eq!(run.stderr, "thaw: function trapped: in its start function: wasm `unreachable` instruction executed\n");
}

#[test]
fn proc_exit_code_becomes_the_exit_code() {
    let (_dir, bundle) = pack(&fixture("exit3.wat"), &[]);
    let run = both(&bundle, "");
    assert_eq!(run.code, Some(3), "{run:#?}");
    assert_eq!(run.stderr, "thaw: function exited with code 3\n");
}

/// Issue 15: `thaw bench --peer wasmtime` runs the same function in process with Wasmtime, as
/// many times, and sets thaw's phases against the peer's; it refuses to compare when the two
/// answered differently (they would not have done the same work).
#[test]
fn bench_sets_thaw_against_wasmtime_running_the_same_function() {
    let (_dir, bundle) = example("heavy-init", &[]);
    let run = thaw(&["bench", &bundle, "--peer", "wasmtime", "--runs", "3", "--data", "42", "--json"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let stats: serde_json::Value = serde_json::from_str(&run.stdout).expect("one JSON object");
    assert_eq!(stats["mode"], "cold");
    assert!(stats["peer"]["name"].as_str().unwrap().starts_with("Wasmtime "), "{stats}");
    for phase in ["compile_us", "instantiate_us", "init_us", "handle_us"] {
        let (ours, peer) = (&stats["phases"][phase]["p50"], &stats["peer"]["phases"][phase]["p50"]);
        assert!(ours.as_u64().is_some() && peer.as_u64().is_some(), "{phase}: {stats}");
    }
    // heavy-init's init computes for a while on both; a peer that skipped it would show ~0.
    assert!(stats["peer"]["phases"]["init_us"]["p50"].as_u64().unwrap() > 1000, "{stats}");

    let text = thaw(&["bench", &bundle, "--peer", "wasmtime", "--runs", "1", "--data", "42"]);
    assert_eq!(text.code, Some(0), "{text:#?}");
    assert!(text.stdout.contains("against Wasmtime"), "{}", text.stdout);
    assert!(text.stdout.lines().any(|l| l.starts_with("init (µs)") && l.ends_with('x')), "{}", text.stdout);

    // random answers with fresh bytes each time, so thaw's answer and the peer's differ.
    let (_dir, random) = example("random", &[]);
    let differs = thaw(&["bench", &random, "--peer", "wasmtime", "--runs", "1", "--data", "{}"]);
    assert_eq!(differs.code, Some(125), "{differs:#?}");
    assert!(differs.stderr.contains("they must do the same work"), "{}", differs.stderr);
}

/// Issue 28, defect 9: a module whose tables or memories the VM cannot hold failed as a guest
/// kernel panic (exit 101). It is the function's failure, as a trapping init is: exit 104, with
/// what could not be allocated. A 64-bit memory runs, limited by `--memory` as a 32-bit one.
#[test]
fn a_module_the_vm_cannot_hold_fails_as_the_function() {
    let dir = tempfile::tempdir().unwrap();
    for (wat, says) in [
        (
            "(module (table 100000000 funcref) (memory (export \"memory\") 1) (func (export \"handle\")))",
            "failed to allocate 800000000 bytes",
        ),
        (
            "(module (memory (export \"memory\") 1024) (memory 1024) (func (export \"handle\")))",
            "no 67108864 bytes of heap for a linear memory",
        ),
    ] {
        let source = dir.path().join("module.wat");
        std::fs::write(&source, wat).unwrap();
        let (_guard, bundle) = pack(&source, &["--memory", "64"]);
        let run = invoke(&bundle, "x", &[]);
        assert_eq!(run.code, Some(104), "{wat}: {run:#?}");
        assert!(
            run.stderr.contains("function trapped: instantiating the module: ") && run.stderr.contains(says),
            "{run:#?}"
        );
        assert!(!run.stderr.contains("panicked"), "{run:#?}");
    }
    let source = dir.path().join("memory64.wat");
    std::fs::write(&source, "(module (memory (export \"memory\") i64 1) (func (export \"handle\") (i64.store (i64.const 8) (i64.const 42))))").unwrap();
    let (_guard, bundle) = pack(&source, &[]);
    assert_eq!(invoke(&bundle, "x", &[]).code, Some(0));
}
