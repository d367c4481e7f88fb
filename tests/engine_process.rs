//! The real binary: SIGTERM drains with calls in flight, SIGHUP reloads TLS while calls stay
//! up (new handshakes see the new certificate; a corrupt key is refused and the previous
//! configuration keeps serving), and `check-config` names broken keys.

use sipring_tests::TempDir;
use sipring_tests::process::{Server, sipring_bin};
use sipring_tests::server::{Pki, admin, config, free_port};
use sipring_tests::ua::{Ua, answer, header_all, invite, method, tls_config};
use std::path::PathBuf;
use std::time::Duration;

/// Writes a config for the binary: fixed ports, the demo PKI copied into `dir`.
fn write_config(pki: &Pki, dir: &TempDir) -> (PathBuf, u16, u16) {
    for f in [
        "server.pem",
        "server.key",
        "partner-ca.pem",
        "partner-ca.crl",
    ] {
        std::fs::copy(pki.dir.join(f), dir.join(f)).unwrap();
    }
    let (tls, admin_port) = (free_port(), free_port());
    let mut cfg = config(pki);
    cfg.listen.truncate(1);
    cfg.listen[0].address = format!("127.0.0.1:{tls}").parse().unwrap();
    cfg.admin.address = Some(format!("127.0.0.1:{admin_port}").parse().unwrap());
    cfg.tls.certificate[0].cert = "server.pem".into();
    cfg.tls.certificate[0].key = "server.key".into();
    cfg.peer[0].roots = "partner-ca.pem".into();
    cfg.peer[0].crls = vec!["partner-ca.crl".into()];
    cfg.server.drain_timeout_s = 10;
    let path = dir.write("sipring.toml", toml::to_string(&cfg).unwrap());
    (path, tls, admin_port)
}

fn wait_up(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server did not come up on {port}");
}

fn ua(pki: &Pki, port: u16, user: &str) -> Ua {
    let cfg = tls_config(&pki.certs("ca.pem"), None, false);
    let mut u = Ua::tls(
        format!("127.0.0.1:{port}").parse().unwrap(),
        cfg,
        "sip.example.com",
        user,
        "example.com",
    )
    .unwrap();
    assert_eq!(u.register(600), 200);
    u
}

/// alice (registered) INVITEs bob (registered); returns both and the INVITE bob received,
/// not yet answered.
fn ringing(pki: &Pki, port: u16, call_id: &str) -> (Ua, Ua, Vec<u8>) {
    let mut alice = ua(pki, port, "alice");
    let mut bob = ua(pki, port, "bob");
    let inv = invite(&mut alice, &mut bob, call_id);
    (alice, bob, inv)
}

#[test]
fn sigterm_drains_with_calls_in_flight() {
    let pki = Pki::new();
    let dir = TempDir::new("drain");
    let (path, port, admin_port) = write_config(&pki, &dir);
    let mut srv = Server::start(&path);
    wait_up(port);
    let admin_addr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    assert_eq!(admin(admin_addr, "GET", "/health").0, "HTTP/1.0 200 OK");
    let (mut alice, mut bob, inv) = ringing(&pki, port, "drain-1");
    srv.signal("TERM");
    srv.wait_log("draining");
    // A load balancer's health check sees it: no new work here. (The log line comes just
    // before the flag is set: polled, bounded.)
    let t0 = std::time::Instant::now();
    while admin(admin_addr, "GET", "/health").0 != "HTTP/1.0 503 Service Unavailable" {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "/health never said 503"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // No new connections once draining (the listeners close as the drain starts: polled).
    let t0 = std::time::Instant::now();
    while Ua::tls(
        format!("127.0.0.1:{port}").parse().unwrap(),
        tls_config(&pki.certs("ca.pem"), None, false),
        "sip.example.com",
        "late",
        "example.com",
    )
    .is_ok()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "connections still accepted while draining"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ... nor new requests on the connections already up: 503 with Retry-After, so the
    // sender tries another server (before, they were taken for the whole drain).
    let msg = alice.request(
        "MESSAGE",
        "sip:bob@example.com",
        "<sip:bob@example.com>",
        "drain-msg",
        1,
        "",
        Some(("text/plain", "late")),
    );
    alice.send(&msg);
    let (s, _) = alice.expect_final_or_provisional("503 while draining");
    assert_eq!(s, 503);
    // ... but the call in flight completes, its ACK included: it comes after the last
    // transaction ended (before, the drain could stop in between, and bob — no ACK —
    // tore the call down).
    bob.send(&answer(&inv, 200, "OK", "b1", "sip:bob@127.0.0.1"));
    let (s, ok) = alice.expect_final_or_provisional("200 while draining");
    assert_eq!(s, 200);
    std::thread::sleep(Duration::from_millis(1200));
    let rr = header_all(&ok, "Record-Route").expect("Record-Route");
    let ack = alice.request(
        "ACK",
        "sip:bob@127.0.0.1",
        "<sip:bob@example.com>;tag=b1",
        "drain-1",
        1,
        &format!("Route: {rr}\r\n"),
        None,
    );
    alice.send(&ack);
    assert_eq!(method(&bob.expect("the 2xx's ACK during the drain")), "ACK");
    // Then connections close and the process exits 0. (A recv timing out would pass for a
    // close: the connection must end, not merely fall silent.)
    assert!(
        alice.closed_within(Duration::from_secs(20)),
        "connection left open after the drain"
    );
    assert_eq!(srv.wait_exit(20), Some(0), "exit status\n{}", srv.log());
}

#[test]
fn a_second_sigterm_cuts_the_drain_short() {
    let pki = Pki::new();
    let dir = TempDir::new("hurry");
    let (path, port, _) = write_config(&pki, &dir);
    let mut srv = Server::start(&path);
    wait_up(port);
    let (_alice, _bob, _inv) = ringing(&pki, port, "hurry-1");
    srv.signal("TERM");
    srv.wait_log("draining");
    std::thread::sleep(Duration::from_millis(700));
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(5), Some(0), "exit status\n{}", srv.log());
    assert!(srv.log().contains("stopping now"), "{}", srv.log());
}

