//! Gradients through the Wan VAE decoder, in f64 on tiny random models: the recomputing VJP
//! (one chunk's graph at a time, cache adjoints carried) against finite differences and against
//! the full-graph backward; and causality — a prefix decodes to the same frames whatever follows.

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use sampler::cosmos::vae::{AutoencoderKLWan, Config, DecodedObjective};
use sampler::denoiser::{Conditioning, GaussianDenoiser};
use sampler::noise::{Churn, NoiseMode, NoiseState};
use sampler::objective::{Objective, TargetMse};
use sampler::optimize::verify_gradient;
use sampler::schedule::Schedule;
use sampler::solver::SolverKind;
use sampler::trajectory::{GradMode, Trajectory};
use shared::device::test_device;
use shared::gradcheck::{check_gradients, GradCheckOptions};
use shared::rng::SplitMix64;

fn random_model(cfg: &Config, seed: u64) -> Result<AutoencoderKLWan> {
    AutoencoderKLWan::random(cfg, seed, DType::F64, &test_device())
}

/// Two levels of up-sampling — one temporal (upsample3d), one spatial only — and the mid
/// attention: every cache kind in two resolutions, at a size where finite differences are quick.
fn tiny_config() -> Config {
    Config {
        base_dim: 2,
        z_dim: 2,
        dim_mult: vec![1, 2, 2],
        num_res_blocks: 1,
        temperal_downsample: vec![false, true],
        latents_mean: vec![0.1, -0.2],
        latents_std: vec![1.5, 0.5],
        scale_factor_temporal: Some(2),
        scale_factor_spatial: Some(4),
        ..Config::default()
    }
}

/// The real structure (dim_mult [1, 2, 4, 4], 2 residual blocks, temporal [F, T, T]) at width 2.
fn real_shaped_config() -> Config {
    Config { base_dim: 2, z_dim: 2, latents_mean: vec![0.0; 2], latents_std: vec![1.0; 2], ..Config::default() }
}

