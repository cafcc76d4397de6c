//! Bad input to `sampler` (stress test and analytic demo) and `train-world-model`: each probe
//! runs the binary and checks it refused cleanly — exit status 1, never a panic (101) or an
//! allocation abort (134) — with a message naming the flag, field or file, and that the files
//! that were there before are byte-identical afterwards. The runs that must succeed use tiny
//! settings (a tiny untrained world model, an untrained exported policy, one or two steps).

#[path = "../../tests/support/policies.rs"]
mod policies;
#[path = "../../tests/support/probe.rs"]
mod probe;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use probe::{assert_ok, assert_refused, assert_unchanged, run, run_env, snapshot};
use sampler::world_model::{WorldModel, WorldModelConfig};

const SAMPLER: &str = env!("CARGO_BIN_EXE_sampler");
const TRAIN: &str = env!("CARGO_BIN_EXE_train-world-model");

/// The analytic demo at its smallest: two steps, one iteration, no gradient check.
const TINY_DEMO: &[&str] = &["--demo", "--num-steps", "2", "--iterations", "1", "--no-verify-grad"];

/// `base` then `more`; a flag of `more` that `base` already gives replaces its value there.
fn args<'a>(base: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    let mut out = base.to_vec();
    let mut i = 0;
    while i < more.len() {
        let flag = more[i];
        let value = more.get(i + 1).filter(|v| flag.starts_with("--") && !v.starts_with("--"));
        match (value, out.iter().position(|a| *a == flag)) {
            (Some(v), Some(at)) if at + 1 < out.len() => out[at + 1] = v,
            (Some(v), _) => out.extend([flag, v]),
            (None, _) => out.push(flag),
        }
        i += if value.is_some() { 2 } else { 1 };
    }
    out
}

/// A tiny world model with fresh (untrained) weights: `world_model.{json,safetensors}` in `dir`.
fn write_world_model(dir: &Path, cfg: &WorldModelConfig) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let varmap = candle_nn::VarMap::new();
    WorldModel::new_trainable(cfg, &varmap, 0, &Device::Cpu)?;
    shared::weights::save_varmap_atomic(&varmap, &dir.join("world_model.safetensors"))?;
    shared::io::write_json_atomic(&dir.join("world_model.json"), cfg)?;
    Ok(())
}

/// An exported, untrained conv-encoder LAPO policy (an image policy the stress test accepts).
fn write_policy(path: &Path) -> Result<()> {
    policies::export_untrained(path, rl::encoders::EncoderKind::Conv, (32, 32))
}

#[test]
fn out_dir_is_refused_when_not_empty_and_replaced_whole_with_overwrite() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("report");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("stale.txt"), b"an earlier run")?;
    let before = snapshot(tmp.path());
    let o = out.to_str().unwrap_or_default();
    let refused = run(SAMPLER, &args(TINY_DEMO, &["-o", o]), tmp.path());
    assert_refused(&refused, &["-o", "not empty", "stale.txt", "--overwrite"]);
    assert_unchanged(&before, tmp.path());

    assert_ok(&run(SAMPLER, &args(TINY_DEMO, &["-o", o, "--overwrite"]), tmp.path()));
    assert!(!out.join("stale.txt").exists(), "--overwrite left the earlier run's file");
    assert!(out.join("report.json").is_file() && out.join("metrics.jsonl").is_file());

    // -o that is a file, or under a file: refused before any work.
    let file = tmp.path().join("a_file");
    std::fs::write(&file, b"x")?;
    let before = snapshot(tmp.path());
    let f = file.to_str().unwrap_or_default();
    assert_refused(&run(SAMPLER, &args(TINY_DEMO, &["-o", f]), tmp.path()), &["-o", "not a directory"]);
    let under = file.join("sub");
    let u = under.to_str().unwrap_or_default();
    assert_refused(&run(SAMPLER, &args(TINY_DEMO, &["-o", u]), tmp.path()), &["-o", "is a file"]);
    assert_unchanged(&before, tmp.path());
    Ok(())
}

