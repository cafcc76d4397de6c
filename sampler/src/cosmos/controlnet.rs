//! The Cosmos-Transfer2.5 ControlNet (diffusers' `CosmosControlNetModel`), written only with
//! differentiable ops, so that a gradient reaches the latents through it as well as through the
//! DiT it steers.
//!
//! Parameter names and the config follow diffusers (`controlnet/config.json` + safetensors of a
//! diffusers Transfer2.5 checkpoint). Parity: `tests/cosmos_controlnet_parity.rs` against
//! `tests/fixtures/make_cosmos_controlnet_fixture.py`; gradients: `tests/cosmos_controlnet_grad.rs`.
//!
//! Per forward:
//! 1. Control tokens: the control latents (a depth/edge/blur/segmentation video, VAE-encoded),
//!    zero-padded to `in_channels − 2` channels, ‖ the condition mask (zeros without one) ‖ the
//!    padding mask (nearest-resized, repeated over frames); patchified and embedded by
//!    `patch_embed` (no bias).
//! 2. Base tokens: the DiT's own input (latents ‖ condition mask ‖ padding mask,
//!    `latent_channels` in all) embedded by `patch_embed_base`, a copy of the DiT's patch
//!    embedding.
//! 3. Timestep, RoPE, learnable positional embedding, text-context and image-context projections:
//!    the DiT's, from copies of its weights (`time_embed`, `learnable_pos_embed`,
//!    `crossattn_proj`, `img_context_proj`).
//! 4. `n_controlnet_blocks` DiT blocks (`control_blocks.i`); block 0 starts from
//!    `before_proj(control) + base`; after each block i, `after_proj(x)` scaled by the i-th
//!    conditioning scale is control sample i — the residual the DiT adds after its block
//!    i·`controlnet_block_every_n` (`CosmosTransformer3DModel::forward_transfer`).
//!
//! The blocks, embeddings and projections are those of `cosmos::transformer`; [`MemoryMode`]
//! applies to the control blocks as to the DiT's (checkpointed blocks and sub-layers, tiled
//! attention), except `checkpoint_segments`: every control block's output is kept anyway (it is
//! the next block's input and `after_proj`'s), so segments would save nothing.

use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::transformer::{
    self, condition_mask_channel, context_mask, padding_mask_channel, patchify, positional_inputs, random_weights,
    timestep_per_frame, token_grid, Block, BlockInputs, ContextProjections, ForwardOptions, LearnablePosEmbed, Linear,
    LinearBias, MemoryMode, TimeEmbed,
};

/// diffusers' `CosmosControlNetModel` config (`controlnet/config.json`). Fields and defaults
/// match diffusers' constructor; extra keys (`_class_name`, `_diffusers_version`) are ignored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Config {
    pub n_controlnet_blocks: usize,
    /// Channels of the control input after padding: control latents (zero-padded to
    /// `in_channels − 2`) + condition mask + padding mask.
    pub in_channels: usize,
    /// Channels of the base input: latents + condition mask (when given) + padding mask.
    pub latent_channels: usize,
    /// Width of the tokens; must equal `num_attention_heads × attention_head_dim`.
    pub model_channels: usize,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub mlp_ratio: f64,
    /// Width of the cross-attention context (after `crossattn_proj`, when used).
    pub text_embed_dim: usize,
    pub adaln_lora_dim: usize,
    pub patch_size: [usize; 3],
    /// Largest latent (T, H, W) the positional tables cover, before patching.
    pub max_size: [usize; 3],
    /// RoPE NTK scale per axis (t, h, w).
    pub rope_scale: [f64; 3],
    /// `Some("learnable")` or `None`.
    pub extra_pos_embed_type: Option<String>,
    /// As the DiT's: > 0 adds `img_context_proj` and the image branch of every cross-attention.
    pub img_context_dim_in: Option<usize>,
    pub img_context_dim_out: usize,
    pub use_crossattn_projection: bool,
    pub crossattn_proj_in_channels: usize,
    pub encoder_hidden_states_channels: usize,
}

impl Default for Config {
    /// diffusers' constructor defaults.
    fn default() -> Self {
        Self {
            n_controlnet_blocks: 4,
            in_channels: 130,
            latent_channels: 18,
            model_channels: 2048,
            num_attention_heads: 32,
            attention_head_dim: 128,
            mlp_ratio: 4.0,
            text_embed_dim: 1024,
            adaln_lora_dim: 256,
            patch_size: [1, 2, 2],
            max_size: [128, 240, 240],
            rope_scale: [2.0, 1.0, 1.0],
            extra_pos_embed_type: None,
            img_context_dim_in: None,
            img_context_dim_out: 2048,
            use_crossattn_projection: false,
            crossattn_proj_in_channels: 1024,
            encoder_hidden_states_channels: 1024,
        }
    }
}

