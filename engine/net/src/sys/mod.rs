//! Operating-system specifics, one small module per concern, and (with the server's kernel
//! TLS module) the only places with `unsafe`: sockets ([`sock`]) and host probes
//! ([`probe`]); CPU placement ([`cpus`]) needs none.

pub mod cpus;
pub mod probe;
pub mod sock;
