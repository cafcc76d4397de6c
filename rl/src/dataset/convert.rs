//! Other ecosystems' datasets as our shards: what `train --dataset PATH` does with a robomimic or
//! Minari HDF5 file, a LeRobot directory or a D4RL `.npz`.
//!
//! The format is recognised from the content ([`detect`]): our `meta.json`, or one of the
//! [`SOURCES`] — the [`DatasetSource`] importers: LeRobot's `meta/info.json`, the HDF5 signature,
//! the zip signature of an `.npz`. A foreign source is read once through its importer into an
//! [`ImportedDataset`], its images resized to the requested
//! size and written as validated safetensors shards ([`super::FORMAT_IMPORTED`]) — images are
//! decoded once here, never per batch. The converted dataset is cached under a name made of the
//! source's stem and a hash of everything that decides its contents (the source's fingerprint,
//! the cameras, state keys, filter key, reward rule and image size), so the same command reuses
//! it and a different selection makes another. A conversion writes into a temporary directory
//! beside the cache entry and renames it into place when its `meta.json` is written: an
//! interrupted conversion never leaves a half dataset under the final name.
//!
//! Conversion choices, recorded in `meta.json`'s `source`:
//! * An episode's MDP terminal is its last step's flag (robomimic `dones`, Minari
//!   `terminations`); flags set before the last step are counted and not used, because our
//!   shards end an episode at its terminal (robomimic sets `dones` on every success state).
//! * A source without the observation after the last action (robomimic without `next_obs`,
//!   LeRobot) repeats the last observation there; a terminal step never reads it, and a
//!   time-limit step bootstraps from a state one step early.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::imported::{ImportedDataset, ImportedEpisode, RewardRule, SourceFormat};
use super::writer::Moments;
use super::{
    final_key, image_key, shard_file_name, write_atomically, DatasetMeta, EpisodeMeta, ImportSource, FORMAT_IMPORTED,
    KEY_ACTION, KEY_DONE, KEY_EPISODE_INDEX, KEY_FRAME_INDEX, KEY_REWARD, KEY_STATE, KEY_SUCCESS, META_FILE,
};

/// An importer of another ecosystem's format: it recognises its sources from their content and
/// reads them into the neutral [`ImportedDataset`], from which every source converts the same way.
/// A new format is one more implementation and one more entry in [`SOURCES`].
pub trait DatasetSource: Sync {
    /// The format's name, for messages.
    fn name(&self) -> &'static str;
    /// Whether `path` is this format's, from its content (`head`: the first bytes of a file,
    /// empty for a directory).
    fn recognises(&self, path: &Path, head: &[u8]) -> bool;
    /// Reads the source with the selection and rules of `options` (refusing options that do
    /// not apply to the format, by flag).
    fn import(&self, path: &Path, options: &ConvertOptions) -> Result<ImportedDataset>;
}

/// robomimic and Minari HDF5 files ([`super::hdf5`]).
pub struct Hdf5Source;
/// LeRobot v2.1 / v3.0 directories ([`super::lerobot`]).
pub struct LeRobotSource;
/// D4RL-style `.npz` files ([`super::npz`]).
pub struct D4rlNpzSource;

/// Every format `train --dataset` converts, in the order they are tried.
pub static SOURCES: &[&dyn DatasetSource] = &[&Hdf5Source, &LeRobotSource, &D4rlNpzSource];

/// What a `--dataset` path holds.
#[derive(Clone, Copy)]
pub enum DatasetKind {
    /// Our dataset directory (`meta.json`), or a directory to collect one into.
    Ours,
    /// Another format, converted through its importer.
    Imported(&'static dyn DatasetSource),
}

impl std::fmt::Debug for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatasetKind::Ours => write!(f, "Ours"),
            DatasetKind::Imported(source) => write!(f, "Imported({})", source.name()),
        }
    }
}

