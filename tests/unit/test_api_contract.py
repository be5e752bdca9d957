"""The published API keeps its conventions: every method declares its scope, every
RPC has its own request and response, every list paginates."""

from __future__ import annotations

from server.api import SERVICES, method_scopes
from stitchgraph.v1 import annotations_pb2


def test_every_method_declares_a_required_scope() -> None:
    for service in SERVICES:
        for method in service.descriptor.methods:
            scope = method.GetOptions().Extensions[annotations_pb2.required_scope]
            assert scope != annotations_pb2.SCOPE_UNSPECIFIED, f"{service.name}.{method.name}"


def test_reads_need_read_and_operator_calls_need_admin() -> None:
    scopes = method_scopes()
    assert scopes["/stitchgraph.v1.IdentityService/GetPerson"] == "read"
    assert scopes["/stitchgraph.v1.IdentityService/Identify"] == "ingest"
    assert scopes["/stitchgraph.v1.IdentityService/MergePersons"] == "admin"
    assert scopes["/stitchgraph.v1.IdentityService/ErasePerson"] == "admin"


def test_each_rpc_has_its_own_request_and_response_messages() -> None:
    for service in SERVICES:
        for method in service.descriptor.methods:
            assert method.input_type.name == f"{method.name}Request", method.full_name
            assert method.output_type.name == f"{method.name}Response", method.full_name


def test_every_list_method_paginates() -> None:
    for service in SERVICES:
        for method in service.descriptor.methods:
            if method.name.startswith("List"):
                assert {"page_size", "page_token"} <= set(method.input_type.fields_by_name), method.full_name
                assert "next_page_token" in method.output_type.fields_by_name, method.full_name
