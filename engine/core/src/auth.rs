//! Digest authentication of SIP requests (RFC 3261 §22, RFC 8760 algorithms, RFC 7616
//! nonces), sans-IO: the caller gives the time, the flow and the credentials header; the
//! [`Authenticator`] answers who it is, or what challenge to send.
//!
//! ```text
//!  request ─► Authorization / Proxy-Authorization for one of our realms?
//!               │ no ──────────────────────────────► Challenge { stale: false }
//!               ▼ parse (Digest, qop=auth, nc, cnonce, uri = Request-URI)
//!             subscriber (CredentialStore) and its HA1 for the algorithm
//!               │ unknown, or wrong response ─────► failure counted ─► Challenge
//!               ▼ response right
//!             nonce: our HMAC for *this flow*, not expired, nc never seen on it
//!               │ no ──────────────────────────────► Challenge { stale: true }
//!               ▼
//!             Authenticated(subscriber)
//! ```
//!
//! **Stateless nonces.** A nonce is the time it was made and an HMAC (SHA-256, with a key
//! only this node holds) over that time, the flow (connection) it was made for and the realm.
//! Nothing is stored when a challenge goes out. A nonce is accepted only on the connection
//! it was issued on, for [`AuthConfig::nonce_ttl`]; after that the answer is a challenge with
//! `stale=true`, which a UA answers without asking its user again.
//!
//! **Replays.** Because a nonce belongs to one flow, the nonce-counts seen are kept per flow
//! (the few newest nonces, each with a 64-wide window of `nc` values) and dropped with the
//! flow: the state is bounded by the connection limits, not by what peers send.
//!
//! **Failures.** Wrong passwords, unknown users, replays and malformed credentials are
//! counted per source — an IPv4 address, an IPv6 /64 (what one host can draw addresses
//! from) — in a [`FailureLedger`] that every shard of a process shares; past
//! [`AuthConfig::max_failures`] within [`AuthConfig::failure_window`] the source is refused
//! ([`Verdict::Blocked`]) for [`AuthConfig::block`] without any credential being checked,
//! on every shard. The ledger is a fixed table of atomic counters (no lock, no growth).
//!
//! Credentials are HA1 hashes per realm and algorithm ([`Subscriber`]); plaintext passwords
//! never reach this module except through [`Algorithm::ha1`], which makes those hashes.

use crate::text::{eq_ic, is_lws, is_token};
use hmac::{KeyInit, Mac};
use sha2::Digest;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A digest algorithm (RFC 8760 §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// `MD5` (RFC 2617): only for old phones, and only where configured.
    Md5,
    /// `SHA-256`.
    Sha256,
    /// `SHA-512-256` (SHA-512/256).
    Sha512_256,
}

impl Algorithm {
    /// Every algorithm, strongest first.
    pub const ALL: [Algorithm; 3] = [Algorithm::Sha512_256, Algorithm::Sha256, Algorithm::Md5];

    /// The name used in `algorithm=` and in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Sha512_256 => "SHA-512-256",
        }
    }

    /// Parses an `algorithm=` value (case-insensitive). The `-sess` variants are not
    /// supported.
    pub fn from_name(s: &[u8]) -> Option<Algorithm> {
        Algorithm::ALL
            .into_iter()
            .find(|a| eq_ic(a.name().as_bytes(), s))
    }

    /// `H(p1:p2:…)` as lower-case hex.
    pub fn hex(self, parts: &[&[u8]]) -> String {
        String::from_utf8(self.hex_buf(parts).as_bytes().to_vec()).expect("hex is ASCII")
    }

    /// [`Algorithm::hex`] without allocating (the verification path).
    fn hex_buf(self, parts: &[&[u8]]) -> HexBuf {
        fn run<D: Digest>(parts: &[&[u8]]) -> HexBuf {
            let mut d = D::new();
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    d.update(b":");
                }
                d.update(p);
            }
            HexBuf::of(&d.finalize())
        }
        match self {
            Algorithm::Md5 => run::<md5::Md5>(parts),
            Algorithm::Sha256 => run::<sha2::Sha256>(parts),
            Algorithm::Sha512_256 => run::<sha2::Sha512_256>(parts),
        }
    }

    /// `HA1 = H(username:realm:password)`: what a subscriber file stores instead of the
    /// password.
    pub fn ha1(self, username: &str, realm: &str, password: &str) -> String {
        self.hex(&[username.as_bytes(), realm.as_bytes(), password.as_bytes()])
    }

    /// The `response` a UA computes (RFC 7616 §3.4.1, `qop=auth`).
    #[allow(clippy::too_many_arguments)] // the RFC's inputs, one each
    pub fn response(
        self,
        ha1: &str,
        nonce: &[u8],
        nc: &[u8],
        cnonce: &[u8],
        qop: &[u8],
        method: &[u8],
        uri: &[u8],
    ) -> String {
        String::from_utf8(
            self.response_buf(ha1, nonce, nc, cnonce, qop, method, uri)
                .as_bytes()
                .to_vec(),
        )
        .expect("hex is ASCII")
    }

    #[allow(clippy::too_many_arguments)] // see `response`
    fn response_buf(
        self,
        ha1: &str,
        nonce: &[u8],
        nc: &[u8],
        cnonce: &[u8],
        qop: &[u8],
        method: &[u8],
        uri: &[u8],
    ) -> HexBuf {
        let ha2 = self.hex_buf(&[method, uri]);
        self.hex_buf(&[ha1.as_bytes(), nonce, nc, cnonce, qop, ha2.as_bytes()])
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A digest (at most 32 bytes here) as lower-case hex, on the stack.
struct HexBuf {
    buf: [u8; 64],
    len: usize,
}

impl HexBuf {
    fn of(b: &[u8]) -> HexBuf {
        const D: &[u8; 16] = b"0123456789abcdef";
        let mut h = HexBuf {
            buf: [0; 64],
            len: (b.len() * 2).min(64),
        };
        for (i, &x) in b.iter().take(32).enumerate() {
            h.buf[2 * i] = D[usize::from(x >> 4)];
            h.buf[2 * i + 1] = D[usize::from(x & 15)];
        }
        h
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(D[usize::from(x >> 4)] as char);
        s.push(D[usize::from(x & 15)] as char);
    }
    s
}

/// Decodes exactly `N` bytes of hex.
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let d = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
    let mut out = [0u8; N];
    for (o, p) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = d(p[0])? << 4 | d(p[1])?;
    }
    Some(out)
}

/// Constant-time equality (the comparison must not tell how much of a guess was right).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// [`ct_eq`], ASCII case-insensitive on the second argument (a peer may send hex in upper
/// case).
fn ct_eq_lower(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y.to_ascii_lowercase()))
            == 0
}

/// One subscriber: who it is, which addresses-of-record it may use, and its HA1 hashes.
#[derive(Clone, PartialEq, Eq)]
pub struct Subscriber {
    /// The digest user name.
    pub username: String,
    /// The realm (normally one of our SIP domains).
    pub realm: String,
    /// The canonical AORs (`sip:user@domain`, as [`crate::registrar::aor_of`] writes them)
    /// this identity may register and send as. The one asserted (P-Asserted-Identity) is
    /// the request's From; for an anonymous From, the one a P-Preferred-Identity names,
    /// else the first of our domains. Default: `sip:<username>@<realm>`.
    pub aors: Vec<String>,
    /// HA1 per algorithm, lower-case hex.
    pub ha1: Vec<(Algorithm, String)>,
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // HA1s are password equivalents: never in logs.
        f.debug_struct("Subscriber")
            .field("username", &self.username)
            .field("realm", &self.realm)
            .field("aors", &self.aors)
            .field(
                "ha1",
                &self.ha1.iter().map(|(a, _)| a.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Subscriber {
    /// The HA1 for `alg`, if the subscriber has one.
    pub fn ha1_for(&self, alg: Algorithm) -> Option<&str> {
        self.ha1
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, h)| h.as_str())
    }
}

/// Where subscribers come from: a file today (the engine's table), the cluster store later.
/// Called on the message path: an implementation must answer from memory, without blocking.
pub trait CredentialStore {
    /// The subscriber `username` in `realm`.
    fn subscriber(&self, username: &str, realm: &str) -> Option<Arc<Subscriber>>;
}

/// An in-memory subscriber table: realm (lower case), then user name.
#[derive(Debug, Default, Clone)]
pub struct SubscriberTable {
    realms: HashMap<String, HashMap<String, Arc<Subscriber>>>,
    len: usize,
}

impl SubscriberTable {
    /// Adds (or replaces) a subscriber.
    pub fn insert(&mut self, s: Subscriber) {
        let users = self.realms.entry(s.realm.to_ascii_lowercase()).or_default();
        if users.insert(s.username.clone(), Arc::new(s)).is_none() {
            self.len += 1;
        }
    }

