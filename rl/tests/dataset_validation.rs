//! A damaged dataset fails to open with an error naming the shard file and key, never a panic.

use rl::dataset::{collect_dataset, CollectConfig, Dataset, DatasetError, Tier};
use rl::env::EnvConfig;
use std::path::{Path, PathBuf};

const SHARD: &str = "episode_000001.safetensors";

fn make_dataset() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = CollectConfig {
        tier: Tier::Random,
        episodes: 2,
        seed: 5,
        env: EnvConfig { image_height: 16, image_width: 16, max_steps: 12, render: true, supersample: 1 },
        threads: 1,
    };
    collect_dataset(&config, dir.path(), &|| {}).unwrap();
    let shard = dir.path().join(SHARD);
    (dir, shard)
}

fn open_error(dir: &Path) -> String {
    match Dataset::open(dir) {
        Ok(_) => panic!("a damaged dataset opened without error"),
        Err(err) => err.to_string(),
    }
}

/// Header length and header JSON of a safetensors file.
fn header(bytes: &[u8]) -> (usize, String) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (n, String::from_utf8(bytes[8..8 + n].to_vec()).unwrap())
}

#[test]
fn intact_dataset_opens() {
    let (dir, _) = make_dataset();
    assert_eq!(Dataset::open(dir.path()).unwrap().num_episodes(), 2);
}

#[test]
fn truncated_shard_names_the_file() {
    let (dir, shard) = make_dataset();
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains(SHARD), "{err}");
    // Cut inside the header too.
    std::fs::write(&shard, &bytes[..20]).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains(SHARD), "{err}");
}

#[test]
fn tampered_dtype_names_the_file_and_key() {
    let (dir, shard) = make_dataset();
    let mut bytes = std::fs::read(&shard).unwrap();
    let (n, text) = header(&bytes);
    let key_at = text.find("\"observation.state\"").unwrap();
    let dtype_at = key_at + text[key_at..].find("\"F32\"").unwrap();
    bytes[8 + dtype_at + 1] = b'I'; // F32 -> I32, same length
    assert_eq!(header(&bytes).0, n);
    std::fs::write(&shard, &bytes).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains(SHARD) && err.contains("observation.state") && err.contains("I32"), "{err}");
}

#[test]
fn missing_key_and_wrong_shape_name_the_key() {
    let (dir, shard) = make_dataset();
    let original = std::fs::read(&shard).unwrap();
    // Rename a key (same length) so it is missing.
    let mut bytes = original.clone();
    let (_, text) = header(&bytes);
    let at = text.find("\"next.reward\"").unwrap();
    bytes[8 + at + 1..8 + at + 5].copy_from_slice(b"NEXT");
    std::fs::write(&shard, &bytes).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains(SHARD) && err.contains("next.reward") && err.contains("missing"), "{err}");

    // meta.json claims a different length than the shard holds.
    std::fs::write(&shard, &original).unwrap();
    let meta_path = dir.path().join("meta.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    // (num_frames follows, so meta.json is consistent in itself and the shard is what disagrees.)
    let length = meta["episodes"][1]["length"].as_u64().unwrap();
    let frames = meta["num_frames"].as_u64().unwrap();
    meta["episodes"][1]["length"] = serde_json::json!(length - 1);
    meta["num_frames"] = serde_json::json!(frames - 1);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains(SHARD) && err.contains("shape"), "{err}");
}

#[test]
fn tampered_values_and_garbage_are_reported() {
    let (dir, shard) = make_dataset();
    let original = std::fs::read(&shard).unwrap();
    // Overwrite the first episode_index entry with another episode number.
    let (n, text) = header(&original);
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    let start = parsed["episode_index"]["data_offsets"][0].as_u64().unwrap() as usize;
    let mut bytes = original.clone();
    bytes[8 + n + start..8 + n + start + 8].copy_from_slice(&7i64.to_le_bytes());
    std::fs::write(&shard, &bytes).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains(SHARD) && err.contains("episode_index"), "{err}");

    // Garbage in the header.
    let mut bytes = original.clone();
    bytes[9] = b'#';
    std::fs::write(&shard, &bytes).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains(SHARD), "{err}");

    // A shard that is not there at all.
    std::fs::remove_file(&shard).unwrap();
    match Dataset::open(dir.path()) {
        Err(DatasetError::Io { path, .. }) => assert!(path.ends_with(SHARD)),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("opened without a shard"),
    }
}

/// One way to make meta.json disagree with itself or the shards, and what the error must name.
struct Tamper {
    edit: fn(&mut serde_json::Value),
    needles: &'static [&'static str],
}

