//! `thaw serve`: the node agent. It keeps deployed functions snapshotted and serving from a
//! durable store, and answers an HTTP API (docs/API.md) on tokio. Requests are queued per
//! function and served by vCPU threads of their own (`deployed.rs`); the async runtime never
//! runs a VM.
//!
//! ```text
//!  HTTP ─▶ api.rs ─▶ registry.rs ─┬─ deploy: settings.rs, snapshot, store.rs (SQLite + images);
//!                                 │    by reference: puller.rs, a process of its own (`thaw __puller`)
//!                                 ├─ invoke: deployed.rs queue ─▶ vCPU thread ─▶ host-vmm lifecycle
//!                                 └─ /metrics, logs: metrics.rs, logs.rs
//! ```

mod api;
mod deployed;
pub mod fetcher;
mod logs;
mod metrics;
pub mod puller;
mod registry;
mod settings;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use tracing::{info, warn};

pub use self::api::REFERENCE_TYPE;
use self::api::{Admin, Api, Exposure, Limits};
use self::registry::{Operator, Registry};
use self::settings::Serving;
use self::store::Store;
use host_vmm::Mode;

/// Arguments of `thaw serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Where to listen: ADDRESS:PORT (port 0 picks a free one), or unix:PATH for a Unix socket
    /// (mode 0600).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8400")]
    listen: String,
    /// Where the function store lives [default: $XDG_STATE_HOME/thaw, or /var/lib/thaw for
    /// root, or ~/.local/state/thaw].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Default serving mode of a deployed function (a deploy's ?mode= overrides it).
    #[arg(long, value_parser = crate::restore::mode_parser(), default_value_t = Mode::Reset)]
    mode: Mode,
    /// Default number of VMs parked ahead in pool mode (?pool=).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pool: usize,
    /// Default number of requests a function serves at once, each on a vCPU thread (?concurrency=).
    #[arg(long, value_name = "N", default_value_t = 2)]
    concurrency: usize,
    /// Default number of requests a function queues beyond those; past it, 429 (?queue=).
    #[arg(long, value_name = "N", default_value_t = 64)]
    queue: usize,
    /// Default wall-clock limit per request in milliseconds; past it, 504 (?timeout_ms=).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    timeout_ms: u64,
    /// Default wall-clock limit in milliseconds for a deploy's cold boot and init, and for
    /// readying each VM restored from its snapshot; past it, the deploy fails (?init_timeout_ms=).
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    init_timeout_ms: u64,
    /// Largest deploy upload, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    max_upload_mib: usize,
    /// Largest invocation request, in MiB (the guest takes at most 16).
    #[arg(long, value_name = "MIB", default_value_t = 16)]
    max_request_mib: usize,
    /// Invocation bodies held at once across all connections, in MiB: each reserves its
    /// declared length before it is read, and one that does not fit gets 503 with Retry-After.
    /// Uploads held at once share `--max-upload-mib` the same way.
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    max_held_mib: u64,
    /// Connections open at once; past it, new ones wait in the listen backlog until one
    /// closes. Each holds at most 64 KiB of request headers.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// A file holding the token that deploy and delete must carry (Authorization: Bearer).
    /// Without it they are taken only on a loopback address or a Unix socket.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// How long a client may take to send a request's headers, and then its body, in seconds;
    /// past it the connection is closed (headers) or the request gets 408 (body).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    read_timeout: u64,
    /// Threads for the HTTP side (the async runtime). The vCPUs have threads of their own, and
    /// on a small machine one HTTP thread contends least with them (measured in
    /// docs/BENCHMARKS.md).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    http_threads: u16,
    /// A host Unix socket that deployed functions may connect to, under the name their bundle's
    /// connections use (`thaw pack --connect NAME=PORT`); repeatable. A deploy whose function
    /// connects to a name not given here is refused.
    #[arg(long = "service", value_name = "NAME=SOCKET", value_parser = parse_service)]
    services: Vec<(String, PathBuf)>,
    /// After a request, how long its vCPU thread polls for the next one before it sleeps, in
    /// microseconds (0: sleep at once). Polling yields the core to any other thread that is
    /// ready, and saves the wake-up of a sleeping thread (about 25 µs on a virtual machine
    /// whose idle cores halt; docs/BENCHMARKS.md).
    #[arg(long, value_name = "US", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    poll_us: u64,
    /// How the server's own log (on stderr) is written: text for people, or JSON lines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// On SIGTERM or SIGINT, how long in-flight requests may take to finish, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    grace: u64,
    #[command(flatten)]
    seccomp: crate::SeccompArgs,
}

