//! Cursor resume: an interrupted, resumed read equals an uninterrupted one, with shuffling,
//! across epoch boundaries and multiple files.

use align_datasets::*;
use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use std::path::Path;
use std::sync::Arc;

/// Writes `files` files with `rows` rows each in row groups of `rg` rows; prompt = "f{i}r{j}".
fn make_files(dir: &Path, files: usize, rows: &[usize], rg: usize) -> Vec<std::path::PathBuf> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt", DataType::Utf8, false),
        Field::new("chosen", DataType::Utf8, false),
        Field::new("rejected", DataType::Utf8, false),
    ]));
    (0..files)
        .map(|i| {
            let path = dir.join(format!("part-{i}.parquet"));
            let f = std::fs::File::create(&path).unwrap();
            let props = WriterProperties::builder()
                .set_max_row_group_row_count(Some(rg))
                .build();
            let mut w = ArrowWriter::try_new(f, schema.clone(), Some(props)).unwrap();
            let n = rows[i % rows.len()];
            let p: Vec<String> = (0..n).map(|j| format!("f{i}r{j}")).collect();
            let c: Vec<String> = (0..n).map(|j| format!("good {j}")).collect();
            // Every 7th row is an identical pair: skipped, but still consumed by the cursor.
            let r: Vec<String> = (0..n)
                .map(|j| {
                    if j % 7 == 3 {
                        format!("good {j}")
                    } else {
                        format!("bad {j}")
                    }
                })
                .collect();
            let b = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(p)),
                    Arc::new(StringArray::from(c)),
                    Arc::new(StringArray::from(r)),
                ],
            )
            .unwrap();
            w.write(&b).unwrap();
            w.close().unwrap();
            path
        })
        .collect()
}

fn take(s: &mut PreferenceStream, n: usize) -> Vec<String> {
    s.by_ref().take(n).map(|p| p.unwrap().prompt).collect()
}

fn check(opts: StreamOptions, total: usize, cuts: &[usize]) {
    let dir = tempfile::tempdir().unwrap();
    let files = make_files(dir.path(), 3, &[50, 23, 0, 61], 8);
    let src = Source::from_paths(&[dir.path()]).unwrap();
    assert_eq!(src.files(), &files[..]);
    let full = take(
        &mut PreferenceStream::open(&src, opts.clone(), None).unwrap(),
        total,
    );
    assert_eq!(full.len(), total);
    let mut got = Vec::new();
    let mut s = PreferenceStream::open(&src, opts.clone(), None).unwrap();
    let mut done = 0;
    for &cut in cuts {
        got.extend(take(&mut s, cut - done));
        done = cut;
        let json = serde_json::to_string(&s.cursor()).unwrap();
        let c: Cursor = serde_json::from_str(&json).unwrap();
        assert_eq!(c, s.cursor());
        s = PreferenceStream::resume(&src, opts.clone(), None, &c).unwrap();
    }
    got.extend(take(&mut s, total - done));
    assert_eq!(got, full);
}

#[test]
fn resume_shuffled_across_epochs_and_files() {
    // 3 files: 50 + 23 + 0 rows, minus identical pairs -> 63 records per epoch.
    let opts = StreamOptions {
        shuffle: true,
        seed: 42,
        shuffle_buffer: 20,
        loop_epochs: true,
        batch_size: 5,
        ..Default::default()
    };
    check(opts.clone(), 300, &[1, 17, 62, 63, 64, 130, 200, 299]);
    // Epochs are reshuffled, but each epoch holds every record once.
    let dir = tempfile::tempdir().unwrap();
    make_files(dir.path(), 3, &[50, 23, 0], 8);
    let src = Source::from_paths(&[dir.path()]).unwrap();
    let mut s = PreferenceStream::open(&src, opts, None).unwrap();
    let e1 = take(&mut s, 63);
    let e2 = take(&mut s, 63);
    assert_ne!(e1, e2);
    let (mut a, mut b) = (e1.clone(), e2.clone());
    a.sort();
    b.sort();
    assert_eq!(a, b);
    a.dedup();
    assert_eq!(a.len(), 63);
    // Still inside the second epoch (epoch index 1) until the next record is read.
    assert_eq!(s.cursor().epoch, 1);
    take(&mut s, 1);
    assert_eq!(s.cursor().epoch, 2);
}

#[test]
fn resume_sequential_and_end_of_data() {
    let opts = StreamOptions {
        batch_size: 3,
        ..Default::default()
    };
    check(opts.clone(), 63, &[5, 6, 40, 62, 63]);
    // Looping without shuffle repeats the same order.
    let opts = StreamOptions {
        loop_epochs: true,
        ..opts
    };
    check(opts, 130, &[63, 64, 127]);
}

#[test]
fn resume_every_position() {
    let opts = StreamOptions {
        shuffle: true,
        seed: 7,
        shuffle_buffer: 9,
        loop_epochs: true,
        batch_size: 4,
        ..Default::default()
    };
    let cuts: Vec<usize> = (1..140).collect();
    check(opts, 140, &cuts);
}

#[test]
fn seed_changes_order_and_cursor_mismatch_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    make_files(dir.path(), 2, &[40], 8);
    let src = Source::from_paths(&[dir.path().join("*.parquet")]).unwrap();
    let o = |seed| StreamOptions {
        shuffle: true,
        seed,
        shuffle_buffer: 16,
        ..Default::default()
    };
    let a = take(&mut PreferenceStream::open(&src, o(1), None).unwrap(), 68);
    let b = take(&mut PreferenceStream::open(&src, o(2), None).unwrap(), 68);
    assert_ne!(a, b);
    let mut s = PreferenceStream::open(&src, o(1), None).unwrap();
    take(&mut s, 10);
    let c = s.cursor();
    let one = Source::from_file(dir.path().join("part-0.parquet"));
    let err = PreferenceStream::resume(&one, o(1), None, &c)
        .err()
        .unwrap();
    assert!(matches!(err, DatasetError::CursorMismatch(_)), "{err}");
}
