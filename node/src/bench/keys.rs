//! What `floe bench` reads and writes: key names, key choice (uniform and YCSB/Gray zipfian
//! with the rank→key bijection of `shared/BENCH.md`) and the value written by every put.
//!
//! Pure: no I/O, no clock. Randomness comes only from the caller's seeded generator, so a
//! given seed always picks the same keys in the same order and writes the same letters.
//!
//! Invariants: every key index is in `range_start .. range_start + range_len` ⊆ `0 .. N`;
//! the rank→key map `r ↦ (r·M) mod N` is a permutation of `0 .. N` (M coprime with N).

use anyhow::{bail, Result};
use clap::ValueEnum;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Largest `--keys`: names are `k` + 8 digits.
pub const KEYS_MAX: u64 = 100_000_000;

/// The golden-ratio fraction BENCH.md fixes for the zipfian multiplier.
const MULTIPLIER_FRACTION: f64 = 0.618034;

/// How keys are picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// Every key of the range with equal probability.
    Uniform,
    /// YCSB/Gray zipfian over ranks, ranks spread over the range by the bijection.
    Zipfian,
}

/// The document id of key `index`: `k` followed by 8 zero-padded digits.
pub fn key_name(index: u64) -> String {
    format!("k{index:08}")
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// M: the smallest integer ≥ ⌊0.618034·N⌋ that is coprime with N (`n` ≥ 1).
pub fn rank_multiplier(n: u64) -> u64 {
    let mut m = (MULTIPLIER_FRACTION * n as f64).floor() as u64;
    // Bounded: N and N+1 are always coprime, so at most N+1 - ⌊0.618·N⌋ steps.
    while gcd(m, n) != 1 {
        m += 1;
    }
    m
}

/// The key index of zipfian rank `rank`: `(rank·M) mod N`.
pub fn rank_to_index(rank: u64, multiplier: u64, n: u64) -> u64 {
    ((u128::from(rank) * u128::from(multiplier)) % u128::from(n)) as u64
}

/// ζ(n, θ) = Σ_{i=1..n} 1/i^θ.
fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| (i as f64).powf(-theta)).sum()
}

/// The YCSB `ZipfianGenerator` (Gray et al., "Quickly generating billion-record synthetic
/// databases"): rank r in `0..n` with probability about 1/((r+1)^θ·ζ(n,θ)); ranks 0 and 1
/// are exact.
#[derive(Clone, Debug)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zeta_n: f64,
    eta: f64,
}

impl Zipfian {
    /// `n` ≥ 1 ranks, 0 < θ < 1. Costs n powers (about a second for 10^8).
    pub fn new(n: u64, theta: f64) -> Result<Self> {
        if n == 0 {
            bail!("zipfian needs at least one rank");
        }
        if !(theta > 0.0 && theta < 1.0) {
            bail!("zipfian theta must be strictly between 0 and 1, got {theta}");
        }
        let zeta_n = zeta(n, theta);
        let zeta_2 = zeta(2.min(n), theta);
        // For n ≤ 2 the first two branches of `next_rank` cover everything and eta is unused.
        let eta = if n > 2 { (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta_2 / zeta_n) } else { 0.0 };
        Ok(Zipfian { n, theta, alpha: 1.0 / (1.0 - theta), zeta_n, eta })
    }

    /// ζ(n, θ), for tests and reports.
    pub fn zeta_n(&self) -> f64 {
        self.zeta_n
    }

    /// The next rank, in `0..n`.
    pub fn next_rank<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        let u: f64 = rng.gen();
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.n - 1);
        }
        let rank = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.n - 1)
    }
}

#[derive(Clone, Debug)]
enum Picker {
    Uniform,
    Zipfian { zipfian: Zipfian, multiplier: u64 },
}

/// Picks key indices in `range_start .. range_start + range_len`.
#[derive(Clone, Debug)]
pub struct KeyChooser {
    range_start: u64,
    range_len: u64,
    picker: Picker,
}

impl KeyChooser {
    /// A chooser over `range_len` ≥ 1 keys starting at `range_start`.
    pub fn new(range_start: u64, range_len: u64, distribution: Distribution, theta: f64) -> Result<Self> {
        if range_len == 0 {
            bail!("the key range is empty");
        }
        let picker = match distribution {
            Distribution::Uniform => Picker::Uniform,
            Distribution::Zipfian => {
                Picker::Zipfian { zipfian: Zipfian::new(range_len, theta)?, multiplier: rank_multiplier(range_len) }
            }
        };
        Ok(KeyChooser { range_start, range_len, picker })
    }

    /// The next key index.
    pub fn next_index<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        let offset = match &self.picker {
            Picker::Uniform => rng.gen_range(0..self.range_len),
            Picker::Zipfian { zipfian, multiplier } => {
                rank_to_index(zipfian.next_rank(rng), *multiplier, self.range_len)
            }
        };
        self.range_start + offset
    }
}

