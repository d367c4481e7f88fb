//! Per-shard tables and the cross-shard hop: registrar insert/lookup on a 100k-binding table,
//! and one message over glommio's mesh channel between two pinned executors.
//!
//! Run: `cargo bench -p sipring-benches --bench tables`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sipring_core::registrar::{Binding, BindingStore, MemoryStore, Registrar};
use std::time::{Duration, Instant};

fn binding(i: u64, now: Instant) -> Binding {
    Binding {
        contact: format!(
            "sip:u{i}@10.0.{}.{}:5061;transport=tls",
            i / 250 % 250,
            i % 250
        ),
        q: 1000,
        expires_at: now + Duration::from_secs(600),
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
    g.bench_function("lookup", |b| {
        b.iter(|| {
            i = (i + 7919) % 100_000;
            reg.lookup(now, &store, &format!("sip:u{i}@example.com"))
                .len()
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

fn bench_mesh_hop(c: &mut Criterion) {
    use glommio::channels::channel_mesh::MeshBuilder;
    let mut g = c.benchmark_group("mesh");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.bench_function("one_way_hop", |b| {
        b.iter_custom(|iters| {
            let mesh = MeshBuilder::<u64, _>::full(2, 1024);
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let hs: Vec<_> = (0..2)
                .map(|i| {
                    let m = mesh.clone();
                    glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(i % cpus))
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

criterion_group!(benches, bench_registrar, bench_mesh_hop);
criterion_main!(benches);
