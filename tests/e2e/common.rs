//! Helpers shared by the end-to-end tests: a scratch working directory, the real
//! `distill` binary, and read access to the job database it writes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

/// A scratch working directory in which `distill` runs with `./distill.db`.
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn db_path(&self) -> PathBuf {
        self.path().join("distill.db")
    }

    /// Writes a file relative to the working directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A `distill` command running in this directory.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
        c.args(args)
            .current_dir(self.path())
            .env("RUST_LOG", "info")
            .env_remove("DISTILL_DB")
            .stdin(Stdio::null());
        c
    }

    /// Runs `distill` to completion.
    pub fn run(&self, args: &[&str]) -> Out {
        let output = self.cmd(args).output().expect("run distill");
        Out(output)
    }

    /// Starts `distill` in the background.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn distill")
    }

    /// Runs `distill` with `args` and SIGKILLs it once `count_sql` counts at least `at_least`
    /// rows (within `timeout`): the crash point of the kill-and-resume tests. Returns a pool on
    /// the database it left.
    pub async fn run_until_killed(
        &self,
        args: &[&str],
        count_sql: &str,
        at_least: i64,
        timeout: Duration,
    ) -> SqlitePool {
        let mut child = self.spawn(args);
        wait_until(Duration::from_secs(60), || async {
            self.db_path().exists()
        })
        .await;
        let db = self.db().await;
        wait_until(timeout, || async {
            poll_count(&db, count_sql).await >= at_least
        })
        .await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        db
    }

    /// `distill status --json` for the latest (or named) run.
    pub fn status(&self, run: Option<&str>) -> Value {
        let mut args = vec!["status", "--json"];
        args.extend(run);
        let out = self.run(&args);
        out.ok();
        serde_json::from_str(&out.stdout()).expect("status --json is JSON")
    }

    /// A connection to the job database (tests only read through it).
    pub async fn db(&self) -> SqlitePool {
        let opts = SqliteConnectOptions::new()
            .filename(self.db_path())
            .busy_timeout(Duration::from_secs(10));
        SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .expect("open job database")
    }

    /// Bytes of the job database and whether a WAL file lingers: equal before and
    /// after a command means the command changed nothing.
    pub fn db_snapshot(&self) -> (Option<Vec<u8>>, bool) {
        let wal = self.path().join("distill.db-wal");
        (
            std::fs::read(self.db_path()).ok(),
            wal.exists()
                && std::fs::metadata(&wal)
                    .map(|m| m.len() > 0)
                    .unwrap_or(false),
        )
    }
}

/// The output of a finished command.
pub struct Out(pub Output);

impl Out {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    /// Asserts success and returns self.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert!(
            self.0.status.success(),
            "distill failed ({:?})\nstdout:\n{}\nstderr:\n{}",
            self.0.status,
            self.stdout(),
            self.stderr()
        );
        self
    }
}

/// `distill validate` rejects each config text with exit 2 and a message containing
/// its expected fragment.
#[track_caller]
pub fn assert_invalid_configs(w: &Workdir, cases: &[(String, &str)]) {
    for (text, expected) in cases {
        w.write("bad.toml", text);
        let out = w.run(&["validate", "bad.toml"]);
        assert_eq!(out.code(), 2, "{expected}");
        assert!(
            out.stderr().contains(expected),
            "{expected}: {}",
            out.stderr()
        );
    }
}

/// The stage called `name` in a `status --json` document.
pub fn stage<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {status:#}"))
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met within {timeout:?}");
}

/// A count for polling while `distill` runs: 0 until the database is ready (the
/// file exists before its migrations have run).
pub async fn poll_count(pool: &SqlitePool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(0)
}

/// Rows of `prompts` written by the stage `name` of the latest run.
pub async fn prompt_rows(pool: &SqlitePool, stage: &str) -> Vec<(i64, i64, String)> {
    sqlx::query_as(
        "SELECT p.id, p.idx, p.prompt FROM prompts p JOIN stages s ON s.id = p.stage_id
         WHERE s.name = ? ORDER BY p.idx",
    )
    .bind(stage)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Sends SIGINT (Ctrl-C) to a child.
pub fn interrupt(child: &Child) {
    // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0, "kill(SIGINT) failed");
}

/// A tiny random Qwen2 (the student parity fixture) with the minimind tokenizer and
/// its chat template, written to `dir`.
pub fn tiny_model(dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(
            root.join("student/tests/fixtures/parity/qwen2-tied")
                .join(f),
            dir.join(f),
        )
        .unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(
            root.join("tests/fixtures/tokenizers/minimind").join(f),
            dir.join(f),
        )
        .unwrap();
    }
}
