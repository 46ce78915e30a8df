"""`precision: auto` gives every process of a CPU run the same answer,
even where their own matmul timings disagree (a real 2-process gloo
group)."""

import json
import sys

import pytest

from speechbrain_blspkd.testing import run_together

WORKER = r"""
import json, os, sys
import torch.distributed as dist
from speechbrain_blspkd.utils import precision

rank = int(sys.argv[1])
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank,
    world_size=2,
)
precision.set_run_device("cpu")
# rank 0 times bf16 faster, rank 1 slower
precision.matmul_speedup = lambda *a, **k: 2.0 if rank == 0 else 0.5
precision.bf16_supported = lambda device_type: (True, "test CPU")
choice = precision.choose("cpu")
print(json.dumps({"rank": rank, "precision": choice.precision}))
dist.destroy_process_group()
"""


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_auto_is_one_answer_for_every_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    port = str(_free_port())
    outputs = run_together(
        [[sys.executable, str(script), str(r), port] for r in (0, 1)],
        timeout=120,
    )
    answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [a["rank"] for a in answers] == [0, 1]
    # rank 0 alone would choose bf16; together they agree on fp32
    assert [a["precision"] for a in answers] == ["fp32", "fp32"]


def test_without_a_process_group_the_measurement_decides(monkeypatch):
    from speechbrain_blspkd.utils import precision

    monkeypatch.setattr(precision, "bf16_supported", lambda t: (True, "x"))
    for speedup, want in ((2.0, "bf16"), (0.5, "fp32")):
        monkeypatch.setattr(
            precision, "matmul_speedup", lambda *a, s=speedup, **k: s
        )
        precision.choose.cache_clear()
        try:
            assert precision.choose("cpu").precision == want
        finally:
            precision.choose.cache_clear()
