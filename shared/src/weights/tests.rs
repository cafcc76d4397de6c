use super::*;
use candle_nn::Init;

fn model(varmap: &VarMap, value: f64) {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    vb.get_with_hints((2, 3), "enc.conv.weight", Init::Const(value)).unwrap();
    vb.get_with_hints(3, "enc.conv.bias", Init::Const(value)).unwrap();
}

fn saved(dir: &Path, value: f64) -> PathBuf {
    let vm = VarMap::new();
    model(&vm, value);
    let path = dir.join("w.safetensors");
    save_varmap_atomic(&vm, &path).unwrap();
    path
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved(dir.path(), 0.5);
    assert!(!crate::io::temp_sibling(&path).exists());
    let vm = VarMap::new();
    model(&vm, 0.0);
    let report = load_into_varmap(&vm, &path, &LoadOptions::default()).unwrap();
    assert_eq!(report.loaded.len(), 2);
    let w = vm.data().lock().unwrap()["enc.conv.weight"].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(w.iter().all(|&v| v == 0.5));
    let vb = varbuilder_from_file(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vb.get((2, 3), "enc.conv.weight").unwrap().dims(), &[2, 3]);
}

#[test]
fn missing_and_unexpected_keys_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let mut t = HashMap::new();
    t.insert("enc.conv.weight".to_string(), Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap());
    t.insert("enc.extra".to_string(), Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap());
    save_tensors_atomic(&t, &path).unwrap();
    let vm = VarMap::new();
    model(&vm, 1.0);
    let err = load_into_varmap(&vm, &path, &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("w.safetensors"), "{err}");
    assert!(err.contains("missing keys") && err.contains("enc.conv.bias"), "{err}");
    assert!(err.contains("unexpected keys") && err.contains("enc.extra"), "{err}");
    // Nothing was changed by the failed load.
    let w = vm.data().lock().unwrap()["enc.conv.weight"].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(w.iter().all(|&v| v == 1.0));
    let ok = load_into_varmap(
        &vm,
        &path,
        &LoadOptions { allow_missing: true, allow_unexpected: true, ..Default::default() },
    )
    .unwrap();
    assert_eq!((ok.loaded.len(), ok.missing.len(), ok.unexpected.len()), (1, 1, 1));
}

#[test]
fn prefix_maps_file_keys_into_a_sub_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backbone.safetensors");
    let mut t = HashMap::new();
    t.insert("conv.weight".to_string(), Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap());
    t.insert("conv.bias".to_string(), Tensor::ones(3, DType::F32, &Device::Cpu).unwrap());
    save_tensors_atomic(&t, &path).unwrap();
    let vm = VarMap::new();
    model(&vm, 0.0);
    let r = load_into_varmap(&vm, &path, &LoadOptions { prefix: "enc.".into(), ..Default::default() }).unwrap();
    assert_eq!(r.loaded, ["enc.conv.bias", "enc.conv.weight"]);
}

#[test]
fn wrong_shape_and_dtype_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let mut t = HashMap::new();
    t.insert("enc.conv.weight".to_string(), Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap());
    t.insert("enc.conv.bias".to_string(), Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap());
    save_tensors_atomic(&t, &path).unwrap();
    let vm = VarMap::new();
    model(&vm, 0.0);
    let err = load_into_varmap(&vm, &path, &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("'enc.conv.weight': shape [3, 2] in the file, the model expects [2, 3]"), "{err}");
    assert!(err.contains("'enc.conv.bias': dtype F64 in the file, the model expects F32"), "{err}");
}

#[test]
fn truncated_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved(dir.path(), 0.5);
    let bytes = std::fs::read(&path).unwrap();
    for cut in [4, 12, bytes.len() - 5] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let vm = VarMap::new();
        model(&vm, 0.0);
        let err = load_into_varmap(&vm, &path, &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, WeightsError::Corrupt { .. }), "cut {cut}: {err}");
        assert!(err.to_string().contains("w.safetensors") && err.to_string().contains("truncated"));
    }
    let err =
        load_into_varmap(&VarMap::new(), &dir.path().join("absent.safetensors"), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, WeightsError::NotFound(_)));
}