    /// Adds (or replaces) every subscriber of `other`.
    pub fn extend(&mut self, other: SubscriberTable) {
        for (realm, users) in other.realms {
            let mine = self.realms.entry(realm).or_default();
            for (name, s) in users {
                if mine.insert(name, s).is_none() {
                    self.len += 1;
                }
            }
        }
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is it empty?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CredentialStore for SubscriberTable {
    fn subscriber(&self, username: &str, realm: &str) -> Option<Arc<Subscriber>> {
        // Realms compare case-insensitively (they are our domain names); user names exactly.
        let users = match self.realms.get(realm) {
            Some(u) => u,
            None if realm.bytes().any(|b| b.is_ascii_uppercase()) => {
                self.realms.get(&realm.to_ascii_lowercase())?
            }
            None => return None,
        };
        users.get(username).cloned()
    }
}

/// `Digest` credentials from an `Authorization` or `Proxy-Authorization` value, borrowed from
/// the message (a value is copied only when it holds a quoted-pair escape).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials<'a> {
    /// `username`.
    pub username: Cow<'a, str>,
    /// `realm`.
    pub realm: Cow<'a, str>,
    /// `nonce`.
    pub nonce: Cow<'a, str>,
    /// `uri` (the digest-uri).
    pub uri: Cow<'a, str>,
    /// `response`.
    pub response: Cow<'a, str>,
    /// `algorithm` (absent means MD5, RFC 2617).
    pub algorithm: Option<Cow<'a, str>>,
    /// `cnonce`.
    pub cnonce: Option<Cow<'a, str>>,
    /// `qop`.
    pub qop: Option<Cow<'a, str>>,
    /// `nc`, as written (8 hex digits).
    pub nc: Option<Cow<'a, str>>,
}

/// Parses `Digest k=v, k="v", …` (RFC 3261 §25.1 `credentials`). `None` for another scheme
/// or a malformed list; unknown parameters are ignored.
pub fn parse_credentials(value: &[u8]) -> Option<Credentials<'_>> {
    let v = value;
    let mut i = v.iter().position(|&b| !is_lws(b))?;
    let scheme_end = i + v[i..]
        .iter()
        .position(|&b| !is_token(b))
        .unwrap_or(v.len() - i);
    if !eq_ic(&v[i..scheme_end], b"Digest") {
        return None;
    }
    i = scheme_end;
    let mut c = Credentials::default();
    let mut have = 0u16;
    loop {
        while i < v.len() && (is_lws(v[i]) || v[i] == b',') {
            i += 1;
        }
        if i >= v.len() {
            break;
        }
        let ks = i;
        while i < v.len() && is_token(v[i]) {
            i += 1;
        }
        let key = &v[ks..i];
        if key.is_empty() {
            return None;
        }
        while i < v.len() && is_lws(v[i]) {
            i += 1;
        }
        if v.get(i) != Some(&b'=') {
            return None;
        }
        i += 1;
        while i < v.len() && is_lws(v[i]) {
            i += 1;
        }
        let val: Cow<'_, str> = if v.get(i) == Some(&b'"') {
            i += 1;
            let s = i;
            let mut escaped = false;
            loop {
                match *v.get(i)? {
                    b'\\' => {
                        v.get(i + 1)?;
                        escaped = true;
                        i += 2;
                    }
                    b'"' => break,
                    _ => i += 1,
                }
            }
            let raw = &v[s..i];
            i += 1;
            if escaped {
                let mut out = Vec::with_capacity(raw.len());
                let mut j = 0;
                while j < raw.len() {
                    if raw[j] == b'\\' {
                        j += 1;
                    }
                    out.push(raw[j]);
                    j += 1;
                }
                Cow::Owned(String::from_utf8(out).ok()?)
            } else {
                Cow::Borrowed(std::str::from_utf8(raw).ok()?)
            }
        } else {
            let s = i;
            while i < v.len() && is_token(v[i]) {
                i += 1;
            }
            if s == i {
                return None;
            }
            Cow::Borrowed(std::str::from_utf8(&v[s..i]).ok()?)
        };
        let k = |n: &str| eq_ic(key, n.as_bytes());
        // A parameter given twice is malformed (RFC 7616 §3.4 lists each once): which one a
        // parser downstream reads (the first, the last) is its own choice, and ours must
        // not be the other.
        let once = |have: &mut u16, bit: u16| {
            let again = *have & bit != 0;
            *have |= bit;
            (!again).then_some(())
        };
        if k("username") {
            once(&mut have, 1)?;
            c.username = val;
        } else if k("realm") {
            once(&mut have, 2)?;
            c.realm = val;
        } else if k("nonce") {
            once(&mut have, 4)?;
            c.nonce = val;
        } else if k("uri") {
            once(&mut have, 8)?;
            c.uri = val;
        } else if k("response") {
            once(&mut have, 16)?;
            c.response = val;
        } else if k("algorithm") {
            once(&mut have, 32)?;
            c.algorithm = Some(val);
        } else if k("cnonce") {
            once(&mut have, 64)?;
            c.cnonce = Some(val);
        } else if k("qop") {
            once(&mut have, 128)?;
            c.qop = Some(val);
        } else if k("nc") {
            once(&mut have, 256)?;
            c.nc = Some(val);
        }
    }
    (have & 31 == 31).then_some(c)
}

/// The realm in a `Digest` credentials value (to pick the credentials meant for us among
/// several).
pub fn credentials_realm(value: &[u8]) -> Option<Cow<'_, str>> {
    parse_credentials(value).map(|c| c.realm)
}

/// A secret key only this node holds (signs nonces and flow tokens). Its `Debug` does not
/// show it.
#[derive(Clone)]
pub struct NodeKey {
    key: [u8; 32],
    /// The HMAC state after the key (its inner and outer pads hashed once, not per use).
    keyed: hmac::Hmac<sha2::Sha256>,
}

impl PartialEq for NodeKey {
    fn eq(&self, other: &NodeKey) -> bool {
        ct_eq(&self.key, &other.key)
    }
}

impl Eq for NodeKey {}

impl NodeKey {
    /// A key from 32 secret bytes (random at start, or read from a file the operator keeps).
    pub fn new(bytes: [u8; 32]) -> NodeKey {
        NodeKey {
            key: bytes,
            keyed: hmac::Hmac::<sha2::Sha256>::new_from_slice(&bytes).expect("any key size"),
        }
    }

    /// HMAC-SHA-256 over the parts (each length-prefixed, so boundaries count).
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = self.keyed.clone();
        for p in parts {
            m.update(&(p.len() as u32).to_be_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// The first `n` bytes of [`NodeKey::mac`], as hex: a tag for text we hand out.
    pub fn tag(&self, n: usize, parts: &[&[u8]]) -> String {
        hex(&self.mac(parts)[..n])
    }

    /// Does `tag` (hex, any case) equal [`NodeKey::tag`] of `n` bytes over `parts`? In
    /// constant time, without allocating.
    pub fn verify_tag(&self, n: usize, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mac = self.mac(parts);
        ct_eq_lower(HexBuf::of(&mac[..n.min(32)]).as_bytes(), tag)
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeKey(..)")
    }
}

/// Authentication settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Algorithms offered, one challenge each, in this order (RFC 8760 §2.4). Default
    /// SHA-256, SHA-512-256; MD5 only where configured.
    pub algorithms: Vec<Algorithm>,
    /// How long a nonce is accepted. Default 300 s.
    pub nonce_ttl: Duration,
    /// Failed attempts from one source address within `failure_window` before it is
    /// refused. Default 10.
    pub max_failures: u32,
    /// Default 60 s.
    pub failure_window: Duration,
    /// How long a source that failed too often is refused. Default 300 s.
    pub block: Duration,
    /// Slots of the failure ledger (rounded up to a power of two; fixed memory, 16 bytes
    /// each). Default 65536.
    pub max_tracked_sources: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            algorithms: vec![Algorithm::Sha256, Algorithm::Sha512_256],
            nonce_ttl: Duration::from_secs(300),
            max_failures: 10,
            failure_window: Duration::from_secs(60),
            block: Duration::from_secs(300),
            max_tracked_sources: 65536,
        }
    }
}

