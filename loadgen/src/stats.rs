//! Results: latency histograms per transaction type (µs, measured from the *intended* send
//! time), counters, and their renderings (table, JSON, `.hgrm`, SVG).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Transaction types with their own histogram.
pub const KINDS: &[&str] = &[
    "tcp_connect",
    "tls_handshake",
    "register",
    "options",
    "message",
    "invite_100",
    "invite_180",
    "invite_200",
    "bye",
    "reconnect",
];

/// Everything one run (or one shard of it) measured.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Latency histograms (µs) by kind.
    pub hist: BTreeMap<String, Histogram<u64>>,
    /// Transactions started, by kind.
    pub sent: BTreeMap<String, u64>,
    /// Transactions that got their final answer in time (2xx), by kind.
    pub answered: BTreeMap<String, u64>,
    /// Failures by kind and cause (`status_486`, `timeout`, `tls_unknown_issuer`, …).
    pub failed: BTreeMap<String, BTreeMap<String, u64>>,
    /// Sends that left later than intended (the generator fell behind).
    pub late_sends: u64,
    /// Worst lag behind the schedule, µs.
    pub max_lag_us: u64,
    /// Calls not started because `max_concurrent` calls were up.
    pub blocked_calls: u64,
    /// New requests not sent because their server asked for that share to be dropped
    /// (RFC 7339 overload control, `--overload-control`).
    pub oc_dropped: u64,
    /// Keepalive pongs received (idle scenario).
    pub pongs: u64,
    /// Wall-clock seconds of the measured phase.
    pub seconds: f64,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("static bounds")
}

impl Stats {
    /// Starts a transaction.
    pub fn sent(&mut self, kind: &str) {
        *self.sent.entry(kind.into()).or_insert(0) += 1;
    }

    /// A successful answer after `us` µs (from the intended time).
    pub fn ok(&mut self, kind: &str, us: u64) {
        *self.answered.entry(kind.into()).or_insert(0) += 1;
        self.hist
            .entry(kind.into())
            .or_insert_with(new_hist)
            .saturating_record(us.max(1));
    }

    /// Records a latency without counting an answer (provisional responses, setup steps).
    pub fn latency(&mut self, kind: &str, us: u64) {
        self.hist
            .entry(kind.into())
            .or_insert_with(new_hist)
            .saturating_record(us.max(1));
    }

    /// A failure.
    pub fn fail(&mut self, kind: &str, cause: &str) {
        *self
            .failed
            .entry(kind.into())
            .or_default()
            .entry(cause.into())
            .or_insert(0) += 1;
    }

    /// Failures of a kind.
    pub fn failures(&self, kind: &str) -> u64 {
        self.failed.get(kind).map_or(0, |m| m.values().sum())
    }

    /// All starts / all failures.
    pub fn totals(&self) -> (u64, u64, u64) {
        let sent = self.sent.values().sum();
        let ok = self.answered.values().sum();
        let failed = self.failed.values().flat_map(|m| m.values()).sum();
        (sent, ok, failed)
    }

