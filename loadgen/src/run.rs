//! The thread-per-core runner: one glommio executor per shard, each owning a share of the
//! user agents (connections) and generating its share of the load open-loop.
//!
//! Rate control does not lie: the i-th transaction of a shard is *intended* at
//! `start + i / rate` (with an optional linear ramp) and its latency is measured from that
//! intended time, so when the server (or the generator) falls behind, the delay shows up in
//! the tail instead of silently lowering the rate (coordinated-omission correction). Late
//! sends are counted and reported.

use crate::stats::Stats;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::{LocalSender, new_bounded};
use glommio::net::TcpStream;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use sipring_core::response::{ResponseParts, response_to};
use sipring_core::{
    Frame, Framer, Framing, Header, HeaderName, KeepaliveRole, Limits, Method, Status, parse,
};
use sipring_net::session::TlsSession;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What a plan does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// REGISTER at the rate, cycling over the users (refreshes).
    Register,
    /// MESSAGE between registered users.
    Message,
    /// INVITE/180/200/ACK, hold, BYE.
    Call,
    /// Connect, handshake, one OPTIONS, close.
    Handshake,
    /// Hold registered connections with CRLF keepalives.
    Idle,
}

/// How to connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TLS (server authenticated).
    Tls,
    /// Mutual TLS (client certificate).
    Mtls,
    /// Plain TCP.
    Tcp,
}

/// One scenario's settings.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Name (for mix reports).
    pub name: String,
    /// What to do.
    pub scenario: Scenario,
    /// The servers (cluster nodes): UA `u` connects to `targets[u % len]`.
    pub targets: Vec<SocketAddr>,
    /// TLS, MTLS or TCP.
    pub transport: Transport,
    /// TLS client configuration (None for TCP).
    pub tls: Option<Arc<ClientConfig>>,
    /// Per-UA client configurations (MTLS with `--cert-dir`): UA `u` uses entry
    /// `u % len`; empty when every UA shares `tls`.
    pub tls_per_ua: Vec<Arc<ClientConfig>>,
    /// SNI / expected server name.
    pub server_name: String,
    /// SIP domain of the users.
    pub domain: String,
    /// User name prefix (users are `<prefix><n>`).
    pub prefix: String,
    /// Number of user agents (connections).
    pub users: usize,
    /// Transactions (or calls, handshakes) per second, all shards together.
    pub rate: f64,
    /// Measured duration (after warm-up).
    pub duration: Duration,
    /// Stop after this many transactions (all shards), if set.
    pub count: Option<u64>,
    /// Sent but not measured at the start.
    pub warmup: Duration,
    /// Linear ramp from 0 to `rate` over this long.
    pub ramp: Duration,
    /// Call hold time.
    pub hold: Duration,
    /// Most calls up at once (all shards).
    pub max_concurrent: usize,
    /// REGISTER expiry, seconds.
    pub expires: u32,
    /// Unregister at the end.
    pub unregister: bool,
    /// Keepalive interval (idle scenario).
    pub keepalive: Duration,
    /// Transaction timeout.
    pub timeout: Duration,
    /// Source addresses to spread connections over (empty: the kernel's choice).
    pub local_addrs: Vec<IpAddr>,
    /// Connections opened at once per shard during setup.
    pub connect_concurrency: usize,
    /// AORs each UA registers (`<user>`, `<user>x1`, …): a table of millions of AORs within
    /// a descriptor limit. Setup registers each UA's first; the `register` scenario's
    /// transactions go through all of them, every UA's first AOR, then every UA's second, …
    /// (so a warm-up of users × N transactions fills the table). Open registration only (the
    /// UA authenticates as `<user>`).
    pub aors_per_ua: usize,
    /// Reconnect (and re-register) a user agent whose connection is lost, until the run ends:
    /// a server restart becomes a measured reconnect storm (`reconnect` histogram: from the
    /// loss to the new registration's 200).
    pub reconnect: bool,
    /// Digest password of each UA, `{user}` replaced by its user name (e.g. `pw-{user}`):
    /// the UAs answer 401/407 challenges and then send credentials with every request, the
    /// nonce reused with a rising nonce-count, as phones do. `None`: no credentials.
    pub password: Option<String>,
    /// Do RFC 7339 overload control, loss-based, as a cooperating upstream proxy or SBC
    /// would: advertise `oc` in every Via, and drop the share of new requests (MESSAGE,
    /// INVITE, REGISTER of the measured phase) each server asks for before sending them
    /// (counted as `oc_dropped`, neither sent nor failed).
    pub overload_control: bool,
}

impl Plan {
    /// The server UA `u` (or handshake `u`) connects to.
    pub fn target(&self, u: usize) -> SocketAddr {
        self.targets[u % self.targets.len().max(1)]
    }

    /// The TLS client configuration UA `u` connects with.
    pub fn tls_for(&self, u: usize) -> Option<&Arc<ClientConfig>> {
        match self.tls_per_ua.len() {
            0 => self.tls.as_ref(),
            n => self.tls_per_ua.get(u % n),
        }
    }
}

/// Live counters the main thread prints once a second.
#[derive(Debug, Default)]
pub struct Progress {
    /// Transactions started.
    pub sent: AtomicU64,
    /// Answered.
    pub answered: AtomicU64,
    /// Failed.
    pub failed: AtomicU64,
    /// Worst p99 (µs) any shard has seen so far.
    pub p99_us: AtomicU64,
    /// Connections up.
    pub connections: AtomicU64,
    /// Shards done with setup, per plan index (a barrier so no one calls a user who is not
    /// registered yet). At most [`MAX_PLANS`] plans.
    pub ready: [std::sync::atomic::AtomicUsize; MAX_PLANS],
    /// Shards done sending for a plan, their own calls finished (a barrier before anyone
    /// unregisters: a user must not leave while another shard may still call it).
    pub quiet: [std::sync::atomic::AtomicUsize; MAX_PLANS],
    /// Shards whose transactions are all answered or timed out (a barrier before anyone
    /// closes its connections: a UA keeps answering until every shard has drained, so the
    /// end of a run never shows the generator's own failures).
    pub drained: std::sync::atomic::AtomicUsize,
    /// Set by SIGTERM/SIGINT: an `idle` run ends at once and reports what it measured.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Most scenarios one run (a mix) can hold.
pub const MAX_PLANS: usize = 16;

struct Pending {
    kind: &'static str,
    /// When it was meant to go (its latency counts from here: no coordinated omission).
    t0: Instant,
    /// When it went: its timeout counts from here (a re-registration whose reconnect took
    /// longer than the timeout was failed within 100 ms of being sent).
    sent_at: Instant,
    /// Its CSeq number: an answer is its own only with it (a REGISTER's Call-ID is the
    /// AOR's for every refresh; a BYE shares its INVITE's).
    cseq: u64,
    measured: bool,
    ua: usize,
    invite: Option<InviteState>,
    /// How to send it again with credentials after a 401/407 (once).
    retry: Option<Retry>,
}

/// What a challenged transaction needs to be sent again.
#[derive(Clone)]
enum Retry {
    Register {
        expires: u32,
        /// Which of the UA's AORs.
        k: usize,
    },
    Request {
        to: usize,
        method: &'static str,
        body: &'static str,
        cseq: u32,
    },
}

/// A UA's digest state: the challenge it answered (realm, nonce, algorithm) and its
/// nonce-count.
struct Digest {
    realm: String,
    nonce: String,
    alg: sipring_core::auth::Algorithm,
    nc: u32,
}

struct InviteState {
    got100: bool,
    got180: bool,
}

struct Ua {
    tx: LocalSender<Vec<u8>>,
    local: SocketAddr,
    /// The server it is connected to.
    target: SocketAddr,
    /// Advertises overload control (`oc` in its Via).
    oc: bool,
    user: String,
    password: Option<String>,
    digest: RefCell<Option<Digest>>,
}

impl Ua {
    /// Takes a challenge from a 401/407; `false` when there is none we can answer.
    fn take_challenge(&self, m: &sipring_core::Message<'_, '_>) -> bool {
        if self.password.is_none() {
            return false;
        }
        for h in m.headers() {
            if (h.raw_name.eq_ignore_ascii_case(b"WWW-Authenticate")
                || h.raw_name.eq_ignore_ascii_case(b"Proxy-Authenticate"))
                && let Some((realm, nonce, alg, _)) = sipring_core::auth::parse_challenge(h.value)
            {
                *self.digest.borrow_mut() = Some(Digest {
                    realm,
                    nonce,
                    alg,
                    nc: 0,
                });
                return true;
            }
        }
        false
    }

