//! The stateful proxy of one shard: transactions, forking, CANCEL, ACK and failure handling
//! (RFC 3261 §16), driven entirely by its caller.
//!
//! [`ShardProxy`] ties the pieces of this crate together. The engine feeds it framed
//! messages with the flow they came from, lookup and registrar results, flow closures and
//! the time; it returns [`Output`]s: bytes to send on a flow, lookups and registrations to
//! run on the shard that owns an AOR, and flows to close.
//!
//! ```text
//!  handle_message(now, flow, bytes) ─┐          ┌─► Output::Send { flow, bytes }
//!  handle_lookup(now, token, result) ┼─► ShardProxy ─► Output::Lookup { token, aor }
//!  handle_register_reply(now, …)     │   (server + ├─► Output::Register { token, aor, … }
//!  handle_flow_closed(now, flow)     │    client   └─► Output::Close { flow, reason }
//!  handle_timeout(now) ──────────────┘    txns)        poll_timeout() → next deadline
//! ```
//!
//! Call order: any `handle_*`, then drain [`ShardProxy::poll_output`], then re-arm the
//! timer from [`ShardProxy::poll_timeout`]. State is `!Send` on purpose: one shard owns it.
//!
//! Bounded: server transactions are capped ([`ShardProxy::set_max_transactions`]; past it a
//! request is answered 503 statelessly), a proxied INVITE branch is guarded by Timer C
//! (RFC 3261 §16.8: CANCEL if it rang, 408 if it did not), and every transaction is indexed by
//! its connection, so a closing connection costs what it holds, not the table size.
//!
//! Not done here: forking policy beyond parallel forking to all bindings, and RFC 2543
//! transaction matching.

use crate::edit::Editor;
use crate::error::ParseError;
use crate::header::{Header, HeaderName};
use crate::matching::{KeyMethod, TxKey};
use crate::overload_control::{self as oc, Feedback};
use crate::parse::{Essentials, Framing, Limits, Message, Method, Status, parse};
use crate::policy::{Authz, FlowInfo, Grant, Policy, Refusal, Source};
use crate::proxy::{Decision, Flow, Lookup, Party, Proxy, Target};
use crate::registrar::Reply;
use crate::response::{ResponseParts, ack_for_non_2xx, cancel_for, error_response, response_to};
use crate::transaction::{
    ClientTransaction, Event, ServerTransaction, TimerConfig, Timers, Transmit,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::Instant;

/// The longest an INVITE branch rings by default ([`ShardProxy::set_max_ring`]).
const MAX_RING: std::time::Duration = std::time::Duration::from_secs(600);

/// Timer C's default: RFC 3261 §16.6 asks for more than 3 minutes.
pub const TIMER_C: std::time::Duration = std::time::Duration::from_secs(181);

/// MAC bytes in a stateless answer's To-tag (64 bits: a UAS would have to guess them to
/// have its own ACKs dropped, and gains nothing by it).
const STATELESS_TAG_BYTES: usize = 8;

/// Message bytes shared between a transaction and the output queue.
pub type Bytes = Rc<[u8]>;

/// What the shard proxy asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Output {
    /// Write these bytes to this flow.
    Send {
        /// Destination flow.
        flow: Flow,
        /// One whole message.
        bytes: Bytes,
    },
    /// Look up the bindings of `aor` (on its owner shard), then call
    /// [`ShardProxy::handle_lookup`] with `token`.
    Lookup {
        /// Correlates the answer.
        token: u64,
        /// The address-of-record.
        aor: String,
        /// The request came from another node of our cluster: only this node's own bindings
        /// count (a miss is not looked up in the cluster's store again: one hop, no loops).
        local_only: bool,
    },
    /// Run the registrar for `aor` on its owner shard with this REGISTER (which arrived on
    /// `flow`), then call [`ShardProxy::handle_register_reply`] with `token`.
    Register {
        /// Correlates the answer.
        token: u64,
        /// The address-of-record.
        aor: String,
        /// The REGISTER as received.
        request: Bytes,
        /// The flow it arrived on (the binding's flow).
        flow: Flow,
    },
    /// A response for a client transaction another shard owns (it arrived on a connection
    /// of this shard): hand these bytes to that shard's [`ShardProxy::handle_message`].
    Relay {
        /// The owning shard.
        shard: u16,
        /// The flow it arrived on.
        flow: Flow,
        /// The response, as received.
        bytes: Bytes,
    },
    /// Close this flow: its byte stream cannot be trusted any more.
    Close {
        /// The flow.
        flow: Flow,
        /// Why, for the log.
        reason: ParseError,
    },
    /// A request was refused for who sent it (a failed authentication, an identity it may
    /// not claim, a relay it may not use): count it and log it (rate-limited).
    Refused(Refusal),
    /// A partner's CANCEL names no INVITE on this shard: its INVITE may have come on one of
    /// the partner's connections that another shard owns. Hand `request` to every other
    /// shard's [`ShardProxy::cancel_from_elsewhere`], then call
    /// [`ShardProxy::handle_cancel_elsewhere`] with `token` and whether one of them matched.
    CancelElsewhere {
        /// Correlates the answer.
        token: u64,
        /// The partner that sent it (only that partner's INVITEs may match).
        partner: String,
        /// The CANCEL as received.
        request: Bytes,
    },
    /// The party of dialog `call_id` that was on `gone` (a connection that closed) was found
    /// on `to`: tell every other shard ([`ShardProxy::learn_detour`]), whose connections
    /// (a partner's others) may carry what follows — an ACK above all.
    Detour {
        /// The closed connection.
        gone: Flow,
        /// The dialog.
        call_id: Bytes,
        /// Where the party is now.
        to: Flow,
    },
    /// An edge proxy answered 430 (Flow Failed, RFC 5626 §5.3) to a request sent to `aor`'s
    /// binding `contact` over connection `flow`: the device's flow beyond the edge is gone,
    /// and the binding must no longer be used (RFC 5626 §7: a proxy told that no further
    /// message will be delivered on a flow invalidates the bindings that use it). The
    /// AOR's owner removes that binding ([`crate::registrar::remove_binding`] on its store).
    BindingFailed {
        /// The AOR looked up.
        aor: String,
        /// The connection the binding was registered over.
        flow: u64,
        /// The binding's contact (the branch's Request-URI).
        contact: String,
        /// The binding's Path (the branch's Route values): behind an edge proxy the
        /// connection and contact are shared by the device's registrations, and the Path
        /// names the edge's flow. A binding registered again since (a new Path) stays.
        path: Vec<String>,
    },
}

/// Counters a driver exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests rejected before reaching a transaction (parse/validation errors).
    pub rejected: u64,
    /// Responses dropped (not ours, no transaction, malformed).
    pub dropped_responses: u64,
    /// Requests dropped unanswered: an ACK that matches no transaction and that no route of
    /// ours names, or an ACK or retransmission matching a transaction another connection
    /// started.
    pub dropped_requests: u64,
    /// Requests forwarded (client transactions started, CANCELs included).
    pub forwarded: u64,
    /// ACKs forwarded statelessly (2xx ACKs).
    pub acks_forwarded: u64,
    /// Responses generated locally.
    pub local_responses: u64,
    /// Digest challenges sent (401/407).
    pub challenges: u64,
    /// New requests answered 503 at the door because the shard was overloaded.
    pub shed: u64,
    /// New requests answered 503 at the door because the node is draining.
    pub drained: u64,
    /// New requests answered 503 at the door because their connection is going away
    /// ([`ShardProxy::set_flow_draining`]).
    pub flow_drained: u64,
    /// Responses that carried overload-control feedback (RFC 7339 `oc`) to a client.
    pub oc_feedback: u64,
    /// New requests answered 503 here because the partner they were going to asked, by
    /// RFC 7339 feedback, for that share of its new requests to be dropped.
    pub oc_dropped: u64,
    /// Requests sent to a device's other flow because the one they were on failed
    /// (RFC 5626 §5.3).
    pub flow_failovers: u64,
    /// Requests on a dialog route whose party's connection had closed, sent to the binding
    /// it made since over a new one (it reconnected and registered again).
    pub dialog_rebinds: u64,
    /// Lookups, registrations and CANCEL questions that got no answer within 64·T1 (their
    /// requests were answered 503 or 481 then).
    pub unanswered_lookups: u64,
}

#[derive(Debug)]
struct Server {
    txn: ServerTransaction<Bytes>,
    inbound: Flow,
    request: Bytes,
    branches: Vec<TxKey>,
    best: Option<(u16, Bytes)>,
    /// The challenges (`WWW-Authenticate` / `Proxy-Authenticate` lines) of every 401/407 a
    /// branch answered: the one sent upstream carries them all (§16.7 step 7).
    challenges: Vec<(&'static str, Vec<u8>)>,
    got_2xx: bool,
    final_sent: bool,
    cancelled: bool,
    /// The bytes of the branches it started (their requests), charged to its identity's
    /// share with its own (`ShardProxy::by_identity`): a call forked to many bindings
    /// holds a copy per branch.
    branch_weight: usize,
    /// The Reason of the CANCEL that cancelled it (RFC 3326), passed on in the CANCELs of
    /// its branches: the phones of a ring-all answered elsewhere, one hop further down
    /// (another node of ours, a partner's fork), showed a missed call.
    cancel_reason: Option<Bytes>,
    to_tag: String,
    /// Which transaction of its key this is: a lookup's answer is for the one that asked.
    /// A sender may use a key again once its transaction is gone (an INVITE sent again on
    /// a new connection after the first closed).
    id: u64,
    /// What the policy allowed (identity headers downstream).
    grant: Grant,
    /// The AOR it was looked up for (a Record-Route names that party).
    callee: Option<String>,
    /// Its dialog route named a connection that had closed, and the party that was on it
    /// is being looked up: only a binding of this contact (its Request-URI, the party's
    /// remote target) may take it, and not over the closed connection. Set once.
    rebind: Option<(Bytes, Flow)>,
    /// Its Request-URI is `sips:`: its branches go over TLS only.
    sips: bool,
    /// The bytes it holds (its request, the response it would send again, the best answer
    /// and the challenges it keeps), as counted in the table's byte total.
    weight: usize,
    /// An INVITE: no branch of it rings past this ([`ShardProxy::set_max_ring`]), a
    /// fallback to the device's other flow or a rebound branch included.
    ring_until: Option<Instant>,
}

impl Server {
    /// What [`Server::weight`] should be now.
    fn held(&self) -> usize {
        self.request.len()
            + self.txn.last_response().map_or(0, |r| r.len())
            + self.best.as_ref().map_or(0, |(_, b)| b.len())
            + self.challenges.iter().map(challenge_weight).sum::<usize>()
            + self.cancel_reason.as_ref().map_or(0, |r| r.len())
    }
}

#[derive(Debug)]
struct Client {
    txn: ClientTransaction<Bytes>,
    /// The server transaction it works for; `None` for our own CANCELs.
    server: Option<TxKey>,
    outbound: Flow,
    got_provisional: bool,
    final_received: bool,
    cancel_when_provisional: bool,
    /// A CANCEL went out on it (once per branch): Timer C now runs 64·T1 for its answer,
    /// and its next firing fails the branch (RFC 3261 §9.1, §16.8).
    cancel_sent: bool,
    /// Sent over a connection named by one of our flow tokens (a dialog route), not to a
    /// registered contact: if that connection is gone the answer is 430 (RFC 5626 §5.3).
    by_token: bool,
    /// The bytes it holds (the request it sent), as counted in the table's byte total.
    weight: usize,
    /// The device's other flows, tried in turn if this branch's connection fails before
    /// the answer (RFC 5626 §5.3).
    fallbacks: Vec<Target>,
    /// An INVITE branch: Timer C never runs past this, however often a provisional
    /// restarts it ([`ShardProxy::set_max_ring`]).
    ring_until: Option<Instant>,
}

impl Client {
    fn new(txn: ClientTransaction<Bytes>, server: Option<TxKey>, outbound: Flow) -> Client {
        Client {
            weight: txn.request().len(),
            txn,
            server,
            outbound,
            got_provisional: false,
            final_received: false,
            cancel_when_provisional: false,
            cancel_sent: false,
            by_token: false,
            fallbacks: Vec::new(),
            ring_until: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    Server(TxKey),
    Client(TxKey),
    /// RFC 3261 §16.6 step 11: an INVITE branch's guard against ringing forever.
    TimerC(TxKey),
    /// A lookup, registration or question to the other shards that never got its answer
    /// (a store thread gone, a lost message): the request is answered anyway, 64·T1 on.
    Pending(u64),
}

/// Which way a [`Detours`] entry sends a dialog's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Detour {
    /// Requests *from* this flow (a party's new connection, shown to be the party) go to
    /// the entry's flow, the other party's.
    From,
    /// Requests *to* this flow (a party's closed connection) go to the entry's flow, the
    /// binding it registered since.
    To,
}

/// Where a dialog's party that reconnected was last found: the requests that follow take the
/// same way without a second proof or lookup — the ACK of a re-INVITE above all, which can
/// be neither challenged nor held for a lookup. Keyed by a hash with a random key (per shard:
/// nobody can aim at another's entry) of the way, the flow and the Call-ID (and, for a party's
/// new connection, the route's flow tokens: the dialogs a fork made share a Call-ID), so an
/// entry costs a few words whatever the Call-ID's length. Each lasts Timer C + 64·T1 (a
/// re-INVITE's answer may take Timer C, its ACK then follows), is dropped when either flow
/// closes, and at most [`MAX_DETOURS`] are kept, oldest out first.
#[derive(Debug, Default)]
struct Detours {
    /// Key → (where to, the party's new connection for a [`Detour::From`] entry, until
    /// when).
    map: HashMap<u64, (Flow, Option<Flow>, Instant)>,
    order: VecDeque<(Instant, u64)>,
    keys: std::hash::RandomState,
}

/// Dialog detours one shard keeps.
const MAX_DETOURS: usize = 4096;

impl Detours {
    fn key(&self, way: Detour, flow: &Flow, call_id: &[u8], route: &[Party]) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.keys.build_hasher();
        way.hash(&mut h);
        flow.hash(&mut h);
        call_id.hash(&mut h);
        for p in route {
            p.token.hash(&mut h);
        }
        h.finish()
    }

    fn insert(&mut self, now: Instant, until: Instant, key: u64, on: Option<Flow>, to: Flow) {
        self.prune(now);
        while self.order.len() >= MAX_DETOURS {
            self.pop_oldest();
        }
        self.map.insert(key, (to, on, until));
        self.order.push_back((until, key));
    }

    fn get(&self, now: Instant, key: u64) -> Option<&Flow> {
        self.map
            .get(&key)
            .filter(|(_, _, until)| *until > now)
            .map(|(to, _, _)| to)
    }

    fn pop_oldest(&mut self) {
        if let Some((at, k)) = self.order.pop_front()
            && self.map.get(&k).is_some_and(|(_, _, until)| *until == at)
        {
            self.map.remove(&k);
        }
    }

    /// Drops what has expired (the shard's timer calls this every tick: an empty table is
    /// what keeps in-dialog requests from hashing a key at all).
    fn prune(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(at, _)| *at <= now) {
            self.pop_oldest();
        }
    }

    /// Drops the entries leading to `flow` (a party that moved again: its next request
    /// looks it up anew) and those for requests from it. Not those for requests to it: a
    /// closed connection is what they are about (and a send that finds it gone closes it
    /// again).
    fn flow_closed(&mut self, flow: &Flow) {
        if !self.map.is_empty() {
            self.map
                .retain(|_, (to, on, _)| to != flow && on.as_ref() != Some(flow));
        }
    }
}

#[derive(Debug)]
enum Pending {
    /// A server transaction (its key and [`Server::id`]) waits for a lookup's answer.
    Server(TxKey, u64),
    /// A CANCEL's server transaction waits for the other shards to look for its INVITE.
    Cancel(TxKey),
    /// A REGISTER waits for its AOR's owner; `slot`: its connection, the AOR, and whether
    /// this REGISTER took the AOR's place on the connection (the answer keeps the places
    /// in step with what the registrar holds).
    Register {
        key: TxKey,
        /// [`Server::id`]: the answer is for the transaction that asked.
        id: u64,
        slot: Option<(Flow, String, bool)>,
    },
    /// A 2xx ACK waits for a lookup to be forwarded statelessly.
    Ack {
        request: Bytes,
        inbound: Flow,
        /// Who the policy said it is from (what its PAI may say downstream).
        source: Source,
    },
}

/// The breadth of a request that carries no `Max-Breadth`, and the most this proxy lets one
/// have (RFC 5393 §5.3: 60 recommended for both).
pub const MAX_BREADTH: u32 = 60;

