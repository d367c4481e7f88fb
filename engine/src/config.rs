//! The configuration file: one `#[serde(default, deny_unknown_fields)]` tree, every field
//! documented with its unit and default, validated once at load with errors that name the
//! file, the key and the reason.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Identity, domains and cores.
    pub server: ServerConfig,
    /// Listening sockets (`[[listen]]`, one table per address).
    pub listen: Vec<ListenConfig>,
    /// TLS certificates and protocol policy.
    pub tls: TlsConfig,
    /// Federation partners (`[[peer]]`).
    pub peer: Vec<PeerConfig>,
    /// Registrar expiry policy.
    pub registrar: RegistrarSection,
    /// Message and connection limits.
    pub limits: LimitsConfig,
    /// Admin/metrics HTTP endpoint.
    pub admin: AdminConfig,
    /// Who may do what: client authentication (digest, client certificates) and the keys
    /// that sign what we hand out.
    pub auth: AuthSection,
    /// Several nodes sharing one location service (`[cluster]`); absent: a single node.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this node's place in a cluster of sipring nodes whose location service lives
/// in Redis Cluster (docs/CLUSTER.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name (one of `nodes`).
    pub node: String,
    /// Redis Cluster seed addresses (`host:port`); the client learns the rest of the cluster
    /// from them.
    pub store: Vec<String>,
    /// PEM roots trusted for the other nodes' certificates (the cluster's own CA).
    pub roots: PathBuf,
    /// PEM or DER CRLs for those roots. Default `[]`.
    pub crls: Vec<PathBuf>,
    /// How often this node refreshes its liveness key, in milliseconds. Default 1000.
    pub heartbeat_ms: u64,
    /// How long the liveness key lives without a refresh: a node silent this long is dead
    /// to the others (their calls to its users get 480). Default 3000.
    pub liveness_ms: u64,
    /// How long a store request may take before the request waiting on it gets 503
    /// (milliseconds). Default 500.
    pub store_timeout_ms: u64,
    /// A Redis hash of subscribers (field: `user@realm`, value: its `[[subscriber]]` table as
    /// `sipring subscriber` prints it), read at start and every `subscribers_refresh_s`, used
    /// after the subscriber file. Default none.
    pub subscribers_key: Option<String>,
    /// How often the store's subscribers are read again, seconds. Default 30.
    pub subscribers_refresh_s: u64,
    /// Every node of the cluster, this one included (`[[cluster.nodes]]`): the topology is
    /// the list of trusted servers for inter-node links.
    pub nodes: Vec<NodeConfig>,
    /// PEM roots trusted for the Redis servers' certificates, with `rediss://` seeds (TLS
    /// to the store). Default none: the system's roots.
    pub store_ca: Option<PathBuf>,
    /// PEM certificate chain this node presents to Redis (`tls-auth-clients yes`), with
    /// `store_key`. Default none.
    pub store_cert: Option<PathBuf>,
    /// PEM private key for `store_cert`. Default none.
    pub store_key: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node: String::new(),
            store: Vec::new(),
            roots: PathBuf::new(),
            crls: Vec::new(),
            heartbeat_ms: 1000,
            liveness_ms: 3000,
            store_timeout_ms: 500,
            subscribers_key: None,
            subscribers_refresh_s: 30,
            nodes: Vec::new(),
            store_ca: None,
            store_cert: None,
            store_key: None,
        }
    }
}

/// `[[cluster.nodes]]`: one node of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Its name (a token): in logs, metrics, the store and Record-Route flow tokens.
    pub name: String,
    /// Its inter-node (`mtls` listener) address.
    pub address: Option<SocketAddr>,
    /// The identity its certificate must carry (SAN dNSName or `sip:` URI, RFC 5922).
    pub identity: String,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Number of shards (executors, one pinned per CPU). 0 = every CPU this process may use
    /// from `first_cpu` on, and no more than its cgroup's CPU quota (rounded down). Default 0.
    pub shards: usize,
    /// Index, in the process's allowed CPU set (`taskset`, systemd `CPUAffinity=`, cpuset),
    /// of shard 0's CPU: shard i runs on the `(first_cpu + i)`-th allowed CPU. A value that
    /// does not fit (`first_cpu + shards` beyond the allowed CPUs) refuses to start. Default 0.
    pub first_cpu: usize,
    /// Pin each shard to its CPU (default). `false`: shards float within the allowed set and
    /// the scheduler places them (`first_cpu` unused; `shards` may exceed the CPUs) — for
    /// hosts whose CPUs are shared and capped by a quota rather than given by a cpuset (a
    /// container with a CPU limit), and for oversubscribed tests. Pinned is the fast choice
    /// on cores of its own.
    pub pin_shards: bool,
    /// SIP domains this server is registrar and proxy for. Default `["example.com"]`.
    pub domains: Vec<String>,
    /// The host name (or address) put in our Via and Record-Route. Default `"127.0.0.1"`.
    pub hostname: String,
    /// Further names and addresses that mean "this server" in Route and Request-URIs.
    /// Default `[]` (the hostname and listen addresses are always included).
    pub local_hosts: Vec<String>,
    /// Busy-poll this long before an idle shard parks, in microseconds: lower tail latency
    /// for CPU when idle. 0 disables. Default 0.
    pub spin_before_park_us: u64,
    /// glommio io_memory per shard, in KiB (only for direct file I/O, which sipring does not
    /// use). Default 512.
    pub io_memory_kib: usize,
    /// On SIGTERM, how long transactions may take to finish before connections close, in
    /// seconds. Default 10.
    pub drain_timeout_s: u64,
    /// Bounded capacity of each cross-shard channel, in messages. Default 1024.
    pub mesh_capacity: usize,
    /// How connections reach shards: `reuseport` (every shard listens; the kernel hashes
    /// connections over them — cheapest, but a few long-lived trunks can land on one core) or
    /// `balanced` (shard 0 accepts and hands each connection to the least-loaded shard).
    /// Default `reuseport`.
    pub accept: AcceptMode,
}

/// See [`ServerConfig::accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptMode {
    /// One SO_REUSEPORT listener per shard.
    #[default]
    Reuseport,
    /// Shard 0 accepts and balances.
    Balanced,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            shards: 0,
            first_cpu: 0,
            pin_shards: true,
            domains: vec!["example.com".into()],
            hostname: "127.0.0.1".into(),
            local_hosts: Vec::new(),
            spin_before_park_us: 0,
            io_memory_kib: 512,
            drain_timeout_s: 10,
            mesh_capacity: 1024,
            accept: AcceptMode::Reuseport,
        }
    }
}

/// The kind of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenKind {
    /// TLS for clients: the server authenticates; clients may optionally present a cert.
    Tls,
    /// Mutual TLS for federation peers: both sides present certificates.
    Mtls,
    /// Plain TCP, for trusted internal legs and tests.
    Tcp,
}

/// `[[listen]]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// `tls`, `mtls` or `tcp`. Default `tls`.
    pub kind: ListenKind,
    /// Address and port, IPv4 or `[IPv6]`. Default `127.0.0.1:5061`.
    pub address: SocketAddr,
    /// Listen backlog (SYN queue is bounded by the kernel's somaxconn). Default 4096.
    pub backlog: u32,
    /// For `tls` listeners: client certificates. `none` (not asked for), `optional` (asked
    /// for, verified against `tls.client_roots` if sent; a SAN `sip:user@domain` then
    /// authenticates that AOR without digest) or `required` (a handshake without a valid one
    /// is refused). Default `none`.
    pub client_auth: ClientAuth,
    /// The host peers reach this listener by, put in our Via and Record-Route toward flows
    /// of this listener (a name or address; no port: see `advertise_port`). Default:
    /// `server.hostname`.
    pub advertise: Option<String>,
    /// The port peers reach this listener by, when a NAT, a container's port mapping or a
    /// load balancer forwards another to it: put in our Via and Record-Route toward its
    /// flows, and a Route naming it is ours. Default: the listener's own port.
    pub advertise_port: Option<u16>,
}

