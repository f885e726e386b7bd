//! Virtio devices under KVM, through the real `thaw` CLI: images taken with devices, restored
//! with their backends detached, and each backend attached on the first use that needs it (or
//! at restore with `--eager-devices`).

use std::path::Path;

mod common;

use common::{Run, run_thaw};
use serde_json::Value;

fn thaw(args: &[&str]) -> Run {
    assert!(Path::new("/dev/kvm").exists(), "device tests run guests under KVM and need /dev/kvm");
    run_thaw(args)
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fixtures").join(name).to_str().unwrap().to_string()
}

/// Packs `source` (an example name, or a fixture path) and snapshots it with `devices`.
fn image_with_devices(source: &str, devices: &str) -> (tempfile::TempDir, String) {
    image_with(source, &["--devices", devices])
}

/// Packs `source` and snapshots it with `snapshot_args`.
fn image_with(source: &str, snapshot_args: &[&str]) -> (tempfile::TempDir, String) {
    image_with_pack(source, &[], snapshot_args)
}

/// A data directory: `readme.txt`, and `words/numbers.txt` holding the lines 1 to 2000.
fn data_dir(parent: &Path) -> String {
    let dir = parent.join("data");
    std::fs::create_dir_all(dir.join("words")).unwrap();
    std::fs::write(dir.join("readme.txt"), "hello volume\n").unwrap();
    std::fs::write(dir.join("words/numbers.txt"), numbers()).unwrap();
    dir.to_str().unwrap().to_string()
}

fn numbers() -> String {
    (1..=2000).map(|n| format!("{n}\n")).collect()
}

/// Packs `source` with `pack_args` and snapshots it with `snapshot_args`.
fn image_with_pack(source: &str, pack_args: &[&str], snapshot_args: &[&str]) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("f.thaw").to_str().unwrap().to_string();
    let image = dir.path().join("f.snap").to_str().unwrap().to_string();
    let mut pack = vec!["pack", "-o", &bundle];
    if source.ends_with(".wat") {
        pack.push(source);
    } else {
        pack.extend_from_slice(&["--example", source]);
    }
    pack.extend_from_slice(pack_args);
    let pack = thaw(&pack);
    assert_eq!(pack.code, Some(0), "{pack:#?}");
    let mut args = vec!["snapshot", &bundle, "-o", &image];
    args.extend_from_slice(snapshot_args);
    let snapshot = thaw(&args);
    assert_eq!(snapshot.code, Some(0), "{snapshot:#?}");
    (dir, image)
}

/// `thaw ARGS --json`: the run, and the JSON object it printed on stdout.
fn json(args: &[&str]) -> (Run, Value) {
    let mut all = args.to_vec();
    all.push("--json");
    let run = thaw(&all);
    let stats = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("no JSON on stdout ({e}): {run:#?}"));
    (run, stats)
}

/// The stats of device `kind` 0 in a request's stats.
fn device<'a>(stats: &'a Value, kind: &str) -> &'a Value {
    let devices = stats["devices"].as_array().unwrap_or_else(|| panic!("no devices in {stats}"));
    devices.iter().find(|d| d["kind"] == kind && d["index"] == 0).unwrap_or_else(|| panic!("{kind} in {stats}"))
}

