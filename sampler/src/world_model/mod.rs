//! An action-conditioned video world model of the `BimanualPucks` environment: a small Cosmos
//! DiT ([`crate::cosmos::transformer`]) trained with the EDM denoising loss **directly in pixel space**
//! (no VAE: the frames are tiny, so the "latent" is the RGB image itself, scaled to [−1, 1]).
//!
//! * A frame is the three camera views tiled side by side (left wrist | right wrist | global),
//!   each rendered at `render_size`² and box-downsampled to `view_size`², so one frame is
//!   `view_size × 3·view_size` RGB.
//! * A clip is `frames` frames `frame_stride` control steps apart; the policy that collected it
//!   chose an action at each frame and it was held for the stride (action repeat).
//! * Conditioning: frame 0 is the clean condition (frame replacement + the DiT's condition-mask
//!   channel, presented at σ = `condition_sigma`). The clean condition frame is also
//!   concatenated to every frame's channels, so that "start from the first frame" is a local,
//!   per-patch operation the model gets for free and training (on a CPU) only has to
//!   learn what changes. The cross-attention context is one token per
//!   transition, a linear embedding of the 8-d action plus a learned per-transition position
//!   (cross-attention has no positional encoding of its own). The embedding is part of the
//!   world-model weights (`action_embed.{weight,bias,pos}`); the DiT's are under `dit.`.
//!
//! * Residual to the first frame: the EDM preconditioning acts on `x − frame₀` (σ_data of the
//!   frame *changes*, which are sparse), i.e. `D(x) = frame₀ + D_Δ(x − frame₀)`. The data the
//!   diffusion models are then the changes, and a network that predicts no change reproduces
//!   the copy-the-first-frame baseline.
//!
//! As a sampler [`Denoiser`], the model is `FrameReplace(ResidualToFirstFrame(Preconditioned(EDM, net)))`; its
//! `Conditioning` carries the clip's frames (only frame 0 is read), the mask, and the raw
//! actions (B, frames − 1, 8) as `context`.
//!
//! The module by concern (every public item is re-exported here, at `world_model::`):
//! * this file: the model — [`WorldModelConfig`], [`WorldModel`], its denoiser stack
//!   ([`ResidualToFirstFrame`], [`WorldModelNet`]) and the file names of a world-model
//!   directory ([`CONFIG_FILE`], [`WEIGHTS_FILE`]);
//! * [`data`]: clips collected from the environment ([`Clips`], [`collect_clips`]);
//! * [`mod@train`]: the EDM loss, its settings and the training loop ([`train()`]);
//! * [`eval`]: sampled predictions, PSNR against the real frames and the copy-the-first-frame
//!   baseline, denoising PSNR, and the held-out evaluation ([`evaluate`]).

pub mod data;
pub mod eval;
pub mod train;

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rl::env::ACTION_DIM;

use crate::cosmos::transformer::{Config as DitConfig, CosmosTransformer3DModel};
use crate::denoiser::{Conditioning, Denoiser, FrameReplace, Network, Preconditioned};
use crate::param::Parameterization;

pub use data::{collect_clips, observation_frame, Clips, DataSpec, COLLECTION_POLICIES};
pub use eval::{
    copy_first_frame, denoising_psnr, evaluate, predict, psnr, write_predictions_figure, EvalSettings, HeldOutEval,
    DENOISING_PROBE_SIGMAS,
};
pub use train::{
    batch_indices, edm_loss, learning_rate, train, trainable_vars, RunDir, TrainOutcome, TrainSettings, P_MEAN_BOUND,
    P_STD_MAX,
};

