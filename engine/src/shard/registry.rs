//! The shard's slice of the registrar and, in a cluster, its side of the location store:
//! lookups, registrations, bindings per connection and per source, write-through.

use super::*;

/// A shard's side of the location store: its handle, the channel answers come back on, and
/// the lookups waiting for one (with what the local tables said).
pub(super) struct ClusterLink {
    pub(super) store: crate::cluster::Store,
    pub(super) reply: Arc<crate::lanes::Replies<crate::cluster::Found>>,
    /// Whether the reply task has been started (once).
    pub(super) replies_started: Cell<bool>,
    pub(super) waiting: RefCell<HashMap<u64, (Lookup, Option<Stamp>)>>,
    /// REGISTERs answered here whose removals go to the other nodes holding their AOR, by
    /// the token of the store read that names those nodes ([`REMOVAL_TOKEN`] set).
    pub(super) removals: RefCell<HashMap<u64, (String, Vec<u8>)>>,
    /// The last removal token's number.
    pub(super) removal_seq: Cell<u64>,
    /// AORs whose removal could not be asked for (the store's queue was full), with when:
    /// their next REGISTER asks again, even a refresh. Bounded like `removals`; an entry
    /// older than the longest registration is moot (what it would remove has expired) and
    /// makes room (an AOR that never registers here again held its place for good).
    pub(super) removal_retry: RefCell<HashMap<String, Instant>>,
    /// When `removal_retry` was last pruned (at most once a second: a full table of
    /// fresh entries is not scanned again for every REGISTER of a store outage).
    pub(super) removal_retry_pruned: Cell<Instant>,
    /// The bytes of the REGISTERs held in `removals` (bounded by [`MAX_REMOVAL_BYTES`]).
    pub(super) removal_bytes: Cell<usize>,
    /// The store's resync generation this shard has answered, and the AORs it still has to
    /// write again for it (a few thousand per tick, so a large table does not flood the
    /// write queue).
    pub(super) resync: RefCell<(u64, Vec<String>)>,
    /// Each other node's down generation this shard has acted on
    /// ([`crate::cluster::Store::down_generations`]).
    pub(super) seen_down: RefCell<HashMap<String, u64>>,
}

/// AORs a shard writes again per tick (every 500 ms) after the store lost its data.
const RESYNC_PER_TICK: usize = 2000;

use crate::cluster::REMOVAL_TOKEN;

/// REGISTERs whose removals wait for the store to name the nodes holding their AOR, per
/// shard; past it the removal is not sent (counted): the bindings elsewhere then expire.
const MAX_REMOVALS_WAITING: usize = 4096;

/// Feeds the location store's answers to the shard (a no-op when not clustered).
pub fn spawn_store_replies(shard: &Rc<Shard>) {
    let Some(c) = shard
        .cluster
        .as_ref()
        .filter(|c| !c.replies_started.replace(true))
    else {
        return;
    };
    let rx = c.reply.clone();
    let s = shard.clone();
    // Runs as long as the shard's executor: the store thread holds its end until it stops.
    glommio::spawn_local(async move {
        let mut n = 0u32;
        loop {
            let f = std::future::poll_fn(|cx| rx.poll_pop(cx)).await;
            s.on_store_reply(f);
            n = take_turns(n).await;
        }
    })
    .detach();
}

/// The bytes of REGISTERs a shard may hold waiting for the store to say which other nodes
/// their removals go to (besides [`MAX_REMOVALS_WAITING`] of them): 4,096 of up to
/// `limits.max_message` each were 256 MiB. Past it the AOR's next REGISTER asks again.
pub const MAX_REMOVAL_BYTES: usize = 16 << 20;

impl Shard {
    /// A lookup's local answer. A miss, in a cluster, asks the location store which other
    /// nodes hold the AOR (unless the request came from a node: one hop, no loops); the
    /// store's answer finishes it in [`Shard::on_store_reply`] and this returns `None`.
    /// Otherwise: the result to hand the proxy now.
    pub(super) fn via_store(
        &self,
        token: u64,
        aor: &str,
        local_only: bool,
        result: Lookup,
        stamp: Option<Stamp>,
    ) -> Option<Lookup> {
        let miss = matches!(result, Lookup::NotRegistered | Lookup::Unknown);
        match &self.cluster {
            Some(c) if miss && !local_only => {
                if c.store.lookup(aor, token, &c.reply) {
                    self.count("sipring_store_total{op=\"lookup\",result=\"asked\"}");
                    c.waiting.borrow_mut().insert(token, (result, stamp));
                    return None;
                }
                self.count("sipring_store_total{op=\"lookup\",result=\"queue_full\"}");
                Some(Lookup::Unavailable)
            }
            _ => Some(result),
        }
    }

