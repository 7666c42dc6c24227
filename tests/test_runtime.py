"""`fastslow.runtime.run`: how a tool's process ends, alone and as one rank of a multi-process run."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A rank that leaves gloo collectives in flight when main() ends, as the last gather of a real run can still be
# held by gloo's worker thread: interpreter finalization then aborted the process (SIGABRT, exit -6) in every run.
RANK = """
import torch, torch.distributed as dist
from fastslow.errors import ConfigError
from fastslow.runtime import run

def main():
    dist.init_process_group("gloo")
    x = torch.ones(1 << 18)
    for _ in range(256):
        dist.all_gather([torch.empty_like(x) for _ in range(dist.get_world_size())], x, async_op=True)
    print(f"rank {dist.get_rank()} done", flush=True)
    if FAIL:
        raise ConfigError("train.lr=-1: must be > 0")

if __name__ == "__main__":
    run(main)
"""


def torchrun(script: Path) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port),
           str(script)]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fail", [False, True], ids=["finished", "user-error"])
def test_a_rank_ends_with_its_own_status_while_gloo_work_is_in_flight(tmp_path, fail):
    script = tmp_path / "rank.py"
    script.write_text(RANK.replace("FAIL", str(fail)))
    proc = torchrun(script)
    out = proc.stdout + proc.stderr
    assert "SIGABRT" not in out and "terminate called" not in out, out[-3000:]
    assert "rank 0 done" in out and "rank 1 done" in out, out[-3000:]
    if fail:
        assert proc.returncode != 0 and "exitcode  : 2" in out, out[-3000:]  # torchrun's report of a rank's exit
        assert "error: train.lr=-1: must be > 0" in out, out[-3000:]
    else:
        assert proc.returncode == 0, out[-3000:]