/// Everything that defines the model's shapes and preconditioning (saved next to the weights).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldModelConfig {
    pub dit: DitConfig,
    /// Frames per clip (frame 0 is the condition).
    pub frames: usize,
    /// Side of one downsampled camera view.
    pub view_size: usize,
    /// Side the environment renders each camera at before box-downsampling to `view_size`.
    pub render_size: usize,
    /// Control steps between frames (the action is held for them).
    pub frame_stride: usize,
    pub action_dim: usize,
    /// EDM σ_data of the frame changes x − frame₀ (pixels in [−1, 1]).
    pub sigma_data: f64,
    /// The noise level the clean condition frame is presented at.
    pub condition_sigma: f64,
}

impl WorldModelConfig {
    /// The previous embedded model: 3 frames of 16×48 (three 16×16 views), 3 control steps
    /// apart; DiT width 64 (4 heads × 16), 2 blocks, 4×4 patches (48 tokens per frame; 2×2
    /// patches measured 20× slower per step on the CPU, attention being built from unfused ops).
    /// Too small to predict much: as a PyTorch regressor on the same data it reaches +0.5 dB
    /// over copying the first frame (`scripts/world_model_capacity.py`).
    pub fn small() -> Self {
        Self::with_dit(64, 2, 4, 16, 3, 3)
    }

    /// The embedded model: the clip and patches of [`Self::small`], DiT width 128 (8 heads ×
    /// 16) and 4 blocks (981 120 parameters, 6× `small`). Trained by `train-world-model`'s
    /// defaults it predicts held-out frames 2.15 dB better than copying the first frame
    /// (`weights/README.md`); training takes ~50 min on a 2-core CPU.
    pub fn medium() -> Self {
        Self::with_dit(128, 4, 8, 16, 3, 3)
    }

    /// A few-second model for tests: width 24, 1 block, 8×8 views, 3 frames.
    pub fn tiny() -> Self {
        let mut c = Self::with_dit(24, 1, 2, 12, 3, 1);
        c.view_size = 8;
        c.render_size = 16;
        c.dit.max_size = [3, 8, 24];
        c
    }

    fn with_dit(hidden: usize, layers: usize, heads: usize, head_dim: usize, frames: usize, stride: usize) -> Self {
        let view_size = 16;
        let dit = DitConfig {
            // Noisy RGB + clean condition frame RGB + condition mask.
            in_channels: 7,
            out_channels: 3,
            num_attention_heads: heads,
            attention_head_dim: head_dim,
            num_layers: layers,
            mlp_ratio: 2.0,
            text_embed_dim: hidden,
            adaln_lora_dim: 16,
            max_size: [frames, view_size, 3 * view_size],
            patch_size: [1, 4, 4],
            rope_scale: [1.0, 1.0, 1.0],
            concat_padding_mask: false,
            extra_pos_embed_type: Some("learnable".into()),
            use_crossattn_projection: false,
            ..DitConfig::default()
        };
        debug_assert_eq!(dit.hidden_size(), hidden);
        Self {
            dit,
            frames,
            view_size,
            render_size: 32,
            frame_stride: stride,
            action_dim: ACTION_DIM,
            sigma_data: 0.25,
            condition_sigma: 0.002,
        }
    }

    /// (C, T, H, W) of one clip.
    pub fn clip_shape(&self) -> [usize; 4] {
        [3, self.frames, self.view_size, 3 * self.view_size]
    }

