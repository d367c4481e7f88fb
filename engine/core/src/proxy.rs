//! Proxy decisions (RFC 3261 §16): given a validated request and where it came from,
//! decide whether to answer it locally, hand it to the registrar, look its target up, or
//! forward it to a flow or a federated peer; and build the forwarded bytes.
//!
//! Decisions are pure. Lookups that need another shard's table are returned as
//! [`Decision::Lookup`] for the engine to perform; [`Proxy::after_lookup`] finishes them.
//!
//! Dialog routing uses flow tokens in our Record-Route (RFC 5626 §5.3): the Record-Route we
//! insert carries the inbound and outbound flows (`;fi=…;fo=…`), so an in-dialog request that
//! arrives on one of them goes out on the other without any table lookup.

use crate::auth::NodeKey;
use crate::edit::Editor;
use crate::header::HeaderName;
use crate::parse::{Essentials, HeaderValue, Message, Method};
use crate::policy::{Denial, IdentityEdit};
use crate::registrar::FlowId;
use crate::text::{self, is_token, trim};
use crate::uri::{Scheme, Uri};
use crate::values::{NameAddr, Via};

/// A connection a request came from or goes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Flow {
    /// A client or peer connection accepted or opened by the engine.
    Conn(FlowId),
    /// The (pooled, reconnecting) outbound connection to a named federation peer.
    Peer(String),
}

/// Set in the id of a connection that is plain TCP (the `tcp` listener), by the engine that
/// numbers connections: every shard can tell from the id alone whether a flow is TLS, for a
/// binding made on another shard too.
pub const PLAIN_FLOW_BIT: FlowId = 1 << 47;

impl Flow {
    /// Whether what is sent on this flow goes over TLS: partner and node links always; a
    /// connection unless its id says plain TCP ([`PLAIN_FLOW_BIT`]).
    pub fn is_tls(&self) -> bool {
        match self {
            Flow::Conn(id) => id & PLAIN_FLOW_BIT == 0,
            Flow::Peer(_) => true,
        }
    }

    /// The token form used in Record-Route parameters: `c<hex>` or `p<name>`.
    pub fn encode(&self) -> String {
        match self {
            Flow::Conn(id) => format!("c{id:x}"),
            Flow::Peer(name) => format!("p{name}"),
        }
    }

    /// Parses a token made by [`Flow::encode`].
    pub fn decode(t: &[u8]) -> Option<Flow> {
        match t.split_first()? {
            (b'c', hex) if !hex.is_empty() && hex.len() <= 16 => {
                u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16)
                    .ok()
                    .map(Flow::Conn)
            }
            (b'p', name) if !name.is_empty() && name.iter().all(|&b| is_token(b)) => {
                Some(Flow::Peer(String::from_utf8_lossy(name).into_owned()))
            }
            _ => None,
        }
    }
}

/// A federation route: requests for `domain` go to the peer `peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRoute {
    /// The foreign SIP domain (lower case).
    pub domain: String,
    /// The peer's configured name.
    pub peer: String,
}

/// The transport of one of our listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TLS (`tls` and `mtls` listeners).
    Tls,
    /// Plain TCP (`tcp` listeners).
    Tcp,
}

impl Transport {
    /// As in a Via's sent-protocol (`TLS`, `TCP`).
    pub fn via_name(self) -> &'static str {
        match self {
            Transport::Tls => "TLS",
            Transport::Tcp => "TCP",
        }
    }

    /// As in a URI's `transport=` parameter.
    pub fn uri_name(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Tcp => "tcp",
        }
    }
}

/// One of our listeners as peers must address it: the host and port in our Via and
/// Record-Route, and its transport.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Interface {
    /// Host (name or address) peers reach it by.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Transport.
    pub transport: Transport,
}

/// How one forwarded request travels: the flows it came by and leaves by, the interfaces
/// they belong to (our Via and Record-Route name them), who sent it (Via `received`/`rport`)
/// and its identity-header edits.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    /// The flow it arrived on (partner-aware, as dialog routes name it).
    pub inbound: &'a Flow,
    /// The flow it leaves on.
    pub outbound: &'a Flow,
    /// The listener it arrived through.
    pub in_iface: &'a Interface,
    /// The listener the destination reaches us through.
    pub out_iface: &'a Interface,
    /// The client's address, when it came from a client: the top Via gets `received` and
    /// `rport` (RFC 3261 §18.2.1, RFC 3581).
    pub source: Option<std::net::SocketAddr>,
    /// Identity headers.
    pub ident: &'a IdentityEdit,
    /// Route values to add first (the target's registered Path, RFC 3327).
    pub path: &'a [String],
    /// Advertise RFC 7339 overload control in our Via (`oc;oc-algo="loss"`): the next hop is
    /// a partner whose feedback we honour.
    pub overload_control: bool,
    /// This branch's share of the request's breadth when it is forked in parallel
    /// (RFC 5393 §5.3): written as its `Max-Breadth`, replacing the one received.
    pub max_breadth: Option<u32>,
    /// Who the dialog's parties are, where we know: the AOR the sender authenticated as
    /// (`.0`, a client of ours) and the AOR whose binding the request goes to (`.1`). Each
    /// is written, keyed, into our Record-Route, so a party that reconnects may follow the
    /// dialog's route from its new connection once it shows it is that AOR
    /// ([`Decision::Reconnected`]).
    pub parties: (Option<&'a str>, Option<&'a str>),
}

/// Proxy settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// SIP domains this server is registrar and proxy for (lower case).
    pub domains: Vec<String>,
    /// This server's own host names and addresses, as they appear in Via, Route and
    /// Request-URIs (lower case, no port).
    pub local_hosts: Vec<String>,
    /// The host we put in our Via and Record-Route where no listener says otherwise.
    pub via_host: String,
    /// The port of that default interface.
    pub via_port: u16,
    /// Every port we listen on: a URI naming one of our hosts *with a port* is ours only if
    /// the port is one of these (another server may share the address). Default `[5061]`.
    pub ports: Vec<u16>,
    /// The interface partners reach us by (our `mtls` listener), for requests that go out
    /// on our own links to them. Default: the default interface.
    pub partner_interface: Option<Interface>,
    /// Federation routes.
    pub peers: Vec<PeerRoute>,
    /// The other nodes of our cluster (their links are [`Flow::Peer`]s with these names; they
    /// have no domains of their own: lookups send requests to them).
    pub nodes: Vec<String>,
    /// Option tags we support in `Proxy-Require`.
    pub supported: Vec<String>,
    /// Add Record-Route to dialog-creating requests. Default true.
    pub record_route: bool,
    /// Signs the flow tokens in our Record-Route (RFC 5626 §5.2) so that only routes we
    /// handed out are followed. Default: an all-zero key (tests only; the engine sets a
    /// secret one).
    pub key: NodeKey,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            domains: vec!["example.com".into()],
            local_hosts: vec!["127.0.0.1".into()],
            via_host: "127.0.0.1".into(),
            via_port: 5061,
            ports: vec![5061],
            partner_interface: None,
            peers: Vec::new(),
            nodes: Vec::new(),
            supported: Vec::new(),
            record_route: true,
            key: NodeKey::new([0; 32]),
        }
    }
}

/// A locally generated answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Status code.
    pub code: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// Extra header lines.
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

impl Answer {
    fn decision(code: u16, reason: &'static str) -> Decision {
        Decision::Respond(Answer {
            code,
            reason,
            headers: Vec::new(),
        })
    }
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Decision {
    /// Answer it here (errors included). ACKs are never answered: see [`Decision::Drop`].
    Respond(Answer),
    /// A REGISTER for one of our domains: hand to the registrar on the AOR's shard.
    Register,
    /// Look up `aor`'s bindings (on its shard), then call [`Proxy::after_lookup`].
    Lookup {
        /// The address-of-record.
        aor: String,
    },
    /// Forward over this flow (in-dialog, via our Record-Route flow tokens).
    ToFlow(Flow),
    /// On our dialog route, from a connection that is neither of the dialog's: one of its
    /// parties reconnected (a phone whose connection broke mid-call, RFC 5626 §4.4). It goes
    /// on to the other party's flow once the sender is shown to be that party
    /// ([`Proxy::party_route`]: a binding its connection holds, its certificate, or digest
    /// for this request); anyone else is refused.
    Reconnected(Vec<Party>),
    /// Forward to the federation peer with this name.
    ToPeer(String),
    /// A CANCEL: match it to the INVITE server transaction with the same branch.
    Cancel,
    /// Nothing to send (e.g. an ACK with nowhere to go); the reason is for the log.
    Drop(&'static str),
    /// Refuse it for what it forged (a route we never signed): answer, count and log it.
    Refuse(Denial),
}

/// One party of a dialog we record-routed, as its route names it: who it is (keyed, not
/// readable) and where requests from it go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// Its identity tag (the Record-Route's `ui` or `uo`).
    pub tag: String,
    /// Its flow token as the route carries it (`fi` or `fo`): the tag is keyed with it.
    pub token: String,
    /// The other party's flow: where its requests go.
    pub to: Flow,
}

/// A registered contact, as a lookup returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    /// The contact URI (the new Request-URI).
    pub contact: String,
    /// The connection it registered over.
    pub flow: FlowId,
    /// The Path it registered through (RFC 3327): Route values for requests to it.
    pub path: Vec<String>,
    /// The same device's other flows (other reg-ids, RFC 5626 §5.3), best first: tried in
    /// turn when this one's connection fails with the request on it.
    pub fallbacks: Vec<Reach>,
}

impl Reach {
    /// How to reach a registered binding.
    pub fn of(b: &crate::registrar::Binding) -> Reach {
        Reach {
            contact: b.contact.clone(),
            flow: b.flow,
            path: b.path.clone(),
            fallbacks: Vec::new(),
        }
    }
}

/// Result of a registrar lookup done by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Live bindings, best first.
    Found(Vec<Reach>),
    /// The AOR is known but has no live binding.
    NotRegistered,
    /// The AOR was never seen.
    Unknown,
    /// The owner shard could not be asked (its queue is full): answer 503 with Retry-After.
    Unavailable,
    /// No binding here, but these (live) cluster nodes hold the AOR's flows: relay the
    /// request to each over its inter-node link, Request-URI unchanged (the node delivers
    /// it on the UA's own connection).
    Nodes(Vec<String>),
}

/// A target chosen after lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The new Request-URI (the registered contact); `None` keeps it (a relay to the
    /// cluster node that holds the contact).
    pub uri: Option<String>,
    /// The flow to send on.
    pub flow: Flow,
    /// Route values to add (the contact's Path).
    pub path: Vec<String>,
    /// Where to send it instead if `flow` fails with it (the device's other flows).
    pub fallbacks: Vec<Target>,
}

impl Target {
    /// A target with no fallback.
    pub fn to(flow: Flow, uri: Option<String>, path: Vec<String>) -> Target {
        Target {
            uri,
            flow,
            path,
            fallbacks: Vec::new(),
        }
    }

    fn of(r: Reach) -> Target {
        Target {
            uri: Some(r.contact),
            flow: Flow::Conn(r.flow),
            path: r.path,
            fallbacks: r.fallbacks.into_iter().map(Target::of).collect(),
        }
    }
}

/// The proxy core.
#[derive(Debug, Clone, Default)]
pub struct Proxy {
    cfg: ProxyConfig,
}

const ALLOW: &[u8] = b"INVITE, ACK, BYE, CANCEL, OPTIONS, MESSAGE, INFO, UPDATE, PRACK, SUBSCRIBE, NOTIFY, REFER, REGISTER";

/// FNV-1a over several fields, separated so that field boundaries matter.
fn fnv(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, p| fnv_from(h, p))
}