#[test]
fn without_o_each_run_gets_a_new_numbered_directory() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    assert_ok(&run(SAMPLER, TINY_DEMO, tmp.path()));
    let first = std::fs::read(tmp.path().join("out/sampler/run-001/report.json"))?;
    assert_ok(&run(SAMPLER, TINY_DEMO, tmp.path()));
    // The first run's report is still there, untouched; the second went beside it.
    assert_eq!(std::fs::read(tmp.path().join("out/sampler/run-001/report.json"))?, first);
    assert!(tmp.path().join("out/sampler/run-002/report.json").is_file());
    // --overwrite has nothing to replace without -o: refused rather than ignored.
    let before = snapshot(tmp.path());
    assert_refused(&run(SAMPLER, &args(TINY_DEMO, &["--overwrite"]), tmp.path()), &["--overwrite", "-o"]);
    assert_unchanged(&before, tmp.path());
    Ok(())
}

/// Each bad value, in the demo (`--demo`) and in the stress test (the default job, on the
/// embedded weights): refused before anything is written.
#[test]
fn bad_numbers_are_refused_naming_the_flag() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    std::fs::write(tmp.path().join("keep.txt"), b"unrelated")?;
    let before = snapshot(tmp.path());
    let demo: &[&str] = &["--demo"];
    let stress: &[&str] = &[];
    let cases: &[(&[&str], &[&str], &[&str])] = &[
        (demo, &["--lr", "NaN"], &["--lr must be finite", "NaN"]),
        (demo, &["--lr", "inf"], &["--lr must be finite"]),
        (stress, &["--lr", "NaN"], &["--lr must be finite", "NaN"]),
        (demo, &["--lr", "-1"], &["command line (--lr): field `noise_lr`", "got -1"]),
        (stress, &["--lr", "-1"], &["--lr must be finite and > 0, got -1"]),
        (demo, &["--num-steps", "0"], &["--num-steps", "num_steps", "at least 1"]),
        (stress, &["--num-steps", "0"], &["--num-steps must be at least 1"]),
        (demo, &["--iterations", "0"], &["--iterations", "noise_steps", "at least 1"]),
        (stress, &["--iterations", "0"], &["--iterations must be at least 1"]),
        (stress, &["--seeds", "1,1"], &["--seeds repeats 1"]),
        (demo, &["--grad-clip", "NaN"], &["--grad-clip must be finite"]),
        (demo, &["--seeds", "1"], &["--seeds", "stress test"]),
        (demo, &["--policy", "p.safetensors"], &["--policy", "stress test"]),
    ];
    for (mode, extra, needles) in cases {
        let out = run(SAMPLER, &args(mode, extra), tmp.path());
        assert_refused(&out, needles);
        assert_unchanged(&before, tmp.path());
    }
    // A size that cannot fit: refused by the memory estimate, naming --num-steps (where the free
    // memory is known; elsewhere there is nothing to compare with).
    if shared::device::free_memory_bytes(&Device::Cpu).is_some() {
        for mode in [demo, stress] {
            let out = run(SAMPLER, &args(mode, &["--num-steps", "1000000000000"]), tmp.path());
            assert_refused(&out, &["--num-steps", "1000000000000", "GiB free"]);
            assert_unchanged(&before, tmp.path());
            // An iteration count whose history alone cannot fit (an allocation abort before).
            let out = run(SAMPLER, &args(mode, &["--iterations", "1000000000000"]), tmp.path());
            assert_refused(&out, &["--iterations", "1000000000000", "GiB free"]);
            assert_unchanged(&before, tmp.path());
        }
        let out = run(SAMPLER, &["--demo", "-i", "huge.json"], tmp.path());
        assert_refused(&out, &["huge.json"]);
        std::fs::write(tmp.path().join("huge.json"), br#"{"height": 4000000000, "width": 4000000000}"#)?;
        let before = snapshot(tmp.path());
        let out = run(SAMPLER, &["--demo", "-i", "huge.json"], tmp.path());
        assert_refused(&out, &["height", "width", "GiB free"]);
        assert_unchanged(&before, tmp.path());
    }
    Ok(())
}

