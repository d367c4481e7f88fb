//! Three sipring nodes (separate processes on 127.0.0.2–4) sharing one location service in a
//! Redis Cluster of 3 masters and 3 replicas (Debian's redis-server 7.0, on loopback ports),
//! linked by MTLS with the topology as the list of trusted servers (issue 14):
//!
//! - register on A, call from a UA on C: the call completes across nodes (INVITE, ACK and
//!   BYE both ways on the Record-Route);
//! - a subscriber whose credentials are only in the store registers;
//! - a phone that moves between nodes leaves no binding behind, also when the store could not
//!   say who held it at the move (asked again at its next REGISTER);
//! - a node whose certificate is not on the topology list is refused;
//! - `kill -9` A: calls to its user get 480 at once (not 408 after 32 s), before and after
//!   the liveness window tells the others A is dead;
//! - the user registers on B: calls reach it there;
//! - A comes back: what it registered in its previous life is not routed to, and is cleared
//!   from the store;
//! - `kill -9` the Redis master holding the user's binding: after the failover, calls go on
//!   without the user registering again (no binding of a live node is lost).
//!
//! Needs `redis-server` and `redis-cli` (apt `redis-server`; `tests/run.sh` installs it).
//! Run with `cargo test -p sipring-tests --features cluster-suite --test cluster`.

use rustls::pki_types::pem::PemObject;
use sipring::config::{ClusterConfig, NodeConfig};
use sipring::tls::pki::{Ca, Spec};
use sipring_tests::TempDir;
use sipring_tests::process::Server;
use sipring_tests::server::{Pki, config, metric, wait_metrics};
use sipring_tests::ua::{Ua, answer, hang_up, header_all, invite, method, status, tls_config};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Six redis-server processes in cluster mode, killed on drop.
struct RedisCluster {
    ports: Vec<u16>,
    procs: Vec<Option<Child>>,
    /// redis-cli's TLS arguments (`--tls --cacert …`) where the servers take TLS only.
    cli_tls: Vec<String>,
    _dir: TempDir,
}

