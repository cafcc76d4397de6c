//! How much memory one iteration of the z0 optimisation needs — value and ∇z0 through every
//! denoising step of a Cosmos DiT and the Wan VAE decode — predicted from the configs and the
//! video size before anything is allocated (the CLI's `--dry-run`).
//!
//! One iteration (`Trajectory::value_and_grad`, per-step recomputation) holds at its peak:
//! * the weights (DiT + VAE), counted exactly from the models' parameter shapes;
//! * the stored trajectory: x_0 … x_N (Euler keeps no solver state), and a few latent-sized
//!   tensors (z0, its gradient, the adjoint, the conditioning latents);
//! * the larger of
//!   - one step's VJP: the step's graph rebuilt and backpropagated. CFG makes two DiT calls per
//!     step, both in the graph. With the DiT's `MemoryMode::low_memory()` each call keeps its
//!     segment inputs (⌈√layers⌉ blocks per segment), its final layer and positional tables; the
//!     backward rebuilds one segment's block inputs, one block's three branch outputs and one
//!     branch's graph at a time, plus that branch's backward working set and the attention
//!     tiles. Without checkpointing every block's graph is kept, and without tiled attention
//!     every (heads × N × N) score matrix;
//!   - the decode VJP: the video and its gradient, the decode tape (latent frames and one feature
//!     cache per tape segment), one segment's rebuilt caches, and one chunk (one latent frame → 4
//!     frames) whose layers are checkpointed: their inputs, the unchecked layers' graphs, the
//!     largest layer's graph and its backward working set.
//!
//! The graphs are counted op by op from the code (`branch_graphs`, `residual_block_elements`,
//! `decode_chunk_elements` say which tensors each op keeps). What the counts cannot see — the
//! gradients and temporaries alive during a backward — are factors fitted to measured heap peaks
//! (counting allocator, CPU, small sizes; `calibration` says on what), and checked at other sizes,
//! layer counts, with and without CFG and in bf16 (`tests/cosmos_memory_plan.rs`: predicted /
//! measured 0.92–1.11; `benches/cosmos_memory.rs`). Not counted: the device allocator's caching
//! and fragmentation, and a CUDA context — leave a margin on a GPU.

use std::fmt;

use candle_core::DType;

use super::transformer::{Config as TransformerConfig, CosmosTransformer3DModel, MemoryMode};
use super::vae::{AutoencoderKLWan, Config as VaeConfig};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// What the plan is for: one video size, the sampler settings, and how the models save memory.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanRequest {
    pub height: usize,
    pub width: usize,
    pub num_frames: usize,
    pub steps: usize,
    /// Classifier-free guidance (g > 1): two DiT calls per step.
    pub guidance: bool,
    /// The weights' and activations' dtype.
    pub dtype: DType,
    /// The DiT's block checkpointing and attention tiling.
    pub dit: MemoryMode,
    /// The objective reads the decoded video (the gradient goes through the VAE decode).
    pub decode: bool,
    /// The decode VJP checkpoints the layers inside each chunk
    /// (`AutoencoderKLWan::set_vjp_checkpointing`, on by default).
    pub vae_checkpointing: bool,
    /// Chunks per decode-tape segment (`AutoencoderKLWan::set_tape_segment`; `None`: ⌈√chunks⌉).
    pub vae_tape_segment: Option<usize>,
    /// Prompt tokens (T5 embeddings: 512).
    pub context_tokens: usize,
    /// Latent-sized solver-state tensors stored per step (Euler 0; UniPC 3, Predict2.5).
    pub solver_state_per_step: usize,
    /// Transfer2.5: the ControlNet's config and how many run before each DiT call (one per
    /// control). `num_frames` is then one chunk's.
    pub controlnets: Option<(super::controlnet::Config, usize)>,
}

impl PlanRequest {
    /// The Predict2 defaults: 35 steps, CFG, bf16, the low-memory DiT, the decode in the
    /// objective, 512 prompt tokens.
    pub fn new(height: usize, width: usize, num_frames: usize) -> Self {
        Self {
            height,
            width,
            num_frames,
            steps: 35,
            guidance: true,
            dtype: DType::BF16,
            dit: MemoryMode::low_memory(),
            decode: true,
            vae_checkpointing: true,
            vae_tape_segment: None,
            context_tokens: 512,
            solver_state_per_step: 0,
            controlnets: None,
        }
    }
}

/// One line of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub name: String,
    pub bytes: f64,
    pub detail: String,
}