#[test]
fn hello_restored_with_devices_attaches_no_backend_and_takes_no_device_exit() {
    let data = tempfile::tempdir().unwrap();
    let data = data_dir(data.path());
    let (_dir, image) = image_with_pack("hello", &["--data-dir", &data], &["--devices", "console,entropy,vsock"]);
    let (run, stats) = json(&["invoke", &image, "--data", r#"{"name": "lazy"}"#]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(stats["status"], "ok", "{stats}");
    assert_eq!(stats["stdout"], "{\"greeting\":\"Hello, lazy!\"}\n");
    for kind in ["console", "entropy", "block", "vsock"] {
        let d = device(&stats, kind);
        assert_eq!(
            (&d["attached"], &d["exits"], &d["notifications"]),
            (&Value::from(false), &0.into(), &0.into()),
            "{d}"
        );
    }
    // Many restores: none of them touches a device.
    let (run, stats) = json(&["restore", &image, "--count", "20", "--data", "{}"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(stats["statuses"]["ok"], 20, "{stats}");
    for key in ["devices", "backends_attached"] {
        assert_eq!(stats["exits"][key]["max"], 0, "{key}: {stats}");
    }
}

#[test]
fn eager_devices_attach_every_backend_at_restore() {
    let (_dir, image) = image_with_devices("hello", "console,entropy,vsock");
    let (run, stats) = json(&["invoke", &image, "--data", "{}", "--eager-devices"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    for kind in ["console", "entropy", "vsock"] {
        let d = device(&stats, kind);
        assert_eq!((&d["attached"], &d["exits"]), (&Value::from(true), &0.into()), "{d}");
    }
}

#[test]
fn a_logging_function_attaches_the_console_once_and_its_lines_arrive_in_order() {
    let (dir, image) = image_with_devices(&fixture("log-lines.wat"), "console,entropy");
    let log = dir.path().join("console.log");
    let log_arg = log.to_str().unwrap();
    let expected = "line 1\nline 2\nline 3\nline 4\nline 5\n";
    for round in 1..=2 {
        let (run, stats) = json(&["invoke", &image, "--data", "", "--console", log_arg]);
        assert_eq!(run.code, Some(0), "{run:#?}");
        assert_eq!(stats["stdout"], "ok\n", "the response still comes through the mailbox");
        assert_eq!(stats["stderr"], "", "stderr went to the console, not the response: {stats}");
        let console = device(&stats, "console");
        assert_eq!(console["attached"], true, "{console}");
        assert_eq!(console["notifications"], 5, "one per fd_write: {console}");
        assert_eq!(device(&stats, "entropy")["attached"], false);
        // The sink is appended to: each restored VM's lines follow the previous VM's, in order.
        assert_eq!(std::fs::read_to_string(&log).unwrap(), expected.repeat(round));
    }
    // Without --console, the lines stay in the response's stderr and the console is untouched.
    let (run, stats) = json(&["invoke", &image, "--data", ""]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(stats["stderr"], expected, "{stats}");
    assert_eq!(device(&stats, "console")["attached"], false);
}

/// Issue 14, defect 6: `--console FIFO` blocked the vCPU thread in the open (no reader), past
/// the timeout. A FIFO or a socket is refused with one line when the console attaches.
#[test]
fn a_console_that_is_a_fifo_is_refused_not_waited_for() {
    let (dir, image) = image_with_devices(&fixture("log-lines.wat"), "console,entropy");
    let fifo = dir.path().join("console.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let fifo = fifo.to_str().unwrap();
    let run = thaw(&["invoke", &image, "--data", "", "--console", fifo, "--timeout", "60"]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
    assert!(run.stderr.contains(&format!("{fifo}: is a FIFO; give a regular file or a terminal")), "{run:#?}");
}

#[test]
fn random_get_draws_from_the_entropy_device_after_restore() {
    let (_dir, image) = image_with_devices("random", "entropy");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (run, stats) = json(&["invoke", &image, "--data", ""]);
        assert_eq!(run.code, Some(0), "{run:#?}");
        let entropy = device(&stats, "entropy");
        assert_eq!(entropy["attached"], true, "{entropy}");
        assert!(entropy["notifications"].as_u64().unwrap() >= 1, "{entropy}");
        let response: Value = serde_json::from_str(stats["stdout"].as_str().unwrap()).unwrap();
        let random = response["random"].as_str().unwrap().to_string();
        assert_eq!(random.len(), 32, "{stats}");
        seen.push(random);
    }
    assert_ne!(seen[0], seen[1], "two restored VMs drew the same bytes");
}

#[test]
fn device_options_that_cannot_work_are_refused_with_one_line() {
    let (dir, image) = image_with_devices("hello", "entropy");
    let run = thaw(&["invoke", &image, "--data", "{}", "--console", "-"]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert_eq!(
        run.stderr,
        "thaw: error: --console: the image has no console device (take the snapshot with --devices console)\n"
    );
    let run = thaw(&["invoke", &image, "--data", "{}", "--devices", "console"]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(run.stderr.contains("a restored VM has the devices its image was taken with"), "{run:#?}");
    let run = thaw(&["invoke", &image, "--data", "{}", "--service", "5000=/tmp/nothing.sock"]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(run.stderr.contains("the image has no vsock device"), "{run:#?}");
    let run = thaw(&["run", "--devices", "floppy"]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(run.stderr.contains("unknown device \"floppy\""), "{run:#?}");
    // A service for a VM without vsock would do nothing: refused, not ignored.
    let bundle = dir.path().join("f.thaw");
    for args in [
        &["run", "--service", "5000=/tmp/nothing.sock"][..],
        &["invoke", bundle.to_str().unwrap(), "--data", "{}", "--vsock-uds", "/tmp/v"],
    ] {
        let run = thaw(args);
        assert_eq!(run.code, Some(125), "{args:?}: {run:#?}");
        assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
        assert!(run.stderr.contains("the VM has no vsock device"), "{run:#?}");
    }
    // Each command takes only the device options it honours (issue 16): a cold boot has no
    // restore options, a restore no device list, and `thaw bench` keeps an image's memory.
    let on_restore = "--eager-devices applies to restores";
    let on_image = "--kernel and --memory apply to cold boots";
    for (args, says) in [
        (&["run", "--eager-devices"][..], "unexpected argument '--eager-devices'"),
        (&["snapshot", bundle.to_str().unwrap(), "--eager-devices"], "unexpected argument '--eager-devices'"),
        (&["restore", &image, "--devices", "entropy"], "unexpected argument '--devices'"),
        (&["invoke", bundle.to_str().unwrap(), "--data", "{}", "--eager-devices"], on_restore),
        (&["bench", &image, "--data", "{}", "--memory", "64"], on_image),
    ] {
        let run = thaw(args);
        assert_eq!(run.code, Some(125), "{args:?}: {run:#?}");
        assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
        assert!(run.stderr.contains(says), "{args:?}: {run:#?}");
    }
}

#[test]
fn the_io_table_records_the_console_stream_and_it_reconnects_after_restore() {
    let dir = tempfile::tempdir().unwrap();
    let boot_log = dir.path().join("boot.log");
    let (_image_dir, image) =
        image_with(&fixture("log-lines.wat"), &["--devices", "console", "--console", boot_log.to_str().unwrap()]);
    // Nothing was written to the console before the checkpoint, so it was never attached.
    assert!(!boot_log.exists(), "the console's file was opened although nothing was written");
    let inspect = thaw(&["inspect", &image]);
    assert_eq!(inspect.code, Some(0), "{inspect:#?}");
    assert!(inspect.stdout.contains("1 handle(s)\n              fd 2   console-stream  active"), "{inspect:#?}");
    assert!(inspect.stdout.contains("devices     console 0: status 0xf"), "{inspect:#?}");
    let (_, shown) = json(&["inspect", &image]);
    let handle = &shown["io_table"]["handles"][0];
    assert_eq!(
        (&handle["fd"], &handle["kind"], &handle["state"]),
        (&2.into(), &"console-stream".into(), &"active".into())
    );

    // Restored: the stream is pending until the first write, which reconnects it.
    let log = dir.path().join("console.log");
    let run = thaw(&["invoke", &image, "--data", "", "--console", log.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "line 1\nline 2\nline 3\nline 4\nline 5\n");
    // Restored without --console: the stream is closed and stderr is back in the response.
    let run = thaw(&["invoke", &image, "--data", ""]);
    assert_eq!((run.code, run.stderr.as_str()), (Some(0), "line 1\nline 2\nline 3\nline 4\nline 5\n"));
}

#[test]
fn devices_the_vmm_moved_are_found_again_by_name() {
    let (dir, image) = image_with_devices(&fixture("log-lines.wat"), "console,entropy");
    let log = dir.path().join("moved.log");
    let (run, stats) =
        json(&["invoke", &image, "--data", "", "--console", log.to_str().unwrap(), "--move-devices", "9"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "line 1\nline 2\nline 3\nline 4\nline 5\n");
    let console = device(&stats, "console");
    let (exits, notifications) = (console["exits"].as_u64().unwrap(), console["notifications"].as_u64().unwrap());
    assert!(exits > notifications, "the guest set the moved console up again: {console}");

    let (_dir, image) = image_with_devices("random", "entropy");
    let (run, stats) = json(&["invoke", &image, "--data", "", "--move-devices", "3"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(device(&stats, "entropy")["attached"], true, "{stats}");
    let run = thaw(&["invoke", &image, "--data", "", "--move-devices", "600"]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    let expected = format!("thaw: error: {image}: loading its device state: virtio devices: 1 devices from slot 600");
    assert!(run.stderr.starts_with(&expected), "{run:#?}");
}

#[test]
fn a_function_reads_its_data_volume_and_a_file_opened_in_init_continues_after_restore() {
    let data = tempfile::tempdir().unwrap();
    let data = data_dir(data.path());
    let (dir, image) = image_with_pack("data-reader", &["--data-dir", &data], &[]);
    // init opened words/numbers.txt and read its first line through a 16-byte buffer: the I/O
    // table in the image holds the open file at offset 16.
    let inspect = thaw(&["inspect", &image]);
    assert!(
        inspect.stdout.contains("fd 6   data-file       active             /data/words/numbers.txt at offset 16"),
        "{inspect:#?}"
    );
    assert!(inspect.stdout.contains("    volume "), "{inspect:#?}");

    let request = r#"{"file": "words/numbers.txt"}"#;
    let expected = format!(
        "{{\"file\":{{\"contents\":{}}},\"listing\":[\"readme.txt\",\"words\"],\"next\":\"2\",\"numbers_bytes\":{}}}\n",
        serde_quote(&numbers()),
        numbers().len()
    );
    for _ in 0..2 {
        // Every restored VM goes on from the saved offset: the next line is 2.
        let (run, stats) = json(&["invoke", &image, "--data", request]);
        assert_eq!(run.code, Some(0), "{run:#?}");
        assert_eq!(stats["stdout"], expected.as_str());
        assert_eq!(device(&stats, "block")["attached"], true);
    }
    let bundle = dir.path().join("f.thaw");
    let cold = thaw(&["invoke", bundle.to_str().unwrap(), "--data", request]);
    assert_eq!(cold.stdout, expected, "cold and restored agree");

    let run = thaw(&["invoke", &image, "--data", r#"{"file": "readme.txt"}"#]);
    assert!(run.stdout.starts_with("{\"file\":{\"contents\":\"hello volume\\n\"}"), "{run:#?}");
    let run = thaw(&["invoke", &image, "--data", r#"{"file": "missing"}"#]);
    assert!(run.stdout.contains("No such file or directory (os error 44)"), "{run:#?}");
    let run = thaw(&["invoke", &image, "--data", r#"{"file": "../../etc/passwd"}"#]);
    assert!(run.stdout.contains("Operation not permitted (os error 63)"), "{run:#?}");
    // Devices moved by the VMM: the block device is set up again, the file read on.
    let run = thaw(&["invoke", &image, "--data", request, "--move-devices", "5"]);
    assert_eq!(run.stdout, expected, "{run:#?}");
}

/// `s` as a JSON string literal (the characters the example's data uses).
fn serde_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('\n', "\\n"))
}

#[test]
fn data_directories_and_volumes_that_cannot_be_used_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", data.join("link")).unwrap();
    let bundle = dir.path().join("f.thaw");
    let run =
        thaw(&["pack", "--example", "hello", "-o", bundle.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(run.stderr.contains("is neither a regular file nor a directory"), "{run:#?}");
    assert!(!bundle.exists());

    std::fs::remove_file(data.join("link")).unwrap();
    std::fs::write(data.join("file"), "contents").unwrap();
    let run =
        thaw(&["pack", "--example", "hello", "-o", bundle.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    // Flip a byte of the file's data, at the very end of the bundle's volume.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let at = bytes.iter().rposition(|&b| b == b's').unwrap();
    bytes[at] = b'S';
    std::fs::write(&bundle, &bytes).unwrap();
    let run = thaw(&["invoke", bundle.to_str().unwrap(), "--data", "{}"]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(run.stderr.contains("data volume SHA-256"), "{run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
}

/// Runs `thaw qemu` (QEMU's own virtio devices over PCI, under TCG).
fn qemu(args: &[&str]) -> Run {
    assert!(
        std::process::Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success()),
        "thaw qemu needs qemu-system-x86_64 (apt-get install qemu-system-x86)"
    );
    let mut all = vec!["qemu", "--timeout", "120"];
    all.extend_from_slice(args);
    run_thaw(&all)
}

#[test]
fn the_same_drivers_work_against_qemus_console_entropy_and_block_devices() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(dir.path());
    let reader = dir.path().join("reader.thaw").to_str().unwrap().to_string();
    let run = thaw(&["pack", "--example", "data-reader", "-o", &reader, "--data-dir", &data]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let log_lines = dir.path().join("log.thaw").to_str().unwrap().to_string();
    let run = thaw(&["pack", &fixture("log-lines.wat"), "-o", &log_lines]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let random = dir.path().join("random.thaw").to_str().unwrap().to_string();
    let run = thaw(&["pack", "--example", "random", "-o", &random]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let (kvm_log, qemu_log) = (dir.path().join("kvm.log"), dir.path().join("qemu.log"));

    let request = r#"{"file": "words/numbers.txt"}"#;
    let (kvm_reader, qemu_reader, qemu_console, qemu_entropy) = std::thread::scope(|s| {
        let on_qemu = s.spawn(|| qemu(&[&reader, "--data", request, "--verbose"]));
        let console = s.spawn(|| qemu(&[&log_lines, "--data", "", "--console", qemu_log.to_str().unwrap()]));
        let entropy = s.spawn(|| qemu(&[&random, "--data", "", "--devices", "entropy", "--verbose"]));
        let kvm = thaw(&["invoke", &reader, "--data", request]);
        (kvm, on_qemu.join().unwrap(), console.join().unwrap(), entropy.join().unwrap())
    });
    // Block: the volume read through QEMU's virtio-blk gives the same answer as thaw's.
    assert_eq!(kvm_reader.code, Some(0), "{kvm_reader:#?}");
    assert_eq!(qemu_reader.code, Some(0), "{qemu_reader:#?}");
    assert_eq!(qemu_reader.stdout, kvm_reader.stdout);
    assert!(qemu_reader.stderr.contains("thaw-guest: virtio block (pci)"), "{qemu_reader:#?}");
    // Console: the same lines in the same order through QEMU's virtconsole as through thaw's.
    let kvm_console = thaw(&["invoke", &log_lines, "--data", "", "--console", kvm_log.to_str().unwrap()]);
    assert_eq!(kvm_console.code, Some(0), "{kvm_console:#?}");
    assert_eq!(qemu_console.code, Some(0), "{qemu_console:#?}");
    assert_eq!(qemu_console.stdout, "ok\n");
    assert_eq!(std::fs::read_to_string(&qemu_log).unwrap(), std::fs::read_to_string(&kvm_log).unwrap());
    assert_eq!(std::fs::read_to_string(&qemu_log).unwrap(), "line 1\nline 2\nline 3\nline 4\nline 5\n");
    // Entropy: random_get is served by QEMU's virtio-rng.
    assert_eq!(qemu_entropy.code, Some(0), "{qemu_entropy:#?}");
    assert!(qemu_entropy.stderr.contains("thaw-guest: virtio entropy (pci)"), "{qemu_entropy:#?}");
    assert!(qemu_entropy.stdout.starts_with("{\"random\": \""), "{qemu_entropy:#?}");
}

#[test]
fn reset_mode_with_console_output_leaves_memory_equal_to_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let (_image_dir, image) = image_with(&fixture("log-lines.wat"), &["--devices", "console"]);
    let run = thaw(&[
        "restore",
        &image,
        "--mode",
        "reset",
        "--count",
        "200",
        "--data",
        "",
        "--console",
        console.to_str().unwrap(),
        "--verify",
    ]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stderr.contains("the kept VM's memory equals the image except pages [1, 2]"), "{run:#?}");
    let written = std::fs::read_to_string(&console).unwrap();
    assert_eq!(written.matches("line 5\n").count(), 200, "every request's lines reached the console");
}
