//! The engine's error type: every message names the file, tensor or setting at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("{file}: tensor `{name}` is missing (the model family `{family}` needs it)")]
    MissingTensor {
        file: PathBuf,
        name: String,
        family: String,
    },

    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}{}", context.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        context: Option<String>,
    },

    #[error("adapter {path}: {msg}")]
    Adapter { path: PathBuf, msg: String },

    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    #[error(transparent)]
    Dataset(#[from] align_datasets::DatasetError),

    #[error(transparent)]
    Algorithm(#[from] align_algorithms::Error),

    /// A setting (flag or config-file key) with a bad value; names the key and where it came from.
    #[error("{origin}: `{key}`: {msg}")]
    Setting {
        origin: String,
        key: String,
        msg: String,
    },

    /// `msg`, caused by `source` (printed as a "caused by" chain).
    #[error("{msg}")]
    Context {
        msg: String,
        #[source]
        source: Box<Error>,
    },

    #[error("{0}")]
    Msg(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Msg(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Msg(e.to_string())
    }
}

/// `anyhow`-style context for the library's typed errors.
pub trait Context<T> {
    fn context(self, msg: impl std::fmt::Display) -> Result<T>;
    fn with_context<M: std::fmt::Display>(self, f: impl FnOnce() -> M) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, msg: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| Error::Context {
            msg: msg.to_string(),
            source: Box::new(e.into()),
        })
    }
    fn with_context<M: std::fmt::Display>(self, f: impl FnOnce() -> M) -> Result<T> {
        self.map_err(|e| Error::Context {
            msg: f().to_string(),
            source: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, msg: impl std::fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::Msg(msg.to_string()))
    }
    fn with_context<M: std::fmt::Display>(self, f: impl FnOnce() -> M) -> Result<T> {
        self.ok_or_else(|| Error::Msg(f().to_string()))
    }
}

/// `return Err(Error::Msg(format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::error::Error::Msg(format!($($t)*)))
    };
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Read a JSON file into a serde type, naming the file on failure.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Write bytes atomically: a temporary file in the same folder, fsync, then rename over the target.
/// A kill at any moment leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}
