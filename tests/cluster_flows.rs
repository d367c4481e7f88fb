//! Two nodes of a cluster, driven in memory (sans-IO, no Redis): each node is a `ShardProxy`
//! with its registrar, a shared map stands for the location store (which node holds an AOR),
//! and the inter-node links are wired as the engine wires them — what A sends on its link
//! `Peer("b")` arrives at B on an inbound connection whose principal is the partner `a`, and
//! what B answers there arrives back at A on `Peer("b")`. Checks the one-hop relay, the
//! Record-Route both nodes add, dialogs in both directions without lookups, and that a
//! request from a node is never looked up in the store again (no loops).

use sipring_core::auth::NodeKey;
use sipring_core::policy::{
    FlowInfo, NoSubscribers, PartnerPolicy, Policy, PolicyConfig, Principal,
};
use sipring_core::proxy::{Flow, Interface, Lookup, Proxy, ProxyConfig, Transport};
use sipring_core::registrar::{MemoryStore, Registrar};
use sipring_core::response::{ResponseParts, response_to};
use sipring_core::stateful::{Output, ShardProxy};
use sipring_core::transaction::TimerConfig;
use sipring_core::{Framing, Header, HeaderName, Limits, Status, parse};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

/// The callee's connection at A, the caller's at B.
const CALLEE: Flow = Flow::Conn(1);
const CALLER: Flow = Flow::Conn(2);
/// A's link as B sees it (A dialed B), and B's as A sees it.
const FROM_A_AT_B: Flow = Flow::Conn(100);
const FROM_B_AT_A: Flow = Flow::Conn(200);

struct Node {
    name: &'static str,
    other: &'static str,
    proxy: ShardProxy,
    registrar: Registrar,
    store: MemoryStore,
}

/// Where a message ends up.
#[derive(Debug, Clone, Copy, PartialEq)]
enum At {
    A,
    B,
}

struct World {
    now: Instant,
    a: Node,
    b: Node,
    /// The location store: AOR -> node name.
    location: HashMap<String, &'static str>,
    /// (node, flow, bytes) waiting to be delivered.
    wire: Vec<(At, Flow, Vec<u8>)>,
    /// What reached the UAs.
    callee_got: Vec<Vec<u8>>,
    caller_got: Vec<Vec<u8>>,
    /// Lookups the nodes asked for, with `local_only`.
    lookups: Vec<(&'static str, String, bool)>,
    /// First lines of what crossed the node links.
    links: Vec<String>,
    /// The labels of the requests a node's policy refused.
    refused: Vec<&'static str>,
}

fn node(name: &'static str, other: &'static str) -> Node {
    let host = format!("{name}.example.com");
    let node_iface = Interface {
        host: host.clone(),
        port: 5062,
        transport: Transport::Tls,
    };
    let cfg = ProxyConfig {
        domains: vec!["example.com".into()],
        local_hosts: vec![host.clone()],
        via_host: host,
        via_port: 5061,
        ports: vec![5061, 5062],
        partner_interface: Some(node_iface.clone()),
        nodes: vec![other.into()],
        key: NodeKey::new([7; 32]),
        ..ProxyConfig::default()
    };
    let policy = Policy::new(
        PolicyConfig {
            authenticate: false,
            partners: vec![PartnerPolicy {
                name: other.into(),
                domains: vec![],
                relay_to: vec![],
                assert_identity: true,
                numbers: false,
                node: true,
            }],
            ..PolicyConfig::default()
        },
        NodeKey::new([7; 32]),
        Instant::now(),
        Rc::new(NoSubscribers),
    );
    let mut proxy = ShardProxy::new(
        Proxy::new(cfg),
        policy,
        Limits::default(),
        TimerConfig::default(),
        0,
        Instant::now(),
    );
    let inbound_link = if name == "a" {
        FROM_B_AT_A
    } else {
        FROM_A_AT_B
    };
    proxy.set_flow_info(
        inbound_link,
        FlowInfo {
            principal: Principal::Partner(other.into()),
            source: None,
            // The other node connected to our mtls listener.
            iface: Some(Rc::new(node_iface)),
        },
    );
    Node {
        name,
        other,
        proxy,
        registrar: Registrar::default(),
        store: MemoryStore::default(),
    }
}

fn parsed<T>(bytes: &[u8], f: impl FnOnce(&sipring_core::Message<'_, '_>) -> T) -> T {
    let mut h = [Header::EMPTY; 64];
    let Ok(Status::Complete(m)) = parse(bytes, &mut h, &Limits::default(), Framing::Stream) else {
        panic!("unparseable: {}", String::from_utf8_lossy(bytes))
    };
    f(&m)
}

fn first_line(m: &[u8]) -> String {
    String::from_utf8_lossy(&m[..m.iter().position(|&b| b == b'\r').unwrap_or(m.len())])
        .into_owned()
}

fn values(m: &[u8], name: HeaderName) -> Vec<String> {
    parsed(m, |msg| {
        msg.values(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.value).into_owned())
            .collect()
    })
}

