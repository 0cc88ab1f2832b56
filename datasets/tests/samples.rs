//! Tests on the committed samples in datasets/data/.

use align_datasets::*;
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(data("tiny-tokenizer-expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn hh_sample_splits_and_counts_the_divergent_row() {
    let mut s = PreferenceStream::open(
        &Source::from_file(data("hh-sample.parquet")),
        StreamOptions::default(),
        None,
    )
    .unwrap();
    assert!(matches!(s.format(), PreferenceFormat::Hh { .. }));
    let pairs: Vec<PreferencePair> = s.by_ref().collect::<Result<_>>().unwrap();
    assert_eq!(pairs.len(), 63);
    assert_eq!(s.skips().count(SkipReason::HhDivergent), 1);
    assert_eq!(s.skips().rows_seen, 64);
    let shown = s.skips().to_string();
    assert!(shown.contains("hh-sample.parquet row 63"), "{shown}");
    for p in &pairs {
        assert!(p.prompt.ends_with("\n\nAssistant:"));
        assert!(p.prompt.starts_with("\n\nHuman:"));
        assert!(p.chosen.starts_with(' '), "{:?}", p.chosen);
        assert_ne!(p.chosen, p.rejected);
    }
    assert_eq!(pairs[5].source_row.row, 5);
}

#[test]
fn explicit_sample() {
    let s = PreferenceStream::open(
        &Source::from_file(data("pref-sample.parquet")),
        StreamOptions::default(),
        None,
    )
    .unwrap();
    assert!(matches!(s.format(), PreferenceFormat::Explicit { .. }));
    let pairs: Vec<_> = s.collect::<Result<Vec<_>>>().unwrap();
    assert_eq!(pairs.len(), 48);
    let exp = expected();
    assert_eq!(pairs[0].prompt, exp["dpo"][0]["prompt"].as_str().unwrap());
}

#[test]
fn conversational_samples_match_trl_rendering() {
    let bundle = TokenizerBundle::from_dir(data("tiny-tokenizer")).unwrap();
    let tmpl = bundle
        .chat_template
        .as_ref()
        .expect("template in tokenizer_config.json");
    let exp = expected();
    for (file, key, n) in [
        ("chat-sample.parquet", "chat_implicit_prompt", 32),
        ("chat-prompt-sample.parquet", "chat_explicit_prompt", 16),
    ] {
        let s = PreferenceStream::open(
            &Source::from_file(data(file)),
            StreamOptions::default(),
            Some(tmpl),
        )
        .unwrap();
        assert!(matches!(
            s.format(),
            PreferenceFormat::Conversational { .. }
        ));
        let pairs: Vec<_> = s.collect::<Result<Vec<_>>>().unwrap();
        assert_eq!(pairs.len(), n, "{file}");
        let cases = exp[key].as_array().unwrap();
        assert!(!cases.is_empty());
        for c in cases {
            let i = c["row"].as_u64().unwrap() as usize;
            assert_eq!(
                pairs[i].prompt,
                c["prompt"].as_str().unwrap(),
                "{file} row {i}"
            );
            assert_eq!(
                pairs[i].chosen,
                c["chosen"].as_str().unwrap(),
                "{file} row {i}"
            );
            assert_eq!(
                pairs[i].rejected,
                c["rejected"].as_str().unwrap(),
                "{file} row {i}"
            );
        }
    }
    // Without a template a conversational source is refused with a clear error.
    let err = PreferenceStream::open(
        &Source::from_file(data("chat-sample.parquet")),
        StreamOptions::default(),
        None,
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, DatasetError::NeedsChatTemplate { .. }),
        "{err}"
    );
}

