"""The local cluster harness: "nodes" and "pods" as network namespaces on this machine.

Everything here runs as root and never changes the host's own network namespace: the underlay
bridge, node routers and pods all live in namespaces the harness creates, names and records in
a state file so that a later run (or ``ambientctl down``) can remove them after a crash.

Modules: ``netlink`` (netns, veth, addresses, routes, sysctls), ``cni`` (a small CNI runtime
driving the real reference plugins), ``cgroups`` (per-pod cgroup v2 and processes), ``capture``
(the in-pod redirection rules of istio-cni), ``echo`` (the pod test application and probes) and
``cluster`` (``LocalCluster`` tying them together).
"""
