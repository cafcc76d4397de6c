//! The denoiser interface and its building blocks.
//!
//! A [`Denoiser`] returns the clean-sample prediction `D(x, σ)` for video latents
//! `x: (B, C, T, H, W)` at per-frame noise levels `σ: (B, T)` (EDM coordinates, see
//! [`crate::param`]). Raw networks implement [`Network`] and become denoisers through
//! [`Preconditioned`]; [`FrameReplace`] and [`ClassifierFreeGuidance`] wrap any denoiser.
//! The analytic denoisers here ([`GaussianDenoiser`], [`MixtureDenoiser`]) are exact posterior
//! means, so tests can compare against closed-form answers.

use candle_core::{DType, Result, Tensor, D};

use crate::param::Parameterization;

/// What a denoiser is conditioned on. Opaque to the solvers: they only pass it through.
#[derive(Clone, Debug, Default)]
pub struct Conditioning {
    /// Clean condition frames (B, C, T, H, W); only the frames where `mask` is 1 matter.
    pub frames: Option<Tensor>,
    /// Frame mask (B, 1, T, 1, 1): 1 on conditioning frames. Also fed to networks as an input
    /// channel (Cosmos' condition mask).
    pub mask: Option<Tensor>,
    /// Context embeddings (text tokens (B, L, D) for a DiT; a class log-prior (B, K) or (K,)
    /// for [`MixtureDenoiser`]).
    pub context: Option<Tensor>,
    /// The trajectory's unit-variance initial noise z0, set by [`crate::trajectory::Trajectory`]
    /// itself on every run (whatever was here is replaced), for denoisers whose output depends
    /// on z0 directly and not only through x — diffusers' Predict2.5 fixes the conditioning
    /// frames' velocity to (z0 − conditioning latents) for the whole loop. Gradients flow
    /// through it in both backward modes.
    pub initial_noise: Option<Tensor>,
}

impl Conditioning {
    /// Frame-replace conditioning: the first `k` of `frames`' T frames are the condition.
    pub fn frame_replace(frames: &Tensor, k: usize) -> Result<Self> {
        let (b, _c, t, _h, _w) = frames.dims5()?;
        if k > t {
            candle_core::bail!("{k} condition frames requested but the video has only {t}");
        }
        let mask: Vec<f64> = (0..b).flat_map(|_| (0..t).map(move |i| if i < k { 1.0 } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (b, 1, t, 1, 1), frames.device())?.to_dtype(frames.dtype())?;
        Ok(Self { frames: Some(frames.clone()), mask: Some(mask), context: None, initial_noise: None })
    }

    /// The same conditioning with another context (the unconditional branch of CFG).
    pub fn with_context(&self, context: Option<Tensor>) -> Self {
        Self { context, ..self.clone() }
    }
}

/// A network predicting the clean sample at noise level σ, in EDM coordinates.
pub trait Denoiser {
    /// `x`: (B, C, T, H, W); `sigma`: (B, T), per-frame noise levels. Returns x0 prediction.
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor>;

