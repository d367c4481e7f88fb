//! The shard's upkeep: the timer loop (transaction timers, binding expiry, metrics
//! publication), the loop's lag and the admission it sets, and the budgets on idle and
//! half-sent connections.

use super::*;

/// The timer loop's period.
const TICK: Duration = Duration::from_millis(10);

impl Shard {
    /// The timer loop woke `late` after it asked to: the loop's lag, which is how long work
    /// waits here before it is looked at. Admission of new requests follows it and the mesh
    /// backlog ([`crate::overload::Shedding`]): what is admitted is kept near the lag target
    /// instead of everything queueing behind an all-or-nothing switch. Each tick's lag goes
    /// to the `loop_lag` latency histogram.
    pub fn observe_lag(&self, late: Duration) {
        if self.control.draining() {
            self.proxy.borrow_mut().set_draining();
        }
        let sample = late.as_micros().min(u128::from(u32::MAX)) as u64;
        self.metrics.borrow_mut().record("loop_lag", sample);
        let backlog = self.mesh_backlog.get();
        let limits = &self.cfg.limits;
        // Clients doing overload control (RFC 7339) drop their share before sending: where
        // they bring most of the load, steer finely (`overload::Tick::fine_limit_us`).
        let oc_on = limits.overload_control != crate::config::OverloadControl::Off;
        let door = self.proxy.borrow_mut().take_door_counts();
        let Some((was, next)) = self.shedding.observe(Tick {
            lag_us: sample,
            limit_us: limits.overload_lag_ms * 1000,
            backlog,
            mesh_capacity: self.cfg.server.mesh_capacity,
            fine_limit_us: oc_on.then(|| limits.overload_control_lag_ms.max(1) * 1000),
            door,
            work: self.work.replace(0),
        }) else {
            return;
        };
        self.proxy.borrow_mut().set_admission(next);
        if was >= 1.0 {
            self.count("sipring_overload_episodes_total");
            if let Some(left_out) = self.overload_log.allow(Instant::now()) {
                tracing::warn!(
                    shard = self.id,
                    lag_ms = sample as f64 / 1000.0,
                    mesh_backlog = backlog,
                    left_out,
                    "shard overloaded: part of new requests get 503 with Retry-After until it catches up"
                );
            }
        } else if next >= 1.0
            && let Some(left_out) = self.caught_up_log.allow(Instant::now())
        {
            tracing::info!(
                shard = self.id,
                left_out,
                "shard caught up: admitting every new request again"
            );
        }
    }

