//! Finite-difference checks of the Cosmos DiT's input gradients, in f64 with the parity
//! fixture's weights: what the sampler backpropagates to z0 goes through exactly this model.
//!
//! The weights are plain tensors (not Vars), as a frozen denoiser's are; only the inputs under
//! test are Vars — except in the tests of trainable weights, which load them into a `VarMap`.
//! `cosmos_tiny` is the Predict2 layout; `cosmos_tiny_p25` the Predict2.5 branches (context
//! projection, no masks, NTK-scaled RoPE).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor, Var};
use candle_nn::VarBuilder;
use sampler::cosmos::transformer::{Config, CosmosTransformer3DModel, ForwardOptions, MemoryMode};
use shared::device::test_device;
use shared::gradcheck::{check_gradients, GradCheckOptions, GradCheckReport};
use shared::rng::SplitMix64;

const GRAD_TOL: f64 = 1e-4;

struct Setup {
    model: CosmosTransformer3DModel,
    tensors: HashMap<String, Tensor>,
}

fn setup() -> Result<Setup> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cfg = Config::from_json_file(&dir.join("cosmos_tiny_config.json"))?;
    let path = dir.join("cosmos_tiny.safetensors");
    let tensors = shared::weights::read_safetensors(&path, &test_device())
        .with_context(|| format!("loading fixture {}", path.display()))?;
    let weights = tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("case_"))
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F64)?)))
        .collect::<Result<_>>()?;
    let model = CosmosTransformer3DModel::new(&cfg, VarBuilder::from_tensors(weights, DType::F64, &test_device()))?;
    Ok(Setup { model, tensors })
}

impl Setup {
    fn input(&self, key: &str) -> Result<Tensor> {
        Ok(self.tensors.get(key).ok_or_else(|| anyhow!("fixture has no tensor '{key}'"))?.to_dtype(DType::F64)?)
    }
}

/// A fixed random projection of the output, so the scalar depends on every output element.
fn readout(shape: &[usize], seed: u64) -> Result<Tensor> {
    Ok(SplitMix64::new(seed).normal_tensor(shape, DType::F64, &test_device())?)
}

fn print_report(what: &str, report: &GradCheckReport) {
    println!("{what}:\n{}", report.table());
}

/// ∂/∂(latent) through the whole model: per-frame timesteps, condition and padding masks.
#[test]
fn latent_gradient_matches_finite_differences() -> Result<()> {
    let s = setup()?;
    let latent = Var::from_tensor(&s.input("case_a.hidden_states")?)?;
    let (t, ctx) = (s.input("case_a.timestep")?, s.input("case_a.encoder_hidden_states")?);
    let (cm, pm) = (s.input("case_a.condition_mask")?, s.input("case_a.padding_mask")?);
    let r = readout(latent.dims(), 11)?;
    let loss = || (s.model.forward(latent.as_tensor(), &t, &ctx, Some(&cm), Some(&pm))? * &r)?.sum_all();
    let report =
        check_gradients(&[("latent", latent.clone())], loss, &GradCheckOptions { seed: 5, ..Default::default() })?;
    print_report("latent", &report);
    assert!(report.vars_without_grad().is_empty(), "the latent got no gradient");
    report.assert_nondegenerate(1e-6, "cosmos DiT, d loss / d latent")?;
    report.assert_close(GRAD_TOL, "cosmos DiT, d loss / d latent")?;
    Ok(())
}

/// ∂/∂(latent, context) together, with one timestep per sample, fps-scaled RoPE and masked
/// context tokens (the cross-attention mask path), as an action-conditioned world model uses it.
#[test]
fn latent_and_context_gradients_match_finite_differences() -> Result<()> {
    let s = setup()?;
    let latent = Var::from_tensor(&s.input("case_b.hidden_states")?)?;
    let context = Var::from_tensor(&s.input("case_b.encoder_hidden_states")?)?;
    let t = s.input("case_b.timestep")?;
    let (cm, pm) = (s.input("case_b.condition_mask")?, s.input("case_b.padding_mask")?);
    let opts = ForwardOptions { fps: Some(30.0), context_mask: Some(s.input("case_b.context_mask")?) };
    let r = readout(latent.dims(), 12)?;
    // Var clones share storage: the check's `set` moves the values the closure reads.
    let vars = [("latent", latent.clone()), ("context", context.clone())];
    let loss = || {
        let out = s.model.forward_with(latent.as_tensor(), &t, context.as_tensor(), Some(&cm), Some(&pm), &opts)?;
        (out * &r)?.sum_all()
    };
    let report = check_gradients(&vars, loss, &GradCheckOptions { seed: 6, ..Default::default() })?;
    print_report("latent+context", &report);
    assert!(report.vars_without_grad().is_empty(), "vars without gradient: {:?}", report.vars_without_grad());
    report.assert_close(GRAD_TOL, "cosmos DiT, d loss / d (latent, context)")?;
    Ok(())
}

