//! Parity of the Cosmos-Predict2 T5 text path with transformers / diffusers 0.42.1: the tiny T5
//! encoder and T5 tokenizer of the fixture pipeline (`tests/fixtures/hf_cache`, made by
//! `tests/fixtures/make_cosmos_pipeline_fixture.py`), read offline by repository name, against
//! `Cosmos2VideoToWorldPipeline._get_t5_prompt_embeds(prompt, 512)` for the fixture's two
//! prompts (13 and 426 tokens): token ids and attention mask identical, embeddings within
//! 5e-6 relative in f32; the same for a gated-GELU (T5 v1.1) encoder (`t5_gated/`, made by
//! `tests/fixtures/make_t5_gated_fixture.py`); plausible mistakes (no attention mask, padding rows
//! not zeroed, the erf GELU for the tanh one) measured beyond that tolerance.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use sampler::cosmos::pipeline::Repository;
use sampler::cosmos::text_encoder::{T5PromptEncoder, COSMOS_PREDICT2_DEFAULT_NEGATIVE_PROMPT};

const REPO: &str = "worldgrad-test/tiny-cosmos-predict2";
/// f32 embeddings, max |Δ| / max |reference|: measured 3.1e-7 to 1.2e-6; the smallest mistake
/// tried (the erf GELU for the tanh one) is 1.6e-4.
const TOL: f64 = 5e-6;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn offline_hub() -> Repository {
    let hub = shared::weights::HubOptions { cache_dir: fixtures().join("hf_cache"), offline: true };
    Repository::Hub { repo: REPO.into(), revision: "main".into(), hub }
}

/// The snapshot directory of the fixture pipeline (as the cache resolves `main`).
fn snapshot() -> Result<PathBuf> {
    Ok(offline_hub().file("model_index.json")?.parent().context("snapshot")?.to_path_buf())
}

/// (prompts, max length) of the fixture.
fn prompts() -> Result<(Vec<String>, usize)> {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cosmos_pipeline_cases.json"))?)?;
    let prompts = cases["t5_prompts"]
        .as_array()
        .context("t5_prompts")?
        .iter()
        .map(|p| p.as_str().map(str::to_string).context("a prompt"))
        .collect::<Result<Vec<_>>>()?;
    let max_len = cases["t5_max_sequence_length"].as_u64().context("t5_max_sequence_length")? as usize;
    Ok((prompts, max_len))
}

/// The fixture's (input_ids, attention_mask, prompt_embeds) of prompt k.
fn reference(k: usize) -> Result<(Vec<i64>, Vec<i64>, Tensor)> {
    let mut all =
        shared::weights::read_safetensors(&fixtures().join("cosmos_pipeline_cases.safetensors"), &Device::Cpu)?;
    let mut take =
        |name: &str| all.remove(&format!("t5.prompt{k}.{name}")).with_context(|| format!("t5.prompt{k}.{name}"));
    let ids = take("input_ids")?.flatten_all()?.to_vec1::<i64>()?;
    let mask = take("attention_mask")?.flatten_all()?.to_vec1::<i64>()?;
    Ok((ids, mask, take("prompt_embeds")?))
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(max_abs(&(a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?)? / max_abs(b)?)
}

/// Copies a directory tree (following the cache's symlinks), skipping `skip` (relative paths).
fn copy_tree(from: &Path, to: &Path, skip: &[&str], root: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        let rel = path.strip_prefix(root)?.to_string_lossy().replace('\\', "/");
        if skip.contains(&rel.as_str()) {
            continue;
        }
        let dest = to.join(path.file_name().context("name")?);
        if path.is_dir() {
            copy_tree(&path, &dest, skip, root)?;
        } else {
            std::fs::copy(&path, &dest)?;
        }
    }
    Ok(())
}

/// A local copy of the fixture pipeline without the files in `skip`.
fn local_copy(skip: &[&str]) -> Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("pipe");
    let snap = snapshot()?;
    copy_tree(&snap, &dir, skip, &snap)?;
    Ok((tmp, dir))
}

