//! `thaw push` and `thaw pull`: function bundles (`.thaw`) and snapshot images (`.snap`) through
//! an OCI registry, over the OCI distribution API (docs/FORMAT.md, "In an OCI registry").
//!
//! An artifact is one OCI image manifest: thaw's `artifactType`, a config blob of thaw's media
//! type that carries the file's header facts, and the file itself as the one layer. The layer's
//! digest (the SHA-256 of the file) names the file wherever it goes. Pushing validates the file
//! first and uploads only the blobs the registry lacks; pulling checks the manifest (and its
//! digest, when the reference names one), then the file's size, digest and format, before it
//! writes the file atomically.
//!
//! A registry is spoken to in HTTPS, its certificate checked against the system's trusted
//! certificates (`SSL_CERT_FILE`, else the distribution's bundle, else Mozilla's); plain HTTP
//! only with `--insecure`, or to a registry on a loopback address that does not speak TLS (as
//! Docker does). A registry that answers 401 gets the credentials `docker login` left for it
//! ([`auth`]): itself, for Basic auth, or its token service, for a token (Bearer).

mod auth;

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The `artifactType` (and layer media type) of a function bundle.
pub const BUNDLE_TYPE: &str = "application/vnd.thaw.bundle.v1";
/// The `artifactType` (and layer media type) of a snapshot image.
pub const IMAGE_TYPE: &str = "application/vnd.thaw.image.v1";
/// The media type of the config blob.
pub const CONFIG_TYPE: &str = "application/vnd.thaw.config.v1+json";
/// The manifest's media type: an OCI image manifest.
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Largest manifest read.
const MAX_MANIFEST_BYTES: u64 = 64 << 10;
/// How long a registry may keep thaw waiting, unless `--timeout` says otherwise: to connect,
/// or for the next bytes of an answer or an upload (a large file may take longer in all).
pub const STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// Largest file pushed or pulled: it is held in memory.
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;

/// Arguments of `thaw push`.
#[derive(Args, Debug)]
pub struct PushArgs {
    /// The bundle (.thaw) or snapshot image (.snap) to push.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Where: REGISTRY/REPOSITORY[:TAG] (the tag defaults to latest), e.g.
    /// 127.0.0.1:5000/functions/hello:v1.
    #[arg(value_name = "REF")]
    reference: String,
    /// Speak plain HTTP, not HTTPS, to the registry and its token service.
    #[arg(long)]
    insecure: bool,
    /// Give up on a registry that takes this many seconds to connect, or to send or take the
    /// next bytes of an answer or an upload.
    #[arg(long, value_name = "SECONDS", default_value_t = STALL.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
}

/// Arguments of `thaw pull`.
#[derive(Args, Debug)]
pub struct PullArgs {
    /// What: REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]. With a digest, the manifest must have it.
    #[arg(value_name = "REF")]
    reference: String,
    /// Where to write the file [default: the repository's last name, with .thaw or .snap].
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Speak plain HTTP, not HTTPS, to the registry and its token service.
    #[arg(long)]
    insecure: bool,
    /// Give up on a registry that takes this many seconds to connect, or to send or take the
    /// next bytes of an answer or an upload.
    #[arg(long, value_name = "SECONDS", default_value_t = STALL.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
}

