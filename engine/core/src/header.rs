//! Header names (with RFC 3261 §7.3.3 compact forms) and borrowed header fields.

use std::fmt;

macro_rules! header_names {
    ($( $(#[$doc:meta])* $variant:ident => $canonical:literal $(, $compact:literal)? ;)*) => {
        /// A header field name. Known names are recognised case-insensitively, in long and
        /// compact form; anything else is [`HeaderName::Other`] and kept opaque.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum HeaderName {
            $( $(#[$doc])* $variant, )*
            /// A header this crate does not interpret; the raw name is on the [`Header`].
            Other,
        }

        impl HeaderName {
            /// The canonical (long) spelling, or `None` for [`HeaderName::Other`].
            pub fn canonical(self) -> Option<&'static str> {
                match self {
                    $( HeaderName::$variant => Some($canonical), )*
                    HeaderName::Other => None,
                }
            }

            /// The compact form's letter, if the header has one.
            pub fn compact(self) -> Option<u8> {
                match self {
                    $( $( HeaderName::$variant => Some($compact), )? )*
                    _ => None,
                }
            }

            /// Every known name, for tests and documentation.
            pub const ALL: &'static [HeaderName] = &[$( HeaderName::$variant, )*];
        }
    };
}

header_names! {
    /// `Via` (`v`).
    Via => "Via", b'v';
    /// `From` (`f`).
    From => "From", b'f';
    /// `To` (`t`).
    To => "To", b't';
    /// `Call-ID` (`i`).
    CallId => "Call-ID", b'i';
    /// `CSeq`.
    CSeq => "CSeq";
    /// `Contact` (`m`).
    Contact => "Contact", b'm';
    /// `Content-Length` (`l`).
    ContentLength => "Content-Length", b'l';
    /// `Content-Type` (`c`).
    ContentType => "Content-Type", b'c';
    /// `Max-Forwards`.
    MaxForwards => "Max-Forwards";
    /// `Route`.
    Route => "Route";
    /// `Record-Route`.
    RecordRoute => "Record-Route";
    /// `Expires`.
    Expires => "Expires";
    /// `Min-Expires`.
    MinExpires => "Min-Expires";
    /// `Require`.
    Require => "Require";
    /// `Proxy-Require`.
    ProxyRequire => "Proxy-Require";
    /// `Supported` (`k`).
    Supported => "Supported", b'k';
    /// `Unsupported`.
    Unsupported => "Unsupported";
    /// `Content-Encoding` (`e`).
    ContentEncoding => "Content-Encoding", b'e';
    /// `Subject` (`s`).
    Subject => "Subject", b's';
    /// `Event` (`o`).
    Event => "Event", b'o';
    /// `Refer-To` (`r`).
    ReferTo => "Refer-To", b'r';
    /// `Allow-Events` (`u`).
    AllowEvents => "Allow-Events", b'u';
    /// `Path`.
    Path => "Path";
    /// `Allow`.
    Allow => "Allow";
    /// `Retry-After`.
    RetryAfter => "Retry-After";
    /// `Date`.
    Date => "Date";
    /// `Authorization` (RFC 3261 §20.7).
    Authorization => "Authorization";
    /// `Proxy-Authorization` (RFC 3261 §20.28).
    ProxyAuthorization => "Proxy-Authorization";
    /// `P-Asserted-Identity` (RFC 3325 §9.1).
    PAssertedIdentity => "P-Asserted-Identity";
    /// `P-Preferred-Identity` (RFC 3325 §9.2).
    PPreferredIdentity => "P-Preferred-Identity";
    /// `Privacy` (RFC 3323 §4.2).
    Privacy => "Privacy";
    /// `Remote-Party-ID` (draft-ietf-sip-privacy-04: never an RFC, still what many PBXes
    /// and phones show as the caller): an assertion like P-Asserted-Identity.
    RemotePartyId => "Remote-Party-ID";
}

impl HeaderName {
    /// Recognises a header name, case-insensitively, in long or compact form. Dispatches on
    /// the length first: this runs once per header line.
    pub fn from_bytes(name: &[u8]) -> HeaderName {
        use HeaderName::*;
        let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
        let pick = |cands: &[(&str, HeaderName)]| {
            cands.iter().find(|(s, _)| is(s)).map_or(Other, |&(_, h)| h)
        };
        match name.len() {
            1 => match name[0].to_ascii_lowercase() {
                b'v' => Via,
                b'f' => From,
                b't' => To,
                b'i' => CallId,
                b'm' => Contact,
                b'l' => ContentLength,
                b'c' => ContentType,
                b'k' => Supported,
                b'e' => ContentEncoding,
                b's' => Subject,
                b'o' => Event,
                b'r' => ReferTo,
                b'u' => AllowEvents,
                _ => Other,
            },
            2 => pick(&[("To", To)]),
            3 => pick(&[("Via", Via)]),
            4 => pick(&[
                ("From", From),
                ("CSeq", CSeq),
                ("Path", Path),
                ("Date", Date),
            ]),
            5 => pick(&[("Route", Route), ("Allow", Allow), ("Event", Event)]),
            7 => pick(&[
                ("Privacy", Privacy),
                ("Call-ID", CallId),
                ("Contact", Contact),
                ("Expires", Expires),
                ("Require", Require),
                ("Subject", Subject),
            ]),
            8 => pick(&[("Refer-To", ReferTo)]),
            9 => pick(&[("Supported", Supported)]),
            11 => pick(&[
                ("Min-Expires", MinExpires),
                ("Unsupported", Unsupported),
                ("Retry-After", RetryAfter),
            ]),
            12 => pick(&[
                ("Max-Forwards", MaxForwards),
                ("Record-Route", RecordRoute),
                ("Content-Type", ContentType),
                ("Allow-Events", AllowEvents),
            ]),
            13 => pick(&[
                ("Proxy-Require", ProxyRequire),
                ("Authorization", Authorization),
            ]),
            14 => pick(&[("Content-Length", ContentLength)]),
            15 => pick(&[("Remote-Party-ID", RemotePartyId)]),
            16 => pick(&[("Content-Encoding", ContentEncoding)]),
            19 => pick(&[
                ("Proxy-Authorization", ProxyAuthorization),
                ("P-Asserted-Identity", PAssertedIdentity),
            ]),
            20 => pick(&[("P-Preferred-Identity", PPreferredIdentity)]),
            _ => Other,
        }
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.canonical().unwrap_or("(other)"))
    }
}

/// One header field line, borrowed from the message buffer.
///
/// Offsets are relative to the start of the message and let [`crate::edit`] splice the
/// message without re-serialising anything it did not touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'b> {
    /// The recognised name.
    pub name: HeaderName,
    /// The name exactly as it appeared (e.g. `v` or `VIA`).
    pub raw_name: &'b [u8],
    /// The value with leading and trailing white space removed. A folded value keeps its
    /// inner `CRLF WSP` bytes; the value parsers treat them as white space.
    pub value: &'b [u8],
    /// Offset of the first byte of the line.
    pub line_start: u32,
    /// Offset of the first byte of `value`.
    pub value_start: u32,
    /// Offset one past the line's terminating CRLF.
    pub line_end: u32,
}

