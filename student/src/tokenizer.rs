//! Tokenizer (`tokenizer.json` via the `tokenizers` crate), HF chat templates (minijinja with the
//! Python string methods HF templates call) and SFT example rendering.
//!
//! The template environment copies transformers' (`trim_blocks`, `lstrip_blocks`, `raise_exception`,
//! a Python-style `tojson`, `strftime_now`), so rendered prompts are byte-identical to
//! `tokenizer.apply_chat_template(..., tokenize=False)`.

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, Error as JError, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, StudentError, read_json};

/// One chat turn. Extra fields (`reasoning_content`, `tool_calls`, ...) pass through to the template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The turn's text.
    pub content: String,
    /// Any other keys of the message object, given to the template unchanged.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl ChatMessage {
    /// A message with just a role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            extra: Default::default(),
        }
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled HF chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source_name: String,
    /// `bos_token` as the template sees it.
    pub bos_token: Option<String>,
    /// `eos_token` as the template sees it.
    pub eos_token: Option<String>,
    /// Extra variables given to every render (e.g. `open_thinking`, `enable_thinking`).
    pub extra_context: serde_json::Map<String, Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source_name)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn template_error(source_name: &str, e: JError) -> StudentError {
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        message.push_str(&format!(": {c}"));
        cause = c.source();
    }
    StudentError::Template {
        source_name: source_name.to_string(),
        message,
    }
}

impl ChatTemplate {
    /// Compiles `source`; `source_name` (e.g. the file it came from) is used in errors.
    pub fn new(
        source: impl Into<String>,
        source_name: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let source_name = source_name.into();
        let mut env = Environment::new();
        // transformers renders with trim_blocks + lstrip_blocks; without them whitespace differs.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.into())
            .map_err(|e| template_error(&source_name, e))?;
        Ok(Self {
            env,
            source_name,
            bos_token,
            eos_token,
            extra_context: Default::default(),
        })
    }

    /// Renders `messages` as transformers' `apply_chat_template(..., tokenize=False)` would.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut ctx = self.extra_context.clone();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).expect("messages serialise"),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| template_error(&self.source_name, e))?;
        tmpl.render(JValue::from_serialize(&ctx))
            .map_err(|e| template_error(&self.source_name, e))
    }
}

