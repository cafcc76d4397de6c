//! The Wan2.1 video VAE (diffusers' `AutoencoderKLWan`), the latent space of every Cosmos world
//! model since Predict2, written only with differentiable ops and with an exact, memory-flat
//! gradient through decoding.
//!
//! Parameter names and the config follow diffusers, so `vae/config.json` +
//! `vae/diffusion_pytorch_model.safetensors` of a real repository load unchanged. Parity with
//! diffusers is proven by `tests/wan_vae_parity.rs` against fixtures made by
//! `tests/fixtures/make_wan_vae_fixture.py`; gradients by finite differences in
//! `tests/wan_vae_grad.rs`.
//!
//! Architecture (base width 96, `dim_mult` [1, 2, 4, 4], 2 residual blocks):
//! * Causal 3-D convolutions: H and W zero-padded symmetrically, time padded in front only, and
//!   the padding replaced by up to 2 cached frames of the conv's input from the previous chunk.
//! * Residual block: RMS → SiLU → conv → RMS → SiLU → conv, plus a 1×1×1 shortcut when widths
//!   differ. RMS norm = L2 normalisation over channels × √C × γ, computed in f32 for half inputs.
//! * Encoder: conv_in, per level residual blocks (+ attention at `attn_scales`) and a down-sampler
//!   (`downsample2d`: zero pad right/bottom, 3×3 stride-2 conv per frame; `downsample3d` adds a
//!   temporal (3, 1, 1) stride-2 conv over the last cached frame and the chunk, skipped on the
//!   first chunk), mid block (res, single-head attention per frame, res), norm, SiLU, conv_out →
//!   mean ‖ log-variance; `quant_conv`.
//! * Decoder: `post_quant_conv`, conv_in, mid block, up blocks of `num_res_blocks + 1` residual
//!   blocks and an up-sampler (`upsample3d`: a temporal conv doubling the channels into two frames
//!   — skipped on the first chunk — then nearest ×2 and a 3×3 conv halving the width;
//!   `upsample2d` only the latter), norm, SiLU, conv_out, clamp to [−1, 1].
//! * Video is encoded in chunks of 1, 4, 4, … frames and decoded one latent frame at a time, each
//!   chunk reading the previous chunk's feature cache: (F − 1)/4 + 1 latent frames ↔ F frames.
//!
//! Every chunk is a pure function (input, cache in) → (output, cache out) ([`AutoencoderKLWan::
//! decode_chunk`]), which is what makes the recomputing backward ([`DecodeTape::vjp`]) possible:
//! the forward stores each chunk's latent frame and the incoming cache of every ⌈√chunks⌉-th
//! chunk, and the backward decodes each such segment again to rebuild its caches, then rebuilds
//! one chunk's graph at a time, last to first, carrying the caches' adjoints. Inside a chunk the
//! residual blocks and up-samplers are checkpointed (`shared::ops::checkpoint_many`, with their
//! cached frames as inputs), so one chunk's backward holds their inputs and one layer's graph.

use candle_core::{bail, DType, Result, Tensor, Var, D};
use candle_nn::VarBuilder;
use shared::ops;

/// diffusers' `AutoencoderKLWan` config (`vae/config.json`). Fields and defaults match diffusers
/// 0.42.1 (the defaults *are* the Wan2.1 VAE); other keys of a real config (`_class_name`,
/// `_diffusers_version`, …) are ignored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Config {
    pub base_dim: usize,
    /// Decoder width when it differs from the encoder's (Wan2.2); `None` = `base_dim`.
    pub decoder_base_dim: Option<usize>,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_scales: Vec<f64>,
    /// Upstream's spelling. One entry per down-sampling level (`dim_mult.len() − 1`).
    pub temperal_downsample: Vec<bool>,
    /// Training only: dropout is the identity at inference.
    pub dropout: f64,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    /// Wan2.2's residual down/up blocks. Not supported.
    pub is_residual: bool,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Wan2.2's pixel patchify. Not supported (`None` or 1).
    pub patch_size: Option<usize>,
    pub scale_factor_temporal: Option<usize>,
    pub scale_factor_spatial: Option<usize>,
}

