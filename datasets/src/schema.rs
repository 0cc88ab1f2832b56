//! Column detection, overrides and typed cell access.

use crate::chat::Message;
use crate::error::{DatasetError, Result};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;

/// Column names that override detection. `None` means "use the standard name".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnOverrides {
    /// Prompt column (default `prompt`, or `question` for prompt sets).
    pub prompt: Option<String>,
    /// Chosen column (default `chosen`).
    pub chosen: Option<String>,
    /// Rejected column (default `rejected`).
    pub rejected: Option<String>,
    /// Reference columns for prompt sets (default: every other scalar column).
    pub refs: Option<Vec<String>>,
}

/// What a column holds, as far as this crate cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// utf8, large_utf8 or utf8_view.
    Text,
    /// list of struct{role: string, content: string}.
    Messages,
    /// integers, floats, booleans.
    Scalar,
    /// anything else.
    Other,
}

/// Classifies an arrow type.
pub fn column_kind(dt: &DataType) -> ColumnKind {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => ColumnKind::Text,
        DataType::List(f) | DataType::LargeList(f) | DataType::ListView(f) => match f.data_type() {
            DataType::Struct(fields) => {
                let has = |n: &str| {
                    fields
                        .iter()
                        .any(|x| x.name() == n && column_kind(x.data_type()) == ColumnKind::Text)
                };
                if has("role") && has("content") {
                    ColumnKind::Messages
                } else {
                    ColumnKind::Other
                }
            }
            _ => ColumnKind::Other,
        },
        DataType::Boolean
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Float16
        | DataType::Float32
        | DataType::Float64 => ColumnKind::Scalar,
        _ => ColumnKind::Other,
    }
}

pub(crate) fn names(schema: &Schema) -> Vec<String> {
    schema.fields().iter().map(|f| f.name().clone()).collect()
}

pub(crate) fn field<'a>(schema: &'a Schema, name: &str) -> Option<&'a Field> {
    schema
        .fields()
        .iter()
        .find(|f| f.name() == name)
        .map(|f| f.as_ref())
}

/// Checks that `column` exists with one of the `allowed` kinds; returns its kind.
pub(crate) fn require(
    path: &Path,
    schema: &Schema,
    column: &str,
    allowed: &[ColumnKind],
    expected: &str,
) -> Result<ColumnKind> {
    let Some(f) = field(schema, column) else {
        return Err(DatasetError::MissingColumns {
            path: path.to_path_buf(),
            missing: vec![column.to_string()],
            found: names(schema),
            expected: expected.to_string(),
        });
    };
    let k = column_kind(f.data_type());
    if allowed.contains(&k) {
        Ok(k)
    } else {
        Err(DatasetError::MistypedColumn {
            path: path.to_path_buf(),
            column: column.to_string(),
            found: f.data_type().to_string(),
            expected: allowed
                .iter()
                .map(|k| match k {
                    ColumnKind::Text => "string",
                    ColumnKind::Messages => "list<struct<role: string, content: string>>",
                    ColumnKind::Scalar => "number or bool",
                    ColumnKind::Other => "other",
                })
                .collect::<Vec<_>>()
                .join(" or "),
            columns: names(schema),
        })
    }
}

/// A cell's value: `Ok(None)` for null.
pub(crate) fn text_at<'a>(batch: &'a RecordBatch, column: &str, row: usize) -> Option<&'a str> {
    let col = batch.column_by_name(column)?;
    text_in(col, row)
}

