//! `thaw serve`'s peer fetcher: a process of its own that reads restore heads and pages from the
//! other nodes that hold images (`crate::remote::Peer`), so that the agent, which runs the VMs
//! those pages go into, never opens an IP socket. Like the registry puller (`puller.rs`), the
//! agent starts it before it confines itself, as its own binary run as `thaw __fetcher`, which
//! confines itself to the puller's list: the network, files it only reads, no KVM.
//!
//! Unlike a pull, page reads are many, small and concurrent (every VM's fault handler and each
//! image's prefetcher ask at once), so they speak in binary frames over the fetcher's stdin and
//! stdout, each with an id, answered in any order:
//!
//! ```text
//! request:  u32 length, u64 id, u8 op, then for op 1 (head): u64 stall in ms, the image URL;
//!           for op 2 (pages): u64 stall in ms, u64 first page, u64 count, the image URL;
//!           for op 0 (once, first): the admin token the peers take
//! answer:   u32 length, u64 id, u8 1 (the bytes follow) or 0 (an error line follows)
//! ```
//!
//! The agent checks what comes back as it checks anything from a peer: a head with
//! `Head::decode`, pages by their count.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{ChildStdin, ChildStdout};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::remote::Peer;

/// The hidden command the fetcher is run as.
pub const COMMAND: &str = "__fetcher";

/// The largest frame either side sends: a restore head at most, and its header.
const MAX_FRAME: u32 = (256 << 20) + 64;

const OP_TOKEN: u8 = 0;
const OP_HEAD: u8 = 1;
const OP_PAGES: u8 = 2;

/// Why the fetcher could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FetcherError {
    /// It could not be started.
    #[error("starting the peer fetcher ({COMMAND}): {0}")]
    Start(std::io::Error),
    /// It is gone (it cannot be started again once the agent is confined).
    #[error("the peer fetcher has ended; restart thaw serve to restore from peers again")]
    Gone,
    /// No answer came in time.
    #[error("the peer fetcher did not answer within {0:?}")]
    Late(Duration),
    /// The peer, or the fetcher's request to it, failed.
    #[error("{0}")]
    Failed(String),
}

/// The requests waiting for their answers, by id: `None` once the fetcher is gone.
type Waiting = Mutex<Option<HashMap<u64, mpsc::SyncSender<Result<Vec<u8>, String>>>>>;

/// The agent's end of the fetcher.
pub struct Fetcher {
    to: Mutex<ChildStdin>,
    waiting: Arc<Waiting>,
    next: AtomicU64,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").finish_non_exhaustive()
    }
}

impl Fetcher {
    /// Starts the fetcher, confined unless `confined` is false, and gives it the `token` peers
    /// take (this agent's admin token: every node has the same).
    pub fn start(confined: bool, token: Option<&str>) -> Result<Self, FetcherError> {
        let (to, from) = super::puller::spawn_helper(COMMAND, confined).map_err(FetcherError::Start)?;
        let waiting = Arc::new(Mutex::new(Some(HashMap::new())));
        let answers = Arc::clone(&waiting);
        std::thread::Builder::new()
            .name("thaw-fetcher".into())
            .spawn(move || dispatch(from, &answers))
            .map_err(FetcherError::Start)?;
        let fetcher = Self { to: Mutex::new(to), waiting, next: AtomicU64::new(1) };
        fetcher.send(0, OP_TOKEN, token.unwrap_or_default().as_bytes()).map_err(|_| FetcherError::Gone)?;
        Ok(fetcher)
    }

    fn send(&self, id: u64, op: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut to = self.to.lock().unwrap_or_else(|p| p.into_inner());
        to.write_all(&frame(id, op, payload)).and_then(|()| to.flush())
    }

    /// Sends a request and waits `within` for its answer.
    fn call(&self, op: u8, payload: &[u8], within: Duration) -> Result<Vec<u8>, FetcherError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        match self.waiting.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(waiting) => waiting.insert(id, tx),
            None => return Err(FetcherError::Gone),
        };
        if self.send(id, op, payload).is_err() {
            return Err(FetcherError::Gone);
        }
        let answer = rx.recv_timeout(within);
        if let Some(waiting) = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            waiting.remove(&id);
        }
        match answer {
            Ok(answer) => answer.map_err(FetcherError::Failed),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(FetcherError::Late(within)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(FetcherError::Gone),
        }
    }

    /// The restore head of the image at `url`, its bytes unchecked; the fetcher's reads of it
    /// and of its pages stall `stall` at most.
    pub fn head(&self, url: &str, stall: Duration) -> Result<Vec<u8>, FetcherError> {
        let mut payload = (stall.as_millis() as u64).to_le_bytes().to_vec();
        payload.extend_from_slice(url.as_bytes());
        self.call(OP_HEAD, &payload, stall * 3)
    }

    /// `count` pages from page `first` of the image at `url`, each of the fetcher's two tries
    /// stalling half of `within` at most.
    pub fn pages(&self, url: &str, first: u64, count: u64, within: Duration) -> Result<Vec<u8>, FetcherError> {
        let mut payload = ((within / 2).as_millis() as u64).to_le_bytes().to_vec();
        payload.extend_from_slice(&first.to_le_bytes());
        payload.extend_from_slice(&count.to_le_bytes());
        payload.extend_from_slice(url.as_bytes());
        self.call(OP_PAGES, &payload, within)
    }
}

