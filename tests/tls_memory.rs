//! The trust model, in memory: rustls client/server pairs built from sipring's TLS policy,
//! exchanging records through a `transfer` loop (no sockets). Every acceptance and rejection
//! reason, inbound (a partner connects to our `mtls` listener) and outbound (we connect to a
//! partner), for TLS 1.2 and 1.3.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sipring::config::{
    CertConfig, Config, ListenConfig, ListenKind, PeerConfig, UnknownRevocation,
};
use sipring::tls::pki::{Ca, Issued, Spec, Usage};
use sipring::tls::session::TlsSession;
use sipring::tls::{Rejection, TlsPolicy};
use sipring_tests::TempDir;
use std::sync::{Arc, Mutex};
use time::Duration;

/// The PKI of the tests: our CA, two partners' CAs, and a CA nobody trusts.
struct World {
    dir: TempDir,
    ours: Ca,
    alpha: Ca,
    beta: Ca,
    rogue: Ca,
    alpha_revoked: u64,
}

impl World {
    fn new() -> World {
        let dir = TempDir::new("tls");
        let ours = Ca::new("Our CA").unwrap();
        let alpha = Ca::new("Alpha CA").unwrap();
        let beta = Ca::new("Beta CA").unwrap();
        let rogue = Ca::new("Rogue CA").unwrap();
        let revoked = alpha.issue(&Spec::server("sip.alpha.example")).unwrap();
        let w = World {
            dir,
            ours,
            alpha,
            beta,
            rogue,
            alpha_revoked: revoked.serial,
        };
        let server = w.ours.issue(&Spec::server("sip.example.com")).unwrap();
        let other = w
            .ours
            .issue(&Spec::server("sip.other-domain.example"))
            .unwrap();
        w.dir.write("server.pem", &server.cert_pem);
        w.dir.write("server.key", &server.key_pem);
        w.dir.write("other.pem", &other.cert_pem);
        w.dir.write("other.key", &other.key_pem);
        w.dir.write("alpha-ca.pem", &w.alpha.cert.cert_pem);
        w.dir
            .write("alpha.crl", w.alpha.crl(&[w.alpha_revoked]).unwrap());
        w.dir.write("beta-ca.pem", &w.beta.cert.cert_pem);
        w.dir.write("beta.crl", w.beta.crl(&[]).unwrap());
        w
    }

    /// Alpha's roots and CRLs with a second CA of the partner's beside its own: `extra`'s
    /// certificate in the roots file, its CRL revoking `revoked` in the CRL file.
    fn alpha_bundle_with(&self, extra: &Ca, revoked: &[u64]) {
        self.dir.write(
            "alpha-ca.pem",
            format!("{}{}", self.alpha.cert.cert_pem, extra.cert.cert_pem),
        );
        self.dir.write(
            "alpha.crl",
            format!(
                "{}{}",
                self.alpha.crl(&[self.alpha_revoked]).unwrap(),
                extra.crl(revoked).unwrap()
            ),
        );
    }

    fn config(&self, versions: &[&str]) -> Config {
        let peer =
            |name: &str, server_name: &str, ca: &str, crl: Option<&str>, trusted: &[&str]| {
                PeerConfig {
                    name: name.into(),
                    domains: vec![format!("{name}.example")],
                    server_name: server_name.into(),
                    roots: self.dir.join(ca),
                    crls: crl.map(|c| vec![self.dir.join(c)]).unwrap_or_default(),
                    trusted_names: trusted.iter().map(|s| s.to_string()).collect(),
                    ..PeerConfig::default()
                }
            };
        let mut cfg = Config {
            listen: vec![ListenConfig {
                kind: ListenKind::Mtls,
                ..ListenConfig::default()
            }],
            ..Config::default()
        };
        cfg.tls.versions = versions.iter().map(|s| s.to_string()).collect();
        cfg.tls.certificate = vec![
            CertConfig {
                cert: self.dir.join("server.pem"),
                key: self.dir.join("server.key"),
                sni: vec!["sip.example.com".into()],
            },
            CertConfig {
                cert: self.dir.join("other.pem"),
                key: self.dir.join("other.key"),
                // Written absolute and in capitals: SNI arrives lower case, without the dot.
                sni: vec!["Sip.Other-Domain.Example.".into()],
            },
        ];
        cfg.peer = vec![
            peer(
                "alpha",
                "sip.alpha.example",
                "alpha-ca.pem",
                Some("alpha.crl"),
                &["sip.alpha.example", "sip.alpha-cn.example"],
            ),
            peer(
                "beta",
                "sip.beta.example",
                "beta-ca.pem",
                Some("beta.crl"),
                &["sip.beta.example"],
            ),
            // Gamma shares Alpha's CA but has no CRL: unknown revocation status, denied.
            peer(
                "gamma",
                "sip.gamma.example",
                "alpha-ca.pem",
                None,
                &["sip.gamma.example"],
            ),
            // Zeta shares Alpha's CA and CRL.
            peer(
                "zeta",
                "sip.zeta.example",
                "alpha-ca.pem",
                Some("alpha.crl"),
                &["sip.zeta.example"],
            ),
        ];
        cfg.peer.push(PeerConfig {
            name: "wild".into(),
            server_name: "sip.wild.example".into(),
            roots: self.dir.join("beta-ca.pem"),
            crls: vec![self.dir.join("beta.crl")],
            trusted_names: vec!["sip.wild.example".into()],
            allow_wildcards: true,
            unknown_revocation: UnknownRevocation::Deny,
            ..PeerConfig::default()
        });
        let errors = cfg.validate(std::path::Path::new("test.toml"));
        assert!(errors.is_empty(), "{errors:?}");
        cfg
    }

    fn policy(&self, versions: &[&str]) -> TlsPolicy {
        TlsPolicy::load(&self.config(versions)).expect("policy loads")
    }

    fn ours_roots(&self) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        r.add(self.ours.cert.der.clone()).unwrap();
        Arc::new(r)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn versions(v: &str) -> Vec<&'static rustls::SupportedProtocolVersion> {
    match v {
        "1.2" => vec![&rustls::version::TLS12],
        _ => vec![&rustls::version::TLS13],
    }
}

fn key_of(i: &Issued) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(i.key_pem.as_bytes()).unwrap()
}

/// A partner's client connecting to our mtls listener, presenting `cert` (or nothing).
fn partner_client(w: &World, v: &str, cert: Option<&Issued>) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions(v))
        .unwrap()
        .with_root_certificates(w.ours_roots());
    Arc::new(match cert {
        Some(c) => b
            .with_client_auth_cert(vec![c.der.clone()], key_of(c))
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

/// A partner's server we connect to, presenting `chain` (leaf first) and requiring our
/// client certificate.
fn partner_server_chain(
    w: &World,
    v: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    sni_seen: Arc<Mutex<Option<String>>>,
) -> Arc<ServerConfig> {
    #[derive(Debug)]
    struct Recorder(Arc<CertifiedKey>, Arc<Mutex<Option<String>>>);
    impl ResolvesServerCert for Recorder {
        fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            *self.1.lock().unwrap() = hello.server_name().map(str::to_string);
            Some(self.0.clone())
        }
    }
    let p = provider();
    let ck = CertifiedKey::from_der(chain, key, &p).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(w.ours_roots(), p.clone())
            .build()
            .unwrap();
    Arc::new(
        ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&versions(v))
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Recorder(Arc::new(ck), sni_seen))),
    )
}

/// Moves records between the two sessions, one record at a time as the engine reads them,
/// until both are established or one fails. Returns (client result, server result).
fn transfer(
    client: &mut TlsSession,
    server: &mut TlsSession,
) -> (Result<(), rustls::Error>, Result<(), rustls::Error>) {
    fn pass(from: &mut TlsSession, to: &mut TlsSession) -> Result<bool, rustls::Error> {
        let out = from.take_outgoing();
        if out.is_empty() {
            return Ok(false);
        }
        let mut rest = &out[..];
        while !rest.is_empty() {
            let n = to.read_hint().min(rest.len());
            to.receive(&rest[..n])?;
            rest = &rest[n..];
        }
        Ok(true)
    }
    for _ in 0..50 {
        let a = match pass(client, server) {
            Ok(moved) => moved,
            Err(e) => {
                // The server failed; let its alert reach the client.
                let _ = pass(server, client);
                return (Ok(()), Err(e));
            }
        };
        let b = match pass(server, client) {
            Ok(moved) => moved,
            Err(e) => {
                let _ = pass(client, server);
                return (Err(e), Ok(()));
            }
        };
        if !a && !b {
            break;
        }
    }
    (Ok(()), Ok(()))
}

/// Inbound: a partner presenting `cert` connects to our mtls listener.
fn inbound(w: &World, policy: &TlsPolicy, v: &str, cert: Option<&Issued>) -> Result<(), Rejection> {
    inbound_as(policy, partner_client(w, v, cert), cert)
}

/// [`inbound`] with a partner's client configuration of the caller's making (a chain).
fn inbound_as(
    policy: &TlsPolicy,
    client: Arc<ClientConfig>,
    cert: Option<&Issued>,
) -> Result<(), Rejection> {
    let mut s = TlsSession::server(policy.peers.clone().unwrap()).unwrap();
    let mut c =
        TlsSession::client(client, ServerName::try_from("sip.example.com").unwrap()).unwrap();
    let (cr, sr) = transfer(&mut c, &mut s);
    if let Err(e) = sr {
        let (r, detail) = sipring::tls::classify(&e);
        if let Some(d) = detail {
            // The log line an operator sees names the reason, what was presented and the issuer.
            let line = d.to_string();
            assert!(line.starts_with(r.label()), "{line}");
            if let Some(c) = cert {
                let id = sipring::tls::verify::summarize(&c.der).unwrap();
                assert!(line.contains(&id.issuer), "{line}");
            }
        }
        return Err(r);
    }
    cr.expect("client side");
    assert!(
        !s.is_handshaking() && !c.is_handshaking(),
        "handshake did not complete"
    );
    Ok(())
}

