//! The stateful proxy of one shard, driven in memory with a simulated clock (quinn-proto's
//! `Pair` style): user agents are byte generators, the registrar runs on a `MemoryStore`,
//! and time only moves when the test says so. Covers calls, CANCEL, ACK handling, forking,
//! timers and flow failure, and checks that every table returns to empty.

use sipring_core::policy::Policy;
use sipring_core::proxy::{Flow, Lookup, Proxy, ProxyConfig};
use sipring_core::registrar::BindingStore as _;
use sipring_core::registrar::{MemoryStore, Registrar};
use sipring_core::response::{ResponseParts, response_to};
use sipring_core::stateful::{Output, ShardProxy};
use sipring_core::transaction::TimerConfig;
use sipring_core::{Framing, Header, HeaderName, Limits, Method, Status, parse};
use std::time::{Duration, Instant};

const A: Flow = Flow::Conn(1);
const B: Flow = Flow::Conn(2);
const B2: Flow = Flow::Conn(3);
const C: Flow = Flow::Conn(4);

struct Net {
    now: Instant,
    proxy: ShardProxy,
    registrar: Registrar,
    store: MemoryStore,
    /// Everything the proxy sent, per flow, not yet read by the test.
    inbox: Vec<(Flow, Vec<u8>)>,
    closed: Vec<Flow>,
    /// Refusals for load and per-connection limits (the open policy refuses nothing else).
    refused: Vec<&'static str>,
    /// Lookups go unanswered (a store thread that died, a lost mesh message).
    lost_lookups: bool,
    /// Lookups are answered "unavailable" (the AOR's shard or the store overloaded).
    busy_lookups: bool,
    /// What the proxy told the other shards of dialogs whose party moved.
    detours: Vec<(Flow, Vec<u8>, Flow)>,
    /// Registrations go unanswered (the AOR's shard stalled).
    lost_registers: bool,
}

impl Net {
    fn new() -> Net {
        Net::with_policy(Policy::open(Instant::now()))
    }

    fn with_policy(policy: Policy) -> Net {
        Net::build(policy, |_| {})
    }

    fn build(policy: Policy, edit: impl FnOnce(&mut ProxyConfig)) -> Net {
        let mut cfg = ProxyConfig {
            domains: vec!["example.com".into()],
            local_hosts: vec!["proxy.example.com".into()],
            via_host: "proxy.example.com".into(),
            via_port: 5061,
            ..ProxyConfig::default()
        };
        edit(&mut cfg);
        Net {
            now: Instant::now(),
            proxy: ShardProxy::new(
                Proxy::new(cfg),
                policy,
                Limits::default(),
                TimerConfig::default(),
                0,
                Instant::now(),
            ),
            registrar: Registrar::default(),
            store: MemoryStore::default(),
            inbox: Vec::new(),
            closed: Vec::new(),
            refused: Vec::new(),
            lost_lookups: false,
            busy_lookups: false,
            detours: Vec::new(),
            lost_registers: false,
        }
    }

    /// Runs the proxy's outputs to completion, answering lookups and registrations inline
    /// (as the owner shard would).
    fn pump(&mut self) {
        while let Some(o) = self.proxy.poll_output() {
            match o {
                Output::Send { flow, bytes } => self.inbox.push((flow, bytes.to_vec())),
                Output::Lookup { .. } if self.lost_lookups => {}
                Output::Lookup { token, .. } if self.busy_lookups => {
                    self.proxy
                        .handle_lookup(self.now, token, Lookup::Unavailable)
                }
                Output::Lookup { token, aor, .. } => {
                    let b = self.registrar.reaches(self.now, &self.store, &aor);
                    let r = if b.is_empty() {
                        Lookup::Unknown
                    } else {
                        Lookup::Found(b)
                    };
                    self.proxy.handle_lookup(self.now, token, r);
                }
                Output::Register { .. } if self.lost_registers => {}
                Output::Register {
                    token,
                    aor,
                    request,
                    flow,
                } => {
                    // A cluster node's removal binds nothing to its link (the shard's
                    // NODE_FLOW).
                    let fid = match flow {
                        Flow::Conn(fid) => fid,
                        Flow::Peer(_) => u64::MAX,
                    };
                    let mut h = [Header::EMPTY; 64];
                    let Ok(Status::Complete(m)) =
                        parse(&request, &mut h, &Limits::default(), Framing::Stream)
                    else {
                        panic!()
                    };
                    let e = m.validate(&Limits::default()).unwrap();
                    let reply = self.registrar.handle_register(
                        self.now,
                        &m,
                        &e,
                        &aor,
                        fid,
                        &mut self.store,
                    );
                    self.proxy.handle_register_reply(self.now, token, reply);
                }
                Output::Close { flow, .. } => self.closed.push(flow),
                Output::Detour { gone, call_id, to } => {
                    self.detours.push((gone, call_id.to_vec(), to))
                }
                Output::BindingFailed {
                    aor,
                    flow,
                    contact,
                    path,
                } => {
                    sipring_core::registrar::remove_binding(
                        &mut self.store,
                        &aor,
                        flow,
                        &contact,
                        &path,
                    );
                }
                Output::Relay { .. } => panic!("a single shard never relays"),
                Output::CancelElsewhere { .. } => panic!("a single shard asks no other"),
                Output::Refused(r)
                    if r.label == "transactions_full"
                        || r.label == "transactions_per_connection"
                        || r.label == "transactions_per_identity"
                        || r.label == "register_aors_per_connection"
                        || r.label == "dialog_not_party" =>
                {
                    self.refused.push(r.label)
                }
                Output::Refused(r) => panic!("an open policy refused {r:?}"),
            }
        }
    }

    fn send(&mut self, from: &Flow, msg: &[u8]) {
        self.proxy.handle_message(self.now, from, msg);
        self.pump();
    }

    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(t) = self.proxy.poll_timeout().filter(|t| *t <= end) {
            self.now = t.max(self.now);
            self.proxy.handle_timeout(self.now);
            self.pump();
        }
        self.now = end;
    }

    /// Takes every message sent to `flow`.
    fn take(&mut self, flow: &Flow) -> Vec<Vec<u8>> {
        let (mine, rest) = std::mem::take(&mut self.inbox)
            .into_iter()
            .partition(|(f, _)| f == flow);
        self.inbox = rest;
        mine.into_iter().map(|(_, b)| b).collect()
    }

    /// Takes exactly one message sent to `flow`.
    fn one(&mut self, flow: &Flow) -> Vec<u8> {
        let mut v = self.take(flow);
        assert_eq!(
            v.len(),
            1,
            "to {flow:?}: {:?}",
            v.iter().map(|m| first_line(m)).collect::<Vec<_>>()
        );
        v.pop().unwrap()
    }

    fn register(&mut self, user: &str, flow: &Flow, contact: &str) {
        let msg = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS {contact};branch=z9hG4bKreg{user}{n}\r\nTo: <sip:{user}@example.com>\r\nFrom: <sip:{user}@example.com>;tag=r\r\nCall-ID: reg-{user}-{n}\r\nCSeq: 1 REGISTER\r\nContact: <sip:{user}@{contact};transport=tls>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n",
            n = flow.encode()
        );
        self.send(flow, msg.as_bytes());
        let r = self.one(flow);
        assert!(
            r.starts_with(b"SIP/2.0 200 OK\r\n"),
            "{}",
            String::from_utf8_lossy(&r)
        );
    }

    fn assert_idle_after_timers(&mut self) {
        self.advance(Duration::from_secs(64));
        assert!(self.proxy.is_idle(), "state left: {:?}", self.proxy.load());
        assert_eq!(self.proxy.poll_timeout(), None);
        assert_eq!(self.proxy.transaction_bytes(), 0, "bytes still counted");
    }
}

impl Net {
    /// A proxy that authenticates clients (by client certificate: [`certify`]).
    fn certified() -> Net {
        Net::with_policy(Policy::new(
            sipring_core::policy::PolicyConfig {
                authenticate: true,
                ..Default::default()
            },
            sipring_core::auth::NodeKey::new([0; 32]),
            Instant::now(),
            std::rc::Rc::new(sipring_core::policy::NoSubscribers),
        ))
    }
}

/// `flow` presented a client certificate proving `sip:<user>@example.com`.
fn certify(n: &mut Net, flow: &Flow, user: &str) {
    n.proxy.set_flow_info(
        flow.clone(),
        sipring_core::policy::FlowInfo {
            principal: sipring_core::policy::Principal::Client {
                cert_aors: vec![format!("sip:{user}@example.com")],
            },
            ..Default::default()
        },
    )
}

/// The Record-Route value of a request the proxy forwarded.
fn record_route(fwd: &[u8]) -> Vec<u8> {
    with_msg(fwd, |m, _| {
        m.header(HeaderName::RecordRoute)
            .map(|h| h.value.to_vec())
            .expect("Record-Route")
    })
}

fn first_line(m: &[u8]) -> String {
    String::from_utf8_lossy(&m[..m.iter().position(|&b| b == b'\r').unwrap_or(m.len())])
        .into_owned()
}

fn with_msg<T>(
    bytes: &[u8],
    f: impl FnOnce(&sipring_core::Message<'_, '_>, &sipring_core::Essentials<'_>) -> T,
) -> T {
    // The UAs read more than the proxy accepts (what it forwards has grown by its lines).
    let ua = Limits {
        max_headers: 128,
        max_vias: 80,
        ..Limits::default()
    };
    let mut h = [Header::EMPTY; 128];
    let Ok(Status::Complete(m)) = parse(bytes, &mut h, &ua, Framing::Stream) else {
        panic!("unparseable: {}", String::from_utf8_lossy(bytes))
    };
    let e = m.validate(&ua).unwrap();
    f(&m, &e)
}

/// A UA's answer to a request it received.
fn answer(req: &[u8], code: u16, reason: &str, tag: &str) -> Vec<u8> {
    with_msg(req, |m, _| {
        response_to(
            m,
            code,
            reason,
            ResponseParts {
                to_tag: Some(tag.as_bytes()),
                headers: &[("Contact", b"<sip:callee@10.0.0.2;transport=tls>")],
                ..Default::default()
            },
        )
    })
}

/// A MESSAGE to bob, with no body.
fn message(branch: &str, call: &str) -> Vec<u8> {
    format!("MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch={branch}\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: {call}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n").into_bytes()
}

fn invite(branch: &str, call: &str) -> Vec<u8> {
    format!("INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch={branch}\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: {call}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@10.0.0.1:5061;transport=tls>\r\nContent-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=0\n").into_bytes()
}

fn status(m: &[u8]) -> u16 {
    // Parsed without validation: salvaged error responses may lack headers the request lacked.
    let mut h = [Header::EMPTY; 64];
    match parse(m, &mut h, &Limits::default(), Framing::Stream) {
        Ok(Status::Complete(m)) => m.status().expect("a response"),
        other => panic!("{other:?}"),
    }
}

fn method(m: &[u8]) -> String {
    with_msg(m, |m, _| {
        String::from_utf8_lossy(m.method().expect("a request").as_bytes()).into_owned()
    })
}

/// The caller's 2xx ACK, routed by the Record-Route it learned (`route`).
fn ack_2xx(ruri: &str, route: &[u8], to_tag: &str, via: &str, call: &str) -> Vec<u8> {
    format!(
        "ACK {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS {via}\r\nMax-Forwards: 70\r\nRoute: {}\r\nTo: <sip:bob@example.com>;tag={to_tag}\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: {call}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(route)
    )
    .into_bytes()
}

#[test]
fn call_setup_in_dialog_requests_and_teardown() {
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKa1", "call-1"));
    let trying = n.one(&A);
    assert_eq!(status(&trying), 100);
    let fwd = n.one(&B);
    let (rr, branch) = with_msg(&fwd, |m, e| {
        assert_eq!(
            m.request_uri(),
            Some(&b"sip:bob@10.0.0.2:5061;transport=tls"[..])
        );
        assert_eq!(e.max_forwards, Some(69));
        assert_eq!(e.via_count, 2);
        assert_eq!(e.top_via.host, b"proxy.example.com");
        assert_eq!(m.body(), b"v=0\n");
        (
            m.header(HeaderName::RecordRoute).unwrap().value.to_vec(),
            e.top_via.branch().unwrap().to_vec(),
        )
    });
    assert!(branch.starts_with(b"z9hG4bKsr"));
    // 180 and 200 flow back with our Via removed.
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    let ringing = n.one(&A);
    assert_eq!(status(&ringing), 180);
    with_msg(&ringing, |_, e| {
        assert_eq!(
            (e.via_count, e.top_via.branch()),
            (1, Some(&b"z9hG4bKa1"[..]))
        )
    });
    n.send(&B, &answer(&fwd, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&A)), 200);
    // The 2xx ACK is end-to-end: a new transaction, routed by our Record-Route.
    n.send(
        &A,
        &ack_2xx(
            "sip:callee@10.0.0.2;transport=tls",
            &rr,
            "b1",
            "10.0.0.1:5061;branch=z9hG4bKa2",
            "call-1",
        ),
    );
    let ack = n.one(&B);
    assert_eq!(method(&ack), "ACK");
    with_msg(&ack, |m, _| {
        assert!(m.header(HeaderName::Route).is_none(), "our Route is popped")
    });
    // BYE from the callee goes back to the caller over its flow, and the 200 returns.
    let bye = format!(
        "BYE sip:alice@10.0.0.1:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bKb9\r\nMax-Forwards: 70\r\nRoute: {}\r\nTo: <sip:alice@example.com>;tag=a1\r\nFrom: <sip:bob@example.com>;tag=b1\r\nCall-ID: call-1\r\nCSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(&rr)
    );
    n.send(&B, bye.as_bytes());
    let bye_fwd = n.one(&A);
    assert_eq!(method(&bye_fwd), "BYE");
    n.send(&A, &answer(&bye_fwd, 200, "OK", "a1"));
    assert_eq!(status(&n.one(&B)), 200);
    assert!(n.inbox.is_empty());
    n.assert_idle_after_timers();
}

/// Bob registered on B; alice's INVITE (`branch`, `call`) answered 200 by bob (To-tag `b1`):
/// the Record-Route bob received.
fn answered(n: &mut Net, branch: &str, call: &str) -> Vec<u8> {
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite(branch, call));
    n.take(&A);
    let fwd = n.one(&B);
    let rr = record_route(&fwd);
    n.send(&B, &answer(&fwd, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&A)), 200);
    rr
}

/// [`answered`], then bob's connection B closes and he registers again over B2 (contact
/// `10.0.0.3:5061`): the Record-Route of the call.
fn bob_reconnected(n: &mut Net, branch: &str, call: &str) -> Vec<u8> {
    let rr = answered(n, branch, call);
    n.proxy.handle_flow_closed(n.now, &B);
    n.register("bob", &B2, "10.0.0.3:5061");
    rr
}

/// The callee's BYE of `call` to alice along `rr`, From `from`'s AOR.
fn bye_to_alice(rr: &[u8], call: &str, from: &str, branch: &str) -> String {
    format!(
        "BYE sip:alice@10.0.0.1:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.9:5061;branch={branch}\r\nMax-Forwards: 70\r\nRoute: {}\r\nTo: <sip:alice@example.com>;tag=a1\r\nFrom: <sip:{from}@example.com>;tag=b1\r\nCall-ID: {call}\r\nCSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(rr)
    )
}

#[test]
fn a_callee_that_reconnected_hangs_up_from_its_new_connection_and_nobody_else_can() {
    // Bob's connection broke mid-call; he connected again and registered. His BYE on the
    // new connection follows the dialog's route to alice (before: 404, and alice's call
    // hung until her session timer). Carol, registered on her own connection, holding the
    // route, reaches nobody, whatever From she writes.
    let mut n = Net::new();
    let rr = bob_reconnected(&mut n, "z9hG4bKrc1", "rc-1");
    assert!(
        String::from_utf8_lossy(&rr).contains(";uo="),
        "the callee is named"
    );
    n.register("carol", &C, "10.0.0.4:5061");
    let bye = |from: &str, branch: &str| bye_to_alice(&rr, "rc-1", from, branch);
    for (flow, from, branch) in [(&C, "bob", "z9hG4bKrc2"), (&C, "carol", "z9hG4bKrc3")] {
        n.send(flow, bye(from, branch).as_bytes());
        assert_eq!(status(&n.one(flow)), 403, "{from} on carol's connection");
        assert!(n.take(&A).is_empty(), "alice got {from}'s BYE");
    }
    // A connection that registered nothing is nobody (an open server authenticates no
    // one: its REGISTER is the proof).
    n.send(&Flow::Conn(9), bye("bob", "z9hG4bKrc4").as_bytes());
    assert_eq!(status(&n.one(&Flow::Conn(9))), 403);
    assert_eq!(n.refused, ["dialog_not_party"; 3]);
    n.send(&B2, bye("bob", "z9hG4bKrc5").as_bytes());
    let at_alice = n.one(&A);
    assert_eq!(method(&at_alice), "BYE");
    n.send(&A, &answer(&at_alice, 200, "OK", "a1"));
    assert_eq!(status(&n.one(&B2)), 200);
    n.assert_idle_after_timers();
}

#[test]
fn under_overload_a_route_holder_not_shown_to_be_the_party_is_new_work() {
    // The door lets requests inside our dialogs pass. One on a dialog route from a
    // connection not yet shown to be the dialog's party is still to be challenged: new
    // work, shed under overload (a user holding a route sent past the door as fast as it
    // liked, each costing a challenge, and new requests were shed in its place). The party
    // whose new connection holds its binding passes.
    let mut n = Net::new();
    let rr = bob_reconnected(&mut n, "z9hG4bKro1", "ro-1");
    n.proxy.set_overloaded(true);
    let bye = |branch: &str| bye_to_alice(&rr, "ro-1", "bob", branch);
    n.send(&C, bye("z9hG4bKro2").as_bytes());
    assert_eq!(status(&n.one(&C)), 503);
    assert!(n.refused.is_empty(), "shed at the door, before any check");
    n.send(&B2, bye("z9hG4bKro3").as_bytes());
    assert_eq!(method(&n.one(&A)), "BYE");
}

#[test]
fn a_request_for_a_party_that_reconnected_reaches_the_binding_it_made_since() {
    // The other way: alice's requests to bob follow the route to B, which closed. Bob
    // registered again over B2: the binding with the request's target (bob's contact, as
    // alice knows it) takes it. Another contact of bob's, or a To that is not bob, does
    // not: 480 as before.
    let mut n = Net::new();
    let rr = bob_reconnected(&mut n, "z9hG4bKrb1", "rb-1");
    let bye = |target: &str, to: &str, branch: &str| {
        format!(
            "BYE sip:bob@{target};transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch={branch}\r\nMax-Forwards: 70\r\nRoute: {}\r\nTo: <sip:{to}@example.com>;tag=b1\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: rb-1\r\nCSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n",
            String::from_utf8_lossy(&rr)
        )
    };
    // What the shard does when a send finds its connection gone.
    let on_closed_b = |n: &mut Net| {
        assert_eq!(method(&n.one(&B)), "BYE");
        n.proxy.handle_flow_closed(n.now, &B);
        n.pump();
    };
    for (target, to, branch) in [
        ("10.0.0.2:5061", "bob", "z9hG4bKrb2"),
        ("10.0.0.3:5061", "carol", "z9hG4bKrb3"),
    ] {
        n.send(&A, bye(target, to, branch).as_bytes());
        on_closed_b(&mut n);
        assert_eq!(status(&n.one(&A)), 480, "{target} {to}");
        assert!(n.take(&B2).is_empty());
    }
    n.send(&A, bye("10.0.0.3:5061", "bob", "z9hG4bKrb4").as_bytes());
    on_closed_b(&mut n);
    let at_bob = n.one(&B2);
    assert_eq!(
        first_line(&at_bob),
        "BYE sip:bob@10.0.0.3:5061;transport=tls SIP/2.0"
    );
    n.send(&B2, &answer(&at_bob, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&A)), 200);
    assert_eq!(n.proxy.stats().dialog_rebinds, 1);
    n.assert_idle_after_timers();
}

