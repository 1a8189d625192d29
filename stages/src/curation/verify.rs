//! The `verify` stage: rejection sampling. Extracts each trace's final answer and
//! compares it with the prompt's reference; keeps the correct ones.
//!
//! Where the verifier cannot decide (`unknown`), a policy applies: drop, keep, or ask
//! a judge model (as open-r1 asked Llama-3.3-70B about 12% of its samples), whose
//! verdict is recorded as the judge's, not the verifier's.

use std::sync::Arc;

use async_trait::async_trait;
use distill_curate::verify::{Verdict, verify};
use distill_db::verdicts::{Item, NewVerdict};
use distill_teacher::{ChatModel, ChatRequest, Message, TeacherConfig};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{check_needs, pending_items, summary, write_verdicts};
use crate::{BuildEnv, ParamError, Stage, StageContext, StageError, StageKind, parse_params};

/// The grading prompt sent to a judge; `{reference}` and `{candidate}` are replaced.
pub const DEFAULT_JUDGE_TEMPLATE: &str = "You are grading the final answer to a math problem.\n\n\
Problem:\n{problem}\n\nReference answer: {reference}\nCandidate answer: {candidate}\n\n\
Are the two answers mathematically equivalent? Reply with a single word: YES or NO.";

/// The `verify` stage kind.
pub struct VerifyKind;

/// What to do with items the verifier cannot decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnknown {
    /// Drop them (reason `unverified`).
    Drop,
    /// Keep them, labelled `unknown`.
    Keep,
    /// Ask the `judge` endpoint.
    Judge,
}

/// Parameters of a `verify` stage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyParams {
    /// Policy for undecidable comparisons; `judge` when a judge is named, else `drop`.
    #[serde(default)]
    pub on_unknown: Option<OnUnknown>,
    /// `[teacher.NAME]` endpoint that grades the undecidable cases.
    #[serde(default)]
    pub judge: Option<String>,
    /// Grading prompt; `{problem}`, `{reference}` and `{candidate}` are replaced.
    #[serde(default = "default_judge_template")]
    pub judge_template: String,
    /// Token budget of a judge reply.
    #[serde(default = "default_judge_max_tokens")]
    pub judge_max_tokens: u32,
}

fn default_judge_template() -> String {
    DEFAULT_JUDGE_TEMPLATE.into()
}
fn default_judge_max_tokens() -> u32 {
    2048
}

impl StageKind for VerifyKind {
    fn name(&self) -> &'static str {
        "verify"
    }
    fn about(&self) -> &'static str {
        "keep traces whose final answer matches the reference (exact rationals, sets, intervals, ...)"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let p: VerifyParams = parse_params(params)?;
        check_needs(env)?;
        let policy = p.on_unknown.unwrap_or(if p.judge.is_some() {
            OnUnknown::Judge
        } else {
            OnUnknown::Drop
        });
        let judge = match (&p.judge, policy) {
            (None, OnUnknown::Judge) => {
                return Err(ParamError::new(
                    "judge",
                    "on_unknown = \"judge\" needs `judge = \"NAME\"` naming a [teacher.NAME]",
                ));
            }
            (Some(name), OnUnknown::Judge) => Some((
                name.clone(),
                env.teachers.get(name).cloned().ok_or_else(|| {
                    ParamError::new("judge", format!("no [teacher.{name}] in the config"))
                })?,
            )),
            (Some(_), _) => {
                return Err(ParamError::new(
                    "judge",
                    "a judge is only asked when on_unknown = \"judge\"",
                ));
            }
            (None, _) => None,
        };
        if policy == OnUnknown::Judge && !p.judge_template.contains("{candidate}") {
            return Err(ParamError::new(
                "judge_template",
                "must contain `{candidate}`",
            ));
        }
        Ok(Arc::new(VerifyStage {
            params: p,
            policy,
            judge,
        }))
    }
}

/// A configured `verify` stage.
#[derive(Debug)]
pub struct VerifyStage {
    params: VerifyParams,
    policy: OnUnknown,
    judge: Option<(String, TeacherConfig)>,
}