    /// Every field's range, all problems at once, naming the field. Beyond the shapes the DiT
    /// itself checks: counts ≥ 1, finite positive noise levels, a DiT position table that covers
    /// the clip, and upper bounds far above any model this crate trains on a CPU but low enough
    /// that a config's numbers can never make building the model (or rendering its data)
    /// exhaust memory — a json saying 10⁹ layers is refused, not attempted.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.dit.validate()?;
        let mut c = shared::checks::ArgChecks::new();
        let d = &self.dit;
        c.require((2..=MAX_FRAMES).contains(&(self.frames as u64)), || {
            format!("frames must be in 2..={MAX_FRAMES} (the condition frame + predictions), got {}", self.frames)
        })
        .require((4..=MAX_VIEW).contains(&(self.view_size as u64)), || {
            format!("view_size must be in 4..={MAX_VIEW} (pixels per camera view side), got {}", self.view_size)
        })
        .count_at_most(
            "render_size",
            self.render_size as u64,
            MAX_RENDER,
            "the environment renders three cameras at it",
        )
        .count_at_most("frame_stride", self.frame_stride as u64, MAX_STRIDE, "control steps between frames")
        .count_at_most("dit.num_layers", d.num_layers as u64, MAX_LAYERS, "transformer blocks")
        .count_at_most("dit.num_attention_heads", d.num_attention_heads as u64, MAX_HEADS, "heads")
        .count_at_most("dit.attention_head_dim", d.attention_head_dim as u64, MAX_HEAD_DIM, "per-head width")
        .count_at_most("dit.text_embed_dim", d.text_embed_dim as u64, MAX_WIDTH, "action-token width")
        .count_at_most("dit.adaln_lora_dim", d.adaln_lora_dim as u64, MAX_WIDTH, "AdaLN-LoRA rank")
        .positive("dit.mlp_ratio", d.mlp_ratio)
        .require(d.mlp_ratio <= 16.0, || {
            format!("dit.mlp_ratio {} is beyond 16 (the MLP width per hidden unit)", d.mlp_ratio)
        })
        .positive("sigma_data", self.sigma_data)
        .positive("condition_sigma", self.condition_sigma);
        c.require(self.render_size >= 16 && self.render_size.is_multiple_of(self.view_size.max(1)), || {
            format!("render_size {} must be ≥ 16 and a multiple of view_size {}", self.render_size, self.view_size)
        });
        c.require(d.hidden_size() as u64 <= MAX_WIDTH, || {
            format!("dit hidden size (heads × head dim) {} is beyond {MAX_WIDTH}", d.hidden_size())
        });
        let clip = [self.frames, self.view_size, 3 * self.view_size];
        c.require(d.max_size.iter().zip(&clip).all(|(m, n)| m >= n), || {
            format!("dit.max_size {:?} must cover the clip (frames, view_size, 3·view_size) = {clip:?}", d.max_size)
        });
        c.require(d.max_size.iter().zip(&clip).all(|(m, n)| *m <= n.saturating_mul(4)), || {
            format!("dit.max_size {:?} is far beyond the clip {clip:?} (at most 4× per axis)", d.max_size)
        });
        c.require(d.in_channels == 7 && d.out_channels == 3, || {
            "the DiT must map RGB + condition RGB + mask (dit.in_channels 7) → RGB (dit.out_channels 3)".into()
        });
        c.require(!d.concat_padding_mask, || {
            "dit.concat_padding_mask must be false (the DiT takes no padding mask)".into()
        });
        c.require(self.action_dim == ACTION_DIM, || {
            format!("action_dim must be {ACTION_DIM}, got {}", self.action_dim)
        });
        c.finish().context("world-model config")
    }

    /// Reads and validates a `world_model.json`.
    pub fn from_json_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing {} as a world-model config", path.display()))?;
        cfg.validate().with_context(|| format!("invalid world-model config {}", path.display()))?;
        Ok(cfg)
    }

    /// Every weight the model built from this config asks for, with its shape (nothing is
    /// allocated: [`shared::weights::ShapeRecorder`]).
    pub fn expected_weights(&self) -> anyhow::Result<std::collections::BTreeMap<String, Vec<usize>>> {
        let recorder = shared::weights::ShapeRecorder::new();
        WorldModel::new(self, recorder.var_builder(DType::F32, &Device::Cpu))?;
        Ok(recorder.shapes())
    }
}

/// Upper bounds of [`WorldModelConfig::validate`] (the embedded model: 3 frames, 16 px views
/// rendered at 32, stride 3, 2 layers, 4 heads × 16).
const MAX_FRAMES: u64 = 256;
const MAX_VIEW: u64 = 512;
const MAX_RENDER: u64 = 2048;
const MAX_STRIDE: u64 = 10_000;
const MAX_LAYERS: u64 = 256;
const MAX_HEADS: u64 = 256;
const MAX_HEAD_DIM: u64 = 1024;
const MAX_WIDTH: u64 = 16_384;