impl Header<'_> {
    /// A blank header used to initialise caller-provided header storage.
    pub const EMPTY: Header<'static> = Header {
        name: HeaderName::Other,
        raw_name: b"",
        value: b"",
        line_start: 0,
        value_start: 0,
        line_end: 0,
    };

    /// Offset one past the last byte of `value`.
    pub fn value_end(&self) -> u32 {
        self.value_start + self.value.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderName as H;

    macro_rules! names {
        ($($raw:literal => $want:expr,)*) => {
            $( assert_eq!(H::from_bytes($raw), $want, "{}", String::from_utf8_lossy($raw)); )*
        };
    }

    #[test]
    fn every_name_round_trips() {
        for &h in H::ALL {
            let c = h.canonical().unwrap();
            assert_eq!(H::from_bytes(c.as_bytes()), h, "{c}");
            assert_eq!(H::from_bytes(c.to_ascii_uppercase().as_bytes()), h, "{c}");
            if let Some(x) = h.compact() {
                assert_eq!(H::from_bytes(&[x]), h);
                assert_eq!(H::from_bytes(&[x.to_ascii_uppercase()]), h);
            }
        }
    }

    #[test]
    fn long_compact_and_case() {
        names! {
            b"Via" => H::Via, b"v" => H::Via, b"V" => H::Via, b"vIA" => H::Via,
            b"i" => H::CallId, b"call-id" => H::CallId, b"CALL-ID" => H::CallId,
            b"m" => H::Contact, b"f" => H::From, b"t" => H::To, b"l" => H::ContentLength,
            b"c" => H::ContentType, b"k" => H::Supported, b"s" => H::Subject,
            b"e" => H::ContentEncoding, b"cseq" => H::CSeq, b"Max-Forwards" => H::MaxForwards,
            b"Record-Route" => H::RecordRoute, b"x" => H::Other, b"NewFangledHeader" => H::Other,
            b"" => H::Other,
        }
    }
}