    /// The credentials header line for a request, or nothing before the first challenge.
    fn credentials(&self, method: &str, uri: &str) -> String {
        let (Some(pw), Some(d)) = (
            &self.password,
            self.digest.borrow_mut().as_mut().map(|d| {
                d.nc += 1;
                (d.realm.clone(), d.nonce.clone(), d.alg, d.nc)
            }),
        ) else {
            return String::new();
        };
        let (realm, nonce, alg, nc) = d;
        let ha1 = alg.ha1(&self.user, &realm, pw);
        let v = sipring_core::auth::authorization(
            alg,
            &self.user,
            &realm,
            &ha1,
            &nonce,
            nc,
            &format!("{:x}{nc:x}", self.local.port()),
            method,
            uri,
        );
        let name = if method == "REGISTER" {
            "Authorization"
        } else {
            "Proxy-Authorization"
        };
        format!("{name}: {v}\r\n")
    }
}

struct Shard {
    id: usize,
    n: usize,
    stats: RefCell<Stats>,
    pending: RefCell<HashMap<String, Pending>>,
    progress: Arc<Progress>,
    uas: RefCell<HashMap<usize, Rc<Ua>>>,
    active_calls: Cell<usize>,
    /// The run is ending: lost connections are not re-established.
    stopping: Cell<bool>,
    handshakes: Cell<usize>,
    /// The end-of-run drain is over: what a handshake still out finds now is not counted
    /// (it was counted lost with the rest).
    drained: Cell<bool>,
    /// The measured phase of this shard's plans (from the end of warm-up to the last
    /// measured send, or the planned end): what `seconds` and the rates are per.
    measured_span: Cell<Option<(Instant, Instant)>>,
    /// Setup registrations told to come back later (503 + Retry-After), not yet sent again.
    setup_retries: Cell<usize>,
    /// Some setup registration was told to retry.
    setup_retried: Cell<bool>,
    seq: Cell<u64>,
    rng: Cell<u64>,
    /// RFC 7339 state per server (`--overload-control`).
    throttles: RefCell<HashMap<SocketAddr, sipring_core::overload_control::Throttle>>,
}

impl Shard {
    fn next(&self) -> u64 {
        let s = self.seq.get() + 1;
        self.seq.set(s);
        s
    }

    fn rand(&self, n: usize) -> usize {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        (x % n as u64) as usize
    }

    fn ok(&self, p: &Pending, kind: &str) {
        self.progress.answered.fetch_add(1, Ordering::Relaxed);
        if p.measured {
            let us = p.t0.elapsed().as_micros() as u64;
            let mut st = self.stats.borrow_mut();
            st.ok(kind, us);
            if let Some(h) = st.hist.get(kind).filter(|h| h.len().is_multiple_of(256)) {
                self.progress
                    .p99_us
                    .fetch_max(h.value_at_quantile(0.99), Ordering::Relaxed);
            }
        } else {
            *self
                .stats
                .borrow_mut()
                .answered
                .entry(kind.into())
                .or_insert(0) += 1;
        }
    }

    /// Hands a started transaction's request to the UA's writer. If the writer cannot take it
    /// (its connection is gone, or its queue is full) the transaction fails now and is no
    /// longer pending, so it is not counted a second time as a timeout.
    fn hand_to_writer(&self, ua: &Ua, bytes: Vec<u8>, kind: &str, call_id: &str) {
        if let Err(e) = ua.tx.try_send(bytes) {
            self.pending.borrow_mut().remove(call_id);
            if matches!(kind, "invite_200" | "bye") {
                self.active_calls
                    .set(self.active_calls.get().saturating_sub(1));
            }
            let cause = match e {
                glommio::GlommioError::Closed(_) => "connection_closed",
                _ => "local_queue_full",
            };
            self.fail(kind, cause);
        }
    }

    /// Widens the measured phase to `(a, b)`.
    fn merge_span(&self, a: Instant, b: Instant) {
        self.measured_span.set(Some(match self.measured_span.get() {
            Some((x, y)) => (x.min(a), y.max(b)),
            None => (a, b),
        }));
    }

    fn fail(&self, kind: &str, cause: &str) {
        self.progress.failed.fetch_add(1, Ordering::Relaxed);
        self.stats.borrow_mut().fail(kind, cause);
    }

