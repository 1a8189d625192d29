//! Scoring through an inference server the stage starts itself (vLLM, SGLang, `transformers
//! serve`, llama.cpp's server): one server per model folder, started from a command template,
//! waited for on `/v1/models`, stopped before the next.
//!
//! The server runs in a process group of its own, so stopping it reaches the workers it spawns
//! (vLLM's engine processes). Its group id goes to a pid file in the stage's artifacts before
//! anything else happens; a `distill` killed while scoring leaves that file behind, and the next
//! attempt of the stage stops whatever is left of that group before starting anew.

use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::StageError;

/// `serve = { command = "...", ... }` of an `evaluate` stage.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeParams {
    /// Shell command starting an OpenAI-compatible server: `{model}` becomes the model folder
    /// (quoted) and `{port}` a free local port.
    pub command: String,
    /// Seconds to wait for `/v1/models` to answer.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_s: u64,
    /// Seconds between SIGTERM and SIGKILL when stopping it.
    #[serde(default = "default_grace")]
    pub stop_grace_s: u64,
    /// Requests in flight to the server.
    #[serde(default = "default_concurrency")]
    pub max_concurrency: usize,
}

fn default_ready_timeout() -> u64 {
    900
}
fn default_grace() -> u64 {
    30
}
fn default_concurrency() -> usize {
    64
}

impl ServeParams {
    /// Checks the template; the message names what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if !self.command.contains("{model}") {
            return Err("`command` must contain `{model}` (the model folder)".into());
        }
        if !self.command.contains("{port}") {
            return Err("`command` must contain `{port}` (a free port chosen at start)".into());
        }
        if self.max_concurrency == 0 {
            return Err("`max_concurrency` must be at least 1".into());
        }
        Ok(())
    }
}

/// What the pid file records: enough to recognise the group later.
#[derive(Debug, Serialize, Deserialize)]
struct PidFile {
    pgid: i32,
    /// Start time of the group leader (clock ticks since boot, `/proc/PID/stat` field 22).
    start_ticks: u64,
    command: String,
}

/// A running server; stop it with [`Server::stop`] (dropping it kills the group outright).
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    pgid: i32,
    port: u16,
    model: String,
    log: PathBuf,
    pid_file: PathBuf,
    grace: Duration,
}

impl Server {
    /// Starts `params.command` for `model_dir`, logging to `log`, and waits until it serves.
    pub async fn start(
        params: &ServeParams,
        model_dir: &Path,
        artifacts: &Path,
        log_name: &str,
        cancel: &CancellationToken,
    ) -> Result<Server, StageError> {
        let io = |what: &str, e: std::io::Error| StageError::Failed(format!("{what}: {e}"));
        std::fs::create_dir_all(artifacts).map_err(|e| io("creating the artifacts folder", e))?;
        let pid_file = artifacts.join("serve.pid");
        stop_leftover(&pid_file, Duration::from_secs(params.stop_grace_s)).await;
        let port = free_port().map_err(|e| io("finding a free port", e))?;
        let command = params
            .command
            .replace("{model}", &shell_quote(&model_dir.display().to_string()))
            .replace("{port}", &port.to_string());
        let log = artifacts.join(log_name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| io(&format!("opening {}", log.display()), e))?;
        let err = out.try_clone().map_err(|e| io("opening the log", e))?;
        tracing::info!("starting the server: {command} (log: {})", log.display());
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new("sh")
                .arg("-c")
                .arg(&command)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .process_group(0)
                .spawn()
                .map_err(|e| StageError::Input(format!("serve: cannot run `{command}`: {e}")))?
        };
        let pgid = child.id() as i32;
        let record = PidFile {
            pgid,
            start_ticks: start_ticks(pgid).unwrap_or(0),
            command: command.clone(),
        };
        let mut server = Server {
            child: Some(child),
            pgid,
            port,
            model: String::new(),
            log,
            pid_file,
            grace: Duration::from_secs(params.stop_grace_s),
        };
        let json = serde_json::to_vec(&record).expect("pid record serialises");
        if let Err(e) = std::fs::write(&server.pid_file, json) {
            server.kill();
            return Err(io("writing the pid file", e));
        }
        match server
            .wait_ready(Duration::from_secs(params.ready_timeout_s), cancel)
            .await
        {
            Ok(model) => {
                server.model = model;
                Ok(server)
            }
            Err(e) => {
                server.stop().await;
                Err(e)
            }
        }
    }

    /// The OpenAI base URL.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// The model name `/v1/models` listed first.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Polls `/v1/models` until it lists a model; fails when the process exits, the time is
    /// up, or the stage is cancelled.
    async fn wait_ready(
        &mut self,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<String, StageError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .map_err(|e| StageError::Failed(format!("http client: {e}")))?;
        let url = format!("{}/models", self.base_url());
        let started = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(StageError::Failed(format!(
                    "the server exited ({status}) before it was ready; last lines of {}:\n{}",
                    self.log.display(),
                    tail(&self.log, 20)
                )));
            }
            if let Ok(resp) = http.get(&url).send().await
                && resp.status().is_success()
                && let Ok(body) = resp.json::<serde_json::Value>().await
                && let Some(id) = body["data"][0]["id"].as_str()
            {
                tracing::info!(
                    "server ready on port {} after {:.0} s, serving `{id}`",
                    self.port,
                    started.elapsed().as_secs_f64()
                );
                return Ok(id.to_string());
            }
            if started.elapsed() >= timeout {
                return Err(StageError::Failed(format!(
                    "the server did not answer {url} within {} s; last lines of {}:\n{}",
                    timeout.as_secs(),
                    self.log.display(),
                    tail(&self.log, 20)
                )));
            }
            if cancel.is_cancelled() {
                return Err(StageError::Interrupted);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// SIGTERM to the group, SIGKILL after the grace period, then forgets the pid file.
    pub async fn stop(mut self) {
        stop_group(self.pgid, self.grace).await;
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }

    fn kill(&mut self) {
        signal_group(self.pgid, libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill();
        }
    }
}

