//! One module per fuzz target: the record its input is read as, and the
//! seeds written in that record (`examples/write_seeds.rs` puts them in
//! corpus/<target>/).

pub mod api;
pub mod blk_request;
pub mod filter;
pub mod hypercall;
pub mod inflight;
pub mod mmio;
pub mod net_frame;
pub mod rings;
pub mod stamp;

/// A seed: its file name in corpus/<target>/ and its bytes.
pub type Seed = (&'static str, Vec<u8>);