impl Config {
    /// Reads a diffusers `config.json`.
    pub fn from_json_file(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing {} as a Cosmos ControlNet config", path.display()))?;
        cfg.validate().with_context(|| format!("invalid Cosmos ControlNet config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Width of the text context `forward` takes.
    pub fn context_dim(&self) -> usize {
        self.block_config().context_dim()
    }

    /// Channels of the control latents before zero-padding: at most `in_channels − 2`.
    pub fn control_channels(&self) -> usize {
        self.in_channels.saturating_sub(2)
    }

    /// The same architecture as a DiT config, for the parts the ControlNet shares with the DiT
    /// (blocks, RoPE, positional table, timestep embedding, context projections).
    pub(crate) fn block_config(&self) -> transformer::Config {
        transformer::Config {
            in_channels: self.in_channels,
            out_channels: 1,
            num_attention_heads: self.num_attention_heads,
            attention_head_dim: self.attention_head_dim,
            num_layers: self.n_controlnet_blocks,
            mlp_ratio: self.mlp_ratio,
            text_embed_dim: self.text_embed_dim,
            adaln_lora_dim: self.adaln_lora_dim,
            max_size: self.max_size,
            patch_size: self.patch_size,
            rope_scale: self.rope_scale,
            concat_padding_mask: true,
            extra_pos_embed_type: self.extra_pos_embed_type.clone(),
            use_crossattn_projection: self.use_crossattn_projection,
            crossattn_proj_in_channels: self.crossattn_proj_in_channels,
            encoder_hidden_states_channels: self.encoder_hidden_states_channels,
            controlnet_block_every_n: None,
            img_context_dim_in: self.img_context_dim_in,
            img_context_num_tokens: 0,
            img_context_dim_out: self.img_context_dim_out,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.n_controlnet_blocks == 0 {
            bail!("cosmos controlnet config: n_controlnet_blocks must be at least 1")
        }
        if self.in_channels < 3 {
            bail!(
                "cosmos controlnet config: in_channels {} leaves no control channel (it counts the control latents, \
                 the condition mask and the padding mask)",
                self.in_channels
            )
        }
        if self.latent_channels < 2 {
            bail!(
                "cosmos controlnet config: latent_channels {} leaves no latent channel (it counts the latents, the \
                 condition mask and the padding mask)",
                self.latent_channels
            )
        }
        if self.model_channels != self.hidden_size() {
            bail!(
                "cosmos controlnet config: model_channels {} must equal num_attention_heads × attention_head_dim = {}",
                self.model_channels,
                self.hidden_size()
            )
        }
        self.block_config()
            .validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string().replace("cosmos config:", "cosmos controlnet config:")))
    }
}

/// diffusers' `conditioning_scale`: one scale for every control block, or one per block.
#[derive(Clone, Debug, PartialEq)]
pub enum ConditioningScale {
    All(f64),
    /// As diffusers' `_expand_conditioning_scale`: fewer scales than blocks are repeated
    /// cyclically, and scales beyond the blocks are unused.
    PerBlock(Vec<f64>),
}

impl Default for ConditioningScale {
    fn default() -> Self {
        Self::All(1.0)
    }
}

impl From<f64> for ConditioningScale {
    fn from(s: f64) -> Self {
        Self::All(s)
    }
}

impl ConditioningScale {
    /// One scale per block for `blocks` blocks. An empty list or a non-finite scale is refused
    /// (in diffusers an empty list silently yields no control samples).
    pub fn expand(&self, blocks: usize) -> Result<Vec<f64>> {
        let scales = match self {
            Self::All(s) => vec![*s; blocks],
            Self::PerBlock(list) if list.is_empty() => {
                bail!("cosmos controlnet forward: conditioning_scale is an empty list")
            }
            Self::PerBlock(list) => list.iter().copied().cycle().take(blocks).collect(),
        };
        if let Some(s) = scales.iter().find(|s| !s.is_finite()) {
            bail!("cosmos controlnet forward: conditioning_scale {s} is not finite")
        }
        Ok(scales)
    }
}

/// One `control_blocks.i`: a DiT block, with `before_proj` (block 0 only) and `after_proj`
/// (Linear with bias, zero-initialised in training).
#[derive(Clone, Debug)]
struct ControlBlock {
    block: Block,
    before_proj: Option<LinearBias>,
    after_proj: LinearBias,
}

/// diffusers' `CosmosControlNetModel`.
#[derive(Clone, Debug)]
pub struct CosmosControlNetModel {
    cfg: Config,
    /// `cfg` as a DiT config, for the shared helpers.
    block_cfg: transformer::Config,
    memory: MemoryMode,
    patch_embed: Linear,
    patch_embed_base: Linear,
    time_embed: TimeEmbed,
    learnable_pos_embed: Option<LearnablePosEmbed>,
    context_proj: ContextProjections,
    blocks: Vec<ControlBlock>,
}

impl CosmosControlNetModel {
    /// Builds the model from diffusers-named weights under `vb`.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let block_cfg = cfg.block_config();
        let hidden = cfg.hidden_size();
        let patch: usize = cfg.patch_size.iter().product();
        let learnable_pos_embed = if block_cfg.learnable_pos_embed()? {
            Some(LearnablePosEmbed::new(&block_cfg, vb.pp("learnable_pos_embed"))?)
        } else {
            None
        };
        let blocks = (0..cfg.n_controlnet_blocks)
            .map(|i| {
                let vb = vb.pp("control_blocks").pp(i);
                Ok(ControlBlock {
                    block: Block::new(&block_cfg, vb.clone())?,
                    before_proj: if i == 0 {
                        Some(LinearBias::new(hidden, hidden, vb.pp("before_proj"))?)
                    } else {
                        None
                    },
                    after_proj: LinearBias::new(hidden, hidden, vb.pp("after_proj"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            memory: MemoryMode::default(),
            patch_embed: Linear::new(cfg.in_channels * patch, hidden, vb.pp("patch_embed.proj"))?,
            patch_embed_base: Linear::new(cfg.latent_channels * patch, hidden, vb.pp("patch_embed_base.proj"))?,
            time_embed: TimeEmbed::new(hidden, vb.pp("time_embed"))?,
            learnable_pos_embed,
            context_proj: ContextProjections::new(&block_cfg, vb.clone())?,
            blocks,
            cfg: cfg.clone(),
            block_cfg,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A model with every weight random and non-zero (the rule of
    /// `CosmosTransformer3DModel::random`), for benchmarks and memory measurements.
    pub fn random(cfg: &Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let recorder = shared::weights::ShapeRecorder::new();
        Self::new(cfg, recorder.var_builder(dtype, device))?;
        Self::new(cfg, random_weights(&recorder, seed, dtype, device)?)
    }

    /// Checkpointed blocks and sub-layers and tiled attention (see [`MemoryMode`];
    /// `checkpoint_segments` has no effect here, see the module notes). Off by default.
    pub fn set_memory_mode(&mut self, mode: MemoryMode) -> Result<()> {
        mode.validate()?;
        self.memory = mode;
        Ok(())
    }

    pub fn memory_mode(&self) -> MemoryMode {
        self.memory
    }

    /// As `CosmosTransformer3DModel::set_candle_matmul`.
    pub fn set_candle_matmul(&mut self, enabled: bool) {
        let mut linears: Vec<&mut Linear> = vec![&mut self.patch_embed, &mut self.patch_embed_base];
        linears.extend(self.time_embed.linears_mut());
        linears.extend(self.context_proj.linears_mut());
        for b in &mut self.blocks {
            linears.extend(b.block.linears_mut());
            if let Some(p) = &mut b.before_proj {
                linears.push(&mut p.linear);
            }
            linears.push(&mut b.after_proj.linear);
        }
        for l in linears {
            l.candle_matmul = enabled;
        }
    }

    /// The control samples: one (B, N, D) tensor per control block (N = T'·H'·W' tokens), each
    /// `after_proj` of the block's output times its conditioning scale — diffusers'
    /// `control_block_samples`, for `TransferInputs::block_controlnet_hidden_states`.
    ///
    /// * `controls_latents`: (B, Cc, T, H, W), Cc ≤ `in_channels − 2` (zero-padded to it).
    /// * `latents`: (B, C, T, H, W), the DiT's input latents; C + 1 (condition mask, when given)
    ///   + 1 (padding mask) = `latent_channels`.
    /// * `timestep`: (B) or (B, T) / (B, 1, T, 1, 1), as the DiT's.
    /// * `encoder_hidden_states`: (B, L, `context_dim()`), the text context.
    /// * `img_context`: (B, Li, `img_context_dim_in`), only for a model with an image context.
    /// * `condition_mask`: (B, 1, T, H, W); also a channel of the control input (zeros if `None`).
    /// * `padding_mask`: (B or 1, 1, H', W'), required (diffusers always concatenates it).
    /// * `opts`: frame rate for RoPE; a context mask (refused with an image context).
    ///
    /// Inputs are cast to the weights' dtype; the samples are in it.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        controls_latents: &Tensor,
        latents: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        img_context: Option<&Tensor>,
        condition_mask: Option<&Tensor>,
        conditioning_scale: &ConditioningScale,
        padding_mask: &Tensor,
        opts: &ForwardOptions,
    ) -> Result<Vec<Tensor>> {
        const WHO: &str = "cosmos controlnet forward";
        let cfg = &self.cfg;
        let dtype = self.patch_embed.weight.dtype();
        let device = controls_latents.device();
        let (b, cc, t, h, w) = controls_latents.dims5()?;
        let (lb, lc, lt, lh, lw) = latents.dims5()?;
        if (lb, lt, lh, lw) != (b, t, h, w) {
            bail!(
                "{WHO}: latents have shape {:?} but the control latents {:?}; batch, frames, height and width must \
                 agree",
                latents.dims(),
                controls_latents.dims()
            )
        }
        let scales = conditioning_scale.expand(self.blocks.len())?;
        let bthw = [b, t, h, w];

        // 1. Control input: latents ‖ zeros up to in_channels − 2 ‖ condition mask or zeros ‖
        //    padding mask.
        let want = cfg.control_channels();
        if cc > want {
            bail!("{WHO}: {cc} control channels, but the model takes at most in_channels − 2 = {want}")
        }
        let mut parts = vec![controls_latents.to_dtype(dtype)?];
        if cc < want {
            parts.push(Tensor::zeros((b, want - cc, t, h, w), dtype, device)?);
        }
        parts.push(match condition_mask {
            Some(cm) => condition_mask_channel(WHO, cm, bthw, dtype)?,
            None => Tensor::zeros((b, 1, t, h, w), dtype, device)?,
        });
        let pm = padding_mask_channel(WHO, padding_mask, bthw, dtype)?;
        parts.push(pm.clone());
        let control = Tensor::cat(&parts, 1)?;

        // 2. Base input, as the DiT's.
        let mut parts = vec![latents.to_dtype(dtype)?];
        if let Some(cm) = condition_mask {
            parts.push(condition_mask_channel(WHO, cm, bthw, dtype)?);
        }
        parts.push(pm);
        let base = Tensor::cat(&parts, 1)?;
        if base.dim(1)? != cfg.latent_channels {
            bail!(
                "{WHO}: {lc} latent channels{} + 1 padding-mask channel, but the model has latent_channels = {}",
                if condition_mask.is_some() { " + 1 condition-mask channel" } else { "" },
                cfg.latent_channels
            )
        }

        // 3. Positions, tokens, timestep, contexts.
        let grid = token_grid(WHO, &self.block_cfg, [t, h, w])?;
        let (rope, extra_pos_emb) =
            positional_inputs(WHO, &self.block_cfg, self.learnable_pos_embed.as_ref(), grid, opts.fps, dtype, device)?;
        let x = self.patch_embed.forward(&patchify(&control, cfg.patch_size, grid)?)?;
        let base = self.patch_embed_base.forward(&patchify(&base, cfg.patch_size, grid)?)?;
        let timestep = timestep_per_frame(WHO, &self.block_cfg, timestep, b, t)?;
        let (embedded_timestep, temb) = self.time_embed.forward(&timestep, dtype)?;
        let (context, img_context) =
            self.context_proj.forward(WHO, &self.block_cfg, encoder_hidden_states, img_context, b, dtype)?;
        let context_mask =
            context_mask(WHO, opts.context_mask.as_ref(), b, context.dim(1)?, img_context.is_some(), dtype)?;

        // 4. Control blocks.
        let inputs = BlockInputs {
            embedded_timestep,
            temb,
            rope,
            extra_pos_emb,
            context,
            context_mask,
            img_context,
            attention_tile: self.memory.attention_tile,
            checkpoint_sublayers: self.memory.checkpoint_sublayers,
        };
        if self.memory.checkpoint_blocks || self.memory.checkpoint_sublayers {
            inputs.ensure_constant()?;
        }
        let inputs = Arc::new(inputs);
        let mut x = x;
        let mut samples = Vec::with_capacity(self.blocks.len());
        for (cb, scale) in self.blocks.iter().zip(scales) {
            // Outside any checkpoint: the base tokens carry the latents' gradient.
            if let Some(p) = &cb.before_proj {
                x = (p.forward(&x)? + &base)?;
            }
            x = cb.block.forward_maybe_checkpointed(&x, &inputs, self.memory.checkpoint_blocks)?;
            samples.push((cb.after_proj.forward(&x)? * scale)?);
        }
        Ok(samples)
    }
}
