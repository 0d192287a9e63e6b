//! `pvstack ctl snapshot --to DIR [--resume]`: the running VM written to a
//! directory: `state.json` and guest RAM as `memory.bin` (sparse).

use std::path::Path;
use std::time::{Duration, Instant};

use super::capture::{write_atomically, LiveVm};
use super::memfile;
use super::state::{MEMORY_FILE, STATE_FILE};
use crate::api::VmControl;
use crate::error::{Error, Result};
use crate::memory;

/// What a snapshot wrote and what it cost.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    /// Guest RAM in bytes, and how much of it held data.
    pub memory_bytes: u64,
    pub data_bytes: u64,
    /// From the pause to the resume (or to the end, if the VM stays paused).
    pub paused: Duration,
}

/// Pauses the VM, stops the backends' rings, writes the state and guest
/// RAM to `dir` (created if missing; it must not hold a snapshot yet),
/// then resumes the VM and its rings if `resume`, or leaves it paused
/// (a later `resume` starts the rings again). On failure the VM goes on
/// as before.
pub fn snapshot(live: &LiveVm, control: &VmControl, dir: &Path, resume: bool) -> Result<Written> {
    live.check_supported("snapshot")?;
    let dir_error = |reason: String| Error::Snapshot {
        dir: dir.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| dir_error(format!("cannot create it: {e}")))?;
    for name in [STATE_FILE, MEMORY_FILE] {
        if dir.join(name).exists() {
            return Err(dir_error(format!(
                "it already holds a snapshot ({name}); snapshots are never overwritten"
            )));
        }
    }
    let memory = &control.machine.memory;
    let memfd = memory::backing_file(memory)
        .ok_or_else(|| Error::Takeover("guest memory has no file behind it".into()))?;
    let memory_bytes = control.machine.boot_info.mem_size;

    let began = Instant::now();
    let paused = live.pause(control)?;
    let rings = live.stop_rings()?;
    let written = (|| {
        let state = live.capture(control, &paused, rings)?;
        let saved = memfile::save(memfd, memory_bytes, &dir.join(MEMORY_FILE))?;
        write_atomically(dir, STATE_FILE, &state.to_json()?)?;
        Ok(saved)
    })();
    let saved = match written {
        Ok(saved) => saved,
        Err(err) => {
            let _ = std::fs::remove_file(dir.join(MEMORY_FILE));
            if let Err(e) = live.resume_rings() {
                log::error!("after the failed snapshot: {e}");
            }
            return Err(err);
        }
    };
    if resume {
        live.resume_rings()?;
        drop(paused);
    } else {
        live.leave_rings_stopped();
        paused.keep();
    }
    let written = Written {
        memory_bytes,
        data_bytes: saved.data_bytes,
        paused: began.elapsed(),
    };
    log::info!(
        "snapshot written to {} ({} of {} bytes of RAM held data; paused {} us{})",
        dir.display(),
        written.data_bytes,
        written.memory_bytes,
        written.paused.as_micros(),
        if resume {
            ", resumed"
        } else {
            ", stays paused"
        }
    );
    Ok(written)
}
