//! Lease names in a gridmapdir: LCMAPS's (which the helper writes), the helper's former ones
//! (which it still honours), decoding for humans, and which files are pool accounts. Pure
//! string functions: never touches the directory.

/// LCMAPS's lease name: `lcmaps_encode(dn)`, then `:` and each unix group name verbatim (LCMAPS
/// appends the names of the primary and then the secondary groups its `voms_localgroup` step
/// mapped; `poolaccount`, mapping by DN, appends none).
pub fn lease_name(dn: &str, groups: &[String]) -> String {
    let mut name = lcmaps_encode(&openssl_oneline(dn));
    for g in groups {
        name.push(':');
        name.push_str(g);
    }
    name
}

/// The name the helper gave leases before it named them as LCMAPS does: URL-encoded, lower-cased
/// DN keeping `-_.~`, then `:` and each URL-encoded, lower-cased FQAN. Still honoured.
pub fn former_lease_name(dn: &str, fqans: &[String]) -> String {
    let mut name = url_encode(&dn.to_lowercase());
    for g in fqans {
        name.push(':');
        name.push_str(&url_encode(&g.to_lowercase()));
    }
    name
}

/// The DN as LCMAPS sees it: OpenSSL's `X509_NAME_oneline` writes every byte of an attribute
/// value outside `' '..='~'` as `\xHH` (upper-case hex), so a UTF-8 `/CN=José` reaches LCMAPS
/// as `/CN=Jos\xC3\xA9`. A DN already in that form (or pure ASCII) is unchanged.
pub fn openssl_oneline(dn: &str) -> std::borrow::Cow<'_, str> {
    if dn.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return std::borrow::Cow::Borrowed(dn);
    }
    let mut out = String::with_capacity(dn.len() * 2);
    for b in dn.bytes() {
        if (b' '..=b'~').contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// LCMAPS's `urlencode` (lcmaps_gridmapdir.c): ASCII letters and digits lower-cased, every other
/// byte as `%xx`. (LCMAPS formats a byte above 0x7f through a signed `char`, which garbles it;
/// it never meets one, as OpenSSL's one-line DN escapes such bytes as `\xHH`.)
pub fn lcmaps_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b.to_ascii_lowercase() as char);
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `name` is an account of pool `prefix`: the prefix and one or more digits, as LCMAPS's
/// default `-strict_poolprefix_match yes` (so pool `dteam` never takes `dteamsgm001`).
pub fn is_pool_account(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Lease links start with '%' (an encoded '/'); account files do not, and our lock is a dotfile.
pub(super) fn is_lease_name(name: &str) -> bool {
    name.starts_with('%')
}

/// Turns a lease link name back into `DN[ group ...]` for humans.
pub fn decode_lease_name(name: &str) -> String {
    name.split(':')
        .map(url_decode)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lcmaps_names() {
        // The name LCMAPS 1.6.6 + lcmaps-plugins-voms 1.7.1 gave this owner (issue 17, and
        // tests/lcmaps_compat.rs against LCMAPS itself).
        assert_eq!(
            lease_name("/DC=org/DC=mupilot-demo/CN=dave", &["lcmdemo".into()]),
            "%2fdc%3dorg%2fdc%3dmupilot%2ddemo%2fcn%3ddave:lcmdemo"
        );
        // poolaccount (by DN): no groups; every byte outside [a-z0-9] encoded, `-_.~` too.
        assert_eq!(
            lease_name("/DC=org/CN=Alice Smith-x_y.z~", &[]),
            "%2fdc%3dorg%2fcn%3dalice%20smith%2dx%5fy%2ez%7e"
        );
        // Group names follow verbatim, primary first.
        assert_eq!(
            lease_name("/CN=a", &["g_1".into(), "g-2".into()]),
            "%2fcn%3da:g_1:g-2"
        );
        assert_eq!(
            former_lease_name("/DC=org/CN=Alice Smith", &[]),
            "%2fdc%3dorg%2fcn%3dalice%20smith"
        );
        assert_eq!(
            former_lease_name("/CN=a-b", &["/demo/Role=prod".into()]),
            "%2fcn%3da-b:%2fdemo%2frole%3dprod"
        );
        assert_eq!(decode_lease_name("%2fcn%3da:%2fdemo"), "/cn=a /demo");
        assert_eq!(
            decode_lease_name("%2fcn%3da%2db:lcmdemo"),
            "/cn=a-b lcmdemo"
        );
        // Non-ASCII: as OpenSSL's one-line form, which LCMAPS encodes (checked against LCMAPS
        // in tests/lcmaps_compat.rs); the one-line form itself gives the same name.
        assert_eq!(
            lease_name("/DC=org/CN=José Müller", &[]),
            "%2fdc%3dorg%2fcn%3djos%5cxc3%5cxa9%20m%5cxc3%5cxbcller"
        );
        assert_eq!(
            lease_name("/DC=org/CN=Jos\\xC3\\xA9 M\\xC3\\xBCller", &[]),
            lease_name("/DC=org/CN=José Müller", &[])
        );
        assert!(is_pool_account("dteam001", "dteam"));
        assert!(!is_pool_account("dteamsgm001", "dteam"));
        assert!(!is_pool_account("dteam", "dteam"));
        assert!(!is_pool_account("dteam01~", "dteam"));
    }
}
