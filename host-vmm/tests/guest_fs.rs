//! The function's in-memory filesystem (`guest-kernel/src/function/fs.rs`, compiled here for the
//! host) against fakes of what it takes from the kernel: a data volume held in memory, built by
//! `abi::volume::build` so its files are real volume bytes; an I/O reconnection table with the
//! guest table's rules; and a clock the tests set. The errnos expected are Wasmtime's preview 1
//! on Linux, or, where docs/WASI.md says thaw differs on purpose, what it says.

extern crate alloc;

#[allow(dead_code)] // the tests call most of the filesystem, not every accessor of it
#[path = "../../guest-kernel/src/function/fs.rs"]
mod fs;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use abi::bundle::{DEFAULT_DATA_MOUNT, DEFAULT_SCRATCH_DIRS, Manifest};
use abi::iotable::{CAPACITY, Handle, HandleKind, HandleState};
use abi::volume::Directory;
use abi::wasi::{errno, fdflags, filetype, lookupflags, oflags, rights};
use fs::{Errno, FIRST_PREOPEN, Files};

/// Follow a final symlink.
const FOLLOW: u32 = lookupflags::SYMLINK_FOLLOW;
/// Read and write rights.
const RW: u64 = rights::FD_READ | rights::FD_WRITE;
/// The preopens of a VM with a volume: the default scratch directories, then the data mount.
const ROOT: u32 = FIRST_PREOPEN;
const TMP: u32 = FIRST_PREOPEN + 1;
const DATA: u32 = FIRST_PREOPEN + 2;
/// The socket fds, which files never take.
const SOCKETS: core::ops::Range<u32> = 100..116;
const README: &[u8] = b"hello from the volume\n";

/// A data volume in memory, shared with the test so it can count reads and take the device
/// away.
#[derive(Debug, Clone)]
struct FakeVolume(Rc<RefCell<VolumeState>>);

#[derive(Debug)]
struct VolumeState {
    bytes: Vec<u8>,
    directory: Option<Directory>,
    /// Reads made of file bytes.
    reads: usize,
    /// False while the block device is gone (a restore onto a host without it).
    present: bool,
}

impl FakeVolume {
    /// A volume holding `files` (path, bytes), or no volume at all when `files` is `None`.
    fn new(files: Option<&[(&str, &[u8])]>) -> Self {
        let (bytes, directory) = match files {
            Some(files) => {
                let files: Vec<(String, Vec<u8>)> = files.iter().map(|(p, b)| (p.to_string(), b.to_vec())).collect();
                let bytes = abi::volume::build(&files, &["spare".into()]).unwrap();
                let directory = abi::volume::parse(&bytes).unwrap();
                (bytes, Some(directory))
            }
            None => (Vec::new(), None),
        };
        Self(Rc::new(RefCell::new(VolumeState { bytes, directory, reads: 0, present: true })))
    }

    fn reads(&self) -> usize {
        self.0.borrow().reads
    }

    fn set_present(&self, present: bool) {
        self.0.borrow_mut().present = present;
    }

    fn bytes(&self) -> Vec<u8> {
        self.0.borrow().bytes.clone()
    }
}

impl fs::Volume for FakeVolume {
    fn with_directory<R>(&self, f: impl FnOnce(&Directory) -> R) -> Option<R> {
        self.0.borrow().directory.as_ref().map(f)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> bool {
        let mut state = self.0.borrow_mut();
        let Some(end) = offset.checked_add(out.len() as u64) else { return false };
        if !state.present {
            return false;
        }
        let Some(bytes) = state.bytes.get(offset as usize..end as usize) else { return false };
        out.copy_from_slice(bytes);
        state.reads += 1;
        true
    }

    fn ready(&self) -> bool {
        self.0.borrow().present
    }
}

/// The I/O reconnection table, with the guest table's rules (`guest-kernel/src/iotable.rs`):
/// at most `abi::iotable::CAPACITY` entries, a closed entry kept until its slot is needed.
#[derive(Debug, Clone, Default)]
struct FakeHandles(Rc<RefCell<Vec<Handle>>>);

impl FakeHandles {
    /// The open (not closed) handles: (fd, path, offset, state).
    fn open_handles(&self) -> Vec<(u32, String, u64, HandleState)> {
        let table = self.0.borrow();
        table
            .iter()
            .filter(|h| h.state != HandleState::Closed)
            .map(|h| (h.fd, h.path.clone(), h.offset, h.state))
            .collect()
    }

    /// What a restore does: every `Active` handle waits to reconnect.
    fn restored(&self) {
        for h in self.0.borrow_mut().iter_mut().filter(|h| h.state == HandleState::Active) {
            h.state = HandleState::ReconnectPending;
        }
    }
}

fn live(table: &mut [Handle], fd: u32) -> Option<&mut Handle> {
    table.iter_mut().find(|h| h.fd == fd && h.state != HandleState::Closed)
}

impl fs::Handles for FakeHandles {
    fn open(&mut self, fd: u32, kind: HandleKind, offset: u64, port: u32, path: &str) -> bool {
        let mut table = self.0.borrow_mut();
        table.retain(|h| !(h.fd == fd && h.state == HandleState::Closed));
        if live(&mut table, fd).is_none() {
            if table.len() >= CAPACITY {
                let Some(closed) = table.iter().position(|h| h.state == HandleState::Closed) else { return false };
                table.remove(closed);
            }
            table.push(Handle { fd, kind, state: HandleState::Active, offset, port, path: path.into() });
        }
        true
    }

    fn close(&mut self, fd: u32) {
        if let Some(h) = live(&mut self.0.borrow_mut(), fd) {
            h.state = HandleState::Closed;
        }
    }

    fn set_offset(&mut self, fd: u32, offset: u64) {
        if let Some(h) = live(&mut self.0.borrow_mut(), fd) {
            h.offset = offset;
        }
    }

