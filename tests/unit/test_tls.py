"""TLS flags: validation at startup (clear errors naming the flag), and the contexts and gRPC material they give."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from shepherd.cli import build_parser, config_from_args
from shepherd.config import ConfigError, GatewayConfig, TlsConfig
from shepherd.sim.config import SimConfig, add_sim_arguments
from shepherd.tls import grpc_tls, worker_context


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> dict[str, str]:
    """Paths: ca, server cert/key, client cert/key, a key of another certificate, an encrypted key, garbage."""
    d = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name, leaf in (("server", ca.issue_cert("127.0.0.1")), ("client", ca.issue_cert("gateway"))):
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
    key = serialization.load_pem_private_key((d / "client.key").read_bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    (d / "encrypted.key").write_bytes(encrypted)
    (d / "garbage.pem").write_text("not PEM\n")
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key", "encrypted.key", "garbage.pem")
    return {name.replace(".", "_"): str(d / name) for name in names}


def parse(*argv: str) -> GatewayConfig:
    return config_from_args(build_parser().parse_args(["launch", *argv]))


def test_no_tls_flags_keep_the_defaults():
    tls = parse().tls
    assert tls == TlsConfig() and not tls.to_workers
    assert worker_context(tls) is None and grpc_tls(tls) is None


def test_flags_fill_the_tls_config(pem):
    config = parse(
        "--tls-cert-path", pem["server_pem"], "--tls-key-path", pem["server_key"],
        "--ca-cert-paths", pem["ca_pem"], pem["ca_pem"], "--ca-cert-paths", pem["ca_pem"],
        "--client-cert-path", pem["client_pem"], "--client-key-path", pem["client_key"],
    )  # fmt: skip
    assert config.tls == TlsConfig(
        pem["server_pem"], pem["server_key"], (pem["ca_pem"],) * 3, pem["client_pem"], pem["client_key"]
    )
    assert config.redacted()["tls"]["ca_cert_paths"] == (pem["ca_pem"],) * 3  # paths only: nothing to redact


@pytest.mark.parametrize(
    ("flag", "other"),
    [
        ("--tls-cert-path", "server_pem"),
        ("--tls-key-path", "server_key"),
        ("--client-cert-path", "client_pem"),
        ("--client-key-path", "client_key"),
    ],
)
def test_a_certificate_and_its_key_go_together(pem, flag, other):
    with pytest.raises(ConfigError, match="go together: give both or neither"):
        parse(flag, pem[other])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ca-cert-paths", "/nonexistent/ca.pem"), "--ca-cert-paths: no such file: /nonexistent/ca.pem"),
        (("--ca-cert-paths", "{garbage_pem}"), "--ca-cert-paths: cannot load CA certificates from .*garbage.pem"),
        (("--tls-cert-path", "{server_pem}", "--tls-key-path", "/nonexistent/key"), "--tls-key-path: no such file"),
        (("--tls-cert-path", "{garbage_pem}", "--tls-key-path", "{server_key}"), "cannot load certificate .*garbage"),
        (("--tls-cert-path", "{server_pem}", "--tls-key-path", "{client_key}"), "KEY_VALUES_MISMATCH"),
        (("--client-cert-path", "{client_pem}", "--client-key-path", "{encrypted_key}"), "key is encrypted"),
    ],
)
def test_files_that_do_not_load_fail_at_startup_naming_the_flag(pem, args, message):
    with pytest.raises(ConfigError, match=message):
        parse(*(arg.format(**pem) for arg in args))


def test_workers_are_verified_against_the_system_roots_plus_the_extra_cas(pem):
    tls = TlsConfig(
        ca_cert_paths=(pem["ca_pem"],), client_cert_path=pem["client_pem"], client_key_path=pem["client_key"]
    )
    context = worker_context(tls)
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]
    assert context.cert_store_stats()["x509_ca"] == system + 1


def test_grpc_channels_get_the_same_roots_and_the_client_certificate(pem):
    tls = TlsConfig(
        ca_cert_paths=(pem["ca_pem"],), client_cert_path=pem["client_pem"], client_key_path=pem["client_key"]
    )
    material = grpc_tls(tls)
    assert material is not None
    ca = Path(pem["ca_pem"]).read_bytes()
    assert material.root_certificates is not None and material.root_certificates.endswith(ca)
    system = ssl.get_default_verify_paths().cafile
    if system and Path(system).is_file():
        assert material.root_certificates.startswith(Path(system).read_bytes())
    assert material.private_key == Path(pem["client_key"]).read_bytes()
    assert material.certificate_chain == Path(pem["client_pem"]).read_bytes()
    assert grpc_tls(TlsConfig(ca_cert_paths=(pem["ca_pem"],))).private_key is None


def test_a_client_certificate_alone_keeps_the_default_roots(pem):
    material = grpc_tls(TlsConfig(client_cert_path=pem["client_pem"], client_key_path=pem["client_key"]))
    assert material is not None and material.root_certificates is None


def sim_config(*argv: str) -> SimConfig:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    return SimConfig.from_args(parser.parse_args(list(argv)))


def test_the_simulator_takes_tls_flags_in_pairs(pem):
    assert not sim_config().tls
    config = sim_config("--tls-cert-path", pem["server_pem"], "--tls-key-path", pem["server_key"])
    assert config.tls and config.tls_client_ca is None
    with pytest.raises(ValueError, match="go together"):
        sim_config("--tls-cert-path", pem["server_pem"])
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        sim_config("--tls-client-ca", pem["ca_pem"])
