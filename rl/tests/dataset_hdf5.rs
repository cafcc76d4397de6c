//! HDF5 import of robomimic and Minari files written by h5py (fixtures and the script that made
//! them in tests/fixtures/hdf5). The expected values come from numpy: the same arrays saved as
//! `.npz` by the script, read with `rl::dataset::npz::read_npz`, never from the reader under test.

use rl::dataset::hdf5::{detect, read, read_minari, read_robomimic, Hdf5Error, HdfSelection, ImportedEpisode, Layout};
#[path = "support/expected.rs"]
mod expected;

use expected::{array, bytes, row_f32, Npz};
use rl::dataset::npz::NpyData;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hdf5").join(name)
}

fn npz(name: &str) -> Npz {
    expected::npz(&fixture(name))
}

/// The episode the reader must produce, built from numpy's arrays: the state is the selected
/// keys' rows concatenated in order (each value cast to f32), images are the raw bytes.
/// `obs_prefix` is `<episode>.obs` (robomimic) or `<episode>.observations` (Minari);
/// `final_from` is where the observation after the last action is: robomimic's `next_obs` last
/// row, Minari's observation row T.
fn expected_episode(
    npz: &Npz,
    episode: &str,
    obs_prefix: &str,
    state_keys: &[&str],
    cameras: &[&str],
    flags: (&str, Option<&str>),
    final_from: Option<(&str, usize)>,
) -> ImportedEpisode {
    let actions = array(npz, &format!("{episode}.actions"));
    let len = actions.shape[0];
    let key_path =
        |prefix: &str, key: &str| if key.is_empty() { prefix.to_string() } else { format!("{prefix}.{key}") };
    let state_at = |prefix: &str, t: usize| -> Vec<f32> {
        state_keys.iter().flat_map(|k| row_f32(array(npz, &key_path(prefix, k)), t)).collect()
    };
    let image_rows = |prefix: &str, rows: std::ops::Range<usize>| -> Vec<(String, Vec<u8>)> {
        cameras
            .iter()
            .map(|c| {
                let a = array(npz, &key_path(prefix, c));
                let frame: usize = a.shape[1..].iter().product();
                let all = bytes(npz, &key_path(prefix, c));
                (c.to_string(), all[rows.start * frame..rows.end * frame].to_vec())
            })
            .collect()
    };
    let terminals = array(npz, &format!("{episode}.{}", flags.0)).data.to_bool();
    let timeouts = match flags.1 {
        Some(key) => array(npz, &format!("{episode}.{key}")).data.to_bool(),
        None => (0..len).map(|t| t == len - 1 && !terminals[t]).collect(),
    };
    ImportedEpisode {
        name: episode.to_string(),
        len,
        state: (0..len).flat_map(|t| state_at(obs_prefix, t)).collect(),
        images: image_rows(obs_prefix, 0..len),
        actions: actions.data.to_f32(),
        rewards: array(npz, &format!("{episode}.rewards")).data.to_f32(),
        terminals,
        timeouts,
        final_state: final_from.map(|(prefix, row)| state_at(prefix, row)),
        final_images: final_from.map(|(prefix, row)| image_rows(prefix, row..row + 1)),
    }
}

const ROBO_DEMOS: [&str; 3] = ["demo_0", "demo_2", "demo_10"];
const ROBO_CAMERAS: [&str; 2] = ["agentview_image", "robot0_eye_in_hand_image"];
const ROBO_STATE: [&str; 4] = ["object", "progress", "robot0_eef_pos", "robot0_gripper_qpos"];

fn expected_robomimic(npz: &Npz, demo: &str, state: &[&str], cameras: &[&str], next_obs: bool) -> ImportedEpisode {
    let len = array(npz, &format!("{demo}.actions")).shape[0];
    let next = format!("{demo}.next_obs");
    let final_from = next_obs.then_some((next.as_str(), len - 1));
    expected_episode(npz, demo, &format!("{demo}.obs"), state, cameras, ("dones", None), final_from)
}

fn utf8(npz: &Npz, key: &str) -> String {
    String::from_utf8(bytes(npz, key)).unwrap()
}