    /// Fires transaction timers, expires bindings, publishes metrics.
    pub fn tick(self: &Rc<Self>, now: Instant, publish: bool) {
        self.proxy.borrow_mut().handle_timeout(now);
        self.pump(None);
        crate::recheck::tick(self, publish, now);
        if publish {
            self.resync_store();
            self.close_links_to_down_nodes();
            self.sweep_idle(now);
            let purged = self.store.borrow_mut().purge(now);
            let changes = self.store.borrow_mut().take_flow_changes();
            self.account_bindings(changes, None);
            self.release_places();
            let mut m = self.metrics.borrow_mut();
            if purged > 0 {
                m.gauge("sipring_bindings", -(purged as i64));
            }
            let (servers, clients, pending) = self.proxy.borrow().load();
            m.set_gauge("sipring_transactions{role=\"server\"}", servers as i64);
            m.set_gauge("sipring_transactions{role=\"client\"}", clients as i64);
            m.set_gauge("sipring_pending_lookups", pending as i64);
            m.set_gauge(
                "sipring_requests_in_progress",
                self.proxy.borrow().in_progress() as i64,
            );
            m.set_gauge("sipring_registered_aors", self.store.borrow().len() as i64);
            m.set_gauge("sipring_handshakes_in_flight", self.handshakes.get() as i64);
            m.set_gauge("sipring_partial_bytes", self.partial_total.get() as i64);
            m.set_gauge("sipring_write_queue_bytes", self.queued_total.get() as i64);
            // The failure ledger is the process's: shard 0 reports it (the gauges are summed).
            if self.id == 0 {
                let sources = self.proxy.borrow().policy().failure_sources(now);
                m.set_gauge("sipring_auth_failure_sources", sources as i64);
            }
            let nonce_flows = self.proxy.borrow().policy().nonce_flows();
            m.set_gauge("sipring_auth_nonce_flows", nonce_flows as i64);
            let detours = self.proxy.borrow().detours();
            m.set_gauge("sipring_dialog_detours", detours as i64);
            let st = self.proxy.borrow().stats();
            m.counters
                .insert("sipring_requests_forwarded_total".into(), st.forwarded);
            m.counters.insert(
                "sipring_responses_dropped_total".into(),
                st.dropped_responses,
            );
            m.counters
                .insert("sipring_requests_rejected_total".into(), st.rejected);
            m.counters
                .insert("sipring_requests_dropped_total".into(), st.dropped_requests);
            m.counters
                .insert("sipring_local_responses_total".into(), st.local_responses);
            m.counters
                .insert("sipring_auth_challenges_total".into(), st.challenges);
            m.counters
                .insert("sipring_overload_shed_total".into(), st.shed);
            m.counters
                .insert("sipring_drain_refused_total".into(), st.drained);
            m.counters
                .insert("sipring_retiring_refused_total".into(), st.flow_drained);
            m.counters
                .insert("sipring_overload_feedback_total".into(), st.oc_feedback);
            m.counters.insert(
                "sipring_overload_partner_dropped_total".into(),
                st.oc_dropped,
            );
            m.counters
                .insert("sipring_flow_failovers_total".into(), st.flow_failovers);
            m.counters
                .insert("sipring_dialog_rebinds_total".into(), st.dialog_rebinds);
            m.counters.insert(
                "sipring_unanswered_lookups_total".into(),
                st.unanswered_lookups,
            );
            m.set_gauge(
                "sipring_overloaded",
                i64::from(self.shedding.admitted() < 1.0),
            );
            m.set_gauge("sipring_mesh_backlog", self.mesh_backlog.get() as i64);
            let snap = Snapshot {
                shard: self.id,
                metrics: m.clone(),
            };
            drop(m);
            self.control.snapshots[self.id].store(Arc::new(snap));
        }
    }

    /// Closes connections that received nothing for `limits.idle_timeout_s` (half-open
    /// peers) and hold no binding that still lasts: one pass over the table every
    /// publication tick instead of a timer per connection.
    fn sweep_idle(&self, now: Instant) {
        let idle = Duration::from_secs(self.cfg.limits.idle_timeout_s);
        let partial = Duration::from_millis(self.cfg.limits.partial_timeout_ms);
        let mut idle_out = Vec::new();
        let mut slow = Vec::new();
        let mut ping = Vec::new();
        for c in self.conns.borrow().values().filter(|c| c.is_open()) {
            if c.outbound && now.saturating_duration_since(c.last_rx()) >= idle / 2 {
                ping.push(c.clone());
            }
            if c.partial_since()
                .is_some_and(|t| now.saturating_duration_since(t) >= partial)
            {
                slow.push(c.clone());
            } else if now.saturating_duration_since(c.last_rx()) >= idle
                && c.held_until().is_none_or(|t| now >= t)
            {
                idle_out.push(c.clone());
            }
        }
        // Links we dialled, quiet for half the idle timeout: pinged (outside the table's
        // borrow: a send can close a connection).
        for c in ping {
            if c.ping_if_quiet(self, now, idle / 2) {
                self.count("sipring_keepalive_pings_total");
            }
        }
        tidy_queue(self, now);
        for c in idle_out {
            tracing::debug!(conn = c.id, remote = %c.remote, "idle timeout");
            self.count("sipring_idle_timeouts_total");
            c.close("idle_timeout");
        }
        for c in slow {
            // A message (or TLS record) that does not complete in time: a trickle, or a
            // peer that stalled mid-message. Nothing is answered for a message never whole.
            self.count("sipring_partial_timeouts_total");
            if let Some(left_out) = self.refusal_log.allow(now) {
                tracing::warn!(
                    conn = c.id,
                    remote = %c.remote,
                    held = c.partial_len(),
                    left_out,
                    "message incomplete after limits.partial_timeout_ms: closing (at most one \
                     line a second; sipring_partial_timeouts_total counts all)"
                );
            }
            c.drop_now("partial_timeout");
        }
    }