    fn reconnect(&mut self, fd: u32, step: impl FnOnce(&Handle) -> Result<(), Errno>) -> Result<(), Errno> {
        let pending = live(&mut self.0.borrow_mut(), fd).filter(|h| h.state == HandleState::ReconnectPending).cloned();
        let Some(handle) = pending else { return Ok(()) };
        step(&handle)?;
        if let Some(h) = live(&mut self.0.borrow_mut(), fd) {
            h.state = HandleState::Active;
        }
        Ok(())
    }
}

/// A wall clock that reads what the test set.
#[derive(Debug, Clone, Default)]
struct FakeClock(Rc<Cell<u64>>);

impl fs::Clock for FakeClock {
    fn realtime_ns(&self) -> u64 {
        self.0.get()
    }
}

type TestFiles = Files<FakeVolume, FakeHandles, FakeClock>;

/// One function's filesystem and the fakes under it.
struct Vm {
    files: TestFiles,
    volume: FakeVolume,
    handles: FakeHandles,
    clock: FakeClock,
}

/// A VM with `scratch_mib` of scratch allowance and a data volume holding `volume` (none when
/// `None`), with the default scratch directories and data mount.
fn vm_with(scratch_mib: u32, volume: Option<&[(&str, &[u8])]>) -> Vm {
    let manifest = Manifest {
        name: "fs-test".into(),
        wasm_sha256: [0; 32],
        memory_mib: 16,
        fuel: None,
        args: Vec::new(),
        env: Vec::new(),
        connections: Vec::new(),
        volume_sha256: volume.map(|_| [7; 32]),
        sample_request: None,
        code_sha256: Some([9; 32]),
        scratch_mib,
        scratch_dirs: DEFAULT_SCRATCH_DIRS.iter().map(|d| d.to_string()).collect(),
        data_mount: DEFAULT_DATA_MOUNT.into(),
        init_until_read: false,
    };
    let (volume, handles, clock) = (FakeVolume::new(volume), FakeHandles::default(), FakeClock::default());
    clock.0.set(1_000);
    let files = Files::new(
        &manifest,
        "0123456789abcdef0123456789abcdef",
        SOCKETS,
        clock.clone(),
        volume.clone(),
        handles.clone(),
    );
    Vm { files, volume, handles, clock }
}

/// A VM with 16 MiB of scratch and a small data volume.
fn vm() -> Vm {
    vm_with(16, Some(&[("readme.txt", README), ("words/en.txt", b"one\ntwo\nthree\n")]))
}

impl Vm {
    fn open(&mut self, dir: u32, path: &str, oflags: u16, base: u64) -> Result<u32, Errno> {
        self.files.open(dir, FOLLOW, path.as_bytes(), oflags, base, 0)
    }

    /// Creates (or truncates) `path` in `dir` holding `bytes`.
    fn create(&mut self, dir: u32, path: &str, bytes: &[u8]) -> Result<(), Errno> {
        let fd = self.open(dir, path, oflags::CREAT | oflags::TRUNC, RW)?;
        let written = self.files.write(fd, None, bytes);
        self.files.close(fd)?;
        assert_eq!(written?, bytes.len());
        Ok(())
    }

    /// Everything left to read from `fd`.
    fn read_rest(&mut self, fd: u32) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.files.read(fd, None, &mut buf)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// The whole file at `path` in `dir`.
    fn contents(&mut self, dir: u32, path: &str) -> Result<Vec<u8>, Errno> {
        let fd = self.open(dir, path, 0, rights::FD_READ)?;
        let bytes = self.read_rest(fd);
        self.files.close(fd)?;
        bytes
    }

    /// (inode, file type) of `path` in `dir`, following a final symlink when `follow` says so.
    fn stat(&self, dir: u32, path: &str, follow: bool) -> Result<(u64, u8), Errno> {
        let stat = self.files.stat_path(dir, if follow { FOLLOW } else { 0 }, path.as_bytes())?;
        Ok((stat.ino, stat.filetype))
    }

    fn exists(&self, dir: u32, path: &str) -> bool {
        self.stat(dir, path, false).is_ok()
    }

    /// The names `fd_readdir` lists for directory `fd`.
    fn list(&self, fd: u32) -> Vec<String> {
        let bytes = self.files.readdir(fd, 0, 1 << 16).unwrap();
        let mut names = Vec::new();
        let mut at = 0;
        while at + 24 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[at + 16..at + 20].try_into().unwrap()) as usize;
            names.push(String::from_utf8(bytes[at + 24..at + 24 + len].to_vec()).unwrap());
            at += 24 + len;
        }
        names
    }
}

// The preopens.

#[test]
fn preopens_are_fds_from_first_preopen_named_as_the_manifest_says() {
    let vm = vm();
    assert_eq!(FIRST_PREOPEN, 3);
    assert_eq!(vm.files.prestat(ROOT), Ok("/"));
    assert_eq!(vm.files.prestat(TMP), Ok("/tmp"));
    assert_eq!(vm.files.prestat(DATA), Ok("/data"));
    assert_eq!(vm.files.prestat(DATA + 1), Err(errno::BADF));
    assert_eq!(vm.files.prestat(0), Err(errno::BADF), "the standard streams are not the filesystem's");
    for fd in [ROOT, TMP, DATA] {
        let (filetype, flags, base, inheriting) = vm.files.fdstat(fd).unwrap();
        assert_eq!((filetype, flags), (filetype::DIRECTORY, 0));
        assert_eq!((base, inheriting), (rights::PREOPEN, rights::PREOPEN_INHERITING), "fd {fd}");
    }
    // The scratch root holds the others: /tmp through fd 3 is the directory of fd 4.
    assert_eq!(vm.stat(ROOT, "tmp", false), Ok((vm.files.stat_fd(TMP).unwrap().ino, filetype::DIRECTORY)));
    assert_eq!(vm.stat(ROOT, "data/readme.txt", false), vm.stat(DATA, "readme.txt", false));
}

#[test]
fn without_a_volume_there_is_no_data_preopen_or_mount() {
    let vm = vm_with(16, None);
    assert_eq!(vm.files.prestat(TMP), Ok("/tmp"));
    assert_eq!(vm.files.prestat(DATA), Err(errno::BADF));
    assert_eq!(vm.stat(ROOT, "data", false), Err(errno::NOENT));
}

