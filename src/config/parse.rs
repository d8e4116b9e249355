//! Tolerant parsing: every TOML syntax error and every serde error of one
//! file (unknown keys, wrong types, numbers out of a type's range), each at
//! file:line:col in words an operator understands, not just the first.
//!
//! The text is read with toml's recovering parser into a spanned document.
//! Deserializing it is retried after removing the key each error points at,
//! so one pass finds them all. Items whose values were wrong (a region, a
//! service, a section) come back as tainted: later checks skip them rather
//! than check what is left and report follow-up errors that are not real.

use std::collections::HashSet;
use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue, ValueDeserializer};

use super::{ConfigError, Source, suggest};

/// Deserialization rounds per file; each removes one bad key, so this only
/// bounds the work on hostile input.
const MAX_ROUNDS: usize = 512;

/// Keys whose values are durations (`"500ms"`, `"2s"`).
const DURATION_KEYS: &[&str] = &[
    "interval",
    "timeout",
    "startup-grace",
    "tcp-idle-timeout",
    "check-interval",
    "window",
    "last-known-good",
    "proximity-tolerance",
    "max-latency",
    "cooldown",
    "slow-start",
    "models-interval",
    "metrics-interval",
    "max-age",
    "admin-header-timeout",
    "admin-body-timeout",
];

/// A file read as far as it could be.
pub(super) struct Parsed<T> {
    /// `None` when the file as a whole could not be read (a syntax error
    /// recovery cannot be trusted with, or a required section was wrong).
    pub value: Option<T>,
    pub errors: Vec<ConfigError>,
    /// Key paths (`["regions", "us-east", "probe", "port"]`) of wrong
    /// values that were dropped to build `value`; an empty path is the
    /// whole file.
    pub tainted: Vec<Vec<String>>,
}

/// One step from a table or an array into a value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Reads `src` as a `T`, collecting every problem on the way.
pub(super) fn parse<T: DeserializeOwned>(src: &Source<'_>) -> Parsed<T> {
    let (doc, syntax) = DeTable::parse_recoverable(src.text);
    let root = Spanned::new(doc.span(), DeValue::Table(doc.into_inner()));
    let mut parser = Parser {
        src,
        errors: Vec::new(),
        tainted: Vec::new(),
        removed: Vec::new(),
    };
    let value = if parser.syntax(&root, syntax) {
        parser.deserialize(root)
    } else {
        parser.tainted.push(Vec::new());
        None
    };
    parser.errors.sort_by_key(|e| (e.line, e.col));
    Parsed {
        value,
        errors: parser.errors,
        tainted: parser
            .tainted
            .into_iter()
            .map(|path| {
                path.into_iter()
                    .map(|seg| match seg {
                        Seg::Key(k) => k,
                        Seg::Index(i) => i.to_string(),
                    })
                    .collect()
            })
            .collect(),
    }
}

/// A top-level string of a document that did not parse as a whole
/// (`policy-dir`, so that policy files are still read).
pub(super) fn top_string(text: &str, key: &str) -> Option<Spanned<String>> {
    let (doc, _) = DeTable::parse_recoverable(text);
    let (_, value) = doc.get_ref().iter().find(|(k, _)| k.get_ref() == key)?;
    let s = value.get_ref().as_str()?;
    Some(Spanned::new(value.span(), s.to_string()))
}

/// Items of the main file the checks skip because their values were wrong
/// (and ids that are known to exist although they were skipped).
#[derive(Debug, Default)]
pub(super) struct Broken {
    pub regions: HashSet<String>,
    pub services: HashSet<String>,
    /// Top-level sections: `server`, `zone`, `geoip`, or `regions` as a whole.
    pub sections: HashSet<String>,
}

impl Broken {
    pub fn from_paths(paths: &[Vec<String>]) -> Self {
        let mut broken = Broken::default();
        for path in paths {
            match path.as_slice() {
                [] => {}
                [section, id, ..] if section == "regions" => {
                    broken.regions.insert(id.clone());
                }
                [section, id, ..] if section == "services" => {
                    broken.services.insert(id.clone());
                }
                [section, ..] => {
                    broken.sections.insert(section.clone());
                }
            }
        }
        broken
    }

    pub fn region(&self, id: &str) -> bool {
        self.regions.contains(id) || self.sections.contains("regions")
    }

    pub fn service(&self, id: &str) -> bool {
        self.services.contains(id) || self.sections.contains("services")
    }

