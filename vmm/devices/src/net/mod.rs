//! Network devices (virtio-net over virtio-mmio) served by a vhost-user
//! backend: `--net socket=...` (a backend that is already running, e.g.
//! pvstack-net in peer mode) or `--net tap=...` (a pvstack-net that pvstack
//! starts on the TAP and stops with the VM). The VMM serves the
//! configuration space itself: MAC, link status and MTU.

pub mod emulated;
mod spec;

pub use spec::{parse_mac, NetMode, NetSource, NetSpec, DEFAULT_MTU, DEFAULT_QUEUE_SIZE};

use std::ffi::OsString;
use std::sync::{Arc, Mutex};

use log::info;
use pvstack_protocols::boot::{device_kind, DeviceInfo};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
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
use emulated::EmulatedNet;

/// The backend program `tap=` starts.
pub const BACKEND_PROGRAM: &str = "pvstack-net";

/// Queues: receiveq1 and transmitq1 (no control queue, one pair).
const NUM_QUEUES: usize = 2;

/// Features passed on to the driver when the backend offers them. MAC,
/// STATUS and MTU are the VMM's own (it serves the configuration space),
/// but are passed on only if the backend offers them too, because
/// vhost-user hands the backend every feature the driver accepted.
const FEATURES_PASSED_ON: &[u32] = &[
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
];

const fn bit(feature: u32) -> u64 {
    1 << feature
}

fn features_passed_on() -> u64 {
    FEATURES_PASSED_ON.iter().fold(0, |acc, &f| acc | bit(f))
}

/// The virtio-net configuration space up to `mtu` (virtio 1.x 5.1.4):
/// mac[6], status, max_virtqueue_pairs, mtu, little endian.
pub fn config_space(mac: [u8; 6], mtu: u16) -> Vec<u8> {
    let mut space = Vec::with_capacity(12);
    space.extend_from_slice(&mac);
    space.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    space.extend_from_slice(&1u16.to_le_bytes());
    space.extend_from_slice(&mtu.to_le_bytes());
    space
}

/// A locally administered unicast MAC, distinct per pvstack process and
/// device: 02:70:76 ("pv"), two bytes of the process id, the index.
pub fn default_mac(index: u32) -> [u8; 6] {
    let pid = std::process::id();
    [0x02, 0x70, 0x76, (pid >> 8) as u8, pid as u8, index as u8]
}

/// A network device, created and ready to be put on the bus.
pub struct NetDevice {
    id: String,
    bus_device: SharedDevice,
    transport: Option<Arc<Mutex<MmioTransport<VhostUserDevice>>>>,
    info: DeviceInfo,
    mac: [u8; 6],
}

impl NetDevice {
    /// The device's name (`id=`, or `net<index>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The register window to map at `info().mmio_addr`. The backend
    /// process, if pvstack started one, lives as long as any clone of this.
    pub fn bus_device(&self) -> SharedDevice {
        self.bus_device.clone()
    }

    /// The transport of a vhost-user device, for control operations;
    /// `None` for the in-VMM baseline.
    pub fn transport(&self) -> Option<&Arc<Mutex<MmioTransport<VhostUserDevice>>>> {
        self.transport.as_ref()
    }

