//! The guard a semantic hit must pass besides the cosine threshold: cheap lexical checks against
//! the known false-hit classes of sentence embeddings, where a question and its near-miss score
//! 0.9–0.99 (measured on `tests/data/semantic_pairs.tsv`: "Is coffee bad for you?" / "Is coffee
//! not bad for you?" 0.98; "Convert dollars to euros." / "Convert euros to dollars." 0.996).
//!
//! Each check compares the stored question with the asked one and refuses the hit when they
//! differ in something an embedding blurs:
//! - [`Reject::Negation`]: the parity of negation words (`not`, `no`, `never`, `n't` forms, …)
//!   differs, or a word of one is a negating prefix (`un`, `in`, `im`, `il`, `ir`, `dis`, `non`)
//!   plus a word only the other has (`safe` / `unsafe`, `legal` / `illegal`).
//! - [`Reject::Number`]: the multisets of digit runs differ (`3 steps` / `5 steps`, `2018` /
//!   `2022`, `HTTP/1.1` / `HTTP/2`).
//! - [`Reject::Entity`]: a capitalised word that does not start a sentence (a likely name: France,
//!   Python, Obama) is absent from the other text, any case; or names both share come in another
//!   order (`Is Netflix better than Hulu?` / `Is Hulu better than Netflix?`).
//! - [`Reject::Order`]: `x REL y` in one and `y REL x` in the other, for a relation word
//!   (`to`, `than`, `from`, `vs`, `versus`, `into`, `over`): `dollars to euros` / `euros to dollars`.
//! - [`Reject::Opposite`]: one has a word and the other its opposite from a fixed list of pairs
//!   (`enable` / `disable`, `before` / `after`, `buy` / `sell`, …).
//! - [`Reject::Cjk`]: either text has CJK characters and their sets differ. The shipped encoder
//!   (all-MiniLM-L6-v2) is English-only: it reads most Chinese characters as `[UNK]`, so its
//!   similarity says nothing there; only a reordering of the same characters may hit.
//!
//! The checks were written with the labelled set in view (its figures are in-sample); they are
//! deliberately one-sided — they refuse, never accept — so a missed class costs hit rate, not
//! correctness of the others.

/// Why the guard refused a hit; `label()` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Negation words or a negating prefix differ.
    Negation,
    /// The numbers differ.
    Number,
    /// A (capitalised) name of one is absent from the other, or shared names are reordered.
    Entity,
    /// The two sides of a relation word are swapped.
    Order,
    /// A word of one has its opposite in the other.
    Opposite,
    /// The CJK characters differ.
    Cjk,
}

impl Reject {
    /// Every variant, for metrics and reports.
    pub const ALL: [Reject; 6] = [
        Reject::Negation,
        Reject::Number,
        Reject::Entity,
        Reject::Order,
        Reject::Opposite,
        Reject::Cjk,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reject::Negation => "negation",
            Reject::Number => "number",
            Reject::Entity => "entity",
            Reject::Order => "order",
            Reject::Opposite => "opposite",
            Reject::Cjk => "cjk",
        }
    }
}

const NEGATIONS: &[&str] = &[
    "not", "no", "never", "nor", "none", "nothing", "nobody", "nowhere", "neither", "without",
    "cannot", "cant", "dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "wont",
    "wouldnt", "shouldnt", "couldnt", "hasnt", "havent", "hadnt", "aint", "mustnt", "neednt",
    "shant",
];

const NEGATING_PREFIXES: &[&str] = &["un", "in", "im", "il", "ir", "dis", "non"];

const RELATIONS: &[&str] = &["to", "than", "from", "vs", "versus", "into", "over"];

/// Pairs of opposite words (either order).
const OPPOSITES: &[(&str, &str)] = &[
    ("on", "off"),
    ("enable", "disable"),
    ("enabled", "disabled"),
    ("open", "close"),
    ("open", "closed"),
    ("login", "logout"),
    ("in", "out"),
    ("up", "down"),
    ("upload", "download"),
    ("buy", "sell"),
    ("before", "after"),
    ("first", "last"),
    ("best", "worst"),
    ("good", "bad"),
    ("better", "worse"),
    ("love", "hate"),
    ("increase", "decrease"),
    ("more", "less"),
    ("most", "least"),
    ("advantages", "disadvantages"),
    ("pros", "cons"),
    ("add", "remove"),
    ("create", "delete"),
    ("install", "uninstall"),
    ("encrypt", "decrypt"),
    ("start", "stop"),
    ("win", "lose"),
    ("won", "lost"),
    ("gain", "lose"),
    ("push", "pull"),
    ("import", "export"),
    ("minimum", "maximum"),
    ("min", "max"),
    ("high", "low"),
    ("higher", "lower"),
    ("largest", "smallest"),
    ("biggest", "smallest"),
    ("tallest", "shortest"),
    ("longest", "shortest"),
    ("boiling", "freezing"),
    ("mother", "father"),
    ("cancel", "renew"),
    ("true", "false"),
    ("real", "fake"),
    ("safe", "dangerous"),
    ("accept", "reject"),
    ("allow", "deny"),
    ("hot", "cold"),
    ("fast", "slow"),
    ("faster", "slower"),
    ("cheap", "expensive"),
    ("early", "late"),
    ("light", "dark"),
    ("north", "south"),
    ("east", "west"),
    ("left", "right"),
    ("asleep", "awake"),
    ("learn", "teach"),
    ("import", "export"),
    ("encode", "decode"),
    ("lock", "unlock"),
    ("send", "receive"),
    ("sender", "receiver"),
    ("input", "output"),
    ("positive", "negative"),
    ("pass", "fail"),
    ("success", "failure"),
];

