//! Turning a cached answer back into the events a generation would have sent.

use std::time::Duration;

use crate::engine::{Completion, GenerationEvent, Source, Timings};

use super::CachedAnswer;

/// Splits `text` into pieces of at most `chunk_chars` characters. Splits on `char` boundaries,
/// so a piece never cuts a UTF-8 sequence (it may separate combining marks, as the model's own
/// token stream can).
pub fn chunks(text: &str, chunk_chars: usize) -> impl Iterator<Item = &str> {
    let chunk_chars = chunk_chars.max(1);
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .char_indices()
            .nth(chunk_chars)
            .map_or(rest.len(), |(i, _)| i);
        let (head, tail) = rest.split_at(end);
        rest = tail;
        Some(head)
    })
}

/// The `Delta`s then the `Finished` replaying `answer` from `source`; `elapsed` becomes the
/// time to first token and the total.
pub fn events(
    answer: &CachedAnswer,
    chunk_chars: usize,
    source: Source,
    elapsed: Duration,
) -> Vec<GenerationEvent> {
    let mut out: Vec<GenerationEvent> = chunks(&answer.text, chunk_chars)
        .map(|c| GenerationEvent::Delta(c.to_string()))
        .collect();
    out.push(GenerationEvent::Finished(Completion {
        finish_reason: answer.finish_reason,
        prompt_tokens: answer.prompt_tokens,
        completion_tokens: answer.completion_tokens,
        cached_prompt_tokens: 0,
        timings: Timings {
            queue: Duration::ZERO,
            time_to_first_token: elapsed,
            total: elapsed,
        },
        source,
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_char_boundaries_and_rejoin() {
        let text = "héllo wörld 😀 日本語";
        for n in 1..8 {
            let parts: Vec<&str> = chunks(text, n).collect();
            assert_eq!(parts.concat(), text);
            assert!(parts
                .iter()
                .all(|p| p.chars().count() <= n && !p.is_empty()));
            assert!(parts[..parts.len() - 1]
                .iter()
                .all(|p| p.chars().count() == n));
        }
        assert_eq!(chunks("", 4).count(), 0);
        assert_eq!(chunks("abc", 0).collect::<Vec<_>>(), vec!["a", "b", "c"]);
    }
}
