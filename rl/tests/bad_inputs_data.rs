//! Bad inputs to the data side of `rl` — datasets, exported policies and the collect, eval,
//! diagnose and ablation binaries — are refused cleanly: exit status 1 (never a panic), a
//! message naming the flag, field or file, before any work, and every file that was there
//! before is byte-identical after.

#[path = "../../tests/support/policies.rs"]
mod policies;
#[path = "../../tests/support/probe.rs"]
mod probe;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rl::dataset::{collect_dataset, CollectConfig, Dataset, Tier};
use rl::encoders::EncoderKind;
use rl::env::{EnvConfig, STATE_DIM};
use rl::policy::{ExportedPolicy, METADATA_KEY};

const COLLECT: &str = env!("CARGO_BIN_EXE_collect");
const EVAL: &str = env!("CARGO_BIN_EXE_eval");
const DIAGNOSE: &str = env!("CARGO_BIN_EXE_diagnose");
const ABLATION: &str = env!("CARGO_BIN_EXE_ablation");

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// A tiny dataset written through the library (random tier: no episode succeeds in 10 steps).
fn tiny_dataset(dir: &Path, episodes: usize, size: usize) {
    let config = CollectConfig {
        tier: Tier::Random,
        episodes,
        seed: 5,
        env: EnvConfig { image_height: size, image_width: size, max_steps: 10, render: true, supersample: 1 },
        threads: 1,
    };
    collect_dataset(&config, dir, &|| {}).unwrap();
}

/// The collect binary's arguments for a tiny dataset.
fn collect_args<'a>(out: &'a str, episodes: &'a str, size: &'a str) -> Vec<&'a str> {
    vec![
        "--out",
        out,
        "--tier",
        "random",
        "--episodes",
        episodes,
        "--image-size",
        size,
        "--max-steps",
        "10",
        "--threads",
        "1",
    ]
}

/// Names of a directory's entries, sorted, without the lock file.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != shared::outputs::LOCK_FILE)
        .collect();
    names.sort();
    names
}

#[test]
fn collect_over_a_dataset_is_refused_and_overwrite_replaces_it_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    probe::assert_ok(&probe::run(COLLECT, &collect_args(s(&out), "3", "16"), tmp.path()));
    assert_eq!(Dataset::open(&out).unwrap().num_episodes(), 3);

    // A smaller dataset of another image size over it: refused, nothing touched.
    let before = probe::snapshot(tmp.path());
    let refused = probe::run(COLLECT, &collect_args(s(&out), "2", "24"), tmp.path());
    probe::assert_refused(&refused, &["--out", s(&out), "already holds a dataset", "--overwrite"]);
    probe::assert_unchanged(&before, tmp.path());

    // With --overwrite the old dataset goes whole: no stale third shard of the 16 px dataset.
    let mut args = collect_args(s(&out), "2", "24");
    args.push("--overwrite");
    probe::assert_ok(&probe::run(COLLECT, &args, tmp.path()));
    assert_eq!(names(&out), ["episode_000000.safetensors", "episode_000001.safetensors", "meta.json"]);
    let dataset = Dataset::open(&out).unwrap();
    assert_eq!((dataset.num_episodes(), dataset.meta().image_height), (2, 24));
}

#[test]
fn collect_into_an_incomplete_dataset_is_refused_and_open_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    tiny_dataset(&full, 1, 16);
    // What a killed collection leaves: shards, no meta.json.
    let partial = tmp.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::copy(full.join("episode_000000.safetensors"), partial.join("episode_000000.safetensors")).unwrap();

    let before = probe::snapshot(tmp.path());
    let refused = probe::run(COLLECT, &collect_args(s(&partial), "2", "16"), tmp.path());
    probe::assert_refused(&refused, &["--out", "incomplete dataset", "episode_000000.safetensors", "--overwrite"]);
    probe::assert_unchanged(&before, tmp.path());

    let err = Dataset::open(&partial).err().expect("an incomplete dataset opened").to_string();
    assert!(err.contains("no meta.json: an incomplete dataset (interrupted collection?)"), "{err}");
    assert!(err.contains(s(&partial)), "{err}");
    let err = Dataset::open(tmp.path().join("absent")).err().expect("an absent dataset opened").to_string();
    assert!(err.contains("absent") && err.contains("no dataset"), "{err}");
    // A directory of something else is not called an interrupted collection, and the message
    // does not suggest replacing it.
    let elsewhere = tempfile::tempdir().unwrap();
    let other = elsewhere.path().join("weights");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("README.md"), b"not a dataset").unwrap();
    let err = Dataset::open(&other).err().expect("a directory of something else opened").to_string();
    assert!(err.contains("not a dataset") && err.contains("README.md"), "{err}");
    assert!(!err.contains("--overwrite") && !err.contains("interrupted"), "{err}");

    // The library refuses too (train.rs collects through it).
    let config = CollectConfig { episodes: 1, threads: 1, ..CollectConfig::default() };
    let err = collect_dataset(&config, &partial, &|| {}).expect_err("collected over an incomplete dataset");
    assert!(err.to_string().contains("incomplete dataset"), "{err}");
    probe::assert_unchanged(&before, tmp.path());
}

