//! A blocking Gearman connection for tests that need to see each packet: submissions,
//! status, and a worker whose jobs finish when the test says so.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gearbox_proto::{Decoder, GrabKind, Message, Priority, Request, Response};

pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: BytesMut::new() })
    }

    pub fn send(&mut self, req: &Request) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        req.encode(&mut out);
        self.stream.write_all(&out)
    }

    /// The next response; `Ok(None)` if none came within `wait`.
    pub fn recv(&mut self, wait: Duration) -> std::io::Result<Option<Response>> {
        let deadline = Instant::now() + wait;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(Message::Packet(frame)) =
                Decoder::default().decode(&mut self.buf).map_err(std::io::Error::other)?
            {
                return Ok(Some(Response::parse(&frame).map_err(std::io::Error::other)?));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits a background job; its handle, or the server's error.
    pub fn submit_background(&mut self, function: &str, unique: &str, data: &str) -> Result<String, String> {
        let req = Request::SubmitJob {
            function: function.as_bytes().to_vec().into(),
            unique: unique.as_bytes().to_vec().into(),
            data: data.as_bytes().to_vec().into(),
            priority: Priority::Normal,
            background: true,
        };
        self.send(&req).map_err(|e| e.to_string())?;
        match self.recv(Duration::from_secs(30)) {
            Ok(Some(Response::JobCreated { handle })) => Ok(String::from_utf8(handle.to_vec()).unwrap()),
            Ok(Some(Response::Error { code, text })) => {
                Err(format!("{} {}", String::from_utf8_lossy(&code), String::from_utf8_lossy(&text)))
            }
            other => Err(format!("{other:?}")),
        }
    }

    /// GET_STATUS: (known, running, numerator, denominator).
    pub fn status(&mut self, handle: &str) -> (bool, bool, u32, u32) {
        self.send(&Request::GetStatus { handle: handle.as_bytes().to_vec().into() }).unwrap();
        match self.recv(Duration::from_secs(10)).unwrap() {
            Some(Response::StatusRes { known, running, numerator, denominator, .. }) => {
                (known, running, numerator, denominator)
            }
            other => panic!("expected STATUS_RES, got {other:?}"),
        }
    }

    /// GET_STATUS_UNIQUE: (known, running).
    pub fn status_unique(&mut self, unique: &str) -> (bool, bool) {
        self.send(&Request::GetStatusUnique { unique: unique.as_bytes().to_vec().into() }).unwrap();
        match self.recv(Duration::from_secs(10)).unwrap() {
            Some(Response::StatusResUnique { known, running, .. }) => (known, running),
            other => panic!("expected STATUS_RES_UNIQUE, got {other:?}"),
        }
    }
}

/// A job a worker was given, and when; `done` once its WORK_COMPLETE was sent.
#[derive(Clone, Debug)]
pub struct Taken {
    pub worker: String,
    pub handle: String,
    pub unique: String,
    pub at: Instant,
    pub done: bool,
}

/// A worker thread on one server: it takes jobs of one function, one at a time, and
/// completes each once `release` is set (at once if it already is), after `work`.
pub struct Worker {
    stop: Arc<AtomicBool>,
    pub release: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn start(name: &str, addr: SocketAddr, function: &str, work: Duration, log: Arc<Mutex<Vec<Taken>>>) -> Worker {
        Worker::start_held(name, addr, function, work, log, true)
    }

    /// As `start`, but jobs wait for `release` unless `released`.
    pub fn start_held(
        name: &str,
        addr: SocketAddr,
        function: &str,
        work: Duration,
        log: Arc<Mutex<Vec<Taken>>>,
        released: bool,
    ) -> Worker {
        let (stop, release) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(released)));
        let (name, function) = (name.to_string(), function.to_string());
        let thread = std::thread::spawn({
            let (stop, release) = (stop.clone(), release.clone());
            move || {
                let _ = serve(&name, addr, &function, work, &log, &stop, &release);
            }
        });
        Worker { stop, release, thread: Some(thread) }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.release.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    name: &str,
    addr: SocketAddr,
    function: &str,
    work: Duration,
    log: &Mutex<Vec<Taken>>,
    stop: &AtomicBool,
    release: &AtomicBool,
) -> std::io::Result<()> {
    let mut conn = Conn::connect(addr)?;
    conn.send(&Request::CanDo { function: function.as_bytes().to_vec().into() })?;
    while !stop.load(Ordering::Relaxed) {
        conn.send(&Request::GrabJob(GrabKind::Uniq))?;
        let assigned = loop {
            match conn.recv(Duration::from_secs(5))? {
                Some(Response::JobAssignUniq { handle, unique, .. }) => break Some((handle, unique)),
                Some(Response::NoJob) => break None,
                Some(_) => continue,
                None => break None,
            }
        };
        let Some((handle, unique)) = assigned else {
            conn.send(&Request::PreSleep)?;
            // Woken by NOOP, or a look again after a while.
            let _ = conn.recv(Duration::from_millis(300))?;
            continue;
        };
        let entry = {
            let mut log = log.lock().unwrap();
            log.push(Taken {
                worker: name.to_string(),
                handle: String::from_utf8_lossy(&handle).into_owned(),
                unique: String::from_utf8_lossy(&unique).into_owned(),
                at: Instant::now(),
                done: false,
            });
            log.len() - 1
        };
        while !release.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        std::thread::sleep(work);
        conn.send(&Request::WorkComplete { handle, data: Default::default() })?;
        log.lock().unwrap()[entry].done = true;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    Complete,
    Fail,
    Exception,
}

/// A job a test worker was given.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub handle: String,
    pub unique: String,
    pub data: String,
    pub at: Instant,
}

