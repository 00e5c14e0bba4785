//! The MongoDB sink against a real MongoDB-wire server: `GEARBOX_TEST_MONGO` (a server URI
//! without a database, default `mongodb://127.0.0.1:27017`; scripts/test.sh starts one).
//! Each test uses a database of its own, dropped at the end, so tests run in parallel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use gearbox_joblog::mongo::{self, MongoSink};
use gearbox_joblog::record::Priority;
use gearbox_joblog::{now_millis, Batch, Body, Error, Options, Query, Record, RecordRef, Search, Sink, Spec, Status};
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Bson, DateTime, Document};
use mongodb::{Client, Database};
use tokio::net::{TcpListener, TcpStream};

/// A database of this test process's own, so that runs and parallel tests do not meet.
fn database_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("joblog_test_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn server_uri() -> String {
    std::env::var("GEARBOX_TEST_MONGO").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_owned())
}

/// The URI the sink opens, and the same database through a client of the test's own.
async fn fresh_database() -> (String, Database) {
    let name = database_name();
    let server = server_uri();
    let client = Client::with_uri_str(&server).await.expect("GEARBOX_TEST_MONGO is a valid URI");
    (format!("{}/{name}", server.trim_end_matches('/')), client.database(&name))
}

/// `Sink::write` runs on a plain thread in the server (it blocks on the runtime), so here too.
async fn write(mut sink: MongoSink, batch: Batch) -> (MongoSink, Result<(), Error>) {
    tokio::task::spawn_blocking(move || {
        let result = sink.write(&batch);
        (sink, result)
    })
    .await
    .expect("write thread")
}

fn record<'a>(handle: &'a str, function: &'a str, status: Status, finished_at: i64) -> RecordRef<'a> {
    RecordRef {
        handle: handle.as_bytes(),
        function: function.as_bytes(),
        unique: b"",
        priority: Priority::Normal,
        background: false,
        status,
        attempt: 1,
        submitted_at: finished_at - 1_500,
        started_at: Some(finished_at - 1_000),
        finished_at,
        worker_id: Some(b"worker-1"),
        client_id: Some(b"client-1"),
        payload_bytes: 5,
        result_bytes: None,
        error: None,
        payload: None,
        result: None,
    }
}

/// Oldest first: complete, fail, exception, lost_worker, and a cancelled job that never ran.
fn sample(base: i64) -> Vec<RecordRef<'static>> {
    vec![
        RecordRef {
            unique: b"order-17",
            priority: Priority::High,
            result_bytes: Some(3),
            payload: Some(b"hello"),
            result: Some(b"\xff\x00\x01"),
            ..record("H:t:1", "resize", Status::Complete, base + 1_000)
        },
        RecordRef { client_id: None, ..record("H:t:2", "resize", Status::Fail, base + 2_000) },
        RecordRef {
            priority: Priority::Low,
            background: true,
            payload_bytes: 5_000_000_000,
            error: Some(b"boom"),
            ..record("H:t:3", "thumb", Status::Exception, base + 3_000)
        },
        RecordRef { attempt: 2, ..record("H:t:4", "thumb", Status::LostWorker, base + 4_000) },
        RecordRef {
            started_at: None,
            worker_id: None,
            client_id: None,
            ..record("H:t:5", "resize", Status::Cancelled, base + 5_000)
        },
    ]
}

fn handles(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.handle.as_str()).collect()
}

fn field_names(d: &Document) -> Vec<&str> {
    d.keys().map(String::as_str).filter(|k| *k != "_id").collect()
}

