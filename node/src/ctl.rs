//! `floe ctl`: operate a running cluster (status, shards, split, node remove), like `etcdctl`. Nodes join
//! with `floe start --join`, which knows whether the node's disk is empty (see `add_node`).
//!
//! Owns: the `ctl` arguments, the calls through `floe-client`, and the rendering of the
//! status tables (a pure function of what the nodes answered, unit tested). Binary-facing
//! code: errors are `anyhow`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use floe_client::{Client, ClusterStatus, ReplicaStatus};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// gRPC endpoints of cluster members (host:port, comma separated).
    #[arg(long, env = "FLOE_ENDPOINTS", default_value = "127.0.0.1:7700", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Nodes, groups with their leaders and voters, and every replica's applied position and lag.
    Status,
    /// Remove cluster members (nodes join with `floe start --join`).
    #[command(subcommand)]
    Node(NodeCommand),
    /// Every shard: its key range, epoch, state (active or hibernating), leader, replicas and
    /// request rate.
    Shards,
    /// Split shards by hand: `--collection C --ids a,b` starts a new shard at each of those
    /// documents; `--shard N` splits shard N at the median of its recent requests or its
    /// middle by size.
    Split {
        #[arg(long, conflicts_with_all = ["collection", "ids"])]
        shard: Option<u64>,
        #[arg(long, requires = "ids")]
        collection: Option<String>,
        #[arg(long, value_delimiter = ',')]
        ids: Vec<String>,
        #[arg(long, env = "FLOE_TENANT", default_value = "")]
        tenant: String,
    },
    /// Merge two adjacent shards on the same replicas into a new shard.
    Merge { left: u64, right: u64 },
    /// Move a shard's replica from one node to another (`--leader` instead hands the shard's
    /// leadership to node `--to`, which must already hold a replica).
    Move {
        #[arg(long)]
        shard: u64,
        #[arg(long, required_unless_present = "leader")]
        from: Option<u64>,
        #[arg(long)]
        to: u64,
        #[arg(long, conflicts_with = "from")]
        leader: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Remove a node from every group (joint consensus) and from the cluster; stop its process
    /// afterwards. Its id is never accepted again.
    Remove { id: u64 },
}

/// Bound on one membership change seen from the command line (a learner may need a snapshot).
const MEMBERSHIP_CALL_TIMEOUT: Duration = Duration::from_secs(150);

pub async fn run(args: CtlArgs) -> Result<()> {
    match args.command {
        CtlCommand::Status => {
            let out = status(&args.endpoints).await?;
            print!("{out}");
        }
        CtlCommand::Shards => {
            let client =
                Client::builder().endpoints(args.endpoints.iter().cloned()).build().context("building the client")?;
            let cluster = client.cluster_status().await.context("no endpoint answered ClusterStatus")?;
            print!("{}", render_shards(&cluster));
        }
        CtlCommand::Split { shard, collection, ids, tenant } => {
            let mut builder = Client::builder().endpoints(args.endpoints.iter().cloned());
            if !tenant.is_empty() {
                builder = builder.tenant(tenant);
            }
            let client = builder.build().context("building the client")?;
            let shards = match (shard, collection) {
                (Some(id), _) => client.split_shard_in_half(id).await?,
                (None, Some(c)) => {
                    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                    client.split_at(&c, &ids).await?
                }
                (None, None) => bail!("give --shard N, or --collection C --ids a,b,..."),
            };
            println!("{:<7} {:<7} RANGE", "SHARD", "EPOCH");
            for s in &shards {
                println!("{:<7} {:<7} {}", s.id, s.epoch, range_text(&s.start_hex, &s.end_hex));
            }
        }
        CtlCommand::Merge { left, right } => {
            let client =
                Client::builder().endpoints(args.endpoints.iter().cloned()).build().context("building the client")?;
            match client.merge_shards(left, right).await? {
                Some(s) => println!(
                    "merged {left} and {right} into shard {} (epoch {}) {}",
                    s.id,
                    s.epoch,
                    range_text(&s.start_hex, &s.end_hex)
                ),
                None => println!("merged {left} and {right}"),
            }
        }
        CtlCommand::Move { shard, from, to, leader } => {
            let client = membership_client(&args.endpoints)?;
            match (leader, from) {
                (true, _) => {
                    let now = client.transfer_leader(shard, to).await?;
                    println!("shard {shard}: leader is node {now}");
                }
                (false, Some(from)) => {
                    let voters = client.move_replica(shard, from, to).await?;
                    println!("shard {shard} moved from node {from} to node {to}; voters {}", join_ids(&voters));
                }
                (false, None) => bail!("give --from N (or --leader)"),
            }
        }
        CtlCommand::Node(NodeCommand::Remove { id }) => {
            let groups = membership_client(&args.endpoints)?.remove_node(id).await?;
            println!("node {id} removed; stop its process (its id is not accepted again)");
            print_groups(&groups);
        }
    }
    Ok(())
}

