//! Collecting and reading datasets: byte-identical output for a seed, transitions that match a
//! replay in the environment, and statistics that match the data.

use rl::dataset::{collect_dataset, CollectConfig, Dataset, Tier, KEY_ACTION, META_FILE};
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

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap())
        })
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
    assert_eq!(policies, [PolicyKind::Random, PolicyKind::Medium, PolicyKind::Expert]);
    assert_eq!(dataset.transitions().count(), dataset.meta().num_frames);

    let mut env = Env::new(config.env.clone()).unwrap();
    for episode in dataset.episodes() {
        let meta = episode.meta();
        let mut obs = env.reset(meta.seed);
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

#[test]
fn meta_statistics_match_the_data() {
    let dir = tempfile::tempdir().unwrap();
    collect_dataset(&small_config(2), dir.path(), &|| {}).unwrap();
    let dataset = Dataset::open(dir.path()).unwrap();
    let stats = &dataset.meta().stats[KEY_ACTION];
    let dim = dataset.meta().action_dim;
    let mut sum = vec![0.0f64; dim];
    let mut count = 0.0;
    for transition in dataset.transitions() {
        for (s, &a) in sum.iter_mut().zip(transition.action) {
            *s += a as f64;
        }
        count += 1.0;
    }
    for (j, total) in sum.iter().enumerate() {
        assert!((stats.mean[j] - total / count).abs() < 1e-9);
        assert!(stats.min[j] >= -1.0 && stats.max[j] <= 1.0);
    }
    let image_stats = &dataset.meta().stats["observation.images.global"];
    assert_eq!(image_stats.mean.len(), 3);
    assert!(image_stats.mean.iter().all(|&m| m > 0.0 && m < 1.0));
    assert!(image_stats.std.iter().all(|&s| s > 0.0));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(META_FILE)).unwrap()).unwrap();
    for field in ["cameras", "fps", "env", "stats", "tier", "seed", "reference_returns", "keys"] {
        assert!(json.get(field).is_some(), "meta.json lacks {field}");
    }
    assert!(json["reference_returns"]["command"].as_str().unwrap().contains("--evaluate-references"));
}
