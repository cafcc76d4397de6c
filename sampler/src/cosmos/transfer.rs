//! diffusers' `Cosmos2_5_TransferPipeline` (Cosmos-Transfer2.5): a Predict2.5 DiT steered by
//! control videos (edges, blur, depth, segmentation) through a ControlNet, generating a video of
//! any length in autoregressive chunks.
//!
//! The loop, as diffusers 0.42.1 runs it:
//! * the output has `min(control frames, num_frames)` frames; the controls are cut into chunks of
//!   `chunk_frames` (diffusers' `num_frames_per_chunk`, default 93) frames starting every
//!   `chunk_frames − 1` frames ([`ChunkPlan`]); a chunk's control video is padded by repeating
//!   its last frame, VAE-encoded and normalised;
//! * every chunk denoises the **same** initial noise (diffusers' `latents` argument) of one
//!   chunk's size;
//! * chunk 0 has no conditioning frame; chunk k > 0 conditions its first latent frame on the last
//!   decoded frame of chunk k − 1 (`num_ar_conditional_frames` = 1 by default; with n frames, on
//!   the first of the last n, its (n − 1)/4 + 1 latent frames), VAE-encoded, at
//!   `conditional_frame_timestep` 0.1;
//! * each step is Predict2.5's ([`Predict25Denoiser`], UniPC on the same schedule), with the
//!   ControlNet run before each transformer call — with the negative prompt too under CFG — and
//!   zeros as the image context;
//! * the video joins the decoded chunks, chunk k > 0 without its first (conditioning) frame; the
//!   latents join the chunks' final latents, chunk k > 0 without its first latent frame (what
//!   `output_type="latent"` returns).
//!
//! Where this port differs, deliberately: VAE encodings (controls and conditioning frames) take
//! the posterior mean where diffusers samples the posterior with its generator (the same choice
//! as the Predict pipelines here); chunk 0 encodes nothing (diffusers encodes a black clip whose
//! latents the all-zero condition mask then ignores); a chunk shorter than 5 frames is refused
//! (diffusers raises it to 5 with a warning).
//!
//! Learning z0 through chunks: the VAE encoder runs without a graph, so the gradient of a later
//! chunk does not reach earlier chunks through the re-encoded conditioning frame. z0 is
//! therefore optimised **per chunk** ([`TransferRun`]): chunk k's noise is learned with chunks
//! < k fixed, which is also how the frames are produced (a chunk is final once the next starts),
//! and keeps one chunk's trajectory the most the recomputing backward ever holds.

use anyhow::Context;
use candle_core::Tensor;

use super::controlnet::ConditioningScale;
use super::pipeline::{ControlBranch, CosmosPipeline, PipelineKind, Predict25Denoiser, Prepared};
use crate::denoiser::{ClassifierFreeGuidance, Conditioning, Denoiser};

/// diffusers' `conditional_frame_timestep` default for Transfer2.5 (a flow time).
pub const TRANSFER25_CONDITIONAL_FRAME_TIMESTEP: f64 = 0.1;
/// diffusers' `num_frames_per_chunk` default.
pub const TRANSFER25_DEFAULT_CHUNK_FRAMES: usize = 93;
/// diffusers' `num_ar_conditional_frames` default: pixel frames of the previous chunk that
/// condition the next.
pub const TRANSFER25_AR_CONDITIONAL_FRAMES: usize = 1;

/// How a Transfer2.5 video is cut into chunks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ChunkPlan {
    /// Frames of the output video.
    pub num_frames: usize,
    /// Frames each chunk generates (the last may be padded).
    pub chunk_frames: usize,
    /// Pixel frames of the previous chunk that condition a chunk (the first chunk has none).
    pub conditional_frames: usize,
    /// Their latent frames: (conditional_frames − 1)/4 + 1.
    pub conditional_latent_frames: usize,
    /// Each chunk's frame range [start, end) in the control video (end − start ≤ chunk_frames).
    pub chunks: Vec<(usize, usize)>,
}

