//! Delegation without moving keys (src/grid/delegation.rs) against the PKI of
//! tests/grid_support/make-fixtures.sh: a user proxy from voms-proxy-fake signs a proxy for a
//! key the "server" made, that credential signs one for a key the "worker node" made, and
//! each issued chain is judged by `openssl verify -allow_proxy_certs`, `voms-proxy-info -all`
//! and src/grid's Verifier. Then each refusal. No root, no shared state.

#![cfg(feature = "grid")]

#[path = "grid_support/mod.rs"]
mod grid_support;

use chrono::{Duration, Utc};
use grid_support::{config, fqans, openssl_verify, pki, proxy, proxy_file, voms_proxy_info};
use grid_support::{ALICE, BOB};
use mupilot::grid::delegation::{
    check_delegated, new_key_request, Credential, DelegationError, ProxyOrder, MAX_STORED_SECONDS,
};
use mupilot::grid::{Claim, Verifier};

fn root() -> &'static std::path::Path {
    pki("grid-pki-delegation")
}

fn order(hours: i64) -> ProxyOrder {
    ProxyOrder {
        lifetime: Duration::hours(hours),
        limited: false,
    }
}

/// The user delegates `user_proxy` to a fresh server key for `hours`; returns the server's
/// credential and the chain.
fn delegate(user_proxy: &str, hours: i64) -> (Credential, String, Vec<u8>) {
    let server = new_key_request().unwrap();
    let user = Credential::from_proxy_pem(&proxy(root(), user_proxy)).unwrap();
    let issued = user
        .sign_proxy(server.csr_pem.as_bytes(), &order(hours), Utc::now())
        .unwrap();
    let d = check_delegated(issued.chain_pem.as_bytes(), &server.key, ALICE, Utc::now()).unwrap();
    assert_eq!(d.subject, issued.subject);
    let key_pem = server.key_pem().unwrap();
    let cred = Credential::new(issued.chain_pem.as_bytes(), server.key).unwrap();
    (cred, issued.chain_pem, key_pem)
}

#[test]
fn a_worker_proxy_two_delegations_down_is_valid_for_every_judge() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _, _) = delegate("delegable", 7 * 24);
    assert_eq!(server.owner_dn(), ALICE);
    // The user's proxy is valid 24 h: the delegation is cut to it.
    assert!(server.not_after() < Utc::now() + Duration::hours(25));

    let worker = new_key_request().unwrap();
    let issued = server
        .sign_proxy(worker.csr_pem.as_bytes(), &order(12), Utc::now())
        .unwrap();
    assert!(!issued.limited);
    assert!(issued.subject.starts_with(ALICE) && issued.subject.matches("/CN=").count() == 4);
    let left = issued.not_after - Utc::now();
    assert!(
        left > Duration::hours(11) && left <= Duration::hours(12),
        "{left}"
    );
    let file = proxy_file(tmp.path(), &issued.chain_pem, &worker.key_pem().unwrap());

    openssl_verify(root(), &file).unwrap();
    let info = voms_proxy_info(root(), &file);
    assert_eq!(
        fqans(&info),
        ["/atlas", "/atlas/prod/Role=production"],
        "{info}"
    );
    assert!(info.contains(&format!("identity  : {ALICE}")), "{info}");

    // The AC rides in the user's first proxy, two certificates down: the Verifier finds it.
    let v = Verifier::new(config(root()));
    let c = v
        .verify(
            issued.chain_pem.as_bytes(),
            &Claim::owner(ALICE, "atlas"),
            Utc::now(),
        )
        .unwrap();
    assert_eq!(c.owner_dn, ALICE);
    assert_eq!(c.fqans, ["/atlas", "/atlas/prod/Role=production"]);
    assert_eq!(c.proxy_serials.len(), 3);
    assert_eq!(c.proxy_serials[0], issued.serial.trim_start_matches('0'));
    assert_eq!(c.not_after.timestamp(), issued.not_after.timestamp());
    assert!(!c.limited);
}

#[test]
fn lifetime_is_cut_to_the_credential_and_limited_is_inherited() {
    let (server, _, _) = delegate("delegable-limited", 1);
    let worker = new_key_request().unwrap();
    let issued = server
        .sign_proxy(worker.csr_pem.as_bytes(), &order(12), Utc::now())
        .unwrap();
    // Asked 12 h of a credential valid 1 h: 1 h.
    assert_eq!(issued.not_after, server.not_after());
    assert!(issued.limited, "a proxy below a limited one is limited");
    let c = Verifier::new(config(root()))
        .verify(
            issued.chain_pem.as_bytes(),
            &Claim::owner(ALICE, "atlas"),
            Utc::now(),
        )
        .unwrap();
    assert!(c.limited);

    // Limited on request from an unlimited credential.
    let (server, _, _) = delegate("delegable", 2);
    let issued = server
        .sign_proxy(
            new_key_request().unwrap().csr_pem.as_bytes(),
            &ProxyOrder {
                lifetime: Duration::hours(1),
                limited: true,
            },
            Utc::now(),
        )
        .unwrap();
    assert!(issued.limited);
    let tmp = tempfile::tempdir().unwrap();
    let file = proxy_file(tmp.path(), &issued.chain_pem, b"");
    openssl_verify(root(), &file).unwrap();
}

