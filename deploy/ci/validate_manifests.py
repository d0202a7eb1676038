#!/usr/bin/env python3
"""Offline validation of distproxy's rendered Kubernetes/OpenShift manifests.

Run by tests/deploy.rs with the Python of the virtual environment that
scripts/install-deploy-tools.sh creates; it needs kubernetes-validate,
PyYAML, jsonschema and the cloudcoil cert-manager / prometheus-operator models.

    validate_manifests.py render RENDERED.yaml --workload-kind Deployment \
        --config-source deploy/kubernetes/base/distproxy.toml [-k 1.29 -k 1.37]
    validate_manifests.py same-pod FILE.yaml FILE.yaml ...
    validate_manifests.py known-metrics

What is validated, and against what:

* Core Kubernetes objects (Deployment, StatefulSet, Service, ConfigMap,
  PodDisruptionBudget, ...): kubernetes-validate's bundled JSON schemas,
  strict (unknown fields are errors), for every Kubernetes version given.
* cert-manager Certificate/Issuer and prometheus-operator ServiceMonitor:
  cloudcoil's pydantic models, generated from those projects' CRD schemas
  (types, enums, required fields); unknown fields are reported by comparing
  the input with what the model kept. No API server is involved, so
  admission webhooks and CEL rules of the CRDs are NOT checked.
* OpenShift DeploymentConfig: no schema ships offline. Its pod template is
  validated against the core PodTemplateSpec schema (strict); the
  DeploymentConfig's own fields are checked here by hand (known field names,
  selector, strategy and trigger types).
* Anything else is an error: a new kind needs a validator here first.

Then the objects are checked against each other, as a cluster would use
them: selectors match the pod labels, Service target ports exist, the
ConfigMap the sidecar reads holds exactly the TOML file the test suite gives
to `distproxy check-config`, the ports in that TOML are the container ports,
volumes exist for every path the TOML names, the sidecar is a native sidecar
with its probes on the admin port, the BEAM flags are set, the
cert-manager objects reference each other and the mounted Secret, the
ServiceMonitor selects a Service port, and the Grafana dashboard queries only
metrics distproxy exports.

Exit status 0 when everything holds, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tomllib
from typing import Any, Iterable

import yaml

# The metrics distproxy's admin endpoint exports: the constants of
# src/metrics.rs (tests/deploy.rs checks both lists are the same). The
# dashboard may query only these (histograms also as _bucket/_sum/_count).
KNOWN_METRICS = {
    "distproxy_registered_nodes",
    "distproxy_epmd_requests_total",
    "distproxy_lookups_held_total",
    "distproxy_lookup_hold_seconds",
    "distproxy_lookups_waiting",
    "distproxy_routes_total",
    "distproxy_dist_connections_open",
    "distproxy_dist_connections_total",
    "distproxy_relayed_bytes_total",
    "distproxy_handshake_phase_seconds",
    "distproxy_connections_closed_total",
    "distproxy_tls_handshake_failures_total",
    "distproxy_misroutes_total",
    "distproxy_dist_beam_tls_connections_total",
    "distproxy_build_info",
    "distproxy_egress_listeners",
    "distproxy_tls_reloads_total",
    "distproxy_tls_reload_failures_total",
    "distproxy_tls_certificate_not_after_timestamp_seconds",
    "distproxy_connections_refused_total",
    "distproxy_accept_failures_total",
    "distproxy_write_timeouts_total",
    "distproxy_lookups_dropped_total",
    "distproxy_discovery_members",
    "distproxy_discovery_pods",
    "distproxy_discovery_refresh_errors_total",
    "distproxy_acl_denied_total",
    "distproxy_acl_rules",
    "distproxy_acl_reloads_total",
    "distproxy_acl_reload_failures_total",
    "distproxy_relay_connections_total",
    "distproxy_relay_fast_path_available",
    "distproxy_relay_fast_path_fallbacks_total",
    "distproxy_relay_node_routes_total",
    "distproxy_relay_node_routes_missed_total",
    "distproxy_relay_node_routes_available",
    "distproxy_relay_half_close_timeouts_total",
}
HISTOGRAMS = {"distproxy_lookup_hold_seconds", "distproxy_handshake_phase_seconds"}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DeploymentConfig"}
SIDECAR = "distproxy"
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def __bool__(self) -> bool:
        return bool(self.items)


def load_documents(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise SystemExit(f"{path}: document {i} is not a mapping")
    return docs


def ident(doc: dict) -> str:
    name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc.get("metadata"), dict) else "?"
    return f"{doc.get('kind', '?')}/{name}"


# ---------------------------------------------------------------- schemas ---


_SCHEMA_CACHE: dict[tuple[str, str], Any] = {}


def core_validator(version: str, filename: str) -> Any:
    """A strict validator for one schema file of kubernetes-validate's bundle
    (loaded once: the definitions are large), or None if there is no such file."""
    import jsonschema
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    key = (version, filename)
    if key not in _SCHEMA_CACHE:
        d = schema_dir(version)
        try:
            schema = kv.schema_contents(f"{d}/{filename}", version)
        except FileNotFoundError:
            _SCHEMA_CACHE[key] = None
            return None
        defs_key = (version, "_definitions.json")
        if defs_key not in _SCHEMA_CACHE:
            _SCHEMA_CACHE[defs_key] = Resource.from_contents(kv.schema_contents(f"{d}/_definitions.json", version))
        registry = _SCHEMA_CACHE[defs_key] @ (Resource.from_contents(schema) @ Registry())
        _SCHEMA_CACHE[key] = jsonschema.validators.Draft202012Validator(schema, registry=registry)
    return _SCHEMA_CACHE[key]


def report(validator: Any, doc: Any, version: str, where: str, what: str, problems: Problems) -> None:
    for err in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.path]):
        path = ".".join(str(p) for p in err.path)
        problems.add(where, f"{what} invalid for Kubernetes {version}: {path}: {err.message}")


def validate_core(doc: dict, versions: list[str], problems: Problems) -> bool:
    """Strict schema validation, as kubernetes-validate --strict does it;
    False when its bundle has no schema for the kind."""
    # rbac.authorization.k8s.io/v1 -> rbac-v1, apps/v1 -> apps-v1, v1 -> v1
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    filename = f"{doc['kind'].lower()}-{api}.json"
    for version in versions:
        validator = core_validator(version, filename)
        if validator is None:
            return False
        report(validator, doc, version, ident(doc), doc["kind"], problems)
    return True


def schema_dir(version: str) -> str:
    import kubernetes_validate.utils as kv

    version = version.lstrip("v")
    candidates = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(version)]
    if not candidates:
        raise SystemExit(f"kubernetes-validate has no schemas for {version}")
    return f"kubernetes-json-schema/v{candidates[-1]}-local-strict"


def validate_pod_template(template: Any, versions: list[str], where: str, problems: Problems) -> None:
    """The core PodTemplateSpec schema, strict, as inside a Deployment."""
    for version in versions:
        report(core_validator(version, "podtemplatespec-v1.json"), template, version, where,
               "pod template", problems)


def unknown_keys(given: Any, kept: Any, path: str) -> Iterable[str]:
    """Keys present in the input but dropped by the model: unknown fields."""
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                yield f"{path}.{key}".lstrip(".")
            else:
                yield from unknown_keys(value, kept[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (g, k) in enumerate(zip(given, kept)):
            yield from unknown_keys(g, k, f"{path}[{i}]")


# CRDs validated with cloudcoil's models (module, class); imported only when
# such an object is present (building the pydantic models takes seconds).
CRD_MODELS = {
    ("cert-manager.io/v1", "Certificate"): ("cloudcoil.models.cert_manager.v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"): ("cloudcoil.models.cert_manager.v1", "Issuer"),
    ("cert-manager.io/v1", "ClusterIssuer"): ("cloudcoil.models.cert_manager.v1", "ClusterIssuer"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("cloudcoil.models.prometheus_operator.v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"): ("cloudcoil.models.prometheus_operator.v1", "PodMonitor"),
}


def crd_model(api_version: str, kind: str) -> Any:
    import importlib

    found = CRD_MODELS.get((api_version, kind))
    if found is None:
        return None
    return getattr(importlib.import_module(found[0]), found[1])


def validate_crd(doc: dict, model: Any, problems: Problems) -> None:
    import pydantic

    try:
        obj = model.model_validate(doc)
    except pydantic.ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            problems.add(ident(doc), f"invalid {doc['kind']}: {loc}: {err['msg']}")
        return
    kept = obj.model_dump(by_alias=True, exclude_unset=True, mode="json")
    for key in unknown_keys(doc, kept, ""):
        problems.add(ident(doc), f"unknown field {key} (not in the {doc['apiVersion']} {doc['kind']} schema)")


DC_SPEC_FIELDS = {
    "replicas", "selector", "template", "strategy", "triggers", "revisionHistoryLimit",
    "minReadySeconds", "paused", "test",
}
DC_STRATEGY_FIELDS = {
    "type", "rollingParams", "recreateParams", "customParams", "resources", "labels",
    "annotations", "activeDeadlineSeconds",
}
DC_ROLLING_FIELDS = {
    "updatePeriodSeconds", "intervalSeconds", "timeoutSeconds", "maxUnavailable", "maxSurge",
    "pre", "post",
}


def validate_deployment_config(doc: dict, versions: list[str], problems: Problems) -> None:
    where = ident(doc)
    for key in doc:
        if key not in {"apiVersion", "kind", "metadata", "spec", "status"}:
            problems.add(where, f"unknown field {key}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        problems.add(where, "spec is missing")
        return
    for key in spec:
        if key not in DC_SPEC_FIELDS:
            problems.add(where, f"unknown field spec.{key}")
    if not isinstance(spec.get("replicas", 1), int):
        problems.add(where, "spec.replicas is not an integer")
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not selector or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        problems.add(where, "spec.selector must be a non-empty map of label names to values")
    strategy = spec.get("strategy") or {}
    for key in strategy:
        if key not in DC_STRATEGY_FIELDS:
            problems.add(where, f"unknown field spec.strategy.{key}")
    if strategy.get("type", "Rolling") not in {"Rolling", "Recreate", "Custom"}:
        problems.add(where, f"spec.strategy.type {strategy.get('type')!r} is not Rolling, Recreate or Custom")
    for key in strategy.get("rollingParams") or {}:
        if key not in DC_ROLLING_FIELDS:
            problems.add(where, f"unknown field spec.strategy.rollingParams.{key}")
    for i, trigger in enumerate(spec.get("triggers") or []):
        if not isinstance(trigger, dict) or trigger.get("type") not in {"ConfigChange", "ImageChange"}:
            problems.add(where, f"spec.triggers[{i}].type must be ConfigChange or ImageChange")
    if "template" not in spec:
        problems.add(where, "spec.template is missing")
    else:
        validate_pod_template(spec["template"], versions, where, problems)


def validate_document(doc: dict, versions: list[str], problems: Problems) -> None:
    where = ident(doc)
    meta = doc.get("metadata")
    if not isinstance(doc.get("apiVersion"), str) or not isinstance(doc.get("kind"), str):
        problems.add(where, "apiVersion and kind must be strings")
        return
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        problems.add(where, "metadata.name is missing")
        return
    if not DNS1123_SUBDOMAIN.match(meta["name"]) or len(meta["name"]) > 253:
        problems.add(where, "metadata.name is not a valid DNS-1123 name")
    model = crd_model(doc["apiVersion"], doc["kind"])
    if model is not None:
        validate_crd(doc, model, problems)
    elif (doc["apiVersion"], doc["kind"]) == ("apps.openshift.io/v1", "DeploymentConfig"):
        validate_deployment_config(doc, versions, problems)
    elif not validate_core(doc, versions, problems):
        problems.add(where, f"no schema for {doc['apiVersion']} {doc['kind']}: add a validator to {__file__}")


# ------------------------------------------------------ cross-references ---


def pod_spec(workload: dict) -> dict:
    return ((workload.get("spec") or {}).get("template") or {}).get("spec") or {}


def pod_labels(workload: dict) -> dict:
    return (((workload.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def selector_labels(workload: dict) -> dict:
    selector = (workload.get("spec") or {}).get("selector") or {}
    if workload["kind"] == "DeploymentConfig":
        return selector
    if selector.get("matchExpressions"):
        return {"__unsupported__": "matchExpressions"}
    return selector.get("matchLabels") or {}


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(spec: dict) -> dict[Any, int]:
    """Container port names and numbers of every container, init ones included."""
    ports: dict[Any, int] = {}
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        for p in c.get("ports") or []:
            ports[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                ports[p["name"]] = p["containerPort"]
    return ports


def port_of(listen: Any) -> int | None:
    if isinstance(listen, list):
        listen = listen[0] if listen else None
    if not isinstance(listen, str) or ":" not in listen:
        return None
    try:
        return int(listen.rsplit(":", 1)[1])
    except ValueError:
        return None


def mount_for(container: dict, volumes: dict[str, dict], path: str) -> tuple[dict, dict] | None:
    """The (volumeMount, volume) under which `path` lies in the container."""
    best = None
    for m in container.get("volumeMounts") or []:
        mount = m["mountPath"].rstrip("/")
        if path == mount or path.startswith(mount + "/"):
            if best is None or len(mount) > len(best[0]["mountPath"].rstrip("/")):
                best = (m, volumes.get(m["name"]))
    return best


def env_value(container: dict, name: str) -> str | None:
    for e in container.get("env") or []:
        if e.get("name") == name:
            return e.get("value")
    return None


def module_dirs(spec: dict, container: dict) -> set[str]:
    """Where `container` can load distproxy_epmd.beam from: /opt/distproxy/ebin
    (an application image with the module built in), and its mounts of volumes
    that an init container fills with `distproxy install-module DIR`."""
    filled: set[str] = set()
    for ic in spec.get("initContainers") or []:
        words = (ic.get("command") or []) + (ic.get("args") or [])
        if "install-module" not in words or words.index("install-module") + 1 >= len(words):
            continue
        target = words[words.index("install-module") + 1].rstrip("/")
        for m in ic.get("volumeMounts") or []:
            if m["mountPath"].rstrip("/") == target and not m.get("readOnly"):
                filled.add(m["name"])
    dirs = {"/opt/distproxy/ebin"}
    for m in container.get("volumeMounts") or []:
        if m["name"] in filled:
            dirs.add(m["mountPath"].rstrip("/"))
    return dirs


def code_paths(flags: str) -> set[str]:
    """The directories `-pa DIR ...` adds to a node's code path."""
    words, dirs = flags.split(), set()
    for i, w in enumerate(words):
        if w == "-pa":
            for d in words[i + 1:]:
                if d.startswith("-"):
                    break
                dirs.add(d.rstrip("/"))
    return dirs


