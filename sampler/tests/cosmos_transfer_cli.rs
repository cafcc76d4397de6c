//! `sampler cosmos` on a Cosmos-Transfer2.5 repository as a user runs it: the tiny pipeline of
//! the fake Hub cache (`make_cosmos_transfer_pipeline_fixture.py`) by repository name, offline:
//! the written latents and video match diffusers' over two chunks; a computed edge control from
//! `--video` with per-chunk z0 optimisation; `--dry-run` of the real 2B Transfer2.5 configs;
//! and the refusals of bad control arguments before anything loads.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn f(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

fn sampler(args: &[String]) -> Result<std::process::Output> {
    Ok(std::process::Command::new(env!("CARGO_BIN_EXE_sampler"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", fixtures().join("hf_cache"))
        .env_remove("HF_HOME")
        .env("RUST_BACKTRACE", "0")
        .output()?)
}

/// The tiny Transfer2.5 run's arguments (f32 on the CPU), plus `extra` (a flag given there with
/// a value replaces the default's value).
fn args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "cosmos",
        "--model",
        "worldgrad-test/tiny-cosmos-transfer25",
        "--prompt-embeds",
        &f("cosmos_prompt_embeds_transfer25.safetensors"),
        "--latents",
        &f("cosmos_latents_transfer25.safetensors"),
        "--height",
        "32",
        "--width",
        "48",
        "--num-frames",
        "17",
        "--chunk-frames",
        "9",
        "--steps",
        "4",
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "-o",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let base = a.len();
    let mut i = 0;
    while i < extra.len() {
        let flag = extra[i];
        let value = extra.get(i + 1).filter(|v| !v.starts_with("--") || v.parse::<f64>().is_ok());
        match (a[..base].iter().position(|x| x == flag), value) {
            (Some(at), Some(v)) if flag.starts_with('-') => {
                a[at + 1] = v.to_string();
                i += 2;
            }
            _ => {
                a.push(flag.to_string());
                i += 1;
            }
        }
    }
    a
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn read(dir: &Path, file: &str, key: &str) -> Result<Tensor> {
    shared::weights::read_safetensors(&dir.join(file), &candle_core::Device::Cpu)?.remove(key).context(key.to_string())
}

#[test]
fn cli_matches_diffusers_over_two_chunks_from_the_hub_cache() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("run");
    let control = format!("edge={}:0.8", f("cosmos_transfer_controls"));
    // guidance left to the pipeline's default: 3 for Transfer2.5, the fixture's.
    let out = sampler(&args(&dir, &["--control", &control]))?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = shared::weights::read_safetensors(
        &fixtures().join("cosmos_transfer_cases.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let want = reference.get("transfer25.final_latents").context("reference latents")?;
    let latents = read(&dir, "latents.safetensors", "latents")?;
    assert_eq!(latents.dims(), want.dims());
    let rel = max_abs(&(&latents - want)?)? / max_abs(want)?;
    let video = read(&dir, "video.safetensors", "video")?;
    let want_video = reference.get("transfer25.video").context("reference video")?.permute((0, 4, 1, 2, 3))?;
    let video_err = max_abs(&(&video - want_video)?)?;
    println!("CLI: latents rel error {rel:.2e}, video max |Δ| {video_err:.2e}");
    assert!(rel < 1e-4, "latents off by {rel:.3e}");
    assert!(video_err <= 2.0 / 255.0, "video off by {video_err:.3e}");
    for file in ["frames.png", "control_edge.png", "report.json", "video.mp4", "control_edge.mp4"] {
        assert!(dir.join(file).metadata().with_context(|| file.to_string())?.len() > 0, "{file}");
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json"))?)?;
    assert_eq!(report["chunks"]["chunks"], serde_json::json!([[0, 9], [8, 17]]));
    assert_eq!(report["guidance"], 3.0);
    assert_eq!(report["controls"][0]["conditioning_scale"], 0.8);
    Ok(())
}

/// An edge control computed from `--video` (Canny on its frames), z0 optimised per chunk toward a
/// target video: each chunk's optimisation finds a lower loss than its start (Adam's fixed-size
/// steps on this tiny random model bounce: the last iterate is not always the best), and the
/// outputs include the before/after views.
#[test]
fn computed_edge_control_and_per_chunk_optimisation() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("run");
    let target = tmp.path().join("target.safetensors");
    let video = shared::rng::SplitMix64::new(5).uniform_tensor(
        (1, 3, 6, 32, 48),
        0.0,
        1.0,
        DType::F32,
        &candle_core::Device::Cpu,
    )?;
    shared::weights::save_tensors_atomic(&std::collections::HashMap::from([("video".to_string(), video)]), &target)?;
    let extra = [
        "--control",
        "edge",
        "--video",
        &f("cosmos_condition_video"),
        "--num-frames",
        "6",
        "--chunk-frames",
        "5",
        "--steps",
        "2",
        "--iterations",
        "4",
        "--lr",
        "0.02",
        "--target-video",
        &target.display().to_string(),
    ];
    // z0 from --seed (the fixture's latents are for 9-frame chunks).
    let mut a = args(&dir, &extra);
    let at = a.iter().position(|x| x == "--latents").context("--latents")?;
    a.drain(at..at + 2);
    let out = sampler(&a)?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("computed the edge control"), "{text}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json"))?)?;
    let chunks = report["chunk_results"].as_array().context("chunk_results")?;
    assert_eq!(chunks.len(), 2, "{report}");
    for c in chunks {
        let initial = c["initial_loss"].as_f64().context("initial")?;
        let history = c["history"].as_array().context("history")?;
        let losses: Vec<f64> = history.iter().filter_map(|h| h["loss"].as_f64()).collect();
        assert_eq!(losses.len(), 4, "{c}");
        assert_eq!(losses[0], initial);
        let best = losses[1..].iter().copied().fold(f64::INFINITY, f64::min);
        println!("chunk {}: losses {losses:?}", c["frames"]);
        assert!(best < initial, "chunk {}: {losses:?}", c["frames"]);
    }
    for file in ["before.png", "before_after.png", "control_edge.png"] {
        assert!(dir.join(file).exists(), "{file}");
    }
    // Chunks [0, 5) and [4, 6): the last one padded to 5 frames, judged on its 2 real ones.
    assert_eq!(report["chunks"]["chunks"], serde_json::json!([[0, 5], [4, 6]]));
    assert_eq!(read(&dir, "video.safetensors", "video")?.dims(), &[1, 3, 6, 32, 48]);
    Ok(())
}

