//! Training across processes: where this process sits among them (torchrun's and Slurm's
//! variables), and the collectives that keep their replicas identical.
//!
//! One process per device, as torchrun and `srun` start PyTorch jobs. Rank 0 listens on
//! `MASTER_ADDR:MASTER_PORT`; every other rank connects to it. The collectives are a star over
//! those TCP connections: rank 0 gathers, reduces in rank order and broadcasts. That makes the
//! sum's order, and so its bits, the same as one process's replicas summed in device order, at
//! the cost of rank 0's bandwidth: it is the CPU path and the fallback for any device (tensors
//! cross through host memory). NCCL's ring all-reduce on device memory is the fast path this
//! trait leaves room for; it is not written yet.
//!
//! Written on `std::net` rather than taken from a crate: what is needed is two primitives on
//! byte frames (gather to rank 0, broadcast from it) plus a rendezvous, and the crates that
//! offer collectives in Rust either wrap MPI (a system library and its launcher) or are
//! Burn's `burn-collective`, whose multi-node path brings an HTTP server and websockets.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use thiserror::Error;

/// A failure to join the processes or to exchange with them.
#[derive(Debug, Error)]
pub enum CollectiveError {
    /// A launcher variable is missing or malformed.
    #[error("environment variable `{name}`: {message}")]
    Env {
        /// The variable.
        name: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The rendezvous did not complete.
    #[error("joining {size} training processes through {master}: {message}")]
    Rendezvous {
        /// `MASTER_ADDR:MASTER_PORT`.
        master: String,
        /// Processes expected.
        size: usize,
        /// What went wrong.
        message: String,
    },
    /// A connection to another rank failed mid-exchange.
    #[error("training process {rank}: {source}")]
    Io {
        /// The other rank.
        rank: usize,
        /// The socket error.
        source: std::io::Error,
    },
    /// Another rank reported an error of its own.
    #[error("training process {rank} failed: {message}")]
    Peer {
        /// The rank that failed.
        rank: usize,
        /// Its error.
        message: String,
    },
    /// A frame did not hold what the protocol expects.
    #[error("training process {rank} sent a malformed message: {message}")]
    Protocol {
        /// The sender.
        rank: usize,
        /// What was wrong.
        message: String,
    },
}

/// Result of a collective operation.
pub type CollectiveResult<T> = Result<T, CollectiveError>;

/// This process's place among the training processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// This process's rank, 0 to `size - 1`; rank 0 owns the job database.
    pub rank: usize,
    /// Number of processes.
    pub size: usize,
    /// Rank on this node: the GPU this process trains on.
    pub local_rank: usize,
    /// `MASTER_ADDR:MASTER_PORT`, where rank 0 listens.
    pub master: String,
}

/// torchrun's default `MASTER_PORT`.
const DEFAULT_PORT: u16 = 29500;

impl World {
    /// Reads the launcher's variables: torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `MASTER_ADDR`, `MASTER_PORT`), else Slurm's for a task started by `srun`
    /// (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR`). `None` for a
    /// single process.
    pub fn from_env() -> CollectiveResult<Option<World>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`World::from_env`] over any variable lookup (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> CollectiveResult<Option<World>> {
        let number = |name: &'static str| -> CollectiveResult<Option<usize>> {
            var(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| CollectiveError::Env {
                        name,
                        message: format!("`{v}` is not a non-negative integer"),
                    })
                })
                .transpose()
        };
        // `SLURM_STEP_ID` marks a task `srun` started; a batch script alone also sees
        // `SLURM_NTASKS` but is one process.
        let (rank, size, local) = if var("WORLD_SIZE").is_some() {
            (
                number("RANK")?,
                number("WORLD_SIZE")?,
                number("LOCAL_RANK")?,
            )
        } else if var("SLURM_STEP_ID").is_some() && var("SLURM_NTASKS").is_some() {
            (
                number("SLURM_PROCID")?,
                number("SLURM_NTASKS")?,
                number("SLURM_LOCALID")?,
            )
        } else {
            return Ok(None);
        };
        let size = size.unwrap_or(1);
        if size <= 1 {
            return Ok(None);
        }
        let Some(rank) = rank else {
            return Err(CollectiveError::Env {
                name: "RANK",
                message: format!("unset, with {size} processes"),
            });
        };
        if rank >= size {
            return Err(CollectiveError::Env {
                name: "RANK",
                message: format!("{rank} is not below the {size} processes"),
            });
        }
        let Some(addr) = var("MASTER_ADDR").filter(|a| !a.trim().is_empty()) else {
            return Err(CollectiveError::Env {
                name: "MASTER_ADDR",
                message: format!("unset, with {size} processes: the host rank 0 runs on"),
            });
        };
        let port = match var("MASTER_PORT") {
            None => DEFAULT_PORT,
            Some(p) => p.trim().parse::<u16>().map_err(|_| CollectiveError::Env {
                name: "MASTER_PORT",
                message: format!("`{p}` is not a port number"),
            })?,
        };
        Ok(Some(World {
            rank,
            size,
            local_rank: local.unwrap_or(0),
            master: format!("{}:{port}", addr.trim()),
        }))
    }
}

