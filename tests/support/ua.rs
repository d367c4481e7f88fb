//! A small blocking SIP user agent for end-to-end tests: TLS (rustls) or TCP, frames what it
//! receives with sipring-core's framer, and builds the requests and responses a phone sends.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use sipring_core::auth::Algorithm;
use sipring_core::response::{ResponseParts, response_to};
use sipring_core::{Frame, Framer, Framing, Header, KeepaliveRole, Limits, Status, parse};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

/// A test user agent over one connection.
pub struct Ua {
    io: Box<dyn Io>,
    raw: TcpStream,
    buf: Vec<u8>,
    framer: Framer,
    /// The user name (AOR `sip:<user>@<domain>`).
    pub user: String,
    /// The SIP domain.
    pub domain: String,
    /// Our local address.
    pub local: SocketAddr,
    /// The digest password (default [`password_for`] the user); `None` sends no credentials.
    pub password: Option<String>,
    /// Contact parameters [`Ua::register`] adds (`;+sip.instance="<urn:uuid:…>"`).
    pub contact_params: String,
    /// The last challenge we answered: realm, nonce, algorithm and nonce-count, reused (with
    /// the count going up) for the requests that follow, as phones do.
    digest: std::cell::RefCell<Option<(String, String, Algorithm, u32)>>,
}

/// The password the test subscriber file gives `user`.
pub fn password_for(user: &str) -> String {
    format!("pw-{user}")
}

/// Users in the test subscriber files (`server::write_subscribers`): a few names, and
/// numbered families (`caller0`..`caller49`, …) for tests that make many UAs.
pub fn test_users() -> Vec<String> {
    let mut v: Vec<String> = [
        "alice", "bob", "carol", "dave", "mallory", "quiet", "chatty", "a", "b", "x", "slow",
        "fast",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for family in ["caller", "callee", "trunk", "u", "ua", "r", "m", "c", "i"] {
        v.extend((0..50).map(|i| format!("{family}{i}")));
    }
    v
}
static BRANCH: AtomicU64 = AtomicU64::new(1);

/// A unique branch.
pub fn branch() -> String {
    format!("z9hG4bKua{}", BRANCH.fetch_add(1, Ordering::Relaxed))
}

/// A client TLS configuration trusting `roots`, optionally presenting a client certificate.
pub fn tls_config(
    roots: &[CertificateDer<'static>],
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    tls12_only: bool,
) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let b = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(store);
    Arc::new(match client {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).expect("client cert"),
        None => b.with_no_client_auth(),
    })
}

impl Ua {
    /// Connects over TLS and completes the handshake.
    pub fn tls(
        addr: SocketAddr,
        cfg: Arc<ClientConfig>,
        sni: &str,
        user: &str,
        domain: &str,
    ) -> std::io::Result<Ua> {
        Ua::tls_over(TcpStream::connect(addr)?, cfg, sni, user, domain)
    }

    /// [`Ua::tls`] over a TCP connection the caller opened (from an address of its choice).
    pub fn tls_over(
        tcp: TcpStream,
        cfg: Arc<ClientConfig>,
        sni: &str,
        user: &str,
        domain: &str,
    ) -> std::io::Result<Ua> {
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        // A server that stops reading without closing fails the write, not the test run.
        tcp.set_write_timeout(Some(Duration::from_secs(30)))?;
        tcp.set_nodelay(true)?;
        let raw = tcp.try_clone()?;
        let conn = ClientConnection::new(cfg, ServerName::try_from(sni.to_string()).expect("name"))
            .map_err(std::io::Error::other)?;
        let mut s = StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        let local = raw.local_addr()?;
        Ok(Ua {
            io: Box::new(s),
            raw,
            buf: Vec::new(),
            framer: Framer::new(Limits::default(), KeepaliveRole::Client),
            user: user.into(),
            domain: domain.into(),
            local,
            password: Some(password_for(user)),
            contact_params: String::new(),
            digest: Default::default(),
        })
    }

