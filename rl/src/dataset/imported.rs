//! Datasets read from other ecosystems' formats (robomimic and Minari HDF5, LeRobot), in one
//! neutral in-memory layout that [`super::convert`] turns into our validated shards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A bad, missing or unreadable file or key of an imported source; every message names the
/// file and, where there is one, the key (an HDF5 path, a LeRobot feature, column or metadata
/// field).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{}: {reason}", file.display())]
    File { file: PathBuf, reason: String },
    #[error("{}: `{key}`: {reason}", file.display())]
    Key { file: PathBuf, key: String, reason: String },
}

impl ImportError {
    /// The file the error is about.
    pub fn file(&self) -> &Path {
        match self {
            ImportError::File { file, .. } | ImportError::Key { file, .. } => file,
        }
    }
    /// The key the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ImportError::File { .. } => None,
            ImportError::Key { key, .. } => Some(key),
        }
    }
}

/// The format a dataset was imported from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// robomimic HDF5.
    Robomimic,
    /// Minari HDF5.
    Minari,
    /// A LeRobot directory, codebase v2.1.
    LeRobotV21,
    /// A LeRobot directory, codebase v3.0.
    LeRobotV30,
    /// A D4RL-style `.npz` (state-only).
    D4rlNpz,
}

impl SourceFormat {
    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Robomimic => "robomimic",
            SourceFormat::Minari => "minari",
            SourceFormat::LeRobotV21 => "lerobot-v2.1",
            SourceFormat::LeRobotV30 => "lerobot-v3.0",
            SourceFormat::D4rlNpz => "d4rl-npz",
        }
    }
}

/// One episode; every per-step array has `len` rows, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportedEpisode {
    /// The episode's group name in the file (`demo_3`, `episode_7`).
    pub name: String,
    pub len: usize,
    /// `len × state_dim`: the selected low-dim keys concatenated in selection order, as f32.
    pub state: Vec<f32>,
    /// `(camera, len × H × W × 3 bytes)`, in the dataset's camera order.
    pub images: Vec<(String, Vec<u8>)>,
    /// `len × action_dim`.
    pub actions: Vec<f32>,
    pub rewards: Vec<f32>,
    /// The MDP terminal (robomimic `dones`, Minari `terminations`).
    pub terminals: Vec<bool>,
    /// Cut by a time limit (Minari `truncations`; robomimic: the last step when not done).
    pub timeouts: Vec<bool>,
    /// The state after the last action (Minari's observation row `T`, robomimic's last
    /// `next_obs` row); `None` when the file does not hold it (robomimic without `next_obs`).
    pub final_state: Option<Vec<f32>>,
    /// The camera images after the last action, as for `final_state` (each `H × W × 3`).
    pub final_images: Option<Vec<(String, Vec<u8>)>>,
}

/// A file's episodes in a neutral layout, ready to be converted or trained on.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportedDataset {
    /// The file it came from.
    pub source: String,
    pub format: SourceFormat,
    pub episodes: Vec<ImportedEpisode>,
    /// Camera keys, in image order.
    pub cameras: Vec<String>,
    /// `(H, W)` of each camera.
    pub image_sizes: Vec<(usize, usize)>,
    /// Low-dim keys, in state order.
    pub state_keys: Vec<String>,
    /// Width of each state key (1 for a rank-1 key).
    pub state_key_dims: Vec<usize>,
    pub state_dim: usize,
    pub action_dim: usize,
    /// String and numeric scalar attributes: robomimic's on `data` (`env_args`, `total`, …),
    /// Minari's on the root (`dataset_id`, `env_spec`, …). Numbers are written as text.
    pub metadata: BTreeMap<String, String>,
}

impl ImportedDataset {
    pub fn num_steps(&self) -> usize {
        self.episodes.iter().map(|e| e.len).sum()
    }
}

/// How rewards are made for a dataset that records none (most real-robot LeRobot data):
/// chosen explicitly with `--reward` and recorded in the converted dataset's metadata, never
/// invented silently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RewardRule {
    /// 1 on the step where the dataset's `next.success` is first set (the step becomes the MDP
    /// terminal and the episode ends there), 0 elsewhere; needs a `next.success` column.
    SparseSuccess,
    /// Every episode is taken to succeed at its end (demonstrations): 1 on the last step, which
    /// is the MDP terminal, 0 elsewhere.
    SparseEnd,
}

impl RewardRule {
    pub fn name(self) -> &'static str {
        match self {
            RewardRule::SparseSuccess => "sparse-success",
            RewardRule::SparseEnd => "sparse-end",
        }
    }
}

impl std::str::FromStr for RewardRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sparse-success" => Ok(RewardRule::SparseSuccess),
            "sparse-end" => Ok(RewardRule::SparseEnd),
            other => Err(format!("unknown reward rule `{other}` (expected sparse-success or sparse-end)")),
        }
    }
}
