//! End to end on a tiny configuration (seconds): environment clips → a few EDM training steps
//! of a tiny pixel-space Cosmos-DiT world model → saved and re-loaded as frozen weights → the
//! policy stress test against an exported (untrained, conv-encoder) LAPO policy: z0 optimised
//! by gradient ascent through the whole trajectory and the policy, and the outputs written.
//! Training must change every saved tensor, and the reloaded model must compute bitwise what the
//! trained one does.
//!
//! The policy is untrained because training one takes minutes; what is tested is the plumbing
//! and that ascent increases the measured policy error, not the policy's quality.

#[path = "../support/policies.rs"]
mod policies;

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use rl::encoders::EncoderKind;
use sampler::denoiser::Denoiser;
use sampler::optimize::Direction;
use sampler::optimize::NoiseConstraint;
use sampler::solver::SolverKind;
use sampler::stress::{run, ScenarioSource, StressSettings};
use sampler::world_model::{
    batch_indices, collect_clips, edm_loss, predict, trainable_vars, DataSpec, TrainSettings, WorldModel,
    WorldModelConfig,
};
use shared::params::{GroupOptimizer, OptimizerConfig};

/// The f32 bit patterns of a tensor (exact comparison; NaN-safe).
fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
}

#[test]
fn tiny_world_model_and_policy_stress_test() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Device::Cpu;
    let cfg = WorldModelConfig::tiny();

    // Train a few steps: the loss must be finite and the weights must change what is saved.
    let clips =
        collect_clips(&cfg, &DataSpec { episodes: 3, first_seed: 100, frames_per_episode: 12, clip_spacing: 1 }, &dev)?;
    assert!(clips.len() >= 20, "only {} clips", clips.len());
    let varmap = candle_nn::VarMap::new();
    let model = WorldModel::new_trainable(&cfg, &varmap, 0, &dev)?;
    // Deep copies: the optimiser updates the vars' storage in place.
    let initial: HashMap<String, Tensor> =
        trainable_vars(&varmap)?.into_iter().map(|(n, v)| Ok((n, v.as_tensor().copy()?))).collect::<Result<_>>()?;
    let settings = TrainSettings { steps: 5, batch_size: 4, ..TrainSettings::default() };
    let mut opt = GroupOptimizer::new("world_model", trainable_vars(&varmap)?, OptimizerConfig::adam(1e-3))?;
    let mut rng = shared::rng::SplitMix64::new(1);
    for _ in 0..settings.steps {
        let batch = clips.select(&batch_indices(&mut rng, clips.len(), settings.batch_size))?;
        let loss = edm_loss(&model, &batch, &mut rng, &settings)?;
        let value = shared::gradcheck::scalar_f64(&loss)?;
        assert!(value.is_finite() && value > 0.0, "EDM loss {value}");
        opt.step(&loss.backward()?)?;
    }
    let weights_path = dir.path().join("world_model.safetensors");
    shared::weights::save_varmap_atomic(&varmap, &weights_path)?;
    shared::io::write_json_atomic(&dir.path().join("world_model.json"), &cfg)?;

    // What was saved is the trained weights, and training changed every tensor (Adam moves every
    // element whose gradient is non-zero by ~lr; a tensor left at its initial value would be one
    // the loss does not reach, or a save of the wrong varmap).
    let saved = shared::weights::read_safetensors(&weights_path, &dev)?;
    let mut names: Vec<&String> = initial.keys().collect();
    names.sort();
    assert_eq!(saved.len(), initial.len(), "saved {} tensors, the model has {}", saved.len(), initial.len());
    let trained: HashMap<String, Var> = trainable_vars(&varmap)?.into_iter().collect();
    for name in names {
        let s = saved.get(name).ok_or_else(|| anyhow::anyhow!("{name} was not saved"))?;
        assert_eq!(bits(s)?, bits(trained[name].as_tensor())?, "{name}: saved ≠ trained");
        assert_ne!(bits(s)?, bits(&initial[name])?, "{name}: training did not change it");
    }

    // Reloaded as frozen weights, the model computes exactly what the trained one does: the file
    // holds the f32 bits as they were, and the same CPU ops on the same bits in the same order
    // give the same bits (plain tensors or vars make no difference to the values), so bitwise.
    let frozen = WorldModel::load_dir(dir.path(), DType::F32, &dev)?;
    let probe = clips.select(&[0, 7, 13])?;
    let x = shared::rng::SplitMix64::new(2).normal_tensor(probe.frames.dims(), DType::F32, &dev)?;
    for sigma in [0.05, 1.0, 20.0] {
        let sigma_bt = sampler::denoiser::uniform_sigma(&x, sigma)?;
        let noisy = (&probe.frames + (&x * sigma)?)?;
        let d_trained =
            model.denoiser().denoise(&noisy, &sigma_bt, &model.conditioning(&probe.frames, &probe.actions)?)?;
        let d_frozen =
            frozen.denoiser().denoise(&noisy, &sigma_bt, &frozen.conditioning(&probe.frames, &probe.actions)?)?;
        assert_eq!(bits(&d_frozen)?, bits(&d_trained)?, "σ = {sigma}: the reloaded model's prediction differs");
    }
    let sample = |m: &WorldModel| predict(m, &probe, SolverKind::Res, 2, 3.0, 80.0, 5);
    assert_eq!(bits(&sample(&frozen)?)?, bits(&sample(&model)?)?, "the reloaded model samples differently");

    let policy_path = dir.path().join("policy.safetensors");
    policies::export_untrained(&policy_path, EncoderKind::Conv, (32, 32))?;

    let out = dir.path().join("stress");
    let settings = StressSettings {
        scenarios: ScenarioSource::Seeds(vec![0, 1]),
        start_frame: 2,
        iterations: 3,
        lr: 0.3,
        direction: Direction::Ascent,
        solver: SolverKind::Res,
        num_steps: 3,
        sigma_min: 0.002,
        sigma_max: 80.0,
        // Unconstrained: the test is about the gradient reaching z0 through the trained model.
        constraint: NoiseConstraint::default(),
        chi_reg: 0.0,
        shard: None,
        top: 2,
    };
    let mut lines = Vec::new();
    let summary = run(&frozen, &policy_path, &settings, &out, |l| lines.push(l.to_string()))?;
    println!("{}", lines.join("\n"));
    assert_eq!(summary.results.len(), 2);
    for r in &summary.results {
        assert!(r.error_before.is_finite() && r.error_after.is_finite() && r.error_on_real_frames.is_finite());
        assert!(r.grad_z0_norm_initial > 0.0, "{}: no gradient reached z0", r.scenario.id);
        for v in [r.realism_real, r.realism_before, r.realism_after, r.nearest_real_before, r.nearest_real_after] {
            assert!(v.is_some_and(f64::is_finite), "{}: a realism measure is missing: {r:?}", r.scenario.id);
        }
        assert!(
            r.error_after > r.error_before,
            "{}: ascent did not increase the policy error ({} → {})",
            r.scenario.id,
            r.error_before,
            r.error_after
        );
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json"))?)?;
    assert_eq!(report["scenario_ids"].as_array().map(Vec::len), Some(2));
    for f in [
        "scenarios/ep0-f2.json",
        "scenarios/ep1-f2.safetensors",
        "report/summary.md",
        "report/gallery.png",
        "report/gallery.gif",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).metadata()?.len() > 0, "{f} missing or empty");
    }

    // A state-only policy cannot be stressed through images: a clear error, not a zero gradient.
    let state_only = dir.path().join("state_only.safetensors");
    policies::export_untrained(&state_only, EncoderKind::None, (32, 32))?;
    let err = match run(
        &frozen,
        &state_only,
        &StressSettings { scenarios: ScenarioSource::Seeds(vec![0]), ..settings },
        &out,
        |_| {},
    ) {
        Ok(_) => anyhow::bail!("a state-only policy was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("state-only"), "unexpected error: {err}");
    Ok(())
}
