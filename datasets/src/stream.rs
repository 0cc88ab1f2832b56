//! The streaming engine shared by all record types: row-group-by-row-group reads,
//! seeded block shuffling, epochs and resumable cursors.

use crate::error::{DatasetError, Result};
use crate::schema::ColumnOverrides;
use crate::source::{RowId, Source};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
};
use parquet::arrow::ProjectionMask;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How a stream walks its files.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamOptions {
    /// Shuffle file order, row-group order and rows (within a buffer). Default false.
    pub shuffle: bool,
    /// Seed for every random choice; the same seed gives the same order.
    pub seed: u64,
    /// Rows held for shuffling: row groups are read until at least this many rows are
    /// buffered, then that block is shuffled and emitted. Memory is bounded by this plus
    /// one row group. Default 10,000.
    pub shuffle_buffer: usize,
    /// Start a new epoch (reshuffled with a new seed) at the end instead of stopping.
    pub loop_epochs: bool,
    /// Column names overriding detection.
    pub columns: ColumnOverrides,
    /// Arrow batch size for decoding. Default 4,096.
    pub batch_size: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            shuffle: false,
            seed: 0,
            shuffle_buffer: 10_000,
            loop_epochs: false,
            columns: ColumnOverrides::default(),
            batch_size: 4096,
        }
    }
}

/// Where a stream stands; store it in a checkpoint and pass it to `resume` to read exactly
/// the rows an uninterrupted stream would have read next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Epoch number (0-based).
    pub epoch: u64,
    /// Position, in this epoch's row-group order, of the row group that starts the current
    /// shuffle block.
    pub unit: usize,
    /// File index (into `Source::files`) of that row group.
    pub file: usize,
    /// Row group index within that file.
    pub row_group: usize,
    /// Rows of the current block already consumed (emitted or skipped).
    pub row: u64,
    /// Seed of the RNG that shuffles the current block (0 when not shuffling).
    pub rng_seed: u64,
    /// Number of files in the source, checked on resume.
    pub num_files: usize,
    /// Total rows in the source, checked on resume.
    pub total_rows: u64,
}

pub(crate) struct FileMeta {
    pub path: PathBuf,
    pub meta: ArrowReaderMetadata,
    rg_rows: Vec<usize>,
    rg_start: Vec<u64>,
}

impl FileMeta {
    pub fn schema(&self) -> &SchemaRef {
        self.meta.schema()
    }
    pub fn column_names(&self) -> Vec<String> {
        self.schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    }
    fn num_rows(&self) -> u64 {
        self.rg_rows.iter().map(|&r| r as u64).sum()
    }
}

/// Reads every file's footer (not its data).
pub(crate) fn load_metas(source: &Source) -> Result<Vec<FileMeta>> {
    source
        .files()
        .iter()
        .map(|path| {
            let file = std::fs::File::open(path).map_err(|e| DatasetError::io(path, e))?;
            let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
                .map_err(|e| DatasetError::parquet(path, e))?;
            let rg_rows: Vec<usize> = meta
                .metadata()
                .row_groups()
                .iter()
                .map(|rg| rg.num_rows().max(0) as usize)
                .collect();
            let mut rg_start = Vec::with_capacity(rg_rows.len());
            let mut acc = 0u64;
            for &r in &rg_rows {
                rg_start.push(acc);
                acc += r as u64;
            }
            Ok(FileMeta {
                path: path.clone(),
                meta,
                rg_rows,
                rg_start,
            })
        })
        .collect()
}

/// splitmix64 finaliser, to derive independent seeds.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

enum Chunk {
    Seq {
        reader: ParquetRecordBatchReader,
        file: usize,
        batch: Option<RecordBatch>,
        in_batch: usize,
        next_file_row: u64,
    },
    Shuf {
        /// (batch, file index, file row of its first row)
        batches: Vec<(RecordBatch, usize, u64)>,
        order: Vec<(u32, u32)>,
        pos: usize,
    },
}

