//! Cutting text to a byte bound: what a log line, an event, an error or a URL in a note may
//! hold. Every bound in cairn is in bytes; a cut never splits a character.

/// Cuts `text` to at most `max` bytes, at a character boundary, and appends `mark` when it
/// cut (the mark is beyond the bound). Returns whether it cut.
pub fn cut(text: &mut String, max: usize, mark: &str) -> bool {
    if text.len() <= max {
        return false;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(mark);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_at_a_character_boundary_and_marked() {
        let mut short = "abc".to_string();
        assert!(!cut(&mut short, 3, "…"));
        assert_eq!(short, "abc");
        // "é" is two bytes: a cut at 2 would split it, so the text ends before it.
        let mut accented = "aébc".to_string();
        assert!(cut(&mut accented, 2, " [cut]"));
        assert_eq!(accented, "a [cut]");
        let mut long = "x".repeat(10);
        assert!(cut(&mut long, 4, "…"));
        assert_eq!(long, "xxxx…");
    }
}
