//! Scenarios: what one stress-test case is (an environment episode and the frame its clip starts
//! at, the noise seed, the direction), where a run's scenarios come from (held-out episodes by
//! default, a JSONL file, or seeds), and the deterministic split into shards
//! (`--shard i/n`) that lets a Slurm array or a Kubernetes indexed Job run them with no
//! coordination of ours.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::optimize::Direction;

/// Environment seeds of the default scenarios: episodes neither the world model (seeds
/// 1000–1059) nor the policy's dataset was trained on, starting where the world model's
/// held-out evaluation does (seeds 9000–9005, `weights/README.md`).
pub const HELD_OUT_FIRST_SEED: u64 = 9000;
/// Default scenarios per run.
pub const DEFAULT_SCENARIOS: usize = 20;
/// Default first frame of a scenario's clip (the arms are moving by then).
pub const DEFAULT_START_FRAME: usize = 4;

/// One stress-test case (a line of a scenario file).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Unique within a run; names the result files ([A-Za-z0-9._-], at most 100 characters).
    pub id: String,
    /// The environment episode: reset with this seed, the scripted expert acting.
    pub episode_seed: u64,
    /// The clip's first frame (expert frames before it are skipped).
    #[serde(default = "default_start_frame")]
    pub start_frame: usize,
    /// Seed of the initial noise z0 (default: `episode_seed`).
    #[serde(default)]
    pub noise_seed: Option<u64>,
    /// ascent (find a failure) | descent (default: the run's `--direction`).
    #[serde(default)]
    pub direction: Option<Direction>,
    /// Actions the world model is conditioned on instead of the expert's: one row of the
    /// action size per transition (frames − 1 rows). The policy is still compared with the
    /// expert's actions.
    #[serde(default)]
    pub actions: Option<Vec<Vec<f32>>>,
}

fn default_start_frame() -> usize {
    DEFAULT_START_FRAME
}

impl Scenario {
    /// A scenario on episode `seed` with the defaults.
    pub fn from_seed(seed: u64, start_frame: usize) -> Self {
        Self {
            id: format!("ep{seed}-f{start_frame}"),
            episode_seed: seed,
            start_frame,
            noise_seed: None,
            direction: None,
            actions: None,
        }
    }

    pub fn noise_seed(&self) -> u64 {
        self.noise_seed.unwrap_or(self.episode_seed)
    }

    /// Problems of this scenario's own fields (the action sizes are checked against the world
    /// model when it runs).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.id.is_empty() || self.id.len() > 100 || !self.id.chars().all(valid) || self.id.starts_with('.') {
            p.push(format!("id {:?}: 1–100 characters of A–Z a–z 0–9 . _ -, not starting with '.'", self.id));
        }
        if self.start_frame > 10_000 {
            p.push(format!("start_frame {} is beyond any episode (at most 10000)", self.start_frame));
        }
        if let Some(rows) = &self.actions {
            if rows.iter().flatten().any(|v| !v.is_finite()) {
                p.push("actions hold NaN/Inf".into());
            }
        }
        p
    }
}

/// Reads a scenario file: JSON Lines, one [`Scenario`] per non-empty line. Every problem (bad
/// JSON, unknown fields, bad values, repeated ids) is named with its line number, all at once.
pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Scenario>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--scenarios {}: cannot read", path.display()))?;
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Scenario>(line) {
            Ok(s) => {
                problems.extend(s.problems().into_iter().map(|p| format!("line {}: {p}", i + 1)));
                out.push(s);
            }
            Err(e) => problems.push(format!("line {}: {e}", i + 1)),
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for s in &out {
        if !seen.insert(s.id.as_str()) {
            problems.push(format!("id {:?} appears more than once", s.id));
        }
    }
    if out.is_empty() && problems.is_empty() {
        problems.push("no scenarios (the file is empty)".into());
    }
    anyhow::ensure!(problems.is_empty(), "--scenarios {}:\n  {}", path.display(), problems.join("\n  "));
    Ok(out)
}

/// Writes scenarios as JSON Lines (atomically).
pub fn write_jsonl(path: &Path, scenarios: &[Scenario]) -> anyhow::Result<()> {
    let mut text = String::new();
    for s in scenarios {
        text.push_str(&serde_json::to_string(s)?);
        text.push('\n');
    }
    shared::io::write_atomic(path, text.as_bytes())
}