/// Stops what is left of a server a killed `distill` started, if its pid file says one ran.
async fn stop_leftover(pid_file: &Path, grace: Duration) {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    if let Ok(rec) = serde_json::from_str::<PidFile>(&text) {
        // The leader, or any process still in its group that started after it (its workers),
        // is ours; a group id reused by someone else since would have started earlier than
        // nothing of ours and is left alone only if its leader's start time differs.
        let leader_is_ours = start_ticks(rec.pgid) == Some(rec.start_ticks);
        let members = group_members(rec.pgid, rec.start_ticks);
        if leader_is_ours || !members.is_empty() {
            tracing::warn!(
                "stopping a server left running by an interrupted attempt (process group {}): {}",
                rec.pgid,
                rec.command
            );
            stop_group(rec.pgid, grace).await;
        }
    }
    let _ = std::fs::remove_file(pid_file);
}

/// SIGTERM, then SIGKILL once `grace` has passed with members left.
async fn stop_group(pgid: i32, grace: Duration) {
    signal_group(pgid, libc::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if !group_alive(pgid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal_group(pgid, libc::SIGKILL);
}

fn signal_group(pgid: i32, signal: i32) {
    if pgid > 1 {
        // SAFETY: killpg only sends a signal; a vanished group gives ESRCH, which is fine.
        unsafe {
            libc::killpg(pgid, signal);
        }
    }
}

/// Whether a process of the group still runs (zombies of our own children count as gone).
fn group_alive(pgid: i32) -> bool {
    !group_members(pgid, 0).is_empty()
}

/// Live (not zombie) processes whose process group is `pgid` and that started at or after
/// `since` ticks.
fn group_members(pgid: i32, since: u64) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            proc_stat(pid)
                .is_some_and(|(state, pgrp, start)| pgrp == pgid && state != 'Z' && start >= since)
        })
        .collect()
}

/// (state, process group, start time in ticks) from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let pgrp = fields.get(2)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, pgrp, start))
}

fn start_ticks(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, _, s)| s)
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

/// `s` as one POSIX shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The last `n` lines of a log (read from its last 64 KiB).
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return "(no log)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let lines: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .collect();
    let start = lines.len().saturating_sub(n);
    let text = lines[start..].join("\n");
    if text.trim().is_empty() {
        "(empty log)".into()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_the_shell() {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote("a b'c$HOME")))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "a b'c$HOME");
    }

    #[test]
    fn templates_need_model_and_port() {
        let p = |c: &str| ServeParams {
            command: c.into(),
            ready_timeout_s: 1,
            stop_grace_s: 1,
            max_concurrency: 1,
        };
        assert!(p("vllm serve {model} --port {port}").check().is_ok());
        assert!(
            p("vllm serve {model}")
                .check()
                .unwrap_err()
                .contains("{port}")
        );
        assert!(
            p("vllm serve x --port {port}")
                .check()
                .unwrap_err()
                .contains("{model}")
        );
    }

    #[tokio::test]
    async fn a_group_is_stopped_with_its_children() {
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new("sh")
                .arg("-c")
                .arg("trap '' TERM; sleep 30 & sleep 30 & wait")
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let pgid = child.id() as i32;
        std::thread::sleep(Duration::from_millis(200));
        assert!(group_members(pgid, 0).len() >= 2, "the group runs");
        // The shell ignores SIGTERM: SIGKILL after the grace period ends it too.
        stop_group(pgid, Duration::from_millis(300)).await;
        let mut child = child;
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !group_alive(pgid),
            "members left: {:?}",
            group_members(pgid, 0)
        );
    }
}
