//! SIP transactions (RFC 3261 §17) for reliable transports, with the RFC 6026
//! `Accepted` states.
//!
//! # Design
//!
//! A transaction is a small sans-IO state machine: it owns no socket, reads no
//! clock and never blocks. Inputs arrive through `handle_*` methods (with the
//! current [`Instant`] passed in), outputs are queued and drained through
//! `poll_*` methods. Messages are opaque: the transaction stores and hands back
//! values of a generic `M: Clone` (the engine uses encoded bytes), so this module
//! depends on no parser. The caller matches messages to transactions
//! (RFC 3261 17.1.3 / 17.2.3) and passes the status code of responses alongside
//! the message.
//!
//! Four machines exist: [`ServerTransaction`] and [`ClientTransaction`], each of
//! [`Kind::Invite`] or [`Kind::NonInvite`].
//!
//! What this module does **not** do:
//!
//! - No UDP retransmission timers (A, E, G): sipring speaks TLS/TCP, where the
//!   transport retransmits. Setting [`TimerConfig::reliable`] to `false` only
//!   lengthens the "absorb retransmissions" timers D, I, J and K.
//! - No Timer C (the proxy's INVITE guard timer): it belongs to the proxy core.
//! - No ACK construction: a client INVITE that receives a non-2xx final asks the
//!   driver to build and send the hop-by-hop ACK ([`Transmit::AckForNon2xx`]).
//!
//! Timers that are zero on reliable transports (D, I, J, K) do not go through
//! [`poll_timeout`](ServerTransaction::poll_timeout): the transaction moves to
//! [`State::Terminated`] immediately, still emitting [`Event::Terminated`]. Every
//! path into `Terminated` emits that event exactly once, and afterwards the
//! transaction produces no further events or transmits. A timer whose deadline
//! is not representable (absurd `t1`) simply never fires.
//!
//! ```text
//! INVITE server (RFC 3261 17.2.1, RFC 6026)
//!       new_invite: queue 100 Trying
//!                 |
//!                 v
//!           +------------+ ---+ 1xx: send
//!           | Proceeding | <--+
//!           +------------+
//!    300-699: |        | 2xx: send
//!       send  v        v
//!   +-----------+    +----------+ ---+ 2xx: send
//!   | Completed |    | Accepted | <--+ ACK: Event::Ack
//!   +-----------+    +----------+
//!     |     | H: AckTimeout | L
//!     | ACK +----------+    |
//!     v                |    |
//!   +-----------+      |    |
//!   | Confirmed |      |    |
//!   +-----------+      |    |
//!     | I (0 reliable) |    |
//!     v                v    v
//!             Terminated
//!
//! non-INVITE server (17.2.2)
//!       new_non_invite
//!             |
//!             v
//!       +--------+  1xx: send   +------------+ ---+ 1xx: send
//!       | Trying | -----------> | Proceeding | <--+
//!       +--------+              +------------+
//!   200-699: |                     | 200-699: send
//!      send  v                     |
//!       +-----------+ <------------+
//!       | Completed |
//!       +-----------+
//!             | J (0 reliable)
//!             v
//!         Terminated
//!
//! INVITE client (17.1.1, RFC 6026)
//!       new_invite: send request, arm B
//!             |
//!             v
//!       +---------+ 1xx: stop B +------------+ ---+ 1xx
//!       | Calling | ----------> | Proceeding | <--+
//!       +---------+             +------------+
//!        |      |  from either:        |
//!        |      +----------+-----------+
//!        | B:              |
//!        | Timeout   2xx   |   300-699: AckForNon2xx
//!        |      +----------+-----------+
//!        |      v                      v
//!        | +----------+ ---+ 2xx  +-----------+ ---+ 300-699:
//!        | | Accepted | <--+      | Completed | <--+ AckForNon2xx
//!        | +----------+           +-----------+
//!        |      | M                    | D (0 reliable)
//!        v      v                      v
//!                   Terminated
//!
//! non-INVITE client (17.1.2)
//!       new_non_invite: send request, arm F
//!             |
//!             v
//!       +--------+    1xx     +------------+ ---+ 1xx
//!       | Trying | ---------> | Proceeding | <--+
//!       +--------+            +------------+
//!        |     | 200-699       |         |
//!        |     v               | 200-699 |
//!        |  +-----------+ <----+         |
//!        |  | Completed |                |
//!        |  +-----------+                |
//!        | F:     | K (0 reliable)       | F: Timeout
//!        v Timeout v                     v
//!                 Terminated
//! ```
//!
//! # Driving a transaction
//!
//! After creating a transaction and after every `handle_*` / `send_response`
//! call, the driver:
//!
//! 1. drains `poll_transmit` until `None`, sending each message in order;
//! 2. drains `poll_event` until `None`, passing each event to the TU; on
//!    [`Event::Terminated`] it drops the transaction;
//! 3. re-arms its timer for the transaction from `poll_timeout` (for instance
//!    with [`Timers::set`]), and calls `handle_timeout` when that deadline
//!    passes, then repeats steps 1–3.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

/// Timer T4 of RFC 3261 (maximum duration a message stays in the network),
/// used for Timers I and K on unreliable transports.
pub const T4: Duration = Duration::from_secs(5);

