//! The HTTP API of `thaw serve` (docs/API.md): its routes, the admin policy, and how each way a
//! request can end becomes a status code, headers and a body ([`answer_response`]). Errors are
//! JSON objects with one `error` line.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[cfg(test)]
use abi::params::InstanceId;

use super::deployed::{Answer, DeployedError, Rejected};
use super::registry::{Deployment, Registry, RegistryError, is_name};
use crate::pack::Language;
use crate::stats::{RequestStats, Status};

/// Who may use the admin routes (deploy, delete, logs).
#[derive(Debug, Clone)]
pub struct Admin {
    /// With a token, every admin request must carry it as `Authorization: Bearer TOKEN` (the
    /// scheme in any case, RFC 9110).
    pub token: Option<String>,
    /// Without one, where admin requests are taken from.
    pub exposure: Exposure,
}

/// Who can reach what the server listens on, as the admin policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// A Unix socket (mode 0600): only this machine's processes that may open it reach it.
    Unix,
    /// A loopback address: only this machine's processes reach it, and web pages whose name
    /// rebinds to it, which the `Host` and `Origin` rule keeps out.
    Loopback,
    /// Any other address.
    Network,
}

impl Admin {
    fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let header = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
        match (&self.token, self.exposure) {
            (Some(token), _) => {
                let given = header(header::AUTHORIZATION).unwrap_or("");
                let given = match given.split_once(' ') {
                    Some((scheme, given)) if scheme.eq_ignore_ascii_case("bearer") => given.trim(),
                    _ => "",
                };
                // Compare every byte, so the time taken says nothing about the token.
                let same = given.len() == token.len()
                    && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
                if same {
                    Ok(())
                } else {
                    Err(Refusal(
                        StatusCode::UNAUTHORIZED,
                        "this route needs Authorization: Bearer <the admin token>".into(),
                    ))
                }
            }
            (None, Exposure::Unix) => Ok(()),
            (None, Exposure::Loopback) => {
                let host = header(header::HOST).unwrap_or("");
                if !is_loopback_host(host) {
                    return Err(Refusal(
                        StatusCode::FORBIDDEN,
                        format!(
                            "admin routes without a token take Host: localhost or a loopback address, not {host:?}"
                        ),
                    ));
                }
                match header(header::ORIGIN) {
                    Some(origin) if !origin_is_loopback(origin) => Err(Refusal(
                        StatusCode::FORBIDDEN,
                        format!("admin routes without a token refuse requests from the web page at {origin:?}"),
                    )),
                    _ => Ok(()),
                }
            }
            (None, Exposure::Network) => Err(Refusal(
                StatusCode::FORBIDDEN,
                "admin routes are refused on a non-loopback listener unless thaw serve has --admin-token-file".into(),
            )),
        }
    }
}

/// True for a `Host` (an authority: a name or address and an optional port) naming this
/// machine: `localhost` or a loopback address. A DNS name that resolves to 127.0.0.1 is not
/// one, which is what keeps a rebinding web page out.
fn is_loopback_host(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or("", |(ip, _)| ip),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, port)| if port.bytes().all(|b| b.is_ascii_digit()) { host } else { authority }),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.eq_ignore_ascii_case("localhost.")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// True for an `Origin` (`scheme://authority`) whose authority is a loopback host.
fn origin_is_loopback(origin: &str) -> bool {
    origin.split_once("://").is_some_and(|(_, authority)| is_loopback_host(authority))
}

/// Caps on request bodies, each and all together.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A deploy's upload, in bytes.
    pub upload: usize,
    /// An invocation's request, in bytes.
    pub request: usize,
    /// How long a body may take to arrive.
    pub read_timeout: Duration,
    /// The invocation bodies held at once across all connections, in KiB: each reserves its
    /// declared length (or the cap, when it declares none) before it is read, until its answer.
    pub requests_held: Arc<Semaphore>,
    /// The uploads held at once, in KiB, the same way until their deploy ends: one upload's cap
    /// in all.
    pub uploads_held: Arc<Semaphore>,
}

