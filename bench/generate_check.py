#!/usr/bin/env python3
"""Helpers for bench/generate.sh (python's sqlite3, since the sqlite3 CLI may be absent).

    generate_check.py count DB STATUS_JSON   -> "<ok rows> <avg bytes> <generate stage ms>"
    generate_check.py alter DB rowid|off     -> replace `teacher_cache` (diagnostics only)
"""

import json
import sqlite3
import sys


def count(db_path, status_path):
    db = sqlite3.connect(db_path)
    ok, avg = db.execute(
        "SELECT count(*), avg(length(reasoning) + length(answer))"
        " FROM generations WHERE status = 'ok'"
    ).fetchone()
    db.close()
    with open(status_path) as f:
        st = json.load(f)
    ms = next(s["elapsed_ms"] for s in st["stages"] if s["kind"] == "generate")
    print(ok, int(avg or 0), ms)


def alter(db_path, how):
    db = sqlite3.connect(db_path)
    db.execute("DROP TABLE teacher_cache")
    if how == "rowid":
        # The shipped columns and key, as an ordinary rowid table: the key lives in a
        # separate small index instead of beside ~17 KB of JSON in the table b-tree.
        db.execute(
            "CREATE TABLE teacher_cache (request_hash TEXT NOT NULL, choice INTEGER NOT NULL,"
            " completion TEXT NOT NULL, created_at INTEGER NOT NULL,"
            " PRIMARY KEY (request_hash, choice))"
        )
    elif how == "off":
        # Reads as empty and swallows inserts: no second copy of each sample.
        db.executescript(
            "CREATE VIEW teacher_cache AS SELECT '' AS request_hash, 0 AS choice,"
            " '' AS completion, 0 AS created_at WHERE 0;"
            "CREATE TRIGGER teacher_cache_drop INSTEAD OF INSERT ON teacher_cache"
            " BEGIN SELECT 1; END;"
        )
    else:
        raise SystemExit(f"unknown variant {how}")
    db.commit()
    db.close()


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"count": count, "alter": alter}[cmd](*args)
