"""scripts/demo.py --quick end to end: a real `specmoe serve` (local Ray, free
ports), held-out prompts over gRPC, auto vs off per request, the table, the
JSON of runs, and nothing of the server left running afterwards (~20 s)."""

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_demo_quick_serves_compares_and_shuts_down(tmp_path):
    before = {p.pid for p in psutil.process_iter()}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--quick", "--png", str(tmp_path / "d.png"),
                          "--json", str(tmp_path / "d.json")], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "specmoe: serving" in out.stdout and "stopping the server and Ray" in out.stdout
    assert "still running" not in out.stderr
    rows = json.loads((tmp_path / "d.json").read_text())["summary"]
    assert sorted((r["concurrency"], r["speculation"]) for r in rows) == [(1, "auto"), (1, "off"), (4, "auto"),
                                                                           (4, "off")]
    for r in rows:
        assert not r["errors"] and r["generated_tokens"] == r["requests"] * 8   # --quick: 8 tokens, ignore_eos
        assert r["tokens_per_step"] >= 1.0
        if r["speculation"] == "off":
            assert r["draft_tokens"] == 0 and r["mean_k_chosen"] == 0
    for line in ("tokens/s auto / off", "accept len"):
        assert line in out.stdout
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "d.png").stat().st_size > 0
    except ImportError:
        assert "no plot" in out.stderr
    # Every process the demo started (server, serving process, Ray) is gone.
    me = psutil.Process()
    left = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid not in before and p.pid != me.pid
            and any("specmoe-demo-" in c or "specmoe.cluster.cli" in c for c in (p.info["cmdline"] or []))]
    assert not left, f"left running: {[(p.pid, p.info['cmdline']) for p in left]}"
