//! Random-access, normalised minibatches over an opened dataset, with the statistics, value
//! bounds and dims the model is built for.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use shared::rng::SplitMix64;

use super::normalization::{model_state, privileged_targets, uses_images, Normalization, TASK_FRAME_DIM};
use crate::dataset::Dataset;
use crate::encoders::EncoderKind;
use crate::lapo::{Batch, Dims, ValueBounds};

/// Random-access transitions over an opened dataset (the memory maps stay where they are; a
/// batch gathers from them).
pub struct Replay {
    pub dataset: Dataset,
    /// The transitions training samples from: every episode's but the held-out ones'.
    index: Vec<(usize, usize)>,
    /// Episodes kept out of training, for offline evaluation (the dataset's last ones).
    held_out: Vec<usize>,
    pub norm: Normalization,
    pub bounds: ValueBounds,
    pub encoder: EncoderKind,
    pub dims: Dims,
    /// Learning reward of a success (terminal) transition of a collected dataset, in scaled
    /// units: the value of an absorbing state paying the maximal per-step reward forever,
    /// 1/(1 − γ) = max_v. `None` for an imported dataset, whose terminal steps keep their own
    /// reward (there is no environment bonus to replace).
    pub terminal_reward: Option<f32>,
}

impl Replay {
    /// Every episode is trained on (the environment evaluates the policy).
    pub fn open(dir: &Path, encoder: EncoderKind, gamma: f64) -> Result<Self> {
        Self::open_split(dir, encoder, gamma, 0)
    }

