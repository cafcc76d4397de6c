//! Offline datasets of the bimanual environment, in a LeRobot-style layout.
//!
//! A dataset is a directory with `meta.json` and one safetensors shard per episode
//! (`episode_000000.safetensors`, …). Safetensors because it is a plain, header-described,
//! zero-copy format that Candle and Python read natively; one shard per episode so episodes
//! can be written in parallel, validated one by one, and memory-mapped lazily.
//!
//! Every shard of an episode with `T` steps holds (LeRobot key names):
//!
//! | key | dtype | shape | meaning |
//! | --- | --- | --- | --- |
//! | `observation.images.<camera>` | u8 | `[T, H, W, 3]` | camera image before the action |
//! | `observation.state` | f32 | `[T, 16]` | proprioception before the action |
//! | `observation.environment_state` | f32 | `[T, 8]` | puck and goal positions (privileged) |
//! | `action` | f32 | `[T, 8]` | action taken |
//! | `next.reward` | f32 | `[T]` | reward received |
//! | `next.done` | u8 | `[T]` | 1 on the episode's last frame (success or time limit) |
//! | `next.success` | u8 | `[T]` | 1 where the step reached success: the MDP terminal |
//! | `episode_index`, `frame_index` | i64 | `[T]` | position in the dataset |
//! | `final.observation.*` | as above | `[1, …]` | the observation after the last action |
//!
//! The `final.observation.*` keys make the next observation of the last step available, so a
//! reader can yield complete (s, a, r, s', done) transitions ([`Dataset::transitions`]); for
//! other steps s' is simply frame t + 1. Bootstrap through `done && !success` (time limit),
//! not through `success`.
//!
//! `meta.json` ([`DatasetMeta`]) records cameras, sizes, dims, fps, environment parameters,
//! per-key normalisation statistics, tier, seed, reference returns and per-episode summaries.
//!
//! Data is little-endian (as safetensors prescribes); this crate does not build for big-endian
//! targets. D4RL-style state-only `.npz` files are read by [`npz`].

pub mod convert;
pub mod hdf5;
pub mod imported;
pub mod lerobot;
pub mod npz;
pub mod reader;
pub mod writer;

#[cfg(target_endian = "big")]
compile_error!("rl::dataset reads and writes little-endian tensors in place");

use crate::env::policy::PolicyKind;
use crate::env::EnvConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use reader::{Dataset, EpisodeView, Transition};
pub use writer::CollectError;
pub use writer::{
    check_dataset_dir, claim_dataset_dir, collect_dataset, collect_dataset_into, CollectConfig, CollectSummary,
};

pub const KEY_STATE: &str = "observation.state";
pub const KEY_ENVIRONMENT_STATE: &str = "observation.environment_state";
pub const KEY_ACTION: &str = "action";
pub const KEY_REWARD: &str = "next.reward";
pub const KEY_DONE: &str = "next.done";
pub const KEY_SUCCESS: &str = "next.success";
pub const KEY_EPISODE_INDEX: &str = "episode_index";
pub const KEY_FRAME_INDEX: &str = "frame_index";
/// Prefix of the keys holding the observation after an episode's last action.
pub const FINAL_PREFIX: &str = "final.";
pub const META_FILE: &str = "meta.json";
pub const FORMAT: &str = "worldgrad-bimanual-pucks/v1";
/// The format of a dataset converted from another ecosystem's (see [`convert`]).
pub const FORMAT_IMPORTED: &str = "worldgrad-imported/v1";

/// What a dataset directory holds, before it is opened or collected into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatasetState {
    /// Absent or empty: a dataset may be collected there.
    Absent,
    /// `meta.json` is there: a complete dataset (open it with [`Dataset::open`], which validates it).
    Complete,
    /// Files but no `meta.json` — what an interrupted collection leaves (`meta.json` is written
    /// last), or another kind of directory. Never collected over or read without `--overwrite`.
    Incomplete { files: Vec<String> },
}

