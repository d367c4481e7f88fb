//! Registrar logic (RFC 3261 §10.3, with RFC 5626 outbound flows and RFC 5923 connection
//! reuse): pure functions over a [`BindingStore`] that the engine implements per shard.
//!
//! The registrar decides; it owns no table. Registrations are partitioned across shards by
//! [`shard_for`], a pure function of the address-of-record, so every REGISTER and every
//! lookup for one AOR reaches the same shard and its single-owner table.

use crate::header::HeaderName;
use crate::parse::{Essentials, Message};
use crate::text;
use crate::uri::{Scheme, Uri};
use crate::values::NameAddr;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Index of a shard (one executor, one core).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

/// Identifies the connection (flow) a binding was registered over. The engine encodes the
/// owning shard in it; the core treats it as opaque.
pub type FlowId = u64;

/// The one shard function: which shard owns the registrations of `aor` (an AOR as produced
/// by [`aor_of`]). FNV-1a, stable across runs and builds.
pub fn shard_for(aor: &str, shards: usize) -> ShardId {
    assert!(
        shards > 0 && shards <= usize::from(u16::MAX),
        "shard count out of range"
    );
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in aor.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ShardId((h % shards as u64) as u16)
}

/// The canonical address-of-record of a SIP/SIPS URI: `sip:` + unescaped user + `@` +
/// lower-case host (port and parameters dropped; `sips` folds to `sip`). `None` for other
/// schemes or a URI without a user.
pub fn aor_of(uri: &Uri<'_>) -> Option<String> {
    if !uri.is_sip() {
        return None;
    }
    let user = uri.user_unescaped()?;
    let mut s = String::with_capacity(5 + user.len() + uri.host.len());
    s.push_str("sip:");
    for &b in user.iter() {
        // Keep the AOR printable and unambiguous: re-escape what is not plain.
        if b.is_ascii_alphanumeric() || b"-_.!~*'()&=+$,;?/".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s.push('@');
    // One trailing dot (an absolute domain name) names the same host: one AOR, one shard.
    s.push_str(&String::from_utf8_lossy(&uri.host_canonical()));
    Some(s)
}

/// One contact bound to an AOR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The contact URI, with its URI parameters, without header parameters.
    pub contact: String,
    /// Preference, in thousandths (`q=0.5` → 500). Default 1000.
    pub q: u16,
    /// When it expires.
    pub expires_at: Instant,
    /// The expiry granted when it was registered or last refreshed, in seconds: it was
    /// registered at `expires_at` less this ([`Binding::registered_at`]).
    pub granted: u32,
    /// Call-ID of the REGISTER that created or last refreshed it.
    pub call_id: String,
    /// CSeq of that REGISTER.
    pub cseq: u32,
    /// The connection it was registered over; requests for the AOR go out over it.
    pub flow: FlowId,
    /// RFC 5626 `+sip.instance`, if given.
    pub instance: Option<String>,
    /// RFC 5626 `reg-id`, if given.
    pub reg_id: Option<u32>,
    /// The Contact's header parameters other than `expires` and `q`, as written
    /// (`;+sip.instance="<urn:…>";reg-id=1`): echoed in the 200 OK (RFC 5626 §6).
    pub params: String,
    /// The Path the REGISTER came through (RFC 3327), first hop first: requests to this
    /// contact carry it as Route.
    pub path: Vec<String>,
}

impl Binding {
    /// When it was registered or last refreshed.
    pub fn registered_at(&self) -> Instant {
        self.expires_at
            .checked_sub(Duration::from_secs(u64::from(self.granted)))
            .unwrap_or(self.expires_at)
    }
}

/// Are two contact URIs the same but for their port (RFC 3261 §19.1.4 otherwise)?
fn same_but_port(a: &str, b: &str) -> bool {
    match (Uri::parse(a.as_bytes()), Uri::parse(b.as_bytes())) {
        (Ok(x), Ok(y)) => x.equivalent_but_port(&y),
        _ => false,
    }
}

/// Are two contact URIs one (RFC 3261 §10.3 step 7 compares them by §19.1.4: a refresh that
/// orders the parameters otherwise, or escapes the user part, is the same contact)?
pub fn same_contact(a: &str, b: &str) -> bool {
    // A refresh usually writes its Contact as before: no parse for that.
    if a == b {
        return true;
    }
    match (Uri::parse(a.as_bytes()), Uri::parse(b.as_bytes())) {
        (Ok(x), Ok(y)) => x.equivalent(&y),
        _ => a.eq_ignore_ascii_case(b),
    }
}

impl Binding {
    fn same_key(&self, other: &Binding) -> bool {
        match (&self.instance, self.reg_id, &other.instance, other.reg_id) {
            (Some(a), Some(ra), Some(b), Some(rb)) => a == b && ra == rb,
            // The same device (RFC 5626 §4.1: the instance ID is the UA's, for good),
            // whatever address its contact names now.
            (Some(a), None, Some(b), None) => a == b,
            _ => same_contact(&self.contact, &other.contact),
        }
    }
}

/// Where bindings live. The engine implements it with a per-shard table; the registrar
/// only calls these methods.
pub trait BindingStore {
    /// Current bindings of `aor` (possibly including expired ones; the registrar filters).
    fn get(&self, aor: &str) -> &[Binding];
    /// Replaces the bindings of `aor`; an empty vector removes the AOR.
    fn put(&mut self, aor: &str, bindings: Vec<Binding>);
}

/// The AORs that registered recently, so a lookup can tell "registered once, not now" (480)
/// from "never heard of" (404) — bounded, because every AOR in it came from a peer.
///
/// Two generations: names go into the current one; when it holds half the capacity it
/// becomes the previous one (the older generation is dropped). A name is known while it is
/// in either, so at most `capacity` names are held, each insert costs O(1) amortized, and an
/// AOR is forgotten only after at least `capacity / 2` newer registrations.
#[derive(Debug)]
pub struct KnownAors {
    current: std::collections::HashSet<Box<str>>,
    previous: std::collections::HashSet<Box<str>>,
    half: usize,
}

impl KnownAors {
    /// A set holding at most `capacity` names (at least 2).
    pub fn new(capacity: usize) -> KnownAors {
        KnownAors {
            current: Default::default(),
            previous: Default::default(),
            half: (capacity / 2).max(1),
        }
    }

    /// Remembers `aor`.
    pub fn insert(&mut self, aor: &str) {
        if self.current.contains(aor) {
            return;
        }
        if self.current.len() >= self.half {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(aor.into());
    }

    /// Did `aor` register recently?
    pub fn contains(&self, aor: &str) -> bool {
        self.current.contains(aor) || self.previous.contains(aor)
    }

    /// Names held (both generations; one name may count twice).
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Is it empty?
    pub fn is_empty(&self) -> bool {
        self.current.is_empty() && self.previous.is_empty()
    }
}

/// A `HashMap` store: what the engine uses per shard, and what tests use.
///
/// Every operation costs what it touches, not the table's size (the registrar must stay fast
/// at millions of AORs): the binding count is kept, not summed; expiries sit in a wheel of
/// one-second buckets (a small ordered map of seconds, so a refresh touches no big tree), and
/// a purge visits only due buckets; flows are indexed to the AORs they hold, so a closed
/// connection removes its bindings without a scan.
///
/// The wheel is lazy: an AOR is filed under the second its earliest binding expires, and
/// filed again only when that moves earlier; an entry found early (the AOR was refreshed) is
/// filed again at its new time, one found for a removed AOR is dropped. Whenever the wheel
/// holds more than twice the AORs (plus 1024) it is rebuilt from the table, so it stays
/// within that bound at O(1) amortized cost per operation.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: HashMap<Rc<str>, Vec<Binding>>,
    bindings: usize,
    /// Second (since `base`, rounded up) → AORs filed there.
    wheel: BTreeMap<u64, Vec<Rc<str>>>,
    wheel_len: usize,
    base: Option<Instant>,
    /// Flow → AORs with at least one binding over it (with multiplicity per binding).
    by_flow: HashMap<FlowId, Vec<Rc<str>>>,
    /// When tracking ([`MemoryStore::track_flows`]): bindings gained (+) or lost (−) per flow
    /// since the last [`MemoryStore::take_flow_changes`].
    flow_changes: Option<HashMap<FlowId, i64>>,
    /// When tracking: (flow, AOR) pairs whose last binding over that flow went, other than
    /// by the flow's close, since the last [`MemoryStore::take_released`].
    released: Vec<(FlowId, Rc<str>)>,
}

/// Notes `old` → `new` in a flow ledger.
fn note_flows(ledger: &mut Option<HashMap<FlowId, i64>>, old: &[Binding], new: &[Binding]) {
    let Some(l) = ledger else { return };
    for b in old {
        *l.entry(b.flow).or_default() -= 1;
    }
    for b in new {
        *l.entry(b.flow).or_default() += 1;
    }
}

fn earliest(bindings: &[Binding]) -> Option<Instant> {
    bindings.iter().map(|b| b.expires_at).min()
}

impl MemoryStore {
    /// Number of AORs with bindings.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Is the table empty?
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The AORs with bindings (O(AORs): for a rare full rewrite, never per message).
    pub fn aors(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(|k| &**k)
    }

    /// Total bindings (kept, not counted: O(1)).
    pub fn bindings(&self) -> usize {
        self.bindings
    }

    /// Keeps a ledger of bindings gained and lost per flow (every change: REGISTER, expiry,
    /// a flow's close), for the engine's per-source count; drain it with
    /// [`MemoryStore::take_flow_changes`] after each operation.
    pub fn track_flows(&mut self) {
        self.flow_changes.get_or_insert_with(HashMap::new);
    }

    /// The ledger since the last call: (flow, bindings gained − lost), zeros left out.
    pub fn take_flow_changes(&mut self) -> Vec<(FlowId, i64)> {
        match &mut self.flow_changes {
            Some(l) => l.drain().filter(|(_, d)| *d != 0).collect(),
            None => Vec::new(),
        }
    }

