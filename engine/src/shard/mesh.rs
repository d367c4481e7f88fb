//! The mesh: messages between shards over glommio's bounded channels, with a bounded
//! overflow queue per destination, and their handling on the receiving shard.

use super::*;

/// Messages between shards.
#[derive(Debug)]
pub enum ShardMsg {
    /// Look up an AOR on its owner.
    Lookup {
        /// Who asks.
        from: usize,
        /// Correlation.
        token: u64,
        /// The AOR.
        aor: String,
        /// Asked by another cluster node: a miss is final.
        local_only: bool,
    },
    /// The answer.
    LookupReply {
        /// Correlation.
        token: u64,
        /// The AOR.
        aor: String,
        /// As asked.
        local_only: bool,
        /// The bindings.
        result: Lookup,
    },
    /// Run the registrar on the AOR's owner.
    Register {
        /// Who asks.
        from: usize,
        /// Correlation.
        token: u64,
        /// The AOR.
        aor: String,
        /// The REGISTER.
        request: Vec<u8>,
        /// The connection it arrived on.
        flow: FlowId,
        /// That connection's address (for `limits.max_bindings_per_ip`).
        source: Option<IpAddr>,
    },
    /// The registrar's reply.
    RegisterReply {
        /// Correlation.
        token: u64,
        /// Reply.
        reply: Reply,
        /// The AOR.
        aor: String,
        /// The connection the REGISTER arrived on.
        flow: FlowId,
        /// Until when its bindings of the AOR last, if it holds any.
        hold: Option<Instant>,
    },
    /// Write bytes to a connection this shard owns.
    Send {
        /// The sending shard (it now holds state on the connection: it hears of its close).
        from: usize,
        /// The connection.
        conn: FlowId,
        /// One whole message.
        bytes: Vec<u8>,
        /// Latency stamp.
        stamp: Option<Stamp>,
    },
    /// A response for a client transaction this shard owns, received elsewhere.
    Response {
        /// The flow it arrived on.
        flow: Flow,
        /// The response.
        bytes: Vec<u8>,
    },
    /// Serve this accepted connection here (balanced accept mode).
    Adopt {
        /// The socket.
        fd: HandedFd,
        /// Listener kind.
        kind: ListenKind,
        /// Optional client auth on that listener.
        client_auth: ClientAuth,
    },
    /// A connection of this shard no longer holds a binding of `aor` (expired, or removed
    /// by a REGISTER from elsewhere): its place for the AOR and its hold are given back.
    Released {
        /// The connection.
        conn: FlowId,
        /// The AOR.
        aor: String,
    },
    /// An edge proxy answered 430 for `aor`'s binding of `contact` over `conn`: the owner
    /// removes it ([`sipring_core::stateful::Output::BindingFailed`]).
    BindingFailed {
        /// The AOR.
        aor: String,
        /// The connection the binding was registered over.
        conn: FlowId,
        /// The binding's contact.
        contact: String,
        /// The binding's Path.
        path: Vec<String>,
    },
    /// The connection budget is full and the asking shard has no anonymous connection to
    /// close: close one here ([`super::admission::reclaim`]), for the next newcomer.
    Reclaim,
    /// A connection closed: drop its bindings and fail its transactions.
    FlowClosed {
        /// The connection.
        conn: FlowId,
    },
    /// A partner's CANCEL that names no INVITE on the shard it arrived on: cancel its
    /// INVITE if it is here ([`ShardProxy::cancel_from_elsewhere`]).
    Cancel {
        /// Who asks.
        from: usize,
        /// Correlation.
        token: u64,
        /// The partner that sent it.
        partner: String,
        /// The CANCEL: one copy shared by every shard asked (a partner's CANCELs padded to
        /// `max_message` were copied once per shard, unbounded by the mesh's byte bound).
        request: Arc<[u8]>,
    },
    /// The answer: whether the INVITE was here.
    CancelReply {
        /// Correlation.
        token: u64,
        /// It was (and is cancelled).
        matched: bool,
    },
    /// A dialog's party that was on `gone` (a closed connection) is on `to` now
    /// ([`sipring_core::stateful::Output::Detour`]).
    Detour {
        /// The closed connection.
        gone: Flow,
        /// The dialog.
        call_id: Vec<u8>,
        /// Where the party is now.
        to: Flow,
    },
}

/// Mesh messages for one shard that found its channel full, oldest first.
#[derive(Default)]
pub(super) struct Overflow {
    queue: VecDeque<ShardMsg>,
    /// A task is moving them into the channel: newer messages queue behind.
    draining: bool,
}