/// Classifies `dir` (see [`DatasetState`]); the lock file of a running collection is not content.
pub fn dataset_state(dir: &Path) -> anyhow::Result<DatasetState> {
    if dir.join(META_FILE).is_file() {
        return Ok(DatasetState::Complete);
    }
    let files = shared::outputs::contents(dir)?;
    Ok(if files.is_empty() { DatasetState::Absent } else { DatasetState::Incomplete { files } })
}

/// `observation.images.<camera>`.
pub fn image_key(camera: &str) -> String {
    format!("observation.images.{camera}")
}

/// `final.<key>`: the same quantity after the episode's last action, with a leading dim of 1.
pub fn final_key(key: &str) -> String {
    format!("{FINAL_PREFIX}{key}")
}

/// Shard file name of an episode.
pub fn shard_file_name(episode_index: usize) -> String {
    format!("episode_{episode_index:06}.safetensors")
}

/// Dataset quality tiers, as in D4RL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Uniform random actions.
    Random,
    /// The noisy expert ([`crate::env::policy::NoisyExpert::medium`]).
    Medium,
    /// The scripted expert.
    Expert,
    /// Union of the three, interleaved random, medium, expert (like D4RL's medium-replay).
    Mixed,
}

impl Tier {
    pub fn policy_for_episode(self, episode_index: usize) -> PolicyKind {
        match self {
            Tier::Random => PolicyKind::Random,
            Tier::Medium => PolicyKind::Medium,
            Tier::Expert => PolicyKind::Expert,
            Tier::Mixed => [PolicyKind::Random, PolicyKind::Medium, PolicyKind::Expert][episode_index % 3],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Random => "random",
            Tier::Medium => "medium",
            Tier::Expert => "expert",
            Tier::Mixed => "mixed",
        }
    }
}

impl std::str::FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(Tier::Random),
            "medium" => Ok(Tier::Medium),
            "expert" => Ok(Tier::Expert),
            "mixed" => Ok(Tier::Mixed),
            other => Err(format!("unknown tier `{other}` (expected random, medium, expert or mixed)")),
        }
    }
}

/// Per-frame schema of one key: dtype (safetensors name) and shape without the time axis.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeySpec {
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// Normalisation statistics of one key, per last-axis channel. Images are in [0, 1] units
/// (pixel / 255), per RGB channel, as in LeRobot.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyStats {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
}

/// Reference returns for score normalisation and how they were measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReferenceReturns {
    pub random: f32,
    pub expert: f32,
    pub command: String,
}

/// Summary of one episode in `meta.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpisodeMeta {
    pub index: usize,
    pub file: String,
    pub length: usize,
    /// Environment seed of the episode (`Env::reset(seed)`); collected datasets only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The policy that acted; collected datasets only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyKind>,
    #[serde(rename = "return")]
    pub episode_return: f32,
    /// Under the environment's reference returns; collected datasets only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalized_score: Option<f32>,
    pub success: bool,
    /// The episode's name in the source file (`demo_3`, `episode_7`); imported datasets only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_name: Option<String>,
}

/// Contents of `meta.json`. A dataset is either *collected* from our environment ([`FORMAT`]:
/// `tier`, `seed`, `env`, `reference_returns`, `mean_normalized_score` and each episode's seed,
/// policy and score are set) or *imported* from another format ([`FORMAT_IMPORTED`]: `source`
/// is set and those are absent: there is no simulator to score against). The optional fields
/// are left out of the JSON when absent, so a collected dataset's meta.json is byte for byte
/// what it was before imports existed (its fingerprint, which runs record, is unchanged).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetMeta {
    pub format: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    /// Episode `i` uses environment seed `seed + i`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub num_episodes: usize,
    pub num_frames: usize,
    pub fps: usize,
    pub cameras: Vec<String>,
    pub image_height: usize,
    pub image_width: usize,
    pub state_dim: usize,
    pub environment_state_dim: usize,
    pub action_dim: usize,
    pub state_names: Vec<String>,
    pub environment_state_names: Vec<String>,
    pub action_names: Vec<String>,
    /// Action meaning and scale, in words.
    pub action_description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<EnvConfig>,
    /// Per-frame schema of every key in a shard.
    pub keys: BTreeMap<String, KeySpec>,
    pub stats: BTreeMap<String, KeyStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_returns: Option<ReferenceReturns>,
    pub mean_return: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_normalized_score: Option<f32>,
    pub success_rate: f32,
    /// Where an imported dataset came from and how it was converted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ImportSource>,
    pub episodes: Vec<EpisodeMeta>,
}

