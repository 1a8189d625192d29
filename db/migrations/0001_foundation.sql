-- Foundation schema: runs, their stages, and the prompts that load stages produce.
-- Times are unix milliseconds. Every item table references its stage with
-- ON DELETE CASCADE, so resetting a stage (its fingerprint changed) is one DELETE.

CREATE TABLE runs (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL UNIQUE,
    config_path  TEXT    NOT NULL,          -- the config file the run was last started from
    config       TEXT    NOT NULL,          -- its text, so `resume` needs no file
    workdir      TEXT    NOT NULL,          -- relative paths in the config resolve against it
    status       TEXT    NOT NULL CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
    owner_pid    INTEGER,                   -- process executing the run, NULL when none
    heartbeat_at INTEGER,                   -- a stale heartbeat means the owner died
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);

CREATE TABLE stages (
    id           INTEGER PRIMARY KEY,
    run_id       INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name         TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    position     INTEGER NOT NULL,          -- topological position, for display
    needs        TEXT    NOT NULL,          -- JSON array of stage names
    params       TEXT    NOT NULL,          -- the stage's identity: resolved parameters and input hashes
    fingerprint  TEXT    NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    items_total  INTEGER,
    items_done   INTEGER NOT NULL DEFAULT 0,
    items_failed INTEGER NOT NULL DEFAULT 0,
    summary      TEXT,                      -- JSON the stage reports when it finishes
    started_at   INTEGER,
    finished_at  INTEGER,
    elapsed_ms   INTEGER NOT NULL DEFAULT 0, -- summed over attempts
    UNIQUE (run_id, name)
);

CREATE TABLE prompts (
    id           INTEGER PRIMARY KEY,
    stage_id     INTEGER NOT NULL REFERENCES stages (id) ON DELETE CASCADE,
    idx          INTEGER NOT NULL,          -- position in the stage's output order
    source_id    TEXT    NOT NULL,          -- id from the file (id_field), else the record number
    prompt       TEXT    NOT NULL,
    answer       TEXT,                      -- reference answer, when the file has one
    content_hash TEXT    NOT NULL,          -- xxh3-128 of prompt and answer
    extra        TEXT,                      -- the record's other fields, as JSON
    UNIQUE (stage_id, idx)
);
CREATE INDEX prompts_content_hash ON prompts (content_hash);
