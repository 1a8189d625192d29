-- Beside each score, how its samples ended: the share that stopped on the token
-- budget (a response cut inside its reasoning has no answer, so a high share
-- explains a low score) and the mean generated tokens. NULL where unknown.

ALTER TABLE scores ADD COLUMN truncated REAL;     -- share of samples with finish_reason 'length'
ALTER TABLE scores ADD COLUMN mean_tokens REAL;   -- mean tokens generated per sample

-- Scores recorded before this migration get the figures from their samples.
UPDATE scores SET
    truncated = (SELECT AVG(e.finish_reason = 'length') FROM eval_samples e
                 WHERE e.stage_id = scores.stage_id AND e.target = scores.target),
    mean_tokens = (SELECT AVG(e.tokens) FROM eval_samples e
                   WHERE e.stage_id = scores.stage_id AND e.target = scores.target);
