//! `cosmos::memory_plan` against measured heap peaks, and its figures for the real models.
//!
//! The measured side: one z0 optimisation iteration (value + ∇z0, per-step recomputation) of the
//! Predict2 loop — `Predict2Denoiser` with a conditioning frame, CFG, Karras flow-match Euler —
//! over a small random-weight DiT, f32 on the CPU, the heap counted by `CountingAllocator` above
//! the baseline taken after the models and inputs are built (the weights are in the baseline,
//! so the prediction compared is the plan's working memory: trajectory + the larger VJP). And the
//! Wan VAE decode VJP (`decode_taped` + `DecodeTape::vjp`) of a narrow VAE with the real layout.
//!
//! Everything runs in one test: the allocator's counters are global, parallel tests would add to
//! each other's peaks.

use anyhow::Result;
use candle_core::{DType, Device};
use sampler::cosmos::memory_plan::{MemoryPlan, PlanRequest};
use sampler::cosmos::pipeline::{Predict2Denoiser, PREDICT2_SIGMA_MAX, PREDICT2_SIGMA_MIN};
use sampler::cosmos::transformer::{Config, CosmosTransformer3DModel, MemoryMode};
use sampler::cosmos::vae::{AutoencoderKLWan, Config as VaeConfig};
use sampler::denoiser::{ClassifierFreeGuidance, Conditioning, Denoiser};
use sampler::noise::Churn;
use sampler::objective::TargetMse;
use sampler::schedule::Schedule;
use sampler::solver::SolverKind;
use sampler::trajectory::{GradMode, Trajectory};
use shared::rng::SplitMix64;

#[global_allocator]
static ALLOCATOR: shared::memory::CountingAllocator = shared::memory::CountingAllocator;

const MB: f64 = 1024.0 * 1024.0;

/// A small DiT with the 2B Predict2 layout (17 input channels with the condition mask, padding
/// mask, patch 1×2×2, no learnable positional embedding) and `layers` blocks of width `heads`×32.
fn small_dit(layers: usize, heads: usize) -> Config {
    Config {
        in_channels: 17,
        out_channels: 16,
        num_attention_heads: heads,
        attention_head_dim: 32,
        num_layers: layers,
        text_embed_dim: 32,
        adaln_lora_dim: 8,
        extra_pos_embed_type: None,
        ..Config::default()
    }
}

/// The measured heap peak (bytes above the baseline) of one iteration, the second in a row.
fn measure_iteration(cfg: &Config, vae: &VaeConfig, req: &PlanRequest) -> Result<usize> {
    let dev = Device::Cpu;
    let mut model = CosmosTransformer3DModel::random(cfg, 1, req.dtype, &dev)?;
    model.set_memory_mode(req.dit)?;
    let s = vae.spatial_factor();
    let shape = [1, vae.z_dim, vae.latent_frames(req.num_frames), req.height / s, req.width / s];
    let mut rng = SplitMix64::new(2);
    let conditioning = rng.normal_tensor(&shape[..], req.dtype, &dev)?;
    let prompt = rng.normal_tensor((1, req.context_tokens, cfg.text_embed_dim), req.dtype, &dev)?;
    let negative = rng.normal_tensor((1, req.context_tokens, cfg.text_embed_dim), req.dtype, &dev)?;
    let target = rng.normal_tensor(&shape[..], DType::F32, &dev)?;
    let z0 = rng.normal_tensor(&shape[..], DType::F32, &dev)?;
    let inner = Predict2Denoiser::new(&model, conditioning, 1, None)?;
    let (z0, target) = (z0.to_dtype(req.dtype)?, target.to_dtype(req.dtype)?);
    let denoiser: Box<dyn Denoiser> = if req.guidance {
        Box::new(ClassifierFreeGuidance { inner, scale: 7.0, uncond_context: Some(negative) })
    } else {
        Box::new(inner)
    };
    let schedule = Schedule::karras_flow_match(req.steps, PREDICT2_SIGMA_MIN, PREDICT2_SIGMA_MAX, 7.0)?;
    let plan = Churn::default().plan(&schedule.sigmas, false);
    let solver = SolverKind::Euler.build();
    let cond = Conditioning { frames: None, mask: None, context: Some(prompt), initial_noise: None };
    let traj = Trajectory { denoiser: denoiser.as_ref(), solver: solver.as_ref(), cond: &cond, schedule, plan };
    measure_peak(&traj, &z0, TargetMse { target, label: "random target".into() })
}

