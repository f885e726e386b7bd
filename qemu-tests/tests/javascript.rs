//! JavaScript functions (issue 29): modules written here, packed by `thaw pack` with the runtime
//! built into thaw (QuickJS-NG), answered under KVM and under QEMU, from a cold boot and from
//! their snapshot in every serving mode.

use std::path::Path;
use std::process::Command;

mod common;

use common::{Run, run_thaw};

/// The exit code of a function that failed (the runtime traps after writing the error).
const FAILED: i32 = abi::exit_code::FUNCTION_TRAPPED as i32;

/// Writes `files` (name, source) into a fresh directory.
fn function(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, source) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, source).unwrap();
    }
    dir
}

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

/// Answers `data` with `bundle` under KVM and under QEMU; both must agree. Returns the KVM run.
fn both(bundle: &str, data: &str) -> Run {
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

/// Snapshots `bundle` into `dir` and returns the image's path.
fn snapshot(dir: &Path, bundle: &str) -> String {
    let image = dir.join("function.snap");
    let run = run_thaw(&["snapshot", bundle, "-o", image.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    image.to_str().unwrap().to_string()
}

/// Serves `count` requests of `data` from `image` in `mode` and returns each response's record.
fn restore(image: &str, mode: &str, count: usize, data: &str) -> Vec<serde_json::Value> {
    let responses = Path::new(image).with_file_name(format!("{mode}.jsonl"));
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
        ("import _ from \"lodash\";\nexport default () => 1;\n", "x", &["lodash", "esbuild --bundle --format=esm"]),
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
        let lines = restore(&image, mode, 200, "x");
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
    assert_eq!(seen.len(), 1200);
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
