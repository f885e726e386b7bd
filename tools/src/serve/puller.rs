//! `thaw serve`'s registry puller: a process of its own that takes the files deploys name by
//! reference from OCI registries (`oci::Source`), so that the agent itself never opens an IP
//! socket. The agent confines itself to Unix sockets before any guest runs
//! (`host_vmm::seccomp::install`); it starts the puller before that, as its own binary run as
//! `thaw __puller`, which confines itself to the network, files it only reads, and no KVM
//! (`host_vmm::seccomp::install_puller`). A guest that escaped into the agent could ask the
//! puller for a registry's file, and nothing else.
//!
//! They speak over the puller's stdin and stdout, one deploy at a time, in lines of JSON: the
//! agent sends `{"reference": REF}`; the puller answers `{"kind", "digest", "size"}` from the
//! manifest, or `{"error"}`; the agent sends `{"fetch": true}` for the file, or `false` when
//! it holds that digest already; the puller answers `{"size": N}` and the file's N bytes, checked
//! against the manifest as `thaw pull` checks them, or `{"error"}`. The agent checks them again.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use serde_json::json;

use crate::oci::{Kind, Listed, MAX_ARTIFACT_BYTES};

/// The hidden command the puller is run as.
pub const COMMAND: &str = "__puller";

/// Longest line either side sends.
const MAX_LINE: u64 = 64 << 10;

/// Why a file could not be pulled.
#[derive(Debug, thiserror::Error)]
pub enum PullerError {
    /// The puller could not be started.
    #[error("starting the registry puller ({COMMAND}): {0}")]
    Start(std::io::Error),
    /// The puller is gone (it cannot be started again once the agent is confined).
    #[error("the registry puller has ended ({0}); restart thaw serve to deploy by reference again")]
    Gone(String),
    /// The registry or its file was refused, as `thaw pull` would refuse them.
    #[error("{0}")]
    Refused(String),
    /// The puller answered what it must not.
    #[error("the registry puller answered out of turn: {0}")]
    Protocol(String),
}

/// The agent's end of the puller.
pub struct Puller {
    talk: Mutex<Talk>,
}

/// The pipes to the puller. Nothing waits for it or kills it (the agent's allow-list has
/// neither call): it ends when its stdin does, with the agent.
struct Talk {
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller").finish_non_exhaustive()
    }
}

impl Puller {
    /// Starts the puller: this binary, run as [`COMMAND`], confined unless `confined` is false
    /// (`thaw serve --no-seccomp`).
    pub fn start(confined: bool) -> Result<Self, PullerError> {
        let (to, from) = spawn_helper(COMMAND, confined).map_err(PullerError::Start)?;
        Ok(Self { talk: Mutex::new(Talk { to, from: BufReader::new(from) }) })
    }

    /// Pulls the bundle `reference` names, unless `held` says the agent has the file of its
    /// digest: then only the manifest is read. Returns its digest and, when fetched, the file,
    /// checked again here.
    pub fn pull(
        &self,
        reference: &str,
        held: impl FnOnce(&Listed) -> bool,
    ) -> Result<(Listed, Option<Vec<u8>>), PullerError> {
        let mut talk = self.talk.lock().unwrap_or_else(|p| p.into_inner());
        let talk = &mut *talk;
        send(&mut talk.to, &json!({ "reference": reference })).map_err(gone)?;
        let answer = receive(&mut talk.from).map_err(gone)?;
        let listed = listed_of(&answer)?;
        let fetch = !held(&listed);
        send(&mut talk.to, &json!({ "fetch": fetch })).map_err(gone)?;
        if !fetch {
            return Ok((listed, None));
        }
        let answer = receive(&mut talk.from).map_err(gone)?;
        if let Some(error) = answer["error"].as_str() {
            return Err(PullerError::Refused(error.to_string()));
        }
        if answer["size"].as_u64() != Some(listed.size) {
            return Err(PullerError::Protocol(format!("a file of {} bytes for {}", answer["size"], listed.size)));
        }
        let mut bytes = Vec::new();
        (&mut talk.from).take(listed.size).read_to_end(&mut bytes).map_err(gone)?;
        let digest = format!("sha256:{}", hex::encode(host_vmm::function::sha256(&bytes)));
        if bytes.len() as u64 != listed.size || digest != listed.digest {
            return Err(PullerError::Protocol(format!(
                "{} bytes of {digest} for the file of {} bytes and {}",
                bytes.len(),
                listed.size,
                listed.digest
            )));
        }
        Ok((listed, Some(bytes)))
    }
}

