//! `thaw push` and `thaw pull` against a real OCI registry (Debian's `docker-registry`, the
//! CNCF distribution, which `.ci/run` installs) on loopback: bundles and snapshot images go up
//! and come back byte for byte, a pulled image restores and answers, and what the registry
//! sends wrong (a changed file, another tool's artifact) is refused in one line without a file
//! written. A registry that asks for credentials gets those `docker login` left in Docker's
//! `config.json`: itself with htpasswd (Basic), or its token service (Bearer), which a test runs
//! as the distribution spec describes, signing its tokens with `openssl`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Registry, run, run_thaw};
use sha2::{Digest as _, Sha256};

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
    // The file is here: only the manifest is read. Another file under its name is replaced.
    let run = run_thaw(&["pull", &reference, "-o", &at("by-tag.thaw")]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("holds") && run.stderr.contains("nothing pulled"), "{}", run.stderr);
    std::fs::write(at("by-tag.thaw"), b"stale").unwrap();
    let run = run_thaw(&["pull", &reference, "-o", &at("by-tag.thaw")]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stderr.contains("nothing pulled"), "{}", run.stderr);
    assert_eq!(std::fs::read(at("by-tag.thaw")).unwrap(), std::fs::read(at("hello.thaw")).unwrap());

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
        (vec!["pull", "registry.example/a:b"], "https://registry.example/v2/a/manifests/b"),
        (vec!["pull", "127.0.0.1:1/a:b"], "127.0.0.1:1"),
    ] {
        let run = run_thaw(&args);
        assert_eq!(run.code, Some(125), "{args:?}: {run:?}");
        assert!(run.stderr.contains(says) && run.stderr.lines().count() == 1, "{args:?}: {}", run.stderr);
    }
}

