//! Random sequences of packets, disconnects, timer ticks, commits, payload reads and (on a
//! cluster node) lost leases and claims never panic and keep the broker's counters and
//! indices consistent with its jobs.

use super::*;
use gearbox_proto::{AdminCommand, Request};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Submit {
        conn: usize,
        function: u8,
        unique: u8,
        background: bool,
        priority: u8,
        later: bool,
    },
    /// CAN_DO, or CAN_DO_TIMEOUT (1 s) when the flag is set.
    CanDo(usize, u8, bool),
    CantDo(usize, u8),
    Grab(usize),
    PreSleep(usize),
    Finish {
        conn: usize,
        how: u8,
    },
    Status(usize),
    Cancel(usize, u64),
    /// Admin: `maxqueue FUNCTION N`, or `drop function FUNCTION` when N is 0.
    Limit(usize, u8, u32),
    Disconnect(usize),
    Tick,
    /// The store thread takes what is pending and starts writing it.
    Take,
    /// The store thread's write ends, successfully or not (taking what is pending first
    /// if nothing is being written).
    Commit(bool),
    /// The store thread reads the payloads the broker asks for, or fails to.
    Fetch(bool),
    /// A cluster node gives up its lease and joins again (the database's copy of the old
    /// lease lasts a little longer)...
    LoseLease,
    /// ...until another node takes the old incarnation over.
    TakeOver,
    /// A cluster node claims unowned jobs of a function.
    Claim(u8),
    /// Pause or resume a function.
    Pause(u8, bool),
    /// At most N jobs of a function run at once (0: no limit).
    Cap(u8, u32),
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0..4usize;
    prop_oneof![
        (c.clone(), 0..3u8, 0..4u8, any::<bool>(), 0..3u8, any::<bool>()).prop_map(
            |(conn, function, unique, background, priority, later)| Op::Submit {
                conn,
                function,
                unique,
                background,
                priority,
                later
            }
        ),
        (c.clone(), 0..3u8, any::<bool>()).prop_map(|(c, f, t)| Op::CanDo(c, f, t)),
        (c.clone(), 0..3u8).prop_map(|(c, f)| Op::CantDo(c, f)),
        c.clone().prop_map(Op::Grab),
        c.clone().prop_map(Op::PreSleep),
        (c.clone(), 0..4u8).prop_map(|(conn, how)| Op::Finish { conn, how }),
        c.clone().prop_map(Op::Status),
        (c.clone(), 0..8u64).prop_map(|(c, n)| Op::Cancel(c, n)),
        (c.clone(), 0..3u8, 0..3u32).prop_map(|(c, f, n)| Op::Limit(c, f, n)),
        c.prop_map(Op::Disconnect),
        Just(Op::Tick),
        Just(Op::Take),
        any::<bool>().prop_map(Op::Commit),
        any::<bool>().prop_map(Op::Fetch),
        Just(Op::LoseLease),
        Just(Op::TakeOver),
        (0..3u8).prop_map(Op::Claim),
        (0..3u8, any::<bool>()).prop_map(|(f, p)| Op::Pause(f, p)),
        (0..3u8, 0..3u32).prop_map(|(f, n)| Op::Cap(f, n)),
    ]
}

/// A job-log sink that keeps what it is given.
struct Collect(Arc<std::sync::Mutex<Vec<gearbox_joblog::Record>>>);

impl gearbox_joblog::Sink for Collect {
    fn write(&mut self, batch: &gearbox_joblog::Batch) -> Result<(), gearbox_joblog::Error> {
        self.0.lock().unwrap().extend(batch.iter().map(|r| r.to_record()));
        Ok(())
    }
    fn expire(&mut self, _: Millis) -> Result<u64, gearbox_joblog::Error> {
        Ok(0)
    }
}

