//! Console devices: virtio-console served by a vhost-user backend
//! (`--console socket=...`, or a pvstack-console that pvstack starts for
//! `stdio`, `pty` or `unix=PATH`), and the emulated 16550 UART baseline
//! ([`uart`]).

mod spec;
pub mod uart;

pub use spec::ConsoleSpec;
pub use uart::{create_serial_port, create_uart, SerialPort, SharedUart, UartDevice, UartState};

use std::ffi::OsString;
use std::process::Stdio;

use log::info;
use pvstack_protocols::boot::{device_kind, DeviceInfo};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;

use crate::bus::SharedDevice;
use crate::context::DeviceContext;
use crate::error::{Error, Result};
use crate::vhost_user::create::{first_connection, supervised_device};
use crate::vhost_user::supervisor::{ReconnectPolicy, SharedVhostUserDevice};
use crate::vhost_user::{
    BackendConnection, BackendProcess, BackendSpec, ConfigSource, DeviceShape, VhostUserHandle,
};
use crate::virtio::DeviceEvents;

/// The backend program `stdio`, `pty` and `unix=` start.
pub const BACKEND_PROGRAM: &str = "pvstack-console";
/// Queue size offered for the receive and transmit queues.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of `struct virtio_console_config` (cols, rows, max_nr_ports, emerg_wr).
const CONFIG_LEN: u32 = 12;

/// A virtio-console device, created and ready to be put on the bus.
pub struct ConsoleDevice {
    transport: SharedVhostUserDevice,
    info: DeviceInfo,
}

impl ConsoleDevice {
    /// The register window to map at `info().mmio_addr`. The backend
    /// process, if pvstack started one, lives as long as any clone.
    pub fn bus_device(&self) -> SharedDevice {
        self.transport.clone()
    }

    /// The transport, for control operations on the running device.
    pub fn transport(&self) -> &SharedVhostUserDevice {
        &self.transport
    }

    /// The device's entry in the boot info.
    pub fn info(&self) -> DeviceInfo {
        self.info
    }
}

/// Creates the virtio-console `spec` describes in the slot `ctx` gives:
/// connects to (or starts) its backend and binds its notifications. If
/// the backend goes away, the device reconnects (to the same socket, or
/// to a new child) and resumes where the guest left off.
pub fn create_console(spec: &ConsoleSpec, ctx: &DeviceContext<'_>) -> Result<ConsoleDevice> {
    let id = format!("console{}", ctx.index);
    let (mut handle, process) = first_connection(&id, spec, ctx)?;
    let shape = negotiate_shape(&mut handle)?;
    let events = DeviceEvents::for_context(ctx, 2)?;
    info!(
        "{id}: virtio-console on {}, MMIO {:#x} GSI {}",
        handle.socket().display(),
        ctx.mmio_base,
        ctx.gsi
    );
    let policy = ReconnectPolicy { window: None };
    let transport = supervised_device(&id, spec, shape, ctx, (handle, process), events, policy)?;
    let info = ctx.device_info(device_kind::VIRTIO_MMIO, VIRTIO_ID_CONSOLE);
    Ok(ConsoleDevice { transport, info })
}

/// Connects to the backend, starting a pvstack-console first unless the
/// spec names a running one.
fn connect(spec: &ConsoleSpec) -> Result<(VhostUserHandle, Option<BackendProcess>)> {
    let (host_side, stdin): (Vec<OsString>, Stdio) = match spec {
        ConsoleSpec::Socket { path, .. } => {
            return Ok((
                VhostUserHandle::connect(path, spec.allowed_backend())?,
                None,
            ))
        }
        ConsoleSpec::Stdio => (vec!["--stdio".into()], Stdio::inherit()),
        ConsoleSpec::Pty => (vec!["--pty".into()], Stdio::null()),
        ConsoleSpec::Unix(path) => (vec!["--listen".into(), path.into()], Stdio::null()),
        ConsoleSpec::Uart => {
            return Err(Error::InvalidOption {
                option: "console",
                value: "uart".into(),
                reason: "the UART is not a vhost-user device".into(),
            })
        }
    };
    let mut args = host_side;
    args.push("--exit-on-disconnect".into());
    let (process, stream) = BackendProcess::start_with_stdin(BACKEND_PROGRAM, &args, stdin)?;
    let handle = VhostUserHandle::from_stream(stream, process.socket(), spec.allowed_backend())?;
    Ok((handle, Some(process)))
}

/// What the driver sees: VIRTIO_F_VERSION_1 only (one port, no size or
/// emergency write), two queues, the backend's configuration space.
fn negotiate_shape(handle: &mut VhostUserHandle) -> Result<DeviceShape> {
    let version_1 = 1u64 << VIRTIO_F_VERSION_1;
    if handle.backend_features() & version_1 == 0 {
        return Err(Error::Incompatible {
            socket: handle.socket().to_path_buf(),
            reason: "it does not offer VIRTIO_F_VERSION_1".into(),
        });
    }
    if handle.queue_num() < 2 {
        return Err(Error::TooFewQueues {
            socket: handle.socket().to_path_buf(),
            serves: handle.queue_num(),
            needed: 2,
        });
    }
    let config = handle.get_config(CONFIG_LEN)?;
    Ok(DeviceShape {
        device_id: VIRTIO_ID_CONSOLE,
        features: version_1,
        queue_max_sizes: vec![QUEUE_SIZE; 2],
        config,
        config_source: ConfigSource::Backend {
            takeover_check: |_, _| None,
        },
    })
}
