#!/usr/bin/env python3
"""Turns `kubectl kustomize` output into what `podman kube play` (4.3) runs.

Only what podman lacks is changed; every container spec (image, command,
args, env, ports, probes, mounts, security context) is kept as rendered:

- A Deployment or StatefulSet becomes one Pod per replica named like the
  controller would name it (<name>-0, <name>-1 for both kinds; a Deployment's
  real names are random), with the template's labels.
- Native sidecars (init containers with restartPolicy: Always, Kubernetes
  1.29) become the first regular containers. Podman would run them to
  completion before the application, so the test starts the containers in
  order itself and waits on the sidecar's startupProbe in between, as the
  kubelet does (`probe` prints the probe).
- Container `ports` and probes are dropped: podman 4.3 publishes every
  containerPort on the host (Kubernetes does not; the host's 4369 must stay
  free) and turns probes into systemd-timer health checks; the test runs
  the startupProbe itself (`probe` prints it, from the rendered YAML).
- Downward API fields podman 4.3 does not fill (status.podIP,
  metadata.namespace) become literal values; `$(VAR)` references in later
  env values are expanded the way the kubelet expands them.
- secretKeyRef env values come from --secret NAME=DIR (podman 4.3 reads
  only its own secret store, in its own format); `secret` volumes become
  hostPath volumes of DIR, a directory laid out like the kubelet's Secret
  mounts (podman 4.3 crashes on secret volumes).
- --image NAME=LOCAL replaces an image name (the manifests' CHANGE-ME
  registry is a placeholder, and not even a valid reference).
- A StatefulSet's pods get hostAliases with every pod's DNS name under its
  headless Service (<pod>.<serviceName>.<namespace>.svc.cluster.local),
  standing in for cluster DNS.
- ConfigMaps are written to a separate file for `podman kube play
  --configmap` (podman mounts them natively).

Usage:
  kube2podman.py pods RENDERED OUT_PODS OUT_CONFIGMAPS --pod NAME=IP ...
                 [--namespace NS] [--secret NAME=DIR ...] [--image NAME=LOCAL ...]
  kube2podman.py probe RENDERED WORKLOAD   -> "<port> <path>" of the sidecar's
                                               startupProbe
  kube2podman.py service-ports RENDERED SERVICE -> "<port> ..." declared
"""

import argparse
import copy
import os
import re
import sys

import yaml

WORKLOADS = ("Deployment", "StatefulSet")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def workload(docs, name=None):
    found = [d for d in docs if d["kind"] in WORKLOADS and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        sys.exit(f"expected exactly one workload{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def sidecars(spec):
    return [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]


def read_secret(directory, key):
    with open(os.path.join(directory, key)) as f:
        return f.read()


def expand(value, env):
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def fix_env(container, pod_name, pod_ip, namespace, secrets):
    known = {}
    out = []
    for var in container.get("env", []):
        var = dict(var)
        source = var.pop("valueFrom", None)
        if source is None:
            var["value"] = expand(var.get("value", ""), known)
        elif "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            values = {"status.podIP": pod_ip, "metadata.name": pod_name, "metadata.namespace": namespace}
            if field not in values:
                sys.exit(f"unsupported fieldRef {field}")
            var["value"] = values[field]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if ref["name"] not in secrets:
                sys.exit(f"no --secret for {ref['name']}")
            var["value"] = read_secret(secrets[ref["name"]], ref["key"])
        else:
            sys.exit(f"unsupported valueFrom {source}")
        known[var["name"]] = var["value"]
        out.append(var)
    if out:
        container["env"] = out


def pods(args):
    docs = load(args.rendered)
    namespace = args.namespace
    secrets = dict(s.split("=", 1) for s in args.secret)
    images = dict(s.split("=", 1) for s in args.image)
    w = workload(docs)
    template = w["spec"]["template"]
    entries = [e.split("=", 1) for e in args.pod]
    aliases = []
    if w["kind"] == "StatefulSet":
        service = w["spec"]["serviceName"]
        aliases = [
            {"ip": ip, "hostnames": [f"{name}.{service}.{namespace}.svc.cluster.local"]}
            for name, ip in entries
        ]
    out = []
    for name, ip in entries:
        spec = copy.deepcopy(template["spec"])
        if aliases:
            spec["hostAliases"] = aliases
        native = sidecars(spec)
        rest = [c for c in spec.get("initContainers", []) if c not in native]
        for c in native:
            del c["restartPolicy"]
        # Plain init containers (install-module) become ordinary containers
        # too: the test runs them to completion between the sidecar's
        # startup probe and the application, in the kubelet's order
        # (podman's own init containers are removed once run, and cannot be
        # ordered after a sidecar).
        spec.pop("initContainers", None)
        spec["containers"] = native + rest + spec["containers"]
        if rest:
            # A container that has finished its job must stay finished:
            # podman applies the pod's restart policy to every container.
            spec["restartPolicy"] = "Never"
        for c in spec["containers"]:
            fix_env(c, name, ip, namespace, secrets)
            c["image"] = images.get(c["image"], c["image"])
            for key in ("ports", "startupProbe", "readinessProbe", "livenessProbe"):
                c.pop(key, None)
        for v in spec.get("volumes", []):
            if "secret" in v:
                secret = v.pop("secret")["secretName"]
                if secret not in secrets:
                    sys.exit(f"no --secret for volume {v['name']} ({secret})")
                v["hostPath"] = {"path": secrets[secret], "type": "Directory"}
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": dict(template["metadata"].get("labels", {})),
                },
                "spec": spec,
            }
        )
    with open(args.out_pods, "w") as f:
        yaml.safe_dump_all(out, f, sort_keys=False)
    with open(args.out_configmaps, "w") as f:
        yaml.safe_dump_all([d for d in docs if d["kind"] == "ConfigMap"], f, sort_keys=False)


def probe(args):
    w = workload(load(args.rendered), args.workload)
    spec = w["spec"]["template"]["spec"]
    (sidecar,) = sidecars(spec)
    get = sidecar["startupProbe"]["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in sidecar["ports"] if p["name"] == port]
    print(port, get["path"])


def service_ports(args):
    (svc,) = [d for d in load(args.rendered) if d["kind"] == "Service" and d["metadata"]["name"] == args.service]
    print(" ".join(str(p["port"]) for p in svc["spec"]["ports"]))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pods")
    a.add_argument("rendered")
    a.add_argument("out_pods")
    a.add_argument("out_configmaps")
    a.add_argument("--pod", action="append", required=True)
    a.add_argument("--namespace", default="default")
    a.add_argument("--secret", action="append", default=[])
    a.add_argument("--image", action="append", default=[])
    a.set_defaults(run=pods)
    b = sub.add_parser("probe")
    b.add_argument("rendered")
    b.add_argument("workload")
    b.set_defaults(run=probe)
    c = sub.add_parser("service-ports")
    c.add_argument("rendered")
    c.add_argument("service")
    c.set_defaults(run=service_ports)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
