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
use sipring_core::policy::{FlowInfo, Policy};
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
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Messages between shards.
#[derive(Debug)]
pub enum ShardMsg {
    /// Look up an AOR on its owner.
    Lookup {
        /// Who asks.
        from: usize,
        /// Correlation.
        token: u64,
        /// The AOR.
        aor: String,
        /// Asked by another cluster node: a miss is final.
        local_only: bool,
    },
    /// The answer.
    LookupReply {
        /// Correlation.
        token: u64,
        /// The AOR.
        aor: String,
        /// As asked.
        local_only: bool,
        /// The bindings.
        result: Lookup,
    },
    /// Run the registrar on the AOR's owner.
    Register {
        /// Who asks.
        from: usize,
        /// Correlation.
        token: u64,
        /// The AOR.
        aor: String,
        /// The REGISTER.
        request: Vec<u8>,
        /// The connection it arrived on.
        flow: FlowId,
        /// That connection's address (for `limits.max_bindings_per_ip`).
        source: Option<IpAddr>,
    },
    /// The registrar's reply.
    RegisterReply {
        /// Correlation.
        token: u64,
        /// Reply.
        reply: Reply,
        /// The AOR.
        aor: String,
        /// The connection the REGISTER arrived on.
        flow: FlowId,
        /// Until when its bindings of the AOR last, if it holds any.
        hold: Option<Instant>,
    },
    /// Write bytes to a connection this shard owns.
    Send {
        /// The sending shard (it now holds state on the connection: it hears of its close).
        from: usize,
        /// The connection.
        conn: FlowId,
        /// One whole message.
        bytes: Vec<u8>,
        /// Latency stamp.
        stamp: Option<Stamp>,
    },
    /// A response for a client transaction this shard owns, received elsewhere.
    Response {
        /// The flow it arrived on.
        flow: Flow,
        /// The response.
        bytes: Vec<u8>,
    },
    /// Serve this accepted connection here (balanced accept mode).
    Adopt {
        /// The socket.
        fd: HandedFd,
        /// Listener kind.
        kind: ListenKind,
        /// Optional client auth on that listener.
        client_auth: ClientAuth,
    },
    /// A connection of this shard no longer holds a binding of `aor` (expired, or removed
    /// by a REGISTER from elsewhere): its place for the AOR and its hold are given back.
    Released {
        /// The connection.
        conn: FlowId,
        /// The AOR.
        aor: String,
    },
    /// A connection closed: drop its bindings and fail its transactions.
    FlowClosed {
        /// The connection.
        conn: FlowId,
    },
    /// A partner's CANCEL that names no INVITE on the shard it arrived on: cancel its
    /// INVITE if it is here ([`ShardProxy::cancel_from_elsewhere`]).
    Cancel {
        /// Who asks.
        from: usize,
        /// Correlation.
        token: u64,
        /// The partner that sent it.
        partner: String,
        /// The CANCEL.
        request: Vec<u8>,
    },
    /// The answer: whether the INVITE was here.
    CancelReply {
        /// Correlation.
        token: u64,
        /// It was (and is cancelled).
        matched: bool,
    },
}

/// A live connection, as the shard sees it (shared with its task).
pub type ConnHandle = Rc<crate::conn::Conn>;

/// An accepted connection's place in the shard's limits (its source address's count and the
/// shard's load for balanced accept), held by its task from admission to its end, whatever
/// the outcome (refused handshake, error, close) — released on drop.
#[derive(Debug)]
pub struct Admission {
    shard: Rc<Shard>,
    ip: Option<IpAddr>,
}

impl Admission {
    /// Counts a connection from `ip` against the limits: its source's process-wide count
    /// (`None` when that is full: taken and checked in one step, as every shard admits at
    /// once), the shard's load and the process budget.
    pub fn take(shard: &Rc<Shard>, ip: Option<IpAddr>) -> Option<Admission> {
        if let Some(ip) = ip
            && !shard
                .control
                .per_source
                .try_add(ip, shard.cfg.limits.max_connections_per_ip)
        {
            return None;
        }
        shard.control.load[shard.id].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Admission {
            shard: shard.clone(),
            ip,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            self.shard.control.per_source.sub(ip);
        }
        self.shard.control.load[self.shard.id].fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A TLS handshake in progress: counted per shard and per source address from its start to
/// its end, whatever the outcome (released on drop).
#[derive(Debug)]
pub struct HandshakeSlot {
    shard: Rc<Shard>,
    ip: Option<IpAddr>,
}

impl HandshakeSlot {
    /// A handshake from `ip` starts.
    pub fn take(shard: &Rc<Shard>, ip: Option<IpAddr>) -> HandshakeSlot {
        let ip = ip.map(sipring_core::auth::source_of);
        shard.handshakes.set(shard.handshakes.get() + 1);
        if let Some(ip) = ip {
            *shard.handshakes_by_ip.borrow_mut().entry(ip).or_insert(0) += 1;
        }
        HandshakeSlot {
            shard: shard.clone(),
            ip,
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let s = &self.shard;
        s.handshakes.set(s.handshakes.get().saturating_sub(1));
        if let Some(ip) = self.ip {
            let mut by_ip = s.handshakes_by_ip.borrow_mut();
            if let Some(n) = by_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by_ip.remove(&ip);
                }
            }
        }
    }
}

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
}

/// A shard's side of the location store: its handle, the channel answers come back on, and
/// the lookups waiting for one (with what the local tables said).
struct ClusterLink {
    store: crate::cluster::Store,
    reply: Arc<crate::lanes::Replies<crate::cluster::Found>>,
    /// Whether the reply task has been started (once).
    replies_started: Cell<bool>,
    waiting: RefCell<HashMap<u64, (Lookup, Option<Stamp>)>>,
    /// REGISTERs answered here whose removals go to the other nodes holding their AOR, by
    /// the token of the store read that names those nodes ([`REMOVAL_TOKEN`] set).
    removals: RefCell<HashMap<u64, (String, Vec<u8>)>>,
    /// The last removal token's number.
    removal_seq: Cell<u64>,
    /// AORs whose removal could not be asked for (the store's queue was full): their next
    /// REGISTER asks again, even a refresh. Bounded like `removals`.
    removal_retry: RefCell<HashSet<String>>,
    /// The bytes of the REGISTERs held in `removals` (bounded by [`MAX_REMOVAL_BYTES`]).
    removal_bytes: Cell<usize>,
    /// The store's resync generation this shard has answered, and the AORs it still has to
    /// write again for it (a few thousand per tick, so a large table does not flood the
    /// write queue).
    resync: RefCell<(u64, Vec<String>)>,
}

