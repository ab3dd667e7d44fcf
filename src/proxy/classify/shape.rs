//! A query's text with its plain constants masked: the cache key that lets a session skip
//! the parser for a query it has seen with other constants (`WHERE aid = 1`, then
//! `WHERE aid = 2` in the simple protocol, as pgbench `-S` and many ORMs send them).
//!
//! This is not a classifier: every shape is first classified by PostgreSQL's parser, and a
//! shape stands for a verdict only where the parser's fingerprint would (the fingerprint
//! drops constants too). So the one thing this must get right is that two texts with the
//! same shape differ only in the values of constants, which then lex as constants of the
//! same kind in the same places. It masks only what is unmistakable (decimal numbers and
//! quoted strings with no escapes or prefixes, outside quoted identifiers) and gives up on
//! anything else it meets ($ parameters and quotes, backslashes, comments, hints, control
//! characters, numbers with a suffix, E'' or U&'' strings): those texts are parsed as before.

/// Stands for a numeric constant; a control character, so no text that has one of its own
/// gets a shape.
const NUMBER: &str = "\u{1}";

/// Writes `sql`'s shape into `out`; false when the text has something this does not mask
/// with certainty (then `out` is garbage and the text goes to the parser). Text between
/// masked constants is copied a run at a time: every simple-protocol query pays for this.
pub fn literal_shape(sql: &str, out: &mut String) -> bool {
    out.clear();
    let bytes = sql.as_bytes();
    let mut at = 0;
    // `sql[copied..at]` is text kept as it is, not yet in `out`.
    let mut copied = 0;
    // Whether the byte before `at` continues an identifier or keyword (so a digit there is
    // part of a name, as in `int4` or `t1`).
    let mut in_word = false;
    while at < bytes.len() {
        // Skip a run of plain bytes at once: only its last one says whether a digit after
        // it continues a word.
        let run = bytes[at..]
            .iter()
            .position(|&byte| !PLAIN[usize::from(byte)]);
        let run = run.unwrap_or(bytes.len() - at);
        if run > 0 {
            at += run;
            in_word = continues_word(bytes[at - 1]);
            if at == bytes.len() {
                break;
            }
        }
        let byte = bytes[at];
        let next = bytes.get(at + 1).copied();
        let (mask, end, word) = match byte {
            b'$' | b'\\' => return false,
            b'-' if next == Some(b'-') => return false,
            b'/' if next == Some(b'*') => return false,
            b'"' => {
                let Some(close) = bytes[at + 1..].iter().position(|&b| b == b'"') else {
                    return false;
                };
                at += close + 2;
                in_word = true;
                continue;
            }
            b'\'' => {
                let after_prefix = in_word || at > 0 && bytes[at - 1] == b'&';
                let Some(end) = string_end(bytes, at).filter(|_| !after_prefix) else {
                    return false;
                };
                ("''", end, true)
            }
            b'0'..=b'9' if !in_word => {
                let Some(end) = number_end(bytes, at) else {
                    return false;
                };
                (NUMBER, end, false)
            }
            _ if refused_control(byte) => return false,
            _ => {
                in_word = continues_word(byte);
                at += 1;
                continue;
            }
        };
        out.push_str(&sql[copied..at]);
        out.push_str(mask);
        (at, copied, in_word) = (end, end, word);
    }
    out.push_str(&sql[copied..]);
    true
}

/// Whether `byte` is part of an identifier or keyword (a digit after it is too).
fn continues_word(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || !byte.is_ascii()
}

/// A control character a shape cannot stand for (whitespace and vertical tab aside).
const fn refused_control(byte: u8) -> bool {
    byte.is_ascii_control() && !byte.is_ascii_whitespace() && byte != 0x0b
}

/// Bytes [`literal_shape`] copies without a look at what follows: not a digit, quote,
/// `$`, backslash, `-`, `/` or control character (whitespace aside).
const PLAIN: [bool; 256] = {
    let mut plain = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        plain[byte] = !(refused_control(b)
            || b.is_ascii_digit()
            || matches!(b, b'$' | b'\\' | b'-' | b'/' | b'"' | b'\''));
        byte += 1;
    }
    plain
};

/// The end of the string constant opening at `start` (a quote doubled inside it is part
/// of it), if it ends and has no backslash (which escapes under
/// `standard_conforming_strings = off`).
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut at = start + 1;
    loop {
        match *bytes.get(at)? {
            b'\\' => return None,
            b'\'' if bytes.get(at + 1) == Some(&b'\'') => at += 2,
            b'\'' => return Some(at + 1),
            _ => at += 1,
        }
    }
}