/// Outbound: we connect to `peer`, which presents `cert`.
fn outbound(
    w: &World,
    policy: &TlsPolicy,
    v: &str,
    peer: &str,
    cert: &Issued,
) -> Result<Option<String>, Rejection> {
    outbound_chain(w, policy, v, peer, vec![cert.der.clone()], key_of(cert))
}

/// [`outbound`] to a partner server presenting a chain (leaf first).
fn outbound_chain(
    w: &World,
    policy: &TlsPolicy,
    v: &str,
    peer: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Option<String>, Rejection> {
    let sni = Arc::new(Mutex::new(None));
    let (cc, name) = policy.outbound.get(peer).cloned().expect("peer configured");
    let mut c = TlsSession::client(cc, name).unwrap();
    let mut s = TlsSession::server(partner_server_chain(w, v, chain, key, sni.clone())).unwrap();
    let (cr, sr) = transfer(&mut c, &mut s);
    if let Err(e) = cr {
        return Err(sipring::tls::classify(&e).0);
    }
    sr.expect("partner server accepted our certificate");
    assert!(!c.is_handshaking());
    let seen = sni.lock().unwrap().clone();
    Ok(seen)
}

/// Writes Alpha's CRL file with the two lists `a` and `b` in each order and runs `check`
/// on the policy loaded from it, with the order's name.
fn in_both_orders(w: &World, a: (&str, &str), b: (&str, &str), check: impl Fn(&TlsPolicy, &str)) {
    for (first, second) in [(a, b), (b, a)] {
        w.dir.write("alpha.crl", format!("{}{}", first.1, second.1));
        check(&w.policy(&["1.3"]), &format!("{} list first", first.0));
    }
}

fn spec(name: &str) -> Spec {
    Spec::server(name)
}

#[test]
fn inbound_partner_acceptance_and_every_rejection_reason() {
    let w = World::new();
    for v in ["1.3", "1.2"] {
        let policy = w.policy(&["1.2", "1.3"]);
        let alpha = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
        assert_eq!(inbound(&w, &policy, v, Some(&alpha)), Ok(()), "TLS {v}");
        // clientAuth is not required: a serverAuth-only certificate is fine (public CAs, 2026).
        let server_only = w
            .alpha
            .issue(&Spec {
                usage: Usage::ServerOnly,
                ..spec("sip.alpha.example")
            })
            .unwrap();
        assert_eq!(
            inbound(&w, &policy, v, Some(&server_only)),
            Ok(()),
            "TLS {v} serverAuth-only"
        );
        // RFC 5924: a SIP domain certificate (id-kp-sipDomain), or one for any purpose.
        for usage in [Usage::SipDomain, Usage::Any] {
            let c = w
                .alpha
                .issue(&Spec {
                    usage,
                    ..spec("sip.alpha.example")
                })
                .unwrap();
            assert_eq!(
                inbound(&w, &policy, v, Some(&c)),
                Ok(()),
                "TLS {v} {usage:?}"
            );
            assert_eq!(
                outbound(&w, &policy, v, "alpha", &c),
                Ok(Some("sip.alpha.example".into())),
                "TLS {v} {usage:?}, dialled"
            );
        }
        // A SIP URI SAN alone identifies the server (RFC 5922).
        let uri_only = w
            .alpha
            .issue(&Spec {
                dns: vec![],
                ..spec("sip.alpha.example")
            })
            .unwrap();
        assert_eq!(
            inbound(&w, &policy, v, Some(&uri_only)),
            Ok(()),
            "TLS {v} sip URI only"
        );
        // CN only when there is no SAN.
        let cn_only = w
            .alpha
            .issue(&Spec {
                dns: vec![],
                uris: vec![],
                ..spec("sip.alpha-cn.example")
            })
            .unwrap();
        assert_eq!(
            inbound(&w, &policy, v, Some(&cn_only)),
            Ok(()),
            "TLS {v} CN only"
        );
        // ... but a CN is ignored when SANs exist.
        let cn_ignored = w
            .alpha
            .issue(&Spec {
                dns: vec!["sip.nobody.example".into()],
                uris: vec![],
                ..spec("sip.alpha.example")
            })
            .unwrap();
        assert_eq!(
            inbound(&w, &policy, v, Some(&cn_ignored)),
            Err(Rejection::NameNotTrusted),
            "TLS {v}"
        );

        let cases: Vec<(&str, Option<Issued>, Rejection)> = vec![
            ("no certificate", None, Rejection::NoCertificate),
            (
                "unknown CA",
                Some(w.rogue.issue(&spec("sip.alpha.example")).unwrap()),
                Rejection::UnknownIssuer,
            ),
            (
                "beta's root for alpha's name",
                Some(w.beta.issue(&spec("sip.alpha.example")).unwrap()),
                Rejection::WrongPartnerRoot,
            ),
            (
                "expired",
                Some(
                    w.alpha
                        .issue(&Spec {
                            valid_from: Duration::days(-30),
                            valid_until: Duration::days(-1),
                            ..spec("sip.alpha.example")
                        })
                        .unwrap(),
                ),
                Rejection::Expired,
            ),
            (
                "not yet valid",
                Some(
                    w.alpha
                        .issue(&Spec {
                            valid_from: Duration::days(2),
                            valid_until: Duration::days(30),
                            ..spec("sip.alpha.example")
                        })
                        .unwrap(),
                ),
                Rejection::NotYetValid,
            ),
            (
                "name not on any list",
                Some(w.alpha.issue(&spec("sip.mallory.example")).unwrap()),
                Rejection::NameNotTrusted,
            ),
            (
                "wrong EKU",
                Some(
                    w.alpha
                        .issue(&Spec {
                            usage: Usage::CodeSigning,
                            ..spec("sip.alpha.example")
                        })
                        .unwrap(),
                ),
                Rejection::BadEku,
            ),
            (
                "no CRL for gamma",
                Some(w.alpha.issue(&spec("sip.gamma.example")).unwrap()),
                Rejection::UnknownRevocation,
            ),
            (
                // A stranger naming gamma: an unknown issuer, not gamma's missing CRL (the
                // operator was told to fix the CRL settings of an impersonation).
                "a stranger naming gamma",
                Some(w.rogue.issue(&spec("sip.gamma.example")).unwrap()),
                Rejection::UnknownIssuer,
            ),
            (
                "wildcard without permission",
                Some(
                    w.alpha
                        .issue(&Spec {
                            dns: vec!["*.alpha.example".into()],
                            uris: vec![],
                            ..spec("x")
                        })
                        .unwrap(),
                ),
                Rejection::NameNotTrusted,
            ),
        ];
        for (what, cert, want) in cases {
            assert_eq!(
                inbound(&w, &policy, v, cert.as_ref()),
                Err(want),
                "TLS {v}: {what}"
            );
        }
        // Wildcards where the partner allows them.
        let wild = w
            .beta
            .issue(&Spec {
                dns: vec!["*.wild.example".into()],
                uris: vec![],
                ..spec("x")
            })
            .unwrap();
        assert_eq!(
            inbound(&w, &policy, v, Some(&wild)),
            Ok(()),
            "TLS {v}: allowed wildcard"
        );
    }
}

#[test]
fn the_mtls_certificate_request_names_the_partners_cas_unless_told_not_to() {
    /// A partner's client that records the CA names our CertificateRequest gave it.
    #[derive(Debug)]
    struct Hints(Arc<CertifiedKey>, Arc<Mutex<Vec<Vec<u8>>>>);
    impl rustls::client::ResolvesClientCert for Hints {
        fn resolve(
            &self,
            hints: &[&[u8]],
            _: &[rustls::SignatureScheme],
        ) -> Option<Arc<CertifiedKey>> {
            *self.1.lock().unwrap() = hints.iter().map(|h| h.to_vec()).collect();
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }
    let w = World::new();
    let alpha = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    // A distinguished name holds its CN's bytes as they are.
    let names = |seen: &[Vec<u8>], cn: &str| {
        seen.iter()
            .any(|h| h.windows(cn.len()).any(|w| w == cn.as_bytes()))
    };
    for v in ["1.3", "1.2"] {
        for hints in [true, false] {
            let mut cfg = w.config(&["1.2", "1.3"]);
            cfg.tls.partner_ca_hints = hints;
            let policy = TlsPolicy::load(&cfg).expect("policy loads");
            let seen = Arc::new(Mutex::new(vec![b"untouched".to_vec()]));
            let ck = CertifiedKey::from_der(vec![alpha.der.clone()], key_of(&alpha), &provider())
                .unwrap();
            let client = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&versions(v))
                .unwrap()
                .with_root_certificates(w.ours_roots())
                .with_client_cert_resolver(Arc::new(Hints(Arc::new(ck), seen.clone())));
            // The partner is authenticated either way.
            assert_eq!(
                inbound_as(&policy, Arc::new(client), Some(&alpha)),
                Ok(()),
                "TLS {v}, hints {hints}"
            );
            let seen = seen.lock().unwrap().clone();
            if hints {
                assert!(names(&seen, "Alpha CA"), "TLS {v}: {seen:?}");
                assert!(names(&seen, "Beta CA"), "TLS {v}: {seen:?}");
                assert!(!names(&seen, "Rogue CA"), "TLS {v}: {seen:?}");
            } else {
                assert_eq!(seen, Vec::<Vec<u8>>::new(), "TLS {v}");
            }
        }
    }
}

#[test]
fn a_partner_is_the_one_whose_roots_verified_it_and_a_san_hides_the_cn() {
    let w = World::new();
    for v in ["1.3", "1.2"] {
        let policy = w.policy(&["1.2", "1.3"]);
        // RFC 5922 §7.1: a subjectAltName extension holding only an IP address still means
        // the CN is not an identity (the CN is on alpha's list, the IP on nobody's).
        let ip_san = w
            .alpha
            .issue(&Spec {
                dns: vec![],
                uris: vec![],
                ips: vec![[127, 0, 0, 1].into()],
                ..spec("sip.alpha-cn.example")
            })
            .unwrap();
        assert_eq!(
            inbound(&w, &policy, v, Some(&ip_san)),
            Err(Rejection::NameNotTrusted),
            "TLS {v}: CN used despite a SAN extension"
        );
        // A certificate from beta's CA naming beta *and* alpha verifies only to beta's roots:
        // the connection is beta's, never alpha's (alpha is listed first and lists the name).
        let both = w
            .beta
            .issue(&Spec {
                dns: vec!["sip.beta.example".into(), "sip.alpha.example".into()],
                uris: vec![],
                ..spec("sip.beta.example")
            })
            .unwrap();
        assert_eq!(inbound(&w, &policy, v, Some(&both)), Ok(()), "TLS {v}");
        assert_eq!(
            policy
                .partner_of(std::slice::from_ref(&both.der))
                .as_deref(),
            Some("beta")
        );
        // Alpha and zeta share a CA (with CRLs): a certificate naming both verifies for both,
        // so whose connection it is cannot be told, and it is refused.
        let ambiguous = w
            .alpha
            .issue(&Spec {
                dns: vec!["sip.alpha.example".into(), "sip.zeta.example".into()],
                uris: vec![],
                ..spec("sip.alpha.example")
            })
            .unwrap();
        assert_eq!(
            inbound(&w, &policy, v, Some(&ambiguous)),
            Err(Rejection::NameNotTrusted),
            "TLS {v}: ambiguous partner"
        );
        assert_eq!(
            policy.partner_of(std::slice::from_ref(&ambiguous.der)),
            None
        );
        // Gamma shares alpha's CA too, without a CRL (so its own checks would fail): the
        // certificate is still both partners' by names and roots — ambiguous, not alpha's.
        let alpha_and_gamma = w
            .alpha
            .issue(&Spec {
                dns: vec!["sip.alpha.example".into(), "sip.gamma.example".into()],
                uris: vec![],
                ..spec("sip.alpha.example")
            })
            .unwrap();
        assert_eq!(
            inbound(&w, &policy, v, Some(&alpha_and_gamma)),
            Err(Rejection::NameNotTrusted),
            "TLS {v}: ambiguous whatever the CRL settings"
        );
        assert_eq!(
            policy.partner_of(std::slice::from_ref(&alpha_and_gamma.der)),
            None
        );
        // RFC 5922 §7.1: only a `sip:` URI is an identity (not `sips:`), and §7.2: no
        // wildcard in one, even for a partner that allows them in dNSNames.
        for (uri, what) in [
            ("sips:sip.alpha.example", "a sips: URI"),
            ("sip:*.wild.example", "a wildcard sip: URI"),
        ] {
            let c = w
                .alpha
                .issue(&Spec {
                    dns: vec![],
                    uris: vec![uri.into()],
                    ..spec("sip.alpha.example")
                })
                .unwrap();
            assert_eq!(
                inbound(&w, &policy, v, Some(&c)),
                Err(Rejection::NameNotTrusted),
                "TLS {v}: {what}"
            );
        }
    }
}

#[test]
fn of_two_crls_from_one_issuer_the_newest_counts() {
    // An old CRL listed first (a file a job appends to) must not hide a newer revocation.
    let w = World::new();
    let victim = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let old = w
        .alpha
        .crl_issued(&[], now - Duration::days(2), now + Duration::days(30))
        .unwrap();
    let new = w
        .alpha
        .crl_issued(
            &[victim.serial],
            now - Duration::days(1),
            now + Duration::days(30),
        )
        .unwrap();
    in_both_orders(&w, ("old", &old), ("new", &new), |policy, order| {
        assert_eq!(
            inbound(&w, policy, "1.3", Some(&victim)),
            Err(Rejection::Revoked),
            "{order}"
        );
    });
}

/// A phones' root, its sub-CA, and a phone the sub-CA issued proving `sip:carol@example.com`.
fn phones_pki() -> (Ca, Ca, Issued) {
    let root = Ca::new("Phones Root").unwrap();
    let sub = root.intermediate("Phones Sub CA").unwrap();
    let phone = sub.issue(&phone_spec()).unwrap();
    (root, sub, phone)
}

/// A phone's certificate proving `sip:carol@example.com` (client use only).
fn phone_spec() -> Spec {
    Spec {
        uris: vec!["sip:carol@example.com".into()],
        usage: Usage::ClientOnly,
        ..spec("phone.example.com")
    }
}

#[test]
fn client_certificate_chains_are_checked_whole_and_again_when_resumed() {
    let w = World::new();
    let (root, sub, phone) = phones_pki();
    w.dir.write("phones-root.pem", &root.cert.cert_pem);
    w.dir.write("phones-sub.crl", sub.crl(&[]).unwrap());
    let policy_with = |root_crl: String| {
        w.dir.write("phones-root.crl", root_crl);
        let mut cfg = w.config(&["1.2", "1.3"]);
        cfg.tls.client_roots = Some(w.dir.join("phones-root.pem"));
        cfg.tls.client_crls = vec![w.dir.join("phones-root.crl"), w.dir.join("phones-sub.crl")];
        TlsPolicy::load(&cfg).expect("policy loads")
    };
    // Only the sub-CA's CRL: nothing says whether the sub-CA itself is revoked, so every
    // phone under it would be refused — the configuration is refused instead, naming why.
    let mut cfg = w.config(&["1.3"]);
    cfg.tls.client_roots = Some(w.dir.join("phones-root.pem"));
    cfg.tls.client_crls = vec![w.dir.join("phones-sub.crl")];
    let e = TlsPolicy::load(&cfg).expect_err("an intermediate's CRL without the root's");
    assert!(e.to_string().contains("Phones Root"), "{e}");
    let good = policy_with(root.crl(&[]).unwrap());
    // The root's CRL revokes the sub-CA: what it issued is revoked with it.
    let sub_revoked = policy_with(root.crl(&[sub.cert.serial]).unwrap());
    let chain = vec![phone.der.clone(), sub.cert.der.clone()];
    let client = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions("1.3"))
            .unwrap()
            .with_root_certificates(w.ours_roots())
            .with_client_auth_cert(chain.clone(), key_of(&phone))
            .unwrap(),
    );
    let handshake = |server: Arc<ServerConfig>| {
        let mut s = TlsSession::server(server).unwrap();
        let mut c = TlsSession::client(
            client.clone(),
            ServerName::try_from("sip.example.com").unwrap(),
        )
        .unwrap();
        let (cr, sr) = transfer(&mut c, &mut s);
        if let Err(e) = sr {
            return Err(sipring::tls::classify(&e).0);
        }
        cr.expect("client side");
        // TLS 1.3 tickets arrive after the handshake: deliver them with some app data.
        s.write(b"x").unwrap();
        let _ = transfer(&mut c, &mut s);
        Ok((
            s.resumed(),
            s.peer_certificates().unwrap_or_default().to_vec(),
        ))
    };
    assert_eq!(
        handshake(sub_revoked.clients_cert_required.clone().unwrap()),
        Err(Rejection::Revoked),
        "a revoked intermediate revokes the phone"
    );
    let server = good.clients_cert_required.clone().unwrap();
    let (resumed, first) = handshake(server.clone()).expect("full handshake");
    assert!(!resumed);
    assert_eq!(good.verify_client_chain(&first), Ok(()));
    // The same session resumed: rustls hands back the ticket's chain without checking it.
    let (resumed, again) = handshake(server).expect("resumed");
    assert!(resumed, "the second handshake resumes");
    assert_eq!(again, chain);
    // What the engine checks before trusting it: the chain, verified now.
    assert_eq!(good.verify_client_chain(&again), Ok(()));
    assert_eq!(
        sub_revoked.verify_client_chain(&again),
        Err(Rejection::Revoked)
    );
}

