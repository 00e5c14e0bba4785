//! The MongoDB sink: one document per record in the collection `jobs` of the URI's database
//! (`gearbox` when the URI names none). Expiry is MongoDB's own, by a TTL index on
//! `finished_at`. Fields without a value are left out rather than stored as null, like the
//! JSON form of [`Record`].

use std::future::IntoFuture;
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{doc, Binary, Bson, DateTime, Document};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, IndexModel};

use crate::record::{priority_name, Batch, Body, Query, Record, RecordRef, Status, Timestamp};
use crate::{Error, Millis, Search, SearchFuture, Sink};

pub const DEFAULT_DATABASE: &str = "gearbox";
pub const COLLECTION: &str = "jobs";

/// How long an operation waits for a reachable server (the driver's default is 30 s), so that
/// while MongoDB is down a write fails fast and the writer goes on to drop, not to queue.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct MongoSink {
    jobs: Collection<Document>,
    /// The server's runtime: [`Sink::write`] runs on the writer thread, outside it.
    runtime: tokio::runtime::Handle,
    retention: Option<Duration>,
    /// Set when creating the indexes failed at open (MongoDB down); they are created after
    /// the first write that succeeds.
    indexes_pending: bool,
}

pub struct MongoSearch {
    jobs: Collection<Document>,
}

/// Connects to `uri` and creates the indexes. MongoDB being unreachable is not an error here
/// (the writer drops what it cannot deliver); a malformed URI is.
pub async fn open(uri: &str, retention: Option<Duration>) -> Result<(MongoSink, MongoSearch), Error> {
    let mut options = ClientOptions::parse(uri).await.map_err(mongo_error)?;
    options.server_selection_timeout.get_or_insert(SERVER_SELECTION_TIMEOUT);
    options.connect_timeout.get_or_insert(CONNECT_TIMEOUT);
    options.app_name.get_or_insert_with(|| "gearbox".to_owned());
    let database = options.default_database.clone().unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
    let client = Client::with_options(options).map_err(mongo_error)?;
    let jobs = client.database(&database).collection::<Document>(COLLECTION);
    let indexes_pending = match ensure_indexes(&jobs, retention).await {
        Ok(()) => false,
        Err(e) => {
            tracing::warn!("job log: MongoDB indexes not created yet ({e}); trying again after the first write");
            true
        }
    };
    let sink = MongoSink { jobs: jobs.clone(), runtime: tokio::runtime::Handle::current(), retention, indexes_pending };
    Ok((sink, MongoSearch { jobs }))
}

fn mongo_error(e: mongodb::error::Error) -> Error {
    Error::Mongo(e.to_string())
}

/// Creates the query indexes and makes the TTL index match `retention`. A TTL index from an
/// earlier run with another retention (or none) is dropped first: MongoDB refuses to create
/// one with the same key and another expiry, and a stale one would go on deleting records.
async fn ensure_indexes(jobs: &Collection<Document>, retention: Option<Duration>) -> mongodb::error::Result<()> {
    let query_keys = [
        doc! { "function": 1, "finished_at": -1 },
        doc! { "status": 1, "finished_at": -1 },
        doc! { "unique": 1 },
        doc! { "handle": 1 },
    ];
    let query_indexes = query_keys.into_iter().map(|keys| {
        // Most jobs have no unique key; sparse leaves them out of that index.
        let sparse = keys.contains_key("unique");
        IndexModel::builder().keys(keys).options(IndexOptions::builder().sparse(sparse).build()).build()
    });
    jobs.create_indexes(query_indexes).await?;

    let expiry = retention.map(|keep| Duration::from_secs(keep.as_secs()));
    let mut ttl_in_place = false;
    let mut indexes = jobs.list_indexes().await?;
    while let Some(index) = indexes.try_next().await? {
        let Some(options) = index.options else { continue };
        let is_finished_ttl = options.expire_after.is_some() && index.keys.keys().eq(["finished_at"]);
        if !is_finished_ttl {
            continue;
        }
        if options.expire_after == expiry {
            ttl_in_place = true;
        } else if let Some(name) = options.name {
            jobs.drop_index(name).await?;
        }
    }
    if let (Some(expiry), false) = (expiry, ttl_in_place) {
        let ttl = IndexModel::builder()
            .keys(doc! { "finished_at": 1 })
            .options(IndexOptions::builder().expire_after(expiry).build())
            .build();
        jobs.create_index(ttl).await?;
    }
    Ok(())
}