fn check_robomimic_round_trip(file: &str, next_obs: bool) {
    let path = fixture(file);
    let npz = npz("robomimic.npz");
    let data = read_robomimic(&path, &HdfSelection::default()).unwrap();
    assert_eq!(data.format, Layout::Robomimic);
    assert_eq!(data.source, path.display().to_string());
    // Numeric demo order (the file lists demo_0, demo_10, demo_2); the depth key is neither.
    let names: Vec<&str> = data.episodes.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ROBO_DEMOS);
    assert_eq!(data.cameras, ROBO_CAMERAS);
    assert_eq!(data.image_sizes, vec![(8, 8), (8, 8)]);
    assert_eq!(data.state_keys, ROBO_STATE);
    assert_eq!(data.state_key_dims, vec![5, 1, 3, 2]);
    assert_eq!((data.state_dim, data.action_dim), (11, 7));
    assert_eq!(data.num_steps(), 12);
    for (episode, demo) in data.episodes.iter().zip(ROBO_DEMOS) {
        let expected = expected_robomimic(&npz, demo, &ROBO_STATE, &ROBO_CAMERAS, next_obs);
        assert_eq!(episode, &expected, "{file} {demo}");
    }
    // demo_2 ends without `done`: a timeout; the others end terminal.
    assert_eq!(data.episodes[1].timeouts, vec![false, false, true]);
    assert_eq!(data.episodes[0].terminals, vec![false, false, false, true]);
    assert_eq!(data.metadata["env_args"], utf8(&npz, "attrs.env_args"));
    let NpyData::I64(total) = &array(&npz, "attrs.total").data else { panic!("total") };
    assert_eq!(data.metadata["total"], total[0].to_string());
}

#[test]
fn robomimic_contiguous_round_trips_every_value() {
    check_robomimic_round_trip("robomimic_contiguous.hdf5", true);
}

#[test]
fn robomimic_gzip_chunked_round_trips_every_value() {
    // Chunked (partial last chunk), shuffle + gzip, and no next_obs: no final observation.
    check_robomimic_round_trip("robomimic_gzip.hdf5", false);
    let data = read_robomimic(&fixture("robomimic_gzip.hdf5"), &HdfSelection::default()).unwrap();
    assert!(data.episodes.iter().all(|e| e.final_state.is_none() && e.final_images.is_none()));
}

#[test]
fn minari_round_trips_every_value_and_keeps_the_final_observation() {
    let path = fixture("minari.hdf5");
    let npz = npz("minari.npz");
    let data = read_minari(&path, &HdfSelection::default()).unwrap();
    assert_eq!(data.format, Layout::Minari);
    assert_eq!(data.cameras, ["front", "wrist"]);
    assert_eq!(data.state_keys, ["achieved_goal", "observation"]);
    assert_eq!((data.state_dim, data.action_dim), (6, 2));
    let names: Vec<&str> = data.episodes.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["episode_0", "episode_1", "episode_2"]);
    for episode in &data.episodes {
        let name = episode.name.as_str();
        let prefix = format!("{name}.observations");
        let len = array(&npz, &format!("{name}.actions")).shape[0];
        let expected = expected_episode(
            &npz,
            name,
            &prefix,
            &["achieved_goal", "observation"],
            &["front", "wrist"],
            ("terminations", Some("truncations")),
            Some((&prefix, len)),
        );
        assert_eq!(episode, &expected, "{name}");
    }
    assert_eq!(data.episodes[1].timeouts, vec![false, false, true]);
    assert_eq!(data.metadata["env_spec"], utf8(&npz, "attrs.env_spec"));
    assert_eq!(data.metadata["dataset_id"], "worldgrad/fixture-v0");
    assert_eq!(data.metadata["total_steps"], "12");
}

#[test]
fn minari_box_observations_are_one_state_key() {
    let npz = npz("minari_box.npz");
    let data = read_minari(&fixture("minari_box.hdf5"), &HdfSelection::default()).unwrap();
    assert_eq!(data.state_keys, ["observations"]);
    assert!(data.cameras.is_empty());
    assert_eq!(data.episodes.len(), 2);
    for episode in &data.episodes {
        let name = episode.name.as_str();
        let prefix = format!("{name}.observations");
        let len = array(&npz, &format!("{name}.actions")).shape[0];
        let expected = expected_episode(
            &npz,
            name,
            &prefix,
            &[""],
            &[],
            ("terminations", Some("truncations")),
            Some((&prefix, len)),
        );
        assert_eq!(episode, &expected, "{name}");
    }
}

#[test]
fn detect_tells_the_layouts_apart() {
    assert_eq!(detect(&fixture("robomimic_contiguous.hdf5")).unwrap(), Layout::Robomimic);
    assert_eq!(detect(&fixture("robomimic_gzip.hdf5")).unwrap(), Layout::Robomimic);
    assert_eq!(detect(&fixture("minari.hdf5")).unwrap(), Layout::Minari);
    assert_eq!(detect(&fixture("minari_box.hdf5")).unwrap(), Layout::Minari);
    // `read` dispatches on it.
    let via_read = read(&fixture("minari.hdf5"), &HdfSelection::default()).unwrap();
    assert_eq!(via_read, read_minari(&fixture("minari.hdf5"), &HdfSelection::default()).unwrap());
}