/// The file names of a world-model directory.
pub const CONFIG_FILE: &str = "world_model.json";
pub const WEIGHTS_FILE: &str = "world_model.safetensors";

/// The DiT plus the action embedding.
pub struct WorldModel {
    pub cfg: WorldModelConfig,
    pub dit: CosmosTransformer3DModel,
    /// (D, A) and (D).
    action_weight: Tensor,
    action_bias: Tensor,
    /// (frames − 1, D): which transition a token describes.
    action_pos: Tensor,
}

impl WorldModel {
    pub fn new(cfg: &WorldModelConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let d = cfg.dit.text_embed_dim;
        Ok(Self {
            cfg: cfg.clone(),
            dit: CosmosTransformer3DModel::new(&cfg.dit, vb.pp("dit"))?,
            action_weight: vb.get((d, cfg.action_dim), "action_embed.weight")?,
            action_bias: vb.get(d, "action_embed.bias")?,
            action_pos: vb.get((cfg.frames - 1, d), "action_embed.pos")?,
        })
    }

    /// A trainable model with freshly initialised weights in `varmap` (seeded).
    pub fn new_trainable(cfg: &WorldModelConfig, varmap: &VarMap, seed: u64, device: &Device) -> anyhow::Result<Self> {
        let model = Self::new(cfg, VarBuilder::from_varmap(varmap, DType::F32, device))?;
        init_weights(varmap, seed)?;
        Ok(model)
    }

    /// Frozen weights (plain tensors: no weight gradients) from a safetensors file, computing in
    /// `dtype`. The file must hold exactly the weights the config's model has — every name, with
    /// its shape, stored as f32 (the format `train-world-model` writes), finite — or the error
    /// lists every problem (missing, unexpected, wrong shape or dtype, NaN/Inf) naming the file:
    /// a config saying fewer layers than the file holds is refused, not run on a subset.
    pub fn load(cfg: &WorldModelConfig, weights: &Path, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        cfg.validate()?;
        let expected = cfg.expected_weights()?;
        let vb = shared::weights::varbuilder_for_model_exact(weights, &expected, DType::F32, device)
            .with_context(|| format!("loading world-model weights {}", weights.display()))?;
        Self::new(cfg, vb.set_dtype(dtype))
            .with_context(|| format!("{}: weights do not match the config", weights.display()))
    }

