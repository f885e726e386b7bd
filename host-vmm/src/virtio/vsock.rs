//! virtio-vsock: stream connections from the guest to host services, Firecracker's way. A
//! connection to CID 2, port P becomes a connection to the host Unix socket the VMM was given
//! for P ([`Services`]: `--service P=SOCKET`, or `<uds path>_P`).
//!
//! Everything happens inside the guest's queue notifications, as for every thaw device:
//! - a transmit notification takes the guest's packets: a REQUEST connects the socket there and
//!   then (RESPONSE, or RST when nothing listens), RW bytes go to the socket, SHUTDOWN and RST
//!   close it;
//! - every notification then moves what is pending into the guest's receive buffers: replies,
//!   and bytes read (non-blocking) from the sockets, never more than the credit the guest gave;
//! - a notification of the event queue ([`abi::devices::vsock::WAIT_QUEUE`]) means the guest
//!   waits for data: the device first waits up to `WAIT_MS` for a socket to become readable.
//!
//! The backend is the service map; it is attached on the first connection request, and each
//! connection's socket is opened by its own REQUEST, so a restored VM holds no socket until its
//! guest reconnects. Protocol misuse (a wrong CID or type, an unknown operation, data past the
//! credit the device gave, a packet for no connection) resets that connection, as a real device
//! does; malformed packets (a header cut short, a length that disagrees with the buffers, a
//! receive buffer too small for a header) fail the VM.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::memory::GuestRam;
use abi::devices::DeviceKind;
use abi::devices::vsock::{GUEST_CID, HOST_CID, WAIT_MS, WAIT_QUEUE};

use super::queue::Queue;
use super::{DeviceError, DeviceModel};

/// Queue indices.
const RX: u32 = 0;
const TX: u32 = 1;
/// The packet header's size.
const HEADER_LEN: usize = 44;
/// VIRTIO_VSOCK_TYPE_STREAM.
const TYPE_STREAM: u16 = 1;
/// Smallest receive buffer the device accepts: a header and some data.
const MIN_RX_BUFFER: u64 = 64;
/// Largest payload one transmitted packet may carry.
const MAX_PAYLOAD: usize = 64 << 10;
/// What the device buffers per connection for the guest (its `buf_alloc`).
const BUF_ALLOC: u32 = 256 << 10;
/// Most bytes read from a service and not yet given to the guest, per connection, whatever
/// credit the guest claims (its `buf_alloc` may say 4 GiB): with [`MAX_CONNECTIONS`], a VM's
/// device buffers at most 16 MiB of service data.
const MAX_INBOUND: usize = 256 << 10;
/// Most connections open at once.
const MAX_CONNECTIONS: usize = 64;
/// Most replies waiting for receive buffers; past it, further resets are dropped.
const MAX_CONTROL: usize = 1024;

/// Packet operations.
mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
/// SHUTDOWN flags: the sender will receive / send no more.
const SHUTDOWN_RECEIVE: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

/// Where the host's services are.
#[derive(Debug, Clone, Default)]
pub struct Services {
    /// Port to Unix socket (`--service PORT=SOCKET`).
    pub ports: BTreeMap<u32, PathBuf>,
    /// Any other port P: the socket `<uds_path>_P` (Firecracker's convention).
    pub uds_path: Option<PathBuf>,
}

impl Services {
    /// The socket for `port`, if any.
    pub fn path(&self, port: u32) -> Option<PathBuf> {
        self.ports.get(&port).cloned().or_else(|| {
            self.uds_path.as_ref().map(|base| {
                let mut path = base.clone().into_os_string();
                path.push(format!("_{port}"));
                path.into()
            })
        })
    }
}