/// Timer values (RFC 3261 Table 4) for reliable or unreliable transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    /// RTT estimate T1; default 500 ms. Timers B, F, H, L and M are `64 * t1`.
    pub t1: Duration,
    /// Whether the transport is reliable (TLS/TCP); default `true`. On reliable
    /// transports Timers D, I, J and K are zero.
    pub reliable: bool,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            reliable: true,
        }
    }
}

impl TimerConfig {
    fn sixty_four_t1(&self) -> Duration {
        self.t1.saturating_mul(64)
    }

    fn unreliable_only(&self, d: Duration) -> Duration {
        if self.reliable { Duration::ZERO } else { d }
    }

    /// Timer B: INVITE client transaction timeout in `Calling` (`64 * T1`).
    #[must_use]
    pub fn timer_b(&self) -> Duration {
        self.sixty_four_t1()
    }

    /// Timer D: INVITE client wait for response retransmits (0 reliable, else 32 s).
    #[must_use]
    pub fn timer_d(&self) -> Duration {
        self.unreliable_only(Duration::from_secs(32))
    }

    /// Timer F: non-INVITE client transaction timeout (`64 * T1`).
    #[must_use]
    pub fn timer_f(&self) -> Duration {
        self.sixty_four_t1()
    }

    /// Timer H: INVITE server wait for ACK receipt (`64 * T1`).
    #[must_use]
    pub fn timer_h(&self) -> Duration {
        self.sixty_four_t1()
    }

    /// Timer I: INVITE server wait for ACK retransmits (0 reliable, else T4).
    #[must_use]
    pub fn timer_i(&self) -> Duration {
        self.unreliable_only(T4)
    }

    /// Timer J: non-INVITE server wait for request retransmits (0 reliable, else `64 * T1`).
    #[must_use]
    pub fn timer_j(&self) -> Duration {
        self.unreliable_only(self.sixty_four_t1())
    }

    /// Timer K: non-INVITE client wait for response retransmits (0 reliable, else T4).
    #[must_use]
    pub fn timer_k(&self) -> Duration {
        self.unreliable_only(T4)
    }

    /// Timer L (RFC 6026): INVITE server wait in `Accepted` (`64 * T1`).
    #[must_use]
    pub fn timer_l(&self) -> Duration {
        self.sixty_four_t1()
    }

    /// Timer M (RFC 6026): INVITE client wait in `Accepted` (`64 * T1`).
    #[must_use]
    pub fn timer_m(&self) -> Duration {
        self.sixty_four_t1()
    }
}

/// Whether a transaction was created for an INVITE or any other method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// INVITE transaction (RFC 3261 17.1.1 / 17.2.1).
    Invite,
    /// Any other method except ACK (RFC 3261 17.1.2 / 17.2.2).
    NonInvite,
}

/// Which side of the exchange a transaction is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sends the request, receives responses.
    Client,
    /// Receives the request, sends responses.
    Server,
}

/// Transaction states of RFC 3261 §17 and RFC 6026.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// INVITE client: request sent, no response yet.
    Calling,
    /// Non-INVITE: request sent (client) or received (server), no response yet.
    Trying,
    /// A provisional response was received (client) or may be sent (server).
    Proceeding,
    /// A final response (non-2xx for INVITE) was received or sent.
    Completed,
    /// INVITE server: the ACK for a non-2xx final arrived.
    Confirmed,
    /// INVITE (RFC 6026): a 2xx was received or sent; more 2xx may pass.
    Accepted,
    /// Finished; the owner may drop the transaction.
    Terminated,
}

/// What a transaction asks the driver to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit<M> {
    /// Send this message (a response for server transactions; the request for
    /// client transactions at start).
    Message(M),
    /// Client INVITE got a non-2xx final: the driver must build the hop-by-hop
    /// ACK from the original request and this response (RFC 3261 17.1.1.3) and
    /// send it.
    AckForNon2xx {
        /// The original INVITE.
        request: M,
        /// The non-2xx final response being acknowledged.
        response: M,
    },
}

/// What a transaction tells the transaction user (TU, the proxy core).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<M> {
    /// Client transactions: a response to pass up (every 1xx, every 2xx —
    /// including forked or retransmitted ones in `Accepted`, RFC 6026 — and a
    /// non-2xx final once).
    Response {
        /// The response status code.
        status: u16,
        /// The response itself.
        message: M,
    },
    /// Server INVITE in `Accepted`: an ACK matched it (RFC 6026); pass to the TU.
    Ack(M),
    /// Timer B or F fired: the TU must act as if a 408 arrived.
    Timeout,
    /// Timer H fired: no ACK arrived for our non-2xx final.
    AckTimeout,
    /// The transaction reached `Terminated`: the owner may drop it.
    Terminated,
}

/// Errors from [`ServerTransaction::send_response`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TxError {
    /// The response is not allowed in the transaction's current state.
    InvalidState {
        /// The state the transaction was in.
        state: State,
        /// The status code that was refused.
        status: u16,
    },
    /// The status code is outside `100..=699`.
    InvalidStatus(u16),
}

impl fmt::Display for TxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidState { state, status } => {
                write!(f, "cannot send a {status} response in state {state:?}")
            }
            Self::InvalidStatus(status) => write!(f, "invalid response status code {status}"),
        }
    }
}

impl std::error::Error for TxError {}

/// The named RFC timers; at most one runs at a time on reliable transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    B,
    D,
    F,
    H,
    I,
    J,
    K,
    L,
    M,
}

