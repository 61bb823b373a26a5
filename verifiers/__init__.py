"""Verifiers: score model responses. Imports only stdlib, sympy and grpcio (never torch/ray/vllm)."""

from verifiers.base import Task, Verdict, Verifier
from verifiers.config import VerifierConfig
from verifiers.pool import VerifierPool
from verifiers.registry import UnknownVerifierError, available, load

# `RemoteVerifierPool` lives in `verifiers.service` (imports grpc only when a service is used).
__all__ = ["Task", "UnknownVerifierError", "Verdict", "Verifier", "VerifierConfig", "VerifierPool", "available", "load"]
