//! The command-line run: params → setup → (gradient check) → optimisation → outputs. Every
//! claim printed is a measured value.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use shared::gradcheck::GradCheckOptions;
use shared::params::{OptimizerConfig, OptimizerKind};

use crate::config::Params;
use crate::noise::NoiseState;
use crate::optimize::{gradcheck_eps, optimize, verify_gradient, GradStats, OptimizeSettings};
use crate::trajectory::Trajectory;

/// What `run` produced, for tests and callers.
pub struct RunSummary {
    pub initial_loss: f64,
    pub final_loss: f64,
    pub gradcheck_rel_error: Option<f64>,
    pub files: Vec<String>,
}

/// Opens the params' device, checks the run fits ([`check_fits`]) and runs it ([`run_on`]),
/// writing into `out_dir` (created if absent; the caller decides whether it may hold anything —
/// the binary goes through `shared::outputs`).
pub fn run(params: &Params, out_dir: &Path, log: impl FnMut(&str)) -> anyhow::Result<RunSummary> {
    let device = shared::device::parse_device(&params.device).context("opening the device")?;
    check_fits(params, &device)?;
    run_on(params, &device, out_dir, log)
}

/// Refuses a trajectory whose stored tensors alone cannot fit in what `device` has free (a
/// lower bound of the working set: [`Params::working_set_bytes`]), naming the fields that set
/// its size — before anything is allocated.
pub fn check_fits(params: &Params, device: &candle_core::Device) -> anyhow::Result<()> {
    shared::checks::ensure_fits(device, params.working_set_bytes(), &params.size_description())?;
    shared::checks::ensure_fits(
        &candle_core::Device::Cpu,
        crate::optimize::history_bytes(params.noise_steps),
        &format!("--iterations (noise_steps) {} (a record per iteration)", params.noise_steps),
    )
}

