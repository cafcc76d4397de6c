//! D4RL-style `.npz` import (and export) for state-only data.
//!
//! An `.npz` is a zip archive of `.npy` files (stored or deflated). The container is read with
//! the `zip` crate; the `.npy` format is small and stable enough to parse here: magic, version,
//! a Python-dict header with `descr`, `fortran_order` and `shape`, then raw little-endian data.
//! Supported element types: `<f4 <f8 <i4 <i8 |u1 |i1 |b1`; C order only.
//!
//! [`import_d4rl`] expects D4RL's keys `observations [N, obs_dim]`, `actions [N, act_dim]`,
//! `rewards [N]`, `terminals [N]`, `timeouts [N]` and optionally `next_observations`.

use super::DatasetError;
use std::io::{Read, Write};
use std::path::Path;

/// Elements of an `.npy` array.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    I8(Vec<i8>),
    Bool(Vec<bool>),
}

impl NpyData {
    fn len(&self) -> usize {
        match self {
            NpyData::F32(v) => v.len(),
            NpyData::F64(v) => v.len(),
            NpyData::I32(v) => v.len(),
            NpyData::I64(v) => v.len(),
            NpyData::U8(v) => v.len(),
            NpyData::I8(v) => v.len(),
            NpyData::Bool(v) => v.len(),
        }
    }
    fn descr(&self) -> &'static str {
        match self {
            NpyData::F32(_) => "<f4",
            NpyData::F64(_) => "<f8",
            NpyData::I32(_) => "<i4",
            NpyData::I64(_) => "<i8",
            NpyData::U8(_) => "|u1",
            NpyData::I8(_) => "|i1",
            NpyData::Bool(_) => "|b1",
        }
    }
    /// Values as f32 (booleans as 0/1).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            NpyData::F32(v) => v.clone(),
            NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::U8(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I8(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::Bool(v) => v.iter().map(|&x| x as u8 as f32).collect(),
        }
    }
    /// Values as booleans (nonzero is true).
    pub fn to_bool(&self) -> Vec<bool> {
        match self {
            NpyData::Bool(v) => v.clone(),
            other => other.to_f32().iter().map(|&x| x != 0.0).collect(),
        }
    }
}

/// An n-dimensional array from an `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

/// Parses one `.npy` file's bytes.
pub fn parse_npy(bytes: &[u8]) -> Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not an .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (header_len, header_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header_end = header_start + header_len;
    let header = bytes.get(header_start..header_end).ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let descr = dict_value(header, "descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran = dict_value(header, "fortran_order")?;
    if fortran.trim() != "False" {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape_text = dict_value(header, "shape")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {shape_text}")))
        .collect::<Result<_, _>>()?;
    let count: usize = shape.iter().product();
    let body = &bytes[header_end..];
    let take = |size: usize| -> Result<&[u8], String> {
        let needed = count.checked_mul(size).ok_or_else(|| "array too large".to_string())?;
        body.get(..needed).ok_or_else(|| {
            format!("data truncated: {} bytes for shape {shape:?} of {descr}, need {needed}", body.len())
        })
    };
    fn chunks<const N: usize, T>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        raw.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact yields N bytes"))).collect()
    }
    let data = match descr {
        "<f4" => NpyData::F32(chunks(take(4)?, f32::from_le_bytes)),
        "<f8" => NpyData::F64(chunks(take(8)?, f64::from_le_bytes)),
        "<i4" => NpyData::I32(chunks(take(4)?, i32::from_le_bytes)),
        "<i8" => NpyData::I64(chunks(take(8)?, i64::from_le_bytes)),
        "|u1" => NpyData::U8(take(1)?.to_vec()),
        "|i1" => NpyData::I8(take(1)?.iter().map(|&b| b as i8).collect()),
        "|b1" => NpyData::Bool(take(1)?.iter().map(|&b| b != 0).collect()),
        other => return Err(format!("unsupported dtype {other}")),
    };
    Ok(NpyArray { shape, data })
}

/// The raw text of `key`'s value in a Python dict literal (values here never nest braces
/// other than the shape tuple's parentheses).
fn dict_value<'h>(header: &'h str, key: &str) -> Result<&'h str, String> {
    let pattern_single = format!("'{key}'");
    let at = header.find(&pattern_single).ok_or_else(|| format!("header has no `{key}`"))?;
    let rest = &header[at + pattern_single.len()..];
    let rest = rest.trim_start().strip_prefix(':').ok_or("malformed header")?;
    let rest = rest.trim_start();
    let end =
        if rest.starts_with('(') { rest.find(')').map(|i| i + 1) } else { rest.find(',').or_else(|| rest.find('}')) }
            .ok_or("malformed header")?;
    Ok(&rest[..end])
}

