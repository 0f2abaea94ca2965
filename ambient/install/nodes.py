"""The node components: the ztunnel DaemonSet and the CNI DaemonSet (installer + agent).

Pure: ``ztunnel_daemonset(values)`` and ``cni_daemonset(values, config)`` return dicts.

Invariants (Istio's chart and ``notes/istio-contract.md`` §O, §M):
- ztunnel is not hostNetwork, unprivileged with exactly NET_ADMIN, SYS_ADMIN and NET_RAW
  (drop ALL), ``system-node-critical``, tolerates every taint, rolls with maxSurge 1 /
  maxUnavailable 0 (the new ztunnel takes the pods over ZDS and binds with SO_REUSEPORT
  before the old one drains), readiness on 15021, metrics annotated on 15020.
- The CNI agent shares the host's network and PID namespaces (probe SNAT and setup live in
  the host netns; pod netns paths from the runtime are host paths), with the contract's
  capabilities; its installer copies the plugin onto the host before the agent starts.
- The ZDS socket dir ``/var/run/ztunnel`` and the plugin socket dir are hostPaths at the same
  path on the host and in both containers.
"""

from __future__ import annotations

from typing import Any

from ambient.install.common import (
    BPF_PIN_DIR,
    CNI,
    CNI_CONFIGMAP,
    CNI_RUN_DIR,
    ZDS_DIR,
    ZTUNNEL,
    Obj,
    checksum,
    downward_env,
    env,
    field_env,
    host_path,
    mesh_client_env,
    mesh_client_mounts,
    mesh_client_volumes,
    meta,
    mount,
    pod_labels,
)
from ambient.install.values import Values

ZTUNNEL_CAPS = ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]
CNI_CAPS = ["NET_ADMIN", "NET_RAW", "SYS_PTRACE", "SYS_ADMIN", "DAC_OVERRIDE"]
TERMINATION_GRACE_S = 30


def _caps(add: list[str]) -> Obj:
    return {"drop": ["ALL"], "add": list(add)}


def _tolerate_all() -> list[Obj]:
    return [{"operator": "Exists", "effect": "NoSchedule"},
            {"operator": "Exists", "effect": "NoExecute"},
            {"key": "CriticalAddonsOnly", "operator": "Exists"}]


