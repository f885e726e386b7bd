//! Python functions: CPython 3.11 for WASI (built from Debian's source by
//! `runtimes/python/build`, found on this machine rather than built into thaw) and what `thaw
//! pack` puts beside it. A Python function is an ordinary bundle of that command, packed with
//! its start-up up to the first read of stdin as its init. Its data volume, mounted at `/`, holds
//! the standard library at [`HOME`], the runner (`runtimes/python/runner.py`) that imports the
//! function's module and calls its `handle`, the function's files at [`MOUNT`], and the packages
//! of its `requirements.txt`. Nothing in the VMM or the guest knows it is Python.

use std::path::{Path, PathBuf};

use crate::files::{FilesError, READ_WITHIN, read_limited};

/// Where the function's files appear in the guest.
pub const MOUNT: &str = "/app";

/// CPython's prefix in the guest (`PYTHONHOME`): the standard library is under `lib/python3.11`.
pub const HOME: &str = "/usr/local";

/// The environment variable through which the runner learns the function's module.
pub const ENTRY_VARIABLE: &str = "THAW_PYTHON_ENTRY";

/// The environment variable naming a runtime directory (`bin/python3.11.wasm` and
/// `lib/python3.11`) to use instead of the one in [`RUNTIME_DIR`].
pub const RUNTIME_VARIABLE: &str = "THAW_PYTHON_RUNTIME";

/// Where `runtimes/python/build` puts the runtime by default, under the user's data directory
/// (`$XDG_DATA_HOME`, or `~/.local/share`).
pub const RUNTIME_DIR: &str = "thaw/python3.11-wasi";

/// Linear memory a Python function gets unless `--memory` says otherwise, in MiB: CPython and
/// its imports do not fit the 16 MiB a wasm function gets by default.
pub const DEFAULT_MEMORY_MIB: u32 = 128;

/// The modules looked for in a directory, in order, when `--entry` is not given.
pub const DEFAULT_ENTRIES: [&str; 2] = ["handler.py", "main.py"];

/// The runner, and where it is in the guest.
const RUNNER: &[u8] = include_bytes!("../../runtimes/python/runner.py");
const RUNNER_PATH: &str = "usr/local/lib/thaw/runner.py";
/// Where the standard library and the requirements go in the volume.
const STDLIB: &str = "usr/local/lib/python3.11";
const SITE_PACKAGES: &str = "usr/local/lib/python3.11/site-packages";
/// The runtime's wasm and standard library, relative to its directory.
const RUNTIME_WASM: &str = "bin/python3.11.wasm";
const RUNTIME_STDLIB: &str = "lib/python3.11";
/// The file of pip requirements looked for beside the function.
const REQUIREMENTS: &str = "requirements.txt";

/// Why a Python function could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PyError {
    /// No CPython for WASI on this machine.
    #[error(
        "no CPython for WASI in {}: build it there with thaw's `runtimes/python/build` (about 3 minutes, from Debian's source), or set {RUNTIME_VARIABLE} to a directory holding {RUNTIME_WASM} and {RUNTIME_STDLIB}",
        .0.display()
    )]
    NoRuntime(PathBuf),
    /// The runtime directory lacks a part.
    #[error("{}: not a CPython for WASI runtime: {} is missing", dir.display(), missing)]
    IncompleteRuntime {
        /// The directory.
        dir: PathBuf,
        /// The part that is not there.
        missing: &'static str,
    },
    /// A directory without its module.
    #[error("{}: no {} here: name the function's module with --entry FILE", dir.display(), DEFAULT_ENTRIES.join(" or "))]
    NoEntry {
        /// The directory.
        dir: PathBuf,
    },
    /// `--entry` is not a module inside the directory.
    #[error("--entry {0:?}: must be a .py file inside the function's directory, named relative to it")]
    Entry(String),
    /// `--data-dir` with Python.
    #[error("--data-dir: a Python function's files are at {MOUNT}: put data files in its directory")]
    DataDir,
    /// pip could not be started.
    #[error("{}: running pip: {source}", requirements.display())]
    PipRun {
        /// The requirements file.
        requirements: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A requirement with no pure-Python wheel.
    #[error(
        "{}: {package} has no pure-Python wheel (it has C extensions, or is published only as source): a thaw function can use pure-Python packages only",
        requirements.display()
    )]
    NotPure {
        /// The requirements file.
        requirements: PathBuf,
        /// The requirement pip could not satisfy.
        package: String,
    },
    /// pip failed otherwise.
    #[error("{}: pip install failed: {said}", requirements.display())]
    Pip {
        /// The requirements file.
        requirements: PathBuf,
        /// The start of what pip said.
        said: String,
    },
    /// A file could not be read.
    #[error(transparent)]
    File(#[from] FilesError),
}

