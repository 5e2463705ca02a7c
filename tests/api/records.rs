//! Stored records that no longer read (a hand edit, another writer, a library that
//! parses differently after an upgrade): one of them must not hide its owner's other
//! projects nor stop their syncs.

use redis::AsyncCommands;
use serde_json::Value;

use crate::helpers::{GitRepo, TestApp};
use crate::redis_server::{redis_or_skip, unique_prefix};

#[tokio::test]
async fn a_project_record_that_no_longer_reads_hides_none_of_its_owners_others() {
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let prefix = unique_prefix();
    let app = TestApp::spawn_with({
        let url = redis.url();
        let prefix = prefix.clone();
        move |config| {
            config.redis_url = Some(url);
            config.redis_prefix = prefix;
            config.serve_workers = Some(1);
        }
    })
    .await;
    let good_repo = GitRepo::new();
    good_repo.write("a.txt", "a\n");
    let commit = good_repo.commit("a");
    let bad_repo = GitRepo::new();
    bad_repo.write("b.txt", "b\n");
    bad_repo.commit("b");
    let good = app.register(&good_repo).await;
    let bad = app.register(&bad_repo).await;

    // the second project's stored URL stops parsing
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connects");
    let key = format!("{prefix}:project:{bad}");
    let json: String = conn.hget(&key, "json").await.expect("the stored project");
    let mut stored: Value = serde_json::from_str(&json).expect("json");
    stored["repo_url"] = Value::String(String::new());
    let () = conn
        .hset(&key, "json", stored.to_string())
        .await
        .expect("rewritten");

    let (status, listed) = app.get_json("/api/v1/projects").await;
    assert_eq!(status, 200, "the owner's list still answers: {listed}");
    let ids: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|project| project["project_id"].as_str())
        .collect();
    assert_eq!(ids, vec![good.as_str()], "the readable project is listed");

    let accepted = app.request_sync(&good).await;
    let record = app
        .wait_for_sync(accepted["sync_id"].as_str().expect("sync_id"))
        .await;
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["commit"], commit.as_str());
    drop(redis);
}
