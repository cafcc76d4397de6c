//! Weights: validated safetensors loading, atomic saving, and Hub references.
//!
//! A weight reference is either a local path or a Hugging Face Hub reference
//! `org/name[@revision]:path/in/repo`. Hub files resolve from the standard cache that Python's
//! `huggingface_hub` also uses (`HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`,
//! `~/.cache/huggingface/hub`), so a file downloaded from Python is reused and everything works
//! offline from a populated cache. Only when a file is missing, `HF_HUB_OFFLINE` is unset and
//! the `hub-download` feature is on does anything touch the network.
//!
//! hf-hub 0.4 rather than 1.0: 0.4's sync API builds in seconds on `ureq`; 1.0 is async-first
//! and pulls tokio, reqwest, hf-xet and aws-lc-sys (minutes of build for one GET). The cache
//! lookup is ours (it trims ref files and accepts commit hashes as revisions), the download is
//! hf-hub's.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("weights file not found: {0}")]
    NotFound(PathBuf),
    #[error("cannot read weights file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("weights file {path} is not a valid safetensors file (truncated or corrupt?): {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("weights file {path} does not fit the model:\n  - {}", problems.join("\n  - "))]
    Mismatch { path: PathBuf, problems: Vec<String> },
    #[error("weights file {path}: tensor '{key}' holds {count} NaN/Inf values")]
    NonFinite { path: PathBuf, key: String, count: usize },
    #[error("invalid Hub reference '{reference}': {why} (expected org/name[@revision]:path/in/repo)")]
    BadReference { reference: String, why: String },
    #[error("{message}")]
    NotCached { reference: String, message: String },
    #[error("downloading '{reference}' from the Hub failed: {detail}")]
    Download { reference: String, detail: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Where weights come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightRef {
    Local(PathBuf),
    Hub { repo: String, revision: String, file: String },
}

impl WeightRef {
    /// Parses `org/name[@revision]:path/in/repo` as a Hub reference and anything else as a path.
    /// A string that names an existing local file is always local.
    pub fn parse(s: &str) -> Result<Self, WeightsError> {
        if Path::new(s).exists() {
            return Ok(Self::Local(s.into()));
        }
        let s = s.strip_prefix("hf://").unwrap_or(s);
        let Some((repo_part, file)) = s.split_once(':') else { return Ok(Self::Local(s.into())) };
        let bad = |why: &str| WeightsError::BadReference { reference: s.into(), why: why.into() };
        let (repo, revision) = repo_and_revision(repo_part).map_err(bad)?;
        check_repo_path(file).map_err(bad)?;
        Ok(Self::Hub { repo, revision, file: file.into() })
    }
}

/// How Hub references resolve.
#[derive(Clone, Debug)]
pub struct HubOptions {
    pub cache_dir: PathBuf,
    /// Never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubOptions {
    /// The cache and offline flag Python's `huggingface_hub` would use.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .unwrap_or_else(|| {
                let home =
                    var("HOME").or_else(|| var("USERPROFILE")).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
                home.join(".cache").join("huggingface").join("hub")
            });
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
            .unwrap_or(false);
        Self { cache_dir, offline }
    }
}

/// Resolves a reference string to a local file, using the environment's Hub settings.
pub fn resolve(reference: &str) -> Result<PathBuf, WeightsError> {
    resolve_with(&WeightRef::parse(reference)?, &HubOptions::from_env())
}