/// The operations the trainer and the stage need between processes. Every rank calls the
/// same operations in the same order.
pub trait Collective: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// Rank 0 sends `payload` to every rank; every rank returns it.
    fn broadcast(&mut self, payload: Option<&[u8]>) -> CollectiveResult<Vec<u8>>;
    /// Every rank sends `payload` to rank 0, which returns all of them in rank order (its own
    /// first); the other ranks return `None`.
    fn gather(&mut self, payload: &[u8]) -> CollectiveResult<Option<Vec<Vec<u8>>>>;
    /// Rank 0 sends `payloads[r]` to each rank r (one payload per rank, its own first); every
    /// rank returns its own.
    fn scatter(&mut self, payloads: Option<Vec<Vec<u8>>>) -> CollectiveResult<Vec<u8>>;
    /// Tells rank 0 (from a worker) or every worker (from rank 0) that this rank failed, in
    /// place of its next message. Best effort: the connection may already be gone.
    fn fail(&mut self, message: &str);
}

/// A group shared by the stage that holds it between jobs and the trainer that uses it.
pub type SharedGroup = std::sync::Arc<std::sync::Mutex<dyn Collective>>;

/// The group, locked. A panic elsewhere while it was held leaves nothing half-written that
/// matters here (a failed exchange already fails the job), so a poisoned lock is taken as is.
pub fn lock(group: &SharedGroup) -> std::sync::MutexGuard<'_, dyn Collective + 'static> {
    group.lock().unwrap_or_else(|e| e.into_inner())
}

/// Frame tags.
const DATA: u8 = 0;
const ERROR: u8 = 1;
/// Rendezvous greeting: magic, protocol version.
const MAGIC: &[u8; 4] = b"DSTL";
const VERSION: u32 = 1;

/// [`Collective`] over TCP: rank 0 holds one connection per other rank.
pub struct TcpGroup {
    rank: usize,
    size: usize,
    /// Rank 0: the connection to rank `i` at index `i` (index 0 unused). Others: rank 0's.
    peers: Vec<Option<TcpStream>>,
}

