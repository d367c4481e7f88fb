//! What authentication costs per request: digest verification (each algorithm: nonce HMAC
//! check, HA2 and response hashes, nonce-count window), the challenge, and the whole policy
//! decision for an authenticated INVITE; plus the flow-token check of an in-dialog request.
//!
//! Run: `cargo bench -p sipring-benches --bench auth`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sipring_core::auth::{
    Algorithm, AuthConfig, Authenticator, NodeKey, Subscriber, SubscriberTable, authorization,
};
use sipring_core::policy::{FlowInfo, Policy, PolicyConfig, Principal};
use sipring_core::proxy::{Decision, Flow, Hop, Proxy, ProxyConfig};
use sipring_core::{Framing, Header, Limits, Status, parse};
use std::hint::black_box;
use std::rc::Rc;
use std::time::Instant;

/// The allocator the engine ships with (`engine/src/main.rs`): measured as it runs.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn table() -> SubscriberTable {
    let mut t = SubscriberTable::default();
    for i in 0..10_000 {
        let u = format!("u{i}");
        t.insert(Subscriber {
            username: u.clone(),
            realm: "example.com".into(),
            aors: vec![format!("sip:{u}@example.com")],
            ha1: Algorithm::ALL
                .iter()
                .map(|a| (*a, a.ha1(&u, "example.com", "secret")))
                .collect(),
        });
    }
    t
}

fn bench_digest(c: &mut Criterion) {
    let store = table();
    let t0 = Instant::now();
    let realms = vec!["example.com".to_string()];
    let mut g = c.benchmark_group("digest");
    g.throughput(Throughput::Elements(1));
    for alg in [Algorithm::Sha256, Algorithm::Sha512_256, Algorithm::Md5] {
        let mut auth = Authenticator::new(
            AuthConfig {
                algorithms: Algorithm::ALL.to_vec(),
                ..AuthConfig::default()
            },
            NodeKey::new([9; 32]),
            t0,
        );
        let nonce = auth.nonce(t0, 42, "example.com");
        let ha1 = alg.ha1("u77", "example.com", "secret");
        let mut nc = 0u32;
        g.bench_function(format!("verify_{}", alg.name()), |b| {
            b.iter_batched_ref(
                || {
                    // A phone's next request on the same nonce (the count must rise); the
                    // phone's hashing is not timed.
                    nc += 1;
                    authorization(
                        alg,
                        "u77",
                        "example.com",
                        &ha1,
                        &nonce,
                        nc,
                        "0a4f113b",
                        "INVITE",
                        "sip:u78@example.com",
                    )
                },
                |v| {
                    let r = auth.verify(
                        t0,
                        42,
                        None,
                        b"INVITE",
                        b"sip:u78@example.com",
                        &|_| false,
                        &[v.as_bytes()],
                        &realms,
                        &store,
                    );
                    assert!(matches!(
                        r.verdict,
                        sipring_core::auth::Verdict::Authenticated(_)
                    ));
                    black_box(r)
                },
                BatchSize::SmallInput,
            )
        });
    }
    let auth = Authenticator::new(AuthConfig::default(), NodeKey::new([9; 32]), t0);
    g.bench_function("challenge", |b| {
        b.iter(|| black_box(auth.challenges(t0, 42, "example.com", false)))
    });
    g.finish();
}

