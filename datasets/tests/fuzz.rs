//! Generated inputs for the parquet readers, through the public API only: corrupted bytes of
//! the committed samples, and random schemas (wrong types, nested types, nulls, huge strings,
//! HH transcripts with stray markers) read to the end by every stream kind. Nothing may panic;
//! every error names the file it is about.
//!
//! Cases per property: `PROPTEST_CASES` (default below, kept small for CI). A longer bounded
//! run: `PROPTEST_CASES=5000 cargo test --release -p align-datasets --test fuzz`.

use align_datasets::*;
use arrow::array::{
    ArrayRef, BinaryArray, BooleanArray, Float64Array, Int64Array, LargeStringArray, ListArray,
    RecordBatch, StringArray, StructArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        // Shrinking re-runs whole file reads; a short bound keeps a failure quick to report.
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    }
}

fn samples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    v.sort();
    assert!(v.len() >= 4, "samples missing in {}", dir.display());
    v
}

fn template() -> ChatTemplate {
    ChatTemplate::new(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
        "<s>",
        "</s>",
    )
    .unwrap()
}

/// Reads `p` with every stream kind, shuffled and not, to the end (or the first error).
/// Returns the error messages met; panics propagate (and fail the property).
fn read_everything(p: &Path) -> Vec<String> {
    let src = Source::from_file(p);
    let tpl = template();
    let mut errors = Vec::new();
    for shuffle in [false, true] {
        let opts = StreamOptions {
            shuffle,
            seed: 3,
            shuffle_buffer: 4,
            batch_size: 3,
            ..Default::default()
        };
        for t in [None, Some(&tpl)] {
            match PreferenceStream::open(&src, opts.clone(), t) {
                Ok(s) => errors.extend(s.filter_map(|r| r.err()).map(|e| e.to_string())),
                Err(e) => errors.push(e.to_string()),
            }
            match PromptStream::open(&src, opts.clone(), t) {
                Ok(s) => errors.extend(s.filter_map(|r| r.err()).map(|e| e.to_string())),
                Err(e) => errors.push(e.to_string()),
            }
        }
        match RolloutStream::open(&src, opts.clone()) {
            Ok(s) => errors.extend(s.filter_map(|r| r.err()).map(|e| e.to_string())),
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors
}

/// Errors about the file must name it; template and tokenizer errors are about row content
/// and name the row instead.
fn assert_named(errors: &[String], p: &Path) -> std::result::Result<(), TestCaseError> {
    let name = p.file_name().unwrap().to_string_lossy().to_string();
    for e in errors {
        prop_assert!(e.contains(&name), "error does not name {name}: {e}");
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Keep the first fraction of the bytes.
    Truncate(f64),
    /// XOR a byte at a fractional position.
    Flip(f64, u8),
    /// Overwrite bytes at a fractional position.
    Splice(f64, Vec<u8>),
    /// Overwrite the footer length (the 4 bytes before the trailing `PAR1`).
    FooterLen(u32),
    /// Flip a byte within the last 256 bytes (the footer's thrift metadata).
    FlipFooter(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0.0..1.0f64).prop_map(Mutation::Truncate),
        (0.0..1.0f64, 1..=255u8).prop_map(|(p, m)| Mutation::Flip(p, m)),
        (0.0..1.0f64, proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, b)| Mutation::Splice(p, b)),
        any::<u32>().prop_map(Mutation::FooterLen),
        (8..256usize, 1..=255u8).prop_map(|(o, m)| Mutation::FlipFooter(o, m)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    let at = |f: f64| ((f * n as f64) as usize).min(n.saturating_sub(1));
    match m {
        Mutation::Truncate(f) => bytes.truncate(at(*f)),
        Mutation::Flip(f, x) => bytes[at(*f)] ^= x,
        Mutation::Splice(f, b) => {
            let i = at(*f);
            for (k, v) in b.iter().enumerate() {
                if let Some(x) = bytes.get_mut(i + k) {
                    *x = *v;
                }
            }
        }
        Mutation::FooterLen(v) if n >= 8 => bytes[n - 8..n - 4].copy_from_slice(&v.to_le_bytes()),
        Mutation::FlipFooter(o, x) if *o <= n => bytes[n - o] ^= x,
        _ => {}
    }
}

proptest! {
    #![proptest_config(cases(64))]

    /// Corrupted copies of every committed sample: no panic, errors name the file.
    #[test]
    fn corrupt_parquet_bytes_never_panic(which in 0..16usize,
                                         muts in proptest::collection::vec(mutation(), 1..4)) {
        let files = samples();
        let src = &files[which % files.len()];
        let mut bytes = std::fs::read(src).unwrap();
        for m in &muts {
            apply(&mut bytes, m);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fuzzed-bytes.parquet");
        std::fs::write(&p, &bytes).unwrap();
        let errors = read_everything(&p);
        assert_named(&errors, &p)?;
    }
}

/// The kinds of column the random schemas draw from.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Utf8,
    LargeUtf8,
    Binary,
    Int64,
    Float64,
    Bool,
    ListUtf8,
    Messages,
    /// list<struct{role: int64, content: utf8}>: looks like messages, is not.
    BadMessages,
    ListFloat,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => Just(Kind::Utf8),
        1 => Just(Kind::LargeUtf8),
        1 => Just(Kind::Binary),
        1 => Just(Kind::Int64),
        1 => Just(Kind::Float64),
        1 => Just(Kind::Bool),
        1 => Just(Kind::ListUtf8),
        2 => Just(Kind::Messages),
        1 => Just(Kind::BadMessages),
        1 => Just(Kind::ListFloat),
    ]
}

/// Cell text: HH pieces and markers, arbitrary unicode, sometimes a huge string.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("\n\nHuman:".to_string()),
        Just("\n\nAssistant:".to_string()),
        Just("\n\nAssistant: ".to_string()),
        "\\PC{0,12}",
        "[a-z ]{0,8}",
    ];
    prop_oneof![
        40 => proptest::collection::vec(piece, 0..8).prop_map(|v| v.concat()),
        1 => (1usize..3).prop_map(|mb| "x".repeat(mb << 20)),
    ]
}