/// How an imported dataset was made: the source, what was selected from it, and the choices
/// the conversion made, so a converted directory says what it holds and can be checked against
/// the command line that would reuse it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImportSource {
    /// `robomimic`, `minari`, `lerobot-v2.1`, `lerobot-v3.0`.
    pub format: String,
    /// The file or directory given (as given).
    pub path: String,
    /// What identifies the source's contents (see [`convert::source_fingerprint`]).
    pub fingerprint: String,
    /// Cameras, in channel order (the source's keys).
    pub cameras: Vec<String>,
    /// Low-dimensional keys concatenated into the state, in order, with their widths.
    pub state_keys: Vec<String>,
    pub state_key_dims: Vec<usize>,
    /// robomimic `mask/<key>` the episodes were taken from.
    pub filter_key: Option<String>,
    /// Rewards made by a rule (`--reward`) because the source has none.
    pub reward_rule: Option<imported::RewardRule>,
    /// `(H, W)` of each camera in the source; images are resized to the dataset's size.
    pub source_image_sizes: Vec<(usize, usize)>,
    /// Terminal flags the source sets before an episode's last step (robomimic's `dones` on
    /// every success state, for instance), not used: an episode's terminal is its last step's
    /// flag, because our shards end an episode at its terminal.
    pub ignored_terminal_flags: usize,
    /// Episodes whose observation after the last action the source does not hold: their last
    /// step's next observation repeats the last one (a terminal step never reads it).
    pub episodes_without_final_observation: usize,
    /// The source's own metadata (robomimic `env_args`, Minari `dataset_id`, LeRobot `fps`, …).
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid meta.json: {reason}")]
    Meta { path: PathBuf, reason: String },
    /// No `meta.json`, but files: what an interrupted collection leaves (`meta.json` is written
    /// last), or a directory of something else.
    #[error("{}", incomplete_message(dir, files))]
    Incomplete { dir: PathBuf, files: Vec<String> },
    /// No dataset at all: the directory is absent or empty.
    #[error("{dir}: no dataset there (the directory is {what}); collect one with `collect --out DIR`")]
    Absent { dir: PathBuf, what: &'static str },
    /// Files that look like shards but `meta.json` does not list them.
    #[error(
        "{dir}: {} not listed in meta.json: a mixed or partly overwritten dataset; collect it again with \
         --overwrite",
        shared::outputs::some_names(files)
    )]
    Unlisted { dir: PathBuf, files: Vec<String> },
    #[error("{file}: not a readable safetensors shard: {reason}")]
    Shard { file: PathBuf, reason: String },
    #[error("{file}: key `{key}`: {reason}")]
    Key { file: PathBuf, key: String, reason: String },
    #[error("{file}: {reason}")]
    Npz { file: PathBuf, reason: String },
}

/// An interrupted collection leaves shards (or their temporary files) and no `meta.json`; a
/// directory without either is something else, and the message must not suggest replacing it.
fn incomplete_message(dir: &Path, files: &[String]) -> String {
    let names = shared::outputs::some_names(files);
    let shard_like = files.iter().any(|f| is_shard_file_name(f) || f.ends_with(".tmp"));
    if shard_like {
        format!(
            "{}: no meta.json: an incomplete dataset (interrupted collection?) holding {names}; collect it \
             again (collect --out DIR --overwrite) or choose another directory",
            dir.display()
        )
    } else {
        format!(
            "{}: not a dataset (no meta.json, no episode shards): it holds {names}; choose another directory",
            dir.display()
        )
    }
}

