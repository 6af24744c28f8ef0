//! Endpoint address normalization.
//!
//! Owns: turning what users and the server write (`127.0.0.1:7700`, `http://host:7700/`,
//! a `leader_grpc_addr` from `ResponseMeta`) into one canonical `http://host:port` string, so
//! that the same node is always the same key in the channel map and the leader cache.
//!
//! Pure; no I/O.

use crate::error::{Error, Result};

/// Normalizes an endpoint to `http://host:port` (lowercase scheme, no trailing slash).
///
/// Accepts `host:port`, `http://host:port` and `http://host:port/`. Rejects empty input,
/// paths, and schemes other than `http` (this client speaks plaintext gRPC only).
pub fn normalize_endpoint(raw: &str) -> Result<String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(Error::Config("empty endpoint".into()));
    }
    let (scheme, rest) = match trimmed.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => ("http".to_owned(), trimmed),
    };
    if scheme != "http" {
        return Err(Error::Config(format!("endpoint {trimmed:?}: scheme {scheme:?} is not supported (use http://)")));
    }
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() {
        return Err(Error::Config(format!("endpoint {trimmed:?} has no host")));
    }
    if authority.contains('/') || authority.chars().any(char::is_whitespace) {
        return Err(Error::Config(format!("endpoint {trimmed:?} must be host:port without a path")));
    }
    let uri = format!("http://{authority}");
    // Validate with the same parser tonic uses.
    let parsed: http::Uri = uri.parse().map_err(|error| Error::Config(format!("endpoint {trimmed:?}: {error}")))?;
    if parsed.host().is_none_or(str::is_empty) {
        return Err(Error::Config(format!("endpoint {trimmed:?} has no host")));
    }
    Ok(uri)
}

/// Normalizes a list of endpoints, dropping duplicates while keeping the first occurrence's
/// position. Fails on the first invalid entry or when nothing is left.
pub fn normalize_endpoints<I, S>(raw: I) -> Result<Vec<String>>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut endpoints: Vec<String> = Vec::new();
    for entry in raw {
        let endpoint = normalize_endpoint(entry.as_ref())?;
        if !endpoints.contains(&endpoint) {
            endpoints.push(endpoint);
        }
    }
    if endpoints.is_empty() {
        return Err(Error::Config("at least one endpoint is required".into()));
    }
    Ok(endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_scheme_and_strips_slash() {
        assert_eq!(normalize_endpoint("127.0.0.1:7700").unwrap(), "http://127.0.0.1:7700");
        assert_eq!(normalize_endpoint(" http://127.0.0.1:7700/ ").unwrap(), "http://127.0.0.1:7700");
        assert_eq!(normalize_endpoint("HTTP://localhost:1").unwrap(), "http://localhost:1");
        assert_eq!(normalize_endpoint("[::1]:7700").unwrap(), "http://[::1]:7700");
    }

    #[test]
    fn rejects_bad_endpoints() {
        for bad in ["", "   ", "https://h:1", "grpc://h:1", "http://", "h:1/path", "h :1"] {
            assert!(matches!(normalize_endpoint(bad), Err(Error::Config(_))), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn dedups_and_requires_one() {
        let endpoints = normalize_endpoints(["a:1", "http://a:1", "b:2", "a:1/"]).expect("valid list");
        assert_eq!(endpoints, vec!["http://a:1", "http://b:2"]);
        assert!(normalize_endpoints(Vec::<String>::new()).is_err());
    }
}