/// The weights of fixture `stem` (`cosmos_tiny` / `cosmos_tiny_p25`) as Vars of a `VarMap` (a
/// model being fine-tuned), in f64.
fn trainable_model(stem: &str) -> Result<(CosmosTransformer3DModel, candle_nn::VarMap)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cfg = Config::from_json_file(&dir.join(format!("{stem}_config.json")))?;
    let varmap = candle_nn::VarMap::new();
    let model = CosmosTransformer3DModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F64, &test_device()))?;
    let opts = shared::weights::LoadOptions { allow_unexpected: true, allow_dtype_cast: true, ..Default::default() };
    let report = shared::weights::load_into_varmap(&varmap, &dir.join(format!("{stem}.safetensors")), &opts)?;
    anyhow::ensure!(report.unexpected.iter().all(|k| k.starts_with("case_")), "unexpected: {:?}", report.unexpected);
    Ok((model, varmap))
}

/// Total elements of every gradient a backward left in its store.
fn stored_grad_elements(grads: &candle_core::backprop::GradStore) -> usize {
    grads.get_ids().filter_map(|id| grads.get_id(*id)).map(|g| g.elem_count()).sum()
}

/// Trainable weights still get (correct) gradients: the frozen-weight shortcut is taken only
/// for weights that cannot have one.
#[test]
fn trainable_weights_get_correct_gradients() -> Result<()> {
    let (model, varmap) = trainable_model("cosmos_tiny")?;
    let s = setup()?;
    let (x, t, ctx) =
        (s.input("case_a.hidden_states")?, s.input("case_a.timestep")?, s.input("case_a.encoder_hidden_states")?);
    let (cm, pm) = (s.input("case_a.condition_mask")?, s.input("case_a.padding_mask")?);
    let r = readout(x.dims(), 13)?;
    let data = varmap.data().lock().map_err(|_| anyhow!("varmap lock poisoned"))?;
    // One weight of each kind of layer: patch embedding, attention, cross-attention context
    // projection, MLP, AdaLN-LoRA, timestep MLP, output projection.
    let names = [
        "patch_embed.proj.weight",
        "transformer_blocks.0.attn1.to_q.weight",
        "transformer_blocks.1.attn2.to_k.weight",
        "transformer_blocks.0.ff.net.2.weight",
        "transformer_blocks.1.norm3.linear_1.weight",
        "time_embed.t_embedder.linear_2.weight",
        "proj_out.weight",
    ];
    let vars = names
        .iter()
        .map(|n| Ok((*n, data.get(*n).cloned().ok_or_else(|| anyhow!("model has no var '{n}'"))?)))
        .collect::<Result<Vec<_>>>()?;
    drop(data);
    let loss = || (model.forward(&x, &t, &ctx, Some(&cm), Some(&pm))? * &r)?.sum_all();
    let report = check_gradients(&vars, loss, &GradCheckOptions { seed: 7, ..Default::default() })?;
    print_report("weights", &report);
    let missing = report.vars_without_grad();
    assert!(missing.is_empty(), "trainable weights without gradient: {missing:?}");
    report.assert_close(GRAD_TOL, "cosmos DiT, d loss / d weights")?;
    Ok(())
}

