//! A hostile network (issue "every resource bounded, every stall timed out, every valid
//! request answered"): each attack runs for a few seconds on loopback beside a well-behaved
//! background load (two registered UAs exchanging MESSAGEs), which must see no failure, and
//! the server must survive, keep its limits and answer its admin endpoint.
//!
//! Attackers connect from 127.0.0.2, real clients from 127.0.0.3, the background from
//! 127.0.0.1, so per-source limits tell them apart as they would on a network.

use rustls::pki_types::ServerName;
use sipring::config::{Config, ListenConfig, ListenKind};
use sipring::server::{Running, start};
use sipring_tests::TempDir;
use sipring_tests::process::Server;
use sipring_tests::server::{Pki, admin_get, config, free_port, metric, wait_metrics};
use sipring_tests::ua::{Ua, answer, status, tls_config};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const ATTACKER: [u8; 4] = [127, 0, 0, 2];
const CLIENT: [u8; 4] = [127, 0, 0, 3];

/// A TCP connection from `local` to `to`.
fn connect_from(local: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::new(IpAddr::from(local), 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(2))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// `r.read(buf)`, again when a signal meant for a server thread of this test process
/// interrupted it (EINTR is not an answer).
fn read_once(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Whether the peer has closed `s`, without waiting.
fn closed_now(s: &mut TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut buf = [0u8; 4096];
    let closed = match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    };
    let _ = s.set_nonblocking(false);
    closed
}

/// Reads until the server closes (`true`) or `within` passes (`false`).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let Ok(t) = s.try_clone() else { return true };
    sipring_tests::ua::read_until_closed(
        s,
        |d| {
            let _ = t.set_read_timeout(Some(d));
        },
        within,
    )
}

/// Two registered UAs exchanging a MESSAGE every 50 ms until stopped.
struct Background {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u32, u32, Vec<Duration>)>>,
}

