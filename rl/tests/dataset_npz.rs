//! D4RL-style `.npz` import: our own writer round-tripped, and files written by numpy itself
//! (`np.savez_compressed` and `np.savez`, fixtures in tests/fixtures) read bit for bit.

use rl::dataset::npz::{import_d4rl, read_npz, write_npz, NpyArray, NpyData};

fn d4rl_arrays(with_next: bool) -> Vec<(&'static str, NpyArray)> {
    // Two episodes: 3 steps ending in a terminal, then 2 steps ending in a timeout.
    let n = 5;
    let observation_dim = 4;
    let observations: Vec<f32> = (0..n * observation_dim).map(|i| i as f32 * 0.5 - 3.0).collect();
    let actions: Vec<f32> = (0..n * 2).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut arrays = vec![
        ("observations", NpyArray { shape: vec![n, observation_dim], data: NpyData::F32(observations) }),
        ("actions", NpyArray { shape: vec![n, 2], data: NpyData::F32(actions) }),
        // D4RL stores rewards as float32 and flags as bool; use f64 here to exercise conversion.
        ("rewards", NpyArray { shape: vec![n], data: NpyData::F64(vec![0.1, 0.2, 1.5, -0.25, 0.0]) }),
        ("terminals", NpyArray { shape: vec![n], data: NpyData::Bool(vec![false, false, true, false, false]) }),
        ("timeouts", NpyArray { shape: vec![n], data: NpyData::Bool(vec![false, false, false, false, true]) }),
    ];
    if with_next {
        let next: Vec<f32> = (0..n * observation_dim).map(|i| i as f32 * 0.5 - 1.0).collect();
        arrays.push(("next_observations", NpyArray { shape: vec![n, observation_dim], data: NpyData::F32(next) }));
    }
    arrays
}

#[test]
fn npz_round_trip_preserves_every_array() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hopper-like.npz");
    let arrays = d4rl_arrays(false);
    write_npz(&path, &arrays).unwrap();
    let data = import_d4rl(&path).unwrap();

    assert_eq!(data.len(), 5);
    assert_eq!((data.observation_dim, data.action_dim), (4, 2));
    let NpyData::F32(observations) = &arrays[0].1.data else { unreachable!() };
    let NpyData::F32(actions) = &arrays[1].1.data else { unreachable!() };
    assert_eq!(&data.observations, observations);
    assert_eq!(&data.actions, actions);
    assert_eq!(data.rewards, vec![0.1f32, 0.2, 1.5, -0.25, 0.0]);
    assert_eq!(data.terminals, vec![false, false, true, false, false]);
    assert_eq!(data.timeouts, vec![false, false, false, false, true]);
    assert_eq!(data.next_observations, None);
    assert_eq!(data.episode_ranges(), vec![(0, 3), (3, 5)]);

    // Without next_observations, s' is the next row; the timeout step (unknown s') is dropped.
    let transitions: Vec<_> = data.transitions().collect();
    assert_eq!(transitions.len(), 4);
    assert_eq!(transitions[0].next_observation, data.observation(1));
    assert!(transitions[2].terminal);
    assert_eq!(transitions[3].observation, data.observation(3));
    assert_eq!(transitions[3].next_observation, data.observation(4));
}

#[test]
fn next_observations_are_used_when_present() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("with-next.npz");
    write_npz(&path, &d4rl_arrays(true)).unwrap();
    let data = import_d4rl(&path).unwrap();
    let transitions: Vec<_> = data.transitions().collect();
    assert_eq!(transitions.len(), 5);
    let expected: Vec<f32> = (16..20).map(|i| i as f32 * 0.5 - 1.0).collect();
    assert_eq!(transitions[4].next_observation, expected.as_slice());
    assert_ne!(transitions[4].next_observation, transitions[4].observation);
}

#[test]
fn bad_npz_files_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.npz");
    let mut arrays = d4rl_arrays(false);
    arrays.retain(|(name, _)| *name != "rewards");
    write_npz(&path, &arrays).unwrap();
    let err = import_d4rl(&path).unwrap_err().to_string();
    assert!(err.contains("broken.npz") && err.contains("rewards"), "{err}");

    let mut arrays = d4rl_arrays(false);
    arrays[3].1 = NpyArray { shape: vec![4], data: NpyData::Bool(vec![false; 4]) };
    write_npz(&path, &arrays).unwrap();
    let err = import_d4rl(&path).unwrap_err().to_string();
    assert!(err.contains("terminals") && err.contains("shape"), "{err}");

    std::fs::write(&path, b"not a zip").unwrap();
    let err = import_d4rl(&path).unwrap_err().to_string();
    assert!(err.contains("broken.npz"), "{err}");
}

// ---- Files written by numpy itself (rl/tests/fixtures/make_npz_fixture.py) -----------------
//
// The tests above read what our own writer made, which cannot catch a reader and writer that
// agree on a mistake. These read `np.savez_compressed` (deflated members) and `np.savez`
// (stored members) output, with numpy's own headers and zip64 records, and compare every value
// to npz_expected.json, which the script wrote from the arrays it saved (and read back with
// `np.load`). Exact comparisons: the files and the JSON hold the same bits (float32 values are
// written to JSON as their exact float64 widening).

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn expected_fixture() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture("npz_expected.json")).unwrap()).unwrap()
}

