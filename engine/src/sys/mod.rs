//! Operating-system specifics, one small module per concern, and the only places with
//! `unsafe`: kernel TLS ([`ktls`]) here; listening sockets ([`sock`]) and host probes
//! ([`probe`]) live in `sipring-net`, shared with the load generator, as does CPU placement
//! ([`cpus`]), which needs none.

#[allow(unsafe_code)]
pub mod ktls;
pub use sipring_net::sys::{cpus, probe, sock};
