//! JavaScript functions (issue 29): modules written here, packed by `thaw pack` with the runtime
//! built into thaw (QuickJS-NG), answered under KVM and under QEMU, from a cold boot and from
//! their snapshot in every serving mode.

use std::path::Path;
use std::process::Command;

mod common;

use common::{Run, both, function, restore, run_thaw, snapshot};

/// The exit code of a function that failed (the runtime traps after writing the error).
const FAILED: i32 = abi::exit_code::FUNCTION_TRAPPED as i32;

/// Packs `input` (a directory or a file) with `extra` flags into `out`.
fn pack(input: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["pack", input.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_thaw(&args)
}

/// Packs the function in `dir` and returns its bundle's path.
fn packed(dir: &Path) -> String {
    let out = dir.join("function.thaw");
    let run = pack(dir, &out, &[]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    out.to_str().unwrap().to_string()
}

/// A function as a new user writes one: a table built at the top level, a helper imported from
/// another of its files, a JSON request and a JSON answer.
const GREETER: &[(&str, &str)] = &[
    (
        "index.mjs",
        r#"import { greet } from "./lib/greet.js";
const squares = new Map();
for (let i = 0; i < 1000; i++) squares.set(i, i * i);
console.log("built", squares.size, "squares");
export function handle(request) {
  const { name, n } = JSON.parse(request);
  return { greeting: greet(name), square: squares.get(n) };
}
"#,
    ),
    ("lib/greet.js", "export const greet = (name) => `Hello, ${name}!`;\n"),
];

#[test]
fn a_javascript_function_answers_with_its_own_modules_under_kvm_and_qemu() {
    let dir = function(GREETER);
    let bundle = packed(dir.path());
    for (name, n) in [("ada", 12), ("grace", 999)] {
        let run = both(&bundle, &format!(r#"{{"name": "{name}", "n": {n}}}"#));
        assert_eq!(run.code, Some(0), "{run:#?}");
        assert_eq!(run.stdout, format!(r#"{{"greeting":"Hello, {name}!","square":{}}}"#, n * n));
        assert_eq!(run.stderr, "built 1000 squares\n", "console writes to stderr: {run:#?}");
    }
    let shown = run_thaw(&["inspect", &bundle]);
    assert!(shown.stdout.contains("THAW_JS_ENTRY=/app/index.mjs"), "{shown:#?}");
    assert!(shown.stdout.contains("128 MiB of linear memory"), "the JavaScript default: {shown:#?}");
}

#[test]
fn answers_are_strings_bytes_json_or_nothing_and_a_promise_is_awaited() {
    let dir = function(&[(
        "index.js",
        r#"export default async function (request) {
  await Promise.resolve();
  switch (request) {
    case "string": return "plain text";
    case "bytes": return new Uint8Array([0x68, 0x69, 0x00, 0xff]);
    case "buffer": return new Uint8Array([0x6f, 0x6b]).buffer;
    case "nothing": return undefined;
    default: return { request, list: [1, "two", null] };
  }
}
"#,
    )]);
    let bundle = packed(dir.path());
    let answer = |data: &str| {
        let output = Command::new(common::THAW).args(["invoke", &bundle, "--data", data]).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
        output.stdout
    };
    assert_eq!(answer("string"), b"plain text");
    assert_eq!(answer("bytes"), b"hi\x00\xff");
    assert_eq!(answer("buffer"), b"ok");
    assert_eq!(answer("nothing"), b"");
    assert_eq!(answer("other"), br#"{"request":"other","list":[1,"two",null]}"#);
}

#[test]
fn javascript_errors_fail_the_function_with_the_file_line_and_stack() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("export function handle(r) {\n  return r +;\n}\n", "x", &["SyntaxError: ", "/app/index.js:2:"]),
        ("throw new RangeError(\"top level\");\n", "x", &["RangeError: top level", "/app/index.js:1"]),
        (
            "export function handle(r) {\n  return JSON.parse(r).a.b;\n}\n",
            "{}",
            &["TypeError: ", "at handle (/app/index.js:2"],
        ),
        (
            "export async function handle(r) {\n  await null;\n  throw new Error(\"no \" + r);\n}\n",
            "x",
            &["Error: no x", "at handle (/app/index.js:3"],
        ),
        ("export const handle = 5;\n", "x", &["/app/index.js exports no handler"]),
        ("import _ from \"lodash\";\nexport default () => 1;\n", "x", &["lodash", "thaw pack --bundle"]),
        ("export const handle = () => new Promise(() => {});\n", "x", &["the handler's promise never settled"]),
    ];
    for (i, (source, data, expected)) in cases.iter().enumerate() {
        let dir = function(&[("index.js", source)]);
        let bundle = packed(dir.path());
        // QEMU too for the first (an error in init) and the third (one in the handler).
        let run = if i == 0 || i == 2 { both(&bundle, data) } else { run_thaw(&["invoke", &bundle, "--data", data]) };
        assert_eq!(run.code, Some(FAILED), "{source}: {run:#?}");
        assert!(run.stdout.is_empty(), "{source}: {run:#?}");
        for part in *expected {
            assert!(run.stderr.contains(part), "{source}: {part:?} not in {run:#?}");
        }
        assert!(run.stderr.trim_end().ends_with("`unreachable` instruction executed"), "{source}: {run:#?}");
        if i < 2 {
            // At the top level: `thaw snapshot` refuses it, saying where on its error line.
            let image = dir.path().join("f.snap");
            let run = run_thaw(&["snapshot", &bundle, "-o", image.to_str().unwrap()]);
            assert_eq!(run.code, Some(125), "{source}: {run:#?}");
            let last = run.stderr.lines().last().unwrap_or_default();
            assert!(last.contains("; it wrote: ") && last.contains(expected[1]), "{source}: {last}");
        }
    }
}

#[test]
fn a_javascript_function_serves_from_its_snapshot_in_every_mode() {
    let dir = function(GREETER);
    let image = snapshot(dir.path(), &packed(dir.path()));
    for mode in ["fresh", "pool", "reset"] {
        for line in restore(&image, mode, 20, r#"{"name": "ada", "n": 7}"#) {
            assert_eq!(line["status"], "ok", "{mode}: {line}");
            assert_eq!(line["stdout"], r#"{"greeting":"Hello, ada!","square":49}"#, "{mode}: {line}");
            assert_eq!(line["stderr"], "", "{mode}: the top level ran once, in the snapshot: {line}");
        }
    }
}

/// Every VM restored from one image gives its own `Math.random` (QuickJS-NG seeds its own from
/// the clock in init, so without the runtime's it would replay one sequence) and its own
/// `crypto.randomUUID()`, in every mode, and `Date.now()` is the host's time at the request,
/// not the snapshot's.
#[test]
fn every_restored_vm_has_its_own_math_random_and_uuids_and_the_hosts_clock() {
    let dir = function(&[(
        "index.js",
        "Math.random(); // in init: the runtime must not replay what follows\nexport const handle = () => `${Math.random()} ${crypto.randomUUID()} ${Date.now()}`;\n",
    )]);
    let image = snapshot(dir.path(), &packed(dir.path()));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let mut seen = std::collections::HashSet::new();
    for mode in ["fresh", "pool", "reset"] {
        let before = now_ms();
        let lines = restore(&image, mode, 1000, "x");
        let after = now_ms();
        for line in lines {
            let answer = line["stdout"].as_str().unwrap_or_default();
            let [random, uuid, date] = answer.split(' ').collect::<Vec<_>>()[..] else { panic!("{mode}: {line}") };
            assert!(seen.insert(random.to_string()), "{mode}: Math.random repeated {random}");
            assert!(seen.insert(uuid.to_string()), "{mode}: crypto.randomUUID repeated {uuid}");
            let date: u128 = date.parse().unwrap();
            // The snapshot is at least 1.5 s older than `before`.
            assert!(
                before - 1000 <= date && date <= after + 1000,
                "{mode}: Date.now() {date} not in [{before}, {after}]"
            );
        }
    }
    assert_eq!(seen.len(), 6000);
}

/// `TextEncoder`, `TextDecoder` (UTF-8, invalid bytes replaced) and `crypto`, checked against
/// what Rust computes from the same request.
#[test]
fn text_encoding_and_crypto_globals_behave_as_on_the_web() {
    let dir = function(&[(
        "index.js",
        r#"export function handle(request) {
  const bytes = new TextEncoder().encode(request);
  const words = crypto.getRandomValues(new Uint32Array(8));
  return {
    utf8: Array.from(bytes),
    back: new TextDecoder().decode(bytes),
    invalid: new TextDecoder("UTF-8").decode(new Uint8Array([0x61, 0xff, 0x62])),
    view: new TextDecoder().decode(new DataView(bytes.buffer, 1, 2)),
    words: words.length,
    distinct: new Set(words).size,
    uuid: crypto.randomUUID(),
    refused: (() => { try { new TextDecoder("latin1"); return "no"; } catch (e) { return e.name; } })(),
    tooMany: (() => { try { crypto.getRandomValues(new Uint8Array(65537)); return "no"; } catch (e) { return e.name; } })(),
    mathRandom: [Math.random.name, Math.random.length, Object.getOwnPropertyNames(Math.random).sort().join()],
  };
}
"#,
    )]);
    let bundle = packed(dir.path());
    let request = "héllo € 𝄞";
    let run = run_thaw(&["invoke", &bundle, "--data", request]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let answer: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let utf8: Vec<u64> = request.bytes().map(u64::from).collect();
    assert_eq!(answer["utf8"], serde_json::json!(utf8));
    assert_eq!(answer["back"], request);
    assert_eq!(answer["invalid"], "a\u{fffd}b");
    assert_eq!(answer["view"], String::from_utf8_lossy(&request.as_bytes()[1..3]).as_ref());
    assert_eq!((answer["words"].as_u64(), answer["distinct"].as_u64()), (Some(8), Some(8)));
    let uuid = answer["uuid"].as_str().unwrap();
    let groups: Vec<usize> = uuid.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "{uuid}");
    assert!(uuid.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{uuid}");
    assert_eq!(&uuid[14..15], "4", "version 4: {uuid}");
    assert!("89ab".contains(&uuid[19..20]), "the RFC 4122 variant: {uuid}");
    assert_eq!((answer["refused"].as_str(), answer["tooMany"].as_str()), (Some("RangeError"), Some("RangeError")));
    // The runtime's Math.random looks like the one it replaces (test262's name.js and length.js).
    assert_eq!(answer["mathRandom"], serde_json::json!(["random", 0, "length,name"]));
}

#[test]
fn pack_refuses_javascript_it_cannot_pack_naming_what_to_do() {
    let dir = function(&[("main.js", "export default () => 1;\n")]);
    let out = dir.path().join("f.thaw");
    let refused = |input: &Path, extra: &[&str], expected: &str| {
        let run = pack(input, &out, extra);
        assert_eq!(run.code, Some(125), "{run:#?}");
        assert!(run.stderr.contains(expected), "{expected:?} not in {run:#?}");
        assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
    };
    refused(dir.path(), &[], "no index.js or index.mjs here: name the entry module with --entry FILE");
    refused(dir.path(), &["--entry", "../main.js"], "--entry \"../main.js\": must be a .js or .mjs file inside");
    refused(&dir.path().join("main.js"), &["--entry", "main.js"], "--entry is for a directory");
    refused(dir.path(), &["--entry", "main.js", "--data-dir", "/tmp"], "--data-dir: a JavaScript function's files");
    let run = pack(dir.path(), &out, &["--entry", "main.js", "--memory", "64"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let shown = run_thaw(&["inspect", out.to_str().unwrap()]);
    assert!(shown.stdout.contains("64 MiB of linear memory"), "--memory overrides the default: {shown:#?}");
}

/// The same handler run by Node, thaw's peer: `handle(request)` awaited, its answer as JSON.
fn node(entry: &Path, request: &str) -> String {
    let script = "const m = await import(process.argv[1]); \
                  const answer = await (m.handle ?? m.default)(process.argv[2]); \
                  process.stdout.write(JSON.stringify(answer));";
    let output = Command::new("node")
        .args(["--input-type=module", "-e", script, entry.to_str().unwrap(), request])
        .output()
        .expect("node runs (.ci/run installs Debian's nodejs)");
    assert!(output.status.success(), "node: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// Timers, `queueMicrotask`, `structuredClone` and the `node:fs` subset answer as Node answers
/// the same handler (run beside it, on the host), under KVM and under QEMU. The handler is given
/// where its files and a scratch directory are, and reads a file of random text the test wrote.
#[test]
fn timers_structured_clone_and_node_fs_answer_as_node_does() {
    let seed = format!("{:032x}", rand_u128());
    let dir = function(&[
        (
            "index.mjs",
            r#"import { readFileSync, writeFileSync, appendFileSync, readdirSync, statSync, existsSync, mkdirSync, rmSync, renameSync, unlinkSync, rmdirSync } from "node:fs";
import { readFile } from "node:fs/promises";
import fs from "fs";

let initTimers = 0;
setTimeout(() => { initTimers += 1; }, 0);
await new Promise((resolve) => setTimeout(resolve, 5));

const caught = (f, base) => { try { f(); return "no error"; } catch (e) { return `${e.code} ${e.syscall} ${e.message.replace(base, "BASE")}`; } };

export async function handle(request) {
  const { app, tmp } = JSON.parse(request);
  const order = [];
  setTimeout(() => order.push("t50"), 50);
  setTimeout(() => order.push("t0"), 0);
  clearTimeout(setTimeout(() => order.push("cancelled"), 1));
  let beats = 0;
  const interval = setInterval(() => { order.push("beat"); if (++beats === 3) clearInterval(interval); }, 2);
  queueMicrotask(() => order.push("micro"));
  const late = await new Promise((resolve) => setTimeout(resolve, 80, "late"));

  const shared = { n: 1 };
  const original = { list: [1, { when: new Date(86400000) }], map: new Map([["k", new Set([shared])]]), bytes: new Uint8Array([7, 8, 9]), shared, again: shared };
  original.self = original;
  const copy = structuredClone(original);
  const clone = {
    distinct: copy !== original && copy.list !== original.list,
    cycle: copy.self === copy,
    sharing: copy.shared === copy.again && copy.shared !== shared,
    date: copy.list[1].when.toISOString(),
    map: [...copy.map.get("k")][0] === copy.shared,
    bytes: Array.from(copy.bytes),
    ownBuffer: copy.bytes.buffer !== original.bytes.buffer,
    refused: (() => { try { structuredClone({ f() {} }); return "no error"; } catch (e) { return e.name; } })(),
  };

  const seed = readFileSync(`${app}/seed.txt`, "utf8");
  const raw = readFileSync(`${app}/seed.txt`);
  mkdirSync(`${tmp}/a/b`, { recursive: true });
  writeFileSync(`${tmp}/a/b/f.txt`, seed);
  appendFileSync(`${tmp}/a/b/f.txt`, new TextEncoder().encode("!"));
  writeFileSync(`${tmp}/a/b/f.txt`, "?", { flag: "a" });
  renameSync(`${tmp}/a/b/f.txt`, `${tmp}/a/g.txt`);
  const files = {
    seed,
    firstBytes: Array.from(raw.subarray(0, 4)),
    listed: readdirSync(`${tmp}/a`),
    app: readdirSync(app).filter((name) => !name.startsWith(".")),
    size: statSync(`${tmp}/a/g.txt`).size,
    kinds: [statSync(`${tmp}/a`).isDirectory(), statSync(`${tmp}/a/g.txt`).isFile(), statSync(`${tmp}/a/g.txt`).isDirectory()],
    copied: fs.readFileSync(`${tmp}/a/g.txt`, { encoding: "utf8" }),
    promised: await readFile(`${app}/seed.txt`, "utf-8"),
    missing: caught(() => readFileSync(`${app}/missing.txt`), app),
    exists: caught(() => mkdirSync(`${tmp}/a`), tmp),
    notEmpty: caught(() => rmdirSync(`${tmp}/a`), tmp),
    directory: caught(() => unlinkSync(`${tmp}/a/b`), tmp),
  };
  rmSync(`${tmp}/a`, { recursive: true });
  rmSync(`${tmp}/never`, { force: true });
  files.gone = [existsSync(`${tmp}/a`), existsSync(`${app}/seed.txt`)];
  return { initTimers, order, late, clone, files };
}
"#,
        ),
        ("seed.txt", &seed),
    ]);
    let out = tempfile::tempdir().unwrap();
    let bundle = out.path().join("function.thaw");
    let run = pack(dir.path(), &bundle, &[]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let thaw = both(bundle.to_str().unwrap(), r#"{"app": "/app", "tmp": "/tmp"}"#);
    assert_eq!(thaw.code, Some(0), "{thaw:#?}");

    let scratch = tempfile::tempdir().unwrap();
    let request = serde_json::json!({"app": dir.path(), "tmp": scratch.path()}).to_string();
    let peer = node(&dir.path().join("index.mjs"), &request);
    assert_eq!(thaw.stdout, peer, "thaw and Node answered differently");

    // What the answer must hold, whoever gave it.
    let answer: serde_json::Value = serde_json::from_str(&thaw.stdout).unwrap();
    assert_eq!(answer["initTimers"], 1, "the top level's timer ran in init");
    assert_eq!(answer["order"], serde_json::json!(["micro", "t0", "beat", "beat", "beat", "t50"]));
    assert_eq!(answer["late"], "late");
    assert_eq!(answer["files"]["seed"], seed.as_str());
    assert_eq!(answer["files"]["copied"], format!("{seed}!?"));
    assert_eq!(answer["files"]["size"], seed.len() + 2);
    assert_eq!(answer["files"]["app"], serde_json::json!(["index.mjs", "seed.txt"]));
    assert_eq!(answer["files"]["missing"], "ENOENT open ENOENT: no such file or directory, open 'BASE/missing.txt'");
    assert_eq!(answer["files"]["gone"], serde_json::json!([false, true]));
    assert_eq!(answer["clone"]["date"], "1970-01-02T00:00:00.000Z");
    assert_eq!(answer["clone"]["refused"], "DataCloneError");
}

/// A random number from the host's entropy, for data the function cannot have been written
/// to expect.
fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).unwrap();
    u128::from_le_bytes(bytes)
}

/// `config.request = "bytes"` hands the handler the request's bytes as a `Uint8Array`, invalid
/// UTF-8 and all; a `config` that asks for anything else fails init, naming what it asked.
#[test]
fn a_handler_takes_the_request_as_bytes_when_its_config_asks() {
    let dir = function(&[(
        "index.js",
        r#"export const config = { request: "bytes" };
export function handle(request) {
  return { type: request.constructor.name, bytes: Array.from(request) };
}
"#,
    )]);
    let bundle = packed(dir.path());
    let request = [0x68u8, 0xff, 0x00, 0xe2, 0x82];
    let input = dir.path().join("request.bin");
    std::fs::write(&input, request).unwrap();
    let run = run_thaw(&["invoke", &bundle, "--input", input.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stdout, format!(r#"{{"type":"Uint8Array","bytes":{}}}"#, serde_json::json!(request)));

    let dir = function(&[("index.js", "export const config = { request: \"text\" };\nexport default (r) => r;\n")]);
    let run = run_thaw(&["invoke", &packed(dir.path()), "--data", "x"]);
    assert_eq!(run.code, Some(FAILED), "{run:#?}");
    assert!(run.stderr.contains(r#"/app/index.js: config.request must be "string" or "bytes", not text"#), "{run:#?}");
}

/// `thaw bench --peer wasmtime` runs the same runtime wasm in process with host Wasmtime, with
/// the function's files at `/app` and its scratch directories, as the guest gives them: the two
/// must answer alike, which they cannot unless the peer found the module and wrote the file.
#[test]
fn the_wasmtime_peer_runs_a_javascript_function_with_its_files() {
    let dir = function(&[
        (
            "index.js",
            "import { writeFileSync, readFileSync } from \"node:fs\";\nimport { n } from \"./n.js\";\nexport function handle(r) {\n  writeFileSync(\"/tmp/out\", r + n);\n  return readFileSync(\"/tmp/out\", \"utf8\");\n}\n",
        ),
        ("n.js", "export const n = 42;\n"),
    ]);
    let bundle = packed(dir.path());
    let run = run_thaw(&["bench", &bundle, "--peer", "wasmtime", "--runs", "2", "--data", "answer ", "--json"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let stats: serde_json::Value = serde_json::from_str(&run.stdout).expect("one JSON object");
    for phase in ["init_us", "handle_us"] {
        assert!(stats["peer"]["phases"][phase]["p50"].as_u64().is_some(), "{phase}: {stats}");
    }
}

/// An example under `examples/js/`.
fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/js").join(name)
}

/// HTML-escaped as the template example escapes.
fn escaped(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// The JavaScript examples answer what the test computes itself, under KVM and QEMU; the hello
/// also as Node answers it.
#[test]
fn the_javascript_examples_answer_what_the_test_computes() {
    let out = tempfile::tempdir().unwrap();
    let bundle = |name: &str| {
        let path = out.path().join(format!("{name}.thaw"));
        let run = pack(&example(name), &path, &[]);
        assert_eq!(run.code, Some(0), "{run:#?}");
        path.to_str().unwrap().to_string()
    };

    let hello = bundle("hello");
    let name = format!("visitor {:x}", rand_u128() as u32);
    let request = serde_json::json!({ "name": name }).to_string();
    let run = both(&hello, &request);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stdout, serde_json::json!({ "greeting": format!("Hello, {name}!") }).to_string());
    assert_eq!(run.stdout, node(&example("hello").join("index.mjs"), &request));

    let templates = bundle("templates");
    let seed = rand_u128();
    let title = format!("Prices <{:x}> & \"quotes\"", seed as u16);
    let items: Vec<(String, u64)> = (0..3).map(|i| (format!("item'{i}"), (seed >> (i * 8)) as u64 % 1000)).collect();
    let data = serde_json::json!({
        "title": title,
        "user": { "name": "Ada & co" },
        "currency": "EUR",
        "items": items.iter().map(|(n, p)| serde_json::json!({ "name": n, "price": p })).collect::<Vec<_>>(),
        "footer": "<footer>raw</footer>",
    });
    let run = both(&templates, &serde_json::json!({ "template": "page", "data": data }).to_string());
    assert_eq!(run.code, Some(0), "{run:#?}");
    let rows: String = items.iter().map(|(n, p)| format!("  <li>{}: {p} EUR</li>\n", escaped(n))).collect();
    let title = escaped(&title);
    let expected = format!(
        "<!doctype html>\n<title>{title}</title>\n<h1>{title}</h1>\n<p class=\"user\">Signed in as Ada &amp; co</p>\n<ul>\n{rows}</ul>\n<footer>raw</footer>\n"
    );
    assert_eq!(run.stdout, expected);
    let tags = |data: serde_json::Value| {
        let run = run_thaw(&[
            "invoke",
            &templates,
            "--data",
            &serde_json::json!({ "template": "tags", "data": data }).to_string(),
        ]);
        assert_eq!(run.code, Some(0), "{run:#?}");
        run.stdout
    };
    assert_eq!(tags(serde_json::json!({ "tags": ["a", "<b>"] })), "<span>a</span><span>&lt;b&gt;</span>\n");
    assert_eq!(tags(serde_json::json!({ "tags": [] })), "no tags\n");
    let missing = run_thaw(&["invoke", &templates, "--data", r#"{"template": "nope", "data": {}}"#]);
    assert_eq!(missing.code, Some(FAILED), "{missing:#?}");
    assert!(missing.stderr.contains(r#"Error: no template "nope": there are page, tags"#), "{missing:#?}");
}

/// `thaw pack --bundle` bundles the npm packages a function imports (CommonJS and ES modules, a
/// package's `module` build preferred) with esbuild, leaving `node:fs` to the runtime; without
/// esbuild, or with an import esbuild cannot resolve, it says so.
#[test]
fn pack_bundle_brings_in_npm_packages_with_esbuild() {
    let dir = function(&[
        (
            "index.mjs",
            "import leftPad from \"left-pad-cjs\";\nimport { shout } from \"esm-pkg\";\nimport { readFileSync } from \"node:fs\";\nconst suffix = readFileSync(\"/app/suffix.txt\", \"utf8\");\nexport const handle = (request) => shout(leftPad(request, 8, \"*\")) + suffix;\n",
        ),
        ("suffix.txt", "!"),
        ("node_modules/left-pad-cjs/package.json", r#"{ "name": "left-pad-cjs", "main": "index.js" }"#),
        (
            "node_modules/left-pad-cjs/index.js",
            "module.exports = function (text, width, fill) {\n  text = String(text);\n  while (text.length < width) text = fill + text;\n  return text;\n};\n",
        ),
        (
            "node_modules/esm-pkg/package.json",
            r#"{ "name": "esm-pkg", "main": "dist/index.cjs", "module": "dist/index.mjs" }"#,
        ),
        ("node_modules/esm-pkg/dist/index.mjs", "export const shout = (s) => s.toUpperCase();\n"),
        ("node_modules/esm-pkg/dist/index.cjs", "exports.shout = () => \"the CommonJS build\";\n"),
    ]);
    let out = tempfile::tempdir().unwrap();
    let bundle = out.path().join("f.thaw");
    let run = pack(dir.path(), &bundle, &["--bundle"]);
    assert_eq!(run.code, Some(0), "needs esbuild (.ci/run installs Debian's): {run:#?}");
    let word = format!("{:x}", rand_u128() as u16);
    let run = both(bundle.to_str().unwrap(), &word);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stdout, format!("{:*>8}!", word.to_uppercase()));
    let shown = run_thaw(&["inspect", bundle.to_str().unwrap()]);
    assert!(shown.stdout.contains("THAW_JS_ENTRY=/app/.thaw/bundle.mjs"), "{shown:#?}");

    // Without esbuild anywhere it is looked for.
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(common::THAW)
        .args(["pack", dir.path().to_str().unwrap(), "--bundle", "-o", bundle.to_str().unwrap()])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("--bundle runs esbuild, found neither") && stderr.contains("apt install esbuild"),
        "{stderr}"
    );

    // An import esbuild cannot resolve: its message, with the file and line.
    let broken = function(&[("index.mjs", "import x from \"missing-pkg\";\nexport default () => x;\n")]);
    let run = pack(broken.path(), &bundle, &["--bundle"]);
    assert_eq!(run.code, Some(125), "{run:#?}");
    assert!(
        run.stderr.contains(r#"esbuild could not bundle"#) && run.stderr.contains(r#"Could not resolve "missing-pkg""#),
        "{run:#?}"
    );
    assert!(run.stderr.contains("index.mjs:1:14"), "{run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
}

/// `URL` and `URLSearchParams` answer as Node's (which follow the WHATWG URL Standard): parsing
/// absolute and relative URLs of special and other schemes, the setters, and the search
/// parameters tied to their URL.
#[test]
fn url_and_url_search_params_answer_as_node_does() {
    let dir = function(&[(
        "index.mjs",
        r#"const parts = (u) => [u.href, u.origin, u.protocol, u.username, u.password, u.host, u.hostname, u.port, u.pathname, u.search, u.hash, [...u.searchParams].join(";")];
export function handle(request) {
  const parsed = JSON.parse(request).map(([input, base]) => {
    try { return parts(base === null ? new URL(input) : new URL(input, base)); } catch (e) { return e.name; }
  });
  const u = new URL("https://h.com/a?x=1&y=2#f");
  u.searchParams.append("z", "3 &4");
  u.searchParams.delete("x");
  const afterParams = u.href;
  u.search = "?p=q+r&s";
  const reparsed = [...u.searchParams];
  u.pathname = "/new path/../x";
  u.hash = "";
  u.port = "8443";
  u.hostname = "Other.ORG";
  u.username = "me@home";
  const setters = [u.href, String(u), JSON.stringify({ u })];
  const params = new URLSearchParams("?b=2&a=1&b=1&c=%20+x&d");
  params.sort();
  params.set("b", "only");
  const fromObject = new URLSearchParams({ k: "v w", "ü": "€" }).toString();
  const fromPairs = new URLSearchParams([["a", "1"], ["a", "2"]]);
  return {
    parsed,
    afterParams,
    reparsed,
    setters,
    params: [params.toString(), params.get("c"), params.get("d"), params.has("a"), params.has("a", "2"), params.getAll("b"), params.size],
    fromObject,
    fromPairs: [fromPairs.getAll("a"), [...fromPairs.keys()], [...fromPairs.values()]],
    canParse: [URL.canParse("x:"), URL.canParse("nope"), URL.canParse("a", "http://b/"), URL.parse("nope")],
  };
}
"#,
    )]);
    let bundle = packed(dir.path());
    let request = r##"[["https://user:pa ss@Example.COM:443/a/./b/../c?q=1 2&x=%41#frag ment", null], ["HTTP://example.com:8080", null], ["../d?x#y", "http://h.com/a/b/c"], ["//other.org/p", "https://h.com/"], ["?only", "http://h.com/a/b"], ["#f", "http://h.com/a?q"], ["file:///C:/dir/../x.txt", null], ["file://localhost/etc/passwd", null], ["mailto:Someone@Example.com?subject=hi", null], ["data:text/plain,hello world", null], ["http://0x7f.1/", null], ["http://192.168.0.257/", null], ["http://[::1]:80/", null], ["not a url", null], ["http://exa mple.com", null], ["blob:https://a.com/uuid", null], ["http://h.com/\u00e4/\u20ac?\u00fc=\u20ac#\u00e9", null], ["http:\\\\h.com\\a\\b", null], ["sc://h/p/../q", null], ["http://h.com/%2e%2E/x", null], ["  http://h.com/\t\na  ", null], ["http://h.com:65536/", null], ["https://h.com/?a=1&a=2&b=+x%20y", null], ["g:h", "http://a/b/c/d;p?q"], ["g", "http://a/b/c/d;p?q"], ["./g", "http://a/b/c/d;p?q"], ["g/", "http://a/b/c/d;p?q"], ["/g", "http://a/b/c/d;p?q"], ["//g", "http://a/b/c/d;p?q"], ["?y", "http://a/b/c/d;p?q"], ["g?y", "http://a/b/c/d;p?q"], ["#s", "http://a/b/c/d;p?q"], ["g#s", "http://a/b/c/d;p?q"], [";x", "http://a/b/c/d;p?q"], ["", "http://a/b/c/d;p?q"], [".", "http://a/b/c/d;p?q"], ["./", "http://a/b/c/d;p?q"], ["..", "http://a/b/c/d;p?q"], ["../", "http://a/b/c/d;p?q"], ["../g", "http://a/b/c/d;p?q"], ["../..", "http://a/b/c/d;p?q"], ["../../g", "http://a/b/c/d;p?q"], ["../../../g", "http://a/b/c/d;p?q"], ["/./g", "http://a/b/c/d;p?q"], ["/../g", "http://a/b/c/d;p?q"], ["g.", "http://a/b/c/d;p?q"], [".g", "http://a/b/c/d;p?q"], ["g..", "http://a/b/c/d;p?q"], ["..g", "http://a/b/c/d;p?q"], ["./../g", "http://a/b/c/d;p?q"], ["./g/.", "http://a/b/c/d;p?q"], ["g/./h", "http://a/b/c/d;p?q"], ["g/../h", "http://a/b/c/d;p?q"], ["g;x=1/./y", "http://a/b/c/d;p?q"], ["g?y/./x", "http://a/b/c/d;p?q"], ["g#s/../x", "http://a/b/c/d;p?q"], ["http:g", "http://a/b/c/d;p?q"], ["http:/g", "http://a/b/c/d;p?q"], ["https://h.com", null], ["ws://h.com:80/", null], ["wss://h.com:443/x", null], ["ftp://u@h.com:21/f", null], ["foo://host:99/p?q#f", null], ["foo:/p/../q", null], ["foo:opaque path ", null], ["http://h.com/a b", null], ["http://h.com/a%20b", null], ["http://h.com?a'b", null], ["foo://h.com?a'b", null], ["http://h.com/`{}", null], ["http://1.2.3", null], ["http://999999999", null], ["http://0300.0250.0.1/", null], ["http://h.com./", null], ["http://user@/", null], ["http://:80/", null], ["http://h.com:/", null], ["file:/x/y", null], ["file:x", "file:///a/b"], ["C|/x", "file:///a/b"], ["http://%41.com/", null], ["http://xn--nxasmq6b.com/", null], ["HTTPS://H.COM/%7E?%7E#%7E", null], ["javascript:alert(1)", null], ["about:blank", null], ["http://h.com/?q=\u00e9&r=%zz", null], ["http://h.com/\u0000x", null], ["non-spec:/.//p", null], ["http://a.b.c.1.2/", null], ["http://[2001:DB8::1]/", null], ["http://h.com#", null], ["http://h.com?", null]]"##;
    let run = run_thaw(&["invoke", &bundle, "--data", request]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let thaw: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let node: serde_json::Value = serde_json::from_str(&node(&dir.path().join("index.mjs"), request)).unwrap();
    for (i, (ours, theirs)) in
        thaw["parsed"].as_array().unwrap().iter().zip(node["parsed"].as_array().unwrap()).enumerate()
    {
        assert_eq!(ours, theirs, "case {i}");
    }
    assert_eq!(thaw, node);
    assert_eq!(thaw["parsed"].as_array().unwrap().len(), 92);
}
