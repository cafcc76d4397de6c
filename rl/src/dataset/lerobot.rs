//! LeRobot import: a local LeRobot dataset directory (codebase v2.1 or v3.0) into a neutral
//! in-memory [`ImportedDataset`].
//!
//! # Layouts
//!
//! Both versions describe themselves in `meta/info.json`: `codebase_version`, `fps`,
//! `robot_type`, `features` (per key: `dtype`, `shape`, `names`) and the `data_path` /
//! `video_path` templates, which this reader fills in (it never guesses file names).
//!
//! **v2.1**: one Parquet file per episode (`data/chunk-{episode_chunk:03d}/
//! episode_{episode_index:06d}.parquet`, `episode_chunk = episode_index / chunks_size`), the
//! episode list in `meta/episodes.jsonl` (`episode_index`, `length` per line), videos one MP4 per
//! episode and camera.
//!
//! **v3.0**: many episodes per Parquet file (`data/chunk-{chunk_index:03d}/
//! file-{file_index:03d}.parquet`); the episode list is itself Parquet
//! (`meta/episodes/chunk-*/file-*.parquet`) with `episode_index`, `length`,
//! `data/chunk_index`, `data/file_index` and, per video camera, `videos/<key>/chunk_index`,
//! `file_index` and `from_timestamp` (a frame's time in the shared MP4 is `from_timestamp` plus
//! the row's `timestamp`).
//!
//! Episodes come out in `episode_index` order, frames in `frame_index` order (rows may be stored
//! in any order; their `frame_index` values must be exactly `0..T`, and `T` must be the
//! episode's `length` in the metadata).
//!
//! # What is read
//!
//! * Cameras: features of dtype `image` (a `{bytes, path}` struct column holding PNG or JPEG
//!   bytes, decoded with the `image` crate and checked against the feature's shape) and `video`
//!   (MP4; only with the `video` cargo feature of this crate: see below). A camera is named by
//!   its feature key (`observation.images.top`) or by the part after the last dot (`top`).
//!   Default: every camera, in sorted key order. Out as u8 `H × W × 3`; the feature's shape may
//!   be `[H, W, 3]` or `[3, H, W]` (from `names`, e.g. `["channels", "height", "width"]`; without
//!   names a leading 3 that is not also the last dim means channels first).
//! * State: by default `observation.state` then every other numeric `observation.*` feature
//!   that is not a camera, sorted; [`LeRobotSelection::state_keys`] selects and orders them.
//! * Actions: `action`. Numbers may be float32/float64/integer/bool columns, scalars (for a
//!   shape-`[1]` feature) or fixed- or variable-size lists, nested lists flattened; every row
//!   must hold exactly the feature's shape. NaN or infinity in state, action or reward is an
//!   error naming the file, key and frame.
//!
//! # Rewards and episode ends
//!
//! LeRobot records `next.done` on the **last frame of every episode**, whether the episode
//! reached its goal or hit a time limit, so `next.done` alone cannot tell an MDP terminal from
//! a timeout; `next.success` can. The rule, recorded in `metadata["reward_rule"]` and
//! `metadata["terminals"]`:
//!
//! * [`LeRobotSelection::reward`] given: that rule makes the rewards (recorded `next.reward`
//!   values, if any, are not used): [`RewardRule::SparseEnd`] gives reward 1 and a terminal on
//!   every episode's last step; [`RewardRule::SparseSuccess`] needs `next.success` and gives
//!   reward 1 and a terminal on the first success frame, where the episode is cut (an episode
//!   that never succeeds ends in a timeout with reward 0 throughout).
//! * Else `next.reward` recorded: those rewards. With `next.success`, the first success frame
//!   is the terminal and the episode is cut there (the frames after an MDP terminal are no part
//!   of the MDP; pusht's episodes end at success anyway) — `metadata["frames_after_success"]`
//!   counts what was dropped; an episode that never succeeds ends in a timeout. Without
//!   `next.success`, no step is terminal and every episode's last step is a timeout: reading
//!   `next.done` as terminal would turn each time-limit end into a false "no future reward",
//!   while bootstrapping a true end only costs a small overestimate.
//! * Else (most real-robot data: no reward at all) an error asking for `--reward
//!   sparse-success|sparse-end`: no reward is invented silently.
//!
//! `timeouts` is set on the last step of every episode that does not end terminal. LeRobot
//! stores no observation after the last action, so [`ImportedEpisode::final_state`] and
//! [`ImportedEpisode::final_images`] are `None`.
//!
//! # Crate choice: `parquet` 60.1 without arrow
//!
//! The `parquet` crate (Apache arrow-rs; pure Rust) with only `snap` (snappy, what LeRobot and
//! pyarrow write) and `flate2-zlib-rs` (gzip; `flate2` with zlib-rs is already in the tree
//! through `zip`). Its record API (`Row`/`Field`, column projection) reads structs and lists
//! without the arrow crates, which would add `arrow-array`/`-buffer`/`-data`/`-schema`/`-select`/
//! `-ipc` for nothing we need. zstd, lz4 and brotli pages are refused with an error naming the
//! file (zstd would build C code). Measured on this 2-core machine with other builds running
//! beside it: a clean probe crate depending only on `parquet` with these features built in
//! 3 min 22 s wall (172 s CPU; parquet itself 79 s of it, per `cargo build --timings`); added to
//! the warm workspace it compiled 8 new crates (parquet, snap, chrono, num-bigint, twox-hash, …)
//! and candle was not rebuilt.
//!
//! # Video
//!
//! Video cameras need the `video` feature of this crate, off by default (`cargo test --workspace
//! --features rl/video`; `-p rl` would change feature unification and rebuild candle). Without
//! it a video camera is an error naming the MP4 file and the key, saying to build with the
//! feature or to choose image cameras with `--cameras`, before any data is read. With it:
//!
//! | part | crate | why |
//! | --- | --- | --- |
//! | MP4 demux | `re_mp4` 0.5.1 (Rerun's, pure Rust) | knows `av01` and `avc1` sample entries and gives composition times; the `mp4` crate the sampler uses has no `av01` |
//! | AV1 | `rav1d` 1.1.0 without default features (`bitdepth_8` only) | Rust port of dav1d; its `asm` feature (default) needs `nasm`, so it is off; 10-bit streams are refused by message |
//! | H.264 | `openh264` 0.9.9 | Cisco's decoder from its bundled C++ source (g++ at build time), as the sampler crate already builds it |
//!
//! Everything comes from crates.io; no system library. Measured on this 2-core machine (other
//! builds beside it): turning the feature on in a warm workspace build compiled rav1d, re_mp4,
//! their small dependencies and openh264-sys2 in 1 min 36 s wall (170 s CPU). Frame choice and
//! colour conversion: see the `video` module below. The test fixtures' frames agree with PyAV's
//! decode (ffmpeg) to within 3 levels (AV1 from libsvtav1, H.264 from libx264).

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type as SchemaType;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use super::imported::{ImportedDataset, ImportedEpisode, RewardRule, SourceFormat};

/// Largest decoded dataset (images, state, actions) one import may hold in memory (8 GiB): a
/// dataset whose metadata claims more is refused by name instead of exhausting memory.
pub const MAX_DATASET_BYTES: usize = 8 << 30;

/// What video this build decodes, in words (for messages and `--help`).
#[cfg(not(feature = "video"))]
pub const VIDEO_SUPPORT: &str = "none (build with --features rl/video)";

/// Errors of this reader (the importers' one error type).
pub type LeRobotError = super::imported::ImportError;

pub type Result<T, E = LeRobotError> = std::result::Result<T, E>;

fn file_error(file: &Path, reason: impl Into<String>) -> LeRobotError {
    LeRobotError::File { file: file.to_path_buf(), reason: reason.into() }
}

fn key_error(file: &Path, key: &str, reason: impl Into<String>) -> LeRobotError {
    LeRobotError::Key { file: file.to_path_buf(), key: key.to_string(), reason: reason.into() }
}

/// What to import. `None` selects everything of the kind (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeRobotSelection {
    /// Camera feature keys or their short names (`top` for `observation.images.top`), in this
    /// order.
    pub cameras: Option<Vec<String>>,
    /// Numeric observation features concatenated in this order into the state vector.
    pub state_keys: Option<Vec<String>>,
    /// How to make rewards (required when the dataset records none; overrides recorded ones).
    pub reward: Option<RewardRule>,
}

pub const INFO_FILE: &str = "meta/info.json";
const KEY_ACTION: &str = "action";
const KEY_STATE: &str = "observation.state";
const KEY_REWARD: &str = "next.reward";
const KEY_DONE: &str = "next.done";
const KEY_SUCCESS: &str = "next.success";
const KEY_FRAME_INDEX: &str = "frame_index";
const KEY_EPISODE_INDEX: &str = "episode_index";
const KEY_TIMESTAMP: &str = "timestamp";

/// Tells which codebase version the dataset at `dir` has (from `meta/info.json`).
pub fn detect(dir: &Path) -> Result<SourceFormat> {
    Ok(Info::read(dir)?.format)
}