/// Why a push or pull failed.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference does not parse.
    #[error("{reference:?} is not a registry reference ({why}); write REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]")]
    Reference {
        /// The reference.
        reference: String,
        /// What is wrong with it.
        why: String,
    },
    /// A push reference with a digest.
    #[error("{0}: a push names a tag, not a digest (the registry computes the digest)")]
    PushDigest(String),
    /// The file could not be read or written.
    #[error(transparent)]
    File(#[from] crate::files::FilesError),
    /// The file is neither a bundle nor an image.
    #[error("{}: not a thaw bundle or snapshot image (it starts with {magic:02x?})", path.display())]
    NotArtifact {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        magic: Vec<u8>,
    },
    /// The bundle is not valid.
    #[error("{what}: {source}")]
    Bundle {
        /// The file or reference.
        what: String,
        /// Why.
        source: abi::bundle::BundleError,
    },
    /// The image is not valid.
    #[error("{what}: {source}")]
    Image {
        /// The file or reference.
        what: String,
        /// Why.
        source: host_vmm::snapshot::SnapshotError,
    },
    /// The registry could not be reached, or broke the connection.
    #[error("{url}: {source}")]
    Connection {
        /// The URL.
        url: String,
        /// Why.
        source: Box<ureq::Error>,
    },
    /// The registry kept thaw waiting past `--timeout`.
    #[error(
        "{url}: the registry kept thaw waiting {seconds} s (to connect, or for the next bytes); give --timeout SECONDS to wait longer"
    )]
    Stalled {
        /// The URL.
        url: String,
        /// The limit.
        seconds: u64,
    },
    /// The registry refused a request.
    #[error("{url}: the registry answered {status}: {body}")]
    Refused {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The start of its answer.
        body: String,
    },
    /// What the registry sent is not what thaw pushes.
    #[error("{reference}: {why}")]
    Manifest {
        /// The reference.
        reference: String,
        /// What is wrong.
        why: String,
    },
    /// The file the registry sent is not the one the manifest names.
    #[error("{reference}: the registry sent {got}, not the {expected} the manifest names")]
    Mismatch {
        /// The reference.
        reference: String,
        /// What the manifest names.
        expected: String,
        /// What arrived.
        got: String,
    },
    /// The trusted certificates could not be read.
    #[error("{}: the certificates to trust: {why}", file.display())]
    Trust {
        /// The file (`SSL_CERT_FILE`, or the system's bundle).
        file: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The registry's login could not be made.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// A token service in plain HTTP off loopback, which would get the credentials unprotected.
    #[error(
        "{registry} sends thaw to the token service {realm}, which plain HTTP off loopback would not keep private; give --insecure to use it anyway"
    )]
    RealmNotLoopback {
        /// The registry.
        registry: String,
        /// The token service.
        realm: String,
    },
    /// The summary could not be written.
    #[error(transparent)]
    Output(#[from] crate::OutputError),
}

/// A parsed `REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// `a/b/c`, lower-case components as the distribution spec allows.
    pub repository: String,
    /// The tag, `latest` when neither a tag nor a digest is given.
    pub tag: Option<String>,
    /// `sha256:` and 64 hex digits.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `text`, checking each part as the OCI distribution spec writes it.
    pub fn parse(text: &str) -> Result<Self, OciError> {
        let bad = |why: &str| OciError::Reference { reference: text.to_string(), why: why.to_string() };
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                if !digest.starts_with("sha256:") {
                    return Err(bad("the digest is not sha256:HEX"));
                }
                if !is_digest(digest) {
                    return Err(bad("the digest is not 64 lower-case hex digits"));
                }
                (rest, Some(digest.to_string()))
            }
            None => (text, None),
        };
        let (registry, path) = rest.split_once('/').ok_or_else(|| bad("it names no registry"))?;
        if registry.is_empty() || !registry.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)) {
            return Err(bad("the registry is not host[:port]"));
        }
        // A tag follows the last ':' after the last '/'.
        let (repository, tag) = match path.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')) {
            Some((repository, tag)) => (repository, Some(tag)),
            None => (path, None),
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && c.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
        };
        if repository.len() > 255 || !repository.split('/').all(component_ok) {
            return Err(bad("the repository is not lower-case names of a-z 0-9 . _ - joined by /"));
        }
        if let Some(tag) = tag {
            let ok = (1..=128).contains(&tag.len())
                && tag.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(bad("the tag is not 1 to 128 of A-Z a-z 0-9 . _ - (not starting with . or -)"));
            }
        }
        let tag = tag.map(str::to_string).or_else(|| digest.is_none().then(|| "latest".to_string()));
        Ok(Self { registry: registry.to_string(), repository: repository.to_string(), tag, digest })
    }

    /// What a manifest request names: the digest when there is one, else the tag.
    fn manifest_name(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// Whether the registry is on a loopback address.
    fn is_loopback(&self) -> bool {
        is_loopback(&self.registry)
    }
}

