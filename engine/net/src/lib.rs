//! What the sipring server and its load generator share below SIP: the TLS session over
//! rustls's unbuffered API ([`session`]), the handshake driver on a glommio socket
//! ([`handshake`]), suites and groups by name ([`suites`]), why a handshake was refused
//! ([`Rejection`]), the operating-system pieces ([`sys`]: sockets, host probes, CPU
//! placement) and the `.hgrm` text ([`hgrm`]).
//!
//! It exists so that `sipring-load` links the TLS and socket code it measures with, and not
//! the server (its registrar, cluster store client, configuration, admin endpoint).

pub mod handshake;
pub mod hgrm;
mod reject;
pub mod session;
pub mod suites;
pub mod sys;

pub use reject::Rejection;

/// A Rust variant name as a metric label: `ConnectionRefused` → `connection_refused`.
pub fn snake_label(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_become_labels() {
        assert_eq!(snake_label("ConnectionRefused"), "connection_refused");
        assert_eq!(snake_label("Other"), "other");
    }

    #[test]
    fn rustls_errors_get_their_class() {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        assert_eq!(
            Rejection::of(&E::InvalidCertificate(C::UnknownIssuer)),
            Rejection::UnknownIssuer
        );
        assert_eq!(
            Rejection::of(&E::InvalidCertificate(C::Revoked)),
            Rejection::Revoked
        );
        assert_eq!(
            Rejection::of(&E::NoCertificatesPresented),
            Rejection::NoCertificate
        );
        assert_eq!(
            Rejection::of(&E::AlertReceived(A::HandshakeFailure)),
            Rejection::NoCommonAlgorithm
        );
        assert_eq!(
            handshake::HandshakeError::Tls(E::AlertReceived(A::CertificateRevoked)).label(),
            "tls_alert_certificate_revoked"
        );
        assert_eq!(
            handshake::HandshakeError::Tls(E::InvalidCertificate(C::Expired)).label(),
            "tls_expired"
        );
    }
}
