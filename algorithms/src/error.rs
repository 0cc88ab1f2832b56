//! The one error type of `align-algorithms`.

/// Errors raised by losses, optimizers and state (de)serialisation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input tensors with incompatible shapes; `detail` names each offending shape.
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// A configuration value outside its valid range, or a missing required input.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// I/O error while saving/loading optimizer state.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// JSON error while saving/loading optimizer state.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Return early with [`Error::Shape`].
macro_rules! bail_shape {
    ($op:expr, $($arg:tt)*) => {
        return Err($crate::error::Error::Shape { op: $op, detail: format!($($arg)*) })
    };
}
/// Return early with [`Error::Config`].
macro_rules! bail_config {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Config(format!($($arg)*)))
    };
}
pub(crate) use bail_config;
pub(crate) use bail_shape;
