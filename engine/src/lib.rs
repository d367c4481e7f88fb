//! # sipring: the engine
//!
//! The thread-per-core driver around [`sipring_core`]: TLS policy and sessions ([`tls`]),
//! configuration ([`config`]).

pub mod config;
pub mod tls;
