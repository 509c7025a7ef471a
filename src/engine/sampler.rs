//! Picking the next token from a row of logits.
//!
//! Order (each step is skipped when its setting is off): repetition penalty over the history,
//! then greedy argmax when `temperature == 0`; otherwise temperature, top-k, top-p, min-p and a
//! draw from the request's own RNG. Vocabularies reach 262,144 entries, so nothing sorts the whole
//! row: greedy is one pass, top-k is a `select_nth_unstable`, and top-p sorts only as large a head
//! of the distribution as its mass needs.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::SamplingParams;

/// First head size tried by top-p without top-k; grown ×8 until the head holds the mass.
const TOP_P_FIRST_HEAD: usize = 64;

/// One request's sampler: its settings, its RNG and reusable scratch buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// `(token, weight)` candidates, reused across steps to avoid a 262k allocation per token.
    candidates: Vec<(u32, f32)>,
    /// Sorted, de-duplicated history for the repetition penalty.
    seen: Vec<u32>,
}

impl Sampler {
    /// A sampler for `params`. With `seed: Some(s)` the RNG is seeded (StdRng, ChaCha12) so the same
    /// seed and the same logits give the same tokens; with `None` it is seeded from the OS.
    pub fn new(params: &SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params: params.clone(),
            rng,
            candidates: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// The settings this sampler applies.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token. `logits` is modified in place (penalty applied); `history` is the
    /// prompt and the tokens generated so far. Ids in `history` outside `logits` are ignored. If no
    /// logit is finite the argmax rule applies (the first non-NaN maximum, else 0).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.params.repetition_penalty != 1.0 {
            self.apply_repetition_penalty(logits, history);
        }
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        self.fill_candidates(logits, max);
        self.apply_top_p();
        self.apply_min_p();
        self.draw()
    }

    /// CTRL-style penalty, once per distinct token: positive logits are divided by the penalty,
    /// negative ones multiplied, so a penalty > 1 always makes the token less likely.
    fn apply_repetition_penalty(&mut self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty;
        self.seen.clear();
        self.seen.extend_from_slice(history);
        self.seen.sort_unstable();
        self.seen.dedup();
        for &id in &self.seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }

    /// Temperature and top-k: `candidates` gets `(id, exp((logit - max) / T))`, sorted by weight
    /// descending when top-k cut it (top-k sizes are small), unsorted otherwise.
    fn fill_candidates(&mut self, logits: &[f32], max: f32) {
        let inv_t = 1.0 / self.params.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp())),
        );
        let k = self.params.top_k as usize;
        if k > 0 && k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            self.candidates.truncate(k);
        }
        if k > 0 {
            self.candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        }
    }

    /// Keeps the smallest head of the distribution whose mass reaches `top_p` (at least one token).
    fn apply_top_p(&mut self) {
        let p = self.params.top_p;
        if p >= 1.0 || p.is_nan() {
            return;
        }
        let total: f64 = self.candidates.iter().map(|c| f64::from(c.1)).sum();
        let target = f64::from(p.max(0.0)) * total;
        let sorted = self.params.top_k > 0;
        let mut head = if sorted {
            self.candidates.len()
        } else {
            TOP_P_FIRST_HEAD
        };
        loop {
            let n = self.candidates.len();
            if head < n {
                self.candidates
                    .select_nth_unstable_by(head - 1, |a, b| b.1.total_cmp(&a.1));
            }
            let head_len = head.min(n);
            if !sorted {
                self.candidates[..head_len].sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            }
            let mut mass = 0.0f64;
            let cut = self.candidates[..head_len].iter().position(|c| {
                mass += f64::from(c.1);
                mass >= target
            });
            match cut {
                Some(i) => {
                    self.candidates.truncate(i + 1);
                    return;
                }
                // Rounding left the whole row short of the target: keep everything.
                None if head_len == n => return,
                None => head = head.saturating_mul(8),
            }
        }
    }

    /// Drops tokens whose probability is below `min_p` × the top token's. Weights are relative to
    /// the top token already (its weight is 1), so no normalization is needed.
    fn apply_min_p(&mut self) {
        let min_p = self.params.min_p;
        if min_p <= 0.0 {
            return;
        }
        let top = self.candidates.iter().map(|c| c.1).fold(0.0f32, f32::max);
        let floor = min_p * top;
        self.candidates.retain(|c| c.1 >= floor);
    }

    /// Draws one candidate in proportion to its weight.
    fn draw(&mut self) -> u32 {
        let total: f64 = self.candidates.iter().map(|c| f64::from(c.1)).sum();
        let mut r = self.rng.random::<f64>() * total;
        for &(id, w) in &self.candidates {
            r -= f64::from(w);
            if r < 0.0 {
                return id;
            }
        }
        // Only reachable through rounding: the last candidate with any weight.
        self.candidates
            .iter()
            .rev()
            .find(|c| c.1 > 0.0)
            .or(self.candidates.first())
            .map_or(0, |c| c.0)
    }
}

