//! The driver's side of authentication: the subscriber file (loaded at start, swapped whole
//! on SIGHUP), this node's secret, and the policy settings handed to the sans-IO core
//! (`sipring_core::policy`), which makes every decision.
//!
//! The subscriber file holds HA1 hashes, never passwords; its format is
//! `sipring_core::subscriber_file` (shared with the tools that write it).
//!
//! `sipring subscriber --username alice --realm example.com` reads a password on stdin and
//! prints such a table.

use crate::config::Config;
use arc_swap::ArcSwap;
use sipring_core::auth::{
    Algorithm, AuthConfig, CredentialStore, NodeKey, Subscriber, SubscriberTable,
};
use sipring_core::policy::{PartnerPolicy, PolicyConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use sipring_core::subscriber_file::SubscriberEntry;
use sipring_core::subscriber_file::SubscriberFile;

/// The canonical form of an AOR as the registrar writes it (`sip:user@host`, host lower case,
/// `sips` folded), or why it is not one.
fn canonical_aor(s: &str) -> Result<String, String> {
    let uri = sipring_core::Uri::parse(s.as_bytes()).map_err(|_| format!("{s:?} is not a URI"))?;
    sipring_core::registrar::aor_of(&uri)
        .ok_or_else(|| format!("{s:?} is not a sip: AOR with a user"))
}

/// `user` as the user part of a SIP URI: escaped as the registrar writes AORs
/// (`sipring_core::registrar::aor_of`), so the AOR made of it is the one a REGISTER for it
/// is stored under.
fn uri_user(user: &str) -> String {
    user.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.!~*'()&=+$,;?/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The host of a canonical AOR ([`canonical_aor`]), without a trailing dot.
fn aor_host(aor: &str) -> String {
    sipring_core::Uri::parse(aor.as_bytes())
        .map(|u| String::from_utf8_lossy(&u.host_canonical()).into_owned())
        .unwrap_or_default()
}

/// Logs `line` once per process: the store's subscriber hash is read again every
/// `subscribers_refresh_s`, and the same entry would be warned about at that pace.
fn warn_once(line: String) {
    static WARNED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    let mut seen = WARNED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if seen.insert(line.clone()) {
        tracing::warn!("{line}");
    }
}

/// The AORs of `entry` outside its realm (each could never authenticate; see
/// [`parse_subscribers`]), canonical.
pub fn outside_realm(entry: &SubscriberEntry) -> Vec<String> {
    let realm = entry.realm.trim_end_matches('.').to_ascii_lowercase();
    entry
        .aors
        .iter()
        .filter_map(|a| canonical_aor(a).ok())
        .filter(|a| aor_host(a) != realm)
        .collect()
}

/// Loads a subscriber file. Errors name the file and the entry.
pub fn load_subscribers(path: &Path) -> Result<SubscriberTable, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    parse_subscribers(&text, &path.display().to_string())
}

/// Parses `[[subscriber]]` tables (a subscriber file's text, or the entries of the cluster
/// store's subscriber hash joined); errors name `origin` and the entry.
pub fn parse_subscribers(text: &str, origin: &str) -> Result<SubscriberTable, String> {
    let file = SubscriberFile::parse(text).map_err(|e| format!("{origin}: {e}"))?;
    let mut table = SubscriberTable::default();
    for (i, s) in file.subscriber.into_iter().enumerate() {
        let at = |what: &str| {
            format!(
                "{origin}: subscriber[{i}] ({}@{}): {what}",
                s.username, s.realm
            )
        };
        if s.username.is_empty() || s.realm.is_empty() {
            return Err(at("username and realm are required"));
        }
        let mut ha1 = Vec::new();
        for (alg, h) in [
            (Algorithm::Md5, &s.ha1_md5),
            (Algorithm::Sha256, &s.ha1_sha256),
            (Algorithm::Sha512_256, &s.ha1_sha512_256),
        ] {
            if let Some(h) = h {
                let want = if alg == Algorithm::Md5 { 32 } else { 64 };
                if h.len() != want || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(at(&format!("{} HA1 must be {want} hex digits", alg.name())));
                }
                ha1.push((alg, h.to_ascii_lowercase()));
            }
        }
        if ha1.is_empty() {
            return Err(at("no ha1_* hash"));
        }
        let aors = if s.aors.is_empty() {
            // The username as a URI's user part (escaped where it must be): written as it
            // came, `alice@example.com` or a space made no URI, and refused the whole file.
            vec![format!("sip:{}@{}", uri_user(&s.username), s.realm)]
        } else {
            s.aors.clone()
        };
        let aors = aors
            .iter()
            .map(|a| canonical_aor(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| at(&e))?;
        // A digest user is challenged in the realm of the AOR it claims (its host), so an
        // AOR in another domain could never authenticate: each try would count as a failed
        // login against the phone's address until it was blocked. Left out here, by name
        // (refusing the whole file, or the store's whole hash, locked everyone out for one
        // dead alias); `sipring subscriber` refuses to write one.
        let realm = s.realm.trim_end_matches('.').to_ascii_lowercase();
        let (aors, outside): (Vec<String>, Vec<String>) =
            aors.into_iter().partition(|a| aor_host(a) == realm);
        for a in &outside {
            warn_once(at(&format!(
                "AOR {a} left out: it is not in realm {realm}, and a user is challenged in the realm of the AOR it claims (give it its own entry, with its realm)"
            )));
        }
        if aors.is_empty() {
            warn_once(at("left out: none of its AORs is in its realm"));
            continue;
        }
        table.insert(Subscriber {
            username: s.username.clone(),
            realm,
            aors,
            ha1,
        });
    }
    Ok(table)
}

/// The subscribers of a store hash (`cluster.subscribers_key`: one `[[subscriber]]` table
/// per field), each field read on its own, and the fields refused (with why). One bad
/// field used to refuse the whole hash: the table froze, and a subscriber deleted or
/// re-keyed since went on signing in. A refused field's subscriber cannot sign in (its
/// entry is not taken) until it is mended.
pub fn parse_store_subscribers<'a>(
    fields: impl IntoIterator<Item = (&'a str, &'a str)>,
    key: &str,
) -> (SubscriberTable, Vec<String>) {
    let mut table = SubscriberTable::default();
    let mut refused = Vec::new();
    for (field, value) in fields {
        match parse_subscribers(value, &format!("store {key} field {field:?}")) {
            Ok(t) => table.extend(t),
            Err(e) => refused.push(e),
        }
    }
    (table, refused)
}