#[test]
fn a_reload_checks_the_aors_a_phones_certificate_still_proves() {
    // The AORs a client certificate proved were taken at the handshake and stood for the
    // connection's life; a reload (client roots now carrying name constraints) re-checked
    // only the chain. The recheck now also asks whether each AOR is still proved.
    let w = World::new();
    let (root, sub, phone) = phones_pki();
    w.dir.write("phones-root.pem", &root.cert.cert_pem);
    let mut cfg = w.config(&["1.3"]);
    cfg.tls.client_roots = Some(w.dir.join("phones-root.pem"));
    cfg.tls.client_crls = Vec::new();
    let policy = TlsPolicy::load(&cfg).expect("loads");
    let chain = [phone.der.clone(), sub.cert.der.clone()];
    let proving = |aors: &[&str]| sipring_core::policy::Principal::Client {
        cert_aors: aors.iter().map(|a| a.to_string()).collect(),
    };
    assert_eq!(
        policy
            .recheck(&proving(&["sip:carol@example.com"]), false, &chain)
            .map_err(|e| e.0),
        Ok(())
    );
    // An AOR the certificate does not prove under this policy ends the connection.
    assert_eq!(
        policy
            .recheck(&proving(&["sip:mallory@example.com"]), false, &chain)
            .map_err(|e| e.0),
        Err(Rejection::NameNotTrusted)
    );
}