/// Predict2.5 branches, all trainable: ∂/∂(latent, context fed to the context projection, and
/// weights — the context projection's weight and bias, the RMS-norm gains of a cross-attention
/// key and a self-attention query and of the timestep embedding, a cross-attention value
/// projection), each on its own and jointly. The context reaches the blocks only through the
/// projection (Linear + exact GELU) and the cross-attention keys and values; the NTK-scaled RoPE
/// and the absent masks are on the latent's path.
#[test]
fn p25_input_and_weight_gradients_match_finite_differences() -> Result<()> {
    let (model, varmap) = trainable_model("cosmos_tiny_p25")?;
    anyhow::ensure!(model.config().use_crossattn_projection, "the p25 fixture has no context projection");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tensors = shared::weights::read_safetensors(&dir.join("cosmos_tiny_p25.safetensors"), &test_device())?;
    let input = |k: &str| -> Result<Tensor> {
        Ok(tensors.get(k).ok_or_else(|| anyhow!("fixture has no tensor '{k}'"))?.to_dtype(DType::F64)?)
    };
    let latent = Var::from_tensor(&input("case_c.hidden_states")?)?;
    let context = Var::from_tensor(&input("case_c.encoder_hidden_states")?)?;
    let t = input("case_c.timestep")?;
    let r = readout(latent.dims(), 15)?;
    let weight_names = [
        "crossattn_proj.0.weight",
        "crossattn_proj.0.bias",
        "transformer_blocks.0.attn2.norm_k.weight",
        "transformer_blocks.1.attn1.norm_q.weight",
        "time_embed.norm.weight",
        "transformer_blocks.1.attn2.to_v.weight",
    ];
    let data = varmap.data().lock().map_err(|_| anyhow!("varmap lock poisoned"))?;
    let mut vars = vec![("latent", latent.clone()), ("context", context.clone())];
    for n in weight_names {
        vars.push((n, data.get(n).cloned().ok_or_else(|| anyhow!("model has no var '{n}'"))?));
    }
    drop(data);
    let loss = || (model.forward(latent.as_tensor(), &t, context.as_tensor(), None, None)? * &r)?.sum_all();
    let report = check_gradients(&vars, loss, &GradCheckOptions { seed: 8, ..Default::default() })?;
    print_report("p25 inputs+weights", &report);
    assert!(report.vars_without_grad().is_empty(), "vars without gradient: {:?}", report.vars_without_grad());
    report.assert_nondegenerate(1e-6, "cosmos DiT p25, d loss / d (inputs, weights)")?;
    report.assert_close(GRAD_TOL, "cosmos DiT p25, d loss / d (inputs, weights)")?;
    Ok(())
}

