//! LeRobot import of dataset directories written with pyarrow and Pillow (fixtures and the
//! script that made them in tests/fixtures/lerobot). The expected values come from numpy: the
//! same arrays saved as `.npz` by the script (the pixels that were encoded into each PNG), read
//! with `rl::dataset::npz::read_npz`, never from the reader under test.

use rl::dataset::imported::{ImportedEpisode, RewardRule, SourceFormat};
use rl::dataset::lerobot::{detect, read, LeRobotError, LeRobotSelection};
#[path = "support/expected.rs"]
mod expected;

use expected::{array, bytes, row_f32, Npz};
use rl::dataset::npz::NpyData;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lerobot").join(name)
}

fn npz(name: &str) -> Npz {
    expected::npz(&fixture(name))
}

fn selection(reward: Option<RewardRule>) -> LeRobotSelection {
    LeRobotSelection { reward, ..Default::default() }
}

/// How rewards and ends are expected to come out (the module docs' rules, restated).
#[derive(Clone, Copy)]
enum Expect {
    /// `next.reward` as recorded; cut at the first `next.success` frame (terminal there).
    Recorded,
    /// Reward 1 and terminal on the last frame.
    SparseEnd,
    /// Reward 1 and terminal on the first `next.success` frame, cut there.
    SparseSuccess,
}

/// The episode the reader must produce from numpy's arrays of episode `e`.
fn expected_episode(npz: &Npz, e: usize, state_keys: &[&str], cameras: &[&str], expect: Expect) -> ImportedEpisode {
    let p = |key: &str| format!("ep{e}.{key}");
    let len = array(npz, &p("action")).shape[0];
    let first_success = npz.get(&p("next.success")).and_then(|a| a.data.to_bool().iter().position(|&b| b));
    let (end, terminal) = match (expect, first_success) {
        (Expect::SparseEnd, _) => (len, true),
        (_, Some(t)) => (t + 1, true),
        (_, None) => (len, false),
    };
    let rewards: Vec<f32> = match expect {
        Expect::Recorded => array(npz, &p("next.reward")).data.to_f32()[..end].to_vec(),
        _ => (0..end).map(|t| if terminal && t == end - 1 { 1.0 } else { 0.0 }).collect(),
    };
    ImportedEpisode {
        name: format!("episode_{e:06}"),
        len: end,
        state: (0..end).flat_map(|t| state_keys.iter().flat_map(move |k| row_f32(array(npz, &p(k)), t))).collect(),
        images: cameras
            .iter()
            .map(|c| {
                let a = array(npz, &p(c));
                let frame: usize = a.shape[1..].iter().product();
                (c.to_string(), bytes(npz, &p(c))[..end * frame].to_vec())
            })
            .collect(),
        actions: (0..end).flat_map(|t| row_f32(array(npz, &p("action")), t)).collect(),
        rewards,
        terminals: (0..end).map(|t| terminal && t == end - 1).collect(),
        timeouts: (0..end).map(|t| !terminal && t == end - 1).collect(),
        final_state: None,
        final_images: None,
    }
}

const V21_STATE: [&str; 2] = ["observation.state", "observation.environment_state"];
const V21_CAMERAS: [&str; 1] = ["observation.image"];
const V30_CAMERAS: [&str; 2] = ["observation.images.top", "observation.images.wrist"];
const V30_STATE: [&str; 1] = ["observation.state"];

fn check_v21(rule: Option<RewardRule>, expect: Expect) {
    let dir = fixture("v21_images");
    let npz = npz("v21_images.npz");
    let data = read(&dir, &selection(rule)).unwrap();
    assert_eq!(data.format, SourceFormat::LeRobotV21);
    assert_eq!(data.source, dir.display().to_string());
    assert_eq!(data.cameras, V21_CAMERAS);
    assert_eq!(data.image_sizes, vec![(8, 8)]);
    // observation.state first, then the other numeric observation features sorted.
    assert_eq!(data.state_keys, V21_STATE);
    assert_eq!(data.state_key_dims, vec![4, 3]);
    assert_eq!((data.state_dim, data.action_dim), (7, 2));
    assert_eq!(data.episodes.len(), 3);
    for (e, episode) in data.episodes.iter().enumerate() {
        assert_eq!(episode, &expected_episode(&npz, e, &V21_STATE, &V21_CAMERAS, expect), "episode {e}");
    }
    let NpyData::I64(fps) = &array(&npz, "fps").data else { panic!("fps") };
    assert_eq!(data.metadata["fps"], fps[0].to_string());
    assert_eq!(data.metadata["codebase_version"], "v2.1");
    assert_eq!(data.metadata["robot_type"], "sim_arm");
}

