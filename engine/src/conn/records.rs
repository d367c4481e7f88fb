//! TLS control records once the kernel holds the record layer: the record budget of one key,
//! KeyUpdate (answered and initiated) and what else a peer may send outside application data.

use super::*;

/// Records we let one key protect: well below the AES-GCM confidentiality limit (2^24.5
/// records, RFC 9147 §4.5.3) — the kernel does not count for us, and rustls refuses a TLS
/// 1.2 AES-GCM record past 2^24 in userspace.
pub(super) fn ktls_record_budget(suite: rustls::SupportedCipherSuite) -> u64 {
    use rustls::CipherSuite as C;
    match suite.suite() {
        C::TLS13_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => UNLIMITED_AEAD,
        _ => 1 << 23,
    }
}

/// The budget of an AEAD without a practical limit (ChaCha20-Poly1305): a kernel key still
/// retires at `tls.ktls_max_records`; rustls in userspace never refuses one.
pub(super) const UNLIMITED_AEAD: u64 = 1 << 40;

/// Whether a KeyUpdate went out.
pub(super) enum Rekey {
    /// Sent, and the new TX key installed.
    Done,
    /// The socket had no room: nothing sent, try again before the next write.
    Later,
    /// No KeyUpdate is possible (TLS 1.2, or a kernel that cannot take a new key): the key
    /// is spent. The connection ends gracefully — what is being sent and what is queued
    /// still go out (the budget sits far below the AEAD limit), then close_notify.
    Retire,
}

