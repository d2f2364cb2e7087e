//! The README's first command: the shipped demo settles every issue.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::path::Path;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn the_demo_settles_every_issue_with_a_pull_request() {
    let dir = tempfile::tempdir().unwrap();
    // The demo keeps its state two folders up, as it does under target/.
    let demo = dir.path().join("examples/demo");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo"),
        &demo,
    );
    let config = demo.join("config.json");
    let bin = assert_cmd::cargo::cargo_bin("claude-flow");
    let run = std::process::Command::new(&bin)
        .args(["run", "--once", "--config"])
        .arg(&config)
        .env_remove("CLAUDE_FLOW_CONFIG")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("settled 3 issues: 3 done"));
    let list = std::process::Command::new(&bin)
        .args(["list", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let issues: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    let summary: Vec<_> = issues
        .iter()
        .map(|i| {
            (
                i["number"].as_u64().unwrap(),
                i["status"].as_str().unwrap().to_owned(),
                i["attempts"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, "done".to_owned(), 1),
            (2, "done".to_owned(), 2),
            (3, "done".to_owned(), 1)
        ],
        "issue 2 is the flaky one"
    );
    for issue in &issues {
        let n = issue["number"].as_u64().unwrap();
        assert_eq!(
            issue["pr_url"],
            format!("https://example.com/demo/repo/pull/{n}")
        );
    }
    assert!(
        dir.path()
            .join("target/claude-flow-demo/state.jsonl")
            .exists()
    );
}