/// FNV-1a of `part` (and a separator) continued from `h`.
fn fnv_from(mut h: u64, part: &[u8]) -> u64 {
    for &b in part.iter().chain(std::iter::once(&0xff)) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The tag that signs a dialog's flow pair: an HMAC over both tokens and the Call-ID, so a
/// route is good for the dialog it was made for and nothing else (10 bytes, hex).
fn flow_tag(key: &NodeKey, fi: &[u8], fo: &[u8], call_id: &[u8]) -> String {
    key.tag(FLOW_TAG_BYTES, &[b"flow", fi, fo, call_id])
}

/// [`flow_tag`] of a route that names its parties too (`ui`, `uo`; absent ones empty): its
/// own form, so removing them from a route breaks it. A route without them keeps the old
/// form, which dialogs set up before them still carry.
fn parties_flow_tag(
    key: &NodeKey,
    [fi, fo]: [&[u8]; 2],
    call_id: &[u8],
    [ui, uo]: [Option<&[u8]>; 2],
) -> String {
    key.tag(
        FLOW_TAG_BYTES,
        &parties_flow_parts([fi, fo], call_id, [ui, uo]),
    )
}

fn parties_flow_parts<'a>(
    [fi, fo]: [&'a [u8]; 2],
    call_id: &'a [u8],
    [ui, uo]: [Option<&'a [u8]>; 2],
) -> [&'a [u8]; 7] {
    // Which of them the route has: a tag added empty (`;ui`) is not one absent.
    const PRESENT: [&[u8]; 4] = [b"", b"i", b"o", b"io"];
    [
        b"flow-parties",
        fi,
        fo,
        call_id,
        PRESENT[usize::from(ui.is_some()) | usize::from(uo.is_some()) << 1],
        ui.unwrap_or_default(),
        uo.unwrap_or_default(),
    ]
}

/// 80 bits: a forger gets one guess per request, and a guess costs a round trip.
const FLOW_TAG_BYTES: usize = 10;

/// The tag that names one party of a dialog in our Record-Route (`ui`/`uo`): keyed over its
/// AOR, its flow token and the Call-ID, so it tells nobody who the party is, nor links its
/// dialogs. Only compared with the tag of an AOR a sender has proven (the route's `ft`
/// guards it from edits): 48 bits keep two AORs from sharing one.
fn party_tag(key: &NodeKey, token: &[u8], call_id: &[u8], aor: &[u8]) -> String {
    key.tag(PARTY_TAG_BYTES, &[b"party", token, call_id, aor])
}

const PARTY_TAG_BYTES: usize = 6;

/// Room for one Record-Route entry of ours: a host name, both flow tokens, both party tags
/// and the signature fit without growing.
const RR_CAPACITY: usize = 160;

/// Are two host names one: case aside, and one trailing dot (an absolute name) on either
/// side (configured or received) aside, as for AORs.
fn same_host(a: &[u8], b: &[u8]) -> bool {
    fn strip(h: &[u8]) -> &[u8] {
        h.strip_suffix(b".").unwrap_or(h)
    }
    // An IPv6 reference has many spellings (`[2001:db8::10]`, `[2001:db8:0:0::10]`): as
    // text, `sip:ceo@<our address>` written otherwise was not this server's.
    fn v6(h: &[u8]) -> Option<std::net::Ipv6Addr> {
        let inner = h.strip_prefix(b"[")?.strip_suffix(b"]")?;
        std::str::from_utf8(inner).ok()?.parse().ok()
    }
    if a.first() == Some(&b'[') && b.first() == Some(&b'[') {
        return v6(a).is_some_and(|x| v6(b) == Some(x));
    }
    text::eq_ic(strip(a), strip(b))
}

/// The branch prefix that marks our Via values.
pub const BRANCH_PREFIX: &str = "z9hG4bKsr";

impl Proxy {
    /// A proxy with this configuration.
    pub fn new(cfg: ProxyConfig) -> Self {
        Proxy { cfg }
    }

    /// The configuration.
    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    fn is_local_host(&self, host: &[u8]) -> bool {
        self.cfg
            .local_hosts
            .iter()
            .any(|h| same_host(h.as_bytes(), host))
    }

    /// Is `host` this server (a local host name or address, or our Via host)?
    pub(crate) fn is_self(&self, host: &[u8]) -> bool {
        self.is_local_host(host) || same_host(host, self.cfg.via_host.as_bytes())
    }

    /// Does this URI name us: one of our hosts or domains, and (when it has one) one of our
    /// ports? Without a port a URI with our host is ours (an outbound-proxy setting rarely
    /// has one); a domain we serve is us as a Route (a phone whose outbound proxy is its
    /// SIP domain, resolved to us by SRV — as Kamailio's `loose_route` counts its aliases).
    pub fn is_self_uri(&self, uri: &Uri<'_>) -> bool {
        (self.is_self(uri.host) || self.is_our_domain(uri.host))
            && uri
                .port
                .is_none_or(|p| p == self.cfg.via_port || self.cfg.ports.contains(&p))
    }

    /// RFC 3261 §16.4: a Request-URI whose `maddr` names us (one of our hosts, addresses or
    /// domains) is processed as if the `maddr`, and any port or `transport`, were not there:
    /// the Request-URI to forward then, if `ruri` had one. Forwarded as it came, a partner's
    /// proxy that honours `maddr` sent the request straight back, round and round until the
    /// loop check answered 482.
    pub fn without_our_maddr(&self, ruri: &[u8]) -> Option<String> {
        let uri = Uri::parse(ruri).ok()?;
        let maddr = uri.param("maddr").flatten()?;
        if !(self.is_self(maddr) || self.is_our_domain(maddr)) {
            return None;
        }
        let colon = ruri.iter().position(|&b| b == b':')?;
        let mut out = String::from_utf8_lossy(&ruri[..=colon]).into_owned();
        if let Some(user) = uri.user {
            out.push_str(&String::from_utf8_lossy(user));
            if let Some(pw) = uri.password {
                out.push(':');
                out.push_str(&String::from_utf8_lossy(pw));
            }
            out.push('@');
        }
        out.push_str(&String::from_utf8_lossy(uri.host));
        // URI parameters hold no quoted strings: split on `;` (kept apart from the message
        // parser's helpers, whose inlining the icount parse gate measures).
        for p in uri.params.split(|&b| b == b';').filter(|p| !p.is_empty()) {
            let name = p.split(|&b| b == b'=').next().unwrap_or_default();
            if name.eq_ignore_ascii_case(b"maddr") || name.eq_ignore_ascii_case(b"transport") {
                continue;
            }
            out.push(';');
            out.push_str(&String::from_utf8_lossy(p));
        }
        if let Some(h) = uri.headers {
            out.push('?');
            out.push_str(&String::from_utf8_lossy(h));
        }
        Some(out)
    }

    /// Does this URI name this server itself (a local host name or address, or our Via
    /// host; and one of our ports when it has one), not merely a domain we serve?
    pub fn is_self_host_uri(&self, uri: &Uri<'_>) -> bool {
        self.is_self(uri.host)
            && uri
                .port
                .is_none_or(|p| p == self.cfg.via_port || self.cfg.ports.contains(&p))
    }

    /// The default interface (our Via host and port, TLS).
    pub fn default_interface(&self) -> Interface {
        Interface {
            host: self.cfg.via_host.clone(),
            port: self.cfg.via_port,
            transport: Transport::Tls,
        }
    }

    /// The AOR a Request-URI for one of our users names. A user at this server's own name
    /// or address (`sip:bob@203.0.113.5`: SIPp's default `[service]@[remote_ip]`, a phone
    /// dialling by address) is that user of our domain when we serve exactly one: AORs are
    /// registered in domains only (a REGISTER for `bob@<address>` is refused), so such a
    /// request was looked up as an AOR nobody can hold and answered 404 while bob was online.
    /// With several domains it is ambiguous and stays as written.
    fn target_aor(&self, ruri: &Uri<'_>) -> Option<String> {
        let aor = crate::registrar::aor_of(ruri)?;
        match self.cfg.domains.as_slice() {
            [only] if !self.is_our_domain(ruri.host) && self.is_self(ruri.host) => {
                let (user, _) = aor.rsplit_once('@')?;
                Some(format!("{user}@{only}"))
            }
            _ => Some(aor),
        }
    }

    fn is_our_domain(&self, host: &[u8]) -> bool {
        // `example.com.` is `example.com` (the AOR drops the dot too: one user, one shard).
        self.cfg
            .domains
            .iter()
            .any(|d| same_host(d.as_bytes(), host))
    }

    /// The loop-detection hash of a request (RFC 3261 §16.3 step 4, as RFC 5393 §4.2 has it:
    /// without the topmost Via, with the Route values): over Request-URI, From and To tags,
    /// Call-ID, CSeq number, Proxy-Require and every Route value as received. A request that
    /// comes back unchanged hashes the same (a loop); a spiral does not — a new Request-URI,
    /// or (in a dialog that passes us twice, through a partner) the same Request-URI with
    /// the route set consumed up to our second entry.
    pub fn loop_hash(msg: &Message<'_, '_>, ess: &Essentials<'_>) -> u64 {
        let pr = msg
            .header(HeaderName::ProxyRequire)
            .map_or(&b""[..], |h| h.value);
        let h = fnv(&[
            msg.request_uri().unwrap_or_default(),
            ess.from.tag().unwrap_or_default(),
            ess.to.tag().unwrap_or_default(),
            ess.call_id,
            &ess.cseq.seq.to_be_bytes(),
            pr,
        ]);
        msg.headers_named(HeaderName::Route)
            .fold(h, |h, r| fnv_from(h, r.value))
    }

    /// The shard that created one of our branches (the top 16 bits of its unique part, see
    /// [`Proxy::branch`]); `None` for branches that are not ours.
    pub fn branch_shard(branch: &[u8]) -> Option<u16> {
        let rest = branch.strip_prefix(BRANCH_PREFIX.as_bytes())?;
        let dot = rest.iter().position(|&b| b == b'.')?;
        let unique = u64::from_str_radix(std::str::from_utf8(&rest[dot + 1..]).ok()?, 16).ok()?;
        Some((unique >> 48) as u16)
    }

    /// The branch for a request we forward: our prefix, the loop hash, and a unique part whose
    /// top 16 bits name the shard that owns the client transaction (so a response arriving on
    /// another shard's connection can be relayed to it).
    pub fn branch(msg: &Message<'_, '_>, ess: &Essentials<'_>, unique: u64) -> String {
        format!(
            "{BRANCH_PREFIX}{:016x}.{unique:x}",
            Self::loop_hash(msg, ess)
        )
    }

    /// Decides what to do with a validated request that arrived over `inbound`, a connection
    /// of the federation partner `inbound_peer` if it is one (partners are addressed as
    /// [`Flow::Peer`] in dialog routes, whatever connection they use).
    pub fn decide(
        &self,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
        inbound: &Flow,
        inbound_peer: Option<&str>,
    ) -> Decision {
        let d = self.route(msg, ess, inbound, inbound_peer);
        // A REGISTER ends at our registrar or is answered: relayed to a partner (a
        // Request-URI or Route naming its domain, a dialog route) it would arrive over our
        // trusted link, with our assertion of who sent it, to change the partner's users'
        // bindings — its To is checked only by our registrar.
        match d {
            Decision::ToPeer(_)
            | Decision::ToFlow(_)
            | Decision::Reconnected(_)
            | Decision::Lookup { .. }
                if msg.method() == Some(Method::Register) =>
            {
                Decision::Refuse(Denial {
                    code: 403,
                    reason: "Registrations Are Not Relayed",
                    label: "register_relay",
                })
            }
            d => d,
        }
    }

    /// [`Proxy::decide`]'s routing (§16.3–16.5), for any method.
    fn route(
        &self,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
        inbound: &Flow,
        inbound_peer: Option<&str>,
    ) -> Decision {
        let Some(method) = msg.method() else {
            return Decision::Drop("not a request");
        };
        let is_ack = method == Method::Ack;
        let reject = |code, reason| {
            if is_ack {
                Decision::Drop("ACK cannot be answered")
            } else {
                Answer::decision(code, reason)
            }
        };

        if !ess.top_via.has_rfc3261_branch() && ess.top_via.branch().is_none_or(|b| b.len() <= 7) {
            return reject(400, "Missing Via Branch");
        }
        let ruri = Uri::parse(msg.request_uri().unwrap_or_default()).expect("validated");
        if !ruri.is_sip() {
            return reject(416, "Unsupported URI Scheme");
        }
        // Loop detection: our own Via with the same loop hash.
        let hash = format!("{BRANCH_PREFIX}{:016x}.", Self::loop_hash(msg, ess));
        let mut ours = 0;
        for v in msg.values(HeaderName::Via) {
            let Some(via) = Via::parse(v.value) else {
                continue;
            };
            if !self.is_self(via.host) {
                continue;
            }
            if let Some(b) = via
                .branch()
                .filter(|b| b.starts_with(BRANCH_PREFIX.as_bytes()))
            {
                ours += 1;
                if b.starts_with(hash.as_bytes()) {
                    return reject(482, "Loop Detected");
                }
            }
        }
        if ours >= 8 {
            return reject(482, "Loop Detected");
        }
        // The option tags of a Require-like header we do not support, comma-separated.
        let unsupported_in = |name: HeaderName| {
            let mut unsupported = Vec::new();
            for v in msg.values(name) {
                if !self
                    .cfg
                    .supported
                    .iter()
                    .any(|s| text::eq_ic(s.as_bytes(), v.value))
                {
                    if !unsupported.is_empty() {
                        unsupported.extend_from_slice(b", ");
                    }
                    unsupported.extend_from_slice(v.value);
                }
            }
            unsupported
        };
        // 420 with Unsupported, when a Require-like header names a tag we do not support.
        let bad_extension = |name: HeaderName| {
            let unsupported = unsupported_in(name);
            (!unsupported.is_empty()).then(|| {
                Decision::Respond(Answer {
                    code: 420,
                    reason: "Bad Extension",
                    headers: vec![("Unsupported", unsupported)],
                })
            })
        };
        // Proxy-Require (RFC 3261 §16.3 step 5).
        if !is_ack
            && method != Method::Cancel
            && let Some(d) = bad_extension(HeaderName::ProxyRequire)
        {
            return d;
        }
        if method == Method::Cancel {
            return Decision::Cancel;
        }
        // Max-Forwards (§16.3 step 3), for every request this decision forwards; one that
        // ends here (a REGISTER, an OPTIONS to us) is answered whatever its count.
        let max_forwards = ess.max_forwards.unwrap_or(70);
        let exhausted = max_forwards == 0;

        // Route pre-processing (§16.4). A strict-routing predecessor put our Record-Route
        // in the Request-URI: it carries the dialog's flows (the real target is the last
        // Route, which forwarding restores). Else the Routes on top that name us are ours to
        // remove: the first with flow tokens carries the dialog's flows; one without (a UA's
        // preloaded outbound proxy) is simply removed and routing goes on.
        if ruri.param("fi").is_some() && self.is_self_uri(&ruri) {
            if exhausted {
                return reject(483, "Too Many Hops");
            }
            return self.dialog_route(&ruri, ess, inbound, inbound_peer, is_ack, &reject);
        }
        for r in msg.values(HeaderName::Route) {
            let Some(na) = NameAddr::parse(r.value) else {
                return reject(400, "Bad Route");
            };
            let uri = na.uri();
            if !self.is_self_uri(&uri) {
                // A Route to someone else: only partners are reachable that way.
                return match self.peer_for(uri.host) {
                    Some(_) if exhausted => reject(483, "Too Many Hops"),
                    Some(p) => Decision::ToPeer(p),
                    None => reject(403, "Route Not Allowed"),
                };
            }
            if uri.param("fi").is_some() || uri.param("fo").is_some() {
                if exhausted {
                    return reject(483, "Too Many Hops");
                }
                return self.dialog_route(&uri, ess, inbound, inbound_peer, is_ack, &reject);
            }
        }

        // Target by Request-URI (§16.5).
        let host = ruri.host;
        let to_us = (self.is_local_host(host) || self.is_our_domain(host)) && ruri.user.is_none();
        if to_us || self.is_our_domain(host) || self.is_local_host(host) {
            if method == Method::Register {
                if !(self.is_our_domain(host) || self.is_local_host(host)) {
                    return reject(403, "Domain Not Served");
                }
                // The registrar is a UAS: a Require it does not support is 420, before any
                // challenge (RFC 3261 §10.3 step 2, §8.2.2.3).
                return bad_extension(HeaderName::Require).unwrap_or(Decision::Register);
            }
            if to_us {
                // We answer as a UAS here: a Require we do not support is 420 (§8.2.2.3).
                return match method {
                    Method::Options => bad_extension(HeaderName::Require).unwrap_or_else(|| {
                        Decision::Respond(Answer {
                            code: 200,
                            reason: "OK",
                            headers: vec![
                                ("Allow", ALLOW.to_vec()),
                                ("Accept", b"application/sdp".to_vec()),
                            ],
                        })
                    }),
                    Method::Ack => Decision::Drop("ACK to the server"),
                    _ => Answer::decision(404, "Not Found"),
                };
            }
            if exhausted {
                return reject(483, "Too Many Hops");
            }
            return match self.target_aor(&ruri) {
                Some(aor) => Decision::Lookup { aor },
                None => reject(404, "Not Found"),
            };
        }
        if exhausted {
            return reject(483, "Too Many Hops");
        }
        match self.peer_for(host) {
            Some(p) => Decision::ToPeer(p),
            None => reject(403, "Domain Not Served"),
        }
    }

    /// How many of the Routes on top are this hop's to remove (§16.4): those naming us
    /// without flow tokens (a UA's preloaded outbound proxy, under any of our names), then
    /// the first with tokens — the entry this dialog's route was made of — and its RFC 5658
    /// twin (our other interface, the same tokens). A later entry naming us is a later pass
    /// through us (a hairpin through a partner that does not record-route): it stays, for
    /// the hop that reaches it. `strict`: a strict router's Request-URI, already the entry
    /// with tokens, so only its twin goes.
    fn consumed(&self, routes: &[HeaderValue<'_>], strict: Option<&Uri<'_>>) -> usize {
        fn tokens<'a>(u: &Uri<'a>) -> (Option<&'a [u8]>, Option<&'a [u8]>) {
            (u.param("fi").flatten(), u.param("fo").flatten())
        }
        let mut pass = strict.map(tokens);
        let mut n = 0;
        for r in routes {
            let Some(uri) = NameAddr::parse(r.value).map(|na| na.uri()) else {
                break;
            };
            if !self.is_self_uri(&uri) {
                break;
            }
            let t = tokens(&uri);
            match pass {
                Some(p) if t == p => {}
                Some(_) => break,
                None if t == (None, None) => {}
                None => pass = Some(t),
            }
            n += 1;
        }
        n
    }

    /// Does `msg` follow one of our dialog routes (a Route of ours, or a strict router's
    /// Request-URI, with flow tokens, before any Route that is not ours)? What
    /// [`Proxy::decide`] routes by [`Proxy::dialog_route`]; for the door of an overloaded or
    /// draining shard, which lets requests inside our dialogs pass even when the token's
    /// fallback routes them to a partner (`ToPeer`: a UA that reconnected). Only consulted
    /// after `decide` accepted the token (a forged one is refused there).
    pub fn follows_our_dialog_route(&self, msg: &Message<'_, '_>) -> bool {
        self.our_dialog_route(msg).is_some()
    }

    /// A request on one of our dialog routes (`uri` is our Record-Route with its flow
    /// tokens): only a route we signed, for this dialog, is followed.
    fn dialog_route(
        &self,
        uri: &Uri<'_>,
        ess: &Essentials<'_>,
        inbound: &Flow,
        inbound_peer: Option<&str>,
        is_ack: bool,
        reject: &dyn Fn(u16, &'static str) -> Decision,
    ) -> Decision {
        let (fi_raw, fo_raw) = (uri.param("fi").flatten(), uri.param("fo").flatten());
        let ui = uri.param("ui").map(Option::unwrap_or_default);
        let uo = uri.param("uo").map(Option::unwrap_or_default);
        if !self.signed_route(uri, ess.call_id) {
            return if is_ack {
                Decision::Drop("forged flow token")
            } else {
                Decision::Refuse(Denial {
                    code: 403,
                    reason: "Invalid Flow Token",
                    label: "forged_flow_token",
                })
            };
        }
        // Our Record-Route is for requests inside the dialog it was made for: one without a
        // To tag (a new request that reuses the Call-ID and the route) is not followed.
        if ess.to.tag().is_none() {
            return reject(403, "Dialog Route Outside A Dialog");
        }
        // Nothing is created for a name that is not a configured partner.
        let known = |f: Option<Flow>| match f {
            Some(Flow::Peer(p)) if !self.is_peer_name(&p) => None,
            f => f,
        };
        let fi = known(fi_raw.and_then(Flow::decode));
        let fo = known(fo_raw.and_then(Flow::decode));
        let came_from = |f: &Flow| {
            f == inbound || matches!(f, Flow::Peer(p) if inbound_peer == Some(p.as_str()))
        };
        match (fi, fo) {
            (Some(fi), Some(fo)) if came_from(&fi) => Decision::ToFlow(fo),
            (Some(fi), Some(fo)) if came_from(&fo) => Decision::ToFlow(fi),
            // From neither flow: a party that reconnected, if the route names its parties
            // and a client sent it (a partner's flow is its name: it never "reconnects").
            // Whoever proves to be one of them (`party_route`) reaches the other.
            (Some(fi), Some(fo)) if inbound_peer.is_none() && (ui.is_some() || uo.is_some()) => {
                let party = |tag: Option<&[u8]>, token: Option<&[u8]>, to: Flow| {
                    Some(Party {
                        tag: String::from_utf8_lossy(tag?).into_owned(),
                        token: String::from_utf8_lossy(token?).into_owned(),
                        to,
                    })
                };
                let parties = [party(ui, fi_raw, fo), party(uo, fo_raw, fi)];
                Decision::Reconnected(parties.into_iter().flatten().collect())
            }
            // A partner's side is reachable whatever connection the other side uses now (a
            // route that names no party: set up before parties were named, or by a caller
            // nobody authenticated).
            (Some(_), Some(Flow::Peer(p))) | (Some(Flow::Peer(p)), Some(_)) => Decision::ToPeer(p),
            _ => reject(404, "Dialog Flow Not Found"),
        }
    }

    /// Is `uri` (our Record-Route with flow tokens) one we signed for the dialog `call_id`?
    fn signed_route(&self, uri: &Uri<'_>, call_id: &[u8]) -> bool {
        let fi = uri.param("fi").flatten().unwrap_or_default();
        let fo = uri.param("fo").flatten().unwrap_or_default();
        let ui = uri.param("ui").map(Option::unwrap_or_default);
        let uo = uri.param("uo").map(Option::unwrap_or_default);
        uri.param("ft").flatten().is_some_and(|t| {
            let key = &self.cfg.key;
            if ui.is_none() && uo.is_none() {
                key.verify_tag(FLOW_TAG_BYTES, &[b"flow", fi, fo, call_id], t)
            } else {
                let parts = parties_flow_parts([fi, fo], call_id, [ui, uo]);
                key.verify_tag(FLOW_TAG_BYTES, &parts, t)
            }
        })
    }

    /// The request's dialog route of ours: a strict router's Request-URI, else the first
    /// Route naming us with flow tokens (as [`Proxy::decide`] finds it).
    fn our_dialog_route<'m>(&self, msg: &Message<'m, '_>) -> Option<Uri<'m>> {
        let ruri = msg.request_uri().and_then(|u| Uri::parse(u).ok());
        if let Some(u) = ruri.filter(|u| u.param("fi").is_some() && self.is_self_uri(u)) {
            return Some(u);
        }
        for r in msg.values(HeaderName::Route) {
            let uri = NameAddr::parse(r.value)?.uri();
            if !self.is_self_uri(&uri) {
                return None;
            }
            if uri.param("fi").is_some() || uri.param("fo").is_some() {
                return Some(uri);
            }
        }
        None
    }

    /// A request our dialog route sent to `gone`, a connection that has closed: the AOR
    /// of the party that was on it, when the route names that party and the request's To
    /// is it (to the party, To is its AOR). Its binding made since over a new connection
    /// (it reconnected and registered again) may take the request: see the shard's
    /// rebinding. `None`: the route names nobody there, or To is someone else.
    pub fn party_gone(
        &self,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
        gone: &Flow,
    ) -> Option<String> {
        let uri = self.our_dialog_route(msg)?;
        if !self.signed_route(&uri, ess.call_id) {
            return None;
        }
        let token = gone.encode();
        let side = |flow: &str, tag: &str| {
            let t = uri.param(flow).flatten()?;
            (t == token.as_bytes())
                .then(|| uri.param(tag).flatten())
                .flatten()
        };
        let tag = side("fi", "ui").or_else(|| side("fo", "uo"))?;
        let aor = crate::registrar::aor_of(&ess.to.uri())?;
        self.cfg
            .key
            .verify_tag(
                PARTY_TAG_BYTES,
                &[b"party", token.as_bytes(), ess.call_id, aor.as_bytes()],
                tag,
            )
            .then_some(aor)
    }

    /// Where a request on a [`Decision::Reconnected`] route goes when its sender has shown
    /// it is `aor` (a binding its connection holds, its certificate, its digest): to the
    /// other party's flow, if `aor` is one of the route's parties. `None`: it is not one of
    /// them. A dialog between two devices of one AOR names it twice: which side reconnected
    /// cannot be told, and neither is chosen.
    pub fn party_route<'p>(
        &self,
        parties: &'p [Party],
        call_id: &[u8],
        aor: &str,
    ) -> Option<&'p Flow> {
        let mut matching = parties.iter().filter(|p| {
            self.cfg.key.verify_tag(
                PARTY_TAG_BYTES,
                &[b"party", p.token.as_bytes(), call_id, aor.as_bytes()],
                p.tag.as_bytes(),
            )
        });
        let first = matching.next()?;
        matching.next().is_none().then_some(&first.to)
    }

    /// A configured partner or cluster node of this name?
    fn is_peer_name(&self, name: &str) -> bool {
        self.cfg.peers.iter().any(|r| r.peer == name) || self.is_node(name)
    }

    /// Is `name` one of our cluster's other nodes?
    pub fn is_node(&self, name: &str) -> bool {
        self.cfg.nodes.iter().any(|n| n == name)
    }

    fn peer_for(&self, host: &[u8]) -> Option<String> {
        // One trailing dot (an absolute name) is the same host.
        let host = host.strip_suffix(b".").unwrap_or(host);
        self.cfg
            .peers
            .iter()
            .find(|p| text::eq_ic(p.domain.as_bytes(), host))
            .map(|p| p.peer.clone())
    }

    /// Finishes a [`Decision::Lookup`]: the targets to fork to, or the answer.
    pub fn after_lookup(
        &self,
        method: Method<'_>,
        lookup: Lookup,
    ) -> Result<Vec<Target>, Decision> {
        let reject = |code, reason| {
            if method == Method::Ack {
                Decision::Drop("ACK for unknown target")
            } else {
                Answer::decision(code, reason)
            }
        };
        match lookup {
            Lookup::Found(b) if !b.is_empty() => Ok(b.into_iter().map(Target::of).collect()),
            Lookup::Nodes(n) if !n.is_empty() => Ok(n
                .into_iter()
                .map(|node| Target::to(Flow::Peer(node), None, Vec::new()))
                .collect()),
            Lookup::Nodes(_) => Err(reject(480, "Temporarily Unavailable")),
            Lookup::Found(_) | Lookup::NotRegistered => Err(reject(480, "Temporarily Unavailable")),
            Lookup::Unknown => Err(reject(404, "Not Found")),
            Lookup::Unavailable if method == Method::Ack => Err(Decision::Drop("overloaded")),
            Lookup::Unavailable => Err(Decision::Respond(Answer {
                code: 503,
                reason: "Service Unavailable",
                headers: vec![("Retry-After", b"1".to_vec())],
            })),
        }
    }

    /// Builds the bytes to forward a request (RFC 3261 §16.6): our Via (naming the interface
    /// it leaves by) with `branch` prepended, the sender's Via completed with `received` and
    /// `rport` (a client's), Max-Forwards decremented (or set to 70), the Routes that name us
    /// removed (a strict router's Request-URI restored from the last Route), the Request-URI
    /// replaced by `new_uri` if given, Record-Route for dialog-creating requests — one naming
    /// the interface the request came in by, and a second naming the one it leaves by when
    /// they differ (RFC 5658), both with the signed flow tokens — identity edits, and a
    /// Content-Length if the message had none.
    pub fn forward_request(
        &self,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
        branch: &str,
        new_uri: Option<&[u8]>,
        hop: &Hop<'_>,
    ) -> Vec<u8> {
        let ident = hop.ident;
        let mut e = Editor::new(msg);
        if ident.strip_pai {
            e.remove_header(HeaderName::PAssertedIdentity);
        }
        if ident.strip_rpid {
            e.remove_header(HeaderName::RemotePartyId);
        }
        if ident.strip_ppi {
            e.remove_header(HeaderName::PPreferredIdentity);
        }
        if !ident.consume_realms.is_empty() {
            for name in [HeaderName::ProxyAuthorization, HeaderName::Authorization] {
                e.remove_header_where(name, |v| {
                    crate::auth::credentials_realm(v).is_some_and(|r| {
                        ident
                            .consume_realms
                            .iter()
                            .any(|d| d.eq_ignore_ascii_case(&r))
                    })
                });
            }
        }
        if let Some(pai) = &ident.add_pai {
            e.add_header("P-Asserted-Identity", pai.as_bytes());
        }
        if let Some(src) = hop.source {
            let _ = e.complete_top_via(&src, ess.top_via.host);
        }
        if let Some(b) = hop.max_breadth {
            e.set_other_header("Max-Breadth", b.to_string().as_bytes());
        }
        let out = hop.out_iface;
        let via = format!(
            "SIP/2.0/{} {}:{};branch={branch}{}",
            out.transport.via_name(),
            out.host,
            out.port,
            if hop.overload_control {
                ";oc;oc-algo=\"loss\""
            } else {
                ""
            }
        );
        e.prepend_via(via.as_bytes());
        e.set_max_forwards(ess.max_forwards.map_or(70, |m| m.saturating_sub(1)));
        // Routes (§16.4): a strict router's Request-URI (our Record-Route) is replaced by
        // the last Route; then the Routes on top that are this hop's go — see `consumed`.
        let routes = msg.values(HeaderName::Route);
        let ruri = msg.request_uri().and_then(|u| Uri::parse(u).ok());
        let strict_in = ruri
            .as_ref()
            .filter(|u| u.param("fi").is_some() && self.is_self_uri(u));
        let strict = strict_in.is_some();
        // The last Route holds the remote target a strict router moved there (one that does
        // not parse stays where it is, and so does the Request-URI).
        let restored = routes
            .last()
            .filter(|_| strict)
            .and_then(|r| NameAddr::parse(r.value))
            .map(|na| na.uri);
        let end = routes.len() - usize::from(restored.is_some());
        let ours = self.consumed(&routes[..end], strict_in);
        let new_target = new_uri
            .map(request_uri_of)
            .or_else(|| restored.map(request_uri_of));
        let target: Option<&[u8]> = new_target.as_deref();
        // §16.6 step 6: a next hop that routes strictly (no `lr`) gets the request addressed
        // to it, with the Request-URI kept as the last Route.
        let strict_next = routes[ours..end]
            .first()
            .filter(|_| hop.path.is_empty())
            .and_then(|r| NameAddr::parse(r.value))
            .filter(|na| na.uri().param("lr").is_none());
        let removed = ours + usize::from(strict_next.is_some());
        match (removed, end < routes.len()) {
            // Adjacent to the restored target: one run.
            (n, true) if n == end => {
                let _ = e.remove_values_from(HeaderName::Route, 0, routes.len());
            }
            (n, tail) => {
                if n > 0 {
                    let _ = e.remove_values_from(HeaderName::Route, 0, n);
                }
                if tail {
                    let _ = e.remove_values_from(HeaderName::Route, end, 1);
                }
            }
        }
        if let Some(next) = &strict_next {
            let last = target.or(msg.request_uri()).unwrap_or_default();
            // A Request-URI carries no `?headers` nor `method=` (RFC 3261 §19.1.1): a Route
            // may.
            let _ = e.set_request_uri(&request_uri_of(next.uri));
            let mut v = Vec::with_capacity(last.len() + 2);
            v.push(b'<');
            v.extend_from_slice(last);
            v.push(b'>');
            e.append_route(&v);
        } else if let Some(t) = target {
            let _ = e.set_request_uri(t);
        }
        for p in hop.path {
            e.insert_route(p.as_bytes());
        }
        // A NOTIFY always carries a To-tag, yet the one answering a forked SUBSCRIBE creates
        // a dialog, whose route set comes from it (RFC 6665 §4.1.2.4): NOTIFYs are always
        // record-routed (in an established dialog the extra entry changes nothing, §12.2).
        let creates_dialog = match msg.method() {
            Some(Method::Notify) => true,
            Some(Method::Invite | Method::Subscribe | Method::Refer) => ess.to.tag().is_none(),
            _ => false,
        };
        if self.cfg.record_route && creates_dialog {
            let (fi, fo) = (hop.inbound.encode(), hop.outbound.encode());
            // A party is named only on a client connection of ours (a partner's flow is its
            // name, whatever connection it uses).
            let party = |flow: &Flow, token: &str, aor: Option<&str>| {
                aor.filter(|_| matches!(flow, Flow::Conn(_)))
                    .map(|a| party_tag(&self.cfg.key, token.as_bytes(), ess.call_id, a.as_bytes()))
            };
            let ui = party(hop.inbound, &fi, hop.parties.0);
            let uo = party(hop.outbound, &fo, hop.parties.1);
            let ft = if ui.is_none() && uo.is_none() {
                flow_tag(&self.cfg.key, fi.as_bytes(), fo.as_bytes(), ess.call_id)
            } else {
                parties_flow_tag(
                    &self.cfg.key,
                    [fi.as_bytes(), fo.as_bytes()],
                    ess.call_id,
                    [
                        ui.as_deref().map(str::as_bytes),
                        uo.as_deref().map(str::as_bytes),
                    ],
                )
            };
            // §16.6 step 4: a Record-Route is sips exactly when the request it is read with
            // is (its Request-URI or top Route), where that side is TLS (sips implies it:
            // no `transport` parameter, RFC 5630). The upstream reads our inbound side with
            // the request as it came; the downstream our outbound side with the request as
            // it goes (a sips request to a sip contact: sips upstream, sip downstream).
            let sips = |u: &[u8]| Uri::parse(u).is_ok_and(|u| u.scheme == Scheme::Sips);
            let route_sips =
                |r: Option<&[u8]>| r.and_then(NameAddr::parse).is_some_and(|na| sips(na.uri));
            let secure_in =
                msg.request_uri().is_some_and(sips) || route_sips(routes.first().map(|r| r.value));
            let next_route = match hop.path.first() {
                Some(p) => Some(p.as_bytes()),
                None => routes[ours..end].first().map(|r| r.value),
            };
            let secure_out = new_uri.or(msg.request_uri()).is_some_and(sips)
                || (!strict && route_sips(next_route));
            let rr = |i: &Interface, secure: bool| {
                use std::fmt::Write;
                let mut v = String::with_capacity(RR_CAPACITY);
                // Writing to a String cannot fail.
                let _ = if secure && i.transport == Transport::Tls {
                    write!(v, "<sips:{}:{};lr;fi={fi};fo={fo}", i.host, i.port)
                } else {
                    write!(
                        v,
                        "<sip:{}:{};transport={};lr;fi={fi};fo={fo}",
                        i.host,
                        i.port,
                        i.transport.uri_name()
                    )
                };
                for (name, tag) in [(";ui=", &ui), (";uo=", &uo)] {
                    if let Some(t) = tag {
                        v.push_str(name);
                        v.push_str(t);
                    }
                }
                let _ = write!(v, ";ft={ft}>");
                v
            };
            // Downstream reads the set top first (our outbound side first), upstream
            // reversed (our inbound side first); two entries where the sides differ.
            let (inside, outside) = (rr(hop.in_iface, secure_in), rr(hop.out_iface, secure_out));
            if outside != inside {
                e.insert_record_route(outside.as_bytes());
            }
            e.insert_record_route(inside.as_bytes());
        }
        e.ensure_content_length();
        e.finish()
    }

    /// Is this response's top Via ours? Returns the branch to match the client
    /// transaction, or `None` if the response must be dropped (RFC 3261 §16.7 step 1; RFC
    /// 4475 §3.3.10).
    pub fn response_branch<'b>(&self, ess: &Essentials<'b>) -> Option<&'b [u8]> {
        let via = &ess.top_via;
        let ours = self.is_self(via.host);
        let b = via.branch()?;
        (ours && b.starts_with(BRANCH_PREFIX.as_bytes())).then_some(b)
    }

    /// Builds the bytes to forward a response upstream: our top Via removed, and
    /// P-Preferred-Identity (a UA's wish to its proxy, RFC 3325, never for upstream).
    ///
    /// `(strip_pai, strip_rpid)`: remove what it asserts about the answering party
    /// (P-Asserted-Identity, Remote-Party-ID) too, as the policy decides
    /// (`Policy::strips_response_identity`).
    pub fn forward_response(
        &self,
        msg: &Message<'_, '_>,
        (strip_pai, strip_rpid): (bool, bool),
    ) -> Vec<u8> {
        let mut e = Editor::new(msg);
        let _ = e.pop_top_via();
        e.remove_header(HeaderName::PPreferredIdentity);
        if strip_pai {
            e.remove_header(HeaderName::PAssertedIdentity);
        }
        if strip_rpid {
            e.remove_header(HeaderName::RemotePartyId);
        }
        // Overload-control feedback for our upstream is ours to write (RFC 7339), not a
        // downstream UA's: what one wrote into the upstream's Via goes.
        e.strip_overload_feedback(1);
        e.finish()
    }
}

