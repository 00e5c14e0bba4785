//! Typed jobs: one Rust type names the function and carries the payload, shared by the code
//! that submits and the code that works. JSON on the wire, so workers in other languages can
//! read it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), gearbox_client::Error> {
//! use gearbox_client::{typed::TypedJob, Client};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Resize { path: String, width: u32 }
//!
//! impl TypedJob for Resize {
//!     const FUNCTION: &'static str = "resize";
//!     type Output = String; // the thumbnail's path
//! }
//!
//! let client = Client::new(["127.0.0.1:4730"]);
//! let thumbnail: String = client.run_typed(&Resize { path: "a.png".into(), width: 128 }).await?;
//! # Ok(()) }
//! ```

use std::future::Future;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::worker::{JobError, Worker, WorkerJob};
use crate::{Client, Error, Job, JobHandle};

/// A job type: its function name and what it returns.
pub trait TypedJob: Serialize + DeserializeOwned + Send + 'static {
    const FUNCTION: &'static str;
    type Output: Serialize + DeserializeOwned + Send + 'static;
}

impl Client {
    /// Runs a typed job in the foreground and decodes its result.
    pub async fn run_typed<J: TypedJob>(&self, job: &J) -> Result<J::Output, Error> {
        let payload = serde_json::to_vec(job).map_err(|e| Error::Protocol(format!("encoding the job: {e}")))?;
        let result = self.run(Job::new(J::FUNCTION, payload)).await?;
        serde_json::from_slice(&result).map_err(|e| Error::Protocol(format!("decoding the result: {e}")))
    }

    /// Queues a typed job in the background.
    pub async fn submit_typed<J: TypedJob>(&self, job: &J) -> Result<JobHandle, Error> {
        let payload = serde_json::to_vec(job).map_err(|e| Error::Protocol(format!("encoding the job: {e}")))?;
        self.submit_background(Job::new(J::FUNCTION, payload)).await
    }
}

impl Worker {
    /// Serves a typed job: the handler gets the decoded job (and the running job, for
    /// progress) and returns the output, sent back as JSON. A payload that does not decode
    /// fails the job with an exception saying why.
    pub fn handle<J, F, Fut, E>(self, handler: F) -> Worker
    where
        J: TypedJob,
        F: Fn(J, WorkerJob) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = Result<J::Output, E>> + Send + 'static,
        E: Into<JobError>,
    {
        self.register(J::FUNCTION, move |job: WorkerJob| {
            let handler = handler.clone();
            async move {
                let input: J = serde_json::from_slice(job.payload())
                    .map_err(|e| JobError::Exception(format!("bad {} payload: {e}", J::FUNCTION)))?;
                let output = handler(input, job).await.map_err(Into::into)?;
                serde_json::to_vec(&output)
                    .map(Bytes::from)
                    .map_err(|e| JobError::Exception(format!("encoding the result: {e}")))
            }
        })
    }
}
