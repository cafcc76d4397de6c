//! The Cosmos diffusion transformer (NVIDIA's `MiniTrainDIT`, as ported to diffusers'
//! `CosmosTransformer3DModel`), written only with differentiable ops.
//!
//! Parameter names and the config follow diffusers, so a diffusers checkpoint directory
//! (`transformer/config.json` + safetensors) loads unchanged. Parity with diffusers is proven by
//! `tests/cosmos_parity.rs` against a fixture made by `tests/fixtures/make_cosmos_fixture.py`,
//! and the input gradient by finite differences in `tests/cosmos_grad.rs`; the Transfer2.5
//! features (image context, ControlNet residuals) by `tests/cosmos_controlnet_parity.rs` and
//! `tests/cosmos_controlnet_grad.rs`.
//!
//! Architecture, per forward:
//! 1. Channels: latent ‖ condition mask (if given; counted in `in_channels`) ‖ padding mask
//!    (nearest-resized to the latent grid, repeated over frames; not counted in `in_channels`).
//! 2. Patchify (p_t, p_h, p_w) and a bias-free linear patch embedding; tokens are t-major.
//! 3. Timestep: sinusoid (cos first) → `temb` = linear–SiLU–linear (3·D, the AdaLN-LoRA base) and
//!    `embedded_timestep` = RMSNorm(sinusoid). One timestep per sample or per latent frame.
//! 4. Blocks: (+ learnable pos. embedding) → AdaLN-zero → self-attention with per-head RMSNorm on
//!    q, k and 3D RoPE → AdaLN-zero → cross-attention → AdaLN-zero → GELU(erf) MLP; each branch
//!    gated. AdaLN-LoRA: shift/scale/gate = W₂·W₁·SiLU(embedded_timestep) + temb.
//!    Transfer2.5 (`img_context_dim_in`): the cross-attention adds an attention over the
//!    projected image context (own q/k/v, RMS-normed q and k) to the text attention before its
//!    output projection; the ControlNet's i-th residual is added after block
//!    i·`controlnet_block_every_n` ([`TransferInputs`], `cosmos::controlnet`).
//! 5. Final AdaLN (shift, scale), linear to patch·C_out, unpatchify.
//!
//! Candle's fused kernels drop gradients (see `shared::ops`), so norms, softmax and RoPE come
//! from `shared::ops`. Weights are plain tensors from the `VarBuilder`: backpropagating to the
//! input latent records no weight gradients.
//!
//! [`MemoryMode`] (off by default) puts each block under `shared::ops::checkpoint` and the
//! attention through `shared::ops::sdpa_tiled`, so that a backward holds the block inputs and one
//! block's graph, and no tokens × tokens matrix; `cosmos::memory_plan` sizes what that needs.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, MetalStorage, Result, Shape, Storage, Tensor, D,
};
use std::sync::Arc;

use candle_nn::VarBuilder;
use shared::ops;

/// diffusers' `CosmosTransformer3DModel` config (`transformer/config.json`). Fields and defaults
/// match diffusers; extra keys of a real config.json (`_class_name`, `_diffusers_version`) are
/// ignored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Config {
    /// Latent channels, plus one when a condition mask is concatenated (Video2World models).
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub num_layers: usize,
    pub mlp_ratio: f64,
    /// Width of the cross-attention context (text embeddings or embedded actions).
    pub text_embed_dim: usize,
    pub adaln_lora_dim: usize,
    /// Largest latent (T, H, W) the positional tables cover, before patching.
    pub max_size: [usize; 3],
    pub patch_size: [usize; 3],
    /// RoPE NTK scale per axis (t, h, w).
    pub rope_scale: [f64; 3],
    pub concat_padding_mask: bool,
    /// `Some("learnable")` or `None`.
    pub extra_pos_embed_type: Option<String>,
    /// Cosmos-Predict2.5: the context first goes through Linear(+bias)–GELU from
    /// `crossattn_proj_in_channels` to `encoder_hidden_states_channels` (= `text_embed_dim`).
    pub use_crossattn_projection: bool,
    pub crossattn_proj_in_channels: usize,
    pub encoder_hidden_states_channels: usize,
    /// Cosmos-Transfer2.5: the ControlNet's residuals are added after blocks 0, n, 2n, … (the
    /// i-th residual after block i·n). Needed only when residuals are passed.
    pub controlnet_block_every_n: Option<usize>,
    /// Cosmos-Transfer2.5 image context: a value > 0 is the width of the image-context tokens,
    /// which go through Linear(+bias)–GELU to `img_context_dim_out` (= the hidden size) and feed
    /// a second, image branch of every cross-attention (`attn2.{q,k,v}_img`, with RMS-normed
    /// q and k).
    pub img_context_dim_in: Option<usize>,
    /// Tokens of the image context the pipelines pass (not a weight shape; not used by the model).
    pub img_context_num_tokens: usize,
    pub img_context_dim_out: usize,
}

impl Default for Config {
    /// diffusers' constructor defaults.
    fn default() -> Self {
        Self {
            in_channels: 16,
            out_channels: 16,
            num_attention_heads: 32,
            attention_head_dim: 128,
            num_layers: 28,
            mlp_ratio: 4.0,
            text_embed_dim: 1024,
            adaln_lora_dim: 256,
            max_size: [128, 240, 240],
            patch_size: [1, 2, 2],
            rope_scale: [2.0, 1.0, 1.0],
            concat_padding_mask: true,
            extra_pos_embed_type: Some("learnable".into()),
            use_crossattn_projection: false,
            crossattn_proj_in_channels: 1024,
            encoder_hidden_states_channels: 1024,
            controlnet_block_every_n: None,
            img_context_dim_in: None,
            img_context_num_tokens: 256,
            img_context_dim_out: 2048,
        }
    }
}

impl Config {
    /// Reads a diffusers `config.json`.
    pub fn from_json_file(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self =
            serde_json::from_str(&text).with_context(|| format!("parsing {} as a Cosmos config", path.display()))?;
        cfg.validate().with_context(|| format!("invalid Cosmos config {}", path.display()))?;
        Ok(cfg)
    }

    /// Width of the context `forward` takes.
    pub fn context_dim(&self) -> usize {
        if self.use_crossattn_projection {
            self.crossattn_proj_in_channels
        } else {
            self.text_embed_dim
        }
    }

    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// diffusers computes `int(hidden · mlp_ratio)` (truncation).
    pub fn mlp_hidden_size(&self) -> usize {
        (self.hidden_size() as f64 * self.mlp_ratio) as usize
    }

    /// Per-head RoPE split (t, h, w): h and w get ⌊d/6⌋·2 each, t the rest (128 → 44/42/42).
    pub fn rope_dims(&self) -> (usize, usize, usize) {
        let d = self.attention_head_dim;
        let dh = d / 6 * 2;
        (d - 2 * dh, dh, dh)
    }

    /// Whether the model has the Transfer2.5 image context (`img_context_dim_in` > 0).
    pub fn img_context(&self) -> bool {
        self.img_context_dim_in.is_some_and(|d| d > 0)
    }

    /// Injection points of the ControlNet residuals: blocks 0, n, 2n, … below `num_layers`
    /// (n = `controlnet_block_every_n`), as many as residuals are needed.
    pub fn controlnet_blocks(&self) -> Result<Vec<usize>> {
        match self.controlnet_block_every_n {
            Some(n) if n > 0 => Ok((0..self.num_layers).step_by(n).collect()),
            Some(_) => bail!("cosmos config: controlnet_block_every_n must be at least 1"),
            None => {
                bail!("cosmos config: controlnet_block_every_n is unset, so the model takes no ControlNet residuals")
            }
        }
    }