/// Why an attempt failed (a metric label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Failure {
    /// Credentials that do not parse, or miss `qop=auth`/`nc`/`cnonce`.
    Malformed,
    /// `uri` is not the Request-URI.
    UriMismatch,
    /// An algorithm we did not offer.
    Algorithm,
    /// No such subscriber in that realm (or no HA1 for that algorithm).
    UnknownUser,
    /// The response does not match (wrong password).
    WrongPassword,
    /// A nonce-count already used with this nonce.
    Replay,
}

impl Failure {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Malformed => "malformed",
            Failure::UriMismatch => "uri_mismatch",
            Failure::Algorithm => "algorithm",
            Failure::UnknownUser => "unknown_user",
            Failure::WrongPassword => "wrong_password",
            Failure::Replay => "replay",
        }
    }
}

/// The outcome of [`Authenticator::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The credentials prove this subscriber.
    Authenticated(Arc<Subscriber>),
    /// Send a challenge (`stale=true`: the password was right but the nonce is old, from
    /// another connection, or its count was used).
    Challenge {
        /// Whether to say `stale=true`.
        stale: bool,
    },
    /// The source failed too often: refuse without checking (403).
    Blocked,
}

/// What one verification says, with the failure to count and log, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The verdict.
    pub verdict: Verdict,
    /// A failed attempt, for metrics and the log.
    pub failure: Option<(Failure, String)>,
}

/// Nonce-counts seen for one nonce: the highest, and a window of the 64 below it.
#[derive(Debug, Clone, Copy)]
struct NcWindow {
    /// The nonce's issue time and serial (which nonce this is).
    issued_ms: u64,
    serial: u32,
    max: u32,
    seen: u64,
}

impl NcWindow {
    /// Marks `nc` used; `false` if it was already (or is too old to tell).
    fn accept(&mut self, nc: u32) -> bool {
        if nc > self.max {
            let shift = nc - self.max;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            // Bit 0 stands for `max` itself.
            self.seen |= 1;
            self.max = nc;
            true
        } else {
            let back = self.max - nc;
            if back >= 64 || self.seen & (1 << back) != 0 {
                return false;
            }
            self.seen |= 1 << back;
            true
        }
    }
}

/// Nonces in use per flow (bounded: the newest few). An SBC or PBX trunk registers many
/// accounts over one connection, each answering its own challenge: twice the default
/// `registrar.max_aors_per_connection`, so they do not push each other out.
const NONCES_PER_FLOW: usize = 32;

/// Failed attempts per source, shared by every shard of a process: a fixed table of atomic
/// counters (an IPv4 address, or an IPv6 address's /64 — a host rotating through its prefix
/// is one source). Memory is fixed whatever peers do; races between shards on one slot can
/// lose a count, never a block.
///
/// Each source has [`LEDGER_WAYS`] slots, chosen by a keyed hash, and a 16-bit fingerprint
/// from the same hash. Its failures count in all of its slots, and it has failed too often
/// when the *least* of those counts says so (a count-min sketch: never less than its own
/// failures, so sharing slots only ever makes it stricter). Its block is written, with its
/// fingerprint, into one of its slots not holding another source's block, and refuses only
/// that source; where every slot of it holds another's block, it is refused anyway (no
/// source escapes by sharing slots). A source that never failed is refused only when all
/// its slots hold other sources' blocks: with one slot per source, an attacker holding a
/// tenth as many prefixes as there are slots (an IPv6 /48 has 65,536 /64s) refused one
/// innocent source in ten; with two, about one in a hundred.
pub struct FailureLedger {
    /// Per slot: the window's start (ms after `epoch`) in the top 40 bits, the count in the
    /// low 24.
    window: Box<[AtomicU64]>,
    /// Per slot: refused until (ms after `epoch`; 0: not refused) in the top 48 bits, the
    /// refused source's fingerprint in the low 16.
    blocked: Box<[AtomicU64]>,
    key: std::collections::hash_map::RandomState,
    epoch: Instant,
}

/// Slots per source in the [`FailureLedger`].
pub const LEDGER_WAYS: usize = 2;

impl fmt::Debug for FailureLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailureLedger")
            .field("slots", &self.window.len())
            .finish()
    }
}

/// The failures a whole IPv6 /48 may have within the window, as a multiple of
/// `max_failures` ([`FailureLedger::fail`]).
pub const WIDE_FACTOR: u32 = 64;

/// The /48 an IPv6 source belongs to, as a key of its own (its low bit set, so it is never
/// a /64's [`source_of`]); `None` for an IPv4 source (translated ones included). One site
/// draws its /64s from its /48 at will: per-source limits count it as well.
pub fn wide_of(ip: IpAddr) -> Option<IpAddr> {
    match source_of(ip) {
        IpAddr::V6(v6) => Some(IpAddr::V6((u128::from(v6) >> 80 << 80 | 1).into())),
        IpAddr::V4(_) => None,
    }
}

/// What a source is, for per-source limits and counts: an IPv4 address (an IPv4-mapped
/// IPv6 address is its IPv4 address, and so is one a translator wrote: NAT64's well-known
/// `64:ff9b::/96`, RFC 6052, and 6to4's `2002::/16`, RFC 3056), or the /64 of an IPv6 address
/// — one host (or one LAN) draws addresses from its /64 at will, so counting per /128 bounds
/// nothing. Behind a NAT64 gateway every IPv4 client's address falls in one /64: counted as
/// one source, one of them blocked or limited all of them.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            if let Some(v4) = v6.to_ipv4_mapped() {
                IpAddr::V4(v4)
            } else if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
                IpAddr::V4((bits as u32).into())
            } else if bits >> 112 == 0x2002 {
                IpAddr::V4(((bits >> 80) as u32).into())
            } else {
                IpAddr::V6((bits >> 64 << 64).into())
            }
        }
    }
}

impl FailureLedger {
    /// A ledger of at least `slots` counters (rounded up to a power of two, at most 2^20);
    /// times count from `epoch` (any instant before now).
    pub fn new(slots: usize, epoch: Instant) -> FailureLedger {
        let n = slots.clamp(1, 1 << 20).next_power_of_two();
        FailureLedger {
            window: (0..n).map(|_| AtomicU64::new(0)).collect(),
            blocked: (0..n).map(|_| AtomicU64::new(0)).collect(),
            key: std::collections::hash_map::RandomState::new(),
            epoch,
        }
    }

    /// A source's slots (20 bits of the hash each) and fingerprint (its top 16 bits);
    /// `key`: [`source_of`] an address, or [`wide_of`] it.
    fn slots(&self, key: IpAddr) -> ([usize; LEDGER_WAYS], u64) {
        use std::hash::BuildHasher;
        let h = self.key.hash_one(key);
        let mask = self.window.len() as u64 - 1;
        (
            std::array::from_fn(|w| ((h >> (20 * w)) & mask) as usize),
            h >> 48,
        )
    }

