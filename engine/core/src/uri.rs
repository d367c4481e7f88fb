//! URIs: SIP/SIPS parsed into their parts (RFC 3261 §19.1), other schemes kept opaque.

use crate::text::{eq_ic, find_param, has_space_or_ctl};
use std::borrow::Cow;

/// The URI scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `sip:`
    Sip,
    /// `sips:`
    Sips,
    /// `tel:` (RFC 3966)
    Tel,
    /// Anything else (`http:`, `isbn:`, `soap.beep:` …); kept opaque.
    Other,
}

/// A URI borrowed from a message. For `sip:`/`sips:` all parts are split out; for other
/// schemes only `scheme` and `raw` are meaningful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uri<'b> {
    /// The whole URI text.
    pub raw: &'b [u8],
    /// The scheme, classified.
    pub scheme: Scheme,
    /// User part, still %-escaped (may contain `;` per RFC 4475 §3.1.1.9).
    pub user: Option<&'b [u8]>,
    /// Password part, still %-escaped.
    pub password: Option<&'b [u8]>,
    /// Host: a domain name, an IPv4 address or a bracketed IPv6 reference (`[2001:db8::1]`).
    pub host: &'b [u8],
    /// Port, if present.
    pub port: Option<u16>,
    /// The raw `;uri-parameters`, starting with `;` (or empty).
    pub params: &'b [u8],
    /// The raw headers after `?` (without the `?`), if any.
    pub headers: Option<&'b [u8]>,
}

/// Why a URI failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UriError;

fn is_scheme_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

fn is_host_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')
}

impl<'b> Uri<'b> {
    /// Parses a URI. SIP/SIPS URIs must have a valid host (domain, IPv4 or `[IPv6]`) and
    /// an optional numeric port; user and parameter parts are taken as they are (escapes are
    /// not decoded, RFC 4475 §3.1.1.3). No white space is allowed anywhere.
    pub fn parse(raw: &'b [u8]) -> Result<Uri<'b>, UriError> {
        let colon = memchr::memchr(b':', raw).ok_or(UriError)?;
        let scheme_raw = &raw[..colon];
        if scheme_raw.is_empty()
            || !scheme_raw[0].is_ascii_alphabetic()
            || !scheme_raw.iter().all(|&b| is_scheme_char(b))
            || has_space_or_ctl(raw)
        {
            return Err(UriError);
        }
        let scheme = if eq_ic(scheme_raw, b"sip") {
            Scheme::Sip
        } else if eq_ic(scheme_raw, b"sips") {
            Scheme::Sips
        } else if eq_ic(scheme_raw, b"tel") {
            Scheme::Tel
        } else {
            Scheme::Other
        };
        let rest = &raw[colon + 1..];
        let mut uri = Uri {
            raw,
            scheme,
            user: None,
            password: None,
            host: b"",
            port: None,
            params: b"",
            headers: None,
        };
        if !matches!(scheme, Scheme::Sip | Scheme::Sips) {
            if rest.is_empty() {
                return Err(UriError);
            }
            return Ok(uri);
        }
        // A raw '@' can only separate userinfo: user, password, params and headers do not
        // allow it unescaped.
        let hostport = match memchr::memchr(b'@', rest) {
            Some(at) => {
                let userinfo = &rest[..at];
                match memchr::memchr(b':', userinfo) {
                    Some(c) => {
                        uri.user = Some(&userinfo[..c]);
                        uri.password = Some(&userinfo[c + 1..]);
                    }
                    None => uri.user = Some(userinfo),
                }
                if uri.user.is_some_and(<[u8]>::is_empty) {
                    return Err(UriError);
                }
                &rest[at + 1..]
            }
            None => rest,
        };
        let (host_end, host) = if hostport.first() == Some(&b'[') {
            let close = memchr::memchr(b']', hostport).ok_or(UriError)?;
            let inner = &hostport[1..close];
            if inner.is_empty()
                || !inner
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            {
                return Err(UriError);
            }
            (close + 1, &hostport[..close + 1])
        } else {
            let end = hostport
                .iter()
                .position(|&b| matches!(b, b':' | b';' | b'?'))
                .unwrap_or(hostport.len());
            let host = &hostport[..end];
            // Labels are never empty (RFC 3261 §25.1 hostname; one trailing dot is an
            // absolute name): `example.com..` compared as none of our domains while a
            // resolver may read it as one.
            // One pass: a dot after a dot (or first) is an empty label.
            let mut prev = b'.';
            if host.is_empty()
                || !host.iter().all(|&b| {
                    let ok = is_host_char(b) && !(b == b'.' && prev == b'.');
                    prev = b;
                    ok
                })
            {
                return Err(UriError);
            }
            (end, host)
        };
        uri.host = host;
        let mut rest = &hostport[host_end..];
        if let Some(after) = rest.strip_prefix(b":") {
            let end = after
                .iter()
                .position(|&b| matches!(b, b';' | b'?'))
                .unwrap_or(after.len());
            let port = crate::text::parse_u32(&after[..end]).ok_or(UriError)?;
            uri.port = Some(u16::try_from(port).map_err(|_| UriError)?);
            rest = &after[end..];
        }
        let q = memchr::memchr(b'?', rest);
        let params = &rest[..q.unwrap_or(rest.len())];
        if !params.is_empty() && params[0] != b';' {
            return Err(UriError);
        }
        uri.params = params;
        if let Some(q) = q {
            uri.headers = Some(&rest[q + 1..]);
        }
        Ok(uri)
    }

    /// Is this a `sip:` or `sips:` URI?
    pub fn is_sip(&self) -> bool {
        matches!(self.scheme, Scheme::Sip | Scheme::Sips)
    }

    /// Looks up a URI parameter by name (case-insensitive): `Some(None)` for a flag such as
    /// `;lr`, `Some(Some(value))` for `;name=value`.
    pub fn param(&self, name: &str) -> Option<Option<&'b [u8]>> {
        find_param(self.params, name.as_bytes())
    }

