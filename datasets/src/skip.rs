//! Counting rows that are skipped rather than failed.

use crate::source::RowId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Why a row was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SkipReason {
    /// A required field was null.
    NullField,
    /// A required field was an empty string or an empty message list.
    EmptyField,
    /// An HH transcript without any "\n\nAssistant:" turn.
    HhNoAssistantTurn,
    /// HH chosen/rejected transcripts diverge before the last assistant turn.
    HhDivergent,
    /// chosen == rejected.
    IdenticalPair,
    /// A chat message with a null role or content.
    BadMessage,
    /// The chat template raised an error on this conversation.
    TemplateRejected,
}

impl SkipReason {
    /// Short label used in summaries.
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::NullField => "null field",
            SkipReason::EmptyField => "empty field",
            SkipReason::HhNoAssistantTurn => "HH transcript without an assistant turn",
            SkipReason::HhDivergent => "HH sides diverge before the last assistant turn",
            SkipReason::IdenticalPair => "chosen identical to rejected",
            SkipReason::BadMessage => "chat message with null role/content",
            SkipReason::TemplateRejected => "chat template raised an error",
        }
    }
}

/// Counts of skipped rows by reason, with the first example of each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipStats {
    /// Rows seen (emitted + skipped).
    pub rows_seen: u64,
    /// Skips by reason.
    pub counts: BTreeMap<SkipReason, u64>,
    /// First skipped row for each reason, with detail.
    pub first: BTreeMap<SkipReason, (RowId, String)>,
}

impl SkipStats {
    /// Records one skipped row.
    pub fn record(&mut self, reason: SkipReason, row: &RowId, detail: impl Into<String>) {
        *self.counts.entry(reason).or_insert(0) += 1;
        self.first
            .entry(reason)
            .or_insert_with(|| (row.clone(), detail.into()));
    }
    /// Total skipped rows.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
    /// Skips for one reason.
    pub fn count(&self, reason: SkipReason) -> u64 {
        self.counts.get(&reason).copied().unwrap_or(0)
    }
}

impl fmt::Display for SkipStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "skipped {} of {} rows", self.total(), self.rows_seen)?;
        for (reason, n) in &self.counts {
            write!(f, "\n  {n:>8}  {}", reason.label())?;
            if let Some((row, detail)) = self.first.get(reason) {
                write!(f, " (first: {row}")?;
                if !detail.is_empty() {
                    write!(f, ": {detail}")?;
                }
                write!(f, ")")?;
            }
        }
        Ok(())
    }
}
