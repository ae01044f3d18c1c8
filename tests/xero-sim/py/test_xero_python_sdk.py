"""The official Xero Python SDK (xero-python), pointed at the simulator,
completes a realistic session: refresh, connections, accounts, contact,
ACCPAY invoice, ACCPAYCREDIT credit note, attachment, allocation, revoke,
and deserialises every response without error."""

import datetime
from decimal import Decimal

import pytest
import requests
from xero_python.accounting import (
    CurrencyCode,
    AccountingApi,
    Allocation,
    Allocations,
    Contact,
    Contacts,
    CreditNote,
    CreditNotes,
    Invoice,
    Invoices,
    LineAmountTypes,
    LineItem,
)
from xero_python.api_client import ApiClient, Configuration
from xero_python.api_client.oauth2 import OAuth2Token, TokenApi
from xero_python.exceptions import AccountingBadRequestException
from xero_python.identity import IdentityApi

from conftest import CLIENT_ID, CLIENT_SECRET, HOLDINGS


@pytest.fixture()
def sdk(sim, grant, monkeypatch):
    # xero-python keeps the identity URLs as class attributes of TokenApi and the
    # API hosts as `base_url`; point all of them at the simulator.
    monkeypatch.setattr(TokenApi, "refresh_token_url", sim + "/connect/token")
    monkeypatch.setattr(TokenApi, "revoke_token_url", sim + "/connect/revocation")
    monkeypatch.setattr(TokenApi, "client_credentials_token_url", sim + "/connect/token")
    store = {}
    api_client = ApiClient(
        Configuration(oauth2_token=OAuth2Token(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)),
        pool_threads=1,
    )

    @api_client.oauth2_token_getter
    def _get():
        return store.get("token")

    @api_client.oauth2_token_saver
    def _save(token):
        store["token"] = token

    tokens = dict(grant["tokens"])
    tokens["scope"] = tokens["scope"].split()
    api_client.set_oauth2_token(tokens)
    return {
        "client": api_client,
        "store": store,
        "accounting": AccountingApi(api_client, base_url=sim + "/api.xro/2.0"),
        "identity": IdentityApi(api_client, base_url=sim),
        "sim": sim,
        "grant": grant,
    }


