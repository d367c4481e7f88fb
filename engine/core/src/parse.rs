//! Stream framing and zero-copy message parsing.
//!
//! Two entry points:
//! - [`Framer`] finds message boundaries in a byte stream (TLS/TCP) by `Content-Length` and
//!   reports RFC 5626 keepalives, resuming its scan where it stopped so a slow sender costs
//!   linear, not quadratic, work.
//! - [`parse`] splits one message into its start line and borrowed headers stored in caller
//!   storage; [`Message::validate`] then checks the headers a proxy relies on and returns them
//!   typed ([`Essentials`]).
//!
//! Incomplete input is [`Status::Partial`], never an error.

use crate::error::ParseError;
use crate::header::{Header, HeaderName};
use crate::text::{self, is_token, trim};
use crate::uri::Uri;
use crate::values::{CSeq, NameAddr, Via};

/// The outcome of a parse or frame attempt on possibly incomplete input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Status<T> {
    /// Done; the payload says what was found.
    Complete(T),
    /// More bytes are needed.
    Partial,
}

/// Size limits enforced while framing and parsing. Each breach is its own [`ParseError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message, head and body together, in bytes. Default 65536.
    pub max_message: usize,
    /// Most header lines. Also bounded by the length of the header storage. Default 64.
    pub max_headers: usize,
    /// Longest header line, folds included, in bytes. Default 8192.
    pub max_header_line: usize,
    /// Most `Via` values. Default 70: a request cannot legitimately cross more hops than
    /// the RFC 3261 default `Max-Forwards`.
    pub max_vias: usize,
    /// Longest Request-URI, in bytes. Default 2048.
    pub max_uri: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: 64 * 1024,
            max_headers: 64,
            max_header_line: 8 * 1024,
            max_vias: 70,
            max_uri: 2048,
        }
    }
}

/// How the end of a message is determined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A byte stream: `Content-Length` is mandatory (RFC 3261 §18.3) and says where the
    /// message ends.
    Stream,
    /// A whole datagram (or a buffer known to hold exactly one message): a missing
    /// `Content-Length` means the body runs to the end; extra bytes after it are discarded.
    Datagram,
}

/// A SIP method. Methods are case-sensitive (RFC 3261 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method<'b> {
    /// INVITE
    Invite,
    /// ACK
    Ack,
    /// BYE
    Bye,
    /// CANCEL
    Cancel,
    /// REGISTER
    Register,
    /// OPTIONS
    Options,
    /// MESSAGE (RFC 3428)
    Message,
    /// INFO (RFC 6086)
    Info,
    /// UPDATE (RFC 3311)
    Update,
    /// PRACK (RFC 3262)
    Prack,
    /// SUBSCRIBE (RFC 6665)
    Subscribe,
    /// NOTIFY (RFC 6665)
    Notify,
    /// REFER (RFC 3515)
    Refer,
    /// PUBLISH (RFC 3903)
    Publish,
    /// An extension method.
    Other(&'b [u8]),
}

impl<'b> Method<'b> {
    /// Recognises a method token.
    pub fn from_bytes(m: &'b [u8]) -> Method<'b> {
        match m {
            b"INVITE" => Method::Invite,
            b"ACK" => Method::Ack,
            b"BYE" => Method::Bye,
            b"CANCEL" => Method::Cancel,
            b"REGISTER" => Method::Register,
            b"OPTIONS" => Method::Options,
            b"MESSAGE" => Method::Message,
            b"INFO" => Method::Info,
            b"UPDATE" => Method::Update,
            b"PRACK" => Method::Prack,
            b"SUBSCRIBE" => Method::Subscribe,
            b"NOTIFY" => Method::Notify,
            b"REFER" => Method::Refer,
            b"PUBLISH" => Method::Publish,
            other => Method::Other(other),
        }
    }

    /// The method token.
    pub fn as_bytes(&self) -> &'b [u8] {
        match *self {
            Method::Invite => b"INVITE",
            Method::Ack => b"ACK",
            Method::Bye => b"BYE",
            Method::Cancel => b"CANCEL",
            Method::Register => b"REGISTER",
            Method::Options => b"OPTIONS",
            Method::Message => b"MESSAGE",
            Method::Info => b"INFO",
            Method::Update => b"UPDATE",
            Method::Prack => b"PRACK",
            Method::Subscribe => b"SUBSCRIBE",
            Method::Notify => b"NOTIFY",
            Method::Refer => b"REFER",
            Method::Publish => b"PUBLISH",
            Method::Other(m) => m,
        }
    }

