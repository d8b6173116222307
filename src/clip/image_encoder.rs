//! Which device encodes images: candle on the CPU, or the WGSL vision tower ([`crate::gpu::clip_vision`]) on
//! a GPU. Text always stays on the CPU.
//!
//! `auto` takes the GPU only when wgpu finds a hardware adapter: a software rasteriser (lavapipe, llvmpipe,
//! WARP) computes the same features far slower than candle on the same cores. `gpu` takes whatever adapter
//! wgpu offers, software ones included (that is how the GPU encoder is tested on machines without a GPU).

use std::fmt;
use std::str::FromStr;

use super::{ClipError, ClipModel, ImageTensor};
use crate::gpu::clip_vision::ClipVisionGpu;
use crate::gpu::{GpuContext, GpuOptions};
use crate::linalg::Mat;

/// What a person asks for (`--clip-device`, the GUI's setting).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ClipDevice {
    /// The GPU when a hardware adapter is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The GPU, whichever adapter wgpu finds (a software one too); failing to open it is an error.
    Gpu,
}

impl ClipDevice {
    pub const ALL: [ClipDevice; 3] = [ClipDevice::Auto, ClipDevice::Cpu, ClipDevice::Gpu];

    pub fn name(self) -> &'static str {
        match self {
            ClipDevice::Auto => "auto",
            ClipDevice::Cpu => "cpu",
            ClipDevice::Gpu => "gpu",
        }
    }
}

impl fmt::Display for ClipDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ClipDevice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ClipDevice::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown CLIP device {s:?}: use auto, cpu or gpu"))
    }
}

/// The image encoder chosen for one model.
#[derive(Debug)]
pub enum ImageEncoder {
    /// candle, through the model's own [`ClipModel::encode_images`].
    Cpu,
    Gpu(Box<ClipVisionGpu>),
}

/// An [`ImageEncoder`] and, when `auto` fell back to the CPU or chose the GPU, a line saying why.
#[derive(Debug)]
pub struct Selected {
    pub encoder: ImageEncoder,
    pub note: Option<String>,
}

impl ImageEncoder {
    /// Picks the encoder for `model` as `device` asks. Only `gpu` fails when no GPU can be used; `auto`
    /// falls back to the CPU and says why in the note.
    pub fn select(model: &ClipModel, device: ClipDevice) -> Result<Selected, ClipError> {
        let opts = GpuOptions::default();
        match device {
            ClipDevice::Cpu => Ok(Selected {
                encoder: ImageEncoder::Cpu,
                note: None,
            }),
            ClipDevice::Gpu => {
                let ctx = GpuContext::new_headless(&opts)?;
                let gpu = ClipVisionGpu::load(&ctx, &model.info().dir)?;
                let note = Some(format!("CLIP images on the GPU: {}", ctx.describe()));
                Ok(Selected {
                    encoder: ImageEncoder::Gpu(Box::new(gpu)),
                    note,
                })
            }
            ClipDevice::Auto => {
                let cpu = |why: String| Selected {
                    encoder: ImageEncoder::Cpu,
                    note: Some(format!("CLIP images on the CPU: {why}")),
                };
                // The adapter's type decides; a device is opened only when it will be used.
                let info = match GpuContext::probe_headless(&opts) {
                    Ok(info) => info,
                    Err(e) => return Ok(cpu(format!("no GPU ({e})"))),
                };
                if info.device_type == wgpu::DeviceType::Cpu {
                    return Ok(cpu(format!(
                        "the only GPU adapter, {}, is a software one (choosing gpu forces it)",
                        info.name
                    )));
                }
                let opened = GpuContext::new_headless(&opts)
                    .map_err(ClipError::from)
                    .and_then(|ctx| {
                        let gpu = ClipVisionGpu::load(&ctx, &model.info().dir)?;
                        Ok((ctx.describe(), gpu))
                    });
                match opened {
                    Ok((name, gpu)) => Ok(Selected {
                        encoder: ImageEncoder::Gpu(Box::new(gpu)),
                        note: Some(format!("CLIP images on the GPU: {name}")),
                    }),
                    Err(e) => Ok(cpu(format!(
                        "the GPU {} could not be used ({e})",
                        info.name
                    ))),
                }
            }
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, ImageEncoder::Gpu(_))
    }

    /// One L2-normalised row per image, from `model` (the CPU) or the GPU tower loaded from the same files.
    pub fn encode_images(
        &self,
        model: &ClipModel,
        images: &[ImageTensor],
    ) -> Result<Mat, ClipError> {
        match self {
            ImageEncoder::Cpu => model.encode_images(images),
            ImageEncoder::Gpu(g) => g.encode_images(images),
        }
    }

    /// "CPU (candle)" or the adapter's description, for logs and the GUI.
    pub fn describe(&self) -> String {
        match self {
            ImageEncoder::Cpu => "CPU (candle)".to_string(),
            ImageEncoder::Gpu(g) => format!("GPU: {}", g.context().describe()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_round_trip() {
        for d in ClipDevice::ALL {
            assert_eq!(d.name().parse::<ClipDevice>(), Ok(d));
        }
        assert_eq!(" GPU ".parse::<ClipDevice>(), Ok(ClipDevice::Gpu));
        assert!("cuda".parse::<ClipDevice>().unwrap_err().contains("cuda"));
    }
}
