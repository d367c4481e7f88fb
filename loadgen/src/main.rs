//! `sipring-load`: drive a SIP server (sipring, Kamailio, anything RFC 3261) over TLS, MTLS or
//! TCP and report exact latency distributions. See docs/LOADGEN.md.

use clap::{Args, Parser, Subcommand};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sipring_core::subscriber_file::SubscriberEntry;
use sipring_load::run::{self, Plan, Progress, Scenario, Transport};
use sipring_load::stats;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sipring-load: a thread-per-core SIP load generator with HdrHistogram latencies.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// N user agents open connections and REGISTER at the rate (cycling: refreshes).
    Register(Common),
    /// Registered UAs send MESSAGE to each other; the receiver answers 200.
    Message(Common),
    /// INVITE → 100/180/200 → ACK, hold, BYE → 200 between registered UAs.
    Call(Common),
    /// Connect, full TLS handshake (or resumption), one OPTIONS, close — at the rate.
    Handshake(Common),
    /// Open and hold N registered connections with RFC 5626 CRLF keepalives.
    Idle(Common),
    /// Run several scenarios at once from a TOML file (`[[scenario]]` tables).
    Mix {
        /// The scenario file.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// The one-command demo: a throwaway PKI, a sipring server on every core (the `sipring`
    /// binary, started and stopped by the demo), a short register + call + message mix with
    /// live progress, the latency table, and a clean shutdown.
    Demo {
        /// Where to put the PKI, histograms, JSON and plot (default: a new temp folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seconds of load.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Calls per second.
        #[arg(long, default_value_t = 200.0)]
        cps: f64,
        /// MESSAGEs per second.
        #[arg(long, default_value_t = 1000.0)]
        mps: f64,
        /// The `sipring` binary to run (default: the one beside `sipring-load`, else `PATH`).
        #[arg(long)]
        server: Option<PathBuf>,
    },
    /// The ceiling: a server on the same runtime that answers every request with a stateless
    /// 200 (no proxying). Measure it like any server to know what the runtime can move.
    Reflect {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:5081")]
        listen: SocketAddr,
        /// Certificate chain (PEM); without it, plain TCP.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Private key (PEM).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Executors.
        #[arg(long, default_value_t = default_shards())]
        shards: usize,
    },
    /// Print a subscriber file (`[[subscriber]]` HA1 tables) for the UAs a run uses:
    /// `<prefix>0` … `<prefix><users-1>` with password `--password` (`{user}` replaced).
    Subscribers {
        /// User name prefix.
        #[arg(long, default_value = "u")]
        prefix: String,
        /// Number of users.
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// SIP domain (the realm).
        #[arg(long, default_value = "example.com")]
        domain: String,
        /// Password template.
        #[arg(long, default_value = "pw-{user}")]
        password: String,
    },
    /// Plot two or more runs' JSON summaries in one SVG.
    Compare {
        /// JSON summaries (`--json` outputs).
        files: Vec<PathBuf>,
        /// Output SVG.
        #[arg(long)]
        plot: PathBuf,
        /// Transaction type to compare.
        #[arg(long, default_value = "invite_200")]
        kind: String,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Server address; several (comma-separated: the nodes of a cluster) spread the UAs
    /// over them, UA i on address i mod their number.
    #[arg(long, default_value = "127.0.0.1:5061", value_delimiter = ',', num_args = 1..)]
    target: Vec<SocketAddr>,
    /// tls, mtls or tcp.
    #[arg(long, default_value = "tls")]
    transport: String,
    /// PEM roots to verify the server (TLS/MTLS).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate chain (MTLS), shared by all UAs.
    #[arg(long, conflicts_with = "cert_dir")]
    cert: Option<PathBuf>,
    /// Client key (MTLS).
    #[arg(long, conflicts_with = "cert_dir")]
    key: Option<PathBuf>,
    /// Client certificates per UA (MTLS): every NAME.pem with a NAME.key in this folder,
    /// sorted by name; UA i presents pair i mod their number.
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Name to verify in the server certificate and send as SNI.
    #[arg(long, default_value = "sip.example.com")]
    server_name: String,
    /// SIP domain of the users.
    #[arg(long, default_value = "example.com")]
    domain: String,
    /// User name prefix.
    #[arg(long, default_value = "u")]
    prefix: String,
    /// TLS versions: 1.2, 1.3 or both.
    #[arg(long, default_value = "both")]
    tls_version: String,
    /// Key-exchange groups, comma-separated (X25519MLKEM768, X25519, secp256r1, secp384r1).
    #[arg(long)]
    groups: Option<String>,
    /// Cipher suites by IANA name, comma-separated (default: rustls's).
    #[arg(long)]
    cipher_suites: Option<String>,
    /// Disable TLS session resumption.
    #[arg(long)]
    no_resume: bool,
    /// Executors (threads, one per core).
    #[arg(long, default_value_t = default_shards())]
    shards: usize,
    /// User agents (connections).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Target rate, per second (transactions, calls or handshakes).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Measured duration, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many measured transactions (warm-up ones do not count).
    #[arg(long)]
    count: Option<u64>,
    /// Warm-up seconds (sent, not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Ramp from 0 to the rate over this many seconds.
    #[arg(long, default_value_t = 0.0)]
    ramp: f64,
    /// Call hold time, seconds.
    #[arg(long, default_value_t = 1.0)]
    hold: f64,
    /// Most calls up at once (the `handshake` scenario: most handshakes in flight).
    #[arg(long, default_value_t = 10_000)]
    max_concurrent: usize,
    /// REGISTER expiry, seconds.
    #[arg(long, default_value_t = 600)]
    expires: u32,
    /// Unregister at the end.
    #[arg(long)]
    unregister: bool,
    /// Keepalive interval (idle), seconds.
    #[arg(long, default_value_t = 30.0)]
    keepalive: f64,
    /// Transaction timeout, seconds.
    #[arg(long, default_value_t = 32.0)]
    timeout: f64,
    /// Source addresses, e.g. 127.0.0.2-127.0.0.20 (beyond one address's ephemeral ports).
    #[arg(long)]
    local_addrs: Option<String>,
    /// Connections opened at once per shard during setup.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// AORs each UA registers over its connection (`<user>`, `<user>x1`, …; open
    /// registration only): millions of AORs within a descriptor limit. Setup registers the
    /// first; `register` goes through all of them (a warm-up of users × N fills the table).
    #[arg(long, default_value_t = 1)]
    aors_per_ua: usize,
    /// Re-establish and re-register lost connections (measures a server restart's storm).
    #[arg(long)]
    reconnect: bool,
    /// Digest password of each UA, `{user}` replaced by its name (e.g. `pw-{user}`; see the
    /// `subscribers` command). Without it the UAs send no credentials.
    #[arg(long)]
    password: Option<String>,
    /// Do RFC 7339 overload control as a cooperating upstream would: advertise `oc` in
    /// every Via and drop the share of new requests the server asks for before sending
    /// them (reported as dropped, not failed). The server honours it from partners, or from
    /// anyone with `limits.overload_control = "all"`.
    #[arg(long)]
    overload_control: bool,
    /// Write a JSON summary here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write one .hgrm per transaction type into this folder.
    #[arg(long)]
    hgrm_dir: Option<PathBuf>,
    /// Draw latency by percentile into this SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
    /// Exit non-zero when failed/sent exceeds this ratio.
    #[arg(long, default_value_t = 0.0)]
    max_failures: f64,
}

fn default_shards() -> usize {
    sipring_net::sys::cpus::allowed().len()
}

/// `a.b.c.d-a.b.c.e` or a comma list.
fn parse_addrs(s: &str) -> Result<Vec<IpAddr>, String> {
    if let Some((a, b)) = s.split_once('-') {
        let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (
            a.parse().map_err(|e| format!("{a}: {e}"))?,
            b.parse().map_err(|e| format!("{b}: {e}"))?,
        );
        let (a, b) = (u32::from(a), u32::from(b));
        if b < a || b - a > 65_535 {
            return Err("bad address range".into());
        }
        return Ok((a..=b).map(|x| IpAddr::V4(x.into())).collect());
    }
    s.split(',')
        .map(|a| a.trim().parse().map_err(|e| format!("{a}: {e}")))
        .collect()
}

/// TLS client configurations: the first (shared by every UA unless `--cert-dir`) and, with
/// `--cert-dir`, one per certificate pair.
type TlsConfigs = (
    Option<Arc<rustls::ClientConfig>>,
    Vec<Arc<rustls::ClientConfig>>,
);

/// The `NAME.pem` + `NAME.key` pairs in `dir`, sorted by name.
fn cert_pairs(dir: &std::path::Path) -> Result<Vec<(PathBuf, PathBuf)>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut pairs: Vec<(PathBuf, PathBuf)> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pem"))
        .filter_map(|p| {
            let k = p.with_extension("key");
            k.exists().then_some((p, k))
        })
        .collect();
    pairs.sort();
    if pairs.is_empty() {
        return Err(format!(
            "{}: no NAME.pem with a matching NAME.key",
            dir.display()
        ));
    }
    Ok(pairs)
}

