//! A hostile vhost-user frontend against real pvstack-blk, pvstack-net and
//! pvstack-console processes: memory regions their file does not hold,
//! overlapping and absurd memory tables, rings outside memory, bad queue
//! sizes, an inflight region in an empty memfd, hundreds of idle
//! connections and clients that stop mid-message. Each gets an error or a
//! closed connection; the backend stays up and serves the next honest
//! frontend (which reads, transmits or prints for real).

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use pvstack_tests::process::LoggedProcess;
use pvstack_tests::vhost_frontend::{
    closed_by_peer, mem_table_payload, negotiate, raw_negotiated, recv_u64, send_raw, share,
    shared, start_backend, start_ring, Held, Ram, Ring, DESC_F_NEXT, DESC_F_WRITE, FLAG_NEED_REPLY,
    FLAG_VERSION, VIRTIO_F_VERSION_1,
};
use pvstack_tests::ScratchDir;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};

const RAM: usize = 1 << 20;
/// The backends' per-connection deadline in these tests, in seconds.
const NEGOTIATION_TIMEOUT: &str = "2";
/// Connections a backend holds at once (README, the message filter).
const MAX_CONNECTIONS: usize = 8;
/// vhost-user request codes sent raw.
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const ADD_MEM_REG: u32 = 37;

#[derive(Debug, Clone, Copy)]
enum Device {
    Blk,
    Net,
    Console,
}

const DEVICES: [Device; 3] = [Device::Blk, Device::Net, Device::Console];

/// A backend under attack, in its scratch directory.
struct Target {
    device: Device,
    process: LoggedProcess,
    socket: PathBuf,
    /// What the honest frontend reads from the disk (pvstack-blk only).
    image: Vec<u8>,
    _dir: ScratchDir,
}

impl Target {
    fn start(device: Device, test: &str) -> Target {
        let dir = ScratchDir::new(&format!("hostile-frontend-{test}-{device:?}"));
        let socket = dir.path("backend.sock");
        let image: Vec<u8> = (0..64 << 10).map(|i| (i * 7 % 251) as u8).collect();
        let timeout = ["--negotiation-timeout", NEGOTIATION_TIMEOUT];
        let process = match device {
            Device::Blk => {
                let path = dir.path("disk.img");
                std::fs::write(&path, &image).expect("write the image");
                let path = path.to_str().expect("UTF-8 path").to_owned();
                let args = ["--image", path.as_str()];
                start_backend("pvstack-blk", &socket, &[&args[..], &timeout[..]].concat())
            }
            Device::Net => {
                let bind = dir.path("a.wire");
                let peer = dir.path("b.wire");
                let args = [
                    "--peer-bind",
                    bind.to_str().expect("UTF-8 path"),
                    "--peer-connect",
                    peer.to_str().expect("UTF-8 path"),
                ];
                start_backend("pvstack-net", &socket, &[&args[..], &timeout[..]].concat())
            }
            Device::Console => {
                let server = dir.path("server.sock");
                let args = ["--listen", server.to_str().expect("UTF-8 path")];
                start_backend(
                    "pvstack-console",
                    &socket,
                    &[&args[..], &timeout[..]].concat(),
                )
            }
        };
        Target {
            device,
            process,
            socket,
            image,
            _dir: dir,
        }
    }

    fn assert_alive(&mut self, after: &str) {
        assert!(
            self.process.is_running(),
            "{:?} died after {after}:\n{}",
            self.device,
            self.process.log()
        );
    }

