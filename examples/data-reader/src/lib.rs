//! Example thaw function: reads its data volume, `/data` (packed with `thaw pack --data-dir`).
//!
//! `init` opens `/data/words/numbers.txt` (if the volume has it) and reads its first line, before
//! the snapshot. Each request reads the next line from that same open file (so a restored VM
//! goes on from where init left off), reads the file the request names, and lists `/data`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Mutex;

/// The file init opened, kept open across the snapshot.
static NUMBERS: Mutex<Option<BufReader<File>>> = Mutex::new(None);

/// Opens the numbers file, if there is one, and consumes its first line.
#[unsafe(no_mangle)]
pub extern "C" fn init() {
    let Ok(file) = File::open("/data/words/numbers.txt") else { return };
    let mut reader = BufReader::with_capacity(16, file);
    let mut first = String::new();
    reader.read_line(&mut first).expect("reading the first line");
    *NUMBERS.lock().unwrap() = Some(reader);
}

/// Handles `{"file": NAME}`: answers with the file's contents, the next numbers line, the
/// directory listing and the numbers file's size.
#[unsafe(no_mangle)]
pub extern "C" fn handle() {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).expect("stdin");
    let request: serde_json::Value = serde_json::from_slice(&input).unwrap_or(serde_json::Value::Null);
    let name = request.get("file").and_then(|f| f.as_str()).unwrap_or("readme.txt");
    let contents = match std::fs::read_to_string(format!("/data/{name}")) {
        Ok(text) => serde_json::json!({ "contents": text }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    let mut next = String::new();
    if let Some(reader) = NUMBERS.lock().unwrap().as_mut() {
        reader.read_line(&mut next).expect("reading the next line");
    }
    let mut listing: Vec<String> = std::fs::read_dir("/data")
        .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    listing.sort();
    let size = std::fs::metadata("/data/words/numbers.txt").map(|m| m.len()).unwrap_or(0);
    let response = serde_json::json!({
        "file": contents,
        "next": next.trim_end(),
        "listing": listing,
        "numbers_bytes": size,
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{response}").and_then(|()| out.flush()).expect("stdout");
}
