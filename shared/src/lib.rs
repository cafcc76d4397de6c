//! `shared` — what both worldgrad systems stand on.
//!
//! * [`device`]: parse `auto | cpu | cuda[:N] | metal` into a Candle device.
//! * [`params`]: named, disjoint partitions of one `VarMap`, their optimisers and Polyak updates.
//! * [`gradflow`]: the gradient-flow audit — which vars of which partition received a gradient.
//! * [`ops`]: differentiable replacements for Candle's fused ops (which drop gradients silently).
//! * [`gradcheck`]: central finite-difference checks of analytic gradients.
//! * [`weights`]: validated safetensors loading, atomic saving, Hub references.
//! * [`outputs`]: where a command may write (no silent overwrite; a lock per directory);
//!   [`checks`]: argument checks before any work.
//! * [`metrics`]: JSONL metrics and progress bars; [`memory`]: a counting allocator for benches.

pub mod checks;
pub mod device;
pub mod gradcheck;
pub mod gradflow;
pub mod io;
pub mod memory;
pub mod metrics;
pub mod ops;
pub mod outputs;
pub mod params;
pub mod rng;
pub mod weights;