/// Reads the dataset at `dir` (a local directory) as the module docs describe.
pub fn read(dir: &Path, selection: &LeRobotSelection) -> Result<ImportedDataset> {
    let info = Info::read(dir)?;
    let plan = Plan::new(&info, selection)?;
    let episodes = match info.format {
        SourceFormat::LeRobotV21 => episodes_v21(dir, &info, &plan)?,
        _ => episodes_v30(dir, &info, &plan)?,
    };
    plan.check_size(&info, &episodes)?;
    plan.check_video_support(&episodes)?;
    plan.read_all(dir, &info, episodes)
}

// ---------------------------------------------------------------------------------------------
// meta/info.json

#[derive(Clone, Debug)]
struct Feature {
    key: String,
    dtype: String,
    shape: Vec<usize>,
    /// The `names` field when it is a flat list of strings (axis names of an image).
    names: Option<Vec<String>>,
}

impl Feature {
    fn width(&self) -> usize {
        self.shape.iter().product::<usize>().max(1)
    }
    fn is_camera(&self) -> bool {
        self.dtype == "image" || self.dtype == "video"
    }
    fn is_numeric(&self) -> bool {
        matches!(
            self.dtype.as_str(),
            "float16"
                | "float32"
                | "float64"
                | "int8"
                | "int16"
                | "int32"
                | "int64"
                | "uint8"
                | "uint16"
                | "uint32"
                | "uint64"
                | "bool"
        )
    }
}

struct Info {
    /// `<dir>/meta/info.json`.
    path: PathBuf,
    format: SourceFormat,
    codebase_version: String,
    fps: f64,
    robot_type: Option<String>,
    total_episodes: Option<u64>,
    features: BTreeMap<String, Feature>,
    data_path: String,
    video_path: Option<String>,
    chunks_size: u64,
}

impl Info {
    fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(INFO_FILE);
        if !dir.is_dir() {
            return Err(file_error(dir, "not a directory: a LeRobot dataset is a directory with meta/info.json"));
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(file_error(&path, "missing: not a LeRobot dataset directory (no meta/info.json)"))
            }
            Err(e) => return Err(file_error(&path, format!("unreadable: {e}"))),
        };
        let json: Value = serde_json::from_str(&text).map_err(|e| file_error(&path, format!("not valid JSON: {e}")))?;
        let field = |key: &str| json.get(key).filter(|v| !v.is_null());
        let codebase_version = field("codebase_version")
            .and_then(Value::as_str)
            .ok_or_else(|| key_error(&path, "codebase_version", "missing or not a string"))?
            .to_string();
        let format = match codebase_version.as_str() {
            "v2.1" => SourceFormat::LeRobotV21,
            "v3.0" => SourceFormat::LeRobotV30,
            other => {
                let hint = if other.starts_with("v1") || other.starts_with("v2") {
                    "; LeRobot's own scripts convert older datasets (lerobot.datasets.v21 / v30 conversion)"
                } else {
                    ""
                };
                return Err(key_error(
                    &path,
                    "codebase_version",
                    format!("`{other}` is not a version this reader knows (v2.1, v3.0){hint}"),
                ));
            }
        };
        let fps = field("fps")
            .and_then(Value::as_f64)
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| key_error(&path, "fps", "missing or not a positive number"))?;
        let robot_type = field("robot_type").and_then(Value::as_str).map(str::to_string);
        let total_episodes = field("total_episodes").and_then(Value::as_u64);
        let chunks_size = match field("chunks_size") {
            None => 1000,
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .ok_or_else(|| key_error(&path, "chunks_size", format!("{v} is not a positive integer")))?,
        };
        let template = |key: &str, default: &str| -> Result<String> {
            match field(key) {
                None => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(v) => Err(key_error(&path, key, format!("{v} is not a string"))),
            }
        };
        let (default_data, default_video) = match format {
            SourceFormat::LeRobotV21 => (
                "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            ),
            _ => (
                "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            ),
        };
        let data_path = template("data_path", default_data)?;
        let video_path = Some(template("video_path", default_video)?);

        let Some(Value::Object(raw_features)) = field("features") else {
            return Err(key_error(&path, "features", "missing or not an object"));
        };
        let mut features = BTreeMap::new();
        for (key, value) in raw_features {
            let shown = format!("features.{key}");
            let dtype = value
                .get("dtype")
                .and_then(Value::as_str)
                .ok_or_else(|| key_error(&path, &shown, "has no string `dtype`"))?
                .to_string();
            let shape = match value.get("shape") {
                Some(Value::Array(dims)) => dims
                    .iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| key_error(&path, &shown, format!("shape {dims:?} is not a list of sizes")))?,
                _ => return Err(key_error(&path, &shown, "has no `shape` list")),
            };
            let names = match value.get("names") {
                Some(Value::Array(names)) => {
                    names.iter().map(|n| n.as_str().map(str::to_string)).collect::<Option<Vec<String>>>()
                }
                _ => None,
            };
            features.insert(key.clone(), Feature { key: key.clone(), dtype, shape, names });
        }
        Ok(Self {
            path,
            format,
            codebase_version,
            fps,
            robot_type,
            total_episodes,
            features,
            data_path,
            video_path,
            chunks_size,
        })
    }

    /// Fills one of info.json's path templates (`{name}` or `{name:03d}` placeholders).
    fn fill(&self, template_key: &str, template: &str, values: &[(&str, TemplateValue)]) -> Result<String> {
        let bad = |reason: String| key_error(&self.path, template_key, format!("template `{template}`: {reason}"));
        let mut out = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| bad("a `{` is not closed".into()))?;
            let spec = &after[..close];
            let (name, format) = spec.split_once(':').unwrap_or((spec, ""));
            let value = values
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v)
                .ok_or_else(|| bad(format!("unknown placeholder `{name}`")))?;
            match value {
                TemplateValue::Text(text) => {
                    if !format.is_empty() {
                        return Err(bad(format!("`{name}` is text; format `{format}` is for numbers")));
                    }
                    out.push_str(text);
                }
                TemplateValue::Number(n) => {
                    let width = if format.is_empty() {
                        0
                    } else {
                        format
                            .strip_suffix('d')
                            .and_then(|w| w.strip_prefix('0').or(Some(w)))
                            .and_then(|w| if w.is_empty() { Some(0) } else { w.parse::<usize>().ok() })
                            .filter(|&w| w <= 32)
                            .ok_or_else(|| bad(format!("format `{format}` of `{name}` is not `0Nd`")))?
                    };
                    out.push_str(&format!("{n:0width$}"));
                }
            }
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn feature(&self, key: &str) -> Option<&Feature> {
        self.features.get(key)
    }
}

enum TemplateValue<'a> {
    Text(&'a str),
    Number(u64),
}

/// A relative path from metadata, refused when it would leave the dataset directory.
fn join_relative(dir: &Path, rel: &str, file: &Path, key: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(key_error(file, key, format!("path `{rel}` leaves the dataset directory")));
    }
    Ok(dir.join(p))
}

// ---------------------------------------------------------------------------------------------
// Selection

#[derive(Clone, Debug)]
struct Camera {
    key: String,
    video: bool,
    height: usize,
    width: usize,
}

