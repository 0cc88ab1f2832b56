//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading, parsing, tokenizing or writing data.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not readable parquet (corrupt, truncated, or another format).
    #[error("{path}: not a readable parquet file: {message}")]
    Parquet { path: PathBuf, message: String },
    /// A path, directory or glob matched no parquet file.
    #[error("no parquet files found for {0:?}")]
    NoFiles(Vec<PathBuf>),
    /// Required columns are missing.
    #[error("{path}: missing column(s) {missing:?}; found columns {found:?}; expected {expected}")]
    MissingColumns {
        path: PathBuf,
        missing: Vec<String>,
        found: Vec<String>,
        expected: String,
    },
    /// A column exists but has an unsupported type.
    #[error("{path}: column `{column}` has type {found}, expected {expected} (columns found: {columns:?})")]
    MistypedColumn {
        path: PathBuf,
        column: String,
        found: String,
        expected: String,
        columns: Vec<String>,
    },
    /// A conversational dataset needs a chat template to render its messages.
    #[error("{path}: column `{column}` holds chat messages but no chat template was given")]
    NeedsChatTemplate { path: PathBuf, column: String },
    /// The chat template does not compile or failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// A tokenizer could not be loaded or failed to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The tokenizer's EOS token could not be determined.
    #[error("{0}: cannot find an EOS token (eos_token in tokenizer_config.json, or one of </s>, <|endoftext|>, <|im_end|>, <|eot_id|>)")]
    NoEosToken(PathBuf),
    /// After truncating the prompt, no room is left for any completion token.
    #[error("{row}: prompt has {prompt_len} tokens, leaving no room for a completion within max_length {max_length}")]
    NoRoomForCompletion {
        row: crate::RowId,
        prompt_len: usize,
        max_length: usize,
    },
    /// A looping stream went through every row of its source without one usable record.
    #[error("no usable row in a whole pass over the {rows} rows of the data")]
    NoUsableRows { rows: u64 },
    /// A cursor does not belong to this source.
    #[error("cursor does not match this source: {0}")]
    CursorMismatch(String),
    /// Invalid JSON in a config file or a cursor.
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
    /// Invalid value given by the caller (e.g. an empty glob).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl DatasetError {
    pub(crate) fn parquet(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        DatasetError::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
    pub(crate) fn io(path: &std::path::Path, e: std::io::Error) -> Self {
        DatasetError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;
