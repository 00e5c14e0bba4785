//! The cluster's statements on real MariaDB and PostgreSQL: leases, fenced batches,
//! takeover, claims, coalescing across nodes and status.

mod common;

use std::time::{Duration, Instant};

use common::{block_on, exec, Table, MYSQL, POSTGRES};
use gearbox_store::cluster::{first_seq, open_cluster_store, ClusterDb, StatusKey};
use gearbox_store::{Batch, Loc, Mark, QueueStore};

const LEASE: Duration = Duration::from_secs(10);

/// Drops the cluster's nodes table too (the queue table goes with `Table`).
struct Nodes(String, String);

impl Drop for Nodes {
    fn drop(&mut self) {
        let drops =
            [format!("DROP TABLE IF EXISTS {}_nodes", self.1), format!("DROP TABLE IF EXISTS {}_leases", self.1)];
        let _ = block_on(exec(&self.0, &[&drops[0], &drops[1]]));
    }
}

fn add(batch: &mut Batch, seq: u64, function: &[u8], unique: &[u8], owned: bool) {
    batch.push_add(seq, 1, 0, function, unique, format!("data {seq}").as_bytes());
    if !owned {
        batch.disown_last();
    }
}

fn commit(store: &mut dyn QueueStore, batch: &Batch) -> Result<Vec<(u64, u64)>, String> {
    let mut locs = Vec::new();
    store.commit(batch, &mut locs).map_err(|e| e.to_string())?;
    Ok(store.coalesced().to_vec())
}

fn nodes_claim_take_over_and_fence(base: &str) {
    let table = Table::new(base);
    let _nodes = Nodes(base.to_string(), table.name.clone());
    let url = table.url();
    block_on(async {
        let mut a = ClusterDb::open(&url, LEASE).await.expect("open");
        let mut b = a.another();
        let node_a = a.join("a:4730", LEASE).await.expect("join a");
        let node_b = b.join("b:4730", LEASE).await.expect("join b");
        assert_ne!(node_a, node_b);
        assert!(first_seq(node_a) > 1 << 62 && first_seq(node_b) != first_seq(node_a));
        assert!(a.renew(node_a, LEASE, "{}").await.unwrap());
        let nodes = a.nodes().await.unwrap();
        assert_eq!(nodes.iter().map(|n| n.id).collect::<Vec<_>>(), [node_a, node_b]);
        assert!(nodes.iter().all(|n| n.lease_left_micros > 0));

        // A store writes A's batch: one job A owns, two left for anyone, one per unique key.
        let mut store = tokio::task::spawn_blocking({
            let url = url.clone();
            move || open_cluster_store(&url, LEASE).expect("store")
        })
        .await
        .unwrap();
        let s = first_seq(node_a);
        let mut batch = Batch::default();
        batch.owner = node_a;
        add(&mut batch, s + 1, b"f", b"u1", true);
        add(&mut batch, s + 2, b"f", b"u2", false);
        add(&mut batch, s + 3, b"g", b"", false);
        let (mut store, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = commit(store.as_mut(), &batch);
            (store, outcome)
        })
        .await
        .unwrap();
        assert_eq!(outcome.unwrap(), []);

        // B claims what is unowned, only for the function it asks for.
        let mut claimed = Vec::new();
        assert_eq!(b.claim(node_b, b"f", i64::MAX, 10, &mut claimed).await.unwrap(), Some(1));
        assert_eq!((claimed[0].seq, claimed[0].unique.as_slice()), (s + 2, &b"u2"[..]));
        assert_eq!(b.claim(node_b, b"f", i64::MAX, 10, &mut claimed).await.unwrap(), Some(0));

        // A duplicate unique key sent through B names A's job.
        let t = first_seq(node_b);
        let mut batch = Batch::default();
        batch.owner = node_b;
        add(&mut batch, t + 1, b"f", b"u1", true);
        add(&mut batch, t + 2, b"f", b"u3", true);
        batch.push_mark(s + 2, Mark::Started);
        batch.push_mark(s + 2, Mark::Progress(3, 7));
        let (mut store, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = commit(store.as_mut(), &batch);
            (store, outcome)
        })
        .await
        .unwrap();
        assert_eq!(outcome.unwrap(), [(t + 1, s + 1)]);
        let status = b.status(StatusKey::Seq(s + 2)).await.unwrap().expect("known");
        assert!(status.running);
        assert_eq!((status.numerator, status.denominator), (3, 7));
        assert!(b.status(StatusKey::Unique(b"u1")).await.unwrap().is_some_and(|s| !s.running));
        assert!(b.status(StatusKey::Seq(t + 1)).await.unwrap().is_none());

        // A's lease runs out: nothing A built lands any more, and B takes its job over.
        let expire = format!("UPDATE {}_leases SET lease_until = created WHERE id = {node_a}", table.name);
        let expire = expire.replace(
            "created",
            if base.starts_with("mysql") {
                "UTC_TIMESTAMP(6) - INTERVAL 1 SECOND"
            } else {
                "now() - interval '1 second'"
            },
        );
        exec(base, &[&expire]).await.unwrap();
        assert!(!a.renew(node_a, LEASE, "{}").await.unwrap(), "an ended lease is not renewed");
        let mut batch = Batch::default();
        batch.owner = node_a;
        batch.push_remove(s + 1, Loc(s + 1));
        let outcome = tokio::task::spawn_blocking(move || commit(store.as_mut(), &batch)).await.unwrap();
        assert!(outcome.unwrap_err().contains("lease has ended"));
        let taken = b.take_over().await.unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!((taken[0].node, taken[0].jobs), (node_a, 1));
        assert!(b.take_over().await.unwrap().is_empty());
        let mut claimed = Vec::new();
        let started = Instant::now();
        assert_eq!(b.claim(node_b, b"f", i64::MAX, 10, &mut claimed).await.unwrap(), Some(1));
        assert_eq!(claimed[0].seq, s + 1);
        assert!(started.elapsed() < Duration::from_secs(2));
        // A claim by the dead incarnation is refused.
        assert_eq!(a.claim(node_a, b"g", i64::MAX, 10, &mut claimed).await.unwrap(), None);
        assert_eq!(b.leave(node_b).await.unwrap(), 3);
        assert!(b.nodes().await.unwrap().is_empty());
    });
}

