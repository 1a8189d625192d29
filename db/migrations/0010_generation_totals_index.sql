-- `distill status` and `distill funnel` total each stage's samples by status, cache,
-- finish reason and tokens. With the traces' text in the same rows that read every page
-- of the table (0.4 s after a 200,000-trace import); this index holds only those columns,
-- so the totals read it alone. It also serves every lookup by (stage_id, status), which
-- the index it replaces was for.
DROP INDEX generations_failed;
CREATE INDEX generations_totals ON generations (
    stage_id, status, cached, finish_reason, prompt_tokens, completion_tokens, reasoning_tokens
);
