//! End-to-end parity of the Cosmos pipelines with diffusers 0.42.1: tiny random pipelines saved
//! in diffusers' layout inside a fake Hugging Face cache (`tests/fixtures/hf_cache`, made by
//! `tests/fixtures/make_cosmos_pipeline_fixture.py` with the conditioning latents taken as the
//! posterior mean), run offline by repository name with injected latents and prompt embeddings,
//! CFG on, at a non-square size: final latents within 1e-4 relative, video within 2/255 (diffusers'
//! video passes through uint8 in its safety-check step).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use sampler::cosmos::pipeline::{self, CosmosPipeline, GenerateRequest, Repository};
use shared::device::test_device;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn offline_hub(repo: &str) -> Repository {
    let hub = shared::weights::HubOptions { cache_dir: fixtures().join("hf_cache"), offline: true };
    Repository::Hub { repo: repo.into(), revision: "main".into(), hub }
}

fn cases() -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixtures().join("cosmos_pipeline_cases.json"))?)?)
}

fn reference(name: &str) -> Result<std::collections::HashMap<String, Tensor>> {
    let all = shared::weights::read_safetensors(&fixtures().join("cosmos_pipeline_cases.safetensors"), &test_device())?;
    Ok(all.into_iter().filter_map(|(k, t)| k.strip_prefix(&format!("{name}.")).map(|k| (k.to_string(), t))).collect())
}

