//! The guest's I/O reconnection table (`abi::iotable`): one entry per handle the runtime holds on
//! something outside the VM, kept encoded in a static buffer whose guest-physical address the
//! checkpoint hands to the VMM, so every snapshot carries it.
//!
//! A handle is `Active` while usable. After a restore [`restored`] makes every `Active` entry
//! `ReconnectPending`; the handle's next use calls [`reconnect`], which runs the handle's own
//! reconnect step and makes it `Active` again, or reports the failure to the caller (who turns it
//! into a WASI error).

use alloc::vec::Vec;

use abi::iotable::{self, Handle, HandleKind, HandleState, IoTableLocation, TABLE_LEN};
use spin::Mutex;

use crate::phys;

struct Table {
    handles: Vec<Handle>,
    bytes: [u8; TABLE_LEN],
}

static TABLE: Mutex<Table> = Mutex::new(Table { handles: Vec::new(), bytes: [0; TABLE_LEN] });

impl Table {
    fn publish(&mut self) {
        iotable::encode_into(&mut self.bytes, &self.handles);
    }

    fn entry(&mut self, fd: u32) -> Option<&mut Handle> {
        self.handles.iter_mut().find(|h| h.fd == fd && h.state != HandleState::Closed)
    }
}

/// Records a new `Active` handle (replacing any closed entry for the same fd). Returns false
/// when the table is full.
pub fn open(fd: u32, kind: HandleKind, offset: u64, port: u32, path: &str) -> bool {
    let mut table = TABLE.lock();
    table.handles.retain(|h| !(h.fd == fd && h.state == HandleState::Closed));
    if table.entry(fd).is_none() {
        if table.handles.len() >= iotable::CAPACITY {
            let Some(closed) = table.handles.iter().position(|h| h.state == HandleState::Closed) else { return false };
            table.handles.remove(closed);
        }
        let handle = Handle { fd, kind, state: HandleState::Active, offset, port, path: path.into() };
        table.handles.push(handle);
    }
    table.publish();
    true
}

/// Marks `fd`'s handle closed.
pub fn close(fd: u32) {
    let mut table = TABLE.lock();
    if let Some(h) = table.entry(fd) {
        h.state = HandleState::Closed;
    }
    table.publish();
}

/// Records the read offset of `fd`'s handle (rewriting only its entry: this runs on every read).
pub fn set_offset(fd: u32, offset: u64) {
    let mut table = TABLE.lock();
    let Table { handles, bytes } = &mut *table;
    let found = handles.iter_mut().enumerate().find(|(_, h)| h.fd == fd && h.state != HandleState::Closed);
    if let Some((index, h)) = found {
        h.offset = offset;
        iotable::encode_entry(bytes, index, h);
    }
}

/// The state of `fd`'s open handle, if it has one.
pub fn state(fd: u32) -> Option<HandleState> {
    TABLE.lock().entry(fd).map(|h| h.state)
}

/// After a restore: every `Active` handle must reconnect on its next use.
pub fn restored() {
    let mut table = TABLE.lock();
    for h in table.handles.iter_mut().filter(|h| h.state == HandleState::Active) {
        h.state = HandleState::ReconnectPending;
    }
    table.publish();
}

/// Before using `fd`: when its handle waits to reconnect, runs `step` and, if it succeeds, makes
/// the handle `Active` again. Returns `step`'s error, or `Ok` when nothing was needed.
pub fn reconnect<E>(fd: u32, step: impl FnOnce(&Handle) -> Result<(), E>) -> Result<(), E> {
    let pending = {
        let mut table = TABLE.lock();
        table.entry(fd).filter(|h| h.state == HandleState::ReconnectPending).map(|h| h.clone())
    };
    let Some(handle) = pending else { return Ok(()) };
    step(&handle)?;
    let mut table = TABLE.lock();
    if let Some(h) = table.entry(fd) {
        h.state = HandleState::Active;
    }
    table.publish();
    Ok(())
}

/// Where the table is, for the checkpoint hypercall.
pub fn location() -> IoTableLocation {
    let mut table = TABLE.lock();
    table.publish();
    IoTableLocation { gpa: phys::virt_to_phys(table.bytes.as_ptr()), len: TABLE_LEN as u64 }
}
