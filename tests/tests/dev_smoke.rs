//! Smoke tests of a single `floe dev` node: the HTTP gateway's contract (statuses, ETag,
//! conditional headers, patches, input limits, error bodies) and the same core flow through
//! the Rust client over gRPC (typed documents, conditional writes, patches, batches, error
//! variants, admin calls).
//!
//! Needs the `floe` binary (see `floe_tests::floe_bin`). Each test is bounded by
//! `TEST_TIMEOUT`.

use std::time::Duration;

use floe_client::{Document, Error, ReadConsistency};
use floe_tests::{ensure_collection, http_client, nested_object, DevNode};
use reqwest::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// The node's default document size limit.
const DOCUMENT_BYTES_MAX: usize = 1024 * 1024;
/// The node's JSON nesting limit.
const NESTING_DEPTH_MAX: usize = 64;

/// Asserts that `response` is an error with this status and stable code, in the documented
/// body shape `{"error": {"code", "message"}}`.
async fn expect_error(response: Response, status: StatusCode, code: &str, what: &str) {
    let status_actual = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status_actual, status, "{what}: body {body}");
    let parsed: Value =
        serde_json::from_str(&body).unwrap_or_else(|error| panic!("{what}: error body is not JSON ({error}): {body}"));
    assert_eq!(parsed["error"]["code"], json!(code), "{what}: body {body}");
    assert!(parsed["error"]["message"].is_string(), "{what}: error without message: {body}");
}

/// Asserts a successful PATCH: the body is the patched document, the version is in `ETag`.
async fn expect_patch(response: Response, want: &Value, what: &str) -> u64 {
    let status = response.status();
    let etag = response.headers().get("etag").and_then(|v| v.to_str().ok()).map(|s| s.trim_matches('"').to_string());
    let body = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "{what}: status {status}, body {body}");
    let parsed: Value = serde_json::from_str(&body)
        .unwrap_or_else(|error| panic!("{what}: patch answer is not JSON ({error}): {body}"));
    assert_eq!(&parsed, want, "{what}: the answer is the patched document");
    etag.and_then(|e| e.parse().ok()).unwrap_or_else(|| panic!("{what}: no numeric ETag"))
}

/// Asserts a successful write and returns the version from `{"collection","id","version"}`.
async fn expect_write(response: Response, collection: &str, id: &str, what: &str) -> u64 {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "{what}: status {status}, body {body}");
    let parsed: Value = serde_json::from_str(&body)
        .unwrap_or_else(|error| panic!("{what}: write answer is not JSON ({error}): {body}"));
    assert_eq!(parsed["collection"], json!(collection), "{what}: {body}");
    assert_eq!(parsed["id"], json!(id), "{what}: {body}");
    parsed["version"].as_u64().unwrap_or_else(|| panic!("{what}: no numeric version in {body}"))
}

/// Reads a document over HTTP; returns (version from ETag, body).
async fn http_get(http: &reqwest::Client, url: &str) -> (u64, Value) {
    let response = http.get(url).send().await.expect("GET sends");
    let status = response.status();
    let etag = response.headers().get(reqwest::header::ETAG).and_then(|value| value.to_str().ok()).map(str::to_owned);
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "GET {url}: body {body}");
    let etag = etag.unwrap_or_else(|| panic!("GET {url}: no ETag"));
    let version = etag
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .and_then(|inner| inner.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("GET {url}: ETag {etag:?} is not a quoted version"));
    let value =
        serde_json::from_str(&body).unwrap_or_else(|error| panic!("GET {url}: body is not JSON ({error}): {body}"));
    (version, value)
}

/// Proves the HTTP gateway's document contract end to end on one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_gateway_contract() {
    tokio::time::timeout(TEST_TIMEOUT, http_gateway_flow()).await.expect("test finished within TEST_TIMEOUT");
}