    /// A stable label for metrics (`"other"` for extension methods).
    pub fn label(&self) -> &'static str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Register => "REGISTER",
            Method::Options => "OPTIONS",
            Method::Message => "MESSAGE",
            Method::Info => "INFO",
            Method::Update => "UPDATE",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Publish => "PUBLISH",
            Method::Other(_) => "other",
        }
    }
}

/// The first line of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLine<'b> {
    /// `Method SP Request-URI SP SIP-Version`
    Request {
        /// The method.
        method: Method<'b>,
        /// The Request-URI text.
        uri: &'b [u8],
    },
    /// `SIP-Version SP Status-Code SP Reason-Phrase`
    Response {
        /// 100..=699.
        code: u16,
        /// The reason phrase (may be empty, may be UTF-8).
        reason: &'b [u8],
    },
}

/// A parsed message: the start line and headers borrow from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'b, 'h> {
    bytes: &'b [u8],
    start: StartLine<'b>,
    version_2_0: bool,
    uri_start: u32,
    headers: &'h [Header<'b>],
    head_len: usize,
    content_length: Option<usize>,
    /// Whether a header line was folded (continued on a line that starts with SP/HT).
    folded: bool,
}

/// The headers every request and response must carry, typed (see [`Message::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Essentials<'b> {
    /// `Call-ID` value.
    pub call_id: &'b [u8],
    /// `CSeq`.
    pub cseq: CSeq<'b>,
    /// `From`.
    pub from: NameAddr<'b>,
    /// `To`.
    pub to: NameAddr<'b>,
    /// The topmost `Via` value.
    pub top_via: Via<'b>,
    /// Number of `Via` values.
    pub via_count: usize,
    /// `Max-Forwards`, if present (0..=255).
    pub max_forwards: Option<u8>,
}

fn find_line_end(buf: &[u8], from: usize) -> Option<usize> {
    memchr::memchr(b'\n', &buf[from..]).map(|p| from + p)
}

/// Does one physical line (its CRLF excluded) hold a CR? A CR ends a line only with its LF
/// — no SIP production allows one alone, not even a quoted-pair (RFC 3261 §25.1; a NUL
/// may be one, RFC 4475 §3.1.1.2): a bare one is a line break to some parsers and none to
/// others — a header we never saw (a `P-Asserted-Identity` past the policy) for the next
/// hop, a forged line in a log.
#[inline]
fn stray_cr(line: &[u8]) -> bool {
    memchr::memchr(b'\r', line).is_some()
}

/// Parses one message from the start of `buf`.
///
/// Headers are stored in `headers`; its length (capped by `limits.max_headers`) is the header
/// limit. With [`Framing::Stream`] the message ends where `Content-Length` says and
/// [`Message::len`] is the number of bytes consumed; with [`Framing::Datagram`] the whole
/// buffer is the message.
/// A datagram that ends inside its header section is [`ParseError::Truncated`], not `Partial`.
pub fn parse<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [Header<'b>],
    limits: &Limits,
    framing: Framing,
) -> Result<Status<Message<'b, 'h>>, ParseError> {
    match parse_inner(buf, headers, limits, framing) {
        Ok(Status::Partial) if framing == Framing::Datagram => Err(ParseError::Truncated),
        other => other,
    }
}

