//! Connection tasks: the TLS handshake (one record at a time), the hand-off of the record
//! layer to the kernel when it can take it, then a reader and a writer task per connection.
//!
//! ```text
//!  accept/connect ─► handshake (userspace rustls, exact record reads, timeout)
//!                      ├─ kTLS available + cipher offloadable ─► kernel record layer
//!                      └─ otherwise ─────────────────────────► userspace TlsSession
//!  reader task: read ─► (decrypt) ─► Framer ─► Shard::on_message / CRLF pong
//!  writer task: Out queue (bounded) ─► (encrypt) ─► write; Close ─► close_notify, shutdown
//! ```

use crate::config::ListenKind;
use crate::shard::{ConnHandle, Out, Shard};
use crate::sys;
use crate::tls::Rejection;
use crate::tls::session::{KernelHandoff, TlsSession};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use sipring_core::proxy::Flow;
use sipring_core::{Frame, Framer, KeepaliveRole, Status};
use std::cell::RefCell;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How the record layer runs after the handshake.
enum Layer {
    /// No TLS (`tcp` listeners).
    Plain,
    /// rustls in userspace.
    User(Rc<RefCell<TlsSession>>),
    /// The kernel; rustls keeps only what KeyUpdate and tickets need.
    Kernel(Rc<RefCell<KernelState>>),
}

/// What stays in userspace when the kernel does the records.
pub struct KernelState {
    conn: KernelConn,
    suite: rustls::SupportedCipherSuite,
    tls13: bool,
    records_sent: u64,
}

enum KernelConn {
    Server(rustls::kernel::KernelConnection<rustls::server::ServerConnectionData>),
    Client(rustls::kernel::KernelConnection<rustls::client::ClientConnectionData>),
}

/// Races `fut` against a timer.
async fn with_timeout<T>(d: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(d).await;
        None
    })
    .await
}

enum HsError {
    Tls(rustls::Error),
    Io(std::io::Error),
    Closed,
}

/// Drives a handshake to completion, reading exactly one TLS record at a time.
async fn handshake(stream: &mut TcpStream, sess: &mut TlsSession) -> Result<(), HsError> {
    let mut buf = vec![0u8; crate::tls::session::MAX_RECORD];
    loop {
        let out = sess.take_outgoing();
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(HsError::Io)?;
        }
        if !sess.is_handshaking() {
            return Ok(());
        }
        let want = sess.read_hint().min(buf.len());
        let n = stream.read(&mut buf[..want]).await.map_err(HsError::Io)?;
        if n == 0 {
            return Err(HsError::Closed);
        }
        if let Err(e) = sess.receive(&buf[..n]) {
            let alert = sess.take_outgoing();
            let _ = stream.write_all(&alert).await;
            return Err(HsError::Tls(e));
        }
    }
}

/// Drives a handshake (either side) over `stream`, one record at a time (for the load
/// generator and its reflector);
/// `Err` is a one-word cause for metrics (`tls_<reason>`, `tls_alert_<alert the peer sent>`,
/// `closed`, `io`).
pub async fn drive_handshake(stream: &mut TcpStream, sess: &mut TlsSession) -> Result<(), String> {
    handshake(stream, sess).await.map_err(|e| match e {
        HsError::Tls(rustls::Error::AlertReceived(alert)) => {
            // `CertificateRevoked` → `tls_alert_certificate_revoked`: what the peer objected to.
            format!(
                "tls_alert_{}",
                crate::metrics::snake_label(&format!("{alert:?}"))
            )
        }
        HsError::Tls(e) => format!("tls_{}", Rejection::classify(&e).0.label()),
        HsError::Io(_) => "io".into(),
        HsError::Closed => "closed".into(),
    })
}