impl Limits {
    /// Limits of `upload` and `request` bytes each, `held` bytes of requests together, and one
    /// upload's worth of uploads together.
    pub fn new(upload: usize, request: usize, held: usize, read_timeout: Duration) -> Self {
        let kib = |bytes: usize| Semaphore::new(bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS));
        Self { upload, request, read_timeout, requests_held: Arc::new(kib(held)), uploads_held: Arc::new(kib(upload)) }
    }
}

/// What the handlers share.
pub struct Api {
    /// The deployed functions.
    pub registry: Arc<Registry>,
    /// Who may deploy and delete.
    pub admin: Admin,
    /// Body caps.
    pub limits: Limits,
}

/// The routes.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/functions", get(list))
        .route("/v1/functions/{name}", get(show).put(deploy).delete(remove))
        .route("/v1/functions/{name}/invoke", post(invoke))
        .route("/v1/functions/{name}/logs", get(logs))
        .route("/v1/images/{version}/head", get(image_head))
        .route("/v1/images/{version}/pages", get(image_pages))
        .method_not_allowed_fallback(wrong_method)
        .fallback(no_route)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(api)
}

/// 404 for a path no route takes, after [`drain`]ing the body.
async fn no_route(State(api): State<Arc<Api>>, body: Body) -> Response {
    refuse(Refusal(StatusCode::NOT_FOUND, "no such route (see docs/API.md)".into()), body, api.limits.read_timeout)
        .await
}

/// 405 for a method a route does not take, after [`drain`]ing the body (the router adds `Allow`).
async fn wrong_method(State(api): State<Arc<Api>>, method: axum::http::Method, body: Body) -> Response {
    let refusal =
        Refusal(StatusCode::METHOD_NOT_ALLOWED, format!("this route does not take {method} (see docs/API.md)"));
    refuse(refusal, body, api.limits.read_timeout).await
}

/// An error the router made itself (a name that is not UTF-8)
/// as JSON with one `error` line, like the handlers' own: its first line of text, or the
/// status's name. Its other headers (`Allow`) stay.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let json =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let line = match text.lines().next().map(str::trim) {
        Some(line) if !line.is_empty() => line.to_string(),
        _ => status.canonical_reason().unwrap_or("refused").to_lowercase(),
    };
    let mut response = error(status, line);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// A JSON error with one line saying what was wrong.
fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({ "error": message.to_string() }))).into_response()
}

/// A request refused before it reached a function: its status and why.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = error(self.0, self.1);
        // Busy, not wrong: the same request may pass in a moment.
        if matches!(self.0, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// 429 for a function whose queue is full.
fn queue_full(name: &str, deployed: &super::deployed::Deployed) -> Refusal {
    Refusal(StatusCode::TOO_MANY_REQUESTS, format!("{name}: its queue of {} requests is full", deployed.serving.queue))
}

fn bad_name(name: &str) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, format!("{name:?} is not a function name: 1 to 64 of A-Z a-z 0-9 . _ -"))
}

/// Most of a refused request's body the server still reads (and drops), so that a client that
/// sends its whole body before reading the answer gets the answer rather than a reset
/// connection.
const DRAIN_BYTES: usize = 1 << 20;

/// `refusal`, after [`drain`]ing `body`.
async fn refuse(refusal: Refusal, body: Body, timeout: Duration) -> Response {
    drain(body, timeout).await;
    refusal.into_response()
}

