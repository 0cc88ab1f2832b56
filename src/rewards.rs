//! Reward functions for RL (GRPO): verifiable rewards, a reward model, an external command.
//!
//! Every reward implements [`RewardFn`]: it scores a batch of `(prompt, completion, refs)` where
//! `refs` are the prompt set's reference columns (e.g. gsm8k's `answer`). Build one from a spec
//! with [`build_reward`]; several comma-separated specs are summed ([`SumReward`], like TRL's list
//! of `reward_funcs` with unit weights).
//!
//! | spec | reward |
//! | --- | --- |
//! | `gsm8k` | 1 if the last number in the completion equals the number after `####` in `answer` (commas, `$` stripped), else 0 |
//! | `exact` | 1 if `completion.trim() == reference.trim()` (reference column `answer`, or `--ref-column`) |
//! | `regex` | 1 if `--pattern` matches anywhere in the completion |
//! | `format` | 1 if the whole completion (trimmed) matches `--pattern` |
//! | `char_fraction` | fraction of the completion's non-whitespace characters that are in `--chars` (0 if empty) |
//! | `model` | score of a `*ForSequenceClassification` reward model folder (`--reward-model DIR`) |
//! | `command` | an external verifier (`--reward-command CMD`, see [`CommandReward`]) |
//!
//! Patterns use Oniguruma syntax (the engine `tokenizers` ships), which accepts the usual
//! Perl/Python forms (`\d`, `(?:…)`, `[^…]`, `*?`, lookarounds).

use crate::error::{Error, Result};
use crate::lora::Fwd;
use crate::models::CausalLm;
use crate::process::GroupChild;
use align_datasets::TokenizerBundle;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokenizers::utils::SysRegex;

/// One item to score.
#[derive(Clone, Copy, Debug)]
pub struct RewardInput<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    pub refs: &'a BTreeMap<String, String>,
}

impl<'a> RewardInput<'a> {
    /// The inputs of generated completions: `comps[j]` answers the prompt `rec(off + j)`.
    pub fn of(
        comps: &'a [crate::generate::Completion],
        off: usize,
        rec: impl Fn(usize) -> &'a align_datasets::PromptRecord,
    ) -> Vec<Self> {
        comps
            .iter()
            .enumerate()
            .map(|(j, c)| {
                let r = rec(off + j);
                RewardInput {
                    prompt: &r.prompt,
                    completion: &c.text,
                    refs: &r.refs,
                }
            })
            .collect()
    }
}

/// `reward.score(inputs)`, checked to give one score per input.
pub fn score_checked(reward: &mut dyn RewardFn, inputs: &[RewardInput]) -> Result<Vec<f32>> {
    let r = reward.score(inputs)?;
    if r.len() != inputs.len() {
        return Err(Error::Msg(format!(
            "the reward returned {} scores for {} completions",
            r.len(),
            inputs.len()
        )));
    }
    Ok(r)
}

/// A reward function over a batch.
pub trait RewardFn {
    /// Short name used in metrics (`rewards/<name>`).
    fn name(&self) -> String;
    /// One reward per input, in order.
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>>;
}

/// Options [`build_reward`] reads.
#[derive(Clone, Debug, Default)]
pub struct RewardOptions {
    /// Reference column for `gsm8k` (default `answer`) and `exact` (default `answer`).
    pub ref_column: Option<String>,
    /// Pattern for `regex` and `format`.
    pub pattern: Option<String>,
    /// Character set for `char_fraction`.
    pub chars: Option<String>,
    /// Folder of a `*ForSequenceClassification` model for `model`.
    pub reward_model: Option<PathBuf>,
    /// Shell command for `command`.
    pub command: Option<String>,
    /// Seconds the command may take per batch [default: DEFAULT_COMMAND_TIMEOUT_S].
    pub command_timeout: Option<f64>,
    pub device: Option<Device>,
    pub dtype: Option<DType>,
}

pub const REWARD_NAMES: &str = "gsm8k, exact, regex, format, char_fraction, model, command";

/// Build a reward from a spec: one name or several comma-separated names (summed).
pub fn build_reward(spec: &str, o: &RewardOptions) -> Result<Box<dyn RewardFn>> {
    let names: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() {
        return Err(Error::Msg(format!(
            "empty reward spec (one of {REWARD_NAMES})"
        )));
    }
    let mut parts: Vec<Box<dyn RewardFn>> = Vec::new();
    for n in &names {
        parts.push(build_one(n, o)?);
    }
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        Box::new(SumReward { parts })
    })
}