fn tls_config(c: &Common, transport: Transport) -> Result<TlsConfigs, String> {
    if transport == Transport::Tcp {
        return Ok((None, Vec::new()));
    }
    let mut roots = rustls::RootCertStore::empty();
    let ca = c.ca.as_ref().ok_or("--ca is required for TLS")?;
    for r in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots
            .add(r.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(cs) = &c.cipher_suites {
        provider.cipher_suites = cs
            .split(',')
            .map(|n| {
                sipring_net::suites::cipher_suite(n.trim())
                    .ok_or(format!("unknown cipher suite {n}"))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(g) = &c.groups {
        provider.kx_groups = g
            .split(',')
            .map(|n| sipring_net::suites::kx_group(n.trim()).ok_or(format!("unknown group {n}")))
            .collect::<Result<_, _>>()?;
    }
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match c.tls_version.as_str() {
        "1.2" => vec![&rustls::version::TLS12],
        "1.3" => vec![&rustls::version::TLS13],
        _ => vec![&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let provider = Arc::new(provider);
    let builder = || {
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map(|b| b.with_root_certificates(roots.clone()))
            .map_err(|e| e.to_string())
    };
    let finish = |mut cfg: rustls::ClientConfig| {
        if c.no_resume {
            cfg.resumption = rustls::client::Resumption::disabled();
        }
        Arc::new(cfg)
    };
    let with_cert = |cert: &std::path::Path, key: &std::path::Path| {
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| format!("{}: {e}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        let key =
            PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
        builder()?
            .with_client_auth_cert(chain, key)
            .map(finish)
            .map_err(|e| format!("{}: {e}", cert.display()))
    };
    if transport != Transport::Mtls {
        return Ok((Some(finish(builder()?.with_no_client_auth())), Vec::new()));
    }
    if let Some(dir) = &c.cert_dir {
        let per_ua = cert_pairs(dir)?
            .iter()
            .map(|(cert, key)| with_cert(cert, key))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((per_ua.first().cloned(), per_ua));
    }
    let (cert, key) = (
        c.cert
            .as_ref()
            .ok_or("--cert/--key or --cert-dir is required for mtls")?,
        c.key.as_ref().ok_or("--key is required with --cert")?,
    );
    Ok((Some(with_cert(cert, key)?), Vec::new()))
}

fn plan(name: &str, scenario: Scenario, c: &Common) -> Result<Plan, String> {
    let transport = match c.transport.as_str() {
        "tls" => Transport::Tls,
        "mtls" => Transport::Mtls,
        "tcp" => Transport::Tcp,
        t => return Err(format!("unknown transport {t}")),
    };
    let (tls, tls_per_ua) = tls_config(c, transport)?;
    Ok(Plan {
        name: name.into(),
        scenario,
        targets: c.target.clone(),
        transport,
        tls,
        tls_per_ua,
        server_name: c.server_name.clone(),
        domain: c.domain.clone(),
        prefix: c.prefix.clone(),
        users: c.users,
        rate: c.rate,
        duration: Duration::from_secs_f64(c.duration),
        count: c.count,
        warmup: Duration::from_secs_f64(c.warmup),
        ramp: Duration::from_secs_f64(c.ramp),
        hold: Duration::from_secs_f64(c.hold),
        max_concurrent: c.max_concurrent,
        expires: c.expires,
        unregister: c.unregister,
        keepalive: Duration::from_secs_f64(c.keepalive),
        timeout: Duration::from_secs_f64(c.timeout),
        local_addrs: match &c.local_addrs {
            Some(s) => parse_addrs(s)?,
            None => Vec::new(),
        },
        connect_concurrency: c.connect_concurrency,
        aors_per_ua: c.aors_per_ua,
        reconnect: c.reconnect,
        password: c.password.clone(),
        overload_control: c.overload_control,
    })
}

/// A subscriber file for `<prefix>0..<prefix><users-1>` in `domain`.
fn subscriber_file(prefix: &str, users: usize, domain: &str, password: &str) -> String {
    (0..users)
        .map(|i| {
            let user = format!("{prefix}{i}");
            SubscriberEntry::new(&user, domain, vec![], &password.replace("{user}", &user))
                .to_toml()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One `[[scenario]]` of a mix file: the scenario and the options it overrides.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MixEntry {
    scenario: String,
    users: Option<usize>,
    rate: Option<f64>,
    hold: Option<f64>,
    prefix: Option<String>,
    max_concurrent: Option<usize>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MixFile {
    scenario: Vec<MixEntry>,
}

fn scenario_of(s: &str) -> Result<Scenario, String> {
    Ok(match s {
        "register" => Scenario::Register,
        "message" => Scenario::Message,
        "call" => Scenario::Call,
        "handshake" => Scenario::Handshake,
        "idle" => Scenario::Idle,
        o => return Err(format!("unknown scenario {o}")),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (plans, common) = match cli.cmd {
        Cmd::Compare { files, plot, kind } => return compare(&files, &plot, &kind),
        Cmd::Subscribers {
            prefix,
            users,
            domain,
            password,
        } => {
            print!("{}", subscriber_file(&prefix, users, &domain, &password));
            return ExitCode::SUCCESS;
        }
        Cmd::Demo {
            out,
            duration,
            cps,
            mps,
            server,
        } => return demo(out, duration, cps, mps, server),
        Cmd::Reflect {
            listen,
            cert,
            key,
            shards,
        } => {
            let tls = match (cert, key) {
                (Some(c), Some(k)) => {
                    let chain = match CertificateDer::pem_file_iter(&c)
                        .map_err(|e| e.to_string())
                        .and_then(|i| i.collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string()))
                    {
                        Ok(v) => v,
                        Err(e) => return fail2(&format!("{}: {e}", c.display())),
                    };
                    let key = match PrivateKeyDer::from_pem_file(&k) {
                        Ok(v) => v,
                        Err(e) => return fail2(&format!("{}: {e}", k.display())),
                    };
                    match rustls::ServerConfig::builder_with_provider(Arc::new(
                        rustls::crypto::aws_lc_rs::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
                    {
                        Ok(cfg) => Some(Arc::new(cfg)),
                        Err(e) => return fail2(&e.to_string()),
                    }
                }
                _ => None,
            };
            return match sipring_load::reflect::serve(listen, shards, tls) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail2(&e),
            };
        }
        Cmd::Register(c) => (plan("register", Scenario::Register, &c).map(|p| vec![p]), c),
        Cmd::Message(c) => (plan("message", Scenario::Message, &c).map(|p| vec![p]), c),
        Cmd::Call(c) => (plan("call", Scenario::Call, &c).map(|p| vec![p]), c),
        Cmd::Handshake(c) => (
            plan("handshake", Scenario::Handshake, &c).map(|p| vec![p]),
            c,
        ),
        Cmd::Idle(c) => (plan("idle", Scenario::Idle, &c).map(|p| vec![p]), c),
        Cmd::Mix { file, common } => {
            let r = std::fs::read_to_string(&file)
                .map_err(|e| format!("{}: {e}", file.display()))
                .and_then(|t| {
                    toml::from_str::<MixFile>(&t).map_err(|e| format!("{}: {e}", file.display()))
                })
                .and_then(|m| {
                    m.scenario
                        .iter()
                        .enumerate()
                        .map(|(i, e)| {
                            let mut c = common.clone();
                            c.users = e.users.unwrap_or(c.users);
                            c.rate = e.rate.unwrap_or(c.rate);
                            c.hold = e.hold.unwrap_or(c.hold);
                            c.max_concurrent = e.max_concurrent.unwrap_or(c.max_concurrent);
                            c.prefix = e.prefix.clone().unwrap_or(format!("{}{i}-", e.scenario));
                            plan(&e.scenario, scenario_of(&e.scenario)?, &c)
                        })
                        .collect()
                });
            (r, common)
        }
    };
    let plans = match plans {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sipring-load: {e}");
            return ExitCode::from(2);
        }
    };
    // Carrier scale: one connection = two descriptors (the reader's and the writer's dup).
    // Raise the limit or say which one stops us.
    let users: usize = plans.iter().map(|p| p.users).sum();
    let (nofile, _) = sipring_net::sys::probe::raise_limits();
    if 2 * users as u64 + 256 > nofile {
        eprintln!(
            "sipring-load: {users} connections need more file descriptors than RLIMIT_NOFILE ({nofile}) allows: raise it (ulimit -n, LimitNOFILE; see tuning/limits.conf)"
        );
        return ExitCode::from(2);
    }
    let ephemeral = 28_232usize; // Linux default 32768-60999 per source address
    if plans
        .iter()
        .any(|p| p.local_addrs.is_empty() && p.users > ephemeral)
    {
        eprintln!(
            "sipring-load: more than {ephemeral} connections from one source address exhaust its ephemeral ports: use --local-addrs 127.0.0.2-127.0.0.20 (or widen net.ipv4.ip_local_port_range)"
        );
        return ExitCode::from(2);
    }
    let progress = Arc::new(Progress::default());
    // An idle run holds connections until told to stop: SIGTERM/SIGINT end it with results
    // (a second one kills). Other scenarios keep the default: a signal ends the process.
    if plans.iter().all(|p| p.scenario == Scenario::Idle) {
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            let stop = progress.stop.clone();
            let r = signal_hook::flag::register_conditional_shutdown(sig, 1, stop.clone())
                .and_then(|_| signal_hook::flag::register(sig, stop));
            if let Err(e) = r {
                eprintln!("sipring-load: cannot handle signal {sig}: {e}");
            }
        }
    }
    let live = !common.quiet && std::io::stderr().is_terminal();
    let p2 = progress.clone();
    let started = Instant::now();
    let ticker = std::thread::spawn(move || {
        let mut last = 0;
        while !live_done(&p2) {
            std::thread::sleep(Duration::from_secs(1));
            if live {
                let a = p2.answered.load(Ordering::Relaxed);
                let (s, f) = (
                    p2.sent.load(Ordering::Relaxed),
                    p2.failed.load(Ordering::Relaxed),
                );
                eprint!(
                    "\r{:>5.0}s  {:>8} ok/s  sent {s}  failed {f}  in-flight {}  conns {}  p99 {:.2} ms   ",
                    started.elapsed().as_secs_f64(),
                    a - last,
                    s.saturating_sub(a + f),
                    p2.connections.load(Ordering::Relaxed),
                    p2.p99_us.load(Ordering::Relaxed) as f64 / 1000.0
                );
                last = a;
            }
        }
        if live {
            eprintln!();
        }
    });
    let shards = common.shards.max(1);
    let result = run::run(plans, shards, progress.clone());
    progress.sent.fetch_add(0, Ordering::Relaxed);
    DONE.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let stats = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sipring-load: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", stats.table());
    let summary = stats.summary();
    if let Some(p) = &common.json
        && let Err(e) = std::fs::write(
            p,
            serde_json::to_string_pretty(&summary).expect("serialisable"),
        )
    {
        eprintln!("sipring-load: {}: {e}", p.display());
    }
    if let Some(d) = &common.hgrm_dir {
        match stats.write_hgrm(d) {
            Ok(files) => println!("histograms: {}", files.join(" ")),
            Err(e) => eprintln!("sipring-load: {}: {e}", d.display()),
        }
    }
    if let Some(p) = &common.plot {
        let series: Vec<(String, Vec<(f64, f64)>)> = summary
            .kinds
            .iter()
            .filter(|(_, k)| k.count > 0)
            .map(|(n, k)| (n.clone(), k.percentiles.clone()))
            .collect();
        match stats::plot(&series, p, "latency by percentile") {
            Ok(()) => println!("plot: {}", p.display()),
            Err(e) => eprintln!("sipring-load: plot: {e}"),
        }
    }
    let (sent, _, failed) = stats.totals();
    if sent > 0 && failed as f64 / sent as f64 > common.max_failures {
        eprintln!(
            "sipring-load: {failed} of {sent} failed (more than --max-failures {})",
            common.max_failures
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn live_done(_: &Progress) -> bool {
    DONE.load(Ordering::Relaxed)
}

fn compare(files: &[PathBuf], plot: &std::path::Path, kind: &str) -> ExitCode {
    let mut series = Vec::new();
    for f in files {
        let s: stats::Summary = match std::fs::read_to_string(f)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("sipring-load: {}: {e}", f.display());
                return ExitCode::from(2);
            }
        };
        let Some(k) = s.kinds.get(kind) else {
            eprintln!("sipring-load: {} has no {kind}", f.display());
            return ExitCode::from(2);
        };
        println!(
            "{:<40} p50 {:>8.3} ms  p99 {:>8.3} ms  p99.9 {:>8.3} ms  max {:>8.3} ms  {:>10.1}/s",
            f.display(),
            k.p50_ms,
            k.p99_ms,
            k.p999_ms,
            k.max_ms,
            k.rate_per_s
        );
        series.push((
            f.file_stem()
                .map_or("run".into(), |s| s.to_string_lossy().into_owned()),
            k.percentiles.clone(),
        ));
    }
    match stats::plot(&series, plot, &format!("{kind}: latency by percentile")) {
        Ok(()) => {
            println!("plot: {}", plot.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sipring-load: plot: {e}");
            ExitCode::from(2)
        }
    }
}

/// The demo UAs' password template.
const DEMO_PASSWORD: &str = "demo-{user}";

/// The demo's plans: user prefix and number of UAs (register, call, message).
const DEMO_PLANS: [(&str, usize); 3] = [("reg", 200), ("call", 200), ("msg", 200)];

fn demo(
    out: Option<PathBuf>,
    duration: f64,
    cps: f64,
    mps: f64,
    server_bin: Option<PathBuf>,
) -> ExitCode {
    let dir = out.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("sipring-demo-{}", std::process::id()))
    });
    let fail = |e: String| {
        eprintln!("demo: {e}");
        ExitCode::from(2)
    };
    // The server reads relative paths in its config from the config's folder: write them
    // absolute.
    let dir = match std::path::absolute(&dir) {
        Ok(d) => d,
        Err(e) => return fail(format!("{}: {e}", dir.display())),
    };
    let bin = sipring_binary(server_bin);
    // The PKI from the server's own `certs` command.
    let pki = dir.join("pki");
    match Command::new(&bin)
        .args(["certs", "--domain", "example.com", "--out"])
        .arg(&pki)
        .stdout(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => return fail(format!("{} certs: {s}", bin.display())),
        Err(e) => {
            return fail(format!(
                "cannot run {} ({e}): build it (cargo build --release --bins) or give --server",
                bin.display()
            ));
        }
    }
    println!("demo: throwaway PKI in {}", pki.display());
    // Every demo UA authenticates with digest (SHA-256), as phones do. A run numbers users
    // across its plans (plan k's users continue where plan k-1's ended).
    let subs = dir.join("subscribers.toml");
    let mut base = 0;
    let text: String = DEMO_PLANS
        .iter()
        .map(|(p, n)| {
            let users: Vec<String> = (base..base + n).map(|i| format!("{p}{i}")).collect();
            base += n;
            users
                .iter()
                .map(|u| {
                    SubscriberEntry::new(
                        u,
                        "example.com",
                        vec![],
                        &DEMO_PASSWORD.replace("{user}", u),
                    )
                    .to_toml()
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect::<Vec<_>>()
        .join("\n");
    if let Err(e) = std::fs::write(&subs, text) {
        return fail(format!("{}: {e}", subs.display()));
    }
    let ports = std::iter::from_fn(sipring_net::sys::sock::free_port).take(8);
    let mut ports = ports.fold(Vec::new(), |mut v, p| {
        if !v.contains(&p) {
            v.push(p);
        }
        v
    });
    let (Some(admin), Some(port)) = (ports.pop(), ports.pop()) else {
        return fail("no free port on 127.0.0.1".into());
    };
    let target: SocketAddr = ([127, 0, 0, 1], port).into();
    let q = |p: &std::path::Path| toml::Value::String(p.display().to_string()).to_string();
    let config = format!(
        "[server]\nhostname = \"sip.example.com\"\nlocal_hosts = [\"127.0.0.1\"]\n\n\
         [[listen]]\naddress = \"{target}\"\n\n\
         [[tls.certificate]]\ncert = {}\nkey = {}\nsni = [\"sip.example.com\"]\n\n\
         [admin]\naddress = \"127.0.0.1:{admin}\"\n\n\
         [auth]\nsubscribers = {}\n",
        q(&pki.join("server.pem")),
        q(&pki.join("server.key")),
        q(&subs),
    );
    let config_path = dir.join("sipring.toml");
    if let Err(e) = std::fs::write(&config_path, config) {
        return fail(format!("{}: {e}", config_path.display()));
    }
    let log_path = dir.join("sipring.log");
    let log = match std::fs::File::create(&log_path) {
        Ok(f) => f,
        Err(e) => return fail(format!("{}: {e}", log_path.display())),
    };
    let spawned = log.try_clone().and_then(|err| {
        let mut cmd = Command::new(&bin);
        sipring_net::sys::process::end_with_parent(&mut cmd)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdout(log)
            .stderr(err)
            .spawn()
    });
    let mut server = match spawned {
        Ok(c) => Spawned(c),
        Err(e) => return fail(format!("{} run: {e}", bin.display())),
    };
    if let Err(e) = wait_listening(&mut server.0, target, Duration::from_secs(15)) {
        return fail(format!("{e} (its log: {})", log_path.display()));
    }
    println!(
        "demo: {} (pid {}) on {target}; metrics at http://127.0.0.1:{admin}/metrics, log {}",
        bin.display(),
        server.0.id(),
        log_path.display()
    );
    let common = |prefix: &str, users: usize, rate: f64| Common {
        target: vec![target],
        transport: "tls".into(),
        ca: Some(dir.join("pki/ca.pem")),
        cert: None,
        key: None,
        cert_dir: None,
        server_name: "sip.example.com".into(),
        domain: "example.com".into(),
        prefix: prefix.into(),
        tls_version: "both".into(),
        groups: None,
        cipher_suites: None,
        no_resume: false,
        shards: default_shards(),
        users,
        rate,
        duration,
        count: None,
        warmup: 1.0,
        ramp: 1.0,
        hold: 2.0,
        max_concurrent: 10_000,
        expires: 600,
        unregister: false,
        keepalive: 30.0,
        timeout: 32.0,
        local_addrs: None,
        // All the demo's UAs come from 127.0.0.1, and a server shard lets one address have 64
        // handshakes in progress (`limits.max_handshakes_per_ip`): the plans' shards together
        // open at most 48 at once (one each past 16 CPUs, spread over as many server
        // shards), so a slow (debug) build is not refused as a connection storm.
        connect_concurrency: (48 / (DEMO_PLANS.len() * default_shards())).max(1),
        aors_per_ua: 1,
        reconnect: false,
        password: Some(DEMO_PASSWORD.into()),
        overload_control: false,
        json: None,
        hgrm_dir: None,
        plot: None,
        quiet: false,
        max_failures: 0.0,
    };
    let [(reg, n_reg), (call, n_call), (msg, n_msg)] = DEMO_PLANS;
    let plans = [
        plan("register", Scenario::Register, &common(reg, n_reg, 100.0)),
        plan("call", Scenario::Call, &common(call, n_call, cps)),
        plan("message", Scenario::Message, &common(msg, n_msg, mps)),
    ];
    let plans: Result<Vec<Plan>, String> = plans.into_iter().collect();
    let plans = match plans {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    println!(
        "demo: {duration:.0} s of {cps:.0} calls/s, {mps:.0} MESSAGE/s and 100 REGISTER/s from {} UAs",
        600
    );
    let progress = Arc::new(Progress::default());
    let p2 = progress.clone();
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let ticker = std::thread::spawn(move || {
        let mut last = 0;
        while !DONE.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_secs(1));
            let a = p2.answered.load(Ordering::Relaxed);
            let line = format!(
                "{:>4.0}s {:>7} ok/s  failed {}  conns {}  p99 {:.2} ms",
                started.elapsed().as_secs_f64(),
                a - last,
                p2.failed.load(Ordering::Relaxed),
                p2.connections.load(Ordering::Relaxed),
                p2.p99_us.load(Ordering::Relaxed) as f64 / 1000.0
            );
            if tty {
                eprint!("\r{line}   ")
            } else {
                eprintln!("{line}")
            }
            last = a;
        }
        if tty {
            eprintln!();
        }
    });
    let result = run::run(plans, default_shards(), progress);
    DONE.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let stopped = stop_server(&mut server.0, Duration::from_secs(20));
    let stats = match result {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    print!("{}", stats.table());
    let hgrm = dir.join("hgrm");
    let files = stats.write_hgrm(&hgrm).unwrap_or_default();
    let summary = stats.summary();
    let _ = std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary).expect("serialisable"),
    );
    let series: Vec<(String, Vec<(f64, f64)>)> = summary
        .kinds
        .iter()
        .filter(|(_, k)| k.count > 0)
        .map(|(n, k)| (n.clone(), k.percentiles.clone()))
        .collect();
    let _ = stats::plot(
        &series,
        &dir.join("latency.svg"),
        "sipring demo: latency by percentile",
    );
    println!(
        "demo: {} histogram files in {}",
        files.len(),
        hgrm.display()
    );
    println!(
        "demo: summary {}, plot {}",
        dir.join("summary.json").display(),
        dir.join("latency.svg").display()
    );
    match stopped {
        Ok(()) => {
            println!("demo: server stopped cleanly");
            if summary.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail(format!("server: {e} (its log: {})", log_path.display())),
    }
}

/// The demo's server process, killed if the demo returns without stopping it.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The `sipring` binary the demo runs: `--server`, else the one beside this executable
/// (cargo builds both into the same folder), else `sipring` on the `PATH`.
fn sipring_binary(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| {
            let beside = std::env::current_exe().ok()?.with_file_name("sipring");
            beside.is_file().then_some(beside)
        })
        .unwrap_or_else(|| PathBuf::from("sipring"))
}

/// Waits until `addr` accepts TCP connections, or says why not (the server exited, or did
/// not listen within `limit`).
fn wait_listening(server: &mut Child, addr: SocketAddr, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = server.try_wait() {
            return Err(format!("the server exited before listening: {status}"));
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "the server did not listen on {addr} within {limit:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM (the server drains and exits 0), then waits up to `limit` before SIGKILL.
fn stop_server(server: &mut Child, limit: Duration) -> Result<(), String> {
    if sipring_net::sys::process::terminate(server).is_err() {
        let _ = server.kill();
    }
    let start = Instant::now();
    loop {
        match server.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => return Err(format!("it exited with {s}")),
            Ok(None) if start.elapsed() > limit => {
                let _ = server.kill();
                let _ = server.wait();
                return Err(format!("it did not stop within {limit:?} of SIGTERM"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn fail2(e: &str) -> ExitCode {
    eprintln!("sipring-load: {e}");
    ExitCode::from(2)
}
