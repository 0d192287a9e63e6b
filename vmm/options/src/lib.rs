//! The syntax of pvstack's command-line values, shared by the VMM's CLI,
//! its device specs and `pvstack bench`: byte sizes with binary suffixes
//! ([`parse_size`]) and `key=value,flag` option lists ([`OptionList`]).

mod list;
mod size;

pub use list::{check_id, parse_queue_size, Keys, OptionList, QUEUE_SIZES};
pub use size::parse_size;
