//! Cosmos pipelines from diffusers-layout repositories: a local directory or a Hub reference
//! `org/name[@revision]` resolved through the Hugging Face cache. `model_index.json`'s
//! `_class_name` picks the pipeline, `scheduler/scheduler_config.json` is mapped onto our
//! schedules and solvers ([`SchedulerSetup`], refusing settings the port does not implement).
//! Each denoising loop is diffusers' own, expressed with the project's pieces so that z0 can be
//! optimised through it.
//!
//! `Cosmos2VideoToWorldPipeline` (Cosmos-Predict2 Video2World):
//! * schedule: `FlowMatchEulerDiscreteScheduler(use_karras_sigmas)` with σ_max 80, σ_min 0.002
//!   ([`Schedule::karras_flow_match`]: N Karras levels, then a zero-length step; output x_N);
//! * [`Predict2Denoiser`]: t = σ/(σ+1); the network reads the conditioning latents *clean* on
//!   conditioning frames and x·(1 − t) elsewhere, with the per-frame timestep t_c =
//!   σ_c/(σ_c+1) on conditioning frames; x0 = (1 − t)·x − t·F, forced to the conditioning
//!   latents on conditioning frames;
//! * Euler steps x ← x + (σ' − σ)(x − x0)/σ; initial latents = σ_max·z0.
//!
//! `Cosmos2_5_PredictBasePipeline` (Cosmos-Predict2.5):
//! * schedule: `UniPCMultistepScheduler` with Karras flow sigmas (σ 200 → 0.01, then 0:
//!   [`Schedule::karras_flow_sigmas`]); the first sample is the raw noise as the flow sample at
//!   t_0 (x = (1 + σ_0)·z0 in EDM coordinates);
//! * [`Predict25Denoiser`]: the network reads m·c + (1 − m)·x_flow at timestep 1e-4 on
//!   conditioning frames and t elsewhere; the velocity of conditioning frames is fixed to
//!   (z0 − c) from the *initial* noise; x0 = x_flow − t·v;
//! * UniPC bh2, order 2 with the corrector, order 1 on the first and last steps
//!   ([`crate::solver::UniPc`], in EDM coordinates — the same update divided by α_t);
//! * image input: one conditioning latent frame; video: its last 4(n − 1) + 1 frames, n = 1, 2.
//!
//! Both: classifier-free guidance `cond + g·(cond − uncond)` on x0, only for g > 1 (as
//! diffusers; on x0 it equals Predict2.5's guidance on the velocity), conditioning latents from
//! the posterior mean (diffusers samples it in Predict2). `fps` reaches the Predict2 transformer
//! only when asked for: the released checkpoints were trained without fps modulation of the
//! temporal RoPE (diffusers#14768), while diffusers passes 16.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};

use super::controlnet::{self, ConditioningScale, CosmosControlNetModel};
use super::transformer::{Config as TransformerConfig, CosmosTransformer3DModel, ForwardOptions, TransferInputs};
use super::vae::AutoencoderKLWan;
use crate::denoiser::{per_frame, ClassifierFreeGuidance, Conditioning, Denoiser};
use crate::noise::Churn;
use crate::schedule::Schedule;
use crate::solver::SolverKind;
use crate::trajectory::Trajectory;

/// Where a pipeline's files come from.
#[derive(Clone, Debug)]
pub enum Repository {
    Local(PathBuf),
    Hub { repo: String, revision: String, hub: shared::weights::HubOptions },
}

impl Repository {
    /// An existing directory is local; anything else must be `org/name[@revision]`.
    pub fn parse(reference: &str) -> anyhow::Result<Self> {
        let path = Path::new(reference);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let (repo, revision) = match reference.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => bail!("--model '{reference}': empty revision after '@'"),
            None => (reference, "main"),
        };
        let valid = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        match repo.split_once('/') {
            Some((org, name)) if valid(org) && valid(name) => {}
            _ => bail!(
                "--model '{reference}' is neither a directory nor a Hub repository 'org/name[@revision]' \
                 (e.g. nvidia/Cosmos-Predict2-2B-Video2World@diffusers)"
            ),
        }
        Ok(Self::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
            hub: shared::weights::HubOptions::from_env(),
        })
    }

    /// A file of the repository as a local path (downloaded into the cache when allowed).
    pub fn file(&self, path: &str) -> anyhow::Result<PathBuf> {
        match self {
            Self::Local(dir) => {
                let p = dir.join(path);
                anyhow::ensure!(p.is_file(), "{} has no {path}", dir.display());
                Ok(p)
            }
            Self::Hub { repo, revision, hub } => {
                let reference = shared::weights::WeightRef::Hub {
                    repo: repo.clone(),
                    revision: revision.clone(),
                    file: path.to_string(),
                };
                Ok(shared::weights::resolve_with(&reference, hub)?)
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Local(dir) => dir.display().to_string(),
            Self::Hub { repo, revision, .. } => format!("{repo}@{revision}"),
        }
    }
}