    pub(crate) fn learnable_pos_embed(&self) -> Result<bool> {
        match self.extra_pos_embed_type.as_deref() {
            None => Ok(false),
            Some("learnable") => Ok(true),
            Some(other) => bail!("cosmos config: extra_pos_embed_type {other:?} unsupported (None or \"learnable\")"),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let (dt, dh, dw) = self.rope_dims();
        if self.attention_head_dim & 1 == 1 || dt <= 2 || dh <= 2 || dw <= 2 {
            // The NTK factor divides by (dim − 2), and RoPE needs even per-axis dims: h and w
            // (⌊d/6⌋·2) are even by construction, so t = d − h − w is even exactly when d is.
            bail!(
                "cosmos config: attention_head_dim {} gives RoPE dims t/h/w = {dt}/{dh}/{dw}; each must be even and > 2",
                self.attention_head_dim
            )
        }
        if self.patch_size.contains(&0) {
            bail!("cosmos config: patch_size {:?} has a zero", self.patch_size)
        }
        for (axis, (&m, &p)) in ["t", "h", "w"].iter().zip(self.max_size.iter().zip(&self.patch_size)) {
            if m < p {
                bail!("cosmos config: max_size {axis} = {m} is smaller than its patch size {p}")
            }
        }
        if self.num_attention_heads == 0 || self.in_channels == 0 || self.out_channels == 0 {
            bail!("cosmos config: heads, in_channels and out_channels must be positive")
        }
        if self.controlnet_block_every_n == Some(0) {
            bail!("cosmos config: controlnet_block_every_n must be at least 1 (or null)")
        }
        if self.img_context() && self.img_context_dim_out != self.hidden_size() {
            // The image keys/values are Linear(hidden → hidden) of the projected image context.
            bail!(
                "cosmos config: img_context_dim_out {} must equal the hidden size num_attention_heads × \
                 attention_head_dim = {} (the image-context keys and values project from it)",
                self.img_context_dim_out,
                self.hidden_size()
            )
        }
        if self.use_crossattn_projection && self.encoder_hidden_states_channels != self.text_embed_dim {
            bail!(
                "cosmos config: crossattn projection outputs {} channels but cross-attention takes text_embed_dim = {}",
                self.encoder_hidden_states_channels,
                self.text_embed_dim
            )
        }
        self.learnable_pos_embed()?;
        Ok(())
    }
}

/// Bias-free linear layer on the last dimension of any-rank input (diffusers' Cosmos has no
/// biases anywhere).
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    /// (out, in), PyTorch layout.
    pub(crate) weight: Tensor,
    /// Use Candle's matmul even for a frozen weight (see [`CosmosTransformer3DModel::set_candle_matmul`]).
    pub(crate) candle_matmul: bool,
}

impl Linear {
    pub(crate) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get((out_dim, in_dim), "weight")?, candle_matmul: false })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(0);
        let rows: usize = dims.iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let y = if self.weight.track_op() || self.candle_matmul {
            // A weight that depends on a Var (is trained): the ordinary matmul, whose backward
            // also gives the weight its gradient.
            x2.matmul(&self.weight.t()?)?
        } else {
            x2.contiguous()?
                .apply_op1_arc(std::sync::Arc::new(Box::new(FrozenMatmul { weight: self.weight.clone() })))?
        };
        dims.push(self.weight.dim(0)?);
        y.reshape(dims)
    }
}

/// Linear layer with a bias (`nn.Linear` defaults): the Predict2.5/Transfer2.5 context
/// projections and the ControlNet's `before_proj`/`after_proj`.
#[derive(Clone, Debug)]
pub(crate) struct LinearBias {
    pub(crate) linear: Linear,
    bias: Tensor,
}

impl LinearBias {
    pub(crate) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { linear: Linear::new(in_dim, out_dim, vb.clone())?, bias: vb.get(out_dim, "bias")? })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear.forward(x)?.broadcast_add(&self.bias)
    }
}

/// y = x·Wᵀ for a frozen weight W (out, in). Candle's own matmul backward computes the
/// gradient of *both* operands, so a frozen weight held as a plain tensor still costs a
/// (in × out) product and a stored gradient per linear layer on every backward; this op's
/// backward returns the input gradient only. Same kernels as `Tensor::matmul` in the forward.
struct FrozenMatmul {
    weight: Tensor,
}

impl FrozenMatmul {
    fn fwd<S: BackendStorage>(&self, x: &S, x_layout: &Layout, w: &S, w_layout: &Layout) -> Result<(S, Shape)> {
        let (rows, k) = x_layout.shape().dims2()?;
        let (n, wk) = w_layout.shape().dims2()?;
        if k != wk {
            bail!("frozen matmul: input has {k} features, the weight expects {wk}")
        }
        let y = x.matmul(w, (1, rows, n, k), x_layout, &w_layout.transpose(0, 1)?)?;
        Ok((y, Shape::from((rows, n))))
    }

    fn mismatch(&self, input_device: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "frozen matmul: input on {input_device}, weight on {:?}",
            self.weight.device().location()
        ))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (storage, w_layout) = self.weight.storage_and_layout();
        match &*storage {
            Storage::Cpu(w) => self.fwd(x, layout, w, w_layout),
            _ => Err(self.mismatch("cpu")),
        }
    }

    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (storage, w_layout) = self.weight.storage_and_layout();
        match &*storage {
            Storage::Cuda(w) => self.fwd(x, layout, w, w_layout),
            _ => Err(self.mismatch("cuda")),
        }
    }

    fn metal_fwd(&self, x: &MetalStorage, layout: &Layout) -> Result<(MetalStorage, Shape)> {
        let (storage, w_layout) = self.weight.storage_and_layout();
        match &*storage {
            Storage::Metal(w) => self.fwd(x, layout, w, w_layout),
            _ => Err(self.mismatch("metal")),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.weight)?))
    }
}

/// AdaLN-LoRA modulation producing `n_chunks` vectors (shift, scale[, gate]) of width D from
/// W₂·W₁·SiLU(embedded_timestep) + temb[.., :n_chunks·D].
#[derive(Clone, Debug)]
pub(crate) struct AdaLnLora {
    pub(crate) linear_1: Linear,
    pub(crate) linear_2: Linear,
    n_chunks: usize,
    hidden: usize,
}

impl AdaLnLora {
    fn new(hidden: usize, lora: usize, n_chunks: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(hidden, lora, vb.pp("linear_1"))?,
            linear_2: Linear::new(lora, n_chunks * hidden, vb.pp("linear_2"))?,
            n_chunks,
            hidden,
        })
    }

    /// `embedded_timestep` (B, F, D), `temb` (B, F, 3D) → `n_chunks` tensors (B, F, 1, D), ready
    /// to broadcast over the tokens of each frame group.
    fn chunks(&self, embedded_timestep: &Tensor, temb: &Tensor) -> Result<Vec<Tensor>> {
        let m = self.linear_2.forward(&self.linear_1.forward(&ops::silu(embedded_timestep)?)?)?;
        let m = (m + temb.narrow(D::Minus1, 0, self.n_chunks * self.hidden)?)?;
        (0..self.n_chunks).map(|i| m.narrow(D::Minus1, i * self.hidden, self.hidden)?.unsqueeze(2)).collect()
    }
}

/// Layer norm without affine parameters (eps 1e-6), then x·(1 + scale) + shift per frame group.
/// `x`: (B, N, D) with N = F·(N/F); `shift`, `scale`: (B, F, 1, D).
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    let groups = shift.dim(1)?;
    let normed = ops::layer_norm(x, None, None, NORM_EPS)?.reshape((b, groups, n / groups, d))?;
    // Constant scale and shift (from the timestep) in the z0 optimisation: `scale_shift` keeps no
    // gradient for them.
    ops::scale_shift(&normed, Some(&(scale + 1.0)?), Some(shift))?.reshape((b, n, d))
}

/// x + gate·branch, gate (B, F, 1, D) broadcast per frame group.
fn gated_residual(x: &Tensor, gate: &Tensor, branch: &Tensor) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    let groups = gate.dim(1)?;
    let gated = ops::scale_shift(&branch.reshape((b, groups, n / groups, d))?, Some(gate), None)?.reshape((b, n, d))?;
    x + gated
}

