//! Who sent a request, and what it may do: authentication of clients, authorization of
//! every identity a request claims, and the federation rules (STYLE 17).
//!
//! A certificate proves who the *connection* is; this module decides what the *message* may
//! say. The driver hands the core a typed [`Principal`] per flow (from the TLS layer); the
//! proxy's routing [`Decision`] says what the request wants (register an AOR, reach a local
//! user, reach a partner, follow a dialog route); [`Policy::authorize`] answers
//! [`Authz::Allow`] with a [`Grant`] (what identity may be asserted downstream), a
//! [`Authz::Challenge`] (digest, RFC 3261 §22) or a [`Authz::Deny`].
//!
//! | who sent it | register AOR X | reach a local user | reach partner Y | dialog route |
//! | --- | --- | --- | --- | --- |
//! | client, certificate for X (SAN `sip:user@domain`) | yes, if X is its AOR | From must be its AOR | same | yes (signed token) |
//! | client, digest user with AORs S | yes, if X ∈ S | From ∈ S | From ∈ S | yes |
//! | client, no credentials | challenge (401) | challenge (407) if the method is challenged, or if From claims one of our domains; else allowed | challenge | yes |
//! | partner P | 403 | From (and every PAI) in P's domains | only if `relay_to` lists Y | yes |
//!
//! Identity headers (RFC 3325): P-Asserted-Identity and P-Preferred-Identity from clients
//! are removed; a partner's PAI (checked against its domains) is kept; toward a partner that
//! takes our assertions, an authenticated client's identity goes out as PAI; toward a client,
//! a PAI is removed when the request asks for `Privacy: id`. Credentials for our realms are
//! consumed (removed) before forwarding.

use crate::auth::{AuthConfig, Authenticator, CredentialStore, NodeKey, Verdict};
use crate::header::HeaderName;
use crate::parse::{Essentials, Message, Method};
use crate::proxy::{Decision, Flow};
use crate::registrar::aor_of;
use crate::text;
use crate::uri::Uri;
use crate::values::NameAddr;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

/// Who a flow is, as the TLS layer established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A client connection (`tls` or `tcp` listener). `cert_aors` are the AORs its client
    /// certificate proves (SAN `sip:user@domain` in one of our domains, verified against
    /// `tls.client_roots`); empty when it presented none.
    Client {
        /// AORs proven by the client certificate.
        cert_aors: Vec<String>,
    },
    /// A federation partner whose certificate chain verified to *its* roots.
    Partner(String),
}

impl Principal {
    /// A client without a certificate.
    pub fn anonymous() -> Principal {
        Principal::Client {
            cert_aors: Vec::new(),
        }
    }

    /// The partner's name, if this is one.
    pub fn partner(&self) -> Option<&str> {
        match self {
            Principal::Partner(p) => Some(p),
            Principal::Client { .. } => None,
        }
    }
}

/// What the driver knows about a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    /// Who it is.
    pub principal: Principal,
    /// The remote address (failed attempts are counted per address; a client's Via gets
    /// `received`/`rport` from it).
    pub source: Option<std::net::SocketAddr>,
    /// The listener it came through, as peers address it (our Via and Record-Route name it
    /// toward this flow). `None`: the proxy's default interface.
    pub iface: Option<Rc<crate::proxy::Interface>>,
}

impl Default for FlowInfo {
    fn default() -> Self {
        FlowInfo {
            principal: Principal::anonymous(),
            source: None,
            iface: None,
        }
    }
}

/// What one partner may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerPolicy {
    /// The partner's name.
    pub name: String,
    /// Its SIP domains (lower case): its requests must come From one of them.
    pub domains: Vec<String>,
    /// Partners its requests may be relayed to (default none: we are not a transit).
    pub relay_to: Vec<String>,
    /// Send it P-Asserted-Identity for our authenticated users (it is in our trust domain,
    /// RFC 3325). Default true.
    pub assert_identity: bool,
    /// Its From and P-Asserted-Identity may also be a global `tel:` number (RFC 3966): a
    /// carrier asserts its callers by number, which no domain holds. Default false.
    pub numbers: bool,
    /// Another node of our own cluster: it authenticated and authorized the request before
    /// relaying it (its From may be any of ours or a partner's), so a lookup it asks for is
    /// allowed whatever the From; it still never registers, and is relayed to partners
    /// only per `relay_to`.
    pub node: bool,
}

/// Policy settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Authenticate clients. `false` is an open server (any client may claim any identity):
    /// for closed labs only.
    pub authenticate: bool,
    /// Methods that need authentication from clients when out of a dialog (upper case).
    pub challenge: Vec<String>,
    /// Digest settings.
    pub auth: AuthConfig,
    /// The partners.
    pub partners: Vec<PartnerPolicy>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            authenticate: true,
            challenge: DEFAULT_CHALLENGE.iter().map(|s| s.to_string()).collect(),
            auth: AuthConfig::default(),
            partners: Vec::new(),
        }
    }
}

/// Methods challenged by default: every request that can start something (ACK and CANCEL
/// cannot be challenged; in-dialog requests follow signed routes).
pub const DEFAULT_CHALLENGE: &[&str] = &[
    "REGISTER",
    "INVITE",
    "MESSAGE",
    "SUBSCRIBE",
    "NOTIFY",
    "PUBLISH",
    "REFER",
    "OPTIONS",
    "INFO",
    "UPDATE",
    "PRACK",
    // In a dialog a BYE follows our signed route; one without it, sent anonymously to a
    // local user, would let anyone who learnt a dialog's Call-ID and tags hang it up.
    "BYE",
];

/// Where a request came from, as far as identity headers go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A client; the AOR it authenticated as (and used in From), if it did.
    Client(Option<String>),
    /// A partner (its PAI was checked against its domains).
    Partner(String),
    /// A partner inside a dialog whose PAI is not in its domains (a carrier's `tel:` or
    /// an address it asserts mid-call): the request goes on, without its PAI. Refusing it
    /// would hang the call (a BYE) or drop it (a session refresh).
    PartnerUnasserted(String),
}

/// What an allowed request may carry downstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Its source.
    pub source: Source,
}

/// A refusal: the answer and a metric/log label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denial {
    /// Status code.
    pub code: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// Label for `sipring_sip_refusals_total{reason}` and the log.
    pub label: &'static str,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Authz {
    /// Go on.
    Allow(Grant),
    /// Ask for credentials: 401 (`WWW-Authenticate`) or 407 (`Proxy-Authenticate`).
    Challenge {
        /// 401 or 407.
        code: u16,
        /// The challenge header lines.
        headers: Vec<(&'static str, Vec<u8>)>,
    },
    /// Refuse.
    Deny(Denial),
}

/// A security event for the driver to count and log (rate-limited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Label (`auth_wrong_password`, `from_not_identity`, `relay_not_allowed`, …).
    pub label: &'static str,
    /// Who was claimed (user, AOR or partner), for the log.
    pub detail: String,
    /// The source address.
    pub source: Option<IpAddr>,
}

/// How to edit a forwarded request's identity headers for one target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityEdit {
    /// Remove every P-Asserted-Identity.
    pub strip_pai: bool,
    /// Remove every Remote-Party-ID (see `rpid_in`).
    pub strip_rpid: bool,
    /// Remove every P-Preferred-Identity.
    pub strip_ppi: bool,
    /// Add this P-Asserted-Identity (a URI).
    pub add_pai: Option<String>,
    /// Remove the Proxy-Authorization/Authorization lines for these realms (consumed).
    pub consume_realms: Vec<String>,
}

/// The policy of one shard; see the module docs.
pub struct Policy {
    cfg: PolicyConfig,
    auth: Authenticator,
    store: Rc<dyn CredentialStore>,
    refusals: Vec<Refusal>,
    challenges: u64,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy").field("cfg", &self.cfg).finish()
    }
}

/// A credential store with nobody in it.
#[derive(Debug, Default)]
pub struct NoSubscribers;

impl CredentialStore for NoSubscribers {
    fn subscriber(&self, _: &str, _: &str) -> Option<std::sync::Arc<crate::auth::Subscriber>> {
        None
    }
}

fn host_of(uri: &[u8]) -> Option<Vec<u8>> {
    let u = Uri::parse(uri).ok()?;
    // One trailing dot (an absolute name) is the same host, as for our own domains.
    u.is_sip().then(|| u.host_canonical().into_owned())
}

fn in_list(host: &[u8], list: &[String]) -> bool {
    list.iter().any(|d| text::eq_ic(d.as_bytes(), host))
}

impl Policy {
    /// A policy; `key` signs nonces, `epoch` is when this node's nonces count from.
    pub fn new(
        cfg: PolicyConfig,
        key: NodeKey,
        epoch: Instant,
        store: Rc<dyn CredentialStore>,
    ) -> Policy {
        Policy {
            auth: Authenticator::new(cfg.auth.clone(), key, epoch),
            cfg,
            store,
            refusals: Vec::new(),
            challenges: 0,
        }
    }

