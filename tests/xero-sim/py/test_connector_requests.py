"""Every JSON request body the Xero connector sent during the Rust tests
(`host/tests/xero_connector.rs` saves the simulator's request log under
target/connector-requests/) validates against the request schema of Xero's
official OpenAPI description."""

import json
import os
import pathlib

import pytest
from openapi_schema_validator import OAS30Validator

from conftest import REPO_ROOT
from test_schema_tour import _resolve, _template_for, spec

TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or REPO_ROOT / "target")
LOGS = TARGET / "connector-requests"
PREFIX = "/api.xro/2.0"


def _request_validator(tpl, method):
    doc = spec("xero_accounting.yaml")
    op = doc["paths"][tpl][method.lower()]
    body = _resolve(doc, op["requestBody"])
    schema = body["content"]["application/json"]["schema"]
    return OAS30Validator({"components": doc["components"], **schema})


def test_connector_request_bodies_follow_the_spec():
    files = sorted(LOGS.glob("*.json"))
    if not files:
        if os.environ.get("CI"):
            pytest.fail(f"no request logs in {LOGS}: the Rust connector tests must run first")
        pytest.skip(f"no request logs in {LOGS} (run `cargo xtask test`)")
    seen = set()
    for f in files:
        for r in json.loads(f.read_text()):
            if r["method"] not in ("PUT", "POST") or not r.get("body_text"):
                continue
            path = r["uri"].split("?")[0]
            rel = path[len(PREFIX):]
            if "/Attachments/" in rel:
                continue  # raw bytes, not JSON
            doc = spec("xero_accounting.yaml")
            tpl = _template_for(doc, rel, r["method"])
            assert tpl, f"the connector called {r['method']} {rel}, which Xero's API does not have"
            body = json.loads(r["body_text"])
            errors = list(_request_validator(tpl, r["method"]).iter_errors(body))
            assert not errors, f"{f.name}: {r['method']} {rel}: " + "; ".join(
                f"{list(e.path)}: {e.message}" for e in errors[:5]
            )
            seen.add((r["method"], tpl))
    for needed in [("PUT", "/Contacts"), ("PUT", "/Invoices"), ("PUT", "/CreditNotes"),
                   ("PUT", "/CreditNotes/{CreditNoteID}/Allocations"),
                   ("PUT", "/CreditNotes/{CreditNoteID}/History")]:
        assert needed in seen, f"no {needed} request was checked; seen {sorted(seen)}"
