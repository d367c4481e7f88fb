//! The trust model over real sockets on loopback: a partner connecting to the `mtls` listener
//! (TLS 1.2 and 1.3, accepted and refused for each kind of bad certificate, counted per
//! reason), our outbound connection refusing a partner that presents the wrong name, and
//! Debian's `openssl s_client` as a non-rustls peer, accepted and refused.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sipring::server::start;
use sipring::tls::pki::{Ca, Issued, Spec, Usage};
use sipring_tests::server::{Pki, config, metric, wait_metrics};
use sipring_tests::ua::{Ua, tls_config};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

fn key(i: &Issued) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(i.key_pem.as_bytes()).unwrap()
}

/// Connects to the mtls listener as a partner presenting `cert`, sends OPTIONS to the server
/// and returns whether a 200 came back.
fn partner_options(
    pki: &Pki,
    addr: std::net::SocketAddr,
    cert: Option<(&Issued, &[CertificateDer<'static>])>,
    tls12: bool,
) -> bool {
    let client = cert.map(|(c, chain)| {
        let mut v = vec![c.der.clone()];
        v.extend_from_slice(chain);
        (v, key(c))
    });
    let cfg = tls_config(&pki.certs("ca.pem"), client, tls12);
    let Ok(mut u) = Ua::tls(
        addr,
        cfg,
        "sip.example.com",
        "partner",
        "partner.example.com",
    ) else {
        return false;
    };
    let opt = b"OPTIONS sip:sip.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1;branch=z9hG4bKopt1\r\nMax-Forwards: 70\r\nTo: <sip:sip.example.com>\r\nFrom: <sip:probe@partner.example.com>;tag=p\r\nCall-ID: opt-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
    let mut ok = false;
    // The write may fail if the server already refused us.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| u.send(opt))).is_ok() {
        ok = u
            .recv(Duration::from_secs(3))
            .is_some_and(|m| m.starts_with(b"SIP/2.0 200"));
    }
    ok
}

#[test]
fn clients_filling_the_handshake_slots_leave_room_for_partners() {
    // The client listener takes at most seven eighths of the handshake slots: silent (or
    // slow) connections to it, from however many addresses, kept partners and cluster nodes
    // from dialling in on `mtls`, which shares the slots.
    let pki = Pki::new();
    let mut cfg = config(&pki);
    cfg.server.shards = 1;
    cfg.limits.max_handshakes_in_flight = 16;
    cfg.limits.max_handshakes_per_ip = 100;
    cfg.limits.max_handshakes_per_ip_per_s = 0;
    let srv = start(cfg, None).expect("start");
    let (tls, mtls) = (srv.listen_addrs[0], srv.listen_addrs[1]);
    let silent: Vec<_> = (0..16)
        .map(|_| std::net::TcpStream::connect(tls).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let good = (pki.certs("partner.pem"), pki.key("partner.key"));
    let cfg = tls_config(&pki.certs("ca.pem"), Some((good.0, good.1)), false);
    let u = Ua::tls(mtls, cfg, "sip.example.com", "p", "partner.example.com");
    assert!(u.is_ok(), "the partner's handshake: {:?}", u.err());
    wait_metrics(srv.admin_addr.unwrap(), "clients refused past 14", |m| {
        metric(
            m,
            "sipring_connections_refused_total{limit=\"max_handshakes_in_flight\"}",
        )
        .unwrap_or(0.0)
            >= 2.0
    });
    drop(silent);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn mtls_listener_accepts_and_refuses_over_sockets() {
    let pki = Pki::new();
    let srv = start(config(&pki), None).expect("start");
    let mtls = srv.listen_addrs[1];
    let admin = srv.admin_addr.unwrap();
    let good = (pki.certs("partner.pem"), pki.key("partner.key"));
    for tls12 in [false, true] {
        let cfg = tls_config(
            &pki.certs("ca.pem"),
            Some((good.0.clone(), good.1.clone_key())),
            tls12,
        );
        let mut u = Ua::tls(mtls, cfg, "sip.example.com", "p", "partner.example.com")
            .expect("partner handshake");
        u.send(b"OPTIONS sip:sip.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1;branch=z9hG4bKo9\r\nMax-Forwards: 70\r\nTo: <sip:sip.example.com>\r\nFrom: <sip:p@partner.example.com>;tag=p\r\nCall-ID: o9\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n");
        let r = u.recv(Duration::from_secs(3)).expect("OPTIONS answered");
        assert!(
            r.starts_with(b"SIP/2.0 200"),
            "TLS 1.{}",
            if tls12 { 2 } else { 3 }
        );
    }
    // Certificates the partner should never present.
    let rogue = Ca::new("Rogue CA").unwrap();
    let ours = {
        // A certificate from *our* CA is not good enough for the partner's name.
        let chain = pki.certs("client.pem");
        (chain, pki.key("client.key"))
    };
    let expired = rogue
        .issue(&Spec {
            valid_from: time::Duration::days(-9),
            valid_until: time::Duration::days(-1),
            ..Spec::server("sip.partner.example.com")
        })
        .unwrap();
    let unknown = rogue
        .issue(&Spec::server("sip.partner.example.com"))
        .unwrap();
    let bad_eku = rogue
        .issue(&Spec {
            usage: Usage::CodeSigning,
            ..Spec::server("sip.partner.example.com")
        })
        .unwrap();
    for tls12 in [false, true] {
        assert!(
            !partner_options(&pki, mtls, None, tls12),
            "no certificate accepted"
        );
        assert!(
            !partner_options(&pki, mtls, Some((&unknown, &[])), tls12),
            "unknown CA accepted"
        );
        assert!(
            !partner_options(&pki, mtls, Some((&expired, &[])), tls12),
            "expired accepted"
        );
        assert!(
            !partner_options(&pki, mtls, Some((&bad_eku, &[])), tls12),
            "bad EKU accepted"
        );
        let cfg = tls_config(
            &pki.certs("ca.pem"),
            Some((ours.0.clone(), ours.1.clone_key())),
            tls12,
        );
        // A real request (a ping is never answered, accepted or not): neither answered nor
        // left open.
        let accepted = Ua::tls(mtls, cfg, "sip.example.com", "x", "x").is_ok_and(|mut u| {
            let opt = b"OPTIONS sip:sip.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1;branch=z9hG4bKown1\r\nMax-Forwards: 70\r\nTo: <sip:sip.example.com>\r\nFrom: <sip:probe@example.com>;tag=p\r\nCall-ID: own-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
            let sent =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| u.send(opt))).is_ok();
            (sent
                && u.recv(Duration::from_secs(2))
                    .is_some_and(|m| m.starts_with(b"SIP/2.0")))
                || !u.closed_within(Duration::from_secs(3))
        });
        assert!(
            !accepted,
            "our own client certificate accepted as a partner"
        );
    }
    // Each refusal is counted under its own reason, once per TLS version (webpki checks a
    // certificate's own validity and EKU before it looks for the issuer).
    wait_metrics(admin, "rejections by reason", |m| {
        [
            "no_certificate",
            "unknown_issuer",
            "expired",
            "bad_eku",
            "name_not_trusted",
        ]
        .iter()
        .all(|r| {
            metric(
                m,
                &format!("sipring_tls_rejections_total{{reason=\"{r}\"}}"),
            ) == Some(2.0)
        })
    });
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn outbound_refuses_a_partner_presenting_the_wrong_name() {
    let pki = Pki::new();
    // A fake partner: a TLS server presenting a certificate from the partner CA, but for
    // another name. It never gets a SIP byte.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let wrong = pki_partner_issue(&pki, "sip.impostor.example.com");
    let server_cfg = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![wrong.0], wrong.1)
        .unwrap(),
    );
    fake_partner(listener, server_cfg, 4);
    let (srv, mut alice) = toward_partner_at(&pki, port);
    alice.send(&alice.request(
        "MESSAGE",
        "sip:bob@partner.example.com",
        "<sip:bob@partner.example.com>",
        "out-1",
        1,
        "",
        Some(("text/plain", "hi")),
    ));
    let (s, _) = alice.expect_final_or_provisional("answer for an unreachable partner");
    assert_eq!(
        s, 500,
        "a partner that fails verification is a transport failure (a 503, RFC 3261 §16.9), \
         which goes upstream as 500 (§16.7 step 6)"
    );
    wait_metrics(srv.admin_addr.unwrap(), "name mismatch counted", |m| {
        metric(m, "sipring_tls_rejections_total{reason=\"name_mismatch\"}").unwrap_or(0.0) >= 1.0
    });
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_partner_that_is_down_is_not_dialled_once_per_request() {
    // Nothing listens at the partner's address: each dial fails at once. Before, every
    // request to the partner dialled again (a connect storm, and a WARN line each); now a
    // failed dial holds the next off (1 s, doubling), and requests meanwhile fail at once.
    let pki = Pki::new();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let mut cfg = config(&pki);
    cfg.peer[0].address = Some(addr);
    let srv = start(cfg, None).expect("start");
    let mut alice = registered_alice(&pki, &srv);
    let t0 = std::time::Instant::now();
    for i in 0..20 {
        alice.send(&alice.request(
            "MESSAGE",
            "sip:bob@partner.example.com",
            "<sip:bob@partner.example.com>",
            &format!("down-{i}"),
            1,
            "",
            Some(("text/plain", "hi")),
        ));
        let (s, _) = alice.expect_final_or_provisional("answer for a partner that is down");
        assert_eq!(
            s, 500,
            "a transport failure, at once (not a 408 after 32 s)"
        );
    }
    let took = t0.elapsed();
    // Metrics are published every few hundred ms; nothing dials after the last request.
    wait_metrics(
        srv.admin_addr.unwrap(),
        "the dials and the backoff counted",
        |m| {
            metric(m, "sipring_peer_connect_failures_total").unwrap_or(0.0) >= 1.0
                && metric(m, "sipring_queue_drops_total{queue=\"peer_down\"}").unwrap_or(0.0) >= 1.0
        },
    );
    let m = sipring_tests::server::admin_get(srv.admin_addr.unwrap(), "/metrics");
    let dials = metric(&m, "sipring_peer_connect_failures_total").unwrap_or(0.0);
    // One dial per elapsed second at most (the backoff doubles): 20 requests, few dials.
    assert!(
        dials >= 1.0 && dials <= 1.0 + took.as_secs_f64().ceil(),
        "{dials} dials for 20 requests in {took:?}"
    );
    assert!(
        metric(&m, "sipring_queue_drops_total{queue=\"peer_down\"}").unwrap_or(0.0) >= 1.0,
        "requests during the backoff are counted"
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_partner_that_refuses_our_certificate_after_the_handshake_is_not_dialled_once_per_request() {
    // Under TLS 1.3 our side of the handshake is done before the partner has checked our
    // certificate: its refusal (it no longer trusts our CA) comes as the first record. The
    // link counted as up, which cleared the backoff: each request dialled again.
    let pki = Pki::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let ours = pki_partner_issue(&pki, "sip.partner.example.com");
    let other = Ca::new("A CA the partner trusts instead of ours").unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(other.cert.der.clone()).unwrap();
    let server_cfg = partner_server(roots, ours, &[&rustls::version::TLS13]);
    let dials = fake_partner(listener, server_cfg, 64);
    let (srv, mut alice) = toward_partner_at(&pki, port);
    // A request every 100 ms for 4.5 s: dials at 0, 1 and 3 s (the wait doubles: 1 s,
    // 2 s, 4 s), not one per request, nor one a second (our own dial's link once cleared
    // the backoff as it came up, so it never grew).
    let t0 = std::time::Instant::now();
    let mut i = 0;
    while t0.elapsed() < Duration::from_millis(4500) {
        i += 1;
        alice.send(&alice.request(
            "MESSAGE",
            "sip:bob@partner.example.com",
            "<sip:bob@partner.example.com>",
            &format!("refused-{i}"),
            1,
            "",
            Some(("text/plain", "hi")),
        ));
        let (s, _) = alice.expect_final_or_provisional("answer for a partner that refuses us");
        assert_eq!(s, 500, "a transport failure, at once");
        std::thread::sleep(Duration::from_millis(100));
    }
    let dials = dials.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=3).contains(&dials),
        "{dials} dials for {i} requests in {:?}",
        t0.elapsed()
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn what_waited_for_a_partner_link_does_not_close_it_as_it_comes_up() {
    // Up to 4 MiB could wait for a link being dialled, and all of it is handed to the link
    // when it comes up; a partner that does not read at once (our flush arrives with its
    // first records) left more than the link's own cap (`limits.write_queue_bytes`, 1 MiB)
    // queued, and the new link was closed as a slow reader: everything lost, the dial
    // counted as failed, and the next slow dial did it again.
    let pki = Pki::new();
    // Segments of a WAN link, not loopback's 64 KiB: the kernel sizes our send buffer by
    // them, and with loopback's it took megabytes at once, hiding the queue.
    let listener = {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_tcp_mss(1400).unwrap();
        s.set_recv_buffer_size(64 * 1024).unwrap();
        s.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        s.listen(16).unwrap();
        std::net::TcpListener::from(s)
    };
    let port = listener.local_addr().unwrap().port();
    let partner_cfg = the_partner(&pki, rustls::DEFAULT_VERSIONS);
    // The partner: slow to handshake (the requests wait for the link), then slow to read.
    let partner = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        let mut conn = rustls::ServerConnection::new(partner_cfg).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut s).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1500));
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let mut tls = rustls::Stream::new(&mut conn, &mut s);
        let (mut got, mut buf) = (Vec::new(), vec![0u8; 64 * 1024]);
        let closed = loop {
            match tls.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break false,
                Err(_) => break true,
            }
        };
        let messages = got.windows(8).filter(|w| w == b"MESSAGE ").count();
        (messages, closed)
    });
    let (srv, mut alice) = toward_partner_at(&pki, port);
    // About 2 MB toward the partner while the link is being dialled.
    let body = "x".repeat(1800);
    for i in 0..900 {
        alice.send(&alice.request(
            "MESSAGE",
            "sip:bob@partner.example.com",
            "<sip:bob@partner.example.com>",
            &format!("waits-{i}"),
            1,
            "",
            Some(("text/plain", &body)),
        ));
    }
    // What found the dial queue full fails at once (503 from the link, 500 upstream), while
    // the partner still handshakes; it waited for Timer F (32 s).
    let mut failed = 0;
    while let Some(r) = alice.recv(Duration::from_millis(1500)) {
        failed += usize::from(r.starts_with(b"SIP/2.0 500 "));
    }
    assert!(failed > 100, "{failed} requests failed at once");
    let (messages, closed) = partner.join().unwrap();
    let m = sipring_tests::server::admin_get(srv.admin_addr.unwrap(), "/metrics");
    let slow = metric(&m, "sipring_queue_drops_total{queue=\"connection\"}").unwrap_or(0.0);
    assert_eq!(slow, 0.0, "the link was closed as a slow reader");
    assert!(!closed, "the link was closed ({messages} messages read)");
    assert!(messages > 100, "{messages} messages reached the partner");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_quiet_link_we_dialled_is_kept_up_by_pings_its_partner_answers() {
    // The idle sweep closed our own link to a partner after `limits.idle_timeout_s` without
    // traffic, healthy or not, and the next call waited for a dial and a handshake. Now a
    // link quiet for half that is pinged (RFC 5626 CRLFCRLF), and the pong keeps it.
    let pki = Pki::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let partner_cfg = the_partner(&pki, rustls::DEFAULT_VERSIONS);
    // The partner answers every ping with a pong, for 5 s; it counts the pings, and says
    // whether we closed the link meanwhile.
    let partner = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut conn = rustls::ServerConnection::new(partner_cfg).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(5);
        let mut tls = rustls::Stream::new(&mut conn, &mut s);
        let (mut got, mut buf, mut pings) = (Vec::new(), vec![0u8; 16384], 0);
        while std::time::Instant::now() < end {
            match tls.read(&mut buf) {
                Ok(0) => return (pings, true),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return (pings, true),
            }
            // What is not a ping is the MESSAGE (no body) that opened the link: dropped,
            // unanswered.
            while let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                if i == 0 {
                    pings += 1;
                    tls.write_all(b"\r\n").unwrap();
                }
                got.drain(..i + 4);
            }
        }
        (pings, false)
    });
    let mut cfg = config(&pki);
    cfg.peer[0].address = Some(format!("127.0.0.1:{port}").parse().unwrap());
    cfg.limits.idle_timeout_s = 2;
    let srv = start(cfg, None).expect("start");
    let mut alice = registered_alice(&pki, &srv);
    alice.send(&alice.request(
        "MESSAGE",
        "sip:bob@partner.example.com",
        "<sip:bob@partner.example.com>",
        "quiet-1",
        1,
        "",
        None,
    ));
    let (pings, closed) = partner.join().unwrap();
    assert!(!closed, "the link was closed after {pings} pings");
    assert!(pings >= 2, "{pings} pings in 5 s");
    srv.stop();
    srv.join().unwrap();
}