    /// The user part with `%HH` escapes decoded once (never recursively); `%00` stays a NUL
    /// octet and does not truncate (RFC 4475 §3.1.1.4).
    pub fn user_unescaped(&self) -> Option<Cow<'b, [u8]>> {
        self.user.map(unescape)
    }

    /// The host as it identifies: lower case, one trailing dot (an absolute domain name)
    /// dropped — `Example.COM.` and `example.com` are one host.
    pub fn host_canonical(&self) -> Cow<'b, [u8]> {
        match self.host_lower() {
            Cow::Borrowed(h) => Cow::Borrowed(h.strip_suffix(b".").unwrap_or(h)),
            Cow::Owned(mut h) => {
                if h.last() == Some(&b'.') {
                    h.pop();
                }
                Cow::Owned(h)
            }
        }
    }

    /// RFC 3261 §19.1.4: do two SIP or SIPS URIs name the same resource? The scheme; the
    /// userinfo, case-sensitive, escapes decoded; the host, case-insensitive (one trailing
    /// dot dropped); the port, an omitted one differing from any written (5060 too); the
    /// parameters both have, case-insensitive and decoded, where `user`, `ttl`, `method`,
    /// `maddr` and `transport` must be in both or neither and any other in one only is
    /// ignored; and the same headers. Parameter order and the case of their names never
    /// matter. URIs of other schemes, or with parameters this parser cannot split, are
    /// compared as text, ignoring case.
    pub fn equivalent(&self, other: &Uri<'_>) -> bool {
        self.equivalent_but_port(other) && self.port == other.port
    }

    /// [`Uri::equivalent`] whatever the two ports are.
    pub fn equivalent_but_port(&self, other: &Uri<'_>) -> bool {
        if self.scheme != other.scheme {
            return false;
        }
        if !self.is_sip() {
            return self.raw.eq_ignore_ascii_case(other.raw);
        }
        let (Some(a), Some(b)) = (params_of(self.params), params_of(other.params)) else {
            return self.raw.eq_ignore_ascii_case(other.raw);
        };
        // Each parameter is looked for in the other list: quadratic. Hundreds of them (a
        // contact of 1 KiB holds ~330) compared against each stored binding made one
        // REGISTER cost the shard tens of millions of comparisons; so many are compared as
        // text, as URIs whose parameters cannot be split are.
        if a.len().max(b.len()) > MAX_COMPARED_PARAMS {
            return self.raw.eq_ignore_ascii_case(other.raw);
        }
        let must_match = |n: &[u8]| {
            [&b"user"[..], b"ttl", b"method", b"maddr", b"transport"]
                .iter()
                .any(|m| m.eq_ignore_ascii_case(n))
        };
        fn find<'p>(ps: &[Param<'p>], n: &[u8]) -> Option<Option<&'p [u8]>> {
            ps.iter()
                .find(|(m, _)| m.eq_ignore_ascii_case(n))
                .map(|(_, v)| *v)
        }
        let one_way = |x: &[Param<'_>], y: &[Param<'_>]| {
            x.iter().all(|(n, v)| match find(y, n) {
                Some(w) => match (*v, w) {
                    (Some(v), Some(w)) => unescape(v).eq_ignore_ascii_case(&unescape(w)),
                    (v, w) => v == w,
                },
                None => !must_match(n),
            })
        };
        self.user.map(unescape) == other.user.map(unescape)
            && self.password.map(unescape) == other.password.map(unescape)
            && self
                .host_canonical()
                .eq_ignore_ascii_case(&other.host_canonical())
            && one_way(&a, &b)
            && one_way(&b, &a)
            && headers_equivalent(self.headers, other.headers)
    }

    /// The host in lower case, as used for domain comparisons.
    pub fn host_lower(&self) -> Cow<'b, [u8]> {
        if self.host.iter().any(u8::is_ascii_uppercase) {
            Cow::Owned(self.host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(self.host)
        }
    }
}