    fn ms(&self, now: Instant) -> u64 {
        // +1: 0 means "never" in `blocked`.
        now.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// Is `ip` refused at `now`? Its own block, its /48's (IPv6), or every slot of it
    /// holding one.
    pub fn is_blocked(&self, now: Instant, ip: IpAddr) -> bool {
        self.key_blocked(now, source_of(ip))
            || wide_of(ip).is_some_and(|w| self.key_blocked(now, w))
    }

    fn key_blocked(&self, now: Instant, key: IpAddr) -> bool {
        let (slots, fp) = self.slots(key);
        let t = self.ms(now);
        let mut all = true;
        for i in slots {
            let b = self.blocked[i].load(Ordering::Relaxed);
            let active = t < b >> 16;
            if active && b & 0xffff == fp {
                return true;
            }
            all &= active;
        }
        all
    }

    /// Counts one failure from `ip`; past `cfg.max_failures` within `cfg.failure_window`
    /// the source is refused for `cfg.block`. An IPv6 source's /48 counts it too, and is
    /// refused whole past [`WIDE_FACTOR`] times as many: one site draws its /64s from its
    /// /48 at will, and failing from each in turn took a slot per /64 — 65,536 of them,
    /// the whole default table, so that phones that never failed found both their slots
    /// held by others' blocks and were refused.
    pub fn fail(&self, now: Instant, ip: IpAddr, cfg: &AuthConfig) {
        self.fail_key(now, source_of(ip), cfg.max_failures, cfg);
        if let Some(w) = wide_of(ip) {
            // Within what a slot can count (24 bits).
            let wide = cfg.max_failures.saturating_mul(WIDE_FACTOR).min(0xff_ffff);
            self.fail_key(now, w, wide, cfg);
        }
    }

    fn fail_key(&self, now: Instant, key: IpAddr, max_failures: u32, cfg: &AuthConfig) {
        let (slots, fp) = self.slots(key);
        let t = self.ms(now);
        let window = cfg.failure_window.as_millis() as u64;
        let mut least = u64::MAX;
        for (w, &i) in slots.iter().enumerate() {
            // Two ways landing on one slot count once.
            if slots[..w].contains(&i) {
                continue;
            }
            let mut count = 0;
            let _ = self.window[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                let (start, c) = (w >> 24, w & 0xff_ffff);
                let (start, c) = if t.saturating_sub(start) >= window || start == 0 {
                    (t, 1)
                } else {
                    (start, (c + 1).min(0xff_ffff))
                };
                count = c;
                Some(start << 24 | c)
            });
            least = least.min(count);
        }
        if least < u64::from(max_failures) {
            return;
        }
        let until = (t + cfg.block.as_millis() as u64).min((1 << 48) - 1);
        let mine = until << 16 | fp;
        for i in slots {
            let written = self.blocked[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                let (active, theirs) = (t < b >> 16, b & 0xffff != fp);
                // Another source's block stays; ours is extended, never shortened.
                (!(active && theirs) && b >> 16 < until).then_some(mine)
            });
            let b = self.blocked[i].load(Ordering::Relaxed);
            if written.is_ok() || (t < b >> 16 && b & 0xffff == fp) {
                // Blocked: the count starts again (a source that keeps failing after its
                // block is blocked again after as many more).
                for i in slots {
                    self.window[i].store(0, Ordering::Relaxed);
                }
                return;
            }
        }
        // Every slot holds another source's block: refused by `is_blocked` while they last,
        // and its count kept, so that it is refused again at its next failure after them
        // (a fresh allowance then would have shortened its block).
    }

    /// Slots counting failures in their window or refusing now (a gauge; a scan).
    pub fn tracked(&self, now: Instant, cfg: &AuthConfig) -> usize {
        let t = self.ms(now);
        let window = cfg.failure_window.as_millis() as u64;
        (0..self.window.len())
            .filter(|&i| {
                let w = self.window[i].load(Ordering::Relaxed);
                (w != 0 && t.saturating_sub(w >> 24) < window)
                    || t < self.blocked[i].load(Ordering::Relaxed) >> 16
            })
            .count()
    }
}

/// Digest authentication for one shard; see the module docs.
#[derive(Debug)]
pub struct Authenticator {
    cfg: AuthConfig,
    key: NodeKey,
    epoch: Instant,
    nonces: HashMap<u64, Vec<NcWindow>>,
    /// The realm each connection last authenticated in: the realm to challenge a request
    /// whose From names none of ours (an anonymous caller) with — the user's own, not the
    /// first domain's, where its entry is not.
    realm_of_flow: HashMap<u64, String>,
    failures: Arc<FailureLedger>,
    /// Tells apart the nonces of one millisecond: every challenge has its own, so two
    /// accounts challenged together on one connection never share a nonce-count window.
    serial: std::sync::atomic::AtomicU32,
}

impl Authenticator {
    /// An authenticator; `epoch` is the time nonces count from (any instant before now).
    pub fn new(cfg: AuthConfig, key: NodeKey, epoch: Instant) -> Authenticator {
        Authenticator {
            failures: Arc::new(FailureLedger::new(cfg.max_tracked_sources, epoch)),
            cfg,
            key,
            epoch,
            nonces: HashMap::new(),
            realm_of_flow: HashMap::new(),
            serial: Default::default(),
        }
    }

    /// Counts failures in `ledger` (shared with the other shards) instead of its own.
    pub fn share_failures(&mut self, ledger: Arc<FailureLedger>) {
        self.failures = ledger;
    }

    /// The configuration.
    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// A fresh nonce for `flow` and `realm`: 8 bytes of time, 4 of serial (no two nonces
    /// alike), 16 of HMAC, as hex.
    pub fn nonce(&self, now: Instant, flow: u64, realm: &str) -> String {
        let t = self.ms(now).to_be_bytes();
        let n = self.serial.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        let mut s = hex(&t);
        s.push_str(&hex(&n));
        s.push_str(&self.key.tag(
            16,
            &[b"nonce", &t, &n, &flow.to_be_bytes(), realm.as_bytes()],
        ));
        s
    }

    /// The challenge header values for `realm` (one per configured algorithm).
    pub fn challenges(&self, now: Instant, flow: u64, realm: &str, stale: bool) -> Vec<Vec<u8>> {
        let nonce = self.nonce(now, flow, realm);
        self.cfg
            .algorithms
            .iter()
            .map(|a| {
                let mut v = format!(
                    "Digest realm=\"{realm}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"",
                    a.name()
                );
                if stale {
                    v.push_str(", stale=TRUE");
                }
                v.into_bytes()
            })
            .collect()
    }

    /// When the nonce was issued (ms after the epoch), if it is ours for this flow and realm.
    /// The issue time and serial of a nonce we gave `flow` for `realm`.
    fn nonce_issued(&self, nonce: &str, flow: u64, realm: &str) -> Option<(u64, u32)> {
        let raw: [u8; 28] = unhex(nonce.as_bytes())?;
        let t: [u8; 8] = raw[..8].try_into().ok()?;
        let n: [u8; 4] = raw[8..12].try_into().ok()?;
        let want = self
            .key
            .mac(&[b"nonce", &t, &n, &flow.to_be_bytes(), realm.as_bytes()]);
        ct_eq(&raw[12..], &want[..16]).then(|| (u64::from_be_bytes(t), u32::from_be_bytes(n)))
    }

    /// Is this source refused for failing too often?
    pub fn is_blocked(&self, now: Instant, source: Option<IpAddr>) -> bool {
        source.is_some_and(|ip| self.failures.is_blocked(now, ip))
    }

    fn fail(&mut self, now: Instant, source: Option<IpAddr>) {
        if let Some(ip) = source {
            self.failures.fail(now, ip, &self.cfg);
        }
    }

    /// Sources counting failures or refused now (a gauge; scans the ledger).
    pub fn tracked_sources(&self, now: Instant) -> usize {
        self.failures.tracked(now, &self.cfg)
    }