/// State, timer and output queues shared by both roles.
#[derive(Debug)]
struct Core<M, T> {
    kind: Kind,
    state: State,
    cfg: TimerConfig,
    request: M,
    timer: Option<(Timer, Instant)>,
    transmits: VecDeque<T>,
    events: VecDeque<Event<M>>,
}

impl<M, T> Core<M, T> {
    fn new(kind: Kind, state: State, cfg: &TimerConfig, request: M) -> Self {
        Self {
            kind,
            state,
            cfg: *cfg,
            request,
            timer: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Moves to `state` and arms `timer` for `after`; a zero timer terminates at once.
    fn enter(&mut self, now: Instant, state: State, timer: Timer, after: Duration) {
        self.state = state;
        if after.is_zero() {
            self.terminate();
        } else {
            self.timer = now.checked_add(after).map(|at| (timer, at));
        }
    }

    fn terminate(&mut self) {
        if self.state != State::Terminated {
            self.state = State::Terminated;
            self.timer = None;
            self.events.push_back(Event::Terminated);
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        let Some((timer, at)) = self.timer else {
            return;
        };
        if at > now {
            return;
        }
        match timer {
            Timer::B | Timer::F => self.events.push_back(Event::Timeout),
            Timer::H => self.events.push_back(Event::AckTimeout),
            Timer::D | Timer::I | Timer::J | Timer::K | Timer::L | Timer::M => {}
        }
        self.terminate();
    }
}

/// A server transaction: receives one request and sends its responses.
#[derive(Debug)]
pub struct ServerTransaction<M> {
    core: Core<M, M>,
    /// The response re-sent when the request is retransmitted.
    last_response: Option<M>,
}

impl<M: Clone> ServerTransaction<M> {
    /// A new INVITE server transaction for a request just received, in
    /// `Proceeding`. `trying` is the 100 Trying built by the caller; it is
    /// queued for transmit at once (a proxy answers 100 immediately).
    #[must_use]
    pub fn new_invite(_now: Instant, cfg: &TimerConfig, request: M, trying: M) -> Self {
        let mut core = Core::new(Kind::Invite, State::Proceeding, cfg, request);
        core.transmits.push_back(trying.clone());
        Self {
            core,
            last_response: Some(trying),
        }
    }

    /// A new non-INVITE server transaction for a request just received, in `Trying`.
    #[must_use]
    pub fn new_non_invite(_now: Instant, cfg: &TimerConfig, request: M) -> Self {
        Self {
            core: Core::new(Kind::NonInvite, State::Trying, cfg, request),
            last_response: None,
        }
    }

    /// A retransmission of the request arrived. In `Proceeding` and `Completed`
    /// the last response is queued again; in `Trying`, `Accepted` (RFC 6026),
    /// `Confirmed` and `Terminated` it is absorbed.
    pub fn handle_request_retransmit(&mut self, _now: Instant) {
        if matches!(self.core.state, State::Proceeding | State::Completed)
            && let Some(last) = &self.last_response
        {
            self.core.transmits.push_back(last.clone());
        }
    }

    /// INVITE only: an ACK matched this transaction. `Completed` → `Confirmed`
    /// (Timer I; immediately `Terminated` when reliable). `Accepted` →
    /// [`Event::Ack`] for the TU. Ignored otherwise.
    pub fn handle_ack(&mut self, now: Instant, ack: M) {
        let c = &mut self.core;
        match (c.kind, c.state) {
            (Kind::Invite, State::Completed) => {
                let after = c.cfg.timer_i();
                c.enter(now, State::Confirmed, Timer::I, after);
            }
            (Kind::Invite, State::Accepted) => c.events.push_back(Event::Ack(ack)),
            _ => {}
        }
    }

    /// The TU sends a response through this transaction; it is queued for
    /// transmit.
    ///
    /// INVITE: 1xx stays `Proceeding`; 2xx → `Accepted` (Timer L), where
    /// further 2xx pass through; 300–699 → `Completed` (Timer H).
    /// Non-INVITE: 1xx → `Proceeding`; a final → `Completed` (Timer J;
    /// immediately `Terminated` when reliable).
    ///
    /// # Errors
    ///
    /// [`TxError::InvalidStatus`] outside `100..=699`, and
    /// [`TxError::InvalidState`] when the state forbids the response (a final
    /// was already sent, other than 2xx in `Accepted`, or `Terminated`).
    pub fn send_response(&mut self, now: Instant, status: u16, response: M) -> Result<(), TxError> {
        if !(100..=699).contains(&status) {
            return Err(TxError::InvalidStatus(status));
        }
        let c = &mut self.core;
        let next = match (c.kind, c.state, status) {
            (Kind::Invite, State::Proceeding, 100..=199) => None,
            (Kind::Invite, State::Proceeding, 200..=299) => {
                Some((State::Accepted, Timer::L, c.cfg.timer_l()))
            }
            (Kind::Invite, State::Accepted, 200..=299) => None,
            (Kind::Invite, State::Proceeding, _) => {
                Some((State::Completed, Timer::H, c.cfg.timer_h()))
            }
            (Kind::NonInvite, State::Trying | State::Proceeding, 100..=199) => {
                c.state = State::Proceeding;
                None
            }
            (Kind::NonInvite, State::Trying | State::Proceeding, _) => {
                Some((State::Completed, Timer::J, c.cfg.timer_j()))
            }
            (_, state, _) => return Err(TxError::InvalidState { state, status }),
        };
        self.last_response = Some(response.clone());
        c.transmits.push_back(response);
        if let Some((state, timer, after)) = next {
            c.enter(now, state, timer, after);
        }
        Ok(())
    }

    /// The response it sends again if the request is retransmitted (RFC 3261 §17.2), if any.
    #[must_use]
    pub fn last_response(&self) -> Option<&M> {
        self.last_response.as_ref()
    }

    /// Whether a CANCEL is meaningful now: an INVITE with no final response sent.
    #[must_use]
    pub fn is_cancellable(&self) -> bool {
        self.core.kind == Kind::Invite && self.core.state == State::Proceeding
    }

    /// The request that created this transaction.
    #[must_use]
    pub fn request(&self) -> &M {
        &self.core.request
    }

    /// INVITE or non-INVITE.
    #[must_use]
    pub fn kind(&self) -> Kind {
        self.core.kind
    }

    /// Always [`Role::Server`].
    #[must_use]
    pub fn role(&self) -> Role {
        Role::Server
    }

    /// The current state.
    #[must_use]
    pub fn state(&self) -> State {
        self.core.state
    }

    /// The next message to send, in order.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<M> {
        self.core.transmits.pop_front()
    }

    /// The next event for the TU, in order.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event<M>> {
        self.core.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.timer.map(|(_, at)| at)
    }

    /// Fires the armed timer if its deadline is `<= now`: Timer H emits
    /// [`Event::AckTimeout`]; every timer leads to `Terminated`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.core.handle_timeout(now);
    }

