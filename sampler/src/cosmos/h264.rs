//! H.264 video in MP4 files, read (`sampler cosmos --video clip.mp4`) and written (`video.mp4`),
//! without system libraries: Cisco's OpenH264 built from the C++ source the `openh264` crate
//! bundles, and the pure-Rust `mp4` crate for the container.
//!
//! MP4 keeps H.264 as "AVCC": each sample is a run of NAL units, each preceded by its length
//! (1, 2 or 4 bytes, as the track's `avcC` box says), and the parameter sets (SPS/PPS) live in
//! `avcC`, not in the stream. OpenH264 reads and writes "Annex B": NAL units after start codes
//! `00 00 00 01`, parameter sets in-stream. The two functions here convert between them.
//!
//! What OpenH264 decodes: H.264 Constrained Baseline fully; Main/High streams as far as its
//! decoder goes (CABAC yes, interlacing no). Anything else gives an error that says how to turn
//! the clip into a folder of frames with ffmpeg.

use std::io::{BufReader, Cursor};
use std::path::Path;

use anyhow::{bail, Context};
use image::RgbImage;
use openh264::decoder::{Decoder, DecoderConfig, Flush};
use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, FrameType, QpRange, RateControlMode};
use openh264::formats::{RgbSliceU8, YUVBuffer, YUVSource};

/// How to get frames out of a clip OpenH264 cannot read.
pub fn ffmpeg_hint(path: &Path) -> String {
    format!(
        "convert it to a folder of frames and pass that folder: mkdir frames && ffmpeg -i {} frames/%05d.png",
        path.display()
    )
}

/// The coarsest quantiser the encoder may use (rate control off: no bitrate target, so OpenH264
/// neither skips frames nor warns that it cannot meet one). Measured on a 48×32 test pattern:
/// 28.9 dB PSNR at QP ≤ 22 against 29.3 dB in OpenH264's quality mode (which prints a warning
/// for every file without frame skipping): the loss is 4:2:0 chroma, not quantisation.
const MAX_QP: u8 = 22;

/// AVCC → Annex B: every length-prefixed NAL unit of `sample` behind a 4-byte start code.
fn avcc_to_annexb(sample: &[u8], length_size: usize, out: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut rest = sample;
    while !rest.is_empty() {
        anyhow::ensure!(rest.len() >= length_size, "a NAL length field is cut off");
        let len = rest[..length_size].iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        rest = &rest[length_size..];
        anyhow::ensure!(len <= rest.len(), "a NAL unit claims {len} bytes, {} remain", rest.len());
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(&rest[..len]);
        rest = &rest[len..];
    }
    Ok(())
}

