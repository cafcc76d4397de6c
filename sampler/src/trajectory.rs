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
//!
//! The step noises are either inputs of their own (`ode`, `sde`, `sde-learnable`:
//! [`Trajectory::value_and_grad`]) or functions of z0 (`sde-from-z0`, ξ_i = Q_i z0:
//! [`Trajectory::value_and_grad_from_z0`]), where ∇z0 is the total derivative
//! σ_0·∂L/∂x_0 + Σ_i Q_iᵀ ∂L/∂ξ_i. [`Trajectory::value_and_grad_state`] picks the right one
//! for a [`NoiseState`]. Denoisers may also read z0 itself (`Conditioning::initial_noise`,
//! Predict2.5's conditioning-frame velocity); that path is part of ∇z0 in both modes.

use candle_core::{Result, Tensor, Var};

use crate::denoiser::{uniform_sigma, Conditioning, Denoiser};
use crate::noise::{ChurnPlan, NoiseState, StepNoiseFromZ0};
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
    /// dloss/dz0; with step noises derived from z0, the total derivative (through x_0 and
    /// through every ξ_i).
    pub grad_z0: Tensor,
    /// ∂loss/∂ξ_i where step i injects noise (the partial derivative, ξ_i held fixed).
    pub grad_steps: Vec<Option<Tensor>>,
    /// Bytes of stored x_i / state (0 for the full graph).
    pub checkpoint_bytes: usize,
}

/// Where the step noises come from.
#[derive(Clone, Copy)]
enum StepNoises<'a> {
    /// Inputs of their own.
    Given(&'a [Option<Tensor>]),
    /// ξ_i = Q_i z0.
    FromZ0(&'a StepNoiseFromZ0),
}

impl StepNoises<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Given(n) => n.len(),
            Self::FromZ0(map) => map.num_steps(),
        }
    }

    /// ξ_i, for the z0 the trajectory starts from.
    fn at(&self, i: usize, z0: &Tensor) -> Result<Option<Tensor>> {
        match self {
            Self::Given(n) => Ok(n[i].clone()),
            Self::FromZ0(map) => map.noise(i, z0),
        }
    }
}