type Param<'b> = (&'b [u8], Option<&'b [u8]>);

/// A URI's parameters, in order (`None`: this parser cannot split them).
/// URIs with more parameters than this are compared as text by [`Uri::equivalent`].
pub const MAX_COMPARED_PARAMS: usize = 32;

fn params_of(params: &[u8]) -> Option<Vec<Param<'_>>> {
    let mut out = Vec::new();
    crate::text::for_each_param(params, |n, v| out.push((n, v))).ok()?;
    Some(out)
}

/// §19.1.4: "URI header components are never ignored": the same `name=value` pairs, in any
/// order, names case-insensitive, values decoded.
fn headers_equivalent(a: Option<&[u8]>, b: Option<&[u8]>) -> bool {
    fn pairs(h: Option<&[u8]>) -> Vec<(Vec<u8>, Cow<'_, [u8]>)> {
        let mut v: Vec<(Vec<u8>, Cow<'_, [u8]>)> = h
            .unwrap_or_default()
            .split(|&c| c == b'&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (n, v) = match memchr::memchr(b'=', p) {
                    Some(i) => (&p[..i], &p[i + 1..]),
                    None => (p, &b""[..]),
                };
                (unescape(n).to_ascii_lowercase(), unescape(v))
            })
            .collect();
        v.sort();
        v
    }
    pairs(a) == pairs(b)
}

