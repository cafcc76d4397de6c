//! The T5 text path of Cosmos-Predict2 (`Cosmos2VideoToWorldPipeline`): prompt → T5 tokens →
//! `T5EncoderModel` last hidden state, with the rows past each prompt's tokens zeroed, exactly
//! as diffusers' `_get_t5_prompt_embeds` computes the DiT's cross-attention context.
//!
//! Inference only (nothing here is differentiated): candle-transformers' T5 encoder with its
//! fused ops. That encoder takes no attention mask, so it is run on each prompt's *unpadded*
//! tokens. This is the masked computation, not an approximation of it: with the padding keys
//! masked, a real token's row never reads a padding row (attention is the only mixing across
//! positions, and the relative position bias depends on distance only), and diffusers then
//! zeroes every padding row. It also skips the work on the padding: a 13-token prompt costs
//! 13 rows instead of 512 through the feed-forwards of an 11B-parameter encoder.
//!
//! Parity with transformers 5.24 / diffusers 0.42.1 (tests/cosmos_t5_parity.rs): token ids and
//! mask identical; embeddings in f32 within 3.1e-7 / 1.2e-6 relative (max |Δ| / max |ref|) for
//! the ReLU encoder of the Predict2 fixture (13 / 426 tokens of 512), 4.6e-7 / 7.6e-7 for a
//! gated-GELU (T5 v1.1) one (13 / 64 tokens of 64, the second truncated). Without the mask the
//! embeddings are off by 1.3 relative; the erf GELU for the tanh one by 1.6e-4.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::Activation;
use candle_transformers::models::t5;
use serde::Deserialize;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, PostProcessor, Tokenizer, TruncationParams};

use super::pipeline::Repository;

/// The negative prompt diffusers' `Cosmos2VideoToWorldPipeline` uses when none is given
/// (`DEFAULT_NEGATIVE_PROMPT`, diffusers 0.42.1).
pub const COSMOS_PREDICT2_DEFAULT_NEGATIVE_PROMPT: &str = "The video captures a series of frames showing ugly \
scenes, static with no motion, motion blur, over-saturation, shaky footage, low resolution, grainy texture, \
pixelated images, poorly lit areas, underexposed and overexposed scenes, poor color balance, washed out colors, \
choppy sequences, jerky movements, low frame rate, artifacting, color banding, unnatural transitions, outdated \
special effects, fake elements, unconvincing visuals, poorly edited content, jump cuts, visual noise, and \
flickering. Overall, the video is of poor quality.";

/// The sequence length diffusers pads Cosmos prompts to (`max_sequence_length`).
pub const COSMOS_PREDICT2_MAX_SEQUENCE_LENGTH: usize = 512;

/// transformers' `T5Config` fields the encoder uses, with transformers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::d_model")]
    pub d_model: usize,
    #[serde(default = "defaults::d_kv")]
    pub d_kv: usize,
    #[serde(default = "defaults::d_ff")]
    pub d_ff: usize,
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    #[serde(default = "defaults::num_heads")]
    pub num_heads: usize,
    #[serde(default = "defaults::relative_attention_num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "defaults::relative_attention_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// `"relu"` (t5-11b, Cosmos-Predict2's encoder), `"gated-gelu"` (T5 v1.1), `"gated-silu"`, …
    /// transformers derives `dense_act_fn` and `is_gated_act` from it (and ignores the stored
    /// ones), so this is the field read here.
    #[serde(default = "defaults::feed_forward_proj")]
    pub feed_forward_proj: String,
}

mod defaults {
    pub fn vocab_size() -> usize {
        32128
    }
    pub fn d_model() -> usize {
        512
    }
    pub fn d_kv() -> usize {
        64
    }
    pub fn d_ff() -> usize {
        2048
    }
    pub fn num_layers() -> usize {
        6
    }
    pub fn num_heads() -> usize {
        8
    }
    pub fn relative_attention_num_buckets() -> usize {
        32
    }
    pub fn relative_attention_max_distance() -> usize {
        128
    }
    pub fn layer_norm_epsilon() -> f64 {
        1e-6
    }
    pub fn feed_forward_proj() -> String {
        "relu".into()
    }
}

