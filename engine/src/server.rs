//! Starting and stopping the shards: preflight, binding, the mesh, reload and drain.
//!
//! Lifecycle: [`start`] probes the host, loads TLS, binds every listener once per shard
//! (`SO_REUSEPORT`; once in all with `server.accept = "balanced"`), and spawns one pinned executor per shard. [`Running::drain`] (SIGTERM)
//! stops accepting, lets transactions finish up to `drain_timeout_s`, then closes every
//! connection with close_notify. [`Running::reload`] (SIGHUP) re-reads the configuration and
//! every TLS file and swaps the policy in only if all of it loaded.

use crate::config::{AcceptMode, ClientAuth, Config, ListenKind};
use crate::control::{Control, Identity, PerSource, connection_budget};
use crate::metrics::{ShardMetrics, Snapshot};
use crate::shard::{self, Shard, ShardMsg, admit};
use crate::sys;
use crate::tls::{RejectCounters, TlsPolicy};
use arc_swap::ArcSwap;
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Why the server could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// A running server.
pub struct Running {
    handles: Vec<std::thread::JoinHandle<Result<(), String>>>,
    /// Shared control.
    pub control: Arc<Control>,
    policy: Arc<ArcSwap<TlsPolicy>>,
    pub(crate) cfg: Arc<Config>,
    config_path: Option<PathBuf>,
    /// The actual address of each `[[listen]]` entry (ports resolved).
    pub listen_addrs: Vec<SocketAddr>,
    /// Number of shards.
    pub shards: usize,
    /// The admin endpoint's address, if enabled.
    pub admin_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("shards", &self.shards)
            .field("listen", &self.listen_addrs)
            .finish()
    }
}

/// The number of shards a configuration asks for: `server.shards`, or (0) every allowed CPU
/// from `server.first_cpu` on (every allowed CPU when shards float), and no more than the
/// cgroup's CPU quota ([`sys::cpus::usable`]: a container with a CPU limit sees the whole
/// node's CPUs).
pub fn shard_count(cfg: &Config) -> usize {
    if cfg.server.shards > 0 {
        return cfg.server.shards;
    }
    let allowed = sys::cpus::allowed().len();
    let n = if cfg.server.pin_shards {
        allowed.saturating_sub(cfg.server.first_cpu)
    } else {
        allowed
    };
    n.min(sys::cpus::usable()).max(1)
}