/// The predicted memory of one z0 optimisation iteration (batch 1). See the module docs.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    pub request: PlanRequest,
    transformer: TransformerConfig,
    vae: VaeConfig,
    /// Parameters of the DiT and of the VAE.
    parameters: (usize, usize),
    /// (B, C, T, H, W) of the latents.
    pub latent: [usize; 5],
    /// DiT tokens per call.
    pub tokens: usize,
    pub dit_weights: f64,
    pub vae_weights: f64,
    /// Transfer2.5's ControlNets (0 without).
    pub controlnet_weights: f64,
    /// x_0 … x_N and the latent-sized working tensors.
    pub trajectory: f64,
    /// One step's VJP (above the weights and the trajectory), by part.
    pub step_vjp: Vec<Term>,
    /// The decode VJP (above the weights and the trajectory), by part; empty without decode.
    pub decode_vjp: Vec<Term>,
}

/// Element sizes: the model dtype's, and the one attention tiles compute in (f32 for half
/// precision, as `shared::ops::sdpa_tiled` does).
#[derive(Clone, Copy, Debug)]
struct Sizes {
    model: f64,
    attention: f64,
}

impl Sizes {
    fn of(dtype: DType) -> Self {
        let model = dtype.size_in_bytes() as f64;
        match dtype {
            DType::F16 | DType::BF16 => Self { model, attention: 4.0 },
            _ => Self { model, attention: model },
        }
    }
}

/// Calibrated factors (see the module docs and `tests/cosmos_memory_plan.rs`, where the measured
/// values they come from are printed beside the prediction).
mod calibration {
    /// A branch's backward holds, beyond its graph and the attention's working set, gradients
    /// and temporaries: N·D units of the model dtype. Fitted to the bench's warm heap peaks
    /// (f32, 128–512 tokens, D = 256: predicted/measured 1.0–1.1).
    pub const DIT_BACKWARD_ND: f64 = 24.0;
    /// Without checkpointing, each block's graph also holds what the counts miss (gradients of
    /// the composed attention's constants, contiguous copies): N·D units per block and call,
    /// fitted with one more (heads × N × M) matrix than counted, on the same measurements.
    pub const DIT_PLAIN_BLOCK_ND: f64 = 12.0;
    /// The backward of the decode's largest layer (a full-resolution residual block): its
    /// gradients, the convolutions' column buffers and temporaries, in units of the block's
    /// input size.
    pub const VAE_BACKWARD_INPUTS: f64 = 28.0;
}

impl MemoryPlan {
    /// The plan of `request` for these models. Errors name a size the models cannot take.
    pub fn new(transformer: &TransformerConfig, vae: &VaeConfig, request: &PlanRequest) -> anyhow::Result<Self> {
        transformer.validate()?;
        vae.validate()?;
        let parameters = (parameter_count_dit(transformer)?, parameter_count_vae(vae)?);
        Self::with_parameters(transformer, vae, request, parameters)
    }

    /// The plan of another request for the same models.
    pub fn with_request(&self, request: &PlanRequest) -> anyhow::Result<Self> {
        Self::with_parameters(&self.transformer, &self.vae, request, self.parameters)
    }

    fn with_parameters(
        transformer: &TransformerConfig,
        vae: &VaeConfig,
        request: &PlanRequest,
        parameters: (usize, usize),
    ) -> anyhow::Result<Self> {
        use anyhow::ensure;
        let r = request;
        let s = vae.spatial_factor();
        let [pt, ph, pw] = transformer.patch_size;
        ensure!(r.num_frames >= 1 && r.steps >= 1, "the plan needs at least one frame and one step");
        ensure!(
            r.height.is_multiple_of(s * ph) && r.width.is_multiple_of(s * pw) && r.height > 0 && r.width > 0,
            "height and width must be positive multiples of {} (VAE {s}× × patch {ph}×{pw}), got {}×{}",
            s * ph.max(pw),
            r.height,
            r.width
        );
        if let Some(tile) = r.dit.attention_tile {
            ensure!(tile > 0, "the attention tile must be at least 1");
        }
        let latent = [1, vae.z_dim, vae.latent_frames(r.num_frames), r.height / s, r.width / s];
        ensure!(
            latent[2].is_multiple_of(pt),
            "{} latent frames are not divisible by the temporal patch {pt}",
            latent[2]
        );
        let tokens = latent[2] / pt * (latent[3] / ph) * (latent[4] / pw);
        let sizes = Sizes::of(r.dtype);

        let [mt, mh, mw] = transformer.max_size;
        ensure!(
            latent[2] <= mt && latent[3] <= mh && latent[4] <= mw,
            "{} frames of {}×{} are {}×{}×{} latents; the transformer covers at most {mt}×{mh}×{mw} (its max_size)",
            r.num_frames,
            r.height,
            r.width,
            latent[2],
            latent[3],
            latent[4]
        );
        let dit_weights = parameters.0 as f64 * sizes.model;
        let vae_weights = parameters.1 as f64 * sizes.model;
        let latent_bytes = latent.iter().product::<usize>() as f64 * sizes.model;
        // x_0 … x_N and the solver state entering each step; z0, its gradient, the adjoint, the
        // conditioning latents and the target.
        let trajectory = ((r.steps + 1) + r.steps * r.solver_state_per_step) as f64 * latent_bytes + 5.0 * latent_bytes;

        let mut step_vjp = dit_step_terms(transformer, r, tokens, latent_bytes, sizes);
        let (controlnet_weights, control_latents) = match &r.controlnets {
            Some((cfg, count)) => {
                ensure!(*count >= 1, "a Transfer2.5 plan needs at least one ControlNet");
                step_vjp.extend(controlnet_step_terms(transformer, cfg, *count, r, tokens, sizes));
                (parameter_count_controlnet(cfg)? as f64 * sizes.model * *count as f64, *count as f64 * latent_bytes)
            }
            None => (0.0, 0.0),
        };
        let trajectory = trajectory + control_latents;
        let decode_vjp = if r.decode { decode_terms(vae, r, latent, sizes) } else { Vec::new() };
        Ok(Self {
            request: r.clone(),
            transformer: transformer.clone(),
            vae: vae.clone(),
            parameters,
            latent,
            tokens,
            dit_weights,
            vae_weights,
            controlnet_weights,
            trajectory,
            step_vjp,
            decode_vjp,
        })
    }

