//! Errors of the SIP core and the one place that maps them to what goes on the wire.

use crate::header::HeaderName;
use std::fmt;

/// Why a message could not be framed, parsed or accepted.
///
/// Every variant is the peer's fault (bad input), never an internal error. [`ParseError::response`]
/// says which SIP response answers it, and [`ParseError::closes_connection`] whether the byte
/// stream can still be trusted afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ParseError {
    /// No end of the header section within `max_message` bytes.
    HeadTooLarge,
    /// `Content-Length` would make the message larger than `max_message`.
    BodyTooLarge,
    /// A stream message without `Content-Length` (RFC 3261 §18.3 makes it mandatory).
    MissingContentLength,
    /// A negative, non-numeric, overflowing or conflicting `Content-Length`.
    InvalidContentLength,
    /// A datagram (or a buffer known to be whole) ended inside the header section.
    Truncated,
    /// A header line (folds included) longer than `max_header_line`.
    HeaderLineTooLong,
    /// More header lines than the header storage / `max_headers` allows.
    TooManyHeaders,
    /// More `Via` values than `max_vias`.
    TooManyVias,
    /// The Request-URI is longer than `max_uri`.
    UriTooLong,
    /// A malformed request or status line (extra spaces, missing parts, `<>` around the URI).
    InvalidStartLine,
    /// A status code outside 100..=699.
    InvalidStatusCode,
    /// A SIP version other than 2.0.
    UnsupportedVersion,
    /// A header name with characters outside `token`, or a line without a colon.
    InvalidHeaderName,
    /// A bare CR or LF in the start line or the header section.
    InvalidLineEnding,
    /// A mandatory header is missing.
    MissingHeader(HeaderName),
    /// A header that must appear once appeared several times.
    DuplicateHeader(HeaderName),
    /// A header value does not match its grammar.
    InvalidHeader(HeaderName),
    /// The Request-URI does not match its grammar.
    InvalidRequestUri,
    /// The method in `CSeq` differs from the request's method.
    CSeqMethodMismatch,
}

/// Who caused an error: decides log level and metric labels (pingora's `ErrorSource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The remote side sent something wrong.
    Peer,
    /// A next hop misbehaved.
    Upstream,
    /// A bug or resource limit of ours.
    Internal,
}

impl ParseError {
    /// The response that answers a request failing this way, as `(status, reason)`.
    ///
    /// Responses with errors are never answered; the driver drops them.
    pub fn response(self) -> (u16, &'static str) {
        use ParseError::*;
        match self {
            HeadTooLarge | TooManyHeaders | HeaderLineTooLong => (513, "Message Too Large"),
            BodyTooLarge => (413, "Request Entity Too Large"),
            UriTooLong => (414, "Request-URI Too Long"),
            UnsupportedVersion => (505, "Version Not Supported"),
            MissingContentLength => (400, "Missing Content-Length"),
            InvalidContentLength => (400, "Bad Content-Length"),
            Truncated => (400, "Truncated Message"),
            TooManyVias => (400, "Too Many Via Headers"),
            InvalidStartLine => (400, "Bad Request Line"),
            InvalidStatusCode => (400, "Bad Status Code"),
            InvalidHeaderName | InvalidLineEnding => (400, "Bad Header Syntax"),
            MissingHeader(_) => (400, "Missing Mandatory Header"),
            DuplicateHeader(_) => (400, "Duplicate Header"),
            InvalidHeader(_) => (400, "Bad Header Value"),
            InvalidRequestUri => (400, "Bad Request-URI"),
            CSeqMethodMismatch => (400, "CSeq Method Mismatch"),
        }
    }

    /// After this error, is the stream's framing lost, so the connection must close (after
    /// the response, if one can be sent)?
    pub fn closes_connection(self) -> bool {
        use ParseError::*;
        matches!(
            self,
            HeadTooLarge
                | BodyTooLarge
                | MissingContentLength
                | InvalidContentLength
                | HeaderLineTooLong
                | TooManyHeaders
                | InvalidLineEnding
        )
    }

    /// Whose fault it was. Parse errors are always the peer's.
    pub fn fault(self) -> Fault {
        Fault::Peer
    }

    /// A short stable label for logs and metrics, e.g. `"too_many_vias"`.
    pub fn label(self) -> &'static str {
        use ParseError::*;
        match self {
            HeadTooLarge => "head_too_large",
            BodyTooLarge => "body_too_large",
            MissingContentLength => "missing_content_length",
            InvalidContentLength => "invalid_content_length",
            Truncated => "truncated",
            HeaderLineTooLong => "header_line_too_long",
            TooManyHeaders => "too_many_headers",
            TooManyVias => "too_many_vias",
            UriTooLong => "uri_too_long",
            InvalidStartLine => "invalid_start_line",
            InvalidStatusCode => "invalid_status_code",
            UnsupportedVersion => "unsupported_version",
            InvalidHeaderName => "invalid_header_name",
            InvalidLineEnding => "invalid_line_ending",
            MissingHeader(_) => "missing_header",
            DuplicateHeader(_) => "duplicate_header",
            InvalidHeader(_) => "invalid_header",
            InvalidRequestUri => "invalid_request_uri",
            CSeqMethodMismatch => "cseq_method_mismatch",
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (code, reason) = self.response();
        match self {
            ParseError::MissingHeader(h)
            | ParseError::DuplicateHeader(h)
            | ParseError::InvalidHeader(h) => {
                write!(f, "{} ({h}); answer {code} {reason}", self.label())
            }
            _ => write!(f, "{}; answer {code} {reason}", self.label()),
        }
    }
}

impl std::error::Error for ParseError {}