    /// Whether the transaction reached `Terminated`.
    #[must_use]
    pub fn is_terminated(&self) -> bool {
        self.core.state == State::Terminated
    }
}

/// A client transaction: sends one request and receives its responses.
#[derive(Debug)]
pub struct ClientTransaction<M> {
    core: Core<M, Transmit<M>>,
}

impl<M: Clone> ClientTransaction<M> {
    fn start(now: Instant, cfg: &TimerConfig, request: M, kind: Kind) -> Self {
        let (state, timer, after) = match kind {
            Kind::Invite => (State::Calling, Timer::B, cfg.timer_b()),
            Kind::NonInvite => (State::Trying, Timer::F, cfg.timer_f()),
        };
        let mut core = Core::new(kind, state, cfg, request.clone());
        core.transmits.push_back(Transmit::Message(request));
        core.enter(now, state, timer, after);
        Self { core }
    }

    /// Starts an INVITE client transaction: queues the request for transmit
    /// and arms Timer B in `Calling`.
    #[must_use]
    pub fn new_invite(now: Instant, cfg: &TimerConfig, request: M) -> Self {
        Self::start(now, cfg, request, Kind::Invite)
    }

    /// Starts a non-INVITE client transaction: queues the request for
    /// transmit and arms Timer F in `Trying`.
    #[must_use]
    pub fn new_non_invite(now: Instant, cfg: &TimerConfig, request: M) -> Self {
        Self::start(now, cfg, request, Kind::NonInvite)
    }

    /// A response matched this transaction. Status codes outside `100..=699`
    /// are ignored.
    ///
    /// INVITE: in `Calling`/`Proceeding`, 1xx → `Proceeding` (stops Timer B);
    /// 2xx → `Accepted` (Timer M); 300–699 → `Completed` with
    /// [`Transmit::AckForNon2xx`] (Timer D; immediately `Terminated` when
    /// reliable). Each emits [`Event::Response`]. In `Accepted`, further 2xx
    /// are passed up, others absorbed. In `Completed`, a retransmitted final
    /// queues the ACK again, without an event.
    ///
    /// Non-INVITE: 1xx → `Proceeding`; a final → `Completed` (Timer K;
    /// immediately `Terminated` when reliable); each emits an event; later
    /// responses are absorbed.
    pub fn handle_response(&mut self, now: Instant, status: u16, response: M) {
        let c = &mut self.core;
        let ack = |request: &M, response| Transmit::AckForNon2xx {
            request: request.clone(),
            response,
        };
        match (c.kind, c.state, status) {
            (_, State::Calling | State::Trying | State::Proceeding, 100..=199) => {
                if c.kind == Kind::Invite {
                    c.timer = None; // Timer B runs in Calling only.
                }
                c.state = State::Proceeding;
                c.events.push_back(Event::Response {
                    status,
                    message: response,
                });
            }
            (Kind::Invite, State::Calling | State::Proceeding, 200..=299) => {
                c.events.push_back(Event::Response {
                    status,
                    message: response,
                });
                let after = c.cfg.timer_m();
                c.enter(now, State::Accepted, Timer::M, after);
            }
            (Kind::Invite, State::Calling | State::Proceeding, 300..=699) => {
                c.transmits.push_back(ack(&c.request, response.clone()));
                c.events.push_back(Event::Response {
                    status,
                    message: response,
                });
                let after = c.cfg.timer_d();
                c.enter(now, State::Completed, Timer::D, after);
            }
            (Kind::Invite, State::Accepted, 200..=299) => {
                c.events.push_back(Event::Response {
                    status,
                    message: response,
                });
            }
            (Kind::Invite, State::Completed, 300..=699) => {
                c.transmits.push_back(ack(&c.request, response));
            }
            (Kind::NonInvite, State::Trying | State::Proceeding, 200..=699) => {
                c.events.push_back(Event::Response {
                    status,
                    message: response,
                });
                let after = c.cfg.timer_k();
                c.enter(now, State::Completed, Timer::K, after);
            }
            _ => {}
        }
    }

