//! Lossless message editing for a proxy.
//!
//! An [`Editor`] records splices against the original bytes of a parsed [`Message`] —
//! insert a header line, replace a value, delete a value or a line — and [`Editor::finish`]
//! writes the original with the splices applied. Bytes no edit touches go out exactly as
//! they came in: header order, compact names, folding and the body are preserved.

use crate::header::HeaderName;
use crate::parse::Message;

#[derive(Debug, Clone)]
struct Splice {
    start: usize,
    end: usize,
    seq: u32,
    with: Vec<u8>,
}

/// Records splices against one message; see the module docs.
#[derive(Debug)]
#[must_use = "an Editor does nothing until finish() or write_into()"]
pub struct Editor<'m, 'b, 'h> {
    msg: &'m Message<'b, 'h>,
    splices: Vec<Splice>,
    seq: u32,
    body_len_delta: bool,
}

/// Why an edit could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EditError {
    /// There is no such header to pop from.
    NoSuchHeader(HeaderName),
    /// The message is a response, and the edit applies to requests only.
    NotARequest,
}

impl std::fmt::Display for EditError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EditError::NoSuchHeader(h) => write!(f, "no {h} header to edit"),
            EditError::NotARequest => f.write_str("edit applies to requests only"),
        }
    }
}

impl std::error::Error for EditError {}

/// Where a Via value's `rport` parameter without a value ends (an offset in `v`), if it has
/// one: `;rport` followed by `;`, `,`, space or the end (RFC 3581 §4: the server fills it).
pub(crate) fn bare_rport_end(v: &[u8]) -> Option<usize> {
    let i = param_starts(v).find(|&i| param_name(v, i).eq_ignore_ascii_case(b"rport"))?;
    let name_end = param_name_range(v, i).1;
    let rest = v[name_end..].iter().find(|b| !crate::text::is_lws(**b));
    (rest != Some(&b'=')).then_some(name_end)
}

/// Where the name of the parameter whose `;` is at `i` lies in `v`.
fn param_name_range(v: &[u8], i: usize) -> (usize, usize) {
    let start = i
        + 1
        + v[i + 1..]
            .iter()
            .take_while(|b| crate::text::is_lws(**b))
            .count();
    let end = start
        + v[start..]
            .iter()
            .take_while(|b| crate::text::is_token(**b))
            .count();
    (start, end)
}

/// The name of the parameter whose `;` is at `i`.
fn param_name(v: &[u8], i: usize) -> &[u8] {
    let (s, e) = param_name_range(v, i);
    &v[s..e]
}

/// The offsets of the `;` that start the parameters of a Via value. Inside another
/// parameter's quoted string a `;` is text: taken for a parameter there, a `;rport` was filled
/// in inside the `;received="…"` being removed around it — overlapping edits, and a slice
/// panic on the answer built from them.
fn param_starts(v: &[u8]) -> impl Iterator<Item = usize> + '_ {
    // Most Vias hold no quote at all: then every `;` is one (memchr finds them).
    let quoted_anywhere = memchr::memchr(b'"', v).is_some();
    let plain = (!quoted_anywhere)
        .then(|| memchr::memchr_iter(b';', v))
        .into_iter()
        .flatten();
    let (mut quoted, mut escaped) = (false, false);
    let careful = quoted_anywhere
        .then(|| {
            v.iter().enumerate().filter_map(move |(i, &b)| {
                match b {
                    _ if escaped => escaped = false,
                    b'\\' if quoted => escaped = true,
                    b'"' => quoted = !quoted,
                    b';' if !quoted => return Some(i),
                    _ => {}
                }
                None
            })
        })
        .into_iter()
        .flatten();
    plain.chain(careful)
}

/// The ranges (offsets in `v`) of the `;received=…` parameters of a Via value, each from
/// its `;` to the next parameter's (a quoted string of another parameter is not looked in).
fn received_params(v: &[u8]) -> Vec<(usize, usize)> {
    // Cheap test first (a look after each `;`): most Vias from clients carry none.
    let named = |i: usize| {
        let rest = &v[i + 1..];
        let rest = &rest[rest.iter().take_while(|b| crate::text::is_lws(**b)).count()..];
        rest.len() >= 8 && rest[..8].eq_ignore_ascii_case(b"received")
    };
    if !memchr::memchr_iter(b';', v).any(named) {
        return Vec::new();
    }
    let starts: Vec<usize> = param_starts(v).collect();
    let mut out = Vec::new();
    for (k, &i) in starts.iter().enumerate() {
        if param_name(v, i).eq_ignore_ascii_case(b"received") {
            // Trailing whitespace before the next `;` stays with this parameter.
            out.push((i, starts.get(k + 1).copied().unwrap_or(v.len())));
        }
    }
    out
}

