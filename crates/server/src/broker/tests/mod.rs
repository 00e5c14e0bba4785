//! Unit tests of the broker, and the model test: random packet sequences against its
//! invariants.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gearbox_joblog::{Millis, Status as Outcome};
use gearbox_proto::{GrabKind, Priority};
use gearbox_store::Loc;

use super::job::{JobState, PackedConn, Stored};
use super::*;
use crate::outbox::Outbox;

fn submit(b: &mut Broker, conn: ConnId, unique: &str, background: bool) {
    b.apply(
        conn,
        Request::SubmitJob {
            function: Bytes::from_static(b"f"),
            unique: Bytes::copy_from_slice(unique.as_bytes()),
            data: Bytes::from_static(b"payload"),
            priority: Priority::Normal,
            background,
        },
    );
}

#[test]
fn finished_jobs_leave_no_trace_in_the_indices() {
    let mut b = Broker::new(BrokerConfig::default());
    let client = b.connect(Arc::new(Outbox::default()), 0, "test", 1);
    let worker = b.connect(Arc::new(Outbox::default()), 1, "test", 2);
    b.apply(worker, Request::CanDo { function: Bytes::from_static(b"f") });
    for i in 0..1000 {
        submit(&mut b, client, &format!("u{i}"), i % 2 == 0);
        b.apply(worker, Request::GrabJob(GrabKind::Uniq));
        let key = b.conns[worker as usize].running[0].key;
        let handle = Bytes::copy_from_slice(&b.handle(b.jobs[key as usize].seq));
        b.apply(worker, Request::WorkComplete { handle, data: Bytes::new() });
    }
    assert_eq!((b.jobs.len(), b.by_seq.len(), b.by_unique.len()), (0, 0, 0));
    assert!(b.conns[client as usize].waiting.is_empty());
}

/// After a burst, the rebuild moves the jobs left to new slots: a running job, the job its
/// client waits on, a queued one and a scheduled one all carry on as before.
#[test]
fn jobs_left_after_a_burst_carry_on_in_a_smaller_table() {
    let mut b = Broker::new(BrokerConfig::default());
    let outbox = Arc::new(Outbox::default());
    let client = b.connect(outbox.clone(), 0, "test", 1);
    let worker = b.connect(Arc::new(Outbox::default()), 1, "test", 2);
    for i in 0..100 {
        submit(&mut b, client, &format!("u{i}"), true);
    }
    // The last slots hold what stays: a foreground job that a worker runs, a queued one, a
    // scheduled one.
    submit(&mut b, client, "waited", false);
    submit(&mut b, client, "queued", true);
    let later = unix_now_for_tests() + 3600;
    let function = Bytes::from_static(b"f");
    let (unique, data) = (Bytes::from_static(b"later"), Bytes::new());
    b.apply(client, Request::SubmitJobEpoch { function: function.clone(), unique, epoch: later, data });
    b.apply(worker, Request::CanDo { function });
    for _ in 0..101 {
        b.apply(worker, Request::GrabJob(GrabKind::Uniq));
    }
    let done: Vec<JobKey> = b.conns[worker as usize].running.iter().map(|r| r.key).take(100).collect();
    for key in done {
        let handle = Bytes::copy_from_slice(&b.handle(b.jobs[key as usize].seq));
        b.apply(worker, Request::WorkComplete { handle, data: Bytes::new() });
    }
    let running = b.conns[worker as usize].running[0].key;
    assert!(running >= 100 && b.jobs.capacity() >= 103);

    assert!(b.shrink_after_burst());
    assert!(b.jobs.capacity() < 100, "capacity {}", b.jobs.capacity());
    let running = b.conns[worker as usize].running[0].key;
    let job = &b.jobs[running as usize];
    assert_eq!((job.unique(), job.state), (&b"waited"[..], JobState::Running(PackedConn::new(worker))));
    assert!(b.conns[client as usize].waiting.contains(&running));
    let handle = Bytes::copy_from_slice(&b.handle(job.seq));
    outbox.take_into(&mut bytes::BytesMut::new());
    b.apply(worker, Request::WorkComplete { handle: handle.clone(), data: Bytes::from_static(b"ok") });
    let mut sent = bytes::BytesMut::new();
    outbox.take_into(&mut sent);
    assert!(sent.windows(handle.len()).any(|w| w == handle), "the waiting client hears of its job");
    b.apply(worker, Request::GrabJob(GrabKind::Uniq));
    let key = b.conns[worker as usize].running[0].key;
    assert_eq!(b.jobs[key as usize].unique(), b"queued");
    assert_eq!(b.scheduled.len(), 1);
    let Reverse((_, seq, key)) = *b.scheduled.peek().unwrap();
    assert_eq!((b.jobs[key as usize].seq, b.jobs[key as usize].unique()), (seq, &b"later"[..]));
}

