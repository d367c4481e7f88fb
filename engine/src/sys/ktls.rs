//! Kernel TLS: attaching the `tls` upper-layer protocol to a socket, installing rustls's
//! traffic secrets (via the `ktls` crate's `CryptoInfo`), and reading/writing records whose
//! type is not application data through `recvmsg`/`sendmsg` control messages.
//!
//! Linux refuses `TCP_ULP "tls"` with `ENOENT` when the kernel lacks TLS (`CONFIG_TLS`), and
//! on an unconnected socket with `ENOTCONN`, so [`probe`] uses a connected loopback pair.

use std::io;
use std::os::fd::RawFd;

const SOL_TCP: libc::c_int = 6;
const TCP_ULP: libc::c_int = 31;
/// `SOL_TLS`
pub const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;

/// TLS record content types.
pub mod content {
    /// change_cipher_spec
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    /// alert
    pub const ALERT: u8 = 21;
    /// handshake (KeyUpdate, NewSessionTicket after the handshake)
    pub const HANDSHAKE: u8 = 22;
    /// application_data
    pub const APPLICATION_DATA: u8 = 23;
}

/// The AEADs kernel TLS may hold (`TLS_CIPHER_*` of include/uapi/linux/tls.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    /// AES-128-GCM.
    Aes128Gcm = 0,
    /// AES-256-GCM.
    Aes256Gcm = 1,
    /// ChaCha20-Poly1305.
    Chacha20Poly1305 = 2,
}

impl Cipher {
    const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "ChaCha20-Poly1305",
        }
    }
}

/// The (TLS version, cipher) pairs the kernel took keys for, both ways, in the probe: a
/// kernel with TLS may still lack a cipher's crypto (ChaCha20-Poly1305 came in Linux 5.11,
/// and each is a module that may be missing). A session is handed to the kernel only with
/// one of these: the hand-off consumes it, and a key the kernel then refused cut the
/// connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ciphers(u8);

impl Ciphers {
    /// Every pair.
    pub const ALL: Ciphers = Ciphers(0b11_1111);

    fn bit(tls13: bool, c: Cipher) -> u8 {
        1 << (u8::from(tls13) * 3 + c as u8)
    }

    /// Does the kernel take `c` under TLS 1.3 (`tls13`) or TLS 1.2?
    pub fn has(self, tls13: bool, c: Cipher) -> bool {
        self.0 & Self::bit(tls13, c) != 0
    }

    /// With `c` under that version added.
    pub fn with(self, tls13: bool, c: Cipher) -> Ciphers {
        Ciphers(self.0 | Self::bit(tls13, c))
    }

    /// The pairs missing, for logs and `sipring doctor` (empty when none is).
    pub fn missing(self) -> String {
        let mut out = Vec::new();
        for tls13 in [false, true] {
            for c in Cipher::ALL {
                if !self.has(tls13, c) {
                    out.push(format!("TLS 1.{} {}", if tls13 { 3 } else { 2 }, c.name()));
                }
            }
        }
        out.join(", ")
    }
}

/// What the kernel offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// Kernel TLS works (module loaded, ULP attachable). `rekey`: the kernel accepts new
    /// keys on a live socket (TLS 1.3 KeyUpdate; Linux 6.14+).
    Available {
        /// Can keys be replaced (KeyUpdate)?
        rekey: bool,
        /// What it took keys for.
        ciphers: Ciphers,
    },
    /// The kernel has no TLS (`CONFIG_TLS` unset or module not loadable).
    KernelLacksTls(String),
    /// The probe itself failed.
    ProbeFailed(String),
}

impl Support {
    /// Is kernel TLS usable?
    pub fn available(&self) -> bool {
        matches!(self, Support::Available { .. })
    }

    /// Can the kernel follow a TLS 1.3 KeyUpdate?
    pub fn rekey(&self) -> bool {
        matches!(self, Support::Available { rekey: true, .. })
    }

    /// The ciphers the kernel takes (none when it has no TLS).
    pub fn ciphers(&self) -> Ciphers {
        match self {
            Support::Available { ciphers, .. } => *ciphers,
            _ => Ciphers::default(),
        }
    }