fn build_one(name: &str, o: &RewardOptions) -> Result<Box<dyn RewardFn>> {
    let need = |v: &Option<String>, flag: &str| {
        v.clone()
            .ok_or_else(|| Error::Msg(format!("reward `{name}` needs {flag}")))
    };
    let ref_col = o.ref_column.clone().unwrap_or_else(|| "answer".into());
    Ok(match name {
        "gsm8k" => Box::new(Gsm8k {
            ref_column: ref_col,
        }),
        "exact" => Box::new(Exact {
            ref_column: ref_col,
        }),
        "regex" => Box::new(RegexReward::new(&need(&o.pattern, "--pattern")?, false)?),
        "format" => Box::new(RegexReward::new(&need(&o.pattern, "--pattern")?, true)?),
        "char_fraction" => Box::new(CharFraction {
            chars: need(&o.chars, "--chars")?.chars().collect(),
        }),
        "model" => {
            let dir = o
                .reward_model
                .clone()
                .ok_or_else(|| Error::Msg("reward `model` needs --reward-model DIR".into()))?;
            Box::new(RewardModel::load(
                &dir,
                o.dtype.unwrap_or(DType::F32),
                o.device.as_ref().unwrap_or(&Device::Cpu),
            )?)
        }
        "command" => Box::new(CommandReward::new(
            &need(&o.command, "--reward-command")?,
            o.command_timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT_S),
        )?),
        other => {
            return Err(Error::Msg(format!(
                "unknown reward `{other}` (one of {REWARD_NAMES})"
            )))
        }
    })
}

/// The sum of several rewards.
pub struct SumReward {
    pub parts: Vec<Box<dyn RewardFn>>,
}

impl SumReward {
    /// Score with every part; returns the sums and each part's scores.
    pub fn score_parts(&mut self, batch: &[RewardInput]) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let mut total = vec![0f32; batch.len()];
        let mut each = Vec::new();
        for p in &mut self.parts {
            let s = p.score(batch)?;
            for (t, x) in total.iter_mut().zip(&s) {
                *t += x;
            }
            each.push(s);
        }
        Ok((total, each))
    }
}

impl RewardFn for SumReward {
    fn name(&self) -> String {
        self.parts
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join("+")
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>> {
        Ok(self.score_parts(batch)?.0)
    }
}

fn reference<'a>(x: &RewardInput<'a>, col: &str, reward: &str) -> Result<&'a str> {
    x.refs.get(col).map(|s| s.as_str()).ok_or_else(|| {
        let have: Vec<&String> = x.refs.keys().collect();
        Error::Msg(format!(
            "reward `{reward}` needs the reference column `{col}`, but the prompt has {:?} (set --ref-column)",
            have
        ))
    })
}

