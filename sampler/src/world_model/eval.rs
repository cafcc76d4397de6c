//! Evaluating the world model on held-out clips: sampled predictions ([`predict`]), their PSNR
//! against the real frames ([`psnr`]) beside the copy-the-first-frame baseline
//! ([`copy_first_frame`]), the one-shot denoising PSNR per noise level ([`denoising_psnr`]),
//! and all of these together as `train-world-model` reports them ([`evaluate`], with the
//! real-vs-predicted figure of [`write_predictions_figure`]).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Result, Tensor};

use super::{Clips, WorldModel};
use crate::denoiser::Denoiser;
use crate::solver::SolverKind;

/// Predicted clips for held-out first frames and actions, sampled with a solver from seeded z0.
pub fn predict(
    model: &WorldModel,
    clips: &Clips,
    solver: SolverKind,
    num_steps: usize,
    sigma_min: f64,
    sigma_max: f64,
    seed: u64,
) -> anyhow::Result<Tensor> {
    let cond = model.conditioning(&clips.frames, &clips.actions)?;
    let denoiser = model.denoiser();
    let solver = solver.build();
    let schedule = crate::schedule::Schedule::karras(num_steps, sigma_min, sigma_max, 7.0)?;
    let plan = crate::noise::Churn::default().plan(&schedule.sigmas, false);
    let traj =
        crate::trajectory::Trajectory { denoiser: &denoiser, solver: solver.as_ref(), cond: &cond, schedule, plan };
    let z0 = shared::rng::SplitMix64::new(seed).normal_tensor(
        clips.frames.shape(),
        clips.frames.dtype(),
        clips.frames.device(),
    )?;
    let noises = vec![None; traj.num_steps()];
    Ok(traj.sample(&z0, &noises)?)
}

/// PSNR (dB, pixels in [0, 1]) of frames 1.. of `pred` against `real`, both (B, 3, T, H, W) in
/// [−1, 1]; also per future frame.
pub fn psnr(pred: &Tensor, real: &Tensor) -> anyhow::Result<(f64, Vec<f64>)> {
    let t = real.dim(2)?;
    let to_db = |mse: f64| 10.0 * (1.0 / mse.max(1e-12)).log10();
    let diff = ((pred.clamp(-1.0, 1.0)? - real)? * 0.5)?.sqr()?;
    let per_frame: Vec<f64> = (1..t)
        .map(|i| Ok(to_db(diff.narrow(2, i, 1)?.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)))
        .collect::<anyhow::Result<_>>()?;
    let all = to_db(diff.narrow(2, 1, t - 1)?.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?);
    Ok((all, per_frame))
}

/// The copy-the-first-frame baseline: every future frame predicted as frame 0.
pub fn copy_first_frame(real: &Tensor) -> Result<Tensor> {
    let t = real.dim(2)?;
    real.narrow(2, 0, 1)?.repeat((1, 1, t, 1, 1))
}

/// One-shot denoising error per noise level: for each σ, the PSNR of D(x0 + σε) against x0
/// on the predicted frames (what the model learned, independent of any solver).
pub fn denoising_psnr(model: &WorldModel, clips: &Clips, sigmas: &[f64], seed: u64) -> anyhow::Result<Vec<(f64, f64)>> {
    let x0 = &clips.frames;
    let cond = model.conditioning(x0, &clips.actions)?;
    let denoiser = model.denoiser();
    let mut rng = shared::rng::SplitMix64::new(seed);
    sigmas
        .iter()
        .map(|&sigma| {
            let eps = rng.normal_tensor(x0.shape(), x0.dtype(), x0.device())?;
            let x = (x0 + (eps * sigma)?)?;
            let d = denoiser.denoise(&x, &crate::denoiser::uniform_sigma(&x, sigma)?, &cond)?;
            Ok((sigma, psnr(&d, x0)?.0))
        })
        .collect()
}

/// The noise levels at which [`evaluate`] probes one-shot denoising.
pub const DENOISING_PROBE_SIGMAS: [f64; 7] = [0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 80.0];

/// How [`evaluate`] samples the held-out predictions.
#[derive(Clone, Copy, Debug)]
pub struct EvalSettings {
    pub solver: SolverKind,
    pub solver_steps: usize,
    /// Where the solver stops before the final clean pass D(x_N, σ_N).
    pub sigma_min: f64,
    pub sigma_max: f64,
    /// The run's seed: the denoising probe's noise is seeded `seed ^ 0xD1A6`, the predictions'
    /// z0 `seed ^ 0xE7A1`.
    pub seed: u64,
}

/// The held-out figures of [`evaluate`] (PSNR in dB over frames 1.., and per future frame).
#[derive(Clone, Debug)]
pub struct HeldOutEval {
    /// (σ, PSNR) of one-shot denoising at each of [`DENOISING_PROBE_SIGMAS`].
    pub denoising: Vec<(f64, f64)>,
    pub psnr_db: f64,
    pub psnr_db_per_frame: Vec<f64>,
    pub copy_first_frame_psnr_db: f64,
    pub copy_first_frame_psnr_db_per_frame: Vec<f64>,
    /// The sampled predictions (B, 3, T, H, W) in [−1, 1] (frame 0 is the condition).
    pub predictions: Tensor,
}

