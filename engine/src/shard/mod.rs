//! One shard: a pinned glommio executor that owns its listeners' connections, its slice of
//! the registrar (AORs with `shard_for(aor) == self`), its transactions and its outbound
//! peer connections. Other shards reach that state only through bounded mesh channels.
//!
//! ```text
//!  listeners (SO_REUSEPORT) ─► accept ─► conn task (TLS handshake, kTLS or userspace)
//!                                            │ framed messages
//!                                            ▼
//!   mesh ◄──────────────────────── Shard::on_message ─► ShardProxy (sans-IO core)
//!   (Lookup/Register/Send/           │ outputs
//!    FlowClosed to other shards)     ├─► Send to a local conn queue, or over the mesh to its owner
//!                                    ├─► Lookup / Register on the AOR's owner (local or mesh)
//!                                    └─► Close
//! ```
//!
//! Everything here is `!Send` (`Rc`, `RefCell`); no lock is taken on the message path,
//! between shards nor (in a cluster) to and from the location store's thread
//! ([`crate::lanes`]). A
//! message that finds a cross-shard channel full waits, in order, in a bounded overflow
//! queue drained by one task per destination, so no two shards ever block on each other;
//! past 4× `server.mesh_capacity` waiting (at least 1,024) new requests get 503 instead.

use crate::config::{ClientAuth, Config, ListenKind};
use crate::control::Control;
use crate::labels::{kind_label, message_label, messages_in_name, refusal_name, register_name};
use crate::metrics::{LogLimiter, ShardMetrics, Snapshot};
use crate::overload::{Shedding, Tick};
use crate::tls::TlsPolicy;
use arc_swap::ArcSwap;
use glommio::channels::channel_mesh::{Receivers, Senders};
use sipring_core::auth::NodeKey;
use sipring_core::policy::{FlowInfo, Policy, Principal};
use sipring_core::proxy::{
    Flow, Interface, Lookup, PLAIN_FLOW_BIT, PeerRoute, Proxy, ProxyConfig, Transport,
};
use sipring_core::registrar::{
    BindingStore, FlowId, MemoryStore, Registrar, RegistrarConfig, Reply, shard_for,
};
use sipring_core::stateful::{Output, ShardProxy};
use sipring_core::transaction::TimerConfig;
use sipring_core::{Framing, Header, Status, parse};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod admission;
mod mesh;
mod registry;
mod upkeep;

pub use admission::{Admission, HandedFd, HandshakeSlot, admit};
use admission::{reclaim_asked, tidy_queue};
pub use mesh::{
    MAX_CANCELS_ASKED, MESH_BACKLOG_BYTES, MESH_HARD, MESH_OVERFLOW, MESH_OVERFLOW_MIN, ShardMsg,
    spawn_mesh_receivers,
};
use mesh::{Overflow, take_turns};
use registry::ClusterLink;
pub use registry::{MAX_REMOVAL_BYTES, spawn_store_replies};
pub use upkeep::timer_loop;

/// The shard that owns a connection id.
pub fn owner_of(conn: FlowId) -> usize {
    (conn >> 48) as usize
}

/// When a message's processing started and what it was, for the forward-latency histogram.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    /// Last byte of the request read.
    pub t0: Instant,
    /// Histogram label (method or `response`).
    pub label: &'static str,
}

/// A live connection, as the shard sees it (shared with its task).
pub type ConnHandle = Rc<crate::conn::Conn>;

/// The state of this shard's outbound connection to one partner.
#[derive(Debug)]
pub enum PeerLink {
    /// Not connected.
    Idle,
    /// Connecting; messages wait here.
    Connecting(VecDeque<(Rc<[u8]>, Option<Stamp>)>),
    /// Up, as this connection, since the instant.
    Up(FlowId, Instant),
}

