//! Host services over virtio-vsock, under KVM, through the real `thaw` CLI: the
//! `service-client` example connects in `init`, is snapshotted, and its restored copies reconnect
//! on first use, to a real Unix-socket service run by the test (or get ECONNREFUSED when it is
//! gone).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;

use common::{Run, run_thaw};

fn thaw(args: &[&str]) -> Run {
    assert!(Path::new("/dev/kvm").exists(), "service tests run guests under KVM and need /dev/kvm");
    run_thaw(args)
}

/// A line service on a Unix socket: answers each line `L` with `echo: L`, and `big N` with N
/// bytes of `x` and a newline. Counts the connections it accepted; stops when dropped.
struct Service {
    path: PathBuf,
    accepted: Arc<AtomicUsize>,
}

impl Service {
    fn start(path: &Path) -> Self {
        let listener = UnixListener::bind(path).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || serve(stream));
            }
        });
        Self { path: path.to_path_buf(), accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Nothing listens once the file is gone; the accept thread ends with the test process.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream) {
    let mut writer = stream.try_clone().unwrap();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let reply = match line.strip_prefix("big ").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => "x".repeat(n),
            None => format!("echo: {line}"),
        };
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

/// A service-client bundle connected to port 5000, and the socket path for a service.
fn bundle(dir: &Path) -> (String, String) {
    let bundle = dir.join("client.thaw").to_str().unwrap().to_string();
    let pack = thaw(&["pack", "--example", "service-client", "--connect", "service=5000", "-o", &bundle]);
    assert_eq!(pack.code, Some(0), "{pack:#?}");
    (bundle, dir.join("service.sock").to_str().unwrap().to_string())
}

/// A service on `dir`'s socket and an image of a service-client bundle snapshotted against it;
/// returns the service, the image path and the `--service` argument that reaches it.
fn snapshotted(dir: &Path) -> (Service, String, String) {
    let (bundle, socket) = bundle(dir);
    let service = Service::start(Path::new(&socket));
    let image = dir.join("client.snap").to_str().unwrap().to_string();
    let service_arg = format!("5000={socket}");
    let snapshot = thaw(&["snapshot", &bundle, "-o", &image, "--service", &service_arg]);
    assert_eq!(snapshot.code, Some(0), "{snapshot:#?}");
    (service, image, service_arg)
}

/// The JSON object `thaw invoke --json` printed.
fn stats(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("no JSON on stdout ({e}): {run:#?}"))
}

#[test]
fn a_stream_opened_in_init_reconnects_after_restore_and_is_refused_once_the_service_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (service, image, service_arg) = snapshotted(dir.path());
    assert_eq!(service.accepted(), 1, "init connected once");
    let inspect = thaw(&["inspect", &image]);
    assert!(
        inspect.stdout.contains("fd 100 vsock-stream") && inspect.stdout.contains("host port 5000"),
        "{inspect:#?}"
    );

    for request in ["one", "two"] {
        let run = thaw(&["invoke", &image, "--service", &service_arg, "--data", request, "--json"]);
        assert_eq!(run.code, Some(0), "{run:#?}");
        let stats = stats(&run);
        let expected = format!("{{\"greeting\":\"echo: hello from init\",\"reply\":\"echo: {request}\"}}\n");
        assert_eq!(stats["stdout"], expected.as_str());
        let vsock = &stats["devices"][0];
        assert_eq!((&vsock["kind"], &vsock["attached"]), (&"vsock".into(), &true.into()), "{stats}");
    }
    assert_eq!(service.accepted(), 3, "each restored VM reconnected once");
    // A VMM that places the device elsewhere: the guest sets it up again, then reconnects.
    let run = thaw(&["invoke", &image, "--service", &service_arg, "--data", "moved", "--move-devices", "5"]);
    assert!(run.stdout.contains("\"reply\":\"echo: moved\""), "{run:#?}");
    assert_eq!(service.accepted(), 4);

    // The service's reply is larger than the stream's buffer: credit has to flow back.
    let run = thaw(&["invoke", &image, "--service", &service_arg, "--data", "big 300000"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains(&format!("\"reply\":\"{}\"", "x".repeat(300_000))), "{} bytes", run.stdout.len());

    let socket = service.path.clone();
    drop(service);
    let run = thaw(&["invoke", &image, "--service", &service_arg, "--data", "three", "--timeout", "20"]);
    assert_eq!(run.code, Some(0), "the request finishes, with the error in its answer: {run:#?}");
    assert_eq!(run.stdout, "{\"errno\":14,\"error\":\"Connection refused (os error 14)\"}\n");
    // No service configured at all: refused the same way.
    let run = thaw(&["invoke", &image, "--data", "four"]);
    assert!(run.stdout.contains("\"errno\":14"), "{run:#?}");

    // The service back: the next restored VM reaches it again.
    let service = Service::start(&socket);
    let run = thaw(&["invoke", &image, "--service", &service_arg, "--data", "five"]);
    assert!(run.stdout.contains("\"reply\":\"echo: five\""), "{run:#?}");
    assert_eq!(service.accepted(), 1);
}