/// A CPython for WASI: a directory with [`RUNTIME_WASM`] and [`RUNTIME_STDLIB`].
#[derive(Debug, Clone)]
pub struct Runtime {
    dir: PathBuf,
}

impl Runtime {
    /// The runtime named by [`RUNTIME_VARIABLE`], else the one in the user's [`RUNTIME_DIR`].
    pub fn find() -> Result<Self, PyError> {
        let var = |name| std::env::var_os(name).map(PathBuf::from);
        match var(RUNTIME_VARIABLE) {
            Some(dir) => Self::at(dir),
            None => Self::in_data_dir(var("XDG_DATA_HOME"), var("HOME")),
        }
    }

    /// The runtime in [`RUNTIME_DIR`] under the data directory `xdg_data_home` names, else
    /// `home`'s `.local/share` (each only when absolute, as the XDG convention asks).
    fn in_data_dir(xdg_data_home: Option<PathBuf>, home: Option<PathBuf>) -> Result<Self, PyError> {
        let data = xdg_data_home
            .filter(|p| p.is_absolute())
            .or_else(|| home.filter(|p| p.is_absolute()).map(|home| home.join(".local/share")));
        match data.map(|data| data.join(RUNTIME_DIR)) {
            Some(dir) if dir.exists() => Self::at(dir),
            dir => Err(PyError::NoRuntime(dir.unwrap_or_else(|| Path::new("~/.local/share").join(RUNTIME_DIR)))),
        }
    }

    /// The runtime in `dir`, checked to have its parts.
    fn at(dir: PathBuf) -> Result<Self, PyError> {
        for missing in [RUNTIME_WASM, RUNTIME_STDLIB] {
            if !dir.join(missing).exists() {
                return Err(PyError::IncompleteRuntime { dir, missing });
            }
        }
        Ok(Self { dir })
    }

    /// The interpreter's wasm.
    pub fn wasm(&self) -> Result<Vec<u8>, FilesError> {
        read_limited(&self.dir.join(RUNTIME_WASM), abi::bundle::MAX_WASM_BYTES as u64, "CPython", READ_WITHIN)
    }

    fn stdlib(&self) -> PathBuf {
        self.dir.join(RUNTIME_STDLIB)
    }
}

/// Whether `input` is a Python function: a `.py` file, or a directory whose `entry` is one or,
/// without `entry`, that holds one of [`DEFAULT_ENTRIES`], or `.py` files and no JavaScript (a
/// directory is otherwise JavaScript).
pub fn is_python(input: &Path, entry: Option<&str>) -> bool {
    if !input.is_dir() {
        return input.extension().is_some_and(|e| e == "py");
    }
    let has = |extensions: &[&str]| {
        std::fs::read_dir(input).into_iter().flatten().flatten().any(|e| {
            let path = e.path();
            path.is_file() && path.extension().is_some_and(|x| extensions.iter().any(|wanted| x == *wanted))
        })
    };
    match entry {
        Some(entry) => entry.ends_with(".py"),
        None => DEFAULT_ENTRIES.iter().any(|name| input.join(name).is_file()) || (has(&["py"]) && !has(&["js", "mjs"])),
    }
}

