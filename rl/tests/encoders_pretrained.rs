//! `load_pretrained_resnet18`: an ImageNet ResNet18 checkpoint (torchvision's names) fills the
//! image encoder — the 3-channel first conv tiled ×3 over the stacked cameras, every other
//! weight as it is, `fc.*` and the head ignored — and a bad file is a clear error that changes
//! nothing.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use rl::encoders::{load_pretrained_resnet18, load_pretrained_resnet18_file, EncoderKind, ObsEncoder, IMAGE_CHANNELS};

/// What the model's vars are set to before loading; no file value equals it.
const SENTINEL: f32 = -7.0;

/// The var names (relative to `encoder.resnet.`) and shapes of a tiny stand-in for the model:
/// torchvision's names, small widths. conv1 takes the 9 stacked camera channels.
const MODEL: &[(&str, &[usize])] = &[
    ("conv1.weight", &[4, 9, 3, 3]),
    ("bn1.weight", &[4]),
    ("bn1.bias", &[4]),
    ("bn1.running_mean", &[4]),
    ("bn1.running_var", &[4]),
    ("layer1.0.conv1.weight", &[4, 4, 3, 3]),
    ("layer2.0.downsample.0.weight", &[5, 4, 1, 1]),
    ("layer2.0.downsample.1.running_var", &[5]),
];

/// Vars that must never be written: the projection that replaces `fc` (under the root but not
/// part of the checkpoint), a var outside the ResNet, and a second encoder under another prefix.
const UNTOUCHED: &[(&str, &[usize])] = &[
    ("encoder.resnet.proj.weight", &[2, 5]),
    ("encoder.resnet.proj.bias", &[2]),
    ("encoder.joint.0.weight", &[3, 2]),
    ("target.encoder.resnet.conv1.weight", &[4, 9, 3, 3]),
];

fn model_varmap() -> VarMap {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = MODEL.iter().map(|(name, shape)| (format!("encoder.resnet.{name}"), *shape));
    for (name, shape) in model.chain(UNTOUCHED.iter().map(|(name, shape)| (name.to_string(), *shape))) {
        vb.get_with_hints(shape.to_vec(), &name, Init::Const(SENTINEL as f64)).unwrap();
    }
    varmap
}

