//! Normalising the three ways servers return reasoning into `(reasoning, answer)`.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Splits inline `<think>…</think>answer` content into trimmed `(reasoning, answer)`.
///
/// Handles the R1 habit of omitting the opening tag (the chat template already
/// emitted it), and content cut off by `max_tokens` inside an opened think block
/// (all reasoning, no answer). Content without tags is all answer, because a
/// server that parsed reasoning out leaves only the answer in `content`.
pub fn split_think(content: &str) -> (&str, &str) {
    let body = content.trim_start();
    let after_open = body.strip_prefix(OPEN);
    match find(body, CLOSE) {
        Some(end) => {
            let reasoning = &body[..end];
            let reasoning = reasoning.strip_prefix(OPEN).unwrap_or(reasoning);
            (reasoning.trim(), body[end + CLOSE.len()..].trim())
        }
        None => match after_open {
            Some(rest) => (rest.trim(), ""),
            None => ("", content.trim()),
        },
    }
}

/// Byte offset of the first `needle` in `haystack`: memchr's SIMD substring search, several
/// times faster than `str::find` on the kilobytes of a reasoning trace (imports split
/// hundreds of thousands). Offsets are char boundaries: a match of a valid UTF-8 needle
/// starts on one.
pub fn find(haystack: &str, needle: &str) -> Option<usize> {
    memchr::memmem::find(haystack.as_bytes(), needle.as_bytes())
}

/// Combines a separately delivered reasoning field with the content, either of
/// which may be empty, into owned trimmed `(reasoning, answer)`.
pub fn normalize(reasoning_field: &str, content: &str) -> (String, String) {
    let (inline, answer) = split_think(content);
    let field = reasoning_field.trim();
    let reasoning = match (field.is_empty(), inline.is_empty()) {
        (_, true) => field.to_owned(),
        (true, false) => inline.to_owned(),
        (false, false) => format!("{field}\n\n{inline}"),
    };
    (reasoning, answer.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_with_and_without_opening_tag() {
        assert_eq!(
            split_think("<think>\nA\nB\n</think>\n\n\\boxed{1}"),
            ("A\nB", "\\boxed{1}")
        );
        assert_eq!(
            split_think("  A step\n</think>\n\nanswer "),
            ("A step", "answer")
        );
        assert_eq!(
            split_think("<think>\n\n</think>\n\nJust this"),
            ("", "Just this")
        );
    }

    #[test]
    fn no_tags_is_all_answer_and_cut_think_is_all_reasoning() {
        assert_eq!(
            split_think("\n The answer is 4.\n"),
            ("", "The answer is 4.")
        );
        assert_eq!(
            split_think("<think>\nstill thinking when cut"),
            ("still thinking when cut", "")
        );
        assert_eq!(split_think(""), ("", ""));
    }

    #[test]
    fn only_first_close_tag_ends_reasoning() {
        assert_eq!(
            split_think("r</think>a mentions </think> literally"),
            ("r", "a mentions </think> literally")
        );
    }

    #[test]
    fn field_and_inline_combine() {
        assert_eq!(
            normalize("\nthought\n", "\n\nans"),
            ("thought".into(), "ans".into())
        );
        assert_eq!(normalize("", "<think>t</think>a"), ("t".into(), "a".into()));
        assert_eq!(normalize("f", "t</think>a"), ("f\n\nt".into(), "a".into()));
        assert_eq!(normalize("", ""), (String::new(), String::new()));
    }
}