/// Reads and drops what `body` sends within `timeout`, up to [`DRAIN_BYTES`]: nothing of it is
/// kept.
async fn drain(mut body: Body, timeout: Duration) {
    use http_body_util::BodyExt as _;
    let drain = async {
        let mut read = 0;
        while read < DRAIN_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(timeout, drain).await;
}

/// A body read whole, and its share of the server's budget for bodies, held as long as the body
/// is.
struct Held {
    bytes: Bytes,
    _budget: OwnedSemaphorePermit,
}

/// Reads `body` whole, once `budget` grants `permits` of it at once: 503 when it cannot (the
/// server holds as many bodies as it takes), 413 when the body is (or says it is) larger than
/// `cap`, 408 when it takes longer than `timeout` to arrive, 400 when the connection fails under
/// it.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    what: &str,
    (cap, timeout): (usize, Duration),
    (budget, permits): (&Arc<Semaphore>, u32),
) -> Result<Held, Refusal> {
    let too_large =
        || Refusal(StatusCode::PAYLOAD_TOO_LARGE, format!("the {what} is larger than the {cap}-byte limit"));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > cap as u64) {
        return Err(too_large());
    }
    let Ok(budget) = Arc::clone(budget).try_acquire_many_owned(permits) else {
        return Err(Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the server is reading as many {what}s as it holds at once; retry"),
        ));
    };
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, cap)).await {
        Err(_) => Err(Refusal(
            StatusCode::REQUEST_TIMEOUT,
            format!("the {what} did not arrive within {} s", timeout.as_secs()),
        )),
        Ok(Err(error)) => match error.into_inner().downcast::<http_body_util::LengthLimitError>() {
            Ok(_) => Err(too_large()),
            Err(error) => Err(Refusal(StatusCode::BAD_REQUEST, format!("reading the {what}: {error}"))),
        },
        Ok(Ok(bytes)) => Ok(Held { bytes, _budget: budget }),
    }
}

/// The `Content-Type` of a deploy whose body is a registry reference, not a function.
pub const REFERENCE_TYPE: &str = "application/vnd.thaw.reference";
/// Longest reference a deploy takes.
const MAX_REFERENCE: usize = 1024;

/// The language a deploy's `Content-Type` says its body is in, in any case, with any
/// parameters: JavaScript for `text/javascript` (RFC 9239) or the older
/// `application/javascript`, Python for `text/x-python` (what Python's own `mimetypes` calls a
/// `.py` file) or `text/x-script.python`, none for [`REFERENCE_TYPE`] (the body names a bundle
/// in a registry), and otherwise wasm (a bundle or a module, which its first bytes tell apart).
fn language(headers: &HeaderMap) -> Option<Language> {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return Some(Language::Wasm);
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let is = |types: &[&str]| types.iter().any(|t| essence.eq_ignore_ascii_case(t));
    if is(&["text/javascript", "application/javascript"]) {
        Some(Language::JavaScript)
    } else if is(&["text/x-python", "text/x-script.python"]) {
        Some(Language::Python)
    } else if is(&[REFERENCE_TYPE]) {
        None
    } else {
        Some(Language::Wasm)
    }
}