    /// No authentication, no partners: every client is taken at its word. For in-memory
    /// tests of routing only.
    pub fn open(now: Instant) -> Policy {
        Policy::new(
            PolicyConfig {
                authenticate: false,
                ..PolicyConfig::default()
            },
            NodeKey::new([0; 32]),
            now,
            Rc::new(NoSubscribers),
        )
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// The next security event.
    pub fn poll_refusal(&mut self) -> Option<Refusal> {
        self.refusals.pop()
    }

    /// Challenges sent (a counter).
    pub fn challenges(&self) -> u64 {
        self.challenges
    }

    /// Sources counting failed attempts or refused (a gauge over the failure ledger, which
    /// the shards of a process share: a scan).
    pub fn failure_sources(&self, now: Instant) -> usize {
        self.auth.tracked_sources(now)
    }

    /// Flows with nonce state (a gauge).
    pub fn nonce_flows(&self) -> usize {
        self.auth.flows_tracked()
    }

    /// Counts failed attempts in `ledger`, shared with the other shards.
    pub fn share_failures(&mut self, ledger: std::sync::Arc<crate::auth::FailureLedger>) {
        self.auth.share_failures(ledger);
    }

    /// A flow closed: forget its nonces.
    pub fn flow_closed(&mut self, flow: &Flow) {
        if let Flow::Conn(id) = flow {
            self.auth.flow_closed(*id);
        }
    }

    fn partner(&self, name: &str) -> Option<&PartnerPolicy> {
        self.cfg.partners.iter().find(|p| p.name == name)
    }

    fn deny(
        &mut self,
        info: &FlowInfo,
        code: u16,
        reason: &'static str,
        label: &'static str,
        detail: String,
    ) -> Authz {
        self.refusals.push(Refusal {
            label,
            detail,
            source: info.source.map(|s| s.ip()),
        });
        Authz::Deny(Denial {
            code,
            reason,
            label,
        })
    }

    /// Decides whether the request (which routing decided to handle as `decision`) may
    /// proceed, given who sent it. `proxy` knows our domains and addresses; `flow` is the
    /// flow it arrived on.
    #[allow(clippy::too_many_arguments)] // the request, where it came from, what it wants
    pub fn authorize(
        &mut self,
        now: Instant,
        flow: &Flow,
        info: &FlowInfo,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
        decision: &Decision,
        proxy: &crate::proxy::Proxy,
    ) -> Authz {
        let domains = &proxy.config().domains;
        // A From or To parameter value that is no token, host or quoted string:
        // `<sip:alice@example.com>;tag=1, <sip:ceo@example.com>` is alice to us (her tag
        // `1, <sip:ceo@…>`) and the CEO to a reader that splits on commas or takes the last
        // `<…>`. Checked here, for every request whoever sends it, not in the parser: the
        // usual `;tag=…` would pay for it on every message, responses included.
        if !(ess.from.plain_params() && ess.to.plain_params()) {
            let detail = String::from_utf8_lossy(if ess.from.plain_params() {
                ess.to.params
            } else {
                ess.from.params
            })
            .into_owned();
            return self.deny(
                info,
                400,
                "Bad From Or To Parameter",
                "identity_params",
                detail,
            );
        }
        let partner_source = match (&info.principal, flow) {
            (Principal::Partner(p), _) => Some(p.clone()),
            (_, Flow::Peer(p)) => Some(p.clone()),
            _ => None,
        };
        if let Some(p) = partner_source {
            return self.authorize_partner(info, msg, ess, decision, p);
        }
        let cert_aors = match &info.principal {
            Principal::Client { cert_aors } => cert_aors.as_slice(),
            Principal::Partner(_) => &[],
        };
        match decision {
            Decision::ToFlow(_) => {
                return Authz::Allow(Grant {
                    source: Source::Client(None),
                });
            }
            Decision::Register
            | Decision::Lookup { .. }
            | Decision::ToPeer(_)
            | Decision::Reconnected(_) => {}
            // Answered or dropped here: nothing to authorize.
            _ => {
                return Authz::Allow(Grant {
                    source: Source::Client(None),
                });
            }
        }
        let register = matches!(decision, Decision::Register);
        if register {
            // An AOR of ours, of the domain the REGISTER was sent to (RFC 3261 §10.3 steps
            // 1 and 3: a Request-URI naming this server rather than a domain takes any of
            // ours) — whether or not anyone authenticates: the table is for our users.
            let to = ess.to.uri();
            let host = to.host_canonical();
            let ruri_host = msg
                .request_uri()
                .and_then(|r| Uri::parse(r).ok())
                .map(|r| r.host_canonical().into_owned())
                .unwrap_or_default();
            let for_this_domain = !in_list(&ruri_host, domains) || text::eq_ic(&ruri_host, &host);
            if !to.is_sip() || !in_list(&host, domains) || aor_of(&to).is_none() || !for_this_domain
            {
                return self.deny(
                    info,
                    404,
                    "Not Found",
                    "register_foreign_aor",
                    String::from_utf8_lossy(to.raw).into_owned(),
                );
            }
        }
        if !self.cfg.authenticate {
            return Authz::Allow(Grant {
                source: Source::Client(None),
            });
        }
        // The identity the request claims: To for REGISTER (RFC 3261 §10.3), else From.
        let claimed_uri = if register {
            ess.to.uri()
        } else {
            ess.from.uri()
        };
        let claimed = aor_of(&claimed_uri);
        // Ours however it is written: one trailing dot (an absolute name) is the same host,
        // and this server's own names and addresses are ours too (`sip:ceo@<our address>`
        // is displayed as "ceo" as surely as `sip:ceo@example.com`).
        let host = claimed_uri.host_canonical();
        let in_our_domain = claimed_uri.is_sip() && in_list(&host, domains);
        let method = msg.method().expect("request");
        let claims_ours = in_our_domain || (claimed_uri.is_sip() && proxy.is_self(&host));
        // A partner's domain is the partner's to claim: a client that does is challenged
        // (and then refused, as no user of ours is one of its AORs) even where the method
        // is not — before, with a short `auth.challenge`, an anonymous MESSAGE From
        // `sip:ceo@<partner's domain>` reached our users as the partner's CEO.
        let claims_partners = claimed_uri.is_sip()
            && self
                .cfg
                .partners
                .iter()
                .any(|p| !p.node && in_list(&host, &p.domains));
        let needs_auth = register
            || claims_ours
            || claims_partners
            // A party that reconnected shows who it is (the engine then checks that it is
            // one of the dialog's: `Proxy::party_route`).
            || matches!(decision, Decision::ToPeer(_) | Decision::Reconnected(_))
            // An extension method is challenged whatever the list: the list names the
            // methods an operator knows, and one nobody listed must not pass anonymously.
            || matches!(method, Method::Other(_))
            || self
                .cfg
                .challenge
                .iter()
                .any(|m| text::eq_ic(m.as_bytes(), method.as_bytes()));
        // The identities this request has proven.
        // The identities this request has proven: its certificate's, or its digest user's.
        let mut digest_user = None;
        if cert_aors.is_empty() && needs_auth && never_challenged(method) {
            // An ACK cannot be challenged: one that would need credentials is dropped.
            return Authz::Deny(Denial {
                code: 403,
                reason: "Forbidden",
                label: "ack_unauthenticated",
            });
        }
        let fid = match flow {
            Flow::Conn(id) => *id,
            Flow::Peer(_) => 0,
        };
        if cert_aors.is_empty() && needs_auth {
            // The realm is the claimed AOR's domain. A From that names none of ours (an
            // anonymous caller) is challenged in the domain its P-Preferred-Identity names,
            // else the one this connection authenticated in (its REGISTER's), else the first:
            // a user of another of our domains answering the first's realm could never
            // pass, and each try counted as a failed login against its address.
            let realm = if in_our_domain {
                String::from_utf8_lossy(&host).into_owned()
            } else {
                let ours = |h: &[u8]| {
                    domains
                        .iter()
                        .find(|d| text::eq_ic(d.as_bytes(), h))
                        .cloned()
                };
                msg.headers_named(HeaderName::PPreferredIdentity)
                    .filter_map(|h| NameAddr::parse(h.value))
                    .find_map(|na| ours(&na.uri().host_canonical()))
                    .or_else(|| self.auth.realm_of(fid).and_then(|r| ours(r.as_bytes())))
                    .or_else(|| domains.first().cloned())
                    .unwrap_or_default()
            };
            let (primary, secondary) = if register {
                (HeaderName::Authorization, HeaderName::ProxyAuthorization)
            } else {
                (HeaderName::ProxyAuthorization, HeaderName::Authorization)
            };
            let mut values: Vec<&[u8]> = msg
                .headers_named(primary)
                .chain(msg.headers_named(secondary))
                .map(|h| h.value)
                .collect();
            // Credentials for the realm this request is challenged in go first: a UA that
            // answered challenges of two of our realms (its From's, and another's) sent both,
            // and the first of ours was taken — then refused 403 as not its From.
            if values.len() > 1 {
                values.sort_by_key(|v| {
                    !crate::auth::parse_credentials(v)
                        .is_some_and(|c| text::eq_ic(c.realm.as_bytes(), realm.as_bytes()))
                });
            }
            let checked = self.auth.verify(
                now,
                fid,
                info.source.map(|s| s.ip()),
                method.as_bytes(),
                msg.request_uri().unwrap_or_default(),
                // Besides the Request-URI, only a URI naming this server with no user (SIPp
                // and some gateways write the next hop's address there): a digest for
                // `sip:bob@example.com` must not pass for another target (RFC 3261 §22.4),
                // as it did when any URI in our domains was accepted — an on-path attacker
                // on plain TCP could hold a call to a local user back and send its
                // credentials on toward any number. Not a domain we serve: credentials a
                // phone made for `OPTIONS sip:example.com` passed for a call to anyone.
                &|u| Uri::parse(u).is_ok_and(|u| u.user.is_none() && proxy.is_self_host_uri(&u)),
                &values,
                domains,
                &*self.store,
            );
            if let Some((why, who)) = &checked.failure {
                self.refusals.push(Refusal {
                    label: auth_label(*why),
                    detail: who.clone(),
                    source: info.source.map(|s| s.ip()),
                });
            }
            match checked.verdict {
                Verdict::Authenticated(sub) => digest_user = Some(sub),
                Verdict::Blocked => {
                    self.refusals.push(Refusal {
                        label: "auth_blocked",
                        detail: String::new(),
                        source: info.source.map(|s| s.ip()),
                    });
                    return Authz::Deny(Denial {
                        code: 403,
                        reason: "Too Many Failed Attempts",
                        label: "auth_blocked",
                    });
                }
                Verdict::Challenge { stale } => {
                    self.challenges += 1;
                    let (code, name) = if register {
                        (401, "WWW-Authenticate")
                    } else {
                        (407, "Proxy-Authenticate")
                    };
                    let headers = self
                        .auth
                        .challenges(now, fid, &realm, stale)
                        .into_iter()
                        .map(|v| (name, v))
                        .collect();
                    return Authz::Challenge { code, headers };
                }
            }
        }
        let identity: &[String] = match &digest_user {
            Some(sub) => &sub.aors,
            None => cert_aors,
        };
        if identity.is_empty() {
            // Anonymous, and allowed so (the method is not challenged, From is not ours,
            // the target is local).
            return Authz::Allow(Grant {
                source: Source::Client(None),
            });
        }
        if !register && is_anonymous(&claimed_uri) {
            // An anonymous From (RFC 3323 §4.1.1.3, a withheld caller ID): the identity we
            // vouch for is the one authenticated — the AOR of ours a P-Preferred-Identity
            // names (RFC 3325 §9.2), else the first — asserted only toward partners in our
            // trust domain, which honour the request's `Privacy: id`.
            let ours = |a: &&String| {
                Uri::parse(a.as_bytes()).is_ok_and(|u| in_list(&u.host_canonical(), domains))
            };
            let preferred = msg
                .headers_named(HeaderName::PPreferredIdentity)
                .filter_map(|h| NameAddr::parse(h.value))
                .find_map(|na| aor_of(&na.uri()).filter(|a| identity.contains(a) && ours(&a)));
            let Some(aor) = preferred.or_else(|| identity.iter().find(ours).cloned()) else {
                let detail = format!("anonymous (authenticated as {})", identity.join(","));
                return self.deny(
                    info,
                    403,
                    "From Does Not Match Identity",
                    "from_not_identity",
                    detail,
                );
            };
            return Authz::Allow(Grant {
                source: Source::Client(Some(aor)),
            });
        }
        let claimed = claimed.unwrap_or_default();
        // Only an AOR of ours is an identity we vouch for: a subscriber entry listing
        // `sip:x@partner.example` (a mistake in the file or the store) must not let its
        // user speak for a partner's domain with our P-Asserted-Identity. Certificate AORs
        // are held to our domains when the connection is set up.
        if !identity.contains(&claimed) || !in_our_domain {
            let (reason, label) = if register {
                ("Not Allowed To Register This AOR", "register_not_owner")
            } else {
                ("From Does Not Match Identity", "from_not_identity")
            };
            let detail = format!("{claimed} (authenticated as {})", identity.join(","));
            return self.deny(info, 403, reason, label, detail);
        }
        // The identity we vouch for reads the same to every reader: a From written
        // `"<sip:ceo@example.com>" <sip:alice@example.com>` is alice to us and the CEO to a
        // phone that takes the first `<…>` (as a partner's is refused).
        if !register && display_holds_brackets(&ess.from) {
            let detail = format!(
                "{claimed}: {}",
                String::from_utf8_lossy(ess.from.display.unwrap_or_default())
            );
            return self.deny(
                info,
                403,
                "From Display Name Holds A URI",
                "from_display",
                detail,
            );
        }
        Authz::Allow(Grant {
            source: Source::Client(Some(claimed)),
        })
    }

    fn authorize_partner(
        &mut self,
        info: &FlowInfo,
        msg: &Message<'_, '_>,
        ess: &Essentials<'_>,
        decision: &Decision,
        name: String,
    ) -> Authz {
        let allow = |name: String| {
            Authz::Allow(Grant {
                source: Source::Partner(name),
            })
        };
        match decision {
            // In a dialog the partner's From is the dialog's and is not checked again; what
            // it asserts (P-Asserted-Identity) is, as on a new request: a route we signed
            // says where the request may go, not who it may claim to be.
            Decision::ToFlow(_) => {
                return match self.partner(&name).cloned() {
                    Some(p) if p.node || asserted_in(msg, &p) => allow(name),
                    Some(_) => Authz::Allow(Grant {
                        source: Source::PartnerUnasserted(name),
                    }),
                    None => self.deny(info, 403, "Unknown Partner", "unknown_partner", name),
                };
            }
            // Another node of our cluster passes on what a REGISTER it answered removes
            // (only the node holding a binding writes it): removals only.
            Decision::Register
                if self.partner(&name).is_some_and(|p| p.node)
                    && crate::registrar::removes_only(msg) =>
            {
                return allow(name);
            }
            Decision::Register => {
                return self.deny(
                    info,
                    403,
                    "Partners Do Not Register",
                    "partner_register",
                    name,
                );
            }
            Decision::Lookup { .. } | Decision::ToPeer(_) => {}
            _ => return allow(name),
        }
        let Some(p) = self.partner(&name).cloned() else {
            return self.deny(info, 403, "Unknown Partner", "unknown_partner", name);
        };
        if p.node && matches!(decision, Decision::Lookup { .. }) {
            // A request inside a dialog reaches this node with our own Record-Route entry
            // (every dialog through a node is record-routed by it), which routes it to a
            // flow. One that names only the sending node's entry, and falls through to a
            // lookup here, is a client (or partner) that kept the sending node's signed
            // route of one dialog and dropped ours: it would reach any of our users with
            // any From, unchallenged on either node. ACK is left to the stray-ACK rules.
            if ess.to.tag().is_some() && msg.method() != Some(Method::Ack) {
                return self.deny(
                    info,
                    403,
                    "In-Dialog Request Without Our Route",
                    "node_dialog_without_route",
                    format!(
                        "{} from {} via node {name}",
                        String::from_utf8_lossy(msg.request_uri().unwrap_or_default()),
                        String::from_utf8_lossy(ess.from.uri)
                    ),
                );
            }
            return allow(name);
        }
        // An anonymous From claims nobody (RFC 3323 §4.1.1.3): who the caller is, the
        // partner asserts (P-Asserted-Identity, checked next), as for any other From.
        let from_ok = (speaks_for(&p, ess.from.uri)
            || Uri::parse(ess.from.uri).is_ok_and(|u| is_anonymous(&u)))
            && !display_holds_brackets(&ess.from);
        if !from_ok {
            return self.deny(
                info,
                403,
                "From Not In Partner Domains",
                "partner_from_domain",
                format!(
                    "{} from partner {name}",
                    String::from_utf8_lossy(ess.from.uri)
                ),
            );
        }
        if !asserted_in(msg, &p) {
            return self.deny_pai(info, msg, name);
        }
        if let Decision::ToPeer(to) = decision
            && !p.relay_to.iter().any(|r| r == to)
        {
            return self.deny(
                info,
                403,
                "Relay Not Allowed",
                "relay_not_allowed",
                format!("partner {name} to partner {to}"),
            );
        }
        allow(name)
    }

    fn deny_pai(&mut self, info: &FlowInfo, msg: &Message<'_, '_>, name: String) -> Authz {
        let claimed: Vec<String> = msg
            .headers_named(HeaderName::PAssertedIdentity)
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
            .collect();
        self.deny(
            info,
            403,
            "Asserted Identity Not In Partner Domains",
            "partner_pai_domain",
            format!("{} from partner {name}", claimed.join(", ")),
        )
    }

    /// Must a response's P-Asserted-Identity be removed before it goes upstream?
    /// `from_partner`: the partner or cluster node it came from (`None`: a client);
    /// `to_partner`: whether it goes to a partner (not a node: the node it goes to decides
    /// for its own client). A client's assertion is never passed on (as on requests); a
    /// partner's only inside its domains; and toward a client, not when the answer itself
    /// asks `Privacy: id`. (P-Preferred-Identity never goes upstream in an answer.)
    /// Returns (remove its P-Asserted-Identity, remove its Remote-Party-ID).
    pub fn strips_response_identity(
        &self,
        msg: &Message<'_, '_>,
        from_partner: Option<&str>,
        to_partner: Option<&str>,
    ) -> (bool, bool) {
        let private = !to_partner.is_some_and(|p| self.in_trust_domain(p)) && wants_id_privacy(msg);
        match from_partner.and_then(|n| self.partner(n)) {
            None => (true, true),
            Some(p) if p.node => (private, private),
            Some(p) => (!asserted_in(msg, p) || private, !rpid_in(msg, p) || private),
        }
    }

    /// Is partner `name` in our trust domain (RFC 3325): one we assert identities to, or
    /// another node of our cluster?
    fn in_trust_domain(&self, name: &str) -> bool {
        self.partner(name)
            .is_some_and(|p| p.node || p.assert_identity)
    }

    /// The identity-header edits for a request with `grant` going out to `to`.
    pub fn identity_edit(
        &self,
        grant: &Grant,
        msg: &Message<'_, '_>,
        to: &Flow,
        to_partner: Option<&str>,
        domains: &[String],
    ) -> IdentityEdit {
        let dest_partner = match to {
            Flow::Peer(p) => Some(p.as_str()),
            Flow::Conn(_) => to_partner,
        };
        let mut e = IdentityEdit {
            strip_ppi: true,
            consume_realms: domains.to_vec(),
            ..IdentityEdit::default()
        };
        // A partner's RPID passes only inside its domains (a node's: as its PAI does).
        let foreign_rpid = |name: &str| {
            self.partner(name)
                .is_none_or(|p| !p.node && !rpid_in(msg, p))
        };
        match &grant.source {
            Source::Client(auth) => {
                e.strip_pai = true;
                e.strip_rpid = true;
                if let (Some(aor), Some(p)) = (auth, dest_partner)
                    && self.partner(p).is_some_and(|p| p.assert_identity)
                {
                    e.add_pai = Some(format!("<{aor}>"));
                }
            }
            Source::PartnerUnasserted(name) => {
                e.strip_pai = true;
                e.strip_rpid = foreign_rpid(name);
            }
            Source::Partner(name) => {
                // Kept toward partners in our trust domain; toward clients, and partners
                // outside it (`assert_identity = false`), only without `Privacy: id`
                // (RFC 3325 §5).
                if !dest_partner.is_some_and(|p| self.in_trust_domain(p)) && withholds_id(msg) {
                    e.strip_pai = true;
                    e.strip_rpid = true;
                } else {
                    e.strip_rpid = foreign_rpid(name);
                }
            }
        }
        e
    }
}

/// Is every P-Asserted-Identity of `msg` one partner `p` speaks for ([`speaks_for`])? One
/// that cannot be read (an unbalanced quote or bracket) is not: what this parser cannot
/// split, a downstream one may read as something else.
fn asserted_in(msg: &Message<'_, '_>, p: &PartnerPolicy) -> bool {
    all_in(msg, HeaderName::PAssertedIdentity, p)
}

/// Is every Remote-Party-ID of `msg` in one of `domains` (as [`asserted_in`])? RPID never
/// became an RFC, but phones and PBXes display it as the caller: it is an assertion like
/// PAI — removed from clients, kept from a partner only inside its domains. Unlike a PAI, a
/// partner's RPID outside them (carriers write their own IP or a `tel:`) is removed, not
/// refused: the request goes on without it.
fn rpid_in(msg: &Message<'_, '_>, p: &PartnerPolicy) -> bool {
    all_in(msg, HeaderName::RemotePartyId, p)
}

fn all_in(msg: &Message<'_, '_>, name: HeaderName, p: &PartnerPolicy) -> bool {
    let Some(values) = msg.try_values(name) else {
        return false;
    };
    values.iter().all(|v| {
        NameAddr::parse(v.value)
            .filter(|na| !ambiguous_params(na.params) && !display_holds_brackets(na))
            .is_some_and(|na| speaks_for(p, na.uri))
    })
}

/// Does a name-addr's display name hold a `<` or `>`? A quoted one may (RFC 3261 §25.1),
/// but `"<sip:ceo@ours>" <sip:x@partner>` is the partner's identity to a reader that
/// skips the quoted string, and ours to one that takes the first `<…>` it meets: an
/// identity a partner vouches for must read the same to every reader.
fn display_holds_brackets(na: &NameAddr<'_>) -> bool {
    na.display
        .is_some_and(|d| memchr::memchr2(b'<', b'>', d).is_some())
}

/// May partner `p` claim `uri` as its caller: a SIP URI in one of its domains, or — where
/// it asserts numbers (`numbers`) — a global `tel:` number?
fn speaks_for(p: &PartnerPolicy, uri: &[u8]) -> bool {
    host_of(uri).is_some_and(|h| in_list(&h, &p.domains)) || (p.numbers && global_tel(uri))
}

/// Is `uri` a global `tel:` number (RFC 3966 §3: `+`, digits and visual separators, then
/// parameters, none of them a `phone-context`, which makes a number local to someone)?
fn global_tel(uri: &[u8]) -> bool {
    let Some(rest) = uri
        .get(4..)
        .filter(|_| uri[..4].eq_ignore_ascii_case(b"tel:"))
    else {
        return false;
    };
    let (number, params) = match memchr::memchr(b';', rest) {
        Some(i) => rest.split_at(i),
        None => (rest, &b""[..]),
    };
    let Some(digits) = number.strip_prefix(b"+") else {
        return false;
    };
    digits.iter().any(u8::is_ascii_digit)
        && digits
            .iter()
            .all(|&b| b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'(' | b')'))
        && !params
            .split(|&b| b == b';')
            .any(|p| p.len() >= 13 && p[..13].eq_ignore_ascii_case(b"phone-context"))
}