    /// The request that started this transaction.
    #[must_use]
    pub fn request(&self) -> &M {
        &self.core.request
    }

    /// INVITE or non-INVITE.
    #[must_use]
    pub fn kind(&self) -> Kind {
        self.core.kind
    }

    /// Always [`Role::Client`].
    #[must_use]
    pub fn role(&self) -> Role {
        Role::Client
    }

    /// The current state.
    #[must_use]
    pub fn state(&self) -> State {
        self.core.state
    }

    /// The next thing to send, in order.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit<M>> {
        self.core.transmits.pop_front()
    }

    /// The next event for the TU, in order.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event<M>> {
        self.core.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.timer.map(|(_, at)| at)
    }

    /// Fires the armed timer if its deadline is `<= now`: Timers B and F emit
    /// [`Event::Timeout`]; every timer leads to `Terminated`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.core.handle_timeout(now);
    }

    /// Whether the transaction reached `Terminated`.
    #[must_use]
    pub fn is_terminated(&self) -> bool {
        self.core.state == State::Terminated
    }
}

/// A deadline index for a table of transactions keyed by `K`, so a driver
/// finds expired timers without scanning the table.
///
/// Each key has at most one deadline; arming a key again replaces it. Keys
/// with equal deadlines expire in the order they were armed.
#[derive(Debug, Clone)]
pub struct Timers<K> {
    by_deadline: BTreeSet<(Instant, u64, K)>,
    by_key: BTreeMap<K, (Instant, u64)>,
    seq: u64,
}

