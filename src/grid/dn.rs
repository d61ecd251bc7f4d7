//! Distinguished names written as the grid writes them: `/DC=org/DC=example/CN=Alice`, RDNs in
//! certificate order with OpenSSL's short names, the same form as the envelope, the
//! grid-mapfile, ban lists and [`crate::tls::grid_dn`] use.

use openssl::x509::X509NameRef;

/// `name` in grid form. Values that are not valid strings are written as hex.
pub fn grid_dn(name: &X509NameRef) -> String {
    entries(name)
        .iter()
        .map(|(k, v)| format!("/{k}={v}"))
        .collect()
}

/// The entries of `name` as (short name, value) pairs, for comparing names entry by entry.
pub fn entries(name: &X509NameRef) -> Vec<(String, String)> {
    name.entries()
        .map(|e| {
            (
                e.object()
                    .nid()
                    .short_name()
                    .map(str::to_string)
                    .unwrap_or_else(|_| e.object().to_string()),
                e.data()
                    .to_string()
                    .unwrap_or_else(|_| hex::encode(e.data().as_slice())),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use openssl::x509::X509Name;

    #[test]
    fn grid_form_in_certificate_order() {
        let mut b = X509Name::builder().unwrap();
        b.append_entry_by_text("DC", "org").unwrap();
        b.append_entry_by_text("DC", "mupilot-test").unwrap();
        b.append_entry_by_text("CN", "Alice").unwrap();
        let n = b.build();
        assert_eq!(super::grid_dn(&n), "/DC=org/DC=mupilot-test/CN=Alice");
    }
}
