//! `tokenizer_config.json`: read by both the tokenizer bundle and the chat template, so it
//! sits below both (no import cycle between `chat` and `tokenize`).

use crate::error::{DatasetError, Result};
use std::path::Path;

pub(crate) fn read_config(dir: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let p = dir.join("tokenizer_config.json");
    if !p.is_file() {
        return Ok(Default::default());
    }
    let text = std::fs::read_to_string(&p).map_err(|e| DatasetError::io(&p, e))?;
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(DatasetError::Json {
            path: p,
            message: "expected a JSON object".into(),
        }),
        Err(e) => Err(DatasetError::Json {
            path: p,
            message: e.to_string(),
        }),
    }
}

/// A special token given as `"</s>"` or `{"content": "</s>", ...}`.
pub(crate) fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}