impl<K> Default for Timers<K> {
    fn default() -> Self {
        Self {
            by_deadline: BTreeSet::new(),
            by_key: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<K: Ord + Clone> Timers<K> {
    /// An empty index.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms `key` to expire at `at`, replacing any earlier deadline for it.
    pub fn arm(&mut self, key: K, at: Instant) {
        self.cancel(&key);
        self.seq = self.seq.wrapping_add(1);
        self.by_deadline.insert((at, self.seq, key.clone()));
        self.by_key.insert(key, (at, self.seq));
    }

    /// Removes the deadline of `key`; returns whether one was armed.
    pub fn cancel(&mut self, key: &K) -> bool {
        match self.by_key.remove_entry(key) {
            Some((key, (at, seq))) => self.by_deadline.remove(&(at, seq, key)),
            None => false,
        }
    }

    /// Arms `key` at `deadline`, or cancels it when `None`: feed it a
    /// transaction's `poll_timeout()` after each interaction.
    pub fn set(&mut self, key: K, deadline: Option<Instant>) {
        match deadline {
            Some(at) => self.arm(key, at),
            None => {
                self.cancel(&key);
            }
        }
    }

    /// The deadline of `key`, if armed.
    #[must_use]
    pub fn deadline(&self, key: &K) -> Option<Instant> {
        self.by_key.get(key).map(|&(at, _)| at)
    }

    /// The earliest deadline, for the driver's sleep.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(at, _, _)| *at)
    }

    /// Removes and returns the earliest key whose deadline is `<= now`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<K> {
        if self.next_deadline()? > now {
            return None;
        }
        let (_, _, key) = self.by_deadline.pop_first()?;
        self.by_key.remove(&key);
        Some(key)
    }

    /// Removes and returns every key whose deadline is `<= now`, earliest first.
    pub fn expired(&mut self, now: Instant) -> Vec<K> {
        std::iter::from_fn(|| self.pop_expired(now)).collect()
    }

    /// The number of armed keys.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no key is armed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Srv = ServerTransaction<&'static str>;
    type Cli = ClientTransaction<&'static str>;
    type Ev = Event<&'static str>;

    fn clock() -> impl Fn(u64) -> Instant {
        let t0 = Instant::now();
        move |ms| t0 + Duration::from_millis(ms)
    }

    fn unreliable() -> TimerConfig {
        TimerConfig {
            reliable: false,
            ..TimerConfig::default()
        }
    }

    fn tx_s(s: &mut Srv) -> Vec<&'static str> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    fn ev_s(s: &mut Srv) -> Vec<Ev> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn tx_c(c: &mut Cli) -> Vec<Transmit<&'static str>> {
        std::iter::from_fn(|| c.poll_transmit()).collect()
    }

    fn ev_c(c: &mut Cli) -> Vec<Ev> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn resp(status: u16, message: &'static str) -> Ev {
        Event::Response { status, message }
    }

    const ACK486: Transmit<&str> = Transmit::AckForNon2xx {
        request: "INVITE",
        response: "486",
    };

    #[test]
    fn timer_config_defaults() {
        let cfg = TimerConfig::default();
        assert_eq!(cfg.t1, Duration::from_millis(500));
        assert_eq!(cfg.timer_b(), Duration::from_secs(32));
        assert_eq!(cfg.timer_l(), Duration::from_secs(32));
        for zero in [cfg.timer_d(), cfg.timer_i(), cfg.timer_j(), cfg.timer_k()] {
            assert_eq!(zero, Duration::ZERO);
        }
        let u = unreliable();
        assert_eq!(u.timer_d(), Duration::from_secs(32));
        assert_eq!((u.timer_i(), u.timer_k()), (T4, T4));
        assert_eq!(u.timer_j(), Duration::from_secs(32));
    }

    #[test]
    fn server_invite_non2xx_then_ack() {
        let at = clock();
        let cfg = TimerConfig::default();
        let mut s = Srv::new_invite(at(0), &cfg, "INVITE", "100");
        assert_eq!(
            (s.kind(), s.role(), s.state()),
            (Kind::Invite, Role::Server, State::Proceeding)
        );
        assert_eq!(tx_s(&mut s), ["100"]);
        s.handle_request_retransmit(at(10));
        assert_eq!(tx_s(&mut s), ["100"]);
        s.send_response(at(20), 180, "180").unwrap();
        s.send_response(at(30), 486, "486").unwrap();
        assert_eq!(s.state(), State::Completed);
        assert_eq!(tx_s(&mut s), ["180", "486"]);
        s.handle_request_retransmit(at(40));
        assert_eq!(tx_s(&mut s), ["486"]);
        assert_eq!(
            s.send_response(at(45), 200, "200"),
            Err(TxError::InvalidState {
                state: State::Completed,
                status: 200
            })
        );
        s.handle_ack(at(50), "ACK");
        assert!(s.is_terminated());
        assert_eq!(ev_s(&mut s), [Event::Terminated]);
        assert_eq!(s.poll_timeout(), None);
        s.handle_ack(at(60), "ACK");
        assert!(ev_s(&mut s).is_empty() && tx_s(&mut s).is_empty());
    }

    #[test]
    fn server_invite_timer_h() {
        let at = clock();
        let mut s = Srv::new_invite(at(0), &TimerConfig::default(), "INVITE", "100");
        s.send_response(at(0), 486, "486").unwrap();
        assert_eq!(s.poll_timeout(), Some(at(32_000)));
        s.handle_timeout(at(31_999));
        assert_eq!(s.state(), State::Completed);
        assert!(ev_s(&mut s).is_empty());
        s.handle_timeout(at(32_000));
        assert_eq!(ev_s(&mut s), [Event::AckTimeout, Event::Terminated]);
        s.handle_timeout(at(64_000));
        assert!(ev_s(&mut s).is_empty());
    }

    #[test]
    fn server_invite_unreliable_timer_i() {
        let at = clock();
        let mut s = Srv::new_invite(at(0), &unreliable(), "INVITE", "100");
        s.send_response(at(0), 486, "486").unwrap();
        s.handle_ack(at(100), "ACK");
        assert_eq!(s.state(), State::Confirmed);
        assert_eq!(s.poll_timeout(), Some(at(5_100)));
        s.handle_request_retransmit(at(200));
        s.handle_ack(at(200), "ACK");
        assert_eq!(tx_s(&mut s), ["100", "486"]);
        s.handle_timeout(at(5_100));
        assert_eq!(ev_s(&mut s), [Event::Terminated]);
    }

    #[test]
    fn server_invite_accepted() {
        let at = clock();
        let mut s = Srv::new_invite(at(0), &TimerConfig::default(), "INVITE", "100");
        s.send_response(at(100), 200, "200").unwrap();
        assert_eq!(s.state(), State::Accepted);
        s.handle_request_retransmit(at(200));
        assert_eq!(tx_s(&mut s), ["100", "200"]);
        s.handle_ack(at(300), "ACK");
        assert_eq!(ev_s(&mut s), [Event::Ack("ACK")]);
        s.send_response(at(400), 200, "200b").unwrap();
        assert_eq!(tx_s(&mut s), ["200b"]);
        assert!(s.send_response(at(400), 486, "486").is_err());
        assert!(s.send_response(at(400), 180, "180").is_err());
        assert_eq!(s.poll_timeout(), Some(at(32_100)));
        s.handle_timeout(at(32_099));
        assert_eq!(s.state(), State::Accepted);
        s.handle_timeout(at(32_100));
        assert_eq!(ev_s(&mut s), [Event::Terminated]);
        let err = s.send_response(at(40_000), 200, "200");
        assert_eq!(
            err,
            Err(TxError::InvalidState {
                state: State::Terminated,
                status: 200
            })
        );
        assert!(!err.unwrap_err().to_string().is_empty());
    }

    #[test]
    fn server_cancellable_only_before_final() {
        let at = clock();
        let cfg = TimerConfig::default();
        let mut s = Srv::new_invite(at(0), &cfg, "INVITE", "100");
        assert!(s.is_cancellable());
        s.send_response(at(0), 183, "183").unwrap();
        assert!(s.is_cancellable());
        s.send_response(at(0), 200, "200").unwrap();
        assert!(!s.is_cancellable());
        let mut s = Srv::new_invite(at(0), &cfg, "INVITE", "100");
        s.send_response(at(0), 603, "603").unwrap();
        assert!(!s.is_cancellable());
        assert!(!Srv::new_non_invite(at(0), &cfg, "OPTIONS").is_cancellable());
        assert_eq!(
            s.send_response(at(0), 99, "x"),
            Err(TxError::InvalidStatus(99))
        );
        assert_eq!(
            s.send_response(at(0), 700, "x"),
            Err(TxError::InvalidStatus(700))
        );
    }

    #[test]
    fn server_non_invite() {
        let at = clock();
        let mut s = Srv::new_non_invite(at(0), &TimerConfig::default(), "REGISTER");
        assert_eq!((s.state(), s.request()), (State::Trying, &"REGISTER"));
        s.handle_request_retransmit(at(10));
        assert!(tx_s(&mut s).is_empty());
        s.send_response(at(20), 100, "100").unwrap();
        s.send_response(at(25), 183, "183").unwrap();
        assert_eq!(s.state(), State::Proceeding);
        s.handle_request_retransmit(at(30));
        assert_eq!(tx_s(&mut s), ["100", "183", "183"]);
        s.send_response(at(40), 200, "200").unwrap();
        assert!(s.is_terminated());
        assert_eq!(tx_s(&mut s), ["200"]);
        assert_eq!(ev_s(&mut s), [Event::Terminated]);
        s.handle_ack(at(50), "ACK");
        s.handle_request_retransmit(at(50));
        assert!(tx_s(&mut s).is_empty() && ev_s(&mut s).is_empty());
    }

    #[test]
    fn server_non_invite_unreliable_timer_j() {
        let at = clock();
        let mut s = Srv::new_non_invite(at(0), &unreliable(), "OPTIONS");
        s.send_response(at(1_000), 200, "200").unwrap();
        assert_eq!(s.state(), State::Completed);
        s.handle_request_retransmit(at(2_000));
        assert_eq!(tx_s(&mut s), ["200", "200"]);
        assert_eq!(s.poll_timeout(), Some(at(33_000)));
        s.handle_timeout(at(32_999));
        assert!(ev_s(&mut s).is_empty());
        s.handle_timeout(at(33_000));
        assert_eq!(ev_s(&mut s), [Event::Terminated]);
    }

    #[test]
    fn client_invite_timer_b() {
        let at = clock();
        let mut c = Cli::new_invite(at(0), &TimerConfig::default(), "INVITE");
        assert_eq!((c.state(), c.role()), (State::Calling, Role::Client));
        assert_eq!(tx_c(&mut c), [Transmit::Message("INVITE")]);
        assert_eq!(c.poll_timeout(), Some(at(32_000)));
        c.handle_timeout(at(31_999));
        assert!(ev_c(&mut c).is_empty());
        c.handle_timeout(at(32_000));
        assert_eq!(ev_c(&mut c), [Event::Timeout, Event::Terminated]);
        c.handle_response(at(33_000), 200, "200");
        assert!(ev_c(&mut c).is_empty());
    }

    #[test]
    fn client_invite_1xx_stops_timer_b() {
        let at = clock();
        let mut c = Cli::new_invite(at(0), &TimerConfig::default(), "INVITE");
        c.handle_response(at(100), 180, "180");
        assert_eq!(c.state(), State::Proceeding);
        assert_eq!(c.poll_timeout(), None);
        c.handle_timeout(at(100_000));
        assert_eq!(ev_c(&mut c), [resp(180, "180")]);
        assert!(!c.is_terminated());
    }

    #[test]
    fn client_invite_non2xx() {
        let at = clock();
        let mut c = Cli::new_invite(at(0), &unreliable(), "INVITE");
        c.handle_response(at(100), 100, "100");
        c.handle_response(at(200), 486, "486");
        assert_eq!(c.state(), State::Completed);
        assert_eq!(tx_c(&mut c), [Transmit::Message("INVITE"), ACK486]);
        assert_eq!(ev_c(&mut c), [resp(100, "100"), resp(486, "486")]);
        c.handle_response(at(300), 486, "486");
        c.handle_response(at(300), 200, "200");
        assert_eq!(tx_c(&mut c), [ACK486]);
        assert!(ev_c(&mut c).is_empty());
        assert_eq!(c.poll_timeout(), Some(at(32_200)));
        c.handle_timeout(at(32_200));
        assert_eq!(ev_c(&mut c), [Event::Terminated]);

        let mut c = Cli::new_invite(at(0), &TimerConfig::default(), "INVITE");
        c.handle_response(at(100), 486, "486");
        assert!(c.is_terminated());
        assert_eq!(tx_c(&mut c), [Transmit::Message("INVITE"), ACK486]);
        assert_eq!(ev_c(&mut c), [resp(486, "486"), Event::Terminated]);
    }

    #[test]
    fn client_invite_accepted_forking() {
        let at = clock();
        let mut c = Cli::new_invite(at(0), &TimerConfig::default(), "INVITE");
        c.handle_response(at(100), 200, "200a");
        assert_eq!(c.state(), State::Accepted);
        c.handle_response(at(200), 200, "200b");
        c.handle_response(at(250), 180, "180");
        c.handle_response(at(250), 486, "486");
        assert_eq!(ev_c(&mut c), [resp(200, "200a"), resp(200, "200b")]);
        assert_eq!(tx_c(&mut c), [Transmit::Message("INVITE")]);
        assert_eq!(c.poll_timeout(), Some(at(32_100)));
        c.handle_timeout(at(32_100));
        assert_eq!(ev_c(&mut c), [Event::Terminated]);
    }

    #[test]
    fn client_non_invite() {
        let at = clock();
        let mut c = Cli::new_non_invite(at(0), &TimerConfig::default(), "OPTIONS");
        assert_eq!(
            (c.kind(), c.state(), c.request()),
            (Kind::NonInvite, State::Trying, &"OPTIONS")
        );
        c.handle_response(at(100), 100, "100");
        assert_eq!(c.state(), State::Proceeding);
        assert_eq!(c.poll_timeout(), Some(at(32_000)));
        c.handle_timeout(at(32_000));
        assert_eq!(
            ev_c(&mut c),
            [resp(100, "100"), Event::Timeout, Event::Terminated]
        );

        let mut c = Cli::new_non_invite(at(0), &unreliable(), "OPTIONS");
        c.handle_response(at(100), 404, "404");
        c.handle_response(at(200), 404, "404");
        c.handle_response(at(200), 200, "200");
        assert_eq!(c.state(), State::Completed);
        assert_eq!(ev_c(&mut c), [resp(404, "404")]);
        assert_eq!(c.poll_timeout(), Some(at(5_100)));
        c.handle_timeout(at(5_100));
        assert_eq!(ev_c(&mut c), [Event::Terminated]);
        assert_eq!(tx_c(&mut c), [Transmit::Message("OPTIONS")]);

        let mut c = Cli::new_non_invite(at(0), &TimerConfig::default(), "OPTIONS");
        c.handle_response(at(100), 200, "200");
        assert_eq!(ev_c(&mut c), [resp(200, "200"), Event::Terminated]);
    }

    #[test]
    fn huge_t1_never_panics() {
        let at = clock();
        let cfg = TimerConfig {
            t1: Duration::MAX,
            reliable: false,
        };
        let mut c = Cli::new_invite(at(0), &cfg, "INVITE");
        assert_eq!(c.poll_timeout(), None);
        c.handle_timeout(at(1 << 40));
        let mut s = Srv::new_non_invite(at(0), &cfg, "BYE");
        s.send_response(at(0), 200, "200").unwrap();
        assert_eq!(s.state(), State::Completed);
    }

    #[test]
    fn timers_container() {
        let at = clock();
        let mut t = Timers::new();
        assert_eq!((t.next_deadline(), t.is_empty()), (None, true));
        t.arm("c", at(300));
        t.arm("a", at(100));
        t.arm("b", at(200));
        t.arm("d", at(100));
        assert_eq!(t.next_deadline(), Some(at(100)));
        assert_eq!(t.deadline(&"b"), Some(at(200)));
        t.arm("b", at(50)); // re-arm replaces
        assert_eq!(t.len(), 4);
        assert!(t.cancel(&"c"));
        assert!(!t.cancel(&"c"));
        assert_eq!(t.expired(at(40)), Vec::<&str>::new());
        assert_eq!(t.expired(at(100)), ["b", "a", "d"]);
        t.set("e", Some(at(400)));
        t.set("a", None);
        assert_eq!(t.next_deadline(), Some(at(400)));
        assert_eq!(t.pop_expired(at(399)), None);
        assert_eq!(t.pop_expired(at(400)), Some("e"));
        assert!(t.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Respond(u16),
        Retransmit,
        Ack,
        Timeout,
    }

    fn op() -> impl Strategy<Value = (u64, Op)> {
        let op = prop_oneof![
            4 => (100u16..=699).prop_map(Op::Respond),
            1 => any::<u16>().prop_map(Op::Respond),
            2 => Just(Op::Retransmit),
            2 => Just(Op::Ack),
            3 => Just(Op::Timeout),
        ];
        (0u64..40_000, op)
    }

    /// Checks one step's outputs; returns whether `Terminated` was seen so far.
    fn check_step(done: bool, transmits: usize, events: &[Ev], terminated: bool) -> bool {
        if done {
            assert!(
                transmits == 0 && events.is_empty(),
                "output after Terminated"
            );
        }
        let n = events.iter().filter(|e| **e == Event::Terminated).count();
        assert!(n <= 1 && !(done && n > 0), "Terminated emitted twice");
        if n == 1 {
            assert_eq!(events.last(), Some(&Event::Terminated));
        }
        let done = done || n == 1;
        assert_eq!(done, terminated);
        done
    }

    proptest! {
        #[test]
        fn never_panics_terminates_once(
            invite: bool, server: bool, reliable: bool, t1 in 1u64..2_000,
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            let at = clock();
            let cfg = TimerConfig { t1: Duration::from_millis(t1), reliable };
            let mut now = 0;
            let mut done = false;
            if server {
                let mut s = if invite {
                    Srv::new_invite(at(0), &cfg, "INVITE", "100")
                } else {
                    Srv::new_non_invite(at(0), &cfg, "MESSAGE")
                };
                done = check_step(done, tx_s(&mut s).len(), &ev_s(&mut s), s.is_terminated());
                for (dt, op) in ops {
                    now += dt;
                    match op {
                        Op::Respond(st) => { let _ = s.send_response(at(now), st, "resp"); }
                        Op::Retransmit => s.handle_request_retransmit(at(now)),
                        Op::Ack => s.handle_ack(at(now), "ACK"),
                        Op::Timeout => s.handle_timeout(at(now)),
                    }
                    done = check_step(done, tx_s(&mut s).len(), &ev_s(&mut s), s.is_terminated());
                    prop_assert!(!done || s.poll_timeout().is_none());
                }
            } else {
                let mut c = if invite {
                    Cli::new_invite(at(0), &cfg, "INVITE")
                } else {
                    Cli::new_non_invite(at(0), &cfg, "MESSAGE")
                };
                done = check_step(done, tx_c(&mut c).len(), &ev_c(&mut c), c.is_terminated());
                for (dt, op) in ops {
                    now += dt;
                    match op {
                        Op::Respond(st) => c.handle_response(at(now), st, "resp"),
                        Op::Retransmit | Op::Ack => {}
                        Op::Timeout => c.handle_timeout(at(now)),
                    }
                    done = check_step(done, tx_c(&mut c).len(), &ev_c(&mut c), c.is_terminated());
                    prop_assert!(!done || c.poll_timeout().is_none());
                }
            }
        }
    }
}
