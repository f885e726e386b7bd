//! The panic handler: one line of message and location, reported through the platform.

use core::fmt::Write;
use core::panic::PanicInfo;

use crate::platform::{self, TextBuffer};

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let mut text = TextBuffer::new();
    let _ = write!(text, "{}", info.message());
    if let Some(location) = info.location() {
        let _ = write!(text, " at {}:{}:{}", location.file(), location.line(), location.column());
    }
    platform::report_panic(text.as_bytes())
}