    /// Loads `<dir>/world_model.json` + `<dir>/world_model.safetensors`, the weights checked
    /// against the config ([`Self::load`]).
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let config = dir.join(CONFIG_FILE);
        let weights = dir.join(WEIGHTS_FILE);
        let missing: Vec<&str> = [(CONFIG_FILE, &config), (WEIGHTS_FILE, &weights)]
            .iter()
            .filter(|(_, p)| !p.is_file())
            .map(|(n, _)| *n)
            .collect();
        anyhow::ensure!(
            missing.is_empty(),
            "world-model directory {}: missing {} (it must hold {CONFIG_FILE} and {WEIGHTS_FILE})",
            dir.display(),
            missing.join(" and ")
        );
        let cfg = WorldModelConfig::from_json_file(&config)?;
        Self::load(&cfg, &weights, dtype, device)
            .with_context(|| format!("the weights do not fit the config {}", config.display()))
    }

    /// Actions (B, L, A) → context tokens (B, L, D).
    pub fn embed_actions(&self, actions: &Tensor) -> Result<Tensor> {
        let (b, l, a) = actions.dims3()?;
        let dtype = self.action_weight.dtype();
        let d = self.action_weight.dim(0)?;
        if l > self.action_pos.dim(0)? {
            candle_core::bail!(
                "world model: {l} action tokens but the model knows {} transitions",
                self.action_pos.dim(0)?
            )
        }
        let tokens = actions.to_dtype(dtype)?.reshape((b * l, a))?.matmul(&self.action_weight.t()?)?;
        tokens.reshape((b, l, d))?.broadcast_add(&self.action_bias)?.broadcast_add(&self.action_pos.narrow(0, 0, l)?)
    }

    /// The sampler denoiser: frame replacement over the EDM-preconditioned network, which
    /// predicts the change from the first frame.
    pub fn denoiser(&self) -> FrameReplace<ResidualToFirstFrame<Preconditioned<WorldModelNet<'_>>>> {
        FrameReplace {
            inner: ResidualToFirstFrame(Preconditioned {
                net: WorldModelNet(self),
                param: Parameterization::Edm { sigma_data: self.cfg.sigma_data },
            }),
            condition_sigma: Some(self.cfg.condition_sigma),
        }
    }

    /// Conditioning on the first frame of `clips` (B, 3, T, H, W) and the actions (B, ≥T−1, A)
    /// (only the first T−1, the transitions, are used).
    pub fn conditioning(&self, clips: &Tensor, actions: &Tensor) -> Result<Conditioning> {
        let t = clips.dim(2)?;
        let transitions = actions.narrow(1, 0, t - 1)?;
        Ok(Conditioning { context: Some(transitions), ..Conditioning::frame_replace(clips, 1)? })
    }

    pub fn describe(&self) -> String {
        format!(
            "pixel-space Cosmos DiT world model ({} layers, width {}, {} frames of {}×{}, stride {}, no VAE)",
            self.cfg.dit.num_layers,
            self.cfg.dit.hidden_size(),
            self.cfg.frames,
            self.cfg.view_size,
            3 * self.cfg.view_size,
            self.cfg.frame_stride
        )
    }
}

/// `D(x) = f₀ + D_Δ(x − f₀)` with f₀ the clean first frame (`cond.frames`, frame 0) broadcast
/// over time: the inner denoiser sees, and predicts, the changes from the first frame. Since
/// `x − f₀ = (x₀ − f₀) + σε`, this is exact EDM denoising of the changes.
pub struct ResidualToFirstFrame<Dn>(pub Dn);

impl<Dn: Denoiser> Denoiser for ResidualToFirstFrame<Dn> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let Some(frames) = &cond.frames else {
            candle_core::bail!("world model: the conditioning carries no condition frame")
        };
        let first = frames.narrow(2, 0, 1)?.to_dtype(x.dtype())?;
        let delta = x.broadcast_sub(&first)?;
        self.0.denoise(&delta, sigma, cond)?.broadcast_add(&first)
    }

    fn describe(&self) -> String {
        format!("{} on changes from the first frame", self.0.describe())
    }
}

/// The raw network view of a [`WorldModel`] (borrowed, so the model can be shared).
pub struct WorldModelNet<'a>(pub &'a WorldModel);

impl Network for WorldModelNet<'_> {
    fn forward(&self, x_in: &Tensor, c_noise: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let m = self.0;
        let (b, _c, t, h, w) = x_in.dims5()?;
        let mask = match &cond.mask {
            Some(mask) => mask.to_dtype(x_in.dtype())?.broadcast_as((b, 1, t, h, w))?.contiguous()?,
            None => Tensor::zeros((b, 1, t, h, w), x_in.dtype(), x_in.device())?,
        };
        let Some(actions) = &cond.context else {
            candle_core::bail!("world model: the conditioning carries no actions (context)")
        };
        let Some(frames) = &cond.frames else {
            candle_core::bail!("world model: the conditioning carries no condition frame")
        };
        let first = frames.narrow(2, 0, 1)?.to_dtype(x_in.dtype())?.broadcast_as((b, 3, t, h, w))?.contiguous()?;
        let x = Tensor::cat(&[x_in, &first], 1)?;
        let tokens = m.embed_actions(actions)?;
        m.dit.forward(&x, c_noise, &tokens, Some(&mask), None)?.to_dtype(x_in.dtype())
    }

    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// Initialisation of a fresh model: linear weights N(0, 1/fan_in) (the output projection ×0.1
