//! The disk rows: one run of a disk workload in one mode. pvstack's
//! emulated modes are `--blk image=` disks the VMM serves; `vhost-user`
//! and `vhost-user-poll` get a pvstack-blk, and `qsd` a
//! qemu-storage-daemon, that the benchmark starts for the run (so each
//! can be given O_DIRECT on a disk); `host` is fio with no VM.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use pvstack_devices::blk::{BlkMode, POLL_US};

use crate::backend::{Backend, QsdConfig};
use crate::child::{interrupts_per_request, parse_sample, Sample, VmRun};
use crate::error::{Error, Result};
use crate::fio::FioConfig;
use crate::image::BenchImage;
use crate::mode::DiskMode;
use crate::programs;
use crate::workload::{DiskPattern, Workload};

/// How long a VM waits for its vhost-user backend to come back before it
/// fails: a backend that dies mid-run becomes an error, not a hang.
const RECONNECT_TIMEOUT_SECS: u32 = 10;

/// The programs the chosen disk modes start, found before anything is
/// made so that a missing one fails at once.
pub struct DiskPrograms {
    pvstack_blk: Option<PathBuf>,
    qsd: Option<PathBuf>,
    fio: Option<PathBuf>,
}

impl DiskPrograms {
    /// Finds what `modes` need; one error line for the first one missing.
    pub fn find(modes: &[DiskMode]) -> Result<DiskPrograms> {
        let needs = |wanted: &[DiskMode]| modes.iter().any(|m| wanted.contains(m));
        let find = |mode: &str, program: &str, hint: &str| {
            programs::find(program).ok_or_else(|| Error::Bench {
                what: mode.to_string(),
                reason: format!("{program} is not installed ({hint})"),
            })
        };
        let vhost_user = [
            DiskMode::Pvstack(BlkMode::VhostUser),
            DiskMode::Pvstack(BlkMode::VhostUserPoll),
        ];
        Ok(DiskPrograms {
            pvstack_blk: needs(&vhost_user)
                .then(|| {
                    find(
                        "vhost-user",
                        "pvstack-blk",
                        "build it: cargo build --release --bins",
                    )
                })
                .transpose()?,
            qsd: needs(&[DiskMode::Qsd])
                .then(|| {
                    find(
                        "qsd",
                        "qemu-storage-daemon",
                        "scripts/install-deps installs Debian's qemu-system-x86",
                    )
                })
                .transpose()?,
            fio: needs(&[DiskMode::Host])
                .then(|| {
                    find(
                        "host",
                        "fio",
                        "the host row runs it; scripts/install-deps installs Debian's fio",
                    )
                })
                .transpose()?,
        })
    }
}

/// Everything the disk rows share.
pub struct DiskBench<'a> {
    pub pvstack: &'a Path,
    pub kernel: Option<&'a Path>,
    pub image: &'a BenchImage,
    pub image_bytes: u64,
    pub secs: u64,
    pvstack_blk: Option<PathBuf>,
    qsd: Option<(PathBuf, QsdConfig)>,
    fio: Option<FioConfig>,
}

