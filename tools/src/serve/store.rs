//! The durable function store of `thaw serve`, under its state directory:
//!
//! ```text
//! STATE/thaw.db              SQLite: each function's name, version and serving settings
//! STATE/images/VERSION.snap  the snapshot image of each version (VERSION: its bundle's SHA-256)
//! STATE/tmp/                 bundles and images being made; emptied at every start
//! STATE/code/                the code this agent compiled, by wasm and engine (`code.rs`)
//! ```
//!
//! A deploy makes the image in `tmp/`, renames it into `images/` and syncs the directory, and
//! only then commits the function's new version in one SQLite transaction. A crash before the
//! commit leaves the previous version in the database with its image untouched; the new image,
//! if it got that far, is garbage that the next collection removes. What reaches the
//! filesystem from a request is only ever a version: 64 lower-case hex digits.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use super::settings::Serving;

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory of the store.
    #[error("{path}: {source}")]
    Io {
        /// Which.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The SQLite database.
    #[error("{path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// What failed.
        source: rusqlite::Error,
    },
    /// Another `thaw serve` holds the state directory.
    #[error("another thaw serve uses the state directory {} (it holds the lock on {}); stop it, or give this one its own --state-dir", .0.display(), .0.join(LOCK_FILE).display())]
    Locked(PathBuf),
    /// The database holds something this thaw cannot read.
    #[error("{path}: {detail}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// One deployed function as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its name.
    pub name: String,
    /// Its version: the SHA-256 of its bundle, in hex.
    pub version: String,
    /// How it is served.
    pub serving: Serving,
    /// When this version was deployed, in seconds since the Unix epoch.
    pub deployed_at: u64,
}

/// The schema this thaw writes (SQLite's `user_version`).
const SCHEMA_VERSION: i64 = 1;

/// The file in the state directory whose lock says one agent uses it.
const LOCK_FILE: &str = "lock";

/// The store.
pub struct Store {
    root: PathBuf,
    db: Mutex<Connection>,
    /// Locked for as long as the store is open (`flock`, released when the process ends).
    _lock: std::fs::File,
}

/// Takes the state directory `root`'s lock, without waiting: [`StoreError::Locked`] if another
/// process holds it.
fn lock(root: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join(LOCK_FILE);
    let io = |source| StoreError::Io { path: path.clone(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io)?;
    // SAFETY: flock on a descriptor this function owns; it touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() == std::io::ErrorKind::WouldBlock {
            return Err(StoreError::Locked(root.to_path_buf()));
        }
        return Err(io(error));
    }
    Ok(file)
}

