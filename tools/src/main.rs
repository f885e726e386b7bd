//! `thaw`: package functions (`thaw pack`), run them under KVM (`thaw invoke`, `snapshot`,
//! `restore`, `serve`) or QEMU (`thaw qemu`), and measure them (`thaw bench`).
//!
//! Both commands stream what the guest prints to stdout, print one line on stderr saying why the
//! guest ended unless it exited 0, and exit with the guest's exit code (0-100) or one of the
//! codes in `abi::exit_code` (101 panic, 102 fault, 103 guest failure, 104 trap, 105 an exit
//! code above 100, 124 timeout, 125 thaw error).

/// `print!` for a command's output on stdout: a write that fails (a full disk) is an error
/// saying so, not a panic, and a closed pipe ends thaw quietly ([`write_failed`]). Flushes, so
/// the failure shows here.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        write!(stdout, $($arg)*)
            .and_then(|()| stdout.flush())
            .map_err(|e| $crate::write_failed("to stdout", e))
    }};
}

/// `println!` for a command's output, as [`out!`].
macro_rules! outln {
    () => {
        out!("\n")
    };
    ($($arg:tt)*) => {
        out!("{}\n", format_args!($($arg)*))
    };
}

mod bench;
mod client;
mod code;
mod demo;
mod devices;
mod files;
mod inspect;
mod invoke;
mod js;
mod kernel;
mod new;
mod oci;
mod pack;
#[cfg(feature = "peer")]
mod peer;
mod progress;
mod python;
mod qemu;
mod remote;
mod restore;
mod run;
mod serve;
mod snapshot;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Start serverless functions in real virtual machines, each request in a VM restored from a
/// checkpoint taken after the function's init. Measured on KVM here (docs/BENCHMARKS.md): the
/// hello function answers in about 55 µs from a kept VM reset after each request, and in about
/// 1 ms from a fresh VM restored for the request, against about 12 ms booted cold.
#[derive(Parser)]
#[command(name = "thaw", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel under KVM with thaw's VMM and stream its output.
    Run(run::RunArgs),
    /// Boot a guest kernel under QEMU (software emulation) from a BIOS disk image, optionally
    /// serving one request to a function bundle.
    Qemu(qemu::QemuArgs),
    /// Boot many fresh VMs under KVM (optionally serving a function) and print per-phase
    /// percentiles.
    Bench(bench::BenchArgs),
    /// Show init-less boot end to end: cold boot vs restore vs template, and memory per instance.
    Demo(demo::DemoArgs),
    /// Create a new function (Rust, C, JavaScript or Python) that builds and packs as written.
    New(new::NewArgs),
    /// Validate a WebAssembly function (or a JavaScript or Python one, on its runtime), compile
    /// it ahead of time for the guest, and package both as a bundle (.thaw).
    Pack(pack::PackArgs),
    /// Answer one request: cold-boot a bundle (.thaw), or restore a snapshot image (.snap).
    Invoke(invoke::InvokeArgs),
    /// Cold-boot a function, run its init, and write the VM at its checkpoint to an image, with
    /// the pages a sample request touches (its working set).
    Snapshot(snapshot::SnapshotArgs),
    /// Validate a snapshot image, or a function bundle's framing and manifest, and show what it
    /// holds.
    Inspect(inspect::InspectArgs),
    /// Serve N requests from fresh VMs restored from an image (or a template) and report
    /// latency, phases and memory.
    Restore(restore::RestoreArgs),
    /// Run the node agent: deploy functions over HTTP, keep them snapshotted in a durable
    /// store, and serve their invocations (docs/API.md).
    Serve(serve::ServeArgs),
    /// Deploy a bundle, a wasm module, a JavaScript or Python function, or a bundle in an OCI
    /// registry to a `thaw serve` (it snapshots it and serves it).
    Deploy(client::DeployArgs),
    /// Invoke a function on a `thaw serve`: the response on stdout.
    Call(client::CallArgs),
    /// Push a bundle (.thaw) or a snapshot image (.snap) to an OCI registry (logged in as `docker login` left it).
    Push(oci::PushArgs),
    /// Pull a bundle or a snapshot image from an OCI registry, checked before it is written.
    Pull(oci::PullArgs),
    /// List the functions a `thaw serve` has, with their versions and counters.
    Functions(client::FunctionsArgs),
    /// Show the last lines a function on a `thaw serve` wrote.
    Logs(client::LogsArgs),
    /// `thaw serve`'s registry puller, which the agent starts itself (`serve/puller.rs`).
    #[command(name = "__puller", hide = true)]
    Puller(SeccompArgs),
    /// `thaw serve`'s peer fetcher, which the agent starts itself (`serve/fetcher.rs`).
    #[command(name = "__fetcher", hide = true)]
    Fetcher(SeccompArgs),
    /// Print a shell completion script for thaw on stdout (e.g. `thaw completions bash >
    /// ~/.local/share/bash-completion/completions/thaw`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Options shared by every command that boots a kernel.
