//! ∇z0 through a whole Cosmos pipeline — every denoising step of the tiny random DiT
//! (classifier-free guidance on, conditioning frame) **and** the Wan VAE decode — in f64: the
//! recomputing backward (per step, then per decode chunk) against central differences and
//! against the full-graph backward. Predict2 (Euler) and Predict2.5 (UniPC; its conditioning
//! frame's velocity reads z0 directly, a path of its own into ∇z0).

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use sampler::cosmos::pipeline::{self, CosmosPipeline, GenerateRequest, Repository};
use sampler::cosmos::vae::DecodedObjective;
use sampler::noise::{NoiseState, NoiseTensor};
use sampler::objective::Objective;
use sampler::objective::TargetMse;
use sampler::optimize::verify_gradient;
use sampler::trajectory::GradMode;
use shared::device::test_device;
use shared::gradcheck::{check_gradients, GradCheckOptions};
use shared::rng::SplitMix64;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(repo: &str) -> Result<CosmosPipeline> {
    let hub = shared::weights::HubOptions { cache_dir: fixtures().join("hf_cache"), offline: true };
    let repo = Repository::Hub { repo: repo.into(), revision: "main".into(), hub };
    CosmosPipeline::load_from(repo, DType::F64, &test_device())
}

#[test]
fn z0_gradient_through_the_predict2_pipeline_and_the_decode() -> Result<()> {
    z0_gradient_through(&load("worldgrad-test/tiny-cosmos-predict2")?, "cosmos_prompt_embeds_predict2.safetensors")
}

#[test]
fn z0_gradient_through_the_predict25_pipeline_and_the_decode() -> Result<()> {
    z0_gradient_through(&load("worldgrad-test/tiny-cosmos-predict25")?, "cosmos_prompt_embeds_predict25.safetensors")
}

fn z0_gradient_through(pipe: &CosmosPipeline, embeds: &str) -> Result<()> {
    let dev = test_device();
    let (h, w, frames) = (32, 48, 5);
    let video = pipeline::load_conditioning(&fixtures().join("cosmos_condition.png"), h, w, &dev)?;
    let (prompt, negative) = pipeline::read_prompt_embeds(&fixtures().join(embeds), &dev)?;
    let shape = pipe.latent_shape(1, frames, h, w);
    let latents = SplitMix64::new(1).normal_tensor(&shape[..], DType::F64, &dev)?;
    let req = GenerateRequest {
        video,
        prompt_embeds: prompt,
        negative_prompt_embeds: negative,
        num_frames: frames,
        steps: 3,
        guidance: 3.0,
        fps: None,
        latents: latents.clone(),
        condition_latent_frames: None,
    };
    let prepared = pipe.prepare(&req)?;
    let traj = prepared.trajectory();
    let target = SplitMix64::new(2).uniform_tensor((1, 3, frames, h, w), 0.0, 1.0, DType::F64, &dev)?;
    let objective = DecodedObjective { vae: &pipe.vae, inner: TargetMse { target, label: "random video".into() } };

    let steps = vec![None; traj.num_steps()];
    let recompute = traj.value_and_grad(&latents, &steps, &objective, GradMode::Recompute)?;
    let full = traj.value_and_grad(&latents, &steps, &objective, GradMode::FullGraph)?;
    let scale = recompute.grad_z0.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let diff = (&recompute.grad_z0 - &full.grad_z0)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    println!("loss {:.6}; ∇z0 max {scale:.3e}; recompute vs full graph {diff:.2e}", recompute.loss);
    assert!(scale > 1e-10, "degenerate gradient");
    assert!((recompute.loss - full.loss).abs() <= 1e-12 * full.loss.abs().max(1.0));
    assert!(diff <= 1e-10 * scale, "recomputation differs from the full graph by {diff:.3e}");

    let noise = NoiseState {
        z0: NoiseTensor::Learnable(Var::from_tensor(&latents)?),
        steps: vec![None; traj.num_steps()],
        from_z0: None,
    };
    // Worst relative error 7.2e-7, 3.8e-7, 4.3e-6, 5.9e-5 at ε = 1e-4, 1e-5, 1e-6, 1e-7 (a loss of
    // 0.11 with gradients of 1e-4: round-off grows below 1e-5), so ε = 1e-5, tolerance 1e-5.
    let opts = GradCheckOptions { eps: 1e-5, directions: 3, seed: 3, floor: 1e-14 };
    let report = verify_gradient(&traj, &noise, &objective, GradMode::Recompute, &opts)?;
    println!("{}", report.table());
    report.assert_nondegenerate(1e-10, "pipeline + decode")?;
    report.assert_close(1e-5, &format!("∇z0 through the {:?} pipeline and the VAE decode", pipe.kind))?;

    // z0 on the conditioning latent frame and on the generated frames as variables of their own
    // (full graph, equal to the recomputation above): a wrong gradient on the conditioning
    // frame's part alone — Predict2.5 reads z0 there directly — cannot hide under the rest.
    let cond_part = Var::from_tensor(&latents.narrow(2, 0, 1)?)?;
    let rest = Var::from_tensor(&latents.narrow(2, 1, shape[2] - 1)?)?;
    let parts = [("z0, conditioning frame", cond_part.clone()), ("z0, generated frames", rest.clone())];
    let value = || -> candle_core::Result<Tensor> {
        let z0 = Tensor::cat(&[cond_part.as_tensor(), rest.as_tensor()], 2)?;
        objective.loss(&traj.run(&z0, &steps, None)?)
    };
    let split = check_gradients(&parts, value, &opts)?;
    println!("{}", split.table());
    split.assert_nondegenerate(1e-10, "pipeline + decode, z0 split by frame")?;
    split.assert_close(1e-5, &format!("∇z0 by frame through the {:?} pipeline", pipe.kind))?;
    Ok(())
}
