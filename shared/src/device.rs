//! Device selection: `auto | cpu | cuda[:N] | metal`.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// What the user asked for, before it is turned into a Candle [`Device`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA if compiled in and a GPU answers, else Metal likewise, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device '{0}': expected one of auto, cpu, cuda, cuda:N, metal")]
    Unknown(String),
    #[error("device '{asked}' was requested but this binary was built without it: rebuild with `--features {feature}` (e.g. `cargo run --release --features {feature} ...`)")]
    NotCompiled { asked: String, feature: &'static str },
    #[error("device '{asked}' could not be opened: {source}")]
    Open {
        asked: String,
        #[source]
        source: candle_core::Error,
    },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "metal" | "mps" => Ok(Self::Metal),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| DeviceError::Unknown(s.to_string())),
                None => Err(DeviceError::Unknown(s.to_string())),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. `Auto` never fails: it falls back to the CPU.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                if candle_core::utils::metal_is_available() {
                    if let Ok(d) = Device::new_metal(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(DeviceError::NotCompiled { asked: self.to_string(), feature: "cuda" });
                }
                Device::new_cuda(n).map_err(|source| DeviceError::Open { asked: self.to_string(), source })
            }
            Self::Metal => {
                if !candle_core::utils::metal_is_available() {
                    return Err(DeviceError::NotCompiled { asked: self.to_string(), feature: "metal" });
                }
                Device::new_metal(0).map_err(|source| DeviceError::Open { asked: self.to_string(), source })
            }
        }
    }
}

/// Parses and opens a device in one go (`"auto"`, `"cpu"`, `"cuda:1"`, …).
pub fn parse_device(spec: &str) -> Result<Device, DeviceError> {
    spec.parse::<DeviceSpec>()?.open()
}

/// The environment variable [`test_device`] reads.
pub const TEST_DEVICE_ENV: &str = "WORLDGRAD_TEST_DEVICE";

/// The device the parity and gradient tests run on: `WORLDGRAD_TEST_DEVICE` (`auto`, `cpu`,
/// `cuda[:N]`, `metal`, as [`DeviceSpec`] parses them), the CPU when it is unset, so a plain
/// `cargo test` is unchanged. `scripts/gpu-check.sh` sets it to `cuda` on a GPU machine.
///
/// Opened once per process and shared by every caller: Candle refuses to combine tensors of two
/// CUDA devices opened separately (each `Device::new_cuda` is a new device id), so tests that
/// build their inputs and models through several calls must all get this same device.
///
/// Test-only configuration, so it panics (with the variable, its value and the reason) when the
/// value is not a device name or the device cannot be opened — not compiled in, or no GPU. A run
/// asked to test on a GPU must never pass on the CPU without saying so. Binaries take `--device`
/// and report such errors without panicking ([`parse_device`]).
pub fn test_device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let value = std::env::var(TEST_DEVICE_ENV).ok();
            open_test_device(value.as_deref()).unwrap_or_else(|e| panic!("{e}"))
        })
        .clone()
}

/// [`test_device`]'s parsing and opening, for a given value of the variable (`None`: unset).
fn open_test_device(value: Option<&str>) -> Result<Device, String> {
    let Some(value) = value else { return Ok(Device::Cpu) };
    let context = |e: DeviceError| format!("{TEST_DEVICE_ENV}={value:?}: {e}");
    value.parse::<DeviceSpec>().map_err(context)?.open().map_err(context)
}

/// A short human name for logs: `cpu`, `cuda:0`, `metal`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Bytes a run on `device` could still allocate: the CUDA driver's free device memory, or the
/// kernel's `MemAvailable` for the CPU (Linux); `None` where neither can be read (Metal, other
/// systems). Memory plans compare against it before any work starts.
pub fn free_memory_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => cpu_available_bytes(),
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda.cuda_stream().context().mem_get_info().ok().map(|(free, _total)| free as u64),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

fn cpu_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&meminfo)
}

/// `MemAvailable:  123456 kB` → bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       16384000 kB\nMemFree:  1000 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(parse_mem_available(text), Some(8192000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: x kB\n"), None);
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(free_memory_bytes(&Device::Cpu).is_some_and(|b| b > 0));
        }
    }

    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal);
        for bad in ["tpu", "cuda:x", "cuda:", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("expected one of"), "{bad}: {err}");
        }
    }

    #[test]
    fn auto_and_cpu_open() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let auto = parse_device("auto").unwrap();
        if !candle_core::utils::cuda_is_available() && !candle_core::utils::metal_is_available() {
            assert!(auto.is_cpu());
        }
    }

    #[test]
    fn test_device_defaults_to_the_cpu_and_names_a_bad_value() {
        assert!(open_test_device(None).unwrap().is_cpu());
        assert!(open_test_device(Some("cpu")).unwrap().is_cpu());
        let err = open_test_device(Some("tpu")).unwrap_err();
        assert!(err.contains("WORLDGRAD_TEST_DEVICE=\"tpu\"") && err.contains("expected one of"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            let err = open_test_device(Some("cuda")).unwrap_err();
            assert!(err.contains("WORLDGRAD_TEST_DEVICE") && err.contains("--features cuda"), "{err}");
        }
        // Every call is the same device (one CUDA context for a whole test process).
        assert!(test_device().same_device(&test_device()));
    }

    #[test]
    fn missing_backend_names_the_feature() {
        if !candle_core::utils::cuda_is_available() {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
        if !candle_core::utils::metal_is_available() {
            let err = parse_device("metal").unwrap_err().to_string();
            assert!(err.contains("--features metal"), "{err}");
        }
    }
}
