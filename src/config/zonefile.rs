//! The static records: an RFC 1035 zone file parsed with hickory-proto's parser.
//!
//! hickory's parser reports no positions, so on a parse error we find the
//! first line at which a growing prefix of the file stops parsing, and record
//! checks point at the line where the owner name is written.

use std::path::Path;

use hickory_proto::rr::{DNSClass, LowerName, Name, Record, RecordType};
use hickory_proto::serialize::txt::Parser;

use super::{ConfigError, Source};

/// Parses `text` (the file at `path`) with `apex` as `$ORIGIN` and checks what
/// a zone file may hold here: names inside the apex, class IN, no SOA or NS
/// (they come from the `[zone]` section), no CNAME beside other data.
pub fn parse(path: &Path, text: &str, apex: &Name) -> Result<Vec<Record>, Vec<ConfigError>> {
    let source = Source { path, text };
    let parsed = Parser::new(text, Some(path.to_path_buf()), Some(apex.clone())).parse();
    let (_, rrsets) = match parsed {
        Ok(ok) => ok,
        Err(e) => {
            let line = failing_line(path, text, apex);
            return Err(vec![ConfigError {
                file: path.to_path_buf(),
                line,
                col: 1,
                message: format!("zone file does not parse: {e}"),
            }]);
        }
    };

    let apex_lower = LowerName::new(apex);
    let mut errors = Vec::new();
    let mut records = Vec::new();
    let mut at = |name: &Name, rtype: Option<RecordType>, message: String| {
        let (line, col) = owner_position(&source, name, apex, rtype);
        errors.push(ConfigError {
            file: path.to_path_buf(),
            line,
            col,
            message,
        });
    };
    let mut names_with_cname = Vec::new();
    for (key, rrset) in &rrsets {
        let name = Name::from(key.name.clone());
        if !apex_lower.zone_of(&key.name) {
            at(&name, None, format!("{name} is outside the zone {apex}"));
            continue;
        }
        match key.record_type {
            RecordType::SOA => {
                at(
                    &name,
                    Some(RecordType::SOA),
                    "SOA comes from [zone.soa] in the config; remove it from the zone file".into(),
                );
                continue;
            }
            RecordType::NS if key.name == apex_lower => {
                at(
                    &name,
                    Some(RecordType::NS),
                    "NS at the apex comes from [[zone.ns]] in the config; remove it from the zone file"
                        .into(),
                );
                continue;
            }
            RecordType::NS => {
                at(
                    &name,
                    Some(RecordType::NS),
                    format!("{name}: delegations below the apex are not supported"),
                );
                continue;
            }
            RecordType::CNAME => names_with_cname.push(key.name.clone()),
            _ => {}
        }
        for record in rrset.records_without_rrsigs() {
            if record.dns_class != DNSClass::IN {
                at(
                    &name,
                    Some(key.record_type),
                    format!("{name}: only class IN is served"),
                );
                continue;
            }
            records.push(record.clone());
        }
    }
    for cname_owner in names_with_cname {
        let others = rrsets
            .keys()
            .filter(|k| k.name == cname_owner && k.record_type != RecordType::CNAME)
            .count();
        if others > 0 {
            let name = Name::from(cname_owner);
            at(
                &name,
                Some(RecordType::CNAME),
                format!("{name} has a CNAME and other records; a CNAME must stand alone"),
            );
        }
    }
    if errors.is_empty() {
        Ok(records)
    } else {
        Err(errors)
    }
}

