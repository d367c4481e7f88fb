//! The admin endpoint: a tiny HTTP/1.0 server on its own thread (keep it on loopback).
//!
//! - `GET /metrics`: Prometheus text, all shards merged, each family once.
//! - `GET /metrics/shards`: the same families with one series per shard (`shard` label).
//! - `GET /hgrm`: the histogram names; `GET /hgrm/<name>`: one histogram in `.hgrm` format
//!   (milliseconds), merged across shards.
//! - `POST /reload`: like SIGHUP (refused, 403, with an `Origin` header — a browser's — or
//!   from beyond loopback unless `admin.remote_reload`).
//! - `GET /health`: `200 ok`, or `503 draining`.
//!
//! A request whose `Host` names neither an IP address, `localhost`, this machine's host
//! name nor one of `admin.hosts` is refused 403 (DNS rebinding: a web page the operator
//! opens, whose name an attacker rebinds to this address, is same-origin with the endpoint
//! and could read it). After the answer the rest of a request (a POST's body) is read and
//! dropped, within limits, so the close is not a reset that loses the answer.
//!
//! Whoever reaches the port cannot hold it or the process's memory: a request is read
//! within [`REQUEST_BYTES`] and [`HEAD_DEADLINE`], answered within [`DEADLINE`], and at most
//! [`CONCURRENT`] are served at once (more are closed unanswered). Reloads are at most one
//! per [`RELOAD_SPACING`] (each makes every shard check its
//! connections' certificates again): one sooner is answered `429` with `Retry-After`.

use crate::control::Control;
use crate::server::{Reloader, Running, merge};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The most bytes of a request (line and headers) read; the rest is not.
pub const REQUEST_BYTES: u64 = 16 * 1024;
/// How long a client may take to send its request (line and headers): a client that connects
/// and says nothing gives its slot back after this.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(1);
/// How long the answer may take to go out, from when it is ready (a reload that waited its
/// turn is still answered).
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Requests served at once, each on a thread of its own.
pub const CONCURRENT: usize = 16;
/// Requests served at once for one source address: whoever reached the port could hold
/// every slot with silent connections (one a second each), and scrapes and health checks
/// were closed unanswered.
pub const PER_SOURCE: usize = 4;
/// The least time between two reloads through the endpoint.
pub const RELOAD_SPACING: Duration = Duration::from_secs(1);

/// Starts the admin thread; returns the bound address.
pub fn spawn(addr: SocketAddr, running: &Running) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        tracing::warn!(%local, "the admin endpoint listens beyond loopback: it has no authentication (metrics, reload); restrict who reaches it");
    }
    let control = running.control.clone();
    let hosts = own_names(
        &running.cfg.admin.hosts,
        std::fs::read_to_string("/proc/sys/kernel/hostname").ok(),
        std::fs::read_to_string("/etc/hosts").ok(),
    );
    let shared = Arc::new(Shared {
        reloader: Reloader::of(running),
        remote_reload: running.cfg.admin.remote_reload,
        last_reload: std::sync::Mutex::new(None),
        hosts,
        host_log: std::sync::Mutex::new(crate::metrics::LogLimiter::default()),
    });
    let busy = Arc::new(AtomicUsize::new(0));
    let by_source: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    std::thread::Builder::new()
        .name("sipring-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                if control.stopping() {
                    break;
                }
                match stream {
                    Ok(s) => {
                        let source = s.peer_addr().map(|a| a.ip().to_canonical()).ok();
                        let per_source = source.map(|ip| {
                            let mut m = by_source.lock().unwrap_or_else(|p| p.into_inner());
                            let n = m.entry(ip).or_insert(0);
                            *n += 1;
                            (ip, *n)
                        });
                        // A slow client holds its own thread, not the endpoint; one source
                        // holds at most PER_SOURCE of them. Refused: 503 (it was closed
                        // unanswered), written without waiting.
                        let full = busy.fetch_add(1, Ordering::AcqRel) >= CONCURRENT
                            || per_source.is_some_and(|(_, n)| n > PER_SOURCE);
                        if full {
                            busy.fetch_sub(1, Ordering::AcqRel);
                            if let Some((ip, _)) = per_source {
                                give_back(&by_source, ip);
                            }
                            let _ = s.set_nonblocking(true);
                            let _ = (&s).write_all(
                                b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            );
                            continue;
                        }
                        let (control, shared) = (control.clone(), shared.clone());
                        // The slot goes back however the request ends, a panic included
                        // (four panics would otherwise leave the endpoint dead).
                        let slot = Slot(busy.clone(), source, by_source.clone());
                        let _ = std::thread::Builder::new()
                            .name("sipring-admin-req".into())
                            .spawn(move || {
                                let _slot = slot;
                                let _ = handle(s, &control, &shared);
                            });
                    }
                    // Out of descriptors for a moment (closes still pending): wait, do not
                    // spin; the connection stays queued and is served next.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })?;
    Ok(local)
}

