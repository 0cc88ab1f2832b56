//! PPO rollouts (`align ppo`'s `rollouts.parquet`): one row per sampled completion with its
//! score and the per-token quantities PPO trained on (values, advantages, returns, log-probs
//! of the policy and the reference), written with zstd and read back whole.
//!
//! Columns: `step` (int64: the optimizer step whose rollout batch it was), `prompt`,
//! `completion` (string), `score` (float32: the score the rewards used, after normalisation,
//! the missing-EOS penalty and clipping), `raw_score` (float32: as the reward gave it),
//! `values`, `advantages`, `returns`, `logp`, `ref_logp` (list<float32>, one per completion
//! token).

use crate::error::{DatasetError, Result};
use arrow::array::{
    ArrayRef, AsArray, Float32Array, Float32Builder, Int64Array, ListBuilder, RecordBatch,
    StringArray,
};
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One PPO rollout row.
#[derive(Debug, Clone, PartialEq)]
pub struct PpoRollout {
    pub step: i64,
    pub prompt: String,
    pub completion: String,
    pub score: f32,
    pub raw_score: f32,
    pub values: Vec<f32>,
    pub advantages: Vec<f32>,
    pub returns: Vec<f32>,
    pub logp: Vec<f32>,
    pub ref_logp: Vec<f32>,
}

const LISTS: [&str; 5] = ["values", "advantages", "returns", "logp", "ref_logp"];

/// The schema PPO rollouts are written with.
pub fn ppo_rollout_schema() -> Arc<Schema> {
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let mut fields = vec![
        Field::new("step", DataType::Int64, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("completion", DataType::Utf8, false),
        Field::new("score", DataType::Float32, false),
        Field::new("raw_score", DataType::Float32, false),
    ];
    for n in LISTS {
        fields.push(Field::new(n, DataType::List(item.clone()), false));
    }
    Arc::new(Schema::new(fields))
}

/// Writes PPO rollouts; every [`PpoRolloutWriter::write`] is one row group, flushed to the
/// file at once (a kill loses the footer, not the rows of a finished file; callers rewrite the
/// file at checkpoints, see `align ppo`).
pub struct PpoRolloutWriter {
    path: PathBuf,
    writer: Option<ArrowWriter<std::fs::File>>,
}

impl PpoRolloutWriter {
    /// Creates (truncates) the file.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::create(&path).map_err(|e| DatasetError::io(&path, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let writer = ArrowWriter::try_new(file, ppo_rollout_schema(), Some(props))
            .map_err(|e| DatasetError::parquet(&path, e))?;
        Ok(PpoRolloutWriter {
            path,
            writer: Some(writer),
        })
    }

    /// Appends rows as one row group.
    pub fn write(&mut self, rows: &[PpoRollout]) -> Result<()> {
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
            |get: &dyn Fn(&PpoRollout) -> &Vec<f32>| -> ArrayRef {
                let mut b = ListBuilder::new(Float32Builder::new())
                    .with_field(Arc::new(Field::new("item", DataType::Float32, true)));
                for r in rows {
                    b.values().append_slice(get(r));
                    b.append(true);
                }
                Arc::new(b.finish())
            };
        let cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.step))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.prompt.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.completion.as_str()),
            )),
            Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.score))),
            Arc::new(Float32Array::from_iter_values(
                rows.iter().map(|r| r.raw_score),
            )),
            list(&|r| &r.values),
            list(&|r| &r.advantages),
            list(&|r| &r.returns),
            list(&|r| &r.logp),
            list(&|r| &r.ref_logp),
        ];
        let batch = RecordBatch::try_new(ppo_rollout_schema(), cols)
            .map_err(|e| DatasetError::parquet(&self.path, e))?;
        w.write(&batch)
            .map_err(|e| DatasetError::parquet(&self.path, e))?;
        w.flush().map_err(|e| DatasetError::parquet(&self.path, e))
    }

    /// Writes the footer. Idempotent.
    pub fn finish(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            w.close()
                .map_err(|e| DatasetError::parquet(&self.path, e))?;
        }
        Ok(())
    }
}