/// `raise_exception(msg)`: templates call it to reject conversations (e.g. bad role order).
fn raise_exception(msg: String) -> std::result::Result<JValue, JError> {
    Err(JError::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)` as transformers provides it (Llama 3.1 stamps today's date), in UTC.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(&fmt, secs)
}

fn strftime(fmt: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    // Days-to-civil conversion (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Python `json.dumps(value, ensure_ascii=False, indent=indent)`, which is what HF's `tojson` is;
/// minijinja's own escapes `<`/`>` and sorts nothing the same way.
fn tojson(value: JValue, kwargs: Kwargs) -> std::result::Result<JValue, JError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_py_json(&value, indent, 0, &mut out)?;
    Ok(JValue::from_safe_string(out))
}

/// Walks the minijinja value itself (not a serde_json copy) so map keys keep template order.
fn write_py_json(
    v: &JValue,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), JError> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    let quote = |s: &str| serde_json::to_string(s).expect("strings serialise");
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match i64::try_from(v.clone()) {
            Ok(i) if v.as_i64().is_some() => out.push_str(&i.to_string()),
            _ => {
                let f = f64::try_from(v.clone())?;
                out.push_str(&serde_json::to_string(&f).unwrap_or_else(|_| "NaN".into()));
            }
        },
        ValueKind::String => out.push_str(&quote(v.as_str().unwrap_or_default())),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<JValue> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<JValue> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&quote(&k.to_string()));
                out.push_str(": ");
                write_py_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => out.push_str(&quote(&v.to_string())),
    }
    Ok(())
}

/// A supervised fine-tuning example split into the part the model reads and the part it learns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SftExample {
    /// Chat-template prompt (generation prompt included): no loss on these.
    pub prompt_ids: Vec<u32>,
    /// `<think>\n{reasoning}\n</think>\n\n{answer}` + EOS: the loss targets.
    pub target_ids: Vec<u32>,
}

/// A tokenizer with its special tokens and (optional) chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// The chat template, when the folder has one.
    pub chat_template: Option<ChatTemplate>,
    /// BOS token text from `tokenizer_config.json`.
    pub bos_token: Option<String>,
    /// EOS token text from `tokenizer_config.json`.
    pub eos_token: Option<String>,
    /// EOS id (the SFT target terminator and a default stop token).
    pub eos_token_id: Option<u32>,
    /// Pad token id (falls back to EOS), used to left-pad batched prompts.
    pub pad_token_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("eos_token", &self.eos_token)
            .field("chat_template", &self.chat_template)
            .finish()
    }
}

/// `bos_token` etc. may be a string or an AddedToken object `{"content": ...}`.
fn token_text(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (optional) and `chat_template.jinja`
    /// (optional, preferred over the config's `chat_template`, as transformers does) from `dir`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(StudentError::Tokenizer {
                path,
                message: "file not found".into(),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| StudentError::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.is_file() {
            read_json(&cfg_path)?
        } else {
            Value::Null
        };
        let bos_token = token_text(&cfg, "bos_token");
        let eos_token = token_text(&cfg, "eos_token");
        let pad_token = token_text(&cfg, "pad_token");

        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| StudentError::io(&jinja, e))?;
            Some((text, jinja.display().to_string()))
        } else {
            match cfg.get("chat_template") {
                Some(Value::String(s)) => Some((s.clone(), cfg_path.display().to_string())),
                // The list form: [{"name": "default", "template": ...}, {"name": "tool_use", ...}].
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template")?.as_str())
                    .map(|s| {
                        (
                            s.to_string(),
                            format!("{}:chat_template", cfg_path.display()),
                        )
                    }),
                Some(Value::Null) | None => None,
                Some(_) => {
                    return Err(StudentError::config(
                        &cfg_path,
                        "chat_template",
                        "expected a string or a list of {name, template}",
                    ));
                }
            }
        };
        let chat_template = template
            .map(|(text, name)| ChatTemplate::new(text, name, bos_token.clone(), eos_token.clone()))
            .transpose()?;
        let eos_token_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let pad_token_id = pad_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or(eos_token_id);
        Ok(Self {
            inner,
            path,
            chat_template,
            bos_token,
            eos_token,
            eos_token_id,
            pad_token_id,
        })
    }

    /// The `tokenizer.json` path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` object, for anything not wrapped here.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Id of a token string (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn tok_err(&self, e: impl std::fmt::Display) -> StudentError {
        StudentError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Token ids of `text`. Use `add_special_tokens = false` for chat-rendered text: the
    /// template already wrote BOS, as transformers' `apply_chat_template(tokenize=True)` assumes.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.tok_err(e))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.tok_err(e))
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| StudentError::Template {
            source_name: self.path.parent().unwrap_or(Path::new("")).display().to_string(),
            message: "no chat template (neither chat_template.jinja nor tokenizer_config.json's chat_template)"
                .into(),
        })
    }

    /// Renders a conversation with the chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.template()?.render(messages, add_generation_prompt)
    }

    /// Renders and tokenises a conversation (no extra special tokens: the template wrote them).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// Builds an SFT example: prompt = the template over `prompt_messages` (system/user turns) with
    /// the generation prompt; target = `<think>\n{reasoning}\n</think>\n\n{answer}` + EOS, written by
    /// this code rather than the template, because R1-style templates drop everything before
    /// `</think>` from assistant turns. When the generation prompt already ends with `<think>\n`
    /// (DeepSeek-R1 distills), the target starts after it instead of repeating it.
    pub fn sft_example(
        &self,
        prompt_messages: &[ChatMessage],
        reasoning: &str,
        answer: &str,
    ) -> Result<SftExample> {
        let prompt = self.apply_chat_template(prompt_messages, true)?;
        let target = sft_target_text(&prompt, reasoning, answer);
        let prompt_ids = self.encode(&prompt, false)?;
        let mut target_ids = self.encode(&target, false)?;
        let eos = self.eos_token_id.ok_or_else(|| {
            self.tok_err("no eos_token in tokenizer_config.json (needed to terminate SFT targets)")
        })?;
        target_ids.push(eos);
        Ok(SftExample {
            prompt_ids,
            target_ids,
        })
    }
}

/// The SFT target text for a rendered prompt (see [`Tokenizer::sft_example`]).
pub fn sft_target_text(prompt: &str, reasoning: &str, answer: &str) -> String {
    let opener = if prompt.ends_with("<think>\n") {
        ""
    } else {
        "<think>\n"
    };
    format!("{opener}{reasoning}\n</think>\n\n{answer}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_known_date() {
        // 2024-07-23 13:05:09 UTC
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %B %m %y %%", 1_721_739_909),
            "23 Jul 2024 13:05:09 July 07 24 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            r#"{% set x = {"name": "f", "b": [1, 2.5, "<é>"], "e": {}} %}{{ x | tojson }}|{{ x | tojson(indent=2) }}"#,
            "inline",
            None,
            None,
        )
        .unwrap();
        let out = t.render(&[], false).unwrap();
        assert_eq!(
            out,
            "{\"name\": \"f\", \"b\": [1, 2.5, \"<é>\"], \"e\": {}}|{\n  \"name\": \"f\",\n  \"b\": [\n    1,\n    2.5,\n    \"<é>\"\n  ],\n  \"e\": {}\n}"
        );
    }

    #[test]
    fn raise_exception_surfaces_message() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}",
            "inline",
            None,
            None,
        )
        .unwrap();
        let e = t
            .render(&[ChatMessage::assistant("hi")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("first turn must be user"), "{e}");
    }

    #[test]
    fn sft_target_does_not_duplicate_think() {
        assert_eq!(
            sft_target_text("<｜Assistant｜><think>\n", "r", "a"),
            "r\n</think>\n\na"
        );
        assert_eq!(
            sft_target_text("<|im_start|>assistant\n", "r", "a"),
            "<think>\nr\n</think>\n\na"
        );
    }
}
