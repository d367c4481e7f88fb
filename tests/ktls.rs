//! Kernel TLS, end to end. The same tests run twice:
//! - on the host (no `CONFIG_TLS`): every connection must fall back to userspace TLS, with
//!   the reason counted, and all traffic must still flow;
//! - inside the kTLS VM (`tests/vm/run.sh` sets `SIPRING_EXPECT_KTLS=1`): every connection
//!   must run its record layer in the kernel, and `/proc/net/tls_stat` must show it.

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};
use sipring::server::{Running, start};
use sipring_tests::server::{Pki, config, free_port, metric, wait_metrics};
use sipring_tests::ua::{Ua, answer, header, method, tls_config};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn expect_kernel() -> bool {
    std::env::var("SIPRING_EXPECT_KTLS").is_ok_and(|v| v == "1")
}

/// `/proc/net/tls_stat` counters (all zero when the kernel has no TLS).
fn tls_stat(name: &str) -> u64 {
    std::fs::read_to_string("/proc/net/tls_stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(name))
                .then(|| it.next().and_then(|v| v.parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// A 1-shard server. `tls13_anyway`: offload TLS 1.3 even where the kernel cannot follow a
/// KeyUpdate (so the VM's 6.1 kernel exercises TLS 1.3 in the kernel too).
fn server_with(pki: &Pki, tls13_anyway: bool) -> Running {
    let mut cfg = config(pki);
    cfg.server.shards = 1;
    cfg.tls.ktls_tls13_without_rekey = tls13_anyway;
    // These tests are about the record layer: raw clients send bare REGISTERs and read the
    // 200. Who may register is tested elsewhere (policy unit tests, engine_e2e, identity).
    cfg.auth.enabled = false;
    start(cfg, None).expect("start")
}

fn server(pki: &Pki) -> Running {
    server_with(pki, true)
}

/// Which record layer a connection must use here.
fn expected_layer(tls13: bool, tls13_anyway: bool) -> &'static str {
    let k = sipring::sys::ktls::probe();
    if expect_kernel() {
        assert!(
            k.available(),
            "the VM must have kernel TLS: {}",
            k.describe()
        );
    }
    if k.available() && (!tls13 || k.rekey() || tls13_anyway) {
        "kernel"
    } else {
        "userspace"
    }
}

fn ua(pki: &Pki, srv: &Running, user: &str, tls12: bool) -> Ua {
    let mut u = Ua::tls(
        srv.listen_addrs[0],
        tls_config(&pki.certs("ca.pem"), None, tls12),
        "sip.example.com",
        user,
        "example.com",
    )
    .expect("connect");
    assert_eq!(u.register(600), 200);
    u
}

/// Every connection opened so far ran in the expected record layer (`want`).
fn assert_layer(srv: &Running, kind: &str, n: f64, want: &str) {
    let other = if want == "kernel" {
        "userspace"
    } else {
        "kernel"
    };
    let m = wait_metrics(srv.admin_addr.unwrap(), "record layer", |m| {
        metric(
            m,
            &format!("sipring_connections_total{{kind=\"{kind}\",record_layer=\"{want}\"}}"),
        )
        .unwrap_or(0.0)
            >= n
    });
    assert_eq!(
        metric(
            &m,
            &format!("sipring_connections_total{{kind=\"{kind}\",record_layer=\"{other}\"}}")
        ),
        None,
        "{m}"
    );
    if !expect_kernel() && !sipring::sys::ktls::probe().available() {
        assert!(
            metric(
                &m,
                "sipring_ktls_fallback_total{reason=\"kernel_lacks_tls\"}"
            )
            .unwrap_or(0.0)
                >= n,
            "{m}"
        );
    }
}

/// As [`assert_layer`] for connections that offload TLS 1.3 regardless of rekey support.
fn assert_record_layer(srv: &Running, kind: &str, n: f64) {
    assert_layer(srv, kind, n, expected_layer(true, true));
}

fn message(from: &mut Ua, to: &mut Ua, body: &str) {
    let m = from.request(
        "MESSAGE",
        &format!("sip:{}@example.com", to.user),
        &format!("<sip:{}@example.com>", to.user),
        &format!("m-{}-{}", from.user, body.len()),
        1,
        "",
        Some(("text/plain", body)),
    );
    from.send(&m);
    let got = to.expect("MESSAGE");
    assert_eq!(method(&got), "MESSAGE");
    assert!(
        got.ends_with(body.as_bytes()),
        "body intact ({} bytes)",
        body.len()
    );
    to.send(&answer(&got, 200, "OK", "t", "sip:x@127.0.0.1"));
    assert_eq!(from.expect_final_or_provisional("200").0, 200);
}

#[test]
fn tls13_and_tls12_traffic_both_ways() {
    let pki = Pki::new();
    let srv = server(&pki);
    let (tx0, rx0) = (tls_stat("TlsTxSw"), tls_stat("TlsRxSw"));
    for tls12 in [false, true] {
        let mut alice = ua(&pki, &srv, "alice", tls12);
        let mut bob = ua(&pki, &srv, "bob", tls12);
        message(&mut alice, &mut bob, "hello over the kernel");
        message(&mut bob, &mut alice, "and back");
    }
    assert_record_layer(&srv, "tls", 4.0);
    if expect_kernel() {
        assert!(
            tls_stat("TlsTxSw") >= tx0 + 4 && tls_stat("TlsRxSw") >= rx0 + 4,
            "tls_stat: {}",
            std::fs::read_to_string("/proc/net/tls_stat").unwrap_or_default()
        );
    }
    srv.stop();
    srv.join().unwrap();
}

/// A raw rustls client, for what the test UA hides: pipelining, KeyUpdate, close_notify.
fn raw(pki: &Pki, srv: &Running) -> StreamOwned<ClientConnection, TcpStream> {
    let cfg = tls_config(&pki.certs("ca.pem"), None, false);
    let conn =
        ClientConnection::new(cfg, ServerName::try_from("sip.example.com").unwrap()).unwrap();
    let tcp = TcpStream::connect(srv.listen_addrs[0]).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    StreamOwned::new(conn, tcp)
}

fn register_bytes(user: &str, n: u32) -> String {
    format!(
        "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1;branch=z9hG4bKraw{user}{n}\r\nMax-Forwards: 70\r\nTo: <sip:{user}@example.com>\r\nFrom: <sip:{user}@example.com>;tag=r\r\nCall-ID: raw-{user}\r\nCSeq: {n} REGISTER\r\nContact: <sip:{user}@127.0.0.1;transport=tls>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
    )
}

fn read_response(s: &mut StreamOwned<ClientConnection, TcpStream>) -> String {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut tmp).expect("read");
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&tmp[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// A TCP stream that keeps a copy of every byte it reads: the server's records as sent.
struct Tap {
    tcp: TcpStream,
    seen: Vec<u8>,
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.tcp.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

#[test]
fn tls12_gcm_nonces_do_not_repeat_across_the_hand_off() {
    // TLS 1.2 AES-GCM: rustls sent our Finished with explicit nonce `iv XOR 0`, and the
    // kernel, given rustls's `iv`, sent the first SIP response with the same one under the
    // same key (GCM's forbidden nonce reuse). Every encrypted record the server sends must
    // carry its own.
    let pki = Pki::new();
    let srv = server(&pki);
    let cfg = tls_config(&pki.certs("ca.pem"), None, true);
    let conn =
        ClientConnection::new(cfg, ServerName::try_from("sip.example.com").unwrap()).unwrap();
    let tcp = TcpStream::connect(srv.listen_addrs[0]).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = StreamOwned::new(
        conn,
        Tap {
            tcp,
            seen: Vec::new(),
        },
    );
    for n in 1..4 {
        s.write_all(register_bytes("gcm", n).as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let k = s.read(&mut tmp).expect("read");
            assert!(k > 0, "connection closed");
            buf.extend_from_slice(&tmp[..k]);
        }
        assert!(
            buf.starts_with(b"SIP/2.0 200"),
            "{}",
            String::from_utf8_lossy(&buf)
        );
    }
    let suite = s.conn.negotiated_cipher_suite().unwrap().suite();
    assert!(
        matches!(
            suite,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        ),
        "{suite:?}"
    );
    // The server's records after its ChangeCipherSpec are encrypted: Finished (by rustls),
    // then the answers (by the kernel, here); each starts with its explicit nonce.
    let wire = &s.sock.seen;
    let (mut at, mut encrypted, mut nonces) = (0, false, Vec::new());
    while at + 5 <= wire.len() {
        let typ = wire[at];
        let len = usize::from(u16::from_be_bytes([wire[at + 3], wire[at + 4]]));
        let body = &wire[at + 5..(at + 5 + len).min(wire.len())];
        if encrypted && body.len() >= 8 {
            nonces.push(body[..8].to_vec());
        }
        encrypted |= typ == 20;
        at += 5 + len;
    }
    assert!(
        nonces.len() >= 4,
        "Finished and three answers: {}",
        nonces.len()
    );
    let mut unique = nonces.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        nonces.len(),
        "a repeated GCM nonce: {nonces:02x?}"
    );
    assert_record_layer(&srv, "tls", 1.0);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_record_that_fails_authentication_closes_the_connection_and_says_so() {
    // A record corrupted or forged on the path: the kernel cannot decrypt it (EBADMSG). It
    // read as the peer closing (a graceful close, nothing counted, no log line an operator
    // sees); now the connection is cut at once and the reason counted.
    let pki = Pki::new();
    let srv = server(&pki);
    let admin = srv.admin_addr.unwrap();
    let mut s = raw(&pki, &srv);
    s.write_all(register_bytes("bad", 1).as_bytes()).unwrap();
    assert!(read_response(&mut s).starts_with("SIP/2.0 200"));
    // An application-data record of 40 bytes that no key sealed, straight onto the socket.
    let mut forged = vec![23u8, 3, 3, 0, 40];
    forged.extend((0..40u8).map(|i| i.wrapping_mul(37)));
    s.sock.write_all(&forged).unwrap();
    let m = wait_metrics(admin, "connection gone", |m| {
        metric(m, "sipring_connections{kind=\"tls\"}") == Some(0.0)
    });
    if expected_layer(true, true) == "kernel" {
        assert_eq!(
            metric(&m, "sipring_ktls_closes_total{reason=\"bad_record\"}"),
            Some(1.0)
        );
    }
    assert_record_layer(&srv, "tls", 1.0);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_message_pipelined_behind_finished_is_not_lost() {
    let pki = Pki::new();
    let srv = server(&pki);
    let mut s = raw(&pki, &srv);
    // Queue the REGISTER before the handshake: rustls sends it right behind its Finished,
    // in the same write, before the server has handed the socket to the kernel.
    s.conn
        .writer()
        .write_all(register_bytes("pipe", 1).as_bytes())
        .unwrap();
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s.conn.complete_io(&mut s.sock).unwrap();
    let r = read_response(&mut s);
    assert!(r.starts_with("SIP/2.0 200 OK"), "{r}");
    assert_record_layer(&srv, "tls", 1.0);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_peer_initiated_key_update_keeps_traffic_flowing() {
    // Default policy: TLS 1.3 is offloaded only where the kernel can rekey, so a KeyUpdate
    // from the peer never breaks the connection.
    let pki = Pki::new();
    let srv = server_with(&pki, false);
    let mut s = raw(&pki, &srv);
    s.write_all(register_bytes("ku", 1).as_bytes()).unwrap();
    assert!(read_response(&mut s).starts_with("SIP/2.0 200"));
    for n in 2..5 {
        // KeyUpdate(update_requested): a new RX key for the server, which answers with its
        // own KeyUpdate and switches TX too.
        s.conn.refresh_traffic_keys().unwrap();
        s.write_all(register_bytes("ku", n).as_bytes()).unwrap();
        let r = read_response(&mut s);
        assert!(r.starts_with("SIP/2.0 200"), "after KeyUpdate {n}: {r}");
    }
    assert_layer(&srv, "tls", 1.0, expected_layer(true, false));
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn key_update_on_a_kernel_that_cannot_rekey_closes_cleanly() {
    // Offloading TLS 1.3 anyway: where the kernel cannot follow a KeyUpdate the connection
    // closes (the peer reconnects); where it can, traffic continues.
    let pki = Pki::new();
    let srv = server_with(&pki, true);
    let mut s = raw(&pki, &srv);
    s.write_all(register_bytes("kx", 1).as_bytes()).unwrap();
    assert!(read_response(&mut s).starts_with("SIP/2.0 200"));
    s.conn.refresh_traffic_keys().unwrap();
    s.write_all(register_bytes("kx", 2).as_bytes()).unwrap();
    let k = sipring::sys::ktls::probe();
    let mut buf = Vec::new();
    let read = s.read_to_end(&mut buf);
    let answered = String::from_utf8_lossy(&buf).starts_with("SIP/2.0 200");
    if k.available() && !k.rekey() {
        assert!(
            !answered,
            "no answer after a KeyUpdate the kernel cannot follow"
        );
        // Closed gracefully, with close_notify: our TX key was untouched (it was an
        // abort, and what was queued was lost).
        assert!(read.is_ok(), "closed without close_notify: {read:?}");
        wait_metrics(srv.admin_addr.unwrap(), "connection closed", |m| {
            metric(m, "sipring_connections{kind=\"tls\"}") == Some(0.0)
        });
    } else {
        assert!(
            answered,
            "traffic continues after KeyUpdate: {}",
            String::from_utf8_lossy(&buf)
        );
    }
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn close_notify_and_abrupt_reset_leave_no_connection() {
    let pki = Pki::new();
    let srv = server(&pki);
    let admin = srv.admin_addr.unwrap();
    let mut s = raw(&pki, &srv);
    s.write_all(register_bytes("bye", 1).as_bytes()).unwrap();
    assert!(read_response(&mut s).starts_with("SIP/2.0 200"));
    wait_metrics(admin, "one connection", |m| {
        metric(m, "sipring_connections{kind=\"tls\"}") == Some(1.0)
    });
    // close_notify from the client: the server answers with its own and closes.
    s.conn.send_close_notify();
    s.conn.complete_io(&mut s.sock).unwrap();
    let mut tail = Vec::new();
    let _ = s.read_to_end(&mut tail);
    assert!(
        s.conn.is_handshaking() || tail.is_empty(),
        "no data after close_notify"
    );
    wait_metrics(admin, "connection gone after close_notify", |m| {
        metric(m, "sipring_connections{kind=\"tls\"}") == Some(0.0)
    });
    // An abrupt reset (SO_LINGER 0): the server notices and cleans up.
    let mut s = raw(&pki, &srv);
    s.write_all(register_bytes("rst", 1).as_bytes()).unwrap();
    assert!(read_response(&mut s).starts_with("SIP/2.0 200"));
    let sock = socket2::SockRef::from(&s.sock);
    sock.set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
    // The bindings may live on the other shard (told over the mesh): wait for both.
    let m = wait_metrics(admin, "connection and its bindings gone after reset", |m| {
        metric(m, "sipring_connections{kind=\"tls\"}") == Some(0.0)
            && metric(m, "sipring_bindings") == Some(0.0)
    });
    assert_eq!(
        metric(&m, "sipring_bindings"),
        Some(0.0),
        "the flows' bindings went with them"
    );
    assert_record_layer(&srv, "tls", 2.0);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn large_messages_span_records_and_small_ones_stream() {
    let pki = Pki::new();
    let srv = server(&pki);
    let mut alice = ua(&pki, &srv, "alice", false);
    let mut bob = ua(&pki, &srv, "bob", false);
    let big = "x".repeat(40_000);
    message(&mut alice, &mut bob, &big);
    // 200 small MESSAGEs in one write, all delivered in order.
    let mut burst = Vec::new();
    for i in 0..200 {
        burst.extend_from_slice(&alice.request(
            "MESSAGE",
            "sip:bob@example.com",
            "<sip:bob@example.com>",
            &format!("burst-{i}"),
            1,
            "",
            Some(("text/plain", &format!("#{i}"))),
        ));
    }
    alice.send(&burst);
    for i in 0..200 {
        let m = bob.expect("burst MESSAGE");
        assert_eq!(
            header(&m, "Call-ID").as_deref(),
            Some(format!("burst-{i}").as_str())
        );
        bob.send(&answer(&m, 200, "OK", "t", "sip:bob@127.0.0.1"));
    }
    for _ in 0..200 {
        assert_eq!(alice.expect_final_or_provisional("burst 200").0, 200);
    }
    assert_record_layer(&srv, "tls", 2.0);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn outbound_peer_connections_offload_too() {
    let pki = Pki::new();
    let (port_a, port_b) = (free_port(), free_port());
    let mut a_cfg = config(&pki);
    a_cfg.server.shards = 1;
    a_cfg.tls.ktls_tls13_without_rekey = true;
    a_cfg.listen[1].address = format!("127.0.0.1:{port_a}").parse().unwrap();
    a_cfg.peer[0].address = Some(format!("127.0.0.1:{port_b}").parse().unwrap());
    let mut b_cfg = config(&pki);
    b_cfg.server.shards = 1;
    b_cfg.tls.ktls_tls13_without_rekey = true;
    b_cfg.server.domains = vec!["partner.example.com".into()];
    b_cfg.server.hostname = "sip.partner.example.com".into();
    b_cfg.listen[1].address = format!("127.0.0.1:{port_b}").parse().unwrap();
    b_cfg.tls.certificate[0].cert = pki.dir.join("partner.pem");
    b_cfg.tls.certificate[0].key = pki.dir.join("partner.key");
    b_cfg.peer[0].name = "home".into();
    b_cfg.peer[0].domains = vec!["example.com".into()];
    b_cfg.peer[0].server_name = "sip.example.com".into();
    b_cfg.peer[0].roots = pki.dir.join("ca.pem");
    b_cfg.peer[0].crls = vec![pki.dir.join("ca.crl")];
    b_cfg.auth.subscribers = Some(sipring_tests::server::write_subscribers(
        &pki.dir,
        "partner.example.com",
    ));
    let a = start(a_cfg, None).unwrap();
    let b = start(b_cfg, None).unwrap();
    let mut alice = ua(&pki, &a, "alice", false);
    let mut bob = Ua::tls(
        b.listen_addrs[0],
        tls_config(&pki.certs("partner-ca.pem"), None, false),
        "sip.partner.example.com",
        "bob",
        "partner.example.com",
    )
    .unwrap();
    assert_eq!(bob.register(600), 200);
    let m = alice.request(
        "MESSAGE",
        "sip:bob@partner.example.com",
        "<sip:bob@partner.example.com>",
        "fed-k",
        1,
        "",
        Some(("text/plain", "across")),
    );
    alice.send(&m);
    let got = bob.expect("MESSAGE across the federation");
    bob.send(&answer(&got, 200, "OK", "b", "sip:bob@127.0.0.1"));
    assert_eq!(alice.expect_final_or_provisional("200 across").0, 200);
    // A's outbound link and B's inbound peer connection both run in the expected layer.
    assert_record_layer(&a, "mtls", 1.0);
    assert_record_layer(&b, "mtls", 1.0);
    a.stop();
    b.stop();
    a.join().unwrap();
    b.join().unwrap();
}

#[test]
fn each_cipher_goes_to_the_kernel_only_where_the_kernel_took_its_key() {
    // The probe sets a throw-away key of every (version, cipher) both ways; a session whose
    // cipher the kernel did not take stays in userspace (the hand-off would consume it and
    // the refused key cut the connection). Every suite's traffic flows either way.
    use rustls::crypto::aws_lc_rs::{cipher_suite as cs, default_provider};
    use sipring::sys::ktls::Cipher;
    let pki = Pki::new();
    let srv = server_with(&pki, true);
    let k = sipring::sys::ktls::probe();
    if expect_kernel() {
        for v13 in [false, true] {
            assert!(
                k.ciphers().has(v13, Cipher::Aes128Gcm),
                "the VM's kernel takes AES-128-GCM: {}",
                k.describe()
            );
        }
    }
    let suites = [
        (true, Cipher::Aes128Gcm, vec![cs::TLS13_AES_128_GCM_SHA256]),
        (true, Cipher::Aes256Gcm, vec![cs::TLS13_AES_256_GCM_SHA384]),
        (
            true,
            Cipher::Chacha20Poly1305,
            vec![cs::TLS13_CHACHA20_POLY1305_SHA256],
        ),
        (
            false,
            Cipher::Aes128Gcm,
            vec![
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            ],
        ),
        (
            false,
            Cipher::Aes256Gcm,
            vec![
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            ],
        ),
        (
            false,
            Cipher::Chacha20Poly1305,
            vec![
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            ],
        ),
    ];
    let layer = |m: &str, l: &str| {
        metric(
            m,
            &format!("sipring_connections_total{{kind=\"tls\",record_layer=\"{l}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let admin = srv.admin_addr.unwrap();
    for (i, (v13, cipher, list)) in suites.into_iter().enumerate() {
        let m = sipring_tests::server::admin_get(admin, "/metrics");
        let (k0, u0) = (layer(&m, "kernel"), layer(&m, "userspace"));
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: list,
            ..default_provider()
        };
        let mut roots = rustls::RootCertStore::empty();
        for r in pki.certs("ca.pem") {
            roots.add(r).unwrap();
        }
        let version: &[&rustls::SupportedProtocolVersion] = if v13 {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS12]
        };
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
            .with_protocol_versions(version)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut u = Ua::tls(
            srv.listen_addrs[0],
            std::sync::Arc::new(cfg),
            "sip.example.com",
            &format!("c{i}"),
            "example.com",
        )
        .unwrap();
        assert_eq!(
            u.register(600),
            200,
            "{cipher:?} TLS 1.{}",
            2 + u8::from(v13)
        );
        let kernel = k.available() && k.ciphers().has(v13, cipher);
        let want = if kernel { "kernel" } else { "userspace" };
        wait_metrics(admin, "the record layer of the new connection", |m| {
            layer(m, want) >= if kernel { k0 } else { u0 } + 1.0
        });
        drop(u);
    }
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn the_record_budget_rekeys_or_closes() {
    // A tiny budget: after 3 records under one key, TLS 1.2 (in the kernel or in
    // userspace, and TLS 1.3 on a kernel that cannot rekey) closes gracefully — the answer that crossed the budget still arrives,
    // then close_notify — and TLS 1.3 rekeys where the kernel can. The kernel itself never
    // counts. (Before, the fourth answer was dropped and the connection cut.)
    let pki = Pki::new();
    let mut cfg = config(&pki);
    cfg.server.shards = 1;
    cfg.tls.ktls_tls13_without_rekey = true;
    cfg.tls.ktls_max_records = 3;
    let srv = start(cfg, None).unwrap();
    let k = sipring::sys::ktls::probe();
    for tls12 in [true, false] {
        let mut u = Ua::tls(
            srv.listen_addrs[0],
            tls_config(&pki.certs("ca.pem"), None, tls12),
            "sip.example.com",
            "budget",
            "example.com",
        )
        .unwrap();
        let mut answered = 0;
        for _ in 0..6 {
            u.send(&u.request(
                "OPTIONS",
                "sip:sip.example.com",
                "<sip:sip.example.com>",
                "budget",
                1,
                "",
                None,
            ));
            match u.recv(Duration::from_secs(2)) {
                Some(r) if r.starts_with(b"SIP/2.0 200") => answered += 1,
                _ => break,
            }
        }
        // TLS 1.2 in userspace too: rustls cannot rekey it (and refuses past 2^24 records);
        // in userspace TLS 1.3 rustls sends a KeyUpdate by itself.
        let closes = tls12 || (k.available() && !k.rekey());
        if closes {
            assert_eq!(
                answered,
                4,
                "TLS 1.{}: closed gracefully after the answer that crossed the budget",
                if tls12 { 2 } else { 3 }
            );
            assert!(
                u.closed_within(Duration::from_secs(5)),
                "TLS 1.{}: the connection ends",
                if tls12 { 2 } else { 3 }
            );
        } else {
            assert_eq!(
                answered,
                6,
                "TLS 1.{}: rekeyed or in userspace, traffic continues",
                if tls12 { 2 } else { 3 }
            );
        }
    }
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn the_peers_close_notify_after_ours_is_read_not_reset() {
    // A graceful close (here: a TLS 1.2 key's record budget) sends close_notify, then reads
    // what the peer still sends for a moment, so that the socket closes with nothing unread:
    // a FIN, not a RST, after the peer's close_notify answering ours. (A review feared that
    // under kernel TLS the drain, stopping at that control record, left it unread and sent
    // RST: on Debian 12's kernel it does not, with or without reading it.)
    let pki = Pki::new();
    let mut cfg = config(&pki);
    cfg.server.shards = 1;
    cfg.tls.ktls_max_records = 3;
    cfg.auth.enabled = false;
    let srv = start(cfg, None).unwrap();
    let conn = ClientConnection::new(
        tls_config(&pki.certs("ca.pem"), None, true),
        ServerName::try_from("sip.example.com").unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(srv.listen_addrs[0]).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    let mut tmp = [0u8; 4096];
    // Four answers take the key past its budget of 3 records; then nothing more is sent
    // and the server closes once idle.
    for n in 1..5 {
        s.write_all(register_bytes("cn", n).as_bytes()).unwrap();
        assert!(read_response(&mut s).starts_with("SIP/2.0 200"));
    }
    loop {
        match s.read(&mut tmp) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!("before the server's close_notify: {e}"),
        }
    }
    s.conn.send_close_notify();
    while s.conn.wants_write() {
        s.conn.write_tls(&mut s.sock).unwrap();
    }
    let r = s.sock.read(&mut tmp);
    assert!(matches!(r, Ok(0)), "the server's close after ours: {r:?}");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_connection_whose_key_is_spent_answers_new_requests_503_until_its_call_is_answered() {
    // TLS 1.2 cannot rekey: past its budget a connection ends, once what is in progress on
    // it is answered. It stopped reading at once: what its peer sent meanwhile was read by
    // nobody and discarded at the close (a partner's INVITEs failed 32 s later). Now new
    // requests get 503 with Retry-After (sent elsewhere at once) while the call it carries
    // is answered; then it closes.
    let pki = Pki::new();
    let mut cfg = config(&pki);
    cfg.server.shards = 1;
    cfg.auth.enabled = false;
    cfg.tls.ktls_max_records = 6;
    let srv = start(cfg, None).unwrap();
    let ua = |user: &str, tls12: bool| {
        let mut u = Ua::tls(
            srv.listen_addrs[0],
            tls_config(&pki.certs("ca.pem"), None, tls12),
            "sip.example.com",
            user,
            "example.com",
        )
        .unwrap();
        assert_eq!(u.register(600), 200);
        u
    };
    // bob on TLS 1.3 (rekeyed by the kernel where it can, by rustls in userspace; left in
    // userspace where the kernel cannot): his key never runs out.
    let mut bob = ua("bob", false);
    let mut alice = ua("alice", true);
    let inv = sipring_tests::ua::invite(&mut alice, &mut bob, "spent-1");
    bob.send(&answer(&inv, 180, "Ringing", "b1", "sip:bob@127.0.0.1"));
    assert_eq!(alice.expect_final_or_provisional("180").0, 180);
    // OPTIONS until alice's connection crosses its budget: then 503, not silence.
    let mut statuses = Vec::new();
    for i in 0..12 {
        alice.send(&alice.request(
            "OPTIONS",
            "sip:sip.example.com",
            "<sip:sip.example.com>",
            &format!("spent-o{i}"),
            1,
            "",
            None,
        ));
        let s = alice
            .recv(Duration::from_secs(2))
            .and_then(|r| sipring_tests::ua::status(&r));
        statuses.push(s);
        if s != Some(200) {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&Some(503)), "{statuses:?}");
    // The call in progress is still answered over it, then it closes.
    bob.send(&answer(&inv, 486, "Busy Here", "b1", "sip:bob@127.0.0.1"));
    assert_eq!(alice.expect_final_or_provisional("486").0, 486);
    assert!(
        alice.closed_within(Duration::from_secs(5)),
        "the connection ends"
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_socket_with_the_tls_ulp_and_no_key_is_plain_tcp_both_ways() {
    // The hand-off attaches the ULP before it takes the session from rustls, so that a
    // refusal leaves the connection in userspace (`ulp_failed`); a hand-off rustls refuses
    // after it (not at a record boundary) keeps the session too, on a socket that has the
    // ULP and no key. Both rest on this: such a socket carries bytes as plain TCP does.
    use std::os::fd::AsRawFd;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut server, _) = l.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    match sipring::sys::ktls::attach_ulp(server.as_raw_fd()) {
        Ok(()) => {}
        // The host's kernel has no TLS: nothing to attach (the VM run is the one that counts).
        Err(e) if !expect_kernel() && e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => panic!("TCP_ULP tls: {e}"),
    }
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut c = client.try_clone().unwrap();
        let d = data.clone();
        std::thread::spawn(move || c.write_all(&d).unwrap())
    };
    let mut got = vec![0; data.len()];
    server.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == data, "client to server");
    server.write_all(&data).unwrap();
    client.read_exact(&mut got).unwrap();
    assert!(got == data, "server to client");
    server.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(client.read(&mut got).unwrap(), 0, "FIN passes");
}