/// Starts a helper of the agent's (the puller, the peer fetcher): this binary run as `command`,
/// confined unless `confined` is false, spoken to over its stdin and stdout. Nothing waits for
/// it or kills it (the agent's allow-list has neither call): it ends when its stdin does.
pub fn spawn_helper(command: &str, confined: bool) -> std::io::Result<(ChildStdin, ChildStdout)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg(command)
        .args((!confined).then_some("--no-seccomp"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    match (child.stdin.take(), child.stdout.take()) {
        (Some(to), Some(from)) => Ok((to, from)),
        _ => Err(std::io::Error::other("no pipes")),
    }
}

/// [`PullerError::Gone`]: the pipe to the puller broke.
fn gone(e: std::io::Error) -> PullerError {
    PullerError::Gone(e.to_string())
}

/// What an answer to a reference says: the listing, or the registry's refusal.
fn listed_of(answer: &serde_json::Value) -> Result<Listed, PullerError> {
    if let Some(error) = answer["error"].as_str() {
        return Err(PullerError::Refused(error.to_string()));
    }
    let kind = match answer["kind"].as_str() {
        Some("bundle") => Kind::Bundle,
        Some("image") => Kind::Image,
        _ => return Err(PullerError::Protocol(format!("kind {}", answer["kind"]))),
    };
    let digest = answer["digest"].as_str().unwrap_or_default().to_string();
    let size = answer["size"].as_u64().filter(|&s| s <= MAX_ARTIFACT_BYTES);
    match size {
        Some(size) if crate::oci::is_digest(&digest) => Ok(Listed { kind, digest, size }),
        _ => Err(PullerError::Protocol(format!("digest {digest:?}, size {}", answer["size"]))),
    }
}

fn send(to: &mut impl Write, message: &serde_json::Value) -> std::io::Result<()> {
    let mut line = message.to_string();
    line.push('\n');
    to.write_all(line.as_bytes())?;
    to.flush()
}

/// One line of JSON, of at most [`MAX_LINE`] bytes.
fn receive(from: &mut impl BufRead) -> std::io::Result<serde_json::Value> {
    let mut line = Vec::new();
    from.take(MAX_LINE).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no whole line"));
    }
    serde_json::from_slice(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The puller itself (`thaw __puller`): confines itself (unless `confined` is false), then
/// answers the agent on stdin and stdout until stdin ends. Returns the exit code.
pub fn run(confined: bool) -> u8 {
    if let Err(e) = confined.then(host_vmm::seccomp::install_puller).transpose() {
        eprintln!("thaw: the registry puller: {e}");
        return 125;
    }
    let (stdin, stdout) = (std::io::stdin(), std::io::stdout());
    let (mut from, mut to) = (stdin.lock(), stdout.lock());
    while let Ok(request) = receive(&mut from) {
        let reference = request["reference"].as_str().unwrap_or_default().to_string();
        // Only loopback registries are spoken to in plain HTTP (and only when they have no
        // TLS): a deploy cannot ask for less.
        let mut source = match crate::oci::Source::open(&reference, false, crate::oci::STALL) {
            Ok(source) => source,
            Err(e) => {
                if send(&mut to, &json!({ "error": e.to_string() })).is_err() {
                    break;
                }
                continue;
            }
        };
        let listed = source.listed();
        let answer = match &listed {
            Ok(listed) => json!({
                "kind": if listed.kind == Kind::Bundle { "bundle" } else { "image" },
                "digest": listed.digest,
                "size": listed.size,
            }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        if send(&mut to, &answer).is_err() {
            break;
        }
        let Ok(listed) = listed else { continue };
        let Ok(fetch) = receive(&mut from) else { break };
        if fetch["fetch"] != true {
            continue;
        }
        let sent = match source.file(&listed) {
            Ok(bytes) => send(&mut to, &json!({ "size": bytes.len() })).and_then(|()| {
                to.write_all(&bytes)?;
                to.flush()
            }),
            Err(e) => send(&mut to, &json!({ "error": e.to_string() })),
        };
        if sent.is_err() {
            break;
        }
    }
    0
}
