"""Root conftest: registers the fixture modules that start real components."""

pytest_plugins = [
    "tests.infra.guard",
    "tests.infra.registry",
    "tests.infra.faultproxy",
    "tests.infra.vault",
    "tests.infra.devserver",
]
