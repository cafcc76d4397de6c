//! The sampler's schedules and parameterisations against numbers from outside this code:
//! k-diffusion, diffusers 0.42.1 (its schedulers, its EDM preconditioning, and the Cosmos
//! Predict2 / Predict2.5 pipelines run end to end with a recording transformer), and
//! cosmos-predict2.5's own scheduler. `fixtures/make_reference_values.py` (header: versions and
//! command) wrote `fixtures/reference_values.json`; nothing in it came from this crate.
//!
//! Tolerances: 1e-12 relative where both sides are the same formula in f64 (measured ≤ 4e-16).
//! Where the reference is float32 (diffusers and Cosmos keep σ, t and latents in float32), the
//! bound is the float32 rounding the reference carries, derived per check from the unit
//! roundoff u = 2⁻²⁴ and stated there — tight enough that a wrong coefficient (e.g. EDM's
//! c_out in place of the flow's −t, or ρ ↔ 1/ρ) misses by orders of magnitude.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use sampler::denoiser::{
    to_vec_f64, ClassifierFreeGuidance, Conditioning, Denoiser, FrameReplace, Network, Preconditioned,
};
use sampler::param::Parameterization;
use sampler::schedule::Schedule;
use serde::Deserialize;

/// float32 unit roundoff: rounding a real number to float32 changes it by at most u relatively.
const U32: f64 = 5.960_464_477_539_063e-8;
/// Same formula on both sides, in f64.
const F64_TOL: f64 = 1e-12;

#[derive(Deserialize)]
struct Fixture {
    schedules: Schedules,
    preconditioning: Preconditioning,
    pipelines: Pipelines,
}

#[derive(Deserialize)]
struct Schedules {
    karras: Vec<KarrasCase>,
    cosmos: CosmosSchedules,
    diffusers_predict2: DiffusersPredict2Schedule,
    diffusers_predict25: DiffusersPredict25Schedule,
}

#[derive(Deserialize)]
struct KarrasCase {
    name: String,
    num_steps: usize,
    sigma_min: f64,
    sigma_max: f64,
    rho: f64,
    sigmas: Vec<f64>,
}

#[derive(Deserialize)]
struct CosmosSchedules {
    flow_shift: Vec<FlowShiftCase>,
    karras_flow: KarrasFlowCase,
}

#[derive(Deserialize)]
struct FlowShiftCase {
    num_steps: usize,
    shift: f64,
    flow_t_f32: Vec<f64>,
    flow_t_f64: Vec<f64>,
}

#[derive(Deserialize)]
struct KarrasFlowCase {
    num_steps: usize,
    sigma_min: f64,
    sigma_max: f64,
    rho: f64,
    flow_t_f32: Vec<f64>,
}

#[derive(Deserialize)]
struct DiffusersPredict2Schedule {
    num_inference_steps: usize,
    sigmas: Vec<f64>,
}

#[derive(Deserialize)]
struct DiffusersPredict25Schedule {
    num_inference_steps: usize,
    flow_t: Vec<f64>,
}

#[derive(Deserialize)]
struct Preconditioning {
    sigmas: Vec<f64>,
    edm: Vec<EdmReference>,
    epsilon: Coefficients,
    x0: Coefficients,
    rectified_flow: FlowReference,
}

#[derive(Deserialize)]
struct Coefficients {
    c_skip: Vec<f64>,
    c_out: Vec<f64>,
    c_in: Vec<f64>,
    c_noise: Option<Vec<f64>>,
}

#[derive(Deserialize)]
struct EdmReference {
    sigma_data: f64,
    #[serde(flatten)]
    c: Coefficients,
}

#[derive(Deserialize)]
struct FlowReference {
    t: Vec<f64>,
    #[serde(flatten)]
    c: Coefficients,
}

#[derive(Deserialize)]
struct Pipelines {
    predict2: Predict2Run,
    predict25: Predict25Run,
}

#[derive(Deserialize)]
struct Predict2Run {
    guidance_scale: f64,
    sigma_conditioning: f64,
    shape: Vec<usize>,
    conditioning_latents: Vec<f64>,
    cond_indicator: Vec<f64>,
    steps: Vec<PipelineStep>,
}

#[derive(Deserialize)]
struct Predict25Run {
    guidance_scale: f64,
    conditional_frame_timestep: f64,
    shape: Vec<usize>,
    cond_latent: Vec<f64>,
    cond_indicator: Vec<f64>,
    gt_velocity: Vec<f64>,
    steps: Vec<PipelineStep>,
}