/// Docker's configuration directory (`DOCKER_CONFIG`) holding `config`.
fn docker_config(config: &serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

/// A login for `registry` as `docker login` writes it.
fn logged_in(registry: &str, user: &str, password: &str) -> tempfile::TempDir {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    docker_config(&serde_json::json!({ "auths": { registry: { "auth": auth } } }))
}

/// `thaw ARGS` with Docker's configuration in `config`.
fn thaw_with(config: &Path, args: &[&str]) -> common::Run {
    common::run(Command::new(common::THAW).args(args).env("DOCKER_CONFIG", config).env_remove("HOME"))
}

/// Pushes `dir`'s hello.thaw to `reference` and pulls it back into pulled.thaw, with Docker's
/// configuration in `config`, and checks it came back whole.
fn pushed_and_pulled(config: &Path, dir: &Path, reference: &str) {
    let (hello, pulled) = (dir.join("hello.thaw"), dir.join("pulled.thaw"));
    let run = thaw_with(config, &["push", hello.to_str().unwrap(), reference]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let run = thaw_with(config, &["pull", reference, "-o", pulled.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(std::fs::read(pulled).unwrap(), std::fs::read(hello).unwrap());
}

/// A registry with htpasswd auth (Basic): without a login, a push says to log in; with the
/// wrong password, the registry's 401 is shown; with `docker login`'s entry, push and pull work;
/// credentials kept by a credential helper are named as such.
#[test]
fn a_registry_with_basic_auth_takes_the_login_docker_left() {
    let storage = tempfile::tempdir().unwrap();
    let hashed = run(Command::new("python3").args([
        "-W",
        "ignore",
        "-c",
        "import crypt; print(crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))",
    ]));
    assert!(hashed.stdout.starts_with("$2"), "bcrypt from python3's crypt: {hashed:?}");
    let htpasswd = storage.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("ada:{}", hashed.stdout.trim())).unwrap();
    let auth = format!("auth:\n  htpasswd:\n    realm: thaw-test\n    path: {}\n", htpasswd.display());
    let registry = Registry::start_with(storage, &auth);
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    assert_eq!(run_thaw(&["pack", "--example", "hello", "-o", &at("hello.thaw")]).code, Some(0));
    let reference = format!("{}/functions/hello:v1", registry.address);

    let nobody = docker_config(&serde_json::json!({ "auths": {} }));
    let run = thaw_with(nobody.path(), &["push", &at("hello.thaw"), &reference]);
    assert_eq!(run.code, Some(125), "{run:?}");
    let expected = format!(
        "{} asks for credentials and {} has none for it: run `docker login {}`",
        registry.address,
        nobody.path().join("config.json").display(),
        registry.address
    );
    assert!(run.stderr.contains(&expected), "{}", run.stderr);

    let wrong = logged_in(&registry.address, "ada", "guess");
    let run = thaw_with(wrong.path(), &["push", &at("hello.thaw"), &reference]);
    assert_eq!(run.code, Some(125), "{run:?}");
    assert!(run.stderr.contains("the registry answered 401"), "{}", run.stderr);

    let ada = logged_in(&registry.address, "ada", "s3cret");
    pushed_and_pulled(ada.path(), dir.path(), &reference);

    let helper = docker_config(&serde_json::json!({ "auths": {}, "credsStore": "desktop" }));
    let run = thaw_with(helper.path(), &["pull", &reference, "-o", &at("helper.thaw")]);
    assert_eq!(run.code, Some(125), "{run:?}");
    assert!(run.stderr.contains("in the credential helper docker-credential-desktop"), "{}", run.stderr);
    assert!(!Path::new(&at("helper.thaw")).exists());
}

/// The token service of a registry with token auth: it answers `GET /token` with a JWT for the
/// scope asked, signed with `key` and carrying `cert`, to `ada:s3cret` in Basic auth (and to no
/// one else), and records each scope it granted.
struct TokenService {
    address: String,
    granted: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl TokenService {
    fn start(key: PathBuf, cert_der: Vec<u8>) -> Self {
        use base64::Engine as _;
        use std::io::{BufRead as _, BufReader, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let granted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = std::sync::Arc::clone(&granted);
        std::thread::spawn(move || {
            let b64 = base64::engine::general_purpose::STANDARD;
            let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let password = format!("Basic {}", b64.encode("ada:s3cret"));
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let target = line.split(' ').nth(1).unwrap_or("").to_string();
                let mut authorized = false;
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap() <= 2 {
                        break;
                    }
                    let (name, value) = header.split_once(':').unwrap_or(("", ""));
                    authorized |= name.eq_ignore_ascii_case("authorization") && value.trim() == password;
                }
                let query = target.split_once('?').map_or("", |(_, q)| q);
                let param = |name: &str| {
                    query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                        .map(|v| v.replace("%3A", ":").replace("%2F", "/").replace("%2C", ","))
                };
                let scope = param("scope").unwrap_or_default();
                let (status, body) = if !authorized {
                    ("401 Unauthorized", "{}".to_string())
                } else {
                    let mut parts = scope.splitn(3, ':');
                    let (kind, name, actions) = (parts.next(), parts.next(), parts.next());
                    let access = match (kind, name, actions) {
                        (Some(kind), Some(name), Some(actions)) => {
                            serde_json::json!([{ "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>() }])
                        }
                        _ => serde_json::json!([]),
                    };
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                    let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "x5c": [b64.encode(&cert_der)] });
                    let claims = serde_json::json!({
                        "iss": "thaw-test-issuer", "sub": "ada", "aud": param("service").unwrap_or_default(),
                        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", kept.lock().unwrap().len()),
                        "access": access,
                    });
                    let signed = format!("{}.{}", url.encode(header.to_string()), url.encode(claims.to_string()));
                    let mut openssl = Command::new("openssl")
                        .args(["dgst", "-sha256", "-sign"])
                        .arg(&key)
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .spawn()
                        .unwrap();
                    openssl.stdin.take().unwrap().write_all(signed.as_bytes()).unwrap();
                    let signature = openssl.wait_with_output().unwrap().stdout;
                    kept.lock().unwrap().push(scope.clone());
                    (
                        "200 OK",
                        serde_json::json!({ "token": format!("{signed}.{}", url.encode(signature)) }).to_string(),
                    )
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { address, granted }
    }
}

/// A registry with token auth (Bearer): thaw asks the realm the registry names for a token with
/// the login `docker login` left, for the scope the registry asks, and pushes and pulls with it.
#[test]
fn a_registry_with_token_auth_gets_a_token_from_its_realm() {
    let storage = tempfile::tempdir().unwrap();
    let (key, cert) = (storage.path().join("key.pem"), storage.path().join("cert.pem"));
    let made = run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=thaw-test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    assert_eq!(made.code, Some(0), "openssl makes the token signer's key: {made:?}");
    let der = Command::new("openssl").args(["x509", "-outform", "DER", "-in"]).arg(&cert).output().unwrap().stdout;
    let tokens = TokenService::start(key, der);
    let auth = format!(
        "auth:\n  token:\n    realm: http://{}/token\n    service: thaw-test-service\n    issuer: thaw-test-issuer\n    rootcertbundle: {}\n",
        tokens.address,
        cert.display()
    );
    let registry = Registry::start_with(storage, &auth);
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    assert_eq!(run_thaw(&["pack", "--example", "hello", "-o", &at("hello.thaw")]).code, Some(0));
    let reference = format!("{}/functions/hello:v1", registry.address);

    let nobody = docker_config(&serde_json::json!({}));
    let run = thaw_with(nobody.path(), &["push", &at("hello.thaw"), &reference]);
    assert_eq!(run.code, Some(125), "{run:?}");
    let refused = format!("http://{}/token: the token service answered 401", tokens.address);
    assert!(run.stderr.contains(&refused), "{}", run.stderr);

    let ada = logged_in(&registry.address, "ada", "s3cret");
    pushed_and_pulled(ada.path(), dir.path(), &reference);
    let granted = tokens.granted.lock().unwrap().clone();
    // The registry names the actions in either order.
    let push = |s: &String| {
        let actions = s.strip_prefix("repository:functions/hello:").unwrap_or_default();
        let mut actions: Vec<&str> = actions.split(',').collect();
        actions.sort_unstable();
        actions == ["pull", "push"]
    };
    assert!(granted.iter().any(push), "{granted:?}");
    assert!(granted.iter().any(|s| s == "repository:functions/hello:pull"), "{granted:?}");
}

/// A registry on loopback that speaks TLS with a certificate of the test's own authority: with
/// that authority trusted (`SSL_CERT_FILE`), push and pull go through in HTTPS; with the
/// system's trusted certificates only, the certificate is refused and nothing falls back to
/// plain HTTP.
#[test]
fn a_registry_in_https_is_trusted_as_ssl_cert_file_says() {
    let storage = tempfile::tempdir().unwrap();
    let file = |name: &str| storage.path().join(name).to_str().unwrap().to_string();
    std::fs::write(file("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    for args in [
        vec!["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=thaw-test-ca"]
            .into_iter()
            .map(String::from)
            .chain(["-keyout".into(), file("ca.key"), "-out".into(), file("ca.pem")])
            .collect::<Vec<_>>(),
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout"]
            .into_iter()
            .map(String::from)
            .chain([file("server.key"), "-out".into(), file("server.csr")])
            .collect(),
        ["x509", "-req", "-days", "1", "-in"]
            .into_iter()
            .map(String::from)
            .chain([file("server.csr"), "-CA".into(), file("ca.pem"), "-CAkey".into(), file("ca.key")])
            .chain(["-CAcreateserial".into(), "-extfile".into(), file("san.ext"), "-out".into(), file("server.pem")])
            .collect(),
    ] {
        let made = run(Command::new("openssl").args(&args));
        assert_eq!(made.code, Some(0), "openssl {args:?}: {made:?}");
    }
    let tls = format!("  tls:\n    certificate: {}\n    key: {}\n", file("server.pem"), file("server.key"));
    let ca = file("ca.pem");
    let registry = Registry::start_with(storage, &tls);
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    assert_eq!(run_thaw(&["pack", "--example", "hello", "-o", &at("hello.thaw")]).code, Some(0));
    let reference = format!("{}/functions/hello:v1", registry.address);
    let thaw = |trusted: &str, args: &[&str]| run(Command::new(common::THAW).args(args).env("SSL_CERT_FILE", trusted));

    let run = thaw(&ca, &["push", &at("hello.thaw"), &reference]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let run = thaw(&ca, &["pull", &reference, "-o", &at("pulled.thaw")]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(std::fs::read(at("pulled.thaw")).unwrap(), std::fs::read(at("hello.thaw")).unwrap());

    let system = "/etc/ssl/certs/ca-certificates.crt";
    assert!(Path::new(system).is_file(), "Debian's bundle of trusted certificates (ca-certificates)");
    let run = thaw(system, &["pull", &reference, "-o", &at("untrusted.thaw")]);
    assert_eq!(run.code, Some(125), "{run:?}");
    let refused = format!("https://{}/v2/: ", registry.address);
    assert!(run.stderr.contains(&refused) && run.stderr.contains("certificate"), "{}", run.stderr);
    assert!(!Path::new(&at("untrusted.thaw")).exists());
    let run = thaw(&file_in(&dir, "empty.pem", ""), &["pull", &reference]);
    assert!(run.stderr.contains("empty.pem: the certificates to trust: it holds no PEM certificate"), "{}", run.stderr);
}

/// `contents` written to `name` in `dir`; its path.
fn file_in(dir: &tempfile::TempDir, name: &str, contents: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_string()
}

/// A registry that takes the connection and then says nothing is given up on after `--timeout`
/// seconds, with one line that says so, and nothing is written.
#[test]
fn a_registry_that_says_nothing_is_given_up_on() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        // Holds every connection open without a byte.
        let held: Vec<_> = silent.incoming().collect();
        drop(held);
    });
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("never.thaw");
    let started = std::time::Instant::now();
    let run = run_thaw(&["pull", &format!("{address}/a/b:c"), "--timeout", "1", "-o", output.to_str().unwrap()]);
    assert_eq!(run.code, Some(125), "{run:?}");
    assert!(run.stderr.contains(&format!("http://{address}/v2/a/b/manifests/c")), "{}", run.stderr);
    assert!(
        run.stderr.contains("the registry kept thaw waiting 1 s") && run.stderr.lines().count() == 1,
        "{}",
        run.stderr
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "gave up after {:?}", started.elapsed());
    assert!(!output.exists());
}