#[test]
fn filter_keys_select_demos() {
    let npz = npz("robomimic.npz");
    for file in ["robomimic_contiguous.hdf5", "robomimic_gzip.hdf5"] {
        for (mask, demos) in [("train", vec!["demo_0", "demo_10"]), ("valid", vec!["demo_2"])] {
            let selection = HdfSelection { filter_key: Some(mask.into()), ..Default::default() };
            let data = read_robomimic(&fixture(file), &selection).unwrap();
            let names: Vec<&str> = data.episodes.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(names, demos, "{file} mask/{mask}");
            // The mask's names as numpy wrote them.
            let listed = utf8(&npz, &format!("mask.{mask}"));
            assert_eq!(listed.split('\n').collect::<Vec<_>>(), demos);
            for (episode, demo) in data.episodes.iter().zip(&demos) {
                let next_obs = file.contains("contiguous");
                assert_eq!(episode, &expected_robomimic(&npz, demo, &ROBO_STATE, &ROBO_CAMERAS, next_obs));
            }
        }
    }
}

#[test]
fn camera_and_state_selection_keep_the_given_order() {
    let npz = npz("robomimic.npz");
    let selection = HdfSelection {
        // `robot0_eye_in_hand` finds `robot0_eye_in_hand_image`, as robomimic's camera names do.
        cameras: Some(vec!["robot0_eye_in_hand".into(), "agentview_image".into()]),
        state_keys: Some(vec!["robot0_gripper_qpos".into(), "progress".into(), "robot0_eef_pos".into()]),
        filter_key: None,
    };
    for file in ["robomimic_contiguous.hdf5", "robomimic_gzip.hdf5"] {
        let data = read_robomimic(&fixture(file), &selection).unwrap();
        let cameras = ["robot0_eye_in_hand_image", "agentview_image"];
        let state = ["robot0_gripper_qpos", "progress", "robot0_eef_pos"];
        assert_eq!(data.cameras, cameras);
        assert_eq!(data.state_keys, state);
        assert_eq!(data.state_key_dims, vec![2, 1, 3]);
        assert_eq!(data.state_dim, 6);
        for (episode, demo) in data.episodes.iter().zip(ROBO_DEMOS) {
            let next_obs = file.contains("contiguous");
            assert_eq!(episode, &expected_robomimic(&npz, demo, &state, &cameras, next_obs), "{file} {demo}");
        }
    }
    // Nothing selected: no images, an empty state; actions and rewards still there.
    let none = HdfSelection { cameras: Some(vec![]), state_keys: Some(vec![]), filter_key: None };
    let data = read_minari(&fixture("minari.hdf5"), &none).unwrap();
    assert!(data.cameras.is_empty() && data.state_keys.is_empty());
    assert_eq!(data.state_dim, 0);
    assert!(data.episodes.iter().all(|e| e.images.is_empty() && e.state.is_empty() && !e.actions.is_empty()));
    // Minari keys are named within `observations`.
    let only = HdfSelection {
        cameras: Some(vec!["wrist".into()]),
        state_keys: Some(vec!["observation".into()]),
        filter_key: None,
    };
    let data = read_minari(&fixture("minari.hdf5"), &only).unwrap();
    assert_eq!(
        (data.cameras.as_slice(), data.state_keys.as_slice()),
        (&["wrist".to_string()][..], &["observation".to_string()][..])
    );
    assert_eq!(data.state_dim, 4);
}

/// The error of reading `file` with `selection`, checked to name the file and `key`.
fn error_of(file: &str, selection: &HdfSelection, key: Option<&str>) -> String {
    let path = fixture(file);
    let error = match read(&path, selection) {
        Ok(_) => panic!("{file}: read succeeded"),
        Err(e) => e,
    };
    let message = error.to_string();
    assert_eq!(error.file(), path, "{message}");
    assert!(message.starts_with(&path.display().to_string()), "{message}");
    assert_eq!(error.key(), key, "{message}");
    if let Some(key) = key {
        assert!(message.contains(&format!("`{key}`")), "{message}");
    }
    message
}

fn mask(name: &str) -> HdfSelection {
    HdfSelection { filter_key: Some(name.into()), ..Default::default() }
}

fn assert_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "`{part}` not in: {message}");
    }
}

