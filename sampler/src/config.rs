//! The params file: the source system's fields plus ours, strictly checked.
//!
//! Unknown fields, wrong types and unknown enum values each give one error that names the
//! field and, for enums, the allowed values, e.g.
//! `params.json: field `solver`: unknown value 'heun'; allowed: euler, res, unipc`.

use candle_core::DType;
use serde::{Deserialize, Serialize};
use shared::params::OptimizerKind;

use crate::noise::NoiseMode;
use crate::optimize::Direction;
use crate::solver::SolverKind;
use crate::trajectory::GradMode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    Karras,
    FlowShift,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectiveKind {
    /// MSE of every generated frame to the mixture pattern `target_pattern`.
    TargetMse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenoiserKind {
    /// Analytic image mixture (exact x0 prediction); frames are visible patterns.
    Mixture,
    /// Analytic Gaussian data around the pattern `target_pattern` (exact x0 prediction).
    Gaussian,
}

/// How the analytic denoiser is presented to the sampler: directly as an x0 predictor, or as
/// a raw network in a given parameterisation (exercises the preconditioning path a DiT uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ParamKind {
    X0,
    Edm,
    RectifiedFlow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeKind {
    F32,
    F64,
}

impl DTypeKind {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
        }
    }
}

/// Every field of a params file. All have defaults: `{}` is the built-in demo.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    // --- the source system's fields ---
    /// Optimise z0 (false: only sample once and write the frames).
    pub learn_noise: bool,
    /// Optimisation iterations.
    pub noise_steps: usize,
    /// Learning rate.
    pub noise_lr: f64,
    /// The source's `LEARNABLE_STEP_NOISE=1`: the noise injected at each step is derived from
    /// z0, the only learned tensor (= noise_mode `sde-from-z0`).
    pub learnable_step_noise: bool,
    /// Denoising steps N.
    pub num_steps: usize,
    pub sigma_max: f64,
    pub seed: u64,
    /// Classifier-free guidance scale g (D = D_c + g(D_c − D_u)); needs `guidance_class`.
    pub guidance: f64,
    // --- ours ---
    pub sigma_min: f64,
    pub rho: f64,
    pub schedule: ScheduleKind,
    /// Shift of the rectified-flow schedule.
    pub shift: f64,
    pub solver: SolverKind,
    /// `ode` | `sde` | `sde-learnable` | `sde-from-z0`; default: `sde-from-z0` if
    /// `learnable_step_noise`, else `ode`.
    pub noise_mode: Option<NoiseMode>,
    /// Churn S_churn; default in the sde modes: η at Cosmos' cap √1.2 − 1 on every step.
    pub s_churn: Option<f64>,
    pub s_tmin: f64,
    /// None: no upper bound.
    pub s_tmax: Option<f64>,
    pub s_noise: f64,
    pub optimizer: OptimizerKind,
    pub direction: Direction,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
    /// λ of the χ-norm regulariser; 0 disables.
    pub chi_reg: f64,
    pub objective: ObjectiveKind,
    /// Index of the mixture pattern the objective targets (0 disc, 1 stripes, 2 checker, 3 ramp).
    pub target_pattern: usize,
    pub denoiser: DenoiserKind,
    pub parameterization: ParamKind,
    /// Standard deviation of the analytic data around its pattern(s).
    pub data_std: f64,
    /// The mixture pattern CFG's conditional branch favours; None: no guidance.
    pub guidance_class: Option<usize>,
    /// Frame-replace conditioning: the first k frames are fixed to pattern `condition_pattern`.
    pub condition_frames: usize,
    pub condition_pattern: usize,
    pub batch: usize,
    pub channels: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub grad_mode: GradMode,
    /// Run a directional finite-difference check of the gradient before optimising.
    pub verify_grad: bool,
    pub device: String,
    pub dtype: DTypeKind,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            learn_noise: true,
            noise_steps: 30,
            noise_lr: 0.05,
            learnable_step_noise: false,
            num_steps: 20,
            sigma_max: 80.0,
            seed: 0,
            guidance: 0.0,
            sigma_min: 0.002,
            rho: 7.0,
            schedule: ScheduleKind::Karras,
            shift: 5.0,
            solver: SolverKind::Res,
            noise_mode: None,
            s_churn: None,
            s_tmin: 0.0,
            s_tmax: None,
            s_noise: 1.0,
            optimizer: OptimizerKind::Adam,
            direction: Direction::Descent,
            grad_clip: 0.0,
            chi_reg: 0.0,
            objective: ObjectiveKind::TargetMse,
            target_pattern: 0,
            denoiser: DenoiserKind::Mixture,
            parameterization: ParamKind::X0,
            data_std: 0.1,
            guidance_class: None,
            condition_frames: 0,
            condition_pattern: 1,
            batch: 1,
            channels: 3,
            frames: 4,
            height: 16,
            width: 16,
            grad_mode: GradMode::Recompute,
            verify_grad: true,
            device: "cpu".into(),
            dtype: DTypeKind::F64,
        }
    }
}