#[test]
fn a_crl_that_lapses_while_running_is_shown_and_told() {
    // A partner's CRL (unknown status refused, the default) falls due while the server
    // runs: from then on every new connection it covers is refused, so a partner's link that
    // drops cannot come back. Before, the operator heard of it only at the next reload.
    let pki = Pki::new();
    let dir = TempDir::new("crl-lapse");
    let (path, port, admin_port) = write_config(&pki, &dir);
    let ca = sipring::tls::pki::Ca::new("Lapsing CA").unwrap();
    dir.write("partner-ca.pem", &ca.cert.cert_pem);
    let due = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 12;
    dir.write(
        "partner-ca.crl",
        ca.crl_next_update(&[], time::Duration::seconds(12))
            .unwrap(),
    );
    let srv = Server::start(&path);
    wait_up(port);
    let log = srv.wait_log("sipring running");
    assert!(log.contains("CRL falls due within a day"), "{log}");
    // When, on /metrics: an alert is `sipring_tls_crl_next_update_seconds - time() < 86400`.
    let admin_addr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let m = sipring_tests::server::admin_get(admin_addr, "/metrics");
    let line = m
        .lines()
        .find(|l| l.starts_with("sipring_tls_crl_next_update_seconds{file=\""))
        .unwrap_or_else(|| panic!("no CRL gauge:\n{m}"));
    assert!(line.contains("partner-ca.crl\"}"), "{line}");
    let at: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((at - due).abs() <= 2, "{line}, due {due}");
    // Told within a second or two of it.
    let told = loop {
        let log = srv.log();
        if log.contains("CRL reached its nextUpdate") {
            break log;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(now <= due + 2, "not told by {now}:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        told.matches("CRL reached its nextUpdate").count(),
        1,
        "{told}"
    );
    // Told once, not every 100 ms.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(srv.log().matches("CRL reached its nextUpdate").count(), 1);
}

#[test]
fn sighup_reload_keeps_calls_up_and_refuses_a_corrupt_key() {
    let pki = Pki::new();
    let dir = TempDir::new("reload");
    let (path, port, admin_port) = write_config(&pki, &dir);
    let srv = Server::start(&path);
    wait_up(port);
    let (mut alice, mut bob, inv) = ringing(&pki, port, "reload-1");
    bob.send(&answer(&inv, 200, "OK", "b1", "sip:bob@127.0.0.1"));
    assert_eq!(alice.expect_final_or_provisional("200").0, 200);

    // Rotate the server certificate on disk and reload.
    let ca = sipring::tls::pki::Ca::new("Rotated CA").unwrap();
    let new = ca
        .issue(&sipring::tls::pki::Spec::server("sip.example.com"))
        .unwrap();
    std::fs::write(dir.join("server.pem"), &new.cert_pem).unwrap();
    std::fs::write(dir.join("server.key"), &new.key_pem).unwrap();
    srv.signal("HUP");
    srv.wait_log("TLS configuration reloaded");
    // The call's connections are still up: MESSAGE in the dialog's direction flows.
    alice.send(&alice.request(
        "MESSAGE",
        "sip:bob@example.com",
        "<sip:bob@example.com>",
        "reload-2",
        1,
        "",
        Some(("text/plain", "still here")),
    ));
    let m = bob.expect("MESSAGE after reload");
    assert_eq!(method(&m), "MESSAGE");
    bob.send(&answer(&m, 200, "OK", "b2", "sip:bob@127.0.0.1"));
    assert_eq!(alice.expect_final_or_provisional("200 after reload").0, 200);
    // New handshakes present the new certificate (trusting only the old CA now fails).
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        Ua::tls(
            addr,
            tls_config(&pki.certs("ca.pem"), None, false),
            "sip.example.com",
            "x",
            "example.com"
        )
        .is_err()
    );
    let mut carol = Ua::tls(
        addr,
        tls_config(std::slice::from_ref(&ca.cert.der), None, false),
        "sip.example.com",
        "carol",
        "example.com",
    )
    .expect("new certificate served");
    assert_eq!(carol.register(600), 200);

    // A corrupt key is refused, names the file, and the rotated configuration keeps serving.
    std::fs::write(
        dir.join("server.key"),
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    srv.signal("HUP");
    let log = srv.wait_log("reload refused");
    assert!(log.contains("server.key"), "{log}");
    let (status, body) = admin(
        format!("127.0.0.1:{admin_port}").parse().unwrap(),
        "POST",
        "/reload",
    );
    assert!(status.contains("409"), "{status} {body}");
    assert!(body.contains("server.key"), "{body}");
    let mut dave = Ua::tls(
        addr,
        tls_config(std::slice::from_ref(&ca.cert.der), None, false),
        "sip.example.com",
        "dave",
        "example.com",
    )
    .expect("still served");
    assert_eq!(dave.register(600), 200);

    // A typo in the configuration file itself: refused, logged and counted, not silent.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{good}\n[limits\n")).unwrap();
    let before = srv.log().matches("reload refused").count();
    srv.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while srv.log().matches("reload refused").count() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "a broken configuration file was refused silently:\n{}",
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(srv.log().contains(&name), "{}", srv.log());
}

#[test]
fn check_config_names_keys_and_files() {
    let dir = TempDir::new("check");
    let bad = dir.write("bad.toml", "[server]\nshards = 2\n[[listen]]\nkind = \"mtls\"\naddress = \"127.0.0.1:5062\"\n[registrar]\nmin_expires_s = 9000\n");
    let out = std::process::Command::new(sipring_bin())
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["tls.certificate", "peer", "registrar.min_expires_s"] {
        assert!(
            err.contains(&format!("bad.toml: {key}:")),
            "{key} missing in:\n{err}"
        );
    }
    let typo = dir.write("typo.toml", "[server]\nshardz = 2\n");
    let out = std::process::Command::new(sipring_bin())
        .args(["check-config"])
        .arg(&typo)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a typo passed check-config");
    assert!(String::from_utf8_lossy(&out.stderr).contains("shardz"));
}

#[test]
fn shards_and_the_generator_pin_inside_the_allowed_cpu_set() {
    // Give each process one CPU with taskset: the last one this test may use (on a 2-CPU
    // host, CPU 1 — so an absolute "CPU 0" would be outside the set).
    let cpu = *sipring::sys::cpus::allowed().last().unwrap();
    let only = cpu.to_string();
    let pki = Pki::new();
    let dir = TempDir::new("pin");
    let (path, port, _) = write_config(&pki, &dir);
    let mut cfg: sipring::config::Config =
        toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg.server.shards = 1;
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let srv = Server::start_under(&path, &["taskset", "-c", &only]);
    wait_up(port);
    srv.wait_log("sipring running"); // (the listener accepts before the shards run)
    let threads = sipring_tests::process::settled_thread_cpus(srv.child.id(), "sipring-shard");
    // (glommio's helper threads inherit the shard's name and its placement.)
    assert!(!threads.is_empty(), "no shard thread found");
    assert!(
        threads.iter().all(|(_, c)| *c == only),
        "shard outside the allowed set: {threads:?}"
    );
    // The generator too, with its reflector-free idle scenario.
    let mut gen_cmd = std::process::Command::new("taskset");
    gen_cmd
        .args(["-c", &only])
        .arg(sipring_tests::process::bin("sipring-load"))
        .args([
            "idle",
            "--quiet",
            "--shards",
            "1",
            "--users",
            "2",
            "--duration",
            "3",
            "--warmup",
            "0",
        ])
        .args([
            "--target",
            &format!("127.0.0.1:{port}"),
            "--password",
            "pw-{user}",
            "--ca",
        ])
        .arg(pki.dir.join("ca.pem"))
        .stdout(std::process::Stdio::null());
    let mut generator = gen_cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let threads = sipring_tests::process::thread_cpus(generator.id(), "load-");
    let _ = generator.kill();
    let _ = generator.wait();
    assert!(!threads.is_empty(), "no generator thread found");
    assert!(
        threads.iter().all(|(_, c)| *c == only),
        "generator outside the allowed set: {threads:?}"
    );
    drop(srv);
    // Shards that do not fit the allowed CPUs refuse to start, naming the keys.
    cfg.server.first_cpu = 1;
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let mut srv = Server::start_under(&path, &["taskset", "-c", &only]);
    assert_eq!(srv.wait_exit(10), Some(1), "{}", srv.log());
    let log = srv.log();
    assert!(
        log.contains("server.first_cpu (1)") && log.contains(&format!("({only})")),
        "{log}"
    );
    drop(srv);
    // Floating shards (`pin_shards = false`): more shards than CPUs start, each thread may
    // run on the whole allowed set (not one CPU of it), and they serve.
    let all = sipring::sys::cpus::list(&sipring::sys::cpus::allowed());
    cfg.server.pin_shards = false;
    cfg.server.shards = 3;
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let srv = Server::start(&path);
    wait_up(port);
    srv.wait_log("sipring running"); // (the listener accepts before the shards run)
    let threads = sipring_tests::process::settled_thread_cpus(srv.child.id(), "sipring-shard");
    let shards: std::collections::BTreeSet<&str> =
        threads.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(shards.len(), 3, "{threads:?}");
    assert!(
        threads.iter().all(|(_, c)| *c == all),
        "pinned: {threads:?}"
    );
    let _alice = ua(&pki, port, "alice");
}

/// A CPU cgroup holding its members to `cpus` CPUs (v2 `cpu.max` or v1 CFS quota), removed
/// on drop. Needs root, as the suite does.
struct CpuCgroup(PathBuf);

impl CpuCgroup {
    fn new(name: &str, cpus: u32) -> CpuCgroup {
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let dir = if v2 {
            let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+cpu");
            PathBuf::from(format!("/sys/fs/cgroup/{name}-{}", std::process::id()))
        } else {
            PathBuf::from(format!("/sys/fs/cgroup/cpu/{name}-{}", std::process::id()))
        };
        std::fs::create_dir(&dir).expect("create a CPU cgroup (the suite runs as root)");
        if v2 {
            std::fs::write(dir.join("cpu.max"), format!("{} 100000", cpus * 100_000)).unwrap();
        } else {
            std::fs::write(dir.join("cpu.cfs_period_us"), "100000").unwrap();
            std::fs::write(dir.join("cpu.cfs_quota_us"), (cpus * 100_000).to_string()).unwrap();
        }
        CpuCgroup(dir)
    }

    /// A wrapper for `Server::start_under` that joins the cgroup, then execs.
    fn procs(&self) -> String {
        format!("echo $$ > {}/cgroup.procs && exec \"$@\"", self.0.display())
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        for _ in 0..20 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn shards_default_to_the_cgroup_cpu_quota() {
    // A container with a CPU limit sees every CPU of the node: `shards = 0` must take the
    // limit (rounded up), not the CPU count.
    let allowed = sipring::sys::cpus::allowed().len();
    assert!(
        allowed >= 2,
        "this test needs 2 allowed CPUs to tell the quota from the count"
    );
    let pki = Pki::new();
    let dir = TempDir::new("quota");
    let (path, port, _) = write_config(&pki, &dir);
    let mut cfg: sipring::config::Config =
        toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg.server.shards = 0;
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let cg = CpuCgroup::new("sipring-test-quota", 1);
    let wrapper = cg.procs();
    let srv = Server::start_under(&path, &["sh", "-c", &wrapper, "sh"]);
    wait_up(port);
    // (The listener accepts before the shards run: wait for the server to say it is up.)
    srv.wait_log("sipring running");
    let threads = sipring_tests::process::settled_thread_cpus(srv.child.id(), "sipring-shard");
    let shards: std::collections::BTreeSet<&str> =
        threads.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(shards.len(), 1, "{allowed} CPUs, quota 1: {threads:?}");
    let log = srv.log();
    assert!(log.contains("within the cgroup's CPU quota"), "{log}");
    let _alice = ua(&pki, port, "alice");
    drop(srv);
    drop(cg);
    // Outside the cgroup, the same config takes every allowed CPU.
    let srv = Server::start(&path);
    wait_up(port);
    // (The listener accepts before the shards run: wait for the server to say it is up.)
    srv.wait_log("sipring running");
    let threads = sipring_tests::process::settled_thread_cpus(srv.child.id(), "sipring-shard");
    let shards: std::collections::BTreeSet<&str> =
        threads.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(shards.len(), allowed, "{threads:?}\n{}", srv.log());
}
