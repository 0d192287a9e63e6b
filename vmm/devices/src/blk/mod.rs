//! Block devices, served where `mode=` says (see [`BlkMode`]): by a
//! vhost-user backend, `--blk socket=...` (a backend that is already
//! running) or `--blk image=...` (a pvstack-blk that pvstack starts for the
//! image and stops with the VM), or inside the VMM as an emulated baseline
//! ([`emulated_virtio`], [`emulated_legacy`]).

pub mod emulated_legacy;
pub mod emulated_virtio;
mod spec;
mod stats;

pub use spec::{BlkMode, BlkSource, BlkSpec, DEFAULT_QUEUE_SIZE, MAX_QUEUES};
pub use stats::DiskStats;

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::sync::{Arc, Mutex};

use log::info;
use pvstack_protocols::boot::{device_kind, DeviceInfo};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::bus::SharedDevice;
use crate::context::DeviceContext;
use crate::error::{Error, Result};
use crate::vhost_user::create::{first_connection, supervised_device};
use crate::vhost_user::supervisor::ReconnectPolicy;
use crate::vhost_user::{
    BackendConnection, BackendProcess, BackendSpec, ConfigSource, DeviceShape, VhostUserDevice,
    VhostUserHandle,
};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::DeviceEvents;

/// The backend program `image=` starts.
pub const BACKEND_PROGRAM: &str = "pvstack-blk";

/// The bound of pvstack-blk's adaptive polling window in
/// `mode=vhost-user-poll` (`mode=vhost-user` leaves pvstack-blk's default,
/// tens of microseconds). A window grows only while work comes back
/// sooner than the bound and shrinks to nothing while it does not, so
/// 1 ms keeps the backend polling through a guest's pauses of up to a
/// millisecond (it then skips nearly every kick), and an idle disk still
/// costs nothing.
pub const POLL_US: u32 = 1000;

/// Features passed on to the driver when the backend offers them. Left
/// out: a writable configuration space (CONFIG_WCE), zoned and
/// secure-erase devices, and packed rings, which nothing here sets up.
const FEATURES_PASSED_ON: &[u32] = &[
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
];

/// Bytes of configuration space read from the backend and served to the
/// driver: the whole `struct virtio_blk_config`.
const CONFIG_LEN: usize = size_of::<virtio_blk_config>();

/// [`FEATURES_PASSED_ON`] as a mask.
fn features_passed_on() -> u64 {
    FEATURES_PASSED_ON.iter().fold(0, |acc, &f| acc | bit(f))
}

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// The fields of the block configuration space pvstack looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Block size the backend advertises (meaningful with VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// Queues the backend advertises (meaningful with VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
}

impl BlkConfig {
    /// Reads the fields from configuration space bytes (little endian).
    pub fn parse(config: &[u8]) -> Option<Self> {
        let field = |offset: usize, len: usize| config.get(offset..offset + len);
        let capacity = field(offset_of!(virtio_blk_config, capacity), 8)?;
        let blk_size = field(offset_of!(virtio_blk_config, blk_size), 4)?;
        let num_queues = field(offset_of!(virtio_blk_config, num_queues), 2)?;
        Some(BlkConfig {
            capacity: u64::from_le_bytes(capacity.try_into().ok()?),
            blk_size: u32::from_le_bytes(blk_size.try_into().ok()?),
            num_queues: u16::from_le_bytes(num_queues.try_into().ok()?),
        })
    }
}

/// A block device, created and ready to be put on the bus.
pub struct BlkDevice {
    id: String,
    mode: BlkMode,
    bus_device: SharedDevice,
    /// The transport of a vhost-user device.
    transport: Option<Arc<Mutex<MmioTransport<VhostUserDevice>>>>,
    /// What an in-VMM device counts.
    stats: Option<Arc<DiskStats>>,
    info: DeviceInfo,
    config: BlkConfig,
}

impl BlkDevice {
    /// The device's name (`id=`, or `blk<index>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The register window to map at `info().mmio_addr` for
    /// `info().mmio_size` bytes. The backend process, if pvstack started
    /// one, lives as long as any clone of this does.
    pub fn bus_device(&self) -> SharedDevice {
        self.bus_device.clone()
    }