#[test]
fn a_client_root_its_issuers_crl_revokes_anchors_no_phone() {
    // `tls.client_roots` holding a sub-CA as well as its root: webpki anchors a phone's
    // chain at the sub-CA and checks no anchor's revocation, so phones under a sub-CA the
    // root's CRL revokes went on proving AORs without a digest. It anchors nothing now; a
    // phone presenting the sub-CA is held to the root's CRL and refused as revoked.
    let w = World::new();
    let (root, sub, phone) = phones_pki();
    w.dir.write(
        "phones-bundle.pem",
        format!("{}{}", root.cert.cert_pem, sub.cert.cert_pem),
    );
    w.dir
        .write("phones-root.crl", root.crl(&[sub.cert.serial]).unwrap());
    w.dir.write("phones-sub.crl", sub.crl(&[]).unwrap());
    let mut cfg = w.config(&["1.3"]);
    cfg.tls.client_roots = Some(w.dir.join("phones-bundle.pem"));
    cfg.tls.client_crls = vec![w.dir.join("phones-root.crl"), w.dir.join("phones-sub.crl")];
    let policy = TlsPolicy::load(&cfg).expect("loads");
    assert!(
        policy
            .verify_client_chain(std::slice::from_ref(&phone.der))
            .is_err(),
        "anchored at the revoked sub-CA"
    );
    assert_eq!(
        policy.verify_client_chain(&[phone.der.clone(), sub.cert.der.clone()]),
        Err(Rejection::Revoked)
    );
    // Not revoked: the same bundle anchors the phone.
    w.dir.write("phones-root.crl", root.crl(&[]).unwrap());
    let policy = TlsPolicy::load(&cfg).expect("loads");
    assert_eq!(
        policy.verify_client_chain(std::slice::from_ref(&phone.der)),
        Ok(())
    );
    // Every client root revoked (the sub-CA alone, its root's list revoking it): the policy
    // still loads (a refused reload kept the revoked root anchoring), and no phone passes.
    w.dir.write("phones-sub.pem", &sub.cert.cert_pem);
    w.dir
        .write("phones-root.crl", root.crl(&[sub.cert.serial]).unwrap());
    cfg.tls.client_roots = Some(w.dir.join("phones-sub.pem"));
    cfg.tls.client_crls = vec![w.dir.join("phones-root.crl")];
    let policy = TlsPolicy::load(&cfg).expect("loads with every client root revoked");
    assert!(
        policy
            .verify_client_chain(std::slice::from_ref(&phone.der))
            .is_err()
    );
}

#[test]
fn a_phones_ca_limited_to_directory_names_still_proves_its_aors() {
    // A phones-only CA "technically constrained" to its organisation's directory names:
    // no constraint of a host's type, which leaves a partner's `sip:` URI or CN nothing —
    // but a phone's AOR is not a host name, and it must still be proved.
    let root = Ca::new("Phones Root").unwrap();
    let mut org = rcgen::DistinguishedName::new();
    org.push(rcgen::DnType::OrganizationName, "sipring test PKI");
    let sub = root
        .constrained_intermediate_with(
            "Phones Org CA",
            vec![rcgen::GeneralSubtree::DirectoryName(org)],
        )
        .unwrap();
    let phone = sub.issue(&phone_spec()).unwrap();
    let aors =
        sipring::tls::verify::user_aors_within(&[phone.der.clone(), sub.cert.der.clone()], &[]);
    assert_eq!(aors, ["sip:carol@example.com"]);
}

#[test]
fn inbound_revocation_by_crl() {
    let w = World::new();
    let policy = w.policy(&["1.2", "1.3"]);
    // Issue certificates until we reach the revoked serial? No: revoke a fresh one explicitly.
    let victim = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    w.dir.write(
        "alpha.crl",
        w.alpha.crl(&[w.alpha_revoked, victim.serial]).unwrap(),
    );
    let policy2 = w.policy(&["1.2", "1.3"]);
    assert_eq!(
        inbound(&w, &policy, "1.3", Some(&victim)),
        Ok(()),
        "old CRL does not list it"
    );
    for v in ["1.3", "1.2"] {
        assert_eq!(
            inbound(&w, &policy2, v, Some(&victim)),
            Err(Rejection::Revoked),
            "TLS {v}"
        );
    }
}

#[test]
fn a_forged_crl_naming_a_root_we_hold_does_not_hide_the_genuine_one() {
    // CRLs are ranked newest-first per scope (issuer, distribution point, key id) before
    // any signature is checked: a list under Alpha's name and key id, signed by another key,
    // with a later thisUpdate (a fetch over plain HTTP, tampered), hid the genuine one, and
    // every certificate of Alpha failed as a bad CRL signature. One naming a root we hold
    // is checked against it first, and dropped.
    let w = World::new();
    let impostor = Ca::new("Alpha CA").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let forged = impostor
        .crl_claiming(
            &[],
            now - Duration::hours(1),
            now + Duration::days(30),
            w.alpha.key_id(),
        )
        .unwrap();
    let good = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    let revoked = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    let with_revoked = w.alpha.crl(&[w.alpha_revoked, revoked.serial]).unwrap();
    in_both_orders(
        &w,
        ("genuine", &with_revoked),
        ("forged", &forged),
        |policy, order| {
            assert_eq!(inbound(&w, policy, "1.3", Some(&good)), Ok(()), "{order}");
            assert_eq!(
                inbound(&w, policy, "1.3", Some(&revoked)),
                Err(Rejection::Revoked),
                "{order}"
            );
        },
    );
}

#[test]
fn a_partner_ca_re_keyed_under_its_name_keeps_its_crls_working() {
    // A CA renewing its key under the same name (as a Windows CA does) publishes one CRL
    // per key, both in the partner's file. webpki reads the first CRL whose issuer *name*
    // matches: signed by the other key, it failed every certificate of that key (as
    // bad_certificate, under `allow` too).
    let w = World::new();
    let renewed = Ca::new("Alpha CA").unwrap();
    let old_leaf = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    let new_leaf = renewed.issue(&spec("sip.alpha.example")).unwrap();
    let new_revoked = renewed.issue(&spec("sip.alpha.example")).unwrap();
    w.alpha_bundle_with(&renewed, &[new_revoked.serial]);
    let policy = w.policy(&["1.3"]);
    assert_eq!(
        inbound(&w, &policy, "1.3", Some(&old_leaf)),
        Ok(()),
        "old key"
    );
    assert_eq!(
        inbound(&w, &policy, "1.3", Some(&new_leaf)),
        Ok(()),
        "new key"
    );
    assert_eq!(
        inbound(&w, &policy, "1.3", Some(&new_revoked)),
        Err(Rejection::Revoked),
        "revoked by the new key's CRL"
    );
}

#[test]
fn a_certificate_revoked_in_one_of_its_cas_partitioned_lists_is_revoked_whatever_the_order() {
    // A CA that partitions its CRLs publishes a full list and one for end entities; both
    // cover a partner's certificate. webpki reads only the first that covers it: with the
    // full list (which does not list the victim yet) first, the revocation was never read;
    // with the partitioned one first, the retry for re-keyed CAs put the full list first
    // and took its pass.
    let w = World::new();
    let victim = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    let fine = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    let full = w.alpha.crl(&[w.alpha_revoked]).unwrap();
    let users = w
        .alpha
        .crl_for_end_entities(&[victim.serial], "http://crl.alpha.example/users.crl")
        .unwrap();
    in_both_orders(
        &w,
        ("full", &full),
        ("end-entity", &users),
        |policy, order| {
            assert_eq!(
                inbound(&w, policy, "1.3", Some(&victim)),
                Err(Rejection::Revoked),
                "{order}"
            );
            assert_eq!(inbound(&w, policy, "1.3", Some(&fine)), Ok(()), "{order}");
        },
    );
}

#[test]
fn a_revocation_is_read_whatever_the_lists_of_each_level_of_the_chain() {
    // Two levels, each with several lists: the root re-keyed under its name (the old
    // key's list first in the file) and, under the new key, an issuing CA that partitions
    // its lists (the end-entity list, which predates the revocation, first). The victim is
    // listed only in the issuing CA's full list. Retrying one issuer's lists at a time
    // never read the full list for the victim while the issuing CA's own check passed: one
    // order put the root's new list first and passed on the end-entity list.
    let w = World::new();
    let renewed = Ca::new("Alpha CA").unwrap();
    let issuing = renewed.intermediate("Alpha Issuing CA").unwrap();
    let leaf = |issuing: &Ca| issuing.issue(&spec("sip.alpha.example")).unwrap();
    let (victim, fine) = (leaf(&issuing), leaf(&issuing));
    // Both roots; the lists written over with the four of this case.
    w.alpha_bundle_with(&renewed, &[]);
    w.dir.write(
        "alpha.crl",
        format!(
            "{}{}{}{}",
            w.alpha.crl(&[w.alpha_revoked]).unwrap(),
            issuing
                .crl_for_end_entities(&[], "http://crl.alpha.example/users.crl")
                .unwrap(),
            renewed.crl(&[]).unwrap(),
            issuing.crl(&[victim.serial]).unwrap(),
        ),
    );
    let policy = w.policy(&["1.3"]);
    let presenting = |leaf: &Issued| {
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions("1.3"))
            .unwrap()
            .with_root_certificates(w.ours_roots())
            .with_client_auth_cert(
                vec![leaf.der.clone(), issuing.cert.der.clone()],
                key_of(leaf),
            )
            .unwrap();
        inbound_as(&policy, Arc::new(client), Some(leaf))
    };
    assert_eq!(presenting(&fine), Ok(()));
    assert_eq!(presenting(&victim), Err(Rejection::Revoked));
}

