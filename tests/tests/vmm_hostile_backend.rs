//! pvstack against a hostile vhost-user backend: this test speaks the
//! protocol itself, on the socket a disk's backend listens on, and
//! misbehaves on purpose. It cannot shrink or grow guest memory (the
//! memfd is sealed), and garbage, oversize replies and a configuration
//! space larger than the device's are refused: pvstack keeps running,
//! the device is reported failed (its reconnect window ends) or keeps
//! waiting, and pvstack still ends cleanly on SIGTERM. A backend that
//! never answers holds neither the control API nor SIGTERM, not even when
//! the guest resets its device and pvstack must wait for the backend to
//! stop its rings. A backend that fails the ring setup of a swap, as
//! vhost-user-backend fails a request (it ends the connection), has the
//! swap refused and the rings given back to the old backend, which loses
//! no write.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use pvstack_tests::api_vm::{ApiVm, LONG_COMPUTE};
use pvstack_tests::blk_process::BlkProcess;
use pvstack_tests::blk_vm::{
    assert_swap_verify_image, finish_swap_verify, newest_write, read_image, run_with_disks,
    socket_spec, utf8, wait_for_write_after, zeroed_image,
};
use pvstack_tests::ScratchDir;
use serde_json::Value;

const IMAGE_BYTES: usize = 1 << 20;

/// vhost-user header flags: protocol version 1, "this is a reply", and
/// "acknowledge this request" (with REPLY_ACK).
const VERSION: u32 = 1;
const REPLY: u32 = 1 << 2;
const NEED_REPLY: u32 = 1 << 3;
const HEADER: usize = 12;

/// Requests this backend answers or acts on.
const GET_FEATURES: u32 = 1;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_ADDR: u32 = 9;
const GET_VRING_BASE: u32 = 11;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_QUEUE_NUM: u32 = 17;
const GET_CONFIG: u32 = 24;

/// VIRTIO_F_VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES.
const FEATURES: u64 = 1 << 32 | 1 << 30;
/// Protocol features MQ and CONFIG (no REPLY_ACK: nothing needs an ack).
const PROTOCOL_FEATURES: u64 = 1 | 1 << 9;
/// What [`Hostility::FailRingAddress`] offers besides [`FEATURES`]: the
/// disk features of pvstack-blk's the driver takes (SEG_MAX, BLK_SIZE,
/// FLUSH, MQ, DISCARD, WRITE_ZEROES, RING_EVENT_IDX), so a swap from
/// pvstack-blk gets as far as the ring setup.
const BLK_FEATURES: u64 = 1 << 2 | 1 << 6 | 1 << 9 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 29;
/// REPLY_ACK, offered by [`Hostility::FailRingAddress`] only.
const REPLY_ACK: u64 = 1 << 3;

/// How the backend misbehaves.
#[derive(Clone, Copy, Debug)]
enum Hostility {
    /// Serves honestly until the memory table, then tries to shrink and
    /// grow every region's file.
    ResizeMemory,
    /// Answers GET_FEATURES with twelve bytes of garbage.
    Garbage,
    /// Answers GET_FEATURES with a header that announces 2 GiB.
    Oversize,
    /// Answers GET_CONFIG with 4 KiB, more than the device's space.
    LargeConfig,
    /// Never answers GET_FEATURES; holds the connection until the
    /// frontend closes it.
    Silent,
    /// Serves until the rings are to stop (a reset), then never answers
    /// GET_VRING_BASE; holds the connection until the frontend closes it.
    StallStop,
    /// Offers REPLY_ACK and acknowledges every request that asks, until
    /// SET_VRING_ADDR, which it fails as vhost-user-backend fails a
    /// request: it ends the connection (with an acknowledgement of 1
    /// first if the request asked for one).
    FailRingAddress,
}

/// One message from the frontend, with the file descriptors it carried.
struct Message {
    request: u32,
    flags: u32,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Reads one message; `None` when the frontend hung up.
fn receive(stream: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER];
    // Room for up to 32 fds' control message, aligned for cmsghdr.
    let mut control = [0u64; 32];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    };
    // SAFETY: all-zero is a valid msghdr, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at the header and control buffers, which live
    // for the call.
    let got = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    if got == 0 {
        return Ok(None);
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* walk stays within msg_controllen bytes of the
    // control buffer the kernel filled; each SCM_RIGHTS payload is an
    // array of fds now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    stream.read_exact(&mut header[got as usize..])?;
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
    let mut payload = vec![0u8; word(8) as usize];
    stream.read_exact(&mut payload)?;
    Ok(Some(Message {
        request: word(0),
        flags: word(4),
        payload,
        fds,
    }))
}