#[test]
fn a_cold_boot_follows_the_uds_convention() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, _) = bundle(dir.path());
    let base = dir.path().join("v.sock").to_str().unwrap().to_string();
    let service = Service::start(Path::new(&format!("{base}_5000")));
    let run = thaw(&["invoke", &bundle, "--vsock-uds", &base, "--data", "cold", "--json"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(stats(&run)["stdout"], "{\"greeting\":\"echo: hello from init\",\"reply\":\"echo: cold\"}\n");
    assert_eq!(service.accepted(), 1, "init and the request share one stream");
}

#[test]
fn service_options_that_cannot_work_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, _) = bundle(dir.path());
    let out = dir.path().join("x.thaw").to_str().unwrap().to_string();
    // (arguments, exit code: 125 for a malformed option and for a value the manifest refuses)
    for (args, code, message) in [
        (vec!["invoke", &bundle, "--service", "5000"], 125, "is not PORT=SOCKET"),
        (vec!["invoke", &bundle, "--service", "port=/x"], 125, "is not a number"),
        (vec!["invoke", &bundle, "--service", "5000="], 125, "the socket path is empty"),
        (vec!["pack", "--example", "hello", "-o", &out, "--connect", "db"], 125, "is not NAME=PORT"),
        (vec!["pack", "--example", "hello", "-o", &out, "--connect", "db=0"], 125, "port 0"),
        (vec!["pack", "--example", "hello", "-o", &out, "--connect", "d-b=1"], 125, "\"d-b\""),
    ] {
        let run = thaw(&args);
        assert_eq!(run.code, Some(code), "{args:?}: {run:#?}");
        assert!(run.stderr.contains(message), "{args:?}: {run:#?}");
        let errors = run.stderr.lines().filter(|l| l.starts_with("error") || l.starts_with("thaw: error")).count();
        assert_eq!(errors, 1, "{run:#?}");
    }
    assert!(!Path::new(&out).exists(), "nothing is written for a refused bundle");
}

#[test]
fn reset_mode_with_a_vsock_exchange_per_request_leaves_memory_equal_to_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let (service, image, service_arg) = snapshotted(dir.path());
    let responses = dir.path().join("responses.jsonl");
    let run = thaw(&[
        "restore",
        &image,
        "--mode",
        "reset",
        "--count",
        "200",
        "--data",
        "ping",
        "--service",
        &service_arg,
        "--responses",
        responses.to_str().unwrap(),
        "--verify",
    ]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stderr.contains("the kept VM's memory equals the image except pages [1, 2]"), "{run:#?}");
    let lines = std::fs::read_to_string(&responses).unwrap();
    assert_eq!(lines.lines().filter(|l| l.contains("echo: ping")).count(), 200, "{lines}");
    assert!(service.accepted() > 200, "each reset request reconnected: {}", service.accepted());
}
