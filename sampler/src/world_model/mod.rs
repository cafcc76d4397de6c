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
//!   per-patch operation the model gets for free and training (minutes on a CPU) only has to
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

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rl::env::{Env, EnvConfig, Observation, ACTION_DIM, STATE_DIM};

use crate::cosmos::transformer::{Config as DitConfig, CosmosTransformer3DModel};
use crate::denoiser::{Conditioning, Denoiser, FrameReplace, Network, Preconditioned};
use crate::param::Parameterization;

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
    /// The embedded model: 3 frames of 16×48 (three 16×16 views), 3 control steps apart;
    /// DiT width 64 (4 heads × 16), 2 blocks, 4×4 patches (48 tokens per frame; 2×2 patches
    /// measured 20× slower per step on the CPU, attention being built from unfused ops). Sized
    /// so training takes minutes on a busy 2-core CPU.
    pub fn small() -> Self {
        Self::with_dit(64, 2, 4, 16, 3, 3)
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

// ---------------------------------------------------------------------------------------------
// Data from the environment.

/// Which scripted policies collect the episodes (cycled over episodes).
pub const COLLECTION_POLICIES: [rl::env::policy::PolicyKind; 3] =
    [rl::env::policy::PolicyKind::Expert, rl::env::policy::PolicyKind::Medium, rl::env::policy::PolicyKind::Random];

/// Clips as tensors: frames (N, 3, T, H, W) in [−1, 1], actions (N, T, A) — the action chosen
/// at each frame (the first T−1 condition the model; the last is a policy's reference) — and
/// joint states (N, T, 16) at each frame.
#[derive(Clone, Debug)]
pub struct Clips {
    pub frames: Tensor,
    pub actions: Tensor,
    pub states: Tensor,
    /// Per clip: (episode seed, first frame index, policy name).
    pub origin: Vec<(u64, usize, String)>,
}

impl Clips {
    pub fn len(&self) -> usize {
        self.origin.len()
    }

    pub fn is_empty(&self) -> bool {
        self.origin.is_empty()
    }

    /// The clips at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Result<Self> {
        let dev = self.frames.device();
        let ids = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), dev)?;
        Ok(Self {
            frames: self.frames.index_select(&ids, 0)?,
            actions: self.actions.index_select(&ids, 0)?,
            states: self.states.index_select(&ids, 0)?,
            origin: idx.iter().map(|&i| self.origin[i].clone()).collect(),
        })
    }
}

/// One tiled multi-view frame, (3, H, 3H) CHW floats in [−1, 1], box-downsampled from the
/// rendered cameras.
pub fn observation_frame(obs: &Observation, view_size: usize) -> anyhow::Result<Vec<f32>> {
    let (rh, rw) = (obs.height, obs.width);
    anyhow::ensure!(
        rh == rw && rh.is_multiple_of(view_size) && obs.images.iter().all(|i| i.len() == rh * rw * 3),
        "observation images {rh}×{rw} cannot be downsampled to {view_size}×{view_size} (rendering on?)"
    );
    let f = rh / view_size;
    let (h, w) = (view_size, 3 * view_size);
    let mut out = vec![0f32; 3 * h * w];
    let norm = 1.0 / (f * f) as f32;
    for (cam, img) in obs.images.iter().enumerate() {
        for y in 0..h {
            for x in 0..view_size {
                for ch in 0..3 {
                    let mut sum = 0u32;
                    for dy in 0..f {
                        for dx in 0..f {
                            sum += img[((y * f + dy) * rw + x * f + dx) * 3 + ch] as u32;
                        }
                    }
                    let v = sum as f32 * norm / 127.5 - 1.0;
                    out[(ch * h + y) * w + cam * view_size + x] = v;
                }
            }
        }
    }
    Ok(out)
}

/// What to collect.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DataSpec {
    pub episodes: usize,
    pub first_seed: u64,
    /// Frames recorded per episode at most (the episode may end sooner).
    pub frames_per_episode: usize,
    /// Window start spacing in frames (1 = every overlapping window).
    pub clip_spacing: usize,
}

