//! PyTorch's default initialisation of `nn.Linear`, `nn.Conv2d` and `nn.ConvTranspose2d`, which
//! the reference implementations keep for most of their layers (taming-transformers' and
//! latent-diffusion's CNN, lucidrains' projections): weight `kaiming_uniform_(a = √5)`, i.e.
//! U(−b, b) with `b = gain·√(3 / fan_in) = 1/√fan_in` (gain `√(2 / (1 + a²)) = 1/√3`), and bias
//! U(−1/√fan_in, 1/√fan_in), `fan_in` = input channels × kernel area (for a transposed
//! convolution, whose weight is `(in, out, k, k)`, PyTorch's fan-in is `out · k²`).
//!
//! tch's own defaults differ: kaiming-uniform with gain √2 (`b = √(6 / fan_in)`, √6 times wider)
//! and zero convolution biases.

use tch::nn::{self, Init, init::FanInOut, init::NonLinearity, init::NormalOrUniform};

/// `kaiming_uniform_(a = √5)`: U(±1/√fan_in), fan-in from the weight's shape as PyTorch computes it.
pub const TORCH_DEFAULT_WEIGHT: Init = Init::Kaiming {
    dist: NormalOrUniform::Uniform,
    fan: FanInOut::FanIn,
    non_linearity: NonLinearity::ExplicitGain(0.577_350_269_189_625_8),
};

/// The bias of a layer with fan-in `fan_in`: U(±1/√fan_in).
pub fn torch_default_bias(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// `nn.Linear`'s default configuration.
pub fn torch_linear() -> nn::LinearConfig {
    nn::LinearConfig {
        ws_init: TORCH_DEFAULT_WEIGHT,
        // tch draws a missing bias init as U(±1/√in), PyTorch's rule.
        bs_init: None,
        bias: true,
    }
}

/// `nn.Conv2d(cin, ·, k, stride, padding)`'s default configuration.
pub fn torch_conv(cin: usize, k: usize, stride: i64, padding: i64) -> nn::ConvConfig {
    nn::ConvConfig {
        stride,
        padding,
        ws_init: TORCH_DEFAULT_WEIGHT,
        bs_init: torch_default_bias(cin * k * k),
        ..Default::default()
    }
}

/// `nn.ConvTranspose2d(·, cout, k, stride)`'s default configuration (fan-in `cout · k²`).
pub fn torch_conv_transpose(cout: usize, k: usize, stride: i64) -> nn::ConvTransposeConfig {
    nn::ConvTransposeConfig {
        stride,
        ws_init: TORCH_DEFAULT_WEIGHT,
        bs_init: torch_default_bias(cout * k * k),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn bound_and_std(t: &tch::Tensor) -> (f64, f64) {
        let t = t.to_kind(Kind::Double);
        (
            f64::try_from(t.abs().max()).unwrap(),
            f64::try_from(t.std(true)).unwrap(),
        )
    }

    /// Bounds and standard deviations against U(±1/√fan_in) (std b/√3) for a convolution, a
    /// linear layer and a transposed convolution, and the bias bounds.
    #[test]
    fn layers_draw_pytorchs_default_distributions() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let conv = nn::conv2d(vs.root() / "c", 64, 128, 3, torch_conv(64, 3, 1, 1));
        let lin = nn::linear(vs.root() / "l", 512, 256, torch_linear());
        let tconv =
            nn::conv_transpose2d(vs.root() / "t", 256, 32, 4, torch_conv_transpose(32, 4, 4));
        for (what, w, bias, fan_in) in [
            ("conv", &conv.ws, conv.bs.as_ref().unwrap(), 64 * 9),
            ("linear", &lin.ws, lin.bs.as_ref().unwrap(), 512),
            ("transposed", &tconv.ws, tconv.bs.as_ref().unwrap(), 32 * 16),
        ] {
            let b = 1.0 / (fan_in as f64).sqrt();
            let (max, std) = bound_and_std(w);
            assert!(
                max <= b * (1.0 + 1e-6) && max > 0.99 * b,
                "{what}: {max} vs {b}"
            );
            assert!(
                (std * 3f64.sqrt() / b - 1.0).abs() < 0.03,
                "{what}: std {std}"
            );
            let (bmax, _) = bound_and_std(bias);
            assert!(
                bmax <= b * (1.0 + 1e-6) && bmax > 0.5 * b,
                "{what} bias: {bmax}"
            );
        }
    }
}