/// A cluster node takes in another incarnation's jobs under their own numbers, and goes on
/// numbering its new jobs in its own block (else they would collide with that node's rows).
#[test]
fn claimed_jobs_keep_their_numbers() {
    use gearbox_store::cluster::first_seq;
    let mut b = Broker::new(BrokerConfig::default());
    b.enable_durability(Arc::new(std::sync::Condvar::new()), None, true);
    b.enable_cluster(Arc::new(tokio::sync::Notify::new()));
    b.join_cluster(1, Instant::now() + Duration::from_secs(3600));
    let theirs = first_seq(2) + 5;
    let job = gearbox_store::StoredJob {
        seq: theirs,
        priority: 1,
        run_at: 0,
        function: b"f".to_vec(),
        unique: b"u".to_vec(),
        data: b"d".to_vec(),
        loc: gearbox_store::Loc(theirs),
        attempts: 1,
    };
    assert!(!b.restore_claimed(2, std::slice::from_ref(&job)), "a claim of another incarnation is refused");
    assert!(b.restore_claimed(1, &[job]));
    assert!(b.find_by_seq(theirs).is_some());
    assert_eq!(b.next_seq, first_seq(1));
    let conn = b.connect(Arc::new(Outbox::default()), 1, "t", 1);
    submit(&mut b, conn, "", true);
    assert!(b.find_by_seq(first_seq(1)).is_some(), "new jobs take this incarnation's numbers");
}

fn unix_now_for_tests() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

mod model;

/// The packet types the broker sent to `outbox` since the last look.
fn sent(outbox: &Outbox) -> Vec<gearbox_proto::PacketType> {
    let mut bytes = bytes::BytesMut::new();
    outbox.take_into(&mut bytes);
    let mut types = Vec::new();
    while let Ok(Some(gearbox_proto::Message::Packet(frame))) = gearbox_proto::Decoder::default().decode(&mut bytes) {
        types.push(frame.kind);
    }
    types
}

#[test]
fn a_paused_function_gives_its_sleeping_worker_nothing_until_resumed() {
    use gearbox_proto::PacketType as T;
    let mut b = Broker::new(BrokerConfig::default());
    let client = b.connect(Arc::new(Outbox::default()), 0, "test", 1);
    let outbox = Arc::new(Outbox::default());
    let worker = b.connect(outbox.clone(), 1, "test", 2);
    b.set_paused(b"f", true);
    submit(&mut b, client, "u", true);
    b.apply(worker, Request::CanDo { function: Bytes::from_static(b"f") });
    b.apply(worker, Request::GrabJob(GrabKind::Plain));
    b.apply(worker, Request::PreSleep);
    // NO_JOB, and no NOOP after PRE_SLEEP: the worker sleeps instead of asking again at once.
    assert_eq!(sent(&outbox), [T::NoJob]);
    b.set_paused(b"f", false);
    assert_eq!(sent(&outbox), [T::Noop]);
    b.apply(worker, Request::GrabJob(GrabKind::Plain));
    assert_eq!(sent(&outbox), [T::JobAssign]);
}

#[test]
fn a_limited_function_wakes_a_sleeper_when_a_slot_frees() {
    use gearbox_proto::PacketType as T;
    let mut b = Broker::new(BrokerConfig::default());
    let client = b.connect(Arc::new(Outbox::default()), 0, "test", 1);
    let (one, two) = (Arc::new(Outbox::default()), Arc::new(Outbox::default()));
    let first = b.connect(one.clone(), 1, "test", 2);
    let second = b.connect(two.clone(), 2, "test", 3);
    b.set_limit(b"f", 1);
    for w in [first, second] {
        b.apply(w, Request::CanDo { function: Bytes::from_static(b"f") });
    }
    submit(&mut b, client, "a", true);
    submit(&mut b, client, "b", true);
    b.apply(first, Request::GrabJob(GrabKind::Plain));
    b.apply(second, Request::GrabJob(GrabKind::Plain));
    b.apply(second, Request::PreSleep);
    assert_eq!(sent(&one), [T::JobAssign]);
    assert_eq!(sent(&two), [T::NoJob]);
    let key = b.conns[first as usize].running[0].key;
    let handle = Bytes::copy_from_slice(&b.handle(b.jobs[key as usize].seq));
    b.apply(first, Request::WorkComplete { handle, data: Bytes::new() });
    assert_eq!(sent(&two), [T::Noop], "the freed slot wakes the sleeping worker");
    b.apply(second, Request::GrabJob(GrabKind::Plain));
    assert_eq!(sent(&two), [T::JobAssign]);
}

