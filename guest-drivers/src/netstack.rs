//! smoltcp on the virtio-net driver: the `phy::Device` glue, the clock it
//! runs on (the TSC), and parsing of addresses from the command line.
//!
//! A protocol error from the device (an unknown used head) cannot travel
//! through smoltcp's token interface, so it is kept in [`SmolNic::fault`]
//! for the workload to report.

use core::net::Ipv4Addr;

use smoltcp::iface::{Config, Interface};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};

use crate::clock::{rdtsc, Clock};
use crate::virtio::net::{NetDevice, RxQueue, TxQueue, MAX_FRAME};
use crate::virtio::VirtioError;

/// Bytes of an Ethernet header (smoltcp's MTU for Ethernet includes it).
const ETHERNET_HEADER: usize = 14;

/// A NIC as smoltcp sees it.
pub struct SmolNic<'a> {
    pub device: NetDevice<'a>,
    /// The first protocol error the device made, if any.
    pub fault: Option<VirtioError>,
    clock: Clock,
    start: u64,
}

impl<'a> SmolNic<'a> {
    /// Wraps `device`; time starts now.
    pub fn new(device: NetDevice<'a>, clock: Clock) -> Self {
        SmolNic {
            device,
            fault: None,
            clock,
            start: rdtsc(),
        }
    }

    /// The time since [`new`](Self::new), for smoltcp.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.clock.us_since(self.start) as i64)
    }

    /// An interface with the device's MAC and the address `cidr`.
    pub fn interface(&mut self, cidr: Ipv4Cidr, gateway: Option<Ipv4Addr>) -> Interface {
        let mac = EthernetAddress(self.device.mac());
        let config = Config::new(HardwareAddress::Ethernet(mac));
        let now = self.now();
        let mut iface = Interface::new(config, self, now);
        iface.update_ip_addrs(|addrs| {
            // A fresh interface has room for IFACE_MAX_ADDR_COUNT (2).
            let _ = addrs.push(IpCidr::Ipv4(cidr));
        });
        if let Some(gateway) = gateway {
            let _ = iface.routes_mut().add_default_ipv4_route(gateway);
        }
        iface
    }

    fn record(&mut self, error: VirtioError) {
        self.fault.get_or_insert(error);
    }
}

/// A received frame; its buffer goes back to the device once read.
pub struct RxToken<'t, 'a> {
    rx: &'t mut RxQueue<'a>,
    buffer: u16,
    len: usize,
}

/// Room for one frame in the transmit queue.
pub struct TxToken<'t, 'a> {
    tx: &'t mut TxQueue<'a>,
}

impl phy::RxToken for RxToken<'_, '_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let result = f(self.rx.frame(self.buffer, self.len));
        // Cannot fail: the buffer's descriptor was just freed.
        let _ = self.rx.recycle(self.buffer);
        result
    }
}

impl phy::TxToken for TxToken<'_, '_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let len = len.min(MAX_FRAME);
        match self.tx.buffer() {
            Ok(Some(buffer)) => {
                let result = f(&mut buffer[..len]);
                // Cannot fail: `buffer` found a free descriptor.
                let _ = self.tx.send(len);
                result
            }
            // Tokens are only made when there is room, so this is a device
            // that broke the protocol in between: the frame is lost.
            _ => f(&mut [0u8; MAX_FRAME][..len]),
        }
    }
}

impl<'a> phy::Device for SmolNic<'a> {
    type RxToken<'t>
        = RxToken<'t, 'a>
    where
        Self: 't;
    type TxToken<'t>
        = TxToken<'t, 'a>
    where
        Self: 't;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        // The transmit token may carry an immediate reply (an ACK to a
        // zero-window probe, an ARP or ping reply): with no room to send
        // it, leave the frame waiting rather than lose the reply.
        match self.device.can_send() {
            Ok(true) => {}
            Ok(false) => return None,
            Err(error) => {
                self.record(error);
                return None;
            }
        }
        let (rx, _) = self.device.queues();
        let (buffer, len) = match rx.receive() {
            Ok(frame) => frame?,
            Err(error) => {
                self.record(error);
                return None;
            }
        };
        let (rx, tx) = self.device.queues();
        Some((RxToken { rx, buffer, len }, TxToken { tx }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        match self.device.can_send() {
            Ok(true) => {}
            Ok(false) => return None,
            Err(error) => {
                self.record(error);
                return None;
            }
        }
        let (_, tx) = self.device.queues();
        Some(TxToken { tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = usize::from(self.device.mtu()) + ETHERNET_HEADER;
        caps
    }
}

/// Parses `10.0.0.2/24`.
pub fn parse_cidr(text: &str) -> Option<Ipv4Cidr> {
    let (addr, prefix) = text.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then(|| Ipv4Cidr::new(addr, prefix))
}

/// Parses `10.0.0.1`.
pub fn parse_ipv4(text: &str) -> Option<Ipv4Addr> {
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        let cidr = parse_cidr("10.0.0.2/24").expect("valid");
        assert_eq!(cidr.address(), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(cidr.prefix_len(), 24);
        assert!(parse_cidr("10.0.0.2").is_none());
        assert!(parse_cidr("10.0.0.2/33").is_none());
        assert!(parse_cidr("10.0.0/24").is_none());
        assert_eq!(
            parse_ipv4("192.168.1.9"),
            Some(Ipv4Addr::new(192, 168, 1, 9))
        );
        assert!(parse_ipv4("1.2.3.4.5").is_none());
    }
}
