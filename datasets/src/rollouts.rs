//! Rollouts (generated completions with rewards), written and read back as parquet.

use crate::error::{DatasetError, Result};
use crate::schema::{require, text_at, ColumnKind};
use crate::skip::{SkipReason, SkipStats};
use crate::source::Source;
use crate::stream::{load_metas, Cursor, Engine, StreamOptions};
use arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Float32Builder, Int64Array, ListBuilder, RecordBatch,
    StringArray,
};
use arrow::datatypes::{DataType, Field, Float32Type, Float64Type, Int32Type, Int64Type, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One generated completion and its scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// The prompt text.
    pub prompt: String,
    /// The generated completion.
    pub completion: String,
    /// Scalar reward.
    pub reward: f32,
    /// Group id (completions of the same prompt share it, for GRPO).
    pub group: i64,
    /// Training step that produced it.
    pub step: i64,
    /// Per-token log-probabilities under the policy.
    pub logp: Option<Vec<f32>>,
    /// Per-token log-probabilities under the reference model.
    pub ref_logp: Option<Vec<f32>>,
    /// Advantage.
    pub advantage: Option<f32>,
}

/// The schema rollouts are written with.
pub fn rollout_schema() -> Arc<Schema> {
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    Arc::new(Schema::new(vec![
        Field::new("prompt", DataType::Utf8, false),
        Field::new("completion", DataType::Utf8, false),
        Field::new("reward", DataType::Float32, false),
        Field::new("group", DataType::Int64, false),
        Field::new("step", DataType::Int64, false),
        Field::new("logp", DataType::List(item.clone()), true),
        Field::new("ref_logp", DataType::List(item), true),
        Field::new("advantage", DataType::Float32, true),
    ]))
}

/// Writes rollouts to a parquet file (zstd), buffering `row_group_size` rows per row group.
/// `RolloutWriter::create(path)?.write(&rows)?.finish()?`.
pub struct RolloutWriter {
    path: PathBuf,
    writer: Option<ArrowWriter<std::fs::File>>,
    pending: Vec<Rollout>,
    row_group_size: usize,
}

impl RolloutWriter {
    /// Creates (truncates) the file; 8,192 rows per row group.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        Self::with_row_group_size(path, 8192)
    }

    /// Creates the file with a given row-group size.
    pub fn with_row_group_size(path: impl AsRef<Path>, row_group_size: usize) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::create(&path).map_err(|e| DatasetError::io(&path, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(row_group_size.max(1)))
            .build();
        let writer = ArrowWriter::try_new(file, rollout_schema(), Some(props))
            .map_err(|e| DatasetError::parquet(&path, e))?;
        Ok(RolloutWriter {
            path,
            writer: Some(writer),
            pending: Vec::new(),
            row_group_size: row_group_size.max(1),
        })
    }

    /// Appends rows.
    pub fn write(&mut self, rows: &[Rollout]) -> Result<&mut Self> {
        self.pending.extend_from_slice(rows);
        while self.pending.len() >= self.row_group_size {
            let rest = self.pending.split_off(self.row_group_size);
            let chunk = std::mem::replace(&mut self.pending, rest);
            self.flush_rows(&chunk)?;
        }
        Ok(self)
    }

    fn flush_rows(&mut self, rows: &[Rollout]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let Some(w) = self.writer.as_mut() else {
            return Err(DatasetError::Invalid(format!(
                "{}: rollout writer already finished",
                self.path.display()
            )));
        };
        let list =
            |get: &dyn Fn(&Rollout) -> Option<&Vec<f32>>| -> ArrayRef {
                let mut b = ListBuilder::new(Float32Builder::new())
                    .with_field(Arc::new(Field::new("item", DataType::Float32, true)));
                for r in rows {
                    match get(r) {
                        Some(v) => {
                            b.values().append_slice(v);
                            b.append(true);
                        }
                        None => b.append(false),
                    }
                }
                Arc::new(b.finish())
            };
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.prompt.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.completion.as_str()),
            )),
            Arc::new(Float32Array::from_iter_values(
                rows.iter().map(|r| r.reward),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.group))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.step))),
            list(&|r| r.logp.as_ref()),
            list(&|r| r.ref_logp.as_ref()),
            Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.advantage))),
        ];
        let batch = RecordBatch::try_new(rollout_schema(), cols)
            .map_err(|e| DatasetError::parquet(&self.path, e))?;
        w.write(&batch)
            .map_err(|e| DatasetError::parquet(&self.path, e))?;
        w.flush().map_err(|e| DatasetError::parquet(&self.path, e))
    }

    /// Flushes buffered rows and writes the footer. Idempotent.
    pub fn finish(&mut self) -> Result<()> {
        let rows = std::mem::take(&mut self.pending);
        if self.writer.is_some() {
            self.flush_rows(&rows)?;
        }
        if let Some(w) = self.writer.take() {
            w.close()
                .map_err(|e| DatasetError::parquet(&self.path, e))?;
        }
        Ok(())
    }
}