/// `--dry-run` for the real 2B Transfer2.5 (a repository holding only its config files) at
/// 704×1280×93 in bf16: exit 0, nothing written, the ControlNet's parameter count as diffusers'
/// model has it (meta-device key list), the DiT's likewise.
#[test]
fn dry_run_plans_the_real_2b_transfer_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = tmp.path().join("transfer25-2b");
    for (folder, file) in [
        ("transformer", "cosmos_transfer25_2b_config.json"),
        ("controlnet", "cosmos_transfer25_2b_controlnet_config.json"),
        ("vae", "wan2_1_vae_config.json"),
    ] {
        std::fs::create_dir_all(repo.join(folder))?;
        std::fs::copy(fixtures().join(file), repo.join(folder).join("config.json"))?;
    }
    std::fs::write(repo.join("model_index.json"), "{\"_class_name\": \"Cosmos2_5_TransferPipeline\"}")?;
    let count = |stem: &str| -> Result<f64> {
        let keys: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("{stem}_keys.json")))?)?;
        keys["parameter_count"].as_f64().context("parameter_count")
    };
    let out_dir = tmp.path().join("never-written");
    let output = sampler(
        &[
            "cosmos",
            "--model",
            &repo.display().to_string(),
            "--dry-run",
            "--dtype",
            "bf16",
            "--num-frames",
            "93",
            "--height",
            "704",
            "--width",
            "1280",
            "--control",
            "edge",
            "-o",
            &out_dir.display().to_string(),
        ]
        .map(String::from),
    )?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{text}");
    assert!(!out_dir.exists());
    println!("{text}");
    let line = |name: &str| -> Result<Vec<f64>> {
        let l = text.lines().find(|l| l.trim_start().starts_with(name)).with_context(|| format!("{name}: {text}"))?;
        Ok(l.split_whitespace().filter_map(|t| t.trim_end_matches("·10⁹").parse::<f64>().ok()).collect())
    };
    let dit = line("weights: DiT")?;
    let controlnet = line("weights: ControlNet")?;
    let (p_dit, p_control) = (count("cosmos_transfer25_2b")?, count("cosmos_transfer25_2b_controlnet")?);
    assert!((dit[1] * 1e9 - p_dit).abs() <= 1e-3 * p_dit, "{dit:?} vs {p_dit}");
    // "1 × 0.471·10⁹": the count, then the parameters.
    assert!((controlnet[2] * 1e9 - p_control).abs() <= 1e-3 * p_control, "{controlnet:?} vs {p_control}");
    let peak = line("peak")?[0];
    assert!(peak > dit[0] + controlnet[0], "peak {peak}");
    Ok(())
}