async fn http_gateway_flow() {
    let node = DevNode::start().await.expect("floe dev starts");
    let client = node.client().expect("client config");
    ensure_collection(&client, "smoke").await.expect("collection");
    let http = http_client();
    let doc_url = |id: &str| node.process.http_url(&format!("/v1/collections/smoke/docs/{id}"));
    let alice = doc_url("alice");

    for path in ["/healthz", "/readyz"] {
        let response = http.get(node.process.http_url(path)).send().await.expect("send");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }

    // Upsert, then read back with the version in a quoted ETag.
    let body = json!({"name": "Alice", "age": 30, "tags": ["a", "b"], "nested": {"x": null}});
    let version_1 =
        expect_write(http.put(&alice).json(&body).send().await.expect("send"), "smoke", "alice", "put alice").await;
    let (version_read, value) = http_get(&http, &alice).await;
    assert_eq!(version_read, version_1);
    assert_eq!(value, body);

    // Every consistency level by name; the session token comes back in Floe-Session.
    let response = http.get(&alice).send().await.expect("send");
    let token = response.headers().get("floe-session").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let token = token.expect("a read returns a Floe-Session token");
    for query in ["?consistency=bounded&max_staleness_ms=500", "?consistency=eventual", "?consistency=strong"] {
        let (version, _) = http_get(&http, &format!("{alice}{query}")).await;
        assert_eq!(version, version_1, "{query}");
    }
    let response =
        http.get(format!("{alice}?consistency=session")).header("Floe-Session", &token).send().await.expect("send");
    assert_eq!(response.status(), StatusCode::OK, "session read with the returned token");
    expect_error(
        http.get(format!("{alice}?consistency=bounded")).send().await.expect("send"),
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "bounded without max_staleness_ms",
    )
    .await;

    // If-None-Match: * creates only.
    expect_error(
        http.put(&alice).header("If-None-Match", "*").json(&json!({"name": "Impostor"})).send().await.expect("send"),
        StatusCode::CONFLICT,
        "already_exists",
        "create over existing",
    )
    .await;
    let bob_version = expect_write(
        http.put(doc_url("bob")).header("If-None-Match", "*").json(&json!({"name": "Bob"})).send().await.expect("send"),
        "smoke",
        "bob",
        "create bob",
    )
    .await;
    assert!(bob_version > 0);

    // If-Match with a wrong version conflicts; with the right one it replaces.
    expect_error(
        http.put(&alice)
            .header("If-Match", (version_1 + 1000).to_string())
            .json(&json!({"name": "Stale"}))
            .send()
            .await
            .expect("send"),
        StatusCode::CONFLICT,
        "version_mismatch",
        "If-Match mismatch",
    )
    .await;
    let body_2 = json!({"name": "Alice", "age": 31});
    let version_2 = expect_write(
        http.put(&alice).header("If-Match", version_1.to_string()).json(&body_2).send().await.expect("send"),
        "smoke",
        "alice",
        "If-Match replace",
    )
    .await;
    assert!(version_2 > version_1, "version must increase: {version_1} -> {version_2}");
    assert_eq!(http_get(&http, &alice).await, (version_2, body_2));

    // RFC 7396 merge patch: set a field, add one, remove one.
    let version_3 = expect_patch(
        http.patch(&alice)
            .header("Content-Type", "application/merge-patch+json")
            .body(json!({"age": 32, "city": "Oslo", "name": null}).to_string())
            .send()
            .await
            .expect("send"),
        &json!({"age": 32, "city": "Oslo"}),
        "merge patch",
    )
    .await;
    assert!(version_3 > version_2);
    assert_eq!(http_get(&http, &alice).await, (version_3, json!({"age": 32, "city": "Oslo"})));

    // RFC 6902 JSON patch.
    let version_4 = expect_patch(
        http.patch(&alice)
            .header("Content-Type", "application/json-patch+json")
            .body(
                json!([
                    {"op": "test", "path": "/city", "value": "Oslo"},
                    {"op": "replace", "path": "/age", "value": 33},
                    {"op": "add", "path": "/langs", "value": ["no", "en"]},
                    {"op": "remove", "path": "/city"}
                ])
                .to_string(),
            )
            .send()
            .await
            .expect("send"),
        &json!({"age": 33, "langs": ["no", "en"]}),
        "json patch",
    )
    .await;
    assert!(version_4 > version_3);
    assert_eq!(http_get(&http, &alice).await, (version_4, json!({"age": 33, "langs": ["no", "en"]})));

    // Delete, then 404.
    expect_write(http.delete(&alice).send().await.expect("send"), "smoke", "alice", "delete").await;
    expect_error(http.get(&alice).send().await.expect("send"), StatusCode::NOT_FOUND, "not_found", "get after delete")
        .await;

    // Bad input is rejected with a stable code and never stored.
    let bad = doc_url("bad");
    expect_error(
        http.put(&bad).header("Content-Type", "application/json").body("{\"name\": ").send().await.expect("send"),
        StatusCode::BAD_REQUEST,
        "invalid_json",
        "malformed JSON",
    )
    .await;
    expect_error(
        http.put(&bad).json(&json!([1, 2, 3])).send().await.expect("send"),
        StatusCode::BAD_REQUEST,
        "not_an_object",
        "array document",
    )
    .await;
    expect_error(
        http.put(&bad)
            .header("Content-Type", "application/json")
            .body(nested_object(NESTING_DEPTH_MAX + 1))
            .send()
            .await
            .expect("send"),
        StatusCode::BAD_REQUEST,
        "too_deep",
        "nesting 65 deep",
    )
    .await;
    // The limit itself is allowed (depth counted with the outermost object as 1).
    expect_write(
        http.put(doc_url("deep"))
            .header("Content-Type", "application/json")
            .body(nested_object(NESTING_DEPTH_MAX))
            .send()
            .await
            .expect("send"),
        "smoke",
        "deep",
        "nesting 64 deep",
    )
    .await;
    let oversized = format!(r#"{{"blob":"{}"}}"#, "x".repeat(DOCUMENT_BYTES_MAX));
    expect_error(
        http.put(&bad).header("Content-Type", "application/json").body(oversized).send().await.expect("send"),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        "document over 1 MiB",
    )
    .await;
    expect_error(
        http.put(doc_url("bad%01id")).json(&json!({"a": 1})).send().await.expect("send"),
        StatusCode::BAD_REQUEST,
        "invalid_id",
        "id with a control character",
    )
    .await;
    expect_error(
        http.get(&bad).send().await.expect("send"),
        StatusCode::NOT_FOUND,
        "not_found",
        "rejected documents are not stored",
    )
    .await;

    // Cluster status and metrics.
    let response = http.get(node.process.http_url("/v1/cluster")).send().await.expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    let cluster: Value = response.json().await.expect("cluster JSON");
    let nodes = cluster["nodes"].as_array().expect("nodes array");
    assert_eq!(nodes.len(), 1, "{cluster}");
    assert!(cluster["shards"].is_array(), "{cluster}");
    let response = http.get(node.process.http_url("/metrics")).send().await.expect("send");
    assert_eq!(response.status(), StatusCode::OK);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    name: String,
    age: u32,
    tags: Vec<String>,
}

fn user(name: &str, age: u32) -> User {
    User { name: name.to_owned(), age, tags: vec!["t".to_owned()] }
}

/// Proves the Rust client's core flow and error mapping against a real node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_client_core_flow() {
    tokio::time::timeout(TEST_TIMEOUT, grpc_client_flow()).await.expect("test finished within TEST_TIMEOUT");
}