/// What completes the top Via `v` of a client's request that came from `source` (RFC 3261
/// §18.2.1, RFC 3581 §4), as `(start, end, replacement)` in `v`, in order: an empty `rport`
/// gets the source port; `received=<source address>` is added when the sent-by `host` is not
/// that address (an IPv6 reference in brackets, as a Via writes it) or `rport` was asked
/// for; and any `received` the client wrote itself goes — only the hop that received the
/// request may say where from (a forged one misleads whoever reads it downstream).
pub(crate) fn via_completion(
    v: &[u8],
    host: &[u8],
    source: &std::net::SocketAddr,
) -> Vec<(usize, usize, Vec<u8>)> {
    let mut edits: Vec<(usize, usize, Vec<u8>)> = received_params(v)
        .into_iter()
        .map(|(s, e)| (s, e, Vec::new()))
        .collect();
    let rport_end = bare_rport_end(v);
    if let Some(e) = rport_end {
        let mut t = Vec::with_capacity(6);
        t.push(b'=');
        push_decimal(&mut t, u32::from(source.port()));
        edits.push((e, e, t));
    }
    let literal = host
        .strip_prefix(b"[")
        .and_then(|h| h.strip_suffix(b"]"))
        .unwrap_or(host);
    let sent_by_is_source = std::str::from_utf8(literal)
        .ok()
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
        == Some(source.ip());
    if !sent_by_is_source || rport_end.is_some() {
        let mut t = Vec::with_capacity(26);
        t.extend_from_slice(b";received=");
        push_ip(&mut t, source.ip());
        edits.push((v.len(), v.len(), t));
    }
    edits.sort_by_key(|e| (e.0, e.1));
    // Never two edits over the same bytes (whoever applies them slices between them).
    let mut end = 0;
    edits.retain(|e| {
        let keep = e.0 >= end;
        if keep {
            end = e.1;
        }
        keep
    });
    edits
}

/// Appends `n` in decimal (what `format!` does, without its machinery: this runs for every
/// request from a client).
fn push_decimal(out: &mut Vec<u8>, mut n: u32) {
    let mut buf = [0u8; 10];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends an address as a Via's `received` writes it (IPv4 dotted, IPv6 as `Display` does).
fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(a) => {
            for (k, o) in a.octets().into_iter().enumerate() {
                if k > 0 {
                    out.push(b'.');
                }
                push_decimal(out, u32::from(o));
            }
        }
        std::net::IpAddr::V6(a) => {
            use std::io::Write;
            let _ = write!(out, "{a}");
        }
    }
}

impl<'m, 'b, 'h> Editor<'m, 'b, 'h> {
    /// Starts editing `msg`.
    pub fn new(msg: &'m Message<'b, 'h>) -> Self {
        Editor {
            msg,
            splices: Vec::with_capacity(4),
            seq: 0,
            body_len_delta: false,
        }
    }

    fn splice(&mut self, start: usize, end: usize, with: Vec<u8>) {
        self.seq += 1;
        self.splices.push(Splice {
            start,
            end,
            seq: self.seq,
            with,
        });
    }

    fn line(name: &str, value: &[u8]) -> Vec<u8> {
        let mut l = Vec::with_capacity(name.len() + value.len() + 4);
        l.extend_from_slice(name.as_bytes());
        l.extend_from_slice(b": ");
        l.extend_from_slice(value);
        l.extend_from_slice(b"\r\n");
        l
    }

    /// Where a new header line goes when nothing better applies: the end of the head.
    fn end_of_headers(&self) -> usize {
        self.msg.head_len() - 2
    }

    /// Inserts `Via: value` above the topmost Via (RFC 3261 §16.6 step 8).
    pub fn prepend_via(&mut self, value: &[u8]) -> &mut Self {
        let at = self
            .msg
            .header(HeaderName::Via)
            .map_or_else(|| self.end_of_headers(), |h| h.line_start as usize);
        self.splice(at, at, Self::line("Via", value));
        self
    }