/// What every request's thread shares.
struct Shared {
    reloader: Reloader,
    /// `admin.remote_reload`.
    remote_reload: bool,
    /// When the last reload through the endpoint was ([`spaced_reload`]).
    last_reload: std::sync::Mutex<Option<Instant>>,
    /// The names a request's `Host` may give (lower case), besides IP addresses.
    hosts: Vec<String>,
    /// Requests refused for their `Host` are logged at most once a second.
    host_log: std::sync::Mutex<crate::metrics::LogLimiter>,
}

/// The names a request's `Host` may give: `admin.hosts` (a port or trailing dot written
/// there is dropped), `localhost`, this machine's host name, and the other names
/// `/etc/hosts` gives it on the same line (Debian's `127.0.1.1 node1.example.net node1`:
/// a scraper using the full name).
fn own_names(
    configured: &[String],
    hostname: Option<String>,
    etc_hosts: Option<String>,
) -> Vec<String> {
    let bare = |h: &str| {
        let h = h.trim();
        let h = match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => h,
        };
        h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase()
    };
    let mut names: Vec<String> = configured.iter().map(|h| bare(h)).collect();
    names.push("localhost".into());
    let me = hostname.map(|h| bare(&h)).filter(|h| !h.is_empty());
    if let Some(me) = me {
        for line in etc_hosts.iter().flat_map(|t| t.lines()) {
            let line = line.split('#').next().unwrap_or("");
            let aliases: Vec<String> = line.split_whitespace().skip(1).map(bare).collect();
            if aliases.contains(&me) {
                names.extend(aliases);
            }
        }
        names.push(me);
    }
    names.sort();
    names.dedup();
    names
}

/// May a request saying `Host: value` be served: an IP address (with or without a port),
/// or one of `names`.
fn host_allowed(value: &str, names: &[String]) -> bool {
    let v = value.trim();
    if v.parse::<IpAddr>().is_ok() {
        return true;
    }
    let host = if let Some(rest) = v.strip_prefix('[') {
        // `[v6]` or `[v6]:port`: an address by its form.
        return rest
            .split_once(']')
            .is_some_and(|(a, _)| a.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        match v.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => v,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    host.parse::<std::net::Ipv4Addr>().is_ok() || names.iter().any(|n| n.eq_ignore_ascii_case(host))
}

/// Reads and drops what the client still sends (a POST's body) after the answer, at most
/// 1 MiB and 0.5 s, then closes: closing with unread input resets the connection, and the
/// reset can reach the client before it read the answer. The write side is shut first,
/// so even a client that sends more sees the answer end before any reset.
fn drain_and_close(stream: &TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut left: u64 = 1 << 20;
    let mut buf = [0u8; 4096];
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || stream.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match (&*stream).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n as u64),
        }
    }
}