/// Why the server could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `--service` is not `NAME=SOCKET`.
    #[error("{0:?} is not NAME=SOCKET")]
    NotService(String),
    /// `--service`'s name is not a connection name.
    #[error("{text:?}: the name {name:?} is not 1 to 32 of A-Z a-z 0-9 _ (as in thaw pack --connect)")]
    ServiceName {
        /// The whole option.
        text: String,
        /// The name.
        name: String,
    },
    /// `--service`'s socket path is empty.
    #[error("{0:?}: the socket path is empty")]
    ServicePath(String),
    /// `--listen unix:` without a path.
    #[error("--listen unix: needs a socket path")]
    NoSocketPath,
    /// `--listen` is neither form.
    #[error("--listen {0:?}: not ADDRESS:PORT (such as 127.0.0.1:8400) or unix:PATH")]
    Listen(String),
    /// `--listen unix:PATH` names a file that is not a socket.
    #[error("--listen unix:{}: exists and is not a socket", .0.display())]
    NotSocket(PathBuf),
    /// `--listen unix:PATH` names a socket another process accepts connections on.
    #[error("--listen unix:{}: another process accepts connections on it; stop it, or listen elsewhere", .0.display())]
    SocketInUse(PathBuf),
    /// The listener could not be bound.
    #[error("--listen {listen}: {source}")]
    Bind {
        /// What `--listen` named.
        listen: String,
        /// Why.
        source: std::io::Error,
    },
    /// Nowhere to put the store.
    #[error("no --state-dir, XDG_STATE_HOME or HOME to put the store in")]
    NoStateDir,
    /// The server's own defaults fail a deploy's checks.
    #[error("thaw serve defaults: {0}")]
    Defaults(settings::SettingsError),
    /// The admin token file is not UTF-8.
    #[error("{}: the token is not UTF-8", .0.display())]
    TokenUtf8(PathBuf),
    /// The admin token is too weak.
    #[error("{}: the token must be at least 16 printable ASCII characters, with no spaces", .0.display())]
    WeakToken(PathBuf),
    /// The async runtime could not start.
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The signal handlers could not be installed.
    #[error("watching for SIGTERM: {0}")]
    Signals(std::io::Error),
    /// The token file.
    #[error(transparent)]
    File(#[from] crate::files::FilesError),
    /// The syscall allow-list.
    #[error(transparent)]
    Seccomp(#[from] host_vmm::seccomp::SeccompError),
    /// The store.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Loading the stored functions.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
}

/// Parses a `--service NAME=SOCKET` entry.
fn parse_service(text: &str) -> Result<(String, PathBuf), ServeError> {
    let (name, path) = text.split_once('=').ok_or_else(|| ServeError::NotService(text.into()))?;
    if !abi::bundle::is_connection_name(name) {
        return Err(ServeError::ServiceName { text: text.into(), name: name.into() });
    }
    if path.is_empty() {
        return Err(ServeError::ServicePath(text.into()));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

/// How the server's log is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// Sends the server's log (info and up) to stderr in `format`.
fn init_log(format: LogFormat) {
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_max_level(tracing::Level::INFO);
    // A second call (in tests of one process) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Where the store lives by default.
fn default_state_dir() -> Result<PathBuf, ServeError> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("thaw"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/var/lib/thaw"));
    }
    let home = std::env::var_os("HOME").ok_or(ServeError::NoStateDir)?;
    Ok(PathBuf::from(home).join(".local/state/thaw"))
}

/// Where `thaw serve` listens.
#[derive(Clone)]
enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

fn parse_listen(text: &str) -> Result<Listen, ServeError> {
    match text.strip_prefix("unix:") {
        Some("") => Err(ServeError::NoSocketPath),
        Some(path) => Ok(Listen::Unix(PathBuf::from(path))),
        None => text.parse().map(Listen::Tcp).map_err(|_| ServeError::Listen(text.into())),
    }
}

/// Runs the server until SIGTERM or SIGINT; returns the exit code.
pub fn run(args: &ServeArgs) -> Result<u8, ServeError> {
    init_log(args.log_format);
    let listen = parse_listen(&args.listen)?;
    let defaults = Serving {
        mode: args.mode,
        pool: args.pool,
        concurrency: args.concurrency,
        queue: args.queue,
        timeout_ms: args.timeout_ms,
        init_timeout_ms: args.init_timeout_ms,
        ..Serving::default()
    };
    // The defaults pass the same checks a deploy's parameters do.
    let query = format!(
        "pool={}&concurrency={}&queue={}&timeout_ms={}&init_timeout_ms={}",
        args.pool, args.concurrency, args.queue, args.timeout_ms, args.init_timeout_ms
    );
    settings::parse(&query, &defaults).map_err(ServeError::Defaults)?;
    let token = match &args.admin_token_file {
        None => None,
        Some(path) => {
            let text = crate::files::read_limited(path, 4096, "admin token", crate::files::READ_WITHIN)?;
            let token = String::from_utf8(text).map_err(|_| ServeError::TokenUtf8(path.clone()))?;
            let token = token.trim().to_string();
            // Printable ASCII only: a header carries nothing else, so no request could match.
            if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ServeError::WeakToken(path.clone()));
            }
            Some(token)
        }
    };
    let state_dir = match &args.state_dir {
        Some(dir) => dir.clone(),
        None => default_state_dir()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.http_threads))
        .thread_name("thaw-http")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    // The store first: its lock keeps a second agent from touching the first's socket too.
    let store = Store::open(&state_dir)?;
    info!(store = %state_dir.display(), "function store opened");
    let listener = runtime.block_on(bind(&listen))?;
    // The registry puller is a process of its own, started while this one may still start
    // one: deploys by reference need it, nothing else does.
    let puller = match puller::Puller::start(!args.seccomp.no_seccomp) {
        Ok(puller) => Some(Arc::new(puller)),
        Err(e) => {
            warn!("{e}: deploys by reference will be refused");
            None
        }
    };
    // So is the peer fetcher: deploys from a peer need it.
    let fetcher = match fetcher::Fetcher::start(!args.seccomp.no_seccomp, token.as_deref()) {
        Ok(fetcher) => Some(Arc::new(fetcher)),
        Err(e) => {
            warn!("{e}: deploys from a peer will be refused");
            None
        }
    };
    // Setup is done once the listener is bound: from here on, every thread runs under the
    // syscall allow-list, before any guest runs (the store's functions start in the next step).
    crate::confine_with(&args.seccomp, host_vmm::seccomp::install_agent)?;
    let operator = Operator {
        defaults,
        services: args.services.iter().cloned().collect(),
        poll: Duration::from_micros(args.poll_us),
        puller,
        fetcher,
    };
    let registry = Registry::load(store, operator)?;
    let retired = registry.retired();
    let exposure = match &listen {
        Listen::Tcp(addr) if addr.ip().is_loopback() => Exposure::Loopback,
        Listen::Tcp(_) => Exposure::Network,
        Listen::Unix(_) => Exposure::Unix,
    };
    let api = Arc::new(Api {
        registry: Arc::new(registry),
        admin: Admin { token, exposure },
        limits: Limits::new(
            args.max_upload_mib << 20,
            args.max_request_mib << 20,
            usize::try_from(args.max_held_mib << 20).unwrap_or(usize::MAX),
            Duration::from_secs(args.read_timeout),
        ),
    });
    let grace = Duration::from_secs(args.grace);
    let connections = Connections {
        read_timeout: Duration::from_secs(args.read_timeout),
        open: Arc::new(tokio::sync::Semaphore::new(args.max_connections as usize)),
    };
    runtime.block_on(serve(listener, Arc::clone(&api), grace, connections))?;
    // Every version stops taking requests; its threads serve what is queued and destroy their VMs.
    api.registry.stop_all();
    drop(api);
    drop(runtime);
    let deadline = Instant::now() + grace;
    let threads = std::mem::take(&mut *retired.lock().unwrap_or_else(|p| p.into_inner()));
    for thread in threads {
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
    info!("stopped");
    Ok(0)
}

/// Connections the kernel completes and queues for `accept` (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default). std and tokio ask for 128, which a burst of clients
/// overflows while the accept loop waits for a slot or a thread; a connection queued past it
/// can be dropped and then reset once its client has sent the request.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `listen` with a [`LISTEN_BACKLOG`]: a TCP address, or a Unix socket made private
/// (mode 0600).
async fn bind(listen: &Listen) -> Result<Listener, ServeError> {
    Ok(match listen.clone() {
        Listen::Tcp(addr) => {
            let failed = |source| ServeError::Bind { listen: addr.to_string(), source };
            let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
            let socket = socket.map_err(failed)?;
            socket.set_reuseaddr(true).map_err(failed)?;
            socket.bind(addr).map_err(failed)?;
            let listener = socket.listen(LISTEN_BACKLOG).map_err(failed)?;
            let bound = listener.local_addr().map_err(failed)?;
            info!("listening on http://{bound}");
            Listener::Tcp(listener)
        }
        Listen::Unix(path) => {
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            // A socket left by an earlier run is replaced; a live one, or any other file, is not.
            let failed = |source| ServeError::Bind { listen: format!("unix:{}", path.display()), source };
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if !meta.file_type().is_socket() {
                    return Err(ServeError::NotSocket(path));
                }
                match std::os::unix::net::UnixStream::connect(&path) {
                    Ok(_) => return Err(ServeError::SocketInUse(path)),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(failed(e)),
                }
                std::fs::remove_file(&path).map_err(failed)?;
            }
            let socket = tokio::net::UnixSocket::new_stream().map_err(failed)?;
            socket.bind(&path).map_err(failed)?;
            let listener = socket.listen(LISTEN_BACKLOG).map_err(failed)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
            info!("listening on unix:{}", path.display());
            Listener::Unix(listener, path)
        }
    })
}

