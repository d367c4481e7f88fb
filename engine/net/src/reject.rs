//! Why a TLS handshake was refused, as a closed set of metric labels.

use std::fmt;

/// Why a handshake was refused. Each has a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rejection {
    /// The peer presented no certificate where one is required.
    NoCertificate,
    /// The chain does not lead to any root we trust.
    UnknownIssuer,
    /// The chain leads to a root trusted for a different partner.
    WrongPartnerRoot,
    /// A certificate of the chain has expired.
    Expired,
    /// A certificate of the chain is not valid yet.
    NotYetValid,
    /// A certificate of the chain is revoked by a configured CRL.
    Revoked,
    /// No configured CRL covers a certificate and the policy denies unknown status.
    UnknownRevocation,
    /// The certificate's identity is on no trusted-server list.
    NameNotTrusted,
    /// The certificate does not name the server we meant to reach.
    NameMismatch,
    /// Extended key usage allows neither serverAuth nor clientAuth.
    BadEku,
    /// A signature does not verify.
    BadSignature,
    /// Any other certificate defect.
    BadCertificate,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// No common protocol version.
    ProtocolVersion,
    /// No common cipher suite or group.
    NoCommonAlgorithm,
    /// The peer sent a fatal alert.
    PeerAlert,
    /// Malformed TLS or anything else.
    Other,
}

impl Rejection {
    /// All reasons, for metrics.
    pub const ALL: [Rejection; 17] = [
        Rejection::NoCertificate,
        Rejection::UnknownIssuer,
        Rejection::WrongPartnerRoot,
        Rejection::Expired,
        Rejection::NotYetValid,
        Rejection::Revoked,
        Rejection::UnknownRevocation,
        Rejection::NameNotTrusted,
        Rejection::NameMismatch,
        Rejection::BadEku,
        Rejection::BadSignature,
        Rejection::BadCertificate,
        Rejection::HandshakeTimeout,
        Rejection::ProtocolVersion,
        Rejection::NoCommonAlgorithm,
        Rejection::PeerAlert,
        Rejection::Other,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::NoCertificate => "no_certificate",
            Rejection::UnknownIssuer => "unknown_issuer",
            Rejection::WrongPartnerRoot => "wrong_partner_root",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::Revoked => "revoked",
            Rejection::UnknownRevocation => "unknown_revocation",
            Rejection::NameNotTrusted => "name_not_trusted",
            Rejection::NameMismatch => "name_mismatch",
            Rejection::BadEku => "bad_eku",
            Rejection::BadSignature => "bad_signature",
            Rejection::BadCertificate => "bad_certificate",
            Rejection::HandshakeTimeout => "handshake_timeout",
            Rejection::ProtocolVersion => "protocol_version",
            Rejection::NoCommonAlgorithm => "no_common_algorithm",
            Rejection::PeerAlert => "peer_alert",
            Rejection::Other => "other",
        }
    }

    /// Classifies a rustls error by what rustls itself says. (The server's own verifier
    /// carries a finer reason inside `CertificateError::Other`; `sipring::tls::classify`
    /// reads that first.)
    pub fn of(e: &rustls::Error) -> Rejection {
        use rustls::{CertificateError as C, Error as E, PeerIncompatible as P};
        match e {
            E::InvalidCertificate(c) => match c {
                C::Expired | C::ExpiredContext { .. } => Rejection::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => Rejection::NotYetValid,
                C::Revoked => Rejection::Revoked,
                // A CRL past its nextUpdate says nothing about what was revoked since: the
                // status is unknown (it was counted as a bad certificate).
                C::UnknownRevocationStatus
                | C::ExpiredRevocationList
                | C::ExpiredRevocationListContext { .. } => Rejection::UnknownRevocation,
                C::UnknownIssuer => Rejection::UnknownIssuer,
                C::NotValidForName | C::NotValidForNameContext { .. } => Rejection::NameMismatch,
                C::InvalidPurpose | C::InvalidPurposeContext { .. } => Rejection::BadEku,
                C::BadSignature => Rejection::BadSignature,
                _ => Rejection::BadCertificate,
            },
            E::NoCertificatesPresented => Rejection::NoCertificate,
            E::PeerIncompatible(p) => match p {
                P::Tls12NotOffered
                | P::Tls12NotOfferedOrEnabled
                | P::Tls13RequiredForQuic
                | P::SupportedVersionsExtensionRequired
                | P::ServerDoesNotSupportTls12Or13 => Rejection::ProtocolVersion,
                _ => Rejection::NoCommonAlgorithm,
            },
            E::AlertReceived(a) => match a {
                rustls::AlertDescription::ProtocolVersion => Rejection::ProtocolVersion,
                rustls::AlertDescription::HandshakeFailure => Rejection::NoCommonAlgorithm,
                _ => Rejection::PeerAlert,
            },
            _ => Rejection::Other,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::Rejection;
    use rustls::{CertificateError as C, Error as E};

    #[test]
    fn a_stale_crl_is_an_unknown_status_not_a_bad_certificate() {
        // rustls's client verifier reports a CRL past its nextUpdate (a phone's chain, once
        // `tls.client_crls` went stale) as an expired list: what it says is unknown, as for
        // partners (it was counted as `bad_certificate`).
        for e in [C::ExpiredRevocationList, C::UnknownRevocationStatus] {
            assert_eq!(
                Rejection::of(&E::InvalidCertificate(e)),
                Rejection::UnknownRevocation
            );
        }
        assert_eq!(
            Rejection::of(&E::InvalidCertificate(C::BadEncoding)),
            Rejection::BadCertificate
        );
    }
}
