//! Shared helpers for the sipring test suites: the RFC 4475 corpus and a small in-memory
//! "what would sipring do with these bytes" pipeline built only from sipring-core.

pub mod ua;

use sipring_core::proxy::{Decision, Flow, Lookup, PeerRoute, Proxy, ProxyConfig};
use sipring_core::registrar::{MemoryStore, Registrar};
use sipring_core::response::error_response;
use sipring_core::{Framing, Header, Limits, Status, parse};
use std::path::PathBuf;
use std::time::Instant;

/// A temporary folder removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new empty folder under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "sipring-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    /// A path inside.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes a file inside and returns its path.
    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, content).expect("write");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One line of the corpus manifest.
#[derive(Debug, Clone)]
pub struct CorpusEntry {
    /// File name, e.g. `wsinv.dat`.
    pub file: String,
    /// Size in octets according to the manifest.
    pub size: usize,
    /// `valid`, `invalid`, `transaction-layer`, `application-layer`, `backward-compatibility`.
    pub class: String,
    /// RFC section, e.g. `3.1.1.1`.
    pub section: String,
}

/// The folder holding the RFC 4475 messages.
pub fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/rfc4475")
}

/// Reads `MANIFEST.txt`.
pub fn corpus() -> Vec<CorpusEntry> {
    let text = std::fs::read_to_string(corpus_dir().join("MANIFEST.txt")).expect("manifest");
    text.lines()
        .filter(|l| l.contains(".dat |") && !l.starts_with("extra/"))
        .map(|l| {
            let cols: Vec<&str> = l.split(" | ").map(str::trim).collect();
            CorpusEntry {
                file: cols[0].to_string(),
                size: cols[1].parse().expect("size"),
                class: cols[3].to_string(),
                section: cols[4].to_string(),
            }
        })
        .collect()
}

/// What sipring does with a message that arrived whole (as a datagram).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It answers with this status.
    Respond(u16),
    /// It drops it silently (bad responses, ACKs that cannot be answered).
    Drop,
    /// It routes it: look up this AOR (the corpus has no registered users).
    Lookup(String),
    /// It forwards it to this peer.
    ToPeer(String),
}

/// A registrar + proxy with the test domain `example.com`, a peer route for `example.net`.
pub struct Pipeline {
    /// Proxy core.
    pub proxy: Proxy,
    /// Registrar.
    pub registrar: Registrar,
    /// Bindings.
    pub store: MemoryStore,
    /// Parse limits.
    pub limits: Limits,
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline {
            proxy: Proxy::new(ProxyConfig {
                domains: vec!["example.com".into()],
                local_hosts: vec!["proxy.example.com".into()],
                via_host: "proxy.example.com".into(),
                via_port: 5061,
                ports: vec![5061],
                partner_interface: None,
                peers: vec![PeerRoute {
                    domain: "example.net".into(),
                    peer: "net-partner".into(),
                }],
                nodes: vec![],
                supported: vec![],
                record_route: true,
                key: sipring_core::auth::NodeKey::new([0; 32]),
            }),
            registrar: Registrar::default(),
            store: MemoryStore::default(),
            limits: Limits::default(),
        }
    }
}

impl Pipeline {
    /// Runs `bytes` through parse → validate → proxy/registrar, as a datagram.
    pub fn process(&mut self, bytes: &[u8], now: Instant) -> Outcome {
        let mut storage = vec![Header::EMPTY; 96];
        let respond_err = |e: sipring_core::ParseError| match error_response(bytes, e, b"t") {
            Some(_) => Outcome::Respond(e.response().0),
            None => Outcome::Drop,
        };
        let msg = match parse(bytes, &mut storage, &self.limits, Framing::Datagram) {
            Ok(Status::Complete(m)) => m,
            Ok(Status::Partial) => unreachable!("datagrams are never partial"),
            Err(e) => return respond_err(e),
        };
        let ess = match msg.validate(&self.limits) {
            Ok(e) => e,
            Err(e) if msg.is_request() => return respond_err(e),
            Err(_) => return Outcome::Drop,
        };
        if !msg.is_request() {
            return match self.proxy.response_branch(&ess) {
                Some(_) => Outcome::Respond(0),
                None => Outcome::Drop,
            };
        }
        match self.proxy.decide(&msg, &ess, &Flow::Conn(1), None) {
            Decision::Respond(a) => Outcome::Respond(a.code),
            Decision::Register => match self.registrar.aor(&ess) {
                Err(r) => Outcome::Respond(r.code),
                Ok(aor) => {
                    let r =
                        self.registrar
                            .handle_register(now, &msg, &ess, &aor, 1, &mut self.store);
                    Outcome::Respond(r.code)
                }
            },
            Decision::Lookup { aor } => match self
                .proxy
                .after_lookup(msg.method().unwrap(), Lookup::Unknown)
            {
                Err(Decision::Respond(a)) if a.code == 404 => Outcome::Lookup(aor),
                other => panic!("unexpected {other:?}"),
            },
            Decision::ToPeer(p) => Outcome::ToPeer(p),
            Decision::Drop(_) => Outcome::Drop,
            Decision::Refuse(d) => Outcome::Respond(d.code),
            other => panic!("unexpected decision {other:?}"),
        }
    }
}