/// The request's `Max-Breadth`, if it has a readable one (RFC 5393 §5.3.1; a value past
/// `u32` reads as the largest, which the proxy caps anyway).
fn max_breadth(m: &Message<'_, '_>) -> Option<u32> {
    let h = m
        .headers()
        .iter()
        .find(|h| h.name == HeaderName::Other && h.raw_name.eq_ignore_ascii_case(b"Max-Breadth"))?;
    crate::text::parse_u32_saturating(h.value)
}

/// A branch's response, as the TU sees it.
enum BranchResponse {
    /// From downstream: our Via must be popped before it goes upstream.
    Downstream(Bytes),
    /// Made here (timeout, transport failure): already addressed upstream.
    Local(Bytes),
}

/// The transactions of one flow. Entries of finished transactions are dropped lazily:
/// when they outnumber the live ones (from 16 entries), so the list stays within twice its
/// live transactions and each entry is dropped once (O(1) amortized); an idle flow has none.
#[derive(Debug, Default)]
struct FlowTxns {
    keys: Vec<TimerKey>,
    live: usize,
    /// Of them, server transactions (requests that came in on the flow).
    servers: usize,
}

/// What a connection has to lose ([`ShardProxy::standing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// A partner's, or a client's on which a request authenticated (digest or its
    /// certificate's AOR), that registered an AOR, or that carries a call answered
    /// through us: it keeps its place.
    Known,
    /// Anonymous, with a request waiting for its final response (a call ringing).
    Busy,
    /// Anonymous and with nothing in progress.
    Anonymous,
}

/// The stateful proxy of one shard; see the module docs.
#[derive(Debug)]
pub struct ShardProxy {
    proxy: Proxy,
    limits: Limits,
    timer_cfg: TimerConfig,
    shard: u16,
    /// How many shards there are (a partner's CANCEL may name another shard's INVITE).
    shards: u16,
    servers: HashMap<TxKey, Server>,
    clients: HashMap<TxKey, Client>,
    timers: Timers<TimerKey>,
    pending: HashMap<u64, Pending>,
    /// Who each connection is (set by the driver when it opens).
    flows: HashMap<Flow, FlowInfo>,
    /// The AORs each connection registered (bounded: `max_aors_per_flow` each).
    flow_aors: HashMap<Flow, Vec<String>>,
    /// Client connections on which a request authenticated (digest or a certificate's AOR),
    /// or that carry a call answered through us: they have standing
    /// ([`ShardProxy::standing`]) and keep their place at a full connection budget.
    proven: HashSet<Flow>,
    max_aors_per_flow: usize,
    /// The transactions each flow carries (server: came in on it; client: goes out on it).
    by_flow: HashMap<Flow, FlowTxns>,
    max_transactions: usize,
    max_transactions_per_flow: usize,
    /// Per authenticated identity (a client's AOR): its server transactions on this shard
    /// and the bytes they hold. One account opening connections, each with its own share,
    /// could otherwise take the shard's whole table, partners' calls included.
    by_identity: HashMap<String, (usize, usize)>,
    /// The bytes the transactions hold (requests kept and sent), and its bound.
    txn_bytes: usize,
    max_txn_bytes: usize,
    timer_c: std::time::Duration,
    max_ring: std::time::Duration,
    /// The fraction of new requests admitted (1.0: all), and the credit that spreads it.
    admission: f32,
    /// The node is going away: every new request is answered 503 at the door (the work in
    /// progress, and what finishes it, goes on), so what is in flight reaches zero.
    draining: bool,
    /// Connections going away ([`ShardProxy::set_flow_draining`]): the same, for the new
    /// requests they bring. Dropped as each closes.
    draining_flows: HashSet<Flow>,
    /// In-dialog INVITEs refused for room without a transaction (a stateless 503 keeps
    /// their dialog's To-tag, so their ACK could not be told from the dialog's): their ACK
    /// ends here. Oldest first, each kept 64·T1, at most [`MAX_STATELESS_REINVITES`].
    /// Kept as hashes (keyed per process: nobody can aim at another's), so that 1024 of
    /// them cost 1024 words, not 1024 branches of up to a header line each.
    stateless_reinvites: (
        HashSet<u64>,
        VecDeque<(Instant, u64)>,
        std::hash::RandomState,
    ),
    /// Dialogs whose party reconnected, as last resolved: what follows at once (the ACK of
    /// a re-INVITE, which cannot be challenged nor looked up again) goes the same way.
    detours: Detours,
    admit_credit: f32,
    /// RFC 7339: whose `oc` is honoured, the flows that advertised it and are trusted to
    /// (their new requests pass the door; their responses carry the feedback), the time
    /// the feedback's sequence number counts from (shared by the shards: a client that
    /// talks to several compares their feedback in time), and until when a shard that
    /// caught up still tells them `oc=0`.
    oc_trust: oc::Trust,
    oc_flows: HashSet<Flow>,
    oc_epoch: Instant,
    /// New requests that reached the door while shedding, and those of them from clients
    /// doing overload control, since the driver last asked.
    door: (u32, u32),
    oc_calm_until: Option<Instant>,
    /// RFC 7339 toward partners: the feedback each partner flow gave us, and the share of
    /// new requests to it we drop (503 here) as it asked.
    oc_down: HashMap<Flow, oc::Throttle>,
    /// The latest time handed in (responses are written without one).
    clock: Option<Instant>,
    policy: Policy,
    out: VecDeque<Output>,
    next_id: u64,
    stats: Stats,
}

/// Header storage for re-reading messages this shard keeps or made: what it forwards has
/// grown by its own lines (Via, Max-Forwards, Record-Route, a Path's Routes, an asserted
/// identity) past what it accepts from a peer.
const KEPT_HEADERS: usize = 128;

/// How good a final answer is to send upstream when no branch answered 2xx (RFC 3261
/// §16.7 step 6), lowest best: any 6xx; else the lowest class; within 4xx the answers that
/// tell the caller how to try again (401, 407, 415, 420, 484) first, a 408 (a branch that
/// timed out, ours or downstream's) last; then the lowest code. For a non-INVITE request a
/// 408 is worse than anything: it is never sent upstream (RFC 4320 §4.2), so any other
/// branch's answer must win over it — a forked MESSAGE whose one branch timed out and
/// whose other said 486 went unanswered.
fn response_rank(code: u16, invite: bool) -> (u16, u8, u8, u16) {
    let timeout = code == 408;
    let class = match code {
        _ if timeout && !invite => 7,
        600.. => 0,
        _ => code / 100,
    };
    let retry_info = u8::from(!matches!(code, 401 | 407 | 415 | 420 | 484));
    (class, retry_info, u8::from(timeout), code)
}

/// The most bytes of challenge values a fork's merged 401/407 carries from its branches
/// (RFC 3261 §16.7 step 7); past it the rest are left out.
const MERGED_CHALLENGE_BYTES: usize = 8 * 1024;

/// The most challenges a fork's merged 401/407 carries (one per realm and algorithm of each
/// branch is plenty).
const MERGED_CHALLENGES: usize = 32;

/// The most challenges kept from one branch's answer.
const MERGED_PER_ANSWER: usize = 8;