async fn grpc_client_flow() {
    let node = DevNode::start().await.expect("floe dev starts");
    let client = floe_client::Client::connect([node.process.grpc_addr.clone()]).await.expect("connect");
    ensure_collection(&client, "people").await.expect("collection");
    let people = client.collection("people");

    // Put and typed get.
    let alice = user("Alice", 30);
    let put = people.put("alice", &alice).await.expect("put");
    assert_eq!((put.collection.as_str(), put.id.as_str()), ("people", "alice"));
    assert!(put.version > 0);
    assert!(client.leader().is_some(), "a write response names the leader");
    let read: Document<User> = people.get("alice").await.expect("get").expect("alice exists");
    assert_eq!((read.id.as_str(), read.version), ("alice", put.version));
    assert_eq!(read.value, alice);

    // Create: only when absent.
    let error = people.create("alice", &alice).await.expect_err("exists");
    assert!(matches!(error, Error::AlreadyExists { .. }), "{error:?}");
    people.create("bob", &user("Bob", 40)).await.expect("create bob");

    // Conditional writes.
    let error = people.put_if_version("alice", &alice, put.version + 1000).await.expect_err("stale version");
    assert!(
        matches!(error, Error::VersionMismatch { current: Some(current), .. } if current == put.version),
        "{error:?}"
    );
    let put_2 = people.put_if_version("alice", &user("Alice", 31), put.version).await.expect("put at current version");
    assert!(put_2.version > put.version);
    let replaced = people.replace("alice", &user("Alice", 32), Some(put_2.version)).await.expect("replace");
    assert!(replaced.version > put_2.version);
    let error = people.replace("nobody", &user("No", 1), None).await.expect_err("replace needs an existing document");
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");

    // Patches return the patched document.
    let merged = people.merge_patch("alice", &json!({"age": 41}), Some(replaced.version)).await.expect("merge patch");
    assert!(merged.version > replaced.version);
    let merged_user = merged.document::<User>().expect("typed").expect("patch returns the document");
    assert_eq!(merged_user.value, user("Alice", 41));
    let error = people
        .json_patch("alice", &json!([{"op": "test", "path": "/name", "value": "Mallory"}]), None)
        .await
        .expect_err("test op fails");
    assert!(matches!(&error, Error::PreconditionFailed { code, .. } if code == "patch_test_failed"), "{error:?}");
    let patched = people
        .json_patch("alice", &json!([{"op": "add", "path": "/tags/-", "value": "admin"}]), None)
        .await
        .expect("json patch");
    assert_eq!(patched.json.as_ref().map(|json| json["tags"].clone()), Some(json!(["t", "admin"])));

    // Eventual read on a single node sees the latest write.
    let eventual: Document<Value> =
        people.get_with("alice", ReadConsistency::Eventual).await.expect("eventual get").expect("alice exists");
    assert_eq!(eventual.version, patched.version);

    // Atomic batch across two collections, then a batch read.
    ensure_collection(&client, "audit").await.expect("collection");
    let outcomes = client
        .batch()
        .put("people", "carol", &user("Carol", 50))
        .merge_patch("people", "bob", &json!({"age": 41}), None)
        .create("audit", "entry-1", &json!({"who": "carol"}))
        .commit()
        .await
        .expect("batch");
    assert_eq!(outcomes.len(), 3);
    assert_eq!(outcomes[0].id, "carol");
    let documents: Vec<Option<Document<User>>> =
        people.batch_get(["alice", "bob", "carol", "nobody"], ReadConsistency::Strong).await.expect("batch get");
    assert_eq!(documents.len(), 4);
    assert_eq!(documents[1].as_ref().map(|d| d.value.age), Some(41));
    assert_eq!(documents[2].as_ref().map(|d| d.version), Some(outcomes[0].version));
    assert!(documents[3].is_none());

    // A failing op aborts the whole batch.
    let error = client
        .batch()
        .put("people", "dave", &user("Dave", 20))
        .create("people", "alice", &alice)
        .commit()
        .await
        .expect_err("create over existing fails the batch");
    assert!(matches!(error, Error::AlreadyExists { .. }), "{error:?}");
    assert!(people.get::<User>("dave").await.expect("get").is_none());

    // Bad input maps to InvalidArgument with the server's code.
    let deep: Value = serde_json::from_str(&nested_object(NESTING_DEPTH_MAX + 1)).expect("json");
    for (id, value, code) in [
        ("deep", deep, "too_deep"),
        ("array", json!([1, 2]), "not_an_object"),
        ("bad\u{1}id", json!({"a": 1}), "invalid_id"),
    ] {
        let error = people.put(id, &value).await.expect_err("bad input");
        assert!(matches!(&error, Error::InvalidArgument { code: actual, .. } if actual == code), "{id:?}: {error:?}");
        assert!(!error.is_retryable());
    }

    // Conditional delete, delete, absent.
    let error = people.delete("alice", Some(patched.version + 1000)).await.expect_err("stale delete");
    assert!(matches!(error, Error::VersionMismatch { .. }), "{error:?}");
    people.delete("alice", None).await.expect("delete");
    assert!(people.get::<User>("alice").await.expect("get").is_none());

    // Admin.
    let collections = client.list_collections().await.expect("list");
    assert!(collections.iter().any(|c| c.name == "people" && c.tenant == "default"), "{collections:?}");
    let status = client.cluster_status().await.expect("cluster status");
    assert_eq!(status.nodes.len(), 1, "{status:?}");
}

/// Proves gRPC health reports SERVING and server reflection lists the Floe services, so
/// grpcurl and load balancers work without the .proto files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_reflection() {
    tokio::time::timeout(TEST_TIMEOUT, health_and_reflection_flow()).await.expect("test finished within TEST_TIMEOUT");
}

async fn health_and_reflection_flow() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let node = DevNode::start().await.expect("floe dev starts");
    let channel = tonic::transport::Endpoint::from_shared(node.process.grpc_endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest { service: "floe.v1.Documents".into() })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection stream")
        .into_inner();
    let reply = replies.message().await.expect("reflection reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["floe.v1.Documents", "floe.v1.Admin", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "reflection lists {names:?}, missing {want}");
    }
}