fn parse_inner<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [Header<'b>],
    limits: &Limits,
    framing: Framing,
) -> Result<Status<Message<'b, 'h>>, ParseError> {
    // Start line.
    let Some(nl) = find_line_end(buf, 0) else {
        return if buf.len() > limits.max_header_line {
            Err(ParseError::HeaderLineTooLong)
        } else {
            Ok(Status::Partial)
        };
    };
    if nl == 0 || buf[nl - 1] != b'\r' || stray_cr(&buf[..nl - 1]) {
        return Err(ParseError::InvalidLineEnding);
    }
    if nl > limits.max_header_line {
        return Err(ParseError::HeaderLineTooLong);
    }
    let line = &buf[..nl - 1];
    let (start, version, uri_start) = parse_start_line(line, limits)?;
    let version_2_0 = version == b"SIP/2.0" || version.eq_ignore_ascii_case(b"SIP/2.0");

    // Headers.
    let max_headers = headers.len().min(limits.max_headers);
    let mut count = 0;
    let mut pos = nl + 1;
    let mut content_length: Option<usize> = None;
    let mut folded = false;
    let head_len = loop {
        if pos >= buf.len() {
            return partial_or(buf, limits);
        }
        if buf[pos] == b'\r' {
            match buf.get(pos + 1) {
                Some(b'\n') => break pos + 2,
                Some(_) => return Err(ParseError::InvalidLineEnding),
                None => return partial_or(buf, limits),
            }
        }
        if buf[pos] == b'\n' {
            return Err(ParseError::InvalidLineEnding);
        }
        // Find the end of this (possibly folded) line.
        let mut end = pos;
        let line_end = loop {
            let Some(lf) = find_line_end(buf, end) else {
                if buf.len() - pos > limits.max_header_line {
                    return Err(ParseError::HeaderLineTooLong);
                }
                return partial_or(buf, limits);
            };
            if buf[lf - 1] != b'\r' || stray_cr(&buf[end..lf - 1]) {
                return Err(ParseError::InvalidLineEnding);
            }
            match buf.get(lf + 1) {
                Some(b' ' | b'\t') => {
                    end = lf + 1;
                    folded = true;
                }
                Some(_) => break lf + 1,
                None => return partial_or(buf, limits),
            }
        };
        if line_end - pos > limits.max_header_line {
            return Err(ParseError::HeaderLineTooLong);
        }
        if line_end > limits.max_message {
            return Err(ParseError::HeadTooLarge);
        }
        let line = &buf[pos..line_end - 2];
        // The name: token characters, optional SP/HT, then the colon (one pass).
        let name_end = line
            .iter()
            .position(|&b| !is_token(b))
            .unwrap_or(line.len());
        let mut colon = name_end;
        while colon < line.len() && matches!(line[colon], b' ' | b'\t') {
            colon += 1;
        }
        if name_end == 0 || line.get(colon) != Some(&b':') {
            // A first header line that starts with white space continues the start line
            // (other readers take ` l: 40` there as a Content-Length of their own):
            // framing is in doubt, and the connection closes.
            if matches!(line.first(), Some(b' ' | b'\t')) {
                return Err(ParseError::InvalidLineEnding);
            }
            return Err(ParseError::InvalidHeaderName);
        }
        let name = &line[..name_end];
        let raw_value = &line[colon + 1..];
        let value = trim(raw_value);
        let value_start = if value.is_empty() {
            pos + colon + 1
        } else {
            value.as_ptr() as usize - buf.as_ptr() as usize
        };
        let hname = HeaderName::from_bytes(name);
        // `Content_Length` is Content-Length to Kamailio's and OpenSIPS's stream readers
        // (their state machine takes `_` for `-`), a header we would not know: the two would
        // frame the message differently, and what we forward could carry a second request
        // in its body. Refused, and the connection closes: what follows on the stream is
        // framed by the one we know, so the bytes after it are not to be trusted as a
        // message of their own.
        if hname == HeaderName::Other
            && name.len() == 14
            && name.eq_ignore_ascii_case(b"Content_Length")
        {
            return Err(ParseError::InvalidContentLength);
        }
        if hname == HeaderName::ContentLength {
            let n = text::parse_u64(value).ok_or(ParseError::InvalidContentLength)?;
            if content_length.is_some() {
                return Err(ParseError::InvalidContentLength);
            }
            content_length =
                Some(usize::try_from(n).map_err(|_| ParseError::InvalidContentLength)?);
        }
        if count == max_headers {
            return Err(ParseError::TooManyHeaders);
        }
        headers[count] = Header {
            name: hname,
            raw_name: name,
            value,
            line_start: pos as u32,
            value_start: value_start as u32,
            line_end: line_end as u32,
        };
        count += 1;
        pos = line_end;
    };
    if head_len > limits.max_message {
        return Err(ParseError::HeadTooLarge);
    }

    // Body.
    let len = match (framing, content_length) {
        (Framing::Stream, None) => return Err(ParseError::MissingContentLength),
        (_, Some(cl)) => {
            let total = head_len
                .checked_add(cl)
                .filter(|&t| t <= limits.max_message)
                .ok_or(ParseError::BodyTooLarge)?;
            if buf.len() < total {
                return match framing {
                    Framing::Stream => Ok(Status::Partial),
                    // RFC 4475 §3.1.2.2: a datagram shorter than its Content-Length is bad.
                    Framing::Datagram => Err(ParseError::InvalidContentLength),
                };
            }
            total
        }
        (Framing::Datagram, None) => {
            if buf.len() > limits.max_message {
                return Err(ParseError::BodyTooLarge);
            }
            buf.len()
        }
    };
    Ok(Status::Complete(Message {
        bytes: &buf[..len],
        start,
        version_2_0,
        uri_start,
        headers: &headers[..count],
        head_len,
        content_length,
        folded,
    }))
}

