//! Per-shard counters and latency histograms, published as lock-free snapshots and merged on
//! demand for the admin endpoint (Prometheus text and `.hgrm` percentile distributions).
//!
//! Each shard owns its [`ShardMetrics`] (no sharing, no atomics on the message path) and
//! every few hundred milliseconds publishes a [`Snapshot`] into an `ArcSwap` that the admin
//! thread reads. Merging adds counters and histograms across shards.

use hdrhistogram::Histogram;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// A latency histogram in microseconds, 1 µs .. 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds")
}

/// One shard's metrics, owned by that shard.
#[derive(Debug, Clone, Default)]
pub struct ShardMetrics {
    /// Counters by full metric name with labels, e.g. `sipring_messages_total{method="INVITE"}`.
    pub counters: BTreeMap<String, u64>,
    /// Gauges, same naming.
    pub gauges: BTreeMap<String, i64>,
    /// Latency histograms (µs) by name, e.g. `forward_INVITE`, `handshake`.
    pub histograms: BTreeMap<String, Histogram<u64>>,
}

impl ShardMetrics {
    /// Adds to a counter.
    pub fn inc(&mut self, name: &str, by: u64) {
        match self.counters.get_mut(name) {
            Some(v) => *v += by,
            None => {
                self.counters.insert(name.to_string(), by);
            }
        }
    }

    /// Adds to a gauge (may be negative).
    pub fn gauge(&mut self, name: &str, by: i64) {
        *self.gauges.entry(name.to_string()).or_insert(0) += by;
    }

    /// Sets a gauge.
    pub fn set_gauge(&mut self, name: &str, v: i64) {
        self.gauges.insert(name.to_string(), v);
    }

    /// Records a latency in microseconds.
    pub fn record(&mut self, hist: &str, micros: u64) {
        match self.histograms.get_mut(hist) {
            Some(h) => h.saturating_record(micros.max(1)),
            None => {
                let mut h = new_histogram();
                h.saturating_record(micros.max(1));
                self.histograms.insert(hist.to_string(), h);
            }
        }
    }

    /// A counter's value (0 if never incremented).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// Adds another shard's metrics into this one.
    pub fn merge(&mut self, other: &ShardMetrics) {
        for (k, v) in &other.counters {
            self.inc(k, *v);
        }
        for (k, v) in &other.gauges {
            self.gauge(k, *v);
        }
        for (k, h) in &other.histograms {
            match self.histograms.get_mut(k) {
                Some(mine) => {
                    let _ = mine.add(h);
                }
                None => {
                    self.histograms.insert(k.clone(), h.clone());
                }
            }
        }
    }

    /// Prometheus text exposition of the counters and gauges, plus summary quantiles of each
    /// histogram (in seconds): each family once, with its `# HELP` and `# TYPE`.
    pub fn prometheus(&self) -> String {
        exposition(&[(None, self)])
    }
}