/// See [`ListenConfig::client_auth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Clients are not asked for a certificate.
    #[default]
    None,
    /// Asked for; verified if sent.
    Optional,
    /// Required.
    Required,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            kind: ListenKind::Tls,
            address: "127.0.0.1:5061".parse().expect("literal"),
            backlog: 4096,
            client_auth: ClientAuth::None,
            advertise: None,
            advertise_port: None,
        }
    }
}

/// One server certificate (chain + key), selected by SNI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CertConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// SNI names this certificate answers. The first `[[tls.certificate]]` is also the
    /// default for clients that send no (or an unknown) SNI. Default `[]`.
    pub sni: Vec<String>,
}

/// `[tls]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificates (`[[tls.certificate]]`); the first is the default.
    pub certificate: Vec<CertConfig>,
    /// Protocol versions: any of `"1.2"`, `"1.3"`. Default `["1.2", "1.3"]`.
    pub versions: Vec<String>,
    /// Cipher suites by IANA name (e.g. `TLS13_AES_128_GCM_SHA256`). Empty = rustls's
    /// defaults. Default `[]`.
    pub cipher_suites: Vec<String>,
    /// Key-exchange groups in preference order: `X25519MLKEM768`, `X25519`, `secp256r1`,
    /// `secp384r1`. Default `["X25519", "secp256r1", "X25519MLKEM768"]` (classical first:
    /// 10-20 % more handshakes per second; put `X25519MLKEM768` first for
    /// harvest-now-decrypt-later protection).
    pub kx_groups: Vec<String>,
    /// Session resumption for clients (TLS 1.3 tickets, TLS 1.2 session IDs). Default true.
    pub resumption: bool,
    /// Handshakes slower than this are aborted, in milliseconds. Default 5000.
    pub handshake_timeout_ms: u64,
    /// A client must send its ClientHello within this long of connecting, in milliseconds;
    /// a silent connection then frees its handshake slot. Default 1000.
    pub client_hello_timeout_ms: u64,
    /// PEM roots for client certificates on `tls` listeners (`client_auth`). Default none.
    pub client_roots: Option<PathBuf>,
    /// PEM or DER CRLs for the client roots' CAs; a revoked client certificate is refused.
    /// Default `[]`.
    pub client_crls: Vec<PathBuf>,
    /// Offload the record layer to kernel TLS when available. Default true.
    pub ktls: bool,
    /// Offload TLS 1.3 connections even on kernels that cannot follow a KeyUpdate (Linux <
    /// 6.14): faster, but a peer-initiated KeyUpdate then closes the connection (the peer
    /// reconnects). Default false: such connections stay in userspace.
    pub ktls_tls13_without_rekey: bool,
    /// Records one kernel TLS key may protect before we rekey (TLS 1.3) or close gracefully
    /// (TLS 1.2); the kernel does not count for us. AES-GCM is safe to about 2^24.5 records.
    /// A TLS 1.2 AES-GCM connection in userspace closes gracefully there too (rustls cannot
    /// rekey it, and refuses past 2^24); in userspace TLS 1.3 rustls rekeys by itself.
    /// Default 8388608 (2^23).
    pub ktls_max_records: u64,
    /// The `mtls` listener's CertificateRequest names the root CAs of every partner (and of
    /// the cluster's nodes), so a partner holding several certificates can pick one we
    /// trust; anyone who connects can read that list, and so who the federation's partners
    /// are. false: it names none (TLS 1.2 and 1.3 allow that; a partner then presents its
    /// default certificate). Default true.
    pub partner_ca_hints: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            certificate: Vec::new(),
            versions: vec!["1.2".into(), "1.3".into()],
            cipher_suites: Vec::new(),
            kx_groups: vec!["X25519".into(), "secp256r1".into(), "X25519MLKEM768".into()],
            resumption: true,
            handshake_timeout_ms: 5000,
            client_hello_timeout_ms: 1000,
            client_roots: None,
            client_crls: Vec::new(),
            ktls: true,
            ktls_tls13_without_rekey: false,
            ktls_max_records: 1 << 23,
            partner_ca_hints: true,
        }
    }
}

/// What to do when no configured CRL covers a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownRevocation {
    /// Reject: revocation status must be known (default for peers).
    #[default]
    Deny,
    /// Accept.
    Allow,
}

/// A SIP domain as the policy compares it: lower case, without the one trailing dot an
/// absolute name may be written with (hosts in messages are compared the same way).
pub fn domain_key(d: &str) -> String {
    d.strip_suffix('.').unwrap_or(d).to_ascii_lowercase()
}

/// `[[peer]]`: a federation partner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerConfig {
    /// A short name used in logs, metrics and Record-Route flow tokens (token characters).
    pub name: String,
    /// SIP domains whose requests are forwarded to this peer. Default `[]`.
    pub domains: Vec<String>,
    /// Where to connect (`host:port`). Default none (inbound only).
    pub address: Option<SocketAddr>,
    /// The name we expect in the peer's certificate and send as SNI when we connect.
    pub server_name: String,
    /// PEM roots trusted for this peer only.
    pub roots: PathBuf,
    /// PEM or DER CRLs for this peer's CAs. Default `[]`.
    pub crls: Vec<PathBuf>,
    /// Identities (SAN dNSName or `sip:` URI, CN when no SAN) accepted from this peer; must
    /// include `server_name`. Default: `[server_name]`.
    pub trusted_names: Vec<String>,
    /// Allow `*.example.net` certificate names to match. Default false.
    pub allow_wildcards: bool,
    /// When no CRL covers a certificate of the chain. Default `deny`.
    pub unknown_revocation: UnknownRevocation,
    /// Partners this partner's requests may be relayed to (by `name`). Default `[]`: an edge
    /// is not a transit between federation partners.
    pub relay_to: Vec<String>,
    /// Send this partner P-Asserted-Identity for our authenticated users (RFC 3325: it is in
    /// our trust domain). Default true.
    pub assert_identity: bool,
    /// Its From and P-Asserted-Identity may also be a global `tel:` number (RFC 3966; a
    /// carrier asserts callers by number, which no domain holds). Default false: only SIP
    /// URIs in its `domains`.
    pub numbers: bool,
    /// Made from `[[cluster.nodes]]` at load (never written in a file): another node of our
    /// cluster, linked like a partner but trusted with any From (docs/CLUSTER.md).
    #[serde(skip)]
    pub node: bool,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            name: String::new(),
            domains: Vec::new(),
            address: None,
            server_name: String::new(),
            roots: PathBuf::new(),
            crls: Vec::new(),
            trusted_names: Vec::new(),
            allow_wildcards: false,
            unknown_revocation: UnknownRevocation::Deny,
            relay_to: Vec::new(),
            assert_identity: true,
            numbers: false,
            node: false,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Authenticate clients (digest or client certificate) before they register or send as
    /// one of our users or toward a partner. `false` makes an open server where any client
    /// may claim any identity: for closed labs only (logged at start). Default true.
    pub enabled: bool,
    /// Subscriber file: `[[subscriber]]` tables with HA1 hashes per realm and algorithm
    /// (`sipring subscriber` writes them; never plaintext). Reloaded on SIGHUP. Default none
    /// (then only client certificates authenticate).
    pub subscribers: Option<PathBuf>,
    /// Digest algorithms offered, one challenge each, in this order: `SHA-256`,
    /// `SHA-512-256`, `MD5` (old phones only). Default `["SHA-256", "SHA-512-256"]`.
    pub algorithms: Vec<String>,
    /// Out-of-dialog methods clients must authenticate for. A request that claims one of our
    /// domains in From, or goes to a partner, is challenged whatever its method. Default:
    /// `sipring_core::policy::DEFAULT_CHALLENGE` (REGISTER, INVITE, MESSAGE, SUBSCRIBE,
    /// NOTIFY, PUBLISH, REFER, OPTIONS, BYE, INFO, UPDATE, PRACK).
    pub challenge: Vec<String>,
    /// How long a nonce is accepted, in seconds (then `stale=true`). Default 300.
    pub nonce_expiry_s: u64,
    /// Failed attempts from one address within `failure_window_s` before it is refused.
    /// Default 10.
    pub max_failures: u32,
    /// Window for `max_failures`, in seconds. Default 60.
    pub failure_window_s: u64,
    /// How long an address that failed too often is refused (403), in seconds. Default 300.
    pub block_s: u64,
    /// Slots in the failed-login table (one for the whole process, 16 bytes each): each
    /// source is hashed to two, counts in both and is refused by a block marked with its
    /// fingerprint (see `sipring_core::auth::FailureLedger`); one that never failed is
    /// refused only when both its slots hold other sources' blocks. Size it well above the
    /// sources that may fail at once (an attacker holding many IPv6 /64s fills slots).
    /// Default 262144 (4 MiB); at least 1024.
    pub max_tracked_sources: usize,
    /// A file holding this node's secret (at least 32 bytes) that signs nonces and the flow
    /// tokens in our Record-Route. Keep it to make routes outlive a restart: a dialog with a
    /// partner (a route naming the partner, not a connection) goes on, and a request on a
    /// route naming a connection of the last life is not refused as forged (403) but finds
    /// no connection (connection numbers start at random each life, so it never names a
    /// new one). Default none: a random secret at each start.
    pub secret_file: Option<PathBuf>,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            enabled: true,
            subscribers: None,
            algorithms: vec!["SHA-256".into(), "SHA-512-256".into()],
            challenge: sipring_core::policy::DEFAULT_CHALLENGE
                .iter()
                .map(|s| s.to_string())
                .collect(),
            nonce_expiry_s: 300,
            max_failures: 10,
            failure_window_s: 60,
            block_s: 300,
            max_tracked_sources: 1 << 18,
            secret_file: None,
        }
    }
}