/// A throwaway PKI (sipring's demo PKI) and the config of a 2-shard server using it.
pub mod server {
    use super::TempDir;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use sipring::config::{CertConfig, Config, ListenConfig, ListenKind, PeerConfig};
    use std::net::SocketAddr;

    /// The demo PKI in a temp dir.
    pub struct Pki {
        /// Where the files are.
        pub dir: TempDir,
    }

    impl Pki {
        /// Writes a fresh PKI for `example.com`.
        pub fn new() -> Pki {
            let dir = TempDir::new("pki");
            sipring::tls::pki::write_demo(&dir.0, "example.com").expect("pki");
            Pki { dir }
        }

        /// Certificates in a PEM file.
        pub fn certs(&self, name: &str) -> Vec<CertificateDer<'static>> {
            CertificateDer::pem_file_iter(self.dir.join(name))
                .expect("pem")
                .map(|c| c.expect("cert"))
                .collect()
        }

        /// A private key.
        pub fn key(&self, name: &str) -> PrivateKeyDer<'static> {
            PrivateKeyDer::from_pem_file(self.dir.join(name)).expect("key")
        }
    }

    impl Default for Pki {
        fn default() -> Self {
            Pki::new()
        }
    }

    /// A free loopback port, bound and released, for a server started later. Taken below
    /// the kernel's ephemeral range: a port handed out for port 0 can be handed out again,
    /// to some test's outgoing connection, before the server binds it.
    pub fn free_port() -> u16 {
        sipring::sys::sock::free_port().expect("no free port below the ephemeral range")
    }

    /// A 2-shard server config for `example.com`: TLS and MTLS listeners on ephemeral ports,
    /// admin on an ephemeral port, partner `partner` (the demo partner CA) for
    /// `partner.example.com`.
    pub fn config(pki: &Pki) -> Config {
        let d = |n: &str| pki.dir.join(n);
        let mut cfg = Config::default();
        cfg.server.shards = 2;
        cfg.server.hostname = "sip.example.com".into();
        cfg.server.local_hosts = vec!["127.0.0.1".into(), "localhost".into()];
        cfg.server.drain_timeout_s = 5;
        cfg.listen = vec![
            ListenConfig {
                kind: ListenKind::Tls,
                address: "127.0.0.1:0".parse().unwrap(),
                ..ListenConfig::default()
            },
            ListenConfig {
                kind: ListenKind::Mtls,
                address: "127.0.0.1:0".parse().unwrap(),
                ..ListenConfig::default()
            },
        ];
        cfg.tls.certificate = vec![CertConfig {
            cert: d("server.pem"),
            key: d("server.key"),
            sni: vec!["sip.example.com".into()],
        }];
        cfg.peer = vec![PeerConfig {
            name: "partner".into(),
            domains: vec!["partner.example.com".into()],
            server_name: "sip.partner.example.com".into(),
            roots: d("partner-ca.pem"),
            crls: vec![d("partner-ca.crl")],
            ..PeerConfig::default()
        }];
        cfg.admin.address = Some("127.0.0.1:0".parse().unwrap());
        cfg.auth.subscribers = Some(write_subscribers(&pki.dir, "example.com"));
        // Debug builds of many servers share two cores here: a loop that lags behind because
        // the test binary is busy elsewhere is not overload. Shedding has its own test.
        cfg.limits.overload_lag_ms = 0;
        cfg
    }

    /// Writes `subscribers-<domain>.toml` into `dir` for the test users
    /// ([`crate::ua::test_users`], password [`crate::ua::password_for`]) in `domain`, and
    /// returns its path.
    pub fn write_subscribers(dir: &TempDir, domain: &str) -> std::path::PathBuf {
        let text: String = crate::ua::test_users()
            .iter()
            .map(|u| {
                sipring::auth::SubscriberEntry::new(u, domain, vec![], &crate::ua::password_for(u))
                    .to_toml()
            })
            .collect::<Vec<_>>()
            .join("\n");
        dir.write(&format!("subscribers-{domain}.toml"), text)
    }

    /// Fetches an admin URL (`GET`) and returns the body.
    pub fn admin_get(addr: SocketAddr, path: &str) -> String {
        admin(addr, "GET", path).1
    }

    /// An admin request; returns (status line, body).
    pub fn admin(addr: SocketAddr, method: &str, path: &str) -> (String, String) {
        try_admin(addr, method, path).expect("admin")
    }

    /// [`admin`], or the error (a server under attack may refuse one for a moment).
    pub fn try_admin(
        addr: SocketAddr,
        method: &str,
        path: &str,
    ) -> std::io::Result<(String, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr)?;
        write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        Ok((
            head.lines().next().unwrap_or_default().to_string(),
            body.to_string(),
        ))
    }

    /// The value of one metric line in Prometheus text (first match of `name` exactly).
    pub fn metric(text: &str, name: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// Waits (bounded) until `f` holds on the admin metrics.
    pub fn wait_metrics(addr: SocketAddr, what: &str, f: impl Fn(&str) -> bool) -> String {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let m = try_admin(addr, "GET", "/metrics")
                .map(|(_, b)| b)
                .unwrap_or_default();
            if f(&m) {
                return m;
            }
            assert!(
                std::time::Instant::now() < end,
                "metrics never showed {what}:\n{m}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Running the real `sipring` binary.
pub mod process {
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};

    /// The `sipring` binary built by `cargo build -p sipring` (tests/run.sh builds it first).
    pub fn sipring_bin() -> PathBuf {
        bin("sipring")
    }

    /// A workspace binary from the debug build. The binaries of other packages are not
    /// built by `cargo test` for this one, so the first call in a test process builds them
    /// (`cargo build --bins`: quick when they are up to date), and a plain `cargo test`
    /// works on a fresh clone.
    pub fn bin(name: &str) -> PathBuf {
        static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        let built = BUILT.get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
            let out = Command::new(cargo)
                .args([
                    "build",
                    "--quiet",
                    "-p",
                    "sipring",
                    "-p",
                    "sipring-load",
                    "--bins",
                ])
                .arg("--manifest-path")
                .arg(&manifest)
                .output()
                .map_err(|e| format!("cargo build: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        });
        if let Err(e) = built {
            panic!("building the binaries for the process tests failed:\n{e}");
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
        let bin = target.join("debug").join(name);
        assert!(bin.exists(), "{} not found after building", bin.display());
        bin
    }

    /// A `sipring run` child process, killed on drop.
    pub struct Server {
        /// The child.
        pub child: Child,
        /// Its log (stderr+stdout) file.
        pub log: PathBuf,
    }

    impl Server {
        /// Starts `sipring run --config <config>` logging to `<config>.log`.
        pub fn start(config: &std::path::Path) -> Server {
            Server::start_under(config, &[])
        }

        /// [`Server::start`] under a wrapper command (e.g. `["taskset", "-c", "1"]`).
        pub fn start_under(config: &std::path::Path, wrapper: &[&str]) -> Server {
            let log = config.with_extension("log");
            let f = std::fs::File::create(&log).unwrap();
            let bin = sipring_bin();
            let mut cmd = match wrapper.split_first() {
                Some((w, rest)) => {
                    let mut c = Command::new(w);
                    c.args(rest).arg(&bin);
                    c
                }
                None => Command::new(&bin),
            };
            let child = cmd
                .args(["run", "--config"])
                .arg(config)
                .env("SIPRING_LOG", "info")
                .stdout(Stdio::from(f.try_clone().unwrap()))
                .stderr(Stdio::from(f))
                .spawn()
                .expect("spawn sipring");
            Server { child, log }
        }

        /// Sends a signal.
        pub fn signal(&self, sig: &str) {
            let ok = Command::new("kill")
                .args([&format!("-{sig}"), &self.child.id().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill -{sig}");
        }

        /// The log so far.
        pub fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        /// Waits (bounded) for the log to contain `needle`.
        pub fn wait_log(&self, needle: &str) -> String {
            let end = std::time::Instant::now() + std::time::Duration::from_secs(15);
            loop {
                let l = self.log();
                if l.contains(needle) {
                    return l;
                }
                assert!(
                    std::time::Instant::now() < end,
                    "log never showed {needle:?}:\n{l}"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }

        /// Waits (bounded) for the process to exit; returns its exit code.
        pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
            let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
            loop {
                if let Some(s) = self.child.try_wait().unwrap() {
                    return s.code();
                }
                if std::time::Instant::now() > end {
                    return None;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }

    /// [`thread_cpus`] once it stops changing (three equal reads 100 ms apart, within 3 s):
    /// a thread names itself and pins itself after it starts, which can be after the
    /// process says it runs.
    pub fn settled_thread_cpus(pid: u32, prefix: &str) -> Vec<(String, String)> {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let read = || {
            let mut t = thread_cpus(pid, prefix);
            t.sort();
            t
        };
        let (mut last, mut same) = (read(), 0);
        while same < 2 && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let now = read();
            same = if now == last { same + 1 } else { 0 };
            last = now;
        }
        last
    }

    /// Each thread of process `pid` whose name starts with `prefix`: (name, its
    /// `Cpus_allowed_list`).
    pub fn thread_cpus(pid: u32, prefix: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return out;
        };
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let comm = comm.trim().to_string();
            if !comm.starts_with(prefix) {
                continue;
            }
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            if let Some(l) = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            {
                out.push((comm, l.trim().to_string()));
            }
        }
        out
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
