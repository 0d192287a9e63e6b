//! `mode=emulated-virtio`: virtio-blk over the virtio-mmio transport with
//! its queues processed inside the VMM. QueueNotify is not bound to an
//! ioeventfd, so every kick exits to the VMM, and the vCPU thread that took
//! the exit serves the queue before it returns to the guest. Requests are
//! answered by `pvstack_block::chain`, the code pvstack-blk runs, so this
//! device and the vhost-user one differ only in where the queue is
//! processed.

use std::sync::{Arc, Mutex};

use log::info;
use pvstack_block::chain::{answer, Disk, Outcome};
use pvstack_block::config::{self, DiskLimits, ID_BYTES, SECTOR_SIZE};
use pvstack_block::image::DiskImage;
use pvstack_logging::warn_limited;
use pvstack_protocols::boot::device_kind;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::stats::DiskStats;
use super::{BlkConfig, BlkDevice, BlkSpec};
use crate::context::DeviceContext;
use crate::error::Result;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::{clone_eventfd, read_config_bytes, Activation, DeviceEvents, VirtioDevice};

/// What the driver sees of the disk, worked out by `create_blk`.
pub struct VirtioBlkShape {
    /// Feature bits offered.
    pub features: u64,
    /// Largest size of each queue.
    pub queue_max_sizes: Vec<u16>,
    /// The configuration space.
    pub config: Vec<u8>,
    /// The limits requests are checked against.
    pub limits: DiskLimits,
    /// GET_ID's answer.
    pub serial: [u8; ID_BYTES],
}

impl VirtioBlkShape {
    /// The shape of disk `id` (its GET_ID serial, cut to 20 bytes) on
    /// `image` with `num_queues` queues of up to `queue_size` entries: the
    /// features, configuration space and request limits of pvstack-blk.
    pub fn new(id: &str, image: &DiskImage, num_queues: u16, queue_size: u16) -> Self {
        let limits = DiskLimits {
            capacity_sectors: image.capacity_sectors(),
            readonly: image.is_readonly(),
            max_segments: config::seg_max(queue_size),
        };
        let mut serial = [0u8; ID_BYTES];
        let len = id.len().min(ID_BYTES);
        serial[..len].copy_from_slice(&id.as_bytes()[..len]);
        VirtioBlkShape {
            features: config::virtio_features(limits.readonly) & super::features_passed_on(),
            queue_max_sizes: vec![queue_size; usize::from(num_queues)],
            config: config::config_space(&limits, num_queues, SECTOR_SIZE as u32),
            limits,
            serial,
        }
    }
}

/// The queues while the driver runs the device.
struct Running {
    /// By queue index; `None` for queues the driver did not enable.
    queues: Vec<Option<Queue>>,
    call: EventFd,
}

/// virtio-blk served inside the VMM.
pub struct EmulatedVirtioBlk {
    name: String,
    shape: VirtioBlkShape,
    image: Arc<DiskImage>,
    memory: GuestMemoryMmap,
    running: Option<Running>,
    stats: Arc<DiskStats>,
}

impl EmulatedVirtioBlk {
    /// A device serving `image` to a driver in `memory`.
    pub fn new(
        name: impl Into<String>,
        shape: VirtioBlkShape,
        image: Arc<DiskImage>,
        memory: GuestMemoryMmap,
        stats: Arc<DiskStats>,
    ) -> Self {
        EmulatedVirtioBlk {
            name: name.into(),
            shape,
            image,
            memory,
            running: None,
            stats,
        }
    }
}