/// What is read from each data file, resolved against info.json.
struct Plan {
    cameras: Vec<Camera>,
    state: Vec<Feature>,
    action: Feature,
    reward: Option<Feature>,
    success: Option<Feature>,
    done: Option<Feature>,
    rule: Option<RewardRule>,
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

fn short_name(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

impl Plan {
    fn new(info: &Info, selection: &LeRobotSelection) -> Result<Self> {
        let path = &info.path;
        let all_cameras: Vec<&Feature> = info.features.values().filter(|f| f.is_camera()).collect();
        let camera_keys: Vec<String> = all_cameras.iter().map(|f| f.key.clone()).collect();
        let chosen: Vec<&Feature> = match &selection.cameras {
            None => all_cameras.clone(),
            Some(wanted) => {
                let mut out: Vec<&Feature> = Vec::new();
                for name in wanted {
                    let exact = all_cameras.iter().find(|f| &f.key == name);
                    let by_short: Vec<&&Feature> = all_cameras.iter().filter(|f| short_name(&f.key) == name).collect();
                    let found = match (exact, by_short.as_slice()) {
                        (Some(f), _) => *f,
                        (None, [f]) => **f,
                        (None, []) => {
                            return Err(key_error(
                                path,
                                name,
                                format!("no such camera (cameras: {})", list(&camera_keys)),
                            ))
                        }
                        (None, several) => {
                            let keys: Vec<String> = several.iter().map(|f| f.key.clone()).collect();
                            return Err(key_error(
                                path,
                                name,
                                format!("ambiguous camera name: it could be {}; give the full key", list(&keys)),
                            ));
                        }
                    };
                    if out.iter().any(|f| f.key == found.key) {
                        return Err(key_error(path, &found.key, "camera selected twice"));
                    }
                    out.push(found);
                }
                out
            }
        };
        let mut cameras = Vec::with_capacity(chosen.len());
        for f in chosen {
            let (height, width) = image_size(f).ok_or_else(|| {
                key_error(
                    path,
                    &format!("features.{}", f.key),
                    format!(
                        "shape {:?} (names {:?}) is not an RGB image shape [H, W, 3] or [3, H, W]",
                        f.shape, f.names
                    ),
                )
            })?;
            cameras.push(Camera { key: f.key.clone(), video: f.dtype == "video", height, width });
        }

        let numeric_obs: Vec<&Feature> =
            info.features.values().filter(|f| f.key.starts_with("observation.") && f.is_numeric()).collect();
        let state = match &selection.state_keys {
            None => {
                let mut keys: Vec<Feature> = Vec::new();
                if let Some(f) = numeric_obs.iter().find(|f| f.key == KEY_STATE) {
                    keys.push((*f).clone());
                }
                keys.extend(numeric_obs.iter().filter(|f| f.key != KEY_STATE).map(|f| (*f).clone()));
                keys
            }
            Some(wanted) => {
                let names: Vec<String> = numeric_obs.iter().map(|f| f.key.clone()).collect();
                let mut out: Vec<Feature> = Vec::new();
                for name in wanted {
                    let Some(f) = info.feature(name) else {
                        return Err(key_error(
                            path,
                            name,
                            format!("no such feature (numeric observation features: {})", list(&names)),
                        ));
                    };
                    if !f.is_numeric() {
                        return Err(key_error(
                            path,
                            name,
                            format!(
                                "has dtype {}; a state key must be numeric (numeric observation features: {})",
                                f.dtype,
                                list(&names)
                            ),
                        ));
                    }
                    if out.iter().any(|k| k.key == f.key) {
                        return Err(key_error(path, name, "state key selected twice"));
                    }
                    out.push(f.clone());
                }
                out
            }
        };
        let action = info
            .feature(KEY_ACTION)
            .cloned()
            .ok_or_else(|| key_error(path, KEY_ACTION, "missing from `features`: the dataset records no actions"))?;
        if !action.is_numeric() {
            return Err(key_error(path, KEY_ACTION, format!("has dtype {}; expected numbers", action.dtype)));
        }
        let scalar = |key: &str| -> Result<Option<Feature>> {
            match info.feature(key) {
                None => Ok(None),
                Some(f) if f.is_numeric() && f.width() == 1 => Ok(Some(f.clone())),
                Some(f) => Err(key_error(
                    path,
                    key,
                    format!("has dtype {} and shape {:?}; expected one number per frame", f.dtype, f.shape),
                )),
            }
        };
        let reward = scalar(KEY_REWARD)?;
        let success = scalar(KEY_SUCCESS)?;
        let done = scalar(KEY_DONE)?;
        match selection.reward {
            None if reward.is_none() => {
                return Err(key_error(
                    path,
                    KEY_REWARD,
                    "the dataset records no rewards (most real-robot data has none, and none is invented \
                     silently): pass --reward sparse-end (every episode succeeds at its end: reward 1 and \
                     terminal on its last step) or --reward sparse-success (reward 1 and terminal on the first \
                     `next.success` frame; needs that column)",
                ))
            }
            Some(RewardRule::SparseSuccess) if success.is_none() => {
                return Err(key_error(
                    path,
                    KEY_SUCCESS,
                    "--reward sparse-success needs a `next.success` feature, which this dataset does not record; \
                     use --reward sparse-end instead",
                ))
            }
            _ => {}
        }
        Ok(Self { cameras, state, action, reward, success, done, rule: selection.reward })
    }

    /// The columns to read from each data file.
    fn columns(&self, with_timestamp: bool) -> Vec<String> {
        let mut out = vec![KEY_FRAME_INDEX.to_string(), KEY_EPISODE_INDEX.to_string()];
        if with_timestamp {
            out.push(KEY_TIMESTAMP.to_string());
        }
        out.extend(self.state.iter().map(|f| f.key.clone()));
        out.push(self.action.key.clone());
        out.extend(self.cameras.iter().filter(|c| !c.video).map(|c| c.key.clone()));
        // Only the flags the reward rule reads.
        match self.rule {
            Some(RewardRule::SparseEnd) => {}
            Some(RewardRule::SparseSuccess) => out.push(KEY_SUCCESS.to_string()),
            None => {
                out.push(KEY_REWARD.to_string());
                if self.success.is_some() {
                    out.push(KEY_SUCCESS.to_string());
                }
            }
        }
        out
    }

    fn frame_bytes(&self) -> usize {
        let images: usize = self.cameras.iter().map(|c| c.height * c.width * 3).sum();
        let numbers: usize = self.state.iter().map(Feature::width).sum::<usize>() + self.action.width() + 3;
        images + numbers * 4
    }

    /// Without the `video` feature, a selected video camera is refused before any data is read.
    fn check_video_support(&self, episodes: &[EpisodeRef]) -> Result<()> {
        if cfg!(feature = "video") {
            return Ok(());
        }
        let Some(camera) = self.cameras.iter().find(|c| c.video) else { return Ok(()) };
        let file = episodes.first().and_then(|e| e.videos.get(&camera.key)).map(|v| v.file.as_path());
        Err(no_video(file.unwrap_or(Path::new(INFO_FILE)), &camera.key))
    }

    fn check_size(&self, info: &Info, episodes: &[EpisodeRef]) -> Result<()> {
        let frames: usize = episodes.iter().map(|e| e.length).sum();
        let bytes = frames.checked_mul(self.frame_bytes());
        if bytes.is_none_or(|b| b > MAX_DATASET_BYTES) {
            return Err(file_error(
                &info.path,
                format!(
                    "{frames} frames of {} bytes each exceed the {} GiB an import may hold in memory; select \
                     fewer cameras",
                    self.frame_bytes(),
                    MAX_DATASET_BYTES >> 30
                ),
            ));
        }
        Ok(())
    }

    fn read_all(&self, dir: &Path, info: &Info, episodes: Vec<EpisodeRef>) -> Result<ImportedDataset> {
        let with_timestamp = self.cameras.iter().any(|c| c.video);
        let columns = self.columns(with_timestamp);
        let mut table: Option<Table> = None;
        let mut out = Vec::with_capacity(episodes.len());
        let mut dropped_after_success = 0usize;
        for episode in &episodes {
            if table.as_ref().is_none_or(|t| t.file != episode.data_file) {
                table = Some(Table::read(&episode.data_file, &columns)?);
            }
            let Some(t) = table.as_mut() else { continue };
            let (imported, dropped) = self.episode(dir, info, t, episode)?;
            dropped_after_success += dropped;
            out.push(imported);
        }

        let mut metadata = BTreeMap::new();
        metadata.insert("codebase_version".to_string(), info.codebase_version.clone());
        metadata.insert("fps".to_string(), info.fps.to_string());
        if let Some(robot) = &info.robot_type {
            metadata.insert("robot_type".to_string(), robot.clone());
        }
        if let Some(repo) = repo_id(dir) {
            metadata.insert("repo_id".to_string(), repo);
        }
        if let Some(n) = info.total_episodes {
            metadata.insert("total_episodes".to_string(), n.to_string());
        }
        let (rule, terminals) = match self.rule {
            Some(RewardRule::SparseEnd) => (RewardRule::SparseEnd.name().to_string(), "every episode's last step"),
            Some(RewardRule::SparseSuccess) => (
                RewardRule::SparseSuccess.name().to_string(),
                "the first next.success frame (the episode is cut there)",
            ),
            None if self.success.is_some() => {
                ("recorded (next.reward)".to_string(), "the first next.success frame (the episode is cut there)")
            }
            None => (
                "recorded (next.reward)".to_string(),
                "none: no next.success, and next.done marks every episode end, time limits included; each \
                 episode's last step is a timeout",
            ),
        };
        metadata.insert("reward_rule".to_string(), rule);
        metadata.insert("terminals".to_string(), terminals.to_string());
        if self.success.is_some() && self.rule != Some(RewardRule::SparseEnd) {
            metadata.insert("frames_after_success".to_string(), dropped_after_success.to_string());
        }
        if self.done.is_some() {
            metadata.insert("next.done".to_string(), "present, not read (see terminals)".to_string());
        }
        Ok(ImportedDataset {
            source: dir.display().to_string(),
            format: info.format,
            episodes: out,
            cameras: self.cameras.iter().map(|c| c.key.clone()).collect(),
            image_sizes: self.cameras.iter().map(|c| (c.height, c.width)).collect(),
            state_keys: self.state.iter().map(|f| f.key.clone()).collect(),
            state_key_dims: self.state.iter().map(Feature::width).collect(),
            state_dim: self.state.iter().map(Feature::width).sum(),
            action_dim: self.action.width(),
            metadata,
        })
    }

    /// One episode from its rows of `table`; also returns how many frames after a success were
    /// dropped.
    fn episode(
        &self,
        dir: &Path,
        info: &Info,
        table: &mut Table,
        episode: &EpisodeRef,
    ) -> Result<(ImportedEpisode, usize)> {
        let _ = (dir, info);
        let file = table.file.clone();
        let rows = table.episode_rows(episode)?;
        let len = rows.len();

        let mut state = Vec::with_capacity(len * self.state.iter().map(Feature::width).sum::<usize>());
        let mut per_key: Vec<Vec<f32>> = Vec::with_capacity(self.state.len());
        for f in &self.state {
            per_key.push(table.numbers(f, &rows)?);
        }
        for t in 0..len {
            for (f, values) in self.state.iter().zip(&per_key) {
                let w = f.width();
                state.extend_from_slice(&values[t * w..(t + 1) * w]);
            }
        }
        let actions = table.numbers(&self.action, &rows)?;

        let mut images = Vec::with_capacity(self.cameras.len());
        for camera in &self.cameras {
            if camera.video {
                let Some(video) = episode.videos.get(&camera.key) else {
                    return Err(key_error(&file, &camera.key, "no video file for this camera in the episode metadata"));
                };
                let times = table.timestamps(&rows, video.from_timestamp)?;
                images.push((camera.key.clone(), decode_video(&video.file, camera, &times, info.fps)?));
            } else {
                images.push((camera.key.clone(), table.images(dir, camera, &rows)?));
            }
        }

        let success = match self.rule {
            Some(RewardRule::SparseEnd) => None,
            _ => match &self.success {
                Some(f) => Some(table.flags(&f.key, &rows)?),
                None => None,
            },
        };
        let first_success = success.as_ref().and_then(|s| s.iter().position(|&b| b));
        let (end, terminal, rewards) = match self.rule {
            Some(RewardRule::SparseEnd) => {
                let mut r = vec![0.0; len];
                r[len - 1] = 1.0;
                (len, true, r)
            }
            Some(RewardRule::SparseSuccess) => match first_success {
                Some(t) => {
                    let mut r = vec![0.0; t + 1];
                    r[t] = 1.0;
                    (t + 1, true, r)
                }
                None => (len, false, vec![0.0; len]),
            },
            None => {
                let Some(reward) = &self.reward else {
                    return Err(key_error(&info.path, KEY_REWARD, "missing"));
                };
                let mut r = table.numbers(reward, &rows)?;
                match first_success {
                    Some(t) => {
                        r.truncate(t + 1);
                        (t + 1, true, r)
                    }
                    None => (len, false, r),
                }
            }
        };
        let dropped = len - end;
        state.truncate(end * self.state.iter().map(Feature::width).sum::<usize>());
        let mut actions = actions;
        actions.truncate(end * self.action.width());
        for (camera, (_, bytes)) in self.cameras.iter().zip(images.iter_mut()) {
            bytes.truncate(end * camera.height * camera.width * 3);
        }
        let mut terminals = vec![false; end];
        let mut timeouts = vec![false; end];
        if terminal {
            terminals[end - 1] = true;
        } else {
            timeouts[end - 1] = true;
        }
        Ok((
            ImportedEpisode {
                name: format!("episode_{:06}", episode.index),
                len: end,
                state,
                images,
                actions,
                rewards,
                terminals,
                timeouts,
                final_state: None,
                final_images: None,
            },
            dropped,
        ))
    }
}

/// `(H, W)` of an RGB camera feature whose shape is `[H, W, 3]` or `[3, H, W]`.
fn image_size(f: &Feature) -> Option<(usize, usize)> {
    let [a, b, c] = f.shape.as_slice() else { return None };
    let is_channel = |n: &str| n.starts_with("channel") || n == "c" || n == "rgb";
    let channels_first = match &f.names {
        Some(names) if names.len() == 3 => {
            if is_channel(&names[0]) && !is_channel(&names[2]) {
                true
            } else if is_channel(&names[2]) && !is_channel(&names[0]) {
                false
            } else {
                *a == 3 && *c != 3
            }
        }
        _ => *a == 3 && *c != 3,
    };
    let (h, w, ch) = if channels_first { (*b, *c, *a) } else { (*a, *b, *c) };
    (ch == 3 && h > 0 && w > 0).then_some((h, w))
}

/// `owner/name` when `dir` lies in a Hugging Face cache (`datasets--owner--name/snapshots/…`).
fn repo_id(dir: &Path) -> Option<String> {
    dir.components().rev().find_map(|c| {
        let name = c.as_os_str().to_str()?;
        let rest = name.strip_prefix("datasets--")?;
        let (owner, repo) = rest.split_once("--")?;
        Some(format!("{owner}/{repo}"))
    })
}

// ---------------------------------------------------------------------------------------------
// Episode lists

struct VideoRef {
    file: PathBuf,
    from_timestamp: f64,
}

struct EpisodeRef {
    index: u64,
    length: usize,
    data_file: PathBuf,
    /// Per video camera key.
    videos: BTreeMap<String, VideoRef>,
    /// Where the length came from (for messages).
    meta_file: PathBuf,
}

fn check_episode_order(mut episodes: Vec<EpisodeRef>, file: &Path) -> Result<Vec<EpisodeRef>> {
    episodes.sort_by_key(|e| e.index);
    for pair in episodes.windows(2) {
        if pair[0].index == pair[1].index {
            return Err(key_error(file, KEY_EPISODE_INDEX, format!("episode {} is listed twice", pair[0].index)));
        }
    }
    if episodes.is_empty() {
        return Err(file_error(file, "lists no episodes"));
    }
    Ok(episodes)
}

fn episodes_v21(dir: &Path, info: &Info, plan: &Plan) -> Result<Vec<EpisodeRef>> {
    let path = dir.join("meta/episodes.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(file_error(&path, "missing: a v2.1 dataset lists its episodes there"))
        }
        Err(e) => return Err(file_error(&path, format!("unreadable: {e}"))),
    };
    let mut episodes = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |key: &str| format!("line {}: {key}", n + 1);
        let json: Value = serde_json::from_str(line)
            .map_err(|e| key_error(&path, &format!("line {}", n + 1), format!("not valid JSON: {e}")))?;
        let index = json
            .get(KEY_EPISODE_INDEX)
            .and_then(Value::as_u64)
            .ok_or_else(|| key_error(&path, &at(KEY_EPISODE_INDEX), "missing or not an integer"))?;
        let length = json
            .get("length")
            .and_then(Value::as_u64)
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l > 0)
            .ok_or_else(|| key_error(&path, &at("length"), "missing or not a positive integer"))?;
        let chunk = index / info.chunks_size;
        let data = info.fill(
            "data_path",
            &info.data_path,
            &[("episode_chunk", TemplateValue::Number(chunk)), ("episode_index", TemplateValue::Number(index))],
        )?;
        let data_file = join_relative(dir, &data, &info.path, "data_path")?;
        let mut videos = BTreeMap::new();
        for camera in plan.cameras.iter().filter(|c| c.video) {
            let file = video_file(
                dir,
                info,
                &camera.key,
                &[("episode_chunk", TemplateValue::Number(chunk)), ("episode_index", TemplateValue::Number(index))],
            )?;
            videos.insert(camera.key.clone(), VideoRef { file, from_timestamp: 0.0 });
        }
        episodes.push(EpisodeRef { index, length, data_file, videos, meta_file: path.clone() });
    }
    check_episode_order(episodes, &path)
}