fn membership_client(endpoints: &[String]) -> Result<Client> {
    Client::builder()
        .endpoints(endpoints.iter().cloned())
        .request_timeout(MEMBERSHIP_CALL_TIMEOUT)
        .build()
        .context("building the client")
}

fn print_groups(groups: &[(u64, Vec<u64>)]) {
    for (group, voters) in groups {
        println!("  group {group}: voters {}", join_ids(voters));
    }
}

/// Asks any endpoint for the catalog, then every node for its replicas.
async fn status(endpoints: &[String]) -> Result<String> {
    let client = Client::builder().endpoints(endpoints.iter().cloned()).build().context("building the client")?;
    let cluster = client.cluster_status().await.context("no endpoint answered ClusterStatus")?;
    if cluster.nodes.is_empty() {
        bail!("node {} answered but knows no members yet (cluster still starting?)", cluster.answered_by);
    }
    let mut replicas = BTreeMap::new();
    for node in &cluster.nodes {
        let answer = async {
            let c = Client::builder()
                .endpoint(node.grpc_addr.clone())
                .request_timeout(Duration::from_secs(2))
                .retry(1, Duration::from_millis(1), Duration::from_millis(1))
                .build()?;
            c.replica_status().await
        }
        .await
        .map_err(|e| e.to_string());
        replicas.insert(node.id, answer);
    }
    Ok(render_status(&cluster, &replicas))
}