#[test]
fn collect_checks_arguments_and_outputs_before_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let o = s(&out);
    // Every bad count at once, each named by its flag.
    let refused = probe::run(
        COLLECT,
        &[
            "--out",
            o,
            "--episodes",
            "0",
            "--image-size",
            "100000",
            "--supersample",
            "0",
            "--max-steps",
            "0",
            "--threads",
            "0",
        ],
        tmp.path(),
    );
    probe::assert_refused(&refused, &["--episodes", "--image-size", "--supersample", "--max-steps", "--threads"]);
    let refused = probe::run(COLLECT, &["--evaluate-references", "--seeds", "0"], tmp.path());
    probe::assert_refused(&refused, &["--seeds"]);
    let refused = probe::run(COLLECT, &["--out", o, "--height", "8", "--width", "2000"], tmp.path());
    probe::assert_refused(&refused, &["--height", "--width"]);
    assert!(!out.exists(), "a refused collection created its directory");

    // An absurd working set is refused by its size (where free memory is known).
    if shared::device::free_memory_bytes(&Device::Cpu).is_some() {
        let refused = probe::run(
            COLLECT,
            &["--out", o, "--image-size", "1024", "--max-steps", "1000000000000", "--threads", "1"],
            tmp.path(),
        );
        probe::assert_refused(&refused, &["--max-steps", "GiB free"]);
        assert!(!out.exists());
        // Each episode's summary stays in memory until meta.json: 10^12 episodes (an allocation
        // abort before) are refused by their count.
        let refused =
            probe::run(COLLECT, &["--out", o, "--episodes", "1000000000000", "--image-size", "16"], tmp.path());
        probe::assert_refused(&refused, &["--episodes 1000000000000", "GiB free"]);
        assert!(!out.exists());
        // The library refuses it too, before allocating.
        let claimed =
            shared::outputs::claim_dir(&tmp.path().join("lib"), "dir", shared::outputs::Existing::Refuse).unwrap();
        let config = CollectConfig { episodes: 1_000_000_000_000, threads: 1, ..CollectConfig::default() };
        let err = rl::dataset::writer::collect_dataset_into(&config, &claimed, &|| {}).expect_err("10^12 episodes");
        assert!(format!("{err:#}").contains("GiB free"), "{err:#}");
    }

    // --preview: a directory, or an existing file without --overwrite.
    let before = probe::snapshot(tmp.path());
    let refused = probe::run(COLLECT, &["--preview", s(tmp.path())], tmp.path());
    probe::assert_refused(&refused, &["--preview", "directory"]);
    let png = tmp.path().join("preview.png");
    std::fs::write(&png, b"old").unwrap();
    let before = {
        let mut b = before;
        b.insert(PathBuf::from("preview.png"), b"old".to_vec());
        b
    };
    let refused = probe::run(COLLECT, &["--preview", s(&png), "--image-size", "16", "--max-steps", "3"], tmp.path());
    probe::assert_refused(&refused, &["--preview", "--overwrite"]);
    probe::assert_unchanged(&before, tmp.path());
}

#[test]
fn datasets_mixing_shards_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (small, large) = (tmp.path().join("small"), tmp.path().join("large"));
    tiny_dataset(&small, 3, 16);
    tiny_dataset(&large, 2, 24);
    let pristine = std::fs::read(large.join("episode_000001.safetensors")).unwrap();

    // A shard of another dataset beside the listed ones (what collecting a smaller dataset over
    // a larger one used to leave).
    std::fs::copy(small.join("episode_000002.safetensors"), large.join("episode_000002.safetensors")).unwrap();
    let err = Dataset::open(&large).err().expect("a mixed dataset opened").to_string();
    assert!(err.contains("episode_000002.safetensors") && err.contains("not listed in meta.json"), "{err}");
    std::fs::remove_file(large.join("episode_000002.safetensors")).unwrap();

    // A listed shard of the other image size.
    std::fs::copy(small.join("episode_000001.safetensors"), large.join("episode_000001.safetensors")).unwrap();
    let err = Dataset::open(&large).err().expect("a dataset of two image sizes opened").to_string();
    assert!(err.contains("episode_000001.safetensors") && err.contains("shape"), "{err}");
    std::fs::write(large.join("episode_000001.safetensors"), pristine).unwrap();
    assert_eq!(Dataset::open(&large).unwrap().num_episodes(), 2);
}