/// `--device` and `--dtype` for the CLI runs: the device the tests run on (`WORLDGRAD_TEST_DEVICE`,
/// the CPU when unset) in f32, the references' precision (on CUDA the CLI's default is bf16).
fn cli_device_args() -> [String; 4] {
    let device = std::env::var(shared::device::TEST_DEVICE_ENV).unwrap_or_else(|_| "cpu".into());
    ["--device".into(), device, "--dtype".into(), "f32".into()]
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// A fixture case's pipeline (loaded offline by repository name, in `dtype`) and request: the
/// conditioning from `conditioning` (a file or folder under fixtures/), the case's size, steps,
/// guidance, fps, latents, prompt embeddings and conditioning latent frames.
fn case_request(
    case: &serde_json::Value,
    conditioning: &str,
    dtype: DType,
) -> Result<(CosmosPipeline, GenerateRequest)> {
    let dev = test_device();
    let text = |key: &str| case[key].as_str().unwrap_or_default().to_string();
    let number = |key: &str| case[key].as_u64().unwrap_or(0) as usize;
    let pipe = CosmosPipeline::load_from(offline_hub(&text("model")), dtype, &dev)?;
    let (h, w, num_frames) = (number("height"), number("width"), number("num_frames"));
    let video = pipeline::load_conditioning(&fixtures().join(conditioning), h, w, &dev)?;
    let (prompt, negative) = pipeline::read_prompt_embeds(&fixtures().join(text("prompt_embeds")), &dev)?;
    let shape = pipe.latent_shape(1, num_frames, h, w);
    let latents = pipeline::read_latents(&fixtures().join(text("latents")), &shape, &dev)?;
    let req = GenerateRequest {
        video,
        prompt_embeds: prompt,
        negative_prompt_embeds: negative,
        num_frames,
        steps: number("num_inference_steps"),
        guidance: case["guidance_scale"].as_f64().unwrap_or(0.0),
        fps: case["fps_passed_to_transformer"].as_f64(),
        latents,
        condition_latent_frames: case["condition_latent_frames"].as_u64().map(|n| n as usize),
    };
    Ok((pipe, req))
}

/// One case of the fixture, in `dtype`: (latent relative error, video max |Δ|).
fn pipeline_case(name: &str, dtype: DType) -> Result<(f64, f64)> {
    let cases = cases()?;
    let case = cases["cases"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no case {name}"))?;
    let (pipe, req) = case_request(case, case["image"].as_str().unwrap_or_default(), dtype)?;
    let (final_latents, video) = pipe.generate(&req)?;
    let r = reference(name)?;
    let expected = r.get("final_latents").context("final_latents")?;
    let latent_err =
        max_abs(&(final_latents.to_dtype(DType::F64)? - expected.to_dtype(DType::F64)?)?)? / max_abs(expected)?;
    // diffusers' video: (B, F, H, W, 3) in [0, 1].
    let expected_video = r.get("video").context("video")?.permute((0, 4, 1, 2, 3))?;
    let video_err = max_abs(&(video.to_dtype(DType::F64)? - expected_video.to_dtype(DType::F64)?)?)?;
    println!(
        "{name} {dtype:?}: final latents rel error {latent_err:.2e}, video max |Δ| {video_err:.2e} (2/255 = {:.2e})",
        2.0 / 255.0
    );
    Ok((latent_err, video_err))
}

#[test]
fn predict2_matches_diffusers_with_fps() -> Result<()> {
    let (latents, video) = pipeline_case("predict2_fps16", DType::F32)?;
    assert!(latents < 1e-4, "final latents off by {latents:.3e}");
    assert!(video <= 2.0 / 255.0, "video off by {video:.3e}");
    Ok(())
}

#[test]
fn predict2_matches_diffusers_without_fps() -> Result<()> {
    let (latents, video) = pipeline_case("predict2_nofps", DType::F32)?;
    assert!(latents < 1e-4, "final latents off by {latents:.3e}");
    assert!(video <= 2.0 / 255.0, "video off by {video:.3e}");
    Ok(())
}

/// Predict2.5: UniPC (bh2) on diffusers' Karras flow sigmas, the conditioning frames' velocity
/// fixed from the initial noise, CFG, image conditioning with black frames after it.
#[test]
fn predict25_matches_diffusers() -> Result<()> {
    let (latents, video) = pipeline_case("predict25", DType::F32)?;
    assert!(latents < 1e-4, "final latents off by {latents:.3e}");
    assert!(video <= 2.0 / 255.0, "video off by {video:.3e}");
    Ok(())
}

/// Each repository's scheduler config, mapped onto our schedules, gives the σ levels diffusers'
/// scheduler had during the fixture's run (flow time t = σ/(1 + σ); float32 there).
#[test]
fn scheduler_configs_give_diffusers_sigmas() -> Result<()> {
    for (name, flow_time) in [("predict2_nofps", false), ("predict25", true)] {
        let cases = cases()?;
        let case = cases["cases"].as_array().and_then(|c| c.iter().find(|c| c["name"] == name)).context("case")?;
        let pipe = CosmosPipeline::load_from(
            offline_hub(case["model"].as_str().unwrap_or_default()),
            DType::F32,
            &test_device(),
        )?;
        let steps = case["num_inference_steps"].as_u64().unwrap_or(0) as usize;
        let ours = pipe.scheduler.schedule(steps)?.sigmas;
        let theirs = reference(name)?.get("sigmas").context("sigmas")?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        assert_eq!(ours.len(), theirs.len(), "{name}: {ours:?} vs {theirs:?}");
        for (a, b) in ours.iter().zip(&theirs) {
            // Predict2's scheduler.sigmas are EDM σ; Predict2.5's flow times.
            let a = if flow_time { a / (1.0 + a) } else { *a };
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{name}: σ {a} vs diffusers {b}");
        }
        println!("{name}: {} levels as diffusers' ({:?})", ours.len(), pipe.scheduler);
    }
    Ok(())
}

/// The two Predict2 references differ (fps reaches the temporal RoPE), so passing fps or not is
/// something the parity above can see.
#[test]
fn fps_changes_diffusers_result_beyond_the_tolerance() -> Result<()> {
    let (a, b) = (reference("predict2_fps16")?, reference("predict2_nofps")?);
    let (a, b) = (a.get("final_latents").context("a")?, b.get("final_latents").context("b")?);
    let rel = max_abs(&(a - b)?)? / max_abs(b)?;
    println!("fps 16 vs none: final latents differ by {rel:.2e} relative");
    assert!(rel > 100.0 * 1e-4, "{rel:.3e}");
    Ok(())
}

/// The command line as a user runs it: `sampler cosmos --model ORG/NAME` with `HF_HUB_OFFLINE=1`
/// and the fixture cache as `HF_HUB_CACHE`, the fixture's latents and embeddings: the written
/// `latents.safetensors` and `video.safetensors` match diffusers; a second run into the same
/// directory is refused without `--overwrite` and leaves the files as they were.
#[test]
fn cli_matches_diffusers_from_the_hub_cache_offline() -> Result<()> {
    let out = tempfile::tempdir()?;
    let dir = out.path().join("run");
    let f = |name: &str| fixtures().join(name).display().to_string();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "cosmos",
            "--model",
            "worldgrad-test/tiny-cosmos-predict2",
            "--image",
            &f("cosmos_condition.png"),
            "--prompt-embeds",
            &f("cosmos_prompt_embeds_predict2.safetensors"),
            "--latents",
            &f("cosmos_latents_predict2.safetensors"),
            "--height",
            "32",
            "--width",
            "48",
            "--num-frames",
            "9",
            "--steps",
            "4",
            "--guidance",
            "3",
            "-o",
            &dir.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(cli_device_args());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: &[String]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sampler"))
            .args(a)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HUB_CACHE", fixtures().join("hf_cache"))
            .env_remove("HF_HOME")
            .env("RUST_BACKTRACE", "0")
            .output()
    };
    let first = run(&args(&[]))?;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let read = |file: &str, key: &str| -> Result<Tensor> {
        shared::weights::read_safetensors(&dir.join(file), &test_device())?.remove(key).context(key.to_string())
    };
    let r = reference("predict2_nofps")?;
    let expected = r.get("final_latents").context("final_latents")?;
    let latents = read("latents.safetensors", "latents")?;
    assert!(max_abs(&(&latents - expected)?)? / max_abs(expected)? < 1e-4);
    let video = read("video.safetensors", "video")?;
    assert_eq!(video.dims(), &[1, 3, 9, 32, 48]);
    let expected_video = r.get("video").context("video")?.permute((0, 4, 1, 2, 3))?;
    assert!(max_abs(&(&video - expected_video)?)? <= 2.0 / 255.0);
    for file in ["frames.png", "frames.gif", "report.json"] {
        assert!(dir.join(file).metadata()?.len() > 0, "{file}");
    }

    let before = std::fs::read(dir.join("latents.safetensors"))?;
    let again = run(&args(&["--fps", "16"]))?;
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("not empty") && stderr.contains("--overwrite"), "{stderr}");
    assert_eq!(std::fs::read(dir.join("latents.safetensors"))?, before, "a refused run changed the outputs");

    // --prompt and --prompt-embeds together are refused before anything runs.
    let both = run(&args(&["--prompt", "a robot", "--overwrite"]))?;
    assert_eq!(both.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&both.stderr).contains("not both"));
    Ok(())
}