    /// Notes that `aor`'s removals elsewhere are to be asked again at its next REGISTER
    /// here; when the table is full, entries older than the longest registration go first.
    fn retry_removal(&self, c: &ClusterLink, aor: String) {
        let mut retry = c.removal_retry.borrow_mut();
        let now = Instant::now();
        if retry.len() >= MAX_REMOVALS_WAITING
            && now.duration_since(c.removal_retry_pruned.get()) >= Duration::from_secs(1)
        {
            c.removal_retry_pruned.set(now);
            let moot = Duration::from_secs(self.cfg.registrar.max_expires_s.into());
            retry.retain(|_, at| now.duration_since(*at) < moot);
        }
        // An AOR already waiting is dated anew: this failure is what it would remove.
        if retry.contains_key(&aor) || retry.len() < MAX_REMOVALS_WAITING {
            retry.insert(aor, now);
        }
    }

    /// Asks the store which other nodes hold `aor`, to send them what the REGISTER
    /// `request` (answered 200 here) removes ([`Shard::on_store_reply`] sends it).
    pub(super) fn remove_elsewhere(&self, aor: &str, request: &[u8]) {
        let Some(c) = &self.cluster else { return };
        let full = || {
            self.count("sipring_store_total{op=\"removal\",result=\"queue_full\"}");
            self.retry_removal(c, aor.to_string());
        };
        if c.removals.borrow().len() >= MAX_REMOVALS_WAITING
            || c.removal_bytes.get() + request.len() > MAX_REMOVAL_BYTES
        {
            return full();
        }
        c.removal_seq.set(c.removal_seq.get() + 1);
        let token = REMOVAL_TOKEN | c.removal_seq.get();
        if c.store.lookup(aor, token, &c.reply) {
            c.removals
                .borrow_mut()
                .insert(token, (aor.to_string(), request.to_vec()));
            c.removal_bytes.set(c.removal_bytes.get() + request.len());
            self.count("sipring_store_total{op=\"removal\",result=\"asked\"}");
        } else {
            full();
        }
    }

    /// The location store's answer to a lookup this shard asked.
    pub fn on_store_reply(self: &Rc<Self>, found: crate::cluster::Found) {
        let Some(c) = &self.cluster else { return };
        let removal = c.removals.borrow_mut().remove(&found.token);
        if let Some((aor, request)) = removal {
            c.removal_bytes
                .set(c.removal_bytes.get().saturating_sub(request.len()));
            let Some(nodes) = found.nodes else {
                // The store could not say who holds it (a failover, a timeout, liveness not
                // read yet): asked again at the AOR's next REGISTER here, as when the queue
                // was full — dropped, the old node kept the device's stale binding.
                self.count("sipring_store_total{op=\"removal\",result=\"error\"}");
                self.retry_removal(c, aor);
                return;
            };
            let now = Instant::now();
            let mut sent = 0;
            for node in &nodes {
                sent += u64::from(self.proxy.borrow_mut().send_removals(now, node, &request));
            }
            self.metrics
                .borrow_mut()
                .inc("sipring_store_total{op=\"removal\",result=\"sent\"}", sent);
            self.pump(None);
            return;
        }
        let Some((miss, stamp)) = c.waiting.borrow_mut().remove(&found.token) else {
            return;
        };
        let (label, result) = match found.nodes {
            Some(n) if !n.is_empty() => ("found", Lookup::Nodes(n)),
            // Bindings of a dead node: the user exists and cannot be reached now.
            Some(_) if found.known => ("miss", Lookup::NotRegistered),
            Some(_) => ("miss", miss),
            None => ("error", Lookup::Unavailable),
        };
        self.count(match label {
            "found" => "sipring_store_total{op=\"lookup\",result=\"found\"}",
            "miss" => "sipring_store_total{op=\"lookup\",result=\"miss\"}",
            _ => "sipring_store_total{op=\"lookup\",result=\"error\"}",
        });
        self.proxy
            .borrow_mut()
            .handle_lookup(Instant::now(), found.token, result);
        self.pump(stamp);
    }

