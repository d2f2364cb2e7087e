//! `claude-flow status`, `retry` and `cancel` while a service runs: they go
//! through its HTTP API, here a recording stand-in, since the running
//! service owns the state.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use common::Fixture;
use serde_json::{Value, json};
use wiremock::matchers::{any, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The token the stand-in's service wrote to `<state_dir>/api-token`.
const TOKEN: &str = "5f0c2a9e81d34b7a9c6e0f1d2b3a4c5d";

/// A fixture whose state directory says a service runs (this test's own
/// PID is alive), with `service.listen` set to `listen`, and the API
/// token that service wrote at start.
fn with_running_service(listen: &str) -> Fixture {
    use std::os::unix::fs::OpenOptionsExt;
    let fixture = Fixture::new();
    fixture.config(json!({"service": {"listen": listen}}));
    std::fs::create_dir_all(fixture.path("state")).unwrap();
    std::fs::write(fixture.path("state/lock"), std::process::id().to_string()).unwrap();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(fixture.path("state/api-token"))
        .unwrap();
    std::io::Write::write_all(&mut file, format!("{TOKEN}\n").as_bytes()).unwrap();
    fixture
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A stand-in for the service that fails the test on any request it was
/// not told to expect.
async fn fake_service() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(500).set_body_string("unexpected request"))
        .with_priority(u8::MAX)
        .named("catch-all: a request the test did not expect")
        .expect(0)
        .mount(&server)
        .await;
    server
}

fn listen_of(server: &MockServer) -> String {
    server.address().to_string()
}

fn summary(status: &str, round: u32) -> Value {
    json!({
        "issue": "local/issues#1", "repo": "local/issues", "number": 1,
        "title": "Fix it", "status": status, "round": round, "attempts": 0,
        "pr_url": null, "next_retry_at": null, "last_error": null,
        "updated_at": "2026-11-21T10:00:00Z",
    })
}