#[test]
fn default_negative_prompt_is_diffusers() -> Result<()> {
    // The fixture's second prompt is diffusers' DEFAULT_NEGATIVE_PROMPT, read from the module.
    let (prompts, _) = prompts()?;
    assert_eq!(prompts[1], COSMOS_PREDICT2_DEFAULT_NEGATIVE_PROMPT);
    Ok(())
}

#[test]
fn tokens_match_transformers() -> Result<()> {
    let enc = T5PromptEncoder::load(&offline_hub(), DType::F32, &Device::Cpu)?;
    let (prompts, max_len) = prompts()?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let tokens = enc.tokenize(&refs, max_len)?;
    for k in 0..prompts.len() {
        let (ids, mask, _) = reference(k)?;
        let got_ids: Vec<i64> = tokens.input_ids[k].iter().map(|&v| v as i64).collect();
        let got_mask: Vec<i64> = tokens.attention_mask[k].iter().map(|&v| v as i64).collect();
        assert_eq!(got_ids, ids, "prompt {k}: input ids");
        assert_eq!(got_mask, mask, "prompt {k}: attention mask");
        assert!(!tokens.truncated[k]);
        println!("prompt {k}: {} tokens, ids and mask identical to transformers'", tokens.lengths()[k]);
    }
    Ok(())
}

/// A prompt longer than max_len: cut to max_len − 1 tokens + `</s>` (transformers' truncation
/// with the post-processor's token counted), flagged as truncated.
#[test]
fn truncation_keeps_the_end_token() -> Result<()> {
    let enc = T5PromptEncoder::load(&offline_hub(), DType::F32, &Device::Cpu)?;
    let (prompts, _) = prompts()?;
    let (full_ids, full_mask, _) = reference(1)?;
    let n = full_mask.iter().filter(|&&m| m != 0).count();
    let max_len = 64;
    assert!(n > max_len);
    let tokens = enc.tokenize(&[&prompts[1]], max_len)?;
    let expected: Vec<u32> =
        full_ids[..max_len - 1].iter().map(|&v| v as u32).chain([full_ids[n - 1] as u32]).collect();
    assert_eq!(tokens.input_ids[0], expected);
    assert!(tokens.attention_mask[0].iter().all(|&m| m == 1));
    assert!(tokens.truncated[0]);
    Ok(())
}

#[test]
fn prompt_embeds_match_diffusers() -> Result<()> {
    let enc = T5PromptEncoder::load(&offline_hub(), DType::F32, &Device::Cpu)?;
    let (prompts, max_len) = prompts()?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    // both prompts as one batch, as the pipeline encodes prompt and negative prompt
    let batch = enc.encode(&refs, max_len)?;
    assert_eq!(batch.dims(), &[prompts.len(), max_len, 32]);
    for k in 0..prompts.len() {
        let (_, mask, expected) = reference(k)?;
        let n = mask.iter().filter(|&&m| m != 0).count();
        let got = batch.narrow(0, k, 1)?;
        let err = rel_err(&got, &expected)?;
        let alone = rel_err(&enc.encode(&refs[k..k + 1], max_len)?, &expected)?;
        println!("prompt {k} ({n} tokens): embeddings rel error {err:.2e} (batched), {alone:.2e} (alone)");
        assert!(err <= TOL && alone <= TOL, "prompt {k}: {err:.3e} / {alone:.3e}");
        // rows past the prompt exactly zero, rows of the prompt not
        assert_eq!(max_abs(&got.narrow(1, n, max_len - n)?)?, 0.0);
        let row_max = got.narrow(1, 0, n)?.abs()?.max(2)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(row_max.iter().all(|&m| m > 0.0));
    }
    Ok(())
}

