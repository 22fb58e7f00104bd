//! The seeded initial weights a replica starts from: drawn from the
//! configured seed with a generator of its own (splitmix64), not libtorch's,
//! so that they stay identical across libtorch versions and platforms; for
//! a shard (`Layout`), the rows it holds of the same draw.

use super::{Arch, Buffers, Layout, Model};

impl Model {
    /// Initial weights from the configured seed, independent of libtorch's
    /// generator so that they stay identical across libtorch versions.
    pub fn init_weights(&self) -> Buffers {
        self.init_weights_of(Layout::WHOLE)
    }

    /// The same, of the rows the shard `layout` holds: each sparse table's
    /// whole seeded stream is drawn, and the shard's rows kept, so they
    /// start as the unsharded replica's do.
    pub fn init_weights_of(&self, layout: Layout) -> Buffers {
        if let Arch::Script(script) = &self.arch {
            return script.initial.clone(); // the module's saved values (dense)
        }
        (self.params.iter())
            .map(|p| {
                let mut rng = SplitMix64(self.config.seed ^ fnv(&p.name));
                let bound = if p.name.starts_with("emb.") {
                    0.05
                } else if p.name.ends_with(".w") {
                    (1.0 / p.cols.max(1) as f32).sqrt()
                } else {
                    0.0 // biases and the linear part start at zero
                };
                if !p.sparse || layout == Layout::WHOLE {
                    return (0..p.len()).map(|_| bound * rng.uniform()).collect();
                }
                let mut held = Vec::with_capacity(layout.rows_of(p.rows) * p.cols);
                for row in 0..p.rows as u32 {
                    let values = (0..p.cols).map(|_| bound * rng.uniform());
                    match layout.place(row) {
                        Some(_) => held.extend(values),
                        None => values.for_each(drop),
                    }
                }
                held
            })
            .collect()
    }
}

/// splitmix64: tiny, fast, and the same on every platform.
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub(super) fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}