/// The pipelines this module runs, by diffusers' `_class_name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PipelineKind {
    /// `Cosmos2VideoToWorldPipeline` (Cosmos-Predict2 Video2World).
    Predict2VideoToWorld,
    /// `Cosmos2_5_PredictBasePipeline` (Cosmos-Predict2.5: image, video or text to world).
    Predict25,
    /// `Cosmos2_5_TransferPipeline` (Cosmos-Transfer2.5: control videos to world, through a
    /// ControlNet; chunked autoregressive generation, [`super::transfer`]).
    Transfer25,
}

impl PipelineKind {
    pub const SUPPORTED: &'static [&'static str] =
        &["Cosmos2VideoToWorldPipeline", "Cosmos2_5_PredictBasePipeline", "Cosmos2_5_TransferPipeline"];

    pub fn from_class_name(name: &str) -> anyhow::Result<Self> {
        match name {
            "Cosmos2VideoToWorldPipeline" => Ok(Self::Predict2VideoToWorld),
            "Cosmos2_5_PredictBasePipeline" => Ok(Self::Predict25),
            "Cosmos2_5_TransferPipeline" => Ok(Self::Transfer25),
            other => bail!("pipeline class '{other}' is not supported; supported: {}", Self::SUPPORTED.join(", ")),
        }
    }

    pub fn class_name(self) -> &'static str {
        match self {
            Self::Predict2VideoToWorld => "Cosmos2VideoToWorldPipeline",
            Self::Predict25 => "Cosmos2_5_PredictBasePipeline",
            Self::Transfer25 => "Cosmos2_5_TransferPipeline",
        }
    }

    /// Latent-sized tensors the solver carries between steps, stored per step by the
    /// recomputing backward (UniPC: the corrected sample and two model outputs).
    pub fn solver_state_per_step(self) -> usize {
        match self {
            Self::Predict2VideoToWorld => 0,
            Self::Predict25 | Self::Transfer25 => 3,
        }
    }

    /// diffusers' default `num_inference_steps` (Predict2.5's 36 levels are the original's 35
    /// steps plus the step to 0; Transfer2.5 has the same).
    pub fn default_steps(self) -> usize {
        match self {
            Self::Predict2VideoToWorld => 35,
            Self::Predict25 | Self::Transfer25 => 36,
        }
    }

    /// diffusers' default `guidance_scale`.
    pub fn default_guidance(self) -> f64 {
        match self {
            Self::Predict2VideoToWorld | Self::Predict25 => 7.0,
            Self::Transfer25 => 3.0,
        }
    }

    /// Whether the pipeline is steered by control videos through a ControlNet.
    pub fn uses_controls(self) -> bool {
        self == Self::Transfer25
    }
}

/// diffusers' `Cosmos2VideoToWorldPipeline` constants (its `__init__` registers them into the
/// scheduler's config, over whatever the repository's file says).
pub const PREDICT2_SIGMA_MAX: f64 = 80.0;
pub const PREDICT2_SIGMA_MIN: f64 = 0.002;
pub const PREDICT2_SIGMA_CONDITIONING: f64 = 1e-4;
/// `Cosmos2_5_PredictBasePipeline.__call__`'s `conditional_frame_timestep` (a flow time).
pub const PREDICT25_CONDITIONAL_FRAME_TIMESTEP: f64 = 1e-4;
/// Its default `num_latent_conditional_frames` for a video input (1 or 2).
pub const PREDICT25_DEFAULT_VIDEO_CONDITION_LATENT_FRAMES: usize = 2;

/// A repository's `scheduler/scheduler_config.json` mapped onto the project's schedules and
/// solvers. Only the settings the Cosmos pipelines use are accepted; anything else is an error
/// naming the field, not a silently different sampler.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SchedulerSetup {
    /// diffusers' `_class_name`.
    pub class: String,
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub solver: SolverKind,
}