/// Decodes the H.264 video track of an MP4 file into RGB frames (display order), keeping only
/// the last `keep_last` frames when given (the rest are decoded — H.264 frames depend on earlier
/// ones — but not kept).
pub fn decode_mp4(path: &Path, keep_last: Option<usize>) -> anyhow::Result<Vec<RgbImage>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut reader = mp4::Mp4Reader::read_header(BufReader::new(file), size)
        .with_context(|| format!("{}: not a readable MP4 file", path.display()))?;
    let mut video_tracks: Vec<(u32, String)> = reader
        .tracks()
        .values()
        .filter(|t| matches!(t.track_type(), Ok(mp4::TrackType::Video)))
        .map(|t| (t.track_id(), t.box_type().map(|b| b.to_string()).unwrap_or_else(|_| "unknown".into())))
        .collect();
    video_tracks.sort();
    let Some((track_id, _)) = video_tracks.iter().find(|(_, codec)| codec == "avc1").cloned() else {
        let found: Vec<&str> = video_tracks.iter().map(|(_, c)| c.as_str()).collect();
        bail!(
            "{}: no H.264 (avc1) video track (video tracks: {}); only H.264 is decoded here — {}",
            path.display(),
            if found.is_empty() { "none".to_string() } else { found.join(", ") },
            ffmpeg_hint(path)
        );
    };
    let track = &reader.tracks()[&track_id];
    let avcc = &track.trak.mdia.minf.stbl.stsd.avc1.as_ref().context("avc1 box")?.avcc;
    let length_size = usize::from(avcc.length_size_minus_one & 3) + 1;
    let mut parameter_sets = Vec::new();
    for nal in avcc.sequence_parameter_sets.iter().chain(&avcc.picture_parameter_sets) {
        parameter_sets.extend_from_slice(&[0, 0, 0, 1]);
        parameter_sets.extend_from_slice(&nal.bytes);
    }
    let samples = reader.sample_count(track_id)?;
    anyhow::ensure!(samples > 0, "{}: the video track has no frames", path.display());

    // No flush after each packet: a B-frame stream needs the decoder's reordering buffer (frames
    // come out in display order, the last ones at `flush_remaining`). Flushing every packet, the
    // crate's default, put out pictures before their references were complete (measured on the
    // ffmpeg fixture: 21 dB on the B-frames instead of 48 dB).
    let config = DecoderConfig::new().flush_after_decode(Flush::NoFlush);
    let mut decoder = Decoder::with_api_config(openh264::OpenH264API::from_source(), config)
        .context("starting the OpenH264 decoder")?;
    let keep = keep_last.unwrap_or(usize::MAX).max(1);
    let mut frames = std::collections::VecDeque::new();
    let mut push = |frame: RgbImage| {
        if frames.len() == keep {
            frames.pop_front();
        }
        frames.push_back(frame);
    };
    let to_rgb = |yuv: &openh264::decoder::DecodedYUV| -> anyhow::Result<RgbImage> {
        let (w, h) = yuv.dimensions();
        let mut rgb = vec![0u8; w * h * 3];
        yuv.write_rgb8(&mut rgb);
        RgbImage::from_raw(w as u32, h as u32, rgb).context("frame buffer")
    };
    let mut packet = Vec::new();
    for sample_id in 1..=samples {
        let Some(sample) = reader
            .read_sample(track_id, sample_id)
            .with_context(|| format!("{}: reading sample {sample_id}", path.display()))?
        else {
            continue;
        };
        packet.clear();
        // Parameter sets before every sync sample, so a stream that changes them still decodes.
        if sample_id == 1 || sample.is_sync {
            packet.extend_from_slice(&parameter_sets);
        }
        avcc_to_annexb(&sample.bytes, length_size, &mut packet)
            .with_context(|| format!("{}: sample {sample_id} is malformed", path.display()))?;
        match decoder.decode(&packet) {
            Ok(Some(yuv)) => push(to_rgb(&yuv)?),
            Ok(None) => {}
            Err(e) => bail!(
                "{}: OpenH264 could not decode frame {sample_id} ({e}); the stream may use H.264 features it lacks — {}",
                path.display(),
                ffmpeg_hint(path)
            ),
        }
    }
    for yuv in decoder.flush_remaining().with_context(|| format!("{}: flushing the decoder", path.display()))? {
        push(to_rgb(&yuv)?);
    }
    anyhow::ensure!(!frames.is_empty(), "{}: no frame could be decoded — {}", path.display(), ffmpeg_hint(path));
    Ok(frames.into())
}

/// The NAL units of an Annex B stream without their start codes.
fn annexb_units(stream: &[u8]) -> Vec<&[u8]> {
    openh264::nal_units(stream)
        .map(|unit| {
            let skip = unit.iter().take_while(|&&b| b == 0).count() + 1;
            &unit[skip.min(unit.len())..]
        })
        .filter(|u| !u.is_empty())
        .collect()
}

