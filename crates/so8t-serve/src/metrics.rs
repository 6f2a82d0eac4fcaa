//! Counters and histograms for `GET /metrics`, in Prometheus' text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    /// (metric, labels) → value
    counters: BTreeMap<(&'static str, String), f64>,
    histograms: BTreeMap<&'static str, Histogram>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

const HELP: [(&str, &str, &str); 8] = [
    (
        "so8t_refused_total",
        "counter",
        "Connections and requests refused before a handler ran, by reason",
    ),
    (
        "so8t_requests_total",
        "counter",
        "HTTP requests answered, by route and status",
    ),
    ("so8t_prompt_tokens_total", "counter", "Prompt tokens read"),
    (
        "so8t_completion_tokens_total",
        "counter",
        "Tokens generated",
    ),
    (
        "so8t_decisions_total",
        "counter",
        "Policy decisions (spec §5), none when the heads are untrained",
    ),
    (
        "so8t_finish_total",
        "counter",
        "Generations by finish reason",
    ),
    (
        "so8t_request_duration_seconds",
        "histogram",
        "Time from admission to the last token",
    ),
    (
        "so8t_time_to_first_token_seconds",
        "histogram",
        "Time from admission to the first generated token",
    ),
];

impl Metrics {
    pub fn add(&self, metric: &'static str, labels: &str, v: f64) {
        if let Ok(mut m) = self.inner.lock() {
            *m.counters.entry((metric, labels.to_string())).or_default() += v;
        }
    }

    pub fn observe(&self, metric: &'static str, seconds: f64) {
        if let Ok(mut m) = self.inner.lock() {
            let h = m.histograms.entry(metric).or_default();
            for (c, &b) in h.counts.iter_mut().zip(&BUCKETS) {
                if seconds <= b {
                    *c += 1;
                }
            }
            h.count += 1;
            h.sum += seconds;
        }
    }

    /// The exposition text; `gauges` are sampled by the caller (queue depth, active).
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        let Ok(m) = self.inner.lock() else { return out };
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if kind == "counter" {
                for ((metric, labels), v) in m.counters.range((name, String::new())..) {
                    if *metric != name {
                        break;
                    }
                    let labels = if labels.is_empty() {
                        String::new()
                    } else {
                        format!("{{{labels}}}")
                    };
                    let _ = writeln!(out, "{name}{labels} {v}");
                }
            } else if let Some(h) = m.histograms.get(name) {
                for (c, b) in h.counts.iter().zip(BUCKETS) {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
                    h.count, h.sum, h.count
                );
            }
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.add(
            "so8t_requests_total",
            "route=\"/v1/models\",status=\"200\"",
            1.0,
        );
        m.add(
            "so8t_requests_total",
            "route=\"/v1/models\",status=\"200\"",
            1.0,
        );
        m.add("so8t_completion_tokens_total", "", 5.0);
        m.observe("so8t_request_duration_seconds", 0.3);
        m.observe("so8t_request_duration_seconds", 3.0);
        let t = m.render(&[("so8t_queue_depth", "Requests waiting", 2.0)]);
        assert!(
            t.contains("so8t_requests_total{route=\"/v1/models\",status=\"200\"} 2\n"),
            "{t}"
        );
        assert!(t.contains("so8t_completion_tokens_total 5\n"), "{t}");
        assert!(
            t.contains("so8t_request_duration_seconds_bucket{le=\"0.25\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("so8t_request_duration_seconds_bucket{le=\"0.5\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("so8t_request_duration_seconds_bucket{le=\"5\"} 2\n"),
            "{t}"
        );
        assert!(t.contains("so8t_request_duration_seconds_count 2\n"), "{t}");
        assert!(
            t.contains("# TYPE so8t_queue_depth gauge\nso8t_queue_depth 2\n"),
            "{t}"
        );
    }
}
