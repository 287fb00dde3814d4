//! A checker for the Prometheus text exposition format (0.0.4), for
//! `qpnet stats --prometheus`: comment lines, metric and label names, label
//! value escapes, numeric values, one HELP and TYPE per family before its
//! samples, families contiguous, no series twice. [`check`] returns the
//! samples so a test can compare them with the JSON document.

use std::collections::HashSet;

use anyhow::{bail, ensure, Context, Result};

/// One sample line.
#[derive(Debug)]
pub struct Sample {
    /// The metric name.
    pub name: String,
    /// Its labels, in order.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// Whether it carries label `key` with `value`.
    pub fn has_label(&self, key: &str, value: &str) -> bool {
        self.labels.iter().any(|(k, v)| k == key && v == value)
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn parse_value(s: &str) -> Result<f64> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => {
            ensure!(
                s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)),
                "value {s:?} is not a number"
            );
            s.parse().with_context(|| format!("value {s:?}"))
        }
    }
}

/// Parse `{a="x",b="y"}` at the start of `s`; return labels and rest.
fn parse_labels(s: &str) -> Result<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = s.strip_prefix('{').context("labels must start with {")?;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').context("label without '='")?;
        let name = rest[..eq].trim();
        ensure!(is_label_name(name), "bad label name {name:?}");
        ensure!(
            !labels.iter().any(|(k, _)| k == name),
            "label {name} repeated"
        );
        rest = rest[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .context("label value must be quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => bail!("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => bail!("bad escape {other:?} in label value"),
                },
                Some((_, '\n')) => bail!("newline in label value"),
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((name.to_owned(), value));
        rest = rest[end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else {
            ensure!(rest.starts_with('}'), "expected ',' or '}}' after a label");
        }
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .context("sample without a value")?;
    let name = &line[..name_end];
    ensure!(is_metric_name(name), "bad metric name {name:?}");
    let (labels, rest) = if line[name_end..].starts_with('{') {
        parse_labels(&line[name_end..])?
    } else {
        (Vec::new(), &line[name_end..])
    };
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next().context("no value")?)?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .with_context(|| format!("bad timestamp {ts:?}"))?;
    }
    ensure!(fields.next().is_none(), "trailing fields");
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The family a sample belongs to (histogram/summary suffixes folded).
fn family_of<'a>(name: &'a str, typed: &HashSet<String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if typed.contains(base) {
                return base;
            }
        }
    }
    name
}

/// Check a whole exposition; return its samples.
pub fn check(text: &str) -> Result<Vec<Sample>> {
    ensure!(
        text.ends_with('\n'),
        "the exposition must end with a newline"
    );
    let mut helped = HashSet::new();
    let mut typed: HashSet<String> = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut series = HashSet::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let words: Vec<&str> = c.trim_start().splitn(3, ' ').collect();
            match words.first().copied() {
                Some("HELP") => {
                    let name = words.get(1).with_context(at)?;
                    ensure!(is_metric_name(name), "{}: bad name", at());
                    ensure!(helped.insert(name.to_string()), "{}: HELP twice", at());
                }
                Some("TYPE") => {
                    let name = words.get(1).with_context(at)?;
                    let kind = words.get(2).with_context(at)?;
                    ensure!(is_metric_name(name), "{}: bad name", at());
                    ensure!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(kind),
                        "{}: unknown type",
                        at()
                    );
                    ensure!(
                        !samples.iter().any(|s: &Sample| s.name == *name),
                        "{}: TYPE after samples",
                        at()
                    );
                    ensure!(typed.insert(name.to_string()), "{}: TYPE twice", at());
                }
                _ => {}
            }
            continue;
        }
        let s = parse_sample(line).with_context(at)?;
        let family = family_of(&s.name, &typed).to_owned();
        if current.as_deref() != Some(family.as_str()) {
            ensure!(
                !finished.contains(&family),
                "{}: samples of {family} are not together",
                at()
            );
            if let Some(prev) = current.replace(family.clone()) {
                finished.insert(prev);
            }
        }
        let mut key: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        key.sort();
        ensure!(
            series.insert((s.name.clone(), key)),
            "{}: the same series twice",
            at()
        );
        samples.push(s);
    }
    ensure!(!samples.is_empty(), "no samples");
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_accepts_good_and_refuses_bad_expositions() {
        let good = "# HELP a_total Things.\n# TYPE a_total counter\n\
                a_total{q=\"0\",n=\"x\\\"y\\\\z\\n\"} 12\na_total{q=\"1\",n=\"\"} 1.5e3\n\
                # TYPE g gauge\ng -Inf\ng{x=\"1\"} NaN 1700000000000\n";
        let s = check(good).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].labels[1].1, "x\"y\\z\n");
        for bad in [
            "1a 3\n",
            "a{1b=\"x\"} 3\n",
            "a{b=x} 3\n",
            "a{b=\"x\\q\"} 3\n",
            "a 3 4 5\n",
            "a three\n",
            "a 3",
            "# TYPE a counter\n# TYPE a counter\na 1\n",
            "a 1\n# TYPE a counter\n",
            "a 1\nb 1\na{x=\"1\"} 2\n",
            "a 1\na 2\n",
            "# TYPE a countr\na 1\n",
            "a{b=\"1\",b=\"2\"} 1\n",
        ] {
            assert!(check(bad).is_err(), "accepted {bad:?}");
        }
    }
}