fn check(b: &Broker) {
    for (fid, f) in b.functions.iter().enumerate().filter(|(_, f)| !f.dropped) {
        let fid = fid as FunctionId;
        let jobs = || b.jobs.iter().map(|(_, j)| j).filter(move |j| j.function == fid);
        for p in 0..3 {
            let queued = jobs().filter(|j| j.state == JobState::Queued && j.priority as usize == p).count();
            assert_eq!(f.queued[p] as usize, queued, "queued count of priority {p}");
        }
        assert_eq!(f.running as usize, jobs().filter(|j| matches!(j.state, JobState::Running(_))).count());
        assert_eq!(f.scheduled as usize, jobs().filter(|j| j.state == JobState::Scheduled).count());
        assert_eq!(f.pending as usize, jobs().filter(|j| j.state == JobState::Pending).count());
        // Every acknowledged job is somewhere: waiting (a retry whose record is being
        // rewritten too), running, or ended one way.
        let c = &f.counts;
        for p in 0..3 {
            let waiting = jobs().filter(|j| {
                j.priority as usize == p
                    && (matches!(j.state, JobState::Queued | JobState::Scheduled | JobState::Running(_))
                        || (j.state == JobState::Pending && b.retry_due.contains_key(&j.seq)))
            });
            assert_eq!(
                c.submitted[p] + c.restored[p],
                waiting.count() as u64 + c.completed[p] + c.failed[p] + c.cancelled[p] + c.handed_over[p],
                "counts of priority {p} add up"
            );
        }
        let workers = b.conns.iter().filter(|(_, c)| c.abilities.iter().any(|a| a.function == fid)).count();
        assert_eq!(f.workers as usize, workers);
    }
    let live = b.jobs.iter().filter(|(_, j)| j.state != JobState::Dropped).count();
    assert_eq!(b.by_seq.len(), live);
    for (_, job) in b.jobs.iter().filter(|(_, j)| j.state != JobState::Dropped) {
        // Whatever submissions a job has had, it is stored exactly when one of them was a
        // background one (the store may still be writing it).
        let should = b.durable.is_some() && job.background;
        assert_eq!(job.stored != Stored::No, should, "{:?} background {}", job.stored, job.background);
    }
    for (key, job) in &b.jobs {
        if let JobState::Running(w) = job.state {
            let w = w.get();
            assert!(b.conns[w as usize].running.iter().any(|r| r.key == key as JobKey));
        }
        for &c in job.clients() {
            assert!(b.conns[c as usize].waiting.contains(&(key as JobKey)));
        }
    }
    // ...and the other way round: what connections and queues name are those jobs.
    for (id, conn) in &b.conns {
        for r in &conn.running {
            let state = b.jobs.get(r.key as usize).map(|j| j.state);
            assert_eq!(state, Some(JobState::Running(PackedConn::new(id as ConnId))), "running job {}", r.key);
        }
        for &k in &conn.waiting {
            assert!(b.jobs.get(k as usize).is_some_and(|j| j.clients().contains(&(id as ConnId))));
        }
    }
    for f in &b.functions {
        for (p, queue) in f.queues.iter().enumerate() {
            let queued = queue.iter().filter(|&&k| b.jobs[k as usize].state == JobState::Queued).count();
            assert_eq!(queued, f.queued[p] as usize);
        }
    }
}

/// A store as the store thread drives it: at most one batch being written at a time. In
/// a cluster (`node` > 0), rows have owners as the cluster's tables do: writes are fenced
/// by the live incarnation, a unique key is one row, and a lost lease frees the rows.
#[derive(Default)]
struct Store {
    /// What it holds after the commits it was given, by sequence number.
    jobs: std::collections::BTreeMap<u64, gearbox_store::StoredJob>,
    /// Every job it ever held.
    ever: std::collections::HashSet<u64>,
    writing: Option<gearbox_store::Batch>,
    /// The live cluster incarnation (0: not a cluster), and each row's owner.
    node: u64,
    owners: HashMap<u64, Option<u64>>,
    /// Earlier incarnations whose lease the database still holds.
    leaving: Vec<u64>,
    /// Handles of the jobs written to the dead set.
    dead: Vec<String>,
}

impl Store {
    fn take(&mut self, b: &mut Broker) {
        if self.writing.is_none() {
            let mut batch = gearbox_store::Batch::default();
            b.take_pending(&mut batch);
            self.writing = Some(batch);
        }
    }

    /// Reads the payloads the broker asks for (the jobs it holds), as a database store's
    /// thread does; or fails.
    fn fetch(&self, b: &mut Broker, ok: bool) {
        let mut requests = Vec::new();
        b.payload_requests(&mut requests);
        let (mut found, mut arena) = (Vec::new(), Vec::new());
        for (seq, _) in requests.iter().filter(|_| ok) {
            if let Some(job) = self.jobs.get(seq) {
                let start = arena.len();
                arena.extend_from_slice(&job.data);
                found.push((*seq, start..arena.len()));
            }
        }
        b.payloads_read(&requests, &found, &arena, (!ok).then_some("database down"));
    }

