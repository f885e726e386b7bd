//! Restoring from a peer that holds the image (issue 31): `thaw restore
//! http://HOST:PORT/v1/images/VERSION` asks a `thaw serve` that serves that version for its
//! restore head (`host_vmm::remote`), makes an image of it, and reads every other page from the
//! same server when a guest touches it ([`Peer`] is the page source behind
//! `host_vmm::lazy`). The peer's image routes are admin routes: with `--token-file`, the token
//! goes with every request.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use host_vmm::lazy::PageSource;
use host_vmm::remote::Head;

/// Why a peer could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The address is not one of a peer's images.
    #[error("{0:?} is not a peer's image: give http://HOST:PORT/v1/images/VERSION (VERSION: 64 hex digits)")]
    Url(String),
    /// A request to the peer failed.
    #[error("{url}: {why}")]
    Http {
        /// What was asked.
        url: String,
        /// What went wrong.
        why: String,
    },
    /// The head it sent is not one this thaw uses.
    #[error("{url}: {source}")]
    Head {
        /// Where it came from.
        url: String,
        /// What is wrong with it.
        source: host_vmm::remote::RemoteError,
    },
    /// The token file could not be read.
    #[error(transparent)]
    Token(#[from] crate::files::FilesError),
    /// No holder gave a restore head that checks out.
    #[error("no holder gave a good restore head: {0}")]
    NoHead(String),
    /// Holders named for one image serve different versions.
    #[error("{0} and {1} are not the same version: every holder must serve the image's")]
    Mixed(String, String),
}

impl PeerError {
    /// What went wrong, without the address when it is an answer's (the caller names the peer).
    pub fn reason(self) -> String {
        match self {
            Self::Http { why, .. } => why,
            e => e.to_string(),
        }
    }
}

/// The image that `urls` (each `http://HOST:PORT/v1/images/VERSION`, one version) all serve: its
/// restore head from the first holder that gives a good one, and a page source that reads from
/// all of them, another when one fails (`host_vmm::lazy::Holders`).
pub fn from_holders(
    urls: &[String],
    token_file: Option<&Path>,
    deadline: Duration,
) -> Result<(Head, host_vmm::lazy::Holders), PeerError> {
    let peers = urls.iter().map(|url| Peer::new(url, token_file, deadline)).collect::<Result<Vec<_>, _>>()?;
    let (first, version) = image_address(&urls[0])?;
    for url in &urls[1..] {
        if image_address(url)?.1 != version {
            return Err(PeerError::Mixed(first, url.clone()));
        }
    }
    let mut failures = Vec::new();
    let head = peers.iter().find_map(|peer| peer.head().map_err(|e| failures.push(e)).ok());
    let head = match head {
        Some(head) => head,
        // One holder: its error as it is (the tests and users match on it); more: each.
        None if failures.len() == 1 => return Err(failures.remove(0)),
        None => {
            let each: Vec<String> = failures.iter().map(ToString::to_string).collect();
            return Err(PeerError::NoHead(each.join("; ")));
        }
    };
    let sources = peers.into_iter().map(|peer| Arc::new(peer) as Arc<dyn PageSource>).collect();
    Ok((head, host_vmm::lazy::Holders::new(sources)))
}

/// The largest head a peer may send: metadata, working set and volume (a Python function's
/// volume holds its standard library).
const MAX_HEAD_BYTES: u64 = 256 << 20;

/// How long a peer may keep a restore waiting, to connect or for its next bytes, at most: a
/// request's timeout shortens it ([`Peer::new`]).
pub const STALL: Duration = Duration::from_secs(5);

/// A `thaw serve` that holds an image, and the image's address there.
pub struct Peer {
    agent: ureq::Agent,
    stall: Duration,
    /// `http://HOST:PORT/v1/images/VERSION`.
    image: String,
    authorization: Option<String>,
}

/// Whether `text` names a peer's image rather than a file.
pub fn is_peer_address(text: &Path) -> bool {
    text.to_str().is_some_and(|t| t.starts_with("http://") || t.starts_with("https://"))
}

/// The image at `url` (`http://HOST:PORT/v1/images/VERSION`): its address without a trailing
/// `/`, and its version.
pub fn image_address(url: &str) -> Result<(String, String), PeerError> {
    let image = url.trim_end_matches('/');
    let version = image.rsplit_once("/v1/images/").map(|(_, version)| version).unwrap_or_default();
    let is_version = version.len() == 64 && version.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !is_version || !is_peer_address(Path::new(image)) {
        return Err(PeerError::Url(url.into()));
    }
    Ok((image.to_string(), version.to_string()))
}