#[test]
fn one_account_over_many_connections_cannot_take_the_shards_table() {
    // Each client connection has its share of the table; one account opening more
    // connections had a share per connection, and took the whole table (every new request
    // on the shard 503, partners' calls included). An authenticated identity has its own
    // share: 4 connections' worth, and a sixteenth of the bytes.
    let mut n = Net::certified();
    n.proxy.set_max_transactions_per_flow(2);
    certify(&mut n, &B, "bob");
    n.register("bob", &B, "10.0.0.2:5061");
    let call = |from: &str, i: usize| {
        format!(
            "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKid{from}{i}\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:{from}@example.com>;tag=a{i}\r\nCall-ID: id-{from}-{i}\r\nCSeq: 1 INVITE\r\nContact: <sip:{from}@10.0.0.1:5061;transport=tls>\r\nContent-Length: 0\r\n\r\n"
        )
    };
    // Mallory over six connections, two ringing calls on each while she may.
    let mut rang = 0;
    for c in 0..6u64 {
        let flow = Flow::Conn(100 + c);
        certify(&mut n, &flow, "mallory");
        for i in 0..2 {
            n.send(&flow, call("mallory", (c * 2 + i) as usize).as_bytes());
            let up = n.take(&flow);
            if let Some(fwd) = n.take(&B).pop() {
                n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
                n.take(&flow);
                rang += 1;
            } else {
                assert_eq!(status(&up[0]), 503, "{}", String::from_utf8_lossy(&up[0]));
            }
        }
    }
    assert_eq!(rang, 8, "four connections' worth");
    assert_eq!(n.refused.last(), Some(&"transactions_per_identity"));
    // Alice still gets through.
    let alice = Flow::Conn(200);
    certify(&mut n, &alice, "alice");
    n.send(&alice, call("alice", 0).as_bytes());
    assert_eq!(status(&n.one(&alice)), 100);
    assert_eq!(method(&n.one(&B)), "INVITE");
}

#[test]
fn a_call_forked_to_many_bindings_counts_every_copy_against_its_callers_share() {
    // The identity's byte share counted the request it sent, not the copies a fork holds:
    // a call to an AOR with ten bindings held eleven copies and was charged one.
    let mut n = Net::certified();
    // A sixteenth of it: 32 KiB.
    n.proxy.set_max_transaction_bytes(512 << 10);
    let phones: Vec<Flow> = (0..10).map(|i| Flow::Conn(300 + i)).collect();
    for (i, f) in phones.iter().enumerate() {
        certify(&mut n, f, "mallory");
        n.register("mallory", f, &format!("10.0.1.{i}:5061"));
    }
    let caller = Flow::Conn(400);
    certify(&mut n, &caller, "mallory");
    let pad = "x".repeat(1500);
    let mut admitted = 0;
    for i in 0..20 {
        let inv = format!(
            "INVITE sip:mallory@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKfk{i}\r\nMax-Forwards: 70\r\nTo: <sip:mallory@example.com>\r\nFrom: <sip:mallory@example.com>;tag=a{i}\r\nCall-ID: fork-{i}\r\nCSeq: 1 INVITE\r\nX-Pad: {pad}\r\nContent-Length: 0\r\n\r\n"
        );
        n.send(&caller, inv.as_bytes());
        let up = n.take(&caller);
        if status(&up[0]) == 100 {
            admitted += 1;
        }
        for f in &phones {
            n.take(f);
        }
    }
    // Eleven copies of ~1.7 KiB each: one call, then the share (charged one copy: ~18).
    assert!(admitted <= 2, "{admitted} calls admitted");
    assert_eq!(n.refused.last(), Some(&"transactions_per_identity"));
}

#[test]
fn when_both_parties_reconnected_the_way_to_each_is_followed_through() {
    // Alice and bob prove who they are by client certificate (so both are named in the
    // route). Both connections break; bob registers again over B2, alice comes back over
    // A2. Her first request goes to B, closed, and is rebound to B2; the next one follows
    // both ways found (hers from A2, then bob's from B to B2) with no second lookup and
    // nothing sent to B.
    let mut n = Net::certified();
    let a2 = Flow::Conn(6);
    for (flow, user) in [(&A, "alice"), (&B, "bob"), (&B2, "bob"), (&a2, "alice")] {
        certify(&mut n, flow, user);
    }
    let rr = answered(&mut n, "z9hG4bKbr1", "br-1");
    let text = String::from_utf8_lossy(&rr).into_owned();
    assert!(text.contains(";ui=") && text.contains(";uo="), "{text}");
    n.proxy.handle_flow_closed(n.now, &B);
    n.proxy.handle_flow_closed(n.now, &A);
    n.register("bob", &B2, "10.0.0.3:5061");
    let info = |cseq: u32, branch: &str| {
        format!(
            "INFO sip:bob@10.0.0.3:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.8:5061;branch={branch}\r\nMax-Forwards: 70\r\nRoute: {text}\r\nTo: <sip:bob@example.com>;tag=b1\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: br-1\r\nCSeq: {cseq} INFO\r\nContent-Length: 0\r\n\r\n"
        )
    };
    n.send(&a2, info(2, "z9hG4bKbr2").as_bytes());
    assert_eq!(method(&n.one(&B)), "INFO");
    n.proxy.handle_flow_closed(n.now, &B);
    n.pump();
    let at_bob = n.one(&B2);
    n.send(&B2, &answer(&at_bob, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&a2)), 200);
    n.send(&a2, info(3, "z9hG4bKbr3").as_bytes());
    assert!(
        n.take(&B).is_empty(),
        "sent to bob's closed connection again"
    );
    let at_bob = n.one(&B2);
    n.send(&B2, &answer(&at_bob, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&a2)), 200);
    assert_eq!(n.proxy.stats().dialog_rebinds, 1);
}

#[test]
fn a_reinvite_to_a_party_that_reconnected_is_acked_and_can_be_cancelled() {
    // The re-INVITE that finds bob's new binding is answered there; its ACK, which no
    // lookup waits for, follows it (before, it went to the closed connection and bob,
    // without it, ended the call). A CANCEL while the lookup is out is answered: 487.
    let mut n = Net::new();
    let rr = bob_reconnected(&mut n, "z9hG4bKri1", "ri-1");
    let in_dialog = |method: &str, cseq: u32, branch: &str| {
        format!(
            "{method} sip:bob@10.0.0.3:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch={branch}\r\nMax-Forwards: 70\r\nRoute: {}\r\nTo: <sip:bob@example.com>;tag=b1\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: ri-1\r\nCSeq: {cseq} {method}\r\nContact: <sip:alice@10.0.0.1:5061;transport=tls>\r\nContent-Length: 0\r\n\r\n",
            String::from_utf8_lossy(&rr)
        )
    };
    let to_closed_b = |n: &mut Net, msg: &str| {
        n.send(&A, msg.as_bytes());
        assert_eq!(status(&n.one(&A)), 100);
        assert_eq!(method(&n.one(&B)), "INVITE");
        n.proxy.handle_flow_closed(n.now, &B);
        n.pump();
    };
    to_closed_b(&mut n, &in_dialog("INVITE", 2, "z9hG4bKri2"));
    let at_bob = n.one(&B2);
    assert_eq!(method(&at_bob), "INVITE");
    n.send(&B2, &answer(&at_bob, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&A)), 200);
    n.send(&A, in_dialog("ACK", 2, "z9hG4bKri3").as_bytes());
    assert_eq!(method(&n.one(&B2)), "ACK");
    assert!(
        n.take(&B).is_empty(),
        "the ACK went to the closed connection"
    );
    // Every other shard is told (a partner's ACK may come on another of its connections):
    // one that learns it sends the ACK there too.
    assert_eq!(n.detours, [(B, b"ri-1".to_vec(), B2)]);
    let mut other = Net::new();
    let (gone, call_id, to) = n.detours[0].clone();
    other.proxy.learn_detour(other.now, gone, &call_id, to);
    other.send(&A, in_dialog("ACK", 2, "z9hG4bKri3b").as_bytes());
    assert_eq!(method(&other.one(&B2)), "ACK");
    // Meanwhile the next one goes straight to B2, with no lookup.
    let info = |n: &mut Net, cseq: u32, branch: &str, at: &Flow| {
        n.send(&A, in_dialog("INFO", cseq, branch).as_bytes());
        let at_bob = n.one(at);
        n.send(at, &answer(&at_bob, 200, "OK", "b1"));
        assert_eq!(status(&n.one(&A)), 200);
    };
    info(&mut n, 3, "z9hG4bKri5", &B2);
    assert_eq!(n.proxy.stats().dialog_rebinds, 1);
    // Bob moves again: the way to B2 is forgotten when B2 closes, and his next binding is
    // looked up (before, the way to B2 stood and the request died there).
    let b3 = Flow::Conn(5);
    n.proxy.handle_flow_closed(n.now, &B2);
    n.register("bob", &b3, "10.0.0.3:5061");
    n.send(&A, in_dialog("INFO", 4, "z9hG4bKri6").as_bytes());
    assert_eq!(method(&n.one(&B)), "INFO");
    n.proxy.handle_flow_closed(n.now, &B);
    n.pump();
    let at_bob = n.one(&b3);
    n.send(&b3, &answer(&at_bob, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&A)), 200);
    assert_eq!(n.proxy.stats().dialog_rebinds, 2);
    // The ways are forgotten after Timer C + 64·T1.
    n.advance(Duration::from_secs(240));
    n.proxy.handle_timeout(n.now);
    assert_eq!(n.proxy.detours(), 0);
    // Then a CANCEL while the rebinding lookup is out.
    n.lost_lookups = true;
    let reinvite = in_dialog("INVITE", 5, "z9hG4bKri4");
    to_closed_b(&mut n, &reinvite);
    let cancel = reinvite
        .replacen("INVITE sip:", "CANCEL sip:", 1)
        .replace("CSeq: 5 INVITE", "CSeq: 5 CANCEL");
    n.send(&A, cancel.as_bytes());
    let mut got: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    got.sort_unstable();
    assert_eq!(got, [200, 487]);
    n.lost_lookups = false;
    n.assert_idle_after_timers();
}

#[test]
fn a_430_from_the_flow_a_request_took_sends_it_over_the_devices_other_flow() {
    // RFC 5626 §5.3: an edge proxy on the flow says it failed (430): the device's other
    // flow gets the request, and the caller never sees the 430.
    let mut n = Net::new();
    one_device_two_flows(&mut n);
    n.send(&A, &invite("z9hG4bKf4", "f4-1"));
    n.take(&A);
    let mut on_b = n.take(&B);
    let (first, other, fwd) = match on_b.pop() {
        Some(f) => (B, B2, f),
        None => (B2, B, n.one(&B2)),
    };
    n.send(&first, &answer(&fwd, 430, "Flow Failed", "e1"));
    assert_eq!(
        method(&n.one(&first)),
        "ACK",
        "the 430 is acknowledged hop by hop"
    );
    the_other_flow_answers(&mut n, &other, 430);
    n.take(&first);
    n.assert_idle_after_timers();
    // The binding the 430 named is gone (RFC 5626 §7): the next call goes to the other
    // flow at once. Before, the failed one stayed first until it expired or was registered
    // again, each request paying a round trip to the dead flow.
    let failed = match first {
        Flow::Conn(id) => id,
        _ => unreachable!(),
    };
    assert!(
        n.store
            .get("sip:bob@example.com")
            .iter()
            .all(|b| b.flow != failed),
        "the failed binding stays"
    );
    n.send(&A, &invite("z9hG4bKf5", "f4-2"));
    n.take(&A);
    assert!(n.take(&first).is_empty(), "sent to the failed flow again");
    assert_eq!(method(&n.one(&other)), "INVITE");
}

#[test]
fn an_edges_430_does_not_remove_the_binding_registered_again_since() {
    // Behind an edge proxy the connection (and here the contact) is the same for every
    // registration of a device: the edge's flow is named by the Path. The device's flow
    // failed and it registered again (a new Path) while an INVITE was on its way over the
    // old one; the edge's 430 for that INVITE removed the fresh binding too, and the
    // device got 480 until its next refresh.
    let mut n = Net::new();
    let register = |n: &mut Net, cseq: u32, token: &str| {
        let msg = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS edge.example.net;branch=z9hG4bKe{cseq}\r\nVia: SIP/2.0/TLS 10.0.0.9:5061;branch=z9hG4bKp{cseq}\r\nPath: <sip:{token}@edge.example.net;lr;ob>\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:bob@example.com>;tag=r\r\nCall-ID: pe-1\r\nCSeq: {cseq} REGISTER\r\nSupported: outbound, path\r\nContact: <sip:bob@10.0.0.9:5061;transport=tls;ob>;+sip.instance=\"<urn:uuid:00000000-0000-4000-8000-0000000000e1>\";reg-id=1\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
        );
        n.send(&B, msg.as_bytes());
        assert_eq!(status(&n.one(&B)), 200);
    };
    register(&mut n, 1, "old");
    n.send(&A, &invite("z9hG4bKpe1", "pe-call"));
    n.take(&A);
    let fwd = n.one(&B);
    assert!(String::from_utf8_lossy(&fwd).contains("Route: <sip:old@edge"));
    register(&mut n, 2, "new");
    n.send(&B, &answer(&fwd, 430, "Flow Failed", "e1"));
    n.take(&B);
    n.take(&A);
    let kept = n.store.get("sip:bob@example.com");
    assert_eq!(kept.len(), 1, "the binding registered again was removed");
    assert!(kept[0].path[0].contains("sip:new@"), "{:?}", kept[0].path);
    // While the old Path's own binding is removed when it is the one that failed.
    n.send(&A, &invite("z9hG4bKpe2", "pe-call-2"));
    n.take(&A);
    let fwd = n.one(&B);
    assert!(String::from_utf8_lossy(&fwd).contains("Route: <sip:new@edge"));
    n.send(&B, &answer(&fwd, 430, "Flow Failed", "e2"));
    n.take(&B);
    assert!(n.store.get("sip:bob@example.com").is_empty());
}

#[test]
fn callers_refused_for_an_overloaded_lookup_do_not_come_back_together() {
    // The AOR's shard (or the store) could not take the lookup: 503, with Retry-After spread
    // over 2–9 s as at the door (it was 1 s for everyone).
    let mut n = Net::new();
    n.busy_lookups = true;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..8 {
        n.send(&A, &message(&format!("z9hG4bKbl{i}"), &format!("bl-{i}")));
        let r = n.one(&A);
        assert_eq!(status(&r), 503);
        let v = sipring_tests::ua::header(&r, "Retry-After").expect("Retry-After");
        let s: u32 = v.trim().parse().unwrap();
        assert!((2..=9).contains(&s), "{s}");
        seen.insert(s);
    }
    assert!(seen.len() >= 4, "{seen:?}");
}

#[test]
fn a_lookup_that_is_never_answered_ends_its_request_after_64_t1() {
    // The store thread died, or a mesh message was lost: the INVITE waiting for its lookup
    // held its transaction (and the caller's 100 Trying) until the caller's connection
    // closed. Answered 503 after 64·T1 now, and nothing is left.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.lost_lookups = true;
    n.send(&A, &invite("z9hG4bKll1", "ll-1"));
    assert_eq!(status(&n.one(&A)), 100);
    n.advance(Duration::from_millis(31_900));
    assert!(n.take(&A).is_empty(), "answered before 64·T1");
    n.advance(Duration::from_millis(200));
    let up = n.one(&A);
    assert_eq!(status(&up), 503, "{}", first_line(&up));
    assert_eq!(n.proxy.stats().unanswered_lookups, 1);
    // (No ACK: Timer H ends the transaction.)
    n.assert_idle_after_timers();
}

/// The INVITE went over to `other` (one failover): answered there, the caller gets the 200
/// and never `not` (what the failed flow would have told it).
fn the_other_flow_answers(n: &mut Net, other: &Flow, not: u16) {
    let again = n.one(other);
    assert_eq!(method(&again), "INVITE");
    assert_eq!(n.proxy.stats().flow_failovers, 1);
    n.send(other, &answer(&again, 200, "OK", "b1"));
    let up = n.take(&A);
    assert!(
        up.iter().any(|m| status(m) == 200) && !up.iter().any(|m| status(m) == not),
        "{:?}",
        up.iter().map(|m| first_line(m)).collect::<Vec<_>>()
    );
}

/// One device (one +sip.instance) registered over two flows: reg-id 1 over B, 2 over B2.
fn one_device_two_flows(n: &mut Net) {
    for (flow, reg_id) in [(&B, 1), (&B2, 2)] {
        let msg = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bKob{reg_id}\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:bob@example.com>;tag=r\r\nCall-ID: ob-{reg_id}\r\nCSeq: 1 REGISTER\r\nSupported: outbound\r\nContact: <sip:bob@10.0.0.2:5061;transport=tls;ob>;+sip.instance=\"<urn:uuid:00000000-0000-4000-8000-00000000000b>\";reg-id={reg_id}\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
        );
        n.send(flow, msg.as_bytes());
        assert_eq!(status(&n.one(flow)), 200);
    }
}

#[test]
fn a_request_on_a_flow_that_fails_goes_to_the_devices_other_flow() {
    // RFC 5626 §5.3: a request goes to one of the device's flows; that connection fails
    // before the answer: the request goes to the other flow instead of being answered 480.
    let mut n = Net::new();
    one_device_two_flows(&mut n);
    n.send(&A, &invite("z9hG4bKfo1", "fo-1"));
    n.take(&A);
    // One ring per device: the INVITE went over one flow only.
    let (first, other) = if n.take(&B).is_empty() {
        (B2, B)
    } else {
        (B, B2)
    };
    assert!(n.take(&other).is_empty(), "one device rings once");
    n.proxy.handle_flow_closed(n.now, &first);
    n.pump();
    the_other_flow_answers(&mut n, &other, 480);
}

#[test]
fn a_sips_request_never_leaves_over_plain_tcp() {
    // RFC 3261 §26.2.2, RFC 5630: sips means TLS on every hop to the target. Bob's device
    // on the plain TCP listener got `INVITE sips:` in clear (SDES keys and all) while the
    // caller's phone showed a secure call. Now only his TLS flows ring; with none, 480.
    let tcp = Flow::Conn(sipring_core::proxy::PLAIN_FLOW_BIT | 9);
    let sips_invite = |branch: &str, call: &str| {
        String::from_utf8(invite(branch, call))
            .unwrap()
            .replacen("INVITE sip:", "INVITE sips:", 1)
            .into_bytes()
    };
    let mut n = Net::new();
    n.register("bob", &tcp, "10.0.0.9:40000");
    n.send(&A, &sips_invite("z9hG4bKs1", "s-1"));
    let up: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert!(up.contains(&480), "{up:?}");
    assert!(n.take(&tcp).is_empty(), "sent over plain TCP");
    // A sip: request still reaches him there.
    n.send(&A, &invite("z9hG4bKs2", "s-2"));
    assert_eq!(method(&n.one(&tcp)), "INVITE");
    // With a TLS flow too, the sips request goes there only.
    let mut n = Net::new();
    n.register("bob", &tcp, "10.0.0.9:40000");
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &sips_invite("z9hG4bKs3", "s-3"));
    assert_eq!(method(&n.one(&B)), "INVITE");
    assert!(n.take(&tcp).is_empty(), "sent over plain TCP");
}

#[test]
fn a_sips_ack_another_node_relays_is_looked_up_to_a_tls_flow_only() {
    // A 2xx ACK relayed by another node of the cluster is looked up here (one hop) and sent
    // statelessly. A sips one (a late offer: its SDP may carry the keys) takes a TLS flow
    // of the user's only, as its INVITE did; with none it goes nowhere. A sip: one takes
    // any.
    let tcp = Flow::Conn(sipring_core::proxy::PLAIN_FLOW_BIT | 9);
    let node = Flow::Peer("node-c".into());
    let ack = |scheme: &str, branch: &str| {
        format!(
            "ACK {scheme}:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS node-c.example.com;branch={branch}\r\nMax-Forwards: 69\r\nTo: <sip:bob@example.com>;tag=b1\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: sa-1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let mut n = with_node_c();
    n.register("bob", &tcp, "10.0.0.9:40000");
    n.send(&node, ack("sips", "z9hG4bKsa1").as_bytes());
    assert!(n.take(&tcp).is_empty(), "a sips ACK went over plain TCP");
    n.send(&node, ack("sip", "z9hG4bKsa2").as_bytes());
    assert_eq!(method(&n.one(&tcp)), "ACK");
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&node, ack("sips", "z9hG4bKsa3").as_bytes());
    assert_eq!(method(&n.one(&B)), "ACK");
    assert!(n.take(&tcp).is_empty(), "a sips ACK went over plain TCP");
    assert!(n.inbox.is_empty());
}

#[test]
fn a_2xx_ack_another_node_relays_to_a_contact_behind_an_edge_proxy_keeps_its_path() {
    // Every request to a contact registered through an edge proxy carries the binding's
    // Path as Route (RFC 3327 §5.4); a 2xx ACK another node relayed here, looked up, went
    // without it, and the edge proxy could not tell which flow it was for.
    let node = Flow::Peer("node-c".into());
    let mut n = with_node_c();
    let reg = "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS edge.example.net;branch=z9hG4bKpa1\r\nVia: SIP/2.0/TLS 10.0.0.9:5061;branch=z9hG4bKpa2\r\nPath: <sip:f1@edge.example.net;lr;ob>\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:bob@example.com>;tag=r\r\nCall-ID: pa-1\r\nCSeq: 1 REGISTER\r\nSupported: outbound, path\r\nContact: <sip:bob@10.0.0.9:5061;transport=tls;ob>;+sip.instance=\"<urn:uuid:00000000-0000-4000-8000-0000000000e2>\";reg-id=1\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n";
    n.send(&B, reg.as_bytes());
    assert_eq!(status(&n.one(&B)), 200);
    let ack = "ACK sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS node-c.example.com;branch=z9hG4bKpa3\r\nMax-Forwards: 69\r\nTo: <sip:bob@example.com>;tag=b1\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: pa-2\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n";
    n.send(&node, ack.as_bytes());
    let at_edge = n.one(&B);
    assert_eq!(method(&at_edge), "ACK");
    assert_eq!(
        sipring_tests::ua::header(&at_edge, "Route").as_deref(),
        Some("<sip:f1@edge.example.net;lr;ob>"),
        "{}",
        String::from_utf8_lossy(&at_edge)
    );
}

#[test]
fn a_flow_that_fails_is_not_the_one_failover_picks() {
    // One device's two reg-ids over one connection (a device behind an edge proxy has all
    // its flows on the edge's connection): that connection closes with the INVITE on it.
    // The failover took the other reg-id, on the same dead connection, and the caller got
    // 408 after Timer B (a MESSAGE, nothing at all) instead of 480 at once.
    let mut n = Net::new();
    for reg_id in [1, 2] {
        let msg = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bKsb{reg_id}\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:bob@example.com>;tag=r\r\nCall-ID: sb-{reg_id}\r\nCSeq: 1 REGISTER\r\nSupported: outbound\r\nContact: <sip:bob@10.0.0.2:5061;transport=tls;ob>;+sip.instance=\"<urn:uuid:00000000-0000-4000-8000-00000000000c>\";reg-id={reg_id}\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
        );
        n.send(&B, msg.as_bytes());
        assert_eq!(status(&n.one(&B)), 200);
    }
    n.send(&A, &invite("z9hG4bKsb3", "sb-3"));
    n.take(&A);
    assert_eq!(method(&n.one(&B)), "INVITE");
    n.proxy.handle_flow_closed(n.now, &B);
    n.pump();
    let up: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert_eq!(up, [480], "not answered at once");
    assert_eq!(n.proxy.stats().flow_failovers, 0);
    n.assert_idle_after_timers();
}

