//! Reading a dataset: memory-mapped shards, validated up front, served as zero-copy slices.
//!
//! [`Dataset::open`] checks every shard against `meta.json` before anything is handed out —
//! header, presence of every key, dtype, shape, byte alignment, episode and frame indices and
//! the `next.done` pattern — so training code can index without further checks, and a
//! truncated or tampered file fails with an error naming the file and the key instead of a
//! panic mid-training. (As with any memory map, a file modified *after* opening is outside
//! this guarantee.)
//!
//! `meta.json` is checked against itself and the shards too: every field the reader or the
//! trainer relies on (dims, names, keys, image size, environment), the per-episode summaries
//! (length, seed, policy, return = Σ rewards, success = the last `next.success`, normalised
//! score) and the dataset-level ones (frame count, mean return and score, success rate, stats
//! of every key). A shard-like file the metadata does not list makes the dataset "mixed" (what
//! collecting over an older, larger dataset used to leave) and is refused too. A directory
//! without `meta.json` is named as absent, empty or incomplete (an interrupted collection).

use super::writer::key_specs;
use super::{
    final_key, image_key, is_shard_file_name, shard_file_name, DatasetError, DatasetMeta, EpisodeMeta, KeyStats,
    FORMAT, FORMAT_IMPORTED, KEY_ACTION, KEY_DONE, KEY_ENVIRONMENT_STATE, KEY_EPISODE_INDEX, KEY_FRAME_INDEX,
    KEY_REWARD, KEY_STATE, KEY_SUCCESS, META_FILE,
};
use crate::env::{
    Env, EnvConfig, ACTION_DIM, ACTION_NAMES, CAMERA_NAMES, ENVIRONMENT_STATE_DIM, ENVIRONMENT_STATE_NAMES, FPS,
    STATE_DIM, STATE_NAMES,
};
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
#[derive(Clone, Debug)]
pub struct Transition<'a> {
    pub episode_index: usize,
    pub frame_index: usize,
    pub state: &'a [f32],
    pub environment_state: &'a [f32],
    /// u8 H×W×3 per camera, in the dataset's camera order (`meta.cameras`).
    pub images: Vec<&'a [u8]>,
    pub action: &'a [f32],
    pub reward: f32,
    pub next_state: &'a [f32],
    pub next_environment_state: &'a [f32],
    pub next_images: Vec<&'a [u8]>,
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
    cameras: &'a [String],
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
    /// Object state at frame `t` (0 ≤ t ≤ len); empty for an imported dataset.
    pub fn environment_state(&self, t: usize) -> &'a [f32] {
        if self.environment_state_dim == 0 {
            &[]
        } else if t == self.len() {
            self.shard.f32s(&final_key(KEY_ENVIRONMENT_STATE))
        } else {
            Self::row(self.shard.f32s(KEY_ENVIRONMENT_STATE), self.environment_state_dim, t)
        }
    }
    /// Image of camera `camera` (index into the dataset's cameras) at frame `t` (0 ≤ t ≤ len).
    pub fn image(&self, camera: usize, t: usize) -> &'a [u8] {
        let key = image_key(&self.cameras[camera]);
        if t == self.len() {
            self.shard.bytes(&final_key(&key))
        } else {
            &self.shard.bytes(&key)[t * self.frame_bytes..(t + 1) * self.frame_bytes]
        }
    }
    pub fn images(&self, t: usize) -> Vec<&'a [u8]> {
        (0..self.cameras.len()).map(|c| self.image(c, t)).collect()
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
    /// Reads `dir/meta.json` and checks its layout (what the shards are read against), without
    /// opening a shard: for sizing work before a dataset is opened. [`Dataset::open`] reads it
    /// through here, then checks the summaries against the shards.
    pub fn read_meta(dir: impl AsRef<Path>) -> Result<DatasetMeta, DatasetError> {
        let dir = dir.as_ref();
        let meta_path = dir.join(META_FILE);
        if !meta_path.exists() {
            return Err(no_meta(dir));
        }
        let text = std::fs::read_to_string(&meta_path).map_err(|e| DatasetError::io(&meta_path, e))?;
        let meta: DatasetMeta = serde_json::from_str(&text)
            .map_err(|e| DatasetError::Meta { path: meta_path.clone(), reason: e.to_string() })?;
        // What the shards are read against must be right before they are read; the summaries are
        // then checked against the shards, and every disagreement is listed at once.
        meta_result(&meta_path, check_layout(&meta))?;
        Ok(meta)
    }

    /// Opens `dir`, reading and checking `meta.json`, and memory-mapping and validating every
    /// shard against it (see the module docs for what is checked).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, DatasetError> {
        let dir = dir.as_ref().to_path_buf();
        let meta_path = dir.join(META_FILE);
        let meta = Self::read_meta(&dir)?;
        check_unlisted(&dir, &meta)?;
        let mut shards = Vec::with_capacity(meta.episodes.len());
        let mut problems = check_summaries(&meta);
        for (position, episode) in meta.episodes.iter().enumerate() {
            let shard = open_shard(&dir.join(&episode.file), episode, &meta)?;
            problems.extend(check_episode_contents(&shard, position, episode));
            shards.push(shard);
        }
        meta_result(&meta_path, problems)?;
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
            cameras: &self.meta.cameras,
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

