//! The block frontend end to end without a vCPU: a real KVM VM (for the
//! ioeventfds and the irqfd), guest memory in a memfd, a real backend
//! process (qemu-storage-daemon, or pvstack-blk started through
//! `image=`) on a real image file. The test plays the guest driver: it
//! drives the virtio-mmio registers through the bus exactly as a vCPU's
//! MMIO exits would, lays virtio-blk requests out in guest memory by hand,
//! kicks, polls the used ring and checks the bytes in the image file.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::Once;
use std::thread::sleep;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use pvstack_devices::bus::Bus;
use pvstack_devices::{create_blk, BlkDevice, BlkSpec, DeviceContext, Error};
use pvstack_tests::qsd::QsdProcess;
use pvstack_tests::{target_profile_dir, ScratchDir};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 16 << 20;
const IMAGE_SIZE: u64 = 8 << 20;
const QUEUE_SIZE: u16 = 16;
const BLOCK: usize = 4096;
/// Only keeps a broken backend from hanging the test forever.
const HANG_GUARD: Duration = Duration::from_secs(60);
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

// Where the test driver keeps its rings and buffers in guest memory.
const DESC_TABLE: u64 = 0x1_0000;
const AVAIL_RING: u64 = 0x1_1000;
const USED_RING: u64 = 0x1_2000;
const REQUEST_HEADER: u64 = 0x2_0000;
const REQUEST_STATUS: u64 = 0x2_0100;
const DATA: u64 = 0x3_0000;

fn init_logging() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// Guest RAM in a memfd, shared with backends, as the VMM makes it.
fn guest_memory() -> GuestMemoryMmap {
    let memfd = memfd::MemfdOptions::default()
        .create("blk-frontend-test")
        .expect("memfd_create")
        .into_file();
    memfd.set_len(MEM_SIZE as u64).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(memfd, 0)),
    )])
    .unwrap()
}

fn kvm_vm() -> VmFd {
    let kvm = Kvm::new().expect("/dev/kvm is needed for this test");
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    vm
}

/// An image whose sector `n` is filled with the byte `n % 251`.
fn create_image(dir: &ScratchDir) -> PathBuf {
    let path = dir.path("disk.img");
    let mut image = File::create(&path).unwrap();
    for sector in 0..IMAGE_SIZE / 512 {
        image.write_all(&[(sector % 251) as u8; 512]).unwrap();
    }
    path
}

/// Makes pvstack-blk from this build findable on PATH (`image=` looks
/// next to the running executable, which for a test is target/*/deps).
fn put_pvstack_blk_on_path() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let profile_dir = target_profile_dir();
        assert!(
            profile_dir.join("pvstack-blk").is_file(),
            "{} is missing: run `cargo build -p pvstack-blk` (same profile) first",
            profile_dir.join("pvstack-blk").display()
        );
        let mut paths = vec![profile_dir];
        paths.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        std::env::set_var("PATH", std::env::join_paths(paths).unwrap());
    });
}

/// The test's guest driver for one virtio-mmio block device.
struct Driver<'a> {
    bus: Bus,
    base: u64,
    memory: &'a GuestMemoryMmap,
    /// The queue the driver sets up and uses (the others stay unused).
    queue: u16,
    /// Next free slot in the available ring (and requests submitted).
    avail_idx: u16,
}

impl<'a> Driver<'a> {
    fn new(device: &BlkDevice, memory: &'a GuestMemoryMmap, queue: u16) -> Self {
        let info = device.info();
        let mut bus = Bus::new();
        bus.insert(info.mmio_addr, info.mmio_size, device.bus_device())
            .unwrap();
        Driver {
            bus,
            base: info.mmio_addr,
            memory,
            queue,
            avail_idx: 0,
        }
    }

    /// A register, or a word of the configuration space, at `offset`.
    fn read32(&self, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        assert!(self.bus.read(self.base + u64::from(offset), &mut data));
        u32::from_le_bytes(data)
    }

    fn write32(&self, offset: u32, value: u32) {
        let addr = self.base + u64::from(offset);
        assert!(self.bus.write(addr, &value.to_le_bytes()));
    }

    /// The driver's reset: status 0, then, as virtio asks, the status
    /// read until it is 0 (the backend has stopped its rings).
    fn reset(&self) {
        self.write32(VIRTIO_MMIO_STATUS, 0);
        let started = Instant::now();
        while self.read32(VIRTIO_MMIO_STATUS) != 0 {
            assert!(started.elapsed() < HANG_GUARD, "the reset never completed");
            sleep(Duration::from_millis(1));
        }
    }

