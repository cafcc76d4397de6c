//! Everything a run reads or writes, checked before any work: the run directory, `--export`,
//! the dataset directory (collected when missing, fingerprinted), and a memory estimate for
//! sizes that cannot fit.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use shared::checks::ensure_fits;
use shared::metrics::progress_bar;
use shared::outputs::{check_dir, check_output_file, Existing};

use super::TrainConfig;
use crate::dataset::convert::{converted_dir, detect, ensure_converted, source_fingerprint, DatasetKind};
use crate::dataset::writer::collect_dataset;
use crate::dataset::{dataset_state, DatasetState, META_FILE};
use crate::encoders::EncoderKind;
use crate::env::NUM_CAMERAS;

/// Where a run's data comes from, decided (and checked) before any work.
#[derive(Debug)]
pub enum DataSource {
    /// Our dataset directory: complete, or absent/empty (a dataset of `--tier` is collected).
    Ours { dir: PathBuf, collecting: bool },
    /// Another ecosystem's dataset at `path` (resolved from `label`, as given: a path or a Hub
    /// reference), converted into `converted` (which holds it already when `cached`).
    Imported { path: PathBuf, label: String, kind: DatasetKind, converted: PathBuf, cached: bool },
}

impl DataSource {
    /// Recognises `--dataset` and checks that the options fit it.
    pub fn check(config: &TrainConfig) -> Result<Self> {
        let label = config.dataset.to_string_lossy().into_owned();
        // A Hub dataset (`hf://datasets/org/name[@rev][:file]`) resolves through the HF cache
        // (downloaded when missing and allowed); a path is taken as it is.
        let resolved = if label.starts_with("hf://") {
            Some(shared::weights::resolve_dataset(&label).with_context(|| format!("--dataset {label}"))?)
        } else {
            None
        };
        let path = resolved.as_ref().unwrap_or(&config.dataset);
        let kind = detect(path)?;
        let lapo = &config.lapo;
        if let DatasetKind::Ours = kind {
            for (flag, given) in [
                ("--cameras", config.cameras.is_some()),
                ("--state-keys", config.state_keys.is_some()),
                ("--filter-key", config.filter_key.is_some()),
                ("--reward", config.reward.is_some()),
                ("--held-out-episodes", config.held_out_episodes.is_some()),
            ] {
                anyhow::ensure!(
                    !given,
                    "{flag}: for an imported dataset (HDF5, LeRobot, .npz); --dataset {} is ours (the environment's \
                     cameras and state, scored in the environment)",
                    path.display()
                );
            }
            let collecting = check_dataset_dir(path)? == DatasetState::Absent;
            return Ok(DataSource::Ours { dir: path.clone(), collecting });
        }
        // An imported dataset has no environment: no privileged state to predict or pretrain on.
        for (flag, given) in [
            ("--aux-state-input", lapo.aux_state_input),
            ("--pretrain-encoder", config.pretrain_encoder > 0),
            ("--aux-state-weight", lapo.aux_state_weight > 0.0 && lapo.encoder.uses_images()),
        ] {
            anyhow::ensure!(
                !given,
                "{flag}: the auxiliary head predicts our environment's privileged state; --dataset {} is imported \
                 and has none (pass --aux-state-weight 0)",
                path.display()
            );
        }
        let options = config.convert_options();
        let fingerprint = source_fingerprint(path).with_context(|| format!("--dataset {}", path.display()))?;
        let converted = converted_dir(&config.converted_dir, &label, &fingerprint, &options);
        let cached = converted.join(META_FILE).is_file();
        Ok(DataSource::Imported { path: path.clone(), label, kind, converted, cached })
    }

    /// A dataset is collected from the environment first.
    pub fn collecting(&self) -> bool {
        matches!(self, DataSource::Ours { collecting: true, .. })
    }

    /// The dataset directory when it is known before any work (ours, or a conversion made
    /// before).
    pub fn dataset_dir(&self) -> Option<&Path> {
        match self {
            DataSource::Ours { dir, .. } => Some(dir),
            DataSource::Imported { converted, cached: true, .. } => Some(converted),
            DataSource::Imported { .. } => None,
        }
    }

