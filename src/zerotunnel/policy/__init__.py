"""zerotunnel.policy."""
