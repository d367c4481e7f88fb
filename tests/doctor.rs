//! `sipring doctor`: every check's pass and fail (or warn) path, with made-up host facts, and
//! the binary on this host.

use sipring::config::{CertConfig, Config, ListenConfig};
use sipring::doctor::{Check, HostFacts, Verdict, profile, run};
use sipring::sys::ktls::{Cipher, Ciphers, Support};
use sipring::tls::pki::{Ca, Spec};
use sipring_tests::TempDir;
use std::collections::BTreeMap;

fn healthy() -> HostFacts {
    HostFacts {
        kernel: "6.14.2-amd64".into(),
        io_uring: Ok(()),
        ktls: Support::Available {
            rekey: true,
            ciphers: Ciphers::ALL,
        },
        memlock: (u64::MAX, u64::MAX),
        nofile: (1 << 20, 1 << 20),
        sysctls: profile().into_iter().collect::<BTreeMap<_, _>>(),
        cpus: 4,
        now: 1_800_000_000,
        clock_synced: Some(true),
        allowed_cpus: 4,
    }
}

fn verdict(checks: &[Check], name: &str) -> Verdict {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name}: {checks:?}"))
        .verdict
}

#[test]
fn a_healthy_host_passes_everything() {
    let checks = run(&healthy(), None);
    // Every check ran (an empty list passed the loop below).
    for name in ["kernel", "io_uring", "memlock", "clock", "config"] {
        let _ = verdict(&checks, name);
    }
    assert!(checks.len() >= 5, "{checks:?}");
    for c in &checks {
        if c.name == "config" {
            assert_eq!(c.verdict, Verdict::Warn, "no config given");
        } else {
            assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
            assert!(c.fix.is_empty());
        }
    }
}

#[test]
fn each_host_check_fails_with_a_fix() {
    type Breaker = Box<dyn Fn(&mut HostFacts)>;
    let cases: Vec<(&str, Breaker, Verdict)> = vec![
        (
            "kernel",
            Box::new(|f| f.kernel = "5.4.0".into()),
            Verdict::Fail,
        ),
        (
            "kernel",
            Box::new(|f| f.kernel = "5.15.0-91-generic".into()),
            Verdict::Warn,
        ),
        (
            "io_uring",
            Box::new(|f| f.io_uring = Err("disabled".into())),
            Verdict::Fail,
        ),
        (
            "kernel TLS",
            Box::new(|f| f.ktls = Support::KernelLacksTls("ENOENT".into())),
            Verdict::Warn,
        ),
        (
            "kernel TLS",
            Box::new(|f| {
                f.ktls = Support::Available {
                    rekey: false,
                    ciphers: Ciphers::ALL,
                }
            }),
            Verdict::Warn,
        ),
        (
            // A kernel with TLS but without ChaCha20-Poly1305's crypto.
            "kernel TLS",
            Box::new(|f| {
                f.ktls = Support::Available {
                    rekey: true,
                    ciphers: Ciphers::default()
                        .with(false, Cipher::Aes128Gcm)
                        .with(true, Cipher::Aes128Gcm)
                        .with(false, Cipher::Aes256Gcm)
                        .with(true, Cipher::Aes256Gcm),
                }
            }),
            Verdict::Warn,
        ),
        (
            "memlock",
            Box::new(|f| f.memlock = (64 * 1024, 64 * 1024)),
            Verdict::Fail,
        ),
        (
            "memlock",
            Box::new(|f| f.memlock = (64 * 1024, u64::MAX)),
            Verdict::Warn,
        ),
        (
            "nofile",
            Box::new(|f| f.nofile = (1024, 4096)),
            Verdict::Warn,
        ),
        (
            "sysctl net.core.somaxconn",
            Box::new(|f| {
                f.sysctls.insert("net.core.somaxconn".into(), "4096".into());
            }),
            Verdict::Warn,
        ),
        (
            "sysctl net.ipv4.ip_local_port_range",
            Box::new(|f| {
                f.sysctls
                    .insert("net.ipv4.ip_local_port_range".into(), "32768 60999".into());
            }),
            Verdict::Warn,
        ),
        (
            // The kernel's default: two hours before the first probe (more is worse).
            "sysctl net.ipv4.tcp_keepalive_time",
            Box::new(|f| {
                f.sysctls
                    .insert("net.ipv4.tcp_keepalive_time".into(), "7200".into());
            }),
            Verdict::Warn,
        ),
        (
            // The kernel's default 2 is loopback only.
            "sysctl net.ipv4.tcp_tw_reuse",
            Box::new(|f| {
                f.sysctls.insert("net.ipv4.tcp_tw_reuse".into(), "2".into());
            }),
            Verdict::Warn,
        ),
        (
            "sysctl kernel.io_uring_disabled",
            Box::new(|f| {
                f.sysctls
                    .insert("kernel.io_uring_disabled".into(), "2".into());
            }),
            Verdict::Warn,
        ),
        (
            "clock",
            Box::new(|f| f.clock_synced = Some(false)),
            Verdict::Warn,
        ),
        ("clock", Box::new(|f| f.now = 1_000_000_000), Verdict::Fail),
    ];
    for (name, break_it, want) in cases {
        let mut f = healthy();
        break_it(&mut f);
        let checks = run(&f, None);
        let c = checks.iter().find(|c| c.name == name).unwrap();
        assert_eq!(c.verdict, want, "{name}: {c:?}");
        assert!(!c.fix.is_empty(), "{name} says how to fix it");
    }
    // Numbers above the profile are fine too.
    let mut f = healthy();
    f.sysctls
        .insert("net.core.somaxconn".into(), "1000000".into());
    assert_eq!(
        verdict(&run(&f, None), "sysctl net.core.somaxconn"),
        Verdict::Pass
    );
}