/// Recognises `path` from its content. A missing path or a directory that no importer
/// recognises is [`DatasetKind::Ours`] (our dataset, or where a collection may go); a file that
/// is none of the formats is an error naming it.
pub fn detect(path: &Path) -> Result<DatasetKind> {
    if !path.exists() {
        return Ok(DatasetKind::Ours);
    }
    let mut head = [0u8; 8];
    let read = if path.is_dir() {
        0
    } else {
        use std::io::Read;
        let mut file =
            std::fs::File::open(path).with_context(|| format!("--dataset {}: cannot open it", path.display()))?;
        file.read(&mut head).with_context(|| format!("--dataset {}: cannot read it", path.display()))?
    };
    let head = &head[..read];
    if let Some(source) = SOURCES.iter().find(|s| s.recognises(path, head)) {
        return Ok(DatasetKind::Imported(*source));
    }
    if path.is_dir() {
        return Ok(DatasetKind::Ours);
    }
    let known: Vec<&str> = SOURCES.iter().map(|s| s.name()).collect();
    anyhow::bail!(
        "--dataset {}: not a dataset this build reads: not a directory (ours, with meta.json) nor one of {known:?}; \
         its first bytes are {head:02x?}",
        path.display()
    )
}

/// Refuses each option of `options` that `format` has no use for, naming the flag.
fn refuse_options(path: &Path, format: &str, options: &ConvertOptions, unused: &[&str]) -> Result<()> {
    for (flag, set) in [
        ("--cameras", options.cameras.is_some()),
        ("--state-keys", options.state_keys.is_some()),
        ("--filter-key", options.filter_key.is_some()),
        ("--reward", options.reward.is_some()),
    ] {
        if set && unused.contains(&flag) {
            let why = match flag {
                // A rule is for data without rewards, never a silent replacement.
                "--reward" => "it records its rewards; the flag is for sources without any".to_string(),
                _ => format!("{format} has no use for it"),
            };
            anyhow::bail!("{flag}: {} is {format}: {why}", path.display());
        }
    }
    Ok(())
}

impl DatasetSource for Hdf5Source {
    fn name(&self) -> &'static str {
        "HDF5 (robomimic, Minari)"
    }
    fn recognises(&self, _: &Path, head: &[u8]) -> bool {
        head == b"\x89HDF\r\n\x1a\n"
    }
    fn import(&self, path: &Path, options: &ConvertOptions) -> Result<ImportedDataset> {
        refuse_options(path, "an HDF5 file", options, &["--reward"])?;
        let selection = super::hdf5::HdfSelection {
            cameras: options.cameras.clone(),
            state_keys: options.state_keys.clone(),
            filter_key: options.filter_key.clone(),
        };
        Ok(super::hdf5::read(path, &selection)?)
    }
}

impl DatasetSource for D4rlNpzSource {
    fn name(&self) -> &'static str {
        "D4RL .npz"
    }
    fn recognises(&self, _: &Path, head: &[u8]) -> bool {
        head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06")
    }
    fn import(&self, path: &Path, options: &ConvertOptions) -> Result<ImportedDataset> {
        let all = ["--cameras", "--state-keys", "--filter-key", "--reward"];
        refuse_options(path, "a D4RL .npz (one state, no cameras)", options, &all)?;
        Ok(from_d4rl(path, &super::npz::import_d4rl(path)?))
    }
}

impl DatasetSource for LeRobotSource {
    fn name(&self) -> &'static str {
        "LeRobot (v2.1, v3.0)"
    }
    fn recognises(&self, path: &Path, _: &[u8]) -> bool {
        path.join(super::lerobot::INFO_FILE).is_file()
    }
    fn import(&self, path: &Path, options: &ConvertOptions) -> Result<ImportedDataset> {
        refuse_options(path, "a LeRobot dataset", options, &["--filter-key"])?;
        if options.reward.is_some() {
            let info_path = path.join(super::lerobot::INFO_FILE);
            let info: serde_json::Value = serde_json::from_slice(
                &std::fs::read(&info_path).with_context(|| format!("reading {}", info_path.display()))?,
            )
            .with_context(|| format!("{}: not JSON", info_path.display()))?;
            if info["features"].get("next.reward").is_some() {
                refuse_options(path, "a LeRobot dataset with `next.reward`", options, &["--reward"])?;
            }
        }
        let selection = super::lerobot::LeRobotSelection {
            cameras: options.cameras.clone(),
            state_keys: options.state_keys.clone(),
            reward: options.reward,
        };
        Ok(super::lerobot::read(path, &selection)?)
    }
}

