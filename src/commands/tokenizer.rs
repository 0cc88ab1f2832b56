//! `align tokenizer train`: train a byte-level BPE `tokenizer.json` (+ `tokenizer_config.json`
//! with a chat template) on the text columns of parquet files.
//!
//! Texts are read with [`crate::table::ParquetTable`].

use crate::table::{cell, Cell, ParquetTable};
use align_datasets::{ChatTemplate, ColumnKind, Source};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerBuilder, TokenizerImpl,
};

/// Special tokens, in id order: `<pad>`=0, `<s>`=1 (BOS), `</s>`=2 (EOS).
pub const SPECIAL_TOKENS: [&str; 3] = ["<pad>", "<s>", "</s>"];

/// The chat template written into `tokenizer_config.json`: the HH-RLHF transcript layout
/// (`\n\nHuman: …\n\nAssistant: …`), so that chat data and HH transcripts tokenize alike and
/// no extra marker tokens are needed. System messages render as `\n\nSystem: …`. The template
/// adds no BOS (the post-processor does when encoding with special tokens) and no EOS (the
/// trainers append EOS to completions).
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'user' %}{{ '\\n\\nHuman: ' + message['content'] }}{% elif message['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + message['content'] }}{% else %}{{ '\\n\\n' + message['role'] | capitalize + ': ' + message['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}";

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: TokenizerCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (GPT-2 style bytes, BOS prepended by the
    /// post-processor) on parquet text. Writes tokenizer.json and tokenizer_config.json.
    Train(TrainArgs),
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Parquet training data: files, folders (every *.parquet in them) or globs; repeatable.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Columns to read, comma-separated (`chosen,rejected`), or `auto`: every string column
    /// and every chat-message column (list of {role, content}; rendered with the chat template).
    #[arg(long, default_value = "auto")]
    pub column: String,
    /// Vocabulary size, special tokens included (at least 259: 3 specials + 256 bytes).
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Minimum count for a pair to be merged.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Read at most this many rows [default: all rows].
    #[arg(long)]
    pub max_rows: Option<usize>,
    /// `model_max_length` written into tokenizer_config.json.
    #[arg(long, default_value_t = 2048)]
    pub model_max_length: usize,
    /// Output: a folder (tokenizer.json and tokenizer_config.json are written in it), or a
    /// path ending in `.json` for tokenizer.json itself (the config is written beside it).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        TokenizerCommand::Train(a) => train(a),
    }
}

/// Where tokenizer.json and tokenizer_config.json go for an `--out`.
pub fn output_paths(out: &Path) -> (PathBuf, PathBuf) {
    if out.extension().is_some_and(|e| e == "json") {
        let dir = out.parent().unwrap_or(Path::new("")).to_path_buf();
        (out.to_path_buf(), dir.join("tokenizer_config.json"))
    } else {
        (
            out.join("tokenizer.json"),
            out.join("tokenizer_config.json"),
        )
    }
}

pub fn train(a: TrainArgs) -> Result<()> {
    if a.vocab_size < 259 {
        bail!(
            "--vocab-size {} is too small: a byte-level BPE needs at least 259 (3 special tokens + 256 bytes)",
            a.vocab_size
        );
    }
    let source = Source::from_paths(&a.data).context("--data")?;
    let columns = match a.column.trim() {
        "auto" | "" => None,
        s => Some(
            s.split(',')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>(),
        ),
    };
    let template = ChatTemplate::new(CHAT_TEMPLATE, "<s>", "</s>")?;
    let t0 = std::time::Instant::now();
    let tokenizer = train_bpe(
        &source,
        columns.as_deref(),
        a.vocab_size,
        a.min_frequency,
        a.max_rows,
        &template,
    )?;
    let (tok_path, cfg_path) = output_paths(&a.out);
    if let Some(dir) = tok_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    tokenizer
        .save(&tok_path, true)
        .map_err(|e| anyhow!("writing {}: {e}", tok_path.display()))?;
    let cfg = tokenizer_config(a.model_max_length);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)
        .with_context(|| format!("writing {}", cfg_path.display()))?;
    eprintln!(
        "trained a byte-level BPE with {} tokens in {:.1}s: {} and {}",
        tokenizer.get_vocab_size(true),
        t0.elapsed().as_secs_f64(),
        tok_path.display(),
        cfg_path.display()
    );
    Ok(())
}

/// The tokenizer_config.json written beside a trained tokenizer.
pub fn tokenizer_config(model_max_length: usize) -> serde_json::Value {
    let added: serde_json::Map<String, serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                i.to_string(),
                serde_json::json!({"content": t, "lstrip": false, "normalized": false,
                    "rstrip": false, "single_word": false, "special": true}),
            )
        })
        .collect();
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": null,
        "add_bos_token": true,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    })
}