fn partial_or<T>(buf: &[u8], limits: &Limits) -> Result<Status<T>, ParseError> {
    if buf.len() >= limits.max_message {
        Err(ParseError::HeadTooLarge)
    } else {
        Ok(Status::Partial)
    }
}

fn parse_version(v: &[u8]) -> Result<(), ParseError> {
    // SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT
    let ok = v.len() >= 7
        && v[..4].eq_ignore_ascii_case(b"SIP/")
        && match memchr::memchr(b'.', &v[4..]) {
            Some(dot) => {
                let (maj, min) = (&v[4..4 + dot], &v[5 + dot..]);
                !maj.is_empty()
                    && !min.is_empty()
                    && maj.iter().all(u8::is_ascii_digit)
                    && min.iter().all(u8::is_ascii_digit)
            }
            None => false,
        };
    if ok {
        Ok(())
    } else {
        Err(ParseError::InvalidStartLine)
    }
}

fn parse_start_line<'b>(
    line: &'b [u8],
    limits: &Limits,
) -> Result<(StartLine<'b>, &'b [u8], u32), ParseError> {
    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"SIP/") {
        // Status-Line.
        let sp = memchr::memchr(b' ', line).ok_or(ParseError::InvalidStartLine)?;
        let version = &line[..sp];
        parse_version(version)?;
        let rest = &line[sp + 1..];
        if rest.len() < 3 || !rest[..3].iter().all(u8::is_ascii_digit) {
            return Err(ParseError::InvalidStatusCode);
        }
        let code = u16::from(rest[0] - b'0') * 100
            + u16::from(rest[1] - b'0') * 10
            + u16::from(rest[2] - b'0');
        if !(100..=699).contains(&code) {
            return Err(ParseError::InvalidStatusCode);
        }
        let reason = match &rest[3..] {
            [] => &rest[3..],
            [b' ', reason @ ..] => reason,
            _ => return Err(ParseError::InvalidStatusCode),
        };
        return Ok((StartLine::Response { code, reason }, version, 0));
    }
    // Request-Line: exactly one SP between the three elements (RFC 4475 §3.1.2.9/10).
    let sp1 = memchr::memchr(b' ', line).ok_or(ParseError::InvalidStartLine)?;
    let sp2 = memchr::memrchr(b' ', line).ok_or(ParseError::InvalidStartLine)?;
    if sp1 == sp2 {
        return Err(ParseError::InvalidStartLine);
    }
    let method = &line[..sp1];
    let uri = &line[sp1 + 1..sp2];
    let version = &line[sp2 + 1..];
    if method.is_empty() || !method.iter().all(|&b| is_token(b)) {
        return Err(ParseError::InvalidStartLine);
    }
    if uri.is_empty() || uri[0] == b'<' || uri.iter().any(|&b| b == b' ' || b == b'\t' || b < 0x21)
    {
        return Err(ParseError::InvalidStartLine);
    }
    if uri.len() > limits.max_uri {
        return Err(ParseError::UriTooLong);
    }
    parse_version(version)?;
    Ok((
        StartLine::Request {
            method: Method::from_bytes(method),
            uri,
        },
        version,
        (sp1 + 1) as u32,
    ))
}

