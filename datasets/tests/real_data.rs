//! Tests on the real files in <repo>/../shared/data; skipped (with a message) when absent.

use align_datasets::*;
use std::path::PathBuf;

fn shared(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(name);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} not found (shared data absent)", p.display());
        None
    }
}

#[test]
fn hh_rlhf_harmless_1997_pairs_3_skips() {
    let Some(path) = shared("hh-rlhf-harmless.parquet") else {
        return;
    };
    let mut s =
        PreferenceStream::open(&Source::from_file(&path), StreamOptions::default(), None).unwrap();
    let mut n = 0;
    for p in s.by_ref() {
        let p = p.unwrap();
        assert!(p.prompt.ends_with(ASSISTANT_MARKER));
        n += 1;
    }
    eprintln!("{}", s.skips());
    assert_eq!(n, 1997);
    assert_eq!(s.skips().rows_seen, 2000);
    assert_eq!(s.skips().count(SkipReason::HhDivergent), 3, "{}", s.skips());
    assert_eq!(s.skips().total(), 3, "{}", s.skips());
    println!("{}", s.skips());
}

#[test]
fn hh_rlhf_shuffled_sees_same_rows() {
    let Some(path) = shared("hh-rlhf-harmless.parquet") else {
        return;
    };
    let opts = StreamOptions {
        shuffle: true,
        seed: 3,
        shuffle_buffer: 500,
        batch_size: 128,
        ..Default::default()
    };
    let rows: Vec<u64> = PreferenceStream::open(&Source::from_file(&path), opts, None)
        .unwrap()
        .map(|p| p.unwrap().source_row.row)
        .collect();
    assert_eq!(rows.len(), 1997);
    let mut sorted = rows.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 1997);
    assert_ne!(rows, sorted, "shuffle changed nothing");
}

#[test]
fn gsm8k_train_7473_prompts_with_answers() {
    let Some(path) = shared("gsm8k-train.parquet") else {
        return;
    };
    let s = PromptStream::open(&Source::from_file(&path), StreamOptions::default(), None).unwrap();
    let mut n = 0;
    for r in s {
        let r = r.unwrap();
        assert!(!r.prompt.is_empty());
        assert!(r.refs["answer"].contains("#### "), "{:?}", r.refs);
        n += 1;
    }
    assert_eq!(n, 7473);
}

#[test]
fn gsm8k_folder_and_glob() {
    let Some(path) = shared("gsm8k-test.parquet") else {
        return;
    };
    let dir = path.parent().unwrap().to_path_buf();
    let src = Source::from_paths(&[dir.join("gsm8k-*.parquet")]).unwrap();
    assert_eq!(src.files().len(), 2);
    let n = PromptStream::open(&src, StreamOptions::default(), None)
        .unwrap()
        .count();
    assert_eq!(n, 7473 + 1319);
    // The whole folder mixes HH and GSM8K: the error names the file and its columns.
    let err = PromptStream::open(
        &Source::from_paths(&[dir]).unwrap(),
        StreamOptions::default(),
        None,
    )
    .err()
    .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("hh-rlhf-harmless.parquet") && msg.contains("chosen"),
        "{msg}"
    );
}