impl SchedulerSetup {
    /// Reads and checks a scheduler config for a pipeline kind.
    pub fn from_config(kind: PipelineKind, path: &Path) -> anyhow::Result<Self> {
        let cfg = read_json(path)?;
        let class = cfg["_class_name"].as_str().with_context(|| format!("{}: no _class_name", path.display()))?;
        let field = |name: &str, default: serde_json::Value| cfg.get(name).cloned().unwrap_or(default);
        // (field, the value the port implements, diffusers' default when the file omits it)
        let require = |rules: &[(&str, serde_json::Value, serde_json::Value)]| -> anyhow::Result<()> {
            for (name, expected, default) in rules {
                let value = field(name, default.clone());
                anyhow::ensure!(
                    &value == expected,
                    "{}: {name} = {value}, but the {} port implements only {name} = {expected} (diffusers' \
                     Cosmos setting)",
                    path.display(),
                    kind.class_name()
                );
            }
            Ok(())
        };
        use serde_json::json;
        match kind {
            PipelineKind::Predict2VideoToWorld => {
                anyhow::ensure!(
                    class == "FlowMatchEulerDiscreteScheduler",
                    "{}: scheduler '{class}'; {} runs FlowMatchEulerDiscreteScheduler",
                    path.display(),
                    kind.class_name()
                );
                require(&[
                    ("use_karras_sigmas", json!(true), json!(false)),
                    ("use_exponential_sigmas", json!(false), json!(false)),
                    ("use_beta_sigmas", json!(false), json!(false)),
                    ("use_dynamic_shifting", json!(false), json!(false)),
                    ("stochastic_sampling", json!(false), json!(false)),
                    ("invert_sigmas", json!(false), json!(false)),
                ])?;
                // The pipeline's constructor registers its own σ range and final σ.
                Ok(Self {
                    class: class.to_string(),
                    sigma_min: PREDICT2_SIGMA_MIN,
                    sigma_max: PREDICT2_SIGMA_MAX,
                    solver: SolverKind::Euler,
                })
            }
            // The conversion script gives Transfer2.5 Predict2.5's scheduler.
            PipelineKind::Predict25 | PipelineKind::Transfer25 => {
                anyhow::ensure!(
                    class == "UniPCMultistepScheduler",
                    "{}: scheduler '{class}'; {} runs UniPCMultistepScheduler",
                    path.display(),
                    kind.class_name()
                );
                require(&[
                    ("use_karras_sigmas", json!(true), json!(false)),
                    ("use_flow_sigmas", json!(true), json!(false)),
                    ("use_exponential_sigmas", json!(false), json!(false)),
                    ("use_beta_sigmas", json!(false), json!(false)),
                    ("use_dynamic_shifting", json!(false), json!(false)),
                    ("prediction_type", json!("flow_prediction"), json!("epsilon")),
                    ("predict_x0", json!(true), json!(true)),
                    ("solver_type", json!("bh2"), json!("bh2")),
                    ("solver_order", json!(2), json!(2)),
                    ("lower_order_final", json!(true), json!(true)),
                    ("final_sigmas_type", json!("zero"), json!("zero")),
                    ("disable_corrector", json!([]), json!([])),
                    ("thresholding", json!(false), json!(false)),
                ])?;
                let sigma = |name: &str| -> anyhow::Result<f64> {
                    cfg[name]
                        .as_f64()
                        .filter(|v| v.is_finite() && *v > 0.0)
                        .with_context(|| format!("{}: {name} must be a positive number", path.display()))
                };
                let (sigma_min, sigma_max) = (sigma("sigma_min")?, sigma("sigma_max")?);
                anyhow::ensure!(
                    sigma_max > sigma_min,
                    "{}: sigma_max ({sigma_max}) must exceed sigma_min ({sigma_min})",
                    path.display()
                );
                Ok(Self { class: class.to_string(), sigma_min, sigma_max, solver: SolverKind::Unipc })
            }
        }
    }

    /// The σ levels for `steps` inference steps, as diffusers' `set_timesteps` makes them.
    pub fn schedule(&self, steps: usize) -> anyhow::Result<Schedule> {
        let schedule = match self.solver {
            SolverKind::Unipc => Schedule::karras_flow_sigmas(steps, self.sigma_min, self.sigma_max, 7.0),
            _ => Schedule::karras_flow_match(steps, self.sigma_min, self.sigma_max, 7.0),
        };
        schedule.map_err(|e| anyhow::anyhow!("--steps {steps}: {e}"))
    }
}

/// A loaded pipeline: the transformer and the VAE (the text encoder is optional and separate).
pub struct CosmosPipeline {
    pub kind: PipelineKind,
    pub repository: String,
    pub transformer: CosmosTransformer3DModel,
    pub vae: AutoencoderKLWan,
    pub scheduler: SchedulerSetup,
    /// Transfer2.5's `controlnet/` (absent for the Predict pipelines).
    pub controlnet: Option<CosmosControlNetModel>,
}

/// Reads a JSON file, naming it in every error.
fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A model folder's weight files (`transformer/`, `controlnet/`): one safetensors file, or the
/// shards its index names.
fn model_weight_files(repo: &Repository, folder: &str) -> anyhow::Result<Vec<PathBuf>> {
    if let Ok(single) = repo.file(&format!("{folder}/diffusion_pytorch_model.safetensors")) {
        return Ok(vec![single]);
    }
    let index_path = repo
        .file(&format!("{folder}/diffusion_pytorch_model.safetensors.index.json"))
        .with_context(|| format!("{folder}/ has neither diffusion_pytorch_model.safetensors nor its sharded index"))?;
    let index = read_json(&index_path)?;
    let map = index["weight_map"].as_object().with_context(|| format!("{}: no weight_map", index_path.display()))?;
    let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    shards.sort();
    shards.dedup();
    shards.iter().map(|s| repo.file(&format!("{folder}/{s}"))).collect()
}

