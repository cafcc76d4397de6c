//! Noise-level schedules σ_0 > σ_1 > … > σ_N in EDM coordinates (separate from the solvers,
//! as in k-diffusion / diffusers).

/// How the first sample is formed from the unit-variance noise z0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Start {
    /// x_0 = σ_0·z0 (EDM, k-diffusion, Cosmos' own samplers, diffusers' Predict2).
    Sigma,
    /// x_0 = (1 + σ_0)·z0: diffusers' flow pipelines (Predict2.5) take the raw noise as the
    /// flow sample at t_0 = σ_0/(1 + σ_0) < 1, x_flow = z0; in EDM coordinates
    /// x = x_flow/(1 − t_0) = (1 + σ_0)·z0.
    FlowNoise,
}

/// A decreasing list of N+1 noise levels. The trajectory starts at `x = σ_0·z0`, takes N solver
/// steps, and — when `σ_N > 0` and `denoise_last` — ends with one clean pass `D(x_N, σ_N)`
/// (Cosmos `res_sampler`); otherwise its output is x_N.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Schedule {
    pub sigmas: Vec<f64>,
    /// The clean pass at σ_N > 0 (Cosmos' own sampler). diffusers' Cosmos-Predict2 pipeline
    /// instead ends on a zero-length step at σ_min and returns x_N.
    pub denoise_last: bool,
    pub start: Start,
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("too few steps for this schedule (num_steps = 0, or 1 for diffusers' Karras flow schedules)")]
    NoSteps,
    #[error("sigma_max ({max}) must be greater than sigma_min ({min}) and sigma_min must be > 0")]
    BadRange { min: f64, max: f64 },
    #[error("rho must be positive, got {0}")]
    BadRho(f64),
    #[error("shift must be positive, got {0}")]
    BadShift(f64),
}

