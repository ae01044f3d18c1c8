"""A ledgerport connector written in Python, built with componentize-py.

It implements the `connector` export of world `plugin` in
`wit/v0.1/connector.wit`, the same contract the Rust connectors implement:
each document is POSTed as JSON to `<endpoint>/documents` (connection
setting `endpoint`, default `https://hooks.example.com`) through the host's
`http` import with the connection's credentials (the host injects the
token; this code never sees it) and an `Idempotency-Key` from the delivery.
Every line kind must be mapped to an account code (`mapping` import); the
provider's answer becomes one outcome of the contract.

Build: `componentize-py -d wit/v0.1 -w plugin componentize app --stub-wasi
-p examples/python-connector -o python_connector.wasm` (`cargo xtask wasm`
does it). The `wit_world` package is generated at build time. With
`--stub-wasi` every WASI call traps, so this code never prints, reads the
clock or touches files: it logs through the `log` import.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import connection, http, log, mapping
from wit_world.imports.types import (
    AccountList,
    CheckReport,
    ConnectorInfo,
    DeliveryError_NeedsMapping,
    DeliveryError_NeedsReauth,
    DeliveryError_RateLimited,
    DeliveryError_Rejected,
    DeliveryError_Transient,
    DocumentKind,
    FieldError,
    Pdf_Bytes,
    RateLimit,
    Receipt,
)

ID = "python-webhook"
VERSION = "0.1.0"
DEFAULT_ENDPOINT = "https://hooks.example.com"


def endpoint() -> str:
    """The base URL documents go to (no trailing slash)."""
    for key, value in connection.info().settings:
        if key == "endpoint" and value:
            return value.rstrip("/")
    return DEFAULT_ENDPOINT


def accounts_for(doc) -> dict:
    """Each line kind's mapping; raises needs-mapping naming every unmapped
    kind (in the order they first appear), so the admin fixes all at once."""
    found, missing = {}, []
    for line in doc.lines:
        kind = line.kind
        if kind in found or kind in missing:
            continue
        m = mapping.lookup(kind)
        if m is None:
            missing.append(kind)
        else:
            found[kind] = m
    if missing:
        log.log(log.Level.WARN, f"unmapped line kinds: {', '.join(missing)}")
        raise Err(DeliveryError_NeedsMapping(missing))
    return found


def to_json(doc, accounts: dict) -> bytes:
    """The JSON this connector sends for a document."""
    pdf = doc.pdf
    out = {
        "id": doc.id,
        "kind": "invoice" if doc.kind == DocumentKind.INVOICE else "credit-note",
        "number": doc.number,
        "issue_date": doc.issue_date,
        "due_date": doc.due_date,
        "currency": doc.currency,
        "supplier": doc.supplier.name,
        "customer": doc.customer.name,
        "lines": [
            {
                "kind": line.kind,
                "description": line.description,
                "quantity": line.quantity,
                "unit_amount": line.unit_amount,
                "tax_amount": line.tax_amount,
                "line_amount": line.line_amount,
                "account_code": accounts[line.kind].account_code,
                "tax_type": accounts[line.kind].tax_type,
            }
            for line in doc.lines
        ],
        "subtotal": doc.subtotal,
        "total_tax": doc.total_tax,
        "total": doc.total,
        "credits_invoice_number": doc.credits_invoice_number,
        "pdf_bytes": len(pdf.value) if isinstance(pdf, Pdf_Bytes) else None,
    }
    return json.dumps(out).encode()


def header(resp, name: str):
    """A response header's value (names arrive lower-case), or None."""
    for k, v in resp.headers:
        if k == name:
            return v
    return None


def classify(resp):
    """Turn a non-2xx answer into the contract's outcome."""
    text = resp.body.decode("utf-8", "replace")
    status = resp.status
    if status in (401, 403):
        return DeliveryError_NeedsReauth(f"the endpoint answered {status}")
    if status == 429:
        try:
            secs = int((header(resp, "retry-after") or "").strip())
        except ValueError:
            secs = 60
        return DeliveryError_RateLimited(RateLimit(max(secs, 0), "endpoint"))
    if 400 <= status < 500:
        return DeliveryError_Rejected(
            [
                FieldError(
                    "document",
                    f"the endpoint refused the document ({status})",
                    text,
                )
            ]
        )
    return DeliveryError_Transient(f"the endpoint answered {status}: {text}")


def from_http(err):
    """The usual outcome for a failed host HTTP call."""
    if isinstance(err, http.Error_Unauthorized):
        return DeliveryError_NeedsReauth(err.value)
    if isinstance(err, http.Error_Denied):
        return DeliveryError_Rejected(
            [FieldError("connector", f"the host refused a request: {err.value}", None)]
        )
    return DeliveryError_Transient(f"the request failed: {err!r}")


class Connector(exports.Connector):
    """The `connector` export."""

    def describe(self) -> ConnectorInfo:
        return ConnectorInfo(
            ID, "Python webhook", VERSION, [DocumentKind.INVOICE, DocumentKind.CREDIT_NOTE]
        )

    def list_accounts(self) -> AccountList:
        return AccountList([], [])

    def check(self) -> CheckReport:
        return CheckReport(endpoint(), ["written in Python (componentize-py)"])

    def deliver(self, delivery, doc) -> Receipt:
        accounts = accounts_for(doc)
        url = f"{endpoint()}/documents"
        req = http.Request(
            http.Method.POST,
            url,
            [("idempotency-key", delivery.key), ("content-type", "application/json")],
            to_json(doc, accounts),
            False,  # no [oauth] in the manifest: the connection holds no token
        )
        try:
            resp = http.send(req)
        except Err as e:
            raise Err(from_http(e.value))
        if not 200 <= resp.status < 300:
            log.log(log.Level.WARN, f"{doc.number}: the endpoint answered {resp.status}")
            raise Err(classify(resp))
        external_id = delivery.key
        try:
            body = json.loads(resp.body)
            if isinstance(body, dict) and isinstance(body.get("id"), str):
                external_id = body["id"]
        except ValueError:
            pass
        log.log(log.Level.INFO, f"{doc.number} delivered as {external_id}")
        return Receipt(external_id, None, [])
