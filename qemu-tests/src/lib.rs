//! Integration tests that boot thaw's guest kernels under both hypervisors; see `tests/`.
//!
//! The tests run the real `thaw` binary and the real kernels (artifact dependencies of this
//! crate), so they exercise exactly what a user runs. They need `/dev/kvm` and
//! `qemu-system-x86_64`; without either they fail and say why, never skip.