#[test]
fn gsm8k_sample_prompts() {
    let s = PromptStream::open(
        &Source::from_file(data("gsm8k-sample.parquet")),
        StreamOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(s.columns().0, "question");
    let recs: Vec<_> = s.collect::<Result<Vec<_>>>().unwrap();
    assert_eq!(recs.len(), 32);
    for r in &recs {
        assert!(r.refs["answer"].contains("####"));
        assert_eq!(r.refs.len(), 1);
    }
}

#[test]
fn chat_prompts_rendered_with_generation_prompt() {
    let bundle = TokenizerBundle::from_dir(data("tiny-tokenizer")).unwrap();
    let opts = StreamOptions {
        columns: ColumnOverrides {
            prompt: Some("prompt".into()),
            refs: Some(vec![]),
            ..Default::default()
        },
        ..Default::default()
    };
    let recs: Vec<_> = PromptStream::open(
        &Source::from_file(data("chat-prompt-sample.parquet")),
        opts,
        bundle.chat_template.as_ref(),
    )
    .unwrap()
    .collect::<Result<Vec<_>>>()
    .unwrap();
    assert_eq!(recs.len(), 16);
    let exp = expected();
    assert_eq!(
        recs[0].prompt,
        exp["chat_explicit_prompt"][0]["prompt"].as_str().unwrap()
    );
    assert!(recs[0].messages.is_some());
}

#[test]
fn tokenize_pair_matches_python_reference() {
    let bundle = TokenizerBundle::from_dir(data("tiny-tokenizer")).unwrap();
    let exp = expected();
    assert_eq!(
        Some(bundle.eos_id),
        exp["eos_id"].as_u64().map(|x| x as u32)
    );
    assert_eq!(bundle.bos_id, exp["bos_id"].as_u64().map(|x| x as u32));
    let mut stats = TruncationStats::default();
    let cases = exp["dpo"].as_array().unwrap();
    let mut truncated_cases = 0;
    for c in cases {
        let pair = PreferencePair {
            prompt: c["prompt"].as_str().unwrap().into(),
            chosen: c["chosen"].as_str().unwrap().into(),
            rejected: c["rejected"].as_str().unwrap().into(),
            source_row: RowId {
                file: "x".into(),
                row: 0,
            },
            margin: None,
        };
        let opts = TruncationOptions {
            max_prompt_length: c["max_prompt_length"].as_u64().map(|x| x as usize),
            max_length: c["max_length"].as_u64().map(|x| x as usize),
        };
        truncated_cases += opts.max_length.is_some() as usize;
        let got = bundle.tokenize_pair(&pair, &opts, &mut stats).unwrap();
        let want: TokenizedPair = serde_json::from_value(c["expected"].clone()).unwrap();
        assert_eq!(got, want, "row {}", c["row"]);
        if opts.max_prompt_length.is_none() {
            assert_eq!(got.prompt_ids[0], bundle.bos_id.unwrap());
        }
        if let Some(m) = opts.max_length {
            assert!(got.prompt_ids.len() + got.chosen_ids.len() <= m);
        } else {
            assert_eq!(got.chosen_ids.last(), Some(&bundle.eos_id));
        }
    }
    assert_eq!(stats.examples as usize, cases.len());
    assert!(
        stats.prompt_truncated > 0 && stats.completion_truncated > 0,
        "{stats}"
    );
    assert!(stats.completion_truncated as usize <= truncated_cases);
}

#[test]
fn truncation_edge_cases_and_sft() {
    let bundle = TokenizerBundle::from_dir(data("tiny-tokenizer")).unwrap();
    let pair = PreferencePair {
        prompt: "Human: a fairly long prompt with many words in it".into(),
        chosen: " yes".into(),
        rejected: " no".into(),
        source_row: RowId {
            file: "f.parquet".into(),
            row: 7,
        },
        margin: None,
    };
    let mut st = TruncationStats::default();
    let err = bundle
        .tokenize_pair(
            &pair,
            &TruncationOptions {
                max_prompt_length: None,
                max_length: Some(3),
            },
            &mut st,
        )
        .unwrap_err();
    assert!(matches!(err, DatasetError::NoRoomForCompletion { .. }));
    assert!(err.to_string().contains("f.parquet row 7"));
    assert_eq!(st.dropped_no_room, 1);
    let t = bundle
        .tokenize_pair(
            &pair,
            &TruncationOptions {
                max_prompt_length: Some(4),
                max_length: Some(5),
            },
            &mut st,
        )
        .unwrap();
    assert_eq!(t.prompt_ids.len(), 4);
    assert_eq!(t.chosen_ids.len(), 1);
    let full = bundle.encode(&pair.prompt, true).unwrap();
    assert_eq!(t.prompt_ids[..], full[full.len() - 4..]);

    let sft = bundle
        .tokenize_sft("Question?", " Answer.", None, &mut st)
        .unwrap();
    assert_eq!(sft.input_ids[0], bundle.bos_id.unwrap());
    assert_eq!(*sft.input_ids.last().unwrap(), bundle.eos_id);
    assert_eq!(sft.input_ids.len(), sft.completion_mask.len());
    let p = bundle.encode("Question?", true).unwrap().len();
    assert!(sft.completion_mask[..p].iter().all(|&m| m == 0));
    assert!(sft.completion_mask[p..].iter().all(|&m| m == 1));
    let txt = bundle
        .tokenize_text("hello world", Some(2), &mut st)
        .unwrap();
    assert_eq!(txt.input_ids.len(), 2);
    assert_eq!(txt.input_ids[0], bundle.bos_id.unwrap());
}

#[test]
fn tokenizer_bundle_errors_and_fallbacks() {
    let dir = tempfile::tempdir().unwrap();
    let err = TokenizerBundle::from_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    // No tokenizer_config.json: EOS found by the fallback names; chat_template.jinja used.
    std::fs::copy(
        data("tiny-tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}[{{ m.role|upper }}] {{ m.content }}\n{% endfor %}",
    )
    .unwrap();
    let b = TokenizerBundle::from_dir(dir.path()).unwrap();
    assert_eq!(b.eos_token, "</s>");
    assert_eq!(b.bos_id, None);
    let t = b.chat_template.as_ref().unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "hi")], false).unwrap(),
        "[USER] hi\n"
    );
    std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").unwrap();
    let err = TokenizerBundle::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, DatasetError::Json { .. }), "{err}");
}
