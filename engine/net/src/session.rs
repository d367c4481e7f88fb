//! One TLS connection over rustls's unbuffered API, without IO.
//!
//! The unbuffered API is used for the whole life of a connection so that the same session
//! can either keep running in userspace or, once the handshake is done and its output
//! flushed, be turned into a `KernelConnection` for kernel TLS. During the handshake the
//! driver reads exactly [`TlsSession::read_hint`] bytes at a time (one TLS record: its
//! 5-byte header, then exactly its body), so no application data that a client pipelines
//! right behind its Finished is read into userspace before the hand-off.
//!
//! Call protocol: feed received bytes with [`TlsSession::receive`], queue plaintext with
//! [`TlsSession::write`], then send [`TlsSession::take_outgoing`] and consume
//! [`TlsSession::plaintext`]. Errors are fatal and sticky (the connection must close).

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{ClientConfig, Error, ServerConfig};
use std::sync::Arc;

/// Largest TLS record we accept: header + 2^14 plaintext + 2048 expansion (RFC 8446 §5.2).
pub const MAX_RECORD: usize = 5 + (1 << 14) + 2048;

/// Most records a peer may send during a handshake: a ClientHello of 64 KiB (the most a
/// handshake message of rustls may be) cut into 64-byte records (the least RFC 8449 allows)
/// is 1024, twice that covers its certificate flight. Each record is a read and a pass of
/// rustls: without a bound, one-byte records made a handshake cost 100 000 of each.
pub const MAX_HANDSHAKE_RECORDS: u32 = 2048;

enum Conn {
    Server(Box<UnbufferedServerConnection>),
    Client(Box<UnbufferedClientConnection>),
}

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Handshake in progress.
    Handshaking,
    /// Application data flows both ways.
    Established,
    /// The peer sent close_notify; we may still send.
    PeerClosed,
    /// Both sides closed.
    Closed,
}

/// A TLS session; see the module docs.
pub struct TlsSession {
    conn: Conn,
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
    plaintext: Vec<u8>,
    pending: Vec<u8>,
    close_requested: bool,
    close_sent: bool,
    phase: Phase,
    failed: bool,
    /// Where the peer's byte stream stands in its records, as read during the handshake
    /// (rustls may join a handshake message's records in `incoming`, so its first header
    /// says nothing about the next read): the header bytes of the next record seen so far.
    wire_header: [u8; 5],
    wire_header_len: u8,
    /// The bytes of the current record's body still to come.
    wire_body_left: usize,
    /// Records the peer sent during the handshake (at most [`MAX_HANDSHAKE_RECORDS`]).
    wire_records: u32,
    /// Application data records we sent (rustls cuts plaintext into records of 16 KiB).
    records_sent: u64,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("phase", &self.phase)
            .field("incoming", &self.incoming.len())
            .field("outgoing", &self.outgoing.len())
            .finish()
    }
}

/// Runs `f` into the spare end of `out`, growing it when rustls asks for more room.
fn write_into<E>(
    out: &mut Vec<u8>,
    guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    out.resize(start + guess, 0);
    match f(&mut out[start..]) {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(e) => match needs(&e) {
            Some(required) => {
                out.resize(start + required, 0);
                let n = f(&mut out[start..]);
                match n {
                    Ok(n) => {
                        out.truncate(start + n);
                        Ok(())
                    }
                    Err(e) => {
                        out.truncate(start);
                        Err(e)
                    }
                }
            }
            None => {
                out.truncate(start);
                Err(e)
            }
        },
    }
}

fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn encrypt_err(e: EncryptError) -> Error {
    Error::General(format!("encrypt: {e}"))
}