/// Why `dir` has no dataset, when it has no `meta.json`.
fn no_meta(dir: &Path) -> DatasetError {
    if !dir.exists() {
        return DatasetError::Absent { dir: dir.to_path_buf(), what: "absent" };
    }
    if !dir.is_dir() {
        return DatasetError::Absent { dir: dir.to_path_buf(), what: "a file, not a directory" };
    }
    match shared::outputs::contents(dir) {
        Ok(files) if files.is_empty() => DatasetError::Absent { dir: dir.to_path_buf(), what: "empty" },
        Ok(files) => DatasetError::Incomplete { dir: dir.to_path_buf(), files },
        Err(e) => DatasetError::Meta { path: dir.join(META_FILE), reason: format!("{e:#}") },
    }
}

/// At most this many problems are listed (a systematic fault would repeat per episode).
const MAX_LISTED: usize = 20;

fn meta_result(path: &Path, problems: Vec<String>) -> Result<(), DatasetError> {
    match problems.len() {
        0 => Ok(()),
        1 => Err(DatasetError::Meta { path: path.to_path_buf(), reason: problems[0].clone() }),
        n => {
            let mut listed: Vec<String> = problems.into_iter().take(MAX_LISTED).collect();
            if n > MAX_LISTED {
                listed.push(format!("and {} more", n - MAX_LISTED));
            }
            Err(DatasetError::Meta {
                path: path.to_path_buf(),
                reason: format!("{n} problems:\n  - {}", listed.join("\n  - ")),
            })
        }
    }
}

/// `a` and `b` agree to f32 precision (the writer sums in f32 in the same order, so they are
/// normally equal; the tolerance admits a file written by another tool).
fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1.0)
}

/// The normalised score of a return under the dataset's own reference returns (collected
/// datasets; checked present by [`check_layout`]).
fn score(refs: &super::ReferenceReturns, episode_return: f32) -> f32 {
    100.0 * (episode_return - refs.random) / (refs.expert - refs.random)
}

fn check_stats(key: &str, stats: &KeyStats, channels: usize, problems: &mut Vec<String>) {
    for (field, values) in [("mean", &stats.mean), ("std", &stats.std), ("min", &stats.min), ("max", &stats.max)] {
        if values.len() != channels {
            problems.push(format!("stats[{key:?}].{field} has {} values, expected {channels}", values.len()));
        } else if values.iter().any(|v| !v.is_finite()) {
            problems.push(format!("stats[{key:?}].{field} holds a non-finite value"));
        }
    }
    if stats.std.iter().any(|s| *s < 0.0) {
        problems.push(format!("stats[{key:?}].std holds a negative value"));
    }
    if stats.min.iter().zip(&stats.max).any(|(lo, hi)| lo > hi) {
        problems.push(format!("stats[{key:?}]: min exceeds max"));
    }
}