/// TLS 1.3: send a KeyUpdate and install the new TX key. TLS 1.2, or a kernel that cannot
/// rekey: [`Rekey::Retire`] (before, a KeyUpdate went out that the kernel then could not
/// follow, and the connection was cut). Never blocks.
pub(super) fn rekey_or_close(
    fd: std::os::fd::RawFd,
    k: &mut KernelState,
) -> Result<Rekey, &'static str> {
    if !k.tls13 || !k.can_rekey {
        return Ok(Rekey::Retire);
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

/// Warning alerts a peer may send on one connection before it is closed (rustls's own
/// limit in userspace).
const MAX_WARNING_ALERTS: u8 = 4;

/// KeyUpdates a peer may send in a row with no application data between them (rustls, in
/// userspace, refuses a flood of them the same way): each costs two key derivations and
/// two `setsockopt`s here.
pub(super) const MAX_KEY_UPDATES_WITHOUT_DATA: u32 = 32;

/// The handshake messages of one handshake record: `(type, body)` each. A message split
/// across records (legal, and what no TLS stack does after the handshake) or a record that
/// ends inside a header is refused, not reassembled.
pub(super) fn handshake_messages(payload: &[u8]) -> Result<Vec<(u8, &[u8])>, &'static str> {
    let mut out = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let [kind, a, b, c, tail @ ..] = rest else {
            return Err("fragmented_handshake");
        };
        let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
        if tail.len() < len {
            return Err("fragmented_handshake");
        }
        let (body, next) = tail.split_at(len);
        out.push((*kind, body));
        rest = next;
    }
    if out.is_empty() {
        return Err("fragmented_handshake");
    }
    Ok(out)
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
            let r = alert_outcome(payload, k.tls13);
            if r.is_ok() {
                // Ignored, a few per connection, as userspace rustls allows (a peer
                // streaming warnings held its task for as long as it sent them).
                k.warnings += 1;
                if k.warnings > MAX_WARNING_ALERTS {
                    return Err("alert_flood");
                }
            }
            if r == Err("alert") {
                // One per connection, which ends here: debug (a peer opening connections to
                // send alerts must not write the log at its pace).
                tracing::debug!(conn = conn.id, alert = ?payload, "TLS alert from peer");
            }
            r
        }
        content::HANDSHAKE => {
            let messages = handshake_messages(payload)?;
            let last = messages.len() - 1;
            for (i, (kind, body)) in messages.into_iter().enumerate() {
                match kind {
                    // A KeyUpdate ends its record (RFC 8446 §5.1): what follows it in the
                    // same record was protected by the key it retires.
                    24 if i != last => return Err("key_update_not_last"),
                    // TLS 1.2 has no KeyUpdate: handshake type 24 there is a stray message.
                    24 if !k.tls13 => return Err("unexpected_handshake"),
                    // A kernel that cannot take a new key (TLS 1.3 offloaded anyway,
                    // `tls.ktls_tls13_without_rekey`): what the peer sends now cannot be
                    // read. Our TX key is untouched, so what is queued still goes out, then
                    // close_notify (it was an abort: queued answers were lost).
                    24 if !k.can_rekey => return Err("key_update_unsupported"),
                    // KeyUpdate: new RX key; answer with our own update if the peer asked.
                    24 => {
                        let requested = match body {
                            [0] => false,
                            [1] => true,
                            _ => return Err("bad_key_update"),
                        };
                        k.peer_key_updates += 1;
                        if k.peer_key_updates > MAX_KEY_UPDATES_WITHOUT_DATA {
                            return Err("key_update_flood");
                        }
                        let (seq, secrets) = match &mut k.conn {
                            KernelConn::Server(c) => c.update_rx_secret(),
                            KernelConn::Client(c) => c.update_rx_secret(),
                        }
                        .map_err(|_| "key_update_rx")?;
                        let info = sys::ktls::crypto_info(k.suite, seq, secrets)
                            .map_err(|_| "key_update_rx")?;
                        // Refused for RX: our TX key is untouched, the close is graceful.
                        sys::ktls::set_key(fd, sys::ktls::Dir::Rx, &info)
                            .map_err(|_| "key_update_rx")?;
                        // Asked to update ours too: now, or (socket full) before our next write.
                        if requested && let Rekey::Later = rekey_or_close(fd, k)? {
                            k.records_sent = u64::MAX;
                        }
                    }
                    // NewSessionTicket (client side): keep it for resumption.
                    4 => match &mut k.conn {
                        KernelConn::Client(c) => {
                            let _ = c.handle_new_session_ticket(body);
                        }
                        KernelConn::Server(_) => return Err("unexpected_handshake"),
                    },
                    _ => {
                        let server = matches!(k.conn, KernelConn::Server(_));
                        refuse_renegotiation(kind, server, k.tls13, k.renegotiation_refused)?;
                        k.renegotiation_refused = true;
                        // A warning the socket has no room for is not sent: the peer's
                        // renegotiation then times out on its side, as it would fail anyway.
                        match sys::ktls::send_record(fd, content::ALERT, &[1, NO_RENEGOTIATION]) {
                            Ok(_) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => return Err("write_error"),
                        }
                    }
                }
            }
            Ok(())
        }
        // After the handshake a ChangeCipherSpec is a protocol violation (a protected one in
        // TLS 1.3, RFC 8446 §5; renegotiation in TLS 1.2, which we do not do) — and 23 bytes
        // of wire for a record's worth of work: refused, as userspace rustls refuses it.
        _ => Err("unexpected_record"),
    }
}

/// no_renegotiation (RFC 5246 §7.2.2), sent at warning level.
const NO_RENEGOTIATION: u8 = 100;

/// A handshake message other than KeyUpdate or NewSessionTicket after the handshake: under
/// TLS 1.2, the renegotiation a server asks for (HelloRequest, 0, to us as client) or a
/// client starts (ClientHello, 1, to us as server) is refused once with a no_renegotiation
/// warning, as userspace rustls does, and ends the connection the second time; anything
/// else ends it. A kernel connection was closed at the first one, where a userspace one
/// went on: some SBCs renegotiate TLS 1.2 links periodically to rekey.
fn refuse_renegotiation(
    kind: u8,
    server: bool,
    tls13: bool,
    refused_before: bool,
) -> Result<(), &'static str> {
    match (kind, server) {
        (0, false) | (1, true) if !tls13 && !refused_before => Ok(()),
        (0, false) | (1, true) if !tls13 => Err("renegotiation"),
        _ => Err("unexpected_handshake"),
    }
}

