fn main() { println!("{}", env!("CARGO_BIN_FILE_GUEST_KERNEL_thaw-guest")); }