    /// One line for logs and reports.
    fn describe(&self) -> String;
}

impl<T: Denoiser + ?Sized> Denoiser for &T {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        (**self).denoise(x, sigma, cond)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

impl<T: Denoiser + ?Sized> Denoiser for Box<T> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        (**self).denoise(x, sigma, cond)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// (B, T) per-frame values reshaped to broadcast over (B, C, T, H, W).
pub fn per_frame(v: &Tensor) -> Result<Tensor> {
    let (b, t) = v.dims2()?;
    v.reshape((b, 1, t, 1, 1))
}

/// A uniform noise level σ for every frame of a (B, C, T, H, W) latent.
pub fn uniform_sigma(x: &Tensor, sigma: f64) -> Result<Tensor> {
    let (b, _c, t, _h, _w) = x.dims5()?;
    Tensor::ones((b, t), x.dtype(), x.device())? * sigma
}

/// A raw network: output `F(c_in·x, c_noise, cond)` whose meaning is set by a
/// [`Parameterization`] (x0, ε, velocity, or EDM's F). Frozen weights should be plain tensors
/// (not `Var`s) so that a forward records no weight gradients.
pub trait Network {
    /// `x_in`: scaled latent (B, C, T, H, W); `c_noise`: (B, T).
    fn forward(&self, x_in: &Tensor, c_noise: &Tensor, cond: &Conditioning) -> Result<Tensor>;
    fn describe(&self) -> String;
}

/// Turns a raw [`Network`] into a [`Denoiser`]: `D = c_skip·x + c_out·F(c_in·x, c_noise)`.
pub struct Preconditioned<N> {
    pub net: N,
    pub param: Parameterization,
}

impl<N: Network> Denoiser for Preconditioned<N> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let c = self.param.coefficients(sigma)?;
        let x_in = x.broadcast_mul(&per_frame(&c.c_in)?)?;
        let f = self.net.forward(&x_in, &c.c_noise, cond)?;
        x.broadcast_mul(&per_frame(&c.c_skip)?)? + f.broadcast_mul(&per_frame(&c.c_out)?)?
    }

    fn describe(&self) -> String {
        format!("{} ({:?} parameterisation)", self.net.describe(), self.param)
    }
}

/// The raw network whose preconditioned output is exactly a given denoiser: it inverts
/// `c_in`, `c_noise` and solves `D = c_skip·x + c_out·F` for `F`. Lets tests prove the
/// parameterisation algebra round-trips (requires `c_out ≠ 0`, i.e. σ > 0).
pub struct ExactNetwork<Dn> {
    pub denoiser: Dn,
    pub param: Parameterization,
}

impl<Dn: Denoiser> Network for ExactNetwork<Dn> {
    fn forward(&self, x_in: &Tensor, c_noise: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let sigma = self.param.sigma_from_c_noise(c_noise)?;
        let c = self.param.coefficients(&sigma)?;
        let x = x_in.broadcast_div(&per_frame(&c.c_in)?)?;
        let d = self.denoiser.denoise(&x, &sigma, cond)?;
        (d - x.broadcast_mul(&per_frame(&c.c_skip)?)?)?.broadcast_div(&per_frame(&c.c_out)?)
    }

    fn describe(&self) -> String {
        format!("exact network for {}", self.denoiser.describe())
    }
}

/// Data distributed N(μ, s²) independently per coordinate: `D(x, σ) = μ + s²/(s²+σ²)·(x − μ)`,
/// the exact posterior mean. Its probability-flow ODE has the closed-form solution
/// `x(σ) = μ + (x_T − μ)·√(σ²+s²)/√(σ_T²+s²)` ([`GaussianDenoiser::exact_ode`]).
pub struct GaussianDenoiser {
    /// Broadcastable to (B, C, T, H, W).
    pub mean: Tensor,
    pub std: f64,
}

impl GaussianDenoiser {
    /// The exact probability-flow ODE solution at σ from `x_start` at `sigma_start`.
    pub fn exact_ode(&self, x_start: &Tensor, sigma_start: f64, sigma: f64) -> Result<Tensor> {
        let s2 = self.std * self.std;
        let ratio = ((sigma * sigma + s2) / (sigma_start * sigma_start + s2)).sqrt();
        x_start.broadcast_sub(&self.mean)?.affine(ratio, 0.0)?.broadcast_add(&self.mean)
    }
}

impl Denoiser for GaussianDenoiser {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, _cond: &Conditioning) -> Result<Tensor> {
        let s2 = self.std * self.std;
        let shrink = ((sigma.sqr()? + s2)?.recip()? * s2)?;
        x.broadcast_sub(&self.mean)?.broadcast_mul(&per_frame(&shrink)?)?.broadcast_add(&self.mean)
    }

    fn describe(&self) -> String {
        format!("analytic Gaussian data N(mean, {}²): exact x0 prediction", self.std)
    }
}

