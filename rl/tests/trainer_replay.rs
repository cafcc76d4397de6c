//! The trainer's replay over a real (tiny) image dataset: the auxiliary head's privileged
//! targets are the z-scored puck/goal state of each transition, and a LAPO iteration with the
//! head on runs with the built-in audit passing.

use candle_core::{DType, Device};
use rl::dataset::{collect_dataset, CollectConfig, Tier};
use rl::encoders::EncoderKind;
use rl::env::EnvConfig;
use rl::lapo::{EncoderOwner, Lapo, LapoConfig};
use rl::trainer::{evaluate_behaviour, paired_difference, privileged_targets, Replay};

/// Two short mixed-tier episodes with 16×16 views, anti-aliased ×2 (as the default dataset).
fn tiny_image_dataset(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = CollectConfig {
        tier: Tier::Mixed,
        episodes: 2,
        seed,
        env: EnvConfig { image_height: 16, image_width: 16, max_steps: 20, render: true, supersample: 2 },
        threads: 1,
    };
    collect_dataset(&config, dir.path(), &|| {}).unwrap();
    dir
}

#[test]
fn replay_carries_z_scored_privileged_targets_for_the_auxiliary_head() {
    let dir = tiny_image_dataset(5);

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

/// With the head inside the encoder (and the joint state passed through): pretraining on the
/// privileged state lowers its loss, and the exported policy (header carries the head's width
/// and the skip) acts exactly like the trainer's model.
#[test]
fn in_encoder_head_pretrains_and_exports() {
    let dir = tiny_image_dataset(6);
    let replay = Replay::open(dir.path(), EncoderKind::Conv, 0.99).unwrap();
    let config = LapoConfig {
        encoder: EncoderKind::Conv,
        aux_state_weight: 1.0,
        aux_state_input: true,
        feature_layout: rl::encoders::FeatureLayout::FusedState,
        batch_size: 16,
        ..LapoConfig::default()
    };
    let mut lapo = Lapo::new(config, replay.dims, replay.bounds, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(lapo.encoder.privileged_dim(), replay.dims.privileged_dim);
    let picks: Vec<(usize, usize)> = replay.index()[..16].to_vec();
    let batch = replay.batch(&picks, DType::F32, &Device::Cpu).unwrap();
    let mut opt = shared::params::GroupOptimizer::new(
        "pretraining",
        lapo.partitions.vars(rl::lapo::groups::ENCODER).unwrap(),
        shared::params::OptimizerConfig::adam(1e-3),
    )
    .unwrap();
    let first = lapo.pretrain_encoder_step(&batch, &mut opt).unwrap();
    let mut last = first;
    for _ in 0..30 {
        last = lapo.pretrain_encoder_step(&batch, &mut opt).unwrap();
    }
    assert!(last < 0.5 * first, "pretraining on one batch: {first} → {last}");
    lapo.sync_target_encoder().unwrap();

    let path = dir.path().join("policy.safetensors");
    rl::policy::export(&lapo, &replay.norm, &path).unwrap();
    let policy = rl::policy::ExportedPolicy::load(&path, &Device::Cpu).unwrap();
    assert_eq!(policy.header.privileged_dim, replay.dims.privileged_dim);
    assert_eq!(policy.header.feature_layout, rl::encoders::FeatureLayout::FusedState);
    // Evaluation must render as the data was: the file records the anti-aliasing.
    assert_eq!(policy.header.supersample, 2);
    use rl::trainer::Actor;
    let ours = lapo.act(batch.images.as_ref(), &batch.state).unwrap().to_vec2::<f32>().unwrap();
    let theirs = policy.act_batch(batch.images.as_ref(), &batch.state).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(ours, theirs);
}

#[test]
fn behaviour_evaluation_replays_the_dataset_episodes_of_the_same_seeds() {
    // A mixed dataset's episode i is the tier's i-th policy on seed `seed + i`; evaluating the
    // behaviour from the same seed must reproduce each episode's recorded score (without rendering:
    // the scripted policies read the simulator, so the images must not change what they do).
    let seed = 41;
    let dir = tiny_image_dataset(seed);
    let dataset = rl::dataset::Dataset::open(dir.path()).unwrap();
    let episodes = &dataset.meta().episodes;
    let env = EnvConfig { image_height: 16, image_width: 16, max_steps: 20, render: true, supersample: 2 };
    let behaviour = evaluate_behaviour(Tier::Mixed, &env, episodes.len(), seed).unwrap();
    assert_eq!(behaviour.episode_scores.len(), episodes.len());
    for (score, meta) in behaviour.episode_scores.iter().zip(episodes) {
        assert!((score - meta.normalized_score as f64).abs() < 1e-4, "{score} vs {}", meta.normalized_score);
    }
    // Paired difference of two evaluations: per-episode differences, their mean and its
    // standard error (sample std / √n), computed here from the definition.
    let shifted = rl::trainer::Evaluation {
        episode_scores: behaviour.episode_scores.iter().enumerate().map(|(i, s)| s + 3.0 + i as f64).collect(),
        ..behaviour.clone()
    };
    let difference = paired_difference(&shifted, &behaviour).unwrap();
    let diffs: Vec<f64> = (0..episodes.len()).map(|i| 3.0 + i as f64).collect();
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let sample_var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (diffs.len() - 1) as f64;
    assert!((difference.mean - mean).abs() < 1e-9);
    assert!((difference.standard_error - (sample_var / diffs.len() as f64).sqrt()).abs() < 1e-9);
    let one_episode = rl::trainer::Evaluation { episode_scores: vec![1.0], ..behaviour.clone() };
    assert!(paired_difference(&one_episode, &behaviour).is_err(), "different seed counts must be refused");
}
