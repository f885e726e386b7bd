//! Streams to host services over virtio-vsock: connect to a host port, send, receive, shut down.
//!
//! The connection manager of `virtio-drivers` keeps each stream's buffer and credit. thaw raises
//! no interrupts, so this module polls: it takes the device's events after every operation, and
//! when it has to wait (for a connection's answer, for data, for the host's credit) it notifies
//! the event queue, which the VMM reads as "wait a little for a host socket"
//! (`abi::devices::vsock::WAIT_QUEUE`). The VMM answers a connection request inside the
//! notification that sends it, so connecting never waits on the host.

use alloc::collections::BTreeMap;

use abi::devices::vsock::{HOST_CID, WAIT_QUEUE};
use spin::Mutex;
use virtio_drivers::Error as VirtioError;
use virtio_drivers::device::socket::{
    DisconnectReason, SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType,
};

use super::{Device, ThawHal, Transport, notify_queue};
use abi::devices::DeviceKind;

/// Bytes of one receive buffer (the driver keeps eight).
const RX_BUFFER: usize = 4096;
/// What each stream buffers for the function (the credit the host is given).
const STREAM_BUFFER: u32 = 64 << 10;
/// Largest piece sent at once (below the VMM's 64 KiB packet limit and the host's credit).
const SEND_CHUNK: usize = 16 << 10;
/// How many times a connection request is waited for before giving up.
const CONNECT_WAITS: u32 = 100;
/// Local ports are taken from here on.
const FIRST_LOCAL_PORT: u32 = 49152;

type Manager = VsockConnectionManager<ThawHal, Transport, RX_BUFFER>;

pub(super) static VSOCK: Mutex<Device<Manager>> = Mutex::new(Device::none(DeviceKind::Vsock));

pub(super) fn setup(t: Transport) -> Option<Manager> {
    let driver = VirtIOSocket::<ThawHal, Transport, RX_BUFFER>::new(t).ok()?;
    Some(VsockConnectionManager::new_with_capacity(driver, STREAM_BUFFER))
}

/// What can go wrong with a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamError {
    /// The VM has no vsock device.
    NoDevice,
    /// Nothing serves the port.
    Refused,
    /// The host reset the stream.
    Reset,
    /// The stream is closed.
    NotConnected,
    /// The host closed its end and the function sent more.
    Closed,
    /// The device failed.
    Io,
}

/// How a stream stands, as far as the host's events said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Open,
    PeerClosed,
    Reset,
}

struct Streams {
    state: BTreeMap<u32, State>,
    /// Bytes the function consumed since the host was last told (per local port).
    unreported: BTreeMap<u32, u32>,
    next_port: u32,
}

impl Streams {
    /// Forgets everything about the stream at `local`.
    fn remove(&mut self, local: u32) {
        self.state.remove(&local);
        self.unreported.remove(&local);
    }
}

static STREAMS: Mutex<Streams> =
    Mutex::new(Streams { state: BTreeMap::new(), unreported: BTreeMap::new(), next_port: FIRST_LOCAL_PORT });

fn host(port: u32) -> VsockAddr {
    VsockAddr { cid: HOST_CID, port }
}

/// Takes every pending event into the streams' states.
fn drain(manager: &mut Manager, streams: &mut Streams) -> Result<(), StreamError> {
    loop {
        let event = match manager.poll() {
            Ok(Some(event)) => event,
            Ok(None) => return Ok(()),
            Err(_) => return Err(StreamError::Io),
        };
        let local = event.destination.port;
        let Some(state) = streams.state.get_mut(&local) else { continue };
        match event.event_type {
            VsockEventType::Connected => *state = State::Open,
            VsockEventType::Disconnected { reason: DisconnectReason::Shutdown } => *state = State::PeerClosed,
            VsockEventType::Disconnected { reason: DisconnectReason::Reset } => *state = State::Reset,
            _ => {}
        }
    }
}

/// Runs `f` with the driver and the stream table; `NoDevice` if the VM has no vsock.
fn with<R>(f: impl FnOnce(&mut Manager, &mut Streams, &dyn Fn()) -> Result<R, StreamError>) -> Result<R, StreamError> {
    let mut device = VSOCK.lock();
    let gpa = device.gpa;
    let wait = move || notify_queue(gpa, WAIT_QUEUE);
    let manager = device.driver(setup).ok_or(StreamError::NoDevice)?;
    f(manager, &mut STREAMS.lock(), &wait)
}

