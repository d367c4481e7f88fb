//! The admin endpoint: a tiny HTTP/1.0 server on its own thread (keep it on loopback).
//!
//! - `GET /metrics`: Prometheus text, all shards merged, each family once.
//! - `GET /metrics/shards`: the same families with one series per shard (`shard` label).
//! - `GET /hgrm`: the histogram names; `GET /hgrm/<name>`: one histogram in `.hgrm` format
//!   (milliseconds), merged across shards.
//! - `POST /reload`: like SIGHUP.
//! - `GET /health`: `ok`, or `draining`.

use crate::control::Control;
use crate::server::{Reloader, Running, merge};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

/// Starts the admin thread; returns the bound address.
pub fn spawn(addr: SocketAddr, running: &Running) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let control = running.control.clone();
    let reloader = Reloader::of(running);
    std::thread::Builder::new()
        .name("sipring-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                if control.stopping() {
                    break;
                }
                match stream {
                    Ok(s) => {
                        let _ = handle(s, &control, &reloader);
                    }
                    // Out of descriptors for a moment (closes still pending): wait, do not
                    // spin; the connection stays queued and is served next.
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        })?;
    Ok(local)
}

fn handle(stream: TcpStream, control: &Arc<Control>, reloader: &Reloader) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    // Read and write through one descriptor (no dup: it must work with few to spare).
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Drain the request headers.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        // All shards merged: what `sum(rate(...))` should see, each family once.
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            merge(control).prometheus(),
        ),
        // The same families, one series per shard (label `shard`): scrape one or the other.
        ("GET", "/metrics/shards") => {
            let snaps: Vec<_> = control.snapshots.iter().map(|s| s.load_full()).collect();
            let sets: Vec<_> = snaps.iter().map(|s| (Some(s.shard), &s.metrics)).collect();
            (
                "200 OK",
                "text/plain; version=0.0.4",
                crate::metrics::exposition(&sets),
            )
        }
        ("GET", "/hgrm") => (
            "200 OK",
            "text/plain",
            merge(control)
                .histograms
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
                + "\n",
        ),
        ("GET", p) if p.starts_with("/hgrm/") => match merge(control).histograms.get(&p[6..]) {
            Some(h) => ("200 OK", "text/plain", crate::metrics::hgrm(h, 1000.0)),
            None => ("404 Not Found", "text/plain", "no such histogram\n".into()),
        },
        ("POST", "/reload") => match reloader.reload() {
            Ok(()) => ("200 OK", "text/plain", "reloaded\n".into()),
            Err(e) => (
                "409 Conflict",
                "text/plain",
                format!("reload refused: {e}\n"),
            ),
        },
        ("GET", "/health") => (
            "200 OK",
            "text/plain",
            if control.draining() {
                "draining\n".into()
            } else {
                "ok\n".into()
            },
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    };
    let mut s = &stream;
    write!(
        s,
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}