fn text_in(col: &ArrayRef, row: usize) -> Option<&str> {
    if row >= col.len() || col.is_null(row) {
        return None;
    }
    match col.data_type() {
        DataType::Utf8 => Some(col.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Some(col.as_string::<i64>().value(row)),
        DataType::Utf8View => Some(col.as_string_view().value(row)),
        _ => None,
    }
}

/// Chat messages in a list<struct{role, content}> cell. `None` for a null cell; messages
/// with a null role or content make the whole cell `Some(Err(field))`.
pub(crate) fn messages_at(
    batch: &RecordBatch,
    column: &str,
    row: usize,
) -> Option<std::result::Result<Vec<Message>, &'static str>> {
    let col = batch.column_by_name(column)?;
    if row >= col.len() || col.is_null(row) {
        return None;
    }
    let inner: ArrayRef = match col.data_type() {
        DataType::List(_) => col.as_list::<i32>().value(row),
        DataType::LargeList(_) => col.as_list::<i64>().value(row),
        DataType::ListView(_) => col.as_list_view::<i32>().value(row),
        _ => return None,
    };
    let s = inner.as_struct_opt()?;
    let role = s.column_by_name("role")?;
    let content = s.column_by_name("content")?;
    let mut out = Vec::with_capacity(s.len());
    for i in 0..s.len() {
        if s.is_null(i) {
            return Some(Err("message"));
        }
        let Some(r) = text_in(role, i) else {
            return Some(Err("role"));
        };
        let Some(c) = text_in(content, i) else {
            return Some(Err("content"));
        };
        out.push(Message {
            role: r.to_string(),
            content: c.to_string(),
        });
    }
    Some(Ok(out))
}

/// A numeric cell as f64 (`None` for null or a non-numeric column).
pub(crate) fn number_at(batch: &RecordBatch, column: &str, row: usize) -> Option<f64> {
    use arrow::datatypes::*;
    let col = batch.column_by_name(column)?;
    if row >= col.len() || col.is_null(row) {
        return None;
    }
    Some(match col.data_type() {
        DataType::Int8 => col.as_primitive::<Int8Type>().value(row) as f64,
        DataType::Int16 => col.as_primitive::<Int16Type>().value(row) as f64,
        DataType::Int32 => col.as_primitive::<Int32Type>().value(row) as f64,
        DataType::Int64 => col.as_primitive::<Int64Type>().value(row) as f64,
        DataType::UInt8 => col.as_primitive::<UInt8Type>().value(row) as f64,
        DataType::UInt16 => col.as_primitive::<UInt16Type>().value(row) as f64,
        DataType::UInt32 => col.as_primitive::<UInt32Type>().value(row) as f64,
        DataType::UInt64 => col.as_primitive::<UInt64Type>().value(row) as f64,
        DataType::Float16 => col.as_primitive::<Float16Type>().value(row).to_f64(),
        DataType::Float32 => col.as_primitive::<Float32Type>().value(row) as f64,
        DataType::Float64 => col.as_primitive::<Float64Type>().value(row),
        _ => return None,
    })
}

/// A scalar or text cell rendered as a string (`None` for null).
pub(crate) fn scalar_string_at(batch: &RecordBatch, column: &str, row: usize) -> Option<String> {
    use arrow::datatypes::*;
    let col = batch.column_by_name(column)?;
    if row >= col.len() || col.is_null(row) {
        return None;
    }
    Some(match col.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => text_in(col, row)?.to_string(),
        DataType::Boolean => col.as_boolean().value(row).to_string(),
        DataType::Int8 => col.as_primitive::<Int8Type>().value(row).to_string(),
        DataType::Int16 => col.as_primitive::<Int16Type>().value(row).to_string(),
        DataType::Int32 => col.as_primitive::<Int32Type>().value(row).to_string(),
        DataType::Int64 => col.as_primitive::<Int64Type>().value(row).to_string(),
        DataType::UInt8 => col.as_primitive::<UInt8Type>().value(row).to_string(),
        DataType::UInt16 => col.as_primitive::<UInt16Type>().value(row).to_string(),
        DataType::UInt32 => col.as_primitive::<UInt32Type>().value(row).to_string(),
        DataType::UInt64 => col.as_primitive::<UInt64Type>().value(row).to_string(),
        DataType::Float16 => col.as_primitive::<Float16Type>().value(row).to_string(),
        DataType::Float32 => col.as_primitive::<Float32Type>().value(row).to_string(),
        DataType::Float64 => col.as_primitive::<Float64Type>().value(row).to_string(),
        _ => return None,
    })
}
