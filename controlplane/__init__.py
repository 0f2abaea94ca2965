"""controlplane: xDS and CA servers fed by Kubernetes or manifests. Not built yet (issue 4)."""
