//! Example thaw function: parses an order with serde, transforms it, and serializes the result.
//!
//! Request: `{"customer": "...", "items": [{"sku": "...", "price_cents": N, "quantity": N}, ...]}`.
//! Response: the customer upper-cased, items sorted by line total (largest first), and totals.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Order {
    customer: String,
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    sku: String,
    price_cents: u64,
    quantity: u64,
}

#[derive(Serialize)]
struct Line {
    sku: String,
    total_cents: u64,
}

#[derive(Serialize)]
struct Summary {
    customer: String,
    lines: Vec<Line>,
    item_count: u64,
    total_cents: u64,
}

/// Handles one request: stdin is the order, stdout the summary.
#[unsafe(no_mangle)]
pub extern "C" fn handle() {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).expect("stdin");
    let order: Order = match serde_json::from_slice(&input) {
        Ok(order) => order,
        Err(e) => {
            eprintln!("json-transform: bad order: {e}");
            std::process::exit(2);
        }
    };
    let mut lines: Vec<Line> =
        order.items.iter().map(|i| Line { sku: i.sku.clone(), total_cents: i.price_cents * i.quantity }).collect();
    lines.sort_by(|a, b| b.total_cents.cmp(&a.total_cents).then_with(|| a.sku.cmp(&b.sku)));
    let summary = Summary {
        customer: order.customer.to_uppercase(),
        item_count: order.items.iter().map(|i| i.quantity).sum(),
        total_cents: lines.iter().map(|l| l.total_cents).sum(),
        lines,
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &summary).expect("stdout");
    writeln!(out).and_then(|()| out.flush()).expect("stdout");
}