/// Bob's device X over B and B2 (one instance, two flows) and device Y over C; alice's
/// INVITE forks to both, Y declines with 603 (the caller gets nothing yet: X's branch is
/// still out). Returns the flow X's INVITE took, X's other flow and the INVITE X got.
fn declined_while_one_device_has_two_flows(n: &mut Net, call: &str) -> (Flow, Flow, Vec<u8>) {
    one_device_two_flows(n);
    n.register("bob", &C, "10.0.0.3:5061");
    n.send(&A, &invite(&format!("z9hG4bK{call}"), call));
    n.take(&A);
    let mut on_b = n.take(&B);
    let (first, other, x) = match on_b.pop() {
        Some(f) => (B, B2, f),
        None => (B2, B, n.one(&B2)),
    };
    let y = n.one(&C);
    n.send(&C, &answer(&y, 603, "Decline", "y1"));
    assert_eq!(method(&n.one(&C)), "ACK");
    assert!(n.take(&A).is_empty(), "X's branch is still out");
    (first, other, x)
}

#[test]
fn after_a_6xx_no_branch_is_started_by_flow_failover() {
    // RFC 3261 §16.7 step 5: after a 6xx the proxy MUST NOT create new branches. X's flow
    // fails (its connection closes, or an edge proxy answers 430): before, the INVITE
    // went over X's other flow with a fresh Timer C and could connect a declined call.
    for by_430 in [false, true] {
        let mut n = Net::new();
        let call = if by_430 { "d6b" } else { "d6a" };
        let (first, other, x) = declined_while_one_device_has_two_flows(&mut n, call);
        if by_430 {
            // X had not rung: the CANCEL waits for a provisional; the edge's 430 ends it.
            n.send(&first, &answer(&x, 430, "Flow Failed", "e1"));
        } else {
            n.proxy.handle_flow_closed(n.now, &first);
            n.pump();
        }
        assert!(
            n.take(&other).is_empty(),
            "a new branch after the 603 ({})",
            if by_430 { "430" } else { "close" }
        );
        assert_eq!(n.proxy.stats().flow_failovers, 0);
        let up: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
        assert_eq!(up, [603], "the decline goes up once X's branch is done");
        n.take(&first);
        n.assert_idle_after_timers();
    }
}

#[test]
fn a_provisional_other_than_100_to_a_non_invite_stops_here() {
    // RFC 4320 §4.1: no element sends a provisional other than 100 to a non-INVITE request;
    // a callee's 183 to a MESSAGE was forwarded to the caller.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &message("z9hG4bKp1", "p-1"));
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 183, "Session Progress", "b1"));
    assert!(n.take(&A).is_empty(), "the 183 went up");
    n.send(&B, &answer(&fwd, 200, "OK", "b1"));
    let up: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert_eq!(up, [200]);
    n.assert_idle_after_timers();
}

#[test]
fn a_branch_timer_c_cancelled_does_not_ring_again_over_the_other_flow() {
    // Timer C CANCELs a device that rang too long; its flow then fails: before, the INVITE
    // went over the device's other flow and rang for another three minutes.
    let mut n = Net::new();
    one_device_two_flows(&mut n);
    n.send(&A, &invite("z9hG4bKtc1", "tc-1"));
    n.take(&A);
    let mut on_b = n.take(&B);
    let (first, other, fwd) = match on_b.pop() {
        Some(f) => (B, B2, f),
        None => (B2, B, n.one(&B2)),
    };
    n.send(&first, &answer(&fwd, 180, "Ringing", "b1"));
    assert_eq!(status(&n.one(&A)), 180);
    n.advance(Duration::from_secs(181));
    assert_eq!(method(&n.one(&first)), "CANCEL");
    n.proxy.handle_flow_closed(n.now, &first);
    n.pump();
    assert!(n.take(&other).is_empty(), "rang again after Timer C");
    assert_eq!(n.proxy.stats().flow_failovers, 0);
    let up: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert_eq!(up.len(), 1, "{up:?}");
    assert!(up[0] >= 400, "{up:?}");
    n.assert_idle_after_timers();
}

#[test]
fn a_dialog_route_to_a_flow_that_failed_is_answered_480_to_a_phone() {
    let mut n = Net::new();
    let rr = answered(&mut n, "z9hG4bKf1", "flow-1");
    // Bob hangs up along the route; the caller's connection fails before it answers.
    let bye = format!(
        "BYE sip:alice@10.0.0.1:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bKf2\r\nMax-Forwards: 70\r\nRoute: {}\r\nTo: <sip:alice@example.com>;tag=a1\r\nFrom: <sip:bob@example.com>;tag=b1\r\nCall-ID: flow-1\r\nCSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(&rr)
    );
    n.send(&B, bye.as_bytes());
    assert_eq!(method(&n.one(&A)), "BYE");
    n.proxy.handle_flow_closed(n.now, &A);
    n.pump();
    // The route named a flow that is gone: answered at once, not with a 408 after Timer F;
    // 480, not RFC 5626's 430, which is for proxies (§11.5: a phone would read 400).
    let up = n.one(&B);
    assert_eq!(status(&up), 480, "{}", first_line(&up));
    assert!(n.inbox.is_empty());
    n.assert_idle_after_timers();
}

/// A proxy with open registration and one cluster node, `node-c`, as a partner link.
fn with_node_c() -> Net {
    let policy = Policy::new(
        sipring_core::policy::PolicyConfig {
            authenticate: false,
            partners: vec![sipring_core::policy::PartnerPolicy {
                name: "node-c".into(),
                domains: vec![],
                relay_to: vec![],
                assert_identity: false,
                numbers: false,
                node: true,
            }],
            ..Default::default()
        },
        sipring_core::auth::NodeKey::new([0; 32]),
        Instant::now(),
        std::rc::Rc::new(sipring_core::policy::NoSubscribers),
    );
    Net::build(policy, |c| c.nodes = vec!["node-c".into()])
}

#[test]
fn a_dialog_route_to_a_flow_that_failed_is_answered_480_to_a_cluster_node() {
    // Another node of our cluster relays what we answer to its phone: 480, as to a phone
    // (430 went through it to the caller).
    let mut n = with_node_c();
    let node = Flow::Peer("node-c".into());
    let vias = "Via: SIP/2.0/TLS node-c.example.com;branch=z9hG4bKn{}\r\nVia: SIP/2.0/TLS 10.0.0.9;branch=z9hG4bKphone{}\r\n";
    let up = bye_to_a_dead_callee(&mut n, &node, vias, "<sip:carol@example.com>", "flow-n");
    assert_eq!(status(&up), 480, "{}", first_line(&up));
}

/// `upstream` calls bob (on B) with the Vias `vias` (`{}`: a number per request) and From
/// `from`, bob answers, then `upstream` hangs up along the route while B's connection
/// fails: the answer `upstream` gets.
fn bye_to_a_dead_callee(
    n: &mut Net,
    upstream: &Flow,
    vias: &str,
    from: &str,
    call: &str,
) -> Vec<u8> {
    bye_along_the_route(n, upstream, vias, from, call, |n, _| {
        n.proxy.handle_flow_closed(n.now, &B);
        n.pump();
    })
}

/// As [`bye_to_a_dead_callee`], but what becomes of the BYE that reached B is `fail`'s.
fn bye_along_the_route(
    n: &mut Net,
    upstream: &Flow,
    vias: &str,
    from: &str,
    call: &str,
    fail: impl FnOnce(&mut Net, &[u8]),
) -> Vec<u8> {
    let via = |i: u32| vias.replace("{}", &i.to_string());
    n.register("bob", &B, "10.0.0.2:5061");
    let inv = format!(
        "INVITE sip:bob@example.com SIP/2.0\r\n{}Max-Forwards: 69\r\nTo: <sip:bob@example.com>\r\nFrom: {from};tag=u1\r\nCall-ID: {call}\r\nCSeq: 1 INVITE\r\nContact: <sip:up@10.0.0.9;transport=tls>\r\nContent-Length: 0\r\n\r\n",
        via(1)
    );
    n.send(upstream, inv.as_bytes());
    n.take(upstream);
    let fwd = n.one(&B);
    let rr = record_route(&fwd);
    n.send(&B, &answer(&fwd, 200, "OK", "b1"));
    assert_eq!(status(&n.one(upstream)), 200);
    let bye = format!(
        "BYE sip:bob@10.0.0.2:5061;transport=tls SIP/2.0\r\n{}Max-Forwards: 69\r\nRoute: {}\r\nTo: <sip:bob@example.com>;tag=b1\r\nFrom: {from};tag=u1\r\nCall-ID: {call}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        via(2),
        String::from_utf8_lossy(&rr)
    );
    n.send(upstream, bye.as_bytes());
    let fwd = n.one(&B);
    assert_eq!(method(&fwd), "BYE");
    fail(n, &fwd);
    n.one(upstream)
}

#[test]
fn an_edge_proxys_430_on_a_dialog_route_reaches_a_partner_as_430_and_a_phone_as_480() {
    // Along our dialog route the 430 is for the proxy before us (RFC 5626 §5.3): a
    // partner's proxy gets it; a phone got it as it came (§11.5: it reads 400): 480 now.
    let edge_430 = |n: &mut Net, fwd: &[u8]| {
        n.send(&B, &answer(fwd, 430, "Flow Failed", "b1"));
    };
    let (carrier, mut n) = carrier_net();
    let vias = "Via: SIP/2.0/TLS sbc.carrier.example;branch=z9hG4bKe4c{}\r\n";
    let from = "<sip:x@carrier.example>";
    let up = bye_along_the_route(&mut n, &carrier, vias, from, "e430-c", edge_430);
    assert_eq!(status(&up), 430, "{}", first_line(&up));
    let mut n = Net::new();
    let vias = "Via: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKe4a{}\r\n";
    let from = "<sip:alice@example.com>";
    let up = bye_along_the_route(&mut n, &A, vias, from, "e430-a", edge_430);
    assert_eq!(status(&up), 480, "{}", first_line(&up));
}

#[test]
fn an_edge_proxys_430_for_a_user_we_looked_up_is_480_for_anyone() {
    // Bob behind an edge proxy (one flow, on B): the edge's flow to bob failed and it says
    // 430. No other flow takes the request; we looked bob up, so the 430 is for us (RFC
    // 5626 §5.3): a phone got it as it came (§11.5: it reads 400), and a partner's SBC
    // passed it on to its phone. 480 to either now.
    for from_partner in [false, true] {
        let (carrier, mut n) = carrier_net();
        n.register("bob", &B, "10.0.0.2:5061");
        let (up, inv) = if from_partner {
            let inv = "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS sbc.carrier.example;branch=z9hG4bKe430\r\nMax-Forwards: 69\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:x@carrier.example>;tag=u1\r\nCall-ID: e430-p\r\nCSeq: 1 INVITE\r\nContact: <sip:x@sbc.carrier.example;transport=tls>\r\nContent-Length: 0\r\n\r\n";
            (carrier.clone(), inv.as_bytes().to_vec())
        } else {
            (A, invite("z9hG4bKe430", "e430-a"))
        };
        n.send(&up, &inv);
        n.take(&up);
        let fwd = n.one(&B);
        n.send(&B, &answer(&fwd, 430, "Flow Failed", "e1"));
        assert_eq!(method(&n.one(&B)), "ACK");
        let finals: Vec<u16> = n.take(&up).iter().map(|m| status(m)).collect();
        assert_eq!(finals, [480], "from a partner: {from_partner}");
    }
}

#[test]
fn a_dialog_route_to_a_flow_that_failed_is_answered_430_to_a_proxy() {
    // RFC 5626 §5.3: toward the proxy before us (a partner), the flow's failure is 430.
    let (carrier, mut n) = carrier_net();
    let vias = "Via: SIP/2.0/TLS sbc.carrier.example;branch=z9hG4bKc{}\r\n";
    let up = bye_to_a_dead_callee(&mut n, &carrier, vias, "<sip:x@carrier.example>", "flow-c");
    assert_eq!(status(&up), 430, "{}", first_line(&up));
}

#[test]
fn busy_callee_gets_a_hop_by_hop_ack_and_the_callers_ack_is_absorbed() {
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKa1", "call-2"));
    n.take(&A);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 486, "Busy Here", "b1"));
    let ack = n.one(&B);
    assert_eq!(method(&ack), "ACK");
    with_msg(&ack, |_, e| {
        let fwd_branch = with_msg(&fwd, |_, fe| fe.top_via.branch().unwrap().to_vec());
        assert_eq!(
            e.top_via.branch(),
            Some(&fwd_branch[..]),
            "the ACK for a non-2xx is the INVITE's transaction"
        );
        assert_eq!(e.to.tag(), Some(&b"b1"[..]));
    });
    let busy = n.one(&A);
    assert_eq!(status(&busy), 486);
    // A retransmitted 486 is re-ACKed, not passed up again.
    n.send(&B, &answer(&fwd, 486, "Busy Here", "b1"));
    assert!(n.take(&A).is_empty());
    // The caller's ACK matches our server transaction and stops there.
    let to_tag = with_msg(&busy, |_, e| e.to.tag().unwrap().to_vec());
    let caller_ack = format!(
        "ACK sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKa1\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>;tag={}\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: call-2\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(&to_tag)
    );
    n.send(&A, caller_ack.as_bytes());
    assert!(
        n.inbox.is_empty(),
        "ACK for a non-2xx must not be forwarded"
    );
    n.assert_idle_after_timers();
}

/// Bob registered on B, alice's INVITE (branch `z9hG4bKa1`, Call-ID `call`) ringing there:
/// the forwarded INVITE.
fn ringing(n: &mut Net, call: &str) -> Vec<u8> {
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKa1", call));
    n.take(&A);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    n.take(&A);
    fwd
}

/// Alice's CANCEL of that INVITE.
fn cancel_of(call: &str) -> Vec<u8> {
    format!("CANCEL sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKa1\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: {call}\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n").into_bytes()
}

#[test]
fn cancel_before_answer() {
    let mut n = Net::new();
    let fwd = ringing(&mut n, "call-3");
    let cancel = &cancel_of("call-3");
    n.send(&A, cancel);
    let ok = n.one(&A);
    assert_eq!(status(&ok), 200);
    with_msg(&ok, |_, e| assert_eq!(e.cseq.method, b"CANCEL"));
    let c = n.one(&B);
    assert_eq!(method(&c), "CANCEL");
    with_msg(&c, |_, e| {
        let fwd_branch = with_msg(&fwd, |_, fe| fe.top_via.branch().unwrap().to_vec());
        assert_eq!(
            e.top_via.branch(),
            Some(&fwd_branch[..]),
            "CANCEL uses the INVITE's branch"
        );
    });
    n.send(&B, &answer(&c, 200, "OK", "b1"));
    n.send(&B, &answer(&fwd, 487, "Request Terminated", "b1"));
    assert_eq!(method(&n.one(&B)), "ACK");
    assert_eq!(status(&n.one(&A)), 487);
    // A CANCEL for an unknown transaction gets 481.
    n.send(&A, &cancel.to_vec().replace_branch("z9hG4bKzz"));
    assert_eq!(status(&n.one(&A)), 481);
    n.assert_idle_after_timers();
}

#[test]
fn a_cancels_reason_is_passed_on_to_the_branches() {
    // RFC 3326 §2: a proxy forwarding a CANCEL SHOULD copy its Reason. A ring-all answered
    // elsewhere one hop up (another node of ours, a partner's fork) reached the phone here
    // with no Reason: it showed a missed call.
    let mut n = Net::new();
    let fwd = ringing(&mut n, "call-r");
    let cancel = String::from_utf8(cancel_of("call-r")).unwrap().replace(
        "Content-Length: 0",
        "Reason: SIP;cause=200;text=\"Call completed elsewhere\"\r\nReason: Q.850;\r\n cause=16\r\nContent-Length: 0",
    );
    n.send(&A, cancel.as_bytes());
    assert_eq!(status(&n.one(&A)), 200);
    let c = n.one(&B);
    assert_eq!(method(&c), "CANCEL");
    assert_eq!(
        sipring_tests::ua::header(&c, "Reason").as_deref(),
        Some("SIP;cause=200;text=\"Call completed elsewhere\", Q.850;   cause=16")
    );
    assert!(
        !String::from_utf8_lossy(&c).contains("\r\n cause"),
        "folded on"
    );
    n.send(&B, &answer(&c, 200, "OK", "b1"));
    n.send(&B, &answer(&fwd, 487, "Request Terminated", "b1"));
    assert_eq!(method(&n.one(&B)), "ACK");
    assert_eq!(status(&n.one(&A)), 487);
    n.assert_idle_after_timers();
    // Without one, none.
    let mut n = Net::new();
    let fwd = ringing(&mut n, "call-r2");
    n.send(&A, &cancel_of("call-r2"));
    n.take(&A);
    let c = n.one(&B);
    assert_eq!(sipring_tests::ua::header(&c, "Reason"), None);
    n.send(&B, &answer(&c, 200, "OK", "b1"));
    n.send(&B, &answer(&fwd, 487, "Request Terminated", "b1"));
    n.take(&B);
    n.take(&A);
    n.assert_idle_after_timers();
}

#[test]
fn a_to_tag_without_a_value_is_refused() {
    // `tag = token` (RFC 3261 §25.1): `;tag` alone read as no tag, and our answer then
    // carried two (`;tag;tag=sr…`), its ACK not recognised as ours.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    let m = String::from_utf8(message("z9hG4bKvt", "vt-1"))
        .unwrap()
        .replace("To: <sip:bob@example.com>", "To: <sip:bob@example.com>;tag");
    n.send(&A, m.as_bytes());
    let up = n.one(&A);
    assert_eq!(status(&up), 400, "{}", String::from_utf8_lossy(&up));
    assert!(n.take(&B).is_empty());
    assert!(n.closed.is_empty());
}

trait ReplaceBranch {
    fn replace_branch(&self, b: &str) -> Vec<u8>;
}
impl ReplaceBranch for Vec<u8> {
    fn replace_branch(&self, b: &str) -> Vec<u8> {
        String::from_utf8_lossy(self)
            .replace("z9hG4bKa1", b)
            .into_bytes()
    }
}

#[test]
fn a_cancel_of_a_non_invite_is_answered_200_and_changes_nothing() {
    // RFC 3261 §9.2, §16.10: a CANCEL matching a pending non-INVITE request is answered
    // 200 and has no effect (it was 481: only INVITEs were looked for). One matching
    // nothing is still 481.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &message("z9hG4bKcm1", "cm-1"));
    let at_bob = n.one(&B);
    let cancel = |branch: &str| {
        format!(
            "CANCEL sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch={branch}\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: cm-1\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
        )
    };
    n.send(&A, cancel("z9hG4bKcm1").as_bytes());
    assert_eq!(status(&n.one(&A)), 200);
    assert!(n.take(&B).is_empty(), "nothing to cancel downstream");
    n.send(&A, cancel("z9hG4bKcm9").as_bytes());
    assert_eq!(status(&n.one(&A)), 481);
    n.send(&B, &answer(&at_bob, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&A)), 200, "the MESSAGE goes on");
    n.assert_idle_after_timers();
}