impl<'b, 'h> Message<'b, 'h> {
    /// The message's bytes, exactly as received (head and body).
    pub fn bytes(&self) -> &'b [u8] {
        self.bytes
    }

    /// Bytes consumed from the input buffer.
    #[allow(clippy::len_without_is_empty)] // a message is never empty
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The start line.
    pub fn start_line(&self) -> &StartLine<'b> {
        &self.start
    }

    /// Is it a request?
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    /// The request method; for a response, `None`.
    pub fn method(&self) -> Option<Method<'b>> {
        match self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    /// The Request-URI text; for a response, `None`.
    pub fn request_uri(&self) -> Option<&'b [u8]> {
        match self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    /// Byte range of the Request-URI within [`Message::bytes`] (requests only).
    pub fn request_uri_span(&self) -> Option<(usize, usize)> {
        self.request_uri()
            .map(|u| (self.uri_start as usize, self.uri_start as usize + u.len()))
    }

    /// The status code; for a request, `None`.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    /// All headers in order.
    pub fn headers(&self) -> &'h [Header<'b>] {
        self.headers
    }

    /// The first header with this name.
    pub fn header(&self, name: HeaderName) -> Option<&'h Header<'b>> {
        self.headers.iter().find(|h| h.name == name)
    }

    /// The first header whose raw name matches `name` case-insensitively (for
    /// [`HeaderName::Other`] headers).
    pub fn header_raw(&self, name: &str) -> Option<&'h Header<'b>> {
        self.headers
            .iter()
            .find(|h| h.raw_name.eq_ignore_ascii_case(name.as_bytes()))
    }

    /// Every header with this name, in order.
    pub fn headers_named(&self, name: HeaderName) -> impl Iterator<Item = &'h Header<'b>> {
        self.headers.iter().filter(move |h| h.name == name)
    }

    /// Every comma-separated value of every header with this name, trimmed, with its byte
    /// range in the message (`start..end`). Unbalanced quotes end the iteration early; use
    /// [`Message::validate`] to reject them.
    pub fn values(&self, name: HeaderName) -> Vec<HeaderValue<'b>> {
        let mut out = Vec::new();
        for (index, h) in self
            .headers
            .iter()
            .enumerate()
            .filter(|(_, h)| h.name == name)
        {
            let v = h.value;
            let _ = text::split_commas(v, |a, b| {
                let part = trim(&v[a..b]);
                let start = part.as_ptr() as usize - self.bytes.as_ptr() as usize;
                out.push(HeaderValue {
                    header_index: index,
                    value: part,
                    start,
                    end: start + part.len(),
                });
                true
            });
        }
        out
    }

    /// Like [`Message::values`], but `None` when a value has an unbalanced quote or `<`.
    pub fn try_values(&self, name: HeaderName) -> Option<Vec<HeaderValue<'b>>> {
        let ok = self
            .headers
            .iter()
            .filter(|h| h.name == name)
            .all(|h| text::split_commas(h.value, |_, _| true).is_some());
        ok.then(|| self.values(name))
    }

    /// Length of the head (start line, headers and blank line).
    pub fn head_len(&self) -> usize {
        self.head_len
    }

    /// The body.
    pub fn body(&self) -> &'b [u8] {
        &self.bytes[self.head_len..]
    }

    /// The `Content-Length` value, if the header is present.
    pub fn content_length(&self) -> Option<usize> {
        self.content_length
    }

    /// Whether a header line was folded (RFC 3261 §7.3.1: continued on a line that starts
    /// with SP or HT). What the proxy forwards is unfolded ([`crate::edit::Editor`]).
    pub fn folded(&self) -> bool {
        self.folded
    }

    /// The topmost Via value (unparsed), as found in the first Via header.
    pub fn top_via_raw(&self) -> Option<&'b [u8]> {
        let h = self.header(HeaderName::Via)?;
        let mut first = None;
        let v = h.value;
        text::split_commas(v, |a, b| {
            first = Some(trim(&v[a..b]));
            false
        })?;
        first
    }

    /// Checks the message against the grammar of the headers a proxy acts on and returns them
    /// typed: version 2.0; `Via`, `From`, `To`, `Call-ID`, `CSeq` present, the single-valued
    /// ones exactly once and well-formed; the top `Via` value well-formed (the others are
    /// counted against `max_vias`); `CSeq` method equal to the request method;
    /// `Max-Forwards` 0..=255; a Request-URI with a valid scheme and no `?headers` part.
    /// `Contact` is left to its users (the registrar rejects a malformed one with 400).
    pub fn validate(&self, limits: &Limits) -> Result<Essentials<'b>, ParseError> {
        if !self.version_2_0 {
            return Err(ParseError::UnsupportedVersion);
        }
        let mut call_id = None;
        let mut cseq = None;
        let mut from = None;
        let mut to = None;
        let mut max_forwards = None;
        let mut top_via = None;
        let mut via_count = 0usize;
        fn once<'b>(
            slot: &mut Option<&'b [u8]>,
            v: &'b [u8],
            name: HeaderName,
        ) -> Result<(), ParseError> {
            if slot.replace(v).is_some() {
                return Err(ParseError::DuplicateHeader(name));
            }
            Ok(())
        }
        for h in self.headers {
            match h.name {
                HeaderName::CallId => once(&mut call_id, h.value, h.name)?,
                HeaderName::CSeq => once(&mut cseq, h.value, h.name)?,
                HeaderName::From => once(&mut from, h.value, h.name)?,
                HeaderName::To => once(&mut to, h.value, h.name)?,
                HeaderName::MaxForwards => once(&mut max_forwards, h.value, h.name)?,
                HeaderName::Via => {
                    // The top Via is parsed fully (a proxy acts on it); the others are
                    // only counted, as RFC 3261 §16 needs nothing else from them.
                    let v = h.value;
                    // No Via production holds `<` or `>` (RFC 3261 §25.1), and our comma
                    // splitter reads one as a bracket: `a;x=<, SIP/2.0/TLS evil;…;y=>` was one
                    // Via to us (branch `evil`'s) and two to Kamailio.
                    if memchr::memchr2(b'<', b'>', v).is_some() {
                        return Err(ParseError::InvalidHeader(HeaderName::Via));
                    }
                    if top_via.is_none() {
                        let mut first = None;
                        text::split_commas(v, |a, b| {
                            first = Some(&v[a..b]);
                            false
                        })
                        .ok_or(ParseError::InvalidHeader(HeaderName::Via))?;
                        top_via = Some(
                            first
                                .and_then(Via::parse)
                                .ok_or(ParseError::InvalidHeader(HeaderName::Via))?,
                        );
                    }
                    via_count += if memchr::memchr(b'"', v).is_some() {
                        let mut n = 0;
                        text::split_commas(v, |_, _| {
                            n += 1;
                            true
                        })
                        .ok_or(ParseError::InvalidHeader(HeaderName::Via))?;
                        n
                    } else {
                        memchr::memchr_iter(b',', v).count() + 1
                    };
                    if via_count > limits.max_vias {
                        return Err(ParseError::TooManyVias);
                    }
                }
                // A value our comma splitter cannot read (an unbalanced `<` or `"`) was
                // skipped with the rest of its line: a Route to anyone went unseen, and was
                // forwarded to a next hop that reads it (Kamailio takes `x=<` as a token).
                HeaderName::Route | HeaderName::RecordRoute | HeaderName::Path => {
                    text::split_commas(h.value, |_, _| true)
                        .ok_or(ParseError::InvalidHeader(h.name))?;
                }
                _ => {}
            }
        }
        let call_id = call_id.ok_or(ParseError::MissingHeader(HeaderName::CallId))?;
        if call_id.is_empty() {
            return Err(ParseError::InvalidHeader(HeaderName::CallId));
        }
        let cseq = cseq.ok_or(ParseError::MissingHeader(HeaderName::CSeq))?;
        let cseq = CSeq::parse(cseq).ok_or(ParseError::InvalidHeader(HeaderName::CSeq))?;
        let from = from.ok_or(ParseError::MissingHeader(HeaderName::From))?;
        let from = NameAddr::parse(from).ok_or(ParseError::InvalidHeader(HeaderName::From))?;
        let to = to.ok_or(ParseError::MissingHeader(HeaderName::To))?;
        let to = NameAddr::parse(to).ok_or(ParseError::InvalidHeader(HeaderName::To))?;
        let top_via = top_via.ok_or(ParseError::MissingHeader(HeaderName::Via))?;
        let max_forwards = match max_forwards {
            None => None,
            Some(v) => Some(
                text::parse_u32(v)
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or(ParseError::InvalidHeader(HeaderName::MaxForwards))?,
            ),
        };
        if let StartLine::Request { method, uri } = self.start {
            if cseq.method != method.as_bytes() {
                return Err(ParseError::CSeqMethodMismatch);
            }
            // No URI production holds an unescaped `<`, `>` or `"` (RFC 3261 §25.1): one
            // wrapped in `<…>` for a strict-routing next hop (§16.6 step 6) could end the
            // Route value early and start another.
            if memchr::memchr3(b'<', b'>', b'"', uri).is_some() {
                return Err(ParseError::InvalidRequestUri);
            }
            let uri = Uri::parse(uri).map_err(|_| ParseError::InvalidRequestUri)?;
            if uri.headers.is_some() {
                return Err(ParseError::InvalidRequestUri);
            }
        }
        Ok(Essentials {
            call_id,
            cseq,
            from,
            to,
            top_via,
            via_count,
            max_forwards,
        })
    }
}