/// Prometheus text for several label sets of the same families (`shard` = `Some(i)` adds
/// `shard="i"`): each family is written once, its HELP and TYPE, then every set's samples,
/// so the output passes `promtool check metrics`.
pub fn exposition(sets: &[(Option<usize>, &ShardMetrics)]) -> String {
    let with_shard = |name: &str, shard: Option<usize>| -> String {
        match shard {
            None => name.to_string(),
            Some(s) => match name.find('{') {
                Some(i) => format!("{}{{shard=\"{s}\",{}", &name[..i], &name[i + 1..]),
                None => format!("{name}{{shard=\"{s}\"}}"),
            },
        }
    };
    // family -> (type, samples)
    let mut families: BTreeMap<String, (&'static str, Vec<String>)> = BTreeMap::new();
    for (shard, m) in sets {
        let base = |k: &str| k.split('{').next().unwrap_or(k).to_string();
        for (k, v) in &m.counters {
            families
                .entry(base(k))
                .or_insert(("counter", Vec::new()))
                .1
                .push(format!("{} {v}", with_shard(k, *shard)));
        }
        for (k, v) in &m.gauges {
            families
                .entry(base(k))
                .or_insert(("gauge", Vec::new()))
                .1
                .push(format!("{} {v}", with_shard(k, *shard)));
        }
        for (k, h) in &m.histograms {
            // `_sum` (the histogram keeps the mean exactly enough) and `_count` of `name`.
            let sum_and_count = |f: &mut Vec<String>, name: &str, shard: Option<usize>| {
                f.push(format!(
                    "{} {:.6}",
                    with_shard(&name.replace("seconds{", "seconds_sum{"), shard),
                    h.mean() * h.len() as f64 / 1e6
                ));
                f.push(format!(
                    "{} {}",
                    with_shard(&name.replace("seconds{", "seconds_count{"), shard),
                    h.len()
                ));
            };
            let f = &mut families
                .entry("sipring_latency_seconds".into())
                .or_insert(("summary", Vec::new()))
                .1;
            let name = format!("sipring_latency_seconds{{histogram=\"{k}\"}}");
            for q in [0.5, 0.9, 0.99, 0.999] {
                let line = name.replace('}', &format!(",quantile=\"{q}\"}}"));
                f.push(format!(
                    "{} {:.6}",
                    with_shard(&line, *shard),
                    h.value_at_quantile(q) as f64 / 1e6
                ));
            }
            sum_and_count(f, &name, *shard);
            // The same as a histogram: buckets a query can rate() over a window (the
            // summary's quantiles are since the start, which hides a slow minute).
            let f = &mut families
                .entry("sipring_latency_bucketed_seconds".into())
                .or_insert(("histogram", Vec::new()))
                .1;
            let mut counts = [0u64; LATENCY_BUCKETS_US.len()];
            for v in h.iter_recorded() {
                // The start of the value's equivalence range (within 0.1 % of it): a
                // bound that is a recorded value counts that value in.
                let us = h.lowest_equivalent(v.value_iterated_to());
                if let Some(i) = LATENCY_BUCKETS_US.iter().position(|&le| us <= le) {
                    counts[i] += v.count_since_last_iteration();
                }
            }
            let name = format!("sipring_latency_bucketed_seconds_bucket{{histogram=\"{k}\"}}");
            let mut cumulative = 0;
            for (le, n) in LATENCY_BUCKETS_US.iter().zip(counts) {
                cumulative += n;
                let line = name.replace('}', &format!(",le=\"{}\"}}", *le as f64 / 1e6));
                f.push(format!("{} {cumulative}", with_shard(&line, *shard)));
            }
            let line = name.replace('}', ",le=\"+Inf\"}");
            f.push(format!("{} {}", with_shard(&line, *shard), h.len()));
            let name = format!("sipring_latency_bucketed_seconds{{histogram=\"{k}\"}}");
            sum_and_count(f, &name, *shard);
        }
    }
    let mut out = String::new();
    for (family, (kind, samples)) in families {
        let _ = writeln!(out, "# HELP {family} {}", help(&family));
        let _ = writeln!(out, "# TYPE {family} {kind}");
        for s in samples {
            out.push_str(&s);
            out.push('\n');
        }
    }
    out
}

/// The upper bounds (µs) of `sipring_latency_bucketed_seconds`'s buckets: 100 µs to 10 s.
const LATENCY_BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// One line about each metric family (docs/OPERATIONS.md has the full table).
fn help(family: &str) -> &'static str {
    match family {
        "sipring_connections" => "Connections up.",
        "sipring_connections_total" => "Connections established.",
        "sipring_connections_refused_total" => "Connections refused by a [limits] key.",
        "sipring_accept_errors_total" => "Accept failures.",
        "sipring_handshakes_total" => "TLS handshakes by result.",
        "sipring_handshakes_in_flight" => "TLS handshakes in progress.",
        "sipring_client_hello_timeouts_total" => "Connections that sent no ClientHello in time.",
        "sipring_tls_rejections_total" => "Refused TLS peers by reason.",
        "sipring_ktls_available" => "1 when the kernel TLS probe succeeded.",
        "sipring_tls_crl_next_update_seconds" => {
            "When the CRLs in use of each CRL file fall due (nextUpdate, unix seconds)."
        }
        "sipring_ktls_fallback_total" => "Connections kept in userspace TLS, by reason.",
        "sipring_messages_in_total" => "Framed messages received, by method or response.",
        "sipring_register_total" => "REGISTER outcomes by status.",
        "sipring_bindings" => "Registered contacts.",
        "sipring_registered_aors" => "AORs with bindings.",
        "sipring_transactions" => "Live transactions by role.",
        "sipring_requests_in_progress" => "Requests waiting for a final answer.",
        "sipring_pending_lookups" => "Cross-shard lookups and registrations in flight.",
        "sipring_requests_forwarded_total" => "Client transactions started.",
        "sipring_local_responses_total" => "Responses generated here.",
        "sipring_requests_rejected_total" => "Malformed requests answered with an error.",
        "sipring_requests_dropped_total" => {
            "Requests dropped unanswered: an ACK matching nothing with no route of ours, or an ACK or retransmission from another sender than its transaction's."
        }
        "sipring_responses_dropped_total" => {
            "Responses not ours, without a transaction, from another connection than the request went to, or with no Via left for upstream."
        }
        "sipring_parse_errors_total" => "Framing or parse errors that closed a connection.",
        "sipring_cross_shard_total" => "Mesh messages sent, by operation.",
        "sipring_overload_503_total" => {
            "503s because too many mesh messages waited for a full channel."
        }
        "sipring_overloaded" => "Shards shedding part of new requests (per shard: 1 or 0).",
        "sipring_overload_episodes_total" => "Times a shard started shedding.",
        "sipring_overload_shed_total" => "New requests answered 503 at the door under overload.",
        "sipring_drain_refused_total" => "New requests answered 503 at the door while draining.",
        "sipring_overload_partner_dropped_total" => {
            "New requests answered 503 here because the partner they were for asked (RFC 7339) for that share to be dropped."
        }
        "sipring_unanswered_lookups_total" => {
            "Lookups, registrations and CANCEL questions with no answer within 64*T1 (their requests answered 503 or 481)."
        }
        "sipring_keepalive_pings_total" => "RFC 5626 pings sent on quiet links we dialled.",
        "sipring_peer_links_retired_total" => {
            "Links we dialled whose TLS key was spent, replaced by a new link."
        }
        "sipring_retiring_refused_total" => {
            "New requests answered 503 on a connection whose TLS key is spent."
        }
        "sipring_node_links_closed_total" => {
            "Links to cluster nodes closed because the store found the node down."
        }
        "sipring_bindings_flow_failed_total" => {
            "Bindings removed because an edge proxy answered 430 Flow Failed for them (RFC 5626)."
        }
        "sipring_flow_failovers_total" => {
            "Requests sent to a device's other flow because the one they were on failed (RFC 5626)."
        }
        "sipring_dialog_rebinds_total" => {
            "Requests on a dialog route whose party's connection had closed, sent to the binding it registered since over a new one."
        }
        "sipring_overload_feedback_total" => {
            "Responses that told a client advertising overload control (RFC 7339) what share of new requests to drop."
        }
        "sipring_mesh_backlog" => "Mesh messages waiting for room in a full channel.",
        "sipring_queue_drops_total" => "Messages dropped, by queue.",
        "sipring_store_total" => "Cluster location-store requests, by operation and result.",
        "sipring_writes_queued_total" => "Writes queued for back-pressure.",
        "sipring_idle_timeouts_total" => "Connections closed by the idle sweep.",
        "sipring_partial_timeouts_total" => "Connections closed for an incomplete message.",
        "sipring_partial_budget_drops_total" => "Connections dropped for the partial budget.",
        "sipring_partial_bytes" => "Bytes held for incomplete messages.",
        "sipring_write_queue_bytes" => {
            "Bytes of output queued for sockets that could not take it at once."
        }
        "sipring_peer_connect_failures_total" => "Outbound partner connections that failed.",
        "sipring_reloads_total" => "Reloads applied or refused.",
        "sipring_ktls_closes_total" => {
            "Kernel-TLS connections ended by a TLS control record from the peer, by reason."
        }
        "sipring_tls_recheck_closed_total" => {
            "Connections closed because their certificate no longer passed the TLS policy in force (checked again on reload and at expiry), by reason."
        }
        "sipring_auth_challenges_total" => "Digest challenges sent.",
        "sipring_sip_refusals_total" => "Requests refused for who sent them, by reason.",
        "sipring_auth_failure_sources" => "Source addresses tracked for failed attempts.",
        "sipring_auth_nonce_flows" => "Connections with nonce-count state.",
        "sipring_dialog_detours" => {
            "Ways kept for dialogs whose party reconnected, for what follows (entries; a rebinding is held on every shard; at most 4096 per shard)."
        }
        "sipring_latency_seconds" => "Latency quantiles of each histogram, since the start.",
        "sipring_latency_bucketed_seconds" => {
            "Latency of each histogram in buckets (rate() them for a window)."
        }
        _ => "A sipring metric (docs/OPERATIONS.md).",
    }
}