impl Drop for RolloutWriter {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

const EXPECTED: &str = "prompt, completion (string), reward (float), group, step (int), optional logp, ref_logp (list<float>), advantage (float)";
const OPTIONAL: [&str; 3] = ["logp", "ref_logp", "advantage"];

/// Streams rollouts back (any file with the rollout columns; the optional ones may be absent).
pub struct RolloutStream {
    engine: Engine,
    optional: Vec<String>,
    skips: SkipStats,
}

impl RolloutStream {
    /// Opens a source.
    pub fn open(source: &Source, opts: StreamOptions) -> Result<Self> {
        let metas = load_metas(source)?;
        let mut optional: Option<Vec<String>> = None;
        for fm in &metas {
            let s = fm.schema();
            require(&fm.path, s, "prompt", &[ColumnKind::Text], EXPECTED)?;
            require(&fm.path, s, "completion", &[ColumnKind::Text], EXPECTED)?;
            for (c, ok) in [
                ("reward", is_float as fn(&DataType) -> bool),
                ("group", is_int),
                ("step", is_int),
                ("advantage", is_float),
                ("logp", is_float_list),
                ("ref_logp", is_float_list),
            ] {
                match s.field_with_name(c) {
                    Ok(f) if ok(f.data_type()) => {}
                    Ok(f) => {
                        return Err(DatasetError::MistypedColumn {
                            path: fm.path.clone(),
                            column: c.into(),
                            found: f.data_type().to_string(),
                            expected: EXPECTED.into(),
                            columns: fm.column_names(),
                        })
                    }
                    Err(_) if OPTIONAL.contains(&c) => {}
                    Err(_) => {
                        return Err(DatasetError::MissingColumns {
                            path: fm.path.clone(),
                            missing: vec![c.into()],
                            found: fm.column_names(),
                            expected: EXPECTED.into(),
                        })
                    }
                }
            }
            let present: Vec<String> = OPTIONAL
                .iter()
                .filter(|c| s.index_of(c).is_ok())
                .map(|c| c.to_string())
                .collect();
            // Only optional columns present in every file are read.
            optional = Some(match optional {
                None => present,
                Some(prev) => prev.into_iter().filter(|c| present.contains(c)).collect(),
            });
        }
        let optional = optional.unwrap_or_default();
        let mut cols: Vec<String> = ["prompt", "completion", "reward", "group", "step"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        cols.extend(optional.iter().cloned());
        Ok(RolloutStream {
            engine: Engine::new(metas, &cols, opts)?,
            optional,
            skips: SkipStats::default(),
        })
    }

    /// Opens a source and moves to a saved cursor.
    pub fn resume(source: &Source, opts: StreamOptions, cursor: &Cursor) -> Result<Self> {
        let mut s = Self::open(source, opts)?;
        s.engine.seek(cursor)?;
        Ok(s)
    }

    /// Position to resume from.
    pub fn cursor(&self) -> Cursor {
        self.engine.cursor()
    }

    /// Rows skipped so far (null required fields).
    pub fn skips(&self) -> &SkipStats {
        &self.skips
    }
}

/// Reads a whole rollout file into memory, in order.
pub fn read_rollouts(path: impl AsRef<Path>) -> Result<Vec<Rollout>> {
    RolloutStream::open(&Source::from_file(path.as_ref()), StreamOptions::default())?.collect()
}

fn is_float(d: &DataType) -> bool {
    matches!(d, DataType::Float32 | DataType::Float64)
}
fn is_int(d: &DataType) -> bool {
    matches!(d, DataType::Int32 | DataType::Int64)
}
fn is_float_list(d: &DataType) -> bool {
    matches!(d, DataType::List(f) | DataType::LargeList(f) if is_float(f.data_type()))
}

fn float_at(col: &ArrayRef, row: usize) -> Option<f32> {
    if col.is_null(row) {
        return None;
    }
    match col.data_type() {
        DataType::Float32 => Some(col.as_primitive::<Float32Type>().value(row)),
        DataType::Float64 => Some(col.as_primitive::<Float64Type>().value(row) as f32),
        _ => None,
    }
}
fn int_at(col: &ArrayRef, row: usize) -> Option<i64> {
    if col.is_null(row) {
        return None;
    }
    match col.data_type() {
        DataType::Int64 => Some(col.as_primitive::<Int64Type>().value(row)),
        DataType::Int32 => Some(col.as_primitive::<Int32Type>().value(row) as i64),
        _ => None,
    }
}
fn floats_at(col: &ArrayRef, row: usize) -> Option<Vec<f32>> {
    if col.is_null(row) {
        return None;
    }
    let inner = match col.data_type() {
        DataType::List(_) => col.as_list::<i32>().value(row),
        DataType::LargeList(_) => col.as_list::<i64>().value(row),
        _ => return None,
    };
    Some(
        (0..inner.len())
            .map(|i| float_at(&inner, i).unwrap_or(f32::NAN))
            .collect(),
    )
}

impl Iterator for RolloutStream {
    type Item = Result<Rollout>;
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
            let b = r.batch;
            let col = |n: &str| b.column_by_name(n);
            let req = (
                text_at(b, "prompt", r.row),
                text_at(b, "completion", r.row),
                col("reward").and_then(|c| float_at(c, r.row)),
                col("group").and_then(|c| int_at(c, r.row)),
                col("step").and_then(|c| int_at(c, r.row)),
            );
            let (Some(prompt), Some(completion), Some(reward), Some(group), Some(step)) = req
            else {
                skips.record(
                    SkipReason::NullField,
                    &r.id,
                    "prompt/completion/reward/group/step",
                );
                continue;
            };
            let opt = |n: &str| self.optional.iter().any(|c| c == n);
            let rollout = Rollout {
                prompt: prompt.to_string(),
                completion: completion.to_string(),
                reward,
                group,
                step,
                logp: if opt("logp") {
                    col("logp").and_then(|c| floats_at(c, r.row))
                } else {
                    None
                },
                ref_logp: if opt("ref_logp") {
                    col("ref_logp").and_then(|c| floats_at(c, r.row))
                } else {
                    None
                },
                advantage: if opt("advantage") {
                    col("advantage").and_then(|c| float_at(c, r.row))
                } else {
                    None
                },
            };
            self.engine.yielded();
            return Some(Ok(rollout));
        }
    }
}
