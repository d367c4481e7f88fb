//! The cluster's location service: bindings written through to Redis Cluster, looked up
//! there when this node has none, and the other nodes' liveness (docs/CLUSTER.md).
//!
//! The Redis client (the `redis` crate's cluster-async client: slot routing, MOVED/ASK and
//! failover are its job) runs on tokio, so it lives on **one store thread per node** with a
//! current-thread runtime. Shards never block on it, nor take a lock to reach it: they push
//! writes and lookups onto two bounded lock-free lanes (lookups cannot crowd writes out), and
//! lookups come back on each shard's own lock-free reply queue, which a glommio task awaits
//! ([`crate::lanes`]). The thread keeps the newest value per AOR until the
//! store has it (retried while the store fails), and when its heartbeat finds this node's
//! liveness key gone (the store lost data) the shards write all their bindings again.
//!
//! The store holds, per AOR, one hash `b:{<aor>}` with one field per node that has bindings
//! for it. The field's value is that node's bindings for the AOR, written whole on every
//! change (REGISTER, flow close) by the shard that owns the AOR:
//!
//! ```text
//! <node epoch> <latest expiry, unix ms>\n
//! <expiry, unix ms>\t<flow>\t<instance>\t<reg-id>\t<contact>\n   (one line per binding)
//! ```
//!
//! The key's TTL is the latest expiry of any node's bindings. Each node refreshes
//! `n:<node>` = its epoch (random per start) with a TTL of `liveness_ms`; a field is used
//! only while its node's key holds the field's epoch, so the bindings of a dead node stop
//! being routed to within `liveness_ms` + `heartbeat_ms`, and those of a node's previous
//! life at once.

use crate::config::ClusterConfig;
use crate::lanes::{LaneEnd, LaneTx, Replies, lane};
use redis::cluster_async::ClusterConnection;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Lookups waiting for the store thread, all shards together; past it a lookup is answered
/// 503. Writes have a queue of their own of this size, so lookups never crowd them out.
pub const STORE_QUEUE: usize = 16_384;

/// Lookups the store thread has at the store at once (each bounded by the store timeout
/// and its retries); the rest wait in the queue. Writes have as many again.
pub const STORE_IN_FLIGHT: usize = 1024;

/// How long a write that failed waits before it is tried again; doubled per failure in a
/// row (a store refusing every write — no memory, bad credentials — is not hammered), up to
/// [`WRITE_RETRY_MAX`].
const WRITE_RETRY: Duration = Duration::from_millis(500);
const WRITE_RETRY_MAX: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The store key of an AOR's bindings (the AOR is the hash tag: one slot per AOR).
pub fn aor_key(aor: &str) -> String {
    format!("b:{{{aor}}}")
}

/// The liveness key of a node.
pub fn node_key(node: &str) -> String {
    format!("n:{node}")
}

/// A lookup's answer, on the asking shard's reply channel.
#[derive(Debug)]
pub struct Found {
    /// The shard's correlation token.
    pub token: u64,
    /// Live nodes (not this one) holding bindings for the AOR; `None`: the store failed or
    /// timed out.
    pub nodes: Option<Vec<String>>,
    /// The store has bindings for the AOR, live or not (a dead node's, until their TTL):
    /// the user exists and is unreachable (480), not unknown (404).
    pub known: bool,
}

/// This node's field of an AOR as it should be: its value and the latest expiry of its
/// bindings (unix ms), or `None` (no bindings: remove the field).
type Field = Option<(String, u64)>;

/// A shard's write: replace this node's field of `aor`.
#[derive(Debug)]
struct Write {
    aor: String,
    field: Field,
}

/// A shard's question: which live nodes hold bindings for `aor`?
#[derive(Debug)]
struct Ask {
    aor: String,
    token: u64,
    reply: Arc<Replies<Found>>,
    /// When it was queued: past the store timeout it is answered "store failed" unasked.
    at: Instant,
}

/// A shard's handle on the store thread (cheap to clone; `Send`).
#[derive(Debug, Clone)]
pub struct Store {
    writes: LaneTx<Write>,
    asks: LaneTx<Ask>,
    resync: Arc<AtomicU64>,
    down: Arc<NodesDown>,
    /// This node's name.
    pub node: Rc<str>,
    /// This node's epoch (this process's life).
    pub epoch: u64,
}

/// The bit that marks a store read's token as a removal's (the core's tokens carry a shard
/// number below 2^15 in bits 48..63): one must reach every node that holds the AOR.
pub const REMOVAL_TOKEN: u64 = 1 << 63;

/// Per other node, how many times it was found down ([`Store::down_generations`]).
#[derive(Debug, Default)]
pub struct NodesDown(Vec<(String, AtomicU64, AtomicBool)>);

impl NodesDown {
    fn of(cfg: &ClusterConfig) -> NodesDown {
        NodesDown(
            cfg.nodes
                .iter()
                .filter(|n| n.name != cfg.node)
                .map(|n| (n.name.clone(), AtomicU64::new(0), AtomicBool::new(false)))
                .collect(),
        )
    }

    /// Found down: the generation moves, and the node is down now.
    fn went_down(&self, node: &str) {
        if let Some((_, g, d)) = self.0.iter().find(|(n, ..)| n == node) {
            d.store(true, Ordering::Relaxed);
            g.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Found alive again: a shard that had not yet acted on its going down leaves its
    /// link alone.
    fn came_up(&self, node: &str) {
        if let Some((_, _, d)) = self.0.iter().find(|(n, ..)| n == node) {
            d.store(false, Ordering::Relaxed);
        }
    }
}

/// What the other nodes' liveness keys said, read by read (the heartbeat's), and what each
/// read changes ([`Liveness::on_read`]).
#[derive(Debug, Default)]
struct Liveness {
    /// The nodes alive, with their epoch.
    alive: HashMap<String, u64>,
    /// The other nodes whose liveness key was read at least once (present or not), with
    /// the last successful read's instant. Until every one was — for at most `liveness_ms`
    /// after the store connected — `alive` says nothing: a lookup found no holder where it
    /// had not looked.
    read: HashMap<String, Instant>,
    /// Nodes alive (or already unknown) whose last read failed (their key's master down,
    /// the store unreachable): whether they live is unknown, not "no". Past their liveness
    /// they leave `alive`, and a lookup whose AOR one of them may hold is answered as a
    /// store error ([`holders_unsure`]). A node already dead does not become unknown for
    /// a failed read: its stale fields are not routed to either way.
    unknown: HashSet<String>,
    /// Nodes read absent (their key expired or deleted): dead until read alive again.
    dead: HashSet<String>,
}

/// What one liveness read changed.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Alive with a new epoch (up, or restarted).
    Up(u64),
    /// Read absent; `known`: it was alive or unknown before (else it was never seen, or
    /// already dead). Its links are to be closed.
    Down { known: bool },
    /// Unread past its liveness: no longer counted alive.
    Unknown,
    /// Nothing that matters.
    Same,
}

impl Liveness {
    fn on_read(
        &mut self,
        node: &str,
        r: Result<Option<u64>, ()>,
        now: Instant,
        liveness: Duration,
    ) -> Seen {
        match r {
            Ok(found) => {
                self.read.insert(node.to_string(), now);
                let was_unknown = self.unknown.remove(node);
                match found {
                    Some(epoch) => {
                        self.dead.remove(node);
                        if self.alive.insert(node.to_string(), epoch) == Some(epoch) {
                            Seen::Same
                        } else {
                            Seen::Up(epoch)
                        }
                    }
                    None => {
                        let was_alive = self.alive.remove(node).is_some();
                        // Once per death, whether it was seen going (alive) or not (its key
                        // unreadable meanwhile: a hung host whose Redis master failed over).
                        if self.dead.insert(node.to_string()) {
                            Seen::Down {
                                known: was_alive || was_unknown,
                            }
                        } else {
                            Seen::Same
                        }
                    }
                }
            }
            Err(()) => {
                if self.alive.contains_key(node) {
                    self.unknown.insert(node.to_string());
                }
                let stale = self
                    .read
                    .get(node)
                    .is_none_or(|t| now.saturating_duration_since(*t) > liveness);
                if stale && self.alive.remove(node).is_some() {
                    Seen::Unknown
                } else {
                    Seen::Same
                }
            }
        }
    }
}

/// The `Send` half that creates per-shard [`Store`] handles.
#[derive(Debug, Clone)]
pub struct StoreSender {
    writes: LaneTx<Write>,
    asks: LaneTx<Ask>,
    resync: Arc<AtomicU64>,
    down: Arc<NodesDown>,
    node: String,
    epoch: u64,
    name_taken: Arc<AtomicBool>,
    stop: Arc<OnceLock<String>>,
    withdraw: async_channel::Sender<std::sync::mpsc::SyncSender<bool>>,
}

impl StoreSender {
    /// Stops the heartbeat and deletes this node's liveness key (if this life holds it):
    /// the other nodes stop routing here at their next read, not a liveness period later
    /// (they answered 480 for this node's users meanwhile). Waits up to `wait`; true when
    /// the store confirmed.
    pub fn withdraw(&self, wait: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.withdraw.try_send(tx).is_ok() && rx.recv_timeout(wait).unwrap_or(false)
    }