/// Whether `authority` (`host[:port]`) is a loopback address.
fn is_loopback(authority: &str) -> bool {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Which of thaw's files an artifact is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A function bundle (`.thaw`).
    Bundle,
    /// A snapshot image (`.snap`).
    Image,
}

impl Kind {
    fn media_type(self) -> &'static str {
        match self {
            Self::Bundle => BUNDLE_TYPE,
            Self::Image => IMAGE_TYPE,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Bundle => "thaw",
            Self::Image => "snap",
        }
    }

    fn of_magic(bytes: &[u8]) -> Option<Self> {
        match bytes.get(..8)? {
            m if m == abi::codec::magic::BUNDLE => Some(Self::Bundle),
            m if m == abi::codec::magic::IMAGE => Some(Self::Image),
            _ => None,
        }
    }
}

/// Whether `text` is `sha256:` and 64 lower-case hex digits.
pub(crate) fn is_digest(text: &str) -> bool {
    text.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// `sha256:` and the hex SHA-256 of `bytes`.
fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Validates `bytes` as a `kind` file (`what` names it in errors), and returns the facts its
/// config blob carries.
fn validate(kind: Kind, bytes: &[u8], path: &Path, what: &str) -> Result<serde_json::Value, OciError> {
    match kind {
        Kind::Bundle => {
            let bundle =
                abi::bundle::parse(bytes).map_err(|source| OciError::Bundle { what: what.to_string(), source })?;
            let version = u32::from_le_bytes(bytes.get(8..12).and_then(|b| b.try_into().ok()).unwrap_or_default());
            Ok(json!({
                "kind": "bundle",
                "format_version": version,
                "name": bundle.manifest.name,
                "memory_mib": bundle.manifest.memory_mib,
                "wasm_bytes": bundle.wasm.len(),
                "code_bytes": bundle.code.len(),
                "volume_bytes": bundle.volume_len,
            }))
        }
        Kind::Image => {
            let image =
                host_vmm::Image::open(path).map_err(|source| OciError::Image { what: what.to_string(), source })?;
            let info = &image.info;
            let stored = image.stored_bytes().map_err(|source| OciError::Image { what: what.to_string(), source })?;
            let runs: Vec<_> = info
                .working_set
                .iter()
                .map(|r| json!({ "start": r.start, "pages": r.pages, "written": r.written }))
                .collect();
            Ok(json!({
                "kind": "image",
                "format_version": info.version,
                "guest_memory_bytes": info.guest_memory_size(),
                "stored_pages": stored / abi::image::PAGE_SIZE,
                "working_set": runs,
            }))
        }
    }
}

/// Requests to one registry, logged in as its challenges ask: a 401 is answered ([`auth`]) and
/// the request sent once more; what the answer earned goes with every later request.
struct Session {
    agent: ureq::Agent,
    registry: String,
    insecure: bool,
    stall: std::time::Duration,
    /// The `Authorization` the last challenge earned.
    authorization: Option<String>,
}

impl Session {
    fn new(reference: &Reference, insecure: bool, stall: std::time::Duration) -> Result<Self, OciError> {
        let tls = ureq::tls::TlsConfig::builder().root_certs(trusted()?).build();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .timeout_resolve(Some(stall))
            .timeout_connect(Some(stall))
            .timeout_per_read(Some(stall))
            .timeout_per_write(Some(stall))
            .build();
        let agent = ureq::Agent::new_with_config(config);
        Ok(Self { agent, registry: reference.registry.clone(), insecure, stall, authorization: None })
    }

    /// The base URL of `reference`'s repository: HTTPS, but for plain HTTP with `--insecure`,
    /// or on a loopback address when the registry there does not speak TLS (it answers an HTTPS
    /// request, whatever the status, or fails for a reason other than its certificate).
    fn base(&self, reference: &Reference) -> Result<String, OciError> {
        let path = format!("/v2/{}", reference.repository);
        if self.insecure {
            return Ok(format!("http://{}{path}", self.registry));
        }
        let secure = format!("https://{}{path}", self.registry);
        if !reference.is_loopback() {
            return Ok(secure);
        }
        let probe = format!("https://{}/v2/", self.registry);
        match self.call("GET", &probe, &[], None) {
            Ok(_) => Ok(secure),
            Err(OciError::Connection { source, .. }) if is_untrusted(&source) => {
                Err(OciError::Connection { url: probe, source })
            }
            Err(_) => Ok(format!("http://{}{path}", self.registry)),
        }
    }

    /// Sends `method` to `url` with `headers` and `body`, and returns the answer, or the
    /// registry's refusal unless `ok` takes its status.
    fn send(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        ok: &[u16],
    ) -> Result<ureq::http::Response<ureq::Body>, OciError> {
        let mut answer = self.call(method, url, &with_login(headers, self.authorization.as_deref()), body)?;
        if answer.status().as_u16() == 401 {
            let challenge = answer.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("");
            self.authorization = Some(self.log_in(challenge)?);
            answer = self.call(method, url, &with_login(headers, self.authorization.as_deref()), body)?;
        }
        refused_unless(answer, url, ok)
    }

    /// One request with exactly `headers`: no login added.
    fn call(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<ureq::http::Response<ureq::Body>, OciError> {
        let mut request = ureq::http::Request::builder().method(method).uri(url);
        for &(name, value) in headers {
            request = request.header(name, value);
        }
        let sent = match body {
            Some(body) => request.body(body).map_err(ureq::Error::Http).and_then(|r| self.agent.run(r)),
            None => request.body(()).map_err(ureq::Error::Http).and_then(|r| self.agent.run(r)),
        };
        sent.map_err(|source| self.failed(url, source))
    }

    /// The error for `url`'s request or answer failing with `source`.
    fn failed(&self, url: &str, source: ureq::Error) -> OciError {
        match source {
            ureq::Error::Timeout(_) => OciError::Stalled { url: url.to_string(), seconds: self.stall.as_secs() },
            source => OciError::Connection { url: url.to_string(), source: Box::new(source) },
        }
    }

    /// The `Authorization` that answers `challenge`, with the credentials `docker login` left.
    fn log_in(&self, challenge: &str) -> Result<String, OciError> {
        let challenge = auth::Challenge::parse(challenge, &self.registry)?;
        let path = auth::config_path().unwrap_or_else(|| PathBuf::from("~/.docker/config.json"));
        let credentials = match auth::login(&path, &self.registry)? {
            auth::Login::Credentials(credentials) => Some(credentials),
            auth::Login::Helper(helper) => {
                return Err(auth::AuthError::Helper { registry: self.registry.clone(), helper, path }.into());
            }
            auth::Login::None => None,
        };
        let (realm, service, scope) = match (challenge, credentials.as_ref()) {
            (auth::Challenge::Basic, Some(credentials)) => return Ok(credentials.basic()),
            (auth::Challenge::Basic, None) => {
                return Err(auth::AuthError::NoCredentials { registry: self.registry.clone(), path }.into());
            }
            (auth::Challenge::Bearer { realm, service, scope }, _) => (realm, service, scope),
        };
        // The token service gets the credentials: in HTTPS, or in plain HTTP where the registry
        // could be spoken to in it.
        let authority = realm.split_once("://").map_or("", |(_, rest)| rest.split(['/', '?']).next().unwrap_or(""));
        if realm.starts_with("http://") && !(self.insecure || is_loopback(authority)) {
            return Err(OciError::RealmNotLoopback { registry: self.registry.clone(), realm });
        }
        let url = auth::Challenge::token_url(&realm, service.as_deref(), scope.as_deref());
        let basic = credentials.map(|c| c.basic());
        let headers: Vec<(&str, &str)> = basic.iter().map(|b| ("authorization", b.as_str())).collect();
        let mut answer =
            refused_unless(self.call("GET", &url, &headers, None)?, &url, &[200]).map_err(|e| match e {
                OciError::Refused { status, body, .. } => auth::AuthError::Token {
                    realm: realm.clone(),
                    why: format!("the token service answered {status}: {body}"),
                }
                .into(),
                e => e,
            })?;
        let body = answer
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST_BYTES)
            .read_to_vec()
            .map_err(|source| self.failed(&url, source))?;
        Ok(format!("Bearer {}", auth::token_of(&body, &realm)?))
    }
}

/// `headers`, and `authorization` when there is one.
fn with_login<'a>(headers: &[(&'a str, &'a str)], authorization: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    headers.iter().copied().chain(authorization.map(|a| ("authorization", a))).collect()
}