#[test]
fn a_lapsed_client_root_is_told_by_the_root_that_anchors_the_chain() {
    // The lapsed-root check named the root by the presented chain's top issuer: a phone
    // could append any certificate to hide its lapsed root, a root re-keyed under the old
    // name passed for the old key, and a chain ending in a cross-signature from a lapsed
    // root was refused though a current root anchored it.
    let w = World::new();
    let phone_spec = phone_spec();
    let load = |roots: &[&Ca]| {
        let pem: String = roots.iter().map(|r| r.cert.cert_pem.clone()).collect();
        w.dir.write("phones-roots.pem", &pem);
        let mut cfg = w.config(&["1.3"]);
        cfg.tls.client_roots = Some(w.dir.join("phones-roots.pem"));
        cfg.tls.client_crls = Vec::new();
        TlsPolicy::load(&cfg).expect("policy loads")
    };
    let lapsed = Ca::with_validity("Phones CA", Duration::days(-1)).unwrap();
    let phone = lapsed.issue(&phone_spec).unwrap();
    // Any certificate appended.
    let p = load(&[&lapsed]);
    let unrelated = Ca::new("Unrelated").unwrap();
    assert_eq!(
        p.verify_client_chain(&[phone.der.clone(), unrelated.cert.der.clone()]),
        Err(Rejection::Expired)
    );
    // The same name re-keyed: the old key's phones are not the new root's.
    let rekeyed = Ca::new("Phones CA").unwrap();
    let p = load(&[&lapsed, &rekeyed]);
    assert_eq!(
        p.verify_client_chain(std::slice::from_ref(&phone.der)),
        Err(Rejection::Expired)
    );
    let current = rekeyed.issue(&phone_spec).unwrap();
    assert_eq!(
        p.verify_client_chain(std::slice::from_ref(&current.der)),
        Ok(())
    );
    // A current root anchors it, whatever the presented chain ends with.
    let now = Ca::new("Phones CA 2").unwrap();
    let old = Ca::with_validity("Old CA", Duration::days(-1)).unwrap();
    let p = load(&[&now, &old]);
    let phone = now.issue(&phone_spec).unwrap();
    let stray = old.intermediate("Stray").unwrap();
    assert_eq!(
        p.verify_client_chain(&[phone.der.clone(), stray.cert.der.clone()]),
        Ok(())
    );
}

#[test]
fn a_chain_built_again_on_the_current_root_is_read_against_its_crls() {
    // While a client root is out of date, a chain the verifier passed is built again on the
    // roots that hold. That path may pass through certificates the verifier's did not: here
    // the phones' sub-CA cross-signed by the current root, a cross-signature the current
    // root's list revokes. The rebuild read no CRLs, so the phone passed.
    let w = World::new();
    let phone_spec = phone_spec();
    let old = Ca::with_validity("Old Phones Root", Duration::days(-1)).unwrap();
    let new = Ca::new("New Phones Root").unwrap();
    let sub = old.intermediate("Phones Sub CA").unwrap();
    let cross = sub.cross_signed_by(&new).unwrap();
    let phone = sub.issue(&phone_spec).unwrap();
    let chain = [phone.der.clone(), sub.cert.der.clone(), cross.der.clone()];
    let load = |new_crl: String| {
        w.dir.write(
            "phones-roots.pem",
            format!("{}{}", old.cert.cert_pem, new.cert.cert_pem),
        );
        w.dir.write(
            "phones.crl",
            format!(
                "{}{}{}",
                old.crl(&[]).unwrap(),
                new_crl,
                sub.crl(&[]).unwrap()
            ),
        );
        let mut cfg = w.config(&["1.3"]);
        cfg.tls.client_roots = Some(w.dir.join("phones-roots.pem"));
        cfg.tls.client_crls = vec![w.dir.join("phones.crl")];
        TlsPolicy::load(&cfg).expect("policy loads")
    };
    assert_eq!(
        load(new.crl(&[]).unwrap()).verify_client_chain(&chain),
        Ok(())
    );
    assert_eq!(
        load(new.crl(&[cross.serial]).unwrap()).verify_client_chain(&chain),
        Err(Rejection::Revoked)
    );
    // The current root's list past its nextUpdate: unknown status, as everywhere else (it
    // read as an expired certificate).
    let stale = new.crl_next_update(&[], Duration::days(-1)).unwrap();
    assert_eq!(
        load(stale).verify_client_chain(&chain),
        Err(Rejection::UnknownRevocation)
    );
}

#[test]
fn a_chain_with_more_intermediates_than_any_real_one_is_refused_unread() {
    // Each presented CA named after a trusted root costs a signature check with that root's
    // key, once per order of CRLs: a hundred junk intermediates held a shard's thread for a
    // second or more per handshake. More than eight are refused before any is read.
    let w = World::new();
    let phone_spec = phone_spec();
    let root = Ca::new("Phones CA").unwrap();
    w.dir.write("phones-roots.pem", &root.cert.cert_pem);
    let mut cfg = w.config(&["1.3"]);
    cfg.tls.client_roots = Some(w.dir.join("phones-roots.pem"));
    cfg.tls.client_crls = Vec::new();
    let p = TlsPolicy::load(&cfg).expect("policy loads");
    let sub = root.intermediate("Phones Sub CA").unwrap();
    let phone = sub.issue(&phone_spec).unwrap();
    let chain = |junk: usize| {
        let mut c = vec![phone.der.clone(), sub.cert.der.clone()];
        c.extend(std::iter::repeat_n(sub.cert.der.clone(), junk));
        c
    };
    assert_eq!(p.verify_client_chain(&chain(7)), Ok(()));
    assert_eq!(
        p.verify_client_chain(&chain(8)),
        Err(Rejection::BadCertificate)
    );
}

#[test]
fn a_lapsed_client_root_authenticates_no_phone() {
    // webpki keeps no anchor's validity: a `tls.client_roots` CA past its notAfter went on
    // authenticating phones (a certificate proving an AOR skips digest). Partner roots
    // were already held to theirs. Its expiry is also when phones' connections are checked
    // again.
    let w = World::new();
    let phone_spec = phone_spec();
    let load = |root: &Ca| {
        w.dir.write("phones-root.pem", &root.cert.cert_pem);
        let mut cfg = w.config(&["1.3"]);
        cfg.tls.client_roots = Some(w.dir.join("phones-root.pem"));
        cfg.tls.client_crls = Vec::new();
        TlsPolicy::load(&cfg).expect("policy loads")
    };
    let current = Ca::new("Phones CA").unwrap();
    let p = load(&current);
    let phone = current.issue(&phone_spec).unwrap();
    assert_eq!(
        p.verify_client_chain(std::slice::from_ref(&phone.der)),
        Ok(())
    );
    let lapsed = Ca::with_validity("Phones CA", Duration::days(-1)).unwrap();
    let p = load(&lapsed);
    let phone = lapsed.issue(&phone_spec).unwrap();
    assert_eq!(
        p.verify_client_chain(std::slice::from_ref(&phone.der)),
        Err(Rejection::Expired)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(p.client_anchor_expiries.len(), 1);
    let lapsed_at = p.client_anchor_expiries[0];
    assert!((now - 2 * 86_400..now).contains(&lapsed_at), "{lapsed_at}");
}

#[test]
fn client_certificates_under_a_ca_with_several_lists_are_checked_against_each() {
    // The same two cases for phones' certificates (rustls's client verifier reads only the
    // first list that covers a certificate, too): a CA that partitions its lists, and a CA
    // re-keyed under its name with one list per key.
    let w = World::new();
    let phone_spec = || Spec {
        uris: vec!["sip:carol@example.com".into()],
        usage: Usage::ClientOnly,
        ..spec("phone.example.com")
    };
    let policy = |roots: String, crls: String| {
        w.dir.write("phones-root.pem", roots);
        w.dir.write("phones.crl", crls);
        let mut cfg = w.config(&["1.3"]);
        cfg.tls.client_roots = Some(w.dir.join("phones-root.pem"));
        cfg.tls.client_crls = vec![w.dir.join("phones.crl")];
        TlsPolicy::load(&cfg).expect("policy loads")
    };
    let ca = Ca::new("Phones CA").unwrap();
    let victim = ca.issue(&phone_spec()).unwrap();
    let fine = ca.issue(&phone_spec()).unwrap();
    let full = ca.crl(&[]).unwrap();
    let users = ca
        .crl_for_end_entities(&[victim.serial], "http://crl.example.com/phones.crl")
        .unwrap();
    for (order, crls) in [
        ("full list first", format!("{full}{users}")),
        ("end-entity list first", format!("{users}{full}")),
    ] {
        let p = policy(ca.cert.cert_pem.clone(), crls);
        assert_eq!(
            p.verify_client_chain(std::slice::from_ref(&victim.der)),
            Err(Rejection::Revoked),
            "{order}"
        );
        assert_eq!(
            p.verify_client_chain(std::slice::from_ref(&fine.der)),
            Ok(()),
            "{order}"
        );
    }
    let renewed = Ca::new("Phones CA").unwrap();
    let new_phone = renewed.issue(&phone_spec()).unwrap();
    let new_revoked = renewed.issue(&phone_spec()).unwrap();
    let p = policy(
        format!("{}{}", ca.cert.cert_pem, renewed.cert.cert_pem),
        format!(
            "{}{}",
            ca.crl(&[victim.serial]).unwrap(),
            renewed.crl(&[new_revoked.serial]).unwrap()
        ),
    );
    assert_eq!(
        p.verify_client_chain(std::slice::from_ref(&fine.der)),
        Ok(()),
        "old key"
    );
    assert_eq!(
        p.verify_client_chain(std::slice::from_ref(&new_phone.der)),
        Ok(()),
        "new key"
    );
    assert_eq!(
        p.verify_client_chain(std::slice::from_ref(&victim.der)),
        Err(Rejection::Revoked),
        "revoked by the old key's list"
    );
    assert_eq!(
        p.verify_client_chain(std::slice::from_ref(&new_revoked.der)),
        Err(Rejection::Revoked),
        "revoked by the new key's list"
    );
}

#[test]
fn a_sub_ca_limited_to_its_domain_cannot_name_another_partner_by_uri_or_cn() {
    // Alpha and Zeta share Alpha's root, as carriers under one federation root do; Alpha's
    // sub-CA may issue only names under alpha.example (nameConstraints). webpki holds the
    // chain's dNSNames to that, but not a `sip:` URI's host or a CN, which RFC 5922 makes
    // identities: a certificate from Alpha's sub-CA naming only `sip:sip.zeta.example`, or
    // only CN=sip.zeta.example, was Zeta.
    let (w, sub) = alpha_with_sub_ca();
    let policy = w.policy(&["1.3"]);
    sub_ca_names_only_its_domain(&w, &policy, &sub, true);
    // A dNSName outside the constraint: webpki refuses the chain itself.
    assert!(
        inbound_with(&w, &policy, &sub, spec("sip.zeta.example"), true).is_err(),
        "dNSName"
    );
}

/// A world where Alpha's root has a sub-CA limited to alpha.example (nameConstraints), both
/// with their CRLs in `alpha.crl`.
fn alpha_with_sub_ca() -> (World, Ca) {
    let w = World::new();
    let sub = w
        .alpha
        .constrained_intermediate("Alpha Sub CA", &["alpha.example"])
        .unwrap();
    w.dir.write(
        "alpha.crl",
        format!(
            "{}{}",
            w.alpha.crl(&[w.alpha_revoked]).unwrap(),
            sub.crl(&[]).unwrap()
        ),
    );
    (w, sub)
}

#[test]
fn a_ca_presented_beside_the_path_does_not_narrow_a_partners_names() {
    // Beta's SBC sends the whole federation bundle as its chain, Alpha's constrained sub-CA
    // among it: webpki builds Beta's path without it, but its `alpha.example` constraint
    // dropped every identity of Beta's leaf, refused as name_not_trusted.
    let (w, sub) = alpha_with_sub_ca();
    let policy = w.policy(&["1.3"]);
    let leaf = w.beta.issue(&spec("sip.beta.example")).unwrap();
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions("1.3"))
        .unwrap()
        .with_root_certificates(w.ours_roots())
        .with_client_auth_cert(vec![leaf.der.clone(), sub.cert.der.clone()], key_of(&leaf))
        .unwrap();
    assert_eq!(inbound_as(&policy, Arc::new(client), Some(&leaf)), Ok(()));
    // On Alpha's own path it still binds.
    sub_ca_names_only_its_domain(&w, &policy, &sub, true);
}