/// `--prompt TEXT` through the repository's T5 encoder (Rust) gives what diffusers' own prompt
/// embeddings give: the same run with `--prompt-embeds` holding diffusers'
/// `_get_t5_prompt_embeds` of that prompt and of the default negative prompt (fixture
/// `t5.prompt{0,1}`) writes the same latents, to the T5 parity's rounding.
#[test]
fn cli_prompt_through_t5_matches_diffusers_prompt_embeddings() -> Result<()> {
    let cases = cases()?;
    let prompt = cases["t5_prompts"][0].as_str().context("t5 prompt")?.to_string();
    let t5 = shared::weights::read_safetensors(&fixtures().join("cosmos_pipeline_cases.safetensors"), &test_device())?;
    let tmp = tempfile::tempdir()?;
    let embeds = tmp.path().join("diffusers_t5.safetensors");
    let map = std::collections::HashMap::from([
        ("prompt_embeds".to_string(), t5.get("t5.prompt0.prompt_embeds").context("t5 prompt0")?.clone()),
        ("negative_prompt_embeds".to_string(), t5.get("t5.prompt1.prompt_embeds").context("t5 prompt1")?.clone()),
    ]);
    shared::weights::save_tensors_atomic(&map, &embeds)?;
    let f = |name: &str| fixtures().join(name).display().to_string();
    let run = |text: &[&str], out: &str| -> Result<Tensor> {
        let dir = tmp.path().join(out);
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_sampler"))
            .args(["cosmos", "--model", "worldgrad-test/tiny-cosmos-predict2", "--image"])
            .arg(f("cosmos_condition.png"))
            .args(text)
            .arg("--latents")
            .arg(f("cosmos_latents_predict2.safetensors"))
            .args(["--height", "32", "--width", "48", "--num-frames", "9", "--steps", "4", "--guidance", "3", "-o"])
            .arg(&dir)
            .args(cli_device_args())
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HUB_CACHE", fixtures().join("hf_cache"))
            .env_remove("HF_HOME")
            .output()?;
        anyhow::ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        shared::weights::read_safetensors(&dir.join("latents.safetensors"), &test_device())?
            .remove("latents")
            .context("latents")
    };
    let from_text = run(&["--prompt", &prompt], "text")?;
    let from_embeds = run(&["--prompt-embeds", &embeds.display().to_string()], "embeds")?;
    let rel = max_abs(&(&from_text - &from_embeds)?)? / max_abs(&from_embeds)?;
    println!("--prompt vs diffusers' T5 embeddings: final latents differ by {rel:.2e} relative");
    assert!(rel < 1e-4, "{rel:.3e}");
    Ok(())
}

