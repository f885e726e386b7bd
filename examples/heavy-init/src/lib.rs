//! Example thaw function with expensive initialization: `init` sieves the primes below
//! 5 million and indexes them; `handle` answers queries from that index.
//!
//! Request: a decimal number N. Response: `{"n": N, "primes_below": count, "nth_prime": p}`,
//! where `p` is the N-th prime (1-based) if the index holds it.

use std::io::{Read, Write};
use std::sync::OnceLock;

/// Sieve bound: large enough that init takes well over 100 ms cold in the guest (about 0.3 s
/// under KVM), small enough to finish under QEMU's software emulation in the tests.
const LIMIT: usize = 5_000_000;

struct Index {
    /// Every prime below LIMIT, in order.
    primes: Vec<u32>,
}

static INDEX: OnceLock<Index> = OnceLock::new();

fn build() -> Index {
    let mut composite = vec![false; LIMIT];
    let mut primes = Vec::new();
    for n in 2..LIMIT {
        if !composite[n] {
            primes.push(n as u32);
            let mut multiple = n * n;
            while multiple < LIMIT {
                composite[multiple] = true;
                multiple += n;
            }
        }
    }
    Index { primes }
}

/// Runs once before the first request: builds the index.
#[unsafe(no_mangle)]
pub extern "C" fn init() {
    INDEX.get_or_init(build);
}

/// Handles one request from the index built by `init`.
#[unsafe(no_mangle)]
pub extern "C" fn handle() {
    let index = INDEX.get_or_init(build);
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).expect("stdin");
    let n: usize = match input.trim().parse() {
        Ok(n) => n,
        Err(_) => {
            eprintln!("heavy-init: the request must be a decimal number, got {:?}", input.trim());
            std::process::exit(2);
        }
    };
    let below = index.primes.partition_point(|&p| (p as usize) < n);
    let nth = n.checked_sub(1).and_then(|i| index.primes.get(i));
    let nth = nth.map_or("null".to_string(), |p| p.to_string());
    let mut out = std::io::stdout().lock();
    writeln!(out, "{{\"n\": {n}, \"primes_below\": {below}, \"nth_prime\": {nth}}}")
        .and_then(|()| out.flush())
        .expect("stdout");
}
