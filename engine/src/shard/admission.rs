//! Admission: a connection's place in the shard's and the process's limits (per source,
//! per shard, handshakes in flight), held from accept to close and released on drop.

use super::*;
use crate::control::PerSource;
use sipring_core::stateful::Standing;

/// An accepted connection's place in the shard's limits (its source address's count and the
/// shard's load for balanced accept), held by its task from admission to its end, whatever
/// the outcome (refused handshake, error, close) — released on drop.
#[derive(Debug)]
pub struct Admission {
    shard: Rc<Shard>,
    ip: Option<IpAddr>,
}

impl Admission {
    /// Counts a connection from `ip` against the limits: its source's process-wide count
    /// (`None` when that is full: taken and checked in one step, as every shard admits at
    /// once), the shard's load and the process budget.
    pub fn take(shard: &Rc<Shard>, ip: Option<IpAddr>) -> Option<Admission> {
        if let Some(ip) = ip
            && !shard
                .control
                .per_source
                .try_add(ip, shard.cfg.limits.max_connections_per_ip)
        {
            return None;
        }
        shard.control.load[shard.id].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Admission {
            shard: shard.clone(),
            ip,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            self.shard.control.per_source.sub(ip);
        }
        self.shard.control.load[self.shard.id].fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A TLS handshake in progress: counted per shard and per source address from its start to
/// its end, whatever the outcome (released on drop).
#[derive(Debug)]
pub struct HandshakeSlot {
    shard: Rc<Shard>,
    ip: Option<IpAddr>,
}

impl HandshakeSlot {
    /// A handshake from `ip` starts.
    pub fn take(shard: &Rc<Shard>, ip: Option<IpAddr>) -> HandshakeSlot {
        let ip = ip.map(sipring_core::auth::source_of);
        shard.handshakes.set(shard.handshakes.get() + 1);
        if let Some(ip) = ip {
            *shard.handshakes_by_ip.borrow_mut().entry(ip).or_insert(0) += 1;
        }
        HandshakeSlot {
            shard: shard.clone(),
            ip,
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let s = &self.shard;
        s.handshakes.set(s.handshakes.get().saturating_sub(1));
        if let Some(ip) = self.ip {
            let mut by_ip = s.handshakes_by_ip.borrow_mut();
            if let Some(n) = by_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by_ip.remove(&ip);
                }
            }
        }
    }
}

/// A socket handed to another shard (balanced accept mode): counted in that shard's load
/// from the hand-off, not only once it admits it. Before, sockets waiting on the mesh
/// counted nowhere: a burst passed the process's descriptor budget (EMFILE broke partner
/// dials and reloads), and every one went to the same shard, the least loaded until it
/// caught up.
#[derive(Debug)]
pub struct HandedFd {
    fd: Option<std::os::fd::OwnedFd>,
    control: Arc<Control>,
    to: usize,
}

impl HandedFd {
    pub(super) fn new(control: &Arc<Control>, to: usize, fd: std::os::fd::OwnedFd) -> HandedFd {
        control.load[to].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HandedFd {
            fd: Some(fd),
            control: control.clone(),
            to,
        }
    }