/// `Ok` when nothing marks `stored` and `asked` as different questions.
pub fn check(stored: &str, asked: &str) -> Result<(), Reject> {
    let a = Text::new(stored);
    let b = Text::new(asked);
    if a.negations % 2 != b.negations % 2 || negating_prefix(&a, &b) {
        return Err(Reject::Negation);
    }
    if a.numbers != b.numbers {
        return Err(Reject::Number);
    }
    if entities_differ(&a, &b) {
        return Err(Reject::Entity);
    }
    if swapped_relation(&a, &b) || swapped_relation(&b, &a) {
        return Err(Reject::Order);
    }
    if opposite(&a, &b) {
        return Err(Reject::Opposite);
    }
    if (!a.cjk.is_empty() || !b.cjk.is_empty()) && a.cjk != b.cjk {
        return Err(Reject::Cjk);
    }
    Ok(())
}

/// What the checks read of one text.
struct Text {
    /// Lower-case words (ASCII letters and digits; apostrophes dropped: `don't` → `dont`).
    words: Vec<String>,
    /// Negation words counted.
    negations: usize,
    /// Digit runs (with inner `.`/`,` decimals), sorted.
    numbers: Vec<String>,
    /// Lower-cased capitalised words not starting a sentence, in order.
    names: Vec<String>,
    /// CJK characters, sorted and deduplicated.
    cjk: Vec<char>,
}

impl Text {
    fn new(s: &str) -> Self {
        let chars: Vec<char> = s.chars().collect();
        let mut cjk: Vec<char> = chars.iter().copied().filter(|c| is_cjk(*c)).collect();
        cjk.sort_unstable();
        cjk.dedup();
        // Digit runs, wherever they are (`ww2`, `2加2`, `1,000`, `1.1`).
        let mut numbers = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            if !chars[i].is_ascii_digit() {
                i += 1;
                continue;
            }
            let mut run = String::new();
            while i < chars.len()
                && (chars[i].is_ascii_digit()
                    || (matches!(chars[i], '.' | ',')
                        && chars.get(i + 1).is_some_and(char::is_ascii_digit)))
            {
                run.push(chars[i]);
                i += 1;
            }
            numbers.push(run);
        }
        numbers.sort();
        // Words: ASCII letter/digit runs, an apostrophe inside one dropped (`don't` → `dont`).
        let mut words = Vec::new();
        let mut names = Vec::new();
        // The beginning, or after . ! ? (and the CJK full stops).
        let mut sentence_start = true;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_ascii_alphanumeric() {
                let capitalised = c.is_ascii_uppercase();
                let mut word = String::new();
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric()
                        || (chars[i] == '\''
                            && chars.get(i + 1).is_some_and(char::is_ascii_alphabetic)))
                {
                    if chars[i] != '\'' {
                        word.push(chars[i].to_ascii_lowercase());
                    }
                    i += 1;
                }
                if capitalised && !sentence_start && word != "i" {
                    names.push(word.clone());
                }
                sentence_start = false;
                words.push(word);
                continue;
            }
            if matches!(c, '.' | '!' | '?' | '。' | '！' | '？') {
                sentence_start = true;
            } else if !c.is_whitespace() {
                sentence_start = false;
            }
            i += 1;
        }
        let negations = words.iter().filter(|w| is_negation(w)).count();
        Self {
            words,
            negations,
            numbers,
            names,
            cjk,
        }
    }

    fn has(&self, word: &str) -> bool {
        self.words.iter().any(|w| w == word)
    }
}

fn is_negation(w: &str) -> bool {
    NEGATIONS.contains(&w)
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30ff      // Hiragana, Katakana
        | 0x3400..=0x4dbf    // CJK Extension A
        | 0x4e00..=0x9fff    // CJK Unified Ideographs
        | 0xac00..=0xd7af    // Hangul syllables
        | 0xf900..=0xfaff    // CJK Compatibility Ideographs
        | 0x20000..=0x2fa1f) // Extensions B–F, compatibility supplement
}

