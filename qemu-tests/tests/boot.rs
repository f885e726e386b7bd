#[test]
fn t() { println!("{} {}", env!("CARGO_BIN_FILE_TOOLS_thaw"), env!("CARGO_BIN_FILE_GUEST_KERNEL_thaw-guest")); }
