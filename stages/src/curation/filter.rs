//! The `filter` stage: the R1 recipe's format rules (truncation, length bounds,
//! language mixing, repetition, long paragraphs, code blocks), each failure
//! recorded as a reason.

use std::sync::Arc;

use async_trait::async_trait;
use distill_curate::filter::{Filter, FilterConfig, Trace};
use serde_json::Value;

use super::{check_needs, drop, keep, pending_items, summary, write_verdicts};
use crate::{BuildEnv, ParamError, Stage, StageContext, StageError, StageKind, parse_params};

/// The `filter` stage kind.
pub struct FilterKind;

impl StageKind for FilterKind {
    fn name(&self) -> &'static str {
        "filter"
    }
    fn about(&self) -> &'static str {
        "drop traces that are truncated, too long or short, language-mixed, repetitive, or hold code"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, params: toml::Table, env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let config: FilterConfig = parse_params(params)?;
        check_needs(env)?;
        let filter =
            Filter::new(config.clone()).map_err(|e| ParamError::new("*", e.to_string()))?;
        Ok(Arc::new(FilterStage { config, filter }))
    }
}

/// A configured `filter` stage.
#[derive(Debug)]
pub struct FilterStage {
    config: FilterConfig,
    filter: Filter,
}

#[async_trait]
impl Stage for FilterStage {
    fn identity(&self) -> Result<Value, StageError> {
        Ok(serde_json::to_value(&self.config).expect("config serialises"))
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let (items, _) = pending_items(ctx).await?;
        let verdicts: Vec<_> = items
            .iter()
            .map(|item| {
                let rejections = self.filter.check(&Trace {
                    reasoning: &item.reasoning,
                    answer: &item.answer,
                    finish_reason: item.finish_reason.as_deref(),
                    raw: None,
                });
                match rejections.first() {
                    None => keep(item),
                    Some(first) => drop(
                        item,
                        first.reason.as_str(),
                        rejections
                            .iter()
                            .map(|r| format!("{}: {}", r.reason.as_str(), r.detail))
                            .collect::<Vec<_>>()
                            .join("; "),
                    ),
                }
            })
            .collect();
        write_verdicts(ctx, &verdicts).await?;
        summary(ctx).await
    }
}
