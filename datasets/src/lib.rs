//! Streaming parquet datasets.
