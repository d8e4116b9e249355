//! "Did you mean …?": the closest known word to a misspelled key or id.

/// The candidate closest to `word`, if it is close enough to be a typo:
/// none for two letters, one edit for three, two up to eight letters, a
/// third of the word beyond. `_` and `-` are the same letter here (`when_all_down`
/// means `when-all-down`).
pub(super) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('_', "-");
    let word_n = norm(word);
    let limit = match word.chars().count() {
        0..=2 => 0,
        3 => 1,
        4..=8 => 2,
        n => n / 3,
    };
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| (distance(&word_n, &norm(c)), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `"; did you mean `x`?"`, or nothing when no candidate is close.
pub(super) fn hint<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    closest(word, candidates)
        .map(|c| format!("; did you mean `{c}`?"))
        .unwrap_or_default()
}

/// Levenshtein distance, with a swap of two neighbouring letters counted
/// as one edit (the commonest typo: `us-esat`).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_word_and_strangers_find_none() {
        assert_eq!(distance("us-esat", "us-east"), 1);
        assert_eq!(distance("kitten", "sitting"), 3);
        let keys = ["admin-listen", "dns-listen", "startup-grace"];
        assert_eq!(closest("admin-listn", keys), Some("admin-listen"));
        assert_eq!(closest("listen-dns", keys), None);
        assert_eq!(
            closest("when_all_down", ["when-all-down", "ttl"]),
            Some("when-all-down")
        );
        assert_eq!(closest("eu", ["us", "ap"]), None);
        assert_eq!(closest("mars", ["us-east", "eu-west"]), None);
        assert_eq!(hint("fastest", ["failover", "cost"]), "");
    }
}