impl VirtioDevice for EmulatedVirtioBlk {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.shape.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.shape.queue_max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.shape.config, offset, data);
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<()> {
        let event_idx = activation.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues = (0u16..)
            .zip(activation.queues)
            .map(|(index, config)| {
                config
                    .ready
                    .then(|| config.build_queue(index, event_idx, &self.memory))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let call = clone_eventfd(&activation.events.call, format!("{} interrupts", self.name))?;
        info!(
            "{}: driver started {} queues, served in the VMM",
            self.name,
            queues.iter().flatten().count()
        );
        self.running = Some(Running { queues, call });
        Ok(())
    }

    fn reset(&mut self) {
        self.running = None;
    }

    fn interrupt_status(&self) -> u32 {
        if self.running.is_some() {
            VIRTIO_MMIO_INT_VRING
        } else {
            0
        }
    }

    fn process_notification(&mut self, queue: u16) -> bool {
        let Some(running) = self.running.as_mut() else {
            warn_limited!(
                "{}: notification while the device is not running",
                self.name
            );
            return true;
        };
        let Some(Some(ring)) = running.queues.get_mut(usize::from(queue)) else {
            warn_limited!(
                "{}: notification for queue {queue}, which is not enabled",
                self.name
            );
            return true;
        };
        let disk = Disk {
            image: &self.image,
            limits: &self.shape.limits,
            serial: &self.shape.serial,
        };
        let served = Served {
            name: &self.name,
            queue,
            memory: &self.memory,
            disk,
            stats: &self.stats,
        };
        served.drain(ring, &running.call);
        true
    }
}

/// One pass over a queue, and what it needs.
struct Served<'a> {
    name: &'a str,
    queue: u16,
    memory: &'a GuestMemoryMmap,
    disk: Disk<'a>,
    stats: &'a DiskStats,
}

impl Served<'_> {
    /// Answers every available chain, raising the interrupt if the driver
    /// wants one, and re-checks after re-enabling notifications so no
    /// request is left behind.
    fn drain(&self, ring: &mut Queue, call: &EventFd) {
        let (name, queue, mem) = (self.name, self.queue, self.memory);
        let queue_size = ring.size();
        loop {
            if let Err(e) = ring.disable_notification(mem) {
                warn_limited!("{name}: queue {queue}: cannot disable notifications: {e}");
            }
            let chains = match ring.iter(mem) {
                Ok(iter) => iter.collect::<Vec<_>>(),
                Err(e) => {
                    warn_limited!("{name}: queue {queue}: cannot read the available ring: {e}");
                    return;
                }
            };
            let any = !chains.is_empty();
            for chain in chains {
                let head = chain.head_index();
                let answered = answer(chain, mem, self.disk, queue_size);
                if !matches!(answered.outcome, Outcome::Done) {
                    warn_limited!("{name}: queue {queue}: {:?}", answered.outcome);
                }
                self.stats.request();
                if let Err(e) = ring.add_used(mem, head, answered.used_len) {
                    warn_limited!("{name}: queue {queue}: cannot return chain {head}: {e}");
                }
            }
            if any {
                match ring.needs_notification(mem) {
                    Ok(true) => match call.write(1) {
                        Ok(()) => self.stats.interrupt(),
                        Err(e) => warn_limited!("{name}: cannot raise the interrupt: {e}"),
                    },
                    Ok(false) => {}
                    Err(e) => {
                        warn_limited!("{name}: queue {queue}: cannot read the used event: {e}")
                    }
                }
            }
            match ring.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    warn_limited!("{name}: queue {queue}: cannot enable notifications: {e}");
                    return;
                }
            }
        }
    }
}

