//! Bad input to `train` (issue #18): every probe runs the real binary on a tiny dataset and
//! asserts a clean refusal — exit status 1, a message naming the flag, field or file — and that
//! whatever was there before is byte-identical afterwards. The divergence guard and the
//! checkpoint loader are probed through the library. Tiny sizes throughout (a two-episode,
//! 20-step dataset; 2-iteration runs of batch 4): the whole file runs in seconds.

#[path = "../../tests/support/probe.rs"]
mod probe;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rl::dataset::{collect_dataset, CollectConfig, Tier};
use rl::encoders::EncoderKind;
use rl::env::EnvConfig;
use rl::lapo::{Batch, Dims, Lapo, LapoConfig, Losses, ValueBounds};
use rl::trainer::{check_state, checkpoint_paths, load_checkpoint, save_checkpoint, DivergenceBound, Normalization};

const TRAIN: &str = env!("CARGO_BIN_EXE_train");

/// A two-episode medium dataset with 16 px views and 20-step episodes (milliseconds to collect).
fn tiny_dataset(dir: &Path, seed: u64) {
    let config = CollectConfig {
        tier: Tier::Medium,
        episodes: 2,
        seed,
        env: EnvConfig { image_height: 16, image_width: 16, max_steps: 20, render: true, supersample: 1 },
        threads: 1,
    };
    collect_dataset(&config, dir, &|| {}).expect("collecting the test dataset");
}

/// A scratch directory (the cwd of every probe) holding `data/` (a tiny dataset).
struct Scratch {
    tmp: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        tiny_dataset(&tmp.path().join("data"), 1000);
        Self { tmp }
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    fn runs(&self) -> PathBuf {
        self.root().join("runs")
    }

    /// `train` with the tiny settings, then `extra` (later flags are the probe's).
    fn train(&self, extra: &[&str]) -> std::process::Output {
        let mut args = Vec::new();
        for (flag, value) in TINY {
            if !extra.contains(flag) {
                args.extend([*flag, *value]);
            }
        }
        args.extend(extra);
        probe::run(TRAIN, &args, self.root())
    }
}

/// The tiny dataset and a runs directory in the scratch directory; two iterations of batch 4, a
/// checkpoint after each, one 20-step evaluation episode at the end. A probe's own value of a
/// flag replaces the one here.
const TINY: &[(&str, &str)] = &[
    ("--dataset", "data"),
    ("--runs-dir", "runs"),
    ("--iterations", "2"),
    ("--batch-size", "4"),
    ("--eval-every", "1000"),
    ("--eval-episodes", "1"),
    ("--checkpoint-every", "1"),
    ("--audit-every", "0"),
    ("--log-every", "1"),
];

#[test]
fn an_existing_run_is_refused_without_a_flag_and_left_untouched() {
    let s = Scratch::new();
    probe::assert_ok(&s.train(&[]));
    let before = probe::snapshot(s.root());
    // The same command again: the default name repeats.
    let err = probe::assert_refused(&s.train(&[]), &["--name", "not empty", "--overwrite", "--resume", "default name"]);
    assert!(err.contains("lapo-none-critic-s0"), "{err}");
    probe::assert_unchanged(&before, s.root());
}

#[test]
fn overwrite_replaces_the_run_whole() {
    let s = Scratch::new();
    probe::assert_ok(&s.train(&["--name", "r"]));
    let run = s.runs().join("r");
    std::fs::write(run.join("old.txt"), b"left by an earlier run").unwrap();
    let before = probe::snapshot(s.root());
    probe::assert_refused(&s.train(&["--name", "r", "--overwrite", "--resume"]), &["--overwrite", "--resume"]);
    probe::assert_unchanged(&before, s.root());
    probe::assert_ok(&s.train(&["--name", "r", "--overwrite"]));
    assert!(!run.join("old.txt").exists(), "the old run's files must be removed");
    for file in ["config.json", "metrics.jsonl", "checkpoint.json", "checkpoint.safetensors", "policy.safetensors"] {
        assert!(run.join(file).is_file(), "{file} missing after --overwrite");
    }
}