/// `[registrar]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrarSection {
    /// Shortest non-zero expiry accepted (shorter gets 423), in seconds. Default 60.
    pub min_expires_s: u32,
    /// Longest expiry granted, in seconds. Default 3600.
    pub max_expires_s: u32,
    /// Expiry when the REGISTER gives none, in seconds. Default 3600.
    pub default_expires_s: u32,
    /// Most contacts per address-of-record: a REGISTER naming more than this, or more than
    /// twice this in all (removals too), gets 403. Default 10; at most 100.
    pub max_contacts: usize,
    /// Longest Contact value stored, and longest Path (RFC 3327, its values together), in
    /// bytes (longer gets 400). Default 1024.
    pub max_contact_bytes: usize,
    /// Most AORs one connection may register (another gets 403): with `max_contacts`, this
    /// bounds the bindings a connection creates. Default 16.
    pub max_aors_per_connection: usize,
    /// How many AORs that registered once (and have no binding now) the node remembers, to
    /// answer 480 rather than 404 for them; the oldest are forgotten first. Default 1000000.
    pub remember_aors: usize,
    /// Timer C (RFC 3261 §16.6, more than 3 minutes): an INVITE branch ringing this long is
    /// cancelled, in seconds. Default 181.
    pub timer_c_s: u64,
    /// The longest an INVITE may ring, in seconds from its arrival, however often its
    /// provisional responses restart Timer C: every branch of it (a fallback to a device's
    /// other flow included) is cancelled as at Timer C once it is reached. At least
    /// `timer_c_s`, at most a day. Default 600.
    pub max_ring_s: u64,
}

