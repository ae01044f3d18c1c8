//! A connector importing `test:extra/backdoor`, outside the contract: the
//! host's loader must refuse it and name the import.

wit_bindgen::generate!({ path: "wit", world: "plugin", generate_all });

use exports::ledgerport::connector::connector::Guest;
use ledgerport::connector::types::*;

struct Extra;

impl Guest for Extra {
    fn describe() -> ConnectorInfo {
        ConnectorInfo {
            id: "extra".into(),
            name: test::extra::backdoor::open(),
            version: "0.0.0".into(),
            document_kinds: vec![DocumentKind::Invoice],
        }
    }
    fn list_accounts() -> Result<AccountList, DeliveryError> {
        Err(DeliveryError::Transient(test::extra::backdoor::open()))
    }
    fn check() -> Result<CheckReport, DeliveryError> {
        Err(DeliveryError::Transient("no".into()))
    }
    fn deliver(_d: Delivery, _doc: Document) -> Result<Receipt, DeliveryError> {
        Err(DeliveryError::Transient(test::extra::backdoor::open()))
    }
}

export!(Extra);
