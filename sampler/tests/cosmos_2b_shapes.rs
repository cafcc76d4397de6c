//! The real 2B Cosmos DiTs, without their weights: `CosmosTransformer3DModel` built from the
//! real `transformer/config.json` of Cosmos-Predict2-2B-Video2World, of Cosmos-Predict2.5-2B
//! (base) and of Cosmos-Transfer2.5-2B, and `CosmosControlNetModel` from Transfer2.5-2B's
//! `controlnet/config.json`, ask for exactly the keys and shapes diffusers' models have — so the
//! real checkpoints (which cannot be downloaded here) load without a missing, unexpected or
//! mis-shaped weight.
//!
//! Outside reference: `tests/fixtures/make_cosmos_2b_keys.py` and
//! `tests/fixtures/make_cosmos_transfer_2b_keys.py` build diffusers 0.42.1's models on PyTorch's
//! meta device from the configs of diffusers' `scripts/convert_cosmos_to_diffusers.py` (the
//! script that made the diffusers checkpoints) and write their config.json and their
//! state_dict's names and shapes. Here the models are built over a `ShapeRecorder`: every weight
//! is a stride-0 view of one zero, so the ~2·10⁹ parameters cost nothing. Comparisons are exact
//! (names, shapes, counts are integers).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use sampler::cosmos::controlnet::{self, CosmosControlNetModel};
use sampler::cosmos::transformer::{Config, CosmosTransformer3DModel};
use shared::weights::ShapeRecorder;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The committed config.json of a real model, as JSON.
fn config_json(stem: &str) -> Result<serde_json::Value> {
    let path = fixtures().join(format!("{stem}_config.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn parse(json: &serde_json::Value) -> Result<Config> {
    let cfg: Config = serde_json::from_value(json.clone())?;
    cfg.validate()?;
    Ok(cfg)
}

/// Builds the model from the committed config.json (through `Config::from_json_file`, the path a
/// checkpoint folder takes) over a shape recorder and compares with diffusers' key list: same key
/// set (missing and unexpected listed), every shape equal, same parameter count. Returns the
/// parameter count.
fn assert_matches_diffusers(stem: &str) -> Result<usize> {
    let cfg = Config::from_json_file(&fixtures().join(format!("{stem}_config.json")))?;
    assert_recorded_match(stem, |recorder| {
        CosmosTransformer3DModel::new(&cfg, recorder.var_builder(DType::BF16, &Device::Cpu))?;
        Ok(())
    })
}

/// [`assert_matches_diffusers`] for the ControlNet of `stem` (`controlnet::Config`).
fn assert_controlnet_matches_diffusers(stem: &str) -> Result<usize> {
    let cfg = controlnet::Config::from_json_file(&fixtures().join(format!("{stem}_config.json")))?;
    assert_recorded_match(stem, |recorder| {
        CosmosControlNetModel::new(&cfg, recorder.var_builder(DType::BF16, &Device::Cpu))?;
        Ok(())
    })
}

/// Builds a model over a shape recorder with `build` and compares with `{stem}_keys.json`.
fn assert_recorded_match(stem: &str, build: impl Fn(&ShapeRecorder) -> Result<()>) -> Result<usize> {
    let text = std::fs::read_to_string(fixtures().join(format!("{stem}_keys.json")))?;
    let listed: serde_json::Value = serde_json::from_str(&text)?;
    let expected: BTreeMap<String, Vec<usize>> = serde_json::from_value(listed["keys"].clone())?;
    let expected_count = listed["parameter_count"].as_u64().context("parameter_count")? as usize;

    let recorder = ShapeRecorder::new();
    build(&recorder)?;
    let ours = recorder.shapes();
    let missing: Vec<_> = expected.keys().filter(|k| !ours.contains_key(*k)).collect();
    let unexpected: Vec<_> = ours.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "{stem}: missing (diffusers has, we don't ask for) {missing:?}; unexpected (we ask for, diffusers lacks) \
         {unexpected:?}"
    );
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, shape)| &ours[*k] != *shape)
        .map(|(k, shape)| format!("{k}: ours {:?}, diffusers {shape:?}", ours[k]))
        .collect();
    assert!(wrong.is_empty(), "{stem}: shapes differ: {wrong:#?}");
    let count = recorder.parameter_count();
    assert_eq!(count, expected_count, "{stem}: parameter count");
    println!("{stem}: {count} parameters ({:.3} B) in {} tensors, as diffusers", count as f64 / 1e9, ours.len());
    Ok(count)
}

