//! Taking secrets out of workflow output before anyone is shown it: the
//! failure comment on GitHub, `claude-flow show`, the web console (which
//! answers without a token). A workflow given the token (or one that
//! finds another) may print it; its log is the workflow's own business,
//! what the service shows of it is not.

use std::sync::{Arc, LazyLock};

use regex::Regex;

use crate::config::Config;
use crate::secret::{REDACTED, Secret};

/// The secrets of one configuration, and anything shaped like a GitHub
/// token.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Arc<Vec<Secret>>,
}

impl Redactor {
    /// Redacts `secrets` (empty ones are ignored) and GitHub-shaped tokens.
    pub fn new(secrets: impl IntoIterator<Item = Secret>) -> Self {
        Self {
            secrets: Arc::new(
                secrets
                    .into_iter()
                    .filter(|s| !s.expose().is_empty())
                    .collect(),
            ),
        }
    }

    /// The GitHub token and the API token the configuration names (those
    /// that can be read; a configuration error is reported elsewhere).
    pub fn from_config(config: &Config) -> Self {
        let github = config.github_token().ok().flatten();
        let api = config.api_token().ok().flatten();
        Self::new(github.into_iter().chain(api))
    }

    /// `text` without the secrets.
    pub fn redact(&self, text: &str) -> String {
        static TOKENS: LazyLock<Option<Regex>> = LazyLock::new(|| {
            Regex::new(r"\b(gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})\b").ok()
        });
        let mut text = text.to_owned();
        for secret in self.secrets.iter() {
            text = secret.redact(&text);
        }
        match TOKENS.as_ref() {
            Some(re) => re.replace_all(&text, REDACTED).into_owned(),
            None => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_secrets_and_github_shaped_tokens_are_redacted() {
        let r = Redactor::new([Secret::new("s3cr3t-value"), Secret::new("")]);
        assert_eq!(
            r.redact("push with s3cr3t-value and ghp_abcdefghijklmnopqrstuvwxyz0123 ok"),
            "push with [redacted] and [redacted] ok"
        );
        assert_eq!(r.redact("nothing here"), "nothing here");
    }
}
