//! What every shard and the control thread share, lock-free: flags, published metrics, the
//! process-wide connection and binding counts per source, the connection budget and this
//! node's identity. A leaf: it knows no shard, connection or server type.

use crate::config::Config;
use crate::metrics::Snapshot;
use crate::sys;
use crate::tls::RejectCounters;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Instant;

/// Flags and publication slots shared by all shards and the control thread (atomics and
/// `ArcSwap` only: nothing here is locked).
#[derive(Debug)]
pub struct Control {
    pub(crate) draining: AtomicBool,
    pub(crate) stopping: AtomicBool,
    pub(crate) hurry: AtomicBool,
    /// Latest metrics snapshot of each shard.
    pub snapshots: Vec<ArcSwap<Snapshot>>,
    /// TLS rejections by reason.
    pub rejections: RejectCounters,
    /// What the kernel offers for TLS.
    pub ktls: sys::ktls::Support,
    /// Shards that have finished.
    pub stopped: AtomicUsize,
    /// Reloads applied / refused.
    pub reloads: [std::sync::atomic::AtomicU64; 2],
    /// The CRL files the configuration names and when they fall due, replaced on reload:
    /// `/metrics` shows them, and the control thread warns when one lapses.
    pub crls: ArcSwap<Vec<crate::tls::CrlDue>>,
    /// Unix seconds up to which a CRL's lapse was already told (at start, a reload, or by
    /// [`Control::lapsed_crls`]).
    pub crls_told: AtomicI64,
    /// One reload at a time (SIGHUP and the admin endpoint may ask together): the TLS
    /// policy and the subscribers then come from the same file. Not on the message path.
    pub reload_lock: std::sync::Mutex<()>,
    /// How many TLS policies were swapped in (0: the one the server started with). Shards
    /// check again the certificates of connections verified under an older one.
    pub tls_generation: std::sync::atomic::AtomicU64,
    /// Connections (and handshakes) per shard, for the balanced accept mode and the
    /// process-wide connection budget.
    pub load: Vec<AtomicUsize>,
    /// Anonymous client connections per shard past their grace, as each last counted (its
    /// sweep): where a shard with none asks another to make room at a full budget.
    pub anonymous: Vec<AtomicUsize>,
    /// Connections per source address, process-wide (all shards).
    pub per_source: PerSource,
    /// Of those, the ones still anonymous (nothing registered or authenticated on them as
    /// far as the driver saw; `limits.max_anonymous_per_ip`).
    pub anonymous_per_source: PerSource,
    /// The same per IPv6 /48 (`sipring_core::auth::wide_of`): a site holding many /64s.
    pub anonymous_per_site: PerSource,
    /// Registered bindings per source address, process-wide (`limits.max_bindings_per_ip`).
    pub bindings_per_source: PerSource,
    /// The most connections the process holds: below RLIMIT_NOFILE, leaving descriptors for
    /// the admin endpoint, partner links and the rest.
    pub budget: usize,
    /// This node's secret and subscribers.
    pub identity: Identity,
    /// The cluster's location store (its thread), when `[cluster]` is configured.
    pub store: Option<crate::cluster::StoreSender>,
}

/// Connections per source (an IPv4 address, an IPv6 /64: `sipring_core::auth::source_of`)
/// across every shard, lock-free: sources hash (with a
/// per-process random key) into a fixed table of counters, so memory is bounded whatever
/// peers do. Two addresses sharing a counter share the limit (2^16 counters: rare, and only
/// ever stricter).
#[derive(Debug)]
pub struct PerSource {
    counts: Box<[std::sync::atomic::AtomicU32]>,
    key: std::collections::hash_map::RandomState,
}

impl Default for PerSource {
    fn default() -> Self {
        PerSource {
            counts: (0..1 << 16)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            key: std::collections::hash_map::RandomState::new(),
        }
    }
}

impl PerSource {
    fn slot(&self, ip: std::net::IpAddr) -> &std::sync::atomic::AtomicU32 {
        use std::hash::BuildHasher;
        let source = sipring_core::auth::source_of(ip);
        &self.counts[self.key.hash_one(source) as usize & (self.counts.len() - 1)]
    }

    /// Connections from `ip` now.
    pub fn get(&self, ip: std::net::IpAddr) -> usize {
        self.slot(ip).load(Ordering::Relaxed) as usize
    }

