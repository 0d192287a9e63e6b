//! Writes the seed corpus: corpus/<target>/<seed> for every target, from
//! the seeds each target's module in src/targets lays out in the very
//! record the target reads. Run after changing a target's input:
//!
//!     cargo +nightly run --manifest-path tests/fuzz/Cargo.toml --example write_seeds

use std::path::Path;

use pvstack_fuzz::targets::{
    api, blk_request, filter, hypercall, inflight, mmio, net_frame, stamp, Seed,
};

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let targets: [(&str, Vec<Seed>); 8] = [
        ("api", api::seeds()),
        ("blk_request", blk_request::seeds()),
        ("filter", filter::seeds()),
        ("hypercall", hypercall::seeds()),
        ("inflight", inflight::seeds()),
        ("mmio", mmio::seeds()),
        ("net_frame", net_frame::seeds()),
        ("stamp", stamp::seeds()),
    ];
    for (target, seeds) in targets {
        let dir = corpus.join(target);
        // Only the seeds: files a run added are not kept here.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .unwrap_or_else(|e| panic!("cannot empty {}: {e}", dir.display()));
        }
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        for (name, bytes) in seeds {
            let path = dir.join(name);
            std::fs::write(&path, &bytes)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            println!("{} ({} bytes)", path.display(), bytes.len());
        }
    }
}