/// Every problem of the fields `meta.json` describes the shards with: format, dims, names, keys,
/// environment (collected) or source (imported) and image size, and each episode's index, file
/// and length.
fn check_layout(meta: &DatasetMeta) -> Vec<String> {
    let mut p = match meta.format.as_str() {
        FORMAT => check_collected_layout(meta),
        FORMAT_IMPORTED => check_imported_layout(meta),
        // Another format: nothing else can be trusted to mean what this reader thinks.
        other => return vec![format!("format is {other:?}; this build reads {FORMAT:?} and {FORMAT_IMPORTED:?}")],
    };
    let expected = meta.expected_keys();
    if meta.keys != expected {
        let mut differing: Vec<&String> = expected.keys().chain(meta.keys.keys()).collect();
        differing.sort();
        differing.dedup();
        differing.retain(|k| meta.keys.get(*k) != expected.get(*k));
        p.push(format!("keys disagree with the format for these dims and cameras at {differing:?}"));
    }
    if meta.episodes.is_empty() {
        p.push("episodes is empty".into());
    }
    if meta.num_episodes != meta.episodes.len() {
        p.push(format!("num_episodes is {} but {} episodes are listed", meta.num_episodes, meta.episodes.len()));
    }
    let max_length = meta.env.as_ref().map_or(MAX_IMPORTED_EPISODE_LENGTH, |env| env.max_steps);
    for (i, e) in meta.episodes.iter().enumerate() {
        let at = format!("episodes[{i}]");
        if e.index != i {
            p.push(format!("{at}.index is {}, expected {i}", e.index));
        }
        if e.file != shard_file_name(i) {
            p.push(format!("{at}.file is {:?}, expected {:?}", e.file, shard_file_name(i)));
        }
        if e.length == 0 || e.length > max_length {
            p.push(format!("{at}.length is {}, expected 1..={max_length}", e.length));
        }
    }
    p
}

/// Longest episode an imported dataset may list (a bound against absurd metadata; a day of
/// recording at 100 Hz is 8.6 M frames).
const MAX_IMPORTED_EPISODE_LENGTH: usize = 1 << 24;
/// Largest dimension of an imported state or action, and side of an image.
const MAX_IMPORTED_DIM: usize = 1 << 16;

/// A collected dataset: the environment's dims, names and cameras, and an environment that
/// can be built.
fn check_collected_layout(meta: &DatasetMeta) -> Vec<String> {
    let mut p = Vec::new();
    let cameras: Vec<&str> = meta.cameras.iter().map(String::as_str).collect();
    if cameras != CAMERA_NAMES {
        p.push(format!("cameras {cameras:?}, expected {CAMERA_NAMES:?}"));
    }
    for (field, value, expected) in [
        ("state_dim", meta.state_dim, STATE_DIM),
        ("environment_state_dim", meta.environment_state_dim, ENVIRONMENT_STATE_DIM),
        ("action_dim", meta.action_dim, ACTION_DIM),
        ("fps", meta.fps, FPS),
    ] {
        if value != expected {
            p.push(format!("{field} is {value}, the format has {expected}"));
        }
    }
    for (field, names, expected) in [
        ("state_names", &meta.state_names, &STATE_NAMES[..]),
        ("environment_state_names", &meta.environment_state_names, &ENVIRONMENT_STATE_NAMES[..]),
        ("action_names", &meta.action_names, &ACTION_NAMES[..]),
    ] {
        if names.iter().map(String::as_str).ne(expected.iter().copied()) {
            p.push(format!("{field} differs from the format's {} names", expected.len()));
        }
    }
    for (field, present) in [
        ("tier", meta.tier.is_some()),
        ("seed", meta.seed.is_some()),
        ("reference_returns", meta.reference_returns.is_some()),
        ("mean_normalized_score", meta.mean_normalized_score.is_some()),
    ] {
        if !present {
            p.push(format!("{field} is missing (a collected dataset records it)"));
        }
    }
    if meta.source.is_some() {
        p.push("source is set, but a collected dataset has none".into());
    }
    let Some(env) = &meta.env else {
        p.push("env is missing (a collected dataset records its environment)".into());
        return p;
    };
    if !env.render {
        p.push("env.render is false, but a dataset holds images".into());
    }
    if let Err(e) = Env::new(EnvConfig { render: false, ..env.clone() }) {
        p.push(format!("env: {e}"));
    }
    if meta.image_height != env.image_height || meta.image_width != env.image_width {
        p.push(format!(
            "image_height × image_width is {}×{} but env says {}×{}",
            meta.image_height, meta.image_width, env.image_height, env.image_width
        ));
    }
    if meta.keys != key_specs(env) {
        p.push("keys disagree with the environment's".into());
    }
    p
}

