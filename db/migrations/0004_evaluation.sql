-- Benchmark evaluation: one row per sample (so a killed evaluation resumes where it
-- stopped) and the scores computed from them, each with the protocol it followed.

CREATE TABLE eval_samples (
    id            INTEGER PRIMARY KEY,
    stage_id      INTEGER NOT NULL REFERENCES stages (id) ON DELETE CASCADE,
    target        TEXT    NOT NULL,   -- what was evaluated: model:DIR, teacher:NAME, checkpoint:ID
    item_id       TEXT    NOT NULL,   -- the benchmark question
    sample_index  INTEGER NOT NULL,
    output        TEXT    NOT NULL,   -- the whole response
    extracted     TEXT,               -- the answer found in it
    verdict       TEXT    NOT NULL,   -- correct, incorrect, unknown
    vote_key      TEXT,               -- normalised answer, for majority votes
    tokens        INTEGER,
    finish_reason TEXT,
    created_at    INTEGER NOT NULL,
    UNIQUE (stage_id, target, item_id, sample_index)
);

CREATE TABLE scores (
    id            INTEGER PRIMARY KEY,
    stage_id      INTEGER NOT NULL REFERENCES stages (id) ON DELETE CASCADE,
    target        TEXT    NOT NULL,
    label         TEXT    NOT NULL,   -- how tables name the target
    step          INTEGER,            -- training step, for checkpoints
    benchmark     TEXT    NOT NULL,
    metric        TEXT    NOT NULL,   -- pass@1, pass@K, cons@K
    value         REAL    NOT NULL,
    stderr        REAL    NOT NULL,
    questions     INTEGER NOT NULL,
    protocol      TEXT    NOT NULL,   -- JSON: samples, temperature, top_p, max_tokens, template hash, ...
    protocol_hash TEXT    NOT NULL,   -- equal hashes = comparable numbers
    created_at    INTEGER NOT NULL,
    UNIQUE (stage_id, target, metric)
);
