//! Example thaw function: answers with 16 random bytes (hex), the wall-clock time, and the VM's
//! instance id.
//!
//! Randomness comes from WASI `random_get`, time from `clock_time_get` (through `std::time`), the
//! instance id from the file `/run/thaw/instance-id`.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

#[link(wasm_import_module = "wasi_snapshot_preview1")]
unsafe extern "C" {
    /// WASI preview1 `random_get`: fills `len` bytes at `buf`; returns an errno.
    fn random_get(buf: *mut u8, len: usize) -> u16;
}

/// Handles one request (its body is ignored).
#[unsafe(no_mangle)]
pub extern "C" fn handle() {
    let mut bytes = [0u8; 16];
    // SAFETY: `bytes` is a writable buffer of exactly the length passed.
    let errno = unsafe { random_get(bytes.as_mut_ptr(), bytes.len()) };
    if errno != 0 {
        eprintln!("random: random_get failed with errno {errno}");
        std::process::exit(1);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let instance = std::fs::read_to_string("/run/thaw/instance-id").unwrap_or_default();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{{\"random\": \"{hex}\", \"instance\": \"{instance}\", \"unix_ms\": {now}}}")
        .and_then(|()| out.flush())
        .expect("stdout");
}
