//! Connection tasks: the TLS handshake (one record at a time), the hand-off of the record
//! layer to the kernel when it can take it, then **one task per connection**.
//!
//! ```text
//!  accept/connect ─► handshake (boxed: its buffers and rustls state are freed when it ends)
//!                      ├─ kTLS available + cipher offloadable ─► kernel record layer
//!                      └─ otherwise ─────────────────────────► userspace TlsSession
//!  the task:  wait readable (no buffer held) ─► read into the shard's scratch buffer
//!             ─► (decrypt) ─► Framer ─► Shard::on_message / CRLF pong
//!  output:    Conn::send writes at once from whoever produced it (no task hop);
//!             only what the socket cannot take is queued, and the task flushes it
//!             when the socket is writable
//! ```
//!
//! An idle connection costs its [`Conn`] (one descriptor, no buffers), the task's small
//! future, the pending readiness poll and, in userspace mode, the rustls record state.
//! Deadlines are a per-shard sweep, not a timer per connection: `last_rx` (the last complete
//! message or keepalive: bytes that trickle do not count) for the idle timeout, and
//! `partial_since` (the first byte of a message still incomplete, SIP or TLS record) for the
//! partial-message deadline. The bytes held for incomplete messages are counted per shard
//! against `limits.partial_bytes_per_shard`; past it the largest holder is dropped.
//!
//! Here: the established connection (its record layer, write queue, task loop, close).
//! [`handshake`]: getting there, accepted or dialed. [`records`]: the TLS control records
//! the kernel hands back when it holds the record layer (KeyUpdate, alerts, tickets).

use crate::config::{ClientAuth, ListenKind};
use crate::shard::{Shard, Stamp};
use crate::sys;
use crate::tls::Rejection;
use crate::tls::session::{KernelHandoff, TlsSession};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use sipring_core::policy::Principal;
use sipring_core::proxy::Flow;
use sipring_core::registrar::FlowId;
use sipring_core::{Frame, Framer, KeepaliveRole, Status};
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

mod handshake;
mod records;

use handshake::{Established, LINGER, with_timeout};
pub use handshake::{serve_inbound, spawn_peer_connect};
use records::{Rekey, UNLIMITED_AEAD, ktls_record_budget, on_control_record, rekey_or_close};
pub use sipring_net::handshake::{HandshakeError, drive_handshake, read_first_flight};

/// How the record layer runs after the handshake.
enum Layer {
    /// No TLS (`tcp` listeners).
    Plain,
    /// rustls in userspace.
    User(Box<TlsSession>),
    /// The kernel; rustls keeps only what KeyUpdate and tickets need.
    Kernel(Box<KernelState>),
}

/// What stays in userspace when the kernel does the records.
pub struct KernelState {
    conn: KernelConn,
    suite: rustls::SupportedCipherSuite,
    tls13: bool,
    /// The kernel can take a new TX key on a live socket (TLS 1.3 KeyUpdate; Linux 6.14+).
    can_rekey: bool,
    records_sent: u64,
    /// KeyUpdates from the peer since its last application data.
    peer_key_updates: u32,
    /// Warning alerts from the peer, ignored (see `records::MAX_WARNING_ALERTS`).
    warnings: u8,
    /// A TLS 1.2 renegotiation the peer asked for was refused (the next one ends it).
    renegotiation_refused: bool,
}

enum KernelConn {
    Server(rustls::kernel::KernelConnection<rustls::server::ServerConnectionData>),
    Client(rustls::kernel::KernelConnection<rustls::client::ClientConnectionData>),
}