/// One shard; see the module docs.
pub struct Shard {
    /// Shard index.
    pub id: usize,
    /// Number of shards.
    pub n: usize,
    /// Configuration (immutable; TLS reloads come through `policy`).
    pub cfg: Arc<Config>,
    /// The TLS policy, swapped on reload.
    pub policy: Arc<ArcSwap<TlsPolicy>>,
    /// Shared control flags and publication slots.
    pub control: Arc<Control>,
    /// The stateful proxy core.
    pub proxy: RefCell<ShardProxy>,
    registrar: Registrar,
    store: RefCell<MemoryStore>,
    known: RefCell<sipring_core::registrar::KnownAors>,
    /// Live connections owned by this shard.
    pub conns: RefCell<HashMap<FlowId, ConnHandle>>,
    /// Outbound partner links.
    pub peers: RefCell<HashMap<String, PeerLink>>,
    /// Links to partners retired with their key spent, kept for the answers to what went
    /// out on them: the partner, the connection, those requests (few: one per link that
    /// reached its record budget, for at most Timer C).
    retired: RefCell<Vec<(String, FlowId, Vec<sipring_core::matching::TxKey>)>>,
    /// Partners whose last dial failed: not dialled again before the instant (1 s after
    /// the first failure, doubling to 30 s), the failures in a row. Meanwhile what is sent
    /// to them fails at once: one request per dial against a partner that is down was a
    /// connect storm (and a log line each).
    peer_backoff: RefCell<HashMap<String, (Instant, u32)>>,
    mesh: Senders<ShardMsg>,
    /// Metrics.
    pub metrics: RefCell<ShardMetrics>,
    next_conn: Cell<u64>,
    stamps: RefCell<HashMap<u64, Stamp>>,
    /// Partner CANCELs asked of the other shards: the answers still to come, and whether
    /// one matched (at most [`MAX_CANCELS_ASKED`]: CANCEL passes the door and the
    /// transaction cap, so a flood of unmatched ones is bounded here).
    cancels_asked: RefCell<HashMap<u64, (usize, bool)>>,
    /// TLS handshakes in progress.
    pub handshakes: Cell<usize>,
    /// TLS handshakes in progress per source address (bounded by the handshakes in flight).
    handshakes_by_ip: RefCell<HashMap<IpAddr, usize>>,
    /// New handshakes per source: tokens and when they were last topped up
    /// (`limits.max_handshakes_per_ip_per_s`; bounded, see [`Shard::handshake_allowed`]).
    handshake_rate: RefCell<HashMap<IpAddr, (f32, Instant)>>,
    /// A spare descriptor, given back for a moment when accept fails for want of them.
    reserve_fd: RefCell<Option<std::fs::File>>,
    /// Connections out of the table but still in their close sequence (flushing, close_notify).
    pub closing: Cell<usize>,
    /// Mesh messages waiting for room in a full channel, by destination shard, in order.
    overflow: RefCell<Vec<Overflow>>,
    /// How many wait in `overflow`, all destinations together.
    mesh_backlog: Cell<usize>,
    /// The bytes of SIP those messages hold (relayed sends and responses).
    mesh_backlog_bytes: Cell<usize>,
    /// The fraction of new requests admitted (see [`Shard::observe_lag`]).
    shedding: Shedding,
    /// Messages handled since the last timer tick (the shedding's sign of real load).
    work: Cell<u32>,
    /// Overload episodes are logged at most once a second.
    overload_log: LogLimiter,
    /// Its own limiters: relayed messages dropped at the mesh's hard bound, and the end of
    /// an overload episode (a flapping shard wrote several a second, on every shard).
    mesh_drop_log: LogLimiter,
    caught_up_log: LogLimiter,
    /// Connections refused by a `[limits]` key are logged at most once a second.
    pub refusal_log: LogLimiter,
    /// Handshake timeouts (an overload symptom: they come in storms) likewise.
    pub timeout_log: LogLimiter,
    /// Requests refused by the identity policy (failed logins come in storms) likewise.
    pub policy_log: LogLimiter,
    /// Refused client handshakes, and refused partner handshakes apart (so a flood of bad
    /// client certificates does not hide a partner whose certificate broke), likewise.
    pub reject_log: [LogLimiter; 2],
    /// Connections closed for what their peer did (slow reader, framing lost, KeyUpdate
    /// flood) likewise: one peer can cause one per connection it opens.
    pub conn_log: LogLimiter,
    /// Partner links that fail to come up (each follows a dial, which the backoff bounds
    /// per partner; the limiter bounds them over many partners) likewise; and, apart (one
    /// must not hide the other), links that come up.
    pub peer_log: LogLimiter,
    /// See `peer_log`.
    pub peer_up_log: LogLimiter,
    /// Read buffers lent to connections only while they have data (idle ones hold none).
    read_pool: RefCell<Vec<Vec<u8>>>,
    /// Bytes all connections hold for incomplete messages.
    partial_total: Cell<usize>,
    /// Bytes all connections hold queued for their sockets.
    queued_total: Cell<usize>,
    /// How peers address each listener (shared by the flows of that listener).
    ifaces: Vec<Rc<Interface>>,
    /// This node's link to the cluster's location store, when clustered.
    cluster: Option<ClusterLink>,
    /// Flows with bindings on this (owner) shard: their address and how many, for the
    /// per-source count (`limits.max_bindings_per_ip`).
    flow_src: RefCell<HashMap<FlowId, (IpAddr, i64)>>,
    /// Connections whose certificates are to be checked again (reload, expiry).
    pub rechecks: crate::recheck::Rechecks,
    /// Client connections that may be anonymous (no certificate AOR), oldest first, with
    /// when they joined: those [`admission::reclaim`] may close while the budget is full.
    /// Entries of closed or known ones are dropped as met, and by the sweep.
    anonymous: RefCell<VecDeque<(Instant, FlowId)>>,
    /// Connections closed to make room and not yet gone (at most
    /// [`admission::MAX_RECLAIMING`]): each still holds its place in the budget until its
    /// task ends, so a burst of newcomers must not close more than that ahead of them.
    reclaiming: RefCell<Vec<FlowId>>,
}

/// The flow a REGISTER from another cluster node is registered under: none of ours (it
/// only removes; nothing is bound to it).
pub const NODE_FLOW: FlowId = u64::MAX;

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).finish()
    }
}

/// The connection number's bits (below the shard's, `id << 48`, and the plain-TCP bit, 47).
const CONN_NUMBER_MASK: u64 = (1 << 47) - 1;

/// Where this life's connection numbers start: at random, not at 1. Flow tokens and nonces
/// name connections; with a kept `auth.secret_file` they verify after a restart, and a
/// token or an `Authorization` of the last life must not name a connection of this one.
fn first_conn_number() -> u64 {
    let mut b = [0u8; 8];
    if rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut b)
        .is_err()
    {
        tracing::warn!("no system randomness: connection numbers start at 1");
        return 1;
    }
    // Room for 2^46 connections before the wrap.
    (u64::from_be_bytes(b) & (CONN_NUMBER_MASK >> 1)).max(1)
}

/// How peers address each `[[listen]]` entry (its advertised host, its port, its transport).
pub fn interfaces(cfg: &Config) -> Vec<Interface> {
    cfg.listen
        .iter()
        .map(|l| Interface {
            host: uri_host(l.advertise.as_deref().unwrap_or(&cfg.server.hostname)),
            port: l.advertise_port.unwrap_or(l.address.port()),
            transport: match l.kind {
                ListenKind::Tcp => Transport::Tcp,
                ListenKind::Tls | ListenKind::Mtls => Transport::Tls,
            },
        })
        .collect()
}

/// A configured host as URIs and Vias write it: an IPv6 address in brackets (RFC 3261
/// §25.1: `2001:db8::1:5061` would read as a host and a port).
fn uri_host(h: &str) -> String {
    match h.parse::<std::net::Ipv6Addr>() {
        Ok(ip) => format!("[{ip}]"),
        Err(_) => h.to_string(),
    }
}

