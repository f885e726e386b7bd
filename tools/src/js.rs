//! JavaScript functions: the runtime built into thaw (`runtimes/js`, QuickJS-NG compiled to
//! wasm32-wasip1) and what `thaw pack` puts beside it. A JavaScript function is an ordinary
//! bundle: the runtime's wasm, the function's files as its data volume at [`MOUNT`], and the
//! entry module named in the runtime's environment. Nothing in the VMM or the guest knows it is
//! JavaScript.

use std::path::{Path, PathBuf};

/// The runtime's wasm.
pub const RUNTIME: &[u8] = include_bytes!(env!("CARGO_CDYLIB_FILE_THAW_JS_thaw_js"));

/// Where the function's files appear in the guest.
pub const MOUNT: &str = "/app";

/// The environment variable through which the runtime learns its entry module.
pub const ENTRY_VARIABLE: &str = "THAW_JS_ENTRY";

/// Linear memory a JavaScript function gets unless `--memory` says otherwise, in MiB: the engine
/// and a module's tables do not fit the 16 MiB a wasm function gets by default.
pub const DEFAULT_MEMORY_MIB: u32 = 128;

/// The entry modules looked for in a directory, in order, when `--entry` is not given.
pub const DEFAULT_ENTRIES: [&str; 2] = ["index.js", "index.mjs"];

/// Where `thaw pack --bundle` puts the bundled entry module among a directory's files.
pub const BUNDLED: &str = ".thaw/bundle.mjs";

/// The runtime's built-in modules, which a bundle leaves for the runtime to provide.
const BUILT_IN_MODULES: [&str; 4] = ["node:fs", "node:fs/promises", "fs", "fs/promises"];

/// Why a JavaScript function could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum JsError {
    /// A directory without its entry module.
    #[error("{}: no {} here: name the entry module with --entry FILE", dir.display(), wanted.join(" or "))]
    NoEntry {
        /// The directory.
        dir: PathBuf,
        /// The names looked for.
        wanted: Vec<String>,
    },
    /// `--entry` is not a module inside the directory.
    #[error("--entry {0:?}: must be a .js or .mjs file inside the function's directory, named relative to it")]
    Entry(String),
    /// `--entry` without a directory.
    #[error("--entry is for a directory; a .js or .mjs file is its own entry")]
    EntryWithFile,
    /// `--bundle` without JavaScript.
    #[error("--bundle is for JavaScript: a .js or .mjs file, or a directory")]
    BundleNotJavaScript,
    /// No esbuild to bundle with.
    #[error(
        "--bundle runs esbuild, found neither in the function's node_modules/.bin nor on PATH: install it (`apt install esbuild`, or `npm install --save-dev esbuild` in the function's directory)"
    )]
    NoEsbuild,
    /// esbuild could not be started or its output read.
    #[error("--bundle: running {}: {source}", esbuild.display())]
    EsbuildRun {
        /// The esbuild found.
        esbuild: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// esbuild refused.
    #[error("--bundle: esbuild could not bundle {}: {said}", entry.display())]
    Esbuild {
        /// The entry module.
        entry: PathBuf,
        /// The start of what esbuild said.
        said: String,
    },
    /// `--data-dir` with JavaScript.
    #[error(
        "--data-dir: a JavaScript function's files are its data volume, at {MOUNT}: put data files in its directory"
    )]
    DataDir,
}

/// Whether `thaw pack` leaves an entry of a JavaScript function's directory out of its files:
/// bundles and snapshot images (thaw's own output, which packing again would swallow),
/// `node_modules` (packages are bundled into the function's own files first) and `.git`.
pub fn left_out(name: &str, is_dir: bool) -> bool {
    if is_dir { name == "node_modules" || name == ".git" } else { name.ends_with(".thaw") || name.ends_with(".snap") }
}

/// Whether `input` is a JavaScript function: a `.js` or `.mjs` file, or a directory.
pub fn is_javascript(input: &Path) -> bool {
    input.is_dir() || input.extension().is_some_and(|e| e == "js" || e == "mjs")
}

