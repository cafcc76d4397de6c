//! The built-in analytic setup, used when the world model or an image policy is missing: a per-frame mixture of four
//! image-like patterns (or Gaussian data around one), exact x0 prediction, and a target-MSE
//! objective. Samples are visible images, so before/after pictures show the optimisation.

use candle_core::{DType, Device, Tensor};

use crate::config::{DenoiserKind, ObjectiveKind, ParamKind, Params, ScheduleKind};
use crate::denoiser::{
    ClassifierFreeGuidance, Conditioning, Denoiser, ExactNetwork, FrameReplace, GaussianDenoiser, MixtureDenoiser,
    Preconditioned,
};
use crate::noise::{Churn, ChurnPlan, NoiseMode};
use crate::objective::{Objective, TargetMse};
use crate::param::Parameterization;
use crate::schedule::Schedule;
use crate::solver::Solver;

pub const NUM_PATTERNS: usize = 4;
pub const PATTERN_NAMES: [&str; NUM_PATTERNS] = ["disc", "stripes", "checker", "ramp"];

/// The K = 4 patterns as (K, C, H, W) in [−1, 1]: a red disc, green horizontal stripes, a blue
/// checkerboard, a yellow diagonal ramp (colours cycle for C ≠ 3).
pub fn patterns(c: usize, h: usize, w: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let colours: [[f64; 3]; NUM_PATTERNS] = [[1.0, 0.2, 0.2], [0.2, 1.0, 0.3], [0.3, 0.3, 1.0], [1.0, 0.9, 0.1]];
    let mut data = Vec::with_capacity(NUM_PATTERNS * c * h * w);
    for (k, colour) in colours.iter().enumerate() {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let (fy, fx) = ((y as f64 + 0.5) / h as f64, (x as f64 + 0.5) / w as f64);
                    let shape = match k {
                        0 => {
                            if (fy - 0.5).powi(2) + (fx - 0.5).powi(2) < 0.32f64.powi(2) {
                                1.0
                            } else {
                                -1.0
                            }
                        }
                        1 => {
                            if (y * 4 / h.max(1)) & 1 == 0 {
                                1.0
                            } else {
                                -1.0
                            }
                        }
                        2 => {
                            if (y * 4 / h.max(1) + x * 4 / w.max(1)) & 1 == 0 {
                                1.0
                            } else {
                                -1.0
                            }
                        }
                        _ => fx + fy - 1.0,
                    };
                    data.push(0.85 * shape * colour[ch % 3]);
                }
            }
        }
    }
    Tensor::from_vec(data, (NUM_PATTERNS, c, h, w), device)?.to_dtype(dtype)
}

/// Everything a run needs, built from the params.
pub struct Setup {
    pub denoiser: Box<dyn Denoiser>,
    pub cond: Conditioning,
    pub objective: Box<dyn Objective>,
    pub solver: Box<dyn Solver>,
    pub schedule: Schedule,
    pub plan: ChurnPlan,
    pub noise_mode: NoiseMode,
    /// (B, C, T, H, W).
    pub shape: Vec<usize>,
    pub dtype: DType,
}

pub fn build(p: &Params, device: &Device) -> anyhow::Result<Setup> {
    let dtype = p.dtype.dtype();
    let shape = vec![p.batch, p.channels, p.frames, p.height, p.width];
    let pats = patterns(p.channels, p.height, p.width, dtype, device)?;
    let pattern = |k: usize| -> candle_core::Result<Tensor> { pats.get(k)?.unsqueeze(0)?.unsqueeze(2) }; // (1, C, 1, H, W)
    let base: Box<dyn Denoiser> = match p.denoiser {
        DenoiserKind::Mixture => Box::new(MixtureDenoiser { patterns: pats.clone(), std: p.data_std }),
        DenoiserKind::Gaussian => Box::new(GaussianDenoiser { mean: pattern(p.target_pattern)?, std: p.data_std }),
    };
    let param = match p.parameterization {
        ParamKind::X0 => None,
        ParamKind::Edm => Some(Parameterization::Edm { sigma_data: 0.5 }),
        ParamKind::RectifiedFlow => Some(Parameterization::RectifiedFlow),
    };
    let mut denoiser: Box<dyn Denoiser> = match param {
        None => base,
        Some(param) => Box::new(Preconditioned { net: ExactNetwork { denoiser: base, param }, param }),
    };
    let mut cond = Conditioning::default();
    if let Some(class) = p.guidance_class {
        // The conditional branch's log-prior strongly favours `class`; the unconditional one
        // is the uniform prior (context None).
        let mut prior = vec![-4.0; NUM_PATTERNS];
        prior[class] = 0.0;
        cond.context = Some(Tensor::from_vec(prior, NUM_PATTERNS, device)?.to_dtype(dtype)?);
        denoiser = Box::new(ClassifierFreeGuidance { inner: denoiser, scale: p.guidance, uncond_context: None });
    }
    if p.condition_frames > 0 {
        let frames = pattern(p.condition_pattern)?
            .broadcast_as((p.batch, p.channels, p.frames, p.height, p.width))?
            .contiguous()?;
        let fr = Conditioning::frame_replace(&frames, p.condition_frames)?;
        cond.frames = fr.frames;
        cond.mask = fr.mask;
        denoiser = Box::new(FrameReplace { inner: denoiser, condition_sigma: None });
    }
    let objective: Box<dyn Objective> = match p.objective {
        ObjectiveKind::TargetMse => Box::new(TargetMse {
            target: pattern(p.target_pattern)?,
            label: format!("pattern {} ('{}')", p.target_pattern, PATTERN_NAMES[p.target_pattern]),
        }),
    };
    let schedule = match p.schedule {
        ScheduleKind::Karras => Schedule::karras(p.num_steps, p.sigma_min, p.sigma_max, p.rho)?,
        ScheduleKind::FlowShift => Schedule::flow_shift(p.num_steps, p.shift)?,
    };
    let noise_mode = p.effective_noise_mode();
    let churn = Churn {
        s_churn: p.effective_s_churn(),
        s_tmin: p.s_tmin,
        s_tmax: p.s_tmax.unwrap_or(f64::INFINITY),
        s_noise: p.s_noise,
    };
    let plan = churn.plan(&schedule.sigmas, noise_mode.injects());
    Ok(Setup { denoiser, cond, objective, solver: p.solver.build(), schedule, plan, noise_mode, shape, dtype })
}