#[test]
fn an_invite_sent_again_after_its_connection_closed_is_not_answered_by_the_old_branch() {
    // The caller's connection closes while its INVITE rings: the transaction goes, its
    // branch is cancelled. The caller connects again and sends the same INVITE (same
    // branch and sent-by), which waits for its lookup. The old branch's 487 found the new
    // transaction by its key and answered it (a best answer with no branch left is "all
    // done"), and its lookup answer was dropped.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKre1", "re-1"));
    n.take(&A);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    n.take(&A);
    n.proxy.handle_flow_closed(n.now, &A);
    n.pump();
    let cancel = n.one(&B);
    assert_eq!(method(&cancel), "CANCEL");
    n.lost_lookups = true;
    n.send(&C, &invite("z9hG4bKre1", "re-1"));
    assert_eq!(status(&n.one(&C)), 100);
    n.send(&B, &answer(&cancel, 200, "OK", "b1"));
    n.send(&B, &answer(&fwd, 487, "Request Terminated", "b1"));
    assert_eq!(method(&n.one(&B)), "ACK");
    assert!(
        n.take(&C).is_empty(),
        "the old branch's 487 answered the new INVITE"
    );
}

#[test]
fn cancel_waits_for_a_provisional_response() {
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKa1", "call-4"));
    n.take(&A);
    let fwd = n.one(&B);
    n.send(&A, b"CANCEL sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKa1\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: call-4\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status(&n.one(&A)), 200);
    assert!(
        n.take(&B).is_empty(),
        "no CANCEL before a provisional response (RFC 3261 9.1)"
    );
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    let sent = n.take(&B);
    assert_eq!(sent.len(), 1);
    assert_eq!(method(&sent[0]), "CANCEL");
    n.send(&B, &answer(&sent[0], 200, "OK", "b1"));
    n.send(&B, &answer(&fwd, 487, "Request Terminated", "b1"));
    n.take(&B);
    let to_a: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert_eq!(to_a, [180, 487]);
    n.assert_idle_after_timers();
}

#[test]
fn an_ack_that_kept_the_invites_branch_still_reaches_the_callee() {
    // Older UAs send the 2xx's ACK with the INVITE's branch: it matches the INVITE's server
    // transaction in Accepted (RFC 6026), and must still be forwarded — the callee waits for
    // it, and without it hangs up after 64·T1.
    let mut n = Net::new();
    let rr = answered(&mut n, "z9hG4bKa1", "same-1");
    n.send(
        &A,
        &ack_2xx(
            "sip:callee@10.0.0.2;transport=tls",
            &rr,
            "b1",
            "10.0.0.1:5061;branch=z9hG4bKa1",
            "same-1",
        ),
    );
    assert_eq!(method(&n.one(&B)), "ACK");
    assert!(n.inbox.is_empty());
    n.assert_idle_after_timers();
}

#[test]
fn an_invite_refused_here_holds_no_transaction_and_its_ack_ends_here() {
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.advance(Duration::from_millis(1));
    let hops = String::from_utf8_lossy(&invite("z9hG4bKa1", "refused-1"))
        .replace("Max-Forwards: 70", "Max-Forwards: 0");
    n.send(&A, hops.as_bytes());
    let r = n.one(&A);
    assert_eq!(status(&r), 483, "{}", first_line(&r));
    // Answered without a transaction: nothing waits 64·T1 (Timer H) for its ACK.
    assert!(n.proxy.is_idle(), "{:?}", n.proxy.load());
    assert_eq!(n.proxy.poll_timeout(), None);
    // Its ACK carries our To-tag: it ends here, not looked up and sent to bob.
    let to = with_msg(&r, |m, _| m.header(HeaderName::To).unwrap().value.to_vec());
    let ack = format!(
        "ACK sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKa1\r\nMax-Forwards: 70\r\nTo: {}\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: refused-1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(&to)
    );
    n.send(&A, ack.as_bytes());
    assert!(n.inbox.is_empty(), "{:?}", n.inbox);
    assert_eq!(n.proxy.stats().dropped_requests, 0, "ours: it ends here");
    // The same tag on another call is not ours. With no route of ours in it, it is not the
    // ACK of a dialog we record-routed either: dropped (counted), not looked up and sent
    // to bob unauthenticated (Kamailio's default script drops it too).
    n.send(&A, ack.replace("refused-1", "refused-2").as_bytes());
    assert!(n.inbox.is_empty(), "{:?}", n.inbox);
    assert_eq!(n.proxy.stats().dropped_requests, 1);
    // A re-INVITE keeps its dialog's To-tag: refused, it keeps a transaction, which absorbs
    // its ACK (a stateless answer's ACK could not be told from the dialog's own).
    let reinvite = hops
        .replace(
            "To: <sip:bob@example.com>",
            "To: <sip:bob@example.com>;tag=b1",
        )
        .replace("z9hG4bKa1", "z9hG4bKre1");
    n.send(&A, reinvite.as_bytes());
    let answers: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert_eq!(answers, [100, 483]);
    assert!(!n.proxy.is_idle(), "a transaction waits for the ACK");
    let ack = ack
        .replace(
            &String::from_utf8_lossy(&to).into_owned(),
            "<sip:bob@example.com>;tag=b1",
        )
        .replace("z9hG4bKa1", "z9hG4bKre1");
    n.send(&A, ack.as_bytes());
    assert!(n.inbox.is_empty(), "{:?}", n.inbox);
    n.assert_idle_after_timers();
}

#[test]
fn only_its_sender_acks_or_retransmits_a_transaction() {
    // Anyone who saw the caller's Via (the callee sees it) could end the caller's INVITE
    // transaction with an ACK from its own connection, or have its answer sent again.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.advance(Duration::from_millis(1));
    let inv = invite("z9hG4bKown", "own-1");
    n.send(&A, &inv);
    n.take(&A);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 486, "Busy Here", "b1"));
    assert_eq!(method(&n.one(&B)), "ACK");
    assert_eq!(status(&n.one(&A)), 486);
    let to = with_msg(&fwd, |m, _| {
        m.header(HeaderName::To).unwrap().value.to_vec()
    });
    let ack = format!(
        "ACK sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKown\r\nMax-Forwards: 70\r\nTo: {};tag=b1\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: own-1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(&to)
    );
    // From bob's connection: the INVITE retransmitted, then its ACK. Neither touches A's.
    n.send(&B, &inv);
    n.send(&B, ack.as_bytes());
    assert!(n.inbox.is_empty(), "{:?}", n.inbox);
    assert_eq!(n.proxy.stats().dropped_requests, 2);
    assert_eq!(
        n.proxy.load().0,
        1,
        "A's transaction still waits for A's ACK"
    );
    // A's own retransmission gets its answer again; its ACK ends the transaction.
    n.send(&A, &inv);
    assert_eq!(status(&n.one(&A)), 486);
    n.send(&A, ack.as_bytes());
    assert_eq!(n.proxy.load().0, 0);
    n.assert_idle_after_timers();
}

/// Bob registered on B and B2, alice's INVITE (branch `z9hG4bKa1`) forked to both, both
/// ringing (their 180s not yet read at A): the two forwarded INVITEs.
fn ringing_at_two(n: &mut Net, call: &str) -> (Vec<u8>, Vec<u8>) {
    n.register("bob", &B, "10.0.0.2:5061");
    n.register("bob", &B2, "10.0.0.3:5061");
    n.send(&A, &invite("z9hG4bKa1", call));
    n.take(&A);
    let f1 = n.one(&B);
    let f2 = n.one(&B2);
    n.send(&B, &answer(&f1, 180, "Ringing", "b1"));
    n.send(&B2, &answer(&f2, 180, "Ringing", "b2"));
    (f1, f2)
}

#[test]
fn parallel_branches_share_the_requests_breadth() {
    // RFC 5393 §5.3: the branches of a parallel fork carry Max-Breadth values that add up
    // to at most what the request had (60 without one, at most 60), each at least 1; a
    // breadth too small for every branch is 440. A single target passes it on as it came.
    let breadth = |m: &[u8]| sipring_tests::ua::header(m, "Max-Breadth");
    let with = |b: &str, branch: &str, call: &str| {
        let inv = String::from_utf8(invite(branch, call)).unwrap();
        if b.is_empty() {
            inv.into_bytes()
        } else {
            inv.replace(
                "Max-Forwards: 70\r\n",
                &format!("Max-Forwards: 70\r\nMax-Breadth: {b}\r\n"),
            )
            .into_bytes()
        }
    };
    for (given, want) in [("", ["30", "30"]), ("3", ["2", "1"]), ("500", ["30", "30"])] {
        let mut n = Net::new();
        n.register("bob", &B, "10.0.0.2:5061");
        n.register("bob", &B2, "10.0.0.3:5061");
        n.send(&A, &with(given, "z9hG4bKmb1", "mb-1"));
        let got = [breadth(&n.one(&B)), breadth(&n.one(&B2))];
        assert_eq!(
            got,
            want.map(|w| Some(w.to_string())),
            "Max-Breadth {given:?}"
        );
    }
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.register("bob", &B2, "10.0.0.3:5061");
    n.send(&A, &with("1", "z9hG4bKmb2", "mb-2"));
    let answers = n.take(&A);
    assert!(
        answers.iter().any(|m| status(m) == 440),
        "440 for a breadth of 1"
    );
    assert!(
        n.take(&B).is_empty() && n.take(&B2).is_empty(),
        "nothing forked"
    );
    // One binding: forwarded as it came (none added, the received one kept).
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &with("", "z9hG4bKmb3", "mb-3"));
    assert_eq!(breadth(&n.one(&B)), None);
    n.send(&A, &with("7", "z9hG4bKmb4", "mb-4"));
    assert_eq!(breadth(&n.one(&B)).as_deref(), Some("7"));
}

#[test]
fn the_other_branches_of_an_answered_call_hear_it_was_completed_elsewhere() {
    // RFC 3326: bob's second phone shows "answered elsewhere", not a missed call.
    let mut n = Net::new();
    let (f1, _) = ringing_at_two(&mut n, "elsewhere-1");
    n.take(&A);
    n.send(&B, &answer(&f1, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&A)), 200);
    let c = n.one(&B2);
    assert_eq!(method(&c), "CANCEL");
    assert_eq!(
        sipring_tests::ua::header(&c, "Reason").as_deref(),
        Some("SIP;cause=200;text=\"Call completed elsewhere\"")
    );
    // A caller's CANCEL says nothing of the kind.
    let mut n = Net::new();
    ringing_at_two(&mut n, "elsewhere-2");
    n.send(&A, &cancel_of("elsewhere-2"));
    let c = n.one(&B);
    assert_eq!(method(&c), "CANCEL");
    assert_eq!(sipring_tests::ua::header(&c, "Reason"), None);
}

#[test]
fn a_branch_is_cancelled_once_and_abandoned_64_t1_after() {
    let mut n = Net::new();
    let (f1, _) = ringing_at_two(&mut n, "once-1");
    n.take(&A);
    n.send(&A, &cancel_of("once-1"));
    assert_eq!(status(&n.one(&A)), 200);
    assert_eq!(method(&n.one(&B)), "CANCEL");
    assert_eq!(method(&n.one(&B2)), "CANCEL");
    // B declines (6xx: the other branches are cancelled — B2 already was: no second one).
    n.send(&B, &answer(&f1, 603, "Decline", "b1"));
    assert_eq!(method(&n.one(&B)), "ACK");
    assert!(n.take(&B2).is_empty(), "one CANCEL per branch");
    // B2 never answers its INVITE: abandoned 64·T1 after its CANCEL (§9.1), not after
    // Timer C (181 s).
    n.advance(Duration::from_millis(31_999));
    assert!(n.take(&A).is_empty());
    n.advance(Duration::from_millis(1));
    assert_eq!(status(&n.one(&A)), 603);
    n.assert_idle_after_timers();
    assert_eq!(n.proxy.indexed(&B2), 0);
    assert_eq!(n.proxy.indexed(&B), 0);
}

#[test]
fn a_non_invite_that_times_out_is_not_answered_408() {
    // RFC 4320 §4.2: by then the sender's own Timer F has fired; a 408 would only be noise.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, oc_message(1).as_bytes());
    assert_eq!(method(&n.one(&B)), "MESSAGE");
    n.advance(Duration::from_secs(33));
    assert!(n.take(&A).is_empty());
    n.assert_idle_after_timers();
}

#[test]
fn timer_b_answers_408_upstream() {
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKa1", "call-5"));
    n.take(&A);
    n.take(&B);
    n.advance(Duration::from_millis(31_999));
    assert!(n.take(&A).is_empty(), "Timer B is 64*T1 = 32 s");
    n.advance(Duration::from_millis(1));
    assert_eq!(status(&n.one(&A)), 408);
    n.assert_idle_after_timers();
}

#[test]
fn a_dead_flow_fails_its_transactions_and_leaves_no_state() {
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKa1", "call-6"));
    n.take(&A);
    n.take(&B);
    n.proxy.handle_flow_closed(n.now, &B);
    n.pump();
    assert_eq!(
        n.store.remove_flow(2),
        1,
        "the engine drops the dead flow's bindings"
    );
    // The callee's connection died under the call: the user is unreachable (480), not a
    // server error.
    assert_eq!(status(&n.one(&A)), 480);
    // And the caller's side dying mid-call abandons its transactions.
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKa7", "call-7"));
    n.take(&A);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    n.take(&A);
    n.proxy.handle_flow_closed(n.now, &A);
    n.pump();
    let c = n.one(&B);
    assert_eq!(
        method(&c),
        "CANCEL",
        "the callee is told the caller went away"
    );
    n.send(&B, &answer(&c, 200, "OK", "b1"));
    n.send(&B, &answer(&fwd, 487, "Request Terminated", "b1"));
    n.take(&B);
    assert!(n.take(&A).is_empty());
    n.assert_idle_after_timers();
}

#[test]
fn forking_to_two_bindings_delivers_one_final_answer() {
    let mut n = Net::new();
    let (f1, f2) = ringing_at_two(&mut n, "call-8");
    n.send(&B, &answer(&f1, 486, "Busy Here", "b1"));
    assert_eq!(method(&n.one(&B)), "ACK");
    let to_a: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert_eq!(
        to_a,
        [180, 180],
        "486 waits: another branch is still ringing"
    );
    n.send(&B2, &answer(&f2, 200, "OK", "b2"));
    assert_eq!(status(&n.one(&A)), 200);
    assert!(n.take(&B).is_empty());
    n.assert_idle_after_timers();
}

#[test]
fn an_answer_kept_while_another_branch_rings_counts_in_the_transactions_bytes() {
    // A fork's best answer so far waits while another branch rings (and a 401/407's
    // challenges wait to go up together): up to `max_message` more per ringing INVITE, held
    // beside the byte bound without counting in it.
    let mut n = Net::new();
    let (f1, f2) = ringing_at_two(&mut n, "call-kb");
    n.take(&A);
    let before = n.proxy.transaction_bytes();
    let body = "x".repeat(20_000);
    let busy = String::from_utf8(answer(&f1, 486, "Busy Here", "b1"))
        .unwrap()
        .replacen(
            "Content-Length: 0\r\n\r\n",
            &format!("Content-Type: text/plain\r\nContent-Length: 20000\r\n\r\n{body}"),
            1,
        );
    assert!(busy.ends_with(&body));
    n.send(&B, busy.as_bytes());
    assert_eq!(method(&n.one(&B)), "ACK");
    assert!(
        n.take(&A).is_empty(),
        "486 waits: another branch is still ringing"
    );
    let kept = n.proxy.transaction_bytes();
    // Branch 1's request is no longer held; its 20 kB answer is.
    assert!(kept > before + 15_000, "{before} -> {kept}");
    // As good, not better: the first stays the best.
    n.send(&B2, &answer(&f2, 486, "Busy Here", "b2"));
    assert_eq!(method(&n.one(&B2)), "ACK");
    let up = n.one(&A);
    assert_eq!(status(&up), 486);
    assert!(up.ends_with(body.as_bytes()));
    // Sent, it is still held (sent again if the INVITE is), until the ACK or Timer H.
    assert!(n.proxy.transaction_bytes() > 20_000);
    n.assert_idle_after_timers();
}

#[test]
fn a_head_other_readers_would_frame_differently_closes_the_connection() {
    // `Content_Length` is Content-Length to Kamailio's and OpenSIPS's stream readers, and a
    // first header line with leading white space (` l: 48`) one to lenient ones: we frame
    // by the `l: 0`, so the 48 bytes behind are a request to us and a body to them. It was
    // a 400 with the connection kept open, and those bytes were served as a request.
    for head in [
        "Content_Length: 48\r\nl: 0",
        "Content_LENGTH: 0\r\nContent-Length: 0",
    ] {
        let mut n = Net::new();
        n.send(&A, format!("OPTIONS sip:proxy.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKsm1\r\nTo: <sip:proxy.example.com>\r\nFrom: <sip:a@example.com>;tag=1\r\nCall-ID: sm1\r\nCSeq: 1 OPTIONS\r\n{head}\r\n\r\n").as_bytes());
        assert_eq!(status(&n.one(&A)), 400, "{head}");
        assert_eq!(n.closed, [A], "{head}");
    }
    let mut n = Net::new();
    n.send(&A, b"OPTIONS sip:proxy.example.com SIP/2.0\r\n l: 48\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKsm2\r\nTo: <sip:proxy.example.com>\r\nFrom: <sip:a@example.com>;tag=1\r\nCall-ID: sm2\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n");
    n.take(&A);
    assert_eq!(n.closed, [A]);
}

#[test]
fn local_answers_and_retransmissions() {
    let mut n = Net::new();
    // Unknown user: 404; the INVITE's 100 Trying comes first.
    n.send(&A, &invite("z9hG4bKa1", "call-9"));
    let v: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert_eq!(v, [100, 404]);
    // A retransmitted INVITE is answered from the transaction, not processed again.
    n.send(&A, &invite("z9hG4bKa1", "call-9"));
    let v: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert_eq!(v, [404]);
    // OPTIONS to the server itself.
    n.send(&A, b"OPTIONS sip:proxy.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKo1\r\nTo: <sip:proxy.example.com>\r\nFrom: <sip:a@example.com>;tag=1\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n");
    let ok = n.one(&A);
    assert_eq!(status(&ok), 200);
    with_msg(&ok, |m, _| assert!(m.header(HeaderName::Allow).is_some()));
    // Malformed: a 400 built from what could be salvaged; bad framing also closes the flow.
    n.send(&A, b"OPTIONS sip:x@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKo2\r\nTo: <sip:x@example.com>\r\nFrom: <sip:a@example.com>;tag=1\r\nCall-ID: o2\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status(&n.one(&A)), 400);
    assert!(n.closed.is_empty());
    n.send(&A, b"OPTIONS sip:x@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKo3\r\nContent-Length: -1\r\n\r\n");
    assert_eq!(status(&n.one(&A)), 400);
    assert_eq!(n.closed, [A]);
    // MESSAGE to a registered user is forwarded; its 200 comes back.
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, b"MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKm1\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:a@example.com>;tag=1\r\nCall-ID: m1\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi");
    let m = n.one(&B);
    assert_eq!(method(&m), "MESSAGE");
    with_msg(&m, |m, _| {
        assert_eq!(m.method(), Some(Method::Message));
        assert!(
            m.header(HeaderName::RecordRoute).is_none(),
            "MESSAGE creates no dialog"
        );
    });
    n.send(&B, &answer(&m, 200, "OK", "b"));
    assert_eq!(status(&n.one(&A)), 200);
    n.assert_idle_after_timers();
}

#[test]
fn timer_c_cancels_a_branch_that_rings_forever() {
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKa1", "call-c1"));
    n.take(&A);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    assert_eq!(status(&n.one(&A)), 180);
    // A provisional response restarts Timer C (RFC 3261 16.7 step 2).
    n.advance(Duration::from_secs(100));
    n.send(&B, &answer(&fwd, 183, "Session Progress", "b1"));
    assert_eq!(status(&n.one(&A)), 183);
    n.advance(Duration::from_secs(180));
    assert!(n.take(&B).is_empty(), "Timer C is more than 3 minutes");
    n.advance(Duration::from_secs(1));
    let c = n.one(&B);
    assert_eq!(method(&c), "CANCEL", "Timer C cancels a branch that rang");
    // The callee answers the CANCEL but never the INVITE: 64*T1 later the branch fails.
    n.send(&B, &answer(&c, 200, "OK", "b1"));
    n.advance(Duration::from_secs(31));
    assert!(n.take(&A).is_empty());
    n.advance(Duration::from_secs(1));
    assert_eq!(status(&n.one(&A)), 408);
    n.assert_idle_after_timers();
    // A callee that does answer the CANCEL ends the call with its 487, as usual.
    n.send(&A, &invite("z9hG4bKa2", "call-c2"));
    n.take(&A);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    n.advance(Duration::from_secs(181));
    let c = n.one(&B);
    assert_eq!(method(&c), "CANCEL");
    n.send(&B, &answer(&c, 200, "OK", "b1"));
    n.send(&B, &answer(&fwd, 487, "Request Terminated", "b1"));
    assert_eq!(method(&n.one(&B)), "ACK");
    let to_a: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert_eq!(to_a, [180, 487]);
    n.assert_idle_after_timers();
}