    /// Writes this node's bindings of `aor` through to the location store (its owner shard
    /// calls this after every change).
    pub(super) fn write_through(&self, aor: &str) -> bool {
        let Some(c) = &self.cluster else { return true };
        let now = Instant::now();
        let now_ms = crate::cluster::unix_ms();
        let store = self.store.borrow();
        let list: Vec<_> = store
            .get(aor)
            .iter()
            .filter(|b| b.expires_at > now)
            .map(|b| {
                (
                    now_ms + (b.expires_at - now).as_millis() as u64,
                    b.flow,
                    b.instance.as_deref().unwrap_or(""),
                    b.reg_id,
                    b.contact.as_str(),
                )
            })
            .collect();
        let field = c.store.value(&list);
        drop(store);
        if c.store.write(aor, field) {
            self.count("sipring_store_total{op=\"write\",result=\"queued\"}");
            true
        } else {
            self.count("sipring_store_total{op=\"write\",result=\"queue_full\"}");
            false
        }
    }

    /// After the location store lost this node's data (its generation moved): writes every
    /// AOR this shard holds again, [`RESYNC_PER_TICK`] per call.
    pub(super) fn resync_store(&self) {
        let Some(c) = &self.cluster else { return };
        let generation = c.store.resync_generation();
        let batch: Vec<String> = {
            let mut r = c.resync.borrow_mut();
            if r.0 != generation {
                r.0 = generation;
                r.1 = self.store.borrow().aors().map(str::to_string).collect();
            }
            let keep = r.1.len().saturating_sub(RESYNC_PER_TICK);
            r.1.split_off(keep)
        };
        // What the queue could not take (every shard resyncs at once) waits for the next
        // tick: dropped, the AOR stayed out of the store until its phone's next refresh.
        let left: Vec<String> = batch
            .into_iter()
            .filter(|aor| !self.write_through(aor))
            .collect();
        if !left.is_empty() {
            c.resync.borrow_mut().1.extend(left);
        }
    }

    /// Registrar lookup on this (owner) shard.
    pub(super) fn lookup(&self, aor: &str) -> Lookup {
        debug_assert_eq!(
            shard_for(aor, self.n).0 as usize,
            self.id,
            "lookup reached the wrong shard"
        );
        let store = self.store.borrow();
        let b = self.registrar.reaches(Instant::now(), &*store, aor);
        if !b.is_empty() {
            Lookup::Found(b)
        } else if self.known.borrow().contains(aor) {
            Lookup::NotRegistered
        } else {
            Lookup::Unknown
        }
    }

    /// Runs the registrar on this (owner) shard. A REGISTER that would take its source
    /// address past `limits.max_bindings_per_ip` (all shards together) is undone and
    /// answered 403.
    /// A binding over connection `flow` lasts until `hold`: the idle sweep keeps the
    /// connection that long (RFC 5923: the registration is the reason it stays open; a
    /// phone without keepalives refreshes only when its registration runs out).
    pub(super) fn hold_conn(&self, flow: FlowId, aor: &str, hold: Option<Instant>) {
        if let Some(c) = self.conns.borrow().get(&flow) {
            c.hold(aor, hold);
            if hold.is_some() {
                self.forget_anonymous(c);
            }
        }
    }

    /// Runs the registrar for `aor` on its owner (this shard); also returns until when the
    /// AOR's bindings over `flow` last, if it has any.
    pub(super) fn register(
        &self,
        aor: &str,
        request: &[u8],
        flow: FlowId,
        source: Option<IpAddr>,
    ) -> (Reply, Option<Instant>) {
        let reply = self.run_registrar(aor, request, flow, source);
        let hold = self
            .store
            .borrow()
            .get(aor)
            .iter()
            .filter(|b| b.flow == flow)
            .map(|b| b.expires_at)
            .max();
        (reply, hold)
    }

