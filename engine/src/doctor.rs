//! `sipring doctor`: a preflight that checks the host and prints pass/warn/fail with the
//! exact fix for each finding.
//!
//! Checks are pure functions of [`HostFacts`] (gathered from the real host by
//! [`HostFacts::gather`], or made up in tests) and of an optional configuration.

use crate::config::Config;
use crate::sys::ktls::Support;
use std::collections::BTreeMap;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Fine.
    Pass,
    /// Works, but not as it should for production.
    Warn,
    /// Will not work.
    Fail,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// The verdict.
    pub verdict: Verdict,
    /// What was found.
    pub found: String,
    /// How to fix it (empty when passing).
    pub fix: String,
}

/// Everything the checks look at.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// `uname -r`.
    pub kernel: String,
    /// io_uring probe.
    pub io_uring: Result<(), String>,
    /// Kernel TLS probe.
    pub ktls: Support,
    /// RLIMIT_MEMLOCK soft/hard (bytes; `u64::MAX` = unlimited).
    pub memlock: (u64, u64),
    /// RLIMIT_NOFILE soft/hard.
    pub nofile: (u64, u64),
    /// Current sysctl values by name.
    pub sysctls: BTreeMap<String, String>,
    /// Online CPUs.
    pub cpus: usize,
    /// Now, Unix seconds (for certificate expiry).
    pub now: i64,
    /// Whether the system clock is synchronised (adjtimex), if the kernel says.
    pub clock_synced: Option<bool>,
    /// The CPUs this process may run on (sched_getaffinity), for `server.first_cpu`.
    pub allowed_cpus: usize,
}

/// The recommended sysctls (the `tuning/sysctl.conf` profile).
pub const SYSCTL_PROFILE: &str = include_str!("../../tuning/sysctl.conf");

/// `key = value` lines of the profile.
pub fn profile() -> Vec<(String, String)> {
    SYSCTL_PROFILE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            l.split_once('=').map(|(k, v)| {
                (
                    k.trim().to_string(),
                    v.split_whitespace().collect::<Vec<_>>().join(" "),
                )
            })
        })
        .collect()
}

impl HostFacts {
    /// Reads this host.
    pub fn gather() -> HostFacts {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
                .ok()
        };
        let sysctls = profile()
            .into_iter()
            .filter_map(|(k, _)| {
                read(&format!("/proc/sys/{}", k.replace('.', "/"))).map(|v| (k, v))
            })
            .collect();
        HostFacts {
            kernel: read("/proc/sys/kernel/osrelease").unwrap_or_default(),
            io_uring: crate::sys::probe::io_uring(),
            ktls: crate::sys::ktls::probe(),
            memlock: crate::sys::probe::memlock(),
            nofile: crate::sys::probe::nofile(),
            sysctls,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            now: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            clock_synced: crate::sys::probe::clock_synced(),
            allowed_cpus: crate::sys::cpus::allowed().len(),
        }
    }
}

/// A file's permission bits when others may read it, or group or others may write it
/// (`root:sipring 0640`, read through the service's group, is fine).
fn open_to_others(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o026 != 0).then_some(mode)
}

fn check(name: &str, verdict: Verdict, found: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        verdict,
        found: found.into(),
        fix: if verdict == Verdict::Pass {
            String::new()
        } else {
            fix.into()
        },
    }
}