#[test]
fn a_callee_that_keeps_ringing_is_cancelled_at_the_ceiling() {
    // Each provisional restarts Timer C (RFC 3261 §16.7 step 2), so a callee sending 180
    // every 170 s held the caller's transaction, and its place in the tables, for as long
    // as it liked. The branch's ceiling ends it as Timer C would.
    let mut n = Net::new();
    n.proxy.set_max_ring(Duration::from_secs(400));
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKring1", "call-ring"));
    n.take(&A);
    let fwd = n.one(&B);
    for _ in 0..2 {
        n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
        assert_eq!(status(&n.one(&A)), 180);
        n.advance(Duration::from_secs(170));
        assert!(n.take(&B).is_empty(), "within Timer C and the ceiling");
    }
    // 340 s in: a new 180 would restart Timer C to 521 s; the ceiling is 400.
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    n.take(&A);
    n.advance(Duration::from_secs(59));
    assert!(n.take(&B).is_empty());
    n.advance(Duration::from_secs(1));
    let c = n.one(&B);
    assert_eq!(method(&c), "CANCEL", "cancelled at the ceiling");
    n.send(&B, &answer(&c, 200, "OK", "b1"));
    n.send(&B, &answer(&fwd, 487, "Request Terminated", "b1"));
    assert_eq!(method(&n.one(&B)), "ACK");
    assert_eq!(status(&n.one(&A)), 487);
    n.assert_idle_after_timers();
    // The ceiling is the call's: a fallback to the device's other flow (its first answered
    // 430 after ringing 340 s) rings for what is left of it, not 400 s more.
    let mut n = Net::new();
    n.proxy.set_max_ring(Duration::from_secs(400));
    one_device_two_flows(&mut n);
    n.send(&A, &invite("z9hG4bKring2", "call-ring2"));
    n.take(&A);
    let (first, other, fwd) = match n.take(&B).pop() {
        Some(f) => (B, B2, f),
        None => (B2, B, n.one(&B2)),
    };
    for _ in 0..2 {
        n.send(&first, &answer(&fwd, 180, "Ringing", "e1"));
        n.take(&A);
        n.advance(Duration::from_secs(170));
    }
    n.send(&first, &answer(&fwd, 430, "Flow Failed", "e1"));
    assert_eq!(method(&n.one(&first)), "ACK");
    let fwd2 = n.one(&other);
    assert_eq!(method(&fwd2), "INVITE");
    n.send(&other, &answer(&fwd2, 180, "Ringing", "e2"));
    n.take(&A);
    n.advance(Duration::from_secs(59));
    assert!(n.take(&other).is_empty());
    n.advance(Duration::from_secs(1));
    assert_eq!(method(&n.one(&other)), "CANCEL", "at the call's ceiling");
}

#[test]
fn transactions_are_capped() {
    let mut n = Net::new();
    n.proxy.set_max_transactions(3);
    n.register("bob", &B, "10.0.0.2:5061");
    // The REGISTER's transaction has ended (reliable transport: Timer J is zero).
    n.advance(Duration::from_millis(1));
    for i in 0..3 {
        n.send(&A, &invite(&format!("z9hG4bKcap{i}"), &format!("cap-{i}")));
    }
    assert_eq!(n.take(&B).len(), 3);
    n.take(&A);
    n.send(&A, &invite("z9hG4bKcap3", "cap-3"));
    let r = n.one(&A);
    assert_eq!(status(&r), 503, "{}", String::from_utf8_lossy(&r));
    // Spread 2–9 s, as at the door (all at 5 s, refused callers came back together).
    let retry: u32 = sipring_tests::ua::header(&r, "Retry-After")
        .expect("Retry-After")
        .trim()
        .parse()
        .unwrap();
    assert!((2..=9).contains(&retry), "{retry}");
    assert_eq!(n.refused, ["transactions_full"]);
    assert!(
        n.take(&B).is_empty(),
        "the request beyond the cap is not forwarded"
    );
    assert_eq!(n.proxy.load().0, 3, "and holds no state");
    // A CANCEL is never refused for room: it is what frees it.
    n.send(&A, &cancel_of("cap-0").replace_branch("z9hG4bKcap0"));
    assert_eq!(status(&n.one(&A)), 200);
    assert_eq!(n.refused, ["transactions_full"]);
    // Timer B ends the three; then there is room again.
    n.advance(Duration::from_secs(32));
    assert_eq!(n.take(&A).len(), 3);
    n.assert_idle_after_timers();
    n.send(&A, &invite("z9hG4bKcap4", "cap-4"));
    assert_eq!(n.take(&B).len(), 1);
}

#[test]
fn a_refused_register_gives_its_connections_aor_place_back() {
    // A connection may register a few AORs (set_max_aors_per_flow); a REGISTER the
    // registrar refused (423, a bad Contact) used to keep its place, so a UA whose first
    // tries failed could no longer register at all over that connection.
    let mut n = Net::new();
    n.proxy.set_max_aors_per_flow(2);
    let reg = |user: &str, expires: u32, cseq: u32| {
        format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKslot{user}{cseq}\r\nTo: <sip:{user}@example.com>\r\nFrom: <sip:{user}@example.com>;tag=r\r\nCall-ID: slot-{user}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:{user}@10.0.0.1:5061;transport=tls>\r\nExpires: {expires}\r\nContent-Length: 0\r\n\r\n"
        )
    };
    for (i, user) in ["u1", "u2", "u3"].into_iter().enumerate() {
        n.send(&A, reg(user, 1, i as u32 + 1).as_bytes());
        assert_eq!(status(&n.one(&A)), 423, "{user}: interval too brief");
    }
    for (i, user) in ["u1", "u2"].into_iter().enumerate() {
        n.send(&A, reg(user, 600, i as u32 + 10).as_bytes());
        assert_eq!(status(&n.one(&A)), 200, "{user}");
    }
    n.send(&A, reg("u3", 600, 20).as_bytes());
    assert_eq!(status(&n.one(&A)), 403, "the limit still holds");
    // An AOR unregistered gives its place back too (before, only a closed connection did):
    // a connection can serve one AOR after another.
    n.send(&A, reg("u1", 0, 30).as_bytes());
    assert_eq!(status(&n.one(&A)), 200, "u1 unregistered");
    n.send(&A, reg("u3", 600, 31).as_bytes());
    assert_eq!(status(&n.one(&A)), 200, "u3 takes u1's place");
    n.send(&A, reg("u1", 600, 32).as_bytes());
    assert_eq!(status(&n.one(&A)), 403, "and the limit holds with it");
}

#[test]
fn a_register_never_answered_gives_its_connections_aor_place_back() {
    // A REGISTER whose AOR's shard never answers is answered 503 after 64·T1; the place it
    // took among its connection's AORs stayed taken (a refused one gave it back), so after
    // a stall the connection could register no new AOR until it reconnected.
    let mut n = Net::new();
    n.proxy.set_max_aors_per_flow(1);
    let reg = |user: &str| {
        format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKlost{user}\r\nTo: <sip:{user}@example.com>\r\nFrom: <sip:{user}@example.com>;tag=r\r\nCall-ID: lost-{user}\r\nCSeq: 1 REGISTER\r\nContact: <sip:{user}@10.0.0.1:5061;transport=tls>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
        )
    };
    n.lost_registers = true;
    n.send(&A, reg("u1").as_bytes());
    assert!(n.take(&A).is_empty());
    n.advance(Duration::from_secs(33));
    assert_eq!(status(&n.one(&A)), 503);
    n.lost_registers = false;
    n.send(&A, reg("u2").as_bytes());
    assert_eq!(status(&n.one(&A)), 200, "u1's place was given back");
}

#[test]
fn removals_sent_to_another_node_are_counted_in_the_tables_bytes() {
    // The removal-only REGISTER sent to a node is a client transaction like any other: its
    // bytes count while it waits (they were taken off at its end without ever being
    // added, so the total drifted below what the table held and the byte bound slackened).
    let mut n = with_node_c();
    let node = Flow::Peer("node-c".into());
    let register = b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKrm1\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:bob@example.com>;tag=r\r\nCall-ID: rm-1\r\nCSeq: 9 REGISTER\r\nContact: *\r\nExpires: 0\r\nContent-Length: 0\r\n\r\n";
    assert!(n.proxy.send_removals(n.now, "node-c", register));
    n.pump();
    let sent = n.one(&node);
    assert_eq!(method(&sent), "REGISTER");
    assert!(
        n.proxy.transaction_bytes() >= sent.len(),
        "{}",
        n.proxy.transaction_bytes()
    );
    n.send(&node, &answer(&sent, 200, "OK", "n1"));
    assert_eq!(n.proxy.transaction_bytes(), 0);
}

#[test]
fn one_client_connection_cannot_take_the_whole_table() {
    // A user whose device rings forever (a 180 every few minutes restarts Timer C) held
    // every transaction of the shard; now a client connection has its share of new work.
    let mut n = Net::new();
    n.proxy.set_max_transactions(40);
    n.proxy.set_max_transactions_per_flow(3);
    // One call up (its INVITE transaction waits out Timer L: it counts), two ringing.
    let rr = answered(&mut n, "z9hG4bKpfd", "pf-d");
    n.advance(Duration::from_millis(1));
    for i in 0..2 {
        n.send(&A, &invite(&format!("z9hG4bKpf{i}"), &format!("pf-{i}")));
    }
    assert_eq!(n.take(&B).len(), 2);
    n.take(&A);
    n.send(&A, &invite("z9hG4bKpf3", "pf-3"));
    let r = n.one(&A);
    assert_eq!(status(&r), 503, "{}", String::from_utf8_lossy(&r));
    assert_eq!(n.refused, ["transactions_per_connection"]);
    assert!(n.take(&B).is_empty());
    // What ends a dialog (a PBX trunk hanging up its calls) passes, as at the door.
    let bye = format!(
        "BYE sip:bob@10.0.0.2:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKpfbye\r\nMax-Forwards: 70\r\nRoute: {}\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>;tag=b1\r\nCall-ID: pf-d\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(&rr)
    );
    // Other requests inside a dialog count like new ones: one account with one dialog
    // pipelining re-INVITEs or INFOs on its route held the whole table.
    let info = bye
        .replace("BYE sip:", "INFO sip:")
        .replace("CSeq: 2 BYE", "CSeq: 3 INFO")
        .replace("z9hG4bKpfbye", "z9hG4bKpfinfo");
    n.send(&A, info.as_bytes());
    assert_eq!(
        status(&n.one(&A)),
        503,
        "an INFO past the connection's share"
    );
    assert!(n.take(&B).is_empty());
    // A re-INVITE past the share: a stateless 503 (it keeps the dialog's To-tag), and its
    // ACK — hop by hop, for our 503 — ends here; it went on to the callee, which never saw
    // that INVITE.
    let reinvite = bye
        .replace("BYE sip:", "INVITE sip:")
        .replace("CSeq: 2 BYE", "CSeq: 4 INVITE")
        .replace("z9hG4bKpfbye", "z9hG4bKpfre");
    n.send(&A, reinvite.as_bytes());
    assert_eq!(status(&n.one(&A)), 503, "a re-INVITE past the share");
    let ack = reinvite
        .replace("INVITE sip:", "ACK sip:")
        .replace("CSeq: 4 INVITE", "CSeq: 4 ACK");
    n.send(&A, ack.as_bytes());
    assert!(n.take(&B).is_empty(), "the 503's ACK reached the callee");
    // The dialog's own ACKs still go through (another branch: a 2xx ACK).
    n.send(&A, ack.replace("z9hG4bKpfre", "z9hG4bKpfack").as_bytes());
    assert_eq!(method(&n.one(&B)), "ACK");
    n.refused.clear();
    n.send(&A, bye.as_bytes());
    assert_eq!(method(&n.one(&B)), "BYE");
    // Another connection is served, and A's CANCEL still passes.
    let c = Flow::Conn(9);
    n.send(&c, &invite("z9hG4bKpfc", "pf-c"));
    assert_eq!(n.take(&B).len(), 1);
    n.send(&A, &cancel_of("pf-0").replace_branch("z9hG4bKpf0"));
    assert_eq!(status(&n.one(&A)), 200);
    assert!(n.refused.is_empty(), "{:?}", n.refused);
}

#[test]
fn the_transactions_bytes_are_bounded_too() {
    // Counted only by number, ringing INVITEs of up to `max_message` each (kept here, a
    // copy sent on each branch) held gigabytes. Past the byte bound new requests get 503.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.proxy.set_max_transaction_bytes(60_000);
    let body = "v=0\r\n".to_string() + &"a=x\r\n".repeat(2000);
    let big = |branch: &str, call: &str| {
        String::from_utf8(invite(branch, call))
            .unwrap()
            .replacen(
                "Content-Length: 4\r\n\r\nv=0\n",
                &format!("Content-Length: {}\r\n\r\n{body}", body.len()),
                1,
            )
            .into_bytes()
    };
    let mut ringing = Vec::new();
    let mut refused = 0;
    for i in 0..8 {
        n.send(
            &Flow::Conn(50 + i),
            &big(&format!("z9hG4bKtb{i}"), &format!("tb-{i}")),
        );
        let answers: Vec<u16> = n
            .take(&Flow::Conn(50 + i))
            .iter()
            .map(|m| status(m))
            .collect();
        if answers.contains(&503) {
            refused += 1;
        } else {
            ringing.push(n.one(&B));
        }
    }
    assert!(
        n.proxy.transaction_bytes() <= 60_000,
        "{}",
        n.proxy.transaction_bytes()
    );
    assert!(
        refused > 0 && !ringing.is_empty(),
        "{refused} refused, {} ringing",
        ringing.len()
    );
    assert_eq!(
        n.refused
            .iter()
            .filter(|l| **l == "transactions_full")
            .count(),
        refused
    );
    // The calls end: their bytes are given back, and the next call goes through.
    for f in &ringing {
        n.send(&B, &answer(f, 486, "Busy Here", "b"));
    }
    n.take(&B);
    n.advance(Duration::from_secs(1));
    n.send(&Flow::Conn(70), &big("z9hG4bKtb9", "tb-9"));
    n.take(&Flow::Conn(70));
    assert_eq!(method(&n.one(&B)), "INVITE");
}

#[test]
fn a_closing_flow_touches_only_its_own_transactions() {
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.register("carol", &B2, "10.0.0.3:5061");
    // Many calls to bob from many callers, one call to carol.
    for i in 0..200u64 {
        let caller = Flow::Conn(100 + i);
        n.send(
            &caller,
            &invite(&format!("z9hG4bKm{i}"), &format!("many-{i}")),
        );
        n.take(&caller);
    }
    let to_bob = n.take(&B);
    assert_eq!(to_bob.len(), 200);
    let carol = invite("z9hG4bKc1", "carol-1");
    let carol = String::from_utf8_lossy(&carol).replace("sip:bob@", "sip:carol@");
    n.send(&A, carol.as_bytes());
    n.take(&A);
    let fwd = n.one(&B2);
    n.send(&B2, &answer(&fwd, 180, "Ringing", "c1"));
    n.take(&A);
    // Carol's connection dies: her caller gets 480 (she is unreachable), bob's 200 callers
    // nothing.
    n.proxy.handle_flow_closed(n.now, &B2);
    n.pump();
    assert_eq!(status(&n.one(&A)), 480);
    assert!(n.inbox.is_empty(), "{:?}", n.inbox.len());
    assert_eq!(n.proxy.in_progress(), 200, "bob's calls still ring");
    // Bob answers every call, one after another on the same connection: the connection's
    // index of transactions stays bounded by what is live, not by what it ever carried.
    for (i, f) in to_bob.iter().enumerate() {
        n.send(&B, &answer(f, 486, "Busy Here", "b"));
        n.take(&B);
        n.take(&Flow::Conn(100 + i as u64));
        n.advance(Duration::from_millis(1));
        assert!(
            n.proxy.indexed(&B) <= (2 * (199 - i)).max(16),
            "{} entries for {} live transactions",
            n.proxy.indexed(&B),
            199 - i
        );
    }
    n.assert_idle_after_timers();
    // Bob's connection closing now has nothing to fail.
    n.proxy.handle_flow_closed(n.now, &B);
    n.pump();
    assert!(n.inbox.is_empty());
    assert_eq!(n.proxy.indexed(&B), 0);
}

#[test]
fn an_overloaded_shard_sheds_new_work_and_finishes_what_it_admitted() {
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKa1", "call-ov"));
    n.take(&A);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    assert_eq!(status(&n.one(&A)), 180);
    let before = n.proxy.load();
    n.proxy.set_overloaded(true);
    // New work: a second call, a MESSAGE, a REGISTER — 503 with Retry-After, no state, no
    // lookup, nothing forwarded.
    n.send(&A, &invite("z9hG4bKa2", "call-ov2"));
    let r = n.one(&A);
    assert_eq!(status(&r), 503);
    let text = String::from_utf8_lossy(&r).into_owned();
    let retry: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((2..=9).contains(&retry), "{retry}");
    n.send(&A, &message("z9hG4bKov3", "ov3"));
    assert_eq!(status(&n.one(&A)), 503);
    n.send(&B2, b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.3:5061;branch=z9hG4bKov4\r\nTo: <sip:carol@example.com>\r\nFrom: <sip:carol@example.com>;tag=r\r\nCall-ID: ov4\r\nCSeq: 1 REGISTER\r\nContact: <sip:carol@10.0.0.3:5061;transport=tls>\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status(&n.one(&B2)), 503);
    // A To-tag does not make a request part of a dialog: only our signed route does.
    let tagged = String::from_utf8(invite("z9hG4bKov6", "ov6"))
        .unwrap()
        .replace(
            "To: <sip:bob@example.com>",
            "To: <sip:bob@example.com>;tag=x",
        );
    n.send(&A, tagged.as_bytes());
    assert_eq!(status(&n.one(&A)), 503);
    n.send(&B2, b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.3:5061;branch=z9hG4bKov7\r\nTo: <sip:carol@example.com>;tag=x\r\nFrom: <sip:carol@example.com>;tag=r\r\nCall-ID: ov7\r\nCSeq: 1 REGISTER\r\nContact: <sip:carol@10.0.0.3:5061;transport=tls>\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status(&n.one(&B2)), 503);
    assert!(n.take(&B).is_empty());
    assert_eq!(n.proxy.load(), before, "shed requests hold no state");
    assert_eq!(n.proxy.stats().shed, 5);
    // What was admitted finishes: the callee answers, the caller ACKs and hangs up.
    n.send(&B, &answer(&fwd, 200, "OK", "b1"));
    let ok = n.one(&A);
    assert_eq!(status(&ok), 200);
    let route = record_route(&fwd);
    n.send(
        &A,
        &ack_2xx(
            "sip:callee@10.0.0.2;transport=tls",
            &route,
            "b1",
            "10.0.0.1:5061;branch=z9hG4bKack",
            "call-ov",
        ),
    );
    assert_eq!(method(&n.one(&B)), "ACK", "an ACK passes while overloaded");
    let bye = format!(
        "BYE sip:callee@10.0.0.2;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKbye\r\nMax-Forwards: 70\r\nRoute: {}\r\nTo: <sip:bob@example.com>;tag=b1\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: call-ov\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(&route)
    );
    n.send(&A, bye.as_bytes());
    let b = n.one(&B);
    assert_eq!(
        method(&b),
        "BYE",
        "an in-dialog request passes while overloaded"
    );
    n.send(&B, &answer(&b, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&A)), 200);
    // Caught up: new work is admitted again.
    n.proxy.set_overloaded(false);
    n.send(&A, &invite("z9hG4bKa5", "call-ov5"));
    n.take(&A);
    assert_eq!(method(&n.one(&B)), "INVITE");
}

