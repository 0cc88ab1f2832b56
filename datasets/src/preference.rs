//! Preference pairs: explicit prompt/chosen/rejected, HH-RLHF transcripts, and
//! conversational (chat message) pairs.

use crate::chat::{render_pair, ChatTemplate, Message};
use crate::error::{DatasetError, Result};
use crate::hh::split_hh;
use crate::schema::{column_kind, messages_at, number_at, require, text_at, ColumnKind};
use crate::skip::{SkipReason, SkipStats};
use crate::source::{RowId, Source};
use crate::stream::{load_metas, Cursor, Engine, FileMeta, StreamOptions};
use arrow::array::RecordBatch;

/// One preference pair, as text. `prompt + chosen` is the full chosen sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    /// The prompt (for chat data: rendered with the generation prompt).
    pub prompt: String,
    /// The preferred completion.
    pub chosen: String,
    /// The dispreferred completion.
    pub rejected: String,
    /// Where it came from.
    pub source_row: RowId,
    /// The row's `margin` (how much more chosen is preferred; TRL's reward-model column), when
    /// the data has that numeric column.
    pub margin: Option<f64>,
}

/// The optional numeric column of a preference pair's margin.
pub const MARGIN_COLUMN: &str = "margin";

/// The margin column of one file: `Some("margin")` when present and numeric, an error naming
/// the file when present with another type.
fn detect_margin(fm: &FileMeta) -> Result<Option<String>> {
    let schema = fm.schema();
    let Ok(i) = schema.index_of(MARGIN_COLUMN) else {
        return Ok(None);
    };
    let dt = schema.field(i).data_type();
    if column_kind(dt) != ColumnKind::Scalar || *dt == arrow::datatypes::DataType::Boolean {
        return Err(DatasetError::MistypedColumn {
            path: fm.path.clone(),
            column: MARGIN_COLUMN.into(),
            found: dt.to_string(),
            expected: "a number (integer or float) per row".into(),
            columns: fm.column_names(),
        });
    }
    Ok(Some(MARGIN_COLUMN.into()))
}

/// Which layout a preference source has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreferenceFormat {
    /// `prompt`, `chosen`, `rejected` strings.
    Explicit {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    /// HH-RLHF: full `chosen`/`rejected` transcripts, prompt is their shared head.
    Hh { chosen: String, rejected: String },
    /// `chosen`/`rejected` chat messages, with an optional prompt column (messages or string).
    Conversational {
        prompt: Option<(String, ColumnKind)>,
        chosen: String,
        rejected: String,
    },
}

impl PreferenceFormat {
    fn columns(&self) -> Vec<String> {
        match self {
            PreferenceFormat::Explicit {
                prompt,
                chosen,
                rejected,
            } => vec![prompt.clone(), chosen.clone(), rejected.clone()],
            PreferenceFormat::Hh { chosen, rejected } => vec![chosen.clone(), rejected.clone()],
            PreferenceFormat::Conversational {
                prompt,
                chosen,
                rejected,
            } => {
                let mut v: Vec<String> = prompt.iter().map(|(p, _)| p.clone()).collect();
                v.push(chosen.clone());
                v.push(rejected.clone());
                v
            }
        }
    }
}

const EXPECTED: &str = "`chosen` and `rejected` (strings: HH transcripts, or with a string `prompt`; or lists of {role, content} messages, optionally with a `prompt`)";

