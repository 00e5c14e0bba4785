//! `gearbox import-gearmand`: moves a gearmand persistent queue into a gearbox queue store,
//! so a gearmand user can switch without losing queued jobs.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use gearbox_server::store::{open_store, QueueSpec};
use gearbox_store::Batch;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// gearmand's queue: a libsqlite3 file, or mysql://USER@HOST:PORT/DB or
    /// postgres://USER@HOST:PORT/DB (add ?table=NAME if gearmand used another table)
    source: String,
    /// The gearbox queue to fill, as for `gearbox server` (the server must not be running on it)
    #[arg(long, env = "GEARBOX_QUEUE", default_value = "embedded")]
    queue: String,
    /// Directory of the embedded queue [default: ~/.local/share/gearbox]
    #[arg(long, env = "GEARBOX_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// Jobs committed per batch.
const BATCH: usize = 10_000;

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(gearbox_server::config::default_data_dir);
    let spec = QueueSpec::parse(&args.queue, &data_dir).map_err(anyhow::Error::msg)?;
    // A server on the queue holds it; waiting for the server to stop would only confuse.
    let Some(mut store) = open_store(&spec, std::time::Duration::ZERO)? else {
        bail!("the memory queue keeps nothing to import into; use --queue embedded or a database URL");
    };
    // New jobs take sequence numbers after everything stored, as the server's own do.
    let mut next_seq = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as u64;
    store.load(&mut |job| next_seq = next_seq.max(job.seq + 1))?;

    let mut batch = Batch::default();
    let mut locs = Vec::new();
    let mut failure = None;
    let count = gearbox_store::import_gearmand(&args.source, &mut |job| {
        if failure.is_some() {
            return;
        }
        batch.push_add(next_seq, job.priority.min(2), job.when_to_run, &job.function, &job.unique, &job.data);
        next_seq += 1;
        if batch.adds().len() >= BATCH {
            failure = store.commit(&batch, &mut locs).err();
            batch.clear();
        }
    })
    .with_context(|| format!("reading gearmand's queue at {}", args.source))?;
    if let Some(e) = failure {
        return Err(e).context("writing to the gearbox queue");
    }
    store.commit(&batch, &mut locs).context("writing to the gearbox queue")?;
    println!("imported {count} jobs from {} into {}", args.source, store.describe());
    Ok(())
}
