//! Listening sockets bound with socket2 (so the backlog is ours to choose, unlike glommio's
//! fixed 1024), one per shard on the same address with `SO_REUSEPORT`.

use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};

/// A bound, listening socket that has not been given to an executor yet. `Send`: it is
/// created on the main thread and moved to its shard.
#[derive(Debug)]
pub struct BoundListener {
    fd: RawFd,
    /// The address actually bound (port resolved when 0 was asked for).
    pub local: SocketAddr,
}

/// Binds `shards` listening sockets on `addr` with `SO_REUSEPORT` and this `backlog`. A port
/// of 0 is resolved by the first bind and reused by the others.
///
/// `SO_REUSEPORT` would also let a *second* sipring (or anything else setting it) join the
/// group and take half the connections silently: before binding, a probe socket without
/// `SO_REUSEPORT` must be able to bind the address, else it is in use and we refuse
/// (`ErrorKind::AddrInUse`, naming the process holding it where /proc tells).
pub fn bind_reuseport(
    addr: SocketAddr,
    shards: usize,
    backlog: u32,
) -> std::io::Result<Vec<BoundListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    if addr.port() != 0 {
        let domain = if addr.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let probe = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            probe.set_only_v6(true)?;
        }
        probe.set_reuse_address(true)?;
        if let Err(e) = probe.bind(&addr.into()) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                let who = listener_owner(addr.port())
                    .map(|(pid, name)| format!(" by {name} (pid {pid})"))
                    .unwrap_or_default();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{addr} is already in use{who}: another instance? stop it first"),
                ));
            }
            return Err(e);
        }
    }
    let mut out = Vec::with_capacity(shards);
    let mut addr = addr;
    for _ in 0..shards {
        let domain = if addr.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_tcp_nodelay(true)?;
        s.bind(&addr.into())?;
        s.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
        let local = s.local_addr()?.as_socket().unwrap_or(addr);
        addr = local;
        out.push(BoundListener {
            fd: s.into_raw_fd(),
            local,
        });
    }
    Ok(out)
}

/// The process listening on TCP `port` (any address), from /proc: its pid and name.
pub fn listener_owner(port: u16) -> Option<(u32, String)> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; field 9 the inode.
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let p = local
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if p == Some(port) && *state == "0A" {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = proc_dir.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
                let name = std::fs::read_to_string(proc_dir.path().join("comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                return Some((pid, name));
            }
        }
    }
    None
}

impl BoundListener {
    /// Hands the socket to the current glommio executor.
    pub fn into_glommio(self) -> Listener {
        use std::os::fd::FromRawFd;
        let fd = self.fd;
        std::mem::forget(self);
        // SAFETY: `fd` came from `Socket::into_raw_fd` in `bind_reuseport`, is a bound and
        // listening TCP socket, and this struct was its only owner (we forget `self` so its
        // Drop does not close it); ownership moves to the glommio listener.
        let inner = unsafe { glommio::net::TcpListener::from_raw_fd(fd) };
        Listener { inner, fd }
    }
}

/// A listening socket on a glommio executor, with the descriptor it owns (glommio's
/// listener does not give it out).
#[derive(Debug)]
pub struct Listener {
    inner: glommio::net::TcpListener,
    fd: RawFd,
}

impl Listener {
    /// The next connection (io_uring).
    pub async fn accept(&self) -> glommio::Result<glommio::net::TcpStream, ()> {
        self.inner.accept().await
    }

    /// Takes one connection off the accept queue if one waits, without waiting, and closes
    /// it at once (its peer learns now instead of timing out): a listener out of descriptors
    /// does this with the one it keeps in reserve. `Ok(false)`: none waited. (A glommio
    /// accept raced against a timer would do, but one dropped pending can still complete in
    /// the kernel, and glommio never closes the descriptor it then carries.)
    pub fn refuse_one(&self) -> std::io::Result<bool> {
        use std::os::fd::BorrowedFd;
        // SAFETY: `fd` is the descriptor `inner` owns, and `self` outlives this borrow, used
        // for fcntl and accept4.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let s = socket2::SockRef::from(&fd);
        // The listener blocks (glommio accepts through io_uring); glommio's own first try
        // makes it non-blocking for one accept the same way.
        s.set_nonblocking(true)?;
        let r = s.accept();
        let restored = s.set_nonblocking(false);
        match r {
            Ok((c, _)) => {
                drop(c);
                restored.map(|()| true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => restored.map(|()| false),
            Err(e) => Err(e),
        }
    }
}

impl Drop for BoundListener {
    fn drop(&mut self) {
        use std::os::fd::FromRawFd;
        // SAFETY: we still own `fd` (into_glommio forgets `self` before giving it away), so
        // wrapping it in an OwnedFd closes it exactly once.
        drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(self.fd) });
    }
}

/// A second handle on the same connected socket (`dup`), so one task can read while another
/// writes (the load generator's clients; the server uses one descriptor per connection).
pub fn try_clone(s: &glommio::net::TcpStream) -> std::io::Result<glommio::net::TcpStream> {
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
    // SAFETY: `s` owns its descriptor and outlives this call; the borrow is only used to
    // duplicate it (`try_clone_to_owned` calls dup with CLOEXEC) and is not kept.
    let borrowed = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
    let owned = borrowed.try_clone_to_owned()?;
    // SAFETY: `owned` is a fresh duplicate of a connected TCP socket that nothing else
    // owns; `into_raw_fd` gives up that ownership to the new glommio stream.
    Ok(unsafe { glommio::net::TcpStream::from_raw_fd(owned.into_raw_fd()) })
}