    /// The socket, no longer counted as pending.
    pub(super) fn take(mut self) -> Option<std::os::fd::OwnedFd> {
        self.fd.take()
    }
}

impl Drop for HandedFd {
    fn drop(&mut self) {
        // Taken or dropped with its message (the mesh refused it), the count goes back.
        self.control.load[self.to].fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Applies the connection limits and serves the connection on this shard.
pub fn admit(
    shard: &Rc<Shard>,
    stream: glommio::net::TcpStream,
    kind: ListenKind,
    client_auth: ClientAuth,
) {
    let limits = &shard.cfg.limits;
    let ip = stream.peer_addr().map(|a| a.ip()).ok();
    let total = shard.conns.borrow().len() + shard.handshakes.get();
    let control = &shard.control;
    let process_total: usize = control
        .load
        .iter()
        .map(|l| l.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let handshakes_from = ip.map_or(0, |ip| shard.handshakes_from(ip));
    let now = Instant::now();
    let full = if process_total >= control.budget {
        Some("max_connections")
    } else if total >= limits.max_connections_per_shard {
        Some("max_connections_per_shard")
    } else {
        None
    };
    let refuse = if kind != ListenKind::Tcp
        && shard.handshakes.get() >= handshake_room(limits, kind)
    {
        Some("max_handshakes_in_flight")
    } else if kind != ListenKind::Tcp && handshakes_from >= limits.max_handshakes_per_ip {
        Some("max_handshakes_per_ip")
    } else if kind != ListenKind::Tcp && ip.is_some_and(|ip| !shard.handshake_allowed(ip, now)) {
        Some("max_handshakes_per_ip_per_s")
    } else {
        None
    };
    // The per-source limit last: its check takes the place.
    let admission = match refuse {
        Some(why) => Err(why),
        None => Admission::take(shard, ip).ok_or("max_connections_per_ip"),
    };
    // At the budget, once every other limit passed (a connection they refuse takes
    // nobody's place), the oldest anonymous connection past its grace makes room. With
    // none here, another shard that has one is asked to close it, for the next newcomer.
    let admission = match (admission, full) {
        (Ok(a), Some(why)) => {
            // One source reconnecting faster than the grace would push every other
            // newcomer out: past its share of anonymous connections it takes nobody's
            // place (refused as such where it could have taken one).
            let over_share = ip.is_some_and(|ip| {
                over_share(
                    &control.anonymous_per_source,
                    &control.anonymous_per_site,
                    ip,
                    limits.max_anonymous_per_ip,
                )
            });
            match room(shard, now) {
                Room::Here if over_share => Err("max_anonymous_per_ip"),
                Room::Here => {
                    reclaim(shard, now);
                    Ok(a)
                }
                Room::Coming => Err(why),
                Room::Nowhere => {
                    drop(a);
                    if why == "max_connections" && !over_share {
                        reclaim_elsewhere(shard);
                    }
                    Err(why)
                }
            }
        }
        (admission, _) => admission,
    };
    let admission = match admission {
        Ok(a) => a,
        Err(why) => {
            refused(shard, ip, why);
            return;
        }
    };
    // The handshake counts from now: its task may not run before the next accepts are
    // admitted, and they must see it (before, a burst of accepts passed both handshake
    // limits, none having started yet).
    let slot = (kind != ListenKind::Tcp).then(|| HandshakeSlot::take(shard, ip));
    glommio::spawn_local(crate::conn::serve_inbound(
        shard.clone(),
        stream,
        kind,
        client_auth,
        admission,
        slot,
    ))
    .detach();
}

/// Connections [`room`] and [`reclaim`] look at per new connection, at most: each
/// one looked at leaves the queue or goes to its back, so a full budget of known
/// connections costs an accept this many lookups once per grace period, not a scan.
const RECLAIM_LOOK: usize = 16;

/// Connections closed to make room whose places are not free yet, per shard, at most: past
/// it a newcomer is refused (each closed one holds its place until its task ends; a burst
/// of accepts would otherwise pass the budget by as many, into the descriptor reserve).
pub(super) const MAX_RECLAIMING: usize = 8;

/// Entries the sweep drops from the head of the queue each time, at most: connections
/// that registered or authenticated since they joined, ahead of the anonymous ones.
const SWEEP_LOOK: usize = 4096;

/// An IPv6 /48's share of anonymous connections, in shares of one source
/// (`limits.max_anonymous_per_ip` each).
pub(super) const SITE_SHARES: usize = 16;

/// Has `ip`'s source its share of anonymous connections (`cap`), or the IPv6 /48 around it
/// [`SITE_SHARES`] times as many? A site drawing its /64s from its /48 at will had a share
/// per /64: 65,536 of them.
fn over_share(per_source: &PerSource, per_site: &PerSource, ip: IpAddr, cap: usize) -> bool {
    per_source.get(ip) >= cap
        || sipring_core::auth::wide_of(ip)
            .is_some_and(|site| per_site.get(site) >= cap.saturating_mul(SITE_SHARES))
}

/// Where a place could come from at a full budget.
enum Room {
    /// An anonymous connection of this shard past its grace ([`reclaim`] closes it).
    Here,
    /// This shard already closed [`MAX_RECLAIMING`] whose places are on their way.
    Coming,
    /// Nowhere on this shard.
    Nowhere,
}

/// Where a place could come from now. Drops the queue entries it passes over on the way
/// (closed, known; busy ones go to the back with a new grace).
fn room(shard: &Shard, now: Instant) -> Room {
    if shard.reclaiming.borrow().len() >= MAX_RECLAIMING {
        Room::Coming
    } else if victim(shard, now).is_some() {
        Room::Here
    } else {
        Room::Nowhere
    }
}

/// The process budget is full and this shard has no anonymous connection to close: asks
/// the shard that counted the most (in its last sweep) to close one. This newcomer is
/// refused; the place is for the next.
fn reclaim_elsewhere(shard: &Rc<Shard>) {
    let counts = &shard.control.anonymous;
    let most = (0..shard.n)
        .filter(|&s| s != shard.id)
        .map(|s| (counts[s].load(std::sync::atomic::Ordering::Relaxed), s))
        .max();
    // Counted as taken (never below zero, whoever else asks at once): asked once per
    // count until its next sweep says again.
    if let Some((_, s)) = most
        && counts[s]
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            )
            .is_ok()
    {
        shard.mesh_send(s, ShardMsg::Reclaim, false);
    }
}

/// Another shard asked for a place ([`reclaim_elsewhere`]): closes one here if the
/// budget is still full when the question arrives.
pub(super) fn reclaim_asked(shard: &Shard, now: Instant) {
    let total: usize = shard
        .control
        .load
        .iter()
        .map(|l| l.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    if total >= shard.control.budget {
        reclaim(shard, now);
    }
}

/// The sweep's share of the queue's upkeep: drops from its head the entries of connections
/// gone or known since (up to [`SWEEP_LOOK`]), sends busy ones to the back, and publishes
/// how many anonymous ones past their grace remain (for [`reclaim_elsewhere`]).
pub(super) fn tidy_queue(shard: &Shard, now: Instant) {
    let grace = Duration::from_secs(shard.cfg.limits.anonymous_grace_s);
    let conns = shard.conns.borrow();
    let mut queue = shard.anonymous.borrow_mut();
    for _ in 0..SWEEP_LOOK {
        let Some(&(_, id)) = queue.front() else { break };
        let conn = conns.get(&id).filter(|c| c.is_open());
        let standing = conn.map(|c| standing_of(shard, c));
        match (conn, standing) {
            (_, Some(Standing::Anonymous)) => break,
            (_, Some(Standing::Busy)) => {
                queue.pop_front();
                queue.push_back((now, id));
            }
            (Some(c), Some(Standing::Known)) => {
                queue.pop_front();
                shard.forget_anonymous(c);
            }
            _ => {
                queue.pop_front();
            }
        }
    }
    // Entries of connections gone, further back: dropped when they are half the queue.
    if queue.len() > 2 * conns.len() + 64 {
        queue.retain(|(_, id)| conns.get(id).is_some_and(|c| c.is_open()));
    }
    // Those that could be closed now (known and busy ones behind the head not counted),
    // among the first SWEEP_LOOK past their grace.
    let ripe = queue
        .iter()
        .take(SWEEP_LOOK)
        .take_while(|(since, _)| now.saturating_duration_since(*since) >= grace)
        .filter(|(_, id)| {
            conns
                .get(id)
                .is_some_and(|c| c.is_open() && standing_of(shard, c) == Standing::Anonymous)
        })
        .count();
    shard.control.anonymous[shard.id].store(ripe, std::sync::atomic::Ordering::Relaxed);
}

/// The oldest anonymous connection past `limits.anonymous_grace_s`, left at the head of
/// the queue.
fn victim(shard: &Shard, now: Instant) -> Option<ConnHandle> {
    let grace = Duration::from_secs(shard.cfg.limits.anonymous_grace_s);
    let mut queue = shard.anonymous.borrow_mut();
    for _ in 0..RECLAIM_LOOK {
        let &(since, id) = queue.front()?;
        if grace.is_zero() || now.saturating_duration_since(since) < grace {
            return None;
        }
        let conn = shard
            .conns
            .borrow()
            .get(&id)
            .filter(|c| c.is_open())
            .cloned();
        let standing = conn.as_ref().map(|c| standing_of(shard, c));
        match (conn, standing) {
            (Some(c), Some(Standing::Anonymous)) => return Some(c),
            (Some(_), Some(Standing::Busy)) => {
                queue.pop_front();
                queue.push_back((now, id));
            }
            (Some(c), Some(Standing::Known)) => {
                queue.pop_front();
                shard.forget_anonymous(&c);
            }
            _ => {
                queue.pop_front();
            }
        }
    }
    None
}

/// What an open connection has to lose: a binding held over it, or what the proxy says.
fn standing_of(shard: &Shard, c: &crate::conn::Conn) -> Standing {
    if c.held_until().is_some() {
        Standing::Known
    } else {
        shard.proxy.borrow().standing(&Flow::Conn(c.id))
    }
}

/// Closes the oldest anonymous connection past its grace, if there is one (the budget is
/// full and a new connection was admitted in its place).
pub(super) fn reclaim(shard: &Shard, now: Instant) {
    if shard.reclaiming.borrow().len() >= MAX_RECLAIMING {
        return;
    }
    let Some(c) = victim(shard, now) else {
        return;
    };
    shard.anonymous.borrow_mut().pop_front();
    shard.reclaiming.borrow_mut().push(c.id);
    shard.count("sipring_connections_reclaimed_total");
    if let Some(left_out) = shard.refusal_log.allow(now) {
        tracing::warn!(
            conn = c.id,
            remote = %c.remote,
            left_out,
            "connection budget full: closed the oldest anonymous connection (nothing \
             authenticated or registered on it, nothing in progress) for a new one; raise \
             limits.max_connections if these are real clients (at most one line a second; \
             sipring_connections_reclaimed_total counts all)"
        );
    }
    c.drop_now("reclaimed");
}

/// Handshakes in flight past which a connection of `kind` is refused: the client listener
/// leaves the last eighth to `mtls`, so clients (or anyone posing as many) filling the slots
/// do not keep partners and cluster nodes from dialling in.
fn handshake_room(limits: &crate::config::LimitsConfig, kind: ListenKind) -> usize {
    let all = limits.max_handshakes_in_flight;
    match kind {
        ListenKind::Mtls => all,
        _ => all - all / 8,
    }
}

/// Counts and (at most once a second) logs a connection refused by limit `why`.
fn refused(shard: &Shard, ip: Option<IpAddr>, why: &str) {
    shard.count(&format!(
        "sipring_connections_refused_total{{limit=\"{why}\"}}"
    ));
    if let Some(left_out) = shard.refusal_log.allow(Instant::now()) {
        tracing::warn!(
            ?ip,
            limit = why,
            left_out,
            "connection refused by limit (at most one line a second; \
             sipring_connections_refused_total counts all)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_has_sixteen_shares_whatever_its_64s() {
        let at = |net: u128, i: u128| IpAddr::V6(((net << 80) | (i << 64) | 9).into());
        let site = 0x2001_0db8_0001u128;
        let tables = || (PerSource::default(), PerSource::default());
        let count = |(per_source, per_site): &(PerSource, PerSource), ip: IpAddr| {
            per_source.add_n(ip, 1);
            per_site.add_n(sipring_core::auth::wide_of(ip).unwrap(), 1);
        };
        let over = |(per_source, per_site): &(PerSource, PerSource), ip| {
            over_share(per_source, per_site, ip, 16)
        };
        // One /64 at its share.
        let t = tables();
        for _ in 0..16 {
            count(&t, at(site, 0));
        }
        assert!(over(&t, at(site, 0)));
        assert!(!over(&t, at(site, 1)), "another /64 of the site");
        // 15 from each of 17 /64s: each under its own share, the site at 255 of 256.
        let t = tables();
        for i in 0..17u128 {
            for _ in 0..15 {
                count(&t, at(site, i));
            }
        }
        assert!(!over(&t, at(site, 1)), "255 of 256");
        count(&t, at(site, 17));
        for i in [1u128, 17, 99] {
            assert!(over(&t, at(site, i)), "/64 {i}");
        }
        // Another site, and IPv4, have their own.
        assert!(!over(&t, at(site + 1, 0)));
        assert!(!over(&t, IpAddr::V4([192, 0, 2, 1].into())));
    }
}
