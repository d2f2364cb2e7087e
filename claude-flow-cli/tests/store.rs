//! `claude-flow store` and `store.kind: "postgres"` through the real
//! binary, against the server `CLAUDE_FLOW_TEST_POSTGRES` names.
#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use claude_flow_core::state::{PostgresSettings, PostgresStore, TestDb};
use claude_flow_core::{
    FileStore, Issue, IssueKey, IssueRecord, IssueStatus, ServiceState, StateStore,
};
use common::Fixture;
use predicates::prelude::PredicateBooleanExt;
use serde_json::json;

fn use_database(fixture: &Fixture, url: &str, kind: &str) {
    fixture.config(json!({"store": {"kind": kind, "postgres": {"url": url}}}));
}

#[tokio::test]
async fn migrate_then_copy_a_file_store_in_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let fixture = Fixture::new();
    use_database(&fixture, db.url.expose(), "file");
    let repo = claude_flow_core::app::repositories(
        &claude_flow_core::Config::load(&fixture.config_path()).unwrap(),
    )
    .unwrap()
    .remove(0);
    let mut records = Vec::new();
    {
        let file = FileStore::open(fixture.path("state")).unwrap();
        for n in 1..=3 {
            let mut record = IssueRecord::new(Issue::new(IssueKey::new(repo.clone(), n), "t"));
            if n == 2 {
                record.status = IssueStatus::Done;
            }
            file.put(&record).await.unwrap();
            records.push(record);
        }
        let service = ServiceState {
            quota_exits: 2,
            ..ServiceState::default()
        };
        file.put_service(&service).await.unwrap();

        // While a daemon holds the state directory, nothing is copied.
        fixture
            .cli()
            .args(["store", "copy", "--to", "postgres"])
            .assert()
            .code(75);
    }

    fixture
        .cli()
        .args(["store", "migrate"])
        .assert()
        .success()
        .stdout("schema created (version 2)\n");
    fixture
        .cli()
        .args(["store", "migrate"])
        .assert()
        .success()
        .stdout("the schema is up to date (version 2)\n");

    fixture
        .cli()
        .args(["store", "copy", "--to", "postgres"])
        .assert()
        .success()
        .stdout(predicates::str::contains("copied 3 issue records"));
    let store = PostgresStore::connect(&db.url, PostgresSettings::default())
        .await
        .unwrap();
    let mut copied = store.list().await.unwrap();
    copied.sort_by(|a, b| a.key().cmp(b.key()));
    assert_eq!(copied, records);
    assert_eq!(store.load_service().await.unwrap().quota_exits, 2);

    // Once: a second copy changes nothing.
    let mut extra = records[0].clone();
    extra.issue.key = IssueKey::new(repo, 9);
    FileStore::open(fixture.path("state"))
        .unwrap()
        .put(&extra)
        .await
        .unwrap();
    fixture
        .cli()
        .args(["store", "copy", "--to", "postgres"])
        .assert()
        .code(1)
        .stderr(predicates::str::contains("already holds 3 issue records"));
    assert_eq!(store.list().await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_refused_login_exits_78_naming_the_key_without_the_password() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let fixture = Fixture::new();
    use_database(
        &fixture,
        &db.url_as("no_such_user_cf", "hunter2"),
        "postgres",
    );
    let out = fixture
        .cli()
        .args(["store", "migrate"])
        .assert()
        .code(78)
        .get_output()
        .clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("store.postgres.url"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    fixture
        .cli()
        .args(["config", "show"])
        .assert()
        .success()
        .stdout(predicates::str::contains("hunter2").not());
}

#[tokio::test]
async fn run_once_keeps_its_records_in_postgres() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let fixture = Fixture::new();
    use_database(&fixture, db.url.expose(), "postgres");
    fixture.workflow("echo working on $CLAUDE_FLOW_ISSUE_NUMBER");
    for n in 1..=3 {
        fixture.issue(n, &format!("issue {n}"), "body");
    }
    fixture
        .cli()
        .args(["run", "--once"])
        .timeout(common::PATIENCE)
        .assert()
        .success()
        .stdout(predicates::str::contains("3 done"));
    let store = PostgresStore::connect(&db.url, PostgresSettings::default())
        .await
        .unwrap();
    let records = store.list().await.unwrap();
    assert_eq!(records.len(), 3);
    assert!(
        records.iter().all(|r| r.status == IssueStatus::Done),
        "{records:?}"
    );
    // Nothing went to the state directory's journal.
    assert!(!fixture.path("state/state.jsonl").exists());
    // The read commands read the database.
    let list = tokio::task::spawn_blocking(move || {
        let list = fixture.list();
        let show = fixture.stdout(&["show", "2"]);
        // Status from the database: the daemon that ran the issues is
        // listed, with nothing running now.
        let status: serde_json::Value =
            serde_json::from_str(&fixture.stdout(&["status", "--json"])).unwrap();
        let nodes = status["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 1, "{status}");
        assert_eq!(nodes[0]["running"], serde_json::json!([]), "{status}");
        assert!(
            show.contains(" on "),
            "show names the node of each attempt: {show}"
        );
        // No daemon to ask (service.listen is empty): the operator's
        // changes go to the database, where daemons on any host see them.
        let retried = fixture.stdout(&["retry", "2"]);
        assert!(retried.contains("#2: queued (round 2)"), "{retried}");
        let cancelled = fixture.stdout(&["cancel", "2"]);
        assert!(cancelled.contains("#2: cancelled (round 2)"), "{cancelled}");
        let resumed = fixture.stdout(&["resume"]);
        assert!(resumed.contains("not paused"), "{resumed}");
        // Removing files is the business of the daemon whose disk they
        // are on.
        let out = fixture.cli().args(["prune"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("the daemons own the records"), "{stderr}");
        assert!(!fixture.path("state/state.jsonl").exists());
        (list, show)
    })
    .await
    .unwrap();
    assert_eq!(list.0.len(), 3, "{:?}", list.0);
    assert!(list.0.iter().all(|e| e["status"] == "done"), "{:?}", list.0);
    let two = store.get(&records[1].issue.key).await.unwrap().unwrap();
    assert_eq!((two.status, two.round), (IssueStatus::Cancelled, 2));
    assert!(list.1.contains("status:     done"), "{}", list.1);
}

#[tokio::test]
async fn reading_an_empty_database_changes_nothing() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let fixture = Fixture::new();
    use_database(&fixture, db.url.expose(), "postgres");
    let out = tokio::task::spawn_blocking(move || {
        let out = fixture.cli().args(["list"]).output().unwrap();
        (out, fixture)
    })
    .await
    .unwrap();
    let (out, fixture) = out;
    assert!(
        !out.status.success(),
        "list of a database with no schema succeeded"
    );
    // Neither a schema (a newer CLI would upgrade it under running
    // daemons) nor a state directory.
    assert!(!fixture.path("state").exists());
    let tables = std::process::Command::new("psql")
        .arg(db.url.expose())
        .args([
            "-tAc",
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'claude_flow%'",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&tables.stdout).trim(), "0");
}
