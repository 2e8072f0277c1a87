"""zerotunnel: a sidecar-less zero-trust service mesh (Istio ambient mode) in Python."""

__version__ = "0.1.0"
