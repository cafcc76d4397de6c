//! Collecting and reading datasets: byte-identical output for a seed, transitions that match a
//! replay in the environment, and statistics that match the data.

use rl::dataset::{
    collect_dataset, image_key, CollectConfig, Dataset, Tier, KEY_ACTION, KEY_ENVIRONMENT_STATE, KEY_REWARD, KEY_STATE,
    META_FILE,
};
use rl::env::policy::PolicyKind;
use rl::env::{Env, EnvConfig, CAMERA_NAMES};
use std::collections::BTreeMap;
use std::path::Path;

fn small_config(threads: usize) -> CollectConfig {
    CollectConfig {
        tier: Tier::Mixed,
        episodes: 3,
        seed: 40,
        env: EnvConfig { image_height: 24, image_width: 32, max_steps: 30, render: true, supersample: 2 },
        threads,
    }
}

/// The dataset's files (the lock file a collection leaves is not content).
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap())
        })
        .filter(|(name, _)| name != shared::outputs::LOCK_FILE)
        .collect()
}

#[test]
fn same_seed_gives_byte_identical_shards_for_any_thread_count() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    collect_dataset(&small_config(1), a.path(), &|| {}).unwrap();
    collect_dataset(&small_config(2), b.path(), &|| {}).unwrap();
    let files_a = files(a.path());
    assert_eq!(files_a.len(), 4, "3 shards and meta.json: {:?}", files_a.keys());
    assert!(files_a.contains_key(META_FILE));
    let files_b = files(b.path());
    assert_eq!(files_a.keys().collect::<Vec<_>>(), files_b.keys().collect::<Vec<_>>());
    for (name, bytes) in &files_a {
        assert!(bytes == &files_b[name], "{name} differs between 1 and 2 threads");
    }

    let mut other_seed = small_config(2);
    other_seed.seed = 41;
    let c = tempfile::tempdir().unwrap();
    collect_dataset(&other_seed, c.path(), &|| {}).unwrap();
    assert!(files_a["episode_000000.safetensors"] != files(c.path())["episode_000000.safetensors"]);
}

#[test]
fn transitions_replay_exactly_in_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(2);
    let summary = collect_dataset(&config, dir.path(), &|| {}).unwrap();
    let dataset = Dataset::open(dir.path()).unwrap();
    assert_eq!(dataset.meta(), &summary.meta);
    assert_eq!(dataset.num_episodes(), 3);
    let policies: Vec<_> = dataset.meta().episodes.iter().map(|e| e.policy).collect();
    assert_eq!(policies, [Some(PolicyKind::Random), Some(PolicyKind::Medium), Some(PolicyKind::Expert)]);
    assert_eq!(dataset.transitions().count(), dataset.meta().num_frames);

    let mut env = Env::new(config.env.clone()).unwrap();
    for episode in dataset.episodes() {
        let meta = episode.meta();
        let mut obs = env.reset(meta.seed.unwrap());
        let mut total = 0.0;
        for t in 0..episode.len() {
            let transition = episode.transition(t);
            assert_eq!(transition.state, obs.state.as_slice());
            assert_eq!(transition.environment_state, obs.environment_state.as_slice());
            for (camera, image) in obs.images.iter().enumerate() {
                assert_eq!(transition.images[camera], image.as_slice(), "{}", CAMERA_NAMES[camera]);
            }
            let step = env.step(transition.action);
            assert_eq!(transition.reward, step.reward);
            assert_eq!(transition.done, step.done);
            assert_eq!(transition.terminal, step.success);
            assert_eq!(transition.next_state, step.obs.state.as_slice());
            assert_eq!(transition.next_images[2], step.obs.images[2].as_slice());
            total += step.reward;
            obs = step.obs;
        }
        assert!(episode.done(episode.len() - 1));
        assert!((total - meta.episode_return).abs() < 1e-3);
        assert_eq!(episode.len(), meta.length);
    }
}

