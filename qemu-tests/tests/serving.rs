//! The serving modes under KVM, through the real `thaw restore`: kept VMs reset by their dirty
//! pages after every request, VMs parked ahead in a pool, and fresh VMs that reuse the memory
//! an earlier one left. What one request leaves behind
//! must never reach the next: not in guest memory, not in the function's globals, not in its
//! entropy or instance id.

use std::path::Path;

mod common;

use common::{Run, run_thaw};
use serde_json::Value;

fn thaw(args: &[&str]) -> Run {
    assert!(Path::new("/dev/kvm").exists(), "the serving modes run guests under KVM and need /dev/kvm");
    run_thaw(args)
}

/// Packs `source` (an example name, or a fixture file) and snapshots it; returns (directory
/// guard, image path).
fn snapshot(source: &str, pack_extra: &[&str]) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("f.thaw").to_str().unwrap().to_string();
    let image = dir.path().join("f.snap").to_str().unwrap().to_string();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fixtures").join(source);
    let fixture = fixture.to_str().unwrap();
    let mut pack = if source.ends_with(".wat") {
        vec!["pack", fixture, "-o", &bundle]
    } else {
        vec!["pack", "--example", source, "-o", &bundle]
    };
    pack.extend_from_slice(pack_extra);
    let run = thaw(&pack);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let run = thaw(&["snapshot", &bundle, "-o", &image]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    (dir, image)
}

/// Runs `thaw restore IMAGE ARGS --responses FILE` (FILE in `dir`); returns the run and the
/// response lines it wrote, parsed.
fn restore(dir: &Path, image: &str, args: &[&str]) -> (Run, Vec<Value>) {
    let out = dir.join("responses.jsonl");
    let mut all = vec!["restore", image];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--responses", out.to_str().unwrap()]);
    let run = thaw(&all);
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let lines = text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    (run, lines)
}

#[test]
fn after_1000_reset_requests_guest_memory_equals_the_image_but_the_rewritten_pages() {
    let (dir, image) = snapshot("scribble.wat", &[]);
    let (run, lines) = restore(
        dir.path(),
        &image,
        &["--mode", "reset", "--count", "1000", "--concurrency", "2", "--data", "body", "--verify"],
    );
    assert_eq!(run.code, Some(0), "{run:#?}");
    // Both kept VMs were checked, and only the hypercall and host-parameter pages differ.
    assert_eq!(run.stderr.matches("the kept VM's memory equals the image except pages [1, 2]").count(), 2, "{run:#?}");
    assert_eq!(lines.len(), 1000);
    for line in &lines {
        assert!(line["status"] == "ok" && line["stdout"] == "prev=", "{line}");
    }
}

/// A kept VM's written pages stay writable across resets, so they stop faulting, and each
/// reset copies them all back. A request that writes more than 4 MiB (the "w" body, 1024 pages
/// and the usual few) makes the reset protect them again: later resets copy back only what the
/// later requests wrote.
#[test]
fn a_reset_after_a_wide_write_protects_the_pages_again_and_memory_still_equals_the_image() {
    let (dir, image) = snapshot("scribble.wat", &[]);
    let list = dir.path().join("requests");
    std::fs::write(&list, "wide\nsmall\n").unwrap();
    let (run, lines) = restore(
        dir.path(),
        &image,
        &["--mode", "reset", "--count", "20", "--requests", list.to_str().unwrap(), "--verify", "--json"],
    );
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stderr.contains("after 20 requests and a reset, the kept VM's memory equals the image"), "{run:#?}");
    assert!(lines.iter().all(|l| l["status"] == "ok"), "{lines:?}");
    let stats: Value = serde_json::from_str(&run.stdout).unwrap();
    let dirty = &stats["memory"]["dirty_pages"];
    // Every reset after a wide request copies back more than 1024 pages...
    assert!(dirty["max"].as_u64().unwrap() > 1024, "{dirty}");
    // ...and every one after a small request far fewer: the wide pages were protected again.
    assert!(dirty["p50"].as_u64().unwrap() < 100, "{dirty}");
}