/// [`run`] on an opened device, the size already checked.
pub fn run_on(
    params: &Params,
    device: &candle_core::Device,
    out_dir: &Path,
    mut log: impl FnMut(&str),
) -> anyhow::Result<RunSummary> {
    let started = Instant::now();
    let device = device.clone();
    let setup = crate::demo::build(params, &device)?;
    let noise = NoiseState::draw(
        params.seed,
        &setup.shape,
        &setup.plan,
        setup.noise_mode,
        params.learn_noise,
        setup.dtype,
        &device,
    )?;
    let traj = Trajectory {
        denoiser: setup.denoiser.as_ref(),
        solver: setup.solver.as_ref(),
        cond: &setup.cond,
        schedule: setup.schedule.clone(),
        plan: setup.plan.clone(),
    };
    let injected = setup.plan.noise_scales.iter().filter(|s| **s > 0.0).count();
    log(&format!(
        "config: solver={} steps={} schedule={:?} σ {:.4}→{:.4} noise_mode={:?} (noise injected on {injected}/{} steps) learn_noise={} iterations={} optimizer={:?} lr={} direction={:?} grad_clip={} chi_reg={} grad_mode={:?} shape={:?} dtype={:?} device={} seed={}",
        setup.solver.name(),
        params.num_steps,
        params.schedule,
        traj.schedule.sigma_start(),
        traj.schedule.sigma_end(),
        setup.noise_mode,
        params.num_steps,
        params.learn_noise,
        params.noise_steps,
        params.optimizer,
        params.noise_lr,
        params.direction,
        params.grad_clip,
        params.chi_reg,
        params.grad_mode,
        setup.shape,
        setup.dtype,
        shared::device::describe(&device),
        params.seed,
    ));
    if noise.from_z0.is_some() {
        log(&format!(
            "step noises from z0: ξ_i = Q_i z0 on the {injected} injecting steps, Q_i a signed permutation seeded by (seed {}, i); z0 is the only learned tensor and ∇z0 includes every ξ_i's path",
            params.seed
        ));
    }
    log(&format!("denoiser: {}", setup.denoiser.describe()));
    log("NOTE: this denoiser is analytic (exact x0 prediction), the fallback when the world model or an image policy is missing — not a learned video model.");
    log(&format!("objective: {}", setup.objective.describe()));
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let mut report = json!({
        "config": params,
        "denoiser": setup.denoiser.describe(),
        "denoiser_is_analytic": true,
        "objective": setup.objective.describe(),
        "schedule_sigmas": traj.schedule.sigmas,
        "churn_plan": setup.plan,
    });
    let mut files = Vec::new();

    if !params.learn_noise {
        let out = traj.sample_state(&noise)?;
        let loss = shared::gradcheck::scalar_f64(&setup.objective.loss(&out)?)?;
        log(&format!("learn_noise is false: sampled once, loss {loss:.6} (measured)"));
        files.extend(crate::report::write_frames(out_dir, "sample", &out)?);
        report["loss"] = json!(loss);
        report["files"] = json!(files);
        shared::io::write_json_atomic(&out_dir.join("report.json"), &report)?;
        return Ok(RunSummary { initial_loss: loss, final_loss: loss, gradcheck_rel_error: None, files });
    }

    // The gradient at the initial noise, measured before anything is updated.
    let vg = traj.value_and_grad_state(&noise, setup.objective.as_ref(), params.grad_mode)?;
    let stats = GradStats::of(&vg.grad_z0)?;
    log(&format!("initial loss: {:.6} (measured)", vg.loss));
    if stats.reached() {
        log(&format!(
            "gradient reached z0: |∇z0| mean {:.3e}, max {:.3e}, norm {:.3e} (finite and non-zero; {:?} backward, {} bytes of stored x_i/state)",
            stats.mean_abs, stats.max_abs, stats.norm, params.grad_mode, vg.checkpoint_bytes
        ));
    } else {
        log(&format!("WARNING: the gradient at z0 is zero or not finite (norm {:.3e}): nothing will move", stats.norm));
    }
    let gradcheck = if params.verify_grad {
        let opts = GradCheckOptions {
            eps: gradcheck_eps(setup.dtype),
            directions: 3,
            seed: params.seed ^ 0xC4EC,
            floor: 1e-12,
        };
        let check = verify_gradient(&traj, &noise, setup.objective.as_ref(), params.grad_mode, &opts)?;
        log(&format!(
            "verify-grad: directional finite differences, {} directions per learned tensor and {} joint (eps {:.0e}, {} learned tensors): max relative error {:.3e}",
            opts.directions,
            check.joint.len(),
            check.eps,
            noise.learnable().len(),
            check.max_rel_error()
        ));
        Some(check)
    } else {
        None
    };

    let optimizer = match params.optimizer {
        OptimizerKind::Adam => OptimizerConfig::adam(params.noise_lr),
        OptimizerKind::Sgd => OptimizerConfig::sgd(params.noise_lr),
    };
    let settings = OptimizeSettings {
        iterations: params.noise_steps,
        optimizer,
        direction: params.direction,
        grad_clip: (params.grad_clip > 0.0).then_some(params.grad_clip),
        chi_reg: params.chi_reg,
        grad_mode: params.grad_mode,
        constraint: Default::default(),
    };
    let mut metrics = shared::metrics::JsonlWriter::create(&out_dir.join("metrics.jsonl"))?;
    let total = params.noise_steps;
    let mut write_err = None;
    let outcome = optimize(&traj, &noise, setup.objective.as_ref(), &settings, |r| {
        log(&format!(
            "step {}/{total} done: loss {:.6}, |∇z0| mean {:.3e} max {:.3e} norm {:.3e}{}{}, {:.3} s",
            r.iteration + 1,
            r.loss,
            r.grad_z0.mean_abs,
            r.grad_z0.max_abs,
            r.grad_z0.norm,
            r.grad_step_noise_norm.map(|n| format!(", |∇ξ| norm {n:.3e}")).unwrap_or_default(),
            if r.clipped { " (clipped)" } else { "" },
            r.seconds
        ));
        if let Err(e) = serde_json::to_value(r).map_err(anyhow::Error::from).and_then(|v| metrics.write(&v)) {
            write_err.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.context("writing metrics.jsonl"));
    }
    log(&format!(
        "final loss: {:.6} (measured at the final noise; initial {:.6}, change {:+.6})",
        outcome.final_loss,
        outcome.initial_loss,
        outcome.final_loss - outcome.initial_loss
    ));
    files.extend(crate::report::write_frames(out_dir, "before", &outcome.initial_output)?);
    files.extend(crate::report::write_frames(out_dir, "after", &outcome.final_output)?);
    files.push(crate::report::write_comparison(out_dir, &outcome.initial_output, &outcome.final_output)?);
    files.push("metrics.jsonl".into());
    files.push("report.json".into());
    report["initial_loss"] = json!(outcome.initial_loss);
    report["final_loss"] = json!(outcome.final_loss);
    report["iterations"] = json!(outcome.records);
    report["gradient_check"] = json!(gradcheck);
    report["seconds_total"] = json!(started.elapsed().as_secs_f64());
    report["files"] = json!(files);
    shared::io::write_json_atomic(&out_dir.join("report.json"), &report)?;
    log(&format!("wrote {} to {}", files.join(", "), out_dir.display()));
    Ok(RunSummary {
        initial_loss: outcome.initial_loss,
        final_loss: outcome.final_loss,
        gradcheck_rel_error: gradcheck.map(|c| c.max_rel_error()),
        files,
    })
}