/// Detects the preference layout of one file from its columns and the overrides.
pub(crate) fn detect_preference(fm: &FileMeta, opts: &StreamOptions) -> Result<PreferenceFormat> {
    let ov = &opts.columns;
    let schema = fm.schema();
    let chosen = ov.chosen.clone().unwrap_or_else(|| "chosen".into());
    let rejected = ov.rejected.clone().unwrap_or_else(|| "rejected".into());
    let missing: Vec<String> = [&chosen, &rejected]
        .into_iter()
        .filter(|c| schema.index_of(c).is_err())
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(DatasetError::MissingColumns {
            path: fm.path.clone(),
            missing,
            found: fm.column_names(),
            expected: EXPECTED.into(),
        });
    }
    let both = [ColumnKind::Text, ColumnKind::Messages];
    let kc = require(&fm.path, schema, &chosen, &both, EXPECTED)?;
    let kr = require(&fm.path, schema, &rejected, &[kc], EXPECTED)?;
    debug_assert_eq!(kc, kr);
    let prompt_name = ov.prompt.clone().unwrap_or_else(|| "prompt".into());
    let has_prompt = schema.index_of(&prompt_name).is_ok();
    if ov.prompt.is_some() && !has_prompt {
        return Err(DatasetError::MissingColumns {
            path: fm.path.clone(),
            missing: vec![prompt_name],
            found: fm.column_names(),
            expected: EXPECTED.into(),
        });
    }
    Ok(match kc {
        ColumnKind::Text if has_prompt => {
            require(
                &fm.path,
                schema,
                &prompt_name,
                &[ColumnKind::Text],
                EXPECTED,
            )?;
            PreferenceFormat::Explicit {
                prompt: prompt_name,
                chosen,
                rejected,
            }
        }
        ColumnKind::Text => PreferenceFormat::Hh { chosen, rejected },
        _ => {
            let prompt = if has_prompt {
                let k = require(&fm.path, schema, &prompt_name, &both, EXPECTED)?;
                Some((prompt_name, k))
            } else {
                None
            };
            PreferenceFormat::Conversational {
                prompt,
                chosen,
                rejected,
            }
        }
    })
}

/// Streams preference pairs from parquet files. Bad rows are skipped and counted in
/// [`PreferenceStream::skips`]; I/O and format errors are yielded as `Err` and end the
/// stream.
pub struct PreferenceStream {
    engine: Engine,
    format: PreferenceFormat,
    template: Option<ChatTemplate>,
    skips: SkipStats,
    /// The `margin` column, when the files have it.
    margin: Option<String>,
}

