//! Tokenization and truncation of preference pairs and SFT examples.

use crate::chat::ChatTemplate;
use crate::error::{DatasetError, Result};
use crate::preference::PreferencePair;
use crate::tokenizer_config::{read_config, token_string};
use std::fmt;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Token ids of one preference pair. Completion ids end with EOS unless truncated away.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenizedPair {
    /// Prompt ids, encoded with the tokenizer's special tokens (e.g. BOS).
    pub prompt_ids: Vec<u32>,
    /// Chosen completion ids (no special tokens) + EOS.
    pub chosen_ids: Vec<u32>,
    /// Rejected completion ids (no special tokens) + EOS.
    pub rejected_ids: Vec<u32>,
}

/// One SFT example: `input_ids` with a mask that is 1 on completion tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// 1 where the loss applies (completion tokens incl. EOS), 0 on the prompt.
    pub completion_mask: Vec<u8>,
}

/// Length limits (TRL's DPO defaults: prompt keeps its end, completions keep their start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TruncationOptions {
    /// Prompt truncated to its LAST `max_prompt_length` tokens.
    pub max_prompt_length: Option<usize>,
    /// Completions truncated to their FIRST tokens so prompt + completion <= `max_length`.
    pub max_length: Option<usize>,
}

/// What truncation did, for an end-of-run report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TruncationStats {
    /// Examples tokenized successfully.
    pub examples: u64,
    /// Examples whose prompt was truncated.
    pub prompt_truncated: u64,
    /// Examples with at least one completion truncated.
    pub completion_truncated: u64,
    /// Examples refused because the prompt left no room for a completion.
    pub dropped_no_room: u64,
}

impl fmt::Display for TruncationStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tokenized {} examples: {} prompts truncated, {} with completions truncated, {} dropped (prompt fills max_length)",
            self.examples, self.prompt_truncated, self.completion_truncated, self.dropped_no_room
        )
    }
}

/// A tokenizer with the special tokens and chat template of a model folder.
pub struct TokenizerBundle {
    /// The `tokenizers` tokenizer (from `tokenizer.json`).
    pub tokenizer: Tokenizer,
    /// EOS token text and id.
    pub eos_token: String,
    pub eos_id: u32,
    /// BOS token text and id, if the config names one that exists.
    pub bos_token: Option<String>,
    pub bos_id: Option<u32>,
    /// PAD id if configured (else use EOS).
    pub pad_id: Option<u32>,
    /// The chat template, if the model has one.
    pub chat_template: Option<ChatTemplate>,
    /// The folder it was loaded from.
    pub dir: PathBuf,
}

/// Alias: the same type under the name used for chat models.
pub type ChatTokenizer = TokenizerBundle;

const EOS_FALLBACKS: [&str; 4] = ["</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>"];

