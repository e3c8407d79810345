"""GPU smoke check (`make gpu-check`): proves the CUDA environment the evaluators will use.

evo-compress has no CUDA code path of its own yet (the real model evaluator arrives with the
fitness-evaluation work); until then this checks what it will rely on: torch sees a CUDA
device, a bf16 matmul runs and agrees with the CPU, and the allocator's peak-memory counter
works. Exit code 0 only when every check passed; on a machine without a GPU it says so and
exits 1.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch; nothing to check on this machine")
        return 1
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    print(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}")
    torch.manual_seed(0)
    a = torch.randn(4096, 4096)
    b = torch.randn(4096, 4096)
    expected = (a.double() @ b.double()).float()
    torch.cuda.reset_peak_memory_stats(device)
    ga, gb = a.to(device, torch.bfloat16), b.to(device, torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        out = ga @ gb
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 20
    error = (out.float().cpu() - expected).abs().max().item() / expected.abs().max().item()
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    tflops = 2 * 4096**3 / seconds / 1e12
    print(
        f"bf16 matmul 4096^3: {seconds * 1e3:.3f} ms ({tflops:.0f} TFLOP/s), "
        f"relative error {error:.2e}, allocator peak {peak:.0f} MiB"
    )
    ok = error < 2e-2 and peak > 0
    print("gpu-check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
