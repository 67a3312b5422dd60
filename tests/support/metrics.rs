//! The daemon's `/metrics` as the tests read it: one parser of the
//! Prometheus text format for every test, matching a metric by its whole
//! name and its labels by value, so that `x_total 1` never passes for
//! `x_total 10`, nor `upstream_up` for another metric that starts so.

use std::collections::BTreeMap;
use std::path::Path;

/// One sample line of a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of a scrape: an answer's body, or the whole answer as
/// [`super::get_unix`] returns it (the head is left out).
pub fn samples(scraped: &str) -> Vec<Sample> {
    let body = scraped.split_once("\r\n\r\n").map_or(scraped, |(_, b)| b);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value in the sample line {l:?}"));
            let value = value
                .parse()
                .unwrap_or_else(|e| panic!("the value in {l:?}: {e}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let rest = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels in {l:?}"));
                    let labels = rest
                        .split("\",")
                        .map(|pair| {
                            let (k, v) = pair
                                .split_once("=\"")
                                .unwrap_or_else(|| panic!("a label in {l:?}"));
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
            };
            Sample {
                name: name.to_owned(),
                labels,
                value,
            }
        })
        .collect()
}

/// The value of the first sample named `name` whose labels include every
/// pair of `labels` (other labels it has do not matter); `None` when the
/// scrape has none.
pub fn value(scraped: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(scraped)
        .into_iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// [`value`] of the daemon serving metrics on the Unix socket `socket`,
/// scraped now; panics, with the scrape, when there is no such sample.
pub fn read(socket: &Path, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scraped = super::get_unix(socket, "/metrics");
    value(&scraped, name, labels)
        .unwrap_or_else(|| panic!("no {name} with labels {labels:?} in:\n{scraped}"))
}
