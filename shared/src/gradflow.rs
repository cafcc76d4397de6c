//! The gradient-flow audit: which vars of which partition received a gradient, and how much.
//!
//! Given a `GradStore` from one loss's backward, the partitions, and what that loss is meant to
//! reach ([`Expectation`]), it reports per group: vars, vars with a gradient, L2 norm, max |g|,
//! NaN/Inf count — and lists every violation: a var of a group that must learn that got no
//! gradient (or an all-zero one), a var of a group that must stay untouched that got one, or
//! any non-finite gradient. [`AuditReport::strict`] turns violations into one error.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use crate::params::Partitions;

/// What one loss's backward should reach.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Expectation {
    /// Loss name, for messages (e.g. `critic`).
    pub loss: String,
    /// Groups whose every trainable var must get a non-zero, finite gradient.
    pub must_reach: Vec<String>,
    /// Groups none of whose vars may appear in the gradient store.
    pub must_not_reach: Vec<String>,
}

impl Expectation {
    pub fn new(loss: &str) -> Self {
        Self { loss: loss.into(), ..Default::default() }
    }

    pub fn reaches(mut self, groups: &[&str]) -> Self {
        self.must_reach.extend(groups.iter().map(|s| s.to_string()));
        self
    }

    pub fn not(mut self, groups: &[&str]) -> Self {
        self.must_not_reach.extend(groups.iter().map(|s| s.to_string()));
        self
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct VarReport {
    pub name: String,
    pub has_grad: bool,
    pub l2: f64,
    pub max_abs: f64,
    pub non_finite: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GroupReport {
    pub group: String,
    /// `must`, `must-not` or `-` (no expectation for this loss).
    pub expectation: String,
    pub vars: usize,
    pub vars_with_grad: usize,
    pub l2: f64,
    pub max_abs: f64,
    pub non_finite: usize,
    pub per_var: Vec<VarReport>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct AuditReport {
    pub loss: String,
    pub groups: Vec<GroupReport>,
    pub violations: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("gradient-flow audit of loss '{loss}' failed with {} violation(s):\n  - {}\n{table}", violations.len(), violations.join("\n  - "))]
pub struct AuditError {
    pub loss: String,
    pub violations: Vec<String>,
    pub table: String,
}

/// Audits `grads` against the partitions and an expectation.
pub fn audit(grads: &GradStore, partitions: &Partitions, expect: &Expectation) -> anyhow::Result<AuditReport> {
    for name in expect.must_reach.iter().chain(&expect.must_not_reach) {
        partitions.group(name)?;
    }
    let mut groups = Vec::new();
    let mut violations = Vec::new();
    for g in partitions.groups() {
        let must = expect.must_reach.contains(&g.name);
        let must_not = expect.must_not_reach.contains(&g.name);
        let mut per_var = Vec::new();
        let (mut sq, mut max_abs, mut non_finite, mut with_grad) = (0.0f64, 0.0f64, 0usize, 0usize);
        for (name, var) in partitions.all_vars(&g.name)? {
            let trainable = !partitions.is_non_trainable(&name);
            let report = match grads.get(var.as_tensor()) {
                None => VarReport { name: name.clone(), has_grad: false, l2: 0.0, max_abs: 0.0, non_finite: 0 },
                Some(grad) => {
                    let (l2, m, nf) = grad_stats(grad)?;
                    VarReport { name: name.clone(), has_grad: true, l2, max_abs: m, non_finite: nf }
                }
            };
            if report.has_grad {
                with_grad += 1;
                if report.l2.is_finite() {
                    sq += report.l2 * report.l2;
                }
                max_abs = max_abs.max(report.max_abs);
                non_finite += report.non_finite;
            }
            if report.non_finite > 0 {
                violations.push(format!("{}: '{}' has {} NaN/Inf gradient entries", g.name, name, report.non_finite));
            }
            if must && trainable {
                if !report.has_grad {
                    violations.push(format!(
                        "{}: '{}' should learn from loss '{}' but got no gradient",
                        g.name, name, expect.loss
                    ));
                } else if report.l2 == 0.0 {
                    violations
                        .push(format!("{}: '{}' got an all-zero gradient from loss '{}'", g.name, name, expect.loss));
                }
            }
            if must_not && report.has_grad {
                violations.push(format!(
                    "{}: '{}' must not receive gradient from loss '{}' but got one (L2 {:.3e})",
                    g.name, name, expect.loss, report.l2
                ));
            }
            per_var.push(report);
        }
        groups.push(GroupReport {
            group: g.name.clone(),
            expectation: if must {
                "must"
            } else if must_not {
                "must-not"
            } else {
                "-"
            }
            .into(),
            vars: per_var.len(),
            vars_with_grad: with_grad,
            l2: sq.sqrt(),
            max_abs,
            non_finite,
            per_var,
        });
    }
    Ok(AuditReport { loss: expect.loss.clone(), groups, violations })
}

/// (L2 norm, max |g|, count of non-finite entries), computed in f64.
fn grad_stats(grad: &Tensor) -> candle_core::Result<(f64, f64, usize)> {
    let values: Vec<f64> = grad.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let mut sq = 0.0;
    let mut max_abs = 0.0f64;
    let mut non_finite = 0;
    for v in values {
        if v.is_finite() {
            sq += v * v;
            max_abs = max_abs.max(v.abs());
        } else {
            non_finite += 1;
        }
    }
    Ok((sq.sqrt(), max_abs, non_finite))
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// A fixed-width table, one row per group.
    pub fn table(&self) -> String {
        let mut s = format!("gradient flow of loss '{}'\n", self.loss);
        s.push_str(&format!(
            "{:<22} {:<9} {:>6} {:>9} {:>12} {:>12} {:>8}\n",
            "group", "expect", "vars", "with grad", "L2", "max |g|", "NaN/Inf"
        ));
        for g in &self.groups {
            s.push_str(&format!(
                "{:<22} {:<9} {:>6} {:>9} {:>12.4e} {:>12.4e} {:>8}\n",
                g.group, g.expectation, g.vars, g.vars_with_grad, g.l2, g.max_abs, g.non_finite
            ));
        }
        if self.violations.is_empty() {
            s.push_str("audit: OK\n");
        } else {
            s.push_str(&format!("audit: {} violation(s)\n", self.violations.len()));
            for v in &self.violations {
                s.push_str(&format!("  - {v}\n"));
            }
        }
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("audit report serialises")
    }

    /// Error listing every violation (with the table), or Ok.
    pub fn strict(&self) -> Result<(), AuditError> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(AuditError { loss: self.loss.clone(), violations: self.violations.clone(), table: self.table() })
        }
    }
}

#[cfg(test)]
mod tests;
