//! Benchmark fixtures shared by the bench targets: typical messages of the sizes operators
//! see on a carrier SIP-over-TLS edge.

/// A typical INVITE with an SDP offer, about 900 bytes.
pub const INVITE: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/TLS 198.51.100.23:50612;branch=z9hG4bK-524287-1---7a9d3c0f5e8b1a2d;rport;alias\r\n\
Max-Forwards: 70\r\n\
Contact: <sip:alice@198.51.100.23:50612;transport=tls;ob>;+sip.instance=\"<urn:uuid:6f4c2a1e-8b3d-4e5f-9a0b-1c2d3e4f5a6b>\"\r\n\
To: <sip:bob@example.com>\r\n\
From: \"Alice Liddell\" <sip:alice@example.com>;tag=7f3a9c21\r\n\
Call-ID: 8d6f1e2a-4b3c-4d5e-8f90-a1b2c3d4e5f6\r\n\
CSeq: 1 INVITE\r\n\
Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, MESSAGE, OPTIONS, INFO, SUBSCRIBE, UPDATE, PRACK\r\n\
Supported: replaces, outbound, timer, 100rel\r\n\
User-Agent: Acme SoftPhone 7.2.1\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 273\r\n\
\r\n\
v=0\r\n\
o=alice 2890844526 2890844526 IN IP4 198.51.100.23\r\n\
s=-\r\n\
c=IN IP4 198.51.100.23\r\n\
t=0 0\r\n\
m=audio 49170 RTP/AVP 0 8 96 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:96 opus/48000/2\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\n\
a=sendrecv\r\n\
a=ptime:20\r\n";

/// A REGISTER refresh over an outbound flow.
pub const REGISTER: &[u8] = b"REGISTER sip:example.com SIP/2.0\r\n\
Via: SIP/2.0/TLS 198.51.100.23:50612;branch=z9hG4bK-524287-1---1b2c3d4e;rport\r\n\
Max-Forwards: 70\r\n\
Contact: <sip:alice@198.51.100.23:50612;transport=tls;ob>;+sip.instance=\"<urn:uuid:6f4c2a1e-8b3d-4e5f-9a0b-1c2d3e4f5a6b>\";reg-id=1\r\n\
To: <sip:alice@example.com>\r\n\
From: <sip:alice@example.com>;tag=3c9a1f\r\n\
Call-ID: reg-5a6b7c8d-9e0f-1a2b-3c4d-5e6f7a8b9c0d\r\n\
CSeq: 42 REGISTER\r\n\
Expires: 600\r\n\
Supported: outbound, path\r\n\
User-Agent: Acme SoftPhone 7.2.1\r\n\
Content-Length: 0\r\n\
\r\n";

/// A 200 OK to the INVITE, as it comes back through the proxy (two Vias, Record-Route).
pub const OK_200: &[u8] = b"SIP/2.0 200 OK\r\n\
Via: SIP/2.0/TLS proxy.example.com:5061;branch=z9hG4bKsr0123456789abcdef.1\r\n\
Via: SIP/2.0/TLS 198.51.100.23:50612;branch=z9hG4bK-524287-1---7a9d3c0f5e8b1a2d;rport=50612;received=198.51.100.23\r\n\
Record-Route: <sip:proxy.example.com:5061;transport=tls;lr;fi=c1;fo=c2>\r\n\
Contact: <sip:bob@203.0.113.7:49152;transport=tls;ob>\r\n\
To: <sip:bob@example.com>;tag=9b2e4d\r\n\
From: \"Alice Liddell\" <sip:alice@example.com>;tag=7f3a9c21\r\n\
Call-ID: 8d6f1e2a-4b3c-4d5e-8f90-a1b2c3d4e5f6\r\n\
CSeq: 1 INVITE\r\n\
Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, MESSAGE, OPTIONS, INFO\r\n\
Supported: replaces, outbound, timer\r\n\
Session-Expires: 1800;refresher=uac\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 0\r\n\
\r\n";

/// Parses and validates `bytes` (a request fixture) and makes the proxy's forwarding edit
/// of it — Via, Max-Forwards, Record-Route, a new Request-URI — as a stateful forward does
/// per branch; returns the forwarded bytes. The `proxy_edit/invite` criterion bench and the
/// instruction-count gate's `forward` workload both run this.
pub fn parse_and_forward(proxy: &sipring_core::proxy::Proxy, bytes: &[u8]) -> Vec<u8> {
    use sipring_core::policy::IdentityEdit;
    use sipring_core::proxy::{Flow, Hop, Proxy};
    use sipring_core::{Framing, Header, Limits, Status, parse};
    let (a, b) = (Flow::Conn(1), Flow::Conn(2));
    let iface = proxy.default_interface();
    let mut h = [Header::EMPTY; 64];
    let limits = Limits::default();
    let Ok(Status::Complete(m)) = parse(bytes, &mut h, &limits, Framing::Stream) else {
        panic!("fixture did not parse")
    };
    let e = m.validate(&limits).expect("valid fixture");
    let branch = Proxy::branch(&m, &e, 7);
    proxy.forward_request(
        &m,
        &e,
        &branch,
        Some(b"sip:bob@203.0.113.7:49152;transport=tls"),
        &Hop {
            inbound: &a,
            outbound: &b,
            in_iface: &iface,
            out_iface: &iface,
            // From a client, as most requests are: its Via is completed (received, rport).
            source: Some(std::net::SocketAddr::from(([198, 51, 100, 7], 49152))),
            ident: &IdentityEdit::default(),
            path: &[],
            overload_control: false,
            max_breadth: None,
            // An authenticated caller to a registered callee, as calls are: both named.
            parties: (Some("sip:alice@example.com"), Some("sip:bob@example.com")),
        },
    )
}

/// `n` bytes (at least) of back-to-back messages, as a busy trunk delivers them.
pub fn stream_of(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + INVITE.len());
    let msgs = [INVITE, OK_200, REGISTER];
    let mut i = 0;
    while out.len() < n {
        out.extend_from_slice(msgs[i % 3]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sipring_core::{Framing, Header, Limits, Status, parse};

    #[test]
    fn fixtures_are_valid_and_exactly_framed() {
        for m in [INVITE, REGISTER, OK_200] {
            let mut h = [Header::EMPTY; 64];
            match parse(m, &mut h, &Limits::default(), Framing::Stream) {
                Ok(Status::Complete(msg)) => {
                    assert_eq!(msg.len(), m.len(), "Content-Length must match the body");
                    msg.validate(&Limits::default()).unwrap();
                }
                other => panic!("{other:?}: {}", String::from_utf8_lossy(m)),
            }
        }
        assert!(
            INVITE.len() > 850 && INVITE.len() < 1000,
            "{}",
            INVITE.len()
        );
    }
}
