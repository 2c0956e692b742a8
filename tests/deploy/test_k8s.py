"""The Kubernetes manifests (`deploy/k8s/`), checked offline: each kustomization is rendered
with `kubectl kustomize` (no cluster needed), every built-in resource passes
kubernetes-validate --strict (bundled schemas, no network), the Kubeflow TrainJob passes the
JSON schema vendored in deploy/k8s/schemas/, and a consistency lint checks what no schema
does: selectors match labels, rendezvous and `dns:///` names match Services, probes point at
the served port, every referenced ConfigMap/PVC is defined and every Secret is created by the
deploy README's commands, a public --host has credentials, and pods outlive the drain.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/kubeflow"]
KUBERNETES = "1.37.0"  # kubernetes-validate's bundled schemas
TRAINJOB_SCHEMA = json.loads((K8S / "schemas" / "trainjob-v1alpha1.json").read_text())
Doc = dict[str, Any]


def render(kustomization: str) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (its built-in kustomize) renders the manifests: install kubectl"
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> list[Doc]:
    return render(request.param)


def named(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc, dict[str, str]]]:
    """(owner name, pod spec, pod labels) of every workload, TrainJob runtime patches too."""
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            template = d["spec"]["template"]
            yield d["metadata"]["name"], template["spec"], template["metadata"].get("labels", {})
        if d["kind"] == "TrainJob":
            for patch in d["spec"].get("runtimePatches", []):
                for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                    yield d["metadata"]["name"], job["template"]["spec"]["template"]["spec"], {}


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_every_resource_passes_kubernetes_validate_strict_or_the_vendored_schema(
    rendered: list[Doc],
) -> None:
    kinds = set()
    for doc in rendered:
        kinds.add(doc["kind"])
        if doc["kind"] == "TrainJob":
            jsonschema.Draft202012Validator(TRAINJOB_SCHEMA).validate(doc)
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert {"Deployment", "Service", "Job", "ConfigMap", "PersistentVolumeClaim"} <= kinds


def test_the_validators_reject_a_misspelt_field() -> None:
    docs = render("overlays/kubeflow")
    deployment = named(docs, "Deployment")["lyceum-teacher"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    trainjob = named(docs, "TrainJob")["lyceum-student"]
    trainjob["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(jsonschema.ValidationError, match="numNode"):
        jsonschema.Draft202012Validator(TRAINJOB_SCHEMA).validate(trainjob)


@pytest.mark.integration
def test_kubernetes_validate_needs_no_network(tmp_path: Path) -> None:
    manifest = tmp_path / "all.yaml"
    manifest.write_text(yaml.safe_dump_all(render("base")))
    # A new network namespace has no interface up but loopback: nothing can be fetched.
    validate = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    done = subprocess.run(
        ["unshare", "--net", *validate, "--kubernetes-version", KUBERNETES, str(manifest)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed for resource") == len(render("base"))


def test_selectors_match_the_labels_of_the_pods_they_select(rendered: list[Doc]) -> None:
    pods = {name: labels for name, _, labels in pod_specs(rendered) if labels}
    for name, d in named(rendered, "Deployment").items():
        selector = d["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pods[name].items(), (name, selector)
    for name, service in named(rendered, "Service").items():
        selector = service["spec"]["selector"]
        selected = [p for p, labels in pods.items() if selector.items() <= labels.items()]
        assert len(selected) == 1, f"Service {name} selects {selected}"


def test_torchrun_rendezvous_names_the_first_pod_under_its_headless_service(
    rendered: list[Doc],
) -> None:
    services = named(rendered, "Service")
    launched = 0
    for name, job in named(rendered, "Job").items():
        pod = job["spec"]["template"]
        container = pod["spec"]["containers"][0]
        if container.get("command") != ["torchrun"]:
            continue
        launched += 1
        args = container["args"]
        subdomain = pod["spec"]["subdomain"]
        service = services[subdomain]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert job["spec"]["completionMode"] == "Indexed"
        assert flag(args, "--master-addr") == f"{name}-0.{subdomain}"
        assert int(flag(args, "--master-port") or 0) in {
            p["port"] for p in service["spec"]["ports"]
        }
        assert flag(args, "--node-rank") == "$(JOB_COMPLETION_INDEX)"
        assert int(flag(args, "--nnodes") or 0) == job["spec"]["completions"]
    assert launched == (0 if "TrainJob" in {d["kind"] for d in rendered} else 1)


def test_dump_ranks_match_the_indexed_job(rendered: list[Doc]) -> None:
    job = named(rendered, "Job")["lyceum-dump"]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["teacher", "dump"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert flag(args, "--rank") == "$(JOB_COMPLETION_INDEX)"
    assert int(flag(args, "--world-size") or 0) == job["spec"]["completions"]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (
        "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    )


def test_dns_targets_name_a_headless_service_on_its_port(rendered: list[Doc]) -> None:
    services = named(rendered, "Service")
    targets = [
        match
        for config in named(rendered, "ConfigMap").values()
        for text in config["data"].values()
        for match in re.findall(r"dns:///([a-z0-9.-]+):(\d+)", text)
    ]
    assert targets == [("lyceum-teacher", "50051")]
    for host, port in targets:
        service = services[host.split(".")[0]]
        assert service["spec"]["clusterIP"] == "None"  # every replica's address, not one VIP
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_teacher_probes_and_service_point_at_the_served_port(rendered: list[Doc]) -> None:
    deployment = named(rendered, "Deployment")["lyceum-teacher"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    port = int(flag(args, "--grpc-port") or 0)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port
    assert ports["metrics"] == int(flag(args, "--metrics-port") or 0)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    service = named(rendered, "Service")["lyceum-teacher"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]


def test_pods_outlive_the_servers_drain(rendered: list[Doc]) -> None:
    spec = named(rendered, "Deployment")["lyceum-teacher"]["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    drain = float(flag(args, "--grace-s") or 0) + float(
        flag(args, "--max-connection-age-grace-s") or 0
    )
    assert flag(args, "--max-connection-age-s") is not None
    assert spec["terminationGracePeriodSeconds"] > drain


def test_a_public_host_serves_only_with_credentials_from_a_secret(rendered: list[Doc]) -> None:
    for name, spec, _ in pod_specs(rendered):
        secrets = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
        for container in spec.get("containers", []):
            args = container.get("args", [])
            if flag(args, "--host") not in ("0.0.0.0", "::"):
                continue
            assert "--insecure" not in args, name
            paths = [flag(args, f) for f in ("--token-file", "--tls-cert") if flag(args, f)]
            assert paths, f"{name}: --host {flag(args, '--host')} without a token or TLS"
            mounts = [m for m in container["volumeMounts"] if m["name"] in secrets]
            for path in paths:
                assert any(str(path).startswith(m["mountPath"] + "/") for m in mounts), path


def test_every_referenced_configmap_claim_and_secret_exists(rendered: list[Doc]) -> None:
    configs = named(rendered, "ConfigMap")
    claims = named(rendered, "PersistentVolumeClaim")
    assert not named(rendered, "Secret"), "no secret belongs in the manifests"
    # Secrets are created by hand (deploy/README.md), never committed.
    readme = (ROOT / "deploy" / "README.md").read_text()
    created = set(re.findall(r"kubectl create secret generic ([a-z0-9-]+)", readme))
    references = 0
    for name, spec, _ in pod_specs(rendered):
        for volume in spec.get("volumes", []):
            references += 1
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configs, (name, volume)
            elif "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (name, volume)
            elif "secret" in volume:
                assert volume["secret"]["secretName"] in created, (name, volume)
            else:
                pytest.fail(f"{name}: volume {volume['name']} of an unchecked kind")
        for container in spec.get("containers", []):
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])}, name
    assert references >= 7


def test_the_gpu_overlay_gives_each_cuda_engine_a_gpu() -> None:
    docs = render("overlays/gpu")
    engines = 0
    for name, spec, _ in pod_specs(docs):
        container = spec["containers"][0]
        if flag(container["args"], "--device") == "cuda:0":
            engines += 1
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
            assert container["image"].endswith("-cu128"), name
    assert engines == 2  # the teachers and the dump ranks
