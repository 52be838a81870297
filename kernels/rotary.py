"""Rotary position embeddings: inverse frequencies for the scaling types the
supported families use, a cos/sin table, and the two pair layouts.

Legend: T tokens, H heads, R rotary dims (R/2 frequencies).
"""

import math

import torch


def inv_freq_default(theta: float, dim: int) -> torch.Tensor:
    """(R/2,) float32 inverse frequencies theta^(-2i/R)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_yarn(theta: float, dim: int, factor: float, original_max_pos: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, mscale: float | None = None,
                  mscale_all_dim: float | None = None, attention_factor: float | None = None,
                  truncate: bool = True) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): blend interpolated and extrapolated frequencies with a
    linear ramp over the correction range; returns (inv_freq, cos/sin scale)."""
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_pos / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def inv_freq_llama3(theta: float, dim: int, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_pos: int) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by factor, a smooth
    blend between the low- and high-frequency wavelengths."""
    inv_freq = inv_freq_default(theta, dim)
    low_wavelen = original_max_pos / low_freq_factor
    high_wavelen = original_max_pos / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin_table(inv_freq: torch.Tensor, max_positions: int, scale: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_positions, R/2) float32 cos and sin, times the attention scale."""
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :].float()
    return freqs.cos() * scale, freqs.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split pairs (x_i, x_{i+R/2}). x (T, H, R), cos/sin (T, 1, R/2) in x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def full_width_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, R/2) cos and sin -> the (P, R) tables `apply_rope_full` takes:
    (cos | cos) and (-sin | sin). Built once per model, so a layer's rotation
    is two products and a sum instead of seven ops on halves."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope_full(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with full-width tables (`full_width_tables`): x * cos +
    swap_halves(x) * sin, equal to it bit for bit (x1 c + x2 (-s) rounds
    exactly as x1 c - x2 s). x (T, H, R), cos/sin (T, 1, R) in x's dtype."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Adjacent pairs (x_2i, x_2i+1), as DeepSeek lays out its rotary dims. The
    result is written half-split (evens' rotation first, then odds'): the same
    permutation on queries and keys leaves every dot product unchanged.
    x (T, H, R), cos/sin (T, 1, R/2) in x's dtype."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