/// Reloads, one at a time and at most one per [`RELOAD_SPACING`]; `None`: too soon after
/// the last one (answered at once, so waiting reloads never hold the endpoint's slots).
fn spaced_reload(
    reloader: &Reloader,
    last_reload: &std::sync::Mutex<Option<Instant>>,
) -> Option<Result<(), String>> {
    // Another reload in progress is "too soon" as well: nobody waits on the lock.
    let mut last = match last_reload.try_lock() {
        Ok(l) => l,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return None,
    };
    if last.is_some_and(|t| t.elapsed() < RELOAD_SPACING) {
        return None;
    }
    // A SIGHUP's reload in progress: answered at once too (it held the request's slot for
    // as long as that reload took).
    let r = reloader.try_reload()?;
    *last = Some(Instant::now());
    Some(r)
}

/// One request slot of [`CONCURRENT`] (and of its source's [`PER_SOURCE`]), given back
/// when dropped.
type SourceCounts = Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>;
struct Slot(Arc<AtomicUsize>, Option<IpAddr>, SourceCounts);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.1 {
            give_back(&self.2, ip);
        }
    }
}

/// One request of `ip` is over.
fn give_back(counts: &std::sync::Mutex<HashMap<IpAddr, usize>>, ip: IpAddr) {
    let mut m = counts.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = m.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            m.remove(&ip);
        }
    }
}