/// Every frame (C, H, W) is drawn from an isotropic Gaussian mixture: pattern μ_k plus
/// N(0, s²) noise, with prior weights π_k. The exact x0 prediction per frame is
/// `a·x + (1−a)·Σ_k w_k μ_k`, a = s²/(s²+σ²), with posterior weights
/// w = softmax_k(ln π_k − ‖x − μ_k‖²/(2(s²+σ²))). Samples are visible images (the patterns),
/// so optimising z0 moves the generated frames between modes.
///
/// `cond.context`, if given, is a log-prior over the K patterns, (K,) or (B, K): this is what
/// classifier-free guidance steers.
pub struct MixtureDenoiser {
    /// (K, C, H, W).
    pub patterns: Tensor,
    pub std: f64,
}

impl Denoiser for MixtureDenoiser {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        let (k, pc, ph, pw) = self.patterns.dims4()?;
        if (pc, ph, pw) != (c, h, w) {
            candle_core::bail!("mixture patterns are ({pc}, {ph}, {pw}) but frames are ({c}, {h}, {w})");
        }
        let p = c * h * w;
        let mu = self.patterns.reshape((k, p))?.to_dtype(x.dtype())?;
        // Frames as rows: (B·T, P).
        let rows = x.permute((0, 2, 1, 3, 4))?.contiguous()?.reshape((b * t, p))?;
        let var = (sigma.sqr()? + self.std * self.std)?.reshape((b * t, 1))?;
        // ‖x − μ_k‖² = ‖x‖² − 2⟨x, μ_k⟩ + ‖μ_k‖²; the ‖x‖² term is the same for every k and
        // cancels in the softmax, so it is left out.
        let cross = rows.matmul(&mu.t()?)?;
        let mu_sq = mu.sqr()?.sum(D::Minus1)?.reshape((1, k))?;
        let dist = (mu_sq.broadcast_sub(&(cross * 2.0)?))?;
        let mut logits = (dist.broadcast_div(&var)? * -0.5)?;
        if let Some(prior) = &cond.context {
            let prior = prior.to_dtype(x.dtype())?;
            let prior = match prior.rank() {
                1 => prior.reshape((1, k))?,
                2 => prior.reshape((b, 1, k))?.broadcast_as((b, t, k))?.reshape((b * t, k))?,
                r => candle_core::bail!("mixture context must be a log-prior (K,) or (B, K), got rank {r}"),
            };
            logits = logits.broadcast_add(&prior)?;
        }
        let weights = shared::ops::softmax(&logits, D::Minus1)?;
        let mean_of_means = weights.matmul(&mu)?;
        let a = (var.recip()? * (self.std * self.std))?;
        let one_minus_a = (a.neg()? + 1.0)?;
        let d = (rows.broadcast_mul(&a)? + mean_of_means.broadcast_mul(&one_minus_a)?)?;
        d.reshape((b, t, c, h, w))?.permute((0, 2, 1, 3, 4))?.contiguous()
    }

    fn describe(&self) -> String {
        format!(
            "analytic image mixture: {} patterns {:?} + N(0, {}²) per frame, exact x0 prediction",
            self.patterns.dim(0).unwrap_or(0),
            self.patterns.dims().get(1..).unwrap_or(&[]),
            self.std
        )
    }
}

/// Frame-replace conditioning (Cosmos video2world): where the mask M is 1 the network input is
/// the clean condition, `x_in = M·gt + (1−M)·x`, and the output is forced to it,
/// `D = M·gt + (1−M)·D_inner`. The mask itself reaches the inner denoiser through `cond`.
/// With `condition_sigma`, conditioning frames are also presented to the network at that
/// (small) noise level instead of the current σ (per-frame timesteps).
pub struct FrameReplace<Dn> {
    pub inner: Dn,
    pub condition_sigma: Option<f64>,
}