#[async_trait]
impl Stage for VerifyStage {
    fn identity(&self) -> Result<Value, StageError> {
        let mut identity = json!({
            "on_unknown": self.policy,
            "judge_model": self.judge.as_ref().map(|(_, t)| &t.model),
            "judge_template": (self.policy == OnUnknown::Judge).then_some(&self.params.judge_template),
            "judge_max_tokens": (self.policy == OnUnknown::Judge).then_some(self.params.judge_max_tokens),
        });
        // Only for a simulated judge, so real judges keep their fingerprints.
        if let Some(sim) = self.judge.as_ref().and_then(|(_, t)| t.simulated.as_ref()) {
            identity["judge_simulated"] = json!(sim);
        }
        Ok(identity)
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let (items, _) = pending_items(ctx).await?;
        let mut decided = Vec::with_capacity(items.len());
        let mut undecided = Vec::new();
        for item in &items {
            let gold = item.reference.as_deref().unwrap_or("");
            let outcome = verify(gold, &item.answer);
            let extracted = outcome.extracted.as_ref().map(|e| e.text.clone());
            let v = |kept: bool, reason: Option<&str>, label: &str| NewVerdict {
                generation_id: item.generation_id,
                kept,
                reason: reason.map(str::to_string),
                detail: Some(outcome.detail.clone()),
                label: Some(label.to_string()),
                extracted: extracted.clone(),
                related_id: None,
            };
            match (outcome.verdict, self.policy) {
                (Verdict::Correct, _) => decided.push(v(true, None, "correct")),
                (Verdict::Incorrect, _) => decided.push(v(false, Some("incorrect"), "incorrect")),
                (Verdict::Unknown, OnUnknown::Drop) => {
                    decided.push(v(false, Some("unverified"), "unknown"))
                }
                (Verdict::Unknown, OnUnknown::Keep) => decided.push(v(true, None, "unknown")),
                (Verdict::Unknown, OnUnknown::Judge) => undecided.push((item.clone(), extracted)),
            }
        }
        write_verdicts(ctx, &decided).await?;

        if let Some((name, config)) = &self.judge
            && !undecided.is_empty()
        {
            let client = distill_teacher::connect(config)
                .await
                .map_err(|e| StageError::Input(format!("judge `{name}`: {e}")))?;
            let concurrency = config.max_concurrency * config.endpoint_count();
            self.judge_all(ctx, &client, undecided, concurrency).await?;
        }
        summary(ctx).await
    }
}

impl VerifyStage {
    /// Asks the judge about each undecided item, committing each verdict as it comes.
    async fn judge_all(
        &self,
        ctx: &StageContext,
        judge: &dyn ChatModel,
        items: Vec<(Item, Option<String>)>,
        concurrency: usize,
    ) -> Result<(), StageError> {
        let mut failures = 0usize;
        let mut last_error = String::new();
        let template = &self.params.judge_template;
        let max_tokens = self.params.judge_max_tokens;
        let ask = move |(item, extracted): (Item, Option<String>)| async move {
            let candidate = extracted.clone().unwrap_or_else(|| item.answer.clone());
            let prompt = template
                .replace("{problem}", &item.prompt)
                .replace("{reference}", item.reference.as_deref().unwrap_or(""))
                .replace("{candidate}", &candidate);
            let request = ChatRequest {
                temperature: Some(0.0),
                max_tokens: Some(max_tokens),
                ..ChatRequest::new(vec![Message::user(prompt)])
            };
            let reply = judge.chat(&request).await;
            (item, extracted, reply)
        };
        let mut replies = futures::stream::iter(items)
            .map(ask)
            .buffer_unordered(concurrency.max(1));
        while let Some((item, extracted, reply)) = replies.next().await {
            if ctx.cancel.is_cancelled() {
                break;
            }
            let verdict = match reply {
                Ok(completions) => {
                    let answer = completions.first().map(|c| c.answer.as_str()).unwrap_or("");
                    let (kept, label, reason) = match parse_judgement(answer) {
                        Some(true) => (true, "judge_correct", None),
                        Some(false) => (false, "judge_incorrect", Some("incorrect")),
                        None => (false, "judge_unclear", Some("unverified")),
                    };
                    NewVerdict {
                        generation_id: item.generation_id,
                        kept,
                        reason: reason.map(str::to_string),
                        detail: Some(format!("judge said: {}", answer.trim())),
                        label: Some(label.into()),
                        extracted: extracted.clone(),
                        related_id: None,
                    }
                }
                Err(e) => {
                    // Leave it unjudged: resume asks again.
                    failures += 1;
                    last_error = e.to_string();
                    continue;
                }
            };
            write_verdicts(ctx, std::slice::from_ref(&verdict)).await?;
        }
        ctx.check_cancelled()?;
        if failures > 0 {
            return Err(StageError::Failed(format!(
                "the judge could not grade {failures} items (last error: {last_error}); \
                 `distill resume` asks again"
            )));
        }
        Ok(())
    }
}

/// Reads YES/NO from a judge's answer: the first word decides, ignoring case,
/// punctuation and a `\boxed{}` around it.
pub fn parse_judgement(answer: &str) -> Option<bool> {
    let cleaned: String = answer
        .replace("\\boxed", " ")
        .chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                ' '
            }
        })
        .collect();
    match cleaned.split_whitespace().next() {
        Some("YES") | Some("EQUIVALENT") | Some("CORRECT") => Some(true),
        Some("NO") | Some("INCORRECT") => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judgements_are_read_from_the_first_word() {
        assert_eq!(parse_judgement("YES"), Some(true));
        assert_eq!(parse_judgement("  no."), Some(false));
        assert_eq!(parse_judgement("\\boxed{Yes}"), Some(true));
        assert_eq!(parse_judgement("Maybe"), None);
        assert_eq!(parse_judgement(""), None);
    }
}
