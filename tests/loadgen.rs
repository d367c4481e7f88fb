//! `sipring-load` against a real sipring on loopback: every scenario for a few seconds over
//! TLS (digest-authenticated UAs) and MTLS (UAs whose client certificates name their AORs), the counts add up (sent = answered + failed), the `.hgrm` and JSON outputs
//! parse and agree, the SVG is written; and coordinated-omission correction against a server
//! that stalls for a known time.

use sipring::server::start;
use sipring_load::stats::Summary;
use sipring_tests::TempDir;
use sipring_tests::process::bin;
use sipring_tests::server::{Pki, config, metric, wait_metrics};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `sipring-load <args>` and returns (exit code, stdout, summary).
/// The demo runs alone; the other load tests run side by side.
static LOAD_TURN: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn load(out: &TempDir, tag: &str, args: &[&str]) -> (i32, String, Summary) {
    let json = out.join(&format!("{tag}.json"));
    let hgrm = out.join(&format!("{tag}-hgrm"));
    let svg = out.join(&format!("{tag}.svg"));
    let o = Command::new(bin("sipring-load"))
        .args(args)
        .args(["--quiet", "--json"])
        .arg(&json)
        .arg("--hgrm-dir")
        .arg(&hgrm)
        .arg("--plot")
        .arg(&svg)
        .output()
        .expect("run sipring-load");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_else(|_| {
            panic!(
                "{tag}: no JSON\n{stdout}\n{}",
                String::from_utf8_lossy(&o.stderr)
            )
        }))
        .expect("JSON summary parses");
    check_outputs(tag, &summary, &hgrm, &svg);
    (o.status.code().unwrap_or(-1), stdout, summary)
}

/// The JSON and the `.hgrm` files agree; the SVG exists; the counts add up.
fn check_outputs(tag: &str, s: &Summary, hgrm: &Path, svg: &Path) {
    assert_eq!(
        s.sent,
        s.answered + s.failed,
        "{tag}: sent = answered + failed: {:?}",
        s.kinds
            .iter()
            .map(|(k, v)| (k, v.sent, v.answered, &v.failures))
            .collect::<Vec<_>>()
    );
    for (kind, k) in &s.kinds {
        let text = std::fs::read_to_string(hgrm.join(format!("{kind}.hgrm")))
            .unwrap_or_else(|_| panic!("{tag}: {kind}.hgrm missing"));
        let (rows, total) = sipring::metrics::parse_hgrm(&text)
            .unwrap_or_else(|| panic!("{tag}: {kind}.hgrm does not parse"));
        assert_eq!(total, k.count, "{tag}: {kind}: .hgrm total = JSON count");
        let max = rows.last().unwrap().0;
        assert!(
            (max - k.max_ms).abs() <= k.max_ms * 0.01 + 0.002,
            "{tag}: {kind}: .hgrm max {max} vs JSON {}",
            k.max_ms
        );
    }
    let svg = std::fs::read_to_string(svg).unwrap_or_else(|_| panic!("{tag}: SVG missing"));
    assert!(
        svg.contains("<svg") && svg.contains("latency"),
        "{tag}: SVG"
    );
}