/// Decodes `%HH` escapes once. Malformed escapes are kept literally (RFC 4475 §3.1.1.5: a `%`
/// that is not an escape is a literal character).
pub fn unescape(s: &[u8]) -> Cow<'_, [u8]> {
    if memchr::memchr(b'%', s).is_none() {
        return Cow::Borrowed(s);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let escaped = (s[i] == b'%')
            .then(|| {
                Some((
                    s.get(i + 1).copied().and_then(hex)?,
                    s.get(i + 2).copied().and_then(hex)?,
                ))
            })
            .flatten();
        if let Some((h, l)) = escaped {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(s[i]);
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! uri_ok {
        ($($raw:literal => ($scheme:expr, $user:expr, $host:literal, $port:expr, $params:literal, $headers:expr);)*) => {$(
            let u = Uri::parse($raw).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy($raw)));
            assert_eq!(u.scheme, $scheme);
            assert_eq!(u.user, $user.map(|s: &str| s.as_bytes()));
            assert_eq!(u.host, $host);
            assert_eq!(u.port, $port);
            assert_eq!(u.params, $params);
            assert_eq!(u.headers, $headers.map(|s: &str| s.as_bytes()));
        )*};
    }

    #[test]
    fn sip_uris() {
        uri_ok! {
            b"sip:alice@example.com" => (Scheme::Sip, Some("alice"), b"example.com", None, b"", None::<&str>);
            b"sips:bob@[2001:db8::10]:5061;transport=tls" => (Scheme::Sips, Some("bob"), b"[2001:db8::10]", Some(5061), b";transport=tls", None::<&str>);
            b"sip:example.com;lr" => (Scheme::Sip, None::<&str>, b"example.com", None, b";lr", None::<&str>);
            b"sip:user;par=u%40example.net@example.com" => (Scheme::Sip, Some("user;par=u%40example.net"), b"example.com", None, b"", None::<&str>);
            b"sip:user@example.com?Route=%3Csip:example.com%3E" => (Scheme::Sip, Some("user"), b"example.com", None, b"", Some("Route=%3Csip:example.com%3E"));
            b"SIP:192.0.2.1:5060" => (Scheme::Sip, None::<&str>, b"192.0.2.1", Some(5060), b"", None::<&str>);
        }
        let odd = b"sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com";
        let u = Uri::parse(odd).unwrap();
        assert_eq!(u.host, b"example.com");
        assert_eq!(
            u.password,
            Some(&b"&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"[..])
        );
    }

    #[test]
    fn other_schemes_and_errors() {
        assert_eq!(
            Uri::parse(b"isbn:2983792873").unwrap().scheme,
            Scheme::Other
        );
        assert_eq!(Uri::parse(b"tel:+15551234").unwrap().scheme, Scheme::Tel);
        for bad in [
            &b"sip:"[..],
            b"sip:@host",
            b"sip:a b@host",
            b"sip:host:99999",
            b"sip:host:port",
            b"sip:[::1",
            b"<sip:x@y>",
            b"nocolon",
            b"1sip:x",
            b"sip:host x",
            b"sip:ceo@example.com..",
            b"sip:a@.example.com",
            b"sip:a@ex..ample.com",
        ] {
            assert!(Uri::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn equivalence_follows_rfc_3261_19_1_4() {
        let eq = |a: &str, b: &str| {
            Uri::parse(a.as_bytes())
                .unwrap()
                .equivalent(&Uri::parse(b.as_bytes()).unwrap())
        };
        // RFC 3261 §19.1.4's own examples of equivalent URIs.
        for (a, b) in [
            (
                "sip:%61lice@atlanta.com;transport=TCP",
                "sip:alice@AtLanTa.CoM;Transport=tcp",
            ),
            ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
            ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
            (
                "sip:carol@chicago.com;newparam=5",
                "sip:carol@chicago.com;security=on",
            ),
            (
                "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
                "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
            ),
            (
                "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
                "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
            ),
            // What a phone's refresh may do: another parameter order, `ob` dropped.
            (
                "sip:alice@192.0.2.9:5061;transport=tls;ob",
                "sip:alice@192.0.2.9:5061;ob;transport=tls",
            ),
            (
                "sip:alice@192.0.2.9:5061;transport=tls;ob",
                "sip:alice@192.0.2.9:5061;transport=TLS",
            ),
        ] {
            assert!(eq(a, b), "{a} == {b}");
            assert!(eq(b, a), "{b} == {a}");
        }
        // And its examples of URIs that are not.
        for (a, b) in [
            (
                "SIP:ALICE@AtLanTa.CoM;Transport=udp",
                "sip:alice@AtLanTa.CoM;Transport=UDP",
            ),
            ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
            ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
            (
                "sip:bob@biloxi.com",
                "sip:bob@biloxi.com:6000;transport=tcp",
            ),
            (
                "sip:carol@chicago.com",
                "sip:carol@chicago.com?Subject=next%20meeting",
            ),
            ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
            (
                "sip:carol@chicago.com;security=on",
                "sip:carol@chicago.com;security=off",
            ),
            ("sip:alice@h", "sips:alice@h"),
            ("sip:alice@h;maddr=10.0.0.1", "sip:alice@h"),
        ] {
            assert!(!eq(a, b), "{a} != {b}");
            assert!(!eq(b, a), "{b} != {a}");
        }
        fn p(s: &str) -> Uri<'_> {
            Uri::parse(s.as_bytes()).unwrap()
        }
        assert!(p("sip:a@h:5070;ob").equivalent_but_port(&p("sip:a@h:5071")));
        assert!(!p("sip:a@h:5070").equivalent_but_port(&p("sip:a@g:5070")));
        // Past MAX_COMPARED_PARAMS parameters, compared as text (each parameter looked
        // for in the other list is quadratic): the same text is equal, another order not.
        let names: Vec<String> = (0..=MAX_COMPARED_PARAMS).map(|i| format!("p{i}")).collect();
        let forward = format!("sip:a@h;{}", names.join(";"));
        let mut reversed_names = names.clone();
        reversed_names.reverse();
        let reversed = format!("sip:a@h;{}", reversed_names.join(";"));
        assert!(eq(
            &forward,
            &forward.to_uppercase().replacen("SIP:A@H", "sip:a@h", 1)
        ));
        assert!(!eq(&forward, &reversed));
        // Within it, order does not matter.
        let few = &names[..MAX_COMPARED_PARAMS];
        let mut few_reversed = few.to_vec();
        few_reversed.reverse();
        assert!(eq(
            &format!("sip:a@h;{}", few.join(";")),
            &format!("sip:a@h;{}", few_reversed.join(";"))
        ));
    }

    #[test]
    fn unescaping_is_single_pass() {
        assert_eq!(&*unescape(b"null-%00-null"), b"null-\0-null");
        assert_eq!(&*unescape(b"value%2541"), b"value%41");
        assert_eq!(&*unescape(b"100%"), b"100%");
        assert_eq!(&*unescape(b"%zz"), b"%zz");
        let u = Uri::parse(b"sip:%75se%72@example.com").unwrap();
        assert_eq!(&*u.user_unescaped().unwrap(), b"user");
    }
}