/// Whether `error` is a TLS peer's certificate refused (which rustls reports inside an I/O error).
fn is_untrusted(error: &ureq::Error) -> bool {
    let rustls = match error {
        ureq::Error::Rustls(e) => Some(e),
        ureq::Error::Io(e) => e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    matches!(rustls, Some(rustls::Error::InvalidCertificate(_)))
}

/// The certificates a registry's must chain to: those of the file `SSL_CERT_FILE` names, else
/// the distribution's bundle of the system's trusted ones, else (on a system with neither)
/// Mozilla's, built into thaw.
fn trusted() -> Result<ureq::tls::RootCerts, OciError> {
    const BUNDLES: [&str; 3] =
        ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];
    let named = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()).map(PathBuf::from);
    let Some(file) = named.or_else(|| BUNDLES.iter().map(PathBuf::from).find(|f| f.is_file())) else {
        return Ok(ureq::tls::RootCerts::WebPki);
    };
    let bad = |why: String| OciError::Trust { file: file.clone(), why };
    let pem = crate::files::read_limited(&file, 16 << 20, "certificate bundle", crate::files::READ_WITHIN)?;
    let mut certificates = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(certificate) = item.map_err(|e| bad(e.to_string()))? {
            certificates.push(certificate);
        }
    }
    if certificates.is_empty() {
        return Err(bad("it holds no PEM certificate".into()));
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certificates))
}

