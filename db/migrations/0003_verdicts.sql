-- Curation verdicts: one row per (curation stage, generation). A curation stage's
-- output is the set of generations it kept; the next stage reads only those.

CREATE TABLE verdicts (
    id            INTEGER PRIMARY KEY,
    stage_id      INTEGER NOT NULL REFERENCES stages (id) ON DELETE CASCADE,
    generation_id INTEGER NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    kept          INTEGER NOT NULL,         -- 1 kept, 0 dropped
    reason        TEXT,                     -- why dropped (snake_case), NULL when kept
    detail        TEXT,                     -- explanation for people
    label         TEXT,                     -- verify: correct, incorrect, unknown, judge_correct, ...
    extracted     TEXT,                     -- verify: the answer found in the response
    related_id    INTEGER,                  -- dedupe: the generation kept in this one's place
    created_at    INTEGER NOT NULL,
    UNIQUE (stage_id, generation_id)
);
CREATE INDEX verdicts_stage_kept ON verdicts (stage_id, kept);