impl Config {
    pub fn from_json_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&text))
            .map_err(|e| anyhow::anyhow!("field '{}': {}", e.path(), e.inner()))
            .with_context(|| format!("parsing {} as a T5 config", path.display()))?;
        cfg.feed_forward().with_context(|| format!("invalid T5 config {}", path.display()))?;
        cfg.validate().with_context(|| format!("invalid T5 config {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
        ] {
            ensure!(v > 0, "{name} must be positive");
        }
        // Bucketing halves the buckets per direction and keeps half of those for exact
        // distances; an odd count or under 4 buckets has no well-defined layout, and the
        // logarithmic buckets need max_distance beyond the exact ones (log of a ratio ≤ 1).
        let (buckets, max_distance) = (self.relative_attention_num_buckets, self.relative_attention_max_distance);
        ensure!(
            buckets >= 4 && buckets % 2 == 0,
            "relative_attention_num_buckets must be even and at least 4, got {buckets}"
        );
        ensure!(
            max_distance > buckets / 4,
            "relative_attention_max_distance ({max_distance}) must exceed relative_attention_num_buckets / 4 ({})",
            buckets / 4
        );
        ensure!(
            self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon >= 0.0,
            "layer_norm_epsilon must be finite and non-negative, got {}",
            self.layer_norm_epsilon
        );
        Ok(())
    }

    /// (gated, activation) as transformers' `T5Config` reads `feed_forward_proj`:
    /// `"ACT"` or `"gated-ACT"`, with `"gated-gelu"` meaning the tanh GELU (`gelu_new`) while a
    /// bare `"gelu"` is the erf GELU.
    pub fn feed_forward(&self) -> anyhow::Result<(bool, Activation)> {
        let proj = self.feed_forward_proj.as_str();
        let (gated, act) = match proj.split_once('-') {
            Some(("gated", act)) => (true, if act == "gelu" { "gelu_new" } else { act }),
            Some(_) => bail!("feed_forward_proj '{proj}': expected 'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu')"),
            None => (false, proj),
        };
        let activation = match act {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::NewGelu,
            "silu" | "swish" => Activation::Silu,
            other => bail!(
                "feed_forward_proj '{proj}': activation '{other}' is not supported (relu, gelu, gelu_new, \
                 gelu_pytorch_tanh, silu)"
            ),
        };
        // candle-transformers' non-gated feed-forward applies ReLU whatever it is configured
        // with (measured: 'gelu' gave the ReLU result to 3e-7), so anything else is refused
        // rather than computed wrong. Every T5 with a non-gated feed-forward is ReLU anyway.
        ensure!(
            gated || activation == Activation::Relu,
            "feed_forward_proj '{proj}': a non-gated feed-forward other than 'relu' is not supported"
        );
        Ok((gated, activation))
    }

    /// candle-transformers' configuration of the same encoder.
    fn to_candle(&self) -> anyhow::Result<t5::Config> {
        let (gated, activation) = self.feed_forward()?;
        Ok(t5::Config {
            vocab_size: self.vocab_size,
            d_model: self.d_model,
            d_kv: self.d_kv,
            d_ff: self.d_ff,
            num_layers: self.num_layers,
            num_decoder_layers: None,
            num_heads: self.num_heads,
            relative_attention_num_buckets: self.relative_attention_num_buckets,
            relative_attention_max_distance: self.relative_attention_max_distance,
            dropout_rate: 0.0,
            layer_norm_epsilon: self.layer_norm_epsilon,
            initializer_factor: 1.0,
            feed_forward_proj: t5::ActivationWithOptionalGating { gated, activation },
            tie_word_embeddings: true,
            is_decoder: false,
            is_encoder_decoder: false,
            use_cache: false,
            pad_token_id: 0,
            eos_token_id: 1,
            decoder_start_token_id: None,
        })
    }
}

/// Prompts as the T5 tokenizer gives them to diffusers' encoder: padded to a fixed length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct T5Tokens {
    /// (B, max_len) token ids, padded on the right with the pad token.
    pub input_ids: Vec<Vec<u32>>,
    /// (B, max_len) 1 on the prompt's tokens (`</s>` included), 0 on the padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// Whether a prompt was cut to fit (diffusers warns about it, and so should a caller).
    pub truncated: Vec<bool>,
}

impl T5Tokens {
    /// The number of real tokens of each prompt.
    pub fn lengths(&self) -> Vec<usize> {
        self.attention_mask.iter().map(|m| m.iter().filter(|&&v| v != 0).count()).collect()
    }
}

/// A pipeline's T5 text encoder and tokenizer (`text_encoder/`, `tokenizer/tokenizer.json`).
pub struct T5PromptEncoder {
    config: Config,
    model: t5::T5EncoderModel,
    tokenizer: Tokenizer,
    pad_id: u32,
    pad_token: String,
    dtype: DType,
    device: Device,
}