    /// Another live process holds this node's name in the store (a copied configuration,
    /// or an old process still running): this one must not run as that node — its writes
    /// and its start-up sweep would erase the other's bindings. The process stops.
    pub fn name_taken(&self) -> bool {
        self.name_taken.load(Ordering::Relaxed)
    }

    /// Why the store thread stopped on its own, if it did: the node would go on outside
    /// its cluster (every miss answered 503, no binding written, no heartbeat, so the other
    /// nodes count it dead), so the process stops.
    pub fn stopped(&self) -> Option<&str> {
        self.stop.get().map(String::as_str)
    }

    /// A handle for one shard.
    pub fn handle(&self) -> Store {
        Store {
            writes: self.writes.clone(),
            asks: self.asks.clone(),
            resync: self.resync.clone(),
            down: self.down.clone(),
            node: self.node.as_str().into(),
            epoch: self.epoch,
        }
    }
}

impl Store {
    /// Queues a write of this node's bindings for `aor` (`None`: it has none left; else the
    /// value and the latest expiry, from [`Store::value`]). The store thread keeps the
    /// newest value per AOR until the store has it, retrying while it fails. False when the
    /// queue is full (the caller counts it).
    pub fn write(&self, aor: &str, field: Option<(String, u64)>) -> bool {
        self.writes.try_send(Write {
            aor: aor.to_string(),
            field,
        })
    }

    /// Asks which live nodes hold `aor`; the answer comes on `reply` with `token`. False
    /// when the queue is full.
    pub fn lookup(&self, aor: &str, token: u64, reply: &Arc<Replies<Found>>) -> bool {
        self.asks.try_send(Ask {
            aor: aor.to_string(),
            token,
            reply: reply.clone(),
            at: Instant::now(),
        })
    }

    /// Bumped when the store lost what this node wrote (its liveness key was gone: a store
    /// restarted empty, a failover that lost writes, or this node stalled past its
    /// liveness): every shard then writes all its bindings again.
    pub fn resync_generation(&self) -> u64 {
        self.resync.load(Ordering::Relaxed)
    }

    /// Each other node's down generation: it moves each time the node is found down (its
    /// liveness key expired; not a key the store could not read). A shard whose link to the node
    /// is up then closes it: a node whose host froze or was cut off sends no RST, and the
    /// link stayed usable until TCP gave up, every request over it waiting for its 408.
    /// With whether it is down now: one found alive again since keeps its link.
    pub fn down_generations(&self) -> impl Iterator<Item = (&str, u64, bool)> {
        self.down.0.iter().map(|(n, g, d)| {
            (
                n.as_str(),
                g.load(Ordering::Relaxed),
                d.load(Ordering::Relaxed),
            )
        })
    }

    /// The store value for this node's bindings of an AOR: `(expiry unix ms, flow,
    /// instance, reg-id, contact)` each; `None` when there are none left.
    pub fn value(&self, bindings: &[(u64, u64, &str, Option<u32>, &str)]) -> Option<(String, u64)> {
        let latest = bindings.iter().map(|b| b.0).max()?;
        let mut v = format!("{} {latest}\n", self.epoch);
        for (exp, flow, inst, reg, contact) in bindings {
            let reg = reg.map_or(String::new(), |r| r.to_string());
            // Tabs and newlines cannot occur in a parsed header value.
            v.push_str(&format!("{exp}\t{flow:x}\t{inst}\t{reg}\t{contact}\n"));
        }
        Some((v, latest))
    }
}

/// The header line of a stored value: (epoch, latest expiry in unix ms).
pub fn parse_value(v: &str) -> Option<(u64, u64)> {
    let line = v.lines().next()?;
    let (e, x) = line.split_once(' ')?;
    Some((e.parse().ok()?, x.parse().ok()?))
}

/// The nodes whose fields of an AOR may be routed to: alive with the same epoch, bindings
/// not all expired, and not `me` (this node's own bindings are in its tables).
pub fn live_holders(
    fields: &[(String, String)],
    alive: &HashMap<String, u64>,
    me: &str,
    now_ms: u64,
) -> Vec<String> {
    fields
        .iter()
        .filter(|(node, v)| {
            node != me
                && parse_value(v).is_some_and(|(epoch, latest)| {
                    latest > now_ms && alive.get(node.as_str()) == Some(&epoch)
                })
        })
        .map(|(n, _)| n.clone())
        .collect()
}

/// Does any other node whose liveness could not be read last (`unreadable`), and that no
/// longer counts as alive for it (unread past its liveness), hold an unexpired binding
/// among `fields`? Whether it lives is unknown, not "no".
pub fn holders_unsure(
    fields: &[(String, String)],
    unreadable: &HashSet<String>,
    alive: &HashMap<String, u64>,
    me: &str,
    now_ms: u64,
) -> bool {
    !unreadable.is_empty()
        && fields.iter().any(|(node, v)| {
            node != me
                && unreadable.contains(node.as_str())
                && !alive.contains_key(node.as_str())
                && parse_value(v).is_some_and(|(_, latest)| latest > now_ms)
        })
}

/// The Redis URLs of `cluster.store` (`host:port` means `redis://host:port`).
pub fn seeds(store: &[String]) -> Vec<String> {
    store
        .iter()
        .map(|a| {
            if a.contains("://") {
                a.clone()
            } else {
                format!("redis://{a}")
            }
        })
        .collect()
}

/// The seeds as the Redis client takes them. The client uses the first seed's user,
/// password and database for every master it finds, and refuses a list whose seeds differ
/// in them: a seed written without any takes the first's; one with others is refused, as is
/// a list the client would not build (a unix socket, mixed TLS). Checked before start: the
/// store thread could only log it, and the node would run outside its cluster.
pub fn seed_infos(store: &[String]) -> Result<Vec<redis::ConnectionInfo>, String> {
    use redis::IntoConnectionInfo;
    let mut infos = Vec::with_capacity(store.len());
    for (a, s) in store.iter().zip(seeds(store)) {
        infos.push(s.as_str().into_connection_info().map_err(|_| {
            format!(
                "{:?} is not a Redis address (host:port or redis://…)",
                without_password(a)
            )
        })?);
    }
    let Some(first) = infos.first().map(|i| i.redis_settings().clone()) else {
        return Ok(infos);
    };
    for (a, i) in store.iter().zip(infos.iter_mut()).skip(1) {
        let r = i.redis_settings();
        if r.username().is_none() && r.password().is_none() && r.db() == 0 {
            *i = i.clone().set_redis_settings(first.clone());
        } else if (r.username(), r.password(), r.db())
            != (first.username(), first.password(), first.db())
        {
            return Err(format!(
                "{:?} has another user, password or database than the first seed (the first \
                 seed's are used for every master: write them on the first seed only)",
                without_password(a)
            ));
        }
    }
    redis::cluster::ClusterClient::builder(infos.clone())
        .build()
        .map_err(|e| format!("not a usable Redis Cluster address list: {e}"))?;
    Ok(infos)
}

/// TLS to the store: the roots and the client identity `cluster.store_ca`, `store_cert` and
/// `store_key` name, read and checked. `None` when none is configured (with `rediss://`
/// seeds the system's roots are trusted). `Err((key, why))`.
pub fn store_tls(
    c: &ClusterConfig,
) -> Result<Option<redis::TlsCertificates>, (&'static str, String)> {
    use rustls::pki_types::pem::PemObject;
    let configured = c.store_ca.is_some() || c.store_cert.is_some() || c.store_key.is_some();
    if configured && !c.store.iter().any(|s| s.starts_with("rediss://")) {
        return Err((
            "cluster.store_ca",
            "TLS settings for the store need rediss:// seeds".into(),
        ));
    }
    let read = |key: &'static str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| (key, format!("{}: {e}", p.display())))
    };
    let root_cert = match &c.store_ca {
        Some(p) => {
            let pem = read("cluster.store_ca", p)?;
            let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ("cluster.store_ca", format!("{}: {e}", p.display())))?;
            if certs.is_empty() {
                return Err((
                    "cluster.store_ca",
                    format!("{}: no PEM certificate", p.display()),
                ));
            }
            Some(pem)
        }
        None => None,
    };
    let client_tls = match (&c.store_cert, &c.store_key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("cluster.store_cert", cert)?,
            client_key: read("cluster.store_key", key)?,
        }),
        (None, None) => None,
        _ => {
            return Err((
                "cluster.store_cert",
                "store_cert and store_key go together".into(),
            ));
        }
    };
    Ok(
        (root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }),
    )
}

