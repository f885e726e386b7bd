//! `thaw serve` as operators and clients meet it: a real server process on a loopback port (or
//! a Unix socket), real KVM VMs behind it, and a real HTTP client in front of it.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{THAW, function, run_thaw};

/// A running `thaw serve` and what it has printed.
struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `thaw serve` on a free loopback port with its store in `state`, and waits until
    /// it listens.
    fn start(state: &Path, extra: &[&str]) -> Self {
        assert!(Path::new("/dev/kvm").exists(), "thaw serve runs functions under KVM and needs /dev/kvm");
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--state-dir", state.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (child, log, listening) = spawn(&args);
        let url = listening.strip_prefix("http://").map(|a| format!("http://{a}")).expect("a TCP listener");
        Self { child, url, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn functions(&self, name: &str) -> String {
        format!("{}/v1/functions/{name}", self.url)
    }

    /// Runs the client command `thaw ARGS --server` this server.
    fn thaw(&self, args: &[&str]) -> common::Run {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--server", &self.url]);
        run_thaw(&all)
    }

    /// Ends the server as a crash would.
    fn kill(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.log()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `thaw ARGS`, keeps its stderr, and returns once it prints where it listens (what
/// follows "listening on ").
fn spawn(args: &[&str]) -> (Child, Arc<Mutex<String>>, String) {
    spawn_command(Command::new(THAW).args(args))
}

/// [`spawn`], with at most `files` descriptors open at once (`ulimit -n`).
fn spawn_with_file_limit(files: u32, args: &[&str]) -> (Child, Arc<Mutex<String>>, String) {
    let script = format!("ulimit -n {files} && exec \"$0\" \"$@\"");
    spawn_command(Command::new("sh").arg("-c").arg(script).arg(THAW).args(args))
}

/// Spawns `command`, keeps its stderr, and returns once it prints where it listens.
fn spawn_command(command: &mut Command) -> (Child, Arc<Mutex<String>>, String) {
    let mut child = command.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let kept = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // In text or JSON lines alike, the address runs to a quote or the end.
            if let Some(at) = line.split("listening on ").nth(1) {
                let _ = tx.send(at.split('"').next().unwrap_or_default().trim().to_string());
            }
            let mut log = kept.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let listening = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("thaw serve did not start listening: {}", log.lock().unwrap()));
    (child, log, listening)
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build(),
    )
}

/// A response's status, headers and body.
struct Reply {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: String,
}

fn reply(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut response = response.expect("the server answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.body_mut().with_config().limit(64 << 20).read_to_string().unwrap_or_default();
    Reply { status, headers, body }
}

fn put(url: &str, body: &[u8]) -> Reply {
    reply(agent().put(url).send(body))
}

/// A PUT of `body` with `Content-Type: content_type`.
fn put_typed(url: &str, content_type: &str, body: &str) -> Reply {
    reply(agent().put(url).header("content-type", content_type).send(body.as_bytes()))
}

/// The `Content-Type` of a deploy by reference.
const REFERENCE: &str = "application/vnd.thaw.reference";

fn post(url: &str, body: &[u8]) -> Reply {
    reply(agent().post(url).send(body))
}

fn get(url: &str) -> Reply {
    reply(agent().get(url).call())
}

fn delete(url: &str) -> Reply {
    reply(agent().delete(url).call())
}

/// A bundle of the example `name`.
fn example(name: &str) -> Vec<u8> {
    example_with(name, &[])
}

/// A bundle of the example `name`, packed with `extra` options.
fn example_with(name: &str, extra: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.thaw");
    let mut args = vec!["pack", "--example", name, "-o", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let run = run_thaw(&args);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    std::fs::read(path).unwrap()
}

/// A WAT fixture as a bare wasm module.
fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fixtures").join(name);
    wat::parse_file(path).unwrap()
}

/// The `"version": "…"` in a JSON body.
fn version(json: &str) -> String {
    json.split(r#""version":""#).nth(1).and_then(|s| s.split('"').next()).unwrap_or_default().to_string()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn deploy_invoke_redeploy_and_delete_over_http() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let hello = example("hello");

    let deployed = put(&server.functions("hello"), &hello);
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    assert!(deployed.body.contains(r#""deployment":"created""#) && deployed.body.contains(r#""mode":"reset""#));
    // Traffic switches only once the version is ready: both kept VMs restored and parked.
    assert!(deployed.body.contains(r#""live_vms":2"#), "{}", deployed.body);
    let v1 = version(&deployed.body);
    assert_eq!(v1.len(), 64, "{}", deployed.body);

    let answer = post(&format!("{}/invoke", server.functions("hello")), br#"{"name": "http"}"#);
    assert_eq!((answer.status, answer.body.as_str()), (200, "{\"greeting\":\"Hello, http!\"}\n"));
    assert_eq!(answer.headers["x-thaw-version"], v1.as_str());
    let instance = answer.headers["x-thaw-instance"].to_str().unwrap();
    assert!(instance.len() == 32 && u128::from_str_radix(instance, 16).is_ok(), "x-thaw-instance: {instance}");
    for header in ["x-thaw-queue-us", "x-thaw-serve-us", "x-thaw-handle-us"] {
        let value = answer.headers[header].to_str().unwrap();
        assert!(value.parse::<u64>().is_ok(), "{header}: {value}");
    }

    // The same content again changes nothing; new settings switch traffic without a snapshot.
    let again = put(&server.functions("hello"), &hello);
    assert_eq!(again.status, 200);
    assert!(again.body.contains(r#""deployment":"unchanged""#), "{}", again.body);
    let pooled = put(&format!("{}?mode=pool&pool=2&concurrency=1", server.functions("hello")), &hello);
    assert!(pooled.body.contains(r#""deployment":"updated""#) && pooled.body.contains(r#""mode":"pool""#));
    assert_eq!(version(&pooled.body), v1);
    assert_eq!(server.log().matches("snapshot of hello").count(), 1, "{}", server.log());
    let mut instances = std::collections::HashSet::new();
    for i in 0..20 {
        let answer =
            post(&format!("{}/invoke", server.functions("hello")), format!(r#"{{"name": "p{i}"}}"#).as_bytes());
        assert_eq!(answer.body, format!("{{\"greeting\":\"Hello, p{i}!\"}}\n"));
        assert!(instances.insert(answer.headers["x-thaw-instance"].to_str().unwrap().to_string()));
    }

    // A bare wasm, packed by the server with the settings in the query.
    let scribble = put(
        &format!("{}?mode=fresh&env=GREETING%3Dhi&arg=one", server.functions("scribble")),
        &fixture("scribble.wat"),
    );
    assert_eq!(scribble.status, 201, "{}", scribble.body);
    let answer = post(&format!("{}/invoke", server.functions("scribble")), b"body");
    assert_eq!((answer.status, answer.body.as_str()), (200, "prev="));

    let list = get(&format!("{}/v1/functions", server.url));
    assert!(list.body.find(r#""name":"hello""#) < list.body.find(r#""name":"scribble""#), "{}", list.body);
    // Counters run on across versions: one request in reset mode, twenty in the pool.
    assert!(list.body.contains(r#""ok":21"#), "{}", list.body);
    assert_eq!(get(&server.functions("hello")).status, 200);

    assert_eq!(delete(&server.functions("scribble")).status, 200);
    let gone = post(&format!("{}/invoke", server.functions("scribble")), b"body");
    assert_eq!(gone.status, 404, "{}", gone.body);
    assert_eq!(delete(&server.functions("scribble")).status, 404);
    assert_eq!(get(&server.functions("scribble")).status, 404);
    assert_eq!(files(&state.path().join("images")), [format!("{v1}.snap")], "only referenced images stay");
    assert_eq!(get(&format!("{}/healthz", server.url)).body, "ok\n");
}

/// The value of the series `series` (name and labels, exactly) in Prometheus text, after
/// checking that every line of it is a comment or `name{labels} value`.
fn metric(text: &str, series: &str) -> f64 {
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        assert!(value.parse::<f64>().is_ok(), "not a number: {line}");
        let name = name_labels.split('{').next().unwrap();
        assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{line}");
        assert!(!name_labels.contains('{') || name_labels.ends_with('}'), "{line}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap()
}

/// A line service on a Unix socket at `path`: answers each line `L` with `echo: L`.
fn echo_service(path: &Path) {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if writeln!(writer, "echo: {line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[test]
fn functions_reach_the_host_services_the_operator_names_and_take_extra_devices() {
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("echo.sock");
    echo_service(&socket);
    let service_arg = format!("service={}", socket.display());
    let server = Server::start(state.path(), &["--service", &service_arg]);

    // The bundle connects to "service" on port 5000, which the operator named: init greets it,
    // and every request reaches it through the restored VM's vsock.
    let client = example_with("service-client", &["--connect", "service=5000"]);
    let deployed = put(&server.functions("client"), &client);
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    assert!(deployed.body.contains(r#""services":{"5000":"service"}"#), "{}", deployed.body);
    for request in ["one", "two"] {
        let answer = post(&format!("{}/invoke", server.functions("client")), request.as_bytes());
        let expected = format!("{{\"greeting\":\"echo: hello from init\",\"reply\":\"echo: {request}\"}}\n");
        assert_eq!((answer.status, answer.body), (200, expected));
    }
    // A function connecting to a name the operator did not give is refused, saying which.
    let stranger = example_with("service-client", &["--connect", "service=5000", "--connect", "other=6000"]);
    let refused = put(&server.functions("stranger"), &stranger);
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body.contains(
            r#"connects to service \"other\" (port 6000), which this server does not offer (it offers: service)"#
        ),
        "{}",
        refused.body
    );

    // An entropy device is part of the version: the same bundle with one is another version.
    let random = example("random");
    let plain = put(&server.functions("random"), &random);
    assert_eq!(plain.status, 201, "{}", plain.body);
    let with_entropy = put(&format!("{}?devices=entropy", server.functions("random")), &random);
    assert_eq!(with_entropy.status, 200, "{}", with_entropy.body);
    assert_ne!(version(&plain.body), version(&with_entropy.body));
    assert!(with_entropy.body.contains(r#""devices":["entropy"]"#), "{}", with_entropy.body);
    let answer = post(&format!("{}/invoke", server.functions("random")), b"{}");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let refused = put(&format!("{}?devices=console", server.functions("random")), &random);
    assert_eq!(refused.status, 400, "{}", refused.body);

    // Restarted without the service, the function cannot serve, and says why.
    drop(server);
    let server = Server::start(state.path(), &[]);
    let answer = post(&format!("{}/invoke", server.functions("client")), b"three");
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(answer.body.contains("which this server does not offer (it offers: none)"), "{}", answer.body);
    assert_eq!(post(&format!("{}/invoke", server.functions("random")), b"{}").status, 200);
}

#[test]
fn metrics_and_logs_match_the_requests_sent() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    assert_eq!(put(&server.functions("hello"), &example("hello")).status, 201);
    assert_eq!(put(&format!("{}?mode=pool", server.functions("s")), &fixture("scribble.wat")).status, 201);
    for i in 0..25 {
        assert_eq!(
            post(&format!("{}/invoke", server.functions("hello")), format!("{{\"name\": \"{i}\"}}").as_bytes()).status,
            200
        );
    }
    for _ in 0..10 {
        assert_eq!(post(&format!("{}/invoke", server.functions("s")), b"body").status, 200);
    }
    // scribble traps on a request starting with "t".
    assert_eq!(post(&format!("{}/invoke", server.functions("s")), b"trap").status, 502);

    let response = agent().get(format!("{}/metrics", server.url)).call().unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = reply(Ok(response)).body;
    let m = |series: &str| metric(&text, series);
    assert_eq!(m(r#"thaw_requests_total{function="hello",outcome="ok"}"#), 25.0);
    assert_eq!(m(r#"thaw_requests_total{function="s",outcome="ok"}"#), 10.0);
    assert_eq!(m(r#"thaw_requests_total{function="s",outcome="function_error"}"#), 1.0);
    assert_eq!(m(r#"thaw_requests_total{function="hello",outcome="rejected"}"#), 0.0);
    assert_eq!(m(r#"thaw_request_duration_seconds_count{function="hello"}"#), 25.0);
    assert_eq!(m(r#"thaw_request_duration_seconds_bucket{function="hello",le="+Inf"}"#), 25.0);
    assert_eq!(m(r#"thaw_handle_duration_seconds_count{function="s"}"#), 11.0);
    assert!(m(r#"thaw_resets_total{function="hello"}"#) >= 23.0, "{text}");
    // Each request got a parked VM from the filler, or restored its own when none was parked.
    let pooled = m(r#"thaw_pool_filled_total{function="s"}"#) + m(r#"thaw_pool_restored_here_total{function="s"}"#);
    assert!(pooled >= 11.0, "{text}");
    assert_eq!(m(r#"thaw_in_flight{function="hello"}"#), 0.0);

    let logs = get(&format!("{}/logs?lines=3", server.functions("s")));
    assert_eq!(logs.status, 200, "{}", logs.body);
    // The trapping request wrote its line too, before it trapped.
    assert_eq!(logs.body.matches(r#""stream":"stderr","text":"scribbled""#).count(), 3, "{}", logs.body);
    assert_eq!(logs.body.matches(r#""instance":"#).count(), 3, "{}", logs.body);
    assert_eq!(get(&format!("{}/logs?lines=0", server.functions("s"))).status, 400);
    assert_eq!(get(&format!("{}/logs", server.functions("nope"))).status, 404);
}

#[test]
fn a_restart_serves_every_function_from_its_stored_image() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    assert_eq!(put(&format!("{}?mode=pool", server.functions("hello")), &example("hello")).status, 201);
    assert_eq!(put(&server.functions("random"), &example("random")).status, 201);
    server.kill();

    let server = Server::start(state.path(), &["--log-format", "json"]);
    for (name, body, expect) in [("hello", &br#"{"name": "again"}"#[..], "Hello, again!"), ("random", b"{}", "random")]
    {
        let answer = post(&format!("{}/invoke", server.functions(name)), body);
        assert_eq!(answer.status, 200, "{name}: {}", answer.body);
        assert!(answer.body.contains(expect), "{name}: {}", answer.body);
    }
    let log = server.log();
    assert!(!log.contains("snapshot of"), "a restart takes no snapshot: {log}");
    assert_eq!(log.matches("from its stored image").count(), 2, "{log}");
    for line in log.lines() {
        assert!(line.starts_with('{') && line.ends_with('}') && line.contains(r#""level":"INFO""#), "{line}");
    }
    assert!(get(&server.functions("hello")).body.contains(r#""mode":"pool""#));
}

#[test]
fn a_crash_during_a_deploy_leaves_the_previous_version_serving() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let v1 = version(&put(&server.functions("f"), &example("hello")).body);
    // An init that never returns keeps the new version's deploy in its cold boot.
    let stuck = wat::parse_str(
        r#"(module (func (export "init") (loop $l (br $l))) (func (export "handle")) (memory (export "memory") 1))"#,
    )
    .unwrap();
    let url = server.functions("f");
    // The server dies under this request; its error is not what is tested.
    std::thread::spawn(move || agent().put(&url).send(&stuck[..]).map(|_| ()));
    let started = Instant::now();
    while files(&state.path().join("tmp")).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(30), "the deploy never started: {}", server.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    // A deploy stuck in its init does not hold up another function's.
    let other = put(&server.functions("g"), &example("random"));
    assert_eq!(other.status, 201, "{}", other.body);
    server.kill();

    let server = Server::start(state.path(), &[]);
    let shown = get(&server.functions("f"));
    assert_eq!(version(&shown.body), v1, "{}", shown.body);
    let answer = post(&format!("{}/invoke", server.functions("f")), br#"{"name": "v1"}"#);
    assert_eq!(answer.body, "{\"greeting\":\"Hello, v1!\"}\n");
    assert!(files(&state.path().join("tmp")).is_empty(), "tmp/ is emptied at start");
    let g = version(&get(&server.functions("g")).body);
    let mut kept = vec![format!("{v1}.snap"), format!("{g}.snap")];
    kept.sort();
    assert_eq!(files(&state.path().join("images")), kept);
}

#[test]
fn hostile_uploads_names_and_requests_get_a_status_that_says_why() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &["--max-request-mib", "1", "--read-timeout", "1"]);
    let hello = example("hello");
    let error = |reply: &Reply| reply.body.split(r#""error":""#).nth(1).unwrap_or_default().to_string();

    for name in ["..%2F..%2Fetc", &"x".repeat(65), "%C3%BC", "a%20b", "%2E", "%2E%2E"] {
        let refused = put(&server.functions(name), &hello);
        assert_eq!(refused.status, 400, "{name}: {}", refused.body);
        assert!(error(&refused).contains("is not a function name"), "{}", refused.body);
    }
    // Issue 28, defect 8: what the router refuses itself is JSON too, like every error.
    // Small bodies: the router answers these without reading any, and closes the connection.
    let not_utf8 = put(&server.functions("%FF"), b"x");
    assert_eq!(not_utf8.status, 400, "{}", not_utf8.body);
    assert!(
        !error(&not_utf8).is_empty() && not_utf8.headers["content-type"] == "application/json",
        "{}",
        not_utf8.body
    );
    // A wrong method or path with a body of 512 KiB, more than the socket buffers hold: the
    // server reads it before answering, so the client gets the answer and not a reset.
    let large = vec![b'x'; 512 << 10];
    let wrong_method = reply(agent().patch(server.functions("f")).send(&large[..]));
    assert_eq!(wrong_method.status, 405, "{}", wrong_method.body);
    assert_eq!(error(&wrong_method), "this route does not take PATCH (see docs/API.md)\"}", "{}", wrong_method.body);
    assert!(wrong_method.headers.contains_key("allow"), "{:?}", wrong_method.headers);
    let no_route = post(&format!("{}/v1/nowhere", server.url), &large);
    assert_eq!(no_route.status, 404, "{}", no_route.body);
    assert_eq!(error(&no_route), "no such route (see docs/API.md)\"}", "{}", no_route.body);
    // A byte of the wasm changed: its hash no longer matches.
    let wasm_at = 64 + u32::from_le_bytes(hello[16..20].try_into().unwrap()) as usize;
    let mut corrupted = hello.clone();
    corrupted[wasm_at + 20] ^= 0xff;
    let refused = put(&server.functions("f"), &corrupted);
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(error(&refused).contains("wasm SHA-256") && !refused.body.contains('\n'), "{}", refused.body);
    // A byte of the compiled code changed: the server compiles the wasm itself and never runs
    // code it was sent, so the function deploys and answers as packed.
    let mut tampered = hello.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0xff;
    assert_eq!(put(&server.functions("g"), &tampered).status, 201);
    let answer = post(&format!("{}/invoke", server.functions("g")), br#"{"name": "ada"}"#);
    assert_eq!((answer.status, answer.body.as_str()), (200, "{\"greeting\":\"Hello, ada!\"}\n"));
    assert_eq!(put(&server.functions("f"), b"MZ\x90\x00not a function").status, 400);
    assert_eq!(put(&format!("{}?mode=warm", server.functions("f")), &hello).status, 400);
    assert_eq!(put(&format!("{}?path=..%2Fx", server.functions("f")), &hello).status, 400);
    let refused = put(&format!("{}?memory=64", server.functions("f")), &hello);
    assert!(error(&refused).contains("set in the bundle itself"), "{}", refused.body);
    let init_traps = wat::parse_str(
        r#"(module (func (export "init") unreachable) (func (export "handle")) (memory (export "memory") 1))"#,
    )
    .unwrap();
    let unusable = put(&server.functions("t"), &init_traps);
    assert_eq!(unusable.status, 422, "{}", unusable.body);
    assert_eq!(get(&server.functions("t")).status, 404, "a failed deploy deploys nothing");
    assert_eq!(put(&server.functions("t"), &fixture("trap.wat")).status, 201);
    let trapped = post(&format!("{}/invoke", server.functions("t")), b"x");
    assert_eq!(trapped.status, 502, "{}", trapped.body);
    assert!(error(&trapped).starts_with("the function trapped"), "{}", trapped.body);
    // The body is the request's stats, as `thaw invoke --json` gives them.
    let stats: serde_json::Value = serde_json::from_str(&trapped.body).unwrap();
    assert_eq!(stats["status"], "trapped", "{stats}");
    let instance = stats["instance_id"].as_str().unwrap_or_default();
    assert!(instance.len() == 32 && instance.chars().all(|c| c.is_ascii_hexdigit()), "{stats}");
    assert!(stats["phases"]["total_us"].is_u64(), "{stats}");
    assert_eq!(get(&format!("{}/v2/anything", server.url)).status, 404);
    assert_eq!(post(&format!("{}/invoke", server.functions("missing")), b"x").status, 404);

    // A function that spins on requests starting with "l", one request at a time, one queued.
    let url = format!("{}?concurrency=1&queue=1&timeout_ms=1500", server.functions("s"));
    assert_eq!(put(&url, &fixture("scribble.wat")).status, 201);
    let invoke = format!("{}/invoke", server.functions("s"));
    // The server answers once the body passes the cap and closes the connection, so the rest
    // of the body may not be sent: the writer's errors are not what is tested.
    let address = server.url.strip_prefix("http://").unwrap().to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let head =
        format!("POST /v1/functions/s/invoke HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\n\r\n", 2 << 20);
    std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(&vec![b'x'; 2 << 20]));
    });
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = [0u8; 4096];
    let n = stream.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than the 1048576-byte limit"), "{answer}");
    // Slow clients: a body that never finishes gets 408, and headers that never finish lose
    // the connection; both within about the read timeout.
    let mut slow = std::net::TcpStream::connect(&address).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    slow.write_all(
        format!("POST /v1/functions/s/invoke HTTP/1.1\r\nHost: {address}\r\nContent-Length: 100\r\n\r\nonly ten..")
            .as_bytes(),
    )
    .unwrap();
    let n = slow.read(&mut buf).unwrap();
    let slow_answer = String::from_utf8_lossy(&buf[..n]);
    assert!(slow_answer.starts_with("HTTP/1.1 408"), "{slow_answer}");
    assert!(slow_answer.contains("did not arrive within 1 s"), "{slow_answer}");
    let mut slower = std::net::TcpStream::connect(&address).unwrap();
    slower.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    slower.write_all(b"POST /v1/functions/s/invoke HTTP/1.1\r\nHost: x\r\n").unwrap();
    let closed =
        matches!(slower.read(&mut buf), Ok(0) | Err(_)) || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408");
    assert!(closed, "the connection stayed open");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    let spawn_post = |body: &'static [u8]| {
        let invoke = invoke.clone();
        std::thread::spawn(move || post(&invoke, body))
    };
    let spinning = spawn_post(b"loop");
    std::thread::sleep(Duration::from_millis(300));
    let queued = spawn_post(b"queued");
    std::thread::sleep(Duration::from_millis(300));
    let busy = post(&invoke, b"meanwhile");
    assert_eq!(busy.status, 429, "{}", busy.body);
    assert_eq!(busy.headers["retry-after"], "1");
    let timed_out = spinning.join().unwrap();
    assert_eq!(timed_out.status, 504, "{}", timed_out.body);
    let queued = queued.join().unwrap();
    assert_eq!((queued.status, queued.body.as_str()), (200, "prev="), "served by the kept VM, reset after the timeout");
    let shown = get(&server.functions("s")).body;
    // A timeout puts the VM back as an answer does (thaw restore's reset mode does the same):
    // the reset restores every byte, so nothing is replaced.
    for counter in [r#""timeouts":1"#, r#""rejected":1"#, r#""replaced":0"#, r#""ok":1"#] {
        assert!(shown.contains(counter), "{counter}: {shown}");
    }
}

#[test]
fn admin_routes_need_a_token_off_loopback_and_a_unix_socket_is_private() {
    let state = tempfile::tempdir().unwrap();
    let hello = example("hello");
    let (child, _log, listening) =
        spawn(&["serve", "--listen", "0.0.0.0:0", "--state-dir", state.path().to_str().unwrap()]);
    let port = listening.rsplit(':').next().unwrap().to_string();
    let open = Server { child, url: format!("http://127.0.0.1:{port}"), log: Arc::default() };
    let refused = put(&open.functions("hello"), &hello);
    assert_eq!(refused.status, 403, "{}", refused.body);
    drop(open);

    // Issue 28, defect 6: on loopback without a token, a web page whose name rebinds to
    // 127.0.0.1 can neither deploy nor delete: its Host and Origin are not this machine's.
    let local_state = tempfile::tempdir().unwrap();
    let local = Server::start(local_state.path(), &[]);
    let address = local.url.strip_prefix("http://").unwrap().to_string();
    // A small body: the refusal comes before the body is read, and the connection closes after
    // it, so the rest of a large one would meet a closed socket (EPIPE) while still being sent.
    let raw = |head: &str| {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        let body = &hello[..64];
        let request = format!("{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        stream.write_all(request.as_bytes()).and_then(|()| stream.write_all(body)).unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    let rebound = raw("PUT /v1/functions/hello HTTP/1.1\r\nHost: attacker.example:8400");
    assert!(rebound.starts_with("HTTP/1.1 403") && rebound.contains(r#"not \"attacker.example:8400\""#), "{rebound}");
    let from_page =
        raw(&format!("DELETE /v1/functions/hello HTTP/1.1\r\nHost: {address}\r\nOrigin: http://attacker.example"));
    assert!(from_page.starts_with("HTTP/1.1 403"), "{from_page}");
    assert_eq!(put(&local.functions("hello"), &hello).status, 201, "a loopback Host deploys");
    drop(local);

    let token = state.path().join("token");
    std::fs::write(&token, "correct-horse-battery-staple\n").unwrap();
    let guarded = Server::start(state.path(), &["--admin-token-file", token.to_str().unwrap()]);
    assert_eq!(put(&guarded.functions("hello"), &hello).status, 401);
    let with_token = reply(
        agent()
            .put(guarded.functions("hello"))
            .header("Authorization", "Bearer correct-horse-battery-staple")
            .send(&hello[..]),
    );
    assert_eq!(with_token.status, 201, "{}", with_token.body);
    // The scheme in any case (RFC 9110): issue 28, defect 8.
    let lower = reply(
        agent()
            .delete(guarded.functions("hello"))
            .header("Authorization", "bearer correct-horse-battery-staple")
            .call(),
    );
    assert_eq!(lower.status, 200, "{}", lower.body);
    assert_eq!(put(&guarded.functions("hello"), &hello).status, 401);
    let again = reply(
        agent()
            .put(guarded.functions("hello"))
            .header("Authorization", "Bearer correct-horse-battery-staple")
            .send(&hello[..]),
    );
    assert_eq!(again.status, 201, "{}", again.body);
    // Invocations need no token.
    assert_eq!(post(&format!("{}/invoke", guarded.functions("hello")), b"{}").status, 200);
    drop(guarded);

    let socket: PathBuf = state.path().join("thaw.sock");
    let address = format!("unix:{}", socket.display());
    let (mut child, _log, _) = spawn(&["serve", "--listen", &address, "--state-dir", state.path().to_str().unwrap()]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stream.write_all(b"POST /v1/functions/hello/invoke HTTP/1.1\r\nHost: thaw\r\nContent-Length: 16\r\nConnection: close\r\n\r\n{\"name\": \"unix\"}").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("{\"greeting\":\"Hello, unix!\"}\n"), "{answer}");

    // SIGTERM: the server stops taking connections, finishes, destroys its VMs and exits 0.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc_kill(child.id() as i32, 15) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "the socket is removed on exit");
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

#[test]
fn the_cli_client_deploys_calls_lists_and_reads_logs() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let hello = dir.path().join("hello.thaw");
    std::fs::write(&hello, example("hello")).unwrap();
    let scribble = dir.path().join("scribble.wasm");
    std::fs::write(&scribble, fixture("scribble.wat")).unwrap();

    let run = server.thaw(&["deploy", "hello", hello.to_str().unwrap(), "--set", "mode=pool"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.starts_with("hello created: version ") && run.stdout.ends_with(", pool mode\n"),
        "{}",
        run.stdout
    );
    let run = server.thaw(&["call", "hello", "--data", r#"{"name": "cli"}"#]);
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), "{\"greeting\":\"Hello, cli!\"}\n"), "{}", run.stderr);

    assert_eq!(server.thaw(&["deploy", "scribble", scribble.to_str().unwrap(), "--set", "env=A=1"]).code, Some(0));
    let run = server.thaw(&["call", "scribble", "--data", "trap"]);
    assert_eq!(run.code, Some(104), "{}", run.stderr);
    assert!(run.stderr.contains("the server answered 502: the function trapped"), "{}", run.stderr);
    let run = server.thaw(&["logs", "scribble", "--lines", "1"]);
    assert!(run.stdout.ends_with(" stderr  scribbled\n"), "{}", run.stdout);
    // Issue 28, defect 7: the instance column is the VM's id, not 0.
    let instance = run.stdout.split(' ').next().unwrap_or_default();
    assert!(instance.len() == 32 && instance.chars().all(|c| c.is_ascii_hexdigit()), "{}", run.stdout);

    let run = server.thaw(&["functions"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let rows: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(rows.len(), 3, "{}", run.stdout);
    assert!(rows[1].starts_with("hello ") && rows[1].contains(" pool "), "{}", rows[1]);
    assert!(rows[2].starts_with("scribble ") && rows[2].contains(" reset "), "{}", rows[2]);

    let run = server.thaw(&["call", "missing", "--data", "x"]);
    assert_eq!(run.code, Some(125));
    assert!(run.stderr.contains(r#"the server answered 404: no function "missing" is deployed"#), "{}", run.stderr);
    let run = server.thaw(&["deploy", "hello", hello.to_str().unwrap(), "--set", "bogus=1"]);
    assert_eq!(run.code, Some(125));
    assert!(run.stderr.contains(r#"the server answered 400: query parameter "bogus""#), "{}", run.stderr);
}

/// `thaw deploy NAME handler.js` and `thaw deploy NAME DIR` pack a JavaScript function on the
/// client, as `thaw pack` would, and deploy its bundle; a module that does not parse is refused
/// by the deploy's snapshot with the file, line and message.
#[test]
fn the_cli_client_deploys_javascript_files_and_directories() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let file = write("one.js", "export default (request) => request.toUpperCase();\n");
    write(
        "app/index.mjs",
        "import { readFileSync } from \"node:fs\";\nimport { twice } from \"./lib.js\";\nconst word = readFileSync(\"/app/word.txt\", \"utf8\");\nexport const handle = (r) => twice(word + r);\n",
    );
    write("app/lib.js", "export const twice = (s) => s + s;\n");
    write("app/word.txt", "ab");
    let broken = write("broken.js", "export function handle(r) {\n  return r +;\n}\n");

    let run = server.thaw(&["deploy", "upper", &file]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.starts_with("upper created: version "), "{}", run.stdout);
    let run = server.thaw(&["call", "upper", "--data", "shout"]);
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), "SHOUT"), "{}", run.stderr);

    let app = dir.path().join("app");
    let run = server.thaw(&["deploy", "app", app.to_str().unwrap(), "--set", "mode=pool"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let run = server.thaw(&["call", "app", "--data", "c"]);
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), "abcabc"), "{}", run.stderr);

    // thaw pack's --entry, and its --memory as a setting, packed here and not sent.
    write("other/main.mjs", "export default (r) => `main:${r}`;\n");
    let other = dir.path().join("other");
    let other = other.to_str().unwrap();
    let run = server.thaw(&["deploy", "other", other]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    let run = server.thaw(&[
        "deploy",
        "other",
        other,
        "--entry",
        "main.mjs",
        "--sample-data",
        "y",
        "--set",
        "memory=64",
        "--set",
        "mode=fresh",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("fresh mode"), "{}", run.stdout);
    let run = server.thaw(&["call", "other", "--data", "x"]);
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), "main:x"), "{}", run.stderr);
    let run = server.thaw(&["deploy", "other", other, "--entry", "main.mjs", "--set", "memory=1"]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(run.stderr.contains("more than the 1 MiB"), "{}", run.stderr);
    let wasm = write("plain.wasm", "\0asm");
    let run = server.thaw(&["deploy", "plain", &wasm, "--bundle"]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(run.stderr.contains("--entry, --bundle and --sample-data are for JavaScript"), "{}", run.stderr);

    let run = server.thaw(&["deploy", "broken", &broken]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(run.stderr.contains("the server answered 422"), "{}", run.stderr);
    assert!(run.stderr.contains("SyntaxError") && run.stderr.contains("/app/broken.js:2"), "{}", run.stderr);
}

/// Issue 30: `thaw deploy NAME DIR` packs a Python function on the client, its requirements
/// included, as `thaw pack` would, and deploys its bundle, which answers from its snapshot; a
/// module that fails at its top level is refused by the deploy's snapshot with its traceback.
#[test]
fn the_cli_client_deploys_a_python_directory_with_its_requirements() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let dir = function(&[
        (
            "app/handler.py",
            "from dateutil.parser import isoparse\nSTARTED = 'init'\ndef handle(request: str):\n    return {'weekday': isoparse(request).strftime('%A'), 'started': STARTED}\n",
        ),
        ("app/requirements.txt", "python-dateutil==2.9.0.post0\n"),
        ("broken/handler.py", "import json\nCONFIG = json.loads('{')\n"),
    ]);
    let app = dir.path().join("app");
    let run =
        server.thaw(&["deploy", "dates", app.to_str().unwrap(), "--set", "mode=reset", "--sample-data", "2024-03-01"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for (date, weekday) in [("2024-03-01", "Friday"), ("1969-07-20", "Sunday")] {
        let run = server.thaw(&["call", "dates", "--data", date]);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let answer: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!((answer["weekday"].as_str(), answer["started"].as_str()), (Some(weekday), Some("init")), "{answer}");
    }
    let broken = dir.path().join("broken");
    let run = server.thaw(&["deploy", "broken", broken.to_str().unwrap()]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(run.stderr.contains("the server answered 422"), "{}", run.stderr);
    assert!(run.stderr.contains("File \"/app/handler.py\", line 2, in <module>"), "{}", run.stderr);
}

/// Issue 30: a Python module PUT with `Content-Type: text/x-python` is packed by the server as
/// `thaw pack handler.py` packs one file, with the query's settings; a module that fails at its
/// top level is refused with its traceback; a server without CPython for WASI says it cannot
/// pack Python (501), naming where it looked.
#[test]
fn a_python_module_uploaded_over_http_is_packed_by_the_server() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let source = "import hashlib\nTABLE = {n: hashlib.sha256(str(n).encode()).hexdigest()[:8] for n in range(1000)}\n\
                  def handle(request: str):\n    return {'n': int(request), 'digest': TABLE.get(int(request))}\n";
    let deployed =
        put_typed(&format!("{}?mode=pool", server.functions("digests")), "text/x-python; charset=utf-8", source);
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    assert!(deployed.body.contains(r#""mode":"pool""#), "{}", deployed.body);
    for n in [0u32, 7, 999] {
        let answer = post(&format!("{}/invoke", server.functions("digests")), n.to_string().as_bytes());
        let expected = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(n.to_string().as_bytes()));
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (200, format!(r#"{{"n": {n}, "digest": "{}"}}"#, &expected[..8]).as_str())
        );
    }
    let again = put_typed(&format!("{}?mode=pool", server.functions("digests")), "text/x-script.python", source);
    assert!(again.body.contains(r#""deployment":"unchanged""#), "{}", again.body);

    let broken = put_typed(&server.functions("broken"), "text/x-python", "import json\nCONFIG = json.loads('{')\n");
    assert_eq!(broken.status, 422, "{}", broken.body);
    assert!(broken.body.contains(r#"File \"/app/broken.py\", line 2, in <module>"#), "{}", broken.body);

    let untyped = put_typed(&server.functions("untyped"), "text/plain", source);
    assert_eq!(untyped.status, 400, "{}", untyped.body);
    assert!(untyped.body.contains("a Python module with text/x-python"), "{}", untyped.body);

    // A server that finds no runtime: its data directory is empty.
    let (data, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut command = Command::new(THAW);
    command.args(["serve", "--listen", "127.0.0.1:0", "--state-dir", state.path().to_str().unwrap()]);
    let (child, log, url) = spawn_command(command.env("XDG_DATA_HOME", data.path()).env_remove("THAW_PYTHON_RUNTIME"));
    let bare = Server { child, url, log };
    let refused = put_typed(&bare.functions("digests"), "text/x-python", source);
    assert_eq!(refused.status, 501, "{}", refused.body);
    let looked = data.path().join("thaw/python3.11-wasi");
    assert!(
        refused.body.contains(&format!("this server cannot pack Python: no CPython for WASI in {}", looked.display())),
        "{}",
        refused.body
    );
}

/// An HTTP/1.1 server standing in for a hostile or dying peer: every request on a connection
/// gets what `answer(path)` says: `Some((status, body))`, or `None` to close the connection
/// without a word. A status of 0 stalls (the connection stays open and silent).
fn hostile_peer(answer: impl Fn(&str) -> Option<(u16, Vec<u8>)> + Send + Sync + 'static) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let answer = Arc::clone(&answer);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut request = String::new();
                    if reader.read_line(&mut request).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                        line.clear();
                    }
                    let path = request.split(' ').nth(1).unwrap_or_default().to_string();
                    match answer(&path) {
                        None => return,
                        Some((0, _)) => std::thread::sleep(Duration::from_secs(120)),
                        Some((status, body)) => {
                            let head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n", body.len());
                            if stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body)).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    url
}

/// The restore head `server` serves for `version`, asked for with `authorization`.
fn restore_head(server: &Server, version: &str, authorization: &str) -> Vec<u8> {
    let mut request = agent().get(format!("{}/v1/images/{version}/head", server.url));
    if !authorization.is_empty() {
        request = request.header("Authorization", authorization);
    }
    let mut answer = request.call().unwrap();
    assert_eq!(answer.status(), 200);
    answer.body_mut().with_config().limit(64 << 20).read_to_vec().unwrap()
}

/// What a hostile peer answers a page request with ([`hostile_peer`]).
type PageAnswer = fn() -> Option<(u16, Vec<u8>)>;

/// A restore head (docs/FORMAT.md) with the pages it carries removed, so that a VM restored
/// from it must read every page from the peer; read here from the format as documented.
fn without_sent_pages(head: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let word = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap()) as usize;
    let (metadata, nonzero, sent) = (word(24), word(32), word(40));
    let runs_at = 56 + metadata;
    let sent_pages: usize = (0..sent).map(|i| word(runs_at + 16 * nonzero + 16 * i + 8)).sum();
    let volume_at = runs_at + 16 * (nonzero + sent) + 4096 * sent_pages;
    let mut out = head[..runs_at + 16 * nonzero].to_vec();
    out[40..48].copy_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&head[volume_at..head.len() - 32]);
    let checksum = Sha256::digest(&out);
    out.extend_from_slice(&checksum);
    out
}

/// Issue 31: a node restores a VM from an image another node's `thaw serve` holds, reading its
/// memory from there as the guest touches it. The image routes are admin routes.
#[test]
fn a_vm_restored_from_a_peer_reads_its_memory_from_there_and_answers_alike() {
    let state = tempfile::tempdir().unwrap();
    let token = state.path().join("token");
    std::fs::write(&token, "node-secret-of-the-cluster\n").unwrap();
    let token = token.to_str().unwrap();
    let peer = Server::start(state.path(), &["--admin-token-file", token]);
    let deployed = reply(
        agent()
            .put(peer.functions("hello"))
            .header("Authorization", "Bearer node-secret-of-the-cluster")
            .send(&example("hello")[..]),
    );
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    let image = format!("{}/v1/images/{}", peer.url, version(&deployed.body));
    let dir = tempfile::tempdir().unwrap();
    let responses = dir.path().join("responses.jsonl");
    let restore = |extra: &[&str]| {
        let mut args = vec!["restore", &image, "--data", r#"{"name":"peer"}"#];
        args.extend_from_slice(extra);
        run_thaw(&args)
    };

    let run = restore(&["--token-file", token, "--count", "12", "--json", "--responses", responses.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    let stats: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(stats["source"], "peer");
    assert_eq!(stats["statuses"]["ok"], 12, "{stats}");
    let remote = &stats["remote"];
    let read = remote["demand_pages"].as_u64().unwrap() + remote["prefetched_pages"].as_u64().unwrap();
    assert!(read > 0, "the memory the head did not carry came from the peer: {remote}");
    let answers = std::fs::read_to_string(&responses).unwrap();
    assert_eq!(answers.matches(r#""stdout":"{\"greeting\":\"Hello, peer!\"}\n""#).count(), 12, "{answers}");
    let pooled = restore(&["--token-file", token, "--mode", "pool", "--count", "4"]);
    assert_eq!(pooled.code, Some(0), "{}", pooled.stderr);

    let untokened = restore(&[]);
    assert_eq!(untokened.code, Some(125));
    assert!(
        untokened.stderr.contains("the peer answered 401 Unauthorized: this route needs Authorization: Bearer"),
        "{}",
        untokened.stderr
    );
    let kept = restore(&["--token-file", token, "--mode", "reset"]);
    assert!(kept.stderr.contains("--mode reset needs the image on this machine"), "{}", kept.stderr);
    let elsewhere = run_thaw(&[
        "restore",
        &format!("{}/v1/images/{}", peer.url, "0".repeat(64)),
        "--token-file",
        token,
        "--data",
        "{}",
    ]);
    assert!(
        elsewhere.stderr.contains("the peer answered 404 Not Found: no function here serves version 0000"),
        "{}",
        elsewhere.stderr
    );
}

/// Issue 31: a function deployed on one node is deployed on a second, which has never seen it,
/// by naming the first's image. The second answers at once from the first's memory, then stores
/// the image as it arrives and serves its own copy, which stays when the first is gone. A node
/// whose peer sends no pages refuses the deploy within the request's timeout, saying why.
#[test]
fn a_node_deployed_from_a_peer_answers_at_once_then_from_its_own_copy() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "node-secret-of-the-cluster\n").unwrap();
    let token = token.to_str().unwrap();
    let (a_state, b_state) = (dir.path().join("a"), dir.path().join("b"));
    let a = Server::start(&a_state, &["--admin-token-file", token]);
    let b = Server::start(&b_state, &["--admin-token-file", token]);
    let deployed = a.thaw(&["deploy", "hello", "--token-file", token, "--json", &example_path(&dir, "hello")]);
    assert_eq!(deployed.code, Some(0), "{}", deployed.stderr);
    let shown: serde_json::Value = serde_json::from_str(&deployed.stdout).unwrap();
    let version = shown["function"]["version"].as_str().unwrap().to_string();
    let image = format!("{}/v1/images/{version}", a.url);

    let from_peer = b.thaw(&["deploy", "hello", &image, "--token-file", token]);
    assert_eq!(from_peer.code, Some(0), "{}{}", from_peer.stdout, from_peer.stderr);
    assert!(from_peer.stderr.contains("restored by the server from that peer"), "{}", from_peer.stderr);
    let invoke = |server: &Server| post(&format!("{}/invoke", server.functions("hello")), br#"{"name":"b"}"#);
    let first = invoke(&b);
    assert_eq!((first.status, first.body.as_str()), (200, "{\"greeting\":\"Hello, b!\"}\n"));
    let stored = b_state.join("images").join(format!("{version}.snap"));
    let started = Instant::now();
    while !(stored.exists() && get(&b.functions("hello")).body.contains(r#""state":"serving""#)) {
        assert!(started.elapsed() < Duration::from_secs(60), "never served from its own copy: {}", b.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b.log().contains("its image arrived whole from its peer: served from the stored image"), "{}", b.log());
    drop(a.kill());
    let after = invoke(&b);
    assert_eq!((after.status, after.body.as_str()), (200, "{\"greeting\":\"Hello, b!\"}\n"), "{}", b.log());
    // The version is here now: another name at it fetches nothing from the peer, which is gone.
    let again = b.thaw(&["deploy", "hello2", &image, "--token-file", token, "--set", "mode=fresh"]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert_eq!(invoke_named(&b, "hello2").status, 200);

    // A peer whose pages never come: the deploy is refused within twice the request's timeout.
    let c = Server::start(&dir.path().join("c"), &["--admin-token-file", token]);
    // b serves the version it now holds to peers in turn.
    let real = restore_head(&b, &version, "Bearer node-secret-of-the-cluster");
    let bare = without_sent_pages(&real);
    let hostile = hostile_peer(move |path| {
        if path.ends_with("/head") { Some((200, bare.clone())) } else { Some((500, br#"{"error":"gone"}"#.to_vec())) }
    });
    let started = Instant::now();
    let refused = c.thaw(&[
        "deploy",
        "hello",
        &format!("{hostile}/v1/images/{version}"),
        "--token-file",
        token,
        "--set",
        "timeout_ms=1000",
    ]);
    assert_eq!(refused.code, Some(125), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("reading guest pages 0x") && refused.stderr.contains("the peer answered 500"),
        "{}",
        refused.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    // With b named as a second holder, the same deploy reads its pages from b.
    let holders = format!("{hostile}/v1/images/{version}\n{}/v1/images/{version}\n", b.url);
    let both = reply(
        agent()
            .put(c.functions("hello"))
            .header("Authorization", "Bearer node-secret-of-the-cluster")
            .header("content-type", REFERENCE)
            .send(holders.as_bytes()),
    );
    assert_eq!(both.status, 201, "{}", both.body);
    assert_eq!(invoke_named(&c, "hello").status, 200, "{}", c.log());
}

/// POSTs `{"name":"b"}` to `name` on `server`.
fn invoke_named(server: &Server, name: &str) -> Reply {
    post(&format!("{}/invoke", server.functions(name)), br#"{"name":"b"}"#)
}

/// The example `name`'s bundle, written into `dir`; its path.
fn example_path(dir: &tempfile::TempDir, name: &str) -> String {
    let path = dir.path().join(format!("{name}.thaw"));
    std::fs::write(&path, example(name)).unwrap();
    path.to_str().unwrap().to_string()
}

/// A peer that sends a damaged head, answers pages with errors or short bodies, dies after its
/// head, or stops answering: each fails the restore with one line saying so, within the
/// request's timeout, and no VM runs on a page that did not arrive.
#[test]
fn a_hostile_or_dying_peer_fails_the_restore_with_one_line_and_never_zeros() {
    let state = tempfile::tempdir().unwrap();
    let peer = Server::start(state.path(), &[]);
    let deployed = put(&peer.functions("hello"), &example("hello"));
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    let version = version(&deployed.body);
    let real = restore_head(&peer, &version, "");
    let bare = without_sent_pages(&real);
    let restore = |url: &str| {
        let started = Instant::now();
        let run = run_thaw(&["restore", &format!("{url}/v1/images/{version}"), "--data", "{}", "--timeout", "2"]);
        (run, started.elapsed())
    };
    let serving = |head: Vec<u8>, pages: PageAnswer| {
        hostile_peer(move |path| if path.ends_with("/head") { Some((200, head.clone())) } else { pages() })
    };

    let mut flipped = real.clone();
    flipped[100] ^= 1;
    let (run, _) = restore(&serving(flipped, || None));
    assert!(run.stderr.contains("/head: restore head: its SHA-256 does not match"), "{}", run.stderr);
    let (run, _) = restore(&serving(real[..real.len() / 2].to_vec(), || None));
    assert!(run.stderr.contains("restore head: its SHA-256 does not match"), "{}", run.stderr);
    let (run, _) = restore(&serving(real[..20].to_vec(), || None));
    assert!(run.stderr.contains("shorter than its fixed part"), "{}", run.stderr);

    let cases: [(&str, PageAnswer, &str); 4] = [
        (
            "errors",
            || Some((500, br#"{"error":"disk on fire"}"#.to_vec())),
            "the peer answered 500 Internal Server Error: disk on fire",
        ),
        ("short pages", || Some((200, vec![1; 100])), "100 bytes for"),
        ("closes", || None, "reading guest pages 0x"),
        ("stalls", || Some((0, Vec::new())), "the peer sent nothing for 1s"),
    ];
    for (what, pages, expected) in cases {
        let (run, took) = restore(&serving(bare.clone(), pages));
        assert_eq!(run.code, Some(125), "{what}: {}{}", run.stdout, run.stderr);
        assert!(
            run.stderr.starts_with("thaw: error: a restored VM failed: restoring from peer http://"),
            "{what}: {}",
            run.stderr
        );
        assert!(run.stderr.contains(expected), "{what}: {}", run.stderr);
        assert_eq!(run.stderr.lines().count(), 1, "{what}: {}", run.stderr);
        assert!(took < Duration::from_secs(20), "{what}: {took:?}");
    }

    // Another holder of the version takes over the reads of one that closes on every page.
    let closing = serving(bare.clone(), || None);
    let holder = format!("{}/v1/images/{version}", peer.url);
    let image = format!("{closing}/v1/images/{version}");
    let responses = state.path().join("responses.jsonl");
    let answered = ["--data", r#"{"name":"peer"}"#, "--responses", responses.to_str().unwrap()];
    let run = run_thaw(&[&["restore", &image, "--holder", &holder][..], &answered].concat());
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    let answers = std::fs::read_to_string(&responses).unwrap();
    assert!(answers.contains(r#"\"greeting\":\"Hello, peer!\""#), "{answers}");

    // The peer dies after its head: the restore fails, it does not hang or run on zeros.
    let dying = Mutex::new(Some(peer));
    let url = hostile_peer(move |path| {
        if path.ends_with("/head") {
            return Some((200, bare.clone()));
        }
        dying.lock().unwrap().take().map(Server::kill);
        None
    });
    let (run, took) = restore(&url);
    assert_eq!(run.code, Some(125), "{}", run.stderr);
    assert!(run.stderr.contains("reading guest pages 0x"), "{}", run.stderr);
    assert!(took < Duration::from_secs(20), "{took:?}");
}

/// Issue 31: `thaw deploy NAME REF` has the server pull the bundle from a real OCI registry
/// (through its registry puller: the agent itself opens no IP socket), snapshot and serve it; a
/// deploy of a digest the agent serves already, under that name or another, downloads nothing;
/// a snapshot image, a tag the registry lacks and a body that is no reference are refused, each
/// saying why.
#[test]
fn a_bundle_is_deployed_by_reference_from_an_oci_registry() {
    let registry = common::Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    assert_eq!(run_thaw(&["pack", "--example", "hello", "-o", &at("hello.thaw")]).code, Some(0));
    assert_eq!(run_thaw(&["snapshot", &at("hello.thaw"), "-o", &at("hello.snap")]).code, Some(0));
    let (bundle, image) =
        (format!("{}/functions/hello:v1", registry.address), format!("{}/functions/hello-image:v1", registry.address));
    for (file, reference) in [("hello.thaw", &bundle), ("hello.snap", &image)] {
        let pushed = run_thaw(&["push", &at(file), reference]);
        assert_eq!(pushed.code, Some(0), "{}", pushed.stderr);
    }
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);

    let run = server.thaw(&["deploy", "hello", &bundle, "--set", "mode=reset"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.starts_with("hello created: version "), "{}", run.stdout);
    let version = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(std::fs::read(at("hello.thaw")).unwrap()));
    assert!(run.stdout.contains(&version), "the version is the bundle's digest: {}", run.stdout);
    let answer = server.thaw(&["call", "hello", "--data", r#"{"name": "registry"}"#]);
    assert_eq!(answer.stdout, "{\"greeting\":\"Hello, registry!\"}\n", "{}", answer.stderr);
    assert!(server.log().contains("pulled"), "{}", server.log());

    let again = server.thaw(&["deploy", "hello", &bundle, "--set", "mode=reset"]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert!(again.stdout.starts_with("hello unchanged"), "{}", again.stdout);
    assert!(server.log().contains("held already: nothing pulled"), "{}", server.log());

    let put_reference = |name: &str, body: &str| put_typed(&server.functions(name), REFERENCE, body);
    let refused = put_reference("image", &image);
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("is a snapshot image: thaw serve deploys bundles by reference"), "{}", refused.body);
    let missing = put_reference("missing", &format!("{}/functions/hello:v9", registry.address));
    assert_eq!(missing.status, 400, "{}", missing.body);
    assert!(missing.body.contains("the registry answered 404"), "{}", missing.body);
    let nonsense = put_reference("nonsense", "not a reference");
    assert_eq!(nonsense.status, 400, "{}", nonsense.body);
    assert!(nonsense.body.contains("is not a registry reference"), "{}", nonsense.body);
    let empty = put_reference("empty", "");
    assert_eq!(empty.status, 400, "{}", empty.body);
    assert!(empty.body.contains("is one registry reference"), "{}", empty.body);
    // Under another name, with other settings, the bundle is not pulled again either: the
    // function is served from the image the agent holds for its digest.
    let other = put_typed(&format!("{}?mode=pool", server.functions("other")), REFERENCE, &bundle);
    assert_eq!(other.status, 201, "{}", other.body);
    assert!(other.body.contains(&version) && other.body.contains(r#""mode":"pool""#), "{}", other.body);
    let answer = post(&format!("{}/invoke", server.functions("other")), br#"{"name": "b"}"#);
    assert_eq!((answer.status, answer.body.as_str()), (200, "{\"greeting\":\"Hello, b!\"}\n"));
    let log = server.log();
    let lines = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!((lines("bytes="), lines("held already: nothing pulled")), (1, 2), "{log}");
}

/// A command deployed as a bare wasm with `init_until_read=true` answers every call from its
/// snapshot with the table its start-up built once (issue 30); a reactor cannot take it.
#[test]
fn a_command_deployed_with_init_until_read_keeps_its_start_up_in_the_snapshot() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let wasm = std::fs::read(env!("CARGO_BIN_FILE_FIXTURE_STARTUP_TABLE_startup_table")).unwrap();
    let url = format!("{}?mode=reset&memory=64&init_until_read=true", server.functions("primes"));
    let deployed = put(&url, &wasm);
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    assert!(server.log().contains("startup-table: 664579 primes below 10000000"), "{}", server.log());
    let mut tables = std::collections::HashSet::new();
    for (n, prime) in [(1, 2), (10, 29), (664_579, 9_999_991)] {
        let answer = post(&format!("{}/invoke", server.functions("primes")), n.to_string().as_bytes());
        assert_eq!(answer.status, 200, "{}", answer.body);
        let fields: Vec<&str> = answer.body.split_whitespace().collect();
        assert_eq!(fields.get(2), Some(&prime.to_string().as_str()), "{}", answer.body);
        tables.insert(fields[0].to_string());
    }
    assert_eq!(tables.len(), 1, "the start-up ran once, before the snapshot: {tables:?}");

    let reactor = put(&format!("{}?init_until_read=true", server.functions("reactor")), &fixture("scribble.wat"));
    assert_eq!(reactor.status, 400, "{}", reactor.body);
    assert!(reactor.body.contains("init until the first read applies to commands"), "{}", reactor.body);
}

/// Issue 29: a JavaScript module PUT with `Content-Type: text/javascript` is packed by the server
/// with the JavaScript defaults and the query's settings; a module that does not parse is refused
/// with its file, line and message; JavaScript sent without that type is refused, saying so.
#[test]
fn a_javascript_module_uploaded_over_http_is_packed_by_the_server() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let source = "const table = new Map([[\"a\", 1], [\"b\", 2]]);\nexport function handle(request) {\n  const { key } = JSON.parse(request);\n  return { key, value: table.get(key) ?? null };\n}\n";
    let deployed =
        put_typed(&format!("{}?mode=pool", server.functions("lookup")), "text/javascript; charset=utf-8", source);
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    assert!(deployed.body.contains(r#""mode":"pool""#), "{}", deployed.body);
    for (key, value) in [("a", "1"), ("b", "2"), ("z", "null")] {
        let answer =
            post(&format!("{}/invoke", server.functions("lookup")), format!(r#"{{"key":"{key}"}}"#).as_bytes());
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (200, format!(r#"{{"key":"{key}","value":{value}}}"#).as_str())
        );
    }
    let again = put_typed(&format!("{}?mode=pool", server.functions("lookup")), "application/javascript", source);
    assert!(again.body.contains(r#""deployment":"unchanged""#), "{}", again.body);

    let broken =
        put_typed(&server.functions("broken"), "text/javascript", "export function handle(r) {\n  return r +;\n}\n");
    assert_eq!(broken.status, 422, "{}", broken.body);
    assert!(broken.body.contains("SyntaxError") && broken.body.contains("/app/broken.mjs:2"), "{}", broken.body);

    let small = put_typed(&format!("{}?memory=1", server.functions("small")), "text/javascript", source);
    assert_eq!(small.status, 400, "{}", small.body);
    assert!(small.body.contains("more than the 1 MiB the function may use"), "{}", small.body);

    let untyped = put_typed(&server.functions("untyped"), "application/octet-stream", source);
    assert_eq!(untyped.status, 400, "{}", untyped.body);
    assert!(untyped.body.contains("Content-Type: text/javascript"), "{}", untyped.body);
}

#[test]
fn a_thousand_concurrent_requests_across_three_modes_are_each_answered_or_refused_with_why() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let hello = example("hello");
    for (name, mode) in [("r", "reset"), ("p", "pool"), ("f", "fresh")] {
        assert_eq!(put(&format!("{}?mode={mode}", server.functions(name)), &hello).status, 201);
    }
    let start = Arc::new(std::sync::Barrier::new(1001));
    let clients: Vec<_> = (0..1000)
        .map(|i| {
            let url = format!("{}/invoke", server.functions(["r", "p", "f"][i % 3]));
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                (i, post(&url, format!("{{\"name\": \"n{i}\"}}").as_bytes()))
            })
        })
        .collect();
    start.wait();
    let (mut answered, mut refused) = (0, 0);
    for client in clients {
        let (i, reply) = client.join().unwrap();
        match reply.status {
            200 => {
                assert_eq!(
                    reply.body,
                    format!("{{\"greeting\":\"Hello, n{i}!\"}}\n"),
                    "request {i} got another's answer"
                );
                answered += 1;
            }
            429 => {
                assert!(reply.body.contains("queue of 64 requests is full"), "{}", reply.body);
                assert_eq!(reply.headers["retry-after"], "1");
                refused += 1;
            }
            status => panic!("request {i}: {status} {}", reply.body),
        }
    }
    assert_eq!(answered + refused, 1000);
    assert!(answered >= 3 * 64, "each function queues 64 and serves 2 at once: {answered} answered");

    let text = get(&format!("{}/metrics", server.url)).body;
    let total = |outcome: &str| -> f64 {
        ["r", "p", "f"]
            .iter()
            .map(|f| metric(&text, &format!(r#"thaw_requests_total{{function="{f}",outcome="{outcome}"}}"#)))
            .sum()
    };
    assert_eq!(total("ok"), f64::from(answered));
    assert_eq!(total("rejected"), f64::from(refused));
    assert_eq!(total("vm_failure") + total("timeout") + total("function_error"), 0.0);
}

#[test]
fn under_traffic_a_redeploy_switches_versions_and_a_delete_ends_in_404() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let deployed = put(&format!("{}?mode=pool&queue=1000", server.functions("p")), &example("hello"));
    let v1 = version(&deployed.body);
    // The same function with another sample request is another version.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.thaw");
    let run = run_thaw(&["pack", "--example", "hello", "--sample-data", "{}", "-o", other.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    let other = std::fs::read(other).unwrap();

    let url = format!("{}/invoke", server.functions("p"));
    let callers: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut served = Vec::new();
                loop {
                    let sent = Instant::now();
                    let reply = post(&url, format!("{{\"name\": \"d{i}\"}}").as_bytes());
                    match reply.status {
                        200 => {
                            assert_eq!(reply.body, format!("{{\"greeting\":\"Hello, d{i}!\"}}\n"));
                            served.push((sent, reply.headers["x-thaw-version"].to_str().unwrap().to_string()));
                        }
                        404 => return served,
                        status => panic!("{status}: {}", reply.body),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let redeployed = put(&format!("{}?mode=pool&queue=1000", server.functions("p")), &other);
    assert_eq!(redeployed.status, 200, "{}", redeployed.body);
    let switched = Instant::now();
    let v2 = version(&redeployed.body);
    assert_ne!(v1, v2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(delete(&server.functions("p")).status, 200);

    let served: Vec<(Instant, String)> = callers.into_iter().flat_map(|c| c.join().unwrap()).collect();
    assert!(served.iter().any(|(_, v)| *v == v1) && served.iter().any(|(_, v)| *v == v2));
    for (sent, version) in &served {
        assert!(*sent < switched || *version == v2, "a request sent after the switch was served by the old version");
    }
    assert_eq!(get(&server.functions("p")).status, 404);
}

/// Sends one HTTP/1.1 request over the Unix socket at `socket` and returns the whole answer.
fn unix_request(socket: &Path, method: &str, path: &str, body: &[u8]) -> String {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: thaw\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// Issue 14, least privilege: `thaw serve` needs only `/dev/kvm`, its state directory and its
/// socket. Here it runs in the sandbox the README's systemd unit asks for, built with
/// bubblewrap and setpriv because this kind of machine has no systemd as PID 1:
/// - a user of its own (nobody), with no capabilities and no way to gain any (no new privileges);
/// - a read-only root (ProtectSystem=strict) and a private /tmp;
/// - no device but `/dev/kvm` (a node of its own, owned by that user);
/// - only the state directory writable;
/// - private PID, IPC, UTS and network namespaces.
///
/// Under all of that, and its own seccomp filter, it deploys, serves and stops cleanly.
#[test]
fn serve_runs_as_an_unprivileged_user_in_the_systemd_units_sandbox() {
    let found = |tool: &str| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found("bwrap"), "this test needs bubblewrap (apt-get install bubblewrap)");
    assert!(found("setpriv"), "this test needs setpriv (util-linux)");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let kvm = dir.path().join("kvm");
    let made = |program: &str, args: &[&str]| {
        let status = Command::new(program).args(args).status().unwrap();
        assert!(status.success(), "{program} {args:?}: {status:?}");
    };
    made("mknod", &["-m", "600", kvm.to_str().unwrap(), "c", "10", "232"]);
    made("chown", &["-R", "65534:65534", state.to_str().unwrap(), kvm.to_str().unwrap()]);
    let mut child = Command::new("bwrap")
        .args(["--ro-bind", "/", "/", "--dev", "/dev", "--dev-bind", kvm.to_str().unwrap(), "/dev/kvm"])
        .args(["--tmpfs", "/tmp", "--perms", "0755", "--dir", "/tmp/thaw"])
        .args(["--bind", state.to_str().unwrap(), "/tmp/thaw/state", "--ro-bind", THAW, "/tmp/thaw/thaw"])
        .args(["--proc", "/proc", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net"])
        .args(["--die-with-parent", "--new-session", "--"])
        .args(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs"])
        .args(["--bounding-set=-all", "--inh-caps=-all", "/tmp/thaw/thaw", "serve"])
        .args(["--listen", "unix:/tmp/thaw/state/thaw.sock", "--state-dir", "/tmp/thaw/state"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let socket = state.join("thaw.sock");
    let started = Instant::now();
    while !socket.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut log = String::new();
            child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
            panic!("thaw serve ended in the sandbox: {status:?}: {log}");
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no socket from the sandboxed server");
        std::thread::sleep(Duration::from_millis(20));
    }
    let deployed = unix_request(&socket, "PUT", "/v1/functions/hello", &example("hello"));
    assert!(deployed.starts_with("HTTP/1.1 201"), "{deployed}");
    let answer = unix_request(&socket, "POST", "/v1/functions/hello/invoke", br#"{"name": "sandbox"}"#);
    assert!(answer.ends_with("{\"greeting\":\"Hello, sandbox!\"}\n"), "{answer}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(state.join("thaw.db")).unwrap().uid(),
        65534,
        "the store belongs to the service's user"
    );
    // SIGTERM to the server inside the sandbox (bwrap is the namespace's init, not the server).
    made("pkill", &["-TERM", "-f", "^/tmp/thaw/thaw serve"]);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Issue 28, defect 11: out of descriptors, the accept loop fails every 10 ms until a
/// connection closes; it says so at most once a second, with how many failures it did not log.
#[test]
fn out_of_descriptors_the_accept_loop_logs_once_a_second() {
    let state = tempfile::tempdir().unwrap();
    let (mut child, log, listening) =
        spawn_with_file_limit(64, &["serve", "--listen", "127.0.0.1:0", "--state-dir", state.path().to_str().unwrap()]);
    let address = listening.strip_prefix("http://").unwrap().to_string();
    let held: Vec<_> = (0..100).filter_map(|_| std::net::TcpStream::connect(&address).ok()).collect();
    std::thread::sleep(Duration::from_millis(2500));
    let failures = log.lock().unwrap().matches("accepting a connection failed").count();
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
    let log = log.lock().unwrap().clone();
    assert!((1..=4).contains(&failures), "{failures} lines in 2.5 s: {log}");
    assert!(log.contains("also_failed"), "{log}");
}

/// Issue 28, defect 5: a second agent on a state directory or a Unix socket that a live agent
/// uses is refused with one line, and the first serves on, its socket still there.
#[test]
fn two_agents_never_share_a_state_directory_or_a_socket() {
    let state = tempfile::tempdir().unwrap();
    let first = Server::start(state.path(), &[]);
    assert_eq!(put(&first.functions("hello"), &example("hello")).status, 201);
    let second = run_thaw(&["serve", "--listen", "127.0.0.1:0", "--state-dir", state.path().to_str().unwrap()]);
    assert_eq!(second.code, Some(125), "{}", second.stderr);
    assert_eq!(second.stderr.lines().count(), 1, "{}", second.stderr);
    assert!(second.stderr.contains("another thaw serve uses the state directory"), "{}", second.stderr);
    let answer = post(&format!("{}/invoke", first.functions("hello")), br#"{"name": "first"}"#);
    assert_eq!((answer.status, answer.body.as_str()), (200, "{\"greeting\":\"Hello, first!\"}\n"));
    drop(first);

    let socket = state.path().join("thaw.sock");
    let address = format!("unix:{}", socket.display());
    let (child, log, _) = spawn(&["serve", "--listen", &address, "--state-dir", state.path().to_str().unwrap()]);
    let _first = Server { child, url: String::new(), log };
    let other_state = tempfile::tempdir().unwrap();
    let second = run_thaw(&["serve", "--listen", &address, "--state-dir", other_state.path().to_str().unwrap()]);
    assert_eq!(second.code, Some(125), "{}", second.stderr);
    assert!(second.stderr.contains("another process accepts connections on it"), "{}", second.stderr);
    let answer = unix_request(&socket, "POST", "/v1/functions/hello/invoke", br#"{"name": "still"}"#);
    assert!(answer.ends_with("{\"greeting\":\"Hello, still!\"}\n"), "{answer}");
}

/// Issue 28, defect 3: a request's limit bounds requests, not readying a VM, so a function
/// with a 1 ms limit still serves after a restart; the deploy's init limit is a setting.
#[test]
fn a_request_limit_does_not_bound_readying_and_the_init_limit_is_a_setting() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let hello = example("hello");
    for mode in ["reset", "pool"] {
        let deployed = put(&format!("{}?mode={mode}&timeout_ms=1", server.functions(mode)), &hello);
        assert_eq!(deployed.status, 201, "{mode}: {}", deployed.body);
    }
    let heavy = example("heavy-init");
    let cut_short = put(&format!("{}?init_timeout_ms=1", server.functions("heavy")), &heavy);
    assert_eq!(cut_short.status, 422, "{}", cut_short.body);
    assert!(cut_short.body.contains("timed out"), "{}", cut_short.body);
    let refused = put(&format!("{}?init_timeout_ms=0", server.functions("heavy")), &heavy);
    assert_eq!(refused.status, 400, "{}", refused.body);
    let deployed = put(&format!("{}?init_timeout_ms=30000", server.functions("heavy")), &heavy);
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    assert!(deployed.body.contains(r#""init_timeout_ms":30000"#), "{}", deployed.body);
    server.kill();

    let server = Server::start(state.path(), &[]);
    for name in ["reset", "pool", "heavy"] {
        let shown = get(&server.functions(name));
        assert!(shown.body.contains(r#""state":"serving""#), "{name}: {}\n{}", shown.body, server.log());
    }
}

/// The agent's resident memory: now, and at its peak, in MiB.
fn rss_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_default();
        line.split_whitespace().nth(1).and_then(|kib| kib.parse::<u64>().ok()).unwrap_or(0) / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Issue 28, defect 1: forty connections each sending 15 of a declared 16 MiB and holding, to a
/// function that does not exist and to one that does, once left the agent at 631 MB (646 MiB
/// here with the budget raised out of the way). A request's route, function and queue are
/// decided before its body is read, a refused body is dropped as it arrives, and the bodies
/// held at once have a budget (64 MiB by default): past it, 503 with Retry-After.
#[test]
fn forty_unfinished_sixteen_mib_bodies_keep_the_agent_small() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &["--read-timeout", "20"]);
    assert_eq!(put(&server.functions("hello"), &example("hello")).status, 201);
    let address = server.url.strip_prefix("http://").unwrap().to_string();
    let pid = server.child.id();
    let (before, _) = rss_mib(pid);
    let mut held = Vec::new();
    let mut answers = Vec::new();
    for target in ["nope", "hello"] {
        for _ in 0..40 {
            let stream = std::net::TcpStream::connect(&address).unwrap();
            let mut writer = stream.try_clone().unwrap();
            let head = format!(
                "POST /v1/functions/{target}/invoke HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\n\r\n",
                16 << 20
            );
            held.push(std::thread::spawn(move || {
                let _ = writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(&vec![b'x'; 15 << 20]));
                writer
            }));
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            answers.push((target, stream));
        }
    }
    // Every writer has sent what it will, or been cut off; the admitted ones now wait.
    let writers: Vec<_> = held.into_iter().map(|w| w.join().unwrap()).collect();
    let (now, peak) = rss_mib(pid);
    let mut statuses = std::collections::BTreeMap::<(&str, String), usize>::new();
    for (target, mut stream) in answers {
        let mut head = [0u8; 12];
        let status = match stream.read_exact(&mut head) {
            Ok(()) => String::from_utf8_lossy(&head[9..12]).into_owned(),
            Err(_) => "none".into(),
        };
        *statuses.entry((target, status)).or_default() += 1;
    }
    drop(writers);
    eprintln!("the agent's RSS: {before} MiB before, {now} MiB after, {peak} MiB at the peak; {statuses:?}");
    assert!(peak < 200, "{before} MiB before, {now} MiB after, {peak} MiB at the peak; {statuses:?}");
    assert_eq!(statuses.get(&("nope", "404".into())), Some(&40), "{statuses:?}");
    // At most four 16 MiB bodies fit the budget: they wait for the rest (no answer yet).
    let busy = statuses.get(&("hello", "503".into())).copied().unwrap_or(0);
    assert!(busy >= 36, "{statuses:?}");
}

/// Issue 28, defect 1: past `--max-connections`, a client waits in the listen backlog until a
/// connection closes.
#[test]
fn past_the_connection_limit_clients_wait_for_a_slot_in_the_backlog() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &["--max-connections", "4"]);
    let address: std::net::SocketAddr = server.url.strip_prefix("http://").unwrap().parse().unwrap();
    let mut idle: Vec<_> = (0..4).map(|_| std::net::TcpStream::connect(address).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    // More than the 128 that std and tokio ask the kernel to queue: past that, connecting
    // stalls, and a burst of clients (the thousand-request test) saw resets.
    let mut waiting: Vec<_> = (0..300)
        .map(|i| {
            let mut client = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("client {i} could not join the backlog: {e}"));
            client
                .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").as_bytes())
                .unwrap();
            client
        })
        .collect();
    let first = &mut waiting[0];
    first.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut answer = String::new();
    assert!(first.read_to_string(&mut answer).is_err() && answer.is_empty(), "answered past the limit: {answer}");
    idle.pop();
    for (i, client) in waiting.iter_mut().enumerate() {
        let mut answer = String::new();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client.read_to_string(&mut answer).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"), "client {i}: {answer}");
    }
}

/// Issue 28, defect 4: an image cut short under a serving version made every invoke fail while
/// its state said `serving`, and a redeploy of the same content answered "unchanged". Now the
/// state says failed, and the redeploy snapshots it again and serves.
#[test]
fn a_redeploy_repairs_a_damaged_stored_image() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(state.path(), &[]);
    let hello = example("hello");
    let deployed = put(&server.functions("hello"), &hello);
    assert_eq!(deployed.status, 201, "{}", deployed.body);
    let image = state.path().join("images").join(format!("{}.snap", version(&deployed.body)));
    std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(8192).unwrap();
    let shown = get(&server.functions("hello"));
    assert!(shown.body.contains(r#""state":"failed: its stored image was cut short"#), "{}", shown.body);

    let repaired = put(&server.functions("hello"), &hello);
    assert_eq!(repaired.status, 200, "{}", repaired.body);
    assert!(repaired.body.contains(r#""deployment":"updated""#), "{}", repaired.body);
    assert!(repaired.body.contains(r#""state":"serving""#), "{}", repaired.body);
    assert!(std::fs::metadata(&image).unwrap().len() > 8192, "the image was not written again");
    for _ in 0..3 {
        let answer = post(&format!("{}/invoke", server.functions("hello")), br#"{"name": "mended"}"#);
        assert_eq!((answer.status, answer.body.as_str()), (200, "{\"greeting\":\"Hello, mended!\"}\n"));
    }
    // Unchanged again once whole.
    assert!(put(&server.functions("hello"), &hello).body.contains(r#""deployment":"unchanged""#));
}

/// Issue 28, defect 8: a deploy whose image does not fit the state directory's disk is the
/// server's failure (507), not the function's (422). The state directory is a 1 MiB tmpfs in a
/// mount namespace of the agent's own.
#[test]
fn a_full_disk_on_deploy_is_the_server_s_failure() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let script = format!("mount -t tmpfs -o size=1m thaw-full {} && exec \"$0\" \"$@\"", state.display());
    let (child, log, listening) = spawn_command(
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script, THAW]).args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
        ]),
    );
    let server = Server { child, url: listening, log };
    let full = put(&server.functions("hello"), &example("hello"));
    assert_eq!(full.status, 507, "{}", full.body);
    assert!(
        full.body.contains("the server's disk is full") && full.body.contains("No space left on device"),
        "{}",
        full.body
    );
    assert!(!full.body.contains(".tmp"), "the scratch directory's path leaked: {}", full.body);
    assert_eq!(get(&server.functions("hello")).status, 404, "a failed deploy deploys nothing");
}
