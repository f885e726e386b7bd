//! WASI preview 1 as functions meet it: a real Rust function (`examples/fixtures/wasi-calls`,
//! compiled to wasm32-wasip1 by this build) calls every WASI function in its success and errno
//! cases, cold under KVM, restored from an image, and under QEMU; the scratch filesystem's cap
//! (`ENOSPC`); its reset between requests; and the data volume written over in memory.

use std::path::Path;

mod common;

use common::{Run, run_thaw};
use serde_json::Value;

/// The fixture's wasm, built by this `cargo test`.
const WASI_CALLS: &str = env!("CARGO_CDYLIB_FILE_FIXTURE_WASI_CALLS_fixture_wasi_calls");

fn thaw(args: &[&str]) -> Run {
    assert!(Path::new("/dev/kvm").exists(), "these tests boot guests under KVM and need /dev/kvm");
    run_thaw(args)
}

/// Packs the fixture with `extra` into a fresh directory: (directory guard, bundle path).
fn pack(extra: &[&str]) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("wasi-calls.thaw").to_str().unwrap().to_string();
    let mut args = vec!["pack", WASI_CALLS, "-o", &bundle];
    args.extend_from_slice(extra);
    let run = thaw(&args);
    assert_eq!(run.code, Some(0), "{run:#?}");
    (dir, bundle)
}

/// Checks a `calls` answer: every line `ok`, and all of them there.
fn assert_all_ok(answer: &str) {
    let failed: Vec<&str> = answer.lines().filter(|l| !l.starts_with("ok ")).collect();
    assert!(failed.is_empty(), "failed checks:\n{}\n\nwhole answer:\n{answer}", failed.join("\n"));
    assert!(answer.lines().count() >= 80, "too few checks ran:\n{answer}");
}

#[test]
fn every_wasi_call_behaves_cold_under_kvm_and_under_qemu() {
    let (_dir, bundle) = pack(&[]);
    let kvm = thaw(&["invoke", &bundle, "--data", "calls"]);
    assert_eq!(kvm.code, Some(0), "{kvm:#?}");
    assert_all_ok(&kvm.stdout);
    assert_eq!(kvm.stderr, "", "the function writes nothing to stderr, and thaw adds no note");
    let qemu = thaw(&["qemu", &bundle, "--data", "calls", "--timeout", "120"]);
    assert_eq!(qemu.code, Some(0), "{qemu:#?}");
    assert_eq!(qemu.stdout, kvm.stdout);
}

#[test]
fn every_wasi_call_behaves_in_a_vm_restored_from_an_image() {
    let (dir, bundle) = pack(&[]);
    let image = dir.path().join("wasi-calls.snap").to_str().unwrap().to_string();
    let run = thaw(&["snapshot", &bundle, "-o", &image]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let run = thaw(&["invoke", &image, "--data", "calls"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_all_ok(&run.stdout);
}

#[test]
fn the_scratch_filesystem_stops_at_its_cap_with_enospc() {
    let (_dir, bundle) = pack(&["--scratch-mib", "1"]);
    let run = thaw(&["invoke", &bundle, "--data", "fill"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    // "51 after N bytes": errno 51 is ENOSPC.
    let (code, rest) = run.stdout.split_once(" after ").unwrap_or_else(|| panic!("{run:#?}"));
    assert_eq!(code, "51", "{run:#?}");
    let bytes: u64 = rest.trim_end_matches(" bytes").parse().unwrap();
    assert!((512 << 10..=1 << 20).contains(&bytes), "{bytes} bytes fit in a 1 MiB filesystem");
}

#[test]
fn a_file_one_request_writes_is_gone_in_the_next_reset_or_restored_vm() {
    let (dir, bundle) = pack(&[]);
    let image = dir.path().join("wasi-calls.snap").to_str().unwrap().to_string();
    let run = thaw(&["snapshot", &bundle, "-o", &image]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    for mode in ["reset", "pool", "fresh"] {
        let out = dir.path().join(format!("{mode}.jsonl"));
        let run = thaw(&[
            "restore",
            &image,
            "--mode",
            mode,
            "--count",
            "4",
            "--data",
            "mark",
            "--responses",
            out.to_str().unwrap(),
        ]);
        assert_eq!(run.code, Some(0), "{mode}: {run:#?}");
        let text = std::fs::read_to_string(&out).unwrap();
        let answers: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(answers.len(), 4, "{mode}: {text}");
        assert!(answers.iter().all(|a| a["stdout"] == "absent"), "{mode}: a request saw an earlier one's file: {text}");
    }
}

#[test]
fn the_data_volume_takes_writes_in_memory_and_the_files_on_the_host_stay_as_they_were() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("readme.txt"), "original\n").unwrap();
    let (_dir, bundle) = pack(&["--data-dir", data.path().to_str().unwrap()]);
    let run = thaw(&["invoke", &bundle, "--data", "overlay"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stdout, "original -> changed in memory (Ok(()))");
    assert_eq!(std::fs::read_to_string(data.path().join("readme.txt")).unwrap(), "original\n");
}
