//! End to end over loopback: a real sipring (2 shards, in this process) and test user agents
//! speaking SIP over TLS. Registration, calls, MESSAGE, CANCEL, errors, the cross-shard
//! path, federation over MTLS, a connection dying mid-transaction, and the admin endpoint.

use rustls::pki_types::pem::PemObject;
use sipring::server::{Running, start};
use sipring_tests::server::{Pki, admin_get, config, free_port, metric, wait_metrics};
use sipring_tests::ua::{Ua, answer, bye, hang_up, header, invite, method, rr_shards, tls_config};
use std::time::Duration;

/// A connected UA that has authenticated (it answers the challenge of a REGISTER query), so
/// its requests carry credentials.
fn ua(pki: &Pki, srv: &Running, user: &str) -> Ua {
    let mut u = anonymous(pki, srv, user);
    assert_eq!(u.login(), 200, "{user} authenticates");
    u
}

/// A connected UA that has not authenticated.
fn anonymous(pki: &Pki, srv: &Running, user: &str) -> Ua {
    let cfg = tls_config(&pki.certs("ca.pem"), None, false);
    Ua::tls(
        srv.listen_addrs[0],
        cfg,
        "sip.example.com",
        user,
        "example.com",
    )
    .expect("connect")
}

fn registered(pki: &Pki, srv: &Running, user: &str) -> Ua {
    let mut u = ua(pki, srv, user);
    assert_eq!(u.register(600), 200, "{user} registers");
    u
}

/// Opens callers (`caller<i>`, authenticated) until one lands on another shard than `bob`'s
/// connection (the kernel spreads connections over the SO_REUSEPORT sockets): each probes
/// with an INVITE that bob refuses, whose Record-Route flow tokens name both shards.
fn caller_on_another_shard(pki: &Pki, srv: &Running, bob: &mut Ua) -> Ua {
    for i in 0..40 {
        let mut a = ua(pki, srv, &format!("caller{i}"));
        a.send(&a.request(
            "INVITE",
            "sip:bob@example.com",
            "<sip:bob@example.com>",
            &format!("probe-{i}"),
            1,
            "",
            None,
        ));
        let got = bob.expect("INVITE");
        let (fi, fo) = rr_shards(&got).expect("flow tokens");
        bob.send(&answer(&got, 486, "Busy Here", "b", "sip:bob@127.0.0.1"));
        assert_eq!(method(&bob.expect("ACK")), "ACK");
        assert_eq!(a.expect_final_or_provisional("486").0, 486);
        if fi != fo {
            return a;
        }
    }
    panic!("no connection landed on the other shard in 40 tries");
}

/// Runs INVITE → 180 → 200 → ACK between `a` and `b` and returns the callee's INVITE.
fn call(a: &mut Ua, b: &mut Ua, call_id: &str) -> Vec<u8> {
    let to = format!("<sip:{}@example.com>", b.user);
    let got = invite(a, b, call_id);
    assert!(header(&got, "Record-Route").is_some());
    b.send(&answer(
        &got,
        180,
        "Ringing",
        "b1",
        &format!("sip:{}@{}", b.user, b.local),
    ));
    let (s, _) = a.expect_final_or_provisional("180");
    assert_eq!(s, 180);
    b.send(&answer(
        &got,
        200,
        "OK",
        "b1",
        &format!("sip:{}@{}", b.user, b.local),
    ));
    let (s, ok) = a.expect_final_or_provisional("200");
    assert_eq!(s, 200);
    // ACK and BYE follow the Record-Route (our flow tokens).
    let rr = header(&ok, "Record-Route").expect("200 carries Record-Route");
    let ack = a.request(
        "ACK",
        &format!("sip:{}@{}", b.user, b.local),
        &format!("{to};tag=b1"),
        call_id,
        1,
        &format!("Route: {rr}\r\n"),
        None,
    );
    a.send(&ack);
    assert_eq!(method(&b.expect("ACK at callee")), "ACK");
    got
}

