//! The TLS handshake of a connection, both ways: accepting a client or a partner (deadline,
//! per-source slot, what the certificate proves, the hand-off of the record layer to the
//! kernel when it can take it) and dialing a partner or a cluster node.

use super::*;

/// Races `fut` against a timer.
pub(super) async fn with_timeout<T>(d: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(d).await;
        None
    })
    .await
}

/// The kernel cipher of a suite, with whether it is TLS 1.3 (`None`: not one the kernel
/// holds; the `ktls` crate maps AES-GCM and ChaCha20-Poly1305).
fn kernel_cipher(suite: rustls::SupportedCipherSuite) -> Option<(bool, sys::ktls::Cipher)> {
    use rustls::CipherSuite as C;
    use sys::ktls::Cipher;
    Some(match suite.suite() {
        C::TLS13_AES_128_GCM_SHA256 => (true, Cipher::Aes128Gcm),
        C::TLS13_AES_256_GCM_SHA384 => (true, Cipher::Aes256Gcm),
        C::TLS13_CHACHA20_POLY1305_SHA256 => (true, Cipher::Chacha20Poly1305),
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
            (false, Cipher::Aes128Gcm)
        }
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
            (false, Cipher::Aes256Gcm)
        }
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => (false, Cipher::Chacha20Poly1305),
        _ => return None,
    })
}

/// Moves the record layer to the kernel, or says why it stays in userspace. `Err(None)`:
/// the session was consumed and the connection must close.
fn into_kernel(
    shard: &Shard,
    stream: &TcpStream,
    sess: TlsSession,
) -> Result<KernelState, (Option<Box<TlsSession>>, &'static str)> {
    if !shard.cfg.tls.ktls {
        return Err((Some(Box::new(sess)), "disabled"));
    }
    if !shard.control.ktls.available() {
        return Err((Some(Box::new(sess)), "kernel_lacks_tls"));
    }
    let Some(suite) = sess.cipher_suite() else {
        return Err((Some(Box::new(sess)), "no_suite"));
    };
    // The kernel must take this cipher under this version (the probe set a key of each
    // both ways): the hand-off below consumes the session, so a key the kernel refused
    // there would cut the connection instead of leaving it in userspace.
    match kernel_cipher(suite) {
        None => return Err((Some(Box::new(sess)), "cipher_not_offloadable")),
        Some((v13, c)) if !shard.control.ktls.ciphers().has(v13, c) => {
            return Err((Some(Box::new(sess)), "kernel_lacks_cipher"));
        }
        Some(_) => {}
    }
    let tls13 = sess.protocol() == Some(rustls::ProtocolVersion::TLSv1_3);
    if tls13 && !shard.control.ktls.rekey() && !shard.cfg.tls.ktls_tls13_without_rekey {
        return Err((Some(Box::new(sess)), "kernel_cannot_rekey"));
    }
    // The ULP first, while the session is still ours: a socket with it and no key is plain
    // TCP both ways, so a refusal here (ENOMEM, the module unloaded since the probe) leaves
    // the connection in userspace instead of closing it.
    let fd = stream.as_raw_fd();
    if let Err(e) = sys::ktls::attach_ulp(fd) {
        if let Some(left_out) = shard.conn_log.allow(Instant::now()) {
            tracing::warn!(error = %e, left_out, "TCP_ULP tls refused for this connection (the start-up probe took it; ENOTCONN: the peer had already closed); it stays in userspace (at most one line a second)");
        }
        return Err((Some(Box::new(sess)), "ulp_failed"));
    }
    let handoff = match sess.dangerous_into_kernel() {
        Ok(h) => h,
        Err(refused) => {
            if let Some(left_out) = shard.conn_log.allow(Instant::now()) {
                tracing::warn!(reason = %refused.reason, left_out, "kernel TLS hand-off refused (at most one line a second; sipring_ktls_fallback_total counts all)");
            }
            return Err((refused.session, "handoff_refused"));
        }
    };
    let (secrets, conn) = match handoff {
        KernelHandoff::Server(s, k) => (s, KernelConn::Server(k)),
        KernelHandoff::Client(s, k) => (s, KernelConn::Client(k)),
    };
    let tx = sys::ktls::tx_crypto_info(suite, secrets.tx.0, secrets.tx.1);
    let rx = sys::ktls::crypto_info(suite, secrets.rx.0, secrets.rx.1);
    let (Ok(tx), Ok(rx)) = (tx, rx) else {
        return Err((None, "crypto_info_failed"));
    };
    if sys::ktls::set_key(fd, sys::ktls::Dir::Tx, &tx).is_err()
        || sys::ktls::set_key(fd, sys::ktls::Dir::Rx, &rx).is_err()
    {
        return Err((None, "set_key_failed"));
    }
    Ok(KernelState {
        conn,
        suite,
        tls13,
        can_rekey: shard.control.ktls.rekey(),
        records_sent: 0,
        peer_key_updates: 0,
        warnings: 0,
        renegotiation_refused: false,
    })
}

