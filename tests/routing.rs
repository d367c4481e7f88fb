//! RFC 3261 routing as other SIP software relies on it, over real sockets (interop issue):
//! a Record-Route for each side when a request changes listeners (RFC 5658), our Via naming
//! the listener a request leaves by, Route processing by host *and* port (§16.4), a preloaded
//! Route to us removed, Via `received`/`rport` (§18.2.1, RFC 3581), and the registrar echoing
//! the outbound Contact parameters (RFC 5626 §6) and Path (RFC 3327).

use sipring::config::{ListenConfig, ListenKind};
use sipring::server::{Running, start};
use sipring_tests::server::{Pki, config};
use sipring_tests::ua::{Ua, answer, branch, header, header_all, method, tls_config};

/// A 1-shard server with `tls`, `mtls` and `tcp` listeners, advertising 127.0.0.1.
fn server(pki: &Pki) -> Running {
    let mut cfg = config(pki);
    cfg.server.shards = 1;
    cfg.server.hostname = "127.0.0.1".into();
    cfg.listen.push(ListenConfig {
        kind: ListenKind::Tcp,
        address: "127.0.0.1:0".parse().unwrap(),
        ..ListenConfig::default()
    });
    start(cfg, None).expect("start")
}

fn tls_ua(pki: &Pki, srv: &Running, user: &str) -> Ua {
    let mut u = Ua::tls(
        srv.listen_addrs[0],
        tls_config(&pki.certs("ca.pem"), None, false),
        "sip.example.com",
        user,
        "example.com",
    )
    .unwrap();
    assert_eq!(u.register(600), 200, "{user}");
    u
}

fn tcp_ua(srv: &Running, user: &str) -> Ua {
    let mut u = Ua::tcp(srv.listen_addrs[2], user, "example.com").unwrap();
    assert_eq!(u.register(600), 200, "{user}");
    u
}

