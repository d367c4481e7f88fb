//! # sipring-load
//!
//! A thread-per-core SIP load generator: one glommio executor per core, each owning a share of
//! the user agents (one TLS/MTLS/TCP connection each) and generating its share of the load
//! open-loop, with latency measured from each transaction's intended send time.
//!
//! ```text
//!  CLI ─► Plan(s) ─► run::run ─► shard 0..n: setup (connect, handshake, REGISTER)
//!                                          ─► open-loop generator (rate, ramp, warm-up)
//!                                          ─► UA readers: answer INVITE/MESSAGE/BYE, match responses
//!                    stats::Stats (per shard) ─► merged ─► table, JSON, .hgrm, SVG
//! ```
//!
//! It speaks plain SIP (RFC 3261) and works against any server, so benchmarks compare servers
//! with the same tool.

pub mod reflect;
pub mod run;
pub mod stats;