/// A repository folder's `CosmosControlNetModel` (`controlnet/` in a Transfer2.5 pipeline), every
/// weight checked as the transformer's, and checked to fit the transformer and the VAE
/// ([`check_controlnet_fits`]).
pub fn load_controlnet(
    repo: &Repository,
    folder: &str,
    transformer: &TransformerConfig,
    z_dim: usize,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<CosmosControlNetModel> {
    let cfg_path = repo.file(&format!("{folder}/config.json"))?;
    let cfg = controlnet::Config::from_json_file(&cfg_path)?;
    check_controlnet_fits(&cfg, transformer, z_dim).with_context(|| format!("{}", cfg_path.display()))?;
    let recorder = shared::weights::ShapeRecorder::new();
    CosmosControlNetModel::new(&cfg, recorder.var_builder(dtype, device))?;
    let files = model_weight_files(repo, folder)?;
    let vb = shared::weights::varbuilder_for_model_files(&files, &recorder.shapes(), dtype, device)
        .with_context(|| format!("loading the ControlNet ({folder}/)"))?;
    Ok(CosmosControlNetModel::new(&cfg, vb)?)
}

/// Whether a ControlNet can steer a transformer whose latents have `z_dim` channels: the same
/// width, image context and text context, a control block for every injection point, and room
/// for the VAE's latents in its control and base inputs.
pub fn check_controlnet_fits(cfg: &controlnet::Config, t: &TransformerConfig, z_dim: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg.hidden_size() == t.hidden_size(),
        "the ControlNet is {} wide, the transformer {}",
        cfg.hidden_size(),
        t.hidden_size()
    );
    let points = t.controlnet_blocks()?.len();
    anyhow::ensure!(
        cfg.n_controlnet_blocks >= points,
        "the ControlNet has {} control blocks, the transformer injects residuals at {points} blocks (every \
         controlnet_block_every_n-th of {})",
        cfg.n_controlnet_blocks,
        t.num_layers
    );
    anyhow::ensure!(
        cfg.control_channels() >= z_dim,
        "the ControlNet reads {} control channels, the VAE's latents have {z_dim}",
        cfg.control_channels()
    );
    anyhow::ensure!(
        cfg.latent_channels == z_dim + 2,
        "the ControlNet's latent_channels is {}, expected the VAE's {z_dim} + condition mask + padding mask",
        cfg.latent_channels
    );
    anyhow::ensure!(
        cfg.img_context_dim_in == t.img_context_dim_in && cfg.context_dim() == t.context_dim(),
        "the ControlNet's text/image contexts ({}, {:?}) differ from the transformer's ({}, {:?})",
        cfg.context_dim(),
        cfg.img_context_dim_in,
        t.context_dim(),
        t.img_context_dim_in
    );
    Ok(())
}

impl CosmosPipeline {
    /// Loads `model_index.json`, the transformer and the VAE, every weight checked against what
    /// the configs' models ask for (names, shapes, finite values), in `dtype` on `device`.
    pub fn load(reference: &str, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        Self::load_from(Repository::parse(reference)?, dtype, device)
    }

    /// Which pipeline a repository holds, from its `model_index.json` alone (nothing else is
    /// read or downloaded).
    pub fn kind_of(reference: &str) -> anyhow::Result<PipelineKind> {
        let repo = Repository::parse(reference)?;
        let index_path = repo.file("model_index.json")?;
        let index = read_json(&index_path)?;
        let class =
            index["_class_name"].as_str().with_context(|| format!("{}: no _class_name", index_path.display()))?;
        PipelineKind::from_class_name(class).with_context(|| format!("in {}", index_path.display()))
    }

    /// [`Self::load`] from a parsed repository (tests point it at a cache of their own).
    pub fn load_from(repo: Repository, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let index_path = repo.file("model_index.json")?;
        let index = read_json(&index_path)?;
        let class =
            index["_class_name"].as_str().with_context(|| format!("{}: no _class_name", index_path.display()))?;
        let kind = PipelineKind::from_class_name(class).with_context(|| format!("in {}", index_path.display()))?;
        let scheduler = SchedulerSetup::from_config(kind, &repo.file("scheduler/scheduler_config.json")?)?;

        let transformer_cfg = TransformerConfig::from_json_file(&repo.file("transformer/config.json")?)?;
        let recorder = shared::weights::ShapeRecorder::new();
        CosmosTransformer3DModel::new(&transformer_cfg, recorder.var_builder(dtype, device))?;
        let files = model_weight_files(&repo, "transformer")?;
        let vb = shared::weights::varbuilder_for_model_files(&files, &recorder.shapes(), dtype, device)
            .context("loading the transformer")?;
        let transformer = CosmosTransformer3DModel::new(&transformer_cfg, vb)?;

        let vae_config = repo.file("vae/config.json")?;
        repo.file("vae/diffusion_pytorch_model.safetensors")?;
        let vae_dir = vae_config.parent().context("vae/config.json has no folder")?;
        let vae = AutoencoderKLWan::from_dir(vae_dir, dtype, device)?;
        anyhow::ensure!(
            transformer_cfg.in_channels == vae.config().z_dim + 1 && transformer_cfg.out_channels == vae.config().z_dim,
            "the transformer reads {} channels and writes {}, but the VAE's latents have {} (+1 condition mask)",
            transformer_cfg.in_channels,
            transformer_cfg.out_channels,
            vae.config().z_dim
        );
        let controlnet = if kind.uses_controls() {
            Some(load_controlnet(&repo, "controlnet", &transformer_cfg, vae.config().z_dim, dtype, device)?)
        } else {
            None
        };
        Ok(Self { kind, repository: repo.describe(), transformer, vae, scheduler, controlnet })
    }