/// Rolls out the collection policies (episode `e` uses seed `first_seed + e` and policy
/// `COLLECTION_POLICIES[e % 3]`), records a frame, the joint state and the chosen action at
/// every `frame_stride`-th control step (the action held in between), and cuts clips.
pub fn collect_clips(cfg: &WorldModelConfig, spec: &DataSpec, device: &Device) -> anyhow::Result<Clips> {
    let env_cfg = EnvConfig { render: true, ..EnvConfig::default().with_image_size(cfg.render_size, cfg.render_size) };
    let mut env = Env::new(env_cfg).context("creating the environment")?;
    let t = cfg.frames;
    let frame_len = 3 * cfg.view_size * 3 * cfg.view_size;
    let (mut frames, mut actions, mut states, mut origin) =
        (Vec::<f32>::new(), Vec::<f32>::new(), Vec::<f32>::new(), Vec::new());
    for e in 0..spec.episodes {
        let seed = spec.first_seed + e as u64;
        let kind = COLLECTION_POLICIES[e % COLLECTION_POLICIES.len()];
        let mut policy = kind.build(seed);
        let mut obs = env.reset(seed);
        let (mut ep_frames, mut ep_actions, mut ep_states) = (Vec::new(), Vec::new(), Vec::new());
        'episode: for _ in 0..spec.frames_per_episode {
            ep_frames.push(observation_frame(&obs, cfg.view_size)?);
            ep_states.push(obs.state.clone());
            let action = policy.act(&env);
            ep_actions.push(action.to_vec());
            for _ in 0..cfg.frame_stride {
                let step = env.step(&action);
                obs = step.obs;
                if step.done {
                    break 'episode;
                }
            }
        }
        let n = ep_frames.len();
        let mut start = 0;
        while start + t <= n {
            // (C, T, H, W): channel-major across the clip's frames.
            let mut clip = vec![0f32; frame_len * t];
            let plane = frame_len / 3;
            for (ti, fr) in ep_frames[start..start + t].iter().enumerate() {
                for ch in 0..3 {
                    clip[(ch * t + ti) * plane..(ch * t + ti + 1) * plane]
                        .copy_from_slice(&fr[ch * plane..(ch + 1) * plane]);
                }
            }
            frames.extend(clip);
            actions.extend(ep_actions[start..start + t].iter().flatten());
            states.extend(ep_states[start..start + t].iter().flatten());
            origin.push((seed, start, kind.name().to_string()));
            start += spec.clip_spacing.max(1);
        }
    }
    let n = origin.len();
    anyhow::ensure!(n > 0, "no clips collected (episodes too short for {t} frames?)");
    let [c, tt, h, w] = cfg.clip_shape();
    Ok(Clips {
        frames: Tensor::from_vec(frames, (n, c, tt, h, w), device)?,
        actions: Tensor::from_vec(actions, (n, t, ACTION_DIM), device)?,
        states: Tensor::from_vec(states, (n, t, STATE_DIM), device)?,
        origin,
    })
}

// ---------------------------------------------------------------------------------------------
// Training.

/// EDM training hyper-parameters (Karras et al. 2022: ln σ ~ N(P_mean, P_std²)).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSettings {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub p_mean: f64,
    pub p_std: f64,
    pub seed: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self { steps: 1500, batch_size: 8, lr: 1e-3, warmup_steps: 50, p_mean: -1.0, p_std: 1.4, seed: 0 }
    }
}

/// The learning rate at `step`: linear warm-up, then cosine decay to 10 %.
pub fn learning_rate(s: &TrainSettings, step: usize) -> f64 {
    if step < s.warmup_steps {
        return s.lr * (step + 1) as f64 / s.warmup_steps as f64;
    }
    let p = (step - s.warmup_steps) as f64 / (s.steps.saturating_sub(s.warmup_steps)).max(1) as f64;
    s.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos()))
}

/// The EDM loss on a batch: λ(σ)·‖D(x0 + σε) − x0‖² averaged over the predicted frames
/// (frame 0 is the condition and reproduced exactly), λ = (σ² + σ_d²)/(σ·σ_d)², one σ per clip.
pub fn edm_loss(
    model: &WorldModel,
    batch: &Clips,
    rng: &mut shared::rng::SplitMix64,
    s: &TrainSettings,
) -> Result<Tensor> {
    let x0 = &batch.frames;
    let (b, _c, t, _h, _w) = x0.dims5()?;
    let (dtype, dev) = (x0.dtype(), x0.device());
    let sigmas: Vec<f64> = (0..b).map(|_| (s.p_mean + s.p_std * rng.normal()).exp()).collect();
    let sd = model.cfg.sigma_data;
    let weights: Vec<f64> = sigmas.iter().map(|sg| (sg * sg + sd * sd) / (sg * sd).powi(2)).collect();
    let sigma_bt = Tensor::from_vec(sigmas, (b, 1), dev)?.to_dtype(dtype)?.broadcast_as((b, t))?.contiguous()?;
    let weight = Tensor::from_vec(weights, (b, 1, 1, 1, 1), dev)?.to_dtype(dtype)?;
    let eps = rng.normal_tensor(x0.shape(), dtype, dev)?;
    let x = (x0 + eps.broadcast_mul(&crate::denoiser::per_frame(&sigma_bt)?)?)?;
    let cond = model.conditioning(x0, &batch.actions)?;
    let d = model.denoiser().denoise(&x, &sigma_bt, &cond)?;
    let err = (d - x0)?.sqr()?.broadcast_mul(&weight)?;
    err.narrow(2, 1, t - 1)?.mean_all()
}

