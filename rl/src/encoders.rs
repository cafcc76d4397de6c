//! Observation encoders: three camera images + joint state → one feature vector `s`.
//!
//! * [`EncoderKind::ResNet18`]: the source system's encoder — one ResNet18 whose first conv takes
//!   the three RGB cameras stacked as 9 channels, batch norm in train mode, → 256-d, fused with
//!   a joint-state MLP into a 256-d feature. Candle's `max_pool2d(3, stride 2)` has no backward
//!   and candle-transformers' ResNet uses eval-mode batch norm, so the pool and the train-mode
//!   batch norm are `shared::ops`' (`max_pool2d`, `BatchNorm2d`: one op each on the CPU, with
//!   their backward; finite-difference tested).
//! * [`EncoderKind::Conv`]: a small 4-layer conv net (DrQ-style) that trains on a CPU.
//! * [`EncoderKind::None`]: state-only data; the feature is the z-scored state itself.
//!
//! Var names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `layer2.0.downsample.0`, …)
//! so an ImageNet checkpoint maps onto them one to one (see [`load_pretrained_resnet18`]).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Module, ModuleT, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder, VarMap};
use shared::ops::{max_pool2d, BatchNorm2d, Conv2d};

use crate::nets::Mlp;

/// Width of the fused feature (and of the image and joint branches).
pub const FEATURE_DIM: usize = 256;
/// Image channels of the environment's three stacked RGB cameras; a dataset with other cameras
/// stacks `3 × cameras` (see [`ObsEncoder::with_privileged_head`]).
pub const IMAGE_CHANNELS: usize = 3 * crate::env::NUM_CAMERAS;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    /// ResNet18 over the 9-channel camera stack (the source system's encoder).
    #[value(name = "resnet18")]
    #[serde(rename = "resnet18")]
    ResNet18,
    /// A small conv net for CPU training.
    Conv,
    /// No images: the feature is the state.
    None,
}

impl EncoderKind {
    pub fn uses_images(self) -> bool {
        self != EncoderKind::None
    }
}

fn bn(channels: usize, vb: VarBuilder) -> Result<BatchNorm2d> {
    // torchvision's defaults.
    BatchNorm2d::new(channels, 1e-5, 0.1, vb)
}

fn conv_no_bias(cin: usize, cout: usize, k: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::new(cin, cout, k, stride, padding, false, vb)
}

