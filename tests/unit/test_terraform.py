"""infra/terraform, checked without Terraform (it cannot run here): every file parses as
HCL2 (python-hcl2), the modules have the shape a reviewer expects (typed, described
variables; pinned providers; probes on the services' real health endpoints), the JetStream
topology is generated from the same source the embedded stack provisions from, and checkov
finds no failed security check (a skipped one must carry its reason). That the topology
file matches what a running stack creates is checked in tests/e2e/test_cli_up.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest

from myelin import topology
from myelin.settings import Settings
from myelin.stack.supervisor import SERVICES

ROOT = Path(__file__).resolve().parents[2]
TF = ROOT / "infra" / "terraform"
CHECKOV = ROOT / ".venv" / "tools" / "bin" / "checkov"


def clean(node: Any) -> Any:
    """python-hcl2's tree without its markers: block labels unquoted, no ``__is_block__`` or
    ``__comments__``."""
    if isinstance(node, dict):
        return {
            unquote(k): clean(v)
            for k, v in node.items()
            if k not in ("__is_block__", "__comments__")
        }
    if isinstance(node, list):
        return [clean(v) for v in node]
    return node


def parse(path: Path) -> dict[str, Any]:
    with path.open() as f:
        doc: dict[str, Any] = clean(hcl2.load(f))
    return doc


def module(name: str) -> dict[str, list[Any]]:
    """Every top-level block of a module's files, by kind."""
    out: dict[str, list[Any]] = {}
    for f in sorted((TF / "modules" / name).glob("*.tf")):
        for kind, blocks in parse(f).items():
            out.setdefault(kind, []).extend(blocks)
    return out


def resources(mod: dict[str, list[Any]], kind: str) -> dict[str, Any]:
    return {n: body for block in mod.get("resource", []) for n, body in block.get(kind, {}).items()}


def unquote(value: Any) -> Any:
    return value.strip('"') if isinstance(value, str) else value


def test_every_file_parses() -> None:
    files = sorted(TF.rglob("*.tf")) + sorted(TF.rglob("*.tfvars")) + sorted(TF.rglob("*.hcl"))
    assert len(files) >= 29
    for f in files:
        parse(f)  # raises on a syntax error


@pytest.mark.parametrize("name", ["jetstream", "service", "redis", "clickhouse", "opa", "platform"])
def test_modules_pin_providers_and_describe_their_interface(name: str) -> None:
    mod = module(name)
    (tf,) = mod["terraform"]
    providers = tf["required_providers"][0]
    assert providers and all(
        re.fullmatch(r'"?~> \d+\.\d+"?', p["version"]) for p in providers.values()
    ), providers
    for block in mod.get("variable", []):
        for var, body in block.items():
            assert body.get("description") and body.get("type"), f"{name}: variable {var}"
    for block in mod.get("output", []):
        for out, body in block.items():
            assert body.get("description"), f"{name}: output {out}"


def test_topology_file_is_generated_from_the_code() -> None:
    """One source: myelin/topology.py provisions the embedded stack and writes this file."""
    assert (TF / "topology.json").read_text() == topology.render(Settings()), (
        "infra/terraform/topology.json is stale: run python -m myelin.topology"
    )
    doc = json.loads((TF / "topology.json").read_text())
    assert set(doc["streams"]) == {s.name for s in topology.streams(Settings())}
    assert {c["stream"] for c in doc["consumers"].values()} <= set(doc["streams"])


def test_jetstream_module_declares_every_stream_bucket_and_consumer_from_it() -> None:
    mod = module("jetstream")
    (locals_,) = mod["locals"]
    assert "jsondecode(file(var.topology_file))" in str(locals_["topology"])
    for kind, source in (
        ("jetstream_stream", "local.streams"),
        ("jetstream_consumer", "local.consumers"),
    ):
        (body,) = resources(mod, kind).values()
        assert source in str(body["for_each"]), kind
    # KV buckets are the streams behind them, with rollups refused (myelin.bus provisions
    # them so): a jetstream_kv_bucket would take rollup headers
    assert not resources(mod, "jetstream_kv_bucket")
    assert "local.buckets" in str(locals_["streams"])
    (stream,) = resources(mod, "jetstream_stream").values()
    assert stream["allow_rollup_hdrs"] is False
    platform = module("platform")
    calls = {n: b for block in platform["module"] for n, b in block.items()}
    assert "topology.json" in str(calls["jetstream"]["topology_file"])