/// Numbers in a text: optional sign, digits with optional thousands commas, optional decimals.
/// `$` and commas are stripped. Returns them in order of appearance.
pub fn numbers_in(text: &str) -> Vec<f64> {
    let cleaned: String = text.chars().filter(|&c| c != '$').collect();
    let b: Vec<char> = cleaned.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start_sign = b[i] == '-' && i + 1 < b.len() && b[i + 1].is_ascii_digit();
        if b[i].is_ascii_digit() || start_sign {
            let mut s = String::new();
            if start_sign {
                s.push('-');
                i += 1;
            }
            while i < b.len() {
                let c = b[i];
                if c.is_ascii_digit() {
                    s.push(c);
                } else if c == ',' && i + 1 < b.len() && b[i + 1].is_ascii_digit() {
                    // thousands separator
                } else if c == '.'
                    && i + 1 < b.len()
                    && b[i + 1].is_ascii_digit()
                    && !s.contains('.')
                {
                    s.push('.');
                } else {
                    break;
                }
                i += 1;
            }
            if let Ok(v) = s.parse::<f64>() {
                out.push(v);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// GSM8K: the last number in the completion vs the number after `####` in the reference.
pub struct Gsm8k {
    pub ref_column: String,
}

/// The gold answer of a GSM8K `answer` field: the number after the last `####`.
pub fn gsm8k_gold(answer: &str) -> Option<f64> {
    let tail = answer.rsplit_once("####").map(|(_, t)| t).unwrap_or(answer);
    numbers_in(tail).into_iter().next()
}

impl RewardFn for Gsm8k {
    fn name(&self) -> String {
        "gsm8k".into()
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>> {
        batch
            .iter()
            .map(|x| {
                let r = reference(x, &self.ref_column, "gsm8k")?;
                let gold = gsm8k_gold(r).ok_or_else(|| {
                    Error::Msg(format!(
                        "gsm8k: no number in the reference {:?}",
                        r.chars().take(80).collect::<String>()
                    ))
                })?;
                let got = numbers_in(x.completion).last().copied();
                Ok(match got {
                    Some(v) if (v - gold).abs() <= 1e-6 * gold.abs().max(1.0) => 1.0,
                    _ => 0.0,
                })
            })
            .collect()
    }
}

/// `completion.trim() == reference.trim()`.
pub struct Exact {
    pub ref_column: String,
}

impl RewardFn for Exact {
    fn name(&self) -> String {
        "exact".into()
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>> {
        batch
            .iter()
            .map(|x| {
                let r = reference(x, &self.ref_column, "exact")?;
                Ok(if x.completion.trim() == r.trim() {
                    1.0
                } else {
                    0.0
                })
            })
            .collect()
    }
}

/// 1 when a pattern matches (anywhere, or the whole trimmed completion for `format`).
pub struct RegexReward {
    re: SysRegex,
    pattern: String,
    full: bool,
}

impl RegexReward {
    pub fn new(pattern: &str, full: bool) -> Result<Self> {
        let src = if full {
            format!(r"\A(?:{pattern})\z")
        } else {
            pattern.to_string()
        };
        let re = SysRegex::new(&src)
            .map_err(|e| Error::Msg(format!("invalid pattern {pattern:?}: {e}")))?;
        Ok(RegexReward {
            re,
            pattern: pattern.to_string(),
            full,
        })
    }
    pub fn matches(&self, text: &str) -> bool {
        let t = if self.full { text.trim() } else { text };
        self.re.find_iter(t).next().is_some()
    }
}

impl RewardFn for RegexReward {
    fn name(&self) -> String {
        if self.full { "format" } else { "regex" }.into()
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>> {
        let _ = &self.pattern;
        Ok(batch
            .iter()
            .map(|x| if self.matches(x.completion) { 1.0 } else { 0.0 })
            .collect())
    }
}

/// Fraction of non-whitespace completion characters that belong to a set (a dense, easy
/// synthetic reward for demos and tests).
pub struct CharFraction {
    pub chars: Vec<char>,
}

impl RewardFn for CharFraction {
    fn name(&self) -> String {
        "char_fraction".into()
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>> {
        Ok(batch
            .iter()
            .map(|x| {
                let cs: Vec<char> = x
                    .completion
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect();
                if cs.is_empty() {
                    0.0
                } else {
                    cs.iter().filter(|c| self.chars.contains(c)).count() as f32 / cs.len() as f32
                }
            })
            .collect())
    }
}

/// A Hugging Face `*ForSequenceClassification` reward model of a supported family: the decoder
/// plus `score.weight` `[num_labels, hidden]` (no bias), read at the last non-pad token of
/// `prompt + completion` (right padding; transformers' rule, [`crate::score::last_non_pad`]).
/// The reward is label 0's score. `align rm` writes such folders ([`crate::score`]).
pub struct RewardModel {
    pub model: CausalLm,
    pub score: Tensor,
    pub tok: TokenizerBundle,
    pub batch_size: usize,
}

impl RewardModel {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let crate::score::SeqClsCheckpoint {
            cfg,
            ck,
            head: score,
        } = crate::score::open_seq_cls(dir, dtype, device)?;
        let model = CausalLm::load(&cfg, &ck, false)?;
        let tok = TokenizerBundle::from_dir(dir)
            .map_err(|e| Error::Msg(format!("reward model tokenizer: {e}")))?;
        Ok(RewardModel {
            model,
            score,
            tok,
            batch_size: 16,
        })
    }

    fn encode(&self, x: &RewardInput) -> Result<Vec<u32>> {
        let text = format!("{}{}", x.prompt, x.completion);
        let has_bos = self
            .tok
            .bos_token
            .as_deref()
            .map(|b| text.starts_with(b))
            .unwrap_or(false);
        let mut ids = self
            .tok
            .encode(&text, !has_bos)
            .map_err(|e| Error::Msg(format!("reward model tokenizer: {e}")))?;
        if ids.is_empty() {
            ids.push(self.tok.bos_id.unwrap_or(self.tok.eos_id));
        }
        let max = self.model.cfg.max_position_embeddings;
        if ids.len() > max {
            // keep the end (the completion), like left truncation
            ids.drain(..ids.len() - max);
        }
        Ok(ids)
    }

    /// Scores `[B, num_labels]` of token sequences.
    pub fn scores(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let dev = &self.model.device;
        let b = seqs.len();
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
        let pad = self.tok.pad_id();
        let mut ids = vec![pad; b * t];
        let mut valid = vec![vec![false; t]; b];
        for (i, s) in seqs.iter().enumerate() {
            for (j, &x) in s.iter().enumerate() {
                ids[i * t + j] = x;
                valid[i][j] = true;
            }
        }
        let ids = Tensor::from_vec(ids, (b, t), dev)?;
        let pos = Tensor::arange(0u32, t as u32, dev)?
            .unsqueeze(0)?
            .broadcast_as((b, t))?
            .contiguous()?;
        let mask = self.model.attention_mask(b, t, 0, Some(&valid))?;
        let h = self
            .model
            .forward_hidden(&ids, &pos, &mask, None, Fwd::REFERENCE)?
            .detach();
        let last: Vec<u32> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| (i * t + crate::score::last_non_pad(s, pad)) as u32)
            .collect();
        let hidden = self.model.cfg.hidden_size;
        let sel = h
            .reshape((b * t, hidden))?
            .index_select(&Tensor::new(last, dev)?, 0)?;
        let s = sel
            .to_dtype(DType::F32)?
            .matmul(&self.score.to_dtype(DType::F32)?.t()?)?;
        Ok(s.to_vec2::<f32>()?)
    }
}

impl RewardFn for RewardModel {
    fn name(&self) -> String {
        "model".into()
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(self.batch_size.max(1)) {
            let seqs = chunk
                .iter()
                .map(|x| self.encode(x))
                .collect::<Result<Vec<_>>>()?;
            out.extend(self.scores(&seqs)?.into_iter().map(|r| r[0]));
        }
        Ok(out)
    }
}

/// Seconds a reward command may take for one batch unless `--reward-timeout` says otherwise.
pub const DEFAULT_COMMAND_TIMEOUT_S: f64 = 600.0;
/// Longest answer line read from a reward command.
const MAX_ANSWER_BYTES: u64 = 1 << 20;

/// An external verifier, run as `sh -c CMD` once per batch. It reads one JSON line per item,
/// `{"prompt": …, "completion": …, "refs": {…}}`, on its stdin, which is closed after the last
/// item; it must print exactly one answer line per item, in order — `{"reward": <number>}` or a
/// bare number — and exit with status 0, all within the timeout. align writes and reads at the
/// same time, so a verifier may answer line by line or read everything first. Too few or too
/// many answers, an unreadable answer, a non-zero exit or the timeout is an error naming the
/// item; the command's whole process group is killed on every exit path (see
/// [`crate::process`]). stderr is passed through.
pub struct CommandReward {
    cmd: String,
    timeout: Duration,
    batches: u64,
}

/// What the reader thread reports: one answer line, the end of the output, or a read error.
enum Answer {
    Line(String),
    End,
    Failed(String),
}

impl CommandReward {
    pub fn new(cmd: &str, timeout_s: f64) -> Result<Self> {
        if !(timeout_s.is_finite() && timeout_s > 0.0) {
            return Err(Error::Msg(format!(
                "--reward-timeout must be a positive number of seconds, got {timeout_s}"
            )));
        }
        if cmd.trim().is_empty() {
            return Err(Error::Msg("--reward-command is empty".into()));
        }
        Ok(CommandReward {
            cmd: cmd.to_string(),
            timeout: Duration::from_secs_f64(timeout_s),
            batches: 0,
        })
    }

    fn run_batch(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>> {
        self.batches += 1;
        let n = batch.len();
        let (cmd, nb) = (self.cmd.clone(), self.batches);
        let fail = |what: String| Error::Msg(format!("reward command `{cmd}`, batch {nb}: {what}"));
        let item = |i: usize| -> String {
            let short = |t: &str| {
                let mut s: String = t.chars().take(40).collect();
                if s.len() < t.len() {
                    s.push('…');
                }
                s
            };
            format!(
                "item {} of {n} (prompt {:?}, completion {:?})",
                i + 1,
                short(batch[i].prompt),
                short(batch[i].completion)
            )
        };
        let mut input = Vec::new();
        for x in batch {
            let line = serde_json::json!({
                "prompt": x.prompt,
                "completion": x.completion,
                "refs": x.refs,
            });
            input.extend_from_slice(line.to_string().as_bytes());
            input.push(b'\n');
        }
        let deadline = Instant::now() + self.timeout;
        let mut child = GroupChild::spawn_shell(&self.cmd)
            .map_err(|e| fail(format!("cannot start it: {e}")))?;
        let stdin = child.take_stdin();
        let stdout = child
            .take_stdout()
            .ok_or_else(|| fail("no stdout pipe".into()))?;
        // Writing from a thread: a verifier that reads everything before answering, or that
        // answers while align is still writing, never waits on a full pipe.
        if let Some(mut stdin) = stdin {
            std::thread::spawn(move || {
                // A verifier may exit without reading all its input; the answers decide.
                let _ = stdin.write_all(&input);
            });
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let mut buf = Vec::new();
                let msg = match (&mut r).take(MAX_ANSWER_BYTES).read_until(b'\n', &mut buf) {
                    Ok(0) => Answer::End,
                    Ok(_) if buf.last() != Some(&b'\n') && buf.len() as u64 >= MAX_ANSWER_BYTES => {
                        Answer::Failed(format!(
                            "an answer line is longer than {MAX_ANSWER_BYTES} bytes"
                        ))
                    }
                    Ok(_) => Answer::Line(
                        String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string(),
                    ),
                    Err(e) => Answer::Failed(format!("reading its output: {e}")),
                };
                let last = !matches!(msg, Answer::Line(_));
                if tx.send(msg).is_err() || last {
                    return;
                }
            }
        });
        let mut answers: Vec<String> = Vec::with_capacity(n);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Answer::Line(l)) if answers.len() == n => {
                    return Err(fail(format!(
                        "it printed more than {n} answer lines for {n} items (extra line {:?}); each item takes exactly one line",
                        l.chars().take(80).collect::<String>()
                    )));
                }
                Ok(Answer::Line(l)) => answers.push(l),
                Ok(Answer::End) => break,
                Ok(Answer::Failed(e)) => return Err(fail(e)),
                Err(_) => {
                    return Err(fail(format!(
                        "no complete answer within --reward-timeout {}s ({} of {n} items answered); its process group was killed",
                        self.timeout.as_secs_f64(),
                        answers.len()
                    )))
                }
            }
        }
        let exited = child.wait_exit_until(deadline);
        let status = child
            .finish()
            .map_err(|e| fail(format!("waiting for it: {e}")))?;
        if !exited {
            return Err(fail(format!(
                "it closed its output but did not exit within --reward-timeout {}s; its process group was killed",
                self.timeout.as_secs_f64()
            )));
        }
        if answers.len() < n {
            return Err(fail(format!(
                "{} got no answer: the command answered {} of {n} items and exited ({status})",
                item(answers.len()),
                answers.len()
            )));
        }
        if !status.success() {
            return Err(fail(format!(
                "it exited with {status} (after answering all {n} items); a verifier must exit with status 0"
            )));
        }
        answers
            .iter()
            .enumerate()
            .map(|(i, a)| parse_answer(a).map_err(|e| fail(format!("{}: {e}", item(i)))))
            .collect()
    }
}

/// One answer line: `{"reward": x}` or a bare number, finite.
fn parse_answer(a: &str) -> std::result::Result<f32, String> {
    let v: serde_json::Value = serde_json::from_str(a.trim()).map_err(|e| {
        format!(
            "answer {:?} is not JSON ({e}); expected {{\"reward\": number}}",
            a.trim()
        )
    })?;
    let r = match &v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::Object(o) => o.get("reward").and_then(|r| r.as_f64()),
        _ => None,
    }
    .ok_or_else(|| format!("answer {:?} has no numeric `reward`", a.trim()))?;
    let r32 = r as f32;
    if !r32.is_finite() {
        return Err(format!(
            "answer {:?} is out of range for a reward",
            a.trim()
        ));
    }
    Ok(r32)
}