def test_full_session(sdk):
    client, acc, ident, sim = sdk["client"], sdk["accounting"], sdk["identity"], sdk["sim"]
    old_refresh = sdk["grant"]["tokens"]["refresh_token"]

    new = client.refresh_oauth2_token()
    assert new["access_token"] and new["refresh_token"] != old_refresh
    counters = requests.get(sim + "/_sim/counters", timeout=5).json()
    assert counters["refreshes"] == 1

    conns = ident.get_connections()
    tenant_ids = {str(c.tenant_id) for c in conns}
    assert HOLDINGS in tenant_ids
    assert all(c.tenant_type == "ORGANISATION" for c in conns)

    org = acc.get_organisations(HOLDINGS).organisations[0]
    assert org.name == "Acme Holdings Ltd"

    accounts = acc.get_accounts(HOLDINGS, where='Status=="ACTIVE" AND Type=="EXPENSE"', order="Code").accounts
    assert accounts and all(a.status == "ACTIVE" for a in accounts)
    assert acc.get_tax_rates(HOLDINGS).tax_rates

    contact = acc.create_contacts(
        HOLDINGS, Contacts(contacts=[Contact(name="SDK Supplier GmbH", contact_number="SDK-1")])
    ).contacts[0]
    assert contact.contact_id
    found = acc.get_contacts(HOLDINGS, where='ContactNumber=="SDK-1"').contacts
    assert [c.contact_id for c in found] == [contact.contact_id]
    with pytest.raises(AccountingBadRequestException) as e:
        acc.create_contacts(HOLDINGS, Contacts(contacts=[Contact(name="SDK Supplier GmbH")]))
    assert "already assigned to another contact" in str(e.value.body)

    invoice = Invoice(
        type="ACCPAY",
        contact=Contact(contact_id=contact.contact_id),
        invoice_number="SDK-INV-1",
        reference="November payroll",
        date=datetime.date(2026, 11, 25),
        due_date=datetime.date(2026, 12, 25),
        line_amount_types=LineAmountTypes.EXCLUSIVE,
        currency_code=CurrencyCode.GBP,
        status="AUTHORISED",
        url="https://platform.example/invoices/SDK-INV-1",
        line_items=[
            LineItem(description="Gross salary", quantity=1.0, unit_amount=4200.0, account_code="477", tax_type="NONE"),
            LineItem(description="Management fee", quantity=1.0, unit_amount=350.0, account_code="412", tax_type="INPUT2"),
        ],
    )
    created = acc.create_invoices(HOLDINGS, Invoices(invoices=[invoice]), idempotency_key="sdk-inv-1", unitdp=4).invoices[0]
    assert created.invoice_id
    assert Decimal(str(created.total)) == Decimal("4620")
    assert Decimal(str(created.total_tax)) == Decimal("70")
    assert created.date == datetime.date(2026, 11, 25)
    again = acc.create_invoices(HOLDINGS, Invoices(invoices=[invoice]), idempotency_key="sdk-inv-1", unitdp=4).invoices[0]
    assert again.invoice_id == created.invoice_id

    credit = CreditNote(
        type="ACCPAYCREDIT",
        contact=Contact(contact_id=contact.contact_id),
        credit_note_number="SDK-CN-1",
        reference="Correction of SDK-INV-1",
        date=datetime.date(2026, 11, 26),
        line_amount_types=LineAmountTypes.EXCLUSIVE,
        currency_code=CurrencyCode.GBP,
        status="AUTHORISED",
        line_items=[LineItem(description="Fee refund", quantity=1.0, unit_amount=100.0, account_code="412", tax_type="INPUT2")],
    )
    cn = acc.create_credit_notes(HOLDINGS, CreditNotes(credit_notes=[credit])).credit_notes[0]
    assert cn.credit_note_id
    assert Decimal(str(cn.total)) == Decimal("120")

    alloc = acc.create_credit_note_allocation(
        HOLDINGS,
        cn.credit_note_id,
        Allocations(allocations=[Allocation(amount=120.0, date=datetime.date(2026, 11, 26), invoice=Invoice(invoice_id=created.invoice_id))]),
    ).allocations[0]
    assert Decimal(str(alloc.amount)) == Decimal("120")
    inv_after = acc.get_invoice(HOLDINGS, created.invoice_id).invoices[0]
    assert Decimal(str(inv_after.amount_due)) == Decimal("4500")

    att = acc.create_invoice_attachment_by_file_name(
        HOLDINGS, created.invoice_id, "SDK-INV-1.pdf", b"%PDF-1.4 sdk", include_online=True
    ).attachments[0]
    assert att.file_name == "SDK-INV-1.pdf" and att.content_length == len(b"%PDF-1.4 sdk")
    listed = acc.get_invoice_attachments(HOLDINGS, created.invoice_id).attachments
    assert [a.file_name for a in listed] == ["SDK-INV-1.pdf"]
    cn_att = acc.create_credit_note_attachment_by_file_name(
        HOLDINGS, cn.credit_note_id, "SDK-CN-1.pdf", b"%PDF-1.4 cn"
    ).attachments[0]
    assert cn_att.attachment_id

    assert acc.get_invoices(HOLDINGS, where='InvoiceNumber=="SDK-INV-1"', page=1).invoices
    assert acc.get_credit_notes(HOLDINGS, where='CreditNoteNumber=="SDK-CN-1"').credit_notes

    docs = requests.get(f"{sim}/_sim/tenants/{HOLDINGS}/documents", timeout=5).json()
    assert len(docs["invoices"]) == 1 and len(docs["credit_notes"]) == 1
    assert len(docs["attachments"]) == 2 and len(docs["allocations"]) == 1

    client.revoke_oauth2_token()
    grants = requests.get(sim + "/_sim/grants", timeout=5).json()
    assert grants[0]["revoked"] is True and grants[0]["connections"] == []