    pub fn dtype(&self) -> DType {
        self.vae.dtype()
    }

    /// The (normalised) conditioning latents of a video (B, 3, F, H, W) in [−1, 1], and how many
    /// latent frames condition: as diffusers, the last `num_frames` frames (or the video padded
    /// by repeating its last frame), encoded with the posterior mean, (μ − mean)/std. Only the
    /// frames the conditioning latent frames depend on are encoded — by the VAE's causality the
    /// same latents as encoding the whole padded clip.
    pub fn conditioning_latents(&self, video: &Tensor, num_frames: usize) -> anyhow::Result<(Tensor, usize)> {
        let frames = video.dim(2)?;
        anyhow::ensure!(frames > 0, "the conditioning video has no frames");
        let cfg = self.vae.config();
        let (video, cond_frames) = if frames >= num_frames {
            (video.narrow(2, frames - num_frames, num_frames)?, num_frames)
        } else {
            (video.clone(), frames)
        };
        let k = cfg.latent_frames(cond_frames);
        // The frames the first k latent frames read: 1 + 4(k − 1), padding by the last frame.
        let needed = cfg.decoded_frames(k);
        let have = video.dim(2)?;
        let video = if have >= needed {
            video.narrow(2, 0, needed)?
        } else {
            let last = video.narrow(2, have - 1, 1)?;
            let pad = last.repeat((1, 1, needed - have, 1, 1))?;
            Tensor::cat(&[&video, &pad], 2)?
        };
        let posterior = self.vae.encode(&video)?;
        Ok((self.vae.normalize_latents(posterior.mode())?, k))
    }
}

/// diffusers' Predict2 Video2World x0 prediction (see the module docs).
pub struct Predict2Denoiser<'a> {
    pub model: &'a CosmosTransformer3DModel,
    /// Normalised conditioning latents (B, C, T, h, w); frames past the conditioning ones unused.
    pub conditioning: Tensor,
    /// (1, 1, T, 1, 1): 1 on conditioning latent frames.
    pub indicator: Tensor,
    pub sigma_conditioning: f64,
    pub fps: Option<f64>,
}

impl<'a> Predict2Denoiser<'a> {
    pub fn new(
        model: &'a CosmosTransformer3DModel,
        conditioning: Tensor,
        cond_latent_frames: usize,
        fps: Option<f64>,
    ) -> Result<Self> {
        let indicator = frame_indicator(conditioning.dim(2)?, cond_latent_frames, &conditioning)?;
        Ok(Self { model, conditioning, indicator, sigma_conditioning: PREDICT2_SIGMA_CONDITIONING, fps })
    }
}

impl Denoiser for Predict2Denoiser<'_> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let (b, _c, t, h, w) = x.dims5()?;
        let dtype = x.dtype();
        let context = cond.context.as_ref().ok_or_else(|| candle_core::Error::Msg("no prompt embeddings".into()))?;
        let m = self.indicator.to_dtype(dtype)?;
        let keep = (m.ones_like()? - &m)?;
        let gt = self.conditioning.to_dtype(dtype)?;
        // t = σ/(σ + 1) per frame; c_in = c_skip = 1 − t, c_out = −t.
        let t_flow = per_frame(&(sigma / (sigma + 1.0)?)?)?;
        let c_in = (t_flow.ones_like()? - &t_flow)?;
        let net_in = (gt.broadcast_mul(&m)? + x.broadcast_mul(&c_in)?.broadcast_mul(&keep)?)?;
        let t_cond = self.sigma_conditioning / (self.sigma_conditioning + 1.0);
        let timestep = ((m.broadcast_as((b, 1, t, 1, 1))? * t_cond)? + t_flow.broadcast_mul(&keep)?)?;
        let mask = m.broadcast_as((b, 1, t, h, w))?.contiguous()?;
        // diffusers passes zeros at the pixel size; the transformer resizes it (nearest) to the
        // latent grid, so zeros at that grid are the same input.
        let padding = Tensor::zeros((1, 1, h, w), dtype, x.device())?;
        let opts = ForwardOptions { fps: self.fps, context_mask: None };
        let f = self.model.forward_with(&net_in, &timestep, context, Some(&mask), Some(&padding), &opts)?;
        let x0 = (x.broadcast_mul(&c_in)? - f.to_dtype(dtype)?.broadcast_mul(&t_flow)?)?;
        gt.broadcast_mul(&m)? + x0.broadcast_mul(&keep)?
    }

    fn describe(&self) -> String {
        format!("Cosmos-Predict2 Video2World x0 prediction (fps {:?})", self.fps)
    }
}