    /// The LOW and HIGH halves of an address register pair.
    fn write64(&self, low: u32, high: u32, value: u64) {
        self.write32(low, value as u32);
        self.write32(high, (value >> 32) as u32);
    }

    fn capacity(&self) -> u64 {
        let config = VIRTIO_MMIO_CONFIG;
        u64::from(self.read32(config)) | u64::from(self.read32(config + 4)) << 32
    }

    /// ACKNOWLEDGE, DRIVER, VERSION_1 accepted, FEATURES_OK.
    fn negotiate(&self) {
        assert_eq!(self.read32(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.read32(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(self.read32(VIRTIO_MMIO_DEVICE_ID), 2);
        self.write32(VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        self.write32(VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        self.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = u64::from(self.read32(VIRTIO_MMIO_DEVICE_FEATURES));
        assert_ne!(high << 32 & VERSION_1, 0, "VERSION_1 not offered");
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES, 0);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES, (VERSION_1 >> 32) as u32);
        self.write32(VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_ne!(
            self.read32(VIRTIO_MMIO_STATUS) & FEATURES_OK,
            0,
            "features refused"
        );
    }

    /// Feature negotiation, the driver's queue set up, DRIVER_OK: what a guest driver
    /// does at probe time. Starts from a clean ring.
    fn bring_up(&mut self) {
        self.negotiate();
        let zeros = vec![0u8; 0x3000];
        self.memory
            .write_slice(&zeros, GuestAddress(DESC_TABLE))
            .unwrap();
        self.avail_idx = 0;
        self.write32(VIRTIO_MMIO_QUEUE_SEL, u32::from(self.queue));
        assert_eq!(self.read32(VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(self.read32(VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(QUEUE_SIZE));
        self.write32(VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
        self.write64(
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            VIRTIO_MMIO_QUEUE_DESC_HIGH,
            DESC_TABLE,
        );
        self.write64(
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            AVAIL_RING,
        );
        self.write64(
            VIRTIO_MMIO_QUEUE_USED_LOW,
            VIRTIO_MMIO_QUEUE_USED_HIGH,
            USED_RING,
        );
        self.write32(VIRTIO_MMIO_QUEUE_READY, 1);
        self.write32(
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        let status = self.read32(VIRTIO_MMIO_STATUS);
        assert_eq!(status & NEEDS_RESET, 0, "device failed to start");
        assert_ne!(status & DRIVER_OK, 0);
        assert_eq!(self.read32(VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    }

    fn write_desc(&self, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = DESC_TABLE + 16 * index;
        self.memory.write_obj(addr, GuestAddress(desc)).unwrap();
        self.memory.write_obj(len, GuestAddress(desc + 8)).unwrap();
        self.memory
            .write_obj(flags, GuestAddress(desc + 12))
            .unwrap();
        self.memory
            .write_obj(next, GuestAddress(desc + 14))
            .unwrap();
    }

    /// Submits one request of `BLOCK` bytes at `sector` (header, data,
    /// status in descriptors 0, 1, 2), kicks the queue and waits for it to
    /// be used; returns the status byte.
    fn request(&mut self, kind: u32, sector: u64) -> u8 {
        let header = REQUEST_HEADER;
        self.memory.write_obj(kind, GuestAddress(header)).unwrap();
        self.memory
            .write_obj(0u32, GuestAddress(header + 4))
            .unwrap();
        self.memory
            .write_obj(sector, GuestAddress(header + 8))
            .unwrap();
        self.memory
            .write_obj(0xffu8, GuestAddress(REQUEST_STATUS))
            .unwrap();
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            DESC_F_WRITE
        } else {
            0
        };
        self.write_desc(0, header, 16, DESC_F_NEXT, 1);
        self.write_desc(1, DATA, BLOCK as u32, data_flags | DESC_F_NEXT, 2);
        self.write_desc(2, REQUEST_STATUS, 1, DESC_F_WRITE, 0);

        let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.memory.write_obj(0u16, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.memory
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        // The write a guest makes; KVM would hand it to the queue's
        // ioeventfd, here the transport forwards it to the same eventfd.
        self.write32(VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(self.queue));

        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let used_idx: u16 = self.memory.read_obj(GuestAddress(USED_RING + 2)).unwrap();
            if used_idx == self.avail_idx {
                break;
            }
            assert!(Instant::now() < deadline, "request never completed");
            sleep(Duration::from_millis(1));
        }
        fence(Ordering::SeqCst);
        let elem = USED_RING + 4 + 8 * u64::from((self.avail_idx - 1) % QUEUE_SIZE);
        let id: u32 = self.memory.read_obj(GuestAddress(elem)).unwrap();
        assert_eq!(id, 0, "used element names another chain");
        self.memory.read_obj(GuestAddress(REQUEST_STATUS)).unwrap()
    }

    fn data(&self) -> Vec<u8> {
        let mut data = vec![0u8; BLOCK];
        self.memory
            .read_slice(&mut data, GuestAddress(DATA))
            .unwrap();
        data
    }

    fn set_data(&self, data: &[u8]) {
        self.memory.write_slice(data, GuestAddress(DATA)).unwrap();
    }
}

fn image_bytes(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Writes and reads through the device, checking the image file; then
/// resets the device and does it again on a fresh ring.
fn exercise(device: &BlkDevice, memory: &GuestMemoryMmap, image: &Path, queue: u16) {
    let mut driver = Driver::new(device, memory, queue);
    assert_eq!(driver.capacity(), IMAGE_SIZE / 512);
    assert_eq!(device.config().capacity, IMAGE_SIZE / 512);
    assert_eq!(device.info().subtype, 2);

    for round in 0..2u8 {
        driver.bring_up();
        // The guest reads what the host put in the image.
        let sector = 300 + u64::from(round);
        assert_eq!(driver.request(VIRTIO_BLK_T_IN, sector), 0, "read status");
        let expected: Vec<u8> = (0..BLOCK / 512)
            .flat_map(|i| [((sector + i as u64) % 251) as u8; 512])
            .collect();
        assert_eq!(driver.data(), expected, "round {round}: read of host data");

        // The guest writes a pattern; it lands in the file.
        let pattern: Vec<u8> = (0..BLOCK)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(round))
            .collect();
        let sector = 1000 + 8 * u64::from(round);
        driver.set_data(&pattern);
        assert_eq!(driver.request(VIRTIO_BLK_T_OUT, sector), 0, "write status");
        assert_eq!(image_bytes(image, sector * 512, BLOCK), pattern);
        // Untouched neighbours stay as they were.
        assert_eq!(
            image_bytes(image, (sector + 8) * 512, 512),
            vec![((sector + 8) % 251) as u8; 512]
        );

        // And it comes back.
        driver.set_data(&[0u8; BLOCK]);
        assert_eq!(
            driver.request(VIRTIO_BLK_T_IN, sector),
            0,
            "read-back status"
        );
        assert_eq!(driver.data(), pattern, "round {round}: read back");

        // Reset: the backend's rings stop; the next round starts afresh.
        driver.reset();
        assert_eq!(driver.read32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }
}

#[test]
fn qemu_storage_daemon_backend_end_to_end() {
    init_logging();
    let dir = ScratchDir::new("blk-frontend-qsd");
    let image = create_image(&dir);
    let socket = dir.path("qsd.sock");
    let _daemon = QsdProcess::start(&image, &socket, 1);
    let memory = guest_memory();
    let vm = kvm_vm();
    let spec: BlkSpec = format!("socket={},queue-size=64", socket.display())
        .parse()
        .unwrap();
    let device = create_blk(&spec, &DeviceContext::for_slot(&vm, &memory, 0, 0)).unwrap();
    assert_eq!(device.id(), "blk0");
    exercise(&device, &memory, &image, 0);
}

#[test]
fn pvstack_blk_started_for_an_image_end_to_end() {
    init_logging();
    put_pvstack_blk_on_path();
    let dir = ScratchDir::new("blk-frontend-image");
    let image = create_image(&dir);
    let memory = guest_memory();
    let vm = kvm_vm();
    let spec: BlkSpec = format!("image={},id=disk,queue-size=64", image.display())
        .parse()
        .unwrap();
    let device = create_blk(&spec, &DeviceContext::for_slot(&vm, &memory, 3, 1)).unwrap();
    assert_eq!(device.id(), "disk");
    assert_eq!(device.info().index, 1);
    assert_eq!(device.info().irq, pvstack_protocols::layout::device_irq(3));
    let pid = {
        let transport = device
            .transport()
            .expect("a vhost-user device")
            .lock()
            .unwrap();
        let process = transport
            .device()
            .process()
            .expect("image= starts a backend");
        process.pid()
    };
    exercise(&device, &memory, &image, 0);
    // Dropping the device stops the backend it started.
    drop(device);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pvstack-blk (pid {pid}) outlived its device"
    );
}

#[test]
fn driver_ok_with_no_queue_ready_then_a_real_start() {
    init_logging();
    put_pvstack_blk_on_path();
    let dir = ScratchDir::new("blk-frontend-no-queues");
    let image = create_image(&dir);
    let memory = guest_memory();
    let vm = kvm_vm();
    let spec: BlkSpec = format!("image={},queue-size=64", image.display())
        .parse()
        .unwrap();
    let device = create_blk(&spec, &DeviceContext::for_slot(&vm, &memory, 0, 0)).unwrap();
    let driver = Driver::new(&device, &memory, 0);
    // A driver may start the device without readying any queue: nothing
    // to serve (and no inflight log to ask for), but no failure either.
    driver.negotiate();
    driver.write32(
        VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    let status = driver.read32(VIRTIO_MMIO_STATUS);
    assert_eq!(status & NEEDS_RESET, 0, "device failed to start");
    assert_ne!(status & DRIVER_OK, 0);
    driver.reset();
    exercise(&device, &memory, &image, 0);
}

#[test]
fn second_queue_of_a_two_queue_pvstack_blk() {
    init_logging();
    put_pvstack_blk_on_path();
    let dir = ScratchDir::new("blk-frontend-two-queues");
    let image = create_image(&dir);
    let memory = guest_memory();
    let vm = kvm_vm();
    let spec: BlkSpec = format!("image={},num-queues=2,queue-size=16", image.display())
        .parse()
        .unwrap();
    let device = create_blk(&spec, &DeviceContext::for_slot(&vm, &memory, 1, 0)).unwrap();
    assert_eq!(device.config().num_queues, 2);
    let driver = Driver::new(&device, &memory, 1);
    let mut num_queues = [0u8; 2];
    assert!(driver.bus.read(
        driver.base + u64::from(VIRTIO_MMIO_CONFIG) + 34,
        &mut num_queues
    ));
    assert_eq!(u16::from_le_bytes(num_queues), 2);
    driver.write32(VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(driver.read32(VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
    driver.write32(VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(
        driver.read32(VIRTIO_MMIO_QUEUE_NUM_MAX),
        0,
        "there is no third queue"
    );
    exercise(&device, &memory, &image, 1);
}

#[test]
fn missing_socket_is_named() {
    init_logging();
    let memory = guest_memory();
    let vm = kvm_vm();
    let spec: BlkSpec = "socket=/nonexistent/pvstack-test.sock".parse().unwrap();
    let err = create_blk(&spec, &DeviceContext::for_slot(&vm, &memory, 0, 0))
        .err()
        .expect("a missing socket must fail");
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("/nonexistent/pvstack-test.sock") && message.contains("No such file"),
        "{message}"
    );
}

#[test]
fn backend_that_hangs_up_during_negotiation() {
    init_logging();
    let dir = ScratchDir::new("blk-frontend-hangup");
    let socket = dir.path("hangup.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // Accepts, reads the first request (SET_OWNER, a bare 12-byte
    // header), then hangs up without answering anything.
    let peer = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut header = [0u8; 12];
        stream.read_exact(&mut header).unwrap();
        u32::from_le_bytes(header[..4].try_into().unwrap())
    });
    let memory = guest_memory();
    let vm = kvm_vm();
    let spec: BlkSpec = format!("socket={}", socket.display()).parse().unwrap();
    let err = create_blk(&spec, &DeviceContext::for_slot(&vm, &memory, 0, 0))
        .err()
        .expect("a backend that hangs up must fail");
    assert_eq!(peer.join().unwrap(), 3, "first request is SET_OWNER");
    let message = err.to_string();
    assert!(
        matches!(
            err,
            Error::VhostUser {
                step: "GET_FEATURES",
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains(&socket.display().to_string()), "{message}");
}

#[test]
fn image_that_does_not_exist() {
    init_logging();
    let memory = guest_memory();
    let vm = kvm_vm();
    let spec: BlkSpec = "image=/nonexistent/disk.img".parse().unwrap();
    let err = create_blk(&spec, &DeviceContext::for_slot(&vm, &memory, 0, 0))
        .err()
        .expect("a missing image must fail");
    let message = err.to_string();
    assert!(matches!(err, Error::Image { .. }), "{message}");
    assert!(
        message.starts_with("image /nonexistent/disk.img: No such file"),
        "{message}"
    );
}

#[test]
fn readonly_on_a_writable_backend_is_refused() {
    init_logging();
    let dir = ScratchDir::new("blk-frontend-ro");
    let image = create_image(&dir);
    let socket = dir.path("qsd.sock");
    let _daemon = QsdProcess::start(&image, &socket, 1);
    let memory = guest_memory();
    let vm = kvm_vm();
    let spec: BlkSpec = format!("socket={},readonly", socket.display())
        .parse()
        .unwrap();
    let err = create_blk(&spec, &DeviceContext::for_slot(&vm, &memory, 0, 0))
        .err()
        .expect("readonly over a writable export must fail");
    assert!(err.to_string().contains("readonly was asked for"), "{err}");
}
