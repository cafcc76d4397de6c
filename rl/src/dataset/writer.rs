//! Collecting episodes into a dataset directory.
//!
//! Episodes are independent (episode `i` is fully determined by `seed + i` and its policy), so
//! they are rolled out on several threads and each thread writes its own shards; statistics are
//! then merged in episode order, which keeps the output byte-identical for any thread count.
//!
//! A dataset directory is claimed before the first write ([`claim_dataset_dir`]): refused when it
//! holds anything (a complete dataset, or the files an interrupted collection left) unless the
//! caller asked to replace it, in which case the old contents are removed whole — so stale shards
//! of an older, larger dataset never sit beside the new ones — and locked for the collection.
//! `meta.json` is written last: a directory without it is an incomplete dataset.

use super::{
    dataset_state, final_key, image_key, shard_file_name, write_atomically, DatasetError, DatasetMeta, DatasetState,
    EpisodeMeta, KeySpec, KeyStats, ReferenceReturns, Tier, FORMAT, KEY_ACTION, KEY_DONE, KEY_ENVIRONMENT_STATE,
    KEY_EPISODE_INDEX, KEY_FRAME_INDEX, KEY_REWARD, KEY_STATE, KEY_SUCCESS, META_FILE,
};
use crate::env::policy::PolicyKind;
use crate::env::{
    normalized_score, Env, EnvConfig, EnvError, Observation, ACTION_DIM, ACTION_NAMES, CAMERA_NAMES,
    ENVIRONMENT_STATE_DIM, ENVIRONMENT_STATE_NAMES, FPS, NUM_CAMERAS, REFERENCE_COMMAND, REFERENCE_EXPERT_RETURN,
    REFERENCE_RANDOM_RETURN, STATE_DIM, STATE_NAMES,
};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use shared::outputs::{ClaimedDir, Existing};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// What to collect.
#[derive(Clone, Debug)]
pub struct CollectConfig {
    pub tier: Tier,
    pub episodes: usize,
    /// Episode `i` uses environment seed `seed + i`. Evaluation conventionally uses seeds
    /// 0..100, so datasets default to seeds from 1000.
    pub seed: u64,
    pub env: EnvConfig,
    /// Worker threads (episodes run in parallel; output does not depend on this).
    pub threads: usize,
}

