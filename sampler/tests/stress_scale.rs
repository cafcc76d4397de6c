//! The policy stress test at scale, through the `sampler` binary on the embedded weights:
//! `--shard 0/2` + `--shard 1/2` + `sampler stress-report` equals one unsharded run; a run whose
//! scenarios did not all finish resumes without redoing the finished ones; scenario files; and
//! the refusals of bad scale-out arguments before anything is written.

use std::path::Path;

use anyhow::{Context, Result};

fn sampler(args: &[&str]) -> Result<(bool, String)> {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_sampler")).args(args).env("RUST_BACKTRACE", "0").output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// `scenarios` held-out scenarios, two iterations each: small and fast, the same code path.
fn run(dir: &Path, scenarios: usize, extra: &[&str]) -> Result<String> {
    let (d, n) = (dir.display().to_string(), scenarios.to_string());
    let mut args: Vec<&str> = vec!["-o", &d, "--num-scenarios", &n, "--iterations", "2"];
    args.extend(extra);
    let (ok, text) = sampler(&args)?;
    anyhow::ensure!(ok, "sampler {args:?} failed:\n{text}");
    Ok(text)
}

fn summary(dir: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("report/summary.json")).context("report/summary.json")?;
    Ok(serde_json::from_str(&text)?)
}

#[test]
fn two_shards_and_the_report_equal_one_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let whole = tmp.path().join("whole");
    run(&whole, 3, &[])?;
    let sharded = tmp.path().join("sharded");
    let first = run(&sharded, 3, &["--shard", "0/2"])?;
    assert!(first.contains("shard 0/2 of 3"), "{first}");
    run(&sharded, 3, &["--shard", "1/2"])?;
    assert!(sharded.join("shard-0-of-2/scenarios/ep9000-f4.json").exists());
    assert!(sharded.join("shard-1-of-2/scenarios/ep9001-f4.json").exists());
    assert!(!sharded.join("report").exists(), "a shard wrote the merged report");
    let (ok, text) = sampler(&["stress-report", &sharded.display().to_string()])?;
    assert!(ok, "{text}");
    let (a, b) = (summary(&whole)?, summary(&sharded)?);
    assert_eq!(a["scenarios"], 3);
    for key in ["rows", "mean", "ranked", "settings", "error_increased"] {
        assert_eq!(a[key], b[key], "{key} differs between the unsharded run and the merged shards");
    }
    for f in ["summary.md", "gallery.png", "gallery.gif"] {
        assert!(sharded.join("report").join(f).metadata()?.len() > 0, "{f}");
    }
    // The report is not overwritten silently.
    let (ok, text) = sampler(&["stress-report", &sharded.display().to_string()])?;
    assert!(!ok && text.contains("--overwrite"), "{text}");
    Ok(())
}

#[test]
fn an_unfinished_run_resumes_without_redoing_finished_scenarios() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let whole = tmp.path().join("whole");
    run(&whole, 3, &[])?;
    // A run stopped after its first two scenarios: each result is written when its scenario
    // finishes, so the directory holds exactly those (the third never started).
    let partial = tmp.path().join("partial");
    run(&partial, 2, &[])?;
    let finished = std::fs::read(partial.join("scenarios/ep9000-f4.json"))?;
    // Without --resume the directory is refused.
    let d = partial.display().to_string();
    let (ok, text) = sampler(&["-o", &d, "--num-scenarios", "3", "--iterations", "2"])?;
    assert!(!ok && text.contains("not empty"), "{text}");
    let text = run(&partial, 3, &["--resume"])?;
    assert!(text.contains("2 already finished (skipped)"), "{text}");
    let computed: Vec<&str> = text.lines().filter(|l| l.starts_with("scenario ")).collect();
    assert_eq!(computed.len(), 1, "{text}");
    assert!(computed[0].starts_with("scenario ep9002-f4:"), "{text}");
    assert_eq!(std::fs::read(partial.join("scenarios/ep9000-f4.json"))?, finished, "a finished result was redone");
    let (a, b) = (summary(&whole)?, summary(&partial)?);
    assert_eq!(a["rows"], b["rows"]);
    // Resuming with other settings is refused, naming the result that differs.
    let (ok, text) = sampler(&["-o", &d, "--num-scenarios", "3", "--iterations", "3", "--resume"])?;
    assert!(!ok && text.contains("other settings"), "{text}");
    Ok(())
}

