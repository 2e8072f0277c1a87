"""zerotunnel.testing."""
