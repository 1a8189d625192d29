//! What a saved checkpoint folder held, and whether it still holds it.
//!
//! The atomic save guarantees a folder is complete when it is recorded, not that it stays
//! so: a kill before the page cache reaches the disk, a full disk or a stray `truncate` can
//! damage it later. So the train stage records every file's size and xxh3-128 with the
//! checkpoint, and whatever loads a recorded checkpoint checks them first.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use distill_db::training::Checkpoint;
pub use distill_db::training::CheckpointFile;
use xxhash_rust::xxh3::Xxh3;

use crate::StageError;

/// Every file under `dir` (recursively; paths relative to it, `/`-separated, sorted) with
/// its size and xxh3-128.
pub fn manifest(dir: &Path) -> io::Result<Vec<CheckpointFile>> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for entry in std::fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let rel = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                pending.push(rel);
                continue;
            }
            let (size, xxh3) = hash_file(&dir.join(&rel))?;
            let path = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            files.push(CheckpointFile { path, size, xxh3 });
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Size and xxh3-128 (hex) of a file, streamed: checkpoints run to gigabytes.
fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, format!("{:032x}", hasher.digest128())))
}

/// A file of a checkpoint that is not what was saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The file (or, for [`Problem::FolderMissing`], the folder).
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: Problem,
}

/// How a checkpoint file differs from what was saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The whole checkpoint folder is gone.
    FolderMissing,
    /// The file is gone.
    Missing,
    /// The file cannot be read.
    Unreadable(String),
    /// The file has another size.
    Size {
        /// Bytes when saved.
        recorded: u64,
        /// Bytes now.
        found: u64,
    },
    /// Same size, other contents.
    Contents,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.problem {
            Problem::FolderMissing => write!(f, "{path}: the folder is gone"),
            Problem::Missing => write!(f, "{path}: missing"),
            Problem::Unreadable(e) => write!(f, "{path}: unreadable ({e})"),
            Problem::Size { recorded, found } => {
                write!(f, "{path}: {found} bytes, {recorded} when saved")
            }
            Problem::Contents => write!(f, "{path}: contents differ from what was saved"),
        }
    }
}

/// The files of checkpoint folder `dir` that are not as recorded (empty: intact). Without
/// a record (`None`, a checkpoint saved before files were recorded) only the folder's
/// existence can be checked. Files added since are not damage.
pub fn verify(dir: &Path, recorded: Option<&[CheckpointFile]>) -> Vec<Damage> {
    if !dir.is_dir() {
        return vec![Damage {
            path: dir.to_path_buf(),
            problem: Problem::FolderMissing,
        }];
    }
    let mut damage = Vec::new();
    for file in recorded.unwrap_or_default() {
        let path = dir.join(&file.path);
        let problem = match std::fs::metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some(Problem::Missing),
            Err(e) => Some(Problem::Unreadable(e.to_string())),
            // The size is free to check and catches truncation without reading anything.
            Ok(meta) if meta.len() != file.size => Some(Problem::Size {
                recorded: file.size,
                found: meta.len(),
            }),
            Ok(_) => match hash_file(&path) {
                Ok((_, xxh3)) if xxh3 == file.xxh3 => None,
                Ok(_) => Some(Problem::Contents),
                Err(e) => Some(Problem::Unreadable(e.to_string())),
            },
        };
        if let Some(problem) = problem {
            damage.push(Damage { path, problem });
        }
    }
    damage
}

/// [`verify`] of a recorded checkpoint, on a blocking thread (it reads every byte).
pub async fn verify_recorded(checkpoint: &Checkpoint) -> Result<Vec<Damage>, StageError> {
    let files = checkpoint.files()?;
    let dir = PathBuf::from(&checkpoint.path);
    tokio::task::spawn_blocking(move || verify(&dir, files.as_deref()))
        .await
        .map_err(|e| StageError::Failed(format!("verifying {}: {e}", checkpoint.path)))
}

/// `a; b; c`, for messages naming several damaged files.
pub fn list(damage: &[Damage]) -> String {
    damage
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoint-80");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("model.safetensors"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(dir.join("trainer_state.json"), b"{\"step\": 80}\n").unwrap();
        std::fs::write(dir.join("sub/extra.bin"), b"abc").unwrap();
        (tmp, dir)
    }

    #[test]
    fn a_manifest_lists_every_file_recursively_with_its_size_and_hash() {
        let (_tmp, dir) = folder();
        let files = manifest(&dir).unwrap();
        let names: Vec<(&str, u64)> = files.iter().map(|f| (f.path.as_str(), f.size)).collect();
        assert_eq!(
            names,
            [
                ("model.safetensors", 3 << 20),
                ("sub/extra.bin", 3),
                ("trainer_state.json", 13)
            ]
        );
        // Streaming over 1 MiB chunks hashes exactly what hashing the whole file does.
        assert_eq!(files[0].xxh3, crate::hash::hex128(&vec![7u8; 3 << 20]));
        assert_eq!(files[1].xxh3, crate::hash::hex128(b"abc"));
        assert!(verify(&dir, Some(&files)).is_empty());
    }

    #[test]
    fn verify_names_each_missing_truncated_or_altered_file() {
        let (_tmp, dir) = folder();
        let files = manifest(&dir).unwrap();
        // Truncated, as a kill before the data reached the disk leaves it.
        let model = dir.join("model.safetensors");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&model)
            .unwrap()
            .set_len(100)
            .unwrap();
        // Same size, one byte changed.
        std::fs::write(dir.join("trainer_state.json"), b"{\"step\": 81}\n").unwrap();
        std::fs::remove_file(dir.join("sub/extra.bin")).unwrap();
        // A file the save did not write is no damage.
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        let damage = verify(&dir, Some(&files));
        assert_eq!(
            damage,
            [
                Damage {
                    path: model.clone(),
                    problem: Problem::Size {
                        recorded: 3 << 20,
                        found: 100
                    },
                },
                Damage {
                    path: dir.join("sub/extra.bin"),
                    problem: Problem::Missing,
                },
                Damage {
                    path: dir.join("trainer_state.json"),
                    problem: Problem::Contents,
                },
            ]
        );
        assert_eq!(
            damage[0].to_string(),
            format!("{}: 100 bytes, 3145728 when saved", model.display())
        );
    }

    #[test]
    fn without_a_record_only_the_folder_is_checked() {
        let (_tmp, dir) = folder();
        std::fs::write(dir.join("model.safetensors"), b"").unwrap();
        assert!(verify(&dir, None).is_empty());
        let gone = dir.with_file_name("checkpoint-100");
        assert_eq!(
            verify(&gone, None),
            [Damage {
                path: gone.clone(),
                problem: Problem::FolderMissing
            }]
        );
        assert_eq!(verify(&gone, Some(&[])).len(), 1);
    }
}