    /// Verifies the credentials in `values` (the `Authorization` or `Proxy-Authorization`
    /// values of a request) for a request with `method` and `request_uri` that arrived on
    /// `flow` from `source`. `realms` are the realms we answer for. The digest-uri must be
    /// the Request-URI, or a URI `also_ok` accepts (one naming this server, with no user:
    /// SIPp and some gateways put the next hop's address there; the response covers it
    /// either way).
    #[allow(clippy::too_many_arguments)] // the request's facts, one each
    pub fn verify(
        &mut self,
        now: Instant,
        flow: u64,
        source: Option<IpAddr>,
        method: &[u8],
        request_uri: &[u8],
        also_ok: &dyn Fn(&[u8]) -> bool,
        values: &[&[u8]],
        realms: &[String],
        store: &dyn CredentialStore,
    ) -> Checked {
        let ok = |verdict| Checked {
            verdict,
            failure: None,
        };
        if self.is_blocked(now, source) {
            return ok(Verdict::Blocked);
        }
        // The credentials meant for us (a request may carry others' too, RFC 3261 §22.3).
        let mut mine = None;
        for v in values {
            match parse_credentials(v) {
                Some(c) if realms.iter().any(|r| r.eq_ignore_ascii_case(&c.realm)) => {
                    mine = Some(Ok(c));
                    break;
                }
                Some(_) => {}
                // Credentials that do not parse count as a failed attempt only when they
                // may be ours: a realm of ours, or none to be read. Another realm's (an
                // RFC 7616 `username*` for a PBX behind us) is not ours to count.
                None if mine.is_none()
                    && trimmed_scheme_is_digest(v)
                    && raw_realm(v)
                        .is_none_or(|r| realms.iter().any(|x| eq_ic(x.as_bytes(), r))) =>
                {
                    mine = Some(Err(()))
                }
                None => {}
            }
        }
        let c = match mine {
            None => return ok(Verdict::Challenge { stale: false }),
            Some(Err(())) => return self.failed(now, source, Failure::Malformed, String::new()),
            Some(Ok(c)) => c,
        };
        let who = || format!("{}@{}", c.username, c.realm);
        let alg = match &c.algorithm {
            None => Algorithm::Md5,
            Some(a) => match Algorithm::from_name(a.as_bytes()) {
                Some(a) => a,
                None => return self.failed(now, source, Failure::Algorithm, who()),
            },
        };
        if !self.cfg.algorithms.contains(&alg) {
            return self.failed(now, source, Failure::Algorithm, who());
        }
        let (Some(qop), Some(nc_s), Some(cnonce)) = (&c.qop, &c.nc, &c.cnonce) else {
            return self.failed(now, source, Failure::Malformed, who());
        };
        let nc = match u32::from_str_radix(nc_s, 16) {
            Ok(n) if qop.eq_ignore_ascii_case("auth") && nc_s.len() == 8 && n > 0 => n,
            _ => return self.failed(now, source, Failure::Malformed, who()),
        };
        // The same URI by RFC 3261 §19.1.4 (the user part case-sensitive: `sip:BOB@…` is
        // another user than `sip:bob@…`; the host and parameters are not).
        let same_uri = c.uri.as_bytes() == request_uri
            || matches!(
                (crate::Uri::parse(c.uri.as_bytes()), crate::Uri::parse(request_uri)),
                (Ok(a), Ok(b)) if a.equivalent(&b)
            );
        if !same_uri && !also_ok(c.uri.as_bytes()) {
            return self.failed(now, source, Failure::UriMismatch, who());
        }
        let Some(sub) = store.subscriber(&c.username, &c.realm) else {
            return self.failed(now, source, Failure::UnknownUser, who());
        };
        let Some(ha1) = sub.ha1_for(alg) else {
            return self.failed(now, source, Failure::UnknownUser, who());
        };
        let want = alg.response_buf(
            ha1,
            c.nonce.as_bytes(),
            nc_s.as_bytes(),
            cnonce.as_bytes(),
            qop.as_bytes(),
            method,
            c.uri.as_bytes(),
        );
        if !ct_eq_lower(want.as_bytes(), c.response.as_bytes()) {
            return self.failed(now, source, Failure::WrongPassword, who());
        }
        // The password is right: what remains decides between success and `stale`.
        let stale = ok(Verdict::Challenge { stale: true });
        let Some((issued, serial)) = self.nonce_issued(&c.nonce, flow, &c.realm) else {
            return stale;
        };
        // Issued "in the future": by an earlier life of this node (its clock counts from
        // its start), not by this one.
        let age = self.ms(now).checked_sub(issued);
        if age.is_none_or(|a| a > self.cfg.nonce_ttl.as_millis() as u64) {
            return stale;
        }
        let windows = self.nonces.entry(flow).or_default();
        let w = match windows
            .iter_mut()
            .position(|w| (w.issued_ms, w.serial) == (issued, serial))
        {
            Some(i) => &mut windows[i],
            None => {
                if windows.len() >= NONCES_PER_FLOW {
                    // Keep the newest: an older nonce than all we track is stale.
                    let (oldest, at) = windows
                        .iter()
                        .enumerate()
                        .map(|(i, w)| ((w.issued_ms, w.serial), i))
                        .min()
                        .expect("non-empty");
                    if (issued, serial) < oldest {
                        return stale;
                    }
                    windows.swap_remove(at);
                }
                windows.push(NcWindow {
                    issued_ms: issued,
                    serial,
                    max: 0,
                    seen: 0,
                });
                windows.last_mut().expect("pushed")
            }
        };
        if !w.accept(nc) {
            // Reported, not counted against the source: the response proves the password,
            // and the nonce is this connection's own, so this is the client itself
            // repeating a count (a buggy phone), not someone guessing.
            return Checked {
                verdict: Verdict::Challenge { stale: true },
                failure: Some((Failure::Replay, who())),
            };
        }
        if !self
            .realm_of_flow
            .get(&flow)
            .is_some_and(|r| r.eq_ignore_ascii_case(&c.realm))
        {
            self.realm_of_flow
                .insert(flow, c.realm.to_ascii_lowercase());
        }
        ok(Verdict::Authenticated(sub))
    }

    /// The realm `flow` last authenticated in, if it did.
    pub fn realm_of(&self, flow: u64) -> Option<&str> {
        self.realm_of_flow.get(&flow).map(String::as_str)
    }

    fn failed(
        &mut self,
        now: Instant,
        source: Option<IpAddr>,
        why: Failure,
        who: String,
    ) -> Checked {
        self.fail(now, source);
        Checked {
            verdict: if self.is_blocked(now, source) {
                Verdict::Blocked
            } else {
                Verdict::Challenge { stale: false }
            },
            failure: Some((why, who)),
        }
    }

    /// A flow closed: its nonces die with it.
    pub fn flow_closed(&mut self, flow: u64) {
        self.nonces.remove(&flow);
        self.realm_of_flow.remove(&flow);
    }

    /// Flows with nonce state (a gauge; bounded by the connections).
    pub fn flows_tracked(&self) -> usize {
        self.nonces.len()
    }
}

/// The `realm` of credentials that do not parse, read leniently to tell whose they are:
/// the parameters after the scheme, quoted values skipped whole (so `opaque="realm=x"` is
/// not it). `None`: none can be read.
fn raw_realm(v: &[u8]) -> Option<&[u8]> {
    let lws = |i: &mut usize| {
        while *i < v.len() && matches!(v[*i], b' ' | b'\t' | b'\r' | b'\n' | b',') {
            *i += 1;
        }
    };
    let mut i = 0;
    lws(&mut i);
    while i < v.len() && is_token(v[i]) {
        i += 1;
    }
    loop {
        lws(&mut i);
        let name_at = i;
        while i < v.len() && is_token(v[i]) {
            i += 1;
        }
        let name = &v[name_at..i];
        if name.is_empty() {
            return None;
        }
        while i < v.len() && matches!(v[i], b' ' | b'\t') {
            i += 1;
        }
        if v.get(i) != Some(&b'=') {
            continue;
        }
        i += 1;
        while i < v.len() && matches!(v[i], b' ' | b'\t') {
            i += 1;
        }
        let value = if v.get(i) == Some(&b'"') {
            let end = crate::text::skip_quoted(v, i + 1)?;
            let inner = &v[i + 1..end - 1];
            i = end;
            inner
        } else {
            let at = i;
            while i < v.len() && v[i] != b',' {
                i += 1;
            }
            crate::text::trim(&v[at..i])
        };
        if eq_ic(name, b"realm") {
            return Some(value);
        }
    }
}

fn trimmed_scheme_is_digest(v: &[u8]) -> bool {
    let v = crate::text::trim(v);
    v.len() >= 6 && eq_ic(&v[..6], b"Digest")
}

/// What a UA does with a challenge: the `Authorization` value for a request (for tests, the
/// load generator and `sipring subscriber`). `challenge` is a `WWW-Authenticate` or
/// `Proxy-Authenticate` value; `ha1` the subscriber's hash for the challenge's algorithm.
#[allow(clippy::too_many_arguments)] // the RFC's inputs, one each
pub fn authorization(
    alg: Algorithm,
    username: &str,
    realm: &str,
    ha1: &str,
    nonce: &str,
    nc: u32,
    cnonce: &str,
    method: &str,
    uri: &str,
) -> String {
    let nc = format!("{nc:08x}");
    let r = alg.response(
        ha1,
        nonce.as_bytes(),
        nc.as_bytes(),
        cnonce.as_bytes(),
        b"auth",
        method.as_bytes(),
        uri.as_bytes(),
    );
    format!(
        "Digest username=\"{username}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{r}\", algorithm={}, cnonce=\"{cnonce}\", qop=auth, nc={nc}",
        alg.name()
    )
}