/// A request of up to 4080 bytes comes in with the checkpoint's result, so a VM still at its
/// checkpoint (fresh, or kept and reset) answers after one VM exit. A longer one is asked for,
/// one exit more, and answered just the same.
#[test]
fn a_short_request_comes_in_with_the_resume_and_a_long_one_is_asked_for() {
    let (dir, image) = snapshot("hello", &[]);
    for mode in ["fresh", "reset"] {
        for (name_len, exits) in [(10, 1), (5000, 2)] {
            let name = "x".repeat(name_len);
            let body = format!(r#"{{"name": "{name}"}}"#);
            let (run, lines) =
                restore(dir.path(), &image, &["--mode", mode, "--count", "5", "--data", &body, "--json", "--verify"]);
            assert_eq!(run.code, Some(0), "{mode}, {name_len}: {run:#?}");
            let greeting = format!("{{\"greeting\":\"Hello, {name}!\"}}\n");
            assert!(lines.iter().all(|l| l["stdout"] == greeting.as_str()), "{mode}, {name_len}: {lines:?}");
            let stats: Value = serde_json::from_str(&run.stdout).unwrap();
            // In reset mode the first request goes to the VM parked after its restore.
            assert_eq!(stats["exits"]["vm"]["p50"], exits, "{mode}, {name_len}: {}", stats["exits"]);
        }
    }
}

#[test]
fn reset_mode_restores_volume_reads_heap_writes_and_entropy_too() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("readme.txt"), "hello volume\n").unwrap();
    let data_dir = data.path().to_str().unwrap();
    for (source, pack_extra, body) in [
        ("data-reader", vec!["--data-dir", data_dir], r#"{"file": "readme.txt"}"#),
        ("json-transform", vec![], r#"{"customer": "c", "items": [{"sku": "s", "price_cents": 7, "quantity": 2}]}"#),
        ("random", vec![], "{}"),
    ] {
        let (_dir, image) = snapshot(source, &pack_extra);
        let run = thaw(&["restore", &image, "--mode", "reset", "--count", "200", "--data", body, "--verify"]);
        assert_eq!(run.code, Some(0), "{source}: {run:#?}");
        assert!(run.stderr.contains("equals the image except pages [1, 2]"), "{source}: {run:#?}");
    }
}

#[test]
fn fresh_vms_reuse_memory_only_once_it_equals_the_image_again() {
    // scribble writes random heap pages, globals, the stack and its output; every fresh VM after
    // the first runs in memory an earlier one left, reset from the image.
    let (dir, image) = snapshot("scribble.wat", &[]);
    let (run, lines) = restore(
        dir.path(),
        &image,
        &["--mode", "fresh", "--count", "300", "--concurrency", "2", "--data", "body", "--verify"],
    );
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stderr
            .contains("after 300 fresh VMs, the memory they left for the next equals the image except pages [1, 2]"),
        "{run:#?}"
    );
    assert_eq!(lines.len(), 300);
    assert!(lines.iter().all(|l| l["status"] == "ok" && l["stdout"] == "prev="));
}

#[test]
fn no_request_sees_the_previous_ones_body_in_any_mode() {
    let (dir, image) = snapshot("scribble.wat", &[]);
    let list = dir.path().join("requests");
    std::fs::write(&list, (0..50).map(|i| format!("secret-{i}\n")).collect::<String>()).unwrap();
    for mode in ["reset", "pool", "fresh"] {
        let (run, lines) =
            restore(dir.path(), &image, &["--mode", mode, "--count", "200", "--requests", list.to_str().unwrap()]);
        assert_eq!(run.code, Some(0), "{mode}: {run:#?}");
        assert_eq!(lines.len(), 200);
        assert!(lines.iter().all(|l| l["stdout"] == "prev="), "{mode}: a request saw another's body");
    }
}

