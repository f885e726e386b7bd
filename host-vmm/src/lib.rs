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
//! to an image ([`snapshot`]); [`capture`] does that for a function and records the pages a
//! sample request touches into the image ([`recording`], [`workingset`]). [`instance`] owns the life of a VM
//! restored from such an image (restore, park, serve, reset, destroy), [`pool`] keeps VMs parked
//! ahead of requests, and [`lane`] is the serving lifecycle every command loops over: make a VM
//! ready, serve one request, put the VM back, in each [`Mode`].
//! [`host`] holds what is opened once per process: `/dev/kvm` and thaw's CPUID.
//!
//! The guest is hostile: nothing it does may panic the host. Its misbehaviour ends its own VM
//! with an [`Outcome::Failed`] naming what it did; only host-side failures are [`VmmError`]s.

pub mod bootinfo;
pub mod capture;
pub mod cpu;
pub mod exit;
pub mod files;
pub mod floor;
pub mod function;
pub mod guard;
pub mod host;
pub mod instance;
pub mod kernel;
pub mod lane;
pub mod layout;
pub mod lazy;
pub mod mailbox;
pub mod memory;
pub mod outcome;
pub mod output;
pub mod paging;
pub mod pool;
pub mod recording;
pub mod remote;
pub mod seccomp;
pub mod serial;
pub mod snapshot;
pub mod virtio;
pub mod vm;
pub mod watchdog;
pub mod workingset;

pub use function::{Function, FunctionError, FunctionKind};
pub use instance::{Instance, ServeTimings, Served};
pub use kernel::{KernelError, KernelImage};
pub use lane::{Lane, Lanes, Mode, PutBack};
pub use outcome::{FunctionResponse, FunctionStatus, GuestError, Outcome};
pub use pool::{Pool, PoolStats};
pub use snapshot::Image;
pub use vm::{BootTimings, CheckpointMode, REWRITTEN_PAGES, Role, RunReport, Vm, VmConfig, VmmError, run_kernel};
