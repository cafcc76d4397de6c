//! The Cosmos-Transfer2.5 edge and blur controls against OpenCV 4.11 / torchvision outputs made by
//! `tests/fixtures/make_controls_fixture.py` (the same library calls upstream's inference-time
//! augmentors make), stage by stage, plus bad inputs.

use image::{GrayImage, RgbImage};
use sampler::cosmos::controls::{
    bilateral_filter, blur, blur_with, canny, compute_control, compute_control_with, resize_area, resize_bicubic_aa,
    resize_linear, ControlKind, Preset,
};
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/controls")
}

fn rgb(name: &str) -> RgbImage {
    let p = dir().join(name);
    image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8()
}

fn gray(name: &str) -> GrayImage {
    let p = dir().join(name);
    image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_luma8()
}

fn cases() -> Vec<String> {
    let text = std::fs::read_to_string(dir().join("cases.json")).expect("cases.json");
    let v: Value = serde_json::from_str(&text).expect("cases.json parses");
    v["cases"].as_array().expect("cases").iter().map(|c| c["name"].as_str().expect("name").to_string()).collect()
}

/// (number of differing values, max |difference|) between two equally sized byte buffers.
fn diff(a: &[u8], b: &[u8]) -> (usize, u8) {
    assert_eq!(a.len(), b.len(), "sizes differ");
    a.iter().zip(b).fold((0, 0), |(n, m), (&x, &y)| {
        let d = x.abs_diff(y);
        (n + usize::from(d > 0), m.max(d))
    })
}

fn check_rgb(what: &str, ours: &RgbImage, reference: &RgbImage, max_abs: u8, max_frac: f64) {
    assert_eq!(ours.dimensions(), reference.dimensions(), "{what}: size");
    let (n, m) = diff(ours.as_raw(), reference.as_raw());
    let frac = n as f64 / ours.as_raw().len() as f64;
    println!("{what}: {n} of {} values differ ({:.3} %), max |diff| {m}", ours.as_raw().len(), frac * 100.0);
    assert!(m <= max_abs, "{what}: max |diff| {m} > {max_abs}");
    assert!(frac <= max_frac, "{what}: {:.3} % of values differ (allowed {:.3} %)", frac * 100.0, max_frac * 100.0);
}

#[test]
fn canny_matches_opencv_bit_exactly() {
    let presets = [Preset::Medium, Preset::Low, Preset::VeryLow];
    let mut edges = 0;
    for name in cases() {
        let input = rgb(&format!("{name}_input.png"));
        for p in presets {
            let (lo, hi) = p.edge_thresholds();
            let ours = canny(&input, lo, hi);
            let reference = gray(&format!("{name}_edge_{}.png", p.name()));
            let (n, _) = diff(ours.as_raw(), reference.as_raw());
            let count = reference.as_raw().iter().filter(|&&v| v == 255).count();
            println!("{name} edge {}: {n} of {} pixels differ ({count} edge pixels)", p.name(), ours.as_raw().len());
            assert_eq!(n, 0, "{name} edge {}: {n} pixels differ from OpenCV", p.name());
            edges += count;
        }
    }
    assert!(edges > 1000, "the fixture has too few edges to test anything: {edges}");
}

#[test]
fn edge_control_is_canny_medium_on_three_channels() {
    let input = rgb("shapes_input.png");
    let frames = vec![input.clone(), rgb("wide_input.png"), input];
    let out = compute_control(ControlKind::Edge, &frames[..1]).expect("edge control");
    let reference = gray("shapes_edge_medium.png");
    assert_eq!(out.len(), 1);
    for (px, r) in out[0].pixels().zip(reference.pixels()) {
        assert_eq!(px.0, [r[0]; 3]);
    }
    // mixed sizes are refused, equal ones go through the threaded path in order
    assert!(compute_control(ControlKind::Edge, &frames).is_err());
    let same = vec![rgb("shapes_input.png"), rgb("shapes_input.png")];
    let out = compute_control_with(ControlKind::Edge, &same, Preset::Low).expect("edge control");
    let low = gray("shapes_edge_low.png");
    for f in &out {
        assert!(f.pixels().zip(low.pixels()).all(|(a, b)| a.0 == [b[0]; 3]));
    }
}