/// torchvision's `BasicBlock`.
#[derive(Clone, Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let downsample = if stride != 1 || cin != cout {
            Some((conv_no_bias(cin, cout, 1, stride, 0, vb.pp("downsample.0"))?, bn(cout, vb.pp("downsample.1"))?))
        } else {
            None
        };
        Ok(Self {
            conv1: conv_no_bias(cin, cout, 3, stride, 1, vb.pp("conv1"))?,
            bn1: bn(cout, vb.pp("bn1"))?,
            conv2: conv_no_bias(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            bn2: bn(cout, vb.pp("bn2"))?,
            downsample,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn1.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        let h = self.bn2.forward_t(&self.conv2.forward(&h)?, train)?;
        let shortcut = match &self.downsample {
            Some((conv, norm)) => norm.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        (h + shortcut)?.relu()
    }
}

/// ResNet18 with a `3 × cameras`-channel first conv and a 512 → 256 projection in place of the
/// classifier.
#[derive(Clone, Debug)]
pub struct ResNet18 {
    channels: usize,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: Vec<BasicBlock>,
    proj: Linear,
}

/// ImageNet statistics, applied per camera (the pretrained first conv expects them).
const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

impl ResNet18 {
    pub fn new(cameras: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let channels = 3 * cameras;
        let mut layers = Vec::new();
        let widths = [64usize, 128, 256, 512];
        let mut cin = 64;
        for (i, &w) in widths.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            let vl = vb.pp(format!("layer{}", i + 1));
            layers.push(BasicBlock::new(cin, w, stride, vl.pp("0"))?);
            layers.push(BasicBlock::new(w, w, 1, vl.pp("1"))?);
            cin = w;
        }
        Ok(Self {
            channels,
            conv1: conv_no_bias(channels, 64, 7, 2, 3, vb.pp("conv1"))?,
            bn1: bn(64, vb.pp("bn1"))?,
            layers,
            proj: candle_nn::linear(512, out_dim, vb.pp("proj"))?,
        })
    }

    /// `images`: (B, 3 × cameras, H, W) in [0, 1].
    pub fn forward_t(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let (mean, std) = imagenet_stats(self.channels, images.dtype(), images.device())?;
        let x = images.broadcast_sub(&mean)?.broadcast_div(&std)?;
        let x = self.bn1.forward_t(&self.conv1.forward(&x)?, train)?.relu()?;
        let mut x = max_pool2d(&x, 3, 2, 1)?;
        for block in &self.layers {
            x = block.forward_t(&x, train)?;
        }
        let pooled = x.flatten_from(2)?.mean(2)?;
        self.proj.forward(&pooled)?.relu()
    }
}

fn imagenet_stats(channels: usize, dtype: DType, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
    let mean: Vec<f64> = (0..channels).map(|c| IMAGENET_MEAN[c % 3]).collect();
    let std: Vec<f64> = (0..channels).map(|c| IMAGENET_STD[c % 3]).collect();
    let shape = (1, channels, 1, 1);
    Ok((
        Tensor::from_vec(mean, shape, device)?.to_dtype(dtype)?,
        Tensor::from_vec(std, shape, device)?.to_dtype(dtype)?,
    ))
}

/// Four 3×3 convs (strides 2, 2, 2, 1, padding 1) and a linear layer, CPU-friendly: works from
/// 16×16 images (the world model's views; 8, 4, 2, 2 px maps) up to 84×84 (42, 21, 11, 11).
#[derive(Clone, Debug)]
pub struct SmallConv {
    convs: Vec<Conv2d>,
    proj: Linear,
}

impl SmallConv {
    pub fn new(cameras: usize, image_hw: (usize, usize), out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let spec = [(3 * cameras, 32, 2), (32, 32, 2), (32, 64, 2), (64, 64, 1)];
        let (mut h, mut w) = image_hw;
        let mut convs = Vec::new();
        for (i, &(cin, cout, stride)) in spec.iter().enumerate() {
            if h < 2 || w < 2 {
                candle_core::bail!("images of {}x{} are too small for the conv encoder", image_hw.0, image_hw.1);
            }
            convs.push(Conv2d::new(cin, cout, 3, stride, 1, true, vb.pp(format!("conv{}", i + 1)))?);
            h = (h - 1) / stride + 1;
            w = (w - 1) / stride + 1;
        }
        Ok(Self { convs, proj: candle_nn::linear(64 * h * w, out_dim, vb.pp("proj"))? })
    }

    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = (images - 0.5)?;
        for conv in &self.convs {
            x = conv.forward(&x)?.relu()?;
        }
        self.proj.forward(&x.flatten_from(1)?)?.relu()
    }
}

/// What an image encoder hands the networks. Every layout is built from the same fused
/// image/joint feature; the encoder's privileged-state prediction (if it has a head) is always
/// appended last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureLayout {
    /// `[fused]`: the source design.
    #[default]
    Fused,
    /// `[fused, state]`: the z-scored joint state is also passed through as it is, so the
    /// networks read the arms' exact configuration rather than only its image through the fused
    /// layer, which moves with every critic step.
    FusedState,
    /// `[state]`: with the head, `[state, prediction]` — the state-only model's input, with the
    /// puck/goal part estimated from the pixels. The networks see the images only through the
    /// head's 16 numbers (whose gradient still reaches the whole encoder).
    State,
}

#[derive(Clone, Debug)]
enum ImageNet {
    ResNet(Box<ResNet18>),
    Conv(SmallConv),
}

/// Images + joint state → feature. For [`EncoderKind::None`] the feature is the state.
#[derive(Clone, Debug)]
pub struct ObsEncoder {
    kind: EncoderKind,
    image_net: Option<ImageNet>,
    joint: Option<Mlp>,
    fuse: Option<Linear>,
    /// Predicts the privileged puck/goal state from the fused feature; its prediction is
    /// appended to the feature (see [`ObsEncoder::with_privileged_head`]).
    privileged_head: Option<Mlp>,
    layout: FeatureLayout,
    out_dim: usize,
}

