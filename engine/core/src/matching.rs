//! Matching messages to transactions (RFC 3261 §17.1.3 and §17.2.3).
//!
//! A [`TxKey`] is what a transaction table is indexed by. Server transactions are keyed by
//! the top Via's branch and sent-by and the request method, with ACK folded into INVITE (an
//! ACK for a non-2xx final matches the INVITE transaction and is absorbed there). CANCEL has
//! its own transaction; [`TxKey::cancelled_invite`] names the INVITE it cancels. Client
//! transactions are keyed by the branch we generated and the CSeq method of the response.

use crate::parse::{Essentials, Message, Method};

/// The method part of a transaction key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyMethod {
    /// INVITE (and the ACK for its non-2xx final).
    Invite,
    /// CANCEL.
    Cancel,
    /// Any other method, by name.
    Other(Box<[u8]>),
}

impl KeyMethod {
    fn of(method: &[u8]) -> KeyMethod {
        match method {
            b"INVITE" | b"ACK" => KeyMethod::Invite,
            b"CANCEL" => KeyMethod::Cancel,
            m => KeyMethod::Other(m.into()),
        }
    }
}

/// A transaction key; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxKey {
    /// Top Via branch.
    pub branch: Box<[u8]>,
    /// Top Via sent-by (`host` or `host:port`, host lower-cased); empty for client keys.
    pub sent_by: Box<[u8]>,
    /// The method.
    pub method: KeyMethod,
}

impl TxKey {
    /// The server transaction a request belongs to. `None` without a branch (the proxy
    /// answers those 400). A branch without the RFC 3261 magic cookie is not taken to be
    /// unique (§17.2.3: an RFC 2543 element may reuse one for a re-INVITE): its key also
    /// holds the Call-ID, the CSeq number and the From tag, which its retransmissions, its
    /// CANCEL and the ACK of its non-2xx answer share.
    pub fn server(msg: &Message<'_, '_>, ess: &Essentials<'_>) -> Option<TxKey> {
        let branch = ess.top_via.branch()?;
        let legacy;
        let cookie = crate::values::MAGIC_COOKIE;
        let branch = if branch.len() > cookie.len() && branch.starts_with(cookie) {
            branch
        } else {
            let mut k = branch.to_vec();
            for part in [ess.call_id, ess.cseq.seq.to_string().as_bytes()] {
                k.push(0);
                k.extend_from_slice(part);
            }
            k.push(0);
            k.extend_from_slice(ess.from.tag().unwrap_or_default());
            legacy = k;
            &legacy[..]
        };
        let mut sent_by = ess.top_via.host.to_ascii_lowercase();
        if let Some(p) = ess.top_via.port {
            sent_by.extend_from_slice(format!(":{p}").as_bytes());
        }
        let method = msg.method()?;
        Some(TxKey {
            branch: branch.into(),
            sent_by: sent_by.into(),
            method: KeyMethod::of(method.as_bytes()),
        })
    }

    /// The client transaction a response (or our own forwarded request) belongs to.
    pub fn client(ess: &Essentials<'_>) -> Option<TxKey> {
        Some(TxKey {
            branch: ess.top_via.branch()?.into(),
            sent_by: Box::default(),
            method: KeyMethod::of(ess.cseq.method),
        })
    }

    /// For a CANCEL's key, the key of the INVITE transaction it targets.
    pub fn cancelled_invite(&self) -> Option<TxKey> {
        (self.method == KeyMethod::Cancel).then(|| TxKey {
            method: KeyMethod::Invite,
            ..self.clone()
        })
    }

    /// Is this the key of an INVITE (or its ACK)?
    pub fn is_invite(&self) -> bool {
        self.method == KeyMethod::Invite
    }
}

/// Is `method` an ACK?
pub fn is_ack(msg: &Message<'_, '_>) -> bool {
    msg.method() == Some(Method::Ack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::Header;
    use crate::parse::{Framing, Limits, Status, parse};

    fn key(s: &str) -> TxKey {
        let mut h = [Header::EMPTY; 16];
        let Ok(Status::Complete(m)) =
            parse(s.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
        else {
            panic!()
        };
        let e = m.validate(&Limits::default()).unwrap();
        TxKey::server(&m, &e).unwrap()
    }

    fn req(method: &str, via: &str) -> String {
        format!(
            "{method} sip:b@example.com SIP/2.0\r\nVia: SIP/2.0/TLS {via}\r\nTo: <sip:b@example.com>\r\nFrom: <sip:a@example.com>;tag=1\r\nCall-ID: c\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
        )
    }

    #[test]
    fn ack_and_cancel_match_the_invite() {
        let inv = key(&req("INVITE", "A.example.com:5061;branch=z9hG4bK1"));
        assert_eq!(key(&req("ACK", "a.example.com:5061;branch=z9hG4bK1")), inv);
        let cancel = key(&req("CANCEL", "a.example.com:5061;branch=z9hG4bK1"));
        assert_ne!(cancel, inv);
        assert_eq!(cancel.cancelled_invite(), Some(inv.clone()));
        assert_eq!(inv.cancelled_invite(), None);
        assert_ne!(
            key(&req("INVITE", "a.example.com:5062;branch=z9hG4bK1")),
            inv
        );
        assert_ne!(
            key(&req("INVITE", "a.example.com:5061;branch=z9hG4bK2")),
            inv
        );
        assert!(!key(&req("BYE", "a.example.com;branch=z9hG4bK1")).is_invite());
    }

    #[test]
    fn a_branch_without_the_cookie_is_told_apart_by_its_cseq_and_call() {
        // An RFC 2543 element reusing its branch for a re-INVITE: a new transaction, not a
        // retransmission of the first (which sat in Accepted and swallowed it).
        let via = "a.example.com;branch=0123456789ab";
        let inv = key(&req("INVITE", via));
        assert_eq!(key(&req("INVITE", via)), inv, "a retransmission matches");
        assert_eq!(key(&req("ACK", via)), inv, "its non-2xx ACK matches");
        assert_eq!(
            key(&req("CANCEL", via)).cancelled_invite(),
            Some(inv.clone()),
            "its CANCEL names it"
        );
        let reinvite = req("INVITE", via).replace("CSeq: 1 INVITE", "CSeq: 2 INVITE");
        assert_ne!(key(&reinvite), inv);
        let other_call = req("INVITE", via).replace("Call-ID: c", "Call-ID: d");
        assert_ne!(key(&other_call), inv);
        // With the cookie the branch alone is the transaction, as before.
        let cookie = "a.example.com;branch=z9hG4bK1";
        assert_eq!(
            key(&req("INVITE", cookie).replace("CSeq: 1", "CSeq: 2")),
            key(&req("INVITE", cookie))
        );
    }
}
