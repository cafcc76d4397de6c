//! The held-out metrics of a run on imported data, recomputed from its outputs alone: the
//! exported policy file (loaded by `ExportedPolicy`, its own code path) acting on the held-out
//! episode read from the converted dataset's shards, against the recorded actions z-scored with
//! the statistics stored in that file. `final_eval.json` must agree.

#[path = "../../tests/support/probe.rs"]
mod probe;

use std::path::Path;

use candle_core::{Device, Tensor};
use rl::dataset::Dataset;
use rl::policy::ExportedPolicy;
use rl::trainer::{cameras_to_chw, Actor};

const TRAIN: &str = env!("CARGO_BIN_EXE_train");

#[test]
fn held_out_action_errors_match_the_exported_policy_on_the_held_out_episode() {
    let tmp = tempfile::tempdir().unwrap();
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hdf5/robomimic_gzip.hdf5");
    let root = tmp.path().to_str().unwrap();
    let args = [
        "--dataset",
        file.to_str().unwrap(),
        "--encoder",
        "conv",
        "--runs-dir",
        root,
        "--converted-dir",
        "converted",
        "--name",
        "run",
        "--iterations",
        "6",
        "--batch-size",
        "8",
        "--eval-every",
        "6",
        "--checkpoint-every",
        "6",
        "--held-out-episodes",
        "1",
    ];
    probe::assert_ok(&probe::run(TRAIN, &args, tmp.path()));
    let run = tmp.path().join("run");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("final_eval.json")).unwrap()).unwrap();
    let reported = &summary["offline_eval"];

    let policy = ExportedPolicy::load(&run.join("policy.safetensors"), &Device::Cpu).unwrap();
    let converted = std::fs::read_dir(tmp.path().join("converted")).unwrap().flatten().next().unwrap().path();
    let dataset = Dataset::open(&converted).unwrap();
    let held_out = dataset.episode(dataset.num_episodes() - 1).unwrap();
    let norm = policy.normalization();
    let (h, w) = policy.header.image_hw;
    let cameras = dataset.meta().cameras.len();
    let t = held_out.len();
    let (mut states, mut images) = (Vec::new(), vec![0f32; t * 3 * cameras * h * w]);
    for k in 0..t {
        states.extend(norm.state(held_out.state(k)));
        let frame = 3 * cameras * h * w;
        cameras_to_chw(&held_out.images(k), h, w, &mut images[k * frame..(k + 1) * frame]);
    }
    let state = Tensor::from_vec(states, (t, policy.header.state_dim), &Device::Cpu).unwrap();
    let images = Tensor::from_vec(images, (t, 3 * cameras, h, w), &Device::Cpu).unwrap();
    let predicted: Vec<Vec<f32>> = policy.act_batch(Some(&images), &state).unwrap().to_vec2().unwrap();
    let a_dim = policy.header.action_dim;
    let (mut policy_sq, mut mean_sq) = (0f64, 0f64);
    for (k, p) in predicted.iter().enumerate() {
        let recorded = held_out.action(k).iter().zip(&norm.action_mean).zip(&norm.action_std);
        for (predicted, ((a, mean), std)) in p.iter().zip(recorded) {
            let z = ((a - mean) / std) as f64;
            policy_sq += (*predicted as f64 - z).powi(2);
            mean_sq += z * z;
        }
    }
    let n = (t * a_dim) as f64;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1.0);
    assert_eq!(reported["transitions"].as_u64().unwrap() as usize, t);
    let (action_mse, mean_action_mse) =
        (reported["action_mse"].as_f64().unwrap(), reported["mean_action_mse"].as_f64().unwrap());
    assert!(close(action_mse, policy_sq / n), "action_mse {action_mse} vs {}", policy_sq / n);
    assert!(close(mean_action_mse, mean_sq / n), "mean_action_mse {mean_action_mse} vs {}", mean_sq / n);
    // Not a degenerate check: the policy and the mean predictor differ.
    assert!((action_mse - mean_action_mse).abs() > 1e-6);
}
