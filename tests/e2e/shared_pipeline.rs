//! `shared` end to end, as a trainer uses it: weights from a (fake, offline) Hub cache into a
//! partitioned `VarMap`, a loss built from the differentiable ops, the gradient-flow audit, a
//! finite-difference check, an optimiser step, a Polyak update, metrics and an atomic save.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use shared::gradcheck::{check_gradients, GradCheckOptions};
use shared::gradflow::{audit, Expectation};
use shared::params::{OptimizerConfig, Partitions};
use shared::rng::SplitMix64;
use shared::weights::{load_into_varmap, resolve_with, save_tensors_atomic, HubOptions, LoadOptions, WeightRef};

struct Net {
    proj: candle_nn::Linear,
    norm: shared::ops::LayerNorm,
    head: candle_nn::Linear,
}

impl Net {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            proj: candle_nn::linear(6, 8, vb.pp("proj"))?,
            norm: shared::ops::LayerNorm::new(8, 1e-5, vb.pp("norm"))?,
            head: candle_nn::linear(8, 4, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = shared::ops::gelu_erf(&self.norm.forward(&self.proj.forward(x)?)?)?;
        shared::ops::log_softmax(&self.head.forward(&h)?, D::Minus1)
    }
}

#[test]
fn weights_from_hub_cache_train_under_audit() -> anyhow::Result<()> {
    let device = Device::Cpu;
    // A "pretrained" checkpoint, published under the names the bare network uses.
    let published = VarMap::new();
    Net::new(VarBuilder::from_varmap(&published, DType::F64, &device))?;
    let cache = tempfile::tempdir()?;
    let hash = "89abcdef0123456789abcdef0123456789abcdef";
    let repo_dir = cache.path().join("models--worldgrad--toy");
    std::fs::create_dir_all(repo_dir.join("refs"))?;
    std::fs::write(repo_dir.join("refs/main"), hash)?;
    let file = repo_dir.join("snapshots").join(hash).join("model.safetensors");
    let tensors = published.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    save_tensors_atomic(&tensors, &file)?;

    // The trainer's map: an online network and its target copy.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &device);
    let online = Net::new(vb.pp("online"))?;
    let target = Net::new(vb.pp("target"))?;
    let parts = Partitions::new(&varmap).optimised("online", &["online."])?.target("target", &["target."])?;
    parts.validate()?;

    let reference = WeightRef::parse("worldgrad/toy:model.safetensors")?;
    let path = resolve_with(&reference, &HubOptions { cache_dir: cache.path().into(), offline: true })?;
    let report = load_into_varmap(&varmap, &path, &LoadOptions { prefix: "online.".into(), ..Default::default() })?;
    assert_eq!(report.loaded.len(), 6);
    parts.polyak("online", "target", 1.0)?;

    let mut rng = SplitMix64::new(7);
    let x = rng.normal_tensor((16, 6), DType::F64, &device)?;
    let labels = rng.uniform_tensor((16, 4), 0.0, 1.0, DType::F64, &device)?;
    // Cross-entropy against soft labels, plus a consistency term whose target side is detached,
    // as in a TD target: the target network must receive no gradient.
    let loss_fn = || -> candle_core::Result<Tensor> {
        let logp = online.forward(&x)?;
        let ce = (logp.exp()? - &labels)?.sqr()?.mean_all()?;
        let consistency = (logp - target.forward(&x)?.detach())?.sqr()?.mean_all()?;
        ce + (consistency * 0.1)?
    };

    let loss = loss_fn()?;
    let grads = loss.backward()?;
    let audit_report = audit(&grads, &parts, &Expectation::new("toy").reaches(&["online"]).not(&["target"]))?;
    audit_report.strict()?;

    let check = check_gradients(&parts.vars("online")?, loss_fn, &GradCheckOptions::default())?;
    check.assert_close(1e-6, "toy loss → online weights")?;

    let mut opt = parts.optimizer("online", &OptimizerConfig::adam(1e-2))?;
    let before = shared::gradcheck::scalar_f64(&loss)?;
    let dir = tempfile::tempdir()?;
    let mut metrics = shared::metrics::JsonlWriter::create(&dir.path().join("metrics.jsonl"))?;
    for step in 0..30 {
        let loss = loss_fn()?;
        opt.step(&loss.backward()?)?;
        parts.polyak("online", "target", 0.05)?;
        metrics.write(&serde_json::json!({"step": step, "loss": shared::gradcheck::scalar_f64(&loss)?}))?;
    }
    let after = shared::gradcheck::scalar_f64(&loss_fn()?)?;
    assert!(after < before, "loss did not decrease: {before} -> {after}");
    assert_eq!(shared::metrics::read_jsonl(metrics.path())?.len(), 30);
    shared::weights::save_varmap_atomic(&varmap, &dir.path().join("ckpt.safetensors"))?;
    assert!(dir.path().join("ckpt.safetensors").is_file());
    Ok(())
}