#[test]
fn scenario_files_and_bad_scale_out_arguments() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("scenarios.jsonl");
    std::fs::write(
        &file,
        "{\"id\": \"late-descent\", \"episode_seed\": 9100, \"start_frame\": 6, \"direction\": \"descent\", \"noise_seed\": 3}\n\
         {\"id\": \"other-actions\", \"episode_seed\": 9101, \"actions\": [[0,0,0,0,0,0,0,0],[0.5,0,0,0,0,0,0,0]]}\n",
    )?;
    let dir = tmp.path().join("run");
    let f = file.display().to_string();
    let (ok, text) = sampler(&["-o", &dir.display().to_string(), "--scenarios", &f, "--iterations", "2"])?;
    assert!(ok, "{text}");
    let s = summary(&dir)?;
    assert_eq!(s["scenarios"], 2);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("scenarios/late-descent.json"))?)?;
    assert_eq!(r["scenario"]["start_frame"], 6);
    let losses: Vec<f64> =
        r["iterations"].as_array().context("iterations")?.iter().filter_map(|i| i["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 2);

    // The trust region holds in the search: z0 moves at most R·√d (and to its edge: the ascent
    // pushes past it at lr 0.05); renormalisation keeps ‖z0‖ where it started.
    for (flags, check) in
        [(["--trust-region", "0.02", "--renorm", "false"], "moved"), (["--renorm", "true", "--top", "1"], "norm")]
    {
        let dir = tmp.path().join(format!("constraint-{check}"));
        let mut args = vec!["-o", dir.to_str().context("path")?, "--seeds", "9000", "--iterations", "3"];
        args.extend(flags);
        let (ok, text) = sampler(&args)?;
        assert!(ok, "{text}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("scenarios/ep9000-f4.json"))?)?;
        let (moved, before, after) = (
            r["z0_moved"].as_f64().context("moved")?,
            r["z0_rms_before"].as_f64().context("rms")?,
            r["z0_rms_after"].as_f64().context("rms")?,
        );
        println!("{check}: moved {moved}, ‖z0‖/√d {before} → {after}");
        match check {
            "moved" => assert!(moved <= 0.02 * (1.0 + 1e-5) && moved > 0.019, "moved {moved}"),
            _ => assert!((after - before).abs() <= 1e-5 * before && moved > 0.0, "{before} → {after}"),
        }
        assert!(r["nearest_real_after"].as_f64().is_some_and(f64::is_finite), "{r}");
    }

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"x\", \"episode_seed\": 1, \"actions\": [[1,2]]}\n")?;
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--shard".into(), "2/2".into(), "-o".into(), tmp.path().join("a").display().to_string()], "below COUNT"),
        (vec!["--shard".into(), "0/2".into()], "--shard needs -o"),
        (vec!["--resume".into()], "--resume needs -o"),
        (vec!["--resume".into(), "-o".into(), tmp.path().join("absent").display().to_string()], "--resume"),
        (vec!["--num-scenarios".into(), "0".into()], "--num-scenarios"),
        (vec!["--trust-region".into(), "-1".into()], "--trust-region"),
        (vec!["--scenarios".into(), tmp.path().join("none.jsonl").display().to_string()], "cannot read"),
        (
            vec![
                "--scenarios".into(),
                bad.display().to_string(),
                "-o".into(),
                tmp.path().join("b").display().to_string(),
            ],
            "actions must be",
        ),
        (vec!["--demo".into(), "--shard".into(), "0/2".into()], "apply to the policy stress test"),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, text) = sampler(&args)?;
        assert!(!ok, "{args:?} was accepted:\n{text}");
        assert!(text.contains(expected), "{args:?}: expected '{expected}' in:\n{text}");
        assert!(!text.contains("panicked"), "{text}");
    }
    Ok(())
}