/// What a finished handshake hands to the connection task.
pub(super) struct Established {
    pub(super) stream: TcpStream,
    pub(super) layer: Layer,
    pub(super) principal: Principal,
    /// The certificate chain the peer presented (kept to check it again on reload and at
    /// its expiry); `None` when it presented none.
    pub(super) chain: Option<PeerChain>,
    /// We dialled it (a partner link), rather than accepted it.
    pub(super) outbound: bool,
}

/// Picks the record layer after a handshake: the kernel, or userspace with the reason
/// counted. `None`: the hand-off failed mid-way and the connection must close.
fn choose_layer(shard: &Shard, stream: &TcpStream, sess: TlsSession) -> Option<Layer> {
    match into_kernel(shard, stream, sess) {
        Ok(k) => Some(Layer::Kernel(Box::new(k))),
        Err((session, why)) => {
            shard.count(&format!("sipring_ktls_fallback_total{{reason=\"{why}\"}}"));
            if session.is_none()
                && let Some(left_out) = shard.conn_log.allow(Instant::now())
            {
                tracing::warn!(
                    why,
                    left_out,
                    "kernel TLS hand-off failed mid-way; closing (at most one line a second; sipring_ktls_fallback_total counts all)"
                );
            }
            session.map(Layer::User)
        }
    }
}