/// An untrained policy as `train` exports it: state-only, or a conv encoder on 16 px images.
fn export_policy(path: &Path, encoder: EncoderKind) {
    policies::export_untrained(path, encoder, (16, 16)).unwrap();
}

/// Copies a policy file with its tensors and header edited.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>, &mut serde_json::Value)) {
    let bytes = std::fs::read(src).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut header: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()[METADATA_KEY]).unwrap();
    let mut tensors: Vec<(String, Tensor)> =
        candle_core::safetensors::load(src, &Device::Cpu).unwrap().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors, &mut header);
    let metadata = std::collections::HashMap::from([(METADATA_KEY.to_string(), header.to_string())]);
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata), dst).unwrap();
}

#[test]
fn eval_refuses_bad_policy_files_before_evaluating() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.safetensors");
    export_policy(&good, EncoderKind::None);
    ExportedPolicy::load(&good, &Device::Cpu).unwrap();
    // The policy the repository ships loads under the same checks.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../weights/policy.safetensors");
    assert!(ExportedPolicy::load(&shipped, &Device::Cpu).unwrap().header.encoder.uses_images());

    let nan = |t: &Tensor| t.affine(0.0, f64::NAN).unwrap();
    type Edit = Box<dyn FnOnce(&mut Vec<(String, Tensor)>, &mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "all_nan.safetensors",
            Box::new(move |ts, _| ts.iter_mut().for_each(|(_, t)| *t = nan(t))),
            vec!["NaN/Inf", "'decoder.l0.weight'"],
        ),
        (
            "unexpected_key.safetensors",
            Box::new(|ts, _| ts.push(("actor.extra".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()))),
            vec!["unexpected 'actor.extra'"],
        ),
        (
            "missing_key.safetensors",
            Box::new(|ts, _| ts.retain(|(n, _)| n != "decoder.l0.weight")),
            vec!["missing 'decoder.l0.weight'"],
        ),
        (
            "f16.safetensors",
            Box::new(|ts, _| ts.iter_mut().for_each(|(_, t)| *t = t.to_dtype(DType::F16).unwrap())),
            vec!["stored as F16"],
        ),
        (
            "version.safetensors",
            Box::new(|_, h| h["format"] = serde_json::json!("worldgrad-lapo-policy/v9")),
            vec!["worldgrad-lapo-policy/v9", "worldgrad-lapo-policy/v1"],
        ),
        (
            "negative_max.safetensors",
            Box::new(|_, h| h["max_latent_action"] = serde_json::json!(-0.5)),
            vec!["max_latent_action is -0.5"],
        ),
        (
            "zero_dims.safetensors",
            Box::new(|_, h| {
                h["latent_dim"] = serde_json::json!(0);
                h["supersample"] = serde_json::json!(0);
            }),
            vec!["latent_dim is 0", "supersample is 0"],
        ),
        (
            "zero_std.safetensors",
            Box::new(|ts, _| {
                for (n, t) in ts.iter_mut() {
                    if n == "normalization.action_std" {
                        *t = t.zeros_like().unwrap();
                    }
                }
            }),
            vec!["normalization.action_std"],
        ),
        (
            "wrong_shape.safetensors",
            Box::new(|ts, _| {
                for (n, t) in ts.iter_mut() {
                    if n == "normalization.state_mean" {
                        *t = Tensor::zeros(STATE_DIM, DType::F32, &Device::Cpu).unwrap();
                    }
                }
            }),
            vec!["'normalization.state_mean': shape [24]"],
        ),
    ];
    let gif = tmp.path().join("episode_out.gif");
    for (name, edit, needles) in cases {
        let path = tmp.path().join(name);
        rewrite(&good, &path, edit);
        let before = probe::snapshot(tmp.path());
        let out = probe::run(EVAL, &["--checkpoint", s(&path), "--episodes", "1", "--gif", s(&gif)], tmp.path());
        let mut all = vec![name, "--checkpoint"];
        all.extend(&needles);
        probe::assert_refused(&out, &all);
        assert!(out.stdout.is_empty(), "{name}: evaluated before refusing");
        probe::assert_unchanged(&before, tmp.path());
    }
}

