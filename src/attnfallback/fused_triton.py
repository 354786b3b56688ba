"""The Triton kernels behind fused_ops.py: each does in one pass over memory what transformers'
eager code does in several, rounding to the half type where it rounds.

Imported only by fused_ops.py (`triton_kernels`, the background compile), after Triton was found:
it needs Triton at import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOGPROB_BLOCK = 4096  # vocabulary entries a program reads per step
MAX_NORM_WIDTH = 16384  # a row of the norm is held whole by one program
ELEMENTWISE_BLOCK = 2048


# Sizes and strides keep Triton's specialization (by divisibility by 16: aligned rows load in wide
# vectors, 1.4x in session 15's run); `warm` compiles the variants a model will use, ahead of its load.
@triton.jit
def _token_logprobs_kernel(logits, targets, out, n_cols, row_stride, BLOCK: tl.constexpr):
    # log p(target) = logit[target] - logsumexp(logits), in float32, one pass (an online logsumexp:
    # each lane keeps its running maximum and the sum of exponentials below it)
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * row_stride
    offsets = tl.arange(0, BLOCK)
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a lane with nothing yet: no inf - inf
        run_sum = run_sum * tl.exp(run_max - shift) + tl.exp(x - shift)
        run_max = new_max
    top = tl.max(run_max, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(run_sum * tl.exp(run_max - shift), 0)
    target = tl.load(targets + row)
    picked = tl.load(base + target).to(tl.float32)
    tl.store(out + row, picked - (tl.log(total) + shift))


@triton.jit(do_not_specialize=["eps"])
def _rms_norm_kernel(x, weight, out, n_cols, x_stride, out_stride, eps, BLOCK: tl.constexpr):
    # transformers' RMSNorm: float32 variance, the normalized row rounded to the input's dtype, then
    # the weight's product rounded to the output's dtype (the dtype the module's own code returns)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    values = tl.load(x + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(values * values, 0) / n_cols
    normed = (values * tl.rsqrt(variance + eps)).to(x.dtype.element_ty).to(tl.float32)
    w = tl.load(weight + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * out_stride + cols, (w * normed).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(gate, up, out, n, BLOCK: tl.constexpr):
    # SiLU(gate) rounded to the dtype, times up, rounded again: the two kernels of `act(gate) * up`
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(gate + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up + offsets, mask=mask, other=0.0).to(tl.float32)
    activated = (g / (1.0 + tl.exp(-g))).to(gate.dtype.element_ty).to(tl.float32)
    tl.store(out + offsets, (activated * u).to(out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seq_len", "heads"])
def _rotary_kernel(x, cos, sin, out, seq_len, heads, x_b, x_h, x_l, out_b, out_h, out_l, cs_b, cs_l, DIM: tl.constexpr):
    # transformers' `x * cos + rotate_half(x) * sin`, each product rounded to x's dtype, then the sum:
    # one program a (batch, position), its heads in turn, the cos and sin row read once (the head
    # count is not a compile-time size: a query's and a key's heads share one compiled variant)
    position = tl.program_id(0).to(tl.int64)
    b, l = position // seq_len, position % seq_len
    d = tl.arange(0, DIM)
    half = DIM // 2
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    c = tl.load(cos + b * cs_b + l * cs_l + d).to(tl.float32)
    s = tl.load(sin + b * cs_b + l * cs_l + d).to(tl.float32)
    kind = x.dtype.element_ty
    for h in range(0, heads):
        row = x + b * x_b + l * x_l + h * x_h
        values = tl.load(row + d).to(tl.float32)
        rotated = tl.load(row + partner).to(tl.float32) * sign
        y = (values * c).to(kind).to(tl.float32) + (rotated * s).to(kind).to(tl.float32)
        tl.store(out + b * out_b + l * out_l + h * out_h + d, y.to(out.dtype.element_ty))


class TritonKernels:
    """The fused operations on CUDA tensors (see fused_ops.TorchKernels for their meaning)."""

    name = "triton"

    def token_logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, cols = logits.shape
        logits, targets = (logits if logits.stride(1) == 1 else logits.contiguous()), targets.contiguous()
        # targets are token ids the scorer checked against the model's vocabulary (scoring/limits.py)
        out = torch.empty(rows, dtype=torch.float32, device=logits.device)
        if rows:
            _token_logprobs_kernel[(rows,)](logits, targets, out, cols, logits.stride(0), BLOCK=LOGPROB_BLOCK, num_warps=8)
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        flat = x.reshape(-1, width)
        out = torch.empty(flat.shape, dtype=torch.result_type(weight, x), device=x.device)
        block = triton.next_power_of_2(width)
        if flat.shape[0]:
            _rms_norm_kernel[(flat.shape[0],)](flat, weight, out, width, flat.stride(0), out.stride(0), float(eps), BLOCK=block,
                                              num_warps=min(16, max(1, block // 256)))
        return out.view(x.shape)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(gate, dtype=torch.result_type(gate, up))
        n = gate.numel()
        if n:
            _silu_mul_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](gate, up, out, n, BLOCK=ELEMENTWISE_BLOCK, num_warps=8)
        return out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp_fusion: bool = False) -> torch.Tensor:
        """x (batch, heads, length, dim) rotated by cos, sin (batch or 1, length, dim): `handles_rotary`'s inputs.
        `fp_fusion` off: with it, the compiler may fold a product and the sum into one half-precision
        multiply-add, one rounding where transformers has two (a quarter of the outputs one step apart)."""
        batch, heads, length, dim = x.shape
        out = torch.empty_like(x)  # the strides of x (a transposed view stays one)
        broadcast = cos.shape[0] == 1
        if x.numel():
            _rotary_kernel[(batch * length,)](x, cos, sin, out, length, heads, x.stride(0), x.stride(1), x.stride(2), out.stride(0),
                                              out.stride(1), out.stride(2), 0 if broadcast else cos.stride(0), cos.stride(1),
                                              DIM=dim, num_warps=1 if dim <= 64 else 2, enable_fp_fusion=fp_fusion)
        return out

    def handles_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Whether `rotary` takes these: CUDA, (B, H, L, D) with D a power of two up to 256, the last
        dimension contiguous, cos and sin alike of x's dtype, (B or 1, L, D)."""
        if not (x.is_cuda and x.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and cos.stride() == sin.stride()):
            return False
        batch, _, length, dim = x.shape
        return (dim == cos.shape[-1] and dim & (dim - 1) == 0 and 2 <= dim <= 256 and x.stride(-1) == 1 and cos.stride(-1) == 1
                and cos.dtype == x.dtype == sin.dtype and cos.shape[1] == length and cos.shape[0] in (1, batch))

    def warm(self, dtype: torch.dtype, norm_widths: tuple[int, ...], vocab: int | None, device="cuda") -> None:
        """Compile the variants a model of these shapes runs (the same sizes' divisibility), on tiny inputs."""
        for width in norm_widths:
            self.rms_norm(torch.zeros(2, width, dtype=dtype, device=device), torch.ones(width, dtype=dtype, device=device), 1e-6)
        self.silu_mul(torch.zeros(2, 64, dtype=dtype, device=device), torch.zeros(2, 64, dtype=dtype, device=device))
        for width in norm_widths:  # a head width is the rotary embedding's too (a hidden width above 256 is refused)
            if self.handles_rotary(torch.zeros(1, 1, 3, width, dtype=dtype, device=device),
                                   *(torch.zeros(1, 3, width, dtype=dtype, device=device),) * 2):
                x = torch.zeros(1, 3, 2, width, dtype=dtype, device=device).transpose(1, 2)
                self.rotary(x, torch.zeros(1, 3, width, dtype=dtype, device=device), torch.zeros(1, 3, width, dtype=dtype, device=device))
        if vocab:
            self.token_logprobs(torch.zeros(2, vocab, dtype=dtype, device=device), torch.zeros(2, dtype=torch.int64, device=device))
        torch.cuda.synchronize(device)

    def handles_norm(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether `rms_norm` takes this input (rows contiguous, one program a row)."""
        return (x.is_cuda and x.shape[-1] <= MAX_NORM_WIDTH and x.is_contiguous() and weight.is_contiguous()
                and weight.dim() == 1 and weight.numel() == x.shape[-1])