/// Can the kernel take this cipher suite? (The `ktls` crate maps AES-GCM and ChaCha20.)
fn offloadable(suite: rustls::SupportedCipherSuite) -> bool {
    use rustls::CipherSuite as C;
    matches!(
        suite.suite(),
        C::TLS13_AES_128_GCM_SHA256
            | C::TLS13_AES_256_GCM_SHA384
            | C::TLS13_CHACHA20_POLY1305_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
            | C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
    )
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
    if !offloadable(suite) {
        return Err((Some(Box::new(sess)), "cipher_not_offloadable"));
    }
    let tls13 = sess.protocol() == Some(rustls::ProtocolVersion::TLSv1_3);
    if tls13 && !shard.control.ktls.rekey() && !shard.cfg.tls.ktls_tls13_without_rekey {
        return Err((Some(Box::new(sess)), "kernel_cannot_rekey"));
    }
    let handoff = match sess.dangerous_into_kernel() {
        Ok(h) => h,
        Err(refused) => {
            tracing::warn!(reason = %refused.reason, "kernel TLS hand-off refused");
            return Err((refused.session, "handoff_refused"));
        }
    };
    let (secrets, conn) = match handoff {
        KernelHandoff::Server(s, k) => (s, KernelConn::Server(k)),
        KernelHandoff::Client(s, k) => (s, KernelConn::Client(k)),
    };
    let fd = stream.as_raw_fd();
    let tx = sys::ktls::crypto_info(suite, secrets.tx.0, secrets.tx.1);
    let rx = sys::ktls::crypto_info(suite, secrets.rx.0, secrets.rx.1);
    let (Ok(tx), Ok(rx)) = (tx, rx) else {
        return Err((None, "crypto_info_failed"));
    };
    if let Err(e) = sys::ktls::attach_ulp(fd) {
        tracing::warn!(error = %e, "TCP_ULP tls failed after the probe succeeded");
        return Err((None, "ulp_failed"));
    }
    if sys::ktls::set_key(fd, sys::ktls::Dir::Tx, &tx).is_err()
        || sys::ktls::set_key(fd, sys::ktls::Dir::Rx, &rx).is_err()
    {
        return Err((None, "set_key_failed"));
    }
    Ok(KernelState {
        conn,
        suite,
        tls13,
        records_sent: 0,
    })
}

/// Serves one accepted connection until it closes.
pub async fn serve_inbound(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    kind: ListenKind,
    optional_auth: bool,
) {
    let remote = match stream.peer_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let _ = stream.set_nodelay(true);
    let mut peer = None;
    let layer = if kind == ListenKind::Tcp {
        Layer::Plain
    } else {
        let policy = shard.policy.load_full();
        let Some(cfg) = policy.for_listener(kind, optional_auth) else {
            return;
        };
        let mut sess = match TlsSession::server(cfg) {
            Ok(s) => s,
            Err(_) => return,
        };
        let t0 = Instant::now();
        shard.handshakes.set(shard.handshakes.get() + 1);
        let timeout = Duration::from_millis(shard.cfg.tls.handshake_timeout_ms);
        let r = with_timeout(timeout, handshake(&mut stream, &mut sess)).await;
        shard.handshakes.set(shard.handshakes.get() - 1);
        if handshake_outcome(&shard, r, remote, kind).is_err() {
            linger_close(stream).await;
            return;
        }
        shard
            .metrics
            .borrow_mut()
            .record("handshake", t0.elapsed().as_micros() as u64);
        if kind == ListenKind::Mtls {
            peer = identify_peer(&shard, &sess);
        }
        match into_kernel(&shard, &stream, sess) {
            Ok(k) => Layer::Kernel(Rc::new(RefCell::new(k))),
            Err((Some(s), why)) => {
                shard.count(&format!("sipring_ktls_fallback_total{{reason=\"{why}\"}}"));
                Layer::User(Rc::new(RefCell::new(*s)))
            }
            Err((None, why)) => {
                shard.count(&format!("sipring_ktls_fallback_total{{reason=\"{why}\"}}"));
                tracing::warn!(%remote, why, "kernel TLS hand-off failed mid-way; closing");
                return;
            }
        }
    };
    let id = shard.new_conn_id();
    run(
        shard,
        stream,
        layer,
        id,
        Flow::Conn(id),
        kind,
        peer,
        remote,
        KeepaliveRole::Server,
    )
    .await;
}