#[test]
fn a_decoy_ca_of_the_sub_cas_name_does_not_lift_its_name_constraints() {
    // Alpha's sub-CA is limited to alpha.example; webpki holds only dNSName SANs to that,
    // so `sip:` URI and CN identities are held to it by sipring. A decoy CA certificate
    // with the sub-CA's very name (issued by anyone, unconstrained), presented ahead of the
    // real one, stood in for it: webpki tried the decoy, failed, and verified through the
    // real sub-CA, while the name check read the decoy's (absent) constraints — and a leaf
    // naming `sip:sip.zeta.example` passed as partner Zeta.
    let (w, sub) = alpha_with_sub_ca();
    let policy = w.policy(&["1.3"]);
    let junk = Ca::new("Junk").unwrap();
    let decoy = junk.intermediate("Alpha Sub CA").unwrap();
    let as_zeta = Spec {
        dns: Vec::new(),
        uris: vec!["sip:sip.zeta.example".into()],
        ..spec("sip.alpha.example")
    };
    // A leaf presented with the decoy ahead of the real sub-CA.
    let with_decoy = |leaf: &Issued| {
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions("1.3"))
            .unwrap()
            .with_root_certificates(w.ours_roots())
            .with_client_auth_cert(
                vec![
                    leaf.der.clone(),
                    decoy.cert.der.clone(),
                    sub.cert.der.clone(),
                ],
                key_of(leaf),
            )
            .unwrap();
        inbound_as(&policy, Arc::new(client), Some(leaf))
    };
    let leaf = sub.issue(&as_zeta).unwrap();
    assert_eq!(with_decoy(&leaf), Err(Rejection::NameNotTrusted));
    // Its own name still passes through the decoy.
    let own = sub.issue(&spec("sip.alpha.example")).unwrap();
    assert_eq!(with_decoy(&own), Ok(()));
}

#[test]
fn a_ca_limited_to_addresses_names_no_partner_by_cn_or_sip_uri() {
    // A sub-CA whose only name constraint is an address range: webpki holds neither a CN
    // (it checks the subject against directory-name subtrees only) nor a `sip:` URI SAN to
    // it, and sipring read only dNSName constraints, so the CA counted as unconstrained for
    // them and a CN-only (or URI-only) certificate it issued passed as partner Zeta.
    let w = World::new();
    let net = w
        .alpha
        .constrained_intermediate_with(
            "Alpha Net CA",
            vec![rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V4(
                [10, 0, 0, 0],
                [255, 0, 0, 0],
            ))],
        )
        .unwrap();
    w.dir.write(
        "alpha.crl",
        format!(
            "{}{}",
            w.alpha.crl(&[w.alpha_revoked]).unwrap(),
            net.crl(&[]).unwrap()
        ),
    );
    let policy = w.policy(&["1.3"]);
    let cn_only = Spec {
        dns: Vec::new(),
        uris: Vec::new(),
        ..spec("sip.zeta.example")
    };
    let uri_only = Spec {
        dns: Vec::new(),
        uris: vec!["sip:sip.zeta.example".into()],
        ..spec("x")
    };
    for (what, s) in [("CN", cn_only), ("URI", uri_only)] {
        assert_eq!(
            inbound_with(&w, &policy, &net, s, true),
            Err(Rejection::NameNotTrusted),
            "{what}"
        );
    }
}

/// A certificate `sub` issued, presented with `sub`'s own certificate (`with_sub`) or alone,
/// dialling in as a partner.
fn inbound_with(
    w: &World,
    policy: &TlsPolicy,
    sub: &Ca,
    s: Spec,
    with_sub: bool,
) -> Result<(), Rejection> {
    let leaf = sub.issue(&s).unwrap();
    let mut chain = vec![leaf.der.clone()];
    if with_sub {
        chain.push(sub.cert.der.clone());
    }
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions("1.3"))
        .unwrap()
        .with_root_certificates(w.ours_roots())
        .with_client_auth_cert(chain, key_of(&leaf))
        .unwrap();
    inbound_as(policy, Arc::new(client), Some(&leaf))
}

/// Alpha's sub-CA `sub` (limited to alpha.example) vouches for Alpha's name, and neither a
/// `sip:sip.zeta.example` URI nor a CN-only sip.zeta.example it issues is Zeta, inbound or
/// outbound; `with_sub`: the peer presents the sub-CA's certificate too.
fn sub_ca_names_only_its_domain(w: &World, policy: &TlsPolicy, sub: &Ca, with_sub: bool) {
    assert_eq!(
        inbound_with(w, policy, sub, spec("sip.alpha.example"), with_sub),
        Ok(()),
        "its own name"
    );
    let uri_only = Spec {
        dns: Vec::new(),
        uris: vec!["sip:sip.zeta.example".into()],
        ..spec("sip.alpha.example")
    };
    assert_eq!(
        inbound_with(w, policy, sub, uri_only.clone(), with_sub),
        Err(Rejection::NameNotTrusted),
        "URI"
    );
    let cn_only = Spec {
        dns: Vec::new(),
        uris: Vec::new(),
        ..spec("sip.zeta.example")
    };
    assert_eq!(
        inbound_with(w, policy, sub, cn_only, with_sub),
        Err(Rejection::NameNotTrusted),
        "CN"
    );
    let leaf = sub.issue(&uri_only).unwrap();
    let mut chain = vec![leaf.der.clone()];
    if with_sub {
        chain.push(sub.cert.der.clone());
    }
    assert_eq!(
        outbound_chain(w, policy, "1.3", "zeta", chain, key_of(&leaf)),
        Err(Rejection::NameMismatch),
        "outbound"
    );
}

