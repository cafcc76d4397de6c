//! End to end on a tiny configuration (seconds): environment clips → a few EDM training steps
//! of a tiny pixel-space Cosmos-DiT world model → saved and re-loaded as frozen weights → the
//! policy stress test against an exported (untrained, conv-encoder) LAPO policy: z0 optimised
//! by gradient ascent through the whole trajectory and the policy, and the outputs written.
//!
//! The policy is untrained because training one takes minutes; what is tested is the plumbing
//! and that ascent increases the measured policy error, not the policy's quality.

use anyhow::Result;
use candle_core::{DType, Device};
use rl::encoders::EncoderKind;
use rl::lapo::{Dims, Lapo, LapoConfig, ValueBounds};
use rl::trainer::Normalization;
use sampler::optimize::Direction;
use sampler::solver::SolverKind;
use sampler::stress::{run, StressSettings};
use sampler::world_model::{
    batch_indices, collect_clips, edm_loss, trainable_vars, DataSpec, TrainSettings, WorldModel, WorldModelConfig,
};
use shared::params::{GroupOptimizer, OptimizerConfig};

/// Identity z-scoring: the tests' policies see the state as it is.
fn identity_normalization() -> Normalization {
    Normalization {
        state_mean: vec![0.0; rl::env::STATE_DIM],
        state_std: vec![1.0; rl::env::STATE_DIM],
        action_mean: vec![0.0; rl::env::ACTION_DIM],
        action_std: vec![1.0; rl::env::ACTION_DIM],
        reward_scale: 1.0,
        privileged_mean: Vec::new(),
        privileged_std: Vec::new(),
    }
}

fn export_untrained_conv_policy(path: &std::path::Path) -> Result<()> {
    let config = LapoConfig { encoder: EncoderKind::Conv, seed: 3, ..LapoConfig::default() };
    let dims = Dims {
        state_dim: rl::env::STATE_DIM,
        action_dim: rl::env::ACTION_DIM,
        image_hw: (32, 32),
        privileged_dim: 0,
        supersample: 1,
    };
    let lapo = Lapo::new(config, dims, ValueBounds { min_v: 0.0, max_v: 100.0 }, DType::F32, &Device::Cpu)?;
    rl::policy::export(&lapo, &identity_normalization(), path)
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
    shared::weights::save_varmap_atomic(&varmap, &dir.path().join("world_model.safetensors"))?;
    shared::io::write_json_atomic(&dir.path().join("world_model.json"), &cfg)?;
    let frozen = WorldModel::load_dir(dir.path(), DType::F32, &dev)?;

    let policy_path = dir.path().join("policy.safetensors");
    export_untrained_conv_policy(&policy_path)?;

    let out = dir.path().join("stress");
    let settings = StressSettings {
        seeds: vec![0, 1],
        start_frame: 2,
        iterations: 3,
        lr: 0.3,
        direction: Direction::Ascent,
        solver: SolverKind::Res,
        num_steps: 3,
        sigma_min: 0.002,
        sigma_max: 80.0,
    };
    let mut lines = Vec::new();
    let summary = run(&frozen, &policy_path, &settings, &out, |l| lines.push(l.to_string()))?;
    println!("{}", lines.join("\n"));
    assert_eq!(summary.results.len(), 2);
    for r in &summary.results {
        assert!(r.error_before.is_finite() && r.error_after.is_finite() && r.error_on_real_frames.is_finite());
        assert!(r.grad_z0_norm_initial > 0.0, "seed {}: no gradient reached z0", r.seed);
        assert!(
            r.error_after > r.error_before,
            "seed {}: ascent did not increase the policy error ({} → {})",
            r.seed,
            r.error_before,
            r.error_after
        );
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json"))?)?;
    assert_eq!(report["denoiser_is_analytic"], false);
    assert_eq!(report["results"].as_array().map(Vec::len), Some(2));
    for f in ["seed0_before_after.png", "seed0_before.gif", "seed1_after.gif", "metrics.jsonl"] {
        assert!(out.join(f).metadata()?.len() > 0, "{f} missing or empty");
    }

    // A state-only policy cannot be stressed through images: a clear error, not a zero gradient.
    let state_only = dir.path().join("state_only.safetensors");
    let lapo = Lapo::new(
        LapoConfig::default(),
        Dims {
            state_dim: rl::env::STATE_DIM,
            action_dim: rl::env::ACTION_DIM,
            image_hw: (32, 32),
            privileged_dim: 0,
            supersample: 1,
        },
        ValueBounds { min_v: 0.0, max_v: 100.0 },
        DType::F32,
        &dev,
    )?;
    rl::policy::export(&lapo, &identity_normalization(), &state_only)?;
    let err = match run(&frozen, &state_only, &StressSettings { seeds: vec![0], ..settings }, &out, |_| {}) {
        Ok(_) => anyhow::bail!("a state-only policy was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("state-only"), "unexpected error: {err}");
    Ok(())
}