/// The server side of a handshake, up to the choice of record layer.
async fn accept_tls(
    shard: &Rc<Shard>,
    mut stream: TcpStream,
    kind: ListenKind,
    client_auth: ClientAuth,
    remote: std::net::SocketAddr,
    slot: Option<crate::shard::HandshakeSlot>,
) -> Option<Established> {
    if kind == ListenKind::Tcp {
        return Some(Established {
            stream,
            layer: Layer::Plain,
            principal: Principal::anonymous(),
            chain: None,
            outbound: false,
        });
    }
    let generation = shard.control.tls_generation();
    let policy = shard.policy.load_full();
    let cfg = policy.for_listener(kind, client_auth)?;
    let mut sess = TlsSession::server(cfg).ok()?;
    let t0 = Instant::now();
    // Taken when the connection was admitted (so a burst of accepts is counted before any
    // of their tasks runs), or now.
    let slot = slot.unwrap_or_else(|| crate::shard::HandshakeSlot::take(shard, Some(remote.ip())));
    // A client speaks first (its ClientHello): a connection whose ClientHello is not in
    // within `tls.client_hello_timeout_ms` (silent, or one byte and then silence: the first
    // byte ended this deadline before) holds a handshake slot that long only, not the whole
    // handshake timeout.
    let first = Duration::from_millis(shard.cfg.tls.client_hello_timeout_ms);
    let spoke = with_timeout(first, read_first_flight(&mut stream, &mut sess)).await;
    let silent = match spoke {
        Some(Ok(())) => None,
        // Closed before a word (a TCP health check): an aborted handshake; or refused.
        Some(Err(e)) => Some(Some(Err(e))),
        None => {
            shard.count("sipring_client_hello_timeouts_total");
            Some(None)
        }
    };
    if let Some(outcome) = silent {
        drop(slot);
        let _ = handshake_outcome(shard, outcome, remote, kind);
        linger_close(shard, stream).await;
        return None;
    }
    let timeout = Duration::from_millis(shard.cfg.tls.handshake_timeout_ms);
    let r = with_timeout(timeout, drive_handshake(&mut stream, &mut sess)).await;
    drop(slot);
    if handshake_outcome(shard, r, remote, kind).is_err() {
        linger_close(shard, stream).await;
        return None;
    }
    shard
        .metrics
        .borrow_mut()
        .record("handshake", t0.elapsed().as_micros() as u64);
    let chain = sess.peer_certificates().unwrap_or_default();
    let principal = if kind == ListenKind::Mtls {
        // The partner whose roots verified the chain (and which lists its name).
        match policy.partner_of(chain) {
            Some(p) => Principal::Partner(p),
            None => {
                // Counted as the refusal it is (it was counted nowhere): a resumed session
                // whose certificate lapsed since (rustls restores the chain from the ticket
                // unverified), or one no partner names since a reload.
                let now = (crate::cluster::unix_ms() / 1000) as i64;
                let reason = match chain.first().and_then(|c| crate::tls::verify::summarize(c)) {
                    Some(s) if now >= s.not_after => Rejection::Expired,
                    Some(s) if now < s.not_before => Rejection::NotYetValid,
                    _ => Rejection::NameNotTrusted,
                };
                shard.control.rejections.inc(reason);
                if let Some(left_out) = shard.reject_log[1].allow(Instant::now()) {
                    tracing::warn!(%remote, reason = reason.label(), left_out, "verified partner certificate matches no single partner now (reloaded? a resumed session whose certificate lapsed?); closing (refused partner handshakes: at most one line a second)");
                }
                linger_close(shard, stream).await;
                return None;
            }
        }
    } else {
        // rustls restored a resumed session's chain from the ticket without checking it: one
        // that has since expired or been revoked proves nothing now.
        if !chain.is_empty()
            && sess.resumed()
            && let Err(reason) = policy.verify_client_chain(chain)
        {
            if let Some(left_out) = shard.reject_log[0].allow(Instant::now()) {
                tracing::warn!(%remote, reason = reason.label(), left_out, "resumed session's client certificate no longer verifies; closing (refused client handshakes: at most one line a second)");
            }
            shard.control.rejections.inc(reason);
            linger_close(shard, stream).await;
            return None;
        }
        Principal::Client {
            cert_aors: client_cert_aors(shard, &policy, chain),
        }
    };
    // Partner roots' expiries matter to partner links only, the client roots' to phones
    // (a root is not presented, so the chain alone does not say when it lapses).
    let anchors: &[i64] = match principal {
        Principal::Partner(_) => &policy.anchor_expiries,
        _ => &policy.client_anchor_expiries,
    };
    let chain = PeerChain::of(chain, generation, anchors);
    let layer = choose_layer(shard, &stream, sess)?;
    Some(Established {
        stream,
        layer,
        principal,
        chain,
        outbound: false,
    })
}

/// Serves one accepted connection until it closes.
///
/// Not an `async fn`: an async fn keeps its arguments (the 120-byte stream among them) in
/// its future for its whole life. Here the stream moves into the boxed handshake future,
/// freed when the handshake ends, and the task's future is only what an established
/// connection needs.
pub fn serve_inbound(
    shard: Rc<Shard>,
    stream: TcpStream,
    kind: ListenKind,
    client_auth: ClientAuth,
    admission: crate::shard::Admission,
    slot: Option<crate::shard::HandshakeSlot>,
) -> impl Future<Output = ()> {
    let open = Box::pin(open_inbound(shard.clone(), stream, kind, client_auth, slot));
    async move {
        // Held to the end, whatever happens: the source address's count and the shard's
        // load are released when this future ends or is dropped.
        let _admission = admission;
        if let Some(conn) = open.await {
            let flow = Flow::Conn(conn.id);
            established(shard, conn, flow, KeepaliveRole::Server).await;
        }
    }
}

/// Handshake and record-layer choice for an accepted connection.
async fn open_inbound(
    shard: Rc<Shard>,
    stream: TcpStream,
    kind: ListenKind,
    client_auth: ClientAuth,
    slot: Option<crate::shard::HandshakeSlot>,
) -> Option<Rc<Conn>> {
    let remote = stream.peer_addr().ok()?;
    let listener = stream
        .local_addr()
        .ok()
        .and_then(|l| crate::shard::listener_of(&shard.cfg, l));
    let _ = stream.set_nodelay(true);
    keepalive(&shard, &stream);
    let est = accept_tls(&shard, stream, kind, client_auth, remote, slot).await?;
    let conn = Conn::new(shard.new_conn_id(kind), est, kind, remote, listener);
    Some(conn)
}