impl TcpGroup {
    /// Joins the processes of `world`: rank 0 waits for every other rank's connection, the
    /// others connect to rank 0 (retrying while it starts), for at most `timeout`.
    pub fn join(world: &World, timeout: Duration) -> CollectiveResult<TcpGroup> {
        let fail = |message: String| CollectiveError::Rendezvous {
            master: world.master.clone(),
            size: world.size,
            message,
        };
        let deadline = Instant::now() + timeout;
        if world.rank == 0 {
            let addr = world
                .master
                .to_socket_addrs()
                .map_err(|e| fail(format!("cannot resolve: {e}")))?
                .next()
                .ok_or_else(|| fail("resolves to no address".into()))?;
            let listener =
                TcpListener::bind(addr).map_err(|e| fail(format!("cannot listen: {e}")))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| fail(e.to_string()))?;
            let mut peers: Vec<Option<TcpStream>> = (0..world.size).map(|_| None).collect();
            let mut joined = 1;
            while joined < world.size {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false).map_err(|e| fail(e.to_string()))?;
                        s.set_nodelay(true).ok();
                        let (rank, size) = read_hello(&mut s)
                            .map_err(|e| fail(format!("greeting from {from}: {e}")))?;
                        if size != world.size || rank == 0 || rank >= world.size {
                            return Err(fail(format!(
                                "{from} says it is rank {rank} of {size}, expected one of 1..{} of {}",
                                world.size - 1,
                                world.size
                            )));
                        }
                        if peers[rank].is_some() {
                            return Err(fail(format!("rank {rank} joined twice")));
                        }
                        s.write_all(MAGIC).map_err(|e| fail(e.to_string()))?;
                        peers[rank] = Some(s);
                        joined += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = (1..world.size)
                                .filter(|&r| peers[r].is_none())
                                .map(|r| r.to_string())
                                .collect();
                            return Err(fail(format!(
                                "ranks {} did not connect within {} s",
                                missing.join(", "),
                                timeout.as_secs()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(fail(format!("accepting: {e}"))),
                }
            }
            Ok(TcpGroup {
                rank: 0,
                size: world.size,
                peers,
            })
        } else {
            let stream = loop {
                let attempt = world
                    .master
                    .to_socket_addrs()
                    .and_then(|mut a| a.next().ok_or_else(|| std::io::Error::other("no address")))
                    .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)));
                match attempt {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(fail(format!(
                            "rank 0 did not accept within {} s: {e}",
                            timeout.as_secs()
                        )));
                    }
                    Err(_) => {}
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let mut s = stream;
            s.set_nodelay(true).ok();
            let mut hello = Vec::with_capacity(16);
            hello.extend_from_slice(MAGIC);
            hello.extend_from_slice(&VERSION.to_le_bytes());
            hello.extend_from_slice(&(world.rank as u32).to_le_bytes());
            hello.extend_from_slice(&(world.size as u32).to_le_bytes());
            s.write_all(&hello).map_err(|e| fail(e.to_string()))?;
            let mut ack = [0u8; 4];
            s.read_exact(&mut ack)
                .map_err(|e| fail(format!("rank 0 refused this rank: {e}")))?;
            if &ack != MAGIC {
                return Err(fail("rank 0 answered with something else".into()));
            }
            Ok(TcpGroup {
                rank: world.rank,
                size: world.size,
                peers: vec![Some(s)],
            })
        }
    }

    fn stream(&mut self, rank: usize) -> CollectiveResult<&mut TcpStream> {
        let i = if self.rank == 0 { rank } else { 0 };
        self.peers
            .get_mut(i)
            .and_then(Option::as_mut)
            .ok_or_else(|| CollectiveError::Io {
                rank,
                source: std::io::Error::from(std::io::ErrorKind::NotConnected),
            })
    }

    fn send(&mut self, rank: usize, tag: u8, payload: &[u8]) -> CollectiveResult<()> {
        let s = self.stream(rank)?;
        let mut head = [0u8; 9];
        head[0] = tag;
        head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        s.write_all(&head)
            .and_then(|_| s.write_all(payload))
            .map_err(|source| CollectiveError::Io { rank, source })
    }

    fn recv(&mut self, rank: usize) -> CollectiveResult<Vec<u8>> {
        let s = self.stream(rank)?;
        let io = |source| CollectiveError::Io { rank, source };
        let mut head = [0u8; 9];
        s.read_exact(&mut head).map_err(io)?;
        let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes")) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).map_err(io)?;
        match head[0] {
            DATA => Ok(payload),
            ERROR => Err(CollectiveError::Peer {
                rank,
                message: String::from_utf8_lossy(&payload).into_owned(),
            }),
            tag => Err(CollectiveError::Protocol {
                rank,
                message: format!("unknown frame tag {tag}"),
            }),
        }
    }
}

fn read_hello(s: &mut TcpStream) -> std::io::Result<(usize, usize)> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut hello = [0u8; 16];
    s.read_exact(&mut hello)?;
    s.set_read_timeout(None)?;
    let word = |i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().expect("4 bytes"));
    if &hello[..4] != MAGIC {
        return Err(std::io::Error::other("not a distill process"));
    }
    if word(4) != VERSION {
        return Err(std::io::Error::other(format!(
            "protocol version {} (this binary speaks {VERSION}): run the same distill on every node",
            word(4)
        )));
    }
    Ok((word(8) as usize, word(12) as usize))
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn broadcast(&mut self, payload: Option<&[u8]>) -> CollectiveResult<Vec<u8>> {
        if self.rank == 0 {
            let payload = payload.unwrap_or_default();
            for r in 1..self.size {
                self.send(r, DATA, payload)?;
            }
            Ok(payload.to_vec())
        } else {
            self.recv(0)
        }
    }

    fn gather(&mut self, payload: &[u8]) -> CollectiveResult<Option<Vec<Vec<u8>>>> {
        if self.rank == 0 {
            let mut all = Vec::with_capacity(self.size);
            all.push(payload.to_vec());
            for r in 1..self.size {
                all.push(self.recv(r)?);
            }
            Ok(Some(all))
        } else {
            self.send(0, DATA, payload)?;
            Ok(None)
        }
    }

    fn scatter(&mut self, payloads: Option<Vec<Vec<u8>>>) -> CollectiveResult<Vec<u8>> {
        if self.rank != 0 {
            return self.recv(0);
        }
        let payloads = payloads.unwrap_or_default();
        if payloads.len() != self.size {
            return Err(CollectiveError::Protocol {
                rank: 0,
                message: format!(
                    "{} payloads to scatter over {} ranks",
                    payloads.len(),
                    self.size
                ),
            });
        }
        let mut payloads = payloads.into_iter();
        let own = payloads.next().unwrap_or_default();
        for (r, p) in payloads.enumerate() {
            self.send(r + 1, DATA, &p)?;
        }
        Ok(own)
    }

    fn fail(&mut self, message: &str) {
        let targets: Vec<usize> = if self.rank == 0 {
            (1..self.size).collect()
        } else {
            vec![0]
        };
        for r in targets {
            let _ = self.send(r, ERROR, message.as_bytes());
        }
    }
}