/// The heap peak (bytes above the baseline) of one value-and-∇z0 iteration of `traj`, the
/// second in a row.
fn measure_peak(traj: &Trajectory, z0: &candle_core::Tensor, objective: TargetMse) -> Result<usize> {
    let noises = vec![None; traj.num_steps()];
    // A first iteration allocates what stays (thread pools, GEMM buffers): the plan is about the
    // second.
    traj.value_and_grad(z0, &noises, &objective, GradMode::Recompute)?;
    let base = shared::memory::reset_peak();
    let vg = traj.value_and_grad(z0, &noises, &objective, GradMode::Recompute)?;
    let peak = shared::memory::peak_bytes().saturating_sub(base);
    let norm = vg.grad_z0.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    anyhow::ensure!(norm > 0.0 && norm.is_finite(), "degenerate gradient (norm² {norm})");
    Ok(peak)
}

/// A small Transfer2.5 pair: the DiT of [`small_dit`] with residuals after every second block
/// and a 16-wide image context of 8 tokens, and a ControlNet of `blocks` control blocks of the
/// same width (128 + 2 input channels, as the real one).
fn small_transfer(layers: usize, heads: usize, blocks: usize) -> (Config, sampler::cosmos::controlnet::Config) {
    let dit = Config {
        controlnet_block_every_n: Some(2),
        img_context_dim_in: Some(16),
        img_context_num_tokens: 8,
        img_context_dim_out: heads * 32,
        ..small_dit(layers, heads)
    };
    let controlnet = sampler::cosmos::controlnet::Config {
        n_controlnet_blocks: blocks,
        in_channels: 130,
        latent_channels: 18,
        model_channels: heads * 32,
        num_attention_heads: heads,
        attention_head_dim: 32,
        text_embed_dim: 32,
        adaln_lora_dim: 8,
        rope_scale: dit.rope_scale,
        img_context_dim_in: Some(16),
        img_context_dim_out: heads * 32,
        ..Default::default()
    };
    (dit, controlnet)
}