fn kernel_version(s: &str) -> (u32, u32) {
    let mut it = s.split(['.', '-']).filter_map(|p| p.parse::<u32>().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Does the current sysctl value meet the recommended one (numbers: at least; the port
/// range: at least as wide; a keepalive time: at most; `tcp_tw_reuse`: exactly, since its
/// default 2 means loopback only)?
pub fn sysctl_ok(key: &str, current: &str, want: &str) -> bool {
    let cur: Vec<u64> = current
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let w: Vec<u64> = want
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if cur.len() != w.len() || cur.is_empty() {
        return current == want;
    }
    match key {
        "net.ipv4.ip_local_port_range" => cur[0] <= w[0] && cur[1] >= w[1],
        "kernel.io_uring_disabled" | "net.ipv4.tcp_keepalive_time" => cur[0] <= w[0],
        "net.ipv4.tcp_tw_reuse" => cur == w,
        _ => cur.iter().zip(&w).all(|(c, w)| c >= w),
    }
}

/// Runs every check. `config` is the configuration (with its load errors) when one was given.
pub fn run(f: &HostFacts, config: Option<Result<&Config, String>>) -> Vec<Check> {
    use Verdict::*;
    let mut out = Vec::new();
    let (maj, min) = kernel_version(&f.kernel);
    out.push(if (maj, min) >= (6, 1) {
        check("kernel", Pass, f.kernel.clone(), "")
    } else if (maj, min) >= (5, 8) {
        check(
            "kernel",
            Warn,
            f.kernel.clone(),
            "kernel older than 6.1: io_uring fixes are missing; upgrade to 6.1+ (kernel TLS for TLS 1.3 connections needs 6.14+: see the kernel TLS check)",
        )
    } else {
        check(
            "kernel",
            Fail,
            f.kernel.clone(),
            "io_uring needs Linux >= 5.8; upgrade the kernel",
        )
    });
    out.push(match &f.io_uring {
        Ok(()) => check("io_uring", Pass, "io_uring_setup works", ""),
        Err(e) => check(
            "io_uring",
            Fail,
            e.clone(),
            "set kernel.io_uring_disabled=0 and allow io_uring_setup in seccomp",
        ),
    });
    out.push(match &f.ktls {
        Support::Available { ciphers, rekey } if *ciphers != crate::sys::ktls::Ciphers::ALL => check(
            "kernel TLS",
            Warn,
            format!(
                "tls ULP available ({}), but the kernel takes no key for {}",
                if *rekey { "KeyUpdate supported" } else { "no KeyUpdate (rekey) support" },
                ciphers.missing()
            ),
            "load the kernel's crypto modules for them (`modprobe chacha20poly1305 gcm aes`); sessions with those ciphers stay in userspace",
        ),
        Support::Available { rekey: true, .. } => check("kernel TLS", Pass, "tls ULP available, KeyUpdate supported, every cipher", ""),
        Support::Available { rekey: false, .. } => check("kernel TLS", Warn, "tls ULP available, no KeyUpdate (rekey) support", "Linux >= 6.14 lets TLS 1.3 connections use kernel TLS too; until then they stay in userspace"),
        other => check("kernel TLS", Warn, other.describe(), "`modprobe tls` and add `tls` to /etc/modules-load.d/sipring.conf (see tuning/); without it TLS runs in userspace"),
    });
    let shards = match &config {
        Some(Ok(c)) => crate::server::shard_count(c),
        _ => f.cpus,
    };
    let need = crate::sys::probe::memlock_needed(shards);
    let show = |v: u64| {
        if v == u64::MAX {
            "unlimited".to_string()
        } else {
            format!("{} KiB", v / 1024)
        }
    };
    out.push(if f.memlock.0 >= need {
        check("memlock", Pass, show(f.memlock.0), "")
    } else if f.memlock.1 >= need {
        check(
            "memlock",
            Warn,
            format!(
                "soft {} < {} needed (hard {}; sipring raises it at start)",
                show(f.memlock.0),
                show(need),
                show(f.memlock.1)
            ),
            "LimitMEMLOCK=infinity in the unit",
        )
    } else {
        check(
            "memlock",
            Fail,
            format!(
                "{} < {} needed for {shards} shards",
                show(f.memlock.1),
                show(need)
            ),
            "LimitMEMLOCK=infinity (systemd) or `ulimit -l unlimited`; see tuning/limits.conf",
        )
    });
    let want_files = 1_048_576;
    out.push(if f.nofile.0 >= want_files || f.nofile.1 >= want_files {
        check(
            "nofile",
            Pass,
            format!("soft {} hard {}", f.nofile.0, f.nofile.1),
            "",
        )
    } else {
        check(
            "nofile",
            Warn,
            format!("hard limit {} caps connections", f.nofile.1),
            "LimitNOFILE=1048576 in the unit; see tuning/limits.conf",
        )
    });
    for (k, want) in profile() {
        out.push(match f.sysctls.get(&k) {
            Some(cur) if sysctl_ok(&k, cur, &want) => {
                check(&format!("sysctl {k}"), Pass, cur.clone(), "")
            }
            Some(cur) => check(
                &format!("sysctl {k}"),
                Warn,
                format!("{cur} (recommended {want})"),
                format!("sysctl -w {k}=\"{want}\" (persist: tuning/sysctl.conf)"),
            ),
            None => check(
                &format!("sysctl {k}"),
                Warn,
                "not readable",
                "check /proc/sys",
            ),
        });
    }
    match config {
        None => out.push(check(
            "config",
            Warn,
            "no --config given",
            "run `sipring doctor --config FILE`",
        )),
        Some(Err(e)) => out.push(check(
            "config",
            Fail,
            e,
            "fix the keys named above (`sipring check-config FILE`)",
        )),
        Some(Ok(c)) => {
            out.push(check("config", Pass, "valid", ""));
            let n = crate::server::shard_count(c);
            out.push(if n <= f.cpus {
                check(
                    "shards vs CPUs",
                    Pass,
                    format!("{n} shards on {} CPUs", f.cpus),
                    "",
                )
            } else {
                check(
                    "shards vs CPUs",
                    Warn,
                    format!("{n} shards on {} CPUs", f.cpus),
                    "set server.shards to at most the CPU count (0 = one per CPU)",
                )
            });
            // What `start` refuses, the doctor must not pass: pinned shards from
            // `first_cpu` on must fit the CPUs this process may use.
            if c.server.pin_shards && c.server.first_cpu + n > f.allowed_cpus {
                out.push(check(
                    "shard placement",
                    Fail,
                    format!(
                        "{n} pinned shards from allowed CPU {} do not fit the {} CPUs this process may use",
                        c.server.first_cpu, f.allowed_cpus
                    ),
                    "lower server.first_cpu or server.shards (or widen the CPU set: taskset, CPUAffinity=)",
                ));
            }
            if let Err(e) = crate::auth::subscribers(c) {
                out.push(check(
                    "subscribers",
                    Fail,
                    e,
                    "fix the subscriber file (`sipring subscriber` writes entries)",
                ));
            }
            if let Err(e) = crate::auth::node_key(c) {
                out.push(check(
                    "auth.secret_file",
                    Fail,
                    e,
                    "at least 32 bytes, readable by sipring (e.g. `head -c 32 /dev/urandom`)",
                ));
            }
            // Password equivalents (HA1s) and the key that signs nonces and routes: a file
            // any local user may read gives them away.
            for (what, path) in [
                ("subscribers", c.auth.subscribers.as_ref()),
                ("auth.secret_file", c.auth.secret_file.as_ref()),
            ] {
                if let Some(mode) = path.and_then(|p| open_to_others(p)) {
                    out.push(check(
                        what,
                        Warn,
                        format!(
                            "{} is readable by others or writable beyond its owner (mode {mode:o})",
                            path.map(|p| p.display().to_string()).unwrap_or_default()
                        ),
                        "chmod 600 (or 640 with sipring's group): it holds password equivalents or the node's signing secret",
                    ));
                }
            }
            match crate::tls::TlsPolicy::load(c) {
                Err(e) => out.push(check(
                    "certificates",
                    Fail,
                    e.to_string(),
                    "fix or replace the file named",
                )),
                Ok(p) => {
                    for cert in &p.certs {
                        let left = cert.not_after - f.now;
                        let days = left.div_euclid(86_400);
                        let name = format!("certificate {}", cert.file.display());
                        // Expired is expired, however recently (an hour ago read as
                        // "expires in 0 days", a warning with exit status 0).
                        out.push(if left < 0 {
                            check(
                                &name,
                                Fail,
                                format!("expired {} days ago", (-left as u64).div_ceil(86_400)),
                                "renew it, then `kill -HUP` or POST /reload",
                            )
                        } else if cert.not_before - 300 > f.now {
                            // Not valid yet (a clock behind, or issued for later): every
                            // handshake fails, as start and reload say; it read as PASS.
                            check(
                                &name,
                                Fail,
                                format!(
                                    "not valid for another {} s (notBefore ahead of this clock)",
                                    cert.not_before - f.now
                                ),
                                "check the clock (NTP), or use the certificate in force",
                            )
                        } else if days <= 30 {
                            check(
                                &name,
                                Warn,
                                format!("expires in {days} days"),
                                "renew it soon, then reload",
                            )
                        } else {
                            check(&name, Pass, format!("expires in {days} days"), "")
                        });
                    }
                    // A partner whose roots have all lapsed is refused at every handshake;
                    // one whose last root lapses soon loses every link at that second.
                    // Each partner's roots, and the cluster's (its nodes' links).
                    let bundles =
                        c.peer
                            .iter()
                            .filter(|p| !p.node)
                            .map(|p| (format!("partner {} roots", p.name), &p.roots, "the partner"))
                            .chain(c.cluster.iter().map(|k| {
                                ("cluster roots".to_string(), &k.roots, "the cluster's CA")
                            }));
                    for (name, roots, whose) in bundles {
                        let Ok(roots) = crate::tls::load_certs(roots) else {
                            continue;
                        };
                        let Some(last) = roots
                            .iter()
                            .filter_map(|r| {
                                x509_parser::parse_x509_certificate(r.as_ref())
                                    .ok()
                                    .map(|(_, x)| x.validity().not_after.timestamp())
                            })
                            .max()
                        else {
                            continue;
                        };
                        let days = (last - f.now).div_euclid(86_400);
                        if last < f.now {
                            out.push(check(
                                &name,
                                Fail,
                                format!(
                                    "every root expired ({} days ago)",
                                    ((f.now - last) as u64).div_ceil(86_400)
                                ),
                                format!("get a current root from {whose}, add it to the roots file and reload: every handshake it anchors is refused"),
                            ));
                        } else if days <= 30 {
                            out.push(check(
                                &name,
                                Warn,
                                format!("its last root expires in {days} days"),
                                format!("get the new root from {whose}, add it to the bundle and reload before then: at that second every link it anchors closes"),
                            ));
                        }
                    }
                    // A stale CRL passes the load (it is well formed) and then closes what
                    // it covers at the next reload: a failing fetch job found by a SIGHUP.
                    for due in crate::tls::crl_next_updates(c) {
                        let Some(next) = due.next else { continue };
                        let name = format!("CRL {}", due.file.display());
                        let hours = (next - f.now).div_euclid(3600);
                        out.push(if next <= f.now {
                            check(
                                &name,
                                if due.enforced { Fail } else { Warn },
                                format!(
                                    "past its nextUpdate ({} hours ago)",
                                    ((f.now - next) as u64).div_ceil(3600)
                                ),
                                if due.enforced {
                                    "fetch a fresh CRL: every certificate it covers is refused (revocation status unknown), and at the next reload the live connections close"
                                } else {
                                    "fetch a fresh CRL: it is still read (unknown_revocation = \"allow\"), but says nothing of what was revoked since"
                                },
                            )
                        } else if hours < 48 {
                            check(
                                &name,
                                Warn,
                                format!("next update due in {hours} hours"),
                                "make sure the CRL fetch job runs before then",
                            )
                        } else {
                            check(&name, Pass, format!("next update due in {} days", hours / 24), "")
                        });
                    }
                }
            }
        }
    }
    out.push(match f.clock_synced {
        Some(true) => check("clock", Pass, "synchronised", ""),
        Some(false) => check(
            "clock",
            Warn,
            "not synchronised",
            "enable chrony or systemd-timesyncd: certificate validity depends on it",
        ),
        None => check("clock", Pass, format!("Unix time {}", f.now), ""),
    });
    if f.now < 1_700_000_000 {
        let last = out.len() - 1;
        out[last] = check(
            "clock",
            Fail,
            format!("Unix time {} is before 2023", f.now),
            "set the clock: every certificate would look not yet valid",
        );
    }
    out
}

/// Renders checks as the doctor prints them.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let tag = match c.verdict {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        s.push_str(&format!("{tag} {:<38} {}\n", c.name, c.found));
        if !c.fix.is_empty() {
            s.push_str(&format!("     fix: {}\n", c.fix));
        }
    }
    s
}