fn video_file(dir: &Path, info: &Info, key: &str, values: &[(&str, TemplateValue)]) -> Result<PathBuf> {
    let Some(template) = &info.video_path else {
        return Err(key_error(&info.path, "video_path", format!("missing, and `{key}` is a video camera")));
    };
    let mut all: Vec<(&str, TemplateValue)> = vec![("video_key", TemplateValue::Text(key))];
    for (n, v) in values {
        all.push((
            n,
            match v {
                TemplateValue::Text(t) => TemplateValue::Text(t),
                TemplateValue::Number(x) => TemplateValue::Number(*x),
            },
        ));
    }
    let rel = info.fill("video_path", template, &all)?;
    join_relative(dir, &rel, &info.path, "video_path")
}

fn episodes_v30(dir: &Path, info: &Info, plan: &Plan) -> Result<Vec<EpisodeRef>> {
    let meta_dir = dir.join("meta/episodes");
    let files = parquet_files_under(&meta_dir)?;
    if files.is_empty() {
        return Err(file_error(
            &meta_dir,
            "no Parquet files: a v3.0 dataset lists its episodes in meta/episodes/chunk-*/file-*.parquet",
        ));
    }
    let mut columns: Vec<String> =
        ["episode_index", "length", "data/chunk_index", "data/file_index"].iter().map(|s| s.to_string()).collect();
    for camera in plan.cameras.iter().filter(|c| c.video) {
        for part in ["chunk_index", "file_index", "from_timestamp"] {
            columns.push(format!("videos/{}/{part}", camera.key));
        }
    }
    let mut episodes = Vec::new();
    for file in files {
        let table = Table::read(&file, &columns)?;
        for row in 0..table.rows {
            let int = |key: &str| -> Result<u64> {
                match table.cell(key, row) {
                    Some(Field::Long(v)) if *v >= 0 => Ok(*v as u64),
                    Some(Field::Int(v)) if *v >= 0 => Ok(*v as u64),
                    Some(Field::ULong(v)) => Ok(*v),
                    Some(Field::UInt(v)) => Ok(u64::from(*v)),
                    other => Err(key_error(
                        &file,
                        key,
                        format!("row {row}: {} is not a non-negative integer", describe(other)),
                    )),
                }
            };
            let index = int(KEY_EPISODE_INDEX)?;
            let length = usize::try_from(int("length")?).ok().filter(|&l| l > 0).ok_or_else(|| {
                key_error(&file, "length", format!("row {row} (episode {index}): not a positive length"))
            })?;
            let data = info.fill(
                "data_path",
                &info.data_path,
                &[
                    ("chunk_index", TemplateValue::Number(int("data/chunk_index")?)),
                    ("file_index", TemplateValue::Number(int("data/file_index")?)),
                ],
            )?;
            let data_file = join_relative(dir, &data, &info.path, "data_path")?;
            let mut videos = BTreeMap::new();
            for camera in plan.cameras.iter().filter(|c| c.video) {
                let k = |part: &str| format!("videos/{}/{part}", camera.key);
                let chunk = int(&k("chunk_index"))?;
                let file_index = int(&k("file_index"))?;
                let from_timestamp = match table.cell(&k("from_timestamp"), row) {
                    Some(Field::Double(v)) if v.is_finite() && *v >= 0.0 => *v,
                    Some(Field::Float(v)) if v.is_finite() && *v >= 0.0 => f64::from(*v),
                    other => {
                        return Err(key_error(
                            &file,
                            &k("from_timestamp"),
                            format!("row {row}: {} is not a non-negative time", describe(other)),
                        ))
                    }
                };
                let video = video_file(
                    dir,
                    info,
                    &camera.key,
                    &[("chunk_index", TemplateValue::Number(chunk)), ("file_index", TemplateValue::Number(file_index))],
                )?;
                videos.insert(camera.key.clone(), VideoRef { file: video, from_timestamp });
            }
            episodes.push(EpisodeRef { index, length, data_file, videos, meta_file: file.clone() });
        }
    }
    check_episode_order(episodes, &meta_dir)
}