impl ChunkPlan {
    /// diffusers' chunking of `num_frames` output frames: starts every `chunk_frames −
    /// conditional_frames` frames while a start leaves more than `conditional_frames` frames.
    pub fn new(
        num_frames: usize,
        chunk_frames: usize,
        conditional_frames: usize,
        temporal_factor: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(num_frames >= 1, "the output needs at least 1 frame");
        let min_chunk = temporal_factor + 1;
        anyhow::ensure!(
            chunk_frames >= min_chunk,
            "--chunk-frames {chunk_frames}: a chunk needs at least {min_chunk} frames (2 latent frames)"
        );
        anyhow::ensure!(
            conditional_frames < chunk_frames,
            "{conditional_frames} conditioning frames must be fewer than the {chunk_frames} frames of a chunk"
        );
        let conditional_latent_frames =
            if conditional_frames == 0 { 0 } else { (conditional_frames - 1) / temporal_factor + 1 };
        let stride = chunk_frames - conditional_frames;
        let mut chunks: Vec<(usize, usize)> = (0..num_frames.saturating_sub(conditional_frames))
            .step_by(stride)
            .map(|start| (start, (start + chunk_frames).min(num_frames)))
            .collect();
        // diffusers makes no chunk at all when num_frames ≤ conditional_frames; one chunk then.
        if chunks.is_empty() {
            chunks.push((0, num_frames));
        }
        Ok(Self { num_frames, chunk_frames, conditional_frames, conditional_latent_frames, chunks })
    }
}

/// One control video and how it steers: its frames (1, 3, F, H, W) in [−1, 1], which ControlNet
/// of the pipeline reads it (index into the ControlNets given to [`TransferRun::new`]) and its
/// conditioning scale.
#[derive(Clone, Debug)]
pub struct ControlVideo {
    /// What it is (`edge`, `blur`, `depth`, `seg`, …), for reports.
    pub name: String,
    pub video: Tensor,
    pub controlnet: usize,
    pub scale: ConditioningScale,
}

/// What to generate with a Transfer2.5 pipeline.
#[derive(Clone, Debug)]
pub struct TransferRequest {
    pub controls: Vec<ControlVideo>,
    pub prompt_embeds: Tensor,
    /// Required when `guidance > 1`.
    pub negative_prompt_embeds: Option<Tensor>,
    /// The most frames to output (diffusers' `num_frames`); the controls' length caps it.
    pub num_frames: usize,
    pub chunk_frames: usize,
    /// Frames of the previous chunk that condition the next (diffusers'
    /// `num_ar_conditional_frames`, default [`TRANSFER25_AR_CONDITIONAL_FRAMES`]).
    pub conditional_frames: usize,
    pub steps: usize,
    pub guidance: f64,
    /// Unit-variance initial noise of one chunk (B, C, (chunk_frames − 1)/4 + 1, H/8, W/8),
    /// used by every chunk.
    pub latents: Tensor,
}

/// A Transfer2.5 generation in progress: the plan, the ControlNets, and each finished chunk's
/// final latents and decoded video. Chunks are generated in order by [`Self::prepare_chunk`] +
/// sampling + [`Self::finish_chunk`], so that a caller may optimise each chunk's z0 in between
/// ([`Self::generate`] does it all for plain sampling).
pub struct TransferRun<'a> {
    pub pipe: &'a CosmosPipeline,
    pub controlnets: Vec<&'a super::controlnet::CosmosControlNetModel>,
    pub plan: ChunkPlan,
    req: TransferRequest,
    /// Finished chunks: final normalised latents (B, C, T, h, w) and decoded video in [−1, 1].
    pub chunk_latents: Vec<Tensor>,
    pub chunk_videos: Vec<Tensor>,
}

