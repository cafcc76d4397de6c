//! The trainer's replay over a real (tiny) image dataset: the auxiliary head's privileged
//! targets, the joint state and the actions are z-scored as the reference defines it (checked
//! value by value against statistics computed in the test), and a LAPO iteration with the
//! head on runs with the built-in audit passing.

use candle_core::{DType, Device};
use rl::dataset::{collect_dataset, CollectConfig, Tier};
use rl::encoders::EncoderKind;
use rl::env::EnvConfig;
use rl::lapo::{EncoderOwner, Lapo, LapoConfig};
use rl::trainer::{evaluate_behaviour, paired_difference, Replay};

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

/// The auxiliary head's raw targets from their definition (trainer docs): the environment state
/// (red puck, blue puck, red goal, blue goal, x and y each), then per arm the puck relative to
/// the gripper cup in the gripper's frame — along the heading and along its left normal — and
/// the puck's offset to its goal. From the recorded observation alone, in f64: per arm the
/// state holds [q (3), qd (3), gripper (2), cup x, cup y, cos heading, sin heading].
fn privileged_by_definition(state: &[f32], environment_state: &[f32]) -> Vec<f64> {
    let s: Vec<f64> = state.iter().map(|&x| x as f64).collect();
    let env: Vec<f64> = environment_state.iter().map(|&x| x as f64).collect();
    let mut out = env.clone();
    for arm in 0..2 {
        let (cup_x, cup_y, cos, sin) = (s[arm * 12 + 8], s[arm * 12 + 9], s[arm * 12 + 10], s[arm * 12 + 11]);
        let (puck_x, puck_y) = (env[2 * arm], env[2 * arm + 1]);
        let (goal_x, goal_y) = (env[4 + 2 * arm], env[4 + 2 * arm + 1]);
        let (dx, dy) = (puck_x - cup_x, puck_y - cup_y);
        out.extend([dx * cos + dy * sin, dx * -sin + dy * cos, goal_x - puck_x, goal_y - puck_y]);
    }
    out
}

/// `normalised` (rows × columns, what the replay produced) against the z-score of `raw` as the
/// reference algorithm defines it: (x − mean)/(std + 1e-6) with the population mean and std of
/// each column over the whole dataset (computed here, two-pass, in f64). Checks every value, and
/// that each normalised column has mean 0 and std std/(std + 1e-6) (≈ 1).
fn assert_z_scored(what: &str, raw: &[Vec<f64>], normalised: &[Vec<f64>]) {
    assert_eq!(raw.len(), normalised.len(), "{what}: rows");
    let n = raw.len() as f64;
    for column in 0..raw[0].len() {
        let x: Vec<f64> = raw.iter().map(|row| row[column]).collect();
        let z: Vec<f64> = normalised.iter().map(|row| row[column]).collect();
        let mean = x.iter().sum::<f64>() / n;
        let std = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let what = format!("{what} column {column} (std {std:.3e})");
        // Error budget: the replay works in f32 — the task-frame features, the stored mean and
        // std, the subtraction and the quotient — so a value is off by a few f32 ulps of
        // 1 + |x|/std (measured max 1.1e-7 of that scale over all 48 columns, the normalised
        // means and stds within 5.1e-7 and 6.4e-8 absolute).
        let tolerance = Z_TOLERANCE * (1.0 + x.iter().fold(0.0f64, |m, v| m.max(v.abs())) / (std + 1e-6));
        for (row, (&xi, &zi)) in x.iter().zip(&z).enumerate() {
            let expected = (xi - mean) / (std + 1e-6);
            assert!((zi - expected).abs() <= tolerance, "{what} row {row}: {zi} vs {expected}");
        }
        let z_mean = z.iter().sum::<f64>() / n;
        let z_std = (z.iter().map(|v| (v - z_mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(z_mean.abs() <= tolerance, "{what}: normalised mean {z_mean}");
        // A std over n − 1 would be off by about 1/(2n) ≈ 1.2e-2 here (n = 40).
        assert!((z_std - std / (std + 1e-6)).abs() <= tolerance, "{what}: normalised std {z_std}");
    }
}

const Z_TOLERANCE: f64 = 1e-6;

#[test]
fn replay_carries_z_scored_privileged_targets_for_the_auxiliary_head() {
    let dir = tiny_image_dataset(5);

    let state_only = Replay::open(dir.path(), EncoderKind::None, 0.99).unwrap();
    assert_eq!(state_only.dims.privileged_dim, 0);
    assert!(state_only.batch(&state_only.index()[..2], DType::F64, &Device::Cpu).unwrap().privileged.is_none());

    let replay = Replay::open(dir.path(), EncoderKind::Conv, 0.99).unwrap();
    // The whole dataset as one batch, against raw values read from the dataset and statistics
    // computed here, not by the trainer's functions.
    let picks = replay.index().to_vec();
    let batch = replay.batch(&picks, DType::F64, &Device::Cpu).unwrap();
    let mut raw_privileged = Vec::new();
    let mut raw_state = Vec::new();
    let mut raw_action = Vec::new();
    for &(e, t) in &picks {
        let tr = replay.dataset.episode(e).unwrap().transition(t);
        raw_privileged.push(privileged_by_definition(tr.state, tr.environment_state));
        // With an image encoder the model's state is the joint state alone (trainer docs).
        raw_state.push(tr.state.iter().map(|&x| x as f64).collect::<Vec<_>>());
        raw_action.push(tr.action.iter().map(|&x| x as f64).collect::<Vec<_>>());
    }
    assert_eq!(picks.len(), replay.dataset.meta().num_frames, "the index covers every transition");
    assert_eq!(replay.dims.privileged_dim, raw_privileged[0].len());
    let privileged = batch.privileged.as_ref().unwrap().to_vec2::<f64>().unwrap();
    let state = batch.state.to_vec2::<f64>().unwrap();
    let action = batch.action.to_vec2::<f64>().unwrap();
    assert_z_scored("privileged", &raw_privileged, &privileged);
    assert_z_scored("state", &raw_state, &state);
    assert_z_scored("action", &raw_action, &action);

    let config = LapoConfig {
        encoder: EncoderKind::Conv,
        encoder_owner: EncoderOwner::Critic,
        aux_state_weight: 1.0,
        batch_size: 8,
        ..LapoConfig::reference()
    };
    let mut lapo = Lapo::new(config, replay.dims.clone(), replay.bounds, DType::F32, &Device::Cpu).unwrap();
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
        ..LapoConfig::reference()
    };
    let mut lapo = Lapo::new(config, replay.dims.clone(), replay.bounds, DType::F32, &Device::Cpu).unwrap();
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
        let recorded = meta.normalized_score.unwrap();
        assert!((score - recorded as f64).abs() < 1e-4, "{score} vs {recorded}");
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
