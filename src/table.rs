//! A small streaming parquet reader for text and chat-message columns (`align sft` and
//! `align tokenizer train`); what a column holds is decided by the datasets crate's
//! [`column_kind`], the same detection every command uses.

use crate::error::{Error, Result};
use align_datasets::{column_kind, ColumnKind, Message};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Text(String),
    Messages(Vec<Message>),
    Other,
}

fn text_in(col: &ArrayRef, row: usize) -> Option<String> {
    if row >= col.len() || col.is_null(row) {
        return None;
    }
    match col.data_type() {
        DataType::Utf8 => Some(col.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Some(col.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Some(col.as_string_view().value(row).to_string()),
        _ => None,
    }
}

/// Reads one cell of a column (text, chat messages, null, or something else).
pub fn cell(col: &ArrayRef, row: usize) -> Cell {
    if row >= col.len() || col.is_null(row) {
        return Cell::Null;
    }
    match column_kind(col.data_type()) {
        ColumnKind::Text => text_in(col, row).map(Cell::Text).unwrap_or(Cell::Null),
        ColumnKind::Messages => {
            let inner: ArrayRef = match col.data_type() {
                DataType::List(_) => col.as_list::<i32>().value(row),
                DataType::LargeList(_) => col.as_list::<i64>().value(row),
                _ => return Cell::Other,
            };
            let Some(s) = inner.as_struct_opt() else {
                return Cell::Other;
            };
            let (Some(role), Some(content)) =
                (s.column_by_name("role"), s.column_by_name("content"))
            else {
                return Cell::Other;
            };
            let mut msgs = Vec::with_capacity(s.len());
            for i in 0..s.len() {
                match (text_in(role, i), text_in(content, i)) {
                    (Some(r), Some(c)) => msgs.push(Message::new(r, c)),
                    _ => return Cell::Other,
                }
            }
            Cell::Messages(msgs)
        }
        ColumnKind::Scalar | ColumnKind::Other => Cell::Other,
    }
}

/// A parquet file read batch by batch, restricted to some top-level columns.
pub struct ParquetTable {
    pub path: PathBuf,
    schema: arrow::datatypes::SchemaRef,
    reader: Option<ParquetRecordBatchReader>,
    /// File row index of the first row of the next batch.
    pub row_base: usize,
}

impl ParquetTable {
    /// Opens `path` reading only `columns` (which must exist); with no columns, only the
    /// schema is read (for probing).
    pub fn open(path: &Path, columns: &[String]) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| {
            Error::Msg(format!(
                "{}: not a readable parquet file: {e}",
                path.display()
            ))
        })?;
        let schema = b.schema().clone();
        let reader = if columns.is_empty() {
            None
        } else {
            let mut idx = Vec::new();
            for c in columns {
                let i = schema.index_of(c).map_err(|_| {
                    Error::Msg(format!(
                        "{}: no column `{c}` (columns: {})",
                        path.display(),
                        schema
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                idx.push(i);
            }
            let mask = ProjectionMask::roots(b.parquet_schema(), idx);
            Some(
                b.with_projection(mask)
                    .with_batch_size(1024)
                    .build()
                    .map_err(|e| Error::Msg(format!("{}: reading: {e}", path.display())))?,
            )
        };
        Ok(ParquetTable {
            path: path.to_path_buf(),
            schema,
            reader,
            row_base: 0,
        })
    }

    pub fn column_names(&self) -> Vec<String> {
        self.schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    }

    pub fn kind(&self, column: &str) -> Option<ColumnKind> {
        self.schema
            .field_with_name(column)
            .ok()
            .map(|f| column_kind(f.data_type()))
    }

    /// Every string or chat-message column, in schema order.
    pub fn text_like_columns(&self) -> Vec<String> {
        self.schema
            .fields()
            .iter()
            .filter(|f| {
                matches!(
                    column_kind(f.data_type()),
                    ColumnKind::Text | ColumnKind::Messages
                )
            })
            .map(|f| f.name().clone())
            .collect()
    }

    /// The next record batch, or `None` at the end of the file.
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        let Some(r) = self.reader.as_mut() else {
            return Ok(None);
        };
        match r.next() {
            None => Ok(None),
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => Err(Error::Msg(format!(
                "{}: reading rows from {}: {e}",
                self.path.display(),
                self.row_base
            ))),
        }
    }
}