#[test]
fn v21_images_round_trip_with_recorded_rewards() {
    check_v21(None, Expect::Recorded);
    let data = read(&fixture("v21_images"), &selection(None)).unwrap();
    // Episode 0 (T = 5) succeeds at frame 2: cut after it, terminal; episode 1 never succeeds:
    // a timeout; episode 2 succeeds on its last frame.
    let lens: Vec<usize> = data.episodes.iter().map(|e| e.len).collect();
    assert_eq!(lens, [3, 3, 4]);
    assert_eq!(data.episodes[0].terminals, [false, false, true]);
    assert_eq!(data.episodes[1].timeouts, [false, false, true]);
    assert_eq!(data.episodes[1].terminals, [false, false, false]);
    assert_eq!(data.metadata["reward_rule"], "recorded (next.reward)");
    assert_eq!(data.metadata["frames_after_success"], "2");
}

#[test]
fn v21_images_with_sparse_end_and_sparse_success() {
    check_v21(Some(RewardRule::SparseEnd), Expect::SparseEnd);
    check_v21(Some(RewardRule::SparseSuccess), Expect::SparseSuccess);
    let data = read(&fixture("v21_images"), &selection(Some(RewardRule::SparseEnd))).unwrap();
    assert_eq!(data.metadata["reward_rule"], "sparse-end");
    assert_eq!(data.episodes[0].rewards, [0.0, 0.0, 0.0, 0.0, 1.0]);
    let data = read(&fixture("v21_images"), &selection(Some(RewardRule::SparseSuccess))).unwrap();
    assert_eq!(data.metadata["reward_rule"], "sparse-success");
    assert_eq!(data.episodes[0].rewards, [0.0, 0.0, 1.0]);
    assert_eq!(data.episodes[1].rewards, [0.0, 0.0, 0.0]);
}

#[test]
fn v30_images_round_trip_across_data_files() {
    let dir = fixture("v30_images");
    let npz = npz("v30_images.npz");
    assert_eq!(detect(&dir).unwrap(), SourceFormat::LeRobotV30);
    assert_eq!(detect(&fixture("v21_images")).unwrap(), SourceFormat::LeRobotV21);
    let data = read(&dir, &selection(Some(RewardRule::SparseEnd))).unwrap();
    assert_eq!(data.format, SourceFormat::LeRobotV30);
    assert_eq!(data.cameras, V30_CAMERAS);
    // wrist's shape is [3, 6, 8] with names (channels, height, width).
    assert_eq!(data.image_sizes, vec![(8, 8), (6, 8)]);
    assert_eq!(data.state_keys, V30_STATE);
    assert_eq!((data.state_dim, data.action_dim), (3, 2));
    assert_eq!(data.episodes.len(), 3);
    for (e, episode) in data.episodes.iter().enumerate() {
        assert_eq!(episode, &expected_episode(&npz, e, &V30_STATE, &V30_CAMERAS, Expect::SparseEnd), "episode {e}");
    }
    assert_eq!(data.metadata["codebase_version"], "v3.0");
    assert_eq!(data.metadata["robot_type"], "so100_follower");
    assert_eq!(data.metadata["fps"], "15");
    assert_eq!(data.metadata["reward_rule"], "sparse-end");
}

fn message(e: &LeRobotError) -> String {
    e.to_string()
}

#[test]
fn no_recorded_reward_needs_a_rule() {
    let dir = fixture("v30_images");
    let e = read(&dir, &selection(None)).unwrap_err();
    assert_eq!(e.file(), dir.join("meta/info.json"));
    assert_eq!(e.key(), Some("next.reward"));
    let m = message(&e);
    assert!(m.contains("--reward sparse-end") && m.contains("--reward sparse-success"), "{m}");
    assert!(m.contains("no rewards"), "{m}");
    // sparse-success needs next.success, which this dataset does not record.
    let e = read(&dir, &selection(Some(RewardRule::SparseSuccess))).unwrap_err();
    assert_eq!(e.file(), dir.join("meta/info.json"));
    assert_eq!(e.key(), Some("next.success"));
    assert!(message(&e).contains("sparse-end"), "{e}");
}