fn bench_policy(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut policy = Policy::new(
        PolicyConfig::default(),
        NodeKey::new([9; 32]),
        t0,
        Rc::new(table()),
    );
    let info = FlowInfo {
        principal: Principal::anonymous(),
        source: Some("192.0.2.1:5061".parse().unwrap()),
        iface: None,
    };
    let domain_proxy = Proxy::new(ProxyConfig::default());
    // The nonce this shard would issue for flow 1 (the policy's key and epoch).
    let nonce = Authenticator::new(AuthConfig::default(), NodeKey::new([9; 32]), t0).nonce(
        t0,
        1,
        "example.com",
    );
    let ha1 = Algorithm::Sha256.ha1("u1", "example.com", "secret");
    let decision = Decision::Lookup {
        aor: "sip:u2@example.com".into(),
    };
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(1));
    let mut nc = 0u32;
    g.bench_function("authorize_invite_sha256", |b| {
        b.iter_batched_ref(|| {
            nc += 1;
            let creds = authorization(
                Algorithm::Sha256,
                "u1",
                "example.com",
                &ha1,
                &nonce,
                nc,
                "0a4f113b",
                "INVITE",
                "sip:u2@example.com",
            );
            format!(
                "INVITE sip:u2@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bK{nc}\r\nMax-Forwards: 70\r\nFrom: <sip:u1@example.com>;tag=a\r\nTo: <sip:u2@example.com>\r\nCall-ID: c{nc}\r\nCSeq: 1 INVITE\r\nProxy-Authorization: {creds}\r\nContent-Length: 0\r\n\r\n"
            )
        }, |text| {
            // Timed: parse, validate, the policy (digest included) — what the shard does.
            let mut h = [Header::EMPTY; 32];
            let Ok(Status::Complete(m)) =
                parse(text.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
            else {
                unreachable!()
            };
            let e = m.validate(&Limits::default()).unwrap();
            let a = policy.authorize(t0, &Flow::Conn(1), &info, &m, &e, &decision, &domain_proxy);
            assert!(matches!(a, sipring_core::policy::Authz::Allow(_)), "{a:?}");
            black_box(a)
        }, BatchSize::SmallInput)
    });
    // The same request without credentials, with authentication off: the baseline.
    let mut open = Policy::open(Instant::now());
    let plain = "INVITE sip:u2@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bK1\r\nMax-Forwards: 70\r\nFrom: <sip:u1@example.com>;tag=a\r\nTo: <sip:u2@example.com>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
    g.bench_function("authorize_invite_off", |b| {
        b.iter(|| {
            let mut h = [Header::EMPTY; 32];
            let Ok(Status::Complete(m)) = parse(
                plain.as_bytes(),
                &mut h,
                &Limits::default(),
                Framing::Stream,
            ) else {
                unreachable!()
            };
            let e = m.validate(&Limits::default()).unwrap();
            black_box(open.authorize(t0, &Flow::Conn(1), &info, &m, &e, &decision, &domain_proxy))
        })
    });
    // An in-dialog BYE on a signed route: the flow-token HMAC is checked on every one.
    let proxy = Proxy::new(ProxyConfig {
        key: NodeKey::new([9; 32]),
        ..ProxyConfig::default()
    });
    let inv = b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKa\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a\r\nTo: <sip:bob@example.com>\r\nCall-ID: dlg\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
    let mut h = [Header::EMPTY; 32];
    let Ok(Status::Complete(m)) = parse(inv, &mut h, &Limits::default(), Framing::Stream) else {
        unreachable!()
    };
    let e = m.validate(&Limits::default()).unwrap();
    let i = proxy.default_interface();
    let fwd = proxy.forward_request(
        &m,
        &e,
        "z9hG4bKsr1",
        None,
        &Hop {
            inbound: &Flow::Conn(1),
            outbound: &Flow::Conn(2),
            in_iface: &i,
            out_iface: &i,
            source: None,
            ident: &Default::default(),
            path: &[],
            overload_control: false,
            max_breadth: None,
            parties: (None, None),
        },
    );
    let fwd = String::from_utf8(fwd).unwrap();
    let rr = fwd
        .lines()
        .find_map(|l| l.strip_prefix("Record-Route: "))
        .unwrap();
    let bye = format!(
        "BYE sip:alice@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.2;branch=z9hG4bKb\r\nMax-Forwards: 70\r\nRoute: {rr}\r\nFrom: <sip:bob@example.com>;tag=b\r\nTo: <sip:alice@example.com>;tag=a\r\nCall-ID: dlg\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    );
    g.bench_function("in_dialog_signed_route", |b| {
        b.iter(|| {
            let mut h = [Header::EMPTY; 32];
            let Ok(Status::Complete(m)) =
                parse(bye.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
            else {
                unreachable!()
            };
            let e = m.validate(&Limits::default()).unwrap();
            let d = proxy.decide(&m, &e, &Flow::Conn(2), None);
            assert_eq!(d, Decision::ToFlow(Flow::Conn(1)));
            black_box(d)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_digest, bench_policy);
criterion_main!(benches);