def test_every_service_is_deployed_with_probes_on_its_health_endpoints() -> None:
    calls = {n: b for block in module("platform")["module"] for n, b in block.items()}
    for service in SERVICES:
        assert unquote(calls[service]["source"]) == "../service", service
        assert unquote(calls[service]["name"]) == service
    assert unquote(calls["inference"]["grpc_probe_port"]) == 8001  # grpc.health.v1
    (dep,) = resources(module("service"), "kubernetes_deployment_v1").values()
    text = json.dumps(dep)
    assert '"/readyz"' in text.replace('\\"', '"') and '"/livez"' in text.replace('\\"', '"')
    (locals_,) = module("service")["locals"]
    assert "MYELIN_HEALTH_HTTP_PORT" in str(locals_["env"])  # what myelin/service.py serves
    assert Settings().health_http_port == 0  # off by default: the pods set it


def test_autoscaling_hpa_on_cpu_and_p99_and_keda_on_lag() -> None:
    svc = module("service")
    (hpa,) = resources(svc, "kubernetes_horizontal_pod_autoscaler_v2").values()
    assert "cpu" in json.dumps(hpa) and "myelin_rpc_p99_seconds" in json.dumps(hpa)
    (keda,) = resources(svc, "kubernetes_manifest").values()
    assert "ScaledObject" in json.dumps(keda)
    calls = {n: b for block in module("platform")["module"] for n, b in block.items()}
    assert "lag_scaler" in calls["features"]
    (locals_,) = module("platform")["locals"]
    assert "myelin_consumer_lag_messages" in str(locals_["lag_query"])  # myelin/slis.py


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_environments_set_every_variable_of_the_root_and_no_secret(env: str) -> None:
    root = parse(TF / "main.tf")
    calls = {n: b for block in root["module"] for n, b in block.items()}
    assert unquote(calls["platform"]["source"]) == "./modules/platform"
    declared = {n for block in root["variable"] for n in block}
    tfvars = parse(TF / "envs" / f"{env}.tfvars")
    assert set(tfvars) == declared  # every root variable set, nothing unknown
    assert unquote(tfvars["environment"]) == env
    assert {"stream_replicas", "partitions", "features_workers", "redis", "clickhouse"} <= set(
        tfvars["sizes"]
    )
    assert re.search(r"@sha256:[0-9a-f]{64}", tfvars["image"])
    backend = parse(TF / "envs" / f"{env}.backend.hcl")
    assert f"myelin/{env}/" in backend["key"]
    text = (TF / "envs" / f"{env}.tfvars").read_text()
    assert not re.search(r"(?i)(password|secret|token)\s*=\s*\"[^\"]+\"", text)


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_checkov_finds_no_failed_check(env: str) -> None:
    """Scanned as each environment deploys it (its var file sets the image digests)."""
    assert CHECKOV.exists(), "checkov is installed by `make test` (make install) into .venv/tools"
    done = subprocess.run(
        [
            str(CHECKOV),
            "-d",
            str(TF),
            "--framework",
            "terraform",
            "--skip-download",
            "--var-file",
            str(TF / "envs" / f"{env}.tfvars"),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={"BC_SKIP_MAPPING": "TRUE", "PATH": "/usr/bin:/bin", "HOME": str(ROOT / ".venv")},
        check=False,
    )
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    summary, results = report["summary"], report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["passed"] >= 200 and summary["parsing_errors"] == 0
    for skipped in results["skipped_checks"]:
        assert skipped.get("suppress_comment"), f"{skipped['check_id']} skipped without a reason"