/// Creates the in-VMM virtio-blk device `spec` describes in `ctx`'s slot:
/// the same features, configuration space and request checks as
/// pvstack-blk, with its notifications left to exit to the VMM.
pub(super) fn create(id: String, spec: &BlkSpec, ctx: &DeviceContext<'_>) -> Result<BlkDevice> {
    let image = super::open_image(spec)?;
    let num_queues = spec.num_queues.unwrap_or(1);
    let shape = VirtioBlkShape::new(&id, &image, num_queues, spec.queue_size);
    let limits = shape.limits;
    let events = DeviceEvents::register_call(ctx.vm, ctx.gsi, num_queues)?;
    info!(
        "{id}: emulated virtio-blk, {} sectors, {num_queues} queues of up to {}, {}, MMIO {:#x} GSI {}",
        limits.capacity_sectors,
        spec.queue_size,
        if limits.readonly { "read-only" } else { "writable" },
        ctx.mmio_base,
        ctx.gsi
    );
    let stats = Arc::new(DiskStats::default());
    let device =
        EmulatedVirtioBlk::new(id.clone(), shape, image, ctx.memory.clone(), stats.clone());
    let transport = Arc::new(Mutex::new(MmioTransport::new(id.clone(), device, events)));
    Ok(BlkDevice {
        mode: spec.mode,
        bus_device: transport,
        transport: None,
        stats: Some(stats),
        info: ctx.device_info(device_kind::VIRTIO_MMIO, VIRTIO_ID_BLOCK),
        config: BlkConfig {
            capacity: limits.capacity_sectors,
            blk_size: SECTOR_SIZE as u32,
            num_queues,
        },
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::path::PathBuf;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK,
    };
    use virtio_bindings::virtio_mmio::*;
    use virtio_bindings::virtio_ring::{
        VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const SECTORS: u64 = 64;

    fn desc(addr: u64, len: u32, writable: bool, next: Option<u16>) -> RawDescriptor {
        let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 } as u16;
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next.unwrap_or(0)))
    }

    fn header(mem: &GuestMemoryMmap, addr: u64, kind: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(addr)).unwrap();
    }

    fn write32(t: &mut MmioTransport<EmulatedVirtioBlk>, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }

    /// The largest queue the device offers.
    const QUEUE_MAX: u16 = 16;

    /// A scratch image of SECTORS sectors, removed when dropped.
    struct ScratchImage {
        path: PathBuf,
        bytes: Vec<u8>,
    }

    impl ScratchImage {
        fn new(test: &str) -> ScratchImage {
            let path = std::env::temp_dir().join(format!(
                "pvstack-emulated-virtio-{test}-{}.img",
                std::process::id()
            ));
            let bytes: Vec<u8> = (0..SECTORS * 512)
                .map(|x| (x * 13 + x / 512) as u8)
                .collect();
            std::fs::write(&path, &bytes).unwrap();
            ScratchImage { path, bytes }
        }

        fn now(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    impl Drop for ScratchImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// The device `create` builds for a disk whose queues hold up to
    /// QUEUE_MAX entries, behind its MMIO transport, driven as far as
    /// DRIVER_OK with `features` accepted and queue 0 of `queue_num`
    /// entries at `queue`'s rings. Returns the transport, the interrupt
    /// eventfd and the device's counters.
    fn started(
        image: &ScratchImage,
        mem: &GuestMemoryMmap,
        queue: &MockSplitQueue<GuestMemoryMmap>,
        queue_num: u16,
        features: u64,
    ) -> (MmioTransport<EmulatedVirtioBlk>, EventFd, Arc<DiskStats>) {
        let image = Arc::new(DiskImage::open(&image.path, false, false).unwrap());
        let shape = VirtioBlkShape::new("blk-test", &image, 1, QUEUE_MAX);
        assert_eq!(shape.limits.capacity_sectors, SECTORS);
        assert_eq!(
            features & !shape.features,
            0,
            "features the device does not offer"
        );
        let stats = Arc::new(DiskStats::default());
        let device = EmulatedVirtioBlk::new("blk-test", shape, image, mem.clone(), stats.clone());
        let events = DeviceEvents::new(1).unwrap();
        let call = events.call.try_clone().unwrap();
        let mut t = MmioTransport::new("blk-test", device, events);

        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        write32(&mut t, VIRTIO_MMIO_STATUS, status);
        for word in 0..2 {
            write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, word);
            write32(
                &mut t,
                VIRTIO_MMIO_DRIVER_FEATURES,
                (features >> (32 * word)) as u32,
            );
        }
        write32(
            &mut t,
            VIRTIO_MMIO_STATUS,
            status | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, u32::from(queue_num));
        write32(
            &mut t,
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            queue.desc_table_addr().0 as u32,
        );
        write32(
            &mut t,
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            queue.avail_addr().0 as u32,
        );
        write32(
            &mut t,
            VIRTIO_MMIO_QUEUE_USED_LOW,
            queue.used_addr().0 as u32,
        );
        write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        let status = status | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        write32(&mut t, VIRTIO_MMIO_STATUS, status);
        assert!(t.device().running.is_some(), "DRIVER_OK started the device");
        (t, call, stats)
    }

    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

    /// Three requests served by one QueueNotify that reached the VMM: a
    /// read, a write and a read past the end of the disk.
    #[test]
    fn notification_serves_the_queue_in_the_vmm() {
        let image = ScratchImage::new("direct");
        let file = &image.bytes;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let queue = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_MAX);
        header(&mem, 0x1_0000, VIRTIO_BLK_T_IN, 2);
        header(&mem, 0x1_0100, VIRTIO_BLK_T_OUT, 10);
        header(&mem, 0x1_0200, VIRTIO_BLK_T_IN, SECTORS);
        mem.write_slice(&[0x5a; 512], GuestAddress(0x4_0000))
            .unwrap();
        queue
            .add_desc_chains(
                &[
                    desc(0x1_0000, 16, false, Some(1)),
                    desc(0x2_0000, 1024, true, Some(2)),
                    desc(0x3_0000, 1, true, None),
                    desc(0x1_0100, 16, false, Some(4)),
                    desc(0x4_0000, 512, false, Some(5)),
                    desc(0x3_0010, 1, true, None),
                    desc(0x1_0200, 16, false, Some(7)),
                    desc(0x5_0000, 512, true, Some(8)),
                    desc(0x3_0020, 1, true, None),
                ],
                0,
            )
            .unwrap();
        let (mut t, call, stats) = started(&image, &mem, &queue, QUEUE_MAX, VERSION_1);

        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

        let used_idx: u16 = mem.read_obj(GuestAddress(queue.used_addr().0 + 2)).unwrap();
        assert_eq!(used_idx, 3);
        let status_at = |addr: u64| mem.read_obj::<u8>(GuestAddress(addr)).unwrap();
        assert_eq!(status_at(0x3_0000), VIRTIO_BLK_S_OK as u8);
        assert_eq!(status_at(0x3_0010), VIRTIO_BLK_S_OK as u8);
        assert_eq!(status_at(0x3_0020), VIRTIO_BLK_S_IOERR as u8);
        let mut read = vec![0u8; 1024];
        mem.read_slice(&mut read, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(read, &file[2 * 512..4 * 512]);
        let after = image.now();
        assert_eq!(&after[10 * 512..11 * 512], &[0x5a; 512][..]);
        assert_eq!(&after[..10 * 512], &file[..10 * 512]);
        assert_eq!(stats.requests(), 3);
        // No NO_INTERRUPT and no EVENT_IDX: the driver gets one interrupt.
        assert_eq!(stats.interrupts(), 1);
        assert_eq!(call.read().unwrap(), 1);
    }

    /// The device offers indirect descriptors and seg_max for its largest
    /// queue; a driver that sets a smaller queue sends a request of seg_max
    /// segments in one indirect table, longer than its queue.
    #[test]
    fn seg_max_segments_in_an_indirect_table_on_a_smaller_queue() {
        let image = ScratchImage::new("indirect");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let queue_num = QUEUE_MAX / 2;
        let queue = MockSplitQueue::create(&mem, GuestAddress(0), queue_num);
        let segments = config::seg_max(QUEUE_MAX) as u64;
        assert!(segments + 2 > u64::from(queue_num));
        let (table, data, status) = (0x1_0000, 0x2_0000, 0x3_0000);
        header(&mem, 0x1_1000, VIRTIO_BLK_T_IN, 4);
        let mut entries = vec![desc(0x1_1000, 16, false, Some(1))];
        for i in 0..segments {
            let next = Some(i as u16 + 2);
            entries.push(desc(data + 0x1000 * i, 512, true, next));
        }
        entries.push(desc(status, 1, true, None));
        for (i, entry) in entries.iter().enumerate() {
            let entry = SplitDescriptor::from(*entry);
            mem.write_obj(entry, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let len = 16 * entries.len() as u32;
        let head = RawDescriptor::from(SplitDescriptor::new(
            table,
            len,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        queue.add_desc_chains(&[head], 0).unwrap();
        let features = VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        let (mut t, _call, stats) = started(&image, &mem, &queue, queue_num, features);

        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

        assert_eq!(stats.requests(), 1);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        let used_len: u32 = mem.read_obj(GuestAddress(queue.used_addr().0 + 8)).unwrap();
        assert_eq!(u64::from(used_len), segments * 512 + 1);
        for i in 0..segments {
            let mut read = vec![0u8; 512];
            mem.read_slice(&mut read, GuestAddress(data + 0x1000 * i))
                .unwrap();
            let sector = (4 + i) as usize;
            assert_eq!(
                read,
                &image.bytes[sector * 512..(sector + 1) * 512],
                "segment {i}"
            );
        }
    }
}