/// eps of every LayerNorm and of the timestep RMSNorm in diffusers' Cosmos.
const NORM_EPS: f64 = 1e-6;
/// diffusers' `Attention` default eps, used by its q/k RMSNorms (`qk_norm="rms_norm"`).
const QK_NORM_EPS: f64 = 1e-5;
/// Frame rate the temporal RoPE positions are expressed in (diffusers' `base_fps`).
const ROPE_BASE_FPS: f64 = 24.0;
const ROPE_THETA: f64 = 10000.0;

/// diffusers `Attention` with `CosmosAttnProcessor2_0`: bias-free q/k/v/out projections,
/// per-head RMSNorm (with weight) on q and k, optional RoPE. With `img` (Transfer2.5's
/// `CosmosAttention` + `CosmosAttnProcessor2_5`), a second attention of the same queries' own
/// projection over the image context is added to the text attention before `to_out`.
#[derive(Clone, Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
    img: Option<ImageAttention>,
    heads: usize,
    head_dim: usize,
}

/// The image branch of Transfer2.5's cross-attention: `q_img` from the tokens, `k_img`/`v_img`
/// from the projected image context (both hidden-wide), per-head RMSNorm (eps 1e-6, unlike the
/// text branch's 1e-5) on q and k, no RoPE, no mask.
#[derive(Clone, Debug)]
struct ImageAttention {
    q_img: Linear,
    k_img: Linear,
    v_img: Linear,
    q_img_norm: Tensor,
    k_img_norm: Tensor,
}

impl Attention {
    fn new(
        hidden: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        img_context: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let img = if img_context {
            Some(ImageAttention {
                q_img: Linear::new(hidden, inner, vb.pp("q_img"))?,
                k_img: Linear::new(hidden, inner, vb.pp("k_img"))?,
                v_img: Linear::new(hidden, inner, vb.pp("v_img"))?,
                q_img_norm: vb.pp("q_img_norm").get(head_dim, "weight")?,
                k_img_norm: vb.pp("k_img_norm").get(head_dim, "weight")?,
            })
        } else {
            None
        };
        Ok(Self {
            to_q: Linear::new(hidden, inner, vb.pp("to_q"))?,
            to_k: Linear::new(context_dim, inner, vb.pp("to_k"))?,
            to_v: Linear::new(context_dim, inner, vb.pp("to_v"))?,
            to_out: Linear::new(inner, hidden, vb.pp("to_out").pp("0"))?,
            norm_q: vb.pp("norm_q").get(head_dim, "weight")?,
            norm_k: vb.pp("norm_k").get(head_dim, "weight")?,
            img,
            heads,
            head_dim,
        })
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut l = vec![&mut self.to_q, &mut self.to_k, &mut self.to_v, &mut self.to_out];
        if let Some(img) = &mut self.img {
            l.extend([&mut img.q_img, &mut img.k_img, &mut img.v_img]);
        }
        l
    }

    /// (B, S, heads·hd) → (B, heads, S, hd).
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        x.reshape((b, s, self.heads, self.head_dim))?.transpose(1, 2)
    }

    /// (B, heads, N, hd) → (B, N, heads·hd).
    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, n, _) = x.dims4()?;
        x.transpose(1, 2)?.reshape((b, n, self.heads * self.head_dim))
    }

    /// `x` (B, N, D); `context` (B, L, Dc) for cross-attention, `None` for self-attention;
    /// `rope` = (cos, sin) of shape (N, hd/2); `mask` additive, broadcastable to (B, h, N, L);
    /// `img_context` (B, Li, D), the projected image context, for the image branch.
    fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        rope: Option<&(Tensor, Tensor)>,
        mask: Option<&Tensor>,
        tile: Option<usize>,
        img_context: Option<&Tensor>,
    ) -> Result<Tensor> {
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>| match tile {
            Some(tile) => ops::sdpa_tiled(q, k, v, mask, None, tile),
            None => ops::sdpa(q, k, v, mask, None),
        };
        let kv_source = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(kv_source)?)?;
        let v = self.split_heads(&self.to_v.forward(kv_source)?)?;
        let mut q = ops::rms_norm(&q, Some(&self.norm_q), QK_NORM_EPS)?;
        let mut k = ops::rms_norm(&k, Some(&self.norm_k), QK_NORM_EPS)?;
        if let Some((cos, sin)) = rope {
            q = ops::rope_half(&q, cos, sin)?;
            k = ops::rope_half(&k, cos, sin)?;
        }
        let mut out = self.merge_heads(&attend(&q, &k, &v, mask)?)?;
        match (&self.img, img_context) {
            (Some(img), Some(ctx)) => {
                let q = self.split_heads(&img.q_img.forward(x)?)?;
                let k = self.split_heads(&img.k_img.forward(ctx)?)?;
                let v = self.split_heads(&img.v_img.forward(ctx)?)?;
                let q = ops::rms_norm(&q, Some(&img.q_img_norm), NORM_EPS)?;
                let k = ops::rms_norm(&k, Some(&img.k_img_norm), NORM_EPS)?;
                out = (out + self.merge_heads(&attend(&q, &k, &v, None)?)?)?;
            }
            (None, Some(_)) => bail!("cosmos attention: an image context was given to a layer without an image branch"),
            // An image branch without an image context: the text attention alone, as diffusers'
            // processor with `(text, None)`.
            (_, None) => {}
        }
        self.to_out.forward(&out)
    }
}

/// One `CosmosTransformerBlock` (without the ControlNet's `before_proj`/`after_proj`, which
/// `cosmos::controlnet` applies around it).
#[derive(Clone, Debug)]
pub(crate) struct Block {
    norm1: AdaLnLora,
    attn1: Attention,
    norm2: AdaLnLora,
    attn2: Attention,
    norm3: AdaLnLora,
    ff_in: Linear,
    ff_out: Linear,
}

impl Block {
    /// The block of a model with config `cfg` (its width, heads, context width, MLP, and whether
    /// the cross-attention has the image branch, `cfg.img_context()`).
    pub(crate) fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let hidden = cfg.hidden_size();
        let (heads, hd, lora) = (cfg.num_attention_heads, cfg.attention_head_dim, cfg.adaln_lora_dim);
        Ok(Self {
            norm1: AdaLnLora::new(hidden, lora, 3, vb.pp("norm1"))?,
            attn1: Attention::new(hidden, hidden, heads, hd, false, vb.pp("attn1"))?,
            norm2: AdaLnLora::new(hidden, lora, 3, vb.pp("norm2"))?,
            attn2: Attention::new(hidden, cfg.text_embed_dim, heads, hd, cfg.img_context(), vb.pp("attn2"))?,
            norm3: AdaLnLora::new(hidden, lora, 3, vb.pp("norm3"))?,
            ff_in: Linear::new(hidden, cfg.mlp_hidden_size(), vb.pp("ff.net.0.proj"))?,
            ff_out: Linear::new(cfg.mlp_hidden_size(), hidden, vb.pp("ff.net.2"))?,
        })
    }

    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut l = Vec::new();
        for norm in [&mut self.norm1, &mut self.norm2, &mut self.norm3] {
            l.extend([&mut norm.linear_1, &mut norm.linear_2]);
        }
        l.extend(self.attn1.linears_mut());
        l.extend(self.attn2.linears_mut());
        l.extend([&mut self.ff_in, &mut self.ff_out]);
        l
    }

    /// The block: its three residual sub-layers in turn, each under `shared::ops::checkpoint`
    /// when `cond.checkpoint_sublayers` (nested inside a checkpointed block, a block's
    /// recomputation then keeps the sub-layers' inputs and one sub-layer's graph at a time).
    pub(crate) fn forward(&self, x: &Tensor, cond: &Arc<BlockInputs>) -> Result<Tensor> {
        let mut x = x.clone();
        for part in [SubLayer::SelfAttention, SubLayer::CrossAttention, SubLayer::Mlp] {
            x = if cond.checkpoint_sublayers {
                let (block, cond) = (self.clone(), cond.clone());
                ops::checkpoint(&x, move |x| block.sublayer(part, x, &cond))?
            } else {
                self.sublayer(part, &x, cond)?
            };
        }
        Ok(x)
    }

    /// [`Self::forward`] under `shared::ops::checkpoint` when `checkpointed`.
    pub(crate) fn forward_maybe_checkpointed(
        &self,
        x: &Tensor,
        cond: &Arc<BlockInputs>,
        checkpointed: bool,
    ) -> Result<Tensor> {
        if checkpointed {
            let (block, cond) = (self.clone(), cond.clone());
            ops::checkpoint(x, move |x| block.forward(x, &cond))
        } else {
            self.forward(x, cond)
        }
    }

    /// x + gate · branch(AdaLN(x)) for one of the three branches.
    fn sublayer(&self, part: SubLayer, x: &Tensor, cond: &BlockInputs) -> Result<Tensor> {
        let (et, temb) = (&cond.embedded_timestep, &cond.temb);
        match part {
            SubLayer::SelfAttention => {
                // diffusers adds the (normalised) learnable positional embedding at the start of
                // every block, not once after the patch embedding.
                let x = match &cond.extra_pos_emb {
                    Some(p) => x.broadcast_add(p)?,
                    None => x.clone(),
                };
                let m = self.norm1.chunks(et, temb)?;
                let h = self.attn1.forward(
                    &modulate(&x, &m[0], &m[1])?,
                    None,
                    Some(&cond.rope),
                    None,
                    cond.attention_tile,
                    None,
                )?;
                gated_residual(&x, &m[2], &h)
            }
            SubLayer::CrossAttention => {
                let m = self.norm2.chunks(et, temb)?;
                let h = self.attn2.forward(
                    &modulate(x, &m[0], &m[1])?,
                    Some(&cond.context),
                    None,
                    cond.context_mask.as_ref(),
                    cond.attention_tile,
                    cond.img_context.as_ref(),
                )?;
                gated_residual(x, &m[2], &h)
            }
            SubLayer::Mlp => {
                let m = self.norm3.chunks(et, temb)?;
                let h = self.ff_out.forward(&ops::gelu_erf(&self.ff_in.forward(&modulate(x, &m[0], &m[1])?)?)?)?;
                gated_residual(x, &m[2], &h)
            }
        }
    }
}