/// The `[[listen]]` entry a connection with this local address came through.
pub fn listener_of(cfg: &Config, local: std::net::SocketAddr) -> Option<usize> {
    cfg.listen.iter().position(|l| {
        l.address.port() == local.port()
            && (l.address.ip() == local.ip() || l.address.ip().is_unspecified())
    })
}

/// Builds the proxy configuration from the config file; `key` signs our flow tokens.
pub fn proxy_config(cfg: &Config, key: NodeKey) -> ProxyConfig {
    let mut local_hosts: Vec<String> = cfg
        .server
        .local_hosts
        .iter()
        .map(|h| uri_host(h).to_ascii_lowercase())
        .collect();
    local_hosts.push(uri_host(&cfg.server.hostname).to_ascii_lowercase());
    for l in &cfg.listen {
        // As URIs and Vias write it: an IPv6 address in brackets (RFC 3261 §25.1).
        local_hosts.push(match l.address.ip() {
            IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        });
        // The host our Via and Record-Route name on this listener is us too.
        if let Some(a) = &l.advertise {
            local_hosts.push(uri_host(a).to_ascii_lowercase());
        }
    }
    let port = cfg
        .listen
        .iter()
        .find(|l| l.kind != ListenKind::Tcp)
        .or(cfg.listen.first())
        .map_or(5061, |l| l.advertise_port.unwrap_or(l.address.port()));
    let ifaces = interfaces(cfg);
    let partner_interface = cfg
        .listen
        .iter()
        .position(|l| l.kind == ListenKind::Mtls)
        .map(|i| ifaces[i].clone());
    ProxyConfig {
        // Ours as peers write them: each listener's own port and the one it is reached by.
        ports: cfg
            .listen
            .iter()
            .flat_map(|l| [l.address.port()].into_iter().chain(l.advertise_port))
            .collect(),
        partner_interface,
        domains: cfg
            .server
            .domains
            .iter()
            .map(|d| crate::config::domain_key(d))
            .collect(),
        local_hosts,
        via_host: uri_host(&cfg.server.hostname),
        via_port: port,
        peers: cfg
            .peer
            .iter()
            .flat_map(|p| {
                p.domains.iter().map(move |d| PeerRoute {
                    domain: crate::config::domain_key(d),
                    peer: p.name.clone(),
                })
            })
            .collect(),
        nodes: cfg
            .peer
            .iter()
            .filter(|p| p.node)
            .map(|p| p.name.clone())
            .collect(),
        supported: vec!["outbound".into(), "path".into()],
        record_route: true,
        key,
    }
}

impl Shard {
    /// A shard with its mesh senders.
    pub fn new(
        id: usize,
        n: usize,
        cfg: Arc<Config>,
        policy: Arc<ArcSwap<TlsPolicy>>,
        control: Arc<Control>,
        mesh: Senders<ShardMsg>,
    ) -> Shard {
        let r = &cfg.registrar;
        let registrar = Registrar::new(RegistrarConfig {
            min_expires: r.min_expires_s,
            max_expires: r.max_expires_s,
            default_expires: r.default_expires_s,
            max_contacts: r.max_contacts,
            max_contact_bytes: r.max_contact_bytes,
        });
        let ifaces = interfaces(&cfg).into_iter().map(Rc::new).collect();
        let mut policy_core = Policy::new(
            crate::auth::policy_config(&cfg),
            control.identity.key.clone(),
            control.identity.epoch,
            Rc::new(crate::auth::Credentials {
                file: control.identity.subscribers.clone(),
                store: control.identity.store_subscribers.clone(),
            }),
        );
        // One source's failed attempts count on every shard it reaches.
        policy_core.share_failures(control.identity.failures.clone());
        let mut proxy = ShardProxy::new(
            Proxy::new(proxy_config(&cfg, control.identity.key.clone())),
            policy_core,
            cfg.sip_limits(),
            TimerConfig::default(),
            id as u16,
            control.identity.epoch,
        );
        proxy.set_max_aors_per_flow(r.max_aors_per_connection);
        proxy.set_shards(n as u16);
        proxy.set_max_transactions(cfg.limits.max_transactions_per_shard);
        proxy.set_max_transactions_per_flow(cfg.limits.max_transactions_per_connection);
        proxy.set_max_transaction_bytes(cfg.limits.max_transaction_bytes_per_shard);
        proxy.set_timer_c(Duration::from_secs(r.timer_c_s));
        proxy.set_max_ring(Duration::from_secs(r.max_ring_s));
        proxy.set_overload_control(cfg.limits.overload_control.trust());
        let remember = r.remember_aors.div_ceil(n.max(1));
        let cluster = control.store.as_ref().map(|s| ClusterLink {
            store: s.handle(),
            reply: Arc::default(),
            replies_started: Cell::new(false),
            waiting: RefCell::new(HashMap::new()),
            removals: RefCell::new(HashMap::new()),
            removal_seq: Cell::new(0),
            removal_retry: RefCell::new(HashMap::new()),
            removal_retry_pruned: Cell::new(Instant::now()),
            removal_bytes: Cell::new(0),
            resync: RefCell::new((0, Vec::new())),
            seen_down: RefCell::new(HashMap::new()),
        });
        Shard {
            id,
            n,
            cfg,
            policy,
            control,
            proxy: RefCell::new(proxy),
            registrar,
            store: RefCell::new({
                let mut s = MemoryStore::default();
                s.track_flows();
                s
            }),
            known: RefCell::new(sipring_core::registrar::KnownAors::new(remember)),
            conns: RefCell::new(HashMap::new()),
            anonymous: RefCell::new(VecDeque::new()),
            reclaiming: RefCell::new(Vec::new()),
            peers: RefCell::new(HashMap::new()),
            retired: RefCell::new(Vec::new()),
            peer_backoff: RefCell::new(HashMap::new()),
            mesh,
            metrics: RefCell::new(ShardMetrics::default()),
            next_conn: Cell::new(first_conn_number()),
            stamps: RefCell::new(HashMap::new()),
            cancels_asked: RefCell::new(HashMap::new()),
            handshakes: Cell::new(0),
            handshakes_by_ip: RefCell::new(HashMap::new()),
            handshake_rate: RefCell::new(HashMap::new()),
            reserve_fd: RefCell::new(std::fs::File::open("/dev/null").ok()),
            closing: Cell::new(0),
            overflow: RefCell::new((0..n).map(|_| Default::default()).collect()),
            mesh_backlog: Cell::new(0),
            mesh_backlog_bytes: Cell::new(0),
            shedding: Shedding::default(),
            work: Cell::new(0),
            overload_log: LogLimiter::default(),
            mesh_drop_log: LogLimiter::default(),
            caught_up_log: LogLimiter::default(),
            refusal_log: LogLimiter::default(),
            timeout_log: LogLimiter::default(),
            policy_log: LogLimiter::default(),
            reject_log: Default::default(),
            conn_log: LogLimiter::default(),
            peer_log: LogLimiter::default(),
            peer_up_log: LogLimiter::default(),
            read_pool: RefCell::new(Vec::new()),
            partial_total: Cell::new(0),
            queued_total: Cell::new(0),
            ifaces,
            cluster,
            flow_src: RefCell::new(HashMap::new()),
            rechecks: Default::default(),
        }
    }