fn bindable(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Runs the store's write script as node `node` would: `value` for its field of `key`,
/// which expires at `latest` (unix ms), in life `epoch`.
fn write_field(
    redis: &RedisCluster,
    key: &str,
    node: &str,
    value: &str,
    latest: &str,
    epoch: &str,
) -> String {
    redis_cli(
        redis.live_port(),
        &[
            "-c",
            "eval",
            sipring::cluster::WRITE_FIELD,
            "1",
            key,
            node,
            value,
            latest,
            epoch,
        ],
    )
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    redis_cli_with(&[], port, args)
}

fn redis_cli_with(tls: &[String], port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(tls)
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (apt install redis-server; tests/run.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RedisCluster {
    fn start() -> RedisCluster {
        RedisCluster::start_with(6, 1, &[], &[])
    }

    /// `n` servers, `replicas` per master; `server_tls`: redis-server's TLS arguments (its
    /// plain port then 0), `cli_tls`: redis-cli's.
    fn start_with(n: u16, replicas: u8, server_tls: &[String], cli_tls: &[String]) -> RedisCluster {
        let dir = TempDir::new("redis-cluster");
        // `n` ports whose cluster-bus ports (+10000) are free too.
        // A range of its own per cluster started in this process: the tests run at once,
        // and two that picked the same range raced to bind it.
        static STARTED: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let nth = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut base = 20_000 + ((std::process::id() % 200) as u16 * 4 + nth % 4) * 10;
        let ports = loop {
            let p: Vec<u16> = (base..base + n).collect();
            if p.iter().all(|&x| bindable(x) && bindable(x + 10_000)) {
                break p;
            }
            base += 40;
            assert!(base < 29_000, "no free port range for redis");
        };
        let mut procs = Vec::new();
        for &p in &ports {
            let d = dir.join(&p.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let log = std::fs::File::create(d.join("redis.log")).unwrap();
            let port_args: Vec<String> = if server_tls.is_empty() {
                vec!["--port".into(), p.to_string()]
            } else {
                let mut a: Vec<String> = vec!["--port".into(), "0".into()];
                a.extend(["--tls-port".into(), p.to_string()]);
                a.extend(server_tls.iter().cloned());
                a
            };
            let child = Command::new("redis-server")
                .args(&port_args)
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(&d)
                .stdout(Stdio::from(log))
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (apt install redis-server; tests/run.sh installs it)");
            procs.push(Some(child));
        }
        let cli_tls = cli_tls.to_vec();
        let cli = |p: u16, args: &[&str]| redis_cli_with(&cli_tls, p, args);
        for &p in &ports {
            wait_for(Duration::from_secs(10), "redis-server up", || {
                cli(p, &["ping"]).contains("PONG")
            });
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(&cli_tls)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let rc = RedisCluster {
            ports,
            procs,
            cli_tls,
            _dir: dir,
        };
        rc.wait_ok(Duration::from_secs(20));
        rc
    }

    fn seeds(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// Waits until every live node says `cluster_state:ok` and every slot has a master.
    fn wait_ok(&self, max: Duration) {
        wait_for(max, "redis cluster_state:ok", || {
            self.ports
                .iter()
                .zip(&self.procs)
                .filter(|(_, c)| c.is_some())
                .all(|(&p, _)| {
                    let i = redis_cli_with(&self.cli_tls, p, &["cluster", "info"]);
                    i.contains("cluster_state:ok") && i.contains("cluster_slots_ok:16384")
                })
        });
    }

    /// A port of a redis-server still running.
    fn live_port(&self) -> u16 {
        self.ports
            .iter()
            .zip(&self.procs)
            .find(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .unwrap()
    }

    /// The port of the master serving `key`'s slot.
    fn master_of(&self, key: &str) -> u16 {
        let live = self.live_port();
        let slot: u16 = redis_cli(live, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        for line in redis_cli(live, &["cluster", "nodes"]).lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port: u16 = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap();
            for r in &f[8..] {
                let (lo, hi) = match r.split_once('-') {
                    Some((a, b)) => (a.parse::<u16>().unwrap(), b.parse::<u16>().unwrap()),
                    None => match r.parse::<u16>() {
                        Ok(s) => (s, s),
                        Err(_) => continue,
                    },
                };
                if (lo..=hi).contains(&slot) {
                    return port;
                }
            }
        }
        panic!("no master for slot {slot}");
    }

    fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).unwrap();
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in self.procs.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (bounded) until `node`'s binding of `user` is in the store.
fn wait_stored(redis: &RedisCluster, user: &str, node: &str) {
    let key = format!("b:{{sip:{user}@example.com}}");
    wait_for(
        Duration::from_secs(10),
        &format!("{node}'s binding of {user} in the store"),
        || redis_cli(redis.live_port(), &["-c", "hget", &key, node]).contains("transport=tls"),
    );
}

fn wait_for(max: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + max;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One node of the cluster under test.
struct Node {
    tls: SocketAddr,
    admin: SocketAddr,
    config: std::path::PathBuf,
    server: Option<Server>,
}

impl Node {
    fn start(&mut self) {
        self.server = Some(Server::start(&self.config));
        let tls = self.tls;
        wait_for(Duration::from_secs(20), "node up", || {
            std::net::TcpStream::connect(tls).is_ok()
        });
    }

    fn kill9(&mut self) {
        if let Some(s) = &self.server {
            s.signal("KILL");
        }
        if let Some(mut s) = self.server.take() {
            let _ = s.wait_exit(5);
        }
    }

    fn metrics(&self) -> String {
        sipring_tests::server::admin_get(self.admin, "/metrics")
    }
}

struct Cluster {
    pki: Pki,
    ca_pem: Vec<rustls::pki_types::CertificateDer<'static>>,
    dir: TempDir,
    nodes: Vec<Node>,
    mtls: Vec<SocketAddr>,
}

fn free_port_on(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    fn new(seeds: &[String]) -> Cluster {
        Cluster::new_with(seeds, |_| {})
    }

    /// [`Cluster::new`], each node's `[cluster]` section edited by `edit`.
    fn new_with(seeds: &[String], edit: impl Fn(&mut ClusterConfig)) -> Cluster {
        let pki = Pki::new();
        let dir = TempDir::new("cluster");
        let ca = Ca::new("sipring cluster CA").unwrap();
        dir.write("cluster-ca.pem", &ca.cert.cert_pem);
        let names = ["node-a", "node-b", "node-c"];
        let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
        let tls: Vec<SocketAddr> = ips
            .iter()
            .map(|ip| format!("{ip}:{}", free_port_on(ip)).parse().unwrap())
            .collect();
        let mtls: Vec<SocketAddr> = ips
            .iter()
            .map(|ip| format!("{ip}:{}", free_port_on(ip)).parse().unwrap())
            .collect();
        let topology: Vec<NodeConfig> = names
            .iter()
            .zip(&mtls)
            .map(|(n, a)| NodeConfig {
                name: n.to_string(),
                address: Some(*a),
                identity: format!("{n}.example.com"),
            })
            .collect();
        // A rogue: issued by the cluster's own CA, but not on the list.
        let rogue = ca.issue(&Spec::server("node-x.example.com")).unwrap();
        dir.write("rogue.pem", &rogue.cert_pem);
        dir.write("rogue.key", &rogue.key_pem);
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let mut spec = Spec::server(&format!("{name}.example.com"));
            spec.dns.push("sip.example.com".into());
            let cert = ca.issue(&spec).unwrap();
            let pem = dir.write(
                &format!("{name}.pem"),
                format!("{}{}", cert.cert_pem, ca.cert.cert_pem),
            );
            let key = dir.write(&format!("{name}.key"), &cert.key_pem);
            let admin: SocketAddr = format!("127.0.0.1:{}", free_port_on("127.0.0.1"))
                .parse()
                .unwrap();
            let mut cfg = config(&pki);
            cfg.server.hostname = format!("{name}.example.com");
            cfg.server.domains = vec!["example.com".into()];
            cfg.server.local_hosts = vec![ips[i].into()];
            cfg.listen[0].address = tls[i];
            cfg.listen[1].address = mtls[i];
            cfg.admin.address = Some(admin);
            cfg.tls.certificate[0].cert = pem;
            cfg.tls.certificate[0].key = key;
            cfg.cluster = Some(ClusterConfig {
                node: name.to_string(),
                store: seeds.to_vec(),
                roots: dir.join("cluster-ca.pem"),
                nodes: topology.clone(),
                subscribers_key: Some("subscribers".into()),
                // Read often, so the test sees what a refresh does after the store is emptied.
                subscribers_refresh_s: 1,
                ..ClusterConfig::default()
            });
            if let Some(c) = cfg.cluster.as_mut() {
                edit(c);
            }
            let path = dir.write(&format!("{name}.toml"), toml::to_string(&cfg).unwrap());
            nodes.push(Node {
                tls: tls[i],
                admin,
                config: path,
                server: None,
            });
        }
        let ca_pem = vec![ca.cert.der.clone()];
        Cluster {
            pki,
            ca_pem,
            dir,
            nodes,
            mtls,
        }
    }

    fn ua(&self, node: usize, user: &str) -> Ua {
        let cfg = tls_config(&self.ca_pem, None, false);
        let mut u = Ua::tls(
            self.nodes[node].tls,
            cfg,
            "sip.example.com",
            user,
            "example.com",
        )
        .expect("connect");
        assert_eq!(u.login(), 200, "{user} authenticates");
        u
    }
}

/// A full call from `a` to `b` (INVITE, 180, 200, ACK, then BYE from the callee), with the
/// route sets each UA would build (RFC 3261 §12.1: the caller reverses Record-Route).
fn call(a: &mut Ua, b: &mut Ua, call_id: &str) {
    let to = format!("<sip:{}@example.com>", b.user);
    let got = invite(a, b, call_id);
    let contact = format!("sip:{}@{}", b.user, b.local);
    b.send(&answer(&got, 180, "Ringing", "b1", &contact));
    assert_eq!(a.expect_final_or_provisional("180").0, 180);
    b.send(&answer(&got, 200, "OK", "b1", &contact));
    let (s, ok) = a.expect_final_or_provisional("200");
    assert_eq!(s, 200);
    let rr = header_all(&ok, "Record-Route").expect("Record-Route");
    let hops: Vec<&str> = rr.split(", ").collect();
    assert_eq!(
        hops.len(),
        4,
        "two nodes, each with its inbound and outbound interface: {rr}"
    );
    let route: Vec<&str> = hops.iter().rev().copied().collect();
    a.send(&a.request(
        "ACK",
        &contact,
        &format!("{to};tag=b1"),
        call_id,
        1,
        &format!("Route: {}\r\n", route.join(", ")),
        None,
    ));
    assert_eq!(method(&b.expect("ACK at callee")), "ACK");
    // The callee hangs up along its own route set (Record-Route as received).
    hang_up(b, a, &got, call_id);
}

/// A MESSAGE from `a` to `user`; the callee side, if given, answers 200. Returns the final
/// status at `a`.
fn message(a: &mut Ua, user: &str, callee: Option<&mut Ua>, n: u32) -> u16 {
    let req = a.request(
        "MESSAGE",
        &format!("sip:{user}@example.com"),
        &format!("<sip:{user}@example.com>"),
        &format!("msg-{}-{n}", a.user),
        n,
        "",
        Some(("text/plain", "hi")),
    );
    a.send(&req);
    if let Some(b) = callee
        && let Some(got) = b.recv(Duration::from_secs(3))
    {
        assert_eq!(method(&got), "MESSAGE");
        b.send(&answer(
            &got,
            200,
            "OK",
            "m",
            &format!("sip:{user}@{}", b.local),
        ));
    }
    // Provisional answers, a bounded number of them, then the final one.
    for _ in 0..16 {
        let Some(r) = a.recv(Duration::from_secs(40)) else {
            return 0;
        };
        match status(&r) {
            Some(s) if s >= 200 => return s,
            _ => continue,
        }
    }
    0
}

#[test]
fn three_nodes_share_one_location_service_and_survive_a_node_and_a_redis_master() {
    let mut redis = RedisCluster::start();
    // A subscriber no node's file has, only the store.
    let entry = sipring::auth::SubscriberEntry::new(
        "roamer0",
        "example.com",
        vec![],
        &sipring_tests::ua::password_for("roamer0"),
    );
    let out = Command::new("redis-cli")
        .args(["-c", "-p", &redis.ports[0].to_string()])
        .args([
            "hset",
            "subscribers",
            "roamer0@example.com",
            &entry.to_toml(),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    // And 600 more: a hash Redis no longer keeps compact, which the nodes read a page at a
    // time (HSCAN), every page counted.
    let mut fill = Command::new("redis-cli");
    fill.args([
        "-c",
        "-p",
        &redis.ports[0].to_string(),
        "hset",
        "subscribers",
    ]);
    for i in 0..600 {
        let user = format!("filler{i}");
        let e = sipring::auth::SubscriberEntry::new(&user, "example.com", vec![], "filler-secret");
        fill.arg(format!("{user}@example.com")).arg(e.to_toml());
    }
    let out = fill.output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "600");
    let mut c = Cluster::new(&redis.seeds());
    for i in 0..3 {
        c.nodes[i].start();
    }
    for n in &c.nodes {
        n.server
            .as_ref()
            .unwrap()
            .wait_log("location store connected");
    }
    // Each node has seen the others alive.
    std::thread::sleep(Duration::from_millis(1500));

    // Register on A, call from C (once A's write-through has landed: the REGISTER is
    // answered before the store has it).
    let mut callee = c.ua(0, "callee0");
    assert_eq!(callee.register(600), 200);
    wait_stored(&redis, "callee0", "node-a");
    // The field and its key's expiry are one write: the key expires with the binding.
    let pttl: i64 = redis_cli(
        redis.live_port(),
        &["-c", "pttl", "b:{sip:callee0@example.com}"],
    )
    .trim()
    .parse()
    .unwrap();
    assert!((500_000..=600_000).contains(&pttl), "PTTL {pttl}");
    // A write of an earlier life of node A (a smaller epoch: a process that lost its name,
    // writing late) changes nothing, neither a value nor a removal.
    let key = "b:{sip:callee0@example.com}";
    let field = redis_cli(redis.live_port(), &["-c", "hget", key, "node-a"]);
    for value in ["1 9999999999999\n", ""] {
        let r = write_field(&redis, key, "node-a", value, "9999999999999", "1");
        assert_eq!(r.trim(), "0", "an earlier life's write was applied");
        assert_eq!(
            redis_cli(redis.live_port(), &["-c", "hget", key, "node-a"]),
            field
        );
    }
    // A field whose bindings all expired over ten minutes ago (a node retired, or replaced
    // under another name) goes with the next write to its key by any node; one still live
    // stays. Before, every write lengthened the key and such a field stayed for good.
    {
        let key = "b:{sip:pruned@example.com}";
        let now = sipring::cluster::unix_ms();
        let far = (now + 3_600_000).to_string();
        redis_cli(
            redis.live_port(),
            &[
                "-c",
                "hset",
                key,
                "node-gone",
                &format!("7 {}\n", now - 601_000),
                "node-live",
                &format!("7 {far}\n"),
            ],
        );
        let r = write_field(&redis, key, "node-z", &format!("1 {far}\n"), &far, "1");
        assert_eq!(r.trim(), "1");
        let mut fields: Vec<String> = redis_cli(redis.live_port(), &["-c", "hkeys", key])
            .lines()
            .map(str::to_string)
            .collect();
        fields.sort();
        assert_eq!(fields, ["node-live", "node-z"]);
        redis_cli(redis.live_port(), &["-c", "del", key]);
    }
    let mut caller = c.ua(2, "caller0");
    call(&mut caller, &mut callee, "cross-node-1");
    assert_eq!(message(&mut caller, "callee0", Some(&mut callee), 10), 200);
    // C found the callee through the store (metrics are published every few hundred ms).
    wait_metrics(c.nodes[2].admin, "C's store lookups", |m| {
        metric(m, "sipring_store_total{op=\"lookup\",result=\"found\"}").unwrap_or(0.0) >= 2.0
    });
    // An unknown user is still 404 (the store knows nobody of that name).
    assert_eq!(message(&mut caller, "nobody", None, 11), 404);
    // A subscriber known only to the store authenticates and registers on B, and C reaches it.
    let mut roamer = c.ua(1, "roamer0");
    assert_eq!(roamer.register(600), 200);
    wait_stored(&redis, "roamer0", "node-b");
    assert_eq!(message(&mut caller, "roamer0", Some(&mut roamer), 12), 200);
    // All 601 were read, not the first page's.
    let log = c.nodes[1]
        .server
        .as_ref()
        .unwrap()
        .wait_log("subscribers read from the location store");
    let line = log
        .lines()
        .find(|l| l.contains("subscribers read from the location store"))
        .unwrap();
    assert!(line.contains("601"), "{line}");

    // A second process configured as node A (a copied configuration; its own ports) must
    // not run as A: its writes and its start-up sweep would erase A's bindings. It waits
    // out the liveness key (a previous life's would expire), finds it refreshed, and exits 1.
    {
        let text = std::fs::read_to_string(&c.nodes[0].config).unwrap();
        let mut copy: sipring::config::Config = toml::from_str(&text).unwrap();
        for l in &mut copy.listen {
            l.address = format!("127.0.0.1:{}", free_port_on("127.0.0.1"))
                .parse()
                .unwrap();
        }
        copy.admin.address = Some(
            format!("127.0.0.1:{}", free_port_on("127.0.0.1"))
                .parse()
                .unwrap(),
        );
        let path = c
            .dir
            .write("node-a-copy.toml", toml::to_string(&copy).unwrap());
        let mut twin = Server::start(&path);
        assert_eq!(
            twin.wait_exit(15),
            Some(1),
            "the twin's log:\n{}",
            twin.log()
        );
        assert!(
            twin.log()
                .contains("another live process runs as this cluster node"),
            "{}",
            twin.log()
        );
        // A's binding and its calls are untouched.
        wait_stored(&redis, "callee0", "node-a");
        assert_eq!(message(&mut caller, "callee0", Some(&mut callee), 14), 200);
    }

    // A phone moves from A to B (it registers its +sip.instance at B while its connection
    // to A stays open, half-dead as far as it cares): B passes the removal to A, A drops
    // its binding (its field leaves the store), and A's own callers — a local hit before,
    // which never read the store — reach the phone on B.
    {
        let inst = ";+sip.instance=\"<urn:uuid:6d6f7665-7200-4000-8000-000000000001>\"";
        let mut old = c.ua(0, "m0");
        old.contact_params = inst.into();
        assert_eq!(old.register(600), 200);
        wait_stored(&redis, "m0", "node-a");
        let mut moved = c.ua(1, "m0");
        moved.contact_params = inst.into();
        assert_eq!(moved.register(600), 200);
        wait_stored(&redis, "m0", "node-b");
        let key = "b:{sip:m0@example.com}";
        wait_for(Duration::from_secs(10), "A's binding of m0 removed", || {
            redis_cli(redis.live_port(), &["-c", "hget", key, "node-a"])
                .trim()
                .is_empty()
        });
        // Refreshes of the binding B now holds ask the store nothing (before: a read per
        // refresh of every phone with an instance).
        let asked = |n: usize| {
            metric(
                &c.nodes[n].metrics(),
                "sipring_store_total{op=\"removal\",result=\"asked\"}",
            )
            .unwrap_or(0.0)
        };
        std::thread::sleep(Duration::from_millis(1200));
        let b0 = asked(1);
        assert!(b0 >= 1.0, "the move asked the store who else holds m0");
        for _ in 0..3 {
            assert_eq!(moved.register(600), 200);
        }
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(asked(1), b0, "a refresh asked the store");
        let mut on_a = c.ua(0, "caller1");
        assert_eq!(message(&mut on_a, "m0", Some(&mut moved), 20), 200);
        assert!(
            old.recv(Duration::from_millis(300)).is_none(),
            "the old binding on A still got it"
        );
        // The device comes back to A (its binding on B goes the same way), then unregisters
        // at B (expires=0): what A holds of that instance goes too.
        assert_eq!(old.register(600), 200);
        wait_stored(&redis, "m0", "node-a");
        wait_for(Duration::from_secs(10), "B's binding of m0 removed", || {
            redis_cli(redis.live_port(), &["-c", "hget", key, "node-b"])
                .trim()
                .is_empty()
        });
        // A third device of the user, on C, with no instance: the removal reaches A and C,
        // and neither passes it on (a node's REGISTER is never fanned out: A and C, both
        // holders, would send it to each other without end).
        let mut third = c.ua(2, "m0");
        assert_eq!(third.register(600), 200);
        wait_stored(&redis, "m0", "node-c");
        let sent = |n: usize| {
            metric(
                &c.nodes[n].metrics(),
                "sipring_store_total{op=\"removal\",result=\"sent\"}",
            )
            .unwrap_or(0.0)
        };
        // Metrics are published every few hundred ms: settled before reading.
        std::thread::sleep(Duration::from_millis(1200));
        let (a0, c0) = (sent(0), sent(2));
        let (code, _) = moved.register_with(0, "");
        assert_eq!(code, 200);
        wait_for(
            Duration::from_secs(10),
            "A's binding of m0 removed by B",
            || {
                redis_cli(redis.live_port(), &["-c", "hget", key, "node-a"])
                    .trim()
                    .is_empty()
            },
        );
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!((sent(0), sent(2)), (a0, c0), "a node passed a removal on");
        // C's device (another contact, no instance) stays.
        wait_stored(&redis, "m0", "node-c");
    }

    // A move while the store cannot answer (its master paused longer than the store
    // timeout): B cannot learn who else holds the AOR, so the removal is asked again at the
    // device's next REGISTER at B — before, it was dropped and A kept the stale binding (and
    // a refresh asks the store nothing) until it expired.
    {
        let inst = ";+sip.instance=\"<urn:uuid:6d6f7665-7200-4000-8000-000000000002>\"";
        let key = "b:{sip:m1@example.com}";
        let mut old = c.ua(0, "m1");
        old.contact_params = inst.into();
        assert_eq!(old.register(600), 200);
        wait_stored(&redis, "m1", "node-a");
        let errors = |m: &str| {
            metric(m, "sipring_store_total{op=\"removal\",result=\"error\"}").unwrap_or(0.0)
        };
        let e0 = errors(&c.nodes[1].metrics());
        let mut moved = c.ua(1, "m1");
        moved.contact_params = inst.into();
        let master = redis.master_of(key);
        let paused = Instant::now();
        assert_eq!(
            redis_cli(master, &["client", "pause", "1500", "ALL"]).trim(),
            "OK"
        );
        assert_eq!(moved.register(600), 200);
        wait_metrics(c.nodes[1].admin, "B's removal lookup failing", |m| {
            errors(m) > e0
        });
        std::thread::sleep(Duration::from_millis(1600).saturating_sub(paused.elapsed()));
        wait_stored(&redis, "m1", "node-b");
        assert!(
            !redis_cli(redis.live_port(), &["-c", "hget", key, "node-a"])
                .trim()
                .is_empty(),
            "A's binding went although B could not ask who held it"
        );
        // A query (a REGISTER without Contact) first: it removes nothing, and leaves the
        // retry to the refresh (it took it, and lost it, before).
        let mut queried = None;
        for _ in 0..2 {
            let q = String::from_utf8(moved.request(
                "REGISTER",
                "sip:example.com",
                "<sip:m1@example.com>",
                "query-m1",
                1,
                "",
                None,
            ))
            .unwrap()
            .split("\r\n")
            .filter(|l| !l.starts_with("Contact:"))
            .collect::<Vec<_>>()
            .join("\r\n");
            moved.send(q.as_bytes());
            let (s, r) = moved.expect_final_or_provisional("the query's answer");
            if s == 401 && moved.take_challenge(&r) {
                continue;
            }
            queried = Some(s);
            break;
        }
        assert_eq!(queried, Some(200));
        assert_eq!(moved.register(600), 200);
        wait_for(
            Duration::from_secs(10),
            "A's binding of m1 removed at the refresh",
            || {
                redis_cli(redis.live_port(), &["-c", "hget", key, "node-a"])
                    .trim()
                    .is_empty()
            },
        );
    }

    // A node whose certificate is not on the topology list is refused at the handshake.
    {
        let roots = c.ca_pem.clone();
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(c.dir.join("rogue.pem"))
            .unwrap()
            .map(|x| x.unwrap())
            .collect::<Vec<_>>();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(c.dir.join("rogue.key")).unwrap();
        let cfg = tls_config(&roots, Some((chain, key)), false);
        let r = Ua::tls(c.mtls[0], cfg, "node-a.example.com", "rogue", "example.com");
        // A well-formed request (one without headers is answered by nobody, accepted or
        // not): neither answered nor left open.
        let refused = match r {
            Err(_) => true,
            Ok(mut u) => {
                let opt = b"OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.9;branch=z9hG4bKrogue\r\nMax-Forwards: 70\r\nTo: <sip:example.com>\r\nFrom: <sip:rogue@example.com>;tag=r\r\nCall-ID: rogue-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
                let sent =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| u.send(opt))).is_ok();
                !(sent && u.recv(Duration::from_secs(2)).is_some())
                    && u.closed_within(Duration::from_secs(3))
            }
        };
        assert!(refused, "a node off the topology list got a link");
        // The refusal's log line names what the rogue presented.
        c.nodes[0]
            .server
            .as_ref()
            .unwrap()
            .wait_log("node-x.example.com");
    }

    // A freezes (SIGSTOP: its kernel still acknowledges, so no RST tells C's link to A
    // that A is gone, as for a host that hangs or is cut off). A MESSAGE from C to A's user
    // goes out over that link and waits. Once A's liveness key expires (3 s, then C's next
    // beat), C closes its link to A: the request fails at once, 480. It waited for its 408
    // (Timer F, 32 s), and every request over the link after it did the same until TCP
    // gave up.
    let a = c.nodes[0].server.as_ref().unwrap();
    a.signal("STOP");
    let t0 = Instant::now();
    let frozen = message(&mut caller, "callee0", None, 60);
    let took = t0.elapsed();
    a.signal("CONT");
    assert_eq!(frozen, 480, "a request to a frozen node, after {took:?}");
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    eprintln!("a request to a frozen node: {frozen} after {took:?}");
    wait_metrics(c.nodes[2].admin, "C closed its link to A", |m| {
        metric(m, "sipring_node_links_closed_total").unwrap_or(0.0) >= 1.0
    });

    // kill -9 A: its user's calls get 480 at once (the link to A is refused), and still 480
    // once A is known dead (its liveness key gone).
    c.nodes[0].kill9();
    drop(callee);
    // The other nodes' bindings are untouched: the roamer on B is reachable from C at once.
    assert_eq!(message(&mut caller, "roamer0", Some(&mut roamer), 13), 200);
    // For longer than the liveness window (3 s) plus a heartbeat: 480 throughout, first
    // because the link to A is refused, then because the store says only a dead node holds
    // the user.
    let t0 = Instant::now();
    let mut n = 100;
    let mut seen = Vec::new();
    while t0.elapsed() < Duration::from_secs(5) {
        n += 1;
        let s = message(&mut caller, "callee0", None, n);
        seen.push((t0.elapsed().as_millis(), s));
        assert_eq!(
            s, 480,
            "answers since the node's death (ms, status): {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("answers in the 5 s after the node's death (ms, status): {seen:?}");
    wait_metrics(
        c.nodes[2].admin,
        "C sees only a dead node holding the user",
        |m| metric(m, "sipring_store_total{op=\"lookup\",result=\"miss\"}").unwrap_or(0.0) >= 2.0,
    );

    // The user registers on B: calls reach it there.
    let mut callee = c.ua(1, "callee0");
    assert_eq!(callee.register(600), 200);
    // B writes the binding through to the store after answering the REGISTER; with a Redis
    // master failed over earlier, the write can land a little later: C routes to B from
    // then on (once failed here: the call went out before the write had landed).
    let t0 = Instant::now();
    let mut k = 1000;
    while message(&mut caller, "callee0", Some(&mut callee), k) != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "C never found callee0 on B"
        );
        k += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    call(&mut caller, &mut callee, "cross-node-2");

    // A comes back (a new life): what it held before is not routed to, and is cleared.
    let stale = |redis: &RedisCluster| {
        let live = redis.live_port();
        redis_cli(
            live,
            &["-c", "hget", "b:{sip:callee0@example.com}", "node-a"],
        )
    };
    assert!(
        stale(&redis).contains("transport=tls"),
        "A died with the callee's binding in the store: {}",
        stale(&redis)
    );
    c.nodes[0].start();
    c.nodes[0]
        .server
        .as_ref()
        .unwrap()
        .wait_log("location store connected");
    c.nodes[0]
        .server
        .as_ref()
        .unwrap()
        .wait_log("previous life cleared");
    assert_eq!(
        stale(&redis).trim(),
        "",
        "A's previous life is gone from the store"
    );
    std::thread::sleep(Duration::from_millis(1500));
    for i in 0..3 {
        assert_eq!(
            message(&mut caller, "callee0", Some(&mut callee), 200 + i),
            200
        );
    }
    let m = c.nodes[0].metrics();
    assert_eq!(
        metric(&m, "sipring_messages_in_total{kind=\"MESSAGE\"}").unwrap_or(0.0),
        0.0,
        "the restarted node got requests for a binding of its previous life:\n{m}"
    );

    // Kill the Redis master holding the callee's binding: after the failover, calls go on
    // without anyone registering again.
    let key = "b:{sip:callee0@example.com}";
    let master = redis.master_of(key);
    redis.kill(master);
    let t0 = Instant::now();
    // Calls while the cluster notices (node timeout 1 s) and promotes the replica.
    let (mut ok, mut errors) = (0, 0);
    while redis.master_of(key) == master {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no failover in 20 s"
        );
        match message(&mut caller, "callee0", Some(&mut callee), 300 + ok + errors) {
            200 => ok += 1,
            _ => errors += 1,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    redis.wait_ok(Duration::from_secs(20));
    eprintln!(
        "redis failover took {:?}; meanwhile {ok} MESSAGEs answered 200, {errors} not",
        t0.elapsed()
    );
    let (mut ok, mut errors) = (0, errors);
    let end = Instant::now() + Duration::from_secs(20);
    while ok < 5 {
        assert!(
            Instant::now() < end,
            "no service after failover ({errors} errors)"
        );
        match message(&mut caller, "callee0", Some(&mut callee), 400 + ok + errors) {
            200 => ok += 1,
            _ => {
                ok = 0;
                errors += 1
            }
        }
    }
    eprintln!("{errors} errors in all after the master's death, then 5 in a row");
    call(&mut caller, &mut callee, "cross-node-3");
    // Registered long before the master died, wherever its slot was: still reachable.
    assert_eq!(message(&mut caller, "roamer0", Some(&mut roamer), 500), 200);

    // The store loses everything (a restart without persistence): each node's next beat
    // finds its liveness key gone and its shards write every binding again — C reaches B's
    // users without anyone registering again. The subscriber hash is gone too: the roamer's
    // credentials, read from it before, stay.
    for (&p, proc_) in redis.ports.iter().zip(&redis.procs) {
        if proc_.is_some() {
            redis_cli(p, &["flushall"]); // masters empty; replicas follow (or refuse: READONLY)
        }
    }
    assert!(
        stale(&redis).trim().is_empty()
            && redis_cli(
                redis.live_port(),
                &["-c", "hgetall", "b:{sip:callee0@example.com}"]
            )
            .trim()
            .is_empty(),
        "the store was emptied"
    );
    c.nodes[1]
        .server
        .as_ref()
        .unwrap()
        .wait_log("liveness key was gone");
    let t0 = Instant::now();
    let mut k = 600;
    while message(&mut caller, "callee0", Some(&mut callee), k) != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "B's bindings never came back to the store"
        );
        k += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(message(&mut caller, "roamer0", Some(&mut roamer), 700), 200);
    // A refresh (every second here) has read the emptied hash by now.
    std::thread::sleep(Duration::from_millis(1500));
    c.nodes[1]
        .server
        .as_ref()
        .unwrap()
        .wait_log("the previous ones stay");
    let mut roamer2 = c.ua(1, "roamer0");
    assert_eq!(
        roamer2.register(600),
        200,
        "store-only subscriber still known"
    );

    // A graceful stop takes the node out of the cluster: its liveness key is gone when the
    // process has exited (before, it lived on for up to liveness_ms, 3 s here, and the
    // other nodes kept routing its users there).
    assert!(
        !redis_cli(redis.live_port(), &["-c", "get", "n:node-b"])
            .trim()
            .is_empty()
    );
    let mut b = c.nodes[1].server.take().unwrap();
    b.signal("TERM");
    assert_eq!(b.wait_exit(15), Some(0), "{}", b.log());
    assert_eq!(
        redis_cli(redis.live_port(), &["-c", "get", "n:node-b"]).trim(),
        "",
        "B's liveness key outlived it:\n{}",
        b.log()
    );
    assert!(b.log().contains("liveness withdrawn"), "{}", b.log());
    let _ = &c.pki;
}

#[test]
fn a_node_reaches_its_location_store_over_tls() {
    // `rediss://` seeds and `cluster.store_ca`: subscribers' HA1s and the bindings do not
    // cross the network in clear (before, TLS to Redis was not built in). The Redis servers
    // here take TLS only (their plain port is 0): a binding in the store shows the node's
    // client spoke TLS, and "previous life cleared" that the start-up sweep reached every
    // master over TLS too.
    let ca = Ca::new("redis CA").unwrap();
    let certs = TempDir::new("redis-tls");
    let mut spec = Spec::server("redis.example.com");
    spec.ips.push("127.0.0.1".parse().unwrap());
    let server = ca.issue(&spec).unwrap();
    let ca_pem = certs.write("ca.pem", &ca.cert.cert_pem);
    let cert = certs.write("redis.pem", &server.cert_pem);
    let key = certs.write("redis.key", &server.key_pem);
    let path = |p: &std::path::Path| p.display().to_string();
    let server_tls: Vec<String> = [
        "--tls-cert-file",
        &path(&cert),
        "--tls-key-file",
        &path(&key),
        "--tls-ca-cert-file",
        &path(&ca_pem),
        "--tls-cluster",
        "yes",
        "--tls-auth-clients",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cli_tls = vec!["--tls".to_string(), "--cacert".into(), path(&ca_pem)];
    let redis = RedisCluster::start_with(3, 0, &server_tls, &cli_tls);
    let seeds: Vec<String> = redis
        .ports
        .iter()
        .map(|p| format!("rediss://127.0.0.1:{p}"))
        .collect();
    let store_ca = ca_pem;
    let mut c = Cluster::new_with(&seeds, |cc| cc.store_ca = Some(store_ca.clone()));
    c.nodes[0].start();
    let a = c.nodes[0].server.as_ref().unwrap();
    a.wait_log("location store connected");
    a.wait_log("previous life cleared");
    let mut u = c.ua(0, "callee0");
    assert_eq!(u.register(600), 200);
    let key = "b:{sip:callee0@example.com}";
    wait_for(
        Duration::from_secs(10),
        "node-a's binding in the store, over TLS",
        || {
            redis_cli_with(&cli_tls, redis.ports[0], &["-c", "hget", key, "node-a"])
                .contains("transport=tls")
        },
    );
    assert!(
        !a.log().contains("partly cleared"),
        "the sweep failed somewhere: {}",
        a.log()
    );
}
