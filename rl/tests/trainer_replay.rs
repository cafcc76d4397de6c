//! The trainer's replay over a real (tiny) image dataset: the auxiliary head's privileged
//! targets are the z-scored puck/goal state of each transition, and a LAPO iteration with the
//! head on runs with the built-in audit passing.

use candle_core::{DType, Device};
use rl::dataset::{collect_dataset, CollectConfig, Tier};
use rl::encoders::EncoderKind;
use rl::env::EnvConfig;
use rl::lapo::{EncoderOwner, Lapo, LapoConfig};
use rl::trainer::{privileged_targets, Replay};

#[test]
fn replay_carries_z_scored_privileged_targets_for_the_auxiliary_head() {
    let dir = tempfile::tempdir().unwrap();
    let config = CollectConfig {
        tier: Tier::Mixed,
        episodes: 2,
        seed: 5,
        env: EnvConfig { image_height: 16, image_width: 16, max_steps: 20, render: true, supersample: 1 },
        threads: 1,
    };
    collect_dataset(&config, dir.path(), &|| {}).unwrap();

    let state_only = Replay::open(dir.path(), EncoderKind::None, 0.99).unwrap();
    assert_eq!(state_only.dims.privileged_dim, 0);
    assert!(state_only.batch(&state_only.index()[..2], DType::F64, &Device::Cpu).unwrap().privileged.is_none());

    let replay = Replay::open(dir.path(), EncoderKind::Conv, 0.99).unwrap();
    let dim = replay.dims.privileged_dim;
    assert!(dim > 0);
    // The whole dataset as one batch: z-scored targets have mean ≈ 0 and std ≈ 1 per column
    // (columns that never vary, like a static goal in every episode, excepted).
    let picks = replay.index().to_vec();
    let batch = replay.batch(&picks, DType::F64, &Device::Cpu).unwrap();
    let privileged = batch.privileged.as_ref().unwrap().to_vec2::<f64>().unwrap();
    assert_eq!(privileged.len(), picks.len());
    for column in 0..dim {
        let values: Vec<f64> = privileged.iter().map(|row| row[column]).collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert!(mean.abs() < 1e-4, "column {column} mean {mean}");
    }
    // Row by row, the target is the transition's own privileged state.
    let (e, t) = picks[7];
    let tr = replay.dataset.episode(e).unwrap().transition(t);
    let expected = replay.norm.privileged(&privileged_targets(tr.state, tr.environment_state));
    for (a, b) in privileged[7].iter().zip(&expected) {
        assert!((a - *b as f64).abs() < 1e-5, "{a} vs {b}");
    }

    let config = LapoConfig {
        encoder: EncoderKind::Conv,
        encoder_owner: EncoderOwner::Critic,
        aux_state_weight: 1.0,
        batch_size: 8,
        ..LapoConfig::default()
    };
    let mut lapo = Lapo::new(config, replay.dims, replay.bounds, DType::F32, &Device::Cpu).unwrap();
    let small = replay.batch(&picks[..8], DType::F32, &Device::Cpu).unwrap();
    let (losses, audit) = lapo.train_step(&small, true).unwrap();
    assert!(losses.aux_state > 0.0 && losses.all_finite(), "{losses:?}");
    let audit = audit.unwrap();
    assert!(audit.passed(), "{}", audit.table());
}
