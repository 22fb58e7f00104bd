//! A state of one shard layout taken to another whose rows it holds: how a
//! fleet grows from S to 2S shards (docs/design.md section 8a), and how a
//! replica configured as a shard starts from the whole model's checkpoint.
//! Owns only the copying of rows; which checkpoint is read is the caller's.

use super::ReplicaState;
use crate::model::{Buffers, Layout, Model};

impl Layout {
    /// Whether every row `to` holds is one this layout holds: `to` splits
    /// this layout's shard (its count a multiple of this one's, its index
    /// this one's modulo this count).
    pub fn holds_all_of(&self, to: Layout) -> bool {
        to.count.is_multiple_of(self.count) && to.index % self.count == self.index
    }
}

impl ReplicaState {
    /// This state as shard `to` holds it: its rows of the sparse tables
    /// (weights and optimizer slots), everything else as it is. `None` if
    /// this state does not hold all of them.
    pub fn narrowed_to(self, model: &Model, to: Layout) -> Option<ReplicaState> {
        let from = self.optimizer.layout;
        if from == to {
            return Some(self);
        }
        if !from.holds_all_of(to) {
            return None;
        }
        let narrow = |buffers: &Buffers| -> Buffers {
            (model.params().iter().zip(buffers))
                .map(|(p, held)| {
                    if !p.sparse {
                        return held.clone();
                    }
                    let mut kept = Vec::with_capacity(to.rows_of(p.rows) * p.cols);
                    for row in (to.index as usize..p.rows).step_by(to.count as usize) {
                        let at = from.place(row as u32).expect("`from` holds every row of `to`");
                        kept.extend_from_slice(&held[at * p.cols..(at + 1) * p.cols]);
                    }
                    kept
                })
                .collect()
        };
        let mut state = self;
        state.weights = narrow(&state.weights);
        state.optimizer.slots = state.optimizer.slots.iter().map(narrow).collect();
        state.optimizer.layout = to;
        Some(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, ModelKind, OptimizerKind};

    #[test]
    fn a_narrowed_state_is_the_state_its_layout_starts_from() {
        let c = ModelConfig { optimizer: Some(OptimizerKind::Adam), ..ModelConfig::small(ModelKind::WideDeep) };
        let model = Model::new(&c).unwrap();
        let shard = |count, index| Layout::new(count, index).unwrap();
        // Whole to 2, 2 to 4, 3 to 6: each as the shard's own start.
        for (from, to) in [(shard(1, 0), shard(2, 1)), (shard(2, 1), shard(4, 3)), (shard(3, 2), shard(6, 5))] {
            let mut start = ReplicaState::initial_of(&model, from);
            start.optimizer.slots[1].iter_mut().flatten().enumerate().for_each(|(i, v)| *v = i as f32);
            let narrowed = start.clone().narrowed_to(&model, to).unwrap();
            assert_eq!(narrowed.weights, ReplicaState::initial_of(&model, to).weights, "{from:?} -> {to:?}");
            assert_eq!(narrowed.optimizer.layout, to);
            let p = model.params().iter().position(|p| p.sparse).unwrap();
            let cols = model.params()[p].cols;
            let row = to.index + to.count; // the second row `to` holds
            let at = from.place(row).unwrap() * cols;
            assert_eq!(narrowed.optimizer.slots[1][p][cols..2 * cols], start.optimizer.slots[1][p][at..at + cols]);
        }
        let other = ReplicaState::initial_of(&model, shard(2, 0));
        assert!(other.narrowed_to(&model, shard(4, 1)).is_none(), "shard 1 of 4 is shard 1 of 2's half");
    }
}