impl<Dn: Denoiser> Denoiser for FrameReplace<Dn> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let (Some(gt), Some(mask)) = (&cond.frames, &cond.mask) else {
            return self.inner.denoise(x, sigma, cond);
        };
        let keep = (mask.ones_like()? - mask)?;
        let x_in = (gt.broadcast_mul(mask)? + x.broadcast_mul(&keep)?)?;
        let sigma = match self.condition_sigma {
            Some(cs) => {
                let (b, t) = sigma.dims2()?;
                let m = mask.flatten_all()?.reshape((b, t))?;
                ((&m * cs)? + sigma.mul(&(m.ones_like()? - &m)?)?)?
            }
            None => sigma.clone(),
        };
        let d = self.inner.denoise(&x_in, &sigma, cond)?;
        gt.broadcast_mul(mask)? + d.broadcast_mul(&keep)?
    }

    fn describe(&self) -> String {
        format!("frame-replace conditioning over {}", self.inner.describe())
    }
}

/// Classifier-free guidance in x0 space: `D = D_c + g·(D_c − D_u)`, where the unconditional
/// branch sees `uncond_context` in place of the conditioning's context (g = 0: conditional only).
pub struct ClassifierFreeGuidance<Dn> {
    pub inner: Dn,
    pub scale: f64,
    pub uncond_context: Option<Tensor>,
}

impl<Dn: Denoiser> Denoiser for ClassifierFreeGuidance<Dn> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let d_c = self.inner.denoise(x, sigma, cond)?;
        if self.scale == 0.0 {
            return Ok(d_c);
        }
        let d_u = self.inner.denoise(x, sigma, &cond.with_context(self.uncond_context.clone()))?;
        &d_c + ((&d_c - d_u)? * self.scale)?
    }

    fn describe(&self) -> String {
        format!("classifier-free guidance (g = {}) over {}", self.scale, self.inner.describe())
    }
}

/// A (B, C, T, H, W) shape helper: the number of elements per sample.
pub fn sample_dim(x: &Tensor) -> usize {
    x.dims().iter().skip(1).product()
}

