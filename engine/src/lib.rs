//! # sipring: the engine
//!
//! The thread-per-core driver around [`sipring_core`]. It owns sockets, timers and cores and
//! shuttles bytes and events; every SIP decision is made by the sans-IO core.
//!
//! ```text
//!  main ─► server::start ─► preflight (io_uring, memlock) ─► TlsPolicy::load ─► bind (×shards)
//!            │                                   (SO_REUSEPORT, socket2 backlog)
//!            └─► one pinned glommio executor per shard:
//!                   accept ─► conn (handshake, kTLS or userspace) ─► shard (ShardProxy,
//!                   registrar slice, connections) ◄─► mesh ◄─► other shards
//!  signals: SIGHUP ─► reload (ArcSwap the TLS policy and the subscribers)   SIGTERM ─► drain
//!  admin thread: /metrics, /hgrm/<name>, /reload
//!  store thread (`[cluster]` only): Redis Cluster client on tokio ◄─ lock-free lanes ─► shards
//! ```
//!
//! Who a connection is (anonymous client, client certificate AORs, partner) is established
//! here (`conn`, `tls`) and handed to the core as a `Principal`; what its messages may claim
//! is decided by the core (`sipring_core::policy`). `auth` loads the subscriber file and
//! this node's secret. `recheck` verifies the certificates of connections already up again
//! after a reload and when one expires.
//!
//! What it does not do: UDP (SIP over TLS/TCP only), DNS (partners are configured by
//! address), media.

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod control;
pub mod doctor;
pub mod labels;
pub mod lanes;
pub mod metrics;
pub mod overload;
pub mod recheck;
pub mod server;
pub mod shard;
pub mod sys;
pub mod tls;