/// diffusers' Predict2.5 velocity, turned into the x0 prediction our solvers read (see the
/// module docs). With t = σ/(σ + 1) per frame and m the conditioning-frame indicator:
/// the network reads m·c + (1 − m)·x_flow (x_flow = (1 − t)·x) at timestep m·t_c + (1 − m)·t;
/// its velocity is replaced on conditioning frames by (z0 − c) — z0 being the trajectory's
/// *initial* noise ([`Conditioning::initial_noise`]), fixed for the whole loop — and
/// x0 = x_flow − t·v. On conditioning frames x0 is therefore not c itself: it carries
/// (1 − t_0)·(z0 − c) from the first step on (diffusers leaves it so; the final latents' first
/// frame differs from c by that much), and it depends on z0 directly, which the gradient follows.
///
/// Transfer2.5 ([`super::transfer`]) is the same velocity with the ControlNet branches: before
/// each transformer call every [`ControlBranch`] runs its ControlNet on the same inputs (and the
/// same — conditional or unconditional — text context), and the sum of their scaled samples is
/// added after every `controlnet_block_every_n`-th block; both see the image context.
pub struct Predict25Denoiser<'a> {
    pub model: &'a CosmosTransformer3DModel,
    /// Normalised conditioning latents (B, C, T, h, w); frames past the conditioning ones unused.
    pub conditioning: Tensor,
    /// (1, 1, T, 1, 1): 1 on conditioning latent frames.
    pub indicator: Tensor,
    /// The conditioning frames' timestep, a flow time (diffusers' `conditional_frame_timestep`).
    pub conditional_frame_timestep: f64,
    /// Transfer2.5's ControlNets (none for Predict2.5).
    pub controls: Vec<ControlBranch<'a>>,
    /// Transfer2.5's image context (B, Li, img_context_dim_in) (zeros in diffusers' pipeline).
    pub img_context: Option<Tensor>,
}

/// One control of a Transfer2.5 denoiser: a ControlNet, the normalised latents of its control
/// video (B, C, T, h, w) and its conditioning scale.
pub struct ControlBranch<'a> {
    pub controlnet: &'a CosmosControlNetModel,
    pub latents: Tensor,
    pub scale: ConditioningScale,
}

impl<'a> Predict25Denoiser<'a> {
    pub fn new(model: &'a CosmosTransformer3DModel, conditioning: Tensor, cond_latent_frames: usize) -> Result<Self> {
        let indicator = frame_indicator(conditioning.dim(2)?, cond_latent_frames, &conditioning)?;
        Ok(Self {
            model,
            conditioning,
            indicator,
            conditional_frame_timestep: PREDICT25_CONDITIONAL_FRAME_TIMESTEP,
            controls: Vec::new(),
            img_context: None,
        })
    }
}

/// (1, 1, T, 1, 1) with 1 on the first `k` latent frames, in `like`'s dtype and device.
pub(crate) fn frame_indicator(t: usize, k: usize, like: &Tensor) -> Result<Tensor> {
    let values: Vec<f32> = (0..t).map(|i| if i < k { 1.0 } else { 0.0 }).collect();
    Tensor::from_vec(values, (1, 1, t, 1, 1), like.device())?.to_dtype(like.dtype())
}