/// AORs a shard writes again per tick (every 500 ms) after the store lost its data.
const RESYNC_PER_TICK: usize = 2000;

/// The bit that marks a store read's token as a removal's (the core's tokens carry a shard
/// number below 2^15 in bits 48..63).
const REMOVAL_TOKEN: u64 = 1 << 63;

/// REGISTERs whose removals wait for the store to name the nodes holding their AOR, per
/// shard; past it the removal is not sent (counted): the bindings elsewhere then expire.
const MAX_REMOVALS_WAITING: usize = 4096;

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
            port: l.address.port(),
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
        .map_or(5061, |l| l.address.port());
    let ifaces = interfaces(cfg);
    let partner_interface = cfg
        .listen
        .iter()
        .position(|l| l.kind == ListenKind::Mtls)
        .map(|i| ifaces[i].clone());
    ProxyConfig {
        ports: cfg.listen.iter().map(|l| l.address.port()).collect(),
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
        proxy.set_overload_control(cfg.limits.overload_control.trust());
        let remember = r.remember_aors.div_ceil(n.max(1));
        let cluster = control.store.as_ref().map(|s| ClusterLink {
            store: s.handle(),
            reply: Arc::default(),
            replies_started: Cell::new(false),
            waiting: RefCell::new(HashMap::new()),
            removals: RefCell::new(HashMap::new()),
            removal_seq: Cell::new(0),
            removal_retry: RefCell::new(HashSet::new()),
            removal_bytes: Cell::new(0),
            resync: RefCell::new((0, Vec::new())),
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
            peers: RefCell::new(HashMap::new()),
            peer_backoff: RefCell::new(HashMap::new()),
            mesh,
            metrics: RefCell::new(ShardMetrics::default()),
            next_conn: Cell::new(first_conn_number()),
            stamps: RefCell::new(HashMap::new()),
            cancels_asked: RefCell::new(HashMap::new()),
            handshakes: Cell::new(0),
            handshakes_by_ip: RefCell::new(HashMap::new()),
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
                    let mut asked = 0;
                    for to in (0..self.n).filter(|&to| to != self.id) {
                        let msg = ShardMsg::Cancel {
                            from: self.id,
                            token,
                            partner: partner.clone(),
                            request: request.to_vec(),
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
                        // `max_message` each were 64 MiB per partner and shard.
                        let held: usize = q.iter().map(|(b, _)| b.len()).sum();
                        if q.len() < 1024 && held + bytes.len() <= PEER_QUEUE_BYTES {
                            q.push_back((bytes, stamp));
                        } else {
                            drop(peers);
                            self.count("sipring_queue_drops_total{queue=\"peer\"}");
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
                            self.proxy
                                .borrow_mut()
                                .handle_flow_closed(now, &Flow::Peer(name.clone()));
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
        self.conns.borrow_mut().insert(id, handle);
    }

    /// A connection is gone: forget it, fail its transactions, drop its bindings — here and
    /// on the shards that hold state on it (no other shard hears of it).
    pub fn conn_closed(self: &Rc<Self>, id: FlowId) {
        let Some(h) = self.conns.borrow_mut().remove(&id) else {
            return;
        };
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
        self.proxy
            .borrow_mut()
            .handle_flow_closed(Instant::now(), &Flow::Peer(name.to_string()));
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

    /// A lookup's local answer. A miss, in a cluster, asks the location store which other
    /// nodes hold the AOR (unless the request came from a node: one hop, no loops); the
    /// store's answer finishes it in [`Shard::on_store_reply`] and this returns `None`.
    /// Otherwise: the result to hand the proxy now.
    fn via_store(
        &self,
        token: u64,
        aor: &str,
        local_only: bool,
        result: Lookup,
        stamp: Option<Stamp>,
    ) -> Option<Lookup> {
        let miss = matches!(result, Lookup::NotRegistered | Lookup::Unknown);
        match &self.cluster {
            Some(c) if miss && !local_only => {
                if c.store.lookup(aor, token, &c.reply) {
                    self.count("sipring_store_total{op=\"lookup\",result=\"asked\"}");
                    c.waiting.borrow_mut().insert(token, (result, stamp));
                    return None;
                }
                self.count("sipring_store_total{op=\"lookup\",result=\"queue_full\"}");
                Some(Lookup::Unavailable)
            }
            _ => Some(result),
        }
    }

    /// Asks the store which other nodes hold `aor`, to send them what the REGISTER
    /// `request` (answered 200 here) removes ([`Shard::on_store_reply`] sends it).
    fn remove_elsewhere(&self, aor: &str, request: &[u8]) {
        let Some(c) = &self.cluster else { return };
        let full = || {
            self.count("sipring_store_total{op=\"removal\",result=\"queue_full\"}");
            let mut retry = c.removal_retry.borrow_mut();
            if retry.len() < MAX_REMOVALS_WAITING {
                retry.insert(aor.to_string());
            }
        };
        if c.removals.borrow().len() >= MAX_REMOVALS_WAITING
            || c.removal_bytes.get() + request.len() > MAX_REMOVAL_BYTES
        {
            return full();
        }
        c.removal_seq.set(c.removal_seq.get() + 1);
        let token = REMOVAL_TOKEN | c.removal_seq.get();
        if c.store.lookup(aor, token, &c.reply) {
            c.removals
                .borrow_mut()
                .insert(token, (aor.to_string(), request.to_vec()));
            c.removal_bytes.set(c.removal_bytes.get() + request.len());
            self.count("sipring_store_total{op=\"removal\",result=\"asked\"}");
        } else {
            full();
        }
    }

    /// The location store's answer to a lookup this shard asked.
    pub fn on_store_reply(self: &Rc<Self>, found: crate::cluster::Found) {
        let Some(c) = &self.cluster else { return };
        let removal = c.removals.borrow_mut().remove(&found.token);
        if let Some((aor, request)) = removal {
            c.removal_bytes
                .set(c.removal_bytes.get().saturating_sub(request.len()));
            let Some(nodes) = found.nodes else {
                // The store could not say who holds it (a failover, a timeout, liveness not
                // read yet): asked again at the AOR's next REGISTER here, as when the queue
                // was full — dropped, the old node kept the device's stale binding.
                self.count("sipring_store_total{op=\"removal\",result=\"error\"}");
                let mut retry = c.removal_retry.borrow_mut();
                if retry.len() < MAX_REMOVALS_WAITING {
                    retry.insert(aor);
                }
                return;
            };
            let now = Instant::now();
            let mut sent = 0;
            for node in &nodes {
                sent += u64::from(self.proxy.borrow_mut().send_removals(now, node, &request));
            }
            self.metrics
                .borrow_mut()
                .inc("sipring_store_total{op=\"removal\",result=\"sent\"}", sent);
            self.pump(None);
            return;
        }
        let Some((miss, stamp)) = c.waiting.borrow_mut().remove(&found.token) else {
            return;
        };
        let (label, result) = match found.nodes {
            Some(n) if !n.is_empty() => ("found", Lookup::Nodes(n)),
            // Bindings of a dead node: the user exists and cannot be reached now.
            Some(_) if found.known => ("miss", Lookup::NotRegistered),
            Some(_) => ("miss", miss),
            None => ("error", Lookup::Unavailable),
        };
        self.count(match label {
            "found" => "sipring_store_total{op=\"lookup\",result=\"found\"}",
            "miss" => "sipring_store_total{op=\"lookup\",result=\"miss\"}",
            _ => "sipring_store_total{op=\"lookup\",result=\"error\"}",
        });
        self.proxy
            .borrow_mut()
            .handle_lookup(Instant::now(), found.token, result);
        self.pump(stamp);
    }

    /// Writes this node's bindings of `aor` through to the location store (its owner shard
    /// calls this after every change).
    fn write_through(&self, aor: &str) -> bool {
        let Some(c) = &self.cluster else { return true };
        let now = Instant::now();
        let now_ms = crate::cluster::unix_ms();
        let store = self.store.borrow();
        let list: Vec<_> = store
            .get(aor)
            .iter()
            .filter(|b| b.expires_at > now)
            .map(|b| {
                (
                    now_ms + (b.expires_at - now).as_millis() as u64,
                    b.flow,
                    b.instance.as_deref().unwrap_or(""),
                    b.reg_id,
                    b.contact.as_str(),
                )
            })
            .collect();
        let field = c.store.value(&list);
        drop(store);
        if c.store.write(aor, field) {
            self.count("sipring_store_total{op=\"write\",result=\"queued\"}");
            true
        } else {
            self.count("sipring_store_total{op=\"write\",result=\"queue_full\"}");
            false
        }
    }

    /// After the location store lost this node's data (its generation moved): writes every
    /// AOR this shard holds again, [`RESYNC_PER_TICK`] per call.
    fn resync_store(&self) {
        let Some(c) = &self.cluster else { return };
        let generation = c.store.resync_generation();
        let batch: Vec<String> = {
            let mut r = c.resync.borrow_mut();
            if r.0 != generation {
                r.0 = generation;
                r.1 = self.store.borrow().aors().map(str::to_string).collect();
            }
            let keep = r.1.len().saturating_sub(RESYNC_PER_TICK);
            r.1.split_off(keep)
        };
        // What the queue could not take (every shard resyncs at once) waits for the next
        // tick: dropped, the AOR stayed out of the store until its phone's next refresh.
        let left: Vec<String> = batch
            .into_iter()
            .filter(|aor| !self.write_through(aor))
            .collect();
        if !left.is_empty() {
            c.resync.borrow_mut().1.extend(left);
        }
    }

    /// Registrar lookup on this (owner) shard.
    fn lookup(&self, aor: &str) -> Lookup {
        debug_assert_eq!(
            shard_for(aor, self.n).0 as usize,
            self.id,
            "lookup reached the wrong shard"
        );
        let store = self.store.borrow();
        let b = self.registrar.reaches(Instant::now(), &*store, aor);
        if !b.is_empty() {
            Lookup::Found(b)
        } else if self.known.borrow().contains(aor) {
            Lookup::NotRegistered
        } else {
            Lookup::Unknown
        }
    }

    /// Runs the registrar on this (owner) shard. A REGISTER that would take its source
    /// address past `limits.max_bindings_per_ip` (all shards together) is undone and
    /// answered 403.
    /// A binding over connection `flow` lasts until `hold`: the idle sweep keeps the
    /// connection that long (RFC 5923: the registration is the reason it stays open; a
    /// phone without keepalives refreshes only when its registration runs out).
    fn hold_conn(&self, flow: FlowId, aor: &str, hold: Option<Instant>) {
        if let Some(c) = self.conns.borrow().get(&flow) {
            c.hold(aor, hold);
        }
    }

    /// Runs the registrar for `aor` on its owner (this shard); also returns until when the
    /// AOR's bindings over `flow` last, if it has any.
    fn register(
        &self,
        aor: &str,
        request: &[u8],
        flow: FlowId,
        source: Option<IpAddr>,
    ) -> (Reply, Option<Instant>) {
        let reply = self.run_registrar(aor, request, flow, source);
        let hold = self
            .store
            .borrow()
            .get(aor)
            .iter()
            .filter(|b| b.flow == flow)
            .map(|b| b.expires_at)
            .max();
        (reply, hold)
    }

    fn run_registrar(
        &self,
        aor: &str,
        request: &[u8],
        flow: FlowId,
        source: Option<IpAddr>,
    ) -> Reply {
        debug_assert_eq!(
            shard_for(aor, self.n).0 as usize,
            self.id,
            "REGISTER reached the wrong shard"
        );
        let limits = self.cfg.sip_limits();
        let mut h = [Header::EMPTY; 64];
        let Ok(Status::Complete(m)) = parse(request, &mut h, &limits, Framing::Stream) else {
            return Reply {
                code: 400,
                reason: "Bad Request",
                headers: Vec::new(),
                flow_holds: false,
            };
        };
        let Ok(e) = m.validate(&limits) else {
            return Reply {
                code: 400,
                reason: "Bad Request",
                headers: Vec::new(),
                flow_holds: false,
            };
        };
        let limit = self.cfg.limits.max_bindings_per_ip;
        let mut store = self.store.borrow_mut();
        let snapshot = (limit > 0 && source.is_some()).then(|| store.get(aor).to_vec());
        let before = store.bindings();
        let reply = self
            .registrar
            .handle_register(Instant::now(), &m, &e, aor, flow, &mut *store);
        let changes = store.take_flow_changes();
        if let (Some(ip), Some(snapshot)) = (source, snapshot) {
            let added: i64 = changes
                .iter()
                .filter(|(f, _)| {
                    *f == flow || self.flow_src.borrow().get(f).is_some_and(|s| s.0 == ip)
                })
                .map(|(_, d)| d)
                .sum();
            let have = self.control.bindings_per_source.get(ip) as i64;
            if added > 0 && have + added > limit as i64 {
                store.put(aor, snapshot);
                let _ = store.take_flow_changes();
                // Undone: what it released holds again (and the flow's own place follows
                // the 403 below).
                let _ = store.take_released();
                drop(store);
                self.refused(&sipring_core::policy::Refusal {
                    label: "register_bindings_per_ip",
                    detail: format!(
                        "{aor}: {have} bindings from {ip} (limits.max_bindings_per_ip {limit})"
                    ),
                    source: Some(ip),
                });
                self.metrics.borrow_mut().inc(register_name(403), 1);
                return Reply {
                    code: 403,
                    reason: "Too Many Bindings From This Address",
                    headers: Vec::new(),
                    flow_holds: false,
                };
            }
        }
        let after = store.bindings();
        drop(store);
        // A binding new here (not a refresh of one this node holds): the device may have
        // moved from another node.
        let bound_here = changes.iter().any(|&(_, d)| d > 0);
        self.account_bindings(changes, source.map(|ip| (flow, ip)));
        let mut reply = reply;
        if reply.code == 200 {
            self.known.borrow_mut().insert(aor);
            self.write_through(aor);
            // RFC 3261 §10.3 step 8: a Date, which phones without NTP set their clocks by.
            reply.headers.push((
                "Date",
                httpdate::fmt_http_date(std::time::SystemTime::now()).into_bytes(),
            ));
            // A UA's REGISTER (not another node's) that removes bindings, or binds an
            // instance here anew: what other nodes hold of it goes too. A refresh of a
            // binding this node already holds asks nothing (the store read is what the
            // fan-out costs: one per refresh of every phone, before); the move that put
            // the binding here already removed it elsewhere.
            let retry = |c: &ClusterLink| c.removal_retry.borrow_mut().remove(aor);
            if flow != NODE_FLOW
                && self.cluster.as_ref().is_some_and(|c| {
                    retry(c) || bound_here || sipring_core::registrar::removes_any(&m)
                })
                && sipring_core::registrar::removals_for_nodes(&m).is_some()
            {
                self.remove_elsewhere(aor, request);
            }
        }
        let mut m = self.metrics.borrow_mut();
        m.gauge("sipring_bindings", after as i64 - before as i64);
        m.inc(register_name(reply.code), 1);
        reply
    }

    /// Tells the shards of the connections that no longer hold a binding of an AOR (the
    /// registrar's [`MemoryStore::take_released`]) to give back their place for it, before
    /// any answer to a later REGISTER of theirs (the mesh keeps order between two shards).
    fn release_places(self: &Rc<Self>) {
        let released = self.store.borrow_mut().take_released();
        for (conn, aor) in released {
            if conn == NODE_FLOW {
                continue;
            }
            let owner = owner_of(conn);
            if owner == self.id || owner >= self.n {
                self.release_place(conn, &aor);
            } else {
                let aor = aor.to_string();
                self.mesh_send(owner, ShardMsg::Released { conn, aor }, false);
            }
        }
    }

    /// One of this shard's connections no longer holds a binding of `aor`.
    fn release_place(&self, conn: FlowId, aor: &str) {
        self.hold_conn(conn, aor, None);
        self.proxy.borrow_mut().release_aor(&Flow::Conn(conn), aor);
    }

    /// Applies the registrar's per-flow changes to the per-source binding counts (shared by
    /// every shard); `new_flow` names the address of a flow this shard may not know yet.
    fn account_bindings(&self, changes: Vec<(FlowId, i64)>, new_flow: Option<(FlowId, IpAddr)>) {
        let mut src = self.flow_src.borrow_mut();
        for (f, d) in changes {
            let ip = match (src.get(&f), new_flow) {
                (Some((ip, _)), _) => *ip,
                (None, Some((nf, ip))) if nf == f => ip,
                // A flow without an address (none for a partner's): not counted.
                _ => continue,
            };
            let e = src.entry(f).or_insert((ip, 0));
            e.1 += d;
            if e.1 <= 0 {
                src.remove(&f);
            }
            self.control.bindings_per_source.add_n(ip, d);
        }
    }

    /// A message from another shard.
    pub fn on_mesh(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Lookup {
                from,
                token,
                aor,
                local_only,
            } => {
                let result = self.lookup(&aor);
                self.reply(
                    from,
                    ShardMsg::LookupReply {
                        token,
                        aor,
                        local_only,
                        result,
                    },
                );
            }
            ShardMsg::LookupReply {
                token,
                aor,
                local_only,
                result,
            } => {
                let stamp = self.stamps.borrow_mut().remove(&token);
                if let Some(r) = self.via_store(token, &aor, local_only, result, stamp) {
                    self.proxy
                        .borrow_mut()
                        .handle_lookup(Instant::now(), token, r);
                    self.pump(stamp);
                }
            }
            ShardMsg::Register {
                from,
                token,
                aor,
                request,
                flow,
                source,
            } => {
                let (reply, hold) = self.register(&aor, &request, flow, source);
                self.release_places();
                self.reply(
                    from,
                    ShardMsg::RegisterReply {
                        token,
                        reply,
                        aor,
                        flow,
                        hold,
                    },
                );
            }
            ShardMsg::RegisterReply {
                token,
                reply,
                aor,
                flow,
                hold,
            } => {
                self.hold_conn(flow, &aor, hold);
                let stamp = self.stamps.borrow_mut().remove(&token);
                self.proxy
                    .borrow_mut()
                    .handle_register_reply(Instant::now(), token, reply);
                self.pump(stamp);
            }
            ShardMsg::Send {
                from,
                conn,
                bytes,
                stamp,
            } => {
                debug_assert_eq!(owner_of(conn), self.id, "Send reached the wrong shard");
                let handle = self.conns.borrow().get(&conn).cloned();
                match handle {
                    Some(h) => {
                        h.involve(from);
                        self.send_local(conn, bytes.into(), stamp);
                    }
                    None => {
                        // Closed before the sender heard: tell it, so its transactions
                        // on the connection fail now instead of timing out.
                        self.count("sipring_queue_drops_total{queue=\"gone\"}");
                        self.reply(from, ShardMsg::FlowClosed { conn });
                    }
                }
            }
            ShardMsg::Response { flow, bytes } => {
                self.proxy
                    .borrow_mut()
                    .handle_message(Instant::now(), &flow, &bytes);
                self.pump(Some(Stamp {
                    t0: Instant::now(),
                    label: "response",
                }));
            }
            ShardMsg::Adopt {
                fd,
                kind,
                client_auth,
            } => {
                // Out of the pending count first: `admit` counts it as a connection.
                if let Some(fd) = fd.take() {
                    admit(self, crate::sys::sock::from_owned_fd(fd), kind, client_auth);
                }
            }
            ShardMsg::FlowClosed { conn } => self.flow_closed(conn),
            ShardMsg::Released { conn, aor } => self.release_place(conn, &aor),
            ShardMsg::Cancel {
                from,
                token,
                partner,
                request,
            } => {
                let matched = self.proxy.borrow_mut().cancel_from_elsewhere(
                    Instant::now(),
                    &partner,
                    &request,
                );
                self.pump(None);
                self.reply(from, ShardMsg::CancelReply { token, matched });
            }
            ShardMsg::CancelReply { token, matched } => {
                let done = {
                    let mut asked = self.cancels_asked.borrow_mut();
                    let Some(entry) = asked.get_mut(&token) else {
                        return;
                    };
                    entry.0 -= 1;
                    entry.1 |= matched;
                    let done = (entry.0 == 0).then_some(entry.1);
                    if done.is_some() {
                        asked.remove(&token);
                    }
                    done
                };
                if let Some(matched) = done {
                    self.proxy
                        .borrow_mut()
                        .handle_cancel_elsewhere(Instant::now(), token, matched);
                    self.pump(None);
                }
            }
        }
    }

    /// Sends an accepted connection to shard `to` (balanced accept mode).
    pub fn adopt_elsewhere(
        self: &Rc<Self>,
        to: usize,
        fd: std::os::fd::OwnedFd,
        kind: ListenKind,
        client_auth: ClientAuth,
    ) {
        let fd = HandedFd::new(&self.control, to, fd);
        self.reply(
            to,
            ShardMsg::Adopt {
                fd,
                kind,
                client_auth,
            },
        );
    }

    /// Sends what finishes admitted work (replies, relayed responses, closes): never
    /// refused for a full channel.
    fn reply(self: &Rc<Self>, to: usize, msg: ShardMsg) {
        self.mesh_send(to, msg, false);
    }

    /// Sends on the mesh. A full channel does not refuse: the message waits in shard `to`'s
    /// overflow queue, in order behind any already waiting there (one task per destination
    /// drains it as room frees up; while it runs, every newer message queues), so bursts past `server.mesh_capacity` are absorbed and a
    /// connection's messages are never reordered. The waiting ones are the
    /// `sipring_mesh_backlog` gauge: past 2× `mesh_capacity` of them the shard sheds new
    /// requests ([`Shard::observe_lag`]); with `new_work`, past [`MESH_OVERFLOW`]× (at least
    /// [`MESH_OVERFLOW_MIN`]) it refuses
    /// (false: the caller answers 503), as it does when the destination is gone.
    fn mesh_send(self: &Rc<Self>, to: usize, msg: ShardMsg, new_work: bool) -> bool {
        if to >= self.n {
            // No such shard: what names one is forged or stale (its callers checked; this
            // keeps the table index safe whatever happens above).
            return false;
        }
        let cap = self.cfg.server.mesh_capacity;
        let mut overflow = self.overflow.borrow_mut();
        let waiting = &mut overflow[to];
        let msg = if waiting.draining {
            msg
        } else {
            match self.mesh.try_send_to(to, msg) {
                Ok(()) => return true,
                Err(e) => match channel_full(e) {
                    Some(m) => m,
                    None => return false,
                },
            }
        };
        if new_work
            && self.mesh_backlog.get() >= cap.saturating_mul(MESH_OVERFLOW).max(MESH_OVERFLOW_MIN)
        {
            return false;
        }
        // Past MESH_HARD× the new-work bound, what a peer can make us relay without limit
        // (bytes for another shard's connection, responses relayed by their branch — forged
        // ones included —, adopted sockets) is dropped rather than queued: the backlog is
        // memory. Provisional responses and sockets go first; final responses and requests
        // (a CANCEL, a BYE: losing one leaves a call ringing or up) only past twice that.
        // Replies and closes are never dropped (they end state the other shard holds), and
        // are bounded by the work admitted and the connections.
        let hard = cap
            .saturating_mul(MESH_OVERFLOW)
            .max(MESH_OVERFLOW_MIN)
            .saturating_mul(MESH_HARD);
        let provisional = |b: &[u8]| b.starts_with(b"SIP/2.0 1");
        let bound = match &msg {
            ShardMsg::Adopt { .. } => Some(hard),
            ShardMsg::Cancel { .. } => Some(hard.saturating_mul(2)),
            ShardMsg::Send { bytes, .. } | ShardMsg::Response { bytes, .. } => {
                Some(if provisional(bytes) {
                    hard
                } else {
                    hard.saturating_mul(2)
                })
            }
            _ => None,
        };
        // And by bytes: messages of up to `max_message` each (a peer's forged responses
        // among them) made the count bound a memory bound of gigabytes.
        let weight = mesh_weight(&msg);
        let byte_bound = if bound == Some(hard) {
            MESH_BACKLOG_BYTES / 2
        } else {
            MESH_BACKLOG_BYTES
        };
        // Only relayed sends and responses are dropped for bytes (a REGISTER or a CANCEL
        // waits for its answer: bounded by count); all of them count toward the total.
        let over_bytes = matches!(msg, ShardMsg::Send { .. } | ShardMsg::Response { .. })
            && self.mesh_backlog_bytes.get() + weight > byte_bound;
        if over_bytes || bound.is_some_and(|b| self.mesh_backlog.get() >= b) {
            drop(overflow);
            self.count("sipring_queue_drops_total{queue=\"mesh\"}");
            if let Some(left_out) = self.mesh_drop_log.allow(Instant::now()) {
                tracing::warn!(
                    to,
                    backlog = self.mesh_backlog.get(),
                    backlog_bytes = self.mesh_backlog_bytes.get(),
                    left_out,
                    "mesh backlog at its hard bound: dropping a relayed message (at most one \
                     line a second; sipring_queue_drops_total{{queue=\"mesh\"}} counts all)"
                );
            }
            return false;
        }
        waiting.queue.push_back(msg);
        self.mesh_backlog.set(self.mesh_backlog.get() + 1);
        self.mesh_backlog_bytes
            .set(self.mesh_backlog_bytes.get() + weight);
        if !waiting.draining {
            waiting.draining = true;
            drop(overflow);
            let me = self.clone();
            glommio::spawn_local(async move {
                // Until the queue is empty, newer messages to `to` queue behind it (even the
                // one being sent has left the queue) instead of overtaking.
                loop {
                    let next = me.overflow.borrow_mut()[to].queue.pop_front();
                    let Some(msg) = next else { break };
                    let w = mesh_weight(&msg);
                    let sent = me.mesh.send_to(to, msg).await;
                    me.mesh_backlog.set(me.mesh_backlog.get() - 1);
                    me.mesh_backlog_bytes.set(me.mesh_backlog_bytes.get() - w);
                    if sent.is_err() {
                        // The destination is gone (shutdown): what waits for it goes too.
                        let dropped = std::mem::take(&mut me.overflow.borrow_mut()[to].queue);
                        me.mesh_backlog.set(me.mesh_backlog.get() - dropped.len());
                        let w: usize = dropped.iter().map(mesh_weight).sum();
                        me.mesh_backlog_bytes.set(me.mesh_backlog_bytes.get() - w);
                        break;
                    }
                }
                me.overflow.borrow_mut()[to].draining = false;
            })
            .detach();
        }
        true
    }

    /// The timer loop woke `late` after it asked to: the loop's lag, which is how long work
    /// waits here before it is looked at. Admission of new requests follows it and the mesh
    /// backlog ([`crate::overload::Shedding`]): what is admitted is kept near the lag target
    /// instead of everything queueing behind an all-or-nothing switch. Each tick's lag goes
    /// to the `loop_lag` latency histogram.
    pub fn observe_lag(&self, late: Duration) {
        if self.control.draining() {
            self.proxy.borrow_mut().set_draining();
        }
        let sample = late.as_micros().min(u128::from(u32::MAX)) as u64;
        self.metrics.borrow_mut().record("loop_lag", sample);
        let backlog = self.mesh_backlog.get();
        let limits = &self.cfg.limits;
        // Clients doing overload control (RFC 7339) drop their share before sending: where
        // they bring most of the load, steer finely (`overload::Tick::fine_limit_us`).
        let oc_on = limits.overload_control != crate::config::OverloadControl::Off;
        let door = self.proxy.borrow_mut().take_door_counts();
        let Some((was, next)) = self.shedding.observe(Tick {
            lag_us: sample,
            limit_us: limits.overload_lag_ms * 1000,
            backlog,
            mesh_capacity: self.cfg.server.mesh_capacity,
            fine_limit_us: oc_on.then(|| limits.overload_control_lag_ms.max(1) * 1000),
            door,
            work: self.work.replace(0),
        }) else {
            return;
        };
        self.proxy.borrow_mut().set_admission(next);
        if was >= 1.0 {
            self.count("sipring_overload_episodes_total");
            if let Some(left_out) = self.overload_log.allow(Instant::now()) {
                tracing::warn!(
                    shard = self.id,
                    lag_ms = sample as f64 / 1000.0,
                    mesh_backlog = backlog,
                    left_out,
                    "shard overloaded: part of new requests get 503 with Retry-After until it catches up"
                );
            }
        } else if next >= 1.0
            && let Some(left_out) = self.caught_up_log.allow(Instant::now())
        {
            tracing::info!(
                shard = self.id,
                left_out,
                "shard caught up: admitting every new request again"
            );
        }
    }

    /// Fires transaction timers, expires bindings, publishes metrics.
    pub fn tick(self: &Rc<Self>, now: Instant, publish: bool) {
        self.proxy.borrow_mut().handle_timeout(now);
        self.pump(None);
        crate::recheck::tick(self, publish, now);
        if publish {
            self.resync_store();
            self.sweep_idle(now);
            let purged = self.store.borrow_mut().purge(now);
            let changes = self.store.borrow_mut().take_flow_changes();
            self.account_bindings(changes, None);
            self.release_places();
            let mut m = self.metrics.borrow_mut();
            if purged > 0 {
                m.gauge("sipring_bindings", -(purged as i64));
            }
            let (servers, clients, pending) = self.proxy.borrow().load();
            m.set_gauge("sipring_transactions{role=\"server\"}", servers as i64);
            m.set_gauge("sipring_transactions{role=\"client\"}", clients as i64);
            m.set_gauge("sipring_pending_lookups", pending as i64);
            m.set_gauge(
                "sipring_requests_in_progress",
                self.proxy.borrow().in_progress() as i64,
            );
            m.set_gauge("sipring_registered_aors", self.store.borrow().len() as i64);
            m.set_gauge("sipring_handshakes_in_flight", self.handshakes.get() as i64);
            m.set_gauge("sipring_partial_bytes", self.partial_total.get() as i64);
            m.set_gauge("sipring_write_queue_bytes", self.queued_total.get() as i64);
            // The failure ledger is the process's: shard 0 reports it (the gauges are summed).
            if self.id == 0 {
                let sources = self.proxy.borrow().policy().failure_sources(now);
                m.set_gauge("sipring_auth_failure_sources", sources as i64);
            }
            let nonce_flows = self.proxy.borrow().policy().nonce_flows();
            m.set_gauge("sipring_auth_nonce_flows", nonce_flows as i64);
            let st = self.proxy.borrow().stats();
            m.counters
                .insert("sipring_requests_forwarded_total".into(), st.forwarded);
            m.counters.insert(
                "sipring_responses_dropped_total".into(),
                st.dropped_responses,
            );
            m.counters
                .insert("sipring_requests_rejected_total".into(), st.rejected);
            m.counters
                .insert("sipring_requests_dropped_total".into(), st.dropped_requests);
            m.counters
                .insert("sipring_local_responses_total".into(), st.local_responses);
            m.counters
                .insert("sipring_auth_challenges_total".into(), st.challenges);
            m.counters
                .insert("sipring_overload_shed_total".into(), st.shed);
            m.counters
                .insert("sipring_drain_refused_total".into(), st.drained);
            m.counters
                .insert("sipring_overload_feedback_total".into(), st.oc_feedback);
            m.counters.insert(
                "sipring_overload_partner_dropped_total".into(),
                st.oc_dropped,
            );
            m.counters
                .insert("sipring_flow_failovers_total".into(), st.flow_failovers);
            m.counters
                .insert("sipring_dialog_rebinds_total".into(), st.dialog_rebinds);
            m.counters.insert(
                "sipring_unanswered_lookups_total".into(),
                st.unanswered_lookups,
            );
            m.set_gauge(
                "sipring_overloaded",
                i64::from(self.shedding.admitted() < 1.0),
            );
            m.set_gauge("sipring_mesh_backlog", self.mesh_backlog.get() as i64);
            let snap = Snapshot {
                shard: self.id,
                metrics: m.clone(),
            };
            drop(m);
            self.control.snapshots[self.id].store(Arc::new(snap));
        }
    }

    /// Closes connections that received nothing for `limits.idle_timeout_s` (half-open
    /// peers) and hold no binding that still lasts: one pass over the table every
    /// publication tick instead of a timer per connection.
    fn sweep_idle(&self, now: Instant) {
        let idle = Duration::from_secs(self.cfg.limits.idle_timeout_s);
        let partial = Duration::from_millis(self.cfg.limits.partial_timeout_ms);
        let mut idle_out = Vec::new();
        let mut slow = Vec::new();
        for c in self.conns.borrow().values().filter(|c| c.is_open()) {
            if c.partial_since()
                .is_some_and(|t| now.saturating_duration_since(t) >= partial)
            {
                slow.push(c.clone());
            } else if now.saturating_duration_since(c.last_rx()) >= idle
                && c.held_until().is_none_or(|t| now >= t)
            {
                idle_out.push(c.clone());
            }
        }
        for c in idle_out {
            tracing::debug!(conn = c.id, remote = %c.remote, "idle timeout");
            self.count("sipring_idle_timeouts_total");
            c.close("idle_timeout");
        }
        for c in slow {
            // A message (or TLS record) that does not complete in time: a trickle, or a
            // peer that stalled mid-message. Nothing is answered for a message never whole.
            self.count("sipring_partial_timeouts_total");
            if let Some(left_out) = self.refusal_log.allow(now) {
                tracing::warn!(
                    conn = c.id,
                    remote = %c.remote,
                    held = c.partial_len(),
                    left_out,
                    "message incomplete after limits.partial_timeout_ms: closing (at most one \
                     line a second; sipring_partial_timeouts_total counts all)"
                );
            }
            c.drop_now("partial_timeout");
        }
    }

    /// A connection's bytes held for an incomplete message went from `before` to `after`.
    pub fn partial_changed(&self, before: usize, after: usize) {
        self.partial_total
            .set(self.partial_total.get().saturating_sub(before) + after);
    }

    /// Past `limits.partial_bytes_per_shard`, drops the connection holding the most.
    pub fn enforce_partial_budget(&self) {
        let budget = self.cfg.limits.partial_bytes_per_shard;
        while self.partial_total.get() > budget {
            let victim = self
                .conns
                .borrow()
                .values()
                .filter(|c| c.is_open() && c.partial_len() > 0)
                .max_by_key(|c| c.partial_len())
                .cloned();
            let Some(c) = victim else { break };
            self.count("sipring_partial_budget_drops_total");
            if let Some(left_out) = self.refusal_log.allow(Instant::now()) {
                tracing::warn!(
                    conn = c.id,
                    remote = %c.remote,
                    held = c.partial_len(),
                    total = self.partial_total.get(),
                    budget,
                    left_out,
                    "incomplete messages past limits.partial_bytes_per_shard: dropping the \
                     largest holder"
                );
            }
            // Its bytes leave the total when its task ends; do not pick it twice.
            let held = c.partial_len();
            self.partial_total
                .set(self.partial_total.get().saturating_sub(held));
            c.drop_now("partial_budget");
            c.forget_partial();
        }
    }

    /// A connection's queued output went from `before` to `after` bytes; past
    /// `limits.write_queue_bytes_per_shard` the connection holding the most is dropped.
    pub fn queue_changed(&self, before: usize, after: usize) {
        self.queued_total
            .set(self.queued_total.get().saturating_sub(before) + after);
        if after <= before {
            return;
        }
        let budget = self.cfg.limits.write_queue_bytes_per_shard;
        while self.queued_total.get() > budget {
            // Clients before partner links: a peer must not make itself look smaller than a
            // busy carrier link to have the link dropped instead of itself.
            let victim = self
                .conns
                .borrow()
                .values()
                .filter(|c| c.is_open() && c.queued() > 0)
                .max_by_key(|c| (c.principal.partner().is_none(), c.queued()))
                .cloned();
            let Some(c) = victim else { break };
            self.count("sipring_queue_drops_total{queue=\"shard_budget\"}");
            if let Some(left_out) = self.conn_log.allow(Instant::now()) {
                tracing::warn!(
                    conn = c.id,
                    remote = %c.remote,
                    queued = c.queued(),
                    total = self.queued_total.get(),
                    budget,
                    left_out,
                    "queued output past limits.write_queue_bytes_per_shard: dropping the \
                     connection holding the most (at most one line a second)"
                );
            }
            // Its bytes leave the total now; its close does not count them again.
            self.queued_total
                .set(self.queued_total.get().saturating_sub(c.queued()));
            c.forget_queued();
            c.drop_now("write_budget");
        }
    }

    /// Is there nothing in flight (transactions, pending lookups)?
    pub fn idle(&self) -> bool {
        self.proxy.borrow().is_idle()
    }
}

/// A socket handed to another shard (balanced accept mode): counted in that shard's load
/// from the hand-off, not only once it admits it. Before, sockets waiting on the mesh
/// counted nowhere: a burst passed the process's descriptor budget (EMFILE broke partner
/// dials and reloads), and every one went to the same shard, the least loaded until it
/// caught up.
#[derive(Debug)]
pub struct HandedFd {
    fd: Option<std::os::fd::OwnedFd>,
    control: Arc<Control>,
    to: usize,
}

impl HandedFd {
    fn new(control: &Arc<Control>, to: usize, fd: std::os::fd::OwnedFd) -> HandedFd {
        control.load[to].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HandedFd {
            fd: Some(fd),
            control: control.clone(),
            to,
        }
    }

    /// The socket, no longer counted as pending.
    fn take(mut self) -> Option<std::os::fd::OwnedFd> {
        self.fd.take()
    }
}

impl Drop for HandedFd {
    fn drop(&mut self) {
        // Taken or dropped with its message (the mesh refused it), the count goes back.
        self.control.load[self.to].fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Applies the connection limits and serves the connection on this shard.
pub fn admit(
    shard: &Rc<Shard>,
    stream: glommio::net::TcpStream,
    kind: ListenKind,
    client_auth: ClientAuth,
) {
    let limits = &shard.cfg.limits;
    let ip = stream.peer_addr().map(|a| a.ip()).ok();
    let total = shard.conns.borrow().len() + shard.handshakes.get();
    let control = &shard.control;
    let process_total: usize = control
        .load
        .iter()
        .map(|l| l.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let handshakes_from = ip.map_or(0, |ip| shard.handshakes_from(ip));
    let refuse = if process_total >= control.budget {
        Some("max_connections")
    } else if total >= limits.max_connections_per_shard {
        Some("max_connections_per_shard")
    } else if kind != ListenKind::Tcp && shard.handshakes.get() >= limits.max_handshakes_in_flight {
        Some("max_handshakes_in_flight")
    } else if kind != ListenKind::Tcp && handshakes_from >= limits.max_handshakes_per_ip {
        Some("max_handshakes_per_ip")
    } else {
        None
    };
    // The per-source limit last: its check takes the place.
    let admission = match refuse {
        Some(why) => Err(why),
        None => Admission::take(shard, ip).ok_or("max_connections_per_ip"),
    };
    let admission = match admission {
        Ok(a) => a,
        Err(why) => {
            refused(shard, ip, why);
            return;
        }
    };
    // The handshake counts from now: its task may not run before the next accepts are
    // admitted, and they must see it (before, a burst of accepts passed both handshake
    // limits, none having started yet).
    let slot = (kind != ListenKind::Tcp).then(|| HandshakeSlot::take(shard, ip));
    glommio::spawn_local(crate::conn::serve_inbound(
        shard.clone(),
        stream,
        kind,
        client_auth,
        admission,
        slot,
    ))
    .detach();
}

/// Counts and (at most once a second) logs a connection refused by limit `why`.
fn refused(shard: &Shard, ip: Option<IpAddr>, why: &str) {
    shard.count(&format!(
        "sipring_connections_refused_total{{limit=\"{why}\"}}"
    ));
    if let Some(left_out) = shard.refusal_log.allow(Instant::now()) {
        tracing::warn!(
            ?ip,
            limit = why,
            left_out,
            "connection refused by limit (at most one line a second; \
             sipring_connections_refused_total counts all)"
        );
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

/// Mesh messages for one shard that found its channel full, oldest first.
#[derive(Default)]
struct Overflow {
    queue: VecDeque<ShardMsg>,
    /// A task is moving them into the channel: newer messages queue behind.
    draining: bool,
}

/// The message back from a full channel (`None` for a closed one).
fn channel_full<T>(e: glommio::GlommioError<T>) -> Option<T> {
    match e {
        glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m)) => Some(m),
        _ => None,
    }
}

/// Feeds the location store's answers to the shard (a no-op when not clustered).
pub fn spawn_store_replies(shard: &Rc<Shard>) {
    let Some(c) = shard
        .cluster
        .as_ref()
        .filter(|c| !c.replies_started.replace(true))
    else {
        return;
    };
    let rx = c.reply.clone();
    let s = shard.clone();
    // Runs as long as the shard's executor: the store thread holds its end until it stops.
    glommio::spawn_local(async move {
        let mut n = 0u32;
        loop {
            let f = std::future::poll_fn(|cx| rx.poll_pop(cx)).await;
            s.on_store_reply(f);
            n = take_turns(n).await;
        }
    })
    .detach();
}

/// Messages a receiver handles in a row before it gives the shard back: a channel that
/// never runs dry (a peer shard refilling it from its overflow queue, a busy trunk's
/// relayed answers) returns at once from every `recv`, and glommio would run this task —
/// no reads, no timers, no other receiver of the shard — until it did (as a connection's
/// task yields after 16 events in a row).
const MESH_IN_A_ROW: u32 = 64;

/// Counts one message handled; every [`MESH_IN_A_ROW`], yields.
async fn take_turns(n: u32) -> u32 {
    if n + 1 < MESH_IN_A_ROW {
        return n + 1;
    }
    futures_lite::future::yield_now().await;
    0
}

/// Runs the mesh receivers of a shard (one task per peer shard).
pub fn spawn_mesh_receivers(shard: &Rc<Shard>, mut rx: Receivers<ShardMsg>) {
    for (_, stream) in rx.streams() {
        let s = shard.clone();
        glommio::spawn_local(async move {
            let mut n = 0u32;
            while let Some(msg) = stream.recv().await {
                s.on_mesh(msg);
                n = take_turns(n).await;
            }
        })
        .detach();
    }
}

/// New work is refused (503) once this many times `server.mesh_capacity` messages wait in a
/// shard's overflow queues (and at least [`MESH_OVERFLOW_MIN`]).
pub const MESH_OVERFLOW: usize = 4;

/// The bytes of relayed SIP a shard's mesh backlog may hold (provisional responses half of
/// it): past it they are dropped like those past [`MESH_HARD`].
pub const MESH_BACKLOG_BYTES: usize = 64 << 20;

/// The bytes a mesh message holds that a peer chose: relayed sends and responses.
fn mesh_weight(msg: &ShardMsg) -> usize {
    match msg {
        ShardMsg::Send { bytes, .. } | ShardMsg::Response { bytes, .. } => bytes.len(),
        // A REGISTER relayed to its AOR's shard, or a partner's CANCEL asked of every other
        // shard, carries a whole request too (up to `limits.max_message` each).
        ShardMsg::Register { request, .. } | ShardMsg::Cancel { request, .. } => request.len(),
        _ => 0,
    }
}

/// How many times the new-work bound the backlog may reach before relayed messages are
/// dropped ([`Shard::mesh_send`]).
pub const MESH_HARD: usize = 16;

/// The least backlog that refuses new work, whatever `server.mesh_capacity`: with small
/// channels a single client's pipelined burst (a few hundred messages) must wait, not be
/// refused; the memory it bounds stays small (about a megabyte per destination).
pub const MESH_OVERFLOW_MIN: usize = 1024;

/// The bytes of REGISTERs a shard may hold waiting for the store to say which other nodes
/// their removals go to (besides [`MAX_REMOVALS_WAITING`] of them): 4,096 of up to
/// `limits.max_message` each were 256 MiB. Past it the AOR's next REGISTER asks again.
pub const MAX_REMOVAL_BYTES: usize = 16 << 20;

/// The bytes that may wait for a partner (or node) link being dialled, per shard.
pub const PEER_QUEUE_BYTES: usize = 4 << 20;

/// Partner CANCELs a shard may have out asking the other shards for their INVITE; past
/// it one is answered 481 at once (`sipring_queue_drops_total{queue="cancel"}`).
pub const MAX_CANCELS_ASKED: usize = 1024;

/// The timer loop's period.
const TICK: Duration = Duration::from_millis(10);

/// The shard's timer loop: transaction timers (10 ms granularity), binding expiry and
/// metrics publication (every 500 ms). Returns when the shard must stop.
pub async fn timer_loop(shard: Rc<Shard>) {
    let mut last_publish = Instant::now();
    loop {
        let asked = Instant::now() + TICK;
        glommio::timer::sleep(TICK).await;
        let now = Instant::now();
        shard.observe_lag(now.saturating_duration_since(asked));
        let publish = now.duration_since(last_publish) >= Duration::from_millis(500);
        if publish {
            last_publish = now;
        }
        shard.tick(now, publish);
        if shard.control.stopping() {
            shard.tick(now, true);
            return;
        }
    }
}

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
    }
}