/// One denoising step of a diffusers pipeline: the latents handed to `scheduler.step`
/// (`sample`) with the model output it got, what each transformer call received and returned,
/// and the pipeline's scalar locals at the step callback.
#[derive(Deserialize)]
struct PipelineStep {
    index: usize,
    sample: Vec<f64>,
    model_output: Vec<f64>,
    cond: TransformerCall,
    uncond: TransformerCall,
    locals: HashMap<String, Vec<f64>>,
}

#[derive(Deserialize)]
struct TransformerCall {
    hidden_states: Vec<f64>,
    timestep: Vec<f64>,
    timestep_shape: Vec<usize>,
    output: Vec<f64>,
}

impl PipelineStep {
    fn local(&self, name: &str) -> Result<f64> {
        self.locals.get(name).and_then(|v| v.first().copied()).ok_or_else(|| anyhow!("step has no local '{name}'"))
    }
}

fn fixture() -> Result<Fixture> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference_values.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// |a − b| relative to the larger magnitude (0 when both are exactly equal, e.g. both 0).
fn rel_err(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / a.abs().max(b.abs())
    }
}

/// Asserts `ours ≈ reference` elementwise within `tol` relative; returns the largest error.
fn assert_rel_close(ours: &[f64], reference: &[f64], tol: f64, what: &str) -> Result<f64> {
    ensure!(ours.len() == reference.len(), "{what}: {} values, reference has {}", ours.len(), reference.len());
    let mut worst = 0.0f64;
    for (i, (&a, &b)) in ours.iter().zip(reference).enumerate() {
        let e = rel_err(a, b);
        ensure!(e <= tol, "{what}[{i}]: ours {a:.17e}, reference {b:.17e}, relative error {e:.3e} > {tol:.1e}");
        worst = worst.max(e);
    }
    println!("{what}: max relative error {worst:.3e} (tolerance {tol:.1e})");
    Ok(worst)
}

fn coefficients_f64(param: Parameterization, sigmas: &[f64]) -> Result<[Vec<f64>; 4]> {
    let sigma = Tensor::from_vec(sigmas.to_vec(), (1, sigmas.len()), &Device::Cpu)?;
    let c = param.coefficients(&sigma)?;
    Ok([to_vec_f64(&c.c_skip)?, to_vec_f64(&c.c_out)?, to_vec_f64(&c.c_in)?, to_vec_f64(&c.c_noise)?])
}

// ---------------------------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------------------------

/// Every σ of k-diffusion's `get_sigmas_karras` (float64) — Cosmos Predict2's 35 steps over
/// 80 → 0.002, diffusers' 35 levels of the same, Predict2.5's 200 → 0.01, and ρ = 3 — equals
/// `Schedule::karras` (k-diffusion's extra appended 0 is not part of ours: ours ends at σ_min).
#[test]
fn karras_schedule_matches_k_diffusion_at_every_sigma() -> Result<()> {
    let fx = fixture()?;
    ensure!(fx.schedules.karras.len() == 4, "expected the four Karras settings");
    for case in &fx.schedules.karras {
        let ours = Schedule::karras(case.num_steps, case.sigma_min, case.sigma_max, case.rho)?;
        assert_rel_close(&ours.sigmas, &case.sigmas, F64_TOL, &format!("karras {}", case.name))?;
    }
    Ok(())
}

/// diffusers' `FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)` as
/// `Cosmos2VideoToWorldPipeline` sets it up (σ 80 → 0.002, 35 inference steps) holds 35 Karras
/// levels and then repeats σ_min where the scheduler had appended 0: its "35 steps" are 34
/// steps of `Schedule::karras(34, …)` and a last Euler step with dt = 0 (a wasted network call,
/// the output left at σ_min). Ours differs deliberately there: `Schedule::karras(N, …)` has N
/// real steps and ends with one clean pass D(x_N, σ_min), as Cosmos' own sampler does (whose
/// 35 steps are `Schedule::karras(35, …)`, pinned to k-diffusion above).
/// Tolerance: diffusers stores σ in float32, one rounding of the exact value: u (measured 0.81 u).
#[test]
fn karras_schedule_matches_diffusers_predict2_scheduler() -> Result<()> {
    let fx = fixture()?;
    let reference = &fx.schedules.diffusers_predict2;
    let n = reference.num_inference_steps;
    ensure!(reference.sigmas.len() == n + 1, "diffusers keeps N + 1 sigmas");
    let ours = Schedule::karras(n - 1, 0.002, 80.0, 7.0)?;
    assert_rel_close(&ours.sigmas, &reference.sigmas[..n], U32, "karras(34) vs diffusers Predict2 σ[..35]")?;
    ensure!(reference.sigmas[n] == reference.sigmas[n - 1], "diffusers' last σ is σ_min repeated (a dt = 0 step)");
    Ok(())
}