/// The subscribers every shard reads, swapped whole on reload (readers never block).
#[derive(Debug, Clone, Default)]
pub struct SharedSubscribers(pub Arc<ArcSwap<SubscriberTable>>);

impl CredentialStore for SharedSubscribers {
    fn subscriber(&self, username: &str, realm: &str) -> Option<Arc<Subscriber>> {
        self.0.load().subscriber(username, realm)
    }
}

/// The subscriber file first, then the subscribers read from the cluster's store
/// (`cluster.subscribers_key`; empty when not configured).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// From `auth.subscribers` (swapped on reload).
    pub file: SharedSubscribers,
    /// From the store (swapped by the store thread on each refresh).
    pub store: SharedSubscribers,
}

impl CredentialStore for Credentials {
    fn subscriber(&self, username: &str, realm: &str) -> Option<Arc<Subscriber>> {
        self.file
            .subscriber(username, realm)
            .or_else(|| self.store.subscriber(username, realm))
    }
}

/// Loads the configured subscribers (an empty table when none are configured).
pub fn subscribers(cfg: &Config) -> Result<SubscriberTable, String> {
    subscribers_read_once(cfg).map(|(t, _)| t)
}

/// [`subscribers`], and whether the file held nothing but whitespace: from one read (a
/// second read to tell could see a file that a script had truncated, and then begun to
/// write, while the first saw it empty).
pub fn subscribers_read_once(cfg: &Config) -> Result<(SubscriberTable, bool), String> {
    match &cfg.auth.subscribers {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("{}: cannot read: {e}", p.display()))?;
            let blank = text.trim_ascii().is_empty();
            parse_subscribers(&text, &p.display().to_string()).map(|t| (t, blank))
        }
        None => Ok((SubscriberTable::default(), false)),
    }
}

