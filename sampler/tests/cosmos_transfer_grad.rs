//! ∇z0 through the tiny Cosmos-Transfer2.5 pipeline (`tests/fixtures/hf_cache`, the parity
//! fixture's) in f64: every denoising step — the ControlNet on the control video and the DiT it
//! steers, classifier-free guidance on — and the Wan VAE decode. The recomputing backward
//! against central differences and against the full-graph backward, on both chunks of a
//! two-chunk video: chunk 0 (no conditioning) and chunk 1 (its first latent frame conditioned
//! on chunk 0's last decoded frame, where z0 is also read directly). z0 is optimised per chunk
//! (see `cosmos::transfer`), so each chunk's z0 is checked with the earlier chunks fixed.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use sampler::cosmos::controlnet::ConditioningScale;
use sampler::cosmos::pipeline::{self, CosmosPipeline, Repository};
use sampler::cosmos::transfer::{ControlVideo, TransferRequest, TransferRun};
use sampler::cosmos::vae::DecodedObjective;
use sampler::noise::{NoiseState, NoiseTensor};
use sampler::objective::{Objective, TargetMse};
use sampler::optimize::verify_gradient;
use sampler::trajectory::GradMode;
use shared::device::test_device;
use shared::gradcheck::{check_gradients, GradCheckOptions};
use shared::rng::SplitMix64;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load() -> Result<CosmosPipeline> {
    let hub = shared::weights::HubOptions { cache_dir: fixtures().join("hf_cache"), offline: true };
    let repo = Repository::Hub { repo: "worldgrad-test/tiny-cosmos-transfer25".into(), revision: "main".into(), hub };
    CosmosPipeline::load_from(repo, DType::F64, &test_device())
}

fn request(pipe: &CosmosPipeline, scale: f64) -> Result<TransferRequest> {
    let dev = test_device();
    let (h, w) = (32, 48);
    let control = pipeline::load_conditioning(&fixtures().join("cosmos_transfer_controls"), h, w, &dev)?;
    let (prompt, negative) =
        pipeline::read_prompt_embeds(&fixtures().join("cosmos_prompt_embeds_transfer25.safetensors"), &dev)?;
    let latents = SplitMix64::new(1).normal_tensor(&pipe.latent_shape(1, 9, h, w)[..], DType::F64, &dev)?;
    Ok(TransferRequest {
        controls: vec![ControlVideo {
            name: "edge".into(),
            video: control.to_dtype(DType::F64)?,
            controlnet: 0,
            scale: ConditioningScale::All(scale),
        }],
        prompt_embeds: prompt.to_dtype(DType::F64)?,
        negative_prompt_embeds: Some(negative.expect("negative embeddings").to_dtype(DType::F64)?),
        num_frames: 17,
        chunk_frames: 9,
        conditional_frames: 1,
        steps: 3,
        guidance: 3.0,
        latents,
    })
}