/// Cosmos Predict2.5's rectified-flow shift schedule, from cosmos-predict2.5's own
/// `FlowUniPCMultistepScheduler.set_timesteps` (shift branch), compared in flow time t (its
/// coordinate) through `Parameterization::flow_t`:
/// * against the formula in float64 with upstream's intended start 0.999: 1e-12;
/// * against upstream's float32 output: one float32 rounding (u) plus upstream's float32 start
///   float32(0.999) = 0.99900001287, 1.29e-8 relative on every s and at most that on t
///   (measured 1.07 u). Upstream's σ in EDM coordinates would carry these float32 errors
///   amplified by 1/(1−t) (up to ~1e-4 at t ≈ 0.9998); ours is the exact formula.
#[test]
fn flow_shift_schedule_matches_cosmos_predict25_scheduler() -> Result<()> {
    let fx = fixture()?;
    ensure!(fx.schedules.cosmos.flow_shift.len() == 3, "expected three flow-shift settings");
    for case in &fx.schedules.cosmos.flow_shift {
        let ours = Schedule::flow_shift(case.num_steps, case.shift)?;
        let t: Vec<f64> = ours.sigmas.iter().map(|&s| Parameterization::flow_t(s)).collect();
        let what = format!("flow_shift({}, {})", case.num_steps, case.shift);
        assert_rel_close(&t, &case.flow_t_f64, F64_TOL, &format!("{what} vs the formula in f64"))?;
        assert_rel_close(&t, &case.flow_t_f32, U32 + 1.3e-8, &format!("{what} vs cosmos-predict2.5 (f32)"))?;
        ensure!(ours.sigma_end() == 0.0 && case.flow_t_f32.last() == Some(&0.0), "{what}: both end at 0");
    }
    Ok(())
}

