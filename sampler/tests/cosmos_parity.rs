//! Parity of `sampler::cosmos::transformer` with diffusers' `CosmosTransformer3DModel`.
//!
//! The fixtures (made by `fixtures/make_cosmos_fixture.py`) hold tiny random models under their
//! diffusers parameter names with diffusers' config.json, input cases and diffusers' outputs:
//! `cosmos_tiny` (Predict2 Video2World layout; cases A, B, and intermediate activations of case
//! A that localise a mismatch) and `cosmos_tiny_p25` (Predict2.5 context projection, no masks,
//! no learnable positional embedding; case C and its intermediate activations).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sampler::cosmos::transformer::{Config, CosmosTransformer3DModel, ForwardOptions, Trace};
use shared::device::test_device;

/// Required agreement with diffusers (max |Δ| / max |reference|; the reference is f32). Measured
/// ~6e-7. The issue asks for < 1e-4, but at 1e-4 a tanh-approximated GELU in place of the exact
/// one still passes (4e-5 here), so the bound is 1e-5.
const F32_TOL: f64 = 1e-5;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Fixture {
    cfg: Config,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    /// `stem`: `cosmos_tiny` or `cosmos_tiny_p25`.
    fn load(stem: &str) -> Result<Self> {
        let dir = fixture_dir();
        let cfg = Config::from_json_file(&dir.join(format!("{stem}_config.json")))?;
        let path = dir.join(format!("{stem}.safetensors"));
        let tensors = shared::weights::read_safetensors(&path, &test_device())
            .with_context(|| format!("loading fixture {}", path.display()))?;
        Ok(Self { cfg, tensors })
    }

    fn get(&self, key: &str) -> Result<&Tensor> {
        self.tensors.get(key).ok_or_else(|| anyhow!("fixture has no tensor '{key}'"))
    }

    /// The model's weights: every key that is not an input, output or trace.
    fn weights(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        self.tensors
            .iter()
            .filter(|(k, _)| !k.starts_with("case_"))
            .map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?)))
            .collect()
    }

    fn model(&self, dtype: DType) -> Result<CosmosTransformer3DModel> {
        let vb = VarBuilder::from_tensors(self.weights(dtype)?, dtype, &test_device());
        Ok(CosmosTransformer3DModel::new(&self.cfg, vb)?)
    }

    /// Runs case `case` (`case_a` / `case_b`) in `dtype`, optionally tracing.
    fn run(
        &self,
        model: &CosmosTransformer3DModel,
        case: &str,
        dtype: DType,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let input = |k: &str| -> Result<Tensor> { Ok(self.get(&format!("{case}.{k}"))?.to_dtype(dtype)?) };
        let optional = |k: &str| -> Result<Option<Tensor>> {
            Ok(match self.tensors.get(&format!("{case}.{k}")) {
                Some(t) => Some(t.to_dtype(dtype)?),
                None => None,
            })
        };
        let opts = ForwardOptions {
            fps: match self.tensors.get(&format!("{case}.fps")) {
                Some(t) => Some(t.to_dtype(DType::F64)?.to_vec1::<f64>()?[0]),
                None => None,
            },
            context_mask: optional("context_mask")?,
        };
        Ok(model.forward_traced(
            &input("hidden_states")?,
            &input("timestep")?,
            &input("encoder_hidden_states")?,
            optional("condition_mask")?.as_ref(),
            optional("padding_mask")?.as_ref(),
            &opts,
            trace,
        )?)
    }
}

/// (max |a − b|, max |a − b| / max |b|).
fn errors(actual: &Tensor, reference: &Tensor) -> Result<(f64, f64)> {
    anyhow::ensure!(actual.dims() == reference.dims(), "shape {:?} vs reference {:?}", actual.dims(), reference.dims());
    let a = actual.to_dtype(DType::F64)?;
    let r = reference.to_dtype(DType::F64)?;
    let max_abs = (&a - &r)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = r.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok((max_abs, max_abs / scale.max(1e-30)))
}

/// Compares every traced activation of `case` with diffusers' (`{case}.trace.*`) in the order
/// the model computes them, so a mismatch is reported at the earliest stage that differs; the
/// traced names must be exactly `expected` and exactly the fixture's, so none goes unchecked.
fn compare_trace(fx: &Fixture, case: &str, trace: &Trace, expected: &[&str], report: &mut Vec<String>) -> Result<()> {
    let traced: BTreeSet<&str> = trace.iter().map(|(name, _)| name.as_str()).collect();
    let prefix = format!("{case}.trace.");
    let in_fixture: BTreeSet<&str> = fx.tensors.keys().filter_map(|k| k.strip_prefix(prefix.as_str())).collect();
    let expected: BTreeSet<&str> = expected.iter().copied().collect();
    anyhow::ensure!(
        traced == expected && in_fixture == expected,
        "{case}: traced {traced:?}, fixture has {in_fixture:?}, expected {expected:?}"
    );
    for (name, actual) in trace {
        let (abs, rel) =
            errors(actual, fx.get(&format!("{prefix}{name}"))?).with_context(|| format!("{case}.{name}"))?;
        report.push(format!("  {case}.{name:<22} max abs {abs:.3e}  rel {rel:.3e}"));
        anyhow::ensure!(
            rel < F32_TOL,
            "intermediate '{name}' of {case} differs from diffusers: rel {rel:.3e}\n{}",
            report.join("\n")
        );
    }
    Ok(())
}