/// Index of the largest logit in one pass; the first one on ties, NaN never wins, 0 when empty or
/// all NaN.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_value || (!found && !l.is_nan()) {
            best = i;
            best_value = l;
            found = true;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    /// A smooth row where many tokens have real mass (logit i = 3 sin(0.37 i)), with one clear
    /// maximum at n / 3 so that argmax is unambiguous (sin rounds to exactly 1.0 at many i).
    fn row(n: usize) -> Vec<f32> {
        let mut logits: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        logits[n / 3] = 3.5;
        logits
    }

    fn draws(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p);
        (0..n)
            .map(|_| s.sample(&mut logits.to_vec(), &[]))
            .collect()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut logits = vec![0.1, 2.5, -1.0, 2.4];
        assert_eq!(Sampler::new(&params(0.0)).sample(&mut logits, &[]), 1);
    }

    #[test]
    fn argmax_skips_nan_and_prefers_the_first_tie() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, 3.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits = row(1000);
        let p = params(1.0);
        let a = draws(&p, &logits, 50);
        assert_eq!(a, draws(&p, &logits, 50));
        let other = SamplingParams {
            seed: Some(8),
            ..p.clone()
        };
        assert_ne!(a, draws(&other, &logits, 50));
        // Real sampling: more than one distinct token over 50 draws.
        let mut distinct = a.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 1);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits = row(5000);
        let greedy = argmax(&logits);
        let p = SamplingParams {
            top_k: 1,
            ..params(1.5)
        };
        assert!(draws(&p, &logits, 30).iter().all(|&t| t == greedy));
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let logits = row(5000);
        let mut order: Vec<u32> = (0..5000).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let best: Vec<u32> = order[..5].to_vec();
        let p = SamplingParams {
            top_k: 5,
            ..params(5.0)
        };
        let got = draws(&p, &logits, 200);
        assert!(got.iter().all(|t| best.contains(t)));
        let mut distinct = got;
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 1);
    }

    #[test]
    fn tiny_top_p_is_argmax() {
        let logits = row(262_144);
        let greedy = argmax(&logits);
        let p = SamplingParams {
            top_p: 1e-6,
            ..params(1.0)
        };
        assert!(draws(&p, &logits, 20).iter().all(|&t| t == greedy));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Two tokens hold ~0.88 of the mass (1 + e^-0.2 against 98 e^-6); top_p 0.8 keeps them.
        let mut logits = vec![0.0f32; 100];
        logits[10] = 6.0;
        logits[20] = 5.8;
        let p = SamplingParams {
            top_p: 0.8,
            ..params(1.0)
        };
        let got = draws(&p, &logits, 300);
        assert!(got.iter().all(|&t| t == 10 || t == 20));
        assert!(got.contains(&10) && got.contains(&20));
    }

    #[test]
    fn top_p_grows_its_head_past_the_first_guess() {
        // Flat row: the nucleus needs ~90% of 10,000 tokens, far past the first head of 64.
        let logits = vec![1.0f32; 10_000];
        let p = SamplingParams {
            top_p: 0.9,
            ..params(1.0)
        };
        let got = draws(&p, &logits, 500);
        assert!(got.iter().any(|&t| t as usize > TOP_P_FIRST_HEAD * 8));
    }

    #[test]
    fn min_p_filters_unlikely_tokens() {
        // p(top) ≈ e^0 vs e^-3 ≈ 0.05 relative: min_p 0.1 removes every token but 3 and 4.
        let mut logits = vec![-3.0f32; 50];
        logits[3] = 0.0;
        logits[4] = -0.5;
        let p = SamplingParams {
            min_p: 0.1,
            ..params(1.0)
        };
        let got = draws(&p, &logits, 300);
        assert!(got.iter().all(|&t| t == 3 || t == 4));
        assert!(got.contains(&4));
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut s = Sampler::new(&SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        });
        let mut logits = vec![4.0, 3.0, -1.0, 0.5];
        // Token 0 is repeated in history: penalized once, not twice.
        assert_eq!(s.sample(&mut logits, &[0, 0, 2, 99]), 1);
        assert_eq!(logits, vec![2.0, 3.0, -2.0, 0.5]);
    }

    #[test]
    fn all_masked_logits_fall_back_to_argmax() {
        let mut logits = vec![f32::NEG_INFINITY; 8];
        assert_eq!(Sampler::new(&params(1.0)).sample(&mut logits, &[]), 0);
    }

    #[test]
    fn unseeded_samplers_still_sample_within_top_k() {
        let logits = row(1000);
        let p = SamplingParams {
            top_k: 3,
            temperature: 1.0,
            seed: None,
            ..SamplingParams::default()
        };
        let best = {
            let mut order: Vec<u32> = (0..1000).collect();
            order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
            order[..3].to_vec()
        };
        assert!(draws(&p, &logits, 50).iter().all(|t| best.contains(t)));
    }
}
