//! Network parameterisations, all converted to an x0 prediction in EDM coordinates.
//!
//! Everything downstream (solvers, guidance, frame replacement) works with
//! `D(x, σ)` — the clean-data prediction for `x = x0 + σ·ε` (EDM / "variance exploding"
//! coordinates). A raw network predicts something else (EDM's preconditioned `F`, ε, or the
//! rectified-flow velocity) from a rescaled input; [`Parameterization::coefficients`] gives the
//! `c_skip, c_out, c_in, c_noise` that turn it into `D = c_skip·x + c_out·F(c_in·x, c_noise)`.

use candle_core::{Result, Tensor};

/// How a raw network's output relates to the clean sample.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Parameterization {
    /// Karras et al. 2022 preconditioning with data standard deviation `sigma_data`
    /// (Cosmos: 0.5). The network predicts `F`, a mix of x0 and ε.
    Edm { sigma_data: f64 },
    /// Rectified flow seen in EDM coordinates: `t = σ/(1+σ)`, `x_rf = (1−t)·x`, the network
    /// predicts the velocity `v = ε − x0` at `t`, so `x0 = x_rf − t·v`.
    RectifiedFlow,
    /// The network predicts ε from `x/√(σ²+1)`: `x0 = x − σ·ε`.
    Epsilon,
    /// The network predicts x0 directly (input scaled by `1/√(σ²+1)`).
    X0,
}

/// Per-element preconditioning coefficients, each the shape of the σ tensor given.
#[derive(Clone, Debug)]
pub struct Coefficients {
    pub c_skip: Tensor,
    pub c_out: Tensor,
    pub c_in: Tensor,
    /// The noise-level input the network is conditioned on (¼ ln σ, or t for flows).
    pub c_noise: Tensor,
}

impl Parameterization {
    /// Coefficients for noise levels `sigma` (any shape; typically (B, T) per frame).
    pub fn coefficients(&self, sigma: &Tensor) -> Result<Coefficients> {
        let one = sigma.ones_like()?;
        match *self {
            Self::Edm { sigma_data } => {
                let sd2 = sigma_data * sigma_data;
                let var = (sigma.sqr()? + sd2)?;
                Ok(Coefficients {
                    c_skip: (var.recip()? * sd2)?,
                    c_out: (sigma.broadcast_div(&var.sqrt()?)? * sigma_data)?,
                    c_in: var.sqrt()?.recip()?,
                    c_noise: (sigma.log()? * 0.25)?,
                })
            }
            Self::RectifiedFlow => {
                let t = sigma.broadcast_div(&(sigma + 1.0)?)?;
                let one_minus_t = (&one - &t)?;
                Ok(Coefficients { c_skip: one_minus_t.clone(), c_out: t.neg()?, c_in: one_minus_t, c_noise: t })
            }
            Self::Epsilon => Ok(Coefficients {
                c_skip: one.clone(),
                c_out: sigma.neg()?,
                c_in: (sigma.sqr()? + 1.0)?.sqrt()?.recip()?,
                c_noise: (sigma.log()? * 0.25)?,
            }),
            Self::X0 => Ok(Coefficients {
                c_skip: one.zeros_like()?,
                c_out: one.clone(),
                c_in: (sigma.sqr()? + 1.0)?.sqrt()?.recip()?,
                c_noise: (sigma.log()? * 0.25)?,
            }),
        }
    }

    /// Inverse of `c_noise`: the σ a network was conditioned on (for analytic networks that
    /// need σ itself).
    pub fn sigma_from_c_noise(&self, c_noise: &Tensor) -> Result<Tensor> {
        match self {
            Self::RectifiedFlow => c_noise.broadcast_div(&(c_noise.neg()? + 1.0)?),
            _ => (c_noise * 4.0)?.exp(),
        }
    }

    /// Rectified-flow time for an EDM σ (`t = σ/(1+σ)`), and back.
    pub fn flow_t(sigma: f64) -> f64 {
        sigma / (1.0 + sigma)
    }

    pub fn sigma_from_flow_t(t: f64) -> f64 {
        t / (1.0 - t)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn coefficients(param: Parameterization, sigma: f64) -> [f64; 4] {
        let s = Tensor::new(&[[sigma]], &Device::Cpu).unwrap();
        let c = param.coefficients(&s).unwrap();
        let one = |t: &Tensor| {
            assert_eq!(t.dims(), &[1, 1], "coefficients keep the σ tensor's shape");
            t.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0]
        };
        [one(&c.c_skip), one(&c.c_out), one(&c.c_in), one(&c.c_noise)]
    }

    fn close(a: [f64; 4], b: [f64; 4]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-15 * y.abs().max(1.0))
    }

    /// Values worked out by hand (library and pipeline references: tests/reference_values.rs).
    /// EDM, σ = σ_data = 0.5: σ² + σ_d² = ½, so c_skip = ½, c_out = ¼/√½ = √2/4, c_in = √2,
    /// c_noise = ¼ ln ½. Rectified flow, σ = 1: t = ½, so c_skip = c_in = ½, c_out = −½,
    /// c_noise = ½; σ = 3: t = ¾. ε and x0 at σ = √3: c_in = ½.
    #[test]
    fn coefficients_by_hand() {
        let sqrt2 = std::f64::consts::SQRT_2;
        let edm = coefficients(Parameterization::Edm { sigma_data: 0.5 }, 0.5);
        assert!(close(edm, [0.5, sqrt2 / 4.0, sqrt2, 0.25 * 0.5f64.ln()]), "{edm:?}");
        assert_eq!(coefficients(Parameterization::RectifiedFlow, 1.0), [0.5, -0.5, 0.5, 0.5]);
        assert_eq!(coefficients(Parameterization::RectifiedFlow, 3.0), [0.25, -0.75, 0.25, 0.75]);
        let s3 = 3.0f64.sqrt();
        let eps = coefficients(Parameterization::Epsilon, s3);
        assert!(close(eps, [1.0, -s3, 0.5, 0.25 * s3.ln()]), "{eps:?}");
        let x0 = coefficients(Parameterization::X0, s3);
        assert!(close(x0, [0.0, 1.0, 0.5, 0.25 * s3.ln()]), "{x0:?}");
        assert_eq!((Parameterization::flow_t(3.0), Parameterization::sigma_from_flow_t(0.75)), (0.75, 3.0));
    }
}
