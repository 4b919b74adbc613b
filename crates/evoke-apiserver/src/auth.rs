//! Authentication: a client certificate that our CA signed (rustls has
//! verified it during the handshake), or the bearer token. Nothing else
//! gets in. The token is compared in constant time and never logged.

use http::HeaderMap;

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// A client certificate signed by the cluster CA.
    Certificate,
    /// The shared bearer token.
    Token,
}

/// Decides who is calling, or None for 401.
pub(crate) fn authenticate(
    headers: &HeaderMap,
    verified_cert: bool,
    token: &str,
) -> Option<Identity> {
    if verified_cert {
        return Some(Identity::Certificate);
    }
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, given) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return None;
    }
    constant_time_eq(given.trim().as_bytes(), token.as_bytes()).then_some(Identity::Token)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, v.parse().expect("header"));
        h
    }

    #[test]
    fn right_token_or_verified_certificate_authenticates() {
        assert_eq!(
            authenticate(&bearer("Bearer abc"), false, "abc"),
            Some(Identity::Token)
        );
        assert_eq!(
            authenticate(&HeaderMap::new(), true, "abc"),
            Some(Identity::Certificate)
        );
    }

    #[test]
    fn wrong_missing_or_non_bearer_credentials_are_refused() {
        assert_eq!(authenticate(&bearer("Bearer abd"), false, "abc"), None);
        assert_eq!(authenticate(&bearer("Basic abc"), false, "abc"), None);
        assert_eq!(authenticate(&HeaderMap::new(), false, "abc"), None);
        assert_eq!(authenticate(&bearer("Bearer "), false, ""), None);
    }
}
