//! AdamW with saveable state, learning-rate schedules and global-norm clipping.