/// Per-channel values of every key that meta.json keeps statistics for, gathered from the
/// transitions read back: the joint state, environment state, action and reward as f64, each
/// camera's pixels per RGB channel in [0, 1] units (pixel / 255, as `KeyStats` documents).
fn channels_read_back(dataset: &Dataset) -> BTreeMap<String, Vec<Vec<f64>>> {
    let mut columns: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    let mut push = |key: &str, channels: usize, values: &mut dyn Iterator<Item = f64>| {
        let column = columns.entry(key.to_string()).or_insert_with(|| vec![Vec::new(); channels]);
        for (j, v) in values.enumerate() {
            column[j % channels].push(v);
        }
    };
    for transition in dataset.transitions() {
        push(KEY_STATE, transition.state.len(), &mut transition.state.iter().map(|&x| x as f64));
        push(
            KEY_ENVIRONMENT_STATE,
            transition.environment_state.len(),
            &mut transition.environment_state.iter().map(|&x| x as f64),
        );
        push(KEY_ACTION, transition.action.len(), &mut transition.action.iter().map(|&x| x as f64));
        push(KEY_REWARD, 1, &mut std::iter::once(transition.reward as f64));
        for (camera, pixels) in CAMERA_NAMES.iter().zip(transition.images) {
            push(&image_key(camera), 3, &mut pixels.iter().map(|&p| p as f64 / 255.0));
        }
    }
    columns
}

/// Neumaier's compensated sum: accurate to about one rounding whatever n, so the reference
/// statistics below carry no summation error of their own.
fn accurate_sum(values: impl Iterator<Item = f64>) -> f64 {
    let (mut sum, mut compensation) = (0.0f64, 0.0f64);
    for x in values {
        let t = sum + x;
        compensation += if sum.abs() >= x.abs() { (sum - t) + x } else { (x - t) + sum };
        sum = t;
    }
    sum + compensation
}

#[test]
fn meta_statistics_match_the_data() {
    let dir = tempfile::tempdir().unwrap();
    collect_dataset(&small_config(2), dir.path(), &|| {}).unwrap();
    let dataset = Dataset::open(dir.path()).unwrap();
    let meta = dataset.meta();
    let columns = channels_read_back(&dataset);
    // Statistics exist for exactly these keys (no more, no fewer).
    assert_eq!(meta.stats.keys().collect::<Vec<_>>(), columns.keys().collect::<Vec<_>>());
    for (key, channels) in &columns {
        let stats = &meta.stats[key];
        assert_eq!(
            (stats.mean.len(), stats.std.len(), stats.min.len(), stats.max.len()),
            (channels.len(), channels.len(), channels.len(), channels.len()),
            "{key}"
        );
        for (j, values) in channels.iter().enumerate() {
            // Population mean and std, two-pass, in f64, over every frame of every episode.
            let n = values.len() as f64;
            assert_eq!(
                n as usize,
                meta.num_frames
                    * if key.starts_with("observation.images.") { meta.image_height * meta.image_width } else { 1 }
            );
            let mean = accurate_sum(values.iter().copied()) / n;
            let variance = accurate_sum(values.iter().map(|x| (x - mean).powi(2))) / n;
            let second_moment = accurate_sum(values.iter().map(|x| x * x)) / n;
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let what = format!("{key}[{j}]");
            // Min and max are data values: f32 → f64 is exact; a pixel / 255 may be computed
            // as pixel · (1/255) (one rounding apart).
            assert!((stats.min[j] - min).abs() <= 1e-15 * min.abs(), "{what} min {} vs {min}", stats.min[j]);
            assert!((stats.max[j] - max).abs() <= 1e-15 * max.abs(), "{what} max {} vs {max}", stats.max[j]);
            // The writer sums exactly (pixels as integers) or in f64 over one episode at a time;
            // with the compensated reference the difference is an ulp or two (measured max
            // 2.0e-16 of √E[x²]).
            assert!(
                (stats.mean[j] - mean).abs() <= 1e-14 * second_moment.sqrt(),
                "{what} mean {} vs {mean}",
                stats.mean[j]
            );
            // Compare the variance, not the std: the writer's one-pass E[x²] − mean² loses digits
            // relative to E[x²], which the square root would magnify near zero variance
            // (measured max 3.9e-16 of E[x²]). Dividing by n − 1 instead of n would be off by
            // variance/n, at least 5e-7 of E[x²] on every channel here.
            assert!(
                (stats.std[j].powi(2) - variance).abs() <= 1e-14 * second_moment,
                "{what} std {} vs {}",
                stats.std[j],
                variance.sqrt()
            );
        }
    }
    // Actions are clamped to [-1, 1] by the policies that made them.
    assert!(meta.stats[KEY_ACTION].min.iter().chain(&meta.stats[KEY_ACTION].max).all(|x| x.abs() <= 1.0));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(META_FILE)).unwrap()).unwrap();
    for field in ["cameras", "fps", "env", "stats", "tier", "seed", "reference_returns", "keys"] {
        assert!(json.get(field).is_some(), "meta.json lacks {field}");
    }
    assert!(json["reference_returns"]["command"].as_str().unwrap().contains("--evaluate-references"));
}