#[test]
fn bad_control_arguments_are_refused_before_loading() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("run");
    let controls = f("cosmos_transfer_controls");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "at least one --control"),
        (vec!["--control".into(), "depth".into()], "--control depth=PATH"),
        (vec!["--control".into(), "edge".into()], "--video"),
        (vec!["--control".into(), "normals".into()], "edge"),
        (vec!["--control".into(), format!("edge={controls}:-1")], "finite and ≥ 0"),
        (vec!["--control".into(), "edge=/no/such/folder".into()], "no such file"),
        (vec!["--control".into(), format!("edge={controls}"), "--control".into(), format!("edge={controls}")], "twice"),
        (
            vec!["--control".into(), format!("edge={controls}"), "--control".into(), format!("blur={controls}")],
            "--controlnet KIND=REPOSITORY",
        ),
        (vec!["--control".into(), format!("edge={controls}"), "--image".into(), f("cosmos_condition.png")], "--image"),
        (vec!["--control".into(), format!("edge={controls}"), "--chunk-frames".into(), "3".into()], "--chunk-frames"),
        (vec!["--control".into(), format!("edge={controls}"), "--controlnet".into(), "seg=x".into()], "no --control"),
    ];
    for (extra, expected) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = sampler(&args(&dir, &extra))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: expected '{expected}' in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!dir.exists(), "{extra:?}: a refused run created the output directory");
    }
    // --control on a Predict pipeline.
    let mut a = args(&dir, &["--control", &format!("edge={controls}")]);
    a[2] = "worldgrad-test/tiny-cosmos-predict25".into();
    let out = sampler(&a)?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("Cosmos-Transfer2.5 pipeline"));
    Ok(())
}

/// `-i` with Cosmos-Transfer2.5's inference JSON (the format of its `assets/*_spec.json`):
/// `video_path` (relative to the file), an `edge` control computed at the `low` preset with a
/// weight, `num_video_frames_per_chunk`, `max_frames`; the report records what each field set.
/// Fields that need parts not ported are refused naming the field.
#[test]
fn transfer_params_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let spec_dir = tmp.path().join("spec");
    std::fs::create_dir_all(&spec_dir)?;
    let video = spec_dir.join("input_frames");
    std::fs::create_dir_all(&video)?;
    for entry in std::fs::read_dir(fixtures().join("cosmos_condition_video"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), video.join(entry.file_name()))?;
    }
    let write = |name: &str, json: serde_json::Value| -> Result<PathBuf> {
        let path = spec_dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
        Ok(path)
    };
    let spec = write(
        "robot_edge_spec.json",
        serde_json::json!({
            "name": "robot_edge",
            "prompt": "a robot arm",
            "video_path": "input_frames",
            "guidance": 3,
            "seed": 7,
            "max_frames": 6,
            "num_video_frames_per_chunk": 5,
            "num_conditional_frames": 1,
            "edge": {"control_weight": 0.6, "preset_edge_threshold": "low"},
            "show_control_condition": true
        }),
    )?;
    let dir = tmp.path().join("run");
    let mut a = args(&dir, &["--steps", "2", "-i", &spec.display().to_string()]);
    for flag in ["--latents", "--num-frames", "--chunk-frames"] {
        let at = a.iter().position(|x| x == flag).context("flag")?;
        a.drain(at..at + 2);
    }
    let out = sampler(&a)?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("edge control (low preset)"), "{text}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json"))?)?;
    assert_eq!(report["num_frames"], 6);
    assert_eq!(report["chunks"]["chunks"], serde_json::json!([[0, 5], [4, 6]]));
    assert_eq!(report["controls"][0]["kind"], "edge");
    assert_eq!(report["controls"][0]["conditioning_scale"], 0.6);
    assert_eq!(report["edge_threshold"], "low");
    assert_eq!(report["seed"], 7);
    let set = report["params_file"]["set"].to_string();
    for field in ["video_path", "max_frames", "num_video_frames_per_chunk", "edge → --control"] {
        assert!(set.contains(field), "{field} not in {set}");
    }
    assert!(report["params_file"]["ignored"].to_string().contains("show_control_condition"));

    for (name, json, field) in [
        ("mask.json", serde_json::json!({"video_path": "input_frames", "edge": {"mask_prompt": "car"}}), "edge"),
        ("depth.json", serde_json::json!({"video_path": "input_frames", "depth": {}}), "depth.control_path"),
        (
            "context.json",
            serde_json::json!({"video_path": "input_frames", "context_frame_index": 3}),
            "context_frame_index",
        ),
        (
            "weight.json",
            serde_json::json!({"video_path": "input_frames", "vis": {"control_weight": 1.5}}),
            "vis.control_weight",
        ),
        (
            "preset.json",
            serde_json::json!({"video_path": "input_frames", "vis": {"preset_edge_threshold": "low"}}),
            "vis.preset_edge_threshold",
        ),
    ] {
        let path = write(name, json)?;
        let dir = tmp.path().join(format!("run-{name}"));
        let out = sampler(&args(&dir, &["-i", &path.display().to_string()]))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(&format!("field `{field}`")), "{name}: {stderr}");
        assert!(!dir.exists());
    }
    Ok(())
}