/// True for a version: 64 lower-case hex digits.
pub fn is_version(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Store {
    /// Opens (creating if needed) the store under `root`, and empties its `tmp/`. Only one
    /// process at a time has it open: another's rows and images would be overwritten and
    /// collected under it.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        for dir in [root.to_path_buf(), root.join("images"), root.join("tmp")] {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io(&dir))?;
        }
        let lock = lock(root)?;
        let tmp = root.join("tmp");
        for entry in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
            let path = entry.map_err(io(&tmp))?.path();
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.map_err(io(&path))?;
        }
        let path = root.join("thaw.db");
        let db_error = |source| StoreError::Db { path: path.clone(), source };
        let db = Connection::open(&path).map_err(db_error)?;
        db.pragma_update(None, "journal_mode", "WAL").map_err(db_error)?;
        db.pragma_update(None, "synchronous", "FULL").map_err(db_error)?;
        let schema: i64 = db.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(db_error)?;
        match schema {
            0 => {
                db.execute_batch(
                    "BEGIN;
                     CREATE TABLE functions (
                         name TEXT PRIMARY KEY NOT NULL,
                         version TEXT NOT NULL,
                         serving TEXT NOT NULL,
                         deployed_at INTEGER NOT NULL
                     );
                     PRAGMA user_version = 1;
                     COMMIT;",
                )
                .map_err(db_error)?;
            }
            SCHEMA_VERSION => {}
            other => {
                return Err(StoreError::Corrupt {
                    path,
                    detail: format!("schema version {other}, from a newer thaw (this one reads {SCHEMA_VERSION})"),
                });
            }
        }
        Ok(Self { root: root.to_path_buf(), db: Mutex::new(db), _lock: lock })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn db_error(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Db { path: self.root.join("thaw.db"), source }
    }

    /// Where `version`'s image lives (`version` must be one, see [`is_version`]).
    pub fn image_path(&self, version: &str) -> PathBuf {
        debug_assert!(is_version(version));
        self.root.join("images").join(format!("{version}.snap"))
    }

    /// `text` with the paths under the state directory written `STATE/...`, as the docs write
    /// them: what the API shows does not tell clients where the agent keeps its files. Only an
    /// absolute state directory is replaced: a relative one could match inside other words.
    pub fn without_root(&self, text: &str) -> String {
        let root = format!("{}/", self.root.to_string_lossy().trim_end_matches('/'));
        if self.root.is_absolute() && root.len() > 1 { text.replace(&root, "STATE/") } else { text.to_string() }
    }

    /// The agent's code cache.
    pub fn code_cache(&self) -> crate::code::CodeCache {
        crate::code::CodeCache::at(self.root.join("code"))
    }

    /// A directory for files being made, emptied at every start.
    pub fn scratch(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Moves a finished image from `made` (in [`Store::scratch`]) to `version`'s place, and
    /// syncs the directory so the name survives a crash.
    pub fn keep_image(&self, made: &Path, version: &str) -> Result<(), StoreError> {
        let to = self.image_path(version);
        std::fs::rename(made, &to).map_err(|source| StoreError::Io { path: to.clone(), source })?;
        let dir = self.root.join("images");
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|source| StoreError::Io { path: dir, source })
    }

    /// Makes `version` (whose image is kept) `name`'s current version, with `serving`.
    pub fn activate(&self, name: &str, version: &str, serving: &Serving) -> Result<(), StoreError> {
        let serving = serde_json::to_string(serving).map_err(|e| StoreError::Corrupt {
            path: self.root.join("thaw.db"),
            detail: format!("serving settings: {e}"),
        })?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.db()
            .execute(
                "INSERT INTO functions (name, version, serving, deployed_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET version = ?2, serving = ?3, deployed_at = ?4",
                params![name, version, serving, now as i64],
            )
            .map_err(self.db_error())?;
        Ok(())
    }

    /// Forgets `name`; false if it was not there.
    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        let removed =
            self.db().execute("DELETE FROM functions WHERE name = ?1", params![name]).map_err(self.db_error())?;
        Ok(removed > 0)
    }

    /// `name`'s record, if it is deployed.
    pub fn record(&self, name: &str) -> Result<Option<Record>, StoreError> {
        let db = self.db();
        let row = db
            .query_row(
                "SELECT name, version, serving, deployed_at FROM functions WHERE name = ?1",
                params![name],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .optional()
            .map_err(self.db_error())?;
        row.map(|row| self.decode(row)).transpose()
    }

    /// Every deployed function, by name.
    pub fn records(&self) -> Result<Vec<Record>, StoreError> {
        let db = self.db();
        let mut query = db
            .prepare("SELECT name, version, serving, deployed_at FROM functions ORDER BY name")
            .map_err(self.db_error())?;
        let rows = query
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))
            .map_err(self.db_error())?
            .collect::<Result<Vec<(String, String, String, i64)>, _>>()
            .map_err(self.db_error())?;
        rows.into_iter().map(|row| self.decode(row)).collect()
    }

    fn decode(
        &self,
        (name, version, serving, deployed_at): (String, String, String, i64),
    ) -> Result<Record, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt { path: self.root.join("thaw.db"), detail };
        if !is_version(&version) {
            return Err(corrupt(format!("function {name:?} has version {version:?}, not a SHA-256")));
        }
        let serving = serde_json::from_str(&serving)
            .map_err(|e| corrupt(format!("function {name:?} has unreadable serving settings: {e}")))?;
        Ok(Record { name, version, serving, deployed_at: u64::try_from(deployed_at).unwrap_or(0) })
    }

    /// Removes every file in `images/` that is not the image of a version some function is at.
    /// Returns the names removed.
    pub fn collect_garbage(&self) -> Result<Vec<String>, StoreError> {
        let referenced: Vec<String> = self.records()?.into_iter().map(|r| r.version).collect();
        let dir = self.root.join("images");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = name.strip_suffix(".snap").is_some_and(|v| referenced.iter().any(|r| r == v));
            if !keep {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io(&path))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use host_vmm::Mode;

    const V1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const V2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn what_the_api_shows_names_the_state_directory_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let image = store.image_path(V1);
        let shown = store.without_root(&format!("failed: {}: No such file or directory", image.display()));
        assert_eq!(shown, format!("failed: STATE/images/{V1}.snap: No such file or directory"));
        assert!(!shown.contains(&*dir.path().to_string_lossy()));
        assert_eq!(store.without_root("serving"), "serving");
    }

    #[test]
    fn functions_survive_reopening_and_garbage_is_only_what_nothing_references() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        std::fs::write(store.scratch().join("half-made"), b"x").unwrap();
        for version in [V1, V2] {
            let made = store.scratch().join("made");
            std::fs::write(&made, version).unwrap();
            store.keep_image(&made, version).unwrap();
        }
        std::fs::write(dir.path().join("images/.tmpXYZ"), b"stray").unwrap();
        let pool = Serving { mode: Mode::Pool, ..Serving::default() };
        store.activate("hello", V1, &Serving::default()).unwrap();
        store.activate("other", V1, &pool).unwrap();
        store.activate("hello", V2, &pool).unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert!(std::fs::read_dir(store.scratch()).unwrap().next().is_none(), "tmp/ is emptied at start");
        let records = store.records().unwrap();
        assert_eq!(records.iter().map(|r| (&*r.name, &*r.version)).collect::<Vec<_>>(), [("hello", V2), ("other", V1)]);
        assert_eq!(records[0].serving, pool);
        assert_eq!(store.collect_garbage().unwrap(), [".tmpXYZ"]);
        assert!(store.remove("other").unwrap());
        assert!(!store.remove("other").unwrap());
        assert_eq!(store.collect_garbage().unwrap(), [format!("{V1}.snap")]);
        assert!(store.image_path(V2).exists());
        assert_eq!(store.record("hello").unwrap().map(|r| r.version), Some(V2.to_string()));
    }

    #[test]
    fn a_database_from_a_newer_thaw_or_with_bad_rows_is_refused_with_one_line() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let db = Connection::open(dir.path().join("thaw.db")).unwrap();
        db.execute("INSERT INTO functions VALUES ('evil', '../../etc/passwd', '{}', 0)", []).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let error = store.records().unwrap_err().to_string();
        assert!(error.ends_with(r#"function "evil" has version "../../etc/passwd", not a SHA-256"#), "{error}");
        db.pragma_update(None, "user_version", 7).unwrap();
        drop(store);
        let error = Store::open(dir.path()).err().unwrap().to_string();
        assert!(error.ends_with("schema version 7, from a newer thaw (this one reads 1)"), "{error}");
    }

    /// Issue 28, defect 5: a second agent on the same state directory is refused before it
    /// touches anything (here the first's scratch file), with one line; it may start once the
    /// first has closed the store.
    #[test]
    fn one_process_at_a_time_has_the_store_open() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        std::fs::write(first.scratch().join("being-made"), b"x").unwrap();
        let error = Store::open(dir.path()).err().unwrap().to_string();
        assert!(error.starts_with("another thaw serve uses the state directory"), "{error}");
        assert!(error.contains(&format!("{}/lock", dir.path().display())), "{error}");
        assert!(first.scratch().join("being-made").exists(), "the refused agent emptied the first's tmp/");
        drop(first);
        Store::open(dir.path()).unwrap();
    }
}
