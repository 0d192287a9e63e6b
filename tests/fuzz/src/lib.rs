//! What pvstack's fuzz targets share: how each target reads its input
//! ([`input`] and one module per target, which also writes the seeds of
//! corpus/), guest memory in a memfd as the VMM and the backends have it
//! ([`memory`]), and a scratch directory for image files and sockets
//! ([`scratch_dir`]; [`memory_image`] for an image on tmpfs).
//!
//! Every target runs pvstack's own code (the crates are dependencies); what
//! lives here is only the harness: decoding bytes into what a guest, a
//! frontend or a client would send, and the checks on the outcome.

pub mod input;
pub mod memory;
pub mod targets;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A directory of this process's own under the temp dir (scripts/fuzz
/// points TMPDIR at a directory it removes after the run).
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pvstack-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        dir
    })
}

/// A raw image of `sectors` 512-byte sectors in the scratch directory,
/// filled with a pattern, for the targets that serve a disk.
pub fn scratch_image(name: &str, sectors: u64) -> PathBuf {
    let path = scratch_dir().join(name);
    fill_image(&path, sectors);
    path
}

/// As [`scratch_image`], but in memory: in /dev/shm (tmpfs), under a name
/// of this process's own. The caller removes it once it has it open.
pub fn memory_image(name: &str, sectors: u64) -> PathBuf {
    let path = PathBuf::from(format!(
        "/dev/shm/pvstack-fuzz-{}-{name}",
        std::process::id()
    ));
    fill_image(&path, sectors);
    path
}

fn fill_image(path: &Path, sectors: u64) {
    let bytes: Vec<u8> = (0..sectors * 512)
        .map(|i| (i * 7 + i / 512) as u8)
        .collect();
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Writes to a socket whose peer is gone fail with EPIPE instead of
/// killing the process, as in pvstack's binaries (Rust's runtime ignores
/// SIGPIPE before `main`; libFuzzer's `main` does not).
pub fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_IGN touches no memory.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}