/// The demo partner's TLS server (sip.partner.example.com, from the partner CA), trusting
/// our CA for the client certificates we dial with.
fn the_partner(
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::sync::Arc<rustls::ServerConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pki.certs("ca.pem") {
        roots.add(c).unwrap();
    }
    partner_server(
        roots,
        pki_partner_issue(pki, "sip.partner.example.com"),
        versions,
    )
}

/// A partner's TLS server: its certificate, and client certificates verified against `roots`.
fn partner_server(
    roots: rustls::RootCertStore,
    (chain, key): (CertificateDer<'static>, PrivateKeyDer<'static>),
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::sync::Arc<rustls::ServerConfig> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![chain], key)
            .unwrap(),
    )
}

/// A fake partner on `listener`: for each of its first `max` connections, a TLS handshake
/// under `cfg` and one read. Counts the connections (our dials).
fn fake_partner(
    listener: std::net::TcpListener,
    cfg: std::sync::Arc<rustls::ServerConfig>,
    max: usize,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let dials = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = dials.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().take(max).flatten() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let mut conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut s = s;
                let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                let mut tls = rustls::Stream::new(&mut conn, &mut s);
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf);
            });
        }
    });
    dials
}

/// A server whose partner is at 127.0.0.1:`port`, and alice registered to it.
fn toward_partner_at(pki: &Pki, port: u16) -> (sipring::server::Running, Ua) {
    let mut cfg = config(pki);
    cfg.peer[0].address = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let srv = start(cfg, None).expect("start");
    let alice = registered_alice(pki, &srv);
    (srv, alice)
}

