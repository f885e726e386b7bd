//! The `thaw serve` client: `thaw deploy`, `thaw call`, `thaw functions` and `thaw logs`. Each
//! makes one request to a server's HTTP API (docs/API.md) and prints what came back for a human,
//! or the server's JSON with `--json`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

/// Where the server is, for every client command.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// The server's base URL (plain HTTP).
    #[arg(long, value_name = "URL", env = "THAW_SERVER", default_value = "http://127.0.0.1:8400")]
    server: String,
    /// A file holding the admin token, sent as `Authorization: Bearer` (deploy and logs need it
    /// when the server has --admin-token-file).
    #[arg(long, value_name = "FILE", env = "THAW_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

/// Arguments of `thaw deploy`.
#[derive(Args, Debug)]
pub struct DeployArgs {
    /// The function's name on the server.
    name: String,
    /// A bundle (.thaw, from `thaw pack`), a bare wasm module (.wasm), or a JavaScript or
    /// Python function (a .js, .mjs or .py file, or a directory with index.js, index.mjs,
    /// handler.py or main.py), which is packed here as `thaw pack` packs it and uploaded as its
    /// bundle. Or a bundle in an OCI registry, REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST] (when
    /// no such file is here), which the server pulls itself. Or a version another `thaw serve`
    /// serves, http://NODE:PORT/v1/images/VERSION, which the server restores from that node at
    /// once and serves from its own copy once all of it has arrived (the nodes share the admin
    /// token).
    #[arg(value_name = "FILE|REF|URL")]
    file: PathBuf,
    /// Deploy settings, passed as query parameters (repeatable): mode=reset|pool|fresh, pool=N,
    /// concurrency=N, queue=N, timeout_ms=MS, and for a bare wasm memory=MIB, fuel=N,
    /// env=K=V, arg=A. For JavaScript and Python, memory= and env= are packed here instead.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// JavaScript or Python in a directory: the entry module, as `thaw pack --entry`.
    #[arg(long, value_name = "FILE")]
    entry: Option<String>,
    /// JavaScript: bundle the npm packages it imports with esbuild, as `thaw pack --bundle`.
    #[arg(long)]
    bundle: bool,
    /// JavaScript or Python: a request it answers, which the server's snapshot records the
    /// working set with, as `thaw pack --sample-data` (without one, the empty request's).
    #[arg(long, value_name = "STRING")]
    sample_data: Option<String>,
    /// Print the server's JSON answer.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// Arguments of `thaw call`.
#[derive(Args, Debug)]
pub struct CallArgs {
    /// The function's name on the server.
    name: String,
    /// The request body.
    #[arg(long, value_name = "STRING", conflicts_with = "input")]
    data: Option<String>,
    /// Read the request body from this file ("-": standard input).
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
}

/// Arguments of `thaw functions`.
#[derive(Args, Debug)]
pub struct FunctionsArgs {
    /// Print the server's JSON answer.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// Arguments of `thaw logs`.
#[derive(Args, Debug)]
pub struct LogsArgs {
    /// The function's name on the server.
    name: String,
    /// How many of its last lines (1 to 1000).
    #[arg(long, value_name = "N", default_value_t = 100)]
    lines: usize,
    /// Print the server's JSON answer.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// Why a request to a `thaw serve` failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused, saying why.
    #[error("the server answered {status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The answer's `error` line.
        message: String,
    },
    /// The server answered something that is not JSON.
    #[error("the server answered {status} with no JSON: {body}")]
    NotJson {
        /// The HTTP status.
        status: u16,
        /// The answer, lossily.
        body: String,
    },
    /// The token file is not UTF-8.
    #[error("{}: the token is not UTF-8", .0.display())]
    TokenUtf8(PathBuf),
    /// `--set` is not `KEY=VALUE`.
    #[error("--set {0:?} is not KEY=VALUE")]
    Setting(String),
    /// `--set memory=` of a JavaScript or Python function is not a number.
    #[error("--set memory={0:?}: the memory is a number of MiB")]
    Memory(String),
    /// `--entry`, `--bundle` or `--sample-data` given for a function that is not source.
    #[error(
        "{}: --entry, --bundle and --sample-data are for JavaScript or Python (a .js, .mjs or .py file, or a directory)",
        .0.display()
    )]
    NotSource(PathBuf),
    /// The request could not be built (a URL or token HTTP does not take).
    #[error("{url}: {source}")]
    Request {
        /// The URL.
        url: String,
        /// Why.
        source: ureq::http::Error,
    },
    /// The server could not be reached, or broke the connection.
    #[error("{url}: {source}")]
    Connection {
        /// The URL.
        url: String,
        /// Why.
        source: ureq::Error,
    },
    /// The answer could not be read.
    #[error("{url}: reading the answer: {source}")]
    Answer {
        /// The URL.
        url: String,
        /// Why.
        source: ureq::Error,
    },
    /// A file.
    #[error(transparent)]
    File(#[from] crate::files::FilesError),
    /// A JavaScript function could not be packed.
    #[error(transparent)]
    Pack(#[from] crate::pack::PackError),
    /// The request body.
    #[error(transparent)]
    Invoke(#[from] crate::invoke::InvokeError),
    /// The answer could not be printed.
    #[error(transparent)]
    Output(#[from] crate::OutputError),
}

/// Largest answer the client reads: a function's response is at most 16 MiB.
const MAX_ANSWER_BYTES: u64 = 32 << 20;

/// A server's answer.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    /// The answer's JSON, or the server's `error` line as an error (with the status).
    fn json(&self) -> Result<serde_json::Value, ClientError> {
        let value: Result<serde_json::Value, _> = serde_json::from_slice(&self.body);
        match (self.status, value) {
            (200..=299, Ok(value)) => Ok(value),
            (status, Ok(value)) => Err(ClientError::Refused {
                status,
                message: value["error"].as_str().unwrap_or("(no error message)").into(),
            }),
            (status, Err(_)) => {
                Err(ClientError::NotJson { status, body: String::from_utf8_lossy(&self.body).into_owned() })
            }
        }
    }
}

impl ServerArgs {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.trim_end_matches('/'))
    }

    fn token(&self) -> Result<Option<String>, ClientError> {
        let Some(path) = &self.token_file else { return Ok(None) };
        let bytes = crate::files::read_limited(path, 4096, "admin token", crate::files::READ_WITHIN)?;
        let token = String::from_utf8(bytes).map_err(|_| ClientError::TokenUtf8(path.clone()))?;
        Ok(Some(token.trim().to_string()))
    }

    /// Sends one request and reads the whole answer, whatever its status.
    fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Answer, ClientError> {
        self.send_typed(method, path, body, None)
    }

    /// [`ServerArgs::send`], with the body's `Content-Type`.
    fn send_typed(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: Option<&str>,
    ) -> Result<Answer, ClientError> {
        let url = self.url(path);
        let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(content_type) = content_type {
            request = request.header("Content-Type", content_type);
        }
        if let Some(token) = self.token()? {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(body.unwrap_or_default().to_vec())
            .map_err(|source| ClientError::Request { url: url.clone(), source })?;
        let mut response = agent.run(request).map_err(|source| ClientError::Connection { url: url.clone(), source })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec()
            .map_err(|source| ClientError::Answer { url, source })?;
        Ok(Answer { status, body })
    }
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_json(value: &serde_json::Value) -> Result<(), ClientError> {
    Ok(outln!("{}", serde_json::to_string_pretty(value).unwrap_or_default())?)
}

/// `thaw deploy`.
pub fn deploy(args: &DeployArgs) -> Result<u8, ClientError> {
    // Not a file here, but a registry reference (the server pulls the bundle), or a peer's
    // image (the server restores from that peer until the image is its own).
    let peer = crate::remote::is_peer_address(&args.file);
    let reference = args
        .file
        .to_str()
        .filter(|text| peer || (!args.file.exists() && crate::oci::Reference::parse(text).is_ok()))
        .map(str::to_string);
    let language = crate::pack::Language::of(&args.file, args.entry.as_deref());
    let source = language != crate::pack::Language::Wasm;
    if !source && (args.entry.is_some() || args.bundle || args.sample_data.is_some()) {
        return Err(ClientError::NotSource(args.file.clone()));
    }
    let mut query = Vec::new();
    let (mut memory, mut env) = (None, Vec::new());
    for setting in &args.settings {
        let (key, value) = setting.split_once('=').ok_or_else(|| ClientError::Setting(setting.clone()))?;
        match key {
            "memory" if source => {
                memory = Some(value.parse().map_err(|_| ClientError::Memory(value.to_string()))?);
            }
            "env" if source => env.push(value.to_string()),
            _ => query.push(format!("{}={}", encode(key), encode(value))),
        }
    }
    if reference.is_some() && (source || args.entry.is_some() || args.bundle || args.sample_data.is_some()) {
        return Err(ClientError::NotSource(args.file.clone()));
    }
    let upload = if let Some(reference) = &reference {
        reference.as_bytes().to_vec()
    } else if source {
        let options = crate::pack::SourceOptions {
            entry: args.entry.clone(),
            env,
            memory,
            bundle: args.bundle,
            sample: args.sample_data.clone(),
        };
        crate::pack::source_bundle(&args.file, &args.name, &options)?
    } else {
        crate::files::read_limited(&args.file, 1 << 30, "function", crate::files::READ_WITHIN)?
    };
    let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
    let pulled = match &reference {
        Some(_) if peer => ", restored by the server from that peer,",
        Some(_) => ", pulled by the server,",
        None => "",
    };
    let how = if peer {
        "its VMs restored from the peer's memory until the server has the whole image"
    } else {
        "a cold boot and a snapshot, unless the server has this version"
    };
    eprintln!("thaw: deploying {}{pulled} to {} ({how})", args.name, args.server.server);
    let content_type = reference.as_ref().map(|_| crate::serve::REFERENCE_TYPE);
    let path = format!("/v1/functions/{}{query}", encode(&args.name));
    let answer = args.server.send_typed("PUT", &path, Some(&upload), content_type)?;
    let json = answer.json()?;
    if args.json {
        print_json(&json)?;
    } else {
        let function = &json["function"];
        outln!(
            "{} {}: version {}, {} mode",
            args.name,
            json["deployment"].as_str().unwrap_or("deployed"),
            function["version"].as_str().unwrap_or("?"),
            function["settings"]["mode"].as_str().unwrap_or("?")
        )?;
    }
    Ok(0)
}

/// `thaw call`: the function's response on stdout. A function that failed (502) exits 104 and
/// one that ran out of time (504) exits 124, as `thaw invoke` does, with the server's error
/// line on stderr; anything else the server refused is an error.
pub fn call(args: &CallArgs) -> Result<u8, ClientError> {
    let body = crate::invoke::request_body(args.data.as_ref(), args.input.as_ref(), crate::files::READ_WITHIN)?;
    let answer = args.server.send("POST", &format!("/v1/functions/{}/invoke", encode(&args.name)), Some(&body))?;
    if answer.status == 200 {
        std::io::stdout()
            .write_all(&answer.body)
            .and_then(|()| std::io::stdout().flush())
            .map_err(|e| crate::write_failed("the response to stdout", e))?;
        return Ok(0);
    }
    // Any status but 200 is an error, so `json` gives one.
    let error = match answer.json() {
        Ok(_) => ClientError::Refused { status: answer.status, message: "(no error message)".into() },
        Err(e) => e,
    };
    let code = match answer.status {
        502 => abi::exit_code::FUNCTION_TRAPPED,
        504 => abi::exit_code::TIMEOUT,
        _ => return Err(error),
    };
    // The body is the request's stats: the function's stderr first, as `thaw invoke` shows it.
    if let Ok(stats) = serde_json::from_slice::<crate::stats::RequestStats>(&answer.body) {
        let _ = std::io::stderr().write_all(stats.stderr.unwrap_or_default().as_bytes());
    }
    eprintln!("thaw: {error}");
    Ok(code as u8)
}

/// `thaw functions`.
pub fn functions(args: &FunctionsArgs) -> Result<u8, ClientError> {
    let json = args.server.send("GET", "/v1/functions", None)?.json()?;
    if args.json {
        print_json(&json)?;
        return Ok(0);
    }
    outln!("{:<24} {:<14} {:<6} {:>8} {:>10} {:>8}  state", "name", "version", "mode", "live VMs", "ok", "errors")?;
    for f in json["functions"].as_array().into_iter().flatten() {
        let counters = &f["counters"];
        let errors = ["function_errors", "timeouts", "vm_failures", "rejected"]
            .iter()
            .map(|k| counters[k].as_u64().unwrap_or(0))
            .sum::<u64>();
        outln!(
            "{:<24} {:<14} {:<6} {:>8} {:>10} {:>8}  {}",
            f["name"].as_str().unwrap_or("?"),
            f["version"].as_str().unwrap_or("?").get(..12).unwrap_or("?"),
            f["settings"]["mode"].as_str().unwrap_or("?"),
            f["live_vms"].as_u64().unwrap_or(0),
            counters["ok"].as_u64().unwrap_or(0),
            errors,
            f["state"].as_str().unwrap_or("?")
        )?;
    }
    Ok(0)
}

/// `thaw logs`.
pub fn logs(args: &LogsArgs) -> Result<u8, ClientError> {
    let path = format!("/v1/functions/{}/logs?lines={}", encode(&args.name), args.lines);
    let json = args.server.send("GET", &path, None)?.json()?;
    if args.json {
        print_json(&json)?;
        return Ok(0);
    }
    // The function's bytes reach a terminal only as text: its escape sequences could set the
    // title, recolour or rewrite what the operator sees.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let shown = |text: &str| if terminal { printable(text) } else { text.to_string() };
    for line in json["lines"].as_array().into_iter().flatten() {
        outln!(
            "{} {:<7} {}",
            line["instance"].as_str().unwrap_or("?"),
            line["stream"].as_str().unwrap_or("?"),
            shown(line["text"].as_str().unwrap_or(""))
        )?;
    }
    Ok(0)
}

/// `text` with its control characters (but tab) escaped as `\xNN`, as journalctl
/// shows a service's output on a terminal.
fn printable(text: &str) -> String {
    use std::fmt::Write as _;
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' => shown.push(c),
            // Unicode's control characters are C0, DEL and C1: all below 0x100.
            c if c.is_control() => {
                let _ = write!(shown, "\\x{:02x}", c as u32);
            }
            c => shown.push(c),
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn a_function_s_control_characters_reach_a_terminal_escaped() {
        assert_eq!(printable("plain\ttext, ünïcode"), "plain\ttext, ünïcode");
        assert_eq!(printable("\x1b]0;pwned\x07title"), "\\x1b]0;pwned\\x07title");
        assert_eq!(printable("\x1b[31mred\r\x7f\u{9b}2J"), "\\x1b[31mred\\x0d\\x7f\\x9b2J");
    }
}