    /// Where the disk's requests are served.
    pub fn mode(&self) -> BlkMode {
        self.mode
    }

    /// The transport of a vhost-user device, for control operations on
    /// the running device; `None` for the in-VMM modes.
    pub fn transport(&self) -> Option<&Arc<Mutex<MmioTransport<VhostUserDevice>>>> {
        self.transport.as_ref()
    }

    /// Requests and interrupts of an in-VMM device; `None` for vhost-user
    /// devices, whose backend counts its own.
    pub fn stats(&self) -> Option<&Arc<DiskStats>> {
        self.stats.as_ref()
    }

    /// The device's entry in the boot info.
    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// The configuration the backend reported.
    pub fn config(&self) -> BlkConfig {
        self.config
    }
}

/// The VMM drops its disks when the VM has ended: an in-VMM disk then
/// reports what it served (`pvstack bench` reads the line).
impl Drop for BlkDevice {
    fn drop(&mut self) {
        if let Some(stats) = &self.stats {
            info!("{}", stats.summary(&self.id));
        }
    }
}

/// Creates the block device `spec` describes in the slot `ctx` gives:
/// connects to (or starts) its backend, negotiates, reads its
/// configuration and binds its notifications in KVM.
pub fn create_blk(spec: &BlkSpec, ctx: &DeviceContext<'_>) -> Result<BlkDevice> {
    let id = spec
        .id
        .clone()
        .unwrap_or_else(|| format!("blk{}", ctx.index));
    match spec.mode {
        BlkMode::EmulatedLegacy => emulated_legacy::create(id, spec, ctx),
        BlkMode::EmulatedVirtio => emulated_virtio::create(id, spec, ctx),
        BlkMode::VhostUser | BlkMode::VhostUserPoll => create_vhost_user(id, spec, ctx),
    }
}

/// A block device served by a vhost-user backend.
fn create_vhost_user(id: String, spec: &BlkSpec, ctx: &DeviceContext<'_>) -> Result<BlkDevice> {
    let (mut handle, process) = first_connection(&id, spec, ctx)?;
    let (shape, config) = negotiate_shape(spec, &mut handle)?;
    let queues = shape.queue_max_sizes.len() as u16;
    let events = DeviceEvents::for_context(ctx, queues)?;
    info!(
        "{id}: {} sectors of {} bytes, {queues} queues of up to {}, {} on {}, MMIO {:#x} GSI {}",
        config.capacity,
        config.blk_size,
        spec.queue_size,
        if shape.features & bit(VIRTIO_BLK_F_RO) != 0 {
            "read-only"
        } else {
            "writable"
        },
        handle.socket().display(),
        ctx.mmio_base,
        ctx.gsi
    );
    let policy = ReconnectPolicy {
        window: spec.reconnect_timeout,
    };
    let transport = supervised_device(&id, spec, shape, ctx, (handle, process), events, policy)?;
    Ok(BlkDevice {
        id,
        mode: spec.mode,
        bus_device: transport.clone(),
        transport: Some(transport),
        stats: None,
        info: ctx.device_info(device_kind::VIRTIO_MMIO, VIRTIO_ID_BLOCK),
        config,
    })
}

/// Opens the image of a disk the VMM serves itself.
fn open_image(spec: &BlkSpec) -> Result<Arc<pvstack_block::image::DiskImage>> {
    let BlkSource::Image(path) = &spec.source else {
        // The spec parser lets in-VMM modes through only with image=.
        return Err(Error::InvalidOption {
            option: "blk",
            value: format!("mode={}", spec.mode),
            reason: "a disk the VMM serves itself needs image=PATH".to_string(),
        });
    };
    Ok(Arc::new(pvstack_block::image::DiskImage::open(
        path,
        spec.readonly,
        false,
    )?))
}