/// Values of one array in npz_expected.json as f64 (booleans as 0/1).
fn expected_values(spec: &serde_json::Value) -> Vec<f64> {
    spec["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().or_else(|| v.as_bool().map(|b| b as u8 as f64)).unwrap())
        .collect()
}

fn expected_shape(spec: &serde_json::Value) -> Vec<usize> {
    spec["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

const NUMPY_FIXTURES: [(&str, zip::CompressionMethod); 2] = [
    ("d4rl_savez_compressed.npz", zip::CompressionMethod::Deflated),
    ("d4rl_savez.npz", zip::CompressionMethod::Stored),
];

#[test]
fn numpy_fixtures_cover_deflated_and_stored_members() {
    let expected = expected_fixture();
    for (file, method) in NUMPY_FIXTURES {
        let mut archive = zip::ZipArchive::new(std::fs::File::open(fixture(file)).unwrap()).unwrap();
        let members: Vec<String> = archive.file_names().map(|name| name.unwrap().into_owned()).collect();
        assert!(!members.is_empty());
        for member in &members {
            assert_eq!(archive.by_name(member).unwrap().compression(), method, "{file}/{member}");
            // zipfile's own record of the same fact: 8 deflated, 0 stored.
            let recorded = expected[file]["compression"][member].as_u64().unwrap();
            assert_eq!(recorded, if method == zip::CompressionMethod::Deflated { 8 } else { 0 }, "{file}/{member}");
        }
    }
}

#[test]
fn numpy_written_arrays_read_back_bit_for_bit() {
    let expected = expected_fixture();
    let mut dtypes_seen = std::collections::BTreeSet::new();
    let mut ranks_seen = std::collections::BTreeSet::new();
    for (file, _) in NUMPY_FIXTURES {
        let arrays = read_npz(&fixture(file)).unwrap();
        let specs = expected[file]["arrays"].as_object().unwrap();
        assert_eq!(arrays.keys().collect::<Vec<_>>(), specs.keys().collect::<Vec<_>>(), "{file}");
        for (name, spec) in specs {
            let array = &arrays[name];
            let what = format!("{file}/{name}");
            assert_eq!(array.shape, expected_shape(spec), "{what}");
            let values = expected_values(spec);
            let dtype = spec["dtype"].as_str().unwrap();
            // Bits, not ==: -0.0 must stay negative zero and subnormals must survive.
            match (dtype, &array.data) {
                ("<f4", NpyData::F32(got)) => {
                    let want: Vec<u32> = values.iter().map(|&x| (x as f32).to_bits()).collect();
                    assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want, "{what}");
                }
                ("<f8", NpyData::F64(got)) => {
                    let want: Vec<u64> = values.iter().map(|x| x.to_bits()).collect();
                    assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want, "{what}");
                }
                ("|b1", NpyData::Bool(got)) => {
                    let want: Vec<bool> = values.iter().map(|&x| x != 0.0).collect();
                    assert_eq!(got, &want, "{what}");
                }
                (dtype, data) => panic!("{what}: numpy wrote {dtype}, read as {data:?}"),
            }
            dtypes_seen.insert(dtype.to_string());
            ranks_seen.insert(array.shape.len());
        }
    }
    // What the fixtures are meant to cover, so a regenerated fixture cannot quietly drop a case.
    assert_eq!(dtypes_seen.into_iter().collect::<Vec<_>>(), ["<f4", "<f8", "|b1"]);
    assert_eq!(ranks_seen.into_iter().collect::<Vec<_>>(), [1, 2]);
}

#[test]
fn numpy_written_d4rl_files_import() {
    let expected = expected_fixture();
    for (file, _) in NUMPY_FIXTURES {
        let specs = &expected[file]["arrays"];
        let data = import_d4rl(&fixture(file)).unwrap();
        // The importer hands out f32 (documented): compare with the source narrowed to f32.
        let as_f32 =
            |key: &str| -> Vec<u32> { expected_values(&specs[key]).iter().map(|&x| (x as f32).to_bits()).collect() };
        let bits = |v: &[f32]| -> Vec<u32> { v.iter().map(|x| x.to_bits()).collect() };
        let flags = |key: &str| -> Vec<bool> { expected_values(&specs[key]).iter().map(|&x| x != 0.0).collect() };
        let observation_shape = expected_shape(&specs["observations"]);
        let action_shape = expected_shape(&specs["actions"]);
        assert_eq!((data.len(), data.observation_dim), (observation_shape[0], observation_shape[1]), "{file}");
        assert_eq!(data.action_dim, action_shape[1], "{file}");
        assert_eq!(bits(&data.observations), as_f32("observations"), "{file}");
        assert_eq!(bits(&data.actions), as_f32("actions"), "{file}");
        assert_eq!(bits(&data.rewards), as_f32("rewards"), "{file}");
        assert_eq!(data.terminals, flags("terminals"), "{file}");
        assert_eq!(data.timeouts, flags("timeouts"), "{file}");
        match specs.get("next_observations") {
            Some(_) => assert_eq!(bits(data.next_observations.as_deref().unwrap()), as_f32("next_observations")),
            None => assert!(data.next_observations.is_none(), "{file}"),
        }
        // Episodes end at a terminal or a timeout (D4RL), the last one at the end of the data:
        // here from the flags in the JSON.
        let (terminals, timeouts) = (flags("terminals"), flags("timeouts"));
        let mut ranges = Vec::new();
        let mut start = 0;
        for i in 0..terminals.len() {
            if terminals[i] || timeouts[i] || i + 1 == terminals.len() {
                ranges.push((start, i + 1));
                start = i + 1;
            }
        }
        assert_eq!(ranges, [(0, 3), (3, 6), (6, 7)], "the fixture's layout");
        assert_eq!(data.episode_ranges(), ranges, "{file}");
    }
}