#[test]
fn missing_columns_and_keys_are_named() {
    let m = error_of("robomimic_bad.hdf5", &mask("missing_rewards"), Some("data/demo_1/rewards"));
    assert_contains(&m, &["missing", "actions", "dones", "obs/"]);
    let m = error_of("minari_missing_truncations.hdf5", &HdfSelection::default(), Some("episode_0/truncations"));
    assert_contains(&m, &["missing", "terminations"]);
    // A camera present in the first demo and absent in a later one.
    let m = error_of("robomimic_bad.hdf5", &mask("missing_camera"), Some("data/demo_10/obs/cam_image"));
    assert_contains(&m, &["missing", "eef"]);
    // Without a filter key, the first bad demo in numeric order stops the read.
    error_of("robomimic_bad.hdf5", &HdfSelection::default(), Some("data/demo_1/rewards"));
}

#[test]
fn a_camera_or_state_key_that_is_not_there_is_named_with_what_is() {
    let select = |cameras: Option<&[&str]>, state: Option<&[&str]>| HdfSelection {
        cameras: cameras.map(|c| c.iter().map(|s| s.to_string()).collect()),
        state_keys: state.map(|c| c.iter().map(|s| s.to_string()).collect()),
        filter_key: None,
    };
    let m = error_of("robomimic_gzip.hdf5", &select(Some(&["frontview"]), None), Some("data/demo_0/obs/frontview"));
    assert_contains(&m, &["camera `frontview` is not there", "agentview_image, robot0_eye_in_hand_image"]);
    let m = error_of("minari.hdf5", &select(Some(&["side"]), None), Some("episode_0/observations/side"));
    assert_contains(&m, &["camera `side` is not there", "front, wrist"]);
    // A low-dim key asked for as a camera, and a camera asked for as state.
    let m = error_of("minari.hdf5", &select(Some(&["observation"]), None), Some("episode_0/observations/observation"));
    assert_contains(&m, &["camera `observation` is not one", "front, wrist"]);
    let m = error_of(
        "robomimic_contiguous.hdf5",
        &select(None, Some(&["agentview_image"])),
        Some("data/demo_0/obs/agentview_image"),
    );
    assert_contains(
        &m,
        &["state key `agentview_image` is not one", "object, progress, robot0_eef_pos, robot0_gripper_qpos"],
    );
    let m =
        error_of("robomimic_contiguous.hdf5", &select(None, Some(&["joint_pos"])), Some("data/demo_0/obs/joint_pos"));
    assert_contains(&m, &["state key `joint_pos` is not there"]);
    let m = error_of(
        "robomimic_contiguous.hdf5",
        &select(None, Some(&["object", "object"])),
        Some("data/demo_0/obs/object"),
    );
    assert_contains(&m, &["selected twice"]);
    let m = error_of("minari_box.hdf5", &select(Some(&["front"]), None), Some("episode_0"));
    assert_contains(&m, &["camera `front` is not there", "cameras: nothing"]);
}

#[test]
fn lengths_that_disagree_are_named() {
    let m = error_of("robomimic_bad.hdf5", &mask("long_rewards"), Some("data/demo_2/rewards"));
    assert_contains(&m, &["has 3 rows; `actions` has 2"]);
    let m = error_of("robomimic_bad.hdf5", &mask("short_obs"), Some("data/demo_3/obs/eef"));
    assert_contains(&m, &["has 1 rows; expected 2"]);
    let m = error_of("robomimic_bad.hdf5", &mask("num_samples"), Some("data/demo_9"));
    assert_contains(&m, &["`num_samples` is 5", "2 rows"]);
    let m = error_of("robomimic_bad.hdf5", &mask("wider_state"), Some("data/demo_11/obs/eef"));
    assert_contains(&m, &["per-step shape [4]", "first episode's is [3]"]);
    // Minari keeps T + 1 observations; T is refused, not silently shifted.
    let m = error_of("minari_bad_rows.hdf5", &HdfSelection::default(), Some("episode_0/observations"));
    assert_contains(&m, &["has 2 rows; expected 3 (one more than the 2 rows of `actions`"]);
}

