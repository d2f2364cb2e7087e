//! Headless Chromium for the console's tests: finds Chromium and
//! chromedriver, starts chromedriver on a free port (in its own process
//! group, ended with the test), and opens a WebDriver session on it.
//!
//! Without them the tests say so loudly and pass, unless
//! `CLAUDE_FLOW_REQUIRE_BROWSER=1` (CI), where that is a failure.
//! `CHROMIUM` and `CHROMEDRIVER` name other binaries.

#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Generous: Chromium's first start on a loaded machine is slow.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A browser session; chromedriver and its browsers end when dropped.
pub struct Browser {
    pub client: Client,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.driver.id() as i32), Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where `name` is: an absolute path as given, else the first on `PATH`.
fn find(name: &str) -> Option<PathBuf> {
    let path = Path::new(name);
    if path.is_absolute() {
        return path.is_file().then(|| path.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn locate() -> Option<(PathBuf, PathBuf)> {
    let browser = match std::env::var("CHROMIUM") {
        Ok(name) => find(&name),
        Err(_) => ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find_map(find),
    }?;
    let driver = find(&std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()))?;
    Some((browser, driver))
}

/// A headless browser, or `None` (after saying so on stderr) when there
/// is none and none is required.
pub async fn start(test: &str) -> Option<Browser> {
    let Some((browser, driver)) = locate() else {
        let required = std::env::var("CLAUDE_FLOW_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{test}: no Chromium or chromedriver found, and CLAUDE_FLOW_REQUIRE_BROWSER=1 \
             (apt-get install chromium chromium-driver)"
        );
        // Straight to stderr: the test harness captures `eprintln!` of a
        // passing test, and this must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n==================================================================\n\
             {test}: skipped: no Chromium (install chromium and chromium-driver,\n\
             or set CHROMIUM and CHROMEDRIVER; CLAUDE_FLOW_REQUIRE_BROWSER=1 makes\n\
             this a failure)\n\
             ==================================================================\n"
        );
        return None;
    };
    let port = free_port();
    let driver = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let session = Browser {
        client: connect_when_up(&url, &browser).await,
        driver,
    };
    session.client.set_window_size(1280, 1100).await.unwrap();
    Some(session)
}

/// Connects once chromedriver answers (it takes a moment to listen).
async fn connect_when_up(url: &str, browser: &Path) -> Client {
    let capabilities = serde_json::json!({
        "goog:chromeOptions": {
            "binary": browser,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--no-proxy-server", "--hide-scrollbars",
            ],
        }
    });
    let capabilities = capabilities.as_object().unwrap().clone();
    let start = Instant::now();
    loop {
        let attempt = ClientBuilder::rustls()
            .unwrap()
            .capabilities(capabilities.clone())
            .connect(url)
            .await;
        match attempt {
            Ok(client) => return client,
            Err(e) if start.elapsed() > PATIENCE => panic!("no WebDriver session: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

impl Browser {
    /// The text of the first element matching `css` (as a user sees it).
    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap()
    }

    /// The first element matching `css`.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
    }

    /// Waits until the text of `css` satisfies `cond`, and returns it.
    pub async fn wait_text(&self, what: &str, css: &str, cond: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let text = match self.client.find(fantoccini::Locator::Css(css)).await {
                Ok(element) => element.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if cond(&text) {
                return text;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "timed out waiting for {what}: {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `script` in the page and returns its value.
    pub async fn eval(&self, script: &str) -> serde_json::Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Clicks the first element matching `css`.
    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    /// Ends the session (the browser exits), then chromedriver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}
