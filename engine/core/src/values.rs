//! Typed views of the header values a proxy and registrar act on: `Via`, name-addr
//! headers (`From`, `To`, `Contact`, `Route`, `Record-Route`) and `CSeq`.
//!
//! Each parser takes one value element (one comma-separated part of a header value) as
//! borrowed bytes and returns borrowed parts; nothing is copied.

use crate::text::{self, eq_ic, find_param, for_each_param, is_token, skip_lws, trim};
use crate::uri::Uri;

/// The RFC 3261 branch magic cookie.
pub const MAGIC_COOKIE: &[u8] = b"z9hG4bK";

/// One `Via` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via<'b> {
    /// Transport token (`TLS`, `TCP`, `UDP`, `WSS`, or anything else).
    pub transport: &'b [u8],
    /// The sent-by host (domain, IPv4 or `[IPv6]`).
    pub host: &'b [u8],
    /// The sent-by port, if present.
    pub port: Option<u16>,
    /// The raw parameters, starting with `;` (or empty).
    pub params: &'b [u8],
}

impl<'b> Via<'b> {
    /// Parses one Via value: `SIP / 2.0 / transport sent-by *(; param)`, white space (and
    /// folds) allowed around the slashes as RFC 3261 permits.
    pub fn parse(v: &'b [u8]) -> Option<Via<'b>> {
        let v = trim(v);
        let mut i = 0;
        let mut proto = [&b""[..]; 3];
        for (n, slot) in proto.iter_mut().enumerate() {
            i = skip_lws(v, i);
            let start = i;
            while i < v.len() && is_token(v[i]) {
                i += 1;
            }
            *slot = &v[start..i];
            if slot.is_empty() {
                return None;
            }
            i = skip_lws(v, i);
            if n < 2 {
                if v.get(i) != Some(&b'/') {
                    return None;
                }
                i += 1;
            }
        }
        if !eq_ic(proto[0], b"SIP") || proto[1] != b"2.0" {
            return None;
        }
        let start = i;
        let end = v[start..]
            .iter()
            .position(|&b| b == b';')
            .map_or(v.len(), |p| start + p);
        let sent_by = trim(&v[start..end]);
        let (host, port) = split_host_port(sent_by)?;
        let params = &v[end..];
        for_each_param(params, |_, _| {}).ok()?;
        Some(Via {
            transport: proto[2],
            host,
            port,
            params,
        })
    }

    /// The `branch` parameter.
    pub fn branch(&self) -> Option<&'b [u8]> {
        find_param(self.params, b"branch").flatten()
    }

    /// Does the branch start with the RFC 3261 magic cookie and carry a unique part?
    pub fn has_rfc3261_branch(&self) -> bool {
        self.branch()
            .is_some_and(|b| b.len() > MAGIC_COOKIE.len() && b.starts_with(MAGIC_COOKIE))
    }

    /// A parameter by name (case-insensitive).
    pub fn param(&self, name: &str) -> Option<Option<&'b [u8]>> {
        find_param(self.params, name.as_bytes())
    }
}

/// Splits `host[:port]`, accepting `[IPv6]` references.
pub(crate) fn split_host_port(s: &[u8]) -> Option<(&[u8], Option<u16>)> {
    let (host, rest) = if s.first() == Some(&b'[') {
        let close = memchr::memchr(b']', s)?;
        (&s[..close + 1], &s[close + 1..])
    } else {
        let c = memchr::memchr(b':', s).unwrap_or(s.len());
        (&s[..c], &s[c..])
    };
    if host.is_empty()
        || !host.iter().all(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        })
    {
        return None;
    }
    let port = match rest {
        [] => None,
        [b':', digits @ ..] => Some(u16::try_from(text::parse_u32(trim(digits))?).ok()?),
        _ => return None,
    };
    Some((host, port))
}

/// A name-addr or addr-spec (`From`, `To`, `Contact`, `Route`, `Record-Route` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameAddr<'b> {
    /// The display name as written (quotes kept), if any.
    pub display: Option<&'b [u8]>,
    /// The URI text (inside `<>` when bracketed).
    pub uri: &'b [u8],
    /// Was the URI enclosed in `<>`?
    pub bracketed: bool,
    /// Header parameters after the URI (`;tag=…`, `;expires=…`, `;q=…`), starting with `;`.
    pub params: &'b [u8],
}