/// The KiB of the request budget a body reserves: its declared length, or `cap` when it
/// declares none (a chunked body), at least 1.
fn reserved_kib(headers: &HeaderMap, cap: usize) -> u32 {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    u32::try_from(declared.unwrap_or(cap).min(cap).div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    ([(header::CONTENT_TYPE, content_type)], api.registry.metrics()).into_response()
}

async fn list(State(api): State<Arc<Api>>) -> Response {
    axum::Json(json!({ "functions": api.registry.views() })).into_response()
}

async fn show(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Response {
    if !is_name(&name) {
        return bad_name(&name).into_response();
    }
    match api.registry.view(&name) {
        Some(view) => axum::Json(view).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no function {name:?} is deployed")),
    }
}

async fn deploy(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upload: Body,
) -> Response {
    if let Err(refused) = api.admin.check(&headers) {
        return refuse(refused, upload, api.limits.read_timeout).await;
    }
    if !is_name(&name) {
        return refuse(bad_name(&name), upload, api.limits.read_timeout).await;
    }
    let limits = &api.limits;
    let budget = (&limits.uploads_held, reserved_kib(&headers, limits.upload));
    let upload = match read_body(&headers, upload, "upload", (limits.upload, limits.read_timeout), budget).await {
        Ok(upload) => upload,
        Err(refused) => return refused.into_response(),
    };
    let query = query.as_deref().unwrap_or("");
    let deployed = match language(&headers) {
        Some(language) => api.registry.deploy(&name, Vec::from(upload.bytes), language, query).await,
        None => match std::str::from_utf8(&upload.bytes).map(str::trim) {
            Ok(reference) if !reference.is_empty() && reference.len() <= MAX_REFERENCE => {
                if crate::remote::is_peer_address(std::path::Path::new(reference)) {
                    let holders: Vec<String> = reference.split_whitespace().map(String::from).collect();
                    api.registry.deploy_from_peer(&name, &holders, query).await
                } else {
                    api.registry.deploy_reference(&name, reference, query).await
                }
            }
            _ => {
                let why = format!(
                    "the body of a {REFERENCE_TYPE} deploy is one registry reference or peer's image address of UTF-8, at most {MAX_REFERENCE} bytes"
                );
                return error(StatusCode::BAD_REQUEST, why);
            }
        },
    };
    match deployed {
        Ok((deployment, view)) => {
            let status = if deployment == Deployment::Created { StatusCode::CREATED } else { StatusCode::OK };
            (status, axum::Json(json!({ "deployment": deployment, "function": view }))).into_response()
        }
        Err(e) => registry_error(&e),
    }
}

async fn logs(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(refused) = api.admin.check(&headers) {
        return refused.into_response();
    }
    if !is_name(&name) {
        return bad_name(&name).into_response();
    }
    let pairs: Vec<(String, String)> = match serde_urlencoded::from_str(query.as_deref().unwrap_or("")) {
        Ok(pairs) => pairs,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the query string is not key=value pairs: {e}")),
    };
    let mut count = 100;
    for (key, value) in pairs {
        match (key.as_str(), value.parse::<usize>()) {
            ("lines", Ok(n)) if (1..=super::logs::MAX_LINES).contains(&n) => count = n,
            _ => {
                let why = format!("query parameter {key}={value:?}: logs take lines=1 to {}", super::logs::MAX_LINES);
                return error(StatusCode::BAD_REQUEST, why);
            }
        }
    }
    match api.registry.logs(&name, count) {
        Some(lines) => axum::Json(json!({ "lines": lines })).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no function {name:?} is deployed")),
    }
}

/// What a peer restoring `version` asks for ([`image_head`], [`image_pages`]): admin
/// routes, since they hand out a function's memory. Runs `answer` on the image off the async
/// threads.
async fn held_image(
    api: Arc<Api>,
    version: String,
    headers: &HeaderMap,
    answer: impl FnOnce(&host_vmm::snapshot::Image) -> Result<Vec<u8>, host_vmm::remote::RemoteError> + Send + 'static,
) -> Response {
    if let Err(refused) = api.admin.check(headers) {
        return refused.into_response();
    }
    if !super::store::is_version(&version) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{version:?} is not an image version (64 lower-case hex digits)"),
        );
    }
    let Some(image) = api.registry.held_image(&version) else {
        return error(StatusCode::NOT_FOUND, format!("no function here serves version {version}"));
    };
    match tokio::task::spawn_blocking(move || answer(&image)).await {
        Ok(Ok(bytes)) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Ok(Err(host_vmm::remote::RemoteError::Head(why))) => error(StatusCode::BAD_REQUEST, why),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The restore head of an image held here (host_vmm::remote): what a peer needs before its
/// VM's first instruction.
async fn image_head(State(api): State<Arc<Api>>, Path(version): Path<String>, headers: HeaderMap) -> Response {
    held_image(api, version, &headers, |image| Ok(host_vmm::remote::encoded_head(image)?.to_vec())).await
}

/// `count` guest pages from page `first` of an image held here (`?first=N&count=M`).
async fn image_pages(
    State(api): State<Arc<Api>>,
    Path(version): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
    let number = |key: &str| pairs.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.parse::<u64>().ok());
    let (Some(first), Some(count)) = (number("first"), number("count")) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("pages take ?first=N&count=M, not {:?}", query.unwrap_or_default()),
        );
    };
    held_image(api, version, &headers, move |image| host_vmm::remote::pages(image, first, count)).await
}

async fn remove(State(api): State<Arc<Api>>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    if let Err(refused) = api.admin.check(&headers) {
        return refused.into_response();
    }
    if !is_name(&name) {
        return bad_name(&name).into_response();
    }
    match api.registry.delete(&name).await {
        Ok(()) => axum::Json(json!({ "deleted": name })).into_response(),
        Err(e) => registry_error(&e),
    }
}

