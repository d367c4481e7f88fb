//! The subscriber file's format (feature `serde`): `[[subscriber]]` tables holding HA1
//! hashes, never passwords. The server loads it (and checks each entry's AORs); the load
//! generator and `sipring subscriber` write it, so the format lives once, here.
//!
//! ```toml
//! [[subscriber]]
//! username = "alice"
//! realm = "example.com"
//! aors = ["sip:alice@example.com"]   # default: sip:<username>@<realm>
//! ha1_sha256 = "…"                  # H(username:realm:password), lower-case hex
//! ha1_sha512_256 = "…"
//! ha1_md5 = "…"                     # only for phones that need MD5
//! ```

use crate::auth::Algorithm;
use serde::{Deserialize, Serialize};

/// One `[[subscriber]]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubscriberEntry {
    /// Digest user name.
    pub username: String,
    /// Realm (one of our domains).
    pub realm: String,
    /// AORs this subscriber may register and send as. Default `["sip:<username>@<realm>"]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aors: Vec<String>,
    /// `MD5(username:realm:password)`, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ha1_md5: Option<String>,
    /// `SHA-256(username:realm:password)`, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ha1_sha256: Option<String>,
    /// `SHA-512/256(username:realm:password)`, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ha1_sha512_256: Option<String>,
}

/// A whole subscriber file: its `[[subscriber]]` tables.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubscriberFile {
    /// The entries, in file order.
    pub subscriber: Vec<SubscriberEntry>,
}

impl SubscriberFile {
    /// Parses a file's text (unknown keys are errors, naming the key). Errors name the line
    /// and column, never quote it: the line may hold an HA1 ([`toml_error`]).
    pub fn parse(text: &str) -> Result<SubscriberFile, String> {
        toml::from_str(text).map_err(|e| toml_error(text, &e))
    }
}

/// A TOML error as `line L, column C: message`, without the quoted source line toml's own
/// text adds: in a subscriber file that line may hold an HA1 (as good as the password for
/// its realm), in a configuration a store URL with its password, and errors reach logs and
/// the admin endpoint's answers.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    // serde's type errors quote the value (`invalid type: string "redis://u:pw@h", expected
    // a sequence`): what is between double quotes is left out too.
    let mut msg = String::new();
    for (i, part) in e.message().trim_end().split('"').enumerate() {
        if i % 2 == 0 {
            msg.push_str(part);
        } else {
            msg.push_str("\"…\"");
        }
    }
    match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg,
    }
}

impl SubscriberEntry {
    /// An entry for `username@realm` with every algorithm's HA1 of `password`.
    pub fn new(username: &str, realm: &str, aors: Vec<String>, password: &str) -> SubscriberEntry {
        // Challenges name the realm in lower case without a trailing dot (our domains are;
        // the loader reads the realm so), and the HA1 covers it: `--realm Example.COM.`
        // wrote an entry that could never authenticate.
        let realm = realm.trim_end_matches('.').to_ascii_lowercase();
        let h = |a: Algorithm| Some(a.ha1(username, &realm, password));
        SubscriberEntry {
            username: username.into(),
            realm: realm.clone(),
            aors,
            ha1_md5: h(Algorithm::Md5),
            ha1_sha256: h(Algorithm::Sha256),
            ha1_sha512_256: h(Algorithm::Sha512_256),
        }
    }

    /// The entry as a TOML `[[subscriber]]` table.
    pub fn to_toml(&self) -> String {
        toml::to_string(&SubscriberFile {
            subscriber: vec![self.clone()],
        })
        .expect("plain strings serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_round_trips_through_its_toml() {
        let e = SubscriberEntry::new(
            "alice",
            "Example.COM.",
            vec!["sip:a@example.com".into()],
            "pw",
        );
        assert_eq!(
            e.realm, "example.com",
            "realms are lower case without a trailing dot, as challenges name them"
        );
        assert_eq!(
            e.ha1_sha256.as_deref(),
            Some(Algorithm::Sha256.ha1("alice", "example.com", "pw").as_str())
        );
        let back = SubscriberFile::parse(&e.to_toml()).unwrap();
        assert_eq!(back.subscriber, vec![e]);
        assert!(
            SubscriberFile::parse("[[subscriber]]\nusername = \"a\"\npassword = \"x\"\n")
                .unwrap_err()
                .contains("password")
        );
    }

    #[test]
    fn an_error_names_the_line_and_never_quotes_it() {
        // A typo in a key: toml's own text quoted the line, HA1 and all, into the log.
        let hash = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let text = format!(
            "[[subscriber]]\nusername = \"a\"\nrealm = \"example.com\"\nha1_sha265 = \"{hash}\"\n"
        );
        let e = SubscriberFile::parse(&text).unwrap_err();
        assert!(!e.contains(hash), "{e}");
        assert!(
            e.starts_with("line 4, column 1:") && e.contains("ha1_sha265"),
            "{e}"
        );
        let e =
            SubscriberFile::parse(&format!("[[subscriber]]\nha1_sha256 = \"{hash}\n")).unwrap_err();
        assert!(!e.contains(hash), "{e}");
        assert!(e.starts_with("line 2, "), "{e}");
        // A value of the wrong type: serde quotes it.
        let e = SubscriberFile::parse(&format!(
            "[[subscriber]]\nusername = \"a\"\naors = \"{hash}\"\n"
        ))
        .unwrap_err();
        assert!(!e.contains(hash) && e.contains("invalid type"), "{e}");
    }
}
