//! Asks every endpoint for `Admin.ClusterStatus` before a run: who answers, its member id,
//! whether it leads, and how far it has applied. Fills [`ServerInfo`] with what Floe exposes
//! (version, raft term and DB size are not exposed yet and stay `None`).
//!
//! Every call is bounded by `STATUS_TIMEOUT` and made once (no retries), so a dead endpoint
//! costs at most that long.

use std::time::Duration;

use floe_client::{Client, ClusterStatus};

use super::report::{ServerInfo, ShardInfo};

/// Bound on connecting to and hearing back from one endpoint.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Queries every endpoint, one after the other, in the order given.
pub async fn probe(endpoints: &[String]) -> Vec<ServerInfo> {
    let mut servers = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        servers.push(probe_one(endpoint).await);
    }
    servers
}

async fn probe_one(endpoint: &str) -> ServerInfo {
    let failed = |error: String| ServerInfo { endpoint: endpoint.to_owned(), error: Some(error), ..Default::default() };
    let client = match Client::builder()
        .endpoint(endpoint)
        .connect_timeout(STATUS_TIMEOUT)
        .request_timeout(STATUS_TIMEOUT)
        .retry(1, Duration::from_millis(1), Duration::from_millis(1))
        .build()
    {
        Ok(client) => client,
        Err(error) => return failed(error.to_string()),
    };
    match tokio::time::timeout(STATUS_TIMEOUT, client.cluster_status()).await {
        Ok(Ok(status)) => server_info(endpoint, &status),
        Ok(Err(error)) => failed(error.to_string()),
        Err(_elapsed) => failed(format!("no answer within {} s", STATUS_TIMEOUT.as_secs())),
    }
}

/// What one `ClusterStatus` answer says about the member that gave it.
pub fn server_info(endpoint: &str, status: &ClusterStatus) -> ServerInfo {
    let member_id = status.answered_by;
    let shards: Vec<ShardInfo> = status
        .shards
        .iter()
        .map(|shard| ShardInfo {
            id: shard.id,
            leader: (shard.leader != 0).then_some(shard.leader),
            applied_index: shard.applied_index,
        })
        .collect();
    ServerInfo {
        endpoint: endpoint.to_owned(),
        answered: true,
        version: None,
        member_id: Some(member_id),
        leader: Some(shards.iter().any(|shard| shard.leader == Some(member_id))),
        meta_leader: Some(status.meta_leader == member_id),
        raft_term: None,
        db_size_bytes: None,
        applied_index: shards.iter().map(|shard| shard.applied_index).max(),
        shards,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_client::proto as pb;

    #[test]
    fn leader_flag_comes_from_the_data_shards() {
        let status = ClusterStatus {
            nodes: Vec::new(),
            shards: vec![pb::ShardStatus { id: 1, leader: 2, applied_index: 40, ..Default::default() }],
            answered_by: 2,
            meta_leader: 1,
        };
        let info = server_info("127.0.0.1:7710", &status);
        assert_eq!(info.member_id, Some(2));
        assert_eq!(info.leader, Some(true));
        assert_eq!(info.meta_leader, Some(false));
        assert_eq!(info.applied_index, Some(40));
        let follower = server_info("x:1", &ClusterStatus { answered_by: 3, ..status });
        assert_eq!(follower.leader, Some(false));
    }
}