/// Joins the processes `world` describes over TCP, waiting `DISTILL_RENDEZVOUS_TIMEOUT_S`
/// seconds (default 600) for all of them.
pub fn join_world(world: &World) -> CollectiveResult<TcpGroup> {
    let secs = std::env::var("DISTILL_RENDEZVOUS_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(600);
    TcpGroup::join(world, Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> CollectiveResult<Option<World>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_and_srun_variables() {
        assert_eq!(world(&[]).unwrap(), None);
        assert_eq!(world(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let w = world(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            w,
            World {
                rank: 3,
                size: 4,
                local_rank: 1,
                master: "node7:1234".into()
            }
        );
        let slurm = [
            ("SLURM_STEP_ID", "0"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "node1"),
        ];
        let w = world(&slurm).unwrap().unwrap();
        assert_eq!((w.rank, w.size, w.local_rank), (9, 16, 1));
        assert_eq!(w.master, "node1:29500");
        // A batch script (no srun step) is one process whatever SLURM_NTASKS says.
        assert_eq!(world(&slurm[1..]).unwrap(), None);
    }

    #[test]
    fn bad_variables_are_named() {
        let err = |vars: &[(&str, &str)]| world(vars).unwrap_err().to_string();
        assert!(err(&[("WORLD_SIZE", "two")]).contains("`WORLD_SIZE`"));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("`RANK`"));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "2")]).contains("not below"));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "1")]).contains("`MASTER_ADDR`"));
        assert!(
            err(&[
                ("WORLD_SIZE", "2"),
                ("RANK", "1"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "x")
            ])
            .contains("`MASTER_PORT`")
        );
    }

    /// A free loopback port (bound, then released).
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn group_of(size: usize) -> Vec<TcpGroup> {
        let master = format!("127.0.0.1:{}", free_port());
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let w = World {
                    rank,
                    size,
                    local_rank: rank,
                    master: master.clone(),
                };
                std::thread::spawn(move || TcpGroup::join(&w, Duration::from_secs(20)).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn gather_and_broadcast_over_loopback_in_rank_order() {
        let groups = group_of(3);
        let handles: Vec<_> = groups
            .into_iter()
            .map(|mut g| {
                std::thread::spawn(move || {
                    let mine = vec![g.rank() as u8; 3 + g.rank()];
                    let all = g.gather(&mine).unwrap();
                    let root = (g.rank() == 0).then(|| all.clone().unwrap().concat());
                    let got = g.broadcast(root.as_deref()).unwrap();
                    let parts = (g.rank() == 0).then(|| vec![vec![7], vec![8, 8], vec![9]]);
                    assert_eq!(
                        g.scatter(parts).unwrap(),
                        vec![7 + g.rank() as u8; 1 + (g.rank() == 1) as usize]
                    );
                    (g.rank(), all, got)
                })
            })
            .collect();
        for h in handles {
            let (rank, all, got) = h.join().unwrap();
            assert_eq!(got, vec![0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
            assert_eq!(all.is_some(), rank == 0);
        }
    }

    #[test]
    fn a_failed_rank_reaches_the_others_as_its_error() {
        let mut groups = group_of(2).into_iter();
        let (mut root, mut worker) = (groups.next().unwrap(), groups.next().unwrap());
        let t = std::thread::spawn(move || {
            worker.fail("out of memory");
            worker.broadcast(None)
        });
        let err = root.gather(b"x").unwrap_err().to_string();
        assert_eq!(err, "training process 1 failed: out of memory");
        root.fail("stopping");
        let err = t.join().unwrap().unwrap_err().to_string();
        assert_eq!(err, "training process 0 failed: stopping");
    }

    #[test]
    fn a_stranger_cannot_join() {
        let master = format!("127.0.0.1:{}", free_port());
        let w = World {
            rank: 0,
            size: 2,
            local_rank: 0,
            master: master.clone(),
        };
        let root = std::thread::spawn(move || TcpGroup::join(&w, Duration::from_secs(20)));
        let bad = World {
            rank: 1,
            size: 3,
            local_rank: 0,
            master,
        };
        let _ = TcpGroup::join(&bad, Duration::from_secs(20));
        let err = root.join().unwrap().err().unwrap().to_string();
        assert!(err.contains("rank 1 of 3"), "{err}");
    }
}
