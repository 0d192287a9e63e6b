//! What creating a vhost-user device of any kind (block, net, console)
//! has in common around the kind's own negotiation: where its backend
//! connection comes from ([`first_connection`]) and, once negotiated, the
//! device behind its transport with its supervisor
//! ([`supervised_device`]). A kind's spec says how to reach its backend
//! ([`BackendSpec`]).

use super::supervisor::{self, ReconnectPolicy, SharedVhostUserDevice};
use super::{AllowedBackend, BackendProcess, DeviceShape, VhostUserDevice, VhostUserHandle};
use crate::context::DeviceContext;
use crate::error::Result;
use crate::virtio::DeviceEvents;

/// A device kind's spec, as its vhost-user device needs it: every
/// connection to a backend (the first, each reconnect) goes through it.
pub trait BackendSpec: Clone + Send + 'static {
    /// Connects to the backend the spec names, starting one first if it
    /// names none that runs already.
    fn connect(&self) -> Result<(VhostUserHandle, Option<BackendProcess>)>;

    /// Whose backends may serve the device.
    fn allowed_backend(&self) -> AllowedBackend;
}

/// The backend connection device `id` starts with: the one handed over
/// when the device is taken over from another pvstack, else `spec`'s.
pub fn first_connection(
    id: &str,
    spec: &impl BackendSpec,
    ctx: &DeviceContext<'_>,
) -> Result<(VhostUserHandle, Option<BackendProcess>)> {
    match ctx.inherited {
        Some(inherited) => Ok((inherited.adopt(id)?, None)),
        None => spec.connect(),
    }
}

/// Device `id` of the shape negotiated on `connected`, in `ctx`'s slot:
/// it reconnects and swaps only to backends `spec` allows, sits behind a
/// virtio-mmio transport with `events`, and is supervised within `policy`.
pub fn supervised_device(
    id: &str,
    spec: &impl BackendSpec,
    shape: DeviceShape,
    ctx: &DeviceContext<'_>,
    (handle, process): (VhostUserHandle, Option<BackendProcess>),
    events: DeviceEvents,
    policy: ReconnectPolicy,
) -> Result<SharedVhostUserDevice> {
    let reconnect_spec = spec.clone();
    let device = VhostUserDevice::new(
        id,
        shape,
        ctx.memory.clone(),
        handle,
        process,
        move || reconnect_spec.connect(),
        spec.allowed_backend(),
    );
    supervisor::supervised(device, events, policy)
}