/// All trainable vars of a model's varmap, sorted by name.
pub fn trainable_vars(varmap: &VarMap) -> anyhow::Result<Vec<(String, Var)>> {
    let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("varmap lock poisoned"))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// Uniform batch indices without replacement within a batch.
pub fn batch_indices(rng: &mut shared::rng::SplitMix64, n: usize, batch: usize) -> Vec<usize> {
    let mut idx = Vec::with_capacity(batch);
    while idx.len() < batch.min(n) {
        let i = (rng.next_u64() % n as u64) as usize;
        if !idx.contains(&i) {
            idx.push(i);
        }
    }
    idx
}

// ---------------------------------------------------------------------------------------------
// Evaluation.

/// Predicted clips for held-out first frames and actions, sampled with a solver from seeded z0.
pub fn predict(
    model: &WorldModel,
    clips: &Clips,
    solver: crate::solver::SolverKind,
    num_steps: usize,
    sigma_min: f64,
    sigma_max: f64,
    seed: u64,
) -> anyhow::Result<Tensor> {
    let cond = model.conditioning(&clips.frames, &clips.actions)?;
    let denoiser = model.denoiser();
    let solver = solver.build();
    let schedule = crate::schedule::Schedule::karras(num_steps, sigma_min, sigma_max, 7.0)?;
    let plan = crate::noise::Churn::default().plan(&schedule.sigmas, false);
    let traj =
        crate::trajectory::Trajectory { denoiser: &denoiser, solver: solver.as_ref(), cond: &cond, schedule, plan };
    let z0 = shared::rng::SplitMix64::new(seed).normal_tensor(
        clips.frames.shape(),
        clips.frames.dtype(),
        clips.frames.device(),
    )?;
    let noises = vec![None; traj.num_steps()];
    Ok(traj.sample(&z0, &noises)?)
}

/// PSNR (dB, pixels in [0, 1]) of frames 1.. of `pred` against `real`, both (B, 3, T, H, W) in
/// [−1, 1]; also per future frame.
pub fn psnr(pred: &Tensor, real: &Tensor) -> anyhow::Result<(f64, Vec<f64>)> {
    let t = real.dim(2)?;
    let to_db = |mse: f64| 10.0 * (1.0 / mse.max(1e-12)).log10();
    let diff = ((pred.clamp(-1.0, 1.0)? - real)? * 0.5)?.sqr()?;
    let per_frame: Vec<f64> = (1..t)
        .map(|i| Ok(to_db(diff.narrow(2, i, 1)?.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)))
        .collect::<anyhow::Result<_>>()?;
    let all = to_db(diff.narrow(2, 1, t - 1)?.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?);
    Ok((all, per_frame))
}

/// The copy-the-first-frame baseline: every future frame predicted as frame 0.
pub fn copy_first_frame(real: &Tensor) -> Result<Tensor> {
    let t = real.dim(2)?;
    real.narrow(2, 0, 1)?.repeat((1, 1, t, 1, 1))
}

/// One-shot denoising error per noise level: for each σ, the PSNR of D(x0 + σε) against x0
/// on the predicted frames (what the model learned, independent of any solver).
pub fn denoising_psnr(model: &WorldModel, clips: &Clips, sigmas: &[f64], seed: u64) -> anyhow::Result<Vec<(f64, f64)>> {
    let x0 = &clips.frames;
    let cond = model.conditioning(x0, &clips.actions)?;
    let denoiser = model.denoiser();
    let mut rng = shared::rng::SplitMix64::new(seed);
    sigmas
        .iter()
        .map(|&sigma| {
            let eps = rng.normal_tensor(x0.shape(), x0.dtype(), x0.device())?;
            let x = (x0 + (eps * sigma)?)?;
            let d = denoiser.denoise(&x, &crate::denoiser::uniform_sigma(&x, sigma)?, &cond)?;
            Ok((sigma, psnr(&d, x0)?.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configs_validate_and_expect_exactly_what_training_saves() -> anyhow::Result<()> {
        for cfg in [WorldModelConfig::small(), WorldModelConfig::tiny()] {
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