/// alice, registered over TLS to `srv`, to send requests toward the partner.
fn registered_alice(pki: &Pki, srv: &sipring::server::Running) -> Ua {
    let mut alice = Ua::tls(
        srv.listen_addrs[0],
        tls_config(&pki.certs("ca.pem"), None, false),
        "sip.example.com",
        "alice",
        "example.com",
    )
    .unwrap();
    assert_eq!(alice.register(600), 200);
    alice
}

/// Issues a certificate from the demo partner CA (its key is in the PKI folder).
fn pki_partner_issue(pki: &Pki, name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = rcgen_key(&std::fs::read_to_string(pki.dir.join("partner-ca.key")).unwrap());
    let ca_cert = std::fs::read_to_string(pki.dir.join("partner-ca.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_key).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let k = rcgen::KeyPair::generate().unwrap();
    let c = p.signed_by(&k, &issuer).unwrap();
    (
        c.der().clone(),
        PrivateKeyDer::from_pem_slice(k.serialize_pem().as_bytes()).unwrap(),
    )
}

fn rcgen_key(pem: &str) -> rcgen::KeyPair {
    rcgen::KeyPair::from_pem(pem).unwrap()
}

/// `openssl s_client` with this certificate; returns its stdout+stderr.
fn s_client(pki: &Pki, port: u16, cert: &str, key: &str) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "sip.example.com",
            "-CAfile",
        ])
        .arg(pki.dir.join("ca.pem"))
        .arg("-cert")
        .arg(pki.dir.join(cert))
        .arg("-key")
        .arg(pki.dir.join(key))
        .args(["-verify_return_error", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed by tests/run.sh");
    let mut stdin = child.stdin.take().unwrap();
    let opt = "OPTIONS sip:sip.example.com SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1;branch=z9hG4bKossl\r\nMax-Forwards: 70\r\nTo: <sip:sip.example.com>\r\nFrom: <sip:ossl@partner.example.com>;tag=o\r\nCall-ID: ossl-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
    std::thread::sleep(Duration::from_millis(500));
    let _ = stdin.write_all(opt.as_bytes());
    std::thread::sleep(Duration::from_millis(1500));
    drop(stdin);
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn openssl_s_client_as_a_partner() {
    let pki = Pki::new();
    let srv = start(config(&pki), None).expect("start");
    let port = srv.listen_addrs[1].port();
    let ok = s_client(&pki, port, "partner.pem", "partner.key");
    assert!(ok.contains("Verify return code: 0"), "{ok}");
    assert!(
        ok.contains("SIP/2.0 200 OK"),
        "MTLS with openssl: no 200 to OPTIONS\n{ok}"
    );
    // Our own CA's client certificate is not a partner identity: refused.
    let refused = s_client(&pki, port, "client.pem", "client.key");
    assert!(!refused.contains("SIP/2.0 200"), "{refused}");
    assert!(
        refused.to_lowercase().contains("alert"),
        "expected a TLS alert:\n{refused}"
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_stalled_handshake_times_out_and_is_counted() {
    // A peer that connects and never says a word, and one that stops mid-handshake.
    let pki = Pki::new();
    let mut cfg = config(&pki);
    cfg.tls.handshake_timeout_ms = 300;
    let srv = start(cfg, None).expect("start");
    let mut silent = std::net::TcpStream::connect(srv.listen_addrs[1]).unwrap();
    let mut half = std::net::TcpStream::connect(srv.listen_addrs[0]).unwrap();
    // A ClientHello record header promising 512 bytes, then nothing.
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    wait_metrics(srv.admin_addr.unwrap(), "two handshake timeouts", |m| {
        metric(
            m,
            "sipring_tls_rejections_total{reason=\"handshake_timeout\"}",
        ) == Some(2.0)
    });
    // The server closed both (a read timing out is not a close).
    for (what, s) in [("half", &mut half), ("silent", &mut silent)] {
        let t = s.try_clone().unwrap();
        assert!(
            sipring_tests::ua::read_until_closed(
                s,
                |d| {
                    let _ = t.set_read_timeout(Some(d));
                },
                Duration::from_secs(3)
            ),
            "{what} left open"
        );
    }
    srv.stop();
    srv.join().unwrap();
}

/// What a fake partner saw on one of our links: the first line of each message, in order,
/// and whether we closed the link.
#[derive(Default)]
struct LinkSeen {
    lines: Vec<String>,
    closed: bool,
}

/// A fake partner on `listener` answering what we send over each link we dial: MESSAGE 200,
/// INVITE 180 (and 200 once `answer` is set, over the link the INVITE came on); for `run`.
/// Links past the first `serves` are closed as they come.
fn answering_partner(
    listener: std::net::TcpListener,
    cfg: std::sync::Arc<rustls::ServerConfig>,
    answer: std::sync::Arc<std::sync::atomic::AtomicBool>,
    run: Duration,
    serves: usize,
) -> std::sync::Arc<std::sync::Mutex<Vec<LinkSeen>>> {
    use std::sync::atomic::Ordering;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<LinkSeen>::new()));
    let all = seen.clone();
    let end = std::time::Instant::now() + run;
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while std::time::Instant::now() < end {
            let Ok((s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            let i = {
                let mut v = all.lock().unwrap();
                v.push(LinkSeen::default());
                v.len() - 1
            };
            if i >= serves {
                drop(s);
                continue;
            }
            let (cfg, all, answer) = (cfg.clone(), all.clone(), answer.clone());
            std::thread::spawn(move || {
                let mut s = s;
                let mut conn = rustls::ServerConnection::new(cfg).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let mut tls = rustls::Stream::new(&mut conn, &mut s);
                let (mut got, mut buf) = (Vec::new(), vec![0u8; 16384]);
                let mut ringing: Vec<Vec<u8>> = Vec::new();
                while std::time::Instant::now() < end {
                    match tls.read(&mut buf) {
                        Ok(0) => {
                            all.lock().unwrap()[i].closed = true;
                            return;
                        }
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => {
                            all.lock().unwrap()[i].closed = true;
                            return;
                        }
                    }
                    while let Some(h) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let len = sipring_tests::ua::header(&got[..h + 4], "Content-Length")
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() < h + 4 + len {
                            break;
                        }
                        let m: Vec<u8> = got.drain(..h + 4 + len).collect();
                        let line = String::from_utf8_lossy(
                            &m[..m.iter().position(|&b| b == b'\r').unwrap_or(0)],
                        )
                        .into_owned();
                        all.lock().unwrap()[i].lines.push(line);
                        let contact = "sip:bob@127.0.0.1";
                        match sipring_tests::ua::method(&m).as_str() {
                            "MESSAGE" => {
                                let _ = tls.write_all(&sipring_tests::ua::answer(
                                    &m, 200, "OK", "p1", contact,
                                ));
                            }
                            "INVITE" => {
                                let _ = tls.write_all(&sipring_tests::ua::answer(
                                    &m, 180, "Ringing", "p2", contact,
                                ));
                                ringing.push(m);
                            }
                            _ => {}
                        }
                    }
                    if answer.load(Ordering::SeqCst) {
                        for m in ringing.drain(..) {
                            let _ = tls.write_all(&sipring_tests::ua::answer(
                                &m,
                                200,
                                "OK",
                                "p2",
                                "sip:bob@127.0.0.1",
                            ));
                        }
                    }
                }
            });
        }
    });
    seen
}

/// A TLS 1.2 partner (answering as [`answering_partner`], the first `serves` links) and a
/// one-shard server whose keys are spent at 8 records, with alice's call to the partner
/// ringing on the first link (Call-ID `call`); then her MESSAGEs `<call>-m0..m9`, one at a
/// time: each answer's Call-ID and status.
#[allow(clippy::type_complexity)] // one fixture for two tests
fn ringing_on_a_link_that_spends_its_key(
    call: &str,
    serves: usize,
) -> (
    sipring::server::Running,
    Ua,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::Mutex<Vec<LinkSeen>>>,
    Vec<(String, Option<u16>)>,
) {
    let pki = Pki::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let partner_cfg = the_partner(&pki, &[&rustls::version::TLS12]);
    let answer = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = answering_partner(
        listener,
        partner_cfg,
        answer.clone(),
        Duration::from_secs(20),
        serves,
    );
    let mut cfg = config(&pki);
    cfg.peer[0].address = Some(format!("127.0.0.1:{port}").parse().unwrap());
    cfg.server.shards = 1;
    // The first link carries the INVITE and at least 5 MESSAGEs, the second the rest.
    cfg.tls.ktls_max_records = 8;
    let srv = start(cfg, None).expect("start");
    let mut alice = registered_alice(&pki, &srv);
    alice.send(&alice.request(
        "INVITE",
        "sip:bob@partner.example.com",
        "<sip:bob@partner.example.com>",
        call,
        1,
        "",
        None,
    ));
    assert_eq!(alice.expect_final_or_provisional("180").0, 180);
    let mut answers = Vec::new();
    for i in 0..10 {
        alice.send(&alice.request(
            "MESSAGE",
            "sip:bob@partner.example.com",
            "<sip:bob@partner.example.com>",
            &format!("{call}-m{i}"),
            1,
            "",
            None,
        ));
        let r = alice.recv(Duration::from_secs(5)).expect("an answer");
        let id = sipring_tests::ua::header(&r, "Call-ID").unwrap_or_default();
        answers.push((id, sipring_tests::ua::status(&r)));
    }
    (srv, alice, answer, seen, answers)
}

#[test]
fn a_partner_link_whose_key_is_spent_is_replaced_and_still_carries_its_calls_answers() {
    // TLS 1.2 cannot rekey (nor can TLS 1.3 in a kernel without KeyUpdate): past
    // `tls.ktls_max_records` the link we dialled to a partner closed at once, and every
    // request in progress on it failed (503, upstream 500) — on a busy partner link, the
    // calls being set up at that moment, every few hours. Now new messages go over a link
    // dialled at once, and the spent one stays, reading, until what went out on it is
    // answered.
    let (srv, mut alice, answer, seen, answers) =
        ringing_on_a_link_that_spends_its_key("spent", usize::MAX);
    // Each MESSAGE, across the link's budget, is answered.
    assert!(
        answers
            .iter()
            .all(|(c, s)| c.starts_with("spent-m") && *s == Some(200)),
        "{answers:?}"
    );
    // The call that rang on the first link is answered over it, and reaches alice.
    answer.store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, _) = alice.expect_final_or_provisional("the call's answer");
    assert_eq!(code, 200, "the call in progress on the spent link");
    // Then the spent link closes, and the partner was dialled once more.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while !seen.lock().unwrap()[0].closed && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = seen.lock().unwrap();
    assert!(seen[0].closed, "the spent link was not closed");
    assert_eq!(seen.len(), 2, "links dialled: {}", seen.len());
    assert!(
        seen[0].lines[0].starts_with("INVITE "),
        "{:?}",
        seen[0].lines
    );
    assert!(
        seen[1].lines.iter().any(|l| l.starts_with("MESSAGE ")) && !seen[1].closed,
        "{:?}",
        seen[1].lines
    );
    let m = sipring_tests::server::admin_get(srv.admin_addr.unwrap(), "/metrics");
    assert_eq!(metric(&m, "sipring_peer_links_retired_total"), Some(1.0));
    drop(seen);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_spent_partner_link_still_carries_its_calls_answers_when_its_replacement_fails() {
    // The partner's link is named by the partner, not the connection: the replacement's
    // failed dial failed every request to the partner, those the spent link was kept for
    // included (503, upstream 500), and their answers then came to nobody.
    let (srv, mut alice, answer, seen, answers) =
        ringing_on_a_link_that_spends_its_key("spent-fail", 1);
    assert!(
        answers.iter().all(|(c, _)| c.starts_with("spent-fail-m")),
        "the call was failed: {answers:?}"
    );
    assert!(
        answers.iter().any(|(_, s)| *s != Some(200)),
        "the replacement never failed: {answers:?}"
    );
    assert!(seen.lock().unwrap().len() >= 2, "no replacement dialled");
    // The call still rings on the spent link, and its answer reaches alice.
    answer.store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, _) = alice.expect_final_or_provisional("the call's answer");
    assert_eq!(code, 200);
    srv.stop();
    srv.join().unwrap();
}