impl Default for CollectConfig {
    fn default() -> Self {
        Self {
            tier: Tier::Mixed,
            episodes: 100,
            seed: 1000,
            env: EnvConfig::default(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// What [`collect_dataset`] wrote.
#[derive(Clone, Debug)]
pub struct CollectSummary {
    pub meta: DatasetMeta,
    pub dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("episode {index}: shard serialisation failed: {reason}")]
    Serialize { index: usize, reason: String },
    /// The output directory may not be written (not empty, locked, a file, …).
    #[error("{0:#}")]
    Output(anyhow::Error),
    /// The configuration cannot be collected (every problem listed).
    #[error("invalid collection settings:\n  - {}", .0.join("\n  - "))]
    Config(Vec<String>),
}

/// Upper estimate of what one episode keeps in memory until `meta.json` is written: its summary
/// and the per-key statistics (mean, std, min, max per channel of ~8 keys) in its result slot.
pub const EPISODE_BOOKKEEPING_BYTES: u128 = 4 << 10;

impl CollectConfig {
    /// Worker threads that actually run: at most one per episode.
    pub fn effective_threads(&self) -> usize {
        self.threads.clamp(1, self.episodes.max(1))
    }

    /// Estimated bytes a collection holds at once: every episode's summary until `meta.json` is
    /// written ([`EPISODE_BOOKKEEPING_BYTES`] each), and per worker thread one episode's record (every
    /// camera image of every step, `max_steps + 1` frames of `3 × H × W × 3` bytes) and its
    /// serialised shard (a second copy), plus the renderer's supersampled buffers (about 16 bytes
    /// per supersampled pixel and camera). Saturating, so absurd sizes give a huge number rather
    /// than an overflow.
    pub fn working_set_bytes(&self) -> u128 {
        let (h, w, ss) = (self.env.image_height as u128, self.env.image_width as u128, self.env.supersample as u128);
        let frames = self.env.max_steps as u128 + 1;
        let image_bytes =
            frames.saturating_mul(NUM_CAMERAS as u128).saturating_mul(h).saturating_mul(w).saturating_mul(3);
        let numeric = frames.saturating_mul(((STATE_DIM + ENVIRONMENT_STATE_DIM + ACTION_DIM) * 4 + 24) as u128);
        let record = image_bytes.saturating_add(numeric);
        let renderer =
            (NUM_CAMERAS as u128).saturating_mul(h.saturating_mul(ss)).saturating_mul(w.saturating_mul(ss)) * 16;
        let per_thread =
            (self.effective_threads() as u128).saturating_mul(record.saturating_mul(2).saturating_add(renderer));
        // Until meta.json is written every episode's summary and per-key statistics stay in
        // memory (a result slot each from the start): a few KiB per episode, which is what makes
        // `--episodes 1000000000000` impossible rather than the frames.
        per_thread.saturating_add((self.episodes as u128).saturating_mul(EPISODE_BOOKKEEPING_BYTES))
    }

    /// Every problem of the settings, by field name (the binaries check their flags before this).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.episodes == 0 {
            problems.push("episodes must be at least 1".to_string());
        }
        if self.threads == 0 {
            problems.push("threads must be at least 1".to_string());
        }
        if !self.env.render {
            // Images are part of the format; a dataset without them would fail validation.
            problems.push("datasets need rendered images: set EnvConfig::render".to_string());
        }
        if let Err(e) = Env::new(EnvConfig { render: false, ..self.env.clone() }) {
            problems.push(format!("env: {e}"));
        }
        problems
    }
}

/// Checks, without writing, that a dataset may be collected into `dir` under `mode`; `flag`
/// names the option that chose it. A complete or incomplete dataset there is named as such.
pub fn check_dataset_dir(dir: &Path, flag: &str, mode: Existing) -> Result<(), CollectError> {
    if mode == Existing::Resume {
        return Err(CollectError::Output(anyhow::anyhow!("{flag} {}: a dataset cannot be resumed", dir.display())));
    }
    if mode == Existing::Refuse && dir.is_dir() {
        match dataset_state(dir).map_err(CollectError::Output)? {
            DatasetState::Absent => {}
            DatasetState::Complete => {
                return Err(CollectError::Output(anyhow::anyhow!(
                    "{flag} {}: already holds a dataset ({META_FILE} is there); pass --overwrite to replace it \
                     whole, or choose another directory",
                    dir.display()
                )))
            }
            DatasetState::Incomplete { files } => {
                let incomplete = DatasetError::Incomplete { dir: dir.to_path_buf(), files };
                return Err(CollectError::Output(anyhow::anyhow!("{flag} {incomplete}")));
            }
        }
    }
    shared::outputs::check_dir(dir, flag, mode).map_err(CollectError::Output)
}

/// Claims `dir` for a collection (see [`check_dataset_dir`]): created, locked against a second
/// writer, and with [`Existing::Overwrite`] emptied whole.
pub fn claim_dataset_dir(dir: &Path, flag: &str, mode: Existing) -> Result<ClaimedDir, CollectError> {
    check_dataset_dir(dir, flag, mode)?;
    shared::outputs::claim_dir(dir, flag, mode).map_err(CollectError::Output)
}

/// One episode's frames, as recorded.
#[derive(Default)]
struct EpisodeRecord {
    images: [Vec<u8>; NUM_CAMERAS],
    state: Vec<f32>,
    environment_state: Vec<f32>,
    action: Vec<f32>,
    reward: Vec<f32>,
    done: Vec<u8>,
    success: Vec<u8>,
    final_observation: Option<Observation>,
}

impl EpisodeRecord {
    fn push_observation(&mut self, obs: &Observation) {
        for (buffer, image) in self.images.iter_mut().zip(&obs.images) {
            buffer.extend_from_slice(image);
        }
        self.state.extend_from_slice(&obs.state);
        self.environment_state.extend_from_slice(&obs.environment_state);
    }
    fn len(&self) -> usize {
        self.reward.len()
    }
}

/// Running sums for one key, merged in episode order.
#[derive(Clone)]
pub(crate) struct Moments {
    count: f64,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    min: Vec<f64>,
    max: Vec<f64>,
}

impl Moments {
    pub(crate) fn new(channels: usize) -> Self {
        Self {
            count: 0.0,
            sum: vec![0.0; channels],
            sum_sq: vec![0.0; channels],
            min: vec![f64::INFINITY; channels],
            max: vec![f64::NEG_INFINITY; channels],
        }
    }
    pub(crate) fn add_f32(&mut self, values: &[f32]) {
        let c = self.sum.len();
        for row in values.chunks_exact(c) {
            for (j, &v) in row.iter().enumerate() {
                let v = v as f64;
                self.sum[j] += v;
                self.sum_sq[j] += v * v;
                self.min[j] = self.min[j].min(v);
                self.max[j] = self.max[j].max(v);
            }
        }
        self.count += (values.len() / c) as f64;
    }
    /// RGB bytes; exact integer sums so the result does not depend on summation order.
    pub(crate) fn add_rgb(&mut self, pixels: &[u8]) {
        let mut sum = [0u64; 3];
        let mut sum_sq = [0u64; 3];
        let mut min = [255u8; 3];
        let mut max = [0u8; 3];
        for px in pixels.chunks_exact(3) {
            for j in 0..3 {
                let v = px[j];
                sum[j] += v as u64;
                sum_sq[j] += (v as u64) * (v as u64);
                min[j] = min[j].min(v);
                max[j] = max[j].max(v);
            }
        }
        let scale = 1.0 / 255.0;
        for j in 0..3 {
            self.sum[j] += sum[j] as f64 * scale;
            self.sum_sq[j] += sum_sq[j] as f64 * scale * scale;
            self.min[j] = self.min[j].min(min[j] as f64 * scale);
            self.max[j] = self.max[j].max(max[j] as f64 * scale);
        }
        self.count += (pixels.len() / 3) as f64;
    }
    pub(crate) fn merge(&mut self, other: &Moments) {
        self.count += other.count;
        for j in 0..self.sum.len() {
            self.sum[j] += other.sum[j];
            self.sum_sq[j] += other.sum_sq[j];
            self.min[j] = self.min[j].min(other.min[j]);
            self.max[j] = self.max[j].max(other.max[j]);
        }
    }
    pub(crate) fn finish(&self) -> KeyStats {
        let n = self.count.max(1.0);
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let std = self.sum_sq.iter().zip(&mean).map(|(sq, m)| (sq / n - m * m).max(0.0).sqrt()).collect();
        KeyStats { mean, std, min: self.min.clone(), max: self.max.clone() }
    }
}

struct EpisodeResult {
    meta: EpisodeMeta,
    moments: BTreeMap<String, Moments>,
}

fn record_episode(env: &mut Env, policy: PolicyKind, seed: u64) -> EpisodeRecord {
    let mut record = EpisodeRecord::default();
    let mut policy = policy.build(seed);
    let mut obs = env.reset(seed);
    loop {
        let action = policy.act(env);
        let step = env.step(&action);
        record.push_observation(&obs);
        record.action.extend_from_slice(&action);
        record.reward.push(step.reward);
        record.done.push(step.done as u8);
        record.success.push(step.success as u8);
        obs = step.obs;
        if step.done {
            record.final_observation = Some(obs);
            return record;
        }
    }
}

fn f32_bytes(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

/// Serialises one episode into safetensors bytes.
fn shard_bytes(record: &EpisodeRecord, index: usize, config: &EnvConfig) -> Result<Vec<u8>, CollectError> {
    let t = record.len();
    let (h, w) = (config.image_height, config.image_width);
    let episode_index: Vec<i64> = vec![index as i64; t];
    let frame_index: Vec<i64> = (0..t as i64).collect();
    let final_obs = record.final_observation.as_ref().expect("a recorded episode always ends with a final observation");
    let image_keys: Vec<String> = CAMERA_NAMES.iter().map(|c| image_key(c)).collect();
    let final_image_keys: Vec<String> = image_keys.iter().map(|k| final_key(k)).collect();
    let serialize_error = |e: safetensors::SafeTensorError| CollectError::Serialize { index, reason: e.to_string() };
    fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8], index: usize) -> Result<TensorView<'_>, CollectError> {
        TensorView::new(dtype, shape, data).map_err(|e| CollectError::Serialize { index, reason: e.to_string() })
    }
    let mut tensors: Vec<(String, TensorView<'_>)> = Vec::new();
    for c in 0..NUM_CAMERAS {
        tensors.push((image_keys[c].clone(), view(Dtype::U8, vec![t, h, w, 3], &record.images[c], index)?));
        tensors.push((final_image_keys[c].clone(), view(Dtype::U8, vec![1, h, w, 3], &final_obs.images[c], index)?));
    }
    let final_state_key = final_key(KEY_STATE);
    let final_env_key = final_key(KEY_ENVIRONMENT_STATE);
    tensors.extend([
        (KEY_STATE.to_string(), view(Dtype::F32, vec![t, STATE_DIM], f32_bytes(&record.state), index)?),
        (final_state_key, view(Dtype::F32, vec![1, STATE_DIM], f32_bytes(&final_obs.state), index)?),
        (
            KEY_ENVIRONMENT_STATE.to_string(),
            view(Dtype::F32, vec![t, ENVIRONMENT_STATE_DIM], f32_bytes(&record.environment_state), index)?,
        ),
        (
            final_env_key,
            view(Dtype::F32, vec![1, ENVIRONMENT_STATE_DIM], f32_bytes(&final_obs.environment_state), index)?,
        ),
        (KEY_ACTION.to_string(), view(Dtype::F32, vec![t, ACTION_DIM], f32_bytes(&record.action), index)?),
        (KEY_REWARD.to_string(), view(Dtype::F32, vec![t], f32_bytes(&record.reward), index)?),
        (KEY_DONE.to_string(), view(Dtype::U8, vec![t], &record.done, index)?),
        (KEY_SUCCESS.to_string(), view(Dtype::U8, vec![t], &record.success, index)?),
        (KEY_EPISODE_INDEX.to_string(), view(Dtype::I64, vec![t], bytemuck::cast_slice(&episode_index), index)?),
        (KEY_FRAME_INDEX.to_string(), view(Dtype::I64, vec![t], bytemuck::cast_slice(&frame_index), index)?),
    ]);
    // A single metadata entry: safetensors keeps metadata in a HashMap, whose iteration
    // order (and so the header bytes) would vary between runs with several entries.
    let info = HashMap::from([("format".to_string(), FORMAT.to_string())]);
    safetensors::serialize(tensors, Some(info)).map_err(serialize_error)
}