/// Encodes frames (all the same size, even width and height) as H.264 Constrained Baseline
/// (OpenH264, quantiser ≤ [`MAX_QP`], no skipped frames, one key frame at the start) in an MP4
/// container at `fps`. Returns the file's bytes.
pub fn encode_mp4(frames: &[RgbImage], fps: f64) -> anyhow::Result<Vec<u8>> {
    let first = frames.first().context("no frames to encode")?;
    let (w, h) = first.dimensions();
    anyhow::ensure!(frames.iter().all(|f| f.dimensions() == (w, h)), "frames of different sizes");
    anyhow::ensure!(w % 2 == 0 && h % 2 == 0 && w >= 16 && h >= 16, "H.264 needs even sizes ≥ 16, got {w}×{h}");
    anyhow::ensure!(w <= u16::MAX as u32 && h <= u16::MAX as u32, "{w}×{h} is too large for MP4");
    anyhow::ensure!(fps.is_finite() && fps > 0.0, "fps must be positive, got {fps}");
    // A nominal bitrate (rate control is off; OpenH264 still reads it for its level choice):
    // 0.25 bits per pixel per frame, at most 50 Mb/s (H.264 level 5.1).
    let bitrate = ((w as f64 * h as f64 * fps * 0.25).clamp(500_000.0, 50_000_000.0)) as u32;
    let config = EncoderConfig::new()
        .skip_frames(false)
        .rate_control_mode(RateControlMode::Off)
        .bitrate(BitRate::from_bps(bitrate))
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .qp(QpRange::new(0, MAX_QP));
    let mut encoder = Encoder::with_api_config(openh264::OpenH264API::from_source(), config)
        .context("starting the OpenH264 encoder")?;

    // The 90 kHz clock of MPEG video: 16, 24, 25, 30 fps are whole ticks per frame.
    let timescale = 90_000u32;
    let duration = ((f64::from(timescale) / fps).round() as u32).max(1);
    let (mut sps, mut pps) = (None, None);
    let mut samples: Vec<(Vec<u8>, bool)> = Vec::with_capacity(frames.len());
    for (i, frame) in frames.iter().enumerate() {
        let yuv = YUVBuffer::from_rgb8_source(RgbSliceU8::new(frame.as_raw(), (w as usize, h as usize)));
        debug_assert_eq!(yuv.dimensions(), (w as usize, h as usize));
        let stream = encoder.encode(&yuv).with_context(|| format!("encoding frame {i}"))?;
        let is_sync = matches!(stream.frame_type(), FrameType::IDR | FrameType::I);
        let bytes = stream.to_vec();
        let mut sample = Vec::with_capacity(bytes.len());
        for unit in annexb_units(&bytes) {
            match unit[0] & 0x1f {
                7 => sps = sps.or_else(|| Some(unit.to_vec())),
                8 => pps = pps.or_else(|| Some(unit.to_vec())),
                _ => {
                    sample.extend_from_slice(&(unit.len() as u32).to_be_bytes());
                    sample.extend_from_slice(unit);
                }
            }
        }
        anyhow::ensure!(!sample.is_empty(), "the encoder produced no picture for frame {i}");
        samples.push((sample, is_sync));
    }
    let (sps, pps) = (sps.context("the encoder wrote no SPS")?, pps.context("the encoder wrote no PPS")?);

    let mp4_config = mp4::Mp4Config {
        major_brand: str::parse("isom").context("brand")?,
        minor_version: 512,
        compatible_brands: ["isom", "iso2", "avc1", "mp41"]
            .iter()
            .map(|b| str::parse(b))
            .collect::<Result<_, _>>()
            .context("brands")?,
        timescale,
    };
    let mut writer = mp4::Mp4Writer::write_start(Cursor::new(Vec::new()), &mp4_config)?;
    writer.add_track(&mp4::TrackConfig {
        track_type: mp4::TrackType::Video,
        timescale,
        language: "und".into(),
        media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
            width: w as u16,
            height: h as u16,
            seq_param_set: sps,
            pic_param_set: pps,
        }),
    })?;
    for (i, (bytes, is_sync)) in samples.into_iter().enumerate() {
        let sample = mp4::Mp4Sample {
            start_time: i as u64 * u64::from(duration),
            duration,
            rendering_offset: 0,
            is_sync,
            bytes: bytes.into(),
        };
        writer.write_sample(1, &sample)?;
    }
    writer.write_end()?;
    Ok(writer.into_writer().into_inner())
}