/// An imported dataset: a source, no environment, and dims, names and cameras that agree.
fn check_imported_layout(meta: &DatasetMeta) -> Vec<String> {
    let mut p = Vec::new();
    for (field, present) in [
        ("tier", meta.tier.is_some()),
        ("seed", meta.seed.is_some()),
        ("env", meta.env.is_some()),
        ("reference_returns", meta.reference_returns.is_some()),
        ("mean_normalized_score", meta.mean_normalized_score.is_some()),
    ] {
        if present {
            p.push(format!("{field} is set, but an imported dataset has no environment to give it"));
        }
    }
    if meta.source.is_none() {
        p.push("source is missing (an imported dataset records where it came from)".into());
    }
    for (field, value, lo) in [("state_dim", meta.state_dim, 1), ("action_dim", meta.action_dim, 1)] {
        if !(lo..=MAX_IMPORTED_DIM).contains(&value) {
            p.push(format!("{field} is {value}, expected {lo}..={MAX_IMPORTED_DIM}"));
        }
    }
    if meta.environment_state_dim != 0 || !meta.environment_state_names.is_empty() {
        p.push("an imported dataset has no environment state (environment_state_dim must be 0)".into());
    }
    for (field, names, dim) in
        [("state_names", &meta.state_names, meta.state_dim), ("action_names", &meta.action_names, meta.action_dim)]
    {
        if names.len() != dim {
            p.push(format!("{field} has {} names for {dim} dims", names.len()));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for camera in &meta.cameras {
        if camera.is_empty() || !seen.insert(camera) {
            p.push(format!("cameras: {camera:?} is empty or repeated"));
        }
    }
    let sides = (meta.image_height, meta.image_width);
    let sides_ok = if meta.cameras.is_empty() {
        sides == (0, 0)
    } else {
        (1..=MAX_IMPORTED_DIM).contains(&sides.0) && (1..=MAX_IMPORTED_DIM).contains(&sides.1)
    };
    if !sides_ok {
        p.push(format!(
            "image_height × image_width is {}×{} for {} cameras (0×0 without cameras)",
            sides.0,
            sides.1,
            meta.cameras.len()
        ));
    }
    for (i, e) in meta.episodes.iter().enumerate() {
        if e.seed.is_some() || e.policy.is_some() || e.normalized_score.is_some() {
            p.push(format!("episodes[{i}] has a seed, policy or score, which an imported dataset does not have"));
        }
    }
    p
}

/// Every problem of the summaries `meta.json` gives (frame count, statistics, reference returns,
/// per-episode seed, policy and score, dataset means) that can be seen without the shards.
fn check_summaries(meta: &DatasetMeta) -> Vec<String> {
    let mut p = Vec::new();
    let channels = meta.stats_channels();
    for (key, channels) in &channels {
        match meta.stats.get(key) {
            None => p.push(format!("stats has no entry for {key:?}")),
            Some(stats) => check_stats(key, stats, *channels, &mut p),
        }
    }
    for key in meta.stats.keys().filter(|k| !channels.iter().any(|(c, _)| c == *k)) {
        p.push(format!("stats has an entry for {key:?}, which has no statistics in this format"));
    }
    let frames = meta.episodes.iter().fold(0usize, |sum, e| sum.saturating_add(e.length));
    if meta.num_frames != frames {
        p.push(format!("num_frames is {} but the episodes' lengths sum to {frames}", meta.num_frames));
    }
    for (i, e) in meta.episodes.iter().enumerate() {
        if !e.episode_return.is_finite() {
            p.push(format!("episodes[{i}].return is {}", e.episode_return));
        }
    }
    if let (Some(refs), Some(tier), Some(seed)) = (&meta.reference_returns, meta.tier, meta.seed) {
        check_collected_summaries(meta, refs, tier, seed, &mut p);
    }
    if !meta.episodes.is_empty() {
        let n = meta.episodes.len() as f32;
        let mean_return = meta.episodes.iter().map(|e| e.episode_return).sum::<f32>() / n;
        if !close(meta.mean_return, mean_return) {
            p.push(format!("mean_return is {} but the episodes' returns average {mean_return}", meta.mean_return));
        }
        if let (Some(refs), Some(mean_score)) = (&meta.reference_returns, meta.mean_normalized_score) {
            if !close(mean_score, score(refs, mean_return)) {
                p.push(format!(
                    "mean_normalized_score is {mean_score} but the mean return {mean_return} scores {}",
                    score(refs, mean_return)
                ));
            }
        }
        let success_rate = meta.episodes.iter().filter(|e| e.success).count() as f32 / n;
        if !close(meta.success_rate, success_rate) {
            p.push(format!("success_rate is {} but {success_rate} of the episodes succeed", meta.success_rate));
        }
    }
    p
}

/// A collected dataset's reference returns, and each episode's seed, policy and score.
fn check_collected_summaries(
    meta: &DatasetMeta,
    refs: &super::ReferenceReturns,
    tier: super::Tier,
    seed: u64,
    p: &mut Vec<String>,
) {
    if !(refs.random.is_finite() && refs.expert.is_finite() && refs.expert != refs.random) {
        p.push(format!(
            "reference_returns random {} and expert {} must be finite and differ",
            refs.random, refs.expert
        ));
    }
    for (i, e) in meta.episodes.iter().enumerate() {
        let at = format!("episodes[{i}]");
        let expected_seed = seed.wrapping_add(i as u64);
        if e.seed != Some(expected_seed) {
            p.push(format!("{at}.seed is {:?}, expected seed + {i} = {expected_seed}", e.seed));
        }
        if e.policy != Some(tier.policy_for_episode(i)) {
            p.push(format!(
                "{at}.policy is {:?}, but the {} tier uses {:?} there",
                e.policy,
                tier.name(),
                tier.policy_for_episode(i)
            ));
        }
        if !e.episode_return.is_finite() {
            continue;
        }
        let expected = score(refs, e.episode_return);
        if !e.normalized_score.is_some_and(|s| close(s, expected)) {
            p.push(format!(
                "{at}.normalized_score is {:?} but its return {} scores {expected}",
                e.normalized_score, e.episode_return
            ));
        }
    }
}

/// Files of `dir` that look like shards (`episode_*.safetensors`) but `meta.json` does not list.
fn check_unlisted(dir: &Path, meta: &DatasetMeta) -> Result<(), DatasetError> {
    let listed: std::collections::HashSet<&str> = meta.episodes.iter().map(|e| e.file.as_str()).collect();
    let entries = std::fs::read_dir(dir).map_err(|e| DatasetError::io(dir, e))?;
    let mut unlisted: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| is_shard_file_name(name) && !listed.contains(name.as_str()))
        .collect();
    if unlisted.is_empty() {
        return Ok(());
    }
    unlisted.sort();
    Err(DatasetError::Unlisted { dir: dir.to_path_buf(), files: unlisted })
}

/// What `meta.json` says of an episode against what its (validated) shard holds.
fn check_episode_contents(shard: &Shard, i: usize, episode: &EpisodeMeta) -> Vec<String> {
    let mut p = Vec::new();
    let at = format!("episodes[{i}]");
    // Summed in order in f32, as the writer does.
    let sum: f32 = shard.f32s(KEY_REWARD).iter().sum();
    if !close(episode.episode_return, sum) {
        p.push(format!("{at}.return is {} but the rewards of {} sum to {sum}", episode.episode_return, episode.file));
    }
    let last_success = shard.bytes(KEY_SUCCESS).last().is_some_and(|s| *s != 0);
    if episode.success != last_success {
        p.push(format!(
            "{at}.success is {} but the last {KEY_SUCCESS} of {} is {}",
            episode.success, episode.file, last_success as u8
        ));
    }
    p
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
    let per_frame = meta.expected_keys();
    for (key, spec) in per_frame.clone() {
        let mut shape = vec![t];
        shape.extend(&spec.shape);
        expected.push((key, spec.dtype, shape));
    }
    for key in meta.final_observation_keys() {
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
    let success = &bytes[spans[KEY_SUCCESS].start..spans[KEY_SUCCESS].end];
    if success.iter().enumerate().any(|(i, &s)| s > 1 || (s == 1 && i + 1 != t)) {
        return Err(DatasetError::key(
            path,
            KEY_SUCCESS,
            "must be 0, or 1 on the last frame only (success ends the episode)",
        ));
    }
    let rewards: &[f32] = bytemuck::cast_slice(&bytes[spans[KEY_REWARD].start..spans[KEY_REWARD].end]);
    if let Some(bad) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(DatasetError::key(path, KEY_REWARD, format!("frame {bad} is not finite")));
    }
    for key in [KEY_STATE, KEY_ACTION, KEY_ENVIRONMENT_STATE].into_iter().filter(|k| spans.contains_key(*k)) {
        let values: &[f32] = bytemuck::cast_slice(&bytes[spans[key].start..spans[key].end]);
        if values.iter().any(|v| !v.is_finite()) {
            return Err(DatasetError::key(path, key, "contains a non-finite value"));
        }
    }
    Ok(spans)
}