/// ∇z0 of chunk `chunk` (earlier chunks sampled from the request's latents and fixed).
///
/// ε: the steered chunks decode to ~2 % clamped pixels (the Predict fixtures 0.3 %), and along
/// a random direction pixels crossing the clamp move the difference quotient of chunk 0 by 40 %
/// at ε = 1e-4 (measured on one direction: 1.39e-3 at ε = 1e-4, 2.3104112e-3 at 1e-5,
/// 2.3104097e-3 at 1e-6, against 2.3104092e-3 analytic; the latents before the decode are smooth,
/// 1e-7 relative spread from ε = 1e-3 to 1e-6). Chunk 0 is checked at ε = 1e-6 (worst 3.8e-7;
/// 1e-5 fails two of six directions); chunk 1 at 1e-5 (worst 7e-7), where its conditioning
/// frame's small gradient (6.6e-5 against 2.5e-3) meets round-off at 1e-6 (1.6e-5).
fn grad_of_chunk(pipe: &CosmosPipeline, scale: f64, chunk: usize, eps: Option<f64>) -> Result<Tensor> {
    let dev = test_device();
    let mut run = TransferRun::new(pipe, Vec::new(), request(pipe, scale)?)?;
    let latents = run.request().latents.clone();
    for _ in 0..chunk {
        let prepared = run.prepare_chunk()?;
        let traj = prepared.trajectory();
        let out = traj.sample(&latents, &vec![None; traj.num_steps()])?;
        drop(traj);
        drop(prepared);
        run.finish_chunk(&out)?;
    }
    let prepared = run.prepare_chunk()?;
    let traj = prepared.trajectory();
    let target = SplitMix64::new(2).uniform_tensor((1, 3, 9, 32, 48), 0.0, 1.0, DType::F64, &dev)?;
    let objective = DecodedObjective { vae: &pipe.vae, inner: TargetMse { target, label: "random video".into() } };
    let steps = vec![None; traj.num_steps()];
    let recompute = traj.value_and_grad(&latents, &steps, &objective, GradMode::Recompute)?;
    let Some(eps) = eps else { return Ok(recompute.grad_z0) };
    let full = traj.value_and_grad(&latents, &steps, &objective, GradMode::FullGraph)?;
    let scale_g = recompute.grad_z0.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let diff = (&recompute.grad_z0 - &full.grad_z0)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    println!("chunk {chunk}: loss {:.6}; ∇z0 max {scale_g:.3e}; recompute vs full graph {diff:.2e}", recompute.loss);
    assert!(scale_g > 1e-10, "degenerate gradient");
    assert!(diff <= 1e-10 * scale_g, "recomputation differs from the full graph by {diff:.3e}");

    let noise = NoiseState {
        z0: NoiseTensor::Learnable(Var::from_tensor(&latents)?),
        steps: vec![None; traj.num_steps()],
        from_z0: None,
    };
    let opts = GradCheckOptions { eps, directions: 3, seed: 3, floor: 1e-14 };
    let report = verify_gradient(&traj, &noise, &objective, GradMode::Recompute, &opts)?;
    println!("{}", report.table());
    report.assert_nondegenerate(1e-10, "transfer chunk + decode")?;
    report.assert_close(1e-5, &format!("∇z0 through Transfer2.5 chunk {chunk} and the VAE decode"))?;

    // z0's first latent frame (the conditioning frame on chunk 1) and the rest as variables of
    // their own, so a wrong gradient in the smaller part cannot hide under the other.
    let t = latents.dim(2)?;
    let first = Var::from_tensor(&latents.narrow(2, 0, 1)?)?;
    let rest = Var::from_tensor(&latents.narrow(2, 1, t - 1)?)?;
    let parts = [("z0, latent frame 0", first.clone()), ("z0, latent frames 1..", rest.clone())];
    let value = || -> candle_core::Result<Tensor> {
        let z0 = Tensor::cat(&[first.as_tensor(), rest.as_tensor()], 2)?;
        objective.loss(&traj.run(&z0, &steps, None)?)
    };
    let split = check_gradients(&parts, value, &opts)?;
    println!("{}", split.table());
    split.assert_nondegenerate(1e-10, "transfer chunk, z0 split by frame")?;
    split.assert_close(1e-5, &format!("∇z0 by frame through Transfer2.5 chunk {chunk}"))?;
    Ok(recompute.grad_z0)
}

#[test]
fn z0_gradient_through_the_first_transfer_chunk_and_the_decode() -> Result<()> {
    let pipe = load()?;
    let with_control = grad_of_chunk(&pipe, 0.8, 0, Some(1e-6))?;
    // The ControlNet branch is on the gradient's path: without it the gradient is another one.
    let without = grad_of_chunk(&pipe, 0.0, 0, None)?;
    let scale = with_control.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let diff = (&with_control - &without)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    println!("∇z0 with the control vs without: max |Δ| {diff:.3e} of max {scale:.3e}");
    assert!(diff > 0.05 * scale, "the control branch barely changes ∇z0 ({diff:.3e} of {scale:.3e})");
    Ok(())
}

#[test]
fn z0_gradient_through_the_conditioned_transfer_chunk_and_the_decode() -> Result<()> {
    grad_of_chunk(&load()?, 0.8, 1, Some(1e-5))?;
    Ok(())
}