#[test]
fn blur_stages_match_opencv_and_torchvision() {
    for name in cases() {
        let input = rgb(&format!("{name}_input.png"));
        let (w, h) = input.dimensions();
        let area_ref = rgb(&format!("{name}_area.png"));
        let area = resize_area(&input, w / 2, h / 2);
        check_rgb(&format!("{name} area"), &area, &area_ref, 1, 0.001);
        // each later stage from the reference's previous stage, so a difference stays local
        let bil_ref = rgb(&format!("{name}_bilateral.png"));
        check_rgb(&format!("{name} bilateral"), &bilateral_filter(&area_ref, 30, 150.0, 100.0), &bil_ref, 1, 0.001);
        let lin_ref = rgb(&format!("{name}_linear.png"));
        check_rgb(&format!("{name} linear"), &resize_linear(&bil_ref, w, h), &lin_ref, 1, 0.001);
        let down_ref = rgb(&format!("{name}_down.png"));
        check_rgb(&format!("{name} bicubic down"), &resize_bicubic_aa(&lin_ref, w / 10, h / 10), &down_ref, 1, 0.001);
        let blur_ref = rgb(&format!("{name}_blur.png"));
        check_rgb(&format!("{name} bicubic up"), &resize_bicubic_aa(&down_ref, w, h), &blur_ref, 1, 0.001);
        // and end to end
        check_rgb(&format!("{name} blur"), &blur(&input).expect("blur"), &blur_ref, 1, 0.001);
    }
}

#[test]
fn blur_control_matches_upstream_for_three_presets() {
    for name in cases() {
        let input = rgb(&format!("{name}_input.png"));
        let frames = vec![input.clone(), input];
        for (preset, file) in [
            (Preset::Medium, format!("{name}_blur.png")),
            (Preset::Low, format!("{name}_blur_low.png")),
            (Preset::High, format!("{name}_blur_high.png")),
        ] {
            let out = compute_control_with(ControlKind::Blur, &frames, preset).expect("blur control");
            assert_eq!(out.len(), 2);
            let reference = rgb(&file);
            for f in &out {
                check_rgb(&format!("{name} blur {}", preset.name()), f, &reference, 1, 0.001);
            }
        }
    }
}

#[test]
fn bad_inputs_give_errors_not_panics() {
    let err = compute_control(ControlKind::Edge, &[]).unwrap_err();
    assert!(format!("{err:#}").contains("no frames"), "{err:#}");
    for kind in [ControlKind::Depth, ControlKind::Seg] {
        let err = compute_control(kind, &[rgb("shapes_input.png")]).unwrap_err();
        assert!(format!("{err:#}").contains("file"), "{err:#}");
    }
    let err = ControlKind::parse("canny").unwrap_err();
    assert!(format!("{err}").contains("edge, blur, depth, seg"), "{err}");
    assert!(Preset::parse("strong").is_err());
    for k in ControlKind::ALL {
        assert_eq!(ControlKind::parse(k.name()).expect("round trip"), k);
    }
    assert_eq!(ControlKind::parse("vis").expect("upstream's name"), ControlKind::Blur);

    for (w, h) in [(1, 1), (2, 2), (1, 5), (7, 1), (3, 2)] {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 90) as u8, (y * 70) as u8, 200]));
        let e = compute_control(ControlKind::Edge, std::slice::from_ref(&img)).expect("edge of a tiny frame");
        assert_eq!(e[0].dimensions(), (w, h));
        let err = compute_control(ControlKind::Blur, std::slice::from_ref(&img)).unwrap_err();
        assert!(format!("{err:#}").contains("too small"), "{err:#}");
        assert!(blur(&img).is_err());
        // the building blocks themselves stay total
        let _ = bilateral_filter(&img, 30, 150.0, 100.0);
        let _ = resize_area(&img, 1, 1);
        let _ = resize_linear(&img, 4, 3);
        let _ = resize_bicubic_aa(&img, 1, 1);
        let _ = canny(&img, f64::NAN, 1e300);
    }
    let empty = RgbImage::new(0, 0);
    assert!(compute_control(ControlKind::Edge, std::slice::from_ref(&empty)).is_err());
    assert_eq!(canny(&empty, 100.0, 200.0).dimensions(), (0, 0));
    // the smallest frame the medium blur takes
    let ten = RgbImage::from_fn(10, 10, |x, y| image::Rgb([(x * 25) as u8, (y * 25) as u8, 9]));
    assert_eq!(blur(&ten).expect("10x10 blur").dimensions(), (10, 10));
    let p = Preset::VeryHigh.blur_params();
    assert!(blur_with(&ten, &p).is_err(), "1/16 of 10 pixels is 0 pixels");
}