/// The arguments of the pvstack-blk that `image=` starts: it must allow
/// the queue size the driver is offered.
fn backend_args(spec: &BlkSpec, image: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--image".into(),
        image.into(),
        "--queue-size".into(),
        spec.queue_size.to_string().into(),
        "--exit-on-disconnect".into(),
    ];
    if spec.readonly {
        args.push("--readonly".into());
    }
    if let Some(n) = spec.num_queues {
        args.extend(["--num-queues".into(), n.to_string().into()]);
    }
    if spec.mode == BlkMode::VhostUserPoll {
        args.extend(["--poll-us".into(), POLL_US.to_string().into()]);
    }
    args
}

/// Connects to the backend, starting it first for `image=`.
fn connect(spec: &BlkSpec) -> Result<(VhostUserHandle, Option<BackendProcess>)> {
    match &spec.source {
        BlkSource::Socket(socket) => Ok((
            VhostUserHandle::connect(socket, spec.allowed_backend())?,
            None,
        )),
        BlkSource::Image(image) => {
            // Checked here so that a missing or unwritable image is one
            // clear error rather than a backend that exits at start.
            OpenOptions::new()
                .read(true)
                .write(!spec.readonly)
                .open(image)
                .map_err(|source| Error::Image {
                    path: image.clone(),
                    cause: source,
                })?;
            let (process, stream) =
                BackendProcess::start(BACKEND_PROGRAM, &backend_args(spec, image))?;
            let handle =
                VhostUserHandle::from_stream(stream, process.socket(), spec.allowed_backend())?;
            Ok((handle, Some(process)))
        }
    }
}

/// Works out what the driver sees from what the backend offers and what
/// the spec asks for.
fn negotiate_shape(
    spec: &BlkSpec,
    handle: &mut VhostUserHandle,
) -> Result<(DeviceShape, BlkConfig)> {
    let incompatible = |handle: &VhostUserHandle, reason: String| Error::Incompatible {
        socket: handle.socket().to_path_buf(),
        reason,
    };
    let backend = handle.backend_features();
    if backend & bit(VIRTIO_F_VERSION_1) == 0 {
        return Err(incompatible(
            handle,
            "it does not offer VIRTIO_F_VERSION_1".to_string(),
        ));
    }
    if spec.readonly && backend & bit(VIRTIO_BLK_F_RO) == 0 {
        return Err(incompatible(
            handle,
            "readonly was asked for, but the backend serves the disk writable (no VIRTIO_BLK_F_RO)"
                .to_string(),
        ));
    }
    let mut config_space = handle.get_config(CONFIG_LEN as u32)?;
    let config = BlkConfig::parse(&config_space).ok_or_else(|| {
        incompatible(
            handle,
            format!("its configuration space is {} bytes", config_space.len()),
        )
    })?;
    let backend_queues = if backend & bit(VIRTIO_BLK_F_MQ) != 0 {
        u64::from(config.num_queues).min(handle.queue_num())
    } else {
        1
    };
    let num_queues = spec.num_queues.map_or(backend_queues, u64::from);
    if num_queues == 0 || num_queues > backend_queues {
        return Err(Error::TooFewQueues {
            socket: handle.socket().to_path_buf(),
            serves: backend_queues,
            needed: num_queues.max(1),
        });
    }
    // At most MAX_QUEUES (spec values are already within it), so it fits.
    let num_queues = num_queues.min(u64::from(MAX_QUEUES)) as u16;
    fit_config(&mut config_space, num_queues, spec.queue_size);
    let passed_on = features_passed_on();
    let shape = DeviceShape {
        device_id: VIRTIO_ID_BLOCK,
        features: backend & passed_on,
        queue_max_sizes: vec![spec.queue_size; usize::from(num_queues)],
        config: config_space,
        config_source: ConfigSource::Backend {
            takeover_check: same_capacity,
        },
    };
    let config = BlkConfig {
        num_queues,
        ..config
    };
    Ok((shape, config))
}

