//! The applier: reads the whole `updates` log in order and is the one writer
//! of the replica's state. The apply rule is in [`rule`].

pub mod applier;
pub mod optim;
pub mod rollback;
pub mod rule;
pub mod staleness;