fn values(varmap: &VarMap, name: &str) -> Vec<f32> {
    varmap.data().lock().unwrap()[name].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Distinct, irregular values for tensor number `k` (so a transposed, shifted or swapped
/// tensor cannot pass).
fn distinct_values(k: usize, count: usize) -> Vec<f32> {
    (0..count).map(|i| ((i * 7919 + k * 104_729) % 1000) as f32 / 64.0 - 7.5 + k as f32 * 1e-3).collect()
}

/// A torchvision-style checkpoint for [`MODEL`]: conv1 for one RGB image (3 input channels),
/// every other tensor in the model's shape, plus what torchvision also stores and the loader must
/// ignore (`fc.*`, batch norm's int64 `num_batches_tracked`).
fn checkpoint() -> HashMap<String, Tensor> {
    let mut tensors = HashMap::new();
    for (k, (name, shape)) in MODEL.iter().enumerate() {
        let mut shape = shape.to_vec();
        if *name == "conv1.weight" {
            shape[1] = 3;
        }
        let count = shape.iter().product();
        tensors.insert(name.to_string(), Tensor::from_vec(distinct_values(k, count), shape, &Device::Cpu).unwrap());
    }
    tensors.insert("fc.weight".into(), Tensor::from_vec(distinct_values(90, 50), (10, 5), &Device::Cpu).unwrap());
    tensors.insert("fc.bias".into(), Tensor::from_vec(distinct_values(91, 10), 10, &Device::Cpu).unwrap());
    tensors.insert("bn1.num_batches_tracked".into(), Tensor::new(12i64, &Device::Cpu).unwrap());
    tensors
}

fn write(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

fn file_values(tensors: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
    tensors[key].flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_nothing_written(varmap: &VarMap) {
    for (name, _) in MODEL {
        let name = format!("encoder.resnet.{name}");
        assert!(values(varmap, &name).iter().all(|&v| v == SENTINEL), "{name} was written");
    }
    for (name, _) in UNTOUCHED {
        assert!(values(varmap, name).iter().all(|&v| v == SENTINEL), "{name} was written");
    }
}

#[test]
fn conv1_is_tiled_over_the_cameras_and_every_other_weight_lands_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet18.safetensors");
    let file = checkpoint();
    write(&file, &path);
    let varmap = model_varmap();
    let loaded = load_pretrained_resnet18(&varmap, "encoder.", path.to_str().unwrap()).unwrap();
    assert_eq!(loaded, MODEL.len());

    // conv1: channel c of the 9 is camera c / 3, colour c % 3 (the cameras are stacked as three
    // RGB images, camera-major), so the model's kernel for channel c is the file's for colour
    // c % 3 — the same RGB kernel for each camera. Index by index, from the raw buffers.
    let (out_channels, kernel) = (4, 3 * 3);
    let ours = values(&varmap, "encoder.resnet.conv1.weight");
    let theirs = file_values(&file, "conv1.weight");
    assert_eq!(ours.len(), out_channels * IMAGE_CHANNELS * kernel);
    for o in 0..out_channels {
        for c in 0..IMAGE_CHANNELS {
            for i in 0..kernel {
                let ours = ours[(o * IMAGE_CHANNELS + c) * kernel + i];
                let theirs = theirs[(o * 3 + c % 3) * kernel + i];
                assert_eq!(ours, theirs, "conv1 out {o} channel {c} tap {i}");
            }
        }
    }
    // Everything else exactly as in the file.
    for (name, _) in &MODEL[1..] {
        assert_eq!(values(&varmap, &format!("encoder.resnet.{name}")), file_values(&file, name), "{name}");
    }
    // The head, other modules and the other encoder are not touched.
    for (name, _) in UNTOUCHED {
        assert!(values(&varmap, name).iter().all(|&v| v == SENTINEL), "{name} was written");
    }
}

#[test]
fn bad_files_are_clear_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-resnet18.safetensors");
    let shown = path.display().to_string();
    let load = |varmap: &VarMap| load_pretrained_resnet18_file(varmap, "encoder.", &path).unwrap_err().to_string();

    // Missing keys: all named at once; the valid tensors are not loaded either.
    let mut file = checkpoint();
    file.remove("bn1.running_var");
    file.remove("layer1.0.conv1.weight");
    write(&file, &path);
    let varmap = model_varmap();
    let err = load(&varmap);
    assert!(err.contains(&shown) && err.contains("not a torchvision ResNet18"), "{err}");
    assert!(err.contains("missing 'bn1.running_var'") && err.contains("missing 'layer1.0.conv1.weight'"), "{err}");
    assert_nothing_written(&varmap);

    // A tensor of the wrong shape: the file's shape and the model's.
    let mut file = checkpoint();
    file.insert("layer1.0.conv1.weight".into(), Tensor::zeros((4, 4, 1, 1), DType::F32, &Device::Cpu).unwrap());
    write(&file, &path);
    let varmap = model_varmap();
    let err = load(&varmap);
    assert!(err.contains(&shown), "{err}");
    assert!(
        err.contains("'layer1.0.conv1.weight': shape [4, 4, 1, 1] in the file, the model expects [4, 4, 3, 3]"),
        "{err}"
    );
    assert_nothing_written(&varmap);

    // A first conv that is not one RGB image's kernel (here: already 9 channels): the error
    // reports the shape the file really has.
    let mut file = checkpoint();
    file.insert("conv1.weight".into(), Tensor::zeros((4, 9, 3, 3), DType::F32, &Device::Cpu).unwrap());
    write(&file, &path);
    let varmap = model_varmap();
    let err = load(&varmap);
    assert!(err.contains(&shown) && err.contains("'conv1.weight': shape [4, 9, 3, 3] in the file"), "{err}");
    assert_nothing_written(&varmap);

    // A first conv that is not even 4-d: still an error naming the file and the key.
    let mut file = checkpoint();
    file.insert("conv1.weight".into(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
    write(&file, &path);
    let varmap = model_varmap();
    let err = load(&varmap);
    assert!(err.contains(&shown) && err.contains("'conv1.weight': shape [4] in the file"), "{err}");
    assert_nothing_written(&varmap);

    // Not a safetensors file at all.
    std::fs::write(&path, b"PK\x03\x04 this is a zip, not safetensors").unwrap();
    let varmap = model_varmap();
    let err = load(&varmap);
    assert!(err.contains(&shown) && err.contains("not a valid safetensors file"), "{err}");
    assert_nothing_written(&varmap);

    // No file: the reference is named.
    let missing = dir.path().join("nowhere.safetensors");
    let err = format!("{:#}", load_pretrained_resnet18(&varmap, "encoder.", missing.to_str().unwrap()).unwrap_err());
    assert!(err.contains("resolving pretrained weights") && err.contains("nowhere.safetensors"), "{err}");
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn every_resnet18_var_has_a_torchvision_counterpart_of_the_same_shape() {
    // The loader maps names one to one ("encoder.resnet." + torchvision's key), so the real
    // encoder's vars must be exactly torchvision's ResNet18 state_dict entries (key list from
    // torchvision itself: tests/fixtures/make_resnet18_keys.py) minus `fc.*` (replaced by
    // `proj.*`) and `num_batches_tracked` (a counter, not a weight), with the same shapes —
    // but conv1's input channels ×3.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resnet18_torchvision_keys.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    let torchvision: HashMap<String, Vec<usize>> = json["state_dict"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(key, _)| !key.starts_with("fc.") && !key.ends_with(".num_batches_tracked"))
        .map(|(key, entry)| {
            let shape = entry["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (key.clone(), shape)
        })
        .collect();

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    ObsEncoder::new(EncoderKind::ResNet18, 24, (16, 16), vb.pp("encoder")).unwrap();
    let ours: HashMap<String, Vec<usize>> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(name, var)| {
            let key = name.strip_prefix("encoder.resnet.")?;
            (!key.starts_with("proj.")).then(|| (key.to_string(), var.dims().to_vec()))
        })
        .collect();

    let mut missing: Vec<&String> = torchvision.keys().filter(|k| !ours.contains_key(*k)).collect();
    let mut extra: Vec<&String> = ours.keys().filter(|k| !torchvision.contains_key(*k)).collect();
    missing.sort();
    extra.sort();
    assert!(missing.is_empty() && extra.is_empty(), "not in the model: {missing:?}; not in torchvision: {extra:?}");
    assert_eq!(ours.len(), 100, "torchvision ResNet18 has 100 such entries");
    for (key, shape) in &torchvision {
        let mut expected = shape.clone();
        if key == "conv1.weight" {
            expected[1] *= 3;
        }
        assert_eq!(&ours[key], &expected, "{key}");
    }
}