impl<'a> TransferRun<'a> {
    /// Checks the request against the pipeline and plans the chunks. `controlnets`: the
    /// ControlNets the controls name (the pipeline's own `controlnet/` when empty).
    pub fn new(
        pipe: &'a CosmosPipeline,
        controlnets: Vec<&'a super::controlnet::CosmosControlNetModel>,
        req: TransferRequest,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            pipe.kind == PipelineKind::Transfer25,
            "{} is not a Transfer2.5 pipeline (it is {})",
            pipe.repository,
            pipe.kind.class_name()
        );
        let controlnets = if controlnets.is_empty() {
            vec![pipe.controlnet.as_ref().context("the pipeline has no controlnet/")?]
        } else {
            controlnets
        };
        anyhow::ensure!(!req.controls.is_empty(), "Transfer2.5 needs at least one control video (--control)");
        anyhow::ensure!(req.steps >= 2, "--steps must be at least 2 (diffusers' Karras schedules need two levels)");
        anyhow::ensure!(req.num_frames >= 1, "--num-frames must be at least 1");
        let (b, _, _, h, w) = req.controls[0].video.dims5()?;
        anyhow::ensure!(b == 1, "one video at a time: the controls have batch {b}");
        anyhow::ensure!(h % 16 == 0 && w % 16 == 0, "height and width must be multiples of 16, got {h}×{w}");
        let mut frames = req.num_frames;
        for c in &req.controls {
            let (cb, cc, f, ch, cw) = c.video.dims5()?;
            anyhow::ensure!(
                (cb, cc, ch, cw) == (1, 3, h, w) && f >= 1,
                "control '{}' is {:?}; every control must be (1, 3, F ≥ 1, {h}, {w})",
                c.name,
                c.video.dims()
            );
            anyhow::ensure!(
                c.controlnet < controlnets.len(),
                "control '{}' names ControlNet {} of {}",
                c.name,
                c.controlnet,
                controlnets.len()
            );
            c.scale.expand(controlnets[c.controlnet].config().n_controlnet_blocks)?;
            frames = frames.min(f);
        }
        let cfg = pipe.vae.config();
        let plan = ChunkPlan::new(frames, req.chunk_frames, req.conditional_frames, cfg.temporal_factor())?;
        pipe.check_size(req.chunk_frames, h, w)?;
        let expected = pipe.latent_shape(b, req.chunk_frames, h, w);
        anyhow::ensure!(
            req.latents.dims() == expected,
            "the initial latents are {:?}; one chunk of {} frames at {h}×{w} needs {:?}",
            req.latents.dims(),
            req.chunk_frames,
            expected
        );
        if req.guidance > 1.0 {
            anyhow::ensure!(
                req.negative_prompt_embeds.is_some(),
                "guidance > 1 needs negative prompt embeddings (negative_prompt_embeds)"
            );
        }
        Ok(Self { pipe, controlnets, plan, req, chunk_latents: Vec::new(), chunk_videos: Vec::new() })
    }

    pub fn request(&self) -> &TransferRequest {
        &self.req
    }

    /// The chunk to generate next (= chunks finished so far), `None` when all are.
    pub fn next_chunk(&self) -> Option<usize> {
        let k = self.chunk_videos.len();
        (k < self.plan.chunks.len()).then_some(k)
    }

    /// A control video's frames [start, end) padded to a chunk by repeating the last frame, as
    /// normalised posterior-mean latents.
    fn control_latents(&self, video: &Tensor, start: usize, end: usize) -> anyhow::Result<Tensor> {
        let clip = pad_frames(&video.narrow(2, start, end - start)?, self.plan.chunk_frames)?;
        let posterior = self.pipe.vae.encode(&clip.to_dtype(self.pipe.dtype())?)?;
        Ok(self.pipe.vae.normalize_latents(posterior.mode())?)
    }

    /// The denoiser, conditioning and schedule of the next chunk: its controls' latents, and its
    /// conditioning frame from the previous chunk's decoded video.
    pub fn prepare_chunk(&self) -> anyhow::Result<Prepared<'a>> {
        let k = self.next_chunk().context("every chunk is finished")?;
        let (start, end) = self.plan.chunks[k];
        let pipe = self.pipe;
        let dtype = pipe.dtype();
        let shape = self.req.latents.dims().to_vec();
        let (conditioning, cond_latent_frames) = match self.chunk_videos.last() {
            Some(previous) if self.plan.conditional_frames > 0 => {
                // The last frames of the previous chunk (diffusers re-encodes them at the head of
                // a black clip; by the VAE's causality only they reach the conditioning frames).
                let (c, n) = pipe.conditioning_latents(previous, self.plan.conditional_frames)?;
                let pad = Tensor::zeros((shape[0], shape[1], shape[2] - n, shape[3], shape[4]), dtype, c.device())?;
                (Tensor::cat(&[&c, &pad], 2)?, n)
            }
            _ => (Tensor::zeros(shape.as_slice(), dtype, self.req.latents.device())?, 0),
        };
        let mut controls = Vec::with_capacity(self.req.controls.len());
        for c in &self.req.controls {
            controls.push(ControlBranch {
                controlnet: self.controlnets[c.controlnet],
                latents: self.control_latents(&c.video, start, end).with_context(|| format!("control '{}'", c.name))?,
                scale: c.scale.clone(),
            });
        }
        let mut inner = Predict25Denoiser::new(&pipe.transformer, conditioning, cond_latent_frames)?;
        inner.conditional_frame_timestep = TRANSFER25_CONDITIONAL_FRAME_TIMESTEP;
        inner.controls = controls;
        let tcfg = pipe.transformer.config();
        if let Some(dim) = tcfg.img_context_dim_in.filter(|d| *d > 0) {
            inner.img_context =
                Some(Tensor::zeros((shape[0], tcfg.img_context_num_tokens, dim), dtype, self.req.latents.device())?);
        }
        let inner: Box<dyn Denoiser + 'a> = Box::new(inner);
        let denoiser: Box<dyn Denoiser + 'a> = if self.req.guidance > 1.0 {
            let negative =
                self.req.negative_prompt_embeds.as_ref().context("guidance > 1 needs negative embeddings")?;
            Box::new(ClassifierFreeGuidance {
                inner,
                scale: self.req.guidance,
                uncond_context: Some(negative.to_dtype(dtype)?),
            })
        } else {
            inner
        };
        let schedule = pipe.scheduler.schedule(self.req.steps)?;
        let cond = Conditioning {
            frames: None,
            mask: None,
            context: Some(self.req.prompt_embeds.to_dtype(dtype)?),
            initial_noise: None,
        };
        Ok(Prepared { denoiser, cond, schedule, solver: pipe.scheduler.solver.build() })
    }

    /// Records the next chunk's final latents (and decodes them, without a graph).
    pub fn finish_chunk(&mut self, latents: &Tensor) -> anyhow::Result<()> {
        anyhow::ensure!(self.next_chunk().is_some(), "every chunk is finished");
        let latents = latents.detach();
        let video = self.pipe.vae.decode(&self.pipe.vae.denormalize_latents(&latents)?)?.detach();
        self.chunk_latents.push(latents);
        self.chunk_videos.push(video);
        Ok(())
    }

    /// Frames of the output video the next chunk contributes, [start, end) (its first frames
    /// repeat the previous chunk's and are dropped).
    pub fn output_frames(&self, chunk: usize) -> (usize, usize) {
        let (start, end) = self.plan.chunks[chunk];
        let skip = if chunk == 0 { 0 } else { self.plan.conditional_frames };
        (start + skip, end)
    }

    /// The joined outputs: the latents as `output_type="latent"` returns them (B, C, T_out, h, w),
    /// T_out = (F − 1)/4 + 1, and the video (B, 3, F, H, W) in [0, 1].
    pub fn outputs(&self) -> anyhow::Result<(Tensor, Tensor)> {
        anyhow::ensure!(self.next_chunk().is_none(), "not every chunk is finished");
        let cfg = self.pipe.vae.config();
        let latents = join_chunks(
            &self.chunk_latents,
            self.plan.conditional_latent_frames,
            cfg.latent_frames(self.plan.num_frames),
        )?;
        let video = join_chunks(&self.chunk_videos, self.plan.conditional_frames, self.plan.num_frames)?;
        Ok((latents, video.affine(0.5, 0.5)?.clamp(0.0, 1.0)?))
    }

    /// Samples every remaining chunk from the request's latents (no optimisation).
    pub fn generate(&mut self) -> anyhow::Result<(Tensor, Tensor)> {
        let z0 = self.req.latents.to_dtype(self.pipe.dtype())?;
        while self.next_chunk().is_some() {
            let prepared = self.prepare_chunk()?;
            let traj = prepared.trajectory();
            let latents = traj.sample(&z0, &vec![None; traj.num_steps()])?;
            drop(traj);
            self.finish_chunk(&latents)?;
        }
        self.outputs()
    }
}

/// Chunks (B, C, T, H, W) joined along T as diffusers joins them: every chunk after the first
/// without its first `skip` frames (they repeat the previous chunk's), then the first `keep`.
pub fn join_chunks(chunks: &[Tensor], skip: usize, keep: usize) -> candle_core::Result<Tensor> {
    let parts: Vec<Tensor> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let s = if i == 0 { 0 } else { skip };
            c.narrow(2, s, c.dim(2)? - s)
        })
        .collect::<candle_core::Result<_>>()?;
    let all = Tensor::cat(&parts, 2)?;
    all.narrow(2, 0, keep.min(all.dim(2)?))
}

/// A video (B, C, F, H, W) padded to `frames` frames by repeating its last frame, or trimmed to
/// them (diffusers' `_maybe_pad_or_trim_video`).
pub fn pad_frames(video: &Tensor, frames: usize) -> candle_core::Result<Tensor> {
    let have = video.dim(2)?;
    if have >= frames {
        return video.narrow(2, 0, frames);
    }
    let last = video.narrow(2, have - 1, 1)?;
    Tensor::cat(&[video, &last.repeat((1, 1, frames - have, 1, 1))?], 2)
}