impl Denoiser for Predict25Denoiser<'_> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let (b, _c, t, h, w) = x.dims5()?;
        let dtype = x.dtype();
        let context = cond.context.as_ref().ok_or_else(|| candle_core::Error::Msg("no prompt embeddings".into()))?;
        let z0 = cond.initial_noise.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("the Predict2.5 denoiser needs the trajectory's initial noise".into())
        })?;
        let m = self.indicator.to_dtype(dtype)?;
        let keep = (m.ones_like()? - &m)?;
        let gt = self.conditioning.to_dtype(dtype)?;
        let t_flow = per_frame(&(sigma / (sigma + 1.0)?)?)?;
        let x_flow = x.broadcast_mul(&(t_flow.ones_like()? - &t_flow)?)?;
        let net_in = (gt.broadcast_mul(&m)? + x_flow.broadcast_mul(&keep)?)?;
        let timestep =
            ((m.broadcast_as((b, 1, t, 1, 1))? * self.conditional_frame_timestep)? + t_flow.broadcast_mul(&keep)?)?;
        let mask = m.broadcast_as((b, 1, t, h, w))?.contiguous()?;
        let padding = Tensor::zeros((1, 1, h, w), dtype, x.device())?;
        let opts = ForwardOptions { fps: None, context_mask: None };
        // The ControlNets' residuals, summed over the controls (each already scaled).
        let mut residuals: Option<Vec<Tensor>> = None;
        for branch in &self.controls {
            let samples = branch.controlnet.forward(
                &branch.latents,
                &net_in,
                &timestep,
                context,
                self.img_context.as_ref(),
                Some(&mask),
                &branch.scale,
                &padding,
                &opts,
            )?;
            residuals = Some(match residuals {
                None => samples,
                Some(sum) => sum.iter().zip(&samples).map(|(a, b)| a + b).collect::<Result<_>>()?,
            });
        }
        let transfer =
            TransferInputs { img_context: self.img_context.clone(), block_controlnet_hidden_states: residuals };
        let f =
            self.model.forward_transfer(&net_in, &timestep, context, Some(&mask), Some(&padding), &opts, &transfer)?;
        let velocity = ((z0.to_dtype(dtype)? - &gt)?.broadcast_mul(&m)? + f.to_dtype(dtype)?.broadcast_mul(&keep)?)?;
        x_flow - velocity.broadcast_mul(&t_flow)?
    }

    fn describe(&self) -> String {
        let base = "velocity (conditioning frames' velocity fixed to z0 − c) as x0 prediction";
        if self.controls.is_empty() {
            format!("Cosmos-Predict2.5 {base}")
        } else {
            format!("Cosmos-Transfer2.5 {base}, {} ControlNet branch(es)", self.controls.len())
        }
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The conditioning video (B, 3, F, H, W) in [−1, 1] (an image is F = 1).
    pub video: Tensor,
    pub prompt_embeds: Tensor,
    /// Required when `guidance > 1`.
    pub negative_prompt_embeds: Option<Tensor>,
    pub num_frames: usize,
    pub steps: usize,
    pub guidance: f64,
    pub fps: Option<f64>,
    /// Unit-variance initial noise (B, C, T, H/8, W/8): diffusers' `latents` argument.
    pub latents: Tensor,
    /// Predict2.5 with a video (more than one frame): how many latent frames condition (1 or 2;
    /// diffusers' `num_latent_conditional_frames`, default 2) — the last 4(n − 1) + 1 frames
    /// are used. Ignored for an image and by Predict2 (which conditions on the whole clip).
    pub condition_latent_frames: Option<usize>,
}

/// Everything a trajectory over a pipeline needs, borrowed by [`Trajectory`].
pub struct Prepared<'a> {
    pub denoiser: Box<dyn Denoiser + 'a>,
    pub cond: Conditioning,
    pub schedule: Schedule,
    pub solver: Box<dyn crate::solver::Solver>,
}

impl Prepared<'_> {
    /// A trajectory over this preparation (no churn: diffusers' Euler is deterministic).
    pub fn trajectory(&self) -> Trajectory<'_> {
        let plan = Churn::default().plan(&self.schedule.sigmas, false);
        Trajectory {
            denoiser: self.denoiser.as_ref(),
            solver: self.solver.as_ref(),
            cond: &self.cond,
            schedule: self.schedule.clone(),
            plan,
        }
    }
}

impl CosmosPipeline {
    /// The latent shape (B, C, T, H/8, W/8) of a request's video size.
    pub fn latent_shape(&self, batch: usize, num_frames: usize, height: usize, width: usize) -> [usize; 5] {
        let cfg = self.vae.config();
        let s = cfg.spatial_factor();
        [batch, cfg.z_dim, cfg.latent_frames(num_frames), height / s, width / s]
    }

    /// Refuses a video size beyond what the transformer's positional tables cover (`max_size`,
    /// in latent frames/rows/columns), before anything of that size is allocated.
    pub fn check_size(&self, num_frames: usize, height: usize, width: usize) -> anyhow::Result<()> {
        let [_, _, t, h, w] = self.latent_shape(1, num_frames, height, width);
        let [mt, mh, mw] = self.transformer.config().max_size;
        anyhow::ensure!(
            t <= mt && h <= mh && w <= mw,
            "{num_frames} frames of {height}×{width} are {t}×{h}×{w} latents; this transformer covers at most \
             {mt}×{mh}×{mw} (its max_size): lower --num-frames, --height or --width"
        );
        Ok(())
    }