/// Makes the backend's configuration space the driver's: the queues the
/// driver gets, and a seg_max no larger than what a chain on this device's
/// queues carries (`pvstack_block::config::seg_max`): the backend sized
/// its seg_max for queues it cannot know, and the driver reads it before
/// it sets a queue's size.
fn fit_config(space: &mut [u8], num_queues: u16, queue_size: u16) {
    let at = offset_of!(virtio_blk_config, num_queues);
    space[at..at + 2].copy_from_slice(&num_queues.to_le_bytes());
    let at = offset_of!(virtio_blk_config, seg_max);
    let mut seg_max = [0u8; 4];
    seg_max.copy_from_slice(&space[at..at + 4]);
    let fitted = u32::from_le_bytes(seg_max).min(pvstack_block::config::seg_max(queue_size));
    space[at..at + 4].copy_from_slice(&fitted.to_le_bytes());
}

/// A block backend can take over only a disk of the same capacity.
fn same_capacity(old: &[u8], new: &[u8]) -> Option<String> {
    let capacity = |config| BlkConfig::parse(config).map(|c| c.capacity);
    match (capacity(old), capacity(new)) {
        (Some(old), Some(new)) if old == new => None,
        (Some(old), Some(new)) => {
            Some(format!("its disk has {new} sectors, the guest's has {old}"))
        }
        _ => Some("its configuration space is too short".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_fields_at_their_offsets() {
        let mut space = vec![0u8; CONFIG_LEN];
        space[0..8].copy_from_slice(&0x1234_5678_9abcu64.to_le_bytes());
        space[20..24].copy_from_slice(&4096u32.to_le_bytes());
        space[34..36].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(
            BlkConfig::parse(&space),
            Some(BlkConfig {
                capacity: 0x1234_5678_9abc,
                blk_size: 4096,
                num_queues: 3,
            })
        );
        assert_eq!(BlkConfig::parse(&space[..35]), None);
        assert_eq!(CONFIG_LEN, 96);
    }

    #[test]
    fn the_driver_is_told_no_more_segments_than_its_queues_carry() {
        let space_with = |seg_max: u32| {
            let mut space = vec![0u8; CONFIG_LEN];
            space[12..16].copy_from_slice(&seg_max.to_le_bytes());
            space[34..36].copy_from_slice(&8u16.to_le_bytes());
            space
        };
        let seg_max = |space: &[u8]| u32::from_le_bytes(space[12..16].try_into().unwrap());
        // A backend that sized seg_max for its own larger queues.
        let mut space = space_with(254);
        fit_config(&mut space, 2, DEFAULT_QUEUE_SIZE);
        assert_eq!(seg_max(&space), 126);
        assert_eq!(u16::from_le_bytes([space[34], space[35]]), 2, "num_queues");
        let mut space = space_with(126);
        fit_config(&mut space, 1, 64);
        assert_eq!(seg_max(&space), 62, "queue-size=64");
        // A backend's smaller limit stands.
        let mut space = space_with(30);
        fit_config(&mut space, 1, DEFAULT_QUEUE_SIZE);
        assert_eq!(seg_max(&space), 30);
    }

    #[test]
    fn the_started_backend_allows_the_queue_size_the_driver_is_offered() {
        let spec: BlkSpec = "image=disk.img,queue-size=1024,num-queues=2"
            .parse()
            .unwrap();
        let args = backend_args(&spec, Path::new("disk.img"));
        let at = args
            .iter()
            .position(|a| a == "--queue-size")
            .expect("--queue-size");
        assert_eq!(args[at + 1], "1024");
        let at = args
            .iter()
            .position(|a| a == "--num-queues")
            .expect("--num-queues");
        assert_eq!(args[at + 1], "2");
    }

    #[test]
    fn takeover_needs_the_same_capacity() {
        let space = |sectors: u64| {
            let mut space = vec![0u8; CONFIG_LEN];
            space[0..8].copy_from_slice(&sectors.to_le_bytes());
            space
        };
        assert_eq!(same_capacity(&space(2048), &space(2048)), None);
        let reason = same_capacity(&space(2048), &space(1024)).unwrap();
        assert!(reason.contains("1024 sectors"), "{reason}");
        assert!(same_capacity(&space(2048), &[0; 4]).is_some());
    }
}
