//! A host without CA certificates (a minimal image, a distroless container):
//! the platform's roots are pointed at an empty file and an empty directory,
//! which is what `rustls-native-certs` finds on such a host.

#![allow(clippy::unwrap_used)] // a panic in a test is a failed assertion

mod common;

use common::Fixture;
use predicates::prelude::PredicateBooleanExt;
use predicates::str::contains;
use serde_json::json;

/// Makes `cmd` see no CA root certificate at all.
fn without_roots(f: &Fixture, cmd: &mut std::process::Command) {
    let empty_file = f.path("no-roots.pem");
    let empty_dir = f.path("no-roots.d");
    std::fs::write(&empty_file, "").unwrap();
    std::fs::create_dir_all(&empty_dir).unwrap();
    cmd.env("SSL_CERT_FILE", empty_file)
        .env("SSL_CERT_DIR", empty_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_its_own_service_without_any_ca_certificate() {
    let f = Fixture::new();
    f.config(json!({"service": {"listen": format!("127.0.0.1:{}", common::free_port())}}));
    f.workflow("exit 0");
    let handle = common::start_service(&f).await;

    let mut status = f.cli_process(&["status"]);
    without_roots(&f, &mut status);
    let out = tokio::task::spawn_blocking(move || status.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "status failed without CA certificates, though its API is plain http on loopback:\n{stdout}{stderr}"
    );
    assert!(stdout.contains("health:  ok"), "{stdout}");

    handle.shutdown();
    handle.wait().await.unwrap();
}

#[test]
fn the_github_source_names_the_missing_certificates_and_is_no_configuration_error() {
    let f = Fixture::new();
    // Nothing listens there, and nothing is sent: the client cannot be built.
    f.config(json!({
        "source": "github",
        "github": {"repos": ["o/r"], "api_url": "https://127.0.0.1:9", "token": "t0ken"}
    }));
    for args in [&["config", "check"][..], &["run", "--once"][..]] {
        let mut cmd = f.cli_process(args);
        without_roots(&f, &mut cmd);
        assert_cmd::Command::from_std(cmd)
            .assert()
            .code(1)
            .stderr(contains("no CA root certificates found in SSL_CERT_FILE"))
            .stderr(contains("install the ca-certificates package"))
            .stderr(contains("configuration error").not())
            .stderr(contains("t0ken").not());
    }
}
