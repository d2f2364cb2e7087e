//! A [`WorkflowRunner`] that calls a Rust closure instead of a process.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{RunOutcome, WorkflowJob, WorkflowRunner};
use crate::error::RunnerError;

type BoxFuture = Pin<Box<dyn Future<Output = Result<RunOutcome, RunnerError>> + Send>>;

/// Runs each attempt by calling a closure with the job and the
/// cancellation token. The closure must honour the token.
#[derive(Clone)]
pub struct FnRunner {
    f: Arc<dyn Fn(WorkflowJob, CancellationToken) -> BoxFuture + Send + Sync>,
}

impl FnRunner {
    /// Wraps an async closure.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(WorkflowJob, CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<RunOutcome, RunnerError>> + Send + 'static,
    {
        Self {
            f: Arc::new(move |job, cancel| Box::pin(f(job, cancel))),
        }
    }
}

impl fmt::Debug for FnRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnRunner")
    }
}

#[async_trait]
impl WorkflowRunner for FnRunner {
    async fn run(
        &self,
        job: &WorkflowJob,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, RunnerError> {
        (self.f)(job.clone(), cancel).await
    }
}
