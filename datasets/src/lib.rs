//! Streaming parquet datasets for alignment: preference pairs (DPO), prompt sets (RL)
//! and rollouts, read row group by row group with bounded memory, seeded shuffling and
//! exactly resumable cursors.
//!
//! # Public API
//!
//! * [`Source`]: `Source::from_paths(&[PathBuf])` expands files, folders (all `*.parquet`,
//!   sorted) and globs (`data/part-*.parquet`); `Source::from_file(path)`.
//! * [`StreamOptions`] `{ shuffle, seed, shuffle_buffer, loop_epochs, columns, batch_size }`
//!   with [`ColumnOverrides`] `{ prompt, chosen, rejected, refs }`.
//! * [`Cursor`]: `Serialize + Deserialize + Clone + PartialEq`; `stream.cursor()` after any
//!   record, `XStream::resume(.., &cursor)` continues with exactly the next record.
//! * [`PreferenceStream`]: `open(&Source, StreamOptions, Option<&ChatTemplate>)`,
//!   `resume(.., &Cursor)`, `Iterator<Item = Result<PreferencePair>>`, `cursor()`,
//!   `skips() -> &SkipStats`, `format() -> &PreferenceFormat`. Layouts detected:
//!   `prompt/chosen/rejected` strings, HH-RLHF `chosen/rejected` transcripts (split with
//!   [`split_hh`]), and conversational `chosen/rejected` (optionally `prompt`) message lists
//!   rendered with a [`ChatTemplate`] (TRL's approach: prompt = shared prefix rendered with
//!   `add_generation_prompt=true`, completion = the rest of the rendering).
//! * [`PromptStream`] likewise, yielding [`PromptRecord`] `{ prompt, messages, refs, source_row }`
//!   from `prompt` (string or messages) or `question`; other scalar columns become `refs`.
//! * [`Rollout`], [`RolloutWriter`] (`create(path)?.write(&rows)?.finish()?`),
//!   [`RolloutStream`], [`read_rollouts`].
//! * [`TokenizerBundle`] (alias [`ChatTokenizer`]): `from_dir(model_dir)`, `encode`,
//!   `tokenize_pair(&PreferencePair, &TruncationOptions, &mut TruncationStats) -> Result<TokenizedPair>`,
//!   `tokenize_sft`, `tokenize_text`.
//! * [`SkipStats`] (Display-able counts by [`SkipReason`]), [`DatasetError`] (one enum for all
//!   errors; never panics on user input).
//!
//! # Shuffling and memory
//!
//! With `shuffle`, each epoch permutes the file order and each file's row-group order
//! (seeded by `seed` and the epoch), then reads row groups into a block of at least
//! `shuffle_buffer` rows and emits that block in a seeded random order. Memory is bounded by
//! `shuffle_buffer` plus one row group; without shuffling, by one decoded batch per column.
//! The cursor records the block's start, the rows consumed in it and its RNG seed, so a
//! resumed stream re-reads the block and continues exactly.

mod chat;
mod error;
mod hh;
mod ppo_rollouts;
mod preference;
mod prompts;
mod rollouts;
mod schema;
mod skip;
mod source;
mod stream;
mod tokenize;
mod tokenizer_config;

pub use chat::{render_pair, shared_prefix_len, ChatTemplate, Message};
pub use error::{DatasetError, Result};
pub use hh::{split_hh, HhSkip, ASSISTANT_MARKER};
pub use ppo_rollouts::{ppo_rollout_schema, read_ppo_rollouts, PpoRollout, PpoRolloutWriter};
pub use preference::{PreferenceFormat, PreferencePair, PreferenceStream};
pub use prompts::{PromptRecord, PromptStream};
pub use rollouts::{read_rollouts, rollout_schema, Rollout, RolloutStream, RolloutWriter};
pub use schema::{column_kind, ColumnKind, ColumnOverrides};
pub use skip::{SkipReason, SkipStats};
pub use source::{wildcard_match, RowId, Source};
pub use stream::{Cursor, StreamOptions};
pub use tokenize::{
    ChatTokenizer, SftExample, TokenizedPair, TokenizerBundle, TruncationOptions, TruncationStats,
};
