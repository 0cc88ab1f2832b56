//! Chat messages and Hugging Face chat templates rendered with minijinja.

use crate::error::{DatasetError, Result};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// "system", "user", "assistant", ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// Shorthand constructor.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

const NAME: &str = "chat_template";

/// A compiled chat template (the Jinja string HF models ship), with the special tokens it
/// may reference. Rendering follows `transformers`: `trim_blocks` and `lstrip_blocks` on,
/// variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, a
/// `raise_exception(msg)` function and Python string/dict/list methods (`.strip()`,
/// `.startswith()`, `.items()`, ...) via minijinja-contrib's pycompat.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Value of `bos_token` in the template.
    pub bos_token: String,
    /// Value of `eos_token` in the template.
    pub eos_token: String,
}

impl ChatTemplate {
    /// Compiles a template string.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Deterministic: templates only use it for a "today's date" line.
            "01 Jan 2025".to_string()
        });
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| DatasetError::Template(format!("does not compile: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Loads the template of a model folder: `chat_template.jinja` if present, otherwise
    /// `chat_template` from `tokenizer_config.json` (a string, or a list of
    /// `{name, template}` where `default` is used). Returns `Ok(None)` if there is none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let cfg = crate::tokenizer_config::read_config(dir)?;
        let (bos, eos) = (
            crate::tokenizer_config::token_string(cfg.get("bos_token")).unwrap_or_default(),
            crate::tokenizer_config::token_string(cfg.get("eos_token")).unwrap_or_default(),
        );
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let src = std::fs::read_to_string(&jinja).map_err(|e| DatasetError::io(&jinja, e))?;
            return Ok(Some(Self::new(src, bos, eos)?));
        }
        let src = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        match src {
            Some(s) => Ok(Some(Self::new(s, bos, eos)?)),
            None => Ok(None),
        }
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders a conversation.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| DatasetError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| DatasetError::Template(format!("{e:#}")))
    }
}

/// Length (in messages) of the common prefix of two conversations.
pub fn shared_prefix_len(a: &[Message], b: &[Message]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Longest common prefix of strings, cut at a char boundary.
pub(crate) fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let mut n = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            return &a[..i];
        }
        n = i + ca.len_utf8();
    }
    &a[..n]
}

/// Renders a conversational preference pair the way TRL does. With `prompt` messages,
/// the rendered prompt (with the generation prompt) is cut off the front of the rendered
/// full conversations; without, the prompt is the shared message prefix of the two sides.
/// Returns (prompt, chosen completion, rejected completion), where `prompt + completion`
/// is exactly the rendered full conversation.
pub fn render_pair(
    tmpl: &ChatTemplate,
    prompt: Option<&[Message]>,
    chosen: &[Message],
    rejected: &[Message],
) -> Result<(String, String, String)> {
    let (p, c, r): (Vec<Message>, &[Message], &[Message]) = match prompt {
        Some(p) => (p.to_vec(), chosen, rejected),
        None => {
            let k = shared_prefix_len(chosen, rejected);
            (chosen[..k].to_vec(), &chosen[k..], &rejected[k..])
        }
    };
    let prompt_text = tmpl.render(&p, true)?;
    let mut full_c = p.clone();
    full_c.extend_from_slice(c);
    let mut full_r = p;
    full_r.extend_from_slice(r);
    let full_c = tmpl.render(&full_c, false)?;
    let full_r = tmpl.render(&full_r, false)?;
    // Templates such as DeepSeek-R1's add text with add_generation_prompt that the full
    // rendering lacks: keep only what the three renderings share (as TRL does).
    let shared = common_prefix(common_prefix(&prompt_text, &full_c), &full_r);
    let n = shared.len();
    Ok((
        shared.to_string(),
        full_c[n..].to_string(),
        full_r[n..].to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

    #[test]
    fn chatml_and_llama2() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let m = vec![Message::new("user", "hi"), Message::new("assistant", "yo")];
        assert_eq!(
            t.render(&m[..1], true).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let l = ChatTemplate::new(LLAMA2, "<s>", "</s>").unwrap();
        assert_eq!(l.render(&m, false).unwrap(), "<s>[INST] hi [/INST] yo </s>");
        let bad = vec![Message::new("assistant", "x")];
        let err = l.render(&bad, false).unwrap_err().to_string();
        assert!(err.contains("must alternate"), "{err}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }

    #[test]
    fn pair_without_prompt_uses_shared_prefix() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let u = Message::new("user", "q");
        let (p, c, r) = render_pair(
            &t,
            None,
            &[u.clone(), Message::new("assistant", "good")],
            &[u, Message::new("assistant", "bad")],
        )
        .unwrap();
        assert_eq!(p, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(c, "good<|im_end|>\n");
        assert_eq!(r, "bad<|im_end|>\n");
    }

    fn msg() -> impl Strategy<Value = Message> {
        (
            prop_oneof![Just("user"), Just("assistant"), Just("system")],
            "\\PC{0,20}",
        )
            .prop_map(|(r, c)| Message::new(r, c))
    }

    proptest! {
        #[test]
        fn render_pair_reassembles(prefix in proptest::collection::vec(msg(), 0..4),
                                   c in proptest::collection::vec(msg(), 1..3),
                                   r in proptest::collection::vec(msg(), 1..3)) {
            for src in [CHATML, LLAMA2] {
                let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
                let mut fc = prefix.clone(); fc.extend(c.clone());
                let mut fr = prefix.clone(); fr.extend(r.clone());
                // Must never panic; on success prompt + completion == full rendering.
                if let Ok((p, cc, rc)) = render_pair(&t, None, &fc, &fr) {
                    prop_assert_eq!(format!("{p}{cc}"), t.render(&fc, false).unwrap());
                    prop_assert_eq!(format!("{p}{rc}"), t.render(&fr, false).unwrap());
                }
            }
        }

        #[test]
        fn arbitrary_template_source_never_panics(src in "\\PC{0,40}", content in "\\PC{0,10}") {
            if let Ok(t) = ChatTemplate::new(src, "<s>", "</s>") {
                let _ = t.render(&[Message::new("user", content)], true);
            }
        }

        #[test]
        fn common_prefix_is_prefix(a in "\\PC{0,12}", b in "\\PC{0,12}") {
            let p = common_prefix(&a, &b);
            prop_assert!(a.starts_with(p) && b.starts_with(p));
        }
    }
}
