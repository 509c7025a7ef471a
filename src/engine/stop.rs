//! Stop strings matched across token boundaries.
//!
//! Text reaches the matcher in arbitrary deltas (one per token), so a stop string may arrive split
//! over several of them. The matcher emits text as soon as it can no longer be part of a stop
//! string and holds back only the longest suffix that is still a prefix of one; the caller never
//! sees text that a later delta turns into a match.

/// What one [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopStep {
    /// Text safe to emit now. When `stopped`, it ends right before the matched stop string.
    pub text: String,
    /// A stop string matched: generation should end, and no later text belongs to the output.
    pub stopped: bool,
}

/// Matches a request's stop strings over a stream of text deltas.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    /// Non-empty stop strings.
    stops: Vec<String>,
    /// Text received but not emitted: a suffix that may start a stop string.
    held: String,
    /// Set once a stop string matched; later pushes emit nothing.
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`. Empty strings are ignored (they would match before any text).
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        Self {
            stops: stops
                .iter()
                .map(|s| s.as_ref().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// True when there are no stop strings (every delta passes through unchanged).
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Feeds the next delta. Returns the text now safe to emit and whether a stop string matched;
    /// the earliest match wins when several do.
    pub fn push(&mut self, delta: &str) -> StopStep {
        if self.stopped {
            return StopStep {
                text: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(delta);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min()
        {
            self.stopped = true;
            let mut text = std::mem::take(&mut self.held);
            text.truncate(at);
            return StopStep {
                text,
                stopped: true,
            };
        }
        let keep = self.partial_match_len();
        let rest = self.held.split_off(self.held.len() - keep);
        StopStep {
            text: std::mem::replace(&mut self.held, rest),
            stopped: false,
        }
    }

    /// The held-back text at the end of the generation (empty after a match).
    pub fn flush(self) -> String {
        if self.stopped {
            String::new()
        } else {
            self.held
        }
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    /// Prefixes are cut on the stop string's character boundaries, so the split point in `held`
    /// is a character boundary too.
    fn partial_match_len(&self) -> usize {
        self.stops
            .iter()
            .flat_map(|stop| {
                stop.char_indices()
                    .skip(1)
                    .map(|(end, _)| &stop[..end])
                    .filter(|prefix| self.held.ends_with(prefix))
                    .map(str::len)
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops);
        let mut out = Vec::new();
        let mut stopped = false;
        for d in deltas {
            let step = m.push(d);
            out.push(step.text);
            if step.stopped {
                stopped = true;
                break;
            }
        }
        (out, stopped, m.flush())
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let (out, stopped, rest) = run(&[], &["a", "b"]);
        assert_eq!(out, ["a", "b"]);
        assert!(!stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn match_inside_one_delta_cuts_before_it() {
        let (out, stopped, _) = run(&["END"], &["abcENDdef"]);
        assert_eq!(out, ["abc"]);
        assert!(stopped);
    }

    #[test]
    fn stop_string_split_over_three_deltas() {
        let (out, stopped, _) = run(&["<|stop|>"], &["hello <|", "st", "op|> ignored"]);
        assert_eq!(out, ["hello ", "", ""]);
        assert!(stopped);
        assert_eq!(out.concat(), "hello ");
    }

    #[test]
    fn held_text_is_released_when_the_match_fails() {
        let (out, stopped, rest) = run(&["STOP"], &["ab ST", "OX", "P"]);
        assert_eq!(out, ["ab ", "STOX", "P"]);
        assert!(!stopped);
        assert_eq!(rest, "");
        let (out, _, rest) = run(&["STOP"], &["x", "STO"]);
        assert_eq!(out, ["x", ""]);
        assert_eq!(rest, "STO");
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        // The stop string starts with "é"; "éx" must not be held by a byte-level prefix.
        let (out, stopped, _) = run(&["éé"], &["caf", "é", "x", "éé!"]);
        assert_eq!(out, ["caf", "", "éx", ""]);
        assert!(stopped);
        let (out, stopped, _) = run(&["👍🏽"], &["ok 👍", "🏽 done"]);
        assert_eq!(out, ["ok ", ""]);
        assert!(stopped);
        for s in out {
            assert!(std::str::from_utf8(s.as_bytes()).is_ok());
        }
    }

    #[test]
    fn overlapping_prefixes_keep_the_longest_candidate() {
        // "aab": after "aa" the held suffix must be "aa", not "a", or "aab" split as "aa"+"b" is missed.
        let (out, stopped, _) = run(&["aab"], &["xaa", "ab"]);
        assert_eq!(out, ["x", "a"]);
        assert!(stopped);
        // Two stop strings, one a prefix of the other's tail: the earliest match wins.
        let (out, stopped, _) = run(&["world", "lo w"], &["hel", "lo wor", "ld"]);
        assert_eq!(out.concat(), "hel");
        assert!(stopped);
    }

    #[test]
    fn pushes_after_a_stop_emit_nothing() {
        let mut m = StopMatcher::new(&["x"]);
        assert!(m.push("ax").stopped);
        let step = m.push("more");
        assert!(step.stopped);
        assert_eq!(step.text, "");
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let (out, stopped, _) = run(&[""], &["abc"]);
        assert_eq!(out, ["abc"]);
        assert!(!stopped);
    }
}