/// This node's secret: from `auth.secret_file` (SHA-256 of its contents, at least 32 bytes),
/// or random.
pub fn node_key(cfg: &Config) -> Result<NodeKey, String> {
    match &cfg.auth.secret_file {
        Some(p) => {
            let data =
                std::fs::read(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))?;
            if data.len() < 32 {
                return Err(format!(
                    "{}: a secret needs at least 32 bytes (e.g. `head -c 32 /dev/urandom > {}`)",
                    p.display(),
                    p.display()
                ));
            }
            let mut key = [0u8; 32];
            key.copy_from_slice(&NodeKey::new([0; 32]).mac(&[b"secret-file", &data]));
            Ok(NodeKey::new(key))
        }
        None => {
            let mut key = [0u8; 32];
            rustls::crypto::aws_lc_rs::default_provider()
                .secure_random
                .fill(&mut key)
                .map_err(|_| "no system randomness for the node secret".to_string())?;
            Ok(NodeKey::new(key))
        }
    }
}

/// The core's policy settings from the configuration.
pub fn policy_config(cfg: &Config) -> PolicyConfig {
    let a = &cfg.auth;
    PolicyConfig {
        authenticate: a.enabled,
        challenge: a.challenge.clone(),
        auth: AuthConfig {
            algorithms: a
                .algorithms
                .iter()
                .filter_map(|n| Algorithm::from_name(n.as_bytes()))
                .collect(),
            nonce_ttl: Duration::from_secs(a.nonce_expiry_s),
            max_failures: a.max_failures,
            failure_window: Duration::from_secs(a.failure_window_s),
            block: Duration::from_secs(a.block_s),
            max_tracked_sources: a.max_tracked_sources,
        },
        partners: cfg
            .peer
            .iter()
            .map(|p| PartnerPolicy {
                name: p.name.clone(),
                domains: p
                    .domains
                    .iter()
                    .map(|d| crate::config::domain_key(d))
                    .collect(),
                relay_to: p.relay_to.clone(),
                assert_identity: p.assert_identity,
                numbers: p.numbers,
                node: p.node,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_written_absolute_are_the_same_domains() {
        // Hosts in messages lose their one trailing dot before they are compared: a partner
        // (or our own) domain written `carrier.example.` matched nothing.
        let mut cfg = Config::default();
        cfg.server.domains = vec!["Example.COM.".into()];
        cfg.peer = vec![crate::config::PeerConfig {
            name: "c".into(),
            domains: vec!["Carrier.Example.".into()],
            ..Default::default()
        }];
        let p = policy_config(&cfg);
        assert_eq!(p.partners[0].domains, vec!["carrier.example".to_string()]);
        let proxy = crate::shard::proxy_config(&cfg, NodeKey::new([0; 32]));
        assert_eq!(proxy.domains, vec!["example.com".to_string()]);
        assert_eq!(proxy.peers[0].domain, "carrier.example");
    }

    #[test]
    fn a_username_that_is_no_uri_user_makes_an_escaped_aor_not_a_refused_file() {
        // `sip:alice@example.com@example.com` parsed as no URI, and the whole file was
        // refused: the server did not start, or a reload was refused.
        let text = [
            SubscriberEntry::new("alice@example.com", "example.com", vec![], "a").to_toml(),
            SubscriberEntry::new("bob smith", "example.com", vec![], "b").to_toml(),
            SubscriberEntry::new("carol", "example.com", vec![], "c").to_toml(),
        ]
        .concat();
        let t = parse_subscribers(&text, "subscribers.toml").unwrap();
        assert_eq!(
            t.subscriber("alice@example.com", "example.com")
                .unwrap()
                .aors,
            ["sip:alice%40example.com@example.com"]
        );
        assert_eq!(
            t.subscriber("bob smith", "example.com").unwrap().aors,
            ["sip:bob%20smith@example.com"]
        );
        // The AOR a REGISTER for that user is stored under.
        let to = sipring_core::Uri::parse(b"sip:bob%20smith@example.com").unwrap();
        assert_eq!(
            sipring_core::registrar::aor_of(&to).unwrap(),
            "sip:bob%20smith@example.com"
        );
        assert!(t.subscriber("carol", "example.com").is_some());
    }

    #[test]
    fn a_bad_field_of_the_store_hash_refuses_that_entry_only() {
        // One bad field refused the whole hash: the table froze (a subscriber deleted since
        // went on signing in) and, before the first load, every node read it all again
        // twice a second.
        let alice = SubscriberEntry::new("alice", "example.com", vec![], "a").to_toml();
        let bob = SubscriberEntry::new("bob", "example.com", vec![], "b").to_toml();
        let bad = bob.replace("ha1_sha256 = \"", "ha1_sha256 = \"zz");
        assert_ne!(bad, bob);
        let (t, refused) = parse_store_subscribers(
            [
                ("alice@example.com", alice.as_str()),
                ("bob@example.com", bad.as_str()),
            ],
            "subs",
        );
        assert_eq!(t.len(), 1);
        assert!(t.subscriber("alice", "example.com").is_some());
        assert!(t.subscriber("bob", "example.com").is_none());
        assert_eq!(refused.len(), 1);
        assert!(refused[0].contains("\"bob@example.com\""), "{refused:?}");
    }

    #[test]
    fn a_written_entry_loads_back_and_bad_files_name_the_entry() {
        let dir = std::env::temp_dir().join(format!("sipring-subs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        let e = SubscriberEntry::new("alice", "Example.com", vec![], "secret");
        std::fs::write(&good, e.to_toml()).unwrap();
        let t = load_subscribers(&good).unwrap();
        let s = t.subscriber("alice", "example.com").unwrap();
        assert_eq!(s.aors, vec!["sip:alice@example.com".to_string()]);
        assert_eq!(
            s.ha1_for(Algorithm::Sha256),
            Some(
                Algorithm::Sha256
                    .ha1("alice", "example.com", "secret")
                    .as_str()
            )
        );
        assert!(!e.to_toml().contains("secret"));
        for (name, text, needle) in [
            (
                "nohash.toml",
                "[[subscriber]]\nusername = \"bob\"\nrealm = \"example.com\"\n",
                "no ha1_",
            ),
            (
                "short.toml",
                "[[subscriber]]\nusername = \"bob\"\nrealm = \"example.com\"\nha1_sha256 = \"abc\"\n",
                "64 hex",
            ),
            (
                "aor.toml",
                "[[subscriber]]\nusername = \"bob\"\nrealm = \"example.com\"\naors = [\"tel:+1\"]\nha1_md5 = \"0123456789abcdef0123456789abcdef\"\n",
                "not a sip: AOR",
            ),
            (
                "key.toml",
                "[[subscriber]]\nusername = \"bob\"\npassword = \"x\"\n",
                "unknown field",
            ),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            let err = load_subscribers(&p).unwrap_err();
            assert!(err.contains(needle) && err.contains(name), "{err}");
        }
        // An alias in another of our domains (challenged in that domain's realm, it could
        // never authenticate: each try a failed login) is left out, not the whole file.
        let p = dir.join("realm.toml");
        std::fs::write(&p, "[[subscriber]]\nusername = \"bob\"\nrealm = \"example.com\"\naors = [\"sip:bob@example.com\", \"sip:bob@example.net\"]\nha1_md5 = \"0123456789abcdef0123456789abcdef\"\n[[subscriber]]\nusername = \"eve\"\nrealm = \"example.com\"\naors = [\"sip:eve@example.net\"]\nha1_md5 = \"0123456789abcdef0123456789abcdef\"\n").unwrap();
        let t = load_subscribers(&p).unwrap();
        // Blank or not is told from the one read that was parsed (a reload refuses a blank
        // file where there were subscribers; a comment says the emptiness is meant).
        let mut cfg = Config::default();
        for (text, blank) in [(" \n\t\n", true), ("# nobody\n", false)] {
            let q = dir.join("blank.toml");
            std::fs::write(&q, text).unwrap();
            cfg.auth.subscribers = Some(q);
            let (t, b) = subscribers_read_once(&cfg).unwrap();
            assert!(t.is_empty());
            assert_eq!(b, blank, "{text:?}");
        }
        assert_eq!(
            t.subscriber("bob", "example.com").unwrap().aors,
            vec!["sip:bob@example.com".to_string()]
        );
        assert!(t.subscriber("eve", "example.com").is_none());
        assert_eq!(
            outside_realm(&SubscriberEntry::new(
                "bob",
                "example.com",
                vec!["sip:bob@example.net".into()],
                "x"
            )),
            vec!["sip:bob@example.net".to_string()]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