fn handle(stream: TcpStream, control: &Arc<Control>, shared: &Shared) -> std::io::Result<()> {
    // `::ffff:127.0.0.1` (a local client of an `[::]` listener) is loopback too.
    let local_peer = stream
        .peer_addr()
        .is_ok_and(|a| a.ip().to_canonical().is_loopback());
    let head_deadline = Instant::now() + HEAD_DEADLINE;
    // Read and write through one descriptor (no dup: it must work with few to spare). The
    // deadline is checked after every read, not every line: a client sending a byte at a
    // time within the read timeout is still cut at the deadline.
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if let Some(i) = head.windows(2).position(|w| w == b"\n\n") {
            break i;
        }
        if Instant::now() >= head_deadline || head.len() as u64 >= REQUEST_BYTES {
            return Ok(()); // too slow or too long: nothing to answer
        }
        let left = head_deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(left))?;
        let room = (REQUEST_BYTES as usize - head.len()).min(buf.len());
        let n = (&stream).read(&mut buf[..room])?;
        if n == 0 {
            return Ok(()); // cut short
        }
        head.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&head[..end]);
    let mut lines = head.lines();
    let line = lines.next().unwrap_or("");
    let (mut origin, mut host) = (false, None);
    for (name, value) in lines.filter_map(|h| h.split_once(':')) {
        if name.trim().eq_ignore_ascii_case("origin") {
            origin = true;
        } else if name.trim().eq_ignore_ascii_case("host") {
            host = Some(value.trim());
        }
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    // No Host at all is a script's HTTP/1.0: a browser always sends one. `/health` says
    // only "ok" or "draining": a load balancer checking it by a name is not refused.
    let foreign = host.filter(|h| path != "/health" && !host_allowed(h, &shared.hosts));
    if let Some(h) = foreign {
        let log = shared.host_log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(left_out) = log.allow(Instant::now()) {
            tracing::warn!(
                host = h,
                left_out,
                "admin request refused: its Host is not an address, localhost, this \
                 machine's name or in admin.hosts (a DNS-rebinding page, or a scraper's \
                 name to add there; at most one line a second)"
            );
        }
    }
    let (status, ctype, body) = match (method, path) {
        _ if foreign.is_some() => (
            "403 Forbidden",
            "text/plain",
            "this Host is not one of the endpoint's names (admin.hosts)\n".into(),
        ),
        // All shards merged: what `sum(rate(...))` should see, each family once.
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            merge(control).prometheus(),
        ),
        // The same families, one series per shard (label `shard`): scrape one or the other.
        ("GET", "/metrics/shards") => {
            let snaps: Vec<_> = control.snapshots.iter().map(|s| s.load_full()).collect();
            let process = crate::server::process_metrics(control);
            let mut sets: Vec<_> = snaps.iter().map(|s| (Some(s.shard), &s.metrics)).collect();
            // The process's own families (reloads, TLS rejections), without a shard label.
            sets.push((None, &process));
            (
                "200 OK",
                "text/plain; version=0.0.4",
                crate::metrics::exposition(&sets),
            )
        }
        ("GET", "/hgrm") => (
            "200 OK",
            "text/plain",
            merge(control)
                .histograms
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
                + "\n",
        ),
        ("GET", p) if p.starts_with("/hgrm/") => match merge(control).histograms.get(&p[6..]) {
            Some(h) => ("200 OK", "text/plain", crate::metrics::hgrm(h, 1000.0)),
            None => ("404 Not Found", "text/plain", "no such histogram\n".into()),
        },
        // A browser says where its page came from on every POST: a page the operator
        // visited must not reload the server (curl and scripts send no Origin).
        ("POST", "/reload") if origin => (
            "403 Forbidden",
            "text/plain",
            "a browser may not reload the server (Origin header)\n".into(),
        ),
        ("POST", "/reload") if !local_peer && !shared.remote_reload => (
            "403 Forbidden",
            "text/plain",
            "reload from beyond loopback is off (admin.remote_reload); SIGHUP works\n".into(),
        ),
        ("POST", "/reload") => match spaced_reload(&shared.reloader, &shared.last_reload) {
            None => (
                "429 Too Many Requests\r\nRetry-After: 1",
                "text/plain",
                "one reload a second at most: try again\n".into(),
            ),
            Some(Ok(())) => ("200 OK", "text/plain", "reloaded\n".into()),
            Some(Err(e)) => (
                "409 Conflict",
                "text/plain",
                format!("reload refused: {e}\n"),
            ),
        },
        // A load balancer's check: a draining node takes no new work.
        ("GET", "/health") if control.draining() => {
            ("503 Service Unavailable", "text/plain", "draining\n".into())
        }
        ("GET", "/health") => ("200 OK", "text/plain", "ok\n".into()),
        (_, "/metrics" | "/metrics/shards" | "/hgrm" | "/health" | "/reload") => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    };
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let deadline = Instant::now() + DEADLINE;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    // A client that does not read (or reads a byte at a time) gets what it took by the
    // deadline, then is closed: the deadline is checked after every write.
    let mut s = &stream;
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    let mut sent = 0;
    while sent < out.len() {
        if Instant::now() >= deadline {
            return Ok(());
        }
        stream.set_write_timeout(Some(left()))?;
        sent += s.write(&out[sent..(sent + 16 * 1024).min(out.len())])?;
    }
    s.flush()?;
    drain_and_close(&stream);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{host_allowed, own_names};

    #[test]
    fn the_names_are_the_configured_ones_localhost_and_the_machines() {
        let names = own_names(
            &["Scrape.Example.:9060".into()],
            Some("node1\n".into()),
            Some("127.0.0.1 localhost\n127.0.1.1 node1.example.net node1 # me\n10.0.0.9 other.example.net other\n".into()),
        );
        assert_eq!(
            names,
            ["localhost", "node1", "node1.example.net", "scrape.example"]
        );
    }

    #[test]
    fn a_host_is_an_address_or_a_listed_name() {
        let names = [
            "localhost".to_string(),
            "node1".into(),
            "scrape.example".into(),
        ];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9060",
            "10.1.2.3:80",
            "[::1]:9060",
            "[2001:db8::1]",
            "::1",
            "localhost:9060",
            "LOCALHOST",
            "node1",
            "scrape.example.:9060",
        ] {
            assert!(host_allowed(ok, &names), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:9060",
            "node1.evil.example",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "[evil]:9060",
            "",
            "x",
        ] {
            assert!(!host_allowed(refused, &names), "{refused}");
        }
    }
}
