//! thaw's VMM: boots the guest kernel ELF directly under KVM and runs it to an [`Outcome`].
//!
//! One boot, in order (see docs/ARCHITECTURE.md for the walk-through):
//!
//! 1. [`kernel`] validates the ELF: type, machine, segments, the abi note and the bootloader
//!    config, before anything is loaded.
//! 2. [`vm`] creates the VM and its guest memory, then lays out guest-physical memory as
//!    [`layout`] draws it: segments, page tables ([`paging`]), boot info ([`bootinfo`]).
//! 3. [`cpu`] puts the vCPU in long mode at the kernel's entry point, with thaw's CPUID leaves.
//! 4. [`vm`] runs the vCPU; every exit goes through [`exit::ExitHandler::handle`], which serves
//!    hypercalls and the COM1 transmitter and turns anything else into a [`GuestError`].
//!    [`watchdog`] interrupts `KVM_RUN` when the wall-clock timeout passes.
//!
//! A function's VM can stop at its checkpoint instead ([`CheckpointMode::Capture`]) and be written
//! to an image ([`snapshot`]); [`Vm::restore`] maps such an image copy-on-write and runs a fresh VM
//! from it.
//!
//! The guest is hostile: nothing it does may panic the host. Its misbehaviour ends its own VM
//! with an [`Outcome::Failed`] naming what it did; only host-side failures are [`VmmError`]s.

pub mod bootinfo;
pub mod cpu;
pub mod exit;
pub mod function;
pub mod kernel;
pub mod layout;
pub mod mailbox;
pub mod paging;
pub mod serial;
pub mod snapshot;
pub mod virtio;
pub mod vm;
pub mod watchdog;

pub use exit::{GuestError, Outcome};
pub use function::{Function, FunctionError, FunctionKind};
pub use kernel::{KernelError, KernelImage};
pub use mailbox::{FunctionResponse, FunctionStatus};
pub use snapshot::Image;
pub use vm::{
    BootTimings, CheckpointMode, RunReport, Vm, VmConfig, VmmError, host_entropy, next_instance_id, run_image,
    run_kernel, serve_from_image,
};