/// A challenge's parameters (for the UA side): `(realm, nonce, algorithm, stale)`.
pub fn parse_challenge(value: &[u8]) -> Option<(String, String, Algorithm, bool)> {
    // A challenge has the same auth-param syntax as credentials; reuse the parser by
    // supplying the fields it insists on.
    let mut v = value.to_vec();
    v.extend_from_slice(b", username=\"-\", uri=\"-\", response=\"-\"");
    let c = parse_credentials(&v)?;
    let alg = match c.algorithm.as_deref() {
        None => Algorithm::Md5,
        Some(a) => Algorithm::from_name(a.as_bytes())?,
    };
    let stale = String::from_utf8_lossy(value)
        .to_ascii_lowercase()
        .contains("stale=true");
    Some((c.realm.into_owned(), c.nonce.into_owned(), alg, stale))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7616 §3.9.1: the same request with MD5 and SHA-256 (HTTP, but the algorithm is
    /// the same: `response = H(HA1:nonce:nc:cnonce:qop:H(method:uri))`).
    #[test]
    fn rfc7616_known_answers() {
        let (user, realm, pass) = ("Mufasa", "http-auth@example.org", "Circle of Life");
        let nonce = b"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
        let cnonce = b"f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
        for (alg, want) in [
            (Algorithm::Md5, "8ca523f5e9506fed4657c9700eebdbec"),
            (
                Algorithm::Sha256,
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
        ] {
            let ha1 = alg.ha1(user, realm, pass);
            let r = alg.response(
                &ha1,
                nonce,
                b"00000001",
                cnonce,
                b"auth",
                b"GET",
                b"/dir/index.html",
            );
            assert_eq!(r, want, "{alg}");
        }
        // SHA-512/256 (FIPS 180-4) of "abc".
        assert_eq!(
            Algorithm::Sha512_256.hex(&[b"abc"]),
            "53048e2681941ef99b2e29b76b4c7dabe4c2d0c634fc6d46e0e2f13107e7af23"
        );
    }

    #[test]
    fn credentials_parse_with_quotes_escapes_and_lws() {
        let c = parse_credentials(
            b"Digest  username=\"al\\\"ice\" ,realm=\"example.com\",\r\n nonce=\"n1\", uri=\"sip:example.com\",response=\"abc\", algorithm=SHA-256, cnonce=\"c\", qop=auth, nc=00000001, opaque=\"x\"",
        )
        .unwrap();
        assert_eq!(c.username, "al\"ice");
        assert_eq!(c.realm, "example.com");
        assert_eq!(c.algorithm.as_deref(), Some("SHA-256"));
        assert_eq!(c.nc.as_deref(), Some("00000001"));
        for bad in [
            &b"Basic YWxhZGRpbjpvcGVuc2VzYW1l"[..],
            b"Digest username=\"a\", realm=\"r\"",
            b"Digest username=\"a, realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\"",
            b"Digest username=, realm=\"r\"",
            b"",
            // A parameter twice: which one counts would be each parser's own choice.
            b"Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\", uri=\"v\", response=\"x\"",
            b"Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\", response=\"x\", nc=00000001, NC=00000002",
        ] {
            assert_eq!(
                parse_credentials(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    struct Fixture {
        auth: Authenticator,
        store: SubscriberTable,
        t0: Instant,
    }

    const SRC: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7)));

    fn fixture(algs: &[Algorithm]) -> Fixture {
        let t0 = Instant::now();
        let mut store = SubscriberTable::default();
        store.insert(Subscriber {
            username: "alice".into(),
            realm: "example.com".into(),
            aors: vec!["sip:alice@example.com".into()],
            ha1: Algorithm::ALL
                .iter()
                .map(|a| (*a, a.ha1("alice", "example.com", "secret")))
                .collect(),
        });
        Fixture {
            auth: Authenticator::new(
                AuthConfig {
                    algorithms: algs.to_vec(),
                    max_failures: 3,
                    ..AuthConfig::default()
                },
                NodeKey::new([7; 32]),
                t0,
            ),
            store,
            t0,
        }
    }

    impl Fixture {
        #[allow(clippy::too_many_arguments)]
        fn answer(
            &mut self,
            at: Duration,
            flow: u64,
            alg: Algorithm,
            password: &str,
            nonce: &str,
            nc: u32,
            uri: &str,
        ) -> Checked {
            let ha1 = alg.ha1("alice", "example.com", password);
            let a = authorization(
                alg,
                "alice",
                "example.com",
                &ha1,
                nonce,
                nc,
                "cn",
                "REGISTER",
                uri,
            );
            self.auth.verify(
                self.t0 + at,
                flow,
                SRC,
                b"REGISTER",
                b"sip:example.com",
                &|_| false,
                &[a.as_bytes()],
                &["example.com".to_string()],
                &self.store,
            )
        }
    }

    fn authenticated(c: &Checked) -> bool {
        matches!(c.verdict, Verdict::Authenticated(_))
    }

    #[test]
    fn challenges_issued_together_on_one_connection_each_have_their_own_count() {
        // An SBC re-registering its accounts in one burst: the REGISTERs of one read share
        // one instant, and each account answers its own challenge with nc=1. Sharing a nonce
        // made every answer after the first a "replay".
        let s = Duration::from_secs(1);
        let mut f = fixture(&[Algorithm::Sha256]);
        let nonces: Vec<String> = (0..20)
            .map(|_| f.auth.nonce(f.t0, 9, "example.com"))
            .collect();
        for (i, n) in nonces.iter().enumerate() {
            assert!(
                nonces[..i].iter().all(|m| m != n),
                "nonce {i} was issued before"
            );
            let c = f.answer(s, 9, Algorithm::Sha256, "secret", n, 1, "sip:example.com");
            assert!(authenticated(&c), "account {i}: {c:?}");
        }
        // All twenty are tracked: the first one's count goes on.
        let c = f.answer(
            s,
            9,
            Algorithm::Sha256,
            "secret",
            &nonces[0],
            2,
            "sip:example.com",
        );
        assert!(authenticated(&c), "{c:?}");
    }

    #[test]
    fn a_repeated_count_with_the_right_password_is_stale_but_never_blocks_the_source() {
        let s = Duration::from_secs(1);
        let mut f = fixture(&[Algorithm::Sha256]);
        let n = f.auth.nonce(f.t0, 9, "example.com");
        assert!(authenticated(&f.answer(
            s,
            9,
            Algorithm::Sha256,
            "secret",
            &n,
            1,
            "sip:example.com"
        )));
        // max_failures is 3: five repeats are reported, not counted.
        for _ in 0..5 {
            let c = f.answer(s, 9, Algorithm::Sha256, "secret", &n, 1, "sip:example.com");
            assert_eq!(c.verdict, Verdict::Challenge { stale: true });
            assert_eq!(c.failure.map(|f| f.0), Some(Failure::Replay));
        }
        assert!(!f.auth.is_blocked(f.t0 + s, SRC));
        let fresh = f.auth.nonce(f.t0 + s, 9, "example.com");
        assert!(authenticated(&f.answer(
            s,
            9,
            Algorithm::Sha256,
            "secret",
            &fresh,
            1,
            "sip:example.com"
        )));
    }

    #[test]
    fn digest_table() {
        let s = Duration::from_secs(1);
        let mut f = fixture(&[Algorithm::Sha256, Algorithm::Sha512_256, Algorithm::Md5]);
        let n = f.auth.nonce(f.t0, 9, "example.com");
        // Every offered algorithm works; nc must increase.
        for (i, alg) in [Algorithm::Sha256, Algorithm::Sha512_256, Algorithm::Md5]
            .into_iter()
            .enumerate()
        {
            let c = f.answer(s, 9, alg, "secret", &n, i as u32 + 1, "sip:example.com");
            assert!(authenticated(&c), "{alg}: {c:?}");
        }
        // Replayed nc: stale, and counted.
        let c = f.answer(s, 9, Algorithm::Sha256, "secret", &n, 2, "sip:example.com");
        assert_eq!(c.verdict, Verdict::Challenge { stale: true });
        assert_eq!(c.failure.unwrap().0, Failure::Replay);
        // Out of order inside the window is fine once.
        assert!(authenticated(&f.answer(
            s,
            9,
            Algorithm::Sha256,
            "secret",
            &n,
            10,
            "sip:example.com"
        )));
        assert!(authenticated(&f.answer(
            s,
            9,
            Algorithm::Sha256,
            "secret",
            &n,
            7,
            "sip:example.com"
        )));
        // The nonce belongs to flow 9: on flow 10 it is stale (the password was right).
        let c = f.answer(
            s,
            10,
            Algorithm::Sha256,
            "secret",
            &n,
            11,
            "sip:example.com",
        );
        assert_eq!(c.verdict, Verdict::Challenge { stale: true });
        assert!(c.failure.is_none());
        // Expired.
        let c = f.answer(
            Duration::from_secs(301),
            9,
            Algorithm::Sha256,
            "secret",
            &n,
            12,
            "sip:example.com",
        );
        assert_eq!(c.verdict, Verdict::Challenge { stale: true });
        // Forged nonce with the right password: stale, not success.
        let c = f.answer(
            s,
            9,
            Algorithm::Sha256,
            "secret",
            "00",
            1,
            "sip:example.com",
        );
        assert_eq!(c.verdict, Verdict::Challenge { stale: true });
    }

    #[test]
    fn failures_are_counted_and_a_source_that_keeps_failing_is_blocked() {
        let s = Duration::from_secs(1);
        let mut f = fixture(&[Algorithm::Sha256]);
        let n = f.auth.nonce(f.t0, 1, "example.com");
        // MD5 was not offered.
        let c = f.answer(s, 1, Algorithm::Md5, "secret", &n, 1, "sip:example.com");
        assert_eq!(c.failure.unwrap().0, Failure::Algorithm);
        // The digest-uri must be the Request-URI.
        let c = f.answer(s, 1, Algorithm::Sha256, "secret", &n, 1, "sip:evil.com");
        assert_eq!(c.failure.unwrap().0, Failure::UriMismatch);
        assert_eq!(c.verdict, Verdict::Challenge { stale: false });
        // Third failure (max 3): blocked, even with the right password afterwards.
        let c = f.answer(s, 1, Algorithm::Sha256, "wrong", &n, 1, "sip:example.com");
        assert_eq!(
            c.failure.unwrap(),
            (Failure::WrongPassword, "alice@example.com".into())
        );
        assert_eq!(c.verdict, Verdict::Blocked);
        let c = f.answer(s, 1, Algorithm::Sha256, "secret", &n, 2, "sip:example.com");
        assert_eq!(c.verdict, Verdict::Blocked);
        assert!(c.failure.is_none());
        // ... until the block ends.
        let c = f.answer(
            Duration::from_secs(302),
            1,
            Algorithm::Sha256,
            "secret",
            &f.auth
                .nonce(f.t0 + Duration::from_secs(302), 1, "example.com"),
            1,
            "sip:example.com",
        );
        assert!(authenticated(&c), "{c:?}");
    }

    #[test]
    fn no_credentials_for_our_realm_is_a_plain_challenge_and_not_a_failure() {
        let mut f = fixture(&[Algorithm::Sha256]);
        let other = authorization(
            Algorithm::Sha256,
            "alice",
            "elsewhere.org",
            "00",
            "n",
            1,
            "c",
            "INVITE",
            "sip:x",
        );
        let c = f.auth.verify(
            f.t0,
            1,
            SRC,
            b"INVITE",
            b"sip:x",
            &|_| false,
            &[other.as_bytes()],
            &["example.com".into()],
            &f.store,
        );
        assert_eq!(c.verdict, Verdict::Challenge { stale: false });
        assert!(c.failure.is_none());
        let ch = f.auth.challenges(f.t0, 1, "example.com", true);
        let (realm, nonce, alg, stale) = parse_challenge(&ch[0]).unwrap();
        assert_eq!(
            (realm.as_str(), alg, stale),
            ("example.com", Algorithm::Sha256, true)
        );
        assert_eq!(f.auth.nonce_issued(&nonce, 1, "example.com"), Some((0, 0)));
        assert_eq!(f.auth.nonce_issued(&nonce, 1, "example.net"), None);
    }

    #[test]
    fn credentials_that_do_not_parse_count_only_when_they_may_be_ours() {
        // RFC 7616's `username*` (for a PBX behind us, in its realm) does not parse here: it
        // counted as a failed attempt against the phone's address on every first try.
        // A fresh ledger each time: the fixture blocks a source after a few failures.
        let verify = |v: &str| {
            let mut f = fixture(&[Algorithm::Sha256]);
            f.auth
                .verify(
                    f.t0,
                    1,
                    SRC,
                    b"INVITE",
                    b"sip:b@x",
                    &|_| false,
                    &[v.as_bytes()],
                    &["example.com".into()],
                    &f.store,
                )
                .failure
                .map(|(why, _)| why)
        };
        let theirs = "Digest username*=UTF-8''%C3%A4, realm=\"pbx.other\", nonce=\"n\", uri=\"sip:b@x\", response=\"r\"";
        assert_eq!(verify(theirs), None);
        // Read as parameters: a quoted value naming a realm is not the realm.
        let decoy =
            "Digest username*=UTF-8''%C3%A4, opaque=\"realm=1\", realm=\"pbx.other\", nonce=\"n\"";
        assert_eq!(verify(decoy), None);
        let hidden =
            "Digest username*=UTF-8''%C3%A4, cnonce=\"realm=\", realm=\"example.com\", nonce=\"n\"";
        assert_eq!(verify(hidden), Some(Failure::Malformed));
        for ours in [
            theirs.replace("pbx.other", "Example.com"),
            "Digest username*=UTF-8''%C3%A4, nonce=\"n\"".to_string(),
            "Digest".to_string(),
        ] {
            assert_eq!(verify(&ours), Some(Failure::Malformed), "{ours}");
        }
    }

    #[test]
    fn the_failure_ledger_is_bounded() {
        let cfg = AuthConfig {
            max_tracked_sources: 100,
            ..AuthConfig::default()
        };
        let mut a = Authenticator::new(cfg, NodeKey::new([7; 32]), Instant::now());
        let t = Instant::now();
        for i in 0..1000u32 {
            a.fail(t, Some(IpAddr::V4(i.into())));
        }
        // 128 slots (100 rounded up), whatever the number of sources.
        let tracked = a.tracked_sources(t);
        assert!((100..=128).contains(&tracked), "{tracked}");
        assert_eq!(a.failures.window.len(), 128);
    }

    #[test]
    fn failing_sources_do_not_lock_out_those_that_never_failed() {
        // One slot per source: an attacker failing from 16,384 IPv6 /64s (a /50) blocked
        // every source sharing a slot with one of them, about 6 % of a 262,144-slot table,
        // phones that never failed among them. Two slots and a fingerprint: about 0.4 %.
        let t0 = Instant::now();
        let cfg = AuthConfig {
            max_failures: 10,
            ..AuthConfig::default()
        };
        let l = FailureLedger::new(1 << 18, t0);
        let attacker = |i: u128| IpAddr::V6(((0x2001_0db8_4000u128 << 80) | (i << 64) | 1).into());
        for i in 0..1u128 << 14 {
            for _ in 0..10 {
                l.fail(t0, attacker(i), &cfg);
            }
        }
        let escaped = (0..1u128 << 14)
            .filter(|&i| !l.is_blocked(t0, attacker(i)))
            .count();
        assert_eq!(escaped, 0, "attacking sources not refused");
        let innocent = (0..10_000u32)
            .filter(|i| l.is_blocked(t0, IpAddr::V4((0xC633_6400 + i).into())))
            .count();
        assert!(
            innocent < 150,
            "{innocent} of 10,000 sources that never failed refused"
        );
        // A table far too small: every failing source is still refused.
        let small = FailureLedger::new(128, t0);
        let v4 = |i: u32| IpAddr::V4((0x0a00_0000 + i).into());
        for i in 0..1000 {
            for _ in 0..10 {
                small.fail(t0, v4(i), &cfg);
            }
        }
        assert!((0..1000).all(|i| small.is_blocked(t0, v4(i))));
        // And each block ends with its time.
        let later = t0 + cfg.block + Duration::from_millis(1);
        assert!((0..1000).all(|i| !small.is_blocked(later, v4(i))));
    }

    #[test]
    fn a_site_failing_from_each_of_its_64s_in_turn_is_refused_whole() {
        // Each /64 is a source, so a /48 had 65,536 of them: failing from each in turn (a
        // blocked one is refused before it can fail again, as `Auth::verify` does) filled
        // the default table, and most phones that never failed found both their slots held
        // by others' blocks. The /48 counts every failure of its /64s and is refused whole
        // past 64 × max_failures: a few dozen slots, not the table.
        let t0 = Instant::now();
        let cfg = AuthConfig::default();
        let l = FailureLedger::new(cfg.max_tracked_sources, t0);
        let site = |net: u128, i: u128| IpAddr::V6(((net << 80) | (i << 64) | 7).into());
        let attack = 0x2001_0db8_4000u128;
        let mut failed_from = 0;
        for i in 0..1u128 << 15 {
            for _ in 0..cfg.max_failures {
                if l.is_blocked(t0, site(attack, i)) {
                    break;
                }
                l.fail(t0, site(attack, i), &cfg);
            }
            failed_from += usize::from(l.key_blocked(t0, source_of(site(attack, i))));
        }
        assert!(
            failed_from <= WIDE_FACTOR as usize + 1,
            "{failed_from} /64s blocked one by one before their /48 was"
        );
        assert!(
            l.tracked(t0, &cfg) < 200,
            "{} slots taken",
            l.tracked(t0, &cfg)
        );
        // The site is refused whole; nobody else is.
        assert!(
            l.is_blocked(t0, site(attack, 0xffff)),
            "a /64 of the site that never failed"
        );
        let innocent = (0..10_000u128)
            .filter(|&i| l.is_blocked(t0, site(0x2001_0db8_5000 + i, 1)))
            .count()
            + (0..10_000u32)
                .filter(|i| l.is_blocked(t0, IpAddr::V4((0xC633_6400 + i).into())))
                .count();
        assert_eq!(innocent, 0, "sources that never failed refused");
        // An IPv4 source is not a /48: ten failures, and only it is blocked.
        let v4 = IpAddr::V4([198, 51, 100, 9].into());
        for _ in 0..cfg.max_failures {
            l.fail(t0, v4, &cfg);
        }
        assert!(l.is_blocked(t0, v4));
        assert!(!l.is_blocked(t0, IpAddr::V4([198, 51, 100, 10].into())));
    }

    #[test]
    fn a_source_sharing_its_slots_is_neither_counted_twice_nor_let_off_early() {
        let t0 = Instant::now();
        let cfg = AuthConfig {
            max_failures: 10,
            ..AuthConfig::default()
        };
        // One slot: both ways of every source land on it, and count once.
        let l = FailureLedger::new(1, t0);
        let (x, y) = (
            IpAddr::V4([192, 0, 2, 1].into()),
            IpAddr::V4([192, 0, 2, 2].into()),
        );
        for _ in 0..9 {
            l.fail(t0, y, &cfg);
        }
        assert!(!l.is_blocked(t0, y), "counted twice");
        l.fail(t0, y, &cfg);
        assert!(l.is_blocked(t0, y));
        // x reaches its limit while y's block holds the slot: refused while it lasts, and
        // at its next failure after it (not given a fresh allowance of ten).
        let late = t0 + cfg.block - Duration::from_secs(1);
        for _ in 0..10 {
            l.fail(late, x, &cfg);
        }
        assert!(l.is_blocked(late, x));
        let after = t0 + cfg.block + Duration::from_secs(1);
        l.fail(after, x, &cfg);
        assert!(l.is_blocked(after, x), "let off early");
    }

    #[test]
    fn addresses_a_translator_wrote_are_the_ipv4_sources_inside() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source_of(ip("64:ff9b::c000:201")), ip("192.0.2.1"));
        assert_eq!(source_of(ip("64:ff9b::c000:202")), ip("192.0.2.2"));
        assert_eq!(source_of(ip("2002:c000:203::1")), ip("192.0.2.3"));
        assert_eq!(source_of(ip("::ffff:192.0.2.4")), ip("192.0.2.4"));
        assert_eq!(source_of(ip("2001:db8:1:2:3::4")), ip("2001:db8:1:2::"));
        assert_eq!(source_of(ip("192.0.2.5")), ip("192.0.2.5"));
    }

    #[test]
    fn failures_count_on_every_shard_and_per_ipv6_prefix() {
        // Two shards' authenticators sharing the process's ledger: what a source failed on
        // one counts on the other (before, each shard counted alone: N shards, N times the
        // guesses). An IPv6 host drawing new addresses from its /64 is one source.
        let t0 = Instant::now();
        let cfg = AuthConfig {
            max_failures: 3,
            ..AuthConfig::default()
        };
        let ledger = Arc::new(FailureLedger::new(1 << 16, t0));
        let shard = |l: &Arc<FailureLedger>| {
            let mut a = Authenticator::new(cfg.clone(), NodeKey::new([7; 32]), t0);
            a.share_failures(l.clone());
            a
        };
        let (mut s0, mut s1) = (shard(&ledger), shard(&ledger));
        let v4 = Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7)));
        s0.fail(t0, v4);
        s1.fail(t0, v4);
        assert!(!s0.is_blocked(t0, v4) && !s1.is_blocked(t0, v4));
        s0.fail(t0, v4);
        assert!(s1.is_blocked(t0, v4), "the third failure, on another shard");
        assert!(!s1.is_blocked(t0 + cfg.block + Duration::from_millis(1), v4));
        let v6 = |s: &str| Some(IpAddr::V6(s.parse().unwrap()));
        for host in ["2001:db8:0:7::1", "2001:db8:0:7::2", "2001:db8:0:7:ffff::3"] {
            s0.fail(t0, v6(host));
        }
        assert!(s1.is_blocked(t0, v6("2001:db8:0:7::99")));
        assert!(!s1.is_blocked(t0, v6("2001:db8:0:8::1")), "another /64");
        // An IPv4-mapped IPv6 address is its IPv4 address.
        assert!(s1.is_blocked(t0, v6("::ffff:192.0.2.7")));
    }

    #[test]
    fn a_nonce_of_an_earlier_life_is_stale() {
        // The same kept secret, an earlier start: its nonce, issued 60 s into that life, is
        // "from the future" for this one (10 s old) and must not be taken as fresh.
        let mut f = fixture(&[Algorithm::Sha256]);
        let earlier = Authenticator::new(
            AuthConfig::default(),
            NodeKey::new([7; 32]),
            f.t0.checked_sub(Duration::from_secs(300))
                .expect("a clock that far back"),
        );
        let future = earlier.nonce(
            f.t0.checked_sub(Duration::from_secs(240)).unwrap(),
            5,
            "example.com",
        );
        let c = f.answer(
            Duration::from_secs(10),
            5,
            Algorithm::Sha256,
            "secret",
            &future,
            1,
            "sip:example.com",
        );
        assert_eq!(c.verdict, Verdict::Challenge { stale: true });
    }

    #[test]
    fn nonce_state_per_flow_is_bounded_and_dies_with_the_flow() {
        let mut f = fixture(&[Algorithm::Sha256]);
        for i in 0..NONCES_PER_FLOW as u64 + 10 {
            let at = Duration::from_secs(i);
            let n = f.auth.nonce(f.t0 + at, 5, "example.com");
            assert!(authenticated(&f.answer(
                at,
                5,
                Algorithm::Sha256,
                "secret",
                &n,
                1,
                "sip:example.com"
            )));
        }
        assert_eq!(f.auth.nonces[&5].len(), NONCES_PER_FLOW);
        f.auth.flow_closed(5);
        assert_eq!(f.auth.flows_tracked(), 0);
    }
}