/// The per-frame schema every shard follows (also written to meta.json).
pub fn key_specs(config: &EnvConfig) -> BTreeMap<String, KeySpec> {
    super::shard_key_specs(
        &CAMERA_NAMES,
        (config.image_height, config.image_width),
        STATE_DIM,
        ENVIRONMENT_STATE_DIM,
        ACTION_DIM,
    )
}

/// Keys that also appear as `final.<key>` with a leading dimension of 1.
pub fn final_observation_keys() -> Vec<String> {
    let mut keys: Vec<String> = CAMERA_NAMES.iter().map(|c| image_key(c)).collect();
    keys.push(KEY_STATE.into());
    keys.push(KEY_ENVIRONMENT_STATE.into());
    keys
}

fn collect_one(env: &mut Env, config: &CollectConfig, index: usize, dir: &Path) -> Result<EpisodeResult, CollectError> {
    let policy = config.tier.policy_for_episode(index);
    let seed = config.seed.wrapping_add(index as u64);
    let record = record_episode(env, policy, seed);
    let bytes = shard_bytes(&record, index, &config.env)?;
    let file = shard_file_name(index);
    write_atomically(&dir.join(&file), &bytes)?;

    let mut moments = BTreeMap::new();
    let mut add = |key: &str, channels: usize, values: &[f32]| {
        let mut m = Moments::new(channels);
        m.add_f32(values);
        moments.insert(key.to_string(), m);
    };
    add(KEY_STATE, STATE_DIM, &record.state);
    add(KEY_ENVIRONMENT_STATE, ENVIRONMENT_STATE_DIM, &record.environment_state);
    add(KEY_ACTION, ACTION_DIM, &record.action);
    add(KEY_REWARD, 1, &record.reward);
    if config.env.render {
        for (camera, pixels) in CAMERA_NAMES.iter().zip(&record.images) {
            let mut m = Moments::new(3);
            m.add_rgb(pixels);
            moments.insert(image_key(camera), m);
        }
    }
    let episode_return: f32 = record.reward.iter().sum();
    Ok(EpisodeResult {
        meta: EpisodeMeta {
            index,
            file,
            length: record.len(),
            seed: Some(seed),
            policy: Some(policy),
            episode_return,
            normalized_score: Some(normalized_score(episode_return)),
            success: record.success.last() == Some(&1),
            source_name: None,
        },
        moments,
    })
}

