//! SIP overload control (RFC 7339), loss-based: a server tells the upstream clients that
//! advertise support (`oc` in the Via they add) what share of their new requests to drop
//! before sending them, so an overloaded server stops paying to refuse work it cannot take.
//!
//! Both halves are here, pure: [`Feedback`] is what a server writes into the topmost Via of
//! a response ([`crate::edit::Editor::overload_feedback`]); [`Throttle`] is the state a
//! client keeps per server and the decision it makes before each new request (the load
//! generator uses it; a proxy that forwards to an overloaded next hop could too).
//!
//! Advertising support is a claim: a server that stops refusing a client's requests at its
//! door because the client promised to drop them itself must trust that client
//! ([`Trust`]): a client that advertises `oc` and ignores the feedback would otherwise take
//! what the shedding keeps for everyone else.

use std::time::{Duration, Instant};

use crate::text::{eq_ic, parse_u32};
use crate::values::Via;

/// `oc-validity` a server sends, in milliseconds (RFC 7339 §4: the default, 500).
pub const DEFAULT_VALIDITY_MS: u32 = 500;

/// The longest `oc-validity` a client takes, in milliseconds: feedback asks again soon, and
/// one answer (from a server, or forged by someone downstream of a proxy that did not strip
/// it) cannot stop traffic for longer than this.
pub const MAX_VALIDITY_MS: u32 = 5_000;

/// Whose `oc` a server honours by letting their new requests past its door shedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trust {
    /// Nobody: no feedback is sent, everyone is shed at the door.
    Off,
    /// Connections that authenticated as a configured partner (mutual TLS): other SIP
    /// servers, the deployment RFC 7339 was written for.
    #[default]
    Partners,
    /// Any connection that advertises `oc`, partner or not. Only where every client is
    /// known to honour the feedback: one that does not escapes the shedding.
    All,
}

/// Does this Via value (a request's topmost) advertise overload control with the loss
/// algorithm? `oc` present, and `oc-algo` absent (loss is the default every implementation
/// supports) or listing `loss`.
pub fn advertises_loss(via: &[u8]) -> bool {
    Via::parse(via).is_some_and(|v| advertises(&v))
}

/// [`advertises_loss`] of an already parsed Via.
pub fn advertises(v: &Via<'_>) -> bool {
    v.param("oc").is_some() && loss_allowed(v)
}

/// `oc-algo` absent (loss, the default) or naming `loss`.
fn loss_allowed(v: &Via<'_>) -> bool {
    match v.param("oc-algo") {
        None | Some(None) => true,
        Some(Some(list)) => {
            let list = list.strip_prefix(b"\"").unwrap_or(list);
            let list = list.strip_suffix(b"\"").unwrap_or(list);
            list.split(|&b| b == b',')
                .any(|a| eq_ic(crate::text::trim(a), b"loss"))
        }
    }
}

/// What a server tells a client in the topmost Via of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feedback {
    /// Percentage of new requests the client should drop, 0–100.
    pub oc: u8,
    /// How long the value holds, in milliseconds (0: stop overload control).
    pub validity_ms: u32,
    /// Rises whenever `oc` changes, so a client can ignore feedback older than what it has.
    pub seq: u64,
}

impl Feedback {
    /// The feedback for a server admitting `admitted` (0.0–1.0) of new requests: drop the
    /// rest before sending it.
    pub fn for_admission(admitted: f32, validity_ms: u32, seq: u64) -> Feedback {
        let drop = ((1.0 - admitted.clamp(0.0, 1.0)) * 100.0).round() as u8;
        Feedback {
            oc: drop,
            validity_ms,
            seq,
        }
    }

    /// Appends `;oc=…;oc-algo="loss";oc-validity=…;oc-seq=…` to `out`. `oc-seq` is written
    /// as the grammar's `1*12DIGIT "." 1*5DIGIT` with a fixed five-digit fraction, so that
    /// reading it as a decimal number keeps its order.
    pub fn write_params(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let _ = write!(
            out,
            ";oc={};oc-algo=\"loss\";oc-validity={};oc-seq={}.{:05}",
            self.oc,
            self.validity_ms,
            self.seq / 100_000,
            self.seq % 100_000
        );
    }

    /// Reads the feedback a response's topmost Via carries; `None` without a valued `oc`,
    /// with a value out of range, or for another algorithm than loss. A missing
    /// `oc-validity` is the default, a longer one than [`MAX_VALIDITY_MS`] is cut to it; a
    /// missing or malformed `oc-seq` reads as 0.
    pub fn parse(via: &[u8]) -> Option<Feedback> {
        Feedback::of(&Via::parse(via)?)
    }

