"""ZDS messages between the CNI agent and the node proxy (`istio.workload.zds`)."""
