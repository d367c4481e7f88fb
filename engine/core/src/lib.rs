//! # sipring-core: the sans-IO SIP core of sipring
//!
//! This crate is everything in sipring that decides what to do with SIP bytes. It frames
//! and parses messages, edits them losslessly for forwarding, runs the RFC 3261 transaction
//! state machines, applies registrar logic and makes proxy routing decisions.
//!
//! ## What it deliberately does not do
//!
//! It contains no networking code, reads no clock and knows nothing of glommio, TLS or
//! threads (in the spirit of quinn-proto and rustls). Time comes in as `now: Instant`,
//! bytes come in as slices, and decisions go out as values. The engine crate owns sockets,
//! timers and cores and only shuttles bytes and events. That makes every behaviour here
//! deterministic and testable in memory, with a simulated clock.
//!
//! ## Data flow
//!
//! ```text
//!   bytes from a connection
//!          │
//!          ▼
//!   parse::Framer ── Ping ─────────────────────────────► driver writes CRLF pong
//!          │ Message(len)
//!          ▼
//!   parse::parse ──► Message (start line + borrowed headers)
//!          │ Message::validate ──► Essentials (Via, From, To, Call-ID, CSeq typed)
//!          │            └─ Err(ParseError) ──► response::error_response (400/413/505/513…)
//!          ▼
//!   transaction (server txn: 100 Trying, retransmissions, ACK absorption, timers)
//!          ▼
//!   REGISTER ──► registrar::Registrar ──► BindingStore (per shard, owned by the engine)
//!   others   ──► proxy::Proxy::decide ──► Respond | ForwardToFlows | ForwardToPeer | ForwardToUri
//!          ▼
//!   edit::Editor (prepend Via, Max-Forwards−1, Record-Route, pop Route, …) ──► bytes out
//! ```
//!
//! ## Conventions
//!
//! - Parsing returns [`parse::Status::Partial`] for incomplete input; it is not an error.
//! - Every error is a small `Copy` enum ([`ParseError`]) mapped to its SIP response in one
//!   place ([`ParseError::response`]).
//! - Header names and values borrow from the input; editing splices the original bytes, so
//!   what a proxy did not touch goes out exactly as it came in.

pub mod auth;
pub mod edit;
pub mod error;
pub mod header;
pub mod matching;
pub mod overload_control;
pub mod parse;
pub mod policy;
pub mod proxy;
pub mod registrar;
pub mod response;
pub mod stateful;
#[cfg(feature = "serde")]
pub mod subscriber_file;
mod text;
pub mod transaction;
pub mod uri;
pub mod values;

pub use error::{Fault, ParseError};
pub use header::{Header, HeaderName};
pub use parse::{
    Essentials, Frame, Framer, Framing, KeepaliveRole, Limits, Message, Method, StartLine, Status,
    parse,
};
pub use uri::{Scheme, Uri};
pub use values::{CSeq, NameAddr, Via};

#[cfg(test)]
mod parse_tests;
