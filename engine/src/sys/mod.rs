//! Operating-system specifics, one small module per concern, and the only places with
//! `unsafe` in the engine: listening sockets ([`sock`]), host probes ([`probe`]) and kernel
//! TLS ([`ktls`]); CPU placement ([`cpus`]) needs none.

pub mod cpus;
pub mod ktls;
pub mod probe;
pub mod sock;
