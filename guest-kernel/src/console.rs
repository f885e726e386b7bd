//! `print!`/`println!`: formatted log output, one platform write per line.
//!
//! Formatting happens into a line buffer, so a `println!` under thaw costs one hypercall however
//! many pieces it is formatted from.

use core::fmt::{self, Write};

use spin::Mutex;

use crate::platform;

struct LineBuffer {
    bytes: [u8; 1024],
    len: usize,
}

impl LineBuffer {
    fn flush(&mut self) {
        platform::write_log(&self.bytes[..self.len]);
        self.len = 0;
    }
}

impl Write for LineBuffer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.bytes.len() {
                self.flush();
            }
            self.bytes[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

static CONSOLE: Mutex<LineBuffer> = Mutex::new(LineBuffer { bytes: [0; 1024], len: 0 });

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let mut console = CONSOLE.lock();
    let _ = console.write_fmt(args);
    console.flush();
}

/// Prints to the kernel log.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the kernel log.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