#[test]
fn what_a_connection_has_to_lose_decides_whether_a_full_budget_may_take_its_place() {
    // The driver closes an anonymous connection for a new one when its budget is full: only
    // one on which nothing authenticated or registered, with nothing in progress.
    use sipring_core::stateful::Standing;
    // Calls from outside come in unauthenticated (INVITE is not challenged here).
    let mut n = Net::with_policy(Policy::new(
        sipring_core::policy::PolicyConfig {
            authenticate: true,
            challenge: vec!["REGISTER".into(), "MESSAGE".into()],
            ..Default::default()
        },
        sipring_core::auth::NodeKey::new([0; 32]),
        Instant::now(),
        std::rc::Rc::new(sipring_core::policy::NoSubscribers),
    ));
    assert_eq!(n.proxy.standing(&A), Standing::Anonymous);
    // bob registers (his certificate): known.
    certify(&mut n, &B, "bob");
    n.register("bob", &B, "10.0.0.2:5061");
    assert_eq!(n.proxy.standing(&B), Standing::Known);
    // An outside caller, unauthenticated and allowed so (From is not ours, the target is
    // local), is busy while the call rings, and anonymous again once it is answered.
    let outside = String::from_utf8(invite("z9hG4bKst1", "call-st"))
        .unwrap()
        .replace("sip:alice@example.com", "sip:x@elsewhere.example");
    n.send(&A, outside.as_bytes());
    n.take(&A);
    let fwd = n.one(&B);
    assert_eq!(n.proxy.standing(&A), Standing::Busy);
    n.send(&B, &answer(&fwd, 486, "Busy Here", "b1"));
    assert_eq!(status(&n.one(&A)), 486);
    assert_eq!(n.proxy.standing(&A), Standing::Anonymous);
    // Its next call is answered: its connection carries the dialog (bob's BYE comes back
    // over it), and keeps its place.
    n.send(
        &A,
        outside
            .replace("z9hG4bKst1", "z9hG4bKst4")
            .replace("call-st", "call-st4")
            .as_bytes(),
    );
    n.take(&A);
    let fwd = n.take(&B).pop().unwrap();
    n.send(&B, &answer(&fwd, 200, "OK", "b2"));
    assert_eq!(status(&n.one(&A)), 200);
    assert_eq!(n.proxy.standing(&A), Standing::Known);
    let a = Flow::Conn(9);
    // A client whose request authenticated keeps its place from then on.
    certify(&mut n, &C, "alice");
    assert_eq!(n.proxy.standing(&C), Standing::Anonymous);
    n.send(&C, &message("z9hG4bKst2", "st2"));
    let at_bob = n.take(&B);
    assert_eq!(method(at_bob.last().unwrap()), "MESSAGE");
    assert_eq!(n.proxy.standing(&C), Standing::Known);
    // One whose request was challenged has proven nothing.
    n.send(&a, &message("z9hG4bKst3", "st3"));
    assert_eq!(status(&n.one(&a)), 407);
    assert_eq!(n.proxy.standing(&a), Standing::Anonymous);
    // Closed: forgotten.
    n.proxy.handle_flow_closed(n.now, &C);
    assert_eq!(n.proxy.standing(&C), Standing::Anonymous);
    // A partner's connection is always known.
    let (_, mut n) = carrier_net();
    let conn = carrier_conn(&mut n);
    assert_eq!(n.proxy.standing(&conn), Standing::Known);
}

#[test]
fn a_connection_going_away_refuses_its_clients_new_requests_but_not_a_partners() {
    // A connection whose TLS key is spent ends once what is in progress on it either way is
    // answered; meanwhile a client's new requests on it get 503 with Retry-After (it sends
    // them on another connection), counted apart from a node's drain.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKgo1", "call-go"));
    n.take(&A);
    let fwd = n.one(&B);
    // The call rings at bob: in progress on A (its INVITE), what the connection waits for.
    assert_eq!(n.proxy.in_progress_on(&A), 1);
    n.proxy.set_flow_draining(&A);
    n.send(&A, &message("z9hG4bKgo2", "go2"));
    let r = String::from_utf8(n.one(&A)).unwrap();
    assert!(
        r.starts_with("SIP/2.0 503 ") && r.contains("\r\nRetry-After: "),
        "{r}"
    );
    // Another connection's request passes; the call in progress finishes.
    n.send(&C, &message("z9hG4bKgo3", "go3"));
    assert_eq!(method(&n.one(&B)), "MESSAGE");
    let st = n.proxy.stats();
    assert_eq!((st.flow_drained, st.drained), (1, 0));
    n.send(&B, &answer(&fwd, 486, "Busy Here", "b1"));
    assert_eq!(status(&n.one(&A)), 486);
    assert_eq!(n.proxy.in_progress_on(&A), 0);
    // A partner's connection is not refused: a 503 reads to an SBC as "down", and what it
    // has in progress is answered over our link to it once its connection closes.
    let (_, mut n) = carrier_net();
    let conn = carrier_conn(&mut n);
    n.register("bob", &B, "10.0.0.2:5061");
    n.proxy.set_flow_draining(&conn);
    let msg = "MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS sip.carrier.example;branch=z9hG4bKgo4\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:x@carrier.example>;tag=1\r\nCall-ID: go-4\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n";
    n.send(&conn, msg.as_bytes());
    assert_eq!(method(&n.one(&B)), "MESSAGE");
    assert!(n.take(&conn).is_empty());
}

#[test]
fn a_draining_node_refuses_new_work_and_finishes_its_calls() {
    // SIGTERM: new requests get 503 with Retry-After at the door (their senders try another
    // server), whoever sends them; the call in progress is answered, ACKed and hung up.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKdr1", "call-dr"));
    n.take(&A);
    let fwd = n.one(&B);
    n.proxy.set_draining();
    n.send(&A, &message("z9hG4bKdr2", "dr2"));
    let r = String::from_utf8(n.one(&A)).unwrap();
    assert!(
        r.starts_with("SIP/2.0 503 ") && r.contains("\r\nRetry-After: "),
        "{r}"
    );
    n.send(&B2, b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.3:5061;branch=z9hG4bKdr3\r\nTo: <sip:carol@example.com>\r\nFrom: <sip:carol@example.com>;tag=r\r\nCall-ID: dr3\r\nCSeq: 1 REGISTER\r\nContact: <sip:carol@10.0.0.3:5061;transport=tls>\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status(&n.one(&B2)), 503);
    assert!(n.take(&B).is_empty(), "nothing new forwarded");
    assert_eq!(n.proxy.stats().drained, 2);
    n.send(&B, &answer(&fwd, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&A)), 200);
    let route = record_route(&fwd);
    n.send(
        &A,
        &ack_2xx(
            "sip:callee@10.0.0.2;transport=tls",
            &route,
            "b1",
            "10.0.0.1:5061;branch=z9hG4bKdrack",
            "call-dr",
        ),
    );
    assert_eq!(method(&n.one(&B)), "ACK");
    let bye = format!(
        "BYE sip:callee@10.0.0.2;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKdrbye\r\nMax-Forwards: 70\r\nRoute: {}\r\nTo: <sip:bob@example.com>;tag=b1\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: call-dr\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(&route)
    );
    n.send(&A, bye.as_bytes());
    let b = n.one(&B);
    assert_eq!(method(&b), "BYE");
    n.send(&B, &answer(&b, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&A)), 200);
    n.assert_idle_after_timers();
}

#[test]
fn the_ack_of_an_invite_with_a_to_tag_refused_at_the_door_ends_here() {
    // An INVITE with a To-tag that no route of ours sends anywhere (here: to the carrier by
    // its Request-URI) is new work: refused 503 while the node drains, without a
    // transaction. Only the table-full refusal remembered it, so its ACK went on to the
    // carrier, which never saw the INVITE.
    let (carrier, mut n) = carrier_net();
    n.proxy.set_draining();
    let req = |m: &str, cseq: &str| {
        format!(
            "{m} sip:x@carrier.example SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKst1\r\nMax-Forwards: 70\r\nTo: <sip:x@carrier.example>;tag=c9\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: st1\r\nCSeq: 1 {cseq}\r\nContact: <sip:alice@10.0.0.1:5061;transport=tls>\r\nContent-Length: 0\r\n\r\n"
        )
    };
    n.send(&A, req("INVITE", "INVITE").as_bytes());
    assert_eq!(status(&n.one(&A)), 503);
    n.send(&A, req("ACK", "ACK").as_bytes());
    assert!(
        n.take(&carrier).is_empty(),
        "the ACK of a refused INVITE went on"
    );
}

#[test]
fn a_draining_node_passes_a_dialog_request_from_a_reconnected_ua_to_a_partner() {
    // alice called the carrier, then her phone reconnected (new connection): her BYE follows
    // our signed route, whose token falls back to the carrier's link (ToPeer). It is inside
    // a dialog; the drain (and the overload door) let it through.
    let (carrier, mut n) = carrier_net();
    let inv = "INVITE sip:x@carrier.example SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKdp1\r\nMax-Forwards: 70\r\nTo: <sip:x@carrier.example>\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: drain-peer\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@10.0.0.1:5061;transport=tls>\r\nContent-Length: 0\r\n\r\n";
    n.send(&A, inv.as_bytes());
    n.take(&A);
    let fwd = n.one(&carrier);
    let route = record_route(&fwd);
    n.send(&carrier, &answer(&fwd, 200, "OK", "c1"));
    assert_eq!(status(&n.one(&A)), 200);
    n.proxy.set_draining();
    let bye = format!(
        "BYE sip:x@192.0.2.7 SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.3:5061;branch=z9hG4bKdp2\r\nMax-Forwards: 70\r\nRoute: {}\r\nTo: <sip:x@carrier.example>;tag=c1\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: drain-peer\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        String::from_utf8_lossy(&route)
    );
    n.send(&B2, bye.as_bytes());
    let got = n.take(&carrier);
    assert_eq!(got.len(), 1, "the BYE reaches the carrier");
    assert_eq!(method(&got[0]), "BYE");
    assert_eq!(n.proxy.stats().drained, 0);
}

#[test]
fn what_went_out_on_a_replaced_partner_link_is_awaited_then_failed_alone() {
    // A partner link whose TLS key is spent is replaced; the driver keeps the old one for
    // the answers to what went out on it (`unanswered_on`), drops those answered
    // (`retain_unanswered`), and fails the rest when it finally closes (`fail_unanswered`):
    // 503 from the link, 500 upstream — and nothing sent since, over the new link.
    let (carrier, mut n) = carrier_net();
    let inv = |b: &str, call: &str| {
        format!(
            "INVITE sip:x@carrier.example SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch={b}\r\nMax-Forwards: 70\r\nTo: <sip:x@carrier.example>\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: {call}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@10.0.0.1:5061;transport=tls>\r\nContent-Length: 0\r\n\r\n"
        )
    };
    n.send(&A, inv("z9hG4bKrl1", "rl1").as_bytes());
    n.send(&A, inv("z9hG4bKrl2", "rl2").as_bytes());
    n.take(&A);
    let sent = n.take(&carrier);
    assert_eq!(sent.len(), 2);
    // Both out on the old link, unanswered; the link is replaced now.
    let mut unanswered = n.proxy.unanswered_on(&carrier);
    assert_eq!(unanswered.len(), 2);
    // A third goes out over the new link.
    n.send(&A, inv("z9hG4bKrl3", "rl3").as_bytes());
    n.take(&A);
    let third = n.one(&carrier);
    // The first is answered over the old link.
    n.send(&carrier, &answer(&sent[0], 486, "Busy Here", "c1"));
    assert_eq!(status(&n.one(&A)), 486);
    n.proxy.retain_unanswered(&mut unanswered);
    assert_eq!(unanswered.len(), 1);
    // The old link closes with the second unanswered: it alone fails.
    n.proxy.fail_unanswered(n.now, &carrier, &unanswered);
    n.pump();
    let up = n.take(&A);
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(status(&up[0]), 500);
    assert_eq!(
        sipring_tests::ua::header(&up[0], "Call-ID").as_deref(),
        Some("rl2")
    );
    n.proxy.retain_unanswered(&mut unanswered);
    assert!(unanswered.is_empty());
    // The third still waits for its answer, and gets it.
    n.send(&carrier, &answer(&third, 200, "OK", "c3"));
    assert_eq!(status(&n.one(&A)), 200);
}