/// What one kept challenge costs: its name and value, and its entry (counted so that a
/// thousand empty or one-byte lines do not pass for nothing).
fn challenge_weight(c: &(&'static str, Vec<u8>)) -> usize {
    64 + c.0.len() + c.1.len()
}

/// A `Retry-After` value from 2 to 9 s, picked by `seed` (a counter), so refused clients do
/// not come back together.
pub fn retry_after_spread(seed: u64) -> [u8; 1] {
    // Mixed (Fibonacci hashing): callers' seeds step by 2 or 3 (one counter gives a
    // request several numbers), and `seed % 8` then visited only some of the values.
    [b'2' + (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) as u8]
}

/// In-dialog INVITEs refused for room whose ACK is remembered
/// ([`StatefulProxy::remember_stateless_reinvite`]).
const MAX_STATELESS_REINVITES: usize = 1024;

/// The `WWW-Authenticate` and `Proxy-Authenticate` lines of a response, as (name, value).
fn challenges_of(m: &Message<'_, '_>) -> Vec<(&'static str, Vec<u8>)> {
    m.headers()
        .iter()
        .filter_map(|h| {
            let name = if h.raw_name.eq_ignore_ascii_case(b"WWW-Authenticate") {
                "WWW-Authenticate"
            } else if h.raw_name.eq_ignore_ascii_case(b"Proxy-Authenticate") {
                "Proxy-Authenticate"
            } else {
                return None;
            };
            // An empty one challenges nothing, and would go upstream as a bad header.
            (!h.value.trim_ascii().is_empty()).then(|| (name, h.value.to_vec()))
        })
        .collect()
}

/// A 503 response rewritten as 500 (its status line only; everything else is kept).
fn with_status(resp: &[u8], line: &[u8]) -> Vec<u8> {
    let end = resp
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(resp.len());
    let mut out = line.to_vec();
    out.extend_from_slice(&resp[end..]);
    out
}

/// One authenticated identity's share of a shard's transactions: as many as this many
/// connections may hold (`max_transactions_per_flow` each; a PBX registered as one account
/// carries its calls over a few), and at most this fraction of the table's bytes.
const IDENTITY_CONNECTIONS: usize = 4;
const IDENTITY_BYTES_SHARE: usize = 16;

/// The identity a grant names: a client's authenticated AOR.
fn identity_of(grant: &Grant) -> Option<&str> {
    match &grant.source {
        Source::Client(Some(aor)) => Some(aor),
        _ => None,
    }
}

/// A server transaction of `grant`'s identity, holding `weight` bytes, comes or goes.
fn account_identity(
    loads: &mut HashMap<String, (usize, usize)>,
    grant: &Grant,
    weight: usize,
    comes: bool,
) {
    let Some(aor) = identity_of(grant) else {
        return;
    };
    match (loads.get_mut(aor), comes) {
        (Some(load), true) => *load = (load.0 + 1, load.1 + weight),
        (None, true) => {
            loads.insert(aor.to_string(), (1, weight));
        }
        (Some(load), false) if load.0 > 1 => {
            *load = (load.0 - 1, load.1.saturating_sub(weight));
        }
        (Some(_), false) => {
            loads.remove(aor);
        }
        (None, false) => {}
    }
}

/// The Reason values of a CANCEL (RFC 3326), joined as one list; none past a header line.
fn reason_of(m: &Message<'_, '_>, limits: &Limits) -> Option<Bytes> {
    let mut out: Vec<u8> = Vec::new();
    for h in m
        .headers()
        .iter()
        .filter(|h| h.raw_name.eq_ignore_ascii_case(b"Reason") && !h.value.is_empty())
    {
        if !out.is_empty() {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(h.value);
    }
    // A folded value goes out on one line (a reader that knows no folding would take the
    // continuation for a line of its own).
    crate::edit::unfold(&mut out);
    // Within a header line once written (`Reason: ` and CRLF): the next hop refused a
    // longer line, and the CANCEL, sent once, never reached the callee.
    (!out.is_empty() && out.len() + 10 <= limits.max_header_line).then(|| out.into())
}

/// Re-reads a message this shard already accepted (and may have grown), within limits
/// widened by what forwarding adds: before, a request accepted at the limits could not be
/// re-read once forwarded, and its CANCEL or hop-by-hop ACK was silently never sent.
fn with_parsed<T>(
    bytes: &[u8],
    limits: &Limits,
    f: impl FnOnce(&Message<'_, '_>, &Essentials<'_>) -> T,
) -> Option<T> {
    // Forwarding adds one Via (and `received`/`rport` to the one below), Max-Forwards,
    // Record-Routes and a PAI of its own, a Path's Routes (each a value of a REGISTER that
    // met these limits, ≤ 8 of them, together ≤ `max_contact_bytes`) and a Request-URI
    // taken from a Contact (itself within a REGISTER's limits).
    let limits = Limits {
        max_message: 3 * limits.max_message + 16 * 1024,
        max_headers: KEPT_HEADERS,
        max_header_line: limits.max_header_line + 1024,
        max_vias: limits.max_vias + 1,
        max_uri: limits.max_uri.max(limits.max_message),
    };
    // The usual storage first (this runs for every answer forwarded); the larger one only
    // for a message that grew past it.
    let mut h = [Header::EMPTY; 64];
    match parse(bytes, &mut h, &limits, Framing::Stream) {
        Ok(Status::Complete(m)) => {
            let e = m.validate(&limits).ok()?;
            Some(f(&m, &e))
        }
        Err(ParseError::TooManyHeaders) => {
            let mut h = [Header::EMPTY; KEPT_HEADERS];
            let Ok(Status::Complete(m)) = parse(bytes, &mut h, &limits, Framing::Stream) else {
                return None;
            };
            let e = m.validate(&limits).ok()?;
            Some(f(&m, &e))
        }
        _ => None,
    }
}

impl ShardProxy {
    /// A shard proxy for shard number `shard` (used to keep branches unique across shards)
    /// that authorizes requests with `policy`.
    pub fn new(
        proxy: Proxy,
        policy: Policy,
        limits: Limits,
        timer_cfg: TimerConfig,
        shard: u16,
        now: Instant,
    ) -> Self {
        ShardProxy {
            proxy,
            limits,
            timer_cfg,
            shard,
            shards: shard + 1,
            servers: HashMap::new(),
            clients: HashMap::new(),
            timers: Timers::new(),
            pending: HashMap::new(),
            flows: HashMap::new(),
            flow_aors: HashMap::new(),
            proven: HashSet::new(),
            max_aors_per_flow: 16,
            by_flow: HashMap::new(),
            max_transactions: 50_000,
            max_transactions_per_flow: 1024,
            by_identity: HashMap::new(),
            txn_bytes: 0,
            max_txn_bytes: 512 << 20,
            timer_c: TIMER_C,
            max_ring: MAX_RING,
            admission: 1.0,
            draining: false,
            draining_flows: HashSet::new(),
            stateless_reinvites: Default::default(),
            detours: Detours::default(),
            admit_credit: 0.0,
            oc_trust: oc::Trust::default(),
            oc_flows: HashSet::new(),
            oc_epoch: now,
            door: (0, 0),
            oc_calm_until: None,
            oc_down: HashMap::new(),
            clock: None,
            policy,
            out: VecDeque::new(),
            next_id: 0,
            stats: Stats::default(),
        }
    }

    /// How many shards share the work (unless told: this one and those numbered before it).
    /// With more than one, a partner's CANCEL that names no INVITE here is asked of the
    /// others ([`Output::CancelElsewhere`]); a response naming a shard past them is dropped.
    pub fn set_shards(&mut self, n: u16) {
        self.shards = n.max(self.shard + 1);
    }

    /// The proxy decisions in use.
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            challenges: self.policy.challenges(),
            ..self.stats
        }
    }

    /// The policy (for its gauges).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Live server and client transactions, and pending lookups.
    pub fn load(&self) -> (usize, usize, usize) {
        (self.servers.len(), self.clients.len(), self.pending.len())
    }

    /// Requests still waiting for their final response (plus pending lookups): what a
    /// draining server waits for. Transactions that already answered (and only absorb
    /// retransmissions for Timer H/L) do not count.
    pub fn in_progress(&self) -> usize {
        self.servers.values().filter(|s| !s.final_sent).count() + self.pending.len()
    }

    /// Requests that arrived on `flow` and still wait for their final response: what a
    /// connection closing after a framing error waits for, so a valid request ahead of the
    /// garbage is answered.
    pub fn in_progress_on(&self, flow: &Flow) -> usize {
        let Some(t) = self.by_flow.get(flow) else {
            return 0;
        };
        t.keys
            .iter()
            .filter(|k| match k {
                TimerKey::Server(k) => self
                    .servers
                    .get(k)
                    .is_some_and(|s| &s.inbound == flow && !s.final_sent),
                _ => false,
            })
            .count()
    }

    /// What `flow` has to lose here, for a driver whose connection budget is full and
    /// would close an anonymous connection to make room for a new one (before, connections
    /// that never authenticated, kept open by keepalives, filled the budget and every new
    /// phone was refused at accept).
    pub fn standing(&self, flow: &Flow) -> Standing {
        if !matches!(flow, Flow::Conn(_))
            || self.partner_of(flow).is_some()
            || self.proven.contains(flow)
            || self.flow_aors.contains_key(flow)
        {
            Standing::Known
        } else if self.in_progress_on(flow) > 0 {
            Standing::Busy
        } else {
            Standing::Anonymous
        }
    }

    /// Index entries held for `flow` (live transactions plus not yet compacted ones): at most
    /// twice its live transactions, or 16.
    pub fn indexed(&self, flow: &Flow) -> usize {
        self.by_flow.get(flow).map_or(0, |t| t.keys.len())
    }

    /// Most server transactions this shard holds at once (a request beyond gets a stateless
    /// 503 with Retry-After). Default 50,000.
    pub fn set_max_transactions(&mut self, n: usize) {
        self.max_transactions = n;
    }

    /// Most server transactions one client connection may hold at once (0: no limit;
    /// partners are not limited): one client cannot take the shard's table from everyone
    /// else. Past it, its new requests get 503. Default 1024.
    pub fn set_max_transactions_per_flow(&mut self, n: usize) {
        self.max_transactions_per_flow = n;
    }

    /// Most bytes the transactions may hold (each keeps the request it received and the
    /// responses it keeps, each branch the request it sent): past it new requests get 503 like past the count. A count alone
    /// let ringing INVITEs of up to `max_message` each hold gigabytes. Default 512 MiB.
    pub fn set_max_transaction_bytes(&mut self, n: usize) {
        self.max_txn_bytes = n;
    }

    /// The bytes the transactions hold now.
    pub fn transaction_bytes(&self) -> usize {
        self.txn_bytes
    }

    /// The fraction of new requests to admit, 0.0–1.0 (its driver decides, from loop lag
    /// and queues). Requests that would start new work — out of dialog, not CANCEL — beyond
    /// that fraction are answered 503 with Retry-After before any other work (no
    /// authentication, lookup or state); admitted ones are spread evenly (a credit, not a
    /// coin). In-dialog requests (BYE, re-INVITE), CANCEL, ACK and responses always pass:
    /// they finish what was admitted.
    ///
    /// Clients that advertise overload control (RFC 7339, `oc` in their Via) and are
    /// trusted to honour it ([`ShardProxy::set_overload_control`]) are told the same
    /// fraction instead: their responses carry `oc` = the share to drop before sending, and
    /// their new requests pass the door, since they already dropped it.
    /// Draining (a SIGTERM): from now on every new request — a REGISTER, a call, a
    /// MESSAGE, from clients, partners and cluster nodes alike — is answered 503 with
    /// Retry-After at the door, so its sender tries another server (a phone with a second
    /// flow, a carrier's next destination, another node), while CANCEL and requests inside
    /// our dialogs still pass. Without it a busy node took new work for its whole drain and
    /// calls set up near the end were cut when it stopped.
    pub fn set_draining(&mut self) {
        self.draining = true;
    }

    /// One connection is going away (a TLS 1.2 key spent: it ends once what is in progress
    /// on it is answered): new requests it brings are answered 503 with Retry-After at the
    /// door, as when the node drains, so the peer sends them on another connection; CANCEL,
    /// requests inside our dialogs and responses still pass.
    /// Not a partner's or a cluster node's connection: a 503 with Retry-After reads to an
    /// SBC as "this destination is down", and a node's forwarded INVITE would fail upstream.
    pub fn set_flow_draining(&mut self, flow: &Flow) {
        if self.partner_of(flow).is_none() {
            self.draining_flows.insert(flow.clone());
        }
    }

    /// Answers a share of new requests 503 at the door (overload), from 0 to 1.
    pub fn set_admission(&mut self, fraction: f32) {
        let was = self.admission;
        self.admission = fraction.clamp(0.0, 1.0);
        if self.admission >= 1.0 {
            self.admit_credit = 0.0;
            if was < 1.0 {
                self.oc_calm_until = self.clock.map(|c| {
                    c + std::time::Duration::from_millis(u64::from(oc::DEFAULT_VALIDITY_MS))
                });
            }
        }
    }

    /// Whose overload-control claims (RFC 7339) are honoured. Default
    /// [`oc::Trust::Partners`].
    pub fn set_overload_control(&mut self, trust: oc::Trust) {
        self.oc_trust = trust;
        if trust == oc::Trust::Off {
            self.oc_flows.clear();
            self.oc_down.clear();
        }
    }

    /// The instant `oc-seq` counts from (default: `now` at [`ShardProxy::new`]). Give every
    /// shard the same one.
    pub fn set_overload_control_epoch(&mut self, epoch: Instant) {
        self.oc_epoch = epoch;
    }

    /// New requests that reached the door while this shard was shedding, and how many of
    /// them came from clients doing overload control, since the last call (the driver
    /// steers finely when those are most of the load).
    pub fn take_door_counts(&mut self) -> (u32, u32) {
        std::mem::take(&mut self.door)
    }

    /// Does this request come from a client that does its own overload control (RFC 7339)
    /// and is trusted to? Remembers the flow, so its responses carry the feedback.
    fn cooperates(&mut self, flow: &Flow, ess: &Essentials<'_>) -> bool {
        let trusted = match self.oc_trust {
            oc::Trust::Off => false,
            oc::Trust::Partners => self.partner_of(flow).is_some(),
            oc::Trust::All => true,
        };
        if !trusted {
            return false;
        }
        if !oc::advertises(&ess.top_via) {
            return false;
        }
        if !self.oc_flows.contains(flow) {
            self.oc_flows.insert(flow.clone());
        }
        true
    }

    /// Overload-control feedback for a response going to `flow`, when it is due: the flow
    /// advertised support and the shard is shedding, or caught up less than one validity
    /// period ago (`oc=0` ends the clients' reduction before it would expire).
    fn feedback_for(&self, flow: &Flow) -> Option<Feedback> {
        let calming = matches!((self.clock, self.oc_calm_until), (Some(c), Some(u)) if c < u);
        if (self.admission >= 1.0 && !calming) || !self.oc_flows.contains(flow) {
            return None;
        }
        // oc-seq: the time since the shared epoch, in 10 µs steps (seconds and five
        // fraction digits as written), so it rises with every change, on every shard.
        let seq = self.clock.map_or(0, |c| {
            (c.saturating_duration_since(self.oc_epoch).as_micros() / 10) as u64
        });
        Some(Feedback::for_admission(
            self.admission,
            oc::DEFAULT_VALIDITY_MS,
            seq,
        ))
    }

    /// All or nothing: [`ShardProxy::set_admission`] with 0.0 (`true`) or 1.0.
    pub fn set_overloaded(&mut self, on: bool) {
        self.set_admission(if on { 0.0 } else { 1.0 });
    }

    /// Whether a new request is admitted under the current admission fraction.
    fn admit(&mut self) -> bool {
        if self.admission >= 1.0 {
            return true;
        }
        self.admit_credit += self.admission;
        if self.admit_credit >= 1.0 {
            self.admit_credit -= 1.0;
            true
        } else {
            false
        }
    }

    /// Timer C (RFC 3261 §16.6: more than 3 minutes). Default 3 minutes 1 second.
    pub fn set_timer_c(&mut self, d: std::time::Duration) {
        self.timer_c = d;
    }

    /// The longest an INVITE may ring from its arrival, however often provisionals restart
    /// Timer C: each of its branches is cancelled as at Timer C then (Kamailio's
    /// `max_inv_lifetime`). Default 10 minutes.
    pub fn set_max_ring(&mut self, d: std::time::Duration) {
        self.max_ring = d;
    }

    /// Records that `key` (just inserted) runs over `flow`.
    fn index(&mut self, flow: &Flow, key: TimerKey) {
        let t = self.by_flow.entry(flow.clone()).or_default();
        t.servers += usize::from(matches!(key, TimerKey::Server(_)));
        t.keys.push(key);
        t.live += 1;
    }

    /// A transaction over `flow` ended (already removed from its table).
    fn unindex(&mut self, flow: &Flow, server: bool) {
        let Some(t) = self.by_flow.get_mut(flow) else {
            return;
        };
        if server {
            t.servers = t.servers.saturating_sub(1);
        }
        t.live = t.live.saturating_sub(1);
        if t.live == 0 {
            self.by_flow.remove(flow);
        } else if t.keys.len() >= 16 && t.keys.len() > 2 * t.live {
            let (servers, clients) = (&self.servers, &self.clients);
            t.keys.retain(|k| match k {
                TimerKey::Server(k) => servers.get(k).is_some_and(|s| &s.inbound == flow),
                TimerKey::Client(k) => clients.get(k).is_some_and(|c| &c.outbound == flow),
                TimerKey::TimerC(_) | TimerKey::Pending(_) => false,
            });
        }
    }

    /// Counts again what a server transaction holds, after a response was kept or sent.
    fn reweigh(&mut self, k: &TxKey) {
        if let Some(s) = self.servers.get_mut(k) {
            let held = s.held();
            self.txn_bytes = (self.txn_bytes + held).saturating_sub(s.weight);
            if let Some(load) = identity_of(&s.grant).and_then(|a| self.by_identity.get_mut(a)) {
                load.1 = (load.1 + held).saturating_sub(s.weight);
            }
            s.weight = held;
        }
    }

    fn remove_server(&mut self, k: &TxKey) -> Option<Server> {
        let s = self.servers.remove(k)?;
        // Its branches still running (a CANCEL's answer to come) now work for no one: a new
        // transaction with the same key (the request sent again) is not theirs.
        for b in &s.branches {
            if let Some(c) = self.clients.get_mut(b) {
                c.server = None;
            }
        }
        self.txn_bytes = self.txn_bytes.saturating_sub(s.weight);
        account_identity(
            &mut self.by_identity,
            &s.grant,
            s.weight + s.branch_weight,
            false,
        );
        self.timers.cancel(&TimerKey::Server(k.clone()));
        self.unindex(&s.inbound, true);
        Some(s)
    }

    fn remove_client(&mut self, k: &TxKey) {
        let Some(c) = self.clients.remove(k) else {
            return;
        };
        self.txn_bytes = self.txn_bytes.saturating_sub(c.weight);
        self.timers.cancel(&TimerKey::Client(k.clone()));
        self.timers.cancel(&TimerKey::TimerC(k.clone()));
        self.unindex(&c.outbound, false);
    }

    /// Is there no state at all (no transactions, nothing pending)?
    pub fn is_idle(&self) -> bool {
        self.servers.is_empty() && self.clients.is_empty() && self.pending.is_empty()
    }

    /// Most AORs one connection may register (its bindings are then at most this times the
    /// registrar's contacts per AOR). Default 16.
    pub fn set_max_aors_per_flow(&mut self, n: usize) {
        self.max_aors_per_flow = n;
    }

    /// Holds `p` until its answer comes (token `token`), at most 64·T1.
    fn wait_for(&mut self, token: u64, p: Pending) {
        self.pending.insert(token, p);
        // The latest time seen (every caller is handling a message or an answer now).
        if let Some(now) = self.clock {
            let at = now + self.timer_cfg.t1.saturating_mul(64);
            self.timers.set(TimerKey::Pending(token), Some(at));
        }
    }

    /// The answer for `token` came: what waited for it, if anything still does.
    fn answered(&mut self, token: u64) -> Option<Pending> {
        let p = self.pending.remove(&token)?;
        self.timers.set(TimerKey::Pending(token), None);
        Some(p)
    }

    /// No answer for `token` in 64·T1: the request that waited is answered now — 503 for a
    /// lookup or a registration (the caller may try again), 481 for a CANCEL — instead of
    /// holding its transaction until its connection closes (`Stats::unanswered_lookups`).
    fn never_answered(&mut self, now: Instant, token: u64) {
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        self.stats.unanswered_lookups += 1;
        // A REGISTER that took a new place among its connection's AORs gives it back, as a
        // refused one does (the connection otherwise reached its AOR limit for good, with
        // AORs it never bound counted as its own).
        if let Pending::Register {
            slot: Some((flow, aor, true)),
            ..
        } = &p
        {
            self.release_aor(flow, aor);
        }
        match p {
            Pending::Server(key, id) | Pending::Register { key, id, .. }
                if self.servers.get(&key).is_none_or(|s| s.id != id) => {}
            Pending::Server(key, _) | Pending::Register { key, .. } => {
                let retry = retry_after_spread(self.unique()).to_vec();
                self.answer(
                    now,
                    &key,
                    503,
                    "Service Unavailable",
                    &[("Retry-After", retry)],
                )
            }
            Pending::Cancel(key) => {
                self.answer(now, &key, 481, "Call/Transaction Does Not Exist", &[])
            }
            Pending::Ack { .. } => {}
        }
    }

    /// `flow` no longer holds a binding of `aor` (it expired, or went by a REGISTER from
    /// elsewhere: `Contact: *`, another device of the instance, room made for newer ones):
    /// its place among the connection's AORs is given back. A connection whose users come
    /// and go (an SBC's, a PBX's) would otherwise reach `max_aors_per_flow` for good.
    pub fn release_aor(&mut self, flow: &Flow, aor: &str) {
        if let Some(aors) = self.flow_aors.get_mut(flow) {
            // The entry stays (a REGISTER of the flow's may be on its way back; the flow's
            // close drops it).
            aors.retain(|a| a != aor);
        }
    }

    /// Before the policy: a dialog detour made moments ago ([`Detours`]) is taken — a
    /// request to a party's closed connection goes to where the party was found since, one
    /// from a party's new connection that showed itself goes on — and a
    /// [`Decision::Reconnected`] whose sender has already shown it is the party its From
    /// names — its connection holds a binding of that AOR (it registered again after
    /// reconnecting, RFC 5626 §4.2), or its certificate proves it — goes on to the other
    /// party's flow with no challenge. Any other decision is returned as it is.
    fn known_party(
        &mut self,
        now: Instant,
        flow: &Flow,
        ess: &Essentials<'_>,
        decision: Decision,
    ) -> Decision {
        if !self.detours.map.is_empty() {
            let found = match &decision {
                Decision::ToFlow(to) => {
                    let key = self.detours.key(Detour::To, to, ess.call_id, &[]);
                    self.detours.get(now, key)
                }
                Decision::Reconnected(parties) => {
                    let key = self.detours.key(Detour::From, flow, ess.call_id, parties);
                    self.detours.get(now, key)
                }
                _ => None,
            };
            if let Some(to) = found.cloned() {
                return self.moved_on(now, ess.call_id, to);
            }
        }
        let Decision::Reconnected(parties) = &decision else {
            return decision;
        };
        let Some(from) = crate::registrar::aor_of(&ess.from.uri()) else {
            return decision;
        };
        let registered = self.flow_aors.get(flow).is_some_and(|a| a.contains(&from));
        let certified = self.flows.get(flow).is_some_and(|i| {
            matches!(&i.principal, crate::policy::Principal::Client { cert_aors } if cert_aors.contains(&from))
        });
        if !(registered || certified) {
            return decision;
        }
        match self.proxy.party_route(parties, ess.call_id, &from).cloned() {
            Some(to) => self.reconnected_to(now, flow, ess.call_id, parties, to),
            None => decision,
        }
    }

    /// How long a [`Detours`] entry lasts.
    fn detour_until(&self, now: Instant) -> Instant {
        now + self.timer_c + self.timer_cfg.t1.saturating_mul(64)
    }

    /// A party's new connection `flow` was shown to be it: its requests on this route go to
    /// `to`, the other party's flow (remembered, [`Detours`]), or where that party was found
    /// since, if it reconnected too.
    fn reconnected_to(
        &mut self,
        now: Instant,
        flow: &Flow,
        call_id: &[u8],
        route: &[Party],
        to: Flow,
    ) -> Decision {
        let key = self.detours.key(Detour::From, flow, call_id, route);
        let until = self.detour_until(now);
        self.detours
            .insert(now, until, key, Some(flow.clone()), to.clone());
        self.moved_on(now, call_id, to)
    }

    /// Toward `to`, or where the party on it was found since it closed ([`Detours`]).
    fn moved_on(&self, now: Instant, call_id: &[u8], to: Flow) -> Decision {
        if !self.detours.map.is_empty() {
            let key = self.detours.key(Detour::To, &to, call_id, &[]);
            if let Some(next) = self.detours.get(now, key) {
                return Decision::ToFlow(next.clone());
            }
        }
        Decision::ToFlow(to)
    }

    /// Another shard found where the party on `gone`, a closed connection, went in the
    /// dialog `call_id` ([`Output::Detour`]): requests on this shard's connections (a
    /// partner's other connections, another node's links) to `gone` go there too.
    pub fn learn_detour(&mut self, now: Instant, gone: Flow, call_id: &[u8], to: Flow) {
        self.tick_clock(now);
        let key = self.detours.key(Detour::To, &gone, call_id, &[]);
        let until = self.detour_until(now);
        self.detours.insert(now, until, key, None, to);
    }

    /// Dialog detours held (a gauge; bounded by [`MAX_DETOURS`]).
    pub fn detours(&self) -> usize {
        self.detours.map.len()
    }

    /// A [`Decision::Reconnected`] the policy allowed: on to the other party's flow if the
    /// AOR it authenticated is one of the dialog's parties; refused if not (an authenticated
    /// user holding someone else's dialog route). Any other decision is returned as it is.
    fn proven_party(
        &mut self,
        now: Instant,
        flow: &Flow,
        ess: &Essentials<'_>,
        decision: Decision,
        grant: &Grant,
    ) -> Decision {
        let Decision::Reconnected(parties) = &decision else {
            return decision;
        };
        let to = match &grant.source {
            Source::Client(Some(aor)) => self.proxy.party_route(parties, ess.call_id, aor),
            _ => None,
        };
        match to.cloned() {
            // Remembered: the ACK of what it sends now (a re-INVITE) cannot be challenged.
            Some(to) => self.reconnected_to(now, flow, ess.call_id, parties, to),
            None => Decision::Refuse(crate::policy::Denial {
                code: 403,
                reason: "Not A Party To This Dialog",
                label: "dialog_not_party",
            }),
        }
    }

    /// May `flow` register `aor`: it has (`Some(false)`), or it holds fewer than the most
    /// AORs a connection may register (`Some(true)`: a place is taken for it). `None`: no.
    fn flow_may_register(&mut self, flow: &Flow, aor: &str) -> Option<bool> {
        let Flow::Conn(_) = flow else {
            return Some(false);
        };
        let aors = self.flow_aors.entry(flow.clone()).or_default();
        if aors.iter().any(|a| a == aor) {
            return Some(false);
        }
        if aors.len() >= self.max_aors_per_flow {
            return None;
        }
        aors.push(aor.to_string());
        Some(true)
    }

    /// Sends cluster node `node` what the REGISTER `request` (answered 200 here) removes
    /// from the bindings other nodes hold for its AOR
    /// ([`crate::registrar::removals_for_nodes`]): a removal-only REGISTER with the UA's
    /// To, From, Call-ID and CSeq, so the node applies it under the usual Call-ID/CSeq rules
    /// (a REGISTER made there since wins). A client transaction of our own: its answer ends
    /// here. Returns whether anything was sent.
    pub fn send_removals(&mut self, now: Instant, node: &str, request: &[u8]) -> bool {
        let flow = Flow::Peer(node.to_string());
        let iface = self.iface_of(&flow);
        let unique = self.unique();
        let limits = self.limits;
        let built = with_parsed(request, &limits, |m, e| {
            let contacts = crate::registrar::removals_for_nodes(m)?;
            let branch = Proxy::branch(m, e, unique);
            let header = |name: HeaderName| m.header(name).map(|h| h.value);
            let (Some(uri), Some(to), Some(from)) = (
                m.request_uri(),
                header(HeaderName::To),
                header(HeaderName::From),
            ) else {
                return None;
            };
            let mut out = Vec::with_capacity(512);
            let mut line = |name: &str, value: &[u8]| {
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
            };
            line(
                "Via",
                format!(
                    "SIP/2.0/{} {}:{};branch={branch}",
                    iface.transport.via_name(),
                    iface.host,
                    iface.port
                )
                .as_bytes(),
            );
            line("Max-Forwards", b"70");
            line("To", to);
            line("From", from);
            line("Call-ID", e.call_id);
            line("CSeq", format!("{} REGISTER", e.cseq.seq).as_bytes());
            for c in &contacts {
                line("Contact", c.as_bytes());
            }
            if contacts.iter().any(|c| c == "*") {
                line("Expires", b"0");
            }
            // Keyed by reg-id where the UA did outbound (RFC 5626): the node must read it.
            if contacts.iter().any(|c| c.contains(";reg-id=")) {
                line("Supported", b"outbound");
            }
            line("Content-Length", b"0");
            let mut msg = Vec::with_capacity(out.len() + uri.len() + 32);
            msg.extend_from_slice(b"REGISTER ");
            msg.extend_from_slice(uri);
            msg.extend_from_slice(b" SIP/2.0\r\n");
            msg.extend_from_slice(&out);
            msg.extend_from_slice(b"\r\n");
            Some((branch, msg))
        })
        .flatten();
        let Some((branch, msg)) = built else {
            return false;
        };
        let key = TxKey {
            branch: branch.into_bytes().into(),
            sent_by: Box::default(),
            method: KeyMethod::Other(b"REGISTER".to_vec().into()),
        };
        let txn = ClientTransaction::new_non_invite(now, &self.timer_cfg, msg.into());
        self.index(&flow, TimerKey::Client(key.clone()));
        // Counted as every client transaction is (its end takes its weight off: uncounted,
        // each removal drove the table's byte total lower than what it held).
        let client = Client::new(txn, None, flow);
        self.txn_bytes += client.weight;
        if let Some(old) = self.clients.insert(key.clone(), client) {
            self.txn_bytes = self.txn_bytes.saturating_sub(old.weight);
        }
        self.drive_client(now, &key);
        true
    }

    /// Tells who `flow` is (call when a connection opens, after its handshake). A partner's
    /// connection is then addressed as the partner in dialog routes.
    pub fn set_flow_info(&mut self, flow: Flow, info: FlowInfo) {
        self.flows.insert(flow, info);
    }

    fn partner_of<'a>(&'a self, flow: &'a Flow) -> Option<&'a str> {
        match flow {
            Flow::Peer(p) => Some(p),
            Flow::Conn(_) => self.flows.get(flow).and_then(|i| i.principal.partner()),
        }
    }

    /// Did this flow come from another node of our cluster?
    fn came_from_node(&self, flow: &Flow) -> bool {
        self.partner_of(flow).is_some_and(|p| self.proxy.is_node(p))
    }

    /// The interface a flow reaches us by (named in our Via and Record-Route toward it).
    fn iface_of(&self, flow: &Flow) -> crate::proxy::Interface {
        let cfg = self.proxy.config();
        match flow {
            Flow::Peer(_) => cfg.partner_interface.clone(),
            Flow::Conn(_) => self
                .flows
                .get(flow)
                .and_then(|i| i.iface.as_deref().cloned()),
        }
        .unwrap_or_else(|| self.proxy.default_interface())
    }

    /// The address a request came from, for its sender's Via: `received` where the sent-by
    /// is not that address (a partner's is usually its name), `rport` where it asks (RFC
    /// 3261 §18.2.1 applies to every sender, RFC 3581). None for a partner's name (a
    /// transaction moved onto its link when the connection it came on closed).
    fn client_source(&self, flow: &Flow) -> Option<std::net::SocketAddr> {
        self.flows.get(flow)?.source
    }

    /// The partner-aware form of a flow for dialog routes.
    /// Do two flows speak for the same sender: one connection, or one partner whichever of
    /// its connections (or our link to it) it used? (No allocation, unlike comparing
    /// [`Self::route_flow`]s.)
    fn same_sender(&self, a: &Flow, b: &Flow) -> bool {
        match (self.partner_of(a), self.partner_of(b)) {
            (Some(x), Some(y)) => x == y,
            (None, None) => a == b,
            _ => false,
        }
    }

    fn route_flow(&self, flow: &Flow) -> Flow {
        match self.partner_of(flow) {
            Some(p) => Flow::Peer(p.to_string()),
            None => flow.clone(),
        }
    }

    /// The next output.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`ShardProxy::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// A number no other transaction of any shard holds now: the shard in the top 16 bits,
    /// a counter in the 48 below (it wraps there rather than spill into the shard's bits,
    /// which route responses).
    fn unique(&mut self) -> u64 {
        self.next_id = (self.next_id + 1) & ((1 << 48) - 1);
        (u64::from(self.shard) << 48) | self.next_id
    }

    /// Moves the clock on (never back: a message read before the last timer tick may be
    /// handled after it, and `oc-seq` must not fall).
    fn tick_clock(&mut self, now: Instant) {
        self.clock = Some(self.clock.map_or(now, |c| c.max(now)));
    }

    fn send(&mut self, flow: &Flow, mut bytes: Bytes) {
        if bytes.starts_with(b"SIP/2.0 ")
            && let Some(f) = self.feedback_for(flow)
            && let Some(Some(with)) = with_parsed(&bytes, &self.limits, |m, _| {
                let mut e = Editor::new(m);
                matches!(e.overload_feedback(&f), Ok(true)).then(|| e.finish())
            })
        {
            self.stats.oc_feedback += 1;
            bytes = with.into();
        }
        self.out.push_back(Output::Send {
            flow: flow.clone(),
            bytes,
        });
    }

    /// A framed message arrived on `flow`.
    pub fn handle_message(&mut self, now: Instant, flow: &Flow, bytes: &[u8]) {
        self.tick_clock(now);
        let mut storage = [Header::EMPTY; 64];
        let msg = match parse(bytes, &mut storage, &self.limits, Framing::Stream) {
            Ok(Status::Complete(m)) => m,
            // An answer to a request we forwarded copies its Vias, Record-Routes and more
            // (RFC 3261 §8.2.6.2, §12.1.1) around ours, and may outgrow limits its request
            // met: read within the limits widened for what we forwarded. Before, the
            // callee's connection was closed (too many headers, a line too long) and the
            // answer lost: any caller could have a registered user's connection cut.
            Err(_) if crate::parse::is_response(bytes) => {
                let limits = self.limits;
                if with_parsed(bytes, &limits, |m, e| self.on_response(now, flow, m, e)).is_none() {
                    self.stats.dropped_responses += 1;
                }
                return;
            }
            Ok(Status::Partial) => return self.reject(flow, bytes, ParseError::Truncated),
            Err(e) => return self.reject(flow, bytes, e),
        };
        // An answer to a request we forwarded carries its Vias and ours: one more than a
        // request at the limit had.
        let limits = if msg.is_request() {
            self.limits
        } else {
            Limits {
                max_vias: self.limits.max_vias + 1,
                ..self.limits
            }
        };
        let ess = match msg.validate(&limits) {
            Ok(e) => e,
            Err(e) if msg.is_request() => return self.reject(flow, bytes, e),
            Err(_) => {
                self.stats.dropped_responses += 1;
                return;
            }
        };
        // `tag = token` (RFC 3261 §25.1): a To `;tag` without one read as no tag, and our
        // answer then carried two. (Looked for only where To has parameters: an initial
        // request's has none.)
        if msg.is_request()
            && !ess.to.params.is_empty()
            && matches!(ess.to.param("tag"), Some(None | Some(b"")))
        {
            return self.reject(flow, bytes, ParseError::InvalidHeader(HeaderName::To));
        }
        if msg.is_request() {
            self.on_request(now, flow, &msg, &ess);
        } else {
            self.on_response(now, flow, &msg, &ess);
        }
    }

    fn reject(&mut self, flow: &Flow, bytes: &[u8], e: ParseError) {
        self.stats.rejected += 1;
        let tag = format!("sr{:x}", self.unique());
        if let Some(resp) = error_response(bytes, e, tag.as_bytes()) {
            self.send(flow, resp.into());
        }
        // The framer delimited this message: too many headers, or a line too long, do not
        // put the stream's framing in doubt (a message whose syntax does, does).
        let framed = matches!(
            e,
            ParseError::TooManyHeaders | ParseError::HeaderLineTooLong
        );
        if e.closes_connection() && !framed {
            self.out.push_back(Output::Close {
                flow: flow.clone(),
                reason: e,
            });
        }
    }

    /// 503 at the door, Retry-After spread over 2–9 s so shed clients do not return together.
    fn shed(
        &mut self,
        now: Instant,
        flow: &Flow,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
        key: TxKey,
    ) {
        // An INVITE with a To-tag answered without a transaction: its ACK ends here, as at
        // the table-full refusal (else it went on to a next hop that never saw the INVITE).
        if msg.method() == Some(Method::Invite) && ess.to.tag().is_some() {
            self.remember_stateless_reinvite(now, key);
        }
        let retry = retry_after_spread(self.unique());
        self.send_stateless(
            flow,
            msg,
            ess.call_id,
            503,
            "Service Unavailable",
            &[("Retry-After", &retry)],
        );
    }

    fn respond_stateless(
        &mut self,
        flow: &Flow,
        msg: &Message<'_, '_>,
        call_id: &[u8],
        code: u16,
        reason: &str,
    ) {
        self.stats.local_responses += 1;
        self.send_stateless(flow, msg, call_id, code, reason, &[]);
    }

    /// The To-tag of our stateless answers: a MAC of the Call-ID, so the ACK of one is
    /// recognised and dropped — not looked up and sent to a callee that never saw the INVITE.
    fn stateless_tag(&self, call_id: &[u8]) -> String {
        let key = &self.proxy.config().key;
        format!(
            "sl{}",
            key.tag(STATELESS_TAG_BYTES, &[b"stateless", call_id])
        )
    }

    /// Is `tag` the To-tag of one of our stateless answers for this Call-ID?
    fn is_stateless_tag(&self, call_id: &[u8], tag: &[u8]) -> bool {
        tag.strip_prefix(b"sl").is_some_and(|t| {
            self.proxy
                .config()
                .key
                .verify_tag(STATELESS_TAG_BYTES, &[b"stateless", call_id], t)
        })
    }

    /// A response sent without a transaction (To-tag: [`Self::stateless_tag`]).
    fn send_stateless(
        &mut self,
        flow: &Flow,
        msg: &Message<'_, '_>,
        call_id: &[u8],
        code: u16,
        reason: &str,
        headers: &[(&str, &[u8])],
    ) {
        let tag = self.stateless_tag(call_id);
        let r = response_to(
            msg,
            code,
            reason,
            ResponseParts {
                to_tag: Some(tag.as_bytes()),
                headers,
                source: self.client_source(flow),
                ..Default::default()
            },
        );
        self.send(flow, r.into());
    }

    fn on_request(
        &mut self,
        now: Instant,
        flow: &Flow,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
    ) {
        let method = msg.method().expect("request");
        let Some(key) = TxKey::server(msg, ess) else {
            if method != Method::Ack {
                self.respond_stateless(flow, msg, ess.call_id, 400, "Missing Via Branch");
            }
            return;
        };
        let bytes: Bytes = msg.bytes().into();
        // Only a transaction's own sender (a partner: on any of its connections) goes on
        // with it: anyone who saw the caller's Via — the callee — could otherwise end its
        // INVITE transaction with an ACK, or have its last answer sent again.
        // (One lookup on the path of every new request: a miss.)
        let existing = self
            .servers
            .get(&key)
            .map(|s| (self.same_sender(&s.inbound, flow), s.txn.state()));
        match existing {
            Some((false, _)) => {
                self.stats.dropped_requests += 1;
                return;
            }
            // An ACK that matches an INVITE we answered with 2xx (it kept the INVITE's
            // branch, as older UAs do) is that 2xx's ACK: the UAS waits for it, so it is
            // forwarded like any 2xx ACK (RFC 6026 §8.7: Accepted passes it to the TU).
            Some((true, state))
                if method == Method::Ack && state != crate::transaction::State::Accepted =>
            {
                if let Some(s) = self.servers.get_mut(&key) {
                    s.txn.handle_ack(now, bytes);
                }
                return self.drive_server(now, &key);
            }
            _ if method == Method::Ack => return self.forward_ack(now, flow, msg, ess, &key),
            Some((true, _)) => {
                if let Some(s) = self.servers.get_mut(&key) {
                    s.txn.handle_request_retransmit(now);
                }
                return self.drive_server(now, &key);
            }
            None => {}
        }
        let decision = self.proxy.decide(msg, ess, flow, self.partner_of(flow));
        let decision = self.known_party(now, flow, ess, decision);
        // The door: new work under overload. What finishes admitted work passes — a CANCEL,
        // and a request in a dialog, which is one routed by a flow token we signed. A To-tag
        // alone proves nothing: anyone can write one on a new INVITE or a REGISTER.
        // A request our signed dialog route sends to a partner's link (the UA reconnected
        // since: `ToPeer` by the token's fallback) is inside a dialog too. One from a
        // connection that is not yet shown to be the dialog's party (`Reconnected`: it is
        // still to be challenged) is work like a new request's under overload — a user
        // holding a route could otherwise send past the door as fast as it liked, each
        // costing a challenge, and have new requests shed in its place — but it finishes
        // a call while the node drains.
        let in_dialog = |proxy: &Proxy, unproven: bool| match &decision {
            Decision::ToFlow(_) => true,
            Decision::Reconnected(_) => unproven,
            Decision::ToPeer(_) => proxy.follows_our_dialog_route(msg),
            _ => false,
        };
        let flow_draining = !self.draining_flows.is_empty() && self.draining_flows.contains(flow);
        if method != Method::Cancel
            && (self.draining || flow_draining)
            && !in_dialog(&self.proxy, true)
        {
            if self.draining {
                self.stats.drained += 1;
            } else {
                self.stats.flow_drained += 1;
            }
            return self.shed(now, flow, msg, ess, key);
        }
        // Another node's removal (a device moved there) is upkeep, not new work: shed, it
        // was not sent again, and this node kept routing calls to the device's stale flow
        // until the binding expired.
        let upkeep = method == Method::Register
            && self.came_from_node(flow)
            && crate::registrar::removes_only(msg);
        if method != Method::Cancel
            && self.admission < 1.0
            && !upkeep
            && !in_dialog(&self.proxy, false)
        {
            let cooperating = self.oc_trust != oc::Trust::Off && self.cooperates(flow, ess);
            self.door.0 = self.door.0.saturating_add(1);
            self.door.1 = self.door.1.saturating_add(u32::from(cooperating));
            if !cooperating && !self.admit() {
                self.stats.shed += 1;
                return self.shed(now, flow, msg, ess, key);
            }
        }
        let info = self.flows.get(flow).cloned().unwrap_or_default();
        let authz = self
            .policy
            .authorize(now, flow, &info, msg, ess, &decision, &self.proxy);
        self.drain_refusals();
        let (decision, grant) = match authz {
            Authz::Allow(g) => {
                if matches!(g.source, Source::Client(Some(_))) && !self.proven.contains(flow) {
                    self.proven.insert(flow.clone());
                }
                (self.proven_party(now, flow, ess, decision, &g), g)
            }
            Authz::Challenge { code, headers } => (
                Decision::Respond(crate::proxy::Answer {
                    code,
                    reason: if code == 401 {
                        "Unauthorized"
                    } else {
                        "Proxy Authentication Required"
                    },
                    headers,
                }),
                Grant {
                    source: Source::Client(None),
                },
            ),
            Authz::Deny(d) => (
                Decision::Respond(crate::proxy::Answer {
                    code: d.code,
                    reason: d.reason,
                    headers: Vec::new(),
                }),
                Grant {
                    source: Source::Client(None),
                },
            ),
        };
        if method == Method::Invite && ess.to.tag().is_none() {
            // A new INVITE refused here (challenged, denied, looping) is answered statelessly:
            // a transaction would wait 64·T1 (Timer H) for an ACK that a flood never sends,
            // and hold the table against everyone else. Its ACK carries our stateless To-tag
            // and is dropped (`forward_ack`). A re-INVITE keeps its dialog's To-tag, so its
            // ACK could not be told from the dialog's: it keeps a transaction.
            let refused = match &decision {
                Decision::Respond(a) if a.code >= 300 => Some((a.code, a.reason, &a.headers)),
                Decision::Refuse(d) => {
                    self.refused(d, msg, &info);
                    Some((d.code, d.reason, &Vec::new()))
                }
                _ => None,
            };
            if let Some((code, reason, headers)) = refused {
                self.stats.local_responses += 1;
                let hdrs: Vec<(&str, &[u8])> =
                    headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
                return self.send_stateless(flow, msg, ess.call_id, code, reason, &hdrs);
            }
        }
        // A CANCEL's transaction ends as soon as it is answered: never refused for room (it
        // is what frees room), as at the door. A client connection has its share of the
        // table (a partner carries many users: the table's bound is its bound), requests
        // inside its dialogs included — an account with one dialog could otherwise pipeline
        // re-INVITEs and INFOs on its route and hold the whole shard's table. A BYE inside a
        // dialog (a PBX trunk hanging up its calls) has twice the share: a connection at its
        // limit can still end what it holds.
        let on_flow = self.by_flow.get(flow).map_or(0, |t| t.servers);
        let share = if method == Method::Bye && matches!(decision, Decision::ToFlow(_)) {
            self.max_transactions_per_flow.saturating_mul(2)
        } else {
            self.max_transactions_per_flow
        };
        // The request is kept here, and a copy of it (at least) goes out: room for both.
        let weight = 2 * msg.bytes().len();
        let full = if self.servers.len() >= self.max_transactions {
            Some(("transactions_full", self.servers.len()))
        } else if self.txn_bytes + weight > self.max_txn_bytes {
            Some(("transactions_full", self.txn_bytes))
        } else if share > 0 && on_flow >= share && self.partner_of(flow).is_none() {
            Some(("transactions_per_connection", on_flow))
        } else if let Some(&(n, held)) = identity_of(&grant).and_then(|a| self.by_identity.get(a))
            && ((share > 0 && n >= share.saturating_mul(IDENTITY_CONNECTIONS))
                || held + weight > self.max_txn_bytes / IDENTITY_BYTES_SHARE)
        {
            Some(("transactions_per_identity", n))
        } else {
            None
        };
        if let Some((label, n)) = full
            && method != Method::Cancel
        {
            self.out.push_back(Output::Refused(Refusal {
                label,
                detail: format!("{n} transactions"),
                source: info.source.map(|s| s.ip()),
            }));
            self.stats.local_responses += 1;
            if method == Method::Invite && ess.to.tag().is_some() {
                self.remember_stateless_reinvite(now, key);
            }
            let retry = retry_after_spread(self.unique());
            return self.send_stateless(
                flow,
                msg,
                ess.call_id,
                503,
                "Service Unavailable",
                &[("Retry-After", &retry)],
            );
        }
        let id = self.unique();
        let to_tag = format!("sr{id:x}");
        let txn = if method == Method::Invite {
            let trying = response_to(
                msg,
                100,
                "Trying",
                ResponseParts {
                    source: self.client_source(flow),
                    ..Default::default()
                },
            );
            ServerTransaction::new_invite(now, &self.timer_cfg, bytes.clone(), trying.into())
        } else {
            ServerTransaction::new_non_invite(now, &self.timer_cfg, bytes.clone())
        };
        let replaced = self.servers.insert(
            key.clone(),
            Server {
                txn,
                inbound: flow.clone(),
                request: bytes.clone(),
                branches: Vec::new(),
                best: None,
                challenges: Vec::new(),
                got_2xx: false,
                final_sent: false,
                cancelled: false,
                branch_weight: 0,
                cancel_reason: None,
                to_tag,
                id,
                grant,
                callee: None,
                rebind: None,
                sips: msg
                    .request_uri()
                    .is_some_and(|u| u.get(..5).is_some_and(|s| s.eq_ignore_ascii_case(b"sips:"))),
                weight: bytes.len(),
                ring_until: (key.method == KeyMethod::Invite).then(|| now + self.max_ring),
            },
        );
        self.txn_bytes += bytes.len();
        if let Some(s) = self.servers.get(&key) {
            account_identity(&mut self.by_identity, &s.grant, bytes.len(), true);
        }
        if let Some(old) = replaced {
            self.txn_bytes = self.txn_bytes.saturating_sub(old.weight);
            account_identity(&mut self.by_identity, &old.grant, old.weight, false);
        }
        self.index(flow, TimerKey::Server(key.clone()));
        match decision {
            Decision::Respond(a) => self.answer(now, &key, a.code, a.reason, &a.headers),
            Decision::Register => match with_parsed(&bytes, &self.limits, |_, e| {
                crate::registrar::Registrar::default().aor(e)
            }) {
                // Another node's removal (the policy admits no other REGISTER from one),
                // on whichever connection of it: registered as from the node — it binds
                // nothing, takes no place on the connection, and is not passed on.
                Some(Ok(aor)) if self.came_from_node(flow) => {
                    let node = self.partner_of(flow).unwrap_or_default().to_string();
                    let token = self.unique();
                    self.wait_for(
                        token,
                        Pending::Register {
                            key: key.clone(),
                            id,
                            slot: None,
                        },
                    );
                    self.out.push_back(Output::Register {
                        token,
                        aor,
                        request: bytes,
                        flow: Flow::Peer(node),
                    });
                }
                Some(Ok(aor)) => match self.flow_may_register(flow, &aor) {
                    None => {
                        self.out.push_back(Output::Refused(Refusal {
                            label: "register_aors_per_connection",
                            detail: aor,
                            source: info.source.map(|s| s.ip()),
                        }));
                        self.answer(now, &key, 403, "Too Many AORs On This Connection", &[]);
                    }
                    Some(new) => {
                        let token = self.unique();
                        let slot =
                            matches!(flow, Flow::Conn(_)).then(|| (flow.clone(), aor.clone(), new));
                        self.wait_for(
                            token,
                            Pending::Register {
                                key: key.clone(),
                                id,
                                slot,
                            },
                        );
                        self.out.push_back(Output::Register {
                            token,
                            aor,
                            request: bytes,
                            flow: flow.clone(),
                        });
                    }
                },
                Some(Err(r)) => self.answer(now, &key, r.code, r.reason, &r.headers),
                None => self.answer(now, &key, 400, "Bad Request", &[]),
            },
            Decision::Lookup { aor } => {
                let token = self.unique();
                self.wait_for(token, Pending::Server(key.clone(), id));
                if let Some(s) = self.servers.get_mut(&key) {
                    s.callee = Some(aor.clone());
                }
                let local_only = self.came_from_node(flow);
                self.out.push_back(Output::Lookup {
                    token,
                    aor,
                    local_only,
                });
            }
            Decision::ToFlow(f) => self.fork(now, &key, &[Target::to(f, None, Vec::new())]),
            Decision::ToPeer(p) => {
                let uri = msg
                    .request_uri()
                    .and_then(|r| self.proxy.without_our_maddr(r));
                self.fork(now, &key, &[Target::to(Flow::Peer(p), uri, Vec::new())])
            }
            Decision::Cancel => self.on_cancel(now, &key),
            // Resolved or refused by `proven_party`.
            Decision::Drop(_) | Decision::Reconnected(_) => {}
            Decision::Refuse(d) => {
                self.refused(&d, msg, &info);
                self.answer(now, &key, d.code, d.reason, &[]);
            }
        }
        self.drive_server(now, &key);
    }

    /// Reports a request refused for what it forged (counted and logged by the engine).
    fn refused(&mut self, d: &crate::policy::Denial, msg: &Message<'_, '_>, info: &FlowInfo) {
        self.out.push_back(Output::Refused(Refusal {
            label: d.label,
            detail: String::from_utf8_lossy(msg.request_uri().unwrap_or_default()).into_owned(),
            source: info.source.map(|s| s.ip()),
        }));
    }

    /// Answers a server transaction locally.
    fn answer(
        &mut self,
        now: Instant,
        key: &TxKey,
        code: u16,
        reason: &str,
        headers: &[(&'static str, Vec<u8>)],
    ) {
        let limits = self.limits;
        let source = self
            .servers
            .get(key)
            .and_then(|s| self.client_source(&s.inbound));
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        let hdrs: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let Some(resp) = with_parsed(&s.request, &limits, |m, _| {
            response_to(
                m,
                code,
                reason,
                ResponseParts {
                    to_tag: Some(s.to_tag.as_bytes()),
                    headers: &hdrs,
                    body: None,
                    source,
                },
            )
        }) else {
            return;
        };
        self.stats.local_responses += 1;
        if code >= 200 {
            s.final_sent = true;
        }
        let _ = s.txn.send_response(now, code, resp.into());
        self.reweigh(key);
        self.drive_server(now, key);
    }

    fn on_cancel(&mut self, now: Instant, cancel_key: &TxKey) {
        let Some(invite_key) = cancel_key.cancelled_invite() else {
            return;
        };
        let from = self.servers.get(cancel_key).map(|c| c.inbound.clone());
        // The INVITE it names, when it came the way the CANCEL did: anyone downstream sees
        // the caller's Via (branch and sent-by), and must not be able to cancel its call
        // from another connection.
        let sender = from.as_ref().map(|f| self.route_flow(f));
        let Some(pending) = self.cancellable(&invite_key, sender.as_ref()) else {
            // A CANCEL of a non-INVITE request of its sender's changes nothing, and is
            // answered 200 (RFC 3261 §9.2, §16.10), not 481. (Looked for among the sender's
            // transactions only: a rare request, and a bounded list.)
            if self.cancels_a_non_invite(cancel_key, from.as_ref()) {
                return self.answer(now, cancel_key, 200, "OK", &[]);
            }
            // A partner's connections may be owned by several shards: its INVITE may be on
            // another one. The others are asked before the CANCEL is answered.
            if self.shards > 1
                && let Some(Flow::Peer(partner)) = sender
                && let Some(request) = self.servers.get(cancel_key).map(|s| s.request.clone())
            {
                let token = self.unique();
                self.wait_for(token, Pending::Cancel(cancel_key.clone()));
                self.out.push_back(Output::CancelElsewhere {
                    token,
                    partner,
                    request,
                });
                return;
            }
            return self.answer(now, cancel_key, 481, "Call/Transaction Does Not Exist", &[]);
        };
        // Read before the answer, which ends the CANCEL's transaction.
        let limits = self.limits;
        let reason = self
            .servers
            .get(cancel_key)
            .filter(|_| pending)
            .and_then(|c| with_parsed(&c.request, &limits, |m, _| reason_of(m, &limits)))
            .flatten();
        self.answer(now, cancel_key, 200, "OK", &[]);
        if pending {
            self.cancel_invite(now, &invite_key, reason);
        }
    }

    /// Is there a non-INVITE server transaction from `from` that `cancel_key` names (its
    /// branch and sent-by)?
    fn cancels_a_non_invite(&self, cancel_key: &TxKey, from: Option<&Flow>) -> bool {
        let Some(t) = from.and_then(|f| self.by_flow.get(f)) else {
            return false;
        };
        t.keys.iter().any(|k| {
            matches!(k, TimerKey::Server(s)
                if s.branch == cancel_key.branch
                    && s.sent_by == cancel_key.sent_by
                    && !matches!(s.method, KeyMethod::Invite | KeyMethod::Cancel)
                    && self.servers.contains_key(s))
        })
    }

    /// Whether the INVITE server transaction `invite_key` came from `sender` (a connection,
    /// or a partner whichever of its connections it used) — None when not: anyone
    /// downstream sees the caller's Via (branch and sent-by) and must not be able to cancel
    /// its call from another connection — and then whether it is still pending. One answered
    /// already is left as it is: the CANCEL changes nothing and is answered 200 (§9.2,
    /// §16.10) — a CANCEL crossing the final response is normal, not an error.
    fn cancellable(&self, invite_key: &TxKey, sender: Option<&Flow>) -> Option<bool> {
        let invite = self
            .servers
            .get(invite_key)
            .filter(|s| sender.is_some_and(|f| self.same_sender(f, &s.inbound)))?;
        Some(invite.txn.is_cancellable() && !invite.final_sent)
    }

    /// Cancels a pending INVITE server transaction: 487 at once while it waits for its
    /// lookup, otherwise CANCEL on each branch (whose 487 comes back up).
    fn cancel_invite(&mut self, now: Instant, invite_key: &TxKey, reason: Option<Bytes>) {
        let Some(s) = self.servers.get_mut(invite_key) else {
            return;
        };
        s.cancelled = true;
        s.cancel_reason = reason;
        self.reweigh(invite_key);
        let Some(s) = self.servers.get(invite_key) else {
            return;
        };
        if s.branches.is_empty() {
            // Still waiting for a lookup: nothing downstream to cancel.
            self.answer(now, invite_key, 487, "Request Terminated", &[]);
        } else {
            self.cancel_branches(now, invite_key, None);
        }
    }

    /// A partner's CANCEL that arrived on another shard ([`Output::CancelElsewhere`]):
    /// cancels the INVITE it names when that INVITE came from the same partner on one of
    /// this shard's connections. True when it did (the asking shard answers the CANCEL 200).
    pub fn cancel_from_elsewhere(&mut self, now: Instant, partner: &str, request: &[u8]) -> bool {
        self.tick_clock(now);
        let limits = self.limits;
        let Some((key, reason)) = with_parsed(request, &limits, |m, e| {
            (TxKey::server(m, e), reason_of(m, &limits))
        }) else {
            return false;
        };
        let Some(invite_key) = key.as_ref().and_then(TxKey::cancelled_invite) else {
            return false;
        };
        match self.cancellable(&invite_key, Some(&Flow::Peer(partner.to_string()))) {
            None => false,
            Some(pending) => {
                if pending {
                    self.cancel_invite(now, &invite_key, reason);
                }
                true
            }
        }
    }

    /// The other shards' answer to [`Output::CancelElsewhere`]: the CANCEL is answered 200
    /// when one of them had its INVITE, 481 otherwise.
    pub fn handle_cancel_elsewhere(&mut self, now: Instant, token: u64, matched: bool) {
        self.tick_clock(now);
        let Some(Pending::Cancel(key)) = self.answered(token) else {
            return;
        };
        if matched {
            self.answer(now, &key, 200, "OK", &[]);
        } else {
            self.answer(now, &key, 481, "Call/Transaction Does Not Exist", &[]);
        }
    }

    /// Sends CANCEL on every INVITE branch without a final response, except `except`.
    fn cancel_branches(&mut self, now: Instant, server: &TxKey, except: Option<&TxKey>) {
        let Some(s) = self.servers.get(server) else {
            return;
        };
        let branches: Vec<TxKey> = s
            .branches
            .iter()
            .filter(|k| Some(*k) != except)
            .cloned()
            .collect();
        for ck in branches {
            let Some(c) = self.clients.get_mut(&ck) else {
                continue;
            };
            if c.final_received || ck.method != KeyMethod::Invite {
                continue;
            }
            if c.got_provisional {
                self.send_cancel(now, &ck);
            } else {
                // RFC 3261 §9.1: wait for a provisional response before cancelling.
                c.cancel_when_provisional = true;
            }
        }
    }

    /// Cancels an INVITE branch that rang: once per branch (a 2xx retransmission, a 6xx or
    /// Timer C asking again sends nothing more), and a branch that does not answer within
    /// 64·T1 is abandoned as 408 (RFC 3261 §9.1) instead of waiting out Timer C.
    fn send_cancel(&mut self, now: Instant, invite_branch: &TxKey) {
        let limits = self.limits;
        let t1 = self.timer_cfg.t1;
        let Some(c) = self.clients.get_mut(invite_branch) else {
            return;
        };
        if std::mem::replace(&mut c.cancel_sent, true) {
            return;
        }
        self.timers.set(
            TimerKey::TimerC(invite_branch.clone()),
            Some(now + t1.saturating_mul(64)),
        );
        let c = &self.clients[invite_branch];
        // Another branch answered (§16.7 step 10 cancels the rest): say so (RFC 3326); or
        // the Reason of the CANCEL that cancelled the call, passed on.
        let server = c.server.as_ref().and_then(|k| self.servers.get(k));
        let reason = match server {
            Some(s) if s.got_2xx => Some(crate::response::COMPLETED_ELSEWHERE),
            Some(s) => s.cancel_reason.as_deref(),
            None => None,
        };
        let Some(Some(cancel)) =
            with_parsed(c.txn.request(), &limits, |m, _| cancel_for(m, reason))
        else {
            return;
        };
        let key = TxKey {
            method: KeyMethod::Cancel,
            ..invite_branch.clone()
        };
        let outbound = c.outbound.clone();
        let txn = ClientTransaction::new_non_invite(now, &self.timer_cfg, cancel.into());
        self.index(&outbound, TimerKey::Client(key.clone()));
        let client = Client::new(txn, None, outbound);
        self.txn_bytes += client.weight;
        if let Some(old) = self.clients.insert(key.clone(), client) {
            self.txn_bytes = self.txn_bytes.saturating_sub(old.weight);
        }
        self.stats.forwarded += 1;
        self.drive_client(now, &key);
    }

    /// Forwards the server transaction's request to each `(flow, new Request-URI)`.
    fn fork(&mut self, now: Instant, server: &TxKey, targets: &[Target]) {
        let limits = self.limits;
        let mut dropped = 0;
        let mut too_large = 0;
        let mut no_room = 0;
        let mut created = 0;
        // RFC 5393 §5.3: branches forked in parallel share the request's breadth (60 when it
        // carries none, at most 60), each at least 1; too little for them all is 440.
        let breadth = if targets.len() > 1 {
            let Some(s) = self.servers.get(server) else {
                return;
            };
            let received = with_parsed(&s.request, &limits, |m, _| max_breadth(m)).flatten();
            let total = received.map_or(MAX_BREADTH, |b| b.min(MAX_BREADTH));
            if (total as usize) < targets.len() {
                self.answer(now, server, 440, "Max-Breadth Exceeded", &[]);
                return;
            }
            Some((total, targets.len() as u32))
        } else {
            None
        };
        let share = |total: u32, n: u32, i: usize| total / n + u32::from((i as u32) < total % n);
        for (i, target) in targets.iter().enumerate() {
            let (flow, uri, path) = (&target.flow, &target.uri, &target.path);
            let unique = self.unique();
            let Some(s) = self.servers.get(server) else {
                return;
            };
            // A partner that told us (RFC 7339) to drop part of its new requests: this one
            // may be in that part.
            if self.oc_down.contains_key(flow)
                && server.method != KeyMethod::Cancel
                && with_parsed(&s.request, &limits, |_, e| e.to.tag().is_none()) == Some(true)
                && self.oc_down.get_mut(flow).is_some_and(|t| !t.admit(now))
            {
                dropped += 1;
                continue;
            }
            let inbound = self.route_flow(&s.inbound);
            let caller = match &s.grant.source {
                Source::Client(Some(aor)) => Some(aor.as_str()),
                _ => None,
            };
            let (in_iface, out_iface) = (self.iface_of(&s.inbound), self.iface_of(flow));
            let source = self.client_source(&s.inbound);
            let proxy = &self.proxy;
            let policy = &self.policy;
            let to_partner = self.partner_of(flow);
            let overload_control = to_partner.is_some() && self.oc_trust != oc::Trust::Off;
            let Some((branch, method, out)) = with_parsed(&s.request, &limits, |m, e| {
                let branch = Proxy::branch(m, e, unique);
                let ident =
                    policy.identity_edit(&s.grant, m, flow, to_partner, &proxy.config().domains);
                let hop = crate::proxy::Hop {
                    inbound: &inbound,
                    outbound: flow,
                    in_iface: &in_iface,
                    out_iface: &out_iface,
                    source,
                    ident: &ident,
                    path,
                    overload_control,
                    max_breadth: breadth.map(|(total, n)| share(total, n, i)),
                    parties: (caller, s.callee.as_deref()),
                };
                let out =
                    proxy.forward_request(m, e, &branch, uri.as_deref().map(str::as_bytes), &hop);
                (branch, m.method().expect("request") == Method::Invite, out)
            }) else {
                return;
            };
            // What forwarding adds (our Via, Record-Routes, an asserted identity, `received`)
            // may take a request accepted at `max_message` past it: the next hop's framer
            // (another node of ours, with the same limits) could not delimit it and would
            // close the connection it came over — a link every call of the node shares.
            // Answered 513 instead (RFC 3261 §21.5.14). More header lines than the limit
            // are forwarded: a reader that refuses them answers, and keeps the connection.
            if out.len() > self.limits.max_message {
                too_large += 1;
                continue;
            }
            // The table's byte bound holds for every copy: a call forked to many bindings
            // took a copy per branch past it.
            if self.txn_bytes + out.len() > self.max_txn_bytes {
                no_room += 1;
                continue;
            }
            let ckey = TxKey {
                branch: branch.into_bytes().into(),
                sent_by: Box::default(),
                method: server.method.clone(),
            };
            let txn = if method {
                ClientTransaction::new_invite(now, &self.timer_cfg, out.into())
            } else {
                ClientTransaction::new_non_invite(now, &self.timer_cfg, out.into())
            };
            let client = Client {
                // No new Request-URI: the route named this connection.
                by_token: uri.is_none() && matches!(flow, Flow::Conn(_)),
                fallbacks: target.fallbacks.clone(),
                ring_until: s.ring_until,
                ..Client::new(txn, Some(server.clone()), flow.clone())
            };
            self.txn_bytes += client.weight;
            if let Some(s) = self.servers.get_mut(server) {
                s.branch_weight += client.weight;
                if let Some(load) = identity_of(&s.grant).and_then(|a| self.by_identity.get_mut(a))
                {
                    load.1 += client.weight;
                }
            }
            if let Some(old) = self.clients.insert(ckey.clone(), client) {
                self.txn_bytes = self.txn_bytes.saturating_sub(old.weight);
            }
            self.index(flow, TimerKey::Client(ckey.clone()));
            created += 1;
            if method {
                let at = now + self.timer_c;
                let ceiling = self.clients.get(&ckey).and_then(|c| c.ring_until);
                let at = ceiling.map_or(at, |u| at.min(u));
                self.timers.set(TimerKey::TimerC(ckey.clone()), Some(at));
            }
            if let Some(s) = self.servers.get_mut(server) {
                s.branches.push(ckey.clone());
            }
            self.stats.forwarded += 1;
            self.drive_client(now, &ckey);
        }
        // Nothing went out, and nothing sent before still waits for its answer (a fallback
        // to a device's other flow that did not fit): answered here, or never.
        let none_live = |s: &Server, clients: &HashMap<TxKey, Client>| {
            !s.branches
                .iter()
                .any(|b| clients.get(b).is_some_and(|c| !c.final_received))
        };
        if created == 0
            && too_large + no_room > 0
            && self
                .servers
                .get(server)
                .is_some_and(|s| none_live(s, &self.clients))
        {
            if too_large > 0 {
                self.answer(now, server, 513, "Message Too Large", &[]);
            } else {
                self.answer(now, server, 503, "Service Unavailable", &[]);
            }
            return;
        }
        if dropped > 0 {
            self.stats.oc_dropped += dropped;
            let none_left = self
                .servers
                .get(server)
                .is_some_and(|s| s.branches.is_empty());
            if none_left {
                // No Retry-After: that would tell the upstream that *we* are unavailable,
                // for every destination (RFC 3261 §21.5.4), when only this partner asked.
                self.answer(now, server, 503, "Service Unavailable", &[]);
            }
        }
    }

    /// A 2xx ACK (no server transaction): forwarded statelessly along the dialog route.
    fn forward_ack(
        &mut self,
        now: Instant,
        flow: &Flow,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
        key: &TxKey,
    ) {
        // The ACK of a non-2xx we sent without a transaction: it ends here.
        if ess
            .to
            .tag()
            .is_some_and(|t| self.is_stateless_tag(ess.call_id, t))
        {
            return;
        }
        // The ACK of a re-INVITE refused for room (its To-tag is the dialog's): not the
        // callee's, which never saw that INVITE.
        if !self.stateless_reinvites.0.is_empty() {
            self.forget_stateless_reinvites(now);
            let h = std::hash::BuildHasher::hash_one(&self.stateless_reinvites.2, key);
            if self.stateless_reinvites.0.remove(&h) {
                return;
            }
        }
        let decision = self.proxy.decide(msg, ess, flow, self.partner_of(flow));
        let decision = self.known_party(now, flow, ess, decision);
        let info = self.flows.get(flow).cloned().unwrap_or_default();
        let authz = self
            .policy
            .authorize(now, flow, &info, msg, ess, &decision, &self.proxy);
        self.drain_refusals();
        // An ACK cannot be challenged or answered: one that may not pass is dropped. One
        // that may carries what the policy granted (a partner's PAI outside its domains is
        // removed, as from any other in-dialog request).
        let Authz::Allow(grant) = authz else {
            return;
        };
        let decision = self.proven_party(now, flow, ess, decision, &grant);
        let Grant { source } = grant;
        match decision {
            Decision::ToFlow(f) => self.send_ack(flow, &f, None, &[], source, msg, ess),
            Decision::ToPeer(p) => self.send_ack(flow, &Flow::Peer(p), None, &[], source, msg, ess),
            // An ACK with a To-tag, no transaction and no route of ours: not the ACK of a
            // dialog we record-routed (its route set names us), so nobody's. Dropped, as
            // Kamailio's default script does — it would otherwise reach any registered
            // device unauthenticated and past the door. A cluster node's is looked up (one
            // hop: locally only).
            Decision::Lookup { .. } if !self.came_from_node(flow) => {
                self.stats.dropped_requests += 1;
            }
            Decision::Lookup { aor } => {
                let token = self.unique();
                self.wait_for(
                    token,
                    Pending::Ack {
                        request: msg.bytes().into(),
                        inbound: flow.clone(),
                        source,
                    },
                );
                let local_only = self.came_from_node(flow);
                self.out.push_back(Output::Lookup {
                    token,
                    aor,
                    local_only,
                });
            }
            _ => {}
        }
    }

    /// Keeps `key`, an in-dialog INVITE answered 503 without a transaction, so that its ACK
    /// ends here ([`Self::forward_ack`]); forgets those older than 64·T1 (its ACK comes at
    /// once, or never), and takes no more than [`MAX_STATELESS_REINVITES`] (past that,
    /// such an ACK goes on to the callee, which answers nothing to an ACK it cannot match).
    fn remember_stateless_reinvite(&mut self, now: Instant, key: TxKey) {
        self.forget_stateless_reinvites(now);
        let (set, order, hasher) = &mut self.stateless_reinvites;
        if order.len() >= MAX_STATELESS_REINVITES
            && let Some((_, k)) = order.pop_front()
        {
            set.remove(&k);
        }
        let h = std::hash::BuildHasher::hash_one(&*hasher, &key);
        if set.insert(h) {
            order.push_back((now, h));
        }
    }

    /// Forgets the refused re-INVITEs older than 64·T1 (their ACK came at once, or never):
    /// one that never gets its ACK does not keep the set, and the ACK path's look into it,
    /// for good.
    fn forget_stateless_reinvites(&mut self, now: Instant) {
        let keep = self.timer_cfg.t1.saturating_mul(64);
        let (set, order, _) = &mut self.stateless_reinvites;
        while let Some(&(at, k)) = order.front() {
            if now.saturating_duration_since(at) < keep {
                break;
            }
            order.pop_front();
            set.remove(&k);
        }
    }

    fn drain_refusals(&mut self) {
        while let Some(r) = self.policy.poll_refusal() {
            self.out.push_back(Output::Refused(r));
        }
    }

    #[allow(clippy::too_many_arguments)] // where it goes (flow, Request-URI, Path), whose, what
    fn send_ack(
        &mut self,
        inbound: &Flow,
        to: &Flow,
        uri: Option<&str>,
        path: &[String],
        source: Source,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
    ) {
        // A 2xx ACK is forwarded statelessly: its retransmissions must leave with the same
        // branch (§16.11), so the unique part comes from the branch it arrived with (and
        // the shard, in the top bits as for every branch of ours; bit 47 keeps it apart
        // from the counter's values).
        let unique = {
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::DefaultHasher::new();
            ess.top_via.branch().unwrap_or_default().hash(&mut h);
            ess.call_id.hash(&mut h);
            (u64::from(self.shard) << 48) | 1 << 47 | (h.finish() & ((1 << 47) - 1))
        };
        let branch = Proxy::branch(msg, ess, unique);
        let ident = self.policy.identity_edit(
            &Grant { source },
            msg,
            to,
            self.partner_of(to),
            &self.proxy.config().domains,
        );
        let hop = crate::proxy::Hop {
            inbound: &self.route_flow(inbound),
            outbound: to,
            in_iface: &self.iface_of(inbound),
            out_iface: &self.iface_of(to),
            source: self.client_source(inbound),
            ident: &ident,
            path,
            overload_control: false,
            max_breadth: None,
            parties: (None, None),
        };
        let out = self
            .proxy
            .forward_request(msg, ess, &branch, uri.map(str::as_bytes), &hop);
        // Past `max_message` once forwarded, the next hop (another node of ours) could not
        // delimit it and would close the link it came over; an ACK cannot be answered, so
        // it is dropped (as `fork` answers a request 513).
        if out.len() > self.limits.max_message {
            self.stats.dropped_requests += 1;
            return;
        }
        self.stats.acks_forwarded += 1;
        self.send(to, out.into());
    }

    /// The answer to an [`Output::Lookup`].
    pub fn handle_lookup(&mut self, now: Instant, token: u64, result: Lookup) {
        match self.answered(token) {
            Some(Pending::Server(key, id)) => {
                let Some(s) = self.servers.get(&key).filter(|s| s.id == id) else {
                    return;
                };
                if s.cancelled || s.final_sent {
                    return;
                }
                if let Some((target, gone)) = s.rebind.clone() {
                    return self.rebound(now, &key, (&target, &gone), result);
                }
                let method_is_invite = key.method == KeyMethod::Invite;
                let method = if method_is_invite {
                    Method::Invite
                } else {
                    Method::Message
                };
                match self.proxy.after_lookup(method, result) {
                    Ok(mut targets) => {
                        // A sips Request-URI asks for TLS on every hop to the target (RFC
                        // 3261 §26.2.2; RFC 5630 §3.1.3 drops the last hop's exception):
                        // never the contact of a device on the plain TCP listener, where
                        // the call would go on as "secure" with its SDES keys in clear.
                        if s.sips {
                            targets.retain_mut(|t| {
                                t.fallbacks.retain(|f| f.flow.is_tls());
                                if !t.flow.is_tls() && !t.fallbacks.is_empty() {
                                    let mut rest = std::mem::take(&mut t.fallbacks);
                                    *t = Target {
                                        fallbacks: rest.split_off(1),
                                        ..rest.remove(0)
                                    };
                                }
                                t.flow.is_tls()
                            });
                            if targets.is_empty() {
                                self.answer(now, &key, 480, "No TLS Flow For SIPS", &[]);
                                self.drive_server(now, &key);
                                return;
                            }
                        }
                        self.fork(now, &key, &targets)
                    }
                    Err(Decision::Respond(mut a)) => {
                        // Overloaded (the AOR's shard or the store): Retry-After spread over
                        // 2–9 s, as at the door, so refused callers do not return together.
                        if a.code == 503 {
                            let retry = retry_after_spread(self.unique());
                            for (n, v) in &mut a.headers {
                                if *n == "Retry-After" {
                                    *v = retry.to_vec();
                                }
                            }
                        }
                        self.answer(now, &key, a.code, a.reason, &a.headers)
                    }
                    Err(_) => {}
                }
                self.drive_server(now, &key);
            }
            Some(Pending::Ack {
                request,
                inbound,
                source,
            }) => {
                // A sips ACK (late offer: its SDP may carry the keys) takes a TLS flow only,
                // as its INVITE did.
                let limits = self.limits;
                let sips = with_parsed(&request, &limits, |m, _| {
                    m.request_uri()
                        .and_then(|u| crate::uri::Uri::parse(u).ok())
                        .is_some_and(|u| u.scheme == crate::uri::Scheme::Sips)
                })
                .unwrap_or(true);
                // The binding's Path goes with it, as with every request to a contact
                // registered behind an edge proxy (RFC 3327 §5.4).
                let (to, uri, path) = match result {
                    Lookup::Found(b) => {
                        match b.into_iter().find(|r| !sips || Flow::Conn(r.flow).is_tls()) {
                            Some(r) => (Flow::Conn(r.flow), Some(r.contact), r.path),
                            None => return,
                        }
                    }
                    Lookup::Nodes(n) => match n.into_iter().next() {
                        Some(node) => (Flow::Peer(node), None, Vec::new()),
                        None => return,
                    },
                    _ => return,
                };
                with_parsed(&request, &limits, |m, e| {
                    self.send_ack(&inbound, &to, uri.as_deref(), &path, source.clone(), m, e)
                });
            }
            Some(Pending::Cancel(_) | Pending::Register { .. }) | None => {}
        }
    }

    /// The lookup [`ShardProxy::try_rebind`] made: the party's bindings of `target` (the
    /// Request-URI, kept) take the request, over TLS only for a sips one; with none (the
    /// party has not registered again, or registered another contact, or on another node),
    /// the answer is the one the closed connection gave before: 430 to a partner's proxy,
    /// else 480.
    fn rebound(
        &mut self,
        now: Instant,
        key: &TxKey,
        (target, gone): (&[u8], &Flow),
        result: Lookup,
    ) {
        let Some(s) = self.servers.get(key) else {
            return;
        };
        let sips = s.sips;
        let target = String::from_utf8_lossy(target);
        let reach = |r: crate::proxy::Reach| {
            let flow = Flow::Conn(r.flow);
            (crate::registrar::same_contact(&r.contact, &target)
                && flow != *gone
                && (!sips || flow.is_tls()))
            .then(|| Target::to(flow, None, r.path))
        };
        let targets: Vec<Target> = match result {
            Lookup::Found(b) => b
                .into_iter()
                .flat_map(|r| {
                    let rest = r.fallbacks.clone();
                    std::iter::once(r).chain(rest)
                })
                .filter_map(reach)
                .take(1)
                .collect(),
            _ => Vec::new(),
        };
        if targets.is_empty() {
            let to_proxy = self
                .partner_of(&s.inbound)
                .is_some_and(|p| !self.proxy.is_node(p));
            let (code, reason) = if to_proxy {
                (430, "Flow Failed")
            } else {
                (480, "Temporarily Unavailable")
            };
            self.answer(now, key, code, reason, &[]);
        } else {
            self.stats.dialog_rebinds += 1;
            // What follows at once to the closed connection (the ACK of a re-INVITE, which
            // waits for no lookup) goes the same way.
            // Every shard learns it (`Output::Detour`): a partner's ACK may come on another
            // of its connections.
            let limits = self.limits;
            if let Some(call_id) =
                with_parsed(&s.request, &limits, |_, e| Bytes::from(e.call_id.to_vec()))
            {
                let to = targets[0].flow.clone();
                let k = self.detours.key(Detour::To, gone, &call_id, &[]);
                let until = self.detour_until(now);
                self.detours.insert(now, until, k, None, to.clone());
                self.out.push_back(Output::Detour {
                    gone: gone.clone(),
                    call_id,
                    to,
                });
            }
            self.fork(now, key, &targets);
        }
        self.drive_server(now, key);
    }

    /// The answer to an [`Output::Register`].
    pub fn handle_register_reply(&mut self, now: Instant, token: u64, reply: Reply) {
        if let Some(Pending::Register { key, id, slot }) = self.answered(token) {
            // The connection's places follow what the registrar holds: refused, the place
            // this REGISTER took is given back (a UA whose REGISTERs fail — 423, a bad
            // Contact — must not use its connection's AORs up); answered 200, the AOR keeps
            // its place while the connection holds a binding of it, and gives it back when
            // not (unregistered, or moved to another connection).
            if let Some((flow, aor, new)) = slot
                && let Some(aors) = self.flow_aors.get_mut(&flow)
            {
                let holds = reply.code == 200 && reply.flow_holds;
                let had = aors.contains(&aor);
                if holds && !had {
                    aors.push(aor);
                } else if !holds && had && (reply.code == 200 || new) {
                    aors.retain(|a| *a != aor);
                }
            }
            // Only to the transaction that asked: the same REGISTER sent again on a new
            // connection (its first closed meanwhile) is another, with its own answer.
            if self.servers.get(&key).is_some_and(|s| s.id == id) {
                self.answer(now, &key, reply.code, reply.reason, &reply.headers);
            }
        }
    }

    fn on_response(
        &mut self,
        now: Instant,
        flow: &Flow,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
    ) {
        let Some(branch) = self.proxy.response_branch(ess) else {
            self.stats.dropped_responses += 1;
            return;
        };
        match Proxy::branch_shard(branch) {
            // A shard that does not exist: the branch is forged (or of another life of the
            // node with more shards). Nothing of ours waits for it.
            Some(owner) if owner >= self.shards => {
                self.stats.dropped_responses += 1;
                return;
            }
            Some(owner) if owner != self.shard => {
                // A partner's connection as the partner: the owner of the branch knows only
                // its own connections' principals, and any of the partner's may answer.
                self.out.push_back(Output::Relay {
                    shard: owner,
                    flow: self.route_flow(flow),
                    bytes: msg.bytes().into(),
                });
                return;
            }
            _ => {}
        }
        let Some(key) = TxKey::client(ess) else {
            return;
        };
        let Some(c) = self.clients.get(&key) else {
            self.stats.dropped_responses += 1;
            return;
        };
        // An answer comes from where its request went (RFC 3261 §18.2.2: on that
        // connection): one from anyone else — a sibling device of a fork that read the
        // branch, which is no secret — answers nothing.
        if *flow != c.outbound && !self.same_sender(flow, &c.outbound) {
            self.stats.dropped_responses += 1;
            return;
        }
        // An answer to a request we forwarded with nothing left under our Via was meant for
        // no one upstream and is not forwarded (§16.7 step 3): the downstream lost the
        // Vias; the branch waits on, as if it had not answered.
        if c.server.is_some() && ess.via_count < 2 {
            self.stats.dropped_responses += 1;
            return;
        }
        // RFC 7339 feedback in our Via, from a partner we advertised it to.
        if self.oc_trust != oc::Trust::Off
            && c.outbound == *flow
            && let Some(f) = Feedback::of(&ess.top_via)
            && self.partner_of(flow).is_some()
        {
            if self.oc_down.len() >= 256 && !self.oc_down.contains_key(flow) {
                // Partners' links are few; old entries (closed elsewhere) hold nothing live.
                self.oc_down.retain(|_, t| t.dropping(now) > 0);
            }
            self.oc_down.entry(flow.clone()).or_default().apply(now, f);
        }
        let Some(c) = self.clients.get_mut(&key) else {
            return;
        };
        let code = msg.status().expect("response");
        c.txn.handle_response(now, code, msg.bytes().into());
        self.drive_client(now, &key);
    }

    fn drive_server(&mut self, now: Instant, key: &TxKey) {
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        let mut sends = Vec::new();
        while let Some(b) = s.txn.poll_transmit() {
            sends.push(b);
        }
        let mut terminated = false;
        while let Some(ev) = s.txn.poll_event() {
            // Event::Ack comes only from an Accepted INVITE, and `on_request` forwards an ACK
            // matching one before the transaction sees it: nothing to do here.
            if matches!(ev, Event::Terminated) {
                terminated = true;
            }
        }
        let deadline = s.txn.poll_timeout();
        let inbound = s.inbound.clone();
        for b in sends {
            self.send(&inbound, b);
        }
        if terminated {
            self.remove_server(key);
        } else {
            self.timers.set(TimerKey::Server(key.clone()), deadline);
        }
        let _ = now;
    }

    fn drive_client(&mut self, now: Instant, key: &TxKey) {
        let limits = self.limits;
        let Some(c) = self.clients.get_mut(key) else {
            return;
        };
        let mut sends = Vec::new();
        while let Some(t) = c.txn.poll_transmit() {
            match t {
                Transmit::Message(b) => sends.push(b),
                Transmit::AckForNon2xx { request, response } => {
                    let ack = with_parsed(&request, &limits, |inv, _| {
                        with_parsed(&response, &limits, |resp, _| ack_for_non_2xx(inv, resp))
                            .flatten()
                    })
                    .flatten();
                    if let Some(a) = ack {
                        sends.push(a.into());
                    }
                }
            }
        }
        let mut events = Vec::new();
        while let Some(ev) = c.txn.poll_event() {
            events.push(ev);
        }
        let deadline = c.txn.poll_timeout();
        let outbound = c.outbound.clone();
        let server = c.server.clone();
        for b in sends {
            self.send(&outbound, b);
        }
        let mut terminated = false;
        for ev in events {
            match ev {
                // An edge proxy's "this flow failed" (RFC 5626 §5.3): the binding goes, and
                // the device's next flow gets the request; the 430 goes no further.
                Event::Response {
                    status: 430,
                    message,
                } => {
                    self.binding_failed(key);
                    if !self.try_next_flow(now, key, None) {
                        self.on_branch_response(
                            now,
                            server.as_ref(),
                            key,
                            430,
                            BranchResponse::Downstream(message),
                        );
                    }
                }
                Event::Response { status, message } => self.on_branch_response(
                    now,
                    server.as_ref(),
                    key,
                    status,
                    BranchResponse::Downstream(message),
                ),
                Event::Timeout => {
                    self.fail_branch(now, server.as_ref(), key, 408, "Request Timeout")
                }
                Event::Terminated => terminated = true,
                Event::Ack(_) | Event::AckTimeout => {}
            }
        }
        if terminated {
            self.remove_client(key);
        } else {
            self.timers.set(TimerKey::Client(key.clone()), deadline);
        }
    }

    /// Branch `key` got a 430: if it went to a registered contact over one of our
    /// connections (an edge proxy's, RFC 5626 §5.3), that binding is to be removed
    /// ([`Output::BindingFailed`]). Before, it went on being looked up first until it
    /// expired or was registered again, every request paying a round trip to the dead flow
    /// and every call to a device with one flow getting 480.
    fn binding_failed(&mut self, key: &TxKey) {
        let Some(c) = self.clients.get(key).filter(|c| !c.by_token) else {
            return;
        };
        let Flow::Conn(flow) = c.outbound else {
            return;
        };
        let Some(aor) = c
            .server
            .as_ref()
            .and_then(|sk| self.servers.get(sk))
            .and_then(|s| s.callee.clone())
        else {
            return;
        };
        // The contact is the branch's Request-URI, its Path the Route values (a lookup
        // branch carries no other).
        let limits = self.limits;
        let Some((contact, path)) = with_parsed(c.txn.request(), &limits, |m, _| {
            let contact = String::from_utf8_lossy(m.request_uri()?).into_owned();
            let path: Vec<String> = m
                .headers_named(HeaderName::Route)
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .collect();
            Some((contact, path))
        })
        .flatten() else {
            return;
        };
        self.out.push_back(Output::BindingFailed {
            aor,
            flow,
            contact,
            path,
        });
    }

    /// The branch `key` to a registered device failed (its connection died, or an edge proxy
    /// answered 430): if the device has another flow (another reg-id, RFC 5626 §5.3) and the
    /// request is still unanswered and not cancelled, a branch to it replaces this one (which
    /// counts as done) and this returns true. A branch we cancelled (a 2xx or 6xx came from
    /// another, Timer C, the caller's CANCEL) is not replaced: after a 6xx no new branch
    /// may start (RFC 3261 §16.7 step 5), nor may a request Timer C ended ring again.
    /// `dead`: a connection that closed, which no fallback may use (a device behind one edge
    /// proxy has every reg-id on the edge's connection).
    fn try_next_flow(&mut self, now: Instant, key: &TxKey, dead: Option<&Flow>) -> bool {
        let Some(c) = self.clients.get(key) else {
            return false;
        };
        let Some(sk) = c.server.clone() else {
            return false;
        };
        if c.by_token
            || c.fallbacks.iter().all(|t| Some(&t.flow) == dead)
            || c.cancel_sent
            || c.cancel_when_provisional
            || !self.servers.get(&sk).is_some_and(|s| {
                !s.final_sent && !s.cancelled && s.best.as_ref().is_none_or(|b| b.0 < 600)
            })
        {
            return false;
        }
        let c = self.clients.get_mut(key).expect("checked");
        c.final_received = true;
        let mut rest = std::mem::take(&mut c.fallbacks);
        rest.retain(|t| Some(&t.flow) != dead);
        let next = Target {
            fallbacks: rest.split_off(1),
            ..rest.remove(0)
        };
        self.stats.flow_failovers += 1;
        self.fork(now, &sk, &[next]);
        true
    }

    /// The branch `key` went by a dialog route to `gone`, a connection that has closed: if
    /// the route names the party that was on it and the request is for that party
    /// ([`Proxy::party_gone`]), and nothing has answered or cancelled the request, the
    /// party's AOR is looked up for a binding of the request's target (the party
    /// reconnected and registered again, RFC 5626 §4.2), which then takes it. Returns
    /// whether the lookup went out (the branch counts as done).
    fn try_rebind(&mut self, key: &TxKey, gone: &Flow) -> bool {
        let Some(c) = self.clients.get(key) else {
            return false;
        };
        let Some(sk) = c.server.clone() else {
            return false;
        };
        if c.cancel_sent || c.cancel_when_provisional {
            return false;
        }
        let Some(s) = self.servers.get(&sk) else {
            return false;
        };
        if s.final_sent || s.cancelled || s.rebind.is_some() {
            return false;
        }
        let limits = self.limits;
        let proxy = &self.proxy;
        let Some((aor, target)) = with_parsed(&s.request, &limits, |m, e| {
            let aor = proxy.party_gone(m, e, gone)?;
            Some((aor, Bytes::from(m.request_uri()?.to_vec())))
        })
        .flatten() else {
            return false;
        };
        let local_only = self.came_from_node(&s.inbound);
        let server_id = s.id;
        if let Some(s) = self.servers.get_mut(&sk) {
            s.rebind = Some((target, gone.clone()));
            // Not a branch any more: a CANCEL while the lookup is out is answered 487 at
            // once (it found a branch with no client to cancel, and the INVITE was never
            // answered).
            s.branches.retain(|b| b != key);
        }
        if let Some(c) = self.clients.get_mut(key) {
            c.final_received = true;
        }
        let token = self.unique();
        self.wait_for(token, Pending::Server(sk, server_id));
        self.out.push_back(Output::Lookup {
            token,
            aor,
            local_only,
        });
        true
    }

    /// A branch failed without a response (timeout, transport error): answer for it.
    fn fail_branch(
        &mut self,
        now: Instant,
        server: Option<&TxKey>,
        key: &TxKey,
        code: u16,
        reason: &str,
    ) {
        let limits = self.limits;
        let Some(sk) = server else { return };
        let Some(s) = self.servers.get(sk) else {
            return;
        };
        let source = self.client_source(&s.inbound);
        let Some(resp) = with_parsed(&s.request, &limits, |m, _| {
            response_to(
                m,
                code,
                reason,
                ResponseParts {
                    to_tag: Some(s.to_tag.as_bytes()),
                    source,
                    ..Default::default()
                },
            )
        }) else {
            return;
        };
        self.on_branch_response(now, Some(sk), key, code, BranchResponse::Local(resp.into()));
    }

    fn on_branch_response(
        &mut self,
        now: Instant,
        server: Option<&TxKey>,
        key: &TxKey,
        status: u16,
        resp: BranchResponse,
    ) {
        let mut cancel_now = false;
        let mut timer_c = None;
        if let Some(c) = self.clients.get_mut(key) {
            if status < 200 {
                if !c.got_provisional && c.cancel_when_provisional {
                    cancel_now = true;
                }
                c.got_provisional = true;
                // §16.7 step 2: a provisional (other than 100) restarts Timer C, up to the
                // branch's ceiling: a callee sending 180 every 170 s held the caller's
                // transaction (and its place in the tables) for as long as it liked.
                if status > 100 && key.method == KeyMethod::Invite && !c.cancel_sent {
                    let at = now + self.timer_c;
                    timer_c = Some(Some(c.ring_until.map_or(at, |u| at.min(u))));
                }
            } else {
                c.final_received = true;
                timer_c = Some(None);
            }
        }
        match timer_c {
            Some(Some(at)) => self.timers.set(TimerKey::TimerC(key.clone()), Some(at)),
            Some(None) => self.timers.set(TimerKey::TimerC(key.clone()), None),
            None => {}
        }
        if cancel_now {
            self.send_cancel(now, key);
        }
        let Some(sk) = server else { return };
        let limits = self.limits;
        let mut status = status;
        let upstream: Bytes = match resp {
            BranchResponse::Local(b) => b,
            BranchResponse::Downstream(b) => {
                // Who answered, and to whom: what the answer asserts is checked as a
                // request's would be.
                let (from, by_token) = match self.clients.get(key) {
                    Some(c) => (Some(c.outbound.clone()), c.by_token),
                    None => (None, false),
                };
                let from_partner = from.as_ref().and_then(|f| self.partner_of(f));
                let to_partner = self
                    .servers
                    .get(sk)
                    .and_then(|s| self.partner_of(&s.inbound))
                    .filter(|p| !self.proxy.is_node(p));
                let (proxy, policy) = (&self.proxy, &self.policy);
                let Some(out) = with_parsed(&b, &limits, |m, _| {
                    let strip = policy.strips_response_identity(m, from_partner, to_partner);
                    proxy.forward_response(m, strip)
                }) else {
                    return;
                };
                // An edge proxy's 430 (the device's flow to it failed; no other flow took
                // the request, or it would not be here) on a branch to a registered contact
                // is for us, the proxy that looked the user up (RFC 5626 §5.3): the device
                // is unreachable, 480, as for a flow of ours that failed. On a dialog route
                // it goes on to the proxy before us, a partner's; a phone never gets one
                // (§11.5: it reads 400), nor another node (it relays to a phone).
                if status == 430 && (!by_token || to_partner.is_none()) {
                    status = 480;
                    with_status(&out, b"SIP/2.0 480 Temporarily Unavailable").into()
                } else {
                    out.into()
                }
            }
        };
        let Some(s) = self.servers.get_mut(sk) else {
            return;
        };
        match status {
            100 => return,
            // No provisional but 100 answers a non-INVITE (RFC 4320 §4.1): a callee's 18x to
            // a MESSAGE stops here.
            101..=199 if sk.method != KeyMethod::Invite => return,
            101..=199 => {
                if !s.final_sent {
                    let _ = s.txn.send_response(now, status, upstream);
                }
            }
            200..=299 => {
                s.got_2xx = true;
                s.final_sent = true;
                let _ = s.txn.send_response(now, status, upstream);
                if sk.method == KeyMethod::Invite {
                    // A call answered through us: both parties' connections carry its
                    // dialog (the BYE, a re-INVITE), unauthenticated caller included, and
                    // keep their place at a full budget ([`ShardProxy::standing`]).
                    let caller = s.inbound.clone();
                    let callee = self.clients.get(key).map(|c| c.outbound.clone());
                    for f in std::iter::once(caller).chain(callee) {
                        if matches!(f, Flow::Conn(_)) && !self.proven.contains(&f) {
                            self.proven.insert(f);
                        }
                    }
                    let sk = sk.clone();
                    self.cancel_branches(now, &sk, Some(key));
                }
            }
            _ => {
                if matches!(status, 401 | 407) {
                    with_parsed(&upstream, &limits, |m, _| {
                        // Bounded: every branch's challenges go up in one answer, which
                        // must still fit a peer's message limit (ten devices answering
                        // 60 KiB of Proxy-Authenticate each made one of 600 KiB, which cut
                        // the link to the node or partner it went to).
                        // Each counted with its entry, and their number bounded too: a
                        // thousand one-byte lines weighed a thousand bytes.
                        let mut held: usize = s.challenges.iter().map(challenge_weight).sum();
                        // A few per answer: the first answer's own lines filled the bound and
                        // left out the others' (its own go up as it wrote them anyway).
                        for c in challenges_of(m).into_iter().take(MERGED_PER_ANSWER) {
                            if held + challenge_weight(&c) > MERGED_CHALLENGE_BYTES
                                || s.challenges.len() >= MERGED_CHALLENGES
                            {
                                break;
                            }
                            held += challenge_weight(&c);
                            s.challenges.push(c);
                        }
                    });
                }
                let better = match &s.best {
                    None => true,
                    Some((b, _)) => {
                        let invite = sk.method == KeyMethod::Invite;
                        response_rank(status, invite) < response_rank(*b, invite)
                    }
                };
                if better {
                    s.best = Some((status, upstream));
                }
                if status >= 600 && sk.method == KeyMethod::Invite {
                    let sk = sk.clone();
                    self.cancel_branches(now, &sk, Some(key));
                }
            }
        }
        self.maybe_send_best(now, sk);
        self.reweigh(sk);
        self.drive_server(now, sk);
    }

    /// When every branch has a final response and no 2xx went upstream, send the best one.
    fn maybe_send_best(&mut self, now: Instant, sk: &TxKey) {
        let Some(s) = self.servers.get(sk) else {
            return;
        };
        if s.final_sent || s.best.is_none() {
            return;
        }
        let all_done = s
            .branches
            .iter()
            .all(|k| self.clients.get(k).is_none_or(|c| c.final_received));
        if !all_done {
            return;
        }
        let limits = self.limits;
        let s = self.servers.get_mut(sk).expect("checked");
        let (code, mut bytes) = s.best.take().expect("checked");
        if code == 408 && sk.method != KeyMethod::Invite {
            // RFC 4320 §4.2: no 408 to a non-INVITE request — by the time we would send it
            // the sender's own Timer F has fired. The transaction ends without an answer.
            self.remove_server(sk);
            return;
        }
        let challenges = std::mem::take(&mut s.challenges);
        // §16.7 step 7: a 401/407 upstream carries every branch's challenge, so the caller
        // can answer all of them at once.
        if matches!(code, 401 | 407)
            && let Some(out) = with_parsed(&bytes, &limits, |m, _| {
                let own = challenges_of(m);
                let mut e = Editor::new(m);
                // What the answer may grow by and still fit a peer's message limit.
                let mut room = limits.max_message.saturating_sub(m.bytes().len());
                for (name, value) in challenges.iter().filter(|c| !own.contains(c)) {
                    let line = name.len() + 2 + value.len() + 2;
                    if line > room {
                        break;
                    }
                    room -= line;
                    e.add_header(name, value);
                }
                e.finish()
            })
        {
            bytes = out.into();
        }
        // §16.7 step 6: a 503 is not forwarded as ours ("this proxy is unavailable", RFC
        // 3261 §21.5.4): the upstream would stop sending to us; it becomes a 500.
        let code = if code == 503 {
            bytes = with_status(&bytes, b"SIP/2.0 500 Server Internal Error").into();
            500
        } else {
            code
        };
        let s = self.servers.get_mut(sk).expect("checked");
        s.final_sent = true;
        let _ = s.txn.send_response(now, code, bytes);
    }

    /// A request this proxy sent to the link `flow` (a partner's or a cluster node's) was
    /// dropped before it left (the link's dial queue was full): its branch fails now, as a
    /// transport error (503, upstream as 500; 480 for a node, as when the node cannot be
    /// reached), not after Timer B or F.
    pub fn handle_send_dropped(&mut self, now: Instant, flow: &Flow, bytes: &[u8]) {
        let limits = self.limits;
        let Some(key) = with_parsed(bytes, &limits, |m, e| {
            (m.is_request() && !crate::matching::is_ack(m))
                .then(|| TxKey::client(e))
                .flatten()
        })
        .flatten() else {
            return;
        };
        self.fail_link_branch(now, flow, &key);
    }

    /// The requests sent to `flow` that still await their final answer (their client
    /// transactions' keys). A link to a partner whose key is spent takes no new messages
    /// (they go over a link dialled anew) but is kept for the answers to these, which its
    /// partner sends back over it ([`ShardProxy::retain_unanswered`]).
    pub fn unanswered_on(&self, flow: &Flow) -> Vec<TxKey> {
        let Some(t) = self.by_flow.get(flow) else {
            return Vec::new();
        };
        let mut keys: Vec<TxKey> = t
            .keys
            .iter()
            .filter_map(|k| match k {
                TimerKey::Client(k) => self
                    .clients
                    .get(k)
                    .filter(|c| &c.outbound == flow && !c.final_received)
                    .map(|_| k.clone()),
                _ => None,
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Keeps those of `keys` that still await their final answer.
    pub fn retain_unanswered(&self, keys: &mut Vec<TxKey>) {
        keys.retain(|k| self.clients.get(k).is_some_and(|c| !c.final_received));
    }

    /// Those of `keys` still unanswered fail as if the link they went out on (to `flow`)
    /// had failed: 503 (a partner; upstream as 500), 480 (a node of our cluster).
    pub fn fail_unanswered(&mut self, now: Instant, flow: &Flow, keys: &[TxKey]) {
        for k in keys {
            self.fail_link_branch(now, flow, k);
        }
    }

    /// A branch sent to a link (to a partner or node) fails, unless it was answered.
    fn fail_link_branch(&mut self, now: Instant, flow: &Flow, key: &TxKey) {
        let Some(c) = self.clients.get(key) else {
            return;
        };
        if &c.outbound != flow || c.final_received {
            return;
        }
        let server = c.server.clone();
        let (code, reason) = match flow {
            Flow::Peer(n) if self.proxy.is_node(n) => (480, "Temporarily Unavailable"),
            _ => (503, "Service Unavailable"),
        };
        self.fail_branch(now, server.as_ref(), key, code, reason);
        self.remove_client(key);
    }

    /// A flow closed: its client branches fail — 430 for a dialog route to it (RFC 5626
    /// §5.3), 480 for a registered contact on it or a link to the cluster node that held the
    /// user's flow, 503 for a partner link (RFC 3261 §8.1.3.1: a transport error) — and
    /// server transactions that came over it are abandoned (their branches are cancelled),
    /// except a partner's, which are answered over the link to the partner. The engine
    /// calls it again when it finds a connection gone as it sends on it.
    pub fn handle_flow_closed(&mut self, now: Instant, flow: &Flow) {
        self.handle_flow_closed_keeping(now, flow, &[]);
    }

    /// [`ShardProxy::handle_flow_closed`], except the branches `keep`: requests that went
    /// out over an earlier link to the same partner, kept open for their answers (a link
    /// whose TLS key was spent) — the failure of the link that replaced it is not theirs.
    pub fn handle_flow_closed_keeping(&mut self, now: Instant, flow: &Flow, keep: &[TxKey]) {
        let keep: HashSet<&TxKey> = keep.iter().collect();
        self.detours.flow_closed(flow);
        self.draining_flows.remove(flow);
        // A partner's connection: its requests still in progress are answered over the
        // link to it (RFC 3261 §18.2.2: a server whose connection closed SHOULD open one to
        // the sender), instead of cancelled — a carrier that recycles a connection mid-call
        // does not lose the call. Not a cluster node's: a node's link closes when the node
        // went away, and its callers with it.
        let rehome = self
            .partner_of(flow)
            .filter(|p| !self.proxy.is_node(p))
            .map(|p| Flow::Peer(p.to_string()))
            .filter(|p| p != flow);
        self.flows.remove(flow);
        self.oc_flows.remove(flow);
        self.oc_down.remove(flow);
        self.flow_aors.remove(flow);
        self.proven.remove(flow);
        self.policy.flow_closed(flow);
        // Only what this flow carried: O(its transactions), not the table size. Lookups
        // and registrations still pending for its server transactions find them gone when
        // answered.
        let keys = self
            .by_flow
            .get(flow)
            .map(|t| t.keys.clone())
            .unwrap_or_default();
        for k in &keys {
            let TimerKey::Client(k) = k else { continue };
            if keep.contains(k) {
                continue;
            }
            let Some(c) = self.clients.get(k) else {
                continue;
            };
            if &c.outbound != flow {
                continue;
            }
            if !c.final_received {
                let server = c.server.clone();
                let by_token = c.by_token;
                // A registered device's flow failed with the request on it: its other flow
                // (another reg-id) gets it instead.
                if matches!(flow, Flow::Conn(_)) && self.try_next_flow(now, k, Some(flow)) {
                    self.remove_client(k);
                    continue;
                }
                // A dialog's party whose connection closed: if it reconnected and registered
                // again, its new binding takes the request.
                if by_token && self.try_rebind(k, flow) {
                    self.remove_client(k);
                    continue;
                }
                // Who waits for the answer: a partner's proxy, or a phone (directly, or
                // through another node of our cluster, which relays what we answer).
                let upstream_is_proxy = server
                    .as_ref()
                    .and_then(|k| self.servers.get(k))
                    .and_then(|s| self.partner_of(&s.inbound))
                    .is_some_and(|p| !self.proxy.is_node(p));
                let (code, reason) = match flow {
                    // A dialog route to a connection that is gone (RFC 5626 §5.3): 430 is for
                    // the proxy before us; a phone never gets one (§11.5: it would read 400,
                    // and a re-INVITE or UPDATE that failed so leaves the call up): 480,
                    // as for a registered contact on it.
                    Flow::Conn(_) if by_token && upstream_is_proxy => (430, "Flow Failed"),
                    // A registered contact whose connection died: the user is unreachable
                    // now (480), as a lookup would say once the binding is gone. The same
                    // for a cluster node that cannot be reached and holds the user's flow.
                    Flow::Conn(_) => (480, "Temporarily Unavailable"),
                    Flow::Peer(n) if self.proxy.is_node(n) => (480, "Temporarily Unavailable"),
                    // A partner link: a transport error, 503 (§8.1.3.1; upstream as 500).
                    _ => (503, "Service Unavailable"),
                };
                self.fail_branch(now, server.as_ref(), k, code, reason);
            }
            self.remove_client(k);
        }
        for k in &keys {
            let TimerKey::Server(k) = k else { continue };
            if !self.servers.get(k).is_some_and(|s| &s.inbound == flow) {
                continue;
            }
            if let Some(peer) = &rehome {
                if let Some(s) = self.servers.get_mut(k) {
                    s.inbound = peer.clone();
                }
                self.index(peer, TimerKey::Server(k.clone()));
                continue;
            }
            self.cancel_branches(now, k, None);
            let Some(s) = self.remove_server(k) else {
                continue;
            };
            // Branches that already answered only wait out their timers for a server
            // transaction that is gone: they go with it.
            for b in &s.branches {
                if self.clients.get(b).is_some_and(|c| c.final_received) {
                    self.remove_client(b);
                }
            }
        }
        // What is kept stays indexed under the flow, live.
        let kept: Vec<TimerKey> = keep
            .iter()
            .filter(|k| self.clients.get(**k).is_some_and(|c| &c.outbound == flow))
            .map(|k| TimerKey::Client((*k).clone()))
            .collect();
        if kept.is_empty() {
            self.by_flow.remove(flow);
        } else {
            self.by_flow.insert(
                flow.clone(),
                FlowTxns {
                    live: kept.len(),
                    servers: 0,
                    keys: kept,
                },
            );
        }
    }

    /// Timer C fired on an INVITE branch (RFC 3261 §16.8): one that rang is cancelled (and
    /// gets 64·T1 more to answer the CANCEL); one that never rang, or did not answer the
    /// CANCEL, fails as 408.
    fn on_timer_c(&mut self, now: Instant, key: &TxKey) {
        let Some(c) = self.clients.get_mut(key) else {
            return;
        };
        if c.final_received {
            return;
        }
        if c.got_provisional && !c.cancel_sent {
            return self.send_cancel(now, key);
        }
        let server = c.server.clone();
        self.fail_branch(now, server.as_ref(), key, 408, "Request Timeout");
        self.remove_client(key);
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick_clock(now);
        self.detours.prune(now);
        while let Some(k) = self.timers.pop_expired(now) {
            match k {
                TimerKey::Server(key) => {
                    if let Some(s) = self.servers.get_mut(&key) {
                        s.txn.handle_timeout(now);
                        self.drive_server(now, &key);
                    }
                }
                TimerKey::Client(key) => {
                    if let Some(c) = self.clients.get_mut(&key) {
                        c.txn.handle_timeout(now);
                        self.drive_client(now, &key);
                    }
                }
                TimerKey::TimerC(key) => self.on_timer_c(now, &key),
                TimerKey::Pending(token) => self.never_answered(now, token),
            }
        }
    }
}