    fn commit(&mut self, b: &mut Broker, ok: bool) {
        self.take(b);
        let batch = self.writing.take().unwrap();
        let mut burials = Vec::new();
        b.take_burials(&mut burials);
        self.dead.extend(burials.into_iter().map(|d| d.job.handle));
        let written = batch.adds().len() + batch.retries().len();
        let locs: Vec<Loc> = (1..=written as u64).map(Loc).collect();
        if self.node > 0 {
            return self.commit_cluster(b, batch, locs, ok);
        }
        if ok {
            for add in batch.adds() {
                let job = add.to_stored();
                self.jobs.insert(add.seq, job);
                self.ever.insert(add.seq);
            }
            for r in batch.retries() {
                if let Some(job) = self.jobs.get_mut(&r.job.seq) {
                    (job.run_at, job.attempts) = (r.job.run_at, r.attempts);
                }
            }
            for (seq, _) in batch.removes() {
                self.jobs.remove(seq);
            }
        }
        b.committed(&batch, if ok { Ok(&locs) } else { Err("disk full".into()) }, &[]);
    }

    fn commit_cluster(&mut self, b: &mut Broker, batch: gearbox_store::Batch, locs: Vec<Loc>, ok: bool) {
        if !ok || (batch.owner != self.node && !self.leaving.contains(&batch.owner)) {
            return b.committed(&batch, Err("lease ended".into()), &[]);
        }
        for (seq, _) in batch.removes() {
            if self.owners.get(seq) == Some(&Some(batch.owner)) {
                self.jobs.remove(seq);
                self.owners.remove(seq);
            }
        }
        let mut coalesced = Vec::new();
        for add in batch.adds() {
            let holder = self.jobs.values().find(|j| {
                !add.unique.is_empty() && j.unique == add.unique && j.function == add.function && j.seq != add.seq
            });
            if let Some(holder) = holder {
                coalesced.push((add.seq, holder.seq));
                continue;
            }
            let job = add.to_stored();
            self.jobs.insert(add.seq, job);
            self.ever.insert(add.seq);
            self.owners.insert(add.seq, add.owned.then_some(batch.owner));
        }
        for r in batch.retries() {
            if self.owners.get(&r.job.seq) == Some(&Some(batch.owner)) {
                let job = self.jobs.get_mut(&r.job.seq).expect("an owned row");
                (job.run_at, job.attempts) = (r.job.run_at, r.attempts);
            }
        }
        for &(seq, mark) in batch.marks() {
            if mark == gearbox_store::Mark::Released && self.owners.get(&seq) == Some(&Some(batch.owner)) {
                self.owners.insert(seq, None);
            }
        }
        b.committed(&batch, Ok(&locs), &coalesced);
    }

    /// The node gives up its lease and joins again.
    fn lose_lease(&mut self, b: &mut Broker) {
        b.leave_cluster();
        self.leaving.push(self.node);
        self.node += 1;
        b.join_cluster(self.node, Instant::now() + Duration::from_secs(3600));
    }

    /// Another node takes the earlier incarnations over: their rows become claimable.
    fn take_over(&mut self) {
        for owner in self.owners.values_mut() {
            if owner.is_some_and(|o| self.leaving.contains(&o)) {
                *owner = None;
            }
        }
        self.leaving.clear();
    }

    /// The node claims up to two unowned jobs of `function`.
    fn claim(&mut self, b: &mut Broker, function: &[u8]) {
        let mut claimed = Vec::new();
        for (seq, job) in &self.jobs {
            if claimed.len() < 2
                && self.owners[seq].is_none()
                && job.function == function
                && job.run_at <= unix_now_for_tests()
            {
                claimed.push(gearbox_store::StoredJob { loc: Loc(*seq), attempts: 1, ..job.clone() });
            }
        }
        for c in &claimed {
            self.owners.insert(c.seq, Some(self.node));
        }
        b.restore_claimed(self.node, &claimed);
    }

    /// The rows the live incarnation owns.
    fn owned(&self) -> Vec<u64> {
        self.jobs.keys().copied().filter(|seq| self.owners[seq] == Some(self.node)).collect()
    }
}

/// A direct reply a connection waits for, in order.
#[derive(Debug, PartialEq)]
enum Expect {
    Submit { background: bool },
    Grab,
    Status,
    Admin,
}

