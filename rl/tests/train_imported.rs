//! `train --dataset FILE` on other ecosystems' data, from the command line: the robomimic and
//! Minari HDF5 fixtures are recognised from their content, converted once into our shards
//! (reused by the next run), trained on with images and joint state (the gradient-flow audit
//! passing), evaluated on held-out episodes and exported; the converted shards hold exactly the
//! fixture's values (expected values written by the fixture script with h5py, read here with
//! our npz reader, never with the importer under test); bad combinations are refused by name.

#[path = "support/expected.rs"]
mod expected;
#[path = "../../tests/support/probe.rs"]
mod probe;

use std::path::{Path, PathBuf};

use probe::{assert_ok, assert_refused, run, run_env, stderr};
use rl::dataset::convert::{write_converted, ConvertOptions};
use rl::dataset::Dataset;
use rl::policy::ExportedPolicy;

const TRAIN: &str = env!("CARGO_BIN_EXE_train");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hdf5").join(name)
}

fn lerobot(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lerobot").join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("paths are UTF-8")
}

/// A few iterations of multimodal LAPO with every evaluation, audit and checkpoint exercised.
fn short_run<'a>(dataset: &'a str, tmp: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--dataset",
        dataset,
        "--runs-dir",
        tmp,
        "--converted-dir",
        "converted",
        "--iterations",
        "4",
        "--batch-size",
        "8",
        "--eval-every",
        "2",
        "--audit-every",
        "2",
        "--checkpoint-every",
        "4",
        "--log-every",
        "1",
    ];
    args.extend_from_slice(extra);
    args
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The run finished with held-out metrics, every audit passed, and the policy loads with the
/// data's cameras.
fn check_run(run: &Path, cameras: &[&str], state_dim: usize, action_dim: usize) {
    let summary = read_json(&run.join("final_eval.json"));
    assert!(summary.get("eval").is_none(), "no environment score for imported data: {summary}");
    let offline = &summary["offline_eval"];
    for key in ["action_mse", "mean_action_mse", "q_mean", "v_mean", "td_mse", "vae_reconstruction_mse"] {
        let v = offline[key].as_f64().unwrap_or_else(|| panic!("offline_eval.{key} missing: {summary}"));
        assert!(v.is_finite(), "offline_eval.{key} = {v}");
    }
    assert!(offline["transitions"].as_u64().unwrap() > 0);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let audits: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("audit").is_some())
        .collect();
    assert_eq!(audits.len(), 2, "audits at iterations 0 and 2");
    for audit in &audits {
        let text = audit["audit"].to_string();
        assert!(text.contains("\"passed\":true") && !text.contains("\"passed\":false"), "audit failed: {text}");
    }
    assert!(run.join("learning_curve.png").is_file());
    let policy = ExportedPolicy::load(&run.join("policy.safetensors"), &candle_core::Device::Cpu).unwrap();
    let header = &policy.header;
    assert_eq!(header.cameras, cameras);
    assert_eq!((header.state_dim, header.action_dim), (state_dim, action_dim));
    // Trained on data from elsewhere: nothing may run it in our environment.
    let refused = header.check_environment().unwrap_err().to_string();
    assert!(refused.contains("imported dataset"), "{refused}");
}

#[test]
fn robomimic_trains_with_both_cameras_and_reuses_its_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    let file = fixture("robomimic_gzip.hdf5");
    let keys = ["--encoder", "conv", "--state-keys", "robot0_eef_pos,robot0_gripper_qpos", "--name", "a"];
    let out = run(TRAIN, &short_run(s(&file), s(tmp.path()), &keys), tmp.path());
    assert_ok(&out);
    check_run(&tmp.path().join("a"), &["agentview_image", "robot0_eye_in_hand_image"], 5, 7);
    let converted: Vec<_> = std::fs::read_dir(tmp.path().join("converted")).unwrap().flatten().collect();
    assert_eq!(converted.len(), 1, "one conversion, no temporary directory left");
    let meta = Dataset::read_meta(converted[0].path()).unwrap();
    let source = meta.source.as_ref().unwrap();
    assert_eq!(source.format, "robomimic");
    assert_eq!(source.state_keys, ["robot0_eef_pos", "robot0_gripper_qpos"]);
    assert_eq!((meta.image_height, meta.image_width), (16, 16), "resized to --image-size");

    // The same source and selection again: the conversion is reused, not redone.
    let keys = ["--encoder", "conv", "--state-keys", "robot0_eef_pos,robot0_gripper_qpos", "--name", "b"];
    let out = run(TRAIN, &short_run(s(&file), s(tmp.path()), &keys), tmp.path());
    assert_ok(&out);
    assert!(stderr(&out).contains("converted from"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(tmp.path().join("converted")).unwrap().count(), 1);

    // The same demos stored contiguously (no chunks, no compression).
    let file = fixture("robomimic_contiguous.hdf5");
    let args = short_run(s(&file), s(tmp.path()), &["--encoder", "conv", "--name", "contiguous"]);
    assert_ok(&run(TRAIN, &args, tmp.path()));
    check_run(&tmp.path().join("contiguous"), &["agentview_image", "robot0_eye_in_hand_image"], 11, 7);
}