/// The residual branches of a block.
#[derive(Clone, Copy, Debug)]
enum SubLayer {
    SelfAttention,
    CrossAttention,
    Mlp,
}

/// What every block receives besides the tokens.
#[derive(Clone)]
pub(crate) struct BlockInputs {
    /// (B, F, D), F = 1 or the number of latent frames.
    pub(crate) embedded_timestep: Tensor,
    /// (B, F, 3D).
    pub(crate) temb: Tensor,
    /// cos, sin: (N, hd/2).
    pub(crate) rope: (Tensor, Tensor),
    /// (1, N, D).
    pub(crate) extra_pos_emb: Option<Tensor>,
    pub(crate) context: Tensor,
    /// Additive, (B, 1, 1, L).
    pub(crate) context_mask: Option<Tensor>,
    /// The projected image context (B, Li, D), Transfer2.5.
    pub(crate) img_context: Option<Tensor>,
    /// Query/key tile of `sdpa_tiled`, or `None` for `sdpa`.
    pub(crate) attention_tile: Option<usize>,
    /// Each residual branch under `shared::ops::checkpoint`.
    pub(crate) checkpoint_sublayers: bool,
}

impl BlockInputs {
    /// Under block checkpointing only the tokens are differentiated (`shared::ops::checkpoint`
    /// refuses captured inputs that carry a gradient): names the first input that does. In the
    /// z0 optimisation none does — the timestep comes from σ (a constant of the schedule), RoPE
    /// and the positional embedding from the grid and frozen weights, the context from the prompt.
    pub(crate) fn ensure_constant(&self) -> Result<()> {
        let named = [
            ("the embedded timestep", Some(&self.embedded_timestep)),
            ("the timestep embedding (temb)", Some(&self.temb)),
            ("the RoPE cosines", Some(&self.rope.0)),
            ("the RoPE sines", Some(&self.rope.1)),
            ("the learnable positional embedding", self.extra_pos_emb.as_ref()),
            ("the context (encoder_hidden_states)", Some(&self.context)),
            ("the context mask", self.context_mask.as_ref()),
            ("the image context", self.img_context.as_ref()),
        ];
        if let Some((name, _)) = named.iter().find(|(_, t)| t.is_some_and(Tensor::track_op)) {
            bail!(
                "cosmos forward: block checkpointing differentiates the tokens only, but {name} carries a gradient \
                 (a trainable weight or an optimised input); turn checkpointing off (MemoryMode::checkpoint_blocks) \
                 to differentiate it"
            )
        }
        Ok(())
    }
}

/// diffusers' `CosmosLearnablePositionalEmbed`: per-axis tables summed, then divided by
/// (eps + ‖e‖₂/√D), i.e. normalised to unit RMS.
#[derive(Clone, Debug)]
pub(crate) struct LearnablePosEmbed {
    pos_emb_t: Tensor,
    pos_emb_h: Tensor,
    pos_emb_w: Tensor,
}

impl LearnablePosEmbed {
    pub(crate) fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let hidden = cfg.hidden_size();
        let [mt, mh, mw] = max_grid(cfg);
        Ok(Self {
            pos_emb_t: vb.get((mt, hidden), "pos_emb_t")?,
            pos_emb_h: vb.get((mh, hidden), "pos_emb_h")?,
            pos_emb_w: vb.get((mw, hidden), "pos_emb_w")?,
        })
    }

    /// (1, t·h·w, D), tokens t-major.
    pub(crate) fn forward(&self, grid: [usize; 3]) -> Result<Tensor> {
        let [nt, nh, nw] = grid;
        let d = self.pos_emb_t.dim(1)?;
        // diffusers keeps this module in f32 (`_keep_in_fp32_modules`).
        let internal = match self.pos_emb_t.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        };
        let t = self.pos_emb_t.narrow(0, 0, nt)?.to_dtype(internal)?.reshape((nt, 1, 1, d))?;
        let h = self.pos_emb_h.narrow(0, 0, nh)?.to_dtype(internal)?.reshape((1, nh, 1, d))?;
        let w = self.pos_emb_w.narrow(0, 0, nw)?.to_dtype(internal)?.reshape((1, 1, nw, d))?;
        let emb = t.broadcast_add(&h)?.broadcast_add(&w)?.reshape((1, nt * nh * nw, d))?;
        let norm = emb.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        let denom = ((norm * (1.0 / (d as f64).sqrt()))? + NORM_EPS)?;
        emb.broadcast_div(&denom)?.to_dtype(self.pos_emb_t.dtype())
    }
}

/// Positional table sizes: max_size / patch_size per axis.
pub(crate) fn max_grid(cfg: &Config) -> [usize; 3] {
    [0, 1, 2].map(|i| cfg.max_size[i] / cfg.patch_size[i])
}

/// Optional inputs of [`CosmosTransformer3DModel::forward_with`].
#[derive(Clone, Debug, Default)]
pub struct ForwardOptions {
    /// Video frame rate: temporal RoPE positions are scaled by 24/fps. `None` (images, and what
    /// the Cosmos-Predict2 pipelines pass) leaves them at 0, 1, 2, …
    pub fps: Option<f64>,
    /// (B, L), 1 where a context token may be attended to and 0 where not (padded text).
    pub context_mask: Option<Tensor>,
}