/// Where a run's scenarios come from.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScenarioSource {
    /// `count` held-out episodes from [`HELD_OUT_FIRST_SEED`] (the default, 20).
    HeldOut { count: usize },
    /// One scenario per environment seed (`--seeds`).
    Seeds(Vec<u64>),
    /// A JSONL file (`--scenarios`).
    File(PathBuf),
}

impl Default for ScenarioSource {
    fn default() -> Self {
        Self::HeldOut { count: DEFAULT_SCENARIOS }
    }
}

impl ScenarioSource {
    /// The scenarios, in run order (`start_frame` for the generated ones).
    pub fn scenarios(&self, start_frame: usize) -> anyhow::Result<Vec<Scenario>> {
        match self {
            Self::HeldOut { count } => {
                anyhow::ensure!(*count >= 1, "--num-scenarios must be at least 1");
                Ok((0..*count as u64).map(|k| Scenario::from_seed(HELD_OUT_FIRST_SEED + k, start_frame)).collect())
            }
            Self::Seeds(seeds) => {
                anyhow::ensure!(!seeds.is_empty(), "--seeds: give at least one seed");
                let mut seen = std::collections::BTreeSet::new();
                let repeated: Vec<String> = seeds.iter().filter(|s| !seen.insert(**s)).map(|s| s.to_string()).collect();
                anyhow::ensure!(repeated.is_empty(), "--seeds repeats {} (each seed runs once)", repeated.join(", "));
                Ok(seeds.iter().map(|&s| Scenario::from_seed(s, start_frame)).collect())
            }
            Self::File(path) => read_jsonl(path),
        }
    }
}

/// `--shard i/n`: this worker runs every scenario whose position k in the scenario list has
/// k mod n = i. Deterministic (no coordination: array task i of n computes it alone); each
/// shard writes its own `shard-i-of-n/` directory, merged by `sampler stress-report`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let parsed = text.split_once('/').and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        let Some((index, count)) = parsed else {
            anyhow::bail!("--shard {text}: expected INDEX/COUNT, e.g. 0/4 (SLURM_ARRAY_TASK_ID/array size)")
        };
        anyhow::ensure!((1..=100_000).contains(&count), "--shard {text}: COUNT must be in 1..=100000");
        anyhow::ensure!(index < count, "--shard {text}: INDEX must be below COUNT (0-based)");
        Ok(Self { index, count })
    }

    /// This shard's scenarios, in their original order.
    pub fn select(&self, all: &[Scenario]) -> Vec<Scenario> {
        all.iter().enumerate().filter(|(k, _)| k % self.count == self.index).map(|(_, s)| s.clone()).collect()
    }

    /// The shard's directory under the run directory.
    pub fn dir_name(&self) -> String {
        format!("shard-{}-of-{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_scenarios_in_order() -> anyhow::Result<()> {
        let all = ScenarioSource::HeldOut { count: 7 }.scenarios(4)?;
        let mut seen: Vec<String> = Vec::new();
        for i in 0..3 {
            let shard = Shard::parse(&format!("{i}/3"))?;
            seen.extend(shard.select(&all).into_iter().map(|s| s.id));
        }
        seen.sort();
        let mut ids: Vec<String> = all.iter().map(|s| s.id.clone()).collect();
        ids.sort();
        assert_eq!(seen, ids);
        for bad in ["3/3", "1", "a/b", "0/0", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn scenario_files_round_trip_and_name_bad_lines() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.jsonl");
        let all = ScenarioSource::Seeds(vec![3, 5]).scenarios(2)?;
        write_jsonl(&path, &all)?;
        assert_eq!(read_jsonl(&path)?, all);
        std::fs::write(
            &path,
            "{\"id\": \"a\", \"episode_seed\": 1}\n\n{\"id\": \"a\", \"episode_seed\": 2}\n{\"id\": \"b/c\", \"episode_seed\": 1}\n{\"id\": \"d\", \"episode_seed\": 1, \"colour\": 3}\nnot json\n",
        )?;
        let err = format!("{:#}", read_jsonl(&path).unwrap_err());
        for want in ["appears more than once", "line 4: id", "line 5: unknown field `colour`", "line 6:"] {
            assert!(err.contains(want), "{want}: {err}");
        }
        Ok(())
    }
}