/// `*.parquet` files in the subdirectories of `dir` (`chunk-*/file-*.parquet`), sorted.
fn parquet_files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = |d: &Path| -> Result<Vec<PathBuf>> {
        let entries = std::fs::read_dir(d).map_err(|e| file_error(d, format!("cannot list: {e}")))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| file_error(d, format!("cannot list: {e}")))?;
            out.push(entry.path());
        }
        out.sort();
        Ok(out)
    };
    let mut files = Vec::new();
    for chunk in read(dir)? {
        if chunk.is_dir() {
            files.extend(read(&chunk)?.into_iter().filter(|p| p.extension().is_some_and(|e| e == "parquet")));
        }
    }
    Ok(files)
}

// ---------------------------------------------------------------------------------------------
// Parquet tables

/// Selected columns of one Parquet file, row by row.
struct Table {
    file: PathBuf,
    rows: usize,
    columns: BTreeMap<String, Vec<Field>>,
    /// Row indices per episode_index, in file order (made on first use).
    by_episode: Option<BTreeMap<u64, Vec<usize>>>,
}

fn describe(field: Option<&Field>) -> String {
    match field {
        None => "nothing".to_string(),
        Some(Field::Null) => "null".to_string(),
        Some(Field::Bool(b)) => format!("bool {b}"),
        Some(Field::Str(s)) => format!("text {s:?}"),
        Some(Field::Bytes(b)) => format!("{} bytes", b.len()),
        Some(Field::Group(_)) => "a struct".to_string(),
        Some(Field::ListInternal(l)) => format!("a list of {}", l.len()),
        Some(Field::MapInternal(_)) => "a map".to_string(),
        Some(other) => format!("{other}"),
    }
}

impl Table {
    fn read(file: &Path, wanted: &[String]) -> Result<Self> {
        let handle = match std::fs::File::open(file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(file_error(file, "missing (the metadata lists it)"))
            }
            Err(e) => return Err(file_error(file, format!("cannot open: {e}"))),
        };
        let reader = SerializedFileReader::new(handle)
            .map_err(|e| file_error(file, format!("not a readable Parquet file: {e}")))?;
        let schema = reader.metadata().file_metadata().schema();
        let fields = schema.get_fields();
        let mut projected = Vec::with_capacity(wanted.len());
        for name in wanted {
            match fields.iter().find(|f| f.name() == name) {
                Some(f) => projected.push(Arc::clone(f)),
                None => {
                    let have: Vec<String> = fields.iter().map(|f| f.name().to_string()).collect();
                    return Err(key_error(file, name, format!("missing column (the file has {})", list(&have))));
                }
            }
        }
        let projection = SchemaType::group_type_builder(schema.name())
            .with_fields(projected)
            .build()
            .map_err(|e| file_error(file, format!("cannot select columns: {e}")))?;
        let rows = usize::try_from(reader.metadata().file_metadata().num_rows())
            .map_err(|_| file_error(file, "negative row count"))?;
        let mut columns: BTreeMap<String, Vec<Field>> =
            wanted.iter().map(|n| (n.clone(), Vec::with_capacity(rows))).collect();
        let iter =
            reader.get_row_iter(Some(projection)).map_err(|e| file_error(file, format!("unreadable rows: {e}")))?;
        let mut count = 0usize;
        for row in iter {
            let row = row.map_err(|e| file_error(file, format!("row {count}: unreadable: {e}")))?;
            for (name, field) in row.into_columns() {
                if let Some(column) = columns.get_mut(&name) {
                    column.push(field);
                }
            }
            count += 1;
        }
        if columns.values().any(|c| c.len() != count) {
            return Err(file_error(file, "columns of different lengths"));
        }
        Ok(Self { file: file.to_path_buf(), rows: count, columns, by_episode: None })
    }

    fn cell(&self, key: &str, row: usize) -> Option<&Field> {
        self.columns.get(key).and_then(|c| c.get(row))
    }

    fn column(&self, key: &str) -> Result<&[Field]> {
        self.columns.get(key).map(Vec::as_slice).ok_or_else(|| key_error(&self.file, key, "missing column"))
    }

    fn integer(&self, key: &str, row: usize) -> Result<i64> {
        match self.cell(key, row) {
            Some(Field::Long(v)) => Ok(*v),
            Some(Field::Int(v)) => Ok(i64::from(*v)),
            Some(Field::Short(v)) => Ok(i64::from(*v)),
            Some(Field::UInt(v)) => Ok(i64::from(*v)),
            Some(Field::ULong(v)) => {
                i64::try_from(*v).map_err(|_| key_error(&self.file, key, format!("row {row}: {v} is too large")))
            }
            other => Err(key_error(&self.file, key, format!("row {row}: {} is not an integer", describe(other)))),
        }
    }

    /// The episode's rows, in frame_index order, checked to be exactly frames `0..length`.
    fn episode_rows(&mut self, episode: &EpisodeRef) -> Result<Vec<usize>> {
        if self.by_episode.is_none() {
            let mut map: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
            for row in 0..self.rows {
                let e = self.integer(KEY_EPISODE_INDEX, row)?;
                let e = u64::try_from(e)
                    .map_err(|_| key_error(&self.file, KEY_EPISODE_INDEX, format!("row {row}: negative ({e})")))?;
                map.entry(e).or_default().push(row);
            }
            self.by_episode = Some(map);
        }
        let rows = self.by_episode.as_ref().and_then(|m| m.get(&episode.index)).cloned().unwrap_or_default();
        if rows.len() != episode.length {
            return Err(key_error(
                &self.file,
                KEY_EPISODE_INDEX,
                format!(
                    "episode {} has {} rows here; {} gives its length as {}",
                    episode.index,
                    rows.len(),
                    episode.meta_file.display(),
                    episode.length
                ),
            ));
        }
        let mut keyed = Vec::with_capacity(rows.len());
        for row in rows {
            keyed.push((self.integer(KEY_FRAME_INDEX, row)?, row));
        }
        keyed.sort();
        for (expected, (frame, _)) in keyed.iter().enumerate() {
            if *frame != expected as i64 {
                let frames: Vec<String> = keyed.iter().map(|(f, _)| f.to_string()).collect();
                return Err(key_error(
                    &self.file,
                    KEY_FRAME_INDEX,
                    format!(
                        "episode {}: frame indices {} are not 0..{} without gaps or repeats",
                        episode.index,
                        shorten(&frames),
                        episode.length
                    ),
                ));
            }
        }
        // A v2.1 file holds one episode: rows of any other episode mean a mixed-up file.
        if episode.meta_file.extension().is_some_and(|e| e == "jsonl") {
            if let Some(map) = &self.by_episode {
                if let Some(other) = map.keys().find(|&&e| e != episode.index) {
                    return Err(key_error(
                        &self.file,
                        KEY_EPISODE_INDEX,
                        format!("holds rows of episode {other}; this file is episode {}'s", episode.index),
                    ));
                }
            }
        }
        Ok(keyed.into_iter().map(|(_, row)| row).collect())
    }

    /// A numeric feature's values for `rows`, `rows.len() × width` f32, checked finite.
    fn numbers(&self, feature: &Feature, rows: &[usize]) -> Result<Vec<f32>> {
        let column = self.column(&feature.key)?;
        let width = feature.width();
        let mut out = Vec::new();
        out.try_reserve_exact(rows.len() * width)
            .map_err(|_| key_error(&self.file, &feature.key, "cannot allocate the values"))?;
        for &row in rows {
            let before = out.len();
            let field = column.get(row).ok_or_else(|| key_error(&self.file, &feature.key, "short column"))?;
            push_numbers(field, &mut out)
                .map_err(|e| key_error(&self.file, &feature.key, format!("row {row}: {e}")))?;
            let n = out.len() - before;
            if n != width {
                return Err(key_error(
                    &self.file,
                    &feature.key,
                    format!("row {row} holds {n} values; the feature's shape {:?} holds {width}", feature.shape),
                ));
            }
            if let Some(v) = out[before..].iter().find(|v| !v.is_finite()) {
                return Err(key_error(&self.file, &feature.key, format!("row {row}: non-finite value {v} (as f32)")));
            }
        }
        Ok(out)
    }

    /// A 0/1 flag per row.
    fn flags(&self, key: &str, rows: &[usize]) -> Result<Vec<bool>> {
        let column = self.column(key)?;
        rows.iter()
            .map(|&row| {
                let mut values = Vec::with_capacity(1);
                let field = column.get(row).ok_or_else(|| key_error(&self.file, key, "short column"))?;
                push_numbers(field, &mut values).map_err(|e| key_error(&self.file, key, format!("row {row}: {e}")))?;
                match values.as_slice() {
                    [v] if *v == 0.0 || *v == 1.0 => Ok(*v == 1.0),
                    other => Err(key_error(&self.file, key, format!("row {row}: {other:?} is not one 0/1 flag"))),
                }
            })
            .collect()
    }

    /// Row times in the video file: `from_timestamp` + the row's `timestamp`.
    fn timestamps(&self, rows: &[usize], from_timestamp: f64) -> Result<Vec<f64>> {
        let column = self.column(KEY_TIMESTAMP)?;
        rows.iter()
            .map(|&row| {
                let t = match column.get(row) {
                    Some(Field::Float(v)) => f64::from(*v),
                    Some(Field::Double(v)) => *v,
                    other => {
                        return Err(key_error(
                            &self.file,
                            KEY_TIMESTAMP,
                            format!("row {row}: {} is not a time", describe(other)),
                        ))
                    }
                };
                if !t.is_finite() || t < 0.0 {
                    return Err(key_error(&self.file, KEY_TIMESTAMP, format!("row {row}: {t} is not a time")));
                }
                Ok(from_timestamp + t)
            })
            .collect()
    }

    /// An image camera's frames for `rows`, decoded to `rows.len() × H × W × 3` bytes.
    fn images(&self, dir: &Path, camera: &Camera, rows: &[usize]) -> Result<Vec<u8>> {
        let column = self.column(&camera.key)?;
        let frame = camera.height * camera.width * 3;
        let mut out = Vec::new();
        out.try_reserve_exact(rows.len() * frame)
            .map_err(|_| key_error(&self.file, &camera.key, "cannot allocate the frames"))?;
        for &row in rows {
            let bad = |reason: String| key_error(&self.file, &camera.key, format!("row {row}: {reason}"));
            let (bytes, path) = match column.get(row) {
                Some(Field::Bytes(b)) => (Some(b.data().to_vec()), None),
                Some(Field::Group(g)) => {
                    let mut bytes = None;
                    let mut path = None;
                    for (name, field) in g.get_column_iter() {
                        match (name.as_str(), field) {
                            ("bytes", Field::Bytes(b)) => bytes = Some(b.data().to_vec()),
                            ("path", Field::Str(s)) => path = Some(s.clone()),
                            _ => {}
                        }
                    }
                    (bytes, path)
                }
                other => return Err(bad(format!("{} is not an image (a {{bytes, path}} struct)", describe(other)))),
            };
            let bytes = match (bytes, path) {
                (Some(b), _) => b,
                (None, Some(p)) => {
                    let file = join_relative(dir, &p, &self.file, &camera.key)?;
                    std::fs::read(&file)
                        .map_err(|e| bad(format!("no embedded bytes, and its path {}: {e}", file.display())))?
                }
                (None, None) => return Err(bad("neither image bytes nor a path".into())),
            };
            let image = image::load_from_memory(&bytes).map_err(|e| bad(format!("image does not decode: {e}")))?;
            let (w, h) = (image.width() as usize, image.height() as usize);
            if (h, w) != (camera.height, camera.width) {
                return Err(bad(format!(
                    "image is {h}×{w} (H×W); the feature's shape says {}×{}",
                    camera.height, camera.width
                )));
            }
            out.extend_from_slice(image.to_rgb8().as_raw());
        }
        Ok(out)
    }
}

