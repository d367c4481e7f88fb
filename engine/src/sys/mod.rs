//! Operating-system specifics, one small module per concern, and the only places with
//! `unsafe` in the engine: listening sockets ([`sock`]), host probes ([`probe`]) and kernel
//! TLS ([`ktls`]).

pub mod ktls;
pub mod probe;
pub mod sock;
