//! Operating-system specifics, one small module per concern, and (with the server's kernel
//! TLS module) the only places with `unsafe`: sockets ([`sock`]), host probes ([`probe`])
//! and child processes ([`process`]); CPU placement ([`cpus`]) needs none.

pub mod cpus;
#[allow(unsafe_code)]
pub mod probe;
#[allow(unsafe_code)]
pub mod process;
#[allow(unsafe_code)]
pub mod sock;