fn join_ids(ids: &[u64]) -> String {
    let parts: Vec<String> = ids.iter().map(u64::to_string).collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

/// A key for humans: `tenant/collection/id` when it is a document key, else hex.
fn key_text(hex: &str) -> String {
    if hex.is_empty() {
        return "end".into();
    }
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
    match bytes.as_deref().and_then(crate::keys::parse_doc_key) {
        Some((t, c, i)) => format!("{t}/{c}/{i}"),
        None => format!("0x{hex}"),
    }
}

fn range_text(start_hex: &str, end_hex: &str) -> String {
    format!("[{}, {})", key_text(start_hex), key_text(end_hex))
}

/// The shards table, in key order.
pub fn render_shards(cluster: &ClusterStatus) -> String {
    let mut shards: Vec<&floe_client::proto::ShardStatus> = cluster.shards.iter().collect();
    shards.sort_by(|a, b| a.start_hex.cmp(&b.start_hex));
    let mut out = String::new();
    let active = shards.iter().filter(|s| s.state == "active").count();
    let _ = writeln!(
        out,
        "{} shards ({} active, {} hibernating), as node {} sees them",
        shards.len(),
        active,
        shards.len() - active,
        cluster.answered_by
    );
    let _ = writeln!(
        out,
        "{:<7} {:<6} {:<12} {:<7} {:<9} {:>9}  RANGE",
        "SHARD", "EPOCH", "STATE", "LEADER", "REPLICAS", "QPS"
    );
    for s in shards {
        let leader = if s.leader == 0 { "-".to_string() } else { s.leader.to_string() };
        let _ = writeln!(
            out,
            "{:<7} {:<6} {:<12} {:<7} {:<9} {:>9.1}  {}",
            s.id,
            s.epoch,
            s.state,
            leader,
            join_ids(&s.replicas),
            s.qps,
            range_text(&s.start_hex, &s.end_hex)
        );
    }
    out
}

/// The status tables: nodes, groups, replicas (lag = leader's last log index − replica's
/// applied index, from the leader's and the replica's own answers).
pub fn render_status(cluster: &ClusterStatus, replicas: &BTreeMap<u64, Result<ReplicaStatus, String>>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "answered by node {}, meta leader {}", cluster.answered_by, cluster.meta_leader);
    let _ = writeln!(out, "\nNODES\n{:<5} {:<22} {:<22} STATUS", "ID", "GRPC", "HTTP");
    for n in &cluster.nodes {
        let state = match replicas.get(&n.id) {
            Some(Ok(_)) => "up".to_string(),
            Some(Err(e)) => format!("unreachable: {}", e.lines().next().unwrap_or("")),
            None => "not asked".to_string(),
        };
        let _ = writeln!(out, "{:<5} {:<22} {:<22} {}", n.id, n.grpc_addr, n.http_addr, state);
    }
    // Every group any node reported, with the leader's view where it answered.
    let mut groups: BTreeMap<u64, Vec<(u64, &floe_client::proto::ReplicaStatus)>> = BTreeMap::new();
    for (node, answer) in replicas {
        if let Ok(r) = answer {
            for g in &r.replicas {
                groups.entry(g.group).or_default().push((*node, g));
            }
        }
    }
    let _ =
        writeln!(out, "\nGROUPS\n{:<6} {:<6} {:<7} {:<6} {:<12} RANGE", "GROUP", "KIND", "LEADER", "TERM", "VOTERS");
    for (group, views) in &groups {
        let leader_view = views.iter().find(|(_, g)| g.role == "leader").map(|(_, g)| *g);
        let any = leader_view.or_else(|| views.first().map(|(_, g)| *g));
        let Some(view) = any else { continue };
        let shard = cluster.shards.iter().find(|s| s.id == *group);
        let range = shard
            .map(|s| {
                let end = if s.end_hex.is_empty() { "end".to_string() } else { s.end_hex.clone() };
                format!("[{}, {end}) epoch {}", s.start_hex, s.epoch)
            })
            .unwrap_or_default();
        let kind = if shard.is_some() { "shard" } else { "meta" };
        let leader = if view.leader == 0 { "-".to_string() } else { view.leader.to_string() };
        let _ = writeln!(
            out,
            "{:<6} {:<6} {:<7} {:<6} {:<12} {}",
            group,
            kind,
            leader,
            view.term,
            join_ids(&view.voters),
            range
        );
    }
    let _ =
        writeln!(out, "\nREPLICAS\n{:<6} {:<5} {:<10} {:<9} {:<9} LAG", "GROUP", "NODE", "ROLE", "APPLIED", "LAST LOG");
    for (group, views) in &groups {
        let leader_last = views.iter().find(|(_, g)| g.role == "leader").map(|(_, g)| g.last_log_index);
        for (node, g) in views {
            let lag = leader_last.map(|l| l.saturating_sub(g.applied_index).to_string()).unwrap_or("?".into());
            let _ = writeln!(
                out,
                "{:<6} {:<5} {:<10} {:<9} {:<9} {}",
                group, node, g.role, g.applied_index, g.last_log_index, lag
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_client::proto as pb;

    fn replica(group: u64, role: &str, applied: u64, last: u64) -> pb::ReplicaStatus {
        pb::ReplicaStatus {
            group,
            role: role.into(),
            term: 3,
            leader: 1,
            last_log_index: last,
            applied_index: applied,
            voters: vec![1, 2],
            ..Default::default()
        }
    }

    #[test]
    fn status_shows_nodes_groups_and_lag() {
        let cluster = pb::ClusterStatusResponse {
            nodes: vec![
                pb::NodeStatus { id: 1, grpc_addr: "a:1".into(), http_addr: "a:2".into(), state: "up".into() },
                pb::NodeStatus { id: 2, grpc_addr: "b:1".into(), http_addr: "b:2".into(), state: "member".into() },
            ],
            shards: vec![pb::ShardStatus { id: 1, start_hex: "01".into(), epoch: 1, ..Default::default() }],
            answered_by: 1,
            meta_leader: 1,
        };
        let mut replicas = BTreeMap::new();
        replicas.insert(
            1,
            Ok(pb::ReplicaStatusResponse {
                node_id: 1,
                replicas: vec![replica(0, "leader", 10, 10), replica(1, "leader", 50, 52)],
            }),
        );
        replicas.insert(2, Err("connection refused".to_string()));
        let out = render_status(&cluster, &replicas);
        assert!(out.contains("unreachable: connection refused"), "{out}");
        assert!(out.contains("[01, end) epoch 1"), "{out}");
        // Leader of group 1 applied 50 of 52: lag 2.
        let line = out.lines().find(|l| l.starts_with("1      1     leader")).expect("replica line");
        assert!(line.trim_end().ends_with('2'), "{line}");
    }

    #[test]
    fn shards_table_decodes_document_keys() {
        let split = crate::keys::to_hex(&crate::keys::doc_key("default", "bench", "k00005000"));
        let cluster = pb::ClusterStatusResponse {
            shards: vec![
                pb::ShardStatus {
                    id: 2,
                    start_hex: split.clone(),
                    epoch: 2,
                    state: "hibernating".into(),
                    ..Default::default()
                },
                pb::ShardStatus {
                    id: 1,
                    start_hex: "01".into(),
                    end_hex: split,
                    epoch: 2,
                    state: "active".into(),
                    leader: 3,
                    qps: 12.5,
                    ..Default::default()
                },
            ],
            answered_by: 1,
            ..Default::default()
        };
        let out = render_shards(&cluster);
        assert!(out.starts_with("2 shards (1 active, 1 hibernating)"), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[2].starts_with("1 ") && lines[2].contains("12.5") && lines[2].contains("default/bench/k00005000)"),
            "{out}"
        );
        assert!(lines[3].starts_with("2 ") && lines[3].contains("[default/bench/k00005000, end)"), "{out}");
    }
}