/// Connects to the host's `port`; returns the stream's local port.
pub fn connect(port: u32) -> Result<u32, StreamError> {
    with(|manager, streams, wait| {
        let local = streams.next_port;
        streams.next_port = if local == u32::MAX - 1 { FIRST_LOCAL_PORT } else { local + 1 };
        manager.connect(host(port), local).map_err(|_| StreamError::Io)?;
        streams.state.insert(local, State::Connecting);
        for _ in 0..CONNECT_WAITS {
            drain(manager, streams)?;
            match streams.state.get(&local) {
                Some(State::Open) => return Ok(local),
                Some(State::Connecting) => wait(),
                _ => {
                    streams.remove(local);
                    return Err(StreamError::Refused);
                }
            }
        }
        let _ = manager.force_close(host(port), local);
        streams.remove(local);
        Err(StreamError::Refused)
    })
}

/// Sends all of `bytes`, waiting for the host's credit when it has none.
pub fn send(port: u32, local: u32, bytes: &[u8]) -> Result<(), StreamError> {
    with(|manager, streams, wait| {
        // Through a heap buffer, as for the console.
        let mut buffer = alloc::vec::Vec::with_capacity(SEND_CHUNK.min(bytes.len()));
        for chunk in bytes.chunks(SEND_CHUNK) {
            buffer.clear();
            buffer.extend_from_slice(chunk);
            loop {
                match manager.send(host(port), local, &buffer) {
                    Ok(()) => break,
                    Err(VirtioError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => {
                        drain(manager, streams)?;
                        match streams.state.get(&local) {
                            Some(State::Open) => wait(),
                            other => return Err(gone(other.copied())),
                        }
                    }
                    Err(_) => return Err(gone(streams.state.get(&local).copied())),
                }
            }
        }
        Ok(())
    })
}

/// Why a stream that cannot be used is gone.
fn gone(state: Option<State>) -> StreamError {
    match state {
        Some(State::PeerClosed) => StreamError::Closed,
        Some(State::Reset) => StreamError::Reset,
        _ => StreamError::NotConnected,
    }
}

/// Receives up to `out.len()` bytes, waiting until there are some; 0 when the host closed its
/// end and everything it sent has been read.
pub fn recv(port: u32, local: u32, out: &mut [u8]) -> Result<usize, StreamError> {
    with(|manager, streams, wait| {
        loop {
            drain(manager, streams)?;
            let state = streams.state.get(&local).copied();
            match manager.recv_buffer_available_bytes(host(port), local) {
                Ok(0) => {}
                Ok(_) => {
                    let n = manager.recv(host(port), local, out).map_err(|_| StreamError::Io)?;
                    let unreported = streams.unreported.entry(local).or_default();
                    *unreported += n as u32;
                    if *unreported >= STREAM_BUFFER / 2 {
                        *unreported = 0;
                        let _ = manager.update_credit(host(port), local);
                    }
                    return Ok(n);
                }
                Err(_) if state == Some(State::PeerClosed) => return Ok(0),
                Err(_) => return Err(gone(state)),
            }
            match state {
                Some(State::PeerClosed) => return Ok(0),
                Some(State::Open) => {}
                other => return Err(gone(other)),
            }
            // Nothing to read: tell the host what was consumed (which may be all it waits
            // for), or wait for it.
            match streams.unreported.insert(local, 0) {
                Some(n) if n > 0 => manager.update_credit(host(port), local).map_err(|_| StreamError::Io)?,
                _ => wait(),
            }
        }
    })
}

/// Closes a stream: the host delivers what the function sent, then closes its socket.
pub fn close(port: u32, local: u32) {
    let _ = with(|manager, streams, _| {
        let _ = drain(manager, streams);
        let _ = manager.shutdown(host(port), local);
        streams.remove(local);
        Ok(())
    });
}

/// Drops a stream without a word to the host (after a restore, when the host's end is gone).
pub fn forget(port: u32, local: u32) {
    let _ = with(|manager, streams, _| {
        let _ = manager.force_close(host(port), local);
        streams.remove(local);
        Ok(())
    });
}

/// Takes the device's pending events, so nothing is in flight when the VM is checkpointed.
pub fn quiesce() {
    if VSOCK.lock().driver.is_some() {
        let _ = with(|manager, streams, _| drain(manager, streams));
    }
}
