//! Workloads for the instruction-count gate (`benches/icount/run.sh`): run one of them `N`
//! times under callgrind. The gate runs each twice (N = 0 and N = K) and divides the
//! difference by K, so process start-up and fixture set-up cancel out.
//!
//! `icount parse N`     — parse + validate the INVITE, REGISTER and 200 OK fixtures
//! `icount handshake N` — full in-memory TLS 1.3 handshakes (ECDSA P-256, X25519), client and
//!                        server, with sipring's sessions
//! `icount forward N`   — parse + validate the INVITE fixture, then the proxy's forwarding
//!                        edit (Via, Max-Forwards, Record-Route, Request-URI), as the
//!                        `proxy_edit/invite` criterion bench does

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use sipring::tls::pki::{Ca, Spec};
use sipring::tls::session::TlsSession;
use sipring_benches::{INVITE, OK_200, REGISTER, parse_and_forward};
use sipring_core::proxy::{Proxy, ProxyConfig};
use sipring_core::{Framing, Header, Limits, Status, parse};
use std::hint::black_box;
use std::sync::Arc;

/// The allocator the engine ships with (`engine/src/main.rs`): measured as it runs.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn parse_validate(bytes: &[u8]) -> usize {
    let mut h = [Header::EMPTY; 64];
    let limits = Limits::default();
    match parse(bytes, &mut h, &limits, Framing::Stream) {
        Ok(Status::Complete(m)) => m.validate(&limits).expect("valid fixture").via_count,
        other => panic!("fixture did not parse: {other:?}"),
    }
}

fn handshake(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>) {
    let name = ServerName::try_from("sip.example.com").expect("name");
    let mut c = TlsSession::client(client.clone(), name).expect("client");
    let mut s = TlsSession::server(server.clone()).expect("server");
    for _ in 0..20 {
        let a = c.take_outgoing();
        if !a.is_empty() {
            s.receive(&a).expect("server receive");
        }
        let b = s.take_outgoing();
        if !b.is_empty() {
            c.receive(&b).expect("client receive");
        }
        if a.is_empty() && b.is_empty() {
            break;
        }
    }
    assert!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake finished"
    );
}

fn tls_configs() -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
    let ca = Ca::new("icount CA").expect("CA");
    let cert = ca.issue(&Spec::server("sip.example.com")).expect("cert");
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![sipring::tls::kx_group("X25519").expect("X25519")];
    let provider = Arc::new(provider);
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key");
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der.clone()], key)
        .expect("server config");
    server.send_tls13_tickets = 0;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der.clone()).expect("root");
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();
    (Arc::new(client), Arc::new(server))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(what), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse::<u64>().ok()))
    else {
        eprintln!("usage: icount parse|forward|handshake N");
        std::process::exit(2);
    };
    match what.as_str() {
        "parse" => {
            let mut sum = 0;
            for _ in 0..n {
                for m in [INVITE, REGISTER, OK_200] {
                    sum += parse_validate(black_box(m));
                }
            }
            black_box(sum);
        }
        "forward" => {
            let proxy = Proxy::new(ProxyConfig::default());
            let mut sum = 0;
            for _ in 0..n {
                sum += parse_and_forward(&proxy, black_box(INVITE)).len();
            }
            black_box(sum);
        }
        "handshake" => {
            // Set-up (key generation included) happens for N = 0 too, so it cancels out.
            let (client, server) = tls_configs();
            for _ in 0..n {
                handshake(&client, &server);
            }
        }
        other => {
            eprintln!("unknown workload {other}");
            std::process::exit(2);
        }
    }
}
