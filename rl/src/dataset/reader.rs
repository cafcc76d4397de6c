//! Reading a dataset: memory-mapped shards, validated up front, served as zero-copy slices.
//!
//! [`Dataset::open`] checks every shard against `meta.json` before anything is handed out —
//! header, presence of every key, dtype, shape, byte alignment, episode and frame indices and
//! the `next.done` pattern — so training code can index without further checks, and a
//! truncated or tampered file fails with an error naming the file and the key instead of a
//! panic mid-training. (As with any memory map, a file modified *after* opening is outside
//! this guarantee.)

use super::writer::{final_observation_keys, key_specs};
use super::{
    final_key, image_key, DatasetError, DatasetMeta, EpisodeMeta, KEY_ACTION, KEY_DONE, KEY_ENVIRONMENT_STATE,
    KEY_EPISODE_INDEX, KEY_FRAME_INDEX, KEY_REWARD, KEY_STATE, KEY_SUCCESS, META_FILE,
};
use crate::env::{CAMERA_NAMES, NUM_CAMERAS};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Byte range of a validated tensor inside its shard's memory map.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    end: usize,
}

struct Shard {
    mmap: Mmap,
    spans: HashMap<String, Span>,
    length: usize,
}

impl Shard {
    fn bytes(&self, key: &str) -> &[u8] {
        let span = self.spans[key];
        &self.mmap[span.start..span.end]
    }
    fn f32s(&self, key: &str) -> &[f32] {
        // Alignment and length were checked in `validate_shard`.
        bytemuck::cast_slice(self.bytes(key))
    }
}

/// An opened, validated dataset.
pub struct Dataset {
    dir: PathBuf,
    meta: DatasetMeta,
    shards: Vec<Shard>,
}

/// One transition (s, a, r, s', done) with all modalities, borrowed from the memory maps.
#[derive(Clone, Copy, Debug)]
pub struct Transition<'a> {
    pub episode_index: usize,
    pub frame_index: usize,
    pub state: &'a [f32],
    pub environment_state: &'a [f32],
    /// u8 H×W×3 per camera, in [`CAMERA_NAMES`] order.
    pub images: [&'a [u8]; NUM_CAMERAS],
    pub action: &'a [f32],
    pub reward: f32,
    pub next_state: &'a [f32],
    pub next_environment_state: &'a [f32],
    pub next_images: [&'a [u8]; NUM_CAMERAS],
    /// Last step of the episode (success or time limit).
    pub done: bool,
    /// The step reached success: the true terminal; do not bootstrap through it.
    pub terminal: bool,
}

/// One episode of a dataset.
#[derive(Clone, Copy)]
pub struct EpisodeView<'a> {
    shard: &'a Shard,
    meta: &'a EpisodeMeta,
    frame_bytes: usize,
    state_dim: usize,
    environment_state_dim: usize,
    action_dim: usize,
}

