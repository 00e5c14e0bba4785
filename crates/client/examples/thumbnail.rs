//! A drop-in worker that makes image thumbnails, and the client code that kicks it off.
//!
//! ```sh
//! cargo run --release -- server &                                             # a gearbox server
//! cargo run -p gearbox-client --example thumbnail -- worker &                 # serve "thumbnail"
//! cargo run -p gearbox-client --example thumbnail -- submit photo.jpg 128     # prints the thumbnail's path
//! ```
//!
//! Servers come from `GEARBOX_SERVERS` (comma-separated), default `127.0.0.1:4730`.

use gearbox_client::typed::TypedJob;
use gearbox_client::worker::{JobError, Worker};
use gearbox_client::Client;
use serde::{Deserialize, Serialize};

/// The job, shared by the submitting and the working side.
#[derive(Serialize, Deserialize)]
struct Thumbnail {
    path: String,
    width: u32,
}

impl TypedJob for Thumbnail {
    const FUNCTION: &'static str = "thumbnail";
    /// Where the thumbnail was written.
    type Output = String;
}

/// Writes `<path>.thumb<width>.png` next to the image, at most `width` pixels on a side.
fn make(job: &Thumbnail) -> Result<String, String> {
    let image = image::open(&job.path).map_err(|e| format!("{}: {e}", job.path))?;
    let out = format!("{}.thumb{}.png", job.path, job.width);
    image.thumbnail(job.width, job.width).save(&out).map_err(|e| format!("{out}: {e}"))?;
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let servers: Vec<String> = std::env::var("GEARBOX_SERVERS")
        .unwrap_or_else(|_| "127.0.0.1:4730".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["worker"] => {
            Worker::new(&servers)
                .handle(|job: Thumbnail, _running| async move {
                    // Image work is CPU-bound: keep it off the async threads.
                    tokio::task::spawn_blocking(move || make(&job))
                        .await
                        .map_err(|e| JobError::Exception(e.to_string()))?
                        .map_err(JobError::Exception)
                })
                .concurrency(std::thread::available_parallelism().map_or(1, |n| n.get()))
                .run(gearbox_client::worker::shutdown_signal())
                .await;
        }
        ["submit", path, width] => {
            let job = Thumbnail { path: path.to_string(), width: width.parse()? };
            println!("{}", Client::new(&servers).run_typed(&job).await?);
        }
        _ => return Err("usage: thumbnail worker | thumbnail submit IMAGE WIDTH".into()),
    }
    Ok(())
}