impl Default for Config {
    /// diffusers' constructor defaults: the Wan2.1 VAE.
    fn default() -> Self {
        Self {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            dropout: 0.0,
            latents_mean: vec![
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632,
                -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            latents_std: vec![
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382,
                1.1253, 2.8251, 1.9160,
            ],
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
            scale_factor_temporal: Some(4),
            scale_factor_spatial: Some(8),
        }
    }
}

impl Config {
    /// Reads a diffusers `vae/config.json`; a field of the wrong type is named with its path.
    pub fn from_json_file(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg = Self::from_json_str(&text).with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    /// Parses and validates a config.json text.
    pub fn from_json_str(text: &str) -> anyhow::Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: Self = serde_path_to_error::deserialize(de)
            .map_err(|e| anyhow::anyhow!("Wan VAE config: field '{}': {}", e.path(), e.inner()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        ensure!(!self.is_residual, "Wan VAE config: is_residual = true (the Wan2.2 VAE) is not supported");
        ensure!(
            self.patch_size.is_none_or(|p| p == 1),
            "Wan VAE config: patch_size {:?} (the Wan2.2 VAE) is not supported",
            self.patch_size
        );
        ensure!(self.base_dim > 0 && self.z_dim > 0, "Wan VAE config: base_dim and z_dim must be positive");
        ensure!(self.decoder_base_dim.is_none_or(|d| d > 0), "Wan VAE config: decoder_base_dim must be positive");
        ensure!(
            !self.dim_mult.is_empty() && self.dim_mult.iter().all(|&m| m > 0),
            "Wan VAE config: dim_mult {:?} must be non-empty and positive",
            self.dim_mult
        );
        ensure!(
            self.temperal_downsample.len() + 1 == self.dim_mult.len(),
            "Wan VAE config: temperal_downsample has {} entries, dim_mult {} (needs one fewer)",
            self.temperal_downsample.len(),
            self.dim_mult.len()
        );
        ensure!(self.num_res_blocks > 0, "Wan VAE config: num_res_blocks must be positive");
        ensure!(self.in_channels > 0 && self.out_channels > 0, "Wan VAE config: in/out channels must be positive");
        ensure!(
            self.latents_mean.len() == self.z_dim && self.latents_std.len() == self.z_dim,
            "Wan VAE config: latents_mean/latents_std have {}/{} values, z_dim is {}",
            self.latents_mean.len(),
            self.latents_std.len(),
            self.z_dim
        );
        ensure!(
            self.latents_std.iter().all(|s| s.is_finite() && *s > 0.0)
                && self.latents_mean.iter().all(|m| m.is_finite()),
            "Wan VAE config: latents_std must be positive and latents_mean finite"
        );
        // Each 2-D down-sampler halves H and W, each 3-D one also halves time.
        let spatial = 1usize << self.temperal_downsample.len();
        let temporal = 1usize << self.temperal_downsample.iter().filter(|&&t| t).count();
        ensure!(
            self.scale_factor_spatial.is_none_or(|s| s == spatial),
            "Wan VAE config: scale_factor_spatial {:?} disagrees with the {spatial}× the levels give",
            self.scale_factor_spatial
        );
        ensure!(
            self.scale_factor_temporal.is_none_or(|s| s == temporal),
            "Wan VAE config: scale_factor_temporal {:?} disagrees with the {temporal}× the levels give",
            self.scale_factor_temporal
        );
        Ok(())
    }

    /// Pixels per latent pixel along H and W.
    pub fn spatial_factor(&self) -> usize {
        1 << self.temperal_downsample.len()
    }

    /// Frames per latent frame after the first.
    pub fn temporal_factor(&self) -> usize {
        1 << self.temperal_downsample.iter().filter(|&&t| t).count()
    }

    /// Latent frames of a video of `frames` frames: (F − 1)/4 + 1.
    pub fn latent_frames(&self, frames: usize) -> usize {
        (frames.saturating_sub(1)) / self.temporal_factor() + 1
    }

    /// Frames decoded from `latent_frames` latent frames: 4(n − 1) + 1.
    pub fn decoded_frames(&self, latent_frames: usize) -> usize {
        self.temporal_factor() * latent_frames.saturating_sub(1) + 1
    }

    fn decoder_dim(&self) -> usize {
        self.decoder_base_dim.unwrap_or(self.base_dim)
    }
}

// ---------------------------------------------------------------------------------------------
// The feature cache

/// What one causal conv (or temporal resampler) remembers of the previous chunk.
#[derive(Clone, Debug)]
pub enum CacheSlot {
    /// Nothing yet (first chunk): zero padding.
    Empty,
    /// An `upsample3d` that has seen its first chunk (upstream's `"Rep"` marker): the next chunk
    /// pads with zeros, as if the cache held zero frames.
    Replicate,
    /// The last frames (1 or 2) of the layer's input.
    Frames(Tensor),
}

impl CacheSlot {
    fn frames(&self) -> Option<&Tensor> {
        match self {
            CacheSlot::Frames(t) => Some(t),
            _ => None,
        }
    }
}

/// The caches of every causal layer, in the order a chunk visits them.
pub type FeatureCache = Vec<CacheSlot>;

/// Reads the incoming cache slot by slot and collects the outgoing one: a chunk is a pure
/// function of (input, cache in).
///
/// In the recomputing backward the outgoing cache is not needed (the tape has it) but its
/// adjoint is known: `adjoints[k]` is added to the gradient of slot k's frames where the causal
/// padding is built ([`shared::ops::causal_pad`]), and no outgoing cache is computed.
struct CacheCursor<'a> {
    input: &'a [CacheSlot],
    output: FeatureCache,
    adjoints: Option<&'a [Option<Tensor>]>,
    /// Residual blocks under `shared::ops::checkpoint_many` (the backward only).
    checkpoint: bool,
}

impl<'a> CacheCursor<'a> {
    fn new(input: &'a [CacheSlot]) -> Self {
        Self { input, output: Vec::with_capacity(input.len()), adjoints: None, checkpoint: false }
    }

    fn with_adjoints(input: &'a [CacheSlot], adjoints: &'a [Option<Tensor>], checkpoint: bool) -> Self {
        Self { adjoints: Some(adjoints), checkpoint, ..Self::new(input) }
    }

    /// The slot the next layer reads (Empty when the incoming cache is empty: first chunk).
    fn current(&self) -> &'a CacheSlot {
        self.input.get(self.output.len()).unwrap_or(&CacheSlot::Empty)
    }

    /// The adjoint of the slot the next layer writes, in the backward.
    fn adjoint(&self) -> Option<&'a Tensor> {
        self.adjoints.and_then(|a| a.get(self.output.len())).and_then(Option::as_ref)
    }

    /// Whether the outgoing cache is wanted (not in the backward).
    fn records(&self) -> bool {
        self.adjoints.is_none()
    }

    fn push(&mut self, slot: CacheSlot) {
        self.output.push(slot);
    }

    /// In the backward: the frames of the slot the next cached conv reads and the adjoint of the
    /// one it writes, consumed (an `Empty` outgoing slot is recorded).
    fn take_slot(&mut self) -> (Option<Tensor>, Option<Tensor>) {
        let taken = (self.current().frames().cloned(), self.adjoint().cloned());
        self.push(CacheSlot::Empty);
        taken
    }

    /// Whether layers are to be checkpointed: in the backward, when asked for.
    fn checkpoints(&self) -> bool {
        self.adjoints.is_some() && self.checkpoint
    }
}

/// The last `CACHE_T` = 2 frames of a conv input, completed with the previous cache's last
/// frame when the chunk has only one (upstream: `cache_x` of every cached conv).
fn next_cache(x: &Tensor, previous: &CacheSlot) -> Result<CacheSlot> {
    let t = x.dim(2)?;
    let tail = x.narrow(2, t.saturating_sub(2), t.min(2))?;
    let tail = match (tail.dim(2)?, previous.frames()) {
        (1, Some(prev)) => Tensor::cat(&[&prev.narrow(2, prev.dim(2)? - 1, 1)?, &tail], 2)?,
        _ => tail,
    };
    Ok(CacheSlot::Frames(owned(&tail)?))
}

/// A compact copy that owns just its elements, as upstream's `.clone()`: a narrowed view (and
/// Candle's `copy`, which clones the whole storage) would keep the chunk's whole activation alive
/// in the cache — measured: a decode tape held 2× its counted bytes.
fn owned(t: &Tensor) -> Result<Tensor> {
    t.force_contiguous()
}

// ---------------------------------------------------------------------------------------------
// Layers

/// `(B, C, T, H, W)` → `(B·T, C, H, W)`, the frames folded into the batch.
fn frames_to_batch(x: &Tensor) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    x.permute((0, 2, 1, 3, 4))?.reshape((b * t, c, h, w))
}

/// The inverse of [`frames_to_batch`].
fn batch_to_frames(x: &Tensor, b: usize) -> Result<Tensor> {
    let (bt, c, h, w) = x.dims4()?;
    x.reshape((b, bt / b, c, h, w))?.permute((0, 2, 1, 3, 4))
}