/// One frame: its length, `id`, `kind` (a request's op or an answer's status) and `body`.
fn frame(id: u64, kind: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(13 + body.len());
    frame.extend_from_slice(&(9 + body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&id.to_le_bytes());
    frame.push(kind);
    frame.extend_from_slice(body);
    frame
}

/// Reads one frame: its id, its op or status byte, and the rest.
fn read_frame(from: &mut impl Read) -> std::io::Result<(u64, u8, Vec<u8>)> {
    let mut length = [0u8; 4];
    from.read_exact(&mut length)?;
    let length = u32::from_le_bytes(length);
    if !(9..=MAX_FRAME).contains(&length) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {length} bytes")));
    }
    let mut frame = vec![0u8; length as usize];
    from.read_exact(&mut frame)?;
    let id = u64::from_le_bytes(frame[..8].try_into().unwrap_or_default());
    let kind = frame[8];
    frame.drain(..9);
    Ok((id, kind, frame))
}

/// The agent's reader of answers: hands each to the request waiting for it; when the fetcher
/// is gone, fails every request then and after.
fn dispatch(mut from: ChildStdout, waiting: &Waiting) {
    while let Ok((id, ok, body)) = read_frame(&mut from) {
        let answer = if ok == 1 { Ok(body) } else { Err(String::from_utf8_lossy(&body).into_owned()) };
        if let Some(tx) = waiting.lock().unwrap_or_else(|p| p.into_inner()).as_mut().and_then(|w| w.remove(&id)) {
            let _ = tx.try_send(answer);
        }
    }
    // Dropping the senders wakes every waiting request with `Disconnected`.
    waiting.lock().unwrap_or_else(|p| p.into_inner()).take();
}

/// The pages of one image a peer holds, read through the fetcher: the page source of the
/// image the agent made of its head.
pub struct FetchedPages {
    /// The fetcher.
    pub fetcher: Arc<Fetcher>,
    /// The image's URL on the peer.
    pub url: String,
    /// How long a read may take before it counts as failed.
    pub within: Duration,
}

impl host_vmm::lazy::PageSource for FetchedPages {
    fn read(&self, first: u64, into: &mut [u8]) -> Result<(), String> {
        let count = into.len() as u64 / host_vmm::layout::PAGE_SIZE;
        let bytes = self.fetcher.pages(&self.url, first, count, self.within).map_err(|e| e.to_string())?;
        if bytes.len() != into.len() {
            return Err(format!("{} bytes for {count} pages, {} expected", bytes.len(), into.len()));
        }
        into.copy_from_slice(&bytes);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("peer {}", self.url)
    }
}

/// The fetcher itself (`thaw __fetcher`): confines itself (unless `confined` is false), then
/// answers the agent's frames, each on a thread of its own, until its stdin ends.
pub fn run(confined: bool) -> u8 {
    if let Err(e) = confined.then(host_vmm::seccomp::install_puller).transpose() {
        eprintln!("thaw: the peer fetcher: {e}");
        return 125;
    }
    let to = Arc::new(Mutex::new(std::io::stdout()));
    let peers: Arc<Mutex<HashMap<String, Arc<Peer>>>> = Arc::default();
    let mut token = String::new();
    let mut from = std::io::stdin().lock();
    while let Ok((id, op, payload)) = read_frame(&mut from) {
        if op == OP_TOKEN {
            token = String::from_utf8_lossy(&payload).into_owned();
            continue;
        }
        let (to, peers, token) = (Arc::clone(&to), Arc::clone(&peers), token.clone());
        std::thread::spawn(move || {
            let answer = answer(op, &payload, &peers, &token);
            let (ok, body) = match answer {
                Ok(bytes) => (1, bytes),
                Err(why) => (0, why.into_bytes()),
            };
            let mut to = to.lock().unwrap_or_else(|p| p.into_inner());
            let _ = to.write_all(&frame(id, ok, &body)).and_then(|()| to.flush());
        });
    }
    0
}

/// What the fetcher answers one request with.
fn answer(op: u8, payload: &[u8], peers: &Mutex<HashMap<String, Arc<Peer>>>, token: &str) -> Result<Vec<u8>, String> {
    let word = |at: usize| payload.get(at..at + 8).map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()));
    let stall = Duration::from_millis(word(0).ok_or("a request without its stall")?);
    // The peer of an image, made at its first request, read with the stall that request gave.
    let peer = |url: &str| -> Result<Arc<Peer>, String> {
        let mut peers = peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(peer) = peers.get(url) {
            return Ok(Arc::clone(peer));
        }
        let peer = Arc::new(
            Peer::with_token(url, (!token.is_empty()).then_some(token), stall * 2).map_err(|e| e.to_string())?,
        );
        peers.insert(url.to_string(), Arc::clone(&peer));
        Ok(peer)
    };
    match op {
        OP_HEAD => {
            let url = String::from_utf8_lossy(&payload[8..]).into_owned();
            peer(&url)?.head_bytes().map_err(crate::remote::PeerError::reason)
        }
        OP_PAGES => {
            let (first, count) = word(8).zip(word(16)).ok_or("a page request without its range")?;
            let url = String::from_utf8_lossy(payload.get(24..).unwrap_or_default()).into_owned();
            peer(&url)?.pages(first, count)
        }
        other => Err(format!("an unknown request {other}")),
    }
}
