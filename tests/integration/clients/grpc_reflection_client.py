"""Drives lagprobe's gRPC server with Python's official gRPC client the way grpcurl does:
everything (services, methods, message and enum types) is discovered through server
reflection, with no generated code and no .proto file. Prints one JSON object of what it saw;
the Rust test asserts on it. Usage: grpc_reflection_client.py HOST:PORT
(Not named grpc_reflection.py: the script's directory comes first on sys.path, and that name
would shadow the grpc_reflection package.)"""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.json_format import MessageToDict
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "lagprobe.v1.ConsistencyProbe"
HEALTH = "grpc.health.v1.Health"
# A probe waits for its write to show on the replica (the lab's delay, 1000 ms in the test),
# so a call may take seconds on a loaded machine; a hung server must still fail the script.
CALL_TIMEOUT_S = 60
CONNECT_TIMEOUT_S = 10


def fail(message):
    print(f"grpc_reflection_client.py: {message}", file=sys.stderr)
    sys.exit(1)


def to_dict(message):
    """JSON as grpcurl prints it, but with the .proto's field names (snake_case)."""
    return MessageToDict(message, preserving_proto_field_name=True)


def unary(channel, method):
    """A callable for a unary method, its messages built from the reflected descriptors."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return request_class, call


def method_table(service):
    """Every method with its message types, as `grpcurl describe` shows them."""
    return {
        method.name: {
            "input": method.input_type.full_name,
            "output": method.output_type.full_name,
            "server_streaming": method.server_streaming,
        }
        for method in service.methods
    }


def enum_number(pool, enum_name, value_name):
    """An enum value's number, looked up by name in the reflected descriptors."""
    return pool.FindEnumTypeByName(enum_name).values_by_name[value_name].number


def health_status(pool, channel):
    """The health service's answer for the probe service, by its enum value's name."""
    check = pool.FindServiceByName(HEALTH).methods_by_name["Check"]
    request_class, call = unary(channel, check)
    return to_dict(call(request_class(service=SERVICE), timeout=CALL_TIMEOUT_S))


def run_probes(pool, channel, count):
    """Run with the replica strategy, one probe at a time so each commit instant is clean."""
    run = pool.FindServiceByName(SERVICE).methods_by_name["Run"]
    request_class, call = unary(channel, run)
    request = request_class(
        strategy=enum_number(pool, "lagprobe.v1.Strategy", "STRATEGY_REPLICA"))
    request.schedule.count = count
    request.schedule.concurrency = 1
    return to_dict(call(request, timeout=CALL_TIMEOUT_S))


def rejected_run(pool, channel):
    """Run with a count past its maximum (10000): the server must refuse it, not run it."""
    run = pool.FindServiceByName(SERVICE).methods_by_name["Run"]
    request_class, call = unary(channel, run)
    request = request_class()
    request.schedule.count = 10_001
    try:
        answer = call(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return {"code": error.code().name, "details": error.details()}
    fail(f"Run with count 10001 was accepted: {to_dict(answer)}")


def observe(address):
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        fail(f"no gRPC server at {address} within {CONNECT_TIMEOUT_S} s")
    reflection = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(reflection.get_services())
    for expected in (SERVICE, HEALTH):
        if expected not in services:
            fail(f"reflection does not list {expected}: {services}")
    pool = descriptor_pool.DescriptorPool(reflection)
    seen = {
        "services": services,
        "methods": method_table(pool.FindServiceByName(SERVICE)),
        "health": health_status(pool, channel),
        "run": run_probes(pool, channel, count=2),
        "invalid": rejected_run(pool, channel),
    }
    channel.close()
    return seen


def main():
    if len(sys.argv) != 2:
        fail("usage: grpc_reflection_client.py HOST:PORT")
    try:
        seen = observe(sys.argv[1])
    except grpc.RpcError as error:
        fail(f"call failed: {error.code().name}: {error.details()}")
    except KeyError as error:
        fail(f"reflection has no {error}")
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
