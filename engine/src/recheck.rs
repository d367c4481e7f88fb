//! Certificates of connections already up, checked again: a handshake verifies a chain once,
//! but a carrier link or a phone stays connected for days. When a reload swaps in a new TLS
//! policy (a CRL that revokes a partner or a phone, a partner removed, new roots) and when a
//! certificate of a chain passes its notAfter, each affected connection's chain is verified
//! again against the policy in force ([`TlsPolicy::recheck`]); one that no longer passes is
//! closed (close_notify), which ends its bindings and transactions like any close.
//!
//! ```text
//!  reload ─► Control::tls_generation += 1
//!  shard tick ─► generation moved? queue every connection verified under an older one
//!           ─► (every 500 ms) a chain past its notAfter? queue it
//!           ─► verify at most RECHECK_PER_TICK queued chains (10 ms ticks: thousands of
//!              certificate-bearing phones are spread over seconds, not one stall)
//! ```
//!
//! [`TlsPolicy::recheck`]: crate::tls::TlsPolicy::recheck

use crate::shard::Shard;
use sipring_core::registrar::FlowId;
use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::time::Instant;

/// Chains verified per 10 ms tick (a chain costs tens of microseconds).
const RECHECK_PER_TICK: usize = 16;

/// A shard's re-check state.
#[derive(Debug, Default)]
pub struct Rechecks {
    /// The policy generation this shard has queued its connections for.
    seen: Cell<u64>,
    /// Connections still to check, first queued first (each once: `queued`). A reload
    /// appends what it adds and keeps what an earlier one queued: reloads that came faster
    /// than one pass (a provisioning portal reloading per subscriber change) emptied and
    /// refilled the queue in the same order each time, and the connections at its back were
    /// never checked (one a new CRL revoked stayed up).
    queue: RefCell<VecDeque<FlowId>>,
    queued: RefCell<HashSet<FlowId>>,
}

impl Rechecks {
    /// A connection just opened: if its handshake ran under a policy older than the one this
    /// shard has already re-checked for (a reload during its handshake), it is checked too.
    pub fn opened(&self, conn: &crate::conn::Conn) {
        if conn
            .chain
            .as_ref()
            .is_some_and(|c| c.generation.get() < self.seen.get())
        {
            self.push(conn.id);
        }
    }

    fn push(&self, id: FlowId) {
        if self.queued.borrow_mut().insert(id) {
            self.queue.borrow_mut().push_back(id);
        }
    }

    fn pop(&self) -> Option<FlowId> {
        let id = self.queue.borrow_mut().pop_front()?;
        self.queued.borrow_mut().remove(&id);
        Some(id)
    }
}

/// One tick of re-checking on `shard` (`publish`: the 500 ms tick, which also looks for
/// expired chains).
pub fn tick(shard: &Shard, publish: bool, now: Instant) {
    let r = &shard.rechecks;
    let generation = shard.control.tls_generation();
    if generation != r.seen.get() {
        r.seen.set(generation);
        for c in shard.conns.borrow().values() {
            if c.chain
                .as_ref()
                .is_some_and(|ch| ch.generation.get() < generation)
            {
                r.push(c.id);
            }
        }
    }
    if publish {
        let t = (crate::cluster::unix_ms() / 1000) as i64;
        let policy = shard.policy.load();
        let (anchors, client_anchors) = (
            policy.anchor_expiries.clone(),
            policy.client_anchor_expiries.clone(),
        );
        for c in shard.conns.borrow().values() {
            // Checked at each expiry in its chain: one that still verifies (a presented root
            // webpki does not use expired) stays until the next. notAfter is the last valid
            // second (RFC 5280 §4.1.2.5): past it, not at it. Partner roots' expiries count
            // for partner links, the client roots' for phones.
            if let Some(ch) = &c.chain
                && ch.expires.get() < t
            {
                let anchors = if c.principal.partner().is_some() {
                    &anchors[..]
                } else {
                    &client_anchors[..]
                };
                ch.expires.set(ch.next_expiry(t, anchors));
                r.push(c.id);
            }
        }
    }
    if r.queue.borrow().is_empty() {
        return;
    }
    let policy = shard.policy.load_full();
    for _ in 0..RECHECK_PER_TICK {
        let Some(id) = r.pop() else {
            break;
        };
        let Some(c) = shard.conns.borrow().get(&id).cloned() else {
            continue;
        };
        let Some(chain) = c.chain.as_ref().filter(|_| c.is_open()) else {
            continue;
        };
        chain.generation.set(generation);
        // Under this policy's roots (a reload may bring ones that lapse sooner): partner
        // roots for a partner, the client roots for a phone (whose certificate goes on
        // proving its AORs until then).
        let anchors = match c.principal.partner() {
            Some(_) => &policy.anchor_expiries,
            None => &policy.client_anchor_expiries,
        };
        let t = (crate::cluster::unix_ms() / 1000) as i64;
        chain.expires.set(chain.next_expiry(t, anchors));
        let outbound = c.outbound;
        let Err((reason, detail)) = policy.recheck(&c.principal, outbound, &chain.certs) else {
            continue;
        };
        shard.count(&format!(
            "sipring_tls_recheck_closed_total{{reason=\"{}\"}}",
            reason.label()
        ));
        match c.principal.partner() {
            // Partners are few and each one matters: every closure is logged.
            Some(partner) => tracing::warn!(
                conn = c.id,
                remote = %c.remote,
                partner,
                direction = if outbound { "outbound" } else { "inbound" },
                reason = reason.label(),
                %detail,
                "partner certificate no longer passes the TLS policy in force: closing its connection"
            ),
            None => {
                if let Some(left_out) = shard.refusal_log.allow(now) {
                    tracing::warn!(
                        conn = c.id,
                        remote = %c.remote,
                        reason = reason.label(),
                        left_out,
                        "client certificate no longer passes the TLS policy in force: closing \
                         its connection (at most one line a second; \
                         sipring_tls_recheck_closed_total counts all)"
                    );
                }
            }
        }
        c.close("certificate_recheck");
    }
}

#[cfg(test)]
mod tests {
    use super::Rechecks;

    #[test]
    fn the_queue_is_first_in_first_out_and_holds_each_connection_once() {
        // What a reload queues goes behind what earlier ones queued, and what is queued
        // already keeps its place: connections at the back are reached however often the
        // policy changes (the queue was emptied and refilled in one order per reload).
        let r = Rechecks::default();
        for id in [3, 1, 2] {
            r.push(id);
        }
        assert_eq!(r.pop(), Some(3));
        // A second reload queues everything again: 1 and 2 keep their places, 3 comes last.
        for id in [2, 3, 1] {
            r.push(id);
        }
        let order: Vec<_> = std::iter::from_fn(|| r.pop()).collect();
        assert_eq!(order, [1, 2, 3]);
        assert_eq!(r.pop(), None);
    }
}
