//! What `kiln logs` shows of an instance's log: every line starts with the
//! time kiln read it (RFC 3339, UTC, milliseconds, then a space), so a
//! `--since` is a comparison of text, and `--tail` the last lines.

/// The time at the start of a log line, if it has one (lines written
/// before logs were stamped have none).
pub fn stamp_of(line: &[u8]) -> Option<&str> {
    let (head, _) = line.split_at(line.iter().position(|b| *b == b' ')?);
    let head = std::str::from_utf8(head).ok()?;
    // `2026-12-07T01:00:00.000Z`: 24 bytes, a `T` and a `Z`, digits between.
    let b = head.as_bytes();
    (b.len() == 24 && b[10] == b'T' && b[23] == b'Z' && b[..4].iter().all(u8::is_ascii_digit))
        .then_some(head)
}

/// The lines of `text` (whole lines, each ending in a newline) made at or
/// after `since` (an RFC 3339 time in the same form; a line without a time
/// is left out then), and of those only the last `tail`.
pub fn select(text: &[u8], since: Option<&str>, tail: Option<usize>) -> Vec<u8> {
    let lines: Vec<&[u8]> = text
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| since.is_none_or(|s| stamp_of(l).is_some_and(|t| t >= s)))
        .collect();
    let skip = tail.map_or(0, |n| lines.len().saturating_sub(n));
    lines[skip..].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &[u8] = b"2026-12-07T01:00:00.000Z one\n\
2026-12-07T01:00:01.500Z two\n\
an old line without a time\n\
2026-12-07T01:00:03.000Z [kiln] exited\n";

    #[test]
    fn a_stamp_is_the_first_word_when_it_is_a_time() {
        assert_eq!(
            stamp_of(b"2026-12-07T01:00:00.000Z one\n"),
            Some("2026-12-07T01:00:00.000Z")
        );
        assert_eq!(
            stamp_of(b"2026-12-07T01:00:00Z one\n"),
            None,
            "seconds only: not ours"
        );
        assert_eq!(stamp_of(b"an old line\n"), None);
        assert_eq!(stamp_of(b"nospace\n"), None);
        assert_eq!(stamp_of(b"XXXX-12-07T01:00:00.000Z one"), None);
        assert_eq!(stamp_of(b"2026-12-07 01:00:00.000Z one"), None);
        assert_eq!(stamp_of(b"2026-12-07T01:00:00.000+ one"), None);
    }

    #[test]
    fn since_and_tail_pick_lines() {
        assert_eq!(select(LOG, None, None), LOG);
        assert_eq!(
            select(LOG, Some("2026-12-07T01:00:01.000Z"), None),
            b"2026-12-07T01:00:01.500Z two\n2026-12-07T01:00:03.000Z [kiln] exited\n"
        );
        assert_eq!(
            select(LOG, Some("2026-12-07T01:00:01.500Z"), Some(1)),
            b"2026-12-07T01:00:03.000Z [kiln] exited\n"
        );
        assert_eq!(
            select(LOG, None, Some(2)),
            b"an old line without a time\n2026-12-07T01:00:03.000Z [kiln] exited\n"
        );
        assert_eq!(select(LOG, None, Some(0)), b"");
        assert_eq!(select(LOG, None, Some(99)), LOG);
        assert_eq!(select(LOG, Some("2027-01-01T00:00:00.000Z"), None), b"");
        assert_eq!(select(b"", None, Some(3)), b"");
    }
}