/// The answer, or the registry's refusal unless `ok` takes its status.
fn refused_unless(
    mut response: ureq::http::Response<ureq::Body>,
    url: &str,
    ok: &[u16],
) -> Result<ureq::http::Response<ureq::Body>, OciError> {
    let status = response.status().as_u16();
    if ok.contains(&status) {
        return Ok(response);
    }
    let body = response.body_mut().with_config().limit(4096).read_to_string().unwrap_or_default();
    let body: String = body.chars().take(300).map(|c| if c.is_control() { ' ' } else { c }).collect();
    Err(OciError::Refused { url: url.to_string(), status, body: body.trim().to_string() })
}

/// Uploads `bytes` as the blob `digest` unless the registry has it; returns whether it did.
fn upload_blob(session: &mut Session, base: &str, digest: &str, bytes: &[u8]) -> Result<bool, OciError> {
    let url = format!("{base}/blobs/{digest}");
    if session.send("HEAD", &url, &[], None, &[200, 404])?.status().as_u16() == 200 {
        return Ok(false);
    }
    let start = format!("{base}/blobs/uploads/");
    let started = session.send("POST", &start, &[], Some(&[]), &[202])?;
    let location = started
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| OciError::Refused { url: start.clone(), status: 202, body: "no Location header".into() })?;
    // The Location is a path on the registry, or an absolute URL there: the file goes to the
    // registry the reference names, nowhere else.
    let origin = base.split("/v2/").next().unwrap_or(base);
    let location = if location.starts_with('/') {
        format!("{origin}{location}")
    } else if location.starts_with(&format!("{origin}/")) {
        location.to_string()
    } else {
        return Err(OciError::Refused {
            url: start,
            status: 202,
            body: format!("its upload Location {location:?} is not on {origin}"),
        });
    };
    let separator = if location.contains('?') { '&' } else { '?' };
    let put = format!("{location}{separator}digest={digest}");
    session.send("PUT", &put, &[("content-type", "application/octet-stream")], Some(bytes), &[201])?;
    Ok(true)
}