/// Held-out figures of `model` on `clips`: the one-shot denoising PSNR at each of
/// [`DENOISING_PROBE_SIGMAS`], then predictions sampled as `settings` says ([`predict`]) against
/// the real frames, beside the copy-the-first-frame baseline. `log` receives one line for each
/// of the two. The settings are checked before any work.
pub fn evaluate(
    model: &WorldModel,
    clips: &Clips,
    settings: &EvalSettings,
    mut log: impl FnMut(&str),
) -> anyhow::Result<HeldOutEval> {
    let mut c = shared::checks::ArgChecks::new();
    c.count("solver_steps", settings.solver_steps as u64)
        .positive("sigma_min", settings.sigma_min)
        .positive("sigma_max", settings.sigma_max)
        .require(settings.sigma_min < settings.sigma_max, || {
            format!("sigma_min ({}) must be below sigma_max ({})", settings.sigma_min, settings.sigma_max)
        })
        .require(!clips.is_empty(), || "the held-out data holds no clips".into());
    c.finish().context("world-model evaluation")?;

    let denoising = denoising_psnr(model, clips, &DENOISING_PROBE_SIGMAS, settings.seed ^ 0xD1A6)?;
    log(&format!(
        "one-shot denoising PSNR D(x0+σε) vs x0 (dB): {}",
        denoising.iter().map(|(s, p)| format!("σ={s}: {p:.2}")).collect::<Vec<_>>().join(", ")
    ));
    let t_eval = Instant::now();
    let predictions = predict(
        model,
        clips,
        settings.solver,
        settings.solver_steps,
        settings.sigma_min,
        settings.sigma_max,
        settings.seed ^ 0xE7A1,
    )?;
    let (psnr_db, psnr_db_per_frame) = psnr(&predictions, &clips.frames)?;
    let (copy_db, copy_per_frame) = psnr(&copy_first_frame(&clips.frames)?, &clips.frames)?;
    // The solver as named on the command line and in params files.
    let solver = serde_json::to_value(settings.solver)?;
    log(&format!(
        "held-out PSNR over {} clips (frames 1..{}): world model {psnr_db:.2} dB {psnr_db_per_frame:.2?} vs copy-first-frame {copy_db:.2} dB {copy_per_frame:.2?} ({:.1} s, {} {} steps)",
        clips.len(),
        model.cfg.frames - 1,
        t_eval.elapsed().as_secs_f64(),
        solver.as_str().unwrap_or_default(),
        settings.solver_steps
    ));
    Ok(HeldOutEval {
        denoising,
        psnr_db,
        psnr_db_per_frame,
        copy_first_frame_psnr_db: copy_db,
        copy_first_frame_psnr_db_per_frame: copy_per_frame,
        predictions,
    })
}

/// Writes a PNG (atomically, creating its folder) whose rows are, for each of up to 4 clips
/// spread over `clips`, the real frames then the predicted ones in `pred` (frame 0 is the given
/// condition in both).
pub fn write_predictions_figure(path: &Path, clips: &Clips, pred: &Tensor) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let n = clips.len();
    for k in 0..n.min(4) {
        let i = k * n / n.min(4);
        rows.push(crate::report::frames_to_images(&clips.frames, i, 4)?);
        rows.push(crate::report::frames_to_images(pred, i, 4)?);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    shared::io::write_atomic(path, &crate::report::png_bytes(&crate::report::grid(&rows))?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::world_model::{collect_clips, DataSpec, WorldModelConfig};

    #[test]
    fn evaluate_refuses_bad_settings_by_name() -> anyhow::Result<()> {
        let cfg = WorldModelConfig::tiny();
        let model = WorldModel::new_trainable(&cfg, &candle_nn::VarMap::new(), 0, &Device::Cpu)?;
        let spec = DataSpec { episodes: 1, first_seed: 100, frames_per_episode: 4, clip_spacing: 1 };
        let clips = collect_clips(&cfg, &spec, &Device::Cpu)?;
        let good = EvalSettings { solver: SolverKind::Res, solver_steps: 2, sigma_min: 3.0, sigma_max: 80.0, seed: 0 };
        let cases = [
            ("solver_steps", EvalSettings { solver_steps: 0, ..good }),
            ("sigma_min", EvalSettings { sigma_min: 0.0, ..good }),
            ("sigma_max", EvalSettings { sigma_max: f64::INFINITY, ..good }),
            ("must be below sigma_max", EvalSettings { sigma_min: 80.0, ..good }),
        ];
        for (field, settings) in cases {
            let mut logged = 0;
            let err = match evaluate(&model, &clips, &settings, |_| logged += 1) {
                Ok(_) => panic!("{field}: accepted"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(field), "{field}: {err}");
            assert_eq!(logged, 0, "{field}: work started before the refusal");
        }
        let eval = evaluate(&model, &clips, &good, |_| {})?;
        assert_eq!(eval.denoising.len(), DENOISING_PROBE_SIGMAS.len());
        assert_eq!(eval.predictions.dims(), clips.frames.dims());
        Ok(())
    }
}