/// `--world-model cosmos:REF`: the tiny Predict2.5 pipeline of the fake Hub cache as the stress
/// test's world model (conditioned on each scenario's real first frame, the policy's cameras cut
/// from the decoded 16×48 video), offline by repository name: the search runs through the
/// pipeline and the VAE decode and raises the embedded policy's error; the report has the
/// nearest-real-frame measure and no denoising measure (the embedded model's own).
#[test]
fn a_cosmos_pipeline_as_the_world_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("cosmos");
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let embeds = fixtures.join("cosmos_prompt_embeds_predict25.safetensors");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sampler"))
        .args(["--world-model", "cosmos:worldgrad-test/tiny-cosmos-predict25", "--cosmos-prompt-embeds"])
        .arg(&embeds)
        .args(["--seeds", "9000", "--iterations", "3", "--num-steps", "2", "-o"])
        .arg(&dir)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", fixtures.join("hf_cache"))
        .env_remove("HF_HOME")
        .env("RUST_BACKTRACE", "0")
        .output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("scenarios/ep9000-f4.json"))?)?;
    let (before, after) = (r["error_before"].as_f64().context("before")?, r["error_after"].as_f64().context("after")?);
    println!("Cosmos world: policy error {before} → {after}");
    assert!(after > before, "ascent did not raise the error: {before} → {after}");
    assert!(r["realism_after"].is_null() && r["nearest_real_after"].as_f64().is_some_and(f64::is_finite), "{r}");
    let clips =
        shared::weights::read_safetensors(&dir.join("scenarios/ep9000-f4.safetensors"), &candle_core::Device::Cpu)?;
    assert_eq!(clips.get("after").context("after")?.dims(), &[1, 3, 5, 16, 48]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json"))?)?;
    assert!(report["world_model"].as_str().is_some_and(|w| w.contains("Cosmos2_5_PredictBasePipeline")), "{report}");
    // Scenario actions cannot condition a Cosmos world: refused, not silently unused.
    let file = tmp.path().join("with-actions.jsonl");
    std::fs::write(&file, "{\"id\": \"a\", \"episode_seed\": 9000, \"actions\": [[0,0,0,0,0,0,0,0]]}\n")?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sampler"))
        .args(["--world-model", "cosmos:worldgrad-test/tiny-cosmos-predict25", "--cosmos-prompt-embeds"])
        .arg(&embeds)
        .arg("--scenarios")
        .arg(&file)
        .arg("-o")
        .arg(tmp.path().join("refused"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", fixtures.join("hf_cache"))
        .env_remove("HF_HOME")
        .output()?;
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("not conditioned on actions"), "{text}");
    assert!(!tmp.path().join("refused").exists(), "the refused run created its output directory");
    // Cosmos flags without a Cosmos world are refused.
    let (ok, text) = sampler(&["--cosmos-frames", "9", "--seeds", "1"])?;
    assert!(!ok && text.contains("apply to --world-model cosmos:REF"), "{text}");
    Ok(())
}

/// `examples/stress/slurm.sh` as Slurm would run it: array tasks 0 and 1 of 2, task 0 run again
/// (a requeue: it resumes and recomputes nothing), then the merge — the report of one run.
#[test]
fn the_slurm_example_runs_the_shards_and_resumes_a_requeued_task() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run_dir = tmp.path().join("cluster");
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/stress/slurm.sh");
    let task = |i: usize| -> Result<String> {
        let out = std::process::Command::new("bash")
            .arg(&script)
            .env("SAMPLER", env!("CARGO_BIN_EXE_sampler"))
            .env("RUN", &run_dir)
            .env("ARGS", "--num-scenarios 3 --iterations 2")
            .env("SLURM_ARRAY_TASK_ID", i.to_string())
            .env("SLURM_ARRAY_TASK_COUNT", "2")
            .env("RUST_BACKTRACE", "0")
            .output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        anyhow::ensure!(out.status.success(), "task {i}:\n{text}");
        Ok(text)
    };
    task(0)?;
    task(1)?;
    let again = task(0)?;
    assert!(again.contains("2 already finished (skipped)"), "{again}");
    assert!(!again.lines().any(|l| l.starts_with("scenario ")), "a requeued task recomputed:\n{again}");
    let (ok, text) = sampler(&["stress-report", &run_dir.display().to_string()])?;
    assert!(ok, "{text}");
    let whole = tmp.path().join("whole");
    run(&whole, 3, &[])?;
    assert_eq!(summary(&whole)?["rows"], summary(&run_dir)?["rows"]);
    Ok(())
}
