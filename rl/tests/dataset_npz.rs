//! D4RL-style `.npz` import: write an npz, import it, compare.

use rl::dataset::npz::{import_d4rl, write_npz, NpyArray, NpyData};

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
