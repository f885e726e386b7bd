//! Commands initialized up to their first read of stdin (`thaw pack --init-until-read`, issue
//! 30): the start-up runs once and the snapshot is taken inside the first read, so every
//! restored VM continues from there with its request. Under KVM and QEMU, cold and from an
//! image in every serving mode, with the cases where the start-up cannot be kept.

use std::collections::HashSet;
use std::path::Path;

mod common;

use common::{Run, restore, run_thaw};

/// The command that builds a table of primes before it reads stdin.
const STARTUP_TABLE: &str = env!("CARGO_BIN_FILE_FIXTURE_STARTUP_TABLE_startup_table");
/// What its start-up writes on stderr.
const BUILT: &str = "startup-table: 664579 primes below 10000000\n";

/// Packs `input` with `extra` flags into `dir` and returns the bundle's path.
fn pack(dir: &Path, input: &str, extra: &[&str]) -> String {
    let stem = Path::new(input).file_stem().unwrap().to_str().unwrap();
    let out = dir.join(format!("{stem}-{}.thaw", extra.len()));
    let mut args = vec!["pack", input, "--memory", "64", "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let run = run_thaw(&args);
    assert_eq!(run.code, Some(0), "{run:#?}");
    out.to_str().unwrap().to_string()
}

/// Answers `data` with `bundle` under KVM and under QEMU; both must agree on all but the random
/// numbers. Returns both runs.
fn both(bundle: &str, data: &str) -> (Run, Run) {
    assert!(Path::new("/dev/kvm").exists(), "thaw invoke boots a guest under KVM and needs /dev/kvm");
    std::thread::scope(|s| {
        let emulated = s.spawn(|| run_thaw(&["qemu", bundle, "--data", data, "--timeout", "300"]));
        (run_thaw(&["invoke", bundle, "--data", data]), emulated.join().expect("qemu run"))
    })
}

/// The answer's `(TABLE, FRESH, PRIME)`.
fn answer(stdout: &str) -> (String, String, u32) {
    let fields: Vec<&str> = stdout.trim_end().split(' ').collect();
    let [table, fresh, prime] = fields[..] else { panic!("answer {stdout:?} is not TABLE FRESH PRIME") };
    (table.into(), fresh.into(), prime.parse().unwrap())
}

/// The `n`-th prime (1-based), computed here by trial division.
fn nth_prime(n: usize) -> u32 {
    (2u32..).filter(|&k| (2..).take_while(|d| d * d <= k).all(|d| k % d != 0)).nth(n - 1).unwrap()
}

/// Snapshots `bundle` into `image`; returns what `thaw snapshot` wrote on stderr.
fn snapshot(bundle: &str, image: &Path) -> String {
    let run = run_thaw(&["snapshot", bundle, "-o", image.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    run.stderr
}

#[test]
fn a_command_initialized_until_its_first_read_answers_cold_under_kvm_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = pack(dir.path(), STARTUP_TABLE, &["--init-until-read"]);
    for n in [1, 1000, 664_579] {
        let (kvm, qemu) = both(&bundle, &n.to_string());
        for (name, run) in [("kvm", &kvm), ("qemu", &qemu)] {
            assert_eq!(run.code, Some(0), "{name} {n}: {run:#?}");
            assert_eq!(answer(&run.stdout).2, nth_prime(n), "{name} {n}: {run:#?}");
            // The start-up's stderr is init's, shown by a cold invoke before the answer's.
            assert_eq!(run.stderr, BUILT, "{name} {n}: {run:#?}");
        }
    }
    // A request it refuses: its own exit code and message, after the read.
    let (kvm, qemu) = both(&bundle, "0");
    for run in [kvm, qemu] {
        assert_eq!(run.code, Some(1), "{run:#?}");
        assert_eq!(
            run.stderr,
            format!(
                "{BUILT}startup-table: \"0\" is not a number from 1 to 664579\nthaw: function exited with code 1\n"
            )
        );
    }
}

/// The start-up is in the image: every VM restored from it, in every mode, answers with the
/// table drawn once at snapshot time, and with its own fresh random number after the read.
/// Packed without the flag, the same command builds its table for every request.
#[test]
fn its_start_up_is_in_the_snapshot_and_every_restored_vm_continues_inside_the_read() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = pack(dir.path(), STARTUP_TABLE, &["--init-until-read"]);
    let inspect = run_thaw(&["inspect", &bundle]);
    assert!(inspect.stdout.contains("format version 7"), "{inspect:#?}");
    assert!(inspect.stdout.contains("init        a command's start-up, up to its first read of stdin"), "{inspect:#?}");
    let image = dir.path().join("kept.snap");
    let said = snapshot(&bundle, &image);
    assert!(said.contains(BUILT.trim_end()), "snapshot shows what the start-up wrote: {said}");

    let expected = nth_prime(5000);
    let mut tables = HashSet::new();
    let mut fresh = HashSet::new();
    for mode in ["fresh", "pool", "reset"] {
        for line in restore(image.to_str().unwrap(), mode, 100, "5000\n") {
            assert_eq!(line["status"], "ok", "{mode}: {line}");
            assert_eq!(line["stderr"], "", "{mode}: the start-up did not run again: {line}");
            let (table, random, prime) = answer(line["stdout"].as_str().unwrap());
            assert_eq!(prime, expected, "{mode}: {line}");
            tables.insert(table);
            assert!(fresh.insert(random), "{mode}: a random number drawn after the read repeated: {line}");
        }
    }
    assert_eq!(tables.len(), 1, "one start-up, in the snapshot: {tables:?}");

    let whole = pack(dir.path(), STARTUP_TABLE, &[]);
    let image = dir.path().join("whole.snap");
    snapshot(&whole, &image);
    let mut tables = HashSet::new();
    for line in restore(image.to_str().unwrap(), "fresh", 5, "5000") {
        assert_eq!(line["stderr"], BUILT, "without the flag, each request starts the command: {line}");
        assert!(tables.insert(answer(line["stdout"].as_str().unwrap()).0), "{line}");
    }
}

/// A command that writes to stdout before it reads, or never reads, runs whole for every
/// request, as it would without the flag, and `thaw snapshot` says why. One that fails before
/// its first read fails its init, and the snapshot is refused.
#[test]
fn a_start_up_that_writes_first_never_reads_or_fails_is_not_kept() {
    const READ_THEN_ECHO: &str = r#"(module
      (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (data (i32.const 64) "hi ")
      (func (export "_start")
        ;; BEFORE
        (i32.store (i32.const 0) (i32.const 1024))
        (i32.store (i32.const 4) (i32.const 1024))
        (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (i32.store (i32.const 4) (i32.load (i32.const 8)))
        (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
        ;; AFTER
        ))"#;
    const SAY_HI: &str = "(i32.store (i32.const 16) (i32.const 64)) (i32.store (i32.const 20) (i32.const 3)) (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))";
    let dir = tempfile::tempdir().unwrap();
    // `exits` ends with proc_exit(0), as Python's os._exit(0) does: a clean answer too.
    const EXIT_0: &str = "(call $exit (i32.const 0))";
    for (name, before, after, stdout, why) in [
        ("reads", "", "", "ping", None),
        ("exits", "", EXIT_0, "ping", None),
        ("writes-first", SAY_HI, "", "hi ping", Some("wrote to stdout before its first read of stdin")),
    ] {
        let wat = dir.path().join(format!("{name}.wat"));
        std::fs::write(&wat, READ_THEN_ECHO.replace(";; BEFORE", before).replace(";; AFTER", after)).unwrap();
        let bundle = pack(dir.path(), wat.to_str().unwrap(), &["--init-until-read"]);
        let note = why.map(|why| {
            format!(
                "thaw: the command {why}, so its start-up runs on every request (--init-until-read has no effect)\n"
            )
        });
        let (kvm, qemu) = both(&bundle, "ping");
        for run in [kvm, qemu] {
            assert_eq!((run.code, run.stdout.as_str()), (Some(0), stdout), "{name}: {run:#?}");
            assert_eq!(run.stderr, note.clone().unwrap_or_default(), "{name}: {run:#?}");
        }
        let image = dir.path().join(format!("{name}.snap"));
        let said = snapshot(&bundle, &image);
        if let Some(note) = &note {
            assert!(said.contains(note.trim_end()), "{name}: {said}");
        }
        for mode in ["fresh", "reset"] {
            for line in restore(image.to_str().unwrap(), mode, 3, "ping") {
                assert_eq!(line["stdout"], stdout, "{name} {mode}: {line}");
            }
        }
    }

    // One that never reads: its start-up ran to its end in init, and runs again per request.
    let wat = dir.path().join("never-reads.wat");
    std::fs::write(&wat, r#"(module (memory (export "memory") 1) (func (export "_start")))"#).unwrap();
    let bundle = pack(dir.path(), wat.to_str().unwrap(), &["--init-until-read"]);
    let (kvm, qemu) = both(&bundle, "ping");
    for run in [kvm, qemu] {
        assert_eq!((run.code, run.stdout.as_str()), (Some(0), ""), "{run:#?}");
        assert_eq!(
            run.stderr,
            "thaw: the command ended without reading stdin, so its start-up runs on every request (--init-until-read has no effect)\n"
        );
    }

    let wat = dir.path().join("fails.wat");
    std::fs::write(&wat, READ_THEN_ECHO.replace(";; BEFORE", "unreachable")).unwrap();
    let bundle = pack(dir.path(), wat.to_str().unwrap(), &["--init-until-read"]);
    let (kvm, qemu) = both(&bundle, "ping");
    for run in [kvm, qemu] {
        assert_eq!(run.code, Some(104), "{run:#?}");
        assert_eq!(
            run.stderr,
            "thaw: function trapped: before its first read of stdin: wasm `unreachable` instruction executed\n"
        );
    }
    let run = run_thaw(&["snapshot", &bundle, "-o", dir.path().join("fails.snap").to_str().unwrap()]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(run.stderr.contains("the function ended before reaching its checkpoint"), "{run:#?}");
}

/// Only a command has a start-up to keep: a reactor packed with the flag is refused, naming why.
#[test]
fn pack_refuses_init_until_read_for_a_reactor() {
    let dir = tempfile::tempdir().unwrap();
    let wat = dir.path().join("reactor.wat");
    std::fs::write(&wat, r#"(module (memory (export "memory") 1) (func (export "handle")))"#).unwrap();
    let out = dir.path().join("reactor.thaw");
    let run = run_thaw(&["pack", wat.to_str().unwrap(), "--init-until-read", "-o", out.to_str().unwrap()]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(
        run.stderr.contains(
            "init until the first read applies to commands (which export _start), but this module exports handle"
        ),
        "{run:#?}"
    );
    assert!(!out.exists());
}