fn registry_error(e: &RegistryError) -> Response {
    let status = match e {
        RegistryError::Settings(_)
        | RegistryError::Bundle(_)
        | RegistryError::Wasm(_)
        | RegistryError::JavaScript(_)
        | RegistryError::Python(_)
        | RegistryError::Reference(_)
        | RegistryError::ImageByReference(_)
        | RegistryError::NotFunction(_)
        | RegistryError::Function(_)
        | RegistryError::Service { .. } => StatusCode::BAD_REQUEST,
        RegistryError::Unusable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        RegistryError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
        RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
        RegistryError::NoPython(_) => StatusCode::NOT_IMPLEMENTED,
        RegistryError::NoPuller(_) | RegistryError::NoFetcher(_) => StatusCode::SERVICE_UNAVAILABLE,
        RegistryError::Peer(crate::remote::PeerError::Url(_)) => StatusCode::BAD_REQUEST,
        RegistryError::Peer(_) => StatusCode::BAD_GATEWAY,
        RegistryError::Store(_)
        | RegistryError::Scratch { .. }
        | RegistryError::Blocking(_)
        | RegistryError::Image(_)
        | RegistryError::NotStored
        | RegistryError::Start(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e)
}

async fn invoke(State(api): State<Arc<Api>>, Path(name): Path<String>, headers: HeaderMap, request: Body) -> Response {
    let arrived = std::time::Instant::now();
    if !is_name(&name) {
        return refuse(bad_name(&name), request, api.limits.read_timeout).await;
    }
    // The route, the function and its queue decide before a byte of the body is read.
    let read_timeout = api.limits.read_timeout;
    let deployed = match api.registry.serving(&name) {
        Ok(Some(deployed)) => deployed,
        Ok(None) => {
            let missing = Refusal(StatusCode::NOT_FOUND, format!("no function {name:?} is deployed"));
            return refuse(missing, request, read_timeout).await;
        }
        Err(why) => {
            drain(request, read_timeout).await;
            // Failed until it is deployed again, not busy: no Retry-After.
            return error(StatusCode::SERVICE_UNAVAILABLE, format!("{name} cannot serve: {why}"));
        }
    };
    if deployed.admit().is_err() {
        return refuse(queue_full(&name, &deployed), request, read_timeout).await;
    }
    let limits = &api.limits;
    let budget = (&limits.requests_held, reserved_kib(&headers, limits.request));
    let request = match read_body(&headers, request, "request", (limits.request, limits.read_timeout), budget).await {
        Ok(request) => request,
        Err(refused) => return refused.into_response(),
    };
    let answer = match deployed.submit(Vec::from(request.bytes)) {
        Ok(answer) => answer,
        Err(Rejected::Full) => return queue_full(&name, &deployed).into_response(),
        Err(Rejected::Closed) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("{name} is shutting down")),
    };
    let answer = answer.await.unwrap_or(Err(DeployedError::ThreadEnded));
    deployed.metrics.request.observe(arrived.elapsed());
    let mut response = answer_response(&answer, deployed.serving.timeout_ms);
    if let Ok(version) = HeaderValue::from_str(&deployed.version) {
        response.headers_mut().insert("x-thaw-version", version);
    }
    response
}