def check_env_references(container: dict, where: str, problems: Problems) -> None:
    """$(VAR) in an env value expands only if VAR is defined earlier."""
    defined: set[str] = set()
    for e in container.get("env") or []:
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value") or ""):
            if ref not in defined:
                problems.add(where, f"env {e['name']} uses $({ref}), which is not defined before it")
        defined.add(e["name"])


def check_probe(probe: Any, path: str, admin_port: int | None, ports: dict, where: str, problems: Problems) -> None:
    if not isinstance(probe, dict) or not isinstance(probe.get("httpGet"), dict):
        problems.add(where, f"needs an httpGet probe on {path}")
        return
    get = probe["httpGet"]
    if get.get("path") != path:
        problems.add(where, f"probe path is {get.get('path')!r}, expected {path!r}")
    if ports.get(get.get("port")) != admin_port:
        problems.add(where, f"probe port {get.get('port')!r} is not the admin port {admin_port}")


def check_workload(docs: list[dict], workload: dict, config_source: str | None, problems: Problems) -> None:
    where = ident(workload)
    spec = pod_spec(workload)
    labels = pod_labels(workload)
    if not matches(selector_labels(workload), labels):
        problems.add(where, "the selector does not match the pod template's labels")
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    ports = container_ports(spec)
    sec = spec.get("securityContext") or {}
    if not sec.get("runAsNonRoot"):
        problems.add(where, "pod securityContext.runAsNonRoot must be true")
    if (sec.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.add(where, "pod securityContext.seccompProfile.type must be RuntimeDefault")

    sidecars = [c for c in spec.get("initContainers") or [] if c.get("name") == SIDECAR]
    if len(sidecars) != 1:
        problems.add(where, f"needs exactly one init container named {SIDECAR!r} (the native sidecar)")
        return
    sidecar = sidecars[0]
    swhere = f"{where} container {SIDECAR}"
    if sidecar.get("restartPolicy") != "Always":
        problems.add(swhere, "restartPolicy must be Always (a native sidecar that outlives the BEAM nodes)")
    if spec.get("initContainers", [])[0].get("name") != SIDECAR:
        problems.add(swhere, "must be the first init container, so that nothing waits for it")

    # The configuration file the sidecar reads, and the ConfigMap behind it.
    args = sidecar.get("args") or []
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        problems.add(swhere, "args must pass --config FILE")
        return
    config_path = args[args.index("--config") + 1]
    found = mount_for(sidecar, volumes, config_path)
    if found is None or found[1] is None or "configMap" not in found[1]:
        problems.add(swhere, f"{config_path} is not on a mounted ConfigMap volume")
        return
    mount, volume = found
    cm_name = volume["configMap"]["name"]
    key = os.path.relpath(config_path, mount["mountPath"])
    cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name]
    if not cms:
        problems.add(swhere, f"ConfigMap {cm_name} (volume {mount['name']}) is not in the manifests")
        return
    text = (cms[0].get("data") or {}).get(key)
    if text is None:
        problems.add(swhere, f"ConfigMap {cm_name} has no key {key}")
        return
    if config_source is not None:
        with open(config_source, encoding="utf-8") as f:
            if f.read() != text:
                problems.add(swhere, f"ConfigMap {cm_name} key {key} differs from {config_source}, the file check-config validates")
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problems.add(swhere, f"{config_path} is not valid TOML: {e}")
        return

    epmd, dist, admin = config.get("epmd", {}), config.get("dist", {}), config.get("admin", {})
    expected_ports = {
        "epmd": port_of(epmd.get("listen", "0.0.0.0:4369")),
        "dist": dist.get("advertise_port") or port_of(dist.get("listen", "0.0.0.0:43691")),
        "admin": port_of(admin.get("listen", "0.0.0.0:9369")),
    }
    sidecar_ports = {p.get("name"): p["containerPort"] for p in sidecar.get("ports") or []}
    for name, number in expected_ports.items():
        if sidecar_ports.get(name) != number:
            problems.add(swhere, f"container port {name} is {sidecar_ports.get(name)}, the configuration says {number}")
    if port_of(dist.get("listen", "0.0.0.0:43691")) != expected_ports["dist"]:
        problems.add(swhere, "[dist] advertise_port differs from the listen port, but the pod exposes only one")
    if admin.get("ready_nodes"):
        problems.add(swhere, "[admin] ready_nodes must be empty: /readyz is the startup probe the BEAM nodes wait for")

    admin_port = expected_ports["admin"]
    check_probe(sidecar.get("startupProbe"), "/readyz", admin_port, ports, swhere + " startupProbe", problems)
    check_probe(sidecar.get("readinessProbe"), "/readyz", admin_port, ports, swhere + " readinessProbe", problems)
    check_probe(sidecar.get("livenessProbe"), "/healthz", admin_port, ports, swhere + " livenessProbe", problems)

    def needs_volume(path: str | None, kind: str, what: str) -> dict | None:
        if not path:
            return None
        found = mount_for(sidecar, volumes, path)
        if found is None or found[1] is None:
            problems.add(swhere, f"{what} {path} is on no mounted volume")
            return None
        if kind not in found[1]:
            problems.add(swhere, f"{what} {path} must be on a {kind} volume, not {sorted(found[1])}")
            return None
        if kind == "emptyDir" and found[0].get("readOnly"):
            problems.add(swhere, f"{what} {path} is on a read-only mount")
        return found[1]

    needs_volume(epmd.get("state_file"), "emptyDir", "[epmd] state_file")
    tls = config.get("tls") or {}
    tls_volumes = [needs_volume(tls.get(k), "secret", f"[tls] {k}") for k in ("cert_file", "key_file", "ca_file")]
    secret_names = {v["secret"]["secretName"] for v in tls_volumes if v}
    cert_secrets = {d["spec"].get("secretName") for d in docs if d["kind"] == "Certificate"}
    for name in secret_names:
        if cert_secrets and name not in cert_secrets:
            problems.add(swhere, f"TLS Secret {name} is not the secretName of any Certificate")

    for c in spec.get("initContainers", []) + spec.get("containers", []):
        cwhere = f"{where} container {c['name']}"
        res = c.get("resources") or {}
        if not (res.get("requests") or {}).get("memory") or not (res.get("limits") or {}).get("memory"):
            problems.add(cwhere, "needs memory requests and limits")
        csec = c.get("securityContext") or {}
        if csec.get("allowPrivilegeEscalation") is not False or not csec.get("readOnlyRootFilesystem"):
            problems.add(cwhere, "needs allowPrivilegeEscalation: false and readOnlyRootFilesystem: true")
        if "ALL" not in ((csec.get("capabilities") or {}).get("drop") or []):
            problems.add(cwhere, "must drop all capabilities")
        image = c.get("image", "")
        if ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
            problems.add(cwhere, f"image {image!r} has no tag (is it in the kustomization's images?)")
        check_env_references(c, cwhere, problems)

    # The tunnel: with TLS on, outgoing traffic must go through the sidecar
    # (otherwise it leaves the pod in plaintext, and a require_tls peer
    # refuses it); the sidecar must answer egress requests and dial the
    # remote sidecars on the port they listen on.
    tunnel = config.get("tunnel") or {}
    egress = tunnel.get("egress", True)
    tls_on = all(tls.get(k) for k in ("cert_file", "key_file", "ca_file"))
    if tls_on and not egress:
        problems.add(swhere, "[tls] is configured but [tunnel] egress is off: outgoing traffic would bypass TLS")
    if tunnel.get("remote_port", 43691) != expected_ports["dist"]:
        problems.add(swhere, f"[tunnel] remote_port {tunnel.get('remote_port', 43691)} is not the pods' distribution port {expected_ports['dist']}")

    # The BEAM side: every application container runs nodes that register
    # with the sidecar and listen on loopback only.
    for c in spec.get("containers") or []:
        cwhere = f"{where} container {c['name']}"
        flags = " ".join(filter(None, (env_value(c, n) for n in ("ERL_FLAGS", "ERL_AFLAGS", "ELIXIR_ERL_OPTIONS"))))
        for flag in ("-start_epmd false", "-kernel inet_dist_use_interface {127,0,0,1}"):
            if flag not in flags:
                problems.add(cwhere, f"BEAM flags lack `{flag}`")
        # Step 1 of turning TLS on (deploy/README.md, "Upgrade order") has TLS without
        # the tunnel flags; once TLS is required, every pod must send it.
        uses_module = "-epmd_module distproxy_epmd" in flags
        if tls_on and tls.get("require_tls") and not uses_module:
            problems.add(cwhere, "[tls] require_tls is on but the BEAM flags lack `-epmd_module distproxy_epmd`: "
                         "outgoing traffic would bypass the TLS tunnel and be refused by the other pods")
        if uses_module and not code_paths(flags) & module_dirs(spec, c):
            problems.add(cwhere, "-epmd_module distproxy_epmd but no `-pa DIR` holds distproxy_epmd.beam "
                         "(a mount of a volume an init container fills with `distproxy install-module DIR`, "
                         "or /opt/distproxy/ebin in the application image): the nodes would not start")
        if uses_module and not egress:
            problems.add(cwhere, "-epmd_module distproxy_epmd but [tunnel] egress is off")
        if workload["kind"] == "StatefulSet":
            host = env_value(c, "NODE_HOST") or ""
            want = f"$(POD_NAME).{workload['spec'].get('serviceName')}."
            if not host.startswith(want):
                problems.add(cwhere, f"NODE_HOST {host!r} should start with {want!r} (the pod's DNS name)")

    # Services in front of the pods.
    regular_port_names = {
        p["name"] for c in spec.get("containers") or [] for p in c.get("ports") or [] if "name" in p
    }
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [s for s in services if matches((s.get("spec") or {}).get("selector") or {}, labels)]
    if not selected:
        problems.add(where, "no Service selects the pods")
    for s in services:
        swh = ident(s)
        sspec = s.get("spec") or {}
        if s not in selected:
            problems.add(swh, "its selector matches no pod")
            continue
        for p in sspec.get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            if target not in ports:
                problems.add(swh, f"port {p.get('name')} targets {target!r}, which no container declares")
            elif isinstance(target, str) and target not in regular_port_names:
                # Before Kubernetes 1.32 the endpoint controllers look port
                # names up in `containers` only.
                problems.add(
                    swh,
                    f"port {p.get('name')} targets {target!r} by name, a port of an init container "
                    "(native sidecar): Kubernetes before 1.32 gives the Service no endpoints for it; "
                    f"use the number {ports[target]}",
                )
        numbers = sorted(p["port"] for p in sspec.get("ports") or [])
        if sspec.get("clusterIP") == "None":
            if not sspec.get("publishNotReadyAddresses"):
                problems.add(swh, "a headless Service for node names needs publishNotReadyAddresses: true")
            if sorted(numbers) != sorted([expected_ports["epmd"], expected_ports["dist"]]):
                problems.add(swh, f"declares ports {numbers}, expected EPMD and distribution")
        elif numbers != sorted(expected_ports.values()):
            problems.add(swh, f"declares ports {numbers}, expected exactly {sorted(expected_ports.values())}")
    if not any((s.get("spec") or {}).get("clusterIP") == "None" for s in selected):
        problems.add(where, "no headless Service (clusterIP: None) for the pods' DNS names")
    if workload["kind"] == "StatefulSet":
        svc = workload["spec"].get("serviceName")
        if not any(s["metadata"]["name"] == svc and s["spec"].get("clusterIP") == "None" for s in selected):
            problems.add(where, f"serviceName {svc!r} is not a headless Service selecting the pods")

    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    if not pdbs:
        problems.add(where, "no PodDisruptionBudget")
    for pdb in pdbs:
        if not matches(((pdb.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}, labels):
            problems.add(ident(pdb), "its selector does not match the pods")


def check_cert_manager(docs: list[dict], problems: Problems) -> None:
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    ca_secrets = {d["spec"].get("secretName") for d in docs if d["kind"] == "Certificate" and d["spec"].get("isCA")}
    for d in docs:
        if d["kind"] == "Certificate":
            ref = d["spec"].get("issuerRef") or {}
            if ref.get("kind", "Issuer") == "Issuer" and ref.get("name") not in issuers:
                problems.add(ident(d), f"issuerRef names Issuer {ref.get('name')!r}, which is not in the manifests")
            if not d["spec"].get("isCA"):
                usages = set(d["spec"].get("usages") or [])
                if not {"server auth", "client auth"} <= usages:
                    problems.add(ident(d), "mutual TLS needs usages `server auth` and `client auth`")
        if d["kind"] == "Issuer" and "ca" in d.get("spec", {}):
            if d["spec"]["ca"].get("secretName") not in ca_secrets:
                problems.add(ident(d), "its CA Secret is made by no isCA Certificate in the manifests")


def check_service_monitors(docs: list[dict], problems: Problems) -> None:
    services = [d for d in docs if d["kind"] == "Service"]
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        labels = ((sm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        selected = [s for s in services if matches(labels, s["metadata"].get("labels") or {})]
        if not selected:
            problems.add(ident(sm), "selects no Service")
        for ep in sm["spec"].get("endpoints") or []:
            if not any(p.get("name") == ep.get("port") for s in selected for p in s["spec"].get("ports") or []):
                problems.add(ident(sm), f"endpoint port {ep.get('port')!r} is on no selected Service")
            if ep.get("path", "/metrics") != "/metrics":
                problems.add(ident(sm), "distproxy serves metrics on /metrics")


def dashboard_metrics(dashboard: dict) -> Iterable[str]:
    def walk(node: Any) -> Iterable[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in {"expr", "query", "definition"} and isinstance(v, str):
                    yield v
                else:
                    yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    for expr in walk(dashboard):
        yield from re.findall(r"\b(distproxy_[a-z0-9_]+)", expr)


def check_dashboards(docs: list[dict], problems: Problems) -> int:
    count = 0
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for key, text in (cm.get("data") or {}).items():
            if not key.endswith(".json"):
                continue
            count += 1
            where = f"{ident(cm)} {key}"
            try:
                dash = json.loads(text)
            except json.JSONDecodeError as e:
                problems.add(where, f"not JSON: {e}")
                continue
            panels = [p for p in dash.get("panels") or [] if p.get("type") != "row"]
            if not panels:
                problems.add(where, "a dashboard without panels")
            ids = [p.get("id") for p in dash.get("panels") or []]
            if len(ids) != len(set(ids)):
                problems.add(where, "panel ids are not unique")
            used = set()
            for metric in dashboard_metrics(dash):
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                if metric in KNOWN_METRICS or (base in HISTOGRAMS and base != metric):
                    used.add(base if base in HISTOGRAMS else metric)
                else:
                    problems.add(where, f"queries {metric}, which distproxy does not export")
            if not used:
                problems.add(where, "queries no distproxy metric")
            for p in panels:
                if not p.get("targets"):
                    problems.add(where, f"panel {p.get('title')!r} has no query")
    return count


def render(args: argparse.Namespace) -> int:
    docs = load_documents(args.file)
    problems = Problems()
    if not docs:
        problems.add(args.file, "renders to nothing")
    seen = set()
    for doc in docs:
        validate_document(doc, args.kubernetes_version, problems)
        key = (doc.get("apiVersion"), doc.get("kind"), (doc.get("metadata") or {}).get("name"))
        if key in seen:
            problems.add(ident(doc), "defined twice")
        seen.add(key)
    if not problems:
        workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
        if [w["kind"] for w in workloads] != [args.workload_kind]:
            problems.add(args.file, f"expected one {args.workload_kind}, found {[ident(w) for w in workloads]}")
        for w in workloads:
            check_workload(docs, w, args.config_source, problems)
        check_cert_manager(docs, problems)
        check_service_monitors(docs, problems)
        dashboards = check_dashboards(docs, problems)
        if args.expect_dashboard and dashboards == 0:
            problems.add(args.file, "no Grafana dashboard ConfigMap")
        for kind in args.expect_kind or []:
            if not any(d["kind"] == kind for d in docs):
                problems.add(args.file, f"no {kind}")
    for p in problems.items:
        print(f"ERROR {p}")
    kinds = ", ".join(sorted({d.get("kind", "?") for d in docs}))
    print(f"{args.file}: {len(docs)} objects ({kinds}) against Kubernetes {', '.join(args.kubernetes_version)}: "
          f"{'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


def same_pod(args: argparse.Namespace) -> int:
    """The sidecar, the volumes and the app container (but for the per-kind
    differences: NODE_HOST, the UID) must be the same in every workload."""
    def canonical(path: str) -> dict:
        docs = load_documents(path)
        w = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
        if len(w) != 1:
            raise SystemExit(f"{path}: expected one workload")
        spec = json.loads(json.dumps(pod_spec(w[0])))
        for c in spec.get("containers") or []:
            c["env"] = [e for e in c.get("env") or [] if e.get("name") != "NODE_HOST"]
            for k in ("runAsUser", "runAsGroup"):
                (c.get("securityContext") or {}).pop(k, None)
        for v in spec.get("volumes") or []:
            if "configMap" in v:
                v["configMap"]["name"] = re.sub(r"-[a-z0-9]{10}$", "", v["configMap"]["name"])
        return spec

    first = canonical(args.files[0])
    rc = 0
    for path in args.files[1:]:
        other = canonical(path)
        if other != first:
            a = json.dumps(first, indent=1, sort_keys=True).splitlines()
            b = json.dumps(other, indent=1, sort_keys=True).splitlines()
            import difflib
            diff = "\n".join(difflib.unified_diff(a, b, args.files[0], path, lineterm="", n=2))
            print(f"ERROR the pod templates of {args.files[0]} and {path} differ:\n{diff}")
            rc = 1
    if rc == 0:
        print(f"pod templates agree: {', '.join(args.files)}")
    return rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="validate one rendered kustomization")
    r.add_argument("file")
    r.add_argument("--workload-kind", required=True, choices=sorted(WORKLOAD_KINDS))
    r.add_argument("--config-source", help="the TOML file the sidecar's ConfigMap must hold, byte for byte")
    r.add_argument("-k", "--kubernetes-version", action="append", help="repeatable; default 1.29 and the newest bundled")
    r.add_argument("--expect-kind", action="append", help="a kind that must be present (repeatable)")
    r.add_argument("--expect-dashboard", action="store_true")
    s = sub.add_parser("same-pod", help="compare the pod templates of rendered kustomizations")
    s.add_argument("files", nargs="+")
    sub.add_parser("known-metrics", help="print the metric names the dashboard may use")
    args = parser.parse_args()
    if args.command == "render":
        if not args.kubernetes_version:
            import kubernetes_validate.utils as kv
            args.kubernetes_version = ["1.29", kv.major_minor(kv.latest_version())]
        return render(args)
    if args.command == "same-pod":
        return same_pod(args)
    print("\n".join(sorted(KNOWN_METRICS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
