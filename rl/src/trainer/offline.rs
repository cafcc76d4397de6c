//! Evaluation without an environment: what a policy trained on an imported dataset (no
//! simulator here) is judged by — its error on held-out episodes' recorded actions against the
//! trivial predictor, and the critic's and actor-VAE's behaviour on transitions they never saw.

use anyhow::Result;
use candle_core::{DType, Tensor, D};

use super::Replay;
use crate::lapo::Lapo;

/// Held-out metrics (episodes kept out of training by [`Replay::open_split`]). Action errors are
/// in z-scored units of the training actions, per action dimension: 1.0 is what always
/// predicting the training mean scores on data distributed like the training data.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct OfflineEvaluation {
    pub episodes: usize,
    pub transitions: usize,
    /// The policy's action against the recorded one (mean squared error, z-units).
    pub action_mse: f64,
    /// Always predicting the training mean action, on the same transitions (the baseline).
    pub mean_action_mse: f64,
    /// Root mean squared error of the policy's action per dimension, in the data's units.
    pub action_rmse: Vec<f64>,
    /// Q1(s, a) of the recorded actions and V(s), in scaled reward units: mean and spread.
    pub q_mean: f64,
    pub q_std: f64,
    pub v_mean: f64,
    pub v_std: f64,
    /// Mean squared TD error of Q1 against r + γ (1 − terminal) V(s').
    pub td_mse: f64,
    /// The actor-VAE's reconstruction of the recorded action from its posterior mean latent
    /// (mean squared error, z-units).
    pub vae_reconstruction_mse: f64,
}

/// Largest batch of one forward pass (images of a ResNet encoder dominate the memory).
const CHUNK: usize = 256;

/// Evaluates `lapo` on every transition of the replay's held-out episodes.
pub fn evaluate_offline(lapo: &Lapo, replay: &Replay) -> Result<OfflineEvaluation> {
    let picks: Vec<(usize, usize)> = replay
        .held_out()
        .iter()
        .flat_map(|&e| {
            let len = replay.dataset.episode(e).map_or(0, |view| view.len());
            (0..len).map(move |t| (e, t))
        })
        .collect();
    anyhow::ensure!(!picks.is_empty(), "no held-out transitions to evaluate on (--held-out-episodes)");
    let action_dim = replay.dims.action_dim;
    let gamma = lapo.config.gamma;
    let (mut policy_sq, mut mean_sq) = (vec![0f64; action_dim], vec![0f64; action_dim]);
    let (mut q, mut v) = (Vec::with_capacity(picks.len()), Vec::with_capacity(picks.len()));
    let (mut td_sq, mut vae_sq) = (0f64, 0f64);
    for chunk in picks.chunks(CHUNK) {
        let batch = replay.batch(chunk, lapo.dtype(), lapo.device())?;
        let s = lapo.encoder.forward_t(batch.images.as_ref(), &batch.state, false)?;
        let s_next = lapo.encoder.forward_t(batch.next_images.as_ref(), &batch.next_state, false)?;
        let policy = lapo.target_actor_vae.decode(&s, &lapo.actor.forward(&s)?)?;
        let rows = |t: &Tensor| -> Result<Vec<Vec<f32>>> { Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?) };
        let (policy, recorded) = (rows(&policy)?, rows(&batch.action)?);
        for (p, a) in policy.iter().zip(&recorded) {
            for j in 0..action_dim {
                policy_sq[j] += ((p[j] - a[j]) as f64).powi(2);
                // z-scored: the training mean action is 0.
                mean_sq[j] += (a[j] as f64).powi(2);
            }
        }
        let q1 = lapo.critic.q1(&s, &batch.action)?;
        let v_s = lapo.critic.v(&s)?;
        let target = (&batch.reward + ((1.0 - &batch.done)? * gamma)?.mul(&lapo.critic.v(&s_next)?)?)?;
        td_sq += (q1.sub(&target)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>())?;
        q.extend(q1.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        v.extend(v_s.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        let zero = Tensor::zeros((chunk.len(), lapo.actor_vae.latent_dim()), lapo.dtype(), lapo.device())?;
        let reconstruction = lapo.actor_vae.forward(&s, &batch.action, &zero)?.reconstruction;
        let err = reconstruction.sub(&batch.action)?.sqr()?.sum(D::Minus1)?.sum_all()?;
        vae_sq += err.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    let n = picks.len() as f64;
    let per_element = |sums: &[f64]| sums.iter().sum::<f64>() / (n * action_dim as f64);
    let moments = |x: &[f64]| {
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        (mean, (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len() as f64).sqrt())
    };
    let (q_mean, q_std) = moments(&q);
    let (v_mean, v_std) = moments(&v);
    let std = &replay.norm.action_std;
    Ok(OfflineEvaluation {
        episodes: replay.held_out().len(),
        transitions: picks.len(),
        action_mse: per_element(&policy_sq),
        mean_action_mse: per_element(&mean_sq),
        action_rmse: policy_sq.iter().zip(std).map(|(sq, s)| (sq / n).sqrt() * *s as f64).collect(),
        q_mean,
        q_std,
        v_mean,
        v_std,
        td_mse: td_sq / n,
        vae_reconstruction_mse: vae_sq / (n * action_dim as f64),
    })
}