    /// [`Feedback::parse`] of an already parsed Via.
    pub fn of(v: &Via<'_>) -> Option<Feedback> {
        let oc = parse_u32(v.param("oc")??).filter(|&n| n <= 100)? as u8;
        if !loss_allowed(v) {
            return None;
        }
        let validity_ms = match v.param("oc-validity") {
            Some(Some(ms)) => parse_u32(ms)?.min(MAX_VALIDITY_MS),
            _ => DEFAULT_VALIDITY_MS,
        };
        let seq = v.param("oc-seq").flatten().and_then(parse_seq).unwrap_or(0);
        Some(Feedback {
            oc,
            validity_ms,
            seq,
        })
    }
}

/// `oc-seq` as one ordered integer: the whole part × 10⁵ + the fraction read to five digits.
fn parse_seq(s: &[u8]) -> Option<u64> {
    let (whole, frac) = match memchr::memchr(b'.', s) {
        Some(dot) => (&s[..dot], &s[dot + 1..]),
        None => (s, &b""[..]),
    };
    if whole.is_empty() || whole.len() > 12 || frac.len() > 5 {
        return None;
    }
    if !whole.iter().chain(frac).all(u8::is_ascii_digit) {
        return None;
    }
    let w: u64 = std::str::from_utf8(whole).ok()?.parse().ok()?;
    let mut f: u64 = 0;
    for i in 0..5 {
        f = f * 10 + frac.get(i).map_or(0, |d| u64::from(d - b'0'));
    }
    Some(w * 100_000 + f)
}

/// A client's overload state for one server (RFC 7339 §5.5): the last feedback it had and
/// until when it holds, and the credit that spreads its drops evenly (one in four at 25 %,
/// not bursts).
#[derive(Debug, Default)]
pub struct Throttle {
    oc: u8,
    until: Option<Instant>,
    seq: u64,
    credit: f32,
}

impl Throttle {
    /// Takes the feedback in a response's topmost Via, if any. Feedback older than what the
    /// throttle holds while that is valid (a lower `oc-seq`) is ignored; `oc-validity=0`
    /// ends overload control.
    pub fn observe(&mut self, now: Instant, top_via: &[u8]) {
        if let Some(f) = Feedback::parse(top_via) {
            self.apply(now, f);
        }
    }

    /// Takes feedback already read ([`Throttle::observe`]).
    pub fn apply(&mut self, now: Instant, f: Feedback) {
        if self.until.is_some_and(|u| now < u) && f.seq < self.seq {
            return;
        }
        self.seq = f.seq;
        if f.validity_ms == 0 {
            self.until = None;
            self.oc = 0;
            return;
        }
        self.oc = f.oc;
        self.until = Some(now + Duration::from_millis(u64::from(f.validity_ms)));
    }

    /// The share to drop now, in percent (0 once the feedback's validity ran out).
    pub fn dropping(&self, now: Instant) -> u8 {
        match self.until {
            Some(u) if now < u => self.oc,
            _ => 0,
        }
    }