impl Default for RegistrarSection {
    fn default() -> Self {
        RegistrarSection {
            min_expires_s: 60,
            max_expires_s: 3600,
            default_expires_s: 3600,
            max_contacts: 10,
            max_contact_bytes: 1024,
            max_aors_per_connection: 16,
            remember_aors: 1_000_000,
            timer_c_s: 181,
            max_ring_s: 600,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest SIP message, in bytes. Default 65536.
    pub max_message: usize,
    /// Most header lines per message. Default 64.
    pub max_headers: usize,
    /// Longest header line, in bytes. Default 8192.
    pub max_header_line: usize,
    /// Most Via values per message. Default 70.
    pub max_vias: usize,
    /// Longest Request-URI, in bytes. Default 2048.
    pub max_uri: usize,
    /// Most client and partner connections the process holds (all shards). 0 = what the
    /// descriptor limit allows: RLIMIT_NOFILE less a reserve (128 + 16 per shard + one
    /// per partner and shard) for the admin endpoint, partner links and files; a larger value is
    /// lowered to that, with a warning. Default 0.
    pub max_connections: usize,
    /// Most connections per shard. Default 200000.
    pub max_connections_per_shard: usize,
    /// Most connections from one source IP address, all shards together. Default 10000.
    pub max_connections_per_ip: usize,
    /// Registered bindings whose connection comes from one address, all shards together
    /// (0: no limit). Past it a REGISTER that would add one gets 403. Default 50000.
    pub max_bindings_per_ip: usize,
    /// Most TLS handshakes in progress per shard. Default 1024.
    pub max_handshakes_in_flight: usize,
    /// Most TLS handshakes in progress from one source IP address, per shard: silent or slow
    /// handshakes from one address cannot take every slot. Default 64.
    pub max_handshakes_per_ip: usize,
    /// New TLS handshakes one source (an IPv4 address, an IPv6 /64) may start per second,
    /// per shard, with a burst of twice as many (0: no limit). A handshake costs us ~0.2 ms
    /// of CPU and the sender a replayed ClientHello: the in-flight limits bound how many at
    /// once, not how often. Default 200.
    pub max_handshakes_per_ip_per_s: u32,
    /// While the connection budget (`max_connections`, `max_connections_per_shard`) is full,
    /// a new connection takes the place of the oldest anonymous one at least this old, in
    /// seconds: a client connection on which nothing authenticated, nothing registered, no
    /// call was answered and no request is in progress (another shard's, when the
    /// accepting shard has none: that newcomer is refused, the next gets in). Connections
    /// of partners, of registered phones, and with a certificate's AOR are never taken.
    /// 0: never (the new one is refused). Default 10.
    pub anonymous_grace_s: u64,
    /// While the budget is full, a new connection from a source (an IPv4 address, an IPv6
    /// /64) that already holds this many anonymous connections, or from an IPv6 /48 that
    /// holds 16 times as many (all shards together), is refused instead of taking another's
    /// place: one source reconnecting faster than
    /// the grace cannot push everyone else's newcomers out. Default 16.
    pub max_anonymous_per_ip: usize,
    /// Close connections that sent no complete message and no keepalive (CRLFCRLF) for this
    /// long, in seconds: bytes that trickle do not count; a connection is kept while a
    /// binding registered over it lasts. Default 900.
    pub idle_timeout_s: u64,
    /// TCP keepalive on every connection: the first probe after this many seconds without
    /// traffic (then every 30 s; the first unanswered one fails it when `tcp_user_timeout_s`
    /// is set, 4 when it is 0). 0: off. Default 300.
    pub tcp_keepalive_s: u64,
    /// TCP_USER_TIMEOUT on every connection, in seconds: output left unacknowledged this
    /// long (a peer that vanished while we were sending to it) fails the connection, instead
    /// of TCP's retransmission give-up after 15–30 minutes. With keepalive on, the kernel
    /// also ends a silent connection at the first unanswered probe once this long has passed
    /// since the peer last sent anything. 0: the kernel's default. Default 60; at most 3600.
    pub tcp_user_timeout_s: u64,
    /// Per-connection write queue cap, in bytes; beyond it the connection is closed as a slow
    /// reader. Default 1048576.
    pub write_queue_bytes: usize,
    /// Bytes all connections of a shard may hold queued for the socket; past it the
    /// connection holding the most is dropped (many peers that do not read, each under its
    /// own cap). Default 268435456 (256 MiB).
    pub write_queue_bytes_per_shard: usize,
    /// A message (SIP head and body, or a TLS record) must complete within this long of its
    /// first byte, in milliseconds; else the connection is closed (a trickle, or a peer that
    /// stalled mid-message). Default 5000.
    pub partial_timeout_ms: u64,
    /// Bytes all connections of a shard may hold for incomplete messages; past it the
    /// connection holding the most is dropped. Default 67108864 (64 MiB).
    pub partial_bytes_per_shard: usize,
    /// Most server transactions per shard (requests being answered or absorbing
    /// retransmissions); a request beyond gets a stateless 503 with Retry-After. Default 50000.
    pub max_transactions_per_shard: usize,
    /// Most server transactions one client connection holds at once (partners: not
    /// limited); a request beyond gets a stateless 503 with Retry-After. 0: no limit.
    /// Default 1024.
    pub max_transactions_per_connection: usize,
    /// Most bytes the transactions of one shard hold (each keeps the request it received and
    /// the responses it keeps, each branch the request it sent); past it new requests get 503 with Retry-After, as
    /// past `max_transactions_per_shard`: a count alone let ringing INVITEs of up to
    /// `max_message` each hold gigabytes. Default 536870912 (512 MiB).
    pub max_transaction_bytes_per_shard: usize,
    /// Overload shedding: each 10 ms tick a shard's event loop lags more than this, in
    /// milliseconds (two in a row), cuts the fraction of new requests (out of dialog, not ACK or CANCEL) it
    /// admits by a quarter; the others are answered 503 with Retry-After before any work.
    /// Each tick below half of it gives 2 % back. 0 disables. Default 10.
    pub overload_lag_ms: u64,
    /// Whose RFC 7339 overload control to honour while shedding: `partners` (connections
    /// authenticated as a configured partner), `all` (any client that advertises `oc` in
    /// its Via: only where every client honours it) or `off`. Those honoured are told the
    /// share of new requests to drop before sending (`oc` in the Via of their responses) and
    /// their new requests pass the door. Unless `off`, requests forwarded to partners (and
    /// cluster nodes) advertise it too, and the share an overloaded one asks us to drop gets
    /// 503 (no Retry-After) here. Default `partners`.
    pub overload_control: OverloadControl,
    /// The loop-lag limit, in milliseconds, of a shard that is shedding, busy, and getting
    /// most new requests from clients doing overload control: their share is dropped before
    /// it is sent (a refusal costs the shard nothing), so it steers tighter than
    /// `overload_lag_ms`: a cut on the first late tick, 0.5 % back per calm tick (2 % after
    /// 50 in a row). Shedding still starts by `overload_lag_ms`, and only while it is on
    /// (> 0). Default 1.
    pub overload_control_lag_ms: u64,
}

/// `limits.overload_control`: whose RFC 7339 overload control is honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverloadControl {
    /// Nobody: every client is shed at the door.
    Off,
    /// Configured partners (mutual TLS).
    #[default]
    Partners,
    /// Any client that advertises it.
    All,
}

impl OverloadControl {
    /// The core's trust setting.
    pub fn trust(self) -> sipring_core::overload_control::Trust {
        use sipring_core::overload_control::Trust;
        match self {
            OverloadControl::Off => Trust::Off,
            OverloadControl::Partners => Trust::Partners,
            OverloadControl::All => Trust::All,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message: 65536,
            max_headers: 64,
            max_header_line: 8192,
            max_vias: 70,
            max_uri: 2048,
            max_connections: 0,
            max_connections_per_shard: 200_000,
            max_connections_per_ip: 10_000,
            max_bindings_per_ip: 50_000,
            max_handshakes_in_flight: 1024,
            max_handshakes_per_ip: 64,
            max_handshakes_per_ip_per_s: 200,
            anonymous_grace_s: 10,
            max_anonymous_per_ip: 16,
            idle_timeout_s: 900,
            tcp_keepalive_s: 300,
            tcp_user_timeout_s: 60,
            write_queue_bytes: 1 << 20,
            write_queue_bytes_per_shard: 256 << 20,
            partial_timeout_ms: 5000,
            partial_bytes_per_shard: 64 << 20,
            max_transactions_per_shard: 50_000,
            max_transactions_per_connection: 1024,
            max_transaction_bytes_per_shard: 512 << 20,
            overload_lag_ms: 10,
            overload_control: OverloadControl::Partners,
            overload_control_lag_ms: 1,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin/metrics HTTP endpoint (keep it on loopback). Default
    /// `127.0.0.1:9060`; a file always has one (TOML has no null), a program building a
    /// `Config` may set `None` to run without it.
    pub address: Option<SocketAddr>,
    /// Whether `POST /reload` is served to a client that is not on loopback. Off by
    /// default: an endpoint opened beyond loopback for a scraper or a load balancer's health
    /// check does not let whoever reaches it reload (each reload re-checks every
    /// certificate connection and starts new session tickets). SIGHUP always works.
    pub remote_reload: bool,
    /// Names the endpoint may be addressed by (the request's `Host`), besides IP addresses,
    /// `localhost` and this machine's host name: a request naming another is refused 403,
    /// so a web page whose name was rebound to this address (DNS rebinding) cannot read the
    /// metrics. List the name a Prometheus scraper uses. Default none.
    pub hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: Some("127.0.0.1:9060".parse().expect("literal")),
            remote_reload: false,
            hosts: Vec::new(),
        }
    }
}

/// One problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The key, e.g. `peer[1].roots`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

impl Config {
    /// Reads and validates a file. Syntax errors come back as one error; semantic ones all
    /// together.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let err = |key: &str, reason: String| {
            vec![ConfigError {
                file: path.to_path_buf(),
                key: key.into(),
                reason,
            }]
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("(file)", format!("cannot read: {e}")))?;
        let cfg = Config::parse(&text).map_err(|e| err("(syntax)", e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let cfg = cfg.resolve_paths(base);
        let errors = cfg.validate(path);
        if errors.is_empty() {
            Ok(cfg.with_cluster_links())
        } else {
            Err(errors)
        }
    }

    /// Parses TOML text (no validation).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| sipring_core::subscriber_file::toml_error(text, &e))
    }

    /// Adds a link (a `[[peer]]` marked `node`) to every other node of `[cluster]`: MTLS
    /// with the cluster's roots, trusted only as the identity the topology gives it, no
    /// domains (lookups, not domains, send requests to a node).
    pub fn with_cluster_links(mut self) -> Config {
        let Some(c) = self.cluster.clone() else {
            return self;
        };
        for n in c.nodes.iter().filter(|n| n.name != c.node) {
            self.peer.push(PeerConfig {
                name: n.name.clone(),
                address: n.address,
                server_name: n.identity.clone(),
                roots: c.roots.clone(),
                crls: c.crls.clone(),
                trusted_names: vec![n.identity.clone()],
                // The cluster's CA is ours: a node without a CRL is not refused for it.
                unknown_revocation: if c.crls.is_empty() {
                    UnknownRevocation::Allow
                } else {
                    UnknownRevocation::Deny
                },
                node: true,
                ..PeerConfig::default()
            });
        }
        self
    }

    /// Makes relative file paths relative to the config file's folder.
    pub fn resolve_paths(mut self, base: &Path) -> Config {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        for c in &mut self.tls.certificate {
            fix(&mut c.cert);
            fix(&mut c.key);
        }
        if let Some(r) = &mut self.tls.client_roots {
            fix(r);
        }
        self.tls.client_crls.iter_mut().for_each(fix);
        if let Some(f) = &mut self.auth.subscribers {
            fix(f);
        }
        if let Some(f) = &mut self.auth.secret_file {
            fix(f);
        }
        for p in &mut self.peer {
            fix(&mut p.roots);
            p.crls.iter_mut().for_each(fix);
        }
        if let Some(c) = &mut self.cluster {
            fix(&mut c.roots);
            c.crls.iter_mut().for_each(fix);
            for f in [&mut c.store_ca, &mut c.store_cert, &mut c.store_key]
                .into_iter()
                .flatten()
            {
                fix(f);
            }
        }
        self
    }

