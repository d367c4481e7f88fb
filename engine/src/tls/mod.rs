//! The TLS policy layer: loading certificates, keys, roots and CRLs; building rustls
//! configurations for client listeners (`tls`), peer listeners (`mtls`) and outbound peer
//! connections; classifying and counting every rejection.
//!
//! ```text
//!   Config ──► TlsPolicy::load ──► Arc<TlsPolicy> ──(ArcSwap, reload)──► every shard
//!                 │                    ├─ clients:  ServerConfig (SNI resolver, optional client auth)
//!                 │                    ├─ peers:    ServerConfig (PeerClientVerifier: per-partner roots)
//!                 │                    └─ outbound: ClientConfig per partner (PeerServerVerifier, our chain, SNI)
//!                 └─ any broken file: Err(TlsLoadError { file, reason }) and the old policy stays
//! ```
//!
//! Reload builds a complete new [`TlsPolicy`] first and swaps it in only if every file
//! loaded; handshakes already running keep the configuration they started with.

pub mod pki;
pub use sipring_net::Rejection;
/// The TLS session the server and the load generator share (`sipring-net`).
pub use sipring_net::session;
pub use sipring_net::suites::{cipher_suite, kx_group};
pub mod verify;

use crate::config::{ClientAuth, Config, ListenKind};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use verify::{PeerClientVerifier, PeerServerVerifier, PeerTrust, Rejected};

/// Classifies a rustls error, returning our detailed rejection when our verifier made it
/// (carried inside `CertificateError::Other`), else what rustls says ([`Rejection::of`]).
pub fn classify(e: &rustls::Error) -> (Rejection, Option<Rejected>) {
    if let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) = e {
        return match o.0.downcast_ref::<Rejected>() {
            Some(r) => (r.reason, Some(r.clone())),
            None => (Rejection::BadCertificate, None),
        };
    }
    (Rejection::of(e), None)
}

/// Rejection counters shared by all shards (relaxed atomics: no lock on any path).
#[derive(Debug, Default)]
pub struct RejectCounters {
    counts: [AtomicU64; 17],
}

impl RejectCounters {
    /// Counts one rejection.
    pub fn inc(&self, r: Rejection) {
        let i = Rejection::ALL.iter().position(|x| *x == r).expect("listed");
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Current value for one reason.
    pub fn get(&self, r: Rejection) -> u64 {
        let i = Rejection::ALL.iter().position(|x| *x == r).expect("listed");
        self.counts[i].load(Ordering::Relaxed)
    }
}

/// A file that could not be loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsLoadError {
    /// The file (or config key when no file is involved).
    pub file: PathBuf,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for TlsLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.reason)
    }
}

impl std::error::Error for TlsLoadError {}