    /// The dataset directory, converting an imported source on first use.
    pub fn prepare(&self, config: &TrainConfig) -> Result<PathBuf> {
        match self {
            DataSource::Ours { dir, .. } => Ok(dir.clone()),
            DataSource::Imported { path, label, kind, .. } => {
                let options = config.convert_options();
                let dir = ensure_converted(path, label, *kind, &options, &config.converted_dir, &|m| eprintln!("{m}"))
                    .with_context(|| format!("--dataset {label}"))?;
                Ok(dir)
            }
        }
    }

    /// Episodes held out of training: none for ours (the environment scores the policy); for an
    /// imported dataset `--held-out-episodes`, by default a tenth of them (at least one).
    pub fn held_out_episodes(&self, config: &TrainConfig, dir: &Path) -> Result<usize> {
        if let DataSource::Ours { .. } = self {
            return Ok(0);
        }
        let episodes = crate::dataset::Dataset::read_meta(dir)?.num_episodes;
        let held_out = config.held_out_episodes.unwrap_or((episodes / 10).max(1));
        anyhow::ensure!(
            held_out >= 1 && held_out < episodes,
            "--held-out-episodes {held_out}: the dataset has {episodes} episodes; hold out at least one (the \
             evaluation without a simulator) and leave at least one to train on",
        );
        Ok(held_out)
    }
}

/// The run directory may be written in `mode`; a run already there is named with the three
/// ways on (a default name repeats whenever the same command is run again).
pub fn check_run_dir(run_dir: &Path, mode: Existing, default_name: bool) -> Result<()> {
    check_dir(run_dir, "--name", mode).map_err(|e| {
        let holds_a_run = mode == Existing::Refuse && !shared::outputs::contents(run_dir).unwrap_or_default().is_empty();
        if holds_a_run {
            let whose = if default_name { "the default name (from --encoder, --encoder-owner and --seed) is taken; " } else { "" };
            anyhow::anyhow!(
                "{e}\n{whose}pass --name NAME for a new run, --overwrite to replace this one, or --resume to continue it"
            )
        } else {
            e
        }
    })
}

/// `--export` must be writable. An existing file is replaced with `--overwrite`, and on
/// `--resume` when it is this run's own earlier export (the same bytes as its policy).
pub fn check_export(path: &Path, config: &TrainConfig, run_dir: &Path) -> Result<()> {
    let own_export = config.resume
        && path.is_file()
        && std::fs::read(path).ok().is_some_and(|b| std::fs::read(run_dir.join("policy.safetensors")).ok() == Some(b));
    check_output_file(path, "--export", config.overwrite || own_export)
}

/// What the dataset directory holds; an interrupted collection is refused, never collected over.
pub fn check_dataset_dir(dir: &Path) -> Result<DatasetState> {
    anyhow::ensure!(!dir.exists() || dir.is_dir(), "--dataset {}: exists and is not a directory", dir.display());
    let state = dataset_state(dir).with_context(|| format!("--dataset {}", dir.display()))?;
    if let DatasetState::Incomplete { files } = &state {
        // Neither read nor collected over.
        let incomplete = crate::dataset::DatasetError::Incomplete { dir: dir.to_path_buf(), files: files.clone() };
        anyhow::bail!("--dataset {incomplete}");
    }
    Ok(state)
}

/// Peak-memory growth per batch element of one training iteration, measured as the maximum
/// resident set of `train` at batch 2048 against 64 (`/usr/bin/time -v`, 16 px views): state-only
/// 58 KiB — the MLPs' activations and their gradients, ~160× the 360 B of inputs. Rounded up.
const STATE_BYTES_PER_SAMPLE: u128 = 64 << 10;

