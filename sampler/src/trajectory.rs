//! The denoising trajectory as a differentiable function of z0 and the step noises, with two
//! backward passes that give the same gradient:
//!
//! * [`GradMode::Recompute`] (default): the forward runs on detached tensors and stores only
//!   each x_i, the solver state entering each step, and the step noises. The backward walks the
//!   steps from the last, rebuilds one step's graph from fresh `Var`s and takes its
//!   vector–Jacobian product against the adjoints of (x_{i+1}, state_{i+1}). Memory beyond the
//!   stored tensors is one step's graph, whatever the number of steps.
//! * [`GradMode::FullGraph`]: one graph over the whole trajectory and a single `backward`
//!   (memory grows with the steps); kept as the reference the recomputation is tested against.

use candle_core::{Result, Tensor, Var};

use crate::denoiser::{uniform_sigma, Conditioning, Denoiser};
use crate::noise::ChurnPlan;
use crate::objective::Objective;
use crate::schedule::Schedule;
use crate::solver::{Solver, StepContext};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GradMode {
    Recompute,
    FullGraph,
}

impl GradMode {
    pub const ALLOWED: &'static [&'static str] = &["recompute", "full-graph"];
}

/// A sampler configuration: denoiser, solver, schedule, churn plan and conditioning.
pub struct Trajectory<'a> {
    pub denoiser: &'a dyn Denoiser,
    pub solver: &'a dyn Solver,
    pub cond: &'a Conditioning,
    pub schedule: Schedule,
    pub plan: ChurnPlan,
}

/// What a detached forward keeps for the recomputation backward.
pub struct Checkpoints {
    /// x_0 … x_N.
    pub xs: Vec<Tensor>,
    /// The solver state entering step i, i = 0 … N−1.
    pub states: Vec<Vec<Tensor>>,
}

impl Checkpoints {
    /// Bytes held by the stored tensors.
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.xs.iter().map(size).sum::<usize>() + self.states.iter().flatten().map(size).sum::<usize>()
    }
}

/// The objective value at the trajectory's output and its gradients.
pub struct ValueAndGrad {
    pub loss: f64,
    /// The generated sample (detached).
    pub output: Tensor,
    pub grad_z0: Tensor,
    /// ∂loss/∂ξ_i where step i injects noise.
    pub grad_steps: Vec<Option<Tensor>>,
    /// Bytes of stored x_i / state (0 for the full graph).
    pub checkpoint_bytes: usize,
}