impl World {
    fn new() -> World {
        World {
            now: Instant::now(),
            a: node("a", "b"),
            b: node("b", "a"),
            location: HashMap::new(),
            wire: Vec::new(),
            callee_got: Vec::new(),
            caller_got: Vec::new(),
            lookups: Vec::new(),
            links: Vec::new(),
            refused: Vec::new(),
        }
    }

    fn node(&mut self, at: At) -> &mut Node {
        match at {
            At::A => &mut self.a,
            At::B => &mut self.b,
        }
    }

    /// Runs one node's outputs: the registrar and lookups inline (with the store model),
    /// sends onto the wire.
    fn pump(&mut self, at: At) {
        // Bounded: two model nodes bouncing a message would otherwise spin the test.
        for _ in 0..10_000 {
            let now = self.now;
            let n = self.node(at);
            let Some(o) = n.proxy.poll_output() else {
                return;
            };
            match o {
                Output::Send { flow, bytes } => self.route(at, flow, bytes.to_vec()),
                Output::Lookup {
                    token,
                    aor,
                    local_only,
                } => {
                    let (name, other) = (n.name, n.other);
                    let local = n.registrar.lookup(now, &n.store, &aor);
                    let r = if !local.is_empty() {
                        Lookup::Found(
                            local
                                .iter()
                                .map(|b| sipring_core::proxy::Reach::of(b))
                                .collect(),
                        )
                    } else if !local_only && self.location.get(&aor) == Some(&other) {
                        Lookup::Nodes(vec![other.into()])
                    } else {
                        Lookup::Unknown
                    };
                    self.lookups.push((name, aor, local_only));
                    self.node(at).proxy.handle_lookup(now, token, r);
                }
                Output::Register {
                    token,
                    aor,
                    request,
                    flow,
                } => {
                    let Flow::Conn(fid) = flow else { panic!() };
                    let name = n.name;
                    let reply = parsed(&request, |m| {
                        let e = m.validate(&Limits::default()).unwrap();
                        n.registrar
                            .handle_register(now, m, &e, &aor, fid, &mut n.store)
                    });
                    if reply.code == 200 {
                        self.location.insert(aor, name);
                    }
                    self.node(at).proxy.handle_register_reply(now, token, reply);
                }
                Output::Refused(r) => self.refused.push(r.label),
                other => panic!("unexpected output {other:?}"),
            }
        }
        panic!("10,000 outputs from one node without a pause");
    }

    /// Where bytes a node sent on `flow` arrive.
    fn route(&mut self, from: At, flow: Flow, bytes: Vec<u8>) {
        if flow != CALLEE && flow != CALLER {
            self.links.push(first_line(&bytes));
        }
        match (from, &flow) {
            (At::A, f) if *f == CALLEE => self.callee_got.push(bytes),
            (At::B, f) if *f == CALLER => self.caller_got.push(bytes),
            (At::A, Flow::Peer(p)) if p == "b" => self.wire.push((At::B, FROM_A_AT_B, bytes)),
            (At::B, f) if *f == FROM_A_AT_B => {
                self.wire.push((At::A, Flow::Peer("b".into()), bytes))
            }
            (At::B, Flow::Peer(p)) if p == "a" => self.wire.push((At::A, FROM_B_AT_A, bytes)),
            (At::A, f) if *f == FROM_B_AT_A => {
                self.wire.push((At::B, Flow::Peer("a".into()), bytes))
            }
            _ => panic!("{from:?} sent on {flow:?}: {}", first_line(&bytes)),
        }
    }

    /// Delivers bytes to a node as arriving on `flow`, then everything that follows.
    fn deliver(&mut self, at: At, flow: Flow, bytes: &[u8]) {
        let now = self.now;
        self.node(at).proxy.handle_message(now, &flow, bytes);
        self.pump(at);
        while !self.wire.is_empty() {
            let (to, f, b) = self.wire.remove(0);
            let now = self.now;
            self.node(to).proxy.handle_message(now, &f, &b);
            self.pump(to);
        }
    }

    /// Takes the first final response (provisional ones before it are dropped).
    fn take_final(got: &mut Vec<Vec<u8>>) -> Vec<u8> {
        let status = |m: &Vec<u8>| parsed(m, |msg| msg.status());
        let i = got
            .iter()
            .position(|m| status(m).is_some_and(|s| s >= 200))
            .unwrap_or_else(|| {
                panic!(
                    "no final response: {:?}",
                    got.iter().map(|m| first_line(m)).collect::<Vec<_>>()
                )
            });
        let m = got.remove(i);
        got.retain(|m| status(m).is_none_or(|s| s >= 200));
        m
    }
}

