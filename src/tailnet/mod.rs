//! The tailnet side of tailkitd: peer identity (WhoIs results) and, over the
//! Go bridge, the tsnet node itself. This is the only module allowed `unsafe`.

mod identity;

pub use identity::{Identity, Owner};