/// A registered contact as a Request-URI: RFC 3261 §19.1.1 allows neither the `method`
/// parameter nor headers there (a Contact may carry both; copied verbatim, the request is
/// refused by the next parser — ours included). Anything else is kept as registered.
pub fn request_uri_of(contact: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::borrow::Cow;
    let Ok(u) = Uri::parse(contact) else {
        return Cow::Borrowed(contact);
    };
    let has_method = text::find_param(u.params, b"method").is_some();
    if u.headers.is_none() && !has_method {
        return Cow::Borrowed(contact);
    }
    // The parameters run up to the headers (`?…`), which end the URI.
    let end = contact.len() - u.headers.map_or(0, |h| h.len() + 1);
    let mut out = contact[..end - u.params.len()].to_vec();
    let split = text::for_each_param(u.params, |name, value| {
        if text::eq_ic(name, b"method") {
            return;
        }
        out.push(b';');
        out.extend_from_slice(name);
        if let Some(v) = value {
            out.push(b'=');
            out.extend_from_slice(v);
        }
    });
    if split.is_err() {
        // Parameters this splitter cannot read (a URI parser accepts more characters in
        // them than a token): kept as registered, only the headers cut — never dropped,
        // `transport` and `maddr` among them.
        return Cow::Owned(contact[..end].to_vec());
    }
    Cow::Owned(out)
}