/// Serialises an array as `.npy` version 1.0.
pub fn npy_bytes(array: &NpyArray) -> Vec<u8> {
    let shape = match array.shape.len() {
        1 => format!("({},)", array.shape[0]),
        _ => format!("({})", array.shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}", array.data.descr());
    // Pad so that magic + version + length + header is a multiple of 64, ending in '\n'.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + array.data.len() * 8);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    match &array.data {
        NpyData::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::F64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::I32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::I64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::U8(v) => out.extend_from_slice(v),
        NpyData::I8(v) => v.iter().for_each(|&x| out.push(x as u8)),
        NpyData::Bool(v) => v.iter().for_each(|&x| out.push(x as u8)),
    }
    out
}

/// Reads every array of an `.npz` file, keyed by name without the `.npy` suffix.
pub fn read_npz(path: &Path) -> Result<std::collections::BTreeMap<String, NpyArray>, DatasetError> {
    let npz_error = |reason: String| DatasetError::Npz { file: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| npz_error(format!("not a zip archive: {e}")))?;
    let mut arrays = std::collections::BTreeMap::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| npz_error(format!("entry {i}: {e}")))?;
        let name = entry.name().map_err(|e| npz_error(format!("entry {i}: {e}")))?.to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| npz_error(format!("{name}: {e}")))?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        let array = parse_npy(&bytes).map_err(|reason| npz_error(format!("{name}: {reason}")))?;
        arrays.insert(key, array);
    }
    Ok(arrays)
}

/// Writes arrays as an uncompressed `.npz` (like `numpy.savez`), atomically.
pub fn write_npz(path: &Path, arrays: &[(&str, NpyArray)]) -> Result<(), DatasetError> {
    let npz_error = |reason: String| DatasetError::Npz { file: path.to_path_buf(), reason };
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, array) in arrays {
        writer.start_file(format!("{name}.npy"), options).map_err(|e| npz_error(e.to_string()))?;
        writer.write_all(&npy_bytes(array)).map_err(|e| npz_error(e.to_string()))?;
    }
    let cursor = writer.finish().map_err(|e| npz_error(e.to_string()))?;
    super::write_atomically(path, &cursor.into_inner())
}

/// A state-only dataset in D4RL's flat layout.
#[derive(Clone, Debug, PartialEq)]
pub struct StateDataset {
    pub observation_dim: usize,
    pub action_dim: usize,
    /// `[N, observation_dim]`, row-major.
    pub observations: Vec<f32>,
    /// Present when the file had `next_observations`.
    pub next_observations: Option<Vec<f32>>,
    pub actions: Vec<f32>,
    pub rewards: Vec<f32>,
    pub terminals: Vec<bool>,
    pub timeouts: Vec<bool>,
}

/// One state-only transition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateTransition<'a> {
    pub observation: &'a [f32],
    pub action: &'a [f32],
    pub reward: f32,
    pub next_observation: &'a [f32],
    pub terminal: bool,
}