/// TCP keepalive per `limits.tcp_keepalive_s` and TCP_USER_TIMEOUT per
/// `limits.tcp_user_timeout_s`: a connection a registration keeps open (the idle sweep
/// leaves it) is still found dead when its peer vanished, whether or not we were sending.
fn keepalive(shard: &Shard, stream: &TcpStream) {
    let l = &shard.cfg.limits;
    if l.tcp_keepalive_s > 0 {
        let _ = sys::sock::keepalive(stream, Duration::from_secs(l.tcp_keepalive_s));
    }
    if l.tcp_user_timeout_s > 0 {
        let _ = sys::sock::user_timeout(stream, Duration::from_secs(l.tcp_user_timeout_s));
    }
}

/// After a refused handshake: half-close and drain briefly, so the alert we sent reaches the
/// peer instead of being destroyed by a reset (closing with unread input sends RST).
async fn linger_close(shard: &Shard, mut stream: TcpStream) {
    let _ = sys::sock::shutdown(stream.as_raw_fd(), std::net::Shutdown::Write);
    let _ = with_timeout(
        LINGER,
        std::future::poll_fn(|cx| drain(cx, shard, &mut stream)),
    )
    .await;
}

/// How long a closing connection reads (and discards) what the peer still sends, after our
/// half-close: closing with unread input sends RST, which can destroy what we sent last (an
/// alert, an error response, close_notify) before the peer reads it.
pub(super) const LINGER: Duration = Duration::from_millis(250);