/// The certificate chain a peer presented, kept while its connection lives so that a reload
/// (a new CRL, a partner removed) and the chain's own expiry reach connections already up.
#[derive(Debug)]
pub struct PeerChain {
    /// End-entity first.
    pub certs: Box<[rustls::pki_types::CertificateDer<'static>]>,
    /// The earliest notAfter in the chain (Unix seconds): past it, the connection is checked
    /// again (and closed if the chain no longer verifies).
    pub expires: Cell<i64>,
    /// The TLS policy generation ([`crate::control::Control::tls_generation`]) it was last
    /// verified under: older than the shard's, it is checked again.
    pub generation: Cell<u64>,
}

impl PeerChain {
    /// `None` for an empty chain (no certificate presented). `generation`: the policy
    /// generation read before the handshake loaded its policy.
    pub fn of(
        chain: &[rustls::pki_types::CertificateDer<'static>],
        generation: u64,
        anchors: &[i64],
    ) -> Option<PeerChain> {
        if chain.is_empty() {
            return None;
        }
        let chain = PeerChain {
            certs: chain.into(),
            expires: Cell::new(i64::MAX),
            generation: Cell::new(generation),
        };
        // From now: a presented certificate webpki did not use, or a partner root, that has
        // lapsed already is no reason to check again at once.
        let now = (crate::cluster::unix_ms() / 1000) as i64;
        chain.expires.set(chain.next_expiry(now, anchors));
        Some(chain)
    }

    /// The earliest notAfter in the chain, or of the partner roots `anchors`, later than
    /// `after` (`i64::MAX`: none). A chain checked at one certificate's expiry is checked
    /// again at the next one's (a presented root webpki does not use may expire before the
    /// certificates that matter); a root that lapses (never presented) is one of them.
    pub fn next_expiry(&self, after: i64, anchors: &[i64]) -> i64 {
        let anchor = anchors
            .iter()
            .copied()
            .find(|&t| t > after)
            .unwrap_or(i64::MAX);
        self.certs
            .iter()
            .filter_map(|c| crate::tls::verify::summarize(c.as_ref()))
            .map(|s| s.not_after)
            .filter(|&t| t > after)
            .min()
            .unwrap_or(i64::MAX)
            .min(anchor)
    }
}

/// Why a connection is closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Open.
    No,
    /// Flush what is queued, send close_notify, shut down.
    Graceful(&'static str),
    /// Shut down now (the peer is gone, or too slow to be waited for).
    Abort(&'static str),
}

/// What one queued write costs beyond its bytes (the entry and its allocation), counted
/// against `limits.write_queue_bytes` so that many small writes cannot hide behind it.
pub(crate) const QUEUED_ENTRY_COST: usize = size_of::<Queued>() + 16;

/// One bytes-on-the-wire chunk the socket could not take at once.
struct Queued {
    bytes: Vec<u8>,
    off: usize,
    stamp: Option<Stamp>,
}

/// The socket and its record layer.
struct Io {
    stream: TcpStream,
    layer: Layer,
    /// Output waiting for the socket to become writable (empty while it keeps up).
    out: VecDeque<Queued>,
    out_bytes: usize,
}

/// How a write attempt ended.
enum Wrote {
    /// All on the wire.
    Done(Option<Stamp>),
    /// Some or all of it queued for the task.
    Queued,
    /// The socket failed.
    Failed,
}

impl Io {
    /// Writes `wire` now if nothing is queued ahead of it; queues what the socket refuses.
    fn write_or_queue(&mut self, wire: Cow<'_, [u8]>, stamp: Option<Stamp>) -> Wrote {
        if wire.is_empty() {
            return Wrote::Done(stamp);
        }
        let mut off = 0;
        if self.out.is_empty() {
            // No waker: the task registers its own when it flushes the queue.
            let mut cx = Context::from_waker(Waker::noop());
            while off < wire.len() {
                match Pin::new(&mut self.stream).poll_write(&mut cx, &wire[off..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        off += n;
                        count_records(&mut self.layer, n);
                    }
                    Poll::Ready(_) => return Wrote::Failed,
                    Poll::Pending => break,
                }
            }
            if off == wire.len() {
                return Wrote::Done(stamp);
            }
        }
        let bytes = match wire {
            Cow::Owned(mut v) if off == 0 => {
                v.shrink_to_fit();
                v
            }
            w => w[off..].to_vec(),
        };
        self.out_bytes += bytes.len() + QUEUED_ENTRY_COST;
        self.out.push_back(Queued {
            bytes,
            off: 0,
            stamp,
        });
        Wrote::Queued
    }

    /// Flushes the queue as far as the socket allows; `Ready(Err)` when the socket failed.
    fn poll_flush(
        &mut self,
        cx: &mut Context<'_>,
        done: &mut impl FnMut(Stamp),
    ) -> Poll<Result<(), ()>> {
        while let Some(front) = self.out.front_mut() {
            match Pin::new(&mut self.stream).poll_write(cx, &front.bytes[front.off..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    front.off += n;
                    self.out_bytes -= n;
                    count_records(&mut self.layer, n);
                    if front.off == front.bytes.len()
                        && let Some(q) = self.out.pop_front()
                    {
                        self.out_bytes -= QUEUED_ENTRY_COST;
                        if let Some(s) = q.stamp {
                            done(s);
                        }
                    }
                }
                Poll::Ready(_) => return Poll::Ready(Err(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Nothing queued: release the queue's memory.
        self.out = VecDeque::new();
        Poll::Ready(Ok(()))
    }

    /// Sends whatever TLS output the userspace session has (alerts, KeyUpdate answers).
    fn push_tls_output(&mut self) -> Wrote {
        let wire = match &mut self.layer {
            Layer::User(s) if s.has_outgoing() => s.take_outgoing(),
            _ => return Wrote::Done(None),
        };
        self.write_or_queue(Cow::Owned(wire), None)
    }

    /// kTLS: past the record budget (or asked by the peer), rekey (TLS 1.3) or retire the
    /// key (TLS 1.2: `Ok(true)`, the connection is to end gracefully after this write);
    /// userspace TLS 1.2 under AES-GCM retires at the same budget. Called before application
    /// data is written. The queue holds plaintext the kernel has not seen, so a KeyUpdate
    /// now precedes it correctly.
    fn maybe_rekey(&mut self, max_records: u64) -> Result<bool, &'static str> {
        let k = match &mut self.layer {
            Layer::Kernel(k) => k,
            // In userspace rustls sends a KeyUpdate itself under TLS 1.3; under TLS 1.2 it
            // refuses to encrypt past the AEAD's limit (2^24 AES-GCM records; ChaCha20 has
            // none), which cut the connection with the message being sent: a busy partner
            // link in userspace (no kernel TLS, `tls.ktls = false`) lost one after ~9 hours
            // at 500 messages a second. It retires at the kernel's budget instead.
            Layer::User(s) => {
                let spent = s.protocol() == Some(rustls::ProtocolVersion::TLSv1_2)
                    && s.cipher_suite().is_some_and(|suite| {
                        let budget = ktls_record_budget(suite);
                        budget < UNLIMITED_AEAD && s.records_sent() >= budget.min(max_records)
                    });
                return Ok(spent);
            }
            Layer::Plain => return Ok(false),
        };
        if k.records_sent < ktls_record_budget(k.suite).min(max_records) {
            return Ok(false);
        }
        // `Later`: the socket is full; records_sent stays over budget and the next write
        // tries again.
        match rekey_or_close(self.stream.as_raw_fd(), k)? {
            Rekey::Done | Rekey::Later => Ok(false),
            Rekey::Retire => Ok(true),
        }
    }
}

/// kTLS: one write of `n` bytes makes at least one record (the kernel does not count for us).
fn count_records(layer: &mut Layer, n: usize) {
    if let Layer::Kernel(k) = layer {
        k.records_sent = k.records_sent.saturating_add((n as u64).div_ceil(1 << 14));
    }
}

/// What woke a connection's task.
enum Event {
    /// Bytes read (the shard's scratch buffer and how much of it is filled); for kTLS,
    /// `Some(type)` when it is a control record.
    Data(Vec<u8>, usize, Option<u8>),
    /// The peer closed (or reset) the connection.
    Eof,
    /// Close, gracefully or not.
    Close(Closing),
    /// Our key is spent and cannot be replaced (TLS 1.2, or no kernel rekey): new requests
    /// are answered 503, what is in progress is answered, then the connection closes
    /// gracefully. Handed to the task once.
    Retire,
}

/// An established connection, shared by its task and its shard's table.
pub struct Conn {
    /// Connection id (its owner shard in the top bits).
    pub id: FlowId,
    /// Listener kind (or `Mtls` for outbound peer connections).
    pub kind: ListenKind,
    /// Who it is: a client (with the AORs its certificate proves) or a verified partner.
    pub principal: Principal,
    /// Remote address.
    pub remote: std::net::SocketAddr,
    /// Whether the record layer runs in the kernel.
    pub ktls: bool,
    /// The `[[listen]]` entry it came through (`None`: our own link to a partner).
    pub listener: Option<usize>,
    /// The chain its peer presented, if any (re-checked on reload and at its expiry).
    pub chain: Option<Box<PeerChain>>,
    /// Our own connection to a partner (we dialled; its certificate is a server's).
    pub outbound: bool,
    io: RefCell<Io>,
    waker: Cell<Option<Waker>>,
    last_rx: Cell<Instant>,
    /// When we last sent it an RFC 5626 ping (links we dialled: [`Conn::ping_if_quiet`]).
    pinged: Cell<Option<Instant>>,
    /// Until when the bindings registered over it last, per AOR, as their owners last said
    /// (the idle sweep keeps it while one does). At most the AORs a connection may register.
    holds: RefCell<Vec<(Box<str>, Instant)>>,
    closing: Cell<Closing>,
    /// Its kernel key is spent ([`Event::Retire`]): what it sends still goes out.
    retiring: Cell<bool>,
    /// Counted in its source's anonymous connections (`Shard::forget_anonymous`).
    pub anonymous_counted: Cell<bool>,
    /// [`Event::Retire`] was handed to its task (once).
    retire_told: Cell<bool>,
    /// When the incomplete message now held began (its first byte), if one is.
    partial_since: Cell<Option<Instant>>,
    /// Bytes held for it (plaintext and undecrypted TLS input).
    partial_len: Cell<usize>,
    /// The other shards that hold state on this connection (bindings it registered, client
    /// transactions sent over it), one bit each: only they hear that it closed.
    involved: Cell<u64>,
    /// Its queued output as last counted in the shard's total (`Shard::queue_changed`).
    queued: Cell<usize>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("remote", &self.remote)
            .field("ktls", &self.ktls)
            .finish()
    }
}

/// Why [`Conn::send`] did not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The connection is closing.
    Closed,
    /// Its queue passed `limits.write_queue_bytes`: it is being dropped as a slow reader.
    SlowReader,
}

impl Conn {
    /// Notes that shard `shard` holds state on this connection. Beyond 64 shards every
    /// shard counts as involved.
    pub fn involve(&self, shard: usize) {
        let bit = if shard < 64 { 1u64 << shard } else { u64::MAX };
        self.involved.set(self.involved.get() | bit);
    }

    /// Whether shard `shard` may hold state on this connection.
    pub fn involves(&self, shard: usize) -> bool {
        let bits = self.involved.get();
        bits == u64::MAX || (shard < 64 && bits & (1u64 << shard) != 0)
    }

    fn new(
        id: FlowId,
        est: Established,
        kind: ListenKind,
        remote: std::net::SocketAddr,
        listener: Option<usize>,
    ) -> Rc<Conn> {
        Rc::new(Conn {
            id,
            kind,
            listener,
            principal: est.principal,
            chain: est.chain.map(Box::new),
            outbound: est.outbound,
            remote,
            ktls: matches!(est.layer, Layer::Kernel(_)),
            io: RefCell::new(Io {
                stream: est.stream,
                layer: est.layer,
                out: VecDeque::new(),
                out_bytes: 0,
            }),
            waker: Cell::new(None),
            last_rx: Cell::new(Instant::now()),
            pinged: Cell::new(None),
            holds: RefCell::new(Vec::new()),
            closing: Cell::new(Closing::No),
            retiring: Cell::new(false),
            anonymous_counted: Cell::new(false),
            retire_told: Cell::new(false),
            partial_since: Cell::new(None),
            partial_len: Cell::new(0),
            involved: Cell::new(0),
            queued: Cell::new(0),
        })
    }

    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Asks the connection to close gracefully (queued output, then close_notify).
    pub fn close(&self, why: &'static str) {
        if self.closing.get() == Closing::No {
            self.closing.set(Closing::Graceful(why));
        }
        self.wake();
    }

    fn abort(&self, why: &'static str) {
        if !matches!(self.closing.get(), Closing::Abort(_)) {
            self.closing.set(Closing::Abort(why));
        }
        self.wake();
    }

    /// Bytes of output it holds queued (as last counted).
    pub fn queued(&self) -> usize {
        self.queued.get()
    }

    /// The shard dropped it for its queue and no longer counts it.
    pub fn forget_queued(&self) {
        self.queued.set(0);
    }

    /// Brings the shard's count of queued output up to date with this connection's queue
    /// (`out_bytes`, or 0 once it is gone); past the shard's budget, the largest holder is
    /// dropped.
    fn account_queue(&self, shard: &Shard, out_bytes: usize) {
        let before = self.queued.replace(out_bytes);
        if before != out_bytes {
            shard.queue_changed(before, out_bytes);
        }
    }

    /// Writes what is queued as far as the socket takes it now, without waiting (for a task
    /// that is not in [`Conn::poll_event`]): a KeyUpdate due first, as there.
    fn flush_now(&self, shard: &Shard) {
        // Closing (the shard's write budget may have dropped it): its queue is no longer
        // counted, and must not be counted again.
        if !self.is_open() {
            return;
        }
        let mut io = self.io.borrow_mut();
        if io.out.is_empty() {
            return;
        }
        let flushed = match io.maybe_rekey(shard.cfg.tls.ktls_max_records) {
            Err(why) => Err(why),
            Ok(retire) => {
                if retire {
                    self.retiring.set(true);
                }
                // No waker: the caller polls again; the task registers its own at its next
                // flush.
                let mut cx = Context::from_waker(Waker::noop());
                match io.poll_flush(&mut cx, &mut |s| record_forward(shard, s)) {
                    Poll::Ready(Err(())) => Err("write_error"),
                    _ => Ok(()),
                }
            }
        };
        let out = io.out_bytes;
        drop(io);
        self.account_queue(shard, out);
        if let Err(why) = flushed {
            self.abort(why);
        }
    }

    /// Not closing yet?
    pub fn is_open(&self) -> bool {
        self.closing.get() == Closing::No
    }

    /// When the last complete message or keepalive arrived (for the shard's idle sweep).
    pub fn last_rx(&self) -> Instant {
        self.last_rx.get()
    }

    /// A link we dialled that received nothing for `quiet`: an RFC 5626 ping (CRLFCRLF),
    /// once per quiet spell; the partner's pong (CRLF) counts as traffic. Without it the idle
    /// sweep closed a healthy link after `limits.idle_timeout_s` of quiet, and the next call
    /// waited for a dial and a handshake; a link whose partner stopped answering still closes
    /// then. Whether a ping went out.
    pub fn ping_if_quiet(&self, shard: &Shard, now: Instant, quiet: Duration) -> bool {
        let since = self.last_rx.get();
        if !self.outbound
            || now.saturating_duration_since(since) < quiet
            || self.pinged.get().is_some_and(|t| t >= since)
        {
            return false;
        }
        self.pinged.set(Some(now));
        self.send(shard, b"\r\n\r\n", None).is_ok()
    }

    /// The bindings of `aor` registered over it last until `until` (`None`: it holds none of
    /// that AOR's any more — unregistered, moved). The idle sweep leaves it open while one
    /// lasts.
    pub fn hold(&self, aor: &str, until: Option<Instant>) {
        let mut h = self.holds.borrow_mut();
        h.retain(|(a, _)| &**a != aor);
        if let Some(t) = until {
            h.push((aor.into(), t));
        }
    }

    /// Until when a binding registered over it lasts, if one does.
    pub fn held_until(&self) -> Option<Instant> {
        self.holds.borrow().iter().map(|(_, t)| *t).max()
    }

    /// When the incomplete message it holds began, if it holds one (the partial deadline).
    pub fn partial_since(&self) -> Option<Instant> {
        self.partial_since.get()
    }

    /// Bytes it holds for an incomplete message.
    pub fn partial_len(&self) -> usize {
        self.partial_len.get()
    }

    /// The shard stopped counting what it holds (it is being dropped for it).
    pub fn forget_partial(&self) {
        self.partial_len.set(0);
        self.partial_since.set(None);
    }

    /// Drops the connection now (a limit it broke; nothing more is sent to it).
    pub fn drop_now(&self, why: &'static str) {
        self.abort(why);
    }

    /// Records how much it holds for an incomplete message (0: none) and keeps the shard's
    /// total; past the shard's budget, the largest holder is dropped.
    ///
    /// `progressed`: this read completed at least one message (a keepalive ping is not
    /// one), so what is held now began with it — a busy connection whose reads all end
    /// mid-message is not a stalled one.
    fn hold_partial(&self, shard: &Shard, held: usize, now: Instant, progressed: bool) {
        let before = self.partial_len.replace(held);
        shard.partial_changed(before, held);
        match (held, self.partial_since.get()) {
            (0, _) => self.partial_since.set(None),
            (_, None) => self.partial_since.set(Some(now)),
            (_, Some(_)) if progressed => self.partial_since.set(Some(now)),
            _ => {}
        }
        if held > before {
            shard.enforce_partial_budget();
        }
    }

    /// Sends one message (or a CRLF pong): encrypted in userspace mode, written at once if
    /// the socket takes it, else queued for the connection's task.
    pub fn send(&self, shard: &Shard, bytes: &[u8], stamp: Option<Stamp>) -> Result<(), SendError> {
        if self.closing.get() != Closing::No {
            return Err(SendError::Closed);
        }
        let mut io = self.io.borrow_mut();
        let retire = match io.maybe_rekey(shard.cfg.tls.ktls_max_records) {
            Ok(r) => r,
            Err(why) => {
                drop(io);
                self.abort(why);
                return Err(SendError::Closed);
            }
        };
        // This message still goes out, and so do the answers to what is in progress; the
        // task then answers new requests 503 and closes gracefully once nothing is in
        // progress ([`Event::Retire`]).
        let retire = || {
            if retire && !self.retiring.replace(true) {
                tracing::info!(
                    conn = self.id,
                    "TLS connection reached its record budget and cannot rekey (TLS 1.2, or a kernel without KeyUpdate); closing gracefully"
                );
                self.wake();
            }
        };
        let wire = match &mut io.layer {
            Layer::User(s) => {
                if s.write(bytes).is_err() {
                    drop(io);
                    self.abort("tls_error");
                    return Err(SendError::Closed);
                }
                Cow::Owned(s.take_outgoing())
            }
            Layer::Kernel(_) | Layer::Plain => Cow::Borrowed(bytes),
        };
        match io.write_or_queue(wire, stamp) {
            Wrote::Done(stamp) => {
                drop(io);
                if let Some(s) = stamp {
                    record_forward(shard, s);
                }
                retire();
                Ok(())
            }
            Wrote::Queued => {
                let out_bytes = io.out_bytes;
                let slow = out_bytes > shard.cfg.limits.write_queue_bytes;
                drop(io);
                self.account_queue(shard, out_bytes);
                if !self.is_open() {
                    // The shard's write budget dropped this very connection.
                    return Err(SendError::SlowReader);
                }
                shard.count("sipring_writes_queued_total");
                if slow {
                    shard.count("sipring_queue_drops_total{queue=\"connection\"}");
                    if let Some(left_out) = shard.conn_log.allow(Instant::now()) {
                        tracing::warn!(
                            conn = self.id,
                            remote = %self.remote,
                            limit = shard.cfg.limits.write_queue_bytes,
                            left_out,
                            "write queue full: closing slow connection (connection closures: at \
                             most one line a second; sipring_queue_drops_total counts all)"
                        );
                    }
                    self.abort("slow_reader");
                    return Err(SendError::SlowReader);
                }
                self.wake();
                retire();
                Ok(())
            }
            Wrote::Failed => {
                drop(io);
                self.abort("write_error");
                Err(SendError::Closed)
            }
        }
    }

    /// The task's wait: flushes queued output, then reads into the shard's scratch buffer.
    /// No buffer is held while pending (only the readiness poll).
    fn poll_event(&self, cx: &mut Context<'_>, shard: &Shard) -> Poll<Event> {
        if let c @ (Closing::Graceful(_) | Closing::Abort(_)) = self.closing.get() {
            return Poll::Ready(Event::Close(c));
        }
        if self.retiring.get() && !self.retire_told.replace(true) {
            return Poll::Ready(Event::Retire);
        }
        let mut io = self.io.borrow_mut();
        if !io.out.is_empty() {
            match io.maybe_rekey(shard.cfg.tls.ktls_max_records) {
                Ok(false) => {}
                // The close sequence flushes what is queued, then close_notify.
                Ok(true) => {
                    self.retiring.set(true);
                    if !self.retire_told.replace(true) {
                        return Poll::Ready(Event::Retire);
                    }
                }
                Err(why) => return Poll::Ready(Event::Close(Closing::Abort(why))),
            }
            let flushed = io.poll_flush(cx, &mut |s| record_forward(shard, s));
            self.account_queue(shard, io.out_bytes);
            if let Poll::Ready(Err(())) = flushed {
                return Poll::Ready(Event::Close(Closing::Abort("write_error")));
            }
        }
        let mut scratch = shard.take_read_buf();
        // recvmsg found nothing after read said a control record waits: a few tries, not a
        // spin.
        let mut dry = 0;
        loop {
            match Pin::new(&mut io.stream).poll_read(cx, &mut scratch) {
                Poll::Ready(Ok(0)) => {
                    shard.give_read_buf(scratch);
                    return Poll::Ready(Event::Eof);
                }
                Poll::Ready(Ok(n)) => return Poll::Ready(Event::Data(scratch, n, None)),
                // kTLS hands a non-data record up as EIO (EKEYEXPIRED after a KeyUpdate on
                // kernels ≥ 6.14): recvmsg with room for its record type.
                Poll::Ready(Err(e))
                    if matches!(io.layer, Layer::Kernel(_))
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EIO) | Some(libc::EKEYEXPIRED)
                        ) =>
                {
                    match sys::ktls::recv_record(io.stream.as_raw_fd(), &mut scratch) {
                        Ok(Some((typ, len))) if typ == sys::ktls::content::APPLICATION_DATA => {
                            return Poll::Ready(Event::Data(scratch, len, None));
                        }
                        Ok(Some((typ, len))) => {
                            return Poll::Ready(Event::Data(scratch, len, Some(typ)));
                        }
                        Ok(None) if dry < 4 => {
                            dry += 1;
                            continue;
                        }
                        Ok(None) => {
                            shard.give_read_buf(scratch);
                            shard.count("sipring_ktls_closes_total{reason=\"kernel_read\"}");
                            if let Some(left_out) = shard.conn_log.allow(Instant::now()) {
                                tracing::warn!(
                                    conn = self.id,
                                    left_out,
                                    "the kernel announced a TLS control record and handed none up: closing (connection closures: at most one line a second)"
                                );
                            }
                            return Poll::Ready(Event::Close(Closing::Abort("kernel_read")));
                        }
                        Err(e) => {
                            shard.give_read_buf(scratch);
                            return Poll::Ready(kernel_read_failed(shard, self, &e));
                        }
                    }
                }
                Poll::Ready(Err(e)) if matches!(io.layer, Layer::Kernel(_)) => {
                    shard.give_read_buf(scratch);
                    return Poll::Ready(kernel_read_failed(shard, self, &e));
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(conn = self.id, error = %e, "read failed");
                    shard.give_read_buf(scratch);
                    return Poll::Ready(Event::Eof);
                }
                Poll::Pending => {
                    shard.give_read_buf(scratch);
                    self.waker.set(Some(cx.waker().clone()));
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Nothing more is read (stream framing is lost, or the peer ended its side with FIN or
/// close_notify, as a client that sends its requests and then half-closes does), but the
/// requests that came before get their answers (the registrar may be on another shard) —
/// for at most [`FRAMING_DRAIN`] — then the connection closes gracefully, its queued
/// output flushed. Before, a peer's FIN aborted at once and a close_notify failed its
/// transactions: answers still being made were lost.
async fn finish_in_progress(
    shard: &Rc<Shard>,
    conn: &Conn,
    flow: &Flow,
    why: &'static str,
) -> Closing {
    // A link we dialled (a partner, a node) is not waited for: its requests in progress are
    // answered over the link dialled anew (or abandoned with it), and until `peer_down` runs
    // new requests for the partner would be written into this closed socket.
    if matches!(flow, Flow::Peer(_)) {
        return Closing::Graceful(why);
    }
    let deadline = Instant::now() + FRAMING_DRAIN;
    while shard.proxy.borrow().in_progress_on(flow) > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
        // What is queued goes out meanwhile (the task flushes in `poll_event` only): the
        // answers waited for here queue behind it, and reached the peer only at the close
        // (up to 2 s late), or passed the write cap and closed the connection as a slow
        // reader, everything queued lost.
        conn.flush_now(shard);
        // Closed meanwhile (stopping, the idle sweep, a revoked certificate, a slow reader):
        // nothing more would be sent anyway.
        if conn.closing.get() != Closing::No {
            break;
        }
    }
    Closing::Graceful(why)
}

/// What a connection holds of an incomplete message, for the partial deadline and budget.
/// A lone CRLF is none: the framer keeps it to see whether a second one makes it an RFC 5626
/// ping, but a client that sends single CRLFs as keepalives (RFC 3261 §7.5: ignored before
/// a start line) is not stalled mid-message — it was cut after `limits.partial_timeout_ms`.
/// Such a CRLF keeps the connection alive, as a ping does.
fn held(conn: &Conn, partial: &[u8], now: Instant) -> usize {
    if !partial.is_empty()
        && partial.len() <= 3
        && partial.iter().all(|&b| b == b'\r' || b == b'\n')
    {
        conn.last_rx.set(now);
        return 0;
    }
    partial.len()
}

/// A kTLS read that failed: a record that does not decrypt (EBADMSG: corrupted or forged on
/// the path; the kernel has failed the socket) ends the connection at once, counted and
/// logged (it read as the peer closing before); any other error is the peer gone.
fn kernel_read_failed(shard: &Shard, conn: &Conn, e: &std::io::Error) -> Event {
    if e.raw_os_error() != Some(libc::EBADMSG) {
        tracing::debug!(conn = conn.id, error = %e, "read failed");
        return Event::Eof;
    }
    shard.count("sipring_ktls_closes_total{reason=\"bad_record\"}");
    if let Some(left_out) = shard.conn_log.allow(Instant::now()) {
        tracing::warn!(
            conn = conn.id,
            remote = %conn.remote,
            left_out,
            "a TLS record from the peer failed authentication in the kernel (corrupted or \
             forged on the path): closing (connection closures: at most one line a second; \
             sipring_ktls_closes_total counts all)"
        );
    }
    Event::Close(Closing::Abort("bad_record"))
}

/// Reads (or control records) a connection handles in a row without its socket running dry
/// before its task yields the shard to the others.
const READY_IN_A_ROW: u32 = 16;

/// How long a connection whose framing is lost waits for the answers to what it sent before.
const FRAMING_DRAIN: Duration = Duration::from_secs(2);

/// How long nothing a connection whose key is spent received must have been in progress
/// before it closes (within [`FRAMING_DRAIN`]): the ACK of a 2xx it just carried comes a
/// round trip later (lost, the callee's 2xx goes unacknowledged and the call ends).
const RETIRE_QUIET: Duration = Duration::from_millis(500);

/// How often a connection whose key is spent looks again at what is in progress on it.
const RETIRE_POLL: Duration = Duration::from_millis(50);

/// Records a forwarded message's latency (first byte read → last byte written).
fn record_forward(shard: &Shard, s: Stamp) {
    shard.metrics.borrow_mut().record(
        crate::labels::forward_name(s.label),
        s.t0.elapsed().as_micros() as u64,
    );
}

/// Runs an established connection until it closes: reads, frames, dispatches; then the
/// close sequence.
async fn established(shard: Rc<Shard>, conn: Rc<Conn>, flow: Flow, role: KeepaliveRole) {
    shard.conn_opened(conn.clone());
    if let Flow::Peer(name) = &flow {
        shard.peer_up(name, conn.id);
    }
    if shard.control.stopping() {
        conn.close("stopping");
    }
    let mut framer = Framer::new(shard.cfg.sip_limits(), role);
    let mut partial: Vec<u8> = Vec::new();
    // Events in a row that came without waiting (see READY_IN_A_ROW).
    let mut ready_in_a_row = 0u32;
    // Its key spent ([`Event::Retire`]): until when it waits for what is in progress, and
    // since when nothing was.
    let mut retiring_until: Option<Instant> = None;
    let mut quiet_since: Option<Instant> = None;
    // A link we dialled whose key is spent: new messages go over a link dialled anew, and
    // the shard keeps the requests that went out on it and await their answers.
    let mut retired = false;
    let closing = 'conn: loop {
        if let Some(until) = retiring_until {
            let now = Instant::now();
            let busy = if retired {
                shard.retired_link_waits(conn.id)
            } else {
                shard.proxy.borrow().in_progress_on(&flow) > 0
            };
            if busy {
                quiet_since = None;
            } else if quiet_since.is_none() {
                quiet_since = Some(now);
            }
            if now >= until || quiet_since.is_some_and(|t| now - t >= RETIRE_QUIET) {
                break Closing::Graceful("record_budget");
            }
        }
        let mut waited = false;
        let wait = std::future::poll_fn(|cx| {
            let p = conn.poll_event(cx, &shard);
            waited |= p.is_pending();
            p
        });
        let ev = match retiring_until {
            None => wait.await,
            // Looked at again every RETIRE_POLL for the end of what is in progress (a read
            // replaces its waker: nothing piles up while raced).
            Some(_) => match with_timeout(RETIRE_POLL, wait).await {
                Some(ev) => ev,
                None => continue,
            },
        };
        if waited {
            ready_in_a_row = 0;
        } else {
            ready_in_a_row += 1;
            if ready_in_a_row == READY_IN_A_ROW {
                // A peer whose socket never runs dry (every read fills the buffer, or a
                // stream of small control records) would otherwise keep this task running
                // for as long as it sends: the other connections, the timers and the mesh
                // of the shard wait. Give them a turn.
                ready_in_a_row = 0;
                futures_lite::future::yield_now().await;
            }
        }
        let (scratch, n, control) = match ev {
            Event::Close(c) => break c,
            Event::Eof => break finish_in_progress(&shard, &conn, &flow, "peer_closed").await,
            // Only our key is spent: the connection keeps reading, for at most
            // FRAMING_DRAIN, until what its peer sent is answered and RETIRE_QUIET has
            // passed with nothing (the ACK of a 2xx just sent comes a round trip later);
            // a client's new requests are answered 503 with Retry-After so it sends them
            // on another connection, in-dialog ones and responses pass; then it closes
            // gracefully. Before, reading stopped at once, and what the peer sent meanwhile
            // was discarded at the close (its INVITEs failed 32 s later). Calls ringing at
            // the peer are not waited for (a partner's are answered over our link once it
            // closes; those of other shards are not counted here).
            //
            // A link we dialled is replaced at once (new messages for the partner go over
            // a link dialled now) and kept, reading, until what went out on it is
            // answered — at most `registrar.max_ring_s` and 64·T1, the longest an INVITE
            // branch lasts.
            // Before, it closed at once and those requests failed (503; upstream 500).
            Event::Retire => {
                if let Flow::Peer(name) = &flow {
                    shard.retire_peer_link(name, conn.id);
                    retired = true;
                    let longest = Duration::from_secs(shard.cfg.registrar.max_ring_s)
                        + Duration::from_secs(32);
                    retiring_until = Some(Instant::now() + longest);
                    continue;
                }
                shard.proxy.borrow_mut().set_flow_draining(&flow);
                retiring_until = Some(Instant::now() + FRAMING_DRAIN);
                continue;
            }
            Event::Data(scratch, n, control) => (scratch, n, control),
        };
        let t0 = Instant::now();
        if let Some(typ) = control {
            let r = on_control_record(&conn, typ, &scratch[..n]);
            shard.give_read_buf(scratch);
            match r {
                Ok(()) => continue,
                Err(why) => {
                    shard.count(&format!("sipring_ktls_closes_total{{reason=\"{why}\"}}"));
                    if matches!(why, "close_notify" | "alert") {
                        tracing::debug!(conn = conn.id, why, "kTLS connection ends");
                    } else if let Some(left_out) = shard.conn_log.allow(Instant::now()) {
                        tracing::warn!(
                            conn = conn.id,
                            remote = %conn.remote,
                            why,
                            left_out,
                            "closing a kTLS connection for a TLS record its peer sent (connection \
                             closures: at most one line a second; sipring_ktls_closes_total counts all)"
                        );
                    }
                    if why == "close_notify" {
                        break finish_in_progress(&shard, &conn, &flow, why).await;
                    }
                    // Our TX key may be half switched (our KeyUpdate sent, the new key not
                    // taken): what we would flush, close_notify included, the peer could
                    // not read.
                    if why == "key_update" {
                        break Closing::Abort(why);
                    }
                    break Closing::Graceful(why);
                }
            }
        }
        let mut peer_closed = false;
        let mut tls_failed = false;
        // The connection's state is borrowed only inside this block (never across an await).
        let framing_lost = 'read: {
            let mut io = conn.io.borrow_mut();
            if let Layer::Kernel(k) = &mut io.layer {
                k.peer_key_updates = 0;
            }
            if let Layer::User(s) = &mut io.layer {
                if let Err(e) = s.receive(&scratch[..n]) {
                    if let Some(left_out) = shard.conn_log.allow(Instant::now()) {
                        tracing::info!(conn = conn.id, error = %e, left_out, "TLS error on established connection (connection closures: at most one line a second)");
                    }
                    // What the records before the bad one carried is delivered first, as
                    // the kernel's record layer would.
                    tls_failed = true;
                }
                let pt = std::mem::take(s.plaintext());
                peer_closed = s.phase() == crate::tls::session::Phase::PeerClosed;
                shard.give_read_buf(scratch);
                if partial.is_empty() {
                    partial = pt;
                } else {
                    partial.extend_from_slice(&pt);
                }
                if let Wrote::Failed = io.push_tls_output() {
                    drop(io);
                    break 'conn Closing::Abort("write_error");
                }
                drop(io);
            } else {
                drop(io);
                if partial.is_empty() {
                    // Frame straight from the scratch buffer; keep only an incomplete tail.
                    let r = deliver(&shard, &conn, &mut framer, &scratch[..n], &flow, t0);
                    if let Ok((used, _)) = r {
                        partial.extend_from_slice(&scratch[used..n]);
                    }
                    shard.give_read_buf(scratch);
                    let Ok((_, progressed)) = r else {
                        break 'read true;
                    };
                    conn.hold_partial(&shard, held(&conn, &partial, t0), t0, progressed);
                    continue 'conn;
                }
                partial.extend_from_slice(&scratch[..n]);
                shard.give_read_buf(scratch);
            }
            false
        };
        if framing_lost {
            break finish_in_progress(&shard, &conn, &flow, "framing_lost").await;
        }
        let progressed = match deliver(&shard, &conn, &mut framer, &partial, &flow, t0) {
            Ok((used, message)) => {
                partial.drain(..used);
                message
            }
            Err(()) => break finish_in_progress(&shard, &conn, &flow, "framing_lost").await,
        };
        if partial.is_empty() {
            // Nothing partial is waiting: an idle connection keeps no buffer.
            partial = Vec::new();
        } else if partial.capacity() > 2 * partial.len() + 4096 {
            // What is counted against the partial budget is what is held: a 64 KiB read
            // followed by one byte must not keep 64 KiB behind a 1-byte count.
            partial.shrink_to(partial.len() + 1024);
        }
        let tls_held = match &conn.io.borrow().layer {
            Layer::User(s) => s.buffered_incoming(),
            _ => 0,
        };
        conn.hold_partial(&shard, held(&conn, &partial, t0) + tls_held, t0, progressed);
        if tls_failed {
            break Closing::Graceful("tls_error");
        }
        if peer_closed {
            // Answer close_notify with ours after delivering what came before it, and
            // answering it.
            break finish_in_progress(&shard, &conn, &flow, "close_notify").await;
        }
    };
    drop(partial);
    conn.hold_partial(&shard, 0, Instant::now(), false);
    // An abort decided meanwhile (a slow reader dropped while delivering) wins over a
    // graceful close: there is no point flushing to it.
    let closing = match conn.closing.get() {
        c @ Closing::Abort(_) => c,
        _ => closing,
    };
    shard.conn_closed(conn.id);
    if let Flow::Peer(name) = &flow {
        if retired {
            // Already replaced: what is still unanswered on it fails.
            shard.retired_peer_link_closed(conn.id);
        } else {
            // At once, not after the close sequence: messages for the partner meanwhile
            // start a new link instead of being dropped as sent to a connection that is
            // gone.
            shard.peer_down(name);
        }
    }
    // Counted until the close sequence ends, so a stopping shard waits for it.
    shard.closing.set(shard.closing.get() + 1);
    // Boxed: the close sequence's timer is only paid for while closing.
    Box::pin(close(&shard, &conn, closing)).await;
    shard.closing.set(shard.closing.get() - 1);
}

/// The close sequence: graceful (queued output, close_notify, within 2 s) or abrupt; then
/// shutdown. The descriptor closes when the last `Rc<Conn>` goes.
async fn close(shard: &Shard, conn: &Conn, closing: Closing) {
    conn.closing.set(closing);
    // Out of the shard's table, its queue leaves the shard's write budget too (it is freed
    // within the 2 s flush at most): bytes the budget could no longer reclaim by dropping
    // their holder would make it drop every open connection that queued anything.
    conn.account_queue(shard, 0);
    tracing::debug!(conn = conn.id, ?closing, "connection closing");
    if let Closing::Graceful(_) = closing {
        {
            let mut io = conn.io.borrow_mut();
            if let Layer::User(s) = &mut io.layer {
                let _ = s.close();
                let _ = io.push_tls_output();
            }
        }
        let flushed = with_timeout(
            Duration::from_secs(2),
            std::future::poll_fn(|cx| {
                conn.io
                    .borrow_mut()
                    .poll_flush(cx, &mut |s| record_forward(shard, s))
            }),
        )
        .await;
        {
            let io = conn.io.borrow();
            let fd = io.stream.as_raw_fd();
            if let (Some(Ok(())), Layer::Kernel(_)) = (flushed, &io.layer) {
                let _ = sys::ktls::send_close_notify(fd);
            }
            let _ = sys::sock::shutdown(fd, std::net::Shutdown::Write);
        }
        let _ = with_timeout(
            LINGER,
            std::future::poll_fn(|cx| drain(cx, shard, &mut conn.io.borrow_mut().stream)),
        )
        .await;
    }
    let _ = sys::sock::shutdown(
        conn.io.borrow().stream.as_raw_fd(),
        std::net::Shutdown::Both,
    );
    // What was never sent goes now, not when the last handle to the connection does.
    {
        let mut io = conn.io.borrow_mut();
        io.out = VecDeque::new();
        io.out_bytes = 0;
    }
    conn.account_queue(shard, 0);
}

/// Reads and discards until the peer's end of stream (or an error), for [`LINGER`]; no
/// buffer held while waiting.
fn drain(cx: &mut Context<'_>, shard: &Shard, stream: &mut TcpStream) -> Poll<()> {
    let mut scratch = shard.take_read_buf();
    let mut reads = 0;
    let r = loop {
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch) {
            // A peer that keeps sending must not hold the shard: yield every 16 reads so
            // the timer bounding the drain (and everything else) runs.
            Poll::Ready(Ok(n)) if n > 0 && reads == 16 => {
                cx.waker().wake_by_ref();
                break Poll::Pending;
            }
            Poll::Ready(Ok(n)) if n > 0 => reads += 1,
            Poll::Ready(_) => break Poll::Ready(()),
            Poll::Pending => break Poll::Pending,
        }
    };
    shard.give_read_buf(scratch);
    r
}

/// Frames and dispatches everything complete in `buf`; `Ok((bytes used, whether a message
/// was among them))` — keepalive pings are not progress on a message — or `Err` when
/// framing is lost (an error response is sent first where one can be).
fn deliver(
    shard: &Rc<Shard>,
    conn: &Conn,
    framer: &mut Framer,
    buf: &[u8],
    flow: &Flow,
    t0: Instant,
) -> Result<(usize, bool), ()> {
    let mut start = 0;
    let mut message = false;
    // RFC 5626 keepalives: however many pings one read held, one pong answers them (a
    // flood of pings must not become a flood of writes, or a queue of two-byte entries).
    let mut ping = false;
    let pong = |ping: bool| {
        if ping {
            let _ = conn.send(shard, b"\r\n", None);
        }
    };
    loop {
        match framer.frame(&buf[start..]) {
            // Closing (a slow reader dropped, the partial budget, a revoked certificate,
            // decided while this read was delivered): what it pipelined behind is not
            // served — its answers could not go out, and nobody would cancel its branches.
            Ok(Status::Complete(Frame::Message(_))) if !conn.is_open() => {
                pong(ping);
                return Ok((buf.len(), message));
            }
            Ok(Status::Complete(Frame::Message(n))) => {
                conn.last_rx.set(t0);
                shard.on_message(flow, &buf[start..start + n], t0);
                start += n;
                message = true;
            }
            Ok(Status::Complete(Frame::Ping)) => {
                // RFC 5626 keepalive: activity. Lone CRLFs are not (but for the pong to a
                // ping of ours).
                conn.last_rx.set(t0);
                ping = true;
                start += 4;
            }
            Ok(Status::Complete(Frame::Pong)) => {
                // On a link we dialled, the answer to our ping ([`Conn::ping_if_quiet`]).
                if conn.outbound {
                    conn.last_rx.set(t0);
                }
                start += 2;
            }
            Ok(Status::Partial) => {
                pong(ping);
                return Ok((start, message));
            }
            Err(e) => {
                pong(ping);
                shard.count(&format!(
                    "sipring_parse_errors_total{{reason=\"{}\"}}",
                    e.label()
                ));
                if let Some(left_out) = shard.conn_log.allow(Instant::now()) {
                    tracing::warn!(conn = conn.id, remote = %conn.remote, error = %e, left_out, "stream framing lost; closing connection (connection closures: at most one line a second; sipring_parse_errors_total counts all)");
                }
                if let Some(resp) =
                    sipring_core::response::error_response(&buf[start..], e, b"sr-framing")
                {
                    let _ = conn.send(shard, &resp, None);
                }
                return Err(());
            }
        }
    }
}
