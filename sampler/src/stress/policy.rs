//! The policy under test as a differentiable function of generated frames: the exported LAPO
//! policy seeing the world model's clips ([`LapoFramePolicy`]), and its loading checks.

use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Result, Tensor};
use rl::policy::ExportedPolicy;
use rl::trainer::Actor;

use crate::objective::FramePolicy;

/// Bilinear resize matrix (out, in) with half-pixel centres (align_corners = false, no
/// antialiasing: PyTorch's `interpolate(mode="bilinear", align_corners=False)`), so
/// `R_h · X · R_wᵀ` resizes an image differentiably. Weights in f64; callers cast to their dtype.
pub fn bilinear_matrix(out: usize, inp: usize) -> Vec<f64> {
    let mut m = vec![0f64; out * inp];
    for i in 0..out {
        let src = ((i as f64 + 0.5) * inp as f64 / out as f64 - 0.5).clamp(0.0, (inp - 1) as f64);
        let i0 = src.floor() as usize;
        let i1 = (i0 + 1).min(inp - 1);
        let w = src - i0 as f64;
        m[i * inp + i0] += 1.0 - w;
        m[i * inp + i1] += w;
    }
    m
}

/// A LAPO policy as a [`FramePolicy`] over world-model clips (B, 3, T, H, 3H): the generated
/// frames 1…T−1 are split back into the three camera views, mapped to [0, 1], bilinearly resized
/// to the policy's input size and stacked camera-major (9 channels), and fed with the real joint
/// states. Returns de-normalised actions (B, T−1, A) in the frames' dtype.
///
/// The stress test runs it over an [`ExportedPolicy`] (f32). Any [`Actor`] works, and everything
/// is computed in the actor's dtype: over an f64 actor (a `Lapo` built in f64) the whole
/// objective runs in f64, which is what its finite-difference gradient test needs.
pub struct LapoFramePolicy<P = ExportedPolicy> {
    pub policy: P,
    /// (h, w) of the policy's camera images.
    image_hw: (usize, usize),
    /// For [`FramePolicy::describe`].
    label: String,
    /// z-scored joint states (B·(T−1), S), row-major over (clip, frame).
    states_z: Tensor,
    resize_h: Tensor,
    resize_w_t: Tensor,
    action_mean: Tensor,
    action_std: Tensor,
}

impl LapoFramePolicy<ExportedPolicy> {
    /// `states`: real joint states (B, T, S) of the clip (frame 0's is unused).
    pub fn new(policy: ExportedPolicy, states: &Tensor, view_size: usize, device: &Device) -> anyhow::Result<Self> {
        let h = &policy.header;
        let s = states.dim(2)?;
        anyhow::ensure!(s == h.state_dim, "policy expects {} state values, clips carry {s}", h.state_dim);
        anyhow::ensure!(policy.device().same_device(device), "the policy was loaded on another device");
        let label = format!(
            "exported LAPO policy ({:?} encoder, {}×{} images, iteration {})",
            h.encoder, h.image_hw.0, h.image_hw.1, h.iteration
        );
        let image_hw = h.image_hw;
        Self::from_actor(policy, image_hw, label, states, view_size)
    }
}

