//! Log-probabilities of generated tokens, for the requests that ask (`logprobs`).
//!
//! Computed from the row the sampler chose from, after the output constraint's mask and the
//! repetition penalty and before temperature and the top-k / top-p / min-p cuts (OpenAI's and
//! vLLM's default semantics; see [`crate::types::TokenLogprob`]): one pass for the maximum, one
//! for the log-sum-exp and the top alternatives. Requests that do not ask never reach this file.

use std::sync::Arc;

use crate::types::{TokenLogprob, TokenProb};

/// The value of a token the distribution gives no mass (a masked token, or every logit
/// `-inf`): OpenAI's floor, since JSON has no `-Infinity`.
pub const NO_MASS: f32 = -9999.0;

/// What a sequence needs to report log-probabilities: how many alternatives per token and the
/// bytes of every id of the model's vocabulary (shared, built once per model).
#[derive(Debug, Clone)]
pub struct LogprobSpec {
    /// Alternatives per token (`top_logprobs`).
    pub top: usize,
    /// The bytes of id `i` at `i`.
    pub token_bytes: Arc<Vec<Vec<u8>>>,
}

impl LogprobSpec {
    /// The entry of `chosen`, sampled from `logits` (as the sampler left them: masked and
    /// penalized).
    pub fn entry(&self, logits: &[f32], chosen: u32) -> TokenLogprob {
        let (logprob, top) = log_softmax_top(logits, chosen, self.top);
        let prob = |id: u32, logprob: f32| TokenProb {
            id,
            bytes: self
                .token_bytes
                .get(id as usize)
                .cloned()
                .unwrap_or_default(),
            logprob,
        };
        TokenLogprob {
            chosen: prob(chosen, logprob),
            top: top.into_iter().map(|(id, l)| prob(id, l)).collect(),
        }
    }
}

/// The log-softmax of `logits` at `chosen`, and the `k` largest entries `(id, logprob)`, largest
/// first, lower id first on ties. NaN logits have no mass; tokens with no mass are never among
/// the alternatives, and the chosen one's value is then [`NO_MASS`]. Every value goes through
/// the same expression, so the chosen token's value equals its entry in the list bit for bit.
pub fn log_softmax_top(logits: &[f32], chosen: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        // No finite logit (all masked, or +inf): no distribution to speak of.
        return (NO_MASS, Vec::new());
    }
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| f64::from((l - max).exp()))
        .sum();
    let norm = f64::from(max) + sum.ln();
    let logprob = |l: f32| {
        let v = (f64::from(l) - norm) as f32;
        if v.is_finite() {
            v
        } else {
            NO_MASS
        }
    };
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            // `-inf` and NaN have no mass; `>` keeps the earlier id first on ties.
            if l == f32::NEG_INFINITY || l.is_nan() || (top.len() == k && l <= top[k - 1].1) {
                continue;
            }
            let at = top.partition_point(|&(_, t)| t >= l);
            top.insert(at, (i as u32, l));
            top.truncate(k);
        }
    }
    let chosen_logit = logits
        .get(chosen as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    let chosen_logprob = if chosen_logit.is_nan() {
        NO_MASS
    } else {
        logprob(chosen_logit)
    };
    let top = top.into_iter().map(|(id, l)| (id, logprob(l))).collect();
    (chosen_logprob, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Log-softmax by the book, in f64, and every id sorted by it (ties: lower id first).
    fn brute(logits: &[f32]) -> (Vec<f64>, Vec<u32>) {
        let z: f64 = logits
            .iter()
            .filter(|l| !l.is_nan())
            .map(|&l| f64::from(l).exp())
            .sum();
        let lp: Vec<f64> = logits
            .iter()
            .map(|&l| (f64::from(l).exp() / z).ln())
            .collect();
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        order.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
        (lp, order)
    }

    #[test]
    fn matches_a_brute_force_log_softmax_and_sort() {
        let logits = [1.5f32, -0.25, 3.0, 3.0, f32::NEG_INFINITY, 0.0, 2.75, -7.0];
        let (lp, order) = brute(&logits);
        for k in 0..=logits.len() {
            for chosen in 0..logits.len() as u32 {
                let (got, top) = log_softmax_top(&logits, chosen, k);
                if logits[chosen as usize] == f32::NEG_INFINITY {
                    assert_eq!(got, NO_MASS);
                } else {
                    assert!(
                        (f64::from(got) - lp[chosen as usize]).abs() < 1e-6,
                        "{chosen}"
                    );
                }
                let want: Vec<u32> = order.iter().copied().take(k).collect();
                let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
                assert_eq!(ids, want, "k = {k}: masked tokens never listed, ties by id");
                for &(id, l) in &top {
                    assert!((f64::from(l) - lp[id as usize]).abs() < 1e-6);
                    if id == chosen {
                        assert_eq!(l.to_bits(), got.to_bits(), "same value, bit for bit");
                    }
                }
            }
        }
        // The whole distribution sums to one.
        let (_, all) = log_softmax_top(&logits, 0, logits.len());
        let mass: f64 = all.iter().map(|t| f64::from(t.1).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-6, "{mass}");
    }

    #[test]
    fn large_rows_keep_their_precision() {
        // A 262k row like Gemma's: values near the top still match the f64 reference.
        let logits: Vec<f32> = (0..262_144)
            .map(|i| ((i as f32) * 0.001).sin() * 20.0)
            .collect();
        let (lp, order) = brute(&logits);
        let (got, top) = log_softmax_top(&logits, order[0], 5);
        assert_eq!(top[0].0, order[0]);
        assert!((f64::from(got) - lp[order[0] as usize]).abs() < 1e-5);
        for (t, want) in top.iter().zip(&order) {
            assert_eq!(t.0, *want);
        }
    }

    #[test]
    fn rows_without_mass_report_the_floor() {
        let logits = [f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY];
        assert_eq!(log_softmax_top(&logits, 1, 3), (NO_MASS, Vec::new()));
        // A NaN logit has no mass, even when chosen.
        let logits = [0.0f32, f32::NAN];
        let (got, top) = log_softmax_top(&logits, 1, 2);
        assert_eq!(got, NO_MASS);
        assert_eq!(top, vec![(0, 0.0)]);
    }

    #[test]
    fn entries_carry_the_token_bytes() {
        let spec = LogprobSpec {
            top: 2,
            token_bytes: Arc::new(vec![b"a".to_vec(), b" b".to_vec(), vec![0xE2]]),
        };
        let e = spec.entry(&[0.0, 1.0, 2.0], 1);
        assert_eq!(e.chosen.bytes, b" b");
        assert_eq!(e.top[0].bytes, vec![0xE2]);
        assert_eq!(e.top[1].logprob, e.chosen.logprob);
    }
}