/// Every field name, in declaration order (a test keeps it equal to the struct's).
pub const FIELDS: &[&str] = &[
    "learn_noise",
    "noise_steps",
    "noise_lr",
    "learnable_step_noise",
    "num_steps",
    "sigma_max",
    "seed",
    "guidance",
    "sigma_min",
    "rho",
    "schedule",
    "shift",
    "solver",
    "noise_mode",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "s_noise",
    "optimizer",
    "direction",
    "grad_clip",
    "chi_reg",
    "objective",
    "target_pattern",
    "denoiser",
    "parameterization",
    "data_std",
    "guidance_class",
    "condition_frames",
    "condition_pattern",
    "batch",
    "channels",
    "frames",
    "height",
    "width",
    "grad_mode",
    "verify_grad",
    "device",
    "dtype",
];

/// A params-file problem, phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where a field's value came from, for error messages.
#[derive(Clone, Debug)]
pub enum Origin {
    File(String),
    /// The flag that set the field (see [`flag_of`]).
    CommandLine(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(name) => write!(f, "{name}"),
            Self::CommandLine(flag) => write!(f, "command line ({flag})"),
        }
    }
}

/// The `sampler` flag that sets a params field: `--iterations` for `noise_steps`, `--lr` for
/// `noise_lr`, otherwise the field's name in kebab case (`num_steps` → `--num-steps`).
pub fn flag_of(field: &str) -> String {
    match field {
        "noise_steps" => "--iterations".into(),
        "noise_lr" => "--lr".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// Rewrites serde's messages into "unknown value 'x'; allowed: a, b, c" for enum fields.
fn explain(err: &serde_json::Error) -> String {
    let msg = err.to_string();
    // serde: "unknown variant `heun`, expected one of `euler`, `res`, `unipc`" (or "expected `x`").
    if let Some(rest) = msg.strip_prefix("unknown variant `") {
        if let Some((value, tail)) = rest.split_once('`') {
            let allowed: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
            return format!("unknown value '{value}'; allowed: {}", allowed.join(", "));
        }
    }
    // Drop serde_json's " at line 1 column N": the position is in the one-field probe, not the file.
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}

/// Parses and validates a params document. `overrides` (from the command line) replace fields
/// of the file; errors name where the bad value came from.
pub fn parse_params(
    text: Option<(&str, &str)>,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<Params, ConfigError> {
    let mut fields = serde_json::Map::new();
    let mut origins: std::collections::HashMap<String, Origin> = Default::default();
    if let Some((name, text)) = text {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError(format!("{name}: not valid JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(ConfigError(format!("{name}: expected a JSON object of fields, e.g. {{\"num_steps\": 20}}")));
        };
        for (k, v) in map {
            origins.insert(k.clone(), Origin::File(name.to_string()));
            fields.insert(k, v);
        }
    }
    for (k, v) in overrides {
        origins.insert(k.clone(), Origin::CommandLine(flag_of(k)));
        fields.insert(k.clone(), v.clone());
    }
    // Check each field on its own so the error can name it (serde_json's messages do not).
    for (k, v) in &fields {
        let origin = &origins[k];
        if !FIELDS.contains(&k.as_str()) {
            return Err(ConfigError(format!("{origin}: unknown field `{k}`; allowed fields: {}", FIELDS.join(", "))));
        }
        let mut one = serde_json::Map::new();
        one.insert(k.clone(), v.clone());
        if let Err(e) = serde_json::from_value::<Params>(serde_json::Value::Object(one)) {
            return Err(ConfigError(format!("{origin}: field `{k}`: {}", explain(&e))));
        }
    }
    let params: Params = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| ConfigError(format!("params: {}", explain(&e))))?;
    params.validate(&|k: &str| origins.get(k).cloned().unwrap_or(Origin::File("defaults".into())))?;
    Ok(params)
}

/// Sample-sized tensors the solver carries from one step to the next (Euler none, RES
/// `D_{i−1}`, UniPC the last sample and two model outputs).
pub fn solver_state_tensors(solver: SolverKind) -> u128 {
    match solver {
        SolverKind::Euler => 0,
        SolverKind::Res => 1,
        SolverKind::Unipc => 3,
    }
}

/// Tensors the size of the sample that one gradient evaluation stores per denoising step: x_i,
/// the solver's state entering the step and, where noise is injected, the step noise.
pub fn stored_tensors_per_step(solver: SolverKind, injects: bool) -> u128 {
    1 + solver_state_tensors(solver) + u128::from(injects)
}

/// The bytes a trajectory of `num_steps` = N steps over samples of `sample_elems` elements
/// stores for its gradient — what the recomputation backward keeps besides one step's graph
/// (the full graph keeps these and every intermediate): x_0 … x_N, the solver state entering
/// steps 1 … N−1 (step 0 starts without one), the N step noises where noise is injected, and
/// the three f64 schedules (σ_i, σ̂_i, noise scales). Measured against `checkpoint_bytes` in the
/// tests (at most one tensor over, UniPC's second step carrying two of its three). Saturating,
/// so absurd sizes give a huge number, not an overflow.
pub fn stored_trajectory_bytes(
    num_steps: u128,
    sample_elems: u128,
    dtype_bytes: u128,
    solver: SolverKind,
    injects: bool,
) -> u128 {
    let tensors = num_steps
        .saturating_add(1)
        .saturating_add(num_steps.saturating_mul(u128::from(injects)))
        .saturating_add(num_steps.saturating_sub(1).saturating_mul(solver_state_tensors(solver)));
    let tensor_bytes = sample_elems.saturating_mul(dtype_bytes);
    tensors.saturating_mul(tensor_bytes).saturating_add(num_steps.saturating_add(1).saturating_mul(24))
}

impl Params {
    /// Elements of one sample, batch·channels·frames·height·width (saturating).
    pub fn sample_elems(&self) -> u128 {
        [self.batch, self.channels, self.frames, self.height, self.width]
            .iter()
            .fold(1u128, |acc, &d| acc.saturating_mul(d as u128))
    }

    /// The stored tensors of one gradient evaluation ([`stored_trajectory_bytes`]): a lower
    /// bound of the working set (one step's graph, the objective and, for learned step noises,
    /// their Adam state come on top).
    pub fn working_set_bytes(&self) -> u128 {
        let dtype_bytes = self.dtype.dtype().size_in_bytes() as u128;
        stored_trajectory_bytes(
            self.num_steps as u128,
            self.sample_elems(),
            dtype_bytes,
            self.solver,
            self.effective_noise_mode().injects(),
        )
    }

    /// The flags and fields that set [`Self::working_set_bytes`], for an error that says what to
    /// lower.
    pub fn size_description(&self) -> String {
        format!(
            "num_steps (--num-steps) {} over a {}×{}×{}×{}×{} {:?} sample (batch×channels×frames×height×width; at \
             least {} such tensors stored per step)",
            self.num_steps,
            self.batch,
            self.channels,
            self.frames,
            self.height,
            self.width,
            self.dtype,
            stored_tensors_per_step(self.solver, self.effective_noise_mode().injects())
        )
    }

    /// The noise mode after resolving the source's `learnable_step_noise` flag.
    pub fn effective_noise_mode(&self) -> NoiseMode {
        match (self.noise_mode, self.learnable_step_noise) {
            (Some(m), _) => m,
            (None, true) => NoiseMode::SdeFromZ0,
            (None, false) => NoiseMode::Ode,
        }
    }

    /// S_churn actually used: the given one, or in sde modes the value that puts η at its cap.
    pub fn effective_s_churn(&self) -> f64 {
        match self.s_churn {
            Some(c) => c,
            None if self.effective_noise_mode().injects() => {
                (self.num_steps as f64 + 1.0) * crate::noise::COSMOS_ETA_CAP
            }
            None => 0.0,
        }
    }

    /// Semantic checks, one message per problem, naming the field.
    fn validate(&self, origin: &dyn Fn(&str) -> Origin) -> Result<(), ConfigError> {
        let fail = |field: &str, msg: String| Err(ConfigError(format!("{}: field `{field}`: {msg}", origin(field))));
        if self.num_steps == 0 {
            return fail("num_steps", "must be at least 1".into());
        }
        if self.learn_noise && self.noise_steps == 0 {
            return fail("noise_steps", "must be at least 1 when learn_noise is true".into());
        }
        for (field, v) in [
            ("noise_lr", self.noise_lr),
            ("sigma_max", self.sigma_max),
            ("sigma_min", self.sigma_min),
            ("rho", self.rho),
            ("shift", self.shift),
            ("data_std", self.data_std),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return fail(field, format!("must be a positive number, got {v}"));
            }
        }
        if self.sigma_min >= self.sigma_max {
            return fail("sigma_min", format!("must be below sigma_max ({}), got {}", self.sigma_max, self.sigma_min));
        }
        for (field, v) in [
            ("grad_clip", self.grad_clip),
            ("chi_reg", self.chi_reg),
            ("s_noise", self.s_noise),
            ("s_tmin", self.s_tmin),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return fail(field, format!("must be ≥ 0, got {v}"));
            }
        }
        if let (Some(m), true) = (self.noise_mode, self.learnable_step_noise) {
            if m != NoiseMode::SdeFromZ0 {
                return fail(
                    "learnable_step_noise",
                    format!(
                        "true (the source's LEARNABLE_STEP_NOISE=1: step noise derived from z0) means noise_mode \"sde-from-z0\" and conflicts with noise_mode '{}'; drop one of them{}",
                        m.name(),
                        if m == NoiseMode::SdeLearnable {
                            " (sde-learnable learns every step noise as a tensor of its own: set only noise_mode for it)"
                        } else {
                            ""
                        }
                    ),
                );
            }
        }
        let mode = self.effective_noise_mode();
        if let Some(c) = self.s_churn {
            if !(c.is_finite() && c >= 0.0) {
                return fail("s_churn", format!("must be ≥ 0, got {c}"));
            }
            if mode.injects() && c == 0.0 {
                return fail("s_churn", format!("is 0, so noise_mode '{}' would inject nothing (churn is the only injection); set s_churn > 0 or use noise_mode \"ode\"", mode.name()));
            }
        }
        for (field, v) in [
            ("batch", self.batch),
            ("channels", self.channels),
            ("frames", self.frames),
            ("height", self.height),
            ("width", self.width),
        ] {
            if v == 0 {
                return fail(field, "must be at least 1".into());
            }
        }
        if !self.guidance.is_finite() {
            return fail("guidance", format!("must be a finite number, got {}", self.guidance));
        }
        if let Some(t) = self.s_tmax {
            if !(t.is_finite() && t >= self.s_tmin) {
                return fail("s_tmax", format!("must be finite and ≥ s_tmin ({}), got {t}", self.s_tmin));
            }
        }
        let k = crate::demo::NUM_PATTERNS;
        for (field, v) in [("target_pattern", self.target_pattern), ("condition_pattern", self.condition_pattern)] {
            if v >= k {
                return fail(
                    field,
                    format!("pattern index {v} out of range; allowed: 0..{} (disc, stripes, checker, ramp)", k - 1),
                );
            }
        }
        if let Some(c) = self.guidance_class {
            if c >= k {
                return fail("guidance_class", format!("pattern index {c} out of range; allowed: 0..{}", k - 1));
            }
        } else if self.guidance != 0.0 {
            return fail(
                "guidance",
                "classifier-free guidance needs a condition: set guidance_class (a mixture pattern index)".into(),
            );
        }
        if self.condition_frames >= self.frames {
            return fail(
                "condition_frames",
                format!("must be below frames ({}), got {}", self.frames, self.condition_frames),
            );
        }
        if let Err(e) = self.device.parse::<shared::device::DeviceSpec>() {
            return fail("device", e.to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_params(Some(("params.json", text)), &Default::default()).unwrap_err().to_string()
    }

    #[test]
    fn empty_file_is_the_demo_and_fields_list_is_complete() {
        assert_eq!(parse_params(Some(("p.json", "{}")), &Default::default()).unwrap(), Params::default());
        assert_eq!(parse_params(None, &Default::default()).unwrap(), Params::default());
        let v = serde_json::to_value(Params::default()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut sorted = FIELDS.to_vec();
        sorted.sort();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort();
        assert_eq!(keys_sorted, sorted);
    }

    #[test]
    fn malformed_params_give_one_clear_error_each() {
        let cases: &[(&str, &str)] = &[
            (r#"{"solver": "heun"}"#, "params.json: field `solver`: unknown value 'heun'; allowed: euler, res, unipc"),
            (
                r#"{"noise_mode": "langevin"}"#,
                "params.json: field `noise_mode`: unknown value 'langevin'; allowed: ode, sde, sde-learnable, sde-from-z0",
            ),
            (r#"{"direction": "up"}"#, "params.json: field `direction`: unknown value 'up'; allowed: ascent, descent"),
            (r#"{"optimizer": "lbfgs"}"#, "params.json: field `optimizer`: unknown value 'lbfgs'; allowed: adam, sgd"),
            (
                r#"{"grad_mode": "checkpoint"}"#,
                "params.json: field `grad_mode`: unknown value 'checkpoint'; allowed: recompute, full-graph",
            ),
            (r#"{"objective": "clip"}"#, "params.json: field `objective`: unknown value 'clip'; allowed: target-mse"),
            (r#"{"num_stpes": 10}"#, "params.json: unknown field `num_stpes`; allowed fields: learn_noise,"),
            (r#"{"num_steps": "ten"}"#, "params.json: field `num_steps`: invalid type: string \"ten\", expected usize"),
            (r#"{"noise_lr": -1}"#, "params.json: field `noise_lr`: must be a positive number, got -1"),
            (r#"{"num_steps": 0}"#, "params.json: field `num_steps`: must be at least 1"),
            (r#"{"sigma_min": 90}"#, "params.json: field `sigma_min`: must be below sigma_max (80), got 90"),
            (
                r#"{"learnable_step_noise": true, "noise_mode": "ode"}"#,
                "params.json: field `learnable_step_noise`: true (the source's LEARNABLE_STEP_NOISE=1: step noise derived from z0) means noise_mode \"sde-from-z0\" and conflicts with noise_mode 'ode'; drop one of them",
            ),
            (
                r#"{"learnable_step_noise": true, "noise_mode": "sde-learnable"}"#,
                "params.json: field `learnable_step_noise`: true (the source's LEARNABLE_STEP_NOISE=1: step noise derived from z0) means noise_mode \"sde-from-z0\" and conflicts with noise_mode 'sde-learnable'; drop one of them (sde-learnable learns every step noise as a tensor of its own: set only noise_mode for it)",
            ),
            (
                r#"{"noise_mode": "sde-from-z0", "s_churn": 0}"#,
                "params.json: field `s_churn`: is 0, so noise_mode 'sde-from-z0' would inject nothing",
            ),
            (
                r#"{"noise_mode": "sde", "s_churn": 0}"#,
                "params.json: field `s_churn`: is 0, so noise_mode 'sde' would inject nothing",
            ),
            (r#"{"device": "tpu"}"#, "params.json: field `device`: unknown device 'tpu'"),
            (r#"{"guidance": 2.0}"#, "params.json: field `guidance`: classifier-free guidance needs a condition"),
            (r#"{"target_pattern": 9}"#, "params.json: field `target_pattern`: pattern index 9 out of range"),
            (r#"{"height": 0}"#, "params.json: field `height`: must be at least 1"),
            (r#"{"s_tmin": 2, "s_tmax": 1}"#, "params.json: field `s_tmax`: must be finite and ≥ s_tmin (2), got 1"),
            (r#"{"num_steps": 10,}"#, "params.json: not valid JSON"),
            (r#"[1, 2]"#, "params.json: expected a JSON object of fields"),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.starts_with(want), "for {text}:\n  got  {got}\n  want {want}…");
            assert_eq!(got.lines().count(), 1, "one line per error: {got}");
        }
    }

    /// The memory estimate counts what the recomputation backward really stores: measured
    /// against `checkpoint_bytes` of a gradient evaluation, for every solver with and without
    /// injected noise, it is never below, and over by at most one sample-sized tensor (UniPC's
    /// second step carries two state tensors, not three) plus the schedules.
    #[test]
    fn the_working_set_estimate_matches_the_stored_tensors() {
        use crate::noise::NoiseState;
        use crate::trajectory::Trajectory;
        for solver in ["euler", "res", "unipc"] {
            for mode in ["ode", "sde"] {
                let text = format!(r#"{{"solver": "{solver}", "noise_mode": "{mode}", "num_steps": 6}}"#);
                let p = parse_params(Some(("p.json", &text)), &Default::default()).unwrap();
                let dev = candle_core::Device::Cpu;
                let setup = crate::demo::build(&p, &dev).unwrap();
                let noise =
                    NoiseState::draw(p.seed, &setup.shape, &setup.plan, setup.noise_mode, true, setup.dtype, &dev)
                        .unwrap();
                let traj = Trajectory {
                    denoiser: setup.denoiser.as_ref(),
                    solver: setup.solver.as_ref(),
                    cond: &setup.cond,
                    schedule: setup.schedule.clone(),
                    plan: setup.plan.clone(),
                };
                let measured =
                    traj.value_and_grad_state(&noise, setup.objective.as_ref(), p.grad_mode).unwrap().checkpoint_bytes
                        as u128;
                let estimate = p.working_set_bytes();
                let tensor = p.sample_elems() * 8;
                let slack = tensor + 24 * 7;
                assert!(
                    estimate >= measured && estimate <= measured + slack,
                    "{solver}/{mode}: estimate {estimate} B, stored {measured} B"
                );
            }
        }
        // Absurd sizes saturate instead of overflowing.
        let huge = Params { height: usize::MAX, width: usize::MAX, num_steps: usize::MAX, ..Params::default() };
        assert!(huge.working_set_bytes() > u64::MAX as u128);
    }

    #[test]
    fn command_line_overrides_and_source_fields() {
        let mut o = serde_json::Map::new();
        o.insert("solver".into(), "unipc".into());
        let p =
            parse_params(Some(("p.json", r#"{"solver": "euler", "learnable_step_noise": true, "s_churn": 5}"#)), &o)
                .unwrap();
        assert_eq!(p.solver, SolverKind::Unipc);
        // The source's LEARNABLE_STEP_NOISE=1 (step noise derived from z0) maps to sde-from-z0.
        assert_eq!(p.effective_noise_mode(), NoiseMode::SdeFromZ0);
        o.insert("solver".into(), "heun".into());
        let e = parse_params(Some(("p.json", "{}")), &o).unwrap_err().to_string();
        assert_eq!(e, "command line (--solver): field `solver`: unknown value 'heun'; allowed: euler, res, unipc");
        // sde without s_churn puts η at Cosmos' cap on every step.
        let p = parse_params(Some(("p.json", r#"{"noise_mode": "sde"}"#)), &Default::default()).unwrap();
        let plan =
            crate::noise::Churn { s_churn: p.effective_s_churn(), ..Default::default() }.plan(&[3.0, 2.0, 1.0], true);
        assert!(plan.noise_scales.iter().all(|s| *s > 0.0));
        assert!((plan.eval_sigmas[0] / 3.0 - 1.0 - crate::noise::COSMOS_ETA_CAP).abs() < 1e-12);
    }

    #[test]
    fn sde_from_z0_mode_from_file_command_line_and_source_flag() {
        let none = serde_json::Map::new();
        // Every mode by its name, in the file and on the command line (`--noise-mode`), and the
        // names listed in NoiseMode::ALLOWED are exactly the ones accepted.
        for (name, mode) in NoiseMode::ALLOWED.iter().zip([
            NoiseMode::Ode,
            NoiseMode::Sde,
            NoiseMode::SdeLearnable,
            NoiseMode::SdeFromZ0,
        ]) {
            assert_eq!(mode.name(), *name);
            let text = format!(r#"{{"noise_mode": "{name}"}}"#);
            let p = parse_params(Some(("p.json", &text)), &none).unwrap();
            assert_eq!(p.effective_noise_mode(), mode);
            let mut o = serde_json::Map::new();
            o.insert("noise_mode".into(), (*name).into());
            assert_eq!(parse_params(None, &o).unwrap().effective_noise_mode(), mode);
        }
        // The source flag alone, and with the one explicit mode it agrees with.
        for text in
            [r#"{"learnable_step_noise": true}"#, r#"{"learnable_step_noise": true, "noise_mode": "sde-from-z0"}"#]
        {
            let p = parse_params(Some(("p.json", text)), &none).unwrap();
            assert_eq!(p.effective_noise_mode(), NoiseMode::SdeFromZ0, "{text}");
            // It injects: unset s_churn puts η at the cap, as in the other sde modes.
            assert!(p.effective_s_churn() > 0.0);
        }
        // A conflicting --noise-mode on the command line is refused, naming where it came from.
        let mut o = serde_json::Map::new();
        o.insert("noise_mode".into(), "sde".into());
        let e = parse_params(Some(("p.json", r#"{"learnable_step_noise": true}"#)), &o).unwrap_err().to_string();
        assert!(
            e.starts_with("p.json: field `learnable_step_noise`: true (the source's LEARNABLE_STEP_NOISE=1"),
            "{e}"
        );
        assert!(e.contains("conflicts with noise_mode 'sde'"), "{e}");
        // The default is still the ODE.
        assert_eq!(Params::default().effective_noise_mode(), NoiseMode::Ode);
    }
}
