//! Finite-difference checks, in f64, of the gradient of the Transfer2.5 DiT's output with the
//! ControlNet's residuals fed in — through both branches: the latents reach the output through
//! the DiT's own input and through the ControlNet's base input (`patch_embed_base` →
//! `before_proj` + … → residuals), the control latents through the ControlNet alone. Weights are
//! the parity fixture's (`fixtures/make_cosmos_controlnet_fixture.py`), frozen plain tensors as
//! in the z0 optimisation; the inputs under test are Vars.
//!
//! And the memory-saving modes (checkpointed blocks / sub-layers / segments, tiled attention)
//! give the plain graph's values and gradients for both models together.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor, Var};
use candle_nn::VarBuilder;
use sampler::cosmos::controlnet::{self, ConditioningScale, CosmosControlNetModel};
use sampler::cosmos::transformer::{self, CosmosTransformer3DModel, ForwardOptions, MemoryMode, TransferInputs};
use shared::device::test_device;
use shared::gradcheck::{check_gradients, GradCheckOptions};
use shared::rng::SplitMix64;

const GRAD_TOL: f64 = 1e-4;

struct Setup {
    dit: CosmosTransformer3DModel,
    cn: CosmosControlNetModel,
    tensors: HashMap<String, Tensor>,
}

fn setup() -> Result<Setup> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dit_cfg = transformer::Config::from_json_file(&dir.join("cosmos_tiny_transfer_config.json"))?;
    let cn_cfg = controlnet::Config::from_json_file(&dir.join("cosmos_tiny_transfer_controlnet_config.json"))?;
    let path = dir.join("cosmos_tiny_transfer.safetensors");
    let tensors = shared::weights::read_safetensors(&path, &test_device())
        .with_context(|| format!("loading fixture {}", path.display()))?;
    let weights = |prefix: &str| -> Result<HashMap<String, Tensor>> {
        let p = format!("{prefix}.");
        tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(&p).map(|n| Ok((n.to_string(), t.to_dtype(DType::F64)?))))
            .collect()
    };
    let dev = test_device();
    let dit =
        CosmosTransformer3DModel::new(&dit_cfg, VarBuilder::from_tensors(weights("transformer")?, DType::F64, &dev))?;
    let cn = CosmosControlNetModel::new(&cn_cfg, VarBuilder::from_tensors(weights("controlnet")?, DType::F64, &dev))?;
    Ok(Setup { dit, cn, tensors })
}

/// One fixture case's inputs other than the two latents, in f64.
struct Case {
    timestep: Tensor,
    context: Tensor,
    img_context: Option<Tensor>,
    condition_mask: Option<Tensor>,
    padding_mask: Tensor,
    scale: ConditioningScale,
    opts: ForwardOptions,
}

impl Setup {
    fn input(&self, key: &str) -> Result<Tensor> {
        Ok(self.tensors.get(key).ok_or_else(|| anyhow!("fixture has no tensor '{key}'"))?.to_dtype(DType::F64)?)
    }

    fn optional(&self, key: &str) -> Result<Option<Tensor>> {
        Ok(match self.tensors.get(key) {
            Some(t) => Some(t.to_dtype(DType::F64)?),
            None => None,
        })
    }

    fn case(&self, case: &str) -> Result<Case> {
        let scale = self.input(&format!("{case}.conditioning_scale"))?.to_vec1::<f64>()?;
        Ok(Case {
            timestep: self.input(&format!("{case}.timestep"))?,
            context: self.input(&format!("{case}.encoder_hidden_states"))?,
            img_context: self.optional(&format!("{case}.img_context"))?,
            condition_mask: self.optional(&format!("{case}.condition_mask"))?,
            padding_mask: self.input(&format!("{case}.padding_mask"))?,
            scale: if scale.len() == 1 { ConditioningScale::All(scale[0]) } else { ConditioningScale::PerBlock(scale) },
            opts: ForwardOptions {
                fps: self.optional(&format!("{case}.fps"))?.map(|t| t.to_vec1::<f64>()).transpose()?.map(|v| v[0]),
                context_mask: None,
            },
        })
    }
}

/// The DiT's output with the ControlNet's samples: `latent` feeds both models (the ControlNet's
/// copy detached when `detach_controlnet_latent`), `control` the ControlNet.
fn transfer_output(
    dit: &CosmosTransformer3DModel,
    cn: &CosmosControlNetModel,
    c: &Case,
    latent: &Tensor,
    control: &Tensor,
    detach_controlnet_latent: bool,
) -> candle_core::Result<Tensor> {
    let cn_latent = if detach_controlnet_latent { latent.detach() } else { latent.clone() };
    let samples = cn.forward(
        control,
        &cn_latent,
        &c.timestep,
        &c.context,
        c.img_context.as_ref(),
        c.condition_mask.as_ref(),
        &c.scale,
        &c.padding_mask,
        &c.opts,
    )?;
    let transfer = TransferInputs { img_context: c.img_context.clone(), block_controlnet_hidden_states: Some(samples) };
    dit.forward_transfer(
        latent,
        &c.timestep,
        &c.context,
        c.condition_mask.as_ref(),
        Some(&c.padding_mask),
        &c.opts,
        &transfer,
    )
}

/// A fixed random projection of the output, so the scalar depends on every output element.
fn readout(shape: &[usize], seed: u64) -> Result<Tensor> {
    Ok(SplitMix64::new(seed).normal_tensor(shape, DType::F64, &test_device())?)
}