/// Where the weights of `text_encoder/` are: one file or the shards its index names.
fn weight_files(repo: &Repository) -> anyhow::Result<Vec<PathBuf>> {
    if let Ok(single) = repo.file("text_encoder/model.safetensors") {
        return Ok(vec![single]);
    }
    let index_path = repo.file("text_encoder/model.safetensors.index.json").with_context(|| {
        format!("{}: text_encoder/ has neither model.safetensors nor model.safetensors.index.json", repo.describe())
    })?;
    let text = std::fs::read_to_string(&index_path).with_context(|| format!("reading {}", index_path.display()))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index_path.display()))?;
    let map =
        index["weight_map"].as_object().with_context(|| format!("{}: no weight_map object", index_path.display()))?;
    let mut shards = Vec::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .with_context(|| format!("{}: weight_map['{key}'] is not a file name", index_path.display()))?;
        shards.push(file.to_string());
    }
    shards.sort();
    shards.dedup();
    ensure!(!shards.is_empty(), "{}: the weight_map is empty", index_path.display());
    shards
        .iter()
        .map(|s| {
            repo.file(&format!("text_encoder/{s}")).with_context(|| format!("a shard {} names", index_path.display()))
        })
        .collect()
}

/// The tensor names of a safetensors file, from its header alone (the weights can be many GB).
fn safetensors_keys(path: &Path) -> anyhow::Result<Vec<String>> {
    use std::io::Read;
    let corrupt = || format!("{} is not a valid safetensors file (truncated or corrupt?)", path.display());
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(corrupt)?;
    let len = u64::from_le_bytes(len);
    // safetensors itself refuses headers over 100 MB
    ensure!(len <= 100_000_000, "{}: header of {len} bytes", corrupt());
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).with_context(corrupt)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).with_context(corrupt)?;
    Ok(header.keys().filter(|k| *k != "__metadata__").cloned().collect())
}

/// The error for a repository without `tokenizer/tokenizer.json`, saying how to make one.
fn missing_tokenizer_json(repo: &Repository, why: &anyhow::Error) -> anyhow::Error {
    let quoted = match repo {
        Repository::Local(dir) => dir.display().to_string(),
        Repository::Hub { repo, revision, .. } if revision == "main" => repo.clone(),
        Repository::Hub { repo, revision, .. } => format!("{repo}@{revision}"),
    };
    let why = match repo {
        Repository::Local(_) => String::new(),
        Repository::Hub { .. } => format!(" ({why:#})"),
    };
    anyhow::anyhow!(
        "{}: no tokenizer/tokenizer.json{why}.\n  The T5 tokenizer is read from tokenizer.json (the Rust \
         `tokenizers` format); the Cosmos repositories ship only the SentencePiece model (tokenizer/spiece.model). \
         Make tokenizer.json once, next to it, with transformers (pip install transformers sentencepiece protobuf):\n    \
         python scripts/cosmos_tokenizer_json.py {quoted}\n  or, for a local directory DIR:\n    \
         python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('DIR', \
         subfolder='tokenizer').backend_tokenizer.save('DIR/tokenizer/tokenizer.json')\"",
        repo.describe()
    )
}