/// so the initial prediction is close to the skip path), norm gains 1, positional tables
/// N(0, 0.02²), biases 0.
fn init_weights(varmap: &VarMap, seed: u64) -> anyhow::Result<()> {
    let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("varmap lock poisoned"))?;
    let mut names: Vec<&String> = data.keys().collect();
    // Sorted so the init does not depend on HashMap order.
    names.sort();
    let mut rng = shared::rng::SplitMix64::new(seed);
    for name in names {
        let var = &data[name];
        let (shape, dtype, dev) = (var.shape().clone(), var.dtype(), var.device().clone());
        let value =
            if name.ends_with("norm_q.weight") || name.ends_with("norm_k.weight") || name.ends_with("norm.weight") {
                Tensor::ones(&shape, dtype, &dev)?
            } else if name.ends_with("bias") {
                Tensor::zeros(&shape, dtype, &dev)?
            } else if name.contains("pos_emb") || name.ends_with("action_embed.pos") {
                (rng.normal_tensor(&shape, dtype, &dev)? * 0.02)?
            } else {
                let fan_in = shape.dims().last().copied().unwrap_or(1).max(1) as f64;
                let gain = if name.ends_with("proj_out.weight") { 0.1 } else { 1.0 };
                (rng.normal_tensor(&shape, dtype, &dev)? * (gain / fan_in.sqrt()))?
            };
        var.set(&value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configs_validate_and_expect_exactly_what_training_saves() -> anyhow::Result<()> {
        for cfg in [WorldModelConfig::medium(), WorldModelConfig::small(), WorldModelConfig::tiny()] {
            cfg.validate()?;
            let varmap = VarMap::new();
            WorldModel::new_trainable(&cfg, &varmap, 0, &Device::Cpu)?;
            let saved: std::collections::BTreeMap<String, Vec<usize>> =
                trainable_vars(&varmap)?.into_iter().map(|(k, v)| (k, v.dims().to_vec())).collect();
            assert_eq!(cfg.expected_weights()?, saved);
        }
        Ok(())
    }

    #[test]
    fn zero_and_absurd_config_values_are_refused_by_name() {
        type Edit = fn(&mut WorldModelConfig);
        let cases: &[(&str, Edit)] = &[
            ("frames", |c| c.frames = 0),
            ("frames", |c| c.frames = 1),
            ("frames", |c| c.frames = 1_000_000),
            ("view_size", |c| c.view_size = 0),
            ("render_size", |c| c.render_size = 0),
            ("render_size", |c| c.render_size = 17),
            ("render_size", |c| c.render_size = 1 << 40),
            ("frame_stride", |c| c.frame_stride = 0),
            ("dit.num_layers", |c| c.dit.num_layers = 0),
            ("dit.num_layers", |c| c.dit.num_layers = 1_000_000_000),
            ("dit.mlp_ratio", |c| c.dit.mlp_ratio = f64::NAN),
            ("dit.mlp_ratio", |c| c.dit.mlp_ratio = 1e9),
            ("dit.text_embed_dim", |c| c.dit.text_embed_dim = 0),
            ("sigma_data", |c| c.sigma_data = 0.0),
            ("sigma_data", |c| c.sigma_data = f64::INFINITY),
            ("condition_sigma", |c| c.condition_sigma = -1.0),
            ("dit.max_size", |c| c.dit.max_size = [3, 8, 8]),
            ("dit.max_size", |c| c.dit.max_size = [3, 16, 1 << 30]),
            ("action_dim", |c| c.action_dim = 0),
        ];
        for (field, edit) in cases {
            let mut cfg = WorldModelConfig::tiny();
            edit(&mut cfg);
            let err = match cfg.validate() {
                Ok(()) => panic!("{field}: accepted {cfg:?}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
