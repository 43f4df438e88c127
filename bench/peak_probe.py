"""How still the MFU peak holds: fresh matmul probes (lm.hardware.probe_peak_flops, never cached) back to back.

    python bench/peak_probe.py                     # 3 probes each of fp32 and (where the CPU has it) bf16
    python bench/peak_probe.py --probes 8 --threads 1

The probe is what MFU divides by on a CPU (measured once per machine, then cached in peak-flops.json). Target:
the probes of one precision within 10% of each other (max / min < 1.10) on a quiet machine. A busy one moves
them more: that is why this is a bench, not a test. Each probe's CPU share (process CPU time over wall time x threads,
in its best trial) says whether other processes held cores while it ran: below lm.hardware.BUSY a run doesn't cache it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lm, not an installed one

import torch  # noqa: E402

from lm.hardware import BUSY, native_bf16, probe_peak_flops  # noqa: E402

TARGET = 1.10
SHAPES = ((1024, 384, 1536), (1024, 384, 4096))  # MiniLM's at 8 x 128


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--probes", type=int, default=3, help="probes per precision (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    precisions = ["fp32"] + (["bf16"] if native_bf16(cpu) else [])
    print(f"{torch.get_num_threads()} threads; shapes {SHAPES}")
    for precision in precisions:
        probes = [probe_peak_flops(cpu, precision, SHAPES) for _ in range(args.probes)]
        rates = [flops for flops, _ in probes]
        spread = max(rates) / min(rates)
        print(f"{precision}: " + ", ".join(f"{r / 1e9:.1f}" for r in rates)
              + f" GFLOP/s; max/min {spread:.3f} ({'met' if spread < TARGET else 'missed'}: target < {TARGET}); CPU "
              "share " + ", ".join(f"{share:.2f}" for _, share in probes) + f" (the best trial's; below {BUSY}: a busy machine, "
              "not cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
