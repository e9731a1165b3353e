"""Fixtures for the deployment tests."""

from __future__ import annotations

import pytest

from deploy.certs import CertBundle, generate_certs


@pytest.fixture(scope="module")
def loopback_certs(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    """CA + server certificate for 127.0.0.1/localhost and keys for h1, h2 and an unregistered 'rogue'."""
    return generate_certs(tmp_path_factory.mktemp("certs"), ["IP:127.0.0.1", "DNS:localhost"],
                          ["h1", "h2", "rogue"])