/// One comma-separated element of a header value, located in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderValue<'b> {
    /// Index of the header line in [`Message::headers`].
    pub header_index: usize,
    /// The element, trimmed.
    pub value: &'b [u8],
    /// Offset of the element's first byte in the message.
    pub start: usize,
    /// Offset one past its last byte.
    pub end: usize,
}

/// Which end of an RFC 5626 keepalive this connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepaliveRole {
    /// We accepted the connection: peers send us `CRLFCRLF` pings, we answer `CRLF`.
    Server,
    /// We opened the connection: we send pings and receive `CRLF` pongs.
    Client,
}

/// What the framer found at the start of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A whole SIP message of this many bytes.
    Message(usize),
    /// An RFC 5626 ping (`CRLFCRLF`, 4 bytes): the driver must answer with a `CRLF` pong.
    Ping,
    /// A lone `CRLF` (2 bytes): a pong to our ping, or stray white space between messages
    /// (RFC 3261 §7.5); nothing to answer.
    Pong,
}

impl Frame {
    /// Bytes this frame occupies at the start of the buffer.
    pub fn len(&self) -> usize {
        match self {
            Frame::Message(n) => *n,
            Frame::Ping => 4,
            Frame::Pong => 2,
        }
    }

    /// Is it a zero-length frame? (Never: provided for API completeness.)
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Finds message boundaries in a byte stream.
///
/// Call [`Framer::frame`] with the unconsumed bytes; on `Complete(frame)` the caller consumes
/// `frame.len()` bytes before calling again. On `Partial`, append more bytes and call again
/// with the same (grown) buffer: the framer resumes its scan instead of starting over.
/// Errors are fatal for the stream (framing is lost): answer if possible, then close.
#[derive(Debug, Clone)]
pub struct Framer {
    limits: Limits,
    role: KeepaliveRole,
    scanned: usize,
    /// Total length of the message whose head was already found, waiting for its body.
    pending: Option<usize>,
}

impl Framer {
    /// A framer with these limits for a connection playing `role` in keepalives.
    pub fn new(limits: Limits, role: KeepaliveRole) -> Framer {
        Framer {
            limits,
            role,
            scanned: 0,
            pending: None,
        }
    }