/// What to take from a source and how to convert it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConvertOptions {
    /// Cameras in order; `None`: all of them (sorted).
    pub cameras: Option<Vec<String>>,
    /// Low-dimensional keys concatenated into the state, in order; `None`: all of them (sorted).
    pub state_keys: Option<Vec<String>>,
    /// robomimic `mask/<key>`.
    pub filter_key: Option<String>,
    /// How rewards are made for a source without any (LeRobot without `next.reward`).
    pub reward: Option<RewardRule>,
    /// Side of the (square) images of the converted dataset.
    pub image_size: usize,
}

/// A D4RL state-only dataset split into its episodes (at terminals and timeouts).
fn from_d4rl(path: &Path, data: &super::npz::StateDataset) -> ImportedDataset {
    let (sd, ad) = (data.observation_dim, data.action_dim);
    let episodes = data
        .episode_ranges()
        .into_iter()
        .enumerate()
        .map(|(i, (start, end))| {
            let len = end - start;
            let final_state = data.next_observations.as_ref().map(|next| next[(end - 1) * sd..end * sd].to_vec());
            ImportedEpisode {
                name: format!("episode_{i}"),
                len,
                state: data.observations[start * sd..end * sd].to_vec(),
                images: Vec::new(),
                actions: data.actions[start * ad..end * ad].to_vec(),
                rewards: data.rewards[start..end].to_vec(),
                terminals: data.terminals[start..end].to_vec(),
                timeouts: data.timeouts[start..end].to_vec(),
                final_state,
                final_images: None,
            }
        })
        .collect();
    ImportedDataset {
        source: path.display().to_string(),
        format: SourceFormat::D4rlNpz,
        episodes,
        cameras: Vec::new(),
        image_sizes: Vec::new(),
        state_keys: vec!["observations".into()],
        state_key_dims: vec![sd],
        state_dim: sd,
        action_dim: ad,
        metadata: BTreeMap::new(),
    }
}