impl StateDataset {
    pub fn len(&self) -> usize {
        self.rewards.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rewards.is_empty()
    }
    pub fn observation(&self, i: usize) -> &[f32] {
        &self.observations[i * self.observation_dim..(i + 1) * self.observation_dim]
    }
    pub fn action(&self, i: usize) -> &[f32] {
        &self.actions[i * self.action_dim..(i + 1) * self.action_dim]
    }
    /// Transitions as in D4RL's `qlearning_dataset`: s' from `next_observations` when present,
    /// else the following row; steps ending in a timeout without `next_observations` are
    /// skipped (their s' is unknown), and a terminal step's s' is itself (it is masked anyway).
    pub fn transitions(&self) -> impl Iterator<Item = StateTransition<'_>> + '_ {
        (0..self.len()).filter_map(move |i| {
            let next = match &self.next_observations {
                Some(next) => &next[i * self.observation_dim..(i + 1) * self.observation_dim],
                None if self.terminals[i] => self.observation(i),
                None if self.timeouts[i] || i + 1 == self.len() => return None,
                None => self.observation(i + 1),
            };
            Some(StateTransition {
                observation: self.observation(i),
                action: self.action(i),
                reward: self.rewards[i],
                next_observation: next,
                terminal: self.terminals[i],
            })
        })
    }
    /// Episode boundaries `[start, end)` (an episode ends at a terminal or a timeout).
    pub fn episode_ranges(&self) -> Vec<(usize, usize)> {
        let mut ranges = Vec::new();
        let mut start = 0;
        for i in 0..self.len() {
            if self.terminals[i] || self.timeouts[i] || i + 1 == self.len() {
                ranges.push((start, i + 1));
                start = i + 1;
            }
        }
        ranges
    }
}

/// Imports a D4RL-style `.npz`, checking keys and shapes (errors name the file and key).
pub fn import_d4rl(path: &Path) -> Result<StateDataset, DatasetError> {
    let arrays = read_npz(path)?;
    let get = |key: &str| arrays.get(key).ok_or_else(|| DatasetError::key(path, key, "missing from the npz"));
    let observations = get("observations")?;
    let actions = get("actions")?;
    let matrix_dims = |key: &str, array: &NpyArray| -> Result<(usize, usize), DatasetError> {
        match array.shape.as_slice() {
            [n, d] => Ok((*n, *d)),
            [n] => Ok((*n, 1)),
            other => Err(DatasetError::key(path, key, format!("shape {other:?}, expected [N, dim]"))),
        }
    };
    let (n, observation_dim) = matrix_dims("observations", observations)?;
    let (n_actions, action_dim) = matrix_dims("actions", actions)?;
    let check_len = |key: &str, array: &NpyArray, rows: usize| {
        let first = array.shape.first().copied().unwrap_or(0);
        if first != n || array.shape.iter().product::<usize>() != n * rows {
            Err(DatasetError::key(
                path,
                key,
                format!(
                    "shape {:?}, expected [{n}{}]",
                    array.shape,
                    if rows == 1 { String::new() } else { format!(", {rows}") }
                ),
            ))
        } else {
            Ok(())
        }
    };
    if n_actions != n {
        return Err(DatasetError::key(path, "actions", format!("{n_actions} rows but observations has {n}")));
    }
    let rewards = get("rewards")?;
    check_len("rewards", rewards, 1)?;
    let terminals = get("terminals")?;
    check_len("terminals", terminals, 1)?;
    let timeouts = match arrays.get("timeouts") {
        Some(t) => {
            check_len("timeouts", t, 1)?;
            t.data.to_bool()
        }
        None => vec![false; n],
    };
    let next_observations = match arrays.get("next_observations") {
        Some(next) => {
            check_len("next_observations", next, observation_dim)?;
            Some(next.data.to_f32())
        }
        None => None,
    };
    Ok(StateDataset {
        observation_dim,
        action_dim,
        observations: observations.data.to_f32(),
        next_observations,
        actions: actions.data.to_f32(),
        rewards: rewards.data.to_f32(),
        terminals: terminals.data.to_bool(),
        timeouts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_numpy_compatible() {
        let array = NpyArray { shape: vec![2, 3], data: NpyData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) };
        let bytes = npy_bytes(&array);
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0, "numpy aligns data to 64 bytes");
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(header.ends_with('\n'));
        assert_eq!(parse_npy(&bytes).unwrap(), array);
    }

    #[test]
    fn truncated_npy_is_an_error() {
        let array = NpyArray { shape: vec![4], data: NpyData::F64(vec![1.0; 4]) };
        let bytes = npy_bytes(&array);
        let err = parse_npy(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
    }
}
