"""deploy/kubernetes: the manifests parse, agree with each other and run real commands.

No cluster here: every YAML document is parsed and the fields that matter are
checked; every command (containers and probes) is parsed by the program's own
CLI parser, and the settings the pods get are parsed by worker.settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_checks import check_command, shell_words, unknown_variables
from worker.celery_config import build_config
from worker.secret_files import SECRET_VARIABLES
from worker.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
NAME = "dnd-client"


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return dict(yaml.safe_load((K8S / "kustomization.yaml").read_text()))


@pytest.fixture(scope="module")
def resources(kustomization) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> document, for every document of every listed file."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for filename in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / filename).read_text()):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def _pod(resources, kind: str, name: str) -> dict[str, Any]:
    return dict(resources[(kind, name)]["spec"]["template"])


def _containers(resources) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{kind}/{name}", container)
        for (kind, name), doc in resources.items()
        if kind in ("Deployment", "Job")
        for container in doc["spec"]["template"]["spec"]["containers"]
    ]


def _pods_and_containers(resources) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (f"{kind}/{name}", doc["spec"]["template"]["spec"], container)
        for (kind, name), doc in resources.items()
        if kind in ("Deployment", "Job")
        for container in doc["spec"]["template"]["spec"]["containers"]
    ]


def _secret_files(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """Path in the container -> key of dnd-client-secrets, for the Secret's mounted files."""
    volumes = {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None:
            continue
        assert volume["secretName"] == "dnd-client-secrets"
        assert mount.get("readOnly") is True
        for item in volume["items"]:
            files[f"{mount['mountPath']}/{item['path']}"] = item["key"]
    return files


def test_every_manifest_is_listed_in_the_kustomization(kustomization):
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_labels_are_consistent_and_selectors_match(resources):
    for (kind, name), doc in resources.items():
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == NAME, f"{kind}/{name}"
        assert labels["app.kubernetes.io/part-of"] == NAME, f"{kind}/{name}"
        if kind in ("Deployment", "Job"):
            pod_labels = doc["spec"]["template"]["metadata"]["labels"]
            assert pod_labels == labels, f"{kind}/{name}: pod labels differ"
        if kind == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items(), f"{kind}/{name}: selector"
    components = [
        doc["metadata"]["labels"]["app.kubernetes.io/component"]
        for (kind, _), doc in resources.items()
        if kind in ("Deployment", "Job")
    ]
    assert sorted(components) == ["beat", "flower", "migrate", "worker"]
    service = resources[("Service", "dnd-client-flower")]
    flower_labels = _pod(resources, "Deployment", "dnd-client-flower")["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= flower_labels.items()
    for (kind, _), doc in resources.items():
        if kind == "Deployment" and doc is not resources[("Deployment", "dnd-client-flower")]:
            other = doc["spec"]["template"]["metadata"]["labels"]
            assert not service["spec"]["selector"].items() <= other.items()


def test_one_image_everywhere(resources, kustomization):
    [image] = kustomization["images"]
    for where, container in _containers(resources):
        assert container["image"] == image["name"], where


def test_workers(resources):
    worker = resources[("Deployment", "dnd-client-worker")]
    assert worker["spec"]["replicas"] >= 2
    pod = worker["spec"]["template"]["spec"]
    # Warm shutdown must be able to outlast the longest task.
    assert pod["terminationGracePeriodSeconds"] > Settings().task_time_limit_s
    [container] = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["sh", "-c"]
        assert "inspect ping -d celery@$HOSTNAME" in command[2]
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]


def test_exactly_one_beat_never_two_during_a_rollout(resources):
    beat = resources[("Deployment", "dnd-client-beat")]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"
    [container] = beat["spec"]["template"]["spec"]["containers"]
    [state] = [e["value"] for e in container["env"] if e["name"] == "BEAT_SCHEDULE_FILE"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(state).parent) in mounts, "beat's schedule file must be on a volume"


def test_flower_gets_its_login_from_the_secret(resources):
    pod = _pod(resources, "Deployment", "dnd-client-flower")["spec"]
    [container] = pod["containers"]
    files = _secret_files(pod, container)
    [auth] = [e for e in container["env"] if e["name"] == "FLOWER_BASIC_AUTH_FILE"]
    assert files[auth["value"]] == "FLOWER_BASIC_AUTH"
    assert "--port=5555" in container["command"]
    assert container["ports"][0]["containerPort"] == 5555
    service = resources[("Service", "dnd-client-flower")]
    assert service["spec"]["type"] == "ClusterIP"  # /metrics answers without auth
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthcheck"


def test_migrate_job_runs_the_migrations(resources):
    job = resources[("Job", "dnd-client-migrate")]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["dnd-client", "migrate", "up"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")


def test_every_command_is_one_our_programs_accept(resources):
    for _where, container in _containers(resources):
        check_command(container["command"])
        for probe in ("readinessProbe", "livenessProbe"):
            if "exec" in container.get(probe, {}):
                check_command(shell_words(container[probe]["exec"]["command"][2]))


def test_every_referenced_variable_exists_and_is_read(resources):
    config = resources[("ConfigMap", "dnd-client-config")]["data"]
    secret = resources[("Secret", "dnd-client-secrets")]["stringData"]
    assert all("CHANGE-ME" in value for value in secret.values()), "placeholders only"
    assert unknown_variables(sorted({*config, *secret})) == []
    for where, pod, container in _pods_and_containers(resources):
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] == "dnd-client-config", where
                env.update(config)
            else:
                assert source["secretRef"]["name"] == "dnd-client-secrets", where
                env.update(secret)
        files = _secret_files(pod, container)
        for item in container.get("env", []):
            if item["name"].removesuffix("_FILE") in SECRET_VARIABLES and item["name"].endswith(
                "_FILE"
            ):
                # What the settings read from that file: the Secret's key.
                assert item["value"] in files, f"{where}: {item['value']} is not mounted"
                env[item["name"].removesuffix("_FILE")] = secret[files[item["value"]]]
                continue
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = item["valueFrom"].get("secretKeyRef") or item["valueFrom"]["configMapKeyRef"]
            store = secret if "secretKeyRef" in item["valueFrom"] else config
            assert ref["key"] in store, f"{where}: {ref['key']} is not in {ref['name']}"
            env[item["name"]] = store[ref["key"]]
        assert unknown_variables(sorted(env)) == [], where
        # What the pod gets is a valid configuration of ours.
        build_config(Settings.from_env(env))
        if "worker" in where or "migrate" in where:
            assert "POSTGRES_PASSWORD" in env, where
        if "migrate" not in where:
            assert {"CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"} <= env.keys(), where


def test_passwords_reach_pods_as_files_never_as_environment_variables(resources):
    for where, pod, container in _pods_and_containers(resources):
        for item in container.get("env", []):
            assert "secretKeyRef" not in item.get("valueFrom", {}), (where, item["name"])
        for source in container.get("envFrom", []):
            assert "secretRef" not in source, where
        names = {item["name"] for item in container.get("env", [])}
        assert names & {f"{name}_FILE" for name in SECRET_VARIABLES}, where
        [volume] = [v for v in pod["volumes"] if "secret" in v]
        # Group-readable (the pod's fsGroup), by nobody else.
        assert volume["secret"]["defaultMode"] == 0o440, where
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"], where


def test_pods_run_unprivileged(resources):
    for (kind, name), doc in resources.items():
        if kind not in ("Deployment", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            if context.get("readOnlyRootFilesystem"):
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp"