#[test]
fn predict2_2b_video2world_config_expects_exactly_the_diffusers_keys_and_shapes() -> Result<()> {
    let count = assert_matches_diffusers("cosmos_predict2_2b_video2world")?;
    // The "2B" of the model's name, as a sanity bound on the fixture itself.
    assert!((1.9e9..2.1e9).contains(&(count as f64)), "{count}");
    Ok(())
}

#[test]
fn predict25_2b_config_expects_exactly_the_diffusers_keys_and_shapes() -> Result<()> {
    let count = assert_matches_diffusers("cosmos_predict25_2b")?;
    // Predict2.5 = the Predict2 DiT + the context projection Linear(100352 → 1024, bias).
    let predict2 = assert_matches_diffusers("cosmos_predict2_2b_video2world")?;
    assert_eq!(count - predict2, 100352 * 1024 + 1024);
    Ok(())
}

/// Every key of the real config.json is read into its field (none silently ignored and left at
/// a default — `Config` has `#[serde(default)]`, so a misnamed field would otherwise go
/// unnoticed; RoPE scales have no weight for the shape test to catch): the parsed config,
/// written back, equals the file on every key but diffusers' bookkeeping `_class_name` and
/// `_diffusers_version`. And the architecture read is the documented 2B one.
#[test]
fn real_configs_are_read_key_for_key() -> Result<()> {
    for (stem, context_dim) in [("cosmos_predict2_2b_video2world", 1024), ("cosmos_predict25_2b", 100352)] {
        let json = config_json(stem)?;
        let cfg = parse(&json)?;
        let back = serde_json::to_value(&cfg)?;
        let file = json.as_object().context("config.json is an object")?;
        for (key, value) in file {
            if key.starts_with('_') {
                continue;
            }
            assert_eq!(back.get(key), Some(value), "{stem}: key {key:?} not read as written");
        }
        let ignored: Vec<_> = file.keys().filter(|k| back.get(*k).is_none()).collect();
        assert_eq!(ignored, ["_class_name", "_diffusers_version"], "{stem}: keys Config ignores");
        // /work/shared/notes/cosmos-pipelines.md: 16 heads × 128, 28 layers, MLP ×4,
        // AdaLN-LoRA 256, RoPE per-head split t/h/w 44/42/42, rope_scale (1, 3, 3), 16 latent +
        // 1 condition-mask channels, padding mask, no learnable positional embedding.
        assert_eq!((cfg.hidden_size(), cfg.num_layers, cfg.mlp_hidden_size()), (2048, 28, 8192), "{stem}");
        assert_eq!((cfg.adaln_lora_dim, cfg.rope_dims(), cfg.rope_scale), (256, (44, 42, 42), [1.0, 3.0, 3.0]));
        assert_eq!((cfg.in_channels, cfg.out_channels, cfg.concat_padding_mask), (17, 16, true), "{stem}");
        assert_eq!(cfg.extra_pos_embed_type, None, "{stem}");
        assert_eq!(cfg.context_dim(), context_dim, "{stem}: width of the context forward takes");
    }
    Ok(())
}

/// Keys a config.json may carry that `Config` does not know (a later diffusers' additions) are
/// tolerated, and a config.json written by an older diffusers — only the keys the conversion
/// script passed, as the Predict2 checkpoints were converted before the Predict2.5 keys existed —
/// reads to the same config (the missing keys take diffusers' defaults).
#[test]
fn real_configs_tolerate_unknown_and_absent_keys() -> Result<()> {
    let predict2_keys = [
        "in_channels",
        "out_channels",
        "num_attention_heads",
        "attention_head_dim",
        "num_layers",
        "mlp_ratio",
        "text_embed_dim",
        "adaln_lora_dim",
        "max_size",
        "patch_size",
        "rope_scale",
        "concat_padding_mask",
        "extra_pos_embed_type",
    ];
    let p25_keys = ["use_crossattn_projection", "crossattn_proj_in_channels", "encoder_hidden_states_channels"];
    for (stem, passed) in [
        ("cosmos_predict2_2b_video2world", predict2_keys.to_vec()),
        ("cosmos_predict25_2b", [predict2_keys.as_slice(), p25_keys.as_slice()].concat()),
    ] {
        let json = config_json(stem)?;
        let cfg = parse(&json)?;

        let mut future = json.clone();
        future["some_future_key"] = serde_json::json!({"nested": [1, 2]});
        future["_name_or_path"] = serde_json::json!("nvidia/some-checkpoint");
        assert_eq!(parse(&future).context("unknown keys are tolerated")?, cfg, "{stem}");

        let mut older = serde_json::Map::new();
        for key in ["_class_name", "_diffusers_version"].iter().chain(&passed) {
            older.insert(key.to_string(), json[*key].clone());
        }
        older.insert("_diffusers_version".into(), serde_json::json!("0.34.0.dev0"));
        assert_eq!(parse(&serde_json::Value::Object(older))?, cfg, "{stem}: older config.json");
    }
    Ok(())
}