#[test]
fn what_forwarding_adds_never_gets_a_connection_closed() {
    // A request at the header limit, forwarded with our Via on top, was one line past it:
    // the next hop (another node of ours) refused it and closed the link it came over; and
    // a callee's answer copies the Vias (RFC 3261 §8.2.6.2) and adds its own lines, so the
    // answer to a request just under the limit was over it here: the callee's connection
    // was closed and the answer lost. Any caller could have a user's connection cut.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    let msg = |vias: usize, call: &str| {
        let vias: String = (0..vias)
            .map(|i| format!("Via: SIP/2.0/TLS h{i}.example.net;branch=z9hG4bK{call}{i}\r\n"))
            .collect();
        format!(
            "MESSAGE sip:bob@example.com SIP/2.0\r\n{vias}Max-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: {call}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let limits = Limits::default();
    let headers = |m: &[u8]| {
        let head = &m[..m.windows(4).position(|w| w == b"\r\n\r\n").unwrap()];
        head.split(|&b| b == b'\n').count() - 1
    };
    // 57 Vias and 6 more: 64 once forwarded, within the limits.
    n.send(&A, msg(57, "big1").as_bytes());
    let fwd = n.one(&B);
    assert_eq!(headers(&fwd), limits.max_headers);
    // Bob's answer: every Via, and a few lines of his own.
    let mut ok = answer(&fwd, 200, "OK", "b1");
    let at = ok
        .windows(16)
        .position(|w| w == b"Content-Length: ")
        .unwrap();
    ok.splice(
        at..at,
        b"Server: phone/1.0\r\nAllow: INVITE, ACK, BYE, CANCEL, MESSAGE\r\nSupported: outbound\r\n"
            .iter()
            .copied(),
    );
    assert!(headers(&ok) > limits.max_headers);
    n.send(&B, &ok);
    assert!(n.closed.is_empty(), "closed: {:?}", n.closed);
    let up = n.take(&A);
    assert_eq!(up.len(), 1, "the answer reaches alice");
    assert!(
        up[0].starts_with(b"SIP/2.0 200 "),
        "{}",
        String::from_utf8_lossy(&up[0])
    );
    // 58 Vias and 6 more: at the header limit as sent, past it once forwarded: forwarded
    // (a reader that refuses it answers so, and keeps the connection).
    n.send(&A, msg(58, "big2").as_bytes());
    assert!(headers(&n.one(&B)) > limits.max_headers);
    // Within `max_message` as sent, past it once forwarded: the next hop could not delimit
    // it (and closed the connection). 513, nothing sent.
    let body_len = limits.max_message - msg(1, "big4").len() - 40;
    let near = msg(1, "big4").replace(
        "Content-Length: 0\r\n\r\n",
        &format!(
            "Content-Type: text/plain\r\nContent-Length: {body_len}\r\n\r\n{}",
            "x".repeat(body_len)
        ),
    );
    assert!(near.len() <= limits.max_message);
    n.send(&A, near.as_bytes());
    let up = n.take(&A);
    assert_eq!(up.len(), 1);
    assert!(
        up[0].starts_with(b"SIP/2.0 513 "),
        "{}",
        String::from_utf8_lossy(&up[0])
    );
    assert!(n.take(&B).is_empty());
    // Past the limit as sent: refused, and the connection stays (the framer delimited it).
    n.send(&A, msg(60, "big3").as_bytes());
    let up = n.take(&A);
    assert_eq!(up.len(), 1);
    assert!(
        up[0].starts_with(b"SIP/2.0 513 "),
        "{}",
        String::from_utf8_lossy(&up[0])
    );
    assert!(n.closed.is_empty(), "closed: {:?}", n.closed);
}

#[test]
fn partial_admission_spreads_what_it_admits_evenly() {
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.proxy.set_admission(0.25);
    let mut admitted = Vec::new();
    for i in 0..40 {
        n.send(&A, &message(&format!("z9hG4bKpa{i}"), &format!("pa{i}")));
        let forwarded = n.take(&B);
        let answered = n.take(&A);
        match (forwarded.len(), answered.len()) {
            (1, 0) => admitted.push(i),
            (0, 1) => assert_eq!(status(&answered[0]), 503),
            other => panic!("request {i}: {other:?}"),
        }
    }
    // One in four, one every fourth request: not a burst of admissions then a burst of 503s.
    assert_eq!(admitted.len(), 10, "{admitted:?}");
    assert!(
        admitted.windows(2).all(|w| w[1] - w[0] == 4),
        "{admitted:?}"
    );
    assert_eq!(n.proxy.stats().shed, 30);
    n.proxy.set_admission(1.0);
    n.send(&A, &message("z9hG4bKpaz", "paz"));
    assert_eq!(n.take(&B).len(), 1, "all admitted again");
}

#[test]
fn another_nodes_removal_passes_an_overloaded_door() {
    // A device moved to another node, which passes the removal on: upkeep, not new work.
    // Shed, it was never sent again, and this node kept routing to the stale flow.
    let mut n = with_node_c();
    let node = Flow::Peer("node-c".into());
    n.register("bob", &B, "10.0.0.2:5061");
    n.proxy.set_admission(0.02);
    let removal = "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS node-c.example.com;branch=z9hG4bKrm1\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:bob@example.com>;tag=rm\r\nCall-ID: rm-1\r\nCSeq: 1 REGISTER\r\nContact: <sip:bob@10.0.0.2:5061;transport=tls>;expires=0\r\nContent-Length: 0\r\n\r\n";
    n.send(&node, removal.as_bytes());
    let r = n.one(&node);
    assert_eq!(status(&r), 200, "{}", first_line(&r));
    assert_eq!(n.proxy.stats().shed, 0);
    // New work from the node is still shed (the door is not open to it).
    n.send(&node, &message("z9hG4bKrm2", "rm-2"));
    assert_eq!(status(&n.one(&node)), 503);
    // The binding went: a call to bob finds nobody.
    n.proxy.set_admission(1.0);
    n.send(&A, &message("z9hG4bKrm3", "rm-3"));
    assert!(n.take(&B).is_empty(), "routed to the removed binding");
}

/// A new MESSAGE from `a` to bob whose Via advertises RFC 7339 overload control.
fn oc_message(i: usize) -> String {
    oc_message_from(i, "example.com")
}

fn oc_message_from(i: usize, domain: &str) -> String {
    format!(
        "MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKoc{i};oc;oc-algo=\"loss\"\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:a@{domain}>;tag=1\r\nCall-ID: oc{i}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
    )
}

/// The overload-control feedback in a response's topmost Via.
fn feedback(resp: &[u8]) -> Option<sipring_core::overload_control::Feedback> {
    let mut h = [Header::EMPTY; 32];
    let Ok(Status::Complete(m)) = parse(resp, &mut h, &Limits::default(), Framing::Stream) else {
        panic!("parse")
    };
    sipring_core::overload_control::Feedback::parse(m.values(HeaderName::Via)[0].value)
}

/// Answers every MESSAGE bob was sent with 200 and returns what reached `a` for them.
fn bob_answers(n: &mut Net) -> Vec<Vec<u8>> {
    for req in n.take(&B) {
        let ok = answer(&req, 200, "OK", "bob");
        n.send(&B, &ok);
    }
    n.take(&A)
}

#[test]
fn a_trusted_client_doing_overload_control_is_told_the_share_to_drop_and_not_shed() {
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.proxy
        .set_overload_control(sipring_core::overload_control::Trust::All);
    n.proxy.set_admission(0.25);
    // Advertising `oc`, trusted: it drops 75 % itself, so all it sends passes the door, and
    // every answer tells it what to drop.
    for i in 0..8 {
        n.send(&A, oc_message(i).as_bytes());
        let answers = bob_answers(&mut n);
        assert_eq!(answers.len(), 1, "request {i}: forwarded and answered");
        assert_eq!(status(&answers[0]), 200);
        let f = feedback(&answers[0]).expect("feedback in the top Via");
        assert_eq!((f.oc, f.validity_ms), (75, 500));
    }
    assert_eq!(n.proxy.stats().shed, 0);
    assert_eq!(n.proxy.stats().oc_feedback, 8);
    let seq = feedback(&{
        n.send(&A, oc_message(100).as_bytes());
        bob_answers(&mut n).remove(0)
    })
    .unwrap()
    .seq;
    // A client on another flow that does not advertise it is still shed at the door.
    let mut shed = 0;
    for i in 0..8 {
        let m = format!(
            "MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.9;branch=z9hG4bKno{i}\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:c@example.com>;tag=1\r\nCall-ID: no{i}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
        );
        n.send(&B2, m.as_bytes());
        for r in n.take(&B2) {
            assert_eq!(status(&r), 503);
            assert_eq!(feedback(&r), None, "no oc in its Via: nothing written");
            shed += 1;
        }
        n.take(&B);
    }
    assert_eq!(shed, 6, "three in four of 8 shed at 25 % admission");
    // Later feedback has a higher sequence number (time since the shards' epoch); caught
    // up, the client hears `oc=0` for one validity period (it stops dropping now, not when
    // its state expires), then nothing.
    n.advance(Duration::from_millis(1));
    n.proxy.set_admission(0.5);
    n.send(&A, oc_message(200).as_bytes());
    let f = feedback(&bob_answers(&mut n)[0]).unwrap();
    assert_eq!(f.oc, 50);
    assert!(f.seq > seq);
    n.proxy.set_admission(1.0);
    n.send(&A, oc_message(201).as_bytes());
    let f = feedback(&bob_answers(&mut n)[0]).unwrap();
    assert_eq!(f.oc, 0);
    n.advance(Duration::from_millis(600));
    n.send(&A, oc_message(202).as_bytes());
    let r = bob_answers(&mut n).remove(0);
    assert_eq!(feedback(&r), None);
    assert!(
        String::from_utf8_lossy(&r).contains(";oc;oc-algo=\"loss\""),
        "the client's own Via comes back as it sent it"
    );
}

#[test]
fn overload_control_from_a_client_that_is_not_trusted_changes_nothing() {
    // The default trusts partners only: a plain client claiming `oc` is shed like any
    // other (three in four at 25 %) and told nothing, so it cannot drop twice or escape.
    let mut n = Net::with_policy(carrier_policy());
    n.register("bob", &B, "10.0.0.2:5061");
    n.proxy.set_admission(0.25);
    let mut shed = 0;
    for i in 0..8 {
        n.send(&A, oc_message(i).as_bytes());
        for r in bob_answers(&mut n) {
            assert_eq!(feedback(&r), None);
            if status(&r) == 503 {
                shed += 1;
            }
        }
    }
    assert_eq!(shed, 6);
    assert_eq!(n.proxy.stats().oc_feedback, 0);
    // The same client once it is a configured partner: honoured.
    n.proxy.set_flow_info(
        A,
        sipring_core::policy::FlowInfo {
            principal: sipring_core::policy::Principal::Partner("carrier".into()),
            ..Default::default()
        },
    );
    for i in 10..14 {
        n.send(&A, oc_message_from(i, "carrier.example").as_bytes());
        let r = bob_answers(&mut n);
        assert_eq!(r.len(), 1);
        assert_eq!(feedback(&r[0]).map(|f| f.oc), Some(75));
    }
    // Off: nobody is honoured, whatever they are.
    n.proxy
        .set_overload_control(sipring_core::overload_control::Trust::Off);
    let mut shed = 0;
    for i in 20..28 {
        n.send(&A, oc_message_from(i, "carrier.example").as_bytes());
        for r in bob_answers(&mut n) {
            assert_eq!(feedback(&r), None);
            shed += usize::from(status(&r) == 503);
        }
    }
    assert_eq!(shed, 6);
}

/// An open policy with one partner, `carrier`, speaking for `carrier.example`.
fn carrier_policy() -> Policy {
    Policy::new(
        sipring_core::policy::PolicyConfig {
            authenticate: false,
            partners: vec![sipring_core::policy::PartnerPolicy {
                name: "carrier".into(),
                domains: vec!["carrier.example".into()],
                relay_to: vec![],
                assert_identity: false,
                numbers: false,
                node: false,
            }],
            ..Default::default()
        },
        sipring_core::auth::NodeKey::new([0; 32]),
        Instant::now(),
        std::rc::Rc::new(sipring_core::policy::NoSubscribers),
    )
}

#[test]
fn a_request_uri_maddr_naming_us_is_stripped_before_it_goes_on() {
    // RFC 3261 §16.4: a Request-URI whose maddr names us is processed without it (and
    // without a port or transport). Forwarded as it came, the carrier's proxy, which honours
    // maddr, sent it straight back to us, round and round until 482.
    let (carrier, mut n) = carrier_net();
    let msg = |ruri: &str, b: &str| {
        format!(
            "MESSAGE {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKmd{b}\r\nMax-Forwards: 70\r\nTo: <sip:x@carrier.example>\r\nFrom: <sip:a@example.com>;tag=1\r\nCall-ID: md{b}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
        )
    };
    n.send(
        &A,
        msg(
            "sip:x@carrier.example;maddr=proxy.example.com;transport=tls;user=phone",
            "1",
        )
        .as_bytes(),
    );
    assert_eq!(
        first_line(&n.one(&carrier)),
        "MESSAGE sip:x@carrier.example;user=phone SIP/2.0"
    );
    // A maddr naming someone else is theirs to honour: it goes on as it came.
    n.send(
        &A,
        msg("sip:x@carrier.example;maddr=192.0.2.50", "2").as_bytes(),
    );
    assert_eq!(
        first_line(&n.one(&carrier)),
        "MESSAGE sip:x@carrier.example;maddr=192.0.2.50 SIP/2.0"
    );
}

/// A proxy with the `carrier` partner routed for `carrier.example`, and its flow.
fn carrier_net() -> (Flow, Net) {
    let n = Net::build(carrier_policy(), |c| {
        c.peers = vec![sipring_core::proxy::PeerRoute {
            domain: "carrier.example".into(),
            peer: "carrier".into(),
        }];
    });
    (Flow::Peer("carrier".into()), n)
}

/// A connection of the `carrier` partner's (from 203.0.113.5) to [`carrier_net`]'s proxy.
fn carrier_conn(n: &mut Net) -> Flow {
    let conn = Flow::Conn(77);
    n.proxy.set_flow_info(
        conn.clone(),
        sipring_core::policy::FlowInfo {
            principal: sipring_core::policy::Principal::Partner("carrier".into()),
            source: Some(([203, 0, 113, 5], 40123).into()),
            iface: None,
        },
    );
    conn
}

#[test]
fn a_partners_via_gets_received_as_a_clients_does() {
    // RFC 3261 §18.2.1: a sent-by that is a name (or another address) gets `received`,
    // whoever sent it. Partners' Vias were passed on as they came (a `received` they wrote
    // included).
    let (_, mut n) = carrier_net();
    let conn = carrier_conn(&mut n);
    n.register("bob", &B, "10.0.0.2:5061");
    let msg = "MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS sip.carrier.example;branch=z9hG4bKpv1;received=198.51.100.1\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:x@carrier.example>;tag=1\r\nCall-ID: pv-1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n";
    n.send(&conn, msg.as_bytes());
    let at_bob = String::from_utf8(n.one(&B)).unwrap();
    assert!(
        at_bob.contains(
            "Via: SIP/2.0/TLS sip.carrier.example;branch=z9hG4bKpv1;received=203.0.113.5\r\n"
        ),
        "{at_bob}"
    );
}

#[test]
fn an_overloaded_partner_is_spared_the_share_it_asked_us_to_drop() {
    // RFC 7339 toward a partner: our Via advertises it, the partner's answer says drop 75 %,
    // and three in four of the next new requests for it are answered 503 here, without a
    // transaction toward it, until the feedback's validity runs out.
    let (carrier, mut n) = carrier_net();
    let to_carrier = |i: usize| {
        format!(
            "MESSAGE sip:x@carrier.example SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKpd{i}\r\nMax-Forwards: 70\r\nTo: <sip:x@carrier.example>\r\nFrom: <sip:a@example.com>;tag=1\r\nCall-ID: pd{i}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
        )
    };
    n.send(&A, to_carrier(0).as_bytes());
    let fwd = n.one(&carrier);
    let via = String::from_utf8_lossy(&fwd)
        .lines()
        .find(|l| l.starts_with("Via: "))
        .unwrap()
        .to_string();
    assert!(
        via.contains("proxy.example.com") && via.ends_with(";oc;oc-algo=\"loss\""),
        "{via}"
    );
    let ok = String::from_utf8(answer(&fwd, 200, "OK", "c"))
        .unwrap()
        .replacen(
            ";oc;oc-algo=\"loss\"",
            ";oc=75;oc-algo=\"loss\";oc-validity=500;oc-seq=1.0",
            1,
        );
    n.send(&carrier, ok.as_bytes());
    let back = n.one(&A);
    assert_eq!(status(&back), 200);
    assert!(
        !String::from_utf8_lossy(&back).contains("oc="),
        "our Via is gone"
    );
    let mut forwarded = 0;
    for i in 1..=8 {
        n.send(&A, to_carrier(i).as_bytes());
        forwarded += n.take(&carrier).len();
        for r in n.take(&A) {
            assert_eq!(status(&r), 503);
            assert!(
                sipring_tests::ua::header(&r, "Retry-After").is_none(),
                "not 'we are unavailable': only this partner asked"
            );
        }
    }
    assert_eq!(forwarded, 2, "one in four of eight");
    assert_eq!(n.proxy.stats().oc_dropped, 6);
    // In-dialog requests finish what was admitted: never dropped.
    for i in 10..18 {
        let m = to_carrier(i).replace(
            "To: <sip:x@carrier.example>",
            "To: <sip:x@carrier.example>;tag=c",
        );
        n.send(&A, m.as_bytes());
        assert_eq!(n.take(&carrier).len(), 1, "in-dialog request {i}");
    }
    // The validity (500 ms) ran out: everything goes to the partner again.
    n.advance(Duration::from_millis(600));
    for i in 20..24 {
        n.send(&A, to_carrier(i).as_bytes());
        assert_eq!(n.take(&carrier).len(), 1);
    }
    // With overload control off, nothing is advertised and feedback is ignored.
    n.proxy
        .set_overload_control(sipring_core::overload_control::Trust::Off);
    n.send(&A, to_carrier(30).as_bytes());
    let fwd = n.one(&carrier);
    assert!(!String::from_utf8_lossy(&fwd).contains(";oc"));
    let ok = String::from_utf8(answer(&fwd, 200, "OK", "c"))
        .unwrap()
        .replacen(
            ";branch=z9hG4bKsr",
            ";oc=100;oc-validity=500;oc-seq=9.0;branch=z9hG4bKsr",
            1,
        );
    assert!(ok.contains("oc=100"));
    n.send(&carrier, ok.as_bytes());
    assert_eq!(status(&n.one(&A)), 200);
    for i in 31..35 {
        n.send(&A, to_carrier(i).as_bytes());
        assert_eq!(n.take(&carrier).len(), 1, "request {i} forwarded");
    }
}

#[test]
fn feedback_a_downstream_ua_writes_into_an_upstreams_via_does_not_reach_it() {
    // Bob answers with `oc=100` forged into the Via of the upstream (a cooperating partner
    // or cluster node, which would then stop sending to us): we forward the answer with the
    // forgery taken out, the upstream's own `oc` kept.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.proxy
        .set_overload_control(sipring_core::overload_control::Trust::All);
    n.send(&A, oc_message(1).as_bytes());
    let req = n.one(&B);
    let forged = String::from_utf8(answer(&req, 200, "OK", "bob"))
        .unwrap()
        .replacen(
            ";oc;oc-algo=\"loss\"",
            ";oc=100;oc-algo=\"loss\";oc-validity=4294967295;oc-seq=999999999999.99999",
            1,
        );
    assert!(forged.contains("oc=100"));
    n.send(&B, forged.as_bytes());
    let back = n.one(&A);
    assert_eq!(status(&back), 200);
    let via = sipring_tests::ua::header(&back, "Via").unwrap();
    assert_eq!(
        via,
        "SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKoc1;oc;oc-algo=\"loss\""
    );
}

#[test]
fn a_request_accepted_at_the_header_limit_is_still_cancelled_after_forwarding_grew_it() {
    // 64 header lines (the limit) and no Max-Forwards: forwarding adds Via, Max-Forwards and
    // Record-Route, 67 lines. Before, the kept copy could not be re-read: the CANCEL was
    // answered 200 upstream and never sent to bob, and bob's 487 was never ACKed.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    let head = "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKa1\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: call-big\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@10.0.0.1:5061;transport=tls>\r\nContent-Length: 0\r\n";
    let pad: String = (0..64 - 7).map(|i| format!("X-Pad-{i}: {i}\r\n")).collect();
    let inv = format!("{head}{pad}\r\n");
    with_msg(inv.as_bytes(), |m, _| assert_eq!(m.headers().len(), 64));
    n.send(&A, inv.as_bytes());
    assert_eq!(status(&n.one(&A)), 100);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    assert_eq!(status(&n.one(&A)), 180);
    n.send(&A, &cancel_of("call-big"));
    assert_eq!(status(&n.one(&A)), 200);
    let c = n.one(&B);
    assert_eq!(method(&c), "CANCEL");
    n.send(&B, &answer(&c, 200, "OK", "b1"));
    n.send(&B, &answer(&fwd, 487, "Request Terminated", "b1"));
    assert_eq!(method(&n.one(&B)), "ACK", "bob's 487 is ACKed");
    assert_eq!(status(&n.one(&A)), 487);
    n.assert_idle_after_timers();
}

#[test]
fn cancel_only_from_the_invites_connection_and_answered_after_the_final() {
    let mut n = Net::new();
    let fwd = ringing(&mut n, "call-c");
    let cancel = &cancel_of("call-c");
    // Bob's other device (or anyone who saw alice's Via) sends her CANCEL on its own
    // connection: 481, and the call goes on (before: 200, and every branch cancelled).
    n.send(&B2, cancel);
    assert_eq!(status(&n.one(&B2)), 481);
    assert!(n.take(&B).is_empty(), "no CANCEL went to bob");
    // Bob answers; alice's CANCEL crosses the 200: answered 200 (was 481), nothing else.
    n.send(&B, &answer(&fwd, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&A)), 200);
    n.send(&A, cancel);
    assert_eq!(status(&n.one(&A)), 200);
    assert!(n.take(&B).is_empty(), "nothing to cancel after the answer");
    n.assert_idle_after_timers();
}

#[test]
fn what_an_answer_asserts_is_checked_like_what_a_request_asserts() {
    // RFC 3325 on responses: a local UA's P-Asserted-Identity never leaves (a partner trusts
    // what we pass as ours); a partner's passes only inside its domains. Before, responses
    // went through untouched both ways.
    let (carrier, mut n) = carrier_net();
    n.register("bob", &B, "10.0.0.2:5061");
    let with_pai = |resp: Vec<u8>, pai: &str| {
        String::from_utf8(resp)
            .unwrap()
            .replacen(
                "\r\n\r\n",
                &format!("\r\nP-Asserted-Identity: {pai}\r\nP-Preferred-Identity: {pai}\r\n\r\n"),
                1,
            )
            .into_bytes()
    };
    let pai_of = |m: &[u8]| sipring_tests::ua::header(m, "P-Asserted-Identity");
    // The carrier calls bob; bob's 200 claims to be the CEO: the carrier does not see it.
    let from_carrier = "MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 192.0.2.7;branch=z9hG4bKc1\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:x@carrier.example>;tag=1\r\nCall-ID: r1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n";
    n.send(&carrier, from_carrier.as_bytes());
    let fwd = n.one(&B);
    n.send(
        &B,
        &with_pai(answer(&fwd, 200, "OK", "b"), "<sip:ceo@example.com>"),
    );
    let back = n.one(&carrier);
    assert_eq!(status(&back), 200);
    assert_eq!(pai_of(&back), None, "{}", String::from_utf8_lossy(&back));
    assert!(sipring_tests::ua::header(&back, "P-Preferred-Identity").is_none());
    // Alice messages the carrier: its answer asserting its own user passes; one asserting
    // a user of ours does not.
    for (i, (pai, passes)) in [
        ("<sip:y@carrier.example>", true),
        ("<sip:ceo@example.com>", false),
        ("\"Bob \\\" <sip:ceo@example.com>", false),
        // Its own user, but the answer asks for privacy and goes to a client.
        ("<sip:y@carrier.example>\r\nPrivacy: id", false),
    ]
    .into_iter()
    .enumerate()
    {
        let m = format!(
            "MESSAGE sip:y@carrier.example SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKr{i}\r\nMax-Forwards: 70\r\nTo: <sip:y@carrier.example>\r\nFrom: <sip:alice@example.com>;tag=1\r\nCall-ID: r2-{i}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
        );
        n.send(&A, m.as_bytes());
        let fwd = n.one(&carrier);
        n.send(&carrier, &with_pai(answer(&fwd, 200, "OK", "c"), pai));
        let back = n.one(&A);
        assert_eq!(status(&back), 200);
        assert_eq!(pai_of(&back).is_some(), passes, "{pai}");
        assert!(sipring_tests::ua::header(&back, "P-Preferred-Identity").is_none());
    }
}

#[test]
fn the_best_answer_of_a_fork_carries_every_challenge_and_a_503_goes_up_as_500() {
    // RFC 3261 §16.7 steps 6 and 7. Two devices of bob answer a forked MESSAGE with 404 and
    // 407: the 407 wins (it tells the caller how to try again; before, the lower 404 did)
    // and carries both branches' challenges. A lone 503 goes upstream as 500 (before, as
    // 503: "this proxy is unavailable", and the caller would stop using us).
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.register("bob", &B2, "10.0.0.3:5061");
    let challenge = |resp: Vec<u8>, name: &str, realm: &str| {
        String::from_utf8(resp)
            .unwrap()
            .replacen(
                "\r\n\r\n",
                &format!("\r\n{name}: Digest realm=\"{realm}\", nonce=\"n\"\r\n\r\n"),
                1,
            )
            .into_bytes()
    };
    n.send(&A, &message("z9hG4bKm1", "fork-1"));
    let (f1, f2) = (n.one(&B), n.one(&B2));
    n.send(&B, &answer(&f1, 404, "Not Found", "b1"));
    n.send(
        &B2,
        &challenge(
            answer(&f2, 407, "Proxy Authentication Required", "b2"),
            "Proxy-Authenticate",
            "b2.example",
        ),
    );
    let best = n.one(&A);
    assert_eq!(status(&best), 407, "{}", String::from_utf8_lossy(&best));
    // Now both branches challenge, with different realms: both challenges go up.
    n.send(&A, &message("z9hG4bKm2", "fork-2"));
    let (f1, f2) = (n.one(&B), n.one(&B2));
    n.send(
        &B,
        &challenge(
            answer(&f1, 401, "Unauthorized", "b1"),
            "WWW-Authenticate",
            "b1.example",
        ),
    );
    n.send(
        &B2,
        &challenge(
            answer(&f2, 407, "Proxy Authentication Required", "b2"),
            "Proxy-Authenticate",
            "b2.example",
        ),
    );
    let best = String::from_utf8(n.one(&A)).unwrap();
    assert!(
        best.starts_with("SIP/2.0 401 ")
            && best.contains("WWW-Authenticate: Digest realm=\"b1.example\"")
            && best.contains("Proxy-Authenticate: Digest realm=\"b2.example\""),
        "{best}"
    );
    assert_eq!(best.matches("WWW-Authenticate:").count(), 1, "{best}");
    // A 503 from the only branch left.
    n.send(&B2, b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.3:5061;branch=z9hG4bKreg3\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:bob@example.com>;tag=r\r\nCall-ID: reg-bob-2\r\nCSeq: 2 REGISTER\r\nContact: <sip:bob@10.0.0.3:5061;transport=tls>;expires=0\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status(&n.one(&B2)), 200);
    n.send(&A, &message("z9hG4bKm3", "fork-3"));
    let f1 = n.one(&B);
    let busy = String::from_utf8(answer(&f1, 503, "Service Unavailable", "b1"))
        .unwrap()
        .replacen("\r\n\r\n", "\r\nRetry-After: 300\r\n\r\n", 1);
    n.send(&B, busy.as_bytes());
    let up = String::from_utf8(n.one(&A)).unwrap();
    assert!(up.starts_with("SIP/2.0 500 "), "{up}");
    assert!(up.contains("Call-ID: fork-3"), "{up}");
    n.assert_idle_after_timers();
}

#[test]
fn a_fork_whose_one_branch_timed_out_answers_with_the_others_final() {
    // A MESSAGE forked to bob's two devices: one says 486, the other never answers. The
    // local 408 (Timer F) ranked best (lowest 4xx), and a non-INVITE gets no 408 (RFC 4320):
    // the caller heard nothing at all. Now the 486 goes up.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.register("bob", &B2, "10.0.0.3:5061");
    n.send(&A, &message("z9hG4bKto1", "fork-to-1"));
    let (f1, _silent) = (n.one(&B), n.one(&B2));
    n.send(&B, &answer(&f1, 486, "Busy Here", "b1"));
    assert!(n.take(&A).is_empty(), "the other branch may still answer");
    n.advance(Duration::from_secs(33));
    let up: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert_eq!(up, [486]);
    n.assert_idle_after_timers();
    // An INVITE whose one branch answers 408 (downstream timed out) and whose other is busy:
    // the caller hears busy, not a timeout.
    n.send(&A, &invite("z9hG4bKto2", "fork-to-2"));
    n.take(&A);
    let (i1, i2) = (n.one(&B), n.one(&B2));
    n.send(&B, &answer(&i1, 408, "Request Timeout", "b1"));
    n.send(&B2, &answer(&i2, 486, "Busy Here", "b2"));
    n.take(&B);
    n.take(&B2);
    let up: Vec<u16> = n.take(&A).iter().map(|m| status(m)).collect();
    assert_eq!(up, [486]);
    n.assert_idle_after_timers();
}

