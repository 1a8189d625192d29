-- Teacher samples written by `generate` stages, and the response cache.

CREATE TABLE generations (
    id                 INTEGER PRIMARY KEY,
    stage_id           INTEGER NOT NULL REFERENCES stages (id) ON DELETE CASCADE,
    prompt_id          INTEGER NOT NULL REFERENCES prompts (id) ON DELETE CASCADE,
    sample_index       INTEGER NOT NULL,
    status             TEXT    NOT NULL CHECK (status IN ('ok', 'failed')),
    reasoning          TEXT,
    answer             TEXT,
    finish_reason      TEXT,
    prompt_tokens      INTEGER,
    completion_tokens  INTEGER,
    reasoning_tokens   INTEGER,
    latency_ms         INTEGER,
    endpoint           TEXT,
    model              TEXT,                -- as the server named itself
    system_fingerprint TEXT,
    request_hash       TEXT    NOT NULL,    -- key into teacher_cache
    cached             INTEGER NOT NULL DEFAULT 0, -- 1 when served from teacher_cache
    attempts           INTEGER NOT NULL DEFAULT 1, -- HTTP attempts the client made
    error_kind         TEXT,                -- failed samples: rate_limited, timeout, auth, ...
    error              TEXT,
    created_at         INTEGER NOT NULL,
    UNIQUE (stage_id, prompt_id, sample_index)
);
CREATE INDEX generations_failed ON generations (stage_id, status);

-- Completions by the hash of the exact request body (never containing credentials)
-- and the choice index, so that a rerun with the same parameters pays nothing.
-- A rowid table on purpose: rows are ~16 KB, and WITHOUT ROWID would drag every row's
-- overflow pages through each key comparison (measured: 15-20% of generate's CPU).
CREATE TABLE teacher_cache (
    request_hash TEXT    NOT NULL,
    choice       INTEGER NOT NULL,
    completion   TEXT    NOT NULL,          -- JSON of the normalised completion
    created_at   INTEGER NOT NULL,
    UNIQUE (request_hash, choice)
);
