//! The syntax of pvstack's command-line values, shared by the VMM's CLI,
//! its device specs and `pvstack bench`: byte sizes with binary suffixes
//! ([`parse_size`]).

mod size;

pub use size::parse_size;