/// `WanCausalConv3d`: H/W padded symmetrically, time padded in front only (2·p_t frames), the
/// front padding replaced by cached frames when given.
#[derive(Clone, Debug)]
struct CausalConv3d {
    /// (O, C, kt, kh, kw).
    weight: Tensor,
    bias: Tensor,
    time_pad: usize,
    spatial_pad: usize,
    time_stride: usize,
}

impl CausalConv3d {
    fn new(
        in_dim: usize,
        out_dim: usize,
        kernel: (usize, usize, usize),
        time_stride: usize,
        padding: (usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        let (kt, kh, kw) = kernel;
        Ok(Self {
            weight: vb.get((out_dim, in_dim, kt, kh, kw), "weight")?,
            bias: vb.get(out_dim, "bias")?,
            time_pad: 2 * padding.0,
            spatial_pad: padding.1,
            time_stride,
        })
    }

    /// A k×k×k conv with padding k/2 (upstream's `WanCausalConv3d(in, out, k, padding=k//2)`).
    fn cube(in_dim: usize, out_dim: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(in_dim, out_dim, (k, k, k), 1, (k / 2, k / 2), vb)
    }

    /// `cache`: frames that replace the front padding; `adjoint`: the adjoint of the outgoing
    /// cache (the last frames of the padded input), injected into the backward.
    fn forward(&self, x: &Tensor, cache: Option<&Tensor>, adjoint: Option<&Tensor>) -> Result<Tensor> {
        let x = if self.time_pad > 0 {
            let cached = match cache {
                Some(c) => c.dim(2)?,
                None => 0,
            };
            if cached > self.time_pad {
                bail!("causal conv: {cached} cached frames for a temporal padding of {}", self.time_pad)
            }
            ops::causal_pad(x, cache, self.time_pad - cached, 2, adjoint)?
        } else {
            if adjoint.is_some() {
                bail!("causal conv: an adjoint for a conv that keeps no cache")
            }
            x.clone()
        };
        ops::conv3d(&x, &self.weight, Some(&self.bias), (self.time_stride, 1), self.spatial_pad)
    }

    /// The cached form used by every conv that keeps a cache: reads the slot, writes the next.
    fn forward_cached(&self, x: &Tensor, cache: &mut CacheCursor) -> Result<Tensor> {
        let previous = cache.current();
        let next = if cache.records() { next_cache(x, previous)? } else { CacheSlot::Empty };
        let y = self.forward(x, previous.frames(), cache.adjoint())?;
        cache.push(next);
        Ok(y)
    }
}

/// `WanRMS_norm` over the channel dimension 1: L2-normalised (in f32 for half-precision
/// inputs, as upstream), × √C × γ.
#[derive(Clone, Debug)]
struct RmsNorm {
    /// Broadcast over (B, C, T, H, W) or (B, C, H, W).
    gamma: Tensor,
    scale: f64,
}

impl RmsNorm {
    /// `images`: γ of shape (C, 1, 1) for 4-D inputs; otherwise (C, 1, 1, 1) for 5-D ones.
    fn new(dim: usize, images: bool, vb: VarBuilder) -> Result<Self> {
        let gamma = if images { vb.get((dim, 1, 1), "gamma")? } else { vb.get((dim, 1, 1, 1), "gamma")? };
        Ok(Self { gamma, scale: (dim as f64).sqrt() })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // `l2_normalize` computes half-precision inputs in f32 and rounds once, as upstream.
        // `scale_shift`: the same product as a broadcast multiply, without keeping a full-size
        // gradient for the (frozen) γ in the backward.
        ops::scale_shift(&(ops::l2_normalize(x, 1, 1e-12)? * self.scale)?, Some(&self.gamma), None)
    }
}

/// `WanResidualBlock`.
#[derive(Clone, Debug)]
struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    conv_shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: RmsNorm::new(in_dim, false, vb.pp("norm1"))?,
            conv1: CausalConv3d::cube(in_dim, out_dim, 3, vb.pp("conv1"))?,
            norm2: RmsNorm::new(out_dim, false, vb.pp("norm2"))?,
            conv2: CausalConv3d::cube(out_dim, out_dim, 3, vb.pp("conv2"))?,
            conv_shortcut: if in_dim != out_dim {
                Some(CausalConv3d::cube(in_dim, out_dim, 1, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut CacheCursor) -> Result<Tensor> {
        if cache.checkpoints() {
            return self.forward_checkpointed(x, cache);
        }
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x, None, None)?,
            None => x.clone(),
        };
        let h = ops::silu(&self.norm1.forward(x)?)?;
        let h = self.conv1.forward_cached(&h, cache)?;
        let h = ops::silu(&self.norm2.forward(&h)?)?;
        let h = self.conv2.forward_cached(&h, cache)?;
        h + shortcut
    }

    /// The block with its two convs' cached frames and outgoing-cache adjoints given.
    fn forward_with_caches(
        &self,
        x: &Tensor,
        caches: [Option<&Tensor>; 2],
        adjoints: [Option<&Tensor>; 2],
    ) -> Result<Tensor> {
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x, None, None)?,
            None => x.clone(),
        };
        let h = ops::silu(&self.norm1.forward(x)?)?;
        let h = self.conv1.forward(&h, caches[0], adjoints[0])?;
        let h = ops::silu(&self.norm2.forward(&h)?)?;
        let h = self.conv2.forward(&h, caches[1], adjoints[1])?;
        h + shortcut
    }

    /// In the backward: the block as one `checkpoint_many` node of its input and its cached
    /// frames (whose gradients are the adjoints carried to the previous chunk); its graph is
    /// rebuilt when the backward reaches it.
    fn forward_checkpointed(&self, x: &Tensor, cache: &mut CacheCursor) -> Result<Tensor> {
        let (c1, a1) = cache.take_slot();
        let (c2, a2) = cache.take_slot();
        let present = [c1.is_some(), c2.is_some()];
        let inputs: Vec<Tensor> = std::iter::once(x.clone()).chain(c1).chain(c2).collect();
        let block = self.clone();
        ops::checkpoint_many(&inputs, move |t| {
            let mut rest = t[1..].iter();
            let c1 = if present[0] { rest.next() } else { None };
            let c2 = if present[1] { rest.next() } else { None };
            block.forward_with_caches(&t[0], [c1, c2], [a1.as_ref(), a2.as_ref()])
        })
    }
}