fn reply(stream: &mut UnixStream, request: u32, payload: &[u8]) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER + payload.len());
    bytes.extend_from_slice(&request.to_le_bytes());
    bytes.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    stream.write_all(&bytes)
}

/// What the backend saw and did.
#[derive(Debug, Default)]
struct Report {
    connections: usize,
    /// Memory regions it tried to resize, and the errors: one per try.
    resize_errors: Vec<Option<i32>>,
    /// The number of the connection a silent backend holds unanswered.
    stalled: Option<usize>,
}

/// Serves one connection as `hostility` says.
fn serve(mut stream: UnixStream, hostility: Hostility, report: &Mutex<Report>) -> io::Result<()> {
    while let Some(message) = receive(&mut stream)? {
        match (message.request, hostility) {
            (GET_FEATURES, Hostility::Garbage) => {
                return stream.write_all(&[0xa5; HEADER]);
            }
            (GET_FEATURES, Hostility::Oversize) => {
                let mut header = Vec::new();
                header.extend_from_slice(&GET_FEATURES.to_le_bytes());
                header.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
                header.extend_from_slice(&(1u32 << 31).to_le_bytes());
                stream.write_all(&header)?;
                stream.write_all(&[0x5a; 4096])?;
                // Hold the connection until the frontend gives up on it.
                let _ = io::copy(&mut stream, &mut io::sink());
                return Ok(());
            }
            (GET_FEATURES, Hostility::Silent) | (GET_VRING_BASE, Hostility::StallStop) => {
                let number = report.lock().unwrap().connections;
                report.lock().unwrap().stalled = Some(number);
                let _ = io::copy(&mut stream, &mut io::sink());
                report.lock().unwrap().stalled = None;
                return Ok(());
            }
            (GET_FEATURES, Hostility::FailRingAddress) => reply(
                &mut stream,
                GET_FEATURES,
                &(FEATURES | BLK_FEATURES).to_le_bytes(),
            )?,
            (GET_FEATURES, _) => reply(&mut stream, GET_FEATURES, &FEATURES.to_le_bytes())?,
            (GET_PROTOCOL_FEATURES, Hostility::FailRingAddress) => reply(
                &mut stream,
                GET_PROTOCOL_FEATURES,
                &(PROTOCOL_FEATURES | REPLY_ACK).to_le_bytes(),
            )?,
            (GET_PROTOCOL_FEATURES, _) => reply(
                &mut stream,
                GET_PROTOCOL_FEATURES,
                &PROTOCOL_FEATURES.to_le_bytes(),
            )?,
            (SET_VRING_ADDR, Hostility::FailRingAddress) => {
                if message.flags & NEED_REPLY != 0 {
                    reply(&mut stream, SET_VRING_ADDR, &1u64.to_le_bytes())?;
                }
                return Ok(());
            }
            (GET_QUEUE_NUM, _) => reply(&mut stream, GET_QUEUE_NUM, &1u64.to_le_bytes())?,
            (GET_CONFIG, _) => {
                // offset, size, flags, then the space.
                let asked = u32::from_le_bytes(message.payload[4..8].try_into().unwrap());
                let size = match hostility {
                    Hostility::LargeConfig => 4096,
                    _ => asked,
                };
                let mut space = vec![0u8; size as usize];
                let sectors = (IMAGE_BYTES / 512) as u64;
                space[..8].copy_from_slice(&sectors.to_le_bytes());
                let mut body = message.payload[..4].to_vec();
                body.extend_from_slice(&size.to_le_bytes());
                body.extend_from_slice(&message.payload[8..12]);
                body.extend_from_slice(&space);
                reply(&mut stream, GET_CONFIG, &body)?;
            }
            (SET_MEM_TABLE, Hostility::ResizeMemory) => {
                let mut report = report.lock().unwrap();
                for fd in &message.fds {
                    for len in [0, 1 << 40] {
                        // SAFETY: ftruncate on a memfd the frontend sent.
                        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len) };
                        let error = (rc != 0).then(|| io::Error::last_os_error().raw_os_error());
                        report.resize_errors.push(error.flatten());
                    }
                }
                return Ok(());
            }
            // Everything else is answered only when acknowledged requests
            // were agreed on (REPLY_ACK) and this one asks.
            (request, _) if message.flags & NEED_REPLY != 0 => {
                reply(&mut stream, request, &0u64.to_le_bytes())?
            }
            _ => {}
        }
    }
    Ok(())
}

