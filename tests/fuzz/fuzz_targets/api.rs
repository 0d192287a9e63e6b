//! The control API server's line handling on whatever a client sends:
//! `ApiServer::serve_lines`, the loop that serves each connection, reads
//! the input as the client's stream and answers a machine built without
//! KVM (its vCPUs not started, its vCPU kick doing nothing; no vhost-user
//! devices, so device requests are refused as for an unknown id; no live
//! VM, so snapshot and upgrade requests are refused). Beyond not
//! crashing: every answer is one line of JSON that `pvstack ctl` reads as
//! a response of this API version, an error carries its message, and
//! nothing follows the answer to a shutdown.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use pvstack::api::protocol::{Reply, VmState};
use pvstack::api::{ApiServer, Response, VmControl, API_VERSION};
use pvstack::console::Console;
use pvstack::counters::ExitCounters;
use pvstack::lifecycle::Lifecycle;
use pvstack::machine::Machine;
use pvstack::memory::GuestMemory;
use pvstack_devices::bus::Bus;
use pvstack_protocols::boot::BootInfo;
use pvstack_protocols::layout::MIN_MEMORY;

struct Bench {
    server: ApiServer,
    memory: GuestMemory,
}

fn bench() -> &'static Bench {
    static BENCH: OnceLock<Bench> = OnceLock::new();
    BENCH.get_or_init(|| Bench {
        server: ApiServer::bind(
            &pvstack_fuzz::scratch_dir().join("api.sock"),
            0o600,
            Vec::new(),
        )
        .expect("bind the API socket"),
        memory: pvstack::memory::create(MIN_MEMORY).expect("guest memory"),
    })
}

fuzz_target!(|data: &[u8]| {
    let bench = bench();
    // No vCPU threads run here, and a pause waits until every started
    // vCPU has parked: the VM is taken at the moment before its vCPUs
    // start, where a pause is done at once.
    let lifecycle = Lifecycle::new(2);
    lifecycle.set_started(&[false, false]);
    let machine = Machine {
        memory: bench.memory.clone(),
        bus: Bus::new(),
        pio: Bus::new(),
        linux: false,
        boot_info: BootInfo::EMPTY,
        console: Console::from_writer(Box::new(std::io::sink())),
        counters: ExitCounters::default(),
        lifecycle: Arc::new(lifecycle),
        created: Instant::now(),
        time_base_ns: 0,
    };
    let vm = VmControl {
        machine: Arc::new(machine),
        live: None,
        vcpus: 2,
        kick_vcpus: Box::new(|| {}),
    };
    let mut out = Vec::new();
    bench
        .server
        .serve_lines(data, &mut out, &vm)
        .expect("reading from memory and writing to a Vec cannot fail");
    let text = std::str::from_utf8(&out).expect("responses are UTF-8");
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let json = line
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("response {line:?} does not end its line"));
        let response: Response = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("response {json:?} does not parse: {e}"));
        assert_eq!(response.api_version, API_VERSION);
        assert_eq!(response.ok, response.result.is_some());
        assert_eq!(response.ok, response.error.is_none());
        if let Some(Reply::State {
            state: VmState::ShuttingDown,
        }) = response.result
        {
            assert_eq!(i + 1, lines.len(), "answers after the shutdown");
        }
    }
});
