//! Per-shard counters and latency histograms, published as lock-free snapshots and merged on
//! demand for the admin endpoint (Prometheus text and `.hgrm` percentile distributions).
//!
//! Each shard owns its [`ShardMetrics`] (no sharing, no atomics on the message path) and
//! every few hundred milliseconds publishes a [`Snapshot`] into an `ArcSwap` that the admin
//! thread reads. Merging adds counters and histograms across shards.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::fmt::Write as _;

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
    /// histogram (in seconds).
    pub fn prometheus(&self, shard_label: Option<usize>) -> String {
        let mut out = String::new();
        let add_label = |name: &str| -> String {
            match shard_label {
                None => name.to_string(),
                Some(s) => match name.find('{') {
                    Some(i) => format!("{}{{shard=\"{s}\",{}", &name[..i], &name[i + 1..]),
                    None => format!("{name}{{shard=\"{s}\"}}"),
                },
            }
        };
        let mut typed = std::collections::BTreeSet::new();
        for (k, v) in &self.counters {
            let base = k.split('{').next().unwrap_or(k);
            if typed.insert(base.to_string()) {
                let _ = writeln!(out, "# TYPE {base} counter");
            }
            let _ = writeln!(out, "{} {v}", add_label(k));
        }
        for (k, v) in &self.gauges {
            let base = k.split('{').next().unwrap_or(k);
            if typed.insert(base.to_string()) {
                let _ = writeln!(out, "# TYPE {base} gauge");
            }
            let _ = writeln!(out, "{} {v}", add_label(k));
        }
        for (k, h) in &self.histograms {
            let name = format!("sipring_latency_seconds{{histogram=\"{k}\"}}");
            if typed.insert("sipring_latency_seconds".into()) {
                let _ = writeln!(out, "# TYPE sipring_latency_seconds summary");
            }
            for q in [0.5, 0.9, 0.99, 0.999] {
                let line = name.replace('}', &format!(",quantile=\"{q}\"}}"));
                let _ = writeln!(
                    out,
                    "{} {:.6}",
                    add_label(&line),
                    h.value_at_quantile(q) as f64 / 1e6
                );
            }
            let _ = writeln!(
                out,
                "{} {}",
                add_label(&name.replace("seconds{", "seconds_count{")),
                h.len()
            );
        }
        out
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

/// A Rust variant name as a metric label: `ConnectionRefused` → `connection_refused`.
pub fn snake_label(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Writes a histogram in HdrHistogram's percentile-distribution text format (the `.hgrm`
/// format its plotter reads), values scaled by `scale` (e.g. 1000.0 to print milliseconds
/// from microseconds).
pub fn hgrm(h: &Histogram<u64>, scale: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if h.is_empty() {
        let _ = writeln!(
            out,
            "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
            0.0, 0.0
        );
        let _ = writeln!(
            out,
            "#[Max     = {:>12.3}, Total count    = {:>12}]",
            0.0, 0
        );
        let _ = writeln!(
            out,
            "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
            h.buckets(),
            h.distinct_values()
        );
        return out;
    }
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        let p = v.quantile_iterated_to();
        total += v.count_since_last_iteration();
        let inv = if p < 1.0 {
            format!("{:>14.2}", 1.0 / (1.0 - p))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:>12.3} {:>2.12} {:>10} {}",
            v.value_iterated_to() as f64 / scale,
            p,
            total,
            inv
        );
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / scale,
        h.stdev() / scale
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / scale,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        h.distinct_values()
    );
    out
}

/// Rows of a `.hgrm` file: (value, percentile, cumulative count).
pub type HgrmRows = Vec<(f64, f64, u64)>;

/// Parses a `.hgrm` text back into (value, percentile, total count) rows and the total count.
/// Used by tests and by `sipring-load compare`.
pub fn parse_hgrm(text: &str) -> Option<(HgrmRows, u64)> {
    let mut rows = Vec::new();
    let mut total = None;
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with("Value") {
            continue;
        }
        if let Some(rest) = l.strip_prefix("#[Max") {
            total = rest.split("Total count").nth(1).and_then(|s| {
                s.trim_start_matches([' ', '='])
                    .trim_end_matches(']')
                    .trim()
                    .parse()
                    .ok()
            });
            continue;
        }
        if l.starts_with('#') {
            continue;
        }
        let mut it = l.split_whitespace();
        let v: f64 = it.next()?.parse().ok()?;
        let p: f64 = it.next()?.parse().ok()?;
        let c: u64 = it.next()?.parse().ok()?;
        rows.push((v, p, c));
    }
    Some((rows, total?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn variant_names_become_labels() {
        assert_eq!(snake_label("ConnectionRefused"), "connection_refused");
        assert_eq!(snake_label("Other"), "other");
    }

    use super::*;

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
        let prom = a.prometheus(Some(1));
        assert!(
            prom.contains("sipring_messages_total{shard=\"1\",method=\"INVITE\"} 7"),
            "{prom}"
        );
        assert!(prom.contains("quantile=\"0.99\""));
    }
}