/// The same in bfloat16 (weights and activations), as the Cosmos checkpoints are stored.
#[test]
fn prompt_embeds_in_bf16() -> Result<()> {
    let enc = T5PromptEncoder::load(&offline_hub(), DType::BF16, &Device::Cpu)?;
    let (prompts, max_len) = prompts()?;
    let got = enc.encode(&[&prompts[0]], max_len)?;
    assert_eq!(got.dtype(), DType::BF16);
    let (_, _, expected) = reference(0)?;
    let err = rel_err(&got, &expected)?;
    println!("prompt 0 in bf16: embeddings rel error {err:.2e} against the f32 reference");
    assert!(err < 5e-2, "{err:.3e}");
    Ok(())
}

/// The gated-GELU encoder of `t5_gated/` (T5 v1.1's feed-forward, made by
/// `tests/fixtures/make_t5_gated_fixture.py`) at max length 64: the 426-token prompt truncated
/// as transformers truncates it, embeddings as diffusers' `_get_t5_prompt_embeds`.
#[test]
fn gated_gelu_encoder_matches_diffusers() -> Result<()> {
    let (prompts, max_len) = gated_cases()?;
    let enc = T5PromptEncoder::load(&Repository::Local(fixtures().join("t5_gated")), DType::F32, &Device::Cpu)?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let tokens = enc.tokenize(&refs, max_len)?;
    let got = enc.encode_tokens(&tokens)?;
    for k in 0..prompts.len() {
        let r = gated_reference(k)?;
        let ids: Vec<i64> = tokens.input_ids[k].iter().map(|&v| v as i64).collect();
        let mask: Vec<i64> = tokens.attention_mask[k].iter().map(|&v| v as i64).collect();
        assert_eq!(ids, r.ids, "prompt {k}: input ids");
        assert_eq!(mask, r.mask, "prompt {k}: attention mask");
        let err = rel_err(&got.narrow(0, k, 1)?, &r.embeds)?;
        println!(
            "gated prompt {k} ({} tokens, truncated {}): embeddings rel error {err:.2e}",
            r.n, tokens.truncated[k]
        );
        assert!(err <= TOL, "prompt {k}: {err:.3e}");
    }
    assert_eq!(tokens.truncated, [false, true]);
    Ok(())
}

struct GatedReference {
    ids: Vec<i64>,
    mask: Vec<i64>,
    n: usize,
    raw: Tensor,
    embeds: Tensor,
}

fn gated_cases() -> Result<(Vec<String>, usize)> {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("t5_gated_cases.json"))?)?;
    let prompts = cases["prompts"]
        .as_array()
        .context("prompts")?
        .iter()
        .map(|p| p.as_str().map(str::to_string).context("a prompt"))
        .collect::<Result<Vec<_>>>()?;
    Ok((prompts, cases["max_sequence_length"].as_u64().context("max_sequence_length")? as usize))
}

fn gated_reference(k: usize) -> Result<GatedReference> {
    let mut all = shared::weights::read_safetensors(&fixtures().join("t5_gated_cases.safetensors"), &Device::Cpu)?;
    let mut take = |name: &str| all.remove(&format!("prompt{k}.{name}")).with_context(|| format!("prompt{k}.{name}"));
    let ids = take("input_ids")?.flatten_all()?.to_vec1::<i64>()?;
    let mask = take("attention_mask")?.flatten_all()?.to_vec1::<i64>()?;
    let n = mask.iter().filter(|&&m| m != 0).count();
    Ok(GatedReference { ids, mask, n, raw: take("last_hidden_state")?, embeds: take("prompt_embeds")? })
}

