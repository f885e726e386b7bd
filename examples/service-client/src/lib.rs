//! Example thaw function: talks to a host service over a preopened socket. Pack it with
//! `thaw pack --example service-client --connect service=PORT`, and serve the port with
//! `thaw invoke|restore --service PORT=SOCKET`.
//!
//! `init` connects before the snapshot: it greets the service with `sock_send` and reads its
//! answer with `sock_recv` (the WASI socket calls). Each request sends its body as one line
//! through the same socket with `std` (`fd_write`), reads one reply line (`fd_read`), and
//! answers `{"reply": ..., "greeting": ...}`, or `{"error": ..., "errno": ...}` when the service
//! cannot be reached. In a VM restored from the snapshot the first send reconnects the socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::sync::Mutex;

/// The service's socket, read line by line.
static SERVICE: Mutex<Option<BufReader<TcpStream>>> = Mutex::new(None);
/// What the service answered init.
static GREETING: Mutex<String> = Mutex::new(String::new());

/// The WASI preview 1 socket calls, which `std` does not expose.
mod wasi {
    #[repr(C)]
    pub struct Iovec {
        pub buf: *const u8,
        pub len: usize,
    }

    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    unsafe extern "C" {
        pub fn sock_send(fd: i32, data: *const Iovec, count: usize, flags: i32, sent: *mut usize) -> i32;
        pub fn sock_recv(
            fd: i32,
            data: *const Iovec,
            count: usize,
            flags: i32,
            received: *mut usize,
            flags_out: *mut u16,
        ) -> i32;
    }
}

/// The preopened socket `thaw pack --connect service=PORT` gave us, if any.
fn socket_fd() -> Option<i32> {
    std::env::var("THAW_CONNECT_service").ok()?.parse().ok()
}

/// Sends `bytes` with `sock_send`; the WASI errno on failure.
fn send_raw(fd: i32, bytes: &[u8]) -> Result<(), i32> {
    let iovec = wasi::Iovec { buf: bytes.as_ptr(), len: bytes.len() };
    let mut sent = 0;
    // SAFETY: the iovec points at `bytes`, alive for the call; `sent` is a valid out-pointer.
    match unsafe { wasi::sock_send(fd, &iovec, 1, 0, &mut sent) } {
        0 if sent == bytes.len() => Ok(()),
        0 => Err(-1),
        errno => Err(errno),
    }
}

/// Receives up to one line with `sock_recv`, a read at a time.
fn recv_line_raw(fd: i32) -> Result<String, i32> {
    let mut line = Vec::new();
    let mut buf = [0u8; 64];
    while !line.ends_with(b"\n") {
        let iovec = wasi::Iovec { buf: buf.as_mut_ptr(), len: buf.len() };
        let (mut received, mut flags) = (0, 0);
        // SAFETY: the iovec points at `buf`, writable and alive for the call; the out-pointers
        // are valid.
        match unsafe { wasi::sock_recv(fd, &iovec, 1, 0, &mut received, &mut flags) } {
            0 if received == 0 => break,
            0 => line.extend_from_slice(&buf[..received]),
            errno => return Err(errno),
        }
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

/// Connects to the service and greets it.
#[unsafe(no_mangle)]
pub extern "C" fn init() {
    let Some(fd) = socket_fd() else { return };
    let greeting = send_raw(fd, b"hello from init\n")
        .and_then(|()| recv_line_raw(fd))
        .unwrap_or_else(|errno| format!("init could not reach the service: errno {errno}"));
    *GREETING.lock().unwrap() = greeting;
    // SAFETY: `fd` is the preopened socket thaw gave this function; nothing else owns it.
    *SERVICE.lock().unwrap() = Some(BufReader::new(unsafe { TcpStream::from_raw_fd(fd) }));
}

/// Sends the request body as one line and answers with the service's reply.
#[unsafe(no_mangle)]
pub extern "C" fn handle() {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).expect("stdin");
    let mut service = SERVICE.lock().unwrap();
    let response = match service.as_mut() {
        None => serde_json::json!({ "error": "no service: pack with --connect service=PORT" }),
        Some(reader) => {
            let exchange = writeln!(reader.get_mut(), "{}", input.trim_end()).and_then(|()| {
                let mut reply = String::new();
                reader.read_line(&mut reply).map(|_| reply.trim_end().to_string())
            });
            match exchange {
                Ok(reply) => serde_json::json!({ "reply": reply, "greeting": *GREETING.lock().unwrap() }),
                Err(e) => serde_json::json!({ "error": e.to_string(), "errno": e.raw_os_error() }),
            }
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{response}").and_then(|()| out.flush()).expect("stdout");
}
