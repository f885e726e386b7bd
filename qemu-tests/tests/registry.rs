//! `thaw push` and `thaw pull` against a real OCI registry (Debian's `docker-registry`, the
//! CNCF distribution, which `.ci/run` installs) on loopback: bundles and snapshot images go up
//! and come back byte for byte, a pulled image restores and answers, and what the registry
//! sends wrong (a changed file, another tool's artifact) is refused in one line without a file
//! written.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::run_thaw;
use sha2::{Digest as _, Sha256};

/// A `docker-registry` on a free loopback port, storing in a directory of its own.
struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    address: String,
    storage: tempfile::TempDir,
}

impl Registry {
    fn start() -> Self {
        let storage = tempfile::tempdir().unwrap();
        let config = storage.path().join("config.yml");
        std::fs::write(
            &config,
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: /unused\nhttp:\n  addr: 127.0.0.1:0\n",
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
        while ureq::get(&format!("http://{}/v2/", registry.address)).call().is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not answer on {}", registry.address);
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// The file the registry stores as the blob `digest` (`sha256:HEX`).
    fn blob_file(&self, digest: &str) -> PathBuf {
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

fn sha256(path: &Path) -> String {
    format!("sha256:{}", hex(&Sha256::digest(std::fs::read(path).unwrap())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `thaw push`'s two lines: the reference with the manifest's digest, and the file's digest.
fn pushed(stdout: &str) -> (String, String) {
    let mut lines = stdout.lines();
    let reference = lines.next().unwrap_or_default().to_string();
    let file = lines.next().and_then(|l| l.strip_prefix("file ")).unwrap_or_default().to_string();
    (reference, file)
}

#[test]
fn bundles_and_images_go_through_a_registry_and_come_back_checked() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let run = run_thaw(&["pack", "--example", "hello", "-o", &at("hello.thaw")]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    let reference = format!("{}/functions/hello:v1", registry.address);
    let run = run_thaw(&["push", &at("hello.thaw"), &reference]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let (by_digest, file_digest) = pushed(&run.stdout);
    assert_eq!(file_digest, sha256(Path::new(&at("hello.thaw"))), "the file's digest is its SHA-256");
    assert!(by_digest.starts_with(&format!("{reference}@sha256:")), "{}", run.stdout);
    let again = run_thaw(&["push", &at("hello.thaw"), &format!("{}/functions/hello:v2", registry.address)]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert!(again.stderr.contains("the registry had the file already"), "{}", again.stderr);

    for (name, what) in [("by-tag.thaw", reference.as_str()), ("by-digest.thaw", by_digest.as_str())] {
        let run = run_thaw(&["pull", what, "-o", &at(name)]);
        assert_eq!(run.code, Some(0), "{what}: {}", run.stderr);
        assert_eq!(std::fs::read(at(name)).unwrap(), std::fs::read(at("hello.thaw")).unwrap(), "{what}");
    }

    // A snapshot image: pulled, it restores and answers, and it stays sparse.
    let run = run_thaw(&["snapshot", &at("hello.thaw"), "-o", &at("hello.snap")]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let image_reference = format!("{}/functions/hello-image:v1", registry.address);
    let run = run_thaw(&["push", &at("hello.snap"), &image_reference]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let (_, image_digest) = pushed(&run.stdout);
    let run = run_thaw(&["pull", &image_reference, "-o", &at("pulled.snap")]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(sha256(Path::new(&at("pulled.snap"))), image_digest);
    use std::os::unix::fs::MetadataExt as _;
    let pulled = std::fs::metadata(at("pulled.snap")).unwrap();
    assert!(pulled.blocks() * 512 < pulled.len() / 4, "the pulled image was written whole: {pulled:?}");
    let run = run_thaw(&["invoke", &at("pulled.snap"), "--data", r#"{"name": "registry"}"#]);
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), "{\"greeting\":\"Hello, registry!\"}\n"), "{}", run.stderr);

    // A byte of the stored file changed: the pull refuses it and writes nothing.
    let stored = registry.blob_file(&file_digest);
    let mut bytes = std::fs::read(&stored).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&stored, &bytes).unwrap();
    let run = run_thaw(&["pull", &reference, "-o", &at("changed.thaw")]);
    assert_eq!(run.code, Some(125), "{run:?}");
    assert!(run.stderr.contains(&format!("not the file of {} bytes and {file_digest}", bytes.len())), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(!Path::new(&at("changed.thaw")).exists());
}

#[test]
fn what_is_not_thaw_s_is_refused_in_one_line() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();

    // Another tool's artifact: a config blob and an OCI manifest of another artifactType.
    let config = b"{}";
    let digest = format!("sha256:{}", hex(&Sha256::digest(config)));
    let base = format!("http://{}/v2/other/thing", registry.address);
    let started = ureq::post(&format!("{base}/blobs/uploads/")).send_empty().unwrap();
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let location = if location.starts_with('/') { format!("http://{}{location}", registry.address) } else { location };
    let separator = if location.contains('?') { '&' } else { '?' };
    ureq::put(&format!("{location}{separator}digest={digest}")).send(&config[..]).unwrap();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.example.thing","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{digest}","size":2}},"layers":[]}}"#
    );
    ureq::put(&format!("{base}/manifests/v1"))
        .content_type("application/vnd.oci.image.manifest.v1+json")
        .send(manifest.as_bytes())
        .unwrap();
    let run = run_thaw(&["pull", &format!("{}/other/thing:v1", registry.address), "-o", &at("thing.thaw")]);
    assert_eq!(run.code, Some(125), "{run:?}");
    assert!(
        run.stderr.contains("not a thaw artifact: its artifactType is \"application/vnd.example.thing\""),
        "{}",
        run.stderr
    );
    assert!(!Path::new(&at("thing.thaw")).exists());

    std::fs::write(at("notes.txt"), "not a function").unwrap();
    for (args, says) in [
        (vec!["push", &at("notes.txt"), "127.0.0.1:1/a:b"], "not a thaw bundle or snapshot image"),
        (vec!["pull", "127.0.0.1:1/Upper:tag"], "the repository is not lower-case names"),
        (vec!["pull", "registry.example/a:b"], "give --insecure to use it anyway"),
        (vec!["pull", "127.0.0.1:1/a:b"], "127.0.0.1:1"),
    ] {
        let run = run_thaw(&args);
        assert_eq!(run.code, Some(125), "{args:?}: {run:?}");
        assert!(run.stderr.contains(says) && run.stderr.lines().count() == 1, "{args:?}: {}", run.stderr);
    }
}