fn column(k: Kind, cells: &[Option<String>]) -> ArrayRef {
    let strs = || cells.iter().map(|c| c.as_deref()).collect::<Vec<_>>();
    let role_content = |role: DataType| {
        Fields::from(vec![
            Field::new("role", role, true),
            Field::new("content", DataType::Utf8, true),
        ])
    };
    // Each list cell holds two elements built from the cell text (or is null).
    let list = |values: ArrayRef| -> ArrayRef {
        let n = cells.len();
        let offsets = OffsetBuffer::from_lengths(vec![2; n]);
        let nulls =
            arrow::buffer::NullBuffer::from(cells.iter().map(|c| c.is_some()).collect::<Vec<_>>());
        let field = Arc::new(Field::new("item", values.data_type().clone(), true));
        Arc::new(ListArray::new(field, offsets, values, Some(nulls)))
    };
    let doubled: Vec<Option<String>> = cells.iter().flat_map(|c| [c.clone(), c.clone()]).collect();
    match k {
        Kind::Utf8 => Arc::new(StringArray::from(strs())),
        Kind::LargeUtf8 => Arc::new(LargeStringArray::from(strs())),
        Kind::Binary => Arc::new(BinaryArray::from(
            cells
                .iter()
                .map(|c| c.as_deref().map(str::as_bytes))
                .collect::<Vec<_>>(),
        )),
        Kind::Int64 => Arc::new(Int64Array::from(
            cells
                .iter()
                .map(|c| c.as_ref().map(|s| s.len() as i64 - 3))
                .collect::<Vec<_>>(),
        )),
        Kind::Float64 => Arc::new(Float64Array::from(
            cells
                .iter()
                .map(|c| c.as_ref().map(|s| s.len() as f64 / 3.0))
                .collect::<Vec<_>>(),
        )),
        Kind::Bool => Arc::new(BooleanArray::from(
            cells
                .iter()
                .map(|c| c.as_ref().map(|s| s.len() % 2 == 0))
                .collect::<Vec<_>>(),
        )),
        Kind::ListUtf8 => list(Arc::new(StringArray::from(
            doubled.iter().map(|c| c.as_deref()).collect::<Vec<_>>(),
        ))),
        Kind::ListFloat => list(Arc::new(Float64Array::from(
            doubled
                .iter()
                .map(|c| c.as_ref().map(|s| s.len() as f64))
                .collect::<Vec<_>>(),
        ))),
        Kind::Messages | Kind::BadMessages => {
            let roles: ArrayRef = match k {
                Kind::Messages => Arc::new(StringArray::from(
                    (0..doubled.len())
                        .map(|i| Some(if i % 2 == 0 { "user" } else { "assistant" }))
                        .collect::<Vec<_>>(),
                )),
                _ => Arc::new(Int64Array::from(
                    (0..doubled.len() as i64).collect::<Vec<_>>(),
                )),
            };
            let content: ArrayRef = Arc::new(StringArray::from(
                doubled.iter().map(|c| c.as_deref()).collect::<Vec<_>>(),
            ));
            let fields = role_content(roles.data_type().clone());
            list(Arc::new(StructArray::new(
                fields,
                vec![roles, content],
                None,
            )))
        }
    }
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("prompt".to_string()),
        Just("chosen".to_string()),
        Just("rejected".to_string()),
        Just("question".to_string()),
        Just("answer".to_string()),
        Just("completion".to_string()),
        Just("reward".to_string()),
        Just("group".to_string()),
        Just("step".to_string()),
        Just("logp".to_string()),
        Just("advantage".to_string()),
        "[a-z]{1,5}",
    ]
}