/// Connects a non-blocking stream to the Unix socket at `path` without waiting: a service whose
/// accept backlog is full refuses (`EAGAIN`) instead of stalling the vCPU thread.
fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid (unnamed) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(ErrorKind::InvalidInput.into());
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket this function just created and nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un, NUL-terminated within `len` bytes of its size.
    let rc = unsafe { libc::connect(fd, (&raw const addr).cast::<libc::sockaddr>(), len as libc::socklen_t) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// A packet header (virtio-vsock `struct virtio_vsock_hdr`, little-endian).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    /// Decodes the first [`HEADER_LEN`] bytes of `b` (which must hold them).
    fn parse(b: &[u8; HEADER_LEN]) -> Self {
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The header's encoding.
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A connection: (guest port, host port).
type Key = (u32, u32);

/// One open connection.
struct Connection {
    stream: UnixStream,
    /// The guest's receive buffer and how much of what it was sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes from the guest written to the socket.
    fwd_cnt: u32,
    /// Bytes from the guest not yet written to the socket.
    outbound: Vec<u8>,
    /// Bytes read from the socket not yet given to the guest (never more than its credit).
    inbound: VecDeque<u8>,
    /// The service closed its end.
    eof: bool,
    /// The device told the guest so.
    shutdown_sent: bool,
    /// The guest will send no more (shut the socket's write side once `outbound` is empty).
    guest_done_sending: bool,
    /// The guest closed both directions: reset once `outbound` is empty.
    closing: bool,
    /// The guest asked for credit while bytes were still buffered: tell it when they drain.
    credit_wanted: bool,
}

impl Connection {
    /// Bytes the guest can still take.
    fn guest_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// What the next receive buffer gets.
enum Next {
    Control,
    Data(Key),
    Shutdown(Key),
}

/// The vsock device.
pub struct Vsock {
    services: Services,
    attached: bool,
    connections: BTreeMap<Key, Connection>,
    /// Replies waiting for receive buffers.
    control: VecDeque<Header>,
    config: [u8; 8],
    /// Where socket reads land, allocated on the first exchange.
    read_buffer: Option<Box<[u8]>>,
}

impl Vsock {
    /// A device that will connect to `services`.
    pub fn new(services: Services) -> Self {
        Self {
            services,
            attached: false,
            connections: BTreeMap::new(),
            control: VecDeque::new(),
            config: GUEST_CID.to_le_bytes(),
            read_buffer: None,
        }
    }

    /// A header from the host's `port` to the guest's `guest_port`, with the connection's credit.
    fn reply(&self, (guest_port, port): Key, op: u16, len: u32, flags: u32) -> Header {
        let fwd_cnt = self.connections.get(&(guest_port, port)).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            src_port: port,
            dst_port: guest_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    fn send_control(&mut self, header: Header) {
        if self.control.len() < MAX_CONTROL {
            self.control.push_back(header);
        }
    }

    /// Drops the connection (if any) and tells the guest.
    fn reset(&mut self, key: Key) {
        self.connections.remove(&key);
        let header = self.reply(key, op::RST, 0, 0);
        self.send_control(header);
    }

    /// Handles one packet from the guest.
    fn packet(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.src_port, h.dst_port);
        if h.op == op::RST {
            // Never answer a reset, even a stray one.
            self.connections.remove(&key);
            return;
        }
        if h.src_cid != GUEST_CID || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            return self.reset(key);
        }
        if h.op == op::REQUEST {
            return self.connect(key, h);
        }
        let Some(c) = self.connections.get_mut(&key) else { return self.reset(key) };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RW if c.outbound.len() + payload.len() > BUF_ALLOC as usize || c.guest_done_sending => self.reset(key),
            op::RW => c.outbound.extend_from_slice(payload),
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                c.credit_wanted = !c.outbound.is_empty();
                let header = self.reply(key, op::CREDIT_UPDATE, 0, 0);
                self.send_control(header);
            }
            op::SHUTDOWN => {
                c.guest_done_sending |= h.flags & SHUTDOWN_SEND != 0;
                c.closing |= h.flags & (SHUTDOWN_SEND | SHUTDOWN_RECEIVE) == SHUTDOWN_SEND | SHUTDOWN_RECEIVE;
            }
            _ => self.reset(key),
        }
    }

    /// A connection request: connect to the port's service, or refuse.
    fn connect(&mut self, key: Key, h: &Header) {
        self.attached = true;
        self.connections.remove(&key);
        if self.connections.len() >= MAX_CONNECTIONS {
            return self.reset(key);
        }
        let Some(stream) = self.services.path(key.1).and_then(|path| connect(&path).ok()) else {
            return self.reset(key);
        };
        let connection = Connection {
            stream,
            peer_buf_alloc: h.buf_alloc,
            peer_fwd_cnt: h.fwd_cnt,
            tx_cnt: 0,
            fwd_cnt: 0,
            outbound: Vec::new(),
            inbound: VecDeque::new(),
            eof: false,
            shutdown_sent: false,
            guest_done_sending: false,
            closing: false,
            credit_wanted: false,
        };
        self.connections.insert(key, connection);
        let header = self.reply(key, op::RESPONSE, 0, 0);
        self.send_control(header);
    }

    /// Takes the guest's packets from the transmit queue.
    fn transmit(&mut self, tx: &mut Queue, mem: &GuestRam) -> Result<(), DeviceError> {
        while let Some(chain) = tx.pop(mem)? {
            let bytes = chain.read_all(mem, HEADER_LEN + MAX_PAYLOAD)?;
            let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
                return Err(DeviceError::State("vsock packet length", bytes.len() as u64));
            };
            let header = Header::parse(header);
            if header.len as usize != payload.len() {
                return Err(DeviceError::State("vsock packet length field", header.len.into()));
            }
            tx.add_used(mem, chain.head, 0)?;
            self.packet(&header, payload);
        }
        Ok(())
    }

    /// Writes what the guest sent to the sockets and reads what they have for it.
    fn exchange(&mut self) {
        let mut resets = Vec::new();
        let mut updates = Vec::new();
        let read_buffer = self.read_buffer.get_or_insert_with(|| vec![0u8; MAX_PAYLOAD].into_boxed_slice());
        for (&key, c) in &mut self.connections {
            while !c.outbound.is_empty() {
                match c.stream.write(&c.outbound) {
                    Ok(n) if n > 0 => {
                        c.outbound.drain(..n);
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    _ => {
                        resets.push(key);
                        break;
                    }
                }
            }
            if c.outbound.is_empty() {
                if c.credit_wanted {
                    c.credit_wanted = false;
                    updates.push(key);
                }
                if c.closing {
                    resets.push(key);
                    continue;
                }
                if c.guest_done_sending {
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            let room = (c.guest_credit() as usize).min(MAX_INBOUND).saturating_sub(c.inbound.len());
            if !c.eof && room > 0 {
                let buffer = &mut read_buffer[..room.min(MAX_PAYLOAD)];
                match c.stream.read(buffer) {
                    Ok(0) => c.eof = true,
                    Ok(n) => c.inbound.extend(&buffer[..n]),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(_) => resets.push(key),
                }
            }
        }
        for key in updates {
            let header = self.reply(key, op::CREDIT_UPDATE, 0, 0);
            self.send_control(header);
        }
        for key in resets {
            self.reset(key);
        }
    }

    /// What the next receive buffer would carry, if anything.
    fn next(&self) -> Option<Next> {
        if !self.control.is_empty() {
            return Some(Next::Control);
        }
        self.connections.iter().find_map(|(&key, c)| {
            if !c.inbound.is_empty() && c.guest_credit() > 0 {
                Some(Next::Data(key))
            } else if c.eof && c.inbound.is_empty() && !c.shutdown_sent {
                Some(Next::Shutdown(key))
            } else {
                None
            }
        })
    }

    /// Fills the guest's receive buffers with what is pending.
    fn deliver(&mut self, rx: &mut Queue, mem: &GuestRam) -> Result<(), DeviceError> {
        if !rx.state.ready {
            return Ok(());
        }
        while let Some(next) = self.next() {
            let Some(chain) = rx.pop(mem)? else { break };
            let room = chain.writable_len();
            if room < MIN_RX_BUFFER {
                return Err(DeviceError::State("vsock receive buffer length", room));
            }
            let (header, payload) = match next {
                Next::Control => (self.control.pop_front().unwrap_or_default(), Vec::new()),
                Next::Data(key) => match self.connections.get_mut(&key) {
                    Some(c) => {
                        let n = c.inbound.len().min(c.guest_credit() as usize).min(room as usize - HEADER_LEN);
                        let payload: Vec<u8> = c.inbound.drain(..n).collect();
                        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                        (self.reply(key, op::RW, n as u32, 0), payload)
                    }
                    None => (self.reply(key, op::RST, 0, 0), Vec::new()),
                },
                Next::Shutdown(key) => {
                    if let Some(c) = self.connections.get_mut(&key) {
                        c.shutdown_sent = true;
                    }
                    (self.reply(key, op::SHUTDOWN, 0, SHUTDOWN_SEND | SHUTDOWN_RECEIVE), Vec::new())
                }
            };
            chain.write_at(mem, 0, &header.encode())?;
            chain.write_at(mem, HEADER_LEN as u64, &payload)?;
            rx.add_used(mem, chain.head, (HEADER_LEN + payload.len()) as u32)?;
        }
        Ok(())
    }

    /// Waits up to `WAIT_MS` for a socket the guest can take bytes from to become readable.
    fn wait(&self) {
        let mut fds: Vec<libc::pollfd> = self
            .connections
            .values()
            .filter(|c| !c.eof && c.inbound.is_empty() && c.guest_credit() > 0)
            .map(|c| libc::pollfd { fd: c.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        if fds.is_empty() {
            return;
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures for the call, holding
        // descriptors the connections own; poll only writes their `revents`.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, WAIT_MS as libc::c_int) };
    }
}

impl DeviceModel for Vsock {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Vsock
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[64, 64, 64]
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn notify(&mut self, index: u32, queues: &mut [Queue], mem: &GuestRam) -> Result<(), DeviceError> {
        if index == TX {
            self.transmit(super::queue(queues, TX)?, mem)?;
        }
        self.exchange();
        if index == u32::from(WAIT_QUEUE) && self.next().is_none() {
            self.wait();
            self.exchange();
        }
        self.deliver(super::queue(queues, RX)?, mem)
    }

    fn attach(&mut self) -> Result<(), DeviceError> {
        self.attached = true;
        Ok(())
    }

    fn attached(&self) -> bool {
        self.attached
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::tests::memory;
    use abi::devices::QueueState;
    use std::os::unix::net::UnixListener;
    use vm_memory::{Bytes, GuestAddress};

    /// A fake driver's view of one queue: rings at `base`, buffers at `base + 0x800`.
    struct Ring {
        base: u64,
        offered: u16,
        seen: u16,
    }

    impl Ring {
        fn queue(&self) -> Queue {
            let mut q = Queue::new(64);
            q.state = QueueState {
                size: 8,
                ready: true,
                desc: self.base,
                avail: self.base + 0x200,
                used: self.base + 0x400,
                ..QueueState::default()
            };
            q
        }

        /// Offers one buffer of `len` bytes holding `bytes` (device-writable if `bytes` is empty).
        fn offer(&mut self, mem: &GuestRam, bytes: &[u8], len: u32) {
            let index = self.offered % 8;
            let addr = self.base + 0x800 + u64::from(index) * 0x200;
            mem.write_slice(bytes, GuestAddress(addr)).unwrap();
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&(if bytes.is_empty() { 2u16 } else { 0 }).to_le_bytes());
            mem.write_slice(&raw, GuestAddress(self.base + 16 * u64::from(index))).unwrap();
            mem.write_obj(index, GuestAddress(self.base + 0x200 + 4 + 2 * u64::from(index))).unwrap();
            self.offered += 1;
            mem.write_obj(self.offered, GuestAddress(self.base + 0x200 + 2)).unwrap();
        }

        /// The packets the device returned since the last call.
        fn used(&mut self, mem: &GuestRam) -> Vec<(Header, Vec<u8>)> {
            let idx: u16 = mem.read_obj(GuestAddress(self.base + 0x400 + 2)).unwrap();
            let mut out = Vec::new();
            while self.seen != idx {
                let entry = self.base + 0x400 + 4 + 8 * u64::from(self.seen % 8);
                let id: u32 = mem.read_obj(GuestAddress(entry)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(entry + 4)).unwrap();
                let mut bytes = vec![0u8; len as usize];
                mem.read_slice(&mut bytes, GuestAddress(self.base + 0x800 + u64::from(id) * 0x200)).unwrap();
                let (header, payload) = bytes.split_first_chunk::<HEADER_LEN>().unwrap();
                out.push((Header::parse(header), payload.to_vec()));
                self.seen += 1;
            }
            out
        }
    }

    struct Guest {
        mem: GuestRam,
        queues: Vec<Queue>,
        rx: Ring,
        tx: Ring,
        device: Vsock,
    }

    fn header(op: u16, port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: port,
            len,
            kind: TYPE_STREAM,
            op,
            buf_alloc: 4096,
            ..Header::default()
        }
    }

    impl Guest {
        fn new(services: Services) -> Self {
            Self::with_rx_buffers(services, 0x200)
        }

        fn with_rx_buffers(services: Services, len: u32) -> Self {
            let rx = Ring { base: 0x1000, offered: 0, seen: 0 };
            let tx = Ring { base: 0x3000, offered: 0, seen: 0 };
            let event = Ring { base: 0x5000, offered: 0, seen: 0 };
            let queues = vec![rx.queue(), tx.queue(), event.queue()];
            let mut guest = Self { mem: memory(), queues, rx, tx, device: Vsock::new(services) };
            for _ in 0..4 {
                guest.rx.offer(&guest.mem, &[], len);
            }
            guest
        }

        fn send(&mut self, h: Header, payload: &[u8]) -> Result<Vec<(Header, Vec<u8>)>, DeviceError> {
            let mut bytes = h.encode().to_vec();
            bytes.extend_from_slice(payload);
            self.tx.offer(&self.mem, &bytes, bytes.len() as u32);
            self.device.notify(TX, &mut self.queues, &self.mem)?;
            Ok(self.receive())
        }

        /// Returns the used receive buffers to the queue, as a driver does, and what they held.
        fn receive(&mut self) -> Vec<(Header, Vec<u8>)> {
            let packets = self.rx.used(&self.mem);
            for _ in &packets {
                self.rx.offer(&self.mem, &[], 0x200);
            }
            packets
        }

        fn wait(&mut self) -> Vec<(Header, Vec<u8>)> {
            self.device.notify(u32::from(WAIT_QUEUE), &mut self.queues, &self.mem).unwrap();
            self.receive()
        }
    }

    fn service() -> (tempfile::TempDir, PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc_5000");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    #[test]
    fn connects_exchanges_bytes_and_closes() {
        let (dir, _, listener) = service();
        let services = Services { uds_path: Some(dir.path().join("svc")), ..Services::default() };
        let mut guest = Guest::new(services);
        assert!(!guest.device.attached());
        let replies = guest.send(header(op::REQUEST, 5000, 0), &[]).unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!((replies[0].0.op, replies[0].0.dst_port, replies[0].0.src_port), (op::RESPONSE, 1024, 5000));
        assert!(guest.device.attached());
        let (mut peer, _) = listener.accept().unwrap();

        assert!(guest.send(header(op::RW, 5000, 6), b"ping\n!").unwrap().is_empty());
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping\n!");

        peer.write_all(b"pong\n").unwrap();
        let packets = guest.wait();
        assert_eq!(packets.len(), 1);
        assert_eq!((packets[0].0.op, packets[0].0.len, packets[0].0.fwd_cnt), (op::RW, 5, 6));
        assert_eq!(packets[0].1, b"pong\n");

        drop(peer);
        let packets = guest.wait();
        assert_eq!(packets[0].0.op, op::SHUTDOWN, "the service's close reaches the guest");
        assert!(guest.send(header(op::RST, 5000, 0), &[]).unwrap().is_empty(), "a reset is never answered");
        assert_eq!(guest.device.connections.len(), 0);
    }

    #[test]
    fn nothing_listening_or_no_service_is_a_reset() {
        let (_dir, path, listener) = service();
        drop(listener);
        let mut ports = BTreeMap::new();
        ports.insert(5000, path);
        let mut guest = Guest::new(Services { ports, uds_path: None });
        for port in [5000, 6000] {
            let replies = guest.send(header(op::REQUEST, port, 0), &[]).unwrap();
            assert_eq!(replies[0].0.op, op::RST, "port {port}");
        }
        assert_eq!(guest.device.connections.len(), 0);
    }

    #[test]
    fn the_guest_never_gets_more_than_its_credit() {
        let (_dir, path, listener) = service();
        let mut guest = Guest::new(Services { ports: [(5000, path)].into(), uds_path: None });
        let mut request = header(op::REQUEST, 5000, 0);
        request.buf_alloc = 100;
        guest.send(request, &[]).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        peer.write_all(&[7u8; 300]).unwrap();
        let first: usize = guest.wait().iter().map(|(_, p)| p.len()).sum();
        assert_eq!(first, 100);
        assert!(guest.wait().is_empty(), "no credit left");
        let mut update = header(op::CREDIT_UPDATE, 5000, 0);
        update.buf_alloc = 100;
        update.fwd_cnt = 100;
        let more: usize = guest.send(update, &[]).unwrap().iter().map(|(_, p)| p.len()).sum();
        assert_eq!(more, 100);
    }

    /// Issue 14, defect 4: the device read as much of a service's data as the guest's credit
    /// allowed, and a guest may claim 4 GiB of it without ever taking any.
    #[test]
    fn what_the_device_buffers_for_a_guest_is_capped_whatever_credit_it_claims() {
        let (_dir, path, listener) = service();
        let mut guest = Guest::new(Services { ports: [(5000, path)].into(), uds_path: None });
        let mut request = header(op::REQUEST, 5000, 0);
        request.buf_alloc = u32::MAX;
        guest.send(request, &[]).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let flood = std::thread::spawn(move || {
            let chunk = vec![1u8; 64 << 10];
            while peer.write_all(&chunk).is_ok() {}
        });
        // The guest never returns its receive buffers; the device keeps reading until its cap,
        // and no further however often it is notified.
        let buffered = |guest: &Guest| guest.device.connections.values().map(|c| c.inbound.len()).sum::<usize>();
        let started = std::time::Instant::now();
        while buffered(&guest) < MAX_INBOUND && started.elapsed() < std::time::Duration::from_secs(30) {
            guest.device.notify(u32::from(WAIT_QUEUE), &mut guest.queues, &guest.mem).unwrap();
        }
        for _ in 0..50 {
            guest.device.notify(u32::from(WAIT_QUEUE), &mut guest.queues, &guest.mem).unwrap();
        }
        assert_eq!(buffered(&guest), MAX_INBOUND);
        drop(guest);
        flood.join().unwrap();
    }

    #[test]
    fn protocol_misuse_resets_the_connection_and_malformed_packets_fail_the_vm() {
        let (_dir, path, listener) = service();
        let mut guest = Guest::new(Services { ports: [(5000, path)].into(), uds_path: None });
        let mut wrong_cid = header(op::REQUEST, 5000, 0);
        wrong_cid.dst_cid = 7;
        assert_eq!(guest.send(wrong_cid, &[]).unwrap()[0].0.op, op::RST);
        assert_eq!(guest.send(header(op::RW, 5000, 1), b"x").unwrap()[0].0.op, op::RST, "no connection");
        assert_eq!(guest.send(header(99, 5000, 0), &[]).unwrap()[0].0.op, op::RST, "unknown op");
        guest.send(header(op::REQUEST, 5000, 0), &[]).unwrap();
        let _peer = listener.accept().unwrap();
        let big = vec![0u8; 400];
        let mut sent = 0;
        let reset = loop {
            let replies = guest.send(header(op::RW, 5000, big.len() as u32), &big).unwrap();
            sent += big.len();
            if let Some((h, _)) = replies.first() {
                break h.op;
            }
            assert!(sent <= 4 * BUF_ALLOC as usize, "past the credit without a reset");
        };
        assert_eq!(reset, op::RST, "data past the credit (the service reads nothing)");

        let e = guest.send(header(op::RW, 5000, 10), b"abc").unwrap_err();
        assert!(e.is_guest_error() && e.to_string().contains("vsock packet length field"), "{e}");
        let mut guest = Guest::new(Services::default());
        guest.tx.offer(&guest.mem, &[1, 2, 3], 3);
        let e = guest.device.notify(TX, &mut guest.queues, &guest.mem).unwrap_err();
        assert!(e.to_string().contains("vsock packet length 0x3"), "{e}");
        let mut small = Guest::with_rx_buffers(Services::default(), 8);
        let e = small.send(header(op::REQUEST, 1, 0), &[]).unwrap_err();
        assert!(e.to_string().contains("vsock receive buffer length"), "{e}");
    }

    #[test]
    fn a_service_with_a_full_backlog_refuses_at_once() {
        let (_dir, path, listener) = service();
        // SAFETY: lowers the backlog of a socket the test owns and that already listens.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let mut guest = Guest::new(Services { ports: [(5000, path)].into(), uds_path: None });
        let mut ops = Vec::new();
        for port in 0..4 {
            let mut request = header(op::REQUEST, 5000, 0);
            request.src_port = 2000 + port;
            ops.extend(guest.send(request, &[]).unwrap().iter().map(|(h, _)| h.op));
        }
        assert_eq!(ops.first(), Some(&op::RESPONSE), "{ops:?}");
        assert_eq!(ops.last(), Some(&op::RST), "never accepted, never waited for: {ops:?}");
    }

    #[test]
    fn services_map_ports_or_follow_the_uds_convention() {
        let services = Services { ports: [(1, "/run/one".into())].into(), uds_path: Some("/run/v.sock".into()) };
        assert_eq!(services.path(1), Some("/run/one".into()));
        assert_eq!(services.path(52), Some("/run/v.sock_52".into()));
        assert_eq!(Services::default().path(52), None);
        let h = header(op::RW, 9, 3);
        assert_eq!(Header::parse(&h.encode()), h);
    }
}
