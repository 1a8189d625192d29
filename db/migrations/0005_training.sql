-- Training: one metrics row per optimizer step, one row per saved checkpoint.

CREATE TABLE train_metrics (
    stage_id          INTEGER NOT NULL REFERENCES stages (id) ON DELETE CASCADE,
    step              INTEGER NOT NULL,
    epoch             REAL    NOT NULL,
    loss              REAL    NOT NULL,
    lr                REAL    NOT NULL,
    grad_norm         REAL,
    tokens            INTEGER NOT NULL,   -- target tokens in the step
    tokens_per_s      REAL,
    peak_memory_bytes INTEGER,
    created_at        INTEGER NOT NULL,
    PRIMARY KEY (stage_id, step)
) WITHOUT ROWID;

CREATE TABLE checkpoints (
    id         INTEGER PRIMARY KEY,
    stage_id   INTEGER NOT NULL REFERENCES stages (id) ON DELETE CASCADE,
    step       INTEGER NOT NULL,
    path       TEXT    NOT NULL,          -- folder in Hugging Face layout plus trainer state
    final      INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    UNIQUE (stage_id, step)
);
