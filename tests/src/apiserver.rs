//! HTTPS Kubernetes API server stub (to be implemented).
