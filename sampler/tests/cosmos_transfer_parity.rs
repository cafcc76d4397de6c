//! End-to-end parity of the Cosmos-Transfer2.5 pipeline with diffusers 0.42.1: a tiny random
//! `Cosmos2_5_TransferPipeline` in the fake Hugging Face cache (`tests/fixtures/hf_cache`, made by
//! `tests/fixtures/make_cosmos_transfer_pipeline_fixture.py`), run offline by repository name
//! with injected latents and prompt embeddings, CFG on, a control video over two autoregressive
//! chunks: each chunk's control latents, conditioning and final latents, the joined latents
//! (within 1e-4 relative) and the video (within 2/255) match diffusers'.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use sampler::cosmos::controlnet::ConditioningScale;
use sampler::cosmos::pipeline::{self, CosmosPipeline, Repository};
use sampler::cosmos::transfer::{ChunkPlan, ControlVideo, TransferRequest, TransferRun};
use shared::device::test_device;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn offline_hub(repo: &str) -> Repository {
    let hub = shared::weights::HubOptions { cache_dir: fixtures().join("hf_cache"), offline: true };
    Repository::Hub { repo: repo.into(), revision: "main".into(), hub }
}

fn case() -> Result<serde_json::Value> {
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cosmos_transfer_cases.json"))?)?;
    all["cases"].as_array().and_then(|c| c.first()).cloned().context("no case")
}

fn reference() -> Result<HashMap<String, Tensor>> {
    let all = shared::weights::read_safetensors(&fixtures().join("cosmos_transfer_cases.safetensors"), &test_device())?;
    Ok(all.into_iter().filter_map(|(k, t)| k.strip_prefix("transfer25.").map(|k| (k.to_string(), t))).collect())
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    anyhow::ensure!(got.dims() == want.dims(), "shape {:?} vs {:?}", got.dims(), want.dims());
    Ok(max_abs(&(got.to_dtype(DType::F64)? - want.to_dtype(DType::F64)?)?)? / max_abs(want)?.max(1e-30))
}

/// The fixture's pipeline and request (control scale overridable, to show the control matters).
fn load(scale: f64) -> Result<(CosmosPipeline, TransferRequest)> {
    let case = case()?;
    let dev = test_device();
    let text = |key: &str| case[key].as_str().unwrap_or_default().to_string();
    let number = |key: &str| case[key].as_u64().unwrap_or(0) as usize;
    let pipe = CosmosPipeline::load_from(offline_hub(&text("model")), DType::F32, &dev)?;
    let (h, w) = (number("height"), number("width"));
    let control = pipeline::load_conditioning(&fixtures().join(text("controls")), h, w, &dev)?;
    let (prompt, negative) = pipeline::read_prompt_embeds(&fixtures().join(text("prompt_embeds")), &dev)?;
    let chunk = number("num_frames_per_chunk");
    let latents = pipeline::read_latents(&fixtures().join(text("latents")), &pipe.latent_shape(1, chunk, h, w), &dev)?;
    let req = TransferRequest {
        controls: vec![ControlVideo {
            name: "edge".into(),
            video: control,
            controlnet: 0,
            scale: ConditioningScale::All(scale),
        }],
        prompt_embeds: prompt,
        negative_prompt_embeds: negative,
        num_frames: number("num_frames"),
        chunk_frames: chunk,
        conditional_frames: 1,
        steps: number("num_inference_steps"),
        guidance: case["guidance_scale"].as_f64().unwrap_or(0.0),
        latents,
    };
    Ok((pipe, req))
}

#[test]
fn chunk_plan_is_diffusers() -> Result<()> {
    let case = case()?;
    let plan = ChunkPlan::new(17, 9, 1, 4)?;
    let want: Vec<(usize, usize)> = serde_json::from_value(case["chunks"].clone())?;
    assert_eq!(plan.chunks, want);
    assert_eq!(plan.conditional_latent_frames, 1);
    // diffusers' range(0, F − 1, 8) at other lengths, and the refusals.
    assert_eq!(ChunkPlan::new(9, 9, 1, 4)?.chunks, vec![(0, 9)]);
    assert_eq!(ChunkPlan::new(10, 9, 1, 4)?.chunks, vec![(0, 9), (8, 10)]);
    assert_eq!(ChunkPlan::new(5, 93, 1, 4)?.chunks, vec![(0, 5)]);
    assert_eq!(ChunkPlan::new(1, 93, 1, 4)?.chunks, vec![(0, 1)]);
    assert_eq!(ChunkPlan::new(186, 93, 1, 4)?.chunks, vec![(0, 93), (92, 185), (184, 186)]);
    assert!(ChunkPlan::new(17, 4, 1, 4).is_err());
    assert!(ChunkPlan::new(17, 9, 9, 4).is_err());
    assert!(ChunkPlan::new(0, 9, 1, 4).is_err());
    Ok(())
}