#[test]
fn every_scenario_against_sipring_over_tls_and_mtls() {
    let _turn = LOAD_TURN.read().unwrap_or_else(|e| e.into_inner());
    let pki = Pki::new();
    // Clients may present certificates (the MTLS run below: each UA's certificate names its
    // AOR, which then needs no password); the others authenticate with digest.
    let client_ca = sipring::tls::pki::Ca::new("client CA").unwrap();
    let mut cfg = config(&pki);
    cfg.listen[0].client_auth = sipring::config::ClientAuth::Optional;
    cfg.tls.client_roots = Some(pki.dir.write("client-ca.pem", &client_ca.cert.cert_pem));
    let srv = start(cfg, None).expect("start");
    let out = TempDir::new("load");
    let tls = srv.listen_addrs[0].to_string();
    let ca = pki.dir.join("ca.pem").display().to_string();
    let common = |t: &str| {
        vec![
            "--target".to_string(),
            t.to_string(),
            "--ca".into(),
            ca.clone(),
            "--duration".into(),
            "2".into(),
            "--warmup".into(),
            "0.5".into(),
            "--password".into(),
            "pw-{user}".into(),
        ]
    };
    let run = |tag: &str, scenario: &str, extra: &[&str]| {
        let mut a: Vec<String> = vec![scenario.to_string()];
        a.extend(common(&tls));
        a.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = a.iter().map(String::as_str).collect();
        load(&out, tag, &args)
    };
    let (code, table, s) = run(
        "register",
        "register",
        &[
            "--users",
            "20",
            "--rate",
            "50",
            "--unregister",
            "--prefix",
            "r",
        ],
    );
    assert_eq!(code, 0, "{table}");
    assert!(
        s.kinds["register"].answered >= 20 && s.failed == 0,
        "{table}"
    );
    let (code, table, s) = run(
        "message",
        "message",
        &["--users", "20", "--rate", "200", "--prefix", "m"],
    );
    assert_eq!(code, 0, "{table}");
    assert!(s.kinds["message"].count >= 300 && s.failed == 0, "{table}");
    // `--count` counts measured transactions, and the rate is per the time they took: it
    // counted warm-up ones too, and `seconds` was the planned duration whatever happened.
    let (code, table, s) = run(
        "count",
        "message",
        &[
            "--users", "20", "--rate", "100", "--count", "40", "--prefix", "u",
        ],
    );
    assert_eq!(code, 0, "{table}");
    assert_eq!(s.kinds["message"].count, 40, "{table}");
    // 40 at 100/s: 0.4 s, whatever the number of shards (split exactly).
    assert!(
        (0.35..=0.45).contains(&s.seconds),
        "measured for {} s\n{table}",
        s.seconds
    );
    // Fewer users than shards: a shard without users sent nothing, and its share of the
    // rate and of `--count` was lost without a word (on a 16-CPU host, `--users 10 --rate
    // 100` ran at 62.5/s). The shards that own users take it all.
    let (code, table, s) = run(
        "few-users",
        "message",
        &[
            "--users", "1", "--shards", "2", "--rate", "100", "--count", "40", "--prefix", "u",
        ],
    );
    assert_eq!(code, 0, "{table}");
    assert_eq!(s.kinds["message"].count, 40, "{table}");
    assert!(
        (0.35..=0.45).contains(&s.seconds),
        "measured for {} s\n{table}",
        s.seconds
    );
    let (code, table, s) = run(
        "call",
        "call",
        &[
            "--users", "20", "--rate", "40", "--hold", "0.2", "--prefix", "c",
        ],
    );
    assert_eq!(code, 0, "{table}");
    for k in ["invite_100", "invite_180", "invite_200", "bye"] {
        assert!(s.kinds[k].count >= 60, "{k}: {table}");
    }
    let (code, table, s) = run("handshake", "handshake", &["--rate", "40"]);
    assert_eq!(code, 0, "{table}");
    assert!(
        s.kinds["tls_handshake"].count >= 60 && s.kinds["options"].answered >= 60,
        "{table}"
    );
    assert_eq!(s.blocked_calls, 0, "{table}");
    // One handshake in flight at most, asked for 400 a second: most are not started
    // (counted as blocked, not as failures), and those started all complete.
    let (code, table, s) = run(
        "handshake-capped",
        "handshake",
        &["--rate", "400", "--max-concurrent", "1"],
    );
    assert_eq!(code, 0, "{table}");
    assert!(s.blocked_calls > 0 && s.failed == 0, "{table}");
    let (code, table, s) = run(
        "idle",
        "idle",
        &["--users", "30", "--keepalive", "0.5", "--prefix", "i"],
    );
    assert_eq!(code, 0, "{table}");
    assert!(s.pongs >= 30 * 3, "keepalive pongs: {}\n{table}", s.pongs);
    // MTLS: each UA presents its own client certificate, whose SAN sip:x<i>@example.com
    // authenticates that AOR (no password: the generator's credentials are left out).
    let certs = out.join("ua-certs");
    std::fs::create_dir_all(&certs).unwrap();
    for i in 0..10 {
        let c = client_ca
            .issue(&sipring::tls::pki::Spec {
                uris: vec![format!("sip:x{i}@example.com")],
                usage: sipring::tls::pki::Usage::ClientOnly,
                ..sipring::tls::pki::Spec::server(&format!("x{i}.example.com"))
            })
            .unwrap();
        std::fs::write(certs.join(format!("x{i}.pem")), &c.cert_pem).unwrap();
        std::fs::write(certs.join(format!("x{i}.key")), &c.key_pem).unwrap();
    }
    let mut a = vec!["message".to_string()];
    a.extend(
        common(&tls)
            .into_iter()
            .filter(|s| s != "--password" && s != "pw-{user}"),
    );
    a.extend(
        [
            "--transport",
            "mtls",
            "--cert-dir",
            &certs.display().to_string(),
            "--users",
            "10",
            "--rate",
            "100",
            "--prefix",
            "x",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let args: Vec<&str> = a.iter().map(String::as_str).collect();
    let (code, table, s) = load(&out, "mtls", &args);
    assert_eq!(code, 0, "{table}");
    assert!(s.kinds["message"].count >= 150 && s.failed == 0, "{table}");
    // A mix from a scenario file, and compare.
    let mix = out.write("mix.toml", "[[scenario]]\nscenario = \"message\"\nusers = 10\nrate = 100\nprefix = \"m\"\n[[scenario]]\nscenario = \"call\"\nusers = 10\nrate = 20\nhold = 0.2\nprefix = \"c\"\n");
    let mut a = vec!["mix".to_string(), mix.display().to_string()];
    a.extend(common(&tls));
    let args: Vec<&str> = a.iter().map(String::as_str).collect();
    let (code, table, s) = load(&out, "mix", &args);
    assert_eq!(code, 0, "{table}");
    assert!(
        s.kinds["message"].count > 0 && s.kinds["invite_200"].count > 0,
        "{table}"
    );
    let cmp = Command::new(bin("sipring-load"))
        .args(["compare", "--kind", "message", "--plot"])
        .arg(out.join("cmp.svg"))
        .arg(out.join("message.json"))
        .arg(out.join("mix.json"))
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stderr)
    );
    assert!(
        std::fs::read_to_string(out.join("cmp.svg"))
            .unwrap()
            .contains("<svg")
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn failures_set_the_exit_code() {
    let _turn = LOAD_TURN.read().unwrap_or_else(|e| e.into_inner());
    // Nothing listens there: every connection fails, and --max-failures makes it an error.
    let out = TempDir::new("load-fail");
    let port = sipring_tests::server::free_port();
    let (code, _, s) = load(
        &out,
        "fail",
        &[
            "message",
            "--transport",
            "tcp",
            "--target",
            &format!("127.0.0.1:{port}"),
            "--users",
            "4",
            "--rate",
            "10",
            "--duration",
            "1",
            "--warmup",
            "0",
        ],
    );
    assert_eq!(code, 1);
    assert!(s.failed > 0 && s.sent == s.answered + s.failed);
}

/// A plain-TCP SIP "server" that answers REGISTER and MESSAGE with 200 at once, except that
/// it stops reading for `stall` once, `after` into the run.
fn stalling_server(stall: Duration, after: Duration) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for s in l.incoming().flatten() {
            let stalled = stalled.clone();
            std::thread::spawn(move || {
                let mut s = s;
                s.set_nodelay(true).unwrap();
                let mut buf = Vec::new();
                let mut tmp = [0u8; 65536];
                let mut framer = sipring_core::Framer::new(
                    sipring_core::Limits::default(),
                    sipring_core::KeepaliveRole::Server,
                );
                loop {
                    if t0.elapsed() >= after
                        && !stalled.swap(true, std::sync::atomic::Ordering::SeqCst)
                    {
                        std::thread::sleep(stall);
                    }
                    let n = match s.read(&mut tmp) {
                        // A signal meant for a server thread of this test process.
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&tmp[..n]);
                    while let Ok(sipring_core::Status::Complete(sipring_core::Frame::Message(
                        len,
                    ))) = framer.frame(&buf)
                    {
                        let msg: Vec<u8> = buf.drain(..len).collect();
                        let mut h = [sipring_core::Header::EMPTY; 64];
                        let parsed = sipring_core::parse(
                            &msg,
                            &mut h,
                            &sipring_core::Limits::default(),
                            sipring_core::Framing::Stream,
                        );
                        if let Ok(sipring_core::Status::Complete(m)) = parsed
                            && m.is_request()
                        {
                            let parts = sipring_core::response::ResponseParts {
                                to_tag: Some(b"s"),
                                ..Default::default()
                            };
                            let _ = s.write_all(&sipring_core::response::response_to(
                                &m, 200, "OK", parts,
                            ));
                        }
                    }
                }
            });
        }
    });
    port
}

