"""`survfuse run --executor ray --ray-address ...` against a Ray head started with `ray start`.

The head runs on loopback in its own temporary folder and is stopped by killing exactly its own
processes (never `ray stop`, which would stop every Ray runtime on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_under(marker: str) -> list[int]:
    """Process ids whose command line mentions `marker` (the head's temp folder)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(d.name))
    return pids


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head did not listen on 127.0.0.1:{port} in {timeout} s")


@pytest.fixture(scope="module")
def auth_env() -> dict[str, str]:
    """Token authentication with a token of this test only (nothing written to ~/.ray)."""
    return dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))


@pytest.fixture(scope="module")
def ray_head(auth_env: dict[str, str]) -> Iterator[str]:
    """`ray start --head` on 127.0.0.1 with 2 CPUs in a temp folder; yields its address."""
    # A short folder: Ray's Unix sockets live under it (path length limit ~107 bytes).
    temp = tempfile.mkdtemp(prefix="sfray-", dir="/tmp")
    port = _free_port()
    # --block keeps `ray start` in the foreground as the parent of the head's processes.
    proc = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=auth_env,
    )
    try:
        _wait_port(port, proc, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops what it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for pid in _processes_under(temp):  # anything left over of this head only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
def test_cli_run_joins_existing_cluster(
    ray_head: str, auth_env: dict[str, str], sim_small: Path, tmp_path: Path
) -> None:
    raw = yaml.safe_load(TINY.read_text())
    raw["data"] = {
        "cohort": str(sim_small / "cohort.parquet"),
        "meds_root": str(sim_small / "meds"),
    }
    raw["encoders"] = {"ehr": raw["encoders"]["ehr"]}
    raw["strategies"] = [{"name": "unimodal", "modality": "ehr"}]
    raw["seeds"] = [0, 1]
    raw["training"].update(max_epochs=2, patience=2)
    raw["evaluation"]["bootstrap"] = 20
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    res = subprocess.run(
        [
            *(sys.executable, "-m", "survfuse.cli", "run", str(cfg), "--out", str(out)),
            *("--executor", "ray", "--ray-address", ray_head, "--no-progress", "--no-report"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=auth_env,  # an explicit address never turns token auth on by itself (Ray 2.5x)
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "Started a local Ray instance" not in res.stderr  # it joined the head
    info = json.loads((out / "run.json").read_text())
    assert info["executor"] == "ray" and info["cells"] == 2 and info["cells_failed"] == []
    for cell in (out / "cells").iterdir():
        assert json.loads((cell / "status.json").read_text())["status"] == "done", cell.name
    metrics = pl.read_parquet(out / "metrics.parquet")
    assert set(metrics["split"]) == {"validation", "internal_test", "external_test"}