#[test]
fn a_merged_challenge_still_fits_a_peers_message_limit() {
    // Every branch's challenges go up in one 401/407 (§16.7 step 7). Two devices answering
    // with ~50 KiB of challenges each made an answer past 64 KiB, which the node or partner
    // upstream refuses as too large — cutting the link it came on.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.register("bob", &B2, "10.0.0.3:5061");
    n.send(&A, &message("z9hG4bKbig", "big-ch"));
    let (f1, f2) = (n.one(&B), n.one(&B2));
    let challenged = |resp: Vec<u8>, name: &str, realm: &str| {
        let lines: String = (0..7)
            .map(|i| {
                format!(
                    "{name}: Digest realm=\"{realm}{i}\", nonce=\"{}\"\r\n",
                    "n".repeat(7000)
                )
            })
            .collect();
        String::from_utf8(resp)
            .unwrap()
            .replacen("\r\n\r\n", &format!("\r\n{lines}\r\n"), 1)
            .into_bytes()
    };
    n.send(
        &B,
        &challenged(
            answer(&f1, 407, "Proxy Authentication Required", "b1"),
            "Proxy-Authenticate",
            "b1.example",
        ),
    );
    n.send(
        &B2,
        &challenged(
            answer(&f2, 401, "Unauthorized", "b2"),
            "WWW-Authenticate",
            "b2.example",
        ),
    );
    let up = n.one(&A);
    assert_eq!(status(&up), 401);
    assert!(up.len() <= 65536, "{} bytes", up.len());
    assert!(
        String::from_utf8_lossy(&up).contains("Proxy-Authenticate: Digest realm=\"b1.example"),
        "some of the other branch's challenges go up"
    );
    n.assert_idle_after_timers();
}

#[test]
fn a_forks_kept_challenges_are_bounded_in_number_and_none_empty() {
    // Each kept challenge counted only its value's bytes: a branch answering 401 with
    // hundreds of empty or one-byte WWW-Authenticate lines was held (while another branch
    // rang) at 40-80 bytes an entry counted as 0-1, and the empty ones went upstream as bad
    // headers.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.register("bob", &B2, "10.0.0.3:5061");
    n.send(&A, &message("z9hG4bKmany", "many-ch"));
    let (f1, f2) = (n.one(&B), n.one(&B2));
    let with = |resp: Vec<u8>, lines: &str| {
        String::from_utf8(resp)
            .unwrap()
            .replacen("\r\n\r\n", &format!("\r\n{lines}\r\n"), 1)
            .into_bytes()
    };
    n.send(
        &B2,
        &with(
            answer(&f2, 401, "Unauthorized", "b2"),
            "WWW-Authenticate: Digest realm=\"b2.example\", nonce=\"n\"\r\n",
        ),
    );
    let many: String = (0..60)
        .map(|i| format!("WWW-Authenticate: {i}\r\n"))
        .chain((0..10).map(|_| "WWW-Authenticate: \r\n".to_string()))
        .collect();
    n.send(&B, &with(answer(&f1, 401, "Unauthorized", "b1"), &many));
    let up = String::from_utf8(n.one(&A)).unwrap();
    assert!(up.starts_with("SIP/2.0 401"), "{up}");
    let lines: Vec<&str> = up
        .split("\r\n")
        .filter(|l| l.starts_with("WWW-Authenticate:"))
        .collect();
    assert!(lines.len() <= 1 + 32, "{} challenges went up", lines.len());
    assert!(
        lines
            .iter()
            .all(|l| !l["WWW-Authenticate:".len()..].trim().is_empty()),
        "{lines:?}"
    );
    n.assert_idle_after_timers();
    // The other order: the branch with many lines answers first (and stays the best, its
    // own lines going up as it wrote them). Its lines filled the bound, and the other
    // branch's one real challenge was left out of the merged answer.
    n.send(&A, &message("z9hG4bKmany2", "many-ch2"));
    let (f1, f2) = (n.one(&B), n.one(&B2));
    n.send(&B, &with(answer(&f1, 401, "Unauthorized", "b1"), &many));
    n.send(
        &B2,
        &with(
            answer(&f2, 401, "Unauthorized", "b2"),
            "WWW-Authenticate: Digest realm=\"b2.example\", nonce=\"n\"\r\n",
        ),
    );
    let up = String::from_utf8(n.one(&A)).unwrap();
    assert!(up.contains("realm=\"b2.example\""), "{up}");
    n.assert_idle_after_timers();
}

#[test]
fn a_request_at_the_via_limit_is_still_cancelled_after_forwarding_added_ours() {
    // 70 Via values (the limit), ours makes 71: the kept copy is re-read with room for it,
    // so the CANCEL reaches bob (before: answered 200 upstream, never sent downstream).
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    let more: Vec<String> = (1..70)
        .map(|i| format!("SIP/2.0/TLS 10.9.0.{i}:5061;branch=z9hG4bKv{i}"))
        .collect();
    let inv = String::from_utf8(invite("z9hG4bKa1", "call-vias"))
        .unwrap()
        .replacen(
            "Max-Forwards: 70\r\n",
            &format!("Via: {}\r\nMax-Forwards: 70\r\n", more.join(", ")),
            1,
        );
    with_msg(inv.as_bytes(), |_, e| assert_eq!(e.via_count, 70));
    n.send(&A, inv.as_bytes());
    assert_eq!(status(&n.one(&A)), 100);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    assert_eq!(status(&n.one(&A)), 180);
    n.send(&A, &cancel_of("call-vias"));
    assert_eq!(status(&n.one(&A)), 200);
    assert_eq!(method(&n.one(&B)), "CANCEL");
}

#[test]
fn a_partners_ack_asserts_only_what_its_other_requests_may() {
    // Inside a dialog, a partner's P-Asserted-Identity outside its domains is removed (the
    // request goes on: refusing would hang the call). Its 2xx ACK went through another path
    // that rebuilt the grant as "partner" and kept the PAI: the callee saw our CEO.
    let (carrier, mut n) = carrier_net();
    n.register("bob", &B, "10.0.0.2:5061");
    let invite = "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 192.0.2.7;branch=z9hG4bKpa1\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:x@carrier.example>;tag=c1\r\nCall-ID: pack-1\r\nCSeq: 1 INVITE\r\nContact: <sip:x@192.0.2.7;transport=tls>\r\nContent-Length: 0\r\n\r\n";
    n.send(&carrier, invite.as_bytes());
    n.take(&carrier);
    let fwd = n.one(&B);
    let rr = record_route(&fwd);
    n.send(&B, &answer(&fwd, 200, "OK", "b1"));
    assert_eq!(status(&n.one(&carrier)), 200);
    let ack = |pai: &str, branch: &str| {
        format!(
            "ACK sip:bob@10.0.0.2:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 192.0.2.7;branch={branch}\r\nMax-Forwards: 70\r\nRoute: {}\r\nTo: <sip:bob@example.com>;tag=b1\r\nFrom: <sip:x@carrier.example>;tag=c1\r\nCall-ID: pack-1\r\nCSeq: 1 ACK\r\nP-Asserted-Identity: {pai}\r\nContent-Length: 0\r\n\r\n",
            String::from_utf8_lossy(&rr)
        )
    };
    let pai_of = |m: &[u8]| sipring_tests::ua::header(m, "P-Asserted-Identity");
    n.send(
        &carrier,
        ack("<sip:ceo@example.com>", "z9hG4bKpa2").as_bytes(),
    );
    let got = n.one(&B);
    assert_eq!(method(&got), "ACK");
    assert_eq!(pai_of(&got), None, "{}", String::from_utf8_lossy(&got));
    // Its own user: kept, as on its other requests.
    n.send(
        &carrier,
        ack("<sip:x@carrier.example>", "z9hG4bKpa3").as_bytes(),
    );
    assert_eq!(
        pai_of(&n.one(&B)).as_deref(),
        Some("<sip:x@carrier.example>")
    );
}

#[test]
fn what_goes_to_a_partner_has_no_folded_line() {
    // Request smuggling toward a Kamailio or OpenSIPS trunk: their stream readers take a
    // folded ` l: 0` for a Content-Length and would read the body as a second request on
    // our trusted connection. What we forward is unfolded; the body is passed as it came.
    let (carrier, mut n) = carrier_net();
    let body = "INVITE sip:y@carrier.example SIP/2.0\r\nFrom: <sip:ceo@example.com>;tag=2\r\n\r\n";
    let invite = format!(
        "INVITE sip:x@carrier.example SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKsm1\r\nMax-Forwards: 70\r\nTo: <sip:x@carrier.example>\r\nFrom: <sip:alice@example.com>;tag=a1\r\nCall-ID: smuggle-1\r\nCSeq: 1 INVITE\r\nSubject: x\r\n l: 0\r\nContact: <sip:alice@10.0.0.1:5061;transport=tls>\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    n.send(&A, invite.as_bytes());
    let out = n.one(&carrier);
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&out[..head_end]);
    assert!(head.starts_with("INVITE sip:x@carrier.example"), "{head}");
    assert!(
        !head.contains("\r\n ") && !head.contains("\r\n\t"),
        "{head}"
    );
    assert_eq!(&out[head_end..], body.as_bytes());
}

#[test]
fn a_partners_call_outlives_the_connection_it_came_over() {
    // RFC 3261 §18.2.2: a carrier closes (recycles) the connection its INVITE came over
    // while bob's phone rings. Before, the call was torn down (bob got a CANCEL); now the
    // answers go over the link to the carrier.
    let (carrier, mut n) = carrier_net();
    let inbound = Flow::Conn(77);
    n.proxy.set_flow_info(
        inbound.clone(),
        sipring_core::policy::FlowInfo {
            principal: sipring_core::policy::Principal::Partner("carrier".into()),
            ..Default::default()
        },
    );
    n.register("bob", &B, "10.0.0.2:5061");
    let from_carrier = "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 192.0.2.7;branch=z9hG4bKrh1\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:x@carrier.example>;tag=c1\r\nCall-ID: rehome-1\r\nCSeq: 1 INVITE\r\nContact: <sip:x@192.0.2.7;transport=tls>\r\nContent-Length: 0\r\n\r\n";
    n.send(&inbound, from_carrier.as_bytes());
    assert_eq!(status(&n.one(&inbound)), 100);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    assert_eq!(status(&n.one(&inbound)), 180);
    n.proxy.handle_flow_closed(n.now, &inbound);
    n.pump();
    assert!(n.take(&B).is_empty(), "bob's phone keeps ringing");
    n.send(&B, &answer(&fwd, 200, "OK", "b1"));
    let up = n.one(&carrier);
    assert_eq!(status(&up), 200, "{}", String::from_utf8_lossy(&up));
    assert!(n.take(&inbound).is_empty());
    // A client's connection closing still ends its calls (its caller is gone).
    n.send(&A, &invite("z9hG4bKrh2", "rehome-2"));
    n.take(&A);
    let fwd = n.one(&B);
    n.send(&B, &answer(&fwd, 180, "Ringing", "b1"));
    n.take(&A);
    n.proxy.handle_flow_closed(n.now, &A);
    n.pump();
    let c = n.one(&B);
    assert_eq!(method(&c), "CANCEL");
    n.send(&B, &answer(&c, 200, "OK", "b1"));
    n.send(&B, &answer(&fwd, 487, "Request Terminated", "b1"));
    n.take(&B);
    n.assert_idle_after_timers();
    assert_eq!(n.proxy.indexed(&carrier), 0);
}

#[test]
fn remote_party_id_is_an_assertion_like_pai() {
    // Remote-Party-ID never became an RFC, but phones and PBXes display it as the caller:
    // passed through untouched, a client chose the caller ID its callee saw.
    let (carrier, mut n) = carrier_net();
    n.register("bob", &B, "10.0.0.2:5061");
    let rpid_of = |m: &[u8]| sipring_tests::ua::header(m, "Remote-Party-ID");
    let msg = |from: &str, call: &str, rpid: &str| {
        format!(
            "MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 192.0.2.7;branch=z9hG4bK{call}\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <{from}>;tag=1\r\nCall-ID: {call}\r\nCSeq: 1 MESSAGE\r\nRemote-Party-ID: {rpid}\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let ceo = "\"CEO\" <sip:ceo@example.com>;party=calling;screen=yes";
    // A client's: removed.
    n.send(&A, msg("sip:alice@example.com", "rp1", ceo).as_bytes());
    let got = n.one(&B);
    assert_eq!(rpid_of(&got), None, "{}", String::from_utf8_lossy(&got));
    n.send(&B, &answer(&got, 200, "OK", "b"));
    n.take(&A);
    // A partner's for one of our users (or a carrier's own IP or tel: form): removed, the
    // request goes on — unlike such a PAI, which is refused (carriers write RPIDs freely).
    n.send(
        &carrier,
        msg("sip:x@carrier.example", "rp2", ceo).as_bytes(),
    );
    let got = n.one(&B);
    assert_eq!(rpid_of(&got), None, "{}", String::from_utf8_lossy(&got));
    n.send(&B, &answer(&got, 200, "OK", "b"));
    assert_eq!(status(&n.one(&carrier)), 200);
    // ... for its own user: kept.
    let own = "<sip:x@carrier.example>;party=calling";
    n.send(
        &carrier,
        msg("sip:x@carrier.example", "rp3", own).as_bytes(),
    );
    let got = n.one(&B);
    assert_eq!(rpid_of(&got).as_deref(), Some(own));
    // Bob's answer naming the CEO does not reach the carrier.
    let resp = String::from_utf8(answer(&got, 200, "OK", "b"))
        .unwrap()
        .replacen(
            "\r\n\r\n",
            &format!("\r\nRemote-Party-ID: {ceo}\r\n\r\n"),
            1,
        );
    n.send(&B, resp.as_bytes());
    let back = n.one(&carrier);
    assert_eq!(status(&back), 200);
    assert_eq!(rpid_of(&back), None);
}

#[test]
fn a_from_that_two_parsers_read_as_two_people_is_refused() {
    // `sip:alice@…;x=<sip:ceo@…>`: an addr-spec whose parameter holds a bracket. We read
    // alice (and would check that); a parser taking the first `<…>` reads the CEO.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    let m = "MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKtwo\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: sip:alice@example.com;x=<sip:ceo@example.com>;tag=1\r\nCall-ID: two\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n";
    n.send(&A, m.as_bytes());
    assert_eq!(status(&n.one(&A)), 400);
    assert!(n.inbox.is_empty(), "it reached bob");
}

#[test]
fn a_retransmitted_2xx_ack_leaves_with_the_same_branch() {
    // RFC 3261 §16.11: a request forwarded statelessly keeps its branch on retransmission;
    // a new one per copy looked like new transactions to anything stateful downstream.
    let mut n = Net::new();
    let rr = answered(&mut n, "z9hG4bKr1", "rtx-1");
    let ack = ack_2xx(
        "sip:callee@10.0.0.2;transport=tls",
        &rr,
        "b1",
        "10.0.0.1:5061;branch=z9hG4bKr2",
        "rtx-1",
    );
    let top_branch = |m: &[u8]| with_msg(m, |_, e| e.top_via.branch().unwrap().to_vec());
    n.send(&A, &ack);
    let first = top_branch(&n.one(&B));
    n.send(&A, &ack);
    assert_eq!(top_branch(&n.one(&B)), first);
    // Another ACK (another branch upstream) gets another.
    let other = ack_2xx(
        "sip:callee@10.0.0.2;transport=tls",
        &rr,
        "b1",
        "10.0.0.1:5061;branch=z9hG4bKr3",
        "rtx-1",
    );
    n.send(&A, &other);
    assert_ne!(top_branch(&n.one(&B)), first);
}

#[test]
fn our_own_answers_fill_in_rport_and_received() {
    // RFC 3581 §4: the server receiving a request whose top Via asks `rport` sets it (and
    // `received`); our answers copy that Via. Forwarded copies had it, our own 100 Trying,
    // challenges, REGISTER 200s and errors echoed a bare `;rport` — a client learning its
    // public address from the REGISTER answer learned nothing.
    let mut n = Net::new();
    let src: std::net::SocketAddr = "203.0.113.9:40123".parse().unwrap();
    n.proxy.set_flow_info(
        A,
        sipring_core::policy::FlowInfo {
            source: Some(src),
            ..Default::default()
        },
    );
    let reg = "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;rport;branch=z9hG4bKrp1\r\nMax-Forwards: 70\r\nTo: <sip:alice@example.com>\r\nFrom: <sip:alice@example.com>;tag=r\r\nCall-ID: rp-1\r\nCSeq: 1 REGISTER\r\nContact: <sip:alice@10.0.0.1:5061;transport=tls>\r\nContent-Length: 0\r\n\r\n";
    n.send(&A, reg.as_bytes());
    let ok = n.one(&A);
    assert_eq!(status(&ok), 200);
    let via = sipring_tests::ua::header(&ok, "Via").unwrap();
    assert_eq!(
        via,
        "SIP/2.0/TLS 10.0.0.1:5061;rport=40123;branch=z9hG4bKrp1;received=203.0.113.9"
    );
    // The 100 Trying of an INVITE too; a Via without rport is copied as it came.
    n.register("bob", &B, "10.0.0.2:5061");
    let inv = String::from_utf8(invite("z9hG4bKrp2", "rp-2"))
        .unwrap()
        .replace(";branch=z9hG4bKrp2", ";rport;branch=z9hG4bKrp2");
    n.send(&A, inv.as_bytes());
    let trying = n.one(&A);
    assert_eq!(status(&trying), 100);
    assert!(
        sipring_tests::ua::header(&trying, "Via")
            .unwrap()
            .contains(";rport=40123;branch=z9hG4bKrp2;received=203.0.113.9")
    );
    n.take(&B);
    // Without rport, a sent-by that is not the source still gets `received` (§18.2.1), in
    // our answers as in the copy we forward (before: only the copy); one the client wrote
    // itself is replaced, not passed on beside ours.
    let inv = String::from_utf8(invite("z9hG4bKrp3", "rp-3"))
        .unwrap()
        .replace(";branch=z9hG4bKrp3", ";received=6.6.6.6;branch=z9hG4bKrp3");
    n.send(&A, inv.as_bytes());
    let trying = n.one(&A);
    assert_eq!(
        sipring_tests::ua::header(&trying, "Via").unwrap(),
        "SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKrp3;received=203.0.113.9"
    );
    let fwd = n.one(&B);
    // A received written as a quoted string holding `;rport`: answered (before: the 100
    // Trying was built from overlapping edits, and the shard panicked).
    let inv = String::from_utf8(invite("z9hG4bKrp4", "rp-4"))
        .unwrap()
        .replace(
            ";branch=z9hG4bKrp4",
            ";branch=z9hG4bKrp4;received=\";rport\"",
        );
    n.send(&A, inv.as_bytes());
    assert_eq!(
        sipring_tests::ua::header(&n.one(&A), "Via").unwrap(),
        "SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKrp4;received=203.0.113.9"
    );
    n.take(&B);
    let client_via = String::from_utf8_lossy(&fwd)
        .lines()
        .filter(|l| l.starts_with("Via:"))
        .nth(1)
        .unwrap()
        .to_string();
    assert_eq!(
        client_via,
        "Via: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKrp3;received=203.0.113.9"
    );
}

#[test]
fn an_answer_with_only_our_via_is_not_forwarded() {
    // RFC 3261 §16.7 step 3: after our Via is popped nothing is left — the downstream lost
    // the caller's Via. Forwarded, it would reach alice without one (her parser refuses
    // it); it is dropped and counted, and the branch still answers properly after.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.send(&A, &invite("z9hG4bKvl1", "call-vl"));
    n.take(&A);
    let fwd = n.one(&B);
    let busy = answer(&fwd, 486, "Busy Here", "b1");
    let text = String::from_utf8(busy.clone()).unwrap();
    let mut vias = 0;
    let lost: String = text
        .split_inclusive("\r\n")
        .filter(|l| {
            if l.starts_with("Via:") {
                vias += 1;
                return vias == 1;
            }
            true
        })
        .collect();
    assert_eq!(vias, 2, "{text}");
    let before = n.proxy.stats().dropped_responses;
    n.send(&B, lost.as_bytes());
    assert!(n.take(&A).is_empty(), "nothing reached alice");
    assert_eq!(n.proxy.stats().dropped_responses, before + 1);
    n.send(&B, &busy);
    assert_eq!(status(&n.one(&A)), 486);
}

#[test]
fn an_answer_counts_only_from_the_connection_its_request_went_to() {
    // A forked INVITE: bob's second device read the branch of the first (the loop-hash
    // part is the same on every branch, the rest a counter) and answers on it from its own
    // connection. Before, its 486 ended the first branch; now it answers nothing, and the
    // first device's own answer still counts.
    let mut n = Net::new();
    n.register("bob", &B, "10.0.0.2:5061");
    n.register("bob", &B2, "10.0.0.3:5061");
    n.send(&A, &invite("z9hG4bKsn1", "call-sn"));
    n.take(&A);
    let (f1, _f2) = (n.one(&B), n.one(&B2));
    let before = n.proxy.stats().dropped_responses;
    n.send(&B2, &answer(&f1, 200, "OK", "forged"));
    assert!(n.take(&A).is_empty(), "the forged answer went nowhere");
    assert!(n.take(&B).is_empty(), "the first branch was not cancelled");
    assert_eq!(n.proxy.stats().dropped_responses, before + 1);
    n.send(&B, &answer(&f1, 200, "OK", "b1"));
    let ok = n.one(&A);
    assert_eq!(status(&ok), 200);
    assert!(String::from_utf8_lossy(&ok).contains("tag=b1"));
}