    pub fn section(&self, name: &str) -> bool {
        self.sections.contains(name)
    }
}

struct Parser<'a, 'b> {
    src: &'a Source<'b>,
    errors: Vec<ConfigError>,
    tainted: Vec<Vec<Seg>>,
    /// Entries this parser removed; a "missing field" for one is not news.
    removed: Vec<Vec<Seg>>,
}

impl Parser<'_, '_> {
    fn push(&mut self, span: Range<usize>, message: String) {
        self.errors.push(self.src.error(span, message));
    }

    /// Reports the syntax errors; `false` when the recovered document cannot
    /// be trusted. An unquoted string and a duplicate key recover exactly;
    /// after anything else only the first error is reported, since the
    /// rest of the file may be read out of step.
    fn syntax(&mut self, root: &Spanned<DeValue<'_>>, mut errors: Vec<toml::de::Error>) -> bool {
        errors.sort_by_key(|e| e.span().map_or(0, |s| s.start));
        // The offset of the last duplicate table header: its keys are
        // duplicates too, but only as a consequence.
        let mut header = None;
        for e in errors {
            let span = e.span().unwrap_or(0..0);
            let text = self.src.text.get(span.clone()).unwrap_or("").to_string();
            let message = e.message().trim_end();
            if message.starts_with("string values must be quoted") {
                self.push(span, format!("a name must be quoted: \"{text}\""));
            } else if message.starts_with("duplicate key") {
                self.duplicate(root, span, &mut header);
            } else {
                let first_line = message.lines().next().unwrap_or(message);
                self.push(span, first_line.to_string());
                return false;
            }
        }
        true
    }

    /// Reports a duplicate key with the place of its first definition.
    fn duplicate(
        &mut self,
        root: &Spanned<DeValue<'_>>,
        span: Range<usize>,
        header: &mut Option<usize>,
    ) {
        let text = self.src.text;
        let before = text.get(..span.start).unwrap_or("");
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let written = text.get(line_start..span.end).unwrap_or("").trim_start();
        let is_header = written.starts_with('[');
        if let Some(h) = *header
            && !is_header
            && !text
                .get(h..line_start)
                .unwrap_or("")
                .lines()
                .skip(1)
                .any(|l| l.trim_start().starts_with('['))
        {
            return;
        }
        *header = is_header.then_some(span.start);
        let name = text.get(span.clone()).unwrap_or("");
        let name = name.rsplit('.').next().unwrap_or("").trim();
        let name = name.trim_matches(['"', '\'']).to_string();
        // The first line written the same way up to the key: same column.
        let mut first = None;
        let mut at = 0;
        for line in before[..line_start].split_inclusive('\n') {
            if line.trim_start().starts_with(written) {
                first = Some(at + (span.start - line_start));
            }
            at += line.len();
        }
        let mut message = format!("duplicate key `{name}`");
        if let Some(first) = first {
            let (line, col) = self.src.position(first);
            message = format!(
                "{message}, already defined at {}:{line}:{col}",
                self.src.path.display()
            );
        }
        self.push(span.clone(), message);
        let mut path = None;
        entry_at(root.get_ref(), &span, &mut Vec::new(), &mut path);
        if path.is_none() {
            let mut earlier = None;
            earlier_key(
                root.get_ref(),
                &name,
                span.start,
                &mut Vec::new(),
                &mut earlier,
            );
            path = earlier.map(|(_, p)| p);
        }
        self.tainted.extend(path);
    }

