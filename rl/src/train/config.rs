//! [`TrainConfig`]: every option of a training run, with its default and the reason for it, said
//! once. `train` flattens it into its command line; `config.json` records it as "args".

use std::path::{Path, PathBuf};

use clap::Parser;

use crate::dataset::writer::CollectConfig;
use crate::dataset::Tier;
use crate::encoders::{EncoderKind, FeatureLayout};
use crate::env::EnvConfig;
use crate::lapo::LapoConfig;

/// 3000 noisy-expert episodes (~465k transitions, ~1.1 GB at 16 px, about a minute to
/// collect): with 300 episodes behaviour cloning generalised poorly to unseen layouts.
pub const DEFAULT_DATASET_EPISODES: usize = 3000;

/// A training run: the dataset (and how to collect it when missing), LAPO's hyperparameters, the
/// schedule, and where the run goes. Serialised flat (the field names are `config.json`'s "args"
/// keys, compared on `--resume`, so runs written before keep resuming).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct TrainConfig {
    /// The data: our dataset directory (a dataset of `--tier` is collected there from the
    /// embedded environment if missing), or another ecosystem's, recognised from its content —
    /// a robomimic or Minari HDF5 file, a LeRobot directory, a D4RL `.npz` — converted once into
    /// our shards under `--converted-dir` and reused from there.
    #[arg(long, default_value = "datasets/medium")]
    pub dataset: PathBuf,
    /// Imported datasets: cameras to stack, in order (default: all, sorted), e.g.
    /// `agentview,robot0_eye_in_hand`.
    #[arg(long, value_delimiter = ',')]
    pub cameras: Option<Vec<String>>,
    /// Imported datasets: low-dimensional observation keys concatenated into the state, in order
    /// (default: all, sorted), e.g. `robot0_eef_pos,robot0_gripper_qpos`.
    #[arg(long, value_delimiter = ',')]
    pub state_keys: Option<Vec<String>>,
    /// robomimic: train on the demos of `mask/<KEY>` (e.g. `train`).
    #[arg(long)]
    pub filter_key: Option<String>,
    /// Imported datasets without rewards (most real-robot LeRobot data): how to make them —
    /// `sparse-end` (1 on each episode's last step, a success) or `sparse-success` (1 where
    /// `next.success` is first set). Required there, refused where the data has rewards: none is
    /// invented silently. Recorded in the converted dataset.
    #[arg(long)]
    pub reward: Option<crate::dataset::imported::RewardRule>,
    /// Where converted datasets are cached (one directory per source and selection).
    #[arg(long, default_value = "datasets/converted")]
    pub converted_dir: PathBuf,
    /// Imported datasets: the last N episodes are held out of training, for the offline
    /// evaluation that replaces the environment's score (default: a tenth of the episodes, at
    /// least one).
    #[arg(long)]
    pub held_out_episodes: Option<usize>,
    /// Tier collected when the dataset is missing: medium (the noisy expert; the default),
    /// mixed (random, medium and expert episodes), expert or random.
    #[arg(long, default_value = "medium")]
    pub tier: Tier,
    /// Episodes to collect when the dataset is missing.
    #[arg(long, default_value_t = DEFAULT_DATASET_EPISODES)]
    pub dataset_episodes: usize,
    /// Image side when collecting or converting (the conv/ResNet encoders use it as is). 16 px
    /// with `--supersample 2` are the world model's own frames, so the sampler can stress-test a
    /// policy trained on them. An imported dataset's images are resized to it (robomimic's 84 px
    /// are kept with `--image-size 84`).
    #[arg(long, default_value_t = 16)]
    pub image_size: usize,
    /// Anti-aliasing when collecting: render at this many samples per pixel side.
    #[arg(long, default_value_t = 2)]
    pub supersample: usize,
    // LAPO's hyperparameters and `--encoder`, with their defaults and reasons.
    #[command(flatten)]
    #[serde(flatten)]
    pub lapo: LapoConfig,
    /// Iterations fitting the encoder's privileged-state head alone before LAPO starts (needs
    /// `--aux-state-input`); learning rate `--pretrain-lr`.
    #[arg(long, default_value_t = 0)]
    pub pretrain_encoder: u64,
    #[arg(long, default_value_t = 1e-3)]
    pub pretrain_lr: f64,
    /// ImageNet ResNet18 safetensors (path or `org/name[@rev]:file`), conv1 tiled ×3.
    #[arg(long)]
    pub pretrained: Option<String>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads for tensor kernels. 1 by default: the state-only MLPs are too small to
    /// share, and on a busy 2-core machine two threads measured 7× slower (51 s vs 7.4 s per
    /// 100 iterations).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// 8000 iterations: with 2 hidden layers 619 s state-only on one core, 10 min 54 s for the
    /// whole command including collecting the dataset (the 2-core CI-class machine), seeds 0/1/2
    /// scoring 85.5/87.4/83.1; with the default 3, 1.8× the time per iteration and 94.4/98.1/94.6
    /// — against the data's behaviour score 52.45.
    #[arg(long, default_value_t = 8000)]
    pub iterations: u64,
    /// Evaluate every N iterations (and at the end).
    #[arg(long, default_value_t = 2000)]
    pub eval_every: u64,
    #[arg(long, default_value_t = 20)]
    pub eval_episodes: usize,
    /// Run the gradient-flow audit at iteration 0 and every N iterations.
    #[arg(long, default_value_t = 5000)]
    pub audit_every: u64,
    #[arg(long, default_value_t = 100)]
    pub log_every: u64,
    #[arg(long, default_value_t = 2000)]
    pub checkpoint_every: u64,
    /// Run name (default: derived from encoder, owner and seed).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Continue runs/<name> from its checkpoint, bit-exactly. The command line must match the
    /// run's stored configuration except for options that do not change the run (--iterations
    /// to extend it, --threads, --device, the eval/log/audit/checkpoint intervals, --export).
    #[arg(long)]
    pub resume: bool,
    /// Replace runs/<name> whole if it holds a run (and an existing --export file).
    #[arg(long)]
    pub overwrite: bool,
    /// Also copy the exported policy here.
    #[arg(long)]
    pub export: Option<PathBuf>,
}

