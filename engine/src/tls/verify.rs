//! Federation trust: per-partner roots, CRLs, EKU and the trusted-server list.
//!
//! A peer certificate is accepted only if **all** of these hold, checked in this order so the
//! reason given is the most specific one:
//!
//! 1. it names an identity (SAN `sip:` URI or dNSName, RFC 5922; CN only without SAN) that is
//!    on some partner's trusted-server list (inbound) or equals the name we meant to reach and
//!    is on that partner's list (outbound);
//! 2. its chain verifies to a root trusted **for that partner** (a chain that verifies only
//!    to another partner's root is refused as [`Rejection::WrongPartnerRoot`]);
//! 3. every certificate of the chain is inside its validity period;
//! 4. no certificate of the chain is revoked by that partner's CRLs (unknown status: the
//!    partner's `unknown_revocation` policy);
//! 5. its extended key usage allows TLS: serverAuth **or** clientAuth (clientAuth is not
//!    required; public CAs stopped issuing it in 2026).
//!
//! Every refusal is a [`Rejected`] carried inside rustls's `CertificateError::Other`, with the
//! presented identities and issuer, so the connection that failed can log all of it.

use super::Rejection;
use crate::config::{Config, PeerConfig, UnknownRevocation};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, ServerName, TrustAnchor, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
};
use std::fmt;
use std::sync::Arc;
use webpki::{
    CertRevocationList, EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeId, KeyPurposeIdIter,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

/// An identity a certificate presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// SAN dNSName.
    Dns(String),
    /// SAN `sip:` URI without user part: the domain (RFC 5922 §7.1; a `sips:` URI, or any
    /// other scheme, is not an identity).
    Sip(String),
    /// Subject CN (only reported when the certificate has no SAN URI or dNSName).
    Cn(String),
}

impl Identity {
    /// The name to compare.
    pub fn name(&self) -> &str {
        match self {
            Identity::Dns(n) | Identity::Sip(n) | Identity::Cn(n) => n,
        }
    }

    /// Does it name `wanted`? A wildcard (`allow_wildcards`) only in a dNSName: RFC 5922
    /// §7.2 has none for SIP URIs, and a CN is no place for one.
    pub fn matches(&self, wanted: &str, allow_wildcards: bool) -> bool {
        name_matches(
            self.name(),
            wanted,
            allow_wildcards && matches!(self, Identity::Dns(_)),
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Dns(n) => write!(f, "DNS:{}", printable(n)),
            Identity::Sip(n) => write!(f, "URI:sip:{}", printable(n)),
            Identity::Cn(n) => write!(f, "CN={}", printable(n)),
        }
    }
}

/// Text from a certificate nobody verified yet, made safe for a log line: control
/// characters (a CN with a newline forges log lines) are written escaped.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Facts about a certificate an operator needs in a log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertSummary {
    /// Identities presented (see [`identities`]).
    pub identities: Vec<Identity>,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// The subject's distinguished name.
    pub subject: String,
    /// notAfter, as Unix seconds.
    pub not_after: i64,
    /// notBefore, as Unix seconds.
    pub not_before: i64,
}

/// Reads identities (RFC 5922 §7.1: SAN URIs `sip:domain` and dNSNames; the CN only when the
/// certificate has **no subjectAltName extension at all** — a SAN holding only an IP address
/// or a user URI means the CN is not an identity) and the names for logs.
pub fn summarize(cert: &[u8]) -> Option<CertSummary> {
    use x509_parser::extensions::GeneralName;
    let (_, x) = x509_parser::parse_x509_certificate(cert).ok()?;
    let mut ids = Vec::new();
    let san_ext = x.subject_alternative_name();
    // An unparseable SAN extension still counts as present: never fall back to the CN.
    let has_san = !matches!(san_ext, Ok(None));
    if let Ok(Some(san)) = san_ext {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => ids.push(Identity::Dns(d.to_ascii_lowercase())),
                GeneralName::URI(u) => {
                    let lower = u.to_ascii_lowercase();
                    // RFC 5922 §7.1: a URI whose scheme is not "sip" is not an identity.
                    let rest = lower.strip_prefix("sip:");
                    // Only `sip:domain` (no user part) names a server (RFC 5922 §7.1).
                    if let Some(host) = rest.filter(|r| !r.contains('@')) {
                        let host = host.split([';', '?', ':']).next().unwrap_or_default();
                        if !host.is_empty() {
                            ids.push(Identity::Sip(host.to_string()));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    if !has_san {
        for cn in x.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                ids.push(Identity::Cn(s.to_ascii_lowercase()));
            }
        }
    }
    Some(CertSummary {
        identities: ids,
        issuer: printable(&x.issuer().to_string()).into_owned(),
        subject: printable(&x.subject().to_string()).into_owned(),
        not_after: x.validity().not_after.timestamp(),
        not_before: x.validity().not_before.timestamp(),
    })
}

/// The AORs a client certificate names: SAN URIs `sip:user@domain` (or `sips:`), canonical
/// (`sip:user@host`, host lower case), for a `tls` listener that accepts client certificates
/// as user identity.
pub fn user_aors(cert: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.contains('@') => {
                let uri = sipring_core::Uri::parse(u.as_bytes()).ok()?;
                sipring_core::registrar::aor_of(&uri)
            }
            _ => None,
        })
        .collect()
}

/// Does a certificate name (possibly `*.example.net`) match a configured name? Case and one
/// trailing dot (an absolute DNS name) do not count.
pub fn name_matches(presented: &str, wanted: &str, allow_wildcards: bool) -> bool {
    let (p, w) = (presented.to_ascii_lowercase(), wanted.to_ascii_lowercase());
    let (p, w) = (
        p.strip_suffix('.').unwrap_or(&p),
        w.strip_suffix('.').unwrap_or(&w),
    );
    // A `*` is a wildcard or nothing: never matched as a character (a `sip:*.x` URI or a
    // CN of `*.x` is no identity, RFC 5922 §7.2).
    if p == w && !p.contains('*') {
        return true;
    }
    match p.strip_prefix("*.") {
        // One label only, never a bare TLD-like suffix.
        Some(suffix) if allow_wildcards && !w.contains('*') => {
            suffix.contains('.')
                && w.split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix)
        }
        _ => false,
    }
}

/// Why a certificate was refused, with what it presented; carried in
/// `CertificateError::Other` so the failing connection can log it.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The reason (metric label).
    pub reason: Rejection,
    /// What the peer presented.
    pub cert: CertSummary,
    /// The partner whose policy applied, if one did.
    pub peer: Option<String>,
    /// Technical detail (the verifier's own error).
    pub detail: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self
            .cert
            .identities
            .iter()
            .map(ToString::to_string)
            .collect();
        write!(
            f,
            "{}: presented [{}] issued by \"{}\"{}{}",
            self.reason.label(),
            ids.join(", "),
            self.cert.issuer,
            self.peer
                .as_ref()
                .map(|p| format!(" (partner {p})"))
                .unwrap_or_default(),
            if self.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", self.detail)
            }
        )
    }
}

impl std::error::Error for Rejected {}

/// The most CA certificates a peer may present with its own. Each one webpki may try costs
/// signature checks with the root's key, and a chain is verified once per CRL order (up to
/// 64): about a hundred junk intermediates named after a partner's root held a shard's
/// thread for a second or more per handshake. Real chains have one to three.
pub const MAX_INTERMEDIATES: usize = 8;