/// A store address fit for a log line: the password of a `redis://user:password@host`
/// replaced by `…` (a seed refused at load is most often one whose password has a
/// character that needs escaping).
pub fn without_password(addr: &str) -> String {
    match addr.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:…@{host}"),
                None => addr.to_string(), // a user name alone: nothing secret
            },
            None => addr.to_string(),
        },
        None => addr.to_string(),
    }
}

/// Starts the store thread; returns the sender shards get their handles from. With
/// `subscribers_key`, the thread keeps `subscribers` filled from the store.
pub fn start(
    cfg: &ClusterConfig,
    subscribers: crate::auth::SharedSubscribers,
) -> std::io::Result<StoreSender> {
    let (writes, write_rx) = lane(STORE_QUEUE)?;
    let (asks, ask_rx) = lane(STORE_QUEUE)?;
    let (withdraw, withdraw_rx) = async_channel::bounded(1);
    let resync = Arc::new(AtomicU64::new(0));
    // Unique per start: a node that comes back has a new epoch, so what it registered in its
    // previous life is never routed to again.
    let epoch = unix_ms()
        .wrapping_mul(1_000_003)
        .wrapping_add(u64::from(std::process::id()))
        | 1;
    let cfg = cfg.clone();
    let name_taken = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(OnceLock::new());
    let down = Arc::new(NodesDown::of(&cfg));
    let sender = StoreSender {
        writes,
        asks,
        resync: resync.clone(),
        down: down.clone(),
        node: cfg.node.clone(),
        epoch,
        name_taken: name_taken.clone(),
        stop: stop.clone(),
        withdraw,
    };
    std::thread::Builder::new()
        .name("sipring-store".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    return stopped(
                        &stop,
                        format!("store thread: cannot start its runtime: {e}"),
                    );
                }
            };
            let local = tokio::task::LocalSet::new();
            let main = run(
                cfg,
                epoch,
                (write_rx, ask_rx, withdraw_rx),
                (resync, name_taken, stop.clone(), down),
                subscribers,
            );
            local.block_on(&rt, guard(&stop, "main", main));
        })?;
    Ok(sender)
}

/// `task`, one of the store thread's long-lived tasks: one that panics stops the node (the
/// thread went on without it, silently: no heartbeat, so the other nodes counted this one
/// dead, or no binding written).
fn guard<F: Future<Output = ()> + 'static>(
    stop: &Arc<OnceLock<String>>,
    what: &'static str,
    task: F,
) -> impl Future<Output = ()> + 'static {
    let stop = stop.clone();
    async move {
        use futures_lite::FutureExt;
        if std::panic::AssertUnwindSafe(task)
            .catch_unwind()
            .await
            .is_err()
        {
            stopped(
                &stop,
                format!("store thread: its {what} task panicked (see the panic above)"),
            );
        }
    }
}

/// Logs why the store thread stops and records it for [`StoreSender::stopped`].
fn stopped(stop: &OnceLock<String>, why: String) {
    tracing::error!("{why}; the node stops");
    let _ = stop.set(why);
}

struct State {
    conn: RefCell<Option<ClusterConnection>>,
    /// The first seed, as the client takes it: the sweep reaches each master with its
    /// user, password and database.
    first_seed: redis::ConnectionInfo,
    /// The store's TLS roots and client identity, if configured (the sweep's connections
    /// take them too).
    certs: Option<redis::TlsCertificates>,
    /// The other nodes' liveness ([`Liveness`]).
    liveness: RefCell<Liveness>,
    /// When the store first connected ([`liveness_unsure`] counts from it: a node that
    /// started while the store was unreachable has read no liveness key either).
    connected: Cell<Option<Instant>>,
    cfg: ClusterConfig,
    epoch: u64,
    errors: crate::metrics::LogLimiter,
    /// Binding writes not yet in the store ([`Writes`]).
    writes: RefCell<Writes>,
    /// Wakes the writer when `dirty` gains an entry or a write ends.
    wake: tokio::sync::Notify,
    /// Each AOR's failed writes in a row: its retry backoff.
    write_failures: RefCell<WriteBackoff>,
    resync: Arc<AtomicU64>,
    /// Bumped for a node found down ([`Store::down_generations`]).
    down: Arc<NodesDown>,
    /// This life holds the node's liveness key: until then nothing is written under the
    /// node's name (it may be another live process's), nor swept.
    claimed: Cell<bool>,
    name_taken: Arc<AtomicBool>,
    /// The process stops: no more heartbeats (one after the key's deletion would bring the
    /// node back to life for the others).
    stopping: Cell<bool>,
    /// A heartbeat's liveness write is on its way (the withdrawal waits for it: retried by
    /// the client after the deletion, it set the key again, and the other nodes routed to a
    /// node that had exited for another `liveness_ms`).
    beating: Cell<bool>,
}

impl State {
    fn conn(&self) -> Option<ClusterConnection> {
        self.conn.borrow().clone()
    }

    fn failed(&self, what: &str, e: &redis::RedisError) {
        if let Some(left_out) = self.errors.allow(Instant::now()) {
            tracing::warn!(
                op = what,
                error = %e,
                left_out,
                "location store request failed (at most one line a second)"
            );
        }
    }
}

