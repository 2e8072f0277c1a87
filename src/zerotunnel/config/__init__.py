"""zerotunnel.config."""