/// `thaw push`.
pub fn push(args: &PushArgs) -> Result<u8, OciError> {
    let reference = Reference::parse(&args.reference)?;
    if reference.digest.is_some() {
        return Err(OciError::PushDigest(args.reference.clone()));
    }
    let bytes = crate::files::read_limited(&args.file, MAX_ARTIFACT_BYTES, "file", crate::files::READ_WITHIN)?;
    let kind = Kind::of_magic(&bytes).ok_or_else(|| OciError::NotArtifact {
        path: args.file.clone(),
        magic: bytes.iter().take(8).copied().collect(),
    })?;
    let facts = validate(kind, &bytes, &args.file, &args.file.display().to_string())?;
    let config = serde_json::to_vec(&facts).unwrap_or_default();
    let (layer_digest, config_digest) = (digest_of(&bytes), digest_of(&config));

    let mut session = Session::new(&reference, args.insecure, std::time::Duration::from_secs(args.timeout))?;
    let base = session.base(&reference)?;
    let sent = upload_blob(&mut session, &base, &layer_digest, &bytes)?;
    upload_blob(&mut session, &base, &config_digest, &config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": kind.media_type(),
        "config": { "mediaType": CONFIG_TYPE, "digest": config_digest, "size": config.len() },
        "layers": [{
            "mediaType": kind.media_type(),
            "digest": layer_digest,
            "size": bytes.len(),
            "annotations": { "org.opencontainers.image.title": args.file.file_name().map(|n| n.to_string_lossy().into_owned()) },
        }],
    });
    let manifest = serde_json::to_vec(&manifest).unwrap_or_default();
    let url = format!("{base}/manifests/{}", reference.manifest_name());
    session.send("PUT", &url, &[("content-type", MANIFEST_TYPE)], Some(&manifest), &[201])?;
    let shown = if sent { "" } else { " (the registry had the file already)" };
    eprintln!("thaw: pushed {} to {}{shown}", args.file.display(), args.reference);
    outln!("{}@{}", args.reference.split('@').next().unwrap_or_default(), digest_of(&manifest))?;
    outln!("file {layer_digest}")?;
    Ok(0)
}

/// The one layer of a thaw manifest: its kind, digest and size.
fn layer_of(manifest: &[u8], reference: &str) -> Result<(Kind, String, u64), OciError> {
    let bad = |why: String| OciError::Manifest { reference: reference.to_string(), why };
    let value: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| bad(format!("the manifest is not JSON: {e}")))?;
    if value["mediaType"] != MANIFEST_TYPE {
        return Err(bad(format!("the manifest's mediaType is {}, not {MANIFEST_TYPE}", value["mediaType"])));
    }
    let kind = match value["artifactType"].as_str() {
        Some(BUNDLE_TYPE) => Kind::Bundle,
        Some(IMAGE_TYPE) => Kind::Image,
        _ => {
            return Err(bad(format!(
                "not a thaw artifact: its artifactType is {}, not {BUNDLE_TYPE} or {IMAGE_TYPE}",
                value["artifactType"]
            )));
        }
    };
    let layers = value["layers"].as_array().map_or(&[][..], Vec::as_slice);
    let [layer] = layers else {
        return Err(bad(format!("the manifest has {} layers, not the one file", layers.len())));
    };
    if layer["mediaType"] != kind.media_type() {
        return Err(bad(format!("its layer's mediaType is {}, not {}", layer["mediaType"], kind.media_type())));
    }
    let digest = layer["digest"].as_str().unwrap_or_default();
    if !is_digest(digest) {
        return Err(bad(format!("its layer's digest {digest:?} is not sha256:HEX")));
    }
    let size =
        layer["size"].as_u64().ok_or_else(|| bad(format!("its layer's size {} is not a number", layer["size"])))?;
    if size > MAX_ARTIFACT_BYTES {
        return Err(bad(format!("its layer is {size} bytes, more than the {MAX_ARTIFACT_BYTES} thaw pulls")));
    }
    Ok((kind, digest.to_string(), size))
}

/// Writes `bytes` to `file` leaving its all-zero pages as holes, as `thaw snapshot` writes an
/// image: most of an image's guest memory is zero.
fn write_sparse(file: &std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let page = abi::image::PAGE_SIZE as usize;
    for (index, chunk) in bytes.chunks(page).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            file.write_all_at(chunk, (index * page) as u64)?;
        }
    }
    file.set_len(bytes.len() as u64)?;
    file.sync_all()
}

/// A thaw artifact as a registry's manifest names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Which file it is.
    pub kind: Kind,
    /// The file's digest (`sha256:HEX`): its SHA-256.
    pub digest: String,
    /// The file's size in bytes.
    pub size: u64,
}

