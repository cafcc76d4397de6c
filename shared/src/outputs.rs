//! Nothing lost: where a command may write.
//!
//! Every binary that writes a directory (a training run, a dataset, a sampler report) or a named
//! file (an exported policy, a GIF, a preview) goes through this module, so the rules are the
//! same everywhere:
//!
//! * a directory that holds anything is refused unless the user asked for it — `--overwrite`
//!   (its old contents are removed whole before the first write, so a new run never mixes with
//!   an old one's files) or `--resume` (the caller continues what is there);
//! * an existing file is refused unless `--overwrite`; a path that is a directory, or whose
//!   parent is a file, is refused;
//! * every check runs before any work ([`check_dir`], [`check_output_file`]), and again when the
//!   directory is claimed ([`claim_dir`]);
//! * a claimed directory holds an exclusive lock ([`LOCK_FILE`], an OS file lock: released when
//!   the process ends, even by `kill -9`), so two processes never write one run or dataset.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The lock file inside a claimed directory. It is not content: a directory holding only this
/// file counts as empty.
pub const LOCK_FILE: &str = ".worldgrad.lock";

/// What the user allowed for a directory that already holds files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Only an absent or empty directory (the default).
    Refuse,
    /// `--overwrite`: the old contents are removed when the directory is claimed.
    Overwrite,
    /// `--resume`: the directory must exist with contents; they are kept.
    Resume,
}

impl Existing {
    /// From the usual pair of flags; both at once is a contradiction the caller names.
    pub fn from_flags(overwrite: bool, resume: bool) -> Result<Self> {
        match (overwrite, resume) {
            (true, true) => bail!("--overwrite and --resume contradict each other: give one"),
            (true, false) => Ok(Self::Overwrite),
            (false, true) => Ok(Self::Resume),
            (false, false) => Ok(Self::Refuse),
        }
    }
}

/// The entries of `dir` other than the lock file, sorted (empty when `dir` is absent).
pub fn contents(dir: &Path) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK_FILE)
        .collect();
    names.sort();
    Ok(names)
}

/// A few of `names` for an error message ("a, b, c, d and 7 more").
pub fn some_names(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Checks, without writing anything, that `dir` may be written under `mode`. `flag` names the
/// option that chose the directory (`--out`, `-o`, `--name`), so the error says what to change.
pub fn check_dir(dir: &Path, flag: &str, mode: Existing) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("{flag} {}: exists and is not a directory", dir.display());
    }
    if let Some(file) = dir.ancestors().skip(1).find(|a| !a.as_os_str().is_empty() && a.exists() && !a.is_dir()) {
        bail!("{flag} {}: {} is a file, not a directory", dir.display(), file.display());
    }
    let names = contents(dir)?;
    match mode {
        Existing::Refuse if !names.is_empty() => bail!(
            "{flag} {}: the directory is not empty (it holds {}); pass --overwrite to replace it, or choose another",
            dir.display(),
            some_names(&names)
        ),
        Existing::Resume if names.is_empty() => {
            bail!(
                "{flag} {}: --resume needs an existing run there, but the directory is absent or empty",
                dir.display()
            )
        }
        _ => Ok(()),
    }
}

/// A directory this process writes, holding its lock until dropped.
#[derive(Debug)]
pub struct ClaimedDir {
    path: PathBuf,
    _lock: File,
}

impl ClaimedDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// `self.path().join(name)`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

/// Claims `dir` for writing: creates it, takes its lock (refusing when another process holds
/// it), re-checks `mode` and, for [`Existing::Overwrite`], removes the old contents. Call it
/// once the inputs are loaded and checked, just before the first write.
pub fn claim_dir(dir: &Path, flag: &str, mode: Existing) -> Result<ClaimedDir> {
    check_dir(dir, flag, mode)?;
    std::fs::create_dir_all(dir).with_context(|| format!("{flag} {}: creating the directory", dir.display()))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("{flag} {}: opening its lock file", dir.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{flag} {}: another process is writing this directory (it holds {}); wait for it or choose another",
            dir.display(),
            lock_path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("{flag} {}: locking {}", dir.display(), lock_path.display()))
        }
    }
    // Checked again under the lock: another process may have written between the two checks.
    check_dir(dir, flag, mode)?;
    if mode == Existing::Overwrite {
        for name in contents(dir)? {
            let path = dir.join(&name);
            let removed = if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("{flag} {}: removing the old {}", dir.display(), path.display()))?;
        }
    }
    Ok(ClaimedDir { path: dir.to_path_buf(), _lock: lock })
}

/// The output directory of a command with an optional `-o DIR`: the directory given (refused
/// when it holds anything unless `--overwrite`), or without one a new `run-NNN` under a default
/// parent per run — so re-running a command never loses, or mixes with, an earlier run's outputs.
#[derive(Clone, Debug)]
pub enum OutputDir {
    /// `-o DIR`, with what `--overwrite` allows.
    Given(PathBuf, Existing),
    /// No `-o`: the next `run-NNN` under this parent, created when claimed.
    Numbered(PathBuf),
}