/// What identifies a source's contents without reading it all: for a file its size and
/// modification time; for a LeRobot directory its `meta/info.json` and every file's relative
/// path, size and modification time. (Hashing a multi-GB robomimic file on every run would
/// cost seconds; a changed file changes its size or time, as `make` assumes.)
pub fn source_fingerprint(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let add_file = |hasher: &mut sha2::Sha256, file: &Path, name: &str| -> Result<()> {
        let meta = std::fs::metadata(file).with_context(|| format!("{}: cannot read its metadata", file.display()))?;
        let modified =
            meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        hasher.update(format!("{name}\0{}\0{modified}\n", meta.len()).as_bytes());
        Ok(())
    };
    if path.is_dir() {
        let info = path.join("meta").join("info.json");
        hasher.update(std::fs::read(&info).with_context(|| format!("reading {}", info.display()))?);
        let mut files = Vec::new();
        walk(path, &mut files)?;
        files.sort();
        for file in files {
            let name = file.strip_prefix(path).unwrap_or(&file).to_string_lossy().into_owned();
            add_file(&mut hasher, &file, &name)?;
        }
    } else {
        add_file(&mut hasher, path, "")?;
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Where the conversion of the source `label` names (a path, or `hf://datasets/org/name…`)
/// with `options` is cached under `cache_root`: `<stem>-<12 hex digits of the hash of the
/// fingerprint and the options>`, the stem being the file's or repository's name.
pub fn converted_dir(cache_root: &Path, label: &str, fingerprint: &str, options: &ConvertOptions) -> PathBuf {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(fingerprint.as_bytes());
    hasher.update(serde_json::to_vec(options).unwrap_or_default());
    let hash = format!("{:x}", hasher.finalize());
    let repo_name = label.strip_prefix("hf://datasets/").map(|rest| {
        let repo = rest.split([':', '@']).next().unwrap_or(rest);
        let file = rest.split_once(':').map(|(_, f)| f);
        file.unwrap_or(repo).to_string()
    });
    let named = repo_name.unwrap_or_else(|| label.to_string());
    let stem: String = Path::new(named.trim_end_matches('/'))
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into())
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect();
    cache_root.join(format!("{stem}-{}", &hash[..12]))
}

/// The converted dataset of `source` (a foreign `kind`, named `label` as the user gave it):
/// reused from `cache_root` when it is there, else imported and converted now. Returns its
/// directory.
pub fn ensure_converted(
    source: &Path,
    label: &str,
    kind: DatasetKind,
    options: &ConvertOptions,
    cache_root: &Path,
    progress: &dyn Fn(&str),
) -> Result<PathBuf> {
    let fingerprint = source_fingerprint(source)?;
    let dir = converted_dir(cache_root, label, &fingerprint, options);
    if dir.join(META_FILE).is_file() {
        let meta = super::Dataset::read_meta(&dir)?;
        let recorded = meta.source.as_ref().map(|s| s.fingerprint.as_str());
        anyhow::ensure!(
            recorded == Some(fingerprint.as_str()),
            "{}: a converted dataset of another source (fingerprint {recorded:?}, expected {fingerprint}); remove it",
            dir.display()
        );
        progress(&format!("using {} (converted from {label} before)", dir.display()));
        return Ok(dir);
    }
    anyhow::ensure!(
        !dir.exists(),
        "{}: exists without meta.json (not a conversion this build made); remove it",
        dir.display()
    );
    let DatasetKind::Imported(importer) = kind else {
        anyhow::bail!("{label}: our own dataset needs no conversion");
    };
    progress(&format!("reading {label} ({})", importer.name()));
    let imported = importer.import(source, options)?;
    std::fs::create_dir_all(cache_root).with_context(|| format!("creating {}", cache_root.display()))?;
    let partial = cache_root.join(format!(
        ".{}.partial-{}",
        dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    std::fs::create_dir(&partial).with_context(|| format!("creating {}", partial.display()))?;
    progress(&format!(
        "converting {} episodes ({} steps, cameras {:?}) into {}",
        imported.episodes.len(),
        imported.num_steps(),
        imported.cameras,
        dir.display()
    ));
    let written = write_converted(&imported, label, &fingerprint, options, &partial);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &dir).with_context(|| format!("moving {} to {}", partial.display(), dir.display()))?;
    Ok(dir)
}

/// The camera name in our keys: LeRobot's `observation.images.top` is `top`, its single-camera
/// `observation.image` is `image`; Minari's nested `a/b` is `a.b`.
fn camera_name(camera: &str) -> String {
    let name = match camera.strip_prefix("observation.images.") {
        Some(short) => short,
        None if camera == "observation.image" => "image",
        None => camera,
    };
    name.replace('/', ".")
}

/// Resizes an `H × W × 3` image to `side × side` (box-filtered when shrinking: `image`'s
/// triangle filter widens its support by the scale factor); the same size is copied exactly.
fn resize(pixels: &[u8], (h, w): (usize, usize), side: usize) -> Result<Vec<u8>> {
    if (h, w) == (side, side) {
        return Ok(pixels.to_vec());
    }
    let image = image::RgbImage::from_raw(w as u32, h as u32, pixels.to_vec())
        .with_context(|| format!("an image of {h}×{w} holds {} bytes", pixels.len()))?;
    let resized = image::imageops::resize(&image, side as u32, side as u32, image::imageops::FilterType::Triangle);
    Ok(resized.into_raw())
}

/// Writes `imported` (from the source `label` names) as our shards and `meta.json` (last) into
/// the empty directory `dir`.
pub fn write_converted(
    imported: &ImportedDataset,
    label: &str,
    fingerprint: &str,
    options: &ConvertOptions,
    dir: &Path,
) -> Result<DatasetMeta> {
    anyhow::ensure!(!imported.episodes.is_empty(), "{label}: no episodes to convert");
    let cameras: Vec<String> = imported.cameras.iter().map(|c| camera_name(c)).collect();
    let side = if cameras.is_empty() { 0 } else { options.image_size };
    anyhow::ensure!(cameras.is_empty() || side > 0, "--image-size must be at least 1 to convert images");
    let (sd, ad) = (imported.state_dim, imported.action_dim);
    let mut totals: BTreeMap<String, Moments> = BTreeMap::new();
    let mut add = |key: String, channels: usize, values: Option<&[f32]>, rgb: Option<&[u8]>| {
        let m = totals.entry(key).or_insert_with(|| Moments::new(channels));
        if let Some(v) = values {
            m.add_f32(v);
        }
        if let Some(p) = rgb {
            m.add_rgb(p);
        }
    };
    let mut episodes = Vec::with_capacity(imported.episodes.len());
    let mut ignored_terminal_flags = 0;
    let mut without_final = 0;
    for (index, episode) in imported.episodes.iter().enumerate() {
        let t = episode.len;
        let at = || format!("{label}: episode {}", episode.name);
        anyhow::ensure!(t > 0, "{}: has no steps", at());
        anyhow::ensure!(
            episode.state.len() == t * sd && episode.actions.len() == t * ad && episode.rewards.len() == t,
            "{}: {} steps but {} state, {} action and {} reward values (state {sd}, action {ad} wide)",
            at(),
            t,
            episode.state.len(),
            episode.actions.len(),
            episode.rewards.len()
        );
        for (what, values) in [("state", &episode.state), ("actions", &episode.actions), ("rewards", &episode.rewards)]
        {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                anyhow::bail!("{}: {what} holds a non-finite value ({}) at element {i}", at(), values[i]);
            }
        }
        let terminal = episode.terminals.last().copied().unwrap_or(false);
        ignored_terminal_flags += episode.terminals[..t - 1].iter().filter(|f| **f).count();
        let final_state = match &episode.final_state {
            Some(s) => s.clone(),
            None => {
                without_final += 1;
                episode.state[(t - 1) * sd..].to_vec()
            }
        };
        let mut images: Vec<(String, Vec<u8>, Vec<u8>)> = Vec::with_capacity(cameras.len());
        for (c, camera) in imported.cameras.iter().enumerate() {
            let (h, w) = imported.image_sizes[c];
            let frame = h * w * 3;
            let source_frames = &episode
                .images
                .iter()
                .find(|(name, _)| name == camera)
                .with_context(|| format!("{}: no images of camera {camera}", at()))?
                .1;
            anyhow::ensure!(
                source_frames.len() == t * frame,
                "{}: camera {camera} has the wrong number of bytes",
                at()
            );
            let mut frames = Vec::with_capacity(t * side * side * 3);
            for k in 0..t {
                frames.extend(resize(&source_frames[k * frame..(k + 1) * frame], (h, w), side)?);
            }
            let last = match episode.final_images.as_ref().and_then(|f| f.iter().find(|(name, _)| name == camera)) {
                Some((_, pixels)) => resize(pixels, (h, w), side)?,
                None => frames[(t - 1) * side * side * 3..].to_vec(),
            };
            images.push((cameras[c].clone(), frames, last));
        }
        let done: Vec<u8> = (0..t).map(|k| (k + 1 == t) as u8).collect();
        let success: Vec<u8> = (0..t).map(|k| (k + 1 == t && terminal) as u8).collect();
        let bytes = shard(index, t, (sd, ad, side), &images, episode, &final_state, &done, &success)?;
        let file = shard_file_name(index);
        write_atomically(&dir.join(&file), &bytes)?;

        add(KEY_STATE.into(), sd, Some(&episode.state), None);
        add(KEY_ACTION.into(), ad, Some(&episode.actions), None);
        add(KEY_REWARD.into(), 1, Some(&episode.rewards), None);
        for (camera, frames, _) in &images {
            add(image_key(camera), 3, None, Some(frames));
        }
        episodes.push(EpisodeMeta {
            index,
            file,
            length: t,
            seed: None,
            policy: None,
            // Summed in order in f32, as the reader checks.
            episode_return: episode.rewards.iter().sum(),
            normalized_score: None,
            success: terminal,
            source_name: Some(episode.name.clone()),
        });
    }
    let n = episodes.len() as f32;
    let names = |keys: &[String], dims: &[usize]| -> Vec<String> {
        keys.iter()
            .zip(dims)
            .flat_map(|(k, &d)| (0..d).map(move |i| if d == 1 { k.clone() } else { format!("{k}[{i}]") }))
            .collect()
    };
    let mut metadata = imported.metadata.clone();
    if let Some(rule) = options.reward {
        metadata.insert("reward_rule".into(), rule.name().into());
    }
    let fps = imported.metadata.get("fps").and_then(|f| f.parse::<f64>().ok()).map_or(0, |f| f.round() as usize);
    let mut meta = DatasetMeta {
        format: FORMAT_IMPORTED.into(),
        tier: None,
        seed: None,
        num_episodes: episodes.len(),
        num_frames: episodes.iter().map(|e| e.length).sum(),
        fps,
        cameras: cameras.clone(),
        image_height: side,
        image_width: side,
        state_dim: sd,
        environment_state_dim: 0,
        action_dim: ad,
        state_names: names(&imported.state_keys, &imported.state_key_dims),
        environment_state_names: Vec::new(),
        action_names: (0..ad).map(|i| format!("action[{i}]")).collect(),
        action_description: format!("as recorded in {label} ({})", imported.format.name()),
        env: None,
        keys: BTreeMap::new(),
        stats: totals.iter().map(|(k, m)| (k.clone(), m.finish())).collect(),
        reference_returns: None,
        mean_return: episodes.iter().map(|e| e.episode_return).sum::<f32>() / n,
        mean_normalized_score: None,
        success_rate: episodes.iter().filter(|e| e.success).count() as f32 / n,
        source: Some(ImportSource {
            format: imported.format.name().into(),
            path: label.to_string(),
            fingerprint: fingerprint.into(),
            cameras: imported.cameras.clone(),
            state_keys: imported.state_keys.clone(),
            state_key_dims: imported.state_key_dims.clone(),
            filter_key: options.filter_key.clone(),
            reward_rule: options.reward,
            source_image_sizes: imported.image_sizes.clone(),
            ignored_terminal_flags,
            episodes_without_final_observation: without_final,
            metadata,
        }),
        episodes,
    };
    meta.keys = meta.expected_keys();
    let json = serde_json::to_vec_pretty(&meta)?;
    write_atomically(&dir.join(META_FILE), &json)?;
    // What was written is read back through the one validated loader before anyone uses it.
    super::Dataset::open(dir).with_context(|| format!("checking the converted dataset {}", dir.display()))?;
    Ok(meta)
}

/// One episode's shard (the keys [`DatasetMeta::expected_keys`] lists, and the final observation).
#[allow(clippy::too_many_arguments)]
fn shard(
    index: usize,
    t: usize,
    (sd, ad, side): (usize, usize, usize),
    images: &[(String, Vec<u8>, Vec<u8>)],
    episode: &ImportedEpisode,
    final_state: &[f32],
    done: &[u8],
    success: &[u8],
) -> Result<Vec<u8>> {
    let episode_index: Vec<i64> = vec![index as i64; t];
    let frame_index: Vec<i64> = (0..t as i64).collect();
    let view = |dtype: Dtype, shape: Vec<usize>, data| -> Result<TensorView<'_>> {
        TensorView::new(dtype, shape, data).map_err(|e| anyhow::anyhow!("serialising episode {index}: {e}"))
    };
    fn f32s(v: &[f32]) -> &[u8] {
        bytemuck::cast_slice(v)
    }
    let mut tensors: Vec<(String, TensorView<'_>)> = Vec::new();
    for (camera, frames, last) in images {
        tensors.push((image_key(camera), view(Dtype::U8, vec![t, side, side, 3], frames)?));
        tensors.push((final_key(&image_key(camera)), view(Dtype::U8, vec![1, side, side, 3], last)?));
    }
    tensors.extend([
        (KEY_STATE.to_string(), view(Dtype::F32, vec![t, sd], f32s(&episode.state))?),
        (final_key(KEY_STATE), view(Dtype::F32, vec![1, sd], f32s(final_state))?),
        (KEY_ACTION.to_string(), view(Dtype::F32, vec![t, ad], f32s(&episode.actions))?),
        (KEY_REWARD.to_string(), view(Dtype::F32, vec![t], f32s(&episode.rewards))?),
        (KEY_DONE.to_string(), view(Dtype::U8, vec![t], done)?),
        (KEY_SUCCESS.to_string(), view(Dtype::U8, vec![t], success)?),
        (KEY_EPISODE_INDEX.to_string(), view(Dtype::I64, vec![t], bytemuck::cast_slice(&episode_index))?),
        (KEY_FRAME_INDEX.to_string(), view(Dtype::I64, vec![t], bytemuck::cast_slice(&frame_index))?),
    ]);
    let info = std::collections::HashMap::from([("format".to_string(), FORMAT_IMPORTED.to_string())]);
    safetensors::serialize(tensors, Some(info)).map_err(|e| anyhow::anyhow!("serialising episode {index}: {e}"))
}