    /// Looks for one frame at the start of `buf`.
    pub fn frame(&mut self, buf: &[u8]) -> Result<Status<Frame>, ParseError> {
        if let Some(total) = self.pending {
            return if buf.len() < total {
                Ok(Status::Partial)
            } else {
                self.done(Frame::Message(total))
            };
        }
        match buf {
            [] | [b'\r'] => return Ok(Status::Partial),
            [b'\r', b'\n', b'\r', b'\n', ..] => return self.done(Frame::Ping),
            [b'\r', b'\n'] if self.role == KeepaliveRole::Server => return Ok(Status::Partial),
            [b'\r', b'\n', b'\r'] => return Ok(Status::Partial),
            [b'\r', b'\n', ..] => return self.done(Frame::Pong),
            [b'\n', ..] | [b'\r', _, ..] => return Err(ParseError::InvalidLineEnding),
            _ => {}
        }
        // A response copies its request's Vias, Record-Routes and more around the lines its
        // sender adds (RFC 3261 §8.2.6.2, §12.1.1): the answer to a request we forwarded
        // at `max_message` may be larger, and could not be delimited, which closed the
        // callee's connection and lost the answer.
        let max_message = if is_response(buf) {
            self.limits.max_message + RESPONSE_SLACK
        } else {
            self.limits.max_message
        };
        let window = &buf[..buf.len().min(max_message)];
        let from = self.scanned.saturating_sub(3);
        let Some(p) = memchr::memmem::find(&window[from..], b"\r\n\r\n") else {
            self.scanned = window.len();
            return if buf.len() >= max_message {
                Err(ParseError::HeadTooLarge)
            } else {
                Ok(Status::Partial)
            };
        };
        let head_len = from + p + 4;
        self.scanned = head_len;
        let cl = content_length_of(&buf[..head_len])?.ok_or(ParseError::MissingContentLength)?;
        let total = head_len
            .checked_add(cl)
            .filter(|&t| t <= max_message)
            .ok_or(ParseError::BodyTooLarge)?;
        if buf.len() < total {
            self.pending = Some(total);
            return Ok(Status::Partial);
        }
        self.done(Frame::Message(total))
    }