#[test]
fn non_finite_weights_are_rejected_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let mut t = HashMap::new();
    t.insert(
        "enc.conv.weight".to_string(),
        Tensor::new(&[[0.0f32, f32::NAN, 1.0], [0.0, 0.0, f32::INFINITY]], &Device::Cpu).unwrap(),
    );
    t.insert("enc.conv.bias".to_string(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    save_tensors_atomic(&t, &path).unwrap();
    let vm = VarMap::new();
    model(&vm, 0.0);
    let err = load_into_varmap(&vm, &path, &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("'enc.conv.weight' holds 2 NaN/Inf"), "{err}");
    assert!(varbuilder_from_file(&path, DType::F32, &Device::Cpu).is_err());
}

#[test]
fn references_parse() {
    assert_eq!(
        WeightRef::parse("nvidia/Cosmos-Predict2-2B-Video2World@diffusers:transformer/model.safetensors").unwrap(),
        WeightRef::Hub {
            repo: "nvidia/Cosmos-Predict2-2B-Video2World".into(),
            revision: "diffusers".into(),
            file: "transformer/model.safetensors".into()
        }
    );
    assert_eq!(
        WeightRef::parse("timm/resnet18.a1_in1k:model.safetensors").unwrap(),
        WeightRef::Hub {
            repo: "timm/resnet18.a1_in1k".into(),
            revision: "main".into(),
            file: "model.safetensors".into()
        }
    );
    assert_eq!(
        WeightRef::parse("weights/policy.safetensors").unwrap(),
        WeightRef::Local("weights/policy.safetensors".into())
    );
    for bad in ["noslash:file", "a/b@:file", "a/b:", "a/b:../../etc/passwd", "a b/c:f"] {
        assert!(matches!(WeightRef::parse(bad), Err(WeightsError::BadReference { .. })), "{bad}");
    }
}

/// Builds the cache layout Python's huggingface_hub writes: refs/<rev> holds a commit hash,
/// snapshots/<hash>/<file> the file.
fn fake_cache(root: &Path, repo: &str, rev: &str, file: &str) -> (PathBuf, String) {
    let hash = "0123456789abcdef0123456789abcdef01234567".to_string();
    let repo_dir = root.join(format!("models--{}", repo.replace('/', "--")));
    let ref_path = repo_dir.join("refs").join(rev);
    std::fs::create_dir_all(ref_path.parent().unwrap()).unwrap();
    std::fs::write(&ref_path, format!("{hash}\n")).unwrap();
    let snap = repo_dir.join("snapshots").join(&hash).join(file);
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    std::fs::write(&snap, b"payload").unwrap();
    (snap, hash)
}

#[test]
fn hub_reference_resolves_from_a_fake_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (snap, hash) = fake_cache(dir.path(), "org/model", "diffusers/general", "transformer/model.safetensors");
    let hub = HubOptions { cache_dir: dir.path().into(), offline: true };
    let r = WeightRef::parse("org/model@diffusers/general:transformer/model.safetensors").unwrap();
    assert_eq!(resolve_with(&r, &hub).unwrap(), snap);
    let by_hash = WeightRef::parse(&format!("org/model@{hash}:transformer/model.safetensors")).unwrap();
    assert_eq!(resolve_with(&by_hash, &hub).unwrap(), snap);
}