/// Connects from a chosen local address (to spread load-generator connections over several
/// source addresses), within `timeout`, and hands the socket to the current glommio
/// executor. The connect does not block the executor: it is started non-blocking and its
/// outcome polled every millisecond (glommio has no readiness wait for a socket it did not
/// create). Before, a blocking `connect_timeout` stopped the whole shard's users for as
/// long as one connect took.
pub async fn connect_from(
    local: std::net::IpAddr,
    remote: SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<glommio::net::TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::FromRawFd;
    let domain = if remote.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::new(local, 0).into())?;
    match s.connect(&remote.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                if let Some(e) = s.take_error()? {
                    return Err(e);
                }
                if s.peer_addr().is_ok() {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        Err(e) => return Err(e),
    }
    s.set_tcp_nodelay(true)?;
    // Blocking again, as the sockets glommio makes itself are (its io_uring reads wait
    // for data instead of failing with EAGAIN).
    s.set_nonblocking(false)?;
    // SAFETY: `s` is a connected TCP socket that nothing else owns; `into_raw_fd` gives that
    // ownership to the glommio stream.
    Ok(unsafe { glommio::net::TcpStream::from_raw_fd(s.into_raw_fd()) })
}

/// Shuts a connected socket down, synchronously (a connection's close sequence; the
/// descriptor itself closes when its stream is dropped).
pub fn shutdown(fd: RawFd, how: std::net::Shutdown) -> std::io::Result<()> {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown takes a descriptor and a constant and touches no memory of ours; a
    // stale descriptor yields EBADF, which is returned, not undefined behaviour.
    if unsafe { libc::shutdown(fd, how) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Turns TCP keepalive on: a probe after `idle` without traffic, then every 30 s, and the
/// connection fails after 4 unanswered (a peer that vanished — powered off, its NAT binding
/// gone — is found in minutes, not after the kernel's two hours, even while a registration
/// keeps its connection open).
pub fn keepalive(s: &glommio::net::TcpStream, idle: std::time::Duration) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: `s` owns its descriptor and outlives this borrow, used only for setsockopt.
    let fd = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
    socket2::SockRef::from(&fd).set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(std::time::Duration::from_secs(30))
            .with_retries(4),
    )
}

/// Sets TCP_USER_TIMEOUT: output unacknowledged for `t` fails the connection (ETIMEDOUT).
pub fn user_timeout(s: &glommio::net::TcpStream, t: std::time::Duration) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: `s` owns its descriptor and outlives this borrow, used only for setsockopt.
    let fd = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
    socket2::SockRef::from(&fd).set_tcp_user_timeout(Some(t))
}

/// Takes a stream's descriptor out of glommio (to move the connection to another shard).
pub fn into_owned_fd(s: glommio::net::TcpStream) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // A duplicate, then the glommio stream is dropped normally: forgetting it instead would
    // leak its pending readiness poll (which also keeps the socket open in io_uring).
    // SAFETY: `s` owns its descriptor and outlives this borrow, used only to duplicate it.
    let owned = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) }.try_clone_to_owned()?;
    drop(s);
    Ok(owned)
}

/// Gives an adopted descriptor to the current glommio executor.
pub fn from_owned_fd(fd: std::os::fd::OwnedFd) -> glommio::net::TcpStream {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `fd` is an owned, connected TCP socket; `into_raw_fd` hands that ownership to
    // the new stream.
    unsafe { glommio::net::TcpStream::from_raw_fd(fd.into_raw_fd()) }
}

/// A TCP port on 127.0.0.1 that is free now, chosen *below* the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), so an outgoing connection cannot be handed it between
/// our pick and the server's bind (a port-0 pick can be). For tests, benches and the demo,
/// which start a server on a port they choose; `None` after 200 taken picks.
pub fn free_port() -> Option<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(32768)
        .max(11_000);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 20);
    for _ in 0..200 {
        let n = NEXT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) ^ seed;
        let n = n.wrapping_mul(0xff51_afd7_ed55_8ccd) >> 17;
        let port = (10_000 + n % (low - 10_000)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Some(port);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Duration;

    #[test]
    fn a_listener_refuses_one_waiting_connection_without_waiting_and_accepts_on() {
        let l = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1, 16)
            .unwrap()
            .pop()
            .unwrap();
        let addr = l.local;
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async move {
                let l = l.into_glommio();
                // The listener is left blocking, as glommio's io_uring accept expects.
                let blocking = |l: &Listener| {
                    // SAFETY: `l.fd` is the descriptor `l` owns, which outlives this borrow
                    // (fcntl only).
                    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(l.fd) };
                    !socket2::SockRef::from(&fd).nonblocking().unwrap()
                };
                // None waits: answered at once (the listener blocks otherwise).
                assert!(!l.refuse_one().unwrap());
                assert!(blocking(&l));
                let mut refused = std::net::TcpStream::connect(addr).unwrap();
                refused
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                assert!(l.refuse_one().unwrap());
                assert!(blocking(&l));
                // Its peer learns at once: end of stream (or a reset), not a timeout.
                match refused.read(&mut [0u8; 1]) {
                    Ok(0) => {}
                    Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
                    Ok(n) => panic!("read {n} bytes"),
                }
                // And the listener accepts on as before.
                let _kept = std::net::TcpStream::connect(addr).unwrap();
                assert!(l.accept().await.is_ok());
            });
    }
}