/// What a shard publishes for the admin endpoint.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The shard.
    pub shard: usize,
    /// Its metrics at publication time.
    pub metrics: ShardMetrics,
}

pub use sipring_net::hgrm::{HgrmRows, hgrm, parse_hgrm};
pub use sipring_net::snake_label;

/// A label value as the Prometheus text format writes it (`\`, `"` and line feeds escaped).
pub fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_stops_families_say_what_they_count() {
        // A family without its own HELP falls back to a pointer at the docs.
        for f in [
            "sipring_requests_dropped_total",
            "sipring_tls_recheck_closed_total",
            "sipring_ktls_closes_total",
            "sipring_sip_refusals_total",
        ] {
            assert_ne!(help(f), help("sipring_no_such_family"), "{f}");
        }
    }

    #[test]
    fn hgrm_round_trips_and_merges() {
        let mut a = ShardMetrics::default();
        let mut b = ShardMetrics::default();
        for i in 1..=1000 {
            a.record("x", i);
            b.record("x", i * 10);
        }
        a.inc("sipring_messages_total{method=\"INVITE\"}", 3);
        b.inc("sipring_messages_total{method=\"INVITE\"}", 4);
        a.merge(&b);
        assert_eq!(a.counter("sipring_messages_total{method=\"INVITE\"}"), 7);
        let h = &a.histograms["x"];
        assert_eq!(h.len(), 2000);
        let text = hgrm(h, 1000.0);
        let (rows, total) = parse_hgrm(&text).unwrap();
        assert_eq!(total, 2000);
        assert_eq!(rows.last().unwrap().2, 2000, "TotalCount is cumulative");
        assert!(
            rows.windows(2)
                .all(|w| w[0].2 <= w[1].2 && w[0].1 <= w[1].1)
        );
        assert!((rows.last().unwrap().0 - 10.0).abs() < 0.05, "max 10 ms");
        let prom = exposition(&[(Some(1), &a), (Some(2), &b)]);
        assert!(
            prom.contains("sipring_messages_total{shard=\"1\",method=\"INVITE\"} 7"),
            "{prom}"
        );
        assert_eq!(
            prom.matches("# TYPE sipring_messages_total counter")
                .count(),
            1,
            "{prom}"
        );
        assert!(prom.contains("quantile=\"0.99\""));
        // The buckets: cumulative, +Inf the count. Shard 2 recorded 10 µs .. 10 ms in steps
        // of 10 µs: 10 of its 1000 values are at most 100 µs, 100 at most 1 ms, all at
        // most 10 ms (a bound that is a recorded value counts it in).
        let bucket = |le: &str| -> u64 {
            let key = format!(
                "sipring_latency_bucketed_seconds_bucket{{shard=\"2\",histogram=\"x\",le=\"{le}\"}} "
            );
            let line = prom
                .lines()
                .find(|l| l.starts_with(&key))
                .unwrap_or_else(|| panic!("{key} in {prom}"));
            line[key.len()..].parse().unwrap()
        };
        assert_eq!(bucket("0.0001"), 10);
        assert_eq!(bucket("0.001"), 100);
        assert_eq!(bucket("0.01"), 1000);
        assert_eq!(bucket("+Inf"), 1000);
        assert!(prom.contains("# TYPE sipring_latency_bucketed_seconds histogram"));
    }
}

/// At most one log line a second for an event that can repeat thousands of times a second (a
/// reconnect storm meeting a limit); the next line says how many were left out. The counters
/// in `/metrics` still count every one.
#[derive(Debug, Default)]
pub struct LogLimiter {
    next: Cell<Option<Instant>>,
    suppressed: Cell<u64>,
}

impl LogLimiter {
    /// `Some(lines left out since the last one)` when a line may be written at `now`.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        match self.next.get() {
            Some(t) if now < t => {
                self.suppressed.set(self.suppressed.get() + 1);
                None
            }
            _ => {
                self.next.set(Some(now + Duration::from_secs(1)));
                Some(self.suppressed.replace(0))
            }
        }
    }
}

#[cfg(test)]
mod log_limiter_tests {
    use super::LogLimiter;
    use std::time::{Duration, Instant};

    #[test]
    fn a_flood_logs_once_a_second_and_counts_what_it_left_out() {
        let l = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        for i in 1..=999u64 {
            assert_eq!(l.allow(t0 + Duration::from_micros(i * 900)), None);
        }
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(999));
        assert_eq!(l.allow(t0 + Duration::from_millis(1500)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(3)), Some(1));
    }
}