proptest! {
    #![proptest_config(cases(64))]

    /// Random schemas and contents, several row groups: no panic, errors name the file.
    #[test]
    fn random_schemas_and_contents_never_panic(
        cols in proptest::collection::btree_map(name(), kind(), 1..7),
        rows in proptest::collection::vec(proptest::collection::vec(proptest::option::weighted(0.85, text()), 7), 0..12),
        row_group in 1usize..6,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fuzzed-schema.parquet");
        let arrays: Vec<(String, ArrayRef)> = cols
            .iter()
            .enumerate()
            .map(|(j, (n, k))| {
                let cells: Vec<Option<String>> = rows.iter().map(|r| r[j].clone()).collect();
                (n.clone(), column(*k, &cells))
            })
            .collect();
        let schema = Arc::new(Schema::new(
            arrays
                .iter()
                .map(|(n, a)| Field::new(n, a.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        let batch = RecordBatch::try_new(schema.clone(), arrays.into_iter().map(|(_, a)| a).collect()).unwrap();
        let props = WriterProperties::builder().set_max_row_group_row_count(Some(row_group)).build();
        let mut w = ArrowWriter::try_new(std::fs::File::create(&p).unwrap(), schema, Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let errors = read_everything(&p);
        assert_named(&errors, &p)?;
    }

    /// The HH splitter on arbitrary text around the markers: never panics, and a split
    /// reassembles both transcripts.
    #[test]
    fn hh_split_of_generated_transcripts_reassembles(a in text(), b in text(), shared in text()) {
        let (c, r) = (format!("{shared}{a}"), format!("{shared}{b}"));
        if let Ok((p, cc, rc)) = split_hh(&c, &r) {
            prop_assert_eq!(format!("{p}{cc}"), c);
            prop_assert_eq!(format!("{p}{rc}"), r);
            prop_assert!(p.ends_with(ASSISTANT_MARKER));
        }
    }
}

/// Found by `corrupt_parquet_bytes_never_panic` (after 1,037 cases of an 8,000-case run):
/// three bytes spliced into hh-sample.parquet's data made parquet 60's definition-level
/// decoder panic ("offset + len out of bounds"). Now an error naming the file.
#[test]
fn corrupt_definition_levels_are_an_error_not_a_panic() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/hh-sample.parquet");
    let mut bytes = std::fs::read(src).unwrap();
    apply(
        &mut bytes,
        &Mutation::Splice(0.5904428819154915, vec![159, 0, 0]),
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fuzzed-levels.parquet");
    std::fs::write(&p, &bytes).unwrap();
    let errors = read_everything(&p);
    assert!(
        errors.iter().any(|e| e.contains("corrupt data page")),
        "{errors:?}"
    );
    assert_named(&errors, &p).unwrap();
}