    /// (flow, AOR) pairs whose flow no longer holds a binding of the AOR (expired, removed
    /// by `Contact: *` or by another device of the AOR, made room for, or unregistered),
    /// since the last call; only while tracking. The connection's places for AORs follow it.
    pub fn take_released(&mut self) -> Vec<(FlowId, Rc<str>)> {
        std::mem::take(&mut self.released)
    }

    /// The wheel's second for `t`: rounded up (an AOR is never looked at before it is due).
    fn second_after(&mut self, t: Instant) -> u64 {
        // A day before the first time seen: times before the base all land in second 0.
        let base = *self
            .base
            .get_or_insert_with(|| t.checked_sub(Duration::from_secs(86_400)).unwrap_or(t));
        let d = t.saturating_duration_since(base);
        d.as_secs() + u64::from(d.subsec_nanos() > 0)
    }

    /// The wheel's second for `now`, rounded down.
    fn second_before(&self, now: Instant) -> u64 {
        self.base
            .map_or(0, |b| now.saturating_duration_since(b).as_secs())
    }

    fn file(&mut self, at: Instant, aor: Rc<str>) {
        let s = self.second_after(at);
        self.file_in(s, aor);
    }

    fn file_in(&mut self, s: u64, aor: Rc<str>) {
        self.wheel.entry(s).or_default().push(aor);
        self.wheel_len += 1;
        if self.wheel_len > 2 * self.map.len() + 1024 {
            self.rebuild_wheel();
        }
    }

    fn rebuild_wheel(&mut self) {
        let filed: Vec<(Instant, Rc<str>)> = self
            .map
            .iter()
            .filter_map(|(k, v)| Some((earliest(v)?, k.clone())))
            .collect();
        self.wheel.clear();
        self.wheel_len = filed.len();
        for (t, k) in filed {
            let s = self.second_after(t);
            self.wheel.entry(s).or_default().push(k);
        }
    }

    /// Entries held by the expiry wheel (at most twice the AORs, plus 1024).
    pub fn wheel_len(&self) -> usize {
        self.wheel_len
    }

    /// Drops expired bindings and empty AORs; returns how many bindings were removed.
    /// Visits only the AORs filed in seconds that are due.
    pub fn purge(&mut self, now: Instant) -> usize {
        let due = self.second_before(now);
        let mut removed = 0;
        while let Some(entry) = self.wheel.first_entry() {
            if *entry.key() > due {
                break;
            }
            let aors = entry.remove();
            self.wheel_len -= aors.len();
            for aor in aors {
                let Some(old) = self.map.get(&aor) else {
                    continue; // removed since it was filed
                };
                let Some(t) = earliest(old) else { continue };
                if t > now {
                    // Refreshed since it was filed: file it again at its time (after this
                    // purge's seconds whatever the rounding, so the loop ends).
                    let s = self.second_after(t).max(due + 1);
                    self.file_in(s, aor);
                    continue;
                }
                let live: Vec<Binding> =
                    old.iter().filter(|b| b.expires_at > now).cloned().collect();
                removed += old.len() - live.len();
                if let Some(t) = earliest(&live) {
                    // `put` files an AOR only when its expiry moves earlier; this one's entry
                    // was just taken from the wheel.
                    let s = self.second_after(t).max(due + 1);
                    self.file_in(s, aor.clone());
                }
                self.put(&aor, live);
            }
        }
        removed
    }

    /// The AORs with bindings over `flow` (O(its AORs)).
    pub fn flow_aors(&self, flow: FlowId) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_flow
            .get(&flow)
            .map(|a| a.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v.dedup();
        v
    }

    /// A flow died: drop every binding registered over it (RFC 5626 §5.2: a failed flow is
    /// not used). Returns how many were removed. Visits only the AORs that flow holds.
    pub fn remove_flow(&mut self, flow: FlowId) -> usize {
        let Some(mut aors) = self.by_flow.remove(&flow) else {
            return 0;
        };
        aors.sort();
        aors.dedup();
        let mut removed = 0;
        for aor in aors {
            let Some(old) = self.map.get(&aor) else {
                continue;
            };
            // The flow's index entries went with its list; the other bindings' stay, and
            // the wheel entry (filed at an expiry no later than what remains) refiles itself.
            let keep: Vec<Binding> = old.iter().filter(|b| b.flow != flow).cloned().collect();
            let gone = old.len() - keep.len();
            if let Some(l) = &mut self.flow_changes {
                *l.entry(flow).or_default() -= gone as i64;
            }
            removed += gone;
            self.bindings -= gone;
            if keep.is_empty() {
                self.map.remove(&aor);
            } else if let Some(v) = self.map.get_mut(&aor) {
                *v = keep;
            }
        }
        removed
    }
}

/// Removes `aor`'s binding of `contact` with Path `path` registered over `flow` (an edge
/// proxy answered 430 Flow Failed for it: RFC 5626 §5.3, §7). True when there was one.
/// The Path counts: behind an edge the connection (and often the contact) is the same for
/// every registration of a device, and a binding registered again since holds a new one.
pub fn remove_binding(
    store: &mut impl BindingStore,
    aor: &str,
    flow: FlowId,
    contact: &str,
    path: &[String],
) -> bool {
    let same_path =
        |b: &Binding| b.path.len() == path.len() && b.path.iter().all(|p| path.contains(p));
    let old = store.get(aor);
    let keep: Vec<Binding> = old
        .iter()
        .filter(|b| !(b.flow == flow && b.contact == contact && same_path(b)))
        .cloned()
        .collect();
    if keep.len() == old.len() {
        return false;
    }
    store.put(aor, keep);
    true
}

/// Updates the flow index of `aor` from `old` to `new` bindings: flows that stay are not
/// touched (a refresh over the same connection costs no index work).
fn reindex(
    by_flow: &mut HashMap<FlowId, Vec<Rc<str>>>,
    aor: &Rc<str>,
    old: &[Binding],
    new: &[Binding],
    released: Option<&mut Vec<(FlowId, Rc<str>)>>,
) {
    let mut released = released;
    let mut unmatched: Vec<FlowId> = new.iter().map(|b| b.flow).collect();
    for b in old {
        if let Some(i) = unmatched.iter().position(|f| *f == b.flow) {
            unmatched.swap_remove(i);
            continue;
        }
        if let Some(v) = by_flow.get_mut(&b.flow) {
            if let Some(i) = v.iter().position(|a| a == aor) {
                v.swap_remove(i);
            }
            if let Some(r) = released.as_deref_mut()
                && !v.contains(aor)
            {
                r.push((b.flow, aor.clone()));
            }
            if v.is_empty() {
                by_flow.remove(&b.flow);
            }
        }
    }
    for f in unmatched {
        by_flow.entry(f).or_default().push(aor.clone());
    }
}

impl BindingStore for MemoryStore {
    fn get(&self, aor: &str) -> &[Binding] {
        self.map.get(aor).map_or(&[], Vec::as_slice)
    }

    fn put(&mut self, aor: &str, mut bindings: Vec<Binding>) {
        // Stored for the registration's life: no spare capacity (a pushed-to Vec has room for
        // four bindings; most AORs have one).
        bindings.shrink_to_fit();
        let new = earliest(&bindings);
        let existing = self.map.get_key_value(aor).map(|(k, _)| k.clone());
        let (key, old) = match existing {
            None if bindings.is_empty() => return,
            None => {
                let key: Rc<str> = Rc::from(aor);
                reindex(&mut self.by_flow, &key, &[], &bindings, None);
                note_flows(&mut self.flow_changes, &[], &bindings);
                self.bindings += bindings.len();
                self.map.insert(key.clone(), bindings);
                (key, None)
            }
            // Emptied: its wheel entries are dropped when they come due.
            Some(key) if bindings.is_empty() => {
                let old = self.map.remove(&key).unwrap_or_default();
                let released = self.flow_changes.is_some().then_some(&mut self.released);
                reindex(&mut self.by_flow, &key, &old, &[], released);
                note_flows(&mut self.flow_changes, &old, &[]);
                self.bindings -= old.len();
                return;
            }
            Some(key) => {
                let slot = self.map.get_mut(&key).expect("just found");
                let released = self.flow_changes.is_some().then_some(&mut self.released);
                reindex(&mut self.by_flow, &key, slot, &bindings, released);
                note_flows(&mut self.flow_changes, slot, &bindings);
                self.bindings = self.bindings - slot.len() + bindings.len();
                let old = std::mem::replace(slot, bindings);
                (key, earliest(&old))
            }
        };
        // Filed again only when its expiry moved earlier than where it is filed.
        if let Some(t) = new
            && old.is_none_or(|o| t < o)
        {
            self.file(t, key);
        }
    }
}

/// Most Path entries kept with a binding (RFC 3327): each becomes a Route line on every
/// request forwarded to it.
pub const MAX_PATH: usize = 8;

/// Registrar settings (all expiries in seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrarConfig {
    /// Shortest accepted non-zero expiry; shorter ones get 423 with `Min-Expires`. Default 60.
    pub min_expires: u32,
    /// Longest granted expiry; longer requests are shortened. Default 3600.
    pub max_expires: u32,
    /// Expiry when the request gives none. Default 3600.
    pub default_expires: u32,
    /// Most contacts per AOR; more gets 403. Default 10.
    pub max_contacts: usize,
    /// Longest Contact value stored (URI and parameters), and longest Path (its values
    /// together), in bytes; longer gets 400: a binding's memory is bounded whatever the
    /// message size. Default 1024.
    pub max_contact_bytes: usize,
}

impl Default for RegistrarConfig {
    fn default() -> Self {
        RegistrarConfig {
            min_expires: 60,
            max_expires: 3600,
            default_expires: 3600,
            max_contacts: 10,
            max_contact_bytes: 1024,
        }
    }
}

/// The registrar's answer: the status and the header lines to add to the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub code: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// Header lines (`Contact`, `Min-Expires`, `Require`, …).
    pub headers: Vec<(&'static str, Vec<u8>)>,
    /// After a 200: the connection the REGISTER came on holds a binding of the AOR now (an
    /// unregistration, or a move to another connection, leaves it none: its place among the
    /// connection's AORs is free again).
    pub flow_holds: bool,
}

