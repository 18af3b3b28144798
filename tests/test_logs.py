"""attncc's log through torch's logging: ``TORCH_LOGS="+attncc"`` shows site and binding lines in
torch's format, ``TORCH_LOGS="attncc"`` only the INFO ones, neither (nor ``ATTNCC_LOG``) none."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import torch, torch.nn.functional as F
import attncc

class M(torch.nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)

spec = {"attncc": 1, "rules": [{"mask": {"window": 8}}]}
torch.compile(M(), backend="attncc", options={"spec": spec})(torch.randn(1, 2, 32, 16))
"""


def run(env_logs: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "ATTNCC_LOG")}
    if env_logs is not None:
        env["TORCH_LOGS"] = env_logs
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


@pytest.mark.parametrize("logs,info,debug", [("+attncc", 1, 1), ("attncc", 1, 0), (None, 0, 0)])
def test_torch_logs(logs, info, debug):
    err = run(logs)
    binds = [line for line in err.splitlines() if "-> rule 'rules[0]'" in line]
    positions = [line for line in err.splitlines() if "query positions: start" in line]
    assert len(binds) == info and len(positions) == debug, err[-2000:]
    if info:
        assert binds[0].startswith("I")  # torch's format: level letter, date, file:line
