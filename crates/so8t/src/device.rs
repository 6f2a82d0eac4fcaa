//! Where a command runs the decoder (`--device`): `cpu` (the default), `cuda` (GPU 0) or
//! `cuda:N`. The one parser of that flag, for every command that takes it.

use crate::error::{Error, Result};
use candle_core::Device;

/// The device `spec` names, opened (a GPU's driver and context come up here, so a missing
/// driver or GPU is said before any model is read).
pub fn open(spec: &str) -> Result<Device> {
    let wrong = || Error::Invalid(format!("--device {spec}: expected cpu, cuda or cuda:N (N: the GPU's index)"));
    let ordinal = match spec.strip_prefix("cuda") {
        _ if spec == "cpu" => return Ok(Device::Cpu),
        Some("") => 0,
        Some(n) => n.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()).ok_or_else(wrong)?,
        None => return Err(wrong()),
    };
    cuda(ordinal, spec)
}

/// How a device is named on the command line (`cpu`, `cuda:N`).
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// What a GPU multiplies f16/bf16 weights in (`--dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dtype {
    /// Their own type, the activations rounded to it for each product (half the memory
    /// and bandwidth; logits within about 1% of the CPU's for bf16).
    #[default]
    Auto,
    /// f32: the weights widened once on the device (twice the memory; the CPU path's
    /// numbers, which widen them too).
    F32,
}

impl Dtype {
    pub fn parse(spec: &str) -> Result<Dtype> {
        match spec {
            "auto" => Ok(Dtype::Auto),
            "f32" => Ok(Dtype::F32),
            _ => Err(Error::Invalid(format!("--dtype {spec}: expected auto or f32"))),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize, spec: &str) -> Result<Device> {
    Device::new_cuda(ordinal)
        .map_err(|e| Error::Invalid(format!("--device {spec}: cannot open the GPU: {}", crate::error::candle_message(&e))))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize, spec: &str) -> Result<Device> {
    Err(Error::Invalid(format!(
        "--device {spec}: this so8t was built without CUDA; build it with `cargo build --release --features cuda` \
         (scripts/cuda-toolchain.sh sets up the compiler)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_parsed_and_bad_ones_said() {
        assert!(open("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda0", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            let e = open(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("--device {bad}: expected cpu, cuda or cuda:N")), "{bad}: {e}");
        }
        assert_eq!(Dtype::parse("auto").unwrap(), Dtype::Auto);
        assert_eq!(Dtype::parse("f32").unwrap(), Dtype::F32);
        let e = Dtype::parse("bf16").unwrap_err().to_string();
        assert!(e.contains("--dtype bf16: expected auto or f32"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        for spec in ["cuda", "cuda:1"] {
            let e = open(spec).unwrap_err().to_string();
            assert!(e.contains(&format!("--device {spec}: this so8t was built without CUDA")), "{e}");
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