/// A test connection: its outbox, the replies it waits for, and the background jobs it
/// was told are queued.
struct Peer {
    id: ConnId,
    outbox: Arc<Outbox>,
    expect: std::collections::VecDeque<Expect>,
    acknowledged: Vec<u64>,
}

impl Peer {
    fn connect(b: &mut Broker, fd: i32) -> Peer {
        let outbox = Arc::new(Outbox::default());
        Peer { id: b.connect(outbox.clone(), fd, "t", 1), outbox, expect: Default::default(), acknowledged: Vec::new() }
    }

    /// Reads what the broker sent and pairs each direct reply with its request. A
    /// background submission acknowledged on a durable broker must be in the store.
    fn read(&mut self, b: &Broker, store: &Store) {
        let mut bytes = bytes::BytesMut::new();
        self.outbox.take_into(&mut bytes);
        use gearbox_proto::{Decoder, Message, Response as R};
        while let Some(message) = Decoder::default().decode(&mut bytes).unwrap() {
            let reply = match message {
                Message::AdminLine(_) => Expect::Admin,
                Message::Packet(frame) => match R::parse(&frame).unwrap() {
                    R::Noop
                    | R::WorkStatus { .. }
                    | R::WorkData { .. }
                    | R::WorkWarning { .. }
                    | R::WorkComplete { .. }
                    | R::WorkFail { .. }
                    | R::WorkException { .. } => continue,
                    R::JobCreated { handle } => {
                        let expected = self.expect.front();
                        if expected == Some(&Expect::Submit { background: true }) {
                            let seq = b.parse_handle(&handle).unwrap();
                            let stored = b.durable.is_none() || store.ever.contains(&seq);
                            assert!(stored, "job {seq} acknowledged before it was stored");
                            self.acknowledged.push(seq);
                        }
                        let background = matches!(expected, Some(Expect::Submit { background: true }));
                        Expect::Submit { background }
                    }
                    R::Error { .. } => Expect::Submit {
                        background: matches!(self.expect.front(), Some(Expect::Submit { background: true })),
                    },
                    R::JobAssignUniq { .. } | R::NoJob => Expect::Grab,
                    R::StatusResUnique { .. } => Expect::Status,
                    other => panic!("unexpected {other:?}"),
                },
            };
            assert_eq!(self.expect.pop_front(), Some(reply), "replies come in request order");
        }
    }
}

/// The sequence numbers of the background jobs a broker holds.
fn background_jobs(b: &Broker) -> Vec<u64> {
    let mut seqs: Vec<u64> =
        b.jobs.iter().filter(|(_, j)| j.background && j.state != JobState::Dropped).map(|(_, j)| j.seq).collect();
    seqs.sort_unstable();
    seqs
}