#[test]
fn resume_refuses_changes_that_alter_the_run_and_extends_it_otherwise() {
    let s = Scratch::new();
    tiny_dataset(&s.root().join("other"), 2000);
    probe::assert_ok(&s.train(&["--name", "r"]));
    let config_path = s.runs().join("r").join("config.json");
    let config = std::fs::read(&config_path).unwrap();
    let before = probe::snapshot(s.root());

    let err = probe::assert_refused(
        &s.train(&["--name", "r", "--resume", "--batch-size", "8", "--critic-lr", "1e-3"]),
        &["--batch-size: stored 4, command line 8", "--critic-lr: stored 0.0003, command line 0.001", "config.json"],
    );
    assert!(!err.contains("--iterations"), "{err}");
    probe::assert_unchanged(&before, s.root());

    // A different encoder is a changed field, not a missing tensor.
    let err = probe::assert_refused(&s.train(&["--name", "r", "--resume", "--encoder", "conv"]), &["--encoder"]);
    assert!(!err.contains("missing"), "{err}");
    probe::assert_unchanged(&before, s.root());

    probe::assert_refused(
        &s.train(&["--name", "r", "--resume", "--dataset", "other"]),
        &["--dataset other", "a different dataset"],
    );
    probe::assert_unchanged(&before, s.root());

    probe::assert_refused(&s.train(&["--name", "absent", "--resume"]), &["--name", "--resume"]);
    assert!(!s.runs().join("absent").exists());

    // Extending the run is not a change: it continues, and its configuration stays as written.
    probe::assert_ok(&s.train(&["--name", "r", "--resume", "--iterations", "4"]));
    assert_eq!(std::fs::read(&config_path).unwrap(), config, "config.json must not be rewritten on --resume");
    let info = rl::trainer::read_checkpoint_info(&s.runs().join("r")).unwrap();
    assert_eq!(info.iteration, 4);
}

#[test]
fn zero_counts_are_refused_before_any_work() {
    let s = Scratch::new();
    // An absent dataset directory: a probe that got past the checks would start collecting.
    let absent = s.root().join("absent");
    let before = probe::snapshot(s.root());
    for flag in [
        "--iterations",
        "--batch-size",
        "--log-every",
        "--eval-every",
        "--checkpoint-every",
        "--eval-episodes",
        "--dataset-episodes",
        "--image-size",
        "--supersample",
        "--threads",
    ] {
        let out = s.train(&[flag, "0", "--dataset", absent.to_str().unwrap()]);
        probe::assert_refused(&out, &[&format!("{flag} ")]);
        assert!(!absent.exists() && !s.runs().exists(), "{flag} 0: something was created");
    }
    probe::assert_unchanged(&before, s.root());
}

#[test]
fn out_of_range_hyperparameters_are_listed_in_one_error() {
    let s = Scratch::new();
    let before = probe::snapshot(s.root());
    let out = s.train(&[
        "--gamma",
        "1.5",
        "--expectile",
        "2",
        "--tau",
        "3",
        "--critic-lr",
        "-1",
        "--actor-lr",
        "NaN",
        "--latent-dim",
        "0",
    ]);
    probe::assert_refused(
        &out,
        &[
            "invalid arguments",
            "--gamma ",
            "--expectile ",
            "--tau ",
            "--critic-lr ",
            "--actor-lr ",
            "NaN",
            "--latent-dim ",
        ],
    );
    probe::assert_unchanged(&before, s.root());
}

#[test]
fn an_impossible_batch_size_is_refused_naming_the_flag() {
    if shared::device::free_memory_bytes(&Device::Cpu).is_none() {
        eprintln!("skipped: this system does not report its free memory");
        return;
    }
    let s = Scratch::new();
    let before = probe::snapshot(s.root());
    probe::assert_refused(&s.train(&["--batch-size", "100000000000"]), &["--batch-size 100000000000", "GiB free"]);
    probe::assert_refused(&s.train(&["--eval-episodes", "100000000000"]), &["--eval-episodes 100000000000", "GiB"]);
    probe::assert_unchanged(&before, s.root());
}

#[test]
fn an_export_path_that_is_a_directory_fails_before_any_run_directory() {
    let s = Scratch::new();
    std::fs::create_dir(s.root().join("out")).unwrap();
    let before = probe::snapshot(s.root());
    probe::assert_refused(&s.train(&["--export", "out"]), &["--export out", "is a directory"]);
    assert!(!s.runs().exists(), "the run directory was created");
    probe::assert_unchanged(&before, s.root());
}

