"""zerotunnel.identity."""
