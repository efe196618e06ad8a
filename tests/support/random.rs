//! Randomness for the long suites (crash loop, link cuts): a small seeded generator, and the
//! round count and seed from the environment, so a failing run can be replayed.

/// xorshift64*: enough to pick operations and moments, and repeatable from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// In `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }
}

/// `PREFIX_ROUNDS` (else `default`) and `PREFIX_SEED` (else one from the clock).
pub fn rounds_and_seed(prefix: &str, default: u32) -> (u32, u64) {
    let rounds = std::env::var(format!("{prefix}_ROUNDS"))
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default);
    let seed = std::env::var(format!("{prefix}_SEED"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    (rounds, seed)
}