#[test]
fn an_interrupted_collection_is_refused_and_left_byte_identical() {
    let s = Scratch::new();
    // What a killed collection leaves: shards, no meta.json.
    let partial = s.root().join("partial");
    std::fs::create_dir(&partial).unwrap();
    for entry in std::fs::read_dir(s.root().join("data")).unwrap().flatten() {
        if entry.file_name() != "meta.json" {
            std::fs::copy(entry.path(), partial.join(entry.file_name())).unwrap();
        }
    }
    let before = probe::snapshot(s.root());
    probe::assert_refused(
        &s.train(&["--dataset", "partial"]),
        &["--dataset partial", "meta.json", "interrupted", "--overwrite"],
    );
    assert!(!s.runs().exists());
    probe::assert_unchanged(&before, s.root());
}

#[test]
fn a_run_locked_by_another_process_is_refused() {
    let s = Scratch::new();
    let run = s.runs().join("r");
    let held = shared::outputs::claim_dir(&run, "--name", shared::outputs::Existing::Refuse).unwrap();
    let before = probe::snapshot(s.root());
    probe::assert_refused(&s.train(&["--name", "r"]), &["--name", "another process", shared::outputs::LOCK_FILE]);
    probe::assert_unchanged(&before, s.root());
    drop(held);
    probe::assert_ok(&s.train(&["--name", "r"]));
}

// ---------------------------------------------------------------------------------------------
// The library: the divergence guard and the checkpoint loader
// ---------------------------------------------------------------------------------------------

fn dims() -> Dims {
    Dims { state_dim: 4, action_dim: 2, image_hw: (16, 16), privileged_dim: 0, supersample: 1, ..Default::default() }
}
const BOUNDS: ValueBounds = ValueBounds { min_v: -5.0, max_v: 100.0 };

fn tiny_lapo() -> Lapo {
    let config = LapoConfig { batch_size: 8, encoder: EncoderKind::None, ..LapoConfig::reference() };
    Lapo::new(config, dims(), BOUNDS, DType::F32, &Device::Cpu).unwrap()
}

/// A deterministic batch of 8 (values from a fixed formula, rewards in the data's range).
fn tiny_batch() -> Batch {
    let b = 8;
    let ramp =
        |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|i| ((i * 7 % 11) as f32 / 11.0 - 0.5) * scale).collect() };
    let t = |v: Vec<f32>, d: usize| Tensor::from_vec(v, (b, d), &Device::Cpu).unwrap();
    Batch {
        images: None,
        next_images: None,
        state: t(ramp(b * 4, 2.0), 4),
        next_state: t(ramp(b * 4, 1.5), 4),
        action: t(ramp(b * 2, 1.0), 2),
        reward: t(ramp(b, 1.0), 1),
        done: t(vec![0.0; b], 1),
        privileged: None,
    }
}

fn norm() -> Normalization {
    Normalization {
        state_mean: vec![0.0; 4],
        state_std: vec![1.0; 4],
        action_mean: vec![0.0; 2],
        action_std: vec![1.0; 2],
        reward_scale: 1.0,
        privileged_mean: Vec::new(),
        privileged_std: Vec::new(),
    }
}

fn set_var(lapo: &Lapo, name: &str, value: f32) {
    let data = lapo.varmap.data().lock().unwrap();
    let var = data.get(name).unwrap_or_else(|| panic!("no var {name}"));
    var.set(&(var.as_tensor().zeros_like().unwrap() + value as f64).unwrap()).unwrap();
}

#[test]
fn losses_beyond_the_divergence_bound_are_named() {
    let bound = DivergenceBound::new(&BOUNDS);
    // 10 × the largest |return| (100).
    assert_eq!(bound.max_abs_value, 1000.0);
    let healthy = Losses {
        critic: 3.0,
        q1: 1.0,
        q2: 1.0,
        value: 1.0,
        mean_q: 40.0,
        mean_v: 38.0,
        actor: -40.0,
        ..Losses::default()
    };
    assert!(bound.check_losses(&healthy).is_ok());
    let diverged = Losses { q1: 1e46, critic: 1e46, mean_q: 1e23, ..healthy.clone() };
    let err = bound.check_losses(&diverged).unwrap_err();
    assert!(err.contains("Q1 loss") && err.contains("divergence bound"), "{err}");
    let err = bound.check_losses(&Losses { mean_v: -2e3, ..healthy.clone() }).unwrap_err();
    assert!(err.contains("mean V"), "{err}");
    let err = bound.check_losses(&Losses { kl: f64::NAN, ..healthy }).unwrap_err();
    assert!(err.contains("VAE KL is NaN"), "{err}");
}