impl<'a> DiskBench<'a> {
    /// Settles how qemu-storage-daemon and fio run on `image`.
    pub fn prepare(
        pvstack: &'a Path,
        kernel: Option<&'a Path>,
        image: &'a BenchImage,
        image_bytes: u64,
        secs: u64,
        programs: DiskPrograms,
    ) -> Result<DiskBench<'a>> {
        let direct = image.storage().direct;
        let qsd = programs
            .qsd
            .map(|program| {
                QsdConfig::choose(&program, image.dir(), image.path(), direct)
                    .map(|config| (program, config))
            })
            .transpose()?;
        Ok(DiskBench {
            pvstack,
            kernel,
            image,
            image_bytes,
            secs,
            pvstack_blk: programs.pvstack_blk,
            qsd,
            fio: programs.fio.map(|program| FioConfig::new(program, direct)),
        })
    }

    /// qemu-storage-daemon's configuration, if `qsd` runs.
    pub fn qsd_config(&self) -> Option<&QsdConfig> {
        self.qsd.as_ref().map(|(_, config)| config)
    }

    /// fio's configuration, if `host` runs.
    pub fn fio_config(&self) -> Option<&FioConfig> {
        self.fio.as_ref()
    }

    /// Whether `mode`'s image I/O bypasses the host's page cache. The
    /// VMM's own emulated disks never open the image with O_DIRECT.
    pub fn direct(&self, mode: DiskMode) -> bool {
        self.image.storage().direct && !matches!(mode, DiskMode::Pvstack(m) if m.is_emulated())
    }

    /// Why `mode` cannot run `workload`, if it cannot.
    pub fn cannot_run(mode: DiskMode, workload: Workload) -> Option<String> {
        let queues = workload.disk_pattern()?.queues;
        match mode.max_queues() {
            Some(max) if max < queues => {
                Some(format!("{mode} has {max} queue; {workload} needs {queues}"))
            }
            _ => None,
        }
    }

    /// Runs `workload` once in `mode`.
    pub fn run_once(&self, mode: DiskMode, workload: Workload) -> Result<Sample> {
        let pattern = workload.disk_pattern().ok_or_else(|| Error::Bench {
            what: format!("{mode} {workload}"),
            reason: "not a disk workload".to_string(),
        })?;
        let dir = self.image.dir();
        let image = self.image.path();
        let direct = self.direct(mode);
        let backend = match mode {
            DiskMode::Host => {
                let fio = self.fio.as_ref().ok_or_else(|| not_prepared(mode, "fio"))?;
                return fio.run_once(image, self.image_bytes, &pattern, self.secs);
            }
            DiskMode::Pvstack(m) if m.is_emulated() => None,
            DiskMode::Pvstack(m) => {
                let program = self
                    .pvstack_blk
                    .as_ref()
                    .ok_or_else(|| not_prepared(mode, "pvstack-blk"))?;
                // The VMM's own mode=vhost-user-poll window.
                let poll_us = if m == BlkMode::VhostUserPoll {
                    POLL_US
                } else {
                    0
                };
                Some(Backend::start_pvstack_blk(
                    program,
                    dir,
                    image,
                    direct,
                    poll_us,
                    pattern.queues,
                )?)
            }
            DiskMode::Qsd => {
                let (program, config) = self
                    .qsd
                    .as_ref()
                    .ok_or_else(|| not_prepared(mode, "qemu-storage-daemon"))?;
                Some(Backend::start_qsd(
                    program,
                    dir,
                    image,
                    config,
                    pattern.queues,
                )?)
            }
        };
        let blk = match &backend {
            Some(backend) => {
                let mut spec = OsString::from("socket=");
                spec.push(backend.socket());
                spec.push(format!(",reconnect-timeout={RECONNECT_TIMEOUT_SECS}"));
                spec
            }
            None => emulated_spec(image, mode, &pattern),
        };
        let run = VmRun {
            pvstack: self.pvstack,
            kernel: self.kernel,
            netns: None,
            devices: vec!["--blk".into(), blk],
            guest_args: workload.guest_args(self.secs, 0),
            started: "disk 0:",
            result: "RESULT blk-bench",
            what: format!("{mode} {workload}"),
            backend_pid: backend.as_ref().map(Backend::pid),
        };
        let out = run.run()?;
        let backend_log = backend.map(Backend::finish).unwrap_or_default();
        let log = format!("{}\n{backend_log}", out.log);
        parse_sample(&out.result, out.cpu_seconds, interrupts_per_request(&log))
            .map_err(|reason| run.failed(reason))
    }
}

/// `image=PATH,mode=M[,num-queues=N]` for a disk the VMM serves.
fn emulated_spec(image: &Path, mode: DiskMode, pattern: &DiskPattern) -> OsString {
    let mut spec = OsString::from("image=");
    spec.push(image);
    spec.push(format!(",mode={mode}"));
    if pattern.queues > 1 {
        spec.push(format!(",num-queues={}", pattern.queues));
    }
    spec
}

fn not_prepared(mode: DiskMode, program: &str) -> Error {
    Error::Bench {
        what: mode.to_string(),
        reason: format!("{program} was not looked for (mode missing from --modes)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_legacy_controller_cannot_run_two_queues() {
        let legacy = DiskMode::Pvstack(BlkMode::EmulatedLegacy);
        let reason = DiskBench::cannot_run(legacy, Workload::RandRead4kQd32Queues2).unwrap();
        assert!(reason.contains("emulated-legacy has 1 queue"), "{reason}");
        assert_eq!(
            DiskBench::cannot_run(legacy, Workload::RandRead4kQd32),
            None
        );
        for mode in DiskMode::ALL.into_iter().filter(|&m| m != legacy) {
            assert_eq!(
                DiskBench::cannot_run(mode, Workload::RandRead4kQd32Queues2),
                None
            );
        }
    }

    #[test]
    fn emulated_disks_ask_the_vmm_for_their_queues() {
        let pattern = Workload::RandRead4kQd32Queues2.disk_pattern().unwrap();
        let spec = emulated_spec(
            Path::new("/d/disk.img"),
            DiskMode::Pvstack(BlkMode::EmulatedVirtio),
            &pattern,
        );
        assert_eq!(spec, "image=/d/disk.img,mode=emulated-virtio,num-queues=2");
    }
}