#[test]
fn a_preopen_keeps_its_name_when_renumbered_and_opened_directories_have_none() {
    let mut vm = vm();
    let sub = vm.open(TMP, ".", oflags::DIRECTORY, rights::FD_READ).unwrap();
    assert_eq!(vm.files.prestat(sub), Err(errno::BADF));
    vm.files.close(sub).unwrap();
    vm.files.renumber(TMP, 40).unwrap();
    assert_eq!(vm.files.prestat(40), Ok("/tmp"));
    assert_eq!(vm.files.prestat(TMP), Err(errno::BADF));
    // Closing a preopen is allowed; its fd is then free for files.
    vm.files.close(ROOT).unwrap();
    assert_eq!(vm.open(40, "new", oflags::CREAT, RW), Ok(ROOT));
}

#[test]
fn the_instance_id_is_a_file_and_a_reseed_rewrites_it() {
    let mut vm = vm();
    assert_eq!(vm.contents(ROOT, "run/thaw/instance-id").unwrap(), b"0123456789abcdef0123456789abcdef");
    vm.files.reseed("ffffffffffffffffffffffffffffffff", vm.clock.clone());
    assert_eq!(vm.contents(ROOT, "run/thaw/instance-id").unwrap(), b"ffffffffffffffffffffffffffffffff");
}

#[test]
fn files_never_take_socket_fds_or_those_the_standard_streams_hold() {
    let mut vm = vm();
    vm.files.hold(DATA + 1);
    let mut fds = Vec::new();
    for i in 0..110 {
        fds.push(vm.open(TMP, &format!("f{i}"), oflags::CREAT, RW).unwrap());
    }
    assert!(!fds.contains(&(DATA + 1)));
    assert!(fds.iter().all(|fd| !SOCKETS.contains(fd)), "{fds:?}");
    vm.files.release(DATA + 1);
    assert_eq!(vm.open(TMP, "last", oflags::CREAT, RW), Ok(DATA + 1));
}

// Path resolution.

#[test]
fn dot_and_dot_dot_resolve_inside_the_directory() {
    let mut vm = vm();
    vm.files.mkdir(TMP, b"a").unwrap();
    vm.files.mkdir(TMP, b"a/b").unwrap();
    vm.create(TMP, "a/b/f", b"x").unwrap();
    let b = vm.stat(TMP, "a/b", false).unwrap();
    assert_eq!(vm.stat(TMP, "a/b/../b/./", false), Ok(b));
    assert_eq!(vm.stat(TMP, "./a//b/", false), Ok(b));
    assert_eq!(vm.stat(TMP, "a/..", false), vm.stat(TMP, ".", false));
    assert_eq!(vm.stat(TMP, "a/b/f/..", false), Err(errno::NOTDIR), "a file is no directory to leave");
    assert_eq!(vm.contents(TMP, "a/../a/b/./f").unwrap(), b"x");
    let dir = vm.open(TMP, "a/b/..", oflags::DIRECTORY, rights::FD_READ).unwrap();
    assert_eq!(vm.stat(dir, "b/f", false), vm.stat(TMP, "a/b/f", false));
}

#[test]
fn paths_out_of_their_directory_are_eperm() {
    let mut vm = vm();
    vm.files.mkdir(TMP, b"a").unwrap();
    for path in ["..", "../tmp", "a/../..", "a/../../tmp/a", "/tmp", "/"] {
        assert_eq!(vm.stat(TMP, path, false), Err(errno::PERM), "{path}");
    }
    assert_eq!(vm.stat(ROOT, "..", false), Err(errno::PERM), "not even from /");
    // An opened subdirectory is a boundary too.
    let a = vm.open(TMP, "a", oflags::DIRECTORY, rights::FD_READ).unwrap();
    assert_eq!(vm.stat(a, "..", false), Err(errno::PERM));
    assert_eq!(vm.open(a, "../escape", oflags::CREAT, RW), Err(errno::PERM));
    assert!(!vm.exists(TMP, "escape"));
}

#[test]
fn symlinks_out_of_their_directory_are_eperm() {
    let mut vm = vm();
    vm.files.symlink(b"..", TMP, b"up").unwrap();
    vm.files.symlink(b"../tmp/x", TMP, b"around").unwrap();
    assert_eq!(vm.stat(TMP, "up", true), Err(errno::PERM));
    assert_eq!(vm.stat(TMP, "up/tmp", false), Err(errno::PERM));
    assert_eq!(vm.open(TMP, "around", oflags::CREAT, RW), Err(errno::PERM));
    // Not followed, the link itself is there.
    assert_eq!(vm.stat(TMP, "up", false).map(|s| s.1), Ok(filetype::SYMBOLIC_LINK));
    // Absolute targets cannot be made.
    assert_eq!(vm.files.symlink(b"/tmp", TMP, b"abs"), Err(errno::PERM));
    // The same link resolves from a directory that has room above it.
    vm.files.mkdir(TMP, b"d").unwrap();
    vm.files.symlink(b"..", TMP, b"d/up").unwrap();
    assert_eq!(vm.stat(TMP, "d/up", true), vm.stat(TMP, ".", false));
}

#[test]
fn symlinks_are_followed_in_the_middle_always_and_at_the_end_when_asked() {
    let mut vm = vm();
    vm.files.mkdir(TMP, b"a").unwrap();
    vm.files.mkdir(TMP, b"a/b").unwrap();
    vm.files.symlink(b"a/b", TMP, b"link").unwrap();
    vm.create(TMP, "link/f", b"through").unwrap();
    assert_eq!(vm.contents(TMP, "a/b/f").unwrap(), b"through");
    assert_eq!(vm.files.readlink(TMP, b"link").unwrap(), "a/b");
    assert_eq!(vm.files.readlink(TMP, b"a"), Err(errno::INVAL));
    assert_eq!(vm.stat(TMP, "link", false).unwrap().1, filetype::SYMBOLIC_LINK);
    assert_eq!(vm.stat(TMP, "link", true), vm.stat(TMP, "a/b", false));
    assert_eq!(vm.stat(TMP, "link/", false), vm.stat(TMP, "a/b", false), "a trailing slash follows");
    // `..` after a link leaves the link's target, not the directory the link is in.
    assert_eq!(vm.stat(TMP, "link/..", false), vm.stat(TMP, "a", false));
    // A symlink opened without following is ELOOP (ENOTDIR when a directory was asked for).
    assert_eq!(vm.files.open(TMP, 0, b"link", 0, rights::FD_READ, 0), Err(errno::LOOP));
    assert_eq!(vm.files.open(TMP, 0, b"link", oflags::DIRECTORY, rights::FD_READ, 0), Err(errno::NOTDIR));
    // Data volume files can be linked to as well.
    vm.files.symlink(b"../data/readme.txt", ROOT, b"tmp/readme").unwrap();
    assert_eq!(vm.stat(TMP, "readme", true), Err(errno::PERM), "/tmp's fd ends at /tmp");
    assert_eq!(vm.contents(ROOT, "tmp/readme").unwrap(), README);
}