    /// Whether to send a new request (out of dialog) now; `false`: drop it here, as the
    /// server asked. In-dialog requests, ACK and CANCEL are never subject to this.
    pub fn admit(&mut self, now: Instant) -> bool {
        let drop = self.dropping(now);
        if drop == 0 {
            self.credit = 0.0;
            return true;
        }
        self.credit += f32::from(100 - drop) / 100.0;
        if self.credit >= 1.0 {
            self.credit -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIA: &[u8] = b"SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKa1;oc;oc-algo=\"loss,A\"";

    #[test]
    fn advertising_needs_oc_and_accepts_a_list_that_holds_loss() {
        assert!(advertises_loss(VIA));
        assert!(advertises_loss(b"SIP/2.0/TCP h;branch=z9hG4bKa;oc"));
        assert!(advertises_loss(
            b"SIP/2.0/TCP h;oc;branch=z9hG4bKa;oc-algo=LOSS"
        ));
        assert!(!advertises_loss(b"SIP/2.0/TCP h;branch=z9hG4bKa"));
        assert!(!advertises_loss(b"SIP/2.0/TCP h;oc;oc-algo=\"rate\""));
        assert!(!advertises_loss(b"SIP/2.0/TCP h;ocx"));
        assert!(!advertises_loss(b"garbage;oc"));
    }

    #[test]
    fn feedback_from_admission_and_back() {
        let f = Feedback::for_admission(0.25, 500, 123_456_789);
        assert_eq!(f.oc, 75);
        let mut via = b"SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKa1".to_vec();
        f.write_params(&mut via);
        assert_eq!(
            via,
            b"SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKa1;oc=75;oc-algo=\"loss\";oc-validity=500;oc-seq=1234.56789".to_vec()
        );
        assert_eq!(Feedback::parse(&via), Some(f));
        assert_eq!(Feedback::for_admission(1.0, 500, 1).oc, 0);
        assert_eq!(Feedback::for_admission(0.02, 500, 1).oc, 98);
        assert_eq!(Feedback::for_admission(-3.0, 500, 1).oc, 100);
    }

    #[test]
    fn sequence_numbers_keep_their_order_whatever_the_fraction_digits() {
        assert!(parse_seq(b"1.5").unwrap() > parse_seq(b"1.12").unwrap());
        assert!(parse_seq(b"2").unwrap() > parse_seq(b"1.99999").unwrap());
        assert_eq!(parse_seq(b"1282321615.782"), Some(128_232_161_578_200));
        assert_eq!(parse_seq(b"1.123456"), None);
        assert_eq!(parse_seq(b"a.1"), None);
        assert_eq!(parse_seq(b".1"), None);
    }

    #[test]
    fn feedback_without_a_valued_oc_or_out_of_range_is_not_feedback() {
        assert_eq!(Feedback::parse(VIA), None);
        assert_eq!(
            Feedback::parse(b"SIP/2.0/TLS h;branch=z9hG4bKa;oc=101"),
            None
        );
        assert_eq!(
            Feedback::parse(b"SIP/2.0/TLS h;branch=z9hG4bKa;oc=20;oc-algo=\"rate\""),
            None,
            "a rate is not a percentage"
        );
        let f =
            Feedback::parse(b"SIP/2.0/TLS h;branch=z9hG4bKa;oc=20;oc-validity=4294967295").unwrap();
        assert_eq!(f.validity_ms, MAX_VALIDITY_MS);
        let f = Feedback::parse(b"SIP/2.0/TLS h;branch=z9hG4bKa;oc=20").unwrap();
        assert_eq!((f.oc, f.validity_ms, f.seq), (20, DEFAULT_VALIDITY_MS, 0));
    }

    #[test]
    fn a_throttle_drops_the_share_it_was_told_evenly_until_validity_runs_out() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert!((0..100).all(|_| t.admit(t0)), "no feedback: everything");
        t.observe(
            t0,
            b"SIP/2.0/TLS h;branch=z9hG4bKa;oc=75;oc-validity=500;oc-seq=1.0",
        );
        let sent: Vec<bool> = (0..8).map(|_| t.admit(t0)).collect();
        assert_eq!(
            sent,
            [false, false, false, true, false, false, false, true],
            "one in four, spread"
        );
        assert_eq!(t.dropping(t0 + Duration::from_millis(499)), 75);
        let later = t0 + Duration::from_millis(500);
        assert_eq!(t.dropping(later), 0);
        assert!((0..10).all(|_| t.admit(later)), "validity ran out");
    }

    #[test]
    fn older_feedback_is_ignored_and_validity_zero_ends_it() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        t.observe(t0, b"SIP/2.0/TLS h;branch=z9hG4bKa;oc=50;oc-seq=2.5");
        t.observe(t0, b"SIP/2.0/TLS h;branch=z9hG4bKa;oc=10;oc-seq=2.12");
        assert_eq!(t.dropping(t0), 50, "2.12 is older than 2.5");
        t.observe(t0, b"SIP/2.0/TLS h;branch=z9hG4bKa;oc=10;oc-seq=2.50001");
        assert_eq!(t.dropping(t0), 10);
        t.observe(
            t0,
            b"SIP/2.0/TLS h;branch=z9hG4bKa;oc=10;oc-validity=0;oc-seq=3",
        );
        assert_eq!(t.dropping(t0), 0);
        assert!(t.admit(t0));
        // Once what it held ran out, a lower sequence (a restarted server) is taken.
        t.observe(t0, b"SIP/2.0/TLS h;branch=z9hG4bKa;oc=40;oc-seq=9");
        let later = t0 + Duration::from_secs(1);
        t.observe(later, b"SIP/2.0/TLS h;branch=z9hG4bKa;oc=30;oc-seq=1");
        assert_eq!(t.dropping(later), 30);
    }
}