    /// Adds another shard's results.
    pub fn merge(&mut self, o: &Stats) {
        for (k, h) in &o.hist {
            let _ = self.hist.entry(k.clone()).or_insert_with(new_hist).add(h);
        }
        for (k, v) in &o.sent {
            *self.sent.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &o.answered {
            *self.answered.entry(k.clone()).or_insert(0) += v;
        }
        for (k, m) in &o.failed {
            for (c, v) in m {
                *self
                    .failed
                    .entry(k.clone())
                    .or_default()
                    .entry(c.clone())
                    .or_insert(0) += v;
            }
        }
        self.late_sends += o.late_sends;
        self.max_lag_us = self.max_lag_us.max(o.max_lag_us);
        self.blocked_calls += o.blocked_calls;
        self.oc_dropped += o.oc_dropped;
        self.pongs += o.pongs;
        self.seconds = self.seconds.max(o.seconds);
    }

    /// The percentile table printed at exit.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8}",
            "type",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "p99.99 ms",
            "max ms",
            "count",
            "rate/s",
            "failed"
        );
        for k in KINDS {
            let Some(h) = self.hist.get(*k) else { continue };
            let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
            let rate = if self.seconds > 0.0 {
                h.len() as f64 / self.seconds
            } else {
                0.0
            };
            let _ = writeln!(
                s,
                "{:<14} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10} {:>10.1} {:>8}",
                k,
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999),
                q(0.9999),
                h.max() as f64 / 1000.0,
                h.len(),
                rate,
                self.failures(k)
            );
        }
        let (sent, ok, failed) = self.totals();
        let _ = writeln!(
            s,
            "transactions: {sent} sent, {ok} answered, {failed} failed; {} late sends (max lag {:.1} ms), {} calls or handshakes blocked by max-concurrent",
            self.late_sends,
            self.max_lag_us as f64 / 1000.0,
            self.blocked_calls
        );
        if self.oc_dropped > 0 {
            let _ = writeln!(
                s,
                "overload control: {} new requests dropped here as the server asked (RFC 7339)",
                self.oc_dropped
            );
        }
        for (k, m) in &self.failed {
            for (c, v) in m {
                let _ = writeln!(s, "  failed {k}: {c} x{v}");
            }
        }
        s
    }

    /// The JSON summary (also what `compare` reads).
    pub fn summary(&self) -> Summary {
        let mut kinds = BTreeMap::new();
        for (k, h) in &self.hist {
            let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
            kinds.insert(
                k.clone(),
                KindSummary {
                    count: h.len(),
                    sent: self.sent.get(k).copied().unwrap_or(0),
                    answered: self.answered.get(k).copied().unwrap_or(0),
                    failed: self.failures(k),
                    failures: self.failed.get(k).cloned().unwrap_or_default(),
                    p50_ms: q(0.5),
                    p90_ms: q(0.9),
                    p99_ms: q(0.99),
                    p999_ms: q(0.999),
                    p9999_ms: q(0.9999),
                    max_ms: h.max() as f64 / 1000.0,
                    mean_ms: h.mean() / 1000.0,
                    rate_per_s: if self.seconds > 0.0 {
                        h.len() as f64 / self.seconds
                    } else {
                        0.0
                    },
                    percentiles: h
                        .iter_quantiles(2)
                        .map(|v| {
                            (
                                v.quantile_iterated_to(),
                                v.value_iterated_to() as f64 / 1000.0,
                            )
                        })
                        .collect(),
                },
            );
        }
        let (sent, answered, failed) = self.totals();
        Summary {
            seconds: self.seconds,
            sent,
            answered,
            failed,
            late_sends: self.late_sends,
            max_lag_ms: self.max_lag_us as f64 / 1000.0,
            blocked_calls: self.blocked_calls,
            oc_dropped: self.oc_dropped,
            pongs: self.pongs,
            kinds,
        }
    }

    /// Writes one `.hgrm` per transaction type into `dir` (milliseconds).
    pub fn write_hgrm(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        std::fs::create_dir_all(dir)?;
        let mut out = Vec::new();
        for (k, h) in &self.hist {
            let p = dir.join(format!("{k}.hgrm"));
            std::fs::write(&p, sipring_net::hgrm::hgrm(h, 1000.0))?;
            out.push(p.display().to_string());
        }
        Ok(out)
    }
}

/// One transaction type in the JSON summary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KindSummary {
    /// Latency samples.
    pub count: u64,
    /// Started.
    pub sent: u64,
    /// Answered with success.
    pub answered: u64,
    /// Failed.
    pub failed: u64,
    /// Failures by cause.
    pub failures: BTreeMap<String, u64>,
    /// Median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// 99.99th percentile, ms.
    pub p9999_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
    /// Mean, ms.
    pub mean_ms: f64,
    /// Samples per second.
    pub rate_per_s: f64,
    /// (percentile 0..1, latency ms) points for plots.
    pub percentiles: Vec<(f64, f64)>,
}

/// The whole JSON summary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Measured seconds.
    pub seconds: f64,
    /// Transactions started.
    pub sent: u64,
    /// Answered.
    pub answered: u64,
    /// Failed.
    pub failed: u64,
    /// Sends that left late.
    pub late_sends: u64,
    /// Worst lag, ms.
    pub max_lag_ms: f64,
    /// Calls (or handshakes) not started: `--max-concurrent` were up (in flight).
    pub blocked_calls: u64,
    /// New requests dropped here as the server asked (RFC 7339).
    #[serde(default)]
    pub oc_dropped: u64,
    /// Keepalive pongs.
    pub pongs: u64,
    /// Per transaction type.
    pub kinds: BTreeMap<String, KindSummary>,
}

/// Draws latency by percentile (log-scaled "nines" on x) for every series, one line each.
pub fn plot(series: &[(String, Vec<(f64, f64)>)], path: &Path, title: &str) -> Result<(), String> {
    use plotters::prelude::*;
    let nines = |p: f64| -(1.0 - p.min(0.999_999)).log10();
    let max_y = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.1))
        .fold(0.001f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..6f64, 0f64..max_y)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| format!("{:.4}%", (1.0 - 10f64.powf(-x)) * 100.0))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|(p, v)| (nines(*p), *v)),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