/// Line where a record of `name` (of type `rtype` if given) is written: the
/// owner is the first field, or inherited by indented lines, as a relative
/// label, an absolute name, or `@` for the apex. Falls back to 1:1.
pub(crate) fn owner_position(
    source: &Source<'_>,
    name: &Name,
    apex: &Name,
    rtype: Option<RecordType>,
) -> (usize, usize) {
    let absolute = name.to_ascii().to_ascii_lowercase();
    let absolute_trimmed = absolute.trim_end_matches('.').to_string();
    let apex_text = apex.to_ascii().to_ascii_lowercase();
    let relative = absolute
        .strip_suffix(&format!(".{apex_text}"))
        .map(str::to_string);
    let type_text = rtype.map(|t| t.to_string());
    let mut first_owner_line = None;
    let mut owner_matches = false;
    for (i, line) in source.text.lines().enumerate() {
        let code = line.split(';').next().unwrap_or_default();
        if code.trim().is_empty() {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            let owner = code
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            owner_matches = owner == absolute
                || owner == absolute_trimmed
                || relative.as_deref() == Some(owner.as_str())
                || (owner == "@" && absolute == apex_text);
            if owner_matches && first_owner_line.is_none() {
                first_owner_line = Some(i + 1);
            }
        }
        let has_type = type_text.as_ref().is_none_or(|t| {
            code.split_whitespace()
                .any(|token| token.eq_ignore_ascii_case(t))
        });
        if owner_matches && has_type {
            return (i + 1, 1);
        }
    }
    (first_owner_line.unwrap_or(1), 1)
}

/// The first line at which a prefix of the file (cut where parentheses are
/// balanced) fails to parse: where the error is.
fn failing_line(path: &Path, text: &str, apex: &Name) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let mut depth: i32 = 0;
    let mut prefix = String::with_capacity(text.len());
    for (i, line) in lines.iter().enumerate().take(10_000) {
        prefix.push_str(line);
        prefix.push('\n');
        depth += paren_balance(line);
        if depth != 0 {
            continue;
        }
        let parsed = Parser::new(
            prefix.as_str(),
            Some(path.to_path_buf()),
            Some(apex.clone()),
        );
        if parsed.parse().is_err() {
            return i + 1;
        }
    }
    lines.len().max(1)
}

/// Opening minus closing parentheses outside comments and quoted strings.
fn paren_balance(line: &str) -> i32 {
    let mut balance = 0;
    let mut quoted = false;
    let mut escaped = false;
    for c in line.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => break,
            '(' if !quoted => balance += 1,
            ')' if !quoted => balance -= 1,
            _ => {}
        }
    }
    balance
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn apex() -> Name {
        Name::from_str("inference.example.com.").unwrap()
    }

    #[test]
    fn parses_relative_names_and_multiline_records() {
        let text = "$TTL 300\nwww IN A 192.0.2.10\n    IN AAAA 2001:db8::10\ntxt IN TXT ( \"a\"\n  \"b\" )\n";
        let records = parse(Path::new("z"), text, &apex()).unwrap();
        assert_eq!(records.len(), 3);
        assert!(records.iter().all(|r| r.ttl == 300));
    }

    #[test]
    fn parse_error_names_the_failing_line() {
        let text = "$TTL 300\nwww IN A 192.0.2.10\nbad IN A not-an-address\nok IN A 192.0.2.11\n";
        let errors = parse(Path::new("z.zone"), text, &apex()).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].line, errors[0].col), (3, 1));
        assert!(
            errors[0]
                .to_string()
                .starts_with("z.zone:3:1: zone file does not parse")
        );
    }

    #[test]
    fn rejects_soa_ns_delegation_outside_names_and_cname_with_data() {
        let text = "$TTL 300\n\
@ IN SOA ns1 hostmaster 1 2 3 4 5\n\
@ IN NS ns1\n\
sub IN NS ns.elsewhere.net.\n\
other.example.net. IN A 192.0.2.1\n\
alias IN CNAME www\n\
alias IN TXT \"x\"\n";
        let errors = parse(Path::new("z"), text, &apex()).unwrap_err();
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 5, "{messages:#?}");
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("z:2:1: SOA comes from"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("z:3:1: NS at the apex"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("z:4:1: sub.inference.example.com.: delegations"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("z:5:1: other.example.net. is outside"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("z:6:1: alias.inference.example.com. has a CNAME"))
        );
    }
}
