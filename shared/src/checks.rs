//! Argument checks that run before any work: every out-of-range value of a command line (or a
//! config struct) is collected and reported in one error naming each flag, instead of a panic
//! (a remainder by zero, an index out of bounds, an allocation abort) or a wrong result later.
//!
//! ```
//! let mut c = shared::checks::ArgChecks::new();
//! c.count("--iterations", 0);
//! c.open_closed("--gamma", 1.5, 0.0, 1.0);
//! let err = c.finish().unwrap_err().to_string();
//! assert!(err.contains("--iterations") && err.contains("--gamma"));
//! ```

use anyhow::Result;

/// Collects the problems of a set of arguments.
#[derive(Debug, Default)]
pub struct ArgChecks {
    problems: Vec<String>,
}

impl ArgChecks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a problem when `ok` is false.
    pub fn require(&mut self, ok: bool, problem: impl FnOnce() -> String) -> &mut Self {
        if !ok {
            self.problems.push(problem());
        }
        self
    }

    /// A count that must be at least 1.
    pub fn count(&mut self, flag: &str, value: u64) -> &mut Self {
        self.require(value >= 1, || format!("{flag} must be at least 1, got {value}"))
    }

    /// A count in `1..=max` (`max` names a size beyond which the work cannot run).
    pub fn count_at_most(&mut self, flag: &str, value: u64, max: u64, why: &str) -> &mut Self {
        self.count(flag, value);
        self.require(value <= max, || format!("{flag} {value} is beyond {max} ({why})"))
    }

    /// A finite value > 0 (learning rates, scales).
    pub fn positive(&mut self, flag: &str, value: f64) -> &mut Self {
        self.require(value.is_finite() && value > 0.0, || format!("{flag} must be finite and > 0, got {value}"))
    }

    /// A finite value ≥ 0 (weights of optional terms, noise levels).
    pub fn non_negative(&mut self, flag: &str, value: f64) -> &mut Self {
        self.require(value.is_finite() && value >= 0.0, || format!("{flag} must be finite and ≥ 0, got {value}"))
    }

    /// A value in (lo, hi].
    pub fn open_closed(&mut self, flag: &str, value: f64, lo: f64, hi: f64) -> &mut Self {
        self.require(value.is_finite() && value > lo && value <= hi, || {
            format!("{flag} must be in ({lo}, {hi}], got {value}")
        })
    }

    /// A value in (lo, hi).
    pub fn open(&mut self, flag: &str, value: f64, lo: f64, hi: f64) -> &mut Self {
        self.require(value.is_finite() && value > lo && value < hi, || {
            format!("{flag} must be in ({lo}, {hi}), got {value}")
        })
    }

    /// A value in [lo, hi].
    pub fn closed(&mut self, flag: &str, value: f64, lo: f64, hi: f64) -> &mut Self {
        self.require(value.is_finite() && value >= lo && value <= hi, || {
            format!("{flag} must be in [{lo}, {hi}], got {value}")
        })
    }

    /// Merges another set's problems (a config struct's own checks).
    pub fn extend(&mut self, other: ArgChecks) -> &mut Self {
        self.problems.extend(other.problems);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// `Ok` when nothing was wrong; otherwise one error listing every problem.
    pub fn finish(&self) -> Result<()> {
        match self.problems.as_slice() {
            [] => Ok(()),
            [one] => anyhow::bail!("invalid argument: {one}"),
            many => anyhow::bail!("invalid arguments:\n  - {}", many.join("\n  - ")),
        }
    }
}

/// Refuses work whose estimated working set cannot fit: `bytes` against what `device` can still
/// allocate (`shared::device::free_memory_bytes`; no check where that is unknown). `what` names
/// the flags that set the size, so the error says what to lower.
pub fn ensure_fits(device: &candle_core::Device, bytes: u128, what: &str) -> Result<()> {
    let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
    if let Some(free) = crate::device::free_memory_bytes(device) {
        anyhow::ensure!(
            bytes <= free as u128,
            "{what} needs about {:.1} GiB, but {} has {:.1} GiB free; lower it",
            gib(bytes),
            crate::device::describe(device),
            gib(free as u128)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_named_once() {
        let mut c = ArgChecks::new();
        c.count("--log-every", 0)
            .positive("--lr", f64::NAN)
            .positive("--critic-lr", -1.0)
            .open("--expectile", 2.0, 0.0, 1.0)
            .open_closed("--tau", 3.0, 0.0, 1.0)
            .closed("--p", 0.5, 0.0, 1.0)
            .count_at_most("--batch-size", 10, 5, "the dataset holds 5 transitions");
        let err = c.finish().unwrap_err().to_string();
        for flag in ["--log-every", "--lr", "--critic-lr", "--expectile", "--tau", "--batch-size"] {
            assert_eq!(err.matches(&format!("{flag} ")).count(), 1, "{flag} in {err}");
        }
        assert!(!err.contains("--p "), "{err}");
        assert!(err.contains("NaN"), "{err}");
    }

    #[test]
    fn an_impossible_size_is_refused_with_its_flag() {
        let result = ensure_fits(&candle_core::Device::Cpu, u128::MAX / 2, "--batch-size 100000000000");
        if crate::device::free_memory_bytes(&candle_core::Device::Cpu).is_some() {
            let err = result.unwrap_err().to_string();
            assert!(err.contains("--batch-size") && err.contains("GiB free"), "{err}");
        }
        assert!(ensure_fits(&candle_core::Device::Cpu, 1, "one byte").is_ok());
    }
}
