//! Client configuration and its builder.
//!
//! Owns: [`ClientBuilder`] and the defaults (tenant `default`, connect timeout, per-attempt
//! request timeout, retry policy, default read consistency `ReadYourWrites`). Validation happens in
//! [`ClientBuilder::build`], before any connection is made.
//!
//! No I/O: channels are created lazily by the client on first use.

use std::time::Duration;

use crate::client::Client;
use crate::endpoint::normalize_endpoints;
use crate::error::{Error, Result};
use crate::retry::RetryPolicy;
use crate::types::ReadConsistency;

/// Tenant used when none is configured.
pub const TENANT_DEFAULT: &str = "default";
/// Default bound on establishing a TCP + HTTP/2 connection.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(3);
/// Default bound on one attempt of one request.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Largest response message the client accepts (batch reads of many 1 MiB documents).
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Validated client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Normalized `http://host:port` endpoints, at least one.
    pub endpoints: Vec<String>,
    pub tenant: String,
    pub connect_timeout: Duration,
    /// Bound on each attempt; retries get a fresh budget each.
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    pub read_consistency_default: ReadConsistency,
}

/// Builder for [`Client`]. Obtain with [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    tenant: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    retry: RetryPolicy,
    read_consistency_default: ReadConsistency,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            endpoints: Vec::new(),
            tenant: TENANT_DEFAULT.to_owned(),
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            retry: RetryPolicy::default(),
            read_consistency_default: ReadConsistency::ReadYourWrites,
        }
    }
}

impl ClientBuilder {
    /// Replaces the endpoint list (`host:port` or `http://host:port`).
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// Adds one endpoint.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoints.push(endpoint.into());
        self
    }

    /// The tenant every request is made for (default `default`).
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// Bound on establishing a connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each attempt of each request.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The whole retry policy.
    pub fn retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Shorthand for the retry policy's three knobs.
    pub fn retry(mut self, attempts_max: u32, backoff_base: Duration, backoff_max: Duration) -> Self {
        self.retry = RetryPolicy { attempts_max, backoff_base, backoff_max };
        self
    }

    /// Consistency of reads that do not name one (default `ReadYourWrites`: session
    /// consistency with this client's own tokens).
    pub fn read_consistency(mut self, consistency: ReadConsistency) -> Self {
        self.read_consistency_default = consistency;
        self
    }

    /// Validates the settings. Does not connect: connections are made lazily per request.
    pub fn config(self) -> Result<ClientConfig> {
        let endpoints = normalize_endpoints(&self.endpoints)?;
        if self.tenant.trim().is_empty() {
            return Err(Error::Config("tenant must not be empty".into()));
        }
        if self.retry.attempts_max == 0 {
            return Err(Error::Config("retry attempts_max must be at least 1".into()));
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(Error::Config("timeouts must be greater than zero".into()));
        }
        if self.retry.backoff_base > self.retry.backoff_max {
            return Err(Error::Config("retry backoff_base must not exceed backoff_max".into()));
        }
        Ok(ClientConfig {
            endpoints,
            tenant: self.tenant,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            retry: self.retry,
            read_consistency_default: self.read_consistency_default,
        })
    }

    /// Builds the client. Does not connect (see [`ClientBuilder::config`]).
    pub fn build(self) -> Result<Client> {
        Ok(Client::from_config(self.config()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let config = ClientBuilder::default().endpoint("127.0.0.1:7700").config().unwrap();
        assert_eq!(config.endpoints, vec!["http://127.0.0.1:7700"]);
        assert_eq!(config.tenant, "default");
        assert_eq!(config.read_consistency_default, ReadConsistency::ReadYourWrites);
        assert_eq!(config.retry, RetryPolicy::default());
    }

    #[test]
    fn rejects_invalid_settings() {
        assert!(ClientBuilder::default().config().is_err(), "no endpoints");
        let base = || ClientBuilder::default().endpoint("a:1");
        assert!(base().tenant(" ").config().is_err());
        assert!(base().retry(0, Duration::from_millis(1), Duration::from_millis(2)).config().is_err());
        assert!(base().retry(3, Duration::from_secs(5), Duration::from_secs(1)).config().is_err());
        assert!(base().request_timeout(Duration::ZERO).config().is_err());
    }
}
