//! A shard's weights together with the rows of the other shards that a
//! batch reads (gathered from them): a view through which a forward pass or
//! a gradient reads exactly what it reads of an unsharded replica's
//! weights (docs/design.md section 8a), and through which a trainer's
//! overlay copies rows with their optimizer slots. Owns which rows a batch
//! needs from which shard, what a shard answers for them, and the view;
//! not how they travel.

use std::collections::{BTreeMap, HashMap};

use super::{Layout, Model, Weights};
use crate::event::Features;

/// A row of a sparse table: its parameter and its bucket.
pub type RowKey = (u32, u32);

/// What a shard answered for some rows: their values one row after the
/// other, each optimizer slot's values for them alike (when asked for and
/// kept), and the position and watermarks of the weights they were read at.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    pub position: i64,
    pub watermarks: BTreeMap<i32, i64>,
    pub values: Vec<f32>,
    pub slots: Vec<Vec<f32>>,
}

/// The rows of the sparse tables that `batch` reads and the shard `layout`
/// does not hold, per shard that holds them, each once, in order.
pub fn wanted(model: &Model, layout: Layout, batch: &[&Features]) -> BTreeMap<u32, Vec<RowKey>> {
    let mut wanted: BTreeMap<u32, Vec<RowKey>> = BTreeMap::new();
    for param in 0..model.params().len() {
        let Some(field) = model.sparse_field(param) else { continue };
        for id in batch.iter().flat_map(|f| f.ids.get(field).into_iter().flatten()) {
            if layout.place(*id).is_none() {
                wanted.entry(id % layout.count).or_default().push((param as u32, *id));
            }
        }
    }
    for rows in wanted.values_mut() {
        rows.sort_unstable();
        rows.dedup();
    }
    wanted
}

/// What shard `layout` answers for `rows` from its buffers `local` (its
/// weights, or an optimizer slot): their values, one row after the other;
/// `None` if it does not hold one of them (or it is not a row of a sparse
/// table).
pub fn answer<B: AsRef<[f32]>>(model: &Model, layout: Layout, local: &[B], rows: &[RowKey]) -> Option<Vec<f32>> {
    let mut values = Vec::new();
    for &(param, id) in rows {
        let spec = model.params().get(param as usize).filter(|p| p.sparse && (id as usize) < p.rows)?;
        let place = layout.place(id)?;
        values.extend_from_slice(&local[param as usize].as_ref()[place * spec.cols..(place + 1) * spec.cols]);
    }
    Some(values)
}

/// A shard's own weights and the rows gathered from the others.
pub struct Gathered<'a, B> {
    local: &'a [B],
    layout: Layout,
    /// Where each gathered row starts in `values` (and each slot's arena),
    /// and the shard it came from.
    places: HashMap<RowKey, (usize, u32)>,
    values: Vec<f32>,
    /// One arena per optimizer slot, beside `values`: kept only while every
    /// answer taken carried the same number of slots.
    slots: Option<Vec<Vec<f32>>>,
    /// The watermarks of the weights each shard answered from.
    watermarks: BTreeMap<u32, BTreeMap<i32, i64>>,
}

impl<'a, B: AsRef<[f32]>> Gathered<'a, B> {
    pub fn new(local: &'a [B], layout: Layout) -> Self {
        let (places, watermarks) = (HashMap::new(), BTreeMap::new());
        Gathered { local, layout, places, values: Vec::new(), slots: None, watermarks }
    }

    /// Takes shard `shard`'s `answer` for `rows`: false if its length is
    /// not the rows' (the caller then asks another replica of that shard).
    pub fn take(&mut self, model: &Model, shard: u32, rows: &[RowKey], answer: &Answer) -> bool {
        let cols = |&(param, _): &RowKey| model.params().get(param as usize).map_or(0, |p| p.cols);
        let len = rows.iter().map(cols).sum::<usize>();
        if answer.values.len() != len || answer.slots.iter().any(|s| s.len() != len) {
            return false;
        }
        let arenas = self.slots.get_or_insert_with(|| vec![Vec::new(); answer.slots.len()]);
        if arenas.len() != answer.slots.len() {
            arenas.clear(); // answers unlike each other: no slots kept
        }
        let mut at = 0;
        for row in rows {
            self.places.insert(*row, (self.values.len(), shard));
            self.values.extend_from_slice(&answer.values[at..at + cols(row)]);
            for (arena, theirs) in arenas.iter_mut().zip(&answer.slots) {
                arena.extend_from_slice(&theirs[at..at + cols(row)]);
            }
            at += cols(row);
        }
        self.watermarks.insert(shard, answer.watermarks.clone());
        true
    }

    /// Whether every row of `wanted` was taken: only then may the view be
    /// read (a row it lacks is a bug of its caller, and panics).
    pub fn has_all(&self, wanted: &BTreeMap<u32, Vec<RowKey>>) -> bool {
        wanted.values().flatten().all(|row| self.places.contains_key(row))
    }

    /// The shard gathered row `id` of `param` came from; `None` for a row
    /// this shard holds.
    pub fn source(&self, param: usize, id: u32) -> Option<u32> {
        self.places.get(&(param as u32, id)).map(|&(_, shard)| shard)
    }

    /// Optimizer slot `k`'s cells of gathered row `id` of `param`, when
    /// every answer carried the slots.
    pub fn slot_row(&self, k: usize, param: usize, id: u32, cols: usize) -> Option<&[f32]> {
        let &(at, _) = self.places.get(&(param as u32, id))?;
        Some(&self.slots.as_ref()?.get(k)?[at..at + cols])
    }

    /// The optimizer slots every answer carried (0: none, or not alike).
    pub fn slots(&self) -> usize {
        self.slots.as_ref().map_or(0, Vec::len)
    }

    /// The watermarks of the weights each shard answered from.
    pub fn watermarks(&self) -> &BTreeMap<u32, BTreeMap<i32, i64>> {
        &self.watermarks
    }
}

impl<B: AsRef<[f32]>> Weights for Gathered<'_, B> {
    fn param(&self, param: usize) -> &[f32] {
        self.local[param].as_ref()
    }

    fn row(&self, param: usize, id: u32, cols: usize) -> &[f32] {
        if let Some(place) = self.layout.place(id) {
            return &self.local[param].as_ref()[place * cols..(place + 1) * cols];
        }
        let (at, _) = self.places.get(&(param as u32, id)).expect("a gathered view is read only once it has every row");
        &self.values[*at..*at + cols]
    }
}