#[test]
fn symlink_loops_are_eloop() {
    let mut vm = vm();
    vm.files.symlink(b"self", TMP, b"self").unwrap();
    vm.files.symlink(b"pong", TMP, b"ping").unwrap();
    vm.files.symlink(b"ping", TMP, b"pong").unwrap();
    vm.files.symlink(b"ping/x", TMP, b"deeper").unwrap();
    for path in ["self", "ping", "pong/", "deeper", "self/x"] {
        assert_eq!(vm.stat(TMP, path, true), Err(errno::LOOP), "{path}");
    }
    assert_eq!(vm.open(TMP, "ping", oflags::CREAT, RW), Err(errno::LOOP));
    assert_eq!(vm.files.readlink(TMP, b"ping").unwrap(), "pong", "the links themselves are fine");
    // A chain of 40 links resolves; one more is too many.
    vm.create(TMP, "end", b"!").unwrap();
    vm.files.symlink(b"end", TMP, b"l0").unwrap();
    for i in 1..=40 {
        vm.files.symlink(format!("l{}", i - 1).as_bytes(), TMP, format!("l{i}").as_bytes()).unwrap();
    }
    assert_eq!(vm.contents(TMP, "l39").unwrap(), b"!");
    assert_eq!(vm.stat(TMP, "l40", true), Err(errno::LOOP));
}

#[test]
fn malformed_paths_get_their_errnos() {
    let mut vm = vm();
    vm.create(TMP, "file", b"x").unwrap();
    let long = "n".repeat(256);
    let cases: [(&[u8], Errno); 8] = [
        (b"", errno::NOENT),
        (b"a\0b", errno::INVAL),
        (b"\xff\xfe", errno::ILSEQ),
        (long.as_bytes(), errno::NAMETOOLONG),
        (b"file/x", errno::NOTDIR),
        (b"file/", errno::NOTDIR),
        (b"missing/x", errno::NOENT),
        (b"missing", errno::NOENT),
    ];
    for (path, want) in cases {
        assert_eq!(vm.files.stat_path(TMP, 0, path).map(|s| s.ino), Err(want), "{:?}", String::from_utf8_lossy(path));
    }
    assert!(vm.files.mkdir(TMP, "n".repeat(255).as_bytes()).is_ok(), "255 bytes is a name");
    assert_eq!(vm.files.stat_path(TMP + 40, 0, b"x").map(|s| s.ino), Err(errno::BADF));
    let file = vm.open(TMP, "file", 0, rights::FD_READ).unwrap();
    assert_eq!(vm.files.stat_path(file, 0, b"x").map(|s| s.ino), Err(errno::NOTDIR));
}

// Opening.

#[test]
fn path_open_flags_get_wasmtimes_errnos() {
    let mut vm = vm();
    vm.files.mkdir(TMP, b"dir").unwrap();
    vm.create(TMP, "file", b"x").unwrap();
    let open = |vm: &mut Vm, path: &str, oflags: u16, base: u64, flags: u16| {
        vm.files.open(TMP, FOLLOW, path.as_bytes(), oflags, base, flags)
    };
    assert_eq!(open(&mut vm, "dir", oflags::DIRECTORY | oflags::CREAT, 0, 0), Err(errno::INVAL));
    assert_eq!(open(&mut vm, "dir", oflags::DIRECTORY | oflags::TRUNC, 0, 0), Err(errno::INVAL));
    assert_eq!(open(&mut vm, "file", 0, RW, fdflags::SYNC), Err(errno::NOTSUP));
    assert_eq!(open(&mut vm, "file", 0, RW, fdflags::DSYNC), Err(errno::NOTSUP));
    assert_eq!(open(&mut vm, "dir", 0, RW, 0), Err(errno::ISDIR));
    assert_eq!(open(&mut vm, "file", oflags::DIRECTORY, 0, 0), Err(errno::NOTDIR));
    assert_eq!(open(&mut vm, "file/", 0, rights::FD_READ, 0), Err(errno::NOTDIR));
    assert_eq!(open(&mut vm, "new/", oflags::CREAT, RW, 0), Err(errno::ISDIR));
    assert_eq!(open(&mut vm, "file", oflags::CREAT | oflags::EXCL, RW, 0), Err(errno::EXIST));
    assert_eq!(open(&mut vm, "nothing", 0, RW, 0), Err(errno::NOENT));
    assert!(open(&mut vm, "dir/", 0, rights::FD_READ, 0).is_ok());
    // Read-only fds write nothing; the rights reported follow the open mode.
    let ro = open(&mut vm, "file", 0, rights::FD_READ, 0).unwrap();
    assert_eq!(vm.files.write(ro, None, b"y"), Err(errno::BADF));
    assert_eq!(vm.files.set_size(ro, 0), Err(errno::BADF));
    let (_, _, base, _) = vm.files.fdstat(ro).unwrap();
    assert_eq!(base & (rights::FD_READ | rights::FD_WRITE), rights::FD_READ);
    let wo = open(&mut vm, "file", 0, rights::FD_WRITE, fdflags::APPEND).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(vm.files.read(wo, None, &mut buf), Err(errno::BADF));
    assert_eq!(vm.files.fdstat(wo).unwrap().1, fdflags::APPEND);
    assert_eq!(vm.files.write(wo, None, b"yz"), Ok(2));
    assert_eq!(vm.contents(TMP, "file").unwrap(), b"xyz", "APPEND writes at the end");
}