/// The message back from a full channel (`None` for a closed one).
fn channel_full<T>(e: glommio::GlommioError<T>) -> Option<T> {
    match e {
        glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m)) => Some(m),
        _ => None,
    }
}

/// Messages a receiver handles in a row before it gives the shard back: a channel that
/// never runs dry (a peer shard refilling it from its overflow queue, a busy trunk's
/// relayed answers) returns at once from every `recv`, and glommio would run this task —
/// no reads, no timers, no other receiver of the shard — until it did (as a connection's
/// task yields after 16 events in a row).
const MESH_IN_A_ROW: u32 = 64;

/// Counts one message handled; every [`MESH_IN_A_ROW`], yields.
pub(super) async fn take_turns(n: u32) -> u32 {
    if n + 1 < MESH_IN_A_ROW {
        return n + 1;
    }
    futures_lite::future::yield_now().await;
    0
}

/// Runs the mesh receivers of a shard (one task per peer shard).
pub fn spawn_mesh_receivers(shard: &Rc<Shard>, mut rx: Receivers<ShardMsg>) {
    for (_, stream) in rx.streams() {
        let s = shard.clone();
        glommio::spawn_local(async move {
            let mut n = 0u32;
            while let Some(msg) = stream.recv().await {
                s.on_mesh(msg);
                n = take_turns(n).await;
            }
        })
        .detach();
    }
}

/// New work is refused (503) once this many times `server.mesh_capacity` messages wait in a
/// shard's overflow queues (and at least [`MESH_OVERFLOW_MIN`]).
pub const MESH_OVERFLOW: usize = 4;

/// The bytes of relayed SIP a shard's mesh backlog may hold (provisional responses half of
/// it): past it they are dropped like those past [`MESH_HARD`].
pub const MESH_BACKLOG_BYTES: usize = 64 << 20;

/// The bytes a mesh message holds that a peer chose: relayed sends and responses.
fn mesh_weight(msg: &ShardMsg) -> usize {
    match msg {
        ShardMsg::Send { bytes, .. } | ShardMsg::Response { bytes, .. } => bytes.len(),
        // A REGISTER relayed to its AOR's shard, or a partner's CANCEL asked of every other
        // shard, carries a whole request too (up to `limits.max_message` each).
        ShardMsg::Register { request, .. } => request.len(),
        ShardMsg::Cancel { request, .. } => request.len(),
        _ => 0,
    }
}

/// How many times the new-work bound the backlog may reach before relayed messages are
/// dropped ([`Shard::mesh_send`]).
pub const MESH_HARD: usize = 16;

/// The least backlog that refuses new work, whatever `server.mesh_capacity`: with small
/// channels a single client's pipelined burst (a few hundred messages) must wait, not be
/// refused; the memory it bounds stays small (about a megabyte per destination).
pub const MESH_OVERFLOW_MIN: usize = 1024;

/// Partner CANCELs a shard may have out asking the other shards for their INVITE; past
/// it one is answered 481 at once (`sipring_queue_drops_total{queue="cancel"}`).
pub const MAX_CANCELS_ASKED: usize = 1024;

