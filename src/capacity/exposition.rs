//! A reader for the samples of the Prometheus text exposition format
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>): metric
//! name (`[a-zA-Z_:][a-zA-Z0-9_:]*`), optional labels with escaped values,
//! a float value (`NaN`, `+Inf`, `-Inf` included), an optional timestamp.
//! Comments and malformed lines are skipped. Written here because the
//! parser crates available either reject `:` in names (which vLLM, SGLang
//! and llama.cpp use) or are unmaintained.

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every well-formed sample of `text`.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines().filter_map(|l| sample(l.trim())).collect()
}

fn sample(line: &str) -> Option<Sample> {
    if line.is_empty() || line.starts_with('#') || !line.starts_with(is_name_start) {
        return None;
    }
    let name_end = line.find(|c: char| !is_name_char(c)).unwrap_or(line.len());
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remainder) = parse_labels(after)?;
        labels = parsed;
        rest = remainder;
    }
    let mut fields = rest.split_whitespace();
    let value = match fields.next()? {
        "NaN" => f64::NAN,
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `key="value",…}`: the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                other => value.push(other),
            }
        };
        labels.push((key, value));
        s = s[end + 1..].trim_start();
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_with_colons_labels_and_special_values() {
        let text = r#"# HELP vllm:kv_cache_usage_perc KV-cache usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.92
plain_metric 3 1700000000000
escaped{path="a\"b\\c",other="x,y}"} +Inf
nan_metric NaN
  indented_metric{a="1"} -2.5e-1
not a metric line
{bad="x"} 1
"#;
        let s = samples(text);
        assert_eq!(s.len(), 5, "{s:#?}");
        assert_eq!(s[0].name, "vllm:kv_cache_usage_perc");
        assert_eq!(s[0].label("model_name"), Some("meta-llama/Llama-3.1-8B"));
        assert_eq!(s[0].value, 0.92);
        assert_eq!((s[1].name.as_str(), s[1].value), ("plain_metric", 3.0));
        assert_eq!(s[2].label("path"), Some("a\"b\\c"));
        assert_eq!(s[2].label("other"), Some("x,y}"));
        assert!(s[2].value.is_infinite());
        assert!(s[3].value.is_nan());
        assert_eq!(s[4].value, -0.25);
    }
}
