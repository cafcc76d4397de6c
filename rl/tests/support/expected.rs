//! Expected values of the importer tests: the arrays a fixture script saved beside its fixtures
//! as `.npz` (numpy's view of what it wrote), read with `rl::dataset::npz::read_npz` — never
//! with the importer under test. Shared by the tests through `#[path]`.

#![allow(dead_code)] // each test file uses its own subset

use rl::dataset::npz::{read_npz, NpyArray, NpyData};
use std::collections::BTreeMap;
use std::path::Path;

pub type Npz = BTreeMap<String, NpyArray>;

pub fn npz(path: &Path) -> Npz {
    read_npz(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn array<'a>(npz: &'a Npz, key: &str) -> &'a NpyArray {
    npz.get(key).unwrap_or_else(|| panic!("{key} not in the npz"))
}

pub fn bytes(npz: &Npz, key: &str) -> Vec<u8> {
    match &array(npz, key).data {
        NpyData::U8(v) => v.clone(),
        other => panic!("{key}: expected uint8, got {other:?}"),
    }
}

/// Row `t` of an array with a leading time axis, as f32.
pub fn row_f32(a: &NpyArray, t: usize) -> Vec<f32> {
    let width: usize = a.shape[1..].iter().product::<usize>().max(1);
    a.data.to_f32()[t * width..(t + 1) * width].to_vec()
}