    /// May `ip` start one more TLS handshake now (`limits.max_handshakes_per_ip_per_s`, a
    /// token bucket per source with a burst of twice the rate)? Takes the token when so.
    /// The table is bounded: at 65,536 sources it forgets those whose bucket has refilled.
    pub fn handshake_allowed(&self, ip: IpAddr, now: Instant) -> bool {
        let rate = self.cfg.limits.max_handshakes_per_ip_per_s;
        if rate == 0 {
            return true;
        }
        let (rate, burst) = (rate as f32, 2.0 * rate as f32);
        let mut t = self.handshake_rate.borrow_mut();
        if t.len() >= 65_536 {
            t.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f32() * rate < burst
            });
        }
        let (tokens, at) = t
            .entry(sipring_core::auth::source_of(ip))
            .or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f32() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Handshakes in progress from `ip` on this shard.
    pub fn handshakes_from(&self, ip: IpAddr) -> usize {
        self.handshakes_by_ip
            .borrow()
            .get(&sipring_core::auth::source_of(ip))
            .copied()
            .unwrap_or(0)
    }

    /// Closes the spare descriptor (accept failed with EMFILE).
    pub fn release_reserve_fd(&self) {
        self.reserve_fd.borrow_mut().take();
    }

    /// Opens the spare descriptor again.
    pub fn take_reserve_fd(&self) {
        let mut r = self.reserve_fd.borrow_mut();
        if r.is_none() {
            *r = std::fs::File::open("/dev/null").ok();
        }
    }

    /// A 64 KiB read buffer from the pool.
    pub fn take_read_buf(&self) -> Vec<u8> {
        self.read_pool
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; 64 * 1024])
    }

    /// Returns a read buffer to the pool (a few are kept).
    pub fn give_read_buf(&self, b: Vec<u8>) {
        let mut p = self.read_pool.borrow_mut();
        if p.len() < 64 {
            p.push(b);
        }
    }

    /// A fresh connection id owned by this shard, for a connection of listener kind `kind`
    /// (a plain TCP one carries [`PLAIN_FLOW_BIT`], so any shard can tell it is not TLS).
    pub fn new_conn_id(&self, kind: ListenKind) -> FlowId {
        let c = self.next_conn.get();
        self.next_conn.set(((c + 1) & CONN_NUMBER_MASK).max(1));
        let plain = if kind == ListenKind::Tcp {
            PLAIN_FLOW_BIT
        } else {
            0
        };
        ((self.id as u64) << 48) | c | plain
    }

    /// Counts a metric.
    pub fn count(&self, name: &str) {
        self.metrics.borrow_mut().inc(name, 1);
    }

    /// A framed message arrived on `flow` (whose last byte was read at `t0`).
    pub fn on_message(self: &Rc<Self>, flow: &Flow, bytes: &[u8], t0: Instant) {
        self.work.set(self.work.get().wrapping_add(1));
        let label = message_label(bytes);
        {
            let mut m = self.metrics.borrow_mut();
            m.inc(messages_in_name(label), 1);
        }
        self.proxy.borrow_mut().handle_message(t0, flow, bytes);
        self.pump(Some(Stamp { t0, label }));
    }

    /// Drains the proxy's outputs.
    pub fn pump(self: &Rc<Self>, stamp: Option<Stamp>) {
        loop {
            let out = self.proxy.borrow_mut().poll_output();
            let Some(out) = out else { break };
            match out {
                Output::Send { flow, bytes } => self.send_to(&flow, bytes, stamp),
                Output::Lookup {
                    token,
                    aor,
                    local_only,
                } => {
                    let owner = shard_for(&aor, self.n).0 as usize;
                    if owner == self.id {
                        let r = self.lookup(&aor);
                        // Handed over now, its outputs go out in this loop with this stamp.
                        if let Some(r) = self.via_store(token, &aor, local_only, r, stamp) {
                            self.proxy
                                .borrow_mut()
                                .handle_lookup(Instant::now(), token, r);
                        }
                    } else {
                        self.count("sipring_cross_shard_total{op=\"lookup\"}");
                        if let Some(s) = stamp {
                            self.stamps.borrow_mut().insert(token, s);
                        }
                        let msg = ShardMsg::Lookup {
                            from: self.id,
                            token,
                            aor,
                            local_only,
                        };
                        if !self.mesh_send(owner, msg, true) {
                            self.count("sipring_overload_503_total");
                            self.stamps.borrow_mut().remove(&token);
                            self.proxy.borrow_mut().handle_lookup(
                                Instant::now(),
                                token,
                                Lookup::Unavailable,
                            );
                        }
                    }
                }
                Output::Register {
                    token,
                    aor,
                    request,
                    flow,
                } => {
                    let owner = shard_for(&aor, self.n).0 as usize;
                    // A node's removal-only REGISTER (the policy admits no other from a
                    // peer) binds nothing to its flow.
                    let fid = match flow {
                        Flow::Conn(fid) => fid,
                        Flow::Peer(_) => NODE_FLOW,
                    };
                    let source = self.conns.borrow().get(&fid).map(|h| h.remote.ip());
                    if owner != self.id {
                        // Its binding will live on `owner`: it must hear when this closes.
                        if let Some(h) = self.conns.borrow().get(&fid) {
                            h.involve(owner);
                        }
                    }
                    if owner == self.id {
                        let (reply, hold) = self.register(&aor, &request, fid, source);
                        self.release_places();
                        self.hold_conn(fid, &aor, hold);
                        self.proxy
                            .borrow_mut()
                            .handle_register_reply(Instant::now(), token, reply);
                    } else {
                        self.count("sipring_cross_shard_total{op=\"register\"}");
                        if let Some(s) = stamp {
                            self.stamps.borrow_mut().insert(token, s);
                        }
                        let msg = ShardMsg::Register {
                            from: self.id,
                            token,
                            aor,
                            request: request.to_vec(),
                            flow: fid,
                            source,
                        };
                        if !self.mesh_send(owner, msg, true) {
                            self.count("sipring_overload_503_total");
                            self.stamps.borrow_mut().remove(&token);
                            let reply = Reply {
                                code: 503,
                                reason: "Service Unavailable",
                                headers: vec![(
                                    "Retry-After",
                                    sipring_core::stateful::retry_after_spread(token).to_vec(),
                                )],
                                flow_holds: false,
                            };
                            self.proxy.borrow_mut().handle_register_reply(
                                Instant::now(),
                                token,
                                reply,
                            );
                        }
                    }
                }
                Output::Relay { shard, flow, bytes } => {
                    self.count("sipring_cross_shard_total{op=\"response\"}");
                    let msg = ShardMsg::Response {
                        flow,
                        bytes: bytes.to_vec(),
                    };
                    self.reply(shard as usize, msg);
                }
                Output::Refused(r) => self.refused(&r),
                Output::BindingFailed {
                    aor,
                    flow,
                    contact,
                    path,
                } => {
                    let owner = shard_for(&aor, self.n).0 as usize;
                    if owner == self.id {
                        self.remove_failed_binding(&aor, flow, &contact, &path);
                    } else {
                        // Best effort: lost at the mesh's bound, the binding stays until it
                        // expires or is registered again, as before.
                        let msg = ShardMsg::BindingFailed {
                            aor,
                            conn: flow,
                            contact,
                            path,
                        };
                        self.mesh_send(owner, msg, false);
                    }
                }
                Output::Detour { gone, call_id, to } => {
                    // Best effort (dropped at the mesh's hard bound like a relayed
                    // message): a shard that did not learn it sends to the closed
                    // connection, as before.
                    for shard in (0..self.n).filter(|&s| s != self.id) {
                        let msg = ShardMsg::Detour {
                            gone: gone.clone(),
                            call_id: call_id.to_vec(),
                            to: to.clone(),
                        };
                        self.mesh_send(shard, msg, false);
                    }
                }
                Output::CancelElsewhere {
                    token,
                    partner,
                    request,
                } => {
                    // Every other shard is asked; the CANCEL is answered once all have said.
                    if self.cancels_asked.borrow().len() >= MAX_CANCELS_ASKED {
                        self.count("sipring_queue_drops_total{queue=\"cancel\"}");
                        self.proxy.borrow_mut().handle_cancel_elsewhere(
                            Instant::now(),
                            token,
                            false,
                        );
                        continue;
                    }
                    self.count("sipring_cross_shard_total{op=\"cancel\"}");
                    let request: Arc<[u8]> = request.as_ref().into();
                    let mut asked = 0;
                    for to in (0..self.n).filter(|&to| to != self.id) {
                        let msg = ShardMsg::Cancel {
                            from: self.id,
                            token,
                            partner: partner.clone(),
                            request: request.clone(),
                        };
                        // Not refused for a full channel (it ends a call that rings on),
                        // but dropped at the hard bound like a relayed request: a shard
                        // that was not asked counts as one that had no INVITE.
                        if self.mesh_send(to, msg, false) {
                            asked += 1;
                        }
                    }
                    if asked == 0 {
                        self.proxy.borrow_mut().handle_cancel_elsewhere(
                            Instant::now(),
                            token,
                            false,
                        );
                    } else {
                        self.cancels_asked
                            .borrow_mut()
                            .insert(token, (asked, false));
                    }
                }
                Output::Close { flow, reason } => {
                    self.count(&format!(
                        "sipring_parse_errors_total{{reason=\"{}\"}}",
                        reason.label()
                    ));
                    if let Flow::Conn(id) = flow {
                        if let Some(left_out) = self.conn_log.allow(Instant::now()) {
                            tracing::warn!(conn = id, %reason, left_out, "closing connection: stream framing lost (connection closures: at most one line a second; sipring_parse_errors_total counts all)");
                        }
                        if let Some(c) = self.conns.borrow().get(&id) {
                            c.close("framing_lost");
                        }
                    }
                }
            }
        }
    }

    /// A request refused for who sent it: counted by reason, logged at most once a second.
    fn refused(&self, r: &sipring_core::policy::Refusal) {
        self.count(refusal_name(r.label));
        if let Some(left_out) = self.policy_log.allow(Instant::now()) {
            tracing::warn!(
                source = ?r.source,
                reason = r.label,
                claimed = %crate::tls::verify::printable(&r.detail),
                left_out,
                "SIP request refused (at most one line a second; sipring_sip_refusals_total counts all)"
            );
        }
    }

    /// Sends bytes to a flow: a local connection, another shard's connection, or a partner.
    pub fn send_to(self: &Rc<Self>, flow: &Flow, bytes: Rc<[u8]>, stamp: Option<Stamp>) {
        match flow {
            Flow::Conn(id) => {
                let owner = owner_of(*id);
                // A connection id naming no shard of ours (a route of another life of the
                // node, with more shards) is one that is gone.
                if owner == self.id || owner >= self.n {
                    self.send_local(*id, bytes, stamp);
                } else {
                    self.count("sipring_cross_shard_total{op=\"send\"}");
                    let msg = ShardMsg::Send {
                        from: self.id,
                        conn: *id,
                        bytes: bytes.to_vec(),
                        stamp,
                    };
                    self.mesh_send(owner, msg, false);
                }
            }
            Flow::Peer(name) => {
                // Links exist only for configured partners (the core never routes to others;
                // this keeps the table bounded whatever happens above).
                if !self.cfg.peer.iter().any(|p| p.name == *name) {
                    self.count("sipring_queue_drops_total{queue=\"unknown_partner\"}");
                    return;
                }
                let mut peers = self.peers.borrow_mut();
                let link = peers.entry(name.clone()).or_insert(PeerLink::Idle);
                match link {
                    PeerLink::Up(id, _) => {
                        let id = *id;
                        drop(peers);
                        self.send_local(id, bytes, stamp);
                    }
                    PeerLink::Connecting(q) => {
                        // Bounded in count and bytes while the dial lasts (at most the
                        // connect and handshake timeouts): 1,024 messages of up to
                        // `max_message` each were 64 MiB per partner and shard. And to half
                        // what the link may queue once up (`limits.write_queue_bytes`, as
                        // it counts): the link is handed all of it at once, and 4 MiB
                        // against its 1 MiB closed it as a slow reader the moment it came
                        // up, everything lost, and the dial counted failed.
                        let cost = |b: &[u8]| b.len() + crate::conn::QUEUED_ENTRY_COST;
                        let held: usize = q.iter().map(|(b, _)| cost(b)).sum();
                        let cap = PEER_QUEUE_BYTES.min(self.cfg.limits.write_queue_bytes / 2);
                        if q.len() < 1024 && held + cost(&bytes) <= cap {
                            q.push_back((bytes, stamp));
                        } else {
                            drop(peers);
                            self.count("sipring_queue_drops_total{queue=\"peer\"}");
                            // Its transaction fails now, not 32 s later.
                            self.proxy.borrow_mut().handle_send_dropped(
                                Instant::now(),
                                &Flow::Peer(name.clone()),
                                &bytes,
                            );
                            self.pump(None);
                        }
                    }
                    PeerLink::Idle => {
                        let now = Instant::now();
                        if self
                            .peer_backoff
                            .borrow()
                            .get(name)
                            .is_some_and(|(until, _)| now < *until)
                        {
                            drop(peers);
                            self.count("sipring_queue_drops_total{queue=\"peer_down\"}");
                            self.peer_flow_failed(name);
                            self.pump(None);
                            return;
                        }
                        *link = PeerLink::Connecting(VecDeque::from([(bytes, stamp)]));
                        drop(peers);
                        crate::conn::spawn_peer_connect(self.clone(), name.clone());
                    }
                }
            }
        }
    }

    fn send_local(self: &Rc<Self>, id: FlowId, bytes: Rc<[u8]>, stamp: Option<Stamp>) {
        // Clone the handle out of the table: a write can close the connection, which
        // removes it from the table.
        let conn = self.conns.borrow().get(&id).cloned();
        match conn {
            Some(c) => {
                if c.send(self, &bytes, stamp) == Err(crate::conn::SendError::Closed) {
                    self.count("sipring_queue_drops_total{queue=\"closing\"}");
                }
            }
            None => {
                // Closed before this was sent: what was just started on it fails now (430/480
                // for a dialog route, RFC 5626 §5.3) instead of timing out.
                self.count("sipring_queue_drops_total{queue=\"gone\"}");
                self.flow_closed(id);
            }
        }
    }

    /// A connection finished its handshake and is ready for traffic.
    pub fn conn_opened(&self, handle: ConnHandle) {
        let id = handle.id;
        self.rechecks.opened(&handle);
        // A partner that connected to us is up: dial it again at once. (Not our own dial:
        // whether that worked is for `peer_down` to say, once the link has lasted.)
        if let Some(p) = handle.principal.partner().filter(|_| !handle.outbound) {
            self.peer_backoff.borrow_mut().remove(p);
        }
        self.proxy.borrow_mut().set_flow_info(
            Flow::Conn(id),
            FlowInfo {
                principal: handle.principal.clone(),
                source: Some(handle.remote),
                iface: handle.listener.map(|i| self.ifaces[i].clone()),
            },
        );
        let kind = kind_label(handle.kind);
        let mode = if handle.ktls {
            "kernel"
        } else if handle.kind == ListenKind::Tcp {
            "plain"
        } else {
            "userspace"
        };
        {
            let mut m = self.metrics.borrow_mut();
            m.gauge(&format!("sipring_connections{{kind=\"{kind}\"}}"), 1);
            m.inc(
                &format!("sipring_connections_total{{kind=\"{kind}\",record_layer=\"{mode}\"}}"),
                1,
            );
        }
        let anonymous = !handle.outbound
            && matches!(&handle.principal, Principal::Client { cert_aors } if cert_aors.is_empty());
        if anonymous && self.cfg.limits.anonymous_grace_s > 0 {
            self.anonymous.borrow_mut().push_back((Instant::now(), id));
            let ip = handle.remote.ip();
            self.control.anonymous_per_source.add_n(ip, 1);
            if let Some(site) = sipring_core::auth::wide_of(ip) {
                self.control.anonymous_per_site.add_n(site, 1);
            }
            handle.anonymous_counted.set(true);
        }
        self.conns.borrow_mut().insert(id, handle);
    }

    /// `conn` is no longer anonymous (it registered, authenticated, or closed): out of its
    /// source's count (`limits.max_anonymous_per_ip`).
    pub fn forget_anonymous(&self, conn: &crate::conn::Conn) {
        if conn.anonymous_counted.replace(false) {
            let ip = conn.remote.ip();
            self.control.anonymous_per_source.sub(ip);
            if let Some(site) = sipring_core::auth::wide_of(ip) {
                self.control.anonymous_per_site.sub(site);
            }
        }
    }

    /// A connection is gone: forget it, fail its transactions, drop its bindings — here and
    /// on the shards that hold state on it (no other shard hears of it).
    pub fn conn_closed(self: &Rc<Self>, id: FlowId) {
        let Some(h) = self.conns.borrow_mut().remove(&id) else {
            return;
        };
        self.reclaiming.borrow_mut().retain(|c| *c != id);
        self.forget_anonymous(&h);
        self.metrics.borrow_mut().gauge(
            &format!("sipring_connections{{kind=\"{}\"}}", kind_label(h.kind)),
            -1,
        );
        self.flow_closed(id);
        for s in 0..self.n {
            if s != self.id && h.involves(s) {
                // In order behind what already waits for `s` (a REGISTER on this connection
                // queued in the overflow must not arrive after the news that it closed and
                // leave a binding on a dead connection); never refused for backlog.
                self.mesh_send(s, ShardMsg::FlowClosed { conn: id }, false);
            }
        }
    }

    fn flow_closed(self: &Rc<Self>, id: FlowId) {
        let aors = if self.cluster.is_some() {
            self.store.borrow().flow_aors(id)
        } else {
            Vec::new()
        };
        let removed = self.store.borrow_mut().remove_flow(id);
        let changes = self.store.borrow_mut().take_flow_changes();
        self.account_bindings(changes, None);
        self.release_places();
        for aor in &aors {
            self.write_through(aor);
        }
        if removed > 0 {
            self.metrics
                .borrow_mut()
                .gauge("sipring_bindings", -(removed as i64));
        }
        self.proxy
            .borrow_mut()
            .handle_flow_closed(Instant::now(), &Flow::Conn(id));
        self.pump(None);
    }

    /// An outbound partner link went down (or failed to come up).
    pub fn peer_down(self: &Rc<Self>, name: &str) {
        let prev = self
            .peers
            .borrow_mut()
            .insert(name.to_string(), PeerLink::Idle);
        let now = Instant::now();
        let failed = match prev {
            Some(PeerLink::Connecting(q)) => {
                self.metrics
                    .borrow_mut()
                    .inc("sipring_queue_drops_total{queue=\"peer\"}", q.len() as u64);
                true
            }
            // A link that closed soon after its handshake failed as a dial does: under TLS
            // 1.3 our side is done before the partner has checked our certificate, and
            // its refusal (an expired certificate, a CA it no longer trusts) comes as the
            // first record; a balancer with no backend accepts and closes. Counted as up,
            // each was one dial (and a log line) per request.
            Some(PeerLink::Up(_, since)) if now.duration_since(since) < PEER_PROVEN => true,
            Some(PeerLink::Up(..)) => {
                self.peer_backoff.borrow_mut().remove(name);
                false
            }
            _ => false,
        };
        if failed {
            // The next dial waits: for a partner 1 s, doubling per failure in a row to
            // 30 s; for another node of our cluster a short fixed wait (its liveness key
            // says when it is gone; one that restarted must be reachable soon, not after a
            // backoff grown while it was down — but one whose port refuses, or that is
            // draining, was dialled once per request).
            let node = self.cfg.peer.iter().any(|p| p.name == name && p.node);
            let mut backoff = self.peer_backoff.borrow_mut();
            let failures = backoff.get(name).map_or(0, |b| b.1).saturating_add(1);
            let wait = if node {
                NODE_BACKOFF
            } else {
                PEER_BACKOFF
                    .saturating_mul(1 << (failures - 1).min(5))
                    .min(PEER_BACKOFF_MAX)
            };
            backoff.insert(name.to_string(), (now + wait, failures));
        }
        self.peer_flow_failed(name);
        self.pump(None);
    }

    /// An outbound partner link is up as connection `id`: flush what waited. Its backoff
    /// is forgotten once it has stayed up [`PEER_PROVEN`] (see [`Shard::peer_down`]).
    pub fn peer_up(self: &Rc<Self>, name: &str, id: FlowId) {
        let prev = self
            .peers
            .borrow_mut()
            .insert(name.to_string(), PeerLink::Up(id, Instant::now()));
        if let Some(PeerLink::Connecting(q)) = prev {
            for (b, s) in q {
                self.send_local(id, b, s);
            }
        }
    }

    /// Our link to partner (or node) `name`, connection `id`, has spent its TLS key
    /// (TLS 1.2, or a kernel that cannot rekey, past `tls.ktls_max_records`): new messages
    /// for the partner go over a link dialled now, and this one stays only for the answers
    /// to the requests that went out on it (returned). Before, it closed at once and those
    /// requests failed (503, upstream 500): on a busy partner link, every call being set
    /// up at that moment, every few hours.
    pub fn retire_peer_link(self: &Rc<Self>, name: &str, id: FlowId) {
        let mut peers = self.peers.borrow_mut();
        if matches!(peers.get(name), Some(PeerLink::Up(up, _)) if *up == id) {
            if self.control.stopping() {
                peers.insert(name.to_string(), PeerLink::Idle);
            } else {
                peers.insert(name.to_string(), PeerLink::Connecting(VecDeque::new()));
                drop(peers);
                crate::conn::spawn_peer_connect(self.clone(), name.to_string());
            }
        }
        self.count("sipring_peer_links_retired_total");
        let unanswered = self
            .proxy
            .borrow()
            .unanswered_on(&Flow::Peer(name.to_string()));
        self.retired
            .borrow_mut()
            .push((name.to_string(), id, unanswered));
    }

    /// Does retired link `id` still wait for answers to what went out on it?
    pub fn retired_link_waits(&self, id: FlowId) -> bool {
        let mut retired = self.retired.borrow_mut();
        let Some((_, _, unanswered)) = retired.iter_mut().find(|r| r.1 == id) else {
            return false;
        };
        self.proxy.borrow().retain_unanswered(unanswered);
        !unanswered.is_empty()
    }

    /// A link retired by [`Shard::retire_peer_link`] closed: what went out on it and is
    /// still unanswered fails as on a link that failed; the partner's current link stays.
    pub fn retired_peer_link_closed(self: &Rc<Self>, id: FlowId) {
        let gone = {
            let mut retired = self.retired.borrow_mut();
            let i = retired.iter().position(|r| r.1 == id);
            i.map(|i| retired.swap_remove(i))
        };
        let Some((name, _, unanswered)) = gone.filter(|g| !g.2.is_empty()) else {
            return;
        };
        self.proxy
            .borrow_mut()
            .fail_unanswered(Instant::now(), &Flow::Peer(name), &unanswered);
        self.pump(None);
    }

    /// The partner's link failed: its transactions fail, except those still awaiting their
    /// answers on a link of it retired earlier (they have a link of their own).
    fn peer_flow_failed(self: &Rc<Self>, name: &str) {
        let keep: Vec<sipring_core::matching::TxKey> = self
            .retired
            .borrow()
            .iter()
            .filter(|r| r.0 == name)
            .flat_map(|r| r.2.iter().cloned())
            .collect();
        self.proxy.borrow_mut().handle_flow_closed_keeping(
            Instant::now(),
            &Flow::Peer(name.to_string()),
            &keep,
        );
    }

    /// Is there nothing in flight (transactions, pending lookups)?
    pub fn idle(&self) -> bool {
        self.proxy.borrow().is_idle()
    }
}