/// A test that fails before [`Background::check`] stops the load too (else it ran on into
/// the next tests).
impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Background {
    fn start(pki: &Pki, addr: SocketAddr) -> Background {
        let roots = pki.certs("ca.pem");
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let cfg = tls_config(&roots, None, false);
            let mut a =
                Ua::tls(addr, cfg.clone(), "sip.example.com", "alice", "example.com").unwrap();
            let mut b = Ua::tls(addr, cfg, "sip.example.com", "bob", "example.com").unwrap();
            assert_eq!(a.register(600), 200);
            assert_eq!(b.register(600), 200);
            ready_tx.send(()).unwrap();
            let (mut sent, mut failed, mut lat) = (0, 0, Vec::new());
            // Bounded whatever happens to the test: no attack here lasts five minutes.
            let end = Instant::now() + Duration::from_secs(300);
            while !st.load(Ordering::Relaxed) && Instant::now() < end {
                sent += 1;
                let t0 = Instant::now();
                let m = a.request(
                    "MESSAGE",
                    "sip:bob@example.com",
                    "<sip:bob@example.com>",
                    &format!("bg-{sent}"),
                    1,
                    "",
                    Some(("text/plain", "hi")),
                );
                a.send(&m);
                let ok = match b.recv(Duration::from_secs(3)) {
                    Some(got) => {
                        b.send(&answer(&got, 200, "OK", "b", "sip:bob@127.0.0.1"));
                        a.recv(Duration::from_secs(3)).and_then(|r| status(&r)) == Some(200)
                    }
                    None => false,
                };
                if ok {
                    lat.push(t0.elapsed());
                } else {
                    failed += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (sent, failed, lat)
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("background load registered");
        Background {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops it and checks: no failure, p99 under `p99_max`.
    fn check(mut self, p99_max: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let (sent, failed, mut lat) = self
            .handle
            .take()
            .expect("checked once")
            .join()
            .expect("background thread");
        lat.sort();
        let p99 = lat
            .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default();
        assert!(sent > 10, "background sent only {sent}");
        assert_eq!(failed, 0, "background load: {failed} of {sent} failed");
        assert!(p99 <= p99_max, "background p99 {p99:?} > {p99_max:?}");
    }
}

/// One shard, a `tls` and a `tcp` listener; `f` adjusts the config.
fn server(pki: &Pki, f: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = config(pki);
    cfg.server.shards = 1;
    cfg.listen = vec![
        ListenConfig {
            kind: ListenKind::Tls,
            address: "127.0.0.1:0".parse().unwrap(),
            ..ListenConfig::default()
        },
        ListenConfig {
            kind: ListenKind::Tcp,
            address: "127.0.0.1:0".parse().unwrap(),
            ..ListenConfig::default()
        },
    ];
    f(&mut cfg);
    start(cfg, None).expect("start")
}

#[test]
fn descriptor_exhaustion_is_refused_at_the_budget_and_the_server_keeps_serving() {
    // The server process gets 600 descriptors; 700 silent connections try to take them.
    let pki = Pki::new();
    let dir = TempDir::new("fds");
    let (tls, tcp, admin) = (free_port(), free_port(), free_port());
    let mut cfg = config(&pki);
    cfg.server.shards = 1;
    cfg.listen = vec![
        ListenConfig {
            kind: ListenKind::Tls,
            address: format!("127.0.0.1:{tls}").parse().unwrap(),
            ..ListenConfig::default()
        },
        ListenConfig {
            kind: ListenKind::Tcp,
            address: format!("127.0.0.1:{tcp}").parse().unwrap(),
            ..ListenConfig::default()
        },
    ];
    cfg.peer.clear();
    cfg.admin.address = Some(format!("127.0.0.1:{admin}").parse().unwrap());
    let path = dir.write("sipring.toml", toml::to_string(&cfg).unwrap());
    let srv = Server::start_under(&path, &["prlimit", "--nofile=600:600", "--"]);
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let up = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < up, "server did not start:\n{}", srv.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let bg = Background::start(&pki, format!("127.0.0.1:{tls}").parse().unwrap());
    let tcp_addr: SocketAddr = format!("127.0.0.1:{tcp}").parse().unwrap();
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", srv.child.id())).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let mut attack = Vec::new();
    for _ in 0..700 {
        if let Ok(s) = connect_from(ATTACKER, tcp_addr) {
            attack.push(s);
        }
    }
    // Held for 2 s: the server must not spin on accept errors, and must keep answering.
    let t0 = ticks();
    std::thread::sleep(Duration::from_secs(2));
    let busy = (ticks() - t0) as f64 / 100.0 / 2.0;
    assert!(
        busy < 0.5,
        "server used {:.0}% of a core while held at its limit",
        busy * 100.0
    );
    let m = wait_metrics(admin, "refusals at the budget", |m| {
        metric(
            m,
            "sipring_connections_refused_total{limit=\"max_connections\"}",
        )
        .unwrap_or(0.0)
            > 0.0
    });
    assert_eq!(
        metric(&m, "sipring_accept_errors_total{reason=\"descriptors\"}"),
        None,
        "the budget keeps the process off EMFILE"
    );
    // The refused ones were closed at once, not left hanging.
    let closed = attack
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_millis(20)))
        .filter(|c| *c)
        .count();
    assert!(
        closed >= 100,
        "{closed} of the attack's connections were closed by the server"
    );
    bg.check(Duration::from_millis(500));
    drop(attack);
    // Afterwards a new client gets in.
    let mut u = Ua::tls(
        format!("127.0.0.1:{tls}").parse().unwrap(),
        tls_config(&pki.certs("ca.pem"), None, false),
        "sip.example.com",
        "carol",
        "example.com",
    )
    .unwrap();
    assert_eq!(u.register(600), 200);
    drop(srv);
}

#[test]
fn at_a_full_budget_a_new_client_takes_the_place_of_an_old_anonymous_connection() {
    // Connections on which nothing ever authenticated, held open (keepalives count as
    // traffic), filled the budget, and every new phone was refused at accept until they
    // went idle (15 minutes). Now a new connection takes the place of the oldest anonymous
    // one past its grace; a registered phone's is never taken, nor a young one's.
    let pki = Pki::new();
    let srv = server(&pki, |c| {
        c.limits.max_connections = 24;
        c.limits.anonymous_grace_s = 3;
    });
    let (tls, tcp) = (srv.listen_addrs[0], srv.listen_addrs[1]);
    let admin = srv.admin_addr.unwrap();
    let refused = "sipring_connections_refused_total{limit=\"max_connections\"}";
    let over_share = "sipring_connections_refused_total{limit=\"max_anonymous_per_ip\"}";
    let reclaimed = "sipring_connections_reclaimed_total";
    // bob registered first: the oldest connection of all.
    let mut bob = registered(&pki, tls, "bob");
    let mut held = Vec::new();
    for _ in 0..40 {
        if let Ok(s) = connect_from(ATTACKER, tcp) {
            held.push(s);
        }
    }
    // All young: the rest are refused, none taken.
    let m = wait_metrics(admin, "refusals at the budget", |m| {
        metric(m, refused).unwrap_or(0.0) >= 10.0
    });
    assert_eq!(metric(&m, reclaimed), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while held.len() > 23 && Instant::now() < deadline {
        held.retain_mut(|s| !closed_now(s));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(held.len(), 23, "the budget less bob's place");
    // Past the grace, keepalives and all: a new phone gets in and registers, in the place
    // of the oldest attacker's connection, not bob's.
    std::thread::sleep(Duration::from_millis(3200));
    for s in &mut held {
        s.write_all(b"\r\n\r\n").unwrap();
    }
    // The attacker's own newcomer takes no place past the grace either: it holds more
    // anonymous connections than its share (limits.max_anonymous_per_ip 16); reconnecting
    // faster than the grace, it would otherwise push every other newcomer out.
    assert_eq!(metric(&m, over_share), None, "young: refused at the budget");
    let mut again = connect_from(ATTACKER, tcp).unwrap();
    assert!(closed_within(&mut again, Duration::from_secs(2)));
    let m = wait_metrics(admin, "the attacker's newcomer refused", |m| {
        metric(m, over_share).is_some()
    });
    assert_eq!(metric(&m, reclaimed), None);
    let _carol = registered(&pki, tls, "carol");
    let m = wait_metrics(admin, "a reclaimed place", |m| {
        metric(m, reclaimed).unwrap_or(0.0) >= 1.0
    });
    assert_eq!(metric(&m, reclaimed), Some(1.0), "one place for one phone");
    assert!(
        closed_within(&mut held[0], Duration::from_secs(2)),
        "the oldest taken"
    );
    assert_eq!(bob.register(600), 200, "bob's connection kept its place");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn at_a_full_budget_another_shards_anonymous_connection_makes_room() {
    // Balanced accept: shard 0 accepts and hands each connection to the least loaded, so
    // they alternate. Shard 0 ends up holding only registered phones, shard 1 only the
    // attacker's idle connections. A newcomer at the full budget lands on shard 0, which has
    // nobody to close: it asks shard 1 to close one (the newcomer is refused), and the next
    // try gets in. Before, only the accepting shard's connections could make room.
    let pki = Pki::new();
    let srv = server(&pki, |c| {
        c.server.shards = 2;
        c.server.accept = sipring::config::AcceptMode::Balanced;
        c.limits.max_connections = 16;
        c.limits.anonymous_grace_s = 2;
        c.limits.max_connections_per_ip = 8;
    });
    let (tls, tcp) = (srv.listen_addrs[0], srv.listen_addrs[1]);
    let admin = srv.admin_addr.unwrap();
    let mut phones = Vec::new();
    let mut held = Vec::new();
    for i in 0..8 {
        let mut p = Ua::tcp(tcp, &format!("u{i}"), "example.com").unwrap();
        assert_eq!(p.register(600), 200);
        phones.push(p);
        held.push(connect_from(ATTACKER, tcp).unwrap());
    }
    std::thread::sleep(Duration::from_millis(2600));
    // The attacker, at its per-source limit, knocks again: refused by that limit, it
    // takes nobody's place (before, each knock at the full budget had another shard
    // close a connection).
    for _ in 0..5 {
        if let Ok(mut s) = connect_from(ATTACKER, tcp) {
            assert!(closed_within(&mut s, Duration::from_secs(2)));
        }
    }
    std::thread::sleep(Duration::from_millis(700));
    let m = admin_get(admin, "/metrics");
    assert_eq!(metric(&m, "sipring_connections_reclaimed_total"), None);
    assert!(
        metric(
            &m,
            "sipring_connections_refused_total{limit=\"max_connections_per_ip\"}"
        )
        .is_some()
    );
    let try_once = || {
        Ua::tls_over(
            connect_from(CLIENT, tls).ok()?,
            tls_config(&pki.certs("ca.pem"), None, false),
            "sip.example.com",
            "carol",
            "example.com",
        )
        .ok()
    };
    let mut carol = None;
    for _ in 0..10 {
        carol = try_once().and_then(|mut u| (u.register(600) == 200).then_some(u));
        if carol.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(carol.is_some(), "carol never got in");
    let m = wait_metrics(admin, "the place made", |m| {
        metric(m, "sipring_connections_reclaimed_total").is_some()
    });
    assert_eq!(metric(&m, "sipring_connections_reclaimed_total"), Some(1.0));
    assert_eq!(
        held.iter_mut().map(closed_now).filter(|c| *c).count(),
        1,
        "one of the attacker's connections closed"
    );
    for p in &mut phones {
        assert_eq!(p.register(600), 200, "{} kept its place", p.user);
    }
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn one_source_is_bounded_across_shards() {
    let pki = Pki::new();
    let srv = server(&pki, |c| {
        c.server.shards = 2;
        c.limits.max_connections_per_ip = 100;
    });
    let tcp = srv.listen_addrs[1];
    let mut held = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = connect_from(ATTACKER, tcp) {
            held.push(s);
        }
    }
    // The refused ones are closed asynchronously (and this machine is shared with other
    // tests): drop each as its close arrives, until 100 are left or 5 s have passed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        held.retain_mut(|s| !closed_now(s));
        if held.len() <= 100 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Those kept stay open: the limit did not close the wrong ones.
    std::thread::sleep(Duration::from_millis(200));
    held.retain_mut(|s| !closed_now(s));
    let open = held.len();
    assert_eq!(open, 100, "the limit holds for the process, not per shard");
    // Another address is not affected.
    let mut c = Ua::tcp(tcp, "dave", "example.com").unwrap();
    assert_eq!(c.register(600), 200);
    drop(held);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn silent_connections_do_not_crowd_out_real_handshakes() {
    let pki = Pki::new();
    let srv = server(&pki, |_| {});
    let tls = srv.listen_addrs[0];
    let bg = Background::start(&pki, tls);
    // 400 connections that never say a word, from one address.
    let mut silent = Vec::new();
    for _ in 0..400 {
        if let Ok(s) = connect_from(ATTACKER, tls) {
            silent.push(s);
        }
    }
    // Meanwhile real clients from another address complete their handshakes.
    let cfg = tls_config(&pki.certs("ca.pem"), None, false);
    let t0 = Instant::now();
    for i in 0..30 {
        let tcp = connect_from(CLIENT, tls).unwrap();
        let conn = rustls::ClientConnection::new(
            cfg.clone(),
            ServerName::try_from("sip.example.com").unwrap(),
        )
        .unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn
                .complete_io(&mut s.sock)
                .unwrap_or_else(|e| panic!("real client {i}: {e}"));
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    // The silent ones lost their slots within the ClientHello deadline (1 s).
    let m = wait_metrics(
        srv.admin_addr.unwrap(),
        "silent connections timed out",
        |m| metric(m, "sipring_client_hello_timeouts_total").unwrap_or(0.0) >= 1.0,
    );
    assert!(
        metric(
            &m,
            "sipring_connections_refused_total{limit=\"max_handshakes_per_ip\"}"
        )
        .unwrap_or(0.0)
            > 0.0,
        "{m}"
    );
    bg.check(Duration::from_millis(500));
    drop(silent);
    // One byte of a ClientHello, then silence: the first byte ended the ClientHello
    // deadline, and the slot was held for the whole handshake timeout (5 s). It is closed
    // at the ClientHello deadline now.
    let before = metric(
        &admin_get(srv.admin_addr.unwrap(), "/metrics"),
        "sipring_client_hello_timeouts_total",
    )
    .unwrap_or(0.0);
    let mut one_byte = connect_from(ATTACKER, tls).unwrap();
    one_byte.write_all(&[0x16]).unwrap();
    let t0 = Instant::now();
    one_byte
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = one_byte.read_to_end(&mut rest);
    let held = t0.elapsed();
    assert!(
        held < Duration::from_secs(3),
        "one byte held a slot for {held:?}"
    );
    wait_metrics(srv.admin_addr.unwrap(), "a ClientHello deadline", |m| {
        metric(m, "sipring_client_hello_timeouts_total").unwrap_or(0.0) > before
    });
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_source_starts_a_bounded_number_of_handshakes_a_second() {
    // A replayed ClientHello costs its sender nothing and us a full handshake (~0.2 ms of
    // CPU); closing at once frees its slot, so the in-flight limits never bound how often.
    // Past its rate (here 10/s, a burst of 20) a source's new connections are refused at
    // accept; another source's handshakes go on.
    let pki = Pki::new();
    let srv = server(&pki, |c| c.limits.max_handshakes_per_ip_per_s = 10);
    let tls = srv.listen_addrs[0];
    // 60 connections at once: the first 20 or so are admitted (they wait for a ClientHello),
    // the rest closed at accept.
    let conns: Vec<_> = (0..60).map(|_| connect_from(ATTACKER, tls)).collect();
    // Well within the ClientHello deadline (1 s), which would close the admitted ones too.
    std::thread::sleep(Duration::from_millis(150));
    let mut refused = 0;
    for c in conns {
        let Ok(mut s) = c else {
            refused += 1;
            continue;
        };
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        // Closed (or reset) at accept; an admitted one is still waiting: WouldBlock.
        match s.read(&mut b) {
            Ok(0) => refused += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => refused += 1,
            _ => {}
        }
    }
    assert!(refused >= 30, "{refused} of 60 refused");
    wait_metrics(srv.admin_addr.unwrap(), "refusals counted", |m| {
        metric(
            m,
            "sipring_connections_refused_total{limit=\"max_handshakes_per_ip_per_s\"}",
        )
        .unwrap_or(0.0)
            >= 30.0
    });
    // Another address is not held to the first one's rate.
    let cfg = tls_config(&pki.certs("ca.pem"), None, false);
    let tcp = connect_from(CLIENT, tls).unwrap();
    let conn = rustls::ClientConnection::new(cfg, ServerName::try_from("sip.example.com").unwrap())
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .expect("another source's handshake");
    }
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn trickles_and_stalled_messages_are_cut_and_their_memory_is_bounded() {
    let pki = Pki::new();
    let srv = server(&pki, |c| {
        c.limits.partial_timeout_ms = 1000;
        c.limits.idle_timeout_s = 2;
        c.limits.partial_bytes_per_shard = 300_000;
    });
    let (tls, tcp) = (srv.listen_addrs[0], srv.listen_addrs[1]);
    let bg = Background::start(&pki, tls);
    // A head sent one byte every 100 ms: cut at the partial deadline, not kept forever.
    let mut trickle = connect_from(ATTACKER, tcp).unwrap();
    let head = b"OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2;branch=z9hG4bKt\r\n";
    let t0 = Instant::now();
    let mut cut = false;
    for &b in head.iter().cycle().take(60) {
        if trickle.write_all(&[b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cut |= closed_within(&mut trickle, Duration::from_secs(2));
    assert!(cut, "a trickled head was kept for {:?}", t0.elapsed());
    // A body that never arrives (Content-Length 5000, 10 bytes sent).
    let mut stalled = connect_from(ATTACKER, tcp).unwrap();
    stalled
        .write_all(b"MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2;branch=z9hG4bKs\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:x@example.net>;tag=1\r\nCall-ID: s\r\nCSeq: 1 MESSAGE\r\nContent-Length: 5000\r\n\r\n0123456789")
        .unwrap();
    assert!(
        closed_within(&mut stalled, Duration::from_secs(3)),
        "stalled body kept"
    );
    // A TLS record that never completes (its header promises 100 bytes; 10 come).
    let tcp_conn = connect_from(ATTACKER, tls).unwrap();
    let conn = rustls::ClientConnection::new(
        tls_config(&pki.certs("ca.pem"), None, false),
        ServerName::try_from("sip.example.com").unwrap(),
    )
    .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp_conn);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s.sock
        .write_all(&[23, 3, 3, 0, 100, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
        .unwrap();
    assert!(
        closed_within(&mut s.sock, Duration::from_secs(3)),
        "truncated record kept"
    );
    // A silent connection is closed by the idle timeout (2 s); a half keepalive (one CR,
    // held forever) by the partial deadline; RFC 5626 keepalives (CRLFCRLF, answered with
    // CRLF) keep a connection.
    let mut silent = connect_from(ATTACKER, tcp).unwrap();
    let mut half = connect_from(ATTACKER, tcp).unwrap();
    half.write_all(b"\r").unwrap();
    let mut keep = connect_from(CLIENT, tcp).unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        keep.write_all(b"\r\n\r\n").unwrap();
        let mut pong = [0u8; 2];
        keep.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"\r\n");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        closed_within(&mut silent, Duration::from_millis(500)),
        "silent connection kept"
    );
    assert!(
        closed_within(&mut half, Duration::from_millis(500)),
        "a lone CR kept its connection"
    );
    assert!(
        !closed_within(&mut keep, Duration::from_millis(100)),
        "keepalives lost their connection"
    );
    // Heads held incomplete by many connections: the shard's budget (300 kB) holds.
    let line = format!("X-Pad: {}\r\n", "a".repeat(7990));
    let mut holders = Vec::new();
    for _ in 0..8 {
        let mut h = connect_from(ATTACKER, tcp).unwrap();
        h.write_all(b"OPTIONS sip:example.com SIP/2.0\r\n").unwrap();
        for _ in 0..7 {
            h.write_all(line.as_bytes()).unwrap();
        }
        holders.push(h);
    }
    let m = wait_metrics(srv.admin_addr.unwrap(), "budget drops", |m| {
        metric(m, "sipring_partial_budget_drops_total").unwrap_or(0.0) >= 1.0
    });
    assert!(
        metric(&m, "sipring_partial_bytes").unwrap_or(f64::MAX) <= 300_000.0,
        "{m}"
    );
    let m = wait_metrics(srv.admin_addr.unwrap(), "partial timeouts", |m| {
        metric(m, "sipring_partial_timeouts_total").unwrap_or(0.0) >= 3.0
    });
    assert!(
        metric(&m, "sipring_idle_timeouts_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    bg.check(Duration::from_millis(500));
    drop(holders);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn one_connection_cannot_register_without_limit() {
    let pki = Pki::new();
    // Open registration (a lab): only the connection limits bound what one client does.
    let srv = server(&pki, |c| {
        c.auth.enabled = false;
        c.registrar.max_aors_per_connection = 16;
    });
    let mut u = Ua::tcp(srv.listen_addrs[1], "u0", "example.com").unwrap();
    for i in 0..17 {
        u.user = format!("u{i}");
        let want = if i < 16 { 200 } else { 403 };
        assert_eq!(u.register(600), want, "AOR {i}");
    }
    // A contact longer than registrar.max_contact_bytes is not stored.
    u.user = "u0".into();
    let (code, _) = u.register_with(
        600,
        &format!("Contact: <sip:u0@{};x={}>\r\n", u.local, "y".repeat(2000)),
    );
    assert_eq!(code, 400);
    let m = wait_metrics(srv.admin_addr.unwrap(), "refusal counted", |m| {
        metric(
            m,
            "sipring_sip_refusals_total{reason=\"register_aors_per_connection\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    });
    assert_eq!(metric(&m, "sipring_bindings"), Some(16.0));
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_connections_places_follow_the_bindings_it_holds() {
    // An SBC's connection registers its users; one of them is wiped from elsewhere (the
    // user's own phone sends `Contact: *`): that AOR's place on the SBC's connection is
    // given back, wherever the AOR's shard is, and the SBC registers a new user. It kept
    // the place until the connection closed, and every new user got 403.
    let pki = Pki::new();
    let srv = server(&pki, |c| {
        c.server.shards = 2;
        c.auth.enabled = false;
        c.registrar.max_aors_per_connection = 3;
    });
    // The two users wiped live on different shards: whichever shard holds the SBC's
    // connection, one of them tells it across the mesh (ShardMsg::Released).
    let shard_of =
        |u: &str| sipring_core::registrar::shard_for(&format!("sip:{u}@example.com"), 2).0;
    let other = (1..64)
        .map(|i| format!("u{i}"))
        .find(|u| shard_of(u) != shard_of("u0"))
        .unwrap();
    let users = [
        "u0".to_string(),
        other.clone(),
        "keep".into(),
        "late".into(),
    ];
    let mut sbc = Ua::tcp(srv.listen_addrs[1], "u0", "example.com").unwrap();
    for (i, u) in users.iter().enumerate() {
        sbc.user = u.clone();
        assert_eq!(sbc.register(600), if i < 3 { 200 } else { 403 }, "{u}");
    }
    let mut phone = Ua::tcp(srv.listen_addrs[1], "u0", "example.com").unwrap();
    for (i, user) in ["u0", other.as_str()].into_iter().enumerate() {
        phone.send(
            format!(
                "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP {l};branch=z9hG4bKw{i};rport\r\nMax-Forwards: 70\r\nTo: <sip:{user}@example.com>\r\nFrom: <sip:{user}@example.com>;tag=w\r\nCall-ID: wipe-{i}\r\nCSeq: 1 REGISTER\r\nContact: *\r\nExpires: 0\r\nContent-Length: 0\r\n\r\n",
                l = phone.local
            )
            .as_bytes(),
        );
        assert_eq!(phone.expect_final_or_provisional("wipe").0, 200);
    }
    for u in ["late", "later"] {
        sbc.user = u.into();
        assert_eq!(sbc.register(600), 200, "{u} after the wipes");
    }
    sbc.user = "last".into();
    assert_eq!(sbc.register(600), 403, "the places are full again");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_peer_that_half_closes_still_gets_its_answers() {
    // A client sends its REGISTERs and ends its side (FIN) at once, then reads: each is
    // answered, those whose AOR lives on the other shard too. Before, the FIN aborted the
    // connection: answers still on their way from the other shard were lost.
    let pki = Pki::new();
    let srv = server(&pki, |c| {
        c.server.shards = 2;
        c.auth.enabled = false;
    });
    let mut s = TcpStream::connect(srv.listen_addrs[1]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = s.local_addr().unwrap();
    let n = 8;
    let batch = |tag: &str| -> Vec<u8> {
        (0..n)
        .flat_map(|i| {
            format!(
                "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bK{tag}{i}\r\nMax-Forwards: 70\r\nTo: <sip:hc{i}@example.com>\r\nFrom: <sip:hc{i}@example.com>;tag=h\r\nCall-ID: {tag}-{i}\r\nCSeq: 1 REGISTER\r\nContact: <sip:hc{i}@{local};transport=tcp>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
            )
            .into_bytes()
        })
        .collect()
    };
    s.write_all(&batch("hc")).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert_eq!(
        text.matches("SIP/2.0 200 OK\r\n").count(),
        n,
        "every REGISTER answered before the close: {text}"
    );
    // The same over TLS, ended by close_notify instead of FIN.
    let cfg = tls_config(&pki.certs("ca.pem"), None, false);
    let conn = rustls::ClientConnection::new(cfg, ServerName::try_from("sip.example.com").unwrap())
        .unwrap();
    let tcp = TcpStream::connect(srv.listen_addrs[0]).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut t = rustls::StreamOwned::new(conn, tcp);
    t.write_all(&batch("ht")).unwrap();
    t.conn.send_close_notify();
    t.flush().unwrap();
    let mut got = Vec::new();
    loop {
        match read_once(&mut t, &mut buf) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert_eq!(
        text.matches("SIP/2.0 200 OK\r\n").count(),
        n,
        "every REGISTER answered before close_notify was answered: {text}"
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn what_is_queued_for_a_peer_that_half_closed_goes_out_while_its_answers_are_awaited() {
    // A client half-closes (FIN) while it has not read its answers yet, so that the server
    // holds them queued; its INVITE still rings. While the connection waits (up to 2 s) for
    // that INVITE's answers, what is queued goes out as the client reads. Before, nothing was
    // written until the close: the 180 came 2 s late (and a larger backlog would have passed
    // the write cap and been dropped with the connection).
    let pki = Pki::new();
    let srv = server(&pki, |c| c.auth.enabled = false);
    let tcp_addr = srv.listen_addrs[1];
    let mut bob = Ua::tcp(tcp_addr, "bob", "example.com").unwrap();
    assert_eq!(bob.register(600), 200);
    // A small receive window over WAN-sized segments: what the server sends waits in its
    // own queue, not in the kernel (loopback's 64 KiB segments take megabytes at once).
    let mut s: TcpStream = {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(16 * 1024).unwrap();
        s.set_tcp_mss(1400).unwrap();
        s.connect(&tcp_addr.into()).unwrap();
        s.into()
    };
    let local = s.local_addr().unwrap();
    let n = 1500;
    let options: Vec<u8> = (0..n)
        .flat_map(|i| {
            format!(
                "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bKhq{i}\r\nMax-Forwards: 70\r\nTo: <sip:example.com>\r\nFrom: <sip:carol@example.com>;tag=c\r\nCall-ID: hq-{i}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            )
            .into_bytes()
        })
        .collect();
    s.write_all(&options).unwrap();
    s.write_all(format!(
        "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bKhqinv\r\nMax-Forwards: 70\r\nTo: <sip:bob@example.com>\r\nFrom: <sip:carol@example.com>;tag=c\r\nCall-ID: hq-inv\r\nCSeq: 1 INVITE\r\nContact: <sip:carol@{local};transport=tcp>\r\nContent-Length: 0\r\n\r\n"
    ).as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let fin = Instant::now();
    let inv = bob.expect("the INVITE");
    // The server has taken the FIN by now, and waits for the INVITE's answers.
    std::thread::sleep(Duration::from_millis(200));
    bob.send(&answer(&inv, 180, "Ringing", "b1", "sip:bob@127.0.0.1"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut got, mut buf) = (Vec::new(), vec![0u8; 16384]);
    let mut ringing = None;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
        if ringing.is_none() && got.windows(11).any(|w| w == b"SIP/2.0 180") {
            ringing = Some(fin.elapsed());
        }
    }
    let ended = fin.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("SIP/2.0 200 OK\r\n").count(), n);
    let ringing = ringing.expect("the 180");
    // The connection waits 2 s for the INVITE's final answer, then closes: the 180 (sent
    // 200 ms after the FIN) came well before that, not with the close.
    assert!(
        ended.saturating_sub(ringing) >= Duration::from_millis(500),
        "the 180 arrived {ringing:?} after the FIN, the close {ended:?}"
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn what_a_dropped_slow_reader_pipelined_is_not_served() {
    // A client that never reads pipelines requests: once its write queue passes the cap it
    // is dropped, and the requests left in the read that dropped it are not served (their
    // answers had nowhere to go: each counted a drop on a closing connection).
    let pki = Pki::new();
    let srv = server(&pki, |c| {
        c.auth.enabled = false;
        c.limits.write_queue_bytes = 4096;
        c.limits.max_message = 1024;
    });
    let s = {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect_timeout(&srv.listen_addrs[1].into(), Duration::from_secs(2))
            .unwrap();
        TcpStream::from(s)
    };
    let local = s.local_addr().unwrap();
    let batch: Vec<u8> = (0..100)
        .flat_map(|i| {
            format!(
                "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bKp{i}\r\nMax-Forwards: 70\r\nTo: <sip:example.com>\r\nFrom: <sip:x@elsewhere.test>;tag=p\r\nCall-ID: pipe-{i}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            )
            .into_bytes()
        })
        .collect();
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sent = 0;
    while sent < 40_000 && w.write_all(&batch).is_ok() {
        sent += 100;
    }
    let m = wait_metrics(srv.admin_addr.unwrap(), "the slow reader dropped", |m| {
        metric(m, "sipring_queue_drops_total{queue=\"connection\"}").unwrap_or(0.0) >= 1.0
    });
    assert_eq!(
        metric(&m, "sipring_queue_drops_total{queue=\"closing\"}").unwrap_or(0.0),
        0.0,
        "requests served after the connection was dropped"
    );
    drop(s);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn one_source_cannot_register_without_limit_across_connections_and_shards() {
    // limits.max_bindings_per_ip counts every binding whose connection comes from one
    // address, whichever shard holds the AOR and whichever connection registered it.
    let pki = Pki::new();
    let srv = server(&pki, |c| {
        c.server.shards = 2;
        c.auth.enabled = false;
        c.limits.max_bindings_per_ip = 40;
    });
    let mut conns: Vec<Ua> = (0..5)
        .map(|_| Ua::tcp(srv.listen_addrs[1], "u0", "example.com").unwrap())
        .collect();
    let mut ok = 0;
    for (c, u) in conns.iter_mut().enumerate() {
        for i in 0..10 {
            u.user = format!("u{}", c * 10 + i);
            match u.register(600) {
                200 => ok += 1,
                403 => {}
                s => panic!("REGISTER {c}/{i}: {s}"),
            }
        }
    }
    assert_eq!(ok, 40, "exactly the limit was admitted");
    // A refresh at the limit adds nothing, so it passes.
    conns[0].user = "u0".into();
    assert_eq!(conns[0].register(600), 200);
    let m = wait_metrics(srv.admin_addr.unwrap(), "refusals counted", |m| {
        metric(
            m,
            "sipring_sip_refusals_total{reason=\"register_bindings_per_ip\"}",
        )
        .unwrap_or(0.0)
            >= 10.0
    });
    assert_eq!(metric(&m, "sipring_bindings"), Some(40.0));
    // A connection's close gives its bindings' share back: new AORs register again.
    conns.remove(0).kill();
    let m = wait_metrics(srv.admin_addr.unwrap(), "bindings dropped", |m| {
        metric(m, "sipring_bindings") == Some(30.0)
    });
    drop(m);
    // (A fresh connection: the others have used their AORs per connection.)
    let mut fresh = Ua::tcp(srv.listen_addrs[1], "n0", "example.com").unwrap();
    let u = &mut fresh;
    for i in 0..10 {
        u.user = format!("n{i}");
        assert_eq!(u.register(600), 200, "after the close, AOR {i}");
    }
    u.user = "n10".into();
    assert_eq!(u.register(600), 403);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_valid_request_ahead_of_garbage_is_answered() {
    // Two shards, open registration: the REGISTER's answer often comes from the other shard,
    // after the framing error — it must still be written before the connection closes.
    let pki = Pki::new();
    let srv = server(&pki, |c| {
        c.server.shards = 2;
        c.auth.enabled = false;
    });
    for i in 0..20 {
        let mut s = connect_from(CLIENT, srv.listen_addrs[1]).unwrap();
        let reg = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.3;branch=z9hG4bKg{i}\r\nMax-Forwards: 70\r\nTo: <sip:g{i}@example.com>\r\nFrom: <sip:g{i}@example.com>;tag=1\r\nCall-ID: g{i}\r\nCSeq: 1 REGISTER\r\nContact: <sip:g{i}@127.0.0.3>\r\nContent-Length: 0\r\n\r\n"
        );
        let mut bytes = reg.into_bytes();
        bytes.extend_from_slice(b"GARBAGE\x00\x01 not SIP at all\r\nContent-Length: zz\r\n\r\n");
        s.write_all(&bytes).unwrap();
        let mut got = Vec::new();
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.contains("SIP/2.0 200 OK") && text.contains(&format!("Call-ID: g{i}")),
            "attempt {i}: the REGISTER was not answered before the close:\n{text}"
        );
    }
    wait_metrics(srv.admin_addr.unwrap(), "the framing errors counted", |m| {
        m.lines()
            .any(|l| l.starts_with("sipring_parse_errors_total{reason=") && !l.contains("shard="))
    });
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_response_naming_a_shard_that_does_not_exist_is_dropped() {
    // Our branch names the shard that owns the client transaction; one naming no shard of
    // ours (forged: a response skips the door and authentication) was relayed to it, and
    // indexing the mesh by it took the shard down.
    let pki = Pki::new();
    let srv = server(&pki, |c| c.server.shards = 2);
    let tcp = srv.listen_addrs[1];
    // Several connections, so both shards get one.
    for i in 0..8 {
        let mut s = connect_from(ATTACKER, tcp).unwrap();
        s.write_all(format!(
            "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/TLS sip.example.com:5061;branch=z9hG4bKsr0000000000000000.ffff00000000000{i}\r\nTo: <sip:x@example.com>;tag=1\r\nFrom: <sip:y@example.com>;tag=2\r\nCall-ID: forged-{i}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        ).as_bytes())
        .unwrap();
    }
    wait_metrics(
        srv.admin_addr.unwrap(),
        "the forged responses dropped",
        |m| metric(m, "sipring_responses_dropped_total").unwrap_or(0.0) >= 8.0,
    );
    // Both shards still answer.
    for i in 0..12 {
        let mut s = connect_from(CLIENT, tcp).unwrap();
        s.write_all(format!(
            "OPTIONS sip:sip.example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.3;branch=z9hG4bKo{i}\r\nMax-Forwards: 70\r\nTo: <sip:sip.example.com>\r\nFrom: <sip:o@example.com>;tag=1\r\nCall-ID: o{i}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        ).as_bytes())
        .unwrap();
        let mut buf = [0u8; 4096];
        let n = read_once(&mut s, &mut buf).unwrap_or(0);
        assert!(
            buf[..n].starts_with(b"SIP/2.0 200 OK"),
            "OPTIONS {i} unanswered: {}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn the_admin_endpoint_cannot_be_held_or_made_to_reload_by_a_browser() {
    // It served one request at a time with an unbounded line read: bytes with no newline
    // grew without limit (the process's memory), one byte every 1.9 s held it, and a
    // client that never read its /metrics/shards answer blocked it for good.
    let pki = Pki::new();
    let srv = server(&pki, |c| c.server.shards = 2);
    let admin_addr = srv.admin_addr.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // A request line that never ends (64 MiB, unless the server stops reading it).
    let endless = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(admin_addr).unwrap();
            // A write the server no longer reads ends the loop, not the test run.
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            let chunk = vec![b'A'; 64 * 1024];
            let mut sent = 0usize;
            while sent < 64 << 20 && !stop.load(Ordering::Relaxed) {
                match s.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
            }
            sent
        })
    };
    // Readers that never read a large answer.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(admin_addr).unwrap();
        s.write_all(b"GET /metrics/shards HTTP/1.0\r\n\r\n")
            .unwrap();
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    // The endpoint still answers, within its deadline.
    let t0 = Instant::now();
    let (status, body) = sipring_tests::server::admin(admin_addr, "GET", "/health");
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.0 200 OK", "ok\n")
    );
    assert!(t0.elapsed() < Duration::from_secs(7), "{:?}", t0.elapsed());
    stop.store(true, Ordering::Relaxed);
    let sent = endless.join().unwrap();
    assert!(
        sent < 64 << 20,
        "the endless line was read to the end ({sent} bytes)"
    );
    drop(idle);
    // Clients that connect and say nothing, as many as there are slots: each gives its slot
    // back after the head deadline (1 s; it was 5 s with 4 slots, and four such clients
    // reconnecting kept /health from answering at all).
    let silent: Vec<TcpStream> = (0..sipring::admin::CONCURRENT)
        .map(|_| TcpStream::connect(admin_addr).unwrap())
        .collect();
    std::thread::sleep(sipring::admin::HEAD_DEADLINE + Duration::from_millis(500));
    let (status, _) = sipring_tests::server::admin(admin_addr, "GET", "/health");
    assert_eq!(status, "HTTP/1.0 200 OK");
    drop(silent);
    // One source holds at most four slots: every slot held by one address (reconnecting
    // each second) closed everyone else's scrapes and health checks unanswered. The rest of
    // its connections are answered 503 at once.
    let silent: Vec<TcpStream> = (0..sipring::admin::CONCURRENT)
        .map(|_| connect_from(ATTACKER, admin_addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (status, _) = sipring_tests::server::admin(admin_addr, "GET", "/health");
    assert_eq!(status, "HTTP/1.0 200 OK", "one source held every slot");
    let mut turned_away = 0;
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        turned_away += usize::from(out.starts_with("HTTP/1.0 503"));
    }
    assert_eq!(
        turned_away,
        sipring::admin::CONCURRENT - sipring::admin::PER_SOURCE
    );
    // A request line trickled a byte at a time, each within the read timeout: cut at the
    // head deadline (1 s), not after its 16 KiB.
    let trickle = std::thread::spawn(move || {
        let mut s = TcpStream::connect(admin_addr).unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if s.write_all(b"G").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        t0.elapsed()
    });
    let held = trickle.join().unwrap();
    // Served (held until the head deadline, not turned away), and cut there.
    assert!(
        held > Duration::from_millis(600) && held < Duration::from_secs(4),
        "a trickle held a slot for {held:?}"
    );
    // A browser's POST carries Origin: a page the operator visits cannot reload the server.
    let mut s = TcpStream::connect(admin_addr).unwrap();
    s.write_all(b"POST /reload HTTP/1.0\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.0 403"), "{out}");
    let m = admin_get(admin_addr, "/metrics");
    assert_eq!(
        metric(&m, "sipring_reloads_total{result=\"ok\"}").unwrap_or(0.0),
        0.0
    );
    // Reloads: one a second at most; one sooner is told to come back (not made to wait
    // for its turn: that would be a 200 after the spacing).
    let (first, _) = sipring_tests::server::admin(admin_addr, "POST", "/reload");
    let (second, _) = sipring_tests::server::admin(admin_addr, "POST", "/reload");
    assert!(first.starts_with("HTTP/1.0 200"), "{first}");
    assert!(second.starts_with("HTTP/1.0 429"), "{second}");
    std::thread::sleep(sipring::admin::RELOAD_SPACING);
    let (third, _) = sipring_tests::server::admin(admin_addr, "POST", "/reload");
    assert!(third.starts_with("HTTP/1.0 200"), "{third}");
    // A reload in progress elsewhere (a SIGHUP's): also told to come back while it runs
    // (the lock is held until the answer is read: one that waited for the lock reads
    // nothing before the timeout). It held the request's slot for that reload's length.
    std::thread::sleep(sipring::admin::RELOAD_SPACING);
    {
        let _sighup = srv.control.reload_lock.lock().unwrap();
        let mut s = TcpStream::connect(admin_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"POST /reload HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut busy = String::new();
        let _ = s.read_to_string(&mut busy);
        assert!(busy.starts_with("HTTP/1.0 429"), "{busy:?}");
    }
    // DNS rebinding: a page at evil.example, its name rebound to this address, is
    // same-origin with the endpoint (a GET carries no Origin) and read the metrics.
    let ask = |req: &[u8]| {
        let mut s = TcpStream::connect(admin_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req).unwrap();
        let mut out = Vec::new();
        let r = s.read_to_end(&mut out);
        (r.map(|_| ()), String::from_utf8_lossy(&out).into_owned())
    };
    let (_, rebound) = ask(format!(
        "GET /metrics HTTP/1.1\r\nHost: evil.example:{}\r\n\r\n",
        admin_addr.port()
    )
    .as_bytes());
    assert!(rebound.starts_with("HTTP/1.0 403"), "{rebound}");
    assert!(!rebound.contains("sipring_"), "{rebound}");
    let (_, by_name) = ask(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(by_name.starts_with("HTTP/1.0 200"), "{by_name}");
    // /health tells nothing: a load balancer checking it by any name is answered.
    let (_, health) = ask(b"GET /health HTTP/1.1\r\nHost: lb-vip.example\r\n\r\n");
    assert!(health.starts_with("HTTP/1.0 200"), "{health}");
    // A POST with a body (`curl -d`) the endpoint does not read: its answer arrives whole.
    // Closed with the body unread, the connection was reset, and the reset could overtake
    // the answer.
    std::thread::sleep(sipring::admin::RELOAD_SPACING);
    let mut post = format!(
        "POST /reload HTTP/1.0\r\nHost: {admin_addr}\r\nContent-Length: {n}\r\n\r\n",
        n = 64 * 1024
    )
    .into_bytes();
    post.extend(std::iter::repeat_n(b'x', 64 * 1024));
    let (read, answer) = ask(&post);
    assert!(
        read.is_ok() && answer.starts_with("HTTP/1.0 200") && answer.ends_with("reloaded\n"),
        "{read:?} {answer:?}"
    );
    // Per shard or merged, the same families: the process's own ones (reloads, kernel TLS)
    // were missing per shard.
    let per_shard = admin_get(admin_addr, "/metrics/shards");
    for family in ["sipring_reloads_total", "sipring_ktls_available"] {
        assert!(per_shard.contains(&format!("# TYPE {family} ")), "{family}");
    }
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_second_instance_on_the_same_address_is_refused() {
    let pki = Pki::new();
    let port = free_port();
    let mut cfg = config(&pki);
    cfg.server.shards = 1;
    cfg.listen.truncate(1);
    cfg.listen[0].address = format!("127.0.0.1:{port}").parse().unwrap();
    let first = start(cfg.clone(), None).expect("first");
    // Before: a second instance joined the SO_REUSEPORT group and took half the connections.
    let err = start(cfg, None).expect_err("second instance started");
    let e = err.to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{port} is already in use by")) && e.contains("pid"),
        "{e}"
    );
    first.stop();
    first.join().unwrap();
}

/// A flood of pipelined OPTIONS over plain TCP from the attacker's address, its answers
/// read (so it is not dropped as a slow reader), until `stop`.
fn flood(to: SocketAddr, id: usize, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    let Ok(mut w) = connect_from(ATTACKER, to) else {
        return Vec::new();
    };
    let mut r = w.try_clone().unwrap();
    let st = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let _ = r.set_read_timeout(Some(Duration::from_millis(100)));
        // Bounded like the writer, also when the test fails before it sets `stop`.
        let end = Instant::now() + Duration::from_secs(30);
        while !st.load(Ordering::Relaxed) && Instant::now() < end {
            if let Ok(0) = read_once(&mut r, &mut buf) {
                return;
            }
        }
    });
    let writer = std::thread::spawn(move || {
        let _ = w.set_write_timeout(Some(Duration::from_millis(200)));
        let end = Instant::now() + Duration::from_secs(20);
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            round += 1;
            let batch: String = (0..50)
                .map(|i| format!("OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2;branch=z9hG4bKfl{id}r{round}i{i}\r\nMax-Forwards: 70\r\nTo: <sip:127.0.0.1>\r\nFrom: <sip:flood{id}@example.com>;tag=f\r\nCall-ID: flood-{id}-{round}\r\nCSeq: {i} OPTIONS\r\nContent-Length: 0\r\n\r\n"))
                .collect();
            if w.write_all(batch.as_bytes()).is_err() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    vec![reader, writer]
}

/// A TLS UA of `example.com` registered at `tls` (trusting the test PKI's CA).
fn registered(pki: &Pki, tls: SocketAddr, user: &str) -> Ua {
    let mut u = Ua::tls(
        tls,
        tls_config(&pki.certs("ca.pem"), None, false),
        "sip.example.com",
        user,
        "example.com",
    )
    .unwrap();
    assert_eq!(u.register(600), 200, "{user} registers");
    u
}

/// The tests that flood a shard until it sheds take turns: two floods at once on a small host
/// starve each other's servers, and neither shard stays overloaded long enough to measure.
static FLOOD_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn an_overloaded_shard_tells_a_client_doing_overload_control_what_to_drop_instead_of_refusing() {
    let _turn = FLOOD_TURN.lock().unwrap_or_else(|e| e.into_inner());
    // RFC 7339 between a cooperating upstream (here trusted whoever it is) and an overloaded
    // shard: its new requests pass the door, and the Via of each answer says what share of
    // new requests to drop before sending; once the shard caught up, the feedback stops.
    let pki = Pki::new();
    let srv = server(&pki, |c| {
        c.limits.overload_lag_ms = 10;
        c.limits.overload_control = sipring::config::OverloadControl::All;
    });
    let (tls, tcp) = (srv.listen_addrs[0], srv.listen_addrs[1]);
    let admin = srv.admin_addr.unwrap();
    let ua = |user: &str| registered(&pki, tls, user);
    let (mut upstream, mut bob) = (ua("alice"), ua("bob"));
    // One MESSAGE through to bob and back; the 200 as the upstream got it.
    // None: no answer in time (the flood's host may be slow; what comes is still checked).
    let exchange = |a: &mut Ua, b: &mut Ua, n: u32| -> Option<Vec<u8>> {
        let m = a.request(
            "MESSAGE",
            "sip:bob@example.com",
            "<sip:bob@example.com>",
            &format!("oc-{n}"),
            1,
            "",
            Some(("text/plain", "hi")),
        );
        let m = String::from_utf8(m).unwrap().replacen(
            ";rport\r\n",
            ";rport;oc;oc-algo=\"loss\"\r\n",
            1,
        );
        a.send(m.as_bytes());
        if let Some(got) = b.recv(Duration::from_secs(5)) {
            b.send(&answer(&got, 200, "OK", "b", "sip:bob@127.0.0.1"));
        }
        let r = a.recv(Duration::from_secs(5))?;
        assert_eq!(
            status(&r),
            Some(200),
            "passed the door to bob and back: {}",
            String::from_utf8_lossy(&r)
        );
        Some(r)
    };
    let top_via = |r: &[u8]| sipring_tests::ua::header(r, "Via").expect("Via");
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..16).flat_map(|i| flood(tcp, i, stop.clone())).collect();
    wait_metrics(admin, "the shard declares itself overloaded", |m| {
        metric(m, "sipring_overloaded") == Some(1.0)
    });
    let (mut told, mut answered) = (0, 0);
    for n in 0..20 {
        let Some(r) = exchange(&mut upstream, &mut bob, n) else {
            continue;
        };
        answered += 1;
        let via = top_via(&r);
        if let Some(f) = sipring_core::overload_control::Feedback::parse(via.as_bytes()) {
            assert_eq!(f.validity_ms, 500, "{via}");
            assert!(via.contains("oc-algo=\"loss\""), "{via}");
            told += usize::from(f.oc > 0);
        }
    }
    assert!(answered >= 5, "{answered} of 20 answered while overloaded");
    assert!(told > 0, "no answer told the upstream to drop anything");
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let m = wait_metrics(admin, "the shard caught up", |m| {
        metric(m, "sipring_overloaded") == Some(0.0)
    });
    assert!(metric(&m, "sipring_overload_feedback_total").unwrap_or(0.0) >= 1.0);
    // Past one validity period after catching up, answers carry no feedback (polled: on a
    // busy host the shard may shed again for a moment, and then says so).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 1000;
    let via = loop {
        std::thread::sleep(Duration::from_millis(600));
        let Some(r) = exchange(&mut upstream, &mut bob, n) else {
            assert!(Instant::now() < deadline, "no answer 20 s after the flood");
            continue;
        };
        let via = top_via(&r);
        n += 1;
        if !via.contains("oc=") || Instant::now() > deadline {
            break via;
        }
    };
    assert!(!via.contains("oc="), "still told to drop 20 s after: {via}");
    assert!(
        via.contains(";oc;"),
        "the upstream's own Via comes back: {via}"
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn an_overloaded_shard_sheds_new_requests_at_the_door_and_recovers() {
    let _turn = FLOOD_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let pki = Pki::new();
    let srv = server(&pki, |c| c.limits.overload_lag_ms = 10);
    let (tls, tcp) = (srv.listen_addrs[0], srv.listen_addrs[1]);
    let admin = srv.admin_addr.unwrap();
    let ua = |user: &str| registered(&pki, tls, user);
    let (mut alice, mut bob) = (ua("alice"), ua("bob"));
    let message = |a: &mut Ua, n: u32| {
        let m = a.request(
            "MESSAGE",
            "sip:bob@example.com",
            "<sip:bob@example.com>",
            &format!("ov-{n}"),
            1,
            "",
            Some(("text/plain", "hi")),
        );
        a.send(&m);
    };
    let m = wait_metrics(admin, "the overload gauge", |m| {
        metric(m, "sipring_overloaded").is_some()
    });
    assert_eq!(
        metric(&m, "sipring_overloaded"),
        Some(0.0),
        "idle is not overload"
    );
    // Sixteen connections pipeline OPTIONS as fast as they can: the shard's loop falls behind.
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..16).flat_map(|i| flood(tcp, i, stop.clone())).collect();
    wait_metrics(admin, "the shard declares itself overloaded", |m| {
        metric(m, "sipring_overloaded") == Some(1.0)
    });
    // A new request now gets 503 with Retry-After at the door, before any other work.
    let mut shed = None;
    for n in 0..50 {
        message(&mut alice, n);
        match alice.recv(Duration::from_secs(5)) {
            Some(r) if status(&r) == Some(503) => {
                shed = Some(r);
                break;
            }
            Some(_) => {
                // Admitted in a calm moment: bob answers, the 200 is read next round.
                if let Some(got) = bob.recv(Duration::from_millis(10)) {
                    bob.send(&answer(&got, 200, "OK", "b", "sip:bob@127.0.0.1"));
                }
            }
            None => {}
        }
    }
    let shed = shed.expect("no 503 while overloaded");
    let retry = sipring_tests::ua::header(&shed, "Retry-After").expect("Retry-After");
    let secs: u32 = retry.trim().parse().unwrap();
    assert!((2..=9).contains(&secs), "Retry-After {secs}");
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let m = wait_metrics(admin, "the shard caught up", |m| {
        metric(m, "sipring_overloaded") == Some(0.0)
    });
    assert!(metric(&m, "sipring_overload_shed_total").unwrap_or(0.0) >= 1.0);
    assert!(metric(&m, "sipring_overload_episodes_total").unwrap_or(0.0) >= 1.0);
    // Admitted again: a MESSAGE reaches bob and his 200 comes back.
    while bob.recv(Duration::from_millis(100)).is_some() {}
    while alice.recv(Duration::from_millis(100)).is_some() {}
    message(&mut alice, 1000);
    let got = bob
        .recv(Duration::from_secs(5))
        .expect("the MESSAGE reaches bob");
    bob.send(&answer(&got, 200, "OK", "b", "sip:bob@127.0.0.1"));
    let r = alice.recv(Duration::from_secs(5)).expect("an answer");
    assert_eq!(status(&r), Some(200));
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_keepalive_flood_costs_one_pong_per_read_not_one_per_ping() {
    // 1,000,000 RFC 5626 pings (4 MB) on a connection that does not read: before, each ping
    // queued its own 2-byte pong (≈ 100 bytes of queue entry each, 40× what the write-queue
    // limit counted) and cost a write each; now one pong answers a read's worth of pings.
    let pki = Pki::new();
    let srv = server(&pki, |_| {});
    let tcp = srv.listen_addrs[1];
    let admin = srv.admin_addr.unwrap();
    let queued_before =
        metric(&admin_get(admin, "/metrics"), "sipring_writes_queued_total").unwrap_or(0.0);
    let mut s = {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.bind(&SocketAddr::new(IpAddr::from(ATTACKER), 0).into())
            .unwrap();
        s.connect_timeout(&tcp.into(), Duration::from_secs(2))
            .unwrap();
        TcpStream::from(s)
    };
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let chunk = b"\r\n\r\n".repeat(16 * 1024);
    let mut sent = 0usize;
    for _ in 0..16 {
        if s.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len() / 4;
    }
    assert_eq!(sent, 262_144, "the server stopped reading a ping flood");
    // Every ping read (the server keeps up), then the pongs are counted.
    std::thread::sleep(Duration::from_millis(500));
    let m = admin_get(admin, "/metrics");
    let queued = metric(&m, "sipring_writes_queued_total").unwrap_or(0.0) - queued_before;
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut pongs = 0usize;
    let mut buf = [0u8; 65536];
    while let Ok(n) = read_once(&mut s, &mut buf) {
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|&b| b == b'\r' || b == b'\n'));
        pongs += n / 2;
    }
    assert!(pongs >= 1, "no pong at all");
    assert!(
        pongs * 100 < sent && queued * 100.0 < sent as f64,
        "{sent} pings: {pongs} pongs, {queued} queued writes"
    );
    // Pings still keep a quiet connection: one at a time, each answered.
    s.write_all(b"\r\n\r\n").unwrap();
    let mut pong = [0u8; 2];
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"\r\n");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_busy_pipeline_whose_reads_end_mid_message_is_not_cut_as_stalled() {
    // Every write ends inside the next OPTIONS: the connection always holds a partial
    // message, but a new one each time. Before, the first partial's timestamp stayed and the
    // connection was cut after `partial_timeout_ms` with everything on it.
    let pki = Pki::new();
    let srv = server(&pki, |c| c.limits.partial_timeout_ms = 1000);
    let mut s = connect_from(CLIENT, srv.listen_addrs[1]).unwrap();
    let options = |k: u32| {
        format!("OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.3;branch=z9hG4bKbusy{k}\r\nMax-Forwards: 70\r\nTo: <sip:127.0.0.1>\r\nFrom: <sip:busy@example.com>;tag=b\r\nCall-ID: busy-{k}\r\nCSeq: {k} OPTIONS\r\nContent-Length: 0\r\n\r\n")
            .into_bytes()
    };
    let split = 40;
    s.write_all(&options(0)[..split]).unwrap();
    let (reader, answered) = {
        let mut r = s.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        (
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let mut buf = [0u8; 4096];
                let _ = r.set_read_timeout(Some(Duration::from_secs(6)));
                while let Ok(n) = read_once(&mut r, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                    let _ = tx.send(String::from_utf8_lossy(&all).matches("SIP/2.0 200").count());
                }
            }),
            rx,
        )
    };
    let rounds = 30; // 3 s, three partial deadlines
    for k in 0..rounds {
        std::thread::sleep(Duration::from_millis(100));
        let mut w = options(k)[split..].to_vec();
        w.extend_from_slice(&options(k + 1)[..split]);
        s.write_all(&w).expect("the connection was cut");
    }
    let end = Instant::now() + Duration::from_secs(5);
    let mut got = 0;
    while got < rounds as usize && Instant::now() < end {
        if let Ok(n) = answered.recv_timeout(Duration::from_millis(200)) {
            got = n;
        }
    }
    assert_eq!(got, rounds as usize, "answered {got} of {rounds}");
    let m = admin_get(srv.admin_addr.unwrap(), "/metrics");
    assert_eq!(
        metric(&m, "sipring_partial_timeouts_total").unwrap_or(0.0),
        0.0,
        "{m}"
    );
    drop(s);
    let _ = reader.join();
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_connection_that_never_runs_dry_does_not_starve_its_shard() {
    // A peer that keeps more than a read's worth of cheap messages (stray responses, dropped
    // at once) waiting on its socket: every read returns a full buffer, so its task never
    // waited — and before, never gave the shard back: the other connections, the timers
    // and the mesh of that shard stopped until the flood did.
    let pki = Pki::new();
    let srv = server(&pki, |_| {});
    let tcp = srv.listen_addrs[1];
    let mut client = connect_from(CLIENT, tcp).unwrap();
    let options = |k: u32| {
        format!("OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.3;branch=z9hG4bKdry{k}\r\nMax-Forwards: 70\r\nTo: <sip:127.0.0.1>\r\nFrom: <sip:dry@example.com>;tag=d\r\nCall-ID: dry-{k}\r\nCSeq: {k} OPTIONS\r\nContent-Length: 0\r\n\r\n")
            .into_bytes()
    };
    let answered = |s: &mut TcpStream, within: Duration| {
        let _ = s.set_read_timeout(Some(within));
        let mut buf = [0u8; 4096];
        matches!(read_once(s, &mut buf), Ok(n) if n > 0 && buf.starts_with(b"SIP/2.0 200"))
    };
    client.write_all(&options(0)).unwrap();
    assert!(answered(&mut client, Duration::from_secs(5)));
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = {
        let stop = stop.clone();
        let mut s = connect_from(ATTACKER, tcp).unwrap();
        std::thread::spawn(move || {
            let stray = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 192.0.2.1;branch=z9hG4bKstray\r\nTo: <sip:a@example.com>;tag=1\r\nFrom: <sip:b@example.com>;tag=2\r\nCall-ID: stray\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
            let chunk = stray.repeat(65536 / stray.len() + 1);
            let end = Instant::now() + Duration::from_secs(8);
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                if s.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        })
    };
    // The flood is under way (its socket stays full)...
    std::thread::sleep(Duration::from_millis(500));
    let mut late = 0;
    for k in 1..=3 {
        client.write_all(&options(k)).unwrap();
        if !answered(&mut client, Duration::from_secs(2)) {
            late += 1;
        }
    }
    let still_flooding = !flooding.is_finished();
    stop.store(true, Ordering::Relaxed);
    let sent = flooding.join().unwrap();
    assert!(still_flooding, "the flood ended early ({sent} bytes)");
    assert_eq!(
        late, 0,
        "OPTIONS unanswered within 2 s while one connection flooded its shard"
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_client_keeping_alive_with_single_crlfs_is_not_cut_as_stalled() {
    // RFC 5626 pings are CRLFCRLF; some phones send one CRLF (RFC 3261 §7.5: ignored before
    // a start line). The framer holds it to see whether a second follows, and the connection
    // was cut after `partial_timeout_ms` as if stalled mid-message.
    let pki = Pki::new();
    let srv = server(&pki, |c| c.limits.partial_timeout_ms = 1000);
    let mut s = connect_from(CLIENT, srv.listen_addrs[1]).unwrap();
    // Each wait is past the 1 s deadline plus the 500 ms sweep: a cut would have come.
    for _ in 0..3 {
        s.write_all(b"\r\n").unwrap();
        assert!(
            !closed_within(&mut s, Duration::from_millis(1800)),
            "cut for a lone CRLF"
        );
    }
    s.write_all(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.3;branch=z9hG4bKcrlf\r\nMax-Forwards: 70\r\nTo: <sip:127.0.0.1>\r\nFrom: <sip:k@example.com>;tag=k\r\nCall-ID: crlf\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = read_once(&mut s, &mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"SIP/2.0 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let m = admin_get(srv.admin_addr.unwrap(), "/metrics");
    assert_eq!(
        metric(&m, "sipring_partial_timeouts_total").unwrap_or(0.0),
        0.0
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn refused_handshakes_are_logged_at_most_once_a_second() {
    // Anyone can open connections that fail their handshake; each one wrote a WARN line, so
    // a loop of them filled the journal. Now one line a second (per listener kind), with
    // how many were left out, and the counter counts them all.
    let pki = Pki::new();
    let dir = TempDir::new("rejectlog");
    let (tls, admin) = (free_port(), free_port());
    let mut cfg = config(&pki);
    cfg.server.shards = 1;
    cfg.listen = vec![ListenConfig {
        kind: ListenKind::Tls,
        address: format!("127.0.0.1:{tls}").parse().unwrap(),
        ..ListenConfig::default()
    }];
    cfg.peer.clear();
    cfg.admin.address = Some(format!("127.0.0.1:{admin}").parse().unwrap());
    let path = dir.write("sipring.toml", toml::to_string(&cfg).unwrap());
    let srv = Server::start(&path);
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let up = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < up, "server did not start:\n{}", srv.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Clients that trust nothing: each refuses our certificate with an alert.
    let distrustful = tls_config(&[], None, false);
    let addr: SocketAddr = format!("127.0.0.1:{tls}").parse().unwrap();
    let t0 = Instant::now();
    for _ in 0..40 {
        assert!(
            Ua::tls(
                addr,
                distrustful.clone(),
                "sip.example.com",
                "x",
                "example.com"
            )
            .is_err()
        );
    }
    wait_metrics(admin, "40 refused handshakes", |m| {
        metric(m, "sipring_tls_rejections_total{reason=\"peer_alert\"}").unwrap_or(0.0) >= 40.0
    });
    // One a second at most, however long the 40 took on a loaded machine.
    let most = (t0.elapsed().as_secs() as usize + 2).min(20);
    let lines = srv.log().matches("TLS handshake rejected").count();
    assert!(
        (1..=most).contains(&lines),
        "{lines} lines for 40 refusals:\n{}",
        srv.log()
    );
    drop(srv);
}

#[test]
fn peers_that_never_read_cannot_together_take_the_memory() {
    // Each connection's queue is capped (`write_queue_bytes`), but many peers that pipeline
    // requests and never read, each under its cap, held cap × connections. The shard's
    // queued output is now bounded too: past it, the connection holding the most goes.
    let pki = Pki::new();
    let budget = 256 * 1024;
    let srv = server(&pki, |c| c.limits.write_queue_bytes_per_shard = budget);
    let tcp = srv.listen_addrs[1];
    let admin = srv.admin_addr.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let attackers: Vec<_> = (0..4)
        .map(|a| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                use socket2::{Domain, Socket, Type};
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                s.set_recv_buffer_size(4096).unwrap();
                s.bind(&SocketAddr::new(IpAddr::from(ATTACKER), 0).into())
                    .unwrap();
                s.connect_timeout(&tcp.into(), Duration::from_secs(2))
                    .unwrap();
                let mut s = TcpStream::from(s);
                s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                let batch: Vec<u8> = (0..100)
                    .flat_map(|k| format!("OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2;branch=z9hG4bKnr{a}x{k}\r\nMax-Forwards: 70\r\nTo: <sip:127.0.0.1>\r\nFrom: <sip:nr@example.com>;tag=n\r\nCall-ID: nr-{a}-{k}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").into_bytes())
                    .collect();
                let end = Instant::now() + Duration::from_secs(40);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    if s.write_all(&batch).is_err() {
                        break;
                    }
                }
                s
            })
        })
        .collect();
    // Up to 30 s: on a loaded machine (the other hostile tests beside it) the server may be
    // slow to produce the answers that fill the queues.
    let end = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = admin_get(admin, "/metrics");
        if metric(&m, "sipring_queue_drops_total{queue=\"shard_budget\"}").unwrap_or(0.0) >= 1.0 {
            break m;
        }
        assert!(
            Instant::now() < end,
            "no drop for the shard's write budget in 30 s:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let held = metric(&m, "sipring_write_queue_bytes").unwrap_or(0.0);
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        let _ = a.join();
    }
    assert!(
        held <= (budget + 64 * 1024) as f64,
        "{held} bytes queued, budget {budget}"
    );
    assert_eq!(
        metric(&m, "sipring_queue_drops_total{queue=\"connection\"}"),
        None,
        "no connection reached its own cap: the shard's budget did it"
    );
    // The server still serves.
    let mut c = connect_from(CLIENT, tcp).unwrap();
    c.write_all(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.3;branch=z9hG4bKafter\r\nMax-Forwards: 70\r\nTo: <sip:127.0.0.1>\r\nFrom: <sip:ok@example.com>;tag=o\r\nCall-ID: after\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = read_once(&mut c, &mut buf).unwrap();
    assert!(buf[..n].starts_with(b"SIP/2.0 200"));
    srv.stop();
    srv.join().unwrap();
}