#[test]
fn a_failed_background_job_waits_for_its_retry_then_goes_to_the_dead_set() {
    let mut config = BrokerConfig::default();
    config.retry.set(b"f", Some(RetryPolicy::parse("1/0s").unwrap()));
    let mut b = Broker::new(config);
    let client = b.connect(Arc::new(Outbox::default()), 0, "test", 1);
    let worker = b.connect(Arc::new(Outbox::default()), 1, "test", 2);
    b.apply(worker, Request::CanDo { function: Bytes::from_static(b"f") });
    submit(&mut b, client, "u", true);
    let fail = |b: &mut Broker| {
        b.apply(worker, Request::GrabJob(GrabKind::Plain));
        let key = b.conns[worker as usize].running[0].key;
        let handle = Bytes::copy_from_slice(&b.handle(b.jobs[key as usize].seq));
        b.apply(worker, Request::WorkFail { handle });
        key
    };
    let key = fail(&mut b);
    assert_eq!(b.jobs[key as usize].state, JobState::Scheduled, "kept for another attempt");
    assert_eq!(b.find_by_unique(0, b"u"), Some(key), "with its unique key");
    b.tick(Instant::now());
    assert_eq!(fail(&mut b), key);
    assert!(b.jobs.is_empty());
    let mut burials = Vec::new();
    b.take_burials(&mut burials);
    assert_eq!(burials.len(), 1);
    let dead = &burials[0].job;
    assert_eq!((dead.attempts, dead.unique.as_slice(), dead.data.as_slice()), (2, &b"u"[..], &b"payload"[..]));
    let t = b.totals();
    assert_eq!((t.retried, t.failed, t.buried), (1, 1, 1), "a retried attempt is not a failed job");
}

/// A cluster node that loses its lease while a retry's rewrite waits (or is being written)
/// forgets the job: its row is the old incarnation's, which another node takes over.
#[test]
fn a_lost_lease_forgets_retries_waiting_for_their_rewrite() {
    let mut config = BrokerConfig::default();
    config.retry.set(b"f", Some(RetryPolicy::parse("3/0s").unwrap()));
    let mut b = Broker::new(config);
    b.enable_durability(Arc::new(std::sync::Condvar::new()), None, true);
    b.enable_cluster(Arc::new(tokio::sync::Notify::new()));
    b.join_cluster(1, Instant::now() + Duration::from_secs(3600));
    let client = b.connect(Arc::new(Outbox::default()), 0, "test", 1);
    let worker = b.connect(Arc::new(Outbox::default()), 1, "test", 2);
    b.apply(worker, Request::CanDo { function: Bytes::from_static(b"f") });
    submit(&mut b, client, "u", true);
    let mut batch = gearbox_store::Batch::default();
    b.take_pending(&mut batch);
    let locs: Vec<Loc> = batch.adds().map(|a| Loc(a.seq)).collect();
    b.committed(&batch, Ok(&locs), &[]);
    for in_flight in [false, true] {
        if in_flight {
            submit(&mut b, client, "v", true);
            let mut batch = gearbox_store::Batch::default();
            b.take_pending(&mut batch);
            let locs: Vec<Loc> = batch.adds().map(|a| Loc(a.seq)).collect();
            b.committed(&batch, Ok(&locs), &[]);
        }
        b.apply(worker, Request::GrabJob(GrabKind::Plain));
        let key = b.conns[worker as usize].running[0].key;
        let handle = Bytes::copy_from_slice(&b.handle(b.jobs[key as usize].seq));
        b.apply(worker, Request::WorkFail { handle });
        assert_eq!(b.jobs[key as usize].state, JobState::Pending);
        let mut writing = gearbox_store::Batch::default();
        if in_flight {
            b.take_pending(&mut writing);
            assert_eq!(writing.retries().len(), 1);
        }
        b.leave_cluster();
        assert!(b.jobs.is_empty(), "the retried job is forgotten");
        assert!(b.retry_due.is_empty());
        assert_eq!(b.functions[0].pending, 0);
        let node = if in_flight { 3 } else { 2 };
        b.join_cluster(node, Instant::now() + Duration::from_secs(3600));
        if in_flight {
            b.committed(&writing, Err("lease ended".into()), &[]);
            assert!(b.jobs.is_empty(), "the stale batch brings nothing back");
        }
        // A new submission with the unique key is a job of its own, and runs.
        submit(&mut b, client, if in_flight { "v" } else { "u" }, true);
        let mut batch = gearbox_store::Batch::default();
        b.take_pending(&mut batch);
        let locs: Vec<Loc> = batch.adds().map(|a| Loc(a.seq)).collect();
        b.committed(&batch, Ok(&locs), &[]);
        assert_eq!(b.functions[0].queued_total(), 1);
        b.apply(worker, Request::GrabJob(GrabKind::Plain));
        let key = b.conns[worker as usize].running[0].key;
        let handle = Bytes::copy_from_slice(&b.handle(b.jobs[key as usize].seq));
        b.apply(worker, Request::WorkComplete { handle, data: Bytes::new() });
    }
}