impl RewardFn for CommandReward {
    fn name(&self) -> String {
        "command".into()
    }
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<f32>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.run_batch(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(a: &str) -> BTreeMap<String, String> {
        [("answer".to_string(), a.to_string())]
            .into_iter()
            .collect()
    }

    fn score(r: &mut dyn RewardFn, completion: &str, answer: &str) -> f32 {
        let refs = refs(answer);
        r.score(&[RewardInput {
            prompt: "Q",
            completion,
            refs: &refs,
        }])
        .unwrap()[0]
    }

    #[test]
    fn gsm8k_last_number_vs_gold() {
        let mut g = Gsm8k {
            ref_column: "answer".into(),
        };
        let gold = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072";
        assert_eq!(
            score(&mut g, "so 3 + 4 ... the answer is $1,072.", gold),
            1.0
        );
        assert_eq!(score(&mut g, "1072 then 5", gold), 0.0);
        assert_eq!(score(&mut g, "no number", gold), 0.0);
        assert_eq!(score(&mut g, "-3", "#### -3"), 1.0);
        assert_eq!(score(&mut g, "it is 2.50", "#### 2.5"), 1.0);
        assert_eq!(numbers_in("a 1,234.5 b -7, c 3."), vec![1234.5, -7.0, 3.0]);
        // missing reference column: an error naming it
        let empty = BTreeMap::new();
        let e = g
            .score(&[RewardInput {
                prompt: "",
                completion: "1",
                refs: &empty,
            }])
            .unwrap_err();
        assert!(e.to_string().contains("`answer`"), "{e}");
    }

    #[test]
    fn exact_regex_format_char_fraction() {
        let mut e = Exact {
            ref_column: "answer".into(),
        };
        assert_eq!(score(&mut e, "  Paris\n", "Paris"), 1.0);
        assert_eq!(score(&mut e, "Paris.", "Paris"), 0.0);
        let mut r = RegexReward::new(r"\d+", false).unwrap();
        assert_eq!(score(&mut r, "abc 12", ""), 1.0);
        assert_eq!(score(&mut r, "abc", ""), 0.0);
        let mut f = RegexReward::new(r"<think>.*?</think>\s*<answer>.*</answer>", true).unwrap();
        assert_eq!(
            score(&mut f, "<think>x</think> <answer>4</answer>\n", ""),
            1.0
        );
        assert_eq!(
            score(&mut f, "junk <think>x</think><answer>4</answer>", ""),
            0.0
        );
        assert!(RegexReward::new("(", false).is_err());
        let mut c = CharFraction {
            chars: "ab".chars().collect(),
        };
        assert_eq!(score(&mut c, "a b c d", ""), 0.5);
        assert_eq!(score(&mut c, "   ", ""), 0.0);
    }

    #[test]
    fn build_from_specs() {
        let o = RewardOptions {
            pattern: Some("x".into()),
            ..Default::default()
        };
        let mut r = build_reward("exact, regex", &o).unwrap();
        assert_eq!(r.name(), "exact+regex");
        assert_eq!(score(r.as_mut(), "x", "x"), 2.0);
        assert!(build_reward("nope", &o).is_err());
        assert!(build_reward("format", &RewardOptions::default()).is_err());
        assert!(build_reward("model", &RewardOptions::default()).is_err());
    }

    #[test]
    fn external_command_json_lines() {
        let cmd = r#"while IFS= read -r l; do case "$l" in *yes*) echo '{"reward": 1.5}';; *) echo 0;; esac; done"#;
        let mut c = CommandReward::new(cmd, 10.0).unwrap();
        assert_eq!(score(&mut c, "yes!", "a"), 1.5);
        assert_eq!(score(&mut c, "no", "a"), 0.0);
        let refs = refs("z");
        let xs: Vec<RewardInput> = ["yes", "no", "yes \"quoted\"\nnewline"]
            .iter()
            .map(|s| RewardInput {
                prompt: "p",
                completion: s,
                refs: &refs,
            })
            .collect();
        assert_eq!(c.score(&xs).unwrap(), vec![1.5, 0.0, 1.5]);
        // a verifier that answers garbage or exits: clear errors, no panic
        let mut bad = CommandReward::new("read l; echo nonsense", 10.0).unwrap();
        let e = bad.score(&xs[..1]).unwrap_err().to_string();
        assert!(e.contains("not JSON"), "{e}");
        let mut gone = CommandReward::new("exit 3", 10.0).unwrap();
        assert!(gone.score(&xs[..1]).is_err());
    }
}