/// What an alert record from the peer does, as userspace rustls has it: close_notify
/// (description 0) whatever its level (a peer that sends it as fatal still closes cleanly:
/// the answers in progress are finished, not dropped); a warning is ignored under TLS 1.2
/// (no_renegotiation and the like), and under TLS 1.3 only user_canceled is (RFC 8446
/// §6.1: a close_notify follows it); any other ends the connection.
fn alert_outcome(payload: &[u8], tls13: bool) -> Result<(), &'static str> {
    match payload {
        [1 | 2, 0] => Err("close_notify"),
        [1, 90] => Ok(()),
        [1, _] if !tls13 => Ok(()),
        _ => Err("alert"),
    }
}

#[cfg(test)]
mod tests {
    use super::{alert_outcome, handshake_messages, refuse_renegotiation};

    #[test]
    fn a_tls12_renegotiation_is_refused_once_then_ends_the_connection() {
        // As userspace rustls: a server's HelloRequest to us (client), a client's ClientHello
        // to us (server), under TLS 1.2.
        for (kind, server) in [(0, false), (1, true)] {
            assert_eq!(refuse_renegotiation(kind, server, false, false), Ok(()));
            assert_eq!(
                refuse_renegotiation(kind, server, false, true),
                Err("renegotiation")
            );
            // TLS 1.3 has none.
            assert_eq!(
                refuse_renegotiation(kind, server, true, false),
                Err("unexpected_handshake")
            );
        }
        // The wrong way round, or another message: not a renegotiation.
        for (kind, server) in [(0, true), (1, false), (2, false), (20, true)] {
            assert_eq!(
                refuse_renegotiation(kind, server, false, false),
                Err("unexpected_handshake")
            );
        }
    }

    #[test]
    fn alerts_close_as_userspace_rustls_does() {
        // A close_notify sent at fatal level was an `alert`: the answers in progress on the
        // connection were dropped instead of finished.
        for tls13 in [false, true] {
            assert_eq!(alert_outcome(&[1, 0], tls13), Err("close_notify"));
            assert_eq!(alert_outcome(&[2, 0], tls13), Err("close_notify"));
            // user_canceled, a warning, comes before the close_notify: not an abort.
            assert_eq!(alert_outcome(&[1, 90], tls13), Ok(()));
            for other in [&[2u8, 90][..], &[2, 42], &[3, 0], &[0], &[]] {
                assert_eq!(alert_outcome(other, tls13), Err("alert"), "{other:?}");
            }
        }
        // Other warnings: ignored under TLS 1.2 (no_renegotiation), fatal under TLS 1.3.
        assert_eq!(alert_outcome(&[1, 100], false), Ok(()));
        assert_eq!(alert_outcome(&[1, 100], true), Err("alert"));
    }

    #[test]
    fn handshake_records_are_split_into_whole_messages_or_refused() {
        // A record of `[4]` (a ticket's type byte alone: legal TLS, split across records)
        // panicked the shard before (`&payload[4..]`); it is refused now.
        for short in [&[4u8][..], &[4, 0, 0], &[24], &[], &[4, 0, 0, 9, 1, 2]] {
            assert_eq!(
                handshake_messages(short),
                Err("fragmented_handshake"),
                "{short:?}"
            );
        }
        // Two messages in one record (a ticket, then a KeyUpdate): both, in order.
        let two = [4, 0, 0, 2, 7, 7, 24, 0, 0, 1, 1];
        assert_eq!(
            handshake_messages(&two),
            Ok(vec![(4, &[7u8, 7][..]), (24, &[1u8][..])])
        );
    }
}