/// Runs `claude-flow <args>` off the runtime's threads (the stand-in
/// answers on them).
async fn cli(fixture: &Fixture, args: &[&str]) -> std::process::Output {
    let mut cmd = fixture.cli_process(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_and_cancel_ask_the_running_service() {
    let server = fake_service().await;
    Mock::given(method("POST"))
        .and(path("/api/issues/local/issues/1/retry"))
        .and(header("authorization", bearer(TOKEN).as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(summary("queued", 2)))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/issues/local/issues/1/cancel"))
        .and(header("authorization", bearer(TOKEN).as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(summary("running", 1)))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/issues/local/issues/2/cancel"))
        .and(header("authorization", bearer(TOKEN).as_str()))
        .respond_with(
            ResponseTemplate::new(409)
                .set_body_json(json!({"error": "local/issues#2 is already done"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let fixture = with_running_service(&listen_of(&server));

    let out = cli(&fixture, &["retry", "1"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "local/issues#1: queued (round 2)\n"
    );

    let out = cli(&fixture, &["cancel", "1"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopping the running workflow"));

    let out = cli(&fixture, &["cancel", "2"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("local/issues#2 is already done") && stderr.contains("HTTP 409"),
        "{stderr}"
    );
    // The state store was not touched: the service owns it.
    assert!(!fixture.path("state/state.jsonl").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_adds_the_running_services_view() {
    let server = fake_service().await;
    Mock::given(method("GET"))
        .and(path("/healthz"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "status": "ok",
            "version": "0.1.0",
            "last_poll": {"at": "2026-11-21T10:00:00Z", "duration": "12ms", "ready": 1, "error": null},
            "consecutive_poll_failures": 0,
            "running": [{
                "issue": "local/issues#1", "round": 2, "attempt": 3,
                "started_at": "2026-11-21T09:58:00.123456789Z",
            }],
            "running_count": 1,
            "waiting": 0,
            "reports_owed": 0,
            "paused_until": "2026-11-21T11:00:00Z",
            "pause_reason": "the workflow for local/issues#2 reported its quota exhausted",
            "stopping": false,
        })))
        .expect(2)
        .mount(&server)
        .await;
    let fixture = with_running_service(&listen_of(&server));

    let out = cli(&fixture, &["status"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("service: running (pid {})", std::process::id())),
        "{text}"
    );
    assert!(text.contains("health:  ok"), "{text}");
    assert!(
        text.contains("polled:  2026-11-21T10:00:00Z (ok, 1 ready)"),
        "{text}"
    );
    assert!(
        text.contains("working: local/issues#1 round 2 attempt 3, running for "),
        "{text}"
    );
    assert!(
        text.contains(
            "paused:  until 2026-11-21T11:00:00Z: the workflow for local/issues#2 reported its quota exhausted"
        ),
        "{text}"
    );
    assert!(
        text.contains("`claude-flow resume` ends the pause"),
        "{text}"
    );

    let out = cli(&fixture, &["status", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["service"]["running"], true);
    assert_eq!(status["service"]["health"]["status"], "ok");
    // CONTRACT section 6: at the top level, whole seconds.
    assert_eq!(status["paused_until"], "2026-11-21T11:00:00Z");
    assert_eq!(
        status["pause_reason"],
        "the workflow for local/issues#2 reported its quota exhausted"
    );
    let mut running = status["running"].clone();
    // How long it has run, beside the CONTRACT's fields: it grows with
    // the clock, so only its presence is checked.
    let elapsed = running[0]
        .as_object_mut()
        .unwrap()
        .remove("elapsed_seconds");
    assert!(elapsed.is_some_and(|e| e.is_u64()), "{status}");
    assert_eq!(
        running,
        json!([{
            "issue": "local/issues#1", "round": 2, "attempt": 3,
            "started_at": "2026-11-21T09:58:00Z",
        }])
    );
    assert_eq!(
        status["last_poll"],
        json!({"at": "2026-11-21T10:00:00Z", "ok": true, "error": null, "ready": 1})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_asks_the_running_service() {
    let server = fake_service().await;
    Mock::given(method("POST"))
        .and(path("/api/resume"))
        .and(header("authorization", bearer(TOKEN).as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "lifted_until": "2026-11-21T11:00:00.5Z",
            "pause_reason": "quota",
        })))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/resume"))
        .and(header("authorization", bearer(TOKEN).as_str()))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"lifted_until": null, "pause_reason": null})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let fixture = with_running_service(&listen_of(&server));

    let out = cli(&fixture, &["resume"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "the pause until 2026-11-21T11:00:00Z was lifted\n"
    );
    let out = cli(&fixture, &["resume"]).await;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "not paused\n");
    // The service owns the state: the CLI wrote nothing there.
    assert!(!fixture.path("state/service.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_an_unhealthy_service() {
    let server = fake_service().await;
    Mock::given(method("GET"))
        .and(path("/healthz"))
        .respond_with(ResponseTemplate::new(503).set_body_json(json!({
            "status": "unavailable",
            "reason": "the last 3 polls failed; the last one: HTTP 502",
            "version": "0.1.0",
            "last_poll": {"at": "2026-11-21T10:00:00Z", "duration": "1s", "ready": null, "error": "HTTP 502"},
            "consecutive_poll_failures": 3,
            "running": [],
            "running_count": 0,
            "paused_until": null,
            "stopping": false,
        })))
        .expect(1)
        .mount(&server)
        .await;
    let fixture = with_running_service(&listen_of(&server));
    let out = cli(&fixture, &["status"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("health:  unavailable (the last 3 polls failed"),
        "{text}"
    );
    assert!(
        text.contains("polled:  2026-11-21T10:00:00Z (failed: HTTP 502)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_of_a_running_service_is_an_error() {
    // A port nobody listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let fixture = with_running_service(&format!("127.0.0.1:{port}"));
    for args in [
        &["retry", "1"][..],
        &["cancel", "1"],
        &["resume"],
        &["status"],
    ] {
        let out = cli(&fixture, args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("the service is running")
                && stderr.contains(&format!(
                    "cannot reach the service's HTTP API at http://127.0.0.1:{port}/"
                )),
            "{args:?}: {stderr}"
        );
    }
    // status still says what it knows.
    let out = cli(&fixture, &["status"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("service: running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_running_service_the_state_store_is_used() {
    // A lock file naming a dead process: no service runs.
    let fixture = Fixture::new();
    fixture.config(json!({"service": {"listen": "127.0.0.1:9"}}));
    std::fs::create_dir_all(fixture.path("state")).unwrap();
    std::fs::write(fixture.path("state/lock"), "999999999").unwrap();
    let out = cli(&fixture, &["retry", "1"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("local/issues#1 is not known to the state store"),
        "{stderr}"
    );
    let out = cli(&fixture, &["resume"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "not paused\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_api_token_wins_over_the_state_directorys() {
    let server = fake_service().await;
    Mock::given(method("POST"))
        .and(path("/api/resume"))
        .and(header("authorization", "Bearer configured-token-42"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"lifted_until": null, "pause_reason": null})),
        )
        .expect(2)
        .mount(&server)
        .await;
    let fixture = with_running_service(&listen_of(&server));
    fixture.config(
        json!({"service": {"listen": listen_of(&server), "api_token": "configured-token-42"}}),
    );
    let out = cli(&fixture, &["resume"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The file, relative to the configuration's folder.
    std::fs::write(fixture.path("api.token"), "configured-token-42\n").unwrap();
    fixture
        .config(json!({"service": {"listen": listen_of(&server), "api_token_file": "api.token"}}));
    let out = cli(&fixture, &["resume"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this test runs as root (then it can run the CLI as another user).
fn running_as_root(fixture: &Fixture) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(fixture.path("config.json"))
        .unwrap()
        .uid()
        == 0
}

/// `claude-flow <args>` as a user who cannot read the service's 0600
/// token file: `nobody` when the test runs as root, else this user with
/// the file's permissions taken away.
async fn cli_without_the_token(fixture: &Fixture, args: &[&str]) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let mut cmd = fixture.cli_process(args);
    if running_as_root(fixture) {
        // nobody must still read the configuration and the state.
        for (rel, mode) in [
            ("", 0o755),
            ("config.json", 0o644),
            ("issues", 0o755),
            ("state", 0o755),
            ("state/lock", 0o644),
        ] {
            std::fs::set_permissions(fixture.path(rel), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        cmd.uid(65534).gid(65534);
    } else {
        std::fs::set_permissions(
            fixture.path("state/api-token"),
            std::fs::Permissions::from_mode(0o000),
        )
        .unwrap();
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_user_cannot_read_is_explained_and_status_still_works() {
    let server = fake_service().await;
    Mock::given(method("GET"))
        .and(path("/healthz"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "status": "ok",
            "version": "0.1.0",
            "last_poll": null,
            "running": [],
            "running_count": 0,
            "paused_until": null,
            "stopping": false,
        })))
        .expect(1)
        .mount(&server)
        .await;
    let fixture = with_running_service(&listen_of(&server));
    for args in [&["retry", "1"][..], &["cancel", "1"], &["resume"]] {
        let out = cli_without_the_token(&fixture, args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let file = fixture.path("state/api-token");
        for needle in [
            "cannot read the HTTP API's token",
            &file.display().to_string(),
            "ermission denied",
            "as the service's user or as root",
            "service.api_token_file",
        ] {
            assert!(
                stderr.contains(needle),
                "{args:?}: no {needle:?} in {stderr}"
            );
        }
        assert!(!stderr.contains(TOKEN));
    }
    // Reading needs no token.
    let out = cli_without_the_token(&fixture, &["status"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("health:  ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_file_is_explained() {
    let server = fake_service().await;
    let fixture = with_running_service(&listen_of(&server));
    std::fs::remove_file(fixture.path("state/api-token")).unwrap();
    let out = cli(&fixture, &["cancel", "1"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read the HTTP API's token")
            && stderr.contains("state/api-token")
            && stderr.contains("service.api_token"),
        "{stderr}"
    );
}