#[test]
fn create_exclusive_never_follows_a_final_symlink() {
    let mut vm = vm();
    vm.files.symlink(b"target", TMP, b"dangling").unwrap();
    // POSIX (and Linux, under Wasmtime): with O_CREAT and O_EXCL a symlink is never followed, and
    // its existence is EEXIST, whatever it points at.
    assert_eq!(vm.open(TMP, "dangling", oflags::CREAT | oflags::EXCL, RW), Err(errno::EXIST));
    assert!(!vm.exists(TMP, "target"), "nothing was created through the link");
    // Without EXCL, O_CREAT follows a dangling link and creates its target.
    let fd = vm.open(TMP, "dangling", oflags::CREAT, RW).unwrap();
    vm.files.write(fd, None, b"made").unwrap();
    assert_eq!(vm.contents(TMP, "target").unwrap(), b"made");
}

// Writing and reading.

#[test]
fn reads_and_writes_move_the_offset_and_preads_and_pwrites_do_not() {
    let mut vm = vm();
    let fd = vm.open(TMP, "f", oflags::CREAT, RW).unwrap();
    assert_eq!(vm.files.write(fd, None, b"hello world"), Ok(11));
    assert_eq!(vm.files.tell(fd), Ok(11));
    assert_eq!(vm.files.write(fd, Some(0), b"J"), Ok(1));
    assert_eq!(vm.files.tell(fd), Ok(11));
    assert_eq!(vm.files.seek(fd, -5, 1), Ok(6));
    let mut buf = [0u8; 16];
    assert_eq!(vm.files.read(fd, None, &mut buf), Ok(5));
    assert_eq!(&buf[..5], b"world");
    assert_eq!(vm.files.read(fd, Some(0), &mut buf[..5]), Ok(5));
    assert_eq!(&buf[..5], b"Jello");
    assert_eq!(vm.files.seek(fd, -1, 0), Err(errno::INVAL));
    assert_eq!(vm.files.seek(fd, 0, 3), Err(errno::INVAL));
    // Writing past the end fills the gap with zeros.
    assert_eq!(vm.files.write(fd, Some(13), b"!"), Ok(1));
    assert_eq!(vm.contents(TMP, "f").unwrap(), b"Jello world\0\0!");
    assert_eq!(vm.files.readable(fd), Ok(3));
    // Directories are read with fd_readdir.
    assert_eq!(vm.files.read(TMP, None, &mut buf), Err(errno::ISDIR));
    assert_eq!(vm.files.seek(TMP, 0, 0), Err(errno::ISDIR));
}

#[test]
fn an_empty_write_changes_nothing() {
    let mut vm = vm();
    vm.create(TMP, "f", b"abc").unwrap();
    let fd = vm.open(TMP, "f", 0, RW).unwrap();
    assert_eq!(vm.files.seek(fd, 10, 0), Ok(10));
    vm.clock.0.set(5_000);
    // As write(2) and pwrite(2) of 0 bytes on Linux: no growth, no new modification time.
    assert_eq!(vm.files.write(fd, None, b""), Ok(0));
    assert_eq!(vm.files.write(fd, Some(100), b""), Ok(0));
    let stat = vm.files.stat_fd(fd).unwrap();
    assert_eq!(stat.size, 3);
    assert_eq!(stat.times[1], 1_000);
    assert_eq!(vm.files.tell(fd), Ok(10));
    // An empty write to a volume file leaves it on the volume.
    let data = vm.open(DATA, "readme.txt", 0, RW).unwrap();
    assert_eq!(vm.files.write(data, Some(0), b""), Ok(0));
    let reads = vm.volume.reads();
    assert_eq!(vm.read_rest(data).unwrap(), README);
    assert!(vm.volume.reads() > reads, "still read from the volume");
}

// Rename, unlink and directories.

#[test]
fn rename_moves_and_replaces_files_and_open_fds_follow_them() {
    let mut vm = vm();
    vm.create(TMP, "a", b"first").unwrap();
    vm.create(TMP, "b", b"second").unwrap();
    let fd = vm.open(TMP, "a", 0, rights::FD_READ).unwrap();
    vm.files.rename(TMP, b"a", TMP, b"b").unwrap();
    assert!(!vm.exists(TMP, "a"));
    assert_eq!(vm.contents(TMP, "b").unwrap(), b"first");
    assert_eq!(vm.read_rest(fd).unwrap(), b"first", "the open fd has the moved file");
    // Across preopens and into subdirectories.
    vm.files.mkdir(ROOT, b"sub").unwrap();
    vm.files.rename(TMP, b"b", ROOT, b"sub/c").unwrap();
    assert_eq!(vm.contents(ROOT, "sub/c").unwrap(), b"first");
    // A directory moves with what it holds, and `..` in it then leads to its new parent.
    vm.files.mkdir(TMP, b"moved").unwrap();
    vm.files.rename(ROOT, b"sub", TMP, b"moved/sub").unwrap();
    assert_eq!(vm.contents(TMP, "moved/sub/c").unwrap(), b"first");
    assert_eq!(vm.stat(TMP, "moved/sub/..", false), vm.stat(TMP, "moved", false));
    // Renaming a file onto a hard link of itself does nothing.
    vm.files.hard_link(TMP, 0, b"moved/sub/c", TMP, b"c2").unwrap();
    vm.files.rename(TMP, b"c2", TMP, b"moved/sub/c").unwrap();
    assert!(vm.exists(TMP, "c2") && vm.exists(TMP, "moved/sub/c"));
    assert_eq!(vm.files.stat_path(TMP, 0, b"c2").unwrap().nlink, 2);
}