/// How the forward trades compute for memory under backward. The default (both off) is the plain
/// graph, as before; both settings give the same values and gradients (tests: `cosmos_grad.rs`,
/// `dit_trajectory_grad.rs`), to round-off for the tiled attention.
///
/// What one backward through the DiT holds (N tokens, D width, L blocks, h heads, f32):
/// * plain: every block's activations (≈ 40 N·D values per block; see
///   `cosmos::memory_plan`) and, per block, the (h, N, N) attention scores and probabilities;
/// * `attention_tile`: no N × N matrix, forward or backward (`shared::ops::sdpa_tiled`; a few
///   (h, tile, tile) blocks at a time), for self- and cross-attention;
/// * `checkpoint_blocks`: each block under `shared::ops::checkpoint`: the graph keeps each block's
///   input (N·D) and the backward rebuilds one block's graph at a time, for one more forward of
///   the blocks. Only the tokens are differentiated through a checkpointed block: the timestep,
///   context and positional inputs must be constants (they are in the z0 optimisation; an error
///   names the one that is not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryMode {
    pub checkpoint_blocks: bool,
    /// Each block's three residual branches (self-attention, cross-attention, MLP) under
    /// `shared::ops::checkpoint` too: nested in a checkpointed block, its recomputation keeps the
    /// three branch inputs and one branch's graph at a time instead of the whole block's.
    pub checkpoint_sublayers: bool,
    /// Query and key tile of the memory-efficient attention; `None`: `shared::ops::sdpa`.
    pub attention_tile: Option<usize>,
    /// The blocks grouped into ⌈√layers⌉-block segments, each segment under
    /// `shared::ops::checkpoint` too (with `checkpoint_blocks`): the graph then keeps the segment
    /// inputs, and a segment's recomputation its blocks' inputs — ~2√layers N·D per DiT call
    /// instead of layers + 1 — for one more forward of the blocks.
    pub checkpoint_segments: bool,
}

impl MemoryMode {
    /// Tile of [`Self::low_memory`]: (h, 512, 512) f32 scores are 16 MB for the 2B model's 16
    /// heads, small beside one block's graph at real sizes, and large enough for efficient GEMMs.
    pub const DEFAULT_TILE: usize = 512;

    /// Everything on, with [`Self::DEFAULT_TILE`]: what the z0 optimisation at real sizes needs.
    pub fn low_memory() -> Self {
        Self {
            checkpoint_blocks: true,
            checkpoint_sublayers: true,
            attention_tile: Some(Self::DEFAULT_TILE),
            checkpoint_segments: true,
        }
    }

    /// Refuses an attention tile of 0.
    pub fn validate(&self) -> Result<()> {
        if self.attention_tile == Some(0) {
            bail!("cosmos memory mode: the attention tile must be at least 1")
        }
        Ok(())
    }

    /// Blocks per checkpointed segment for `layers` blocks (1: no segments).
    pub fn segment_len(&self, layers: usize) -> usize {
        if self.checkpoint_blocks && self.checkpoint_segments {
            ((layers as f64).sqrt().ceil() as usize).max(1)
        } else {
            1
        }
    }
}

/// Transfer2.5 inputs of [`CosmosTransformer3DModel::forward_transfer`].
#[derive(Clone, Debug, Default)]
pub struct TransferInputs {
    /// (B, Li, img_context_dim_in): the image context before `img_context_proj` (the Transfer2.5
    /// pipeline passes zeros of (B, img_context_num_tokens, img_context_dim_in)). Only for a
    /// model with `img_context_dim_in`; `None` on such a model is diffusers'
    /// `(text, None)`: the cross-attention's text branch alone.
    pub img_context: Option<Tensor>,
    /// diffusers' `block_controlnet_hidden_states`: the ControlNet's (already scaled) samples,
    /// each (B, N, D) with N the token count; the i-th is added to the output of block
    /// i·`controlnet_block_every_n`. As in diffusers, at least one per injection point is needed
    /// and any beyond those are unused.
    pub block_controlnet_hidden_states: Option<Vec<Tensor>>,
}

/// diffusers' `CosmosTransformer3DModel`.
#[derive(Clone, Debug)]
pub struct CosmosTransformer3DModel {
    cfg: Config,
    memory: MemoryMode,
    patch_embed: Linear,
    learnable_pos_embed: Option<LearnablePosEmbed>,
    time_embed: TimeEmbed,
    blocks: Vec<Block>,
    norm_out: AdaLnLora,
    proj_out: Linear,
    /// Predict2.5 context projection and Transfer2.5 image-context projection.
    context_proj: ContextProjections,
}

/// Named intermediate activations, in diffusers' layouts, for locating a parity mismatch.
pub type Trace = Vec<(String, Tensor)>;

impl CosmosTransformer3DModel {
    /// Builds the model from diffusers-named weights under `vb`.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let hidden = cfg.hidden_size();
        let [pt, ph, pw] = cfg.patch_size;
        let embed_in = (cfg.in_channels + usize::from(cfg.concat_padding_mask)) * pt * ph * pw;
        let learnable_pos_embed = if cfg.learnable_pos_embed()? {
            Some(LearnablePosEmbed::new(cfg, vb.pp("learnable_pos_embed"))?)
        } else {
            None
        };
        let blocks =
            (0..cfg.num_layers).map(|i| Block::new(cfg, vb.pp("transformer_blocks").pp(i))).collect::<Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            memory: MemoryMode::default(),
            patch_embed: Linear::new(embed_in, hidden, vb.pp("patch_embed.proj"))?,
            learnable_pos_embed,
            time_embed: TimeEmbed::new(hidden, vb.pp("time_embed"))?,
            blocks,
            norm_out: AdaLnLora::new(hidden, cfg.adaln_lora_dim, 2, vb.pp("norm_out"))?,
            proj_out: Linear::new(hidden, pt * ph * pw * cfg.out_channels, vb.pp("proj_out"))?,
            context_proj: ContextProjections::new(cfg, vb.clone())?,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A model with every weight random and non-zero, for benchmarks and memory measurements:
    /// linear weights N(0, 1/fan_in), norm gains 1 + N(0, 0.2²), positional tables N(0, 1), the
    /// context projections' biases N(0, 0.1²). Not a trained model's statistics; the shapes, and
    /// so the time and memory, are the real ones.
    pub fn random(cfg: &Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let recorder = shared::weights::ShapeRecorder::new();
        Self::new(cfg, recorder.var_builder(dtype, device))?;
        Self::new(cfg, random_weights(&recorder, seed, dtype, device)?)
    }

    /// Block checkpointing and tiled attention (see [`MemoryMode`]); off by default. A tile of 0
    /// is refused.
    pub fn set_memory_mode(&mut self, mode: MemoryMode) -> Result<()> {
        mode.validate()?;
        self.memory = mode;
        Ok(())
    }

    pub fn memory_mode(&self) -> MemoryMode {
        self.memory
    }

    /// Routes frozen weights through Candle's own matmul (`true`) instead of the frozen-weight
    /// op (`false`, the default). Same values; Candle's backward also computes, and keeps in the
    /// `GradStore`, a gradient for each frozen weight — as many elements as the linear layers,
    /// on every backward. For comparisons, or as a fallback on a backend where the custom op
    /// misbehaves. Weights that are Vars always use Candle's matmul.
    pub fn set_candle_matmul(&mut self, enabled: bool) {
        let mut linears: Vec<&mut Linear> = vec![&mut self.patch_embed, &mut self.proj_out];
        linears.extend(self.time_embed.linears_mut());
        linears.extend([&mut self.norm_out.linear_1, &mut self.norm_out.linear_2]);
        linears.extend(self.context_proj.linears_mut());
        for b in &mut self.blocks {
            linears.extend(b.linears_mut());
        }
        for l in linears {
            l.candle_matmul = enabled;
        }
    }

