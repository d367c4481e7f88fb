//! Throwaway PKIs (rcgen) for `sipring certs`, the demo and the tests: CAs, server, peer and
//! client certificates with SIP identities (RFC 5922 SAN URIs), and CRLs.
//!
//! Not for production: keys are generated in memory and written unencrypted.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use std::path::Path;
use time::{Duration, OffsetDateTime};

/// What a certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// serverAuth and clientAuth.
    Both,
    /// serverAuth only (what public CAs issue since 2026).
    ServerOnly,
    /// clientAuth only.
    ClientOnly,
    /// Neither (codeSigning): must be refused for TLS.
    CodeSigning,
    /// id-kp-sipDomain only (RFC 5924): a SIP domain certificate.
    SipDomain,
    /// anyExtendedKeyUsage only.
    Any,
}

/// How to issue one certificate.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Subject CN.
    pub cn: String,
    /// SAN dNSNames.
    pub dns: Vec<String>,
    /// SAN URIs (e.g. `sip:example.com`).
    pub uris: Vec<String>,
    /// SAN IP addresses.
    pub ips: Vec<std::net::IpAddr>,
    /// EKU.
    pub usage: Usage,
    /// Valid from now + this (negative: in the past).
    pub valid_from: Duration,
    /// Valid until now + this.
    pub valid_until: Duration,
    /// Key algorithm: ECDSA P-256 (`false`) or RSA-2048 (`true`).
    pub rsa: bool,
}

impl Spec {
    /// A server/peer certificate for `name` (DNS and `sip:` URI SANs), valid for a year.
    pub fn server(name: &str) -> Spec {
        Spec {
            cn: name.into(),
            dns: vec![name.into()],
            uris: vec![format!("sip:{name}")],
            ips: Vec::new(),
            usage: Usage::Both,
            valid_from: Duration::days(-1),
            valid_until: Duration::days(365),
            rsa: false,
        }
    }
}

/// An issued certificate and its key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM (PKCS#8).
    pub key_pem: String,
    /// Certificate DER.
    pub der: CertificateDer<'static>,
    /// Serial number.
    pub serial: u64,
}

/// A certificate authority that can issue certificates and CRLs.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    params: CertificateParams,
    /// The CA certificate.
    pub cert: Issued,
    next_serial: std::cell::Cell<u64>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("serial", &self.cert.serial)
            .finish()
    }
}

fn err(e: rcgen::Error) -> String {
    format!("certificate generation failed: {e}")
}

impl Ca {
    /// A new self-signed root CA named `name`, valid for ten years.
    pub fn new(name: &str) -> Result<Ca, String> {
        Ca::create(name, Duration::days(3650), None, Vec::new())
    }

    /// A self-signed root CA valid from two days ago until `valid` from now (negative: one
    /// that has expired), as tests of a lapsed root need.
    pub fn with_validity(name: &str, valid: Duration) -> Result<Ca, String> {
        Ca::create(name, valid, None, Vec::new())
    }

    /// A CA named `name` under this one (an intermediate: its certificate is issued, and can
    /// be revoked, by this CA), valid for five years.
    pub fn intermediate(&self, name: &str) -> Result<Ca, String> {
        Ca::create(name, Duration::days(1825), Some(self), Vec::new())
    }

    /// An intermediate CA allowed to issue only names under these DNS domains (a
    /// nameConstraints extension with permitted dNSName subtrees), as a federation's root
    /// gives each carrier's sub-CA.
    pub fn constrained_intermediate(&self, name: &str, dns: &[&str]) -> Result<Ca, String> {
        let permitted = dns
            .iter()
            .map(|d| rcgen::GeneralSubtree::DnsName(d.to_string()))
            .collect::<Vec<_>>();
        Ca::create(name, Duration::days(1825), Some(self), permitted)
    }

    /// An intermediate CA whose permitted subtrees are these, of any type (an IP address
    /// range, a directory name: constraints a host name cannot be held to).
    pub fn constrained_intermediate_with(
        &self,
        name: &str,
        permitted: Vec<rcgen::GeneralSubtree>,
    ) -> Result<Ca, String> {
        Ca::create(name, Duration::days(1825), Some(self), permitted)
    }

