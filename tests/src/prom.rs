//! A small parser of the Prometheus text format (0.0.4) as `blip host serve` writes it on
//! `GET /metrics`, and a scrape over the host API socket.

use std::collections::HashMap;
use std::io::{Read, Write};

/// One `GET /metrics` over `s`; the body (status and content type checked).
pub fn get(mut s: impl Read + Write) -> String {
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head: {text:?}"));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// Scrapes the host API socket `api` and parses the answer.
pub fn scrape(api: &std::path::Path) -> Metrics {
    let s = std::os::unix::net::UnixStream::connect(api)
        .unwrap_or_else(|e| panic!("connect {}: {e}", api.display()));
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    parse(&get(s))
}

/// Samples by their full key (`name{labels}` exactly as written).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub samples: HashMap<String, f64>,
    pub text: String,
}

impl Metrics {
    /// The sample `key`; panics (showing the text) when it is missing.
    pub fn get(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key}:\n{}", self.text))
    }
}

/// Parses the text format: `name{labels} value` per sample. Checks that every sample follows
/// a `# TYPE` of a known kind for its family (histogram parts included), that no sample is
/// given twice, and that histogram buckets are cumulative and end with `+Inf` == `_count`.
pub fn parse(text: &str) -> Metrics {
    let mut typed: Vec<(String, String)> = Vec::new();
    let mut samples = HashMap::new();
    for l in text.lines() {
        if let Some(t) = l.strip_prefix("# TYPE ") {
            let mut w = t.split(' ');
            let (name, kind) = (w.next().unwrap(), w.next().unwrap_or(""));
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unknown type in {l:?}"
            );
            typed.push((name.to_string(), kind.to_string()));
            continue;
        }
        if l.starts_with('#') || l.trim().is_empty() {
            continue;
        }
        let (key, value) = l
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {l:?}"));
        let base = key.split('{').next().unwrap();
        assert!(
            base.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {l:?}"
        );
        if let Some(labels) = key.strip_prefix(base) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels in {l:?}"
                );
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label in {l:?}"));
                    assert!(
                        !k.is_empty() && v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "bad label in {l:?}"
                    );
                }
            }
        }
        let (family, kind) = typed
            .iter()
            .rev()
            .find(|(t, kind)| {
                base == t
                    || (kind == "histogram"
                        && base
                            .strip_prefix(t.as_str())
                            .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s)))
            })
            .unwrap_or_else(|| panic!("sample without TYPE: {l}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {l:?}"));
        assert!(v.is_finite(), "not finite: {l:?}");
        if kind == "counter" || base.ends_with("_count") || base.ends_with("_bucket") {
            assert!(v >= 0.0, "negative {family}: {l:?}");
        }
        assert!(
            samples.insert(key.to_string(), v).is_none(),
            "duplicate {key}"
        );
    }
    // Histograms: buckets cumulative, +Inf == _count.
    for (name, kind) in &typed {
        if kind != "histogram" {
            continue;
        }
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(!buckets.is_empty(), "{name}: no buckets\n{text}");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name}: buckets not cumulative\n{text}"
        );
        let inf = buckets.last().unwrap();
        assert!(inf.0.is_infinite(), "{name}: no +Inf bucket\n{text}");
        let count = samples
            .get(&format!("{name}_count"))
            .unwrap_or_else(|| panic!("{name}: no _count\n{text}"));
        assert_eq!(inf.1, *count, "{name}: +Inf bucket != _count\n{text}");
    }
    Metrics {
        samples,
        text: text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_counters_and_checks_histograms() {
        let t = "# HELP a_total x\n# TYPE a_total counter\na_total{direction=\"out\"} 3\n\
                 # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
        let m = parse(t);
        assert_eq!(m.get("a_total{direction=\"out\"}"), 3.0);
        assert_eq!(m.get("h_count"), 2.0);
    }

    #[test]
    #[should_panic(expected = "sample without TYPE")]
    fn an_untyped_sample_is_refused() {
        parse("x 1\n");
    }

    #[test]
    #[should_panic(expected = "not cumulative")]
    fn falling_buckets_are_refused() {
        parse("# TYPE h histogram\nh_bucket{le=\"0.1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n");
    }
}