/// Resolves a parsed reference to a local file.
pub fn resolve_with(reference: &WeightRef, hub: &HubOptions) -> Result<PathBuf, WeightsError> {
    match reference {
        WeightRef::Local(p) => {
            if p.is_file() {
                Ok(p.clone())
            } else {
                Err(WeightsError::NotFound(p.clone()))
            }
        }
        WeightRef::Hub { repo, revision, file } => {
            let display = format!("{repo}@{revision}:{file}");
            let repo_dir = hub.cache_dir.join(format!("models--{}", repo.replace('/', "--")));
            let ref_file = repo_dir.join("refs").join(revision);
            let is_hash = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
            let commit = if is_hash {
                Some(revision.clone())
            } else {
                std::fs::read_to_string(&ref_file).ok().map(|s| s.trim().to_string())
            };
            let mut looked = vec![ref_file.display().to_string()];
            if let Some(commit) = commit {
                let candidate = repo_dir.join("snapshots").join(&commit).join(file);
                if candidate.is_file() {
                    return Ok(candidate);
                }
                looked.push(candidate.display().to_string());
            }
            if !hub.offline {
                if let Some(p) = download(repo, revision, file, hub)
                    .map_err(|detail| WeightsError::Download { reference: display.clone(), detail })?
                {
                    return Ok(p);
                }
            }
            let rev_flag = if revision == "main" { String::new() } else { format!(" --revision {revision}") };
            let online_hint = if hub.offline {
                "; HF_HUB_OFFLINE is set, so nothing was downloaded"
            } else if cfg!(feature = "hub-download") {
                ""
            } else {
                "; this build has no `hub-download` feature, so nothing was downloaded"
            };
            let message = format!(
                "'{display}' is not in the Hugging Face cache at {} (looked for {}).\n  To fix: download it, e.g. \
                 `huggingface-cli download {repo} {file}{rev_flag}`, or point HF_HUB_CACHE / HF_HOME at a cache that \
                 has it{online_hint}",
                hub.cache_dir.display(),
                looked.join(", ")
            );
            Err(WeightsError::NotCached { reference: display, message })
        }
    }
}

#[cfg(feature = "hub-download")]
fn download(repo: &str, revision: &str, file: &str, hub: &HubOptions) -> Result<Option<PathBuf>, String> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(hub.cache_dir.clone())
        .with_progress(true)
        .build()
        .map_err(|e| e.to_string())?;
    let repo = api.repo(hf_hub::Repo::with_revision(repo.into(), hf_hub::RepoType::Model, revision.into()));
    repo.get(file).map(Some).map_err(|e| e.to_string())
}

#[cfg(not(feature = "hub-download"))]
fn download(_: &str, _: &str, _: &str, _: &HubOptions) -> Result<Option<PathBuf>, String> {
    Ok(None)
}

/// Options for [`load_into_varmap`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// File key `k` fills var `prefix + k` (e.g. `encoder.` for a pretrained backbone).
    pub prefix: String,
    /// Vars of the map (under `prefix`) that the file may leave at their initial values.
    pub allow_missing: bool,
    /// Keys of the file that no var takes.
    pub allow_unexpected: bool,
    /// Convert a file tensor of another float dtype instead of rejecting it.
    pub allow_dtype_cast: bool,
    /// Reject NaN/Inf values.
    pub check_finite: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            allow_missing: false,
            allow_unexpected: false,
            allow_dtype_cast: false,
            check_finite: true,
        }
    }
}

/// What a load did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
}

/// Reads every tensor of a safetensors file, naming the file in every error.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, WeightsError> {
    Ok(read_checked(path, device, None)?.0)
}

/// (tensor name, NaN/Inf values) of each tensor that has any.
type NonFiniteCounts = Vec<(String, usize)>;

/// Reads a safetensors file through a memory map (a multi-GB checkpoint is never copied whole
/// into memory), counting each float tensor's NaN/Inf values on the file's own bytes (no
/// device round trip) and loading it onto `device`, converted to `dtype` when given (integer
/// tensors keep theirs). Returns the tensors and the non-finite count of each tensor that has any.
fn read_checked(
    path: &Path,
    device: &Device,
    dtype: Option<DType>,
) -> Result<(HashMap<String, Tensor>, NonFiniteCounts), WeightsError> {
    if !path.is_file() {
        return Err(WeightsError::NotFound(path.into()));
    }
    let file = std::fs::File::open(path).map_err(|source| WeightsError::Io { path: path.into(), source })?;
    // SAFETY: the map is read-only and lives only while this function reads it; a file changed
    // underneath by another process could give wrong values (as with any reader), which the
    // checks below would then see.
    let bytes =
        unsafe { memmap2::Mmap::map(&file) }.map_err(|source| WeightsError::Io { path: path.into(), source })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| WeightsError::Corrupt { path: path.into(), detail: e.to_string() })?;
    let mut out = HashMap::new();
    let mut non_finite = Vec::new();
    for (name, view) in st.tensors() {
        let mut bad = non_finite_in_bytes(view.dtype(), view.data());
        let t = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| WeightsError::Corrupt { path: path.into(), detail: format!("tensor '{name}': {e}") })?;
        let t = match dtype {
            Some(d) if t.dtype().is_float() && t.dtype() != d => t.to_dtype(d)?,
            _ => t,
        };
        // f16's range ends at 65504: a finite wider value becomes Inf in the conversion.
        if bad == 0 && t.dtype() == DType::F16 && view.dtype() != safetensors::Dtype::F16 {
            bad = non_finite_count(&t)?;
        }
        if bad > 0 {
            non_finite.push((name.clone(), bad));
        }
        out.insert(name, t);
    }
    non_finite.sort();
    Ok((out, non_finite))
}