    /// An honest frontend is served: pvstack-blk reads the first sector,
    /// pvstack-net and pvstack-console take a transmitted chain.
    fn assert_serves_an_honest_frontend(&mut self) {
        self.assert_alive("the attack");
        let (mut frontend, ram) = shared(&self.socket, RAM);
        match self.device {
            Device::Blk => {
                let mut queue = Ring::new(0, 16, 0x1000);
                // IN (type 0) from sector 0: header, 512 bytes, status.
                let mut header = [0u8; 16];
                header[..4].copy_from_slice(&0u32.to_le_bytes());
                ram.write(0x8000, &header);
                ram.write(0xa000, &[0xff]);
                queue.put(&ram, 0, (0x8000, 16, DESC_F_NEXT, 1));
                queue.put(&ram, 1, (0x9000, 512, DESC_F_WRITE | DESC_F_NEXT, 2));
                queue.put(&ram, 2, (0xa000, 1, DESC_F_WRITE, 0));
                queue.offer(&ram, 0);
                let started = start_ring(&mut frontend, &ram, &queue);
                started.kick();
                queue.wait_used(&ram, 1, &mut self.process);
                assert_eq!(ram.read(0xa000, 1), [0], "status of the read");
                assert!(
                    ram.read(0x9000, 512) == self.image[..512],
                    "sector 0 differs"
                );
            }
            Device::Net | Device::Console => {
                // Transmit queue 1: a 12-byte virtio-net header and a
                // frame, or a line of console output.
                let mut queue = Ring::new(1, 16, 0x1000);
                ram.write(0x8000, &[0u8; 12]);
                ram.write(0x9000, &[0x42; 60]);
                queue.put(&ram, 0, (0x8000, 12, DESC_F_NEXT, 1));
                queue.put(&ram, 1, (0x9000, 60, 0, 0));
                queue.offer(&ram, 0);
                let started = start_ring(&mut frontend, &ram, &queue);
                started.kick();
                queue.wait_used(&ram, 1, &mut self.process);
                assert_eq!(queue.used(&ram, 0).0, 0, "the chain taken");
            }
        }
        self.assert_alive("serving an honest frontend");
    }
}

fn memfd(len: u64) -> std::fs::File {
    let file = memfd::MemfdOptions::default()
        .create("hostile-frontend")
        .expect("memfd_create")
        .into_file();
    file.set_len(len).expect("size the memfd");
    file
}

/// Sends a memory table (or region) asking for an answer; true if the
/// backend accepted it, false if it refused it or closed the connection.
fn accepted(stream: &UnixStream, code: u32, payload: &[u8], fds: &[RawFd]) -> bool {
    send_raw(stream, code, FLAG_VERSION | FLAG_NEED_REPLY, payload, fds);
    recv_u64(stream) == Some(0)
}

/// Before the fix the backend mapped such regions as they came and died
/// of SIGBUS on the first access past the end of the file.
#[test]
fn memory_regions_their_file_does_not_hold_are_refused() {
    for device in DEVICES {
        let mut target = Target::start(device, "short");
        let empty = memfd(0);
        let short = memfd(64 << 10);
        let cases: [(&str, u32, Vec<u8>, RawFd); 3] = [
            (
                "a 64 KiB region in an empty memfd",
                SET_MEM_TABLE,
                mem_table_payload(&[(0, 64 << 10, 0x7f00_0000_0000, 0)]),
                empty.as_raw_fd(),
            ),
            (
                "64 KiB from offset 4 KiB of a 64 KiB memfd",
                SET_MEM_TABLE,
                mem_table_payload(&[(0, 64 << 10, 0x7f00_0000_0000, 4096)]),
                short.as_raw_fd(),
            ),
            (
                "an added 64 KiB region in an empty memfd",
                ADD_MEM_REG,
                [
                    &[0u8; 8][..],
                    &mem_table_payload(&[(0, 64 << 10, 0x7f00_0000_0000, 0)])[8..],
                ]
                .concat(),
                empty.as_raw_fd(),
            ),
        ];
        for (what, code, payload, fd) in cases {
            let stream = raw_negotiated(&target.socket);
            assert!(
                !accepted(&stream, code, &payload, &[fd]),
                "{device:?} accepted {what}"
            );
            drop(stream);
            target.assert_alive(what);
        }
        target.assert_serves_an_honest_frontend();
        let log = target.process.log();
        assert!(log.contains("it has 0"), "no reason given:\n{log}");
    }
}