    pub(super) fn run_registrar(
        &self,
        aor: &str,
        request: &[u8],
        flow: FlowId,
        source: Option<IpAddr>,
    ) -> Reply {
        debug_assert_eq!(
            shard_for(aor, self.n).0 as usize,
            self.id,
            "REGISTER reached the wrong shard"
        );
        let limits = self.cfg.sip_limits();
        let mut h = [Header::EMPTY; 64];
        let Ok(Status::Complete(m)) = parse(request, &mut h, &limits, Framing::Stream) else {
            return Reply {
                code: 400,
                reason: "Bad Request",
                headers: Vec::new(),
                flow_holds: false,
            };
        };
        let Ok(e) = m.validate(&limits) else {
            return Reply {
                code: 400,
                reason: "Bad Request",
                headers: Vec::new(),
                flow_holds: false,
            };
        };
        let limit = self.cfg.limits.max_bindings_per_ip;
        let mut store = self.store.borrow_mut();
        let snapshot = (limit > 0 && source.is_some()).then(|| store.get(aor).to_vec());
        let before = store.bindings();
        let reply = self
            .registrar
            .handle_register(Instant::now(), &m, &e, aor, flow, &mut *store);
        let changes = store.take_flow_changes();
        if let (Some(ip), Some(snapshot)) = (source, snapshot) {
            let added: i64 = changes
                .iter()
                .filter(|(f, _)| {
                    *f == flow || self.flow_src.borrow().get(f).is_some_and(|s| s.0 == ip)
                })
                .map(|(_, d)| d)
                .sum();
            let have = self.control.bindings_per_source.get(ip) as i64;
            if added > 0 && have + added > limit as i64 {
                store.put(aor, snapshot);
                let _ = store.take_flow_changes();
                // Undone: what it released holds again (and the flow's own place follows
                // the 403 below).
                let _ = store.take_released();
                drop(store);
                self.refused(&sipring_core::policy::Refusal {
                    label: "register_bindings_per_ip",
                    detail: format!(
                        "{aor}: {have} bindings from {ip} (limits.max_bindings_per_ip {limit})"
                    ),
                    source: Some(ip),
                });
                self.metrics.borrow_mut().inc(register_name(403), 1);
                return Reply {
                    code: 403,
                    reason: "Too Many Bindings From This Address",
                    headers: Vec::new(),
                    flow_holds: false,
                };
            }
        }
        let after = store.bindings();
        drop(store);
        // A binding new here (not a refresh of one this node holds): the device may have
        // moved from another node.
        let bound_here = changes.iter().any(|&(_, d)| d > 0);
        self.account_bindings(changes, source.map(|ip| (flow, ip)));
        let mut reply = reply;
        if reply.code == 200 {
            self.known.borrow_mut().insert(aor);
            self.write_through(aor);
            // RFC 3261 §10.3 step 8: a Date, which phones without NTP set their clocks by.
            reply.headers.push((
                "Date",
                httpdate::fmt_http_date(std::time::SystemTime::now()).into_bytes(),
            ));
            // A UA's REGISTER (not another node's) that removes bindings, or binds an
            // instance here anew: what other nodes hold of it goes too. A refresh of a
            // binding this node already holds asks nothing (the store read is what the
            // fan-out costs: one per refresh of every phone, before); the move that put
            // the binding here already removed it elsewhere.
            // A REGISTER with nothing to remove (a query) leaves a pending retry for the
            // next one (it was taken, and lost, before).
            if flow != NODE_FLOW
                && let Some(c) = &self.cluster
                && (bound_here
                    || sipring_core::registrar::removes_any(&m)
                    || c.removal_retry.borrow().contains_key(aor))
                && sipring_core::registrar::removals_for_nodes(&m).is_some()
            {
                c.removal_retry.borrow_mut().remove(aor);
                self.remove_elsewhere(aor, request);
            }
        }
        let mut m = self.metrics.borrow_mut();
        m.gauge("sipring_bindings", after as i64 - before as i64);
        m.inc(register_name(reply.code), 1);
        reply
    }