#[test]
fn transfer_pipeline_matches_diffusers_over_two_chunks() -> Result<()> {
    let (pipe, req) = load(case()?["controls_conditioning_scale"].as_f64().unwrap_or(0.0))?;
    let r = reference()?;
    let get = |k: &str| r.get(k).with_context(|| format!("reference {k}"));
    let mut run = TransferRun::new(&pipe, Vec::new(), req)?;
    assert_eq!(run.plan.chunks.len(), 2);
    let z0 = run.request().latents.clone();
    while let Some(k) = run.next_chunk() {
        let prepared = run.prepare_chunk()?;
        let traj = prepared.trajectory();
        let latents = traj.sample(&z0, &vec![None; traj.num_steps()])?;
        drop(traj);
        drop(prepared);
        let err = rel_err(&latents, get(&format!("chunk{k}.final_latents"))?)?;
        println!("chunk {k}: final latents rel error {err:.2e}");
        assert!(err < 1e-4, "chunk {k}: final latents off by {err:.3e}");
        run.finish_chunk(&latents)?;
        let decoded = run.chunk_videos.last().context("decoded")?;
        // In [−1, 1]: the video's tolerance, 2/255 in [0, 1], is 4/255 here. (The tiny random
        // decoder amplifies latent differences ~35×: 2.3e-6 → 8e-5 on chunk 0.)
        let want = get(&format!("chunk{k}.video_decoded"))?;
        let err = max_abs(&(decoded.to_dtype(DType::F64)? - want.to_dtype(DType::F64)?)?)?;
        println!("chunk {k}: decoded video max |Δ| {err:.2e}");
        assert!(err <= 4.0 / 255.0, "chunk {k}: decoded video off by {err:.3e}");
    }
    let (latents, video) = run.outputs()?;
    let latent_err = rel_err(&latents, get("final_latents")?)?;
    let expected_video = get("video")?.permute((0, 4, 1, 2, 3))?;
    let video_err = max_abs(&(video.to_dtype(DType::F64)? - expected_video.to_dtype(DType::F64)?)?)?;
    println!("joined: latents rel error {latent_err:.2e}, video max |Δ| {video_err:.2e} (2/255 = {:.2e})", 2.0 / 255.0);
    assert!(latent_err < 1e-4, "joined latents off by {latent_err:.3e}");
    assert!(video_err <= 2.0 / 255.0, "video off by {video_err:.3e}");
    Ok(())
}

/// The inputs each chunk's denoiser builds — control latents, condition mask, the DiT's first
/// input and timestep — are diffusers' (checked through the first denoiser call's inputs).
#[test]
fn chunk_inputs_match_diffusers() -> Result<()> {
    let (pipe, req) = load(0.8)?;
    let r = reference()?;
    let get = |k: &str| r.get(k).with_context(|| format!("reference {k}"));
    let mut run = TransferRun::new(&pipe, Vec::new(), req)?;
    // Chunk 0's control latents: the control video's first 9 frames, encoded.
    let control = run.request().controls[0].video.clone();
    let clip = control.narrow(2, 0, 9)?;
    let ours = pipe.vae.normalize_latents(pipe.vae.encode(&clip)?.mode())?;
    let err = rel_err(&ours, get("chunk0.controls_latents")?)?;
    println!("chunk 0 control latents rel error {err:.2e}");
    assert!(err < 1e-5);
    // Chunk 1 from diffusers' own chunk-0 latents: its control latents and conditioning.
    run.finish_chunk(get("chunk0.final_latents")?)?;
    let clip = control.narrow(2, 8, 9)?;
    let ours = pipe.vae.normalize_latents(pipe.vae.encode(&clip)?.mode())?;
    let err = rel_err(&ours, get("chunk1.controls_latents")?)?;
    println!("chunk 1 control latents rel error {err:.2e}");
    assert!(err < 1e-5);
    let mask = get("chunk1.condition_mask")?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let per_frame = 4 * 6;
    assert!(mask[..per_frame].iter().all(|m| *m == 1.0) && mask[per_frame..].iter().all(|m| *m == 0.0));
    // The DiT's first input on chunk 1: the conditioning latents on latent frame 0.
    let previous = run.chunk_videos.last().context("chunk 0 video")?;
    let (c, n) = pipe.conditioning_latents(previous, 1)?;
    assert_eq!(n, 1);
    let want = get("chunk1.step0.hidden_states")?.narrow(2, 0, 1)?;
    let err = rel_err(&c, &want)?;
    println!("chunk 1 conditioning latent frame rel error {err:.2e}");
    assert!(err < 1e-4);
    let t = get("chunk1.step0.timestep")?.flatten_all()?.to_vec1::<f32>()?;
    assert!((t[0] - 0.1).abs() < 1e-7, "conditional_frame_timestep {t:?}");
    Ok(())
}

/// The control branch matters far beyond the tolerance: without it (scale 0) the first chunk's
/// latents miss diffusers' by much more than 1e-4.
#[test]
fn the_control_branch_changes_the_result_beyond_the_tolerance() -> Result<()> {
    let (pipe, req) = load(0.0)?;
    let r = reference()?;
    let mut run = TransferRun::new(&pipe, Vec::new(), req)?;
    let z0 = run.request().latents.clone();
    let prepared = run.prepare_chunk()?;
    let traj = prepared.trajectory();
    let latents = traj.sample(&z0, &vec![None; traj.num_steps()])?;
    let err = rel_err(&latents, r.get("chunk0.final_latents").context("reference")?)?;
    println!("control scale 0: chunk 0 latents differ by {err:.2e} relative");
    assert!(err > 100.0 * 1e-4, "{err:.3e}");
    drop(traj);
    drop(prepared);
    run.finish_chunk(&latents)?;
    Ok(())
}