    /// A CA certificate and key: self-signed (serial 1), or issued by `parent`; limited to
    /// the subtrees `permitted` when not empty.
    fn create(
        name: &str,
        valid: Duration,
        parent: Option<&Ca>,
        permitted: Vec<rcgen::GeneralSubtree>,
    ) -> Result<Ca, String> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        if !permitted.is_empty() {
            p.name_constraints = Some(rcgen::NameConstraints {
                permitted_subtrees: permitted,
                excluded_subtrees: Vec::new(),
            });
        }
        p.distinguished_name.push(DnType::CommonName, name);
        p.distinguished_name
            .push(DnType::OrganizationName, "sipring test PKI");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::days(2);
        p.not_after = now + valid;
        let serial = parent.map_or(1, |ca| {
            let s = ca.next_serial.get();
            ca.next_serial.set(s + 1);
            s
        });
        p.serial_number = Some(SerialNumber::from(serial));
        p.use_authority_key_identifier_extension = parent.is_some();
        let key = KeyPair::generate().map_err(err)?;
        let cert = match parent {
            Some(ca) => p.signed_by(&key, &ca.issuer),
            None => p.self_signed(&key),
        }
        .map_err(err)?;
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            serial,
        };
        Ok(Ca {
            issuer: Issuer::new(p.clone(), key),
            params: p,
            cert: issued,
            next_serial: std::cell::Cell::new(2),
        })
    }

    /// This CA's certificate issued again by `other` (a cross-signature: the same name and
    /// key, another issuer), valid as this one is.
    pub fn cross_signed_by(&self, other: &Ca) -> Result<Issued, String> {
        let mut p = self.params.clone();
        let serial = other.next_serial.get();
        other.next_serial.set(serial + 1);
        p.serial_number = Some(SerialNumber::from(serial));
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(self.issuer.key(), &other.issuer).map_err(err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: self.cert.key_pem.clone(),
            der: cert.der().clone(),
            serial,
        })
    }

    /// Issues a certificate.
    pub fn issue(&self, spec: &Spec) -> Result<Issued, String> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        p.distinguished_name
            .push(DnType::CommonName, spec.cn.as_str());
        for d in &spec.dns {
            p.subject_alt_names
                .push(SanType::DnsName(d.clone().try_into().map_err(err)?));
        }
        for u in &spec.uris {
            p.subject_alt_names
                .push(SanType::URI(u.clone().try_into().map_err(err)?));
        }
        for ip in &spec.ips {
            p.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        p.extended_key_usages = match spec.usage {
            Usage::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Usage::ServerOnly => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::ClientOnly => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::CodeSigning => vec![ExtendedKeyUsagePurpose::CodeSigning],
            Usage::SipDomain => vec![ExtendedKeyUsagePurpose::Other(vec![
                1, 3, 6, 1, 5, 5, 7, 3, 20,
            ])],
            Usage::Any => vec![ExtendedKeyUsagePurpose::Any],
        };
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        p.not_before = now + spec.valid_from;
        p.not_after = now + spec.valid_until;
        let serial = self.next_serial.get();
        self.next_serial.set(serial + 1);
        p.serial_number = Some(SerialNumber::from(serial));
        let key = if spec.rsa {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                .map_err(err)?
        } else {
            KeyPair::generate().map_err(err)?
        };
        let cert = p.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            serial,
        })
    }

    /// A CRL revoking these serial numbers, valid from yesterday for 30 days.
    pub fn crl(&self, revoked: &[u64]) -> Result<String, String> {
        self.crl_next_update(revoked, Duration::days(30))
    }

    /// A CRL revoking these serial numbers whose next update is `next` from now (negative:
    /// a stale CRL, for tests); issued a day before that, or yesterday.
    pub fn crl_next_update(&self, revoked: &[u64], next: Duration) -> Result<String, String> {
        let now = OffsetDateTime::now_utc();
        self.crl_issued(
            revoked,
            now - Duration::days(1) + next.min(Duration::ZERO),
            now + next,
        )
    }

    /// A CRL revoking these serial numbers, issued at `this_update` (also its CRL number, in
    /// seconds) and due again at `next_update`.
    pub fn crl_issued(
        &self,
        revoked: &[u64],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, String> {
        self.crl_scoped(revoked, this_update, next_update, None)
    }

    /// A partitioned CRL, as a CA that splits its lists publishes: an issuing distribution
    /// point at `uri` covering end-entity certificates only, valid from yesterday for 30 days.
    pub fn crl_for_end_entities(&self, revoked: &[u64], uri: &str) -> Result<String, String> {
        let now = OffsetDateTime::now_utc();
        self.crl_scoped(
            revoked,
            now - Duration::days(1),
            now + Duration::days(30),
            Some(rcgen::CrlIssuingDistributionPoint {
                distribution_point: rcgen::CrlDistributionPoint {
                    uris: vec![uri.into()],
                },
                scope: Some(rcgen::CrlScope::UserCertsOnly),
            }),
        )
    }

    /// The key identifier of this CA's key, as its certificates and CRLs name it.
    pub fn key_id(&self) -> Vec<u8> {
        self.params.key_identifier(self.issuer.key())
    }

    /// A CRL this CA signs while claiming the authority key identifier `key_id` (another
    /// CA's of the same name): a forged list, as tests of a tampered CRL fetch need.
    pub fn crl_claiming(
        &self,
        revoked: &[u64],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
        key_id: Vec<u8>,
    ) -> Result<String, String> {
        self.crl_with(
            revoked,
            this_update,
            next_update,
            None,
            KeyIdMethod::PreSpecified(key_id),
        )
    }

    fn crl_scoped(
        &self,
        revoked: &[u64],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
        issuing_distribution_point: Option<rcgen::CrlIssuingDistributionPoint>,
    ) -> Result<String, String> {
        self.crl_with(
            revoked,
            this_update,
            next_update,
            issuing_distribution_point,
            KeyIdMethod::Sha256,
        )
    }

    fn crl_with(
        &self,
        revoked: &[u64],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
        issuing_distribution_point: Option<rcgen::CrlIssuingDistributionPoint>,
        key_identifier_method: KeyIdMethod,
    ) -> Result<String, String> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(this_update.unix_timestamp().max(0) as u64),
            issuing_distribution_point,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - Duration::hours(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method,
        };
        params
            .signed_by(&self.issuer)
            .map_err(err)?
            .pem()
            .map_err(err)
    }
}