/// `tokenizer_config.json`'s pad token (a string or an AddedToken object), `<pad>` without one.
fn pad_token(repo: &Repository) -> anyhow::Result<String> {
    let Ok(path) = repo.file("tokenizer/tokenizer_config.json") else { return Ok("<pad>".into()) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(match &cfg["pad_token"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .with_context(|| format!("{}: pad_token has no content", path.display()))?
            .to_string(),
        _ => "<pad>".into(),
    })
}

impl T5PromptEncoder {
    /// Loads `text_encoder/config.json`, its weights (every name and shape checked against the
    /// config's encoder, finite), in `dtype` on `device`, and `tokenizer/tokenizer.json`.
    pub fn load(repo: &Repository, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        // The tokenizer first: it is the file most often missing, and the cheapest to check.
        let tokenizer_path = repo.file("tokenizer/tokenizer.json").map_err(|e| missing_tokenizer_json(repo, &e))?;
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow::anyhow!("reading {} as a tokenizers tokenizer: {e}", tokenizer_path.display()))?;
        let pad = pad_token(repo)?;
        let pad_id = tokenizer
            .token_to_id(&pad)
            .with_context(|| format!("{}: the pad token '{pad}' is not in the vocabulary", tokenizer_path.display()))?;

        let config_path = repo.file("text_encoder/config.json")?;
        let config = Config::from_json_file(&config_path)?;
        let candle_cfg = config.to_candle()?;
        let files = weight_files(repo)?;

        // transformers saves the tied token embedding as `shared.weight`, as
        // `encoder.embed_tokens.weight`, or as both; candle's encoder reads the first present.
        let mut present = std::collections::BTreeSet::new();
        for f in &files {
            present.extend(safetensors_keys(f)?);
        }
        let has = |k: &str| present.contains(k);
        let recorder = shared::weights::ShapeRecorder::new();
        t5::T5EncoderModel::load(recorder.var_builder(dtype, device), &candle_cfg)?;
        let mut expected = recorder.shapes();
        let embedding = expected.remove("shared.weight").context("the T5 encoder asked for no shared.weight")?;
        let (shared, embed_tokens) = ("shared.weight", "encoder.embed_tokens.weight");
        if has(shared) || !has(embed_tokens) {
            expected.insert(shared.into(), embedding.clone());
        }
        if has(embed_tokens) {
            expected.insert(embed_tokens.into(), embedding);
        }
        let vb = shared::weights::varbuilder_for_model_files(&files, &expected, dtype, device)
            .with_context(|| format!("loading the T5 text encoder of {}", repo.describe()))?;
        let model = t5::T5EncoderModel::load(vb, &candle_cfg)
            .with_context(|| format!("building the T5 text encoder from {}", config_path.display()))?;
        Ok(Self { config, model, tokenizer, pad_id, pad_token: pad, dtype, device: device.clone() })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Tokenises as diffusers does (`padding="max_length"`, `truncation=True`): the tokenizer's
    /// post-processor appends `</s>`, a longer prompt is cut to `max_len - 1` tokens + `</s>`.
    pub fn tokenize(&self, prompts: &[&str], max_len: usize) -> anyhow::Result<T5Tokens> {
        let added = self.tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(false));
        ensure!(
            max_len > added,
            "max_len {max_len} leaves no room for a token besides the {added} the tokenizer appends"
        );
        let mut tokenizer = self.tokenizer.clone();
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| anyhow::anyhow!("setting the tokenizer's truncation: {e}"))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self.pad_token.clone(),
        }));
        let mut out = T5Tokens { input_ids: vec![], attention_mask: vec![], truncated: vec![] };
        for prompt in prompts {
            let enc = tokenizer
                .encode(*prompt, true)
                .map_err(|e| anyhow::anyhow!("tokenising the prompt {prompt:?}: {e}"))?;
            ensure!(enc.get_ids().len() == max_len, "the tokenizer gave {} tokens, not {max_len}", enc.get_ids().len());
            out.input_ids.push(enc.get_ids().to_vec());
            out.attention_mask.push(enc.get_attention_mask().to_vec());
            out.truncated.push(!enc.get_overflowing().is_empty());
        }
        Ok(out)
    }

    /// (B, max_len, d_model) prompt embeddings, as diffusers'
    /// `Cosmos2VideoToWorldPipeline._get_t5_prompt_embeds(prompts, max_len)`.
    pub fn encode(&self, prompts: &[&str], max_len: usize) -> anyhow::Result<Tensor> {
        let tokens = self.tokenize(prompts, max_len)?;
        self.encode_tokens(&tokens)
    }

    /// The encoder on tokenised prompts: the last hidden state under the attention mask, rows
    /// past each prompt's tokens zero. The mask must be a prefix of ones (right padding).
    pub fn encode_tokens(&self, tokens: &T5Tokens) -> anyhow::Result<Tensor> {
        ensure!(!tokens.input_ids.is_empty(), "no prompts to encode");
        ensure!(
            tokens.input_ids.len() == tokens.attention_mask.len(),
            "{} prompts of ids and {} of attention mask",
            tokens.input_ids.len(),
            tokens.attention_mask.len()
        );
        let max_len = tokens.input_ids[0].len();
        let d = self.config.d_model;
        let mut rows = Vec::with_capacity(tokens.input_ids.len());
        for (b, (ids, mask)) in tokens.input_ids.iter().zip(&tokens.attention_mask).enumerate() {
            ensure!(
                ids.len() == max_len && mask.len() == max_len,
                "prompt {b}: {} ids and {} mask entries, expected {max_len}",
                ids.len(),
                mask.len()
            );
            let n = mask.iter().take_while(|&&m| m != 0).count();
            ensure!(mask[n..].iter().all(|&m| m == 0), "prompt {b}: the attention mask is not ones then zeros");
            if let Some(bad) = ids[..n].iter().find(|&&id| id as usize >= self.config.vocab_size) {
                bail!("prompt {b}: token id {bad} is outside the encoder's vocabulary of {}", self.config.vocab_size);
            }
            let row = if n == 0 {
                // every key masked: diffusers zeroes the whole row anyway
                Tensor::zeros((1, max_len, d), self.dtype, &self.device)?
            } else {
                let ids = Tensor::new(&ids[..n], &self.device)?.unsqueeze(0)?;
                // `forward` takes &mut for a decoder's KV cache, unused by an encoder; a clone
                // shares the weights.
                let hidden = self.model.clone().forward(&ids)?.to_dtype(self.dtype)?;
                hidden.pad_with_zeros(1, 0, max_len - n)?
            };
            rows.push(row);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}