proptest! {
    // Cheap enough for many cases; rare paths (a payload read back for a held JOB_ASSIGN,
    // the rebuild after a burst) need them.
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn any_sequence_keeps_the_broker_consistent(
        ops in proptest::collection::vec(op(), 1..80),
        durable: bool,
        fetches: bool,
        cluster: bool,
        retries: bool,
    ) {
        let mut config = BrokerConfig { job_retries: 3, ..BrokerConfig::default() };
        if retries {
            // f0 gets one retry, f1 two; both at once (their backoff is nothing).
            config.retry.set(b"f0", Some(RetryPolicy::parse("1/0s").unwrap()));
            config.retry.set(b"f1", Some(RetryPolicy::parse("2/0s").unwrap()));
        }
        let mut b = Broker::new(config);
        // A cluster node: a database store, which reads payloads back in batches.
        let (durable, fetches) = (durable || cluster, fetches || cluster);
        if durable {
            // With `fetches`, payloads past the (test-sized) budget come from `Op::Fetch`.
            b.enable_durability(Arc::new(std::sync::Condvar::new()), None, fetches);
        }
        let mut store = Store::default();
        if cluster {
            b.enable_cluster(Arc::new(tokio::sync::Notify::new()));
            store.node = 1;
            b.join_cluster(1, Instant::now() + Duration::from_secs(3600));
        }
        let records = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (log, _, writer) = gearbox_joblog::writer::start(Box::new(Collect(records.clone())), None, Some(8));
        b.set_job_log(log);
        let mut peers: Vec<Peer> = (0..4).map(|i| Peer::connect(&mut b, i)).collect();
        let info = AdminInfo { version: String::new(), verbose: String::new(), allow_shutdown: false, job_log: None };
        let name = |f: u8| Bytes::from(format!("f{f}"));
        for op in ops {
            match op {
                Op::Submit { conn, function, unique, background, priority, later } => {
                    peers[conn].expect.push_back(Expect::Submit { background: background || later });
                    let unique = if unique == 0 { Bytes::new() } else { Bytes::from(format!("u{unique}")) };
                    let priority = Priority::ALL[priority as usize];
                    let req = if later {
                        Request::SubmitJobEpoch { function: name(function), unique, epoch: i64::MAX, data: Bytes::from_static(b"d") }
                    } else {
                        Request::SubmitJob { function: name(function), unique, data: Bytes::from_static(b"d"), priority, background }
                    };
                    b.apply(peers[conn].id, req);
                }
                Op::CanDo(c, f, false) => b.apply(peers[c].id, Request::CanDo { function: name(f) }),
                Op::CanDo(c, f, true) => b.apply(peers[c].id, Request::CanDoTimeout { function: name(f), timeout: 1000 }),
                Op::CantDo(c, f) => b.apply(peers[c].id, Request::CantDo { function: name(f) }),
                Op::Grab(c) => {
                    peers[c].expect.push_back(Expect::Grab);
                    // A function at its limit (or paused) starts nothing more; lowering a limit
                    // lets running jobs finish.
                    let full: Vec<(usize, u32)> = b
                        .functions
                        .iter()
                        .enumerate()
                        .filter(|(_, f)| f.paused || (f.limit > 0 && f.running >= f.limit))
                        .map(|(i, f)| (i, f.running))
                        .collect();
                    b.apply(peers[c].id, Request::GrabJob(GrabKind::Uniq));
                    for (i, running) in full {
                        prop_assert!(b.functions[i].running <= running, "a full or paused function started a job");
                    }
                }
                Op::PreSleep(c) => b.apply(peers[c].id, Request::PreSleep),
                Op::Finish { conn, how } => {
                    let Some(key) = b.conns[peers[conn].id as usize].running.first().map(|r| r.key) else { continue };
                    let handle = Bytes::copy_from_slice(&b.handle(b.jobs[key as usize].seq));
                    let req = match how {
                        0 => Request::WorkComplete { handle, data: Bytes::new() },
                        1 => Request::WorkFail { handle },
                        2 => Request::WorkException { handle, data: Bytes::new() },
                        _ => Request::WorkStatus { handle, numerator: 1, denominator: 2 },
                    };
                    b.apply(peers[conn].id, req);
                }
                Op::Status(c) => {
                    peers[c].expect.push_back(Expect::Status);
                    b.apply(peers[c].id, Request::GetStatusUnique { unique: Bytes::from_static(b"u1") });
                }
                Op::Cancel(c, n) => {
                    let handle = Bytes::copy_from_slice(&b.handle(b.next_seq.saturating_sub(n + 1)));
                    peers[c].expect.push_back(Expect::Admin);
                    b.admin(peers[c].id, AdminCommand::CancelJob { handle }, &info);
                }
                Op::Limit(c, f, n) => {
                    let cmd = match n {
                        0 => AdminCommand::DropFunction { function: name(f) },
                        n => AdminCommand::MaxQueue { function: name(f), limits: [n; 3] },
                    };
                    peers[c].expect.push_back(Expect::Admin);
                    b.admin(peers[c].id, cmd, &info);
                }
                Op::Disconnect(c) => {
                    b.disconnect(peers[c].id);
                    peers[c] = Peer::connect(&mut b, c as i32);
                }
                Op::Tick => {
                    b.tick(Instant::now() + Duration::from_secs(5));
                }
                Op::Take => store.take(&mut b),
                Op::Commit(ok) => store.commit(&mut b, ok || !durable),
                Op::Fetch(ok) => store.fetch(&mut b, ok),
                Op::LoseLease if cluster => store.lose_lease(&mut b),
                Op::Claim(f) if cluster => store.claim(&mut b, &name(f)),
                Op::TakeOver if cluster => store.take_over(),
                Op::LoseLease | Op::TakeOver | Op::Claim(_) => {}
                Op::Pause(f, paused) => b.set_paused(&name(f), paused),
                Op::Cap(f, n) => b.set_limit(&name(f), n),
            }
            // The database answers status questions about jobs this node does not hold.
            let mut questions = Vec::new();
            b.status_queries(&mut questions);
            for q in questions {
                if q.cancel {
                    b.cancel_answered(q.id, "ERR UNKNOWN_JOB\r\n");
                } else {
                    b.status_answered(q.id, None);
                }
            }
            check(&b);
            for peer in &mut peers {
                peer.read(&b, &store);
            }
        }
        // Once everything is committed and read, no job is pending and every request is
        // answered.
        store.commit(&mut b, true);
        store.commit(&mut b, true);
        store.fetch(&mut b, true);
        check(&b);
        prop_assert!(b.jobs.iter().all(|(_, j)| j.state != JobState::Pending));
        prop_assert!(b.conns.iter().all(|(_, c)| c.held.borrow().is_none()));
        let mut acknowledged = Vec::new();
        for peer in &mut peers {
            peer.read(&b, &store);
            prop_assert!(peer.expect.is_empty(), "unanswered: {:?}", peer.expect);
            acknowledged.append(&mut peer.acknowledged);
        }
        for peer in peers {
            b.disconnect(peer.id);
            check(&b);
        }
        prop_assert!(b.jobs.iter().all(|(_, j)| j.background || j.state == JobState::Dropped));
        if cluster {
            // The rows this node owns are exactly its background jobs.
            store.commit(&mut b, true);
            store.commit(&mut b, true);
            store.take_over();
            prop_assert_eq!(store.owned(), background_jobs(&b));
        } else if durable {
            // The store holds exactly the background jobs (once the removals that waited
            // for their job's own commit are written), and a restart brings them all back.
            store.commit(&mut b, true);
            store.commit(&mut b, true);
            prop_assert_eq!(store.jobs.keys().copied().collect::<Vec<_>>(), background_jobs(&b));
            let mut restarted = Broker::new(BrokerConfig::default());
            restarted.enable_durability(Arc::new(std::sync::Condvar::new()), None, false);
            for job in store.jobs.values() {
                restarted.restore(job.as_loaded());
            }
            check(&restarted);
            prop_assert_eq!(background_jobs(&restarted), background_jobs(&b));
        }

        // Every attempt that ended was logged once, as the counters say.
        b.close_job_log();
        writer.stop();
        let records = records.lock().unwrap();
        let count = |status: Outcome| records.iter().filter(|r| r.status == status).count() as u64;
        let given_up = records.iter().filter(|r| r.error.as_deref().is_some_and(|e| e.starts_with("given up"))).count() as u64;
        let Totals { completed, failed, retried, buried, .. } = b.totals();
        prop_assert_eq!(count(Outcome::Complete), completed);
        // Each failed attempt ended a job, or was given another.
        prop_assert_eq!(count(Outcome::Fail) + count(Outcome::Exception) + given_up, failed + retried);
        // A durable broker's dead jobs went to the store with a batch; and each had failed.
        if durable {
            prop_assert_eq!(store.dead.len() as u64, buried);
        }
        for handle in &store.dead {
            prop_assert!(records.iter().any(|r| &r.handle == handle && r.status != Outcome::Complete));
        }
        // A job a background submission was told is queued is still there, or it ran to
        // an end, or an admin cancelled it, or it ran out of attempts: never dropped.
        let live = background_jobs(&b);
        for seq in acknowledged {
            let handle = String::from_utf8(b.handle(seq).to_vec()).unwrap();
            let ended = records.iter().any(|r| {
                r.handle == handle
                    && (matches!(r.status, Outcome::Complete | Outcome::Fail | Outcome::Exception)
                        || r.error.as_deref().is_some_and(|e| e == "cancelled by an admin" || e.starts_with("given up")))
            });
            // In a cluster, it may be another node's now, or no node's yet.
            let elsewhere = cluster && store.jobs.contains_key(&seq);
            prop_assert!(live.contains(&seq) || ended || elsewhere, "acknowledged job {} was dropped: {:?}", handle, records);
        }
        for r in records.iter() {
            prop_assert_eq!(r.started_at.is_none(), r.status == Outcome::Cancelled, "{:?}", r);
            prop_assert_eq!(r.result.is_some(), r.status == Outcome::Complete, "{:?}", r);
            // A payload out of memory is not logged (and only then).
            prop_assert!(r.payload.is_some() || (durable && fetches), "{:?}", r);
            prop_assert!(r.attempt <= 3, "{:?}", r);
        }
    }
}