impl<'a> EpisodeView<'a> {
    pub fn meta(&self) -> &'a EpisodeMeta {
        self.meta
    }
    /// Number of steps (frames with an action).
    pub fn len(&self) -> usize {
        self.shard.length
    }
    pub fn is_empty(&self) -> bool {
        self.shard.length == 0
    }
    fn row(values: &[f32], dim: usize, t: usize) -> &[f32] {
        &values[t * dim..(t + 1) * dim]
    }
    /// Proprioceptive state at frame `t` (0 ≤ t ≤ len; t = len is the final observation).
    pub fn state(&self, t: usize) -> &'a [f32] {
        if t == self.len() {
            self.shard.f32s(&final_key(KEY_STATE))
        } else {
            Self::row(self.shard.f32s(KEY_STATE), self.state_dim, t)
        }
    }
    /// Object state at frame `t` (0 ≤ t ≤ len).
    pub fn environment_state(&self, t: usize) -> &'a [f32] {
        if t == self.len() {
            self.shard.f32s(&final_key(KEY_ENVIRONMENT_STATE))
        } else {
            Self::row(self.shard.f32s(KEY_ENVIRONMENT_STATE), self.environment_state_dim, t)
        }
    }
    /// Image of camera `camera` (index into [`CAMERA_NAMES`]) at frame `t` (0 ≤ t ≤ len).
    pub fn image(&self, camera: usize, t: usize) -> &'a [u8] {
        let key = image_key(CAMERA_NAMES[camera]);
        if t == self.len() {
            self.shard.bytes(&final_key(&key))
        } else {
            &self.shard.bytes(&key)[t * self.frame_bytes..(t + 1) * self.frame_bytes]
        }
    }
    pub fn images(&self, t: usize) -> [&'a [u8]; NUM_CAMERAS] {
        std::array::from_fn(|c| self.image(c, t))
    }
    pub fn action(&self, t: usize) -> &'a [f32] {
        Self::row(self.shard.f32s(KEY_ACTION), self.action_dim, t)
    }
    pub fn reward(&self, t: usize) -> f32 {
        self.shard.f32s(KEY_REWARD)[t]
    }
    pub fn done(&self, t: usize) -> bool {
        self.shard.bytes(KEY_DONE)[t] != 0
    }
    pub fn success(&self, t: usize) -> bool {
        self.shard.bytes(KEY_SUCCESS)[t] != 0
    }
    /// All rewards of the episode.
    pub fn rewards(&self) -> &'a [f32] {
        self.shard.f32s(KEY_REWARD)
    }
    /// Whole-episode arrays, row-major: `[len, dim]`.
    pub fn states(&self) -> &'a [f32] {
        self.shard.f32s(KEY_STATE)
    }
    pub fn actions(&self) -> &'a [f32] {
        self.shard.f32s(KEY_ACTION)
    }
    /// Transition `t`: observation t, action t, reward t, observation t + 1.
    pub fn transition(&self, t: usize) -> Transition<'a> {
        Transition {
            episode_index: self.meta.index,
            frame_index: t,
            state: self.state(t),
            environment_state: self.environment_state(t),
            images: self.images(t),
            action: self.action(t),
            reward: self.reward(t),
            next_state: self.state(t + 1),
            next_environment_state: self.environment_state(t + 1),
            next_images: self.images(t + 1),
            done: self.done(t),
            terminal: self.success(t),
        }
    }
}

impl Dataset {
    /// Opens `dir`, reading `meta.json` and memory-mapping and validating every shard.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, DatasetError> {
        let dir = dir.as_ref().to_path_buf();
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).map_err(|e| DatasetError::io(&meta_path, e))?;
        let meta: DatasetMeta = serde_json::from_str(&text)
            .map_err(|e| DatasetError::Meta { path: meta_path.clone(), reason: e.to_string() })?;
        check_meta(&meta, &meta_path)?;
        let mut shards = Vec::with_capacity(meta.episodes.len());
        for (position, episode) in meta.episodes.iter().enumerate() {
            if episode.index != position {
                return Err(DatasetError::Meta {
                    path: meta_path,
                    reason: format!("episodes[{position}] has index {}, expected {position}", episode.index),
                });
            }
            shards.push(open_shard(&dir.join(&episode.file), episode, &meta)?);
        }
        Ok(Self { dir, meta, shards })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn meta(&self) -> &DatasetMeta {
        &self.meta
    }
    pub fn num_episodes(&self) -> usize {
        self.shards.len()
    }
    /// Total number of transitions.
    pub fn num_transitions(&self) -> usize {
        self.shards.iter().map(|s| s.length).sum()
    }
    pub fn episode(&self, index: usize) -> Option<EpisodeView<'_>> {
        let shard = self.shards.get(index)?;
        Some(EpisodeView {
            shard,
            meta: &self.meta.episodes[index],
            frame_bytes: self.meta.image_height * self.meta.image_width * 3,
            state_dim: self.meta.state_dim,
            environment_state_dim: self.meta.environment_state_dim,
            action_dim: self.meta.action_dim,
        })
    }
    pub fn episodes(&self) -> impl Iterator<Item = EpisodeView<'_>> + '_ {
        (0..self.shards.len()).filter_map(move |i| self.episode(i))
    }
    /// Every transition of every episode, in order.
    pub fn transitions(&self) -> impl Iterator<Item = Transition<'_>> + '_ {
        self.episodes().flat_map(|episode| (0..episode.len()).map(move |t| episode.transition(t)))
    }
}

fn check_meta(meta: &DatasetMeta, path: &Path) -> Result<(), DatasetError> {
    let fail = |reason: String| Err(DatasetError::Meta { path: path.to_path_buf(), reason });
    let cameras: Vec<&str> = meta.cameras.iter().map(String::as_str).collect();
    if cameras != CAMERA_NAMES {
        return fail(format!("cameras {cameras:?}, expected {CAMERA_NAMES:?}"));
    }
    if meta.num_episodes != meta.episodes.len() {
        return fail(format!("num_episodes is {} but {} episodes are listed", meta.num_episodes, meta.episodes.len()));
    }
    if meta.image_height != meta.env.image_height || meta.image_width != meta.env.image_width {
        return fail("image size disagrees with env config".into());
    }
    Ok(())
}

fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

fn open_shard(path: &Path, episode: &EpisodeMeta, meta: &DatasetMeta) -> Result<Shard, DatasetError> {
    let file = std::fs::File::open(path).map_err(|e| DatasetError::io(path, e))?;
    // SAFETY: the map is read-only; the module docs state that files must not change while
    // a dataset is open.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| DatasetError::io(path, e))?;
    let spans = validate_shard(path, &mmap, episode, meta)?;
    Ok(Shard { mmap, spans, length: episode.length })
}

/// Checks header, keys, dtypes, shapes, alignment and index contents of one shard.
fn validate_shard(
    path: &Path,
    bytes: &[u8],
    episode: &EpisodeMeta,
    meta: &DatasetMeta,
) -> Result<HashMap<String, Span>, DatasetError> {
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|e| DatasetError::Shard { file: path.to_path_buf(), reason: e.to_string() })?;
    let t = episode.length;
    if t == 0 {
        return Err(DatasetError::Shard {
            file: path.to_path_buf(),
            reason: "meta.json lists this episode with length 0".into(),
        });
    }
    let mut expected: Vec<(String, String, Vec<usize>)> = Vec::new();
    for (key, spec) in key_specs(&meta.env) {
        let mut shape = vec![t];
        shape.extend(&spec.shape);
        expected.push((key, spec.dtype, shape));
    }
    let per_frame = key_specs(&meta.env);
    for key in final_observation_keys() {
        let spec = &per_frame[&key];
        let mut shape = vec![1];
        shape.extend(&spec.shape);
        expected.push((final_key(&key), spec.dtype.clone(), shape));
    }
    let base = bytes.as_ptr() as usize;
    let mut spans = HashMap::new();
    for (key, dtype, shape) in expected {
        let view = tensors.tensor(&key).map_err(|_| DatasetError::key(path, &key, "missing from the shard"))?;
        let found_dtype = dtype_name(view.dtype());
        if found_dtype != dtype {
            return Err(DatasetError::key(path, &key, format!("dtype {found_dtype}, expected {dtype}")));
        }
        if view.shape() != shape.as_slice() {
            return Err(DatasetError::key(path, &key, format!("shape {:?}, expected {shape:?}", view.shape())));
        }
        let data = view.data();
        let start = data.as_ptr() as usize - base;
        let align = view.dtype().bitsize() / 8;
        if align > 1 && !(data.as_ptr() as usize).is_multiple_of(align) {
            return Err(DatasetError::key(path, &key, format!("data at byte {start} is not {align}-byte aligned")));
        }
        spans.insert(key, Span { start, end: start + data.len() });
    }
    // Contents that must follow from the position in the dataset.
    let view_i64 = |key: &str| -> &[i64] {
        let span = spans[key];
        bytemuck::cast_slice(&bytes[span.start..span.end])
    };
    if let Some(bad) = view_i64(KEY_EPISODE_INDEX).iter().position(|&v| v != episode.index as i64) {
        return Err(DatasetError::key(
            path,
            KEY_EPISODE_INDEX,
            format!("frame {bad} says episode {}, expected {}", view_i64(KEY_EPISODE_INDEX)[bad], episode.index),
        ));
    }
    if let Some(bad) = view_i64(KEY_FRAME_INDEX).iter().enumerate().position(|(i, &v)| v != i as i64) {
        return Err(DatasetError::key(
            path,
            KEY_FRAME_INDEX,
            format!("entry {bad} is {}, expected {bad}", view_i64(KEY_FRAME_INDEX)[bad]),
        ));
    }
    let done = &bytes[spans[KEY_DONE].start..spans[KEY_DONE].end];
    if done.iter().enumerate().any(|(i, &d)| (d != 0) != (i + 1 == t)) {
        return Err(DatasetError::key(path, KEY_DONE, "must be 1 on the last frame and 0 elsewhere"));
    }
    let rewards: &[f32] = bytemuck::cast_slice(&bytes[spans[KEY_REWARD].start..spans[KEY_REWARD].end]);
    if let Some(bad) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(DatasetError::key(path, KEY_REWARD, format!("frame {bad} is not finite")));
    }
    for key in [KEY_STATE, KEY_ACTION, KEY_ENVIRONMENT_STATE] {
        let values: &[f32] = bytemuck::cast_slice(&bytes[spans[key].start..spans[key].end]);
        if values.iter().any(|v| !v.is_finite()) {
            return Err(DatasetError::key(path, key, "contains a non-finite value"));
        }
    }
    Ok(spans)
}