impl Schedule {
    /// Karras et al. (2022) schedule, i = 0..N:
    /// σ_i = (σ_max^{1/ρ} + i/N·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ. Ends at σ_min (not 0), as Cosmos.
    pub fn karras(num_steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Result<Self, ScheduleError> {
        if num_steps == 0 {
            return Err(ScheduleError::NoSteps);
        }
        if !(sigma_min > 0.0 && sigma_max > sigma_min) {
            return Err(ScheduleError::BadRange { min: sigma_min, max: sigma_max });
        }
        if rho <= 0.0 {
            return Err(ScheduleError::BadRho(rho));
        }
        let (a, b) = (sigma_max.powf(1.0 / rho), sigma_min.powf(1.0 / rho));
        let sigmas = (0..=num_steps).map(|i| (a + i as f64 / num_steps as f64 * (b - a)).powf(rho)).collect();
        Ok(Self { sigmas, denoise_last: true, start: Start::Sigma })
    }

    /// diffusers' `FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)` as
    /// `Cosmos2VideoToWorldPipeline` sets it up (σ_max 80, σ_min 0.002, `final_sigmas_type =
    /// "sigma_min"`): `num_steps` Karras levels from σ_max to σ_min (ρ = 7) — so N − 1 intervals —
    /// then σ_min once more, a last step of length zero; the output is x_N (no clean pass). Only
    /// the Euler solver takes that zero-length step meaningfully (the multistep solvers divide by
    /// log ratios).
    pub fn karras_flow_match(
        num_steps: usize,
        sigma_min: f64,
        sigma_max: f64,
        rho: f64,
    ) -> Result<Self, ScheduleError> {
        if num_steps < 2 {
            return Err(ScheduleError::NoSteps);
        }
        let mut sigmas = Self::karras(num_steps - 1, sigma_min, sigma_max, rho)?.sigmas;
        sigmas.push(sigma_min);
        Ok(Self { sigmas, denoise_last: false, start: Start::Sigma })
    }

    /// diffusers' `UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True,
    /// final_sigmas_type="zero")` as Cosmos-Predict2.5 configures it (σ_max 200, σ_min 0.01):
    /// `num_steps` Karras levels K from σ_max to σ_min (ρ = 7) — diffusers then takes flow time
    /// t = K/(1 + K), i.e. exactly these EDM σ — followed by 0. The first sample is the raw noise
    /// as the flow sample at t_0 ([`Start::FlowNoise`]); the output is x_N (σ_N = 0).
    pub fn karras_flow_sigmas(
        num_steps: usize,
        sigma_min: f64,
        sigma_max: f64,
        rho: f64,
    ) -> Result<Self, ScheduleError> {
        if num_steps < 2 {
            return Err(ScheduleError::NoSteps);
        }
        let mut sigmas = Self::karras(num_steps - 1, sigma_min, sigma_max, rho)?.sigmas;
        sigmas.push(0.0);
        Ok(Self { sigmas, denoise_last: false, start: Start::FlowNoise })
    }

    /// Rectified-flow shift schedule of Cosmos Predict2.5: s = linspace(0.999, 0, N+1)[:−1],
    /// t = shift·s / (1 + (shift−1)·s), then a final t = 0; converted to σ = t/(1−t).
    /// The last level is 0, so the trajectory's output is x_N itself.
    pub fn flow_shift(num_steps: usize, shift: f64) -> Result<Self, ScheduleError> {
        if num_steps == 0 {
            return Err(ScheduleError::NoSteps);
        }
        if shift <= 0.0 {
            return Err(ScheduleError::BadShift(shift));
        }
        let mut sigmas: Vec<f64> = (0..num_steps)
            .map(|i| {
                let s = 0.999 * (1.0 - i as f64 / num_steps as f64);
                let t = shift * s / (1.0 + (shift - 1.0) * s);
                t / (1.0 - t)
            })
            .collect();
        sigmas.push(0.0);
        Ok(Self { sigmas, denoise_last: true, start: Start::Sigma })
    }

    pub fn num_steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    pub fn sigma_start(&self) -> f64 {
        self.sigmas[0]
    }

    /// x_0 = start_scale·z0 (see [`Start`]).
    pub fn start_scale(&self) -> f64 {
        match self.start {
            Start::Sigma => self.sigmas[0],
            Start::FlowNoise => 1.0 + self.sigmas[0],
        }
    }

    pub fn sigma_end(&self) -> f64 {
        self.sigmas[self.num_steps()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karras_endpoints_and_monotone() {
        let s = Schedule::karras(35, 0.002, 80.0, 7.0).unwrap();
        assert_eq!(s.sigmas.len(), 36);
        assert!((s.sigmas[0] - 80.0).abs() < 1e-9 && (s.sigmas[35] - 0.002).abs() < 1e-12);
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
    }

    /// Interior values worked out by hand (the outside references are in
    /// tests/reference_values.rs): ρ = 2 over 16 → 1 gives σ_1 = ((√16 + √1)/2)² = 6.25 and
    /// ρ = 1 is linear spacing. A swapped ρ ↔ 1/ρ or a shifted ramp gives other numbers.
    #[test]
    fn karras_interior_values_by_hand() {
        let close =
            |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-14 * y);
        let rho2 = Schedule::karras(2, 1.0, 16.0, 2.0).unwrap().sigmas;
        assert!(close(&rho2, &[16.0, 6.25, 1.0]), "{rho2:?}");
        let linear = Schedule::karras(4, 1.0, 9.0, 1.0).unwrap().sigmas;
        assert!(close(&linear, &[9.0, 7.0, 5.0, 3.0, 1.0]), "{linear:?}");
        assert!(Schedule::karras(3, 0.1, 1.0, 0.0).is_err());
    }

    /// shift = 1 leaves t = s: s = 0.999·(1 − i/N), σ = s/(1 − s), then 0.
    #[test]
    fn flow_shift_without_shift_is_the_linear_flow_time() {
        let s = Schedule::flow_shift(2, 1.0).unwrap().sigmas;
        let expected = [0.999 / 0.001, 0.4995 / 0.5005, 0.0];
        for (a, b) in s.iter().zip(expected) {
            assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} vs {b}");
        }
        assert!(Schedule::flow_shift(2, 0.0).is_err());
    }

    #[test]
    fn flow_shift_matches_formula_and_ends_at_zero() {
        let s = Schedule::flow_shift(4, 5.0).unwrap();
        assert_eq!(s.sigmas.len(), 5);
        let t0 = 5.0 * 0.999 / (1.0 + 4.0 * 0.999);
        assert!((s.sigmas[0] - t0 / (1.0 - t0)).abs() < 1e-9);
        assert_eq!(s.sigma_end(), 0.0);
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
        assert!(Schedule::flow_shift(0, 5.0).is_err() && Schedule::karras(3, 1.0, 0.5, 7.0).is_err());
    }
}