#[test]
fn a_sub_ca_given_as_a_root_is_held_to_its_constraints_and_its_revocation() {
    // A federation bundle as a partner's roots: the root and the carriers' sub-CAs. webpki
    // anchors a chain at the sub-CA itself (anchors first), holds only dNSName SANs to an
    // anchor's name constraints, and checks no anchor's revocation. Alpha's sub-CA (limited
    // to alpha.example) issuing `sip:sip.zeta.example`, presented alone, was Zeta.
    let (w, sub) = alpha_with_sub_ca();
    w.dir.write(
        "alpha-ca.pem",
        format!("{}{}", w.alpha.cert.cert_pem, sub.cert.cert_pem),
    );
    let policy = w.policy(&["1.3"]);
    sub_ca_names_only_its_domain(&w, &policy, &sub, false);
    // The root's CRL revokes the sub-CA: the sub-CA anchors nothing (it anchored
    // everything it issued, revoked or not), and the policy still loads — the load used to
    // fail, so the reload after the CRL job fetched that list was refused and the old
    // policy kept the revoked sub-CA, and every older list, in force.
    w.dir.write(
        "alpha.crl",
        format!(
            "{}{}",
            w.alpha.crl(&[w.alpha_revoked, sub.cert.serial]).unwrap(),
            sub.crl(&[]).unwrap()
        ),
    );
    let policy = TlsPolicy::load(&w.config(&["1.3"])).expect("loads");
    for with_sub in [false, true] {
        assert!(
            inbound_with(&w, &policy, &sub, spec("sip.alpha.example"), with_sub).is_err(),
            "issued by the revoked sub-CA (presented with it: {with_sub})"
        );
    }
    let good = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    assert_eq!(inbound(&w, &policy, "1.3", Some(&good)), Ok(()));
}

#[test]
fn a_root_outside_its_validity_anchors_nothing() {
    // webpki keeps no validity for a trust anchor: a partner's expired root still anchored
    // its chains. Refused as expired now (not as an unknown issuer).
    let w = World::new();
    let lapsed = Ca::with_validity("Lapsed Root", Duration::days(-1)).unwrap();
    w.alpha_bundle_with(&lapsed, &[]);
    let policy = w.policy(&["1.3"]);
    let by_lapsed = lapsed.issue(&spec("sip.alpha.example")).unwrap();
    assert_eq!(
        inbound(&w, &policy, "1.3", Some(&by_lapsed)),
        Err(Rejection::Expired)
    );
    // The partner's current root still anchors.
    let good = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    assert_eq!(inbound(&w, &policy, "1.3", Some(&good)), Ok(()));
    // A link up before a root lapses is verified again when it does: the root is never
    // presented, so its notAfter was not among the times a link's chain is checked at.
    let soon = Ca::with_validity("Soon Root", Duration::days(3)).unwrap();
    w.dir.write(
        "alpha-ca.pem",
        format!("{}{}", w.alpha.cert.cert_pem, soon.cert.cert_pem),
    );
    let policy = w.policy(&["1.3"]);
    let soon_after = sipring::tls::verify::summarize(soon.cert.der.as_ref())
        .unwrap()
        .not_after;
    assert!(policy.anchor_expiries.contains(&soon_after));
    let leaf = soon.issue(&spec("sip.alpha.example")).unwrap();
    let chain =
        sipring::conn::PeerChain::of(std::slice::from_ref(&leaf.der), 0, &policy.anchor_expiries)
            .unwrap();
    assert_eq!(
        chain.expires.get(),
        soon_after,
        "checked again when its root lapses"
    );
}

#[test]
fn a_crl_past_its_next_update_is_no_crl() {
    // A CRL file nobody refreshed: it cannot say what was revoked since it was due, so under
    // the default policy (unknown status denied) a certificate it does not list is refused
    // as of unknown status. Before, a stale CRL was read as current.
    let w = World::new();
    let fresh = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    assert_eq!(
        inbound(&w, &w.policy(&["1.3"]), "1.3", Some(&fresh)),
        Ok(())
    );
    w.dir.write(
        "alpha.crl",
        w.alpha
            .crl_next_update(&[w.alpha_revoked], Duration::days(-1))
            .unwrap(),
    );
    assert_eq!(
        inbound(&w, &w.policy(&["1.3"]), "1.3", Some(&fresh)),
        Err(Rejection::UnknownRevocation)
    );
}

#[test]
fn a_policy_reports_the_due_dates_of_the_crls_it_loaded() {
    // The CRL gauge and warnings came from a second read of the files after the policy
    // was built: a job that replaced a CRL between the two had them describe a CRL other
    // than the one in force (a lapsing one reported as fresh, no alert). The policy now
    // carries the due dates of the very CRLs it enforces.
    let w = World::new();
    // `crl_next_update` makes a CRL due that many days from now.
    let due = |days: i64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        now + days * 86_400
    };
    w.dir.write(
        "alpha.crl",
        w.alpha
            .crl_next_update(&[w.alpha_revoked], Duration::days(1))
            .unwrap(),
    );
    let cfg = w.config(&["1.3"]);
    let policy = TlsPolicy::load(&cfg).expect("policy loads");
    // Replaced right after the load, as a job renaming a fresh CRL into place would.
    w.dir.write(
        "alpha.crl",
        w.alpha
            .crl_next_update(&[w.alpha_revoked], Duration::days(30))
            .unwrap(),
    );
    let of = |dues: &[sipring::tls::CrlDue]| {
        dues.iter()
            .find(|d| d.file.ends_with("alpha.crl"))
            .and_then(|d| d.next)
            .unwrap()
    };
    let in_force = of(&policy.crl_dues);
    assert!((in_force - due(1)).abs() < 120, "{in_force} vs {}", due(1));
    let on_disk = of(&sipring::tls::crl_next_updates(&cfg));
    assert!((on_disk - due(30)).abs() < 120, "{on_disk} vs {}", due(30));
}

#[test]
fn outbound_partner_acceptance_and_rejections() {
    let w = World::new();
    let policy = w.policy(&["1.2", "1.3"]);
    for v in ["1.3", "1.2"] {
        let good = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
        assert_eq!(
            outbound(&w, &policy, v, "alpha", &good),
            Ok(Some("sip.alpha.example".into())),
            "TLS {v}: SNI is the partner's name"
        );
        let cases: Vec<(&str, &str, Issued, Rejection)> = vec![
            (
                "other name",
                "alpha",
                w.alpha.issue(&spec("sip.alpha2.example")).unwrap(),
                Rejection::NameMismatch,
            ),
            (
                "unknown CA",
                "alpha",
                w.rogue.issue(&spec("sip.alpha.example")).unwrap(),
                Rejection::UnknownIssuer,
            ),
            (
                "beta's root",
                "alpha",
                w.beta.issue(&spec("sip.alpha.example")).unwrap(),
                Rejection::WrongPartnerRoot,
            ),
            (
                "expired",
                "alpha",
                w.alpha
                    .issue(&Spec {
                        valid_from: Duration::days(-30),
                        valid_until: Duration::days(-1),
                        ..spec("sip.alpha.example")
                    })
                    .unwrap(),
                Rejection::Expired,
            ),
            (
                "not yet valid",
                "alpha",
                w.alpha
                    .issue(&Spec {
                        valid_from: Duration::days(2),
                        valid_until: Duration::days(9),
                        ..spec("sip.alpha.example")
                    })
                    .unwrap(),
                Rejection::NotYetValid,
            ),
            (
                "bad EKU",
                "alpha",
                w.alpha
                    .issue(&Spec {
                        usage: Usage::CodeSigning,
                        ..spec("sip.alpha.example")
                    })
                    .unwrap(),
                Rejection::BadEku,
            ),
            (
                // The server we dial must be one: a clientAuth-only certificate is not.
                "client-only EKU",
                "alpha",
                w.alpha
                    .issue(&Spec {
                        usage: Usage::ClientOnly,
                        ..spec("sip.alpha.example")
                    })
                    .unwrap(),
                Rejection::BadEku,
            ),
            (
                "another partner's name, from the CA they share",
                "zeta",
                w.alpha.issue(&spec("sip.alpha.example")).unwrap(),
                Rejection::NameMismatch,
            ),
        ];
        for (what, peer, cert, want) in cases {
            assert_eq!(
                outbound(&w, &policy, v, peer, &cert),
                Err(want),
                "TLS {v}: {what}"
            );
        }
    }
    let victim = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    w.dir
        .write("alpha.crl", w.alpha.crl(&[victim.serial]).unwrap());
    let policy = w.policy(&["1.2", "1.3"]);
    assert_eq!(
        outbound(&w, &policy, "1.3", "alpha", &victim),
        Err(Rejection::Revoked)
    );
}