    fn done(&mut self, f: Frame) -> Result<Status<Frame>, ParseError> {
        self.scanned = 0;
        self.pending = None;
        Ok(Status::Complete(f))
    }
}

/// Does this message start as a response (`SIP/2.0 …`)? Looked at before it is parsed.
pub fn is_response(bytes: &[u8]) -> bool {
    bytes
        .get(..4)
        .is_some_and(|b| b.eq_ignore_ascii_case(b"SIP/"))
}

/// How much larger than `max_message` a response may be framed (see [`Framer::frame`]).
pub const RESPONSE_SLACK: usize = 16 * 1024;

/// Finds `Content-Length` (or `l`) in a head that ends with the blank line; `None` if absent.
fn content_length_of(head: &[u8]) -> Result<Option<usize>, ParseError> {
    let mut found = None;
    let mut pos = match memchr::memchr(b'\n', head) {
        Some(p) => p + 1,
        None => return Ok(None),
    };
    while pos + 2 < head.len() {
        let line_end = memchr::memchr(b'\n', &head[pos..]).map_or(head.len(), |p| pos + p + 1);
        let line = &head[pos..line_end];
        let is_cl = match line.first() {
            Some(b'l' | b'L') => {
                line.len() > 1 && {
                    let rest = &line[1..];
                    let i = rest
                        .iter()
                        .position(|&b| b != b' ' && b != b'\t')
                        .unwrap_or(0);
                    rest[i] == b':'
                }
            }
            Some(b'c' | b'C') => {
                line.len() > 14 && line[..14].eq_ignore_ascii_case(b"content-length") && {
                    let rest = &line[14..];
                    let i = rest
                        .iter()
                        .position(|&b| b != b' ' && b != b'\t')
                        .unwrap_or(0);
                    rest[i] == b':'
                }
            }
            _ => false,
        };
        // Extend over folds.
        let mut end = line_end;
        while end < head.len() && matches!(head[end], b' ' | b'\t') {
            end = memchr::memchr(b'\n', &head[end..]).map_or(head.len(), |p| end + p + 1);
        }
        if is_cl {
            let full = &head[pos..end];
            let colon = memchr::memchr(b':', full).unwrap_or(0);
            let n = text::parse_u64(trim(&full[colon + 1..]))
                .and_then(|n| usize::try_from(n).ok())
                .ok_or(ParseError::InvalidContentLength)?;
            if found.replace(n).is_some() {
                return Err(ParseError::InvalidContentLength);
            }
        }
        pos = end;
    }
    Ok(found)
}