#[test]
fn rename_refuses_what_posix_refuses() {
    let mut vm = vm();
    for dir in ["d", "d/inner", "full", "full/x", "empty"] {
        vm.files.mkdir(TMP, dir.as_bytes()).unwrap();
    }
    vm.create(TMP, "file", b"x").unwrap();
    let cases: [(&str, &str, Errno); 8] = [
        ("d", "d/inner/d", errno::INVAL),
        ("d", "d/d", errno::INVAL),
        ("d", "full", errno::NOTEMPTY),
        ("d", "file", errno::NOTDIR),
        ("file", "empty", errno::ISDIR),
        ("file/", "other", errno::NOTDIR),
        (".", "x", errno::BUSY),
        ("missing", "x", errno::NOENT),
    ];
    for (from, to, want) in cases {
        assert_eq!(vm.files.rename(TMP, from.as_bytes(), TMP, to.as_bytes()), Err(want), "{from} -> {to}");
    }
    assert_eq!(vm.files.rename(TMP, b"file", TMP, b".."), Err(errno::PERM));
    assert_eq!(vm.files.rename(TMP, b"file", TMP + 50, b"x"), Err(errno::BADF));
    // A directory replaces an empty one.
    vm.files.rename(TMP, b"d", TMP, b"empty").unwrap();
    assert!(vm.exists(TMP, "empty/inner") && !vm.exists(TMP, "d"));
}

#[test]
fn unlink_removes_files_and_symlinks_and_refuses_directories() {
    let mut vm = vm();
    vm.files.mkdir(TMP, b"dir").unwrap();
    vm.create(TMP, "file", b"kept open").unwrap();
    vm.files.symlink(b"file", TMP, b"link").unwrap();
    assert_eq!(vm.files.unlink(TMP, b"dir"), Err(errno::ISDIR));
    assert_eq!(vm.files.unlink(TMP, b"file/"), Err(errno::NOTDIR));
    assert_eq!(vm.files.unlink(TMP, b"missing"), Err(errno::NOENT));
    vm.files.unlink(TMP, b"link").unwrap();
    assert!(!vm.exists(TMP, "link") && vm.exists(TMP, "file"), "the link goes, not its target");
    // A file unlinked while open stays readable through its fd.
    let fd = vm.open(TMP, "file", 0, rights::FD_READ).unwrap();
    vm.files.unlink(TMP, b"file").unwrap();
    assert!(!vm.exists(TMP, "file"));
    assert_eq!(vm.files.stat_fd(fd).unwrap().nlink, 0);
    assert_eq!(vm.read_rest(fd).unwrap(), b"kept open");
    vm.files.close(fd).unwrap();
    // A volume file can be unlinked too; the volume keeps it.
    let image = vm.volume.bytes();
    vm.files.unlink(DATA, b"readme.txt").unwrap();
    assert!(!vm.exists(DATA, "readme.txt"));
    assert_eq!(vm.volume.bytes(), image);
}

#[test]
fn directories_are_made_and_removed_as_posix_says() {
    let mut vm = vm();
    vm.files.mkdir(TMP, b"d").unwrap();
    assert_eq!(vm.files.mkdir(TMP, b"d"), Err(errno::EXIST));
    assert_eq!(vm.files.mkdir(TMP, b"."), Err(errno::EXIST));
    assert_eq!(vm.files.mkdir(TMP, b"no/such"), Err(errno::NOENT));
    vm.files.mkdir(TMP, b"d/sub/").unwrap();
    vm.create(TMP, "file", b"").unwrap();
    assert_eq!(vm.files.rmdir(TMP, b"d"), Err(errno::NOTEMPTY));
    assert_eq!(vm.files.rmdir(TMP, b"file"), Err(errno::NOTDIR));
    assert_eq!(vm.files.rmdir(TMP, b"d/sub/."), Err(errno::INVAL));
    assert_eq!(vm.files.rmdir(TMP, b"d/sub/.."), Err(errno::NOTEMPTY));
    assert_eq!(vm.files.rmdir(TMP, b"gone"), Err(errno::NOENT));
    assert_eq!(vm.files.rmdir(ROOT, b"tmp"), Err(errno::NOTEMPTY));
    vm.files.unlink(TMP, b"file").unwrap();
    vm.files.rmdir(TMP, b"d/sub").unwrap();
    vm.files.rmdir(TMP, b"d").unwrap();
    assert!(!vm.exists(TMP, "d"));
    // A preopened directory cannot be removed, even empty (docs/WASI.md).
    assert_eq!(vm.files.rmdir(ROOT, b"tmp"), Err(errno::BUSY));
    // The volume's directories are directories like any other.
    assert_eq!(vm.files.rmdir(DATA, b"words"), Err(errno::NOTEMPTY));
    vm.files.rmdir(DATA, b"spare").unwrap();
}

#[test]
fn a_removed_directory_takes_no_new_entries() {
    let mut vm = vm();
    vm.files.mkdir(TMP, b"d").unwrap();
    let d = vm.open(TMP, "d", oflags::DIRECTORY, rights::FD_READ).unwrap();
    vm.files.rmdir(TMP, b"d").unwrap();
    // As in Linux: a directory that was removed while open is empty for good.
    assert_eq!(vm.files.mkdir(d, b"x"), Err(errno::NOENT));
    assert_eq!(vm.open(d, "f", oflags::CREAT, RW), Err(errno::NOENT));
    assert_eq!(vm.files.symlink(b"t", d, b"l"), Err(errno::NOENT));
    vm.create(TMP, "file", b"x").unwrap();
    assert_eq!(vm.files.hard_link(TMP, 0, b"file", d, b"h"), Err(errno::NOENT));
    assert_eq!(vm.files.rename(TMP, b"file", d, b"r"), Err(errno::NOENT));
    assert!(vm.exists(TMP, "file"));
    assert_eq!(vm.list(d), [".", ".."]);
}

#[test]
fn readdir_lists_dot_dot_dot_then_names_in_order() {
    let mut vm = vm();
    for name in ["b", "a", "c"] {
        vm.create(TMP, name, b"").unwrap();
    }
    assert_eq!(vm.list(TMP), [".", "..", "a", "b", "c"]);
    assert_eq!(vm.list(DATA), [".", "..", "readme.txt", "spare", "words"]);
    // Cookies are positions, and a short buffer is cut.
    let rest = vm.files.readdir(TMP, 3, 1 << 16).unwrap();
    assert_eq!(&rest[24..25], b"b");
    assert_eq!(vm.files.readdir(TMP, 0, 10).unwrap().len(), 10);
    let file = vm.open(TMP, "a", 0, rights::FD_READ).unwrap();
    assert_eq!(vm.files.readdir(file, 0, 100), Err(errno::NOTDIR));
}