impl<'b> NameAddr<'b> {
    /// Parses `[display-name] <URI> *(;param)` or `addr-spec *(;param)`.
    ///
    /// Rejects what RFC 4475 calls invalid: an unterminated quoted display name, a display
    /// name that is not quoted and not made of tokens, white space inside `<>`, and an
    /// addr-spec URI containing `,`, `?` or `;` parts that require brackets. The URI itself
    /// must parse ([`Uri::parse`]).
    pub fn parse(v: &'b [u8]) -> Option<NameAddr<'b>> {
        let v = trim(v);
        let i;
        let mut display = None;
        if v.first() == Some(&b'"') {
            let mut q = 1;
            loop {
                match v.get(q)? {
                    b'\\' => q += 2,
                    b'"' => break,
                    _ => q += 1,
                }
            }
            display = Some(&v[..q + 1]);
            i = skip_lws(v, q + 1);
            if v.get(i) != Some(&b'<') {
                return None;
            }
        } else if let Some(lt) = memchr::memchr(b'<', v) {
            let name = trim(&v[..lt]);
            // Tokens separated by LWS; checked so `Bell, Alexander <…>` is refused.
            if !name.iter().all(|&b| is_token(b) || text::is_lws(b)) {
                // Not a display name: maybe an addr-spec whose parameter holds a '<'.
                return Self::addr_spec(v);
            }
            if !name.is_empty() {
                display = Some(name);
            }
            i = lt;
        } else {
            return Self::addr_spec(v);
        }
        // v[i] == '<'
        let close = i + memchr::memchr(b'>', &v[i..])?;
        let uri = &v[i + 1..close];
        Uri::parse(uri).ok()?;
        let params = &v[close + 1..];
        for_each_param(params, |_, _| {}).ok()?;
        Some(NameAddr {
            display,
            uri,
            bracketed: true,
            params: trim_start(params),
        })
    }

    /// Are its parameters' values each a token, a host or a quoted string (RFC 3261 §25.1
    /// gen-value) — no unquoted `<`, `>`, `,` or `"`? Held to for From and To: a bracketed
    /// `<sip:alice@example.com>;tag=1, <sip:ceo@example.com>` was alice to us (tag
    /// `1, <sip:ceo@…>`) and the CEO to a reader that splits on commas or takes the last
    /// `<…>`.
    pub fn plain_params(&self) -> bool {
        // The usual `;tag=…` holds none of them: one pass, nothing split.
        if !self
            .params
            .iter()
            .any(|&b| matches!(b, b'<' | b'>' | b',' | b'"'))
        {
            return true;
        }
        let mut plain = true;
        let _ = for_each_param(self.params, |_, val| {
            plain &= val.is_none_or(gen_value);
        });
        plain
    }

    fn addr_spec(v: &'b [u8]) -> Option<NameAddr<'b>> {
        let semi = memchr::memchr(b';', v).unwrap_or(v.len());
        let uri = trim(&v[..semi]);
        if uri
            .iter()
            .any(|&b| matches!(b, b'?' | b',' | b'<' | b'>' | b'"'))
        {
            return None;
        }
        Uri::parse(uri).ok()?;
        let params = &v[semi..];
        // A parameter value is a token, a host or a quoted string (RFC 3261 §25.1
        // gen-value). An unquoted `<` or `>` is none of them, and here it is worse than
        // malformed: a parser that takes the first `<…>` it sees reads
        // `sip:alice@example.com;x=<sip:ceo@example.com>` as the CEO while we read alice.
        let mut bracket = false;
        for_each_param(params, |_, val| {
            bracket |=
                val.is_some_and(|v| !whole_quoted(v) && v.iter().any(|&b| b == b'<' || b == b'>'));
        })
        .ok()?;
        if bracket {
            return None;
        }
        Some(NameAddr {
            display: None,
            uri,
            bracketed: false,
            params,
        })
    }

    /// The parsed URI (parsing cannot fail: [`NameAddr::parse`] checked it).
    pub fn uri(&self) -> Uri<'b> {
        Uri::parse(self.uri).expect("checked by NameAddr::parse")
    }

    /// A header parameter by name (case-insensitive).
    pub fn param(&self, name: &str) -> Option<Option<&'b [u8]>> {
        find_param(self.params, name.as_bytes())
    }

    /// The `tag` parameter.
    pub fn tag(&self) -> Option<&'b [u8]> {
        self.param("tag").flatten()
    }
}

fn trim_start(s: &[u8]) -> &[u8] {
    &s[skip_lws(s, 0)..]
}

/// A `CSeq` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CSeq<'b> {
    /// The sequence number (RFC 3261: less than 2^31 when generated, up to 2^32-1 accepted).
    pub seq: u32,
    /// The method token.
    pub method: &'b [u8],
}