impl TokenizerBundle {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (optional) and the chat template
    /// (`chat_template.jinja` or the config's `chat_template`, optional) from a folder.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(DatasetError::io(
                &tj,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let tokenizer = Tokenizer::from_file(&tj)
            .map_err(|e| DatasetError::Tokenizer(format!("{}: {e}", tj.display())))?;
        let cfg = read_config(&dir)?;
        let id = |t: &str| tokenizer.token_to_id(t);
        let (eos_token, eos_id) = token_string(cfg.get("eos_token"))
            .and_then(|t| id(&t).map(|i| (t, i)))
            .or_else(|| {
                EOS_FALLBACKS
                    .iter()
                    .find_map(|t| id(t).map(|i| (t.to_string(), i)))
            })
            .ok_or_else(|| DatasetError::NoEosToken(dir.clone()))?;
        let bos_token = token_string(cfg.get("bos_token")).filter(|t| id(t).is_some());
        let bos_id = bos_token.as_deref().and_then(id);
        let pad_id = token_string(cfg.get("pad_token")).and_then(|t| id(&t));
        let chat_template = ChatTemplate::from_model_dir(&dir)?;
        Ok(TokenizerBundle {
            tokenizer,
            eos_token,
            eos_id,
            bos_token,
            bos_id,
            pad_id,
            chat_template,
            dir,
        })
    }

    /// Encodes text; `add_special_tokens` applies the post-processor (e.g. adds BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DatasetError::Tokenizer(e.to_string()))
    }

    /// Decodes ids (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| DatasetError::Tokenizer(e.to_string()))
    }

    /// Tokenizes a pair like TRL's DPO: prompt WITH special tokens, completions without,
    /// EOS appended to each completion; then the prompt keeps its last
    /// `max_prompt_length` tokens and each completion its first
    /// `max_length - prompt_len` tokens. If the prompt leaves no room at all, returns
    /// [`DatasetError::NoRoomForCompletion`] (counted in `stats.dropped_no_room`): skip it.
    pub fn tokenize_pair(
        &self,
        pair: &PreferencePair,
        opts: &TruncationOptions,
        stats: &mut TruncationStats,
    ) -> Result<TokenizedPair> {
        let mut prompt_ids = self.encode(&pair.prompt, true)?;
        let mut chosen_ids = self.encode(&pair.chosen, false)?;
        let mut rejected_ids = self.encode(&pair.rejected, false)?;
        chosen_ids.push(self.eos_id);
        rejected_ids.push(self.eos_id);
        let mut prompt_cut = false;
        if let Some(m) = opts.max_prompt_length {
            if prompt_ids.len() > m {
                prompt_ids.drain(..prompt_ids.len() - m);
                prompt_cut = true;
            }
        }
        let mut completion_cut = false;
        if let Some(max) = opts.max_length {
            let room = max.saturating_sub(prompt_ids.len());
            if room == 0 {
                stats.dropped_no_room += 1;
                return Err(DatasetError::NoRoomForCompletion {
                    row: pair.source_row.clone(),
                    prompt_len: prompt_ids.len(),
                    max_length: max,
                });
            }
            for ids in [&mut chosen_ids, &mut rejected_ids] {
                if ids.len() > room {
                    ids.truncate(room);
                    completion_cut = true;
                }
            }
        }
        stats.examples += 1;
        stats.prompt_truncated += prompt_cut as u64;
        stats.completion_truncated += completion_cut as u64;
        Ok(TokenizedPair {
            prompt_ids,
            chosen_ids,
            rejected_ids,
        })
    }

    /// SFT on a prompt/completion: prompt with special tokens (mask 0), completion without
    /// + EOS (mask 1), the whole truncated to its first `max_length` tokens.
    pub fn tokenize_sft(
        &self,
        prompt: &str,
        completion: &str,
        max_length: Option<usize>,
        stats: &mut TruncationStats,
    ) -> Result<SftExample> {
        let p = self.encode(prompt, true)?;
        let mut c = self.encode(completion, false)?;
        c.push(self.eos_id);
        let mut input_ids = p.clone();
        input_ids.extend_from_slice(&c);
        let mut completion_mask = vec![0u8; p.len()];
        completion_mask.resize(input_ids.len(), 1);
        if let Some(m) = max_length {
            if input_ids.len() > m {
                input_ids.truncate(m);
                completion_mask.truncate(m);
                stats.completion_truncated += 1;
            }
        }
        stats.examples += 1;
        Ok(SftExample {
            input_ids,
            completion_mask,
        })
    }

    /// Plain text (pre-training style): encoded with special tokens (BOS where the
    /// post-processor adds one), EOS appended, first `max_length` tokens kept; mask all 1.
    pub fn tokenize_text(
        &self,
        text: &str,
        max_length: Option<usize>,
        stats: &mut TruncationStats,
    ) -> Result<SftExample> {
        let mut ids = self.encode(text, true)?;
        ids.push(self.eos_id);
        if let Some(m) = max_length {
            if ids.len() > m {
                ids.truncate(m);
                stats.completion_truncated += 1;
            }
        }
        stats.examples += 1;
        let n = ids.len();
        Ok(SftExample {
            input_ids: ids,
            completion_mask: vec![1; n],
        })
    }

    /// Id used for padding: PAD if configured, else EOS.
    pub fn pad_id(&self) -> u32 {
        self.pad_id.unwrap_or(self.eos_id)
    }
}

impl fmt::Debug for TokenizerBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenizerBundle")
            .field("dir", &self.dir)
            .field("eos", &(&self.eos_token, self.eos_id))
            .field("bos", &(&self.bos_token, self.bos_id))
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}
