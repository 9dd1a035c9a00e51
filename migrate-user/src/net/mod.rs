//! Network plane: network namespaces (and, later, addresses, neighbours, gratuitous ARP/NA).
mod netns;

pub use netns::{Netns, NetnsError};