/// One row of the current batch, borrowed from the engine.
pub(crate) struct RowRef<'a> {
    pub batch: &'a RecordBatch,
    pub row: usize,
    pub id: RowId,
}

pub(crate) struct Engine {
    files: Vec<FileMeta>,
    masks: Vec<ProjectionMask>,
    opts: StreamOptions,
    total_rows: u64,
    epoch: u64,
    order: Vec<(usize, usize)>,
    chunk_start: usize,
    chunk_end: usize,
    consumed: u64,
    rng_seed: u64,
    /// Rows handed out since the stream last yielded a usable record (see [`Engine::yielded`]).
    since_yield: u64,
    /// Rows handed out since the stream was opened or resumed.
    handed: u64,
    chunk: Option<Chunk>,
    done: bool,
}

impl Engine {
    /// `columns`: top-level column names to read (must exist in every file).
    pub fn new(files: Vec<FileMeta>, columns: &[String], opts: StreamOptions) -> Result<Self> {
        let mut masks = Vec::with_capacity(files.len());
        for f in &files {
            let mut idx = Vec::new();
            for c in columns {
                let i = f
                    .schema()
                    .index_of(c)
                    .map_err(|_| DatasetError::MissingColumns {
                        path: f.path.clone(),
                        missing: vec![c.clone()],
                        found: f.column_names(),
                        expected: format!("{columns:?}"),
                    })?;
                idx.push(i);
            }
            masks.push(ProjectionMask::roots(f.meta.parquet_schema(), idx));
        }
        let total_rows = files.iter().map(|f| f.num_rows()).sum();
        let mut e = Engine {
            files,
            masks,
            opts,
            total_rows,
            epoch: 0,
            order: Vec::new(),
            chunk_start: 0,
            chunk_end: 0,
            consumed: 0,
            rng_seed: 0,
            since_yield: 0,
            handed: 0,
            chunk: None,
            done: false,
        };
        e.order = e.epoch_order(0);
        e.rng_seed = e.chunk_seed(0);
        Ok(e)
    }

