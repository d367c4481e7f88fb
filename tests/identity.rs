//! Who may do what, end to end over loopback (issue: "identity does not stop at the
//! handshake"). Each attack found against the first engine is replayed here against a
//! configuration an operator following the README would write, and must be refused:
//!
//! 1. registering (or wiping) someone else's AOR;
//! 2. a client claiming to be a partner's user, toward a partner;
//! 3. a partner speaking for another partner's users, or relayed to another partner;
//! 4. forged Record-Route flow tokens;
//! 5. a certificate naming two partners labelled as the wrong one;
//! 6. (RFC 5922 §7.1, in memory: `tls_memory.rs`).
//!
//! and the positive paths: digest with SHA-256, SHA-512-256 and MD5, stale nonces, wrong
//! passwords, replayed nonce-counts, a source that keeps failing, client certificates bound
//! to an AOR, P-Asserted-Identity added toward partners and removed from clients, subscriber
//! reload.

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use sipring::config::{ClientAuth, Config, PeerConfig};
use sipring::server::{Running, start};
use sipring::tls::pki::{Ca, Issued, Spec, Usage};
use sipring_core::auth::{Algorithm, authorization, parse_challenge};
use sipring_tests::server::{Pki, config, metric, wait_metrics};
use sipring_tests::ua::{
    Ua, answer, branch, bye, first_line, hang_up, header, header_all, invite, method, status,
    tls_config,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Our PKI plus two partners with their own CAs: `peer-a` (peer-a.test) and `peer-b`
/// (peer-b.test). Peer B's address is a fake partner server that records what it receives.
struct World {
    pki: Pki,
    ca_a: Ca,
    ca_b: Ca,
    b_inbox: Arc<Mutex<Vec<Vec<u8>>>>,
    b_addr: SocketAddr,
    /// The serial of fake partner B's server certificate.
    b_serial: u64,
}

impl World {
    fn new() -> World {
        let pki = Pki::new();
        let ca_a = Ca::new("Peer A CA").unwrap();
        let ca_b = Ca::new("Peer B CA").unwrap();
        pki.dir.write("a-ca.pem", &ca_a.cert.cert_pem);
        pki.dir.write("a.crl", ca_a.crl(&[]).unwrap());
        pki.dir.write("b-ca.pem", &ca_b.cert.cert_pem);
        pki.dir.write("b.crl", ca_b.crl(&[]).unwrap());
        let b_server = ca_b.issue(&Spec::server("sip.peer-b.test")).unwrap();
        let (b_addr, b_inbox) = fake_partner(&b_server);
        World {
            pki,
            ca_a,
            ca_b,
            b_inbox,
            b_addr,
            b_serial: b_server.serial,
        }
    }

    /// The README's configuration plus the two partners.
    fn config(&self) -> Config {
        let d = |n: &str| self.pki.dir.join(n);
        let mut cfg = config(&self.pki);
        let partner = |name: &str, domain: &str, ca: &str, crl: &str| PeerConfig {
            name: name.into(),
            domains: vec![domain.into()],
            server_name: format!("sip.{domain}"),
            roots: d(ca),
            crls: vec![d(crl)],
            ..PeerConfig::default()
        };
        cfg.peer = vec![
            partner("peer-a", "peer-a.test", "a-ca.pem", "a.crl"),
            PeerConfig {
                address: Some(self.b_addr),
                ..partner("peer-b", "peer-b.test", "b-ca.pem", "b.crl")
            },
        ];
        cfg
    }

    fn start(&self, f: impl FnOnce(&mut Config)) -> Running {
        let mut cfg = self.config();
        f(&mut cfg);
        start(cfg, None).expect("start")
    }

    /// What fake partner B received so far.
    fn at_b(&self) -> Vec<Vec<u8>> {
        self.b_inbox.lock().unwrap().clone()
    }

    /// A client over TLS (password `pw-<user>`, not yet challenged).
    fn client(&self, srv: &Running, user: &str) -> Ua {
        Ua::tls(
            srv.listen_addrs[0],
            tls_config(&self.pki.certs("ca.pem"), None, false),
            "sip.example.com",
            user,
            "example.com",
        )
        .expect("connect")
    }

    /// A partner connection to our mtls listener presenting `cert`, speaking for `domain`.
    fn partner(&self, srv: &Running, cert: &Issued, domain: &str) -> Ua {
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let cfg = tls_config(
            &self.pki.certs("ca.pem"),
            Some((vec![cert.der.clone()], key)),
            false,
        );
        let mut u = Ua::tls(srv.listen_addrs[1], cfg, "sip.example.com", "x", domain)
            .expect("partner connects");
        u.password = None;
        u
    }
}

/// A partner's server: accepts our MTLS connections, records every message, answers every
/// request but ACK with 200.
fn fake_partner(cert: &Issued) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    use sipring_core::{Frame, Framer, KeepaliveRole, Limits, Status};
    use std::io::{Read, Write};
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let sc = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der.clone()], key)
        .unwrap(),
    );
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let inbox = Arc::new(Mutex::new(Vec::new()));
    let ib = inbox.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let (sc, ib) = (sc.clone(), ib.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(sc).unwrap();
                let mut t = rustls::StreamOwned::new(conn, s);
                let mut framer = Framer::new(Limits::default(), KeepaliveRole::Server);
                let mut buf = Vec::new();
                let mut tmp = [0u8; 16384];
                loop {
                    let n = match t.read(&mut tmp) {
                        // A signal meant for a server thread of this test process.
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&tmp[..n]);
                    while let Ok(Status::Complete(f)) = framer.frame(&buf) {
                        let m: Vec<u8> = buf.drain(..f.len()).collect();
                        if let Frame::Message(_) = f {
                            // Kept before it is answered: a test that got the answer then
                            // reads the inbox (answered first, it raced and missed it).
                            let r = (!m.starts_with(b"SIP/") && !m.starts_with(b"ACK "))
                                .then(|| answer(&m, 200, "OK", "pb", "sip:x@sip.peer-b.test"));
                            ib.lock().unwrap().push(m);
                            if let Some(r) = r {
                                let _ = t.write_all(&r);
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, inbox)
}

/// Sends a MESSAGE from `ua` (From `<from>`) to `ruri`, with extra header lines.
fn send_message(ua: &mut Ua, ruri: &str, from: &str, extra: &str) {
    let m = ua.request(
        "MESSAGE",
        ruri,
        &format!("<{ruri}>"),
        &format!("m-{}", branch()),
        1,
        extra,
        Some(("text/plain", "hi")),
    );
    let m = String::from_utf8(m).unwrap().replacen(
        &format!("From: <sip:{}@{}>", ua.user, ua.domain),
        &format!("From: <{from}>"),
        1,
    );
    ua.send(m.as_bytes());
}

/// [`send_message`] and its final status (refused here, or answered by a partner).
fn message(ua: &mut Ua, ruri: &str, from: &str, extra: &str) -> u16 {
    send_message(ua, ruri, from, extra);
    ua.expect_final_or_provisional("answer to MESSAGE").0
}

/// [`send_message`] to a local user `to`, who receives and answers it; returns what `to` got.
fn deliver(ua: &mut Ua, to: &mut Ua, from: &str, extra: &str) -> Vec<u8> {
    send_message(ua, &format!("sip:{}@example.com", to.user), from, extra);
    let got = receive(to);
    assert_eq!(ua.expect_final_or_provisional("200 to MESSAGE").0, 200);
    got
}

/// Receives a MESSAGE at `ua` and answers it.
fn receive(ua: &mut Ua) -> Vec<u8> {
    let got = ua.expect("MESSAGE");
    assert_eq!(method(&got), "MESSAGE");
    ua.send(&answer(&got, 200, "OK", "r", "sip:r@127.0.0.1"));
    got
}

fn refusals(srv: &Running, reason: &str) -> f64 {
    let m = sipring_tests::server::admin_get(srv.admin_addr.unwrap(), "/metrics");
    metric(
        &m,
        &format!("sipring_sip_refusals_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

fn wait_refusals(srv: &Running, reason: &str, at_least: f64) {
    wait_metrics(srv.admin_addr.unwrap(), reason, |m| {
        metric(
            m,
            &format!("sipring_sip_refusals_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
            >= at_least
    });
}

static CSEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(100);

/// A REGISTER for `aor` from `ua`'s connection, with `extra` lines (credentials, Contact).
fn register_for(ua: &Ua, aor_user: &str, extra: &str) -> Vec<u8> {
    format!(
        "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS {l};branch={b}\r\nMax-Forwards: 70\r\nTo: <sip:{aor_user}@example.com>\r\nFrom: <sip:{u}@example.com>;tag=x\r\nCall-ID: reg-{aor_user}-{l}\r\nCSeq: {c} REGISTER\r\n{extra}Content-Length: 0\r\n\r\n",
        l = ua.local,
        u = ua.user,
        b = branch(),
        c = CSEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    )
    .into_bytes()
}

#[test]
fn attack_1_nobody_registers_or_wipes_someone_elses_aor() {
    let w = World::new();
    let srv = w.start(|_| {});
    // Without credentials: challenged, never bound.
    let mut anon = w.client(&srv, "alice");
    anon.password = None;
    assert_eq!(anon.register(600), 401);
    // The owner registers with digest (SHA-256, the first challenge).
    let mut alice = w.client(&srv, "alice");
    assert_eq!(alice.register(600), 200);
    // mallory authenticates as herself and tries alice's AOR, then to wipe it.
    let mut mallory = w.client(&srv, "mallory");
    assert_eq!(mallory.login(), 200);
    let creds = mallory.credentials("REGISTER", "sip:example.com");
    mallory.send(&register_for(
        &mallory,
        "alice",
        &format!(
            "{creds}Contact: <sip:mallory@{}>\r\nExpires: 600\r\n",
            mallory.local
        ),
    ));
    assert_eq!(mallory.expect_final_or_provisional("REGISTER alice").0, 403);
    let creds = mallory.credentials("REGISTER", "sip:example.com");
    mallory.send(&register_for(
        &mallory,
        "alice",
        &format!("{creds}Contact: *\r\nExpires: 0\r\n"),
    ));
    assert_eq!(mallory.expect_final_or_provisional("wipe alice").0, 403);
    wait_refusals(&srv, "register_not_owner", 2.0);
    // alice still gets her messages, and only she does.
    let mut bob = w.client(&srv, "bob");
    assert_eq!(bob.login(), 200);
    deliver(&mut bob, &mut alice, "sip:bob@example.com", "");
    assert!(mallory.recv(Duration::from_millis(300)).is_none());
    // A wrong password is challenged again and counted.
    let mut liar = w.client(&srv, "carol");
    liar.password = Some("wrong".into());
    assert_eq!(liar.register(600), 401);
    wait_refusals(&srv, "auth_wrong_password", 1.0);
    srv.stop();
    srv.join().unwrap();
}

/// Sends REGISTER for `ua`'s own AOR with `auth` (an Authorization value) and returns the
/// response.
fn register_with_auth(ua: &mut Ua, auth: &str) -> Vec<u8> {
    let extra = if auth.is_empty() {
        format!(
            "Contact: <sip:{}@{}>\r\nExpires: 600\r\n",
            ua.user, ua.local
        )
    } else {
        format!(
            "Authorization: {auth}\r\nContact: <sip:{}@{}>\r\nExpires: 600\r\n",
            ua.user, ua.local
        )
    };
    let user = ua.user.clone();
    ua.send(&register_for(ua, &user, &extra));
    ua.expect_final_or_provisional("REGISTER").1
}

/// The challenge for `alg` in a 401.
fn challenge_for(resp: &[u8], alg: Algorithm) -> (String, String, bool) {
    let text = String::from_utf8_lossy(resp);
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("WWW-Authenticate: ")
            && let Some((realm, nonce, a, stale)) = parse_challenge(v.as_bytes())
            && a == alg
        {
            return (realm, nonce, stale);
        }
    }
    panic!("no {alg} challenge in {text}")
}

fn creds_for(user: &str, alg: Algorithm, nonce: &str, nc: u32) -> String {
    let ha1 = alg.ha1(user, "example.com", &sipring_tests::ua::password_for(user));
    authorization(
        alg,
        user,
        "example.com",
        &ha1,
        nonce,
        nc,
        "c0ffee",
        "REGISTER",
        "sip:example.com",
    )
}

#[test]
fn digest_algorithms_stale_nonces_replays_and_a_source_that_keeps_failing() {
    let w = World::new();
    let srv = w.start(|c| {
        c.auth.algorithms = vec!["SHA-512-256".into(), "SHA-256".into(), "MD5".into()];
        c.auth.nonce_expiry_s = 1;
        c.auth.max_failures = 4;
    });
    let mut ua = w.client(&srv, "dave");
    ua.password = None;
    let r = register_with_auth(&mut ua, "");
    assert_eq!(status(&r), Some(401));
    // One challenge per algorithm, in the configured order.
    let offered: Vec<Algorithm> = String::from_utf8_lossy(&r)
        .lines()
        .filter_map(|l| l.strip_prefix("WWW-Authenticate: "))
        .map(|v| parse_challenge(v.as_bytes()).unwrap().2)
        .collect();
    assert_eq!(
        offered,
        vec![Algorithm::Sha512_256, Algorithm::Sha256, Algorithm::Md5]
    );
    // Each algorithm authenticates, on the same nonce with a rising nonce-count.
    let (_, nonce, _) = challenge_for(&r, Algorithm::Md5);
    for (nc, alg) in [
        (1, Algorithm::Md5),
        (2, Algorithm::Sha256),
        (3, Algorithm::Sha512_256),
    ] {
        let r = register_with_auth(&mut ua, &creds_for("dave", alg, &nonce, nc));
        assert_eq!(
            status(&r),
            Some(200),
            "{alg}: {}",
            String::from_utf8_lossy(&r)
        );
    }
    // The same credentials again (a captured REGISTER replayed): nc=3 was used.
    let r = register_with_auth(
        &mut ua,
        &creds_for("dave", Algorithm::Sha512_256, &nonce, 3),
    );
    assert_eq!(status(&r), Some(401));
    assert!(
        challenge_for(&r, Algorithm::Sha256).2,
        "a replay is answered stale=true"
    );
    wait_refusals(&srv, "auth_replay", 1.0);
    // Past the nonce's life: stale, then the new nonce works.
    std::thread::sleep(Duration::from_millis(1200));
    let r = register_with_auth(&mut ua, &creds_for("dave", Algorithm::Sha256, &nonce, 4));
    assert_eq!(status(&r), Some(401));
    let (_, fresh, stale) = challenge_for(&r, Algorithm::Sha256);
    assert!(stale, "an expired nonce is answered stale=true");
    let r = register_with_auth(&mut ua, &creds_for("dave", Algorithm::Sha256, &fresh, 1));
    assert_eq!(status(&r), Some(200));
    // The nonce belongs to the connection it was issued on.
    let mut other = w.client(&srv, "dave");
    let r = register_with_auth(&mut other, &creds_for("dave", Algorithm::Sha256, &fresh, 2));
    assert_eq!(status(&r), Some(401));
    assert!(challenge_for(&r, Algorithm::Sha256).2);
    // Wrong passwords from one address: after max_failures, refused even with the right one.
    let mut liar = w.client(&srv, "carol");
    for _ in 0..4 {
        liar.password = Some("wrong".into());
        let _ = liar.register(600);
    }
    liar.password = Some(sipring_tests::ua::password_for("carol"));
    let (code, resp) = liar.register_with(600, "");
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&resp));
    assert!(String::from_utf8_lossy(&resp).contains("Too Many Failed Attempts"));
    wait_refusals(&srv, "auth_blocked", 1.0);
    srv.stop();
    srv.join().unwrap();

    // MD5 is not offered unless configured: MD5 credentials are refused by default.
    let srv = w.start(|_| {});
    let mut ua = w.client(&srv, "dave");
    ua.password = None;
    let r = register_with_auth(&mut ua, "");
    let (_, nonce, _) = challenge_for(&r, Algorithm::Sha256);
    assert!(!String::from_utf8_lossy(&r).contains("algorithm=MD5"));
    let r = register_with_auth(&mut ua, &creds_for("dave", Algorithm::Md5, &nonce, 1));
    assert_eq!(status(&r), Some(401));
    wait_refusals(&srv, "auth_algorithm", 1.0);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_source_that_keeps_failing_is_refused_on_every_shard() {
    // Each shard counted failures alone: an address whose connections landed on N shards
    // had N times the guesses, and a block on one shard stopped nothing on the others.
    let w = World::new();
    let srv = w.start(|c| {
        c.server.shards = 2;
        c.auth.max_failures = 3;
    });
    for i in 0..3 {
        let mut guess = w.client(&srv, "carol");
        guess.password = Some("wrong".into());
        // The third failure blocks at once.
        assert_eq!(guess.register(600), if i < 2 { 401 } else { 403 });
    }
    // Fresh connections (spread over both shards), the right password: refused on each.
    for i in 0..6 {
        let mut u = w.client(&srv, "carol");
        let (code, resp) = u.register_with(600, "");
        assert_eq!(
            code,
            403,
            "connection {i}: {}",
            String::from_utf8_lossy(&resp)
        );
    }
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_phone_certificate_proves_only_the_aors_its_cas_may_name() {
    // webpki holds a URI SAN to no dNSName name constraint: a tenant's sub-CA limited to
    // its own domain issued `sip:carol@example.com`, and the phone passed as carol with no
    // digest. The AORs are held to the constraints of the chain's CAs now.
    let w = World::new();
    let root = Ca::new("Tenants Root").unwrap();
    let ours = root
        .constrained_intermediate("Our Phones CA", &["example.com"])
        .unwrap();
    let other = root
        .constrained_intermediate("Tenant B CA", &["tenant-b.example"])
        .unwrap();
    w.pki.dir.write("phones-ca.pem", &root.cert.cert_pem);
    w.pki.dir.write(
        "phones.crl",
        format!(
            "{}{}{}",
            root.crl(&[]).unwrap(),
            ours.crl(&[]).unwrap(),
            other.crl(&[]).unwrap()
        ),
    );
    let srv = w.start(|c| with_phones(&w, c));
    let phone = |ca: &Ca, host: &str| {
        let leaf = ca
            .issue(&Spec {
                uris: vec!["sip:carol@example.com".into()],
                usage: Usage::ClientOnly,
                ..Spec::server(host)
            })
            .unwrap();
        let chain = vec![leaf.der.clone(), ca.cert.der.clone()];
        let mut u = connect_phone_chain(&w, &srv, chain, &leaf.key_pem, "carol")
            .expect("the chain verifies");
        u.password = None;
        u
    };
    assert_eq!(phone(&ours, "phone.example.com").register(600), 200);
    assert_eq!(
        phone(&other, "phone.tenant-b.example").register(600),
        401,
        "a tenant's CA spoke for our user"
    );
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_phones_only_ca_barred_from_dns_names_still_proves_its_phones_aors() {
    // A zero-length excluded dNSName is how a CA says it issues no DNS names at all (a CA
    // for phones only): it does not bar the domain of a phone's `sip:user@domain`, and such
    // a CA's phones sign in with their certificate.
    let w = World::new();
    let now = time::OffsetDateTime::now_utc();
    let ca = |name: &str, excluded: bool| {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        (p.not_before, p.not_after) = (
            now - time::Duration::days(1),
            now + time::Duration::days(90),
        );
        if excluded {
            p.name_constraints = Some(rcgen::NameConstraints {
                permitted_subtrees: Vec::new(),
                excluded_subtrees: vec![rcgen::GeneralSubtree::DnsName(String::new())],
            });
        }
        (p, rcgen::KeyPair::generate().unwrap())
    };
    let (root_p, root_k) = ca("Phones Root", false);
    let root = root_p.self_signed(&root_k).unwrap();
    let root_issuer = rcgen::Issuer::new(root_p, root_k);
    let (sub_p, sub_k) = ca("Phones Only CA", true);
    let sub = sub_p.signed_by(&sub_k, &root_issuer).unwrap();
    let sub_issuer = rcgen::Issuer::new(sub_p, sub_k);
    let crl = |issuer: &rcgen::Issuer<'_, rcgen::KeyPair>| {
        rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + time::Duration::days(7),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(issuer)
        .unwrap()
        .pem()
        .unwrap()
    };
    w.pki.dir.write("phones-ca.pem", root.pem());
    w.pki.dir.write(
        "phones.crl",
        format!("{}{}", crl(&root_issuer), crl(&sub_issuer)),
    );
    let mut leaf_p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_p.subject_alt_names = vec![rcgen::SanType::URI(
        "sip:carol@example.com".try_into().unwrap(),
    )];
    leaf_p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    (leaf_p.not_before, leaf_p.not_after) = (
        now - time::Duration::days(1),
        now + time::Duration::days(30),
    );
    let leaf_k = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf_p.signed_by(&leaf_k, &sub_issuer).unwrap();
    let srv = w.start(|c| with_phones(&w, c));
    let chain = vec![leaf.der().clone(), sub.der().clone()];
    let mut carol = connect_phone_chain(&w, &srv, chain, &leaf_k.serialize_pem(), "carol")
        .expect("the chain verifies");
    carol.password = None;
    assert_eq!(carol.register(600), 200);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_client_certificate_binds_its_aor_in_a_domain_written_absolute() {
    // `domains = ["example.com."]` is example.com everywhere (one trailing dot), but the
    // certificate's AORs were held to the domains as written: a phone with only its
    // certificate was refused.
    let w = World::new();
    let users = phones(&w);
    let cert = phone_cert(&users, "sip:carol@example.com", time::Duration::days(365));
    let srv = w.start(|c| {
        with_phones(&w, c);
        for d in &mut c.server.domains {
            if d == "example.com" {
                d.push('.');
            }
        }
    });
    let mut carol = connect_phone(&w, &srv, &cert, "carol").unwrap();
    carol.password = None;
    assert_eq!(carol.register(600), 200);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_client_certificate_binds_its_aor() {
    let w = World::new();
    let users = phones(&w);
    let year = time::Duration::days(365);
    let carol_cert = phone_cert(&users, "sip:carol@example.com", year);
    let revoked = phone_cert(&users, "sip:carol@example.com", year);
    w.pki
        .dir
        .write("phones.crl", users.crl(&[revoked.serial]).unwrap());
    let srv = w.start(|c| with_phones(&w, c));
    let connect = |cert: &Issued, user: &str| connect_phone(&w, &srv, cert, user);
    // No password: the certificate is the credential.
    let mut carol = connect(&carol_cert, "carol").unwrap();
    carol.password = None;
    assert_eq!(carol.register(600), 200);
    // ... for carol only.
    carol.send(&register_for(
        &carol,
        "dave",
        &format!("Contact: <sip:x@{}>\r\n", carol.local),
    ));
    assert_eq!(carol.expect_final_or_provisional("REGISTER dave").0, 403);
    assert_eq!(
        message(
            &mut carol,
            "sip:bob@example.com",
            "sip:dave@example.com",
            ""
        ),
        403
    );
    // A revoked phone certificate is refused at the handshake (TLS 1.2: inside it).
    let refused = connect(&revoked, "carol").and_then(|mut u| {
        u.send(b"OPTIONS sip:example.com SIP/2.0\r\n\r\n");
        u.recv(Duration::from_secs(2))
            .map(|_| ())
            .ok_or_else(|| std::io::Error::other("closed"))
    });
    assert!(refused.is_err(), "revoked client certificate accepted");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn attack_2_clients_cannot_speak_for_partners_and_pai_is_ours_to_assert() {
    let w = World::new();
    let srv = w.start(|_| {});
    // A client without credentials claiming a partner's user, toward the other partner.
    let mut anon = w.client(&srv, "mallory");
    anon.password = None;
    assert_eq!(
        message(
            &mut anon,
            "sip:bob@peer-b.test",
            "sip:mallory@peer-a.test",
            ""
        ),
        407
    );
    // Authenticated, but still not as that user.
    let mut mallory = w.client(&srv, "mallory");
    assert_eq!(mallory.login(), 200);
    assert_eq!(
        message(
            &mut mallory,
            "sip:bob@peer-b.test",
            "sip:mallory@peer-a.test",
            ""
        ),
        403
    );
    wait_refusals(&srv, "from_not_identity", 1.0);
    assert!(w.at_b().is_empty(), "partner B received a forged request");
    // Authenticated, registering a partner's user at the partner (by Request-URI, and by a
    // Route naming it): never relayed, so B's registrar never sees it with our assertion.
    for (ruri, route) in [
        ("sip:peer-b.test", ""),
        ("sip:example.com", "Route: <sip:peer-b.test;lr>\r\n"),
    ] {
        let reg = mallory.request(
            "REGISTER",
            ruri,
            "<sip:bob@peer-b.test>",
            &format!("relay-{ruri}"),
            1,
            &format!("{route}Expires: 600\r\n"),
            None,
        );
        mallory.send(&reg);
        assert_eq!(mallory.expect_final_or_provisional("REGISTER").0, 403);
    }
    wait_refusals(&srv, "register_relay", 2.0);
    assert!(w.at_b().is_empty(), "partner B received a relayed REGISTER");
    // alice, as herself, toward partner B: a forged PAI and a PPI are removed, our assertion
    // added, and her credentials for our realm consumed.
    let mut alice = w.client(&srv, "alice");
    assert_eq!(alice.login(), 200);
    assert_eq!(
        message(
            &mut alice,
            "sip:bob@peer-b.test",
            "sip:alice@example.com",
            "P-Asserted-Identity: <sip:ceo@example.com>\r\nP-Preferred-Identity: <sip:ceo@example.com>\r\n"
        ),
        200
    );
    let got = w
        .at_b()
        .into_iter()
        .find(|m| method(m) == "MESSAGE")
        .expect("at B");
    assert_eq!(
        header_all(&got, "P-Asserted-Identity").as_deref(),
        Some("<sip:alice@example.com>")
    );
    assert_eq!(header(&got, "P-Preferred-Identity"), None);
    assert_eq!(header(&got, "Proxy-Authorization"), None);
    // alice withholds her caller ID (RFC 3323: an anonymous From, Privacy: id): allowed (it
    // was 403), and B — in our trust domain — gets her identity asserted, with the Privacy
    // request it must honour.
    let anonymous = "sip:anonymous@anonymous.invalid";
    let before = w.at_b().len();
    assert_eq!(
        message(
            &mut alice,
            "sip:bob@peer-b.test",
            anonymous,
            "Privacy: id\r\n"
        ),
        200
    );
    let got = w.at_b()[before..]
        .iter()
        .find(|m| method(m) == "MESSAGE")
        .expect("at B")
        .clone();
    assert_eq!(
        header_all(&got, "P-Asserted-Identity").as_deref(),
        Some("<sip:alice@example.com>")
    );
    assert!(header(&got, "From").unwrap().contains(anonymous));
    assert_eq!(header(&got, "Privacy").as_deref(), Some("id"));
    // Toward a local user, a client's PAI is removed and none is added.
    let mut bob = w.client(&srv, "bob");
    assert_eq!(bob.register(600), 200);
    let got = deliver(&mut alice, &mut bob, anonymous, "Privacy: id\r\n");
    assert_eq!(header(&got, "P-Asserted-Identity"), None);
    assert!(header(&got, "From").unwrap().contains(anonymous));
    let got = deliver(
        &mut alice,
        &mut bob,
        "sip:alice@example.com",
        "P-Asserted-Identity: <sip:ceo@example.com>\r\n",
    );
    assert_eq!(header(&got, "P-Asserted-Identity"), None);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn attacks_3_and_5_partners_speak_for_their_own_domains_and_are_not_relayed() {
    let w = World::new();
    let srv = w.start(|_| {});
    let mut alice = w.client(&srv, "alice");
    assert_eq!(alice.register(600), 200);
    let a_cert = w.ca_a.issue(&Spec::server("sip.peer-a.test")).unwrap();
    let mut a = w.partner(&srv, &a_cert, "peer-a.test");
    // Another partner's users: refused.
    assert_eq!(
        message(&mut a, "sip:alice@example.com", "sip:x@peer-b.test", ""),
        403
    );
    assert_eq!(
        message(&mut a, "sip:alice@example.com", "sip:x@example.com", ""),
        403
    );
    assert_eq!(
        message(
            &mut a,
            "sip:alice@example.com",
            "sip:x@peer-a.test",
            "P-Asserted-Identity: <sip:y@peer-b.test>\r\n"
        ),
        403
    );
    wait_refusals(&srv, "partner_from_domain", 2.0);
    wait_refusals(&srv, "partner_pai_domain", 1.0);
    assert!(alice.recv(Duration::from_millis(200)).is_none());
    // Its own users, with its assertion: delivered, the assertion kept.
    let got = deliver(
        &mut a,
        &mut alice,
        "sip:x@peer-a.test",
        "P-Asserted-Identity: <sip:x@peer-a.test>\r\n",
    );
    assert_eq!(
        header(&got, "P-Asserted-Identity").as_deref(),
        Some("<sip:x@peer-a.test>")
    );
    // ... unless it asks for privacy: then a client does not see it (RFC 3325).
    let got = deliver(
        &mut a,
        &mut alice,
        "sip:x@peer-a.test",
        "P-Asserted-Identity: <sip:x@peer-a.test>\r\nPrivacy: id\r\n",
    );
    assert_eq!(header(&got, "P-Asserted-Identity"), None);
    // Through us to partner B: we are not a transit.
    assert_eq!(
        message(&mut a, "sip:bob@peer-b.test", "sip:x@peer-a.test", ""),
        403
    );
    wait_refusals(&srv, "relay_not_allowed", 1.0);
    assert!(w.at_b().is_empty(), "partner A was relayed to partner B");

    // Attack 5: a certificate from B's CA naming both B and A is B's connection.
    let both = w
        .ca_b
        .issue(&Spec {
            dns: vec!["sip.peer-b.test".into(), "sip.peer-a.test".into()],
            uris: vec![],
            ..Spec::server("sip.peer-b.test")
        })
        .unwrap();
    let mut b = w.partner(&srv, &both, "peer-b.test");
    assert_eq!(
        message(&mut b, "sip:alice@example.com", "sip:x@peer-a.test", ""),
        403
    );
    deliver(&mut b, &mut alice, "sip:x@peer-b.test", "");
    srv.stop();
    srv.join().unwrap();

    // Relaying is for pairs the operator names.
    let srv = w.start(|c| c.peer[0].relay_to = vec!["peer-b".into()]);
    let mut a = w.partner(&srv, &a_cert, "peer-a.test");
    assert_eq!(
        message(&mut a, "sip:bob@peer-b.test", "sip:x@peer-a.test", ""),
        200
    );
    assert!(w.at_b().iter().any(|m| method(m) == "MESSAGE"));
    srv.stop();
    srv.join().unwrap();
}

/// The shard that handled a request `a` sent: the one named in the branch of our Via on what
/// `bob` received (the shard that owns the client transaction is the one the request came in
/// on). The probe call is refused 486.
fn shard_of(a: &mut Ua, bob: &mut Ua, call_id: &str) -> u16 {
    let got = invite(a, bob, call_id);
    let via = header(&got, "Via").unwrap();
    let br = via
        .split(';')
        .find_map(|p| p.trim().strip_prefix("branch="))
        .unwrap();
    let shard = sipring_core::proxy::Proxy::branch_shard(br.as_bytes()).expect("our branch");
    bob.send(&answer(&got, 486, "Busy Here", "b", "sip:bob@127.0.0.1"));
    assert_eq!(method(&bob.expect("ACK")), "ACK");
    assert_eq!(a.expect_final_or_provisional("486").0, 486);
    shard
}

/// A partner connection (presenting `cert`, speaking for `domain`) whose requests another
/// shard than `not` handles.
fn partner_off_shard(
    w: &World,
    srv: &Running,
    bob: &mut Ua,
    cert: &Issued,
    domain: &str,
    not: u16,
) -> Ua {
    for i in 0..40 {
        let mut p = w.partner(srv, cert, domain);
        if shard_of(&mut p, bob, &format!("probe-{domain}-{i}")) != not {
            return p;
        }
    }
    panic!("no connection of {domain} landed on another shard than {not} in 40 tries");
}

/// The CANCEL of an INVITE as its sender wrote it (RFC 3261 §9.1).
fn cancel_of(inv: &[u8]) -> Vec<u8> {
    let h = |n: &str| header(inv, n).unwrap();
    let line = first_line(inv);
    let ruri = line.split(' ').nth(1).unwrap();
    format!(
        "CANCEL {ruri} SIP/2.0\r\nVia: {}\r\nMax-Forwards: 70\r\nTo: {}\r\nFrom: {}\r\nCall-ID: {}\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n",
        h("Via"),
        h("To"),
        h("From"),
        h("Call-ID")
    )
    .into_bytes()
}

#[test]
fn a_partners_cancel_finds_its_invite_on_another_shard() {
    // A partner's pool of connections lands on several shards, and its CANCEL may come on
    // another connection than its INVITE (§9.2 matches the transaction, not the
    // connection): it was answered 481 and the call rang on. Another partner still cannot
    // cancel it, from either shard.
    let w = World::new();
    let srv = w.start(|c| c.server.shards = 2);
    let mut bob = w.client(&srv, "bob");
    assert_eq!(bob.register(600), 200);
    let a_cert = w.ca_a.issue(&Spec::server("sip.peer-a.test")).unwrap();
    let b_cert = w.ca_b.issue(&Spec::server("sip.peer-b.test")).unwrap();
    let mut a1 = w.partner(&srv, &a_cert, "peer-a.test");
    let s1 = shard_of(&mut a1, &mut bob, "probe-first");
    let mut a2 = partner_off_shard(&w, &srv, &mut bob, &a_cert, "peer-a.test", s1);
    let mut b = partner_off_shard(&w, &srv, &mut bob, &b_cert, "peer-b.test", s1);

    let inv = a1.request(
        "INVITE",
        "sip:bob@example.com",
        "<sip:bob@example.com>",
        "pool-call",
        1,
        "",
        None,
    );
    a1.send(&inv);
    let got = bob.expect("INVITE");
    bob.send(&answer(&got, 180, "Ringing", "b", "sip:bob@127.0.0.1"));
    assert_eq!(a1.expect_final_or_provisional("180").0, 180);
    let cancel = cancel_of(&inv);

    // Partner B, on the other shard, writing A's CANCEL: refused, and nothing reaches bob.
    b.send(&cancel);
    let (code, _) = b.expect_final_or_provisional("B's CANCEL refused");
    assert_eq!(code, 481, "B's CANCEL");
    assert!(bob.recv(Duration::from_millis(300)).is_none());

    // Partner A, on the other shard: 200, the call is cancelled downstream, 487 upstream.
    a2.send(&cancel);
    let (code, resp) = a2.expect_final_or_provisional("200 to CANCEL");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&resp));
    let c = bob.expect("CANCEL");
    assert_eq!(method(&c), "CANCEL");
    bob.send(&answer(&c, 200, "OK", "b", "sip:bob@127.0.0.1"));
    bob.send(&answer(
        &got,
        487,
        "Request Terminated",
        "b",
        "sip:bob@127.0.0.1",
    ));
    assert_eq!(method(&bob.expect("ACK")), "ACK");
    assert_eq!(a1.expect_final_or_provisional("487").0, 487);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn attack_4_flow_tokens_cannot_be_forged_or_moved() {
    let w = World::new();
    let srv = w.start(|_| {});
    let mut alice = w.client(&srv, "alice");
    let mut bob = w.client(&srv, "bob");
    assert_eq!(alice.register(600), 200);
    assert_eq!(bob.register(600), 200);
    // A real dialog: alice calls bob; bob's INVITE carries our signed Record-Route.
    alice.send(&alice.request(
        "INVITE",
        "sip:bob@example.com",
        "<sip:bob@example.com>",
        "ft-1",
        1,
        "",
        None,
    ));
    let inv = bob.expect("INVITE");
    let rr = header(&inv, "Record-Route").unwrap();
    assert!(rr.contains(";ft="), "{rr}");
    bob.send(&answer(&inv, 486, "Busy Here", "b", "sip:bob@127.0.0.1"));
    assert_eq!(method(&bob.expect("ACK")), "ACK");
    assert_eq!(alice.expect_final_or_provisional("486").0, 486);
    // mallory forges routes toward bob's connection: no signature, a signature from another
    // dialog, an unknown partner name.
    let mut mallory = w.client(&srv, "mallory");
    assert_eq!(mallory.login(), 200);
    let unsigned = rr.split(";ft=").next().unwrap().to_string() + ">";
    let bye = |route: &str, call_id: &str| {
        format!(
            "BYE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1;branch={}\r\nMax-Forwards: 70\r\nRoute: {route}\r\nFrom: <sip:mallory@example.com>;tag=m\r\nTo: <sip:bob@example.com>;tag=b\r\nCall-ID: {call_id}\r\nCSeq: 9 BYE\r\nContent-Length: 0\r\n\r\n",
            branch()
        )
    };
    for (route, call_id) in [
        (unsigned.as_str(), "ft-1"),
        (rr.as_str(), "another-dialog"),
        ("<sip:127.0.0.1;lr;fi=pa;fo=c2b>", "ft-1"),
    ] {
        mallory.send(bye(route, call_id).as_bytes());
        assert_eq!(
            mallory.expect_final_or_provisional("forged route").0,
            403,
            "{route}"
        );
    }
    // Unknown partner names create nothing (before: a table entry and a WARN line each).
    for i in 0..50 {
        let route = format!("<sip:127.0.0.1;lr;fi=c1;fo=pnowhere{i}>");
        mallory.send(bye(&route, "ft-1").as_bytes());
        assert_eq!(mallory.expect_final_or_provisional("forged partner").0, 403);
    }
    assert!(
        bob.recv(Duration::from_millis(300)).is_none(),
        "bob received a forged BYE"
    );
    let m = wait_metrics(srv.admin_addr.unwrap(), "53 forged tokens", |m| {
        metric(
            m,
            "sipring_sip_refusals_total{reason=\"forged_flow_token\"}",
        )
        .unwrap_or(0.0)
            >= 53.0
    });
    assert_eq!(metric(&m, "sipring_peer_connect_failures_total"), None);
    assert_eq!(refusals(&srv, "forged_flow_token"), 53.0);
    srv.stop();
    srv.join().unwrap();
}

/// `b` answers the call `a` made as `inv` (To-tag `b1`), and `a` hears the 200.
fn take_call(a: &mut Ua, b: &mut Ua, inv: &[u8]) {
    b.send(&answer(
        inv,
        200,
        "OK",
        "b1",
        &format!("sip:{}@{}", b.user, b.local),
    ));
    assert_eq!(a.expect_final_or_provisional("200 to INVITE").0, 200);
}

/// `ua`'s request `msg` with its digest credentials.
fn with_credentials(ua: &Ua, msg: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(msg);
    let mut words = text.split(' ');
    let (method, ruri) = (words.next().unwrap(), words.next().unwrap());
    let creds = ua.credentials(method, ruri);
    assert!(!creds.is_empty(), "{} holds a challenge", ua.user);
    text.replacen(
        "Content-Length: 0\r\n",
        &format!("{creds}Content-Length: 0\r\n"),
        1,
    )
    .into_bytes()
}

#[test]
fn a_party_that_reconnects_keeps_its_call_and_nobody_else_can_take_it() {
    // A phone whose connection broke mid-call (NAT rebinding, Wi-Fi to LTE) connects again:
    // its in-dialog requests come on a new connection with the dialog's route. Our route
    // names its parties (keyed): the party that proves it is one of them goes on; before,
    // anyone not on the dialog's connections got 404 and the call hung on the other side.
    let w = World::new();
    let srv = w.start(|_| {});
    let mut alice = w.client(&srv, "alice");
    let mut bob = w.client(&srv, "bob");
    assert_eq!(alice.register(600), 200);
    assert_eq!(bob.register(600), 200);
    // The callee comes back and registers again: that binding is its proof, no challenge.
    let inv = invite(&mut alice, &mut bob, "rc-1");
    let rr = header_all(&inv, "Record-Route").unwrap();
    assert!(rr.contains(";ui=") && rr.contains(";uo="), "{rr}");
    take_call(&mut alice, &mut bob, &inv);
    bob.kill();
    let mut bob = w.client(&srv, "bob");
    assert_eq!(bob.register(600), 200);
    // Alice's requests to bob's new contact (his re-INVITE would have told her) follow the
    // route to his closed connection: the binding he made since takes them.
    let info = format!(
        "INFO sip:bob@{bl};transport=tls;ob SIP/2.0\r\nVia: SIP/2.0/TLS {al};branch={br}\r\nMax-Forwards: 70\r\nRoute: {rr}\r\nFrom: <sip:alice@example.com>;tag=talice\r\nTo: <sip:bob@example.com>;tag=b1\r\nCall-ID: rc-1\r\nCSeq: 3 INFO\r\nContent-Length: 0\r\n\r\n",
        bl = bob.local,
        al = alice.local,
        br = branch()
    );
    alice.send(info.as_bytes());
    let got = bob.expect("INFO at bob's new connection");
    assert_eq!(method(&got), "INFO");
    bob.send(&answer(&got, 200, "OK", "b1", "sip:bob@127.0.0.1"));
    assert_eq!(alice.expect_final_or_provisional("200 to INFO").0, 200);
    wait_metrics(srv.admin_addr.unwrap(), "a dialog rebind", |m| {
        metric(m, "sipring_dialog_rebinds_total") == Some(1.0)
    });
    hang_up(&mut bob, &mut alice, &inv, "rc-1");
    // The caller comes back and registers nothing: its re-INVITE is challenged, and goes
    // through with its digest; so does its ACK, which cannot be challenged, and so does
    // what follows at once.
    let inv = invite(&mut alice, &mut bob, "rc-2");
    take_call(&mut alice, &mut bob, &inv);
    alice.kill();
    let mut alice = w.client(&srv, "alice");
    let as_method = |m: Vec<u8>, method: &str, cseq: u32| {
        String::from_utf8(m)
            .unwrap()
            .replacen("BYE sip:", &format!("{method} sip:"), 1)
            .replace("CSeq: 2 BYE", &format!("CSeq: {cseq} {method}"))
            .into_bytes()
    };
    let reinvite = |alice: &Ua| as_method(bye(alice, &bob, &inv, "rc-2"), "INVITE", 3);
    alice.send(&reinvite(&alice));
    let (code, challenge) = alice.expect_final_or_provisional("re-INVITE from a new connection");
    assert_eq!(code, 407, "{}", String::from_utf8_lossy(&challenge));
    assert!(alice.take_challenge(&challenge));
    // (An ACK from it before it showed who it is reaches nobody.)
    alice.send(&as_method(bye(&alice, &bob, &inv, "rc-2"), "ACK", 3));
    alice.send(&with_credentials(&alice, &reinvite(&alice)));
    let got = bob.expect("re-INVITE at the callee");
    assert_eq!(method(&got), "INVITE");
    bob.send(&answer(&got, 200, "OK", "b1", "sip:bob@127.0.0.1"));
    assert_eq!(alice.expect_final_or_provisional("200 to re-INVITE").0, 200);
    alice.send(&as_method(bye(&alice, &bob, &inv, "rc-2"), "ACK", 3));
    assert_eq!(method(&bob.expect("ACK at the callee")), "ACK");
    alice.send(&as_method(bye(&alice, &bob, &inv, "rc-2"), "BYE", 4));
    let got = bob.expect("BYE at the callee");
    assert_eq!(method(&got), "BYE");
    bob.send(&answer(&got, 200, "OK", "b1", "sip:bob@127.0.0.1"));
    assert_eq!(alice.expect_final_or_provisional("200 to BYE").0, 200);
    // Mallory holds a dialog's route (she is a user too): as herself she is no party; as
    // alice she is not alice.
    let inv = invite(&mut alice, &mut bob, "rc-3");
    take_call(&mut alice, &mut bob, &inv);
    let mut mallory = w.client(&srv, "mallory");
    assert_eq!(mallory.login(), 200);
    let as_alice = String::from_utf8(bye(&mallory, &bob, &inv, "rc-3"))
        .unwrap()
        .replace("From: <sip:mallory@", "From: <sip:alice@");
    for m in [bye(&mallory, &bob, &inv, "rc-3"), as_alice.into_bytes()] {
        mallory.send(&with_credentials(&mallory, &m));
        let (code, r) = mallory.expect_final_or_provisional("mallory's BYE");
        assert_eq!(code, 403, "{}", String::from_utf8_lossy(&r));
    }
    assert!(
        bob.recv(Duration::from_millis(300)).is_none(),
        "bob received mallory's BYE"
    );
    wait_refusals(&srv, "dialog_not_party", 1.0);
    assert_eq!(refusals(&srv, "dialog_not_party"), 1.0);
    assert_eq!(refusals(&srv, "from_not_identity"), 1.0);
    hang_up(&mut bob, &mut alice, &inv, "rc-3");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn subscribers_reload_without_a_restart() {
    let w = World::new();
    let file = w.pki.dir.join("subs-reload.toml");
    let entry = |u: &str| {
        sipring::auth::SubscriberEntry::new(
            u,
            "example.com",
            vec![],
            &sipring_tests::ua::password_for(u),
        )
        .to_toml()
    };
    std::fs::write(&file, entry("alice")).unwrap();
    let mut cfg = w.config();
    cfg.auth.subscribers = Some(file.clone());
    let path = w.pki.dir.join("reload.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let srv = start(cfg, Some(path)).expect("start");
    let mut newbie = w.client(&srv, "bob");
    assert_eq!(newbie.register(600), 401, "not a subscriber yet");
    std::fs::write(&file, entry("bob")).unwrap();
    srv.reload().expect("reload");
    let mut bob = w.client(&srv, "bob");
    assert_eq!(bob.register(600), 200, "added by the reload");
    let mut alice = w.client(&srv, "alice");
    assert_eq!(alice.register(600), 401, "removed by the reload");
    // A broken file is refused and the previous table stays.
    std::fs::write(&file, "[[subscriber]]\nusername = \"bob\"\n").unwrap();
    assert!(srv.reload().is_err());
    assert_eq!(bob.register(600), 200);
    // So is an empty one (`> file` truncates before it writes: a reload in between saw no
    // subscriber at all and shut everyone out).
    std::fs::write(&file, "").unwrap();
    let e = srv.reload().unwrap_err();
    assert!(e.contains("no subscribers"), "{e}");
    assert_eq!(bob.register(600), 200);
    // Emptied on purpose (a comment says so): taken, and bob is out.
    std::fs::write(&file, "# nobody for now\n").unwrap();
    srv.reload().expect("a deliberate empty file");
    let mut bob = w.client(&srv, "bob");
    assert_eq!(bob.register(600), 401);
    srv.stop();
    srv.join().unwrap();
}

/// A phone CA (its root and an empty CRL written where [`with_phones`] points).
fn phones(w: &World) -> Ca {
    let users = Ca::new("Phones CA").unwrap();
    w.pki.dir.write("phones-ca.pem", &users.cert.cert_pem);
    w.pki.dir.write("phones.crl", users.crl(&[]).unwrap());
    users
}

/// A phone certificate for `aor` from `users`, valid for `valid_for` from now.
fn phone_cert(users: &Ca, aor: &str, valid_for: time::Duration) -> Issued {
    users
        .issue(&Spec {
            uris: vec![aor.into()],
            usage: Usage::ClientOnly,
            valid_until: valid_for,
            ..Spec::server("phone.example.com")
        })
        .unwrap()
}

/// Client certificates from the phone CA accepted (optional) on the first listener.
fn with_phones(w: &World, c: &mut Config) {
    c.listen[0].client_auth = ClientAuth::Optional;
    c.tls.client_roots = Some(w.pki.dir.join("phones-ca.pem"));
    c.tls.client_crls = vec![w.pki.dir.join("phones.crl")];
}

/// A connection to the first listener presenting `cert`.
fn connect_phone(w: &World, srv: &Running, cert: &Issued, user: &str) -> std::io::Result<Ua> {
    connect_phone_chain(w, srv, vec![cert.der.clone()], &cert.key_pem, user)
}

/// [`connect_phone`] presenting `chain` (leaf first), whose leaf's key is `key_pem`.
fn connect_phone_chain(
    w: &World,
    srv: &Running,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key_pem: &str,
    user: &str,
) -> std::io::Result<Ua> {
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let cfg = tls_config(&w.pki.certs("ca.pem"), Some((chain, key)), true);
    Ua::tls(
        srv.listen_addrs[0],
        cfg,
        "sip.example.com",
        user,
        "example.com",
    )
}

/// A phone presenting `cert` (no password: the certificate is the credential).
fn phone(w: &World, srv: &Running, cert: &Issued, user: &str) -> Ua {
    let mut u = connect_phone(w, srv, cert, user).expect("phone connects");
    u.password = None;
    u
}

fn recheck_closed(srv: &Running, reason: &str) -> f64 {
    let m = sipring_tests::server::admin_get(srv.admin_addr.unwrap(), "/metrics");
    metric(
        &m,
        &format!("sipring_tls_recheck_closed_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn a_reload_with_a_server_certificate_out_of_date_is_refused() {
    // An old pair restored (or a deploy hook that wrote the wrong file): the certificate
    // and key match, so the reload was taken, and every handshake failed from then on —
    // clients', partners', and ours as a client. Refused now; the one in force stays.
    let w = World::new();
    let path = w.pki.dir.join("stale-cert.toml");
    let cfg = w.config();
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let srv = start(cfg.clone(), Some(path.clone())).expect("start");
    let read = |n: &str| std::fs::read_to_string(w.pki.dir.join(n)).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &read("ca.pem"),
        rcgen::KeyPair::from_pem(&read("ca.key")).unwrap(),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    // A configuration whose main certificate is `name`, valid from `from` until `until`.
    let issue = |name: &str, from: time::OffsetDateTime, until: time::OffsetDateTime| {
        let mut p = rcgen::CertificateParams::new(vec!["sip.example.com".to_string()]).unwrap();
        (p.not_before, p.not_after) = (from, until);
        let k = rcgen::KeyPair::generate().unwrap();
        let c = p.signed_by(&k, &issuer).unwrap();
        w.pki.dir.write(&format!("{name}.pem"), c.pem());
        w.pki.dir.write(&format!("{name}.key"), k.serialize_pem());
        let mut with = cfg.clone();
        with.tls.certificate[0].cert = w.pki.dir.join(&format!("{name}.pem"));
        with.tls.certificate[0].key = w.pki.dir.join(&format!("{name}.key"));
        with
    };
    for (name, from, until, said) in [
        (
            "old",
            now - time::Duration::days(400),
            now - time::Duration::days(35),
            "expired",
        ),
        (
            "early",
            now + time::Duration::days(2),
            now + time::Duration::days(400),
            "not valid",
        ),
    ] {
        let stale = issue(name, from, until);
        std::fs::write(&path, toml::to_string(&stale).unwrap()).unwrap();
        let e = srv.reload().unwrap_err();
        assert!(
            e.contains(&format!("{name}.pem")) && e.contains(said),
            "{e}"
        );
        // The certificate in force still serves.
        let mut alice = w.client(&srv, "alice");
        alice.password = Some("pw-alice".into());
        assert_eq!(alice.register(600), 200, "{name}");
    }
    // The same file renewed is taken; and one whose notBefore is a minute ahead (the
    // issuing CA's clock).
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    srv.reload().expect("a certificate in date");
    let fresh = issue(
        "fresh",
        now + time::Duration::minutes(1),
        now + time::Duration::days(90),
    );
    std::fs::write(&path, toml::to_string(&fresh).unwrap()).unwrap();
    srv.reload().expect("a CA's clock a minute ahead");
    srv.stop();
    srv.join().unwrap();
    // One out of date already in force (a lapsed SNI certificate nobody removed) does not
    // block every other reload: the start warns of it, reloads go on.
    let mut legacy = issue(
        "legacy",
        now - time::Duration::days(400),
        now - time::Duration::days(35),
    );
    legacy.tls.certificate[0].sni = vec!["legacy.example.com".into()];
    let mut both = cfg.clone();
    both.tls.certificate.push(legacy.tls.certificate[0].clone());
    std::fs::write(&path, toml::to_string(&both).unwrap()).unwrap();
    let srv = start(both, Some(path)).expect("start");
    srv.reload()
        .expect("the lapsed certificate was already in force");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_partner_another_relays_to_can_be_removed_by_a_reload() {
    // Every name in `relay_to` must be a configured partner, and a change to a remaining
    // partner's rules needs a restart: a partner another relays to could not be removed by
    // a reload at all (a compromised key waited for a restart). Its name may now leave the
    // others' `relay_to` with it; narrowing `relay_to` otherwise still needs a restart.
    let w = World::new();
    let path = w.pki.dir.join("relay-reload.toml");
    let mut cfg = w.config();
    cfg.peer[0].relay_to = vec![cfg.peer[1].name.clone()];
    let write = |c: &Config| std::fs::write(&path, toml::to_string(c).unwrap()).unwrap();
    write(&cfg);
    let srv = start(cfg.clone(), Some(path.clone())).expect("start");
    let mut narrowed = cfg.clone();
    narrowed.peer[0].relay_to.clear();
    write(&narrowed);
    let e = srv.reload().unwrap_err();
    assert!(e.contains("restart"), "{e}");
    let mut removed = narrowed;
    removed.peer.remove(1);
    write(&removed);
    srv.reload().expect("a partner another relayed to, removed");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_reload_that_changes_who_a_partner_is_needs_a_restart() {
    // The shards judge partners by a SIP policy built at start; a reload swaps only the
    // TLS policy that names connections. A partner added or given other rights by a reload
    // was trusted by one and judged by the other: such a reload is refused whole.
    let w = World::new();
    let path = w.pki.dir.join("partners-reload.toml");
    let cfg = w.config();
    let write = |c: &Config| std::fs::write(&path, toml::to_string(c).unwrap()).unwrap();
    write(&cfg);
    let srv = start(cfg.clone(), Some(path.clone())).expect("start");
    let mut wider = cfg.clone();
    wider.peer[0].domains.push("example.org".into());
    write(&wider);
    let e = srv.reload().unwrap_err();
    assert!(e.contains("peer-a") && e.contains("restart"), "{e}");
    let mut more = cfg.clone();
    more.peer.push(PeerConfig {
        name: "peer-c".into(),
        domains: vec!["peer-c.test".into()],
        ..cfg.peer[0].clone()
    });
    write(&more);
    let e = srv.reload().unwrap_err();
    assert!(e.contains("peer-c") && e.contains("added"), "{e}");
    // Any other key the shards read once, at start: refused, not "reloaded" for nothing.
    let mut auth_off = cfg.clone();
    auth_off.auth.enabled = !cfg.auth.enabled;
    write(&auth_off);
    let e = srv.reload().unwrap_err();
    assert!(e.contains("[auth]") && e.contains("restart"), "{e}");
    let mut limits = cfg.clone();
    limits.limits.max_connections_per_ip += 1;
    write(&limits);
    assert!(srv.reload().unwrap_err().contains("[limits]"));
    // Removing one is a reload; so is what TLS reads (here: the trusted names).
    let mut names = cfg.clone();
    names.peer[0].trusted_names = vec!["sip.peer-a.test".into()];
    write(&names);
    srv.reload().expect("trusted names are reloaded");
    let mut reordered = cfg.clone();
    reordered.peer.reverse();
    write(&reordered);
    srv.reload()
        .expect("the order of [[peer]] tables means nothing");
    let mut fewer = cfg;
    fewer.peer.remove(1);
    write(&fewer);
    srv.reload().expect("removing a partner");
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_reload_closes_live_connections_whose_certificates_no_longer_pass() {
    // A handshake verifies a chain once; carrier links and phones stay up for days. A CRL
    // that revokes a partner or a phone must reach the connections already up.
    let w = World::new();
    let users = phones(&w);
    let year = time::Duration::days(365);
    let (carol_cert, erin_cert) = (
        phone_cert(&users, "sip:carol@example.com", year),
        phone_cert(&users, "sip:erin@example.com", year),
    );
    let mut cfg = w.config();
    with_phones(&w, &mut cfg);
    let path = w.pki.dir.join("recheck.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let srv = start(cfg, Some(path)).expect("start");
    let mut carol = phone(&w, &srv, &carol_cert, "carol");
    let mut erin = phone(&w, &srv, &erin_cert, "erin");
    let mut alice = w.client(&srv, "alice");
    assert_eq!(carol.register(600), 200);
    assert_eq!(erin.register(600), 200);
    assert_eq!(alice.register(600), 200);
    let a_cert = w.ca_a.issue(&Spec::server("sip.peer-a.test")).unwrap();
    let mut a = w.partner(&srv, &a_cert, "peer-a.test");
    deliver(&mut a, &mut alice, "sip:x@peer-a.test", "");
    // Our own link to partner B, up.
    assert_eq!(
        message(
            &mut alice,
            "sip:bob@peer-b.test",
            "sip:alice@example.com",
            ""
        ),
        200
    );
    // A reload that changes nothing closes nothing.
    srv.reload().expect("reload");
    assert!(!carol.closed_within(Duration::from_millis(1500)));
    deliver(&mut a, &mut carol, "sip:x@peer-a.test", "");

    // The phone CA revokes carol, partner A's CA revokes A, partner B's CA revokes B's
    // server certificate; the operator reloads.
    w.pki
        .dir
        .write("phones.crl", users.crl(&[carol_cert.serial]).unwrap());
    w.pki
        .dir
        .write("a.crl", w.ca_a.crl(&[a_cert.serial]).unwrap());
    w.pki.dir.write("b.crl", w.ca_b.crl(&[w.b_serial]).unwrap());
    srv.reload().expect("reload");
    assert!(
        carol.closed_within(Duration::from_secs(5)),
        "revoked phone stays up"
    );
    assert!(
        a.closed_within(Duration::from_secs(5)),
        "revoked partner stays up"
    );
    wait_metrics(srv.admin_addr.unwrap(), "recheck closures", |m| {
        metric(m, "sipring_tls_recheck_closed_total{reason=\"revoked\"}") == Some(3.0)
    });
    // What carol registered went with her connection; everyone else is untouched.
    assert_eq!(
        message(
            &mut alice,
            "sip:carol@example.com",
            "sip:alice@example.com",
            ""
        ),
        480
    );
    assert_eq!(erin.register(600), 200);
    assert_eq!(alice.register(600), 200);
    deliver(&mut alice, &mut erin, "sip:alice@example.com", "");
    // B is not dialled again with a revoked certificate: the failed link counts as a 503
    // from it (§16.9), which goes upstream as 500 (§16.7 step 6).
    assert_eq!(
        message(
            &mut alice,
            "sip:bob@peer-b.test",
            "sip:alice@example.com",
            ""
        ),
        500
    );
    assert_eq!(recheck_closed(&srv, "revoked"), 3.0);
    srv.stop();
    srv.join().unwrap();
}

#[test]
fn a_connection_closes_when_its_certificate_expires() {
    let w = World::new();
    let users = phones(&w);
    let lasting = phone_cert(&users, "sip:erin@example.com", time::Duration::days(1));
    let srv = w.start(|c| with_phones(&w, c));
    // Issued once the server is up, valid for 6 s: time to connect and register on a loaded
    // machine, then it expires under the connection.
    let brief = phone_cert(&users, "sip:carol@example.com", time::Duration::seconds(6));
    let mut carol = phone(&w, &srv, &brief, "carol");
    let mut erin = phone(&w, &srv, &lasting, "erin");
    assert_eq!(carol.register(600), 200);
    assert_eq!(erin.register(600), 200);
    assert!(
        carol.closed_within(Duration::from_secs(12)),
        "expired certificate's connection stays up"
    );
    assert_eq!(recheck_closed(&srv, "expired"), 1.0);
    assert!(!erin.closed_within(Duration::from_millis(600)));
    assert_eq!(erin.register(600), 200);
    srv.stop();
    srv.join().unwrap();
}