/// `sampler cosmos` on the Predict2.5 repository (the class in its model_index.json picks the
/// pipeline, its scheduler config the UniPC sampler): the written latents match diffusers'.
#[test]
fn cli_runs_predict25_from_the_hub_cache_offline() -> Result<()> {
    let out = tempfile::tempdir()?;
    let dir = out.path().join("run");
    let f = |name: &str| fixtures().join(name).display().to_string();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sampler"))
        .args(["cosmos", "--model", "worldgrad-test/tiny-cosmos-predict25", "--image"])
        .arg(f("cosmos_condition.png"))
        .arg("--prompt-embeds")
        .arg(f("cosmos_prompt_embeds_predict25.safetensors"))
        .arg("--latents")
        .arg(f("cosmos_latents_predict25.safetensors"))
        .args(["--height", "32", "--width", "48", "--num-frames", "9", "--steps", "4", "--guidance", "3", "-o"])
        .arg(&dir)
        .args(cli_device_args())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", fixtures().join("hf_cache"))
        .env_remove("HF_HOME")
        .output()?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let latents = shared::weights::read_safetensors(&dir.join("latents.safetensors"), &test_device())?
        .remove("latents")
        .context("latents")?;
    let r = reference("predict25")?;
    let expected = r.get("final_latents").context("final_latents")?;
    let rel = max_abs(&(&latents - expected)?)? / max_abs(expected)?;
    assert!(rel < 1e-4, "CLI Predict2.5 latents off by {rel:.3e}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json"))?)?;
    assert_eq!(report["pipeline"], "Predict25");
    assert_eq!(report["scheduler"]["class"], "UniPCMultistepScheduler");
    Ok(())
}

/// A scheduler setting the port does not implement is refused, naming the file and the field.
#[test]
fn unsupported_scheduler_settings_are_refused_by_name() -> Result<()> {
    use sampler::cosmos::pipeline::{PipelineKind, SchedulerSetup};
    let snapshot =
        std::fs::read_dir(fixtures().join("hf_cache/models--worldgrad-test--tiny-cosmos-predict25/snapshots"))?
            .next()
            .context("snapshot")??
            .path();
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(snapshot.join("scheduler/scheduler_config.json"))?)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("scheduler_config.json");
    for (field, value) in [
        ("solver_order", serde_json::json!(3)),
        ("prediction_type", serde_json::json!("epsilon")),
        ("use_flow_sigmas", serde_json::json!(false)),
        ("final_sigmas_type", serde_json::json!("sigma_min")),
        ("sigma_min", serde_json::json!(-1.0)),
    ] {
        let mut cfg = good.clone();
        cfg[field] = value;
        std::fs::write(&path, serde_json::to_string(&cfg)?)?;
        let err = SchedulerSetup::from_config(PipelineKind::Predict25, &path).expect_err(field).to_string();
        assert!(err.contains(field) && err.contains("scheduler_config.json"), "{field}: {err}");
    }
    std::fs::write(&path, serde_json::to_string(&good)?)?;
    let err = SchedulerSetup::from_config(PipelineKind::Predict2VideoToWorld, &path).expect_err("class").to_string();
    assert!(err.contains("UniPCMultistepScheduler") && err.contains("FlowMatchEulerDiscreteScheduler"), "{err}");
    Ok(())
}

