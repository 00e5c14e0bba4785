//! `gearbox import-gearmand`: moves a gearmand persistent queue into a gearbox queue store,
//! so a gearmand user can switch without losing queued jobs.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use gearbox_server::store::{open_store, QueueSpec};
use gearbox_store::cluster::{first_seq, open_cluster_store, ClusterDb};
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
    /// The queue is a cluster's table (`gearbox server --cluster`): the jobs go in for any
    /// node with a worker to claim, while the cluster runs
    #[arg(long)]
    cluster: bool,
}

/// Jobs committed per batch.
const BATCH: usize = 10_000;

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(gearbox_server::config::default_data_dir);
    let spec = QueueSpec::parse(&args.queue, &data_dir).map_err(anyhow::Error::msg)?;
    if args.cluster {
        let QueueSpec::Sql(url) = spec else {
            bail!("--cluster needs a database queue: --queue postgres://… or mysql://…");
        };
        return into_cluster(&args.source, &url);
    }
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

/// How long the import's own node incarnation holds its lease: the import writes every job
/// unowned, so a crashed import leaves no job behind, only this row until it expires.
const IMPORT_LEASE: Duration = Duration::from_secs(3600);

/// Imports into a cluster's table, as a node incarnation of its own (its sequence numbers,
/// its fence) that writes every job unowned and leaves when done.
fn into_cluster(source: &str, url: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut db = rt.block_on(ClusterDb::open(url, IMPORT_LEASE))?;
    let node = rt.block_on(db.join("gearbox import-gearmand", IMPORT_LEASE))?;
    let mut store = open_cluster_store(url, IMPORT_LEASE)?;
    let mut next_seq = first_seq(node);
    let (mut batch, mut locs, mut failure, mut coalesced) = (Batch::default(), Vec::new(), None, 0);
    let mut commit = |batch: &mut Batch| -> anyhow::Result<()> {
        batch.owner = node;
        store.commit(batch, &mut locs).context("writing to the cluster's queue")?;
        coalesced += store.coalesced().len();
        batch.clear();
        Ok(())
    };
    let count = gearbox_store::import_gearmand(source, &mut |job| {
        if failure.is_some() {
            return;
        }
        batch.push_add(next_seq, job.priority.min(2), job.when_to_run, &job.function, &job.unique, &job.data);
        batch.disown_last();
        next_seq += 1;
        if batch.adds().len() >= BATCH {
            failure = commit(&mut batch).err();
        }
    })
    .with_context(|| format!("reading gearmand's queue at {source}"));
    let outcome = count.and_then(|count| match failure.take() {
        Some(e) => Err(e),
        None => commit(&mut batch).map(|()| count),
    });
    rt.block_on(db.leave(node))?;
    let count = outcome?;
    println!(
        "imported {count} jobs from {source} into the cluster on {} ({coalesced} joined jobs already there by unique key)",
        db.describe()
    );
    Ok(())
}