/// Whether `name` has the form of a shard file (`episode_<digits>.safetensors`).
pub fn is_shard_file_name(name: &str) -> bool {
    name.strip_prefix("episode_")
        .and_then(|rest| rest.strip_suffix(".safetensors"))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

impl DatasetError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
    pub(crate) fn key(file: &Path, key: &str, reason: impl Into<String>) -> Self {
        Self::Key { file: file.to_path_buf(), key: key.to_string(), reason: reason.into() }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, then rename,
/// so readers never see a half-written shard, meta.json or PNG.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DatasetError> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(DatasetError::io(path, source));
    }
    Ok(())
}

/// The per-frame schema of a shard: each camera's images, the state, the environment state
/// (when it has a width), action, reward, flags and indices.
pub fn shard_key_specs(
    cameras: &[impl AsRef<str>],
    (height, width): (usize, usize),
    state_dim: usize,
    environment_state_dim: usize,
    action_dim: usize,
) -> BTreeMap<String, KeySpec> {
    let spec = |dtype: &str, shape: &[usize]| KeySpec { dtype: dtype.to_string(), shape: shape.to_vec() };
    let mut keys = BTreeMap::new();
    for camera in cameras {
        keys.insert(image_key(camera.as_ref()), spec("U8", &[height, width, 3]));
    }
    keys.insert(KEY_STATE.into(), spec("F32", &[state_dim]));
    if environment_state_dim > 0 {
        keys.insert(KEY_ENVIRONMENT_STATE.into(), spec("F32", &[environment_state_dim]));
    }
    keys.insert(KEY_ACTION.into(), spec("F32", &[action_dim]));
    keys.insert(KEY_REWARD.into(), spec("F32", &[]));
    keys.insert(KEY_DONE.into(), spec("U8", &[]));
    keys.insert(KEY_SUCCESS.into(), spec("U8", &[]));
    keys.insert(KEY_EPISODE_INDEX.into(), spec("I64", &[]));
    keys.insert(KEY_FRAME_INDEX.into(), spec("I64", &[]));
    keys
}

impl DatasetMeta {
    /// Converted from another format (no environment, no reference returns).
    pub fn is_imported(&self) -> bool {
        self.format == FORMAT_IMPORTED
    }

    /// The environment a collected dataset was recorded in; an imported one has none here.
    pub fn environment(&self) -> Result<&EnvConfig, String> {
        self.env.as_ref().ok_or_else(|| match &self.source {
            Some(source) => format!(
                "the dataset was imported from {} ({}): there is no simulator for it here",
                source.path, source.format
            ),
            None => "meta.json has no env".to_string(),
        })
    }

    /// The data's own mean normalised score (its behaviour policy's), when it has reference returns.
    pub fn behaviour_score(&self) -> Option<f32> {
        self.mean_normalized_score
    }

    /// Every key of a shard with its per-frame dtype and shape: the cameras' images, the state,
    /// the environment state (collected datasets only), action, reward, flags and indices.
    pub fn expected_keys(&self) -> BTreeMap<String, KeySpec> {
        shard_key_specs(
            &self.cameras,
            (self.image_height, self.image_width),
            self.state_dim,
            self.environment_state_dim,
            self.action_dim,
        )
    }

    /// Keys that also appear as `final.<key>` (the observation after the last action).
    pub fn final_observation_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.cameras.iter().map(|c| image_key(c)).collect();
        keys.push(KEY_STATE.into());
        if self.environment_state_dim > 0 {
            keys.push(KEY_ENVIRONMENT_STATE.into());
        }
        keys
    }

    /// Statistics channels of each key that has statistics (images: RGB).
    pub fn stats_channels(&self) -> Vec<(String, usize)> {
        let mut keys: Vec<(String, usize)> = self.cameras.iter().map(|c| (image_key(c), 3)).collect();
        keys.push((KEY_STATE.to_string(), self.state_dim));
        if self.environment_state_dim > 0 {
            keys.push((KEY_ENVIRONMENT_STATE.to_string(), self.environment_state_dim));
        }
        keys.push((KEY_ACTION.to_string(), self.action_dim));
        keys.push((KEY_REWARD.to_string(), 1));
        keys
    }
}