    /// The device's entry in the boot info.
    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// The MAC address the driver sees.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

/// Creates the network device `spec` describes in the slot `ctx` gives.
pub fn create_net(spec: &NetSpec, ctx: &DeviceContext<'_>) -> Result<NetDevice> {
    let id = spec
        .id
        .clone()
        .unwrap_or_else(|| format!("net{}", ctx.index));
    let mac = spec.mac.unwrap_or_else(|| default_mac(ctx.index));
    if spec.mode == NetMode::Emulated {
        return create_emulated(id, spec, ctx, mac);
    }
    let (handle, process) = first_connection(&id, spec, ctx)?;
    let shape = negotiate_shape(spec, &handle, mac)?;
    let events = DeviceEvents::for_context(ctx, NUM_QUEUES as u16)?;
    info!(
        "{id}: virtio-net {} mtu {}, features {:#x}, on {}, MMIO {:#x} GSI {}",
        format_mac(mac),
        spec.mtu,
        shape.features,
        handle.socket().display(),
        ctx.mmio_base,
        ctx.gsi
    );
    let policy = ReconnectPolicy { window: None };
    let transport = supervised_device(&id, spec, shape, ctx, (handle, process), events, policy)?;
    Ok(NetDevice {
        id,
        bus_device: transport.clone(),
        transport: Some(transport),
        info: ctx.device_info(device_kind::VIRTIO_MMIO, VIRTIO_ID_NET),
        mac,
    })
}

/// The in-VMM baseline NIC on `spec`'s TAP.
fn create_emulated(
    id: String,
    spec: &NetSpec,
    ctx: &DeviceContext<'_>,
    mac: [u8; 6],
) -> Result<NetDevice> {
    let NetSource::Tap(tap) = &spec.source else {
        // The spec parser lets mode=emulated through only with tap=.
        return Err(Error::InvalidOption {
            option: "net",
            value: "mode=emulated".to_string(),
            reason: "the VMM serves only a TAP itself (tap=NAME)".to_string(),
        });
    };
    let device = EmulatedNet::new(
        id.clone(),
        tap,
        features_passed_on(),
        spec.queue_size,
        config_space(mac, spec.mtu),
        ctx.memory.clone(),
    )?;
    let events = DeviceEvents::register_call(ctx.vm, ctx.gsi, NUM_QUEUES as u16)?;
    info!(
        "{id}: emulated virtio-net {} mtu {} on TAP {tap}, served in the VMM, MMIO {:#x} GSI {}",
        format_mac(mac),
        spec.mtu,
        ctx.mmio_base,
        ctx.gsi
    );
    let transport = Arc::new(Mutex::new(MmioTransport::new(id.clone(), device, events)));
    Ok(NetDevice {
        id,
        bus_device: transport,
        transport: None,
        info: ctx.device_info(device_kind::VIRTIO_MMIO, VIRTIO_ID_NET),
        mac,
    })
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Connects to the backend, starting pvstack-net first for `tap=`.
fn connect(spec: &NetSpec) -> Result<(VhostUserHandle, Option<BackendProcess>)> {
    match &spec.source {
        NetSource::Socket(socket) => Ok((
            VhostUserHandle::connect(socket, spec.allowed_backend())?,
            None,
        )),
        NetSource::Tap(tap) => {
            let args: Vec<OsString> = vec![
                "--tap".into(),
                tap.into(),
                "--queue-size".into(),
                spec.queue_size.to_string().into(),
                "--exit-on-disconnect".into(),
            ];
            let (process, stream) = BackendProcess::start(BACKEND_PROGRAM, &args)?;
            let handle =
                VhostUserHandle::from_stream(stream, process.socket(), spec.allowed_backend())?;
            Ok((handle, Some(process)))
        }
    }
}

/// What the driver sees: the features both the backend and pvstack
/// support, two queues, the VMM's configuration space.
fn negotiate_shape(spec: &NetSpec, handle: &VhostUserHandle, mac: [u8; 6]) -> Result<DeviceShape> {
    let backend = handle.backend_features();
    if backend & bit(VIRTIO_F_VERSION_1) == 0 {
        return Err(Error::Incompatible {
            socket: handle.socket().to_path_buf(),
            reason: "it does not offer VIRTIO_F_VERSION_1".to_string(),
        });
    }
    Ok(DeviceShape {
        device_id: VIRTIO_ID_NET,
        features: backend & features_passed_on(),
        queue_max_sizes: vec![spec.queue_size; NUM_QUEUES],
        config: config_space(mac, spec.mtu),
        config_source: ConfigSource::Vmm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let space = config_space([1, 2, 3, 4, 5, 6], 9000);
        assert_eq!(space.len(), 12);
        assert_eq!(&space[..6], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(u16::from_le_bytes([space[6], space[7]]), 1);
        assert_eq!(u16::from_le_bytes([space[8], space[9]]), 1);
        assert_eq!(u16::from_le_bytes([space[10], space[11]]), 9000);
    }

    #[test]
    fn default_macs_are_unicast_local_and_distinct() {
        let (a, b) = (default_mac(0), default_mac(1));
        assert_ne!(a, b);
        assert_eq!(a[0] & 0b11, 0b10);
        assert_eq!(format_mac([0x52, 0x54, 0, 0xab, 1, 2]), "52:54:00:ab:01:02");
    }
}
