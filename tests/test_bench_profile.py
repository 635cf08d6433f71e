"""bench/profile_step.py: the split of the compute stream's idle time (waiting for a launch or
not) and the GEMM categories."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from profile_step import Ev, classify, idle_split  # noqa: E402


def test_a_gap_counts_as_host_time_until_the_next_launch_returned():
    # (launch end on the host, kernel start, kernel end), microseconds
    kernels = [(0, 5, 10),      # first kernel
               (30, 32, 40),    # launched 20 us after the first ended: 20 us host, 2 us other
               (35, 45, 50),    # launched before the gap began: 5 us other
               (44, 50, 60)]    # back to back: no gap
    host, other = idle_split(kernels, steps=[(0, 100)])
    assert (host, other) == (20, 7)


def test_gaps_outside_the_profiled_steps_are_not_counted():
    kernels = [(0, 5, 10), (200, 210, 220)]
    assert idle_split(kernels, steps=[(0, 50), (205, 300)]) == (0, 0)
    assert idle_split(kernels, steps=[(0, 300)]) == (190, 10)


def _gemm(*dims):
    op = Ev({"name": "aten::mm", "args": {"Input Dims": [list(d) for d in dims]}})
    return classify("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_TNN", op, ["aten::mm"], vocab=128256,
                    rank=16, cuda=True)


def test_lora_gemms_include_the_stacked_adapters_of_a_group():
    """engine/speed/lora_group.py stacks q/k/v's A (3r rows) and gate/up's (2r): still LoRA GEMMs."""
    assert _gemm((4096, 4096), (4096, 16)) == "GEMM: LoRA (r=16)"
    assert _gemm((4096, 4096), (4096, 48)) == "GEMM: LoRA (r=16)"
    assert _gemm((48, 4096), (4096, 4096)) == "GEMM: LoRA (r=16)"
    assert _gemm((4096, 32), (32, 4096)) == "GEMM: LoRA (r=16)"
    assert _gemm((4096, 4096), (4096, 14336)) == "GEMM: base projections (bf16)"
    assert _gemm((4096, 4096), (4096, 128256)) == "lm_head + CE: GEMMs"
