//! Per-shard tables and the cross-shard hop: registrar insert/lookup on a 100k-binding table,
//! a whole REGISTER (parse, validate, registrar) and a connection's close at 1,000 and at
//! 1,000,000 AORs (issue 15 #5: the registrar must not grow with its table), and one message
//! over glommio's mesh channel between two pinned executors.
//!
//! Run: `cargo bench -p sipring-benches --bench tables`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sipring_core::registrar::{Binding, BindingStore, MemoryStore, Registrar};
use std::time::{Duration, Instant};

/// The allocator the engine ships with (`engine/src/main.rs`): measured as it runs.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn binding(i: u64, now: Instant) -> Binding {
    Binding {
        contact: format!(
            "sip:u{i}@10.0.{}.{}:5061;transport=tls",
            i / 250 % 250,
            i % 250
        ),
        q: 1000,
        expires_at: now + Duration::from_secs(600),
        granted: 600,
        call_id: format!("c{i}"),
        cseq: 1,
        flow: i,
        instance: None,
        reg_id: None,
        params: String::new(),
        path: Vec::new(),
    }
}

fn bench_registrar(c: &mut Criterion) {
    let now = Instant::now();
    let mut store = MemoryStore::default();
    for i in 0..100_000u64 {
        store.put(&format!("sip:u{i}@example.com"), vec![binding(i, now)]);
    }
    let reg = Registrar::default();
    let mut g = c.benchmark_group("registrar_100k");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    // The AORs made before: a `format!` per lookup was timed with it.
    let aors: Vec<String> = (0..100_000u64)
        .map(|i| format!("sip:u{i}@example.com"))
        .collect();
    g.bench_function("lookup", |b| {
        b.iter(|| {
            i = (i + 7919) % 100_000;
            reg.lookup(now, &store, &aors[i as usize]).len()
        })
    });
    g.bench_function("insert_replace", |b| {
        b.iter_batched(
            || {
                i = (i + 7919) % 100_000;
                (format!("sip:u{i}@example.com"), vec![binding(i, now)])
            },
            |(aor, v)| store.put(&aor, v),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// A REGISTER refreshing `sip:u{i}@example.com` from flow `i` (CSeq `cseq`).
fn register_bytes(i: u64, cseq: u32) -> Vec<u8> {
    format!(
        "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.{a}.{b}:5061;branch=z9hG4bK{i}x{cseq}\r\nMax-Forwards: 70\r\nTo: <sip:u{i}@example.com>\r\nFrom: <sip:u{i}@example.com>;tag=t{i}\r\nCall-ID: c{i}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:u{i}@10.0.{a}.{b}:5061;transport=tls>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n",
        a = i / 250 % 250,
        b = i % 250
    )
    .into_bytes()
}

/// Runs one REGISTER through parse, validation and the registrar, as the owner shard does.
fn register_once(
    reg: &Registrar,
    store: &mut MemoryStore,
    now: Instant,
    bytes: &[u8],
    flow: u64,
) -> u16 {
    use sipring_core::{Framing, Header, Limits, Status, parse};
    let limits = Limits::default();
    let mut h = [Header::EMPTY; 64];
    let Ok(Status::Complete(m)) = parse(bytes, &mut h, &limits, Framing::Stream) else {
        panic!("unparseable REGISTER")
    };
    let e = m.validate(&limits).expect("valid REGISTER");
    let aor = reg.aor(&e).expect("an AOR");
    reg.handle_register(now, &m, &e, &aor, flow, store).code
}

fn bench_registrar_scale(c: &mut Criterion) {
    let mut g = c.benchmark_group("registrar_scale");
    g.throughput(Throughput::Elements(1));
    let reg = Registrar::default();
    for n in [1_000u64, 100_000, 1_000_000] {
        let now = Instant::now();
        let mut store = MemoryStore::default();
        for i in 0..n {
            store.put(&format!("sip:u{i}@example.com"), vec![binding(i, now)]);
        }
        let store = std::cell::RefCell::new(store);
        let mut i = 0u64;
        let mut cseq = 1u32;
        let mut next_flow = n;
        // A refresh of a random registered AOR: the message is built outside the timing.
        g.bench_function(format!("register_refresh/{n}"), |b| {
            b.iter_batched(
                || {
                    i = (i + 7919) % n;
                    cseq += 1;
                    (i, register_bytes(i, cseq))
                },
                |(i, bytes)| {
                    let code = register_once(&reg, &mut store.borrow_mut(), now, &bytes, i);
                    assert_eq!(code, 200);
                },
                BatchSize::SmallInput,
            )
        });
        // A connection closes: its one binding goes (the AOR keeps its other one); the rest
        // of the table is not visited.
        g.bench_function(format!("close_flow/{n}"), |b| {
            b.iter_batched(
                || {
                    i = (i + 7919) % n;
                    let aor = format!("sip:u{i}@example.com");
                    let mut store = store.borrow_mut();
                    let mut v = store.get(&aor).to_vec();
                    let mut extra = binding(i, now);
                    // A flow of its own each time (a batch may visit an AOR twice).
                    next_flow += 1;
                    extra.flow = next_flow;
                    extra.contact = format!("sip:f{next_flow}@10.9.0.1:5061;transport=tls");
                    v.push(extra);
                    store.put(&aor, v);
                    next_flow
                },
                |flow| assert_eq!(store.borrow_mut().remove_flow(flow), 1),
                BatchSize::SmallInput,
            )
        });
        assert_eq!(store.borrow().len() as u64, n, "the table kept its size");
    }
    g.finish();
}

fn bench_mesh_hop(c: &mut Criterion) {
    use glommio::channels::channel_mesh::MeshBuilder;
    let mut g = c.benchmark_group("mesh");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.bench_function("one_way_hop", |b| {
        b.iter_custom(|iters| {
            let mesh = MeshBuilder::<u64, _>::full(2, 1024);
            // Within the CPUs this process may use (an absolute id ran both executors on
            // CPU 0 under `taskset -c 1`, and panicked under a cpuset without it).
            let cpus = sipring::sys::cpus::allowed();
            let hs: Vec<_> = (0..2)
                .map(|i| {
                    let m = mesh.clone();
                    glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(
                        cpus[i % cpus.len()],
                    ))
                    .spawn(move || async move {
                        let (tx, mut rx) = m.join().await.unwrap();
                        let me = tx.peer_id();
                        let t0 = Instant::now();
                        if me == 0 {
                            for n in 0..iters {
                                tx.send_to(1, n).await.unwrap();
                            }
                        } else {
                            let streams = rx.streams();
                            let (_, r) = &streams[0];
                            for _ in 0..iters {
                                r.recv().await.unwrap();
                            }
                        }
                        (me, t0.elapsed())
                    })
                    .unwrap()
                })
                .collect();
            let results: Vec<(usize, Duration)> =
                hs.into_iter().map(|h| h.join().unwrap()).collect();
            results
                .iter()
                .find(|(me, _)| *me == 1)
                .map(|r| r.1)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_registrar,
    bench_registrar_scale,
    bench_mesh_hop
);
criterion_main!(benches);