/// A worker thread that takes jobs of one function and ends each after `work` with the
/// outcome `decide` picks (given the attempts of that handle so far, this one included).
pub struct TestWorker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestWorker {
    pub fn start(
        addr: SocketAddr,
        function: &str,
        work: Duration,
        attempts: Arc<Mutex<Vec<Attempt>>>,
        decide: impl Fn(usize) -> Outcome + Send + 'static,
    ) -> TestWorker {
        let stop = Arc::new(AtomicBool::new(false));
        let function = function.to_string();
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut conn = Conn::connect(addr).unwrap();
                conn.send(&Request::CanDo { function: function.into_bytes().into() }).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    conn.send(&Request::GrabJob(GrabKind::Uniq)).unwrap();
                    let job = loop {
                        match conn.recv(Duration::from_secs(5)) {
                            Ok(Some(Response::JobAssignUniq { handle, unique, data, .. })) => {
                                break Some((handle, unique, data))
                            }
                            Ok(Some(Response::NoJob)) | Ok(None) => break None,
                            Ok(Some(_)) => continue,
                            Err(_) => return,
                        }
                    };
                    let Some((handle, unique, data)) = job else {
                        conn.send(&Request::PreSleep).unwrap();
                        let _ = conn.recv(Duration::from_millis(200));
                        continue;
                    };
                    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                    let n = {
                        let mut log = attempts.lock().unwrap();
                        log.push(Attempt {
                            handle: text(&handle),
                            unique: text(&unique),
                            data: text(&data),
                            at: Instant::now(),
                        });
                        log.iter().filter(|a| a.handle.as_bytes() == &handle[..]).count()
                    };
                    std::thread::sleep(work);
                    let reply = match decide(n) {
                        Outcome::Complete => Request::WorkComplete { handle, data: Default::default() },
                        Outcome::Fail => Request::WorkFail { handle },
                        Outcome::Exception => Request::WorkException { handle, data: "disk full".into() },
                    };
                    conn.send(&reply).unwrap();
                }
            }
        });
        TestWorker { stop, thread: Some(thread) }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