#[test]
fn minari_trains_multimodal_and_state_only() {
    let tmp = tempfile::tempdir().unwrap();
    let file = fixture("minari.hdf5");
    let args = short_run(s(&file), s(tmp.path()), &["--encoder", "conv", "--name", "images"]);
    assert_ok(&run(TRAIN, &args, tmp.path()));
    // Minari's Dict observation: the low-dim keys `achieved_goal` (2) and `observation` (4).
    check_run(&tmp.path().join("images"), &["front", "wrist"], 6, 2);
    let file = fixture("minari_box.hdf5");
    let args =
        short_run(s(&file), s(tmp.path()), &["--encoder", "none", "--name", "state", "--held-out-episodes", "1"]);
    assert_ok(&run(TRAIN, &args, tmp.path()));
    let summary = read_json(&tmp.path().join("state").join("final_eval.json"));
    assert_eq!(summary["offline_eval"]["episodes"], 1);
}

/// Every image, state, action and reward of the converted robomimic fixture (at its own 8 px:
/// copied, not resized) equals what h5py read, the final observation is `next_obs`' last row,
/// and the terminal is the last `dones` flag.
#[test]
fn converted_shards_hold_the_sources_values() {
    let tmp = tempfile::tempdir().unwrap();
    let file = fixture("robomimic_contiguous.hdf5");
    let options = ConvertOptions {
        state_keys: Some(vec!["robot0_eef_pos".into(), "object".into()]),
        image_size: 8,
        ..Default::default()
    };
    let imported = rl::dataset::hdf5::read(
        &file,
        &rl::dataset::hdf5::HdfSelection { state_keys: options.state_keys.clone(), ..Default::default() },
    )
    .unwrap();
    write_converted(&imported, s(&file), "test", &options, tmp.path()).unwrap();
    let expected = expected::npz(&fixture("robomimic.npz"));
    let get = |key: &str| expected::array(&expected, key);
    let floats = |a: &rl::dataset::npz::NpyArray| a.data.to_f32();
    let bytes = |key: &str| expected::bytes(&expected, key);
    let dataset = Dataset::open(tmp.path()).unwrap();
    let meta = dataset.meta();
    assert_eq!(meta.cameras, ["agentview_image", "robot0_eye_in_hand_image"]);
    // robomimic's loader order: by demo number.
    let names: Vec<_> = meta.episodes.iter().map(|e| e.source_name.clone().unwrap()).collect();
    assert_eq!(names, ["demo_0", "demo_2", "demo_10"]);
    for episode in dataset.episodes() {
        let demo = episode.meta().source_name.clone().unwrap();
        let t = episode.len();
        let eef = floats(get(&format!("{demo}.obs.robot0_eef_pos")));
        let object = floats(get(&format!("{demo}.obs.object")));
        for k in 0..t {
            let mut state = eef[k * 3..(k + 1) * 3].to_vec();
            state.extend(&object[k * 5..(k + 1) * 5]);
            assert_eq!(episode.state(k), state.as_slice(), "{demo} state {k}");
        }
        let next_eef = floats(get(&format!("{demo}.next_obs.robot0_eef_pos")));
        let next_object = floats(get(&format!("{demo}.next_obs.object")));
        let mut last = next_eef[(t - 1) * 3..].to_vec();
        last.extend(&next_object[(t - 1) * 5..]);
        assert_eq!(episode.state(t), last.as_slice(), "{demo} final state");
        assert_eq!(episode.actions(), floats(get(&format!("{demo}.actions"))).as_slice(), "{demo} actions");
        assert_eq!(episode.rewards(), floats(get(&format!("{demo}.rewards"))).as_slice(), "{demo} rewards");
        for (c, camera) in meta.cameras.iter().enumerate() {
            let frames = bytes(&format!("{demo}.obs.{camera}"));
            for k in 0..t {
                assert_eq!(episode.image(c, k), &frames[k * 192..(k + 1) * 192], "{demo} {camera} frame {k}");
            }
            let next = bytes(&format!("{demo}.next_obs.{camera}"));
            assert_eq!(episode.image(c, t), &next[(t - 1) * 192..], "{demo} {camera} final frame");
        }
        let dones = floats(get(&format!("{demo}.dones")));
        assert_eq!(episode.meta().success, dones[t - 1] != 0.0, "{demo} terminal");
        assert_eq!(episode.success(t - 1), dones[t - 1] != 0.0);
    }
}

