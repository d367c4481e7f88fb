//! TLS control records once the kernel holds the record layer: the record budget of one key,
//! KeyUpdate (answered and initiated) and what else a peer may send outside application data.

use super::*;

/// Records we let one key protect: well below the AES-GCM confidentiality limit (2^24.5
/// records, RFC 9147 §4.5.3) — the kernel does not count for us.
pub(super) fn ktls_record_budget(suite: rustls::SupportedCipherSuite) -> u64 {
    use rustls::CipherSuite as C;
    match suite.suite() {
        C::TLS13_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 1 << 40,
        _ => 1 << 23,
    }
}

/// Whether a KeyUpdate went out.
pub(super) enum Rekey {
    /// Sent, and the new TX key installed.
    Done,
    /// The socket had no room: nothing sent, try again before the next write.
    Later,
}

/// TLS 1.3: send a KeyUpdate and install the new TX key. TLS 1.2 has no KeyUpdate: send
/// close_notify and end the connection (`Err`). Never blocks.
pub(super) fn rekey_or_close(
    fd: std::os::fd::RawFd,
    k: &mut KernelState,
) -> Result<Rekey, &'static str> {
    if !k.tls13 {
        tracing::info!("TLS 1.2 connection reached its record budget; closing gracefully");
        let _ = sys::ktls::send_close_notify(fd);
        return Err("record_budget");
    }
    // KeyUpdate(update_not_requested): type 24, length 1, value 0.
    match sys::ktls::send_record(fd, sys::ktls::content::HANDSHAKE, &[24, 0, 0, 1, 0]) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Rekey::Later),
        Err(_) => return Err("key_update"),
    }
    let (seq, secrets) = match &mut k.conn {
        KernelConn::Server(c) => c.update_tx_secret(),
        KernelConn::Client(c) => c.update_tx_secret(),
    }
    .map_err(|_| "key_update")?;
    let info = sys::ktls::crypto_info(k.suite, seq, secrets).map_err(|_| "key_update")?;
    sys::ktls::set_key(fd, sys::ktls::Dir::Tx, &info).map_err(|_| "key_update")?;
    k.records_sent = 0;
    Ok(Rekey::Done)
}

/// A non-data record the kernel handed up: alerts, KeyUpdate, tickets. `Err`: the
/// connection ends (close_notify is answered by the close sequence).
pub(super) fn on_control_record(conn: &Conn, typ: u8, payload: &[u8]) -> Result<(), &'static str> {
    use sys::ktls::content;
    let mut io = conn.io.borrow_mut();
    let fd = io.stream.as_raw_fd();
    let Layer::Kernel(k) = &mut io.layer else {
        return Err("unexpected_record");
    };
    match typ {
        content::ALERT => {
            if payload == [1, 0] {
                Err("close_notify")
            } else {
                tracing::info!(conn = conn.id, alert = ?payload, "TLS alert from peer");
                Err("alert")
            }
        }
        content::HANDSHAKE => match payload.first() {
            // KeyUpdate: new RX key; answer with our own update if the peer asked.
            Some(24) => {
                let requested = payload.get(4) == Some(&1);
                let (seq, secrets) = match &mut k.conn {
                    KernelConn::Server(c) => c.update_rx_secret(),
                    KernelConn::Client(c) => c.update_rx_secret(),
                }
                .map_err(|_| "key_update")?;
                let info =
                    sys::ktls::crypto_info(k.suite, seq, secrets).map_err(|_| "key_update")?;
                sys::ktls::set_key(fd, sys::ktls::Dir::Rx, &info).map_err(|_| "key_update")?;
                // Asked to update ours too: now, or (socket full) before our next write.
                if requested && let Rekey::Later = rekey_or_close(fd, k)? {
                    k.records_sent = u64::MAX;
                }
                Ok(())
            }
            // NewSessionTicket (client side): keep it for resumption.
            Some(4) => {
                if let KernelConn::Client(c) = &mut k.conn {
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