/// With frozen weights, backward to the latent leaves no weight gradients behind. Reference:
/// the same model on Candle's own matmul, whose backward computes and keeps a gradient for
/// every frozen weight's transposed view (as much memory as the linear layers, on every
/// backward). The frozen path must store exactly those elements less, and give the same latent
/// gradient.
#[test]
fn frozen_weights_record_no_gradients() -> Result<()> {
    let s = setup()?;
    let mut reference = s.model.clone();
    reference.set_candle_matmul(true);
    // Backward visits only the matmuls whose input depends on the latent: not the timestep MLP,
    // the AdaLN-LoRA layers or the cross-attention key/value projections of the context. Each
    // linear layer runs once per forward; its weight is the only rank-2 `*.weight`.
    let off_latent_path = |k: &str| {
        k.starts_with("time_embed.")
            || k.starts_with("norm_out.")
            || k.contains(".norm")
            || k.contains("attn2.to_k")
            || k.contains("attn2.to_v")
    };
    let linear_weight_elements: usize = s
        .tensors
        .iter()
        .filter(|(k, t)| !k.starts_with("case_") && k.ends_with(".weight") && t.rank() == 2 && !off_latent_path(k))
        .map(|(_, t)| t.elem_count())
        .sum();

    let (t, ctx) = (s.input("case_a.timestep")?, s.input("case_a.encoder_hidden_states")?);
    let (cm, pm) = (s.input("case_a.condition_mask")?, s.input("case_a.padding_mask")?);
    let latent = Var::from_tensor(&s.input("case_a.hidden_states")?)?;
    let r = readout(latent.dims(), 14)?;
    let backward = |model: &CosmosTransformer3DModel| -> Result<candle_core::backprop::GradStore> {
        Ok((model.forward(latent.as_tensor(), &t, &ctx, Some(&cm), Some(&pm))? * &r)?.sum_all()?.backward()?)
    };
    let frozen_grads = backward(&s.model)?;
    let reference_grads = backward(&reference)?;
    let (frozen, with_matmul) = (stored_grad_elements(&frozen_grads), stored_grad_elements(&reference_grads));
    println!(
        "stored gradient elements: frozen {frozen}, Candle matmul {with_matmul}, latent-path linear weights {linear_weight_elements}"
    );
    assert_eq!(with_matmul.checked_sub(frozen), Some(linear_weight_elements), "weight gradients were recorded");
    let g_frozen = frozen_grads.get(latent.as_tensor()).ok_or_else(|| anyhow!("no latent gradient (frozen)"))?;
    let g_reference = reference_grads.get(latent.as_tensor()).ok_or_else(|| anyhow!("no latent gradient"))?;
    let diff = (g_frozen - g_reference)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    assert!(diff < 1e-12, "latent gradient differs between the frozen and the matmul path: {diff:.3e}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The memory mode: block checkpointing and tiled attention.

/// The fixture model with a memory mode.
fn with_memory(s: &Setup, mode: MemoryMode) -> Result<CosmosTransformer3DModel> {
    let mut model = s.model.clone();
    model.set_memory_mode(mode)?;
    Ok(model)
}

/// A tile that divides neither the 48 tokens nor the 12 context tokens of the fixture cases.
const TILE: usize = 7;

/// Checkpointed blocks, branches, segments (the fixture's 2 blocks make one segment), tile.
fn mode(blocks: bool, branches: bool, segments: bool, tile: Option<usize>) -> MemoryMode {
    MemoryMode {
        checkpoint_blocks: blocks,
        checkpoint_sublayers: branches,
        checkpoint_segments: segments,
        attention_tile: tile,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn max_abs(a: &Tensor) -> Result<f64> {
    Ok(a.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// Output and ∂/∂(latent) with block checkpointing, sub-layer checkpointing (alone and nested),
/// segments of blocks, tiled attention and all, against the plain graph, in f64: case a (per-frame timesteps, condition and padding masks) and case b (fps RoPE
/// and a context mask through the tiled cross-attention).
#[test]
fn memory_modes_equal_the_plain_graph() -> Result<()> {
    let s = setup()?;
    let modes = [
        mode(true, false, false, None),
        mode(false, true, false, None),
        mode(true, true, false, None),
        mode(true, true, true, None),
        mode(false, false, false, Some(TILE)),
        mode(true, true, true, Some(TILE)),
    ];
    for case in ["case_a", "case_b"] {
        let latent = Var::from_tensor(&s.input(&format!("{case}.hidden_states"))?)?;
        let t = s.input(&format!("{case}.timestep"))?;
        let ctx = s.input(&format!("{case}.encoder_hidden_states"))?;
        let (cm, pm) = (s.input(&format!("{case}.condition_mask"))?, s.input(&format!("{case}.padding_mask"))?);
        let opts = if case == "case_b" {
            ForwardOptions { fps: Some(30.0), context_mask: Some(s.input("case_b.context_mask")?) }
        } else {
            ForwardOptions::default()
        };
        let r = readout(latent.dims(), 21)?;
        let run = |model: &CosmosTransformer3DModel| -> Result<(Tensor, Tensor)> {
            let out = model.forward_with(latent.as_tensor(), &t, &ctx, Some(&cm), Some(&pm), &opts)?;
            let grads = (&out * &r)?.sum_all()?.backward()?;
            let g = grads.get(latent.as_tensor()).ok_or_else(|| anyhow!("no latent gradient"))?.clone();
            Ok((out.detach(), g))
        };
        let (out_plain, g_plain) = run(&s.model)?;
        anyhow::ensure!(max_abs(&g_plain)? > 1e-3, "{case}: degenerate reference gradient");
        for mode in modes {
            let (out, g) = run(&with_memory(&s, mode)?)?;
            let (d_out, d_grad) = (max_abs_diff(&out, &out_plain)?, max_abs_diff(&g, &g_plain)?);
            println!("{case} {mode:?}: output max diff {d_out:.1e}, ∇latent max diff {d_grad:.1e}");
            if mode.attention_tile.is_none() {
                // The recomputed blocks are the plain graph's blocks, visited in the same order.
                assert_eq!(d_out, 0.0, "{case} {mode:?}: checkpointing changed the output");
                assert_eq!(d_grad, 0.0, "{case} {mode:?}: checkpointing changed the gradient");
            } else {
                // Tiled softmax: same quantities, another summation order (`sdpa_tiled` vs `sdpa`
                // measured ≤ 3.7e-15 per call in f64).
                assert!(d_out <= 1e-12 && d_grad <= 1e-12, "{case} {mode:?}: {d_out:.2e}, {d_grad:.2e}");
            }
        }
    }
    Ok(())
}

/// Finite differences of ∂/∂(latent) through the checkpointed blocks and sub-layers with tiled
/// attention: the only variable a checkpointed forward differentiates.
#[test]
fn low_memory_latent_gradient_matches_finite_differences() -> Result<()> {
    let s = setup()?;
    let model = with_memory(&s, mode(true, true, true, Some(TILE)))?;
    let latent = Var::from_tensor(&s.input("case_a.hidden_states")?)?;
    let (t, ctx) = (s.input("case_a.timestep")?, s.input("case_a.encoder_hidden_states")?);
    let (cm, pm) = (s.input("case_a.condition_mask")?, s.input("case_a.padding_mask")?);
    let r = readout(latent.dims(), 22)?;
    let loss = || (model.forward(latent.as_tensor(), &t, &ctx, Some(&cm), Some(&pm))? * &r)?.sum_all();
    let report =
        check_gradients(&[("latent", latent.clone())], loss, &GradCheckOptions { seed: 9, ..Default::default() })?;
    print_report("latent, checkpointed + tiled", &report);
    assert!(report.vars_without_grad().is_empty(), "the latent got no gradient");
    report.assert_nondegenerate(1e-6, "checkpointed cosmos DiT, d loss / d latent")?;
    report.assert_close(GRAD_TOL, "checkpointed cosmos DiT, d loss / d latent")?;
    Ok(())
}

/// Tiled attention alone still differentiates the context (through the cross-attention keys
/// and values of `sdpa_tiled`), with a context mask: finite differences per variable.
#[test]
fn tiled_attention_latent_and_context_gradients_match_finite_differences() -> Result<()> {
    let s = setup()?;
    let model = with_memory(&s, mode(false, false, false, Some(TILE)))?;
    let latent = Var::from_tensor(&s.input("case_b.hidden_states")?)?;
    let context = Var::from_tensor(&s.input("case_b.encoder_hidden_states")?)?;
    let t = s.input("case_b.timestep")?;
    let (cm, pm) = (s.input("case_b.condition_mask")?, s.input("case_b.padding_mask")?);
    let opts = ForwardOptions { fps: Some(30.0), context_mask: Some(s.input("case_b.context_mask")?) };
    let r = readout(latent.dims(), 23)?;
    let vars = [("latent", latent.clone()), ("context", context.clone())];
    let loss = || {
        let out = model.forward_with(latent.as_tensor(), &t, context.as_tensor(), Some(&cm), Some(&pm), &opts)?;
        (out * &r)?.sum_all()
    };
    let report = check_gradients(&vars, loss, &GradCheckOptions { seed: 10, ..Default::default() })?;
    print_report("latent+context, tiled attention", &report);
    assert!(report.vars_without_grad().is_empty(), "vars without gradient: {:?}", report.vars_without_grad());
    report.assert_nondegenerate(1e-6, "tiled-attention cosmos DiT")?;
    report.assert_close(GRAD_TOL, "tiled-attention cosmos DiT, d loss / d (latent, context)")?;
    Ok(())
}

/// Block checkpointing differentiates the tokens only: a context that carries a gradient is
/// refused by name (not silently left without a gradient), and so are trainable weights.
#[test]
fn checkpointing_refuses_other_differentiated_inputs() -> Result<()> {
    let s = setup()?;
    let model = with_memory(&s, MemoryMode::low_memory())?;
    let latent = Var::from_tensor(&s.input("case_a.hidden_states")?)?;
    let context = Var::from_tensor(&s.input("case_a.encoder_hidden_states")?)?;
    let t = s.input("case_a.timestep")?;
    let (cm, pm) = (s.input("case_a.condition_mask")?, s.input("case_a.padding_mask")?);
    let err = model
        .forward(latent.as_tensor(), &t, context.as_tensor(), Some(&cm), Some(&pm))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("the context") && err.contains("checkpoint"), "{err}");
    // A differentiated timestep: temb depends on it.
    let t_var = Var::from_tensor(&t)?;
    let ctx = s.input("case_a.encoder_hidden_states")?;
    let err = model.forward(latent.as_tensor(), t_var.as_tensor(), &ctx, Some(&cm), Some(&pm)).err();
    assert!(err.is_some_and(|e| e.to_string().contains("timestep")));
    // Trainable weights: the timestep embedding's make the block inputs differentiable (named);
    // a block's own weights would be caught by the checkpoint itself.
    let (mut trainable, _varmap) = trainable_model("cosmos_tiny")?;
    trainable.set_memory_mode(MemoryMode::low_memory())?;
    let err = trainable.forward(latent.as_tensor(), &t, &ctx, Some(&cm), Some(&pm)).err();
    let err = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("timestep") && err.contains("carries a gradient"), "{err}");
    let weight = Var::from_tensor(&s.input("transformer_blocks.0.ff.net.2.weight")?)?;
    let x = Var::from_tensor(&Tensor::ones((3, weight.dim(0)?), DType::F64, &test_device())?)?;
    let w = weight.as_tensor().clone();
    let err = shared::ops::checkpoint(x.as_tensor(), move |x| x.matmul(&w)).err().map(|e| e.to_string());
    assert!(err.as_deref().is_some_and(|e| e.contains("only the input is differentiable")), "{err:?}");
    assert!(s.model.clone().set_memory_mode(MemoryMode { attention_tile: Some(0), ..MemoryMode::default() }).is_err());
    Ok(())
}
