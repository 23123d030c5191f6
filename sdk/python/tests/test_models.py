"""The models against the OpenAPI document the broker serves: same fields,
same required ones for requests, so the SDK cannot drift from the API."""

from __future__ import annotations

from typing import Any

import httpx

from leasehold import models

from conftest import Broker


def flatten(doc: dict[str, Any], schema: dict[str, Any]) -> tuple[set[str], set[str]]:
    """A schema's property names and required names, `allOf` and `$ref` resolved."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return flatten(doc, doc["components"]["schemas"][name])
    props, required = set(schema.get("properties", {})), set(schema.get("required", []))
    for part in schema.get("allOf", []):
        p, r = flatten(doc, part)
        props |= p
        required |= r
    return props, required


def test_every_model_matches_its_schema(broker: Broker) -> None:
    doc = httpx.get(broker.url + "/v1/openapi.json").json()
    schemas = doc["components"]["schemas"]
    checked = []
    for model in models.ALL_MODELS:
        name = model.__schema__  # type: ignore[attr-defined]
        assert name in schemas, f"{model.__name__}: no schema {name} in the document"
        props, required = flatten(doc, schemas[name])
        fields = {f.alias or n for n, f in model.model_fields.items()}
        assert fields == props, f"{model.__name__} vs {name}: only in the model {fields - props}, only in the document {props - fields}"
        model_required = {f.alias or n for n, f in model.model_fields.items() if f.is_required()}
        if issubclass(model, models._Request):
            assert model_required == required, f"{model.__name__}: required {model_required} vs {required}"
        else:
            # a response model must not insist on what the broker may omit
            assert model_required <= required, f"{model.__name__}: requires {model_required - required}"
        checked.append(name)
    # every schema the assistants' routes use is covered
    for path, method in [("/v1/tasks", "post"), ("/v1/tasks/{id}", "get"), ("/v1/tasks/{id}/complete", "post"),
                         ("/v1/tasks/{id}/calls", "post"), ("/v1/tasks/{id}/leases", "post"),
                         ("/v1/approvals/{id}", "get"), ("/v1/leases/{id}", "get"),
                         ("/v1/leases/{id}/revoke", "post"), ("/v1/tasks/{id}/proxy-credentials", "post")]:
        op = doc["paths"][path][method]
        refs = []
        body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
        refs.append(body.get("$ref"))
        for status, r in op["responses"].items():
            if status.startswith("2"):
                refs.append(r.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref"))
        for ref in filter(None, refs):
            assert ref.rsplit("/", 1)[1] in checked, f"{method.upper()} {path}: {ref} has no model"