fn register(w: &mut World, user: &str) {
    let msg = format!(
        "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKreg{user}\r\nTo: <sip:{user}@example.com>\r\nFrom: <sip:{user}@example.com>;tag=r\r\nCall-ID: reg-{user}\r\nCSeq: 1 REGISTER\r\nContact: <sip:{user}@10.0.0.1;transport=tls>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
    );
    w.deliver(At::A, CALLEE, msg.as_bytes());
    let r = World::take_final(&mut w.callee_got);
    assert!(r.starts_with(b"SIP/2.0 200 OK"), "{}", first_line(&r));
}

fn reply(req: &[u8], code: u16, reason: &str, tag: &str) -> Vec<u8> {
    let rr: Vec<String> = values(req, HeaderName::RecordRoute);
    let rr = rr.join(", ");
    parsed(req, |m| {
        let mut h: Vec<(&str, &[u8])> = vec![("Contact", b"<sip:callee@10.0.0.1;transport=tls>")];
        if !rr.is_empty() {
            h.push(("Record-Route", rr.as_bytes()));
        }
        response_to(
            m,
            code,
            reason,
            ResponseParts {
                to_tag: Some(tag.as_bytes()),
                headers: &h,
                ..Default::default()
            },
        )
    })
}

#[test]
fn a_call_crosses_two_nodes_once_and_its_dialog_needs_no_lookup() {
    let mut w = World::new();
    register(&mut w, "callee");
    assert_eq!(w.location.get("sip:callee@example.com"), Some(&"a"));

    // The caller on B calls the callee, registered on A.
    let inv = b"INVITE sip:callee@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.2;branch=z9hG4bKinv1\r\nMax-Forwards: 70\r\nFrom: <sip:caller@example.com>;tag=c\r\nTo: <sip:callee@example.com>\r\nCall-ID: x1\r\nCSeq: 1 INVITE\r\nContact: <sip:caller@10.0.0.2;transport=tls>\r\nContent-Length: 0\r\n\r\n";
    w.deliver(At::B, CALLER, inv);
    assert_eq!(
        w.lookups,
        vec![
            ("b", "sip:callee@example.com".to_string(), false),
            ("a", "sip:callee@example.com".to_string(), true),
        ],
        "B asks the store, A only its own table"
    );
    let got = w.callee_got.remove(0);
    assert_eq!(
        first_line(&got),
        "INVITE sip:callee@10.0.0.1;transport=tls SIP/2.0",
        "A delivers to the registered contact"
    );
    let vias = values(&got, HeaderName::Via);
    assert_eq!(vias.len(), 3, "{vias:?}");
    assert!(vias[0].contains("a.example.com") && vias[1].contains("b.example.com"));
    let rr = values(&got, HeaderName::RecordRoute);
    assert_eq!(
        rr.len(),
        4,
        "each node names the interface in and the one out: {rr:?}"
    );
    assert!(rr[0].contains("a.example.com") && rr[3].contains("b.example.com"));
    assert!(
        rr[1].contains("fi=pb"),
        "A's link to B is a node flow token: {rr:?}"
    );
    assert!(rr[2].contains("fo=pa"), "B's link to A likewise: {rr:?}");

    // 200 back through A and B to the caller.
    let ok = reply(&got, 200, "OK", "e");
    w.deliver(At::A, CALLEE, &ok);
    let resp = World::take_final(&mut w.caller_got);
    assert!(resp.starts_with(b"SIP/2.0 200 OK"), "{}", first_line(&resp));
    assert_eq!(values(&resp, HeaderName::Via).len(), 1);

    // ACK and BYE along the route sets: no lookup on either node.
    let lookups = w.lookups.len();
    let mut route: Vec<String> = values(&resp, HeaderName::RecordRoute);
    route.reverse();
    let ack = format!(
        "ACK sip:callee@10.0.0.1;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.2;branch=z9hG4bKack1\r\nMax-Forwards: 70\r\nRoute: {}\r\nFrom: <sip:caller@example.com>;tag=c\r\nTo: <sip:callee@example.com>;tag=e\r\nCall-ID: x1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        route.join(", ")
    );
    w.deliver(At::B, CALLER, ack.as_bytes());
    let got_ack = w.callee_got.remove(0);
    assert!(
        got_ack.starts_with(b"ACK sip:callee@10.0.0.1"),
        "{}",
        first_line(&got_ack)
    );
    assert!(
        values(&got_ack, HeaderName::Route).is_empty(),
        "every Route was ours"
    );
    let bye = format!(
        "BYE sip:caller@10.0.0.2;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKbye1\r\nMax-Forwards: 70\r\nRoute: {}\r\nFrom: <sip:callee@example.com>;tag=e\r\nTo: <sip:caller@example.com>;tag=c\r\nCall-ID: x1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        values(&got, HeaderName::RecordRoute).join(", ")
    );
    w.deliver(At::A, CALLEE, bye.as_bytes());
    let got_bye = w.caller_got.remove(0);
    assert!(
        got_bye.starts_with(b"BYE sip:caller@10.0.0.2"),
        "{}",
        first_line(&got_bye)
    );
    let ok = parsed(&got_bye, |m| {
        response_to(m, 200, "OK", ResponseParts::default())
    });
    w.deliver(At::B, CALLER, &ok);
    let r = World::take_final(&mut w.callee_got);
    assert!(r.starts_with(b"SIP/2.0 200 OK"), "{}", first_line(&r));
    assert_eq!(
        w.lookups.len(),
        lookups,
        "in-dialog requests looked nothing up"
    );

    // The caller keeps B's signed entries of this dialog's route and drops A's: B follows
    // its token to A, where the request came to a lookup of any user, any From, challenged
    // on neither node. A refuses it; nothing reaches its users.
    register(&mut w, "victim");
    let b_only: Vec<String> = route
        .iter()
        .filter(|r| r.contains("b.example.com"))
        .cloned()
        .collect();
    assert_eq!(b_only.len(), 2, "{route:?}");
    let forged = format!(
        "MESSAGE sip:victim@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.2;branch=z9hG4bKfrg1\r\nMax-Forwards: 70\r\nRoute: {}\r\nFrom: <sip:ceo@example.com>;tag=z\r\nTo: <sip:victim@example.com>;tag=any\r\nCall-ID: x1\r\nCSeq: 3 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi",
        b_only.join(", ")
    );
    w.callee_got.clear();
    w.deliver(At::B, CALLER, forged.as_bytes());
    assert!(
        w.callee_got.iter().all(|m| !m.starts_with(b"MESSAGE")),
        "the forged MESSAGE reached A's users"
    );
    let r = World::take_final(&mut w.caller_got);
    assert!(r.starts_with(b"SIP/2.0 403 "), "{}", first_line(&r));
    assert_eq!(w.refused, ["node_dialog_without_route"]);
}