#[test]
fn bad_combinations_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let robomimic = fixture("robomimic_gzip.hdf5");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        // A camera that is not there: the file and the camera are named.
        (vec!["--encoder", "conv", "--cameras", "sideview"], vec!["sideview", "robomimic_gzip.hdf5"]),
        // Rewards are recorded: a rule would replace them silently.
        (vec!["--reward", "sparse-end"], vec!["--reward", "records its rewards"]),
        // No privileged state in imported data.
        (vec!["--encoder", "conv", "--aux-state-weight", "0.5"], vec!["--aux-state-weight", "imported"]),
        (vec!["--held-out-episodes", "3"], vec!["--held-out-episodes 3", "3 episodes"]),
    ];
    for (extra, needles) in cases {
        let mut args = vec!["--dataset", s(&robomimic), "--runs-dir", s(tmp.path()), "--converted-dir", "converted"];
        args.extend(extra.iter());
        assert_refused(&run(TRAIN, &args, tmp.path()), &needles);
    }
    // A state-only source with an image encoder.
    let minari_box = fixture("minari_box.hdf5");
    let mut args = vec!["--dataset", s(&minari_box), "--encoder", "conv"];
    args.extend(["--runs-dir", s(tmp.path()), "--converted-dir", "converted"]);
    assert_refused(&run(TRAIN, &args, tmp.path()), &["--encoder", "no cameras"]);
    // Conversion flags on our own dataset directory.
    let ours = tmp.path().join("ours");
    let args = ["--dataset", s(&ours), "--cameras", "global", "--runs-dir", s(tmp.path())];
    assert_refused(&run(TRAIN, &args, tmp.path()), &["--cameras", "imported"]);
    // A file of no known format.
    let junk = tmp.path().join("junk.bin");
    std::fs::write(&junk, b"not a dataset").unwrap();
    let args = ["--dataset", s(&junk), "--runs-dir", s(tmp.path())];
    assert_refused(&run(TRAIN, &args, tmp.path()), &["junk.bin", "not a dataset"]);
}

/// LeRobot v2.1 with recorded rewards trains from the command line; a `--reward` rule on it is
/// refused (it would replace recorded rewards silently).
#[test]
fn lerobot_v21_trains_on_its_recorded_rewards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = lerobot("v21_images");
    let args = short_run(s(&dir), s(tmp.path()), &["--encoder", "conv", "--name", "v21"]);
    assert_ok(&run(TRAIN, &args, tmp.path()));
    // observation.state (4) and observation.environment_state (3), in that order.
    check_run(&tmp.path().join("v21"), &["image"], 7, 2);
    let args = short_run(s(&dir), s(tmp.path()), &["--reward", "sparse-end", "--name", "rule"]);
    assert_refused(&run(TRAIN, &args, tmp.path()), &["--reward", "next.reward"]);
}