/// The end of the decimal number starting at `start` (`12`, `1.5`, `1.`, `2e-3`), if
/// nothing that would make it something else follows it: a letter, `_` or `.` (a
/// PostgreSQL 16 `0x1F` or `1_000`, a suffix, `1..2`).
fn number_end(bytes: &[u8], start: usize) -> Option<usize> {
    let digits = |at: usize| {
        at + bytes[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let mut at = digits(start);
    if bytes.get(at) == Some(&b'.') {
        at = digits(at + 1);
    }
    if matches!(bytes.get(at), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(bytes.get(at + 1), Some(b'+' | b'-')));
        if bytes.get(at + 1 + sign).is_some_and(u8::is_ascii_digit) {
            at = digits(at + 1 + sign);
        }
    }
    match bytes.get(at) {
        Some(&b) if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || !b.is_ascii() => None,
        _ => Some(at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sql: &str) -> Option<String> {
        let mut out = String::new();
        literal_shape(sql, &mut out).then_some(out)
    }

    fn fingerprint(sql: &str) -> u64 {
        pg_query::fingerprint(sql, 0, 0).expect("parses").value
    }

    /// Texts that differ only in constants share a shape, and the parser agrees that they
    /// are one query.
    #[test]
    fn texts_with_one_shape_have_one_fingerprint() {
        let families: &[&[&str]] = &[
            &[
                "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 98231;",
            ],
            &[
                r#"SELECT "app_user"."id", "t1"."x" FROM "app_user" WHERE "app_user"."name" = 'ann' LIMIT 21"#,
                r#"SELECT "app_user"."id", "t1"."x" FROM "app_user" WHERE "app_user"."name" = 'o''brien' LIMIT 5"#,
            ],
            &[
                "SELECT 1.5 * x, 2e-3, .5 FROM t WHERE y IN (1, 2, 3) AND z::int4 > 7",
                "SELECT 10.25 * x, 7E+9, .9 FROM t WHERE y IN (4, 5, 6) AND z::int4 > 0",
            ],
            &[
                "UPDATE t SET v = 'é' WHERE id = 3",
                "UPDATE t SET v = 'naïve' WHERE id = 4",
            ],
            &["SELECT 'a'\n'b' AS ab", "SELECT 'c'\n'd' AS ab"],
            // Integers and decimals are one kind of constant to the fingerprint too.
            &["SELECT 1", "SELECT 1.0", "SELECT 99999999999999999999"],
        ];
        for family in families {
            let shapes: Vec<_> = family.iter().map(|sql| shape(sql)).collect();
            assert!(shapes[0].is_some(), "{family:?} has a shape");
            assert!(
                shapes.iter().all(|s| s == &shapes[0]),
                "{family:?}: {shapes:?}"
            );
            let prints: Vec<_> = family.iter().map(|sql| fingerprint(sql)).collect();
            assert!(prints.iter().all(|p| p == &prints[0]), "{family:?}");
        }
    }

    #[test]
    fn names_with_digits_and_different_statements_keep_their_own_shapes() {
        let distinct = [
            "SELECT md5(x) FROM t1",
            "SELECT sha256(x) FROM t2",
            r#"SELECT * FROM "t 1""#,
            r#"SELECT * FROM "t 2""#,
            "SELECT 1",
            "SELECT '1'",
            "SELECT 1 FOR UPDATE",
            "DELETE FROM t WHERE id = 1",
        ];
        let shapes: Vec<_> = distinct.iter().map(|sql| shape(sql).unwrap()).collect();
        for (i, a) in shapes.iter().enumerate() {
            for b in &shapes[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn anything_not_masked_with_certainty_has_no_shape() {
        for sql in [
            "SELECT $1",
            "SELECT $$text$$",
            "SELECT E'a\\nb'",
            "SELECT 'a\\'b'",
            "SELECT U&'d\\0061t'",
            "SELECT x'1F', b'01', n'x'",
            "SELECT 0x1F",
            "SELECT 1_000",
            "SELECT 1abc",
            "SELECT 1..2",
            "/* lagprobe:primary */ SELECT 1",
            "SELECT 1 -- one",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
            "SELECT \u{1}",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
    }
}
