-- GRPO: one row of reward and policy figures per optimizer step, and a sample of the
-- rollouts each generated batch drew (completion text, reward, verdict). The loss, learning
-- rate and gradient norm also go to train_metrics, so loss views cover GRPO stages.

CREATE TABLE grpo_steps (
    stage_id          INTEGER NOT NULL REFERENCES stages (id) ON DELETE CASCADE,
    step              INTEGER NOT NULL,
    batch             INTEGER NOT NULL,   -- the generated batch it learned from
    reward_mean       REAL    NOT NULL,
    reward_std        REAL    NOT NULL,
    pass_rate         REAL    NOT NULL,   -- completions the verifier judged correct
    zero_std_groups   REAL    NOT NULL,   -- fraction of groups with equal rewards
    kl                REAL,               -- mean per-token k3 KL to the reference (beta > 0)
    clip_fraction     REAL    NOT NULL,
    completion_tokens REAL    NOT NULL,   -- mean completion length
    entropy           REAL    NOT NULL,
    loss              REAL    NOT NULL,
    created_at        INTEGER NOT NULL,
    PRIMARY KEY (stage_id, step)
) WITHOUT ROWID;

CREATE TABLE grpo_rollouts (
    stage_id   INTEGER NOT NULL REFERENCES stages (id) ON DELETE CASCADE,
    batch      INTEGER NOT NULL,
    prompt_id  INTEGER NOT NULL REFERENCES prompts (id) ON DELETE CASCADE,
    sample     INTEGER NOT NULL,
    completion TEXT    NOT NULL,
    reward     REAL    NOT NULL,
    verdict    TEXT    NOT NULL,          -- correct / incorrect / unknown
    tokens     INTEGER NOT NULL,
    PRIMARY KEY (stage_id, batch, prompt_id, sample)
) WITHOUT ROWID;