/// Refusal of a chain longer than [`MAX_INTERMEDIATES`], before any signature is checked.
fn too_long(ee: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Option<Error> {
    (intermediates.len() > MAX_INTERMEDIATES).then(|| {
        let (summary, _) = chain_summary(ee, &[]);
        reject(
            Rejection::BadCertificate,
            summary,
            None,
            format!(
                "{} intermediate certificates presented (at most {MAX_INTERMEDIATES})",
                intermediates.len()
            ),
        )
    })
}

fn reject(
    reason: Rejection,
    cert: CertSummary,
    peer: Option<&str>,
    detail: impl Into<String>,
) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Rejected {
        reason,
        cert,
        peer: peer.map(str::to_string),
        detail: detail.into(),
    }))))
}

const SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
/// id-kp-sipDomain, 1.3.6.1.5.5.7.3.20 (RFC 5924 §4).
const SIP_DOMAIN: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x14];
/// anyExtendedKeyUsage, 2.5.29.37.0 (RFC 5280 §4.2.1.12).
const ANY_EKU: &[u8] = &[0x55, 0x1d, 0x25, 0x00];

/// EKU policy (or no EKU extension at all, RFC 5280 "any"). A partner that dials us
/// presents the certificate it serves with as often as a client one, so inbound either
/// serverAuth or clientAuth will do; the server we dial must be a server (serverAuth).
#[derive(Clone, Copy)]
struct TlsEku {
    server_only: bool,
}

impl TlsEku {
    const EITHER: TlsEku = TlsEku { server_only: false };
    const SERVER: TlsEku = TlsEku { server_only: true };
}

impl ExtendedKeyUsageValidator for TlsEku {
    #[allow(deprecated)] // the context variant wants a KeyUsage; ours is "either of two"
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let mut any = false;
        for id in iter {
            let id = id?;
            any = true;
            // RFC 5924 §5: a certificate whose EKU names id-kp-sipDomain (or any purpose)
            // is a SIP domain certificate, for either end of a SIP-over-TLS link.
            if id == KeyPurposeId::new(SERVER_AUTH)
                || id == KeyPurposeId::new(SIP_DOMAIN)
                || id == KeyPurposeId::new(ANY_EKU)
                || (!self.server_only && id == KeyPurposeId::new(CLIENT_AUTH))
            {
                return Ok(());
            }
        }
        if any {
            Err(webpki::Error::RequiredEkuNotFound)
        } else {
            Ok(())
        }
    }
}

#[allow(deprecated)] // RequiredEkuNotFound: the variant our own EKU validator returns
fn classify(e: &webpki::Error) -> Rejection {
    use webpki::Error as W;
    match e {
        W::CertExpired { .. } => Rejection::Expired,
        W::CertNotValidYet { .. } => Rejection::NotYetValid,
        W::CertRevoked => Rejection::Revoked,
        W::UnknownRevocationStatus => Rejection::UnknownRevocation,
        W::CrlExpired { .. } => Rejection::UnknownRevocation,
        W::UnknownIssuer => Rejection::UnknownIssuer,
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) => Rejection::BadEku,
        W::InvalidSignatureForPublicKey
        | W::UnsupportedSignatureAlgorithm
        | W::UnsupportedSignatureAlgorithmForPublicKey => Rejection::BadSignature,
        _ => Rejection::BadCertificate,
    }
}

/// The trust settings of one federation partner.
#[derive(Debug)]
pub struct PeerTrust {
    /// The partner's name.
    pub name: String,
    /// Names on its trusted-server list.
    pub trusted_names: Vec<String>,
    /// Whether `*.domain` certificate names may match.
    pub allow_wildcards: bool,
    /// The name we connect to (outbound) and expect.
    pub server_name: String,
    anchors: Vec<TrustAnchor<'static>>,
    crls: Vec<CertRevocationList<'static>>,
    /// The other orders to read the CRLs in (by index; [`first_reads`]), worked out once,
    /// at load; none for most partners.
    orders: Vec<Vec<usize>>,
    unknown: UnknownStatusPolicy,
    subjects: Vec<DistinguishedName>,
    /// Each anchor's validity (notBefore, notAfter; seconds since the epoch), in the order
    /// of `anchors`: webpki keeps none, and an expired root must not anchor a chain.
    anchor_validity: Vec<(i64, i64)>,
    /// The anchors valid when the policy loaded, and the span (seconds, inclusive) in which
    /// exactly those are: a bundle holding a lapsed root is verified against this set as
    /// it is, not rebuilt for every chain.
    current: (Vec<TrustAnchor<'static>>, i64, i64),
    /// The roots that carry name constraints, by subject: a sub-CA given as a root anchors
    /// what it issued, and webpki holds only dNSName SANs to an anchor's constraints
    /// ([`PeerTrust::ids_within`]).
    constrained: Vec<(DistinguishedName, CertificateDer<'static>)>,
}

/// The roots of `roots` that are not self-issued (a sub-CA given as a root) and that a CRL
/// of their issuer in `crls` revokes: each one's index and subject.
pub fn revoked_roots(
    roots: &[CertificateDer<'_>],
    crls: &[CertRevocationList<'_>],
) -> Vec<(usize, String)> {
    roots
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let (_, x) = x509_parser::parse_x509_certificate(r.as_ref()).ok()?;
            let issuer = x.issuer().as_raw();
            if issuer == x.subject().as_raw() {
                return None;
            }
            let serial = x.tbs_certificate.raw_serial();
            crls.iter()
                .any(|c| {
                    DistinguishedName::in_sequence(c.issuer()).as_ref() == issuer
                        && c.find_serial(serial).ok().flatten().is_some()
                })
                .then(|| (i, x.subject().to_string()))
        })
        .collect()
}

/// Is `crl` signed by one of `issuers` of its issuer's name? `None`: none of them has that
/// name (an issuer we do not hold), or the list does not parse here.
pub fn crl_signed_by_known_issuer(
    crl: &CertificateRevocationListDer<'_>,
    issuers: &[CertificateDer<'_>],
) -> Option<bool> {
    let (_, list) = x509_parser::parse_x509_crl(crl.as_ref()).ok()?;
    let named: Vec<_> = issuers
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
        .filter(|(_, x)| x.subject().as_raw() == list.issuer().as_raw())
        .collect();
    if named.is_empty() {
        return None;
    }
    Some(
        named
            .iter()
            .any(|(_, x)| signed_by(crl.as_ref(), x.public_key().raw)),
    )
}

/// A DER element: its tag, its contents, the whole element, and what follows it.
type DerElement<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

/// The DER element at the start of `input`. Definite lengths only (DER).
fn der_element(input: &[u8]) -> Option<DerElement<'_>> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, &b| (a << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    Some((tag, &rest[..len], &input[..header + len], &rest[len..]))
}

/// Is the CRL `crl` (DER) signed by the key of the SubjectPublicKeyInfo `spki` (DER)? With
/// the signature algorithms rustls's provider verifies certificates with (webpki's
/// `verify_signature` is not public), matched as webpki matches them: the algorithm
/// identifiers' contents, the key's and the signature's.
fn signed_by(crl: &[u8], spki: &[u8]) -> bool {
    let parts = || {
        let (_, list, _, _) = der_element(crl)?;
        let (_, _, tbs, rest) = der_element(list)?;
        let (_, sig_alg, _, rest) = der_element(rest)?;
        let (0x03, sig, _, _) = der_element(rest)? else {
            return None;
        };
        let (_, key_info, _, _) = der_element(spki)?;
        let (_, key_alg, _, rest) = der_element(key_info)?;
        let (0x03, key, _, _) = der_element(rest)? else {
            return None;
        };
        // BIT STRINGs: a leading count of unused bits, 0 for keys and signatures.
        Some((tbs, sig_alg, sig.get(1..)?, key_alg, key.get(1..)?))
    };
    let Some((tbs, sig_alg, sig, key_alg, key)) = parts() else {
        return false;
    };
    rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all
        .iter()
        .filter(|a| {
            a.signature_alg_id().as_ref() == sig_alg && a.public_key_alg_id().as_ref() == key_alg
        })
        .any(|a| a.verify_signature(key, tbs, sig).is_ok())
}

/// The issuer names (DER) of a presented chain, for [`PeerTrust::roots_named`].
/// The presented CA certificates that chain from `ee` by name: every one whose subject is
/// the issuer of the leaf or of one already taken — those a path can use, whichever of them
/// webpki's path went through. A CA presented beside them (a bundle sent whole, a
/// cross-certificate of another name) does not narrow the identities by its name
/// constraints — that refused partners and phones it had nothing to do with. Every CA of a
/// wanted name is taken, not the first: a decoy presented ahead of the real sub-CA under the
/// same name (webpki tries it, fails, and goes on to the real one) stood in for it, and the
/// sub-CA's name constraints were never applied to `sip:` URI and CN identities.
fn linked<'c>(
    ee: &CertificateDer<'_>,
    intermediates: &'c [CertificateDer<'c>],
) -> Vec<CertificateDer<'c>> {
    let names = |c: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(c.as_ref())
            .ok()
            .map(|(_, x)| (x.subject().as_raw().to_vec(), x.issuer().as_raw().to_vec()))
    };
    let cas: Vec<Option<(Vec<u8>, Vec<u8>)>> = intermediates.iter().map(names).collect();
    let mut out = Vec::new();
    let mut used = vec![false; intermediates.len()];
    let Some((_, first)) = names(ee) else {
        return out;
    };
    let mut wanted = vec![first];
    while let Some(want) = wanted.pop() {
        for i in 0..cas.len() {
            let Some((subject, issuer)) = cas[i].as_ref().filter(|(s, _)| *s == want) else {
                continue;
            };
            if used[i] {
                continue;
            }
            used[i] = true;
            out.push(intermediates[i].clone());
            if issuer != subject {
                wanted.push(issuer.clone());
            }
        }
    }
    out
}