#[test]
fn policy_hub_reference_resolves_from_the_cache_and_the_stress_test_runs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let wm = tmp.path().join("wm");
    write_world_model(&wm, &WorldModelConfig::tiny())?;
    let policy = tmp.path().join("policy.safetensors");
    write_policy(&policy)?;
    let cache = tmp.path().join("hub");
    let snap = probe::hub_cache_path(&cache, "org/name", "exported/policy.safetensors");
    std::fs::copy(&policy, &snap)?;
    let env = [("HF_HUB_CACHE", cache.as_path())];
    let w = wm.to_str().unwrap_or_default();
    let stress = ["--world-model", w, "--seeds", "0", "--iterations", "1", "--num-steps", "1"];

    let out = tmp.path().join("out");
    let o = out.to_str().unwrap_or_default();
    let ran = run_env(
        SAMPLER,
        &args(&stress, &["--policy", "org/name:exported/policy.safetensors", "-o", o]),
        tmp.path(),
        &env,
    );
    assert_ok(&ran);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json"))?)?;
    assert_eq!(report["policy"].as_str(), Some(snap.to_string_lossy().as_ref()), "the Hub file was not the one used");
    assert_eq!(report["denoiser_is_analytic"], false);

    // A reference the cache does not hold, and a local path that does not exist: named, and
    // nothing written.
    let before = snapshot(tmp.path());
    let missing =
        run_env(SAMPLER, &args(&stress, &["--policy", "org/name:other.safetensors", "-o", "fresh"]), tmp.path(), &env);
    assert_refused(&missing, &["--policy org/name:other.safetensors", "not in the Hugging Face cache"]);
    let absent = run_env(SAMPLER, &args(&stress, &["--policy", "nope.safetensors", "-o", "fresh"]), tmp.path(), &env);
    assert_refused(&absent, &["--policy nope.safetensors", "not found"]);
    let no_wm = run(SAMPLER, &["--world-model", "nowhere", "--policy", "policy.safetensors"], tmp.path());
    assert_refused(&no_wm, &["--world-model nowhere", "not found"]);
    assert_unchanged(&before, tmp.path());
    Ok(())
}

#[test]
fn world_model_weights_must_fit_their_config() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let policy = tmp.path().join("policy.safetensors");
    write_policy(&policy)?;
    let mut two = WorldModelConfig::tiny();
    two.dit.num_layers = 2;
    let wm = tmp.path().join("wm");
    write_world_model(&wm, &two)?;
    // The json says one layer; the file holds two: refused, listing the second block's keys.
    shared::io::write_json_atomic(&wm.join("world_model.json"), &WorldModelConfig::tiny())?;
    let before = snapshot(tmp.path());
    let probe_args = ["--world-model", "wm", "--policy", "policy.safetensors", "--seeds", "0", "-o", "out"];
    let out = run(SAMPLER, &probe_args, tmp.path());
    let err = assert_refused(&out, &["world_model.safetensors", "unexpected 'dit.transformer_blocks.1."]);
    assert!(!err.contains("unexpected 'dit.transformer_blocks.0."), "{err}");
    assert_unchanged(&before, tmp.path());

    // NaN in one weight: named with its key.
    write_world_model(&wm, &WorldModelConfig::tiny())?;
    let path = wm.join("world_model.safetensors");
    let mut tensors: HashMap<String, Tensor> = shared::weights::read_safetensors(&path, &Device::Cpu)?;
    let key = "action_embed.bias".to_string();
    let n = tensors[&key].elem_count();
    let mut values = vec![0f32; n];
    values[0] = f32::NAN;
    tensors.insert(key, Tensor::from_vec(values, n, &Device::Cpu)?);
    shared::weights::save_tensors_atomic(&tensors, &path)?;
    let before = snapshot(tmp.path());
    let out = run(SAMPLER, &probe_args, tmp.path());
    assert_refused(&out, &["world_model.safetensors", "'action_embed.bias': 1 NaN/Inf"]);
    assert_unchanged(&before, tmp.path());

    // f64 weights where the format is f32, and a config with an absurd layer count.
    let f64s: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, t)| Ok((k, t.to_dtype(DType::F64)?))).collect::<candle_core::Result<_>>()?;
    shared::weights::save_tensors_atomic(&f64s, &path)?;
    let out = run(SAMPLER, &probe_args, tmp.path());
    assert_refused(&out, &["world_model.safetensors", "stored as F64", "the format is F32"]);
    let mut huge = WorldModelConfig::tiny();
    huge.dit.num_layers = 1_000_000_000;
    shared::io::write_json_atomic(&wm.join("world_model.json"), &huge)?;
    let out = run(SAMPLER, &probe_args, tmp.path());
    assert_refused(&out, &["world_model.json", "dit.num_layers 1000000000 is beyond"]);
    assert!(!tmp.path().join("out").exists(), "a refused run created its output directory");
    Ok(())
}

