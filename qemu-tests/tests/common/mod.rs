//! What every test file shares: running the real `thaw` binary (an artifact dependency of this
//! crate) and keeping what it printed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `thaw` binary this build produced.
pub const THAW: &str = env!("CARGO_BIN_FILE_TOOLS_thaw");

/// How a `thaw` run ended and what it printed.
#[derive(Debug)]
pub struct Run {
    /// Its exit code (`None` if a signal ended it).
    pub code: Option<i32>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `thaw` with `args` to the end.
#[allow(dead_code)] // each test file compiles this module, and not every one runs thaw this way
pub fn run_thaw(args: &[&str]) -> Run {
    run(Command::new(THAW).args(args))
}

/// Runs `command` to the end.
pub fn run(command: &mut Command) -> Run {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?} must start: {e}"));
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Serves `count` requests of `data` from the snapshot image at `image` with `thaw restore` in
/// `mode`, and returns each response's record (`--responses`, written beside the image).
#[allow(dead_code)] // not every test file restores
pub fn restore(image: &str, mode: &str, count: usize, data: &str) -> Vec<serde_json::Value> {
    let responses = std::path::Path::new(image).with_file_name(format!("{mode}.jsonl"));
    let count_text = count.to_string();
    let run = run_thaw(&[
        "restore",
        image,
        "--mode",
        mode,
        "--count",
        &count_text,
        "--data",
        data,
        "--responses",
        responses.to_str().unwrap(),
    ]);
    assert_eq!(run.code, Some(0), "{mode}: {run:#?}");
    let lines = std::fs::read_to_string(&responses).unwrap();
    let records: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), count, "{mode}");
    records
}

/// Answers `data` with `bundle` under KVM and under QEMU at once; both must agree on the
/// response, stderr and exit code. Returns the KVM run.
#[allow(dead_code)] // not every test file runs both
pub fn both(bundle: &str, data: &str) -> Run {
    assert!(Path::new("/dev/kvm").exists(), "thaw invoke boots a guest under KVM and needs /dev/kvm");
    let (kvm, emulated) = std::thread::scope(|s| {
        let emulated = s.spawn(|| run_thaw(&["qemu", bundle, "--data", data, "--timeout", "120"]));
        (run_thaw(&["invoke", bundle, "--data", data]), emulated.join().expect("qemu run"))
    });
    assert_eq!(kvm.stdout, emulated.stdout, "response differs\nkvm: {kvm:#?}\nqemu: {emulated:#?}");
    assert_eq!(kvm.stderr, emulated.stderr, "stderr differs\nkvm: {kvm:#?}\nqemu: {emulated:#?}");
    assert_eq!(kvm.code, emulated.code, "exit code differs\nkvm: {kvm:#?}\nqemu: {emulated:#?}");
    kvm
}

/// Writes `files` (path, text) into a fresh directory: a function's source.
#[allow(dead_code)] // not every test file writes functions
pub fn function(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, source) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, source).unwrap();
    }
    dir
}

/// Snapshots `bundle` into `function.snap` in `dir` and returns the image's path.
#[allow(dead_code)] // not every test file snapshots this way
pub fn snapshot(dir: &Path, bundle: &str) -> String {
    let image = dir.join("function.snap");
    let run = run_thaw(&["snapshot", bundle, "-o", image.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    image.to_str().unwrap().to_string()
}

/// A `docker-registry` (the CNCF distribution, which `.ci/run` installs) on a free loopback
/// port, storing in a directory of its own.
#[allow(dead_code)] // not every test file uses a registry
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub address: String,
    storage: tempfile::TempDir,
}

#[allow(dead_code)]
impl Registry {
    pub fn start() -> Self {
        Self::start_with(tempfile::tempdir().unwrap(), "")
    }

    /// A registry whose configuration ends with `auth` (an `auth:` section, or `tls:` settings
    /// of its `http:` section, or nothing), storing in `storage`, where the files `auth` names
    /// may be.
    pub fn start_with(storage: tempfile::TempDir, auth: &str) -> Self {
        let config = storage.path().join("config.yml");
        std::fs::write(
            &config,
            format!("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: /unused\nhttp:\n  addr: 127.0.0.1:0\n{auth}"),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        let child = Command::new("docker-registry")
            .args(["serve", config.to_str().unwrap()])
            .env("REGISTRY_HTTP_ADDR", &address)
            .env("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY", storage.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry runs (.ci/run installs Debian's docker-registry)");
        let registry = Self { child, address, storage };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Any answer will do: a registry that asks for credentials answers 401.
        let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
        while agent.get(&format!("http://{}/v2/", registry.address)).call().is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not answer on {}", registry.address);
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// The file the registry stores as the blob `digest` (`sha256:HEX`).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