/// Our Record-Route entries in a request, top first.
fn record_routes(m: &[u8]) -> Vec<String> {
    header_all(m, "Record-Route")
        .unwrap_or_default()
        .split(", ")
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn a_request_that_changes_listeners_is_record_routed_and_via_d_per_side() {
    let pki = Pki::new();
    let srv = server(&pki);
    let (tls, tcp) = (srv.listen_addrs[0].port(), srv.listen_addrs[2].port());
    let mut bob = tls_ua(&pki, &srv, "bob");
    let mut alice = tcp_ua(&srv, "alice");
    // TCP in, TLS out: the callee sees our Via on the TLS listener, and two Record-Routes,
    // its own side (TLS) on top, the caller's side (TCP) below.
    let inv = alice.request(
        "INVITE",
        "sip:bob@example.com",
        "<sip:bob@example.com>",
        "side-1",
        1,
        "",
        None,
    );
    alice.send(&inv);
    let got = bob.expect("INVITE");
    let via = header(&got, "Via").unwrap();
    assert!(
        via.starts_with(&format!("SIP/2.0/TLS 127.0.0.1:{tls};branch=")),
        "{via}"
    );
    let rr = record_routes(&got);
    assert_eq!(rr.len(), 2, "{rr:?}");
    assert!(
        rr[0].starts_with(&format!("<sip:127.0.0.1:{tls};transport=tls;lr;")),
        "{rr:?}"
    );
    assert!(
        rr[1].starts_with(&format!("<sip:127.0.0.1:{tcp};transport=tcp;lr;")),
        "{rr:?}"
    );
    bob.send(&answer(
        &got,
        200,
        "OK",
        "b1",
        &format!("sip:bob@{}", bob.local),
    ));
    let (s, ok) = alice.expect_final_or_provisional("200");
    assert_eq!(s, 200);
    // The caller's route set is the list reversed: its first hop is our TCP side.
    let mut set = record_routes(&ok);
    set.reverse();
    assert!(set[0].contains(&format!(":{tcp};transport=tcp")), "{set:?}");
    alice.send(&alice.request(
        "ACK",
        &format!("sip:bob@{}", bob.local),
        "<sip:bob@example.com>;tag=b1",
        "side-1",
        1,
        &format!("Route: {}\r\n", set.join(", ")),
        None,
    ));
    let ack = bob.expect("ACK");
    assert_eq!(method(&ack), "ACK");
    assert_eq!(
        header(&ack, "Route"),
        None,
        "both of our entries were removed"
    );
    // The callee's BYE follows its route set (top first: our TLS side).
    let bye = format!(
        "BYE sip:alice@{} SIP/2.0\r\nVia: SIP/2.0/TLS {};branch={}\r\nMax-Forwards: 70\r\nRoute: {}\r\nFrom: <sip:bob@example.com>;tag=b1\r\nTo: <sip:alice@example.com>;tag=talice\r\nCall-ID: side-1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        alice.local,
        bob.local,
        branch(),
        rr.join(", ")
    );
    bob.send(bye.as_bytes());
    let got = alice.expect("BYE");
    assert_eq!(method(&got), "BYE");
    // Toward the TCP client our Via says TCP and names the TCP listener (it said TLS before).
    let via = header(&got, "Via").unwrap();
    assert!(
        via.starts_with(&format!("SIP/2.0/TCP 127.0.0.1:{tcp};branch=")),
        "{via}"
    );
    alice.send(&answer(&got, 200, "OK", "talice", "sip:alice@127.0.0.1"));
    assert_eq!(bob.expect_final_or_provisional("200 to BYE").0, 200);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn routes_via_and_registrar_parameters() {
    let pki = Pki::new();
    let srv = server(&pki);
    let tls = srv.listen_addrs[0].port();
    let mut bob = tls_ua(&pki, &srv, "bob");
    // A UA with sipring as its outbound proxy preloads a Route to it: removed, and the
    // REGISTER reaches the registrar (it got 404 Dialog Flow Not Found before).
    let mut carol = Ua::tls(
        srv.listen_addrs[0],
        tls_config(&pki.certs("ca.pem"), None, false),
        "sip.example.com",
        "carol",
        "example.com",
    )
    .unwrap();
    // The registrar echoes the outbound parameters (RFC 5626 §6).
    let (code, ok) = carol.register_with(
        600,
        "Contact: <sip:carol@192.0.2.1;ob>;+sip.instance=\"<urn:uuid:0001>\";reg-id=1\r\nSupported: outbound\r\n",
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&ok));
    let contacts = header_all(&ok, "Contact").unwrap();
    assert!(
        contacts.contains(
            "<sip:carol@192.0.2.1;ob>;expires=600;+sip.instance=\"<urn:uuid:0001>\";reg-id=1"
        ),
        "{contacts}"
    );
    // Through an edge proxy: the Path is kept for requests to carol, and echoed.
    let (code, ok) = carol.register_with(
        600,
        &format!(
            "Route: <sip:127.0.0.1:{tls};transport=tls;lr>\r\nSupported: path, outbound\r\nPath: <sip:edge.example.net;lr>\r\n"
        ),
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&ok));
    assert_eq!(
        header(&ok, "Path").as_deref(),
        Some("<sip:edge.example.net;lr>")
    );
    // Requests to carol fork to both bindings over her flow; the one registered through the
    // edge carries its Path as Route.
    bob.send(&bob.request(
        "MESSAGE",
        "sip:carol@example.com",
        "<sip:carol@example.com>",
        "path-1",
        1,
        "",
        Some(("text/plain", "hi")),
    ));
    let mut routes = Vec::new();
    for _ in 0..2 {
        let got = carol.expect("MESSAGE (one per binding)");
        routes.push(header(&got, "Route"));
        carol.send(&answer(&got, 200, "OK", "c", "sip:carol@127.0.0.1"));
    }
    assert!(
        routes.contains(&Some("<sip:edge.example.net;lr>".into())),
        "{routes:?}"
    );
    assert_eq!(bob.expect_final_or_provisional("200").0, 200);
    // Via received/rport: bob asks for rport; carol sees bob's Via completed.
    let msg = String::from_utf8(bob.request(
        "MESSAGE",
        "sip:carol@example.com",
        "<sip:carol@example.com>",
        "rport-1",
        1,
        "",
        Some(("text/plain", "hi")),
    ))
    .unwrap();
    assert!(msg.contains(";rport\r\n"));
    bob.send(msg.as_bytes());
    let got = carol.expect("MESSAGE");
    let vias = header_all(&got, "Via").unwrap();
    let want = format!(";rport={};received=127.0.0.1", bob.local.port());
    assert!(vias.contains(&want), "{vias}");
    carol.send(&answer(&got, 200, "OK", "c", "sip:carol@127.0.0.1"));
    let got = carol.expect("MESSAGE, second binding");
    carol.send(&answer(&got, 200, "OK", "c", "sip:carol@127.0.0.1"));
    assert_eq!(bob.expect_final_or_provisional("200").0, 200);
    // Our address on another port is another server: a Route there is not ours (403, where
    // it used to be taken for a dialog route of ours).
    bob.send(&bob.request(
        "MESSAGE",
        "sip:carol@example.com",
        "<sip:carol@example.com>",
        "port-1",
        1,
        "Route: <sip:127.0.0.1:1;lr>\r\n",
        Some(("text/plain", "hi")),
    ));
    assert_eq!(bob.expect_final_or_provisional("403").0, 403);
    srv.stop();
    srv.join().unwrap();
}
