//! SIP core hot paths: parse (ours vs rsip), proxy edit, stream framing.
//!
//! Run: `cargo bench -p sipring-benches --bench sip`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sipring_benches::{INVITE, OK_200, REGISTER, parse_and_forward, stream_of};
use sipring_core::proxy::{Proxy, ProxyConfig};
use sipring_core::{Framer, Framing, Header, KeepaliveRole, Limits, Status, parse};
use std::hint::black_box;

/// The allocator the engine ships with (`engine/src/main.rs`): measured as it runs.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What the engine does per message: split the head into borrowed headers and type the
/// headers a proxy acts on (Via, From, To, Call-ID, CSeq, Max-Forwards, Contact).
/// Split into borrowed headers, names recognised, Content-Length framed: the work rsip's
/// `SipMessage::try_from` does (its headers stay untyped strings until asked).
fn parse_only(bytes: &[u8]) -> usize {
    let mut h = [Header::EMPTY; 64];
    match parse(bytes, &mut h, &Limits::default(), Framing::Stream) {
        Ok(Status::Complete(m)) => m.len() + m.headers().len(),
        other => panic!("fixture did not parse: {other:?}"),
    }
}

/// Header storage lives on the stack per parse, as in the engine.
fn parse_validate(bytes: &[u8]) -> usize {
    let mut h = [Header::EMPTY; 64];
    let limits = Limits::default();
    match parse(bytes, &mut h, &limits, Framing::Stream) {
        Ok(Status::Complete(m)) => {
            let e = m.validate(&limits).expect("valid fixture");
            m.len() + e.via_count
        }
        other => panic!("fixture did not parse: {other:?}"),
    }
}

fn bench_parse(c: &mut Criterion) {
    for (name, msg) in [
        ("invite", INVITE),
        ("register", REGISTER),
        ("200ok", OK_200),
    ] {
        let mut g = c.benchmark_group(format!("parse/{name}"));
        g.throughput(Throughput::Bytes(msg.len() as u64));
        g.bench_function("sipring", |b| b.iter(|| parse_only(black_box(msg))));
        g.bench_function("sipring+validate", |b| {
            b.iter(|| parse_validate(black_box(msg)))
        });
        g.bench_function("rsip", |b| {
            b.iter(|| rsip::SipMessage::try_from(black_box(msg)).expect("rsip parses fixture"))
        });
        g.finish();
    }
}

fn bench_edit(c: &mut Criterion) {
    let proxy = Proxy::new(ProxyConfig::default());
    let mut g = c.benchmark_group("proxy_edit/invite");
    g.throughput(Throughput::Bytes(INVITE.len() as u64));
    g.bench_function("parse+validate+forward", |bch| {
        bch.iter(|| parse_and_forward(&proxy, black_box(INVITE)))
    });
    g.finish();
}

fn bench_frame(c: &mut Criterion) {
    let stream = stream_of(64 * 1024);
    let mut g = c.benchmark_group("frame/64KiB");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("sipring", |b| {
        b.iter_batched_ref(
            || Framer::new(Limits::default(), KeepaliveRole::Server),
            |f| {
                let mut buf = &stream[..];
                let mut n = 0;
                while let Ok(Status::Complete(fr)) = f.frame(buf) {
                    buf = &buf[fr.len()..];
                    n += 1;
                    if buf.is_empty() {
                        break;
                    }
                }
                n
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_parse, bench_edit, bench_frame);
criterion_main!(benches);
