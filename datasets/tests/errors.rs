//! Bad input: missing/mistyped columns, corrupt files, skipped rows; rollouts round trip;
//! schema detection fuzzed with proptest.

use align_datasets::*;
use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn write(path: &Path, cols: Vec<(&str, ArrayRef)>) {
    let schema = Arc::new(Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let b =
        RecordBatch::try_new(schema.clone(), cols.into_iter().map(|(_, a)| a).collect()).unwrap();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();
}

fn strs(v: &[Option<&str>]) -> ArrayRef {
    Arc::new(StringArray::from(v.to_vec()))
}

fn open(p: &Path) -> Result<PreferenceStream> {
    PreferenceStream::open(&Source::from_file(p), StreamOptions::default(), None)
}

#[test]
fn missing_and_mistyped_columns_name_file_and_columns() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd.parquet");
    write(
        &p,
        vec![
            ("question", strs(&[Some("a")])),
            ("good", strs(&[Some("b")])),
        ],
    );
    let msg = open(&p).err().unwrap().to_string();
    for want in ["odd.parquet", "question", "good", "chosen", "rejected"] {
        assert!(msg.contains(want), "{want} not in: {msg}");
    }
    let p2 = dir.path().join("typed.parquet");
    write(
        &p2,
        vec![
            ("chosen", strs(&[Some("a")])),
            (
                "rejected",
                Arc::new(Int64Array::from(vec![1i64])) as ArrayRef,
            ),
        ],
    );
    let err = open(&p2).err().unwrap();
    assert!(matches!(err, DatasetError::MistypedColumn { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("typed.parquet") && msg.contains("rejected") && msg.contains("Int64"),
        "{msg}"
    );
    // Overrides name the columns.
    let opts = StreamOptions {
        columns: ColumnOverrides {
            prompt: Some("question".into()),
            chosen: Some("good".into()),
            rejected: Some("question".into()),
            refs: None,
        },
        ..Default::default()
    };
    let mut s = PreferenceStream::open(&Source::from_file(&p), opts, None).unwrap();
    assert!(s.next().unwrap().is_ok());
    // A named override column that does not exist.
    let opts = StreamOptions {
        columns: ColumnOverrides {
            prompt: Some("nope".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = PromptStream::open(&Source::from_file(&p), opts, None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn corrupt_and_non_parquet_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("notes.parquet");
    std::fs::write(&txt, "this is not parquet at all").unwrap();
    let err = open(&txt).err().unwrap();
    assert!(
        matches!(err, DatasetError::Parquet { .. }) && err.to_string().contains("notes.parquet"),
        "{err}"
    );
    // Truncated real file.
    let good = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/hh-sample.parquet");
    let bytes = std::fs::read(&good).unwrap();
    for cut in [0, 4, 100, bytes.len() / 2, bytes.len() - 9] {
        let p = dir.path().join(format!("cut{cut}.parquet"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(open(&p).is_err(), "cut at {cut} opened");
    }
    // Corrupted data pages (footer intact): open may succeed, reading must yield Err, not panic.
    let mut bad = bytes.clone();
    for b in bad[4..bytes.len() / 2].iter_mut() {
        *b = b.wrapping_mul(31).wrapping_add(7);
    }
    let p = dir.path().join("scrambled.parquet");
    std::fs::write(&p, &bad).unwrap();
    match open(&p) {
        Err(e) => assert!(e.to_string().contains("scrambled.parquet"), "{e}"),
        Ok(s) => {
            let errs: Vec<_> = s.filter_map(|r| r.err()).collect();
            assert!(!errs.is_empty());
            assert!(
                errs[0].to_string().contains("scrambled.parquet"),
                "{}",
                errs[0]
            );
        }
    }
    assert!(matches!(
        Source::from_paths(&[dir.path().join("missing.parquet")]),
        Err(DatasetError::Io { .. })
    ));
    assert!(matches!(
        Source::from_paths(&[dir.path().join("*.nothing")]),
        Err(DatasetError::NoFiles(_))
    ));
}

#[test]
fn bad_rows_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rows.parquet");
    write(
        &p,
        vec![
            (
                "prompt",
                strs(&[Some("p"), None, Some("p"), Some("p"), Some(""), Some("p")]),
            ),
            (
                "chosen",
                strs(&[
                    Some("a"),
                    Some("a"),
                    None,
                    Some("same"),
                    Some("a"),
                    Some("x"),
                ]),
            ),
            (
                "rejected",
                strs(&[
                    Some("b"),
                    Some("b"),
                    Some("b"),
                    Some("same"),
                    Some("b"),
                    Some("y"),
                ]),
            ),
        ],
    );
    let mut s = open(&p).unwrap();
    let got: Vec<_> = s.by_ref().map(|r| r.unwrap().source_row.row).collect();
    assert_eq!(got, vec![0, 5]);
    let k = s.skips();
    assert_eq!(k.count(SkipReason::NullField), 2);
    assert_eq!(k.count(SkipReason::IdenticalPair), 1);
    assert_eq!(k.count(SkipReason::EmptyField), 1);
    assert_eq!(k.total(), 4);
    let shown = k.to_string();
    assert!(
        shown.contains("skipped 4 of 6 rows") && shown.contains("rows.parquet row 1: prompt"),
        "{shown}"
    );

    // HH: no assistant turn, divergent.
    let h = dir.path().join("hh.parquet");
    write(
        &h,
        vec![
            (
                "chosen",
                strs(&[
                    Some("\n\nHuman: a\n\nAssistant: b"),
                    Some("plain"),
                    Some("\n\nHuman: a\n\nAssistant: x\n\nHuman: y\n\nAssistant: z"),
                ]),
            ),
            (
                "rejected",
                strs(&[
                    Some("\n\nHuman: a\n\nAssistant: c"),
                    Some("plain2"),
                    Some("\n\nHuman: a\n\nAssistant: q\n\nHuman: y\n\nAssistant: w"),
                ]),
            ),
        ],
    );
    let mut s = open(&h).unwrap();
    assert_eq!(s.by_ref().count(), 1);
    assert_eq!(s.skips().count(SkipReason::HhNoAssistantTurn), 1);
    assert_eq!(s.skips().count(SkipReason::HhDivergent), 1);
}

#[test]
fn rollouts_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rollouts.parquet");
    let rows: Vec<Rollout> = (0..100)
        .map(|i| Rollout {
            prompt: format!("p{}", i / 4),
            completion: format!("c{i}"),
            reward: i as f32 * 0.5,
            group: i / 4,
            step: 3,
            logp: (i % 2 == 0).then(|| vec![-0.1, -2.5, i as f32]),
            ref_logp: (i % 3 == 0).then(Vec::new),
            advantage: (i % 5 != 0).then_some(-(i as f32)),
        })
        .collect();
    let mut w = RolloutWriter::with_row_group_size(&p, 16).unwrap();
    w.write(&rows[..40])
        .unwrap()
        .write(&rows[40..])
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(read_rollouts(&p).unwrap(), rows);
    RolloutWriter::create(dir.path().join("one.parquet"))
        .unwrap()
        .write(&rows[..1])
        .unwrap()
        .finish()
        .unwrap();
    let mut s = RolloutStream::open(
        &Source::from_paths(&[dir.path()]).unwrap(),
        StreamOptions::default(),
    )
    .unwrap();
    assert_eq!(s.by_ref().count(), 1 + 100);
    // A preference file is not a rollout file.
    let good = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/pref-sample.parquet");
    let err = read_rollouts(&good).unwrap_err().to_string();
    assert!(
        err.contains("pref-sample.parquet") && err.contains("completion"),
        "{err}"
    );
}

#[test]
fn prompt_refs_keep_scalars() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rl.parquet");
    write(
        &p,
        vec![
            ("prompt", strs(&[Some("2+2?"), None])),
            ("ground_truth", strs(&[Some("4"), Some("5")])),
            (
                "level",
                Arc::new(Int64Array::from(vec![Some(1i64), None])) as ArrayRef,
            ),
        ],
    );
    let mut s = PromptStream::open(&Source::from_file(&p), StreamOptions::default(), None).unwrap();
    let r = s.next().unwrap().unwrap();
    assert_eq!(r.refs["ground_truth"], "4");
    assert_eq!(r.refs["level"], "1");
    assert!(s.next().is_none());
    assert_eq!(s.skips().count(SkipReason::NullField), 1);
}

fn dtype() -> impl Strategy<Value = DataType> {
    prop_oneof![
        Just(DataType::Utf8),
        Just(DataType::LargeUtf8),
        Just(DataType::Int64),
        Just(DataType::Float32)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Random column sets: opening never panics; success means the detected columns exist
    /// with usable types; failure names the file.
    #[test]
    fn schema_detection_never_panics(cols in proptest::collection::btree_map(
        prop_oneof![Just("prompt".to_string()), Just("chosen".to_string()), Just("rejected".to_string()),
                    Just("question".to_string()), Just("answer".to_string()), "[a-z]{1,6}"],
        (dtype(), proptest::option::of("\\PC{0,8}")), 1..5)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fuzz.parquet");
        let arrays: Vec<(&str, ArrayRef)> = cols.iter().map(|(n, (t, v))| {
            let a: ArrayRef = match t {
                DataType::Utf8 => Arc::new(StringArray::from(vec![v.clone()])),
                DataType::LargeUtf8 => Arc::new(arrow::array::LargeStringArray::from(vec![v.clone()])),
                DataType::Int64 => Arc::new(Int64Array::from(vec![v.as_ref().map(|s| s.len() as i64)])),
                _ => Arc::new(arrow::array::Float32Array::from(vec![1.5f32])),
            };
            (n.as_str(), a)
        }).collect();
        write(&p, arrays);
        let text = |n: &str| matches!(cols.get(n), Some((DataType::Utf8 | DataType::LargeUtf8, _)));
        match open(&p) {
            Ok(s) => {
                prop_assert!(text("chosen") && text("rejected"));
                let rows: Vec<_> = s.collect();
                prop_assert!(rows.len() <= 1);
                for r in rows { prop_assert!(r.is_ok()); }
            }
            Err(e) => prop_assert!(e.to_string().contains("fuzz.parquet"), "{}", e),
        }
        match PromptStream::open(&Source::from_file(&p), StreamOptions::default(), None) {
            Ok(s) => { prop_assert!(text("prompt") || text("question")); let _ = s.count(); }
            Err(e) => prop_assert!(e.to_string().contains("fuzz.parquet"), "{}", e),
        }
    }
}