/// The defaults alone: a command line with no options.
#[derive(Parser)]
struct Defaults {
    #[command(flatten)]
    config: TrainConfig,
}

impl Default for TrainConfig {
    /// The `#[arg]` defaults (what `train` with no options runs).
    fn default() -> Self {
        Defaults::parse_from(["train"]).config
    }
}

impl TrainConfig {
    /// `--name`, or one derived from the encoder, its owner and the seed.
    pub fn run_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            format!("lapo-{:?}-{:?}-s{}", self.lapo.encoder, self.lapo.encoder_owner, self.lapo.seed).to_lowercase()
        })
    }

    /// Every range and option conflict, to be reported together in one error
    /// (`ArgChecks::finish`).
    pub fn checks(&self) -> shared::checks::ArgChecks {
        let lapo = &self.lapo;
        let mut c = lapo.checks();
        c.count("--iterations", self.iterations)
            .count("--log-every", self.log_every)
            .count("--eval-every", self.eval_every)
            .count("--checkpoint-every", self.checkpoint_every)
            .count("--eval-episodes", self.eval_episodes as u64)
            .count("--dataset-episodes", self.dataset_episodes as u64)
            // Each pool thread reserves its own stack; far beyond any core count is a typo.
            .count_at_most("--threads", self.threads as u64, 1024, "threads of the kernel pool")
            .positive("--pretrain-lr", self.pretrain_lr)
            // The renderer's limits (`Env::new`), checked here so they fail before anything else.
            .require((16..=1024).contains(&self.image_size), || {
                format!("--image-size must be in 16..=1024 (the renderer's range), got {}", self.image_size)
            })
            .require((1..=8).contains(&self.supersample), || {
                format!("--supersample must be in 1..=8, got {}", self.supersample)
            })
            .require(!lapo.aux_state_input || (lapo.aux_state_weight > 0.0 && lapo.encoder.uses_images()), || {
                "--aux-state-input needs an image encoder and --aux-state-weight > 0".into()
            })
            .require(self.pretrain_encoder == 0 || lapo.aux_state_input, || {
                "--pretrain-encoder needs --aux-state-input".into()
            })
            .require(lapo.feature_layout == FeatureLayout::Fused || lapo.encoder.uses_images(), || {
                "--feature-layout needs an image encoder".into()
            })
            .require(lapo.feature_layout != FeatureLayout::State || lapo.aux_state_input, || {
                "--feature-layout state needs --aux-state-input (the images reach the networks only through the head)"
                    .into()
            })
            .require(self.pretrained.is_none() || lapo.encoder == EncoderKind::ResNet18, || {
                "--pretrained needs --encoder resnet18".into()
            });
        if let Some(name) = &self.name {
            let plain = !name.is_empty()
                && name != "."
                && name != ".."
                && !name.contains(['/', '\\'])
                && Path::new(name).components().count() == 1;
            c.require(plain, || format!("--name must be a plain directory name (no path separators), got {name:?}"));
        }
        for (flag, list) in [("--cameras", &self.cameras), ("--state-keys", &self.state_keys)] {
            if let Some(list) = list {
                let blank = list.iter().any(|k| k.trim().is_empty());
                let mut sorted = list.clone();
                sorted.sort();
                sorted.dedup();
                c.require(!blank && sorted.len() == list.len(), || {
                    format!("{flag} must list distinct, non-empty keys, got {list:?}")
                });
            }
        }
        c
    }

    /// What converting an imported `--dataset` takes from it.
    pub fn convert_options(&self) -> crate::dataset::convert::ConvertOptions {
        crate::dataset::convert::ConvertOptions {
            cameras: self.cameras.clone(),
            state_keys: self.state_keys.clone(),
            filter_key: self.filter_key.clone(),
            reward: self.reward,
            image_size: self.image_size,
        }
    }

    /// What collecting a missing `--dataset` means.
    pub fn collect_config(&self) -> CollectConfig {
        CollectConfig {
            tier: self.tier,
            episodes: self.dataset_episodes,
            env: EnvConfig {
                supersample: self.supersample,
                ..EnvConfig::default().with_image_size(self.image_size, self.image_size)
            },
            ..CollectConfig::default()
        }
    }
}