fn shorten(items: &[String]) -> String {
    if items.len() <= 12 {
        format!("[{}]", items.join(", "))
    } else {
        format!("[{}, …, {}] ({} values)", items[..6].join(", "), items[items.len() - 3..].join(", "), items.len())
    }
}

/// Appends the numbers of a scalar or (nested) list cell.
fn push_numbers(field: &Field, out: &mut Vec<f32>) -> Result<(), String> {
    match field {
        Field::Bool(b) => out.push(if *b { 1.0 } else { 0.0 }),
        Field::Byte(v) => out.push(f32::from(*v)),
        Field::Short(v) => out.push(f32::from(*v)),
        Field::Int(v) => out.push(*v as f32),
        Field::Long(v) => out.push(*v as f32),
        Field::UByte(v) => out.push(f32::from(*v)),
        Field::UShort(v) => out.push(f32::from(*v)),
        Field::UInt(v) => out.push(*v as f32),
        Field::ULong(v) => out.push(*v as f32),
        Field::Float16(v) => out.push(v.to_f32()),
        Field::Float(v) => out.push(*v),
        Field::Double(v) => out.push(*v as f32),
        Field::ListInternal(list) => {
            for element in list.elements() {
                push_numbers(element, out)?;
            }
        }
        Field::Null => return Err("a null value; expected numbers".to_string()),
        other => return Err(format!("{} is not a number", describe(Some(other)))),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Video

fn no_video(file: &Path, key: &str) -> LeRobotError {
    key_error(
        file,
        key,
        "a video camera, and this build decodes no video: build with `--features rl/video`, or choose image \
         cameras with --cameras",
    )
}

#[cfg(not(feature = "video"))]
fn decode_video(file: &Path, camera: &Camera, _times: &[f64], _fps: f64) -> Result<Vec<u8>> {
    Err(no_video(file, &camera.key))
}

#[cfg(feature = "video")]
fn decode_video(file: &Path, camera: &Camera, times: &[f64], fps: f64) -> Result<Vec<u8>> {
    video::frames_at(file, &camera.key, (camera.height, camera.width), times, fps)
}

/// What video this build decodes, in words (for messages and `--help`).
#[cfg(feature = "video")]
pub const VIDEO_SUPPORT: &str = "MP4 with AV1 (8-bit, rav1d) or H.264 (OpenH264)";

/// MP4 video cameras: demuxed with `re_mp4`, AV1 decoded with `rav1d` (the Rust port of dav1d,
/// built without its assembly so no `nasm` is needed; 8-bit only, which is what LeRobot's
/// `libsvtav1` yuv420p encoding gives), H.264 with OpenH264 built from its bundled C++ source.
///
/// A row's frame is the one whose presentation time (`re_mp4` shifts the first to 0, as an
/// edit list does) is nearest to `from_timestamp + timestamp`; one more than half a frame period
/// (`0.5 / fps`) away is an error, as is a frame of another size than the feature's shape.
/// Decoding starts at the last sync sample before the first frame needed and stops after the
/// last one, so a v3.0 file shared by many episodes is not decoded from its start each time.
///
/// YUV to RGB: BT.601 (BT.709 when an AV1 sequence header says so), limited range unless an AV1
/// header says full; chroma taken from the nearest sample (no interpolation). This matches
/// ffmpeg's untagged `yuv420p` → `rgb24` to within the codec tolerance the tests state.
#[cfg(feature = "video")]
mod video {
    use super::{key_error, Result};
    use std::io::{Read, Seek, SeekFrom};
    use std::path::Path;

    /// One decoded picture, planar YUV (chroma subsampled by `1 << shift` per axis).
    struct Yuv {
        width: usize,
        height: usize,
        planes: [Vec<u8>; 3],
        strides: [usize; 3],
        /// Chroma subsampling shift `(x, y)`; `None` for monochrome.
        chroma_shift: Option<(u32, u32)>,
        bt709: bool,
        full_range: bool,
    }

    impl Yuv {
        fn to_rgb(&self) -> Vec<u8> {
            let (kr, kb) = if self.bt709 { (0.2126f32, 0.0722f32) } else { (0.299f32, 0.114f32) };
            let kg = 1.0 - kr - kb;
            let (y_off, y_scale, c_scale) =
                if self.full_range { (0.0, 1.0, 1.0) } else { (16.0, 255.0 / 219.0, 255.0 / 224.0) };
            let mut out = Vec::with_capacity(self.width * self.height * 3);
            for row in 0..self.height {
                for col in 0..self.width {
                    let y = (f32::from(self.planes[0][row * self.strides[0] + col]) - y_off) * y_scale;
                    let (cb, cr) = match self.chroma_shift {
                        Some((sx, sy)) => {
                            let (r, c) = (row >> sy, col >> sx);
                            (
                                (f32::from(self.planes[1][r * self.strides[1] + c]) - 128.0) * c_scale,
                                (f32::from(self.planes[2][r * self.strides[2] + c]) - 128.0) * c_scale,
                            )
                        }
                        None => (0.0, 0.0),
                    };
                    let r = y + 2.0 * (1.0 - kr) * cr;
                    let b = y + 2.0 * (1.0 - kb) * cb;
                    let g = y - (2.0 * kb * (1.0 - kb) / kg) * cb - (2.0 * kr * (1.0 - kr) / kg) * cr;
                    out.extend([r, g, b].map(|v| v.round().clamp(0.0, 255.0) as u8));
                }
            }
            out
        }
    }

    /// A codec behind one interface: samples in, pictures out in display order.
    trait Decode {
        fn push(&mut self, sample: &[u8], sync: bool, out: &mut Vec<Yuv>) -> Result<(), String>;
        fn finish(&mut self, out: &mut Vec<Yuv>) -> Result<(), String>;
    }

    pub(super) fn frames_at(
        file: &Path,
        key: &str,
        (height, width): (usize, usize),
        times: &[f64],
        fps: f64,
    ) -> Result<Vec<u8>> {
        let err = |reason: String| key_error(file, key, reason);
        let mut handle = match std::fs::File::open(file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(err("missing (the metadata lists it)".into()))
            }
            Err(e) => return Err(err(format!("cannot open: {e}"))),
        };
        let size = handle.metadata().map_err(|e| err(format!("cannot open: {e}")))?.len();
        let mp4 = re_mp4::Mp4::read(std::io::BufReader::new(&mut handle), size)
            .map_err(|e| err(format!("not a readable MP4 file: {e}")))?;
        let Some(track) = mp4.tracks().values().find(|t| t.kind == Some(re_mp4::TrackKind::Video)) else {
            return Err(err("the MP4 file has no video track".into()));
        };
        let samples = &track.samples;
        if samples.is_empty() {
            return Err(err("the video track has no frames".into()));
        }
        if track.timescale == 0 {
            return Err(err("the video track has timescale 0".into()));
        }
        // Display order: samples sorted by composition time.
        let mut display: Vec<usize> = (0..samples.len()).collect();
        display.sort_by_key(|&i| (samples[i].composition_timestamp, i));
        let seconds: Vec<f64> =
            display.iter().map(|&i| samples[i].composition_timestamp as f64 / track.timescale as f64).collect();
        let tolerance = 0.5 / fps;
        let mut wanted = Vec::with_capacity(times.len());
        for (row, &t) in times.iter().enumerate() {
            let at = seconds.partition_point(|&s| s < t);
            let nearest = [at.checked_sub(1), (at < seconds.len()).then_some(at)]
                .into_iter()
                .flatten()
                .min_by(|&a, &b| (seconds[a] - t).abs().total_cmp(&(seconds[b] - t).abs()));
            let Some(d) = nearest.filter(|&d| (seconds[d] - t).abs() <= tolerance) else {
                let last = seconds.last().copied().unwrap_or(0.0);
                return Err(err(format!(
                    "frame {row}: no frame within {tolerance:.4} s of time {t:.4} s (the video's frames span 0 to \
                     {last:.4} s)"
                )));
            };
            wanted.push(d);
        }
        // Decode from the last sync sample at or before the first sample needed.
        let first_needed = wanted.iter().map(|&d| display[d]).min().unwrap_or(0);
        let start = (0..=first_needed).rev().find(|&i| samples[i].is_sync).unwrap_or(0);
        // Display rank (within the decoded run) → display index overall.
        let mut run: Vec<usize> = (start..samples.len()).collect();
        run.sort_by_key(|&i| (samples[i].composition_timestamp, i));
        let mut display_of_sample = vec![0usize; samples.len()];
        for (d, &i) in display.iter().enumerate() {
            display_of_sample[i] = d;
        }
        let rank_to_display: Vec<usize> = run.iter().map(|&i| display_of_sample[i]).collect();

        let stsd = &track.trak(&mp4).mdia.minf.stbl.stsd.contents;
        let mut decoder: Box<dyn Decode> = match stsd {
            re_mp4::StsdBoxContent::Av01(_) => Box::new(Av1::new().map_err(err)?),
            re_mp4::StsdBoxContent::Avc1(avc1) => Box::new(H264::new(avc1).map_err(err)?),
            other => {
                let codec = other.codec_string().unwrap_or_else(|| "unknown".into());
                return Err(err(format!(
                    "codec {codec} is not decoded here (AV1 and H.264 are); re-encode the videos, e.g. with LeRobot's \
                     AV1 default"
                )));
            }
        };

        let frame = height * width * 3;
        let mut frames: Vec<Option<Vec<u8>>> = vec![None; seconds.len()];
        let needed: std::collections::BTreeSet<usize> = wanted.iter().copied().collect();
        let mut produced = 0usize;
        let mut pictures = Vec::new();
        let mut bytes = Vec::new();
        let take = |pictures: &mut Vec<Yuv>, produced: &mut usize, frames: &mut [Option<Vec<u8>>]| -> Result<()> {
            for picture in pictures.drain(..) {
                let d = rank_to_display.get(*produced).copied().unwrap_or(usize::MAX);
                *produced += 1;
                if needed.contains(&d) {
                    if (picture.height, picture.width) != (height, width) {
                        return Err(err(format!(
                            "frames are {}×{} (H×W); the feature's shape says {height}×{width}",
                            picture.height, picture.width
                        )));
                    }
                    frames[d] = Some(picture.to_rgb());
                }
            }
            Ok(())
        };
        for (i, s) in samples.iter().enumerate().skip(start) {
            let len = usize::try_from(s.size).map_err(|_| err(format!("sample {i}: size {} too large", s.size)))?;
            if s.offset.checked_add(s.size).is_none_or(|end| end > size) {
                return Err(err(format!("sample {i} lies beyond the end of the file (truncated?)")));
            }
            bytes.resize(len, 0);
            handle
                .seek(SeekFrom::Start(s.offset))
                .and_then(|_| handle.read_exact(&mut bytes))
                .map_err(|e| err(format!("sample {i}: unreadable: {e}")))?;
            decoder.push(&bytes, s.is_sync, &mut pictures).map_err(|e| err(format!("sample {i}: {e}")))?;
            take(&mut pictures, &mut produced, &mut frames)?;
            if needed.iter().all(|&d| frames[d].is_some()) {
                break;
            }
        }
        decoder.finish(&mut pictures).map_err(|e| err(format!("at the end of the stream: {e}")))?;
        take(&mut pictures, &mut produced, &mut frames)?;

        let mut out = Vec::with_capacity(wanted.len() * frame);
        for (row, d) in wanted.iter().enumerate() {
            match &frames[*d] {
                Some(f) => out.extend_from_slice(f),
                None => {
                    return Err(err(format!(
                        "frame {row}: the decoder gave no picture for the frame at {:.4} s",
                        seconds[*d]
                    )))
                }
            }
        }
        Ok(out)
    }

    // -----------------------------------------------------------------------------------------
    // H.264 (OpenH264)

    struct H264 {
        decoder: openh264::decoder::Decoder,
        length_size: usize,
        parameter_sets: Vec<u8>,
        packet: Vec<u8>,
    }

    impl H264 {
        fn new(avc1: &re_mp4::Avc1Box) -> Result<Self, String> {
            let avcc = &avc1.avcc.contents;
            use openh264::decoder::{Decoder, DecoderConfig, Flush};
            let mut parameter_sets = Vec::new();
            for nal in avcc.sequence_parameter_sets.iter().chain(&avcc.picture_parameter_sets) {
                parameter_sets.extend_from_slice(&[0, 0, 0, 1]);
                parameter_sets.extend_from_slice(&nal.bytes);
            }
            // No flush per packet: B-frames need the reordering buffer (see sampler's h264.rs).
            let config = DecoderConfig::new().flush_after_decode(Flush::NoFlush);
            let decoder = Decoder::with_api_config(openh264::OpenH264API::from_source(), config)
                .map_err(|e| format!("cannot start OpenH264: {e}"))?;
            Ok(Self {
                decoder,
                length_size: usize::from(avcc.length_size_minus_one & 3) + 1,
                parameter_sets,
                packet: Vec::new(),
            })
        }
    }

    fn yuv_of(picture: &openh264::decoder::DecodedYUV<'_>) -> Yuv {
        use openh264::formats::YUVSource;
        let (width, height) = picture.dimensions();
        let (sy, su, sv) = picture.strides();
        Yuv {
            width,
            height,
            planes: [picture.y().to_vec(), picture.u().to_vec(), picture.v().to_vec()],
            strides: [sy, su, sv],
            chroma_shift: Some((1, 1)),
            bt709: false,
            full_range: false,
        }
    }

    impl Decode for H264 {
        fn push(&mut self, sample: &[u8], sync: bool, out: &mut Vec<Yuv>) -> Result<(), String> {
            self.packet.clear();
            if sync {
                self.packet.extend_from_slice(&self.parameter_sets);
            }
            // AVCC (length-prefixed NAL units) → Annex B (start codes), what OpenH264 reads.
            let mut rest = sample;
            while !rest.is_empty() {
                if rest.len() < self.length_size {
                    return Err("a NAL length field is cut off".into());
                }
                let len = rest[..self.length_size].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
                rest = &rest[self.length_size..];
                if len > rest.len() {
                    return Err(format!("a NAL unit claims {len} bytes, {} remain", rest.len()));
                }
                self.packet.extend_from_slice(&[0, 0, 0, 1]);
                self.packet.extend_from_slice(&rest[..len]);
                rest = &rest[len..];
            }
            match self.decoder.decode(&self.packet) {
                Ok(Some(picture)) => out.push(yuv_of(&picture)),
                Ok(None) => {}
                Err(e) => return Err(format!("OpenH264 cannot decode it ({e})")),
            }
            Ok(())
        }

        fn finish(&mut self, out: &mut Vec<Yuv>) -> Result<(), String> {
            let rest = self.decoder.flush_remaining().map_err(|e| format!("OpenH264: {e}"))?;
            out.extend(rest.iter().map(yuv_of));
            Ok(())
        }
    }

    // -----------------------------------------------------------------------------------------
    // AV1 (rav1d, through its dav1d-compatible API)

    use rav1d::include::dav1d::data::Dav1dData;
    use rav1d::include::dav1d::dav1d::{Dav1dContext, Dav1dSettings};
    use rav1d::include::dav1d::headers::{
        DAV1D_PIXEL_LAYOUT_I400, DAV1D_PIXEL_LAYOUT_I420, DAV1D_PIXEL_LAYOUT_I422, DAV1D_PIXEL_LAYOUT_I444,
    };
    use rav1d::include::dav1d::picture::Dav1dPicture;
    use rav1d::src::lib as dav1d;
    use std::ptr::NonNull;

    /// dav1d's "try again" (`-EAGAIN`): feed more data, or take pictures first.
    const EAGAIN: i32 = -11;

    struct Av1 {
        context: Option<Dav1dContext>,
    }

    impl Av1 {
        fn new() -> Result<Self, String> {
            let mut settings = std::mem::MaybeUninit::<Dav1dSettings>::uninit();
            // SAFETY: `dav1d_default_settings` writes a whole `Dav1dSettings` through the pointer,
            // which points to writable memory of that type.
            let mut settings = unsafe {
                dav1d::dav1d_default_settings(NonNull::new_unchecked(settings.as_mut_ptr()));
                settings.assume_init()
            };
            // One thread and no frame delay: pictures come out as soon as they are decoded.
            settings.n_threads = 1;
            settings.max_frame_delay = 1;
            let mut context: Option<Dav1dContext> = None;
            // SAFETY: both pointers come from live references to values of the right types.
            let result =
                unsafe { dav1d::dav1d_open(Some(NonNull::from(&mut context)), Some(NonNull::from(&mut settings))) };
            if result.0 < 0 || context.is_none() {
                return Err(format!("cannot start the AV1 decoder (error {})", result.0));
            }
            Ok(Self { context })
        }

        /// Takes every picture the decoder has ready.
        fn drain(&mut self, out: &mut Vec<Yuv>) -> Result<(), String> {
            loop {
                let mut picture = Dav1dPicture::default();
                // SAFETY: the context is open (from `dav1d_open`, not closed before `Drop`), and
                // `picture` is a live, default-initialised picture the call may fill.
                let result = unsafe { dav1d::dav1d_get_picture(self.context, Some(NonNull::from(&mut picture))) };
                if result.0 == EAGAIN {
                    return Ok(());
                }
                if result.0 < 0 {
                    return Err(format!("the AV1 decoder failed (error {})", result.0));
                }
                let converted = picture_yuv(&picture);
                // SAFETY: `picture` was filled by `dav1d_get_picture` and is released once.
                unsafe { dav1d::dav1d_picture_unref(Some(NonNull::from(&mut picture))) };
                out.push(converted?);
            }
        }
    }

    /// Copies an 8-bit picture's planes out of the decoder's buffers.
    fn picture_yuv(picture: &Dav1dPicture) -> Result<Yuv, String> {
        if picture.p.bpc != 8 {
            return Err(format!("{}-bit AV1 is not decoded here (8-bit is)", picture.p.bpc));
        }
        let (width, height) = (usize::try_from(picture.p.w).unwrap_or(0), usize::try_from(picture.p.h).unwrap_or(0));
        let chroma_shift = match picture.p.layout {
            DAV1D_PIXEL_LAYOUT_I420 => Some((1, 1)),
            DAV1D_PIXEL_LAYOUT_I422 => Some((1, 0)),
            DAV1D_PIXEL_LAYOUT_I444 => Some((0, 0)),
            DAV1D_PIXEL_LAYOUT_I400 => None,
            other => return Err(format!("unknown AV1 pixel layout {other}")),
        };
        let luma_stride = usize::try_from(picture.stride[0]).map_err(|_| "negative stride".to_string())?;
        let chroma_stride = usize::try_from(picture.stride[1]).map_err(|_| "negative stride".to_string())?;
        let plane = |i: usize, stride: usize, rows: usize| -> Result<Vec<u8>, String> {
            let Some(ptr) = picture.data[i] else { return Err(format!("plane {i} missing")) };
            // SAFETY: dav1d's picture planes hold `rows` rows of `stride` bytes each (the stride
            // covers the row's width, rounded up), valid until the picture is unreferenced.
            Ok(unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<u8>(), stride * rows) }.to_vec())
        };
        let (planes, strides) = match chroma_shift {
            Some((_, sy)) => {
                let chroma_rows = (height + (1 << sy) - 1) >> sy;
                (
                    [
                        plane(0, luma_stride, height)?,
                        plane(1, chroma_stride, chroma_rows)?,
                        plane(2, chroma_stride, chroma_rows)?,
                    ],
                    [luma_stride, chroma_stride, chroma_stride],
                )
            }
            None => ([plane(0, luma_stride, height)?, Vec::new(), Vec::new()], [luma_stride, 0, 0]),
        };
        // SAFETY: a picture from the decoder points to its sequence header, valid while the
        // picture is referenced.
        let header = picture.seq_hdr.map(|h| unsafe { h.as_ref() });
        Ok(Yuv {
            width,
            height,
            planes,
            strides,
            chroma_shift,
            bt709: header.is_some_and(|h| h.mtrx == 1),
            full_range: header.is_some_and(|h| h.color_range != 0),
        })
    }

    impl Decode for Av1 {
        fn push(&mut self, sample: &[u8], _sync: bool, out: &mut Vec<Yuv>) -> Result<(), String> {
            let mut data = Dav1dData::default();
            // SAFETY: `data` is a live, empty `Dav1dData`; the call allocates `sample.len()`
            // bytes it owns and returns a pointer to them (null on failure).
            let buffer = unsafe { dav1d::dav1d_data_create(Some(NonNull::from(&mut data)), sample.len()) };
            if buffer.is_null() {
                return Err("the AV1 decoder could not allocate a sample buffer".into());
            }
            // SAFETY: `buffer` points to `sample.len()` writable bytes owned by `data`.
            unsafe { std::ptr::copy_nonoverlapping(sample.as_ptr(), buffer, sample.len()) };
            let result = loop {
                // SAFETY: the context is open; `data` holds the sample (the call consumes it,
                // leaving `sz == 0`, or leaves it for another try on EAGAIN).
                let result = unsafe { dav1d::dav1d_send_data(self.context, Some(NonNull::from(&mut data))) };
                if result.0 < 0 && result.0 != EAGAIN {
                    break Err(format!("the AV1 decoder refused the sample (error {})", result.0));
                }
                if let Err(e) = self.drain(out) {
                    break Err(e);
                }
                if data.sz == 0 {
                    break Ok(());
                }
            };
            if data.sz > 0 {
                // SAFETY: `data` still owns its buffer (not consumed); released once.
                unsafe { dav1d::dav1d_data_unref(Some(NonNull::from(&mut data))) };
            }
            result
        }

        fn finish(&mut self, out: &mut Vec<Yuv>) -> Result<(), String> {
            self.drain(out)
        }
    }

    impl Drop for Av1 {
        fn drop(&mut self) {
            if self.context.is_some() {
                // SAFETY: the context came from `dav1d_open` and is closed once (it is set to
                // `None` by the call).
                unsafe { dav1d::dav1d_close(Some(NonNull::from(&mut self.context))) };
            }
        }
    }
}