fn load_err(file: &Path, reason: impl Into<String>) -> TlsLoadError {
    TlsLoadError {
        file: file.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a PEM certificate chain (leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsLoadError> {
    let data = std::fs::read(path).map_err(|e| load_err(path, format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load_err(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(load_err(path, "no CERTIFICATE block"));
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| load_err(path, format!("bad certificate: {e}")))?;
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsLoadError> {
    let data = std::fs::read(path).map_err(|e| load_err(path, format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&data)
        .map_err(|e| load_err(path, format!("no usable private key: {e}")))
}

/// Reads CRLs, PEM (`X509 CRL` blocks) or a single DER CRL.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsLoadError> {
    let data = std::fs::read(path).map_err(|e| load_err(path, format!("cannot read: {e}")))?;
    let pem: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| load_err(path, format!("bad PEM: {e}")))?;
    let crls = if pem.is_empty() {
        vec![CertificateRevocationListDer::from(data)]
    } else {
        pem
    };
    for c in &crls {
        webpki::OwnedCertRevocationList::from_der(c.as_ref())
            .map_err(|e| load_err(path, format!("bad CRL: {e}")))?;
    }
    Ok(crls)
}

/// The roots and CRLs one policy load reads, each file read once: what the policy enforces
/// and what it reports (CRL due dates, root expiries) come from the same bytes, even while
/// a job replaces the files.
#[derive(Default)]
struct Reads {
    certs: HashMap<PathBuf, Vec<CertificateDer<'static>>>,
    crls: HashMap<PathBuf, Vec<CertificateRevocationListDer<'static>>>,
}

impl Reads {
    fn certs(&mut self, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsLoadError> {
        if let Some(c) = self.certs.get(path) {
            return Ok(c.clone());
        }
        let c = load_certs(path)?;
        self.certs.insert(path.to_path_buf(), c.clone());
        Ok(c)
    }

    fn crls(
        &mut self,
        path: &Path,
    ) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsLoadError> {
        if let Some(c) = self.crls.get(path) {
            return Ok(c.clone());
        }
        let c = load_crls(path)?;
        self.crls.insert(path.to_path_buf(), c.clone());
        Ok(c)
    }
}

/// A CRL file the configuration names, and when the CRLs of it that are in use fall due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlDue {
    /// The file.
    pub file: PathBuf,
    /// The earliest nextUpdate (unix seconds) among its CRLs that the verifier uses (the
    /// newest per issuer over the scope's files: an older one a job left in the file is not
    /// read); `None`: none in use, or none with a nextUpdate.
    pub next: Option<i64>,
    /// Whether a scope using it refuses unknown status (`unknown_revocation = "deny"`, and
    /// clients' CRLs): past its nextUpdate, what it covers is refused, live connections at
    /// the next reload. Otherwise a stale CRL is still read.
    pub enforced: bool,
}

/// Every CRL file the configuration names (partners', clients', the cluster's), with when
/// its CRLs in use fall due ([`CrlDue`]). Files that do not load are left out (the policy
/// load names them).
pub fn crl_next_updates(cfg: &Config) -> Vec<CrlDue> {
    crl_dues_of(cfg, &mut Reads::default())
}

/// [`crl_next_updates`], reading each file through `reads` (one that does not load is
/// left out).
fn crl_dues_of(cfg: &Config, reads: &mut Reads) -> Vec<CrlDue> {
    let scopes = cfg
        .peer
        .iter()
        .map(|p| {
            (
                &p.crls,
                Some(&p.roots),
                p.unknown_revocation == crate::config::UnknownRevocation::Deny,
            )
        })
        // Clients' CRLs are read only with client roots (and then always enforced).
        .chain(
            cfg.tls
                .client_roots
                .as_ref()
                .map(|r| (&cfg.tls.client_crls, Some(r), true)),
        )
        .chain(cfg.cluster.iter().map(|c| (&c.crls, Some(&c.roots), true)));
    let mut out: Vec<CrlDue> = Vec::new();
    for (files, roots, enforced) in scopes {
        let mut all: Vec<(&PathBuf, CertificateRevocationListDer<'static>)> = Vec::new();
        for f in files {
            if let Ok(crls) = reads.crls(f) {
                all.extend(crls.into_iter().map(|c| (f, c)));
            }
        }
        let issuers = roots.and_then(|r| reads.certs(r).ok()).unwrap_or_default();
        let kept = newest_crl_per_issuer(all.iter().map(|(_, c)| c.clone()).collect(), &issuers);
        for f in files {
            let next = all
                .iter()
                .filter(|(g, c)| *g == f && kept.contains(c))
                .filter_map(|(_, c)| {
                    let (_, x) = x509_parser::parse_x509_crl(c.as_ref()).ok()?;
                    Some(x.next_update()?.timestamp())
                })
                .min();
            // Enforced where this scope uses a CRL of it (a scope where a newer one in
            // another file replaced it does not read it at all).
            let enforced = enforced && next.is_some();
            match out.iter_mut().find(|d| &d.file == f) {
                Some(d) => {
                    d.enforced |= enforced;
                    d.next = match (d.next, next) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                None => out.push(CrlDue {
                    file: f.clone(),
                    next,
                    enforced,
                }),
            }
        }
    }
    out
}

/// Keeps one CRL per scope (issuer, issuing distribution point, authority key identifier),
/// the newest (latest thisUpdate, then highest CRL number): the verifier reads the first CRL
/// that covers a certificate, so an older one listed first (a file a job appends to, two
/// files of one CA) would hide what the newer one revoked. A CRL whose issuer is among
/// `issuers` (the scope's roots) and whose signature none of them verifies is dropped first,
/// with a WARN: a forged list with a later thisUpdate (a fetch over plain HTTP, tampered)
/// hid the genuine one, and every certificate of that issuer failed as a bad CRL signature.
/// Lists of issuers we do not hold (intermediates, seen only at handshakes) are ranked as
/// they are.
pub fn newest_crl_per_issuer(
    crls: Vec<CertificateRevocationListDer<'static>>,
    issuers: &[CertificateDer<'_>],
) -> Vec<CertificateRevocationListDer<'static>> {
    let crls: Vec<_> = crls
        .into_iter()
        .filter(|c| match verify::crl_signed_by_known_issuer(c, issuers) {
            Some(false) => {
                tracing::warn!(
                    "a CRL that names a root we hold as its issuer is not signed by it: \
                     ignored (a tampered or corrupt list; the root's genuine one is used)"
                );
                false
            }
            _ => true,
        })
        .collect();
    /// A CRL's issuer (raw DER name) and rank: thisUpdate, then CRL number (as a big-endian
    /// integer: longer is larger). `None` when x509-parser cannot read it (webpki did).
    type Rank = (i64, usize, Vec<u8>);
    type Kept = (
        Option<(Vec<u8>, Rank)>,
        CertificateRevocationListDer<'static>,
    );
    fn key(c: &CertificateRevocationListDer<'_>) -> Option<(Vec<u8>, Rank, String)> {
        let (_, x) = x509_parser::parse_x509_crl(c.as_ref()).ok()?;
        let number = x.crl_number().map(|n| n.to_bytes_be()).unwrap_or_default();
        // Its scope: the issuer, and the issuing distribution point and authority key
        // identifier when present — a CA's CRL for CAs and its CRL for users, partitioned
        // CRLs, or a re-keyed CA under the same name are different lists, all kept.
        let mut scope = x.issuer().as_raw().to_vec();
        for e in x.extensions() {
            if matches!(e.oid.to_id_string().as_str(), "2.5.29.28" | "2.5.29.35") {
                scope.extend_from_slice(&(e.value.len() as u32).to_be_bytes());
                scope.extend_from_slice(e.value);
            }
        }
        Some((
            scope,
            (x.last_update().timestamp(), number.len(), number),
            x.issuer().to_string(),
        ))
    }
    let mut kept: Vec<Kept> = Vec::new();
    for c in crls {
        let Some((issuer, rank, name)) = key(&c) else {
            kept.push((None, c));
            continue;
        };
        match kept
            .iter_mut()
            .find(|(k, _)| k.as_ref().is_some_and(|(i, _)| *i == issuer))
        {
            Some(slot) => {
                let newer = slot.0.as_ref().is_some_and(|(_, r)| rank > *r);
                tracing::info!(issuer = %name, "two CRLs of one issuer: only the newest is used");
                if newer {
                    *slot = (Some((issuer, rank)), c);
                }
            }
            None => kept.push((Some((issuer, rank)), c)),
        }
    }
    kept.into_iter().map(|(_, c)| c).collect()
}

/// Client CRLs are checked for every certificate of a chain, an unknown status refused: when
/// an intermediate CA's CRL is configured, every client root needs its own CRL too (it says
/// whether the intermediate is revoked), or every certificate under it would be refused.
fn check_client_crls(
    roots_file: &Path,
    roots: &[CertificateDer<'_>],
    crls: &[CertificateRevocationListDer<'_>],
) -> Result<(), TlsLoadError> {
    let issuers: Vec<Vec<u8>> = crls
        .iter()
        .filter_map(|c| x509_parser::parse_x509_crl(c.as_ref()).ok())
        .map(|(_, x)| x.issuer().as_raw().to_vec())
        .collect();
    let subjects: Vec<(Vec<u8>, String)> = roots
        .iter()
        .filter_map(|r| x509_parser::parse_x509_certificate(r.as_ref()).ok())
        .map(|(_, x)| (x.subject().as_raw().to_vec(), x.subject().to_string()))
        .collect();
    let from_intermediate = issuers
        .iter()
        .any(|i| !subjects.iter().any(|(s, _)| s == i));
    if let Some((_, name)) = subjects
        .iter()
        .find(|(s, _)| from_intermediate && !issuers.contains(s))
    {
        return Err(load_err(
            roots_file,
            format!(
                "tls.client_crls: an intermediate CA's CRL is configured but not the CRL of \
                 client root \"{name}\"; every certificate of a client chain is checked, so \
                 add the root's CRL (or every client certificate under it is refused)"
            ),
        ));
    }
    Ok(())
}

/// The crypto provider the configuration asks for.
pub fn provider(cfg: &Config) -> CryptoProvider {
    let mut p = aws_lc_rs::default_provider();
    if !cfg.tls.cipher_suites.is_empty() {
        p.cipher_suites = cfg
            .tls
            .cipher_suites
            .iter()
            .filter_map(|n| cipher_suite(n))
            .collect();
    }
    if !cfg.tls.kx_groups.is_empty() {
        p.kx_groups = cfg
            .tls
            .kx_groups
            .iter()
            .filter_map(|n| kx_group(n))
            .collect();
    }
    p
}

fn versions(cfg: &Config) -> Vec<&'static SupportedProtocolVersion> {
    let mut v = Vec::new();
    if cfg.tls.versions.iter().any(|s| s == "1.3") {
        v.push(&rustls::version::TLS13);
    }
    if cfg.tls.versions.iter().any(|s| s == "1.2") {
        v.push(&rustls::version::TLS12);
    }
    v
}

/// Server certificates by SNI name, with a default.
#[derive(Debug)]
pub struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let by_sni = hello
            .server_name()
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()));
        Some(by_sni.unwrap_or(&self.default).clone())
    }
}

/// A loaded server certificate: key, chain, and facts for the doctor.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    /// The file it came from.
    pub file: PathBuf,
    /// Leaf notAfter (Unix seconds).
    pub not_after: i64,
    /// Leaf notBefore (Unix seconds).
    pub not_before: i64,
    /// Our chain (for presenting as a client to peers too).
    pub chain: Vec<CertificateDer<'static>>,
}

/// Everything TLS, built from one configuration; immutable, replaced whole on reload.
#[derive(Debug)]
pub struct TlsPolicy {
    /// For `tls` listeners.
    pub clients: Arc<ServerConfig>,
    /// For `tls` listeners with `client_auth = "optional"`.
    pub clients_cert_optional: Option<Arc<ServerConfig>>,
    /// For `tls` listeners with `client_auth = "required"`.
    pub clients_cert_required: Option<Arc<ServerConfig>>,
    /// The client-certificate verifier of `clients_cert_*`, to check again the chain a
    /// resumed session brings (rustls restores it from the ticket without verifying it).
    pub client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    /// For `mtls` listeners.
    pub peers: Option<Arc<ServerConfig>>,
    /// For connecting to each partner: its client config and the name to reach.
    pub outbound: HashMap<String, (Arc<ClientConfig>, ServerName<'static>)>,
    /// Partner trust (for lookups by name).
    pub partners: Arc<[Arc<PeerTrust>]>,
    /// The notAfter of every partner root (seconds since the epoch): a link is verified
    /// again at each, since a root that lapses anchors nothing (and a root is not presented,
    /// so a link's own chain does not say when).
    pub anchor_expiries: Arc<[i64]>,
    /// The same for `tls.client_roots`: a phone's connection is verified again at each.
    pub client_anchor_expiries: Arc<[i64]>,
    /// The `tls.client_roots` with name constraints: the AORs a phone's certificate proves
    /// are held to them ([`verify::user_aors_within`]).
    pub client_constrained_roots: Vec<CertificateDer<'static>>,
    /// The server certificates, for expiry checks.
    pub certs: Vec<LoadedCert>,
    /// When the CRLs this policy enforces fall due, from the very bytes it loaded: a job
    /// that replaces a CRL file during a reload must not have the gauge and the warnings
    /// describe another CRL than the one in force.
    pub crl_dues: Vec<CrlDue>,
    /// Signature algorithms, for re-checking a partner's chain after its handshake.
    pub algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl TlsPolicy {
    /// The server config for a listener kind (`None` for `tcp`).
    pub fn for_listener(
        &self,
        kind: ListenKind,
        client_auth: ClientAuth,
    ) -> Option<Arc<ServerConfig>> {
        match (kind, client_auth) {
            (ListenKind::Tcp, _) => None,
            (ListenKind::Tls, ClientAuth::None) => Some(self.clients.clone()),
            (ListenKind::Tls, ClientAuth::Optional) => self.clients_cert_optional.clone(),
            (ListenKind::Tls, ClientAuth::Required) => self.clients_cert_required.clone(),
            (ListenKind::Mtls, _) => self.peers.clone(),
        }
    }

    /// Is a client chain (from a resumed session) still good, verified now against the
    /// client roots and CRLs? Why not, when it is not (always refused without client roots).
    pub fn verify_client_chain(&self, chain: &[CertificateDer<'_>]) -> Result<(), Rejection> {
        let (Some(v), Some((ee, intermediates))) = (&self.client_verifier, chain.split_first())
        else {
            return Err(Rejection::UnknownIssuer);
        };
        v.verify_client_cert(ee, intermediates, rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| classify(&e).0)
    }

    /// Does an established connection's peer still pass this policy? Its chain is verified
    /// now (roots, validity, CRLs, EKU) as its handshake verified it, and a partner must
    /// still be the partner it was: run when a reload swaps a policy in and when a
    /// certificate of the chain expires. `outbound`: our own link to `principal`'s server
    /// (its certificate must still name the server we dial and be trusted). A client that
    /// presented no certificate has nothing to re-check. `Err`: why not, and a detail for
    /// the operator's log line.
    pub fn recheck(
        &self,
        principal: &sipring_core::policy::Principal,
        outbound: bool,
        chain: &[CertificateDer<'_>],
    ) -> Result<(), (Rejection, String)> {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::server::danger::ClientCertVerifier;
        let Some((ee, intermediates)) = chain.split_first() else {
            return Ok(());
        };
        let now = rustls::pki_types::UnixTime::now();
        let why = |e: rustls::Error| match classify(&e) {
            (r, Some(d)) => (r, d.detail),
            (r, None) => (r, e.to_string()),
        };
        let Some(name) = principal.partner() else {
            self.verify_client_chain(chain)
                .map_err(|r| (r, String::new()))?;
            // The AORs its certificate proved at the handshake, still proved under this
            // policy (a client root now carrying name constraints): before, they stood for
            // the connection's life.
            if let sipring_core::policy::Principal::Client { cert_aors } = principal {
                let proven = verify::user_aors_within(chain, &self.client_constrained_roots);
                if let Some(lost) = cert_aors.iter().find(|a| !proven.contains(a)) {
                    return Err((
                        Rejection::NameNotTrusted,
                        format!(
                            "its certificate no longer proves {lost} (client roots' name constraints)"
                        ),
                    ));
                }
            }
            return Ok(());
        };
        let Some(p) = self.partners.iter().find(|p| p.name == name) else {
            return Err((
                Rejection::NameNotTrusted,
                format!("partner {name} is no longer configured"),
            ));
        };
        if outbound {
            let Some((_, server_name)) = self.outbound.get(name) else {
                return Err((
                    Rejection::NameNotTrusted,
                    format!("no outbound configuration for partner {name}"),
                ));
            };
            PeerServerVerifier::new(p.clone(), self.partners.clone(), self.algs)
                .verify_server_cert(ee, intermediates, server_name, &[], now)
                .map(|_| ())
                .map_err(why)
        } else {
            PeerClientVerifier::new(self.partners.clone(), self.algs, false)
                .verify_client_cert(ee, intermediates, now)
                .map_err(why)?;
            match self.partner_of(chain) {
                Some(n) if n == name => Ok(()),
                other => Err((
                    Rejection::NameNotTrusted,
                    format!(
                        "connected as partner {name}, now {}",
                        other.as_deref().unwrap_or("nobody's")
                    ),
                )),
            }
        }
    }

    /// The partner a verified MTLS peer is: the one whose roots verified its chain and whose
    /// trusted-server list names it (`verify::partner_of_chain`).
    pub fn partner_of(&self, chain: &[CertificateDer<'_>]) -> Option<String> {
        verify::partner_of_chain(
            &self.partners,
            &self.algs,
            chain,
            rustls::pki_types::UnixTime::now(),
        )
    }

    /// Loads every file the configuration names and builds all TLS configurations. Fails
    /// on the first broken file, naming it; nothing is half-applied.
    pub fn load(cfg: &Config) -> Result<TlsPolicy, TlsLoadError> {
        let provider = Arc::new(provider(cfg));
        let algs = provider.signature_verification_algorithms;
        let versions = versions(cfg);
        let cfg_path = Path::new("(config)");

        // Server certificates.
        let mut reads = Reads::default();
        let mut certs = Vec::new();
        let mut default = None;
        let mut by_name = HashMap::new();
        let mut our_chain = None;
        for c in &cfg.tls.certificate {
            let chain = load_certs(&c.cert)?;
            let key = load_key(&c.key)?;
            let ck =
                CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|e| {
                    load_err(
                        &c.key,
                        format!("key does not match certificate or is unsupported: {e}"),
                    )
                })?;
            let ck = Arc::new(ck);
            let summary = verify::summarize(&chain[0])
                .ok_or_else(|| load_err(&c.cert, "unparseable leaf certificate"))?;
            certs.push(LoadedCert {
                file: c.cert.clone(),
                not_after: summary.not_after,
                not_before: summary.not_before,
                chain: chain.clone(),
            });
            for n in &c.sni {
                // rustls hands over the SNI without a trailing dot: `sip.example.com.`
                // written here matched nothing, and the default certificate went out.
                let n = n.trim_end_matches('.').to_ascii_lowercase();
                by_name.insert(n, ck.clone());
            }
            if default.is_none() {
                default = Some(ck);
                our_chain = Some((chain, key));
            }
        }
        let resolver: Arc<dyn ResolvesServerCert> = match default {
            Some(d) => Arc::new(SniResolver {
                default: d,
                by_name,
            }),
            None => Arc::new(rustls::server::ResolvesServerCertUsingSni::new()),
        };

        let server_base = |verifier: Option<
            Arc<dyn rustls::server::danger::ClientCertVerifier>,
        >|
         -> Result<ServerConfig, TlsLoadError> {
            let b = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&versions)
                .map_err(|e| {
                    load_err(
                        cfg_path,
                        format!("tls.versions/cipher_suites/kx_groups: {e}"),
                    )
                })?;
            let b = match verifier {
                Some(v) => b.with_client_cert_verifier(v),
                None => b.with_no_client_auth(),
            };
            let mut sc = b.with_cert_resolver(resolver.clone());
            sc.enable_secret_extraction = true;
            if cfg.tls.resumption {
                sc.ticketer = aws_lc_rs::Ticketer::new()
                    .map_err(|e| load_err(cfg_path, format!("ticketer: {e}")))?;
                sc.send_tls13_tickets = 2;
            } else {
                sc.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
                sc.send_tls13_tickets = 0;
            }
            Ok(sc)
        };

        let clients = Arc::new(server_base(None)?);
        let mut client_anchor_expiries = Vec::new();
        let mut client_constrained_roots = Vec::new();
        let (clients_cert_optional, clients_cert_required, client_verifier) =
            match &cfg.tls.client_roots {
                Some(path) => {
                    let mut crls = Vec::new();
                    for f in &cfg.tls.client_crls {
                        crls.extend(reads.crls(f)?);
                    }
                    let crls = newest_crl_per_issuer(crls, &reads.certs(path)?);
                    // A sub-CA given as a client root that a configured CRL of its issuer
                    // revokes anchors nothing: webpki checks no anchor's revocation, and
                    // phones under a revoked CA went on proving AORs without a digest.
                    let listed: Vec<webpki::CertRevocationList<'_>> = crls
                        .iter()
                        .filter_map(|c| webpki::OwnedCertRevocationList::from_der(c.as_ref()).ok())
                        .map(webpki::CertRevocationList::from)
                        .collect();
                    let mut certs = reads.certs(path)?;
                    let revoked = verify::revoked_roots(&certs, &listed);
                    for (i, name) in revoked.iter().rev() {
                        tracing::warn!(
                            root = %name,
                            "client root certificate revoked by a configured CRL of its issuer: \
                             it anchors nothing (a revoked sub-CA revokes what it issued); \
                             remove it from tls.client_roots"
                        );
                        certs.remove(*i);
                    }
                    // The CRL coverage is asked of the roots that anchor (a revoked one needs
                    // no list of its own).
                    let certs_checked = certs.clone();
                    if certs.is_empty() {
                        // Every client root revoked: the policy still loads (a refused
                        // reload kept the revoked ones anchoring), and no client certificate
                        // passes — anchored at a root made now, whose key is dropped.
                        tracing::warn!(
                            "every tls.client_roots certificate is revoked: no client certificate \
                             is accepted until the file is mended"
                        );
                        let none = pki::Ca::new("sipring: no client root")
                            .map_err(|e| load_err(path, e))?;
                        certs.push(none.cert.der);
                    }
                    let mut roots = RootCertStore::empty();
                    let lapsing = verify::RootValidity::of(&certs);
                    client_anchor_expiries = lapsing.expiries();
                    client_constrained_roots = verify::constrained_roots(&certs);
                    for r in certs {
                        roots
                            .add(r)
                            .map_err(|e| load_err(path, format!("bad root: {e}")))?;
                    }
                    let roots = Arc::new(roots);
                    check_client_crls(path, &certs_checked, &crls)?;
                    let orders = verify::crl_orders(&crls);
                    let parsed = orders
                        .iter()
                        .map(|o| {
                            o.iter()
                                .map(|c| {
                                    webpki::OwnedCertRevocationList::from_der(c.as_ref())
                                        .map(webpki::CertRevocationList::from)
                                        .map_err(|e| load_err(path, format!("client CRL: {e}")))
                                })
                                .collect::<Result<Vec<_>, _>>()
                        })
                        .collect::<Result<Arc<[_]>, _>>()?;
                    let verifier = |optional: bool| {
                        let one = |crls: &Vec<CertificateRevocationListDer<'static>>| {
                            let mut b = WebPkiClientVerifier::builder_with_provider(
                                roots.clone(),
                                provider.clone(),
                            );
                            if !crls.is_empty() {
                                // Every certificate of the chain (a revoked intermediate CA
                                // revokes what it issued). A CRL past its nextUpdate says
                                // nothing about what was revoked since: refused as unknown
                                // status, not trusted as current.
                                b = b.with_crls(crls.clone()).enforce_revocation_expiration();
                            }
                            if optional {
                                b = b.allow_unauthenticated();
                            }
                            b.build()
                                .map_err(|e| load_err(path, format!("client verifier: {e}")))
                        };
                        // Also holds the chain to its roots' validity (webpki keeps none),
                        // at the handshake and at the recheck a root's expiry brings.
                        Ok::<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsLoadError>(
                            Arc::new(verify::CrlOrders {
                                orders: orders.iter().map(one).collect::<Result<Vec<_>, _>>()?,
                                roots: lapsing.clone(),
                                crls: parsed.clone(),
                                algs,
                            }),
                        )
                    };
                    let required = verifier(false)?;
                    (
                        Some(Arc::new(server_base(Some(verifier(true)?))?)),
                        Some(Arc::new(server_base(Some(required.clone()))?)),
                        Some(required),
                    )
                }
                None => (None, None, None),
            };

        // Partners.
        let mut partners = Vec::new();
        for p in &cfg.peer {
            let roots = reads.certs(&p.roots)?;
            let mut crls = Vec::new();
            for f in &p.crls {
                crls.extend(reads.crls(f)?);
            }
            let crls = newest_crl_per_issuer(crls, &roots);
            let t = PeerTrust::new(p, &roots, &crls).map_err(|e| load_err(&p.roots, e))?;
            partners.push(Arc::new(t));
        }
        let partners: Arc<[Arc<PeerTrust>]> = partners.into();
        let peers = if cfg.listen.iter().any(|l| l.kind == ListenKind::Mtls) || !partners.is_empty()
        {
            let v = Arc::new(PeerClientVerifier::new(
                partners.clone(),
                algs,
                cfg.tls.partner_ca_hints,
            ));
            Some(Arc::new(server_base(Some(v))?))
        } else {
            None
        };

        // Outbound, one client config per partner, presenting our default chain.
        let mut outbound = HashMap::new();
        for (p, trust) in cfg.peer.iter().zip(partners.iter()) {
            let Some((chain, key)) = &our_chain else {
                return Err(load_err(
                    cfg_path,
                    "tls.certificate: outbound peers need our certificate",
                ));
            };
            let verifier = Arc::new(PeerServerVerifier::new(
                trust.clone(),
                partners.clone(),
                algs,
            ));
            let mut cc = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&versions)
                .map_err(|e| load_err(cfg_path, format!("tls: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| load_err(cfg_path, format!("our certificate as a client: {e}")))?;
            cc.enable_secret_extraction = true;
            cc.enable_sni = true;
            // No resumption toward partners: rustls would not run our verifier on a resumed
            // session (the partner's chain comes from a ticket it may keep for days, past a
            // revocation or expiry), and a partner link is long-lived — one full handshake
            // per (re)connect costs nothing that matters.
            cc.resumption = rustls::client::Resumption::disabled();
            let name = ServerName::try_from(p.server_name.clone())
                .map_err(|e| load_err(cfg_path, format!("peer {}: server_name: {e}", p.name)))?;
            outbound.insert(p.name.clone(), (Arc::new(cc), name));
        }

        let mut anchor_expiries: Vec<i64> =
            partners.iter().flat_map(|p| p.anchor_expiries()).collect();
        anchor_expiries.sort_unstable();
        anchor_expiries.dedup();
        Ok(TlsPolicy {
            clients,
            clients_cert_optional,
            clients_cert_required,
            client_verifier,
            peers,
            outbound,
            partners,
            anchor_expiries: anchor_expiries.into(),
            client_anchor_expiries: client_anchor_expiries.into(),
            client_constrained_roots,
            certs,
            crl_dues: crl_dues_of(cfg, &mut reads),
            algs,
        })
    }
}