/// Starts the server. `config_path` is re-read on reload.
pub fn start(cfg: Config, config_path: Option<PathBuf>) -> Result<Running, StartError> {
    let n = shard_count(&cfg);
    let (allowed, usable) = (sys::cpus::allowed().len(), sys::cpus::usable());
    if cfg.server.shards == 0 && usable < allowed {
        tracing::info!(
            allowed_cpus = allowed,
            quota_cpus = usable,
            shards = n,
            "server.shards = 0: one shard per CPU, within the cgroup's CPU quota"
        );
    }
    // Shard i runs on the (first_cpu + i)-th CPU this process may use; refuse what does not
    // fit instead of wrapping onto CPUs that are not ours.
    // Unpinned (`pin_shards = false`), each shard floats within the allowed set.
    let allowed = sys::cpus::allowed();
    let cpus = (0..n)
        .map(|i| match cfg.server.pin_shards {
            true => sys::cpus::pick(&allowed, cfg.server.first_cpu, n, i).map(Some),
            false => Ok(None),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            StartError(format!(
                "server.shards ({n}) and server.first_cpu ({}): {e}",
                cfg.server.first_cpu
            ))
        })?;
    sys::probe::raise_limits();
    sys::probe::preflight(n).map_err(StartError)?;
    let policy =
        TlsPolicy::load(&cfg).map_err(|e| StartError(format!("TLS configuration: {e}")))?;
    let now = unix_now();
    for c in policy
        .certs
        .iter()
        .filter(|c| now >= c.not_after || now < c.not_before)
    {
        tracing::error!(file = %c.file.display(), not_before = c.not_before, not_after = c.not_after, "server certificate outside its validity period: every handshake that presents it fails (clients', partners', and ours as a client); renew it and reload");
    }
    let subscribers =
        crate::auth::subscribers(&cfg).map_err(|e| StartError(format!("auth.subscribers: {e}")))?;
    let key =
        crate::auth::node_key(&cfg).map_err(|e| StartError(format!("auth.secret_file: {e}")))?;
    if cfg.auth.enabled {
        tracing::info!(
            subscribers = subscribers.len(),
            algorithms = ?cfg.auth.algorithms,
            "client authentication on"
        );
    } else {
        tracing::warn!(
            "auth.enabled = false: any client may register any address-of-record and send as anyone (closed labs only)"
        );
    }
    for w in cfg.identity_warnings() {
        tracing::warn!("{w}");
    }
    let ktls = sys::ktls::probe();
    tracing::info!(ktls = %ktls.describe(), "kernel TLS probe");
    let store_subscribers = crate::auth::SharedSubscribers::default();
    let store = match &cfg.cluster {
        Some(c) => Some(
            crate::cluster::start(c, store_subscribers.clone())
                .map_err(|e| StartError(format!("cluster store thread: {e}")))?,
        ),
        None => None,
    };
    let epoch = Instant::now();
    let started = unix_now();
    let control = Arc::new(Control {
        store,
        draining: AtomicBool::new(false),
        hurry: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        snapshots: (0..n)
            .map(|i| {
                ArcSwap::from_pointee(Snapshot {
                    shard: i,
                    metrics: ShardMetrics::default(),
                })
            })
            .collect(),
        rejections: RejectCounters::default(),
        ktls,
        stopped: AtomicUsize::new(0),
        reloads: Default::default(),
        crls: ArcSwap::from_pointee(crls_in_force(policy.crl_dues.clone(), false, started)),
        crls_told: started.into(),
        reload_lock: std::sync::Mutex::new(()),
        tls_generation: Default::default(),
        load: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        anonymous: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        per_source: PerSource::default(),
        anonymous_per_source: PerSource::default(),
        anonymous_per_site: PerSource::default(),
        bindings_per_source: PerSource::default(),
        budget: connection_budget(&cfg, n),
        identity: Identity {
            key,
            epoch,
            failures: Arc::new(sipring_core::auth::FailureLedger::new(
                crate::auth::policy_config(&cfg).auth.max_tracked_sources,
                epoch,
            )),
            subscribers: crate::auth::SharedSubscribers(Arc::new(ArcSwap::from_pointee(
                subscribers,
            ))),
            store_subscribers,
        },
    });
    // Bind every listener now, in this thread, so errors surface before any shard starts.
    let mut bound: Vec<Vec<(ListenKind, ClientAuth, sys::sock::BoundListener)>> =
        (0..n).map(|_| Vec::new()).collect();
    let mut listen_addrs = Vec::new();
    let per_address = if cfg.server.accept == AcceptMode::Balanced {
        1
    } else {
        n
    };
    for l in &cfg.listen {
        let socks = sys::sock::bind_reuseport(l.address, per_address, l.backlog).map_err(|e| {
            StartError(format!(
                "cannot listen on {} ({:?}): {e}",
                l.address, l.kind
            ))
        })?;
        listen_addrs.push(socks[0].local);
        for (i, s) in socks.into_iter().enumerate() {
            bound[i].push((l.kind, l.client_auth, s));
        }
    }
    // Our Via/Record-Route port is the one we actually bound.
    let mut cfg = cfg;
    for (l, a) in cfg.listen.iter_mut().zip(&listen_addrs) {
        l.address = *a;
    }
    let cfg = Arc::new(cfg);
    let policy = Arc::new(ArcSwap::from_pointee(policy));
    let mesh = MeshBuilder::<ShardMsg, _>::full(n, cfg.server.mesh_capacity);
    let mut handles = Vec::new();
    for (i, listeners) in bound.into_iter().enumerate() {
        let placement = cpus[i].map_or(Placement::Unbound, Placement::Fixed);
        let mut b = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{i}"))
            .io_memory(cfg.server.io_memory_kib * 1024);
        if cfg.server.spin_before_park_us > 0 {
            b = b.spin_before_park(Duration::from_micros(cfg.server.spin_before_park_us));
        }
        let (mesh, cfg2, policy2, control2) =
            (mesh.clone(), cfg.clone(), policy.clone(), control.clone());
        let h = std::thread::Builder::new()
            .name(format!("sipring-shard-{i}"))
            .spawn(move || -> Result<(), String> {
                let ex = b.make().map_err(|e| format!("shard {i}: executor: {e}"))?;
                let r = ex.run(run_shard(
                    i,
                    n,
                    cfg2,
                    policy2,
                    control2.clone(),
                    mesh,
                    listeners,
                ));
                control2.stopped.fetch_add(1, Ordering::Relaxed);
                r
            })
            .map_err(|e| StartError(format!("spawn shard thread: {e}")))?;
        handles.push(h);
    }
    let mut running = Running {
        handles,
        control,
        policy,
        cfg,
        config_path,
        listen_addrs,
        shards: n,
        admin_addr: None,
    };
    if let Some(addr) = running.cfg.admin.address {
        running.admin_addr = Some(
            crate::admin::spawn(addr, &running)
                .map_err(|e| StartError(format!("admin endpoint {addr}: {e}")))?,
        );
    }
    Ok(running)
}