impl<'b> CSeq<'b> {
    /// Parses `1*DIGIT LWS Method`.
    pub fn parse(v: &'b [u8]) -> Option<CSeq<'b>> {
        let v = trim(v);
        let sp = v.iter().position(|&b| text::is_lws(b))?;
        let seq = text::parse_u32(&v[..sp])?;
        let method = trim(&v[sp..]);
        if method.is_empty() || !method.iter().all(|&b| is_token(b)) {
            return None;
        }
        Some(CSeq { seq, method })
    }
}

/// A parameter value that is one quoted string, whole: `"y"` — not `"y", <sip:ceo@…>`,
/// which the parameter splitter hands over as one value starting with a quote.
fn whole_quoted(v: &[u8]) -> bool {
    v.first() == Some(&b'"') && text::skip_quoted(v, 1) == Some(v.len())
}

/// A gen-value (RFC 3261 §25.1): a token, a host or a quoted string — no unquoted `<`,
/// `>`, `,` or `"`.
fn gen_value(v: &[u8]) -> bool {
    whole_quoted(v) || !v.iter().any(|&b| matches!(b, b'<' | b'>' | b',' | b'"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_forms() {
        let v = Via::parse(b"SIP/2.0/TLS proxy.example.com:5061;branch=z9hG4bK776;rport").unwrap();
        assert_eq!(v.transport, b"TLS");
        assert_eq!(v.host, b"proxy.example.com");
        assert_eq!(v.port, Some(5061));
        assert_eq!(v.branch(), Some(&b"z9hG4bK776"[..]));
        assert!(v.has_rfc3261_branch());
        assert_eq!(v.param("rport"), Some(None));
        let folded =
            Via::parse(b"SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw").unwrap();
        assert_eq!(folded.host, b"192.0.2.2");
        assert!(!folded.has_rfc3261_branch());
        let v6 = Via::parse(b"SIP/2.0/TCP [2001:db8::9:1]:5070;branch=z9hG4bKx").unwrap();
        assert_eq!(v6.host, b"[2001:db8::9:1]");
        assert_eq!(v6.port, Some(5070));
        assert!(
            !Via::parse(b"SIP/2.0/UDP h;branch=z9hG4bK")
                .unwrap()
                .has_rfc3261_branch()
        );
        for bad in [
            &b"SIP/2.0/UDP 192.0.2.15;;"[..],
            b"SIP/2.0 host",
            b"SIP/3.0/UDP host",
            b"SIP/2.0/UDP",
            b"SIP/2.0/UDP host:abc",
            b"SIP/2.0/UDP host;branch=",
        ] {
            assert!(
                Via::parse(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse(
            br#""J Rosenberg \\\""       <sip:jdrosen@example.com>  ;  tag = 98asjd8"#,
        )
        .unwrap();
        assert!(n.bracketed);
        assert_eq!(n.uri, b"sip:jdrosen@example.com");
        assert_eq!(n.tag(), Some(&b"98asjd8"[..]));
        let n = NameAddr::parse(b"sip:caller@example.net;tag=134161461246").unwrap();
        assert!(!n.bracketed);
        assert_eq!(n.tag(), Some(&b"134161461246"[..]));
        // A bracket inside a quoted parameter value is text.
        let n = NameAddr::parse(b"sip:a@example.com;+sip.instance=\"<urn:uuid:1>\"").unwrap();
        assert_eq!(n.uri, b"sip:a@example.com");
        let n = NameAddr::parse(b"caller<sip:caller@example.com>;tag=323").unwrap();
        assert_eq!(n.display, Some(&b"caller"[..]));
        assert_eq!(
            NameAddr::parse(b"<sip:a@b;lr>").unwrap().uri().param("lr"),
            Some(None)
        );
        for bad in [
            &br#""Mr. J. User <sip:j.user@example.com>"#[..],
            b"Bell, Alexander <sip:a.g.bell@example.com>;tag=43",
            br#""Watson, Thomas" < sip:t.watson@example.org >"#,
            b"sip:user@example.com?Route=%3Csip:sip.example.com%3E",
            b"<sip:joe@example.org>;;;;",
            b"<sip:a@b",
            // Read as alice here, as the CEO by a parser that takes the first `<…>`.
            b"sip:alice@example.com;x=<sip:ceo@example.com>;tag=1",
            b"sip:alice@example.com;x=a>b",
        ] {
            assert!(
                NameAddr::parse(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn cseq() {
        assert_eq!(
            CSeq::parse(b"0009\r\n  INVITE"),
            Some(CSeq {
                seq: 9,
                method: b"INVITE"
            })
        );
        assert!(CSeq::parse(b"36893488147419103232 REGISTER").is_none());
        assert!(CSeq::parse(b"1").is_none());
        assert!(CSeq::parse(b"x INVITE").is_none());
    }
}