    /// Removes the topmost value of a (possibly comma-separated) header: the whole line if
    /// it held one value, else the first value and its comma.
    pub fn pop_first_value(&mut self, name: HeaderName) -> Result<&mut Self, EditError> {
        let h_index = self
            .msg
            .headers()
            .iter()
            .position(|h| h.name == name)
            .ok_or(EditError::NoSuchHeader(name))?;
        let h = self.msg.headers()[h_index];
        let values: Vec<_> = self
            .msg
            .values(name)
            .into_iter()
            .filter(|v| v.header_index == h_index)
            .take(2)
            .collect();
        match values.as_slice() {
            [first, second] => self.splice(first.start, second.start, Vec::new()),
            _ => self.splice(h.line_start as usize, h.line_end as usize, Vec::new()),
        }
        Ok(self)
    }

    /// Removes `count` values of a (possibly comma-separated, possibly multi-line) header,
    /// starting with the `skip`-th: whole lines where every value goes, else the values and
    /// their commas.
    pub fn remove_values_from(
        &mut self,
        name: HeaderName,
        skip: usize,
        count: usize,
    ) -> Result<&mut Self, EditError> {
        let values = self.msg.values(name);
        if skip + count > values.len() || count == 0 {
            return Err(EditError::NoSuchHeader(name));
        }
        let targets = skip..skip + count;
        let mut i = 0;
        while i < values.len() {
            let line = values[i].header_index;
            let end = i + values[i..]
                .iter()
                .take_while(|v| v.header_index == line)
                .count();
            // This line's values are i..end; the targeted ones a contiguous part of them.
            let lo = targets.start.max(i);
            let hi = targets.end.min(end);
            if lo < hi {
                let h = self.msg.headers()[line];
                if lo == i && hi == end {
                    self.splice(h.line_start as usize, h.line_end as usize, Vec::new());
                } else if hi < end {
                    self.splice(values[lo].start, values[hi].start, Vec::new());
                } else {
                    self.splice(values[lo - 1].end, values[hi - 1].end, Vec::new());
                }
            }
            i = end;
        }
        Ok(self)
    }