    /// The last `held_out_episodes` episodes are kept out of training and out of the statistics
    /// (see [`Replay::held_out`]).
    pub fn open_split(dir: &Path, encoder: EncoderKind, gamma: f64, held_out_episodes: usize) -> Result<Self> {
        let dataset = Dataset::open(dir).with_context(|| format!("opening dataset {}", dir.display()))?;
        let episodes = dataset.num_episodes();
        anyhow::ensure!(
            held_out_episodes < episodes,
            "dataset {} has {episodes} episodes: holding out {held_out_episodes} leaves none to train on",
            dir.display()
        );
        let held_out: Vec<usize> = (episodes - held_out_episodes..episodes).collect();
        let mut index = Vec::new();
        for e in dataset.episodes().take(episodes - held_out_episodes) {
            for t in 0..e.len() {
                index.push((e.meta().index, t));
            }
        }
        anyhow::ensure!(!index.is_empty(), "dataset {} has no transitions", dir.display());
        let meta = dataset.meta();
        let from_environment = !meta.is_imported();
        // The environment's privileged state is seen by state-only models and predicted by image
        // encoders; an imported dataset has none.
        let with_privileged = from_environment;
        let state_dim = if uses_images(encoder) || !with_privileged {
            meta.state_dim
        } else {
            meta.state_dim + meta.environment_state_dim + TASK_FRAME_DIM
        };
        let action_dim = meta.action_dim;
        // Means and stds in f64 over every training transition; +1e-6 as the reference.
        let (mut s_sum, mut s_sq) = (vec![0f64; state_dim], vec![0f64; state_dim]);
        let (mut a_sum, mut a_sq) = (vec![0f64; action_dim], vec![0f64; action_dim]);
        let (mut r_min, mut r_max) = (f64::INFINITY, f64::NEG_INFINITY);
        let (mut all_min, mut all_max) = (0f64, 0f64);
        let privileged_dim =
            if uses_images(encoder) && with_privileged { meta.environment_state_dim + TASK_FRAME_DIM } else { 0 };
        let (mut p_sum, mut p_sq) = (vec![0f64; privileged_dim], vec![0f64; privileged_dim]);
        let model_state = |state: &[f32], environment_state: &[f32]| {
            if with_privileged {
                model_state(encoder, state, environment_state)
            } else {
                state.to_vec()
            }
        };
        for &(e, t) in &index {
            let tr = dataset.episode(e).expect("indexed episode exists").transition(t);
            if privileged_dim > 0 {
                for (i, x) in privileged_targets(tr.state, tr.environment_state).iter().enumerate() {
                    p_sum[i] += *x as f64;
                    p_sq[i] += (*x as f64).powi(2);
                }
            }
            for (i, x) in model_state(tr.state, tr.environment_state).iter().enumerate() {
                s_sum[i] += *x as f64;
                s_sq[i] += (*x as f64).powi(2);
            }
            for (i, x) in tr.action.iter().enumerate() {
                a_sum[i] += *x as f64;
                a_sq[i] += (*x as f64).powi(2);
            }
            // The success bonus (1.0 per remaining step, up to ~190) is not a per-step reward:
            // scaling by a max r that includes it shrinks every shaped reward ~150×. Scale by
            // the per-step rewards only; success becomes an absorbing value below.
            if !tr.terminal {
                r_min = r_min.min(tr.reward as f64);
                r_max = r_max.max(tr.reward as f64);
            }
            all_min = all_min.min(tr.reward as f64);
            all_max = all_max.max(tr.reward as f64);
        }
        let n = index.len() as f64;
        let stats = |sum: &[f64], sq: &[f64]| -> (Vec<f32>, Vec<f32>) {
            let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
            let std = sq.iter().zip(&mean).map(|(q, m)| ((q / n - m * m).max(0.0).sqrt() + 1e-6) as f32).collect();
            (mean.into_iter().map(|m| m as f32).collect(), std)
        };
        let (state_mean, state_std) = stats(&s_sum, &s_sq);
        let (action_mean, action_std) = stats(&a_sum, &a_sq);
        let (privileged_mean, privileged_std) = stats(&p_sum, &p_sq);
        let (reward_scale, bounds, terminal_reward) = if from_environment {
            anyhow::ensure!(
                r_max > 0.0,
                "dataset per-step rewards are never positive (max {r_max}): cannot scale by max r"
            );
            let bounds = ValueBounds { min_v: r_min / r_max / (1.0 - gamma), max_v: 1.0 / (1.0 - gamma) };
            (r_max as f32, bounds, Some((1.0 / (1.0 - gamma)) as f32))
        } else {
            // Sparse task rewards (robomimic's 1 on success, a `--reward` rule's 1 at the end)
            // come on terminal steps: scale by the largest reward of any step, so the returns
            // stay within ±1/(1 − γ).
            let scale = all_max.abs().max(all_min.abs());
            anyhow::ensure!(
                scale > 0.0,
                "dataset {}: every reward of the training episodes is 0: there is nothing to learn a value from \
                 (a source without rewards is converted with --reward)",
                dir.display()
            );
            let bounds = ValueBounds { min_v: all_min / scale / (1.0 - gamma), max_v: all_max / scale / (1.0 - gamma) };
            (scale as f32, bounds, None)
        };
        let dims = Dims {
            state_dim,
            action_dim,
            image_hw: (meta.image_height, meta.image_width),
            privileged_dim,
            supersample: meta.env.as_ref().map_or(1, |env| env.supersample),
            cameras: meta.cameras.clone(),
            from_environment,
        };
        let norm = Normalization {
            state_mean,
            state_std,
            action_mean,
            action_std,
            reward_scale,
            privileged_mean,
            privileged_std,
        };
        Ok(Self { dataset, index, held_out, norm, bounds, encoder, dims, terminal_reward })
    }

    /// Episodes kept out of training (for offline evaluation), in dataset order.
    pub fn held_out(&self) -> &[usize] {
        &self.held_out
    }