#[test]
fn the_tail_includes_a_server_stall() {
    let _turn = LOAD_TURN.read().unwrap_or_else(|e| e.into_inner());
    // 200 MESSAGE/s for 3 s over one connection; the server stalls 500 ms at t≈1.5 s. Every
    // request intended during the stall waits for it: measured from its intended send time,
    // about 100 requests see 0..500 ms, so the 99th percentile is well above 300 ms.
    let port = stalling_server(Duration::from_millis(500), Duration::from_millis(1500));
    let out = TempDir::new("load-co");
    let (_, table, s) = load(
        &out,
        "co",
        &[
            "message",
            "--transport",
            "tcp",
            "--target",
            &format!("127.0.0.1:{port}"),
            "--users",
            "1",
            "--rate",
            "200",
            "--duration",
            "3",
            "--warmup",
            "0",
            "--shards",
            "1",
        ],
    );
    let m = &s.kinds["message"];
    assert!(
        m.max_ms >= 400.0,
        "the stall is in the tail: max {} ms\n{table}",
        m.max_ms
    );
    assert!(m.p99_ms >= 300.0, "p99 {} ms\n{table}", m.p99_ms);
    assert!(
        m.p50_ms < 50.0,
        "but not in the median: {} ms\n{table}",
        m.p50_ms
    );
    assert_eq!(s.failed, 0, "{table}");
}