impl Sink for MongoSink {
    fn write(&mut self, batch: &Batch) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let documents: Vec<Document> = batch.iter().map(|r| to_document(&r)).collect();
        // Unordered: the server inserts the rest of the batch when one document fails.
        self.runtime.block_on(self.jobs.insert_many(documents).ordered(false).into_future()).map_err(mongo_error)?;
        if self.indexes_pending {
            // MongoDB answers now, so a failure here is not an outage: warn once, not per batch.
            self.indexes_pending = false;
            match self.runtime.block_on(ensure_indexes(&self.jobs, self.retention)) {
                Ok(()) => tracing::info!("job log: MongoDB indexes created"),
                Err(e) => tracing::warn!("job log: creating the MongoDB indexes failed: {e}"),
            }
        }
        Ok(())
    }

    fn expire(&mut self, _before: Millis) -> Result<u64, Error> {
        Ok(0)
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// MongoDB has no unsigned integers; counts past `i64::MAX` do not occur in practice.
fn int64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A body as a string when it is UTF-8, so that it reads as text in any MongoDB tool.
fn body(bytes: &[u8]) -> Bson {
    match std::str::from_utf8(bytes) {
        Ok(s) => Bson::String(s.to_owned()),
        Err(_) => Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes: bytes.to_vec() }),
    }
}

fn to_document(r: &RecordRef<'_>) -> Document {
    fn put(d: &mut Document, key: &str, value: Option<impl Into<Bson>>) {
        if let Some(value) = value {
            d.insert(key, value);
        }
    }
    let mut d = Document::new();
    d.insert("handle", text(r.handle));
    d.insert("function", text(r.function));
    put(&mut d, "unique", (!r.unique.is_empty()).then(|| text(r.unique)));
    d.insert("priority", priority_name(r.priority));
    d.insert("background", r.background);
    d.insert("status", r.status.as_str());
    d.insert("attempt", i64::from(r.attempt));
    d.insert("submitted_at", DateTime::from_millis(r.submitted_at));
    put(&mut d, "started_at", r.started_at.map(DateTime::from_millis));
    d.insert("finished_at", DateTime::from_millis(r.finished_at));
    put(&mut d, "queue_ms", r.queue_ms().map(int64));
    put(&mut d, "run_ms", r.run_ms().map(int64));
    put(&mut d, "worker_id", r.worker_id.map(text));
    put(&mut d, "client_id", r.client_id.map(text));
    d.insert("payload_bytes", int64(r.payload_bytes));
    put(&mut d, "result_bytes", r.result_bytes.map(int64));
    put(&mut d, "error", r.error.map(text));
    put(&mut d, "payload", r.payload.map(body));
    put(&mut d, "result", r.result.map(body));
    d
}

impl Search for MongoSearch {
    fn search(&self, query: Query) -> SearchFuture<'_> {
        Box::pin(async move {
            let documents: Vec<Document> = self
                .jobs
                .find(filter(&query))
                .sort(doc! { "finished_at": -1, "_id": -1 })
                .limit(query.limit.max(1) as i64)
                .await
                .map_err(mongo_error)?
                .try_collect()
                .await
                .map_err(mongo_error)?;
            documents.iter().map(|d| Fields(d).to_record()).collect()
        })
    }
}