impl ObsEncoder {
    /// `vb` is the encoder's root (e.g. `encoder` or `target.encoder`).
    /// An encoder for the environment's three cameras.
    pub fn new(kind: EncoderKind, state_dim: usize, image_hw: (usize, usize), vb: VarBuilder) -> Result<Self> {
        Self::with_privileged_head(kind, state_dim, crate::env::NUM_CAMERAS, image_hw, 0, FeatureLayout::Fused, vb)
    }

    /// With `privileged_dim > 0` (image encoders only), a two-layer head on the fused feature
    /// predicts the z-scored privileged state (puck/goal positions and their task-frame
    /// features) and the feature becomes `[fused, prediction]`: the low-dimensional quantities
    /// the state-only model is handed, estimated from the pixels, in front of the networks that
    /// must use them. The prediction is trained by the auxiliary loss (and by the critic's
    /// gradient through it); at acting time it is part of the encoder like any other layer.
    /// `layout` chooses what else the feature holds ([`FeatureLayout`]). The `cameras` RGB images
    /// of `image_hw` are stacked on channels (camera-major).
    pub fn with_privileged_head(
        kind: EncoderKind,
        state_dim: usize,
        cameras: usize,
        image_hw: (usize, usize),
        privileged_dim: usize,
        layout: FeatureLayout,
        vb: VarBuilder,
    ) -> Result<Self> {
        let image_net = match kind {
            EncoderKind::ResNet18 => {
                Some(ImageNet::ResNet(Box::new(ResNet18::new(cameras, FEATURE_DIM, vb.pp("resnet"))?)))
            }
            EncoderKind::Conv => Some(ImageNet::Conv(SmallConv::new(cameras, image_hw, FEATURE_DIM, vb.pp("conv"))?)),
            EncoderKind::None => None,
        };
        if image_net.is_none() {
            return Ok(Self {
                kind,
                image_net,
                joint: None,
                fuse: None,
                privileged_head: None,
                layout: FeatureLayout::Fused,
                out_dim: state_dim,
            });
        }
        let privileged_head = if privileged_dim > 0 {
            Some(Mlp::new(FEATURE_DIM, FEATURE_DIM / 2, 2, privileged_dim, vb.pp("privileged_head"))?)
        } else {
            None
        };
        Ok(Self {
            kind,
            image_net,
            // Two layers with a ReLU after: the joint branch of the fused feature.
            joint: Some(Mlp::new(state_dim, FEATURE_DIM, 2, FEATURE_DIM, vb.pp("joint"))?),
            fuse: Some(candle_nn::linear(2 * FEATURE_DIM, FEATURE_DIM, vb.pp("fuse"))?),
            privileged_head,
            layout,
            out_dim: match layout {
                FeatureLayout::Fused => FEATURE_DIM,
                FeatureLayout::FusedState => FEATURE_DIM + state_dim,
                FeatureLayout::State => state_dim,
            } + privileged_dim,
        })
    }

    pub fn kind(&self) -> EncoderKind {
        self.kind
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Width of the appended privileged-state prediction (0 without a head); it occupies the
    /// last columns of the feature.
    pub fn privileged_dim(&self) -> usize {
        self.privileged_head.as_ref().map_or(0, |head| head.out_dim())
    }

    pub fn layout(&self) -> FeatureLayout {
        self.layout
    }

    /// Name (relative to the encoder root) of the first conv's weight: the var the audit watches.
    pub fn first_conv_name(&self) -> Option<&'static str> {
        match self.kind {
            EncoderKind::ResNet18 => Some("resnet.conv1.weight"),
            EncoderKind::Conv => Some("conv.conv1.weight"),
            EncoderKind::None => None,
        }
    }

    /// The privileged-state prediction inside a feature this encoder produced (its last
    /// `privileged_dim` columns); `None` without a head.
    pub fn privileged_prediction(&self, feature: &Tensor) -> Result<Option<Tensor>> {
        let dim = self.privileged_dim();
        if dim == 0 {
            return Ok(None);
        }
        Ok(Some(feature.narrow(1, feature.dim(1)? - dim, dim)?))
    }