#[test]
fn a_restart_becomes_a_measured_reconnect_storm() {
    let _turn = LOAD_TURN.read().unwrap_or_else(|e| e.into_inner());
    // 20 registered UAs hold their connections; the server stops and comes back on the same
    // port; with --reconnect every UA connects again and re-registers, and the `reconnect`
    // histogram (loss → new 200) has exactly one entry per UA.
    let pki = Pki::new();
    let mut cfg = config(&pki);
    cfg.listen.truncate(1);
    let srv = start(cfg.clone(), None).expect("start");
    let addr = srv.listen_addrs[0];
    let ca = pki.dir.join("ca.pem").display().to_string();
    let generator = std::thread::spawn(move || {
        let out = TempDir::new("load-reconnect");
        let target = addr.to_string();
        let r = load(
            &out,
            "reconnect",
            &[
                "idle",
                "--target",
                &target,
                "--ca",
                &ca,
                "--users",
                "20",
                "--keepalive",
                "0.5",
                // Room for the backoff (up to 5 s) after the 2.3 s outage on a busy host.
                "--duration",
                "10",
                "--warmup",
                "0",
                "--reconnect",
                "--password",
                "pw-{user}",
                // From two source addresses: the connect that binds one (not blocking the
                // generator's shard) sees the refusals too.
                "--local-addrs",
                "127.0.0.2-127.0.0.3",
            ],
        );
        drop(out);
        r
    });
    // Every UA registered (polled, bounded: a fixed sleep stopped the server mid-setup on a
    // busy host, and no reconnect was measured), and held a moment.
    wait_metrics(srv.admin_addr.unwrap(), "20 bindings", |m| {
        metric(m, "sipring_bindings") == Some(20.0)
    });
    std::thread::sleep(Duration::from_millis(500));
    srv.stop();
    srv.join().unwrap();
    // A stopped server has released its port (no listener left behind in the reuseport group).
    drop(std::net::TcpListener::bind(addr).expect("port released after stop"));
    // Down for a moment: the first attempts are refused and back off.
    std::thread::sleep(Duration::from_millis(300));
    cfg.listen[0].address = addr;
    let srv = start(cfg, None).expect("restart on the same port");
    let (_, table, s) = generator.join().unwrap();
    let r = s
        .kinds
        .get("reconnect")
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(r.count, 20, "one re-registration per UA: {table}");
    assert!(
        r.p50_ms >= 300.0,
        "measured from the loss, not the reconnect: {table}"
    );
    assert_eq!(r.answered, 20, "{table}");
    // Attempts while the server was down were refused, counted under their cause.
    let refused = s.kinds["tcp_connect"].failures.get("connection_refused");
    assert!(refused.is_some_and(|&n| n >= 20), "{table}");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn per_ua_client_certificates_from_a_folder() {
    let _turn = LOAD_TURN.read().unwrap_or_else(|e| e.into_inner());
    // --cert-dir: UA i presents pair i mod n. With the partner's certificate and a revoked one
    // in the folder, half of the UAs get through the MTLS listener and half are refused:
    // each UA used its own certificate.
    let pki = Pki::new();
    let srv = start(config(&pki), None).expect("start");
    let out = TempDir::new("load-certdir");
    let dir = out.join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to) in [("partner", "a"), ("revoked", "b")] {
        for ext in ["pem", "key"] {
            std::fs::copy(
                pki.dir.join(&format!("{from}.{ext}")),
                dir.join(format!("{to}.{ext}")),
            )
            .unwrap();
        }
    }
    let (_, table, s) = load(
        &out,
        "certdir",
        &[
            "register",
            "--transport",
            "mtls",
            "--target",
            &srv.listen_addrs[1].to_string(),
            "--ca",
            &pki.dir.join("ca.pem").display().to_string(),
            "--cert-dir",
            &dir.display().to_string(),
            // TLS 1.2: the server's verdict on the client certificate arrives inside the
            // handshake (with 1.3 the client finishes first and meets the alert afterwards).
            "--tls-version",
            "1.2",
            "--users",
            "4",
            "--rate",
            "10",
            "--duration",
            "1",
            "--warmup",
            "0",
        ],
    );
    let hs = &s.kinds["tls_handshake"];
    assert_eq!(hs.answered, 2, "{table}");
    // sipring tells an unauthenticated peer only `certificate_unknown` (the reason, revoked,
    // is in its own log and metrics); the generator reports the alert it received.
    assert_eq!(
        hs.failures.get("tls_alert_certificate_unknown"),
        Some(&2),
        "{table}"
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_run_on_many_generator_shards_ends_without_failures_of_its_own() {
    let _turn = LOAD_TURN.read().unwrap_or_else(|e| e.into_inner());
    // Issue 15 #9: the generator's shards end at slightly different times; one that stopped
    // answering (or unregistered its users) while another still sent BYEs or INVITEs to them
    // made failures that were the generator's, not the server's. Now every shard drains,
    // then they all stop answering together. Eight shards on this host's CPUs, calls with a
    // hold and an unregistration at the end, three runs: none may fail.
    let pki = Pki::new();
    let srv = start(config(&pki), None).expect("start");
    let out = TempDir::new("load-shards");
    let tls = srv.listen_addrs[0].to_string();
    let ca = pki.dir.join("ca.pem").display().to_string();
    for run in 0..3 {
        let (code, table, s) = load(
            &out,
            &format!("shards-{run}"),
            &[
                "call",
                "--target",
                &tls,
                "--ca",
                &ca,
                "--shards",
                "8",
                "--users",
                "40",
                "--rate",
                "40",
                "--hold",
                "0.3",
                "--duration",
                "1.5",
                "--warmup",
                "0",
                "--password",
                "pw-{user}",
                "--prefix",
                "u",
                "--unregister",
            ],
        );
        assert_eq!((code, s.failed), (0, 0), "run {run}:\n{table}");
        assert!(s.kinds["bye"].count >= 40, "run {run}:\n{table}");
    }
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn the_demo_runs_the_sipring_binary_and_stops_it_cleanly() {
    // Alone: its 600 debug-build handshakes beside the other load tests on a 2-CPU host
    // made the server shed a few of its first requests (503 at the door, as designed).
    let _turn = LOAD_TURN.write().unwrap_or_else(|e| e.into_inner());
    // The generator links the SIP core and the shared TLS crate, not the server: its demo
    // starts the real binary (PKI from `sipring certs`, a config on free ports), loads it
    // with digest-authenticated UAs, and stops it with SIGTERM.
    // `--out` relative to where it runs: the server must still find its files.
    let cwd = TempDir::new("load-demo");
    let out = cwd.join("demo");
    let o = Command::new(bin("sipring-load"))
        .current_dir(cwd.join(""))
        .args([
            "demo",
            "--duration",
            "2",
            "--cps",
            "20",
            "--mps",
            "100",
            "--out",
            "demo",
        ])
        .arg("--server")
        .arg(bin("sipring"))
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let log = std::fs::read_to_string(out.join("sipring.log")).unwrap_or_default();
    // The demo exits 1 when any transaction failed. A debug build sharing two CPUs with the
    // rest of CI can lag past the overload threshold for a moment and shed a few requests
    // with 503 at the door, as designed (seen: 2 of 2,400): that, and only that, is allowed.
    let shed_only = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("failed "))
        .all(|l| l.contains(": status_503 x"));
    let shed = o.status.code() == Some(1)
        && shed_only
        && log.contains("shard overloaded")
        && serde_json::from_str::<Summary>(
            &std::fs::read_to_string(out.join("summary.json")).unwrap_or_default(),
        )
        .is_ok_and(|s| s.failed * 100 <= s.sent);
    assert!(
        o.status.code() == Some(0) || shed,
        "demo failed\n{stdout}\n{}\nserver log:\n{log}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("demo: server stopped cleanly"), "{stdout}");
    assert!(log.contains("draining") && log.contains("stopped"), "{log}");
    let s: Summary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for kind in ["register", "message", "invite_200", "bye"] {
        assert!(
            s.kinds.get(kind).is_some_and(|k| k.count > 0),
            "no {kind} measured: {stdout}"
        );
    }
    assert!(s.failed == 0 || shed, "{stdout}");
}
