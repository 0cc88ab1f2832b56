//! Pure losses and algorithm logic.
