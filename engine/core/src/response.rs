//! Building the messages a proxy originates: responses to requests (RFC 3261 §8.2.6),
//! stateless error responses to malformed requests, the hop-by-hop ACK for a non-2xx final
//! response (§17.1.1.3) and CANCEL (§9.1).

use crate::error::ParseError;
use crate::header::{Header, HeaderName};
use crate::parse::Message;
use crate::text::trim;

/// Writes `Name: value\r\n`.
fn put(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Options of a response built by [`response_to`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseParts<'a> {
    /// To-tag to add when the request's `To` has none (ignored for 100 Trying).
    pub to_tag: Option<&'a [u8]>,
    /// Extra header lines, in order.
    pub headers: &'a [(&'a str, &'a [u8])],
    /// Body and its content type.
    pub body: Option<(&'a str, &'a [u8])>,
    /// Where the request came from: a top Via asking `rport` gets `rport=<port>` and
    /// `received=<ip>` (RFC 3581 §4), as in the copy we forward.
    pub source: Option<std::net::SocketAddr>,
}

/// Builds a response to `req`: the status line, all `Via` lines, `From`, `To` (tagged),
/// `Call-ID` and `CSeq` copied byte for byte, then `parts.headers`, `Content-Length` and the
/// body. Works on any parsed request, validated or not: headers that are missing are
/// simply not copied.
pub fn response_to(
    req: &Message<'_, '_>,
    code: u16,
    reason: &str,
    parts: ResponseParts<'_>,
) -> Vec<u8> {
    let src = req.bytes();
    let mut out = Vec::with_capacity(256 + req.head_len() / 2);
    out.extend_from_slice(b"SIP/2.0 ");
    out.extend_from_slice(code.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    copy_dialog_headers(
        req.headers(),
        src,
        &mut out,
        if code > 100 { parts.to_tag } else { None },
        &via_completion(req, parts.source),
    );
    if code == 100 {
        // §8.2.6.1: a 100 copies the request's Timestamp (the client measures the delay).
        for h in req.headers() {
            if h.name == HeaderName::Other && h.raw_name.eq_ignore_ascii_case(b"Timestamp") {
                out.extend_from_slice(&src[h.line_start as usize..h.line_end as usize]);
            }
        }
    }
    for (n, v) in parts.headers {
        put(&mut out, n, v);
    }
    match parts.body {
        Some((ctype, body)) => {
            put(&mut out, "Content-Type", ctype.as_bytes());
            put(
                &mut out,
                "Content-Length",
                body.len().to_string().as_bytes(),
            );
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(body);
        }
        None => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
    }
    // What we copied is unfolded, as what we forward is ([`crate::edit::unfold`]): a fold
    // passed back to a partner that relayed it is read as a header of its own there.
    if req.folded() {
        crate::edit::unfold(&mut out);
    }
    out
}

/// What the top Via of `req` needs filled in, as in the copy we forward
/// ([`crate::edit::via_completion`]): `(start, end, replacement)` in the message, in order;
/// empty without a source or a readable top Via.
fn via_completion(
    req: &Message<'_, '_>,
    source: Option<std::net::SocketAddr>,
) -> Vec<(usize, usize, Vec<u8>)> {
    let Some(from) = source else {
        return Vec::new();
    };
    let Some(top) = req.values(HeaderName::Via).into_iter().next() else {
        return Vec::new();
    };
    let Some(via) = crate::values::Via::parse(top.value) else {
        return Vec::new();
    };
    crate::edit::via_completion(top.value, via.host, &from)
        .into_iter()
        .map(|(s, e, t)| (top.start + s, top.start + e, t))
        .collect()
}

fn copy_dialog_headers(
    headers: &[Header<'_>],
    src: &[u8],
    out: &mut Vec<u8>,
    to_tag: Option<&[u8]>,
    via_fill: &[(usize, usize, Vec<u8>)],
) {
    for h in headers {
        let line = &src[h.line_start as usize..h.line_end as usize];
        match h.name {
            HeaderName::Via if !via_fill.is_empty() => {
                let (start, end) = (h.line_start as usize, h.line_end as usize);
                let mut at = start;
                // In order and never overlapping (edit::via_completion); a start before
                // where the last edit ended is skipped rather than sliced backwards.
                for (from, to, text) in via_fill.iter().filter(|(p, ..)| (start..end).contains(p)) {
                    if *from < at {
                        continue;
                    }
                    out.extend_from_slice(&src[at..*from]);
                    out.extend_from_slice(text);
                    at = *to;
                }
                out.extend_from_slice(&src[at..h.line_end as usize]);
            }
            HeaderName::Via | HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                out.extend_from_slice(line)
            }
            HeaderName::To => {
                let has_tag =
                    crate::values::NameAddr::parse(h.value).is_some_and(|n| n.tag().is_some());
                match to_tag {
                    Some(tag) if !has_tag => {
                        let vend = h.value_end() as usize - h.line_start as usize;
                        out.extend_from_slice(&line[..vend]);
                        out.extend_from_slice(b";tag=");
                        out.extend_from_slice(tag);
                        out.extend_from_slice(&line[vend..]);
                    }
                    _ => out.extend_from_slice(line),
                }
            }
            _ => {}
        }
    }
}

/// The stateless response to a request that failed to frame, parse or validate with `err`,
/// salvaging the `Via`/`From`/`To`/`Call-ID`/`CSeq` lines from `buf` even when the start line
/// or a header was malformed. Returns `None` when `buf` is not a request (responses with
/// errors are dropped, RFC 4475 §3.1.2.19) or no `Via` can be found to send it along.
pub fn error_response(buf: &[u8], err: ParseError, to_tag: &[u8]) -> Option<Vec<u8>> {
    let (code, reason) = err.response();
    let first_nl = memchr::memchr(b'\n', buf)?;
    if buf.len() >= 4 && buf[..4].eq_ignore_ascii_case(b"SIP/") {
        return None;
    }
    // An ACK is never answered (RFC 3261 §17.1.1.3, §17.2.3), however malformed.
    if buf.starts_with(b"ACK ") {
        return None;
    }
    // Re-read the header lines leniently: only names and line boundaries matter here.
    let head_end = memchr::memmem::find(buf, b"\r\n\r\n").map_or(buf.len(), |p| p + 2);
    let mut headers = Vec::new();
    let mut pos = first_nl + 1;
    while pos < head_end {
        let mut end = memchr::memchr(b'\n', &buf[pos..head_end]).map_or(head_end, |p| pos + p + 1);
        while end < head_end && matches!(buf[end], b' ' | b'\t') {
            end = memchr::memchr(b'\n', &buf[end..head_end]).map_or(head_end, |p| end + p + 1);
        }
        let line = &buf[pos..end];
        if let Some(colon) = memchr::memchr(b':', line).filter(|_| line_is_clean(line)) {
            let value = trim(&line[colon + 1..]);
            let value_start = pos
                + colon
                + 1
                + (value.as_ptr() as usize - line[colon + 1..].as_ptr() as usize)
                    .min(line.len() - colon - 1);
            headers.push(Header {
                name: HeaderName::from_bytes(trim(&line[..colon])),
                raw_name: trim(&line[..colon]),
                value,
                line_start: pos as u32,
                value_start: value_start as u32,
                line_end: end as u32,
            });
        }
        pos = end;
    }
    if !headers.iter().any(|h| h.name == HeaderName::Via) || !line_ends_ok(&headers, buf) {
        return None;
    }
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(format!("SIP/2.0 {code} {reason}\r\n").as_bytes());
    copy_dialog_headers(&headers, buf, &mut out, Some(to_tag), &[]);
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    crate::edit::unfold(&mut out);
    Some(out)
}

/// A line we may copy into a response: a token name, no control characters except HT and
/// the CRLF of folds and of its end.
fn line_is_clean(line: &[u8]) -> bool {
    let Some(body) = line.strip_suffix(b"\r\n") else {
        return false;
    };
    // Exactly the parser's rule: token characters, optional SP/HT, then the colon.
    let name_end = body
        .iter()
        .position(|&b| !crate::text::is_token(b))
        .unwrap_or(body.len());
    let colon = body[name_end..]
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .map(|p| name_end + p);
    if name_end == 0 || colon.is_none_or(|c| body[c] != b':') {
        return false;
    }
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'\r'
                if body.get(i + 1) == Some(&b'\n')
                    && matches!(body.get(i + 2), Some(b' ' | b'\t')) =>
            {
                i += 3
            }
            b'\t' => i += 1,
            b if b < 0x20 || b == 0x7f => return false,
            _ => i += 1,
        }
    }
    true
}