    /// Builds the denoiser, conditioning and schedule of a request.
    pub fn prepare(&self, req: &GenerateRequest) -> anyhow::Result<Prepared<'_>> {
        anyhow::ensure!(
            !self.kind.uses_controls(),
            "{} generates from control videos, not from a conditioning video: see cosmos::transfer",
            self.kind.class_name()
        );
        let (b, c, _f, h, w) = req.video.dims5()?;
        anyhow::ensure!(c == 3, "the conditioning video has {c} channels, expected 3");
        anyhow::ensure!(h % 16 == 0 && w % 16 == 0, "height and width must be multiples of 16, got {h}×{w}");
        anyhow::ensure!(req.num_frames >= 1, "--num-frames must be at least 1");
        anyhow::ensure!(req.steps >= 2, "--steps must be at least 2 (diffusers' Karras schedules need two levels)");
        let expected = self.latent_shape(b, req.num_frames, h, w);
        anyhow::ensure!(
            req.latents.dims() == expected,
            "the initial latents are {:?}, the request needs {:?}",
            req.latents.dims(),
            expected
        );
        let dtype = self.dtype();
        let video = req.video.to_dtype(dtype)?;
        let (conditioning, k) = match self.kind {
            // diffusers: the last `num_frames` frames of the clip (or the clip padded by its last
            // frame); (n − 1)/4 + 1 latent frames condition.
            PipelineKind::Predict2VideoToWorld => self.conditioning_latents(&video, req.num_frames)?,
            // diffusers: an image conditions one latent frame (the black frames after it do not
            // reach it: the VAE is causal); a video its last 4(n − 1) + 1 frames, n latent frames.
            PipelineKind::Predict25 => {
                let frames = video.dim(2)?;
                let n = if frames == 1 {
                    1
                } else {
                    let n = req.condition_latent_frames.unwrap_or(PREDICT25_DEFAULT_VIDEO_CONDITION_LATENT_FRAMES);
                    anyhow::ensure!(
                        n == 1 || n == 2,
                        "Predict2.5 conditions on 1 or 2 latent frames of a video, {n} asked for"
                    );
                    n
                };
                let needed = 4 * (n - 1) + 1;
                anyhow::ensure!(
                    frames >= needed,
                    "the conditioning video has {frames} frames; {n} conditioning latent frames need at least {needed}"
                );
                self.conditioning_latents(&video, needed)?
            }
            PipelineKind::Transfer25 => unreachable!("refused above"),
        };
        // The conditioning covers k latent frames; pad to the full length (masked frames unused).
        let t = expected[2];
        let conditioning = if conditioning.dim(2)? < t {
            let pad = Tensor::zeros(
                (b, expected[1], t - conditioning.dim(2)?, expected[3], expected[4]),
                dtype,
                conditioning.device(),
            )?;
            Tensor::cat(&[&conditioning, &pad], 2)?
        } else {
            conditioning.narrow(2, 0, t)?
        };
        anyhow::ensure!(
            req.fps.is_none() || self.kind == PipelineKind::Predict2VideoToWorld,
            "--fps: {} passes no fps to its transformer",
            self.kind.class_name()
        );
        let inner: Box<dyn Denoiser + '_> = match self.kind {
            PipelineKind::Predict2VideoToWorld => {
                Box::new(Predict2Denoiser::new(&self.transformer, conditioning, k, req.fps)?)
            }
            PipelineKind::Predict25 => Box::new(Predict25Denoiser::new(&self.transformer, conditioning, k)?),
            PipelineKind::Transfer25 => unreachable!("refused above"),
        };
        // CFG is applied to x0 = x_flow − t·v, affine in the prediction (v for Predict2.5), so
        // cond + g·(cond − uncond) on x0 is the same as diffusers' on v (the x_flow terms cancel).
        let denoiser: Box<dyn Denoiser + '_> = if req.guidance > 1.0 {
            let negative = req
                .negative_prompt_embeds
                .clone()
                .context("guidance > 1 needs negative prompt embeddings (negative_prompt_embeds)")?;
            Box::new(ClassifierFreeGuidance {
                inner,
                scale: req.guidance,
                uncond_context: Some(negative.to_dtype(dtype)?),
            })
        } else {
            inner
        };
        let schedule = self.scheduler.schedule(req.steps)?;
        let cond = Conditioning {
            frames: None,
            mask: None,
            context: Some(req.prompt_embeds.to_dtype(dtype)?),
            initial_noise: None,
        };
        Ok(Prepared { denoiser, cond, schedule, solver: self.scheduler.solver.build() })
    }

    /// Samples once: the final (normalised) latents and the video (B, 3, F, H, W) in [0, 1].
    pub fn generate(&self, req: &GenerateRequest) -> anyhow::Result<(Tensor, Tensor)> {
        let prepared = self.prepare(req)?;
        let traj = prepared.trajectory();
        let z0 = req.latents.to_dtype(self.dtype())?;
        let latents = traj.sample(&z0, &vec![None; traj.num_steps()])?;
        let video = self.decode_to_unit(&latents)?;
        Ok((latents, video))
    }

    /// Normalised latents → video in [0, 1].
    pub fn decode_to_unit(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        let video = self.vae.decode(&self.vae.denormalize_latents(latents)?)?;
        Ok(video.affine(0.5, 0.5)?.clamp(0.0, 1.0)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs from files: in [`super::inputs`], re-exported here so the old paths keep working.

pub use super::inputs::{load_conditioning, read_latents, read_prompt_embeds};