    /// A connection's bytes held for an incomplete message went from `before` to `after`.
    pub fn partial_changed(&self, before: usize, after: usize) {
        self.partial_total
            .set(self.partial_total.get().saturating_sub(before) + after);
    }

    /// Past `limits.partial_bytes_per_shard`, drops the connection holding the most: a
    /// client's before a partner's or node's link, as for the write budget (many clients
    /// each holding a little less than a busy carrier link's record in progress had the
    /// link dropped, and every call on it with it).
    pub fn enforce_partial_budget(&self) {
        let budget = self.cfg.limits.partial_bytes_per_shard;
        while self.partial_total.get() > budget {
            let victim = self
                .conns
                .borrow()
                .values()
                .filter(|c| c.is_open() && c.partial_len() > 0)
                .max_by_key(|c| (c.principal.partner().is_none(), c.partial_len()))
                .cloned();
            let Some(c) = victim else { break };
            self.count("sipring_partial_budget_drops_total");
            if let Some(left_out) = self.refusal_log.allow(Instant::now()) {
                tracing::warn!(
                    conn = c.id,
                    remote = %c.remote,
                    held = c.partial_len(),
                    total = self.partial_total.get(),
                    budget,
                    left_out,
                    "incomplete messages past limits.partial_bytes_per_shard: dropping the \
                     largest holder"
                );
            }
            // Its bytes leave the total when its task ends; do not pick it twice.
            let held = c.partial_len();
            self.partial_total
                .set(self.partial_total.get().saturating_sub(held));
            c.drop_now("partial_budget");
            c.forget_partial();
        }
    }

    /// A connection's queued output went from `before` to `after` bytes; past
    /// `limits.write_queue_bytes_per_shard` the connection holding the most is dropped.
    pub fn queue_changed(&self, before: usize, after: usize) {
        self.queued_total
            .set(self.queued_total.get().saturating_sub(before) + after);
        if after <= before {
            return;
        }
        let budget = self.cfg.limits.write_queue_bytes_per_shard;
        while self.queued_total.get() > budget {
            // Clients before partner links: a peer must not make itself look smaller than a
            // busy carrier link to have the link dropped instead of itself.
            let victim = self
                .conns
                .borrow()
                .values()
                .filter(|c| c.is_open() && c.queued() > 0)
                .max_by_key(|c| (c.principal.partner().is_none(), c.queued()))
                .cloned();
            let Some(c) = victim else { break };
            self.count("sipring_queue_drops_total{queue=\"shard_budget\"}");
            if let Some(left_out) = self.conn_log.allow(Instant::now()) {
                tracing::warn!(
                    conn = c.id,
                    remote = %c.remote,
                    queued = c.queued(),
                    total = self.queued_total.get(),
                    budget,
                    left_out,
                    "queued output past limits.write_queue_bytes_per_shard: dropping the \
                     connection holding the most (at most one line a second)"
                );
            }
            // Its bytes leave the total now; its close does not count them again.
            self.queued_total
                .set(self.queued_total.get().saturating_sub(c.queued()));
            c.forget_queued();
            c.drop_now("write_budget");
        }
    }
}

/// The shard's timer loop: transaction timers (10 ms granularity), binding expiry and
/// metrics publication (every 500 ms). Returns when the shard must stop.
pub async fn timer_loop(shard: Rc<Shard>) {
    let mut last_publish = Instant::now();
    loop {
        let asked = Instant::now() + TICK;
        glommio::timer::sleep(TICK).await;
        let now = Instant::now();
        shard.observe_lag(now.saturating_duration_since(asked));
        let publish = now.duration_since(last_publish) >= Duration::from_millis(500);
        if publish {
            last_publish = now;
        }
        shard.tick(now, publish);
        if shard.control.stopping() {
            shard.tick(now, true);
            return;
        }
    }
}