#[test]
fn a_diverged_state_is_never_checkpointed() {
    let batch = tiny_batch();
    let tmp = tempfile::tempdir().unwrap();

    let mut lapo = tiny_lapo();
    lapo.train_step(&batch, false).unwrap();
    check_state(&lapo, &batch).unwrap();
    save_checkpoint(&lapo, &norm(), &tmp.path().join("good").tap_mkdir(), &batch).unwrap();

    // A NaN weight: refused, naming the var; nothing written.
    set_var(&lapo, "critic.q2.l1.weight", f32::NAN);
    let dir = tmp.path().join("nan").tap_mkdir();
    let err = format!("{:#}", save_checkpoint(&lapo, &norm(), &dir, &batch).unwrap_err());
    assert!(err.contains("critic.q2.l1.weight") && err.contains("NaN/Inf"), "{err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "a diverged state was written");

    // Finite but diverged values (the issue's Q ≈ 1e23): V's output bias far beyond the bound.
    let lapo = tiny_lapo();
    let output_bias = format!("critic.v.l{}.bias", lapo.config.hidden_layers);
    set_var(&lapo, &output_bias, 1e23);
    let dir = tmp.path().join("huge").tap_mkdir();
    let err = format!("{:#}", save_checkpoint(&lapo, &norm(), &dir, &batch).unwrap_err());
    assert!(err.contains("V reaches 1.000e23") && err.contains("divergence bound"), "{err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "a diverged state was written");
}

#[test]
fn the_checkpoint_loader_names_every_bad_tensor_and_changes_nothing() {
    let batch = tiny_batch();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut trained = tiny_lapo();
    trained.train_step(&batch, false).unwrap();
    save_checkpoint(&trained, &norm(), dir, &batch).unwrap();

    // A good checkpoint loads, optimiser moments included.
    let mut fresh = tiny_lapo();
    load_checkpoint(&mut fresh, dir).unwrap();
    assert_eq!(fresh.iteration, 1);

    // Corrupt the tensors: one NaN, one removed, one unexpected, one moment without its partner.
    let (tensors_path, _) = checkpoint_paths(dir);
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&tensors_path, &Device::Cpu).unwrap();
    let nan = "model/actor.l0.weight";
    tensors.insert(nan.into(), (tensors[nan].zeros_like().unwrap() + f64::NAN).unwrap());
    tensors.remove("model/critic.q1.l2.bias").unwrap();
    tensors.insert("model/extra".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    let moment = tensors.keys().find(|k| k.starts_with("optim/actor/") && k.ends_with("/v")).unwrap().clone();
    tensors.remove(&moment);
    candle_core::safetensors::save(&tensors, &tensors_path).unwrap();

    let mut target = tiny_lapo();
    let err = format!("{:#}", load_checkpoint(&mut target, dir).unwrap_err());
    for needle in [
        "checkpoint.safetensors",
        "actor.l0.weight",
        "NaN/Inf",
        "missing 'model/critic.q1.l2.bias'",
        "unexpected 'model/extra'",
        &format!("missing '{moment}'"),
    ] {
        assert!(err.contains(needle), "{needle} not named:\n{err}");
    }
    assert_eq!(target.iteration, 0, "a failed load must change nothing");

    // A checkpoint of another configuration is named by field, before any tensor is read.
    let other = LapoConfig { batch_size: 16, encoder: EncoderKind::None, ..LapoConfig::reference() };
    let mut other = Lapo::new(other, dims(), BOUNDS, DType::F32, &Device::Cpu).unwrap();
    let err = format!("{:#}", load_checkpoint(&mut other, dir).unwrap_err());
    assert!(err.contains("config.batch_size: 8 in the checkpoint, 16 in the model"), "{err}");
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    /// Creates the directory and returns its path.
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
