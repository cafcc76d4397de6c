//! Objectives: generated frames → scalar. The optimiser maximises (ascent) or minimises
//! (descent) them.
//!
//! An objective owns whatever it needs — a frozen network held as plain tensors, reference
//! data — so the policy objective of the next issue is just another implementation (see
//! [`PolicyObjective`] and [`FramePolicy`]).

use candle_core::{Result, Tensor, Var};

/// A differentiable scalar function of the generated frames (B, C, T, H, W).
pub trait Objective {
    /// A one-element tensor, differentiable with respect to `frames`.
    fn loss(&self, frames: &Tensor) -> Result<Tensor>;

    /// The loss's value and its gradient with respect to `frames` (detached). The default is one
    /// backward through [`Self::loss`]; an objective over a memory-heavy differentiable map (the
    /// VAE decode: [`crate::cosmos::vae::DecodedObjective`]) overrides it with a recomputing VJP.
    /// The recomputing trajectory backward calls this; the full-graph one calls `loss`.
    fn value_and_grad(&self, frames: &Tensor) -> Result<(f64, Tensor)> {
        let frames = Var::from_tensor(&frames.detach())?;
        let loss = self.loss(frames.as_tensor())?;
        let grad = match loss.backward()?.get(frames.as_tensor()) {
            Some(g) => g.detach(),
            None => frames.as_tensor().zeros_like()?,
        };
        Ok((shared::gradcheck::scalar_f64(&loss)?, grad))
    }

    /// One line for logs and reports.
    fn describe(&self) -> String;
}

impl<T: Objective + ?Sized> Objective for Box<T> {
    fn loss(&self, frames: &Tensor) -> Result<Tensor> {
        (**self).loss(frames)
    }
    fn value_and_grad(&self, frames: &Tensor) -> Result<(f64, Tensor)> {
        (**self).value_and_grad(frames)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// The inner objective on the first `frames` frames of the video (B, C, T, H, W): a
/// Transfer2.5 chunk padded past the end of the video is judged on its real frames only.
pub struct FirstFrames<O> {
    pub frames: usize,
    pub inner: O,
}

impl<O: Objective> Objective for FirstFrames<O> {
    fn loss(&self, frames: &Tensor) -> Result<Tensor> {
        if self.frames > frames.dim(2)? {
            candle_core::bail!("the objective reads {} frames, the video has {}", self.frames, frames.dim(2)?)
        }
        self.inner.loss(&frames.narrow(2, 0, self.frames)?)
    }

    fn describe(&self) -> String {
        format!("{} (first {} frames)", self.inner.describe(), self.frames)
    }
}

/// mean((frames − target)²), the target broadcast to the frames' shape.
pub struct TargetMse {
    pub target: Tensor,
    pub label: String,
}

impl Objective for TargetMse {
    fn loss(&self, frames: &Tensor) -> Result<Tensor> {
        frames.broadcast_sub(&self.target.to_dtype(frames.dtype())?)?.sqr()?.mean_all()
    }

    fn describe(&self) -> String {
        format!("target-mse to {}", self.label)
    }
}

/// A frozen policy that maps generated frames to actions (the next issue's trained policy).
/// Weights should be plain tensors so nothing but the frames receives a gradient.
pub trait FramePolicy {
    /// `frames`: (B, C, T, H, W) → actions (B, A) (or any shape matching the references).
    fn actions(&self, frames: &Tensor) -> Result<Tensor>;
    fn describe(&self) -> String;
}

/// The policy objective: mean squared distance between the policy's actions on the generated
/// frames and reference actions (maximise it to find frames that fool the policy, minimise it
/// to find frames that make it act as the reference does).
pub struct PolicyObjective<P> {
    pub policy: P,
    pub reference_actions: Tensor,
}

impl<P: FramePolicy> Objective for PolicyObjective<P> {
    fn loss(&self, frames: &Tensor) -> Result<Tensor> {
        let actions = self.policy.actions(frames)?;
        actions.broadcast_sub(&self.reference_actions.to_dtype(actions.dtype())?)?.sqr()?.mean_all()
    }

    fn describe(&self) -> String {
        format!("policy objective: action MSE of {} to reference actions", self.policy.describe())
    }
}

/// A linear read-out policy `a = W·vec(frames)` (weights fixed): the stand-in used to test the
/// policy-objective plumbing until a trained policy exists.
pub struct LinearPolicy {
    /// (A, C·T·H·W).
    pub weight: Tensor,
}

impl FramePolicy for LinearPolicy {
    fn actions(&self, frames: &Tensor) -> Result<Tensor> {
        let b = frames.dim(0)?;
        frames.reshape((b, ()))?.matmul(&self.weight.to_dtype(frames.dtype())?.t()?)
    }

    fn describe(&self) -> String {
        format!("linear policy with {} actions", self.weight.dim(0).unwrap_or(0))
    }
}