#[test]
fn a_trap_or_a_timeout_in_reset_mode_leaves_the_kept_vm_reset_and_serving() {
    let (dir, image) = snapshot("scribble.wat", &[]);
    let list = dir.path().join("requests");
    std::fs::write(&list, "first\ntrap\nsecond\nloop\nfourth\n").unwrap();
    let (run, lines) = restore(
        dir.path(),
        &image,
        &["--mode", "reset", "--count", "5", "--requests", list.to_str().unwrap(), "--timeout", "1", "--verify"],
    );
    assert_eq!(run.code, Some(125), "two requests did not answer cleanly: {run:#?}");
    assert!(run.stderr.contains("2 of 5 requests did not answer cleanly"), "{run:#?}");
    assert!(!run.stdout.contains("destroyed and replaced"), "the kept VM was reused: {run:#?}");
    assert!(run.stderr.contains("after 5 requests and a reset, the kept VM's memory equals the image"), "{run:#?}");
    let statuses: Vec<&str> = lines.iter().map(|l| l["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["ok", "trapped", "ok", "timed_out", "ok"]);
    assert!(lines[1]["error"].as_str().unwrap().starts_with("the function trapped: "), "{}", lines[1]);
}

#[test]
fn a_guest_kernel_that_fails_gets_its_kept_vm_destroyed_and_replaced() {
    // The guest kernel takes requests of at most 16 MiB; one past that makes it give up (the
    // kernel, not the function), so its state is not trusted again.
    let (dir, image) = snapshot("scribble.wat", &[]);
    let list = dir.path().join("requests");
    let huge = "x".repeat((16 << 20) + 1);
    std::fs::write(&list, format!("first\n{huge}\nsecond\nfourth\n")).unwrap();
    let (run, lines) = restore(
        dir.path(),
        &image,
        &["--mode", "reset", "--count", "4", "--requests", list.to_str().unwrap(), "--verify"],
    );
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(run.stderr.contains("1 of 4 requests did not answer cleanly"), "{run:#?}");
    assert!(run.stdout.contains("1 kept VMs were destroyed and replaced"), "{run:#?}");
    assert!(run.stderr.contains("after 4 requests and a reset, the kept VM's memory equals the image"), "{run:#?}");
    assert_eq!(lines[1]["status"], "failed", "{}", lines[1]);
    for line in [&lines[0], &lines[2], &lines[3]] {
        assert!(line["status"] == "ok" && line["stdout"] == "prev=", "{line}");
    }
}

#[test]
fn clones_never_share_entropy_or_instance_ids_in_any_mode() {
    let (dir, image) = snapshot("random", &[]);
    for (mode, count) in [("reset", "10000"), ("pool", "2000"), ("fresh", "1000")] {
        let (run, lines) =
            restore(dir.path(), &image, &["--mode", mode, "--count", count, "--concurrency", "2", "--data", "{}"]);
        assert_eq!(run.code, Some(0), "{mode}: {run:#?}");
        assert_eq!(lines.len().to_string(), count);
        for name in ["random", "instance"] {
            let mut seen = std::collections::HashSet::new();
            for line in &lines {
                let response: Value = serde_json::from_str(line["stdout"].as_str().unwrap()).unwrap();
                let field = response[name].as_str().unwrap_or_default();
                assert!(!field.is_empty(), "{line}");
                if name == "instance" {
                    assert!(field.len() == 32 && u128::from_str_radix(field, 16).is_ok_and(|id| id != 0), "{line}");
                }
                assert!(seen.insert(field.to_string()), "{mode}: two requests got the same {name}: {field}");
            }
        }
    }
}

/// Issue 14, defect 7: an instance id was the process id and a counter, so every
/// `unshare --pid --fork thaw invoke` (always PID 1) gave the same first id, and ids repeated
/// after PID reuse. Ids are now 128 random bits.
#[test]
fn instance_ids_differ_across_processes_even_in_a_new_pid_namespace() {
    let (_dir, image) = snapshot("random", &[]);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let output = std::process::Command::new("unshare")
            .args(["--pid", "--fork", common::THAW, "invoke", &image, "--data", "{}"])
            .output()
            .expect("unshare (util-linux) runs thaw as PID 1 of a new namespace");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let response: Value = serde_json::from_slice(&output.stdout).unwrap();
        let instance = response["instance"].as_str().unwrap().to_string();
        assert_eq!(instance.len(), 32, "{instance}");
        assert!(seen.insert(instance.clone()), "the same instance id twice: {instance}");
    }
}

#[test]
fn pooled_vms_touch_the_recorded_working_set_before_their_request() {
    let (dir, image) = snapshot("hello", &[]);
    let inspect = thaw(&["inspect", &image, "--json"]);
    assert_eq!(inspect.code, Some(0), "{inspect:#?}");
    let shown: Value = serde_json::from_str(&inspect.stdout).unwrap();
    let pages = shown["working_set"]["pages"].as_u64().unwrap();
    let written = shown["working_set"]["written_pages"].as_u64().unwrap();
    assert!(pages > 0 && written > 0 && written < pages, "{}", inspect.stdout);
    let (run, lines) = restore(dir.path(), &image, &["--mode", "pool", "--count", "20", "--data", "w"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains(&format!("each after touching {pages} working-set pages")), "{run:#?}");
    assert!(lines.iter().all(|l| l["status"] == "ok"), "{lines:?}");

    // Without a working set the pool has nothing to touch, and serves the same.
    let bare = dir.path().join("bare.snap");
    let bare = bare.to_str().unwrap();
    let bundle = dir.path().join("f.thaw");
    let run = thaw(&["snapshot", bundle.to_str().unwrap(), "-o", bare, "--no-working-set"]);
    assert!(run.code == Some(0) && run.stderr.contains("no working set"), "{run:#?}");
    let inspect = thaw(&["inspect", bare]);
    assert!(inspect.stdout.contains("working set none recorded"), "{inspect:#?}");
    let (run, lines) = restore(dir.path(), bare, &["--mode", "pool", "--count", "5", "--data", "w"]);
    assert!(run.code == Some(0) && run.stdout.contains("each after touching 0 working-set pages"), "{run:#?}");
    assert_eq!(lines.len(), 5);
}

#[test]
fn a_sample_request_that_never_answers_fails_the_snapshot_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("loop.thaw");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fixtures/loop.wat");
    let run = thaw(&["pack", fixture.to_str().unwrap(), "-o", bundle.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let image = dir.path().join("loop.snap");
    let run = thaw(&["snapshot", bundle.to_str().unwrap(), "-o", image.to_str().unwrap(), "--timeout", "1"]);
    assert_ne!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stderr
            .contains("recording the working set: the sample request did not answer (guest timed out after 1.0 s)")
            && run.stderr.contains("--no-working-set"),
        "{run:#?}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("loop.thaw")], "no image and no draft are left behind");
    let run = thaw(&["snapshot", bundle.to_str().unwrap(), "-o", image.to_str().unwrap(), "--no-working-set"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
}

#[test]
fn the_working_set_is_recorded_with_the_bundles_sample_request_unless_one_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fixtures/scribble.wat");
    let bundle = dir.path().join("s.thaw");
    let bundle = bundle.to_str().unwrap();
    let image = dir.path().join("s.snap");
    let image = image.to_str().unwrap();
    // scribble spins until its timeout on a body starting with "l": a sample that never answers.
    let run = thaw(&["pack", fixture.to_str().unwrap(), "-o", bundle, "--sample-data", "loop"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let run = thaw(&["snapshot", bundle, "-o", image, "--timeout", "1"]);
    assert!(run.code != Some(0) && run.stderr.contains("the sample request did not answer"), "{run:#?}");
    let run = thaw(&["snapshot", bundle, "-o", image, "--timeout", "1", "--sample-data", "fine"]);
    assert!(run.code == Some(0) && run.stderr.contains("(working set of --sample-data)"), "{run:#?}");
    let run = thaw(&["pack", "--example", "hello", "-o", bundle]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let run = thaw(&["snapshot", bundle, "-o", image]);
    assert!(run.stderr.contains("(working set of the bundle's sample request)"), "{run:#?}");
    let run = thaw(&["pack", fixture.to_str().unwrap(), "-o", bundle]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let run = thaw(&["snapshot", bundle, "-o", image]);
    assert!(run.stderr.contains("(working set of the empty request)"), "{run:#?}");
}

/// `script` runs `command` on a pseudo-terminal, as an interactive shell would: what it printed.
fn on_a_terminal(command: &str) -> Run {
    common::run(std::process::Command::new("script").args(["-qec", command, "/dev/null"]))
}

/// On a terminal, long work shows a status line on stderr: `thaw restore --count` counts the
/// requests answered, `thaw pack` says it compiles, `thaw snapshot` what it is doing; into a pipe
/// or a file none of that is printed.
#[test]
fn long_work_shows_its_progress_on_a_terminal_only() {
    let (dir, image) = snapshot("hello", &[]);
    let on_terminal = on_a_terminal(&format!("{} restore {image} --mode fresh --count 400 --data x", common::THAW));
    assert_eq!(on_terminal.code, Some(0), "{on_terminal:#?}");
    assert!(on_terminal.stdout.contains("requests answered"), "{on_terminal:#?}");
    let bundle = dir.path().join("f.thaw");
    let again = dir.path().join("again.snap");
    let snapshotting = on_a_terminal(&format!("{} snapshot {} -o {}", common::THAW, bundle.display(), again.display()));
    assert!(
        snapshotting.stdout.contains("thaw: snapshotting hello: booting it, running its init"),
        "{snapshotting:#?}"
    );
    let piped_snapshot =
        thaw(&["snapshot", bundle.to_str().unwrap(), "-o", dir.path().join("piped.snap").to_str().unwrap()]);
    assert!(!piped_snapshot.stderr.contains("snapshotting"), "{piped_snapshot:#?}");
    let (piped, _) = restore(dir.path(), &image, &["--mode", "fresh", "--count", "400", "--data", "x"]);
    assert_eq!(piped.code, Some(0), "{piped:#?}");
    assert!(!piped.stderr.contains("requests answered"), "{piped:#?}");
}
