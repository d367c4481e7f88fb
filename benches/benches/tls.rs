//! In-memory TLS with sipring's sessions (rustls unbuffered API, aws-lc-rs): full handshakes
//! (TLS 1.3 and 1.2; ECDSA P-256 and RSA-2048 server keys; X25519 and X25519MLKEM768) and the
//! record layer on a 1 KB SIP message.
//!
//! Run: `cargo bench -p sipring-benches --bench tls`
//!
//! `tls_handshake` measures the whole client+server exchange in one thread. `tls_handshake_
//! server` times the server's half alone (creating its session, reading the client's flights,
//! writing its own; the client's work is outside the clock), once with a bare rustls config
//! (one certificate, no tickets) and once with the config sipring builds from its own
//! configuration (`TlsPolicy::load`: certificate chosen by SNI, session tickets, its
//! versions and groups), so the cost sipring adds to rustls shows as a ratio. The figure to
//! compare with sockets is handshakes per second per core.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use sipring::tls::pki::{Ca, Spec};
use sipring::tls::session::TlsSession;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The allocator the engine ships with (`engine/src/main.rs`): measured as it runs.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn pass(from: &mut TlsSession, to: &mut TlsSession) -> bool {
    let out = from.take_outgoing();
    if out.is_empty() {
        return false;
    }
    to.receive(&out).expect("receive");
    true
}

fn handshake(c: &mut TlsSession, s: &mut TlsSession) {
    for _ in 0..20 {
        let a = pass(c, s);
        let b = pass(s, c);
        if !a && !b {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
}

struct Setup {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn setup(rsa: bool, tls13: bool, group: &str) -> Setup {
    let ca = Ca::new("Bench CA").unwrap();
    let cert = ca
        .issue(&Spec {
            rsa,
            ..Spec::server("sip.example.com")
        })
        .unwrap();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![sipring::tls::kx_group(group).unwrap()];
    let provider = Arc::new(provider);
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13 {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS12]
    };
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der.clone()], key)
        .unwrap();
    server.send_tls13_tickets = 0;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der.clone()).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();
    Setup {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

fn bench_handshakes(c: &mut Criterion) {
    let mut g = c.benchmark_group("tls_handshake");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    for (name, rsa, tls13, group) in [
        ("tls13_p256_x25519", false, true, "X25519"),
        ("tls13_p256_x25519mlkem768", false, true, "X25519MLKEM768"),
        ("tls13_rsa2048_x25519", true, true, "X25519"),
        ("tls12_p256_x25519", false, false, "X25519"),
        ("tls12_rsa2048_x25519", true, false, "X25519"),
    ] {
        let s = setup(rsa, tls13, group);
        let name_sn = ServerName::try_from("sip.example.com").unwrap();
        // Both sessions are made inside the timed part: making the client's starts its
        // handshake (a TLS 1.3 client generates its key share there), and that key share
        // went untimed for TLS 1.3 while TLS 1.2's was timed.
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut cl = TlsSession::client(s.client.clone(), name_sn.clone()).unwrap();
                let mut sv = TlsSession::server(s.server.clone()).unwrap();
                handshake(&mut cl, &mut sv)
            })
        });
    }
    g.finish();
}

/// One handshake, timing only the server's calls.
fn server_half(c: &mut TlsSession, server: &Arc<rustls::ServerConfig>) -> Duration {
    let t = Instant::now();
    let mut s = TlsSession::server(server.clone()).unwrap();
    let mut spent = t.elapsed();
    for _ in 0..20 {
        let out = c.take_outgoing();
        let t = Instant::now();
        if !out.is_empty() {
            s.receive(&out).expect("server receive");
        }
        let back = s.take_outgoing();
        spent += t.elapsed();
        if out.is_empty() && back.is_empty() {
            break;
        }
        if !back.is_empty() {
            c.receive(&back).expect("client receive");
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    spent
}

/// The server config sipring builds from a configuration with the demo PKI.
fn sipring_server_config() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let dir = std::env::temp_dir().join(format!("sipring-bench-tls-{}", std::process::id()));
    sipring::tls::pki::write_demo(&dir, "example.com").unwrap();
    let mut cfg = sipring::config::Config::default();
    cfg.tls.certificate = vec![sipring::config::CertConfig {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        sni: vec!["sip.example.com".into()],
    }];
    let policy = sipring::tls::TlsPolicy::load(&cfg).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in sipring::tls::load_certs(&dir.join("ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(sipring::tls::provider(&cfg));
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();
    let _ = std::fs::remove_dir_all(&dir);
    (policy.clients, Arc::new(client))
}

fn bench_server_half(c: &mut Criterion) {
    let mut g = c.benchmark_group("tls_handshake_server");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    let name = ServerName::try_from("sip.example.com").unwrap();
    let bare = setup(false, true, "X25519");
    let (sipring_server, sipring_client) = sipring_server_config();
    // The same without session tickets: what the tickets sipring issues cost a full handshake.
    let mut no_tickets = (*sipring_server).clone();
    no_tickets.send_tls13_tickets = 0;

    for (label, server, client) in [
        ("rustls_bare_tls13_p256_x25519", bare.server, bare.client),
        (
            "sipring_policy_tls13_p256_x25519",
            sipring_server,
            sipring_client.clone(),
        ),
        (
            "sipring_policy_no_tickets",
            Arc::new(no_tickets),
            sipring_client,
        ),
    ] {
        g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut cl = TlsSession::client(client.clone(), name.clone()).unwrap();
                    total += server_half(&mut cl, &server);
                }
                total
            })
        });
    }
    g.finish();
}

fn bench_records(c: &mut Criterion) {
    let s = setup(false, true, "X25519");
    let mut cl = TlsSession::client(
        s.client.clone(),
        ServerName::try_from("sip.example.com").unwrap(),
    )
    .unwrap();
    let mut sv = TlsSession::server(s.server).unwrap();
    handshake(&mut cl, &mut sv);
    let msg = sipring_benches::INVITE;
    let kb = &msg[..1024.min(msg.len())];
    let mut g = c.benchmark_group("tls_record_1KB");
    g.throughput(Throughput::Bytes(kb.len() as u64));
    g.bench_function("encrypt+decrypt", |b| {
        b.iter(|| {
            sv.write(kb).unwrap();
            let rec = sv.take_outgoing();
            cl.receive(&rec).unwrap();
            let n = cl.plaintext().len();
            cl.plaintext().clear();
            n
        })
    });
    g.finish();
}

criterion_group!(benches, bench_handshakes, bench_server_half, bench_records);
criterion_main!(benches);