#[test]
fn train_world_model_checks_its_arguments_and_outputs_first() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // The smallest training that runs: the tiny model, two steps, three short episodes.
    let tiny: &[&str] = &[
        "--model",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--episodes",
        "3",
        "--frames-per-episode",
        "5",
        "--eval-episodes",
        "1",
        "--eval-clips",
        "2",
        "--out-dir",
        "wm",
        "--figure",
        "fig.png",
        "--run-dir",
        "run",
        "--threads",
        "0",
    ];
    std::fs::write(tmp.path().join("keep.txt"), b"unrelated")?;
    let before = snapshot(tmp.path());
    let cases: &[(&[&str], &[&str])] = &[
        (&["--steps", "0"], &["--steps must be at least 1"]),
        (&["--lr", "-1"], &["--lr must be finite and > 0, got -1"]),
        (&["--lr", "NaN"], &["--lr must be finite and > 0, got NaN"]),
        (&["--batch-size", "0"], &["--batch-size must be at least 1"]),
        (&["--checkpoint-every", "0"], &["--checkpoint-every must be at least 1"]),
        (&["--eval-solver-steps", "0"], &["--eval-solver-steps must be at least 1"]),
        (&["--eval-sigma-min", "90"], &["--eval-sigma-min (90) must be below --eval-sigma-max (80)"]),
        (&["--frames-per-episode", "2"], &["--frames-per-episode must be at least the clip length (3 frames)"]),
        (&["--eval-solver", "heun"], &["--eval-solver: unknown value 'heun'"]),
        (&["--p-std", "0"], &["--p-std must be in (0, 5], got 0"]),
        (&["--p-mean", "NaN"], &["--p-mean must be in [-10, 10], got NaN"]),
        (&["--model", "huge"], &["--model: unknown value 'huge'; allowed: small, medium, tiny"]),
    ];
    for (extra, needles) in cases {
        assert_refused(&run(TRAIN, &args(tiny, extra), tmp.path()), needles);
        assert_unchanged(&before, tmp.path());
    }
    if shared::device::free_memory_bytes(&Device::Cpu).is_some() {
        let out = run(TRAIN, &args(tiny, &["--batch-size", "1000000000000000"]), tmp.path());
        assert_refused(&out, &["--batch-size 1000000000000000", "GiB free"]);
        assert_unchanged(&before, tmp.path());
    }

    // A run writes the weights, which load back through the checked loader.
    assert_ok(&run(TRAIN, tiny, tmp.path()));
    WorldModel::load_dir(&tmp.path().join("wm"), DType::F32, &Device::Cpu)?;
    assert!(tmp.path().join("fig.png").is_file() && tmp.path().join("run/metrics.jsonl").is_file());

    // Its outputs now exist: a second run is refused before it trains, naming them.
    std::fs::write(tmp.path().join("run/stale.txt"), b"old")?;
    let before = snapshot(tmp.path());
    let again = run(TRAIN, tiny, tmp.path());
    assert_refused(&again, &["--figure", "fig.png", "the file exists", "--overwrite"]);
    assert_unchanged(&before, tmp.path());
    std::fs::remove_file(tmp.path().join("fig.png"))?;
    let before = snapshot(tmp.path());
    let again = run(TRAIN, tiny, tmp.path());
    assert_refused(&again, &["--out-dir", "world_model.safetensors", "the file exists"]);
    assert_unchanged(&before, tmp.path());
    // --eval-only rewrites the figure and the manifest's evaluation: only with --overwrite.
    std::fs::write(tmp.path().join("fig.png"), b"old figure")?;
    let before = snapshot(tmp.path());
    assert_refused(&run(TRAIN, &args(tiny, &["--eval-only"]), tmp.path()), &["--figure", "--overwrite"]);
    assert_unchanged(&before, tmp.path());

    // With --overwrite the run directory is replaced whole.
    assert_ok(&run(TRAIN, &args(tiny, &["--overwrite"]), tmp.path()));
    assert!(!tmp.path().join("run/stale.txt").exists(), "--overwrite kept the earlier run's file");
    assert!(std::fs::read(tmp.path().join("fig.png"))? != b"old figure");
    Ok(())
}
