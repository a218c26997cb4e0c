"""The Kubernetes examples in deploy/k8s/, checked and run without a cluster.

`check` validates every resource against the Kubernetes API's JSON schemas (strict: unknown
fields are errors, via kubernetes-validate) and then against the rules the API server
enforces that no schema holds (a Job with a pod failure policy must never restart its pods
in place, a per-index backoff needs an Indexed Job, selectors must match the labels they
select, `$(VAR)` in a command must name a variable the container has, ...).

`container_run` turns one container of a manifest into the `podman run` (or `docker run`)
arguments that give it the same image, command, working directory, environment and mounts,
so the container check runs the manifests' own commands, not copies of them.

    python -m deploy.kube deploy/k8s/*.yaml      # prints the problems; exit 1 if any
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

KUBERNETES_VERSION = "1.33.0"
VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


def load(paths: Iterable[Path]) -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, document)
        for path in paths
        for document in yaml.safe_load_all(Path(path).read_text())
        if document
    ]


def pod_template(resource: dict[str, Any]) -> dict[str, Any] | None:
    if resource.get("kind") in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return resource["spec"]["template"]
    return None


def _schema_problems(path: Path, resource: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(part) for part in error.path)
        return [f"{path}: {resource.get('kind')} {where}: {error.message}"]
    return []


def _job_problems(resource: dict[str, Any]) -> list[str]:
    spec, problems = resource["spec"], []
    restart = spec["template"]["spec"].get("restartPolicy", "Always")
    if restart not in ("Never", "OnFailure"):
        problems.append("a Job's pods must have restartPolicy Never or OnFailure")
    if "podFailurePolicy" in spec and restart != "Never":
        problems.append("podFailurePolicy needs restartPolicy Never")
    per_index = "backoffLimitPerIndex" in spec or "maxFailedIndexes" in spec
    if per_index and spec.get("completionMode") != "Indexed":
        problems.append("backoffLimitPerIndex and maxFailedIndexes need completionMode Indexed")
    if "maxFailedIndexes" in spec and "backoffLimitPerIndex" not in spec:
        problems.append("maxFailedIndexes needs backoffLimitPerIndex")
    containers = {c["name"] for c in spec["template"]["spec"]["containers"]}
    for rule in spec.get("podFailurePolicy", {}).get("rules", []):
        codes = rule.get("onExitCodes", {})
        if codes.get("containerName") and codes["containerName"] not in containers:
            problems.append(f"podFailurePolicy names no container {codes['containerName']!r}")
        if codes.get("operator") == "In" and 0 in codes.get("values", []):
            problems.append("podFailurePolicy may not match exit code 0 with operator In")
    return problems


def _container_problems(container: dict[str, Any], volumes: set[str]) -> list[str]:
    problems = []
    defined = {variable["name"] for variable in container.get("env", [])}
    for part in [*container.get("command", []), *container.get("args", [])]:
        for name in VARIABLE.findall(part):
            if name not in defined:
                problems.append(f"container {container['name']}: $({name}) is not in its env")
    ports = {port.get("name") for port in container.get("ports", [])}
    for port in container.get("ports", []):
        if port.get("name") and not PORT_NAME.match(port["name"]):
            problems.append(f"container {container['name']}: port name {port['name']!r}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        target = container.get(probe, {}).get("httpGet", {}).get("port")
        if isinstance(target, str) and target not in ports:
            problems.append(f"container {container['name']}: {probe} names no port {target!r}")
    for mount in container.get("volumeMounts", []):
        if mount["name"] not in volumes:
            problems.append(f"container {container['name']}: mounts no volume {mount['name']!r}")
    limits = container.get("resources", {}).get("limits", {})
    if "memory" not in limits:
        problems.append(f"container {container['name']}: no memory limit")
    return problems


def _cross_problems(resources: list[dict[str, Any]]) -> list[str]:
    """What one resource says of another: selectors, claims, secrets, scale targets."""
    problems = []
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for resource in resources:
        by_kind.setdefault(resource["kind"], {})[resource["metadata"]["name"]] = resource
    for name, deployment in by_kind.get("Deployment", {}).items():
        labels = deployment["spec"]["template"].get("metadata", {}).get("labels", {})
        wanted = deployment["spec"]["selector"].get("matchLabels", {})
        if any(labels.get(key) != value for key, value in wanted.items()):
            problems.append(f"Deployment {name}: its selector does not match its pods' labels")
    pods = [pod_template(r) for r in resources if pod_template(r) is not None]
    for kind in ("PodDisruptionBudget", "Service"):
        for name, resource in by_kind.get(kind, {}).items():
            wanted = resource["spec"]["selector"]
            wanted = wanted.get("matchLabels", wanted)
            if not any(
                all(p.get("metadata", {}).get("labels", {}).get(k) == v for k, v in wanted.items())
                for p in pods  # type: ignore[union-attr]
            ):
                problems.append(f"{kind} {name}: selects no pod of these manifests")
    for name, autoscaler in by_kind.get("HorizontalPodAutoscaler", {}).items():
        target = autoscaler["spec"]["scaleTargetRef"]
        if target["name"] not in by_kind.get(target["kind"], {}):
            problems.append(f"HorizontalPodAutoscaler {name}: no {target['kind']} {target['name']}")
    return problems


def reference_problems(resources: list[dict[str, Any]]) -> list[str]:
    """Claims and secret keys the pods use must be defined by the manifests together."""
    problems = []
    claims = {r["metadata"]["name"]: r for r in resources if r["kind"] == "PersistentVolumeClaim"}
    secrets = {r["metadata"]["name"]: r for r in resources if r["kind"] == "Secret"}
    for resource in resources:
        template = pod_template(resource)
        if template is None:
            continue
        name = f"{resource['kind']} {resource['metadata']['name']}"
        for volume in template["spec"].get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in claims:
                problems.append(f"{name}: no PersistentVolumeClaim {claim!r}")
            elif (
                claim
                and _pods(resource) > 1
                and "ReadWriteMany" not in claims[claim]["spec"]["accessModes"]
            ):
                problems.append(f"{name}: several pods share {claim!r}: ReadWriteMany")
        for container in template["spec"]["containers"]:
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if not ref or ref.get("optional"):
                    continue
                secret = secrets.get(ref["name"])
                if secret is None or ref["key"] not in secret.get("stringData", {}):
                    problems.append(f"{name}: no secret key {ref['name']}/{ref['key']}")
    return problems


def _pods(resource: dict[str, Any]) -> int:
    spec = resource["spec"]
    if resource["kind"] == "Job":
        return int(spec.get("parallelism", 1))
    return int(spec.get("replicas", 1))


def check(paths: Iterable[Path], together: Iterable[Path] = ()) -> list[str]:
    """Every problem of these manifests; `together` are files deployed with them (the
    PVC or Secret a Job uses), read for references only."""
    documents = load(paths)
    problems = []
    for path, resource in documents:
        problems += _schema_problems(path, resource)
        template = pod_template(resource)
        label = f"{path}: {resource['kind']} {resource['metadata']['name']}"
        if resource["kind"] == "Job":
            problems += [f"{label}: {p}" for p in _job_problems(resource)]
        if template is not None:
            volumes = {volume["name"] for volume in template["spec"].get("volumes", [])}
            for container in template["spec"]["containers"]:
                problems += [f"{label}: {p}" for p in _container_problems(container, volumes)]
    resources = [resource for _, resource in documents]
    problems += _cross_problems(resources)
    problems += reference_problems(resources + [r for _, r in load(together)])
    return problems


def _resolve(
    variable: dict[str, Any], container: dict[str, Any], secrets: Mapping[str, str]
) -> str | None:
    if "value" in variable:
        return str(variable["value"])
    source = variable.get("valueFrom", {})
    if "secretKeyRef" in source:
        return secrets.get(source["secretKeyRef"]["key"])
    if "resourceFieldRef" in source:
        field = source["resourceFieldRef"]["resource"]
        kind, _, resource = field.partition(".")
        value = str(container["resources"][kind][resource])
        return str(max(1, int(float(value.rstrip("m")) / (1000 if value.endswith("m") else 1))))
    return None


def container_run(
    resource: dict[str, Any],
    image: str,
    mounts: Mapping[str, str],
    secrets: Mapping[str, str] = {},  # noqa: B006 - read only
    extra_env: Mapping[str, str] = {},  # noqa: B006 - read only
    container: int = 0,
) -> list[str]:
    """`run` arguments (after `podman`/`docker`) for one container of a manifest: its
    command with `$(VAR)` expanded as the kubelet does, its working directory, user,
    environment (secret keys from `secrets`) and volumes (volume name -> host folder)."""
    template = pod_template(resource)
    assert template is not None
    spec = template["spec"]
    definition = spec["containers"][container]
    env: dict[str, str] = {}
    for variable in definition.get("env", []):
        value = _resolve(variable, definition, secrets)
        if value is not None:
            env[variable["name"]] = value
    env.update(extra_env)
    command = [
        VARIABLE.sub(lambda match: env.get(match.group(1), match.group(0)), part)
        for part in [*definition.get("command", []), *definition.get("args", [])]
    ]
    arguments = ["run", "--rm"]
    user = spec.get("securityContext", {}).get("runAsUser")
    if user is not None:
        arguments += ["--user", str(user)]
    if definition.get("workingDir"):
        arguments += ["--workdir", definition["workingDir"]]
    for name, value in env.items():
        arguments += ["--env", f"{name}={value}"]
    for mount in definition.get("volumeMounts", []):
        host = mounts.get(mount["name"])
        if host is not None:
            arguments += ["--volume", f"{host}:{mount['mountPath']}"]
    if command:
        arguments += ["--entrypoint", command[0]]
    return [*arguments, image, *command[1:]]


def main() -> int:
    paths = [Path(p) for p in sys.argv[1:]]
    problems = check(paths)
    for problem in problems:
        print(problem)
    print(f"{len(paths)} files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