impl Shard {
    /// A message from another shard.
    pub fn on_mesh(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Lookup {
                from,
                token,
                aor,
                local_only,
            } => {
                let result = self.lookup(&aor);
                self.reply(
                    from,
                    ShardMsg::LookupReply {
                        token,
                        aor,
                        local_only,
                        result,
                    },
                );
            }
            ShardMsg::LookupReply {
                token,
                aor,
                local_only,
                result,
            } => {
                let stamp = self.stamps.borrow_mut().remove(&token);
                if let Some(r) = self.via_store(token, &aor, local_only, result, stamp) {
                    self.proxy
                        .borrow_mut()
                        .handle_lookup(Instant::now(), token, r);
                    self.pump(stamp);
                }
            }
            ShardMsg::Register {
                from,
                token,
                aor,
                request,
                flow,
                source,
            } => {
                let (reply, hold) = self.register(&aor, &request, flow, source);
                self.release_places();
                self.reply(
                    from,
                    ShardMsg::RegisterReply {
                        token,
                        reply,
                        aor,
                        flow,
                        hold,
                    },
                );
            }
            ShardMsg::RegisterReply {
                token,
                reply,
                aor,
                flow,
                hold,
            } => {
                self.hold_conn(flow, &aor, hold);
                let stamp = self.stamps.borrow_mut().remove(&token);
                self.proxy
                    .borrow_mut()
                    .handle_register_reply(Instant::now(), token, reply);
                self.pump(stamp);
            }
            ShardMsg::Send {
                from,
                conn,
                bytes,
                stamp,
            } => {
                debug_assert_eq!(owner_of(conn), self.id, "Send reached the wrong shard");
                let handle = self.conns.borrow().get(&conn).cloned();
                match handle {
                    Some(h) => {
                        h.involve(from);
                        self.send_local(conn, bytes.into(), stamp);
                    }
                    None => {
                        // Closed before the sender heard: tell it, so its transactions
                        // on the connection fail now instead of timing out.
                        self.count("sipring_queue_drops_total{queue=\"gone\"}");
                        self.reply(from, ShardMsg::FlowClosed { conn });
                    }
                }
            }
            ShardMsg::Response { flow, bytes } => {
                self.proxy
                    .borrow_mut()
                    .handle_message(Instant::now(), &flow, &bytes);
                self.pump(Some(Stamp {
                    t0: Instant::now(),
                    label: "response",
                }));
            }
            ShardMsg::Adopt {
                fd,
                kind,
                client_auth,
            } => {
                // Out of the pending count first: `admit` counts it as a connection.
                if let Some(fd) = fd.take() {
                    admit(self, crate::sys::sock::from_owned_fd(fd), kind, client_auth);
                }
            }
            ShardMsg::FlowClosed { conn } => self.flow_closed(conn),
            ShardMsg::Released { conn, aor } => self.release_place(conn, &aor),
            ShardMsg::Reclaim => reclaim_asked(self, Instant::now()),
            ShardMsg::BindingFailed {
                aor,
                conn,
                contact,
                path,
            } => self.remove_failed_binding(&aor, conn, &contact, &path),
            ShardMsg::Cancel {
                from,
                token,
                partner,
                request,
            } => {
                let matched = self.proxy.borrow_mut().cancel_from_elsewhere(
                    Instant::now(),
                    &partner,
                    &request,
                );
                self.pump(None);
                self.reply(from, ShardMsg::CancelReply { token, matched });
            }
            ShardMsg::Detour { gone, call_id, to } => {
                self.proxy
                    .borrow_mut()
                    .learn_detour(Instant::now(), gone, &call_id, to);
            }
            ShardMsg::CancelReply { token, matched } => {
                let done = {
                    let mut asked = self.cancels_asked.borrow_mut();
                    let Some(entry) = asked.get_mut(&token) else {
                        return;
                    };
                    entry.0 -= 1;
                    entry.1 |= matched;
                    let done = (entry.0 == 0).then_some(entry.1);
                    if done.is_some() {
                        asked.remove(&token);
                    }
                    done
                };
                if let Some(matched) = done {
                    self.proxy
                        .borrow_mut()
                        .handle_cancel_elsewhere(Instant::now(), token, matched);
                    self.pump(None);
                }
            }
        }
    }

    /// Sends an accepted connection to shard `to` (balanced accept mode).
    pub fn adopt_elsewhere(
        self: &Rc<Self>,
        to: usize,
        fd: std::os::fd::OwnedFd,
        kind: ListenKind,
        client_auth: ClientAuth,
    ) {
        let fd = HandedFd::new(&self.control, to, fd);
        self.reply(
            to,
            ShardMsg::Adopt {
                fd,
                kind,
                client_auth,
            },
        );
    }

    /// Sends what finishes admitted work (replies, relayed responses, closes): never
    /// refused for a full channel.
    pub(super) fn reply(self: &Rc<Self>, to: usize, msg: ShardMsg) {
        self.mesh_send(to, msg, false);
    }

    /// Sends on the mesh. A full channel does not refuse: the message waits in shard `to`'s
    /// overflow queue, in order behind any already waiting there (one task per destination
    /// drains it as room frees up; while it runs, every newer message queues), so bursts past `server.mesh_capacity` are absorbed and a
    /// connection's messages are never reordered. The waiting ones are the
    /// `sipring_mesh_backlog` gauge: past 2× `mesh_capacity` of them the shard sheds new
    /// requests ([`Shard::observe_lag`]); with `new_work`, past [`MESH_OVERFLOW`]× (at least
    /// [`MESH_OVERFLOW_MIN`]) it refuses
    /// (false: the caller answers 503), as it does when the destination is gone.
    pub(super) fn mesh_send(self: &Rc<Self>, to: usize, msg: ShardMsg, new_work: bool) -> bool {
        if to >= self.n {
            // No such shard: what names one is forged or stale (its callers checked; this
            // keeps the table index safe whatever happens above).
            return false;
        }
        let cap = self.cfg.server.mesh_capacity;
        let mut overflow = self.overflow.borrow_mut();
        let waiting = &mut overflow[to];
        let msg = if waiting.draining {
            msg
        } else {
            match self.mesh.try_send_to(to, msg) {
                Ok(()) => return true,
                Err(e) => match channel_full(e) {
                    Some(m) => m,
                    None => return false,
                },
            }
        };
        if new_work
            && self.mesh_backlog.get() >= cap.saturating_mul(MESH_OVERFLOW).max(MESH_OVERFLOW_MIN)
        {
            return false;
        }
        // Past MESH_HARD× the new-work bound, what a peer can make us relay without limit
        // (bytes for another shard's connection, responses relayed by their branch — forged
        // ones included —, adopted sockets) is dropped rather than queued: the backlog is
        // memory. Provisional responses and sockets go first; final responses and requests
        // (a CANCEL, a BYE: losing one leaves a call ringing or up) only past twice that.
        // Replies and closes are never dropped (they end state the other shard holds), and
        // are bounded by the work admitted and the connections.
        let hard = cap
            .saturating_mul(MESH_OVERFLOW)
            .max(MESH_OVERFLOW_MIN)
            .saturating_mul(MESH_HARD);
        let provisional = |b: &[u8]| b.starts_with(b"SIP/2.0 1");
        let bound = match &msg {
            ShardMsg::Adopt { .. } => Some(hard),
            ShardMsg::Cancel { .. } => Some(hard.saturating_mul(2)),
            // Best effort: a shard that did not learn of a rebind sends to the closed
            // connection, as before it existed.
            ShardMsg::Detour { .. } => Some(hard),
            ShardMsg::Send { bytes, .. } | ShardMsg::Response { bytes, .. } => {
                Some(if provisional(bytes) {
                    hard
                } else {
                    hard.saturating_mul(2)
                })
            }
            _ => None,
        };
        // And by bytes: messages of up to `max_message` each (a peer's forged responses
        // among them) made the count bound a memory bound of gigabytes.
        let weight = mesh_weight(&msg);
        let byte_bound = if bound == Some(hard) {
            MESH_BACKLOG_BYTES / 2
        } else {
            MESH_BACKLOG_BYTES
        };
        // Only relayed sends and responses are dropped for bytes (a REGISTER or a CANCEL
        // waits for its answer: bounded by count); all of them count toward the total.
        let over_bytes = matches!(msg, ShardMsg::Send { .. } | ShardMsg::Response { .. })
            && self.mesh_backlog_bytes.get() + weight > byte_bound;
        if over_bytes || bound.is_some_and(|b| self.mesh_backlog.get() >= b) {
            drop(overflow);
            self.count("sipring_queue_drops_total{queue=\"mesh\"}");
            if let Some(left_out) = self.mesh_drop_log.allow(Instant::now()) {
                tracing::warn!(
                    to,
                    backlog = self.mesh_backlog.get(),
                    backlog_bytes = self.mesh_backlog_bytes.get(),
                    left_out,
                    "mesh backlog at its hard bound: dropping a relayed message (at most one \
                     line a second; sipring_queue_drops_total{{queue=\"mesh\"}} counts all)"
                );
            }
            return false;
        }
        waiting.queue.push_back(msg);
        self.mesh_backlog.set(self.mesh_backlog.get() + 1);
        self.mesh_backlog_bytes
            .set(self.mesh_backlog_bytes.get() + weight);
        if !waiting.draining {
            waiting.draining = true;
            drop(overflow);
            let me = self.clone();
            glommio::spawn_local(async move {
                // Until the queue is empty, newer messages to `to` queue behind it (even the
                // one being sent has left the queue) instead of overtaking.
                loop {
                    let next = me.overflow.borrow_mut()[to].queue.pop_front();
                    let Some(msg) = next else { break };
                    let w = mesh_weight(&msg);
                    let sent = me.mesh.send_to(to, msg).await;
                    me.mesh_backlog.set(me.mesh_backlog.get() - 1);
                    me.mesh_backlog_bytes.set(me.mesh_backlog_bytes.get() - w);
                    if sent.is_err() {
                        // The destination is gone (shutdown): what waits for it goes too.
                        let dropped = std::mem::take(&mut me.overflow.borrow_mut()[to].queue);
                        me.mesh_backlog.set(me.mesh_backlog.get() - dropped.len());
                        let w: usize = dropped.iter().map(mesh_weight).sum();
                        me.mesh_backlog_bytes.set(me.mesh_backlog_bytes.get() - w);
                        break;
                    }
                }
                me.overflow.borrow_mut()[to].draining = false;
            })
            .detach();
        }
        true
    }
}