async fn run(
    cfg: ClusterConfig,
    epoch: u64,
    (write_rx, ask_rx, withdraw_rx): (
        LaneEnd<Write>,
        LaneEnd<Ask>,
        async_channel::Receiver<std::sync::mpsc::SyncSender<bool>>,
    ),
    (resync, name_taken, stop, down): (
        Arc<AtomicU64>,
        Arc<AtomicBool>,
        Arc<OnceLock<String>>,
        Arc<NodesDown>,
    ),
    subscribers: crate::auth::SharedSubscribers,
) {
    let (mut write_rx, mut ask_rx) = match (write_rx.into_rx(), ask_rx.into_rx()) {
        (Ok(w), Ok(a)) => (w, a),
        (Err(e), _) | (_, Err(e)) => {
            return stopped(&stop, format!("store thread: cannot watch its queues: {e}"));
        }
    };
    let seeds = match seed_infos(&cfg.store) {
        Ok(s) => s,
        Err(e) => return stopped(&stop, format!("cluster.store: {e}")),
    };
    let certs = match store_tls(&cfg) {
        Ok(c) => c,
        Err((key, why)) => return stopped(&stop, format!("{key}: {why}")),
    };
    let timeout = Duration::from_millis(cfg.store_timeout_ms);
    let mut builder = redis::cluster::ClusterClient::builder(seeds.clone())
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(2)
        .min_retry_wait(50)
        .max_retry_wait(200);
    if let Some(c) = certs.clone() {
        builder = builder.certs(c);
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            return stopped(
                &stop,
                format!("cluster.store: not a usable Redis Cluster address list: {e}"),
            );
        }
    };
    let st = Rc::new(State {
        conn: RefCell::new(None),
        first_seed: seeds[0].clone(),
        certs,
        liveness: RefCell::new(Liveness::default()),
        connected: Cell::new(None),
        cfg,
        epoch,
        errors: crate::metrics::LogLimiter::default(),
        writes: RefCell::new(Writes::default()),
        wake: tokio::sync::Notify::new(),
        write_failures: RefCell::new(WriteBackoff::default()),
        resync,
        down,
        claimed: Cell::new(false),
        name_taken,
        stopping: Cell::new(false),
        beating: Cell::new(false),
    });
    // Connect (and keep trying) in the background; until then requests fail fast.
    {
        let st = st.clone();
        tokio::task::spawn_local(async move {
            loop {
                match client.get_async_connection().await {
                    Ok(c) => {
                        tracing::info!(node = %st.cfg.node, epoch = st.epoch, "location store connected");
                        *st.conn.borrow_mut() = Some(c);
                        st.connected.set(Some(Instant::now()));
                        return;
                    }
                    Err(e) => {
                        st.failed("connect", &e);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
    }
    tokio::task::spawn_local(guard(&stop, "heartbeat", heartbeat(st.clone())));
    tokio::task::spawn_local(watch_clock(st.clone()));
    {
        let st = st.clone();
        tokio::task::spawn_local(async move {
            if let Ok(done) = withdraw_rx.recv().await {
                let _ = done.send(withdraw(&st).await);
            }
        });
    }
    tokio::task::spawn_local(sweep_previous_life(st.clone()));
    if let Some(key) = st.cfg.subscribers_key.clone() {
        let task = refresh_subscribers(st.clone(), key, subscribers);
        tokio::task::spawn_local(guard(&stop, "subscribers", task));
    }
    // Writes: taken from their queue into `dirty` at once (newest per AOR), written by
    // `write_dirty`, which keeps each until the store has it.
    {
        let st = st.clone();
        tokio::task::spawn_local(guard(&stop, "write queue", async move {
            while let Some(w) = write_rx.recv().await {
                st.writes.borrow_mut().offer(w.aor, w.field, true);
                st.wake.notify_one();
            }
        }));
    }
    tokio::task::spawn_local(guard(&stop, "writer", write_dirty(st.clone())));
    // At most STORE_IN_FLIGHT lookups at the store at once: past it the thread stops taking
    // from the queue, the queue fills, and the shards' `try_send` counts `queue_full`.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(STORE_IN_FLIGHT));
    while let Some(ask) = ask_rx.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let st = st.clone();
        tokio::task::spawn_local(async move {
            serve(&st, ask).await;
            drop(permit);
        });
    }
}

/// Binding writes not yet in the store: the newest field per AOR (a newer write replaces an
/// older one waiting), one write at the store at a time per AOR (so they land in order),
/// and the AORs ready to be written next in the order they became ready. Bounded by the AORs
/// this node wrote that the store has not taken.
#[derive(Debug, Default)]
struct Writes {
    dirty: HashMap<String, Field>,
    writing: HashSet<String>,
    /// The AORs of `dirty` not in `writing`. Scanning `dirty` for them instead cost every
    /// wake the AORs backing off (hundreds of thousands after hours with a master down), on
    /// the one store thread.
    ready: VecDeque<String>,
}

impl Writes {
    /// `field` for `aor`: replacing what waits (`newest`: a new write), or only if nothing
    /// newer waits (a failed write put back).
    fn offer(&mut self, aor: String, field: Field, newest: bool) {
        let was = self.dirty.contains_key(&aor);
        if !was && !self.writing.contains(&aor) {
            self.ready.push_back(aor.clone());
        }
        if newest || !was {
            self.dirty.insert(aor, field);
        }
    }

    /// Up to `max` writes to send now, each AOR then being written.
    fn take(&mut self, max: usize) -> Vec<(String, Field)> {
        let mut batch = Vec::new();
        while batch.len() < max
            && let Some(a) = self.ready.pop_front()
        {
            if !self.writing.contains(&a)
                && let Some(f) = self.dirty.remove(&a)
            {
                self.writing.insert(a.clone());
                batch.push((a, f));
            }
        }
        batch
    }

    /// `aor`'s write ended (a failed one was offered back first): what waits for it is
    /// ready.
    fn done(&mut self, aor: &str) {
        self.writing.remove(aor);
        if self.dirty.contains_key(aor) {
            self.ready.push_back(aor.to_string());
        }
    }

    /// Writes waiting (not at the store).
    fn waiting(&self) -> usize {
        self.dirty.len()
    }
}

/// Writes what `dirty` holds, at most STORE_IN_FLIGHT at once and one per AOR; a write that
/// fails goes back (unless a newer one came meanwhile) and is tried again after
/// [`WRITE_RETRY`]. Without a connection, writes wait (logged, at most a line a second).
async fn write_dirty(st: Rc<State>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(STORE_IN_FLIGHT));
    loop {
        let Some(c) = st.conn().filter(|_| st.claimed.get()) else {
            if st.writes.borrow().waiting() > 0
                && let Some(left_out) = st.errors.allow(Instant::now())
            {
                tracing::warn!(
                    waiting = st.writes.borrow().waiting(),
                    left_out,
                    "location store not connected: binding writes wait for it"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let batch = st.writes.borrow_mut().take(256);
        if batch.is_empty() {
            st.wake.notified().await;
            continue;
        }
        for (aor, field) in batch {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (st, mut c) = (st.clone(), c.clone());
            tokio::task::spawn_local(async move {
                let written = write_field(&st, &mut c, &aor, &field).await;
                // The slot is for a request at the store, not for a wait: writes to the
                // healthy masters go on while this one backs off (the AOR stays in
                // `writing` meanwhile, so it is not written twice at once).
                drop(permit);
                if let Err(e) = written {
                    st.failed("write", &e);
                    let wait = st.write_failures.borrow_mut().failed(&aor);
                    tokio::time::sleep(wait).await;
                    // A newer value that came meanwhile wins; else this one is tried again.
                    st.writes.borrow_mut().offer(aor.clone(), field, false);
                } else {
                    st.write_failures.borrow_mut().succeeded(&aor);
                }
                st.writes.borrow_mut().done(&aor);
                st.wake.notify_one();
            });
        }
    }
}

/// The retry backoff of failed writes, per AOR: [`WRITE_RETRY`] doubled per failure of that
/// AOR in a row, up to [`WRITE_RETRY_MAX`]. One counter for all (as before) let the AORs of
/// a master that failed over back each other off to 30 s, and let a success on a healthy
/// master reset the backoff of AORs still failing on a dead one. Holds only AORs whose last
/// write failed.
#[derive(Debug, Default)]
pub struct WriteBackoff {
    failures: HashMap<String, u32>,
}

impl WriteBackoff {
    /// `aor`'s write failed: how long to wait before trying it again.
    pub fn failed(&mut self, aor: &str) -> Duration {
        let n = self.failures.entry(aor.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        WRITE_RETRY
            .saturating_mul(1 << (*n - 1).min(6))
            .min(WRITE_RETRY_MAX)
    }

    /// `aor`'s write went through.
    pub fn succeeded(&mut self, aor: &str) {
        self.failures.remove(aor);
    }
}

/// Writes this node's field of `aor` (or removes it: no bindings, or all expired by now),
/// in one [`WRITE_FIELD`] script: atomic, so a field is never left without the key's TTL.
/// Sent as text each time (`EVAL`): `EVALSHA` writes 1.2–1.5× as many per second
/// (BENCHMARKS.md §14), not worth the redis crate's `script` feature and a `SCRIPT LOAD`
/// to every master (which fails while one is down) at the write rates a cluster needs.
async fn write_field(
    st: &State,
    c: &mut ClusterConnection,
    aor: &str,
    field: &Field,
) -> redis::RedisResult<()> {
    let now = unix_ms();
    let (value, latest) = match field {
        Some((v, latest)) if *latest > now => (v.as_str(), *latest),
        _ => ("", 0),
    };
    redis::cmd("EVAL")
        .arg(WRITE_FIELD)
        .arg(1)
        .arg(aor_key(aor))
        .arg(st.cfg.node.as_str())
        .arg(value)
        .arg(latest)
        .arg(st.epoch)
        .query_async::<i64>(c)
        .await
        .map(drop)
}

/// Sets field `ARGV[1]` (this node) of binding hash `KEYS[1]` to `ARGV[2]`, or deletes it
/// when that is empty; the key then expires at `ARGV[3]` (unix ms) unless another node's
/// bindings last longer (NX gives a new key its time, GT lengthens it). One script, so the
/// field and the TTL are one write (a pipeline applied halfway left a key that never
/// expired), at one frozen clock. A field a later life of this node wrote (a greater epoch
/// `ARGV[4]`, compared as decimal text: epochs pass Lua's exact numbers) is left alone: a
/// write of an earlier life that arrives late loses.
///
/// Other nodes' fields whose bindings all expired more than ten minutes ago by Redis's
/// clock (`TIME`, one clock for every writer: a node whose own clock ran fast would have
/// deleted the others' live fields; the ten minutes absorb skew between Redis and the
/// nodes) go too. Nothing else removes
/// them while the key lives: a node killed and replaced under another name, or retired,
/// left its field for as long as any node kept the key alive (each write lengthens it),
/// and so did a node whose bindings expired without a write. Never routed to (their
/// expiry says so), they only held memory.
pub const WRITE_FIELD: &str = "local cur = redis.call('HGET', KEYS[1], ARGV[1]) \
     if cur then local e = string.match(cur, '^(%d+) ') \
       if e and (#e > #ARGV[4] or (#e == #ARGV[4] and e > ARGV[4])) then return 0 end end \
     local t = redis.call('TIME') \
     local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
     local all = redis.call('HGETALL', KEYS[1]) \
     for i = 1, #all, 2 do if all[i] ~= ARGV[1] then \
       local x = string.match(all[i + 1], '^%d+ (%d+)') \
       if x and tonumber(x) + 600000 < now then redis.call('HDEL', KEYS[1], all[i]) end \
     end end \
     if ARGV[2] == '' then return redis.call('HDEL', KEYS[1], ARGV[1]) end \
     redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) \
     redis.call('PEXPIREAT', KEYS[1], ARGV[3], 'NX') \
     redis.call('PEXPIREAT', KEYS[1], ARGV[3], 'GT') \
     return 1";

/// Answers one lookup.
async fn serve(st: &State, ask: Ask) {
    let me = st.cfg.node.as_str();
    let mut known = false;
    // Waited in the queue past the store timeout (a stalled store): answered now (503), not
    // after its turn at the store.
    let late = ask.at.elapsed() > Duration::from_millis(st.cfg.store_timeout_ms);
    // Just started: which nodes live is not known yet (the first liveness reads are on
    // their way). "No holder" then would answer 480 for users online elsewhere, and drop the
    // removals a moved device needs: answered as a store error instead (503; retried).
    // Bounded: a peer whose key cannot be read (its master down) is as dead as it would
    // have been before, once a liveness period has passed.
    let others = st.cfg.nodes.iter().filter(|n| n.name != me).count();
    let unsure = liveness_unsure(
        st.liveness.borrow().read.len(),
        others,
        st.connected.get(),
        Duration::from_millis(st.cfg.liveness_ms),
    );
    let nodes = match st.conn() {
        None => None,
        Some(_) if late || unsure => None,
        Some(mut c) => {
            let r: redis::RedisResult<Vec<(String, String)>> = redis::cmd("HGETALL")
                .arg(aor_key(&ask.aor))
                .query_async(&mut c)
                .await;
            match r {
                Ok(fields) => {
                    known = !fields.is_empty();
                    let now = unix_ms();
                    // A holder whose liveness could not be read at its last try (the
                    // store just came back from an outage longer than a liveness, or its
                    // key's master fails over): "no holder" would answer 480 for a user
                    // online there, and drop the removal a moved device needs.
                    let l = st.liveness.borrow();
                    let alive = &l.alive;
                    let holders = live_holders(&fields, alive, me, now);
                    // A call still goes to the holders known alive; a removal must reach
                    // every holder, so it is asked again later.
                    let removal = ask.token & REMOVAL_TOKEN != 0;
                    if (holders.is_empty() || removal)
                        && holders_unsure(&fields, &l.unknown, alive, me, now)
                    {
                        None
                    } else {
                        Some(holders)
                    }
                }
                Err(e) => {
                    st.failed("lookup", &e);
                    None
                }
            }
        }
    };
    ask.reply.push(Found {
        token: ask.token,
        nodes,
        known,
    });
}

/// Sets the liveness key `KEYS[1]` to this life's epoch `ARGV[1]` for `ARGV[2]` ms unless
/// another epoch holds it; returns what it held (nil: nothing). A compare-and-set, so a node
/// never overwrites a key that another process running under its name refreshes — not to
/// claim the name, nor after its own store link was down past its liveness.
const LIVENESS_IF_OURS: &str = "local v = redis.call('GET', KEYS[1]) \
     if v == false or v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end \
     return v";

/// Deletes the liveness key `KEYS[1]` only if it holds this life's epoch `ARGV[1]` (a
/// process that lost its name to another must not delete the other's).
const DELETE_IF_OURS: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
     return redis.call('DEL', KEYS[1]) end return 0";

/// The withdrawal ([`StoreSender::withdraw`]): heartbeats stop (one already sent is ahead
/// of the deletion on the connection), then the key goes if it is this life's.
async fn withdraw(st: &State) -> bool {
    st.stopping.set(true);
    // A beat still on its way (in the client's retries) lands before the deletion, not
    // after it; bounded by the store timeout, as the beat is.
    let timeout = Duration::from_millis(st.cfg.store_timeout_ms);
    let t0 = Instant::now();
    while st.beating.get() && t0.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let Some(mut c) = st.conn() else {
        return false;
    };
    let me = st.cfg.node.as_str();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(DELETE_IF_OURS)
        .arg(1)
        .arg(node_key(me))
        .arg(st.epoch);
    let del = cmd.query_async::<i64>(&mut c);
    match tokio::time::timeout(timeout, del).await {
        Ok(Ok(n)) => {
            tracing::info!(node = %me, held = n == 1, "liveness withdrawn: the other nodes stop routing here");
            true
        }
        Ok(Err(e)) => {
            st.failed("withdraw", &e);
            false
        }
        Err(_) => false,
    }
}

/// Deletes field `ARGV[1]` of hash `KEYS[1]` only if it still holds `ARGV[2]`.
const DELETE_IF_SAME: &str = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then \
     return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0";

/// One master, as `CLUSTER NODES` names it (`host:port`; an IPv6 host unbracketed), with
/// the first seed's user, password and database: the sweep talks to each master directly.
fn master_info(first: &redis::ConnectionInfo, addr: &str) -> Option<redis::ConnectionInfo> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse().ok()?;
    let host = host.to_string();
    let addr = match first.addr() {
        // As the seed says (`rediss://…/#insecure` skips the name check there too).
        redis::ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => redis::ConnectionAddr::Tcp(host, port),
    };
    Some(first.clone().set_addr(addr))
}

/// The masters' addresses in a `CLUSTER NODES` reply.
fn masters(nodes: &str) -> Vec<String> {
    nodes
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let master = f.get(2)?.split(',').any(|x| x == "master");
            // Flags compared whole: `nofailover` (a master of a cluster run with
            // cluster-replica-no-failover) is no failure.
            let failed = f.get(2)?.split(',').any(|x| x == "fail" || x == "fail?");
            (master && !failed).then(|| f.get(1)?.split('@').next().map(str::to_string))?
        })
        .collect()
}

/// Clears what this node stored in a previous life (killed before it could remove its
/// fields): once connected, every master is scanned for AOR keys in pages (`SCAN MATCH b:*`,
/// in the background, traffic flowing meanwhile), and a field of this node's whose epoch is
/// not this life's is deleted if it still holds what was read (a compare-and-delete script,
/// so a binding written by this life meanwhile is never lost). Those fields were never routed
/// to (their epoch is dead); this gives their memory back before their TTL.
async fn sweep_previous_life(st: Rc<State>) {
    let mut c = loop {
        if let Some(c) = st.conn().filter(|_| st.claimed.get()) {
            break c;
        }
        if st.name_taken.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let nodes: String = match redis::cmd("CLUSTER").arg("NODES").query_async(&mut c).await {
        Ok(n) => n,
        Err(e) => return st.failed("sweep", &e),
    };
    let me = st.cfg.node.as_str();
    let (mut scanned, mut cleared, mut failed) = (0u64, 0u64, 0u64);
    for addr in masters(&nodes) {
        let Some(info) = master_info(&st.first_seed, &addr) else {
            failed += 1;
            continue;
        };
        let client = match &st.certs {
            Some(c) => redis::Client::build_with_tls(info, c.clone()),
            None => redis::Client::open(info),
        };
        let conn = match client {
            Ok(client) => client.get_multiplexed_async_connection().await,
            Err(e) => Err(e),
        };
        let mut m = match conn {
            Ok(m) => m,
            Err(e) => {
                failed += 1;
                st.failed("sweep", &e);
                continue;
            }
        };
        let mut cursor = 0u64;
        loop {
            let page: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("b:*")
                .arg("COUNT")
                .arg(500)
                .query_async(&mut m)
                .await;
            let (next, keys) = match page {
                Ok(p) => p,
                Err(e) => {
                    failed += 1;
                    st.failed("sweep", &e);
                    break;
                }
            };
            for k in keys {
                scanned += 1;
                let v: Option<String> =
                    match redis::cmd("HGET").arg(&k).arg(me).query_async(&mut m).await {
                        Ok(v) => v,
                        Err(e) => {
                            failed += 1;
                            st.failed("sweep", &e);
                            None
                        }
                    };
                if let Some(v) = v
                    && parse_value(&v).is_none_or(|(epoch, _)| epoch != st.epoch)
                {
                    let n: i64 = redis::cmd("EVAL")
                        .arg(DELETE_IF_SAME)
                        .arg(1)
                        .arg(&k)
                        .arg(me)
                        .arg(&v)
                        .query_async(&mut m)
                        .await
                        .unwrap_or_else(|e| {
                            failed += 1;
                            st.failed("sweep", &e);
                            0
                        });
                    cleared += n as u64;
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    if failed == 0 {
        tracing::info!(
            node = %me,
            scanned,
            cleared,
            "bindings of this node's previous life cleared from the location store"
        );
    } else {
        // Memory only: those fields are never routed to, and their TTL ends them.
        tracing::warn!(
            node = %me,
            scanned,
            cleared,
            failed,
            "bindings of this node's previous life partly cleared from the location store (requests failed: see the warnings above); what is left ends with its TTL"
        );
    }
}

/// Reads the subscriber hash `key` now and every `subscribers_refresh_s`, and swaps the
/// parsed table in whole (shards never wait for it). A read or parse error keeps the
/// previous table and is logged.
async fn refresh_subscribers(st: Rc<State>, key: String, into: crate::auth::SharedSubscribers) {
    let period = Duration::from_secs(st.cfg.subscribers_refresh_s);
    let mut loaded = false;
    // What the last read held: an unchanged hash is not parsed (nor its refused fields
    // logged) again.
    let mut last: Option<u64> = None;
    // Reads failed before the first one: tried again soon, backing off to the period.
    let mut failures = 0u32;
    loop {
        let mut read = false;
        if let Some(mut c) = st.conn() {
            match read_hash(&mut c, &key).await {
                Ok(entries) => {
                    read = true;
                    let digest = {
                        use std::hash::{BuildHasher, BuildHasherDefault};
                        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                            .hash_one(&entries)
                    };
                    if last == Some(digest) {
                        tokio::time::sleep(period).await;
                        continue;
                    }
                    last = Some(digest);
                    // Off this thread: parsing a large hash (100,000 subscribers, tens of MB
                    // of TOML) here held up the heartbeat and every lookup and write queued
                    // behind it, long enough for this node's liveness key to lapse.
                    let k = key.clone();
                    let parsed = tokio::task::spawn_blocking(move || {
                        crate::auth::parse_store_subscribers(
                            entries.iter().map(|(f, v)| (f.as_str(), v.as_str())),
                            &k,
                        )
                    })
                    .await;
                    match parsed {
                        Err(e) => {
                            last = None;
                            tracing::error!(error = %e, "parsing the subscribers failed; the previous ones stay");
                        }
                        Ok((t, refused)) => {
                            // Each field is read on its own: one bad entry used to refuse the
                            // whole hash (the table froze, revocations ignored) and, before
                            // the first load, had every node read it all again twice a
                            // second.
                            for e in refused.iter().take(8) {
                                tracing::error!(error = %e, "subscriber entry in the store refused: that subscriber cannot sign in until it is mended");
                            }
                            if refused.len() > 8 {
                                tracing::error!(more = refused.len() - 8, key = %key, "more subscriber entries in the store refused");
                            }
                            if t.is_empty() && !into.0.load().is_empty() {
                                // The key is gone (deleted, lost in a failover, a store
                                // restarted without persistence): keeping who could sign in
                                // beats locking everyone out.
                                tracing::error!(key = %key, "subscribers in the store: none (the key is missing or empty, or every entry was refused); the previous ones stay");
                            } else {
                                let n = t.len();
                                into.0.store(Arc::new(t));
                                if !loaded {
                                    tracing::info!(key = %key, subscribers = n, refused = refused.len(), "subscribers read from the location store");
                                    loaded = true;
                                }
                            }
                        }
                    }
                }
                Err(e) => st.failed("subscribers", &e),
            }
        }
        let wait = if loaded || read {
            period
        } else {
            failures = failures.saturating_add(1);
            Duration::from_millis(250u64 << failures.min(7)).min(period)
        };
        tokio::time::sleep(wait).await;
    }
}

/// Entries of a hash per `HSCAN` page: one `HGETALL` of a large subscriber hash (100,000
/// entries, tens of MB) held the connection to its master — lookups and writes queued
/// behind it — and had to arrive whole within `store_timeout_ms`, so it could fail every
/// time; a page is a request of its own, each within the timeout.
const HASH_PAGE: usize = 250;

/// All of hash `key`, read a page at a time (`HSCAN`); a field the scan returns twice
/// (allowed while the hash changes) counts once, in field order.
///
/// Pages are not one snapshot: a hash deleted (a `FLUSHALL`, a failover that lost it, an
/// operator's `DEL` before writing it again) after the first pages were read gave those
/// pages alone, and a refresh replaced the subscriber table with a fraction of it — users
/// who could sign in a second before were refused. The read is whole only if the hash
/// still holds as many fields as were read (`HLEN` after the scan); a hash gone meanwhile
/// reads as empty (the caller keeps what it had), one that changed is read again; after
/// [`HASH_READS`] tries the last read is taken if within 1 % of the hash, else the read
/// fails (until the next refresh).
async fn read_hash(
    c: &mut ClusterConnection,
    key: &str,
) -> redis::RedisResult<std::collections::BTreeMap<String, String>> {
    let mut last = (std::collections::BTreeMap::new(), 0);
    for _ in 0..HASH_READS {
        let mut out = std::collections::BTreeMap::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(key)
                .arg(cursor)
                .arg("COUNT")
                .arg(HASH_PAGE)
                .query_async(c)
                .await?;
            out.extend(page);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let now: usize = redis::cmd("HLEN").arg(key).query_async(c).await?;
        if now == 0 {
            return Ok(std::collections::BTreeMap::new());
        }
        if now == out.len() {
            return Ok(out);
        }
        last = (out, now);
    }
    // Written to all along (a provisioning job adding users): a read within 1 % of what
    // the hash holds is taken — a hash deleted and written again is far from it. Refusing
    // every such read kept new users out for as long as the job ran.
    let (out, now) = last;
    if out.len().abs_diff(now) <= now / 100 {
        return Ok(out);
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Client,
        "the hash changed during every read",
    )))
}

/// Reads of a hash that changed while it was read, before giving up until the next refresh.
const HASH_READS: usize = 3;

/// How far this node's clock is ahead of Redis's (ms; negative: behind), from a `TIME`
/// answer (`secs`, `micros`) that came back between `sent` and `received` (unix ms here):
/// against the middle of the round trip.
pub fn clock_skew_ms(sent: u64, received: u64, secs: u64, micros: u64) -> i64 {
    let redis = secs as i64 * 1000 + micros as i64 / 1000;
    (sent as i64 + received as i64) / 2 - redis
}

/// Skew past which a node says so: binding expiries are absolute times, compared across
/// nodes (CLUSTER.md): a node behind the others by a binding's life writes bindings they
/// read as expired.
const SKEW_WARN_MS: i64 = 1000;

/// Compares this node's clock with Redis's now and every minute; a skew past
/// [`SKEW_WARN_MS`] is logged as a WARN (with its size), once a minute while it lasts.
async fn watch_clock(st: Rc<State>) {
    loop {
        let Some(mut c) = st.conn() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        {
            let sent = unix_ms();
            let r: redis::RedisResult<(u64, u64)> = redis::cmd("TIME").query_async(&mut c).await;
            let received = unix_ms();
            // A slow answer says little about the clocks.
            if let Ok((secs, micros)) = r
                && received.saturating_sub(sent) < 500
            {
                let skew = clock_skew_ms(sent, received, secs, micros);
                if skew.abs() > SKEW_WARN_MS {
                    tracing::warn!(node = %st.cfg.node, skew_ms = skew, "this node's clock differs from the location store's (positive: ahead): binding expiries are compared across nodes, so a node behind by a binding's life has its users look expired to the others; synchronise the clocks (NTP)");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// Refreshes this node's liveness key and reads the others' every `heartbeat_ms`. A node
/// whose key is gone is dead to this one (logged once); a store error changes nothing.
async fn heartbeat(st: Rc<State>) {
    let period = Duration::from_millis(st.cfg.heartbeat_ms);
    let me = st.cfg.node.clone();
    let others: Vec<String> = st
        .cfg
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| *n != me)
        .collect();
    let mut beats = 0u64;
    // Beats a period apart from start to start: a slow store delays one beat by at most its
    // request timeout (config: heartbeat_ms + store_timeout_ms < liveness_ms), however
    // many nodes there are to read.
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The other nodes' keys are read in tasks of their own, one at a time per node.
    let reading: Rc<RefCell<HashSet<String>>> = Rc::default();
    // Claiming the name: the key held by another epoch is a previous life's until it has
    // outlived its TTL (a dead process stops refreshing it); past that, a live process
    // refreshes it, and this one must not run as the same node.
    let mut held_since: Option<Instant> = None;
    let patience = Duration::from_millis(st.cfg.liveness_ms + 2 * st.cfg.heartbeat_ms);
    loop {
        tick.tick().await;
        if st.stopping.get() {
            return;
        }
        if let Some(mut c) = st.conn() {
            // Set unless another epoch holds it, and what it held: gone after this node set
            // it (a store that restarted empty or lost writes in a failover — or this node
            // stalled past its liveness), what this node wrote may be gone too, so every
            // shard writes its bindings again. Another epoch's is never overwritten.
            st.beating.set(true);
            let r: redis::RedisResult<Option<u64>> = redis::cmd("EVAL")
                .arg(LIVENESS_IF_OURS)
                .arg(1)
                .arg(node_key(&me))
                .arg(st.epoch)
                .arg(st.cfg.liveness_ms)
                .query_async(&mut c)
                .await;
            st.beating.set(false);
            match r {
                // Ours: set now, or by an earlier SET whose answer was lost.
                Ok(prev) if !st.claimed.get() && prev.is_none_or(|e| e == st.epoch) => {
                    st.claimed.set(true);
                    beats += 1;
                    st.wake.notify_one();
                    tracing::info!(node = %me, epoch = st.epoch, "this node's liveness key is held by this process");
                }
                Ok(Some(other)) if other != st.epoch => {
                    if st.claimed.get()
                        || held_since.get_or_insert_with(Instant::now).elapsed() > patience
                    {
                        tracing::error!(node = %me, other_epoch = other, "another live process runs as this cluster node (a copied configuration, or an old process still running): this one stops rather than erase its bindings");
                        st.name_taken.store(true, Ordering::Relaxed);
                        return;
                    }
                    if held_since.is_some_and(|t| t.elapsed() < period) {
                        tracing::info!(node = %me, "this node's liveness key is held by another epoch (a previous life?): waiting for it to expire before writing anything");
                    }
                }
                Ok(prev) => {
                    if beats > 0 && prev != Some(st.epoch) {
                        tracing::warn!(node = %me, "this node's liveness key was gone from the location store (data lost, or this node stalled): writing all its bindings again");
                        st.resync.fetch_add(1, Ordering::Relaxed);
                    }
                    beats += 1;
                }
                Err(e) => st.failed("heartbeat", &e),
            }
            // The other nodes are read claimed or not: a node that waits to claim its name
            // (a quick restart) still routes to them.
            for n in &others {
                if !reading.borrow_mut().insert(n.clone()) {
                    continue;
                }
                let (st, reading, n, mut c) = (st.clone(), reading.clone(), n.clone(), c.clone());
                tokio::task::spawn_local(async move {
                    let r: redis::RedisResult<Option<u64>> = redis::cmd("GET")
                        .arg(node_key(&n))
                        .query_async(&mut c)
                        .await;
                    if let Err(e) = &r {
                        st.failed("liveness", e);
                    }
                    let seen = st.liveness.borrow_mut().on_read(
                        &n,
                        r.map_err(|_| ()),
                        Instant::now(),
                        Duration::from_millis(st.cfg.liveness_ms),
                    );
                    match seen {
                        Seen::Up(epoch) => {
                            st.down.came_up(&n);
                            tracing::info!(node = %n, epoch, "cluster node up");
                        }
                        Seen::Down { known } => {
                            st.down.went_down(&n);
                            if known {
                                tracing::warn!(node = %n, "cluster node down: its liveness key expired; its users get 480 until they register elsewhere; links to it are closed");
                            }
                        }
                        // Unreadable (its master down, no replica promoted yet) for longer
                        // than a live node refreshes it: no longer routed to (every request
                        // for its users waited on a dial), and not closed either (the store
                        // failing to say is no sign of the node).
                        Seen::Unknown => {
                            tracing::warn!(node = %n, "cluster node unknown: its liveness key could not be read for longer than its liveness; lookups for its users answer 503 until it is read again");
                        }
                        Seen::Same => {}
                    }
                    reading.borrow_mut().remove(&n);
                });
            }
        }
    }
}

/// Whether which nodes live is not known yet: `read` of the `others` nodes' liveness keys
/// were read, and the store connected at `connected`. At most `liveness` after connecting (a
/// peer whose key cannot be read is then as dead as an expired one), counted from the
/// connection, not from start: a node that started while the store was unreachable for
/// longer than `liveness` took every node for dead until its first reads came back (480
/// for users online elsewhere, and the removals a moved device needs dropped).
fn liveness_unsure(
    read: usize,
    others: usize,
    connected: Option<Instant>,
    liveness: Duration,
) -> bool {
    read < others && connected.is_none_or(|t| t.elapsed() < liveness)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_wait_newest_per_aor_one_at_a_time_and_in_the_order_they_became_ready() {
        let f = |n: u64| Some((format!("field {n}"), n));
        let mut w = Writes::default();
        w.offer("a".into(), f(1), true);
        w.offer("b".into(), f(1), true);
        w.offer("a".into(), f(2), true); // coalesced
        assert_eq!(w.take(1), vec![("a".to_string(), f(2))]);
        // a is at the store: a newer value waits, not ready (one write per AOR at a time).
        w.offer("a".into(), f(3), true);
        assert_eq!(w.take(10), vec![("b".to_string(), f(1))]);
        assert_eq!(w.take(10), vec![]);
        // a's write failed: put back, the newer value wins; ready once a's write is over.
        w.offer("a".into(), f(2), false);
        assert_eq!(w.take(10), vec![]);
        w.done("a");
        assert_eq!(w.take(10), vec![("a".to_string(), f(3))]);
        w.done("a");
        w.done("b");
        // A failed write with nothing newer comes back as it was.
        w.offer("c".into(), f(1), true);
        let c = w.take(10);
        w.offer("c".into(), f(1), false);
        w.done("c");
        assert_eq!(w.take(10), c);
        w.done("c");
        assert_eq!((w.waiting(), w.take(10)), (0, vec![]));
        // Many AORs backing off cost a take nothing: only ready ones are looked at.
        for i in 0..1000 {
            w.offer(format!("x{i}"), f(1), true);
        }
        assert_eq!(w.take(1000).len(), 1000);
        for i in 0..1000 {
            w.offer(format!("x{i}"), f(2), true);
        }
        assert!(w.ready.is_empty());
        assert_eq!(w.take(10), vec![]);
    }

    #[test]
    fn which_nodes_live_is_unknown_until_read_or_a_liveness_after_connecting() {
        let liveness = Duration::from_millis(3000);
        let now = Instant::now();
        // Not connected yet, however long after start: nothing was read.
        assert!(liveness_unsure(0, 2, None, liveness));
        // Just connected: unknown until both are read.
        assert!(liveness_unsure(1, 2, Some(now), liveness));
        assert!(!liveness_unsure(2, 2, Some(now), liveness));
        // A peer whose key cannot be read is as dead as an expired one, a liveness after
        // connecting (not after start: the store may have taken longer than that to reach).
        let long_ago = now.checked_sub(Duration::from_secs(4)).unwrap();
        assert!(!liveness_unsure(1, 2, Some(long_ago), liveness));
        assert!(!liveness_unsure(0, 0, None, liveness));
    }

    #[test]
    fn a_write_backs_off_for_its_own_failures_only() {
        let mut b = WriteBackoff::default();
        // A master fails over: its AORs fail, each its own backoff from 500 ms.
        assert_eq!(b.failed("a"), Duration::from_millis(500));
        assert_eq!(b.failed("a"), Duration::from_secs(1));
        for _ in 0..10 {
            b.failed("a");
        }
        assert_eq!(b.failed("a"), WRITE_RETRY_MAX);
        // Another AOR's first failure starts at 500 ms, not at a's 30 s...
        assert_eq!(b.failed("b"), Duration::from_millis(500));
        // ... and a success elsewhere does not reset a's.
        b.succeeded("c");
        assert_eq!(b.failed("a"), WRITE_RETRY_MAX);
        b.succeeded("a");
        assert_eq!(b.failed("a"), Duration::from_millis(500));
        b.succeeded("a");
        b.succeeded("b");
        assert!(b.failures.is_empty(), "only failing AORs are held");
    }

    #[test]
    fn a_store_address_in_a_log_line_has_no_password() {
        assert_eq!(
            without_password("redis://sip:s3cr@t@10.0.0.1:7000"),
            "redis://sip:…@10.0.0.1:7000"
        );
        assert_eq!(without_password("rediss://:pw@h:1"), "rediss://:…@h:1");
        assert_eq!(without_password("10.0.0.1:7000"), "10.0.0.1:7000");
        assert_eq!(without_password("redis://h:1"), "redis://h:1");
        assert_eq!(without_password("redis://user@h:1"), "redis://user@h:1");
    }

    #[test]
    fn the_sweep_reaches_each_master_with_the_seeds_credentials() {
        let first = |s: &str| seed_infos(&[s.to_string()]).unwrap().remove(0);
        let m = master_info(
            &first("redis://sip:s3cret@10.0.0.1:7000/2"),
            "10.0.0.2:7001",
        )
        .unwrap();
        assert_eq!(m.addr().to_string(), "10.0.0.2:7001");
        assert_eq!(m.redis_settings().username(), Some("sip"));
        assert_eq!(m.redis_settings().password(), Some("s3cret"));
        assert_eq!(m.redis_settings().db(), 2);
        let m = master_info(&first("10.0.0.1:7000"), "10.0.0.2:7001").unwrap();
        assert_eq!(m.redis_settings().password(), None);
        // TLS to the store: each master over TLS as well.
        let m = master_info(&first("rediss://10.0.0.1:7000"), "10.0.0.2:7001").unwrap();
        assert!(
            matches!(m.addr(), redis::ConnectionAddr::TcpTls { host, port: 7001, insecure: false, .. } if host == "10.0.0.2"),
            "{:?}",
            m.addr()
        );
        // CLUSTER NODES writes an IPv6 master unbracketed: before, the URL built from it
        // did not parse, and every such master was skipped.
        let m = master_info(&first("[2001:db8::1]:7000"), "2001:db8::2:7001").unwrap();
        assert!(
            matches!(m.addr(), redis::ConnectionAddr::Tcp(h, 7001) if h == "2001:db8::2"),
            "{:?}",
            m.addr()
        );
    }

    #[test]
    fn a_store_task_that_panics_stops_the_node() {
        // The thread went on without it, silently (no heartbeat: the other nodes counted
        // this one dead; no writer: no binding reached the store).
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let stop = Arc::new(OnceLock::new());
        rt.block_on(guard(&stop, "heartbeat", async { panic!("a bug") }));
        assert!(
            stop.get().is_some_and(|s| s.contains("heartbeat")),
            "{stop:?}"
        );
        let fine = Arc::new(OnceLock::new());
        rt.block_on(guard(&fine, "writer", async {}));
        assert!(fine.get().is_none());
    }

    #[test]
    fn a_nodes_liveness_read_by_read() {
        let t0 = Instant::now();
        let (lv, s) = (Duration::from_secs(3), Duration::from_secs);
        let mut l = Liveness::default();
        // Never seen, read absent: dead (no WARN: nothing was lost), once.
        assert_eq!(
            l.on_read("a", Ok(None), t0, lv),
            Seen::Down { known: false }
        );
        assert_eq!(l.on_read("a", Ok(None), t0, lv), Seen::Same);
        // A dead node whose read fails does not become unknown: its stale fields (a node
        // stopped, its bindings not yet expired) are not routed to either way, and lookups
        // for users who moved on answered 503 for it.
        assert_eq!(l.on_read("a", Err(()), t0, lv), Seen::Same);
        assert!(!l.unknown.contains("a"));
        assert_eq!(l.on_read("a", Ok(Some(7)), t0, lv), Seen::Up(7));
        assert_eq!(l.on_read("a", Ok(Some(7)), t0, lv), Seen::Same);
        // A failed read within its liveness: unknown, still alive.
        assert_eq!(l.on_read("a", Err(()), t0 + s(1), lv), Seen::Same);
        assert!(l.unknown.contains("a") && l.alive.contains_key("a"));
        // Past its liveness: no longer alive.
        assert_eq!(l.on_read("a", Err(()), t0 + s(4), lv), Seen::Unknown);
        assert!(!l.alive.contains_key("a"));
        // Then read absent (a hung host whose key's master failed over meanwhile): down,
        // its links to be closed. It was missed: only a node still counted alive was.
        assert_eq!(
            l.on_read("a", Ok(None), t0 + s(5), lv),
            Seen::Down { known: true }
        );
        assert!(!l.unknown.contains("a"));
        // Back with a new life, and down again.
        assert_eq!(l.on_read("a", Ok(Some(8)), t0 + s(6), lv), Seen::Up(8));
        assert_eq!(
            l.on_read("a", Ok(None), t0 + s(7), lv),
            Seen::Down { known: true }
        );
    }

    #[test]
    fn a_seed_without_credentials_takes_the_first_seeds() {
        // The client uses the first seed's credentials for every master and refused a list
        // whose seeds differed: the store thread stopped at start, and the node ran outside
        // its cluster (every miss 503, no heartbeat), with one log line.
        let store = |s: &[&str]| seed_infos(&s.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        let infos = store(&["redis://u:pw@10.0.0.1:7000", "10.0.0.2:7000"]).unwrap();
        assert_eq!(infos[1].redis_settings().password(), Some("pw"));
        assert_eq!(infos[1].redis_settings().username(), Some("u"));
        assert!(store(&["redis://u:pw@10.0.0.1:7000", "redis://u:pw@10.0.0.2:7000"]).is_ok());
        let e = store(&["10.0.0.1:7000", "redis://u:pw@10.0.0.2:7000"]).unwrap_err();
        assert!(e.contains("first seed") && !e.contains("pw"), "{e}");
        assert!(
            store(&[
                "redis://u:pw@10.0.0.1:7000",
                "redis://u:other@10.0.0.2:7000"
            ])
            .is_err()
        );
        assert!(store(&["redis://10.0.0.1:7000/1", "redis://10.0.0.2:7000/2"]).is_err());
        let e = store(&["10.0.0.1:7000", "unix:///run/redis.sock"]).unwrap_err();
        assert!(e.contains("not a usable"), "{e}");
        assert!(store(&["not a url://x"]).is_err());
    }

    #[test]
    fn clock_skew_is_measured_against_the_middle_of_the_round_trip() {
        // Redis says 1000.250 s; asked at 1000.000 s and answered at 1000.100 s here: this
        // node is 200 ms behind.
        assert_eq!(clock_skew_ms(1_000_000, 1_000_100, 1000, 250_000), -200);
        assert_eq!(clock_skew_ms(1_005_000, 1_005_000, 1000, 0), 5000);
    }

    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let nodes = "a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460\n\
                     b2 127.0.0.1:7002@17002 slave a1 0 0 1 connected\n\
                     c3 127.0.0.1:7003@17003 master,fail - 0 0 2 disconnected\n\
                     d4 127.0.0.1:7004@17004 master - 0 0 3 connected 5461-10000\n\
                     e5 127.0.0.1:7005@17005 master,nofailover - 0 0 4 connected 10001-16383\n\
                     f6 127.0.0.1:7006@17006 master,fail? - 0 0 5 connected\n";
        assert_eq!(
            masters(nodes),
            vec!["127.0.0.1:7001", "127.0.0.1:7004", "127.0.0.1:7005"]
        );
    }

    #[test]
    fn only_live_nodes_of_the_same_life_with_unexpired_bindings_are_routed_to() {
        let (writes, _w) = lane(1).unwrap();
        let (asks, _a) = lane(1).unwrap();
        let store = |node: &str, epoch| Store {
            writes: writes.clone(),
            asks: asks.clone(),
            resync: Arc::default(),
            down: Arc::default(),
            node: node.into(),
            epoch,
        };
        let now = 1_000_000;
        let b = |exp| {
            (
                exp,
                7u64,
                "<urn:uuid:1>",
                Some(1),
                "sip:u@192.0.2.1:5061;transport=tls",
            )
        };
        let (va, _) = store("a", 11).value(&[b(now + 5000)]).unwrap();
        let (vb, latest) = store("b", 22)
            .value(&[b(now + 100), b(now + 9000)])
            .unwrap();
        assert_eq!(latest, now + 9000);
        let (vc, _) = store("c", 33).value(&[b(now - 1)]).unwrap();
        assert!(store("a", 1).value(&[]).is_none());
        let fields = vec![
            ("a".to_string(), va),
            ("b".to_string(), vb),
            ("c".to_string(), vc),
            ("d".to_string(), "garbage".to_string()),
        ];
        let alive: HashMap<String, u64> = [("a", 11), ("b", 22), ("c", 33), ("d", 1)]
            .into_iter()
            .map(|(n, e)| (n.to_string(), e))
            .collect();
        // c's bindings have all expired; d's value is not ours to read; "me" is skipped.
        assert_eq!(live_holders(&fields, &alive, "me", now), vec!["a", "b"]);
        assert_eq!(live_holders(&fields, &alive, "a", now), vec!["b"]);
        // b restarted (a new epoch): what it stored in its previous life is not routed to.
        let alive2 = alive.clone();
        let mut restarted = alive;
        restarted.insert("b".into(), 23);
        assert_eq!(live_holders(&fields, &restarted, "me", now), vec!["a"]);
        // a's liveness key expired: dead.
        restarted.remove("a");
        assert!(live_holders(&fields, &restarted, "me", now).is_empty());
        // a's key could not be read at its last try (the store back from an outage longer
        // than a liveness): unknown, not dead. "No holder" dropped the removal a moved
        // device needed, and answered 480 for a user online on a. c (expired) and the
        // asking node itself do not count.
        // Unread for less than a liveness, a still counts as alive and is routed to.
        let unreadable = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        let dead = &restarted;
        for (unknown, alive, me, want) in [
            (&["a"][..], dead, "me", true),
            (&["a"], &alive2, "me", false),
            (&["c"], dead, "me", false),
            (&["a"], dead, "a", false),
            (&["e"], dead, "me", false),
            (&[], dead, "me", false),
        ] {
            assert_eq!(
                holders_unsure(&fields, &unreadable(unknown), alive, me, now),
                want,
                "{unknown:?} unknown, asked by {me}"
            );
        }
    }
}