/// The AORs a verified client certificate proves: its SAN `sip:user@domain` URIs in one of
/// our domains (a certificate cannot speak for someone else's users), within the name
/// constraints of its chain's CAs.
fn client_cert_aors(
    shard: &Shard,
    policy: &crate::tls::TlsPolicy,
    chain: &[rustls::pki_types::CertificateDer<'_>],
) -> Vec<String> {
    crate::tls::verify::user_aors_within(chain, &policy.client_constrained_roots)
        .into_iter()
        .filter(|aor| {
            let host = aor.rsplit_once('@').map_or("", |(_, h)| h);
            shard
                .cfg
                .server
                .domains
                .iter()
                .any(|d| crate::config::domain_key(d).eq_ignore_ascii_case(host))
        })
        .collect()
}

/// Logs and counts a handshake's end; `Err` when it failed.
fn handshake_outcome(
    shard: &Shard,
    r: Option<Result<(), HandshakeError>>,
    remote: std::net::SocketAddr,
    kind: ListenKind,
) -> Result<(), Rejection> {
    let kind_l = crate::labels::kind_label(kind);
    let reason = match r {
        Some(Ok(())) => {
            shard.count(&format!(
                "sipring_handshakes_total{{kind=\"{kind_l}\",result=\"ok\"}}"
            ));
            return Ok(());
        }
        None => {
            if let Some(left_out) = shard.timeout_log.allow(Instant::now()) {
                tracing::warn!(
                    %remote,
                    kind = kind_l,
                    reason = "handshake_timeout",
                    left_out,
                    "TLS handshake rejected (timeouts: at most one line a second; \
                     sipring_handshakes_total counts all)"
                );
            }
            Rejection::HandshakeTimeout
        }
        Some(Err(HandshakeError::Closed)) => {
            shard.count(&format!(
                "sipring_handshakes_total{{kind=\"{kind_l}\",result=\"aborted\"}}"
            ));
            return Err(Rejection::Other);
        }
        Some(Err(HandshakeError::Io(e))) => {
            tracing::debug!(%remote, error = %e, "connection failed during the handshake");
            shard.count(&format!(
                "sipring_handshakes_total{{kind=\"{kind_l}\",result=\"aborted\"}}"
            ));
            return Err(Rejection::Other);
        }
        Some(Err(HandshakeError::Tls(e))) => {
            let (reason, detail) = crate::tls::classify(&e);
            // One line a second per listener kind: anyone can open connections with broken
            // certificates, and a flood of them must not hide a partner's.
            let limiter = &shard.reject_log[usize::from(kind == ListenKind::Mtls)];
            if let Some(left_out) = limiter.allow(Instant::now()) {
                match detail {
                    Some(d) => tracing::warn!(
                        %remote,
                        kind = kind_l,
                        reason = reason.label(),
                        identities = %d.cert.identities.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                        issuer = %d.cert.issuer,
                        partner = d.peer.as_deref().unwrap_or("-"),
                        detail = %d.detail,
                        left_out,
                        "TLS handshake rejected (at most one line a second per listener kind; \
                         sipring_tls_rejections_total counts all)"
                    ),
                    None => tracing::warn!(
                        %remote,
                        kind = kind_l,
                        reason = reason.label(),
                        error = %e,
                        left_out,
                        "TLS handshake rejected (at most one line a second per listener kind; \
                         sipring_tls_rejections_total counts all)"
                    ),
                }
            }
            reason
        }
    };
    shard.control.rejections.inc(reason);
    shard.count(&format!(
        "sipring_handshakes_total{{kind=\"{kind_l}\",result=\"{}\"}}",
        reason.label()
    ));
    Err(reason)
}

/// The client side of an outbound MTLS connection to partner `name`, up to the choice of
/// record layer.
async fn connect_peer(
    shard: &Rc<Shard>,
    name: &str,
) -> Option<(Established, std::net::SocketAddr)> {
    let generation = shard.control.tls_generation();
    let policy = shard.policy.load_full();
    let addr = shard
        .cfg
        .peer
        .iter()
        .find(|p| p.name == name)
        .and_then(|p| p.address);
    let (Some((cc, server_name)), Some(addr)) = (policy.outbound.get(name).cloned(), addr) else {
        tracing::warn!(peer = %name, "no address or TLS config for partner; dropping its messages");
        return None;
    };
    let timeout = Duration::from_millis(shard.cfg.tls.handshake_timeout_ms);
    let t0 = Instant::now();
    let mut stream = match with_timeout(timeout, TcpStream::connect(addr)).await {
        Some(Ok(s)) => s,
        other => {
            let why = match other {
                Some(Err(e)) => e.to_string(),
                _ => "connect timeout".into(),
            };
            if let Some(left_out) = shard.peer_log.allow(Instant::now()) {
                tracing::warn!(peer = %name, %addr, error = %why, left_out, "cannot reach partner (at most one line a second; sipring_peer_connect_failures_total counts all)");
            }
            shard.count("sipring_peer_connect_failures_total");
            return None;
        }
    };
    let _ = stream.set_nodelay(true);
    keepalive(shard, &stream);
    let mut sess = TlsSession::client(cc, server_name).ok()?;
    let r = with_timeout(timeout, drive_handshake(&mut stream, &mut sess)).await;
    handshake_outcome(shard, r, addr, ListenKind::Mtls).ok()?;
    shard
        .metrics
        .borrow_mut()
        .record("handshake_outbound", t0.elapsed().as_micros() as u64);
    let chain = PeerChain::of(
        sess.peer_certificates().unwrap_or_default(),
        generation,
        &policy_anchors(shard),
    );
    let layer = choose_layer(shard, &stream, sess)?;
    if let Some(left_out) = shard.peer_up_log.allow(Instant::now()) {
        tracing::info!(peer = %name, %addr, left_out, "partner link up (at most one line a second)");
    }
    Some((
        Established {
            stream,
            layer,
            principal: Principal::Partner(name.to_string()),
            chain,
            outbound: true,
        },
        addr,
    ))
}

/// Opens (in the background) this shard's outbound MTLS connection to partner `name`.
pub fn spawn_peer_connect(shard: Rc<Shard>, name: String) {
    glommio::spawn_local(async move {
        let opened = Box::pin(async {
            let (est, addr) = connect_peer(&shard, &name).await?;
            Some(Conn::new(
                shard.new_conn_id(ListenKind::Mtls),
                est,
                ListenKind::Mtls,
                addr,
                None,
            ))
        })
        .await;
        match opened {
            // `established` marks the link down as soon as the connection leaves the table.
            Some(conn) => established(shard, conn, Flow::Peer(name), KeepaliveRole::Client).await,
            None => shard.peer_down(&name),
        }
    })
    .detach();
}

/// The partner roots' expiries of the policy in force ([`crate::tls::TlsPolicy`]).
fn policy_anchors(shard: &Shard) -> std::sync::Arc<[i64]> {
    shard.policy.load().anchor_expiries.clone()
}