/// Tables whose regions overlap, wrap around or have no size, and tables
/// that do not match their descriptors. Before the fix overlapping
/// frontend addresses were taken (an address meant two places).
#[test]
fn overlapping_and_absurd_memory_tables_are_refused() {
    const USER: u64 = 0x7f00_0000_0000;
    for device in DEVICES {
        let mut target = Target::start(device, "absurd");
        let a = memfd(0x20000);
        let b = memfd(0x20000);
        let two = [a.as_raw_fd(), b.as_raw_fd()];
        let cases: [(&str, Vec<u8>, &[RawFd]); 6] = [
            (
                "regions overlapping in guest addresses",
                mem_table_payload(&[(0, 0x20000, USER, 0), (0x10000, 0x10000, USER + 0x40000, 0)]),
                &two,
            ),
            (
                "regions overlapping in frontend addresses",
                mem_table_payload(&[(0, 0x10000, USER, 0), (0x100000, 0x10000, USER + 0x8000, 0)]),
                &two,
            ),
            (
                "a region of no size",
                mem_table_payload(&[(0, 0, USER, 0)]),
                &two[..1],
            ),
            (
                "a region wrapping past 2^64",
                mem_table_payload(&[(u64::MAX - 0xfff, 0x10000, USER, 0)]),
                &two[..1],
            ),
            (
                "two regions with one descriptor",
                mem_table_payload(&[
                    (0, 0x10000, USER, 0),
                    (0x100000, 0x10000, USER + 0x40000, 0),
                ]),
                &two[..1],
            ),
            ("a table of no regions", mem_table_payload(&[]), &[]),
        ];
        for (what, payload, fds) in cases {
            let stream = raw_negotiated(&target.socket);
            assert!(
                !accepted(&stream, SET_MEM_TABLE, &payload, fds),
                "{device:?} accepted {what}"
            );
            drop(stream);
            target.assert_alive(what);
        }
        target.assert_serves_an_honest_frontend();
    }
}

/// Queue sizes of 0, not a power of two and 65535, and rings whose
/// addresses lie outside the memory table. Before the fix a size of 3
/// was answered with success (and ignored, with an error line each time).
#[test]
fn bad_queue_sizes_and_rings_outside_memory_are_refused() {
    for device in DEVICES {
        let mut target = Target::start(device, "rings");
        for size in [0u16, 3, 100, 65535] {
            let (frontend, _ram) = shared(&target.socket, RAM);
            assert!(
                frontend.set_vring_num(0, size).is_err(),
                "{device:?} took a queue size of {size}"
            );
            drop(frontend);
            target.assert_alive(&format!("a queue size of {size}"));
        }
        let outside = |ram: &Ram, which: usize| {
            let ring = Ring::new(0, 16, 0x1000);
            let mut config: VringConfigData = ring.config(ram);
            // Far beyond the 1 MiB the table maps, in frontend addresses.
            let far = ram.host(0) + (1 << 30);
            match which {
                0 => config.desc_table_addr = far,
                1 => config.avail_ring_addr = far,
                _ => config.used_ring_addr = far,
            }
            config
        };
        for which in 0..3 {
            let (frontend, ram) = shared(&target.socket, RAM);
            frontend.set_vring_num(0, 16).expect("SET_VRING_NUM");
            assert!(
                frontend.set_vring_addr(0, &outside(&ram, which)).is_err(),
                "{device:?} took ring part {which} outside memory"
            );
            drop(frontend);
            target.assert_alive("a ring outside memory");
        }
        target.assert_serves_an_honest_frontend();
    }
}