    /// Deserializes, removing what each error points at and trying again.
    fn deserialize<T: DeserializeOwned>(&mut self, mut root: Spanned<DeValue<'_>>) -> Option<T> {
        for _ in 0..MAX_ROUNDS {
            let e = match T::deserialize(ValueDeserializer::from(root.clone())) {
                Ok(value) => return Some(value),
                Err(e) => e,
            };
            let message = e.message().trim_end().to_string();
            if let Some(field) = missing_field(&message) {
                let span = e.span().unwrap_or(0..0);
                let mut table = Vec::new();
                table_at(root.get_ref(), &span, &mut Vec::new(), &mut table);
                let mut wanted = table.clone();
                wanted.push(Seg::Key(field.to_string()));
                if !self.removed.contains(&wanted) {
                    self.push(span, format!("missing field `{field}`"));
                }
                if table.is_empty() {
                    self.tainted.push(table);
                    return None;
                }
                remove(root.get_mut(), &table);
                self.tainted.push(table.clone());
                self.removed.push(table);
                continue;
            }
            let mut found = None;
            if let Some(span) = e.span() {
                entry_at(root.get_ref(), &span, &mut Vec::new(), &mut found);
            }
            let (Some(span), Some(path)) = (e.span(), found) else {
                self.push(e.span().unwrap_or(0..0), message);
                self.tainted.push(Vec::new());
                return None;
            };
            let key = path.iter().rev().find_map(|s| match s {
                Seg::Key(k) => Some(k.as_str()),
                Seg::Index(_) => None,
            });
            let key = key.unwrap_or("").to_string();
            self.push(span, describe(&message, &key));
            remove(root.get_mut(), &path);
            if !message.starts_with("unknown field") {
                self.tainted.push(path.clone());
            }
            self.removed.push(path);
        }
        self.tainted.push(Vec::new());
        None
    }
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end && outer.start < outer.end
}

