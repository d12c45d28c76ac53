"""8-bit optimizer moments: :class:`AdamW8bit`, torch's AdamW with its two moments stored in 8 bits.

Each moment tensor of ``min_size`` entries or more is kept as float8 (e4m3) values times one fp32 scale per
block of ``block_size`` entries (the block's max |x| / 448, e4m3's largest value): 1 + 4/block bytes per
entry instead of 4. Why these choices:

- float8 e4m3 rather than int8 codes: a cast, no lookup table, and a relative precision (3 mantissa bits)
  that does not depend on how far an entry is below its block's largest one, down to 2^-9 of it.
- the second moment is stored as √v: half the dynamic range to cover in 8 bits.
- stochastic rounding (unbiased): with round-to-nearest, v·β2 (a 0.1 % change per step) rounds back to the
  same e4m3 value (6 % half-step) and second moments would never decay. Rounding draws come from a
  generator seeded by (seed, step, parameter index), so runs are reproducible and resume bit-exactly
  without saving generator state.
- a non-zero √v never rounds to 0 (it becomes the smallest e4m3 step of its block): a zero denominator
  would turn a tiny first moment into an update of lr·m/eps.

Smaller tensors (biases, norms) keep fp32 moments and step exactly like ``torch.optim.AdamW(foreach=False)``.
As the inner optimizer of :class:`gems.GemsOptimizer` it stores the subspace moments in 8 bits; its state
has no coordinate-shaped moments to rotate, so ``state_transfer="rotate"`` is refused (``keep`` and
``reset`` work). Measured in the recipe: ``benches/results/unified_sr_cpu_gems_8bit.md`` against
``unified_sr_cpu.md``; ``tests/test_lowbit.py`` for exactness, decay and state bytes."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["AdamW8bit", "quantize_blockwise", "dequantize_blockwise"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_SUB = 2.0 ** -6   # smallest normal e4m3 value; below it the step is fixed
_STEP = 2.0 ** -9  # e4m3's smallest subnormal (the step below 2^-6)
_DROP = 20         # fp32 mantissa bits that e4m3 does not keep (23 - 3)
QUANTIZED = ("exp_avg_fp8", "exp_avg_sqrt_fp8")


def _round_e4m3(x: Tensor, gen: torch.Generator) -> Tensor:
    """Stochastic rounding of fp32 values with |x| ≤ 448 to e4m3: each value goes to one of its two
    neighbours, the nearer one more often, so that the expectation is x."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << _DROP, x.shape, generator=gen, dtype=torch.int32, device=x.device)
    # fp32 is sign-magnitude: adding random low bits and truncating them rounds the magnitude up with
    # probability equal to the dropped fraction, for either sign
    normal = ((bits + noise) & ~((1 << _DROP) - 1)).view(torch.float32)
    u = torch.rand(x.shape, generator=gen, device=x.device)
    small = torch.floor(x.abs() / _STEP + u) * _STEP * x.sign()
    return torch.where(x.abs() < _SUB, small, normal).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_blockwise(x: Tensor, block_size: int, gen: torch.Generator, *, keep_nonzero: bool = False
                       ) -> tuple[Tensor, Tensor]:
    """fp32 ``x`` → (e4m3 values of shape (blocks, block_size), fp32 scales of shape (blocks, 1)); the tail
    block is zero-padded. ``keep_nonzero``: a non-zero entry never becomes 0 (see the module docstring)."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)
    scale = blocks.abs().amax(dim=1, keepdim=True) / FP8_MAX
    scaled = blocks / scale.clamp_min(torch.finfo(torch.float32).tiny)
    q = _round_e4m3(scaled, gen)
    if keep_nonzero:
        floor = torch.full_like(scaled, _STEP).copysign(scaled)
        q = torch.where((q.float() == 0) & (scaled != 0), floor.to(FP8), q)
    return q, scale


def dequantize_blockwise(q: Tensor, scale: Tensor, like: Tensor) -> Tensor:
    """The fp32 tensor of ``like``'s shape that (q, scale) stores."""
    return (q.float() * scale).reshape(-1)[: like.numel()].view(like.shape)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's update formula) with 8-bit moments; see the module docstring.

    ``block_size``: entries per fp32 scale (≥ 16). ``min_size``: tensors with fewer entries keep fp32
    moments. ``seed``: the stochastic rounding's seed. Real, dense, floating-point parameters only."""

    rotatable_state = False  # gems: no coordinate-shaped moments (state_transfer="rotate" is refused)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, block_size: int = 256, min_size: int = 4096,
                 seed: int = 0):
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW8bit hyper-parameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if int(block_size) != block_size or block_size < 16 or int(min_size) != min_size or min_size < 0:
            raise ValueError(f"block_size must be an integer >= 16 and min_size >= 0, got {block_size}, {min_size}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.block_size, self.min_size, self.seed = int(block_size), int(min_size), int(seed)

    def _generator(self, p: Tensor, index: int, step: int) -> torch.Generator:
        gen = torch.Generator(device=p.device)
        gen.manual_seed((self.seed * 1_000_003 + step) * 1_000_033 + index)
        return gen

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse or g.is_complex() or not p.is_floating_point():
                    raise TypeError("AdamW8bit takes real, dense, floating-point parameters and gradients")
                g = g.float()
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    if p.numel() >= self.min_size:
                        blocks = math.ceil(p.numel() / self.block_size)
                        for key in QUANTIZED:
                            st[key] = torch.zeros(blocks, self.block_size, dtype=FP8, device=p.device)
                            st[key.replace("_fp8", "_scale")] = torch.zeros(blocks, 1, device=p.device)
                    else:
                        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                t = int(st["step"].item())
                quantized = "exp_avg_fp8" in st
                if quantized:
                    m = dequantize_blockwise(st["exp_avg_fp8"], st["exp_avg_scale"], p)
                    v = dequantize_blockwise(st["exp_avg_sqrt_fp8"], st["exp_avg_sqrt_scale"], p).square_()
                else:
                    m, v = st["exp_avg"], st["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                m.lerp_(g.to(m.dtype), 1 - beta1)
                v.mul_(beta2).addcmul_(g.to(v.dtype), g.to(v.dtype), value=1 - beta2)
                step_size = lr / (1 - beta1 ** t)
                root = v.sqrt()
                denom = (root / (1 - beta2 ** t) ** 0.5).add_(eps)  # torch AdamW's exact order
                if quantized:
                    gen = self._generator(p, index, t)
                    st["exp_avg_fp8"], st["exp_avg_scale"] = quantize_blockwise(m, self.block_size, gen)
                    st["exp_avg_sqrt_fp8"], st["exp_avg_sqrt_scale"] = quantize_blockwise(
                        root, self.block_size, gen, keep_nonzero=True)
                    p.add_((m / denom).to(p.dtype), alpha=-step_size)
                else:
                    p.addcdiv_(m, denom, value=-step_size)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating-point state to the parameter's dtype on load: the stored values are
        # e4m3-exact, so casting back loses nothing and restores the 8-bit footprint
        for st in self.state.values():
            for key in QUANTIZED:
                if key in st:
                    st[key] = st[key].to(FP8)
            for key in ("exp_avg_scale", "exp_avg_sqrt_scale"):
                if key in st:
                    st[key] = st[key].float()

    def state_bytes(self) -> int:
        """Bytes of optimizer state held (moments, scales, step counters)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, Tensor))