def ztunnel_daemonset(v: Values) -> Obj:
    ns = v.namespace
    e = [*mesh_client_env(ns, v.trust_domain, v.cluster_id, v.log_level),
         env("INPOD_UDS", f"{ZDS_DIR}/ztunnel.sock"), *downward_env(),
         env("TERMINATION_GRACE_PERIOD_SECONDS", str(TERMINATION_GRACE_S))]
    volumes = [*mesh_client_volumes(), host_path("cni-ztunnel-sock-dir", ZDS_DIR),
               {"name": "tmp", "emptyDir": {}}]
    mounts = [*mesh_client_mounts(), mount("cni-ztunnel-sock-dir", ZDS_DIR),
              mount("tmp", "/tmp")]
    if v.ebpf:  # ztunnel reads the original destinations the eBPF capture pins
        e.append(env("BPF_PIN_DIR", BPF_PIN_DIR))
        volumes.append(host_path("bpffs", "/sys/fs/bpf"))
        mounts.append(mount("bpffs", "/sys/fs/bpf", propagation="HostToContainer"))
    container = {
        "name": "istio-proxy",
        "image": v.image,
        "imagePullPolicy": v.pull_policy,
        "command": ["python", "-m", "ztunnel"],
        "env": e,
        "ports": [{"name": "ztunnel-stats", "containerPort": 15020, "protocol": "TCP"},
                  {"name": "health", "containerPort": 15021, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021},
                           "periodSeconds": 5, "failureThreshold": 3},
        "resources": v.resources.ztunnel.to_k8s(),
        "securityContext": {
            "privileged": False,
            # Kubernetes rejects allowPrivilegeEscalation=false together with SYS_ADMIN.
            "allowPrivilegeEscalation": True,
            "readOnlyRootFilesystem": True,
            "runAsUser": 0, "runAsGroup": 1337, "runAsNonRoot": False,
            "capabilities": _caps(ZTUNNEL_CAPS),
        },
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": meta(ZTUNNEL, ZTUNNEL, ns),
        "spec": {
            "selector": {"matchLabels": {"app": ZTUNNEL}},
            "updateStrategy": {"type": "RollingUpdate",
                               "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": pod_labels(ZTUNNEL),
                    "annotations": {"prometheus.io/scrape": "true",
                                    "prometheus.io/port": "15020",
                                    "prometheus.io/path": "/stats/prometheus"},
                },
                "spec": {
                    "serviceAccountName": ZTUNNEL,
                    "automountServiceAccountToken": False,  # no Kubernetes API access
                    "priorityClassName": "system-node-critical",
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "tolerations": _tolerate_all(),
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def cni_config(v: Values) -> dict[str, str]:
    """The agent's settings (ConfigMap data, read as environment by ``cni.agent_main``)."""
    data = {
        "CAPTURE_BACKEND": v.capture,
        "EXCLUDE_NAMESPACES": ",".join(v.cni.exclude_namespaces),
        "LOG_LEVEL": v.log_level,
        "ZDS_SOCKET": f"{ZDS_DIR}/ztunnel.sock",
        "CNI_AGENT_RUN_DIR": CNI_RUN_DIR,
        "AGENT_READY_ADDR": "0.0.0.0:8000",
    }
    if v.ebpf:
        data["BPF_PIN_DIR"] = BPF_PIN_DIR
        data["CAPTURE_CGROUP"] = "/host/sys/fs/cgroup"
    return data


def cni_configmap(v: Values) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": meta(CNI_CONFIGMAP, CNI, v.namespace), "data": cni_config(v)}


def _cni_security(caps: list[str]) -> Obj:
    return {"privileged": False, "allowPrivilegeEscalation": True, "runAsUser": 0,
            "runAsGroup": 0, "runAsNonRoot": False, "readOnlyRootFilesystem": True,
            "capabilities": _caps(caps)}


def cni_daemonset(v: Values) -> Obj:
    ns = v.namespace
    host_bin, host_conf = v.cni.bin_dir, v.cni.conf_dir
    volumes = [host_path("cni-bin-dir", host_bin), host_path("cni-net-dir", host_conf),
               host_path("cni-run-dir", CNI_RUN_DIR), host_path("cni-ztunnel-sock-dir", ZDS_DIR),
               host_path("host-netns", "/var/run/netns"),
               host_path("xtables-lock", "/run/xtables.lock", "FileOrCreate"),
               {"name": "tmp", "emptyDir": {}}]
    agent_mounts = [mount("cni-run-dir", CNI_RUN_DIR), mount("cni-ztunnel-sock-dir", ZDS_DIR),
                    mount("host-netns", "/var/run/netns", propagation="HostToContainer"),
                    mount("xtables-lock", "/run/xtables.lock"), mount("tmp", "/tmp")]
    if v.ebpf:
        volumes += [host_path("bpffs", "/sys/fs/bpf"),
                    host_path("cgroup", v.cni.cgroup_root, "Directory")]
        agent_mounts += [mount("bpffs", "/sys/fs/bpf", propagation="HostToContainer"),
                         mount("cgroup", "/host/sys/fs/cgroup")]
    installer = {
        "name": "install-cni",
        "image": v.image,
        "imagePullPolicy": v.pull_policy,
        "command": ["python", "-m", "ambient.install.hostplugin", "install",
                    "--conf-dir", "/host/etc/cni/net.d", "--bin-dir", "/host/opt/cni/bin",
                    "--host-bin-dir", host_bin, "--host-python", v.cni.host_python,
                    "--pod-namespace", ns],
        "securityContext": _cni_security([]),
        "resources": v.resources.cni.to_k8s(),
        "volumeMounts": [mount("cni-bin-dir", "/host/opt/cni/bin"),
                         mount("cni-net-dir", "/host/etc/cni/net.d")],
    }
    agent = {
        "name": "cni-agent",
        "image": v.image,
        "imagePullPolicy": v.pull_policy,
        "command": ["python", "-m", "cni.agent_main", "run", "--kubernetes"],
        "envFrom": [{"configMapRef": {"name": CNI_CONFIGMAP}}],
        "env": [field_env("NODE_NAME", "spec.nodeName"),
                field_env("POD_NAMESPACE", "metadata.namespace")],
        "ports": [{"name": "ready", "containerPort": 8000, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8000},
                           "periodSeconds": 5, "failureThreshold": 3},
        "resources": v.resources.cni.to_k8s(),
        "securityContext": _cni_security(CNI_CAPS),
        "volumeMounts": agent_mounts,
    }
    template_meta: dict[str, Any] = {
        "labels": pod_labels(CNI),
        "annotations": {"ambient.io/config-checksum": checksum(cni_config(v))},
    }
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": meta(CNI, CNI, ns),
        "spec": {
            "selector": {"matchLabels": {"app": CNI}},
            "updateStrategy": {"type": "RollingUpdate",
                               "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": template_meta,
                "spec": {
                    "serviceAccountName": CNI,
                    "hostNetwork": True,
                    "hostPID": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "tolerations": _tolerate_all(),
                    "terminationGracePeriodSeconds": 5,
                    "initContainers": [installer],
                    "containers": [agent],
                    "volumes": volumes,
                },
            },
        },
    }


CLEANUP = "ambient-node-cleanup"


def cni_cleanup_daemonset(cni_ds: Obj) -> Obj:
    """Run by ``ambientctl uninstall`` after the agent is gone: on every node, remove our
    CNI chaining and plugin, then every pod capture the agent's checkpoint records.  The
    work is an init container; the pod turns Ready only once it succeeded (that is what
    uninstall waits for), then uninstall deletes this DaemonSet too.

    ``cni_ds`` is the CNI DaemonSet as installed (live or rendered): the clean-up uses its
    image, settings and host mounts, so it undoes what that installation did."""
    spec = cni_ds["spec"]["template"]["spec"]
    agent = next(c for c in spec["containers"] if c["name"] == "cni-agent")
    init = next(c for c in spec.get("initContainers", []) if c["name"] == "install-cni")
    image, pull = agent["image"], agent.get("imagePullPolicy", "IfNotPresent")
    cleanup = {
        "name": "cleanup",
        "image": image,
        "imagePullPolicy": pull,
        "command": ["sh", "-c",
                    "python -m ambient.install.hostplugin uninstall --conf-dir "
                    "/host/etc/cni/net.d --bin-dir /host/opt/cni/bin && "
                    "python -m cni.agent_main uninstall"],
        "envFrom": agent["envFrom"],
        "resources": agent["resources"],
        "securityContext": agent["securityContext"],
        "volumeMounts": init["volumeMounts"] + agent["volumeMounts"],
    }
    done = {
        "name": "done",
        "image": image,
        "imagePullPolicy": pull,
        "command": ["python", "-c", "import signal; signal.pause()"],
        "resources": {"requests": {"cpu": "1m", "memory": "16Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                            "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "runAsUser": 1337, "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": meta(CLEANUP, CLEANUP, cni_ds["metadata"]["namespace"]),
        "spec": {
            "selector": {"matchLabels": {"app": CLEANUP}},
            "template": {
                "metadata": {"labels": pod_labels(CLEANUP)},
                "spec": {
                    "serviceAccountName": CNI,
                    "automountServiceAccountToken": False,
                    "hostNetwork": True, "hostPID": True,
                    "priorityClassName": "system-node-critical",
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "tolerations": _tolerate_all(),
                    "terminationGracePeriodSeconds": 1,
                    "initContainers": [cleanup],
                    "containers": [done],
                    "volumes": spec["volumes"],
                },
            },
        },
    }
