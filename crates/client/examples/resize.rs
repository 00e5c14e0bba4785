//! The README's "Writing a worker in Rust", whole (a test keeps the two the same): one
//! program that is the worker or the client. In a project of your own it is `src/main.rs`.
//!
//! ```sh
//! cargo run -p gearbox-client --example resize -- worker &   # serves "resize"; Ctrl-C stops it
//! cargo run -p gearbox-client --example resize               # runs one job, queues another
//! ```

use gearbox_client::worker::{shutdown_signal, JobError, Worker};
use gearbox_client::{typed::TypedJob, Client};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Resize {
    path: String,
    width: u32,
}

impl TypedJob for Resize {
    const FUNCTION: &'static str = "resize";
    type Output = String;
}

#[tokio::main]
async fn main() -> Result<(), gearbox_client::Error> {
    if std::env::args().nth(1).as_deref() == Some("worker") {
        // On SIGTERM or Ctrl-C the worker finishes the jobs it has, takes no more, and returns.
        Worker::new(["127.0.0.1:4730"])
            .handle(|job: Resize, running| async move {
                running.status(1, 2); // progress, seen by waiting clients
                Ok::<_, JobError>(format!("{}.thumb{}", job.path, job.width))
            })
            .concurrency(4) // 4 jobs at a time, a connection each
            .run(shutdown_signal())
            .await;
        return Ok(());
    }
    let client = Client::new(["127.0.0.1:4730"]);
    let thumb: String = client.run_typed(&Resize { path: "a.png".into(), width: 128 }).await?;
    println!("thumbnail: {thumb}");
    let handle = client.submit_typed(&Resize { path: "b.png".into(), width: 64 }).await?; // background
    println!("queued as {handle}"); // H:host:123
    Ok(())
}