    /// The topmost Via value.
    fn top_via(&self) -> Result<crate::parse::HeaderValue<'b>, EditError> {
        self.msg
            .values(HeaderName::Via)
            .into_iter()
            .next()
            .ok_or(EditError::NoSuchHeader(HeaderName::Via))
    }

    /// Completes the top Via of a request from a client, whose sent-by host is `host`, as
    /// [`via_completion`] says.
    pub fn complete_top_via(
        &mut self,
        source: &std::net::SocketAddr,
        host: &[u8],
    ) -> Result<&mut Self, EditError> {
        let top = self.top_via()?;
        for (s, e, text) in via_completion(top.value, host, source) {
            self.splice(top.start + s, top.start + e, text);
        }
        Ok(self)
    }

    /// Writes overload-control feedback (RFC 7339) into the topmost Via of a response whose
    /// client advertised support (`oc` in that Via, copied from its request): the client's
    /// `oc`, `oc-algo`, `oc-validity` and `oc-seq` give way to the server's, every other
    /// parameter stays. `Ok(false)`, untouched, when the topmost Via carries no `oc`.
    pub fn overload_feedback(
        &mut self,
        f: &crate::overload_control::Feedback,
    ) -> Result<bool, EditError> {
        let top = self.top_via()?;
        Ok(self.rewrite_oc(top, Some(f)))
    }

    /// Takes out overload-control feedback (RFC 7339 `oc=…`, `oc-validity`, `oc-seq`) that
    /// someone downstream wrote into the Via value at `index` (0: the topmost) of a response
    /// we forward: only the next hop, in its own Via, may tell our upstream what to drop. A
    /// valueless `oc` (the upstream's own advertisement) stays. `false`, untouched, when
    /// there is none.
    pub fn strip_overload_feedback(&mut self, index: usize) -> bool {
        let Some(v) = self.msg.values(HeaderName::Via).into_iter().nth(index) else {
            return false;
        };
        // Cheap test first: most Vias name no `oc` at all.
        if !v.value.windows(2).any(|w| w.eq_ignore_ascii_case(b"oc")) {
            return false;
        }
        let valued = crate::values::Via::parse(v.value).is_some_and(|via| {
            matches!(via.param("oc"), Some(Some(_)))
                || via.param("oc-validity").is_some()
                || via.param("oc-seq").is_some()
        });
        valued && self.rewrite_oc(v, None)
    }

    /// Rewrites the overload-control parameters of one Via value: `Some`: replaced by that
    /// feedback; `None`: the feedback dropped, a bare `oc` kept. `false` without `oc`.
    fn rewrite_oc(
        &mut self,
        v: crate::parse::HeaderValue<'_>,
        f: Option<&crate::overload_control::Feedback>,
    ) -> bool {
        let Some(via) = crate::values::Via::parse(v.value) else {
            return false;
        };
        if via.param("oc").is_none() {
            return false;
        }
        let at = via.params.as_ptr() as usize - v.value.as_ptr() as usize;
        let mut value = v.value[..at].to_vec();
        let _ = crate::text::for_each_param(via.params, |name, pv| {
            let is = |n: &[u8]| crate::text::eq_ic(name, n);
            if is(b"oc-validity") || is(b"oc-seq") || (f.is_some() && is(b"oc-algo")) {
                return;
            }
            if is(b"oc") {
                if f.is_none() {
                    value.extend_from_slice(b";oc");
                }
                return;
            }
            value.push(b';');
            value.extend_from_slice(name);
            if let Some(pv) = pv {
                value.push(b'=');
                value.extend_from_slice(pv);
            }
        });
        if let Some(f) = f {
            f.write_params(&mut value);
        }
        self.splice(v.start, v.end, value);
        true
    }

    /// Removes the topmost Via value (a proxy forwarding a response, RFC 3261 §16.7 step 3).
    pub fn pop_top_via(&mut self) -> Result<&mut Self, EditError> {
        self.pop_first_value(HeaderName::Via)
    }

    /// Removes the topmost Route value (loose routing, RFC 3261 §16.4).
    pub fn pop_top_route(&mut self) -> Result<&mut Self, EditError> {
        self.pop_first_value(HeaderName::Route)
    }

    /// Sets `Max-Forwards` to `n`, replacing the value in place or adding the header.
    pub fn set_max_forwards(&mut self, n: u8) -> &mut Self {
        let v = n.to_string().into_bytes();
        match self.msg.header(HeaderName::MaxForwards) {
            Some(h) => {
                let (s, e) = (h.value_start as usize, h.value_end() as usize);
                self.splice(s, e, v);
            }
            None => {
                let at = self.end_of_headers();
                self.splice(at, at, Self::line("Max-Forwards", &v));
            }
        }
        self
    }

    /// Inserts `Record-Route: value` above the existing Record-Route values (RFC 3261
    /// §16.6 step 4), or at the end of the head if there are none.
    pub fn insert_record_route(&mut self, value: &[u8]) -> &mut Self {
        let at = self
            .msg
            .header(HeaderName::RecordRoute)
            .map_or_else(|| self.end_of_headers(), |h| h.line_start as usize);
        self.splice(at, at, Self::line("Record-Route", value));
        self
    }

    /// Inserts `Route: value` above the existing Route values.
    pub fn insert_route(&mut self, value: &[u8]) -> &mut Self {
        let at = self
            .msg
            .header(HeaderName::Route)
            .map_or_else(|| self.end_of_headers(), |h| h.line_start as usize);
        self.splice(at, at, Self::line("Route", value));
        self
    }

    /// Appends `Route: value` below the existing Route values (a strict-routing next hop's
    /// Request-URI kept as the last Route, RFC 3261 §16.6 step 6), or at the end of the
    /// head if there are none.
    pub fn append_route(&mut self, value: &[u8]) -> &mut Self {
        let at = self
            .msg
            .headers_named(HeaderName::Route)
            .last()
            .map_or_else(|| self.end_of_headers(), |h| h.line_end as usize);
        self.splice(at, at, Self::line("Route", value));
        self
    }

    /// Replaces the Request-URI.
    pub fn set_request_uri(&mut self, uri: &[u8]) -> Result<&mut Self, EditError> {
        let (s, e) = self.msg.request_uri_span().ok_or(EditError::NotARequest)?;
        self.splice(s, e, uri.to_vec());
        Ok(self)
    }

    /// Appends a header line at the end of the head.
    pub fn add_header(&mut self, name: &str, value: &[u8]) -> &mut Self {
        let at = self.end_of_headers();
        self.splice(at, at, Self::line(name, value));
        self
    }

    /// Sets a header this parser has no name for (`name` compared case-insensitively): its
    /// lines are removed and one with `value` is added.
    pub fn set_other_header(&mut self, name: &str, value: &[u8]) -> &mut Self {
        let lines: Vec<_> = self
            .msg
            .headers_named(HeaderName::Other)
            .filter(|h| h.raw_name.eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| (h.line_start as usize, h.line_end as usize))
            .collect();
        for (s, e) in lines {
            self.splice(s, e, Vec::new());
        }
        self.add_header(name, value)
    }

    /// Removes every line of a header.
    pub fn remove_header(&mut self, name: HeaderName) -> &mut Self {
        let lines: Vec<_> = self
            .msg
            .headers_named(name)
            .map(|h| (h.line_start as usize, h.line_end as usize))
            .collect();
        for (s, e) in lines {
            self.splice(s, e, Vec::new());
        }
        self
    }

    /// Removes the lines of a header whose value satisfies `pred` (credentials for one
    /// realm among several).
    pub fn remove_header_where(
        &mut self,
        name: HeaderName,
        pred: impl Fn(&[u8]) -> bool,
    ) -> &mut Self {
        let lines: Vec<_> = self
            .msg
            .headers_named(name)
            .filter(|h| pred(h.value))
            .map(|h| (h.line_start as usize, h.line_end as usize))
            .collect();
        for (s, e) in lines {
            self.splice(s, e, Vec::new());
        }
        self
    }

    /// Adds `Content-Length` with the body's length if the message has none (a message
    /// that came from a datagram-framed source going out on a stream).
    pub fn ensure_content_length(&mut self) -> &mut Self {
        if self.msg.content_length().is_none() && !self.body_len_delta {
            self.body_len_delta = true;
            let n = self.msg.body().len().to_string();
            self.add_header("Content-Length", n.as_bytes());
        }
        self
    }

    /// Writes the edited message to `out`. A folded header line goes out unfolded: each fold's
    /// CRLF becomes two spaces (the length stays, RFC 3261 §7.3.1 lets a proxy replace a fold
    /// with SP). Passed on as received, a fold is read differently by parsers downstream —
    /// Kamailio's and OpenSIPS's stream readers take a folded ` l: 0` for a Content-Length,
    /// and would find a second, unchecked request in the body we forward.
    pub fn write_into(mut self, out: &mut Vec<u8>) {
        let base = out.len();
        // At one position, insertions go before a removal or replacement that starts there
        // (a Route line removed and a Path's Route inserted at its start), each group in the
        // order it was asked for.
        self.splices
            .sort_by_key(|s| (s.start, s.end > s.start, s.seq));
        let src = self.msg.bytes();
        let growth: usize = self.splices.iter().map(|s| s.with.len()).sum();
        out.reserve(src.len() + growth);
        let mut pos = 0;
        for s in &self.splices {
            debug_assert!(s.start >= pos, "overlapping edits");
            let start = s.start.max(pos);
            out.extend_from_slice(&src[pos..start]);
            out.extend_from_slice(&s.with);
            pos = s.end.max(start);
        }
        out.extend_from_slice(&src[pos..]);
        if self.msg.folded() {
            unfold(&mut out[base..]);
        }
    }

    /// Returns the edited message (unfolded, as [`Editor::write_into`]).
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_into(&mut out);
        out
    }
}