/// The deepest table entry whose key is at `span` or whose value holds it.
fn entry_at(
    value: &DeValue<'_>,
    span: &Range<usize>,
    path: &mut Vec<Seg>,
    best: &mut Option<Vec<Seg>>,
) {
    match value {
        DeValue::Table(table) => {
            for (k, v) in table.iter() {
                path.push(Seg::Key(k.get_ref().to_string()));
                if (k.span() == *span || contains(&v.span(), span))
                    && best.as_ref().is_none_or(|b| path.len() > b.len())
                {
                    *best = Some(path.clone());
                }
                entry_at(v.get_ref(), span, path, best);
                path.pop();
            }
        }
        DeValue::Array(array) => {
            for (i, v) in array.iter().enumerate() {
                path.push(Seg::Index(i));
                entry_at(v.get_ref(), span, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

/// The deepest value spanning exactly `span` (a table missing a field);
/// empty for the document itself.
fn table_at(value: &DeValue<'_>, span: &Range<usize>, path: &mut Vec<Seg>, best: &mut Vec<Seg>) {
    let mut visit = |seg: Seg, v: &Spanned<DeValue<'_>>, path: &mut Vec<Seg>| {
        path.push(seg);
        if v.span() == *span && path.len() > best.len() {
            *best = path.clone();
        }
        table_at(v.get_ref(), span, path, best);
        path.pop();
    };
    match value {
        DeValue::Table(table) => {
            for (k, v) in table.iter() {
                visit(Seg::Key(k.get_ref().to_string()), v, path);
            }
        }
        DeValue::Array(array) => {
            for (i, v) in array.iter().enumerate() {
                visit(Seg::Index(i), v, path);
            }
        }
        _ => {}
    }
}

/// The last key named `name` that starts before `before`, with its path.
fn earlier_key(
    value: &DeValue<'_>,
    name: &str,
    before: usize,
    path: &mut Vec<Seg>,
    best: &mut Option<(Range<usize>, Vec<Seg>)>,
) {
    match value {
        DeValue::Table(table) => {
            for (k, v) in table.iter() {
                path.push(Seg::Key(k.get_ref().to_string()));
                let at = k.span();
                if k.get_ref() == name
                    && at.start < before
                    && best.as_ref().is_none_or(|(b, _)| at.start > b.start)
                {
                    *best = Some((at, path.clone()));
                }
                earlier_key(v.get_ref(), name, before, path, best);
                path.pop();
            }
        }
        DeValue::Array(array) => {
            for (i, v) in array.iter().enumerate() {
                path.push(Seg::Index(i));
                earlier_key(v.get_ref(), name, before, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Removes the entry or array element at `path`.
fn remove(root: &mut DeValue<'_>, path: &[Seg]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = root;
    for seg in parents {
        let next = match (at, seg) {
            (DeValue::Table(table), Seg::Key(key)) => table
                .iter_mut()
                .find(|(k, _)| k.get_ref() == key)
                .map(|(_, v)| v),
            (DeValue::Array(array), Seg::Index(i)) => array.get_mut(*i),
            _ => None,
        };
        match next {
            Some(v) => at = v.get_mut(),
            None => return,
        }
    }
    match (at, last) {
        (DeValue::Table(table), Seg::Key(key)) => {
            let mut kept = DeTable::new();
            for (k, v) in table.iter() {
                if k.get_ref() != key {
                    kept.insert(k.clone(), v.clone());
                }
            }
            *table = kept;
        }
        (DeValue::Array(array), Seg::Index(i)) => {
            let mut kept = DeArray::new();
            for (j, v) in array.iter().enumerate() {
                if j != *i {
                    kept.push(v.clone());
                }
            }
            *array = kept;
        }
        _ => {}
    }
}

fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
}

/// A serde message about the value of `key`, in an operator's words.
fn describe(message: &str, key: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        return match suggest::closest(field, known.iter().copied()) {
            Some(close) => format!("unknown field `{field}`; did you mean `{close}`?"),
            None if known.is_empty() => format!("unknown field `{field}`"),
            None => format!(
                "unknown field `{field}`; expected one of {}",
                known.join(", ")
            ),
        };
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((found, expected)) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.rsplit_once(", expected "))
        {
            return format!(
                "{key}: expected {}, found {}",
                expected_words(expected, key),
                found_words(found, expected)
            );
        }
    }
    if message.starts_with("data did not match any variant of untagged enum Allow") {
        return format!("{key}: expected \"any\", \"deny\" or a list of jurisdictions");
    }
    format!("{key}: {message}")
}

fn expected_words(expected: &str, key: &str) -> String {
    let words = match expected {
        "u16" if key == "port" || key.ends_with("-port") => "a port number 1-65535",
        "u8" => "a whole number 0-255",
        "u16" => "a whole number 0-65535",
        "u32" => "a whole number 0-4294967295",
        "u64" | "usize" => "a whole number",
        "i64" | "i32" => "a whole number",
        "f64" | "f32" => "a number",
        "a boolean" => "true or false",
        "a string" if DURATION_KEYS.contains(&key) => "a duration such as \"500ms\" or \"2s\"",
        "a string" => "a quoted string",
        "a sequence" => return list_words(key).to_string(),
        other if other.starts_with("struct ") || other == "a map" => {
            "a table ({ ... } or [section])"
        }
        other => other,
    };
    words.to_string()
}

fn list_words(key: &str) -> &'static str {
    match key {
        "tiers" => "a list of tiers, each a list of region names: [[\"us-east\"], [\"us-west\"]]",
        "jurisdictions" | "allow" => "a list of jurisdiction tags: [\"eu\"]",
        "clients" => "a list of countries, continent:XX codes or groups: [\"DE\", \"eu\"]",
        "networks" | "exempt" | "explain-acl" => "a list of networks: [\"192.0.2.0/24\"]",
        "dns-listen" => "a list of addresses with ports: [\"127.0.0.1:53\"]",
        "addresses" => "a list of addresses: [\"192.0.2.53\"]",
        "endpoints" => "a list of endpoints: [{ address = \"192.0.2.1\" }]",
        _ => "a list: [ ... ]",
    }
}

fn found_words(found: &str, expected: &str) -> String {
    let numeric = matches!(
        expected,
        "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" | "f32" | "f64"
    );
    if let Some(s) = found.strip_prefix("string ") {
        let unquoted = s.trim_matches('"');
        if numeric && unquoted.parse::<f64>().is_ok() {
            return format!("the string {s} (remove the quotes)");
        }
        return format!("the string {s}");
    }
    for prefix in ["integer ", "floating point ", "boolean "] {
        if let Some(v) = found.strip_prefix(prefix) {
            return v.trim_matches('`').to_string();
        }
    }
    match found {
        "sequence" => "a list".to_string(),
        "map" => "a table".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_words_become_operator_words() {
        assert_eq!(
            describe("invalid value: integer `70000`, expected u16", "port"),
            "port: expected a port number 1-65535, found 70000"
        );
        assert_eq!(
            describe("invalid type: string \"3\", expected u32", "rise"),
            "rise: expected a whole number 0-4294967295, found the string \"3\" (remove the quotes)"
        );
        assert_eq!(
            describe("invalid type: integer `5`, expected a string", "interval"),
            "interval: expected a duration such as \"500ms\" or \"2s\", found 5"
        );
        assert_eq!(
            describe(
                "unknown field `admin-listn`, expected one of `dns-listen`, `admin-listen`",
                "admin-listn"
            ),
            "unknown field `admin-listn`; did you mean `admin-listen`?"
        );
        assert_eq!(
            describe("unknown field `zzz`, expected `a` or `b`", "zzz"),
            "unknown field `zzz`; expected one of a, b"
        );
    }
}
