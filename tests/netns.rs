//! What loopback alone cannot show: a peer that vanishes (its packets stop, nothing answers,
//! no RST), and a client that is not on loopback. Each test runs itself again inside a
//! network namespace of its own (`ip netns`, so it needs root and iproute2), where it adds
//! and removes addresses without touching the host. tests/run.sh runs this suite as root with `--features netns-suite`; a
//! plain `cargo test` leaves it out.

use sipring::server::start;
use sipring_tests::server::{Pki, config, metric, wait_metrics};
use sipring_tests::ua::{Ua, status, tls_config};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// Set in the copy of the test binary that runs inside the namespace.
const INNER: &str = "SIPRING_NETNS_INNER";

/// Runs `cmd args…`, failing the test with its output when it fails.
fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (this suite needs iproute2)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{} (this suite needs root)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespace however the test ends.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `true` inside the namespace (the caller runs the test's body). Outside it, creates a
/// namespace with loopback up, runs this test binary's test `name` in it, checks that exactly
/// that test ran and passed, and returns `false`.
fn inside_netns(name: &str) -> bool {
    if std::env::var_os(INNER).is_some() {
        return true;
    }
    // Tests run side by side in one process: one namespace each.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ns = Netns(format!("sipring-test-{}-{n}", std::process::id()));
    sh("ip", &["netns", "add", &ns.0]);
    sh("ip", &["-n", &ns.0, "link", "set", "lo", "up"]);
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(std::env::current_exe().expect("test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .output()
        .expect("ip netns exec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("test result: ok. 1 passed"),
        "{name} inside {}:\n{text}",
        ns.0
    );
    false
}

/// A TCP connection to `to` from `local`.
fn connect_from(local: IpAddr, to: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::new(local, 0).into()).expect("bind");
    s.connect_timeout(&to.into(), Duration::from_secs(2))
        .expect("connect");
    s.into()
}

#[test]
fn a_peer_that_vanishes_while_we_send_to_it_is_closed_within_the_user_timeout() {
    if !inside_netns("a_peer_that_vanishes_while_we_send_to_it_is_closed_within_the_user_timeout") {
        return;
    }
    // alice's phone sits at 10.77.0.2; the address disappears (the phone lost power, or its
    // NAT binding went) while sipring is sending her a MESSAGE: nothing acknowledges it, and
    // no RST ever comes. Without TCP_USER_TIMEOUT the connection (and the binding that keeps
    // it) lingers until TCP's retransmissions give up, 15–30 minutes later.
    sh("ip", &["addr", "add", "10.77.0.2/32", "dev", "lo"]);
    let pki = Pki::new();
    let mut cfg = config(&pki);
    cfg.server.shards = 1;
    cfg.limits.tcp_user_timeout_s = 2;
    let srv = start(cfg, None).expect("start");
    let admin = srv.admin_addr.unwrap();
    let tls = || tls_config(&pki.certs("ca.pem"), None, false);
    let phone = "10.77.0.2".parse().unwrap();
    let tcp = connect_from(phone, srv.listen_addrs[0]);
    let mut alice = Ua::tls_over(tcp, tls(), "sip.example.com", "alice", "example.com")
        .expect("alice connects");
    assert_eq!(alice.register(600), 200, "alice registers");
    let mut bob = Ua::tls(
        srv.listen_addrs[0],
        tls(),
        "sip.example.com",
        "bob",
        "example.com",
    )
    .expect("bob connects");
    assert_eq!(bob.login(), 200, "bob authenticates");
    let up = |n: f64| move |m: &str| metric(m, "sipring_connections{kind=\"tls\"}") == Some(n);
    wait_metrics(admin, "alice's and bob's connections", up(2.0));

    sh("ip", &["addr", "del", "10.77.0.2/32", "dev", "lo"]);
    let t0 = Instant::now();
    bob.send(&bob.request(
        "MESSAGE",
        "sip:alice@example.com",
        "<sip:alice@example.com>",
        "vanished-1",
        1,
        "",
        Some(("text/plain", "are you there?")),
    ));
    // The MESSAGE reached sipring and went out on alice's connection (bob hears nothing
    // final yet: the answer can only come from alice).
    wait_metrics(admin, "alice's connection closed", up(1.0));
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(9),
        "closed after {took:?}, the user timeout is 2 s"
    );
    // The binding went with its connection: the next request for alice fails at once.
    bob.send(&bob.request(
        "MESSAGE",
        "sip:alice@example.com",
        "<sip:alice@example.com>",
        "vanished-2",
        1,
        "",
        Some(("text/plain", "hello?")),
    ));
    let mut finals = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && !finals.iter().any(|c| *c == 480 || *c == 430) {
        if let Some(c) = bob
            .recv(Duration::from_millis(500))
            .and_then(|m| status(&m))
            .filter(|c| *c >= 200)
        {
            finals.push(c);
        }
    }
    assert!(
        finals.iter().any(|c| *c == 480 || *c == 430),
        "bob's second MESSAGE failed at once (480 or 430), got {finals:?}"
    );
    srv.stop();
    srv.join().unwrap();
}

/// Sends `POST /reload` to the admin endpoint at `to` from `from`; returns the status line.
fn reload_from(from: IpAddr, to: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = connect_from(from, to);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /reload HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

#[test]
fn admin_reload_from_beyond_loopback_is_refused_unless_allowed() {
    if !inside_netns("admin_reload_from_beyond_loopback_is_refused_unless_allowed") {
        return;
    }
    // An endpoint opened beyond loopback for a scraper or a load balancer's health check:
    // whoever reaches it must not be able to reload (every reload re-checks each
    // certificate connection and starts new session tickets).
    sh("ip", &["addr", "add", "10.77.0.9/32", "dev", "lo"]);
    let pki = Pki::new();
    let remote: IpAddr = "10.77.0.9".parse().unwrap();
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    for allowed in [false, true] {
        let mut cfg = config(&pki);
        cfg.server.shards = 1;
        cfg.admin.address = Some("0.0.0.0:0".parse().unwrap());
        cfg.admin.remote_reload = allowed;
        let srv = start(cfg, None).expect("start");
        let port = srv.admin_addr.unwrap().port();
        let status = reload_from(remote, SocketAddr::new(remote, port));
        let want = if allowed { "200" } else { "403" };
        assert!(status.contains(want), "remote_reload = {allowed}: {status}");
        // At most one reload a second (a 403 is none).
        if allowed {
            std::thread::sleep(sipring::admin::RELOAD_SPACING);
        }
        let status = reload_from(local, SocketAddr::new(local, port));
        assert!(status.contains("200"), "from loopback: {status}");
        srv.stop();
        srv.join().unwrap();
    }
    // On a dual-stack `[::]` listener a local IPv4 client arrives as ::ffff:127.0.0.1: still
    // loopback.
    let mut cfg = config(&pki);
    cfg.server.shards = 1;
    cfg.admin.address = Some("[::]:0".parse().unwrap());
    let srv = start(cfg, None).expect("start");
    let port = srv.admin_addr.unwrap().port();
    let status = reload_from(local, SocketAddr::new(local, port));
    assert!(status.contains("200"), "IPv4 loopback on [::]: {status}");
    srv.stop();
    srv.join().unwrap();
}
