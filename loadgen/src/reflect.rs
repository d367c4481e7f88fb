//! The ceiling: a server on the same runtime as sipring (glommio, one pinned executor per
//! core, `SO_REUSEPORT`, the same rustls sessions and framer) that answers every request
//! with a stateless 200 and does nothing else — no transactions, no registrar, no second hop.
//! What it sustains is what the runtime, TLS and framing can move at all; sipring's figures
//! are stated as a fraction of it.

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::ServerConfig;
use sipring_core::response::{ResponseParts, response_to};
use sipring_core::{Frame, Framer, Framing, Header, KeepaliveRole, Limits, Status, parse};
use sipring_net::session::TlsSession;
use std::net::SocketAddr;
use std::sync::Arc;

/// Serves until the process is killed. `tls`: `None` for plain TCP.
pub fn serve(
    addr: SocketAddr,
    shards: usize,
    tls: Option<Arc<ServerConfig>>,
) -> Result<(), String> {
    let socks = sipring_net::sys::sock::bind_reuseport(addr, shards, 4096)
        .map_err(|e| format!("{addr}: {e}"))?;
    println!(
        "reflect: listening on {} with {shards} shard(s)",
        socks[0].local
    );
    let cpus = sipring_net::sys::cpus::allowed();
    let mut hs = Vec::new();
    for (i, s) in socks.into_iter().enumerate() {
        let tls = tls.clone();
        let h = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpus[i % cpus.len()]))
            .name(&format!("reflect-{i}"))
            .io_memory(512 * 1024)
            .spawn(move || async move {
                let l = s.into_glommio();
                loop {
                    let Ok(c) = l.accept().await else { continue };
                    let tls = tls.clone();
                    glommio::spawn_local(async move { conn(c, tls).await }).detach();
                }
            })
            .map_err(|e| e.to_string())?;
        hs.push(h);
    }
    for h in hs {
        let _ = h.join();
    }
    Ok(())
}

async fn conn(mut s: TcpStream, tls: Option<Arc<ServerConfig>>) {
    let _ = s.set_nodelay(true);
    let mut sess = match tls {
        Some(cfg) => {
            let Ok(mut sess) = TlsSession::server(cfg) else {
                return;
            };
            if sipring_net::handshake::drive_handshake(&mut s, &mut sess)
                .await
                .is_err()
            {
                return;
            }
            Some(sess)
        }
        None => None,
    };
    let mut framer = Framer::new(Limits::default(), KeepaliveRole::Server);
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 64 * 1024];
    loop {
        let n = match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match &mut sess {
            Some(t) => {
                if t.receive(&tmp[..n]).is_err() {
                    return;
                }
                buf.extend_from_slice(t.plaintext());
                t.plaintext().clear();
            }
            None => buf.extend_from_slice(&tmp[..n]),
        }
        let mut out = Vec::new();
        let mut start = 0;
        loop {
            match framer.frame(&buf[start..]) {
                Ok(Status::Complete(Frame::Message(len))) => {
                    let mut h = [Header::EMPTY; 64];
                    let parsed = parse(
                        &buf[start..start + len],
                        &mut h,
                        &Limits::default(),
                        Framing::Stream,
                    );
                    if let Ok(Status::Complete(m)) = parsed
                        && m.is_request()
                        && m.method() != Some(sipring_core::Method::Ack)
                    {
                        let parts = ResponseParts {
                            to_tag: Some(b"reflect"),
                            ..Default::default()
                        };
                        out.extend_from_slice(&response_to(&m, 200, "OK", parts));
                    }
                    start += len;
                }
                Ok(Status::Complete(Frame::Ping)) => {
                    out.extend_from_slice(b"\r\n");
                    start += 4;
                }
                Ok(Status::Complete(f)) => start += f.len(),
                Ok(Status::Partial) => break,
                Err(_) => return,
            }
        }
        buf.drain(..start);
        if out.is_empty() {
            continue;
        }
        let bytes = match &mut sess {
            Some(t) => {
                if t.write(&out).is_err() {
                    return;
                }
                t.take_outgoing()
            }
            None => out,
        };
        if s.write_all(&bytes).await.is_err() {
            return;
        }
    }
}
