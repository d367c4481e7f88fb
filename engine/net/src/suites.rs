//! Cipher suites and key-exchange groups by the names operators write (aws-lc-rs provider).

use rustls::SupportedCipherSuite;
use rustls::crypto::{SupportedKxGroup, aws_lc_rs};

/// A key-exchange group by name.
pub fn kx_group(name: &str) -> Option<&'static dyn SupportedKxGroup> {
    use aws_lc_rs::kx_group as k;
    Some(match name {
        "X25519MLKEM768" => k::X25519MLKEM768,
        "X25519" => k::X25519,
        "secp256r1" | "P-256" => k::SECP256R1,
        "secp384r1" | "P-384" => k::SECP384R1,
        _ => return None,
    })
}

/// A cipher suite by IANA name.
pub fn cipher_suite(name: &str) -> Option<SupportedCipherSuite> {
    aws_lc_rs::ALL_CIPHER_SUITES
        .iter()
        .copied()
        .find(|s| s.suite().as_str() == Some(name))
}