#[test]
fn non_finite_values_and_wrong_types_are_named() {
    let m = error_of("robomimic_bad.hdf5", &mask("nan_action"), Some("data/demo_4/actions"));
    assert_contains(&m, &["non-finite value NaN at row 0"]);
    let m = error_of("robomimic_bad.hdf5", &mask("inf_state"), Some("data/demo_5/obs/eef"));
    assert_contains(&m, &["non-finite value inf at row 0"]);
    let m = error_of("robomimic_bad.hdf5", &mask("nan_reward"), Some("data/demo_12/rewards"));
    assert_contains(&m, &["non-finite value NaN at row 0"]);
    // 1e39 is finite in float64 but not in float32.
    let m = error_of("robomimic_bad.hdf5", &mask("huge_state"), Some("data/demo_13/obs/eef"));
    assert_contains(&m, &["non-finite value inf at row 0 (as f32)"]);
    let m = error_of("robomimic_bad.hdf5", &mask("string_actions"), Some("data/demo_6/actions"));
    assert_contains(&m, &["dtype string", "expected a number"]);
    let m = error_of("robomimic_bad.hdf5", &mask("rank3_actions"), Some("data/demo_7/actions"));
    assert_contains(&m, &["shape [2, 2, 1]"]);
    let m = error_of("robomimic_bad.hdf5", &mask("dones_two"), Some("data/demo_8/dones"));
    assert_contains(&m, &["value 2 at row 1 is not 0 or 1"]);
}

#[test]
fn bad_filter_keys_and_layouts_are_named() {
    let m = error_of("robomimic_contiguous.hdf5", &mask("test"), Some("mask/test"));
    assert_contains(&m, &["filter key not there", "train, valid"]);
    let m = error_of("robomimic_bad.hdf5", &mask("unknown_demo"), Some("mask/unknown_demo"));
    assert_contains(&m, &["`demo_99`, which is not a demo"]);
    let m = error_of("robomimic_bad.hdf5", &mask("not_strings"), Some("mask/not_strings"));
    assert_contains(&m, &["dtype int64", "strings"]);
    let m = error_of("minari.hdf5", &mask("train"), None);
    assert_contains(&m, &["Minari files have no filter keys"]);
    let m = error_of("unknown_layout.hdf5", &HdfSelection::default(), None);
    assert_contains(&m, &["unknown HDF5 layout", "stuff/, values"]);
    let path = fixture("unknown_layout.hdf5");
    assert!(matches!(detect(&path), Err(Hdf5Error::File { .. })));
    // Asking for the other layout by name names what is missing.
    let err = read_robomimic(&fixture("minari.hdf5"), &HdfSelection::default()).unwrap_err();
    assert_eq!(err.key(), Some("data"));
    assert_contains(&err.to_string(), &["missing", "episode_0/"]);
    let err = read_minari(&fixture("robomimic_gzip.hdf5"), &HdfSelection::default()).unwrap_err();
    assert_contains(&err.to_string(), &["no `episode_N` groups"]);
}

#[test]
fn missing_non_hdf5_and_truncated_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.hdf5");
    let err = read(&missing, &HdfSelection::default()).unwrap_err();
    assert_eq!(err.file(), missing);
    assert_contains(&err.to_string(), &["absent.hdf5", "cannot open"]);

    let text = dir.path().join("notes.hdf5");
    std::fs::write(&text, "this is a text file, not HDF5\n").unwrap();
    let err = detect(&text).unwrap_err();
    assert_contains(&err.to_string(), &["notes.hdf5", "not a readable HDF5 file"]);

    let err = read(dir.path(), &HdfSelection::default()).unwrap_err();
    assert_contains(&err.to_string(), &["not a file"]);

    // Every prefix of the gzip file (in steps of 1 KiB, and the last byte cut) is an error
    // naming the file.
    let whole = std::fs::read(fixture("robomimic_gzip.hdf5")).unwrap();
    let truncated = dir.path().join("truncated.hdf5");
    let mut cuts: Vec<usize> = (0..whole.len()).step_by(1024).collect();
    cuts.push(whole.len() - 1);
    for cut in cuts {
        std::fs::write(&truncated, &whole[..cut]).unwrap();
        let err = read(&truncated, &HdfSelection::default()).expect_err(&format!("cut at {cut}"));
        assert_eq!(err.file(), truncated, "cut at {cut}: {err}");
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    // Deterministic corruption: every 97th byte of each fixture's first 8 KiB (superblock,
    // object headers, heaps, B-trees) set to 0xFF in turn. A read may succeed (the byte was
    // padding or data) or fail, but must return.
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.hdf5");
    let mut failures = 0;
    let mut runs = 0;
    for file in ["robomimic_contiguous.hdf5", "robomimic_gzip.hdf5", "minari.hdf5"] {
        let whole = std::fs::read(fixture(file)).unwrap();
        for offset in (0..whole.len().min(8192)).step_by(97) {
            let mut bytes = whole.clone();
            bytes[offset] = 0xFF;
            std::fs::write(&corrupt, &bytes).unwrap();
            runs += 1;
            if let Err(err) = read(&corrupt, &HdfSelection::default()) {
                failures += 1;
                assert_eq!(err.file(), corrupt);
            }
        }
    }
    println!("{failures} of {runs} corrupted files refused");
    assert!(failures > 0);
}