async fn run_shard(
    id: usize,
    n: usize,
    cfg: Arc<Config>,
    policy: Arc<ArcSwap<TlsPolicy>>,
    control: Arc<Control>,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    listeners: Vec<(ListenKind, ClientAuth, sys::sock::BoundListener)>,
) -> Result<(), String> {
    let (senders, receivers) = mesh
        .join()
        .await
        .map_err(|_| format!("shard thread {id}: mesh join failed"))?;
    // The mesh numbers peers in join order: that number is the shard id everywhere (connection
    // ids, branches, the AOR shard function), whatever thread or CPU this is.
    let id = senders.peer_id();
    let shard = Rc::new(Shard::new(
        id,
        n,
        cfg.clone(),
        policy,
        control.clone(),
        senders,
    ));
    shard::spawn_mesh_receivers(&shard, receivers);
    shard::spawn_store_replies(&shard);
    let mut accepting = Vec::new();
    for (kind, client_auth, l) in listeners {
        let listener = l.into_glommio();
        let s = shard.clone();
        accepting.push(glommio::spawn_local(async move {
            accept_loop(s, listener, kind, client_auth).await
        }));
    }
    // Accepting ends within 50 ms of draining: the accept tasks are cancelled (their futures,
    // which own the listeners, are dropped, closing the ports). The accept tasks themselves
    // wait on nothing but their listener (see `accept_loop`).
    let stop_accepting = glommio::spawn_local({
        let s = shard.clone();
        async move {
            while !s.control.draining() && !s.control.stopping() {
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            for a in accepting {
                a.cancel().await;
            }
        }
    });
    tracing::debug!(shard = id, "shard running");
    shard::timer_loop(shard.clone()).await;
    // Wait for the listeners to be closed, so a stopped server has released its ports when
    // `join` returns.
    stop_accepting.await;
    // Stopping: ask every connection to close (close_notify after its queued output) and
    // give them a moment.
    let conns: Vec<_> = shard.conns.borrow().values().cloned().collect();
    for c in conns {
        c.close("stopping");
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while (!shard.conns.borrow().is_empty() || shard.closing.get() > 0) && Instant::now() < deadline
    {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn accept_loop(
    shard: Rc<Shard>,
    listener: sys::sock::Listener,
    kind: ListenKind,
    client_auth: ClientAuth,
) {
    let mut backoff = Duration::from_millis(10);
    // Its own: every successful accept resets the one above.
    let mut handoff_backoff = Duration::from_millis(10);
    let mut in_a_row = 0u32;
    loop {
        // A full accept queue completes every accept at once: without a turn for the rest
        // of the shard (its timers, shedding, connections, mesh), a connect flood it
        // mostly refuses stalled it for as long as the queue stayed full.
        in_a_row += 1;
        if in_a_row == ACCEPTS_IN_A_ROW {
            in_a_row = 0;
            futures_lite::future::yield_now().await;
        }
        // Nothing but the listener may wake this task while it waits here: glommio's accept
        // keeps a clone of the task's waker each time it is polled while pending, and a
        // task's waker count is an i16. Raced against a 50 ms timer (how draining used to
        // stop it), a listener that accepted nothing for 27 minutes hit that bound inside
        // the timer's wake: glommio caught the panic, and the task was never scheduled
        // again. The listener stopped accepting for good (connections waited in the
        // backlog), and the next one to arrive overflowed the count (a debug build panics
        // there). Draining cancels this task instead (see `run_shard`).
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                let e = std::io::Error::from(e);
                let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                shard.count(if out_of_fds {
                    "sipring_accept_errors_total{reason=\"descriptors\"}"
                } else {
                    "sipring_accept_errors_total{reason=\"other\"}"
                });
                if let Some(left_out) = shard.refusal_log.allow(Instant::now()) {
                    tracing::warn!(error = %e, left_out, "accept failed (at most one line a second)");
                }
                if out_of_fds {
                    // Give the reserve descriptor back for a moment to take the waiting
                    // connection off the queue and close it: the peer is told at once
                    // instead of waiting, and the loop does not spin on the same error.
                    shard.release_reserve_fd();
                    let _ = listener.refuse_one();
                    shard.take_reserve_fd();
                }
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        if shard.cfg.server.accept == AcceptMode::Balanced && shard.n > 1 {
            // Hand the connection to the least-loaded shard (which checks the limits),
            // unless the process is at its budget (refused here, below: a handed socket
            // holds a descriptor until its shard takes it).
            let target = least_loaded(&shard.control);
            let process_total: usize = shard
                .control
                .load
                .iter()
                .map(|l| l.load(Ordering::Relaxed))
                .sum();
            if target != shard.id && process_total < shard.control.budget {
                shard.count("sipring_cross_shard_total{op=\"adopt\"}");
                match sys::sock::into_owned_fd(stream) {
                    Ok(fd) => {
                        handoff_backoff = Duration::from_millis(10);
                        shard.adopt_elsewhere(target, fd, kind, client_auth)
                    }
                    Err(e) => {
                        if let Some(left_out) = shard.refusal_log.allow(Instant::now()) {
                            tracing::warn!(error = %e, left_out, "cannot hand a connection to another shard; closed it (at most one line a second)");
                        }
                        glommio::timer::sleep(handoff_backoff).await;
                        handoff_backoff = (handoff_backoff * 2).min(Duration::from_secs(1));
                    }
                }
                continue;
            }
        }
        admit(&shard, stream, kind, client_auth);
    }
}

/// Connections a listener accepts in a row before it yields to the rest of its shard.
const ACCEPTS_IN_A_ROW: u32 = 32;

/// The shard with the fewest connections and handshakes.
fn least_loaded(control: &Control) -> usize {
    control
        .load
        .iter()
        .enumerate()
        .min_by_key(|(_, l)| l.load(Ordering::Relaxed))
        .map_or(0, |(i, _)| i)
}

/// How long a drain that waited for transactions serves on after the last of them ended
/// ([`Running::drain`]): the ACKs of the 2xx answers that ended them.
pub const DRAIN_ACK_GRACE: Duration = Duration::from_secs(2);

impl Running {
    /// Re-reads the configuration file (if any) and every TLS file; swaps the new policy in
    /// for new handshakes on every shard, or keeps the old one and says why.
    pub fn reload(&self) -> Result<(), String> {
        Reloader::of(self).reload()
    }

    /// Stops accepting; lets transactions finish for up to `drain_timeout_s`, then stops.
    /// With connections still up it serves [`DRAIN_ACK_GRACE`] longer: a call answered at
    /// the end of the drain has its 2xx's ACK still to come (end to end, along our
    /// Record-Route), and without it the callee tears the call down.
    pub fn drain(&self) {
        self.control.draining.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(self.cfg.server.drain_timeout_s);
        let in_progress = || {
            self.merged()
                .gauges
                .get("sipring_requests_in_progress")
                .copied()
                .unwrap_or(0)
        };
        // Connections of any kind up (each `sipring_connections{kind}` series).
        let connected = || {
            self.merged()
                .gauges
                .iter()
                .any(|(k, v)| k.starts_with("sipring_connections{") && *v > 0)
        };
        while Instant::now() < deadline && !self.control.hurried() {
            // Snapshots are published every 500 ms: give the shards time to publish once
            // after draining began, then wait for requests still awaiting a final answer.
            std::thread::sleep(Duration::from_millis(600));
            if in_progress() == 0 {
                // With connections up, a 2xx may have just gone out whose ACK is on its way
                // (snapshots are too coarse to tell): a short grace. Idle: at once.
                let end = deadline.min(Instant::now() + DRAIN_ACK_GRACE);
                while connected() && Instant::now() < end && !self.control.hurried() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                break;
            }
        }
        self.stop();
    }

    /// Closes every connection (close_notify) and stops the shards.
    pub fn stop(&self) {
        self.control.draining.store(true, Ordering::Relaxed);
        // Out of the cluster first: its peers stop routing here before the connections go.
        if let (Some(store), Some(c)) = (&self.control.store, &self.cfg.cluster)
            && !self.control.stopping.load(Ordering::Relaxed)
        {
            // A beat on its way first (at most the store timeout), then the deletion.
            store.withdraw(Duration::from_millis(2 * c.store_timeout_ms + 100));
        }
        self.control.stopping.store(true, Ordering::Relaxed);
        // The admin thread blocks in accept(): one connection wakes it to see `stopping` and
        // close its listener.
        if let Some(a) = self.admin_addr {
            let _ = std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200));
        }
    }

    /// Shards that ended while nothing asked them to stop (a panic): their connections and
    /// tables are gone while the others, the admin port and the cluster heartbeat go on.
    pub fn failed_shards(&self) -> Vec<usize> {
        if self.control.stopping.load(Ordering::Relaxed) {
            return Vec::new();
        }
        (0..self.handles.len())
            .filter(|&i| self.handles[i].is_finished())
            .collect()
    }

    /// Logs the CRLs that lapsed since the last call (the binary calls it every 100 ms): a
    /// CRL read where unknown status is refused then stops every new connection whose
    /// certificate it covers — partners' links that drop cannot come back — and before, the
    /// operator heard of it only at the next reload.
    pub fn watch_crls(&self) {
        for due in self.control.lapsed_crls(unix_now()) {
            tracing::warn!(file = %due.file.display(), "CRL reached its nextUpdate: new connections whose certificates it covers are refused (unknown_revocation = \"deny\"), connections up stay until a reload checks them again; fetch a fresh one and reload");
        }
    }

    /// Why this process must stop on its own, if it must: a shard that died, or another live
    /// process running as this cluster node.
    pub fn fatal(&self) -> Option<String> {
        let failed = self.failed_shards();
        if !failed.is_empty() {
            return Some(format!(
                "shards {failed:?} stopped on their own (see the panic above)"
            ));
        }
        if let Some(why) = self.control.store.as_ref().and_then(|s| s.stopped()) {
            return Some(why.to_string());
        }
        match &self.control.store {
            Some(s) if s.name_taken() => Some(format!(
                "another live process runs as cluster node {:?}",
                self.cfg
                    .cluster
                    .as_ref()
                    .map(|c| c.node.as_str())
                    .unwrap_or("")
            )),
            _ => None,
        }
    }

    /// Waits for every shard to finish; `Err` lists shard failures.
    pub fn join(mut self) -> Result<(), String> {
        join_all(std::mem::take(&mut self.handles), None)
    }

    /// [`Running::join`], for at most `bound` once [`Running::stop`] has run: a shard whose
    /// executor is stuck (a panic inside the runtime, seen once while draining) would
    /// otherwise hold the process until its supervisor's SIGKILL. `Err` names those that
    /// did not stop; the process then exits without them.
    pub fn join_within(mut self, bound: Duration) -> Result<(), String> {
        join_all(std::mem::take(&mut self.handles), Some(bound))
    }

    /// All shards' latest metrics, merged.
    pub fn merged(&self) -> ShardMetrics {
        merge(&self.control)
    }
}

/// A server dropped without [`Running::join`] (a caller that returned early, a test that
/// failed half-way) is told to stop, so that its shards do not serve on unowned: they
/// finish on their own threads, not waited for here.
impl Drop for Running {
    fn drop(&mut self) {
        if !self.handles.is_empty() {
            self.stop();
        }
    }
}

/// Merges the latest snapshots of every shard, with the process's own families
/// ([`process_metrics`]).
pub fn merge(control: &Control) -> ShardMetrics {
    let mut m = process_metrics(control);
    for s in &control.snapshots {
        m.merge(&s.load().metrics);
    }
    m
}

/// The families no shard holds (TLS rejections, reloads, kernel TLS): both `/metrics` and
/// `/metrics/shards` carry them.
pub fn process_metrics(control: &Control) -> ShardMetrics {
    let mut m = ShardMetrics::default();
    for r in crate::tls::Rejection::ALL {
        let v = control.rejections.get(r);
        if v > 0 {
            m.counters.insert(
                format!("sipring_tls_rejections_total{{reason=\"{}\"}}", r.label()),
                v,
            );
        }
    }
    m.counters.insert(
        "sipring_reloads_total{result=\"ok\"}".into(),
        control.reloads[0].load(Ordering::Relaxed),
    );
    m.counters.insert(
        "sipring_reloads_total{result=\"refused\"}".into(),
        control.reloads[1].load(Ordering::Relaxed),
    );
    m.gauges.insert(
        "sipring_ktls_available".into(),
        i64::from(control.ktls.available()),
    );
    for due in control.crls.load().iter() {
        if let Some(next) = due.next {
            m.gauges.insert(
                format!(
                    "sipring_tls_crl_next_update_seconds{{file=\"{}\"}}",
                    crate::metrics::label_value(&due.file.display().to_string())
                ),
                next,
            );
        }
    }
    m
}

/// The handle the admin thread uses to reload (it has no `Running`).
#[derive(Clone)]
pub struct Reloader {
    policy: Arc<ArcSwap<TlsPolicy>>,
    cfg: Arc<Config>,
    path: Option<PathBuf>,
    control: Arc<Control>,
}

/// What a reload may not change, if the new configuration changes it. The shards' SIP
/// policy (who each partner and cluster node is, what it may do) and our domains are built
/// once at start, while a reload swaps the TLS policy that names connections: a partner
/// added, or a name given other rights, would be trusted by one and judged by the other
/// (a node's name moved to a partner kept a node's rights). Removing a partner is fine:
/// its connections are closed ([`crate::recheck`]) and nothing else can take its name.
fn needs_restart(running: &Config, new: &Config) -> Option<String> {
    let old = crate::auth::policy_config(running);
    let new_policy = crate::auth::policy_config(new);
    let names: Vec<String> = new.peer.iter().map(|p| p.name.clone()).collect();
    // A partner removed leaves the others' `relay_to` with it: theirs may drop its name
    // (the validation insists every name there is configured), else it could not be
    // removed by a reload at all.
    let relaying_to_kept = |p: &sipring_core::policy::PartnerPolicy| {
        let mut p = p.clone();
        p.relay_to.retain(|r| names.contains(r));
        p
    };
    for p in &new_policy.partners {
        match old.partners.iter().find(|o| o.name == p.name) {
            None => return Some(format!("partner {:?} added", p.name)),
            Some(o) if relaying_to_kept(o) != *p => {
                return Some(format!(
                    "partner {:?} changed (domains, relay_to, assert_identity, numbers or node)",
                    p.name
                ));
            }
            Some(_) => {}
        }
    }
    // Everything else is read once, at start, by the shards, the listeners or the store
    // thread: a reload that changes it would say "reloaded" and change nothing. What a
    // reload swaps is blanked out before comparing: certificates, versions, suites,
    // resumption, roots, CRLs, trusted names and subscribers; and a removed partner.
    let reloadable = |c: &Config, keep: &[String]| {
        let mut c = c.clone();
        let t = &mut c.tls;
        t.certificate.clear();
        (t.versions, t.cipher_suites, t.kx_groups) = Default::default();
        (t.resumption, t.partner_ca_hints) = Default::default();
        (t.client_roots, t.client_crls) = Default::default();
        c.peer.retain(|p| keep.contains(&p.name));
        // The order of [[peer]] tables means nothing.
        c.peer.sort_by(|a, b| a.name.cmp(&b.name));
        for p in &mut c.peer {
            p.relay_to.retain(|r| keep.contains(r));
            (p.roots, p.crls, p.trusted_names) = Default::default();
            (p.server_name, p.allow_wildcards) = Default::default();
            p.unknown_revocation = Default::default();
        }
        if let Some(cl) = &mut c.cluster {
            (cl.roots, cl.crls) = Default::default();
        }
        c.auth.subscribers = None;
        c
    };
    let (a, mut b) = (reloadable(running, &names), reloadable(new, &names));
    // A listener on port 0 was given its port at start (the running copy says which).
    for (n, r) in b.listen.iter_mut().zip(&a.listen) {
        if n.address.port() == 0 && n.address.ip() == r.address.ip() {
            n.address = r.address;
        }
    }
    let differs = [
        ("server", a.server != b.server),
        ("listen", a.listen != b.listen),
        ("tls", a.tls != b.tls),
        ("peer (addresses and routes)", a.peer != b.peer),
        ("registrar", a.registrar != b.registrar),
        ("limits", a.limits != b.limits),
        ("admin", a.admin != b.admin),
        ("auth", a.auth != b.auth),
        ("cluster", a.cluster != b.cluster),
    ];
    differs
        .iter()
        .find(|(_, d)| *d)
        .map(|(what, _)| format!("[{what}] changed"))
}

impl Reloader {
    /// From a running server.
    pub fn of(r: &Running) -> Reloader {
        Reloader {
            policy: r.policy.clone(),
            cfg: r.cfg.clone(),
            path: r.config_path.clone(),
            control: r.control.clone(),
        }
    }

    /// See [`Running::reload`].
    pub fn reload(&self) -> Result<(), String> {
        let _one_at_a_time = self
            .control
            .reload_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.reload_locked()
    }

    /// [`Reloader::reload`] unless another reload (a SIGHUP's) runs: `None` then, at once.
    pub fn try_reload(&self) -> Option<Result<(), String>> {
        let _one_at_a_time = match self.control.reload_lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(self.reload_locked())
    }

    fn reload_locked(&self) -> Result<(), String> {
        let cfg = match &self.path {
            Some(p) => match Config::load(p) {
                Ok(c) => c,
                Err(errs) => {
                    // The commonest mistake (a typo in the main file) is logged and counted
                    // like any other refusal: SIGHUP has nobody to answer to.
                    let reason = errs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ");
                    self.control.reloads[1].fetch_add(1, Ordering::Relaxed);
                    tracing::error!(file = %p.display(), %reason, "reload refused; the previous TLS configuration and subscribers stay");
                    return Err(reason);
                }
            },
            None => (*self.cfg).clone(),
        };
        if let Some(what) = needs_restart(&self.cfg, &cfg) {
            self.control.reloads[1].fetch_add(1, Ordering::Relaxed);
            tracing::error!(%what, "reload refused: this change needs a restart; the previous TLS configuration and subscribers stay");
            return Err(format!("{what}: needs a restart"));
        }
        // Partner names a reload may change (server_name, trusted_names): said again.
        for w in cfg.identity_warnings() {
            tracing::warn!("{w}");
        }
        let loaded = TlsPolicy::load(&cfg)
            .map_err(|e| {
                (
                    e.file.display().to_string(),
                    e.reason.clone(),
                    e.to_string(),
                )
            })
            .and_then(|p| {
                crate::auth::subscribers_read_once(&cfg)
                    .map_err(|e| ("auth.subscribers".to_string(), e.clone(), e))
                    .and_then(|(s, blank)| {
                        // An empty file (no byte but whitespace) where there were
                        // subscribers is a file caught mid-write (`… > file` truncates it
                        // first), not an operator removing everyone — who leaves a comment
                        // saying so: refused, as the cluster's empty table is.
                        let before = self.control.identity.subscribers.0.load().len();
                        if s.is_empty() && before > 0 && blank {
                            let why = format!(
                                "the subscriber file has no subscribers (it had {before}): caught mid-write? \
                                 Write it elsewhere and rename it over"
                            );
                            return Err(("auth.subscribers".to_string(), why.clone(), why));
                        }
                        Ok((p, s))
                    })
            });
        // A server certificate outside its validity (an old pair restored, a deploy hook
        // that wrote the wrong file) would fail every handshake, clients' and partners'
        // (ours as a client too): refused, the one in force stays.
        // Only a certificate this reload brings: one already in force (a lapsed SNI
        // certificate nobody removed) must not block every other reload — a rotation of the
        // main certificate, a subscriber revoked. A notBefore a few minutes ahead is an
        // issuing CA's clock, not a wrong file.
        let now = unix_now();
        let in_force = self.policy.load_full();
        let loaded = loaded.and_then(|(p, subs)| {
            match p.certs.iter().find(|c| {
                (now >= c.not_after || now + NOT_BEFORE_SKEW_S < c.not_before)
                    && !in_force.certs.iter().any(|o| o.chain == c.chain)
            }) {
                Some(c) => {
                    let why = if now >= c.not_after {
                        format!(
                            "certificate expired {} hours ago",
                            (now - c.not_after) / 3600
                        )
                    } else {
                        format!(
                            "certificate not valid for another {} hours",
                            (c.not_before - now) / 3600
                        )
                    };
                    let file = c.file.display().to_string();
                    Err((file.clone(), why.clone(), format!("{file}: {why}")))
                }
                None => Ok((p, subs)),
            }
        });
        match loaded {
            Ok((p, subs)) => {
                // What was told here is not told again by `watch_crls`: marked before the
                // list it reads is replaced.
                let crls = crls_in_force(p.crl_dues.clone(), true, now);
                self.policy.store(Arc::new(p));
                self.control.tls_generation.fetch_add(1, Ordering::Release);
                let n = subs.len();
                self.control.identity.subscribers.0.store(Arc::new(subs));
                self.control.reloads[0].fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    subscribers = n,
                    "TLS configuration reloaded (and the subscriber file)"
                );
                self.control.crls_told.fetch_max(now, Ordering::Relaxed);
                self.control.crls.store(Arc::new(crls));
                Ok(())
            }
            Err((file, reason, whole)) => {
                self.control.reloads[1].fetch_add(1, Ordering::Relaxed);
                tracing::error!(%file, %reason, "reload refused; the previous TLS configuration and subscribers stay");
                Err(whole)
            }
        }
    }
}

/// Now, in unix seconds.
fn unix_now() -> i64 {
    (crate::cluster::unix_ms() / 1000)
        .try_into()
        .unwrap_or(i64::MAX)
}

/// The CRL files `cfg` names and when they fall due ([`Control::crls`]), after logging what
/// an operator must act on: those lapsed (their certificates are refused) and those due
/// within a day, in scopes that refuse unknown revocation status.
/// How far ahead of our clock a new server certificate's notBefore may be (its CA's clock).
const NOT_BEFORE_SKEW_S: i64 = 300;

fn crls_in_force(
    crls: Vec<crate::tls::CrlDue>,
    reloaded: bool,
    now: i64,
) -> Vec<crate::tls::CrlDue> {
    for due in crls.iter().filter(|d| d.enforced) {
        match due.next {
            Some(next) if next <= now && reloaded => {
                tracing::warn!(file = %due.file.display(), hours_ago = (now - next) / 3600, "CRL past its nextUpdate: the certificates it covers are refused (unknown_revocation = \"deny\"), and their connections close now; fetch a fresh one and reload");
            }
            Some(next) if next <= now => {
                tracing::warn!(file = %due.file.display(), hours_ago = (now - next) / 3600, "CRL past its nextUpdate: the certificates it covers are refused (unknown_revocation = \"deny\"); fetch a fresh one and reload");
            }
            Some(next) if next - now < 86_400 => {
                tracing::warn!(file = %due.file.display(), hours_left = (next - now) / 3600, "CRL falls due within a day: from its nextUpdate the certificates it covers are refused (unknown_revocation = \"deny\"); fetch a fresh one and reload before then (sipring_tls_crl_next_update_seconds)");
            }
            _ => {}
        }
    }
    crls
}

/// Joins `handles` (shard threads), waiting at most `bound` for them to finish: `Err`
/// lists the failures and the shards that did not stop in time (left running).
fn join_all(
    handles: Vec<std::thread::JoinHandle<Result<(), String>>>,
    bound: Option<Duration>,
) -> Result<(), String> {
    if let Some(bound) = bound {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline && !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut errs = Vec::new();
    let mut stuck = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        if bound.is_some() && !h.is_finished() {
            stuck.push(i);
            continue;
        }
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errs.push(e),
            Err(_) => errs.push("a shard panicked".into()),
        }
    }
    if !stuck.is_empty() {
        errs.push(format!(
            "shards {stuck:?} did not stop within {:?}",
            bound.unwrap_or_default()
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why `accept_loop` waits on its listener alone: glommio 0.9's accept keeps a clone of
    /// the task's waker each time it is polled while pending, and a task's waker count is an
    /// i16. Raced against anything that wakes the task (draining's 50 ms timer did), the
    /// 32,767th poll breaks the task. An accept in a task of its own is polled only by its
    /// listener, however busy the rest of the shard is. If glommio stops keeping the clones,
    /// the first half fails: the cancellation in `run_shard` could then go.
    #[test]
    fn an_accept_polled_again_and_again_breaks_its_task_and_one_left_alone_does_not() {
        const POLLS: u32 = 40_000;
        let raced = std::thread::spawn(|| {
            LocalExecutorBuilder::default().make().unwrap().run(async {
                let l = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let mut n = 0;
                futures_lite::future::or(async { Some(l.accept().await) }, async {
                    while n < POLLS {
                        futures_lite::future::yield_now().await;
                        n += 1;
                    }
                    None
                })
                .await
                .is_none()
            })
        })
        .join();
        assert!(
            raced.is_err(),
            "a pending accept polled {POLLS} times kept working"
        );

        let alone = std::thread::spawn(|| {
            LocalExecutorBuilder::default().make().unwrap().run(async {
                let l = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = l.local_addr().unwrap();
                let accepting = glommio::spawn_local(async move { l.accept().await.is_ok() });
                // The rest of the shard: POLLS turns of another task.
                for _ in 0..POLLS {
                    futures_lite::future::yield_now().await;
                }
                let c = std::net::TcpStream::connect(addr).unwrap();
                let ok = accepting.await;
                drop(c);
                ok
            })
        })
        .join();
        assert_eq!(alone.ok(), Some(true));
    }

    #[test]
    fn a_shard_that_does_not_stop_does_not_hold_the_process() {
        let done = std::thread::spawn(|| Ok(()));
        let failed = std::thread::spawn(|| Err("shard 1: boom".to_string()));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // Stuck until the test ends (the channel's sender is dropped then).
        let stuck = std::thread::spawn(move || {
            let _ = rx.recv();
            Ok(())
        });
        // Without the bound this waits for the stuck shard for good.
        let r = join_all(vec![done, failed, stuck], Some(Duration::from_millis(200)));
        assert_eq!(
            r,
            Err("shard 1: boom; shards [2] did not stop within 200ms".to_string())
        );
        drop(tx);
        let ok = std::thread::spawn(|| Ok(()));
        assert_eq!(join_all(vec![ok], None), Ok(()));
    }
}