    /// Every semantic problem, each naming its key. File contents (certificates, keys) are
    /// checked by the TLS layer when it loads them.
    pub fn validate(&self, file: &Path) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut e = |key: String, reason: &str| {
            errors.push(ConfigError {
                file: file.to_path_buf(),
                key,
                reason: reason.to_string(),
            })
        };
        if self.listen.is_empty() {
            e(
                "listen".into(),
                "no [[listen]] table: the server would accept nothing",
            );
        }
        let needs_tls = self.listen.iter().any(|l| l.kind != ListenKind::Tcp)
            || self.peer.iter().any(|p| p.address.is_some());
        if needs_tls && self.tls.certificate.is_empty() {
            e(
                "tls.certificate".into(),
                "TLS listeners or outbound peers need at least one [[tls.certificate]]",
            );
        }
        for (i, c) in self.tls.certificate.iter().enumerate() {
            if c.cert.as_os_str().is_empty() {
                e(format!("tls.certificate[{i}].cert"), "missing");
            }
            if c.key.as_os_str().is_empty() {
                e(format!("tls.certificate[{i}].key"), "missing");
            }
        }
        for (i, l) in self.listen.iter().enumerate() {
            if l.client_auth != ClientAuth::None && self.tls.client_roots.is_none() {
                e(format!("listen[{i}].client_auth"), "needs tls.client_roots");
            }
            if l.client_auth != ClientAuth::None && l.kind != ListenKind::Tls {
                e(
                    format!("listen[{i}].client_auth"),
                    "only for kind = \"tls\" (mtls always requires a partner certificate)",
                );
            }
            if l.backlog == 0 {
                e(format!("listen[{i}].backlog"), "must be at least 1");
            }
            if l.advertise_port == Some(0) {
                e(
                    format!("listen[{i}].advertise_port"),
                    "the port peers reach this listener by: 1 to 65535",
                );
            }
        }
        if self.listen.iter().any(|l| l.kind == ListenKind::Mtls)
            && self.peer.is_empty()
            && self.cluster.is_none()
        {
            e(
                "peer".into(),
                "an mtls listener with no [[peer]] would refuse every connection",
            );
        }
        for v in &self.tls.versions {
            if v != "1.2" && v != "1.3" {
                e(
                    "tls.versions".into(),
                    "only \"1.2\" and \"1.3\" are supported",
                );
            }
        }
        if self.tls.versions.is_empty() {
            e("tls.versions".into(), "at least one version");
        }
        for g in &self.tls.kx_groups {
            if crate::tls::kx_group(g).is_none() {
                e(
                    "tls.kx_groups".into(),
                    "unknown group (X25519MLKEM768, X25519, secp256r1, secp384r1)",
                );
            }
        }
        for s in &self.tls.cipher_suites {
            if crate::tls::cipher_suite(s).is_none() {
                e("tls.cipher_suites".into(), "unknown cipher suite name");
            }
        }
        if self.tls.ktls_max_records == 0 {
            e("tls.ktls_max_records".into(), "must be positive");
        }
        if self.limits.write_queue_bytes_per_shard < self.limits.write_queue_bytes {
            e(
                "limits.write_queue_bytes_per_shard".into(),
                "must be at least limits.write_queue_bytes (one connection's cap)",
            );
        }
        if self.tls.handshake_timeout_ms == 0 {
            e("tls.handshake_timeout_ms".into(), "must be positive");
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.peer.iter().enumerate() {
            if !is_token(&p.name) {
                e(
                    format!("peer[{i}].name"),
                    "must be a non-empty token (letters, digits, - . _)",
                );
            }
            if !names.insert(p.name.clone()) {
                e(format!("peer[{i}].name"), "duplicate peer name");
            }
            if p.server_name.is_empty() {
                e(
                    format!("peer[{i}].server_name"),
                    "missing: the name expected in the peer's certificate",
                );
            } else if p.trusted_names.iter().any(|t| t.contains('*')) {
                // Trusted names are names: `allow_wildcards` lets a *certificate's* dNSName
                // be a wildcard, never a list entry (which matched only a literal `*`).
                e(
                    format!("peer[{i}].trusted_names"),
                    "names, not patterns: no '*' (allow_wildcards is about the certificate)",
                );
            } else if !p.trusted_names.is_empty()
                && !p
                    .trusted_names
                    .iter()
                    .any(|t| crate::tls::verify::name_matches(t, &p.server_name, false))
            {
                // We connect to `server_name` and accept only a certificate naming it with a
                // trusted identity: a list without it could never connect.
                e(
                    format!("peer[{i}].trusted_names"),
                    "must include server_name (the name we connect to)",
                );
            }
            if p.roots.as_os_str().is_empty() {
                e(
                    format!("peer[{i}].roots"),
                    "missing: each peer needs its own trusted roots",
                );
            }
        }
        // Each domain is spoken for by one side: a partner's domain that is ours (or another
        // partner's) would let it assert our users' (or that partner's) identities — the
        // From and P-Asserted-Identity checks pass — while routing, first match first, hid
        // the overlap.
        let domain = |d: &str| d.trim_end_matches('.').to_ascii_lowercase();
        let ours: std::collections::HashSet<String> =
            self.server.domains.iter().map(|d| domain(d)).collect();
        let mut owner: std::collections::HashMap<String, &str> = Default::default();
        for (i, p) in self.peer.iter().enumerate() {
            for d in &p.domains {
                let d = domain(d);
                if ours.contains(&d) {
                    e(
                        format!("peer[{i}].domains"),
                        "names one of server.domains: the partner would speak for our users",
                    );
                } else if let Some(other) = owner.insert(d, &p.name)
                    && other != p.name
                {
                    e(
                        format!("peer[{i}].domains"),
                        "names a domain another [[peer]] has: each domain is one partner's",
                    );
                }
            }
        }
        for (i, p) in self.peer.iter().enumerate() {
            for r in &p.relay_to {
                if !self.peer.iter().any(|q| q.name == *r) {
                    e(
                        format!("peer[{i}].relay_to"),
                        "names no [[peer]] (use partner names)",
                    );
                }
            }
        }
        let a = &self.auth;
        if a.algorithms.is_empty() {
            e("auth.algorithms".into(), "at least one algorithm");
        }
        for alg in &a.algorithms {
            if sipring_core::auth::Algorithm::from_name(alg.as_bytes()).is_none() {
                e(
                    "auth.algorithms".into(),
                    "unknown algorithm (SHA-256, SHA-512-256, MD5)",
                );
            }
        }
        for m in &a.challenge {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                e(
                    "auth.challenge".into(),
                    "methods in upper case, e.g. \"INVITE\"",
                );
            }
            if m == "ACK" || m == "CANCEL" {
                e(
                    "auth.challenge".into(),
                    "ACK and CANCEL cannot be challenged",
                );
            }
        }
        if a.nonce_expiry_s == 0 {
            e("auth.nonce_expiry_s".into(), "must be positive");
        }
        // The failure ledger counts in 24 bits and saturates there: a larger bound would be
        // one never reached, the lockout off without a word.
        if !(1..=0xFF_FFFF).contains(&a.max_failures) {
            e("auth.max_failures".into(), "between 1 and 16777215");
        }
        // 0 would switch the lockout off without a word (never blocked; a window that
        // forgets every failure at once); past a day the block arithmetic is meaningless.
        for (key, v) in [
            ("auth.block_s", a.block_s),
            ("auth.failure_window_s", a.failure_window_s),
        ] {
            if !(1..=86_400).contains(&v) {
                e(key.into(), "between 1 and 86400");
            }
        }
        // Shard 0 counts the slots in use for the gauge every 500 ms: 2^20 (16 MiB) is a
        // millisecond or two of its loop; 2^26 (1 GiB) stalled it for tens to hundreds.
        if !(1024..=1 << 20).contains(&a.max_tracked_sources) {
            e(
                "auth.max_tracked_sources".into(),
                "between 1024 and 1048576",
            );
        }
        let r = &self.registrar;
        if r.min_expires_s > r.max_expires_s {
            e(
                "registrar.min_expires_s".into(),
                "greater than registrar.max_expires_s",
            );
        }
        if r.default_expires_s < r.min_expires_s || r.default_expires_s > r.max_expires_s {
            e(
                "registrar.default_expires_s".into(),
                "outside min_expires_s..=max_expires_s",
            );
        }
        if r.timer_c_s <= 180 || r.timer_c_s > 86_400 {
            e(
                "registrar.timer_c_s".into(),
                "RFC 3261 §16.6 requires more than 3 minutes (181 or more), and at most a day",
            );
        }
        if r.max_ring_s < r.timer_c_s || r.max_ring_s > 86_400 {
            e(
                "registrar.max_ring_s".into(),
                "at least registrar.timer_c_s, and at most a day",
            );
        }
        if r.min_expires_s > 3600 {
            e(
                "registrar.min_expires_s".into(),
                "at most 3600: RFC 3261 §10.3 allows 423 Interval Too Brief only below an hour",
            );
        }
        // Zero here refuses or cuts every connection (each is compared with `>=`, or is a
        // deadline); none means "no limit".
        for (key, v) in [
            (
                "limits.max_connections_per_shard",
                self.limits.max_connections_per_shard as u64,
            ),
            (
                "limits.max_connections_per_ip",
                self.limits.max_connections_per_ip as u64,
            ),
            (
                "limits.max_handshakes_in_flight",
                self.limits.max_handshakes_in_flight as u64,
            ),
            ("limits.idle_timeout_s", self.limits.idle_timeout_s),
            (
                "limits.write_queue_bytes",
                self.limits.write_queue_bytes as u64,
            ),
            (
                "tls.client_hello_timeout_ms",
                self.tls.client_hello_timeout_ms,
            ),
            (
                "limits.max_handshakes_per_ip",
                self.limits.max_handshakes_per_ip as u64,
            ),
            ("limits.partial_timeout_ms", self.limits.partial_timeout_ms),
        ] {
            if v == 0 {
                e(
                    key.into(),
                    "must be positive (0 would refuse or cut every connection)",
                );
            }
        }
        if self.limits.tcp_keepalive_s > 32_767 {
            e(
                "limits.tcp_keepalive_s".into(),
                "at most 32767 (the kernel's bound for TCP_KEEPIDLE)",
            );
        }
        if self.limits.tcp_user_timeout_s > 3600 {
            e("limits.tcp_user_timeout_s".into(), "at most 3600");
        }
        if self.server.drain_timeout_s > 3600 {
            e("server.drain_timeout_s".into(), "at most 3600");
        }
        if self.limits.max_transaction_bytes_per_shard < 1 << 20 {
            e(
                "limits.max_transaction_bytes_per_shard".into(),
                "at least 1048576 (a few dozen messages of max_message)",
            );
        }
        // Each transaction holds its request and the branch's copy (twice max_message); one
        // message that cannot fit is always refused (503).
        if self.limits.max_transaction_bytes_per_shard < 2 * self.limits.max_message {
            e(
                "limits.max_transaction_bytes_per_shard".into(),
                "at least twice limits.max_message (a transaction holds its request and its branch's copy)",
            );
        }
        // A link being dialled holds half of it: below twice a message (and its entry), a
        // message of up to max_message sent while a partner link is dialled was dropped.
        if self.limits.write_queue_bytes
            < 2 * (self.limits.max_message + crate::conn::QUEUED_ENTRY_COST)
        {
            e(
                "limits.write_queue_bytes".into(),
                "at least twice limits.max_message (a partner link being dialled holds half of it, and one message must fit)",
            );
        }
        // Below one message, every message that spans two reads drops its connection (a
        // response may be a little larger: it copies its request's Vias around its own).
        if self.limits.partial_bytes_per_shard
            < self.limits.max_message + sipring_core::parse::RESPONSE_SLACK
        {
            e(
                "limits.partial_bytes_per_shard".into(),
                "at least limits.max_message and 16 KiB (one message read in parts must fit; a response may be 16 KiB larger)",
            );
        }
        for (key, v) in [
            ("limits.max_vias", self.limits.max_vias),
            ("limits.max_header_line", self.limits.max_header_line),
            ("limits.max_uri", self.limits.max_uri),
            ("registrar.max_contacts", self.registrar.max_contacts),
            (
                "registrar.max_contact_bytes",
                self.registrar.max_contact_bytes,
            ),
            (
                "registrar.max_aors_per_connection",
                self.registrar.max_aors_per_connection,
            ),
        ] {
            if v == 0 {
                e(
                    key.into(),
                    "must be positive (0 refuses every request or registration)",
                );
            }
        }
        if self.limits.max_transactions_per_shard == 0 {
            e(
                "limits.max_transactions_per_shard".into(),
                "must be positive",
            );
        }
        if self.limits.max_message < 1024 {
            e(
                "limits.max_message".into(),
                "below 1024 bytes no real SIP message fits",
            );
        }
        // A REGISTER is compared contact by contact with the AOR's bindings (quadratic in
        // this): far past any one user's devices, and bounded.
        if self.registrar.max_contacts > 100 {
            e(
                "registrar.max_contacts".into(),
                "at most 100 (each REGISTER compares its contacts with every binding)",
            );
        }
        if self.limits.max_headers == 0 || self.limits.max_headers > 64 {
            e(
                "limits.max_headers".into(),
                "must be 1..=64 (the parser's header storage)",
            );
        }
        if self.server.domains.is_empty() {
            e("server.domains".into(), "at least one SIP domain");
        }
        // Bounds that keep the arithmetic on them from overflowing (each far past any use).
        for (key, v, max) in [
            (
                "limits.overload_lag_ms",
                self.limits.overload_lag_ms,
                60_000,
            ),
            (
                "limits.overload_control_lag_ms",
                self.limits.overload_control_lag_ms,
                60_000,
            ),
            (
                "server.io_memory_kib",
                self.server.io_memory_kib as u64,
                1 << 30,
            ),
            ("server.first_cpu", self.server.first_cpu as u64, 1 << 16),
            (
                "server.mesh_capacity",
                self.server.mesh_capacity as u64,
                1 << 24,
            ),
        ] {
            if v > max {
                e(key.into(), &format!("at most {max}"));
            }
        }
        if self.server.mesh_capacity == 0 {
            e("server.mesh_capacity".into(), "must be positive");
        }
        if let Some(c) = &self.cluster {
            if !c.nodes.iter().any(|n| n.name == c.node) {
                e(
                    "cluster.node".into(),
                    "names no [[cluster.nodes]] entry (list this node too)",
                );
            }
            if c.store.is_empty() {
                e(
                    "cluster.store".into(),
                    "at least one Redis Cluster address (host:port)",
                );
            } else if let Err(why) = crate::cluster::seed_infos(&c.store) {
                e("cluster.store".into(), &why);
            } else if let Err((key, why)) = crate::cluster::store_tls(c) {
                e(key.into(), &why);
            }
            if c.roots.as_os_str().is_empty() {
                e(
                    "cluster.roots".into(),
                    "missing: the roots trusted for the other nodes' certificates",
                );
            }
            if c.heartbeat_ms == 0
                || c.heartbeat_ms > 3_600_000
                || c.liveness_ms > 3_600_000
                || c.liveness_ms < 2 * c.heartbeat_ms
            {
                e(
                    "cluster.liveness_ms".into(),
                    "must be at least twice cluster.heartbeat_ms (and that positive)",
                );
            } else if c.liveness_ms <= c.heartbeat_ms.saturating_add(c.store_timeout_ms) {
                // A beat whose SET takes its full timeout must still land before the key
                // expires, or a slow store makes a healthy node look dead.
                e(
                    "cluster.liveness_ms".into(),
                    "must exceed cluster.heartbeat_ms + cluster.store_timeout_ms",
                );
            }
            if c.store_timeout_ms == 0 {
                e("cluster.store_timeout_ms".into(), "must be positive");
            }
            if c.subscribers_refresh_s == 0 {
                e("cluster.subscribers_refresh_s".into(), "must be positive");
            }
            if !self.listen.iter().any(|l| l.kind == ListenKind::Mtls) {
                e(
                    "cluster".into(),
                    "needs an mtls [[listen]]: the other nodes connect to it",
                );
            }
            let mut seen = std::collections::HashSet::new();
            for (i, n) in c.nodes.iter().enumerate() {
                if !is_token(&n.name) || !seen.insert(n.name.clone()) {
                    e(
                        format!("cluster.nodes[{i}].name"),
                        "must be a unique token (letters, digits, - . _)",
                    );
                }
                if self.peer.iter().any(|p| p.name == n.name) {
                    e(
                        format!("cluster.nodes[{i}].name"),
                        "is also a [[peer]] name",
                    );
                }
                if n.name != c.node && (n.address.is_none() || n.identity.is_empty()) {
                    e(
                        format!("cluster.nodes[{i}]"),
                        "another node needs its address and its certificate identity",
                    );
                }
            }
        }
        errors
    }

    /// What the configuration asks that works but is likely not what was meant: a partner
    /// named by an IP address (RFC 5922 identities are domain names: an address matches
    /// only a dNSName or CN holding its text — a self-signed box's CN — never an IP address
    /// SAN a CA would issue). Logged at start and at each reload, once per name.
    pub fn identity_warnings(&self) -> Vec<String> {
        let is_ip = |n: &str| {
            n.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok()
        };
        let mut out = Vec::new();
        for p in &self.peer {
            let mut said = std::collections::HashSet::new();
            for n in std::iter::once(&p.server_name).chain(&p.trusted_names) {
                if is_ip(n) && said.insert(n.to_ascii_lowercase()) {
                    out.push(format!(
                        "peer {:?}: {n} is an IP address: it matches only a certificate name (dNSName, or CN without SAN) holding that text, never an IP address SAN (RFC 5922: SIP identities are domain names)",
                        p.name
                    ));
                }
            }
        }
        out
    }

    /// The effective trusted names of a peer (its `server_name` when none are listed).
    pub fn peer_trusted_names(p: &PeerConfig) -> Vec<String> {
        if p.trusted_names.is_empty() {
            vec![p.server_name.clone()]
        } else {
            p.trusted_names.clone()
        }
    }

    /// The SIP core's parse limits.
    pub fn sip_limits(&self) -> sipring_core::Limits {
        sipring_core::Limits {
            max_message: self.limits.max_message,
            max_headers: self.limits.max_headers,
            max_header_line: self.limits.max_header_line,
            max_vias: self.limits.max_vias,
            max_uri: self.limits.max_uri,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_semantic_errors_name_the_key() {
        let e = Config::parse("[server]\nshardz = 2\n").unwrap_err();
        assert!(e.contains("shardz"), "{e}");
        let cfg = Config::parse(
            "[[listen]]\nkind = \"mtls\"\naddress = \"127.0.0.1:5062\"\n[tls]\nversions = [\"1.1\"]\n[registrar]\nmin_expires_s = 7200\n[limits]\nwrite_queue_bytes_per_shard = 1024\n",
        )
        .unwrap();
        let keys: Vec<String> = cfg
            .validate(Path::new("x.toml"))
            .into_iter()
            .map(|e| e.key)
            .collect();
        for k in [
            "tls.certificate",
            "peer",
            "tls.versions",
            "registrar.min_expires_s",
            "registrar.default_expires_s",
            "limits.write_queue_bytes_per_shard",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} not in {keys:?}");
        }
    }

    #[test]
    fn values_that_would_fail_at_run_time_are_refused_at_load() {
        // A Redis address the store thread could only log (the node then ran outside its
        // cluster), a Timer C that overflows the clock at the first INVITE, a Min-Expires
        // of more than an hour (§10.3 allows 423 only below one).
        let keys = |text: &str| -> Vec<String> {
            Config::parse(text)
                .unwrap()
                .validate(Path::new("x.toml"))
                .into_iter()
                .map(|e| e.key)
                .collect()
        };
        let k = keys(
            "[registrar]\nmin_expires_s = 7200\nmax_expires_s = 86400\ndefault_expires_s = 7200\ntimer_c_s = 18446744073709551615\n[cluster]\nnode = \"a\"\nstore = [\"redis://[bad\"]\nroots = \"r.pem\"\n[[cluster.nodes]]\nname = \"a\"\naddress = \"127.0.0.1:5070\"\nidentity = \"a.example\"\n",
        );
        for key in [
            "registrar.min_expires_s",
            "registrar.timer_c_s",
            "cluster.store",
        ] {
            assert!(k.iter().any(|x| x == key), "{key} not in {k:?}");
        }
        // A ring ceiling below Timer C (it would cut what Timer C allows) or past a day.
        for ring in ["100", "86401"] {
            let k = keys(&format!("[registrar]\nmax_ring_s = {ring}\n"));
            let ring_keys: Vec<_> = k.iter().filter(|x| x.starts_with("registrar.")).collect();
            assert_eq!(ring_keys, ["registrar.max_ring_s"], "max_ring_s = {ring}");
        }
        // Zeros that refuse or cut every connection, and a drain that overflows the clock.
        let k = keys(
            "[server]\ndrain_timeout_s = 18446744073709551615\n[tls]\nclient_hello_timeout_ms = 0\n[limits]\ntcp_keepalive_s = 40000\ntcp_user_timeout_s = 3601\nmax_handshakes_per_ip = 0\npartial_timeout_ms = 0\noverload_lag_ms = 18446744073709551615\noverload_control_lag_ms = 18446744073709551615\nidle_timeout_s = 0\nwrite_queue_bytes = 0\nmax_connections_per_ip = 0\nmax_connections_per_shard = 0\nmax_handshakes_in_flight = 0\n",
        );
        for key in [
            "server.drain_timeout_s",
            "limits.tcp_keepalive_s",
            "limits.tcp_user_timeout_s",
            "limits.max_handshakes_per_ip",
            "limits.partial_timeout_ms",
            "limits.overload_lag_ms",
            "limits.overload_control_lag_ms",
            "tls.client_hello_timeout_ms",
            "limits.idle_timeout_s",
            "limits.write_queue_bytes",
            "limits.max_connections_per_ip",
            "limits.max_connections_per_shard",
            "limits.max_handshakes_in_flight",
        ] {
            assert!(k.iter().any(|x| x == key), "{key} not in {k:?}");
        }
        // Values that pass alone but break traffic: zero limits on what a message may hold,
        // budgets smaller than one message.
        let k = keys(
            "[limits]\nmax_vias = 0\nmax_header_line = 0\nmax_uri = 0\nmax_message = 1000000\npartial_bytes_per_shard = 500000\nmax_transaction_bytes_per_shard = 1500000\n[registrar]\nmax_contacts = 0\nmax_contact_bytes = 0\nmax_aors_per_connection = 0\n",
        );
        for key in [
            "limits.max_vias",
            "limits.max_header_line",
            "limits.max_uri",
            "limits.partial_bytes_per_shard",
            "limits.max_transaction_bytes_per_shard",
            "limits.write_queue_bytes",
            "registrar.max_contacts",
            "registrar.max_contact_bytes",
            "registrar.max_aors_per_connection",
        ] {
            assert!(k.iter().any(|x| x == key), "{key} not in {k:?}");
        }
        assert!(
            keys("[registrar]\nmax_contacts = 101\n")
                .contains(&"registrar.max_contacts".to_string())
        );
        assert!(
            !keys("[registrar]\nmax_contacts = 100\n")
                .contains(&"registrar.max_contacts".to_string())
        );
        // A lockout switched off without a word, or one whose arithmetic overflows.
        // The same for a failure bound the ledger's 24-bit count never reaches, and a table
        // whose gauge scan stalls shard 0.
        let k = keys(
            "[auth]\nblock_s = 0\nfailure_window_s = 18446744073709551615\nmax_failures = 16777216\nmax_tracked_sources = 2097152\n",
        );
        for key in [
            "auth.block_s",
            "auth.failure_window_s",
            "auth.max_failures",
            "auth.max_tracked_sources",
        ] {
            assert!(k.iter().any(|x| x == key), "{key} not in {k:?}");
        }
        let k = keys("[auth]\nmax_failures = 16777215\nmax_tracked_sources = 1048576\n");
        assert!(!k.iter().any(|x| x.starts_with("auth.")), "{k:?}");
        let k = keys(
            "[registrar]\nmin_expires_s = 3600\ntimer_c_s = 600\n[cluster]\nnode = \"a\"\nstore = [\"10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]\nroots = \"r.pem\"\n[[cluster.nodes]]\nname = \"a\"\naddress = \"127.0.0.1:5070\"\nidentity = \"a.example\"\n",
        );
        for key in [
            "registrar.min_expires_s",
            "registrar.timer_c_s",
            "cluster.store",
        ] {
            assert!(!k.iter().any(|x| x == key), "{key} in {k:?}");
        }
        // Seeds the Redis client refuses together (credentials on a later seed only): the
        // store thread stopped at start and the node ran outside its cluster.
        let k = keys(
            "[cluster]\nnode = \"a\"\nstore = [\"10.0.0.1:7000\", \"redis://u:pw@10.0.0.2:7000\"]\nroots = \"r.pem\"\n[[cluster.nodes]]\nname = \"a\"\naddress = \"127.0.0.1:5070\"\nidentity = \"a.example\"\n",
        );
        assert!(k.iter().any(|x| x == "cluster.store"), "{k:?}");
        // TLS settings for the store without rediss:// seeds, a certificate without its key,
        // a roots file that is not there: refused at load, not at the store thread's start.
        let with = |store: &str, extra: &str| {
            keys(&format!(
                "[cluster]\nnode = \"a\"\nstore = [\"{store}\"]\nroots = \"r.pem\"\n{extra}[[cluster.nodes]]\nname = \"a\"\naddress = \"127.0.0.1:5070\"\nidentity = \"a.example\"\n"
            ))
        };
        let k = with("10.0.0.1:7000", "store_ca = \"/nonexistent/ca.pem\"\n");
        assert!(k.iter().any(|x| x == "cluster.store_ca"), "{k:?}");
        let k = with(
            "rediss://10.0.0.1:7000",
            "store_ca = \"/nonexistent/ca.pem\"\n",
        );
        assert!(k.iter().any(|x| x == "cluster.store_ca"), "{k:?}");
        let k = with("rediss://10.0.0.1:7000", "store_cert = \"/x.pem\"\n");
        assert!(k.iter().any(|x| x == "cluster.store_cert"), "{k:?}");
        assert!(
            !with("rediss://10.0.0.1:7000", "")
                .iter()
                .any(|x| x.starts_with("cluster."))
        );
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        // The store's TLS files were read relative to the working directory: under the
        // shipped unit (working directory /) a `store_ca = "redis-ca.pem"` beside the
        // configuration was not found.
        let cfg = Config::parse(
            "[auth]\nsubscribers = \"subs.toml\"\n[cluster]\nroots = \"nodes.pem\"\nstore_ca = \"redis-ca.pem\"\nstore_cert = \"/abs/me.pem\"\nstore_key = \"me.key\"\n",
        )
        .unwrap()
        .resolve_paths(Path::new("/etc/sipring"));
        let c = cfg.cluster.unwrap();
        assert_eq!(c.roots, Path::new("/etc/sipring/nodes.pem"));
        assert_eq!(c.store_ca.unwrap(), Path::new("/etc/sipring/redis-ca.pem"));
        assert_eq!(c.store_cert.unwrap(), Path::new("/abs/me.pem"));
        assert_eq!(c.store_key.unwrap(), Path::new("/etc/sipring/me.key"));
        assert_eq!(
            cfg.auth.subscribers.unwrap(),
            Path::new("/etc/sipring/subs.toml")
        );
    }

    #[test]
    fn a_partner_we_connect_to_must_trust_the_name_we_dial() {
        let with = |trusted: &str, extra: &str| {
            Config::parse(&format!(
                "[[peer]]\nname = \"acme\"\nserver_name = \"sip.acme.example\"\nroots = \"acme.pem\"\ntrusted_names = [{trusted}]\n{extra}"
            ))
            .unwrap()
            .validate(Path::new("x.toml"))
            .into_iter()
            .map(|e| e.key)
            .collect::<Vec<_>>()
        };
        let key = "peer[0].trusted_names".to_string();
        assert!(with("\"sip.other.example\"", "").contains(&key));
        assert!(!with("\"sip.other.example\", \"SIP.acme.example.\"", "").contains(&key));
        // The list holds names, not patterns: a wildcard entry matched only a certificate
        // with a literal `*` where one was allowed (a sip: URI or a CN), and never the
        // wildcard certificates allow_wildcards is for.
        assert!(with("\"*.acme.example\"", "allow_wildcards = true\n").contains(&key));
        assert!(
            with(
                "\"sip.acme.example\", \"*.acme.example\"",
                "allow_wildcards = true\n"
            )
            .contains(&key)
        );
        assert!(with("\"*.acme.example\"", "").contains(&key));
        // Identities are domain names (RFC 5922): an address on the list matches only a
        // dNSName or CN holding its text (a self-signed box's CN), never a CA-issued IP
        // address SAN — allowed (refusing it broke such setups), and said at start.
        let ip = |server: &str, trusted: &str| {
            let c = Config::parse(&format!(
                "[[peer]]\nname = \"acme\"\nserver_name = \"{server}\"\nroots = \"acme.pem\"\ntrusted_names = [{trusted}]\n"
            ))
            .unwrap();
            assert!(
                !c.validate(Path::new("x.toml"))
                    .iter()
                    .any(|e| e.key == "peer[0].server_name"),
                "refused"
            );
            c.identity_warnings().len()
        };
        assert_eq!(ip("192.0.2.10", ""), 1);
        assert_eq!(ip("192.0.2.10", "\"192.0.2.10\""), 1, "one name, said once");
        assert_eq!(ip("[2001:db8::1]", ""), 1);
        assert_eq!(
            ip("sip.acme.example", "\"sip.acme.example\", \"192.0.2.10\""),
            1
        );
        assert_eq!(ip("sip.acme.example", "\"sip.acme.example\""), 0);
    }

    #[test]
    fn a_domain_is_spoken_for_by_one_side() {
        let keys = |text: &str| {
            Config::parse(text)
                .unwrap()
                .validate(Path::new("x.toml"))
                .into_iter()
                .map(|e| e.key)
                .collect::<Vec<_>>()
        };
        let peer = |i: u8, domains: &str| {
            format!(
                "[[peer]]\nname = \"p{i}\"\nserver_name = \"sip.p{i}.example\"\nroots = \"p.pem\"\ndomains = [{domains}]\n"
            )
        };
        let ours = "[server]\ndomains = [\"example.com\"]\n";
        let clean = keys(&format!(
            "{ours}{}{}",
            peer(0, "\"a.example\""),
            peer(1, "\"b.example\"")
        ));
        assert!(!clean.iter().any(|k| k.ends_with(".domains")), "{clean:?}");
        // One of ours, written otherwise.
        let k = keys(&format!("{ours}{}", peer(0, "\"Example.COM.\"")));
        assert!(k.contains(&"peer[0].domains".to_string()), "{k:?}");
        // Another partner's.
        let k = keys(&format!(
            "{ours}{}{}",
            peer(0, "\"a.example\""),
            peer(1, "\"b.example\", \"A.example\"")
        ));
        assert!(k.contains(&"peer[1].domains".to_string()), "{k:?}");
        assert!(!k.contains(&"peer[0].domains".to_string()), "{k:?}");
    }

    #[test]
    fn defaults_round_trip() {
        let d = Config::default();
        let text = toml::to_string(&d).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), d);
    }
}
