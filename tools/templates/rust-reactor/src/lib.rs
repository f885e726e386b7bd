//! A thaw function. `init` runs once, before the snapshot; `handle` answers each request from
//! a VM restored from that snapshot: the request is stdin, the response stdout.

use std::io::Read;
use std::sync::OnceLock;

use regex::Regex;

/// Built in `init`, so that no request pays for compiling it.
static WORD: OnceLock<Regex> = OnceLock::new();

#[unsafe(no_mangle)]
pub extern "C" fn init() {
    WORD.set(Regex::new(r"[A-Za-z]+").expect("the pattern")).expect("init runs once");
    eprintln!("init: ready");
}

#[unsafe(no_mangle)]
pub extern "C" fn handle() {
    let mut request = String::new();
    std::io::stdin().read_to_string(&mut request).expect("the request");
    let words = WORD.get().expect("init ran").find_iter(&request).count();

    // /tmp is in the VM's memory: it starts empty in every request's VM.
    std::fs::write("/tmp/request.txt", &request).expect("writing /tmp");
    let saved = std::fs::read_to_string("/tmp/request.txt").expect("reading /tmp");

    let answer = serde_json::json!({ "words": words, "saved_bytes": saved.len() });
    println!("{answer}");
}
