//! Data for the world model from the `BimanualPucks` environment: the scripted policies roll
//! out episodes, every `frame_stride`-th control step is recorded as a tiled multi-view frame
//! ([`observation_frame`]) with the joint state and the chosen action, and the episodes are cut
//! into clips ([`Clips`], [`collect_clips`]) as [`DataSpec`] says.

use anyhow::Context;
use candle_core::{Device, Result, Tensor};
use rl::env::{Env, EnvConfig, Observation, ACTION_DIM, STATE_DIM};

use super::WorldModelConfig;

/// Which scripted policies collect the episodes (cycled over episodes).
pub const COLLECTION_POLICIES: [rl::env::policy::PolicyKind; 3] =
    [rl::env::policy::PolicyKind::Expert, rl::env::policy::PolicyKind::Medium, rl::env::policy::PolicyKind::Random];

/// Clips as tensors: frames (N, 3, T, H, W) in [−1, 1], actions (N, T, A) — the action chosen
/// at each frame (the first T−1 condition the model; the last is a policy's reference) — and
/// joint states (N, T, 16) at each frame.
#[derive(Clone, Debug)]
pub struct Clips {
    pub frames: Tensor,
    pub actions: Tensor,
    pub states: Tensor,
    /// Per clip: (episode seed, first frame index, policy name).
    pub origin: Vec<(u64, usize, String)>,
}

impl Clips {
    pub fn len(&self) -> usize {
        self.origin.len()
    }

    pub fn is_empty(&self) -> bool {
        self.origin.is_empty()
    }

    /// The clips at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Result<Self> {
        let dev = self.frames.device();
        let ids = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), dev)?;
        Ok(Self {
            frames: self.frames.index_select(&ids, 0)?,
            actions: self.actions.index_select(&ids, 0)?,
            states: self.states.index_select(&ids, 0)?,
            origin: idx.iter().map(|&i| self.origin[i].clone()).collect(),
        })
    }

    /// `n` clips spread evenly over the set, in order (all of them when `n` ≥ the count): clip
    /// `i·len/n` for `i < n`, so that held-out clips come from every episode, not the first.
    pub fn spread(&self, n: usize) -> Result<Self> {
        let k = n.min(self.len());
        let idx: Vec<usize> = (0..k).map(|i| i * self.len() / k).collect();
        self.select(&idx)
    }
}

/// One tiled multi-view frame, (3, H, 3H) CHW floats in [−1, 1], box-downsampled from the
/// rendered cameras.
pub fn observation_frame(obs: &Observation, view_size: usize) -> anyhow::Result<Vec<f32>> {
    let (rh, rw) = (obs.height, obs.width);
    anyhow::ensure!(
        rh == rw && rh.is_multiple_of(view_size) && obs.images.iter().all(|i| i.len() == rh * rw * 3),
        "observation images {rh}×{rw} cannot be downsampled to {view_size}×{view_size} (rendering on?)"
    );
    let f = rh / view_size;
    let (h, w) = (view_size, 3 * view_size);
    let mut out = vec![0f32; 3 * h * w];
    let norm = 1.0 / (f * f) as f32;
    for (cam, img) in obs.images.iter().enumerate() {
        for y in 0..h {
            for x in 0..view_size {
                for ch in 0..3 {
                    let mut sum = 0u32;
                    for dy in 0..f {
                        for dx in 0..f {
                            sum += img[((y * f + dy) * rw + x * f + dx) * 3 + ch] as u32;
                        }
                    }
                    let v = sum as f32 * norm / 127.5 - 1.0;
                    out[(ch * h + y) * w + cam * view_size + x] = v;
                }
            }
        }
    }
    Ok(out)
}

/// What to collect.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DataSpec {
    pub episodes: usize,
    pub first_seed: u64,
    /// Frames recorded per episode at most (the episode may end sooner).
    pub frames_per_episode: usize,
    /// Window start spacing in frames (1 = every overlapping window).
    pub clip_spacing: usize,
}