// The scratch allowance.

#[test]
fn a_write_past_the_scratch_allowance_is_enospc_and_writes_nothing() {
    let mut vm = vm_with(1, None);
    let fd = vm.open(TMP, "big", oflags::CREAT, RW).unwrap();
    assert_eq!(vm.files.write(fd, None, &vec![1; 1 << 20]), Err(errno::NOSPC), "the file's node and name count too");
    assert_eq!(vm.files.stat_fd(fd).unwrap().size, 0);
    let fits = (1 << 20) - 4096;
    assert_eq!(vm.files.write(fd, None, &vec![1; fits]), Ok(fits));
    assert_eq!(vm.files.write(fd, None, &[2; 8192]), Err(errno::NOSPC));
    assert_eq!(vm.files.set_size(fd, 2 << 20), Err(errno::NOSPC));
    assert_eq!(
        vm.open(TMP, "another", oflags::CREAT, RW).and_then(|fd| vm.files.write(fd, None, &[3; 8192])),
        Err(errno::NOSPC)
    );
    assert_eq!(vm.files.stat_fd(fd).unwrap().size, fits as u64);
    // Space comes back when the file is truncated, or removed and closed.
    vm.files.set_size(fd, 0).unwrap();
    assert_eq!(vm.files.write(fd, Some(0), &[4; 8192]), Ok(8192));
    vm.files.write(fd, Some(8192), &vec![5; fits - 8192]).unwrap();
    vm.files.unlink(TMP, b"big").unwrap();
    assert_eq!(vm.create(TMP, "after", &[6; 8192]), Err(errno::NOSPC), "still held by the open fd");
    vm.files.close(fd).unwrap();
    vm.create(TMP, "after", &vec![6; fits]).unwrap();
}

#[test]
fn names_and_nodes_count_against_the_scratch_allowance() {
    let mut vm = vm_with(1, None);
    let made = (0..100_000).take_while(|i| vm.files.mkdir(TMP, format!("dir{i:05}").as_bytes()).is_ok()).count();
    assert!((5_000..9_000).contains(&made), "{made} directories fit in 1 MiB");
    assert_eq!(vm.files.mkdir(TMP, b"one-more"), Err(errno::NOSPC));
    assert_eq!(vm.files.symlink(b"x", TMP, b"link"), Err(errno::NOSPC));
    assert_eq!(vm.open(TMP, "file", oflags::CREAT, RW), Err(errno::NOSPC));
    vm.files.rmdir(TMP, b"dir00000").unwrap();
    vm.files.mkdir(TMP, b"one-more").unwrap();
}

#[test]
fn copying_a_volume_file_into_memory_counts_its_whole_size() {
    let big = vec![7u8; 700 << 10];
    let mut vm = vm_with(1, Some(&[("big.bin", &big)]));
    // Reading it costs nothing.
    let fd = vm.open(DATA, "big.bin", 0, RW).unwrap();
    assert_eq!(vm.read_rest(fd).unwrap().len(), big.len());
    vm.create(TMP, "small", &vec![1; 400 << 10]).unwrap();
    // A 1-byte change copies all 700 KiB, which no longer fits.
    assert_eq!(vm.files.write(fd, Some(0), b"x"), Err(errno::NOSPC));
    assert_eq!(vm.contents(DATA, "big.bin").unwrap(), big, "the file is as it was");
    vm.files.unlink(TMP, b"small").unwrap();
    assert_eq!(vm.files.write(fd, Some(0), b"x"), Ok(1));
    assert_eq!(vm.create(TMP, "small", &vec![1; 400 << 10]), Err(errno::NOSPC));
}

// Volume files: copy on first write.

#[test]
fn volume_files_are_read_from_the_volume_until_first_written_then_from_memory() {
    let mut vm = vm();
    let image = vm.volume.bytes();
    let reader = vm.open(DATA, "readme.txt", 0, rights::FD_READ).unwrap();
    let writer = vm.open(DATA, "readme.txt", 0, RW).unwrap();
    let before = vm.volume.reads();
    let mut buf = [0u8; 5];
    assert_eq!(vm.files.read(reader, None, &mut buf), Ok(5));
    assert_eq!(&buf, b"hello");
    assert_eq!(vm.volume.reads(), before + 1, "a read of a volume file reads the volume");
    // The first write copies the file into memory (one read of all of it) and changes it there.
    assert_eq!(vm.files.write(writer, None, b"HELLO"), Ok(5));
    let copied = vm.volume.reads();
    assert_eq!(copied, before + 2);
    assert_eq!(vm.read_rest(reader).unwrap(), b" from the volume\n", "the reader's offset is kept");
    assert_eq!(vm.contents(DATA, "readme.txt").unwrap(), b"HELLO from the volume\n");
    assert_eq!(vm.volume.reads(), copied, "reads now come from memory");
    assert_eq!(vm.volume.bytes(), image, "the volume is never written");
    // Its neighbours still come from the volume.
    assert_eq!(vm.contents(DATA, "words/en.txt").unwrap(), b"one\ntwo\nthree\n");
    assert_eq!(vm.volume.reads(), copied + 1);
}

#[test]
fn truncating_a_volume_file_reads_none_of_it() {
    let mut vm = vm();
    let before = vm.volume.reads();
    let fd = vm.open(DATA, "words/en.txt", oflags::TRUNC, RW).unwrap();
    assert_eq!(vm.files.stat_fd(fd).unwrap().size, 0);
    vm.files.write(fd, None, b"new").unwrap();
    assert_eq!(vm.contents(DATA, "words/en.txt").unwrap(), b"new");
    assert_eq!(vm.volume.reads(), before);
    assert!(vm.handles.open_handles().is_empty(), "nothing is read from the volume, so no handle");
    let set = vm.open(DATA, "readme.txt", 0, RW).unwrap();
    vm.files.set_size(set, 5).unwrap();
    assert_eq!(vm.contents(DATA, "readme.txt").unwrap(), b"hello");
}