    /// One more from `ip`, if it has fewer than `limit`: the check and the count are one
    /// step, so shards admitting at once cannot both take the last place.
    pub fn try_add(&self, ip: std::net::IpAddr, limit: usize) -> bool {
        self.slot(ip)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                ((c as usize) < limit).then_some(c + 1)
            })
            .is_ok()
    }

    /// One fewer from `ip`.
    pub fn sub(&self, ip: std::net::IpAddr) {
        self.add_n(ip, -1);
    }

    /// `n` more (or fewer, never below zero) from `ip`.
    pub fn add_n(&self, ip: std::net::IpAddr, n: i64) {
        let _ = self
            .slot(ip)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some((i64::from(c) + n).clamp(0, i64::from(u32::MAX)) as u32)
            });
    }
}

/// The connection budget: `limits.max_connections`, or (0) the descriptors the process may
/// open less a reserve for everything that is not a client connection.
pub fn connection_budget(cfg: &Config, shards: usize) -> usize {
    let (nofile, _) = sys::probe::nofile();
    // The admin endpoint, listeners, io_uring rings and event fds, partner links, files, and
    // descriptors of refused connections whose asynchronous close is still pending.
    let reserve = 128 + 16 * shards + cfg.peer.len() * shards;
    let room = (nofile as usize).saturating_sub(reserve).max(1);
    match cfg.limits.max_connections {
        0 => room,
        n if n > room => {
            tracing::warn!(
                configured = n,
                nofile,
                room,
                "limits.max_connections is more than the descriptors allow: using {room}"
            );
            room
        }
        n => n,
    }
}

/// What every shard's policy shares: this node's secret (nonces, flow tokens), when its
/// nonces count from, and the subscribers (swapped whole on reload).
#[derive(Debug, Clone)]
pub struct Identity {
    /// Signs nonces and flow tokens.
    pub key: sipring_core::auth::NodeKey,
    /// When this node's nonces count from.
    pub epoch: Instant,
    /// The subscriber table (from the file).
    pub subscribers: crate::auth::SharedSubscribers,
    /// Subscribers read from the cluster's store (refreshed by the store thread).
    pub store_subscribers: crate::auth::SharedSubscribers,
    /// Failed authentication attempts per source, all shards together.
    pub failures: std::sync::Arc<sipring_core::auth::FailureLedger>,
}

impl Control {
    /// The CRL files whose CRLs in use lapsed (nextUpdate passed) since the last call, and
    /// whose scope refuses unknown revocation status; `now` in unix seconds.
    pub fn lapsed_crls(&self, now: i64) -> Vec<crate::tls::CrlDue> {
        let told = self.crls_told.load(Ordering::Relaxed);
        let crls = self.crls.load();
        let lapsed: Vec<_> = crls
            .iter()
            .filter(|d| d.enforced && d.next.is_some_and(|t| t > told && t <= now))
            .cloned()
            .collect();
        if !lapsed.is_empty() {
            self.crls_told.fetch_max(now, Ordering::Relaxed);
        }
        lapsed
    }

    /// Is the server draining (no new connections)?
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Cut a drain short (a second SIGTERM): [`crate::server::Running::drain`] stops
    /// waiting for requests in progress.
    pub fn hurry(&self) {
        self.hurry.store(true, Ordering::Relaxed);
    }

    /// Was the drain cut short?
    pub fn hurried(&self) -> bool {
        self.hurry.load(Ordering::Relaxed)
    }

    /// Must shards close everything and exit now?
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The TLS policy generation now (see [`Control::tls_generation`]).
    pub fn tls_generation(&self) -> u64 {
        self.tls_generation.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::PerSource;
    use std::net::IpAddr;

    #[test]
    fn an_ipv6_host_is_one_source_however_it_draws_from_its_prefix() {
        // Per-address limits keyed by the /128 bounded nothing: one host has 2^64 addresses.
        let p = PerSource::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for host in ["2001:db8:0:7::1", "2001:db8:0:7::2", "2001:db8:0:7:abcd::3"] {
            assert!(p.try_add(ip(host), 3));
        }
        assert_eq!(p.get(ip("2001:db8:0:7::ffff")), 3);
        // Full: the check and the count are one step.
        assert!(!p.try_add(ip("2001:db8:0:7::4"), 3));
        assert_eq!(p.get(ip("2001:db8:0:7::1")), 3);
        assert!(p.try_add(ip("192.0.2.1"), 3));
        assert_eq!(
            p.get(ip("::ffff:192.0.2.1")),
            1,
            "IPv4-mapped is the IPv4 source"
        );
        p.sub(ip("2001:db8:0:7::9"));
        assert_eq!(p.get(ip("2001:db8:0:7::1")), 2);
    }
}