#[test]
fn cameras_and_state_keys_are_selected_and_ordered() {
    let dir = fixture("v30_images");
    let v30_npz = npz("v30_images.npz");
    let pick = |cameras: Option<Vec<&str>>, state: Option<Vec<&str>>| LeRobotSelection {
        cameras: cameras.map(|c| c.into_iter().map(String::from).collect()),
        state_keys: state.map(|s| s.into_iter().map(String::from).collect()),
        reward: Some(RewardRule::SparseEnd),
    };
    // A short name and a full key, in the order given.
    let data = read(&dir, &pick(Some(vec!["wrist", "observation.images.top"]), None)).unwrap();
    let order = ["observation.images.wrist", "observation.images.top"];
    assert_eq!(data.cameras, order);
    assert_eq!(data.image_sizes, vec![(6, 8), (8, 8)]);
    for (e, episode) in data.episodes.iter().enumerate() {
        assert_eq!(episode, &expected_episode(&v30_npz, e, &V30_STATE, &order, Expect::SparseEnd));
    }
    // No cameras at all.
    let data = read(&dir, &pick(Some(vec![]), None)).unwrap();
    assert!(data.cameras.is_empty() && data.episodes.iter().all(|e| e.images.is_empty()));
    // A camera that is not there: the error lists the ones that are.
    let e = read(&dir, &pick(Some(vec!["side"]), None)).unwrap_err();
    assert_eq!(e.key(), Some("side"));
    let m = message(&e);
    assert!(m.contains("observation.images.top, observation.images.wrist"), "{m}");

    // State keys in the order given.
    let v21 = fixture("v21_images");
    let v21_npz = npz("v21_images.npz");
    let order = ["observation.environment_state", "observation.state"];
    let data = read(&v21, &LeRobotSelection { reward: None, ..pick(None, Some(order.to_vec())) }).unwrap();
    assert_eq!(data.state_keys, order);
    assert_eq!(data.state_key_dims, vec![3, 4]);
    for (e, episode) in data.episodes.iter().enumerate() {
        assert_eq!(episode, &expected_episode(&v21_npz, e, &order, &V21_CAMERAS, Expect::Recorded));
    }
    let e = read(&v21, &pick(None, Some(vec!["observation.velocity"]))).unwrap_err();
    assert_eq!(e.key(), Some("observation.velocity"));
    assert!(message(&e).contains("observation.environment_state, observation.state"), "{e}");
    let e = read(&v21, &pick(None, Some(vec!["observation.image"]))).unwrap_err();
    assert!(message(&e).contains("must be numeric"), "{e}");
}

/// A copy of a fixture directory in a temporary directory, to break.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join(name);
    copy(&fixture(name), &dir);
    (temp, dir)
}

fn edit(path: &Path, f: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, f(text)).unwrap();
}

fn edit_info(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    edit(&dir.join("meta/info.json"), |text| {
        let mut info: serde_json::Value = serde_json::from_str(&text).unwrap();
        f(&mut info);
        serde_json::to_string_pretty(&info).unwrap()
    });
}

#[test]
fn info_json_errors_name_the_file_and_key() {
    let (_t, dir) = copy_fixture("v21_images");
    let info = dir.join("meta/info.json");
    edit(&info, |t| t.replace("\"v2.1\"", "\"v2.0\""));
    let e = detect(&dir).unwrap_err();
    assert_eq!((e.file(), e.key()), (info.as_path(), Some("codebase_version")));
    assert!(message(&e).contains("`v2.0`") && message(&e).contains("v2.1, v3.0"), "{e}");
    std::fs::remove_file(&info).unwrap();
    let e = read(&dir, &selection(None)).unwrap_err();
    assert_eq!(e.file(), info);
    assert!(message(&e).contains("missing"), "{e}");
}

#[test]
fn episode_length_must_match_the_rows() {
    let (_t, dir) = copy_fixture("v21_images");
    edit(&dir.join("meta/episodes.jsonl"), |t| t.replacen("\"length\": 5", "\"length\": 6", 1));
    let e = read(&dir, &selection(None)).unwrap_err();
    assert_eq!(e.file(), dir.join("data/chunk-000/episode_000000.parquet"));
    let m = message(&e);
    assert!(m.contains("episode 0 has 5 rows") && m.contains("length as 6"), "{m}");
}

#[test]
fn image_of_the_wrong_size_is_refused() {
    let (_t, dir) = copy_fixture("v21_images");
    edit_info(&dir, |info| info["features"]["observation.image"]["shape"] = serde_json::json!([8, 9, 3]));
    let e = read(&dir, &selection(None)).unwrap_err();
    assert_eq!(e.key(), Some("observation.image"), "{e}");
    assert!(message(&e).contains("8×8 (H×W)") && message(&e).contains("8×9"), "{e}");
}

#[test]
fn video_camera_without_the_video_feature_names_the_file() {
    if cfg!(feature = "video") {
        return;
    }
    let (_t, dir) = copy_fixture("v21_images");
    edit_info(&dir, |info| {
        info["features"]["observation.images.cam"] =
            serde_json::json!({"dtype": "video", "shape": [16, 16, 3], "names": ["height", "width", "channel"]});
        info["video_path"] =
            serde_json::json!("videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4");
    });
    let e = read(&dir, &selection(None)).unwrap_err();
    assert_eq!(e.file(), dir.join("videos/chunk-000/observation.images.cam/episode_000000.mp4"));
    assert_eq!(e.key(), Some("observation.images.cam"));
    assert!(message(&e).contains("--features rl/video") && message(&e).contains("--cameras"), "{e}");
    // Choosing the image camera reads without video support.
    let only_image = LeRobotSelection { cameras: Some(vec!["image".into()]), ..Default::default() };
    assert_eq!(read(&dir, &only_image).unwrap().cameras, ["observation.image"]);
}