/// Plausible mistakes land far outside [`TOL`]: the encoder run on all the padded tokens
/// without the attention mask (candle-transformers' T5 as it stands), with the padding rows
/// zeroed afterwards or not; the padding rows not zeroed (transformers' own rows there); and
/// the erf GELU where `gated-gelu` means the tanh one.
#[test]
fn plausible_mistakes_exceed_the_tolerance() -> Result<()> {
    use candle_transformers::models::t5;
    let mut errs = Vec::new();
    let run_candle = |dir: &Path, cfg: &t5::Config, ids: &[u32]| -> Result<Tensor> {
        let weights = dir.join("text_encoder/model.safetensors");
        let vb = shared::weights::varbuilder_from_file(&weights, DType::F32, &Device::Cpu)?;
        let mut model = t5::T5EncoderModel::load(vb, cfg)?;
        Ok(model.forward(&Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?)?)
    };
    let config = |dir: &Path| -> Result<t5::Config> {
        Ok(serde_json::from_str(&std::fs::read_to_string(dir.join("text_encoder/config.json"))?)?)
    };

    // the ReLU encoder of the pipeline fixture, 13-token prompt padded to 512
    let (ids, mask, expected) = reference(0)?;
    let (n, max_len) = (mask.iter().filter(|&&m| m != 0).count(), ids.len());
    let snap = snapshot()?;
    let ids: Vec<u32> = ids.iter().map(|&v| v as u32).collect();
    let hidden = run_candle(&snap, &config(&snap)?, &ids)?;
    let zeroed = hidden.narrow(1, 0, n)?.pad_with_zeros(1, 0, max_len - n)?;
    errs.push(("no attention mask, padding rows zeroed", rel_err(&zeroed, &expected)?));
    errs.push(("no attention mask, padding rows not zeroed", rel_err(&hidden, &expected)?));

    // the gated-GELU encoder, 13-token prompt padded to 64
    let r = gated_reference(0)?;
    errs.push(("padding rows not zeroed", rel_err(&r.raw, &r.embeds)?));
    let dir = fixtures().join("t5_gated");
    let mut cfg = config(&dir)?;
    assert_eq!(cfg.feed_forward_proj.activation, candle_nn::Activation::NewGelu);
    cfg.feed_forward_proj.activation = candle_nn::Activation::Gelu;
    let ids: Vec<u32> = r.ids[..r.n].iter().map(|&v| v as u32).collect();
    let erf = run_candle(&dir, &cfg, &ids)?.pad_with_zeros(1, 0, r.ids.len() - r.n)?;
    errs.push(("erf GELU instead of tanh GELU in the gated feed-forward", rel_err(&erf, &r.embeds)?));

    for (what, err) in &errs {
        println!("{what}: rel error {err:.2e} ({:.0}x the tolerance)", err / TOL);
        assert!(*err > 10.0 * TOL, "{what}: {err:.3e}");
    }
    Ok(())
}

/// Shards named by `model.safetensors.index.json`, with the tied embedding stored twice
/// (`shared.weight` and `encoder.embed_tokens.weight`): the same embeddings, bit for bit.
#[test]
fn sharded_weights_give_the_same_embeddings() -> Result<()> {
    let (prompts, max_len) = prompts()?;
    let single = T5PromptEncoder::load(&offline_hub(), DType::F32, &Device::Cpu)?.encode(&[&prompts[0]], max_len)?;

    let (_tmp, dir) = local_copy(&["text_encoder/model.safetensors"])?;
    let weights = shared::weights::read_safetensors(&snapshot()?.join("text_encoder/model.safetensors"), &Device::Cpu)?;
    let mut keys: Vec<&String> = weights.keys().collect();
    keys.sort();
    let (a, b) = keys.split_at(keys.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let mut shard: std::collections::HashMap<String, Tensor> =
            part.iter().map(|k| ((*k).clone(), weights[*k].clone())).collect();
        if i == 1 {
            shard.insert("encoder.embed_tokens.weight".into(), weights["shared.weight"].clone());
        }
        for k in shard.keys() {
            map.insert(k.clone(), file.clone().into());
        }
        candle_core::safetensors::save(&shard, dir.join("text_encoder").join(&file))?;
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("text_encoder/model.safetensors.index.json"), index.to_string())?;
    let sharded =
        T5PromptEncoder::load(&Repository::Local(dir), DType::F32, &Device::Cpu)?.encode(&[&prompts[0]], max_len)?;
    assert_eq!(max_abs(&(sharded - single)?)?, 0.0);
    Ok(())
}