    #[allow(clippy::too_many_arguments)] // the transaction's facts, one each
    fn start(
        &self,
        kind: &'static str,
        (call_id, cseq): (String, u64),
        t0: Instant,
        measured: bool,
        ua: usize,
        retry: Option<Retry>,
        counted: bool,
    ) {
        if !counted {
            self.progress.sent.fetch_add(1, Ordering::Relaxed);
            self.stats.borrow_mut().sent(kind);
        }
        let invite = (kind == "invite_200").then_some(InviteState {
            got100: false,
            got180: false,
        });
        self.pending.borrow_mut().insert(
            call_id,
            Pending {
                kind,
                t0,
                sent_at: Instant::now(),
                cseq,
                measured,
                ua,
                invite,
                retry,
            },
        );
    }
}

/// Runs every plan on `shards` executors; returns the merged results.
pub fn run(plans: Vec<Plan>, shards: usize, progress: Arc<Progress>) -> Result<Stats, String> {
    if plans.len() > MAX_PLANS {
        return Err(format!("at most {MAX_PLANS} scenarios in one run"));
    }
    // Pinned within the allowed CPU set (run it under `taskset` to keep it off the server's
    // CPUs); more executors than allowed CPUs share them round-robin.
    let cpus = sipring_net::sys::cpus::allowed();
    let plans = Arc::new(plans);
    let mut handles = Vec::new();
    for id in 0..shards {
        let (plans, progress) = (plans.clone(), progress.clone());
        let placement = glommio::Placement::Fixed(cpus[id % cpus.len()]);
        let h = glommio::LocalExecutorBuilder::new(placement)
            .name(&format!("load-{id}"))
            .io_memory(512 * 1024)
            .spawn(move || async move { shard_main(id, shards, plans, progress).await })
            .map_err(|e| format!("executor: {e}"))?;
        handles.push(h);
    }
    let mut total = Stats::default();
    for h in handles {
        let s = h.join().map_err(|e| format!("shard failed: {e:?}"))?;
        total.merge(&s);
    }
    if total.seconds == 0.0 {
        // No shard measured anything (no users anywhere): the planned duration.
        total.seconds = plans
            .iter()
            .map(|p| p.duration.as_secs_f64())
            .fold(0.0, f64::max);
    }
    Ok(total)
}

async fn shard_main(id: usize, n: usize, plans: Arc<Vec<Plan>>, progress: Arc<Progress>) -> Stats {
    let shard = Rc::new(Shard {
        id,
        n,
        stats: RefCell::new(Stats::default()),
        pending: RefCell::new(HashMap::new()),
        progress,
        uas: RefCell::new(HashMap::new()),
        active_calls: Cell::new(0),
        stopping: Cell::new(false),
        handshakes: Cell::new(0),
        drained: Cell::new(false),
        measured_span: Cell::new(None),
        setup_retries: Cell::new(0),
        setup_retried: Cell::new(false),
        seq: Cell::new(0),
        rng: Cell::new(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1)),
        throttles: RefCell::new(HashMap::new()),
    });
    // Expire transactions that outlive their timeout.
    let sweeper = {
        let s = shard.clone();
        let timeout = plans
            .iter()
            .map(|p| p.timeout)
            .max()
            .unwrap_or(Duration::from_secs(32));
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(100)).await;
                let now = Instant::now();
                let expired: Vec<(String, &'static str)> = s
                    .pending
                    .borrow()
                    .iter()
                    .filter(|(_, p)| now.duration_since(p.sent_at) > timeout)
                    .map(|(k, p)| (k.clone(), p.kind))
                    .collect();
                for (k, kind) in expired {
                    // A call holds its slot until its BYE is answered: a BYE that timed out
                    // gives it back too (it leaked, and later calls counted as blocked).
                    let was_call = s
                        .pending
                        .borrow_mut()
                        .remove(&k)
                        .is_some_and(|p| matches!(p.kind, "invite_200" | "bye"));
                    if was_call {
                        s.active_calls.set(s.active_calls.get().saturating_sub(1));
                    }
                    s.fail(kind, "timeout");
                }
            }
        })
    };
    let mut tasks = Vec::new();
    let mut user_base = 0;
    for (index, plan) in plans.iter().enumerate() {
        let (s, p, base) = (shard.clone(), plan.clone(), user_base);
        user_base += plan.users;
        tasks.push(glommio::spawn_local(async move {
            run_plan(s, p, base, index).await
        }));
    }
    for t in tasks {
        t.await;
    }
    shard.stopping.set(true);
    // Let what is in flight finish: each transaction fails only when its own timeout has
    // run (the sweeper goes on meanwhile), as it would mid-run — before, whatever was out
    // 10 s after the end failed, though the same wait mid-run was a recorded success.
    let max_timeout = plans
        .iter()
        .map(|p| p.timeout)
        .max()
        .unwrap_or(Duration::from_secs(5));
    let end = Instant::now() + max_timeout + Duration::from_millis(200);
    while (!shard.pending.borrow().is_empty() || shard.handshakes.get() > 0) && Instant::now() < end
    {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    shard.drained.set(true);
    // Registrations told to come back later that the run outlived: counted sent, so failed.
    for _ in 0..shard.setup_retries.get() {
        shard.fail("register", "status_503");
    }
    let left: Vec<&'static str> = shard
        .pending
        .borrow_mut()
        .drain()
        .map(|(_, p)| p.kind)
        .collect();
    for k in left {
        shard.fail(k, "timeout");
    }
    for _ in 0..shard.handshakes.replace(0) {
        shard.fail("options", "timeout");
    }
    drop(sweeper);
    // This shard's UAs keep answering until the others have drained too.
    barrier(
        &shard,
        &shard.progress.drained,
        max_timeout + Duration::from_secs(1),
    )
    .await;
    shard.uas.borrow_mut().clear();
    let mut st = shard.stats.borrow().clone();
    // What was measured, as timed (a `--count` ends it at `count / rate`; an `idle` run at
    // SIGTERM; the planned duration was reported whatever happened, and the rates with it).
    // A shard that measured nothing (no users of its own) says 0: the merge takes the
    // longest, and `run` falls back to the planned duration only if every shard did.
    st.seconds = shard
        .measured_span
        .get()
        .map_or(0.0, |(a, b)| b.duration_since(a).as_secs_f64());
    st
}