/// A word only one side has is a negating prefix plus a word only the other side has.
fn negating_prefix(a: &Text, b: &Text) -> bool {
    let only = |x: &Text, y: &Text| -> Vec<String> {
        x.words.iter().filter(|w| !y.has(w)).cloned().collect()
    };
    let (only_a, only_b) = (only(a, b), only(b, a));
    let pairs = |x: &[String], y: &[String]| {
        x.iter().any(|w| {
            NEGATING_PREFIXES.iter().any(|p| {
                w.strip_prefix(p)
                    .is_some_and(|rest| rest.len() >= 3 && y.iter().any(|v| v == rest))
            })
        })
    };
    pairs(&only_a, &only_b) || pairs(&only_b, &only_a)
}

fn entities_differ(a: &Text, b: &Text) -> bool {
    if a.names.iter().any(|n| !b.has(n)) || b.names.iter().any(|n| !a.has(n)) {
        return true;
    }
    // The order in which both texts mention the names either of them capitalises.
    let names: Vec<&String> = a.names.iter().chain(&b.names).collect();
    let order = |t: &Text, other: &Text| -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for w in &t.words {
            if names.contains(&w) && other.has(w) && !seen.contains(w) {
                seen.push(w.clone());
            }
        }
        seen
    };
    order(a, b) != order(b, a)
}

/// `x REL y` in `a` and `y REL x` in `b`, with x ≠ y.
fn swapped_relation(a: &Text, b: &Text) -> bool {
    let triples = |t: &Text| -> Vec<(String, String, String)> {
        t.words
            .windows(3)
            .filter(|w| RELATIONS.contains(&w[1].as_str()) && w[0] != w[2])
            .map(|w| (w[0].clone(), w[1].clone(), w[2].clone()))
            .collect()
    };
    let tb = triples(b);
    triples(a).into_iter().any(|(x, r, y)| {
        tb.iter()
            .any(|(y2, r2, x2)| *y2 == y && *r2 == r && *x2 == x)
    })
}

fn opposite(a: &Text, b: &Text) -> bool {
    OPPOSITES.iter().any(|(x, y)| {
        let one_way = |p: &Text, q: &Text| p.has(x) && q.has(y) && !p.has(y) && !q.has(x);
        one_way(a, b) || one_way(b, a)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paraphrases_pass() {
        for (a, b) in [
            ("What is the capital of France?", "capital of france?"),
            (
                "Who wrote Romeo and Juliet?",
                "Romeo and Juliet was written by whom?",
            ),
            ("How do I reverse a list in Python?", "python reverse list"),
            (
                "How do I undo the last commit in git?",
                "How can I revert my last git commit?",
            ),
            (
                "How do I reset my password?",
                "I forgot my password, how do I reset it?",
            ),
            ("番茄炒蛋怎么做？", "怎么做番茄炒蛋？"),
        ] {
            assert_eq!(check(a, b), Ok(()), "{a} / {b}");
        }
    }

    #[test]
    fn each_false_hit_class_is_refused() {
        for (a, b, why) in [
            (
                "Is coffee bad for you?",
                "Is coffee not bad for you?",
                Reject::Negation,
            ),
            (
                "Why does my code work?",
                "Why doesn't my code work?",
                Reject::Negation,
            ),
            (
                "Is it safe to eat raw eggs?",
                "Is it unsafe to eat raw eggs?",
                Reject::Negation,
            ),
            (
                "Reset my password in 3 steps",
                "Reset my password in 5 steps",
                Reject::Number,
            ),
            ("Explain HTTP/1.1.", "Explain HTTP/2.", Reject::Number),
            (
                "What is the capital of France?",
                "What is the capital of Germany?",
                Reject::Entity,
            ),
            (
                "Is Netflix better than Hulu?",
                "Is Hulu better than Netflix?",
                Reject::Entity,
            ),
            (
                "Convert dollars to euros.",
                "Convert euros to dollars.",
                Reject::Order,
            ),
            (
                "How do I turn on dark mode?",
                "How do I turn off dark mode?",
                Reject::Opposite,
            ),
            ("法国的首都是哪里？", "德国的首都是哪里？", Reject::Cjk),
            ("可以退货吗？", "为什么不能退货？", Reject::Cjk),
        ] {
            assert_eq!(check(a, b), Err(why), "{a} / {b}");
            assert_eq!(check(b, a), Err(why), "{b} / {a}");
        }
    }

    #[test]
    fn double_negation_and_words_in_common_are_not_negation() {
        assert_eq!(check("It is not bad", "It isn't bad"), Ok(()));
        // `in` + `do`? no: `undo` is only flagged when the other side has `do` and this one not.
        assert_eq!(check("How do I undo it?", "How do I undo it"), Ok(()));
    }
}
