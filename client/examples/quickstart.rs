//! Quickstart: connect to a local `floe dev` node (gRPC on 127.0.0.1:7700) and put, get,
//! patch and delete a typed document.
//!
//! Run `floe dev` in one terminal, then `cargo run -p floe-client --example quickstart`.

use floe_client::{Client, Error, ReadConsistency};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct User {
    name: String,
    email: String,
    age: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::connect(["127.0.0.1:7700"]).await?;
    let created = client.create_collection("users").await?;
    println!("collection users: created={created}");
    let users = client.collection("users");

    let alice = User { name: "Alice".into(), email: "alice@example.com".into(), age: 30 };
    let put = users.put("alice", &alice).await?;
    println!("put alice: version {}", put.version);

    let read = users.get::<User>("alice").await?;
    println!("get alice (strong): {read:?}");

    let patched = users.merge_patch("alice", &serde_json::json!({"age": 31}), Some(put.version)).await?;
    println!("merge patch: version {}, document {}", patched.version, patched.json.unwrap_or_default());

    // A conditional write against a stale version fails with the stored version attached.
    match users.put_if_version("alice", &alice, put.version).await {
        Err(Error::VersionMismatch { current, .. }) => {
            println!("stale write rejected, stored version is {current:?}")
        }
        other => println!("unexpected answer to a stale write: {other:?}"),
    }

    let eventual = users.get_with::<User>("alice", ReadConsistency::Eventual).await?;
    println!("get alice (eventual): {eventual:?}");

    let deleted = users.delete("alice", None).await?;
    println!("deleted alice at version {}", deleted.version);
    println!("get after delete: {:?}", users.get::<User>("alice").await?);
    Ok(())
}