#[test]
fn transfer25_2b_config_expects_exactly_the_diffusers_keys_and_shapes() -> Result<()> {
    let count = assert_matches_diffusers("cosmos_transfer25_2b")?;
    // Transfer2.5 = the Predict2.5 DiT + img_context_proj Linear(1152 → 2048, bias) + per block
    // the image branch of the cross-attention: q/k/v_img (2048 × 2048 each) and two RMS-norm
    // gains (128 each).
    let predict25 = assert_matches_diffusers("cosmos_predict25_2b")?;
    assert_eq!(count - predict25, 1152 * 2048 + 2048 + 28 * (3 * 2048 * 2048 + 2 * 128));
    Ok(())
}

#[test]
fn transfer25_2b_controlnet_config_expects_exactly_the_diffusers_keys_and_shapes() -> Result<()> {
    let count = assert_controlnet_matches_diffusers("cosmos_transfer25_2b_controlnet")?;
    // The DiT's blocks are the same as the ControlNet's (28 vs 4), and the ControlNet has the DiT's
    // embeddings and projections less `norm_out`/`proj_out`, plus its own control patch embedding
    // (130·4 → 2048, no bias) and before_proj (one) / after_proj (four) Linear(2048 → 2048, bias).
    let dit = assert_matches_diffusers("cosmos_transfer25_2b")?;
    let block = (dit - dit_non_block_params()) / 28;
    let shared = dit_non_block_params() - (256 * 2048 + 2 * 2048 * 256 + 2048 * 4 * 16);
    let control_own = 130 * 4 * 2048 + 5 * (2048 * 2048 + 2048);
    assert_eq!(count, 4 * block + shared + control_own);
    Ok(())
}

/// Parameters of the Transfer2.5-2B DiT outside its blocks: patch embedding (18·4 → 2048), time
/// embedding (2048 → 2048 → 6144 and a gain), norm_out (2048 → 256 → 4096), proj_out (2048 → 64),
/// crossattn_proj (100352 → 1024, bias), img_context_proj (1152 → 2048, bias).
fn dit_non_block_params() -> usize {
    18 * 4 * 2048
        + (2048 * 2048 + 2048 * 6144 + 2048)
        + (2048 * 256 + 256 * 4096)
        + 2048 * 64
        + (100352 * 1024 + 1024)
        + (1152 * 2048 + 2048)
}

/// The Transfer2.5-2B configs read key for key (as [`real_configs_are_read_key_for_key`]), with
/// the architecture the conversion script gives: the DiT takes residuals after blocks 0, 7, 14,
/// 21 — one per ControlNet block — and both models have the 1152-wide image context.
#[test]
fn transfer25_configs_are_read_key_for_key() -> Result<()> {
    let dit_json = config_json("cosmos_transfer25_2b")?;
    let cn_json = config_json("cosmos_transfer25_2b_controlnet")?;
    let dit = parse(&dit_json)?;
    let cn: controlnet::Config = serde_json::from_value(cn_json.clone())?;
    cn.validate()?;
    for (stem, json, back) in [
        ("cosmos_transfer25_2b", &dit_json, serde_json::to_value(&dit)?),
        ("cosmos_transfer25_2b_controlnet", &cn_json, serde_json::to_value(&cn)?),
    ] {
        let file = json.as_object().context("config.json is an object")?;
        for (key, value) in file.iter().filter(|(k, _)| !k.starts_with('_')) {
            assert_eq!(back.get(key), Some(value), "{stem}: key {key:?} not read as written");
        }
        let ignored: Vec<_> = file.keys().filter(|k| back.get(*k).is_none()).collect();
        assert_eq!(ignored, ["_class_name", "_diffusers_version"], "{stem}: keys Config ignores");
    }
    assert_eq!(dit.controlnet_blocks()?, [0, 7, 14, 21]);
    assert_eq!(dit.controlnet_blocks()?.len(), cn.n_controlnet_blocks);
    assert!(dit.img_context() && dit.img_context_dim_in == cn.img_context_dim_in);
    assert_eq!((dit.hidden_size(), cn.hidden_size(), cn.model_channels), (2048, 2048, 2048));
    assert_eq!(dit.context_dim(), cn.context_dim());
    // The ControlNet's base input is the DiT's: 16 latent + condition mask + padding mask.
    assert_eq!(cn.latent_channels, dit.in_channels + 1);
    assert_eq!(cn.control_channels(), 128);
    Ok(())
}