/// Adds `delta` to a JSON number, keeping integers integers.
fn add(v: &mut serde_json::Value, delta: f64) {
    *v = match v.as_u64() {
        Some(n) => serde_json::json!(n + delta as u64),
        None => serde_json::json!(v.as_f64().unwrap() + delta),
    };
}

#[test]
fn every_tampered_meta_field_is_named() {
    let (dir, _) = make_dataset();
    let meta_path = dir.path().join("meta.json");
    let original = std::fs::read(&meta_path).unwrap();
    let cases = [
        Tamper { edit: |m| add(&mut m["num_frames"], 1.0), needles: &["num_frames"] },
        Tamper { edit: |m| add(&mut m["num_episodes"], 1.0), needles: &["num_episodes"] },
        // The return disagrees with the shard's rewards (and, in consequence, with the score and mean).
        Tamper {
            edit: |m| add(&mut m["episodes"][0]["return"], 1.0),
            needles: &["episodes[0].return", "rewards of episode_000000.safetensors"],
        },
        Tamper {
            edit: |m| m["episodes"][1]["success"] = serde_json::json!(!m["episodes"][1]["success"].as_bool().unwrap()),
            needles: &["episodes[1].success", "next.success of episode_000001.safetensors"],
        },
        Tamper {
            edit: |m| add(&mut m["episodes"][0]["normalized_score"], 5.0),
            needles: &["episodes[0].normalized_score"],
        },
        Tamper { edit: |m| add(&mut m["mean_return"], 1.0), needles: &["mean_return"] },
        Tamper { edit: |m| add(&mut m["mean_normalized_score"], 1.0), needles: &["mean_normalized_score"] },
        Tamper { edit: |m| add(&mut m["success_rate"], 0.5), needles: &["success_rate"] },
        Tamper { edit: |m| add(&mut m["episodes"][1]["seed"], 7.0), needles: &["episodes[1].seed"] },
        Tamper { edit: |m| m["episodes"][1]["policy"] = serde_json::json!("expert"), needles: &["episodes[1].policy"] },
        Tamper {
            edit: |m| m["episodes"][0]["file"] = serde_json::json!("episode_000009.safetensors"),
            needles: &["episodes[0].file"],
        },
        Tamper { edit: |m| m["keys"]["action"]["shape"] = serde_json::json!([9]), needles: &["keys", "\"action\""] },
        Tamper { edit: |m| m["format"] = serde_json::json!("worldgrad-bimanual-pucks/v9"), needles: &["format", "v9"] },
        Tamper {
            edit: |m| {
                m["stats"].as_object_mut().unwrap().remove("action");
            },
            needles: &["stats", "\"action\""],
        },
        Tamper {
            edit: |m| {
                m["stats"]["observation.state"]["mean"].as_array_mut().unwrap().pop();
            },
            needles: &["stats[\"observation.state\"].mean"],
        },
        Tamper { edit: |m| m["state_dim"] = serde_json::json!(25), needles: &["state_dim"] },
        Tamper { edit: |m| m["image_height"] = serde_json::json!(32), needles: &["image_height"] },
        Tamper { edit: |m| m["env"]["max_steps"] = serde_json::json!(0), needles: &["env", "max_steps"] },
        Tamper {
            edit: |m| m["reference_returns"]["expert"] = m["reference_returns"]["random"].clone(),
            needles: &["reference_returns"],
        },
    ];
    for case in &cases {
        let mut meta: serde_json::Value = serde_json::from_slice(&original).unwrap();
        (case.edit)(&mut meta);
        std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
        let err = open_error(dir.path());
        assert!(err.contains("meta.json"), "{err}");
        for needle in case.needles {
            assert!(err.contains(needle), "the message does not name {needle:?}:\n{err}");
        }
    }
    // Several problems at once are all listed.
    let mut meta: serde_json::Value = serde_json::from_slice(&original).unwrap();
    add(&mut meta["num_frames"], 1.0);
    add(&mut meta["mean_return"], 1.0);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains("num_frames") && err.contains("mean_return"), "{err}");
    // Restored, it opens again.
    std::fs::write(&meta_path, &original).unwrap();
    assert_eq!(Dataset::open(dir.path()).unwrap().num_episodes(), 2);
}

#[test]
fn a_success_flag_before_the_last_frame_is_refused() {
    let (dir, shard) = make_dataset();
    let mut bytes = std::fs::read(&shard).unwrap();
    let (n, text) = header(&bytes);
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    let start = parsed["next.success"]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[8 + n + start] = 1;
    std::fs::write(&shard, &bytes).unwrap();
    let err = open_error(dir.path());
    assert!(err.contains(SHARD) && err.contains("next.success"), "{err}");
}