/// The accept loop's failures, logged at most once a second with how many were not: out of
/// descriptors, it fails every 10 ms until a connection closes.
#[derive(Default)]
struct AcceptFailures {
    logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    fn note(&mut self, error: &std::io::Error) {
        if self.logged.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            self.unlogged += 1;
            return;
        }
        warn!(%error, also_failed = self.unlogged, "accepting a connection failed");
        (self.logged, self.unlogged) = (Some(Instant::now()), 0);
    }
}

/// How connections are held: how many at once, and how long a client may take to send its
/// headers.
struct Connections {
    read_timeout: Duration,
    /// One permit per open connection (`--max-connections`).
    open: Arc<tokio::sync::Semaphore>,
}

/// Most bytes of request headers a connection buffers; past it, 431.
const MAX_HEADER_BYTES: usize = 64 << 10;

/// Serves the API on `listener` until a signal, then lets in-flight requests finish for up to
/// `grace`. At most `connections.open` connections are open at once; a client that takes longer
/// than `connections.read_timeout` to send its request's headers loses its connection.
async fn serve(listener: Listener, api: Arc<Api>, grace: Duration, connections: Connections) -> Result<(), ServeError> {
    let stop = stop_signal().map_err(ServeError::Signals)?;
    let router = api::router(api);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    let mut failed = AcceptFailures::default();
    let read_timeout = connections.read_timeout;
    loop {
        // A free connection slot first: past the limit, clients wait in the listen backlog.
        let slot = tokio::select! {
            slot = Arc::clone(&connections.open).acquire_owned() => slot,
            _ = &mut stop => break,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => break,
        };
        match accepted {
            Ok(Stream::Tcp(stream)) => serve_connection(stream, &router, &graceful, read_timeout, slot),
            Ok(Stream::Unix(stream)) => serve_connection(stream, &router, &graceful, read_timeout, slot),
            // Running out of descriptors, or a connection reset before it was accepted: the
            // listener itself is fine.
            Err(error) => {
                failed.note(&error);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    info!("stopping: no new connections, in-flight requests finish");
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => warn!("the grace period ended with requests in flight"),
    }
    Ok(())
}

/// A bound listener; a Unix socket's file is removed when it drops.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Self::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                // Answers are small and the client waits for each: send them at once.
                let _ = stream.set_nodelay(true);
                Ok(Stream::Tcp(stream))
            }
            Self::Unix(listener, _) => Ok(Stream::Unix(listener.accept().await?.0)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Serves one connection (HTTP/1.1, keep-alive) on its own task, watched for a graceful shutdown,
/// holding its `slot` until it closes.
fn serve_connection<S>(
    stream: S,
    router: &axum::Router,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    read_timeout: Duration,
    slot: tokio::sync::OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router.clone());
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        // A client that hangs up or times out ends only its own connection.
        let _ = connection.await;
        drop(slot);
    });
}

/// A future that resolves on SIGTERM or SIGINT. The handlers are installed now, before the
/// future is first polled: a signal that comes before the accept loop first waits must not
/// find the default action (which ends the process at once).
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_named_as_bundles_name_their_connections() {
        assert_eq!(parse_service("db=/run/db.sock").unwrap(), ("db".to_string(), PathBuf::from("/run/db.sock")));
        assert!(parse_service("db").unwrap_err().to_string().contains("is not NAME=SOCKET"));
        assert!(parse_service("../db=/x").unwrap_err().to_string().contains("is not 1 to 32 of A-Z a-z 0-9 _"));
        assert!(parse_service("db=").unwrap_err().to_string().contains("the socket path is empty"));
    }
}