macro_rules! drive {
    ($self:ident, $conn:expr) => {{
        for _ in 0..10_000 {
            let UnbufferedStatus {
                mut discard, state, ..
            } = $conn.process_tls_records(&mut $self.incoming);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    $self.failed = true;
                    $self.incoming.drain(..discard);
                    // Once established, nothing more of the peer's is read: the record that
                    // failed (one that did not decrypt) would only fail again, and rustls,
                    // asked again, would send a second fatal alert (a debug assertion of its
                    // own). During the handshake rustls's deframer still refers to what it
                    // holds, and the failed message was taken already.
                    if $self.phase != Phase::Handshaking {
                        $self.incoming.clear();
                    }
                    // rustls queued a fatal alert: collect it so the peer learns why.
                    for _ in 0..4 {
                        let UnbufferedStatus { state, discard, .. } =
                            $conn.process_tls_records(&mut $self.incoming);
                        let _ = discard;
                        match state {
                            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                                let _ = write_into(
                                    &mut $self.outgoing,
                                    64,
                                    |b| enc.encode(b),
                                    encode_needs,
                                );
                            }
                            Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                            _ => break,
                        }
                    }
                    return Err(e);
                }
            };
            let mut stop = false;
            match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec?;
                        discard += rec.discard;
                        $self.plaintext.extend_from_slice(rec.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    write_into(&mut $self.outgoing, 4096, |b| e.encode(b), encode_needs)
                        .map_err(|e| Error::General(format!("encode: {e}")))?;
                }
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::BlockedHandshake => stop = true,
                ConnectionState::WriteTraffic(mut w) => {
                    if $self.phase == Phase::Handshaking {
                        $self.phase = Phase::Established;
                    }
                    if !$self.pending.is_empty() {
                        let data = std::mem::take(&mut $self.pending);
                        $self.records_sent += (data.len() as u64).div_ceil(1 << 14);
                        let guess = data.len() + (data.len() / (1 << 14) + 1) * 64;
                        write_into(
                            &mut $self.outgoing,
                            guess,
                            |b| w.encrypt(&data, b),
                            encrypt_needs,
                        )
                        .map_err(encrypt_err)?;
                    }
                    if $self.close_requested && !$self.close_sent {
                        write_into(
                            &mut $self.outgoing,
                            64,
                            |b| w.queue_close_notify(b),
                            encrypt_needs,
                        )
                        .map_err(encrypt_err)?;
                        $self.close_sent = true;
                    }
                    stop = true;
                }
                ConnectionState::PeerClosed => $self.phase = Phase::PeerClosed,
                ConnectionState::Closed => {
                    $self.phase = Phase::Closed;
                    stop = true;
                }
                _ => {
                    $self.failed = true;
                    return Err(Error::General(
                        "unexpected TLS state (early data is not enabled)".into(),
                    ));
                }
            }
            $self.incoming.drain(..discard);
            if stop {
                if $self.incoming.is_empty() {
                    // Keep no buffer for an idle connection.
                    $self.incoming = Vec::new();
                } else if $self.incoming.capacity() > 2 * $self.incoming.len() + 4096 {
                    // Hold what is counted (part of one record), not a whole read's room.
                    $self.incoming.shrink_to($self.incoming.len() + 1024);
                }
                return Ok(());
            }
        }
        $self.failed = true;
        Err(Error::General("TLS state machine made no progress".into()))
    }};
}

impl TlsSession {
    /// A server session.
    pub fn server(cfg: Arc<ServerConfig>) -> Result<TlsSession, Error> {
        Ok(Self::with(Conn::Server(Box::new(
            UnbufferedServerConnection::new(cfg)?,
        ))))
    }

    /// A client session to `name`; the ClientHello is ready in [`TlsSession::take_outgoing`].
    pub fn client(cfg: Arc<ClientConfig>, name: ServerName<'static>) -> Result<TlsSession, Error> {
        let mut s = Self::with(Conn::Client(Box::new(UnbufferedClientConnection::new(
            cfg, name,
        )?)));
        s.process()?;
        Ok(s)
    }

    fn with(conn: Conn) -> TlsSession {
        TlsSession {
            conn,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            plaintext: Vec::new(),
            pending: Vec::new(),
            close_requested: false,
            close_sent: false,
            phase: Phase::Handshaking,
            failed: false,
            wire_header: [0; 5],
            wire_header_len: 0,
            wire_body_left: 0,
            wire_records: 0,
            records_sent: 0,
        }
    }