impl Trajectory<'_> {
    fn ctx(&self) -> StepContext<'_> {
        StepContext {
            denoiser: self.denoiser,
            cond: self.cond,
            sigmas: &self.schedule.sigmas,
            eval_sigmas: &self.plan.eval_sigmas,
        }
    }

    pub fn num_steps(&self) -> usize {
        self.schedule.num_steps()
    }

    /// x_0 = σ_0·z0.
    pub fn start(&self, z0: &Tensor) -> Result<Tensor> {
        z0 * self.schedule.sigma_start()
    }

    /// Step i: churn (x += scale_i·ξ_i), then the solver step. A pure function of its inputs.
    pub fn step(
        &self,
        i: usize,
        x: &Tensor,
        state: &[Tensor],
        noise: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let scale = self.plan.noise_scales[i];
        let x = match noise {
            Some(xi) if scale > 0.0 => (x + (xi * scale)?)?,
            _ => x.clone(),
        };
        self.solver.step(&self.ctx(), i, &x, state)
    }

    /// The final clean pass D(x_N, σ_N) (Cosmos), or x_N itself when σ_N = 0.
    pub fn finish(&self, x_last: &Tensor) -> Result<Tensor> {
        let s = self.schedule.sigma_end();
        if s > 0.0 {
            self.denoiser.denoise(x_last, &uniform_sigma(x_last, s)?, self.cond)
        } else {
            Ok(x_last.clone())
        }
    }

    /// Runs the trajectory. A graph is recorded iff an input is a `Var` (or carries one);
    /// with `checkpoints`, each x_i and state is stored.
    pub fn run(
        &self,
        z0: &Tensor,
        noises: &[Option<Tensor>],
        mut checkpoints: Option<&mut Checkpoints>,
    ) -> Result<Tensor> {
        let n = self.num_steps();
        if noises.len() != n {
            candle_core::bail!("{} step noises given for {n} steps", noises.len());
        }
        let mut x = self.start(z0)?;
        let mut state: Vec<Tensor> = Vec::new();
        for (i, noise) in noises.iter().enumerate() {
            if let Some(ck) = checkpoints.as_deref_mut() {
                ck.xs.push(x.clone());
                ck.states.push(state.clone());
            }
            (x, state) = self.step(i, &x, &state, noise.as_ref())?;
        }
        if let Some(ck) = checkpoints {
            ck.xs.push(x.clone());
        }
        self.finish(&x)
    }

    /// The sample for given noises, recording no graph.
    pub fn sample(&self, z0: &Tensor, noises: &[Option<Tensor>]) -> Result<Tensor> {
        let noises: Vec<Option<Tensor>> = noises.iter().map(|n| n.as_ref().map(Tensor::detach)).collect();
        self.run(&z0.detach(), &noises, None)
    }

    /// The objective at the output and its gradient with respect to z0 and every step noise.
    pub fn value_and_grad(
        &self,
        z0: &Tensor,
        noises: &[Option<Tensor>],
        objective: &dyn Objective,
        mode: GradMode,
    ) -> Result<ValueAndGrad> {
        match mode {
            GradMode::Recompute => self.grad_recompute(z0, noises, objective),
            GradMode::FullGraph => self.grad_full_graph(z0, noises, objective),
        }
    }

    fn grad_full_graph(
        &self,
        z0: &Tensor,
        noises: &[Option<Tensor>],
        objective: &dyn Objective,
    ) -> Result<ValueAndGrad> {
        let z0_var = Var::from_tensor(&z0.detach())?;
        let noise_vars: Vec<Option<Var>> = noises
            .iter()
            .map(|n| n.as_ref().map(|t| Var::from_tensor(&t.detach())).transpose())
            .collect::<Result<_>>()?;
        let noise_tensors: Vec<Option<Tensor>> =
            noise_vars.iter().map(|v| v.as_ref().map(|v| v.as_tensor().clone())).collect();
        let output = self.run(z0_var.as_tensor(), &noise_tensors, None)?;
        let loss = objective.loss(&output)?;
        let grads = loss.backward()?;
        let grad_of = |v: &Var| -> Result<Tensor> {
            match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => v.as_tensor().zeros_like(),
            }
        };
        Ok(ValueAndGrad {
            loss: shared::gradcheck::scalar_f64(&loss)?,
            output: output.detach(),
            grad_z0: grad_of(&z0_var)?,
            grad_steps: noise_vars.iter().map(|v| v.as_ref().map(grad_of).transpose()).collect::<Result<_>>()?,
            checkpoint_bytes: 0,
        })
    }

    fn grad_recompute(
        &self,
        z0: &Tensor,
        noises: &[Option<Tensor>],
        objective: &dyn Objective,
    ) -> Result<ValueAndGrad> {
        let noises: Vec<Option<Tensor>> = noises.iter().map(|n| n.as_ref().map(Tensor::detach)).collect();
        let mut ck = Checkpoints { xs: Vec::new(), states: Vec::new() };
        // Detached inputs and frozen weights: this forward records no graph.
        self.run(&z0.detach(), &noises, Some(&mut ck))?;
        let checkpoint_bytes =
            ck.bytes() + noises.iter().flatten().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum::<usize>();

        // The final clean pass, and the objective's value and gradient at its output (its own
        // VJP: the VAE decode recomputes chunk by chunk in there).
        let x_last = Var::from_tensor(&ck.xs.pop().expect("x_N stored"))?;
        let output = self.finish(x_last.as_tensor())?;
        let (loss, grad_output) = objective.value_and_grad(&output)?;
        let mut adj_x = adjoint(&(&output * grad_output)?.sum_all()?.backward()?, &x_last)?;
        let output = output.detach();
        // The final pass reads only x_N, so no adjoint flows into the state after the last step.
        let mut adj_state: Vec<Option<Tensor>> = Vec::new();
        let mut grad_steps: Vec<Option<Tensor>> = vec![None; noises.len()];

        for i in (0..self.num_steps()).rev() {
            let x_var = Var::from_tensor(&ck.xs.pop().expect("x_i stored"))?;
            let state_vars: Vec<Var> =
                ck.states.pop().expect("state stored").iter().map(Var::from_tensor).collect::<Result<_>>()?;
            let noise_var = noises[i].as_ref().map(Var::from_tensor).transpose()?;
            let state_in: Vec<Tensor> = state_vars.iter().map(|v| v.as_tensor().clone()).collect();
            let (x_next, state_next) =
                self.step(i, x_var.as_tensor(), &state_in, noise_var.as_ref().map(|v| v.as_tensor()))?;
            // ⟨x_{i+1}, λ_x⟩ + Σ_j ⟨state_{i+1,j}, λ_j⟩: its gradient is the VJP of the step.
            let mut surrogate = (x_next * &adj_x)?.sum_all()?;
            for (s, a) in state_next.iter().zip(&adj_state) {
                if let Some(a) = a {
                    surrogate = (surrogate + (s * a)?.sum_all()?)?;
                }
            }
            let grads = surrogate.backward()?;
            adj_x = adjoint(&grads, &x_var)?;
            adj_state = state_vars.iter().map(|v| grads.get(v.as_tensor()).map(Tensor::detach)).collect();
            if let Some(v) = &noise_var {
                grad_steps[i] = Some(adjoint(&grads, v)?);
            }
        }
        let grad_z0 = (adj_x * self.schedule.sigma_start())?;
        Ok(ValueAndGrad { loss, output, grad_z0, grad_steps, checkpoint_bytes })
    }
}

/// The gradient of `v` in `grads`, or zeros when nothing reached it.
fn adjoint(grads: &candle_core::backprop::GradStore, v: &Var) -> Result<Tensor> {
    match grads.get(v.as_tensor()) {
        Some(g) => Ok(g.detach()),
        None => v.as_tensor().zeros_like(),
    }
}