/// The HTTP response for how a request ended: 200 with the function's stdout when it answered
/// (or exited 0); 502 when it trapped, exited non-zero or its guest failed; 504 past its
/// timeout (`timeout_ms`); 500 when the host could not run it. The errors' bodies are the
/// shared request stats (`crate::stats`), whose `error` says what went wrong in one line.
/// Headers carry the instance id and the timings.
pub fn answer_response(answer: &Result<Answer, DeployedError>, timeout_ms: u64) -> Response {
    let answer = match answer {
        Ok(answer) => answer,
        Err(why) => {
            let stats = RequestStats::host_failure(&format!("the VM could not serve: {why}"));
            return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(stats)).into_response();
        }
    };
    let served = &answer.served;
    let handle = served.response.as_ref().map(|r| r.handle_time);
    let (ended, _, _) = crate::stats::ending(&served.outcome, served.response.as_ref());
    let mut response = match (ended, &served.response) {
        (Status::Ok, Some(r)) => (StatusCode::OK, r.stdout.clone()).into_response(),
        _ => {
            let mut stats = RequestStats::new(&served.outcome, served.response.as_ref());
            let status = match stats.status {
                Status::TimedOut => {
                    stats.error = Some(format!(
                        "no answer within {timeout_ms} ms; the VM was stopped, and is reset to serve again"
                    ));
                    StatusCode::GATEWAY_TIMEOUT
                }
                _ => StatusCode::BAD_GATEWAY,
            };
            let us = |d: Duration| d.as_micros() as u64;
            stats.instance_id = Some(served.instance_id.to_string());
            stats.stdout = None;
            stats.measured.phases.queue_us = Some(us(answer.queued));
            stats.measured.phases.handle_us = handle.map(us);
            stats.measured.phases.total_us = Some(us(answer.took));
            (status, axum::Json(stats)).into_response()
        }
    };
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: &dyn std::fmt::Display| {
        if let Ok(value) = HeaderValue::from_str(&value.to_string()) {
            headers.insert(name, value);
        }
    };
    set("x-thaw-instance", &served.instance_id);
    set("x-thaw-queue-us", &answer.queued.as_micros());
    set("x-thaw-serve-us", &answer.took.as_micros());
    if let Some(handle) = handle {
        set("x-thaw-handle-us", &handle.as_micros());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use host_vmm::{FunctionResponse, FunctionStatus, Outcome, Served};

    fn ended(outcome: Outcome, response: Option<FunctionResponse>, instance_id: u128, took: Duration) -> Answer {
        let served = Served {
            instance_id: InstanceId(instance_id),
            outcome,
            response,
            exits: 0,
            page_faults: 0,
            devices: Vec::new(),
            timings: host_vmm::ServeTimings::default(),
        };
        Answer { served, queued: Duration::from_micros(3), took }
    }

    fn answered(status: FunctionStatus) -> Result<Answer, DeployedError> {
        let response = FunctionResponse {
            status,
            stdout: b"out".to_vec(),
            stderr: b"err".to_vec(),
            handle_time: Duration::from_micros(42),
        };
        Ok(ended(Outcome::Answered, Some(response), 7, Duration::from_micros(90)))
    }

    #[test]
    fn each_way_a_request_ends_has_its_status_and_headers() {
        let ok = answer_response(&answered(FunctionStatus::Ok), 1000);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()["x-thaw-instance"], "00000000000000000000000000000007");
        assert_eq!(ok.headers()["x-thaw-handle-us"], "42");
        assert_eq!(ok.headers()["x-thaw-serve-us"], "90");
        assert_eq!(answer_response(&answered(FunctionStatus::Exited(0)), 1000).status(), StatusCode::OK);
        let exited = answer_response(&answered(FunctionStatus::Exited(3)), 1000);
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(axum::body::to_bytes(exited.into_body(), 1 << 16))
            .unwrap();
        let stats: RequestStats = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (stats.status, stats.exit_code, stats.instance_id),
            (Status::Exited, 3, Some("00000000000000000000000000000007".into()))
        );
        assert_eq!(stats.error.as_deref(), Some("the function exited with code 3"));
        assert_eq!((stats.stderr.as_deref(), stats.stdout), (Some("err"), None));
        assert_eq!(stats.measured.phases.handle_us, Some(42));
        assert_eq!(answer_response(&answered(FunctionStatus::Exited(3)), 1000).status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            answer_response(&answered(FunctionStatus::Trapped("unreachable".into())), 1000).status(),
            StatusCode::BAD_GATEWAY
        );
        let ended = |outcome| ended(outcome, None, 8, Duration::from_secs(1));
        let timed_out = answer_response(&Ok(ended(Outcome::TimedOut(Duration::from_secs(1)))), 1000);
        assert_eq!(timed_out.status(), StatusCode::GATEWAY_TIMEOUT);
        let panicked = answer_response(&Ok(ended(Outcome::Panicked("boom".into()))), 1000);
        assert_eq!(panicked.status(), StatusCode::BAD_GATEWAY);
        let host = answer_response(&Err(DeployedError::ThreadEnded), 1000);
        assert_eq!(host.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn a_deploy_is_source_only_when_its_content_type_says_so() {
        let typed = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            language(&headers)
        };
        for js in
            ["text/javascript", "Text/JavaScript; charset=utf-8", "application/javascript", " text/javascript ;x=y"]
        {
            assert_eq!(typed(js), Some(Language::JavaScript), "{js}");
        }
        for py in ["text/x-python", "Text/X-Python; charset=utf-8", "text/x-script.python"] {
            assert_eq!(typed(py), Some(Language::Python), "{py}");
        }
        for no in
            ["application/octet-stream", "text/javascriptx", "text/plain", "javascript", "text/python", "x-python", ""]
        {
            assert_eq!(typed(no), Some(Language::Wasm), "{no}");
        }
        assert_eq!(language(&HeaderMap::new()), Some(Language::Wasm));
        assert_eq!(typed("application/vnd.thaw.reference"), None);
    }

    #[test]
    fn admin_routes_need_the_token_or_a_local_listener() {
        let headers = |pairs: &[(header::HeaderName, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(name.clone(), HeaderValue::from_static(value));
            }
            headers
        };
        let none = headers(&[]);
        let unix = Admin { token: None, exposure: Exposure::Unix };
        assert!(unix.check(&none).is_ok());
        assert!(unix.check(&headers(&[(header::HOST, "thaw")])).is_ok());
        let open = Admin { token: None, exposure: Exposure::Network };
        assert_eq!(open.check(&headers(&[(header::HOST, "localhost")])).unwrap_err().0, StatusCode::FORBIDDEN);

        let guarded = Admin { token: Some("s3cret".into()), exposure: Exposure::Loopback };
        let bearer = |value| headers(&[(header::AUTHORIZATION, value), (header::HOST, "attacker.example")]);
        assert_eq!(guarded.check(&none).unwrap_err().0, StatusCode::UNAUTHORIZED);
        for wrong in ["Bearer s3cres", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer"] {
            assert_eq!(guarded.check(&bearer(wrong)).unwrap_err().0, StatusCode::UNAUTHORIZED, "{wrong}");
        }
        // The scheme is case-insensitive (RFC 9110 section 11.1); the token is not.
        for right in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret"] {
            assert!(guarded.check(&bearer(right)).is_ok(), "{right}");
        }
        assert!(guarded.check(&bearer("Bearer S3CRET")).is_err());

        // Issue 28, defect 6: without a token, a loopback listener takes admin requests only for
        // a loopback Host and from no foreign web page, so a name rebound to 127.0.0.1 cannot.
        let local = Admin { token: None, exposure: Exposure::Loopback };
        for host in ["localhost", "LocalHost:8400", "127.0.0.1:8400", "127.1.2.3", "[::1]:8400", "[::1]"] {
            assert!(local.check(&headers(&[(header::HOST, host)])).is_ok(), "{host}");
            let same_site = headers(&[(header::HOST, host), (header::ORIGIN, "http://localhost:3000")]);
            assert!(local.check(&same_site).is_ok(), "{host}");
        }
        for host in ["attacker.example", "attacker.example:8400", "127.0.0.1.nip.io", "localhost.attacker.example", ""]
        {
            let refused = local.check(&headers(&[(header::HOST, host)])).unwrap_err();
            assert_eq!(refused.0, StatusCode::FORBIDDEN, "{host}");
            assert!(refused.1.contains(&format!("not {host:?}")), "{}", refused.1);
        }
        for origin in ["http://attacker.example", "https://127.0.0.1.attacker.example:443", "null"] {
            let refused = local.check(&headers(&[(header::HOST, "localhost:8400"), (header::ORIGIN, origin)]));
            assert_eq!(refused.unwrap_err().0, StatusCode::FORBIDDEN, "{origin}");
        }
    }
}