    /// Connects over plain TCP.
    pub fn tcp(addr: SocketAddr, user: &str, domain: &str) -> std::io::Result<Ua> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(30)))?;
        let raw = tcp.try_clone()?;
        let local = raw.local_addr()?;
        Ok(Ua {
            io: Box::new(tcp),
            raw,
            buf: Vec::new(),
            framer: Framer::new(Limits::default(), KeepaliveRole::Client),
            user: user.into(),
            domain: domain.into(),
            local,
            password: Some(password_for(user)),
            contact_params: String::new(),
            digest: Default::default(),
        })
    }

    /// Takes the challenge in a 401/407 (the first one with an algorithm we know).
    pub fn take_challenge(&self, resp: &[u8]) -> bool {
        let mut h = [Header::EMPTY; 64];
        let Ok(Status::Complete(m)) = parse(resp, &mut h, &Limits::default(), Framing::Stream)
        else {
            return false;
        };
        for x in m.headers() {
            let n = x.raw_name;
            if (n.eq_ignore_ascii_case(b"WWW-Authenticate")
                || n.eq_ignore_ascii_case(b"Proxy-Authenticate"))
                && let Some((realm, nonce, alg, _)) = sipring_core::auth::parse_challenge(x.value)
            {
                *self.digest.borrow_mut() = Some((realm, nonce, alg, 0));
                return true;
            }
        }
        false
    }

    /// The credentials line for a request (`Authorization` for REGISTER, else
    /// `Proxy-Authorization`), if we have a password and a challenge to answer.
    pub fn credentials(&self, method: &str, uri: &str) -> String {
        let Some(pw) = &self.password else {
            return String::new();
        };
        let mut d = self.digest.borrow_mut();
        let Some((realm, nonce, alg, nc)) = d.as_mut() else {
            return String::new();
        };
        *nc += 1;
        let ha1 = alg.ha1(&self.user, realm, pw);
        let v = sipring_core::auth::authorization(
            *alg,
            &self.user,
            realm,
            &ha1,
            nonce,
            *nc,
            &format!("cn{}", *nc),
            method,
            uri,
        );
        let name = if method == "REGISTER" {
            "Authorization"
        } else {
            "Proxy-Authorization"
        };
        format!("{name}: {v}\r\n")
    }

    /// Authenticates without registering a contact: a REGISTER query (no Contact, RFC 3261
    /// §10.2.3) answered with credentials, so that requests that follow carry them.
    pub fn login(&mut self) -> u16 {
        for attempt in 0..2 {
            let ruri = format!("sip:{}", self.domain);
            let msg = format!(
                "REGISTER {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS {l};branch={b};rport\r\nMax-Forwards: 70\r\nTo: <sip:{u}@{d}>\r\nFrom: <sip:{u}@{d}>;tag=q{u}\r\nCall-ID: login-{u}-{l}\r\nCSeq: {c} REGISTER\r\n{creds}Content-Length: 0\r\n\r\n",
                d = self.domain,
                u = self.user,
                l = self.local,
                b = branch(),
                c = BRANCH.fetch_add(1, Ordering::Relaxed),
                creds = self.credentials("REGISTER", &ruri),
            );
            self.send(msg.as_bytes());
            let (s, resp) = self.expect_final_or_provisional("REGISTER query");
            if s == 401 && attempt == 0 && self.take_challenge(&resp) {
                continue;
            }
            return s;
        }
        unreachable!()
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).expect("send");
        self.io.flush().expect("flush");
    }

    /// The next SIP message (keepalive pongs skipped), or `None` after `timeout` / on close.
    pub fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        loop {
            match self.framer.frame(&self.buf) {
                Ok(Status::Complete(Frame::Message(n))) => {
                    return Some(self.buf.drain(..n).collect());
                }
                Ok(Status::Complete(f)) => {
                    self.buf.drain(..f.len());
                    continue;
                }
                Ok(Status::Partial) => {}
                Err(e) => panic!("server sent unframeable bytes: {e}"),
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = self
                .raw
                .set_read_timeout(Some(left.min(Duration::from_millis(200))));
            let mut tmp = [0u8; 16384];
            match self.io.read(&mut tmp) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            // A signal meant for a server thread of this test process.
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return None,
            }
        }
    }

    /// Whether the server closes the connection within `timeout` (what it sends meanwhile
    /// is dropped unread).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let raw = &self.raw;
        read_until_closed(
            &mut self.io,
            |d| {
                let _ = raw.set_read_timeout(Some(d));
            },
            timeout,
        )
    }

    /// The next message, which must exist. (15 s: the hostile suite's overload tests load
    /// both CPUs for a minute while another test's server waits its turn; a test that
    /// asserts a silence bounds its own wait with [`Ua::recv`].)
    pub fn expect(&mut self, what: &str) -> Vec<u8> {
        self.recv(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("{}: no message ({what})", self.user))
    }

    /// The next response, skipping 100 Trying; returns its status.
    pub fn expect_final_or_provisional(&mut self, what: &str) -> (u16, Vec<u8>) {
        // Bounded: a server that answered 100 Trying forever would hold the test.
        for _ in 0..64 {
            let m = self.expect(what);
            let s = status(&m)
                .unwrap_or_else(|| panic!("{what}: expected a response, got {}", first_line(&m)));
            if s != 100 {
                return (s, m);
            }
        }
        panic!("{what}: 64 answers of 100 Trying and nothing else")
    }

    /// Registers `sip:user@domain` with its own connection as contact, answering a digest
    /// challenge once (as a phone does); returns the final status.
    pub fn register(&mut self, expires: u32) -> u16 {
        self.register_with(expires, "").0
    }

    /// [`Ua::register`] with extra header lines; returns the final status and response.
    pub fn register_with(&mut self, expires: u32, extra: &str) -> (u16, Vec<u8>) {
        for attempt in 0..2 {
            let ruri = format!("sip:{}", self.domain);
            let msg = format!(
                "REGISTER {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS {l};branch={b};rport\r\nMax-Forwards: 70\r\nTo: <sip:{u}@{d}>\r\nFrom: <sip:{u}@{d}>;tag=reg{u}\r\nCall-ID: reg-{u}-{l}\r\nCSeq: {c} REGISTER\r\nContact: <sip:{u}@{l};transport=tls;ob>{p}\r\nExpires: {expires}\r\n{creds}{extra}Content-Length: 0\r\n\r\n",
                p = self.contact_params,
                d = self.domain,
                u = self.user,
                l = self.local,
                b = branch(),
                c = BRANCH.fetch_add(1, Ordering::Relaxed),
                creds = self.credentials("REGISTER", &ruri),
            );
            self.send(msg.as_bytes());
            let (s, resp) = self.expect_final_or_provisional("REGISTER");
            if s == 401 && attempt == 0 && self.password.is_some() && self.take_challenge(&resp) {
                continue;
            }
            return (s, resp);
        }
        unreachable!()
    }

    /// A request from this UA (`body` with Content-Type `ctype` when given).
    #[allow(clippy::too_many_arguments)] // one argument per request field a test varies
    pub fn request(
        &self,
        method: &str,
        ruri: &str,
        to: &str,
        call_id: &str,
        cseq: u32,
        extra: &str,
        body: Option<(&str, &str)>,
    ) -> Vec<u8> {
        let (ct, b) = match body {
            Some((ct, b)) => (format!("Content-Type: {ct}\r\n"), b.to_string()),
            None => (String::new(), String::new()),
        };
        // Out-of-dialog requests carry credentials once we have a nonce (phones reuse it with
        // a rising nonce-count); ACK and CANCEL never do.
        let creds = if to.contains(";tag=") || method == "ACK" || method == "CANCEL" {
            String::new()
        } else {
            self.credentials(method, ruri)
        };
        format!(
            "{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/TLS {l};branch={br};rport\r\nMax-Forwards: 70\r\nTo: {to}\r\nFrom: <sip:{u}@{d}>;tag=t{u}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContact: <sip:{u}@{l};transport=tls;ob>\r\n{creds}{extra}{ct}Content-Length: {}\r\n\r\n{b}",
            b.len(),
            l = self.local,
            br = branch(),
            u = self.user,
            d = self.domain,
        )
        .into_bytes()
    }

    /// Drops the connection abruptly (RST-ish: no close_notify, no FIN wait).
    pub fn kill(self) {
        let _ = self.raw.shutdown(std::net::Shutdown::Both);
    }
}

