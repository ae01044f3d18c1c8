"""A scripted tour of every simulator route, errors included, checking that
every JSON response body validates against the matching response schema of
Xero's official OpenAPI description (xero_accounting.yaml /
xero-identity.yaml)."""

import functools
import re

import pytest
import requests
import yaml
from openapi_schema_validator import OAS30Validator

from conftest import CLIENT_ID, CLIENT_SECRET, HOLDINGS, OPENAPI_DIR, TRADING


@functools.lru_cache(maxsize=None)
def spec(name):
    with open(OPENAPI_DIR / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _resolve(doc, node):
    while isinstance(node, dict) and "$ref" in node and len(node) == 1:
        path = node["$ref"].lstrip("#/").split("/")
        node = doc
        for p in path:
            node = node[p]
    return node


def _template_for(doc, path, method):
    """The spec path template matching a concrete path and having the method."""
    segs = path.strip("/").split("/")
    best = None
    for tpl in doc["paths"]:
        tsegs = tpl.strip("/").split("/")
        if len(tsegs) != len(segs) or method.lower() not in doc["paths"][tpl]:
            continue
        literal = 0
        ok = True
        for t, s in zip(tsegs, segs):
            if t.startswith("{"):
                continue
            if t.lower() != s.lower():
                ok = False
                break
            literal += 1
        if ok and (best is None or literal > best[0]):
            best = (literal, tpl)
    return best[1] if best else None


@functools.lru_cache(maxsize=None)
def _validator(spec_name, tpl, method, status):
    doc = spec(spec_name)
    op = doc["paths"][tpl][method.lower()]
    resp = op["responses"].get(str(status))
    if resp is None and 400 <= status < 500:
        # The spec declares no error body for this route (e.g. a bad `where` on a GET);
        # Xero answers with its generic Error object there.
        schema = {"$ref": "#/components/schemas/Error"}
    else:
        assert resp is not None, f"spec has no {status} response for {method} {tpl}"
        resp = _resolve(doc, resp)
        schema = resp["content"]["application/json"]["schema"]
    root = {"components": doc["components"], **schema}
    return OAS30Validator(root)


CHECKED = []


def check(resp, spec_name="xero_accounting.yaml", prefix="/api.xro/2.0"):
    """Validate a response body against the spec's schema for its route and status."""
    path = resp.request.path_url.split("?")[0]
    assert path.startswith(prefix), path
    rel = path[len(prefix):] or "/"
    doc = spec(spec_name)
    tpl = _template_for(doc, rel, resp.request.method)
    assert tpl, f"no spec path for {rel}"
    body = resp.json()
    v = _validator(spec_name, tpl, resp.request.method, resp.status_code)
    errors = sorted(v.iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{resp.request.method} {rel} {resp.status_code}: " + "; ".join(
        f"{list(e.path)}: {e.message}" for e in errors[:5]
    )
    CHECKED.append((resp.request.method, tpl, resp.status_code))
    return body


class Xero:
    def __init__(self, base, token, tenant=HOLDINGS):
        self.base = base + "/api.xro/2.0"
        self.s = requests.Session()
        self.s.headers.update(
            {"Authorization": f"Bearer {token}", "xero-tenant-id": tenant, "Accept": "application/json"}
        )

    def __call__(self, method, path, **kw):
        return self.s.request(method, self.base + path, timeout=10, **kw)


def test_accounting_tour(sim, grant):
    x = Xero(sim, grant["tokens"]["access_token"])
    check(x("GET", "/Organisation"))
    accounts = check(x("GET", "/Accounts"))["Accounts"]
    assert any(a["Status"] == "ARCHIVED" for a in accounts)
    check(x("GET", "/Accounts", params={"where": 'Status=="ACTIVE" AND Type=="EXPENSE"', "order": "Code"}))
    check(x("GET", f"/Accounts/{accounts[0]['AccountID']}"))
    check(x("GET", "/TaxRates"))
    check(x("GET", "/Currencies"))

    # Contacts
    c = check(x("PUT", "/Contacts", json={"Contacts": [{
        "Name": "Tour Supplier Ltd", "ContactNumber": "TOUR-1", "EmailAddress": "ap@tour.example",
        "Addresses": [{"AddressType": "STREET", "City": "London"}],
        "Phones": [{"PhoneType": "DEFAULT", "PhoneNumber": "123"}],
    }]}))["Contacts"][0]
    cid = c["ContactID"]
    dup = x("PUT", "/Contacts", json={"Name": "Tour Supplier Ltd"})
    assert dup.status_code == 400
    assert "already assigned to another contact" in str(check(dup))
    check(x("GET", "/Contacts", params={"where": 'ContactNumber=="TOUR-1"'}))
    check(x("GET", "/Contacts", params={"searchTerm": "tour", "page": 1}))
    check(x("GET", f"/Contacts/{cid}"))
    check(x("GET", "/Contacts/TOUR-1"))
    check(x("POST", "/Contacts", json={"Contacts": [{"ContactID": cid, "FirstName": "Ann"}]}))
    check(x("POST", f"/Contacts/{cid}", json={"Contacts": [{"LastName": "Lee"}]}))
    bad = x("GET", "/Contacts", params={"where": 'Name=="'})
    assert bad.status_code == 400
    check(bad)

    # Invoices
    inv_body = {"Invoices": [{
        "Type": "ACCPAY", "Contact": {"ContactID": cid}, "InvoiceNumber": "T-1",
        "Date": "2026-11-25", "DueDate": "2026-12-25", "Status": "AUTHORISED",
        "LineAmountTypes": "Exclusive", "CurrencyCode": "EUR", "Reference": "Tour",
        "Url": "https://platform.example/i/1",
        "LineItems": [
            {"Description": "Gross salary", "Quantity": 1, "UnitAmount": 4000, "AccountCode": "477", "TaxType": "NONE"},
            {"Description": "Fee", "Quantity": 3, "UnitAmount": 33.3333, "AccountCode": "412", "TaxType": "INPUT2"},
        ],
    }]}
    inv = check(x("PUT", "/Invoices", params={"unitdp": 4}, json=inv_body, headers={"Idempotency-Key": "tour-1"}))["Invoices"][0]
    replay = x("PUT", "/Invoices", params={"unitdp": 4}, json=inv_body, headers={"Idempotency-Key": "tour-1"})
    assert check(replay)["Invoices"][0]["InvoiceID"] == inv["InvoiceID"]
    mismatch = x("PUT", "/Invoices", json={"Invoices": []}, headers={"Idempotency-Key": "tour-1"})
    assert mismatch.status_code == 400
    check(mismatch)
    iid = inv["InvoiceID"]
    check(x("GET", f"/Invoices/{iid}"))
    check(x("GET", "/Invoices", params={"where": f'Contact.ContactID==Guid("{cid}") AND InvoiceNumber=="T-1"', "page": 1}))
    check(x("POST", "/Invoices", json={"Invoices": [{"InvoiceID": iid, "Reference": "Tour 2"}]}))
    check(x("POST", f"/Invoices/{iid}", json={"Reference": "Tour 3"}))
    for lines, cur in [
        ([{"Description": "a", "Quantity": 1, "UnitAmount": 1, "AccountCode": "401"}], "GBP"),
        ([{"Description": "a", "Quantity": 1, "UnitAmount": 1, "AccountCode": "412", "TaxType": "NOPE"}], "GBP"),
        ([{"Description": "a", "Quantity": 1, "UnitAmount": 1, "AccountCode": "412"}], "JPY"),
    ]:
        b = {"Invoices": [{"Type": "ACCPAY", "Contact": {"ContactID": cid}, "Date": "2026-11-25",
                           "CurrencyCode": cur, "LineItems": lines}]}
        r = x("PUT", "/Invoices", json=b)
        assert r.status_code == 400
        assert check(r)["Type"] == "ValidationException"
        r = x("PUT", "/Invoices", params={"summarizeErrors": "false"}, json=b)
        assert r.status_code == 200
        assert check(r)["Invoices"][0]["StatusAttributeString"] == "ERROR"

    # Credit notes and allocations
    cn = check(x("PUT", "/CreditNotes", json={"CreditNotes": [{
        "Type": "ACCPAYCREDIT", "Contact": {"ContactID": cid}, "CreditNoteNumber": "TC-1",
        "Date": "2026-11-26", "Status": "AUTHORISED", "CurrencyCode": "EUR", "Reference": "Tour credit",
        "LineItems": [{"Description": "refund", "Quantity": 1, "UnitAmount": 50, "AccountCode": "477", "TaxType": "NONE"}],
    }]}))["CreditNotes"][0]
    cnid = cn["CreditNoteID"]
    check(x("GET", f"/CreditNotes/{cnid}"))
    check(x("GET", "/CreditNotes", params={"where": 'CreditNoteNumber=="TC-1"'}))
    check(x("POST", "/CreditNotes", json={"CreditNotes": [{"CreditNoteID": cnid, "Reference": "x"}]}))
    too_big = x("PUT", f"/CreditNotes/{cnid}/Allocations",
                json={"Allocations": [{"Amount": 60, "Date": "2026-11-26", "Invoice": {"InvoiceID": iid}}]})
    assert too_big.status_code == 400
    check(too_big)
    alloc = check(x("PUT", f"/CreditNotes/{cnid}/Allocations",
                    json={"Allocations": [{"Amount": 20, "Date": "2026-11-26", "Invoice": {"InvoiceID": iid}}]}))
    assert alloc["Allocations"][0]["Amount"] == 20
    check(x("GET", f"/CreditNotes/{cnid}"))
    check(x("GET", f"/Invoices/{iid}"))

    # Attachments
    for coll, did in [("Invoices", iid), ("CreditNotes", cnid)]:
        r = x("PUT", f"/{coll}/{did}/Attachments/doc.pdf", data=b"%PDF-1.4 tour",
              headers={"Content-Type": "application/pdf"})
        att = check(r)["Attachments"][0]
        assert att["ContentLength"] == 13
        check(x("POST", f"/{coll}/{did}/Attachments/doc2.pdf", data=b"%PDF", headers={"Content-Type": "application/pdf"}))
        assert len(check(x("GET", f"/{coll}/{did}/Attachments"))["Attachments"]) == 2
        raw = x("GET", f"/{coll}/{did}/Attachments/doc.pdf")
        assert raw.content == b"%PDF-1.4 tour"

    covered = {(m, t) for m, t, _ in CHECKED}
    for must in [("GET", "/Organisation"), ("GET", "/Accounts"), ("GET", "/TaxRates"), ("PUT", "/Contacts"),
                 ("PUT", "/Invoices"), ("PUT", "/CreditNotes"), ("PUT", "/CreditNotes/{CreditNoteID}/Allocations"),
                 ("PUT", "/Invoices/{InvoiceID}/Attachments/{FileName}")]:
        assert must in covered, must


def test_identity_and_auth_errors(sim, grant):
    at = grant["tokens"]["access_token"]
    r = requests.get(sim + "/connections", headers={"Authorization": f"Bearer {at}"}, timeout=5)
    assert r.status_code == 200
    conns = r.json()
    doc = spec("xero-identity.yaml")
    schema = doc["paths"]["/Connections"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    v = OAS30Validator({"components": doc["components"], **schema})
    assert not list(v.iter_errors(conns))
    assert {c["tenantId"] for c in conns} == {HOLDINGS, TRADING}
    for c in conns:
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}$", c["createdDateUtc"])
        assert c["tenantType"] == "ORGANISATION"
    # Token endpoint bodies look like Xero's.
    r = requests.post(sim + "/connect/token", auth=(CLIENT_ID, CLIENT_SECRET),
                      data={"grant_type": "refresh_token", "refresh_token": grant["tokens"]["refresh_token"]}, timeout=5)
    assert r.status_code == 200
    tok = r.json()
    assert set(tok) >= {"access_token", "expires_in", "token_type", "refresh_token", "scope", "id_token"}
    r = requests.post(sim + "/connect/token", auth=(CLIENT_ID, CLIENT_SECRET),
                      data={"grant_type": "refresh_token", "refresh_token": "nope"}, timeout=5)
    assert (r.status_code, r.json()) == (400, {"error": "invalid_grant"})
    # 401 / 403 bodies.
    x = Xero(sim, "bogus")
    r = x("GET", "/Organisation")
    assert r.status_code == 401 and r.json()["Title"] == "Unauthorized"
    x = Xero(sim, tok["access_token"], tenant="00000000-0000-0000-0000-000000000000")
    r = x("GET", "/Organisation")
    assert r.status_code == 403
    assert r.json()["Detail"] == "AuthenticationUnsuccessful"
    # Rate limit headers are present.
    x = Xero(sim, tok["access_token"])
    r = x("GET", "/Organisation")
    assert int(r.headers["X-MinLimit-Remaining"]) < 60
    assert "X-DayLimit-Remaining" in r.headers and "X-AppMinLimit-Remaining" in r.headers
