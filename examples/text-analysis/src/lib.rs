//! Example thaw function that computes, written as a new user would, with the crates they would
//! reach for (regex, sha2, serde_json): `init` compiles three regexes and stretches a key with
//! 20,000 rounds of SHA-256; `handle` analyses a text with them.
//!
//! Request: any UTF-8 text. Response: `{"words": N, "distinct_words": N, "top_words":
//! [[word, count], ...], "emails": [...], "urls": N, "digest": hex}`, where `top_words` holds the
//! five most frequent words (ties broken alphabetically), `emails` the distinct addresses in
//! order, and `digest` the SHA-256 of the stretched key followed by the text.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::OnceLock;

use regex::Regex;
use sha2::{Digest, Sha256};

/// Key-stretching rounds in `init`.
const ROUNDS: usize = 20_000;

struct Analyser {
    word: Regex,
    email: Regex,
    url: Regex,
    key: [u8; 32],
}

static ANALYSER: OnceLock<Analyser> = OnceLock::new();

fn build() -> Analyser {
    let mut key: [u8; 32] = Sha256::digest(b"thaw text-analysis").into();
    for _ in 0..ROUNDS {
        key = Sha256::digest(key).into();
    }
    Analyser {
        word: Regex::new(r"\b[\p{L}']+\b").expect("word pattern"),
        email: Regex::new(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b").expect("email pattern"),
        url: Regex::new(r"\bhttps?://[^\s<>]+").expect("url pattern"),
        key,
    }
}

/// Runs once before the first request: compiles the patterns and stretches the key.
#[unsafe(no_mangle)]
pub extern "C" fn init() {
    ANALYSER.get_or_init(build);
}

/// Analyses one request's text.
#[unsafe(no_mangle)]
pub extern "C" fn handle() {
    let analyser = ANALYSER.get_or_init(build);
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).expect("stdin");
    let Ok(text) = String::from_utf8(input) else {
        eprintln!("text-analysis: the request must be UTF-8 text");
        std::process::exit(2);
    };
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for word in analyser.word.find_iter(&text) {
        *counts.entry(word.as_str().to_lowercase()).or_default() += 1;
    }
    let words: u64 = counts.values().sum();
    let mut top: Vec<(&String, &u64)> = counts.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    top.truncate(5);
    let mut emails: Vec<&str> = Vec::new();
    for email in analyser.email.find_iter(&text) {
        if !emails.contains(&email.as_str()) {
            emails.push(email.as_str());
        }
    }
    let digest: String = Sha256::new()
        .chain_update(analyser.key)
        .chain_update(text.as_bytes())
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let response = serde_json::json!({
        "words": words,
        "distinct_words": counts.len(),
        "top_words": top,
        "emails": emails,
        "urls": analyser.url.find_iter(&text).count(),
        "digest": digest,
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &response).expect("stdout");
    writeln!(out).and_then(|()| out.flush()).expect("stdout");
}