/// `a` calls `b` (an INVITE with SDP for `sip:<b>@example.com`); returns the INVITE as `b`
/// received it.
pub fn invite(a: &mut Ua, b: &mut Ua, call_id: &str) -> Vec<u8> {
    let to = format!("<sip:{}@example.com>", b.user);
    let inv = a.request(
        "INVITE",
        &format!("sip:{}@example.com", b.user),
        &to,
        call_id,
        1,
        "",
        Some(("application/sdp", "v=0\r\n")),
    );
    a.send(&inv);
    let got = b.expect("INVITE at callee");
    assert_eq!(method(&got), "INVITE");
    got
}

/// The callee `b` hangs up the call `call_id` it took as `invite_at_b` (To-tag `b1`), along
/// its route set (the INVITE's Record-Route as received); the caller `a` answers 200.
pub fn hang_up(b: &mut Ua, a: &mut Ua, invite_at_b: &[u8], call_id: &str) {
    b.send(&bye(b, a, invite_at_b, call_id));
    let got = a.expect("BYE at caller");
    assert_eq!(method(&got), "BYE");
    a.send(&answer(
        &got,
        200,
        "OK",
        "a",
        &format!("sip:{}@{}", a.user, a.local),
    ));
    assert_eq!(b.expect_final_or_provisional("200 to BYE").0, 200);
}

/// The BYE the callee `b` sends to hang up the call `call_id` it took as `invite_at_b`
/// (To-tag `b1`), along its route set (the INVITE's Record-Route as received).
pub fn bye(b: &Ua, a: &Ua, invite_at_b: &[u8], call_id: &str) -> Vec<u8> {
    let rr = header_all(invite_at_b, "Record-Route").unwrap();
    format!(
        "BYE sip:{a}@{al} SIP/2.0\r\nVia: SIP/2.0/TLS {bl};branch={br}\r\nMax-Forwards: 70\r\nRoute: {rr}\r\nFrom: <sip:{b}@example.com>;tag=b1\r\nTo: <sip:{a}@example.com>;tag=t{a}\r\nCall-ID: {call_id}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        a = a.user,
        al = a.local,
        b = b.user,
        bl = b.local,
        br = branch()
    )
    .into_bytes()
}

