-- What each checkpoint folder held when it was saved: a JSON array of
-- {"path", "size", "xxh3"} (paths relative to the folder, xxh3-128 in hex), so a resume
-- can tell a damaged checkpoint from an intact one. NULL for checkpoints saved before
-- this column existed: those cannot be verified.

ALTER TABLE checkpoints ADD COLUMN files TEXT;
