//! The sidecar's Prometheus metrics, read from inside a pod: they show how
//! each connection was routed, refused or carried.

use super::lab::Pod;
use super::sidecar::ADMIN_PORT;

/// The pod's sidecar's `/metrics` text (Prometheus exposition format),
/// fetched inside the pod from the admin port; panics unless it answers 200.
pub fn metrics(pod: &Pod) -> String {
    pod.http_get(ADMIN_PORT, "/metrics")
}

/// Sum of the samples of `name` in `text` whose labels include every
/// `key="value"` of `labels` (all samples of `name` for `&[]`); 0 if none.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// [`metric_sum`] over the metrics texts of several pods.
pub fn metric_sum_pods(texts: &[&str], name: &str, labels: &[(&str, &str)]) -> f64 {
    texts
        .iter()
        .map(|text| metric_sum(text, name, labels))
        .sum()
}