    /// A one-line description for logs and `sipring doctor`.
    pub fn describe(&self) -> String {
        let gaps = |c: &Ciphers| match c.missing() {
            m if m.is_empty() => String::new(),
            m => format!("; without {m} (those sessions stay in userspace)"),
        };
        match self {
            Support::Available {
                rekey: true,
                ciphers,
            } => format!(
                "kernel TLS available, with KeyUpdate (rekey) support{}",
                gaps(ciphers)
            ),
            Support::Available {
                rekey: false,
                ciphers,
            } => format!(
                "kernel TLS available, without KeyUpdate support (Linux < 6.14): TLS 1.3 stays in userspace unless tls.ktls_tls13_without_rekey{}",
                gaps(ciphers)
            ),
            Support::KernelLacksTls(e) => format!(
                "kernel lacks TLS ({e}): `modprobe tls`, or a kernel built with CONFIG_TLS; falling back to userspace TLS"
            ),
            Support::ProbeFailed(e) => {
                format!("kernel TLS probe failed ({e}); falling back to userspace TLS")
            }
        }
    }
}

/// Attaches the `tls` ULP to a connected socket.
pub fn attach_ulp(fd: RawFd) -> io::Result<()> {
    // SAFETY: setsockopt reads `optlen` = 3 bytes from a pointer to the static string "tls",
    // which outlives the call; `fd` is a socket descriptor owned by the caller.
    let rc = unsafe { libc::setsockopt(fd, SOL_TCP, TCP_ULP, b"tls".as_ptr().cast(), 3) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Probes kernel TLS once with a connected loopback pair.
pub fn probe() -> Support {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    let pair = (|| {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let c = TcpStream::connect(l.local_addr()?)?;
        let (s, _) = l.accept()?;
        Ok::<_, io::Error>((c, s))
    })();
    let (c, _s) = match pair {
        Ok(p) => p,
        Err(e) => return Support::ProbeFailed(format!("loopback pair: {e}")),
    };
    match attach_ulp(c.as_raw_fd()) {
        Ok(()) => Support::Available {
            rekey: probe_rekey(c.as_raw_fd()),
            ciphers: probe_ciphers(),
        },
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            Support::KernelLacksTls("TCP_ULP \"tls\": ENOENT".into())
        }
        Err(e) => Support::ProbeFailed(format!("TCP_ULP: {e}")),
    }
}

/// `struct tls12_crypto_info_<cipher>` (include/uapi/linux/tls.h), for the probe only: a
/// `tls_crypto_info` header, then the cipher's IV, key, salt and record sequence, all bytes
/// (no padding: 4 + IV + KEY + SALT + 8 is 40 for AES-128-GCM and 56 for AES-256-GCM and
/// ChaCha20-Poly1305, the kernel's sizes).
#[repr(C)]
struct ProbeInfo<const IV: usize, const KEY: usize, const SALT: usize> {
    version: u16,
    cipher_type: u16,
    iv: [u8; IV],
    key: [u8; KEY],
    salt: [u8; SALT],
    rec_seq: [u8; 8],
}

impl<const IV: usize, const KEY: usize, const SALT: usize> ProbeInfo<IV, KEY, SALT> {
    fn new(tls13: bool, cipher_type: u16) -> Self {
        ProbeInfo {
            version: if tls13 { 0x0304 } else { 0x0303 },
            cipher_type,
            iv: [1; IV],
            key: [2; KEY],
            salt: [3; SALT],
            rec_seq: [0; 8],
        }
    }
}

/// Installs a throw-away key on the probe socket `fd`; true when the kernel takes it.
fn set_probe_key<const IV: usize, const KEY: usize, const SALT: usize>(
    fd: RawFd,
    dir: libc::c_int,
    info: &ProbeInfo<IV, KEY, SALT>,
) -> bool {
    // SAFETY: `info` is a live `ProbeInfo`, laid out as the kernel's crypto-info struct of
    // its cipher (see `ProbeInfo`), and the length passed is its exact size; `fd` is a
    // connected socket of the probe's own.
    unsafe {
        libc::setsockopt(
            fd,
            SOL_TLS,
            dir,
            (info as *const ProbeInfo<IV, KEY, SALT>).cast(),
            size_of::<ProbeInfo<IV, KEY, SALT>>() as libc::socklen_t,
        ) == 0
    }
}

/// Which (version, cipher) pairs the kernel takes keys for, both ways: one fresh loopback
/// pair each (a socket takes one key per direction).
fn probe_ciphers() -> Ciphers {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    let mut out = Ciphers::default();
    for tls13 in [false, true] {
        for c in Cipher::ALL {
            let pair = (|| {
                let l = TcpListener::bind("127.0.0.1:0")?;
                let c = TcpStream::connect(l.local_addr()?)?;
                let (s, _) = l.accept()?;
                Ok::<_, io::Error>((c, s))
            })();
            let Ok((sock, _peer)) = pair else { continue };
            let fd = sock.as_raw_fd();
            if attach_ulp(fd).is_err() {
                continue;
            }
            let both = |tx: &dyn Fn() -> bool, rx: &dyn Fn() -> bool| tx() && rx();
            let ok = match c {
                Cipher::Aes128Gcm => {
                    let i = ProbeInfo::<8, 16, 4>::new(tls13, 51);
                    both(&|| set_probe_key(fd, TLS_TX, &i), &|| {
                        set_probe_key(fd, TLS_RX, &i)
                    })
                }
                Cipher::Aes256Gcm => {
                    let i = ProbeInfo::<8, 32, 4>::new(tls13, 52);
                    both(&|| set_probe_key(fd, TLS_TX, &i), &|| {
                        set_probe_key(fd, TLS_RX, &i)
                    })
                }
                Cipher::Chacha20Poly1305 => {
                    let i = ProbeInfo::<12, 32, 0>::new(tls13, 54);
                    both(&|| set_probe_key(fd, TLS_TX, &i), &|| {
                        set_probe_key(fd, TLS_RX, &i)
                    })
                }
            };
            if ok {
                out = out.with(tls13, c);
            }
        }
    }
    out
}

/// Sets a throw-away TX key twice on the probe socket: the second succeeds only on kernels
/// that support rekeying.
fn probe_rekey(fd: RawFd) -> bool {
    let info = ProbeInfo::<8, 16, 4>::new(true, 51);
    set_probe_key(fd, TLS_TX, &info) && set_probe_key(fd, TLS_TX, &info)
}

/// Direction of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Sending.
    Tx,
    /// Receiving.
    Rx,
}