/// A node that dies owning more jobs than one statement frees is taken over in chunks, all of
/// them, and its rows go.
fn a_big_node_is_taken_over_whole(base: &str) {
    let table = Table::new(base);
    let _nodes = Nodes(base.to_string(), table.name.clone());
    let url = table.url();
    block_on(async {
        let mut a = ClusterDb::open(&url, LEASE).await.expect("open");
        let mut b = a.another();
        let node_a = a.join("a:4730", LEASE).await.unwrap();
        let node_b = b.join("b:4730", LEASE).await.unwrap();
        let mut batch = Batch::default();
        batch.owner = node_a;
        for i in 0..12_001 {
            add(&mut batch, first_seq(node_a) + i, b"f", b"", true);
        }
        let outcome = tokio::task::spawn_blocking(move || {
            let mut store = open_cluster_store(&url, LEASE).expect("store");
            commit(store.as_mut(), &batch)
        })
        .await
        .unwrap();
        assert_eq!(outcome.unwrap(), []);
        let now = if base.starts_with("mysql") { "UTC_TIMESTAMP(6)" } else { "now()" };
        let expire =
            format!("UPDATE {}_leases SET lease_until = {now} - INTERVAL '1' SECOND WHERE id = {node_a}", table.name);
        exec(base, &[&expire]).await.unwrap();
        let taken = b.take_over().await.unwrap();
        assert_eq!((taken.len(), taken[0].jobs), (1, 12_001));
        assert_eq!(b.nodes().await.unwrap().len(), 1);
        assert!(b.take_over().await.unwrap().is_empty(), "its lease row went last");
        let mut claimed = Vec::new();
        assert_eq!(b.claim(node_b, b"f", i64::MAX, 1000, &mut claimed).await.unwrap(), Some(1000));
    });
}

mod mysql {
    #[test]
    fn nodes_claim_take_over_and_fence() {
        super::nodes_claim_take_over_and_fence(super::MYSQL)
    }
    #[test]
    fn a_big_node_is_taken_over_whole() {
        super::a_big_node_is_taken_over_whole(super::MYSQL)
    }
}

mod postgres {
    #[test]
    fn nodes_claim_take_over_and_fence() {
        super::nodes_claim_take_over_and_fence(super::POSTGRES)
    }
    #[test]
    fn a_big_node_is_taken_over_whole() {
        super::a_big_node_is_taken_over_whole(super::POSTGRES)
    }
}