/// Does a name-addr's parameter part hold a `<` or `>` outside a quoted string? No
/// parameter value may (RFC 3261 §25.1: token, host or quoted-string); one that does is
/// where parsers part ways: `<sip:a@partner>;x=<y, <sip:ceo@ours>` is one identity to our
/// comma splitter (the `<` opens a bracket) and two to Kamailio's, the second ours.
fn ambiguous_params(params: &[u8]) -> bool {
    let mut i = 0;
    while let Some(off) = memchr::memchr3(b'<', b'>', b'"', &params[i..]) {
        let at = i + off;
        if params[at] != b'"' {
            return true;
        }
        match text::skip_quoted(params, at + 1) {
            Some(next) => i = next,
            None => return true,
        }
    }
    false
}

/// Is this the anonymous URI of RFC 3323 §4.1.1.3 (`sip:anonymous@anonymous.invalid`; any
/// user: the `.invalid` domain is nobody's, RFC 2606)?
fn is_anonymous(uri: &Uri<'_>) -> bool {
    uri.is_sip() && text::eq_ic(&uri.host_canonical(), b"anonymous.invalid")
}

/// Does the request withhold its caller's identity: `Privacy: id`, or an anonymous From
/// (RFC 3323 §4.1.1.3: the caller who hides its From hides who it is; a node that asserted
/// it to another node, whose callee then saw it, would have undone that)?
fn withholds_id(msg: &Message<'_, '_>) -> bool {
    wants_id_privacy(msg)
        || msg
            .header(HeaderName::From)
            .and_then(|h| NameAddr::parse(h.value))
            .is_some_and(|na| is_anonymous(&na.uri()))
}

