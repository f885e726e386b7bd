//! `thaw new`: scaffold a function (Rust, C, JavaScript or Python) that builds and packs as
//! written. The files are the templates in `tools/templates/`, which docs/FUNCTIONS.md shows
//! whole; a test checks that the two agree and that what `thaw new` writes builds, packs and
//! answers.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

/// The language a function is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    /// Rust, built with cargo for wasm32-wasip1.
    Rust,
    /// C, built with clang and wasi-libc (a command).
    C,
    /// JavaScript, run by thaw's own runtime (a module whose top level is init).
    Js,
    /// Python, run by CPython for WASI (a module whose top level is init).
    Python,
}

/// How a Rust function is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// `init` once before the snapshot, `handle` for each request.
    Reactor,
    /// `main` in a fresh instance for each request.
    Command,
}

/// `thaw new` options.
#[derive(Args, Debug)]
pub struct NewArgs {
    /// The function's name, and the directory created for it: 1-64 of [A-Za-z0-9_-], starting
    /// with a letter.
    name: String,
    /// The language.
    #[arg(long, value_enum, default_value = "rust")]
    lang: Lang,
    /// For Rust: a reactor or a command [default: reactor]. A C function is a command; a
    /// JavaScript or Python one is a module with a handler.
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    /// Create the function's directory under this one [default: the current directory].
    #[arg(long, value_name = "DIR")]
    into: Option<PathBuf>,
}

/// (path in the function's directory, template text).
type Template = (&'static str, &'static str);

const RUST_REACTOR: &[Template] = &[
    ("Cargo.toml", include_str!("../templates/rust-reactor/Cargo.toml")),
    ("src/lib.rs", include_str!("../templates/rust-reactor/src/lib.rs")),
    (".gitignore", "target/\n*.thaw\n*.snap\n"),
];
const RUST_COMMAND: &[Template] = &[
    ("Cargo.toml", include_str!("../templates/rust-command/Cargo.toml")),
    ("src/main.rs", include_str!("../templates/rust-command/src/main.rs")),
    (".gitignore", "target/\n*.thaw\n*.snap\n"),
];
const C: &[Template] = &[
    ("main.c", include_str!("../templates/c/main.c")),
    ("Makefile", include_str!("../templates/c/Makefile")),
    (".gitignore", "*.wasm\n*.thaw\n*.snap\n"),
];
const JS: &[Template] = &[
    ("index.mjs", include_str!("../templates/js/index.mjs")),
    ("greetings.json", include_str!("../templates/js/greetings.json")),
    (".gitignore", "*.thaw\n*.snap\n"),
];
const PYTHON: &[Template] = &[
    ("handler.py", include_str!("../templates/python/handler.py")),
    ("greetings.json", include_str!("../templates/python/greetings.json")),
    ("requirements.txt", include_str!("../templates/python/requirements.txt")),
    (".gitignore", "*.thaw\n*.snap\n__pycache__/\n"),
];

/// True for a name cargo and thaw both take.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Why a function could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NewError {
    /// The name is not one cargo and thaw both take.
    #[error("{0:?} is not a function name: use 1-64 of [A-Za-z0-9_-], starting with a letter")]
    Name(String),
    /// `--lang c --kind reactor`.
    #[error("--kind reactor: a C function is a command (main per request)")]
    CReactor,
    /// `--lang js|python --kind ...`.
    #[error("--kind: a {0} function is a module whose handler is called per request; leave --kind out")]
    ModuleKind(&'static str),
    /// A directory could not be created (the function's own: it may exist).
    #[error("creating {}: {source}", path.display())]
    Create {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The next steps could not be printed.
    #[error(transparent)]
    Output(#[from] crate::OutputError),
}

/// Runs `thaw new`: writes the function's files into a new directory and prints how to build,
/// pack and call it.
pub fn run(args: &NewArgs) -> Result<u8, NewError> {
    if !valid_name(&args.name) {
        return Err(NewError::Name(args.name.clone()));
    }
    let kind = match (args.lang, args.kind) {
        (Lang::C, Some(Kind::Reactor)) => return Err(NewError::CReactor),
        (Lang::C, _) => Kind::Command,
        (Lang::Rust, kind) => kind.unwrap_or(Kind::Reactor),
        (Lang::Js, Some(_)) => return Err(NewError::ModuleKind("JavaScript")),
        (Lang::Python, Some(_)) => return Err(NewError::ModuleKind("Python")),
        (Lang::Js | Lang::Python, None) => Kind::Reactor,
    };
    let (templates, what) = match (args.lang, kind) {
        (Lang::Rust, Kind::Reactor) => (RUST_REACTOR, "a Rust reactor"),
        (Lang::Rust, Kind::Command) => (RUST_COMMAND, "a Rust command"),
        (Lang::C, _) => (C, "a C command"),
        (Lang::Js, _) => (JS, "a JavaScript module"),
        (Lang::Python, _) => (PYTHON, "a Python module"),
    };
    let dir = args.into.as_deref().unwrap_or(Path::new(".")).join(&args.name);
    // Creating the directory itself (not its parents) fails if it exists: nothing is overwritten.
    std::fs::create_dir(&dir).map_err(|source| NewError::Create { path: dir.clone(), source })?;
    for (path, text) in templates {
        let file = dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|source| NewError::Create { path: parent.into(), source })?;
        }
        std::fs::write(&file, text.replace("NAME", &args.name))
            .map_err(|source| NewError::Write { path: file.clone(), source })?;
    }
    let build = match args.lang {
        Lang::Rust => {
            let artifact = match kind {
                Kind::Reactor => args.name.replace('-', "_"),
                Kind::Command => args.name.clone(),
            };
            format!(
                "  rustup target add wasm32-wasip1    # once\n  cargo build --release --target wasm32-wasip1\n  thaw pack target/wasm32-wasip1/release/{artifact}.wasm --name {}\n",
                args.name
            )
        }
        Lang::C => format!(
            "  make                               # clang and wasi-libc: see the Makefile\n  thaw pack {}.wasm\n",
            args.name
        ),
        Lang::Js => "  thaw pack .                        # the directory: index.mjs and the files beside it\n".into(),
        Lang::Python => "  thaw pack .                        # the directory: handler.py, the files beside it and\n                                     # requirements.txt's packages (needs CPython for WASI: docs/FUNCTIONS.md)\n".into(),
    };
    let data = if matches!(args.lang, Lang::Js | Lang::Python) {
        r#"'{"name": "thaw", "lang": "fr"}'"#
    } else {
        "'hello thaw'"
    };
    outln!(
        "created {} ({what})\nnext:\n  cd {}\n{build}  thaw invoke {}.thaw --data {data}",
        dir.display(),
        dir.display(),
        args.name
    )?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cargo_and_thaw_both_take() {
        for good in ["f", "my-fn", "A_1"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "1fn", "-fn", "my.fn", "my/fn", "../x", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