/// Query/key tile of the VAE's attention (`shared::ops::sdpa_tiled`).
const ATTENTION_TILE: usize = 1024;

/// `WanAttentionBlock`: single-head self-attention over H·W within each frame.
#[derive(Clone, Debug)]
struct AttentionBlock {
    norm: RmsNorm,
    /// (3C, C, 1, 1) and (3C).
    to_qkv: (Tensor, Tensor),
    proj: (Tensor, Tensor),
}

impl AttentionBlock {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let conv = |o: usize, name: &str| -> Result<(Tensor, Tensor)> {
            Ok((vb.pp(name).get((o, dim, 1, 1), "weight")?, vb.pp(name).get(o, "bias")?))
        };
        Ok(Self {
            norm: RmsNorm::new(dim, true, vb.pp("norm"))?,
            to_qkv: conv(3 * dim, "to_qkv")?,
            proj: conv(dim, "proj")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, _t, h, w) = x.dims5()?;
        let frames = self.norm.forward(&frames_to_batch(x)?)?;
        let qkv = ops::conv2d(&frames, &self.to_qkv.0, Some(&self.to_qkv.1), 1, 0)?;
        let bt = qkv.dim(0)?;
        // (B·T, 3C, H·W) → (B·T, 1, H·W, 3C): one head, tokens = pixels; q, k, v = channel thirds.
        let qkv = qkv.reshape((bt, 1, 3 * c, h * w))?.transpose(2, 3)?;
        let q = qkv.narrow(D::Minus1, 0, c)?.contiguous()?;
        let k = qkv.narrow(D::Minus1, c, c)?.contiguous()?;
        let v = qkv.narrow(D::Minus1, 2 * c, c)?.contiguous()?;
        // Tiled: no (H·W)² matrix (at 704×1280 the mid block's 88·160 pixels would make 0.8 GB
        // per f32 score matrix); equal to `sdpa` to round-off.
        let attended = ops::sdpa_tiled(&q, &k, &v, None, None, ATTENTION_TILE)?;
        let attended = attended.squeeze(1)?.transpose(1, 2)?.reshape((bt, c, h, w))?;
        let out = ops::conv2d(&attended, &self.proj.0, Some(&self.proj.1), 1, 0)?;
        batch_to_frames(&out, b)? + x
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResampleMode {
    Upsample2d,
    Upsample3d,
    Downsample2d,
    Downsample3d,
}

/// `WanResample`.
#[derive(Clone, Debug)]
struct Resample {
    mode: ResampleMode,
    /// The per-frame 2-D conv (`resample.1`).
    conv: (Tensor, Tensor),
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    fn new(dim: usize, mode: ResampleMode, vb: VarBuilder) -> Result<Self> {
        let out = match mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => dim / 2,
            _ => dim,
        };
        let rv = vb.pp("resample.1");
        let conv = (rv.get((out, dim, 3, 3), "weight")?, rv.get(out, "bias")?);
        let time_conv = match mode {
            ResampleMode::Upsample3d => {
                Some(CausalConv3d::new(dim, 2 * dim, (3, 1, 1), 1, (1, 0), vb.pp("time_conv"))?)
            }
            ResampleMode::Downsample3d => Some(CausalConv3d::new(dim, dim, (3, 1, 1), 2, (0, 0), vb.pp("time_conv"))?),
            _ => None,
        };
        Ok(Self { mode, conv, time_conv })
    }

    fn forward(&self, x: &Tensor, cache: &mut CacheCursor) -> Result<Tensor> {
        if cache.checkpoints() && matches!(self.mode, ResampleMode::Upsample2d | ResampleMode::Upsample3d) {
            return self.forward_checkpointed(x, cache);
        }
        let (b, c, t, h, w) = x.dims5()?;
        let mut x = x.clone();
        if let (ResampleMode::Upsample3d, Some(time_conv)) = (self.mode, &self.time_conv) {
            let previous = cache.current();
            if matches!(previous, CacheSlot::Empty) {
                // First chunk: no temporal up-sampling, one frame stays one frame.
                cache.push(CacheSlot::Replicate);
            } else {
                let next = if !cache.records() {
                    CacheSlot::Empty
                } else {
                    match (previous, next_cache(&x, previous)?) {
                        // After the first chunk's "Rep", a one-frame tail is completed with zeros
                        // (= the last two frames of the zero-padded input).
                        (CacheSlot::Replicate, CacheSlot::Frames(tail)) if tail.dim(2)? == 1 => {
                            CacheSlot::Frames(Tensor::cat(&[&tail.zeros_like()?, &tail], 2)?)
                        }
                        (_, next) => next,
                    }
                };
                // "Rep" pads with zeros, exactly what an absent cache does.
                let y = time_conv.forward(&x, previous.frames(), cache.adjoint())?;
                cache.push(next);
                x = Self::interleave(&y, (b, c, t, h, w))?;
            }
        }
        let mut x = self.spatial(&x)?;
        if let (ResampleMode::Downsample3d, Some(time_conv)) = (self.mode, &self.time_conv) {
            match cache.current() {
                CacheSlot::Frames(prev) => {
                    let last = x.dim(2)? - 1;
                    let next = CacheSlot::Frames(owned(&x.narrow(2, last, 1)?)?);
                    let prev_last = prev.narrow(2, prev.dim(2)? - 1, 1)?.to_dtype(x.dtype())?;
                    x = time_conv.forward(&Tensor::cat(&[&prev_last, &x], 2)?, None, None)?;
                    cache.push(next);
                }
                // First chunk: remembered whole, no temporal down-sampling.
                _ => cache.push(CacheSlot::Frames(x.clone())),
            }
        }
        Ok(x)
    }

    /// (B, 2C, T, H, W) from the temporal conv → (B, 2, C, T, H, W) → frames interleaved:
    /// (B, C, 2T, H, W).
    fn interleave(y: &Tensor, (b, c, t, h, w): (usize, usize, usize, usize, usize)) -> Result<Tensor> {
        y.reshape((b, 2, c, t, h, w))?.permute((0, 2, 3, 1, 4, 5))?.reshape((b, c, 2 * t, h, w))
    }

    /// The per-frame part: nearest ×2 and a 3×3 conv (up), or zero pad and a stride-2 conv (down).
    fn spatial(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let frames = frames_to_batch(x)?;
        let frames = match self.mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                ops::conv2d(&ops::upsample_nearest2x(&frames)?, &self.conv.0, Some(&self.conv.1), 1, 1)?
            }
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => {
                // ZeroPad2d((0, 1, 0, 1)): one column right, one row below; then stride 2.
                let padded = frames.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                ops::conv2d(&padded, &self.conv.0, Some(&self.conv.1), 2, 0)?
            }
        };
        batch_to_frames(&frames, b)
    }

    /// An up-sampler in the backward, as one `checkpoint_many` node of its input and (temporal
    /// up-sampling after the first chunk) its cached frames.
    fn forward_checkpointed(&self, x: &Tensor, cache: &mut CacheCursor) -> Result<Tensor> {
        let temporal = match (self.mode, &self.time_conv) {
            (ResampleMode::Upsample3d, Some(_)) if matches!(cache.current(), CacheSlot::Empty) => {
                cache.push(CacheSlot::Replicate);
                None
            }
            (ResampleMode::Upsample3d, Some(_)) => Some(cache.take_slot()),
            _ => None,
        };
        let layer = self.clone();
        let (cached, adjoint, temporal) = match temporal {
            Some((frames, adjoint)) => (frames, adjoint, true),
            None => (None, None, false),
        };
        let has_cache = cached.is_some();
        let inputs: Vec<Tensor> = std::iter::once(x.clone()).chain(cached).collect();
        ops::checkpoint_many(&inputs, move |t| {
            let mut x = t[0].clone();
            if let (true, Some(time_conv)) = (temporal, &layer.time_conv) {
                let cached = if has_cache { Some(&t[1]) } else { None };
                let y = time_conv.forward(&x, cached, adjoint.as_ref())?;
                x = Self::interleave(&y, x.dims5()?)?;
            }
            layer.spatial(&x)
        })
    }
}