/// The function's module at `input`, named relative to it: a file is its own; a directory's is
/// `entry`, or the first of [`DEFAULT_ENTRIES`] it holds.
pub fn entry(input: &Path, entry: Option<&str>) -> Result<String, PyError> {
    if !input.is_dir() {
        return Ok(input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    match entry {
        Some(entry) => {
            let inside = !entry.starts_with('/') && !entry.split('/').any(|part| part == ".." || part.is_empty());
            if !inside || !entry.ends_with(".py") || !input.join(entry).is_file() {
                return Err(PyError::Entry(entry.into()));
            }
            Ok(entry.to_string())
        }
        None => DEFAULT_ENTRIES
            .iter()
            .find(|name| input.join(name).is_file())
            .map(|n| n.to_string())
            .ok_or_else(|| PyError::NoEntry { dir: input.to_path_buf() }),
    }
}

/// Whether `thaw pack` leaves an entry of a Python function's directory out of its files:
/// bytecode caches, virtual environments, `.git`, and thaw's own bundles and images.
pub fn left_out(name: &str, is_dir: bool) -> bool {
    if is_dir {
        matches!(name, "__pycache__" | ".git" | ".venv" | "venv")
    } else {
        name.ends_with(".thaw") || name.ends_with(".snap") || name.ends_with(".pyc")
    }
}

/// Whether the standard library's entry is left out of a function: its tests, the GUI and
/// packaging tools a function cannot use, and bytecode caches (about 45 MB of the runtime's
/// 60 MB).
fn stdlib_left_out(name: &str, is_dir: bool) -> bool {
    const DIRS: [&str; 14] = [
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "distutils",
        "site-packages",
        "venv",
        "config-3.11-wasm32-wasi",
    ];
    if is_dir { DIRS.contains(&name) } else { name.ends_with(".pyc") }
}

/// What a Python function's volume holds but for the function's own files: the runner and the
/// directories above it, and the host directories to read into it (each with where it goes and
/// what to leave out): the standard library of `runtime`, and the packages pip installed from
/// `requirements` (if it names one) into `installed`, which lives as long as the layout.
#[derive(Debug)]
pub struct Layout {
    /// Files written as they are (path in the volume, bytes): the runner.
    pub files: Vec<(String, Vec<u8>)>,
    /// Directories of the volume that hold them.
    pub dirs: Vec<String>,
    /// Host directories read into the volume.
    pub read: Vec<Part>,
    /// Where pip installed the requirements.
    _installed: Option<tempfile::TempDir>,
}

/// A host directory read into a Python function's volume.
#[derive(Debug)]
pub struct Part {
    /// The directory.
    pub dir: PathBuf,
    /// Where it goes in the volume.
    pub at: &'static str,
    /// What of it is left out, given each entry's name and whether it is a directory.
    pub left_out: fn(&str, bool) -> bool,
}

/// The [`Layout`] of a function on `runtime` whose requirements are `requirements`: pip runs
/// here.
pub fn layout(runtime: &Runtime, requirements: Option<&Path>) -> Result<Layout, PyError> {
    let mut dirs: Vec<String> =
        ["usr", "usr/local", "usr/local/lib", STDLIB, "usr/local/lib/thaw"].map(String::from).to_vec();
    let mut read = vec![Part { dir: runtime.stdlib(), at: STDLIB, left_out: stdlib_left_out }];
    let installed = requirements.map(install).transpose()?;
    if let Some(target) = &installed {
        dirs.push(SITE_PACKAGES.to_string());
        let left_out = |name: &str, is_dir| is_dir && name == "__pycache__";
        read.push(Part { dir: target.path().to_path_buf(), at: SITE_PACKAGES, left_out });
    }
    Ok(Layout { files: vec![(RUNNER_PATH.to_string(), RUNNER.to_vec())], dirs, read, _installed: installed })
}

/// The `requirements.txt` beside the function at `input` (in it, for a directory), if there is
/// one that names a package (not only blank lines and comments).
pub fn requirements(input: &Path) -> Option<PathBuf> {
    let dir = if input.is_dir() { input } else { input.parent().filter(|p| !p.as_os_str().is_empty())? };
    let file = dir.join(REQUIREMENTS);
    let text = std::fs::read_to_string(&file).ok()?;
    text.lines().any(|line| !line.trim().is_empty() && !line.trim_start().starts_with('#')).then_some(file)
}

/// The environment the runner needs, for the function's module at `entry` in [`MOUNT`].
pub fn environment(entry: &str) -> Vec<String> {
    vec![format!("PYTHONHOME={HOME}"), "PYTHONDONTWRITEBYTECODE=1".into(), format!("{ENTRY_VARIABLE}={MOUNT}/{entry}")]
}

/// The runner's path in the guest: CPython's first argument.
pub fn runner_argument() -> String {
    format!("/{RUNNER_PATH}")
}

/// Installs what `requirements` lists into a new directory with pip, as pure-Python wheels for
/// CPython 3.11 on any platform; a package with none is refused, named.
fn install(requirements: &Path) -> Result<tempfile::TempDir, PyError> {
    let run = |source| PyError::PipRun { requirements: requirements.to_path_buf(), source };
    let target = tempfile::tempdir().map_err(run)?;
    let output = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore"])
        .args(["--no-compile", "--only-binary=:all:", "--platform=any", "--python-version=3.11"])
        .args(["--implementation=py", "--abi=none", "--target"])
        .arg(target.path())
        .arg("-r")
        .arg(requirements)
        .output()
        .map_err(run)?;
    if output.status.success() {
        return Ok(target);
    }
    let said = String::from_utf8_lossy(&output.stderr);
    let unsatisfied = said.lines().find_map(|line| {
        let rest = line.strip_prefix("ERROR: Could not find a version that satisfies the requirement ")?;
        rest.split_whitespace().next().map(str::to_string)
    });
    Err(match unsatisfied {
        Some(package) => PyError::NotPure { requirements: requirements.to_path_buf(), package },
        None => PyError::Pip {
            requirements: requirements.to_path_buf(),
            said: match host_vmm::capture::first_lines(&output.stderr) {
                said if said.is_empty() => output.status.to_string(),
                said => said,
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_names_its_module_inside_it_and_a_file_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_python(dir.path(), None), "an empty directory is JavaScript's to refuse");
        std::fs::write(dir.path().join("app.py"), "def handle(r): return r").unwrap();
        assert!(is_python(dir.path(), None), "Python files and no JavaScript");
        std::fs::write(dir.path().join("tool.js"), "").unwrap();
        assert!(!is_python(dir.path(), None), "both, and no Python entry: JavaScript");
        std::fs::write(dir.path().join("main.py"), "def handle(r): return r").unwrap();
        assert!(is_python(dir.path(), None));
        assert_eq!(entry(dir.path(), None).unwrap(), "main.py");
        std::fs::write(dir.path().join("handler.py"), "def handle(r): return r").unwrap();
        assert_eq!(entry(dir.path(), None).unwrap(), "handler.py");
        assert_eq!(entry(dir.path(), Some("app.py")).unwrap(), "app.py");
        assert!(is_python(dir.path(), Some("app.py")));
        assert!(!is_python(dir.path(), Some("index.js")));
        for outside in ["../app.py", "/app.py", "a//app.py", "missing.py", "app.txt"] {
            let e = entry(dir.path(), Some(outside)).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--entry {outside:?}")), "{e}");
        }
        let file = dir.path().join("app.py");
        assert!(is_python(&file, None));
        assert_eq!(entry(&file, None).unwrap(), "app.py");
        let empty = tempfile::tempdir().unwrap();
        let e = entry(empty.path(), None).unwrap_err().to_string();
        assert!(e.ends_with("no handler.py or main.py here: name the function's module with --entry FILE"), "{e}");
    }

    #[test]
    fn requirements_are_looked_for_beside_a_file_and_in_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let handler = dir.path().join("handler.py");
        std::fs::write(&handler, "").unwrap();
        assert_eq!(requirements(&handler), None);
        std::fs::write(dir.path().join(REQUIREMENTS), "# none yet\n\n").unwrap();
        assert_eq!(requirements(&handler), None, "only comments: nothing to install");
        std::fs::write(dir.path().join(REQUIREMENTS), "# one\nsix\n").unwrap();
        assert_eq!(requirements(&handler), Some(dir.path().join(REQUIREMENTS)));
        assert_eq!(requirements(dir.path()), Some(dir.path().join(REQUIREMENTS)));
    }

    #[test]
    fn a_runtime_directory_without_its_parts_is_named_with_the_part() {
        let dir = tempfile::tempdir().unwrap();
        let e = Runtime::at(dir.path().to_path_buf()).unwrap_err().to_string();
        assert!(e.ends_with("not a CPython for WASI runtime: bin/python3.11.wasm is missing"), "{e}");
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join(RUNTIME_WASM), b"\0asm").unwrap();
        let e = Runtime::at(dir.path().to_path_buf()).unwrap_err().to_string();
        assert!(e.ends_with("lib/python3.11 is missing"), "{e}");
        std::fs::create_dir_all(dir.path().join(RUNTIME_STDLIB)).unwrap();
        assert!(Runtime::at(dir.path().to_path_buf()).is_ok());
    }

    #[test]
    fn the_runtime_is_looked_for_in_the_user_data_directory_and_a_missing_one_says_how_to_build_it() {
        let home = tempfile::tempdir().unwrap();
        let data = home.path().join(".local/share");
        let e = Runtime::in_data_dir(None, Some(home.path().into())).unwrap_err().to_string();
        let expected = format!("no CPython for WASI in {}: build it there", data.join(RUNTIME_DIR).display());
        assert!(e.starts_with(&expected) && e.contains("runtimes/python/build"), "{e}");
        // XDG_DATA_HOME wins over HOME; a relative one is ignored, as is a relative HOME.
        let xdg = home.path().join("xdg");
        let e = Runtime::in_data_dir(Some(xdg.clone()), Some(home.path().into())).unwrap_err().to_string();
        assert!(e.contains(&xdg.join(RUNTIME_DIR).display().to_string()), "{e}");
        let e = Runtime::in_data_dir(Some("xdg".into()), Some("home".into())).unwrap_err().to_string();
        assert!(e.contains("in ~/.local/share/thaw/python3.11-wasi:"), "{e}");
        for part in [RUNTIME_WASM, RUNTIME_STDLIB] {
            let path = data.join(RUNTIME_DIR).join(part);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            if part == RUNTIME_WASM {
                std::fs::write(path, b"\0asm").unwrap();
            } else {
                std::fs::create_dir(path).unwrap();
            }
        }
        let found = Runtime::in_data_dir(None, Some(home.path().into())).unwrap();
        assert_eq!(found.dir, data.join(RUNTIME_DIR));
    }
}