/// Our answer to a request we received (with a To-tag and a Contact).
pub fn answer(req: &[u8], code: u16, reason: &str, tag: &str, contact: &str) -> Vec<u8> {
    let mut h = [Header::EMPTY; 64];
    let Ok(Status::Complete(m)) = parse(req, &mut h, &Limits::default(), Framing::Stream) else {
        panic!("unparseable request")
    };
    let c = format!("<{contact}>");
    // A UAS copies Record-Route into its dialog-creating responses (RFC 3261 §12.1.1).
    let rr: Vec<&[u8]> = m
        .headers()
        .iter()
        .filter(|h| h.name == sipring_core::HeaderName::RecordRoute)
        .map(|h| h.value)
        .collect();
    let rr = rr.join(&b", "[..]);
    let mut hdrs: Vec<(&str, &[u8])> = vec![("Contact", c.as_bytes())];
    if !rr.is_empty() && m.method() != Some(sipring_core::Method::Cancel) {
        hdrs.push(("Record-Route", &rr));
    }
    response_to(
        &m,
        code,
        reason,
        ResponseParts {
            to_tag: Some(tag.as_bytes()),
            headers: &hdrs,
            ..Default::default()
        },
    )
}

/// Reads from `r` (dropping what comes) until the peer closes it (`true`) or `within`
/// passes (`false`); `set_timeout` bounds each read (the socket under `r`).
pub fn read_until_closed(
    r: &mut impl Read,
    set_timeout: impl Fn(Duration),
    within: Duration,
) -> bool {
    let end = Instant::now() + within;
    let mut tmp = [0u8; 16384];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        set_timeout(left.min(Duration::from_millis(100)));
        match r.read(&mut tmp) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            // A signal meant for a server thread of this test process.
                            | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return true,
        }
    }
}

/// The status of a response.
pub fn status(m: &[u8]) -> Option<u16> {
    let mut h = [Header::EMPTY; 64];
    match parse(m, &mut h, &Limits::default(), Framing::Stream) {
        Ok(Status::Complete(m)) => m.status(),
        _ => None,
    }
}

/// The method of a request.
pub fn method(m: &[u8]) -> String {
    first_line(m)
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The first line.
pub fn first_line(m: &[u8]) -> String {
    String::from_utf8_lossy(&m[..m.iter().position(|&b| b == b'\r').unwrap_or(m.len())])
        .into_owned()
}

/// A header's first value (case-insensitive name).
pub fn header(m: &[u8], name: &str) -> Option<String> {
    let mut h = [Header::EMPTY; 64];
    let Ok(Status::Complete(msg)) = parse(m, &mut h, &Limits::default(), Framing::Stream) else {
        return None;
    };
    let hn = sipring_core::HeaderName::from_bytes(name.as_bytes());
    msg.headers()
        .iter()
        .find(|x| {
            if hn == sipring_core::HeaderName::Other {
                x.raw_name.eq_ignore_ascii_case(name.as_bytes())
            } else {
                x.name == hn
            }
        })
        .map(|x| String::from_utf8_lossy(x.value).into_owned())
}

/// The shard a Record-Route flow token (`fi=`/`fo=`) points at.
pub fn rr_shards(m: &[u8]) -> Option<(u64, u64)> {
    let rr = header(m, "Record-Route")?;
    let tok = |k: &str| -> Option<u64> {
        let v = rr
            .split(';')
            .find_map(|p| p.trim_end_matches('>').strip_prefix(k))?;
        let hex = v.strip_prefix('c')?;
        u64::from_str_radix(hex, 16).ok().map(|id| id >> 48)
    };
    Some((tok("fi=")?, tok("fo=")?))
}

/// Every value of a header, in order, joined with `, ` (e.g. the whole Record-Route set).
pub fn header_all(m: &[u8], name: &str) -> Option<String> {
    let mut h = [Header::EMPTY; 64];
    let Ok(Status::Complete(msg)) = parse(m, &mut h, &Limits::default(), Framing::Stream) else {
        return None;
    };
    let hn = sipring_core::HeaderName::from_bytes(name.as_bytes());
    let v: Vec<String> = msg
        .headers()
        .iter()
        .filter(|x| x.name == hn)
        .map(|x| String::from_utf8_lossy(x.value).into_owned())
        .collect();
    (!v.is_empty()).then(|| v.join(", "))
}