#[test]
fn a_delegation_is_refused_for_another_dn_another_key_or_too_long() {
    // The PKI first: its certificates are not valid before it is made.
    let _ = root();
    let now = Utc::now();
    let server = new_key_request().unwrap();
    let other = new_key_request().unwrap();
    let user = Credential::from_proxy_pem(&proxy(root(), "delegable")).unwrap();
    let issued = user
        .sign_proxy(server.csr_pem.as_bytes(), &order(24), now)
        .unwrap();
    let chain = issued.chain_pem.as_bytes();

    let e = check_delegated(chain, &server.key, BOB, now).unwrap_err();
    assert!(matches!(e, DelegationError::NotTheCaller { .. }), "{e}");
    assert!(e.to_string().contains(ALICE) && e.to_string().contains(BOB));

    let e = check_delegated(chain, &other.key, ALICE, now).unwrap_err();
    assert!(matches!(e, DelegationError::WrongKey { .. }), "{e}");

    // Bob's proxy signs for Alice's chain: the link's signature fails.
    let bob = Credential::from_proxy_pem(&proxy(root(), "delegable-bob")).unwrap();
    let bobs = bob
        .sign_proxy(server.csr_pem.as_bytes(), &order(1), now)
        .unwrap();
    let mut spliced: Vec<&str> = bobs
        .chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .take(1)
        .collect();
    spliced.extend(
        issued
            .chain_pem
            .split_inclusive("-----END CERTIFICATE-----\n")
            .skip(1),
    );
    let e = check_delegated(spliced.concat().as_bytes(), &server.key, ALICE, now).unwrap_err();
    assert!(
        matches!(
            e,
            DelegationError::Signature { .. } | DelegationError::Refused(_)
        ),
        "{e}"
    );

    // 300 h of the user's proxy, 2,000,000 s asked: above the stored-credential bound.
    let long = Credential::from_proxy_pem(&proxy(root(), "delegable-long")).unwrap();
    let issued = long
        .sign_proxy(
            server.csr_pem.as_bytes(),
            &ProxyOrder {
                lifetime: Duration::seconds(2_000_000),
                limited: false,
            },
            now,
        )
        .unwrap();
    let e = check_delegated(issued.chain_pem.as_bytes(), &server.key, ALICE, now).unwrap_err();
    assert!(matches!(e, DelegationError::TooLong { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&MAX_STORED_SECONDS.to_string()) && msg.contains("--lifetime"),
        "{msg}"
    );
    // ... and exactly the bound is accepted.
    let issued = long
        .sign_proxy(
            server.csr_pem.as_bytes(),
            &ProxyOrder {
                lifetime: Duration::seconds(MAX_STORED_SECONDS),
                limited: false,
            },
            now,
        )
        .unwrap();
    check_delegated(issued.chain_pem.as_bytes(), &server.key, ALICE, now).unwrap();
}

#[test]
fn no_room_for_the_worker_proxy_weak_keys_and_expired_credentials_are_refused() {
    // The PKI first: its certificates are not valid before it is made.
    let _ = root();
    let now = Utc::now();
    let server = new_key_request().unwrap();
    // voms-proxy-fake's default path length (1) allows the proxy to the server but not the
    // worker node's below it: refused at delegation, naming the fix.
    let good = Credential::from_proxy_pem(&proxy(root(), "good")).unwrap();
    let issued = good
        .sign_proxy(server.csr_pem.as_bytes(), &order(1), now)
        .unwrap();
    let e = check_delegated(issued.chain_pem.as_bytes(), &server.key, ALICE, now).unwrap_err();
    assert!(matches!(e, DelegationError::PathLength { .. }), "{e}");
    assert!(e.to_string().contains("-path-length"), "{e}");

    // A request for a 1024-bit key.
    let weak = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(1024).unwrap()).unwrap();
    let mut b = openssl::x509::X509Req::builder().unwrap();
    b.set_pubkey(&weak).unwrap();
    b.sign(&weak, openssl::hash::MessageDigest::sha256())
        .unwrap();
    let csr = b.build().to_pem().unwrap();
    let user = Credential::from_proxy_pem(&proxy(root(), "delegable")).unwrap();
    let e = user.sign_proxy(&csr, &order(1), now).unwrap_err();
    assert!(
        matches!(e, DelegationError::WeakKey { bits: 1024, .. }),
        "{e}"
    );

    // An expired credential signs nothing.
    let expired = Credential::from_proxy_pem(&proxy(root(), "expired")).unwrap();
    let e = expired
        .sign_proxy(server.csr_pem.as_bytes(), &order(1), now)
        .unwrap_err();
    assert!(e.to_string().contains("expired at"), "{e}");

    // The delegation itself, once past its notAfter.
    let (cred, _, _) = delegate("delegable", 1);
    let later = cred.not_after() + Duration::seconds(1);
    let e = cred
        .sign_proxy(
            new_key_request().unwrap().csr_pem.as_bytes(),
            &order(1),
            later,
        )
        .unwrap_err();
    assert!(e.to_string().contains("expired at"), "{e}");
}
