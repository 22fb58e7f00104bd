//! Which rows of the sparse tables a replica holds: the shard layout
//! (docs/design.md section 8a). Bucket `r` of every sparse table is shard
//! `r mod count`'s, and is row `r div count` of that shard's table, so a
//! shard's table (and each optimizer slot of it) is the same dense array as
//! an unsharded replica's, of `ceil(rows / count)` rows. Dense parameters are
//! whole on every shard.
//!
//! Owns only the arithmetic of the layout; what is stepped, published or
//! checkpointed is decided by the state and its readers.

use super::ParamSpec;

/// A replica's shard of the sparse tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Shards in the fleet (1: every replica holds the whole model).
    pub count: u32,
    /// This replica's shard, in `0..count`.
    pub index: u32,
}

impl Layout {
    /// The whole model: one shard.
    pub const WHOLE: Layout = Layout { count: 1, index: 0 };

    /// Shard `index` of `count`; `None` unless `index < count`.
    pub fn new(count: u32, index: u32) -> Option<Layout> {
        (index < count).then_some(Layout { count, index })
    }

    /// Where bucket `row` of a sparse table is in this shard's table, if
    /// this shard holds it.
    #[inline]
    pub fn place(&self, row: u32) -> Option<usize> {
        match self.count {
            1 => Some(row as usize),
            count => (row % count == self.index).then_some((row / count) as usize),
        }
    }

    /// The rows of a table of `rows` buckets that this shard holds.
    pub fn rows_of(&self, rows: usize) -> usize {
        rows.saturating_sub(self.index as usize).div_ceil(self.count as usize)
    }

    /// The parameters as this shard holds them: each sparse table with its
    /// own rows only.
    pub fn held(&self, params: &[ParamSpec]) -> Vec<ParamSpec> {
        let held =
            |p: &ParamSpec| ParamSpec { rows: if p.sparse { self.rows_of(p.rows) } else { p.rows }, ..p.clone() };
        params.iter().map(held).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_in_exactly_one_shard_at_a_place_of_its_own() {
        for count in 1..=5u32 {
            for rows in [0usize, 1, 7, 64, 101] {
                let shards: Vec<Layout> = (0..count).map(|i| Layout::new(count, i).unwrap()).collect();
                let mut seen = vec![Vec::new(); count as usize];
                for row in 0..rows as u32 {
                    let holders: Vec<(u32, usize)> =
                        shards.iter().filter_map(|s| Some((s.index, s.place(row)?))).collect();
                    assert_eq!(holders.len(), 1, "row {row} of {rows}, {count} shards: {holders:?}");
                    seen[holders[0].0 as usize].push(holders[0].1);
                }
                for (s, places) in shards.iter().zip(&seen) {
                    let want: Vec<usize> = (0..s.rows_of(rows)).collect();
                    assert_eq!(*places, want, "shard {s:?} of {rows} rows: its table, densely, in order");
                }
            }
        }
        assert_eq!(Layout::new(2, 2), None);
    }

    #[test]
    fn growing_to_twice_the_shards_splits_each_shard_in_two() {
        let old = Layout::new(3, 1).unwrap();
        for j in [1, 4] {
            let new = Layout::new(6, j).unwrap();
            assert!((0..600).filter(|&r| new.place(r).is_some()).all(|r| old.place(r).is_some()), "shard {j} of 6");
        }
    }
}