    pub fn step_vjp_bytes(&self) -> f64 {
        self.step_vjp.iter().map(|t| t.bytes).sum()
    }

    pub fn decode_vjp_bytes(&self) -> f64 {
        self.decode_vjp.iter().map(|t| t.bytes).sum()
    }

    /// The peak above the weights: the trajectory and the larger VJP.
    pub fn working_bytes(&self) -> f64 {
        self.trajectory + self.step_vjp_bytes().max(self.decode_vjp_bytes())
    }

    /// The whole predicted peak.
    pub fn peak_bytes(&self) -> f64 {
        self.dit_weights + self.vae_weights + self.controlnet_weights + self.working_bytes()
    }

    /// The most frames (1 + 4k, as the VAE takes them) whose plan fits in `free_bytes` at this
    /// request's height and width; `None` when not even one frame does.
    pub fn largest_frames(&self, free_bytes: u64) -> Option<usize> {
        let step = self.vae.temporal_factor();
        let most = self.vae.decoded_frames(self.transformer.max_size[0]);
        let fits = |frames: usize| {
            let req = PlanRequest { num_frames: frames, ..self.request.clone() };
            self.with_request(&req).is_ok_and(|p| p.peak_bytes() <= free_bytes as f64)
        };
        // The peak grows with the frames: the largest k with 1 + step·k fitting, by bisection.
        if !fits(1) {
            return None;
        }
        let (mut lo, mut hi) = (0, (most - 1) / step + 1);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if fits(1 + step * mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(1 + step * lo)
    }

    /// The largest height × width with this request's aspect ratio (both multiples of 16) whose
    /// plan fits in `free_bytes` at this number of frames; `None` when not even 16 pixels do.
    pub fn largest_size(&self, free_bytes: u64) -> Option<(usize, usize)> {
        const STEP: usize = 16;
        let aspect = self.request.width as f64 / self.request.height as f64;
        let size = |k: usize| {
            let h = STEP * k;
            let w = ((h as f64 * aspect / STEP as f64).round() as usize).max(1) * STEP;
            (h, w)
        };
        let fits = |k: usize| {
            let (height, width) = size(k);
            let req = PlanRequest { height, width, ..self.request.clone() };
            self.with_request(&req).is_ok_and(|p| p.peak_bytes() <= free_bytes as f64)
        };
        if !fits(1) {
            return None;
        }
        let (mut lo, mut hi) = (1, 2);
        while fits(hi) {
            (lo, hi) = (hi, hi * 2);
        }
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(size(lo))
    }

    /// `Ok` when the peak fits in `free_bytes`; otherwise what dominates and what to lower (with
    /// the most frames, and the largest size, that would fit).
    pub fn fits(&self, free_bytes: u64) -> Result<(), String> {
        let peak = self.peak_bytes();
        if peak <= free_bytes as f64 {
            return Ok(());
        }
        let (step, decode) = (self.step_vjp_bytes(), self.decode_vjp_bytes());
        let r = &self.request;
        let advice = if decode > step {
            format!(
                "the VAE decode's VJP ({:.1} GiB, one chunk of {}×{} pixels) dominates: lower --height/--width",
                decode / GIB,
                r.height,
                r.width
            )
        } else if self.trajectory > step {
            format!("the stored trajectory ({:.1} GiB) dominates: lower --steps", self.trajectory / GIB)
        } else {
            let mut a = format!(
                "one step's VJP through the DiT ({:.1} GiB, {} tokens) dominates: lower --height/--width or \
                 --num-frames",
                step / GIB,
                self.tokens
            );
            if !r.dit.checkpoint_blocks || r.dit.attention_tile.is_none() {
                a.push_str(", or turn on block checkpointing and tiled attention");
            }
            if r.guidance {
                a.push_str(", or guidance off (one DiT call per step instead of two)");
            }
            a
        };
        let mut within = Vec::new();
        if let Some(frames) = self.largest_frames(free_bytes) {
            within.push(format!("--num-frames {frames} at {}×{}", r.height, r.width));
        }
        if let Some((h, w)) = self.largest_size(free_bytes) {
            within.push(format!("{h}×{w} at {} frames", r.num_frames));
        }
        let within = if within.is_empty() {
            " Nothing of this kind fits: lower --steps, or use a device with more memory".to_string()
        } else {
            format!(" Would fit: {}", within.join(", or "))
        };
        Err(format!(
            "z0 optimisation at {}×{}×{} needs about {:.1} GiB, {:.1} GiB are free: {advice}.{within}",
            r.height,
            r.width,
            r.num_frames,
            peak / GIB,
            free_bytes as f64 / GIB
        ))
    }
}

fn parameter_count_dit(cfg: &TransformerConfig) -> anyhow::Result<usize> {
    let recorder = shared::weights::ShapeRecorder::new();
    CosmosTransformer3DModel::new(cfg, recorder.var_builder(DType::F32, &candle_core::Device::Cpu))?;
    Ok(recorder.parameter_count())
}

fn parameter_count_controlnet(cfg: &super::controlnet::Config) -> anyhow::Result<usize> {
    let recorder = shared::weights::ShapeRecorder::new();
    super::controlnet::CosmosControlNetModel::new(cfg, recorder.var_builder(DType::F32, &candle_core::Device::Cpu))?;
    Ok(recorder.parameter_count())
}

/// Transfer2.5's additions to one step's VJP, per DiT call (two with CFG) and ControlNet: its
/// patchified control and base inputs, its block inputs (checkpointed blocks; the ControlNet does
/// not segment them) or whole graphs, and its residual samples (`after_proj` and the scaled
/// copy, kept until the DiT adds them); and the DiT's image context — its projection per call,
/// and k, v and k's norm of the image tokens in the one block graph rebuilt at a time. The
/// rebuilt ControlNet block is no larger than the DiT's, already counted.
fn controlnet_step_terms(
    dit: &TransformerConfig,
    cfg: &super::controlnet::Config,
    count: usize,
    r: &PlanRequest,
    tokens: usize,
    s: Sizes,
) -> Vec<Term> {
    let n = tokens as f64;
    let d = cfg.hidden_size() as f64;
    let nd = n * d * s.model;
    let calls = if r.guidance { 2.0 } else { 1.0 } * count as f64;
    let blocks = cfg.n_controlnet_blocks as f64;
    let patch: usize = cfg.patch_size.iter().product();
    let inputs = 2.0 * n * ((cfg.in_channels + cfg.latent_channels) * patch) as f64 * s.model;
    let graphs = if r.dit.checkpoint_blocks {
        (blocks + 1.0) * nd
    } else {
        let tiled = r.dit.attention_tile.is_some();
        let block_graph: f64 = branch_graphs(dit, tiled).iter().sum::<f64>() - 2.0;
        let l = r.context_tokens as f64;
        let attention = if tiled { 0.0 } else { block_attention_matrices(dit, n, l, s) };
        blocks * plain_block(block_graph, nd, 3.0 * l * d * s.model, attention)
    };
    let mut terms = vec![term(
        "ControlNet calls",
        calls * (inputs + graphs + 2.0 * blocks * nd),
        format!(
            "{calls} ControlNet call(s) per step ({count} control(s)): control/base inputs, {} block inputs, {} residuals",
            cfg.n_controlnet_blocks + 1,
            cfg.n_controlnet_blocks
        ),
    )];
    if let Some(dim_in) = dit.img_context_dim_in.filter(|d| *d > 0) {
        let li = dit.img_context_num_tokens as f64;
        let dit_calls = if r.guidance { 2.0 } else { 1.0 };
        terms.push(term(
            "image context",
            dit_calls * li * (dim_in as f64 + d) * s.model + 3.0 * li * d * s.model,
            format!(
                "{} image-context tokens: projection per call, k/v in the rebuilt block",
                dit.img_context_num_tokens
            ),
        ));
    }
    terms
}

fn parameter_count_vae(cfg: &VaeConfig) -> anyhow::Result<usize> {
    let recorder = shared::weights::ShapeRecorder::new();
    AutoencoderKLWan::new(cfg, recorder.var_builder(DType::F32, &candle_core::Device::Cpu))?;
    Ok(recorder.parameter_count())
}

fn term(name: &str, bytes: f64, detail: String) -> Term {
    Term { name: name.to_string(), bytes, detail }
}

/// N·D units one residual branch's forward keeps in its graph (model dtype), counted from
/// `transformer.rs` with the ops of `shared::ops` that keep only their input:
/// * self-attention: AdaLN modulate (the layer norm's output and the scaled-shifted one: 2),
///   q, k, v (3), the q and k RMS norms (2), RoPE of q and k (2), the attention output (1), its
///   head-merge copy (1), the output projection (1), the gate (1), the residual sum (1) = 14, + 1
///   for the learnable positional embedding's sum;
/// * cross-attention: modulate (2), q (1), its RMS norm (1), output, merge copy, projection,
///   gate, sum (5) = 9 (the context's k and v are L·D, counted apart);
/// * MLP: modulate (2), the up projection and its GELU (2r, r = mlp_ratio), the down projection,
///   gate, sum (3) = 5 + 2r.
///
/// Materialising attention (`sdpa`) also copies kᵀ and v contiguous (+2 per attention).
fn branch_graphs(cfg: &TransformerConfig, tiled: bool) -> [f64; 3] {
    let r = cfg.mlp_hidden_size() as f64 / cfg.hidden_size() as f64;
    let pos = if cfg.extra_pos_embed_type.is_some() { 1.0 } else { 0.0 };
    let copies = if tiled { 0.0 } else { 2.0 };
    [14.0 + pos + copies, 9.0 + copies, 5.0 + 2.0 * r]
}

/// The materialised attention matrices of one block (`sdpa`): scores, scaled, shifted, exp and
/// probabilities kept (5 of heads × N × M), and the full-size gradient Candle keeps for the
/// softmax's detached row maximum (broadcast to the matrix) until the backward ends — for self-
/// attention (M = N) and cross-attention (M = L context tokens).
fn block_attention_matrices(cfg: &TransformerConfig, tokens: f64, context: f64, s: Sizes) -> f64 {
    6.0 * cfg.num_attention_heads as f64 * tokens * (tokens + context) * s.model
}

/// Without checkpointing: every block's graph, with [`calibration::DIT_PLAIN_BLOCK_ND`] and one
/// more attention matrix (the softmax backward's temporaries) per block.
fn plain_block(block_graph: f64, nd: f64, context_kv: f64, attention: f64) -> f64 {
    (block_graph + calibration::DIT_PLAIN_BLOCK_ND) * nd + context_kv + attention * 7.0 / 6.0
}

fn dit_step_terms(cfg: &TransformerConfig, r: &PlanRequest, tokens: usize, latent_bytes: f64, s: Sizes) -> Vec<Term> {
    let n = tokens as f64;
    let d = cfg.hidden_size() as f64;
    let l = r.context_tokens as f64;
    let layers = cfg.num_layers as f64;
    let calls = if r.guidance { 2.0 } else { 1.0 };
    let nd = n * d * s.model;
    let mode = r.dit;
    let tiled = mode.attention_tile.is_some();
    let branches = branch_graphs(cfg, tiled);
    let block_graph: f64 = branches.iter().sum::<f64>() - 2.0;
    // The context's k, v and k's RMS norm per block (L·D each).
    let context_kv = 3.0 * l * d * s.model;
    let attention = if tiled { 0.0 } else { block_attention_matrices(cfg, n, l, s) };
    // Per call, whatever the mode: the RoPE tables (cos, sin: N × head_dim/2 each), the learnable
    // positional embedding (N·D), the patchified input and its permuted copy, the final AdaLN
    // (2 N·D) and projection, and ~12 latent-sized tensors of the denoiser (inputs, masks, x0,
    // the CFG mix).
    let [pt, ph, pw] = cfg.patch_size;
    let patch_in = ((cfg.in_channels + 1) * pt * ph * pw) as f64;
    let pos = if cfg.extra_pos_embed_type.is_some() { nd } else { 0.0 };
    let per_call_fixed = n * cfg.attention_head_dim as f64 * s.model
        + pos
        + 2.0 * n * patch_in * s.model
        + 2.0 * nd
        + 12.0 * latent_bytes;
    let mut terms = Vec::new();
    terms.push(term(
        "DiT call inputs/outputs",
        calls * per_call_fixed,
        "RoPE tables, patchified input, final layer, the denoiser's latent-sized tensors".to_string(),
    ));
    let largest_branch = branches.iter().copied().fold(0.0, f64::max);
    match (mode.checkpoint_blocks, mode.checkpoint_sublayers) {
        (true, nested) => {
            let segment = mode.segment_len(cfg.num_layers);
            if segment > 1 {
                let segments = cfg.num_layers.div_ceil(segment);
                terms.push(term(
                    "block inputs",
                    calls * (segments as f64 + 1.0) * nd,
                    format!(
                        "{calls} DiT call(s) × {} segment inputs ({segment} blocks each) of N×D = {tokens}×{}",
                        segments + 1,
                        cfg.hidden_size()
                    ),
                ));
                terms.push(term(
                    "segment recomputation",
                    (segment as f64 + 1.0) * nd,
                    "one segment's input (a fresh copy) and its blocks' outputs".to_string(),
                ));
            } else {
                terms.push(term(
                    "block inputs",
                    calls * (layers + 1.0) * nd,
                    format!(
                        "{calls} DiT call(s) × {} block inputs of N×D = {tokens}×{}",
                        cfg.num_layers + 1,
                        cfg.hidden_size()
                    ),
                ));
            }
            if nested {
                terms.push(term(
                    "block recomputation",
                    4.0 * nd,
                    "the block's input (a fresh copy) and its 3 branch outputs".to_string(),
                ));
                terms.push(term(
                    "one branch's graph",
                    largest_branch * nd + context_kv + attention / 2.0,
                    "the largest residual branch, rebuilt from a copy of its input".to_string(),
                ));
            } else {
                terms.push(term(
                    "one block's graph",
                    (1.0 + block_graph) * nd + context_kv + attention,
                    "rebuilt in the backward from a copy of its input".to_string(),
                ));
            }
        }
        (false, true) => {
            terms.push(term(
                "branch inputs",
                calls * (3.0 * layers + 1.0) * nd,
                format!("{calls} DiT call(s) × {} branch inputs of N×D", 3 * cfg.num_layers + 1),
            ));
            terms.push(term(
                "one branch's graph",
                largest_branch * nd + context_kv + attention / 2.0,
                "the largest residual branch, rebuilt from a copy of its input".to_string(),
            ));
        }
        (false, false) => {
            terms.push(term(
                "all blocks' graphs",
                calls * layers * plain_block(block_graph, nd, context_kv, attention),
                format!("{calls} DiT call(s) × {} blocks", cfg.num_layers),
            ));
        }
    }
    terms.push(term(
        "backward working set",
        calibration::DIT_BACKWARD_ND * nd,
        "gradients and temporaries of one branch's backward (calibrated)".to_string(),
    ));
    if let Some(tile) = mode.attention_tile {
        // sdpa_tiled's backward: working copies of v, O and dO and the gradients of q, k, v with
        // their joined copies (~8 N·D) in the compute dtype (f32 for half precision), and ~3
        // (heads × tile × tile) score-sized blocks (measured: a tile of 512 against 128 at 512
        // tokens, 8 heads, added 3.1 such blocks to the backward's peak).
        let t = tile.min(tokens) as f64;
        let att = s.attention;
        terms.push(term(
            "attention backward",
            8.0 * n * d * att + 3.0 * cfg.num_attention_heads as f64 * t * t * att,
            format!("sdpa_tiled, tile {tile}"),
        ));
    }
    terms
}

/// The decode VJP of one chunk (a non-first one: 1 latent frame → 4 frames, the largest), in
/// elements, by walking the decoder as `vae.rs` builds it.
struct ChunkElements {
    /// Inputs of the checkpointed layers (residual blocks and up-samplers), kept by the graph.
    stored: f64,
    /// Graphs of the layers that are not checkpointed: post_quant_conv and conv_in (latent
    /// resolution), the mid attention, and the output head at full resolution (RMS norm 3, SiLU
    /// 1, causal padding 1.5, conv_out, clamp).
    unchecked: f64,
    /// The largest checkpointed layer's graph when rebuilt, and that layer's input elements.
    largest_layer: f64,
    largest_input: f64,
    /// Every layer's graph at once (the VJP without checkpointing).
    whole: f64,
}

/// A `WanResidualBlock`'s graph per element of its output (E_in = E_out·c_in/c_out): the RMS
/// norm (normalised, × √C, × γ: 3), SiLU (1), causal padding with 2 cached frames ((T + 2)/T)
/// before each conv, the conv outputs (frozen convolutions keep no columns), the residual sum, and
/// the 1×1×1 shortcut when widths differ.
fn residual_block_elements(c_in: f64, c_out: f64, frames: f64, pixels: f64) -> f64 {
    let pad = (frames + 2.0) / frames;
    let (e_in, e_out) = (c_in * frames * pixels, c_out * frames * pixels);
    let shortcut = if c_in != c_out { e_out } else { 0.0 };
    e_in * (3.0 + 1.0 + pad) + e_out * (1.0 + 3.0 + 1.0 + pad + 1.0 + 1.0) + shortcut
}

fn decode_chunk_elements(cfg: &VaeConfig, latent_pixels: f64) -> ChunkElements {
    let dim = cfg.decoder_base_dim.unwrap_or(cfg.base_dim) as f64;
    let mults: Vec<f64> = cfg.dim_mult.iter().map(|&m| m as f64).collect();
    let top = mults.last().copied().unwrap_or(1.0) * dim;
    let ups: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
    let (mut frames, mut pixels) = (1.0, latent_pixels);
    let mut c = ChunkElements { stored: 0.0, unchecked: 0.0, largest_layer: 0.0, largest_input: 0.0, whole: 0.0 };
    let layer = |c: &mut ChunkElements, input: f64, graph: f64| {
        c.stored += input;
        c.whole += graph;
        if graph > c.largest_layer {
            c.largest_layer = graph;
            c.largest_input = input;
        }
    };
    // post_quant_conv, conv_in (+ its padding).
    let head = (cfg.z_dim as f64 * 4.0 + top) * frames * pixels;
    // Mid attention: norm (3 C·P), q/k/v (3) and their contiguous copies (3), output, merge,
    // projection, residual (4): ~13 C·P.
    let attention = 13.0 * top * frames * pixels;
    c.unchecked += head + attention;
    c.whole += head + attention;
    for _ in 0..2 {
        layer(&mut c, top * frames * pixels, residual_block_elements(top, top, frames, pixels));
    }
    let levels = mults.len();
    let dims: Vec<f64> = std::iter::once(top).chain(mults.iter().rev().map(|m| m * dim)).collect();
    for i in 0..levels {
        let (mut c_in, c_out) = (if i > 0 { dims[i] / 2.0 } else { dims[i] }, dims[i + 1]);
        for _ in 0..=cfg.num_res_blocks {
            layer(&mut c, c_in * frames * pixels, residual_block_elements(c_in, c_out, frames, pixels));
            c_in = c_out;
        }
        if i + 1 < levels {
            let input = c_out * frames * pixels;
            let mut graph = 0.0;
            if ups[i] {
                // The temporal conv to 2C over the padded input, the interleaving copy.
                graph += input * (frames + 2.0) / frames + 4.0 * input;
                frames *= 2.0;
            }
            // Frames into the batch (a copy), nearest ×2 (4×), the 3×3 conv to C/2 (2×).
            graph += 7.0 * c_out * frames * pixels;
            layer(&mut c, input, graph);
            pixels *= 4.0;
        }
    }
    let e = dims[levels] * frames * pixels;
    let tail = e * (3.0 + 1.0 + (frames + 2.0) / frames) + 3.0 * cfg.out_channels as f64 * frames * pixels;
    c.unchecked += tail;
    c.whole += tail;
    c
}

fn decode_terms(cfg: &VaeConfig, r: &PlanRequest, latent: [usize; 5], s: Sizes) -> Vec<Term> {
    let latent_pixels = (latent[3] * latent[4]) as f64;
    let video = (cfg.out_channels * r.num_frames * r.height * r.width) as f64 * s.model;
    let chunk = decode_chunk_elements(cfg, latent_pixels);
    let (frame, cache) = cache_elements(cfg, latent_pixels);
    let n = latent[2];
    let segment = r.vae_tape_segment.unwrap_or_else(|| (n as f64).sqrt().ceil() as usize).clamp(1, n);
    // The tape: each chunk's latent frame, and the cache entering each segment but the first
    // (chunk 0 reads none). The cache after chunk 0 has one frame per slot (that chunk decodes
    // one frame), the others two.
    let stored = n.div_ceil(segment) - 1;
    let half_size = if segment == 1 && n > 1 { 0.5 } else { 0.0 };
    let tape = (n as f64 * frame + (stored as f64 - half_size) * cache) * s.model;
    let mut terms = vec![
        term("video and its gradient", 2.0 * video, format!("{} frames of {}×{}", r.num_frames, r.height, r.width)),
        term(
            "decode tape",
            tape,
            format!("{n} chunks' latent frames, {stored} stored feature caches (segments of {segment} chunks)"),
        ),
        // The VJP decodes a segment's caches again and consumes them last first: with the last
        // chunk's cache turned into leaves (a copy, its adjoint is read off), the segment holds
        // segment − 2 others.
        term(
            "segment's caches",
            segment.saturating_sub(2) as f64 * cache * s.model,
            "the caches inside one segment, decoded again in the VJP".to_string(),
        ),
        term(
            "chunk's cache leaves",
            cache * s.model,
            "the incoming cache as leaves (its adjoint is read off)".to_string(),
        ),
    ];
    if r.vae_checkpointing {
        terms.push(term(
            "checkpointed layer inputs",
            chunk.stored * s.model,
            "inputs of the chunk's residual blocks and up-samplers".to_string(),
        ));
        terms.push(term(
            "unchecked layers' graphs",
            chunk.unchecked * s.model,
            "conv_in, the mid attention, the full-resolution output head".to_string(),
        ));
        terms.push(term(
            "one layer's graph",
            (chunk.largest_layer + chunk.largest_input) * s.model,
            "the largest residual block, rebuilt from a copy of its input".to_string(),
        ));
        terms.push(term(
            "backward working set",
            calibration::VAE_BACKWARD_INPUTS * chunk.largest_input * s.model,
            "the largest block's gradients, conv columns and temporaries (calibrated)".to_string(),
        ));
    } else {
        terms.push(term(
            "one chunk's graph",
            chunk.whole * s.model,
            "1 latent frame → 4 frames, every layer's kept tensors".to_string(),
        ));
        terms.push(term(
            "backward working set",
            calibration::VAE_BACKWARD_INPUTS * chunk.largest_input * s.model,
            "the gradients, conv columns and temporaries of the largest layer (calibrated)".to_string(),
        ));
    }
    terms
}

/// (latent frame elements, cache elements) one chunk stores in the tape.
fn cache_elements(cfg: &VaeConfig, latent_pixels: f64) -> (f64, f64) {
    let dim = cfg.decoder_base_dim.unwrap_or(cfg.base_dim) as f64;
    let mults: Vec<f64> = cfg.dim_mult.iter().map(|&m| m as f64).collect();
    let top = mults.last().copied().unwrap_or(1.0) * dim;
    let levels = mults.len();
    let dims: Vec<f64> = std::iter::once(top).chain(mults.iter().rev().map(|m| m * dim)).collect();
    let ups: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
    let mut pixels = latent_pixels;
    // Every cached conv keeps the last 2 frames of its input: conv_in (z channels), the mid
    // block's 2 residual blocks (2 convs each), each level's residual blocks (conv1 reads the
    // block's input width, conv2 its output width), each temporal up-sampler, conv_out.
    let mut cache = 2.0 * (cfg.z_dim as f64 + 4.0 * top) * pixels;
    for i in 0..levels {
        let c_out = dims[i + 1];
        let c_in = if i > 0 { dims[i] / 2.0 } else { dims[i] };
        cache += 2.0 * (c_in + (2.0 * cfg.num_res_blocks as f64 + 1.0) * c_out) * pixels;
        if i + 1 < levels {
            if ups[i] {
                cache += 2.0 * c_out * pixels;
            }
            pixels *= 4.0;
        }
    }
    cache += 2.0 * dims[levels] * pixels;
    (cfg.z_dim as f64 * latent_pixels, cache)
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.request;
        // GiB for real sizes, MiB for the small ones the plan is validated on.
        let (unit, scale) = if self.peak_bytes() >= GIB { ("GiB", GIB) } else { ("MiB", GIB / 1024.0) };
        let gib = |b: f64| format!("{:>8.2}", b / scale);
        let m = r.dit;
        let mut parts = Vec::new();
        match (m.checkpoint_blocks, m.segment_len(self.transformer.num_layers)) {
            (true, seg) if seg > 1 => parts.push(format!("checkpointed segments of {seg} blocks and blocks")),
            (true, _) => parts.push("checkpointed blocks".to_string()),
            (false, _) => {}
        }
        if m.checkpoint_sublayers {
            parts.push("branches".to_string());
        }
        let mode = if parts.is_empty() { "plain graph".to_string() } else { parts.join(", ") };
        let mode = match m.attention_tile {
            Some(t) => format!("{mode}; tiled attention ({t})"),
            None => format!("{mode}; materialised attention"),
        };
        let [_, c, t, h, w] = self.latent;
        writeln!(
            f,
            "z0 optimisation memory plan: {}×{}×{} frames → latents {c}×{t}×{h}×{w}, {} tokens; {} steps, CFG {}, \
             {:?}; DiT: {mode}",
            r.height,
            r.width,
            r.num_frames,
            self.tokens,
            r.steps,
            if r.guidance { "on" } else { "off" },
            r.dtype
        )?;
        writeln!(f, "  {:<34} {:>8}  what", "part", unit)?;
        writeln!(
            f,
            "  {:<34} {}  {:.3}·10⁹ parameters",
            "weights: DiT",
            gib(self.dit_weights),
            self.dit_weights / Sizes::of(r.dtype).model / 1e9
        )?;
        writeln!(f, "  {:<34} {}  encoder + decoder", "weights: VAE", gib(self.vae_weights))?;
        if let Some((_, count)) = &r.controlnets {
            writeln!(
                f,
                "  {:<34} {}  {count} × {:.3}·10⁹ parameters",
                "weights: ControlNet",
                gib(self.controlnet_weights),
                self.controlnet_weights / *count as f64 / Sizes::of(r.dtype).model / 1e9
            )?;
        }
        writeln!(
            f,
            "  {:<34} {}  x_0 … x_{} and latent-sized working tensors",
            "stored trajectory",
            gib(self.trajectory),
            r.steps
        )?;
        let (step, decode) = (self.step_vjp_bytes(), self.decode_vjp_bytes());
        let mark = |on: bool| if on { "  ← peak" } else { "" };
        writeln!(f, "  {:<34} {}{}", "one step's VJP", gib(step), mark(step >= decode))?;
        for t in &self.step_vjp {
            writeln!(f, "    {:<32} {}  {}", t.name, gib(t.bytes), t.detail)?;
        }
        if !self.decode_vjp.is_empty() {
            writeln!(f, "  {:<34} {}{}", "VAE decode VJP", gib(decode), mark(decode > step))?;
            for t in &self.decode_vjp {
                writeln!(f, "    {:<32} {}  {}", t.name, gib(t.bytes), t.detail)?;
            }
        }
        write!(f, "  {:<34} {}  weights + trajectory + the larger VJP", "peak", gib(self.peak_bytes()))
    }
}