/// LeRobot v3.0 without rewards: refused until a rule is chosen, then trained with it (two
/// cameras, one of them 6×8, resized to the square `--image-size`), and the rule is recorded.
/// The same dataset from a Hub cache (`hf://datasets/org/name`) trains offline.
#[test]
fn lerobot_v30_without_rewards_needs_a_rule_and_resolves_from_the_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = lerobot("v30_images");
    let args = short_run(s(&dir), s(tmp.path()), &["--encoder", "conv", "--name", "none"]);
    assert_refused(&run(TRAIN, &args, tmp.path()), &["--reward", "sparse-end"]);
    let args = short_run(s(&dir), s(tmp.path()), &["--encoder", "conv", "--reward", "sparse-end", "--name", "end"]);
    assert_ok(&run(TRAIN, &args, tmp.path()));
    check_run(&tmp.path().join("end"), &["top", "wrist"], 3, 2);
    let config = read_json(&tmp.path().join("end").join("config.json"));
    assert_eq!(config["args"]["reward"], "sparse-end");

    // A Hugging Face cache as huggingface_hub lays it out, used offline.
    let cache = tmp.path().join("hf-cache");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("datasets--someone--so100_pick");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    copy_dir(&dir, &repo.join("snapshots").join(commit));
    let extra = ["--encoder", "conv", "--reward", "sparse-end", "--name", "hub"];
    let args = short_run("hf://datasets/someone/so100_pick", s(tmp.path()), &extra);
    let out = run_env(TRAIN, &args, tmp.path(), &[("HF_HUB_CACHE", &cache)]);
    assert_ok(&out);
    check_run(&tmp.path().join("hub"), &["top", "wrist"], 3, 2);
    let converted: Vec<String> = std::fs::read_dir(tmp.path().join("converted"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(converted.iter().any(|name| name.starts_with("so100_pick-")), "{converted:?}");
    let missing = short_run("hf://datasets/someone/absent", s(tmp.path()), &["--reward", "sparse-end"]);
    let out = run_env(TRAIN, &missing, tmp.path(), &[("HF_HUB_CACHE", &cache)]);
    assert_refused(&out, &["hf://datasets/someone/absent", "--repo-type dataset"]);
}

/// Video cameras (the `video` feature): AV1 (LeRobot v3.0, no rewards) and H.264 (v2.1, with
/// rewards) train from the command line. Without the feature, the video camera is refused by
/// name (the message says how to build with it).
#[test]
fn lerobot_video_cameras_train_with_the_video_feature() {
    let tmp = tempfile::tempdir().unwrap();
    let av1 = lerobot("v30_av1");
    let h264 = lerobot("v21_h264");
    let av1_run = short_run(s(&av1), s(tmp.path()), &["--encoder", "conv", "--reward", "sparse-end", "--name", "av1"]);
    let h264_run = short_run(s(&h264), s(tmp.path()), &["--encoder", "conv", "--name", "h264"]);
    if cfg!(feature = "video") {
        assert_ok(&run(TRAIN, &av1_run, tmp.path()));
        check_run(&tmp.path().join("av1"), &["cam"], 3, 2);
        assert_ok(&run(TRAIN, &h264_run, tmp.path()));
        check_run(&tmp.path().join("h264"), &["front"], 4, 3);
    } else {
        assert_refused(&run(TRAIN, &av1_run, tmp.path()), &["observation.images.cam", "rl/video"]);
        assert_refused(&run(TRAIN, &h264_run, tmp.path()), &["observation.images.front", "rl/video"]);
    }
}

/// A run on imported data resumes bit-exactly: 4 iterations, then `--resume` to 6, end where an
/// uninterrupted 6-iteration run ends (the same policy bytes and the same held-out metrics).
#[test]
fn an_imported_run_resumes_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let file = fixture("minari.hdf5");
    let run_with = |iterations: &str, name: &str, resume: bool| {
        let mut args = vec!["--dataset", s(&file), "--encoder", "conv", "--runs-dir", s(tmp.path())];
        args.extend(["--converted-dir", "converted", "--batch-size", "8", "--name", name]);
        args.extend(["--iterations", iterations, "--checkpoint-every", "2", "--eval-every", "2"]);
        if resume {
            args.push("--resume");
        }
        assert_ok(&run(TRAIN, &args, tmp.path()));
    };
    run_with("6", "whole", false);
    run_with("4", "parts", false);
    run_with("6", "parts", true);
    let read = |name: &str, file: &str| std::fs::read(tmp.path().join(name).join(file)).unwrap();
    assert_eq!(read("whole", "policy.safetensors"), read("parts", "policy.safetensors"));
    let offline = |name: &str| read_json(&tmp.path().join(name).join("final_eval.json"))["offline_eval"].clone();
    assert_eq!(offline("whole"), offline("parts"));
}