    /// Forward pass.
    ///
    /// * `hidden_states`: (B, C, T, H, W) latents; C = `in_channels`, or `in_channels − 1` when a
    ///   `condition_mask` is given (it is concatenated as the last input channel).
    /// * `timestep`: (B) one per sample, or (B, T) / (B, 1, T, 1, 1) one per latent frame
    ///   (needs p_t = 1, as in diffusers).
    /// * `encoder_hidden_states`: (B, L, text_embed_dim), or (B, L, crossattn_proj_in_channels)
    ///   with `use_crossattn_projection`.
    /// * `condition_mask`: (B, 1, T, H, W), 1 on conditioning frames.
    /// * `padding_mask`: (B or 1, 1, H', W'), required when `concat_padding_mask`; resized
    ///   (nearest) to (H, W).
    ///
    /// Inputs of another float dtype are cast to the weights' dtype. Returns
    /// (B, out_channels, T, H, W) in the weights' dtype.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        condition_mask: Option<&Tensor>,
        padding_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_with(
            hidden_states,
            timestep,
            encoder_hidden_states,
            condition_mask,
            padding_mask,
            &ForwardOptions::default(),
        )
    }

    /// [`Self::forward`] with the frame rate and a context mask.
    pub fn forward_with(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        condition_mask: Option<&Tensor>,
        padding_mask: Option<&Tensor>,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        self.forward_traced(hidden_states, timestep, encoder_hidden_states, condition_mask, padding_mask, opts, None)
    }

    /// [`Self::forward_with`] with the Transfer2.5 inputs: the image context and the ControlNet's
    /// residuals (`cosmos::controlnet::CosmosControlNetModel::forward`'s output).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_transfer(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        condition_mask: Option<&Tensor>,
        padding_mask: Option<&Tensor>,
        opts: &ForwardOptions,
        transfer: &TransferInputs,
    ) -> Result<Tensor> {
        self.forward_full(
            hidden_states,
            timestep,
            encoder_hidden_states,
            condition_mask,
            padding_mask,
            opts,
            transfer,
            None,
        )
    }

    /// [`Self::forward_with`] that also records intermediate activations into `trace` (when
    /// given) in diffusers' layouts: `patch_embed` (B, T', H', W', D), `time_embed.0` (temb) and
    /// `time_embed.1` (embedded timestep) as (B·F, ·), `rope.0`/`rope.1` (cos/sin, (N, hd)),
    /// `learnable_pos_embed` (B, N, D), `crossattn_proj` (the projected context, (B, L, C), with
    /// `use_crossattn_projection`), `block0` (B, N, D), `norm_out` (B, N, D).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_traced(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        condition_mask: Option<&Tensor>,
        padding_mask: Option<&Tensor>,
        opts: &ForwardOptions,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        self.forward_full(
            hidden_states,
            timestep,
            encoder_hidden_states,
            condition_mask,
            padding_mask,
            opts,
            &TransferInputs::default(),
            trace,
        )
    }

    /// [`Self::forward_transfer`] with a trace as [`Self::forward_traced`]'s, plus
    /// `img_context_proj` (the projected image context, (B, Li, D)) when an image context is
    /// given.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_full(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        condition_mask: Option<&Tensor>,
        padding_mask: Option<&Tensor>,
        opts: &ForwardOptions,
        transfer: &TransferInputs,
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        const WHO: &str = "cosmos forward";
        let tracing = trace.is_some();
        let mut record = |name: &str, t: &dyn Fn() -> Result<Tensor>| -> Result<()> {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push((name.to_string(), t()?));
            }
            Ok(())
        };
        let cfg = &self.cfg;
        let (b, c, t, h, w) = hidden_states.dims5()?;
        // Inputs are computed in the weights' dtype (differentiably cast when they differ).
        let dtype = self.patch_embed.weight.dtype();
        let device = hidden_states.device();
        let [pt, ph, pw] = cfg.patch_size;

        // 1. Input channels.
        let mut x = hidden_states.to_dtype(dtype)?;
        if let Some(cm) = condition_mask {
            x = Tensor::cat(&[&x, &condition_mask_channel(WHO, cm, [b, t, h, w], dtype)?], 1)?;
        }
        if x.dim(1)? != cfg.in_channels {
            bail!(
                "cosmos forward: {c} latent channels{} but the model has in_channels = {}",
                if condition_mask.is_some() { " + 1 condition-mask channel" } else { "" },
                cfg.in_channels
            )
        }
        if cfg.concat_padding_mask {
            let Some(pm) = padding_mask else {
                bail!("cosmos forward: the model concatenates a padding mask (concat_padding_mask) but none was given")
            };
            x = Tensor::cat(&[&x, &padding_mask_channel(WHO, pm, [b, t, h, w], dtype)?], 1)?;
        }

        // 2. Token grid and positional inputs.
        let grid = token_grid(WHO, cfg, [t, h, w])?;
        let (rope, extra_pos_emb) =
            positional_inputs(WHO, cfg, self.learnable_pos_embed.as_ref(), grid, opts.fps, dtype, device)?;

        // 3. Patchify: (B, C, T', pt, H', ph, W', pw) → tokens (B, T'H'W', C·pt·ph·pw).
        let mut x = self.patch_embed.forward(&patchify(&x, cfg.patch_size, grid)?)?;
        record("patch_embed", &|| x.reshape((b, grid[0], grid[1], grid[2], cfg.hidden_size())))?;
        let n = grid[0] * grid[1] * grid[2];
        record("rope.0", &|| Tensor::cat(&[&rope.0, &rope.0], 1))?;
        record("rope.1", &|| Tensor::cat(&[&rope.1, &rope.1], 1))?;
        if let Some(p) = &extra_pos_emb {
            record("learnable_pos_embed", &|| p.broadcast_as((b, n, cfg.hidden_size()))?.contiguous())?;
        }

        // 4. Timestep embedding, per sample (F = 1) or per latent frame (F = T').
        let timestep = timestep_per_frame(WHO, cfg, timestep, b, t)?;
        let (embedded_timestep, temb) = self.time_embed.forward(&timestep, dtype)?;
        record("time_embed.0", &|| temb.flatten_to(1))?;
        record("time_embed.1", &|| embedded_timestep.flatten_to(1))?;

        // 5. Contexts and the ControlNet residuals' injection points.
        let (context, img_context) =
            self.context_proj.forward(WHO, cfg, encoder_hidden_states, transfer.img_context.as_ref(), b, dtype)?;
        if self.context_proj.crossattn_proj.is_some() {
            record("crossattn_proj", &|| Ok(context.clone()))?;
        }
        if let Some(img) = &img_context {
            record("img_context_proj", &|| Ok(img.clone()))?;
        }
        let context_mask =
            context_mask(WHO, opts.context_mask.as_ref(), b, context.dim(1)?, img_context.is_some(), dtype)?;
        let residuals = self.residual_map(transfer.block_controlnet_hidden_states.as_deref(), [b, n], dtype)?;

        // 6. Blocks.
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
        // Blocks per checkpointed segment; 1 (no segments) when tracing, which records block 0.
        let segment = if tracing { 1 } else { self.memory.segment_len(self.blocks.len()) };
        let mut first = 0;
        while first < self.blocks.len() {
            let mut end = (first + segment).min(self.blocks.len());
            // A residual is added after its block, outside any checkpoint (it carries the
            // ControlNet's gradient, which a checkpoint's captures may not): a segment ends at an
            // injection point.
            if let Some(i) = (first..end).find(|i| residuals[*i].is_some()) {
                end = i + 1;
            }
            let blocks: Vec<Block> = self.blocks[first..end].to_vec();
            let checkpointed = self.memory.checkpoint_blocks;
            // The closures own what the recomputation needs: the blocks (their weights are
            // shared tensors, no copy) and the common inputs.
            let cond = inputs.clone();
            let run = move |x: &Tensor| -> Result<Tensor> {
                let mut x = x.clone();
                for block in &blocks {
                    x = block.forward_maybe_checkpointed(&x, &cond, checkpointed)?;
                }
                Ok(x)
            };
            x = if end - first > 1 { ops::checkpoint(&x, run)? } else { run(&x)? };
            if let Some(r) = &residuals[end - 1] {
                x = (x + r)?;
            }
            if first == 0 {
                // Traced forwards use segments of one block (see `segment`).
                record("block0", &|| Ok(x.clone()))?;
            }
            first = end;
        }

        // 7. Final AdaLN, projection, unpatchify. diffusers lays out each token's output as
        //    (ph, pw, pt, C_out) — not the inverse of the input patch order.
        let m = self.norm_out.chunks(&inputs.embedded_timestep, &inputs.temb)?;
        let normed = modulate(&x, &m[0], &m[1])?;
        record("norm_out", &|| Ok(normed.clone()))?;
        let y = self.proj_out.forward(&normed)?;
        let co = cfg.out_channels;
        y.reshape(vec![b, grid[0], grid[1], grid[2], ph, pw, pt, co])?
            .permute([0, 7, 1, 6, 2, 4, 3, 5])?
            .reshape((b, co, t, h, w))
    }

    /// Per block, the ControlNet residual added after it (diffusers'
    /// `controlnet_block_index_map`): the i-th of `samples` after block i·every_n, each checked to
    /// be (B, N, D) and cast to `dtype`.
    fn residual_map(
        &self,
        samples: Option<&[Tensor]>,
        [b, n]: [usize; 2],
        dtype: DType,
    ) -> Result<Vec<Option<Tensor>>> {
        let mut map = vec![None; self.blocks.len()];
        let Some(samples) = samples else { return Ok(map) };
        let points = self.cfg.controlnet_blocks().map_err(|e| {
            candle_core::Error::Msg(format!("cosmos forward: ControlNet residuals were given, but {e}"))
        })?;
        if samples.len() < points.len() {
            bail!(
                "cosmos forward: {} ControlNet residuals for {} injection points (blocks {points:?}: every \
                 controlnet_block_every_n = {} of {} blocks)",
                samples.len(),
                points.len(),
                self.cfg.controlnet_block_every_n.unwrap_or(0),
                self.blocks.len()
            )
        }
        let d = self.cfg.hidden_size();
        for (i, (block, sample)) in points.into_iter().zip(samples).enumerate() {
            if sample.dims() != [b, n, d] {
                bail!("cosmos forward: ControlNet residual {i} has shape {:?}, expected ({b}, {n}, {d})", sample.dims())
            }
            map[block] = Some(sample.to_dtype(dtype)?);
        }
        Ok(map)
    }
}