impl Peer {
    /// The peer at `url` (`http://HOST:PORT/v1/images/VERSION`), with the admin token in
    /// `token_file` if given. A page is read twice at most before the VM that needs it fails,
    /// so each read may stall half of `deadline` (a request's timeout), [`STALL`] at most.
    pub fn new(url: &str, token_file: Option<&Path>, deadline: Duration) -> Result<Self, PeerError> {
        let token = match token_file {
            None => None,
            Some(path) => {
                let bytes = crate::files::read_limited(path, 4096, "admin token", crate::files::READ_WITHIN)?;
                Some(String::from_utf8_lossy(&bytes).trim().to_string())
            }
        };
        Self::with_token(url, token.as_deref(), deadline)
    }

    /// [`Peer::new`], with the token itself.
    pub fn with_token(url: &str, token: Option<&str>, deadline: Duration) -> Result<Self, PeerError> {
        let (image, _) = image_address(url)?;
        let authorization = token.map(|token| format!("Bearer {token}"));
        let stall = (deadline / 2).clamp(Duration::from_millis(1), STALL);
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(stall))
            .timeout_per_read(Some(stall))
            .timeout_per_write(Some(stall))
            .build();
        Ok(Self { agent: ureq::Agent::new_with_config(config), stall, image, authorization })
    }

    /// GETs `url`, expecting 200 and at most `limit` bytes.
    fn get(&self, url: &str, limit: u64) -> Result<Vec<u8>, PeerError> {
        let failed = |why: String| PeerError::Http { url: url.into(), why };
        let mut request = self.agent.get(url);
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        let said = |e: ureq::Error| match e {
            ureq::Error::Timeout(_) => format!("the peer sent nothing for {:?}", self.stall),
            e => e.to_string(),
        };
        let mut answer = request.call().map_err(|e| failed(said(e)))?;
        let status = answer.status();
        let body = answer.body_mut().with_config().limit(limit).read_to_vec();
        if status != 200 {
            let text = body.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or(text);
            return Err(failed(format!("the peer answered {status}: {}", message.trim())));
        }
        body.map_err(|e| failed(said(e)))
    }

    /// The image's restore head, validated.
    pub fn head(&self) -> Result<Head, PeerError> {
        let bytes = self.head_bytes()?;
        Head::decode(&bytes).map_err(|source| PeerError::Head { url: format!("{}/head", self.image), source })
    }

    /// The image's restore head as the peer sent it, unchecked.
    pub fn head_bytes(&self) -> Result<Vec<u8>, PeerError> {
        self.get(&format!("{}/head", self.image), MAX_HEAD_BYTES)
    }

    /// `count` pages of the image from page `first`, exactly as many bytes as they hold.
    pub fn pages(&self, first: u64, count: u64) -> Result<Vec<u8>, String> {
        let url = format!("{}/pages?first={first}&count={count}", self.image);
        let expected = count.saturating_mul(host_vmm::layout::PAGE_SIZE);
        let bytes = self.get(&url, expected + 1).map_err(PeerError::reason)?;
        if bytes.len() as u64 != expected {
            return Err(format!("{} bytes for {count} pages, {expected} expected", bytes.len()));
        }
        Ok(bytes)
    }
}

impl PageSource for Peer {
    fn read(&self, first: u64, into: &mut [u8]) -> Result<(), String> {
        let count = into.len() as u64 / host_vmm::layout::PAGE_SIZE;
        into.copy_from_slice(&self.pages(first, count)?);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("peer {}", self.image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_peers_image_address_is_taken() {
        let version = "ab".repeat(32);
        assert!(Peer::new(&format!("http://10.0.0.2:8400/v1/images/{version}"), None, STALL).is_ok());
        assert!(Peer::new(&format!("http://10.0.0.2:8400/v1/images/{version}/"), None, STALL).is_ok());
        for bad in ["http://10.0.0.2:8400/v1/images/abc", "http://10.0.0.2:8400/", "ftp://x/v1/images/"] {
            let e = Peer::new(bad, None, STALL).err().unwrap().to_string();
            assert!(e.contains("is not a peer's image"), "{bad}: {e}");
        }
        assert!(is_peer_address(Path::new("https://x")) && !is_peer_address(Path::new("hello.snap")));
    }
}