/// Converts a tensor to f64 values on the host (for reports and checks).
pub fn to_vec_f64(x: &Tensor) -> Result<Vec<f64>> {
    x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use candle_core::Device;

    use super::*;

    /// What a denoiser call saw: the context tag (None without context), frames, mask, x, σ.
    struct Seen {
        context: Option<Vec<f64>>,
        frames: Option<Vec<f64>>,
        mask: Option<Vec<f64>>,
        x: Vec<f64>,
        sigma: Vec<f64>,
    }

    /// A denoiser whose output is a known tensor chosen by the context: `cond_out` when the
    /// context is [+1], `uncond_out` otherwise (context [−1] or none). Records every call.
    struct Scripted {
        cond_out: Tensor,
        uncond_out: Tensor,
        calls: RefCell<Vec<Seen>>,
    }

    impl Denoiser for Scripted {
        fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
            let opt = |t: &Option<Tensor>| t.as_ref().map(to_vec_f64).transpose();
            let context = opt(&cond.context)?;
            let conditional = context.as_deref() == Some(&[1.0][..]);
            self.calls.borrow_mut().push(Seen {
                context,
                frames: opt(&cond.frames)?,
                mask: opt(&cond.mask)?,
                x: to_vec_f64(x)?,
                sigma: to_vec_f64(sigma)?,
            });
            Ok(if conditional { self.cond_out.clone() } else { self.uncond_out.clone() })
        }

        fn describe(&self) -> String {
            "scripted outputs".into()
        }
    }

    const SHAPE: (usize, usize, usize, usize, usize) = (1, 1, 2, 1, 2);

    fn t5(v: [f64; 4]) -> Tensor {
        Tensor::from_vec(v.to_vec(), SHAPE, &Device::Cpu).unwrap()
    }

    /// D_c = [1, 2, −3, 0.5], D_u = [0.5, 4, −3, 2]: dyadic, so the expected values below are
    /// exact in f64 and are compared with ==.
    fn scripted() -> Scripted {
        Scripted {
            cond_out: t5([1.0, 2.0, -3.0, 0.5]),
            uncond_out: t5([0.5, 4.0, -3.0, 2.0]),
            calls: RefCell::new(vec![]),
        }
    }

    fn inputs() -> (Tensor, Tensor, Conditioning) {
        let x = t5([0.25, -1.0, 3.0, 7.5]);
        let sigma = Tensor::new(&[[0.7f64, 0.7]], &Device::Cpu).unwrap();
        let frames = t5([9.0, 8.0, 7.0, 6.0]);
        let mut cond = Conditioning::frame_replace(&frames, 1).unwrap();
        cond.context = Some(Tensor::new(&[1.0f64], &Device::Cpu).unwrap());
        (x, sigma, cond)
    }

    fn uncond_tag() -> Option<Tensor> {
        Some(Tensor::new(&[-1.0f64], &Device::Cpu).unwrap())
    }

    /// D = D_c + g·(D_c − D_u) elementwise (upstream Cosmos' form), with the values worked out
    /// by hand: g = 2.5 → [2.25, −3, −3, −3.25]; g = 1 → [1.5, 0, −3, −1] (diffusers' Cosmos
    /// pipelines skip guidance for g ≤ 1; here only g = 0 means "conditional only"). The
    /// unconditional call sees the uncond context and everything else unchanged: the same x,
    /// σ, conditioning frames and mask (upstream keeps the conditioning frames in both branches).
    #[test]
    fn cfg_combines_known_outputs_elementwise() {
        for (scale, expected) in [(2.5, [2.25, -3.0, -3.0, -3.25]), (1.0, [1.5, 0.0, -3.0, -1.0])] {
            let cfg = ClassifierFreeGuidance { inner: scripted(), scale, uncond_context: uncond_tag() };
            let (x, sigma, cond) = inputs();
            let d = to_vec_f64(&cfg.denoise(&x, &sigma, &cond).unwrap()).unwrap();
            assert_eq!(d, expected.to_vec(), "g = {scale}");
            let calls = cfg.inner.calls.borrow();
            assert_eq!(calls.len(), 2);
            let (c, u) = (&calls[0], &calls[1]);
            assert_eq!(c.context, Some(vec![1.0]));
            assert_eq!(u.context, Some(vec![-1.0]), "the unconditional branch sees the uncond context");
            assert_eq!(u.frames, Some(vec![9.0, 8.0, 7.0, 6.0]), "it keeps the conditioning frames");
            assert_eq!(u.mask, Some(vec![1.0, 0.0]), "and the mask");
            assert!(c.frames == u.frames && c.mask == u.mask && c.x == u.x && c.sigma == u.sigma);
            assert_eq!(u.x, vec![0.25, -1.0, 3.0, 7.5]);
        }
    }

    /// g = 0: the conditional prediction itself, and the unconditional branch is not run.
    #[test]
    fn cfg_scale_zero_is_conditional_only() {
        let cfg = ClassifierFreeGuidance { inner: scripted(), scale: 0.0, uncond_context: uncond_tag() };
        let (x, sigma, cond) = inputs();
        let d = to_vec_f64(&cfg.denoise(&x, &sigma, &cond).unwrap()).unwrap();
        assert_eq!(d, vec![1.0, 2.0, -3.0, 0.5]);
        assert_eq!(cfg.inner.calls.borrow().len(), 1);
    }

    /// Without an uncond context the unconditional branch runs with no context at all (the
    /// conditioning frames still kept): g = 2 → D_c + 2·(D_c − D_u) = [2, −2, −3, −2.5].
    #[test]
    fn cfg_without_uncond_context_drops_the_context() {
        let cfg = ClassifierFreeGuidance { inner: scripted(), scale: 2.0, uncond_context: None };
        let (x, sigma, cond) = inputs();
        let d = to_vec_f64(&cfg.denoise(&x, &sigma, &cond).unwrap()).unwrap();
        assert_eq!(d, vec![2.0, -2.0, -3.0, -2.5]);
        let calls = cfg.inner.calls.borrow();
        assert_eq!(calls[1].context, None);
        assert_eq!(calls[1].frames, Some(vec![9.0, 8.0, 7.0, 6.0]));
    }
}