    /// Closes this shard's links to the nodes the store found down since the last call: a
    /// node whose host froze or was cut off sends no RST, and its link stayed up until TCP
    /// gave up (`limits.tcp_user_timeout_s`), every request and in-dialog message over it
    /// waiting for its 408 after 32 s. Closed, what is in progress on it fails at once (480
    /// for a node), and the next message dials again.
    pub(super) fn close_links_to_down_nodes(&self) {
        let Some(c) = &self.cluster else { return };
        let mut down = Vec::new();
        {
            let mut seen = c.seen_down.borrow_mut();
            for (node, generation, down_now) in c.store.down_generations() {
                let last = seen.entry(node.to_string()).or_insert(0);
                if generation > *last {
                    *last = generation;
                    // Found alive again since (a key briefly absent: a failover that lost
                    // the write, a stall): its link is left alone.
                    if down_now {
                        down.push(node.to_string());
                    }
                }
            }
        }
        for node in down {
            let id = match self.peers.borrow().get(&node) {
                Some(PeerLink::Up(id, _)) => *id,
                _ => continue,
            };
            if let Some(conn) = self.conns.borrow().get(&id) {
                self.count("sipring_node_links_closed_total");
                tracing::warn!(
                    node,
                    "closing the link to a cluster node the store found down"
                );
                conn.close("node_down");
            }
        }
    }

    /// Removes `aor`'s binding of `contact` over `conn`, for which an edge proxy answered
    /// 430 Flow Failed (RFC 5626 §5.3, §7), on its owner (this shard): counted, written
    /// through to the cluster's store, and its connection's place given back.
    pub(super) fn remove_failed_binding(
        self: &Rc<Self>,
        aor: &str,
        conn: FlowId,
        contact: &str,
        path: &[String],
    ) {
        let mut store = self.store.borrow_mut();
        let before = store.bindings();
        if !sipring_core::registrar::remove_binding(&mut *store, aor, conn, contact, path) {
            return;
        }
        let changes = store.take_flow_changes();
        let after = store.bindings();
        drop(store);
        self.account_bindings(changes, None);
        self.write_through(aor);
        self.release_places();
        let mut m = self.metrics.borrow_mut();
        m.gauge("sipring_bindings", after as i64 - before as i64);
        m.inc("sipring_bindings_flow_failed_total", 1);
        drop(m);
        tracing::info!(
            aor,
            contact,
            "binding removed: its edge proxy answered 430 Flow Failed (RFC 5626)"
        );
    }

    /// Tells the shards of the connections that no longer hold a binding of an AOR (the
    /// registrar's [`MemoryStore::take_released`]) to give back their place for it, before
    /// any answer to a later REGISTER of theirs (the mesh keeps order between two shards).
    pub(super) fn release_places(self: &Rc<Self>) {
        let released = self.store.borrow_mut().take_released();
        for (conn, aor) in released {
            if conn == NODE_FLOW {
                continue;
            }
            let owner = owner_of(conn);
            if owner == self.id || owner >= self.n {
                self.release_place(conn, &aor);
            } else {
                let aor = aor.to_string();
                self.mesh_send(owner, ShardMsg::Released { conn, aor }, false);
            }
        }
    }

    /// One of this shard's connections no longer holds a binding of `aor`.
    pub(super) fn release_place(&self, conn: FlowId, aor: &str) {
        self.hold_conn(conn, aor, None);
        self.proxy.borrow_mut().release_aor(&Flow::Conn(conn), aor);
    }

    /// Applies the registrar's per-flow changes to the per-source binding counts (shared by
    /// every shard); `new_flow` names the address of a flow this shard may not know yet.
    pub(super) fn account_bindings(
        &self,
        changes: Vec<(FlowId, i64)>,
        new_flow: Option<(FlowId, IpAddr)>,
    ) {
        let mut src = self.flow_src.borrow_mut();
        for (f, d) in changes {
            let ip = match (src.get(&f), new_flow) {
                (Some((ip, _)), _) => *ip,
                (None, Some((nf, ip))) if nf == f => ip,
                // A flow without an address (none for a partner's): not counted.
                _ => continue,
            };
            let e = src.entry(f).or_insert((ip, 0));
            e.1 += d;
            if e.1 <= 0 {
                src.remove(&f);
            }
            self.control.bindings_per_source.add_n(ip, d);
        }
    }
}