#[test]
fn hub_reference_not_in_cache_says_where_it_looked_and_how_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    fake_cache(dir.path(), "org/model", "main", "a.safetensors");
    let hub = HubOptions { cache_dir: dir.path().into(), offline: true };
    let err = resolve_with(&WeightRef::parse("org/model:b.safetensors").unwrap(), &hub).unwrap_err().to_string();
    assert!(err.contains("not in the Hugging Face cache"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(err.contains("huggingface-cli download org/model b.safetensors"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    let err = resolve_with(&WeightRef::parse("other/model@v2:x.bin").unwrap(), &hub).unwrap_err().to_string();
    assert!(err.contains("--revision v2") && err.contains("refs"), "{err}");
}

#[test]
fn shape_recorder_lists_what_a_model_asks_for_without_allocating() {
    let recorder = ShapeRecorder::new();
    let vb = recorder.var_builder(DType::F32, &Device::Cpu);
    let big = vb.pp("layer").get((4096, 4096), "weight").unwrap();
    let bias = vb.pp("layer").get(4096, "bias").unwrap();
    assert_eq!(big.dims(), &[4096, 4096]);
    // A stride-0 view of one element: no 64 MB buffer behind it.
    assert_eq!(big.stride(), &[0, 0]);
    assert_eq!(bias.elem_count(), 4096);
    let shapes = recorder.shapes();
    assert_eq!(shapes.len(), 2);
    assert_eq!(shapes["layer.weight"], vec![4096, 4096]);
    assert_eq!(recorder.parameter_count(), 4096 * 4096 + 4096);
    // Asked again with the same shape is fine; with another shape it is an error naming the key.
    vb.pp("layer").get(4096, "bias").unwrap();
    let err = vb.pp("layer").get(17, "bias").unwrap_err().to_string();
    assert!(err.contains("layer.bias"), "{err}");
}

/// The memory-mapped reader counts NaN/Inf on the file's bytes in every float dtype (the
/// exponent test for bf16/f16 is ours, so each dtype is written by candle and counted back;
/// largest finite values, signed zeros and subnormals are not counted), and a value that only
/// overflows in the conversion to f16 is caught after it.
#[test]
fn non_finite_values_are_counted_in_every_float_dtype_of_a_mapped_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let values = [0.0f64, -0.0, 1e-40, f64::NAN, 1.0, f64::INFINITY, -3.0e38, f64::NEG_INFINITY];
    let base = Tensor::new(&values, &Device::Cpu).unwrap();
    let mut t = HashMap::new();
    for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
        t.insert(format!("{dtype:?}"), base.to_dtype(dtype).unwrap());
    }
    t.insert("ints".to_string(), Tensor::new(&[u32::MAX, 0x7F80_0000u32], &Device::Cpu).unwrap());
    let wide = Tensor::new(&[1.0f32, 70000.0], &Device::Cpu).unwrap();
    t.insert("wide".to_string(), wide);
    save_tensors_atomic(&t, &path).unwrap();

    let (read, bad) = read_checked(&path, &Device::Cpu, None).unwrap();
    assert_eq!(read.len(), 6);
    let bad: HashMap<String, usize> = bad.into_iter().collect();
    // f16 turns −3e38 into −Inf as well.
    let expected = HashMap::from([("F64".into(), 3), ("F32".into(), 3), ("BF16".into(), 3), ("F16".into(), 4)]);
    assert_eq!(bad, expected);
    let (as_f16, bad) = read_checked(&path, &Device::Cpu, Some(DType::F16)).unwrap();
    assert_eq!(as_f16["wide"].dtype(), DType::F16);
    assert_eq!(as_f16["ints"].dtype(), DType::U32);
    assert!(bad.contains(&("wide".to_string(), 1)), "{bad:?}");
}

#[test]
fn an_exact_format_refuses_other_dtypes_nan_and_stray_keys_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("w.safetensors");
    let tensors = HashMap::from([
        ("a".to_string(), Tensor::new(&[1f32, f32::NAN], &Device::Cpu).unwrap()),
        ("b".to_string(), Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap()),
        ("extra".to_string(), Tensor::new(&[0f32], &Device::Cpu).unwrap()),
    ]);
    save_tensors_atomic(&tensors, &path).unwrap();
    let expected = std::collections::BTreeMap::from([("a".to_string(), vec![2]), ("b".to_string(), vec![2])]);
    let err = varbuilder_for_model_exact(&path, &expected, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("'a': 1 NaN/Inf"), "{err}");
    assert!(err.contains("'b': stored as F16"), "{err}");
    assert!(err.contains("unexpected 'extra'"), "{err}");
    // The lenient loader converts the f16 tensor, as Hub checkpoints need.
    let err = varbuilder_for_model(&path, &expected, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(!err.contains("stored as"), "{err}");
}