/// Extracts an option-tag list (e.g. `Require`) as trimmed tokens.
pub fn option_tags<'b>(msg: &Message<'b, '_>, name: HeaderName) -> Vec<&'b [u8]> {
    msg.values(name)
        .into_iter()
        .map(|v| trim(v.value))
        .filter(|v| !v.is_empty())
        .collect()
}

/// Does `uri` use a scheme a proxy can route (`sip`/`sips`)?
pub fn routable_scheme(uri: &Uri<'_>) -> bool {
    matches!(uri.scheme, Scheme::Sip | Scheme::Sips)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::Header;
    use crate::parse::{Framing, Limits, Status, parse};

    /// The Record-Route values of a message's text, top first.
    fn record_routes(s: &str) -> Vec<&str> {
        s.lines()
            .filter_map(|l| l.strip_prefix("Record-Route: "))
            .collect()
    }

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            domains: vec!["example.com".into()],
            local_hosts: vec!["proxy.example.com".into(), "127.0.0.1".into()],
            via_host: "proxy.example.com".into(),
            via_port: 5061,
            ports: vec![5061],
            partner_interface: None,
            peers: vec![PeerRoute {
                domain: "partner.net".into(),
                peer: "partner".into(),
            }],
            nodes: vec!["node-b".into()],
            supported: vec!["outbound".into()],
            record_route: true,
            key: NodeKey::new([3; 32]),
        }
    }

    fn req(start: &str, extra: &str) -> String {
        format!(
            "{start} SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKabc\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:alice@example.com>;tag=a\r\nCall-ID: c1\r\nCSeq: 1 {}\r\nMax-Forwards: 70\r\n{extra}Content-Length: 0\r\n\r\n",
            start.split(' ').next().unwrap()
        )
    }

    /// Forwards over the default interface both ways, no edits.
    fn fwd(
        p: &Proxy,
        m: &Message<'_, '_>,
        e: &Essentials<'_>,
        branch: &str,
        uri: Option<&[u8]>,
        a: &Flow,
        b: &Flow,
    ) -> Vec<u8> {
        fwd_naming(p, m, e, (branch, uri), (a, b), (None, None))
    }

    /// [`fwd`], the dialog's parties named.
    fn fwd_naming(
        p: &Proxy,
        m: &Message<'_, '_>,
        e: &Essentials<'_>,
        (branch, uri): (&str, Option<&[u8]>),
        (a, b): (&Flow, &Flow),
        parties: (Option<&str>, Option<&str>),
    ) -> Vec<u8> {
        let i = p.default_interface();
        p.forward_request(
            m,
            e,
            branch,
            uri,
            &Hop {
                inbound: a,
                outbound: b,
                in_iface: &i,
                out_iface: &i,
                source: None,
                ident: &IdentityEdit::default(),
                path: &[],
                overload_control: false,
                max_breadth: None,
                parties,
            },
        )
    }

    /// `f` on `s` parsed and validated.
    fn with_req<T>(s: &str, f: impl FnOnce(&Message<'_, '_>, &Essentials<'_>) -> T) -> T {
        let mut h = [Header::EMPTY; 32];
        let Ok(Status::Complete(m)) =
            parse(s.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
        else {
            panic!("{s}")
        };
        let e = m.validate(&Limits::default()).unwrap();
        f(&m, &e)
    }

    fn decide_on(p: &Proxy, s: &str, inbound: &Flow) -> Decision {
        with_req(s, |m, e| p.decide(m, e, inbound, None))
    }

    fn code(d: Decision) -> u16 {
        match d {
            Decision::Respond(a) => a.code,
            Decision::Refuse(d) => d.code,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn routing_table() {
        let p = Proxy::new(cfg());
        let f = Flow::Conn(1);
        macro_rules! case {
            ($start:literal, $extra:literal => $want:expr) => {
                assert_eq!(decide_on(&p, &req($start, $extra), &f), $want, "{}", $start);
            };
        }
        case!("INVITE sip:bob@example.com", "" => Decision::Lookup { aor: "sip:bob@example.com".into() });
        case!("REGISTER sip:example.com", "" => Decision::Register);
        case!("INVITE sip:carol@partner.net", "" => Decision::ToPeer("partner".into()));
        // A REGISTER is never relayed to a partner, by Request-URI or by Route.
        let relay = Decision::Refuse(Denial {
            code: 403,
            reason: "Registrations Are Not Relayed",
            label: "register_relay",
        });
        case!("REGISTER sip:partner.net", "" => relay);
        case!("REGISTER sip:example.com", "Route: <sip:partner.net;lr>\r\n" => relay);
        case!("OPTIONS sip:example.com", "Route: <sip:partner.net;lr>\r\n" => Decision::ToPeer("partner".into()));
        case!("CANCEL sip:bob@example.com", "" => Decision::Cancel);
        case!("ACK sip:bob@elsewhere.org", "" => Decision::Drop("ACK cannot be answered"));
        assert_eq!(
            code(decide_on(&p, &req("INVITE sip:bob@elsewhere.org", ""), &f)),
            403
        );
        assert_eq!(
            code(decide_on(&p, &req("INVITE tel:+15551234", ""), &f)),
            416
        );
        assert_eq!(
            code(decide_on(&p, &req("OPTIONS sip:proxy.example.com", ""), &f)),
            200
        );
        assert_eq!(
            code(decide_on(&p, &req("MESSAGE sip:example.com", ""), &f)),
            404
        );
        let zero =
            req("OPTIONS sip:bob@example.com", "").replace("Max-Forwards: 70", "Max-Forwards: 0");
        assert_eq!(code(decide_on(&p, &zero, &f)), 483);
        match decide_on(
            &p,
            &req(
                "OPTIONS sip:bob@example.com",
                "Proxy-Require: outbound, foo, bar\r\n",
            ),
            &f,
        ) {
            Decision::Respond(a) => {
                assert_eq!(a.code, 420);
                assert_eq!(a.headers, vec![("Unsupported", b"foo, bar".to_vec())]);
            }
            d => panic!("{d:?}"),
        }
        let nobranch = req("INVITE sip:bob@example.com", "").replace(";branch=z9hG4bKabc", "");
        assert_eq!(code(decide_on(&p, &nobranch, &f)), 400);
        // A phone whose outbound proxy is its SIP domain (SRV to us) preloads a Route naming
        // the domain: it is ours and removed (was 403 "Route Not Allowed").
        case!("REGISTER sip:example.com", "Route: <sip:example.com;lr>\r\n" => Decision::Register);
        case!("INVITE sip:bob@example.com", "Route: <sip:example.com:5061;transport=tls;lr>\r\n" => Decision::Lookup { aor: "sip:bob@example.com".into() });
        // An absolute name (one trailing dot) is the same domain or host (was 403 "Domain
        // Not Served" and "Route Not Allowed"); the AOR drops the dot.
        case!("INVITE sip:bob@example.com.", "" => Decision::Lookup { aor: "sip:bob@example.com".into() });
        case!("INVITE sip:bob@example.com", "Route: <sip:proxy.example.com.;lr>\r\n" => Decision::Lookup { aor: "sip:bob@example.com".into() });
        // A user at this server's own name or address is that user of the one domain we
        // serve (SIPp's `[service]@[remote_ip]`): it was looked up as `bob@127.0.0.1`, an
        // AOR nobody can register, and answered 404.
        for ruri in [
            "INVITE sip:bob@127.0.0.1",
            "INVITE sip:bob@127.0.0.1:5061;transport=tls",
            "INVITE sip:bob@proxy.example.com",
        ] {
            assert_eq!(
                decide_on(&p, &req(ruri, ""), &f),
                Decision::Lookup {
                    aor: "sip:bob@example.com".into()
                },
                "{ruri}"
            );
        }
        // With two domains it is ambiguous, and stays as written.
        let two = Proxy::new(ProxyConfig {
            domains: vec!["example.com".into(), "example.net".into()],
            ..cfg()
        });
        assert_eq!(
            decide_on(&two, &req("INVITE sip:bob@127.0.0.1", ""), &f),
            Decision::Lookup {
                aor: "sip:bob@127.0.0.1".into()
            }
        );
        // And a host configured with its dot still knows itself without one.
        let dotted = Proxy::new(ProxyConfig {
            local_hosts: vec!["proxy.example.com.".into()],
            via_host: "proxy.example.com.".into(),
            ..cfg()
        });
        for route in ["<sip:proxy.example.com;lr>", "<sip:proxy.example.com.;lr>"] {
            assert_eq!(
                decide_on(
                    &dotted,
                    &req("INVITE sip:bob@example.com", &format!("Route: {route}\r\n")),
                    &f
                ),
                Decision::Lookup {
                    aor: "sip:bob@example.com".into()
                },
                "{route}"
            );
        }
    }

    /// The Record-Route we add forwarding `s` from `a` to `b`.
    /// A request of bob's dialog (its To has bob's tag).
    trait InDialog {
        fn in_dialog(self) -> String;
    }

    impl InDialog for String {
        fn in_dialog(self) -> String {
            self.replace(
                "To: <sip:bob@example.com>",
                "To: <sip:bob@example.com>;tag=b",
            )
        }
    }

    /// Forwards `m` from `a` (reached by interface `ia`) to `b` (by `ib`), as text.
    fn fwd_between(
        p: &Proxy,
        m: &Message<'_, '_>,
        e: &Essentials<'_>,
        branch: &str,
        (a, ia): (&Flow, &Interface),
        (b, ib): (&Flow, &Interface),
    ) -> String {
        String::from_utf8(p.forward_request(
            m,
            e,
            branch,
            None,
            &Hop {
                inbound: a,
                outbound: b,
                in_iface: ia,
                out_iface: ib,
                source: None,
                ident: &IdentityEdit::default(),
                path: &[],
                overload_control: false,
                max_breadth: None,
                parties: (None, None),
            },
        ))
        .unwrap()
    }

    fn record_route(p: &Proxy, s: &str, a: &Flow, b: &Flow) -> String {
        let out = with_req(s, |m, e| fwd(p, m, e, &Proxy::branch(m, e, 1), None, a, b));
        let out = String::from_utf8(out).unwrap();
        out.lines()
            .find_map(|l| l.strip_prefix("Record-Route: "))
            .unwrap()
            .to_string()
    }

    #[test]
    fn uas_rules_for_what_we_answer_and_request_uris_from_contacts() {
        let p = Proxy::new(cfg());
        let f = Flow::Conn(1);
        // 420, naming what is unsupported.
        let bad_extension = |text: &str, unsupported: &[u8]| match decide_on(&p, text, &f) {
            Decision::Respond(a) => {
                assert_eq!(a.code, 420);
                assert_eq!(a.headers, vec![("Unsupported", unsupported.to_vec())]);
            }
            d => panic!("{d:?}"),
        };
        // OPTIONS to us with a Require we do not support: 420 (§8.2.2.3).
        bad_extension(
            &req("OPTIONS sip:proxy.example.com", "Require: foo\r\n"),
            b"foo",
        );
        // REGISTER with a Require we do not support: 420 before any challenge (§10.3 step 2);
        // one we support (outbound) is registered.
        bad_extension(
            &req("REGISTER sip:example.com", "Require: outbound, pref\r\n"),
            b"pref",
        );
        assert!(matches!(
            decide_on(
                &p,
                &req("REGISTER sip:example.com", "Require: outbound\r\n"),
                &f
            ),
            Decision::Register
        ));
        // A 100 Trying copies the request's Timestamp (§8.2.6.1).
        let inv = req("INVITE sip:bob@example.com", "Timestamp: 54.2\r\n");
        let trying = with_req(&inv, |m, _| {
            crate::response::response_to(m, 100, "Trying", Default::default())
        });
        assert!(
            String::from_utf8(trying)
                .unwrap()
                .contains("\r\nTimestamp: 54.2\r\n")
        );
        // A contact's `method` parameter and headers do not go into a Request-URI.
        for (contact, want) in [
            (
                "sip:bob@10.0.0.2:5061;transport=tls;method=INVITE?Subject=hi",
                "sip:bob@10.0.0.2:5061;transport=tls",
            ),
            ("sip:bob@10.0.0.2?X-A=1", "sip:bob@10.0.0.2"),
            ("sip:bob@10.0.0.2;ob", "sip:bob@10.0.0.2;ob"),
            (
                "sip:bob@h;x[1]=a;transport=tls?X=1",
                "sip:bob@h;x[1]=a;transport=tls",
            ),
        ] {
            assert_eq!(request_uri_of(contact.as_bytes()).as_ref(), want.as_bytes());
        }
    }

    #[test]
    fn every_notify_is_record_routed() {
        // The NOTIFY of a second phone answering a forked SUBSCRIBE creates its dialog;
        // without our Record-Route the refresh went straight to a contact behind NAT.
        let p = Proxy::new(cfg());
        let notify = req(
            "NOTIFY sip:alice@10.0.0.1",
            "Event: dialog\r\nSubscription-State: active;expires=600\r\n",
        )
        .replace(
            "To: <sip:bob@example.com>",
            "To: <sip:bob@example.com>;tag=n2",
        );
        let rr = record_route(
            &p,
            &notify,
            &Flow::Conn(0x2_0000_0009),
            &Flow::Conn(0x1_0000_0007),
        );
        assert!(rr.contains(";lr;fi="), "{rr}");
        // Other requests inside a dialog are not.
        let bye = req("BYE sip:alice@10.0.0.1", "").replace(
            "To: <sip:bob@example.com>",
            "To: <sip:bob@example.com>;tag=n2",
        );
        let out = with_req(&bye, |m, e| {
            fwd(&p, m, e, "z9hG4bKsrx", None, &Flow::Conn(1), &Flow::Conn(2))
        });
        assert!(!String::from_utf8(out).unwrap().contains("Record-Route"));
    }

    #[test]
    fn a_dialog_that_passes_us_twice_is_a_spiral_not_a_loop() {
        // alice → us → partner (a call-forwarding proxy) → us → bob. Bob's BYE carries the
        // route set <us, on the way back in>, <partner>, <us, on the way out>; we send it to
        // the partner, which sends it back with the same Request-URI, tags, Call-ID and
        // CSeq. Hashing without the Route values (and without the top Via), that was our
        // own branch again: 482, the call never torn down (and the ACK of its 200 dropped).
        let p = Proxy::new(cfg());
        let (a, b, partner) = (
            Flow::Conn(0x1_0000_0007),
            Flow::Conn(0x2_0000_0009),
            Flow::Peer("partner".into()),
        );
        let inv = req("INVITE sip:bob@example.com", "");
        let rr_out = record_route(&p, &inv, &a, &partner);
        let rr_in = record_route(&p, &inv, &partner, &b);
        let bye = |via: &str, route: &str| {
            req("BYE sip:alice@10.0.0.1", &format!("Route: {route}\r\n"))
                .in_dialog()
                .replace("Via: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKabc", via)
        };
        let first = bye(
            "Via: SIP/2.0/TLS 10.0.0.2;branch=z9hG4bKbob",
            &format!("{rr_in}, <sip:partner.net;lr>, {rr_out}"),
        );
        assert_eq!(decide_on(&p, &first, &b), Decision::ToFlow(partner.clone()));
        let ours = with_req(&first, |m, e| Proxy::branch(m, e, 2));
        let again = bye(
            &format!(
                "Via: SIP/2.0/TLS partner.net;branch=z9hG4bKp1\r\nVia: SIP/2.0/TLS proxy.example.com:5061;branch={ours}\r\nVia: SIP/2.0/TLS 10.0.0.2;branch=z9hG4bKbob"
            ),
            &rr_out,
        );
        assert_eq!(decide_on(&p, &again, &partner), Decision::ToFlow(a));
        // The same request coming back unchanged (its route set as it was) is a loop.
        let looped = bye(
            &format!(
                "Via: SIP/2.0/TLS partner.net;branch=z9hG4bKp1\r\nVia: SIP/2.0/TLS proxy.example.com:5061;branch={ours}\r\nVia: SIP/2.0/TLS 10.0.0.2;branch=z9hG4bKbob"
            ),
            &format!("{rr_in}, <sip:partner.net;lr>, {rr_out}"),
        );
        assert_eq!(code(decide_on(&p, &looped, &b)), 482);
    }

    /// Forwards the INVITE `inv` from `a` to `b`, the parties named; our Record-Route value.
    fn record_route_naming(
        p: &Proxy,
        inv: &str,
        (a, b): (&Flow, &Flow),
        parties: (Option<&str>, Option<&str>),
    ) -> String {
        let target = Some(&b"sip:bob@10.0.0.2:5061;transport=tls"[..]);
        let out = with_req(inv, |m, e| {
            fwd_naming(p, m, e, ("z9hG4bKsrx", target), (a, b), parties)
        });
        String::from_utf8(out)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Record-Route: "))
            .unwrap()
            .to_string()
    }

    #[test]
    fn a_party_that_reconnected_follows_its_route_and_nobody_else_does() {
        let p = Proxy::new(cfg());
        let (a, b, new) = (Flow::Conn(7), Flow::Conn(9), Flow::Conn(11));
        let inv = req(
            "INVITE sip:bob@example.com",
            "Contact: <sip:alice@10.0.0.1>\r\n",
        );
        let (alice, bob) = ("sip:alice@example.com", "sip:bob@example.com");
        let rr = record_route_naming(&p, &inv, (&a, &b), (Some(alice), Some(bob)));
        assert!(rr.contains(";ui=") && rr.contains(";uo="), "{rr}");
        assert!(
            !rr.contains("alice") && !rr.contains("bob"),
            "it names nobody: {rr}"
        );
        let bye = req("BYE sip:alice@10.0.0.1", &format!("Route: {rr}\r\n")).in_dialog();
        // On the dialog's own flows, as always.
        assert_eq!(decide_on(&p, &bye, &b), Decision::ToFlow(a.clone()));
        assert_eq!(decide_on(&p, &bye, &a), Decision::ToFlow(b.clone()));
        // From another connection: a party that reconnected, which only the dialog's AORs
        // are, each reaching the other — for this dialog only.
        let Decision::Reconnected(parties) = decide_on(&p, &bye, &new) else {
            panic!("{:?}", decide_on(&p, &bye, &new))
        };
        assert_eq!(p.party_route(&parties, b"c1", bob), Some(&a));
        assert_eq!(p.party_route(&parties, b"c1", alice), Some(&b));
        assert_eq!(
            p.party_route(&parties, b"c1", "sip:mallory@example.com"),
            None
        );
        assert_eq!(p.party_route(&parties, b"c2", bob), None);
        // Nor is a REGISTER relayed that way.
        let reg = req("REGISTER sip:alice@10.0.0.1", &format!("Route: {rr}\r\n")).in_dialog();
        assert_eq!(code(decide_on(&p, &reg, &new)), 403);
        // The parties are under the route's signature: dropped, swapped or copied from
        // one side to the other, the route is refused.
        let param = |name: &str| {
            let at = rr.find(&format!(";{name}=")).unwrap();
            let end = rr[at + 1..].find(';').map_or(rr.len(), |e| at + 1 + e);
            rr[at..end].to_string()
        };
        let (ui, uo) = (param("ui"), param("uo"));
        for forged in [
            rr.replace(&ui, ""),
            rr.replace(&uo, ""),
            rr.replace(&ui, "").replace(&uo, ""),
            rr.replace(&ui, "#")
                .replace(&uo, &ui.replace("ui=", "uo="))
                .replace('#', &uo.replace("uo=", "ui=")),
            rr.replace(&uo, &uo.replace("uo=", "uo=0")),
        ] {
            assert_ne!(forged, rr);
            let m = req("BYE sip:alice@10.0.0.1", &format!("Route: {forged}\r\n")).in_dialog();
            assert_eq!(code(decide_on(&p, &m, &new)), 403, "{forged}");
        }
        // A partner is no party that reconnected (its flow is its name).
        let from_partner = with_req(&bye, |m, e| {
            p.decide(m, e, &Flow::Peer("partner".into()), Some("partner"))
        });
        assert_eq!(code(from_partner), 404);
        // A caller nobody authenticated is not named: only the callee may come back.
        let rr = record_route_naming(&p, &inv, (&a, &b), (None, Some(bob)));
        assert!(!rr.contains(";ui=") && rr.contains(";uo="), "{rr}");
        for added in [";ui", ";ui="] {
            let forged = rr.replace(";uo=", &format!("{added};uo="));
            let m = req("BYE sip:alice@10.0.0.1", &format!("Route: {forged}\r\n")).in_dialog();
            assert_eq!(code(decide_on(&p, &m, &new)), 403, "{forged}");
        }
        let bye = req("BYE sip:alice@10.0.0.1", &format!("Route: {rr}\r\n")).in_dialog();
        let Decision::Reconnected(parties) = decide_on(&p, &bye, &new) else {
            panic!()
        };
        assert_eq!(p.party_route(&parties, b"c1", bob), Some(&a));
        assert_eq!(p.party_route(&parties, b"c1", alice), None);
        // Two devices of one AOR in a call: which one reconnected cannot be told.
        let rr = record_route_naming(&p, &inv, (&a, &b), (Some(bob), Some(bob)));
        let bye = req("BYE sip:alice@10.0.0.1", &format!("Route: {rr}\r\n")).in_dialog();
        let Decision::Reconnected(parties) = decide_on(&p, &bye, &new) else {
            panic!()
        };
        assert_eq!(p.party_route(&parties, b"c1", bob), None);
        // A partner's side is no party either: the client's side is, and only it reaches
        // the partner from another connection (before, any client did).
        let partner = Flow::Peer("partner".into());
        let rr = record_route_naming(&p, &inv, (&a, &partner), (Some(alice), Some(bob)));
        assert!(rr.contains(";ui=") && !rr.contains(";uo="), "{rr}");
        let bye = req("BYE sip:alice@10.0.0.1", &format!("Route: {rr}\r\n")).in_dialog();
        let Decision::Reconnected(parties) = decide_on(&p, &bye, &new) else {
            panic!()
        };
        assert_eq!(p.party_route(&parties, b"c1", alice), Some(&partner));
        assert_eq!(p.party_route(&parties, b"c1", bob), None);
        // Routes that name nobody (made before parties were named) work as they did.
        let rr = record_route_naming(&p, &inv, (&a, &partner), (None, None));
        let bye = req("BYE sip:alice@10.0.0.1", &format!("Route: {rr}\r\n")).in_dialog();
        assert_eq!(
            decide_on(&p, &bye, &new),
            Decision::ToPeer("partner".into())
        );
        assert_eq!(decide_on(&p, &bye, &a), Decision::ToFlow(partner));
    }

    #[test]
    fn dialog_flow_tokens_and_forwarding() {
        let p = Proxy::new(cfg());
        let (a, b) = (Flow::Conn(0x1_0000_0007), Flow::Conn(0x2_0000_0009));
        let inv = req(
            "INVITE sip:bob@example.com",
            "Contact: <sip:alice@10.0.0.1>\r\n",
        );
        let mut h = [Header::EMPTY; 32];
        let Ok(Status::Complete(m)) =
            parse(inv.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
        else {
            panic!()
        };
        let e = m.validate(&Limits::default()).unwrap();
        let branch = Proxy::branch(&m, &e, 1);
        let out = fwd(
            &p,
            &m,
            &e,
            &branch,
            Some(b"sip:bob@10.0.0.2:5061;transport=tls"),
            &a,
            &b,
        );
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("INVITE sip:bob@10.0.0.2:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS proxy.example.com:5061;branch=z9hG4bKsr"));
        assert!(s.contains("Max-Forwards: 69\r\n"));
        let rr = format!(
            "Record-Route: <sip:proxy.example.com:5061;transport=tls;lr;fi={};fo={};ft=",
            a.encode(),
            b.encode()
        );
        assert!(s.contains(&rr), "{s}");
        let rr_value = s
            .lines()
            .find_map(|l| l.strip_prefix("Record-Route: "))
            .unwrap()
            .to_string();
        // The forwarded request looping back to us is detected.
        assert_eq!(
            code(decide_on(
                &p,
                &s.replace("sip:bob@10.0.0.2:5061;transport=tls", "sip:bob@example.com"),
                &b
            )),
            482
        );
        // ... but a spiral with another Request-URI is not a loop.
        assert!(matches!(
            decide_on(
                &p,
                &s.replace(
                    "sip:bob@10.0.0.2:5061;transport=tls",
                    "sip:bob2@example.com"
                ),
                &b
            ),
            Decision::Lookup { .. }
        ));
        // In-dialog BYE from the callee (on flow b) with our Route goes to flow a, and back.
        let route = format!("Route: {rr_value}\r\n");
        let bye = req("BYE sip:alice@10.0.0.1", &route).in_dialog();
        assert_eq!(decide_on(&p, &bye, &b), Decision::ToFlow(a.clone()));
        assert_eq!(decide_on(&p, &bye, &a), Decision::ToFlow(b.clone()));
        assert_eq!(code(decide_on(&p, &bye, &Flow::Conn(99))), 404);
        // The token is bound to the flows and the dialog: forged, altered or moved to
        // another Call-ID, it is refused (403) and nothing is created for it.
        for forged in [
            route.replace(&format!("fo={}", b.encode()), "fo=c2b"),
            route.replace(&format!("fo={}", b.encode()), "fo=pnowhere"),
            route.replace(";ft=", ";x="),
            "Route: <sip:proxy.example.com;lr;fi=pa;fo=c2b>\r\n".to_string(),
        ] {
            let m = req("BYE sip:alice@10.0.0.1", &forged);
            assert_eq!(code(decide_on(&p, &m, &b)), 403, "{forged}");
        }
        let other_dialog = bye.replace("Call-ID: c1", "Call-ID: c2");
        assert_eq!(code(decide_on(&p, &other_dialog, &b)), 403);
        // A new request (no To tag) reusing the dialog's Call-ID and our route is not
        // followed: the route is for the dialog (before, it reached the other side).
        let outside = req("MESSAGE sip:alice@10.0.0.1", &route);
        assert_eq!(code(decide_on(&p, &outside, &b)), 403);
        // Max-Forwards 0 stops a routed request too (§16.3 step 3): on our dialog route and
        // on a Route to a partner. Before, it went out with Max-Forwards 0.
        let spent = bye.replace("Max-Forwards: 70", "Max-Forwards: 0");
        assert_eq!(code(decide_on(&p, &spent, &b)), 483);
        let to_partner = req(
            "MESSAGE sip:carol@partner.net",
            "Route: <sip:partner.net;lr>\r\n",
        );
        assert_eq!(
            decide_on(&p, &to_partner, &b),
            Decision::ToPeer("partner".into())
        );
        let spent = to_partner.replace("Max-Forwards: 70", "Max-Forwards: 0");
        assert_eq!(code(decide_on(&p, &spent, &b)), 483);
        // A request that ends here is answered whatever its count.
        let reg =
            req("REGISTER sip:example.com", "").replace("Max-Forwards: 70", "Max-Forwards: 0");
        assert_eq!(decide_on(&p, &reg, &b), Decision::Register);
        // Forwarding the BYE pops our Route and adds no Record-Route.
        let mut h = [Header::EMPTY; 32];
        let Ok(Status::Complete(m)) =
            parse(bye.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
        else {
            panic!()
        };
        let e = m.validate(&Limits::default()).unwrap();
        let out = String::from_utf8(fwd(&p, &m, &e, "z9hG4bKsrx", None, &b, &a)).unwrap();
        assert!(!out.contains("Route"), "{out}");
    }

    #[test]
    fn a_sips_request_gets_a_sips_record_route_that_routes_its_dialog() {
        // §16.6 step 4: before, a sips INVITE got `<sip:…;transport=tls>`.
        let p = Proxy::new(cfg());
        let (a, b) = (Flow::Conn(0x1_0000_0007), Flow::Conn(0x2_0000_0009));
        let out = parsed(
            &req(
                "INVITE sips:bob@example.com",
                "Contact: <sips:alice@10.0.0.1>\r\n",
            ),
            |m, e| {
                fwd(
                    &p,
                    m,
                    e,
                    "z9hG4bKsr1",
                    Some(b"sips:bob@10.0.0.2:5061"),
                    &a,
                    &b,
                )
            },
        );
        let s = String::from_utf8(out).unwrap();
        let rr = record_routes(&s);
        assert_eq!(rr.len(), 1, "{s}");
        assert!(
            rr[0].starts_with("<sips:proxy.example.com:5061;lr;fi=")
                && !rr[0].contains("transport"),
            "{s}"
        );
        let bye = req("BYE sips:alice@10.0.0.1", &format!("Route: {}\r\n", rr[0])).in_dialog();
        assert_eq!(decide_on(&p, &bye, &b), Decision::ToFlow(a.clone()));
        // A sips request to a sip contact: sips for the upstream (which reads it with its
        // sips request), sip for the downstream (§16.6 step 4: "MUST insert a Record-Route
        // that is not a SIPS URI"), two entries for one interface.
        let out = parsed(&req("INVITE sips:bob@example.com", ""), |m, e| {
            fwd(
                &p,
                m,
                e,
                "z9hG4bKsr3",
                Some(b"sip:bob@10.0.0.2:5061;transport=tls"),
                &a,
                &b,
            )
        });
        let s = String::from_utf8(out).unwrap();
        let rr = record_routes(&s);
        assert_eq!(rr.len(), 2, "{s}");
        // Top first: the downstream's side (its route set's first hop), then the upstream's.
        assert!(
            rr[0].starts_with("<sip:proxy.example.com:5061;transport=tls;lr;"),
            "{s}"
        );
        assert!(rr[1].starts_with("<sips:proxy.example.com:5061;lr;"), "{s}");
        // A sip request keeps a sip Record-Route.
        let out = parsed(&req("INVITE sip:bob@example.com", ""), |m, e| {
            fwd(&p, m, e, "z9hG4bKsr2", None, &a, &b)
        });
        let s = String::from_utf8(out).unwrap();
        assert!(record_routes(&s)[0].starts_with("<sip:proxy.example.com:5061;transport=tls;lr"));
    }

    fn parsed<T>(s: &str, f: impl FnOnce(&Message<'_, '_>, &Essentials<'_>) -> T) -> T {
        let mut h = [Header::EMPTY; 32];
        let Ok(Status::Complete(m)) =
            parse(s.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
        else {
            panic!("{s}")
        };
        let e = m.validate(&Limits::default()).unwrap();
        f(&m, &e)
    }

    fn iface(port: u16, transport: Transport) -> Interface {
        Interface {
            host: "proxy.example.com".into(),
            port,
            transport,
        }
    }

    #[test]
    fn record_route_per_side_via_per_interface_and_received_rport() {
        let p = Proxy::new(ProxyConfig {
            ports: vec![5061, 5062, 5060],
            ..cfg()
        });
        let (a, b) = (Flow::Conn(1), Flow::Peer("partner".into()));
        let (tls, mtls, tcp) = (
            iface(5061, Transport::Tls),
            iface(5062, Transport::Tls),
            iface(5060, Transport::Tcp),
        );
        let inv = req("INVITE sip:carol@partner.net", "")
            .replace(";branch=z9hG4bKabc", ";branch=z9hG4bKabc;rport");
        let out = |in_i: &Interface, out_i: &Interface, src: Option<std::net::SocketAddr>| {
            parsed(&inv, |m, e| {
                String::from_utf8(p.forward_request(
                    m,
                    e,
                    "z9hG4bKsr1",
                    None,
                    &Hop {
                        inbound: &a,
                        outbound: &b,
                        in_iface: in_i,
                        out_iface: out_i,
                        source: src,
                        ident: &IdentityEdit::default(),
                        path: &[],
                        overload_control: false,
                        max_breadth: None,
                        parties: (None, None),
                    },
                ))
                .unwrap()
            })
        };
        // Client TLS in, partner MTLS out: our Via names the MTLS side; two Record-Routes,
        // the partner's side on top (RFC 5658), both carrying the signed tokens.
        let s = out(&tls, &mtls, Some("192.0.2.9:40000".parse().unwrap()));
        assert!(
            s.contains("Via: SIP/2.0/TLS proxy.example.com:5062;branch=z9hG4bKsr1\r\n"),
            "{s}"
        );
        let rrs = record_routes(&s);
        assert_eq!(rrs.len(), 2, "{s}");
        assert!(
            rrs[0]
                .starts_with("<sip:proxy.example.com:5062;transport=tls;lr;fi=c1;fo=ppartner;ft=")
        );
        assert!(
            rrs[1]
                .starts_with("<sip:proxy.example.com:5061;transport=tls;lr;fi=c1;fo=ppartner;ft=")
        );
        // The client's Via: rport filled, received added (RFC 3581, RFC 3261 §18.2.1).
        assert!(
            s.contains(
                "Via: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKabc;rport=40000;received=192.0.2.9\r\n"
            ),
            "{s}"
        );
        // Same listener both ways: one Record-Route. A TCP listener says TCP, not TLS.
        let s = out(&tcp, &tcp, None);
        assert!(
            s.contains("Via: SIP/2.0/TCP proxy.example.com:5060;branch="),
            "{s}"
        );
        let rrs = record_routes(&s);
        assert_eq!(rrs.len(), 1, "{s}");
        assert!(
            rrs[0].starts_with("<sip:proxy.example.com:5060;transport=tcp;lr;"),
            "{s}"
        );
        assert!(
            s.contains(";branch=z9hG4bKabc;rport\r\n"),
            "no source: Via untouched: {s}"
        );
        // A Via whose sent-by is the source address and asks nothing stays as it is.
        let plain = req("INVITE sip:carol@partner.net", "");
        let s = parsed(&plain, |m, e| {
            String::from_utf8(p.forward_request(
                m,
                e,
                "z9hG4bKsr2",
                None,
                &Hop {
                    inbound: &a,
                    outbound: &b,
                    in_iface: &tls,
                    out_iface: &tls,
                    source: Some("10.0.0.1:5061".parse().unwrap()),
                    ident: &IdentityEdit::default(),
                    path: &[],
                    overload_control: false,
                    max_breadth: None,
                    parties: (None, None),
                },
            ))
            .unwrap()
        });
        assert!(
            s.contains("Via: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKabc\r\n"),
            "{s}"
        );
        // The same for an IPv6 sent-by, written in brackets; another address gets
        // `received` (without brackets, RFC 3261 §18.2.1's grammar: IPv6address).
        let v6 = plain.replace("10.0.0.1;", "[2001:db8::1];");
        let via6 = |src: &str| {
            parsed(&v6, |m, e| {
                String::from_utf8(p.forward_request(
                    m,
                    e,
                    "z9hG4bKsr6",
                    None,
                    &Hop {
                        inbound: &a,
                        outbound: &b,
                        in_iface: &tls,
                        out_iface: &tls,
                        source: Some(src.parse().unwrap()),
                        ident: &IdentityEdit::default(),
                        path: &[],
                        overload_control: false,
                        max_breadth: None,
                        parties: (None, None),
                    },
                ))
                .unwrap()
            })
        };
        let s = via6("[2001:db8::1]:5061");
        assert!(
            s.contains("Via: SIP/2.0/TLS [2001:db8::1];branch=z9hG4bKabc\r\n"),
            "{s}"
        );
        let s = via6("[2001:db8::2]:5061");
        assert!(
            s.contains("Via: SIP/2.0/TLS [2001:db8::1];branch=z9hG4bKabc;received="),
            "{s}"
        );
    }

    #[test]
    fn routes_that_name_us_by_host_and_port() {
        let p = Proxy::new(ProxyConfig {
            ports: vec![5061, 5062],
            ..cfg()
        });
        let f = Flow::Conn(1);
        // A UA's preloaded outbound-proxy Route (no flow tokens) is removed and routing goes on
        // (RFC 3261 §16.4): REGISTER reaches the registrar, INVITE the location service.
        for route in [
            "Route: <sip:proxy.example.com;lr>\r\n",
            "Route: <sip:127.0.0.1:5061;transport=tls;lr>\r\n",
            "Route: <sip:127.0.0.1:5062;lr>, <sip:proxy.example.com;lr>\r\n",
        ] {
            assert_eq!(
                decide_on(&p, &req("REGISTER sip:example.com", route), &f),
                Decision::Register,
                "{route}"
            );
            assert!(matches!(
                decide_on(&p, &req("INVITE sip:bob@example.com", route), &f),
                Decision::Lookup { .. }
            ));
        }
        // Our host on another port is someone else (a server sharing the address).
        assert_eq!(
            code(decide_on(
                &p,
                &req(
                    "INVITE sip:bob@example.com",
                    "Route: <sip:127.0.0.1:5070;lr>\r\n"
                ),
                &f
            )),
            403
        );
        // Forwarding removes the Routes on top that name us (token-less ones: every one of
        // them), and only those.
        let inv = req(
            "INVITE sip:carol@partner.net",
            "Route: <sip:proxy.example.com;lr>\r\nRoute: <sip:127.0.0.1:5062;lr>, <sip:partner.net;lr>\r\n",
        );
        let s = parsed(&inv, |m, e| {
            String::from_utf8(fwd(
                &p,
                m,
                e,
                "z9hG4bKsr3",
                None,
                &f,
                &Flow::Peer("partner".into()),
            ))
            .unwrap()
        });
        let routes: Vec<&str> = s.lines().filter(|l| l.starts_with("Route:")).collect();
        assert_eq!(routes, vec!["Route: <sip:partner.net;lr>"], "{s}");
    }

    #[test]
    fn double_record_route_and_a_strict_routing_predecessor() {
        let p = Proxy::new(ProxyConfig {
            ports: vec![5061, 5062],
            ..cfg()
        });
        let (a, b) = (Flow::Conn(0x1_0000_0007), Flow::Peer("partner".into()));
        let (tls, mtls) = (iface(5061, Transport::Tls), iface(5062, Transport::Tls));
        let inv = req("INVITE sip:carol@partner.net", "");
        let fwd_inv = parsed(&inv, |m, e| {
            fwd_between(&p, m, e, "z9hG4bKsr1", (&a, &tls), (&b, &mtls))
        });
        let rrs: Vec<String> = record_routes(&fwd_inv)
            .into_iter()
            .map(str::to_string)
            .collect();
        // The partner's BYE carries both of our entries on top (its route set, in order).
        let bye = req(
            "BYE sip:alice@10.0.0.1",
            &format!("Route: {}, {}\r\n", rrs[0], rrs[1]),
        )
        .in_dialog();
        let pf = |d| parsed(&bye, |m, e| p.decide(m, e, &Flow::Conn(9), Some("partner"))) == d;
        assert!(pf(Decision::ToFlow(a.clone())));
        let out = parsed(&bye, |m, e| {
            String::from_utf8(fwd(&p, m, e, "z9hG4bKsr4", None, &b, &a)).unwrap()
        });
        assert!(
            !out.contains("Route:"),
            "both of our entries removed: {out}"
        );
        // A strict router (RFC 2543) puts the top of its route set (our first entry) in the
        // Request-URI, the rest in Route (our twin first) and the remote target last: the
        // tokens still route, the target is restored, and the twin goes too (§16.4: the
        // request is then processed as if it had come so) — else the next hop would send it
        // back to us on the twin.
        let uri = rrs[0].trim_start_matches('<').trim_end_matches('>');
        let strict = req(
            &format!("BYE {uri}"),
            &format!(
                "Route: {}\r\nRoute: <sip:alice@10.0.0.1:5061;transport=tls>\r\n",
                rrs[1]
            ),
        )
        .in_dialog();
        assert_eq!(
            parsed(&strict, |m, e| p.decide(
                m,
                e,
                &Flow::Conn(9),
                Some("partner")
            )),
            Decision::ToFlow(a.clone())
        );
        let out = parsed(&strict, |m, e| {
            String::from_utf8(fwd(&p, m, e, "z9hG4bKsr5", None, &b, &a)).unwrap()
        });
        assert!(
            out.starts_with("BYE sip:alice@10.0.0.1:5061;transport=tls SIP/2.0\r\n"),
            "{out}"
        );
        assert!(!out.contains("Route:"), "{out}");
    }

    #[test]
    fn a_later_pass_through_us_keeps_its_routes() {
        // alice (ours) → us → partner P (which does not record-route) → us → bob (ours):
        // bob's route set is our entries of the second pass, then those of the first. His
        // BYE goes to P with the first pass's entries still on it, for P to route back.
        let p = Proxy::new(ProxyConfig {
            ports: vec![5061, 5062],
            ..cfg()
        });
        let (alice, bob, partner) = (
            Flow::Conn(0x1_0000_0001),
            Flow::Conn(0x1_0000_0002),
            Flow::Peer("partner".into()),
        );
        let (tls, mtls) = (iface(5061, Transport::Tls), iface(5062, Transport::Tls));
        let pass = |inv: &str, a: &Flow, b: &Flow, ia: &Interface, ib: &Interface| {
            parsed(inv, |m, e| {
                fwd_between(&p, m, e, "z9hG4bKhp", (a, ia), (b, ib))
            })
        };
        let first = pass(
            &req("INVITE sip:carol@partner.net", ""),
            &alice,
            &partner,
            &tls,
            &mtls,
        );
        // P sends it back (Record-Route kept as it came, its own Via on top).
        let second = pass(&first, &partner, &bob, &mtls, &tls);
        let rrs = record_routes(&second);
        assert_eq!(rrs.len(), 4, "{second}");
        let bye = req(
            "BYE sip:alice@10.0.0.1",
            &format!("Route: {}\r\n", rrs.join(", ")),
        )
        .in_dialog();
        assert_eq!(
            parsed(&bye, |m, e| p.decide(m, e, &bob, None)),
            Decision::ToFlow(partner.clone())
        );
        let out = parsed(&bye, |m, e| {
            String::from_utf8(fwd(&p, m, e, "z9hG4bKhp2", None, &bob, &partner)).unwrap()
        });
        let routes: Vec<&str> = out.lines().filter(|l| l.starts_with("Route:")).collect();
        assert_eq!(
            routes,
            vec![format!("Route: {}, {}", rrs[2], rrs[3])],
            "only the second pass's entries go: {out}"
        );
        // P routes it back to us: the first pass's entries route it on to alice.
        let back = out.replacen(
            "Via: ",
            "Via: SIP/2.0/TLS partner.net;branch=z9hG4bKp\r\nVia: ",
            1,
        );
        assert_eq!(
            parsed(&back, |m, e| p.decide(
                m,
                e,
                &Flow::Conn(9),
                Some("partner")
            )),
            Decision::ToFlow(alice.clone())
        );
        let last = parsed(&back, |m, e| {
            String::from_utf8(fwd(&p, m, e, "z9hG4bKhp3", None, &partner, &alice)).unwrap()
        });
        assert!(!last.contains("Route:"), "{last}");
    }

    #[test]
    fn a_strict_routing_next_hop_gets_the_request_addressed_to_it() {
        // RFC 3261 §16.6 step 6: the next Route has no `lr` — it becomes the Request-URI and
        // the Request-URI goes last in Route. Our own preloaded entry is removed first.
        let p = Proxy::new(cfg());
        let f = Flow::Conn(1);
        let inv = req(
            "INVITE sip:carol@partner.net",
            "Route: <sip:proxy.example.com;lr>, <sip:partner.net>, <sip:core.partner.net;lr>\r\n",
        );
        assert_eq!(decide_on(&p, &inv, &f), Decision::ToPeer("partner".into()));
        let out = parsed(&inv, |m, e| {
            String::from_utf8(fwd(
                &p,
                m,
                e,
                "z9hG4bKst",
                None,
                &f,
                &Flow::Peer("partner".into()),
            ))
            .unwrap()
        });
        assert!(
            out.starts_with("INVITE sip:partner.net SIP/2.0\r\n"),
            "{out}"
        );
        let routes: Vec<&str> = out.lines().filter(|l| l.starts_with("Route:")).collect();
        assert_eq!(
            routes,
            vec![
                "Route: <sip:core.partner.net;lr>",
                "Route: <sip:carol@partner.net>"
            ],
            "{out}"
        );
        // A Route may carry headers and `method=`; a Request-URI may not (§19.1.1): the next
        // hop gets the URI without them (it refused the request before).
        let with_headers = inv.replace("<sip:partner.net>", "<sip:partner.net;method=INVITE?X=1>");
        let out = parsed(&with_headers, |m, e| {
            fwd(
                &p,
                m,
                e,
                "z9hG4bKst3",
                None,
                &f,
                &Flow::Peer("partner".into()),
            )
        });
        assert!(
            out.starts_with(b"INVITE sip:partner.net SIP/2.0\r\n"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        parsed(&String::from_utf8(out).unwrap(), |_, _| ());
        // A loose next hop: nothing moves.
        let loose = inv.replace("<sip:partner.net>", "<sip:partner.net;lr>");
        let out = parsed(&loose, |m, e| {
            String::from_utf8(fwd(
                &p,
                m,
                e,
                "z9hG4bKst2",
                None,
                &f,
                &Flow::Peer("partner".into()),
            ))
            .unwrap()
        });
        assert!(
            out.starts_with("INVITE sip:carol@partner.net SIP/2.0\r\n"),
            "{out}"
        );
        assert!(
            out.contains("Route: <sip:partner.net;lr>, <sip:core.partner.net;lr>\r\n"),
            "{out}"
        );
    }

    #[test]
    fn a_strict_router_on_each_side_on_one_route_line() {
        // A strict predecessor (our Record-Route in the Request-URI, our twin next, the
        // remote target last) and a strict next hop, every Route on one line: the twin and
        // the target's Route go, the next hop becomes the Request-URI, the target the last
        // Route — the removals on either side of the next hop do not overlap.
        let p = Proxy::new(ProxyConfig {
            ports: vec![5061, 5062],
            ..cfg()
        });
        let (a, b) = (Flow::Conn(0x1_0000_0007), Flow::Peer("partner".into()));
        let (tls, mtls) = (iface(5061, Transport::Tls), iface(5062, Transport::Tls));
        let fwd_inv = parsed(&req("INVITE sip:carol@partner.net", ""), |m, e| {
            fwd_between(&p, m, e, "z9hG4bKss1", (&a, &tls), (&b, &mtls))
        });
        let rrs: Vec<String> = record_routes(&fwd_inv)
            .into_iter()
            .map(str::to_string)
            .collect();
        let uri = rrs[0].trim_start_matches('<').trim_end_matches('>');
        let bye = req(
            &format!("BYE {uri}"),
            &format!(
                "Route: {}, <sip:sbc.example.org>, <sip:core.example.org;lr>, <sip:alice@10.0.0.1:5061;transport=tls>\r\n",
                rrs[1]
            ),
        )
        .in_dialog();
        assert_eq!(
            parsed(&bye, |m, e| p.decide(m, e, &Flow::Conn(9), Some("partner"))),
            Decision::ToFlow(a.clone())
        );
        let out = parsed(&bye, |m, e| {
            String::from_utf8(fwd(&p, m, e, "z9hG4bKss2", None, &b, &a)).unwrap()
        });
        assert!(
            out.starts_with("BYE sip:sbc.example.org SIP/2.0\r\n"),
            "{out}"
        );
        let routes: Vec<&str> = out.lines().filter(|l| l.starts_with("Route:")).collect();
        assert_eq!(
            routes,
            vec![
                "Route: <sip:core.example.org;lr>",
                "Route: <sip:alice@10.0.0.1:5061;transport=tls>"
            ],
            "{out}"
        );
    }

    #[test]
    fn responses_and_lookup() {
        let p = Proxy::new(cfg());
        assert_eq!(
            p.after_lookup(Method::Invite, Lookup::Unknown),
            Err(Answer::decision(404, "Not Found"))
        );
        assert_eq!(
            p.after_lookup(Method::Message, Lookup::NotRegistered),
            Err(Answer::decision(480, "Temporarily Unavailable"))
        );
        assert_eq!(
            p.after_lookup(Method::Ack, Lookup::Unknown),
            Err(Decision::Drop("ACK for unknown target"))
        );
        let t = p
            .after_lookup(
                Method::Invite,
                Lookup::Found(vec![Reach {
                    contact: "sip:b@h".into(),
                    flow: 5,
                    path: vec![],
                    fallbacks: vec![],
                }]),
            )
            .unwrap();
        assert_eq!(
            t,
            vec![Target::to(Flow::Conn(5), Some("sip:b@h".into()), vec![])]
        );
        // A cluster node holds the flow: relayed there with the Request-URI kept.
        assert_eq!(
            p.after_lookup(Method::Invite, Lookup::Nodes(vec!["node-b".into()])),
            Ok(vec![Target::to(Flow::Peer("node-b".into()), None, vec![])])
        );
        assert_eq!(
            p.after_lookup(Method::Invite, Lookup::Nodes(vec![])),
            Err(Answer::decision(480, "Temporarily Unavailable"))
        );
        let resp = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TLS proxy.example.com:5061;branch=z9hG4bKsr1.1\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKabc\r\nTo: <sip:b@example.com>;tag=x\r\nFrom: <sip:a@example.com>;tag=a\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let mut h = [Header::EMPTY; 16];
        let Ok(Status::Complete(m)) = parse(resp, &mut h, &Limits::default(), Framing::Stream)
        else {
            panic!()
        };
        let e = m.validate(&Limits::default()).unwrap();
        assert_eq!(p.response_branch(&e), Some(&b"z9hG4bKsr1.1"[..]));
        let fwd = p.forward_response(&m, (false, false));
        assert!(
            String::from_utf8(fwd).unwrap().starts_with(
                "SIP/2.0 200 OK\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKabc\r\nTo:"
            )
        );
        for t in [
            Flow::Conn(0),
            Flow::Conn(u64::MAX),
            Flow::Peer("partner-b".into()),
        ] {
            assert_eq!(Flow::decode(t.encode().as_bytes()), Some(t));
        }
        assert_eq!(Flow::decode(b"x1"), None);
        assert_eq!(Flow::decode(b"c"), None);
    }
}