    fn process(&mut self) -> Result<(), Error> {
        if self.failed {
            return Err(Error::General("session already failed".into()));
        }
        match &mut self.conn {
            Conn::Server(c) => drive!(self, c),
            Conn::Client(c) => drive!(self, c),
        }
    }

    /// How many bytes to read next. During the handshake: exactly what completes the current
    /// TLS record on the wire (its header, then its body; never more), whatever rustls holds
    /// of earlier records. Afterwards: up to one record at a time is not needed, so a large
    /// read size.
    pub fn read_hint(&self) -> usize {
        if self.phase != Phase::Handshaking {
            return 64 * 1024;
        }
        if self.wire_body_left > 0 {
            self.wire_body_left
        } else {
            5 - usize::from(self.wire_header_len)
        }
    }

    /// Follows the record boundaries of `tls`, the peer's next bytes (during the handshake).
    fn track_records(&mut self, mut tls: &[u8]) -> Result<(), Error> {
        while !tls.is_empty() {
            if self.wire_body_left > 0 {
                let k = self.wire_body_left.min(tls.len());
                self.wire_body_left -= k;
                tls = &tls[k..];
                continue;
            }
            let have = usize::from(self.wire_header_len);
            let k = (5 - have).min(tls.len());
            self.wire_header[have..have + k].copy_from_slice(&tls[..k]);
            self.wire_header_len += k as u8;
            tls = &tls[k..];
            if self.wire_header_len == 5 {
                self.wire_header_len = 0;
                let body = usize::from(u16::from_be_bytes([
                    self.wire_header[3],
                    self.wire_header[4],
                ]));
                if 5 + body > MAX_RECORD {
                    self.failed = true;
                    return Err(Error::General(format!(
                        "TLS record of {body} bytes exceeds the limit"
                    )));
                }
                self.wire_body_left = body;
                self.wire_records += 1;
                if self.wire_records > MAX_HANDSHAKE_RECORDS {
                    self.failed = true;
                    return Err(Error::General(format!(
                        "handshake of more than {MAX_HANDSHAKE_RECORDS} records"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Feeds bytes received from the peer.
    pub fn receive(&mut self, tls: &[u8]) -> Result<(), Error> {
        if self.phase == Phase::Handshaking {
            self.track_records(tls)?;
        }
        self.incoming.extend_from_slice(tls);
        if self.incoming.len() >= 5 {
            let body = usize::from(u16::from_be_bytes([self.incoming[3], self.incoming[4]]));
            if 5 + body > MAX_RECORD {
                self.failed = true;
                return Err(Error::General(format!(
                    "TLS record of {body} bytes exceeds the limit"
                )));
            }
        }
        self.process()
    }

    /// Queues plaintext; it is encrypted as soon as the handshake allows.
    pub fn write(&mut self, plaintext: &[u8]) -> Result<(), Error> {
        self.pending.extend_from_slice(plaintext);
        if self.phase != Phase::Handshaking {
            self.process()?;
        }
        Ok(())
    }

    /// Queues a close_notify alert (after any pending plaintext).
    pub fn close(&mut self) -> Result<(), Error> {
        self.close_requested = true;
        if self.phase != Phase::Handshaking && !self.failed {
            self.process()?;
        }
        Ok(())
    }

    /// Application data records sent so far (under every key).
    pub fn records_sent(&self) -> u64 {
        self.records_sent
    }

    /// Has close_notify been queued?
    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// TLS bytes to send, taken.
    pub fn take_outgoing(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.outgoing)
    }

    /// Is there anything to send?
    pub fn has_outgoing(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// Decrypted application data; the caller removes what it consumed.
    pub fn plaintext(&mut self) -> &mut Vec<u8> {
        &mut self.plaintext
    }

    /// Received TLS bytes not yet processed (part of a record).
    pub fn buffered_incoming(&self) -> usize {
        self.incoming.len()
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Still handshaking?
    pub fn is_handshaking(&self) -> bool {
        self.phase == Phase::Handshaking
    }

    /// The peer's certificate chain, once verified.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match &self.conn {
            Conn::Server(c) => c.peer_certificates(),
            Conn::Client(c) => c.peer_certificates(),
        }
    }

    /// The negotiated protocol version, e.g. `"TLSv1_3"`.
    pub fn protocol(&self) -> Option<rustls::ProtocolVersion> {
        match &self.conn {
            Conn::Server(c) => c.protocol_version(),
            Conn::Client(c) => c.protocol_version(),
        }
    }

    /// The negotiated cipher suite.
    pub fn cipher_suite(&self) -> Option<rustls::SupportedCipherSuite> {
        match &self.conn {
            Conn::Server(c) => c.negotiated_cipher_suite(),
            Conn::Client(c) => c.negotiated_cipher_suite(),
        }
    }

    /// The negotiated key-exchange group's name.
    pub fn kx_group(&self) -> Option<rustls::NamedGroup> {
        match &self.conn {
            Conn::Server(c) => c.negotiated_key_exchange_group().map(|g| g.name()),
            Conn::Client(c) => c.negotiated_key_exchange_group().map(|g| g.name()),
        }
    }

    /// Was this a resumed handshake (a ticket or session ID)? Then the peer's chain is the
    /// one stored with the session, not verified again by rustls.
    pub fn resumed(&self) -> bool {
        let k = match &self.conn {
            Conn::Server(c) => c.handshake_kind(),
            Conn::Client(c) => c.handshake_kind(),
        };
        k == Some(rustls::HandshakeKind::Resumed)
    }

    /// Hands the record layer to the kernel: returns the traffic secrets (with sequence
    /// numbers) and the `KernelConnection` that handles KeyUpdate and tickets afterwards.
    ///
    /// Preconditions (else the session comes back untouched in [`HandoffRefused`]): the
    /// handshake is done, every byte of [`TlsSession::take_outgoing`] was sent, no partial
    /// record is buffered, and no plaintext is pending either way.
    pub fn dangerous_into_kernel(self) -> Result<KernelHandoff, HandoffRefused> {
        if self.phase != Phase::Established
            || !self.outgoing.is_empty()
            || !self.incoming.is_empty()
            || !self.pending.is_empty()
            || !self.plaintext.is_empty()
        {
            let reason = format!(
                "not at a record boundary (phase {:?}, out {}, in {}, pending {}, plaintext {})",
                self.phase,
                self.outgoing.len(),
                self.incoming.len(),
                self.pending.len(),
                self.plaintext.len()
            );
            return Err(HandoffRefused {
                reason,
                session: Some(Box::new(self)),
            });
        }
        let refused = |e: Error| HandoffRefused {
            reason: format!("rustls refused the hand-off: {e}"),
            session: None,
        };
        match self.conn {
            Conn::Server(c) => c
                .dangerous_into_kernel_connection()
                .map(|(s, k)| KernelHandoff::Server(s, k))
                .map_err(refused),
            Conn::Client(c) => c
                .dangerous_into_kernel_connection()
                .map(|(s, k)| KernelHandoff::Client(s, k))
                .map_err(refused),
        }
    }
}

/// Why a kernel hand-off did not happen.
pub struct HandoffRefused {
    /// For the log.
    pub reason: String,
    /// The session, when it is still usable in userspace.
    pub session: Option<Box<TlsSession>>,
}

/// What the kernel needs after a hand-off.
pub enum KernelHandoff {
    /// Server side.
    Server(
        rustls::ExtractedSecrets,
        rustls::kernel::KernelConnection<rustls::server::ServerConnectionData>,
    ),
    /// Client side.
    Client(
        rustls::ExtractedSecrets,
        rustls::kernel::KernelConnection<rustls::client::ClientConnectionData>,
    ),
}