/// The weights a `ShapeRecorder` saw, drawn at random (see [`CosmosTransformer3DModel::random`]).
pub(crate) fn random_weights(
    recorder: &shared::weights::ShapeRecorder,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let mut rng = shared::rng::SplitMix64::new(seed);
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in recorder.shapes() {
        let t = rng.normal_tensor(shape.as_slice(), DType::F64, device)?;
        let t = if shape.len() == 2 && !name.contains("pos_emb") {
            (t * (1.0 / (shape[1] as f64).sqrt()))?
        } else if name.ends_with("bias") {
            (t * 0.1)?
        } else if name.contains("pos_emb") {
            t
        } else {
            ((t * 0.2)? + 1.0)?
        };
        tensors.insert(name, t.to_dtype(dtype)?);
    }
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// diffusers' `CosmosEmbedding`: sinusoid → `temb` (linear–SiLU–linear, 3·D) and
/// `embedded_timestep` (RMSNorm of the sinusoid).
#[derive(Clone, Debug)]
pub(crate) struct TimeEmbed {
    linear_1: Linear,
    linear_2: Linear,
    norm: Tensor,
    hidden: usize,
}

impl TimeEmbed {
    pub(crate) fn new(hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(hidden, hidden, vb.pp("t_embedder.linear_1"))?,
            linear_2: Linear::new(hidden, 3 * hidden, vb.pp("t_embedder.linear_2"))?,
            norm: vb.pp("norm").get(hidden, "weight")?,
            hidden,
        })
    }

    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.linear_1, &mut self.linear_2]
    }

    /// timestep (B, F) → (embedded_timestep (B, F, D), temb (B, F, 3D)).
    pub(crate) fn forward(&self, timestep: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, f) = timestep.dims2()?;
        let d = self.hidden;
        let proj = timestep_sinusoid(&timestep.to_dtype(dtype)?.flatten_all()?, d)?;
        let temb = self.linear_2.forward(&ops::silu(&self.linear_1.forward(&proj)?)?)?;
        let embedded = ops::rms_norm(&proj, Some(&self.norm), NORM_EPS)?;
        Ok((embedded.reshape((b, f, d))?, temb.reshape((b, f, 3 * d))?))
    }
}

/// The context projections, each Linear(+bias)–GELU(erf): `crossattn_proj` (Predict2.5's text
/// context, `use_crossattn_projection`) and `img_context_proj` (Transfer2.5's image context,
/// `img_context_dim_in` > 0).
#[derive(Clone, Debug)]
pub(crate) struct ContextProjections {
    crossattn_proj: Option<LinearBias>,
    img_context_proj: Option<LinearBias>,
}

impl ContextProjections {
    /// Weights `crossattn_proj.0.*` and `img_context_proj.0.*` under `vb`, as `cfg` asks.
    pub(crate) fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let crossattn_proj = if cfg.use_crossattn_projection {
            let (i, o) = (cfg.crossattn_proj_in_channels, cfg.encoder_hidden_states_channels);
            Some(LinearBias::new(i, o, vb.pp("crossattn_proj.0"))?)
        } else {
            None
        };
        let img_context_proj = match cfg.img_context_dim_in {
            Some(i) if i > 0 => Some(LinearBias::new(i, cfg.img_context_dim_out, vb.pp("img_context_proj.0"))?),
            _ => None,
        };
        Ok(Self { crossattn_proj, img_context_proj })
    }

    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut l = Vec::new();
        for p in [&mut self.crossattn_proj, &mut self.img_context_proj].into_iter().flatten() {
            l.push(&mut p.linear);
        }
        l
    }

    /// (text context, image context), checked against `cfg`, cast to `dtype` and projected:
    /// `text` (B, L, `cfg.context_dim()`), `img` (B, Li, `img_context_dim_in`) for a model with
    /// an image context only.
    pub(crate) fn forward(
        &self,
        who: &str,
        cfg: &Config,
        text: &Tensor,
        img: Option<&Tensor>,
        b: usize,
        dtype: DType,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if text.rank() != 3 || text.dim(0)? != b || text.dim(2)? != cfg.context_dim() {
            bail!("{who}: encoder_hidden_states has shape {:?}, expected ({b}, L, {})", text.dims(), cfg.context_dim())
        }
        let mut context = text.to_dtype(dtype)?;
        if let Some(proj) = &self.crossattn_proj {
            context = ops::gelu_erf(&proj.forward(&context)?)?;
        }
        let img = match (img, &self.img_context_proj) {
            (None, _) => None,
            (Some(img), Some(proj)) => {
                let din = proj.linear.weight.dim(1)?;
                if img.rank() != 3 || img.dim(0)? != b || img.dim(2)? != din {
                    bail!(
                        "{who}: img_context has shape {:?}, expected ({b}, Li, {din}) (img_context_dim_in)",
                        img.dims()
                    )
                }
                Some(ops::gelu_erf(&proj.forward(&img.to_dtype(dtype)?)?)?)
            }
            (Some(_), None) => {
                bail!("{who}: an image context was given, but the model has none (img_context_dim_in is unset)")
            }
        };
        Ok((context, img))
    }
}

/// The additive (B, 1, 1, L) mask of a (B, L) context mask (1: attend). With an image context,
/// refused: diffusers' Transfer2.5 attention takes no mask tensor, so what it would mean there is
/// undefined upstream.
pub(crate) fn context_mask(
    who: &str,
    mask: Option<&Tensor>,
    b: usize,
    l: usize,
    img_context: bool,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let Some(m) = mask else { return Ok(None) };
    if img_context {
        bail!("{who}: a context_mask cannot be combined with an image context (diffusers' Transfer2.5 attention has no mask)")
    }
    if m.dims() != [b, l] {
        bail!("{who}: context_mask has shape {:?}, expected ({b}, {l})", m.dims())
    }
    Ok(Some(ops::additive_mask(&m.reshape((b, 1, 1, l))?, dtype)?))
}