fn int(d: &Document, key: &str) -> i64 {
    match d.get(key) {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        other => panic!("{key} is {other:?}, not an integer"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_and_searches() {
    let (uri, db) = fresh_database().await;
    let (sink, search) = mongo::open(&uri, None).await.expect("open");
    // Whole seconds: the test server compares dates to the second, and sorts whole-second
    // dates apart from ones with milliseconds.
    let base = now_millis() / 1_000 * 1_000 - 60_000;
    let records = sample(base);
    let mut batch = Batch::default();
    for r in &records {
        batch.push(r);
    }
    let (_sink, result) = write(sink, batch).await;
    result.expect("write");

    let jobs = db.collection::<Document>("jobs");
    let stored: Vec<Document> = jobs
        .find(Document::new())
        .sort(mongodb::bson::doc! { "finished_at": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(stored.len(), 5);

    let complete = &stored[0];
    assert_eq!(
        field_names(complete),
        [
            "handle",
            "function",
            "unique",
            "priority",
            "background",
            "status",
            "attempt",
            "submitted_at",
            "started_at",
            "finished_at",
            "queue_ms",
            "run_ms",
            "worker_id",
            "client_id",
            "payload_bytes",
            "result_bytes",
            "payload",
            "result",
        ]
    );
    assert_eq!(complete.get_str("handle").unwrap(), "H:t:1");
    assert_eq!(complete.get_str("unique").unwrap(), "order-17");
    assert_eq!(complete.get_str("priority").unwrap(), "high");
    assert_eq!(complete.get_str("status").unwrap(), "complete");
    assert!(!complete.get_bool("background").unwrap());
    assert_eq!(int(complete, "attempt"), 1);
    assert_eq!(complete.get_datetime("submitted_at").unwrap(), &DateTime::from_millis(base - 500));
    assert_eq!(complete.get_datetime("started_at").unwrap(), &DateTime::from_millis(base));
    assert_eq!(complete.get_datetime("finished_at").unwrap(), &DateTime::from_millis(base + 1_000));
    assert_eq!((int(complete, "queue_ms"), int(complete, "run_ms")), (500, 1_000));
    assert_eq!((int(complete, "payload_bytes"), int(complete, "result_bytes")), (5, 3));
    assert_eq!(complete.get_str("payload").unwrap(), "hello", "UTF-8 bodies are strings");
    let result = complete.get_binary_generic("result").expect("non-UTF-8 bodies are binary");
    assert_eq!(result, b"\xff\x00\x01");
    assert!(matches!(complete.get("result"), Some(Bson::Binary(b)) if b.subtype == BinarySubtype::Generic));

    let exception = &stored[2];
    assert_eq!(exception.get_str("error").unwrap(), "boom");
    assert!(exception.get_bool("background").unwrap());
    assert_eq!(exception.get("payload_bytes"), Some(&Bson::Int64(5_000_000_000)));
    assert_eq!(stored[3].get_str("status").unwrap(), "lost_worker");

    let cancelled = &stored[4];
    assert_eq!(
        field_names(cancelled),
        [
            "handle",
            "function",
            "priority",
            "background",
            "status",
            "attempt",
            "submitted_at",
            "finished_at",
            "payload_bytes"
        ],
        "fields without a value are left out, not null"
    );

    let search = &search;
    let find = |query: Query| async move { search.search(query).await.expect("search") };
    let everything = find(Query { limit: 50, ..Query::default() }).await;
    let expected: Vec<Record> = records.iter().rev().map(RecordRef::to_record).collect();
    assert_eq!(everything, expected, "records read back as written, newest first");
    assert_eq!(everything[4].result, Some(Body::Binary { base64: "/wAB".into() }));

    let cases = [
        // `fail` takes exceptions too: both are the worker saying the job failed.
        (Query { status: Some(Status::Fail), ..Query::default() }, vec!["H:t:3", "H:t:2"]),
        (Query { status: Some(Status::Exception), ..Query::default() }, vec!["H:t:3"]),
        (Query { failed: true, ..Query::default() }, vec!["H:t:5", "H:t:4", "H:t:3", "H:t:2"]),
        (Query { function: Some("thumb".into()), ..Query::default() }, vec!["H:t:4", "H:t:3"]),
        (Query { function: Some("resize".into()), failed: true, ..Query::default() }, vec!["H:t:5", "H:t:2"]),
        (Query { unique: Some("order-17".into()), ..Query::default() }, vec!["H:t:1"]),
        (Query { handle: Some("H:t:3".into()), ..Query::default() }, vec!["H:t:3"]),
        (Query { since: Some(base + 3_000), ..Query::default() }, vec!["H:t:5", "H:t:4", "H:t:3"]),
        (Query { since: Some(base + 6_000), ..Query::default() }, vec![]),
    ];
    for (query, want) in cases {
        let got = find(Query { limit: 50, ..query.clone() }).await;
        assert_eq!(handles(&got), want, "{query:?}");
    }
    assert_eq!(handles(&find(Query { limit: 2, ..Query::default() }).await), ["H:t:5", "H:t:4"]);

    db.drop().await.unwrap();
}

/// The key field names of every index but `_id`'s, with the TTL index's expiry. (The test
/// server reports compound keys all ascending and names indexes its own way.)
async fn indexes(db: &Database) -> Vec<(Vec<String>, Option<Duration>)> {
    let models: Vec<_> = db.collection::<Document>("jobs").list_indexes().await.unwrap().try_collect().await.unwrap();
    let mut found: Vec<_> = models
        .into_iter()
        .map(|m| (m.keys.keys().cloned().collect::<Vec<_>>(), m.options.and_then(|o| o.expire_after)))
        .filter(|(keys, _)| keys != &["_id"])
        .collect();
    found.sort();
    found
}

/// The indexes `open` makes: the query ones, and the TTL one when records expire.
fn expected_indexes(ttl: Option<Duration>) -> Vec<(Vec<String>, Option<Duration>)> {
    let keys = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut all = vec![
        (keys(&["function", "finished_at"]), None),
        (keys(&["status", "finished_at"]), None),
        (keys(&["unique"]), None),
        (keys(&["handle"]), None),
    ];
    if ttl.is_some() {
        all.push((keys(&["finished_at"]), ttl));
    }
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_follow_the_retention() {
    let (uri, db) = fresh_database().await;
    let week = Duration::from_secs(7 * 86_400);
    let day = Duration::from_secs(86_400);
    mongo::open(&uri, Some(week)).await.expect("open");
    assert_eq!(indexes(&db).await, expected_indexes(Some(week)));
    // A restart with another retention replaces the TTL index; without one, removes it.
    mongo::open(&uri, Some(day)).await.expect("reopen");
    assert_eq!(indexes(&db).await, expected_indexes(Some(day)));
    mongo::open(&uri, None).await.expect("reopen without retention");
    assert_eq!(indexes(&db).await, expected_indexes(None));
    db.drop().await.unwrap();
}

/// Relays `listener`'s connections to the test server: a MongoDB that comes back up.
async fn relay(listener: TcpListener) {
    let server = server_uri();
    let address = server.trim_start_matches("mongodb://").split(['/', '?']).next().unwrap_or_default().to_owned();
    loop {
        let (mut inbound, _) = listener.accept().await.expect("accept");
        let address = address.clone();
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(&address).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_are_created_once_the_server_is_back() {
    let (_, db) = fresh_database().await;
    // A port nobody listens on until the relay starts.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let uri = format!("mongodb://127.0.0.1:{port}/{}", db.name());
    let hour = Duration::from_secs(3_600);
    let (mut sink, _search) = mongo::open(&uri, Some(hour)).await.expect("open does not fail");
    tokio::spawn(relay(TcpListener::bind(("127.0.0.1", port)).await.unwrap()));

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut batch = Batch::default();
        batch.push(&record("H:b:1", "resize", Status::Complete, now_millis()));
        let result;
        (sink, result) = write(sink, batch).await;
        if result.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no write went through the relay in 30 s: {result:?}");
    }
    assert_eq!(indexes(&db).await, expected_indexes(Some(hour)));
    db.drop().await.unwrap();
}

/// Nothing listens on port 1.
const DEAD_MONGO: &str = "mongodb://127.0.0.1:1/gearbox_down";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_writes_fast() {
    let (sink, _search) = mongo::open(DEAD_MONGO, Some(Duration::from_secs(3_600))).await.expect("open does not fail");
    let mut batch = Batch::default();
    batch.push(&record("H:d:1", "resize", Status::Complete, now_millis()));
    let started = Instant::now();
    let (_sink, result) =
        tokio::time::timeout(Duration::from_secs(20), write(sink, batch)).await.expect("write does not hang");
    assert!(matches!(result, Err(Error::Mongo(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "write failed after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_drops_records_without_blocking() {
    let options = Options {
        spec: Spec::Mongo(DEAD_MONGO.to_owned()),
        data_dir: std::env::temp_dir(),
        retention: None,
        max_bytes: None,
        bodies: None,
    };
    let mut opened = gearbox_joblog::open(&options).await.expect("open").expect("a job log");
    assert_eq!(opened.stats.usage(), None, "MongoDB's size is not reported");
    let started = Instant::now();
    for n in 0..3 {
        for _ in 0..5 {
            opened.log.record(&record(&format!("H:d:{n}"), "resize", Status::Complete, now_millis()));
        }
        opened.log.flush();
    }
    assert!(started.elapsed() < Duration::from_millis(500), "recording took {:?}", started.elapsed());

    let deadline = Instant::now() + Duration::from_secs(30);
    while opened.stats.dropped() < 5 {
        assert!(Instant::now() < deadline, "no records dropped in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    opened.log.close();
    let writer = opened.writer;
    tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(move || writer.stop()))
        .await
        .expect("the writer stops")
        .unwrap();
    assert_eq!((opened.stats.written(), opened.stats.dropped()), (0, 15));
}