/// Every copied line must end in CRLF, or the response we build would be malformed.
fn line_ends_ok(headers: &[Header<'_>], buf: &[u8]) -> bool {
    headers
        .iter()
        .all(|h| buf[..h.line_end as usize].ends_with(b"\r\n"))
}
/// The ACK a client INVITE transaction sends for a non-2xx final response (RFC 3261
/// §17.1.1.3): same Request-URI, top Via, Route set, From, Call-ID and CSeq number as the
/// INVITE; `To` from the response (with its tag).
pub fn ack_for_non_2xx(invite: &Message<'_, '_>, response: &Message<'_, '_>) -> Option<Vec<u8>> {
    let uri = invite.request_uri()?;
    let src = invite.bytes();
    let mut out = Vec::with_capacity(invite.head_len());
    out.extend_from_slice(b"ACK ");
    out.extend_from_slice(uri);
    out.extend_from_slice(b" SIP/2.0\r\n");
    put(&mut out, "Via", invite.top_via_raw()?);
    for h in invite.headers() {
        if matches!(
            h.name,
            HeaderName::Route | HeaderName::From | HeaderName::CallId
        ) {
            out.extend_from_slice(&src[h.line_start as usize..h.line_end as usize]);
        }
    }
    let to = response.header(HeaderName::To)?;
    put(&mut out, "To", to.value);
    let cseq = crate::values::CSeq::parse(invite.header(HeaderName::CSeq)?.value)?;
    put(&mut out, "CSeq", format!("{} ACK", cseq.seq).as_bytes());
    out.extend_from_slice(b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
    if invite.folded() || response.folded() {
        crate::edit::unfold(&mut out);
    }
    Some(out)
}

/// `Reason` (RFC 3326) of the CANCELs sent to the other branches of a call answered on one:
/// phones then show "answered elsewhere", not a missed call.
pub const COMPLETED_ELSEWHERE: &[u8] = b"SIP;cause=200;text=\"Call completed elsewhere\"";

/// A CANCEL for a forwarded INVITE (RFC 3261 §9.1): same Request-URI, top Via, Route set,
/// To, From, Call-ID and CSeq number; with `reason` as its `Reason` (RFC 3326) if given.
pub fn cancel_for(invite: &Message<'_, '_>, reason: Option<&[u8]>) -> Option<Vec<u8>> {
    let uri = invite.request_uri()?;
    let src = invite.bytes();
    let mut out = Vec::with_capacity(invite.head_len());
    out.extend_from_slice(b"CANCEL ");
    out.extend_from_slice(uri);
    out.extend_from_slice(b" SIP/2.0\r\n");
    put(&mut out, "Via", invite.top_via_raw()?);
    for h in invite.headers() {
        if matches!(
            h.name,
            HeaderName::Route | HeaderName::From | HeaderName::To | HeaderName::CallId
        ) {
            out.extend_from_slice(&src[h.line_start as usize..h.line_end as usize]);
        }
    }
    let cseq = crate::values::CSeq::parse(invite.header(HeaderName::CSeq)?.value)?;
    put(&mut out, "CSeq", format!("{} CANCEL", cseq.seq).as_bytes());
    if let Some(r) = reason {
        put(&mut out, "Reason", r);
    }
    out.extend_from_slice(b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
    if invite.folded() {
        crate::edit::unfold(&mut out);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{Framing, Limits, Status, parse};

    fn parsed<T>(buf: &[u8], f: impl FnOnce(&Message<'_, '_>) -> T) -> T {
        let mut h = [Header::EMPTY; 32];
        match parse(buf, &mut h, &Limits::default(), Framing::Stream) {
            Ok(Status::Complete(m)) => f(&m),
            other => panic!("{other:?}"),
        }
    }

    const INV: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/TLS a.example.com;branch=z9hG4bK1\r\n\
Via: SIP/2.0/TLS b.example.com;branch=z9hG4bK2\r\n\
Route: <sip:p.example.com;lr>\r\n\
To: Bob <sip:bob@example.com>\r\n\
From: <sip:alice@example.com>;tag=a1\r\n\
Call-ID: c1\r\n\
CSeq: 7 INVITE\r\n\
Contact: <sip:alice@10.0.0.1>\r\n\
Content-Length: 0\r\n\r\n";

    #[test]
    fn response_copies_and_tags() {
        let r = parsed(INV, |m| {
            response_to(
                m,
                486,
                "Busy Here",
                ResponseParts {
                    to_tag: Some(b"xyz"),
                    ..Default::default()
                },
            )
        });
        let s = String::from_utf8(r.clone()).unwrap();
        assert!(s.starts_with("SIP/2.0 486 Busy Here\r\nVia: SIP/2.0/TLS a.example.com;branch=z9hG4bK1\r\nVia: SIP/2.0/TLS b."));
        assert!(s.contains("To: Bob <sip:bob@example.com>;tag=xyz\r\n"));
        assert!(!s.contains("Contact"));
        parsed(&r, |m| {
            let e = m.validate(&Limits::default()).unwrap();
            assert_eq!(m.status(), Some(486));
            assert_eq!(e.to.tag(), Some(&b"xyz"[..]));
        });
        let trying = parsed(INV, |m| {
            response_to(
                m,
                100,
                "Trying",
                ResponseParts {
                    to_tag: Some(b"x"),
                    ..Default::default()
                },
            )
        });
        assert!(!String::from_utf8_lossy(&trying).contains("tag=x"));
        // A folded From (a partner relays what its UA wrote) goes back unfolded, as what we
        // forward does: to the partner's stream reader ` l: 0` would be a Content-Length.
        let folded = String::from_utf8_lossy(INV)
            .replacen("\r\nCall-ID:", ";x=y\r\n l: 0\r\nCall-ID:", 1)
            .into_bytes();
        let r = parsed(&folded, |m| {
            assert!(m.folded());
            response_to(
                m,
                407,
                "Proxy Authentication Required",
                ResponseParts::default(),
            )
        });
        let s = String::from_utf8(r).unwrap();
        assert!(!s.contains("\r\n ") && s.contains(";x=y   l: 0\r\n"), "{s}");
        let e = error_response(&folded, ParseError::InvalidRequestUri, b"t").unwrap();
        assert!(!String::from_utf8_lossy(&e).contains("\r\n "));
    }

    #[test]
    fn ack_and_cancel() {
        let resp = parsed(INV, |m| {
            response_to(
                m,
                486,
                "Busy",
                ResponseParts {
                    to_tag: Some(b"t9"),
                    ..Default::default()
                },
            )
        });
        let ack = parsed(INV, |inv| {
            parsed(&resp, |r| ack_for_non_2xx(inv, r).unwrap())
        });
        parsed(&ack, |a| {
            let e = a.validate(&Limits::default()).unwrap();
            assert_eq!(a.method(), Some(crate::parse::Method::Ack));
            assert_eq!(e.via_count, 1);
            assert_eq!(e.top_via.branch(), Some(&b"z9hG4bK1"[..]));
            assert_eq!(e.to.tag(), Some(&b"t9"[..]));
            assert_eq!(e.cseq.seq, 7);
            assert!(a.header(HeaderName::Route).is_some());
        });
        let cancel = parsed(INV, |inv| cancel_for(inv, None).unwrap());
        parsed(&cancel, |c| {
            let e = c.validate(&Limits::default()).unwrap();
            assert_eq!(e.cseq.method, b"CANCEL");
            assert_eq!(e.to.tag(), None);
        });
    }

    #[test]
    fn salvaged_error_responses() {
        let bad = b"INVITE  sip:user@example.com  SIP/2.0\r\nVia: SIP/2.0/TLS h;branch=z9hG4bKq\r\nTo: <sip:u@e>\r\nFrom: <sip:c@e>;tag=1\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let r = error_response(bad, ParseError::InvalidStartLine, b"err").unwrap();
        let s = String::from_utf8(r).unwrap();
        assert!(
            s.starts_with("SIP/2.0 400 Bad Request Line\r\nVia: SIP/2.0/TLS h;branch=z9hG4bKq\r\n")
        );
        assert!(s.contains("To: <sip:u@e>;tag=err\r\n"));
        assert_eq!(
            error_response(
                b"SIP/2.0 700 Huge\r\nVia: x\r\n\r\n",
                ParseError::InvalidStatusCode,
                b"t"
            ),
            None
        );
        assert_eq!(
            error_response(b"JUNK\r\nX: y\r\n\r\n", ParseError::InvalidStartLine, b"t"),
            None
        );
        // A malformed ACK (its CSeq names INVITE) is dropped, not answered.
        let ack = String::from_utf8_lossy(bad).replace(
            "INVITE  sip:user@example.com  ",
            "ACK sip:user@example.com ",
        );
        assert_eq!(
            error_response(ack.as_bytes(), ParseError::CSeqMethodMismatch, b"t"),
            None
        );
    }
}