    /// `images`: (B, 9, H, W) in [0, 1] (cameras stacked on channels); `state`: z-scored (B, D).
    /// `train` selects batch statistics in batch norm (and updates the running ones).
    pub fn forward_t(&self, images: Option<&Tensor>, state: &Tensor, train: bool) -> Result<Tensor> {
        let Some(net) = &self.image_net else {
            return Ok(state.clone());
        };
        let images = images.ok_or_else(|| {
            candle_core::Error::Msg(format!("the {:?} encoder needs images but the batch has none", self.kind))
        })?;
        let image_feature = match net {
            ImageNet::ResNet(r) => r.forward_t(images, train)?,
            ImageNet::Conv(c) => c.forward(images)?,
        };
        let joint = self.joint.as_ref().expect("image encoders have a joint branch");
        let fuse = self.fuse.as_ref().expect("image encoders have a fuse layer");
        let joint_feature = joint.forward(state)?.relu()?;
        let fused = fuse.forward(&Tensor::cat(&[image_feature, joint_feature], D::Minus1)?)?;
        let mut parts = match self.layout {
            FeatureLayout::Fused => vec![fused.clone()],
            FeatureLayout::FusedState => vec![fused.clone(), state.clone()],
            FeatureLayout::State => vec![state.clone()],
        };
        if let Some(head) = &self.privileged_head {
            parts.push(head.forward(&fused)?);
        }
        Tensor::cat(&parts, D::Minus1)
    }
}

/// Fills `<prefix>resnet.*` from an ImageNet ResNet18 safetensors file (torchvision names;
/// `fc.*` is ignored). Its 3-channel `conv1.weight` is tiled over the cameras (×3 for the
/// environment's); the batch norm
/// after it normalises the tripled response, so no rescaling is needed. Everything is checked
/// before anything is written. `reference` is a path or a Hub reference `org/name[@rev]:path`.
pub fn load_pretrained_resnet18(varmap: &VarMap, prefix: &str, reference: &str) -> anyhow::Result<usize> {
    let path =
        shared::weights::resolve(reference).with_context(|| format!("resolving pretrained weights {reference}"))?;
    load_pretrained_resnet18_file(varmap, prefix, &path)
}

pub fn load_pretrained_resnet18_file(varmap: &VarMap, prefix: &str, path: &Path) -> anyhow::Result<usize> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let root = format!("{prefix}resnet.");
    let device = data.values().next().map(|v| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
    let file: HashMap<String, Tensor> = shared::weights::read_safetensors(path, &device)?;
    let mut updates = Vec::new();
    let mut problems = Vec::new();
    let mut names: Vec<&String> =
        data.keys().filter(|k| k.starts_with(&root) && !k.starts_with(&format!("{root}proj."))).collect();
    names.sort();
    for name in names {
        let key = &name[root.len()..];
        let var = &data[name];
        let Some(t) = file.get(key) else {
            problems.push(format!("missing '{key}'"));
            continue;
        };
        // The file's first conv is one RGB image's kernel [out, 3, kh, kw]; anything else is
        // reported with the shape the file really has (tiling it first would misstate it, and
        // `cat` would fail on a tensor of another rank with no file or key in the message).
        let t = if key == "conv1.weight" {
            match t.dims() {
                [_, 3, _, _] => Tensor::cat(&vec![t; var.dims()[1].div_ceil(3).max(1)], 1)?,
                other => {
                    problems.push(format!(
                        "'{key}': shape {other:?} in the file, expected one RGB image's kernel [out, 3, kh, kw] \
                         (tiled over the cameras for the model's {:?})",
                        var.dims()
                    ));
                    continue;
                }
            }
        } else {
            t.clone()
        };
        if t.shape() != var.shape() {
            let file_dims = file[key].dims();
            problems.push(format!("'{key}': shape {file_dims:?} in the file, the model expects {:?}", var.dims()));
            continue;
        }
        updates.push((var.clone(), t.to_dtype(var.dtype())?));
    }
    anyhow::ensure!(problems.is_empty(), "{}: not a torchvision ResNet18: {}", path.display(), problems.join("; "));
    for (var, t) in &updates {
        var.set(t)?;
    }
    Ok(updates.len())
}