/// Video conditioning (tests/fixtures/make_cosmos_video_fixture.py: a 6-frame folder of PNGs):
/// Predict2.5 with 2 and 1 conditioning latent frames (the last 5 or 1 frames), Predict2 with the
/// whole clip padded by its last frame (2 latent frames): final latents within 1e-4 relative,
/// video within 2/255 of diffusers'.
#[test]
fn video_conditioning_matches_diffusers() -> Result<()> {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cosmos_pipeline_video_cases.json"))?)?;
    let all =
        shared::weights::read_safetensors(&fixtures().join("cosmos_pipeline_video_cases.safetensors"), &test_device())?;
    let cases = cases["cases"].as_array().context("cases")?;
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["name"].as_str().context("name")?;
        let get = |key: &str| all.get(&format!("{name}.{key}")).cloned().with_context(|| format!("{name}.{key}"));
        let (pipe, req) = case_request(case, case["video_dir"].as_str().unwrap_or_default(), DType::F32)?;
        assert_eq!(req.video.dim(2)?, 6);
        let (final_latents, video) = pipe.generate(&req)?;
        let expected = get("final_latents")?;
        let rel = max_abs(&(&final_latents - &expected)?)? / max_abs(&expected)?;
        let expected_video = (get("video_u8")?.to_dtype(DType::F32)? / 255.0)?.permute((0, 4, 1, 2, 3))?;
        let video_err = max_abs(&(&video - &expected_video)?)?;
        let cond_frames = get("condition_mask")?.narrow(3, 0, 1)?.narrow(4, 0, 1)?.sum_all()?.to_scalar::<f32>()?;
        println!(
            "{name}: {cond_frames} conditioning latent frames; final latents rel {rel:.2e}, video {video_err:.2e}"
        );
        assert!(rel < 1e-4, "{name}: final latents off by {rel:.3e}");
        assert!(video_err <= 2.0 / 255.0, "{name}: video off by {video_err:.3e}");
    }
    Ok(())
}

/// `--dry-run` for the real 2B Predict2 and Predict2.5 configs (a repository holding only their
/// config files: the plan reads nothing else) at 704×1280×93 and 480×832×93 in bf16: exit 0,
/// nothing written, the DiT's parameter count as diffusers' model has it (the meta-device key
/// lists, `parameter_count`), and the peak the plan prints is at least the weights plus the
/// stored latents. The calibration of the plan against measured peaks is in
/// tests/cosmos_memory_plan.rs.
#[test]
fn dry_run_plans_the_real_2b_models_without_loading_anything() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for (stem, class) in [
        ("cosmos_predict2_2b_video2world", "Cosmos2VideoToWorldPipeline"),
        ("cosmos_predict25_2b", "Cosmos2_5_PredictBasePipeline"),
    ] {
        let repo = tmp.path().join(stem);
        std::fs::create_dir_all(repo.join("transformer"))?;
        std::fs::create_dir_all(repo.join("vae"))?;
        std::fs::write(repo.join("model_index.json"), format!("{{\"_class_name\": \"{class}\"}}"))?;
        std::fs::copy(fixtures().join(format!("{stem}_config.json")), repo.join("transformer/config.json"))?;
        std::fs::copy(fixtures().join("wan2_1_vae_config.json"), repo.join("vae/config.json"))?;
        let keys: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("{stem}_keys.json")))?)?;
        let parameters = keys["parameter_count"].as_f64().context("parameter_count")?;
        for (h, w) in [(704, 1280), (480, 832)] {
            let out = tmp.path().join("never-written");
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_sampler"))
                .args(["cosmos", "--model"])
                .arg(&repo)
                .args(["--dry-run", "--dtype", "bf16", "--num-frames", "93"])
                .args(["--height", &h.to_string(), "--width", &w.to_string(), "-o"])
                .arg(&out)
                .output()?;
            let text =
                format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
            assert!(output.status.success(), "{text}");
            assert!(!out.exists(), "--dry-run created the output directory");
            let line = |name: &str| -> Result<Vec<f64>> {
                let l = text
                    .lines()
                    .find(|l| l.trim_start().starts_with(name))
                    .with_context(|| format!("{name}: {text}"))?;
                Ok(l.split_whitespace().filter_map(|t| t.trim_end_matches("·10⁹").parse::<f64>().ok()).collect())
            };
            let dit = line("weights: DiT")?;
            assert!((dit[1] * 1e9 - parameters).abs() <= 1e-3 * parameters, "{stem}: {dit:?} vs {parameters}");
            let gib = 1024f64.powi(3);
            assert!((dit[0] - parameters * 2.0 / gib).abs() < 0.01, "{stem}: bf16 weights {dit:?}");
            let peak = line("peak")?[0];
            let latents = 16.0 * 24.0 * (h / 8) as f64 * (w / 8) as f64 * 2.0 / gib;
            assert!(peak > dit[0] + 36.0 * latents, "{stem} {h}×{w}: peak {peak}");
            println!("{stem} {h}×{w}×93 bf16: predicted peak {peak:.1} GiB");
        }
    }
    Ok(())
}