/// The esbuild `thaw pack --bundle` runs: the function's own (`node_modules/.bin/esbuild` in
/// its directory `dir`), else the first on `PATH`.
fn esbuild(dir: Option<&Path>) -> Option<PathBuf> {
    let local = dir.map(|dir| dir.join("node_modules/.bin/esbuild")).filter(|p| p.is_file());
    local.or_else(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).map(|dir| dir.join("esbuild")).find(|p| p.is_file())
    })
}

/// The module at `entry` bundled by esbuild with the packages it imports, as one ES module for
/// the runtime (`--platform=neutral`, packages' `module` or `main` field), the runtime's
/// built-in modules left to it. `dir` is the function's directory, if it has one.
pub fn bundle(entry: &Path, dir: Option<&Path>) -> Result<Vec<u8>, JsError> {
    let esbuild = esbuild(dir).ok_or(JsError::NoEsbuild)?;
    let run = |source| JsError::EsbuildRun { esbuild: esbuild.clone(), source };
    let out = tempfile::tempdir().map_err(run)?;
    let outfile = out.path().join("bundle.mjs");
    let output = std::process::Command::new(&esbuild)
        .arg(entry)
        .args(["--bundle", "--format=esm", "--platform=neutral", "--main-fields=module,main"])
        .args(["--log-level=error", "--color=false"])
        .args(BUILT_IN_MODULES.map(|m| format!("--external:{m}")))
        .arg(format!("--outfile={}", outfile.display()))
        .output()
        .map_err(run)?;
    if !output.status.success() {
        let said = match host_vmm::capture::first_lines(&output.stderr) {
            said if said.is_empty() => output.status.to_string(),
            said => said,
        };
        return Err(JsError::Esbuild { entry: entry.to_path_buf(), said });
    }
    std::fs::read(&outfile).map_err(run)
}

/// The entry module of the function at `input`, named relative to it: a file is its own; a
/// directory's is `entry`, or the first of [`DEFAULT_ENTRIES`] it holds.
pub fn entry(input: &Path, entry: Option<&str>) -> Result<String, JsError> {
    if !input.is_dir() {
        if entry.is_some() {
            return Err(JsError::EntryWithFile);
        }
        return Ok(input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    match entry {
        Some(entry) => {
            let inside = !entry.starts_with('/') && !entry.split('/').any(|part| part == ".." || part.is_empty());
            if !inside || !(entry.ends_with(".js") || entry.ends_with(".mjs")) || !input.join(entry).is_file() {
                return Err(JsError::Entry(entry.into()));
            }
            Ok(entry.to_string())
        }
        None => {
            DEFAULT_ENTRIES.iter().find(|name| input.join(name).is_file()).map(|n| n.to_string()).ok_or_else(|| {
                JsError::NoEntry { dir: input.to_path_buf(), wanted: DEFAULT_ENTRIES.map(String::from).to_vec() }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_names_its_entry_inside_it_and_a_file_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.mjs"), "export default () => 1").unwrap();
        std::fs::write(dir.path().join("main.js"), "export default () => 1").unwrap();
        assert_eq!(entry(dir.path(), None).unwrap(), "index.mjs");
        assert_eq!(entry(dir.path(), Some("main.js")).unwrap(), "main.js");
        for outside in ["../main.js", "/main.js", "a//main.js", "missing.js", "index.txt"] {
            let e = entry(dir.path(), Some(outside)).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--entry {outside:?}")), "{e}");
        }
        let file = dir.path().join("main.js");
        assert_eq!(entry(&file, None).unwrap(), "main.js");
        assert!(entry(&file, Some("x.js")).is_err());
        std::fs::remove_file(dir.path().join("index.mjs")).unwrap();
        std::fs::remove_file(dir.path().join("main.js")).unwrap();
        let e = entry(dir.path(), None).unwrap_err().to_string();
        assert!(e.ends_with("no index.js or index.mjs here: name the entry module with --entry FILE"), "{e}");
    }
}