fn filter(q: &Query) -> Document {
    let mut f = Document::new();
    if let Some(function) = &q.function {
        f.insert("function", function);
    }
    if q.status == Some(Status::Fail) {
        f.insert("status", doc! { "$in": [Status::Fail.as_str(), Status::Exception.as_str()] });
    } else if let Some(status) = q.status {
        f.insert("status", status.as_str());
    } else if q.failed {
        f.insert("status", doc! { "$ne": Status::Complete.as_str() });
    }
    if let Some(since) = q.since {
        f.insert("finished_at", doc! { "$gte": DateTime::from_millis(since) });
    }
    if let Some(unique) = &q.unique {
        f.insert("unique", unique);
    }
    if let Some(handle) = &q.handle {
        f.insert("handle", handle);
    }
    f
}

/// Reads a stored document back, failing on a field of the wrong type (a document not
/// written by gearbox) rather than guessing.
struct Fields<'a>(&'a Document);

impl Fields<'_> {
    fn invalid(&self, key: &str) -> Error {
        let id = self.0.get("_id").map_or_else(|| "?".to_owned(), |id| id.to_string());
        match self.0.get(key) {
            Some(value) => Error::Mongo(format!("document {id}: field {key} is invalid: {value}")),
            None => Error::Mongo(format!("document {id}: field {key} is missing")),
        }
    }

    fn required<T>(&self, key: &str, value: Result<Option<T>, Error>) -> Result<T, Error> {
        value?.ok_or_else(|| self.invalid(key))
    }

    fn text(&self, key: &str) -> Result<Option<String>, Error> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Bson::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.invalid(key)),
        }
    }

    /// Written as Int64; servers may store small values as Int32.
    fn int(&self, key: &str) -> Result<Option<i64>, Error> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Bson::Int64(n)) => Ok(Some(*n)),
            Some(Bson::Int32(n)) => Ok(Some(i64::from(*n))),
            Some(_) => Err(self.invalid(key)),
        }
    }

    fn count(&self, key: &str) -> Result<Option<u64>, Error> {
        Ok(self.int(key)?.map(|n| n.max(0) as u64))
    }

    fn time(&self, key: &str) -> Result<Option<Timestamp>, Error> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Bson::DateTime(t)) => Ok(Some(Timestamp(t.timestamp_millis()))),
            Some(_) => Err(self.invalid(key)),
        }
    }

    fn body(&self, key: &str) -> Result<Option<Body>, Error> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Bson::String(s)) => Ok(Some(Body::Text(s.clone()))),
            Some(Bson::Binary(b)) => Ok(Some(Body::from_bytes(&b.bytes))),
            Some(_) => Err(self.invalid(key)),
        }
    }

    fn to_record(&self) -> Result<Record, Error> {
        let background = match self.0.get("background") {
            Some(Bson::Boolean(b)) => *b,
            _ => return Err(self.invalid("background")),
        };
        let status = self.required("status", self.text("status"))?;
        let attempt = self.required("attempt", self.int("attempt"))?;
        Ok(Record {
            handle: self.required("handle", self.text("handle"))?,
            function: self.required("function", self.text("function"))?,
            unique: self.text("unique")?,
            priority: self.required("priority", self.text("priority"))?,
            background,
            status: status.parse().map_err(|_| self.invalid("status"))?,
            attempt: u32::try_from(attempt).map_err(|_| self.invalid("attempt"))?,
            submitted_at: self.required("submitted_at", self.time("submitted_at"))?,
            started_at: self.time("started_at")?,
            finished_at: self.required("finished_at", self.time("finished_at"))?,
            queue_ms: self.count("queue_ms")?,
            run_ms: self.count("run_ms")?,
            worker_id: self.text("worker_id")?,
            client_id: self.text("client_id")?,
            payload_bytes: self.required("payload_bytes", self.count("payload_bytes"))?,
            result_bytes: self.count("result_bytes")?,
            error: self.text("error")?,
            payload: self.body("payload")?,
            result: self.body("result")?,
        })
    }
}