/// Writes a demo PKI into `dir` and returns what it wrote. Files:
/// `ca.pem`/`ca.key`/`ca.crl` (our CA), `server.pem`/`server.key` (this server: `localhost`,
/// `sip.<domain>`, `127.0.0.1`, `sip:<domain>`), `client.pem`/`client.key`,
/// `partner-ca.pem`/`partner-ca.crl` and `partner.pem`/`partner.key` (a federation partner
/// with its own CA, named `sip.partner.<domain>`), and `revoked.pem`/`revoked.key` (revoked
/// in `ca.crl`).
pub fn write_demo(dir: &Path, domain: &str) -> Result<Vec<String>, String> {
    write_demo_with_nodes(dir, domain, &[])
}

/// [`write_demo`], plus for each cluster node `n` of `nodes` a `<n>.pem` (chain) and
/// `<n>.key` from the demo CA, whose SANs are `<n>.<domain>` (the identity the topology
/// lists) and `sip.<domain>` (what clients ask for).
pub fn write_demo_with_nodes(
    dir: &Path,
    domain: &str,
    nodes: &[String],
) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca = Ca::new("sipring demo CA")?;
    let partner_ca = Ca::new("sipring demo partner CA")?;
    let mut server = Spec::server(&format!("sip.{domain}"));
    server.dns.push("localhost".into());
    server.uris.push(format!("sip:{domain}"));
    server.ips.push([127, 0, 0, 1].into());
    let server = ca.issue(&server)?;
    let client = ca.issue(&Spec {
        usage: Usage::ClientOnly,
        ..Spec::server(&format!("client.{domain}"))
    })?;
    let partner = partner_ca.issue(&Spec::server(&format!("sip.partner.{domain}")))?;
    let revoked = ca.issue(&Spec::server(&format!("revoked.{domain}")))?;
    let mut node_files = Vec::new();
    for n in nodes {
        let mut spec = Spec::server(&format!("{n}.{domain}"));
        spec.dns.push(format!("sip.{domain}"));
        let c = ca.issue(&spec)?;
        node_files.push((
            format!("{n}.pem"),
            format!("{}{}", c.cert_pem, ca.cert.cert_pem),
        ));
        node_files.push((format!("{n}.key"), c.key_pem));
    }
    let files: Vec<(&str, String)> = vec![
        ("ca.pem", ca.cert.cert_pem.clone()),
        ("ca.key", ca.cert.key_pem.clone()),
        ("ca.crl", ca.crl(&[revoked.serial])?),
        (
            "server.pem",
            format!("{}{}", server.cert_pem, ca.cert.cert_pem),
        ),
        ("server.key", server.key_pem),
        ("client.pem", client.cert_pem.clone()),
        ("client.key", client.key_pem),
        ("partner-ca.pem", partner_ca.cert.cert_pem.clone()),
        ("partner-ca.key", partner_ca.cert.key_pem.clone()),
        ("partner-ca.crl", partner_ca.crl(&[])?),
        ("partner.pem", partner.cert_pem.clone()),
        ("partner.key", partner.key_pem),
        ("revoked.pem", revoked.cert_pem.clone()),
        ("revoked.key", revoked.key_pem),
    ];
    let mut written = Vec::new();
    let all = files
        .into_iter()
        .map(|(n, c)| (n.to_string(), c))
        .chain(node_files);
    for (name, content) in all {
        let path = dir.join(&name);
        std::fs::write(&path, content).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}