fn chain_issuers(ee: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Vec<Vec<u8>> {
    std::iter::once(ee)
        .chain(intermediates)
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, x)| x.issuer().as_raw().to_vec())
        .collect()
}

impl PeerTrust {
    /// Does a certificate of the chain name one of this partner's roots as its issuer? A
    /// label for the log (`wrong_partner_root`), by name only: verifying the chain against
    /// every other partner's roots to choose it cost an unauthenticated peer's handshake up
    /// to 100 signature checks per partner, on the shard's thread.
    fn roots_named(&self, issuers: &[Vec<u8>]) -> bool {
        issuers
            .iter()
            .any(|i| self.subjects.iter().any(|s| s.as_ref() == i.as_slice()))
    }

    /// Builds a partner's trust from its configuration and already-loaded files.
    pub fn new(
        p: &PeerConfig,
        roots: &[CertificateDer<'static>],
        crls: &[CertificateRevocationListDer<'static>],
    ) -> Result<PeerTrust, String> {
        let crls = crls
            .iter()
            .map(|c| {
                webpki::OwnedCertRevocationList::from_der(c.as_ref())
                    .map(CertRevocationList::from)
                    .map_err(|e| format!("bad CRL: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A sub-CA given as a root anchors what it issued, and webpki checks no anchor's
        // revocation: one a configured CRL of its issuer revokes would vouch on regardless
        // (a revoked sub-CA revokes what it issued). CRLs, like roots, change only on a
        // (re)load, so checked here; such a root anchors nothing. Before, the load failed:
        // a reload after the CRL job fetched the list that revoked it was refused, and the
        // old policy kept the revoked sub-CA and every older list in force.
        let revoked = revoked_roots(roots, &crls);
        for (_, name) in &revoked {
            tracing::warn!(
                partner = %p.name,
                root = %name,
                "root certificate revoked by a configured CRL of its issuer: it anchors nothing \
                 (a revoked sub-CA revokes what it issued); remove it from the roots file"
            );
        }
        let mut anchors = Vec::new();
        let mut subjects = Vec::new();
        let mut anchor_validity = Vec::new();
        let mut constrained = Vec::new();
        for (i, r) in roots.iter().enumerate() {
            if revoked.iter().any(|(j, _)| *j == i) {
                continue;
            }
            let a = webpki::anchor_from_trusted_cert(r)
                .map_err(|e| format!("bad root certificate: {e}"))?
                .to_owned();
            let (_, x) = x509_parser::parse_x509_certificate(r.as_ref())
                .map_err(|e| format!("bad root certificate: {e}"))?;
            anchor_validity.push((
                x.validity().not_before.timestamp(),
                x.validity().not_after.timestamp(),
            ));
            let subject = DistinguishedName::in_sequence(a.subject.as_ref());
            if a.name_constraints.is_some() {
                constrained.push((subject.clone(), r.clone()));
            }
            subjects.push(subject);
            anchors.push(a);
        }
        if anchors.is_empty() && revoked.is_empty() {
            return Err("no root certificate in file".into());
        }
        let current = current_anchors(&anchors, &anchor_validity);
        Ok(PeerTrust {
            name: p.name.clone(),
            trusted_names: Config::peer_trusted_names(p)
                .into_iter()
                .map(|n| n.to_ascii_lowercase())
                .collect(),
            allow_wildcards: p.allow_wildcards,
            server_name: p.server_name.to_ascii_lowercase(),
            anchors,
            orders: first_reads(
                &crls
                    .iter()
                    .map(|c| Some(c.issuer().to_vec()))
                    .collect::<Vec<_>>(),
            ),
            crls,
            unknown: match p.unknown_revocation {
                UnknownRevocation::Deny => UnknownStatusPolicy::Deny,
                UnknownRevocation::Allow => UnknownStatusPolicy::Allow,
            },
            subjects,
            current,
            anchor_validity,
            constrained,
        })
    }

    /// `ids` limited to what the name constraints of a root of this partner that issued a
    /// certificate of the chain allow ([`within_name_constraints`], which does the same for
    /// the CA certificates the peer presented). A sub-CA in `roots` limited to
    /// `alpha.example` could otherwise issue `sip:sip.zeta.example` (or a CN) and pass as
    /// partner zeta: webpki holds only dNSName SANs to an anchor's constraints. By issuer
    /// name: another anchor of the same name, were there one, is held to them too.
    fn ids_within<'i>(
        &self,
        ids: &'i [Identity],
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> std::borrow::Cow<'i, [Identity]> {
        if self.constrained.is_empty() {
            return std::borrow::Cow::Borrowed(ids);
        }
        let issuers = chain_issuers(ee, &linked(ee, intermediates));
        let mut out = ids.to_vec();
        for (subject, root) in &self.constrained {
            if issuers.iter().any(|i| i.as_slice() == subject.as_ref()) {
                within_name_constraints(&mut out, std::slice::from_ref(root));
            }
        }
        std::borrow::Cow::Owned(out)
    }

    /// Is one of `ids` of this chain, within this partner's constrained roots, on its
    /// trusted-server list?
    fn trusts_chain(
        &self,
        ids: &[Identity],
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> bool {
        self.trusts(&self.ids_within(ids, ee, intermediates))
    }

    /// The notAfter of each of its roots (seconds since the epoch).
    pub fn anchor_expiries(&self) -> impl Iterator<Item = i64> + '_ {
        self.anchor_validity.iter().map(|v| v.1)
    }

    /// Is one of `ids` on this partner's trusted-server list?
    pub fn trusts(&self, ids: &[Identity]) -> bool {
        ids.iter().any(|i| self.trusts_one(i))
    }

    fn trusts_one(&self, id: &Identity) -> bool {
        self.trusted_names
            .iter()
            .any(|t| id.matches(t, self.allow_wildcards))
    }

    /// Does the chain lead to this partner's roots (validity and EKU included, revocation
    /// not)? This decides *whose* certificate it is; [`Self::verify_chain`] whether it is
    /// good.
    fn reaches_roots(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> bool {
        self.verify_with(algs, ee, intermediates, now, None, TlsEku::EITHER)
            .is_ok()
    }

    /// Verifies the chain against this partner's roots and the EKU policy, with `revocation`.
    fn verify_with(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        revocation: Option<webpki::RevocationOptions<'_>>,
        eku: TlsEku,
    ) -> Result<(), webpki::Error> {
        let ee = EndEntityCert::try_from(ee)?;
        let t = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let valid = |&(from, until): &(i64, i64)| from <= t && t <= until;
        // A root outside its validity anchors nothing (RFC 5280 §6.1 leaves it to the
        // relying party; every certificate of a chain is held to its validity here). A
        // chain only such a root would anchor is refused as expired, not as unknown.
        let rebuilt;
        let current: &[TrustAnchor<'static>] = if (self.current.1..=self.current.2).contains(&t) {
            &self.current.0
        } else {
            rebuilt = self
                .anchors
                .iter()
                .zip(&self.anchor_validity)
                .filter(|(_, v)| valid(v))
                .map(|(a, _)| a.clone())
                .collect::<Vec<_>>();
            &rebuilt
        };
        let r = ee
            .verify_for_usage(algs.all, current, intermediates, now, eku, revocation, None)
            .map(|_| ());
        if r != Err(webpki::Error::UnknownIssuer) || current.len() == self.anchors.len() {
            return r;
        }
        let lapsed: Vec<(TrustAnchor<'static>, i64)> = self
            .anchors
            .iter()
            .zip(&self.anchor_validity)
            .filter(|(_, v)| !valid(v))
            .map(|(a, v)| (a.clone(), v.1))
            .collect();
        for (a, until) in lapsed {
            let one = [a];
            if ee
                .verify_for_usage(algs.all, &one, intermediates, now, eku, revocation, None)
                .is_ok()
            {
                return Err(webpki::Error::CertExpired {
                    time: now,
                    not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                        u64::try_from(until).unwrap_or(0),
                    )),
                });
            }
        }
        r
    }

    /// Verifies the chain against this partner's roots, CRLs and the EKU policy, as the
    /// partner dialling us presented it (serverAuth or clientAuth).
    pub fn verify_chain(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), webpki::Error> {
        self.verify_chain_for(algs, ee, intermediates, now, TlsEku::EITHER)
    }

    /// [`Self::verify_chain`] for the server we dial: serverAuth.
    pub fn verify_server_chain(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), webpki::Error> {
        self.verify_chain_for(algs, ee, intermediates, now, TlsEku::SERVER)
    }

    fn verify_chain_for(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        eku: TlsEku,
    ) -> Result<(), webpki::Error> {
        let all: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        let first = self.verify_with_crls(algs, ee, intermediates, now, eku, &all);
        let signature = |r: &Result<(), webpki::Error>| {
            matches!(
                r,
                Err(webpki::Error::InvalidCrlSignatureForPublicKey
                    | webpki::Error::InvalidSignatureForPublicKey)
            )
        };
        // webpki reads only the first CRL that covers a certificate (same issuer name, and
        // a scope that includes it). One issuer may have several:
        // - a CA re-keyed under the same name (a Windows CA's renewal does that) has one list
        //   per key; read first, the other key's list fails the chain as a bad signature;
        // - a CA that partitions its lists (a full one and one for end entities, say) has
        //   several that cover one certificate, and only one of them may list it.
        // So the chain is read in every order that puts another choice of list first for
        // the issuers with several ([`first_reads`]: every combination, one list per issuer,
        // since each level of a chain reads its own): a certificate any correctly signed
        // list revokes is revoked (webpki reports `CertRevoked` only after the list's
        // signature and expiry passed); otherwise a pass stands; otherwise the first answer
        // that is not a signature failure; else the first.
        // Revoked is final; so is a chain that reaches no anchor (no list changes that), and
        // trying every order of lists again for it only cost a forged chain's sender our CPU.
        if matches!(
            first,
            Err(webpki::Error::CertRevoked | webpki::Error::UnknownIssuer)
        ) {
            return first;
        }
        let mut passed = first.is_ok();
        let mut other = None;
        for o in &self.orders {
            let order: Vec<&CertRevocationList<'_>> = o.iter().map(|&i| &self.crls[i]).collect();
            match self.verify_with_crls(algs, ee, intermediates, now, eku, &order) {
                Err(webpki::Error::CertRevoked) => return Err(webpki::Error::CertRevoked),
                Ok(()) => passed = true,
                r if signature(&r) => {}
                r => {
                    other.get_or_insert(r);
                }
            }
        }
        match (passed, other) {
            (true, _) => Ok(()),
            (false, Some(r)) if signature(&first) => r,
            _ => first,
        }
    }

    fn verify_with_crls(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        eku: TlsEku,
        crl_refs: &[&CertRevocationList<'_>],
    ) -> Result<(), webpki::Error> {
        let revocation = match RevocationOptionsBuilder::new(crl_refs) {
            // A CRL past its nextUpdate says nothing about what was revoked since: under the
            // default policy (unknown status denied) it counts as no CRL; with unknown
            // status allowed, as the operator chose, it is still read.
            Ok(b) => Some(
                b.with_depth(RevocationCheckDepth::Chain)
                    .with_status_policy(self.unknown)
                    .with_expiration_policy(if self.unknown == UnknownStatusPolicy::Deny {
                        webpki::ExpirationPolicy::Enforce
                    } else {
                        webpki::ExpirationPolicy::Ignore
                    })
                    .build(),
            ),
            // No CRL configured: status unknown for every certificate — once the chain
            // itself is good (a stranger's certificate is an unknown issuer to the
            // operator, not a gap in the CRL settings).
            Err(_) if self.unknown == UnknownStatusPolicy::Deny => {
                self.verify_with(algs, ee, intermediates, now, None, eku)?;
                return Err(webpki::Error::UnknownRevocationStatus);
            }
            Err(_) => None,
        };
        self.verify_with(algs, ee, intermediates, now, revocation, eku)
    }
}

/// The anchors valid now, and the span (seconds since the epoch, inclusive) in which
/// exactly those are valid (see [`PeerTrust`]'s `current`).
fn current_anchors(
    anchors: &[TrustAnchor<'static>],
    validity: &[(i64, i64)],
) -> (Vec<TrustAnchor<'static>>, i64, i64) {
    let t = i64::try_from(crate::cluster::unix_ms() / 1000).unwrap_or(i64::MAX);
    let (mut from, mut until) = (i64::MIN, i64::MAX);
    let mut now_valid = Vec::new();
    for (a, &(nb, na)) in anchors.iter().zip(validity) {
        if nb <= t && t <= na {
            now_valid.push(a.clone());
            from = from.max(nb);
            until = until.min(na);
        } else if na < t {
            from = from.max(na.saturating_add(1));
        } else {
            until = until.min(nb.saturating_sub(1));
        }
    }
    (now_valid, from, until)
}

/// Whose a presented chain is: the partners that list one of its identities **and** whose
/// roots it leads to (revocation aside — two partners sharing a CA must not be told apart by
/// their CRL settings). More than one: nobody's (ambiguous).
fn owners<'p>(
    partners: &'p [Arc<PeerTrust>],
    algs: &WebPkiSupportedAlgorithms,
    ids: &[Identity],
    ee: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Vec<&'p Arc<PeerTrust>> {
    partners
        .iter()
        .filter(|p| {
            p.trusts_chain(ids, ee, intermediates) && p.reaches_roots(algs, ee, intermediates, now)
        })
        .collect()
}

/// The partner a verified client chain belongs to: the one partner that lists one of its
/// identities and whose roots lead to it, if its full checks (CRLs included) pass — never a
/// partner that merely lists a name it presents. `None` when no partner, or more than one,
/// qualifies (the verifier refused those handshakes already).
pub fn partner_of_chain(
    partners: &[Arc<PeerTrust>],
    algs: &WebPkiSupportedAlgorithms,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
) -> Option<String> {
    let (ee, intermediates) = chain.split_first()?;
    let mut ids = summarize(ee.as_ref())?.identities;
    within_name_constraints(&mut ids, &linked(ee, intermediates));
    match owners(partners, algs, &ids, ee, intermediates, now).as_slice() {
        [p] if p.verify_chain(algs, ee, intermediates, now).is_ok() => Some(p.name.clone()),
        _ => None,
    }
}

/// The end entity's summary (what it presents, for log lines) and its identities limited
/// to what the presented CA certificates' name constraints allow
/// ([`within_name_constraints`]: what is matched).
fn chain_summary(
    ee: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> (CertSummary, Vec<Identity>) {
    let s = summarize(ee.as_ref()).unwrap_or_default();
    let mut ids = s.identities.clone();
    within_name_constraints(&mut ids, &linked(ee, intermediates));
    (s, ids)
}

/// Drops the identities that a presented CA certificate's dNSName name constraints (RFC 5280
/// §4.2.1.10) do not allow. webpki holds a chain's dNSName SANs to them (a violation fails
/// the chain) but not a `sip:` URI's host or a CN, which are identities here (RFC 5922): a
/// carrier's sub-CA limited to `carrier-a.example` under a root that federation partners
/// share could otherwise issue `sip:carrier-b.example` and pass as partner B. A CA
/// certificate whose constraints cannot be read keeps only the dNSName identities.
pub fn within_name_constraints(ids: &mut Vec<Identity>, intermediates: &[CertificateDer<'_>]) {
    constrain(ids, intermediates, false);
}

/// [`within_name_constraints`]; `users`: the identities are the domains of user AORs (a
/// phone's `sip:user@domain`), which a zero-length excluded dNSName — the usual mark of a
/// CA that issues no DNS names, such as one for phones only — does not exclude.
fn constrain(ids: &mut Vec<Identity>, intermediates: &[CertificateDer<'_>], users: bool) {
    use x509_parser::extensions::GeneralName;
    /// The nameConstraints extension's OID (2.5.29.30) as DER: a certificate without these
    /// bytes has no constraints, and is not parsed.
    const NAME_CONSTRAINTS_OID: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x1e];
    for ca in intermediates {
        if !ca
            .as_ref()
            .windows(NAME_CONSTRAINTS_OID.len())
            .any(|w| w == NAME_CONSTRAINTS_OID)
        {
            continue;
        }
        let Ok((_, x)) = x509_parser::parse_x509_certificate(ca.as_ref()) else {
            continue; // webpki refuses a chain it cannot parse
        };
        let nc = match x.name_constraints() {
            Ok(None) => continue,
            Ok(Some(nc)) => nc.value,
            Err(_) => {
                ids.retain(|i| matches!(i, Identity::Dns(_)));
                continue;
            }
        };
        let dns = |t: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>| -> Vec<String> {
            t.iter()
                .flatten()
                .filter_map(|g| match g.base {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        };
        let uri = |t: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>| -> Vec<String> {
            t.iter()
                .flatten()
                .filter_map(|g| match g.base {
                    GeneralName::URI(u) => Some(u.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        };
        let (permitted, mut excluded) = (dns(&nc.permitted_subtrees), dns(&nc.excluded_subtrees));
        let (uri_permitted, uri_excluded) =
            (uri(&nc.permitted_subtrees), uri(&nc.excluded_subtrees));
        if users {
            excluded.retain(|c| !c.is_empty() && c != ".");
        }
        // Permitted subtrees of no type a host name can be held to (IP addresses, directory
        // names only): a `sip:` URI or a CN names a host such a CA was not allowed to name —
        // it was read as unconstrained, and a CA limited to addresses or URIs of its own
        // could issue a CN-only certificate for any partner's name.
        let none_for_hosts = nc
            .permitted_subtrees
            .as_ref()
            .is_some_and(|t| !t.is_empty())
            && permitted.is_empty()
            && uri_permitted.is_empty();
        ids.retain(|i| {
            let host = match i {
                Identity::Dns(h) | Identity::Sip(h) | Identity::Cn(h) => h,
            };
            let dns_ok = (permitted.is_empty()
                || permitted.iter().any(|c| in_dns_subtree(host, c)))
                && !excluded.iter().any(|c| in_dns_subtree(host, c));
            match i {
                Identity::Dns(_) => dns_ok,
                // A URI (and a CN, which has no type) is held to the URI subtrees too:
                // RFC 5280 compares a URI constraint with the URI's host.
                // (A phone's AOR domain is not held to that: a phones-only CA limited to
                // directory names or e-mail addresses proves the AORs it issues.)
                Identity::Sip(_) | Identity::Cn(_) => {
                    dns_ok
                        && (users || !none_for_hosts)
                        && (uri_permitted.is_empty()
                            || uri_permitted.iter().any(|c| in_uri_subtree(host, c)))
                        && !uri_excluded.iter().any(|c| in_uri_subtree(host, c))
                }
            }
        });
    }
}

/// RFC 5280 §4.2.1.10: a DNS name is within `subtree` when adding zero or more labels on
/// the left of `subtree` makes it (`.example.net`, as some CAs write it: one or more).
fn in_dns_subtree(host: &str, subtree: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    let subtree = subtree.strip_suffix('.').unwrap_or(subtree);
    if subtree.is_empty() {
        return true;
    }
    if subtree.starts_with('.') {
        return host.len() > subtree.len() && host.ends_with(subtree);
    }
    host == subtree
        || host
            .strip_suffix(subtree)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// RFC 5280 §4.2.1.10: a URI's host is within a URI constraint that names that host, or,
/// written with a leading period, any host below it (not the domain itself).
fn in_uri_subtree(host: &str, subtree: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    let subtree = subtree.strip_suffix('.').unwrap_or(subtree);
    if subtree.starts_with('.') {
        host.len() > subtree.len() && host.ends_with(subtree)
    } else {
        host == subtree
    }
}

/// The orders to read `crls` in: as given, then the others of [`first_reads`] (see
/// [`CrlOrders`]). One order when no issuer has two lists.
pub fn crl_orders(
    crls: &[CertificateRevocationListDer<'static>],
) -> Vec<Vec<CertificateRevocationListDer<'static>>> {
    let issuer = |c: &CertificateRevocationListDer<'_>| {
        x509_parser::parse_x509_crl(c.as_ref())
            .ok()
            .map(|(_, x)| x.issuer().as_raw().to_vec())
    };
    let issuers: Vec<Option<Vec<u8>>> = crls.iter().map(issuer).collect();
    std::iter::once(crls.to_vec())
        .chain(
            first_reads(&issuers)
                .into_iter()
                .map(|o| o.into_iter().map(|i| crls[i].clone()).collect()),
        )
        .collect()
}

/// The most orders [`first_reads`] gives (CRLs that need more — seven issuers of two lists
/// each, four of three — are read in the first 64 combinations, and the load says so: a
/// revocation only a later one reads could pass; lists split by distribution point are
/// chosen by webpki itself and lose nothing).
pub const MAX_CRL_ORDERS: usize = 64;

/// webpki reads, for each certificate of a chain, the first list that covers it. Given the
/// lists' issuers (by index; `None`: unreadable, a group of its own), the orders (by index)
/// other than the configured one that put every other combination of lists first — one per
/// issuer with several, each level of a chain reading its own issuer's — the rest after
/// them as configured. A re-keyed root whose old list comes first, above an issuing CA that
/// partitions its lists, needs the root's new list *and* the CA's full list first at once:
/// trying one issuer's lists at a time never read the full list for the end entity, and a
/// certificate it revoked passed.
pub fn first_reads(issuers: &[Option<Vec<u8>>]) -> Vec<Vec<usize>> {
    // Groups of lists by issuer, in order of first appearance; only those with several.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, who) in issuers.iter().enumerate() {
        match who.as_ref().and_then(|w| {
            groups
                .iter_mut()
                .find(|g| issuers[g[0]].as_ref() == Some(w))
        }) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups.retain(|g| g.len() > 1);
    let needed = groups
        .iter()
        .try_fold(1usize, |n, g| n.checked_mul(g.len()))
        .map_or(usize::MAX, |n| n - 1);
    if needed > MAX_CRL_ORDERS {
        tracing::warn!(
            issuers = groups.len(),
            orders = needed,
            "issuers publish several CRLs each: they are read in the first {MAX_CRL_ORDERS} \
             combinations only (a revocation only a later one reads could pass; lists split \
             by distribution point lose nothing)"
        );
    }
    let mut orders = Vec::new();
    // Odometer over the groups: choice[k] is which list of group k is read first.
    let mut choice = vec![0usize; groups.len()];
    loop {
        let mut k = 0;
        while k < groups.len() {
            choice[k] += 1;
            if choice[k] < groups[k].len() {
                break;
            }
            choice[k] = 0;
            k += 1;
        }
        if k == groups.len() || orders.len() >= MAX_CRL_ORDERS {
            return orders;
        }
        let first: Vec<usize> = groups.iter().zip(&choice).map(|(g, &c)| g[c]).collect();
        let mut o = first.clone();
        o.extend((0..issuers.len()).filter(|i| !first.contains(i)));
        orders.push(o);
    }
}

/// Client certificates against CRLs of which one issuer has several: webpki (behind rustls's
/// client verifier) reads only the first list that covers a certificate, so a CA re-keyed
/// under its name (one list per key: read first, the other key's fails the chain) or one
/// that partitions its lists (a full one and one for end entities: only one may list a
/// certificate) needs each such list read first in turn. One verifier per order of
/// [`crl_orders`]; a certificate any of them finds revoked is revoked (rustls reports
/// `Revoked` only from a list whose signature and expiry passed), else a pass stands, else
/// the first answer that is not a list's bad signature. Then a chain whose roots of that
/// name have all lapsed (or are not yet valid) is refused: webpki keeps no anchor's
/// validity, and an expired `tls.client_roots` CA went on authenticating phones (a
/// certificate proving an AOR skips digest). While a root is out of date, the chain is
/// built again on the roots that hold ([`RootValidity`]). The client verifier, whatever the
/// CRLs.
#[derive(Debug)]
pub struct CrlOrders {
    /// One verifier per order of [`crl_orders`] (one when no issuer has two lists).
    pub orders: Vec<Arc<dyn ClientCertVerifier>>,
    /// The roots' validity.
    pub roots: RootValidity,
    /// The CRLs of each order of `orders`, parsed (empty where none is configured): a
    /// chain built again on the roots that hold is read against them, as the verifier
    /// read the chain it built.
    pub crls: Arc<[Vec<CertRevocationList<'static>>]>,
    /// Signature algorithms, to build a chain again on the roots that hold.
    pub algs: WebPkiSupportedAlgorithms,
}

impl CrlOrders {
    fn combine(
        &self,
        verify: impl Fn(&dyn ClientCertVerifier) -> Result<ClientCertVerified, Error>,
    ) -> Result<ClientCertVerified, Error> {
        let signature = |r: &Result<ClientCertVerified, Error>| {
            matches!(
                r,
                Err(Error::InvalidCertificate(CertificateError::BadSignature)
                    | Error::InvalidCertRevocationList(
                        rustls::CertRevocationListError::BadSignature
                    ))
            )
        };
        let revoked = |r: &Result<ClientCertVerified, Error>| {
            matches!(r, Err(Error::InvalidCertificate(CertificateError::Revoked)))
        };
        let first = verify(self.orders[0].as_ref());
        let unanchored = matches!(
            first,
            Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
        );
        if self.orders.len() == 1 || revoked(&first) || unanchored {
            return first;
        }
        let (mut passed, mut other) = (first.is_ok(), None);
        for v in &self.orders[1..] {
            match verify(v.as_ref()) {
                r if revoked(&r) => return r,
                Ok(_) => passed = true,
                r if signature(&r) => {}
                r => {
                    other.get_or_insert(r);
                }
            }
        }
        match (passed, other) {
            (true, _) => Ok(ClientCertVerified::assertion()),
            (false, Some(r)) if signature(&first) => r,
            _ => first,
        }
    }
}

/// Roots by subject with their validity (notBefore, notAfter; seconds since the epoch).
#[derive(Debug, Clone, Default)]
pub struct RootValidity(Arc<[Root]>, Arc<(Vec<TrustAnchor<'static>>, i64, i64)>);

/// One root of [`RootValidity`]: its subject, notBefore and notAfter (Unix seconds), and the
/// anchor it makes.
type Root = (Vec<u8>, i64, i64, TrustAnchor<'static>);

impl RootValidity {
    /// Of these roots (one that does not parse is left out: webpki refuses it anyway).
    pub fn of(roots: &[CertificateDer<'_>]) -> RootValidity {
        let all: Arc<[Root]> = roots
            .iter()
            .filter_map(|r| {
                let (_, x) = x509_parser::parse_x509_certificate(r.as_ref()).ok()?;
                let anchor = webpki::anchor_from_trusted_cert(r).ok()?.to_owned();
                let v = x.validity();
                Some((
                    x.subject().as_raw().to_vec(),
                    v.not_before.timestamp(),
                    v.not_after.timestamp(),
                    anchor,
                ))
            })
            .collect();
        // The roots that hold now, and for how long that set stands: built again only
        // outside that span (an expired root left in the bundle turned the check on for
        // every handshake).
        let anchors: Vec<TrustAnchor<'static>> = all.iter().map(|r| r.3.clone()).collect();
        let validity: Vec<(i64, i64)> = all.iter().map(|r| (r.1, r.2)).collect();
        let current = current_anchors(&anchors, &validity);
        RootValidity(all, Arc::new(current))
    }

    /// Every root's notAfter, sorted, once each.
    pub fn expiries(&self) -> Vec<i64> {
        let mut e: Vec<i64> = self.0.iter().map(|r| r.2).collect();
        e.sort_unstable();
        e.dedup();
        e
    }

    /// Does a chain the verifier passed lead to a root that holds at `now`? Every root
    /// holding, yes (the verifier found its anchor among them); else the chain is built
    /// again on the roots that hold alone. Before, the root was taken to be the one named
    /// by the presented chain's top issuer: a phone could append any certificate to hide a
    /// lapsed root, a root re-keyed under its old name passed for the old key, and a chain
    /// ending in a cross-signature from a lapsed root was refused though a current one
    /// anchored it. The chain built again is read against `crls` (one set per order, as
    /// [`CrlOrders`]): it may pass through certificates the verifier's path did not (a
    /// cross-signed CA that only the current root's list revokes), and was read against
    /// none. Revoked in any order is revoked; else passed in any is passed.
    fn holds(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        crls: &[Vec<CertRevocationList<'static>>],
    ) -> Result<(), CertificateError> {
        let t = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let holds = |r: &&Root| r.1 <= t && t <= r.2;
        if self.0.iter().all(|r| holds(&r)) {
            return Ok(());
        }
        let rebuilt;
        let current: &[TrustAnchor<'static>] = if (self.1.1..=self.1.2).contains(&t) {
            &self.1.0
        } else {
            rebuilt = self
                .0
                .iter()
                .filter(holds)
                .map(|r| r.3.clone())
                .collect::<Vec<_>>();
            &rebuilt
        };
        let Ok(ee) = EndEntityCert::try_from(ee) else {
            return Err(CertificateError::BadEncoding);
        };
        let none = [Vec::new()];
        let orders = if crls.is_empty() { &none[..] } else { crls };
        let (mut passed, mut other) = (false, None);
        for order in orders {
            let refs: Vec<&CertRevocationList<'_>> = order.iter().collect();
            // As the client verifier reads a chain: every certificate of it, a list past its
            // nextUpdate or a certificate no list covers refused as unknown status.
            let revocation = RevocationOptionsBuilder::new(&refs).ok().map(|b| {
                b.with_depth(RevocationCheckDepth::Chain)
                    .with_status_policy(UnknownStatusPolicy::Deny)
                    .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
                    .build()
            });
            // As the client verifier holds it: clientAuth (where a certificate names any use).
            match ee.verify_for_usage(
                algs.all,
                current,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                revocation,
                None,
            ) {
                Err(webpki::Error::CertRevoked) => return Err(CertificateError::Revoked),
                Ok(_) => passed = true,
                // A list past its nextUpdate says nothing: unknown status, as `classify` has it
                // everywhere else (it read as an expired certificate).
                Err(webpki::Error::UnknownRevocationStatus | webpki::Error::CrlExpired { .. }) => {
                    other.get_or_insert(CertificateError::UnknownRevocationStatus);
                }
                Err(_) => {
                    other.get_or_insert(CertificateError::Expired);
                }
            }
        }
        match (passed, other) {
            (true, _) => Ok(()),
            (false, other) => Err(other.unwrap_or(CertificateError::Expired)),
        }
    }
}

/// Those of `roots` with name constraints (a constrained CA given as a root; one whose
/// extensions cannot be read counts as constrained).
pub fn constrained_roots(roots: &[CertificateDer<'static>]) -> Vec<CertificateDer<'static>> {
    roots
        .iter()
        .filter(|r| match x509_parser::parse_x509_certificate(r.as_ref()) {
            Ok((_, x)) => !matches!(x.name_constraints(), Ok(None)),
            Err(_) => false,
        })
        .cloned()
        .collect()
}

/// The AORs a verified client certificate proves (its SAN `sip:user@domain` URIs), held to
/// the dNSName name constraints of the CAs of its chain — those it presented, and the
/// constrained roots (`constrained_roots`) that name one of its issuers. webpki holds a
/// URI SAN to no dNSName constraint: a tenant's sub-CA limited to `tenant-a.example` could
/// issue `sip:ceo@tenant-b.example`, and the phone passed as that user without a digest.
pub fn user_aors_within(
    chain: &[CertificateDer<'_>],
    constrained_roots: &[CertificateDer<'static>],
) -> Vec<String> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Vec::new();
    };
    let intermediates = linked(leaf, intermediates);
    let issuers = chain_issuers(leaf, &intermediates);
    let subject = |r: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(r.as_ref())
            .ok()
            .map(|(_, x)| x.subject().as_raw().to_vec())
    };
    let mut cas: Vec<CertificateDer<'_>> = intermediates.to_vec();
    cas.extend(
        constrained_roots
            .iter()
            .filter(|r| subject(r).is_some_and(|s| issuers.contains(&s)))
            .cloned(),
    );
    user_aors(leaf.as_ref())
        .into_iter()
        .filter(|aor| {
            let host = aor.rsplit_once('@').map_or("", |(_, h)| h);
            let mut probe = vec![Identity::Sip(host.to_string())];
            constrain(&mut probe, &cas, true);
            !probe.is_empty()
        })
        .collect()
}

impl ClientCertVerifier for CrlOrders {
    fn offer_client_auth(&self) -> bool {
        self.orders[0].offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.orders[0].client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.orders[0].root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        if let Some(e) = too_long(ee, intermediates) {
            return Err(e);
        }
        let ok = self.combine(|v| v.verify_client_cert(ee, intermediates, now))?;
        self.roots
            .holds(&self.algs, ee, intermediates, now, &self.crls)
            .map_err(Error::InvalidCertificate)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.orders[0].verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.orders[0].verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.orders[0].supported_verify_schemes()
    }
}

/// Verifies federation peers connecting to an `mtls` listener.
#[derive(Debug)]
pub struct PeerClientVerifier {
    peers: Arc<[Arc<PeerTrust>]>,
    hints: Vec<DistinguishedName>,
    algs: WebPkiSupportedAlgorithms,
}

impl PeerClientVerifier {
    /// A verifier over all partners; `hints`: whether the CertificateRequest names their root
    /// CAs (`tls.partner_ca_hints`).
    pub fn new(peers: Arc<[Arc<PeerTrust>]>, algs: WebPkiSupportedAlgorithms, hints: bool) -> Self {
        let hints = match hints {
            true => peers
                .iter()
                .flat_map(|p| p.subjects.iter().cloned())
                .collect(),
            false => Vec::new(),
        };
        PeerClientVerifier { peers, hints, algs }
    }
}

impl ClientCertVerifier for PeerClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        if let Some(e) = too_long(ee, intermediates) {
            return Err(e);
        }
        let (summary, ids) = chain_summary(ee, intermediates);
        let candidates: Vec<&Arc<PeerTrust>> = self
            .peers
            .iter()
            .filter(|p| p.trusts_chain(&ids, ee, intermediates))
            .collect();
        if candidates.is_empty() {
            return Err(reject(
                Rejection::NameNotTrusted,
                summary,
                None,
                "no partner lists this identity",
            ));
        }
        let owners = owners(&self.peers, &self.algs, &ids, ee, intermediates, now);
        match owners.as_slice() {
            // Its partner: now its full checks (CRLs, their freshness).
            [p] => {
                return match p.verify_chain(&self.algs, ee, intermediates, now) {
                    Ok(()) => Ok(ClientCertVerified::assertion()),
                    Err(e) => Err(reject(classify(&e), summary, Some(&p.name), e.to_string())),
                };
            }
            [] => {}
            several => {
                // Two partners list its names and trust its root (a shared CA): whose
                // connection it is cannot be told, so it is nobody's — whatever their CRLs.
                let names: Vec<&str> = several.iter().map(|p| p.name.as_str()).collect();
                return Err(reject(
                    Rejection::NameNotTrusted,
                    summary,
                    None,
                    format!(
                        "ambiguous: names and roots of several partners ({})",
                        names.join(", ")
                    ),
                ));
            }
        }
        // No partner that lists it is reached by its chain: say why, for the first of them.
        let p = candidates[0];
        let e = match p.verify_chain(&self.algs, ee, intermediates, now) {
            Err(e) => e,
            Ok(()) => webpki::Error::UnknownIssuer,
        };
        let peer = p.name.clone();
        let mut reason = classify(&e);
        if reason == Rejection::UnknownIssuer {
            let issuers = chain_issuers(ee, intermediates);
            if self
                .peers
                .iter()
                .any(|p| !candidates.iter().any(|c| Arc::ptr_eq(c, p)) && p.roots_named(&issuers))
            {
                reason = Rejection::WrongPartnerRoot;
            }
        }
        Err(reject(reason, summary, Some(&peer), e.to_string()))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies a partner's server when we connect to it: its partner roots, and the name we
/// meant to reach, which must also be on its trusted-server list.
#[derive(Debug)]
pub struct PeerServerVerifier {
    peer: Arc<PeerTrust>,
    all: Arc<[Arc<PeerTrust>]>,
    algs: WebPkiSupportedAlgorithms,
}

impl PeerServerVerifier {
    /// A verifier for one partner (`all` partners are consulted only to tell a wrong
    /// partner's root from an unknown one).
    pub fn new(
        peer: Arc<PeerTrust>,
        all: Arc<[Arc<PeerTrust>]>,
        algs: WebPkiSupportedAlgorithms,
    ) -> Self {
        PeerServerVerifier { peer, all, algs }
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if let Some(e) = too_long(ee, intermediates) {
            return Err(e);
        }
        let (summary, ids) = chain_summary(ee, intermediates);
        let p = &self.peer;
        if let Err(e) = p.verify_server_chain(&self.algs, ee, intermediates, now) {
            let mut reason = classify(&e);
            if reason == Rejection::UnknownIssuer {
                let issuers = chain_issuers(ee, intermediates);
                if self
                    .all
                    .iter()
                    .any(|o| !Arc::ptr_eq(o, p) && o.roots_named(&issuers))
                {
                    reason = Rejection::WrongPartnerRoot;
                }
            }
            return Err(reject(reason, summary, Some(&p.name), e.to_string()));
        }
        let wanted = server_name.to_str();
        let ids = p.ids_within(&ids, ee, intermediates);
        let named: Vec<&Identity> = ids
            .iter()
            .filter(|i| i.matches(&wanted, p.allow_wildcards))
            .collect();
        if named.is_empty() {
            return Err(reject(
                Rejection::NameMismatch,
                summary,
                Some(&p.name),
                format!("expected {wanted}"),
            ));
        }
        // The identity that names the server we dialled must itself be trusted (another
        // name on the same certificate does not make it so).
        if !named.iter().any(|i| p.trusts_one(i)) {
            return Err(reject(
                Rejection::NameNotTrusted,
                summary,
                Some(&p.name),
                "not on the partner's trusted-server list",
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_combination_of_first_lists_is_an_order() {
        let (r, i) = (Some(b"R".to_vec()), Some(b"I".to_vec()));
        // Root lists 0 and 2, issuing CA's 1 and 3; 4 unreadable.
        let orders = first_reads(&[r.clone(), i.clone(), r.clone(), i.clone(), None]);
        assert_eq!(
            orders,
            [
                vec![2, 1, 0, 3, 4],
                vec![0, 3, 1, 2, 4],
                vec![2, 3, 0, 1, 4]
            ]
        );
        assert!(first_reads(&[r, i, None, None]).is_empty());
        let many: Vec<_> = (0..14).map(|n| Some(vec![n / 2])).collect();
        assert_eq!(first_reads(&many).len(), MAX_CRL_ORDERS);
    }

    #[test]
    fn wildcards_only_when_allowed_and_one_label() {
        assert!(name_matches("SIP.Example.NET", "sip.example.net", false));
        assert!(!name_matches("*.example.net", "sip.example.net", false));
        assert!(name_matches("*.example.net", "sip.example.net", true));
        assert!(!name_matches("*.example.net", "a.sip.example.net", true));
        assert!(!name_matches("*.net", "example.net", true));
        assert!(!name_matches("*.example.net", "example.net", true));
        // What a certificate says is logged without its control characters.
        assert_eq!(
            Identity::Cn("a\nWARN forged".into()).to_string(),
            "CN=a\\nWARN forged"
        );
        // A `*` is never a character that matches itself.
        assert!(!name_matches("*.example.net", "*.example.net", false));
        assert!(!name_matches("*.example.net", "*.example.net", true));
        // One trailing dot (an absolute name) on either side does not count.
        assert!(name_matches("sip.example.net.", "sip.example.net", false));
        assert!(name_matches("sip.example.net", "SIP.example.net.", false));
        assert!(!name_matches("sip.example.net..", "sip.example.net", false));
        // Wildcards only in dNSNames (RFC 5922 §7.2).
        let wanted = "sip.example.net";
        assert!(Identity::Dns("*.example.net".into()).matches(wanted, true));
        assert!(!Identity::Sip("*.example.net".into()).matches(wanted, true));
        assert!(!Identity::Cn("*.example.net".into()).matches(wanted, true));
        assert!(Identity::Sip("sip.example.net".into()).matches(wanted, false));
    }

    #[test]
    fn dns_name_constraints_by_labels_not_by_characters() {
        assert!(in_dns_subtree("alpha.example", "alpha.example"));
        assert!(in_dns_subtree("sip.alpha.example", "alpha.example"));
        assert!(in_dns_subtree("sip.alpha.example.", "alpha.example"));
        assert!(!in_dns_subtree("evilalpha.example", "alpha.example"));
        assert!(!in_dns_subtree("alpha.example.net", "alpha.example"));
        assert!(in_dns_subtree("sip.alpha.example", ".alpha.example"));
        assert!(!in_dns_subtree("alpha.example", ".alpha.example"));
        assert!(in_dns_subtree("anything", ""));
    }
}