impl<P: Actor> LapoFramePolicy<P> {
    /// Any actor whose images are `image_hw` (h, w); computes in `policy.dtype()` on
    /// `policy.device()`. `states`: real joint states (B, T, S) of the clip (frame 0's is unused).
    pub fn from_actor(
        policy: P,
        image_hw: (usize, usize),
        label: String,
        states: &Tensor,
        view_size: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            policy.encoder().uses_images(),
            "the policy is state-only (encoder 'none'): generated images cannot change its actions; export a policy trained with --encoder conv or resnet18"
        );
        let (b, t, s) = states.dims3()?;
        let (dtype, device) = (policy.dtype(), policy.device().clone());
        let norm = policy.normalization();
        anyhow::ensure!(
            s == norm.state_mean.len(),
            "policy expects {} state values, clips carry {s}",
            norm.state_mean.len()
        );
        let row = |v: &[f32]| Tensor::from_vec(v.to_vec(), (1, v.len()), &device)?.to_dtype(dtype);
        let states_z = states
            .narrow(1, 1, t - 1)?
            .reshape((b * (t - 1), s))?
            .to_device(&device)?
            .to_dtype(dtype)?
            .broadcast_sub(&row(&norm.state_mean)?)?
            .broadcast_div(&row(&norm.state_std)?)?;
        let (ph, pw) = image_hw;
        let resize_h = Tensor::from_vec(bilinear_matrix(ph, view_size), (ph, view_size), &device)?.to_dtype(dtype)?;
        let resize_w_t = Tensor::from_vec(bilinear_matrix(pw, view_size), (pw, view_size), &device)?
            .to_dtype(dtype)?
            .t()?
            .contiguous()?;
        Ok(Self {
            action_mean: row(&norm.action_mean)?,
            action_std: row(&norm.action_std)?,
            policy,
            image_hw,
            label,
            states_z,
            resize_h,
            resize_w_t,
        })
    }

    /// Clips (B, 3, T, H, 3H) in [−1, 1] → the policy's camera stack (B·(T−1), 9, h, w) in
    /// [0, 1], in the policy's dtype.
    pub fn camera_stack(&self, frames: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w3) = frames.dims5()?;
        let v = w3 / 3;
        let n = b * (t - 1);
        let x = frames
            .narrow(2, 1, t - 1)?
            .permute((0, 2, 1, 3, 4))?
            .reshape((n, c, h, 3, v))?
            .permute((0, 3, 1, 2, 4))?
            .reshape((n, 3 * c, h, v))?
            .to_dtype(self.policy.dtype())?
            .affine(0.5, 0.5)?;
        let (ph, pw) = self.image_hw;
        let x = x.reshape((n * 3 * c * h, v))?.matmul(&self.resize_w_t)?.reshape((n * 3 * c, h, pw))?;
        let rh = self.resize_h.unsqueeze(0)?.broadcast_as((n * 3 * c, ph, h))?;
        rh.matmul(&x)?.reshape((n, 3 * c, ph, pw))
    }
}

impl<P: Actor> FramePolicy for LapoFramePolicy<P> {
    fn actions(&self, frames: &Tensor) -> Result<Tensor> {
        let (b, _c, t, _h, _w) = frames.dims5()?;
        let images = self.camera_stack(frames)?;
        let z = self.policy.act_batch(Some(&images), &self.states_z)?;
        let a = z.broadcast_mul(&self.action_std)?.broadcast_add(&self.action_mean)?;
        a.reshape((b, t - 1, ()))?.to_dtype(frames.dtype())
    }

    fn describe(&self) -> String {
        self.label.clone()
    }
}

/// Loads the policy at `path` and checks the stress test can use it: it sees images (a
/// state-only policy's actions cannot change with the generated frames) and takes the
/// environment's joint state.
pub fn load_policy(path: &Path, device: &Device) -> anyhow::Result<ExportedPolicy> {
    let policy =
        ExportedPolicy::load(path, device).with_context(|| format!("loading the policy {}", path.display()))?;
    let h = &policy.header;
    h.check_environment().with_context(|| format!("the policy {}", path.display()))?;
    anyhow::ensure!(
        h.encoder.uses_images(),
        "the policy {} is state-only (encoder 'none'): generated images cannot change its actions; export a policy trained with --encoder conv or resnet18",
        path.display()
    );
    anyhow::ensure!(
        h.state_dim == rl::env::STATE_DIM,
        "the policy {} expects {} state values, the environment has {}",
        path.display(),
        h.state_dim,
        rl::env::STATE_DIM
    );
    Ok(policy)
}