impl OutputDir {
    /// Checks, before any work, where a run will write: `given` (the `-o` value) under what
    /// `overwrite` allows, or the next numbered directory under `default_parent`.
    pub fn check(given: Option<&Path>, default_parent: &Path, overwrite: bool) -> Result<Self> {
        match given {
            Some(dir) => {
                let mode = Existing::from_flags(overwrite, false)?;
                check_dir(dir, "-o", mode)?;
                Ok(Self::Given(dir.to_path_buf(), mode))
            }
            None => {
                anyhow::ensure!(
                    !overwrite,
                    "--overwrite replaces an explicit -o DIR; without -o every run writes a new {}/run-NNN, \
                     so there is nothing to overwrite",
                    default_parent.display()
                );
                // The same checks as an explicit directory's (the parent not a file, …), on the
                // first name that is free now.
                check_dir(&next_numbered(default_parent)?, "-o (default)", Existing::Refuse)?;
                Ok(Self::Numbered(default_parent.to_path_buf()))
            }
        }
    }

    /// Claims the directory just before the first write (creating a numbered one).
    pub fn claim(&self) -> Result<ClaimedDir> {
        match self {
            Self::Given(dir, mode) => claim_dir(dir, "-o", *mode),
            Self::Numbered(parent) => {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
                // `create_dir` fails when the name exists, so two runs started together never
                // share a directory: the later one takes the next number.
                for _ in 0..1000 {
                    let dir = next_numbered(parent)?;
                    match std::fs::create_dir(&dir) {
                        Ok(()) => return claim_dir(&dir, "-o (default)", Existing::Refuse),
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
                    }
                }
                bail!("could not create a new run directory under {}; give -o DIR", parent.display())
            }
        }
    }
}

/// `parent/run-NNN` with NNN one above the highest existing number (001 first), so the runs
/// sort in the order they were made.
pub fn next_numbered(parent: &Path) -> Result<PathBuf> {
    let mut highest = 0u64;
    if parent.is_dir() {
        for entry in std::fs::read_dir(parent).with_context(|| format!("reading {}", parent.display()))? {
            let name = entry.with_context(|| format!("reading {}", parent.display()))?.file_name();
            if let Some(n) = name.to_str().and_then(|n| n.strip_prefix("run-")).and_then(|n| n.parse::<u64>().ok()) {
                highest = highest.max(n);
            }
        }
    }
    Ok(parent.join(format!("run-{:03}", highest + 1)))
}

/// Checks, before any work, that a file can be written at `path`: not a directory, its parent
/// not a file, and absent unless `overwrite`.
pub fn check_output_file(path: &Path, flag: &str, overwrite: bool) -> Result<()> {
    if path.as_os_str().is_empty() {
        bail!("{flag}: the path is empty");
    }
    if path.is_dir() {
        bail!("{flag} {}: is a directory; give a file path", path.display());
    }
    if let Some(file) = path.ancestors().skip(1).find(|a| !a.as_os_str().is_empty() && a.exists() && !a.is_dir()) {
        bail!("{flag} {}: {} is a file, not a directory", path.display(), file.display());
    }
    if path.exists() && !overwrite {
        bail!("{flag} {}: the file exists; pass --overwrite to replace it, or choose another path", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_empty_directory_needs_overwrite_and_is_then_replaced_whole() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("run");
        std::fs::create_dir_all(dir.join("sub"))?;
        std::fs::write(dir.join("old.txt"), b"old")?;
        let err = check_dir(&dir, "--out", Existing::Refuse).unwrap_err().to_string();
        assert!(err.contains("--out") && err.contains("not empty") && err.contains("old.txt"), "{err}");
        assert!(claim_dir(&dir, "--out", Existing::Refuse).is_err());
        assert_eq!(std::fs::read(dir.join("old.txt"))?, b"old");
        let claimed = claim_dir(&dir, "--out", Existing::Overwrite)?;
        assert!(contents(claimed.path())?.is_empty());
        Ok(())
    }

    #[test]
    fn resume_needs_contents_and_a_lock_excludes_a_second_writer() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("run");
        let err = check_dir(&dir, "--name", Existing::Resume).unwrap_err().to_string();
        assert!(err.contains("--resume"), "{err}");
        let first = claim_dir(&dir, "--name", Existing::Refuse)?;
        // Only the lock file: still empty for the next claim's purposes, but locked.
        assert!(contents(&dir)?.is_empty());
        let err = claim_dir(&dir, "--name", Existing::Refuse).unwrap_err().to_string();
        assert!(err.contains("another process"), "{err}");
        drop(first);
        claim_dir(&dir, "--name", Existing::Refuse)?;
        Ok(())
    }

    #[test]
    fn without_a_given_directory_each_claim_is_a_new_numbered_one() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let parent = tmp.path().join("out");
        let out = OutputDir::check(None, &parent, false)?;
        let first = out.claim()?;
        std::fs::write(first.join("report.json"), b"{}")?;
        let second = OutputDir::check(None, &parent, false)?.claim()?;
        assert_eq!(first.path(), parent.join("run-001"));
        assert_eq!(second.path(), parent.join("run-002"));
        assert!(OutputDir::check(None, &parent, true).unwrap_err().to_string().contains("-o"));
        Ok(())
    }

    #[test]
    fn output_files_are_checked_before_work() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let err = check_output_file(tmp.path(), "--gif", false).unwrap_err().to_string();
        assert!(err.contains("--gif") && err.contains("directory"), "{err}");
        let file = tmp.path().join("a.gif");
        check_output_file(&file, "--gif", false)?;
        std::fs::write(&file, b"x")?;
        assert!(check_output_file(&file, "--gif", false).unwrap_err().to_string().contains("--overwrite"));
        check_output_file(&file, "--gif", true)?;
        let under_file = file.join("b.gif");
        assert!(check_output_file(&under_file, "--gif", true).unwrap_err().to_string().contains("is a file"));
        assert!(check_dir(&file, "--out", Existing::Overwrite).unwrap_err().to_string().contains("not a directory"));
        Ok(())
    }
}
