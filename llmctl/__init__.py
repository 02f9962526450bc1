"""llmctl: build, train, evaluate and sample decoder-only language models from configuration."""

__version__ = "0.1.0"
