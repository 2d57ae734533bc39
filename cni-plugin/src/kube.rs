//! CONTRACT (to be implemented): the pod lookup from the kubeconfig, with Istio-compatible retry policy.
