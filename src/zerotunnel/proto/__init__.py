"""zerotunnel.proto."""