/// One iteration of the Transfer2.5 loop (Predict2.5's velocity with one ControlNet branch and
/// the image context, UniPC, CFG), measured as [`measure_iteration`].
fn measure_transfer_iteration(
    cfg: &Config,
    control_cfg: &sampler::cosmos::controlnet::Config,
    vae: &VaeConfig,
    req: &PlanRequest,
) -> Result<usize> {
    use sampler::cosmos::controlnet::{ConditioningScale, CosmosControlNetModel};
    use sampler::cosmos::pipeline::{ControlBranch, Predict25Denoiser};
    let dev = Device::Cpu;
    let mut model = CosmosTransformer3DModel::random(cfg, 1, req.dtype, &dev)?;
    model.set_memory_mode(req.dit)?;
    let mut controlnet = CosmosControlNetModel::random(control_cfg, 4, req.dtype, &dev)?;
    controlnet.set_memory_mode(req.dit)?;
    let s = vae.spatial_factor();
    let shape = [1, vae.z_dim, vae.latent_frames(req.num_frames), req.height / s, req.width / s];
    let mut rng = SplitMix64::new(2);
    let conditioning = rng.normal_tensor(&shape[..], req.dtype, &dev)?;
    let controls = rng.normal_tensor(&shape[..], req.dtype, &dev)?;
    let prompt = rng.normal_tensor((1, req.context_tokens, cfg.text_embed_dim), req.dtype, &dev)?;
    let negative = rng.normal_tensor((1, req.context_tokens, cfg.text_embed_dim), req.dtype, &dev)?;
    let target = rng.normal_tensor(&shape[..], DType::F32, &dev)?;
    let z0 = rng.normal_tensor(&shape[..], DType::F32, &dev)?;
    let mut inner = Predict25Denoiser::new(&model, conditioning, 1)?;
    inner.controls =
        vec![ControlBranch { controlnet: &controlnet, latents: controls, scale: ConditioningScale::All(1.0) }];
    inner.img_context = Some(candle_core::Tensor::zeros((1, cfg.img_context_num_tokens, 16), req.dtype, &dev)?);
    let (z0, target) = (z0.to_dtype(req.dtype)?, target.to_dtype(req.dtype)?);
    let denoiser: Box<dyn Denoiser> =
        Box::new(ClassifierFreeGuidance { inner, scale: 3.0, uncond_context: Some(negative) });
    let schedule = Schedule::karras_flow_sigmas(req.steps, 0.01, 200.0, 7.0)?;
    let plan = Churn::default().plan(&schedule.sigmas, false);
    let solver = SolverKind::Unipc.build();
    let cond = Conditioning { frames: None, mask: None, context: Some(prompt), initial_noise: None };
    let traj = Trajectory { denoiser: denoiser.as_ref(), solver: solver.as_ref(), cond: &cond, schedule, plan };
    measure_peak(&traj, &z0, TargetMse { target, label: "random target".into() })
}

/// The measured heap peak of the decode VJP (`decode_taped` + `DecodeTape::vjp`) of
/// `latent_frames` × h × w latents, above the baseline with the model, the latents and the video's
/// gradient built.
fn measure_decode(vae_cfg: &VaeConfig, checkpointing: bool, latent_frames: usize, h: usize, w: usize) -> Result<usize> {
    let dev = Device::Cpu;
    let mut vae = AutoencoderKLWan::random(vae_cfg, 1, DType::F32, &dev)?;
    vae.set_vjp_checkpointing(checkpointing);
    let mut rng = SplitMix64::new(3);
    let z = rng.normal_tensor((1, vae_cfg.z_dim, latent_frames, h, w), DType::F32, &dev)?;
    let s = vae_cfg.spatial_factor();
    let probe = rng.normal_tensor((1, 3, vae_cfg.decoded_frames(latent_frames), h * s, w * s), DType::F32, &dev)?;
    let base = shared::memory::reset_peak();
    let (video, tape) = vae.decode_taped(&z)?;
    let grad = tape.vjp(&vae, &probe)?;
    let peak = shared::memory::peak_bytes().saturating_sub(base);
    drop((video, grad));
    Ok(peak)
}

fn check(what: &str, predicted: f64, measured: usize, tolerance: f64) -> f64 {
    let ratio = predicted / measured as f64;
    println!(
        "{what:<58} predicted {:>8.2} MB, measured {:>8.2} MB, predicted/measured {ratio:.3}",
        predicted / MB,
        measured as f64 / MB
    );
    assert!((ratio - 1.0).abs() <= tolerance, "{what}: predicted/measured {ratio:.3} beyond ±{tolerance}");
    ratio
}

/// Within this fraction of the measured heap peak (small sizes, f32 and bf16 on the CPU). The
/// prediction's terms that scale with the model (N·D, the decoder's activations) are counted;
/// what is left is latent-sized bookkeeping and allocator rounding, a larger share at these sizes
/// than at real ones.
const TOLERANCE: f64 = 0.2;

