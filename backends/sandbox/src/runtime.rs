//! The system calls any thread of pvstack's Rust programs makes whatever
//! its job: memory, futexes, thread start and exit, signal masks, time,
//! randomness, logging to stderr, and abort (panic = "abort" raises
//! SIGABRT with tgkill). Each binary's allow-lists extend this one.

use syscalls::Sysno;

pub const RUNTIME: &[Sysno] = &[
    // Memory (the allocator, thread stacks).
    Sysno::brk,
    Sysno::mmap,
    Sysno::munmap,
    Sysno::mremap,
    Sysno::mprotect,
    Sysno::madvise,
    // Threads: locks, start-up and exit.
    Sysno::futex,
    Sysno::set_robust_list,
    Sysno::rseq,
    Sysno::sigaltstack,
    Sysno::sched_getaffinity,
    Sysno::sched_yield,
    Sysno::gettid,
    Sysno::getpid,
    Sysno::exit,
    Sysno::exit_group,
    // Signals: masks, handlers' return, abort.
    Sysno::rt_sigprocmask,
    Sysno::rt_sigreturn,
    Sysno::tgkill,
    Sysno::restart_syscall,
    // Time and sleeping (clock_gettime is in the vDSO, but may fall back).
    Sysno::clock_gettime,
    Sysno::clock_nanosleep,
    Sysno::nanosleep,
    Sysno::getrandom,
    // Logging to stderr, closing what a thread is done with.
    Sysno::write,
    Sysno::writev,
    Sysno::close,
    Sysno::fcntl,
    Sysno::rt_sigaction,
    // Naming threads (std::thread::Builder::name) and reading the name.
    Sysno::prctl,
];