impl PreferenceStream {
    /// Opens a source: reads every footer, detects the layout on the first file and checks
    /// every other file has the same.
    pub fn open(
        source: &Source,
        opts: StreamOptions,
        chat_template: Option<&ChatTemplate>,
    ) -> Result<Self> {
        let metas = load_metas(source)?;
        let first = metas
            .first()
            .ok_or_else(|| DatasetError::NoFiles(Vec::new()))?;
        let format = detect_preference(first, &opts)?;
        for fm in &metas[1..] {
            let f = detect_preference(fm, &opts)?;
            if f != format {
                return Err(DatasetError::Invalid(format!(
                    "{}: layout {f:?} differs from {}'s {format:?}",
                    fm.path.display(),
                    first.path.display()
                )));
            }
        }
        let margin = detect_margin(first)?;
        for fm in &metas[1..] {
            if detect_margin(fm)? != margin {
                return Err(DatasetError::Invalid(format!(
                    "{}: {} a `{MARGIN_COLUMN}` column but {} {}",
                    fm.path.display(),
                    if margin.is_some() { "lacks" } else { "has" },
                    first.path.display(),
                    if margin.is_some() {
                        "has one"
                    } else {
                        "does not"
                    },
                )));
            }
        }
        if let PreferenceFormat::Conversational { chosen, .. } = &format {
            if chat_template.is_none() {
                return Err(DatasetError::NeedsChatTemplate {
                    path: first.path.clone(),
                    column: chosen.clone(),
                });
            }
        }
        let mut columns = format.columns();
        columns.extend(margin.iter().cloned());
        let engine = Engine::new(metas, &columns, opts)?;
        Ok(PreferenceStream {
            engine,
            format,
            template: chat_template.cloned(),
            skips: SkipStats::default(),
            margin,
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

    /// Position to resume from (after the last row returned).
    pub fn cursor(&self) -> Cursor {
        self.engine.cursor()
    }

    /// Rows skipped so far, by reason.
    pub fn skips(&self) -> &SkipStats {
        &self.skips
    }

    /// The detected layout.
    pub fn format(&self) -> &PreferenceFormat {
        &self.format
    }
}

enum Parsed {
    Pair(String, String, String),
    Skip(SkipReason, String),
}

fn text<'a>(b: &'a RecordBatch, col: &str, row: usize) -> std::result::Result<&'a str, Parsed> {
    match text_at(b, col, row) {
        None => Err(Parsed::Skip(SkipReason::NullField, col.to_string())),
        Some("") => Err(Parsed::Skip(SkipReason::EmptyField, col.to_string())),
        Some(s) => Ok(s),
    }
}

fn msgs(b: &RecordBatch, col: &str, row: usize) -> std::result::Result<Vec<Message>, Parsed> {
    match messages_at(b, col, row) {
        None => Err(Parsed::Skip(SkipReason::NullField, col.to_string())),
        Some(Err(what)) => Err(Parsed::Skip(
            SkipReason::BadMessage,
            format!("{col}: null {what}"),
        )),
        Some(Ok(m)) if m.is_empty() => Err(Parsed::Skip(SkipReason::EmptyField, col.to_string())),
        Some(Ok(m)) => Ok(m),
    }
}

fn parse(
    format: &PreferenceFormat,
    tmpl: Option<&ChatTemplate>,
    b: &RecordBatch,
    row: usize,
) -> std::result::Result<Parsed, Parsed> {
    let parsed = match format {
        PreferenceFormat::Explicit {
            prompt,
            chosen,
            rejected,
        } => Parsed::Pair(
            text(b, prompt, row)?.to_string(),
            text(b, chosen, row)?.to_string(),
            text(b, rejected, row)?.to_string(),
        ),
        PreferenceFormat::Hh { chosen, rejected } => {
            let (c, r) = (text(b, chosen, row)?, text(b, rejected, row)?);
            match split_hh(c, r) {
                Ok((p, c, r)) => Parsed::Pair(p, c, r),
                Err(e) => Parsed::Skip(e.into(), String::new()),
            }
        }
        PreferenceFormat::Conversational {
            prompt,
            chosen,
            rejected,
        } => {
            let p = match prompt {
                None => None,
                Some((col, ColumnKind::Text)) => {
                    Some(vec![Message::new("user", text(b, col, row)?)])
                }
                Some((col, _)) => Some(msgs(b, col, row)?),
            };
            let (c, r) = (msgs(b, chosen, row)?, msgs(b, rejected, row)?);
            let Some(t) = tmpl else {
                return Err(Parsed::Skip(
                    SkipReason::TemplateRejected,
                    "no template".into(),
                ));
            };
            match render_pair(t, p.as_deref(), &c, &r) {
                Ok((p, c, r)) => Parsed::Pair(p, c, r),
                Err(e) => Parsed::Skip(SkipReason::TemplateRejected, e.to_string()),
            }
        }
    };
    if let Parsed::Pair(_, c, r) = &parsed {
        if c.is_empty() || r.is_empty() {
            return Ok(Parsed::Skip(SkipReason::EmptyField, "completion".into()));
        }
        if c == r {
            return Ok(Parsed::Skip(SkipReason::IdenticalPair, String::new()));
        }
    }
    Ok(parsed)
}

impl Iterator for PreferenceStream {
    type Item = Result<PreferencePair>;
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
            let p =
                parse(&self.format, self.template.as_ref(), r.batch, r.row).unwrap_or_else(|e| e);
            let margin = match (&self.margin, &p) {
                (Some(col), Parsed::Pair(..)) => match number_at(r.batch, col, r.row) {
                    Some(v) if v.is_finite() => Some(v),
                    Some(v) => {
                        return Some(Err(DatasetError::Invalid(format!(
                            "{}: `{col}` is {v}, not a finite number",
                            r.id
                        ))))
                    }
                    None => {
                        skips.record(SkipReason::NullField, &r.id, col.clone());
                        continue;
                    }
                },
                _ => None,
            };
            match p {
                Parsed::Pair(prompt, chosen, rejected) => {
                    let pair = PreferencePair {
                        prompt,
                        chosen,
                        rejected,
                        source_row: r.id,
                        margin,
                    };
                    self.engine.yielded();
                    return Some(Ok(pair));
                }
                Parsed::Skip(reason, detail) => skips.record(reason, &r.id, detail),
            }
        }
    }
}