/// One repository of a registry, read: what `thaw pull` and `thaw serve`'s deploys by reference
/// take a file from. Each answer is checked before it is given.
pub struct Source {
    session: Session,
    base: String,
    reference: Reference,
    /// The reference as given, which errors name.
    text: String,
}

impl Source {
    /// Opens the repository `text` names (`--insecure`: plain HTTP), giving up on a registry
    /// that keeps thaw waiting for `stall`.
    pub fn open(text: &str, insecure: bool, stall: std::time::Duration) -> Result<Self, OciError> {
        let reference = Reference::parse(text)?;
        let session = Session::new(&reference, insecure, stall)?;
        let base = session.base(&reference)?;
        Ok(Self { session, base, reference, text: text.to_string() })
    }

    /// The reference's repository (`a/b/c`).
    pub fn repository(&self) -> &str {
        &self.reference.repository
    }

    /// Reads the manifest the reference names (of at most 64 KiB, with the digest the
    /// reference gives, if it gives one) and the file it names.
    pub fn listed(&mut self) -> Result<Listed, OciError> {
        let url = format!("{}/manifests/{}", self.base, self.reference.manifest_name());
        let mut answer = self.session.send("GET", &url, &[("accept", MANIFEST_TYPE)], None, &[200])?;
        let manifest = answer
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST_BYTES)
            .read_to_vec()
            .map_err(|source| self.session.failed(&url, source))?;
        if let Some(expected) = &self.reference.digest {
            let got = digest_of(&manifest);
            if &got != expected {
                return Err(OciError::Mismatch {
                    reference: self.text.clone(),
                    expected: format!("manifest {expected}"),
                    got: format!("a manifest of {got}"),
                });
            }
        }
        let (kind, digest, size) = layer_of(&manifest, &self.text)?;
        Ok(Listed { kind, digest, size })
    }

    /// The file `listed` names, of its size and digest, and starting as its kind does.
    pub fn file(&mut self, listed: &Listed) -> Result<Vec<u8>, OciError> {
        let Listed { kind, digest, size } = listed;
        let url = format!("{}/blobs/{digest}", self.base);
        let mut answer = self.session.send("GET", &url, &[], None, &[200])?;
        // One byte past the size: a longer blob is caught, not cut to fit.
        let bytes = answer
            .body_mut()
            .with_config()
            .limit(size + 1)
            .read_to_vec()
            .map_err(|source| self.session.failed(&url, source))?;
        let got = digest_of(&bytes);
        if bytes.len() as u64 != *size || &got != digest {
            return Err(OciError::Mismatch {
                reference: self.text.clone(),
                expected: format!("file of {size} bytes and {digest}"),
                got: format!("{} bytes of {got}", bytes.len()),
            });
        }
        if Kind::of_magic(&bytes) != Some(*kind) {
            return Err(OciError::Manifest {
                reference: self.text.clone(),
                why: format!("its file is not the {} its artifactType says", kind.extension()),
            });
        }
        Ok(bytes)
    }
}

/// Whether the file at `path` is the one `listed` names: its size, and then its digest.
fn holds(path: &Path, listed: &Listed) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == listed.size)
        && crate::files::read_limited(path, MAX_ARTIFACT_BYTES, "file", crate::files::READ_WITHIN)
            .is_ok_and(|bytes| digest_of(&bytes) == listed.digest)
}

