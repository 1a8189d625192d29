//! Stage kinds that exist only to test the executor (feature `test-stages`).
//!
//! They go through the same [`StageKind`]/[`Stage`] traits as the real ones, but a
//! shipped binary never offers them: the feature is enabled only by the workspace's
//! dev-dependencies.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distill_db::prompts::{self, NewPrompt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    BuildEnv, ParamError, Registry, RetryPolicy, Stage, StageContext, StageError, StageKind,
    parse_params,
};

/// Adds the test-only kinds to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(Box::new(TestItemsKind));
}

/// `test_items`: writes `count` synthetic prompts, one transaction each, slowly.
pub struct TestItemsKind;

/// Parameters of `test_items`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TestItemsParams {
    /// Items to write.
    pub count: u64,
    /// Text of each item, suffixed with its index.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Pause before each item, so tests can interrupt mid-stage.
    #[serde(default)]
    pub delay_ms: u64,
    /// The first N attempts fail after writing half the items.
    #[serde(default)]
    pub fail_attempts: u32,
    /// Attempts the executor makes before giving up (the stage is retryable).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

fn default_prefix() -> String {
    "item".into()
}
fn default_attempts() -> u32 {
    1
}

impl StageKind for TestItemsKind {
    fn name(&self) -> &'static str {
        "test_items"
    }
    fn about(&self) -> &'static str {
        "test only: writes synthetic items slowly"
    }
    fn version(&self) -> u32 {
        1
    }
    fn build(&self, params: toml::Table, _env: &BuildEnv) -> Result<Arc<dyn Stage>, ParamError> {
        let params: TestItemsParams = parse_params(params)?;
        Ok(Arc::new(TestItems { params }))
    }
}

/// A configured `test_items` stage.
#[derive(Debug)]
pub struct TestItems {
    params: TestItemsParams,
}

#[async_trait]
impl Stage for TestItems {
    fn identity(&self) -> Result<Value, StageError> {
        Ok(json!({ "count": self.params.count, "prefix": self.params.prefix }))
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.params.max_attempts,
            initial_backoff: Duration::from_millis(50),
        }
    }

    async fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let p = &self.params;
        let done = prompts::indices(ctx.db.pool(), ctx.stage_id).await?;
        ctx.progress.set_total(p.count);
        ctx.progress.set_done(done.len() as u64);
        let mut written = 0u64;
        for i in 0..p.count as i64 {
            if done.binary_search(&i).is_ok() {
                continue;
            }
            ctx.check_cancelled()?;
            if ctx.attempt <= p.fail_attempts && i as u64 >= p.count / 2 {
                return Err(StageError::Failed(format!(
                    "planned failure on attempt {}",
                    ctx.attempt
                )));
            }
            tokio::time::sleep(Duration::from_millis(p.delay_ms)).await;
            let text = format!("{}-{i}", p.prefix);
            let mut tx = ctx.db.write().await?;
            prompts::insert(
                &mut tx,
                ctx.stage_id,
                i,
                &NewPrompt {
                    source_id: i.to_string(),
                    content_hash: crate::hash::hex128(text.as_bytes()),
                    prompt: text,
                    answer: None,
                    extra: None,
                },
            )
            .await?;
            tx.commit().await?;
            written += 1;
            ctx.progress.inc(1);
        }
        Ok(json!({ "written": written, "reused": done.len() }))
    }
}