fn latents(shape: (usize, usize, usize, usize, usize), seed: u64) -> Result<Tensor> {
    Ok((SplitMix64::new(seed).normal_tensor(shape, DType::F64, &test_device())? * 0.5)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn fraction_clamped(video: &Tensor) -> Result<f64> {
    let v: Vec<f64> = video.flatten_all()?.to_vec1()?;
    Ok(v.iter().filter(|x| x.abs() >= 1.0).count() as f64 / v.len() as f64)
}

/// The recomputing VJP equals the full-graph backward, for every latent frame.
fn recompute_equals_full_graph(cfg: &Config, z_shape: (usize, usize, usize, usize, usize)) -> Result<()> {
    let vae = random_model(cfg, 1)?;
    let z = latents(z_shape, 2)?;
    let (video, tape) = vae.decode_taped(&z)?;
    let probe = SplitMix64::new(3).normal_tensor(video.shape(), DType::F64, &test_device())?;
    let recomputed = tape.vjp(&vae, &probe)?;

    let z_var = Var::from_tensor(&z)?;
    let full = vae.decode(z_var.as_tensor())?;
    assert_eq!(max_abs_diff(&full, &video)?, 0.0, "taped and plain decodes differ");
    let grads = (full * &probe)?.sum_all()?.backward()?;
    let reference = grads.get(z_var.as_tensor()).expect("z reached");
    let diff = max_abs_diff(&recomputed, reference)?;
    let scale = reference.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    println!(
        "decode {:?} → {:?}: recompute vs full graph max |Δ| {diff:.2e} (max |g| {scale:.2e}); tape {} bytes; clamped {:.1} %",
        z.dims(),
        video.dims(),
        tape.bytes(),
        100.0 * fraction_clamped(&video)?
    );
    assert!(scale > 1e-6, "degenerate gradient");
    assert!(diff <= 1e-10 * scale.max(1.0), "recompute differs from the full graph by {diff:.3e}");
    // The VJP with its layers checkpointed (the default, above) and without: the same chunk
    // graphs, rebuilt per layer or whole (measured: bitwise equal).
    let mut unchecked = vae.clone();
    unchecked.set_vjp_checkpointing(false);
    let whole_chunks = tape.vjp(&unchecked, &probe)?;
    let diff = max_abs_diff(&recomputed, &whole_chunks)?;
    println!("  checkpointed layers vs whole chunk graphs: max |Δ| {diff:.2e}");
    assert!(diff <= 1e-13 * scale, "checkpointing inside the chunks changed the gradient by {diff:.3e}");
    // Tapes that store every chunk's cache, or one per segment of 2 or of all chunks, rebuilding
    // the others forward in the VJP: the same gradient (measured: bitwise).
    for segment in [1, 2, z_shape.2] {
        let mut segmented = vae.clone();
        segmented.set_tape_segment(Some(segment))?;
        let (video_s, tape_s) = segmented.decode_taped(&z)?;
        assert_eq!(max_abs_diff(&video_s, &video)?, 0.0);
        let diff = max_abs_diff(&tape_s.vjp(&segmented, &probe)?, &recomputed)?;
        println!("  tape segments of {segment}: {} bytes stored, gradient max |Δ| {diff:.2e}", tape_s.bytes());
        assert!(diff <= 1e-13 * scale, "segments of {segment}: {diff:.3e}");
    }
    assert!(vae.clone().set_tape_segment(Some(0)).is_err());
    Ok(())
}

#[test]
fn recompute_backward_equals_full_graph_tiny() -> Result<()> {
    recompute_equals_full_graph(&tiny_config(), (1, 2, 3, 2, 3))
}

#[test]
fn recompute_backward_equals_full_graph_real_shaped() -> Result<()> {
    recompute_equals_full_graph(&real_shaped_config(), (1, 2, 3, 1, 2))
}

/// ∂⟨decode(z), r⟩/∂z from the recomputing VJP against central differences, per latent tensor
/// (the latents and a second, conditioning-like input decoded jointly are separate variables).
#[test]
fn decode_vjp_matches_finite_differences() -> Result<()> {
    let cfg = tiny_config();
    let vae = random_model(&cfg, 4)?;
    let first = Var::from_tensor(&latents((1, 2, 1, 2, 3), 5)?)?;
    let rest = Var::from_tensor(&latents((1, 2, 2, 2, 3), 6)?)?;
    let probe = SplitMix64::new(7).normal_tensor((1, 3, 5, 8, 12), DType::F64, &test_device())?;
    // The value of ⟨decode(z), r⟩ with the VJP as its gradient: value + ⟨z − sg(z), vjp⟩.
    let f = || -> candle_core::Result<Tensor> {
        let z = Tensor::cat(&[first.as_tensor(), rest.as_tensor()], 2)?;
        let (video, tape) = vae.decode_taped(&z)?;
        let value = (video * &probe)?.sum_all()?;
        let g = tape.vjp(&vae, &probe)?;
        let linear = ((&z - z.detach())? * g)?.sum_all()?;
        value + linear
    };
    // RMS norms over 2 channels make the map strongly curved: the worst relative error was
    // 5e-4, 5e-6, 4e-8, 4e-7, 3e-6 at ε = 1e-6 … 1e-10 (truncation ∝ ε², then round-off ∝ 1/ε),
    // so ε = 1e-8 and a tolerance 25× above its error; a missing cache adjoint is an O(1) error.
    let opts = GradCheckOptions { eps: 1e-8, directions: 3, seed: 8, floor: 1e-12 };
    let report = check_gradients(&[("latent frame 0", first.clone()), ("latent frames 1..3", rest.clone())], f, &opts)?;
    println!("{}", report.table());
    assert!(report.vars_without_grad().is_empty());
    report.assert_nondegenerate(1e-6, "decode vjp")?;
    report.assert_close(1e-6, "decode vjp")?;
    Ok(())
}

/// Decoding is causal and chunk-exact: the frames of a prefix of the latents are the first frames
/// of the whole decode, and encoding the first 4k + 1 frames gives the first k + 1 latent frames.
#[test]
fn prefixes_decode_and_encode_to_the_same_frames() -> Result<()> {
    let cfg = tiny_config();
    let vae = random_model(&cfg, 9)?;
    let z = latents((1, 2, 4, 2, 3), 10)?;
    let whole = vae.decode(&z)?;
    assert_eq!(whole.dims(), &[1, 3, 7, 8, 12]);
    for n in 1..4 {
        let prefix = vae.decode(&z.narrow(2, 0, n)?)?;
        let frames = cfg.decoded_frames(n);
        assert_eq!(prefix.dim(2)?, frames);
        assert_eq!(max_abs_diff(&prefix, &whole.narrow(2, 0, frames)?)?, 0.0, "prefix of {n} latent frames");
    }
    let video = whole.detach();
    let posterior = vae.encode(&video)?;
    assert_eq!(posterior.mean.dims(), &[1, 2, 4, 2, 3]);
    for n in [1, 3, 5] {
        let prefix = vae.encode(&video.narrow(2, 0, n)?)?;
        let k = cfg.latent_frames(n);
        assert_eq!(max_abs_diff(&prefix.mean, &posterior.mean.narrow(2, 0, k)?)?, 0.0, "encode of {n} frames");
    }
    let err = vae.encode(&video.narrow(2, 0, 4)?).unwrap_err().to_string();
    assert!(err.contains("4 frames"), "{err}");
    Ok(())
}

/// z0 (and learned step noises) → a whole trajectory over normalised latents → the VAE decode →
/// an objective on the video: the recomputing backward (per step, then per decode chunk) against
/// finite differences per variable, and equal to the full-graph backward through everything.
#[test]
fn gradient_through_trajectory_and_decode() -> Result<()> {
    let cfg = tiny_config();
    let vae = random_model(&cfg, 13)?;
    let shape = [1usize, 2, 2, 2, 3];
    let mut rng = SplitMix64::new(14);
    let denoiser =
        GaussianDenoiser { mean: (rng.normal_tensor(&shape[..], DType::F64, &test_device())? * 0.3)?, std: 0.6 };
    let target = rng.uniform_tensor((1, 3, 3, 8, 12), 0.0, 1.0, DType::F64, &test_device())?;
    let objective = DecodedObjective { vae: &vae, inner: TargetMse { target, label: "random video".into() } };
    let cond = Conditioning::default();
    let schedule = Schedule::karras(3, 0.05, 20.0, 7.0)?;
    let churn = Churn { s_churn: 1.0, s_tmin: 0.0, s_tmax: f64::INFINITY, s_noise: 1.0 };
    let plan = churn.plan(&schedule.sigmas, true);
    let noise = NoiseState::draw(15, &shape, &plan, NoiseMode::SdeLearnable, true, DType::F64, &test_device())?;
    let solver = SolverKind::Res.build();
    let traj = Trajectory { denoiser: &denoiser, solver: solver.as_ref(), cond: &cond, schedule, plan };

    let (z0, steps) = noise.tensors();
    let recompute = traj.value_and_grad(&z0, &steps, &objective, GradMode::Recompute)?;
    let full = traj.value_and_grad(&z0, &steps, &objective, GradMode::FullGraph)?;
    let scale = recompute.grad_z0.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let diff = max_abs_diff(&recompute.grad_z0, &full.grad_z0)?;
    println!("loss {:.6} (full {:.6}); ∇z0 max {scale:.3e}, recompute vs full {diff:.2e}", recompute.loss, full.loss);
    assert!(scale > 1e-8, "degenerate gradient");
    assert!((recompute.loss - full.loss).abs() <= 1e-12 * full.loss.abs().max(1.0));
    assert!(diff <= 1e-10 * scale, "recomputation differs from the full graph by {diff:.3e}");
    for (a, b) in recompute.grad_steps.iter().zip(&full.grad_steps) {
        if let (Some(a), Some(b)) = (a, b) {
            assert!(max_abs_diff(a, b)? <= 1e-10 * scale);
        }
    }
    // Worst relative error 4.3e-4, 4.3e-6, 1.8e-7, 3.4e-6 at ε = 1e-5, 1e-6, 1e-7, 1e-8
    // (truncation, then round-off of a loss of 0.09 with gradients of 1e-3): ε = 1e-7.
    let opts = GradCheckOptions { eps: 1e-7, directions: 2, seed: 16, floor: 1e-14 };
    let report = verify_gradient(&traj, &noise, &objective, GradMode::Recompute, &opts)?;
    println!("{}", report.table());
    assert!(report.per_var.len() > 1, "z0 and at least one learned step noise");
    report.assert_nondegenerate(1e-9, "trajectory + decode")?;
    report.assert_close(1e-6, "trajectory + decode")?;
    Ok(())
}

/// The inner objective sees the video in [0, 1] and the recomputed gradient is the full-graph one.
#[test]
fn decoded_objective_value_and_gradient_match_its_full_graph() -> Result<()> {
    let cfg = tiny_config();
    let vae = random_model(&cfg, 17)?;
    let z = latents((1, 2, 2, 2, 3), 18)?;
    let target = Tensor::full(0.5f64, (1, 3, 3, 8, 12), &test_device())?;
    let objective = DecodedObjective { vae: &vae, inner: TargetMse { target, label: "grey".into() } };
    let video01 = ((vae.decode(&vae.denormalize_latents(&z)?)? + 1.0)? / 2.0)?;
    let by_hand = shared::gradcheck::scalar_f64(&(video01 - 0.5)?.sqr()?.mean_all()?)?;
    let (value, grad) = objective.value_and_grad(&z)?;
    assert!((value - by_hand).abs() <= 1e-14, "{value} vs {by_hand}");
    let z_var = Var::from_tensor(&z)?;
    let loss = objective.loss(z_var.as_tensor())?;
    let reference = loss.backward()?.get(z_var.as_tensor()).expect("reached").clone();
    let scale = reference.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    assert!(max_abs_diff(&grad, &reference)? <= 1e-12 * scale.max(1e-30));
    Ok(())
}

#[test]
fn latent_normalisation_round_trips_per_channel() -> Result<()> {
    let cfg = tiny_config();
    let vae = random_model(&cfg, 11)?;
    let mu = latents((1, 2, 2, 2, 3), 12)?;
    let z = vae.normalize_latents(&mu)?;
    // Channel 1: (μ + 0.2)/0.5, by hand.
    let expected = ((mu.narrow(1, 1, 1)? + 0.2)? / 0.5)?;
    assert!(max_abs_diff(&z.narrow(1, 1, 1)?, &expected)? < 1e-15);
    assert!(max_abs_diff(&vae.denormalize_latents(&z)?, &mu)? < 1e-15);
    Ok(())
}

/// The posterior's seeded sample: mean + exp(logvar/2)·ε — over 8192 draws of N(0.3, 0.5²) the
/// sample mean and std land within 4 standard errors; a seed repeats, another seed differs.
#[test]
fn posterior_sample_is_seeded_and_has_the_posterior_moments() -> Result<()> {
    use sampler::cosmos::vae::DiagonalGaussian;
    let shape = (2, 4, 1, 32, 32);
    let posterior = DiagonalGaussian {
        mean: Tensor::full(0.3f64, shape, &test_device())?,
        logvar: Tensor::full(0.25f64.ln(), shape, &test_device())?,
    };
    let a: Vec<f64> = posterior.sample(1)?.flatten_all()?.to_vec1()?;
    let n = a.len() as f64;
    let mean = a.iter().sum::<f64>() / n;
    let std = (a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!((mean - 0.3).abs() < 4.0 * 0.5 / n.sqrt(), "mean {mean}");
    assert!((std - 0.5).abs() < 4.0 * 0.5 / (2.0 * n).sqrt(), "std {std}");
    assert_eq!(posterior.sample(1)?.flatten_all()?.to_vec1::<f64>()?, a);
    assert_ne!(posterior.sample(2)?.flatten_all()?.to_vec1::<f64>()?, a);
    assert_eq!(posterior.mode().flatten_all()?.to_vec1::<f64>()?[0], 0.3);
    Ok(())
}