/// Rolls out `config.episodes` episodes and writes shards and `meta.json` into `dir` (created if
/// missing). `dir` must be absent or empty: a directory holding a dataset, complete or not, is
/// refused (to replace one, claim it with [`claim_dataset_dir`] and [`Existing::Overwrite`] and
/// call [`collect_dataset_into`]). `on_episode` is called once per finished episode (progress bars).
pub fn collect_dataset(
    config: &CollectConfig,
    dir: &Path,
    on_episode: &(dyn Fn() + Sync),
) -> Result<CollectSummary, CollectError> {
    let problems = config.problems();
    if !problems.is_empty() {
        return Err(CollectError::Config(problems));
    }
    let claimed = claim_dataset_dir(dir, "dataset directory", Existing::Refuse)?;
    collect_dataset_into(config, &claimed, on_episode)
}

/// [`collect_dataset`] into a directory already claimed (and, with `--overwrite`, emptied).
pub fn collect_dataset_into(
    config: &CollectConfig,
    claimed: &ClaimedDir,
    on_episode: &(dyn Fn() + Sync),
) -> Result<CollectSummary, CollectError> {
    let problems = config.problems();
    if !problems.is_empty() {
        return Err(CollectError::Config(problems));
    }
    // The binaries check this with their flag names first; a library caller gets it here, before
    // the result slots are allocated (an absurd episode count would otherwise abort).
    shared::checks::ensure_fits(
        &candle_core::Device::Cpu,
        config.working_set_bytes(),
        &format!("collecting {} episodes", config.episodes),
    )
    .map_err(CollectError::Output)?;
    let dir = claimed.path();
    // Only a fresh directory: a shard of another dataset left beside ours would make it mixed.
    let leftovers = shared::outputs::contents(dir).map_err(CollectError::Output)?;
    if !leftovers.is_empty() {
        return Err(CollectError::Output(anyhow::anyhow!(
            "{}: holds {} before the collection started; claim it with Existing::Overwrite to replace it",
            dir.display(),
            leftovers.join(", ")
        )));
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<EpisodeResult, CollectError>>>> =
        Mutex::new((0..config.episodes).map(|_| None).collect());
    let threads = config.effective_threads();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut env = match Env::new(config.env.clone()) {
                    Ok(env) => env,
                    Err(_) => return, // validated above
                };
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= config.episodes {
                        return;
                    }
                    let result = collect_one(&mut env, config, index, dir);
                    let failed = result.is_err();
                    if let Ok(mut slots) = results.lock() {
                        slots[index] = Some(result);
                    }
                    on_episode();
                    if failed {
                        next.store(config.episodes, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());

    let mut episodes = Vec::with_capacity(config.episodes);
    let mut totals: BTreeMap<String, Moments> = BTreeMap::new();
    for result in results.into_iter().flatten() {
        let result = result?;
        for (key, m) in &result.moments {
            totals.entry(key.clone()).and_modify(|t| t.merge(m)).or_insert_with(|| m.clone());
        }
        episodes.push(result.meta);
    }
    let n = episodes.len().max(1) as f32;
    let mean_return = episodes.iter().map(|e| e.episode_return).sum::<f32>() / n;
    let meta = DatasetMeta {
        format: FORMAT.into(),
        tier: Some(config.tier),
        seed: Some(config.seed),
        num_episodes: episodes.len(),
        num_frames: episodes.iter().map(|e| e.length).sum(),
        fps: FPS,
        cameras: CAMERA_NAMES.iter().map(|s| s.to_string()).collect(),
        image_height: config.env.image_height,
        image_width: config.env.image_width,
        state_dim: STATE_DIM,
        environment_state_dim: ENVIRONMENT_STATE_DIM,
        action_dim: ACTION_DIM,
        state_names: STATE_NAMES.iter().map(|s| s.to_string()).collect(),
        environment_state_names: ENVIRONMENT_STATE_NAMES.iter().map(|s| s.to_string()).collect(),
        action_names: ACTION_NAMES.iter().map(|s| s.to_string()).collect(),
        action_description: "each in [-1, 1]; joint entries are joint velocities as a fraction \
             of (1.5, 1.5, 3.0) rad/s for shoulder, elbow, wrist; gripper entries are finger \
             opening targets, -1 closed (cages a puck) .. +1 open"
            .into(),
        env: Some(config.env.clone()),
        keys: key_specs(&config.env),
        stats: totals.iter().map(|(k, m)| (k.clone(), m.finish())).collect(),
        reference_returns: Some(ReferenceReturns {
            random: REFERENCE_RANDOM_RETURN,
            expert: REFERENCE_EXPERT_RETURN,
            command: REFERENCE_COMMAND.into(),
        }),
        mean_return,
        mean_normalized_score: Some(normalized_score(mean_return)),
        source: None,
        success_rate: episodes.iter().filter(|e| e.success).count() as f32 / n,
        episodes,
    };
    let json = serde_json::to_vec_pretty(&meta)
        .map_err(|e| DatasetError::Meta { path: dir.join(META_FILE), reason: e.to_string() })?;
    write_atomically(&dir.join(META_FILE), &json)?;
    Ok(CollectSummary { meta, dir: dir.to_path_buf() })
}