/// Predict2.5's Karras schedule is Karras in EDM σ seen as flow time t = K/(1+K): upstream
/// (cosmos-predict2.5 `use_kerras_sigma`, 35 steps) and diffusers (`UniPCMultistepScheduler`
/// with Karras + flow sigmas, 200 → 0.01, 36 steps: the same 36 levels) both equal
/// `flow_t(Schedule::karras(35, 0.01, 200, 7))`. Both then append t = 0 and take a last UniPC
/// step σ_min → 0, where ours takes a clean pass D(x_N, σ_min) (identical for Euler; UniPC's
/// multistep correction differs on that step). Tolerance: one float32 rounding, u
/// (measured 0.67 u).
#[test]
fn karras_flow_schedule_matches_predict25_schedulers() -> Result<()> {
    let fx = fixture()?;
    let upstream = &fx.schedules.cosmos.karras_flow;
    let ours = Schedule::karras(upstream.num_steps, upstream.sigma_min, upstream.sigma_max, upstream.rho)?;
    let t: Vec<f64> = ours.sigmas.iter().map(|&s| Parameterization::flow_t(s)).collect();
    let n = t.len();
    assert_rel_close(&t, &upstream.flow_t_f32[..n], U32, "flow_t(karras(35, 0.01, 200)) vs cosmos-predict2.5")?;
    let diffusers = &fx.schedules.diffusers_predict25;
    ensure!(diffusers.num_inference_steps == n && diffusers.flow_t.len() == n + 1, "diffusers: 36 levels + 0");
    assert_rel_close(&t, &diffusers.flow_t[..n], U32, "flow_t(karras(35, 0.01, 200)) vs diffusers Predict2.5")?;
    ensure!(upstream.flow_t_f32[n] == 0.0 && diffusers.flow_t[n] == 0.0, "both append t = 0");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Preconditioning
// ---------------------------------------------------------------------------------------------

/// Karras et al. 2022, Table 1 ("Ours"), written out here.
fn edm_table1(sigma: f64, sigma_data: f64) -> [f64; 4] {
    let var = sigma * sigma + sigma_data * sigma_data;
    [sigma_data * sigma_data / var, sigma * sigma_data / var.sqrt(), 1.0 / var.sqrt(), 0.25 * sigma.ln()]
}

/// EDM c_skip, c_out, c_in, c_noise for σ_data 0.5 and 1 at nine σ from 0.002 to 200 equal
/// k-diffusion's `Denoiser.get_scalings` / diffusers' `EDMEulerScheduler.precondition_*`
/// (which the script checked equal to each other) and Table 1 written out in this test.
#[test]
fn edm_coefficients_match_karras_table1_and_libraries() -> Result<()> {
    let fx = fixture()?;
    let p = &fx.preconditioning;
    ensure!(p.edm.len() == 2, "expected σ_data 0.5 and 1");
    for r in &p.edm {
        let [skip, out, c_in, noise] = coefficients_f64(Parameterization::Edm { sigma_data: r.sigma_data }, &p.sigmas)?;
        let what = |name: &str| format!("EDM(σ_data {}) {name}", r.sigma_data);
        assert_rel_close(&skip, &r.c.c_skip, F64_TOL, &what("c_skip"))?;
        assert_rel_close(&out, &r.c.c_out, F64_TOL, &what("c_out"))?;
        assert_rel_close(&c_in, &r.c.c_in, F64_TOL, &what("c_in"))?;
        let reference_noise = r.c.c_noise.as_ref().ok_or_else(|| anyhow!("EDM reference has no c_noise"))?;
        assert_rel_close(&noise, reference_noise, F64_TOL, &what("c_noise"))?;
        for (i, &s) in p.sigmas.iter().enumerate() {
            let table = edm_table1(s, r.sigma_data);
            let ours = [skip[i], out[i], c_in[i], noise[i]];
            assert_rel_close(&ours, &table, F64_TOL, &format!("{} at σ {s} vs Table 1", what("coefficients")))?;
        }
        // The inverse of c_noise gives σ back.
        let back = Parameterization::Edm { sigma_data: r.sigma_data }.sigma_from_c_noise(&Tensor::from_vec(
            reference_noise.clone(),
            reference_noise.len(),
            &Device::Cpu,
        )?)?;
        assert_rel_close(&to_vec_f64(&back)?, &p.sigmas, F64_TOL, &what("sigma_from_c_noise(reference c_noise)"))?;
    }
    Ok(())
}

/// ε-prediction: c_skip 1, c_out −σ, c_in 1/√(σ²+1), as k-diffusion's
/// `DiscreteEpsDDPMDenoiser` (whose c_noise is a DDPM timestep; ours is EDM's ¼ ln σ, checked
/// against the formula). x0-prediction: c_skip 0, c_out 1, c_in 1/√(σ²+1), c_noise ¼ ln σ.
#[test]
fn epsilon_and_x0_coefficients_match_references() -> Result<()> {
    let fx = fixture()?;
    let p = &fx.preconditioning;
    let [skip, out, c_in, noise] = coefficients_f64(Parameterization::Epsilon, &p.sigmas)?;
    assert_rel_close(&skip, &p.epsilon.c_skip, F64_TOL, "ε c_skip")?;
    assert_rel_close(&out, &p.epsilon.c_out, F64_TOL, "ε c_out")?;
    assert_rel_close(&c_in, &p.epsilon.c_in, F64_TOL, "ε c_in")?;
    let quarter_ln: Vec<f64> = p.sigmas.iter().map(|s| 0.25 * s.ln()).collect();
    assert_rel_close(&noise, &quarter_ln, F64_TOL, "ε c_noise = ¼ ln σ")?;
    let [skip, out, c_in, noise] = coefficients_f64(Parameterization::X0, &p.sigmas)?;
    assert_rel_close(&skip, &p.x0.c_skip, F64_TOL, "x0 c_skip")?;
    assert_rel_close(&out, &p.x0.c_out, F64_TOL, "x0 c_out")?;
    assert_rel_close(&c_in, &p.x0.c_in, F64_TOL, "x0 c_in")?;
    assert_rel_close(
        &noise,
        p.x0.c_noise.as_ref().ok_or_else(|| anyhow!("x0 has no c_noise"))?,
        F64_TOL,
        "x0 c_noise",
    )?;
    Ok(())
}

/// Rectified flow in EDM coordinates, as `Cosmos2VideoToWorldPipeline` writes it: t = σ/(σ+1),
/// c_in = c_skip = 1 − t, c_out = −t, and the network's noise input is t itself; `flow_t`,
/// `sigma_from_flow_t` and `sigma_from_c_noise` convert between σ and t. (The pipeline tests
/// below pin diffusers' own float32 numbers.) Measured ≤ 3e-14: t/(1−t) loses ~1/(1−t) ulps.
#[test]
fn rectified_flow_coefficients_match_cosmos_formulas() -> Result<()> {
    let fx = fixture()?;
    let p = &fx.preconditioning;
    let r = &p.rectified_flow;
    let [skip, out, c_in, noise] = coefficients_f64(Parameterization::RectifiedFlow, &p.sigmas)?;
    assert_rel_close(&skip, &r.c.c_skip, F64_TOL, "flow c_skip")?;
    assert_rel_close(&out, &r.c.c_out, F64_TOL, "flow c_out")?;
    assert_rel_close(&c_in, &r.c.c_in, F64_TOL, "flow c_in")?;
    assert_rel_close(&noise, &r.t, F64_TOL, "flow c_noise = t")?;
    let t: Vec<f64> = p.sigmas.iter().map(|&s| Parameterization::flow_t(s)).collect();
    assert_rel_close(&t, &r.t, F64_TOL, "flow_t(σ)")?;
    let back: Vec<f64> = r.t.iter().map(|&t| Parameterization::sigma_from_flow_t(t)).collect();
    assert_rel_close(&back, &p.sigmas, F64_TOL, "sigma_from_flow_t(t)")?;
    let from_noise =
        Parameterization::RectifiedFlow.sigma_from_c_noise(&Tensor::from_vec(r.t.clone(), r.t.len(), &Device::Cpu)?)?;
    assert_rel_close(&to_vec_f64(&from_noise)?, &p.sigmas, F64_TOL, "flow sigma_from_c_noise(t)")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The Cosmos pipelines, step by step
// ---------------------------------------------------------------------------------------------

/// What our wrapper stack hands a raw network — the same (x_in, c_noise) that a DiT wrapper
/// such as `DitNetwork` (tests/dit_trajectory_grad.rs) passes on verbatim as the Cosmos
/// transformer's (hidden_states, timestep) — recorded per call; the call returns the output
/// diffusers' transformer returned for that branch. The branch is read off the context (+1
/// conditional, −1 unconditional), as the script's recorder does.
struct Replay {
    cond_output: Tensor,
    uncond_output: Tensor,
    calls: RefCell<Vec<SeenCall>>,
}

struct SeenCall {
    conditional: bool,
    x_in: Vec<f64>,
    c_noise: Vec<f64>,
}

impl Network for Replay {
    fn forward(&self, x_in: &Tensor, c_noise: &Tensor, cond: &Conditioning) -> candle_core::Result<Tensor> {
        let context = cond.context.as_ref().ok_or_else(|| candle_core::Error::Msg("replay: no context".into()))?;
        let conditional = to_vec_f64(context)?.first().copied().unwrap_or(0.0) > 0.0;
        self.calls.borrow_mut().push(SeenCall { conditional, x_in: to_vec_f64(x_in)?, c_noise: to_vec_f64(c_noise)? });
        Ok(if conditional { self.cond_output.clone() } else { self.uncond_output.clone() })
    }

    fn describe(&self) -> String {
        "replay of diffusers' recorded transformer outputs".into()
    }
}

type Shape5 = (usize, usize, usize, usize, usize);

fn shape5(shape: &[usize]) -> Result<Shape5> {
    match *shape {
        [b, c, t, h, w] => Ok((b, c, t, h, w)),
        _ => Err(anyhow!("expected a 5-D shape, got {shape:?}")),
    }
}

fn tensor(values: &[f64], shape: Shape5) -> Result<Tensor> {
    Ok(Tensor::from_vec(values.to_vec(), shape, &Device::Cpu)?)
}

/// Whether each element of a flattened (B, C, T, H, W) tensor lies on a conditioning frame
/// (`indicator`: the (B, 1, T, 1, 1) conditioning indicator; B = 1 here).
fn on_conditioning_frame(shape: Shape5, indicator: &[f64]) -> Vec<bool> {
    let (b, c, t, h, w) = shape;
    (0..b * c * t * h * w).map(|i| indicator[(i / (h * w)) % t] == 1.0).collect()
}

/// The stack that mirrors diffusers' step: per branch, frame replacement around the
/// rectified-flow preconditioned network; CFG over the two branches in x0 space.
fn cosmos_stack(
    step: &PipelineStep,
    shape: Shape5,
    condition_sigma: f64,
    guidance: f64,
) -> Result<ClassifierFreeGuidance<FrameReplace<Preconditioned<Replay>>>> {
    let replay = Replay {
        cond_output: tensor(&step.cond.output, shape)?,
        uncond_output: tensor(&step.uncond.output, shape)?,
        calls: RefCell::new(Vec::new()),
    };
    Ok(ClassifierFreeGuidance {
        inner: FrameReplace {
            inner: Preconditioned { net: replay, param: Parameterization::RectifiedFlow },
            condition_sigma: Some(condition_sigma),
        },
        scale: guidance,
        uncond_context: Some((Tensor::ones((1, 1, 1), DType::F64, &Device::Cpu)? * -1.0)?),
    })
}

fn conditioning(frames: &[f64], indicator: &[f64], shape: Shape5) -> Result<Conditioning> {
    let (b, _c, t, _h, _w) = shape;
    Ok(Conditioning {
        frames: Some(tensor(frames, shape)?),
        mask: Some(Tensor::from_vec(indicator.to_vec(), (b, 1, t, 1, 1), &Device::Cpu)?),
        context: Some(Tensor::ones((1, 1, 1), DType::F64, &Device::Cpu)?),
        initial_noise: None,
    })
}

/// Checks the network calls of one step against diffusers' transformer calls: the per-frame
/// timestep (absolute tolerance `t_tol`), and the input — on generated frames equal within
/// `x_tol(element index)`, on conditioning frames ours = diffusers' × (1 − t_c): diffusers (and
/// Cosmos) feed the clean conditioning latents unscaled, while our `FrameReplace` puts the
/// clean frames into EDM coordinates and `Preconditioned` scales them by c_in(σ_c) = 1 − t_c
/// (a 1e-4 relative difference at Cosmos' σ_c; kept, since our world model is trained so).
fn check_calls(
    calls: &[SeenCall],
    step: &PipelineStep,
    on_cond: &[bool],
    t_cond: f64,
    t_tol: f64,
    x_tol: &dyn Fn(usize) -> f64,
    what: &str,
) -> Result<(f64, f64)> {
    ensure!(calls.len() == 2 && calls[0].conditional && !calls[1].conditional, "{what}: expected cond, then uncond");
    let (mut worst_t, mut worst_x) = (0.0f64, 0.0f64);
    for (seen, theirs, branch) in [(&calls[0], &step.cond, "cond"), (&calls[1], &step.uncond, "uncond")] {
        let (b, t) = (theirs.timestep_shape[0], theirs.timestep_shape[2]);
        ensure!(theirs.timestep_shape == [b, 1, t, 1, 1], "{what}: diffusers' timestep is per frame (B, 1, T, 1, 1)");
        ensure!(seen.c_noise.len() == theirs.timestep.len(), "{what} {branch}: timestep count");
        for (f, (&ours, &reference)) in seen.c_noise.iter().zip(&theirs.timestep).enumerate() {
            let e = (ours - reference).abs();
            ensure!(e <= t_tol, "{what} {branch} frame {f}: timestep ours {ours:.10e} vs diffusers {reference:.10e}");
            worst_t = worst_t.max(e);
        }
        for (i, (&ours, &reference)) in seen.x_in.iter().zip(&theirs.hidden_states).enumerate() {
            if on_cond[i] {
                let e = rel_err(ours, reference * (1.0 - t_cond));
                ensure!(e <= F64_TOL, "{what} {branch}[{i}]: conditioning input {ours} ≠ {reference}·(1 − t_c)");
            } else {
                let e = (ours - reference).abs();
                ensure!(e <= x_tol(i), "{what} {branch}[{i}]: input ours {ours:.10e} vs diffusers {reference:.10e}");
                worst_x = worst_x.max(e / x_tol(i));
            }
        }
    }
    Ok((worst_t, worst_x))
}

/// `Cosmos2VideoToWorldPipeline` (Predict2; image → 2 latent frames, frame 0 conditioning;
/// 35 steps, guidance 3), steps 0, 1, 17, 33, 34 (σ 80 … 0.002), replayed through
/// CFG(FrameReplace(Preconditioned(RectifiedFlow))) with σ_c = `sigma_conditioning` = 1e-4:
/// * coefficients: ours at diffusers' float32 σ vs the pipeline's c_in, c_skip, c_out,
///   current_t locals — absolute 4u: each is ≤ 3 float32 roundings of a value in [0, 1]
///   (measured ≤ 0.5 u);
/// * the timestep each transformer call receives (both branches, per frame: t_c = σ_c/(σ_c+1)
///   on the conditioning frame, t elsewhere) = our c_noise — absolute 4u, same reason;
/// * the transformer input = our c_in·x on the generated frame — 6u·|x| (c_in's absolute
///   error 4u times |x|, plus the product's rounding); the unconditional branch keeps the
///   conditioning frame, as upstream;
/// * the model output handed to the Euler step, d = (x − D)/σ with D = x0_c + g·(x0_c − x0_u)
///   — within the float32 error of diffusers' arithmetic:
///   4u·((1+2g)·(|c_skip·x| + |c_out|·max|F|) + |x|)/σ + 4u·|d| per element (a few roundings
///   of each term of x0 = c_skip·x + c_out·F, amplified by CFG and by x − x0 over σ; measured
///   ≤ 0.15 of it). At σ = 0.002 that is ~1e-3·|x|, while EDM's c_skip in place of 1 − t
///   would move d by ~|x|.
#[test]
fn predict2_pipeline_steps_match_diffusers() -> Result<()> {
    let fx = fixture()?;
    let run = &fx.pipelines.predict2;
    let shape = shape5(&run.shape)?;
    let on_cond = on_conditioning_frame(shape, &run.cond_indicator);
    let g = run.guidance_scale;
    let t_c = Parameterization::flow_t(run.sigma_conditioning);
    ensure!(run.steps.len() == 5, "expected five recorded steps");
    for step in &run.steps {
        let what = format!("Predict2 step {}", step.index);
        let sigma = step.local("current_sigma")?;
        // Coefficients against the pipeline's own locals.
        let [skip, out, c_in, noise] = coefficients_f64(Parameterization::RectifiedFlow, &[sigma])?;
        for (ours, name) in [(skip[0], "c_skip"), (out[0], "c_out"), (c_in[0], "c_in"), (noise[0], "current_t")] {
            let theirs = step.local(name)?;
            ensure!((ours - theirs).abs() <= 4.0 * U32, "{what}: {name} ours {ours:.10e} vs diffusers {theirs:.10e}");
        }
        ensure!((t_c - step.local("t_conditioning")?).abs() <= 4.0 * U32, "{what}: t_conditioning");

        let den = cosmos_stack(step, shape, run.sigma_conditioning, g)?;
        let x = tensor(&step.sample, shape)?;
        let sigma_bt = (Tensor::ones((shape.0, shape.2), DType::F64, &Device::Cpu)? * sigma)?;
        let cond = conditioning(&run.conditioning_latents, &run.cond_indicator, shape)?;
        let d_ours = to_vec_f64(&((&x - den.denoise(&x, &sigma_bt, &cond)?)? / sigma)?)?;

        let calls = den.inner.inner.net.calls.borrow();
        let x_tol = |i: usize| 6.0 * U32 * step.sample[i].abs();
        let (worst_t, worst_x) = check_calls(&calls, step, &on_cond, t_c, 4.0 * U32, &x_tol, &what)?;

        let mut worst_d = 0.0f64;
        for (i, (&ours, &theirs)) in d_ours.iter().zip(&step.model_output).enumerate() {
            let (xi, f) = (step.sample[i], step.cond.output[i].abs().max(step.uncond.output[i].abs()));
            let bound = 4.0 * U32 * ((1.0 + 2.0 * g) * (skip[0] * xi.abs() + out[0].abs() * f) + xi.abs()) / sigma
                + 4.0 * U32 * theirs.abs();
            let e = (ours - theirs).abs();
            ensure!(e <= bound, "{what}[{i}]: d ours {ours:.10e} vs diffusers {theirs:.10e} (bound {bound:.2e})");
            worst_d = worst_d.max(e / bound);
        }
        println!(
            "{what} (σ {sigma:.4}): timestep |Δ| ≤ {worst_t:.2e}, input ≤ {worst_x:.2} of its bound, \
             d ≤ {worst_d:.2} of its bound"
        );
    }
    Ok(())
}

/// `Cosmos2_5_PredictBasePipeline` (Predict2.5; flow latents x_rf, the transformer gets the
/// scheduler's float t; 36 steps, guidance 3), steps 0, 1, 18, 34, 35 (t 0.995 … 0.0099),
/// replayed in EDM coordinates (σ = t/(1−t), x = x_rf/(1−t)) through the same stack with
/// σ_c = `sigma_from_flow_t(conditional_frame_timestep)` (diffusers gives the conditioning
/// frames t = 1e-4 directly):
/// * timestep per frame: on generated frames diffusers passes its stored t verbatim, ours is
///   t after the σ round trip — 1e-12 absolute (f64 rounding, measured ~1e-16); on the
///   conditioning frame 4u (diffusers rounds 1e-4 to float32);
/// * input on generated frames: diffusers passes x_rf, ours c_in·x = x_rf — 1e-12·|x_rf|;
/// * velocity on generated frames: diffusers applies CFG to the velocity, we to x0; with
///   x0 = x_rf − t·v the two agree, v = (x_rf − D)/t — 4u·(1+2g)·max|F| (diffusers' float32
///   v_c + g·(v_c − v_u); ours exact);
/// * conditioning frames: diffusers fixes their velocity to (initial noise − conditioning
///   latents), we fix their x0 prediction D to the conditioning latents — a deliberate
///   difference in how the conditioning frame's own latent moves, not in what the generated
///   frames see; the test asserts each side does what it says.
#[test]
fn predict25_pipeline_steps_match_diffusers() -> Result<()> {
    let fx = fixture()?;
    let run = &fx.pipelines.predict25;
    let shape = shape5(&run.shape)?;
    let on_cond = on_conditioning_frame(shape, &run.cond_indicator);
    let g = run.guidance_scale;
    let t_c = run.conditional_frame_timestep;
    let condition_sigma = Parameterization::sigma_from_flow_t(t_c);
    ensure!(run.steps.len() == 5, "expected five recorded steps");
    for step in &run.steps {
        let what = format!("Predict2.5 step {}", step.index);
        let t = step.local("sigma_t")?;
        let sigma = Parameterization::sigma_from_flow_t(t);
        let x_rf = tensor(&step.sample, shape)?;
        let x = (&x_rf / (1.0 - t))?;

        let den = cosmos_stack(step, shape, condition_sigma, g)?;
        let sigma_bt = (Tensor::ones((shape.0, shape.2), DType::F64, &Device::Cpu)? * sigma)?;
        let cond = conditioning(&run.cond_latent, &run.cond_indicator, shape)?;
        let d = to_vec_f64(&den.denoise(&x, &sigma_bt, &cond)?)?;

        // Timesteps: verbatim t on generated frames, float32(1e-4) on the conditioning frame.
        let calls = den.inner.inner.net.calls.borrow();
        for (seen, theirs) in [(&calls[0], &step.cond), (&calls[1], &step.uncond)] {
            for (f, (&ours, &reference)) in seen.c_noise.iter().zip(&theirs.timestep).enumerate() {
                let tol = if run.cond_indicator[f] == 1.0 { 4.0 * U32 * t_c } else { F64_TOL };
                ensure!((ours - reference).abs() <= tol, "{what} frame {f}: timestep {ours:.17e} vs {reference:.17e}");
            }
        }
        let x_tol = |i: usize| F64_TOL * step.sample[i].abs();
        check_calls(&calls, step, &on_cond, t_c, 4.0 * U32, &x_tol, &what)?;

        let mut worst_v = 0.0f64;
        for (i, &theirs) in step.model_output.iter().enumerate() {
            if on_cond[i] {
                ensure!(d[i] == run.cond_latent[i], "{what}[{i}]: our x0 on the conditioning frame is its latent");
                ensure!(theirs == run.gt_velocity[i], "{what}[{i}]: diffusers' velocity there is the fixed one");
                continue;
            }
            let v_ours = (step.sample[i] - d[i]) / t;
            let f = step.cond.output[i].abs().max(step.uncond.output[i].abs());
            let bound = 4.0 * U32 * (1.0 + 2.0 * g) * f;
            let e = (v_ours - theirs).abs();
            ensure!(
                e <= bound,
                "{what}[{i}]: velocity ours {v_ours:.10e} vs diffusers {theirs:.10e} (bound {bound:.2e})"
            );
            worst_v = worst_v.max(e / bound);
        }
        println!("{what} (t {t:.4}): velocity ≤ {worst_v:.2} of its bound");
    }
    Ok(())
}
