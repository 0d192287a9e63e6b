//! What confines pvstack and its vhost-user backends once they are set up:
//!
//! - [`seccomp`]: allow-list filters (the seccompiler crate) for a thread
//!   or the whole process, ending the process on a syscall outside the
//!   list with a line naming it ([`sigsys`]), or logging it (`--seccomp
//!   log`) while the lists are made;
//! - [`runtime`]: the system calls every thread of a Rust program here
//!   needs, and [`backend`] what every vhost-user backend needs, which each
//!   binary's own allow-list extends;
//! - [`user`]: `--user NAME|UID[:GID]` and dropping to that user with no
//!   capabilities and no_new_privs;
//! - [`landlock`]: restricting file access to the paths a process still
//!   needs (the landlock crate), best effort where the kernel lacks it;
//! - [`probe`]: which of these the host supports (`pvstack check`);
//! - [`args`] and [`confine`]: the flags every backend takes and the order
//!   in which a backend gives up what it no longer needs.

pub mod args;
pub mod backend;
pub mod confine;
mod error;
pub mod landlock;
pub mod probe;
pub mod runtime;
pub mod seccomp;
pub mod sigsys;
pub mod user;

pub use args::{SandboxArgs, SeccompMode};
pub use confine::{confine_backend, serving_files, Confinement};
pub use error::Error;
pub use syscalls::Sysno;
pub use user::User;