#[test]
fn register_call_message_cancel_and_errors() {
    let pki = Pki::new();
    let srv = start(config(&pki), None).expect("start");
    let mut alice = registered(&pki, &srv, "alice");
    let mut bob = registered(&pki, &srv, "bob");

    let inv = call(&mut alice, &mut bob, "call-1");
    hang_up(&mut bob, &mut alice, &inv, "call-1");

    // MESSAGE both ways.
    fn message(from: &mut Ua, to: &mut Ua) {
        let m = from.request(
            "MESSAGE",
            &format!("sip:{}@example.com", to.user),
            &format!("<sip:{}@example.com>", to.user),
            &format!("msg-{}", from.user),
            1,
            "",
            Some(("text/plain", "hello")),
        );
        from.send(&m);
        let got = to.expect("MESSAGE");
        assert_eq!(method(&got), "MESSAGE");
        assert!(got.ends_with(b"hello"));
        to.send(&answer(&got, 200, "OK", "m", "sip:x@127.0.0.1"));
        assert_eq!(from.expect_final_or_provisional("200 to MESSAGE").0, 200);
    }
    message(&mut alice, &mut bob);
    message(&mut bob, &mut alice);

    // CANCEL before answer.
    let inv = alice.request(
        "INVITE",
        "sip:bob@example.com",
        "<sip:bob@example.com>",
        "call-2",
        1,
        "",
        None,
    );
    alice.send(&inv);
    let got = bob.expect("INVITE");
    bob.send(&answer(&got, 180, "Ringing", "b2", "sip:bob@127.0.0.1"));
    assert_eq!(alice.expect_final_or_provisional("180").0, 180);
    let via = header(&inv, "Via").unwrap();
    let cancel = format!(
        "CANCEL sip:bob@example.com SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:alice@example.com>;tag=talice\r\nCall-ID: call-2\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
    );
    alice.send(cancel.as_bytes());
    assert_eq!(alice.expect_final_or_provisional("200 to CANCEL").0, 200);
    let c = bob.expect("CANCEL at callee");
    assert_eq!(method(&c), "CANCEL");
    bob.send(&answer(&c, 200, "OK", "b2", "sip:bob@127.0.0.1"));
    bob.send(&answer(
        &got,
        487,
        "Request Terminated",
        "b2",
        "sip:bob@127.0.0.1",
    ));
    assert_eq!(method(&bob.expect("ACK for 487")), "ACK");
    assert_eq!(alice.expect_final_or_provisional("487").0, 487);

    // Unknown user: 404. Known but unregistered: 480.
    let inv = alice.request(
        "INVITE",
        "sip:carol@example.com",
        "<sip:carol@example.com>",
        "call-3",
        1,
        "",
        None,
    );
    alice.send(&inv);
    assert_eq!(alice.expect_final_or_provisional("404").0, 404);
    let mut carol = registered(&pki, &srv, "carol");
    assert_eq!(carol.register(0), 200, "unregister");
    alice.send(&alice.request(
        "INVITE",
        "sip:carol@example.com",
        "<sip:carol@example.com>",
        "call-4",
        1,
        "",
        None,
    ));
    assert_eq!(alice.expect_final_or_provisional("480").0, 480);
    // A foreign domain without a partner: 403; malformed: 400.
    alice.send(&alice.request(
        "MESSAGE",
        "sip:x@elsewhere.example",
        "<sip:x@elsewhere.example>",
        "m-5",
        1,
        "",
        None,
    ));
    assert_eq!(alice.expect_final_or_provisional("403").0, 403);
    alice.send(b"MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1;branch=z9hG4bKbad\r\nTo: <sip:bob@example.com>\r\nCall-ID: x\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(alice.expect_final_or_provisional("400").0, 400);

    srv.stop();
    srv.join().expect("clean stop");
}

#[test]
fn calls_cross_shards() {
    let pki = Pki::new();
    let srv = start(config(&pki), None).expect("start");
    let mut bob = registered(&pki, &srv, "bob");
    // (It stays `caller<i>`: it authenticated as that user, and From must say so.)
    let mut alice = caller_on_another_shard(&pki, &srv, &mut bob);
    let inv = call(&mut alice, &mut bob, "cross-1");
    hang_up(&mut bob, &mut alice, &inv, "cross-1");
    // Each shard publishes its snapshot every 500 ms: wait until both counts are in.
    wait_metrics(
        srv.admin_addr.unwrap(),
        "cross-shard sends and both connections",
        |m| {
            metric(m, "sipring_cross_shard_total{op=\"send\"}").unwrap_or(0.0) > 0.0
                && metric(m, "sipring_connections{kind=\"tls\"}").unwrap_or(0.0) >= 2.0
        },
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_dead_connection_fails_its_transaction_and_leaves_no_state() {
    let pki = Pki::new();
    let srv = start(config(&pki), None).expect("start");
    let admin = srv.admin_addr.unwrap();
    let mut alice = registered(&pki, &srv, "alice");
    let mut bob = registered(&pki, &srv, "bob");
    wait_metrics(admin, "2 bindings", |m| {
        metric(m, "sipring_bindings") == Some(2.0)
    });
    let inv = alice.request(
        "INVITE",
        "sip:bob@example.com",
        "<sip:bob@example.com>",
        "dead-1",
        1,
        "",
        None,
    );
    alice.send(&inv);
    let _ = bob.expect("INVITE");
    bob.kill();
    // The callee's connection died under the call: the user is unreachable (480).
    let (s, resp) = alice.expect_final_or_provisional("480 after the callee's connection died");
    assert_eq!(s, 480);
    // ACK the 480 (hop-by-hop) so the server transaction completes.
    let to = header(&resp, "To").unwrap();
    let via = header(&inv, "Via").unwrap();
    alice.send(format!("ACK sip:bob@example.com SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\nTo: {to}\r\nFrom: <sip:alice@example.com>;tag=talice\r\nCall-ID: dead-1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").as_bytes());
    let m = wait_metrics(admin, "tables back to empty", |m| {
        metric(m, "sipring_transactions{role=\"server\"}") == Some(0.0)
            && metric(m, "sipring_transactions{role=\"client\"}") == Some(0.0)
            && metric(m, "sipring_pending_lookups") == Some(0.0)
            && metric(m, "sipring_bindings") == Some(1.0)
            && metric(m, "sipring_connections{kind=\"tls\"}") == Some(1.0)
    });
    assert_eq!(metric(&m, "sipring_connections{kind=\"tls\"}"), Some(1.0));
    // A connection whose binding lives on the other shard (its AOR's owner): closing it
    // must reach that shard, and only the shards involved hear of it.
    let mut others = Vec::new();
    for i in 0..40 {
        others.push(registered(&pki, &srv, &format!("u{i}")));
        let m = admin_get(admin, "/metrics");
        if metric(&m, "sipring_cross_shard_total{op=\"register\"}").unwrap_or(0.0) > 0.0 {
            break;
        }
    }
    wait_metrics(admin, "a REGISTER that crossed shards", |m| {
        metric(m, "sipring_cross_shard_total{op=\"register\"}").unwrap_or(0.0) > 0.0
    });
    let n = others.len() as f64;
    wait_metrics(admin, "their bindings", |m| {
        metric(m, "sipring_bindings") == Some(1.0 + n)
    });
    for ua in others {
        ua.kill();
    }
    wait_metrics(admin, "their bindings gone, on every shard", |m| {
        metric(m, "sipring_bindings") == Some(1.0)
            && metric(m, "sipring_connections{kind=\"tls\"}") == Some(1.0)
    });
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_dialog_route_to_a_connection_that_is_gone_is_answered_at_once() {
    // RFC 5626 §5.3: a request whose route names a flow that failed is answered at once, not
    // with a 408 after 32 s — 480 to a phone (430 is for proxies, §11.5). The caller's connection on the callee's shard (the send finds it gone)
    // and on the other shard (its owner tells the sender over the mesh).
    let pki = Pki::new();
    for shards in [1, 2] {
        let srv = one_shard(&pki, |c| c.server.shards = shards);
        let admin = srv.admin_addr.unwrap();
        let mut bob = registered(&pki, &srv, "bob");
        let mut alice = if shards == 1 {
            ua(&pki, &srv, "alice")
        } else {
            caller_on_another_shard(&pki, &srv, &mut bob)
        };
        let inv = call(&mut alice, &mut bob, "gone-1");
        let hang_up = bye(&bob, &alice, &inv, "gone-1");
        // Only bob and alice are connected (the probes for another shard have closed).
        let open = |m: &str| metric(m, "sipring_connections{kind=\"tls\"}");
        wait_metrics(admin, "bob and alice connected", |m| open(m) == Some(2.0));
        alice.kill();
        wait_metrics(admin, "the caller's connection closed", |m| {
            open(m) == Some(1.0)
        });
        bob.send(&hang_up);
        let (s, resp) = bob.expect_final_or_provisional("480 for the BYE");
        assert_eq!(s, 480, "{}", String::from_utf8_lossy(&resp));
        wait_metrics(admin, "the send found the connection gone", |m| {
            metric(m, "sipring_queue_drops_total{queue=\"gone\"}").unwrap_or(0.0) >= 1.0
                && metric(m, "sipring_transactions{role=\"client\"}") == Some(0.0)
        });
        srv.stop();
        srv.join().unwrap();
    }
}

#[test]
fn admin_endpoint_reflects_traffic() {
    let pki = Pki::new();
    let srv = start(config(&pki), None).expect("start");
    let admin = srv.admin_addr.unwrap();
    let mut alice = registered(&pki, &srv, "alice");
    let mut bob = registered(&pki, &srv, "bob");
    let inv = call(&mut alice, &mut bob, "adm-1");
    hang_up(&mut bob, &mut alice, &inv, "adm-1");
    // Each shard publishes its snapshot every 500 ms: wait until every count is in.
    wait_metrics(admin, "INVITE, registrations and handshakes counted", |m| {
        metric(m, "sipring_messages_in_total{kind=\"INVITE\"}").unwrap_or(0.0) >= 1.0
            && metric(m, "sipring_register_total{status=\"200\"}").unwrap_or(0.0) >= 2.0
            && metric(m, "sipring_handshakes_total{kind=\"tls\",result=\"ok\"}").unwrap_or(0.0)
                >= 2.0
    });
    let list = admin_get(admin, "/hgrm");
    for h in ["forward_INVITE", "forward_response", "handshake"] {
        assert!(list.lines().any(|l| l == h), "{h} missing from {list}");
    }
    let (rows, total) = sipring::metrics::parse_hgrm(&admin_get(admin, "/hgrm/forward_INVITE"))
        .expect("hgrm parses");
    assert!(total >= 1 && !rows.is_empty());
    assert_eq!(admin_get(admin, "/health"), "ok\n");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn federation_over_mtls_and_an_untrusted_peer_is_refused() {
    let pki = Pki::new();
    let (port_a, port_b) = (free_port(), free_port());
    // Instance A: example.com, partner "partner" = instance B.
    let mut a_cfg = config(&pki);
    a_cfg.listen[1].address = format!("127.0.0.1:{port_a}").parse().unwrap();
    a_cfg.peer[0].address = Some(format!("127.0.0.1:{port_b}").parse().unwrap());
    // Instance B: partner.example.com with the partner CA's certificate; its partner "home"
    // is A, trusted through our CA.
    let mut b_cfg = config(&pki);
    b_cfg.server.domains = vec!["partner.example.com".into()];
    b_cfg.server.hostname = "sip.partner.example.com".into();
    b_cfg.listen[1].address = format!("127.0.0.1:{port_b}").parse().unwrap();
    b_cfg.tls.certificate[0].cert = pki.dir.join("partner.pem");
    b_cfg.tls.certificate[0].key = pki.dir.join("partner.key");
    b_cfg.tls.certificate[0].sni = vec!["sip.partner.example.com".into()];
    b_cfg.peer[0].name = "home".into();
    b_cfg.peer[0].domains = vec!["example.com".into()];
    b_cfg.peer[0].server_name = "sip.example.com".into();
    b_cfg.peer[0].roots = pki.dir.join("ca.pem");
    b_cfg.peer[0].crls = vec![pki.dir.join("ca.crl")];
    b_cfg.peer[0].address = Some(format!("127.0.0.1:{port_a}").parse().unwrap());
    b_cfg.auth.subscribers = Some(sipring_tests::server::write_subscribers(
        &pki.dir,
        "partner.example.com",
    ));
    let a = start(a_cfg, None).expect("start A");
    let b = start(b_cfg, None).expect("start B");

    let mut alice = registered(&pki, &a, "alice");
    let roots_b = pki.certs("partner-ca.pem");
    let mut bob = Ua::tls(
        b.listen_addrs[0],
        tls_config(&roots_b, None, false),
        "sip.partner.example.com",
        "bob",
        "partner.example.com",
    )
    .unwrap();
    assert_eq!(bob.register(600), 200);

    // alice@example.com calls bob@partner.example.com through the partner route.
    let inv = alice.request(
        "INVITE",
        "sip:bob@partner.example.com",
        "<sip:bob@partner.example.com>",
        "fed-1",
        1,
        "",
        None,
    );
    alice.send(&inv);
    let got = bob.expect("INVITE crossed the federation");
    assert_eq!(method(&got), "INVITE");
    let vias = header(&got, "Via").unwrap();
    assert!(vias.contains("sip.partner.example.com"), "{vias}");
    bob.send(&answer(
        &got,
        200,
        "OK",
        "fb",
        &format!("sip:bob@{}", bob.local),
    ));
    let (s, ok) = alice.expect_final_or_provisional("200 across the federation");
    assert_eq!(s, 200);
    // The caller's route set is the Record-Route list reversed (RFC 3261 §12.1.2).
    let rr = header(&ok, "Record-Route").unwrap();
    let mut rr: Vec<&str> = rr.split(", ").collect();
    rr.reverse();
    let rr = rr.join(", ");
    assert!(rr.starts_with("<sip:sip.example.com"), "{rr}");
    alice.send(&alice.request(
        "ACK",
        &format!("sip:bob@{}", bob.local),
        "<sip:bob@partner.example.com>;tag=fb",
        "fed-1",
        1,
        &format!("Route: {rr}\r\n"),
        None,
    ));
    assert_eq!(method(&bob.expect("ACK across")), "ACK");
    // BYE back from bob's side travels B → A over B's own link to its partner "home".
    let rr_b = sipring_tests::ua::header_all(&got, "Record-Route").unwrap();
    let bye = format!(
        "BYE sip:alice@{} SIP/2.0\r\nVia: SIP/2.0/TLS {};branch={}\r\nMax-Forwards: 70\r\nRoute: {rr_b}\r\nFrom: <sip:bob@partner.example.com>;tag=fb\r\nTo: <sip:alice@example.com>;tag=talice\r\nCall-ID: fed-1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        alice.local,
        bob.local,
        sipring_tests::ua::branch()
    );
    bob.send(bye.as_bytes());
    let got = alice.expect("BYE across");
    assert_eq!(method(&got), "BYE");
    alice.send(&answer(&got, 200, "OK", "talice", "sip:alice@127.0.0.1"));
    assert_eq!(bob.expect_final_or_provisional("200 to BYE across").0, 200);

    // A peer with a certificate from a CA no partner uses is refused at the handshake.
    let rogue = sipring::tls::pki::Ca::new("Rogue CA").unwrap();
    let cert = rogue
        .issue(&sipring::tls::pki::Spec::server("sip.partner.example.com"))
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let cfg = tls_config(
        &pki.certs("ca.pem"),
        Some((vec![cert.der.clone()], key)),
        false,
    );
    let refused = Ua::tls(
        format!("127.0.0.1:{port_a}").parse().unwrap(),
        cfg,
        "sip.example.com",
        "rogue",
        "x",
    )
    .and_then(|mut u| {
        // TLS 1.3: the refusal may arrive after the client thinks it is done.
        u.send(b"OPTIONS sip:example.com SIP/2.0\r\n\r\n");
        match u.recv(Duration::from_secs(2)) {
            Some(_) => Ok(()),
            None => Err(std::io::Error::other("closed")),
        }
    });
    assert!(refused.is_err(), "rogue peer was not refused");
    wait_metrics(a.admin_addr.unwrap(), "the rejection counted", |m| {
        metric(m, "sipring_tls_rejections_total{reason=\"unknown_issuer\"}").unwrap_or(0.0) >= 1.0
    });
    a.stop();
    b.stop();
    a.join().unwrap();
    b.join().unwrap();
}

#[test]
fn balanced_accept_spreads_long_lived_connections_evenly() {
    // A few long-lived trunks: with SO_REUSEPORT the kernel's hash may put them on one core;
    // the balanced mode hands each to the least-loaded shard.
    let pki = Pki::new();
    let mut cfg = config(&pki);
    cfg.server.accept = sipring::config::AcceptMode::Balanced;
    let srv = start(cfg, None).expect("start");
    let mut uas: Vec<Ua> = (0..6)
        .map(|i| registered(&pki, &srv, &format!("trunk{i}")))
        .collect();
    wait_metrics(srv.admin_addr.unwrap(), "6 connections", |m| {
        metric(m, "sipring_connections{kind=\"tls\"}") == Some(6.0)
    });
    let m = admin_get(srv.admin_addr.unwrap(), "/metrics/shards");
    for shard in 0..2 {
        assert_eq!(
            metric(
                &m,
                &format!("sipring_connections{{shard=\"{shard}\",kind=\"tls\"}}")
            ),
            Some(3.0),
            "shard {shard}:\n{m}"
        );
    }
    // Calls still work across the adopted connections.
    let (a, b) = uas.split_at_mut(1);
    let inv = call(&mut a[0], &mut b[0], "bal-1");
    hang_up(&mut b[0], &mut a[0], &inv, "bal-1");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn balanced_accept_spreads_a_burst_it_has_not_admitted_yet() {
    // A burst of connections (here: 40 silent ones, each a handshake in progress): the
    // accepting shard counted a handed socket only once its shard admitted it, so the
    // whole burst went to whichever shard looked least loaded when it began.
    let pki = Pki::new();
    let mut cfg = config(&pki);
    cfg.server.accept = sipring::config::AcceptMode::Balanced;
    cfg.tls.client_hello_timeout_ms = 10_000;
    let srv = start(cfg, None).expect("start");
    let addr = srv.listen_addrs[0];
    let socks: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let admin = srv.admin_addr.unwrap();
    wait_metrics(admin, "40 handshakes in progress", |m| {
        metric(m, "sipring_handshakes_in_flight") == Some(40.0)
    });
    let m = admin_get(admin, "/metrics/shards");
    for shard in 0..2 {
        let n = metric(
            &m,
            &format!("sipring_handshakes_in_flight{{shard=\"{shard}\"}}"),
        )
        .unwrap_or(0.0);
        assert!((18.0..=22.0).contains(&n), "shard {shard}: {n} of 40");
    }
    drop(socks);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn ipv6_listeners_and_every_method_passes_through() {
    let pki = Pki::new();
    let mut cfg = config(&pki);
    cfg.listen.push(sipring::config::ListenConfig {
        address: "[::1]:0".parse().unwrap(),
        ..Default::default()
    });
    cfg.server.local_hosts.push("::1".into());
    let srv = start(cfg, None).expect("start");
    let v6 = srv.listen_addrs[2];
    assert!(v6.is_ipv6());
    let mut alice = Ua::tls(
        v6,
        tls_config(&pki.certs("ca.pem"), None, false),
        "sip.example.com",
        "alice",
        "example.com",
    )
    .unwrap();
    assert!(alice.local.is_ipv6());
    assert_eq!(alice.register(600), 200, "REGISTER over IPv6");
    let mut bob = registered(&pki, &srv, "bob");
    // A call between an IPv6 and an IPv4 phone, then in-dialog INFO, UPDATE and PRACK
    // (anything with our Route follows the dialog's flows), then SUBSCRIBE/NOTIFY.
    let inv = call(&mut alice, &mut bob, "v6-1");
    let rr_b = sipring_tests::ua::header_all(&inv, "Record-Route").unwrap();
    for (n, m) in ["INFO", "UPDATE", "PRACK"].iter().enumerate() {
        let req = format!(
            "{m} sip:bob@{} SIP/2.0\r\nVia: SIP/2.0/TLS {};branch={}\r\nMax-Forwards: 70\r\nRoute: {rr_b}\r\nFrom: <sip:alice@example.com>;tag=talice\r\nTo: <sip:bob@example.com>;tag=b1\r\nCall-ID: v6-1\r\nCSeq: {} {m}\r\nContent-Length: 0\r\n\r\n",
            bob.local,
            alice.local,
            sipring_tests::ua::branch(),
            10 + n
        );
        alice.send(req.as_bytes());
        let got = bob.expect(m);
        assert_eq!(&method(&got), m);
        bob.send(&answer(&got, 200, "OK", "b1", "sip:bob@127.0.0.1"));
        assert_eq!(alice.expect_final_or_provisional(m).0, 200, "{m}");
    }
    hang_up(&mut bob, &mut alice, &inv, "v6-1");
    let sub = alice.request(
        "SUBSCRIBE",
        "sip:bob@example.com",
        "<sip:bob@example.com>",
        "sub-1",
        1,
        "Event: presence\r\nExpires: 60\r\n",
        None,
    );
    alice.send(&sub);
    let got = bob.expect("SUBSCRIBE");
    assert_eq!(method(&got), "SUBSCRIBE");
    assert!(
        header(&got, "Record-Route").is_some(),
        "SUBSCRIBE creates a dialog: Record-Route"
    );
    bob.send(&answer(&got, 200, "OK", "bs", "sip:bob@127.0.0.1"));
    assert_eq!(alice.expect_final_or_provisional("200 to SUBSCRIBE").0, 200);
    let rr = sipring_tests::ua::header_all(&got, "Record-Route").unwrap();
    let notify = format!(
        "NOTIFY sip:alice@{} SIP/2.0\r\nVia: SIP/2.0/TLS {};branch={}\r\nMax-Forwards: 70\r\nRoute: {rr}\r\nFrom: <sip:bob@example.com>;tag=bs\r\nTo: <sip:alice@example.com>;tag=talice\r\nCall-ID: sub-1\r\nCSeq: 1 NOTIFY\r\nEvent: presence\r\nSubscription-State: active\r\nContent-Length: 0\r\n\r\n",
        alice.local,
        bob.local,
        sipring_tests::ua::branch()
    );
    bob.send(notify.as_bytes());
    let got = alice.expect("NOTIFY over IPv6");
    assert_eq!(method(&got), "NOTIFY");
    alice.send(&answer(&got, 200, "OK", "talice", "sip:alice@[::1]"));
    assert_eq!(bob.expect_final_or_provisional("200 to NOTIFY").0, 200);
    srv.stop();
    srv.join().unwrap();
}

/// A one-shard server with the test's configuration changes.
fn one_shard(pki: &Pki, change: impl FnOnce(&mut sipring::config::Config)) -> Running {
    let mut cfg = config(pki);
    cfg.server.shards = 1;
    change(&mut cfg);
    start(cfg, None).expect("start")
}

/// A MESSAGE from `from` to `to` with a body of `len` bytes whose first line is `tag`.
fn big_message(from: &Ua, to: &str, call_id: &str, tag: &str, len: usize) -> Vec<u8> {
    let mut body = format!("{tag}\n");
    while body.len() < len {
        body.push('x');
    }
    from.request(
        "MESSAGE",
        &format!("sip:{to}@example.com"),
        &format!("<sip:{to}@example.com>"),
        call_id,
        1,
        "",
        Some(("text/plain", &body)),
    )
}

/// Sends 8 KB MESSAGEs from `from` to `to` (body line `seq N`) in batches of 100 until the
/// metrics satisfy `done` (bounded: 5,000 messages, 40 MB); returns how many were sent.
fn flood_until(
    from: &mut Ua,
    to: &str,
    admin: std::net::SocketAddr,
    done: impl Fn(&str) -> bool,
) -> usize {
    let mut n = 0;
    while n < 5000 {
        for _ in 0..100 {
            let m = big_message(from, to, &format!("f-{n}"), &format!("seq {n}"), 8000);
            from.send(&m);
            n += 1;
        }
        // Snapshots are published every 500 ms.
        std::thread::sleep(Duration::from_millis(100));
        if done(&admin_get(admin, "/metrics")) {
            break;
        }
    }
    n
}

#[test]
fn a_reader_that_stalls_is_queued_for_then_flushed_in_order() {
    let pki = Pki::new();
    let srv = one_shard(&pki, |cfg| cfg.limits.write_queue_bytes = 64 << 20);
    let mut alice = registered(&pki, &srv, "alice");
    let mut bob = registered(&pki, &srv, "bob");
    // Bob stops reading while MESSAGEs are forwarded to him until the kernel's socket
    // buffers are full and the server has to queue.
    let admin = srv.admin_addr.unwrap();
    let n = flood_until(&mut alice, "bob", admin, |m| {
        metric(m, "sipring_writes_queued_total").unwrap_or(0.0) > 0.0
    });
    wait_metrics(admin, "queued writes", |m| {
        metric(m, "sipring_writes_queued_total").unwrap_or(0.0) > 0.0
    });
    for i in 0..n {
        let got = bob.expect("queued MESSAGE");
        assert_eq!(method(&got), "MESSAGE");
        let body = got.split(|&b| b == b'\n').find(|l| l.starts_with(b"seq "));
        assert_eq!(
            body,
            Some(format!("seq {i}").as_bytes()),
            "message {i} in order"
        );
        bob.send(&answer(&got, 200, "OK", "b", "sip:bob@127.0.0.1"));
    }
    for _ in 0..n {
        assert_eq!(alice.expect_final_or_provisional("200 to MESSAGE").0, 200);
    }
    let m = admin_get(srv.admin_addr.unwrap(), "/metrics");
    assert_eq!(
        metric(&m, "sipring_queue_drops_total{queue=\"connection\"}"),
        None
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_reader_slower_than_its_write_queue_is_disconnected_and_the_shard_goes_on() {
    let pki = Pki::new();
    let srv = one_shard(&pki, |cfg| {
        cfg.limits.write_queue_bytes = 64 << 10;
        // At most half a write queue (a partner link being dialled holds half).
        cfg.limits.max_message = 16 << 10;
    });
    let mut alice = registered(&pki, &srv, "alice");
    let mut bob = registered(&pki, &srv, "bob");
    let admin = srv.admin_addr.unwrap();
    let dropped = |m: &str| {
        metric(m, "sipring_queue_drops_total{queue=\"connection\"}").unwrap_or(0.0) >= 1.0
    };
    let sent = flood_until(&mut alice, "bob", admin, dropped);
    wait_metrics(admin, "the slow reader dropped", |m| {
        dropped(m) && metric(m, "sipring_bindings").unwrap_or(1.0) == 1.0
    });
    // Bob gets what the kernel buffered, then the end of the connection.
    let mut got = 0;
    while bob.recv(Duration::from_secs(5)).is_some() {
        got += 1;
        assert!(got <= sent, "more messages than were sent");
    }
    assert!(
        got < sent,
        "a dropped slow reader cannot have received everything"
    );
    // The shard still serves others: a new UA registers and reaches alice.
    let mut carol = registered(&pki, &srv, "carol");
    carol.send(&big_message(&carol, "alice", "c-1", "hello alice", 100));
    // Bounded: alice's own answers (at most the requests she sent) come first.
    let mut reached = false;
    for _ in 0..=sent {
        let m = alice.expect("carol's MESSAGE among alice's answers");
        if method(&m) == "MESSAGE" {
            alice.send(&answer(&m, 200, "OK", "a", "sip:alice@127.0.0.1"));
            reached = true;
            break;
        }
    }
    assert!(reached, "carol's MESSAGE never reached alice");
    assert_eq!(carol.expect_final_or_provisional("200").0, 200);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn an_idle_connection_is_closed_by_the_sweep_unless_keepalives_or_a_binding_keep_it() {
    let pki = Pki::new();
    let srv = one_shard(&pki, |cfg| {
        cfg.limits.idle_timeout_s = 1;
        cfg.registrar.min_expires_s = 1;
    });
    // Silent after connecting: nothing keeps it.
    let mut silent = anonymous(&pki, &srv, "x");
    // Registered for 2 s, then silent: kept until its binding runs out, not after.
    let mut quiet = ua(&pki, &srv, "quiet");
    assert_eq!(quiet.register(2), 200);
    // Registered for 600 s and silent, as a phone without keepalives is: the idle sweep
    // used to close it after idle_timeout_s, taking the binding its 200 OK granted.
    let mut held = registered(&pki, &srv, "slow");
    // Registered for 600 s, then unregistered: nothing keeps it any more.
    let mut gone = registered(&pki, &srv, "fast");
    assert_eq!(gone.register(0), 200);
    let mut chatty = registered(&pki, &srv, "chatty");
    let t0 = std::time::Instant::now();
    // chatty pings every 300 ms (RFC 5626 CRLF keepalive) and gets pongs.
    while t0.elapsed() < Duration::from_millis(3000) {
        chatty.send(b"\r\n\r\n");
        std::thread::sleep(Duration::from_millis(300));
    }
    // The server closed all three (close_notify → EOF; a read timing out is no close).
    assert!(
        silent.closed_within(Duration::from_secs(3)),
        "idle connection closed"
    );
    assert!(
        quiet.closed_within(Duration::from_secs(3)),
        "idle connection closed once its binding ran out"
    );
    assert!(
        gone.closed_within(Duration::from_secs(3)),
        "idle connection closed once its binding was removed"
    );
    let m = wait_metrics(srv.admin_addr.unwrap(), "three idle timeouts", |m| {
        metric(m, "sipring_idle_timeouts_total") == Some(3.0)
    });
    assert_eq!(
        metric(&m, "sipring_bindings"),
        Some(2.0),
        "held's and chatty's bindings are left"
    );
    // Both are still registered and reachable.
    let mut x = ua(&pki, &srv, "x");
    for (i, (u, name)) in [(&mut chatty, "chatty"), (&mut held, "slow")]
        .into_iter()
        .enumerate()
    {
        x.send(&big_message(&x, name, &format!("i-{i}"), "still there", 10));
        let got = u.expect("MESSAGE to a UA the sweep left open");
        assert_eq!(method(&got), "MESSAGE");
        u.send(&answer(
            &got,
            200,
            "OK",
            "c",
            &format!("sip:{name}@127.0.0.1"),
        ));
        assert_eq!(x.expect_final_or_provisional("200").0, 200);
    }
    srv.stop();
    srv.join().unwrap();
}

/// Whether the kernel runs a keepalive timer on the server's side of a connection from
/// `client` (`/proc/net/tcp`: the `tr` field is 2 for the keepalive timer — once nothing
/// waits for an ACK, since a pending retransmit timer shows as 1), if it is there.
fn keepalive_timer(server_port: u16, client: std::net::SocketAddr) -> Option<bool> {
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
    let t0 = std::time::Instant::now();
    loop {
        let t = std::fs::read_to_string("/proc/net/tcp").ok()?;
        let f: Vec<String> = t.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 5 && port(f[1])? == server_port && port(f[2])? == client.port())
                .then(|| f.iter().map(|s| s.to_string()).collect())
        })?;
        let unacked = !f[4].starts_with("00000000:");
        if !unacked || t0.elapsed() > Duration::from_secs(3) {
            return Some(f[5].starts_with("02:"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_registration_is_answered_with_the_date() {
    // RFC 3261 §10.3 step 8: phones without NTP (many ATAs) set their clocks by it.
    let pki = Pki::new();
    let srv = one_shard(&pki, |_| {});
    let mut alice = ua(&pki, &srv, "alice");
    let (code, resp) = alice.register_with(600, "");
    assert_eq!(code, 200);
    let text = String::from_utf8_lossy(&resp);
    let date = text
        .lines()
        .find_map(|l| l.strip_prefix("Date: "))
        .unwrap_or_else(|| panic!("no Date in\n{text}"));
    let at = httpdate::parse_http_date(date).expect("an RFC 1123 date");
    let now = std::time::SystemTime::now();
    let off = now.duration_since(at).unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_secs(5), "{date} is {off:?} from now");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn connections_carry_tcp_keepalive() {
    // A registration keeps its connection past the idle sweep: a phone that vanished
    // behind it (powered off, its NAT binding gone) must still be found dead.
    let pki = Pki::new();
    for (secs, want) in [(300, true), (0, false)] {
        let srv = one_shard(&pki, |cfg| cfg.limits.tcp_keepalive_s = secs);
        let alice = registered(&pki, &srv, "alice");
        assert_eq!(
            keepalive_timer(srv.listen_addrs[0].port(), alice.local),
            Some(want),
            "tcp_keepalive_s = {secs}"
        );
        srv.stop();
        srv.join().unwrap();
    }
}

#[test]
fn connections_that_never_finish_a_handshake_release_their_source_address_slot() {
    let pki = Pki::new();
    let srv = one_shard(&pki, |cfg| cfg.limits.max_connections_per_ip = 2);
    let admin = srv.admin_addr.unwrap();
    // A load balancer's TCP health checks, one after the other: connect, close, no TLS.
    for i in 1..=5 {
        drop(std::net::TcpStream::connect(srv.listen_addrs[0]).expect("connect"));
        wait_metrics(admin, "the health check's handshake aborted", |m| {
            metric(
                m,
                "sipring_handshakes_total{kind=\"tls\",result=\"aborted\"}",
            ) == Some(f64::from(i))
        });
    }
    // The limit is 2 per address: both real clients still get in.
    let _a = registered(&pki, &srv, "a");
    let _b = registered(&pki, &srv, "b");
    let m = admin_get(admin, "/metrics");
    assert_eq!(
        metric(
            &m,
            "sipring_connections_refused_total{limit=\"max_connections_per_ip\"}"
        ),
        None
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_framing_error_is_answered_then_the_connection_closes() {
    let pki = Pki::new();
    let srv = one_shard(&pki, |_| {});
    let admin = srv.admin_addr.unwrap();
    let mut u = ua(&pki, &srv, "mallory");
    // A Content-Length that is not a number loses the stream's framing; 200 KB more follow
    // in the same write, which the server will never read.
    let mut bytes = b"OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1;branch=z9hG4bKfr\r\nTo: <sip:example.com>\r\nFrom: <sip:m@example.com>;tag=m\r\nCall-ID: fr-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: abc\r\n\r\n".to_vec();
    bytes.extend(std::iter::repeat_n(b'x', 200_000));
    u.send(&bytes);
    let (code, _) = u.expect_final_or_provisional("the framing error's answer");
    assert_eq!(code, 400);
    assert!(
        u.recv(Duration::from_secs(2)).is_none(),
        "then the connection ends"
    );
    wait_metrics(
        admin,
        "the framing error counted and the connection gone",
        |m| {
            metric(
                m,
                "sipring_parse_errors_total{reason=\"invalid_content_length\"}",
            ) == Some(1.0)
                && metric(m, "sipring_connections{kind=\"tls\"}") == Some(0.0)
        },
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_burst_past_the_mesh_capacity_waits_in_order_instead_of_503() {
    let pki = Pki::new();
    // Channels of two messages between the shards: any burst overflows them.
    let mut cfg = config(&pki);
    cfg.server.mesh_capacity = 2;
    let srv = start(cfg, None).expect("start");
    let mut bob = registered(&pki, &srv, "bob");
    // A caller on the other shard than bob's connection: every MESSAGE and every answer
    // crosses the mesh.
    let mut alice = caller_on_another_shard(&pki, &srv, &mut bob);
    const N: u32 = 200;
    let mut burst = Vec::new();
    for n in 1..=N {
        burst.extend(alice.request(
            "MESSAGE",
            "sip:bob@example.com",
            "<sip:bob@example.com>",
            "burst",
            n,
            "",
            Some(("text/plain", "hi")),
        ));
    }
    alice.send(&burst);
    for n in 1..=N {
        let got = bob.expect("a MESSAGE of the burst");
        let cseq = header(&got, "CSeq").expect("CSeq");
        if cseq.trim() != format!("{n} MESSAGE") {
            while let Some(r) = alice.recv(Duration::from_millis(500)) {
                eprintln!("alice got: {}", String::from_utf8_lossy(&r));
            }
        }
        assert_eq!(cseq.trim(), format!("{n} MESSAGE"), "in the order sent");
        bob.send(&answer(&got, 200, "OK", "b", "sip:bob@127.0.0.1"));
    }
    for n in 1..=N {
        let r = alice.expect("an answer");
        let cseq = header(&r, "CSeq").expect("CSeq");
        assert_eq!(
            (sipring_tests::ua::status(&r), cseq.trim()),
            (Some(200), format!("{n} MESSAGE").as_str()),
            "every MESSAGE answered 200, in order"
        );
    }
    let m = wait_metrics(srv.admin_addr.unwrap(), "cross-shard sends", |m| {
        metric(m, "sipring_cross_shard_total{op=\"send\"}").unwrap_or(0.0) >= f64::from(N)
    });
    assert_eq!(metric(&m, "sipring_overload_503_total"), None);
    srv.stop();
    srv.join().unwrap();
}
