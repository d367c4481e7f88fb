// Shared by the fuzz target and the corpus replay test (`include!`d by both).

/// Invariants checked on arbitrary input: nothing panics; the framer and the parser agree on
/// message boundaries; an error response is itself a parseable response; the shard proxy
/// survives the same bytes on a flow and never emits a message it could not parse itself.
pub fn run(data: &[u8]) {
    use sipring_core::proxy::{Flow, Proxy, ProxyConfig};
    use sipring_core::stateful::{Output, ShardProxy};
    use sipring_core::transaction::TimerConfig;
    use sipring_core::{Frame, Framer, Framing, Header, KeepaliveRole, Limits, Status, parse};

    let limits = Limits { max_message: 4096, ..Limits::default() };
    let mut framer = Framer::new(limits, KeepaliveRole::Server);
    // Two proxies see the same bytes: an open one (routing reaches everywhere) and one that
    // authenticates (the credentials parser and the digest checks see every request).
    let strict = sipring_core::policy::Policy::new(
        sipring_core::policy::PolicyConfig::default(),
        sipring_core::auth::NodeKey::new([0; 32]),
        std::time::Instant::now(),
        std::rc::Rc::new(sipring_core::policy::NoSubscribers),
    );
    let now = std::time::Instant::now();
    let mut proxies = [
        ShardProxy::new(Proxy::new(ProxyConfig::default()), sipring_core::policy::Policy::open(now), limits, TimerConfig::default(), 0, now),
        ShardProxy::new(Proxy::new(ProxyConfig::default()), strict, limits, TimerConfig::default(), 0, now),
    ];
    let flow = Flow::Conn(1);
    let mut buf = data;
    for _ in 0..64 {
        match framer.frame(buf) {
            Ok(Status::Complete(Frame::Message(n))) => {
                let mut h = [Header::EMPTY; 64];
                match parse(&buf[..n], &mut h, &limits, Framing::Stream) {
                    Ok(Status::Complete(m)) => {
                        assert_eq!(m.len(), n, "framer and parser disagree");
                        let _ = m.validate(&limits);
                    }
                    Ok(Status::Partial) => panic!("framed message parsed as partial"),
                    Err(e) => {
                        if let Some(r) = sipring_core::response::error_response(&buf[..n], e, b"t") {
                            let mut h2 = [Header::EMPTY; 64];
                            let big = Limits { max_message: usize::MAX, max_header_line: usize::MAX, max_headers: 64, ..limits };
                            assert!(matches!(parse(&r, &mut h2, &big, Framing::Stream), Ok(Status::Complete(_)) | Err(sipring_core::ParseError::TooManyHeaders)), "bad error response");
                        }
                    }
                }
                for proxy in &mut proxies {
                    proxy.handle_message(now, &flow, &buf[..n]);
                    while let Some(o) = proxy.poll_output() {
                        if let Output::Send { bytes, .. } = o {
                            let mut h3 = [Header::EMPTY; 128];
                            let big = Limits { max_message: usize::MAX, max_header_line: usize::MAX, max_headers: 128, ..limits };
                            assert!(!matches!(parse(&bytes, &mut h3, &big, Framing::Stream), Ok(Status::Partial)), "emitted a truncated message");
                        }
                    }
                }
                buf = &buf[n..];
            }
            Ok(Status::Complete(f)) => buf = &buf[f.len()..],
            Ok(Status::Partial) | Err(_) => break,
        }
    }
    for proxy in &mut proxies {
        proxy.handle_flow_closed(now, &flow);
        proxy.handle_timeout(now + std::time::Duration::from_secs(3600));
    }
}
