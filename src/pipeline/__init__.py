"""orchestrator-pipeline: the container stages of a GitLab CI pipeline."""

__version__ = "0.1.0"
