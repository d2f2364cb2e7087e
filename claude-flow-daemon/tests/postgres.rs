//! The daemon binary with `store.kind: "postgres"`: it starts while the
//! database is down and says so on `/healthz`; beside a leader, it follows
//! (runs workflows, healthy) and says that, and `/healthz` lists every
//! daemon.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claude_flow_core::state::TestDb;

const PATIENCE: Duration = Duration::from_secs(90);

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    listen: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn setup(url: &str, node: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("issues")).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let config = serde_json::json!({
        "source": "local",
        "local": {"dir": "issues"},
        "workflow": {"command": ["/bin/true"], "kill_grace": "1s"},
        "service": {"state_dir": "state", "poll_interval": "100ms", "listen": listen, "node": node},
        "store": {"kind": "postgres", "postgres": {"url": url, "lease": "4s"}}
    });
    std::fs::write(root.join("config.json"), config.to_string()).unwrap();
    Setup {
        _dir: dir,
        root,
        listen,
    }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon(root: &Path) -> Running {
    Running(
        Command::new(env!("CARGO_BIN_EXE_claude-flow-daemon"))
            .arg("--config")
            .arg(root.join("config.json"))
            .env_remove("CLAUDE_FLOW_CONFIG")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits until `/healthz` answers `code` with a reason containing `text`.
fn wait_health(listen: &str, code: u16, text: &str) -> serde_json::Value {
    wait_until(listen, |status, body| {
        status == code && body["reason"].as_str().unwrap_or_default().contains(text)
    })
}

/// Waits until `/healthz`'s answer pleases `wanted`; returns its body.
fn wait_until(listen: &str, wanted: impl Fn(u16, &serde_json::Value) -> bool) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let start = Instant::now();
    loop {
        let answer = rt.block_on(async {
            let response = client
                .get(format!("http://{listen}/healthz"))
                .send()
                .await
                .ok()?;
            let status = response.status().as_u16();
            Some((status, response.json::<serde_json::Value>().await.ok()?))
        });
        if let Some((status, body)) = answer {
            if wanted(status, &body) {
                return body;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "timed out waiting; last: {status} {body}"
            );
        }
        assert!(start.elapsed() < PATIENCE, "no answer from {listen}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_daemon_started_while_the_database_is_down_keeps_trying_and_says_so() {
    // Nothing listens on port 1.
    let s = setup("postgres://cf:hunter2@127.0.0.1:1/claude_flow", "lonely");
    let mut d = daemon(&s.root);
    let body = wait_health(&s.listen, 503, "waiting for the database");
    assert!(!body.to_string().contains("hunter2"), "{body}");
    assert!(
        d.0.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_follows_the_first_and_both_are_listed() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let url = db.url.expose().to_owned();
    tokio::task::spawn_blocking(move || {
        let first = setup(&url, "first");
        let _a = daemon(&first.root);
        wait_health(&first.listen, 200, "");
        let second = setup(&url, "second");
        let _b = daemon(&second.root);
        // A follower runs workflows: it is healthy, and says it follows.
        let body = wait_until(&second.listen, |code, body| {
            code == 200
                && body["role"] == "follower"
                && body["nodes"].as_array().is_some_and(|n| n.len() == 2)
        });
        assert_eq!(body["node"], "second", "{body}");
        let first_body = wait_until(&first.listen, |code, body| {
            code == 200 && body["role"] == "leader"
        });
        let nodes: Vec<&str> = first_body["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node"].as_str().unwrap())
            .collect();
        assert_eq!(nodes, ["first", "second"], "{first_body}");
        // The console shows every daemon too.
        let page = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                reqwest::Client::builder()
                    .no_proxy()
                    .build()
                    .unwrap()
                    .get(format!("http://{}/", second.listen))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
            });
        assert!(page.contains("id=\"daemons\""), "{page}");
        assert!(page.contains("second (this daemon)"), "{page}");
        assert!(page.contains(">first<"), "{page}");
    })
    .await
    .unwrap();
}