    /// The state vector the model sees of a transition's observation.
    fn model_state(&self, state: &[f32], environment_state: &[f32]) -> Vec<f32> {
        if self.dims.from_environment {
            model_state(self.encoder, state, environment_state)
        } else {
            state.to_vec()
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// A uniformly sampled, normalised minibatch; `rng` decides which transitions.
    pub fn sample(&self, batch_size: usize, rng: &mut SplitMix64, dtype: DType, device: &Device) -> Result<Batch> {
        let picks: Vec<(usize, usize)> =
            (0..batch_size).map(|_| self.index[(rng.next_u64() % self.index.len() as u64) as usize]).collect();
        self.batch(&picks, dtype, device)
    }

    /// Every (episode, step) pair, in dataset order.
    pub fn index(&self) -> &[(usize, usize)] {
        &self.index
    }

    /// The normalised minibatch of the given (episode, step) transitions.
    pub fn batch(&self, picks: &[(usize, usize)], dtype: DType, device: &Device) -> Result<Batch> {
        let batch_size = picks.len();
        let (h, w) = self.dims.image_hw;
        let images = uses_images(self.encoder);
        let (sd, ad) = (self.dims.state_dim, self.dims.action_dim);
        let mut state = Vec::with_capacity(batch_size * sd);
        let mut next_state = Vec::with_capacity(batch_size * sd);
        let mut action = Vec::with_capacity(batch_size * ad);
        let mut reward = Vec::with_capacity(batch_size);
        let mut done = Vec::with_capacity(batch_size);
        let pd = self.dims.privileged_dim;
        let mut privileged = Vec::with_capacity(batch_size * pd);
        let cameras = self.dims.cameras.len();
        let frame = 3 * cameras * h * w;
        let mut img = if images { vec![0f32; batch_size * frame] } else { Vec::new() };
        let mut next_img = if images { vec![0f32; batch_size * frame] } else { Vec::new() };
        for (b, &(e, t)) in picks.iter().enumerate() {
            let tr = self.dataset.episode(e).expect("indexed episode exists").transition(t);
            state.extend(self.norm.state(&self.model_state(tr.state, tr.environment_state)));
            next_state.extend(self.norm.state(&self.model_state(tr.next_state, tr.next_environment_state)));
            action.extend(
                tr.action.iter().zip(&self.norm.action_mean).zip(&self.norm.action_std).map(|((x, m), s)| (x - m) / s),
            );
            // Success: the absorbing value replaces the env's undiscounted remaining-steps bonus.
            reward.push(match self.terminal_reward {
                Some(absorbing) if tr.terminal => absorbing,
                _ => tr.reward / self.norm.reward_scale,
            });
            // Bootstrap through time limits; only success is terminal.
            done.push(if tr.terminal { 1f32 } else { 0f32 });
            if pd > 0 {
                privileged.extend(self.norm.privileged(&privileged_targets(tr.state, tr.environment_state)));
            }
            if images {
                cameras_to_chw(&tr.images, h, w, &mut img[b * frame..(b + 1) * frame]);
                cameras_to_chw(&tr.next_images, h, w, &mut next_img[b * frame..(b + 1) * frame]);
            }
        }
        let t2 = |v: Vec<f32>, d: usize| Tensor::from_vec(v, (batch_size, d), device).and_then(|t| t.to_dtype(dtype));
        let t4 =
            |v: Vec<f32>| Tensor::from_vec(v, (batch_size, 3 * cameras, h, w), device).and_then(|t| t.to_dtype(dtype));
        Ok(Batch {
            images: if images { Some(t4(img)?) } else { None },
            next_images: if images { Some(t4(next_img)?) } else { None },
            state: t2(state, sd)?,
            next_state: t2(next_state, sd)?,
            action: t2(action, ad)?,
            reward: t2(reward, 1)?,
            done: t2(done, 1)?,
            privileged: if pd > 0 { Some(t2(privileged, pd)?) } else { None },
        })
    }
}

/// HWC u8 images, one per camera → (3 × cameras)×H×W floats in [0, 1] (camera-major, then RGB).
pub fn cameras_to_chw(images: &[&[u8]], h: usize, w: usize, out: &mut [f32]) {
    for (c, img) in images.iter().enumerate() {
        for y in 0..h {
            for x in 0..w {
                let p = (y * w + x) * 3;
                for k in 0..3 {
                    out[((c * 3 + k) * h + y) * w + x] = img[p + k] as f32 / 255.0;
                }
            }
        }
    }
}
