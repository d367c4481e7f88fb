//! Byte-level scanning helpers shared by the parsers.
//!
//! Header values handed to these helpers come from [`crate::parse`], which has already
//! located the end of each (possibly folded) header line. Any CR or LF left inside a value
//! is therefore part of a fold (`CRLF 1*WSP`) and counts as linear white space here.

/// Is `b` linear white space (SP, HTAB, or the CR/LF of a fold)?
#[inline]
pub(crate) fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

const fn token_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        i += 1;
    }
    t
}

static TOKEN: [bool; 256] = token_table();

/// RFC 3261 `token` characters (a table lookup: this runs once per header-name byte).
#[inline]
pub(crate) fn is_token(b: u8) -> bool {
    TOKEN[b as usize]
}

/// Does `s` contain white space, a control character or DEL? Written as a fold without
/// early exit so that it vectorises.
#[inline]
pub(crate) fn has_space_or_ctl(s: &[u8]) -> bool {
    s.iter()
        .fold(false, |acc, &b| acc | (b <= 0x20) | (b == 0x7f))
}

/// Trims linear white space at both ends.
#[inline]
pub(crate) fn trim(s: &[u8]) -> &[u8] {
    let Some(a) = s.iter().position(|&b| !is_lws(b)) else {
        return &s[..0];
    };
    let b = s.iter().rposition(|&b| !is_lws(b)).map_or(a, |b| b + 1);
    &s[a..b]
}

/// Index of the first LWS-free byte at or after `i`.
#[inline]
pub(crate) fn skip_lws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_lws(s[i]) {
        i += 1;
    }
    i
}

/// Case-insensitive ASCII equality.
#[inline]
pub(crate) fn eq_ic(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Parses a decimal number of at most `u64` range; `None` on empty, non-digit or overflow.
/// Leading zeros are digits like any other (`1*DIGIT`): `000…0005` is 5, however many.
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    let s = match s.iter().position(|&b| b != b'0') {
        Some(i) => &s[i..],
        None if s.is_empty() => return None,
        None => return Some(0),
    };
    if s.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// Parses a decimal `u32`.
pub(crate) fn parse_u32(s: &[u8]) -> Option<u32> {
    parse_u64(s).and_then(|v| u32::try_from(v).ok())
}

/// Parses a header value that is a decimal count (whitespace around it allowed), an
/// overlarge one as `u32::MAX` (RFC 4475 §3.1.2.4 allows treating it as the maximum).
pub(crate) fn parse_u32_saturating(v: &[u8]) -> Option<u32> {
    let v = trim(v);
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(parse_u32(v).unwrap_or(u32::MAX))
}

/// Splits a header value into its comma-separated elements, honouring quoted strings
/// (with quoted-pairs) and `<...>` brackets, and returns the byte range of each element
/// (untrimmed) relative to `s`. Returns `None` when a quote or bracket is unbalanced.
pub(crate) fn split_commas(s: &[u8], mut f: impl FnMut(usize, usize) -> bool) -> Option<()> {
    let mut start = 0;
    let mut i = 0;
    // Jump between the only bytes that matter: ',' and the openers of '"' and '<'.
    while let Some(p) = memchr::memchr3(b',', b'"', b'<', &s[i..]) {
        let at = i + p;
        match s[at] {
            b',' => {
                if !f(start, at) {
                    return Some(());
                }
                start = at + 1;
                i = at + 1;
            }
            b'<' => i = at + 1 + memchr::memchr(b'>', &s[at + 1..])? + 1,
            _ => i = skip_quoted(s, at + 1)?,
        }
    }
    f(start, s.len());
    Some(())
}

/// Given the index just after an opening `"`, returns the index just after the closing one
/// (quoted-pairs honoured), or `None` if the string is unterminated.
pub(crate) fn skip_quoted(s: &[u8], mut j: usize) -> Option<usize> {
    loop {
        let q = memchr::memchr2(b'"', b'\\', s.get(j..)?)?;
        if s[j + q] == b'"' {
            return Some(j + q + 1);
        }
        j += q + 2;
    }
}

/// Iterates over `;name[=value]` parameters in `s` (which starts right after the element
/// the parameters belong to). Yields `(name, value)` with both trimmed; a missing value is
/// `None`. Quoted values keep their quotes. Fails on an empty name (`;;`).
pub(crate) fn for_each_param<'a>(
    s: &'a [u8],
    mut f: impl FnMut(&'a [u8], Option<&'a [u8]>),
) -> Result<(), ()> {
    let mut i = skip_lws(s, 0);
    while i < s.len() {
        if s[i] != b';' {
            return Err(());
        }
        i += 1;
        let start = i;
        // Jump to the next ';' or '"'; quoted strings may hold ';'.
        loop {
            match memchr::memchr2(b';', b'"', &s[i..]) {
                None => {
                    i = s.len();
                    break;
                }
                Some(p) if s[i + p] == b';' => {
                    i += p;
                    break;
                }
                Some(p) => i = skip_quoted(s, i + p + 1).ok_or(())?,
            }
        }
        let part = &s[start..i];
        let (name, value) = match memchr::memchr(b'=', part) {
            Some(eq) => (trim(&part[..eq]), Some(trim(&part[eq + 1..]))),
            None => (trim(part), None),
        };
        if name.is_empty() || !name.iter().all(|&b| is_token(b)) {
            return Err(());
        }
        if value.is_some_and(<[u8]>::is_empty) {
            return Err(());
        }
        f(name, value);
    }
    Ok(())
}

/// Looks up parameter `name` (case-insensitive) in a `;`-parameter list.
pub(crate) fn find_param<'a>(s: &'a [u8], name: &[u8]) -> Option<Option<&'a [u8]>> {
    let mut found = None;
    let _ = for_each_param(s, |n, v| {
        if found.is_none() && eq_ic(n, name) {
            found = Some(v);
        }
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_respect_quotes_and_brackets() {
        let s = br#""a,b" <sip:x@y;p=1,2>;q=1, <sip:z>"#;
        let mut parts = Vec::new();
        split_commas(s, |a, b| {
            parts.push(trim(&s[a..b]).to_vec());
            true
        })
        .unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], b"<sip:z>");
        assert!(split_commas(b"\"open", |_, _| true).is_none());
    }

    #[test]
    fn params() {
        let mut v = Vec::new();
        for_each_param(b";branch=z9hG4bK1 ; rport;x=\"a;b\"", |n, val| {
            v.push((n.to_vec(), val.map(<[u8]>::to_vec)))
        })
        .unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[2].1.as_deref(), Some(&b"\"a;b\""[..]));
        assert!(for_each_param(b";;", |_, _| {}).is_err());
        assert!(for_each_param(b";a=", |_, _| {}).is_err());
        assert_eq!(find_param(b";Branch=x", b"branch"), Some(Some(&b"x"[..])));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u32(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_u32(b"4294967296"), None);
        assert_eq!(parse_u64(b"36893488147419103232"), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b""), None);
        // Leading zeros are digits (`1*DIGIT`): a value past 20 characters was refused, and
        // an `Expires` of 22 zeros read as the maximum (a de-registration that registered).
        assert_eq!(parse_u64(b"000000000000000000000005"), Some(5));
        assert_eq!(parse_u64(&[b'0'; 22]), Some(0));
        assert_eq!(parse_u32_saturating(&[b'0'; 22]), Some(0));
        assert_eq!(parse_u64(b"00x5"), None);
        assert_eq!(parse_u64(b"0000000000000000000036893488147419103232"), None);
    }
}