/// The `B` lowercase ASCII letters every put writes, drawn from `seed`.
pub fn value_letters(seed: u64, size_bytes: usize) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..size_bytes).map(|_| char::from(b'a' + rng.gen_range(0..26u8))).collect()
}

/// The generator of client `client_index` for a run seeded with `seed`: distinct streams
/// per client, the same streams for the same seed.
pub fn client_rng(seed: u64, client_index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(client_index.wrapping_add(1));
    rng
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn key_names_are_k_and_eight_digits() {
        assert_eq!(key_name(0), "k00000000");
        assert_eq!(key_name(42), "k00000042");
        assert_eq!(key_name(KEYS_MAX - 1), "k99999999");
    }

    /// The rank→key map must hit every key exactly once, or some keys are never chosen.
    #[test]
    fn rank_to_index_is_a_permutation() {
        for n in [1u64, 2, 3, 7, 10, 64, 100, 997, 1000, 1024, 4096, 10_000] {
            let m = rank_multiplier(n);
            assert_eq!(gcd(m, n), 1, "n={n} m={m}");
            assert!(m >= (0.618034 * n as f64).floor() as u64);
            let image: BTreeSet<u64> = (0..n).map(|r| rank_to_index(r, m, n)).collect();
            assert_eq!(image.len() as u64, n, "n={n} m={m}");
            assert!(image.iter().all(|&k| k < n));
        }
        assert_eq!(rank_multiplier(1000), 619, "618 shares a factor 2 with 1000");
        assert_eq!(rank_multiplier(997), 616, "997 is prime");
    }

    /// Ranks 0 and 1 are exact in Gray's method: P(0) = 1/ζ(n,θ), P(1) = 2^-θ/ζ(n,θ).
    #[test]
    fn zipfian_head_frequencies_match_theory() {
        let zipfian = Zipfian::new(1000, 0.99).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let samples = 200_000u64;
        let mut counts = [0u64; 2];
        for _ in 0..samples {
            let rank = zipfian.next_rank(&mut rng);
            assert!(rank < 1000);
            if rank < 2 {
                counts[rank as usize] += 1;
            }
        }
        let p0 = 1.0 / zipfian.zeta_n();
        let p1 = 0.5f64.powf(0.99) / zipfian.zeta_n();
        let f0 = counts[0] as f64 / samples as f64;
        let f1 = counts[1] as f64 / samples as f64;
        // Standard deviation of f0 is about 0.00075 here; allow ~6 of them.
        assert!((f0 - p0).abs() < 0.005, "rank 0: measured {f0}, theory {p0}");
        assert!((f1 - p1).abs() < 0.005, "rank 1: measured {f1}, theory {p1}");
        assert!((0.12..0.14).contains(&p0), "ζ(1000, 0.99) ≈ 7.5, got p0={p0}");
    }

    #[test]
    fn zipfian_rejects_bad_parameters() {
        assert!(Zipfian::new(0, 0.5).is_err());
        assert!(Zipfian::new(10, 1.0).is_err());
        assert!(Zipfian::new(10, 0.0).is_err());
        assert!(Zipfian::new(10, f64::NAN).is_err());
        let tiny = Zipfian::new(1, 0.99).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert!((0..100).all(|_| tiny.next_rank(&mut rng) == 0));
    }

    #[test]
    fn choices_and_values_are_deterministic_per_seed() {
        for distribution in [Distribution::Uniform, Distribution::Zipfian] {
            let chooser = KeyChooser::new(0, 1000, distribution, 0.99).unwrap();
            let draw = |seed: u64, client: u64| {
                let mut rng = client_rng(seed, client);
                (0..50).map(|_| chooser.next_index(&mut rng)).collect::<Vec<_>>()
            };
            assert_eq!(draw(5, 0), draw(5, 0));
            assert_ne!(draw(5, 0), draw(5, 1), "clients get distinct streams");
            assert_ne!(draw(5, 0), draw(6, 0), "seeds differ");
            assert!(draw(5, 3).iter().all(|&k| k < 1000));
        }
        assert_eq!(value_letters(3, 32), value_letters(3, 32));
        assert_ne!(value_letters(3, 32), value_letters(4, 32));
        let value = value_letters(9, 100);
        assert_eq!(value.len(), 100);
        assert!(value.bytes().all(|b| b.is_ascii_lowercase()));
        assert_eq!(value_letters(9, 0), "");
    }

    #[test]
    fn hot_range_stays_inside_its_range() {
        let chooser = KeyChooser::new(500, 10, Distribution::Zipfian, 0.99).unwrap();
        let mut rng = client_rng(1, 0);
        assert!((0..1000).map(|_| chooser.next_index(&mut rng)).all(|k| (500..510).contains(&k)));
        assert!(KeyChooser::new(0, 0, Distribution::Uniform, 0.99).is_err());
    }
}