#[test]
fn protocol_versions_sni_resumption_and_groups() {
    let w = World::new();
    let alpha = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    // A TLS 1.3-only server refuses a TLS 1.2-only partner.
    let only13 = w.policy(&["1.3"]);
    assert_eq!(
        inbound(&w, &only13, "1.2", Some(&alpha)),
        Err(Rejection::ProtocolVersion)
    );
    // Client listener: SNI picks the certificate, unknown SNI gets the default.
    let policy = w.policy(&["1.2", "1.3"]);
    let client_cfg = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions("1.3"))
            .unwrap()
            .with_root_certificates(w.ours_roots())
            .with_no_client_auth(),
    );
    for (sni, want) in [
        ("sip.example.com", "sip.example.com"),
        ("sip.other-domain.example", "sip.other-domain.example"),
        ("unknown.example", "sip.example.com"),
    ] {
        let mut s = TlsSession::server(policy.clients.clone()).unwrap();
        // Unknown SNI: the client would refuse the default's name, so verify names by hand.
        let mut cfg = (*client_cfg).clone();
        if sni == "unknown.example" {
            cfg.dangerous()
                .set_certificate_verifier(Arc::new(AcceptAny));
        }
        let mut c = TlsSession::client(
            Arc::new(cfg),
            ServerName::try_from(sni.to_string()).unwrap(),
        )
        .unwrap();
        let (cr, sr) = transfer(&mut c, &mut s);
        cr.unwrap();
        sr.unwrap();
        let leaf = &c.peer_certificates().unwrap()[0];
        let names = sipring::tls::verify::summarize(leaf).unwrap().identities;
        assert!(names.iter().any(|i| i.name() == want), "{sni}: {names:?}");
    }
    // Resumption: the second handshake with the same client config resumes (1.3 tickets, 1.2 IDs).
    for v in ["1.3", "1.2"] {
        let cfg = Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&versions(v))
                .unwrap()
                .with_root_certificates(w.ours_roots())
                .with_no_client_auth(),
        );
        let mut resumed = Vec::new();
        for _ in 0..2 {
            let mut s = TlsSession::server(policy.clients.clone()).unwrap();
            let mut c = TlsSession::client(
                cfg.clone(),
                ServerName::try_from("sip.example.com").unwrap(),
            )
            .unwrap();
            let (cr, sr) = transfer(&mut c, &mut s);
            cr.unwrap();
            sr.unwrap();
            // TLS 1.3 tickets arrive after the handshake: deliver them with some app data.
            s.write(b"x").unwrap();
            let _ = transfer(&mut c, &mut s);
            resumed.push(s.resumed());
        }
        assert_eq!(resumed, [false, true], "TLS {v}");
    }
    // Groups: the configured preference is honoured (X25519MLKEM768 when asked first).
    let mut cfg = w.config(&["1.3"]);
    cfg.tls.kx_groups = vec!["X25519MLKEM768".into(), "X25519".into()];
    let pq = TlsPolicy::load(&cfg).unwrap();
    let mut s = TlsSession::server(pq.clients).unwrap();
    let mut c = TlsSession::client(
        client_cfg.clone(),
        ServerName::try_from("sip.example.com").unwrap(),
    )
    .unwrap();
    let (cr, sr) = transfer(&mut c, &mut s);
    cr.unwrap();
    sr.unwrap();
    assert_eq!(s.kx_group(), Some(rustls::NamedGroup::X25519MLKEM768));
    cfg.tls.kx_groups = vec!["X25519".into()];
    let classic = TlsPolicy::load(&cfg).unwrap();
    let mut s = TlsSession::server(classic.clients).unwrap();
    let mut c =
        TlsSession::client(client_cfg, ServerName::try_from("sip.example.com").unwrap()).unwrap();
    let (cr, sr) = transfer(&mut c, &mut s);
    cr.unwrap();
    sr.unwrap();
    assert_eq!(s.kx_group(), Some(rustls::NamedGroup::X25519));
}

/// A handshake message cut into many small records (a client's choice: a big ClientHello or
/// certificate chain in 64-byte records) is still read a record at a time — a header, then
/// the rest of that record — never a byte at a time: one-byte reads of a 64 KiB ClientHello
/// kept a shard busy for a tenth of a second per connection.
#[test]
fn a_handshake_message_cut_into_small_records_is_read_a_record_at_a_time() {
    let w = World::new();
    let policy = w.policy(&["1.2", "1.3"]);
    let alpha = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
    for v in ["1.3", "1.2"] {
        let mut cfg = (*partner_client(&w, v, Some(&alpha))).clone();
        cfg.max_fragment_size = Some(64);
        let mut c = TlsSession::client(
            Arc::new(cfg),
            ServerName::try_from("sip.example.com").unwrap(),
        )
        .unwrap();
        let mut s = TlsSession::server(policy.peers.clone().unwrap()).unwrap();
        let (mut records, mut reads) = (0, 0);
        for _ in 0..20 {
            let out = c.take_outgoing();
            let mut at = 0;
            while at + 5 <= out.len() {
                records += 1;
                at += 5 + usize::from(u16::from_be_bytes([out[at + 3], out[at + 4]]));
            }
            let mut rest = &out[..];
            while !rest.is_empty() {
                let n = s.read_hint().min(rest.len());
                s.receive(&rest[..n]).unwrap();
                reads += 1;
                rest = &rest[n..];
            }
            let back = s.take_outgoing();
            if !back.is_empty() {
                c.receive(&back).unwrap();
            }
            if !s.is_handshaking() && !c.is_handshaking() {
                break;
            }
        }
        assert!(!s.is_handshaking(), "TLS {v}");
        assert!(records > 10, "TLS {v}: {records} records");
        assert!(
            reads <= 2 * records,
            "TLS {v}: {reads} reads for {records} records"
        );
    }
    // One-byte records: a 3 KiB ClientHello is more records than any handshake needs, and
    // refused as such before rustls has seen them all.
    let mut cfg = (*partner_client(&w, "1.3", Some(&alpha))).clone();
    cfg.alpn_protocols = (0..30).map(|i| vec![b'a' + i as u8; 100]).collect();
    let mut c = TlsSession::client(
        Arc::new(cfg),
        ServerName::try_from("sip.example.com").unwrap(),
    )
    .unwrap();
    let hello = c.take_outgoing();
    assert!(hello.len() > 3000);
    let mut s = TlsSession::server(policy.peers.unwrap()).unwrap();
    let body = &hello[5..];
    let mut fed = 0;
    let refused = body.iter().find_map(|&b| {
        fed += 1;
        s.receive(&[22, 3, 1, 0, 1, b]).err()
    });
    assert_eq!(
        refused.map(|e| e.to_string()),
        Some(format!(
            "unexpected error: handshake of more than {} records",
            sipring::tls::session::MAX_HANDSHAKE_RECORDS
        ))
    );
    assert_eq!(
        fed,
        sipring::tls::session::MAX_HANDSHAKE_RECORDS as usize + 1
    );
}

/// A partner's client presenting `alpha` (TLS `v`) and our mtls server, not yet connected.
fn partner_pair(
    w: &World,
    policy: &TlsPolicy,
    v: &str,
    alpha: &Issued,
) -> (TlsSession, TlsSession) {
    let s = TlsSession::server(policy.peers.clone().unwrap()).unwrap();
    let c = TlsSession::client(
        partner_client(w, v, Some(alpha)),
        ServerName::try_from("sip.example.com").unwrap(),
    )
    .unwrap();
    (c, s)
}

#[test]
fn application_data_and_close_notify_in_memory() {
    let w = World::new();
    let policy = w.policy(&["1.2", "1.3"]);
    for v in ["1.3", "1.2"] {
        let alpha = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
        let (mut c, mut s) = partner_pair(&w, &policy, v, &alpha);
        // Pipelined: the client queues a SIP message before the handshake finishes.
        c.write(b"OPTIONS sip:example.com SIP/2.0\r\n").unwrap();
        let (cr, sr) = transfer(&mut c, &mut s);
        cr.unwrap();
        sr.unwrap();
        let _ = transfer(&mut c, &mut s);
        assert_eq!(
            s.plaintext().as_slice(),
            b"OPTIONS sip:example.com SIP/2.0\r\n",
            "TLS {v}"
        );
        s.plaintext().clear();
        let big = vec![b'x'; 40_000];
        s.write(&big).unwrap();
        let _ = transfer(&mut c, &mut s);
        assert_eq!(c.plaintext().len(), 40_000);
        c.close().unwrap();
        let _ = transfer(&mut c, &mut s);
        assert_eq!(
            s.phase(),
            sipring::tls::session::Phase::PeerClosed,
            "TLS {v}"
        );
        // The peer chain is available to the engine for logs.
        let peer = s.peer_certificates().unwrap();
        assert_eq!(peer[0], alpha.der);
    }
}

/// A read holding a good record and then a bad one: the session fails, and the plaintext of
/// the good one is still there for the connection to deliver before it closes (as the
/// kernel's record layer delivers it).
#[test]
fn the_plaintext_before_a_bad_record_is_kept() {
    let w = World::new();
    let policy = w.policy(&["1.2", "1.3"]);
    for v in ["1.3", "1.2"] {
        let alpha = w.alpha.issue(&spec("sip.alpha.example")).unwrap();
        let (mut c, mut s) = partner_pair(&w, &policy, v, &alpha);
        let (cr, sr) = transfer(&mut c, &mut s);
        cr.unwrap();
        sr.unwrap();
        let _ = transfer(&mut c, &mut s);
        c.write(b"OPTIONS sip:example.com SIP/2.0\r\n").unwrap();
        let mut wire = c.take_outgoing();
        wire.extend_from_slice(&[23, 3, 3, 0, 32]);
        wire.extend_from_slice(&[0x5a; 32]);
        // (In a debug build rustls asserted here: the bad record was processed twice and a
        // second fatal alert sent.)
        assert!(s.receive(&wire).is_err(), "TLS {v}: the forged record");
        assert_eq!(
            s.plaintext().as_slice(),
            b"OPTIONS sip:example.com SIP/2.0\r\n",
            "TLS {v}"
        );
        assert!(!s.take_outgoing().is_empty(), "TLS {v}: the alert goes out");
    }
}

#[test]
fn broken_files_name_the_file() {
    let w = World::new();
    let mut cfg = w.config(&["1.3"]);
    let bad = w.dir.write(
        "bad.key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    cfg.tls.certificate[0].key = bad.clone();
    let e = TlsPolicy::load(&cfg).unwrap_err();
    assert_eq!(e.file, bad, "{e}");
    let mut cfg = w.config(&["1.3"]);
    cfg.peer[0].crls = vec![w.dir.write("bad.crl", "not a crl")];
    let e = TlsPolicy::load(&cfg).unwrap_err();
    assert!(e.file.ends_with("bad.crl"), "{e}");
    let mut cfg = w.config(&["1.3"]);
    cfg.tls.certificate[0].cert = w.dir.join("missing.pem");
    assert!(
        TlsPolicy::load(&cfg)
            .unwrap_err()
            .to_string()
            .contains("missing.pem")
    );
    // A key that does not match its certificate.
    let mut cfg = w.config(&["1.3"]);
    cfg.tls.certificate[0].key = w.dir.join("other.key");
    let e = TlsPolicy::load(&cfg).unwrap_err();
    assert!(e.reason.contains("does not match"), "{e}");
}

#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
