//! Prompt sets for RL (GRPO/PPO): a prompt plus reference columns for reward functions.

use crate::chat::{ChatTemplate, Message};
use crate::error::{DatasetError, Result};
use crate::schema::{messages_at, require, scalar_string_at, text_at, ColumnKind};
use crate::skip::{SkipReason, SkipStats};
use crate::source::{RowId, Source};
use crate::stream::{load_metas, Cursor, Engine, FileMeta, StreamOptions};
use std::collections::BTreeMap;

/// One RL prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRecord {
    /// Prompt text; for chat prompts, rendered with the generation prompt.
    pub prompt: String,
    /// The original messages, for chat prompts.
    pub messages: Option<Vec<Message>>,
    /// Reference columns (e.g. `answer`, `ground_truth`) as strings; null cells are left out.
    pub refs: BTreeMap<String, String>,
    /// Where it came from.
    pub source_row: RowId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PromptFormat {
    prompt: String,
    kind: ColumnKind,
    refs: Vec<String>,
}

const EXPECTED: &str = "`prompt` (string or list of {role, content} messages) or `question`, plus optional reference columns";

fn detect(fm: &FileMeta, opts: &StreamOptions) -> Result<PromptFormat> {
    let schema = fm.schema();
    let prompt = match &opts.columns.prompt {
        Some(p) => p.clone(),
        None if schema.index_of("prompt").is_ok() => "prompt".into(),
        None if schema.index_of("question").is_ok() => "question".into(),
        None => {
            return Err(DatasetError::MissingColumns {
                path: fm.path.clone(),
                missing: vec!["prompt".into()],
                found: fm.column_names(),
                expected: EXPECTED.into(),
            })
        }
    };
    let kind = require(
        &fm.path,
        schema,
        &prompt,
        &[ColumnKind::Text, ColumnKind::Messages],
        EXPECTED,
    )?;
    let refs = match &opts.columns.refs {
        Some(list) => {
            for r in list {
                require(
                    &fm.path,
                    schema,
                    r,
                    &[ColumnKind::Text, ColumnKind::Scalar],
                    "reference columns must be strings or numbers",
                )?;
            }
            list.clone()
        }
        None => schema
            .fields()
            .iter()
            .filter(|f| f.name() != &prompt)
            .filter(|f| {
                matches!(
                    crate::schema::column_kind(f.data_type()),
                    ColumnKind::Text | ColumnKind::Scalar
                )
            })
            .map(|f| f.name().clone())
            .collect(),
    };
    Ok(PromptFormat { prompt, kind, refs })
}

/// Streams [`PromptRecord`]s. Same options, cursor and skip accounting as
/// [`crate::PreferenceStream`].
pub struct PromptStream {
    engine: Engine,
    format: PromptFormat,
    template: Option<ChatTemplate>,
    skips: SkipStats,
}

impl PromptStream {
    /// Opens a source (layout detected on the first file, checked on all).
    pub fn open(
        source: &Source,
        opts: StreamOptions,
        chat_template: Option<&ChatTemplate>,
    ) -> Result<Self> {
        let metas = load_metas(source)?;
        let first = metas
            .first()
            .ok_or_else(|| DatasetError::NoFiles(Vec::new()))?;
        let format = detect(first, &opts)?;
        for fm in &metas[1..] {
            let mut o = opts.clone();
            o.columns.refs = Some(format.refs.clone());
            o.columns.prompt = Some(format.prompt.clone());
            let f = detect(fm, &o)?;
            if f.kind != format.kind {
                return Err(DatasetError::Invalid(format!(
                    "{}: prompt column `{}` is {:?} here but {:?} in {}",
                    fm.path.display(),
                    format.prompt,
                    f.kind,
                    format.kind,
                    first.path.display()
                )));
            }
        }
        if format.kind == ColumnKind::Messages && chat_template.is_none() {
            return Err(DatasetError::NeedsChatTemplate {
                path: first.path.clone(),
                column: format.prompt.clone(),
            });
        }
        let mut cols = vec![format.prompt.clone()];
        cols.extend(format.refs.iter().cloned());
        let engine = Engine::new(metas, &cols, opts)?;
        Ok(PromptStream {
            engine,
            format,
            template: chat_template.cloned(),
            skips: SkipStats::default(),
        })
    }

    /// Opens a source and moves to a saved cursor.
    pub fn resume(
        source: &Source,
        opts: StreamOptions,
        chat_template: Option<&ChatTemplate>,
        cursor: &Cursor,
    ) -> Result<Self> {
        let mut s = Self::open(source, opts, chat_template)?;
        s.engine.seek(cursor)?;
        Ok(s)
    }

    /// Position to resume from.
    pub fn cursor(&self) -> Cursor {
        self.engine.cursor()
    }

    /// Rows skipped so far.
    pub fn skips(&self) -> &SkipStats {
        &self.skips
    }

    /// The prompt column and the reference columns used.
    pub fn columns(&self) -> (&str, &[String]) {
        (&self.format.prompt, &self.format.refs)
    }
}

impl Iterator for PromptStream {
    type Item = Result<PromptRecord>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            // skips are counted over one pass (a looping stream sees rows again)
            let mut later_pass = SkipStats::default();
            let skips = if self.engine.next_in_first_pass() {
                &mut self.skips
            } else {
                &mut later_pass
            };
            let r = match self.engine.next_row()? {
                Err(e) => return Some(Err(e)),
                Ok(r) => r,
            };
            skips.rows_seen += 1;
            let col = &self.format.prompt;
            let (prompt, messages) = if self.format.kind == ColumnKind::Text {
                match text_at(r.batch, col, r.row) {
                    None => {
                        skips.record(SkipReason::NullField, &r.id, col.clone());
                        continue;
                    }
                    Some("") => {
                        skips.record(SkipReason::EmptyField, &r.id, col.clone());
                        continue;
                    }
                    Some(s) => (s.to_string(), None),
                }
            } else {
                let m = match messages_at(r.batch, col, r.row) {
                    None => {
                        skips.record(SkipReason::NullField, &r.id, col.clone());
                        continue;
                    }
                    Some(Err(what)) => {
                        skips.record(SkipReason::BadMessage, &r.id, format!("{col}: null {what}"));
                        continue;
                    }
                    Some(Ok(m)) if m.is_empty() => {
                        skips.record(SkipReason::EmptyField, &r.id, col.clone());
                        continue;
                    }
                    Some(Ok(m)) => m,
                };
                let Some(t) = self.template.as_ref() else {
                    skips.record(SkipReason::TemplateRejected, &r.id, "no template");
                    continue;
                };
                match t.render(&m, true) {
                    Ok(p) => (p, Some(m)),
                    Err(e) => {
                        skips.record(SkipReason::TemplateRejected, &r.id, e.to_string());
                        continue;
                    }
                }
            };
            let refs = self
                .format
                .refs
                .iter()
                .filter_map(|c| scalar_string_at(r.batch, c, r.row).map(|v| (c.clone(), v)))
                .collect();
            let rec = PromptRecord {
                prompt,
                messages,
                refs,
                source_row: r.id,
            };
            self.engine.yielded();
            return Some(Ok(rec));
        }
    }
}