/// After a refused handshake: half-close and drain briefly, so the alert we sent reaches the
/// peer instead of being destroyed by a reset (closing with unread input sends RST).
async fn linger_close(stream: TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write).await;
    let mut stream = stream;
    let mut sink = [0u8; 4096];
    let _ = with_timeout(Duration::from_millis(250), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Which partner a verified MTLS peer is (its presented identity on a trusted list).
fn identify_peer(shard: &Shard, sess: &TlsSession) -> Option<String> {
    let leaf = sess.peer_certificates()?.first()?;
    let ids = crate::tls::verify::summarize(leaf)?.identities;
    let policy = shard.policy.load();
    policy
        .partners
        .iter()
        .find(|p| p.trusts(&ids))
        .map(|p| p.name.clone())
}

/// Logs and counts a handshake's end; `Err` when it failed.
fn handshake_outcome(
    shard: &Shard,
    r: Option<Result<(), HsError>>,
    remote: std::net::SocketAddr,
    kind: ListenKind,
) -> Result<(), Rejection> {
    let kind_l = crate::shard::kind_label(kind);
    let reason = match r {
        Some(Ok(())) => {
            shard.count(&format!(
                "sipring_handshakes_total{{kind=\"{kind_l}\",result=\"ok\"}}"
            ));
            return Ok(());
        }
        None => {
            tracing::warn!(%remote, kind = kind_l, reason = "handshake_timeout", "TLS handshake rejected");
            Rejection::HandshakeTimeout
        }
        Some(Err(HsError::Closed)) => {
            shard.count(&format!(
                "sipring_handshakes_total{{kind=\"{kind_l}\",result=\"aborted\"}}"
            ));
            return Err(Rejection::Other);
        }
        Some(Err(HsError::Io(e))) => {
            tracing::debug!(%remote, error = %e, "connection failed during the handshake");
            shard.count(&format!(
                "sipring_handshakes_total{{kind=\"{kind_l}\",result=\"aborted\"}}"
            ));
            return Err(Rejection::Other);
        }
        Some(Err(HsError::Tls(e))) => {
            let (reason, detail) = Rejection::classify(&e);
            match detail {
                Some(d) => tracing::warn!(
                    %remote,
                    kind = kind_l,
                    reason = reason.label(),
                    identities = %d.cert.identities.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                    issuer = %d.cert.issuer,
                    partner = d.peer.as_deref().unwrap_or("-"),
                    detail = %d.detail,
                    "TLS handshake rejected"
                ),
                None => {
                    tracing::warn!(%remote, kind = kind_l, reason = reason.label(), error = %e, "TLS handshake rejected")
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

/// Opens (in the background) this shard's outbound MTLS connection to partner `name`.
pub fn spawn_peer_connect(shard: Rc<Shard>, name: String) {
    glommio::spawn_local(async move {
        let policy = shard.policy.load_full();
        let addr = shard.cfg.peer.iter().find(|p| p.name == name).and_then(|p| p.address);
        let (Some((cc, server_name)), Some(addr)) = (policy.outbound.get(&name).cloned(), addr) else {
            tracing::warn!(peer = %name, "no address or TLS config for partner; dropping its messages");
            shard.peer_down(&name);
            return;
        };
        let timeout = Duration::from_millis(shard.cfg.tls.handshake_timeout_ms);
        let t0 = Instant::now();
        let connected = with_timeout(timeout, TcpStream::connect(addr)).await;
        let mut stream = match connected {
            Some(Ok(s)) => s,
            other => {
                let why = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "connect timeout".into(),
                };
                tracing::warn!(peer = %name, %addr, error = %why, "cannot reach partner");
                shard.count("sipring_peer_connect_failures_total");
                shard.peer_down(&name);
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut sess = match TlsSession::client(cc, server_name) {
            Ok(s) => s,
            Err(_) => return shard.peer_down(&name),
        };
        let r = with_timeout(timeout, handshake(&mut stream, &mut sess)).await;
        if handshake_outcome(&shard, r, addr, ListenKind::Mtls).is_err() {
            return shard.peer_down(&name);
        }
        shard.metrics.borrow_mut().record("handshake_outbound", t0.elapsed().as_micros() as u64);
        let layer = match into_kernel(&shard, &stream, sess) {
            Ok(k) => Layer::Kernel(Rc::new(RefCell::new(k))),
            Err((Some(s), why)) => {
                shard.count(&format!("sipring_ktls_fallback_total{{reason=\"{why}\"}}"));
                Layer::User(Rc::new(RefCell::new(*s)))
            }
            Err((None, _)) => return shard.peer_down(&name),
        };
        tracing::info!(peer = %name, %addr, "partner link up");
        let id = shard.new_conn_id();
        let flow = Flow::Peer(name.clone());
        run(shard.clone(), stream, layer, id, flow, ListenKind::Mtls, Some(name.clone()), addr, KeepaliveRole::Client).await;
        shard.peer_down(&name);
    })
    .detach();
}

/// Runs an established connection: spawns its writer, reads until it ends, cleans up.
#[allow(clippy::too_many_arguments)] // one call site per direction; a struct would only rename them
async fn run(
    shard: Rc<Shard>,
    stream: TcpStream,
    layer: Layer,
    id: u64,
    flow: Flow,
    kind: ListenKind,
    peer: Option<String>,
    remote: std::net::SocketAddr,
    role: KeepaliveRole,
) {
    let writer_stream = match sys::sock::try_clone(&stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "dup failed");
            return;
        }
    };
    // Messages are ~1 KB: the byte budget becomes a message count.
    let cap = (shard.cfg.limits.write_queue_bytes / 1024).clamp(16, 65_536);
    let (tx, rx) = glommio::channels::local_channel::new_unbounded::<Out>();
    let tx = Rc::new(tx);
    let queued = Rc::new(std::cell::Cell::new(0usize));
    let ktls = matches!(layer, Layer::Kernel(_));
    shard.conn_opened(
        id,
        ConnHandle {
            tx: tx.clone(),
            queued: queued.clone(),
            cap,
            kind,
            peer: peer.clone(),
            remote,
            ktls,
        },
    );
    if let Flow::Peer(name) = &flow {
        shard.peer_up(name, id);
    }
    let wlayer = match &layer {
        Layer::Plain => Layer::Plain,
        Layer::User(s) => Layer::User(s.clone()),
        Layer::Kernel(k) => Layer::Kernel(k.clone()),
    };
    let wshard = shard.clone();
    let writer = glommio::spawn_local(async move {
        writer_loop(wshard, writer_stream, wlayer, rx, queued).await
    });
    let stream = reader_loop(&shard, stream, &layer, &flow, &tx, role).await;
    shard.conn_closed(id);
    // Wake a writer blocked on a dead peer, then let it finish (it ends on Close).
    let _ = tx.send(Out::Close).await;
    drop(tx);
    let _ = writer.await;
    drop(stream);
}

async fn writer_loop(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    layer: Layer,
    rx: glommio::channels::local_channel::LocalReceiver<Out>,
    queued: Rc<std::cell::Cell<usize>>,
) {
    while let Some(o) = rx.recv().await {
        if matches!(o, Out::Msg(..)) {
            queued.set(queued.get().saturating_sub(1));
        }
        let (bytes, stamp, close): (Vec<u8>, _, bool) = match o {
            Out::Msg(b, stamp) => match &layer {
                Layer::User(s) => {
                    let mut s = s.borrow_mut();
                    if s.write(&b).is_err() {
                        break;
                    }
                    (s.take_outgoing(), stamp, false)
                }
                Layer::Kernel(k) => {
                    let mut k = k.borrow_mut();
                    k.records_sent += (b.len() as u64).div_ceil(1 << 14);
                    (b.to_vec(), stamp, false)
                }
                Layer::Plain => (b.to_vec(), stamp, false),
            },
            Out::Pong => match &layer {
                Layer::User(s) => {
                    let mut s = s.borrow_mut();
                    let _ = s.write(b"\r\n");
                    (s.take_outgoing(), None, false)
                }
                _ => (b"\r\n".to_vec(), None, false),
            },
            Out::Flush => match &layer {
                Layer::User(s) => (s.borrow_mut().take_outgoing(), None, false),
                _ => (Vec::new(), None, false),
            },
            Out::Close => match &layer {
                Layer::User(s) => {
                    let mut s = s.borrow_mut();
                    let _ = s.close();
                    (s.take_outgoing(), None, true)
                }
                Layer::Kernel(_) => {
                    let _ = sys::ktls::send_close_notify(stream.as_raw_fd());
                    (Vec::new(), None, true)
                }
                Layer::Plain => (Vec::new(), None, true),
            },
        };
        if !bytes.is_empty() && stream.write_all(&bytes).await.is_err() {
            break;
        }
        if let Some(st) = stamp {
            shard.metrics.borrow_mut().record(
                &format!("forward_{}", st.label),
                st.t0.elapsed().as_micros() as u64,
            );
        }
        if let Layer::Kernel(k) = &layer {
            let needs = {
                let k = k.borrow();
                k.records_sent >= ktls_record_budget(k.suite).min(shard.cfg.tls.ktls_max_records)
            };
            if needs && rekey_or_close(&stream, k).is_err() {
                break;
            }
        }
        if close {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both).await;
}

/// Records we let one key protect: well below the AES-GCM confidentiality limit (2^24.5
/// records, RFC 9147 §4.5.3) — the kernel does not count for us.
fn ktls_record_budget(suite: rustls::SupportedCipherSuite) -> u64 {
    use rustls::CipherSuite as C;
    match suite.suite() {
        C::TLS13_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 1 << 40,
        _ => 1 << 23,
    }
}

/// TLS 1.3: send a KeyUpdate and install the new TX key. TLS 1.2 has no KeyUpdate: close.
fn rekey_or_close(stream: &TcpStream, k: &RefCell<KernelState>) -> Result<(), ()> {
    let mut k = k.borrow_mut();
    if !k.tls13 {
        tracing::info!("TLS 1.2 connection reached its record budget; closing gracefully");
        let _ = sys::ktls::send_close_notify(stream.as_raw_fd());
        return Err(());
    }
    let fd = stream.as_raw_fd();
    // KeyUpdate(update_not_requested): type 24, length 1, value 0.
    sys::ktls::send_record(fd, sys::ktls::content::HANDSHAKE, &[24, 0, 0, 1, 0]).map_err(|_| ())?;
    let suite = k.suite;
    let (seq, secrets) = match &mut k.conn {
        KernelConn::Server(c) => c.update_tx_secret(),
        KernelConn::Client(c) => c.update_tx_secret(),
    }
    .map_err(|_| ())?;
    let info = sys::ktls::crypto_info(suite, seq, secrets).map_err(|_| ())?;
    sys::ktls::set_key(fd, sys::ktls::Dir::Tx, &info).map_err(|_| ())?;
    k.records_sent = 0;
    Ok(())
}

/// A non-data record the kernel handed up: alerts, KeyUpdate, tickets.
fn on_control_record(
    stream: &TcpStream,
    k: &RefCell<KernelState>,
    typ: u8,
    payload: &[u8],
) -> Result<(), &'static str> {
    use sys::ktls::content;
    match typ {
        content::ALERT => {
            if payload == [1, 0] {
                let _ = sys::ktls::send_close_notify(stream.as_raw_fd());
                Err("close_notify")
            } else {
                tracing::info!(alert = ?payload, "TLS alert from peer");
                Err("alert")
            }
        }
        content::HANDSHAKE => match payload.first() {
            // KeyUpdate: new RX key; answer with our own update if the peer asked.
            Some(24) => {
                let requested = payload.get(4) == Some(&1);
                {
                    let mut k = k.borrow_mut();
                    let suite = k.suite;
                    let (seq, secrets) = match &mut k.conn {
                        KernelConn::Server(c) => c.update_rx_secret(),
                        KernelConn::Client(c) => c.update_rx_secret(),
                    }
                    .map_err(|_| "key_update")?;
                    let info =
                        sys::ktls::crypto_info(suite, seq, secrets).map_err(|_| "key_update")?;
                    sys::ktls::set_key(stream.as_raw_fd(), sys::ktls::Dir::Rx, &info)
                        .map_err(|_| "key_update")?;
                }
                if requested {
                    rekey_or_close(stream, k).map_err(|_| "key_update")?;
                }
                Ok(())
            }
            // NewSessionTicket (client side): keep it for resumption.
            Some(4) => {
                if let KernelConn::Client(c) = &mut k.borrow_mut().conn {
                    let _ = c.handle_new_session_ticket(&payload[4..]);
                }
                Ok(())
            }
            _ => Err("unexpected_handshake"),
        },
        content::CHANGE_CIPHER_SPEC => Ok(()),
        _ => Err("unexpected_record"),
    }
}

/// Reads until the connection ends; returns the stream (still open) for the caller to drop.
async fn reader_loop(
    shard: &Rc<Shard>,
    stream: TcpStream,
    layer: &Layer,
    flow: &Flow,
    tx: &glommio::channels::local_channel::LocalSender<Out>,
    role: KeepaliveRole,
) -> TcpStream {
    let limits = shard.cfg.sip_limits();
    let mut framer = Framer::new(limits, role);
    let idle = Duration::from_secs(shard.cfg.limits.idle_timeout_s);
    let mut buf: Vec<u8> = Vec::new();
    let mut probe = [0u8; 1];
    loop {
        if shard.control.stopping() {
            let _ = tx.try_send(Out::Close);
            return stream;
        }
        // Wait for data without holding a read buffer (idle connections cost no buffer).
        match with_timeout(idle, stream.peek(&mut probe)).await {
            None => {
                tracing::debug!("idle timeout");
                let _ = tx.try_send(Out::Close);
                return stream;
            }
            Some(Ok(0)) => return stream,
            Some(Ok(_)) => {}
            // kTLS reports a pending non-data record as EIO (EKEYEXPIRED after a KeyUpdate):
            // the recv below takes the same path.
            Some(Err(e))
                if matches!(layer, Layer::Kernel(_))
                    && matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EKEYEXPIRED)) => {}
            Some(Err(_)) => return stream,
        }
        let mut scratch = shard.take_read_buf();
        let n = match sys::sock::recv_now(&stream, &mut scratch) {
            Ok(Some(0)) => return stream,
            Ok(Some(n)) => n,
            Ok(None) => {
                shard.give_read_buf(scratch);
                continue;
            }
            Err(e) => {
                let Layer::Kernel(k) = layer else {
                    return stream;
                };
                if !matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EKEYEXPIRED)) {
                    return stream;
                }
                match sys::ktls::recv_record(stream.as_raw_fd(), &mut scratch) {
                    Ok(Some((typ, len))) if typ == sys::ktls::content::APPLICATION_DATA => len,
                    Ok(Some((typ, len))) => {
                        let payload = scratch[..len].to_vec();
                        shard.give_read_buf(scratch);
                        if let Err(why) = on_control_record(&stream, k, typ, &payload) {
                            tracing::debug!(why, "kTLS connection ends");
                            let _ = tx.try_send(Out::Close);
                            return stream;
                        }
                        continue;
                    }
                    Ok(None) => {
                        shard.give_read_buf(scratch);
                        continue;
                    }
                    Err(_) => return stream,
                }
            }
        };
        let t0 = Instant::now();
        match layer {
            Layer::User(s) => {
                let mut s = s.borrow_mut();
                if let Err(e) = s.receive(&scratch[..n]) {
                    tracing::info!(error = %e, "TLS error on established connection");
                    let _ = tx.try_send(Out::Flush);
                    return stream;
                }
                let pt = std::mem::take(s.plaintext());
                if buf.is_empty() {
                    buf = pt;
                } else {
                    buf.extend_from_slice(&pt);
                }
                let closed = s.phase() == crate::tls::session::Phase::PeerClosed;
                let has_out = s.has_outgoing();
                drop(s);
                if has_out {
                    let _ = tx.try_send(Out::Flush);
                }
                if closed {
                    // Answer close_notify with ours after delivering what came before it.
                    deliver(shard, &mut framer, &mut buf, flow, tx, t0);
                    let _ = tx.try_send(Out::Close);
                    return stream;
                }
            }
            _ => buf.extend_from_slice(&scratch[..n]),
        }
        shard.give_read_buf(scratch);
        if !deliver(shard, &mut framer, &mut buf, flow, tx, t0) {
            return stream;
        }
        if buf.is_empty() {
            // Nothing partial is waiting: release the memory of an idle connection.
            buf = Vec::new();
        }
    }
}

/// Frames and dispatches everything complete in `buf`; `false` when framing is lost.
fn deliver(
    shard: &Rc<Shard>,
    framer: &mut Framer,
    buf: &mut Vec<u8>,
    flow: &Flow,
    tx: &glommio::channels::local_channel::LocalSender<Out>,
    t0: Instant,
) -> bool {
    let mut start = 0;
    let ok = loop {
        match framer.frame(&buf[start..]) {
            Ok(Status::Complete(Frame::Message(n))) => {
                shard.on_message(flow, &buf[start..start + n], t0);
                start += n;
            }
            Ok(Status::Complete(Frame::Ping)) => {
                let _ = tx.try_send(Out::Pong);
                start += 4;
            }
            Ok(Status::Complete(Frame::Pong)) => start += 2,
            Ok(Status::Partial) => break true,
            Err(e) => {
                shard.count(&format!(
                    "sipring_parse_errors_total{{reason=\"{}\"}}",
                    e.label()
                ));
                tracing::warn!(error = %e, "stream framing lost; closing connection");
                if let Some(resp) =
                    sipring_core::response::error_response(&buf[start..], e, b"sr-framing")
                {
                    let _ = tx.try_send(Out::Msg(resp.into(), None));
                }
                let _ = tx.try_send(Out::Close);
                break false;
            }
        }
    };
    buf.drain(..start);
    ok
}