/// Arrives at `count` and waits (at most `bound`) until every shard has.
async fn barrier(shard: &Shard, count: &std::sync::atomic::AtomicUsize, bound: Duration) {
    count.fetch_add(1, Ordering::SeqCst);
    let deadline = Instant::now() + bound;
    while count.load(Ordering::SeqCst) < shard.n && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// The users of a plan this shard owns: global index `base + i` for `i ≡ shard (mod n)`.
fn my_users(shard: &Shard, plan: &Plan, base: usize) -> Vec<usize> {
    (0..plan.users)
        .filter(|i| i % shard.n == shard.id)
        .map(|i| base + i)
        .collect()
}

async fn run_plan(shard: Rc<Shard>, plan: Plan, base: usize, index: usize) {
    let users = my_users(&shard, &plan, base);
    if plan.scenario != Scenario::Handshake {
        setup(&shard, &plan, &users).await;
    }
    // Wait (bounded) until every shard has registered its users for this plan.
    let ready = &shard.progress.ready[index % MAX_PLANS];
    ready.fetch_add(1, Ordering::SeqCst);
    let deadline = Instant::now() + plan.timeout;
    while ready.load(Ordering::SeqCst) < shard.n && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    // Split among the shards that send: every shard for handshakes; for the rest, the
    // shards that own users (with fewer users than shards, a shard with none sleeps the
    // run out, and its share of the rate and of `--count` was lost without a word), each
    // in proportion to its users.
    let senders = if plan.scenario == Scenario::Handshake {
        shard.n
    } else {
        shard.n.min(plan.users).max(1)
    };
    let rate = if plan.scenario == Scenario::Handshake {
        plan.rate / shard.n as f64
    } else {
        plan.rate * users.len() as f64 / plan.users.max(1) as f64
    };
    let start = Instant::now();
    let end = start + plan.warmup + plan.duration;
    // `--count` split exactly: the first `c % senders` sending shards take one more.
    let limit = plan.count.map(|c| {
        let s = senders as u64;
        if shard.id as u64 >= s {
            0
        } else {
            c / s + u64::from((shard.id as u64) < c % s)
        }
    });
    if plan.scenario == Scenario::Idle {
        idle(&shard, &plan, &users, end).await;
        // Held until the end, or until a signal ended it.
        let (a, b) = (start + plan.warmup, Instant::now().min(end));
        shard.merge_span(a, b.max(a));
        return;
    }
    if rate <= 0.0 || users.is_empty() && plan.scenario != Scenario::Handshake {
        glommio::timer::sleep(end.saturating_duration_since(Instant::now())).await;
        return;
    }
    let mut i: u64 = 0;
    // `--count` counts measured transactions (warm-up ones are not the run's).
    let mut measured_n: u64 = 0;
    loop {
        if limit.is_some_and(|l| measured_n >= l) {
            break;
        }
        let intended = start + intended_offset(i, rate, plan.ramp);
        if intended >= end {
            break;
        }
        let now = Instant::now();
        if intended > now + Duration::from_micros(200) {
            glommio::timer::sleep(intended - now).await;
        }
        let lag = Instant::now().saturating_duration_since(intended);
        if lag > Duration::from_millis(1) {
            let mut st = shard.stats.borrow_mut();
            st.late_sends += 1;
            st.max_lag_us = st.max_lag_us.max(lag.as_micros() as u64);
        }
        let measured = intended >= start + plan.warmup;
        // Whether a transaction went out (counted, sent or failed) for `--count`: one
        // dropped for overload control or blocked by `--max-concurrent` is not one.
        let mut went = true;
        match plan.scenario {
            Scenario::Register => {
                // Every UA's first AOR, then every UA's second, and so on.
                let u = users[(i as usize) % users.len()];
                let k = (i as usize / users.len()) % plan.aors_per_ua.max(1);
                went = !oc_drops(&shard, &plan, u);
                if went {
                    send_register(&shard, &plan, u, k, intended, measured, plan.expires);
                }
            }
            Scenario::Message => {
                let from = users[shard.rand(users.len())];
                let to = callee(&shard, base, plan.users, from);
                went = !oc_drops(&shard, &plan, from);
                if went {
                    send_request(
                        &shard, &plan, from, to, "MESSAGE", "message", intended, measured, "hello",
                    );
                }
            }
            Scenario::Call => {
                if shard.active_calls.get() * shard.n >= plan.max_concurrent {
                    shard.stats.borrow_mut().blocked_calls += 1;
                    went = false;
                } else {
                    let from = users[shard.rand(users.len())];
                    went = !oc_drops(&shard, &plan, from);
                    if went {
                        let to = callee(&shard, base, plan.users, from);
                        shard.active_calls.set(shard.active_calls.get() + 1);
                        send_request(
                            &shard,
                            &plan,
                            from,
                            to,
                            "INVITE",
                            "invite_200",
                            intended,
                            measured,
                            "",
                        );
                    }
                }
            }
            // At most `--max-concurrent` in flight, all shards together, as calls: a server
            // that slows down had the generator open sockets without bound, until its own
            // descriptors ran out and it counted its own EMFILE as the server's failures.
            Scenario::Handshake if shard.handshakes.get() * shard.n >= plan.max_concurrent => {
                shard.stats.borrow_mut().blocked_calls += 1;
                went = false;
            }
            Scenario::Handshake => {
                let (s, p) = (shard.clone(), plan.clone());
                shard.handshakes.set(shard.handshakes.get() + 1);
                let n = i as usize;
                glommio::spawn_local(async move {
                    let counted = s.handshakes.get();
                    handshake_once(s.clone(), p, n, intended, measured).await;
                    // After the final drain, the count was reset and the rest declared lost.
                    if counted > 0 && s.handshakes.get() > 0 {
                        s.handshakes.set(s.handshakes.get() - 1);
                    }
                })
                .detach();
            }
            Scenario::Idle => unreachable!(),
        }
        measured_n += u64::from(measured && went);
        i += 1;
        if i.is_multiple_of(64) {
            glommio::yield_if_needed().await;
        }
    }
    // The measured phase ran from the end of warm-up to the slot of the first transaction
    // not sent (a `--count` reached), or to the end: `count / rate`, or `--duration`.
    let next_slot = (start + intended_offset(i, rate, plan.ramp)).min(end);
    let from = start + plan.warmup;
    shard.merge_span(from, next_slot.max(from));
    // Wait for calls to finish their hold and BYE, and for what is still out to be
    // answered (an unregistration sent while a measured REGISTER or MESSAGE to the user is
    // in flight would fail it: a failure of the generator's making).
    // With `--unregister` everything gets its whole timeout (answered, or timed out by the
    // sweeper), so no unregistration meets a REGISTER still out.
    let wait = if plan.unregister {
        plan.timeout + Duration::from_millis(200)
    } else {
        plan.timeout.min(Duration::from_secs(10))
    };
    let deadline = Instant::now() + plan.hold + wait;
    while (shard.active_calls.get() > 0 || !shard.pending.borrow().is_empty())
        && Instant::now() < deadline
    {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    // Stop measuring, drain, then stop answering: wait (bounded) until every shard is done
    // with this plan before its users leave.
    barrier(
        &shard,
        &shard.progress.quiet[index % MAX_PLANS],
        plan.hold + wait + Duration::from_secs(1),
    )
    .await;
    if plan.unregister {
        for &u in &users {
            for k in 0..plan.aors_per_ua.max(1) {
                send_register(&shard, &plan, u, k, Instant::now(), false, 0);
            }
        }
        let d = Instant::now() + Duration::from_secs(5);
        while !shard.pending.borrow().is_empty() && Instant::now() < d {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// RFC 7339, loss-based: whether UA `u`'s next new request is dropped here, as its server
/// asked (`--overload-control`), and counted as such.
fn oc_drops(shard: &Shard, plan: &Plan, u: usize) -> bool {
    if !plan.overload_control {
        return false;
    }
    let Some(target) = shard.uas.borrow().get(&u).map(|ua| ua.target) else {
        return false;
    };
    let admit = shard
        .throttles
        .borrow_mut()
        .entry(target)
        .or_default()
        .admit(Instant::now());
    if !admit {
        shard.stats.borrow_mut().oc_dropped += 1;
    }
    !admit
}

/// A random other user (a UA never calls itself when it has someone else to call).
fn callee(shard: &Shard, base: usize, users: usize, from: usize) -> usize {
    let to = base + shard.rand(users);
    if to == from && users > 1 {
        base + (to - base + 1) % users
    } else {
        to
    }
}

/// When the i-th transaction is due, with a linear ramp from 0 to `rate` over `ramp`.
pub fn intended_offset(i: u64, rate: f64, ramp: Duration) -> Duration {
    let r = ramp.as_secs_f64();
    let k = i as f64;
    // Transactions sent during the ramp: rate * r / 2.
    let ramp_count = rate * r / 2.0;
    let t = if r > 0.0 && k < ramp_count {
        (2.0 * k * r / rate).sqrt()
    } else {
        r / 2.0 + k / rate
    };
    Duration::from_secs_f64(t)
}

fn user_name(plan: &Plan, global: usize) -> String {
    format!("{}{}", plan.prefix, global)
}

/// Opens and registers this shard's user agents, a few at a time.
async fn setup(shard: &Rc<Shard>, plan: &Plan, users: &[usize]) {
    for chunk in users.chunks(plan.connect_concurrency.max(1)) {
        let mut ts = Vec::new();
        for &u in chunk {
            let (s, p) = (shard.clone(), plan.clone());
            ts.push(glommio::spawn_local(async move {
                if let Ok(ua) = connect(&s, &p, u, 0).await {
                    s.uas.borrow_mut().insert(u, ua);
                    // Its first AOR; the `register` scenario's load goes through the rest
                    // (at its rate: a million at once would only meet the overload shedding).
                    send_register(&s, &p, u, 0, Instant::now(), false, p.expires);
                }
            }));
        }
        for t in ts {
            t.await;
        }
    }
    // Wait for the registrations, and for those told to retry (503 + Retry-After, at most
    // 10 s each) for as long again as they may take: bounded, however often they are shed.
    let start = Instant::now();
    let d = start + plan.timeout;
    let d_retries = d + Duration::from_secs(30);
    while (shard.setup_retries.get() > 0
        || shard
            .pending
            .borrow()
            .values()
            .any(|p| p.kind == "register"))
        && (Instant::now() < d || (shard.setup_retried.get() && Instant::now() < d_retries))
    {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
}

async fn idle(shard: &Rc<Shard>, plan: &Plan, _users: &[usize], end: Instant) {
    let mut due = Instant::now() + plan.keepalive;
    while Instant::now() < end && !shard.progress.stop.load(Ordering::Relaxed) {
        let slice = Duration::from_millis(250)
            .min(due.saturating_duration_since(Instant::now()))
            .min(end.saturating_duration_since(Instant::now()));
        glommio::timer::sleep(slice).await;
        if Instant::now() >= due {
            due += plan.keepalive;
            for ua in shard.uas.borrow().values() {
                let _ = ua.tx.try_send(b"\r\n\r\n".to_vec());
            }
        }
    }
}

/// Connects one user agent (TCP connect and TLS handshake measured) to its `nth` choice of
/// target (0: its own, `u mod targets`; then the next ones, as a phone with several
/// outbound proxies fails over, RFC 5626 §4.2), spawning its reader and writer.
async fn connect(shard: &Rc<Shard>, plan: &Plan, u: usize, nth: usize) -> Result<Rc<Ua>, ()> {
    let target = plan.target(u + nth);
    let t0 = Instant::now();
    shard.stats.borrow_mut().sent("tcp_connect");
    shard.progress.sent.fetch_add(1, Ordering::Relaxed);
    let stream = match plan.local_addrs.get(u % plan.local_addrs.len().max(1)) {
        Some(ip) if !plan.local_addrs.is_empty() => {
            sipring_net::sys::sock::connect_from(*ip, target, plan.timeout).await
        }
        _ => TcpStream::connect(target)
            .await
            .map_err(std::io::Error::from),
    };
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => {
            shard.fail(
                "tcp_connect",
                &sipring_net::snake_label(&format!("{:?}", e.kind())),
            );
            return Err(());
        }
    };
    let _ = stream.set_nodelay(true);
    shard
        .stats
        .borrow_mut()
        .ok("tcp_connect", t0.elapsed().as_micros() as u64);
    shard.progress.answered.fetch_add(1, Ordering::Relaxed);
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| "0.0.0.0:0".parse().expect("literal"));
    let sess = match plan.tls_for(u) {
        Some(cfg) => {
            let t1 = Instant::now();
            shard.stats.borrow_mut().sent("tls_handshake");
            shard.progress.sent.fetch_add(1, Ordering::Relaxed);
            let name = ServerName::try_from(plan.server_name.clone()).map_err(|_| ())?;
            let mut sess = TlsSession::client(cfg.clone(), name).map_err(|_| ())?;
            if let Err(cause) = bounded_handshake(&mut stream, &mut sess, plan.timeout).await {
                shard.fail("tls_handshake", &cause);
                return Err(());
            }
            shard
                .stats
                .borrow_mut()
                .ok("tls_handshake", t1.elapsed().as_micros() as u64);
            shard.progress.answered.fetch_add(1, Ordering::Relaxed);
            Some(Rc::new(RefCell::new(sess)))
        }
        None => None,
    };
    let (tx, rx) = new_bounded::<Vec<u8>>(4096);
    let user = user_name(plan, u);
    let ua = Rc::new(Ua {
        tx,
        local,
        target,
        oc: plan.overload_control,
        password: plan.password.as_ref().map(|p| p.replace("{user}", &user)),
        user,
        digest: RefCell::new(None),
    });
    let writer_stream = sipring_net::sys::sock::try_clone(&stream).map_err(|_| ())?;
    let wsess = sess.clone();
    glommio::spawn_local(async move {
        let mut w = writer_stream;
        while let Some(b) = rx.recv().await {
            let out = match &wsess {
                Some(s) => {
                    let mut s = s.borrow_mut();
                    if s.write(&b).is_err() {
                        break;
                    }
                    s.take_outgoing()
                }
                None => b,
            };
            if w.write_all(&out).await.is_err() {
                break;
            }
        }
    })
    .detach();
    shard.progress.connections.fetch_add(1, Ordering::Relaxed);
    let (s, p, r) = (shard.clone(), plan.clone(), ua.clone());
    glommio::spawn_local(async move {
        reader(&s, &p, &r, stream, sess).await;
        s.progress.connections.fetch_sub(1, Ordering::Relaxed);
        // The last handle on the UA's sender: once `uas` forgets it too, its writer ends and
        // closes the socket.
        drop(r);
        if p.reconnect && !s.stopping.get() {
            // Boxed: reconnect() calls connect(), which spawns this task again.
            let again: std::pin::Pin<Box<dyn Future<Output = ()>>> = Box::pin(reconnect(s, p, u));
            again.await;
        }
    })
    .detach();
    Ok(ua)
}

/// Re-establishes user agent `u` after its connection was lost and registers it again. The
/// attempts back off exponentially (100 ms doubling to 5 s) with full jitter over the upper
/// half, so a server restart does not meet a synchronized herd; with several targets each
/// failed attempt moves to the next one (a cluster node lost: its UAs re-register on the
/// others). The `reconnect` histogram runs from the loss to the new registration's 200,
/// failed attempts count under `tcp_connect` / `tls_handshake`.
async fn reconnect(shard: Rc<Shard>, plan: Plan, u: usize) {
    let lost = Instant::now();
    shard.uas.borrow_mut().remove(&u);
    let mut backoff_ms = 100usize;
    let mut nth = 0;
    while !shard.stopping.get() {
        let wait = backoff_ms / 2 + shard.rand(backoff_ms / 2 + 1);
        glommio::timer::sleep(Duration::from_millis(wait as u64)).await;
        if shard.stopping.get() {
            return;
        }
        if let Ok(ua) = connect(&shard, &plan, u, nth).await {
            shard.uas.borrow_mut().insert(u, ua);
            send_register_as(&shard, &plan, u, 0, lost, true, plan.expires, "reconnect");
            return;
        }
        nth += 1;
        backoff_ms = (backoff_ms * 2).min(5000);
    }
}

async fn reader(
    shard: &Rc<Shard>,
    plan: &Plan,
    ua: &Rc<Ua>,
    mut stream: TcpStream,
    sess: Option<Rc<RefCell<TlsSession>>>,
) {
    let mut framer = Framer::new(Limits::default(), KeepaliveRole::Client);
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match &sess {
            Some(s) => {
                let mut s = s.borrow_mut();
                if s.receive(&tmp[..n]).is_err() {
                    return;
                }
                buf.extend_from_slice(s.plaintext());
                s.plaintext().clear();
            }
            None => buf.extend_from_slice(&tmp[..n]),
        }
        let mut start = 0;
        loop {
            match framer.frame(&buf[start..]) {
                Ok(Status::Complete(Frame::Message(len))) => {
                    on_message(shard, plan, ua, &buf[start..start + len]);
                    start += len;
                }
                Ok(Status::Complete(Frame::Pong)) => {
                    shard.stats.borrow_mut().pongs += 1;
                    start += 2;
                }
                Ok(Status::Complete(Frame::Ping)) => start += 4,
                Ok(Status::Partial) => break,
                Err(_) => return,
            }
        }
        buf.drain(..start);
    }
}

fn header<'b>(m: &sipring_core::Message<'b, '_>, name: HeaderName) -> &'b [u8] {
    m.header(name).map_or(&b""[..], |h| h.value)
}

fn on_message(shard: &Rc<Shard>, plan: &Plan, ua: &Rc<Ua>, bytes: &[u8]) {
    let mut h = [Header::EMPTY; 64];
    let Ok(Status::Complete(m)) = parse(bytes, &mut h, &Limits::default(), Framing::Stream) else {
        return;
    };
    let call_id = String::from_utf8_lossy(header(&m, HeaderName::CallId)).into_owned();
    if ua.oc
        && m.status().is_some()
        && let Some(top) = m.values(HeaderName::Via).first()
    {
        shard
            .throttles
            .borrow_mut()
            .entry(ua.target)
            .or_default()
            .observe(Instant::now(), top.value);
    }
    match m.status() {
        Some(code) => on_response(shard, plan, ua, &m, code, &call_id),
        None => on_request(ua, &m),
    }
}

fn on_response(
    shard: &Rc<Shard>,
    plan: &Plan,
    ua: &Rc<Ua>,
    m: &sipring_core::Message<'_, '_>,
    code: u16,
    call_id: &str,
) {
    let cseq = sipring_core::CSeq::parse(header(m, HeaderName::CSeq));
    let method = cseq.map(|c| c.method).unwrap_or_default();
    let mut pending = shard.pending.borrow_mut();
    let Some(p) = pending.get_mut(call_id) else {
        return;
    };
    // Another transaction's answer on this Call-ID (a timed-out REGISTER's late 200, the
    // INVITE's late final while its BYE is out): not this one's.
    if cseq.map(|c| u64::from(c.seq)) != Some(p.cseq) {
        return;
    }
    if method == b"INVITE" && p.kind == "invite_200" {
        let (measured, t0) = (p.measured, p.t0);
        let st = p.invite.as_mut().expect("invite state");
        // The first 100 and the first 180 are timed; every provisional stops here.
        let first = match code {
            100 => Some((&mut st.got100, "invite_100")),
            180 => Some((&mut st.got180, "invite_180")),
            _ => None,
        };
        if let Some((seen, kind)) = first
            && !std::mem::replace(seen, true)
            && measured
        {
            shard
                .stats
                .borrow_mut()
                .latency(kind, t0.elapsed().as_micros() as u64);
        }
        if code < 200 {
            return;
        }
        let p = pending.remove(call_id).expect("present");
        drop(pending);
        // ACK every final response (hop-by-hop for non-2xx, end-to-end for 2xx).
        let ack = ack_for(m, ua, code >= 300, shard.next());
        let _ = ua.tx.try_send(ack);
        if matches!(code, 401 | 407) && retry_challenged(shard, plan, ua, m, &p, call_id) {
            return;
        }
        if (200..300).contains(&code) {
            shard.ok(&p, "invite_200");
            // Hang up after the hold time; the BYE's latency counts from its intended time.
            let route = route_set(m);
            let remote = header(m, HeaderName::Contact).to_vec();
            let to = header(m, HeaderName::To).to_vec();
            let bye_cseq = cseq.map_or(1, |c| c.seq) + 1;
            let (s, pl, u, cid) = (shard.clone(), plan.clone(), ua.clone(), call_id.to_string());
            let measured = p.measured;
            glommio::spawn_local(async move {
                let due = Instant::now() + pl.hold;
                glommio::timer::sleep(pl.hold).await;
                let bye = bye_for(&u, &pl, &cid, &route, &remote, &to, s.next(), bye_cseq);
                s.start(
                    "bye",
                    (cid.clone(), u64::from(bye_cseq)),
                    due,
                    measured,
                    0,
                    None,
                    false,
                );
                // A BYE that cannot be written fails now (connection_closed), and gives its
                // call's slot back.
                s.hand_to_writer(&u, bye, "bye", &cid);
            })
            .detach();
        } else {
            shard.fail("invite_200", &format!("status_{code}"));
            shard
                .active_calls
                .set(shard.active_calls.get().saturating_sub(1));
        }
        return;
    }
    if code < 200 {
        return;
    }
    let p = pending.remove(call_id).expect("present");
    drop(pending);
    if matches!(code, 401 | 407) && retry_challenged(shard, plan, ua, m, &p, call_id) {
        return;
    }
    if code == 503 && !p.measured && p.kind == "register" {
        // A setup registration shed by an overloaded server: come back when it says, as a
        // phone would (RFC 3261 §21.5.4), rather than start the run unregistered.
        let after = std::str::from_utf8(header(m, HeaderName::RetryAfter))
            .ok()
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or(1u64)
            .min(10);
        shard.setup_retries.set(shard.setup_retries.get() + 1);
        shard.setup_retried.set(true);
        // The same registration: its own expiry (an unregistration stays one).
        let (k, expires) = match p.retry {
            Some(Retry::Register { k, expires }) => (k, expires),
            _ => (0, plan.expires),
        };
        let (s, pl, u) = (shard.clone(), plan.clone(), p.ua);
        glommio::spawn_local(async move {
            glommio::timer::sleep(Duration::from_secs(after)).await;
            s.setup_retries.set(s.setup_retries.get() - 1);
            if s.drained.get() {
                // Counted failed by the drain, which it outlived.
                return;
            }
            // The same registration, sent again: counted once (its challenge, if one comes
            // now, is answered as the first's would have been).
            register(
                &s,
                &pl,
                u,
                k,
                Instant::now(),
                false,
                expires,
                "register",
                Again::Shed,
            );
        })
        .detach();
        return;
    }
    if code == 503 && p.kind == "reconnect" && !shard.stopping.get() {
        // A re-registration shed by a node taking a failed node's UAs: come back when it
        // says, as a phone would; the histogram keeps counting from the loss.
        let after = std::str::from_utf8(header(m, HeaderName::RetryAfter))
            .ok()
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or(1u64)
            .min(10);
        let (s, pl, u, t0) = (shard.clone(), plan.clone(), p.ua, p.t0);
        glommio::spawn_local(async move {
            glommio::timer::sleep(Duration::from_secs(after)).await;
            if !s.stopping.get() {
                register(
                    &s,
                    &pl,
                    u,
                    0,
                    t0,
                    true,
                    pl.expires,
                    "reconnect",
                    Again::Shed,
                );
            } else {
                // The run ended while it waited: it was counted sent, so it fails.
                s.fail("reconnect", "status_503");
            }
        })
        .detach();
        return;
    }
    let kind = p.kind;
    if (200..300).contains(&code) {
        shard.ok(&p, kind);
    } else {
        shard.fail(kind, &format!("status_{code}"));
    }
    if kind == "bye" {
        shard
            .active_calls
            .set(shard.active_calls.get().saturating_sub(1));
    }
    let _ = p.ua;
}

/// A 401/407 to a transaction we may send again: take the challenge and send it with
/// credentials (once; the latency still counts from the first send). `false`: it stays failed.
fn retry_challenged(
    shard: &Rc<Shard>,
    plan: &Plan,
    ua: &Rc<Ua>,
    m: &sipring_core::Message<'_, '_>,
    p: &Pending,
    call_id: &str,
) -> bool {
    let Some(retry) = p.retry.clone() else {
        return false;
    };
    if !ua.take_challenge(m) {
        return false;
    }
    match retry {
        Retry::Register { expires, k } => {
            send_register_again(shard, plan, p.ua, k, p.t0, p.measured, expires, p.kind)
        }
        Retry::Request {
            to,
            method,
            body,
            cseq,
        } => send_request_as(
            shard,
            plan,
            p.ua,
            to,
            method,
            p.kind,
            p.t0,
            p.measured,
            body,
            Some((call_id.to_string(), cseq + 1)),
        ),
    }
    true
}

/// Answers requests as a phone would: MESSAGE/OPTIONS/BYE 200, INVITE 180 then 200.
fn on_request(ua: &Rc<Ua>, m: &sipring_core::Message<'_, '_>) {
    let rr: Vec<&[u8]> = m
        .headers()
        .iter()
        .filter(|h| h.name == HeaderName::RecordRoute)
        .map(|h| h.value)
        .collect();
    let rr = rr.join(&b", "[..]);
    let contact = format!("<sip:{}@{};transport=tls>", ua.user, ua.local);
    let mut hdrs: Vec<(&str, &[u8])> = vec![("Contact", contact.as_bytes())];
    if !rr.is_empty() {
        hdrs.push(("Record-Route", &rr));
    }
    let tag = format!("ua{}", ua.local.port());
    let reply = |code, reason| {
        response_to(
            m,
            code,
            reason,
            ResponseParts {
                to_tag: Some(tag.as_bytes()),
                headers: &hdrs,
                body: None,
                source: None,
            },
        )
    };
    match m.method() {
        Some(Method::Invite) => {
            let _ = ua.tx.try_send(reply(180, "Ringing"));
            let _ = ua.tx.try_send(reply(200, "OK"));
        }
        Some(Method::Ack) => {}
        Some(_) => {
            let _ = ua.tx.try_send(reply(200, "OK"));
        }
        None => {}
    }
}

fn route_set(m: &sipring_core::Message<'_, '_>) -> Vec<u8> {
    // The caller's route set: Record-Route reversed (RFC 3261 §12.1.2).
    let mut v: Vec<&[u8]> = m
        .values(HeaderName::RecordRoute)
        .iter()
        .map(|v| v.value)
        .collect();
    v.reverse();
    v.join(&b", "[..])
}

/// Our Via: the branch is unique per connection (port) and shard sequence number, so no
/// stateful server mistakes a new request for a retransmission.
fn via(ua: &Ua, unique: u64) -> String {
    format!(
        "SIP/2.0/TLS {};branch=z9hG4bKlg{}x{};rport{}",
        ua.local,
        ua.local.port(),
        unique,
        if ua.oc { ";oc;oc-algo=\"loss\"" } else { "" }
    )
}

fn ack_for(resp: &sipring_core::Message<'_, '_>, ua: &Ua, non2xx: bool, unique: u64) -> Vec<u8> {
    let call_id = String::from_utf8_lossy(header(resp, HeaderName::CallId)).into_owned();
    let from = String::from_utf8_lossy(header(resp, HeaderName::From)).into_owned();
    let to = String::from_utf8_lossy(header(resp, HeaderName::To)).into_owned();
    let cseq = sipring_core::CSeq::parse(header(resp, HeaderName::CSeq)).map_or(1, |c| c.seq);
    if non2xx {
        // Same branch as the INVITE: the top Via of the response.
        let top = resp
            .top_via_raw()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let ruri = to
            .trim_start_matches(|c| c != '<')
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap_or_default()
            .to_string();
        return format!("ACK {ruri} SIP/2.0\r\nVia: {top}\r\nMax-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n").into_bytes();
    }
    let route = String::from_utf8_lossy(&route_set(resp)).into_owned();
    let contact = header(resp, HeaderName::Contact);
    let ruri = String::from_utf8_lossy(contact)
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap_or_default()
        .to_string();
    let route_line = if route.is_empty() {
        String::new()
    } else {
        format!("Route: {route}\r\n")
    };
    format!("ACK {ruri} SIP/2.0\r\nVia: {}\r\nMax-Forwards: 70\r\n{route_line}From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n", via(ua, unique)).into_bytes()
}

#[allow(clippy::too_many_arguments)] // the dialog's facts, one each
fn bye_for(
    ua: &Ua,
    plan: &Plan,
    call_id: &str,
    route: &[u8],
    remote_contact: &[u8],
    to: &[u8],
    unique: u64,
    cseq: u32,
) -> Vec<u8> {
    let ruri = String::from_utf8_lossy(remote_contact)
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap_or_default()
        .to_string();
    let route = String::from_utf8_lossy(route);
    let route_line = if route.is_empty() {
        String::new()
    } else {
        format!("Route: {route}\r\n")
    };
    format!(
        "BYE {ruri} SIP/2.0\r\nVia: {}\r\nMax-Forwards: 70\r\n{route_line}From: <sip:{}@{}>;tag=lg{}\r\nTo: {}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} BYE\r\nContent-Length: 0\r\n\r\n",
        via(ua, unique),
        ua.user,
        plan.domain,
        ua.local.port(),
        String::from_utf8_lossy(to)
    )
    .into_bytes()
}

/// UA `u` registers its `k`-th AOR (`--aors-per-ua`).
#[allow(clippy::too_many_arguments)] // the REGISTER's facts, one each
fn send_register(
    shard: &Rc<Shard>,
    plan: &Plan,
    u: usize,
    k: usize,
    t0: Instant,
    measured: bool,
    expires: u32,
) {
    send_register_as(shard, plan, u, k, t0, measured, expires, "register");
}

#[allow(clippy::too_many_arguments)] // send_register plus the histogram it counts under
fn send_register_as(
    shard: &Rc<Shard>,
    plan: &Plan,
    u: usize,
    k: usize,
    t0: Instant,
    measured: bool,
    expires: u32,
    kind: &'static str,
) {
    register(shard, plan, u, k, t0, measured, expires, kind, Again::No);
}

/// Why a REGISTER is sent: first, again with credentials after a 401, or again after a
/// 503 (its first send counted; a challenge may still come).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Again {
    No,
    Challenged,
    Shed,
}

/// A REGISTER sent again with credentials after a 401.
#[allow(clippy::too_many_arguments)] // see send_register_as
fn send_register_again(
    shard: &Rc<Shard>,
    plan: &Plan,
    u: usize,
    k: usize,
    t0: Instant,
    measured: bool,
    expires: u32,
    kind: &'static str,
) {
    register(
        shard,
        plan,
        u,
        k,
        t0,
        measured,
        expires,
        kind,
        Again::Challenged,
    );
}

/// The user part of UA `user`'s `k`-th AOR: its own name first, then `<name>x<k>`.
fn aor_user(user: &str, k: usize) -> std::borrow::Cow<'_, str> {
    if k == 0 {
        user.into()
    } else {
        format!("{user}x{k}").into()
    }
}

#[allow(clippy::too_many_arguments)] // see send_register_as
fn register(
    shard: &Rc<Shard>,
    plan: &Plan,
    u: usize,
    k: usize,
    t0: Instant,
    measured: bool,
    expires: u32,
    kind: &'static str,
    again: Again,
) {
    // Counted when first sent; a challenge is answered once.
    let counted = again != Again::No;
    let Some(ua) = shard.uas.borrow().get(&u).cloned() else {
        // Its UA is not connected (setup failed, or between reconnects): load that could
        // not be offered, counted as MESSAGE and INVITE count it (it vanished before).
        if !counted {
            shard.progress.sent.fetch_add(1, Ordering::Relaxed);
            shard.stats.borrow_mut().sent(kind);
        }
        shard.fail(kind, "not_connected");
        return;
    };
    let user = aor_user(&ua.user, k);
    let call_id = format!("reg-{}-{}", user, ua.local.port());
    if shard.pending.borrow().contains_key(&call_id) {
        // The previous REGISTER of this AOR is still out (its answer takes longer than the
        // schedule's turn: users / rate): a phone would not send another, so this slot of
        // the offered load fails, as `overlap` — before, it vanished from the counts and
        // the tail as a "late send" of the generator.
        if !counted {
            shard.progress.sent.fetch_add(1, Ordering::Relaxed);
            shard.stats.borrow_mut().sent(kind);
        }
        shard.fail(kind, "overlap");
        return;
    }
    // (Checked before the credentials are computed: they use up a nonce count.)
    let seq = shard.next();
    let ruri = format!("sip:{}", plan.domain);
    let msg = format!(
        "REGISTER {ruri} SIP/2.0\r\nVia: {v}\r\nMax-Forwards: 70\r\nTo: <sip:{u}@{d}>\r\nFrom: <sip:{u}@{d}>;tag=r{p}\r\nCall-ID: {call_id}\r\nCSeq: {seq} REGISTER\r\nContact: <sip:{u}@{l};transport=tls;ob>\r\nExpires: {expires}\r\n{creds}Content-Length: 0\r\n\r\n",
        d = plan.domain,
        v = via(&ua, seq),
        u = user,
        p = ua.local.port(),
        l = ua.local,
        creds = ua.credentials("REGISTER", &ruri),
    );
    shard.start(
        kind,
        (call_id.clone(), seq),
        t0,
        measured,
        u,
        (again != Again::Challenged).then_some(Retry::Register { expires, k }),
        counted,
    );
    shard.hand_to_writer(&ua, msg.into_bytes(), kind, &call_id);
}

#[allow(clippy::too_many_arguments)] // one per field of the request the scenario varies
fn send_request(
    shard: &Rc<Shard>,
    plan: &Plan,
    from: usize,
    to: usize,
    method: &'static str,
    kind: &'static str,
    t0: Instant,
    measured: bool,
    body: &'static str,
) {
    send_request_as(
        shard, plan, from, to, method, kind, t0, measured, body, None,
    );
}

/// [`send_request`], or (`again`: its Call-ID and the CSeq to use) the same request sent
/// again with credentials after a challenge.
#[allow(clippy::too_many_arguments)] // see send_request
fn send_request_as(
    shard: &Rc<Shard>,
    plan: &Plan,
    from: usize,
    to: usize,
    method: &'static str,
    kind: &'static str,
    t0: Instant,
    measured: bool,
    body: &'static str,
    again: Option<(String, u32)>,
) {
    let Some(ua) = shard.uas.borrow().get(&from).cloned() else {
        if again.is_none() {
            shard.progress.sent.fetch_add(1, Ordering::Relaxed);
            shard.stats.borrow_mut().sent(kind);
        }
        shard.fail(kind, "not_connected");
        if kind == "invite_200" {
            shard
                .active_calls
                .set(shard.active_calls.get().saturating_sub(1));
        }
        return;
    };
    let seq = shard.next();
    let retried = again.is_some();
    let (call_id, cseq) = again.unwrap_or_else(|| (format!("{}-{}-{}", kind, shard.id, seq), 1));
    let callee = user_name(plan, to);
    let (ctype, sdp) = if method == "INVITE" {
        (
            "application/sdp",
            "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
        )
    } else {
        ("text/plain", body)
    };
    let ruri = format!("sip:{callee}@{}", plan.domain);
    let msg = format!(
        "{method} {ruri} SIP/2.0\r\nVia: {v}\r\nMax-Forwards: 70\r\nTo: <sip:{callee}@{d}>\r\nFrom: <sip:{u}@{d}>;tag=lg{p}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContact: <sip:{u}@{l};transport=tls;ob>\r\n{creds}Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len(),
        d = plan.domain,
        v = via(&ua, seq),
        u = ua.user,
        p = ua.local.port(),
        l = ua.local,
        creds = ua.credentials(method, &ruri),
    );
    shard.start(
        kind,
        (call_id.clone(), u64::from(cseq)),
        t0,
        measured,
        from,
        // Sent again with credentials: no third time.
        (!retried).then_some(Retry::Request {
            to,
            method,
            body,
            cseq,
        }),
        retried,
    );
    shard.hand_to_writer(&ua, msg.into_bytes(), kind, &call_id);
}

/// Drives a TLS handshake for at most `timeout`: a listener that accepted in the kernel but
/// never serves (a server going down) must not hold the task, and its descriptor, for ever.
/// `Err`: the failure's label (`timeout`, or the TLS error's).
async fn bounded_handshake(
    stream: &mut TcpStream,
    sess: &mut TlsSession,
    timeout: Duration,
) -> Result<(), String> {
    futures_lite::future::or(
        async {
            sipring_net::handshake::drive_handshake(stream, sess)
                .await
                .map_err(|e| e.label())
        },
        async {
            glommio::timer::sleep(timeout).await;
            Err("timeout".to_string())
        },
    )
    .await
}

/// One `handshake` transaction: connect, handshake, OPTIONS, close.
async fn handshake_once(shard: Rc<Shard>, plan: Plan, n: usize, intended: Instant, measured: bool) {
    shard.progress.sent.fetch_add(1, Ordering::Relaxed);
    shard.stats.borrow_mut().sent("options");
    // Bounded, as a UA's connect is: a server that accepts in the kernel and never serves
    // (or a lost SYN) must not hold the task, and a descriptor, past the run.
    let stream = futures_lite::future::or(
        async {
            TcpStream::connect(plan.target(n))
                .await
                .map_err(|_| "connect")
        },
        async {
            glommio::timer::sleep(plan.timeout).await;
            Err("timeout")
        },
    )
    .await;
    // Once the run's drain is over, this one was counted lost with the rest: nothing more.
    let counts = |s: &Shard| !s.drained.get();
    let mut stream = match stream {
        Ok(s) => s,
        Err(cause) => {
            if counts(&shard) {
                shard.fail("options", cause);
            }
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    // From when it was meant to start: a generator behind its schedule shows here (the
    // TLS handshake below is timed alone; `options` is the whole, from the same start).
    if measured && counts(&shard) {
        shard
            .stats
            .borrow_mut()
            .latency("tcp_connect", intended.elapsed().as_micros() as u64);
    }
    let mut sess = None;
    if let Some(cfg) = plan.tls_for(shard.next() as usize) {
        let t1 = Instant::now();
        let Ok(name) = ServerName::try_from(plan.server_name.clone()) else {
            return;
        };
        let Ok(mut s) = TlsSession::client(cfg.clone(), name) else {
            return;
        };
        if let Err(cause) = bounded_handshake(&mut stream, &mut s, plan.timeout).await {
            if counts(&shard) {
                shard.fail("options", &cause);
            }
            return;
        }
        if measured && counts(&shard) {
            shard
                .stats
                .borrow_mut()
                .latency("tls_handshake", t1.elapsed().as_micros() as u64);
        }
        sess = Some(s);
    }
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let opt = format!(
        "OPTIONS sip:{} SIP/2.0\r\nVia: SIP/2.0/TLS {local};branch=z9hG4bKhs{}\r\nMax-Forwards: 70\r\nTo: <sip:{}>\r\nFrom: <sip:probe@{}>;tag=h\r\nCall-ID: hs-{local}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        plan.server_name,
        shard.next(),
        plan.server_name,
        plan.domain
    );
    let out = match &mut sess {
        Some(s) => {
            let _ = s.write(opt.as_bytes());
            s.take_outgoing()
        }
        None => opt.into_bytes(),
    };
    if stream.write_all(&out).await.is_err() {
        if counts(&shard) {
            shard.fail("options", "io");
        }
        return;
    }
    let mut framer = Framer::new(Limits::default(), KeepaliveRole::Client);
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 16 * 1024];
    let deadline = Instant::now() + plan.timeout;
    let ok = loop {
        if Instant::now() > deadline {
            break false;
        }
        // Each read bounded by what is left of the timeout (a server that never answers).
        let left = deadline.saturating_duration_since(Instant::now());
        let read = futures_lite::future::or(async { stream.read(&mut tmp).await.ok() }, async {
            glommio::timer::sleep(left).await;
            None
        });
        let n = match read.await {
            None | Some(0) => break false,
            Some(n) => n,
        };
        match &mut sess {
            Some(s) => {
                if s.receive(&tmp[..n]).is_err() {
                    break false;
                }
                buf.extend_from_slice(s.plaintext());
                s.plaintext().clear();
            }
            None => buf.extend_from_slice(&tmp[..n]),
        }
        if let Ok(Status::Complete(Frame::Message(len))) = framer.frame(&buf) {
            break buf[..len].starts_with(b"SIP/2.0 200");
        }
    };
    if counts(&shard) {
        if ok {
            shard.progress.answered.fetch_add(1, Ordering::Relaxed);
            let mut st = shard.stats.borrow_mut();
            if measured {
                st.ok("options", intended.elapsed().as_micros() as u64);
            } else {
                *st.answered.entry("options".into()).or_insert(0) += 1;
            }
        } else {
            shard.fail("options", "no_200");
        }
    }
    if let Some(s) = &mut sess {
        let _ = s.close();
        let _ = stream.write_all(&s.take_outgoing()).await;
    }
}