/// pvstack-blk (the backend with an inflight log): SET_INFLIGHT_FD that
/// claims 64 KiB in an empty memfd, then a memory table and a kick.
/// Before the fix pvstack-blk mapped it and died of SIGBUS on the kick.
#[test]
fn an_inflight_region_in_an_empty_memfd_is_refused() {
    let mut target = Target::start(Device::Blk, "inflight");
    let mut frontend = negotiate(
        &target.socket,
        VIRTIO_F_VERSION_1,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
    );
    let empty = memfd(0);
    let inflight = VhostUserInflight {
        mmap_size: 64 << 10,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 16,
    };
    let refused = frontend
        .set_inflight_fd(&inflight, empty.as_raw_fd())
        .is_err();
    if !refused {
        // Carry on as the reported attack did: a kick must not kill it.
        let ram = Ram::new(RAM);
        share(&mut frontend, &ram);
        let mut queue = Ring::new(0, 16, 0x1000);
        queue.put(&ram, 0, (0x8000, 16, 0, 0));
        queue.offer(&ram, 0);
        start_ring(&mut frontend, &ram, &queue).kick();
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    drop(frontend);
    target.assert_alive("SET_INFLIGHT_FD with an empty memfd");
    assert!(refused, "SET_INFLIGHT_FD with an empty memfd was accepted");
    target.assert_serves_an_honest_frontend();
}

/// 200 clients that connect and say nothing: the backend holds at most
/// MAX_CONNECTIONS of them (two threads each) and closes the rest at
/// once, closes the held ones when their negotiation time is up, and
/// then serves an honest frontend. Before the fix it kept every one (two
/// threads each, without end) and the first held the daemon for ever.
#[test]
fn idle_connections_are_bounded_and_timed_out() {
    for device in DEVICES {
        let mut target = Target::start(device, "idle");
        let before = Held::of(target.process.pid());
        let idle: Vec<UnixStream> = (0..200)
            .map(|_| UnixStream::connect(&target.socket).expect("connect"))
            .collect();
        // The filter has taken them all once it refused the overflow.
        target
            .process
            .wait_for_output(&format!("{MAX_CONNECTIONS} connections are open"));
        let during = Held::of(target.process.pid());
        // The daemon's threads for the one connection it serves, and two
        // for each held connection.
        assert!(
            during.threads <= before.threads + 2 * MAX_CONNECTIONS + 4,
            "{device:?}: {} threads with 200 idle clients, {} before",
            during.threads,
            before.threads
        );
        for (n, stream) in idle.iter().enumerate() {
            assert!(
                closed_by_peer(stream),
                "{device:?} kept idle connection {n} open:\n{}",
                target.process.log()
            );
        }
        target.assert_serves_an_honest_frontend();
        let log = target.process.log();
        let lines = log
            .lines()
            .filter(|l| l.contains("refused a frontend"))
            .count();
        assert!(lines <= 12, "{lines} log lines for refused clients:\n{log}");
        assert!(
            log.contains("no SET_OWNER within 2 s"),
            "no reason given:\n{log}"
        );
    }
}

/// Clients that stop mid-message, before and after SET_OWNER: each is
/// disconnected when its time is up. Before the fix each held the
/// (one-frontend-at-a-time) daemon for ever.
#[test]
fn clients_that_stop_mid_message_are_disconnected() {
    let set_owner = [SET_OWNER.to_le_bytes(), FLAG_VERSION.to_le_bytes(), [0; 4]].concat();
    let mut get_features_40 = [
        1u32.to_le_bytes(),
        FLAG_VERSION.to_le_bytes(),
        40u32.to_le_bytes(),
    ]
    .concat();
    get_features_40.extend_from_slice(&[0; 10]);
    let cases: [(&str, Vec<u8>); 3] = [
        ("half a header before SET_OWNER", set_owner[..6].to_vec()),
        (
            "half a header after SET_OWNER",
            [&set_owner[..], &set_owner[..6]].concat(),
        ),
        (
            "10 bytes of a 40-byte payload after SET_OWNER",
            [&set_owner[..], &get_features_40[..]].concat(),
        ),
    ];
    for device in DEVICES {
        let mut target = Target::start(device, "stall");
        for (what, bytes) in &cases {
            let stream = UnixStream::connect(&target.socket).expect("connect");
            (&stream).write_all(bytes).expect("send the start");
            assert!(
                closed_by_peer(&stream),
                "{device:?} waits for ever on {what}"
            );
            target.assert_alive(what);
        }
        target.assert_serves_an_honest_frontend();
        let log = target.process.log();
        assert!(
            log.contains("did not arrive whole within 2 s"),
            "{device:?} gave no reason:\n{log}"
        );
    }
}

/// The daemon's socket is in a directory only the backend's user may
/// enter, so no one reaches the daemon around the filter.
#[test]
fn the_daemon_is_reachable_only_by_its_owner() {
    for device in DEVICES {
        let target = Target::start(device, "private");
        let daemon_dir: &Path = &target.socket.with_extension("sock.daemon");
        let meta = std::fs::metadata(daemon_dir).expect("the daemon's directory");
        use std::os::unix::fs::PermissionsExt;
        assert!(
            meta.is_dir(),
            "{device:?}: {} is not a directory",
            daemon_dir.display()
        );
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o700,
            "{device:?}: mode of {}",
            daemon_dir.display()
        );
    }
}
