//! A Cosmos pipeline (Predict2 or Predict2.5, from a diffusers repository: `--world-model
//! cosmos:REF`) as the stress test's world model, so a team can search for failures of a policy
//! in Cosmos worlds.
//!
//! * The scenario's real clip is the environment's, rendered as the embedded world model's data
//!   (three camera views side by side, each `view_size`² — the layout the policy's cameras are
//!   cut from) but `frames` long (1 + 4k, what the Wan VAE takes).
//! * The pipeline is conditioned on the clip's real first frame (image-to-world) and the prompt
//!   embeddings; its initial latents are z0. The scenario's actions do not reach a Cosmos world
//!   (it is conditioned on text and the frame): they only make the policy's reference.
//! * The objective decodes the final latents with the VAE (its recomputing VJP) and reads the
//!   frames in [−1, 1] as the embedded model's; the nearest-real-frame measure compares them with
//!   the same bank of real frames. The denoising realism measure is the embedded model's own and
//!   is not reported for a Cosmos world.

use candle_core::{DType, Device, Tensor};

use super::{Clips, FrameBank, Generator, PolicyObjective, Scenario, StressSettings, StressWorld};
use crate::cosmos::pipeline::{CosmosPipeline, GenerateRequest};
use crate::cosmos::policy::PolicyOnVideo;
use crate::cosmos::vae::DecodedObjective;
use crate::objective::Objective;
use crate::stress::LapoFramePolicy;
use crate::world_model::WorldModelConfig;

/// Frames of a Cosmos world's clips by default: 5 (2 latent frames: the conditioning one and one
/// generated).
pub const DEFAULT_COSMOS_FRAMES: usize = 5;

pub struct CosmosWorld<'a> {
    pub pipe: &'a CosmosPipeline,
    prompt: Tensor,
    negative: Option<Tensor>,
    guidance: f64,
    /// How the environment's frames are rendered and cut (the embedded model's data settings,
    /// `frames` long).
    env: WorldModelConfig,
    bank: FrameBank,
}

impl<'a> CosmosWorld<'a> {
    /// `frames`: clip length (1 + 4k); the video is `view_size` × 3·`view_size` (the embedded
    /// world model's, 16 × 48). Checks the sizes against the pipeline before any scenario runs.
    pub fn new(
        pipe: &'a CosmosPipeline,
        prompt: Tensor,
        negative: Option<Tensor>,
        guidance: f64,
        frames: usize,
        device: &Device,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            frames >= 5 && (frames - 1).is_multiple_of(4),
            "--cosmos-frames {frames}: the Wan VAE takes 1 + 4k frames, k ≥ 1 (5, 9, 13, …)"
        );
        anyhow::ensure!(
            !pipe.kind.uses_controls(),
            "--world-model cosmos: {} needs control videos; use a Predict2 or Predict2.5 repository",
            pipe.kind.class_name()
        );
        anyhow::ensure!(
            guidance <= 1.0 || negative.is_some(),
            "guidance {guidance} > 1 needs negative_prompt_embeds in the prompt embeddings file"
        );
        let env = WorldModelConfig { frames, ..WorldModelConfig::medium() };
        let (h, w) = (env.view_size, 3 * env.view_size);
        anyhow::ensure!(
            h % 16 == 0 && w % 16 == 0,
            "the environment's frames are {h}×{w}; a Cosmos pipeline needs multiples of 16"
        );
        pipe.check_size(frames, h, w)?;
        let bank = FrameBank::collect(&WorldModelConfig { frames: 3, ..env.clone() }, device)?;
        Ok(Self { pipe, prompt, negative, guidance, env, bank })
    }
}

impl StressWorld for CosmosWorld<'_> {
    fn describe(&self) -> String {
        format!("Cosmos {} from {} ({:?})", self.pipe.kind.class_name(), self.pipe.repository, self.pipe.dtype())
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "pipeline": self.pipe.kind, "repository": self.pipe.repository, "guidance": self.guidance,
            "frames": self.env.frames, "view_size": self.env.view_size, "scheduler": self.pipe.scheduler,
        })
    }

    fn view_size(&self) -> usize {
        self.env.view_size
    }

    fn frames(&self) -> usize {
        self.env.frames
    }

    fn real_clip(&self, scenario: &Scenario, device: &Device) -> anyhow::Result<Clips> {
        super::expert_clip_as(&self.env, scenario.episode_seed, scenario.start_frame, device)
    }

    fn generator<'b>(
        &'b self,
        real: &Clips,
        _actions: &Tensor,
        settings: &StressSettings,
    ) -> anyhow::Result<Generator<'b>> {
        let (_, _, t, h, w) = real.frames.dims5()?;
        let shape = self.pipe.latent_shape(1, t, h, w);
        let req = GenerateRequest {
            video: real.frames.narrow(2, 0, 1)?,
            prompt_embeds: self.prompt.clone(),
            negative_prompt_embeds: self.negative.clone(),
            num_frames: t,
            steps: settings.num_steps.max(2),
            guidance: self.guidance,
            fps: None,
            latents: Tensor::zeros(&shape[..], DType::F32, real.frames.device())?,
            condition_latent_frames: None,
        };
        let prepared = self.pipe.prepare(&req)?;
        Ok(Generator {
            denoiser: prepared.denoiser,
            cond: prepared.cond,
            schedule: prepared.schedule,
            solver: prepared.solver,
            z0_shape: shape.to_vec(),
        })
    }

    fn takes_actions(&self) -> bool {
        false
    }

    fn realism(&self, _frames: &Tensor, _real: &Clips, _actions: &Tensor) -> anyhow::Result<Option<f64>> {
        Ok(None)
    }

    fn nearest_real(&self, frames: &Tensor) -> anyhow::Result<Option<f64>> {
        Ok(Some(self.bank.nearest_db(frames)?))
    }

    fn frames_of(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        Ok(self.pipe.decode_to_unit(latents)?.affine(2.0, -1.0)?.to_dtype(DType::F32)?)
    }

    fn objective<'b>(&'b self, on_frames: PolicyObjective<LapoFramePolicy>) -> Box<dyn Objective + 'b> {
        Box::new(DecodedObjective { vae: &self.pipe.vae, inner: PolicyOnVideo { inner: on_frames } })
    }
}