/// `thaw pull`.
pub fn pull(args: &PullArgs) -> Result<u8, OciError> {
    let mut source = Source::open(&args.reference, args.insecure, std::time::Duration::from_secs(args.timeout))?;
    let listed = source.listed()?;
    let output = args.output.clone().unwrap_or_else(|| {
        let name = source.repository().rsplit('/').next().unwrap_or("function");
        PathBuf::from(format!("{name}.{}", listed.kind.extension()))
    });
    // The file is named by its digest: one that is here already is not fetched again.
    if holds(&output, &listed) {
        eprintln!("thaw: {} holds {} already ({}): nothing pulled", output.display(), args.reference, listed.digest);
        return Ok(0);
    }
    let bytes = source.file(&listed)?;
    let Listed { kind, digest, .. } = listed;
    // The whole file is checked before it takes the output's name: a bundle as it is, an image
    // (which is checked where it lies) under a temporary name beside it.
    match kind {
        Kind::Bundle => {
            validate(kind, &bytes, &output, &args.reference)?;
            crate::files::write_atomically(&output, &bytes)?;
        }
        Kind::Image => {
            let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let unchecked = tempfile::Builder::new()
                .prefix(".thaw-pull-")
                .tempfile_in(dir)
                .map_err(|source| crate::files::FilesError::Unwritable { path: dir.to_path_buf(), source })?;
            write_sparse(unchecked.as_file(), &bytes).map_err(|source| crate::files::FilesError::Unwritable {
                path: unchecked.path().to_path_buf(),
                source,
            })?;
            validate(kind, &bytes, unchecked.path(), &args.reference)?;
            unchecked
                .persist(&output)
                .map_err(|e| crate::files::FilesError::Unwritable { path: output.clone(), source: e.error })?;
        }
    }
    eprintln!("thaw: pulled {} ({} bytes, {digest}) into {}", args.reference, bytes.len(), output.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_the_distribution_spec_writes_them() {
        let parsed = Reference::parse("127.0.0.1:5000/functions/hello:v1").unwrap();
        assert_eq!(
            parsed,
            Reference {
                registry: "127.0.0.1:5000".into(),
                repository: "functions/hello".into(),
                tag: Some("v1".into()),
                digest: None,
            }
        );
        assert!(parsed.is_loopback());
        let digest = format!("sha256:{}", "a".repeat(64));
        let by_digest = Reference::parse(&format!("localhost:5000/hello@{digest}")).unwrap();
        assert_eq!((by_digest.tag, by_digest.digest.as_deref()), (None, Some(digest.as_str())));
        assert_eq!(Reference::parse("localhost/hello").unwrap().tag.as_deref(), Some("latest"));
        assert!(Reference::parse("[::1]:5000/a").unwrap().is_loopback());
        assert!(!Reference::parse("registry.example:5000/a").unwrap().is_loopback());

        for (bad, why) in [
            ("hello", "names no registry"),
            ("localhost/Hello", "repository"),
            ("localhost/a//b", "repository"),
            ("localhost/-a", "repository"),
            ("localhost/a:-tag", "tag"),
            ("localhost/a:", "tag"),
            ("localhost/a@sha256:abc", "64 lower-case hex"),
            ("localhost/a@md5:abc", "sha256:HEX"),
            ("local host/a", "host[:port]"),
        ] {
            let error = Reference::parse(bad).unwrap_err().to_string();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn a_manifest_must_name_one_thaw_file() {
        let digest = format!("sha256:{}", "b".repeat(64));
        let manifest = |artifact: &str, layers: serde_json::Value| {
            serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": artifact,
                "config": { "mediaType": CONFIG_TYPE, "digest": digest, "size": 2 }, "layers": layers,
            }))
            .unwrap()
        };
        let layer =
            |media: &str, digest: &str, size: u64| json!({ "mediaType": media, "digest": digest, "size": size });
        let good = manifest(BUNDLE_TYPE, json!([layer(BUNDLE_TYPE, &digest, 10)]));
        assert_eq!(layer_of(&good, "r").unwrap(), (Kind::Bundle, digest.clone(), 10));
        for (bytes, why) in [
            (b"{".to_vec(), "not JSON"),
            (manifest("application/vnd.oci.image.config.v1+json", json!([])), "not a thaw artifact"),
            (manifest(IMAGE_TYPE, json!([])), "0 layers"),
            (manifest(IMAGE_TYPE, json!([layer(BUNDLE_TYPE, &digest, 1)])), "mediaType"),
            (manifest(BUNDLE_TYPE, json!([layer(BUNDLE_TYPE, "sha256:../../x", 1)])), "not sha256:HEX"),
            (manifest(BUNDLE_TYPE, json!([layer(BUNDLE_TYPE, &digest, u64::MAX)])), "more than the"),
        ] {
            let error = layer_of(&bytes, "r").unwrap_err().to_string();
            assert!(error.contains(why), "{why}: {error}");
        }
    }
}