#[test]
fn a_node_that_cannot_be_reached_makes_its_users_480_not_503() {
    let mut w = World::new();
    register(&mut w, "callee");
    // B relays the call to A, and the link to A fails before any answer.
    let inv = b"INVITE sip:callee@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.2;branch=z9hG4bKinv2\r\nMax-Forwards: 70\r\nFrom: <sip:caller@example.com>;tag=c\r\nTo: <sip:callee@example.com>\r\nCall-ID: x2\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
    let now = w.now;
    w.b.proxy.handle_message(now, &CALLER, inv);
    w.pump(At::B);
    assert!(
        w.wire
            .iter()
            .any(|(to, _, b)| *to == At::A && b.starts_with(b"INVITE")),
        "relayed to A"
    );
    w.wire.clear();
    w.b.proxy.handle_flow_closed(now, &Flow::Peer("a".into()));
    w.pump(At::B);
    let r = World::take_final(&mut w.caller_got);
    assert!(
        r.starts_with(b"SIP/2.0 480 Temporarily Unavailable"),
        "{}",
        first_line(&r)
    );
}

#[test]
fn a_request_from_a_node_is_looked_up_locally_only_so_it_never_loops() {
    let mut w = World::new();
    // A relayed a request for a user the store (stale, say after a race) says A holds: B,
    // which holds nothing for it, must not send it back to A.
    w.location.insert("sip:ghost@example.com".into(), "a");
    let inv = b"INVITE sip:ghost@example.com SIP/2.0\r\nVia: SIP/2.0/TLS a.example.com:5062;branch=z9hG4bKsr0000000000000001.1\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKg\r\nMax-Forwards: 69\r\nFrom: <sip:callee@example.com>;tag=g\r\nTo: <sip:ghost@example.com>\r\nCall-ID: g1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
    w.deliver(At::B, FROM_A_AT_B, inv);
    assert_eq!(
        w.lookups,
        vec![("b", "sip:ghost@example.com".to_string(), true)]
    );
    // Answered on the link it came by (A has no transaction for it here: dropped there).
    assert_eq!(w.links, vec!["SIP/2.0 100 Trying", "SIP/2.0 404 Not Found"]);
    assert!(w.callee_got.is_empty() && w.caller_got.is_empty());
}
