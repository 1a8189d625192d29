-- Fields a sample carries besides the teacher's reply: an `import` stage records here a
-- published dataset's own per-trace columns (correctness flags, completeness), as JSON,
-- so they stay inspectable without ever standing in for `verify`.

ALTER TABLE generations ADD COLUMN extra TEXT;