#[derive(Args, Debug, Clone)]
pub struct KernelArgs {
    /// Guest kernel ELF to boot [default: the kernel built into this binary].
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Wall-clock limit for the guest, in seconds (under `thaw qemu`, counted from QEMU's start,
    /// firmware included).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `--help` and `--version` print to stdout and succeed.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // A usage error is thaw's own failure (125, as the README says, not clap's 2), in one
        // line like every other.
        Err(e) => {
            eprintln!("thaw: error: {} (see --help)", usage_error(&e.to_string()));
            return ExitCode::from(abi::exit_code::HOST_ERROR as u8);
        }
    };
    match cli.command {
        Command::Completions { shell } => exit(completions(shell)),
        Command::Puller(args) => ExitCode::from(serve::puller::run(!args.no_seccomp)),
        Command::Fetcher(args) => ExitCode::from(serve::fetcher::run(!args.no_seccomp)),
        Command::Run(args) => exit(run::run(&args)),
        Command::Qemu(args) => exit(qemu::run(&args)),
        Command::Bench(args) => exit(bench::run(&args)),
        Command::Demo(args) => exit(demo::run(&args)),
        Command::New(args) => exit(new::run(&args)),
        Command::Pack(args) => exit(pack::run(&args)),
        Command::Serve(args) => exit(serve::run(&args)),
        Command::Deploy(args) => exit(client::deploy(&args)),
        Command::Call(args) => exit(client::call(&args)),
        Command::Push(args) => exit(oci::push(&args)),
        Command::Pull(args) => exit(oci::pull(&args)),
        Command::Functions(args) => exit(client::functions(&args)),
        Command::Logs(args) => exit(client::logs(&args)),
        Command::Invoke(args) => exit(invoke::run(&args)),
        Command::Snapshot(args) => exit(snapshot::run(&args)),
        Command::Inspect(args) => exit(inspect::run(&args)),
        Command::Restore(args) => exit(restore::run(&args)),
    }
}

/// clap's usage error on one line: its first line, with the lines indented under it (the
/// missing arguments' names) joined on, and without the usage and tips that follow.
fn usage_error(text: &str) -> String {
    let mut lines = text.lines();
    let mut line = lines.next().unwrap_or_default().trim_start_matches("error: ").to_string();
    for more in lines.take_while(|l| l.starts_with("  ")) {
        line.push(' ');
        line.push_str(more.trim());
    }
    line
}

/// The process's exit: a command's own code, or its error on one line and code 125.
fn exit<E: std::error::Error>(result: Result<u8, E>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("thaw: error: {e}");
            ExitCode::from(abi::exit_code::HOST_ERROR as u8)
        }
    }
}

/// `thaw completions SHELL`: the completion script on stdout.
fn completions(shell: clap_complete::Shell) -> Result<u8, OutputError> {
    use clap::CommandFactory as _;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "thaw", &mut script);
    out!("{}", String::from_utf8_lossy(&script))?;
    Ok(0)
}

/// The `--no-seccomp` switch of the commands that run VMs (`invoke`, `restore`, `serve`).
#[derive(Args, Debug, Clone)]
pub struct SeccompArgs {
    /// Run VMs without the syscall allow-list that confines thaw (docs/SECURITY.md): only to
    /// debug thaw itself, and it says so on stderr.
    #[arg(long)]
    pub no_seccomp: bool,
}

/// Confines the process to its syscall allow-list (`host_vmm::seccomp`) once its setup is done
/// and before any guest runs, unless `--no-seccomp` says not to, which is said loudly.
pub fn confine(args: &SeccompArgs) -> Result<(), host_vmm::seccomp::SeccompError> {
    confine_with(args, host_vmm::seccomp::install)
}

/// [`confine`] with the allow-list `install` puts in place: `thaw serve`'s, or that of a
/// process whose VMs' memory a peer holds (`thaw restore URL`).
pub fn confine_with(
    args: &SeccompArgs,
    install: fn() -> Result<(), host_vmm::seccomp::SeccompError>,
) -> Result<(), host_vmm::seccomp::SeccompError> {
    if args.no_seccomp {
        eprintln!(
            "thaw: WARNING: --no-seccomp: VMs run without the syscall allow-list; a guest that escaped into thaw could use any system call. Use it only to debug thaw."
        );
        return Ok(());
    }
    install()
}

/// The exit status of a process whose reader went away (128 + SIGPIPE), as a shell reports
/// `yes | head -1`.
const BROKEN_PIPE_STATUS: i32 = 128 + libc::SIGPIPE;

/// The error for output that could not be written (`what`: "to stdout", "the response to
/// stdout"). A closed pipe is not an error but the end: thaw exits at once, quietly, with
/// [`BROKEN_PIPE_STATUS`], as `cat` and `grep` do (nobody is left to read a message). Anything
/// else (a full disk) is an error line and exit code 125.
pub fn write_failed(what: &'static str, e: std::io::Error) -> OutputError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(BROKEN_PIPE_STATUS);
    }
    OutputError { what, source: e }
}

/// Output that could not be written ([`write_failed`]).
#[derive(Debug, thiserror::Error)]
#[error("writing {what}: {source}")]
pub struct OutputError {
    what: &'static str,
    source: std::io::Error,
}

/// Prints why the guest ended (unless it exited 0) and returns the process exit code.
pub fn finish(outcome: &host_vmm::Outcome) -> u8 {
    if !matches!(outcome, host_vmm::Outcome::Exited(0)) {
        eprintln!("thaw: {outcome}");
    }
    outcome.exit_code()
}
