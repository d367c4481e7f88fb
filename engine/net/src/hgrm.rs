//! HdrHistogram's percentile-distribution text (`.hgrm`, the format its plotter reads),
//! written by the server's `/hgrm/<name>` and by the load generator's files, and read back by
//! tests and `sipring-load compare`.

use hdrhistogram::Histogram;
use std::fmt::Write as _;

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
    use super::*;

    #[test]
    fn round_trips_with_cumulative_counts() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for i in 1..=1000 {
            h.record(i * 10).unwrap();
        }
        let (rows, total) = parse_hgrm(&hgrm(&h, 1000.0)).unwrap();
        assert_eq!(total, 1000);
        assert_eq!(rows.last().unwrap().2, 1000, "TotalCount is cumulative");
        assert!(
            rows.windows(2)
                .all(|w| w[0].2 <= w[1].2 && w[0].1 <= w[1].1)
        );
        assert!((rows.last().unwrap().0 - 10.0).abs() < 0.05, "max 10 ms");
        let empty = hgrm(&Histogram::<u64>::new(3).unwrap(), 1000.0);
        assert_eq!(parse_hgrm(&empty).unwrap(), (vec![], 0));
    }
}