#[test]
fn config_json_from_diffusers_deserialises() -> Result<()> {
    let fx = Fixture::load("cosmos_tiny")?;
    let expected = Config {
        in_channels: 5,
        out_channels: 4,
        num_attention_heads: 2,
        attention_head_dim: 12,
        num_layers: 2,
        mlp_ratio: 2.0,
        text_embed_dim: 16,
        adaln_lora_dim: 4,
        max_size: [4, 32, 32],
        patch_size: [1, 2, 2],
        rope_scale: [2.0, 1.0, 1.0],
        concat_padding_mask: true,
        extra_pos_embed_type: Some("learnable".into()),
        ..Config::default()
    };
    assert_eq!(fx.cfg, expected);
    assert_eq!(fx.cfg.rope_dims(), (4, 4, 4));
    Ok(())
}

/// Every weight of the checkpoint is taken by the model under its diffusers name, with the
/// shape diffusers gave it — and the model asks for nothing else.
#[test]
fn parameter_names_match_diffusers() -> Result<()> {
    for stem in ["cosmos_tiny", "cosmos_tiny_p25"] {
        parameter_names_match(stem).with_context(|| stem.to_string())?;
    }
    Ok(())
}

fn parameter_names_match(stem: &str) -> Result<()> {
    let fx = Fixture::load(stem)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &test_device());
    CosmosTransformer3DModel::new(&fx.cfg, vb)?;
    let data = varmap.data().lock().map_err(|_| anyhow!("varmap lock poisoned"))?;
    let model_names: BTreeSet<&String> = data.keys().collect();
    let weights = fx.weights(DType::F32)?;
    let file_names: BTreeSet<&String> = weights.keys().collect();
    let only_model: Vec<_> = model_names.difference(&file_names).collect();
    let only_file: Vec<_> = file_names.difference(&model_names).collect();
    assert!(
        only_model.is_empty() && only_file.is_empty(),
        "only in model: {only_model:?}; only in file: {only_file:?}"
    );
    for (name, var) in data.iter() {
        assert_eq!(var.dims(), weights[name].dims(), "shape of {name}");
    }
    Ok(())
}

#[test]
fn f32_output_matches_diffusers() -> Result<()> {
    let fx = Fixture::load("cosmos_tiny")?;
    let model = fx.model(DType::F32)?;

    // Case A, with the intermediate activations compared first: a mismatch is reported at the
    // earliest stage that differs.
    let mut trace = Trace::new();
    let out_a = fx.run(&model, "case_a", DType::F32, Some(&mut trace))?;
    let mut report = Vec::new();
    let expected = [
        "patch_embed",
        "rope.0",
        "rope.1",
        "learnable_pos_embed",
        "time_embed.0",
        "time_embed.1",
        "block0",
        "norm_out",
    ];
    compare_trace(&fx, "case_a", &trace, &expected, &mut report)?;
    let (abs, rel) = errors(&out_a, fx.get("case_a.output")?)?;
    report.push(format!("  case_a.output                 max abs {abs:.3e}  rel {rel:.3e}"));
    anyhow::ensure!(rel < F32_TOL, "case A output differs from diffusers\n{}", report.join("\n"));

    // Case B: one timestep per sample, fps-scaled temporal RoPE, masked context tokens.
    let out_b = fx.run(&model, "case_b", DType::F32, None)?;
    let (abs, rel) = errors(&out_b, fx.get("case_b.output")?)?;
    report.push(format!("  case_b.output                 max abs {abs:.3e}  rel {rel:.3e}"));
    anyhow::ensure!(rel < F32_TOL, "case B output differs from diffusers\n{}", report.join("\n"));
    println!("f32 parity with diffusers:\n{}", report.join("\n"));
    Ok(())
}