impl Reply {
    fn err(code: u16, reason: &'static str) -> Reply {
        Reply {
            code,
            reason,
            headers: Vec::new(),
            flow_holds: false,
        }
    }
}

/// The registrar; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct Registrar {
    cfg: RegistrarConfig,
}

/// A REGISTER's Contact, parsed.
struct NewContact {
    binding: Binding,
    expires: u32,
}

fn parse_q(v: &[u8]) -> Option<u16> {
    // qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
    let (int, frac) = match memchr::memchr(b'.', v) {
        Some(d) => (&v[..d], &v[d + 1..]),
        None => (v, &b""[..]),
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut f: u16 = 0;
    for i in 0..3 {
        f = f * 10 + frac.get(i).map_or(0, |d| u16::from(d - b'0'));
    }
    match int {
        b"0" => Some(f),
        b"1" if f == 0 => Some(1000),
        _ => None,
    }
}

/// Does this REGISTER remove any binding (`Contact: *`, or a Contact with expiry 0 by its
/// `expires` or the Expires header)?
pub fn removes_any(msg: &Message<'_, '_>) -> bool {
    let header_zero = msg
        .header(HeaderName::Expires)
        .is_some_and(|h| parse_expires(h.value) == Some(0));
    msg.values(HeaderName::Contact).iter().any(|c| {
        if c.value == b"*" {
            return header_zero;
        }
        NameAddr::parse(c.value).is_some_and(|na| match na.param("expires") {
            Some(v) => v.and_then(parse_expires) == Some(0),
            None => header_zero,
        })
    })
}

/// Does this REGISTER only remove bindings (`Contact: *`, or every Contact with expiry 0 by
/// its `expires` or the Expires header)? What one cluster node may send another
/// ([`removals_for_nodes`]): it changes nothing but the receiver's own bindings.
pub fn removes_only(msg: &Message<'_, '_>) -> bool {
    let header_zero = msg
        .header(HeaderName::Expires)
        .is_some_and(|h| parse_expires(h.value) == Some(0));
    let Some(contacts) = msg.try_values(HeaderName::Contact) else {
        return false;
    };
    !contacts.is_empty()
        && contacts.iter().all(|c| {
            if c.value == b"*" {
                return header_zero;
            }
            NameAddr::parse(c.value).is_some_and(|na| match na.param("expires") {
                Some(v) => v.and_then(parse_expires) == Some(0),
                None => header_zero,
            })
        })
}

/// What a REGISTER this node accepted removes from the bindings other cluster nodes hold
/// for its AOR, as Contact values of a removal-only REGISTER: `*` for `Contact: *`; each
/// contact it removes (expiry 0); each `+sip.instance` it binds here (the device moved to
/// this node: its binding elsewhere, keyed by instance and reg-id, is stale); and each plain
/// contact it binds here (the same AOR and contact URI are the same binding, RFC 3261
/// §10.3: held elsewhere, it is the device's old one). The engine asks only when the
/// REGISTER binds something new here or removes something. `None`: nothing to remove
/// elsewhere. Only the node holding a binding writes it (its field in the
/// location store, its tables), so each holder is sent these and applies them under the
/// usual Call-ID/CSeq rules.
pub fn removals_for_nodes(msg: &Message<'_, '_>) -> Option<Vec<String>> {
    let contacts = msg.try_values(HeaderName::Contact)?;
    if contacts.iter().any(|c| c.value == b"*") {
        return Some(vec!["*".into()]);
    }
    let outbound = msg
        .values(HeaderName::Supported)
        .iter()
        .any(|v| text::eq_ic(v.value, b"outbound"));
    let mut out = Vec::new();
    for c in &contacts {
        let Some(na) = NameAddr::parse(c.value) else {
            continue;
        };
        let instance = na.param("+sip.instance").flatten();
        let mut v = format!("<{}>", String::from_utf8_lossy(na.uri));
        if let Some(i) = instance {
            v.push_str(";+sip.instance=");
            v.push_str(&String::from_utf8_lossy(i));
            // A reg-id counts only where the UA did outbound (else the bindings are keyed
            // by instance alone, here and there).
            if outbound && let Some(Some(r)) = na.param("reg-id") {
                v.push_str(";reg-id=");
                v.push_str(&String::from_utf8_lossy(r));
            }
        }
        v.push_str(";expires=0");
        out.push(v);
    }
    (!out.is_empty()).then_some(out)
}

/// A Call-ID as a binding keeps it: as written up to 64 bytes, else a digest of it (only
/// equality is ever asked of it). A Call-ID is bounded only by the header-line limit
/// (8 KiB): ten contacts of one REGISTER kept 80 KiB of it, outside the binding's bound
/// (`max_contact_bytes`).
fn stored_call_id(call_id: &[u8]) -> String {
    use sha2::Digest;
    if call_id.len() <= 64 {
        return String::from_utf8_lossy(call_id).into_owned();
    }
    let d = sha2::Sha256::digest(call_id);
    let mut s = String::with_capacity(1 + 32);
    s.push('#');
    for b in &d[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses an expiry, saturating overlarge values (RFC 4475 §3.1.2.4 allows treating them as
/// the maximum).
fn parse_expires(v: &[u8]) -> Option<u32> {
    text::parse_u32_saturating(v)
}

impl Registrar {
    /// A registrar with this configuration.
    pub fn new(cfg: RegistrarConfig) -> Self {
        Registrar { cfg }
    }

    /// The configuration.
    pub fn config(&self) -> &RegistrarConfig {
        &self.cfg
    }

    /// The AOR a REGISTER is for (from `To`), or the reply that rejects it.
    pub fn aor(&self, ess: &Essentials<'_>) -> Result<String, Reply> {
        let uri = ess.to.uri();
        if !matches!(uri.scheme, Scheme::Sip | Scheme::Sips) {
            return Err(Reply::err(400, "To Must Be a SIP AOR"));
        }
        aor_of(&uri).ok_or_else(|| Reply::err(400, "To Must Be a SIP AOR"))
    }

    /// Handles a validated REGISTER that arrived over `flow`, updating `store` for `aor`
    /// (from [`Registrar::aor`]), and returns the reply. Never partially applies: on any
    /// error the store is untouched.
    pub fn handle_register(
        &self,
        now: Instant,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
        aor: &str,
        flow: FlowId,
        store: &mut impl BindingStore,
    ) -> Reply {
        // A malformed expiry (an RFC 2543 date a legacy ATA still sends) counts as the
        // default (RFC 3261 §10.2.1.1, §20.19: "SHOULD be treated as 3600").
        let header_expires = msg
            .header(HeaderName::Expires)
            .map(|h| parse_expires(h.value).unwrap_or(self.cfg.default_expires));
        let call_id = stored_call_id(ess.call_id);
        let cseq = ess.cseq.seq;
        // Unfolded as it is stored: it goes out as Route on every request to the binding
        // (a fold kept in it would be a header of its own to the edge proxy downstream).
        let path: Vec<String> = msg
            .values(HeaderName::Path)
            .iter()
            .map(|v| String::from_utf8_lossy(v.value).replace(['\r', '\n'], " "))
            .collect();
        // Stored with every binding and replayed as Route on each request to it: bounded
        // like the Contact it goes with.
        if path.len() > MAX_PATH
            || path.iter().map(|p| p.len() + 2).sum::<usize>() > self.cfg.max_contact_bytes
        {
            return Reply::err(400, "Path Too Long");
        }
        let echo_path = !path.is_empty()
            && msg
                .values(HeaderName::Supported)
                .iter()
                .any(|v| text::eq_ic(v.value, b"path"));
        let Some(contacts) = msg.try_values(HeaderName::Contact) else {
            return Reply::err(400, "Bad Contact");
        };
        let existing = store.get(aor);

        // Contact: * (remove all) — only alone and with Expires: 0.
        if contacts.iter().any(|c| c.value == b"*") {
            if contacts.len() != 1 || header_expires != Some(0) {
                return Reply::err(400, "Wildcard Contact Needs Expires 0");
            }
            // Against live bindings only (`get` may still hold expired ones, as below).
            if existing
                .iter()
                .any(|b| b.expires_at > now && b.call_id == call_id && b.cseq >= cseq)
            {
                return Reply::err(400, "Out of Order CSeq");
            }
            store.put(aor, Vec::new());
            return self.ok(now, &[], false, &[]);
        }

        // Before any contact is parsed or compared (each new one is compared with every
        // binding: quadratic in the count): a REGISTER may remove each binding it may keep
        // and name as many new ones, no more. One with thousands of contacts inside the
        // message limit cost its shard a second or more before the 403 below.
        if contacts.len() > 2 * self.cfg.max_contacts {
            return Reply::err(403, "Too Many Contacts");
        }
        // RFC 5626 §6: without `Supported: outbound` the contact is an RFC 3261 binding and
        // its reg-id is ignored, malformed or not.
        let asked_outbound = msg
            .values(HeaderName::Supported)
            .iter()
            .any(|v| text::eq_ic(v.value, b"outbound"));
        let mut new = Vec::with_capacity(contacts.len());
        let mut outbound = false;
        for c in &contacts {
            let Some(na) = NameAddr::parse(c.value) else {
                return Reply::err(400, "Bad Contact");
            };
            if c.value.len() > self.cfg.max_contact_bytes {
                return Reply::err(400, "Contact Too Long");
            }
            let expires = match na.param("expires") {
                Some(v) => v
                    .and_then(parse_expires)
                    .unwrap_or(self.cfg.default_expires),
                None => header_expires.unwrap_or(self.cfg.default_expires),
            };
            if expires != 0 && expires < self.cfg.min_expires {
                return Reply {
                    code: 423,
                    reason: "Interval Too Brief",
                    headers: vec![("Min-Expires", self.cfg.min_expires.to_string().into_bytes())],
                    flow_holds: false,
                };
            }
            let q = match na.param("q") {
                Some(Some(v)) => match parse_q(v) {
                    Some(q) => q,
                    None => return Reply::err(400, "Bad q-value"),
                },
                Some(None) => return Reply::err(400, "Bad q-value"),
                None => 1000,
            };
            // Unfolded as they are stored, as Path is: they go out in the Contact of every
            // later 200 (a fold kept in them would be a header of its own to an edge proxy).
            let instance = na
                .param("+sip.instance")
                .flatten()
                .map(|v| String::from_utf8_lossy(v).replace(['\r', '\n'], " "));
            let reg_id = match na.param("reg-id") {
                // A reg-id without an instance ID is ignored (RFC 5626 §6).
                _ if instance.is_none() => None,
                Some(v) if !asked_outbound => v.and_then(text::parse_u32),
                Some(Some(v)) => match text::parse_u32(v) {
                    Some(r) => Some(r),
                    None => return Reply::err(400, "Bad reg-id"),
                },
                Some(None) => return Reply::err(400, "Bad reg-id"),
                None => None,
            };
            let expires = expires.min(self.cfg.max_expires);
            let mut params = String::new();
            let _ = text::for_each_param(na.params, |name, value| {
                if text::eq_ic(name, b"expires") || text::eq_ic(name, b"q") {
                    return;
                }
                params.push(';');
                params.push_str(&String::from_utf8_lossy(name));
                if let Some(v) = value {
                    params.push('=');
                    params.push_str(&String::from_utf8_lossy(v));
                }
            });
            if params.contains(['\r', '\n']) {
                params = params.replace(['\r', '\n'], " ");
            }
            new.push(NewContact {
                binding: Binding {
                    contact: String::from_utf8_lossy(na.uri).into_owned(),
                    q,
                    expires_at: now + Duration::from_secs(u64::from(expires)),
                    granted: expires,
                    call_id: call_id.clone(),
                    cseq,
                    flow,
                    instance,
                    reg_id,
                    params,
                    path: path.clone(),
                },
                expires,
            });
        }

        // RFC 5626 §6: outbound applies when the UA asked for it (Supported: outbound) at
        // the first hop, or behind an edge proxy that did it (`ob` on the first Path URI).
        // Otherwise reg-id is ignored (the binding is an RFC 3261 one, keyed by contact) —
        // or, when the UA asked through an edge without it, 439.
        let with_reg_id = new.iter().filter(|c| c.binding.reg_id.is_some()).count();
        if with_reg_id > 0 {
            let asked = asked_outbound;
            // The first hop is us when the REGISTER has one Via; else the edge proxy that
            // added the first Path URI must have said `ob` (one that added no Path cannot
            // keep the flow).
            let first_hop_ok = match path.first() {
                Some(p) => {
                    NameAddr::parse(p.as_bytes()).is_some_and(|na| na.uri().param("ob").is_some())
                }
                None => ess.via_count == 1,
            };
            if asked && !first_hop_ok {
                return Reply::err(439, "First Hop Lacks Outbound Support");
            }
            // Flows a device registers at once; removing several (expires=0) is fine.
            let binding_reg_ids = new
                .iter()
                .filter(|c| c.binding.reg_id.is_some() && c.expires != 0)
                .count();
            if asked && binding_reg_ids > 1 {
                return Reply::err(400, "More Than One reg-id");
            }
            for c in &mut new {
                if asked {
                    outbound |= c.binding.instance.is_some() && c.binding.reg_id.is_some();
                } else {
                    c.binding.reg_id = None;
                }
            }
        }

        // Apply to a copy of the live bindings, then store it whole. `fresh`: which of them
        // this REGISTER set. A contact updates the binding with its very URI, else one of
        // the same key this REGISTER has not set: two contacts of one instance in one
        // REGISTER (a dual-stack phone's, or a moved phone's new one and its old one with
        // expires=0) are two updates, not one binding updated twice (which failed the CSeq
        // check against the request itself, or removed what the request had just added).
        let mut result: Vec<Binding> = existing
            .iter()
            .filter(|b| b.expires_at > now)
            .cloned()
            .collect();
        let mut fresh = vec![false; result.len()];
        for nc in new {
            let b = &nc.binding;
            let at = result
                .iter()
                .position(|o| o.same_key(b) && same_contact(&o.contact, &b.contact))
                .or_else(|| (0..result.len()).find(|&i| !fresh[i] && result[i].same_key(b)));
            match at {
                Some(i) => {
                    let old = &result[i];
                    // §10.3 step 7: against what was registered before, not this request.
                    if !fresh[i] && old.call_id == b.call_id && old.cseq >= cseq {
                        return Reply::err(400, "Out of Order CSeq");
                    }
                    if nc.expires == 0 {
                        result.remove(i);
                        fresh.remove(i);
                    } else {
                        result[i] = nc.binding;
                        fresh[i] = true;
                    }
                }
                None if nc.expires == 0 => {}
                None => {
                    // The same UA in the same boot cycle (its Call-ID, RFC 3261 §10.2.4)
                    // registering, over a new connection, the contact it had but for the
                    // port has reconnected: a phone whose contact names its ephemeral
                    // port. Its old binding goes, or each reconnection would add one until
                    // the AOR is full. Another address (a dual-stack UA's second flow) is a
                    // second binding, as RFC 3261 has it.
                    let mut i = 0;
                    while i < result.len() {
                        let o = &result[i];
                        if o.call_id == b.call_id
                            && o.flow != b.flow
                            && o.reg_id.is_none()
                            && o.cseq < b.cseq
                            && same_but_port(&o.contact, &b.contact)
                        {
                            result.remove(i);
                            fresh.remove(i);
                        } else {
                            i += 1;
                        }
                    }
                    result.push(nc.binding);
                    fresh.push(true);
                }
            }
        }
        if result.len() > self.cfg.max_contacts {
            // Full: the bindings this REGISTER did not name go, the one refreshed longest
            // ago (first to expire) first — the AOR's own devices make room for the one
            // registering now, rather than locking it out (403) until the stale ones
            // expire. A REGISTER that names more contacts than the limit is refused.
            let named = |b: &Binding| b.call_id == call_id && b.cseq == cseq;
            if result.iter().filter(|b| named(b)).count() > self.cfg.max_contacts {
                return Reply::err(403, "Too Many Contacts");
            }
            while result.len() > self.cfg.max_contacts {
                let oldest = result
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| !named(b))
                    .min_by_key(|(_, b)| b.registered_at())
                    .map(|(i, _)| i)
                    .expect("more bindings than this REGISTER named");
                result.remove(oldest);
            }
        }
        result.sort_by_key(|b| std::cmp::Reverse(b.q));
        let mut reply = self.ok(now, &result, outbound, if echo_path { &path } else { &[] });
        reply.flow_holds = result.iter().any(|b| b.flow == flow);
        store.put(aor, result);
        reply
    }

    fn ok(&self, now: Instant, bindings: &[Binding], outbound: bool, path: &[String]) -> Reply {
        let mut headers = Vec::with_capacity(bindings.len() + 1 + path.len());
        for b in bindings {
            // Rounded up: a live binding never reads `expires=0`, which says it went
            // (RFC 3261 §10.2.2) to a UA that lists it.
            let left = b.expires_at.saturating_duration_since(now);
            let left = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            let mut v = format!("<{}>;expires={left}", b.contact);
            if b.q != 1000 {
                v.push_str(&format!(";q={}.{:03}", b.q / 1000, b.q % 1000));
            }
            v.push_str(&b.params);
            headers.push(("Contact", v.into_bytes()));
        }
        if outbound {
            headers.push(("Require", b"outbound".to_vec()));
        }
        for p in path {
            headers.push(("Path", p.clone().into_bytes()));
        }
        Reply {
            code: 200,
            reason: "OK",
            headers,
            flow_holds: false,
        }
    }

    /// The live bindings of `aor`, best `q` first: the targets a proxy forks to.
    pub fn lookup<'s>(
        &self,
        now: Instant,
        store: &'s impl BindingStore,
        aor: &str,
    ) -> Vec<&'s Binding> {
        let mut v = live_best_first(now, store, aor);
        // One flow per device (RFC 5626 §5.3): its other flows (reg-ids) are for when
        // that one fails, not a second ring on the same phone.
        let mut seen: Vec<&str> = Vec::new();
        v.retain(|b| match (&b.instance, b.reg_id) {
            (Some(i), Some(_)) if seen.contains(&i.as_str()) => false,
            (Some(i), Some(_)) => {
                seen.push(i);
                true
            }
            _ => true,
        });
        v
    }

    /// What the proxy routes to for `aor`: [`Registrar::lookup`]'s bindings, each with the
    /// same device's other flows (RFC 5626 §5.3: other reg-ids, best first), to be tried
    /// when its flow fails with the request on it.
    pub fn reaches(
        &self,
        now: Instant,
        store: &impl BindingStore,
        aor: &str,
    ) -> Vec<crate::proxy::Reach> {
        let v = live_best_first(now, store, aor);
        let mut out: Vec<crate::proxy::Reach> = Vec::with_capacity(v.len());
        let mut devices: Vec<(&str, usize)> = Vec::new();
        for b in v {
            match (&b.instance, b.reg_id) {
                (Some(i), Some(_)) => match devices.iter().find(|(d, _)| d == i) {
                    Some(&(_, at)) => out[at].fallbacks.push(crate::proxy::Reach::of(b)),
                    None => {
                        devices.push((i, out.len()));
                        out.push(crate::proxy::Reach::of(b));
                    }
                },
                _ => out.push(crate::proxy::Reach::of(b)),
            }
        }
        out
    }
}

/// The live bindings of `aor`: best `q` first; among equals, the most recently refreshed
/// (not the one that expires last: a phone that registered again for 600 s over a new flow,
/// the old one's 3600 s still running, was sent over the old one first).
fn live_best_first<'s>(now: Instant, store: &'s impl BindingStore, aor: &str) -> Vec<&'s Binding> {
    let mut v: Vec<_> = store
        .get(aor)
        .iter()
        .filter(|b| b.expires_at > now)
        .collect();
    v.sort_by_key(|b| (std::cmp::Reverse(b.q), std::cmp::Reverse(b.registered_at())));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::Header;
    use crate::parse::{Framing, Limits, Status, parse};

    fn register(
        reg: &Registrar,
        store: &mut MemoryStore,
        now: Instant,
        extra: &str,
        cseq: u32,
        flow: FlowId,
    ) -> Reply {
        register_call(reg, store, now, "reg-1", extra, cseq, flow)
    }

    /// [`register`] with its own Call-ID.
    fn register_call(
        reg: &Registrar,
        store: &mut MemoryStore,
        now: Instant,
        call_id: &str,
        extra: &str,
        cseq: u32,
        flow: FlowId,
    ) -> Reply {
        let msg = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bK{cseq}\r\nTo: <sip:alice@Example.COM>\r\nFrom: <sip:alice@example.com>;tag=1\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        let mut h = [Header::EMPTY; 32];
        let Ok(Status::Complete(m)) =
            parse(msg.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
        else {
            panic!("parse")
        };
        let ess = match m.validate(&Limits::default()) {
            Ok(e) => e,
            Err(e) => return Reply::err(e.response().0, e.response().1),
        };
        let aor = reg.aor(&ess).unwrap();
        assert_eq!(aor, "sip:alice@example.com");
        reg.handle_register(now, &m, &ess, &aor, flow, store)
    }

    #[test]
    fn register_refresh_remove() {
        let reg = Registrar::default();
        let mut st = MemoryStore::default();
        let t0 = Instant::now();
        let r = register(
            &reg,
            &mut st,
            t0,
            "Contact: <sip:alice@10.0.0.1:5061;transport=tls>;q=0.5, <sip:alice@10.0.0.2>\r\nExpires: 600\r\n",
            1,
            7,
        );
        assert_eq!(r.code, 200);
        assert_eq!(r.headers.len(), 2);
        assert_eq!(r.headers[0].1, b"<sip:alice@10.0.0.2>;expires=600");
        assert_eq!(
            r.headers[1].1,
            b"<sip:alice@10.0.0.1:5061;transport=tls>;expires=600;q=0.500"
        );
        let b = reg.lookup(t0, &st, "sip:alice@example.com");
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].flow, 7);
        // Refresh one with a contact expires param overriding Expires.
        let r = register(
            &reg,
            &mut st,
            t0 + Duration::from_secs(10),
            "Contact: <sip:alice@10.0.0.2>;expires=120\r\nExpires: 600\r\n",
            2,
            8,
        );
        assert_eq!(r.code, 200);
        assert!(
            r.headers
                .iter()
                .any(|(_, v)| v == b"<sip:alice@10.0.0.2>;expires=120")
        );
        // Stale CSeq is refused and changes nothing.
        let r = register(
            &reg,
            &mut st,
            t0,
            "Contact: <sip:alice@10.0.0.2>;expires=0\r\n",
            2,
            8,
        );
        assert_eq!((r.code, st.bindings()), (400, 2));
        // Expiry drops it.
        assert_eq!(
            reg.lookup(t0 + Duration::from_secs(200), &st, "sip:alice@example.com")
                .len(),
            1
        );
        assert_eq!(st.purge(t0 + Duration::from_secs(200)), 1);
        // Remove explicitly.
        let r = register(
            &reg,
            &mut st,
            t0 + Duration::from_secs(201),
            "Contact: <sip:alice@10.0.0.1:5061;transport=tls>;expires=0\r\n",
            3,
            7,
        );
        assert_eq!(r.code, 200);
        assert!(st.is_empty());
    }

    #[test]
    fn wildcard_interval_q_and_limits() {
        let reg = Registrar::new(RegistrarConfig {
            max_contacts: 2,
            ..Default::default()
        });
        let mut st = MemoryStore::default();
        let t0 = Instant::now();
        let r = register(&reg, &mut st, t0, "Contact: <sip:a@h>;expires=30\r\n", 1, 1);
        assert_eq!(r.code, 423);
        assert_eq!(r.headers, vec![("Min-Expires", b"60".to_vec())]);
        assert_eq!(
            register(&reg, &mut st, t0, "Contact: <sip:a@h>;q=1.5\r\n", 1, 1).code,
            400
        );
        assert_eq!(
            register(
                &reg,
                &mut st,
                t0,
                "Contact: <sip:a@h>\r\nExpires: 99999999999999\r\n",
                1,
                1
            )
            .code,
            200
        );
        assert_eq!(
            reg.lookup(t0, &st, "sip:alice@example.com")[0].expires_at,
            t0 + Duration::from_secs(3600)
        );
        // More contacts than the limit in one REGISTER: 403, nothing changes.
        assert_eq!(
            register(
                &reg,
                &mut st,
                t0,
                "Contact: <sip:b@h>, <sip:c@h>, <sip:d@h>\r\n",
                2,
                1
            )
            .code,
            403
        );
        assert_eq!(st.bindings(), 1);
        // Removals count too, up to twice the limit: five contacts are refused before any
        // is compared (thousands of them cost the shard seconds), four are not.
        let many = "Contact: <sip:b@h>;expires=0, <sip:c@h>;expires=0, <sip:d@h>;expires=0, <sip:e@h>;expires=0";
        assert_eq!(
            register(&reg, &mut st, t0, &format!("{many}, <sip:f@h>\r\n"), 2, 1).code,
            403
        );
        assert_eq!(
            register(&reg, &mut st, t0, &format!("{many}\r\n"), 2, 1).code,
            200
        );
        assert_eq!(st.bindings(), 1);
        // Two new ones with one registered already: it makes room (it expires first).
        assert_eq!(
            register(&reg, &mut st, t0, "Contact: <sip:b@h>, <sip:c@h>\r\n", 2, 1).code,
            200
        );
        let left: Vec<_> = reg
            .lookup(t0, &st, "sip:alice@example.com")
            .iter()
            .map(|b| b.contact.clone())
            .collect();
        assert_eq!(left, ["sip:b@h", "sip:c@h"]);
        assert_eq!(
            register(&reg, &mut st, t0, "Contact: *\r\n", 3, 1).code,
            400
        );
        assert_eq!(
            register(
                &reg,
                &mut st,
                t0,
                "Contact: *, <sip:a@h>\r\nExpires: 0\r\n",
                3,
                1
            )
            .code,
            400
        );
        assert_eq!(
            register(&reg, &mut st, t0, "Contact: *\r\nExpires: 0\r\n", 3, 1).code,
            200
        );
        assert!(st.is_empty());
    }

    #[test]
    fn a_wildcard_is_ordered_against_live_bindings_only() {
        // A phone rebooted (its CSeq starts again) after its binding expired, before the
        // purge: its `Contact: *` is not "out of order" against a binding that is gone.
        let reg = Registrar::new(RegistrarConfig::default());
        let mut st = MemoryStore::default();
        let t0 = Instant::now();
        assert_eq!(
            register(
                &reg,
                &mut st,
                t0,
                "Contact: <sip:a@h>;expires=60\r\n",
                10,
                1
            )
            .code,
            200
        );
        let later = t0 + Duration::from_secs(61);
        assert_eq!(
            register(&reg, &mut st, later, "Contact: *\r\nExpires: 0\r\n", 3, 1).code,
            200
        );
        // A live one still orders it.
        assert_eq!(
            register(&reg, &mut st, later, "Contact: <sip:a@h>\r\n", 20, 1).code,
            200
        );
        assert_eq!(
            register(&reg, &mut st, later, "Contact: *\r\nExpires: 0\r\n", 4, 1).code,
            400
        );
    }

    #[test]
    fn a_device_that_reconnects_does_not_fill_its_aor() {
        // A phone whose contact names its ephemeral port registers anew after each
        // reconnection; its stale bindings stay until they expire (their connections may
        // be half-open). It used to reach max_contacts and get 403 until they did.
        let reg = Registrar::new(RegistrarConfig {
            max_contacts: 3,
            ..Default::default()
        });
        let mut st = MemoryStore::default();
        let t0 = Instant::now();
        // Same Call-ID (one boot cycle, RFC 3261 §10.2.4), a new contact, a new flow:
        // the binding moves.
        for (i, flow) in (1..=6).enumerate() {
            let c = format!(
                "Contact: <sip:alice@192.0.2.9:{};transport=tls>\r\n",
                50000 + i
            );
            assert_eq!(register(&reg, &mut st, t0, &c, flow as u32, flow).code, 200);
        }
        let b = reg.lookup(t0, &st, "sip:alice@example.com");
        assert_eq!((b.len(), b[0].flow), (1, 6));
        // Over the same flow, a second contact is a second binding (as RFC 3261 has it).
        let c = "Contact: <sip:alice@192.0.2.9:6000;transport=tls>\r\n";
        assert_eq!(register(&reg, &mut st, t0, c, 7, 6).code, 200);
        assert_eq!(reg.lookup(t0, &st, "sip:alice@example.com").len(), 2);
        // The same Call-ID over another connection from another address (a dual-stack UA's
        // second flow) is a second binding.
        let mut st = MemoryStore::default();
        let v4 = "Contact: <sip:alice@192.0.2.9:5061;transport=tls>\r\n";
        let v6 = "Contact: <sip:alice@[2001:db8::9]:5061;transport=tls>\r\n";
        assert_eq!(register(&reg, &mut st, t0, v4, 1, 21).code, 200);
        assert_eq!(register(&reg, &mut st, t0, v6, 2, 22).code, 200);
        assert_eq!(reg.lookup(t0, &st, "sip:alice@example.com").len(), 2);
        // The same instance without reg-id is the same device, whatever its contact says.
        let mut st = MemoryStore::default();
        for (i, flow) in (1..=4).enumerate() {
            let c = format!(
                "Contact: <sip:alice@192.0.2.9:{}>;+sip.instance=\"<urn:uuid:7>\"\r\n",
                50000 + i
            );
            // Over one flow, so that only the instance says it is the same device.
            assert_eq!(register(&reg, &mut st, t0, &c, flow as u32, 11).code, 200);
        }
        let b = reg.lookup(t0, &st, "sip:alice@example.com");
        assert_eq!(b.len(), 1);
        assert!(b[0].contact.ends_with(":50003"), "{}", b[0].contact);
    }

    #[test]
    fn outbound_flows() {
        let reg = Registrar::default();
        let mut st = MemoryStore::default();
        let t0 = Instant::now();
        let inst = "Contact: <sip:alice@192.0.2.9;ob>;+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\";reg-id=1\r\nSupported: outbound\r\n";
        let r = register(&reg, &mut st, t0, inst, 1, 11);
        assert!(r.headers.contains(&("Require", b"outbound".to_vec())));
        // The 200 echoes +sip.instance and reg-id (RFC 5626 §6).
        let contact = r.headers.iter().find(|(n, _)| *n == "Contact").unwrap();
        assert_eq!(
            String::from_utf8_lossy(&contact.1),
            "<sip:alice@192.0.2.9;ob>;expires=3600;+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\";reg-id=1"
        );
        // Another reg-id of the same instance is a second flow to the same device: both are
        // kept, and requests go to one of them (RFC 5626 §5.3), the latest refreshed.
        let flow2 = inst.replace("reg-id=1", "reg-id=2");
        register(&reg, &mut st, t0 + Duration::from_secs(1), &flow2, 2, 13);
        assert_eq!(st.bindings(), 2);
        let b = reg.lookup(t0, &st, "sip:alice@example.com");
        assert_eq!((b.len(), b[0].flow), (1, 13));
        assert_eq!(st.remove_flow(13), 1);
        // Same instance and reg-id over a new flow replaces the binding (new contact URI too).
        let inst2 = inst.replace("192.0.2.9", "192.0.2.10");
        register(&reg, &mut st, t0, &inst2, 2, 12);
        let b = reg.lookup(t0, &st, "sip:alice@example.com");
        assert_eq!((b.len(), b[0].flow), (1, 12));
        assert_eq!(st.remove_flow(12), 1);
        assert!(st.is_empty());
        // The latest refreshed, not the one that expires last: reg-id 1 for an hour, then
        // (the phone found that flow bad) reg-id 2 for 600 s over another. Sorted by expiry,
        // requests went on over reg-id 1's flow.
        register(
            &reg,
            &mut st,
            t0,
            &format!("{inst}Expires: 3600\r\n"),
            3,
            21,
        );
        let later = t0 + Duration::from_secs(100);
        register(
            &reg,
            &mut st,
            later,
            &format!("{flow2}Expires: 600\r\n"),
            4,
            22,
        );
        let b = reg.lookup(later, &st, "sip:alice@example.com");
        assert_eq!((b.len(), b[0].flow), (1, 22));
    }

    #[test]
    fn a_full_aor_gives_up_the_binding_refreshed_longest_ago() {
        // Not the one that expires first: a contact registered a moment ago for 300 s went
        // before ones registered almost an hour ago for 3600 s.
        let reg = Registrar::default();
        let mut st = MemoryStore::default();
        let t0 = Instant::now();
        let max = reg.config().max_contacts;
        for i in 0..max - 1 {
            let c = format!("Contact: <sip:alice@10.0.0.{i}>\r\nExpires: 3600\r\n");
            assert_eq!(register(&reg, &mut st, t0, &c, i as u32 + 1, 7).code, 200);
        }
        let fresh = "Contact: <sip:alice@10.0.1.1>\r\nExpires: 300\r\n";
        let t1 = t0 + Duration::from_secs(3000);
        assert_eq!(register(&reg, &mut st, t1, fresh, 100, 7).code, 200);
        let one_more = "Contact: <sip:alice@10.0.1.2>\r\nExpires: 3600\r\n";
        assert_eq!(register(&reg, &mut st, t1, one_more, 101, 7).code, 200);
        let kept = st.get("sip:alice@example.com");
        assert_eq!(kept.len(), max);
        assert!(
            kept.iter().any(|b| b.contact == "sip:alice@10.0.1.1"),
            "the freshest binding went"
        );
    }

    #[test]
    fn a_long_call_id_is_kept_as_a_digest_and_still_orders_refreshes() {
        // A Call-ID is bounded only by the header-line limit (8 KiB): ten contacts kept ten
        // copies of it, outside the binding's bound. Kept as a digest past 64 bytes; only
        // equality is asked of it.
        let reg = Registrar::default();
        let mut st = MemoryStore::default();
        let t0 = Instant::now();
        let long = "x".repeat(4000);
        let contact = "Contact: <sip:alice@10.0.0.1:5061;transport=tls>\r\n";
        let send = |st: &mut MemoryStore, call_id: &str, cseq: u32| {
            register_call(&reg, st, t0, call_id, contact, cseq, 7).code
        };
        assert_eq!(send(&mut st, &long, 2), 200);
        let kept = &st.get("sip:alice@example.com")[0].call_id;
        assert!(kept.len() <= 64, "{} bytes kept", kept.len());
        // The same Call-ID, an older CSeq: out of order, as before.
        assert_eq!(send(&mut st, &long, 1), 400);
        // Another long Call-ID (a reboot): not ordered against the first.
        assert_eq!(send(&mut st, &format!("{long}y"), 1), 200);
        assert_eq!(send(&mut st, "short", 1), 200);
        assert_eq!(st.get("sip:alice@example.com")[0].call_id, "short");
    }

    #[test]
    fn outbound_only_when_asked_for_and_at_a_first_hop_that_can() {
        // RFC 5626 §6, and RFC 3261 §8.2.2.3: no Require a UA did not list as Supported.
        let reg = Registrar::default();
        let mut st = MemoryStore::default();
        let t0 = Instant::now();
        let c = "Contact: <sip:alice@192.0.2.9;ob>;+sip.instance=\"<urn:uuid:1>\";reg-id=1\r\n";
        // reg-id without Supported: outbound is ignored: an RFC 3261 binding, no Require.
        let r = register(&reg, &mut st, t0, c, 1, 11);
        assert_eq!(r.code, 200);
        assert!(!r.headers.iter().any(|(n, _)| *n == "Require"), "{r:?}");
        assert_eq!(reg.lookup(t0, &st, "sip:alice@example.com")[0].reg_id, None);
        // Asked for through an edge proxy that did not do outbound (no ob on its Path): 439.
        let edge = format!("{c}Supported: outbound\r\nPath: <sip:edge.example.net;lr>\r\n");
        assert_eq!(register(&reg, &mut st, t0, &edge, 2, 11).code, 439);
        // Relayed by a proxy that added no Path (a second Via): it cannot keep the flow,
        // so the first hop is not us — 439 as well (RFC 5626 §6).
        let relayed = format!(
            "{c}Supported: outbound\r\nVia: SIP/2.0/TLS edge.example.net;branch=z9hG4bKe\r\n"
        );
        assert_eq!(register(&reg, &mut st, t0, &relayed, 2, 11).code, 439);
        // Through one that did: applied.
        let edge_ob = edge.replace(";lr>", ";lr;ob>");
        let r = register(&reg, &mut st, t0, &edge_ob, 3, 11);
        assert_eq!(r.code, 200);
        assert!(r.headers.contains(&("Require", b"outbound".to_vec())));
        // Two reg-ids in one REGISTER: 400.
        let two = format!(
            "{c}Contact: <sip:alice@192.0.2.9;ob>;+sip.instance=\"<urn:uuid:1>\";reg-id=2\r\nSupported: outbound\r\n"
        );
        assert_eq!(register(&reg, &mut st, t0, &two, 4, 11).code, 400);
    }

    #[test]
    fn contacts_compare_as_uris_and_one_register_may_name_an_instance_twice() {
        let reg = Registrar::default();
        let t0 = Instant::now();
        let aor = "sip:alice@example.com";
        // §10.3 step 7 compares contacts by §19.1.4: a refresh or a removal that writes
        // the parameters in another order (or escapes the user part) names the same one.
        let mut st = MemoryStore::default();
        let c1 = "Contact: <sip:alice@192.0.2.9:5061;transport=tls;ob>\r\n";
        assert_eq!(register(&reg, &mut st, t0, c1, 1, 11).code, 200);
        let refresh = "Contact: <sip:%61lice@192.0.2.9:5061;ob;transport=TLS>\r\n";
        assert_eq!(register(&reg, &mut st, t0, refresh, 2, 11).code, 200);
        assert_eq!(reg.lookup(t0, &st, aor).len(), 1, "refreshed, not added");
        let gone = "Contact: <sip:alice@192.0.2.9:5061;ob;transport=tls>;expires=0\r\n";
        assert_eq!(register(&reg, &mut st, t0, gone, 3, 11).code, 200);
        assert!(reg.lookup(t0, &st, aor).is_empty(), "removed");
        // The user part is case-sensitive: Alice is another contact.
        assert_eq!(register(&reg, &mut st, t0, c1, 4, 11).code, 200);
        let other = "Contact: <sip:Alice@192.0.2.9:5061;transport=tls;ob>\r\n";
        assert_eq!(register(&reg, &mut st, t0, other, 5, 11).code, 200);
        assert_eq!(reg.lookup(t0, &st, aor).len(), 2);

        // Two contacts of one instance (no reg-id) in one REGISTER — a dual-stack phone:
        // both bound (before: 400 Out of Order CSeq, the second checked against the first).
        let mut st = MemoryStore::default();
        let inst = ";+sip.instance=\"<urn:uuid:1>\"";
        let dual = format!(
            "Contact: <sip:alice@192.0.2.9:5061;transport=tls>{inst}, <sip:alice@[2001:db8::9]:5061;transport=tls>{inst}\r\n"
        );
        assert_eq!(register(&reg, &mut st, t0, &dual, 1, 11).code, 200);
        assert_eq!(reg.lookup(t0, &st, aor).len(), 2);
        // Refreshed as they are: still two.
        assert_eq!(register(&reg, &mut st, t0, &dual, 2, 11).code, 200);
        assert_eq!(reg.lookup(t0, &st, aor).len(), 2);
        // A moved phone: its new contact, then its old one with expires=0. The new one
        // stays (before: 400, or removed by the second contact).
        let mut st = MemoryStore::default();
        let old = format!("Contact: <sip:alice@192.0.2.9:5061;transport=tls>{inst}\r\n");
        assert_eq!(register(&reg, &mut st, t0, &old, 1, 11).code, 200);
        let moved = format!(
            "Contact: <sip:alice@198.51.100.7:5061;transport=tls>{inst}, <sip:alice@192.0.2.9:5061;transport=tls>{inst};expires=0\r\n"
        );
        assert_eq!(register(&reg, &mut st, t0, &moved, 2, 12).code, 200);
        let b = reg.lookup(t0, &st, aor);
        assert_eq!(b.len(), 1);
        assert!(b[0].contact.contains("198.51.100.7"), "{}", b[0].contact);
        // An older CSeq of the same Call-ID still fails against what was registered.
        assert_eq!(register(&reg, &mut st, t0, &old, 2, 12).code, 400);
    }

    #[test]
    fn malformed_expiries_count_as_the_default_and_reg_id_needs_an_instance() {
        let reg = Registrar::default();
        let t0 = Instant::now();
        let aor = "sip:alice@example.com";
        // An RFC 2543 date (legacy ATAs), a bare `expires`: 3600 (§10.2.1.1, §20.19), not 400.
        for (i, extra) in [
            "Contact: <sip:alice@192.0.2.9>\r\nExpires: Thu, 01 Dec 1994 16:00:00 GMT\r\n",
            "Contact: <sip:alice@192.0.2.9>;expires=\"Thu, 01 Dec 1994 16:00:00 GMT\"\r\n",
            "Contact: <sip:alice@192.0.2.9>;expires\r\n",
        ]
        .iter()
        .enumerate()
        {
            let mut st = MemoryStore::default();
            let r = register(&reg, &mut st, t0, extra, i as u32 + 1, 11);
            assert_eq!(r.code, 200, "{extra}");
            let b = reg.lookup(t0, &st, aor);
            assert_eq!(b[0].expires_at, t0 + Duration::from_secs(3600), "{extra}");
        }
        // A reg-id without +sip.instance is ignored (RFC 5626 §6): a plain binding, even
        // asked through an edge without `ob` (before: 439), and two of them are no error.
        let mut st = MemoryStore::default();
        let edge = "Supported: outbound\r\nPath: <sip:edge.example.net;lr>\r\n";
        let plain = format!("Contact: <sip:alice@192.0.2.9>;reg-id=1\r\n{edge}");
        assert_eq!(register(&reg, &mut st, t0, &plain, 1, 11).code, 200);
        let two = format!(
            "Contact: <sip:alice@192.0.2.9>;reg-id=1, <sip:alice@192.0.2.10>;reg-id=2\r\n{edge}"
        );
        assert_eq!(register(&reg, &mut st, t0, &two, 2, 11).code, 200);
        assert!(reg.lookup(t0, &st, aor).iter().all(|b| b.reg_id.is_none()));
        // Nor does a malformed one matter without `Supported: outbound` (before: 400); with
        // it, it is an error.
        let bad = "Contact: <sip:alice@192.0.2.11>;+sip.instance=\"<urn:uuid:1>\";reg-id=x\r\n";
        assert_eq!(register(&reg, &mut st, t0, bad, 3, 11).code, 200);
        let asked = format!("{bad}Supported: outbound\r\n");
        assert_eq!(register(&reg, &mut st, t0, &asked, 4, 11).code, 400);
    }

    #[test]
    fn a_live_binding_is_never_listed_with_expires_0() {
        let reg = Registrar::default();
        let mut st = MemoryStore::default();
        let t0 = Instant::now();
        let r = register(&reg, &mut st, t0, "Contact: <sip:a@h>;expires=60\r\n", 1, 1);
        assert_eq!(r.code, 200);
        let later = t0 + Duration::from_millis(59_500);
        let r = register(&reg, &mut st, later, "Contact: <sip:b@h>\r\n", 2, 1);
        assert_eq!(r.code, 200);
        let a = r
            .headers
            .iter()
            .find(|(n, v)| *n == "Contact" && v.starts_with(b"<sip:a@h>"))
            .expect("a listed");
        assert_eq!(String::from_utf8_lossy(&a.1), "<sip:a@h>;expires=1");
    }

    #[test]
    fn what_a_register_removes_at_the_other_nodes() {
        let with = |extra: &str, f: &dyn Fn(&Message<'_, '_>)| {
            let msg = format!(
                "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKx\r\nTo: <sip:alice@example.com>\r\nFrom: <sip:alice@example.com>;tag=1\r\nCall-ID: c\r\nCSeq: 2 REGISTER\r\n{extra}Content-Length: 0\r\n\r\n"
            );
            let mut h = [Header::EMPTY; 32];
            let Ok(Status::Complete(m)) =
                parse(msg.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
            else {
                panic!("parse")
            };
            f(&m);
        };
        let mut cases: Vec<(&str, Option<Vec<&str>>)> = vec![
            // A plain contact bound here: the same binding held elsewhere is the device's old
            // one (it moved to this node), and goes.
            (
                "Contact: <sip:alice@192.0.2.9>\r\nExpires: 600\r\n",
                Some(vec!["<sip:alice@192.0.2.9>;expires=0"]),
            ),
            ("Contact: *\r\nExpires: 0\r\n", Some(vec!["*"])),
            (
                "Contact: <sip:alice@192.0.2.9>;expires=0, <sip:alice@192.0.2.10>\r\n",
                Some(vec![
                    "<sip:alice@192.0.2.9>;expires=0",
                    "<sip:alice@192.0.2.10>;expires=0",
                ]),
            ),
            // An instance bound here: its binding elsewhere (by instance and reg-id) goes.
            (
                "Contact: <sip:alice@192.0.2.9;ob>;+sip.instance=\"<urn:uuid:1>\";reg-id=2;q=0.5\r\nSupported: outbound\r\n",
                Some(vec![
                    "<sip:alice@192.0.2.9;ob>;+sip.instance=\"<urn:uuid:1>\";reg-id=2;expires=0",
                ]),
            ),
            // Without outbound the reg-id was ignored here, and there: by instance alone.
            (
                "Contact: <sip:alice@192.0.2.9;ob>;+sip.instance=\"<urn:uuid:1>\";reg-id=2\r\n",
                Some(vec![
                    "<sip:alice@192.0.2.9;ob>;+sip.instance=\"<urn:uuid:1>\";expires=0",
                ]),
            ),
        ];
        for (extra, want) in cases.drain(..) {
            let want: Option<Vec<String>> = want.map(|v| v.iter().map(|s| s.to_string()).collect());
            with(extra, &|m| {
                assert_eq!(removals_for_nodes(m), want, "{extra}")
            });
        }
        // What a node accepts from another: removals only.
        for (extra, only) in [
            ("Contact: *\r\nExpires: 0\r\n", true),
            (
                "Contact: <sip:a@h>;expires=0, <sip:b@h>;expires=0\r\n",
                true,
            ),
            ("Contact: <sip:a@h>\r\nExpires: 0\r\n", true),
            ("Contact: <sip:a@h>;expires=0, <sip:b@h>\r\n", false),
            ("Contact: *\r\n", false),
            ("Expires: 0\r\n", false),
        ] {
            with(extra, &|m| assert_eq!(removes_only(m), only, "{extra}"));
        }
        // What makes a refresh ask the other nodes anyway: any removal in it.
        for (extra, any) in [
            ("Contact: *\r\nExpires: 0\r\n", true),
            ("Contact: <sip:a@h>;expires=0, <sip:b@h>\r\n", true),
            ("Contact: <sip:a@h>\r\nExpires: 0\r\n", true),
            ("Contact: <sip:a@h>;expires=600\r\nExpires: 0\r\n", false),
            ("Contact: <sip:a@h>\r\nExpires: 600\r\n", false),
            ("Contact: *\r\n", false),
            ("Expires: 0\r\n", false),
        ] {
            with(extra, &|m| assert_eq!(removes_any(m), any, "{extra}"));
        }
    }

    #[test]
    fn path_is_stored_and_echoed_when_supported() {
        let reg = Registrar::default();
        let mut st = MemoryStore::default();
        let t0 = Instant::now();
        let via_edge = "Contact: <sip:alice@192.0.2.9>\r\nPath: <sip:edge1.example.net;lr>, <sip:edge2.example.net;lr>\r\n";
        let r = register(
            &reg,
            &mut st,
            t0,
            &format!("{via_edge}Supported: path\r\n"),
            1,
            5,
        );
        assert_eq!(r.code, 200);
        let paths: Vec<_> = r.headers.iter().filter(|(n, _)| *n == "Path").collect();
        assert_eq!(paths.len(), 2);
        let b = reg.lookup(t0, &st, "sip:alice@example.com");
        assert_eq!(
            b[0].path,
            vec![
                "<sip:edge1.example.net;lr>".to_string(),
                "<sip:edge2.example.net;lr>".to_string()
            ]
        );
        // A fold inside a Path value is stored unfolded: the Path goes out as a Route on
        // every request to the binding, where a fold would be a header of its own to the
        // edge proxy (` l: 0`, a Content-Length to Kamailio's stream reader).
        let folded = "Contact: <sip:alice@192.0.2.9>\r\nPath: <sip:edge1.example.net;lr>;x=\"a\r\n l: 0\"\r\n";
        let mut fresh = MemoryStore::default();
        assert_eq!(register(&reg, &mut fresh, t0, folded, 1, 6).code, 200);
        let b = reg.lookup(t0, &fresh, "sip:alice@example.com");
        assert!(
            b[0].path.iter().all(|p| !p.contains(['\r', '\n'])),
            "{:?}",
            b[0].path
        );
        // The same for a Contact's parameters and instance: they go out in the Contact of
        // every later 200, also to an unfolded refresh (the fold would be replayed there).
        let folded = "Contact: <sip:alice@192.0.2.9>;x=\"a\r\n l: 200\";y=b\r\n l: 9;+sip.instance=\"<urn:x\r\n l: 7>\"\r\n";
        let mut fresh = MemoryStore::default();
        assert_eq!(register(&reg, &mut fresh, t0, folded, 1, 6).code, 200);
        let b = reg.lookup(t0, &fresh, "sip:alice@example.com");
        assert!(!b[0].params.contains(['\r', '\n']), "{:?}", b[0].params);
        assert!(
            !b[0]
                .instance
                .as_deref()
                .unwrap_or("")
                .contains(['\r', '\n']),
            "{:?}",
            b[0].instance
        );
        let r = register(&reg, &mut fresh, t0, "", 2, 6);
        assert_eq!(r.code, 200);
        for (n, v) in &r.headers {
            assert!(
                !v.iter().any(|&c| c == b'\r' || c == b'\n'),
                "{n}: {}",
                String::from_utf8_lossy(v)
            );
        }
        // Without `Supported: path` the Path is still used, but not echoed (RFC 3327 §5.3).
        let r = register(&reg, &mut st, t0, via_edge, 2, 5);
        assert!(!r.headers.iter().any(|(n, _)| *n == "Path"));
        // A Path is kept with every binding: bounded like its Contact (was unbounded, up to
        // the message size, per binding).
        let hop = "<sip:edge.example.net;lr;x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa>";
        let long = [hop; 12].join(", ");
        let r = register(
            &reg,
            &mut st,
            t0,
            &format!("Contact: <sip:alice@192.0.2.9>\r\nPath: {long}\r\n"),
            3,
            5,
        );
        assert_eq!((r.code, r.reason), (400, "Path Too Long"));
        let many = ["<sip:e.example.net;lr>"; MAX_PATH + 1].join(", ");
        let r = register(
            &reg,
            &mut st,
            t0,
            &format!("Contact: <sip:alice@192.0.2.9>\r\nPath: {many}\r\n"),
            4,
            5,
        );
        assert_eq!((r.code, r.reason), (400, "Path Too Long"));
        assert_eq!(
            reg.lookup(t0, &st, "sip:alice@example.com")[0].path.len(),
            2
        );
    }

    proptest::proptest! {
        /// The store's indexes (count, expiries, flows) agree with a plain map whatever the
        /// sequence of puts, flow closes and purges.
        #[test]
        fn store_indexes_agree_with_a_plain_map(ops in proptest::collection::vec((0u8..3, 0u8..6, 0u8..4, 0u8..40, 1u8..3), 1..120)) {
            let t0 = Instant::now();
            let mut st = MemoryStore::default();
            st.track_flows();
            let mut model: HashMap<String, Vec<Binding>> = HashMap::new();
            // Bindings per flow as the ledger reports them, summed over every change.
            let mut per_flow: HashMap<FlowId, i64> = HashMap::new();
            let mut now = t0;
            for (op, aor, flow, ttl, n) in ops {
                let aor = format!("sip:u{aor}@example.com");
                match op {
                    0 => {
                        let v: Vec<Binding> = (0..n)
                            .map(|i| Binding {
                                contact: format!("sip:c{i}@h"),
                                q: 1000,
                                expires_at: now + Duration::from_secs(u64::from(ttl)),
                                granted: u32::from(ttl),
                                call_id: "c".into(),
                                cseq: 1,
                                flow: u64::from(flow) + u64::from(i),
                                instance: None,
                                reg_id: None,
                                params: String::new(),
                                path: Vec::new(),
                            })
                            .collect();
                        st.put(&aor, v.clone());
                        if v.is_empty() { model.remove(&aor); } else { model.insert(aor, v); }
                    }
                    1 => {
                        let f = u64::from(flow);
                        let a = st.remove_flow(f);
                        let mut b = 0;
                        model.retain(|_, v| { let l = v.len(); v.retain(|x| x.flow != f); b += l - v.len(); !v.is_empty() });
                        proptest::prop_assert_eq!(a, b);
                    }
                    _ => {
                        now += Duration::from_secs(u64::from(ttl) / 2);
                        let a = st.purge(now);
                        let mut b = 0;
                        model.retain(|_, v| { let l = v.len(); v.retain(|x| x.expires_at > now); b += l - v.len(); !v.is_empty() });
                        proptest::prop_assert_eq!(a, b);
                    }
                }
                proptest::prop_assert_eq!(st.bindings(), model.values().map(Vec::len).sum::<usize>());
                proptest::prop_assert_eq!(st.len(), model.len());
                for (f, d) in st.take_flow_changes() {
                    *per_flow.entry(f).or_default() += d;
                }
                let mut want: HashMap<FlowId, i64> = HashMap::new();
                for b in model.values().flatten() {
                    *want.entry(b.flow).or_default() += 1;
                }
                per_flow.retain(|_, d| *d != 0);
                proptest::prop_assert_eq!(&per_flow, &want);
                proptest::prop_assert!(st.wheel_len() <= 2 * st.len() + 1024);
                for (k, v) in &model {
                    proptest::prop_assert_eq!(st.get(k), v.as_slice());
                }
            }
        }
    }

    /// A binding of `contact` over `flow` for `ttl` seconds from `t0`, without instance.
    fn plain_binding(t0: Instant, flow: u64, contact: String, ttl: u64) -> Binding {
        Binding {
            contact,
            q: 1000,
            expires_at: t0 + Duration::from_secs(ttl),
            granted: ttl as u32,
            call_id: "c".into(),
            cseq: 1,
            flow,
            instance: None,
            reg_id: None,
            params: String::new(),
            path: Vec::new(),
        }
    }

    #[test]
    fn the_expiry_wheel_stays_bounded_under_ever_shorter_refreshes() {
        // Each refresh moves the AOR's expiry one second earlier: the worst case for a lazy
        // wheel (every one files the AOR again).
        let t0 = Instant::now();
        let mut st = MemoryStore::default();
        let b = |flow: u64, ttl: u64| plain_binding(t0, flow, format!("sip:c{flow}@h"), ttl);
        for round in 0..3000u64 {
            for a in 0..100u64 {
                st.put(&format!("sip:u{a}@example.com"), vec![b(a, 3600 - round)]);
            }
            assert!(st.wheel_len() <= 2 * 100 + 1024, "{}", st.wheel_len());
        }
        assert_eq!(st.bindings(), 100);
        assert_eq!(
            st.purge(t0 + Duration::from_secs(600)),
            0,
            "they expire at 601 s"
        );
        assert_eq!(st.purge(t0 + Duration::from_secs(601)), 100);
        assert_eq!(st.len(), 0);
        // Entries filed for later seconds go when those seconds come.
        assert!(st.wheel_len() > 0);
        assert_eq!(st.purge(t0 + Duration::from_secs(3600)), 0);
        assert_eq!(st.wheel_len(), 0);
    }

    #[test]
    fn the_store_says_which_flows_no_longer_hold_an_aor() {
        let t0 = Instant::now();
        let mut st = MemoryStore::default();
        st.track_flows();
        let b = |flow: u64, n: u64, ttl: u64| {
            plain_binding(t0, flow, format!("sip:c{flow}-{n}@h"), ttl)
        };
        let released = |st: &mut MemoryStore| {
            let mut r: Vec<(u64, String)> = st
                .take_released()
                .into_iter()
                .map(|(f, a)| (f, a.to_string()))
                .collect();
            r.sort();
            r
        };
        let (a, z) = ("sip:a@example.com", "sip:z@example.com");
        // Flow 1 holds two bindings of a, flow 2 one; flow 1 holds z too.
        st.put(a, vec![b(1, 1, 100), b(1, 2, 200), b(2, 1, 200)]);
        st.put(z, vec![b(1, 1, 200)]);
        assert_eq!(released(&mut st), []);
        // One of flow 1's two bindings of a expires: it still holds a.
        st.purge(t0 + Duration::from_secs(150));
        assert_eq!(released(&mut st), []);
        // The binding moves to flow 3 (a REGISTER over another connection): flow 1 lets go.
        st.put(a, vec![b(3, 2, 200), b(2, 1, 200)]);
        assert_eq!(released(&mut st), [(1, a.to_string())]);
        // Everything expires: flows 2 and 3 let go of a, flow 1 of z.
        st.purge(t0 + Duration::from_secs(250));
        assert_eq!(
            released(&mut st),
            [(1, z.to_string()), (2, a.to_string()), (3, a.to_string())]
        );
        // A flow's close is not a release (its places go with it).
        st.put(a, vec![b(4, 1, 900)]);
        assert_eq!(st.remove_flow(4), 1);
        assert_eq!(released(&mut st), []);
    }

    #[test]
    fn known_aors_are_bounded_and_keep_the_recent_ones() {
        let mut k = KnownAors::new(100);
        for i in 0..10_000 {
            k.insert(&format!("sip:u{i}@example.com"));
            assert!(k.len() <= 100, "bounded: {} at {i}", k.len());
        }
        // The last half-capacity names are always remembered; old ones are gone.
        for i in 9_950..10_000 {
            assert!(k.contains(&format!("sip:u{i}@example.com")), "{i}");
        }
        assert!(!k.contains("sip:u0@example.com"));
        // Re-registering an old name does not grow the set.
        let before = k.len();
        k.insert("sip:u9999@example.com");
        assert_eq!(k.len(), before);
    }

    #[test]
    fn shard_function_is_pure_and_spreads() {
        assert_eq!(
            shard_for("sip:alice@example.com", 4),
            shard_for("sip:alice@example.com", 4)
        );
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[shard_for(&format!("sip:user{i}@example.com"), 4).0 as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        let u = Uri::parse(b"sips:%61lice@EXAMPLE.com:5061;transport=tls").unwrap();
        assert_eq!(aor_of(&u).as_deref(), Some("sip:alice@example.com"));
        assert_eq!(aor_of(&Uri::parse(b"sip:example.com").unwrap()), None);
        let absolute = Uri::parse(b"sip:alice@Example.COM.").unwrap();
        assert_eq!(aor_of(&absolute).as_deref(), Some("sip:alice@example.com"));
        assert_eq!(parse_q(b"0.5"), Some(500));
        assert_eq!(parse_q(b"1.000"), Some(1000));
        assert_eq!(parse_q(b"1.001"), None);
        assert_eq!(parse_q(b"0.1234"), None);
    }
}