/// One direction's key, IV and record number as the kernel takes them, wiped when dropped
/// (set or not: a key the kernel refused is no less secret).
pub struct KeyInfo(ktls::CryptoInfo);

impl Drop for KeyInfo {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        match &mut self.0 {
            ktls::CryptoInfo::AesGcm128(i) => {
                i.key.zeroize();
                i.iv.zeroize();
                i.salt.zeroize();
            }
            ktls::CryptoInfo::AesGcm256(i) => {
                i.key.zeroize();
                i.iv.zeroize();
                i.salt.zeroize();
            }
            ktls::CryptoInfo::Chacha20Poly1305(i) => {
                i.key.zeroize();
                i.iv.zeroize();
            }
            // Never built here (`kernel_cipher` offloads the three above only).
            _ => {}
        }
    }
}

/// Installs a traffic key (with its record sequence number) for one direction.
pub fn set_key(fd: RawFd, dir: Dir, info: &KeyInfo) -> io::Result<()> {
    let info = &info.0;
    let opt = match dir {
        Dir::Tx => TLS_TX,
        Dir::Rx => TLS_RX,
    };
    // SAFETY: `info.as_ptr()` points to the crypto-info struct held by `info`, which lives
    // for the whole call, and `info.size()` is exactly that struct's size, as setsockopt
    // requires; `fd` is a socket owned by the caller.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            SOL_TLS,
            opt,
            info.as_ptr(),
            info.size() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Converts rustls's secrets for one direction into the kernel's struct.
pub fn crypto_info(
    suite: rustls::SupportedCipherSuite,
    seq: u64,
    secrets: rustls::ConnectionTrafficSecrets,
) -> Result<KeyInfo, String> {
    ktls::CryptoInfo::from_rustls(suite, (seq, secrets))
        .map(KeyInfo)
        .map_err(|e| e.to_string())
}

/// [`crypto_info`] for the sending direction, whose TLS 1.2 AES-GCM nonces must not repeat
/// rustls's. RFC 5288 leaves the 8-byte explicit nonce to the sender: rustls writes
/// `iv XOR j` for its record `j`, and the kernel writes the struct's `iv` as its first
/// record's, then counts up by one (it XORs the sequence number only for TLS 1.3 and
/// ChaCha20). Given rustls's `iv` unchanged, the kernel's first record reused the nonce of
/// our Finished (record 0) under the same key: two GCM messages under one nonce give away
/// the authentication key (forged records) and the XOR of the plaintexts. Started at
/// `iv + seq` instead: every `iv XOR j` with `j < seq` is at most `iv + j < iv + seq`, and
/// the kernel's count would need 2^64 records to wrap back to them.
pub fn tx_crypto_info(
    suite: rustls::SupportedCipherSuite,
    seq: u64,
    secrets: rustls::ConnectionTrafficSecrets,
) -> Result<KeyInfo, String> {
    let mut info = crypto_info(suite, seq, secrets)?;
    if matches!(suite, rustls::SupportedCipherSuite::Tls12(_)) {
        match &mut info.0 {
            ktls::CryptoInfo::AesGcm128(i) => i.iv = past_rustls_nonces(i.iv, seq),
            ktls::CryptoInfo::AesGcm256(i) => i.iv = past_rustls_nonces(i.iv, seq),
            _ => {}
        }
    }
    Ok(info)
}

/// The first explicit nonce the kernel may use after rustls sent records `0..seq` from
/// `iv` (see [`tx_crypto_info`]).
pub fn past_rustls_nonces(iv: [u8; 8], seq: u64) -> [u8; 8] {
    u64::from_be_bytes(iv).wrapping_add(seq).to_be_bytes()
}

/// Reads one record's payload with its content type (non-blocking). Application data also
/// arrives this way, as type 23; `Ok(None)` means nothing to read right now.
pub fn recv_record(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<(u8, usize)>> {
    #[repr(C, align(8))]
    struct Control([u8; 64]);
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid "empty" value; the pointers set below refer to
    // `iov`, `buf` and `control`, all alive until recvmsg returns.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: `msg` describes writable buffers of the stated lengths (see above).
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e);
    }
    let mut typ = content::APPLICATION_DATA;
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR/CMSG_DATA walk the control buffer the kernel just
    // filled, within `msg_controllen`; we read one byte of data only when the header says it
    // is SOL_TLS/TLS_GET_RECORD_TYPE, whose payload is one byte.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_TLS && (*c).cmsg_type == TLS_GET_RECORD_TYPE {
                typ = *libc::CMSG_DATA(c);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Some((typ, n as usize)))
}

