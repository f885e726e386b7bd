//! Example thaw function: reads `{"name": ...}` and answers with a greeting.

use std::io::{Read, Write};

/// Handles one request: stdin is the request, stdout the response.
#[unsafe(no_mangle)]
pub extern "C" fn handle() {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("hello: reading the request: {e}");
        std::process::exit(2);
    }
    let request: serde_json::Value = serde_json::from_slice(&input).unwrap_or(serde_json::Value::Null);
    let name = request.get("name").and_then(|n| n.as_str()).unwrap_or("world");
    let response = serde_json::json!({ "greeting": format!("Hello, {name}!") });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{response}").and_then(|()| out.flush()).expect("stdout");
    eprintln!("hello: greeted {name}");
}