/// The condition mask (B, 1, T, H, W), checked and cast, as an input channel.
pub(crate) fn condition_mask_channel(who: &str, cm: &Tensor, [b, t, h, w]: [usize; 4], dtype: DType) -> Result<Tensor> {
    if cm.dims() != [b, 1, t, h, w] {
        bail!("{who}: condition_mask has shape {:?}, expected {:?}", cm.dims(), [b, 1, t, h, w])
    }
    cm.to_dtype(dtype)
}

/// The padding mask (B or 1, 1, H', W') as an input channel (B, 1, T, H, W): resized (nearest)
/// to the latent's (H, W) and repeated over the frames.
pub(crate) fn padding_mask_channel(who: &str, pm: &Tensor, [b, t, h, w]: [usize; 4], dtype: DType) -> Result<Tensor> {
    if pm.rank() != 4 || pm.dim(1)? != 1 {
        bail!("{who}: padding_mask has shape {:?}, expected (B or 1, 1, H', W')", pm.dims())
    }
    let pm = resize_nearest(&pm.to_dtype(dtype)?, h, w)?;
    let pb = pm.dim(0)?;
    if pb != 1 && pb != b {
        bail!("{who}: padding_mask batch {pb}, expected 1 or {b}")
    }
    pm.unsqueeze(2)?.broadcast_as((b, 1, t, h, w))?.contiguous()
}

/// The token grid (T/pt, H/ph, W/pw) of a latent (T, H, W); each must divide.
pub(crate) fn token_grid(who: &str, cfg: &Config, [t, h, w]: [usize; 3]) -> Result<[usize; 3]> {
    let [pt, ph, pw] = cfg.patch_size;
    if t % pt != 0 || h % ph != 0 || w % pw != 0 {
        bail!("{who}: latent (T, H, W) = ({t}, {h}, {w}) is not divisible by patch size {:?}", cfg.patch_size)
    }
    Ok([t / pt, h / ph, w / pw])
}

/// (B, C, T, H, W) → tokens (B, T'H'W', C·pt·ph·pw), t-major, each token's features (C, pt, ph, pw).
pub(crate) fn patchify(x: &Tensor, [pt, ph, pw]: [usize; 3], grid: [usize; 3]) -> Result<Tensor> {
    let (b, ci) = (x.dim(0)?, x.dim(1)?);
    x.reshape(vec![b, ci, grid[0], pt, grid[1], ph, grid[2], pw])?.permute([0, 2, 4, 6, 1, 3, 5, 7])?.reshape((
        b,
        grid[0] * grid[1] * grid[2],
        ci * pt * ph * pw,
    ))
}

/// RoPE tables and the learnable positional embedding of a token grid, after checking that the
/// grid is within the model's positional range.
pub(crate) fn positional_inputs(
    who: &str,
    cfg: &Config,
    learnable: Option<&LearnablePosEmbed>,
    grid: [usize; 3],
    fps: Option<f64>,
    dtype: DType,
    device: &Device,
) -> Result<((Tensor, Tensor), Option<Tensor>)> {
    // The learnable tables have max_size / patch rows per axis; diffusers' RoPE alone takes
    // positions up to the largest of those on every axis.
    let max = match learnable {
        Some(_) => max_grid(cfg),
        None => [max_grid(cfg).into_iter().max().unwrap_or(0); 3],
    };
    if grid.iter().zip(&max).any(|(g, m)| g > m) {
        bail!("{who}: token grid {grid:?} exceeds the model's positional range {max:?} (max_size / patch)")
    }
    let rope = rope_tables(who, cfg, grid, fps, dtype, device)?;
    let extra = match learnable {
        Some(p) => Some(p.forward(grid)?.to_dtype(dtype)?),
        None => None,
    };
    Ok((rope, extra))
}

/// (B) → (B, 1); (B, T) or (B, 1, T, 1, 1) → (B, T).
pub(crate) fn timestep_per_frame(who: &str, cfg: &Config, timestep: &Tensor, b: usize, t: usize) -> Result<Tensor> {
    let per_frame = match timestep.dims() {
        [tb] if *tb == b => return timestep.reshape((b, 1)),
        [tb, tt] if *tb == b && *tt == t => timestep.clone(),
        [tb, 1, tt, 1, 1] if *tb == b && *tt == t => timestep.reshape((b, t))?,
        other => {
            bail!("{who}: timestep has shape {other:?}, expected ({b}), ({b}, {t}) or ({b}, 1, {t}, 1, 1)")
        }
    };
    if cfg.patch_size[0] != 1 {
        bail!("{who}: per-frame timesteps need temporal patch size 1 (as in diffusers)")
    }
    Ok(per_frame)
}

/// diffusers' `CosmosRotaryPosEmbed`: per-axis θ = 10⁴·scale^(d/(d−2)) (NTK), frequencies
/// θ^(−2i/d), temporal positions scaled by 24/fps; cos/sin (N, hd/2) laid out [t | h | w] for
/// half-split rotation.
fn rope_tables(
    who: &str,
    cfg: &Config,
    grid: [usize; 3],
    fps: Option<f64>,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (dt, dh, dw) = cfg.rope_dims();
    let [st, sh, sw] = cfg.rope_scale;
    let ntk_theta = |scale: f64, dim: usize| ROPE_THETA * scale.powf(dim as f64 / (dim as f64 - 2.0));
    let t_pos_scale = match fps {
        Some(fps) if fps > 0.0 => ROPE_BASE_FPS / fps,
        Some(fps) => bail!("{who}: fps must be positive, got {fps}"),
        None => 1.0,
    };
    let [nt, nh, nw] = grid;
    // Angles in f64, cast once at the end.
    let (ct, s_t) = ops::rope_tables_1d(nt, dt, ntk_theta(st, dt), t_pos_scale, DType::F64, device)?;
    let (ch, s_h) = ops::rope_tables_1d(nh, dh, ntk_theta(sh, dh), 1.0, DType::F64, device)?;
    let (cw, s_w) = ops::rope_tables_1d(nw, dw, ntk_theta(sw, dw), 1.0, DType::F64, device)?;
    let expand = |tt: &Tensor, th: &Tensor, tw: &Tensor| -> Result<Tensor> {
        let (ht, hh, hw) = (dt / 2, dh / 2, dw / 2);
        let a = tt.reshape((nt, 1, 1, ht))?.broadcast_as((nt, nh, nw, ht))?;
        let b = th.reshape((1, nh, 1, hh))?.broadcast_as((nt, nh, nw, hh))?;
        let c = tw.reshape((1, 1, nw, hw))?.broadcast_as((nt, nh, nw, hw))?;
        Tensor::cat(&[a, b, c], D::Minus1)?.reshape((nt * nh * nw, ht + hh + hw))?.to_dtype(dtype)
    };
    Ok((expand(&ct, &ch, &cw)?, expand(&s_t, &s_h, &s_w)?))
}

/// diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: for t (M) returns
/// (M, dim) = [cos(t·fᵢ) | sin(t·fᵢ)], fᵢ = 10000^(−i/(dim/2)), zero-padded if dim is odd.
fn timestep_sinusoid(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f64> = (0..half).map(|i| (-(ROPE_THETA.ln()) * i as f64 / half as f64).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?.to_dtype(t.dtype())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let mut parts = vec![args.cos()?, args.sin()?];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros((t.dim(0)?, 1), t.dtype(), t.device())?);
    }
    Tensor::cat(&parts, 1)
}

/// Nearest-neighbour resize of (B, C, H, W) to (out_h, out_w) with PyTorch's `nearest` rule
/// (source index ⌊i·in/out⌋), as torchvision's `resize(..., NEAREST)` does on tensors.
fn resize_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, in_h, in_w) = x.dims4()?;
    if (in_h, in_w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let index = |inp: usize, out: usize| -> Result<Tensor> {
        let scale = inp as f32 / out as f32;
        let idx: Vec<u32> = (0..out).map(|i| ((i as f32 * scale).floor() as usize).min(inp - 1) as u32).collect();
        Tensor::from_vec(idx, out, x.device())
    };
    x.index_select(&index(in_h, out_h)?, 2)?.index_select(&index(in_w, out_w)?, 3)
}
