#!/usr/bin/env python3
"""Checks an Orchard router from a plain gRPC client (grpcio), the way a non-Rust user sees it.

  python3 deploy/tests/grpc_client.py 127.0.0.1:50051 [--prompt TEXT] [--max-tokens N]

1. grpc.health.v1 reports SERVING;
2. server reflection lists the services and includes orchard.v1.Orchard;
3. one streamed Generate returns tokens and a final message carrying timings.
Stubs are generated at run time with grpcio-tools from proto/ into a temporary folder.
Needs: pip install grpcio grpcio-tools grpcio-health-checking grpcio-reflection
Exit code 0 when every check passes, 1 otherwise.
"""

import argparse
import importlib
import os
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

PROTO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "proto")
PROTOS = ["orchard/v1/common.proto", "orchard/v1/router.proto"]


def generate_stubs(out_dir):
    """Compiles the Orchard protos into out_dir and returns the router modules."""
    from grpc_tools import protoc
    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(PROTOS))
    sys.path.insert(0, out_dir)
    return (importlib.import_module("orchard.v1.common_pb2"),
            importlib.import_module("orchard.v1.router_pb2"),
            importlib.import_module("orchard.v1.router_pb2_grpc"))


def check_health(channel, timeout):
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=timeout).status
    if status != health_pb2.HealthCheckResponse.SERVING:
        raise AssertionError(f"health: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    print("health: SERVING")


def list_services(channel, timeout):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), timeout=timeout)
    names = sorted(s.name for r in responses for s in r.list_services_response.service)
    print("reflection services:", ", ".join(names))
    if "orchard.v1.Orchard" not in names:
        raise AssertionError("reflection does not list orchard.v1.Orchard")


def run_generate(channel, modules, prompt, max_tokens, timeout):
    common_pb2, _router_pb2, router_grpc = modules
    request = common_pb2.GenerateRequest(
        prompt=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens))
    tokens, text, final = 0, [], None
    for chunk in router_grpc.OrchardStub(channel).Generate(request, timeout=timeout):
        tokens += len(chunk.token_ids)
        text.append(chunk.text)
        if chunk.HasField("final"):
            final = chunk.final
    print("generated:", repr("".join(text)))
    if tokens == 0:
        raise AssertionError("no tokens streamed")
    if final is None or not final.HasField("timings"):
        raise AssertionError("no final message with timings")
    t = final.timings
    print(f"final: {common_pb2.FinishReason.Name(final.finish_reason)}, {tokens} tokens, worker "
          f"{t.worker_id}, ttft {t.ttft_s:.4f}s, router ttft {t.router_ttft_s:.4f}s, "
          f"router e2e {t.router_e2e_s:.4f}s, retries {t.retries}")
    if not t.worker_id or t.router_e2e_s <= 0 or t.router_e2e_s < t.router_ttft_s:
        raise AssertionError(f"implausible timings: {t}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="router address, host:port")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    args = parser.parse_args()
    try:
        with tempfile.TemporaryDirectory(prefix="orchard-stubs-") as out_dir:
            modules = generate_stubs(out_dir)
            with grpc.insecure_channel(args.address) as channel:
                check_health(channel, args.timeout)
                list_services(channel, args.timeout)
                run_generate(channel, modules, args.prompt, args.max_tokens, args.timeout)
    except (AssertionError, RuntimeError, grpc.RpcError) as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
