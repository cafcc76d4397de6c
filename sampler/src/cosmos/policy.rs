//! `sampler cosmos --policy FILE --policy-reference FILE`: the policy stress test's objective
//! ([`crate::stress`]) on a Cosmos video instead of the embedded world model's clip.
//!
//! The same semantics, nothing invented: an exported LAPO policy reads three camera views side
//! by side (a frame of height H and width 3H, as the world model's clips lay them out), each
//! view bilinearly resized to the policy's input size, together with the real joint state at that
//! frame; its de-normalised actions on the generated frames 1…F−1 are compared with reference
//! actions (mean squared difference, action units). Where the stress test takes the states and
//! actions from the scripted expert's episode, here they come from the reference file (see
//! [`super::inputs::read_policy_reference`]). Ascent looks for videos that push the policy's
//! actions away from the reference; descent for videos that make it act as the reference.
//!
//! Frame 0 is the conditioning frame (given, not generated) and is skipped, as the stress test
//! skips its conditioning frame.

use candle_core::{Device, Result, Tensor};
use rl::policy::ExportedPolicy;

use crate::objective::{Objective, PolicyObjective};
use crate::stress::LapoFramePolicy;

/// The policy objective on video in [0, 1] (what [`super::vae::DecodedObjective`] hands its
/// inner objective): mapped to [−1, 1], the range [`LapoFramePolicy`] reads, then the stress
/// test's [`PolicyObjective`].
pub struct PolicyOnVideo<P = ExportedPolicy> {
    pub inner: PolicyObjective<LapoFramePolicy<P>>,
}

impl PolicyOnVideo<ExportedPolicy> {
    /// `states` (1, F, S) and `actions` (1, F, A) from the reference; frames of `height` ×
    /// 3·`height`.
    pub fn new(
        policy: ExportedPolicy,
        states: &Tensor,
        actions: &Tensor,
        height: usize,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let frames = actions.dim(1)?;
        anyhow::ensure!(frames >= 2, "the policy objective needs at least 2 frames (frame 0 is the conditioning)");
        let policy = LapoFramePolicy::new(policy, states, height, device)?;
        let reference_actions = actions.narrow(1, 1, frames - 1)?.contiguous()?;
        Ok(Self { inner: PolicyObjective { policy, reference_actions } })
    }
}

impl<P: rl::trainer::Actor> Objective for PolicyOnVideo<P> {
    fn loss(&self, frames: &Tensor) -> Result<Tensor> {
        self.inner.loss(&frames.affine(2.0, -1.0)?)
    }

    fn describe(&self) -> String {
        format!("{} on frames 1..F-1 (3 camera views side by side)", self.inner.describe())
    }
}

/// Why a video of `height`×`width` with `num_frames` frames cannot feed the policy, if it cannot.
pub fn check_video_size(num_frames: usize, height: usize, width: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        width == 3 * height,
        "--policy: the policy reads three camera views side by side, so frames must be 3× as wide as \
         high (e.g. --height 256 --width 768); got --height {height} --width {width}"
    );
    anyhow::ensure!(
        num_frames >= 2,
        "--policy: needs --num-frames ≥ 2 (frame 0 is the conditioning frame; the policy reads frames 1..F-1)"
    );
    Ok(())
}
