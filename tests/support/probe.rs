//! Probes of a binary with bad input, shared by the crates' `bad_inputs` tests (included with
//! `#[path = "../../tests/support/probe.rs"] mod probe;`): run it, assert it refused cleanly —
//! exit status 1 (never a panic's 101 or an abort's 134), a message naming what was wrong — and
//! that files that were there before are byte-identical after.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `exe args…` in `cwd` with Hub access off (no test may download) and returns its output.
pub fn run(exe: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new(exe)
        .args(args)
        .current_dir(cwd)
        .env("HF_HUB_OFFLINE", "1")
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("could not start {exe}: {e}"))
}

/// [`run`] with extra environment variables for the child (e.g. `HF_HUB_CACHE` pointing at a
/// test's fake Hub cache).
pub fn run_env(exe: &str, args: &[&str], cwd: &Path, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(exe);
    cmd.args(args).current_dir(cwd).env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| panic!("could not start {exe}: {e}"))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The command failed with status 1 and its message holds every one of `needles`.
pub fn assert_refused(out: &Output, needles: &[&str]) -> String {
    let err = stderr(out);
    let code = out.status.code();
    assert_eq!(code, Some(1), "expected a clean refusal (exit 1), got {code:?}; stderr:\n{err}");
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    for needle in needles {
        assert!(err.contains(needle), "the message does not name {needle:?}:\n{err}");
    }
    err
}

/// The command succeeded.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "expected success, got {:?}; stderr:\n{}\nstdout:\n{}",
        out.status.code(),
        stderr(out),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Every file under `root` (relative path → bytes).
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                files.insert(path.strip_prefix(root).unwrap_or(&path).to_path_buf(), bytes);
            }
        }
    }
    files
}

/// Every file of `before` is still there with the same bytes, and no file was added, except
/// the lock files `shared::outputs` leaves (they are not content).
pub fn assert_unchanged(before: &BTreeMap<PathBuf, Vec<u8>>, root: &Path) {
    let after: BTreeMap<PathBuf, Vec<u8>> =
        snapshot(root).into_iter().filter(|(p, _)| !p.ends_with(".worldgrad.lock")).collect();
    let before: BTreeMap<PathBuf, Vec<u8>> =
        before.iter().filter(|(p, _)| !p.ends_with(".worldgrad.lock")).map(|(p, b)| (p.clone(), b.clone())).collect();
    for (path, bytes) in &before {
        match after.get(path) {
            None => panic!("{} was removed", path.display()),
            Some(now) => assert!(now == bytes, "{} was changed", path.display()),
        }
    }
    let added: Vec<&PathBuf> = after.keys().filter(|p| !before.contains_key(*p)).collect();
    assert!(added.is_empty(), "files were added: {added:?}");
}

/// Where `repo`'s `file` at revision `main` lies in a Hugging Face cache rooted at `cache` (the
/// layout `huggingface_hub` writes: refs/main holds the commit, the file lies in
/// snapshots/<commit>/); the directories are created, the file is the caller's to write.
pub fn hub_cache_path(cache: &Path, repo: &str, file: &str) -> PathBuf {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(repo_dir.join("refs")).expect("creating the fake cache's refs");
    std::fs::write(repo_dir.join("refs").join("main"), format!("{commit}\n")).expect("writing refs/main");
    let path = repo_dir.join("snapshots").join(commit).join(file);
    std::fs::create_dir_all(path.parent().expect("a snapshot file has a parent")).expect("creating the snapshot");
    path
}