#[test]
fn plan_matches_measured_peaks() -> Result<()> {
    let vae = VaeConfig::default();
    let low = MemoryMode { attention_tile: Some(64), ..MemoryMode::low_memory() };
    // (layers, heads, height, width, frames, guidance, dtype, mode): CFG on and off, f32 and
    // bf16. (`benches/cosmos_memory.rs` checks the plan over layers, tokens and the plain graph.)
    let cases = [
        (2, 8, 128, 128, 5, true, DType::F32, low),
        (2, 8, 128, 128, 5, false, DType::F32, low),
        (2, 8, 128, 128, 5, true, DType::BF16, low),
    ];
    for (layers, heads, height, width, frames, guidance, dtype, mode) in cases {
        let cfg = small_dit(layers, heads);
        let req = PlanRequest {
            steps: 2,
            guidance,
            dtype,
            dit: mode,
            decode: false,
            context_tokens: 8,
            ..PlanRequest::new(height, width, frames)
        };
        let plan = MemoryPlan::new(&cfg, &vae, &req)?;
        let measured = measure_iteration(&cfg, &vae, &req)?;
        let what = format!("DiT {layers}×{}, {} tokens, CFG {guidance}, {dtype:?}, {mode:?}", heads * 32, plan.tokens);
        check(&what, plan.working_bytes(), measured, TOLERANCE);
    }
    // Transfer2.5: the ControlNet's calls and the image context on top of the DiT's (UniPC keeps
    // 3 latent-sized tensors per step).
    for (layers, blocks) in [(4, 2), (4, 4)] {
        let (cfg, control_cfg) = small_transfer(layers, 8, blocks);
        let req = PlanRequest {
            steps: 3,
            guidance: true,
            dtype: DType::F32,
            dit: low,
            decode: false,
            context_tokens: 8,
            solver_state_per_step: 3,
            controlnets: Some((control_cfg.clone(), 1)),
            ..PlanRequest::new(128, 128, 5)
        };
        let plan = MemoryPlan::new(&cfg, &vae, &req)?;
        let measured = measure_transfer_iteration(&cfg, &control_cfg, &vae, &req)?;
        let controlnet: f64 = plan.step_vjp.iter().filter(|t| t.name.starts_with("ControlNet")).map(|t| t.bytes).sum();
        let what = format!("Transfer DiT {layers}×256 + ControlNet {blocks} blocks, {} tokens, CFG", plan.tokens);
        check(&what, plan.working_bytes(), measured, TOLERANCE);
        println!("  of which the ControlNet calls: {:.2} MB", controlnet / MB);
    }
    // The decode VJP of a narrow VAE with the real layout (base width 8 instead of 96), with and
    // without checkpointing inside the chunks. The measurement holds the video (the probe, its
    // gradient, is in the baseline).
    let narrow = VaeConfig { base_dim: 8, ..VaeConfig::default() };
    for checkpointing in [true, false] {
        let (hw, latent_frames) = (8, 3);
        let frames = narrow.decoded_frames(latent_frames);
        let req = PlanRequest {
            steps: 1,
            dtype: DType::F32,
            vae_checkpointing: checkpointing,
            ..PlanRequest::new(hw * 8, hw * 8, frames)
        };
        let plan = MemoryPlan::new(&small_dit(1, 2), &narrow, &req)?;
        let video = (3 * frames * hw * 8 * hw * 8 * 4) as f64;
        let measured = measure_decode(&narrow, checkpointing, latent_frames, hw, hw)?;
        let what = format!("VAE decode VJP, base 8, {latent_frames}×{hw}×{hw} latents, checkpointing {checkpointing}");
        check(&what, plan.decode_vjp_bytes() - video, measured, TOLERANCE);
    }
    Ok(())
}