/// Reads `v21_broken` with only episode `e` listed.
fn read_broken(e: usize) -> (tempfile::TempDir, PathBuf, LeRobotError) {
    let (t, dir) = copy_fixture("v21_broken");
    edit(&dir.join("meta/episodes.jsonl"), |text| text.lines().nth(e).unwrap().to_string() + "\n");
    let err = read(&dir, &selection(None)).unwrap_err();
    (t, dir.join(format!("data/chunk-000/episode_{e:06}.parquet")), err)
}

#[test]
fn bad_data_files_name_the_file_and_key() {
    let cases: [(usize, &str, &[&str]); 7] = [
        (0, "action", &["missing column"]),
        (1, "frame_index", &["[0, 2]", "not 0..2"]),
        (2, "observation.image", &["row 0", "does not decode"]),
        (3, "observation.state", &["row 1", "non-finite value NaN"]),
        (4, "next.reward", &["row 1", "non-finite value inf"]),
        (5, "observation.state", &["row 1 holds 1 values", "[2]"]),
        (6, "episode_index", &["episode 6 has 1 rows"]),
    ];
    for (e, key, words) in cases {
        let (_t, file, err) = read_broken(e);
        assert_eq!(err.file(), file, "case {e}: {err}");
        assert_eq!(err.key(), Some(key), "case {e}: {err}");
        let m = message(&err);
        for w in words {
            assert!(m.contains(w), "case {e}: `{w}` not in: {m}");
        }
    }
}

/// Largest difference between our decoded video frames and PyAV's (ffmpeg's libdav1d / h264
/// decoders, then swscale's `rgb24`): the bitstream decode is exact in both, the YUV → RGB
/// conversion differs in chroma upsampling and rounding. Measured: 3 on both fixtures.
#[cfg(feature = "video")]
const VIDEO_TOLERANCE: u8 = 4;

/// Largest difference from the frames that were encoded: the codecs' own loss on 16×24 ramps
/// with 4:2:0 chroma (measured 13 for H.264 at crf 12, 19 for AV1 at crf 20). Only a sanity
/// bound: a frame taken at the wrong time differs by far more (the ramps move 0.6 rad a frame).
#[cfg(feature = "video")]
const CODEC_LOSS: u8 = 24;

/// A video fixture: every number exact, every pixel within [`VIDEO_TOLERANCE`] of PyAV's decode.
#[cfg(feature = "video")]
fn check_video(name: &str, format: SourceFormat, camera: &str, rule: Option<RewardRule>, expect: Expect) {
    let dir = fixture(name);
    let npz = npz(&format!("{name}.npz"));
    let data = read(&dir, &selection(rule)).unwrap();
    assert_eq!(data.format, format);
    assert_eq!(data.cameras, [camera]);
    assert_eq!(data.image_sizes, vec![(16, 24)]);
    let mut worst = 0u8;
    let mut worst_source = 0u8;
    for (e, episode) in data.episodes.iter().enumerate() {
        let mut expected = expected_episode(&npz, e, &["observation.state"], &[camera], expect);
        let (_, ours) = &episode.images[0];
        let (_, theirs) = &expected.images[0];
        assert_eq!(ours.len(), theirs.len(), "{name} episode {e}");
        worst = worst.max(ours.iter().zip(theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0));
        let source = bytes(&npz, &format!("ep{e}.source.{camera}"));
        worst_source = worst_source.max(ours.iter().zip(&source).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0));
        expected.images = episode.images.clone();
        assert_eq!(episode, &expected, "{name} episode {e}");
    }
    println!("{name}: max |ours - PyAV| = {worst}, max |ours - source| = {worst_source}");
    assert!(worst <= VIDEO_TOLERANCE, "{name}: {worst} > {VIDEO_TOLERANCE}");
    assert!(worst_source <= CODEC_LOSS, "{name}: {worst_source} > {CODEC_LOSS}");
}

#[cfg(feature = "video")]
#[test]
fn v30_av1_video_frames_match_pyav() {
    check_video(
        "v30_av1",
        SourceFormat::LeRobotV30,
        "observation.images.cam",
        Some(RewardRule::SparseEnd),
        Expect::SparseEnd,
    );
}

#[cfg(feature = "video")]
#[test]
fn v21_h264_video_frames_match_pyav() {
    check_video("v21_h264", SourceFormat::LeRobotV21, "observation.images.front", None, Expect::Recorded);
}