/// Rolls out the collection policies (episode `e` uses seed `first_seed + e` and policy
/// `COLLECTION_POLICIES[e % 3]`), records a frame, the joint state and the chosen action at
/// every `frame_stride`-th control step (the action held in between), and cuts clips.
pub fn collect_clips(cfg: &WorldModelConfig, spec: &DataSpec, device: &Device) -> anyhow::Result<Clips> {
    let env_cfg = EnvConfig { render: true, ..EnvConfig::default().with_image_size(cfg.render_size, cfg.render_size) };
    let mut env = Env::new(env_cfg).context("creating the environment")?;
    let t = cfg.frames;
    let frame_len = 3 * cfg.view_size * 3 * cfg.view_size;
    let (mut frames, mut actions, mut states, mut origin) =
        (Vec::<f32>::new(), Vec::<f32>::new(), Vec::<f32>::new(), Vec::new());
    for e in 0..spec.episodes {
        let seed = spec.first_seed + e as u64;
        let kind = COLLECTION_POLICIES[e % COLLECTION_POLICIES.len()];
        let mut policy = kind.build(seed);
        let mut obs = env.reset(seed);
        let (mut ep_frames, mut ep_actions, mut ep_states) = (Vec::new(), Vec::new(), Vec::new());
        'episode: for _ in 0..spec.frames_per_episode {
            ep_frames.push(observation_frame(&obs, cfg.view_size)?);
            ep_states.push(obs.state.clone());
            let action = policy.act(&env);
            ep_actions.push(action.to_vec());
            for _ in 0..cfg.frame_stride {
                let step = env.step(&action);
                obs = step.obs;
                if step.done {
                    break 'episode;
                }
            }
        }
        let n = ep_frames.len();
        let mut start = 0;
        while start + t <= n {
            // (C, T, H, W): channel-major across the clip's frames.
            let mut clip = vec![0f32; frame_len * t];
            let plane = frame_len / 3;
            for (ti, fr) in ep_frames[start..start + t].iter().enumerate() {
                for ch in 0..3 {
                    clip[(ch * t + ti) * plane..(ch * t + ti + 1) * plane]
                        .copy_from_slice(&fr[ch * plane..(ch + 1) * plane]);
                }
            }
            frames.extend(clip);
            actions.extend(ep_actions[start..start + t].iter().flatten());
            states.extend(ep_states[start..start + t].iter().flatten());
            origin.push((seed, start, kind.name().to_string()));
            start += spec.clip_spacing.max(1);
        }
    }
    let n = origin.len();
    anyhow::ensure!(n > 0, "no clips collected (episodes too short for {t} frames?)");
    let [c, tt, h, w] = cfg.clip_shape();
    Ok(Clips {
        frames: Tensor::from_vec(frames, (n, c, tt, h, w), device)?,
        actions: Tensor::from_vec(actions, (n, t, ACTION_DIM), device)?,
        states: Tensor::from_vec(states, (n, t, STATE_DIM), device)?,
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_evenly_spaced_clips_in_order() -> anyhow::Result<()> {
        let cfg = WorldModelConfig::tiny();
        let spec = DataSpec { episodes: 2, first_seed: 100, frames_per_episode: 6, clip_spacing: 1 };
        let clips = collect_clips(&cfg, &spec, &Device::Cpu)?;
        let n = clips.len();
        assert!(n >= 6, "only {n} clips");
        let three = clips.spread(3)?;
        let expected: Vec<_> = [0, n / 3, 2 * n / 3].iter().map(|&i| clips.origin[i].clone()).collect();
        assert_eq!(three.origin, expected);
        assert_eq!(three.frames.dims()[0], 3);
        assert_eq!(clips.spread(n + 5)?.origin, clips.origin, "more than there are: all, in order");
        Ok(())
    }
}
