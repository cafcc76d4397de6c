//! Named, disjoint partitions of one `VarMap`, their optimisers, and Polyak updates.
//!
//! A trainer with several optimisers over one `VarMap` (LAPO: critic + encoder, actor-VAE,
//! actor, and target copies) is only correct if every var is owned by exactly one of them. The
//! source system got this wrong silently; here the partition is declared once by name prefixes
//! and checked: prefixes must end in `.` (so `critic.` can never match `critic_target.` or
//! `target.critic.`), groups must be disjoint, and every var must belong to a group.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;

/// Var name suffixes that hold statistics, not parameters: never optimised, never expected to
/// receive a gradient (candle-nn's and PyTorch's batch-norm buffers).
pub const DEFAULT_NON_TRAINABLE_SUFFIXES: &[&str] = &["running_mean", "running_var", "num_batches_tracked"];

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("group '{group}': prefix '{prefix}' is ambiguous — it must be non-empty and end with '.', or it would also match names like '{prefix}_target.weight'")]
    AmbiguousPrefix { group: String, prefix: String },
    #[error("group '{0}' is declared twice")]
    DuplicateGroup(String),
    #[error("prefix '{a_prefix}' of group '{a}' overlaps prefix '{b_prefix}' of group '{b}': vars under '{longer}' would belong to both")]
    OverlappingPrefixes { a: String, a_prefix: String, b: String, b_prefix: String, longer: String },
    #[error("var '{var}' belongs to several groups: {groups:?}")]
    Overlap { var: String, groups: Vec<String> },
    #[error("{} var(s) belong to no group, so no optimiser would ever update them: {vars:?}", vars.len())]
    Unassigned { vars: Vec<String> },
    #[error("no group named '{0}'")]
    UnknownGroup(String),
    #[error("group '{0}' holds no vars: check its prefixes")]
    EmptyGroup(String),
    #[error("Polyak update {online} → {target}: {detail}")]
    Polyak { online: String, target: String, detail: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Whether a group is stepped by an optimiser or only follows another by Polyak averaging.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum GroupKind {
    Optimised,
    /// Target networks: no optimiser, no gradient expected.
    Target,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Group {
    pub name: String,
    pub prefixes: Vec<String>,
    pub kind: GroupKind,
}

impl Group {
    fn matches(&self, var_name: &str) -> bool {
        self.prefixes.iter().any(|p| var_name.starts_with(p.as_str()))
    }
}

/// A declared partition of a `VarMap`.
#[derive(Clone)]
pub struct Partitions {
    varmap: VarMap,
    groups: Vec<Group>,
    non_trainable_suffixes: Vec<String>,
}

impl Partitions {
    pub fn new(varmap: &VarMap) -> Self {
        Self {
            varmap: varmap.clone(),
            groups: Vec::new(),
            non_trainable_suffixes: DEFAULT_NON_TRAINABLE_SUFFIXES.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Declares a group stepped by its own optimiser.
    pub fn optimised(self, name: &str, prefixes: &[&str]) -> Result<Self, PartitionError> {
        self.add(name, prefixes, GroupKind::Optimised)
    }

    /// Declares a target group, updated only by [`Partitions::polyak`].
    pub fn target(self, name: &str, prefixes: &[&str]) -> Result<Self, PartitionError> {
        self.add(name, prefixes, GroupKind::Target)
    }

    fn add(mut self, name: &str, prefixes: &[&str], kind: GroupKind) -> Result<Self, PartitionError> {
        if self.groups.iter().any(|g| g.name == name) {
            return Err(PartitionError::DuplicateGroup(name.into()));
        }
        for p in prefixes {
            if p.is_empty() || !p.ends_with('.') {
                return Err(PartitionError::AmbiguousPrefix { group: name.into(), prefix: p.to_string() });
            }
            for g in &self.groups {
                for q in &g.prefixes {
                    if q.starts_with(p) || p.starts_with(q.as_str()) {
                        let longer = if q.len() > p.len() { q.clone() } else { p.to_string() };
                        return Err(PartitionError::OverlappingPrefixes {
                            a: g.name.clone(),
                            a_prefix: q.clone(),
                            b: name.into(),
                            b_prefix: p.to_string(),
                            longer,
                        });
                    }
                }
            }
        }
        self.groups.push(Group { name: name.into(), prefixes: prefixes.iter().map(|s| s.to_string()).collect(), kind });
        Ok(self)
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn group(&self, name: &str) -> Result<&Group, PartitionError> {
        self.groups.iter().find(|g| g.name == name).ok_or_else(|| PartitionError::UnknownGroup(name.into()))
    }

    /// True for running statistics and other buffers that are never optimised.
    pub fn is_non_trainable(&self, var_name: &str) -> bool {
        self.non_trainable_suffixes.iter().any(|s| var_name.ends_with(s.as_str()))
    }

    /// The group a var name belongs to, if any.
    pub fn group_of(&self, var_name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.matches(var_name))
    }

    /// All vars of a group (statistics included), sorted by name.
    pub fn all_vars(&self, group: &str) -> Result<Vec<(String, Var)>, PartitionError> {
        let g = self.group(group)?;
        let data = self.varmap.data().lock().expect("VarMap lock poisoned");
        let mut vars: Vec<(String, Var)> =
            data.iter().filter(|(n, _)| g.matches(n)).map(|(n, v)| (n.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(vars)
    }

    /// The trainable vars of a group (statistics excluded), sorted by name: what its optimiser steps.
    pub fn vars(&self, group: &str) -> Result<Vec<(String, Var)>, PartitionError> {
        Ok(self.all_vars(group)?.into_iter().filter(|(n, _)| !self.is_non_trainable(n)).collect())
    }

    /// Checks that every var belongs to exactly one group and no group is empty.
    pub fn validate(&self) -> Result<(), PartitionError> {
        let data = self.varmap.data().lock().expect("VarMap lock poisoned");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut unassigned = Vec::new();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for name in names {
            let owners: Vec<String> = self.groups.iter().filter(|g| g.matches(name)).map(|g| g.name.clone()).collect();
            match owners.len() {
                0 => unassigned.push(name.clone()),
                1 => *counts.entry(self.group_of(name).map(|g| g.name.as_str()).unwrap_or("")).or_default() += 1,
                _ => return Err(PartitionError::Overlap { var: name.clone(), groups: owners }),
            }
        }
        if !unassigned.is_empty() {
            return Err(PartitionError::Unassigned { vars: unassigned });
        }
        for g in &self.groups {
            if counts.get(g.name.as_str()).copied().unwrap_or(0) == 0 {
                return Err(PartitionError::EmptyGroup(g.name.clone()));
            }
        }
        Ok(())
    }

    /// Soft update `target ← (1−τ)·target + τ·online`, pairing vars by name: the i-th prefix of
    /// the target group replaces the i-th prefix of the online group. Shapes must match and the
    /// two groups must hold the same names. τ = 1 is a hard copy.
    pub fn polyak(&self, online: &str, target: &str, tau: f64) -> Result<(), PartitionError> {
        let err = |detail: String| PartitionError::Polyak { online: online.into(), target: target.into(), detail };
        let og = self.group(online)?.clone();
        let tg = self.group(target)?.clone();
        if og.prefixes.len() != tg.prefixes.len() {
            return Err(err(format!(
                "groups have {} and {} prefixes; they must correspond one to one",
                og.prefixes.len(),
                tg.prefixes.len()
            )));
        }
        let online_vars: BTreeMap<String, Var> = self.all_vars(online)?.into_iter().collect();
        let mut target_vars: BTreeMap<String, Var> = self.all_vars(target)?.into_iter().collect();
        for (name, ov) in &online_vars {
            let (i, p) = og
                .prefixes
                .iter()
                .enumerate()
                .find(|(_, p)| name.starts_with(p.as_str()))
                .expect("var matched its group");
            let target_name = format!("{}{}", tg.prefixes[i], &name[p.len()..]);
            let tv = target_vars
                .remove(&target_name)
                .ok_or_else(|| err(format!("'{name}' has no counterpart '{target_name}'")))?;
            if tv.shape() != ov.shape() {
                return Err(err(format!(
                    "shape mismatch: '{name}' is {:?} but '{target_name}' is {:?}",
                    ov.dims(),
                    tv.dims()
                )));
            }
            if tv.dtype() != ov.dtype() {
                return Err(err(format!(
                    "dtype mismatch: '{name}' is {:?} but '{target_name}' is {:?}",
                    ov.dtype(),
                    tv.dtype()
                )));
            }
            if tau < 1.0 && crate::ops::inplace_applicable(&[tv.as_tensor(), ov.as_tensor()]) {
                // One pass, no temporaries; the same numbers as the tensor ops below.
                crate::ops::polyak_inplace(tv.as_tensor(), ov.as_tensor(), tau)?;
                continue;
            }
            let mixed = if tau >= 1.0 {
                ov.as_tensor().detach().copy()?
            } else {
                ((tv.as_tensor().detach() * (1.0 - tau))? + (ov.as_tensor().detach() * tau)?)?
            };
            tv.set(&mixed)?;
        }
        if let Some(extra) = target_vars.keys().next() {
            return Err(err(format!("target var '{extra}' has no online counterpart")));
        }
        Ok(())
    }

    /// An optimiser over this group's trainable vars.
    pub fn optimizer(&self, group: &str, config: &OptimizerConfig) -> Result<GroupOptimizer, PartitionError> {
        let g = self.group(group)?;
        if g.kind != GroupKind::Optimised {
            return Err(PartitionError::UnknownGroup(format!("{group} (a target group has no optimiser)")));
        }
        let vars = self.vars(group)?;
        if vars.is_empty() {
            return Err(PartitionError::EmptyGroup(group.into()));
        }
        Ok(GroupOptimizer::new(group, vars, config.clone())?)
    }
}

/// Optimiser algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam (AdamW with decoupled weight decay when `weight_decay > 0`).
    Adam,
    /// Plain stochastic gradient descent.
    Sgd,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl OptimizerConfig {
    /// Adam with PyTorch's defaults and no weight decay.
    pub fn adam(lr: f64) -> Self {
        Self { kind: OptimizerKind::Adam, lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }

    pub fn sgd(lr: f64) -> Self {
        Self { kind: OptimizerKind::Sgd, lr, beta1: 0.0, beta2: 0.0, eps: 0.0, weight_decay: 0.0 }
    }
}

/// Adam / SGD over a named set of vars, with state that can be saved and restored exactly.
///
/// Candle's `AdamW` keeps its moments private, so a resumed run could not continue
/// bit-exactly; this one exposes them through [`GroupOptimizer::state_tensors`].
pub struct GroupOptimizer {
    name: String,
    vars: Vec<(String, Var)>,
    moments: Vec<Option<(Tensor, Tensor)>>,
    step: u64,
    pub config: OptimizerConfig,
    /// Update CPU f32/f64 buffers in place (`shared::ops::adam_step_inplace`); on by default,
    /// off only to compare with the tensor-op path.
    pub fused: bool,
}

impl GroupOptimizer {
    pub fn new(name: &str, vars: Vec<(String, Var)>, config: OptimizerConfig) -> candle_core::Result<Self> {
        let moments = vec![None; vars.len()];
        Ok(Self { name: name.into(), vars, moments, step: 0, config, fused: true })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update from `grads`. Vars without a gradient in the store are left untouched (so one
    /// `GradStore` can feed several optimisers), as PyTorch skips params whose `.grad` is None.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_with(|var| grads.get(var.as_tensor()).cloned())
    }

    /// One update from gradients supplied by `grad_of` (e.g. assembled by hand from
    /// vector-Jacobian products, or clipped); vars for which it returns `None` are left untouched.
    pub fn step_with(&mut self, grad_of: impl Fn(&Var) -> Option<Tensor>) -> candle_core::Result<()> {
        self.step += 1;
        let c = &self.config;
        for ((_, var), moments) in self.vars.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grad_of(var) else { continue };
            let g = g.to_dtype(var.dtype())?;
            let theta = var.as_tensor().detach();
            match c.kind {
                OptimizerKind::Sgd => {
                    let mut next = (&theta - (&g * c.lr)?)?;
                    if c.weight_decay > 0.0 {
                        next = (next - (&theta * (c.lr * c.weight_decay))?)?;
                    }
                    var.set(&next)?;
                }
                OptimizerKind::Adam => {
                    let (m, v) = match moments.take() {
                        Some((m, v)) => (m, v),
                        None => (g.zeros_like()?, g.zeros_like()?),
                    };
                    if self.fused && crate::ops::inplace_applicable(&[var.as_tensor(), &m, &v, &g]) {
                        // Three passes over the buffers and no temporaries (the tensor ops below
                        // allocate ~10 per var); the same numbers, bit for bit.
                        let step = crate::ops::AdamStep {
                            lr: c.lr,
                            beta1: c.beta1,
                            beta2: c.beta2,
                            eps: c.eps,
                            weight_decay: c.weight_decay,
                            t: self.step as i32,
                        };
                        crate::ops::adam_step_inplace(var.as_tensor(), &m, &v, &g, step)?;
                        *moments = Some((m, v));
                        continue;
                    }
                    let m = ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let t = self.step as i32;
                    let m_hat = (&m / (1.0 - c.beta1.powi(t)))?;
                    let v_hat = (&v / (1.0 - c.beta2.powi(t)))?;
                    let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
                    let mut next = (&theta - (update * c.lr)?)?;
                    if c.weight_decay > 0.0 {
                        next = (next - (&theta * (c.lr * c.weight_decay))?)?;
                    }
                    var.set(&next)?;
                    *moments = Some((m, v));
                }
            }
        }
        Ok(())
    }

    /// The optimiser state as named tensors (`<group>/<var>/m`, `/v`) plus the step count, for
    /// checkpoints. The tensors share the optimiser's buffers, which the next step updates in
    /// place: use them (write, check) before stepping again, or `copy()` them.
    pub fn state_tensors(&self) -> (HashMap<String, Tensor>, u64) {
        let mut out = HashMap::new();
        for ((name, _), m) in self.vars.iter().zip(&self.moments) {
            if let Some((m, v)) = m {
                out.insert(format!("{}/{name}/m", self.name), m.clone());
                out.insert(format!("{}/{name}/v", self.name), v.clone());
            }
        }
        (out, self.step)
    }

    /// Restores what [`GroupOptimizer::state_tensors`] produced.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> candle_core::Result<()> {
        self.step = step;
        for ((name, var), slot) in self.vars.iter().zip(self.moments.iter_mut()) {
            let m = tensors.get(&format!("{}/{name}/m", self.name));
            let v = tensors.get(&format!("{}/{name}/v", self.name));
            *slot = match (m, v) {
                (Some(m), Some(v)) => {
                    if m.shape() != var.shape() || v.shape() != var.shape() {
                        candle_core::bail!(
                            "optimiser state for '{name}' has shape {:?}, the var {:?}",
                            m.dims(),
                            var.dims()
                        );
                    }
                    // Copies: the moments are updated in place, never the caller's tensors.
                    Some((m.to_device(var.device())?.copy()?, v.to_device(var.device())?.copy()?))
                }
                _ => None,
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
