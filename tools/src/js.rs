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
    /// `--data-dir` with JavaScript.
    #[error(
        "--data-dir: a JavaScript function's files are its data volume, at {MOUNT}: put data files in its directory"
    )]
    DataDir,
}

/// Whether `input` is a JavaScript function: a `.js` or `.mjs` file, or a directory.
pub fn is_javascript(input: &Path) -> bool {
    input.is_dir() || input.extension().is_some_and(|e| e == "js" || e == "mjs")
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