fn max_abs(a: &Tensor) -> Result<f64> {
    Ok(a.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    max_abs(&(a - b)?)
}

/// ∂/∂(latent) and ∂/∂(control latent), each on its own and jointly, through the ControlNet and
/// the DiT. Case A: image context, per-frame timesteps, condition mask, resized padding mask,
/// zero-padded control channels, per-block scales; case B: no image context, one timestep per
/// sample, fps-scaled RoPE, no condition mask, one scale.
#[test]
fn latent_and_control_gradients_through_both_branches_match_finite_differences() -> Result<()> {
    let s = setup()?;
    for (case, seed) in [("case_a", 31), ("case_b", 32)] {
        let c = s.case(case)?;
        let latent = Var::from_tensor(&s.input(&format!("{case}.hidden_states"))?)?;
        let control = Var::from_tensor(&s.input(&format!("{case}.controls_latents"))?)?;
        let r = readout(&[2, 4, 3, 6, 8], seed)?;
        let loss =
            || (transfer_output(&s.dit, &s.cn, &c, latent.as_tensor(), control.as_tensor(), false)? * &r)?.sum_all();
        let vars = [("latent", latent.clone()), ("control latent", control.clone())];
        let report = check_gradients(&vars, loss, &GradCheckOptions { seed, ..Default::default() })?;
        println!("{case}:\n{}", report.table());
        assert!(
            report.vars_without_grad().is_empty(),
            "{case}: vars without gradient: {:?}",
            report.vars_without_grad()
        );
        report.assert_nondegenerate(1e-6, &format!("{case}: ControlNet → DiT, d loss / d (latent, control)"))?;
        report.assert_close(GRAD_TOL, &format!("{case}: ControlNet → DiT, d loss / d (latent, control)"))?;

        // The ControlNet's share of the latent gradient is far above the tolerance: a backward
        // that lost the latent's path through the ControlNet (base tokens, before_proj) would
        // fail the check above.
        let grad_of = |detach: bool| -> Result<Tensor> {
            let out = transfer_output(&s.dit, &s.cn, &c, latent.as_tensor(), control.as_tensor(), detach)?;
            let grads = (out * &r)?.sum_all()?.backward()?;
            Ok(grads.get(latent.as_tensor()).ok_or_else(|| anyhow!("no latent gradient"))?.clone())
        };
        let (full, dit_only) = (grad_of(false)?, grad_of(true)?);
        let share = max_abs_diff(&full, &dit_only)? / max_abs(&full)?;
        println!("{case}: the ControlNet branch changes ∇latent by {share:.3e} of its max");
        assert!(share > 1e-2, "{case}: the ControlNet branch contributes only {share:.3e} to ∇latent");
    }
    Ok(())
}

/// A tile that divides neither the 36 tokens nor the 7 context tokens nor the 3 image tokens.
const TILE: usize = 5;

fn mode(blocks: bool, branches: bool, segments: bool, tile: Option<usize>) -> MemoryMode {
    MemoryMode {
        checkpoint_blocks: blocks,
        checkpoint_sublayers: branches,
        checkpoint_segments: segments,
        attention_tile: tile,
    }
}

/// Output and ∂/∂(latent, control latent) with the memory modes on both models against the plain
/// graph, in f64. The DiT's 4 blocks with segments make segments of 2 blocks, cut at the
/// injection points 0 and 3: [0], [1, 2], [3].
#[test]
fn memory_modes_equal_the_plain_graph() -> Result<()> {
    let s = setup()?;
    let modes = [
        mode(true, false, false, None),
        mode(false, true, false, None),
        mode(true, true, true, None),
        mode(false, false, false, Some(TILE)),
        mode(true, true, true, Some(TILE)),
    ];
    for case in ["case_a", "case_b"] {
        let c = s.case(case)?;
        let latent = Var::from_tensor(&s.input(&format!("{case}.hidden_states"))?)?;
        let control = Var::from_tensor(&s.input(&format!("{case}.controls_latents"))?)?;
        let r = readout(&[2, 4, 3, 6, 8], 41)?;
        let run = |dit: &CosmosTransformer3DModel, cn: &CosmosControlNetModel| -> Result<(Tensor, Tensor, Tensor)> {
            let out = transfer_output(dit, cn, &c, latent.as_tensor(), control.as_tensor(), false)?;
            let grads = (&out * &r)?.sum_all()?.backward()?;
            let g = |v: &Var| grads.get(v.as_tensor()).cloned().ok_or_else(|| anyhow!("no gradient"));
            Ok((out.detach(), g(&latent)?, g(&control)?))
        };
        let (out0, gl0, gc0) = run(&s.dit, &s.cn)?;
        anyhow::ensure!(max_abs(&gl0)? > 1e-3 && max_abs(&gc0)? > 1e-3, "{case}: degenerate reference gradient");
        for m in modes {
            let (mut dit, mut cn) = (s.dit.clone(), s.cn.clone());
            dit.set_memory_mode(m)?;
            cn.set_memory_mode(m)?;
            let (out, gl, gc) = run(&dit, &cn)?;
            let d = [max_abs_diff(&out, &out0)?, max_abs_diff(&gl, &gl0)?, max_abs_diff(&gc, &gc0)?];
            println!("{case} {m:?}: output {:.1e}, ∇latent {:.1e}, ∇control {:.1e} max diff", d[0], d[1], d[2]);
            if m.attention_tile.is_none() {
                // The recomputed blocks are the plain graph's, visited in the same order.
                assert_eq!(d, [0.0; 3], "{case} {m:?}: checkpointing changed the output or a gradient");
            } else {
                // Tiled softmax: another summation order (cosmos_grad.rs: ≤ 1e-12 likewise).
                assert!(d.iter().all(|x| *x <= 1e-12), "{case} {m:?}: {d:?}");
            }
        }
    }
    Ok(())
}