/// NaN/Inf values in little-endian float data (0 for other dtypes): an all-ones exponent.
fn non_finite_in_bytes(dtype: safetensors::Dtype, data: &[u8]) -> usize {
    use safetensors::Dtype;
    let count_u16 =
        |mask: u16| data.chunks_exact(2).filter(|c| u16::from_le_bytes([c[0], c[1]]) & mask == mask).count();
    match dtype {
        Dtype::F32 => {
            data.chunks_exact(4).filter(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()).count()
        }
        Dtype::F64 => data
            .chunks_exact(8)
            .filter(|c| !f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]).is_finite())
            .count(),
        Dtype::BF16 => count_u16(0x7F80),
        Dtype::F16 => count_u16(0x7C00),
        _ => 0,
    }
}

fn non_finite_count(t: &Tensor) -> Result<usize, candle_core::Error> {
    if !t.dtype().is_float() {
        return Ok(0);
    }
    let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().filter(|x| !x.is_finite()).count())
}

/// Fills the vars of `varmap` from a safetensors file, after checking everything at once:
/// missing and unexpected keys, shape and dtype mismatches, NaN/Inf. Nothing is changed unless
/// every check passes.
pub fn load_into_varmap(varmap: &VarMap, path: &Path, opts: &LoadOptions) -> Result<LoadReport, WeightsError> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let device = match data.values().next() {
        Some(v) => v.device().clone(),
        None => Device::Cpu,
    };
    let file = read_safetensors(path, &device)?;
    let mut problems = Vec::new();
    let mut report = LoadReport::default();
    let mut updates = Vec::new();
    let wanted: BTreeSet<&String> = data.keys().filter(|k| k.starts_with(&opts.prefix)).collect();
    for name in &wanted {
        let key = &name[opts.prefix.len()..];
        let var = &data[*name];
        match file.get(key) {
            None => report.missing.push(name.to_string()),
            Some(t) => {
                if t.shape() != var.shape() {
                    problems.push(format!(
                        "'{key}': shape {:?} in the file, the model expects {:?}",
                        t.dims(),
                        var.dims()
                    ));
                    continue;
                }
                if t.dtype() != var.dtype()
                    && !(opts.allow_dtype_cast && t.dtype().is_float() && var.dtype().is_float())
                {
                    problems.push(format!(
                        "'{key}': dtype {:?} in the file, the model expects {:?}",
                        t.dtype(),
                        var.dtype()
                    ));
                    continue;
                }
                if opts.check_finite {
                    let bad = non_finite_count(t)?;
                    if bad > 0 {
                        return Err(WeightsError::NonFinite { path: path.into(), key: key.into(), count: bad });
                    }
                }
                updates.push((name.to_string(), t.to_dtype(var.dtype())?));
            }
        }
    }
    let mut unexpected: Vec<String> =
        file.keys().filter(|k| !wanted.contains(&format!("{}{k}", opts.prefix))).cloned().collect();
    unexpected.sort();
    report.unexpected = unexpected;
    if !opts.allow_missing && !report.missing.is_empty() {
        problems.push(format!("missing keys (in the model, not in the file): {:?}", report.missing));
    }
    if !opts.allow_unexpected && !report.unexpected.is_empty() {
        problems.push(format!("unexpected keys (in the file, not in the model): {:?}", report.unexpected));
    }
    if !problems.is_empty() {
        return Err(WeightsError::Mismatch { path: path.into(), problems });
    }
    for (name, t) in updates {
        data[&name].set(&t)?;
        report.loaded.push(name);
    }
    Ok(report)
}