/// Sends one record of content type `typ` (alert, handshake) through the kernel, without
/// blocking (the shard's thread must never wait on one peer): `WouldBlock` when the socket
/// has no room now.
pub fn send_record(fd: RawFd, typ: u8, payload: &[u8]) -> io::Result<usize> {
    #[repr(C, align(8))]
    struct Control([u8; 32]);
    let mut control = Control([0; 32]);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut _,
        iov_len: payload.len(),
    };
    // SAFETY: zeroed msghdr is valid; pointers below refer to live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic on a length of 1.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as _;
    // SAFETY: the control buffer (32 bytes) is larger than CMSG_SPACE(1), so the first header
    // and its one data byte lie inside it; sendmsg only reads the payload (not written).
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_TLS;
        (*c).cmsg_type = TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(c) = typ;
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sends a close_notify alert through the kernel (best effort: not when the socket is full).
pub fn send_close_notify(fd: RawFd) -> io::Result<()> {
    send_record(fd, content::ALERT, &[1, 0]).map(|_| ())
}

#[cfg(test)]
mod tests {
    /// The kernel's TLS 1.2 AES-GCM nonces (its start, counting up) never repeat one rustls
    /// used before the hand-off (`iv XOR j`, `j < seq`), whatever the key block's `iv`,
    /// wrapping included. With rustls's `iv` unchanged, the first one did.
    #[test]
    fn the_kernels_tls12_nonces_never_repeat_rustls_ones() {
        let ivs = [
            0u64,
            1,
            0x8000_0000_0000_0000,
            u64::MAX,
            u64::MAX - 3,
            0x0123_4567_89ab_cdef,
        ];
        for iv in ivs {
            for seq in 1..=40u64 {
                let start = u64::from_be_bytes(super::past_rustls_nonces(iv.to_be_bytes(), seq));
                for k in 0..4096u64 {
                    let kernel = start.wrapping_add(k);
                    for j in 0..seq {
                        assert_ne!(kernel, iv ^ j, "iv {iv:#x}, seq {seq}, kernel record {k}");
                    }
                }
            }
        }
    }

    /// The probe agrees with the kernel's list of registered ULPs (read after the probe,
    /// which may have auto-loaded the module): on this project's hosts the kernel has no TLS,
    /// in the kTLS VM it has.
    #[test]
    fn probe_agrees_with_the_kernel() {
        let s = super::probe();
        let ulps =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
        let listed = ulps.split_whitespace().any(|u| u == "tls");
        match s {
            super::Support::Available { .. } => {
                assert!(listed, "probe says available, kernel lists: {ulps}")
            }
            super::Support::KernelLacksTls(_) => {
                assert!(!listed, "probe says no TLS, kernel lists: {ulps}")
            }
            super::Support::ProbeFailed(e) => panic!("probe failed: {e}"),
        }
    }
}
