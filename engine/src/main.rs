//! The `sipring` binary: `run`, `check-config`, `certs`, `subscriber`, `doctor`.

use clap::{Parser, Subcommand};
use sipring::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sipring: a thread-per-core SIP-over-TLS registrar and stateful proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Run {
        /// The configuration file (TOML; see docs/OPERATIONS.md).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and every file it names; print each error with its key.
    CheckConfig {
        /// The configuration file.
        config: PathBuf,
    },
    /// Write a throwaway PKI (CA, server, client, partner CA and certificate, CRLs).
    Certs {
        /// Output folder.
        #[arg(long, default_value = "pki")]
        out: PathBuf,
        /// SIP domain for the names (`sip.<domain>`).
        #[arg(long, default_value = "example.com")]
        domain: String,
        /// Also a certificate for this cluster node (`<node>.pem`/`.key`, SANs
        /// `<node>.<domain>` and `sip.<domain>`); repeat for each node.
        #[arg(long = "node")]
        nodes: Vec<String>,
    },
    /// Print a `[[subscriber]]` table for the subscriber file: HA1 hashes of a password read
    /// from standard input (one line), for every algorithm. The password is never stored.
    Subscriber {
        /// Digest user name.
        #[arg(long)]
        username: String,
        /// Realm (one of the server's domains).
        #[arg(long)]
        realm: String,
        /// AORs the subscriber may register and send as (default `sip:<username>@<realm>`).
        #[arg(long)]
        aor: Vec<String>,
    },
    /// Check this host (and optionally a configuration) and print fixes.
    Doctor {
        /// A configuration file to check as well.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIPRING_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}

/// How long the shards get to stop once asked (they close their connections and end their
/// loops within a tick or two).
const SHARDS_STOP_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { config } => run(config),
        Cmd::CheckConfig { config } => match Config::load(&config) {
            Ok(cfg) => match sipring::tls::TlsPolicy::load(&cfg)
                .map_err(|e| e.to_string())
                .and_then(|_| sipring::auth::subscribers(&cfg))
                .and_then(|_| sipring::auth::node_key(&cfg))
            {
                Ok(_) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    ExitCode::FAILURE
                }
            },
            Err(errors) => {
                for e in errors {
                    eprintln!("{e}");
                }
                ExitCode::FAILURE
            }
        },
        Cmd::Subscriber {
            username,
            realm,
            aor,
        } => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err()
                || line.trim_end_matches(['\r', '\n']).is_empty()
            {
                eprintln!("give the password on standard input (one line)");
                return ExitCode::FAILURE;
            }
            let password = line.trim_end_matches(['\r', '\n']);
            let entry = sipring::auth::SubscriberEntry::new(&username, &realm, aor, password);
            // What the server would refuse, or leave out, is refused here, with its reason.
            if let Err(e) = sipring::auth::parse_subscribers(&entry.to_toml(), "the entry") {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
            let outside = sipring::auth::outside_realm(&entry);
            if !outside.is_empty() {
                eprintln!(
                    "{}: not in realm {realm}: a user is challenged in the realm of the AOR it claims, so these could never authenticate (write an entry per realm)",
                    outside.join(", ")
                );
                return ExitCode::FAILURE;
            }
            print!("{}", entry.to_toml());
            ExitCode::SUCCESS
        }
        Cmd::Certs { out, domain, nodes } => {
            match sipring::tls::pki::write_demo_with_nodes(&out, &domain, &nodes) {
                Ok(files) => {
                    for f in files {
                        println!("{f}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Doctor { config } => {
            let facts = sipring::doctor::HostFacts::gather();
            let loaded = config.as_ref().map(|p| {
                Config::load(p).map_err(|e| {
                    e.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                })
            });
            let checks = sipring::doctor::run(
                &facts,
                loaded.as_ref().map(|r| r.as_ref().map_err(Clone::clone)),
            );
            print!("{}", sipring::doctor::render(&checks));
            if checks
                .iter()
                .any(|c| c.verdict == sipring::doctor::Verdict::Fail)
            {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

fn run(path: PathBuf) -> ExitCode {
    init_logs();
    let cfg = match Config::load(&path) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                tracing::error!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    // Signals are caught before the (slow: certificates, CRLs, subscribers) start: a
    // SIGHUP from a certificate-renewal hook then waits for it instead of killing the
    // process with its default action — which systemd counts as a clean exit and does not
    // restart.
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let running = match sipring::server::start(cfg, Some(path)) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(shards = running.shards, listen = ?running.listen_addrs, admin = ?running.admin_addr, "sipring running");
    // A shard that died (a panic) leaves a process that looks alive — to the admin port, to
    // the cluster's liveness key — while the users on that shard get nothing: stop, so the
    // supervisor restarts it whole.
    let mut fatal = false;
    let drain = 'serve: loop {
        for sig in signals.pending() {
            match sig {
                signal_hook::consts::SIGHUP => {
                    let _ = running.reload();
                }
                _ => break 'serve true,
            }
        }
        running.watch_crls();
        if let Some(why) = running.fatal() {
            tracing::error!("{why}: stopping the process");
            running.stop();
            fatal = true;
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    if drain {
        tracing::info!("draining");
        // A second SIGTERM/SIGINT stops at once instead of waiting out `drain_timeout_s`.
        let control = running.control.clone();
        let handle = signals.handle();
        let hurry = std::thread::spawn(move || {
            for sig in signals.forever() {
                if sig != signal_hook::consts::SIGHUP {
                    tracing::info!("stopping now");
                    control.hurry();
                }
            }
        });
        running.drain();
        handle.close();
        let _ = hurry.join();
    }
    // Every shard was asked to stop (`drain` and the fatal path end in `stop`): one that
    // does not within the bound is stuck, and the process exits without it. Meanwhile a
    // SIGTERM or SIGINT exits at once: the handlers stayed installed with nobody reading
    // them, and for up to SHARDS_STOP_WITHIN only SIGKILL stopped the process.
    if let Ok(mut late) = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        std::thread::spawn(move || {
            if late.forever().next().is_some() {
                tracing::error!("signal while the shards stop: exiting now");
                std::process::exit(1);
            }
        });
    }
    match running.join_within(SHARDS_STOP_WITHIN) {
        Ok(()) if fatal => ExitCode::FAILURE,
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