#[test]
fn config_checks_shards_and_certificate_expiry() {
    let dir = TempDir::new("doctor");
    let ca = Ca::new("Doctor CA").unwrap();
    let cert_from = |name: &str, from_hours: i64, hours: i64| {
        let i = ca
            .issue(&Spec {
                valid_from: time::Duration::hours(from_hours),
                valid_until: time::Duration::hours(hours),
                ..Spec::server("sip.example.com")
            })
            .unwrap();
        (
            dir.write(&format!("{name}.pem"), &i.cert_pem),
            dir.write(&format!("{name}.key"), &i.key_pem),
        )
    };
    let cert = |name: &str, hours: i64| cert_from(name, -400 * 24, hours);
    let cfg_with = |c: (std::path::PathBuf, std::path::PathBuf)| Config {
        listen: vec![ListenConfig::default()],
        tls: sipring::config::TlsConfig {
            certificate: vec![CertConfig {
                cert: c.0,
                key: c.1,
                sni: vec![],
            }],
            ..Default::default()
        },
        ..Config::default()
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let facts = HostFacts { now, ..healthy() };
    for (name, hours, want) in [
        ("ok", 200 * 24, Verdict::Pass),
        ("soon", 10 * 24, Verdict::Warn),
        ("expired", -3 * 24, Verdict::Fail),
        // An hour ago: expired, not "expires in 0 days" (a warning, exit status 0).
        ("just-gone", -1, Verdict::Fail),
    ] {
        let cfg = cfg_with(cert(name, hours));
        let checks = run(&facts, Some(Ok(&cfg)));
        let c = checks
            .iter()
            .find(|c| c.name.starts_with("certificate") && c.name.contains(name))
            .unwrap();
        assert_eq!(c.verdict, want, "{c:?}");
    }
    // Not valid yet (issued for tomorrow, or this clock behind): every handshake fails, as
    // start and reload say; it read as PASS.
    let cfg = cfg_with(cert_from("tomorrow", 24, 400 * 24));
    let checks = run(&facts, Some(Ok(&cfg)));
    let c = checks.iter().find(|c| c.name.contains("tomorrow")).unwrap();
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
    let mut cfg = cfg_with(cert("ok2", 200 * 24));
    cfg.server.shards = 64;
    let checks = run(&facts, Some(Ok(&cfg)));
    assert_eq!(verdict(&checks, "shards vs CPUs"), Verdict::Warn);
    assert_eq!(
        verdict(&checks, "memlock"),
        Verdict::Pass,
        "unlimited memlock covers 64 shards"
    );
    cfg.server.shards = 2;
    assert_eq!(
        verdict(&run(&facts, Some(Ok(&cfg))), "shards vs CPUs"),
        Verdict::Pass
    );
    let broken = run(&facts, Some(Err("x.toml: listen: missing".into())));
    assert_eq!(verdict(&broken, "config"), Verdict::Fail);
    // What `start` would refuse: pinned shards that do not fit the allowed CPUs, a broken
    // subscriber file, a short node secret.
    let mut cfg = cfg_with(cert("ok4", 200 * 24));
    cfg.server.shards = 2;
    cfg.server.first_cpu = 3;
    assert_eq!(
        verdict(&run(&facts, Some(Ok(&cfg))), "shard placement"),
        Verdict::Fail
    );
    cfg.server.first_cpu = 2;
    let checks = run(&facts, Some(Ok(&cfg)));
    assert!(
        checks.iter().all(|c| c.name != "shard placement"),
        "{checks:?}"
    );
    cfg.auth.subscribers = Some(dir.write("subs.toml", "[[subscriber]]\nusername = \"a\"\n"));
    cfg.auth.secret_file = Some(dir.write("secret", "short"));
    let checks = run(&facts, Some(Ok(&cfg)));
    assert_eq!(verdict(&checks, "subscribers"), Verdict::Fail);
    assert_eq!(verdict(&checks, "auth.secret_file"), Verdict::Fail);
    // Good files any local user may read: HA1s and the signing secret given away.
    use std::os::unix::fs::PermissionsExt;
    let subs = dir.write(
        "subs-ok.toml",
        format!(
            "[[subscriber]]\nusername = \"a\"\nrealm = \"example.com\"\nha1_sha256 = \"{}\"\n",
            "ab".repeat(32)
        ),
    );
    let secret = dir.write("secret-ok", [7u8; 32]);
    for f in [&subs, &secret] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    cfg.auth.subscribers = Some(subs.clone());
    cfg.auth.secret_file = Some(secret.clone());
    let checks = run(&facts, Some(Ok(&cfg)));
    assert_eq!(verdict(&checks, "subscribers"), Verdict::Warn, "{checks:?}");
    assert_eq!(verdict(&checks, "auth.secret_file"), Verdict::Warn);
    // Group-readable (the service's group) is fine; group-writable is not.
    std::fs::set_permissions(&subs, std::fs::Permissions::from_mode(0o620)).unwrap();
    let checks = run(&facts, Some(Ok(&cfg)));
    assert_eq!(verdict(&checks, "subscribers"), Verdict::Warn, "{checks:?}");
    std::fs::set_permissions(&subs, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let checks = run(&facts, Some(Ok(&cfg)));
    assert!(
        checks
            .iter()
            .all(|c| c.name != "subscribers" && c.name != "auth.secret_file"),
        "{checks:?}"
    );
    // CRLs: one past its nextUpdate passes the load (it is well formed) and closes what it
    // covers at the next reload: a failure before then; one due within two days, a warning.
    let partner = Ca::new("Partner CA").unwrap();
    let roots = dir.write("partner-ca.pem", &partner.cert.cert_pem);
    for (name, next, want) in [
        ("stale", time::Duration::hours(-5), Verdict::Fail),
        ("due", time::Duration::hours(10), Verdict::Warn),
        ("fresh", time::Duration::days(30), Verdict::Pass),
    ] {
        let crl = dir.write(
            &format!("{name}.crl"),
            partner.crl_next_update(&[], next).unwrap(),
        );
        let mut cfg = cfg_with(cert(&format!("crl-{name}"), 200 * 24));
        cfg.peer = vec![sipring::config::PeerConfig {
            name: "partner".into(),
            domains: vec!["partner.example.com".into()],
            server_name: "sip.partner.example.com".into(),
            roots: roots.clone(),
            crls: vec![crl.clone()],
            ..Default::default()
        }];
        let checks = run(&facts, Some(Ok(&cfg)));
        assert_eq!(
            verdict(&checks, &format!("CRL {}", crl.display())),
            want,
            "{checks:?}"
        );
        assert!(
            checks.iter().all(|c| c.name != "partner partner roots"),
            "{checks:?}"
        );
        if name == "stale" {
            // The partner's status left unknown allowed: the stale CRL is still read and
            // nothing is refused for it: a warning.
            cfg.peer[0].unknown_revocation = sipring::config::UnknownRevocation::Allow;
            let checks = run(&facts, Some(Ok(&cfg)));
            assert_eq!(
                verdict(&checks, &format!("CRL {}", crl.display())),
                Verdict::Warn
            );
            // A job that appends today's CRL to the file that holds last week's: the newer
            // one is the one in use.
            cfg.peer[0].unknown_revocation = sipring::config::UnknownRevocation::Deny;
            let fresh = partner
                .crl_next_update(&[], time::Duration::days(30))
                .unwrap();
            let both = dir.write(
                "appended.crl",
                format!("{}{fresh}", std::fs::read_to_string(&crl).unwrap()),
            );
            cfg.peer[0].crls = vec![both.clone()];
            let checks = run(&facts, Some(Ok(&cfg)));
            assert_eq!(
                verdict(&checks, &format!("CRL {}", both.display())),
                Verdict::Pass,
                "{checks:?}"
            );
        }
        if name == "fresh" {
            // A partner whose last root lapses within 30 days: every link to it closes at
            // that second.
            let lapsing = Ca::with_validity("Lapsing CA", time::Duration::days(10)).unwrap();
            cfg.peer[0].roots = dir.write("lapsing-ca.pem", &lapsing.cert.cert_pem);
            cfg.peer[0].crls = vec![
                dir.write(
                    "lapsing.crl",
                    lapsing
                        .crl_next_update(&[], time::Duration::days(30))
                        .unwrap(),
                ),
            ];
            let checks = run(&facts, Some(Ok(&cfg)));
            assert_eq!(
                verdict(&checks, "partner partner roots"),
                Verdict::Warn,
                "{checks:?}"
            );
            // Seen from a year on, every root of it has expired: a failure.
            let later = HostFacts {
                now: facts.now + 365 * 86_400,
                ..facts.clone()
            };
            let checks = run(&later, Some(Ok(&cfg)));
            assert_eq!(
                verdict(&checks, "partner partner roots"),
                Verdict::Fail,
                "{checks:?}"
            );
            // The cluster's roots anchor every node link: the same rule, its own line.
            cfg.peer[0].roots = roots.clone();
            cfg.peer[0].crls = vec![crl.clone()];
            cfg.cluster = Some(sipring::config::ClusterConfig {
                node: "node-a".into(),
                roots: dir.write("cluster-ca.pem", &lapsing.cert.cert_pem),
                ..Default::default()
            });
            let checks = run(&facts, Some(Ok(&cfg)));
            assert_eq!(
                verdict(&checks, "cluster roots"),
                Verdict::Warn,
                "{checks:?}"
            );
            assert!(checks.iter().all(|c| c.name != "partner partner roots"));
            let checks = run(&later, Some(Ok(&cfg)));
            assert_eq!(
                verdict(&checks, "cluster roots"),
                Verdict::Fail,
                "{checks:?}"
            );
        }
    }
    let mut cfg = cfg_with(cert("ok3", 200 * 24));
    cfg.tls.certificate[0].key = dir.write("bad.key", "junk");
    assert_eq!(
        verdict(&run(&facts, Some(Ok(&cfg))), "certificates"),
        Verdict::Fail
    );
}

#[test]
fn the_binary_reports_this_host() {
    let out = std::process::Command::new(sipring_tests::process::sipring_bin())
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "kernel",
        "io_uring",
        "kernel TLS",
        "memlock",
        "nofile",
        "sysctl net.core.somaxconn",
        "config",
    ] {
        assert!(
            text.lines().any(|l| l.contains(name)),
            "{name} missing:\n{text}"
        );
    }
    // This project's hosts have io_uring but no kernel TLS: that is a warning, not a failure.
    assert!(text.contains("PASS io_uring"), "{text}");
}