impl Drop for PpoRolloutWriter {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Reads a whole PPO rollout file, in order. Errors name the file and the missing or
/// mistyped column.
pub fn read_ppo_rollouts(path: impl AsRef<Path>) -> Result<Vec<PpoRollout>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| DatasetError::parquet(path, e))?
        .build()
        .map_err(|e| DatasetError::parquet(path, e))?;
    let mut out = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| DatasetError::parquet(path, e))?;
        let col = |n: &str| {
            b.column_by_name(n).cloned().ok_or_else(|| {
                DatasetError::Invalid(format!(
                    "{}: no `{n}` column (not a rollout file of align ppo)",
                    path.display()
                ))
            })
        };
        let bad = |n: &str| {
            DatasetError::Invalid(format!(
                "{}: column `{n}` has the wrong type for align ppo rollouts",
                path.display()
            ))
        };
        let step = col("step")?;
        let step = step
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| bad("step"))?;
        let prompt = col("prompt")?;
        let prompt = prompt.as_string_opt::<i32>().ok_or_else(|| bad("prompt"))?;
        let completion = col("completion")?;
        let completion = completion
            .as_string_opt::<i32>()
            .ok_or_else(|| bad("completion"))?;
        let score = col("score")?;
        let score = score
            .as_primitive_opt::<Float32Type>()
            .ok_or_else(|| bad("score"))?;
        let raw = col("raw_score")?;
        let raw = raw
            .as_primitive_opt::<Float32Type>()
            .ok_or_else(|| bad("raw_score"))?;
        let lists: Vec<ArrayRef> = LISTS.iter().map(|n| col(n)).collect::<Result<_>>()?;
        let list_at = |k: usize, row: usize| -> Result<Vec<f32>> {
            let l = lists[k].as_list_opt::<i32>().ok_or_else(|| bad(LISTS[k]))?;
            let inner = l.value(row);
            let v = inner
                .as_primitive_opt::<Float32Type>()
                .ok_or_else(|| bad(LISTS[k]))?;
            Ok(v.values().to_vec())
        };
        for row in 0..b.num_rows() {
            out.push(PpoRollout {
                step: step.value(row),
                prompt: prompt.value(row).to_string(),
                completion: completion.value(row).to_string(),
                score: score.value(row),
                raw_score: raw.value(row),
                values: list_at(0, row)?,
                advantages: list_at(1, row)?,
                returns: list_at(2, row)?,
                logp: list_at(3, row)?,
                ref_logp: list_at(4, row)?,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: i64, n: usize) -> PpoRollout {
        PpoRollout {
            step,
            prompt: format!("p{step}"),
            completion: "ü completion".into(),
            score: step as f32 * 0.5,
            raw_score: -1.0,
            values: (0..n).map(|i| i as f32).collect(),
            advantages: vec![0.25; n],
            returns: vec![1.5; n],
            logp: vec![-0.1; n],
            ref_logp: vec![-0.2; n],
        }
    }

    #[test]
    fn rows_round_trip_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("r.parquet");
        let rows = vec![row(0, 3), row(0, 1), row(4, 5)];
        let mut w = PpoRolloutWriter::create(&p).unwrap();
        w.write(&rows[..2]).unwrap();
        w.write(&rows[2..]).unwrap();
        w.write(&[]).unwrap();
        w.finish().unwrap();
        w.finish().unwrap();
        assert_eq!(read_ppo_rollouts(&p).unwrap(), rows);
    }

    #[test]
    fn a_grpo_rollout_file_is_refused_with_the_missing_column() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("g.parquet");
        let mut w = crate::RolloutWriter::create(&p).unwrap();
        w.write(&[crate::Rollout {
            prompt: "a".into(),
            completion: "b".into(),
            reward: 1.0,
            group: 0,
            step: 0,
            logp: None,
            ref_logp: None,
            advantage: None,
        }])
        .unwrap();
        w.finish().unwrap();
        let e = read_ppo_rollouts(&p).unwrap_err().to_string();
        assert!(e.contains("score") && e.contains("g.parquet"), "{e}");
    }
}