/// Trains the BPE on the texts of `source`'s `columns` (all text/message columns if `None`).
pub fn train_bpe(
    source: &Source,
    columns: Option<&[String]>,
    vocab_size: usize,
    min_frequency: u64,
    max_rows: Option<usize>,
    template: &ChatTemplate,
) -> Result<Tokenizer> {
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .and_then(|b| b.try_pair("<s> $A $B:1"))
        .map_err(|e| anyhow!("post-processor template: {e}"))?
        .special_tokens(vec![("<s>", 1)])
        .build()
        .map_err(|e| anyhow!("post-processor: {e}"))?;
    let built: TokenizerImpl<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default().into())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
        .with_post_processor(Some(post.into()))
        .with_decoder(Some(ByteLevel::default().into()))
        .build()
        .map_err(|e| anyhow!("building the tokenizer: {e}"))?;
    let mut tokenizer = Tokenizer::from(built);

    // Texts are streamed batch by batch; the first read error is kept and reported.
    let mut texts = TextIter::new(source, columns, max_rows, template)?;
    tokenizer
        .train(&mut trainer, &mut texts)
        .map_err(|e| anyhow!("training: {e}"))?;
    if let Some(e) = texts.error.take() {
        return Err(e);
    }
    if texts.rows == 0 {
        bail!("no text found in {:?}", source.files());
    }
    // The trainer adds special tokens as added tokens; make sure ids are as documented.
    for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
        if tokenizer.token_to_id(t) != Some(i as u32) {
            bail!("internal: special token {t} did not get id {i}");
        }
    }
    eprintln!("read {} texts from {} rows", texts.texts, texts.rows);
    Ok(tokenizer)
}

/// Iterator over the texts of a source's columns, for the BPE trainer.
struct TextIter<'a> {
    tables: std::vec::IntoIter<PathBuf>,
    table: Option<ParquetTable>,
    columns: Option<Vec<String>>,
    max_rows: Option<usize>,
    template: &'a ChatTemplate,
    pending: std::vec::IntoIter<String>,
    rows: usize,
    texts: usize,
    error: Option<anyhow::Error>,
}

impl<'a> TextIter<'a> {
    fn new(
        source: &Source,
        columns: Option<&[String]>,
        max_rows: Option<usize>,
        template: &'a ChatTemplate,
    ) -> Result<Self> {
        // Check every file's columns up front, so a typo fails before training starts.
        for f in source.files() {
            let t = ParquetTable::open(f, &[])?;
            match columns {
                Some(cols) => {
                    for c in cols {
                        match t.kind(c) {
                            Some(ColumnKind::Text) | Some(ColumnKind::Messages) => {}
                            Some(ColumnKind::Scalar) | Some(ColumnKind::Other) => bail!(
                                "{}: column `{c}` is neither a string nor a list of {{role, content}} messages",
                                f.display()
                            ),
                            None => bail!(
                                "{}: no column `{c}` (columns: {})",
                                f.display(),
                                t.column_names().join(", ")
                            ),
                        }
                    }
                }
                None => {
                    if t.text_like_columns().is_empty() {
                        bail!(
                            "{}: no string or chat-message column (columns: {})",
                            f.display(),
                            t.column_names().join(", ")
                        );
                    }
                }
            }
        }
        Ok(TextIter {
            tables: source.files().to_vec().into_iter(),
            table: None,
            columns: columns.map(|c| c.to_vec()),
            max_rows,
            template,
            pending: Vec::new().into_iter(),
            rows: 0,
            texts: 0,
            error: None,
        })
    }

    fn refill(&mut self) -> Result<bool> {
        loop {
            if self.max_rows.is_some_and(|m| self.rows >= m) {
                return Ok(false);
            }
            if self.table.is_none() {
                let Some(path) = self.tables.next() else {
                    return Ok(false);
                };
                let probe = ParquetTable::open(&path, &[])?;
                let cols = match &self.columns {
                    Some(c) => c.clone(),
                    None => probe.text_like_columns(),
                };
                self.table = Some(ParquetTable::open(&path, &cols)?);
            }
            let table = self.table.as_mut().expect("table");
            let Some(batch) = table.next_batch()? else {
                self.table = None;
                continue;
            };
            let mut out = Vec::new();
            let n = match self.max_rows {
                Some(m) => batch.num_rows().min(m - self.rows),
                None => batch.num_rows(),
            };
            for row in 0..n {
                for (ci, col) in batch.columns().iter().enumerate() {
                    match cell(col, row) {
                        Cell::Text(s) => out.push(s),
                        Cell::Messages(m) => {
                            let name = batch.schema().field(ci).name().clone();
                            let r = self.template.render(&m, false).map_err(|e| {
                                anyhow!(
                                    "{} row {}, column `{name}`: {e}",
                                    table.path.display(),
                                    table.row_base + row
                                )
                            })?;
                            out.push(r)
                        }
                        Cell::Null | Cell::Other => {}
                    }
                }
            }
            table.row_base += batch.num_rows();
            self.rows += n;
            self.texts += out.len();
            if !out.is_empty() {
                self.pending = out.into_iter();
                return Ok(true);
            }
        }
    }
}

impl Iterator for TextIter<'_> {
    type Item = String;
    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(s) = self.pending.next() {
                return Some(s);
            }
            if self.error.is_some() {
                return None;
            }
            match self.refill() {
                Ok(true) => continue,
                Ok(false) => return None,
                Err(e) => {
                    self.error = Some(e);
                    return None;
                }
            }
        }
    }
}
