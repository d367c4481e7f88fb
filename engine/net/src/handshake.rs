//! Driving a TLS handshake over a glommio socket, one record at a time (either side): the
//! server's accept path and the load generator's clients and reflector share it.

use crate::session::{MAX_RECORD, TlsSession};
use crate::{Rejection, snake_label};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// rustls refused the peer's flight, or the peer sent an alert
    /// (`rustls::Error::AlertReceived`).
    Tls(rustls::Error),
    /// The socket failed.
    Io(std::io::Error),
    /// The peer closed the connection before the handshake finished.
    Closed,
}

impl HandshakeError {
    /// A one-word cause for metrics: `tls_alert_<the alert the peer sent>`, `tls_<reason>`
    /// (this side's refusal, classed by what rustls says: [`Rejection::of`]; the server's
    /// own verifier carries finer reasons, which its metrics read with
    /// `sipring::tls::classify`), `io`, `closed`.
    pub fn label(&self) -> String {
        match self {
            // `CertificateRevoked` → `tls_alert_certificate_revoked`: what the peer objected to.
            HandshakeError::Tls(rustls::Error::AlertReceived(alert)) => {
                format!("tls_alert_{}", snake_label(&format!("{alert:?}")))
            }
            HandshakeError::Tls(e) => format!("tls_{}", Rejection::of(e).label()),
            HandshakeError::Io(_) => "io".into(),
            HandshakeError::Closed => "closed".into(),
        }
    }
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Tls(e) => write!(f, "TLS handshake refused: {e}"),
            HandshakeError::Io(e) => write!(f, "TLS handshake: socket error: {e}"),
            HandshakeError::Closed => f.write_str("TLS handshake: the peer closed the connection"),
        }
    }
}

impl std::error::Error for HandshakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HandshakeError::Tls(e) => Some(e),
            HandshakeError::Io(e) => Some(e),
            HandshakeError::Closed => None,
        }
    }
}

/// Reads the peer's first flight (a client's ClientHello), one record at a time, until this
/// side has something to send (its ServerHello, or an alert) or the handshake has ended;
/// [`drive_handshake`] then does the rest. A server bounds this by its ClientHello deadline:
/// bounded by the first byte alone, one byte then silence held a handshake slot for the
/// whole handshake timeout.
pub async fn read_first_flight(
    stream: &mut TcpStream,
    sess: &mut TlsSession,
) -> Result<(), HandshakeError> {
    let mut buf = vec![0u8; MAX_RECORD];
    while sess.is_handshaking() && !sess.has_outgoing() {
        read_record(stream, sess, &mut buf).await?;
    }
    Ok(())
}

/// Reads one TLS record's worth (rustls's hint) into `sess`. A record is one read and one
/// pass of rustls: a peer that cuts its flight into many small records does not keep the
/// other connections of this core waiting. On a refusal the alert rustls wrote is sent.
async fn read_record(
    stream: &mut TcpStream,
    sess: &mut TlsSession,
    buf: &mut [u8],
) -> Result<(), HandshakeError> {
    glommio::yield_if_needed().await;
    let want = sess.read_hint().min(buf.len());
    let n = stream
        .read(&mut buf[..want])
        .await
        .map_err(HandshakeError::Io)?;
    if n == 0 {
        return Err(HandshakeError::Closed);
    }
    if let Err(e) = sess.receive(&buf[..n]) {
        let alert = sess.take_outgoing();
        let _ = stream.write_all(&alert).await;
        return Err(HandshakeError::Tls(e));
    }
    Ok(())
}

/// Drives a handshake to completion, reading exactly one TLS record at a time (so nothing the
/// peer pipelines behind its Finished is read into userspace before a kernel hand-off). On a
/// refusal the alert rustls wrote is sent before the error returns.
pub async fn drive_handshake(
    stream: &mut TcpStream,
    sess: &mut TlsSession,
) -> Result<(), HandshakeError> {
    let mut buf = vec![0u8; MAX_RECORD];
    loop {
        let out = sess.take_outgoing();
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(HandshakeError::Io)?;
        }
        if !sess.is_handshaking() {
            return Ok(());
        }
        read_record(stream, sess, &mut buf).await?;
    }
}