/// `WanMidBlock` with one attention layer: res, attention, res.
#[derive(Clone, Debug)]
struct MidBlock {
    resnets: [ResidualBlock; 2],
    attention: AttentionBlock,
}

impl MidBlock {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            resnets: [
                ResidualBlock::new(dim, dim, vb.pp("resnets.0"))?,
                ResidualBlock::new(dim, dim, vb.pp("resnets.1"))?,
            ],
            attention: AttentionBlock::new(dim, vb.pp("attentions.0"))?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut CacheCursor) -> Result<Tensor> {
        let x = self.resnets[0].forward(x, cache)?;
        let x = self.attention.forward(&x)?;
        self.resnets[1].forward(&x, cache)
    }
}

/// One entry of the encoder's flat `down_blocks` list.
#[derive(Clone, Debug)]
enum DownLayer {
    Residual(ResidualBlock),
    Attention(AttentionBlock),
    Resample(Resample),
}

#[derive(Clone, Debug)]
struct Encoder {
    conv_in: CausalConv3d,
    down_blocks: Vec<DownLayer>,
    mid_block: MidBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Encoder {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.base_dim;
        let dims: Vec<usize> = std::iter::once(1).chain(cfg.dim_mult.iter().copied()).map(|m| dim * m).collect();
        let mut down_blocks = Vec::new();
        let mut scale = 1.0;
        let levels = cfg.dim_mult.len();
        for i in 0..levels {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            for _ in 0..cfg.num_res_blocks {
                let v = vb.pp("down_blocks").pp(down_blocks.len());
                down_blocks.push(DownLayer::Residual(ResidualBlock::new(in_dim, out_dim, v)?));
                if cfg.attn_scales.contains(&scale) {
                    let v = vb.pp("down_blocks").pp(down_blocks.len());
                    down_blocks.push(DownLayer::Attention(AttentionBlock::new(out_dim, v)?));
                }
                in_dim = out_dim;
            }
            if i != levels - 1 {
                let mode =
                    if cfg.temperal_downsample[i] { ResampleMode::Downsample3d } else { ResampleMode::Downsample2d };
                let v = vb.pp("down_blocks").pp(down_blocks.len());
                down_blocks.push(DownLayer::Resample(Resample::new(out_dim, mode, v)?));
                scale /= 2.0;
            }
        }
        let top = dims[levels];
        Ok(Self {
            conv_in: CausalConv3d::cube(cfg.in_channels, dims[0], 3, vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(top, vb.pp("mid_block"))?,
            norm_out: RmsNorm::new(top, false, vb.pp("norm_out"))?,
            conv_out: CausalConv3d::cube(top, 2 * cfg.z_dim, 3, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut CacheCursor) -> Result<Tensor> {
        let mut x = self.conv_in.forward_cached(x, cache)?;
        for layer in &self.down_blocks {
            x = match layer {
                DownLayer::Residual(r) => r.forward(&x, cache)?,
                DownLayer::Attention(a) => a.forward(&x)?,
                DownLayer::Resample(r) => r.forward(&x, cache)?,
            };
        }
        let x = self.mid_block.forward(&x, cache)?;
        let x = ops::silu(&self.norm_out.forward(&x)?)?;
        self.conv_out.forward_cached(&x, cache)
    }
}

/// `WanUpBlock`: residual blocks, then an optional up-sampler.
#[derive(Clone, Debug)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
}

#[derive(Clone, Debug)]
struct Decoder {
    conv_in: CausalConv3d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.decoder_dim();
        let top = *cfg.dim_mult.last().unwrap_or(&1);
        let dims: Vec<usize> =
            std::iter::once(top).chain(cfg.dim_mult.iter().rev().copied()).map(|m| dim * m).collect();
        let levels = cfg.dim_mult.len();
        let temperal_upsample: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(levels);
        for i in 0..levels {
            // Every up-sampler halves the width, so levels after the first start at half.
            let (mut in_dim, out_dim) = (if i > 0 { dims[i] / 2 } else { dims[i] }, dims[i + 1]);
            let v = vb.pp("up_blocks").pp(i);
            let mut resnets = Vec::with_capacity(cfg.num_res_blocks + 1);
            for j in 0..=cfg.num_res_blocks {
                resnets.push(ResidualBlock::new(in_dim, out_dim, v.pp("resnets").pp(j))?);
                in_dim = out_dim;
            }
            let upsampler = if i != levels - 1 {
                let mode = if temperal_upsample[i] { ResampleMode::Upsample3d } else { ResampleMode::Upsample2d };
                Some(Resample::new(out_dim, mode, v.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let last = dims[levels];
        Ok(Self {
            conv_in: CausalConv3d::cube(cfg.z_dim, dims[0], 3, vb.pp("conv_in"))?,
            mid_block: MidBlock::new(dims[0], vb.pp("mid_block"))?,
            up_blocks,
            norm_out: RmsNorm::new(last, false, vb.pp("norm_out"))?,
            conv_out: CausalConv3d::cube(last, cfg.out_channels, 3, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut CacheCursor) -> Result<Tensor> {
        let x = self.conv_in.forward_cached(x, cache)?;
        let mut x = self.mid_block.forward(&x, cache)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(&x, cache)?;
            }
            if let Some(up) = &block.upsampler {
                x = up.forward(&x, cache)?;
            }
        }
        let x = ops::silu(&self.norm_out.forward(&x)?)?;
        self.conv_out.forward_cached(&x, cache)
    }
}

// ---------------------------------------------------------------------------------------------
// The model

/// The encoder's posterior N(mean, exp(logvar)) per latent element (diffusers'
/// `DiagonalGaussianDistribution`, log-variance clamped to [−30, 20]).
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// The posterior mean (upstream's `mode()`): what conditioning uses.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// mean + exp(logvar / 2)·ε, ε from a seeded generator (device-independent).
    pub fn sample(&self, seed: u64) -> Result<Tensor> {
        let eps = shared::rng::SplitMix64::new(seed).normal_tensor(
            self.mean.shape(),
            self.mean.dtype(),
            self.mean.device(),
        )?;
        &self.mean + (self.logvar.affine(0.5, 0.0)?.exp()? * eps)?
    }
}

/// diffusers' `AutoencoderKLWan` (Wan2.1). Weights are plain tensors from the `VarBuilder`:
/// nothing here records weight gradients.
#[derive(Clone, Debug)]
pub struct AutoencoderKLWan {
    cfg: Config,
    /// Residual blocks checkpointed inside each chunk of the decode VJP (default on).
    vjp_checkpointing: bool,
    /// Chunks per tape segment (`None`: ⌈√chunks⌉); see [`AutoencoderKLWan::set_tape_segment`].
    tape_segment: Option<usize>,
    encoder: Encoder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    decoder: Decoder,
}

/// One decoded chunk: its frames and the cache the next chunk reads.
pub struct DecodedChunk {
    pub frames: Tensor,
    pub cache: FeatureCache,
}

impl AutoencoderKLWan {
    /// Builds the model from diffusers-named weights under `vb` (the `vae/` folder's root).
    pub fn new(cfg: &Config, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let z = cfg.z_dim;
        Ok(Self {
            cfg: cfg.clone(),
            vjp_checkpointing: true,
            tape_segment: None,
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            quant_conv: CausalConv3d::cube(2 * z, 2 * z, 1, vb.pp("quant_conv"))?,
            post_quant_conv: CausalConv3d::cube(z, z, 1, vb.pp("post_quant_conv"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
        })
    }

    /// Loads a diffusers `vae/` folder (`config.json` + `diffusion_pytorch_model.safetensors`),
    /// checking that the file holds exactly the weights the config's model has (names, shapes,
    /// finite values), every problem named at once.
    pub fn from_dir(dir: &std::path::Path, dtype: DType, device: &candle_core::Device) -> anyhow::Result<Self> {
        use anyhow::Context;
        let cfg = Config::from_json_file(&dir.join("config.json"))?;
        let recorder = shared::weights::ShapeRecorder::new();
        Self::new(&cfg, recorder.var_builder(dtype, device))?;
        let path = dir.join("diffusion_pytorch_model.safetensors");
        let vb = shared::weights::varbuilder_for_model(&path, &recorder.shapes(), dtype, device)
            .with_context(|| format!("loading the Wan VAE from {}", dir.display()))?;
        Self::new(&cfg, vb)
    }

    /// A model with every weight random and non-zero, for tests and benchmarks (a zero-initialised
    /// path hides bugs): convs N(0, 1/fan_in), biases N(0, 0.1²), RMS gains 1 + N(0, 0.2²), and
    /// `decoder.conv_out` × 0.15 so that the decoded video is mostly inside the clamp (a clamped
    /// pixel has no gradient). `benches/vae_torch.py` draws the same scheme in PyTorch.
    pub fn random(cfg: &Config, seed: u64, dtype: DType, device: &candle_core::Device) -> anyhow::Result<Self> {
        let recorder = shared::weights::ShapeRecorder::new();
        Self::new(cfg, recorder.var_builder(dtype, device))?;
        let mut rng = shared::rng::SplitMix64::new(seed);
        let mut tensors = std::collections::HashMap::new();
        for (name, shape) in recorder.shapes() {
            let t = rng.normal_tensor(shape.as_slice(), DType::F64, device)?;
            let t = if name.ends_with("gamma") {
                ((t * 0.2)? + 1.0)?
            } else if name.ends_with("bias") {
                (t * 0.1)?
            } else {
                let fan_in: usize = shape[1..].iter().product();
                let gain = if name == "decoder.conv_out.weight" { 0.15 } else { 1.0 };
                (t * (gain / (fan_in as f64).sqrt()))?
            };
            tensors.insert(name, t.to_dtype(dtype)?);
        }
        Self::new(cfg, VarBuilder::from_tensors(tensors, dtype, device))
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Whether [`DecodeTape::vjp`] checkpoints each residual block inside a chunk (default:
    /// yes). The gradient is the same (test); one chunk's backward then holds the blocks' inputs
    /// and one block's graph instead of the whole chunk's graph (at 704×1280 a chunk's graph is
    /// ~0.1 GB per latent pixel … see `cosmos::memory_plan`), for one more forward of the blocks.
    pub fn set_vjp_checkpointing(&mut self, enabled: bool) {
        self.vjp_checkpointing = enabled;
    }

    /// How many chunks share one stored feature cache in [`Self::decode_taped`]'s tape: the tape
    /// keeps the cache entering every `segment`-th chunk, and [`DecodeTape::vjp`] decodes each
    /// segment forward again (no graph) to rebuild the caches between. `Some(1)` stores every
    /// chunk's cache (no extra forward); `None` (the default) takes ⌈√chunks⌉, so that the tape
    /// and one segment's rebuilt caches together hold ~2√chunks caches instead of one per chunk,
    /// for one more decode forward. Why: one chunk's cache is 2 frames of every cached conv's
    /// input at its resolution, ~4.9 KB per output pixel in bf16 — 1.9 GB per chunk at 480×832,
    /// 4.3 GB at 704×1280, times 23 chunks for 93 frames. A segment of 0 is refused.
    pub fn set_tape_segment(&mut self, segment: Option<usize>) -> Result<()> {
        if segment == Some(0) {
            bail!("Wan VAE: a tape segment must hold at least one chunk")
        }
        self.tape_segment = segment;
        Ok(())
    }

    /// Chunks per tape segment for `chunks` latent frames.
    pub fn tape_segment(&self, chunks: usize) -> usize {
        self.tape_segment.unwrap_or_else(|| (chunks as f64).sqrt().ceil() as usize).max(1)
    }

    /// The weights' dtype (inputs are cast to it).
    pub fn dtype(&self) -> DType {
        self.quant_conv.weight.dtype()
    }

    fn check_input(&self, x: &Tensor, channels: usize, what: &str) -> Result<()> {
        let (_, c, t, h, w) = x.dims5()?;
        let s = self.cfg.spatial_factor();
        if c != channels {
            bail!("Wan VAE {what}: {c} channels, expected {channels}")
        }
        if t == 0 || (what == "encode" && (h % s != 0 || w % s != 0)) {
            bail!("Wan VAE {what}: {t} frames of {h}×{w}; needs ≥ 1 frame and H, W multiples of {s}")
        }
        Ok(())
    }

    // -- Encoding ---------------------------------------------------------------------------

    /// Encodes a video (B, C, F, H, W) in [−1, 1], F = 4k + 1 and H, W multiples of 8, in chunks
    /// of 1, 4, 4, … frames, into the posterior over (B, z, (F − 1)/4 + 1, H/8, W/8). Conditioning
    /// only: the input is detached, so no graph is recorded.
    pub fn encode(&self, video: &Tensor) -> Result<DiagonalGaussian> {
        self.check_input(video, self.cfg.in_channels, "encode")?;
        let video = video.detach().to_dtype(self.dtype())?;
        let frames = video.dim(2)?;
        let k = self.cfg.temporal_factor();
        if (frames - 1) % k != 0 {
            // Upstream silently drops the frames after the last full chunk.
            bail!("Wan VAE encode: {frames} frames; the VAE encodes 1 + {k}·n frames (pad or trim the video)")
        }
        let mut cache: FeatureCache = Vec::new();
        let mut outputs = Vec::with_capacity(self.cfg.latent_frames(frames));
        let mut start = 0;
        while start < frames {
            let len = if start == 0 { 1 } else { k };
            let mut cursor = CacheCursor::new(&cache);
            outputs.push(self.encoder.forward(&video.narrow(2, start, len)?, &mut cursor)?);
            cache = cursor.output;
            start += len;
        }
        let h = self.quant_conv.forward(&Tensor::cat(&outputs, 2)?, None, None)?;
        let z = self.cfg.z_dim;
        Ok(DiagonalGaussian { mean: h.narrow(1, 0, z)?, logvar: h.narrow(1, z, z)?.clamp(-30.0, 20.0)? })
    }

    // -- Decoding ---------------------------------------------------------------------------

    /// Decodes one latent frame (B, z, 1, h, w) given the cache of the previous chunk (empty for
    /// the first): 1 frame for the first chunk, 4 after, clamped to [−1, 1]. A pure function of
    /// its inputs — the unit of the recomputing backward.
    pub fn decode_chunk(&self, latent_frame: &Tensor, cache: &[CacheSlot]) -> Result<DecodedChunk> {
        let mut cursor = CacheCursor::new(cache);
        let frames = self.decode_chunk_with(latent_frame, &mut cursor)?;
        Ok(DecodedChunk { frames, cache: cursor.output })
    }

    /// One chunk's frames in the backward: the outgoing cache is not built, its adjoint
    /// (`cache_adjoint[k]` for slot k, from the next chunk) is injected instead.
    fn decode_chunk_adjoint(
        &self,
        latent_frame: &Tensor,
        cache: &[CacheSlot],
        cache_adjoint: &[Option<Tensor>],
    ) -> Result<Tensor> {
        self.decode_chunk_with(
            latent_frame,
            &mut CacheCursor::with_adjoints(cache, cache_adjoint, self.vjp_checkpointing),
        )
    }

    fn decode_chunk_with(&self, latent_frame: &Tensor, cursor: &mut CacheCursor) -> Result<Tensor> {
        let x = self.post_quant_conv.forward(&latent_frame.to_dtype(self.dtype())?, None, None)?;
        self.decoder.forward(&x, cursor)?.clamp(-1.0, 1.0)
    }

    /// Decodes latents (B, z, n, h, w) (un-normalised: see [`Self::denormalize_latents`]) to a
    /// video (B, C, 4(n − 1) + 1, 8h, 8w) in [−1, 1], one latent frame at a time as upstream.
    /// Differentiable as one graph when `z` is (the full-graph reference); the memory-flat
    /// gradient is [`Self::decode_taped`] + [`DecodeTape::vjp`].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check_input(z, self.cfg.z_dim, "decode")?;
        let mut cache: FeatureCache = Vec::new();
        let mut chunks = Vec::with_capacity(z.dim(2)?);
        for i in 0..z.dim(2)? {
            let chunk = self.decode_chunk(&z.narrow(2, i, 1)?, &cache)?;
            chunks.push(chunk.frames);
            cache = chunk.cache;
        }
        Tensor::cat(&chunks, 2)
    }

    /// Decodes with no graph and keeps what the recomputing backward needs: each chunk's latent
    /// frame, and the incoming cache of every segment's first chunk (detached; see
    /// [`Self::set_tape_segment`]).
    pub fn decode_taped(&self, z: &Tensor) -> Result<(Tensor, DecodeTape)> {
        self.check_input(z, self.cfg.z_dim, "decode")?;
        let z = z.detach();
        let n = z.dim(2)?;
        let segment = self.tape_segment(n);
        let mut tape = DecodeTape { latent_frames: Vec::new(), caches: Vec::new(), chunk_lengths: Vec::new(), segment };
        let mut cache: FeatureCache = Vec::new();
        let mut chunks = Vec::with_capacity(n);
        for i in 0..n {
            let frame = owned(&z.narrow(2, i, 1)?)?;
            let chunk = self.decode_chunk(&frame, &cache)?;
            tape.latent_frames.push(frame);
            let read = std::mem::replace(&mut cache, chunk.cache);
            tape.caches.push((i % segment == 0).then_some(read));
            tape.chunk_lengths.push(chunk.frames.dim(2)?);
            chunks.push(chunk.frames);
        }
        Ok((Tensor::cat(&chunks, 2)?, tape))
    }

    // -- Latent normalisation ----------------------------------------------------------------

    fn per_channel(&self, values: &[f64], like: &Tensor) -> Result<Tensor> {
        let c = values.len();
        Tensor::from_vec(values.to_vec(), (1, c, 1, 1, 1), like.device())?.to_dtype(like.dtype())
    }

    /// (μ − mean)/std per latent channel: the normalised latents the DiT works in.
    pub fn normalize_latents(&self, mu: &Tensor) -> Result<Tensor> {
        mu.broadcast_sub(&self.per_channel(&self.cfg.latents_mean, mu)?)?
            .broadcast_div(&self.per_channel(&self.cfg.latents_std, mu)?)
    }

    /// z·std + mean: back to what [`Self::decode`] takes.
    pub fn denormalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        z.broadcast_mul(&self.per_channel(&self.cfg.latents_std, z)?)?
            .broadcast_add(&self.per_channel(&self.cfg.latents_mean, z)?)
    }
}

/// What [`AutoencoderKLWan::decode_taped`] keeps for the backward: per chunk, its latent frame,
/// and the cache read by the first chunk of each segment. Nothing else of the forward survives.
pub struct DecodeTape {
    latent_frames: Vec<Tensor>,
    /// The cache chunk i read, for i a multiple of `segment`.
    caches: Vec<Option<FeatureCache>>,
    chunk_lengths: Vec<usize>,
    segment: usize,
}

impl DecodeTape {
    /// Bytes held: the latent frames and the stored caches.
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.latent_frames.iter().map(size).sum::<usize>()
            + self.caches.iter().flatten().flatten().filter_map(CacheSlot::frames).map(size).sum::<usize>()
    }

    /// The vector–Jacobian product of the decode: ∂⟨video, grad_video⟩/∂z, rebuilding one chunk's
    /// graph at a time from the last, with the adjoints of the caches carried between chunks. Per
    /// segment (last first), the caches its chunks read are decoded again from the stored one.
    /// Equals the full-graph backward of [`AutoencoderKLWan::decode`] (test).
    pub fn vjp(&self, vae: &AutoencoderKLWan, grad_video: &Tensor) -> Result<Tensor> {
        let total: usize = self.chunk_lengths.iter().sum();
        if grad_video.dim(2)? != total {
            bail!("decode vjp: gradient has {} frames, the decode produced {total}", grad_video.dim(2)?)
        }
        let n = self.latent_frames.len();
        let mut grad_frames = vec![None; n];
        // Adjoint of the cache that chunk i + 1 read (= chunk i's outgoing cache).
        let mut cache_adjoint: Vec<Option<Tensor>> = Vec::new();
        let mut end = total;
        let starts: Vec<usize> = (0..n).step_by(self.segment).collect();
        for &start in starts.iter().rev() {
            let stop = (start + self.segment).min(n);
            // The caches chunks start..stop read: the stored one, then decoded forward again.
            let stored = self.caches[start].clone().ok_or_else(|| {
                candle_core::Error::Msg(format!("decode vjp: the tape has no cache for chunk {start}"))
            })?;
            let mut caches = vec![stored];
            for i in start..stop - 1 {
                let next = vae.decode_chunk(&self.latent_frames[i], &caches[i - start])?.cache;
                caches.push(next);
            }
            for i in (start..stop).rev() {
                let len = self.chunk_lengths[i];
                end -= len;
                let frame = Var::from_tensor(&self.latent_frames[i])?;
                let read = caches.pop().expect("one cache per chunk of the segment");
                // The incoming cache as vars, so its adjoint can be read off.
                let cache_vars: Vec<Option<Var>> =
                    read.iter().map(|slot| slot.frames().map(Var::from_tensor).transpose()).collect::<Result<_>>()?;
                let cache_in: FeatureCache = read
                    .iter()
                    .zip(&cache_vars)
                    .map(|(slot, var)| match var {
                        Some(v) => CacheSlot::Frames(v.as_tensor().clone()),
                        None => slot.clone(),
                    })
                    .collect();
                drop(read);
                // ⟨frames, g⟩; the outgoing cache's adjoint enters inside (see `causal_pad`).
                let frames = vae.decode_chunk_adjoint(frame.as_tensor(), &cache_in, &cache_adjoint)?;
                let g = grad_video.narrow(2, end, len)?.to_dtype(frames.dtype())?;
                let grads = (frames * g)?.sum_all()?.backward()?;
                grad_frames[i] = Some(match grads.get(frame.as_tensor()) {
                    Some(g) => g.detach(),
                    None => frame.as_tensor().zeros_like()?,
                });
                cache_adjoint = cache_vars
                    .iter()
                    .map(|v| v.as_ref().and_then(|v| grads.get(v.as_tensor())).map(Tensor::detach))
                    .collect();
            }
        }
        let frames: Vec<Tensor> = grad_frames.into_iter().map(|g| g.expect("every chunk visited")).collect();
        Tensor::cat(&frames, 2)
    }
}

/// An objective on the video decoded from normalised latents: `inner((decode(z·std + mean) + 1)/2)`,
/// the inner objective seeing frames in [0, 1]. Its [`Objective::value_and_grad`] decodes with
/// [`AutoencoderKLWan::decode_taped`] and backpropagates with [`DecodeTape::vjp`] (one chunk's
/// graph at a time), so z0 → trajectory → decode → objective runs in bounded memory; its
/// [`Objective::loss`] is the full graph (the reference the recomputation is tested against).
pub struct DecodedObjective<'a, O> {
    pub vae: &'a AutoencoderKLWan,
    pub inner: O,
}

impl<O: crate::objective::Objective> DecodedObjective<'_, O> {
    fn to_unit_range(video: &Tensor) -> Result<Tensor> {
        video.affine(0.5, 0.5)
    }
}

impl<O: crate::objective::Objective> crate::objective::Objective for DecodedObjective<'_, O> {
    fn loss(&self, latents: &Tensor) -> Result<Tensor> {
        let video = self.vae.decode(&self.vae.denormalize_latents(latents)?)?;
        self.inner.loss(&Self::to_unit_range(&video)?)
    }

    fn value_and_grad(&self, latents: &Tensor) -> Result<(f64, Tensor)> {
        let raw = self.vae.denormalize_latents(&latents.detach())?;
        let (video, tape) = self.vae.decode_taped(&raw)?;
        let (value, grad_frames) = self.inner.value_and_grad(&Self::to_unit_range(&video)?)?;
        let grad_raw = tape.vjp(self.vae, &(grad_frames * 0.5)?)?;
        // d raw / d z = std, per channel.
        let std = self.vae.per_channel(&self.vae.cfg.latents_std, &grad_raw)?;
        Ok((value, grad_raw.broadcast_mul(&std)?.to_dtype(latents.dtype())?))
    }

    fn describe(&self) -> String {
        format!("{} on the Wan VAE's decoded video", self.inner.describe())
    }
}