/// Does the request ask that its asserted identity be withheld (`Privacy: id`, RFC 3325)?
pub fn wants_id_privacy(msg: &Message<'_, '_>) -> bool {
    msg.headers_named(HeaderName::Privacy).any(|h| {
        h.value
            .split(|&b| b == b';' || b == b',')
            .any(|t| text::eq_ic(text::trim(t), b"id"))
    })
}

fn auth_label(f: crate::auth::Failure) -> &'static str {
    use crate::auth::Failure as F;
    match f {
        F::Malformed => "auth_malformed",
        F::UriMismatch => "auth_uri_mismatch",
        F::Algorithm => "auth_algorithm",
        F::UnknownUser => "auth_unknown_user",
        F::WrongPassword => "auth_wrong_password",
        F::Replay => "auth_replay",
    }
}

/// Is this method one that ACK/CANCEL semantics exempt from challenges?
pub fn never_challenged(m: Method<'_>) -> bool {
    matches!(m, Method::Ack | Method::Cancel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Algorithm, Subscriber, SubscriberTable, authorization};
    use crate::header::Header;
    use crate::parse::{Framing, Limits, Status, parse};

    const DOMAINS: &[&str] = &["example.com", "example.net"];

    fn policy() -> Policy {
        let mut store = SubscriberTable::default();
        for u in ["alice", "bob", "trunk"] {
            let mut aors = vec![format!("sip:{u}@example.com")];
            if u == "trunk" {
                // A subscriber entry that lists a partner's AOR (a mistake in the file).
                aors.push("sip:x@peer-a.test".into());
            }
            store.insert(Subscriber {
                username: u.into(),
                realm: "example.com".into(),
                aors,
                ha1: vec![(
                    Algorithm::Sha256,
                    Algorithm::Sha256.ha1(u, "example.com", "pw"),
                )],
            });
        }
        // A user of our second domain.
        store.insert(Subscriber {
            username: "nina".into(),
            realm: "example.net".into(),
            aors: vec!["sip:nina@example.net".into()],
            ha1: vec![(
                Algorithm::Sha256,
                Algorithm::Sha256.ha1("nina", "example.net", "pw"),
            )],
        });
        let partner = |name: &str, domain: &str, relay: &[&str]| PartnerPolicy {
            name: name.into(),
            domains: vec![domain.into()],
            relay_to: relay.iter().map(|s| s.to_string()).collect(),
            assert_identity: true,
            numbers: false,
            node: false,
        };
        Policy::new(
            PolicyConfig {
                partners: vec![
                    partner("a", "peer-a.test", &[]),
                    partner("b", "peer-b.test", &["a"]),
                    PartnerPolicy {
                        node: true,
                        domains: vec![],
                        ..partner("node-b", "", &[])
                    },
                ],
                ..PolicyConfig::default()
            },
            NodeKey::new([1; 32]),
            Instant::now(),
            Rc::new(store),
        )
    }

    /// A request `method ruri` From `from` To `to`, with `extra` header lines.
    fn req(method: &str, ruri: &str, from: &str, to: &str, extra: &str) -> String {
        format!(
            "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKp\r\nFrom: <{from}>;tag=f\r\nTo: <{to}>\r\nCall-ID: c\r\nCSeq: 1 {method}\r\nMax-Forwards: 70\r\n{extra}Content-Length: 0\r\n\r\n"
        )
    }

    fn creds(p: &Policy, user: &str, pw: &str, method: &str, ruri: &str, nc: u32) -> String {
        let nonce = p.auth.nonce(Instant::now(), 1, "example.com");
        let ha1 = Algorithm::Sha256.ha1(user, "example.com", pw);
        let hdr = if method == "REGISTER" {
            "Authorization"
        } else {
            "Proxy-Authorization"
        };
        let v = authorization(
            Algorithm::Sha256,
            user,
            "example.com",
            &ha1,
            &nonce,
            nc,
            "cn",
            method,
            ruri,
        );
        format!("{hdr}: {v}\r\n")
    }

    /// nina's credentials (our second domain, example.net) for `method` to `uri`.
    fn nina_creds(p: &Policy, method: &str, uri: &str) -> String {
        let nonce = p.auth.nonce(Instant::now(), 1, "example.net");
        let ha1 = Algorithm::Sha256.ha1("nina", "example.net", "pw");
        authorization(
            Algorithm::Sha256,
            "nina",
            "example.net",
            &ha1,
            &nonce,
            1,
            "cn",
            method,
            uri,
        )
    }

    fn run(p: &mut Policy, who: &Principal, text: &str, d: &Decision) -> Authz {
        let mut h = [Header::EMPTY; 32];
        let Ok(Status::Complete(m)) =
            parse(text.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
        else {
            panic!("{text}")
        };
        let e = m.validate(&Limits::default()).unwrap();
        let info = FlowInfo {
            principal: who.clone(),
            source: Some("192.0.2.1:5060".parse().unwrap()),
            iface: None,
        };
        let proxy = crate::proxy::Proxy::new(crate::proxy::ProxyConfig {
            domains: DOMAINS.iter().map(|s| s.to_string()).collect(),
            local_hosts: vec!["proxy.example.com".into(), "[2001:db8::10]".into()],
            ..Default::default()
        });
        p.authorize(Instant::now(), &Flow::Conn(1), &info, &m, &e, d, &proxy)
    }

    #[test]
    fn a_digest_for_one_request_uri_does_not_pass_for_another() {
        // RFC 3261 §22.4: the digest-uri is the Request-URI. Credentials made for a call
        // to a local user, sent on with another target (an on-path attacker on plain TCP
        // holding the call back), are refused — they passed while any URI in our domains
        // did. The server's own address without a user (SIPp's style) still passes.
        let bob = "sip:bob@example.com";
        let alice = "sip:alice@example.com";
        let to_a = Decision::ToPeer("a".into());
        let mut p = policy();
        let anon = Principal::anonymous();
        // Challenged again (407), the attempt counted as a digest-uri mismatch.
        let mismatch = |p: &mut Policy, msg: &String, d: &Decision, what: String| {
            assert!(
                matches!(
                    run(p, &Principal::anonymous(), msg, d),
                    Authz::Challenge { code: 407, .. }
                ),
                "{what}"
            );
            assert_eq!(p.poll_refusal().map(|r| r.label), Some("auth_uri_mismatch"));
        };
        let moved = req(
            "INVITE",
            "sip:+19005550100@peer-a.test",
            alice,
            "sip:+19005550100@peer-a.test",
            &creds(&p, "alice", "pw", "INVITE", bob, 1),
        );
        mismatch(
            &mut p,
            &moved,
            &to_a,
            format!("credentials for {bob} passed for another target"),
        );
        // The user part is case-sensitive (RFC 3261 §19.1.4): `BOB` is another user.
        let other_case = req(
            "INVITE",
            "sip:BOB@example.com",
            alice,
            "sip:BOB@example.com",
            &creds(&p, "alice", "pw", "INVITE", bob, 2),
        );
        let to_bob_upper = Decision::Lookup {
            aor: "sip:BOB@example.com".into(),
        };
        mismatch(
            &mut p,
            &other_case,
            &to_bob_upper,
            format!("credentials for {bob} passed for sip:BOB@example.com"),
        );
        // The host is not (nor the order of parameters).
        let host_case = req(
            "INVITE",
            "sip:bob@EXAMPLE.com;transport=tls;x=1",
            alice,
            bob,
            &creds(
                &p,
                "alice",
                "pw",
                "INVITE",
                "sip:bob@example.com;x=1;transport=tls",
                3,
            ),
        );
        let local = Decision::Lookup { aor: bob.into() };
        assert!(matches!(
            run(&mut p, &anon, &host_case, &local),
            Authz::Allow(_)
        ));
        let sipp = req(
            "INVITE",
            bob,
            alice,
            bob,
            &creds(&p, "alice", "pw", "INVITE", "sip:proxy.example.com", 4),
        );
        assert!(matches!(run(&mut p, &anon, &sipp, &local), Authz::Allow(_)));
        // A domain we serve is not this server: credentials for `OPTIONS sip:example.com`
        // do not pass for a call.
        let domain = req(
            "INVITE",
            bob,
            alice,
            bob,
            &creds(&p, "alice", "pw", "INVITE", "sip:example.com", 5),
        );
        mismatch(
            &mut p,
            &domain,
            &local,
            format!("credentials for sip:example.com passed for {bob}"),
        );
    }

    #[test]
    fn what_an_operator_did_not_list_is_not_a_way_around_authentication() {
        // With a short `auth.challenge` (an operator who lets anonymous MESSAGEs reach
        // users), a From in one of our domains is still challenged — also written with a
        // trailing dot, or naming this server itself; an extension method nobody listed is
        // challenged whatever its From.
        let mut p = policy();
        p.cfg.challenge = vec!["REGISTER".into(), "INVITE".into()];
        let anon = Principal::anonymous();
        let local = Decision::Lookup {
            aor: "sip:bob@example.com".into(),
        };
        let bob = "sip:bob@example.com";
        for (what, method, from, want) in [
            (
                "foreign From, unlisted method",
                "MESSAGE",
                "sip:x@elsewhere.org",
                0,
            ),
            ("our domain", "MESSAGE", "sip:ceo@example.com", 407),
            (
                "our domain, absolute",
                "MESSAGE",
                "sip:ceo@example.com.",
                407,
            ),
            (
                "this server's host",
                "MESSAGE",
                "sip:ceo@proxy.example.com",
                407,
            ),
            ("an extension method", "FOO", "sip:x@elsewhere.org", 407),
            ("a partner's domain", "MESSAGE", "sip:ceo@peer-a.test", 407),
            (
                "this server's IPv6 address, written otherwise",
                "MESSAGE",
                "sip:ceo@[2001:db8:0:0::10]",
                407,
            ),
        ] {
            let got = outcome(&run(
                &mut p,
                &anon,
                &req(method, bob, from, bob, ""),
                &local,
            ));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn a_register_is_for_one_of_our_aors_in_the_domain_it_was_sent_to() {
        // RFC 3261 §10.3 steps 1 and 3; with authentication off as well (the table is for
        // our users, whoever may write it).
        for authenticate in [true, false] {
            let mut p = policy();
            p.cfg.authenticate = authenticate;
            let anon = Principal::anonymous();
            for (what, ruri, to, want) in [
                (
                    "a foreign AOR",
                    "sip:example.com",
                    "sip:x@elsewhere.org",
                    404,
                ),
                (
                    "another of our domains than the Request-URI's",
                    "sip:example.com",
                    "sip:bob@example.net",
                    404,
                ),
                (
                    "any of ours, sent to this server",
                    "sip:proxy.example.com",
                    "sip:bob@example.net",
                    if authenticate { 401 } else { 0 },
                ),
                (
                    "the Request-URI's domain",
                    "sip:example.com",
                    "sip:bob@EXAMPLE.com.",
                    if authenticate { 401 } else { 0 },
                ),
            ] {
                let got = outcome(&run(
                    &mut p,
                    &anon,
                    &req("REGISTER", ruri, to, to, ""),
                    &Decision::Register,
                ));
                assert_eq!(got, want, "{what} (authenticate = {authenticate})");
            }
        }
    }

    /// 0 = allowed, else the status sent (challenge or refusal).
    fn outcome(a: &Authz) -> u16 {
        match a {
            Authz::Allow(_) => 0,
            Authz::Challenge { code, .. } => *code,
            Authz::Deny(d) => d.code,
        }
    }

    #[test]
    fn a_cluster_node_relays_lookups_for_anyone_removes_but_never_registers_or_transits() {
        let mut p = policy();
        let node = Principal::Partner("node-b".into());
        let lookup = Decision::Lookup {
            aor: "sip:alice@example.com".into(),
        };
        // A call from a partner's user, or from ours, relayed by the node holding the caller.
        for from in ["sip:x@peer-a.test", "sip:bob@example.com"] {
            let r = req(
                "INVITE",
                "sip:alice@example.com",
                from,
                "sip:alice@example.com",
                "",
            );
            assert_eq!(outcome(&run(&mut p, &node, &r, &lookup)), 0, "{from}");
        }
        // An ordinary partner is held to its domains for the same request.
        let a = Principal::Partner("a".into());
        let r = req(
            "INVITE",
            "sip:alice@example.com",
            "sip:bob@example.com",
            "sip:alice@example.com",
            "",
        );
        assert_eq!(outcome(&run(&mut p, &a, &r, &lookup)), 403);
        // Inside a dialog a node's request carries our Record-Route entry: one that comes to
        // a lookup here (a client that kept the other node's signed route of one dialog and
        // dropped ours, naming any of our users, any From) is refused. Its ACK is not.
        for (method, want) in [("MESSAGE", 403), ("BYE", 403), ("INVITE", 403), ("ACK", 0)] {
            let r = req(
                method,
                "sip:alice@example.com",
                "sip:ceo@example.com",
                "sip:alice@example.com",
                "",
            )
            .replace(
                "To: <sip:alice@example.com>",
                "To: <sip:alice@example.com>;tag=t1",
            );
            assert_eq!(outcome(&run(&mut p, &node, &r, &lookup)), want, "{method}");
        }
        let r = req(
            "REGISTER",
            "sip:example.com",
            "sip:bob@example.com",
            "sip:bob@example.com",
            "",
        );
        assert_eq!(outcome(&run(&mut p, &node, &r, &Decision::Register)), 403);
        // Except to pass on what a REGISTER it answered removes (only the node holding a
        // binding writes it): removals only, and only from a node.
        for (extra, want) in [
            ("Contact: *\r\nExpires: 0\r\n", 0),
            (
                "Contact: <sip:bob@192.0.2.9>;+sip.instance=\"<urn:uuid:1>\";expires=0\r\n",
                0,
            ),
            (
                "Contact: <sip:bob@192.0.2.9>;expires=0, <sip:bob@h>\r\n",
                403,
            ),
        ] {
            let r = req(
                "REGISTER",
                "sip:example.com",
                "sip:bob@example.com",
                "sip:bob@example.com",
                extra,
            );
            assert_eq!(
                outcome(&run(&mut p, &node, &r, &Decision::Register)),
                want,
                "{extra}"
            );
            assert_eq!(outcome(&run(&mut p, &a, &r, &Decision::Register)), 403);
        }
        let r = req(
            "INVITE",
            "sip:x@peer-a.test",
            "sip:bob@example.com",
            "sip:x@peer-a.test",
            "",
        );
        assert_eq!(
            outcome(&run(&mut p, &node, &r, &Decision::ToPeer("a".into()))),
            403,
            "a node is not a transit to partners unless relay_to says so"
        );
    }

    #[test]
    fn who_may_do_what() {
        let anon = Principal::anonymous();
        let cert_alice = Principal::Client {
            cert_aors: vec!["sip:alice@example.com".into()],
        };
        let (pa, pb) = (
            Principal::Partner("a".into()),
            Principal::Partner("b".into()),
        );
        let reg = Decision::Register;
        let local = Decision::Lookup {
            aor: "sip:bob@example.com".into(),
        };
        let to_b = Decision::ToPeer("b".into());
        let to_a = Decision::ToPeer("a".into());
        let in_dialog = Decision::ToFlow(Flow::Conn(7));
        let alice = "sip:alice@example.com";
        let bob = "sip:bob@example.com";
        let mut p = policy();
        let c = |p: &Policy, m: &str, ruri: &str, nc| creds(p, "alice", "pw", m, ruri, nc);
        let cases: Vec<(&str, &Principal, String, &Decision, u16)> = vec![
            // Registration.
            (
                "anonymous REGISTER",
                &anon,
                req("REGISTER", "sip:example.com", alice, alice, ""),
                &reg,
                401,
            ),
            (
                "anonymous wildcard de-REGISTER",
                &anon,
                req(
                    "REGISTER",
                    "sip:example.com",
                    bob,
                    bob,
                    "Contact: *\r\nExpires: 0\r\n",
                ),
                &reg,
                401,
            ),
            (
                "digest REGISTER own AOR",
                &anon,
                req(
                    "REGISTER",
                    "sip:example.com",
                    alice,
                    alice,
                    &c(&p, "REGISTER", "sip:example.com", 1),
                ),
                &reg,
                0,
            ),
            (
                "digest REGISTER another's AOR",
                &anon,
                req(
                    "REGISTER",
                    "sip:example.com",
                    alice,
                    bob,
                    &c(&p, "REGISTER", "sip:example.com", 2),
                ),
                &reg,
                403,
            ),
            (
                // An absolute domain name (one trailing dot) is the same AOR: before, the
                // REGISTER was refused 404 and such a From failed the identity check.
                "digest REGISTER own AOR, written absolute",
                &anon,
                req(
                    "REGISTER",
                    "sip:example.com",
                    alice,
                    "sip:alice@example.com.",
                    &c(&p, "REGISTER", "sip:example.com", 40),
                ),
                &reg,
                0,
            ),
            (
                "wrong password",
                &anon,
                req(
                    "REGISTER",
                    "sip:example.com",
                    alice,
                    alice,
                    &creds(&p, "alice", "nope", "REGISTER", "sip:example.com", 3),
                ),
                &reg,
                401,
            ),
            (
                "REGISTER a foreign AOR (RFC 3261 §10.3)",
                &anon,
                req(
                    "REGISTER",
                    "sip:example.com",
                    alice,
                    "sip:alice@elsewhere.org",
                    "",
                ),
                &reg,
                404,
            ),
            (
                "certificate REGISTER own AOR",
                &cert_alice,
                req("REGISTER", "sip:example.com", alice, alice, ""),
                &reg,
                0,
            ),
            (
                "certificate REGISTER another's AOR",
                &cert_alice,
                req("REGISTER", "sip:example.com", bob, bob, ""),
                &reg,
                403,
            ),
            (
                "partner REGISTER",
                &pa,
                req(
                    "REGISTER",
                    "sip:example.com",
                    "sip:x@peer-a.test",
                    alice,
                    "",
                ),
                &reg,
                403,
            ),
            // Requests from clients.
            (
                "anonymous MESSAGE claiming a partner's user, to a partner",
                &anon,
                req(
                    "MESSAGE",
                    "sip:bob@peer-b.test",
                    "sip:mallory@peer-a.test",
                    "sip:bob@peer-b.test",
                    "",
                ),
                &to_b,
                407,
            ),
            (
                "anonymous INVITE to a local user",
                &anon,
                req("INVITE", bob, "sip:x@elsewhere.org", bob, ""),
                &local,
                407,
            ),
            (
                "digest INVITE with someone else's From",
                &anon,
                req(
                    "INVITE",
                    bob,
                    "sip:mallory@peer-a.test",
                    bob,
                    &c(&p, "INVITE", bob, 4),
                ),
                &local,
                403,
            ),
            (
                "digest INVITE as itself to a partner",
                &anon,
                req(
                    "INVITE",
                    "sip:carol@peer-b.test",
                    alice,
                    "sip:carol@peer-b.test",
                    &c(&p, "INVITE", "sip:carol@peer-b.test", 5),
                ),
                &to_b,
                0,
            ),
            (
                // Only AORs of ours are identities we vouch for: a subscriber entry listing
                // a partner's AOR spoke for the partner's domain, with our PAI.
                "digest INVITE to a partner From a partner's AOR its entry lists",
                &anon,
                req(
                    "INVITE",
                    "sip:carol@peer-b.test",
                    "sip:x@peer-a.test",
                    "sip:carol@peer-b.test",
                    &creds(&p, "trunk", "pw", "INVITE", "sip:carol@peer-b.test", 6),
                ),
                &to_b,
                403,
            ),
            (
                "digest INVITE to a partner as its own AOR of ours",
                &anon,
                req(
                    "INVITE",
                    "sip:carol@peer-b.test",
                    "sip:trunk@example.com",
                    "sip:carol@peer-b.test",
                    &creds(&p, "trunk", "pw", "INVITE", "sip:carol@peer-b.test", 7),
                ),
                &to_b,
                0,
            ),
            (
                "certificate MESSAGE as itself",
                &cert_alice,
                req("MESSAGE", bob, alice, bob, ""),
                &local,
                0,
            ),
            (
                "certificate MESSAGE as another",
                &cert_alice,
                req("MESSAGE", bob, bob, bob, ""),
                &local,
                403,
            ),
            (
                // Without our route, an anonymous BYE to a local user was looked up and
                // delivered: anyone who knew a dialog's Call-ID and tags could end it.
                "anonymous BYE to a local user, outside our route",
                &anon,
                req("BYE", bob, "sip:x@elsewhere.org", bob, ""),
                &local,
                407,
            ),
            (
                "in-dialog request on a signed route",
                &anon,
                req("BYE", "sip:bob@10.0.0.2", "sip:x@elsewhere.org", bob, ""),
                &in_dialog,
                0,
            ),
            (
                "ACK that would need credentials",
                &anon,
                req("ACK", bob, alice, bob, ""),
                &local,
                403,
            ),
            // Partners.
            (
                "partner From its own domain to a local user",
                &pa,
                req("MESSAGE", bob, "sip:x@peer-a.test", bob, ""),
                &local,
                0,
            ),
            (
                "partner From another partner's domain",
                &pa,
                req("MESSAGE", bob, "sip:x@peer-b.test", bob, ""),
                &local,
                403,
            ),
            (
                "partner From ours",
                &pa,
                req("MESSAGE", bob, alice, bob, ""),
                &local,
                403,
            ),
            (
                "partner PAI in another partner's domain",
                &pa,
                req(
                    "MESSAGE",
                    bob,
                    "sip:x@peer-a.test",
                    bob,
                    "P-Asserted-Identity: <sip:y@peer-b.test>\r\n",
                ),
                &local,
                403,
            ),
            (
                "partner PAI as a tel: URI",
                &pa,
                req(
                    "MESSAGE",
                    bob,
                    "sip:x@peer-a.test",
                    bob,
                    "P-Asserted-Identity: <tel:+15551234>\r\n",
                ),
                &local,
                403,
            ),
            (
                "partner relaying to another partner",
                &pa,
                req(
                    "MESSAGE",
                    "sip:bob@peer-b.test",
                    "sip:x@peer-a.test",
                    "sip:bob@peer-b.test",
                    "",
                ),
                &to_b,
                403,
            ),
            (
                "partner relaying where configured",
                &pb,
                req(
                    "MESSAGE",
                    "sip:z@peer-a.test",
                    "sip:x@peer-b.test",
                    "sip:z@peer-a.test",
                    "",
                ),
                &to_a,
                0,
            ),
            (
                "partner in dialog",
                &pa,
                req("BYE", bob, "sip:x@peer-b.test", bob, ""),
                &in_dialog,
                0,
            ),
            (
                // A signed dialog route says where a request may go, not who it may claim
                // to be: before, this reached bob with the CEO asserted; now it goes on
                // without its PAI (checked below).
                "partner in dialog asserting one of our users",
                &pa,
                req(
                    "MESSAGE",
                    bob,
                    "sip:x@peer-a.test",
                    bob,
                    "P-Asserted-Identity: <sip:ceo@example.com>\r\n",
                ),
                &in_dialog,
                0,
            ),
            (
                "partner in dialog asserting its own user",
                &pa,
                req(
                    "BYE",
                    bob,
                    "sip:x@peer-a.test",
                    bob,
                    "P-Asserted-Identity: <sip:x@peer-a.test>\r\n",
                ),
                &in_dialog,
                0,
            ),
            (
                // A `<` in a parameter value: one identity to our splitter, two to
                // Kamailio's (the second ours). Refused like an unreadable one.
                "partner PAI hiding a second identity in a parameter",
                &pa,
                req(
                    "MESSAGE",
                    bob,
                    "sip:x@peer-a.test",
                    bob,
                    "P-Asserted-Identity: <sip:x@peer-a.test>;x=<y, <sip:ceo@example.com>\r\n",
                ),
                &local,
                403,
            ),
            (
                // A quoted display name holding a URI: the partner's identity to us, ours
                // to a reader that takes the first `<…>`.
                "partner PAI whose display name holds a URI",
                &pa,
                req(
                    "MESSAGE",
                    bob,
                    "sip:x@peer-a.test",
                    bob,
                    "P-Asserted-Identity: \"<sip:ceo@example.com>\" <sip:x@peer-a.test>\r\n",
                ),
                &local,
                403,
            ),
            (
                "client From whose display name holds a URI",
                &cert_alice,
                req("MESSAGE", bob, alice, bob, "").replace(
                    "From: <sip:alice@example.com>",
                    "From: \"<sip:ceo@example.com>\" <sip:alice@example.com>",
                ),
                &local,
                403,
            ),
            (
                "client From whose display name is plain",
                &cert_alice,
                req("MESSAGE", bob, alice, bob, "").replace(
                    "From: <sip:alice@example.com>",
                    "From: \"Alice (Sales)\" <sip:alice@example.com>",
                ),
                &local,
                0,
            ),
            (
                "partner From whose display name holds a URI",
                &pa,
                req("MESSAGE", bob, "sip:x@peer-a.test", bob, "").replace(
                    "From: <sip:x@peer-a.test>",
                    "From: \"<sip:ceo@example.com>\" <sip:x@peer-a.test>",
                ),
                &local,
                403,
            ),
            (
                "partner PAI whose display name is plain",
                &pa,
                req(
                    "MESSAGE",
                    bob,
                    "sip:x@peer-a.test",
                    bob,
                    "P-Asserted-Identity: \"X (Alpha)\" <sip:x@peer-a.test>\r\n",
                ),
                &local,
                0,
            ),
            (
                "partner PAI with a quoted parameter holding brackets",
                &pa,
                req(
                    "MESSAGE",
                    bob,
                    "sip:x@peer-a.test",
                    bob,
                    "P-Asserted-Identity: <sip:x@peer-a.test>;note=\"<a>\"\r\n",
                ),
                &local,
                0,
            ),
            (
                // An unbalanced quote: this parser cannot split it, a downstream one may
                // read `sip:ceo@example.com` in it. Before, it was neither checked nor
                // removed.
                "partner PAI that cannot be read",
                &pa,
                req(
                    "MESSAGE",
                    bob,
                    "sip:x@peer-a.test",
                    bob,
                    "P-Asserted-Identity: \"Bob \\\" <sip:ceo@example.com>\r\n",
                ),
                &local,
                403,
            ),
        ];
        for (what, who, text, d, want) in cases {
            let got = run(&mut p, who, &text, d);
            assert_eq!(outcome(&got), want, "{what}: {got:?}");
        }
        let labels: Vec<&str> = std::iter::from_fn(|| p.poll_refusal())
            .map(|r| r.label)
            .collect();
        for l in [
            "register_not_owner",
            "auth_wrong_password",
            "register_foreign_aor",
            "partner_register",
            "from_not_identity",
            "partner_from_domain",
            "partner_pai_domain",
            "relay_not_allowed",
        ] {
            assert!(labels.contains(&l), "{l} not in {labels:?}");
        }
        // In a dialog, a partner's PAI outside its domains is removed, not passed on.
        let forged = req(
            "BYE",
            bob,
            "sip:x@peer-a.test",
            bob,
            "P-Asserted-Identity: <sip:ceo@example.com>\r\n",
        );
        match run(&mut p, &pa, &forged, &in_dialog) {
            Authz::Allow(g) => {
                assert_eq!(g.source, Source::PartnerUnasserted("a".into()));
                let mut h = [Header::EMPTY; 32];
                let Ok(Status::Complete(m)) = parse(
                    forged.as_bytes(),
                    &mut h,
                    &Limits::default(),
                    Framing::Stream,
                ) else {
                    panic!()
                };
                let edit = p.identity_edit(&g, &m, &Flow::Conn(7), None, &["example.com".into()]);
                assert!(edit.strip_pai);
            }
            other => panic!("{other:?}"),
        }
        // An open policy takes clients at their word (labs only), but partner rules hold.
        let mut open = Policy::open(Instant::now());
        assert_eq!(
            outcome(&run(
                &mut open,
                &anon,
                &req("REGISTER", "sip:example.com", bob, bob, ""),
                &reg
            )),
            0
        );
    }

    #[test]
    fn challenges_offer_each_algorithm_and_say_which_header() {
        let mut p = policy();
        let a = run(
            &mut p,
            &Principal::anonymous(),
            &req(
                "INVITE",
                "sip:bob@example.com",
                "sip:alice@example.com",
                "sip:bob@example.com",
                "",
            ),
            &Decision::Lookup {
                aor: "sip:bob@example.com".into(),
            },
        );
        let Authz::Challenge { code, headers } = a else {
            panic!("{a:?}")
        };
        assert_eq!(code, 407);
        let algs: Vec<Algorithm> = headers
            .iter()
            .map(|(n, v)| {
                assert_eq!(*n, "Proxy-Authenticate");
                crate::auth::parse_challenge(v).unwrap().2
            })
            .collect();
        assert_eq!(algs, vec![Algorithm::Sha256, Algorithm::Sha512_256]);
        assert_eq!(p.challenges(), 1);
    }

    #[test]
    fn anonymous_callers_rfc_3323() {
        // A withheld caller ID (From `sip:anonymous@anonymous.invalid`) was refused: 403
        // "From Does Not Match Identity" to an authenticated client, 403 "From Not In
        // Partner Domains" to a partner — every carrier's anonymous call.
        let anonymous = "sip:anonymous@anonymous.invalid";
        let bob = "sip:bob@example.com";
        let local = Decision::Lookup { aor: bob.into() };
        let to_a = Decision::ToPeer("a".into());
        let mut p = policy();
        let granted = |a: &Authz| match a {
            Authz::Allow(Grant {
                source: Source::Client(Some(aor)),
            }) => aor.clone(),
            other => panic!("{other:?}"),
        };
        // An authenticated client: the identity vouched for (toward partners in our trust
        // domain) is the authenticated one.
        let creds = creds(&p, "alice", "pw", "INVITE", bob, 1);
        let r = run(
            &mut p,
            &Principal::anonymous(),
            &req(
                "INVITE",
                bob,
                anonymous,
                bob,
                &format!("Privacy: id\r\n{creds}"),
            ),
            &local,
        );
        assert_eq!(granted(&r), "sip:alice@example.com");
        // A certificate with two AORs: the one a P-Preferred-Identity names, if it is ours;
        // else the first of ours (never a partner's AOR an entry lists by mistake).
        let two = Principal::Client {
            cert_aors: vec![
                "sip:x@peer-a.test".into(),
                "sip:alice@example.com".into(),
                "sip:al@example.com".into(),
            ],
        };
        for (ppi, want) in [
            ("", "sip:alice@example.com"),
            (
                "P-Preferred-Identity: <sip:al@example.com>\r\n",
                "sip:al@example.com",
            ),
            (
                "P-Preferred-Identity: <sip:x@peer-a.test>\r\n",
                "sip:alice@example.com",
            ),
            (
                "P-Preferred-Identity: <sip:bob@example.com>\r\n",
                "sip:alice@example.com",
            ),
        ] {
            let r = run(
                &mut p,
                &two,
                &req(
                    "INVITE",
                    "sip:carol@peer-a.test",
                    anonymous,
                    "sip:carol@peer-a.test",
                    ppi,
                ),
                &to_a,
            );
            assert_eq!(granted(&r), want, "{ppi}");
        }
        // Nobody authenticated: challenged as before where the request needs it.
        assert_eq!(
            outcome(&run(
                &mut p,
                &Principal::anonymous(),
                &req(
                    "INVITE",
                    "sip:carol@peer-a.test",
                    anonymous,
                    "sip:carol@peer-a.test",
                    ""
                ),
                &to_a
            )),
            407
        );
        // A partner's host written absolute (one trailing dot) is the same host.
        let text = req(
            "INVITE",
            bob,
            "sip:carol@peer-a.test.",
            bob,
            "P-Asserted-Identity: <sip:carol@PEER-A.test.>\r\n",
        );
        assert_eq!(
            outcome(&run(&mut p, &Principal::Partner("a".into()), &text, &local)),
            0
        );
        // A partner's anonymous call: allowed, its assertion still held to its domains.
        let pa = Principal::Partner("a".into());
        for (pai, want) in [
            ("", 0),
            (
                "P-Asserted-Identity: <sip:+15551234@peer-a.test;user=phone>\r\n",
                0,
            ),
            ("P-Asserted-Identity: <sip:ceo@example.com>\r\n", 403),
        ] {
            let text = req(
                "INVITE",
                bob,
                anonymous,
                bob,
                &format!("{pai}Privacy: id\r\n"),
            );
            assert_eq!(outcome(&run(&mut p, &pa, &text, &local)), want, "{pai}");
        }
        // An `anonymous` user in another host is not anonymous.
        let r = run(
            &mut p,
            &pa,
            &req("INVITE", bob, "sip:anonymous@elsewhere.org", bob, ""),
            &local,
        );
        assert_eq!(outcome(&r), 403);
        // A user of our second domain calling anonymously is challenged in its own realm —
        // the one its P-Preferred-Identity names, or the one its connection registered in —
        // not the first domain's, which it could never answer (each try a failed login).
        let realm_of = |a: &Authz| match a {
            Authz::Challenge { headers, .. } => {
                let v = String::from_utf8_lossy(&headers[0].1).into_owned();
                v.split("realm=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
                    .to_string()
            }
            other => panic!("{other:?}"),
        };
        let mut p = policy();
        let anon = Principal::anonymous();
        let invite = |extra: &str| {
            req(
                "INVITE",
                "sip:carol@peer-a.test",
                anonymous,
                "sip:carol@peer-a.test",
                extra,
            )
        };
        assert_eq!(
            realm_of(&run(&mut p, &anon, &invite(""), &to_a)),
            "example.com"
        );
        assert_eq!(
            realm_of(&run(
                &mut p,
                &anon,
                &invite("P-Preferred-Identity: <sip:nina@example.net>\r\n"),
                &to_a
            )),
            "example.net"
        );
        // Registered on this connection (flow 1) in example.net: that realm from then on.
        let reg_creds = nina_creds(&p, "REGISTER", "sip:example.net");
        let reg = req(
            "REGISTER",
            "sip:example.net",
            "sip:nina@example.net",
            "sip:nina@example.net",
            &format!("Authorization: {reg_creds}\r\n"),
        );
        assert_eq!(outcome(&run(&mut p, &anon, &reg, &Decision::Register)), 0);
        assert_eq!(
            realm_of(&run(&mut p, &anon, &invite(""), &to_a)),
            "example.net"
        );
    }

    #[test]
    fn a_from_or_to_parameter_holding_another_address_is_refused() {
        // `tag=1, <sip:ceo@example.com>`: alice's tag to us, a second address to a reader
        // that splits on commas or takes the last `<…>`. Refused from clients and partners
        // alike; a quoted value may hold anything.
        let mut p = policy();
        let bob = "sip:bob@example.com";
        let local = Decision::Lookup { aor: bob.into() };
        let anon = Principal::anonymous();
        let partner = Principal::Partner("a".into());
        for (who, principal) in [("client", &anon), ("partner", &partner)] {
            for bad in [
                req("MESSAGE", bob, "sip:alice@example.com", bob, "")
                    .replace(";tag=f", ";tag=1, <sip:ceo@example.com>"),
                // A quoted string with more after it is no quoted string.
                req("MESSAGE", bob, "sip:alice@example.com", bob, "")
                    .replace(";tag=f", ";tag=f;x=\"y\", <sip:ceo@example.com>"),
                req("MESSAGE", bob, "sip:alice@example.com", bob, "").replace(
                    "To: <sip:bob@example.com>",
                    "To: <sip:bob@example.com>;x=<sip:ceo@example.com>",
                ),
            ] {
                match run(&mut p, principal, &bad, &local) {
                    Authz::Deny(d) => {
                        assert_eq!((d.code, d.label), (400, "identity_params"), "{who}")
                    }
                    other => panic!("{who}: {other:?}"),
                }
            }
        }
        let quoted = req("MESSAGE", bob, "sip:x@peer-a.test", bob, "")
            .replace(";tag=f", ";tag=f;x=\"a, <b>\"");
        assert!(matches!(
            run(&mut p, &partner, &quoted, &local),
            Authz::Allow(_)
        ));
    }

    #[test]
    fn of_two_credentials_the_one_for_the_challenged_realm_is_read() {
        // A UA that answered challenges in two of our realms sends both: the one for its
        // From's realm is the one read. The first of ours was taken, and the request was
        // refused 403 as not its From.
        let mut p = policy();
        let anon = Principal::anonymous();
        let bob = "sip:bob@example.com";
        let nina = nina_creds(&p, "INVITE", bob);
        let both = format!(
            "{}Proxy-Authorization: {nina}\r\n",
            creds(&p, "alice", "pw", "INVITE", bob, 1)
        );
        let invite = req("INVITE", bob, "sip:nina@example.net", bob, &both);
        let local = Decision::Lookup { aor: bob.into() };
        match run(&mut p, &anon, &invite, &local) {
            Authz::Allow(g) => assert_eq!(
                g.source,
                Source::Client(Some("sip:nina@example.net".into()))
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_carrier_that_asserts_numbers_may_send_tel_identities() {
        // Carriers assert callers by number (`tel:+1…`), which no domain holds: refused (403)
        // from every partner before; allowed from one with `numbers = true`, for global
        // numbers only.
        let bob = "sip:bob@example.com";
        let local = Decision::Lookup { aor: bob.into() };
        let pa = Principal::Partner("a".into());
        let cases = [
            ("tel:+1-555-123-4567", "", true),
            (
                "sip:x@peer-a.test",
                "P-Asserted-Identity: <tel:+15551234>\r\n",
                true,
            ),
            ("tel:+15551234;cpc=ordinary", "", true),
            ("tel:5551234;phone-context=+1", "", false),
            ("tel:+15551234;Phone-Context=example.com", "", false),
            ("tel:+", "", false),
            ("tel:+1555x", "", false),
        ];
        for numbers in [false, true] {
            let mut p = policy();
            p.cfg.partners[0].numbers = numbers;
            for (from, pai, global) in cases {
                let text = req("INVITE", bob, from, bob, pai);
                let want = if numbers && global { 0 } else { 403 };
                assert_eq!(
                    outcome(&run(&mut p, &pa, &text, &local)),
                    want,
                    "{from} {pai} (numbers = {numbers})"
                );
            }
        }
    }

    #[test]
    fn an_asserted_identity_asked_private_stays_inside_the_trust_domain() {
        // RFC 3325 §5: with `Privacy: id`, P-Asserted-Identity is removed toward anyone
        // outside the trust domain — a partner we do not assert identities to
        // (`assert_identity = false`) as much as a client. It went to such a partner.
        let mut p = policy();
        p.cfg.partners.push(PartnerPolicy {
            name: "c".into(),
            domains: vec!["peer-c.test".into()],
            relay_to: vec![],
            assert_identity: false,
            numbers: false,
            node: false,
        });
        let domains = vec!["example.com".to_string()];
        let from_b = Grant {
            source: Source::Partner("b".into()),
        };
        for (privacy, to, strip) in [
            ("Privacy: id\r\n", "c", true),
            ("Privacy: id\r\n", "a", false),
            ("Privacy: id\r\n", "node-b", false),
            ("", "c", false),
        ] {
            let text = req(
                "INVITE",
                "sip:x@peer-c.test",
                "sip:alice@peer-b.test",
                "sip:x@peer-c.test",
                &format!("P-Asserted-Identity: <sip:alice@peer-b.test>\r\n{privacy}"),
            );
            let mut h = [Header::EMPTY; 32];
            let Ok(Status::Complete(m)) =
                parse(text.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
            else {
                panic!()
            };
            let e = p.identity_edit(&from_b, &m, &Flow::Peer(to.into()), None, &domains);
            assert_eq!(e.strip_pai, strip, "request to {to} {privacy:?}");
            // An answer that asks privacy, going up to `to`.
            let resp = format!(
                "SIP/2.0 200 OK\r\nVia: SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKp\r\nFrom: <sip:x@peer-c.test>;tag=f\r\nTo: <sip:alice@peer-b.test>;tag=t\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nP-Asserted-Identity: <sip:alice@peer-b.test>\r\n{privacy}Content-Length: 0\r\n\r\n"
            );
            let mut h = [Header::EMPTY; 32];
            let Ok(Status::Complete(m)) =
                parse(resp.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
            else {
                panic!()
            };
            // (An answer for a node's client is stripped here, as for ours: the caller
            // passes no partner for a node.)
            let (to_partner, strip) = match to {
                "node-b" => (None, !privacy.is_empty()),
                _ => (Some(to), strip),
            };
            let (pai, _) = p.strips_response_identity(&m, Some("b"), to_partner);
            assert_eq!(pai, strip, "answer to {to} {privacy:?}");
        }
        // An anonymous caller's identity, asserted by the node it called from, does not
        // reach the callee on this node even without `Privacy: id` (it did: the node's PAI
        // was passed to local users unless the request asked privacy).
        let from_node = Grant {
            source: Source::Partner("node-b".into()),
        };
        let text = req(
            "INVITE",
            "sip:bob@example.com",
            "sip:anonymous@anonymous.invalid",
            "sip:bob@example.com",
            "P-Asserted-Identity: <sip:alice@example.com>\r\n",
        );
        let mut h = [Header::EMPTY; 32];
        let Ok(Status::Complete(m)) =
            parse(text.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
        else {
            panic!()
        };
        assert!(
            p.identity_edit(&from_node, &m, &Flow::Conn(3), None, &domains)
                .strip_pai
        );
        assert!(
            !p.identity_edit(&from_node, &m, &Flow::Peer("a".into()), None, &domains)
                .strip_pai,
            "kept toward a partner in our trust domain"
        );
    }

    #[test]
    fn identity_headers_follow_rfc_3325() {
        let p = policy();
        let text = req(
            "INVITE",
            "sip:carol@peer-a.test",
            "sip:alice@example.com",
            "sip:carol@peer-a.test",
            "Privacy: id\r\n",
        );
        let mut h = [Header::EMPTY; 32];
        let Ok(Status::Complete(m)) =
            parse(text.as_bytes(), &mut h, &Limits::default(), Framing::Stream)
        else {
            panic!()
        };
        let domains = vec!["example.com".to_string()];
        let client = Grant {
            source: Source::Client(Some("sip:alice@example.com".into())),
        };
        let to_partner = p.identity_edit(&client, &m, &Flow::Peer("a".into()), None, &domains);
        assert!(to_partner.strip_pai && to_partner.strip_ppi);
        assert_eq!(
            to_partner.add_pai.as_deref(),
            Some("<sip:alice@example.com>")
        );
        let to_client = p.identity_edit(&client, &m, &Flow::Conn(3), None, &domains);
        assert_eq!(to_client.add_pai, None);
        let from_partner = Grant {
            source: Source::Partner("a".into()),
        };
        // Privacy: id toward a client removes the partner's assertion; toward a partner it stays.
        assert!(
            p.identity_edit(&from_partner, &m, &Flow::Conn(3), None, &domains)
                .strip_pai
        );
        assert!(
            !p.identity_edit(&from_partner, &m, &Flow::Peer("b".into()), None, &domains)
                .strip_pai
        );
    }
}
