"""The `ray up` configs validate against the cluster schema shipped inside the
ray package, and every Grafana panel queries metrics the server exports."""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_CONFIGS = sorted((ROOT / "cluster" / "ray").glob("*.yaml"))
DASHBOARD = ROOT / "cluster" / "grafana" / "specmoe-dashboard.json"


@pytest.fixture(scope="module")
def schema():
    import ray
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_there_is_a_cloud_gpu_config_and_an_on_premise_one():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in RAY_CONFIGS}
    assert {"aws", "local"} <= providers, [p.name for p in RAY_CONFIGS]


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config_matches_rays_schema(path, schema):
    import jsonschema
    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, schema)
    # The schema is strict: a misspelt top-level key fails (so the check above can fail).
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cfg, "setup_comands": []}, schema)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--metrics-export-port=" in head, head
    assert any("pip install" in c and "specmoe" in c for c in cfg["setup_commands"]), cfg["setup_commands"]


def test_cloud_config_has_a_gpu_worker_type():
    cfg = yaml.safe_load((ROOT / "cluster" / "ray" / "aws-gpu.yaml").read_text())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    # g*/p* are AWS's GPU instance families.
    assert any(re.match(r"^(g\d|p\d)", t["node_config"]["InstanceType"]) and t.get("min_workers", 0) >= 1
               for t in workers), types


def _queried_metrics(dashboard: dict) -> dict[str, set[str]]:
    """panel title -> the ray_specmoe_* series its queries name."""
    out = {}
    for p in dashboard["panels"]:
        names = set()
        for t in p["targets"]:
            names |= set(re.findall(r"\bray_specmoe_[a-z0-9_]+", t["expr"]))
        out[p["title"]] = names
    return out


def _series_of(name: str) -> set[str]:
    from specmoe.cluster.metrics import METRICS, exported_name
    base = exported_name(name)
    return {base + s for s in ("_bucket", "_sum", "_count")} if METRICS[name][0] == "histogram" else {base}


def test_every_grafana_panel_queries_exported_metrics():
    from specmoe.cluster.metrics import METRICS
    exported = set().union(*(_series_of(n) for n in METRICS))
    dash = json.loads(DASHBOARD.read_text())
    queried = _queried_metrics(dash)
    for title, names in queried.items():
        assert names, f"panel {title!r} queries no specmoe metric"
        assert names <= exported, f"panel {title!r} queries {sorted(names - exported)}, not exported"
    titles = " | ".join(queried).lower()
    for needed in ("acceptance", "mean accepted length", "chosen k", "expert load per rank", "tokens/s",
                   "ttft", "tpot"):
        assert needed in titles, f"no panel for {needed!r}: {titles}"


def grafana_series() -> set[str]:
    """Every series the dashboard queries (test_serve.py checks they appear in a real scrape)."""
    return set().union(*_queried_metrics(json.loads(DASHBOARD.read_text())).values())