/// A hostile backend listening on `socket` until dropped.
struct HostileBackend {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HostileBackend {
    fn listen(socket: &Path, hostility: Hostility) -> HostileBackend {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).expect("bind the hostile backend");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        let thread = {
            let (stop, report) = (stop.clone(), report.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(false).expect("blocking");
                            report.lock().unwrap().connections += 1;
                            let _ = serve(stream, hostility, &report);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        HostileBackend {
            stop,
            report,
            thread: Some(thread),
        }
    }

    fn connections(&self) -> usize {
        self.report.lock().unwrap().connections
    }

    fn stalled(&self) -> Option<usize> {
        self.report.lock().unwrap().stalled
    }
}

impl Drop for HostileBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends pvstack SIGTERM: it must end on it.
fn assert_ends_on_sigterm(vm: &mut ApiVm) {
    let status = vm.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", vm.log());
}

/// A VM computing with a disk on a real pvstack-blk (socket options
/// `options`), which stops; then a backend that misbehaves as
/// `hostility` says takes its socket.
fn taken_over(dir: &ScratchDir, options: &[&str], hostility: Hostility) -> (ApiVm, HostileBackend) {
    let image = dir.path("disk.img");
    zeroed_image(&image, IMAGE_BYTES);
    let socket = dir.path("blk.sock");
    let mut real = BlkProcess::start(&socket, &["--image", utf8(&image)]);
    let spec = socket_spec(&socket, options);
    let vm = ApiVm::start(dir, &["--blk", &spec, "--guest-args", LONG_COMPUTE], "");
    real.terminate_cleanly();
    let backend = HostileBackend::listen(&socket, hostility);
    (vm, backend)
}

/// Waits (for `what`) until `backend` holds a request of pvstack's
/// unanswered, then asks the control API for the disk: the answer must
/// come while that request is still unanswered (pvstack gives a backend
/// 10 s per reply). Returns the disk as `info` shows it and the number
/// of the connection the backend holds.
fn device_during_stall(
    vm: &mut ApiVm,
    backend: &HostileBackend,
    what: &str,
) -> (Value, Option<usize>) {
    vm.wait_until(what, |_| backend.stalled().is_some());
    let stalled = backend.stalled();
    let device = vm.first_device();
    assert_eq!(
        backend.stalled(),
        stalled,
        "the API answered only once pvstack had given up on the backend"
    );
    (device, stalled)
}

#[test]
fn a_backend_cannot_resize_guest_memory() {
    let dir = ScratchDir::new("hostile-backend-resize");
    let socket = dir.path("blk.sock");
    let backend = HostileBackend::listen(&socket, Hostility::ResizeMemory);
    let spec = socket_spec(&socket, &[]);
    // The guest starts the driver (so the memory table is sent) and
    // waits for a read the backend never serves.
    let mut vm = ApiVm::start(
        &dir,
        &["--blk", &spec, "--guest-args", "blk-checksum 0 4096"],
        "",
    );
    vm.wait_until("the backend tries to resize guest memory", |_| {
        !backend.report.lock().unwrap().resize_errors.is_empty()
    });
    let errors = backend.report.lock().unwrap().resize_errors.clone();
    assert!(
        errors.iter().all(|e| *e == Some(libc::EPERM)),
        "every resize refused by a seal: {errors:?}"
    );
    // pvstack is alive (no SIGBUS), answers, and ends on SIGTERM.
    assert!(vm.first_device()["backend_state"].is_string());
    assert_ends_on_sigterm(&mut vm);
}

/// A disk on a real pvstack-blk that stops; a hostile backend takes its
/// socket; pvstack refuses it on every reconnect attempt until the window
/// closes and reports the device failed, still running.
fn refused_on_reconnect(name: &str, hostility: Hostility, needle: &str) {
    let dir = ScratchDir::new(name);
    let (mut vm, backend) = taken_over(&dir, &["reconnect-timeout=1"], hostility);
    vm.wait_until("pvstack gives the device up", |vm| {
        vm.first_device()["backend_state"] == "failed"
    });
    assert!(
        backend.connections() >= 1,
        "pvstack tried the hostile backend"
    );
    let log = vm.log();
    assert!(log.contains(needle), "{needle:?} not in:\n{log}");
    assert!(vm.is_running());
    assert_ends_on_sigterm(&mut vm);
}

#[test]
fn garbage_replies_are_refused_and_the_device_reported_failed() {
    refused_on_reconnect(
        "hostile-backend-garbage",
        Hostility::Garbage,
        "GET_FEATURES",
    );
}

#[test]
fn an_oversize_reply_is_refused_and_the_device_reported_failed() {
    refused_on_reconnect(
        "hostile-backend-oversize",
        Hostility::Oversize,
        "GET_FEATURES",
    );
}

#[test]
fn a_configuration_space_larger_than_the_device_is_refused() {
    refused_on_reconnect(
        "hostile-backend-config",
        Hostility::LargeConfig,
        "GET_CONFIG",
    );
}

#[test]
fn a_silent_backend_holds_neither_the_api_nor_sigterm() {
    let dir = ScratchDir::new("hostile-backend-silent");
    let (mut vm, backend) = taken_over(&dir, &[], Hostility::Silent);
    // The wait for the reply holds no lock the API needs.
    let (device, stalled) = device_during_stall(
        &mut vm,
        &backend,
        "pvstack waits for the silent backend's reply",
    );
    assert_eq!(device["backend_state"], "reconnecting");
    // SIGTERM ends pvstack at once, not after the reply timeout and the
    // next attempt.
    assert_ends_on_sigterm(&mut vm);
    assert_eq!(
        Some(backend.connections()),
        stalled,
        "pvstack tried again before it ended"
    );
}

#[test]
fn a_backend_that_stalls_a_guest_reset_holds_neither_the_api_nor_sigterm() {
    let dir = ScratchDir::new("hostile-backend-stall-reset");
    let socket = dir.path("blk.sock");
    let backend = HostileBackend::listen(&socket, Hostility::StallStop);
    let spec = socket_spec(&socket, &[]);
    // The guest starts the disk's driver, then resets the running device:
    // pvstack must stop the backend's rings, and the backend never says
    // it has.
    let mut vm = ApiVm::start(&dir, &["--blk", &spec, "--guest-args", "blk-reset"], "");
    // GET_VRING_BASE stays unanswered on a live connection: neither the
    // vCPU nor the exchange holds the device's lock meanwhile.
    let (device, _) = device_during_stall(
        &mut vm,
        &backend,
        "the guest's reset waits for the stalled backend",
    );
    assert_eq!(device["backend_state"], "connected", "{device:#}");
    assert_eq!(device["active"], false, "{device:#}");
    // SIGTERM ends pvstack during the stall, not after the reply timeout.
    assert_ends_on_sigterm(&mut vm);
    let log = vm.log();
    assert!(!log.contains("did not stop in time"), "{log}");
    assert!(
        !vm.console().contains("RESULT blk-reset"),
        "{}",
        vm.console()
    );
    assert_eq!(backend.connections(), 1);
}

#[test]
fn a_guest_reset_on_an_honest_backend_completes_and_the_device_starts_again() {
    let dir = ScratchDir::new("hostile-backend-honest-reset");
    let image = dir.path("disk.img");
    zeroed_image(&image, IMAGE_BYTES);
    let socket = dir.path("blk.sock");
    let mut backend = BlkProcess::start(&socket, &["--image", utf8(&image)]);
    let run = run_with_disks(&[socket_spec(&socket, &[])], "blk-reset count=3");
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(run.result_u64("blk-reset", "starts"), 4, "{run:#?}");
    backend.terminate_cleanly();
}

#[test]
fn a_backend_that_fails_a_swaps_ring_setup_is_refused_and_the_old_one_serves_on() {
    const BLOCKS: usize = 128;
    let dir = ScratchDir::new("hostile-backend-swap-ring-setup");
    let image = dir.path("disk.img");
    zeroed_image(&image, IMAGE_BYTES);
    let socket = dir.path("blk.sock");
    let _real = BlkProcess::start(&socket, &["--image", utf8(&image)]);
    let hostile_socket = dir.path("hostile.sock");
    let hostile = HostileBackend::listen(&hostile_socket, Hostility::FailRingAddress);
    let spec = format!("{},id=blk0", socket_spec(&socket, &[]));
    let vm = ApiVm::start(
        &dir,
        &[
            "--blk",
            &spec,
            "--guest-args",
            &format!("blk-swap-verify blocks={BLOCKS} stop=1 depth=8"),
        ],
        "blk-swap-verify: running",
    );
    // Some of the ring setup goes out unacknowledged: its failure must
    // still be seen, at the acknowledged request after it at the latest.
    let error = vm.ctl_refused(&["device", "swap", "blk0", "--socket", utf8(&hostile_socket)]);
    assert!(error.contains("SET_VRING"), "{error}");
    assert_eq!(hostile.connections(), 1);
    let device = vm.first_device();
    assert_eq!(device["refused_swaps"], 1, "{device:#}");
    assert_eq!(device["socket"], utf8(&socket), "{device:#}");
    assert_eq!(device["backend_state"], "connected", "{device:#}");
    // The old backend took the rings back: the guest's writes go on, and
    // the image holds exactly those it saw complete.
    wait_for_write_after(&image, BLOCKS, newest_write(&image, BLOCKS));
    let result = finish_swap_verify(vm, &image, BLOCKS);
    assert_swap_verify_image(&read_image(&image), BLOCKS, &result);
}