/// Replaces the CRLF of every folded line in a message's head with two spaces; the body
/// (after the blank line) is left alone. For every message sipring sends that carries
/// header text it received: see [`Editor::write_into`].
pub fn unfold(m: &mut [u8]) {
    let mut i = 0;
    while let Some(off) = memchr::memchr(b'\n', &m[i..]) {
        let lf = i + off;
        match m.get(lf + 1) {
            Some(b' ' | b'\t') if lf > 0 && m[lf - 1] == b'\r' => {
                m[lf - 1] = b' ';
                m[lf] = b' ';
            }
            Some(b'\r') | None => break,
            _ => {}
        }
        i = lf + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::Header;
    use crate::parse::{Framing, Limits, Status, parse};

    const REQ: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
v: SIP/2.0/TLS a.example.com;branch=z9hG4bK1, SIP/2.0/TLS b.example.com;branch=z9hG4bK2\r\n\
Route: <sip:proxy.example.com;lr>, <sip:next.example.net;lr>\r\n\
Max-Forwards: 70\r\n\
To: <sip:bob@example.com>\r\n\
f: <sip:alice@example.com>;tag=1\r\n\
i: abc\r\n\
CSeq: 1 INVITE\r\n\
X-Odd:   keep   these   spaces\r\n\
l: 4\r\n\
\r\n\
body";

    fn with<T>(buf: &[u8], f: impl FnOnce(&Message<'_, '_>) -> T) -> T {
        let mut h = [Header::EMPTY; 32];
        let Ok(Status::Complete(m)) = parse(buf, &mut h, &Limits::default(), Framing::Stream)
        else {
            panic!("parse")
        };
        f(&m)
    }

    #[test]
    fn a_clients_via_is_completed_and_what_it_claimed_to_be_received_goes() {
        let src: std::net::SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let done = |v: &str| {
            let via = crate::values::Via::parse(v.as_bytes()).unwrap();
            let mut out = Vec::new();
            let mut at = 0;
            for (s, e, t) in via_completion(v.as_bytes(), via.host, &src) {
                out.extend_from_slice(&v.as_bytes()[at..s]);
                out.extend_from_slice(&t);
                at = e;
            }
            out.extend_from_slice(&v.as_bytes()[at..]);
            String::from_utf8(out).unwrap()
        };
        for (via, want) in [
            // A name, not the source: received added (§18.2.1).
            (
                "SIP/2.0/TLS phone.invalid;branch=z9hG4bK1",
                "SIP/2.0/TLS phone.invalid;branch=z9hG4bK1;received=10.0.0.1",
            ),
            // The source itself: nothing to add.
            (
                "SIP/2.0/TLS 10.0.0.1:5000;branch=z9hG4bK1",
                "SIP/2.0/TLS 10.0.0.1:5000;branch=z9hG4bK1",
            ),
            // rport asked for: filled, and received added (RFC 3581 §4).
            (
                "SIP/2.0/TLS 10.0.0.1;rport;branch=z9hG4bK1",
                "SIP/2.0/TLS 10.0.0.1;rport=5000;branch=z9hG4bK1;received=10.0.0.1",
            ),
            // A received the client wrote (in any case) is not passed on: one, ours.
            (
                "SIP/2.0/TLS phone.invalid;received=6.6.6.6;branch=z9hG4bK1;RECEIVED=7.7.7.7",
                "SIP/2.0/TLS phone.invalid;branch=z9hG4bK1;received=10.0.0.1",
            ),
            (
                "SIP/2.0/TLS 10.0.0.1:5000;branch=z9hG4bK1;received=6.6.6.6",
                "SIP/2.0/TLS 10.0.0.1:5000;branch=z9hG4bK1",
            ),
            // A quoted `;rport` inside a received the client wrote: the received goes, and
            // nothing is filled in inside it (before: overlapping edits, a slice panic).
            (
                "SIP/2.0/TLS h.invalid;branch=z9hG4bKx;received=\";rport\"",
                "SIP/2.0/TLS h.invalid;branch=z9hG4bKx;received=10.0.0.1",
            ),
            (
                "SIP/2.0/TLS h.invalid;x=\";rport\";rport;branch=z9hG4bKx",
                "SIP/2.0/TLS h.invalid;x=\";rport\";rport=5000;branch=z9hG4bKx;received=10.0.0.1",
            ),
            // Inside another parameter's quoted string it is text, not a parameter.
            (
                "SIP/2.0/TLS 10.0.0.1:5000;branch=z9hG4bK1;x=\";received=6.6.6.6\"",
                "SIP/2.0/TLS 10.0.0.1:5000;branch=z9hG4bK1;x=\";received=6.6.6.6\"",
            ),
            // IPv6 sent-by in brackets, as a Via writes it.
            (
                "SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bK1",
                "SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bK1;received=10.0.0.1",
            ),
        ] {
            assert_eq!(done(via), want, "{via}");
        }
    }

    #[test]
    fn proxy_edits_are_lossless() {
        let out = with(REQ, |m| {
            let mut e = Editor::new(m);
            e.prepend_via(b"SIP/2.0/TLS proxy.example.com;branch=z9hG4bKp")
                .set_max_forwards(69)
                .insert_record_route(b"<sip:proxy.example.com;lr>");
            e.pop_top_route().unwrap();
            e.finish()
        });
        let s = String::from_utf8(out.clone()).unwrap();
        assert!(s.starts_with("INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TLS proxy.example.com;branch=z9hG4bKp\r\nv: SIP/2.0/TLS a."));
        assert!(s.contains("Route: <sip:next.example.net;lr>\r\n"));
        assert!(!s.contains("proxy.example.com;lr>, "));
        assert!(s.contains("Max-Forwards: 69\r\n"));
        assert!(s.contains("X-Odd:   keep   these   spaces\r\n"));
        assert!(s.contains("Record-Route: <sip:proxy.example.com;lr>\r\n\r\nbody"));
        with(&out, |m| {
            let e = m.validate(&Limits::default()).unwrap();
            assert_eq!(e.via_count, 3);
            assert_eq!(e.max_forwards, Some(69));
        });
    }

    #[test]
    fn a_route_inserted_where_a_removed_route_line_began_goes_first() {
        // A request to us (`Route: <us>, <next>` removed whole) towards a contact with a
        // Path: the Path's Route is inserted at the removed line's start. This tripped the
        // overlap assertion in debug builds (release wrote the same bytes).
        let out = with(REQ, |m| {
            let mut e = Editor::new(m);
            e.remove_values_from(HeaderName::Route, 0, 2).unwrap();
            e.insert_route(b"<sip:edge.example.net;lr>");
            e.finish()
        });
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("Route: <sip:edge.example.net;lr>\r\nMax-Forwards: 70\r\n"),
            "{s}"
        );
        assert!(!s.contains("proxy.example.com;lr"), "{s}");
    }

    #[test]
    fn pop_via_value_and_line() {
        let once = with(REQ, |m| {
            let mut e = Editor::new(m);
            e.pop_top_via().unwrap();
            e.finish()
        });
        assert!(
            String::from_utf8_lossy(&once)
                .contains("\r\nv: SIP/2.0/TLS b.example.com;branch=z9hG4bK2\r\n")
        );
        let twice = with(&once, |m| {
            let mut e = Editor::new(m);
            e.pop_top_via().unwrap();
            e.finish()
        });
        assert!(!String::from_utf8_lossy(&twice).contains("Via"));
        assert!(!String::from_utf8_lossy(&twice).contains("v: "));
        with(&twice, |m| {
            assert_eq!(
                Editor::new(m).pop_top_via().err(),
                Some(EditError::NoSuchHeader(HeaderName::Via))
            )
        });
    }

    #[test]
    fn request_uri_and_content_length() {
        let dgram = b"MESSAGE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\n\r\nhi";
        let mut h = [Header::EMPTY; 8];
        let Ok(Status::Complete(m)) = parse(dgram, &mut h, &Limits::default(), Framing::Datagram)
        else {
            panic!()
        };
        let mut e = Editor::new(&m);
        e.set_request_uri(b"sip:a@10.0.0.1:5061;transport=tls")
            .unwrap()
            .ensure_content_length()
            .ensure_content_length()
            .set_max_forwards(70);
        let out = e.finish();
        assert_eq!(
            out,
            b"MESSAGE sip:a@10.0.0.1:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nContent-Length: 2\r\nMax-Forwards: 70\r\n\r\nhi"
        );
    }

    #[test]
    fn overload_feedback_replaces_the_clients_oc_in_the_top_via_only() {
        use crate::overload_control::Feedback;
        let resp = b"SIP/2.0 503 Service Unavailable\r\n\
Via: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKa;oc;oc-algo=\"loss,A\";rport=5061;received=10.0.0.1, SIP/2.0/TLS b;branch=z9hG4bKb;oc\r\n\
To: <sip:bob@example.com>;tag=x\r\nFrom: <sip:alice@example.com>;tag=1\r\nCall-ID: c\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n";
        let f = Feedback {
            oc: 40,
            validity_ms: 500,
            seq: 7,
        };
        let out = with(resp, |m| {
            let mut e = Editor::new(m);
            assert!(e.overload_feedback(&f).unwrap());
            e.finish()
        });
        let s = String::from_utf8(out.clone()).unwrap();
        assert!(
            s.contains("Via: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKa;rport=5061;received=10.0.0.1;oc=40;oc-algo=\"loss\";oc-validity=500;oc-seq=0.00007, SIP/2.0/TLS b;branch=z9hG4bKb;oc\r\n"),
            "{s}"
        );
        with(&out, |m| {
            let top = m.values(HeaderName::Via)[0].value;
            assert_eq!(Feedback::parse(top), Some(f));
        });
        // Without `oc` in the top Via (the client did not advertise): untouched.
        let plain = with(REQ, |m| {
            let mut e = Editor::new(m);
            assert!(!e.overload_feedback(&f).unwrap());
            e.finish()
        });
        assert_eq!(plain, REQ);
    }

    #[test]
    fn overload_feedback_written_downstream_into_an_upstream_via_is_taken_out() {
        let resp = b"SIP/2.0 200 OK\r\n\
Via: SIP/2.0/TLS proxy.example.com;branch=z9hG4bKp\r\n\
Via: SIP/2.0/TLS node-a.example.com;branch=z9hG4bKa;oc=100;oc-algo=\"loss\";oc-validity=4294967295;oc-seq=999.9, SIP/2.0/TLS ua;branch=z9hG4bKu\r\n\
To: <sip:bob@example.com>;tag=x\r\nFrom: <sip:alice@example.com>;tag=1\r\nCall-ID: c\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n";
        let out = with(resp, |m| {
            let mut e = Editor::new(m);
            e.pop_top_via().unwrap();
            assert!(e.strip_overload_feedback(1));
            e.finish()
        });
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("SIP/2.0 200 OK\r\nVia: SIP/2.0/TLS node-a.example.com;branch=z9hG4bKa;oc;oc-algo=\"loss\", SIP/2.0/TLS ua;branch=z9hG4bKu\r\n"),
            "{s}"
        );
        // Nothing to take out: untouched.
        assert!(!with(REQ, |m| Editor::new(m).strip_overload_feedback(1)));
        let advertised = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TLS p;branch=z9hG4bKp\r\nVia: SIP/2.0/TLS a;branch=z9hG4bKa;oc\r\nTo: <sip:b@e>;tag=x\r\nFrom: <sip:a@e>;tag=1\r\nCall-ID: c\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n";
        assert!(!with(advertised, |m| Editor::new(m).strip_overload_feedback(1)));
    }

    #[test]
    fn a_folded_line_goes_out_unfolded_and_the_body_untouched() {
        // Request smuggling: a fold is part of the Subject here; Kamailio's and OpenSIPS's
        // stream readers take the folded ` l: 0` for a Content-Length, end the message at
        // the blank line and read the body — a second request — as a new one.
        let smuggle = b"INVITE sip:x@partner.example SIP/2.0\r\n\
Via: SIP/2.0/TLS 10.0.0.5;branch=z9hG4bKa1\r\n\
From: <sip:alice@example.com>;tag=1\r\n\
To: <sip:x@partner.example>\r\n\
Call-ID: c1\r\n\
CSeq: 1 INVITE\r\n\
Subject: x\r\n l: 0\r\n\
Content-Length: 29\r\n\
\r\n\
INVITE sip:y SIP/2.0\r\n\t\r\n a\r\n";
        let out = with(smuggle, |m| {
            assert!(m.folded());
            let mut e = Editor::new(m);
            e.set_max_forwards(69);
            e.finish()
        });
        let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let (head, body) = out.split_at(head_end);
        let head = String::from_utf8_lossy(head);
        assert!(head.contains("Subject: x   l: 0\r\n"), "{head}");
        assert!(
            !head.contains("\r\n ") && !head.contains("\r\n\t"),
            "a line of the head starts with white space: {head}"
        );
        assert_eq!(
            body, b"INVITE sip:y SIP/2.0\r\n\t\r\n a\r\n",
            "the body is not ours"
        );
        assert_eq!(out.len(), smuggle.len() + "Max-Forwards: 69\r\n".len());
        // Unfolded, it still parses the same: one message, the same body.
        with(&out, |m| {
            assert!(!m.folded());
            assert_eq!(m.content_length(), Some(29));
            assert_eq!(m.body(), body);
        });
        // Without a fold nothing is touched.
        assert_eq!(with(REQ, |m| Editor::new(m).finish()), REQ);
    }

    #[test]
    fn untouched_message_is_identical() {
        assert_eq!(with(REQ, |m| Editor::new(m).finish()), REQ);
    }
}