fn fixtures() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The parameter count diffusers' model has, from a committed key list.
fn parameter_count(keys: &str) -> Result<usize> {
    let text = std::fs::read_to_string(fixtures().join(keys))?;
    let listed: serde_json::Value = serde_json::from_str(&text)?;
    listed["parameter_count"].as_u64().map(|n| n as usize).ok_or_else(|| anyhow::anyhow!("{keys}: no parameter_count"))
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// An 80 GB accelerator (80 GiB; a real one leaves a little less to the process).
const FREE_80GB: u64 = 80 * 1024 * 1024 * 1024;

/// The plan for the real Cosmos-Predict2 2B Video2World and Wan2.1 VAE configs: the tables at
/// 704×1280 and 480×832, 93 frames, bf16, 35 steps, CFG, and the largest sizes that fit 80 GB.
#[test]
fn real_predict2_2b_figures() -> Result<()> {
    let cfg = Config::from_json_file(&fixtures().join("cosmos_predict2_2b_video2world_config.json"))?;
    let vae = VaeConfig::from_json_file(&fixtures().join("wan2_1_vae_config.json"))?;
    let mut previous_peak = 0.0;
    for (height, width) in [(480, 832), (704, 1280)] {
        let plan = MemoryPlan::new(&cfg, &vae, &PlanRequest::new(height, width, 93))?;
        println!(
            "{plan}
"
        );
        // Weights: exactly diffusers' parameter counts, 2 bytes each.
        assert_eq!(plan.dit_weights, 2.0 * parameter_count("cosmos_predict2_2b_video2world_keys.json")? as f64);
        assert_eq!(plan.vae_weights, 2.0 * parameter_count("wan2_1_vae_keys.json")? as f64);
        assert_eq!(plan.latent, [1, 16, 24, height / 8, width / 8]);
        assert_eq!(plan.tokens, 24 * height / 16 * width / 16);
        assert!(plan.peak_bytes() > previous_peak);
        previous_peak = plan.peak_bytes();
        // Without the DiT's checkpointing and tiled attention: the full step graph.
        let plain = plan.with_request(&PlanRequest { dit: MemoryMode::default(), ..plan.request.clone() })?;
        let unchecked_decode = plan.with_request(&PlanRequest { vae_checkpointing: false, ..plan.request.clone() })?;
        println!(
            "  {height}×{width}: one step's VJP without DiT checkpointing/tiling {:.0} GiB (with: {:.1}); decode VJP \
             without checkpointing inside chunks {:.0} GiB (with: {:.1})",
            plain.step_vjp_bytes() / GIB,
            plan.step_vjp_bytes() / GIB,
            unchecked_decode.decode_vjp_bytes() / GIB,
            plan.decode_vjp_bytes() / GIB
        );
        assert!(plain.step_vjp_bytes() > 10.0 * plan.step_vjp_bytes());
        assert!(unchecked_decode.decode_vjp_bytes() > 1.3 * plan.decode_vjp_bytes());
        match plan.fits(FREE_80GB) {
            Ok(()) => println!("  fits 80 GiB: yes ({:.1} GiB)", plan.peak_bytes() / GIB),
            Err(why) => println!("  fits 80 GiB: no — {why}"),
        }
        let frames = plan.largest_frames(FREE_80GB);
        let size = plan.largest_size(FREE_80GB);
        println!("  at {height}×{width} at most {frames:?} frames fit 80 GiB; at 93 frames at most {size:?}\n");
        // The search agrees with the plan it searches.
        if let Some(f) = frames {
            let at = |n| plan.with_request(&PlanRequest { num_frames: n, ..plan.request.clone() });
            assert!(at(f)?.peak_bytes() <= FREE_80GB as f64);
            if let Ok(next) = at(f + 4) {
                assert!(next.peak_bytes() > FREE_80GB as f64);
            }
        }
    }
    // A size that cannot fit says what dominates and what would fit.
    let huge = MemoryPlan::new(&cfg, &vae, &PlanRequest::new(1920, 1920, 93))?;
    let why = huge.fits(FREE_80GB).expect_err("1920×1920×93 cannot fit 80 GiB");
    println!("1920×1920×93: {why}");
    assert!(why.contains("GiB") && why.contains("Would fit"), "{why}");
    // Bad sizes are refused before anything is planned.
    assert!(MemoryPlan::new(&cfg, &vae, &PlanRequest::new(700, 1280, 93)).is_err());
    assert!(MemoryPlan::new(&cfg, &vae, &PlanRequest::new(704, 4096, 93)).is_err());
    Ok(())
}