/// Image-encoder activations per byte of f32 input images (observation and next observation,
/// 2 × 9 × H × W × 4 B), from the same measurement: conv 247 KiB and ResNet18 1927 KiB per
/// element (ResNet18 at 512 against 64) beyond the MLPs' 58 KiB, over 18 KiB of images: 10.3×
/// and 101× (both scale with the pixel count). Rounded up.
fn image_activation_factor(encoder: EncoderKind) -> u128 {
    match encoder {
        EncoderKind::None => 0,
        EncoderKind::Conv => 12,
        EncoderKind::ResNet18 => 110,
    }
}

/// Refuses sizes that cannot fit, naming the flags that set them, before any work:
/// * the training batch and its activations, on the training device;
/// * the evaluation: `--eval-episodes` environments in lockstep (each with its renderer's
///   buffers when images are used) and one batched forward over them;
/// * collecting a missing dataset: shards stream to disk, so memory holds one episode per
///   worker thread (`CollectConfig::working_set_bytes`) and a few KiB of statistics per
///   episode until `meta.json` is written; the disk is not checked (a full disk fails with an
///   error naming the shard, and the incomplete directory is then refused, never reused).
pub fn check_memory(config: &TrainConfig, device: &Device, dataset: &Path, collecting: bool) -> Result<()> {
    let (h, w, ss, cameras, simulated) = if collecting {
        (config.image_size, config.image_size, config.supersample, NUM_CAMERAS, true)
    } else {
        let meta = crate::dataset::Dataset::read_meta(dataset)?;
        let ss = meta.env.as_ref().map_or(1, |env| env.supersample);
        (meta.image_height, meta.image_width, ss, meta.cameras.len(), meta.env.is_some())
    };
    let encoder = config.lapo.encoder;
    let images = encoder.uses_images();
    anyhow::ensure!(
        !images || cameras > 0,
        "--encoder {encoder:?}: the dataset {} has no cameras; train it with --encoder none",
        dataset.display()
    );
    let (h, w, ss) = (h as u128, w as u128, ss as u128);
    let image_bytes = if images { 2 * 3 * cameras as u128 * h * w * 4 } else { 0 };
    let per_sample = STATE_BYTES_PER_SAMPLE + image_bytes * image_activation_factor(encoder);
    let batch_size = config.lapo.batch_size;
    ensure_fits(
        device,
        batch_size as u128 * per_sample,
        &format!("--batch-size {batch_size} (with --encoder {encoder:?}, {h}×{w} px views)"),
    )?;
    // A renderer keeps two frames at the supersampled size; an observation holds three views.
    let env_bytes = 4096 + if images { 2 * 3 * h * ss * w * ss + 2 * 3 * 3 * h * w } else { 0 };
    let eval_episodes = config.eval_episodes;
    if simulated {
        ensure_fits(&Device::Cpu, eval_episodes as u128 * env_bytes, &format!("--eval-episodes {eval_episodes}"))?;
        ensure_fits(device, eval_episodes as u128 * per_sample, &format!("--eval-episodes {eval_episodes}"))?;
    }
    if collecting {
        ensure_fits(
            &Device::Cpu,
            config.collect_config().working_set_bytes(),
            &format!(
                "collecting --dataset-episodes {} at --image-size {} --supersample {}",
                config.dataset_episodes, config.image_size, config.supersample
            ),
        )?;
    }
    Ok(())
}

/// Collects the dataset of `--tier` into the (absent or empty) `--dataset` directory.
pub fn collect(config: &TrainConfig) -> Result<()> {
    eprintln!(
        "collecting the {} dataset ({} episodes) into {}",
        config.tier.name(),
        config.dataset_episodes,
        config.dataset.display()
    );
    let bar = progress_bar(config.dataset_episodes as u64, "collect");
    collect_dataset(&config.collect_config(), &config.dataset, &|| bar.inc(1))
        .with_context(|| format!("collecting into {}", config.dataset.display()))?;
    bar.finish();
    Ok(())
}

/// `sha256:<hex>` of the dataset's meta.json: it records every episode's seed, length and
/// return and every key's statistics, so another dataset (or the same directory collected
/// again differently) has another fingerprint.
pub fn dataset_fingerprint(dir: &Path) -> Result<String> {
    let path = dir.join(crate::dataset::META_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("sha256:{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes)))
}