#[test]
fn eval_checks_arguments_and_the_gif_path_before_evaluating() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let policy = run_dir.join("policy.safetensors");
    export_policy(&policy, EncoderKind::None);
    let p = s(&run_dir);
    let before = probe::snapshot(tmp.path());

    let out = probe::run(EVAL, &["--checkpoint", p, "--episodes", "0"], tmp.path());
    probe::assert_refused(&out, &["--episodes must be at least 1"]);
    let out = probe::run(EVAL, &["--checkpoint", p, "--episodes", "1", "--behaviour", "medium"], tmp.path());
    probe::assert_refused(&out, &["--behaviour", "--episodes"]);
    let out = probe::run(EVAL, &["--checkpoint", p, "--seed", &u64::MAX.to_string()], tmp.path());
    probe::assert_refused(&out, &["--seed"]);
    // A directory as the GIF: refused before the evaluation (which prints its result first).
    let out = probe::run(EVAL, &["--checkpoint", p, "--episodes", "1", "--gif", s(tmp.path())], tmp.path());
    probe::assert_refused(&out, &["--gif", "directory"]);
    assert!(out.stdout.is_empty(), "evaluated before refusing the GIF path");
    // A directory without a policy.
    let out = probe::run(EVAL, &["--checkpoint", s(tmp.path())], tmp.path());
    probe::assert_refused(&out, &["--checkpoint", "without policy.safetensors"]);
    // A Hub reference that is not in the (empty) cache.
    let cache = tmp.path().join("empty-cache");
    let out = probe::run_env(
        EVAL,
        &["--checkpoint", "org/name:policy.safetensors", "--episodes", "1"],
        tmp.path(),
        &[("HF_HUB_CACHE", cache.as_path())],
    );
    probe::assert_refused(&out, &["--checkpoint", "org/name@main:policy.safetensors", "not in the Hugging Face cache"]);
    probe::assert_unchanged(&before, tmp.path());

    // The default GIF beside the policy exists: refused, saying how to proceed.
    std::fs::write(run_dir.join("episode.gif"), b"old").unwrap();
    let before = probe::snapshot(tmp.path());
    let out = probe::run(EVAL, &["--checkpoint", p, "--episodes", "1"], tmp.path());
    probe::assert_refused(&out, &["episode.gif", "--gif PATH or --overwrite"]);
    assert!(out.stdout.is_empty());
    probe::assert_unchanged(&before, tmp.path());
}

#[test]
fn eval_takes_a_hub_reference_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let file = probe::hub_cache_path(&cache, "org/name", "policy.safetensors");
    export_policy(&file, EncoderKind::Conv);
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let cached = probe::snapshot(&cache);

    let out = probe::run_env(
        EVAL,
        &["--checkpoint", "org/name:policy.safetensors", "--episodes", "1"],
        &work,
        &[("HF_HUB_CACHE", cache.as_path())],
    );
    probe::assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["normalized_score"].as_f64().is_some_and(f64::is_finite), "{report}");
    // The GIF goes to the working directory, never into the shared Hub cache.
    assert!(std::fs::metadata(work.join("episode.gif")).unwrap().len() > 0);
    probe::assert_unchanged(&cached, &cache);
}

#[test]
fn diagnose_and_ablation_check_their_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = tmp.path().join("ds");
    tiny_dataset(&dataset, 2, 16);
    let d = s(&dataset);
    let before = probe::snapshot(tmp.path());

    let out = probe::run(DIAGNOSE, &["--dataset", d, "--episodes", "0", "--batch-size", "0", "--lr=-1"], tmp.path());
    probe::assert_refused(&out, &["--episodes", "--batch-size", "--lr"]);
    let out = probe::run(DIAGNOSE, &["--dataset", d, "--checkpoint", s(&tmp.path().join("no-run"))], tmp.path());
    probe::assert_refused(&out, &["--checkpoint", "no-run"]);
    // A random 10-step dataset has no success to clone.
    let out = probe::run(DIAGNOSE, &["--dataset", d, "--success-only", "--episodes", "1"], tmp.path());
    probe::assert_refused(&out, &["--success-only", "no successful episode"]);
    std::fs::remove_file(dataset.join("meta.json")).unwrap();
    let out = probe::run(DIAGNOSE, &["--dataset", d], tmp.path());
    probe::assert_refused(&out, &["--dataset", "incomplete dataset"]);

    let runs = tmp.path().join("runs");
    std::fs::create_dir_all(runs.join("a")).unwrap();
    let report = tmp.path().join("report");
    std::fs::create_dir_all(&report).unwrap();
    std::fs::write(report.join("ablation.md"), b"old").unwrap();
    let before = {
        let mut b: std::collections::BTreeMap<PathBuf, Vec<u8>> =
            before.into_iter().filter(|(p, _)| !p.ends_with("meta.json")).collect();
        b.insert(PathBuf::from("report/ablation.md"), b"old".to_vec());
        b
    };
    let run_a = runs.join("a");
    let a = s(&run_a);
    let out = probe::run(ABLATION, &[a, "--window", "0", "--threshold", "NaN"], tmp.path());
    probe::assert_refused(&out, &["--window", "--threshold"]);
    let out = probe::run(ABLATION, &[a, s(&runs.join("missing"))], tmp.path());
    probe::assert_refused(&out, &["missing", "not a directory"]);
    let out = probe::run(ABLATION, &[a, "--out", s(&report)], tmp.path());
    probe::assert_refused(&out, &["--out", "ablation.md", "--overwrite"]);
    probe::assert_unchanged(&before, tmp.path());
}