impl Trajectory<'_> {
    fn ctx<'b>(&'b self, cond: &'b Conditioning) -> StepContext<'b> {
        StepContext {
            denoiser: self.denoiser,
            cond,
            sigmas: &self.schedule.sigmas,
            eval_sigmas: &self.plan.eval_sigmas,
        }
    }

    pub fn num_steps(&self) -> usize {
        self.schedule.num_steps()
    }

    /// x_0 = σ_0·z0, or (1 + σ_0)·z0 for diffusers' flow pipelines (see [`Schedule::start_scale`]).
    pub fn start(&self, z0: &Tensor) -> Result<Tensor> {
        z0 * self.schedule.start_scale()
    }

    /// The conditioning of a run from `z0`: the trajectory's own, with `initial_noise` = z0.
    pub fn conditioning_for(&self, z0: &Tensor) -> Conditioning {
        Conditioning { initial_noise: Some(z0.clone()), ..self.cond.clone() }
    }

    /// Step i: churn (x += scale_i·ξ_i), then the solver step. A pure function of its inputs
    /// (`cond` from [`Self::conditioning_for`]).
    pub fn step(
        &self,
        cond: &Conditioning,
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
        self.solver.step(&self.ctx(cond), i, &x, state)
    }

    /// The final clean pass D(x_N, σ_N) (Cosmos), or x_N itself when σ_N = 0 or the schedule
    /// asks for none (diffusers' Predict2 pipeline).
    pub fn finish(&self, cond: &Conditioning, x_last: &Tensor) -> Result<Tensor> {
        let s = self.schedule.sigma_end();
        if s > 0.0 && self.schedule.denoise_last {
            self.denoiser.denoise(x_last, &uniform_sigma(x_last, s)?, cond)
        } else {
            Ok(x_last.clone())
        }
    }

    /// Runs the trajectory. A graph is recorded iff an input is a `Var` (or carries one);
    /// with `checkpoints`, each x_i and state is stored.
    pub fn run(&self, z0: &Tensor, noises: &[Option<Tensor>], checkpoints: Option<&mut Checkpoints>) -> Result<Tensor> {
        self.run_with(z0, StepNoises::Given(noises), checkpoints)
    }

    /// [`Self::run`] with ξ_i = Q_i z0, each formed when its step comes (so at most one is
    /// alive in a graph-free run).
    pub fn run_from_z0(
        &self,
        z0: &Tensor,
        map: &StepNoiseFromZ0,
        checkpoints: Option<&mut Checkpoints>,
    ) -> Result<Tensor> {
        self.run_with(z0, StepNoises::FromZ0(map), checkpoints)
    }

    fn check_noises(&self, noises: StepNoises) -> Result<()> {
        let n = self.num_steps();
        if noises.len() != n {
            candle_core::bail!("{} step noises given for {n} steps", noises.len());
        }
        if let StepNoises::FromZ0(map) = noises {
            let planned: Vec<bool> = self.plan.noise_scales.iter().map(|&s| s > 0.0).collect();
            if map.injects != planned {
                candle_core::bail!(
                    "the step noises from z0 are formed on steps {:?} but the churn plan injects on {:?}",
                    map.injects,
                    planned
                );
            }
        }
        Ok(())
    }

    fn run_with(&self, z0: &Tensor, noises: StepNoises, mut checkpoints: Option<&mut Checkpoints>) -> Result<Tensor> {
        self.check_noises(noises)?;
        let cond = self.conditioning_for(z0);
        let mut x = self.start(z0)?;
        let mut state: Vec<Tensor> = Vec::new();
        for i in 0..self.num_steps() {
            if let Some(ck) = checkpoints.as_deref_mut() {
                ck.xs.push(x.clone());
                ck.states.push(state.clone());
            }
            let noise = noises.at(i, z0)?;
            (x, state) = self.step(&cond, i, &x, &state, noise.as_ref())?;
        }
        if let Some(ck) = checkpoints {
            ck.xs.push(x.clone());
        }
        self.finish(&cond, &x)
    }

    /// The sample for given noises, recording no graph.
    pub fn sample(&self, z0: &Tensor, noises: &[Option<Tensor>]) -> Result<Tensor> {
        let noises: Vec<Option<Tensor>> = noises.iter().map(|n| n.as_ref().map(Tensor::detach)).collect();
        self.run(&z0.detach(), &noises, None)
    }

    /// The sample for a [`NoiseState`]'s current values, recording no graph.
    pub fn sample_state(&self, noise: &NoiseState) -> Result<Tensor> {
        let z0 = noise.z0.tensor().detach();
        match &noise.from_z0 {
            Some(map) => self.run_from_z0(&z0, map, None),
            None => self.sample(&z0, &noise.values()?.1),
        }
    }

    /// The objective at the output and its gradient with respect to z0 and every step noise,
    /// the step noises being inputs of their own (for ξ_i = Q_i z0 use
    /// [`Self::value_and_grad_from_z0`]: here `grad_z0` would miss the paths through ξ_i).
    pub fn value_and_grad(
        &self,
        z0: &Tensor,
        noises: &[Option<Tensor>],
        objective: &dyn Objective,
        mode: GradMode,
    ) -> Result<ValueAndGrad> {
        match mode {
            GradMode::Recompute => self.grad_recompute(z0, StepNoises::Given(noises), objective),
            GradMode::FullGraph => self.grad_full_graph(z0, StepNoises::Given(noises), objective),
        }
    }

    /// The objective and its gradient when ξ_i = Q_i z0 (`sde-from-z0`): `grad_z0` is the
    /// total derivative σ_0·∂L/∂x_0 + Σ_i Q_iᵀ ∂L/∂ξ_i, `grad_steps` the partials ∂L/∂ξ_i.
    pub fn value_and_grad_from_z0(
        &self,
        z0: &Tensor,
        map: &StepNoiseFromZ0,
        objective: &dyn Objective,
        mode: GradMode,
    ) -> Result<ValueAndGrad> {
        match mode {
            GradMode::Recompute => self.grad_recompute(z0, StepNoises::FromZ0(map), objective),
            GradMode::FullGraph => self.grad_full_graph(z0, StepNoises::FromZ0(map), objective),
        }
    }

    /// The objective and its gradient at a [`NoiseState`]'s current values, in its mode.
    pub fn value_and_grad_state(
        &self,
        noise: &NoiseState,
        objective: &dyn Objective,
        mode: GradMode,
    ) -> Result<ValueAndGrad> {
        match &noise.from_z0 {
            Some(map) => self.value_and_grad_from_z0(&noise.z0.tensor(), map, objective, mode),
            None => {
                let (z0, steps) = noise.values()?;
                self.value_and_grad(&z0, &steps, objective, mode)
            }
        }
    }

    fn grad_full_graph(&self, z0: &Tensor, noises: StepNoises, objective: &dyn Objective) -> Result<ValueAndGrad> {
        self.check_noises(noises)?;
        let z0_var = Var::from_tensor(&z0.detach())?;
        // Given noises are leaves of their own. From z0, ξ_i = Q_i z0 + t_i with t_i a zero
        // `Var`: adding it changes no value (x + 0 = x exactly) and its gradient is ∂L/∂ξ_i,
        // which Candle does not keep for the intermediate Q_i z0.
        let noise_vars: Vec<Option<Var>> = match noises {
            StepNoises::Given(given) => given
                .iter()
                .map(|n| n.as_ref().map(|t| Var::from_tensor(&t.detach())).transpose())
                .collect::<Result<_>>()?,
            StepNoises::FromZ0(map) => map
                .injects
                .iter()
                .map(|&on| on.then(|| Var::zeros(z0.shape(), z0.dtype(), z0.device())).transpose())
                .collect::<Result<_>>()?,
        };
        let noise_tensors: Vec<Option<Tensor>> = match noises {
            StepNoises::Given(_) => noise_vars.iter().map(|v| v.as_ref().map(|v| v.as_tensor().clone())).collect(),
            StepNoises::FromZ0(map) => (0..map.num_steps())
                .map(|i| match (map.noise(i, z0_var.as_tensor())?, &noise_vars[i]) {
                    (Some(xi), Some(tap)) => Ok(Some((xi + tap.as_tensor())?)),
                    _ => Ok(None),
                })
                .collect::<Result<_>>()?,
        };
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

    fn grad_recompute(&self, z0: &Tensor, noises: StepNoises, objective: &dyn Objective) -> Result<ValueAndGrad> {
        let z0 = z0.detach();
        let given: Option<Vec<Option<Tensor>>> = match noises {
            StepNoises::Given(n) => Some(n.iter().map(|n| n.as_ref().map(Tensor::detach)).collect()),
            StepNoises::FromZ0(_) => None,
        };
        let noises = match &given {
            Some(g) => StepNoises::Given(g),
            None => noises,
        };
        let mut ck = Checkpoints { xs: Vec::new(), states: Vec::new() };
        // Detached inputs and frozen weights: this forward records no graph.
        self.run_with(&z0, noises, Some(&mut ck))?;
        // Given noises are held for the backward; noises from z0 are formed again there.
        let checkpoint_bytes = ck.bytes()
            + given.iter().flatten().flatten().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum::<usize>();

        // z0 as the denoiser may read it (`Conditioning::initial_noise`): a leaf of its own in
        // every recomputed graph; what reaches it is added to ∇z0 (nothing, for denoisers that
        // read z0 only through x).
        let z0_leaf = Var::from_tensor(&z0)?;
        let cond = self.conditioning_for(z0_leaf.as_tensor());
        let mut grad_z0_via_cond: Option<Tensor> = None;
        let mut add_via_cond = |grads: &candle_core::backprop::GradStore| -> Result<()> {
            if let Some(g) = grads.get(z0_leaf.as_tensor()) {
                grad_z0_via_cond = Some(match grad_z0_via_cond.take() {
                    Some(acc) => (acc + g)?,
                    None => g.detach(),
                });
            }
            Ok(())
        };

        // The final clean pass, and the objective's value and gradient at its output (its own
        // VJP: the VAE decode recomputes chunk by chunk in there).
        let x_last = Var::from_tensor(&ck.xs.pop().expect("x_N stored"))?;
        let output = self.finish(&cond, x_last.as_tensor())?;
        let (loss, grad_output) = objective.value_and_grad(&output)?;
        let grads = (&output * grad_output)?.sum_all()?.backward()?;
        add_via_cond(&grads)?;
        let mut adj_x = adjoint(&grads, &x_last)?;
        let output = output.detach();
        // The final pass reads only x_N, so no adjoint flows into the state after the last step.
        let mut adj_state: Vec<Option<Tensor>> = Vec::new();
        let mut grad_steps: Vec<Option<Tensor>> = vec![None; noises.len()];
        // From z0: Σ_i Q_iᵀ ∂L/∂ξ_i, the part of ∇z0 that flows through the step noises.
        let mut grad_z0_via_steps: Option<Tensor> = None;

        for i in (0..self.num_steps()).rev() {
            let x_var = Var::from_tensor(&ck.xs.pop().expect("x_i stored"))?;
            let state_vars: Vec<Var> =
                ck.states.pop().expect("state stored").iter().map(Var::from_tensor).collect::<Result<_>>()?;
            // ξ_i, and Q_i where it is formed from z0.
            let (noise, q) = match noises {
                StepNoises::Given(n) => (n[i].clone(), None),
                StepNoises::FromZ0(map) => match map.map_if_injecting(i, z0.dims())? {
                    Some(q) => (Some(q.apply(&z0)?), Some(q)),
                    None => (None, None),
                },
            };
            let noise_var = noise.as_ref().map(Var::from_tensor).transpose()?;
            let state_in: Vec<Tensor> = state_vars.iter().map(|v| v.as_tensor().clone()).collect();
            let (x_next, state_next) =
                self.step(&cond, i, x_var.as_tensor(), &state_in, noise_var.as_ref().map(|v| v.as_tensor()))?;
            // ⟨x_{i+1}, λ_x⟩ + Σ_j ⟨state_{i+1,j}, λ_j⟩: its gradient is the VJP of the step.
            let mut surrogate = (x_next * &adj_x)?.sum_all()?;
            for (s, a) in state_next.iter().zip(&adj_state) {
                if let Some(a) = a {
                    surrogate = (surrogate + (s * a)?.sum_all()?)?;
                }
            }
            let grads = surrogate.backward()?;
            add_via_cond(&grads)?;
            adj_x = adjoint(&grads, &x_var)?;
            adj_state = state_vars.iter().map(|v| grads.get(v.as_tensor()).map(Tensor::detach)).collect();
            if let Some(v) = &noise_var {
                let g = adjoint(&grads, v)?;
                if let Some(q) = &q {
                    let via = q.apply_transpose(&g)?;
                    grad_z0_via_steps = Some(match grad_z0_via_steps {
                        Some(acc) => (acc + via)?,
                        None => via,
                    });
                }
                grad_steps[i] = Some(g);
            }
        }
        let mut grad_z0 = (adj_x * self.schedule.start_scale())?;
        for via in [grad_z0_via_steps, grad_z0_via_cond].into_iter().flatten() {
            grad_z0 = (grad_z0 + via)?;
        }
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