#[test]
fn missing_tokenizer_json_says_how_to_make_it() -> Result<()> {
    let (_tmp, dir) = local_copy(&["tokenizer/tokenizer.json"])?;
    let err = T5PromptEncoder::load(&Repository::Local(dir.clone()), DType::F32, &Device::Cpu)
        .err()
        .context("loaded without tokenizer.json")?;
    let msg = format!("{err:#}");
    println!("{msg}");
    assert!(msg.contains("tokenizer/tokenizer.json"), "{msg}");
    assert!(msg.contains("scripts/cosmos_tokenizer_json.py"), "{msg}");
    assert!(msg.contains("backend_tokenizer.save"), "{msg}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    Ok(())
}

/// The same through the Hub cache: the message names the repository as the script takes it.
#[test]
fn missing_tokenizer_json_in_the_hub_cache() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cache = tmp.path().join("hub");
    let src = fixtures().join("hf_cache");
    copy_tree(&src, &cache, &[], &src)?;
    let hub = shared::weights::HubOptions { cache_dir: cache.clone(), offline: true };
    let repo = Repository::Hub { repo: REPO.into(), revision: "main".into(), hub };
    std::fs::remove_file(repo.file("tokenizer/tokenizer.json")?)?;
    let msg = format!("{:#}", T5PromptEncoder::load(&repo, DType::F32, &Device::Cpu).err().context("loaded")?);
    assert!(msg.contains(&format!("scripts/cosmos_tokenizer_json.py {REPO}\n")), "{msg}");
    Ok(())
}

#[test]
fn bad_text_encoder_files_are_named() -> Result<()> {
    // malformed config.json
    let (_tmp, dir) = local_copy(&[])?;
    std::fs::write(dir.join("text_encoder/config.json"), "{\"d_model\": \"wide\"}")?;
    let msg = format!(
        "{:#}",
        T5PromptEncoder::load(&Repository::Local(dir), DType::F32, &Device::Cpu).err().context("loaded")?
    );
    assert!(msg.contains("text_encoder/config.json") && msg.contains("d_model"), "{msg}");

    // an activation transformers would not accept
    let (_tmp, dir) = local_copy(&[])?;
    let path = dir.join("text_encoder/config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config["feed_forward_proj"] = "gated-gelu-tanh".into();
    std::fs::write(&path, config.to_string())?;
    let msg = format!(
        "{:#}",
        T5PromptEncoder::load(&Repository::Local(dir), DType::F32, &Device::Cpu).err().context("loaded")?
    );
    assert!(msg.contains("text_encoder/config.json") && msg.contains("feed_forward_proj"), "{msg}");

    // a non-gated activation other than ReLU (candle-transformers would apply ReLU)
    let (_tmp, dir) = local_copy(&[])?;
    let path = dir.join("text_encoder/config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config["feed_forward_proj"] = "gelu".into();
    std::fs::write(&path, config.to_string())?;
    let msg = format!(
        "{:#}",
        T5PromptEncoder::load(&Repository::Local(dir), DType::F32, &Device::Cpu).err().context("loaded")?
    );
    assert!(msg.contains("text_encoder/config.json") && msg.contains("'gelu'"), "{msg}");

    // no weights
    let (_tmp, dir) = local_copy(&["text_encoder/model.safetensors"])?;
    let msg = format!(
        "{:#}",
        T5PromptEncoder::load(&Repository::Local(dir), DType::F32, &Device::Cpu).err().context("loaded")?
    );
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");

    // weights of another size: the file and the key named
    let (_tmp, dir) = local_copy(&[])?;
    let path = dir.join("text_encoder/config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config["d_ff"] = 48.into();
    std::fs::write(&path, config.to_string())?;
    let msg = format!(
        "{:#}",
        T5PromptEncoder::load(&Repository::Local(dir), DType::F32, &Device::Cpu).err().context("loaded")?
    );
    assert!(msg.contains("model.safetensors") && msg.contains("DenseReluDense.wi.weight"), "{msg}");
    Ok(())
}