/// The wait before dialling a partner again after a failed dial, doubled per failure in a row.
const PEER_BACKOFF: Duration = Duration::from_secs(1);
/// The longest such wait.
const PEER_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The wait before dialling another node of our cluster again after a failed dial.
const NODE_BACKOFF: Duration = Duration::from_millis(200);
/// How long a link must stay up to count as a dial that worked (one closed sooner failed).
const PEER_PROVEN: Duration = Duration::from_secs(5);

/// The bytes that may wait for a partner (or node) link being dialled, per shard.
pub const PEER_QUEUE_BYTES: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use sipring_core::proxy::Proxy;
    use sipring_core::uri::Uri;

    #[test]
    fn every_host_our_vias_and_record_routes_name_is_us() {
        // A listener advertised under its own name (not `server.hostname`): its Via and
        // Record-Route name that host, so responses and in-dialog requests naming it are
        // ours. Before, they were dropped (responses) and refused 403 (Routes). An IPv6
        // listener is us as URIs write it, in brackets.
        let cfg = Config::parse(
            "[server]\nhostname = \"sip.example.com\"\ndomains = [\"example.com\"]\n\
             [[listen]]\nkind = \"tls\"\naddress = \"127.0.0.1:5061\"\n\
             [[listen]]\nkind = \"tls\"\naddress = \"127.0.0.1:5062\"\nadvertise = \"Edge.example.net\"\n\
             [[listen]]\nkind = \"tls\"\naddress = \"[2001:db8::1]:5063\"\n",
        )
        .unwrap();
        let p = Proxy::new(proxy_config(&cfg, NodeKey::new([1; 32])));
        for us in [
            "sip:sip.example.com:5061",
            "sip:edge.example.net:5062",
            "sip:edge.example.net",
            "sip:[2001:db8::1]:5063",
            "sip:example.com",
        ] {
            assert!(p.is_self_uri(&Uri::parse(us.as_bytes()).unwrap()), "{us}");
        }
        // An IPv6 hostname written bare in the file is bracketed in what we send.
        let v6 = Config::parse(
            "[server]\nhostname = \"2001:db8::7\"\n[[listen]]\nkind = \"tls\"\naddress = \"[::]:5061\"\n",
        )
        .unwrap();
        assert_eq!(interfaces(&v6)[0].host, "[2001:db8::7]");
        let p6 = Proxy::new(proxy_config(&v6, NodeKey::new([1; 32])));
        assert!(p6.is_self_uri(&Uri::parse(b"sip:[2001:db8::7]:5061").unwrap()));
        for them in ["sip:other.example.net:5062", "sip:edge.example.net:5099"] {
            assert!(
                !p.is_self_uri(&Uri::parse(them.as_bytes()).unwrap()),
                "{them}"
            );
        }
        // Behind a port mapping (a container's `-p 443:5061`, a load balancer): our Via and
        // Record-Route name the port peers reach, and a Route naming it is ours. Before, the
        // inner port went out (in-dialog requests never arrived) and a phone's preloaded
        // Route to the public port was refused 403.
        let mapped = Config::parse(
            "[server]\nhostname = \"sip.example.com\"\ndomains = [\"example.com\"]\n\
             [[listen]]\nkind = \"tls\"\naddress = \"0.0.0.0:5061\"\nadvertise_port = 443\n",
        )
        .unwrap();
        assert_eq!(interfaces(&mapped)[0].port, 443);
        let pm = Proxy::new(proxy_config(&mapped, NodeKey::new([1; 32])));
        assert_eq!(pm.default_interface().port, 443);
        for us in ["sip:sip.example.com:443;lr", "sip:sip.example.com:5061"] {
            assert!(pm.is_self_uri(&Uri::parse(us.as_bytes()).unwrap()), "{us}");
        }
    }
}