#[test]
fn an_open_volume_file_has_a_handle_that_records_its_offset() {
    let mut vm = vm();
    let fd = vm.open(DATA, "readme.txt", 0, rights::FD_READ).unwrap();
    let path = |vm: &Vm| vm.handles.open_handles().into_iter().map(|(fd, p, at, _)| (fd, p, at)).collect::<Vec<_>>();
    assert_eq!(path(&vm), [(fd, "readme.txt".to_string(), 0)]);
    vm.files.read(fd, None, &mut [0; 6]).unwrap();
    assert_eq!(path(&vm), [(fd, "readme.txt".to_string(), 6)]);
    vm.files.seek(fd, 2, 0).unwrap();
    assert_eq!(path(&vm), [(fd, "readme.txt".to_string(), 2)]);
    vm.files.renumber(fd, 60).unwrap();
    assert_eq!(path(&vm), [(60, "readme.txt".to_string(), 2)]);
    vm.files.close(60).unwrap();
    assert_eq!(path(&vm), []);
    // Files in memory have none.
    let fd = vm.open(ROOT, "run/thaw/instance-id", 0, rights::FD_READ).unwrap();
    vm.files.read(fd, None, &mut [0; 6]).unwrap();
    assert_eq!(path(&vm), []);
}

#[test]
fn a_volume_file_copied_into_memory_gives_up_its_handle() {
    let mut vm = vm();
    let reader = vm.open(DATA, "readme.txt", 0, rights::FD_READ).unwrap();
    let writer = vm.open(DATA, "readme.txt", 0, RW).unwrap();
    assert_eq!(vm.handles.open_handles().len(), 2);
    vm.files.write(writer, None, b"H").unwrap();
    // Neither fd reads the volume any more: the table must not say they do (`thaw inspect`
    // shows it, and a restore would reconnect them).
    assert_eq!(vm.handles.open_handles(), []);
    vm.files.close(reader).unwrap();
    vm.files.close(writer).unwrap();
    assert_eq!(vm.handles.open_handles(), []);
}

#[test]
fn copied_volume_files_leave_room_in_the_handle_table() {
    let names: Vec<String> = (0..=CAPACITY).map(|i| format!("f{i:02}")).collect();
    let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"volume bytes"[..])).collect();
    let mut vm = vm_with(16, Some(&files));
    let fds: Vec<u32> = names[..CAPACITY].iter().map(|n| vm.open(DATA, n, 0, RW).unwrap()).collect();
    // The table holds CAPACITY handles: one more volume file cannot be opened.
    assert_eq!(vm.open(DATA, &names[CAPACITY], 0, RW), Err(errno::MFILE));
    // Written, the open files are in memory and need their handles no more.
    for fd in fds {
        vm.files.write(fd, Some(0), b"V").unwrap();
    }
    let last = vm.open(DATA, &names[CAPACITY], 0, RW).unwrap();
    assert_eq!(vm.read_rest(last).unwrap(), b"volume bytes");
}

#[test]
fn after_a_restore_a_volume_file_reads_only_once_the_volume_is_back() {
    let mut vm = vm();
    let fd = vm.open(DATA, "readme.txt", 0, rights::FD_READ).unwrap();
    let copied = vm.open(DATA, "words/en.txt", 0, RW).unwrap();
    vm.files.write(copied, Some(0), b"ONE").unwrap();
    vm.handles.restored();
    vm.volume.set_present(false);
    let mut buf = [0u8; 5];
    assert_eq!(vm.files.read(fd, None, &mut buf), Err(errno::IO));
    assert_eq!(vm.handles.open_handles()[0].3, HandleState::ReconnectPending);
    assert_eq!(vm.read_rest(copied).unwrap(), b"ONE\ntwo\nthree\n", "a file in memory needs no volume");
    vm.volume.set_present(true);
    assert_eq!(vm.files.read(fd, None, &mut buf), Ok(5));
    assert_eq!(&buf, b"hello");
    assert_eq!(vm.handles.open_handles()[0].3, HandleState::Active);
}

#[test]
fn hard_links_share_contents_and_count_links() {
    let mut vm = vm();
    vm.create(TMP, "a", b"shared").unwrap();
    vm.files.hard_link(TMP, 0, b"a", ROOT, b"b").unwrap();
    assert_eq!(vm.files.stat_path(TMP, 0, b"a").unwrap().nlink, 2);
    let fd = vm.open(ROOT, "b", 0, RW).unwrap();
    vm.files.write(fd, Some(0), b"S").unwrap();
    assert_eq!(vm.contents(TMP, "a").unwrap(), b"Shared");
    assert_eq!(vm.files.hard_link(TMP, 0, b".", TMP, b"d"), Err(errno::PERM));
    assert_eq!(vm.files.hard_link(TMP, 0, b"a", ROOT, b"b"), Err(errno::EXIST));
    vm.files.unlink(TMP, b"a").unwrap();
    assert_eq!(vm.contents(ROOT, "b").unwrap(), b"Shared");
}

#[test]
fn times_are_stamped_from_the_clock_and_set_as_asked() {
    let mut vm = vm();
    vm.clock.0.set(2_000);
    vm.create(TMP, "f", b"x").unwrap();
    assert_eq!(vm.files.stat_path(TMP, 0, b"f").unwrap().times, [2_000; 3]);
    vm.clock.0.set(3_000);
    let fd = vm.open(TMP, "f", 0, RW).unwrap();
    vm.files.write(fd, None, b"y").unwrap();
    assert_eq!(vm.files.stat_fd(fd).unwrap().times, [2_000, 3_000, 3_000]);
    vm.files.set_times_fd(fd, 10, 0, abi::wasi::fstflags::ATIM).unwrap();
    vm.files.set_times_path(TMP, 0, b"f", (0, 0), abi::wasi::fstflags::MTIM_NOW).unwrap();
    assert_eq!(vm.files.stat_fd(fd).unwrap().times, [10, 3_000, 3_000]);
    let both = abi::wasi::fstflags::ATIM | abi::wasi::fstflags::ATIM_NOW;
    assert_eq!(vm.files.set_times_fd(fd, 0, 0, both), Err(errno::INVAL));
    assert_eq!(vm.files.set_times_fd(fd, 0, 0, 1 << 4), Err(errno::INVAL));
}