    fn epoch_order(&self, epoch: u64) -> Vec<(usize, usize)> {
        let mut fidx: Vec<usize> = (0..self.files.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.opts.seed, epoch));
        if self.opts.shuffle {
            fidx.shuffle(&mut rng);
        }
        let mut out = Vec::new();
        for f in fidx {
            let mut rgs: Vec<usize> = (0..self.files[f].rg_rows.len())
                .filter(|&r| self.files[f].rg_rows[r] > 0)
                .collect();
            if self.opts.shuffle {
                rgs.shuffle(&mut rng);
            }
            out.extend(rgs.into_iter().map(|r| (f, r)));
        }
        out
    }

    fn chunk_seed(&self, unit: usize) -> u64 {
        if self.opts.shuffle {
            mix(mix(self.opts.seed ^ 0x5eed, self.epoch), unit as u64)
        } else {
            0
        }
    }

    pub fn cursor(&self) -> Cursor {
        let (file, row_group) = self.order.get(self.chunk_start).copied().unwrap_or((0, 0));
        Cursor {
            epoch: self.epoch,
            unit: self.chunk_start,
            file,
            row_group,
            row: self.consumed,
            rng_seed: self.rng_seed,
            num_files: self.files.len(),
            total_rows: self.total_rows,
        }
    }

    pub fn seek(&mut self, c: &Cursor) -> Result<()> {
        if c.num_files != self.files.len() || c.total_rows != self.total_rows {
            return Err(DatasetError::CursorMismatch(format!(
                "cursor was taken on {} files / {} rows, source has {} files / {} rows",
                c.num_files,
                c.total_rows,
                self.files.len(),
                self.total_rows
            )));
        }
        self.epoch = c.epoch;
        self.order = self.epoch_order(c.epoch);
        if c.unit > self.order.len() {
            return Err(DatasetError::CursorMismatch(format!(
                "unit {} beyond {} row groups",
                c.unit,
                self.order.len()
            )));
        }
        if let Some(&(f, rg)) = self.order.get(c.unit) {
            if (f, rg) != (c.file, c.row_group) {
                return Err(DatasetError::CursorMismatch(format!(
                    "cursor expects file {} row group {} at position {}, the seeded order has file {f} row group {rg} (different seed or shuffle setting?)",
                    c.file, c.row_group, c.unit
                )));
            }
        }
        self.chunk_start = c.unit;
        self.consumed = c.row;
        self.rng_seed = c.rng_seed;
        self.chunk = None;
        self.done = false;
        Ok(())
    }

    fn open_unit(&self, unit: usize, skip: usize) -> Result<ParquetRecordBatchReader> {
        let (f, rg) = self.order[unit];
        let fm = &self.files[f];
        let file = std::fs::File::open(&fm.path).map_err(|e| DatasetError::io(&fm.path, e))?;
        let mut b = ParquetRecordBatchReaderBuilder::new_with_metadata(file, fm.meta.clone())
            .with_row_groups(vec![rg])
            .with_projection(self.masks[f].clone())
            .with_batch_size(self.opts.batch_size.max(1));
        if skip > 0 {
            let n = fm.rg_rows[rg];
            let skip = skip.min(n);
            b = b.with_row_selection(RowSelection::from(vec![
                RowSelector::skip(skip),
                RowSelector::select(n - skip),
            ]));
        }
        b.build().map_err(|e| DatasetError::parquet(&fm.path, e))
    }

    fn load_chunk(&mut self) -> Result<()> {
        let start = self.chunk_start;
        if !self.opts.shuffle {
            let (f, rg) = self.order[start];
            let reader = self.open_unit(start, self.consumed as usize)?;
            self.chunk_end = start + 1;
            self.chunk = Some(Chunk::Seq {
                reader,
                file: f,
                batch: None,
                in_batch: 0,
                next_file_row: self.files[f].rg_start[rg] + self.consumed,
            });
            return Ok(());
        }
        let mut batches = Vec::new();
        let mut rows = 0usize;
        let mut unit = start;
        while unit < self.order.len() && (unit == start || rows < self.opts.shuffle_buffer) {
            let (f, rg) = self.order[unit];
            let mut file_row = self.files[f].rg_start[rg];
            let mut reader = self.open_unit(unit, 0)?;
            while let Some(b) = next_batch(&mut reader) {
                let b = b.map_err(|e| DatasetError::parquet(&self.files[f].path, e))?;
                let n = b.num_rows();
                if n > 0 {
                    batches.push((b, f, file_row));
                }
                file_row += n as u64;
                rows += n;
            }
            unit += 1;
        }
        let mut order: Vec<(u32, u32)> = Vec::with_capacity(rows);
        for (bi, (b, _, _)) in batches.iter().enumerate() {
            order.extend((0..b.num_rows()).map(|r| (bi as u32, r as u32)));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.rng_seed);
        order.shuffle(&mut rng);
        self.chunk_end = unit;
        self.chunk = Some(Chunk::Shuf {
            batches,
            order,
            pos: self.consumed as usize,
        });
        Ok(())
    }

    /// Moves to the block after the current one; returns false at the very end.
    fn advance(&mut self) -> bool {
        self.chunk = None;
        self.chunk_start = self.chunk_end;
        self.consumed = 0;
        if self.chunk_start >= self.order.len() {
            if self.opts.loop_epochs && self.total_rows > 0 {
                self.epoch += 1;
                self.order = self.epoch_order(self.epoch);
                self.chunk_start = 0;
            } else {
                self.done = true;
                return false;
            }
        }
        self.rng_seed = self.chunk_seed(self.chunk_start);
        true
    }

    /// The next raw row, or None at the end. After an error the stream ends.
    /// Whether the next row is still within the first pass over the source since the stream
    /// was opened: skip counts describe one pass, not the sum over repeated epochs.
    pub fn next_in_first_pass(&self) -> bool {
        self.handed < self.total_rows
    }

    /// The stream built a usable record from the last row (resets the no-progress count).
    pub fn yielded(&mut self) {
        self.since_yield = 0;
    }

    pub fn next_row(&mut self) -> Option<Result<RowRef<'_>>> {
        // A looping stream whose every row is skipped would spin forever: a whole pass over
        // the source without one usable record ends it with an error instead.
        self.since_yield += 1;
        self.handed += 1;
        if self.opts.loop_epochs && self.total_rows > 0 && self.since_yield > self.total_rows {
            self.done = true;
            return Some(Err(DatasetError::NoUsableRows {
                rows: self.total_rows,
            }));
        }
        loop {
            if self.done {
                return None;
            }
            if self.chunk_start >= self.order.len() {
                // Empty source or cursor at the end of an epoch.
                self.chunk_end = self.chunk_start;
                if !self.advance() {
                    return None;
                }
                continue;
            }
            if self.chunk.is_none() {
                if let Err(e) = self.load_chunk() {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            // Decide whether the chunk has a row left (needs a mutable borrow for Seq).
            let has_row = match self.chunk.as_mut() {
                Some(Chunk::Seq {
                    reader,
                    file,
                    batch,
                    in_batch,
                    ..
                }) => loop {
                    if let Some(b) = batch {
                        if *in_batch < b.num_rows() {
                            break Ok(true);
                        }
                    }
                    match next_batch(reader) {
                        None => break Ok(false),
                        Some(Ok(b)) => {
                            *batch = Some(b);
                            *in_batch = 0;
                        }
                        Some(Err(e)) => {
                            break Err(DatasetError::parquet(&self.files[*file].path, e))
                        }
                    }
                },
                Some(Chunk::Shuf { order, pos, .. }) => Ok(*pos < order.len()),
                None => Ok(false),
            };
            match has_row {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(false) => {
                    if !self.advance() {
                        return None;
                    }
                    continue;
                }
                Ok(true) => {}
            }
            self.consumed += 1;
            let files = &self.files;
            return match self.chunk.as_mut() {
                Some(Chunk::Seq {
                    file,
                    batch: Some(b),
                    in_batch,
                    next_file_row,
                    ..
                }) => {
                    let row = *in_batch;
                    *in_batch += 1;
                    let id = RowId {
                        file: files[*file].path.clone(),
                        row: *next_file_row,
                    };
                    *next_file_row += 1;
                    Some(Ok(RowRef { batch: b, row, id }))
                }
                Some(Chunk::Shuf {
                    batches,
                    order,
                    pos,
                }) => {
                    let (bi, r) = order[*pos];
                    *pos += 1;
                    let (b, f, start) = &batches[bi as usize];
                    let id = RowId {
                        file: files[*f].path.clone(),
                        row: start + r as u64,
                    };
                    Some(Ok(RowRef {
                        batch: b,
                        row: r as usize,
                        id,
                    }))
                }
                _ => None,
            };
        }
    }
}

thread_local! {
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The next decoded batch of a reader. The parquet decoder panics on some corrupt pages
/// (parquet 60: definition levels past the end of their buffer, found by
/// `tests/fuzz.rs`); such a panic becomes an error for the file (the stream then ends),
/// and its message is kept off stderr.
fn next_batch(reader: &mut ParquetRecordBatchReader) -> Option<Result<RecordBatch, String>> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info)
            }
        }));
    });
    QUIET_PANICS.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.next()));
    QUIET_PANICS.with(|q| q.set(false));
    match r {
        Ok(None) => None,
        Ok(Some(Ok(b))) => Some(Ok(b)),
        Ok(Some(Err(e))) => Some(Err(e.to_string())),
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Some(Err(format!("corrupt data page ({what})")))
        }
    }
}
