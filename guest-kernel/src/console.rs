//! The kernel log: where its bytes go ([`write_log`]: the virtio console when the VMM asked for
//! it, otherwise the log hypercall under thaw or COM1 elsewhere), and `print!`/`println!`, one
//! write per line.
//!
//! Formatting happens into a line buffer, so a `println!` under thaw costs one hypercall however
//! many pieces it is formatted from.

use core::fmt::{self, Write};

use spin::Mutex;

use abi::hypercall::{HYPERCALL_PAGE_SIZE, Hypercall};

use crate::platform::{self, Platform};
use crate::{devices, hypercall, serial};

/// Prepares log output: programs COM1 where there are no hypercalls.
pub fn init_console() {
    if platform::current() != Platform::Thaw {
        serial::init();
    }
}

/// Writes log bytes: to the virtio console when the VMM asked for that, otherwise through the
/// log hypercall (thaw) or COM1.
pub fn write_log(bytes: &[u8]) {
    if devices::console_log() && devices::console_write(bytes) {
        return;
    }
    match platform::current() {
        Platform::Thaw => {
            for chunk in bytes.chunks(HYPERCALL_PAGE_SIZE) {
                hypercall::with_payload(chunk, |len| Hypercall::LogWrite { len });
            }
        }
        _ => serial::write(bytes),
    }
}

struct LineBuffer {
    bytes: [u8; 1024],
    len: usize,
}

impl LineBuffer {
    fn flush(&mut self) {
        write_log(&self.bytes[..self.len]);
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