/// A `VarBuilder` over a file's tensors (frozen weights: no Vars, no gradients recorded), after
/// checking the file is readable and finite. Missing keys and wrong shapes are reported by name
/// when the model asks for them.
pub fn varbuilder_from_file(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>, WeightsError> {
    let (tensors, non_finite) = read_checked(path, device, Some(dtype))?;
    if let Some((key, count)) = non_finite.into_iter().next() {
        return Err(WeightsError::NonFinite { path: path.into(), key, count });
    }
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// A `VarBuilder` over a file's tensors for a model whose every weight name and shape is known
/// (from a [`ShapeRecorder`]): the file must hold exactly those keys with those shapes, finite.
/// Every problem (missing, unexpected, wrong shape, NaN/Inf) is listed at once, naming the file
/// and key, before any weight is used.
pub fn varbuilder_for_model(
    path: &Path,
    expected: &std::collections::BTreeMap<String, Vec<usize>>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, WeightsError> {
    varbuilder_for_model_files(&[path.to_path_buf()], expected, dtype, device)
}

/// [`varbuilder_for_model`] over the shards of one checkpoint (`*.safetensors.index.json`'s
/// files): together they must hold each weight exactly once.
pub fn varbuilder_for_model_files(
    paths: &[PathBuf],
    expected: &std::collections::BTreeMap<String, Vec<usize>>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, WeightsError> {
    checked_model_varbuilder(paths, expected, dtype, false, device)
}

/// [`varbuilder_for_model`] for our own file formats, which are written in one dtype: a tensor
/// stored in any other dtype is a problem too (not silently converted).
pub fn varbuilder_for_model_exact(
    path: &Path,
    expected: &std::collections::BTreeMap<String, Vec<usize>>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, WeightsError> {
    checked_model_varbuilder(&[path.to_path_buf()], expected, dtype, true, device)
}

fn checked_model_varbuilder(
    paths: &[PathBuf],
    expected: &std::collections::BTreeMap<String, Vec<usize>>,
    dtype: DType,
    exact_dtype: bool,
    device: &Device,
) -> Result<VarBuilder<'static>, WeightsError> {
    let Some(path) = paths.first() else {
        return Err(WeightsError::NotFound(PathBuf::from("(no weight files)")));
    };
    let mut tensors = HashMap::new();
    let mut problems = Vec::new();
    let mut non_finite: HashMap<String, usize> = HashMap::new();
    for shard in paths {
        // Memory-mapped and converted to `dtype` tensor by tensor: the host never holds a whole
        // shard, nor a tensor in two dtypes for longer than its conversion.
        let (shard_tensors, bad) = read_checked(shard, device, (!exact_dtype).then_some(dtype))?;
        non_finite.extend(bad);
        for (key, t) in shard_tensors {
            if exact_dtype && t.dtype() != dtype {
                problems.push(format!("'{key}': stored as {:?}, the format is {dtype:?}", t.dtype()));
            }
            if tensors.insert(key.clone(), t).is_some() {
                problems.push(format!("'{key}' appears twice (again in {})", shard.display()));
            }
        }
    }
    for (key, shape) in expected {
        match tensors.get(key) {
            None => problems.push(format!("missing '{key}' {shape:?}")),
            Some(t) if t.dims() != shape.as_slice() => {
                problems.push(format!("'{key}': shape {:?} in the file, the model expects {shape:?}", t.dims()))
            }
            Some(_) => {
                if let Some(bad) = non_finite.get(key) {
                    problems.push(format!("'{key}': {bad} NaN/Inf values"));
                }
            }
        }
    }
    let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !expected.contains_key(*k)).collect();
    unexpected.sort();
    problems.extend(unexpected.into_iter().map(|k| format!("unexpected '{k}' (the model has no such weight)")));
    if !problems.is_empty() {
        return Err(WeightsError::Mismatch { path: path.into(), problems });
    }
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// Saves named tensors as safetensors atomically (temp file + rename).
pub fn save_tensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> anyhow::Result<()> {
    crate::io::write_atomic_with(path, |tmp| Ok(candle_core::safetensors::save(tensors, tmp)?))
}

/// Every var of a `VarMap` by name (the tensors share the vars' storage: no copy).
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .expect("VarMap lock poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// Saves every var of a `VarMap` atomically.
pub fn save_varmap_atomic(varmap: &VarMap, path: &Path) -> anyhow::Result<()> {
    save_tensors_atomic(&varmap_tensors(varmap), path)
}

/// A `VarBuilder` backend that records the name and shape of every weight a model asks for,
/// and hands back a broadcast zero — a stride-0 view of one element, so building even a
/// multi-billion-parameter model allocates nothing of its weights. Tests use it to show that a
/// model built from a real `config.json` expects exactly a real checkpoint's keys and shapes
/// (lists made from upstream on PyTorch's meta device).
#[derive(Clone, Debug, Default)]
pub struct ShapeRecorder {
    requested: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<usize>>>>,
}

impl ShapeRecorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A `VarBuilder` over this recorder.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Every name asked for, with its shape, sorted by name.
    pub fn shapes(&self) -> std::collections::BTreeMap<String, Vec<usize>> {
        self.requested.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Σ over the recorded weights of their element counts.
    pub fn parameter_count(&self) -> usize {
        self.shapes().values().map(|s| s.iter().product::<usize>()).sum()
    }
}

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut requested =
            self.requested.lock().map_err(|_| candle_core::Error::Msg("shape recorder: lock poisoned".into()))?;
        match requested.get(name) {
            Some(prev) if prev.as_slice() != shape.dims() => {
                candle_core::bail!("shape recorder: '{name}' asked for as {:?} and as {:?}", prev, shape.dims())
            }
            _ => {
                requested.insert(name.to_string(), shape.dims().to_vec());
            }
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder: '{name}' asked for without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;

/// `org/name[@revision]` → (`org/name`, revision; `main` when absent), or why not.
fn repo_and_revision(repo_part: &str) -> Result<(String, String), &'static str> {
    let (repo, revision) = match repo_part.split_once('@') {
        Some((r, rev)) if !rev.is_empty() => (r, rev),
        Some(_) => return Err("empty revision after '@'"),
        None => (repo_part, "main"),
    };
    let valid = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    match repo.split_once('/') {
        Some((org, name)) if valid(org) && valid(name) => Ok((repo.into(), revision.into())),
        _ => Err("the repository must be 'org/name'"),
    }
}

/// A path inside a repository: relative, not empty, never climbing out.
fn check_repo_path(file: &str) -> Result<(), &'static str> {
    if file.is_empty() || file.starts_with('/') || file.split('/').any(|c| c == "..") {
        return Err("the file must be a relative path inside the repository");
    }
    Ok(())
}

/// A dataset reference: a local path (file or directory), or a Hugging Face Hub dataset
/// repository `hf://datasets/org/name[@revision]` (the whole repository: a LeRobot dataset) or
/// one file in it, `hf://datasets/org/name[@revision]:path/in/repo` (an HDF5 file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatasetRef {
    Local(PathBuf),
    Hub { repo: String, revision: String, file: Option<String> },
}

impl DatasetRef {
    /// Parses `hf://datasets/…` as a Hub reference and anything else as a path.
    pub fn parse(s: &str) -> Result<Self, WeightsError> {
        let Some(rest) = s.strip_prefix("hf://datasets/") else { return Ok(Self::Local(s.into())) };
        let bad = |why: &str| WeightsError::BadReference {
            reference: s.into(),
            why: format!("{why}; a dataset is hf://datasets/org/name[@revision][:path/in/repo]"),
        };
        let (repo_part, file) = match rest.split_once(':') {
            Some((r, f)) => (r, Some(f)),
            None => (rest, None),
        };
        let (repo, revision) = repo_and_revision(repo_part).map_err(bad)?;
        if let Some(f) = file {
            check_repo_path(f).map_err(bad)?;
        }
        Ok(Self::Hub { repo, revision, file: file.map(String::from) })
    }
}

/// Resolves a dataset reference ([`DatasetRef`]) to a local path, using the environment's Hub
/// settings: a cached snapshot of the repository (or the file in it), downloaded first when it
/// is missing, `HF_HUB_OFFLINE` is unset and the `hub-download` feature is on.
pub fn resolve_dataset(reference: &str) -> Result<PathBuf, WeightsError> {
    resolve_dataset_with(&DatasetRef::parse(reference)?, &HubOptions::from_env())
}

/// Resolves a parsed dataset reference.
pub fn resolve_dataset_with(reference: &DatasetRef, hub: &HubOptions) -> Result<PathBuf, WeightsError> {
    let DatasetRef::Hub { repo, revision, file } = reference else {
        let DatasetRef::Local(path) = reference else { unreachable!("two variants") };
        return if path.exists() { Ok(path.clone()) } else { Err(WeightsError::NotFound(path.clone())) };
    };
    let display = match file {
        Some(f) => format!("hf://datasets/{repo}@{revision}:{f}"),
        None => format!("hf://datasets/{repo}@{revision}"),
    };
    let repo_dir = hub.cache_dir.join(format!("datasets--{}", repo.replace('/', "--")));
    let ref_file = repo_dir.join("refs").join(revision);
    let is_hash = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit =
        if is_hash { Some(revision.clone()) } else { std::fs::read_to_string(&ref_file).ok().map(|s| s.trim().into()) };
    let mut looked = vec![ref_file.display().to_string()];
    if let Some(commit) = commit {
        let snapshot = repo_dir.join("snapshots").join(&commit);
        let candidate = match file {
            Some(f) => snapshot.join(f),
            None => snapshot,
        };
        if candidate.exists() {
            return Ok(candidate);
        }
        looked.push(candidate.display().to_string());
    }
    if !hub.offline {
        if let Some(p) = download_dataset(repo, revision, file.as_deref(), hub)
            .map_err(|detail| WeightsError::Download { reference: display.clone(), detail })?
        {
            return Ok(p);
        }
    }
    let online_hint = if hub.offline {
        "; HF_HUB_OFFLINE is set, so nothing was downloaded"
    } else if cfg!(feature = "hub-download") {
        ""
    } else {
        "; this build has no `hub-download` feature, so nothing was downloaded"
    };
    let what = file.as_deref().unwrap_or("");
    let message = format!(
        "'{display}' is not in the Hugging Face cache at {} (looked for {}).\n  To fix: download it, e.g. \
         `huggingface-cli download --repo-type dataset {repo} {what} --revision {revision}`, or point HF_HUB_CACHE / \
         HF_HOME at a cache that has it{online_hint}",
        hub.cache_dir.display(),
        looked.join(", ")
    );
    Err(WeightsError::NotCached { reference: display, message })
}

#[cfg(feature = "hub-download")]
fn download_dataset(
    repo: &str,
    revision: &str,
    file: Option<&str>,
    hub: &HubOptions,
) -> Result<Option<PathBuf>, String> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(hub.cache_dir.clone())
        .with_progress(true)
        .build()
        .map_err(|e| e.to_string())?;
    let repo = api.repo(hf_hub::Repo::with_revision(repo.into(), hf_hub::RepoType::Dataset, revision.into()));
    if let Some(file) = file {
        return repo.get(file).map(Some).map_err(|e| e.to_string());
    }
    // The whole repository: every file, then the snapshot directory that holds them.
    let info = repo.info().map_err(|e| e.to_string())?;
    let mut snapshot = None;
    for sibling in &info.siblings {
        let path = repo.get(&sibling.rfilename).map_err(|e| format!("{}: {e}", sibling.rfilename))?;
        let depth = Path::new(&sibling.rfilename).components().count();
        snapshot = path.ancestors().nth(depth).map(Path::to_path_buf);
    }
    Ok(snapshot)
}

#[cfg(not(feature = "hub-download"))]
fn download_dataset(_: &str, _: &str, _: Option<&str>, _: &HubOptions) -> Result<Option<PathBuf>, String> {
    Ok(None)
}

#[cfg(test)]
mod dataset_ref_tests {
    use super::*;

    /// A populated cache (as `huggingface_hub` lays it out) resolves offline: the repository's
    /// snapshot for `hf://datasets/org/name`, a file of it with `:path`, a commit hash directly.
    #[test]
    fn hub_datasets_resolve_from_the_cache() {
        let cache = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo_dir = cache.path().join("datasets--lerobot--pusht");
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs").join("main"), format!("{commit}\n")).unwrap();
        let snapshot = repo_dir.join("snapshots").join(commit);
        std::fs::create_dir_all(snapshot.join("meta")).unwrap();
        std::fs::write(snapshot.join("meta").join("info.json"), b"{}").unwrap();
        let hub = HubOptions { cache_dir: cache.path().to_path_buf(), offline: true };
        let resolve = |s: &str| resolve_dataset_with(&DatasetRef::parse(s).unwrap(), &hub);
        assert_eq!(resolve("hf://datasets/lerobot/pusht").unwrap(), snapshot);
        assert_eq!(resolve(&format!("hf://datasets/lerobot/pusht@{commit}")).unwrap(), snapshot);
        assert_eq!(resolve("hf://datasets/lerobot/pusht:meta/info.json").unwrap(), snapshot.join("meta/info.json"));
        let missing = resolve("hf://datasets/lerobot/aloha").unwrap_err().to_string();
        assert!(
            missing.contains("--repo-type dataset lerobot/aloha") && missing.contains("HF_HUB_OFFLINE"),
            "{missing}"
        );
        let bad = DatasetRef::parse("hf://datasets/pusht").unwrap_err().to_string();
        assert!(bad.contains("org/name"), "{bad}");
        assert_eq!(DatasetRef::parse("data/x.hdf5").unwrap(), DatasetRef::Local("data/x.hdf5".into()));
    }
}