/// Predict2.5 branches: context projection (Linear + GELU), no condition mask, no padding mask,
/// no learnable positional embedding, NTK-scaled h/w RoPE; in f32 and f64, with the
/// intermediate activations compared first (the same points as case A, less the learnable
/// positional embedding this model has not, plus the projected context), at the same tolerance.
#[test]
fn p25_branches_match_diffusers() -> Result<()> {
    let fx = Fixture::load("cosmos_tiny_p25")?;
    assert!(fx.cfg.use_crossattn_projection && !fx.cfg.concat_padding_mask && fx.cfg.extra_pos_embed_type.is_none());
    let expected =
        ["patch_embed", "rope.0", "rope.1", "time_embed.0", "time_embed.1", "crossattn_proj", "block0", "norm_out"];
    for dtype in [DType::F32, DType::F64] {
        let mut trace = Trace::new();
        let out = fx.run(&fx.model(dtype)?, "case_c", dtype, Some(&mut trace))?;
        let mut report = Vec::new();
        compare_trace(&fx, "case_c", &trace, &expected, &mut report).with_context(|| format!("case_c in {dtype:?}"))?;
        let (abs, rel) = errors(&out, fx.get("case_c.output")?)?;
        report.push(format!("  case_c.output                 max abs {abs:.3e}  rel {rel:.3e}"));
        println!("{dtype:?} parity with diffusers:\n{}", report.join("\n"));
        anyhow::ensure!(rel < F32_TOL, "case C ({dtype:?}) differs from diffusers: rel {rel:.3e}");
    }
    Ok(())
}

/// The same weights cast to f64 give the same function (to f32 accuracy of the reference).
#[test]
fn f64_output_matches_diffusers() -> Result<()> {
    let fx = Fixture::load("cosmos_tiny")?;
    let model = fx.model(DType::F64)?;
    for case in ["case_a", "case_b"] {
        let out = fx.run(&model, case, DType::F64, None)?;
        anyhow::ensure!(out.dtype() == DType::F64, "f64 model returned {:?}", out.dtype());
        let (abs, rel) = errors(&out, fx.get(&format!("{case}.output"))?)?;
        println!("f64 {case}: max abs {abs:.3e}  rel {rel:.3e}");
        anyhow::ensure!(rel < F32_TOL, "{case}: f64 output differs from diffusers: rel {rel:.3e}");
    }
    Ok(())
}

/// The context mask matters (a test that ignored it would still pass case B only if masking did
/// nothing): unmasked, sample 1's output changes.
#[test]
fn context_mask_changes_the_output() -> Result<()> {
    let fx = Fixture::load("cosmos_tiny")?;
    let model = fx.model(DType::F32)?;
    let masked = fx.run(&model, "case_b", DType::F32, None)?;
    let unmasked = model.forward_with(
        fx.get("case_b.hidden_states")?,
        fx.get("case_b.timestep")?,
        fx.get("case_b.encoder_hidden_states")?,
        Some(fx.get("case_b.condition_mask")?),
        Some(fx.get("case_b.padding_mask")?),
        &ForwardOptions { fps: Some(30.0), context_mask: None },
    )?;
    let (_, rel) = errors(&unmasked.narrow(0, 1, 1)?, &masked.narrow(0, 1, 1)?)?;
    assert!(rel > 1e-3, "masking 5 context tokens changed sample 1 by only {rel:.3e}");
    let (_, rel0) = errors(&unmasked.narrow(0, 0, 1)?, &masked.narrow(0, 0, 1)?)?;
    assert!(rel0 < 1e-6, "sample 0 has no masked token but changed by {rel0:.3e}");
    Ok(())
}

#[test]
fn bad_inputs_are_errors_not_panics() -> Result<()> {
    let fx = Fixture::load("cosmos_tiny")?;
    let model = fx.model(DType::F32)?;
    let x = fx.get("case_a.hidden_states")?;
    let t = fx.get("case_a.timestep")?;
    let ctx = fx.get("case_a.encoder_hidden_states")?;
    let cm = fx.get("case_a.condition_mask")?;
    let pm = fx.get("case_a.padding_mask")?;
    // Missing the condition-mask channel the model was built for.
    let err = model.forward(x, t, ctx, None, Some(pm)).err().ok_or_else(|| anyhow!("accepted 4 channels"))?;
    assert!(err.to_string().contains("in_channels"), "{err}");
    // Missing padding mask.
    assert!(model.forward(x, t, ctx, Some(cm), None).is_err());
    // Timestep of the wrong shape.
    assert!(model.forward(x, &Tensor::zeros(5, DType::F32, &test_device())?, ctx, Some(cm), Some(pm)).is_err());
    // Grid beyond the positional tables (max T = 4 latent frames).
    let long = Tensor::cat(&[x, x], 2)?;
    let long_cm = Tensor::cat(&[cm, cm], 2)?;
    let err = model.forward(&long, &Tensor::zeros(2, DType::F32, &test_device())?, ctx, Some(&long_cm), Some(pm)).err();
    assert!(err.is_some_and(|e| e.to_string().contains("positional range")));
    Ok(())
}
