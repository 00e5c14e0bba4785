//! Typed packets: what a server receives ([`Request`]) and what it sends ([`Response`]).
//! Clients and workers use the same types the other way round.

use bytes::{Bytes, BytesMut};

use crate::packet::{encode_packet, split_args, Frame, Magic, PacketType};

/// Job priority; assignment takes every high job before any normal one, across functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    High = 0,
    Normal = 1,
    Low = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn name(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// Which JOB_ASSIGN variant a worker asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrabKind {
    Plain,
    Uniq,
    All,
}

/// The five cron-like fields of SUBMIT_JOB_SCHED, as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub minute: Bytes,
    pub hour: Bytes,
    pub day_of_month: Bytes,
    pub month: Bytes,
    pub day_of_week: Bytes,
}

/// A packet sent to the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    CanDo { function: Bytes },
    CanDoTimeout { function: Bytes, timeout: u32 },
    CantDo { function: Bytes },
    ResetAbilities,
    PreSleep,
    SubmitJob { function: Bytes, unique: Bytes, data: Bytes, priority: Priority, background: bool },
    SubmitJobEpoch { function: Bytes, unique: Bytes, epoch: i64, data: Bytes },
    SubmitJobSched { function: Bytes, unique: Bytes, schedule: Schedule, data: Bytes },
    SubmitReduceJob { function: Bytes, unique: Bytes, reducer: Bytes, data: Bytes, background: bool },
    GrabJob(GrabKind),
    WorkStatus { handle: Bytes, numerator: u32, denominator: u32 },
    WorkComplete { handle: Bytes, data: Bytes },
    WorkFail { handle: Bytes },
    WorkException { handle: Bytes, data: Bytes },
    WorkData { handle: Bytes, data: Bytes },
    WorkWarning { handle: Bytes, data: Bytes },
    GetStatus { handle: Bytes },
    GetStatusUnique { unique: Bytes },
    EchoReq { data: Bytes },
    OptionReq { option: Bytes },
    SetClientId { id: Bytes },
    AllYours,
}

/// A packet sent by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Noop,
    NoJob,
    JobCreated {
        handle: Bytes,
    },
    JobAssign {
        handle: Bytes,
        function: Bytes,
        data: Bytes,
    },
    JobAssignUniq {
        handle: Bytes,
        function: Bytes,
        unique: Bytes,
        data: Bytes,
    },
    JobAssignAll {
        handle: Bytes,
        function: Bytes,
        unique: Bytes,
        reducer: Bytes,
        data: Bytes,
    },
    WorkStatus {
        handle: Bytes,
        numerator: u32,
        denominator: u32,
    },
    WorkComplete {
        handle: Bytes,
        data: Bytes,
    },
    WorkFail {
        handle: Bytes,
    },
    WorkException {
        handle: Bytes,
        data: Bytes,
    },
    WorkData {
        handle: Bytes,
        data: Bytes,
    },
    WorkWarning {
        handle: Bytes,
        data: Bytes,
    },
    StatusRes {
        handle: Bytes,
        known: bool,
        running: bool,
        numerator: u32,
        denominator: u32,
    },
    StatusResUnique {
        unique: Bytes,
        known: bool,
        running: bool,
        numerator: u32,
        denominator: u32,
        waiting_clients: u32,
    },
    EchoRes {
        data: Bytes,
    },
    Error {
        code: Bytes,
        text: Bytes,
    },
    OptionRes {
        option: Bytes,
    },
}

/// Why a well-framed packet is not a valid message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0:?} packet has the wrong magic")]
    WrongMagic(PacketType),
    #[error("{0:?} is not a valid packet in this direction")]
    WrongDirection(PacketType),
    #[error("{0:?} packet has too few arguments")]
    MissingArguments(PacketType),
    #[error("{0:?} packet has a bad number")]
    BadNumber(PacketType),
}

impl ParseError {
    /// The short code sent back in an ERROR packet.
    pub fn code(&self) -> &'static str {
        match self {
            ParseError::WrongMagic(_) => "INVALID_MAGIC",
            ParseError::WrongDirection(_) => "INVALID_COMMAND",
            ParseError::MissingArguments(_) | ParseError::BadNumber(_) => "INVALID_PACKET",
        }
    }
}

/// Like C's `atoi`: leading decimal digits, anything else ends the number (Gearman peers
/// have always been read this way). Saturates instead of wrapping.
pub fn parse_u32_lenient(s: &[u8]) -> u32 {
    let mut n: u32 = 0;
    for &b in s.iter().skip_while(|b| b.is_ascii_whitespace()) {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.saturating_mul(10).saturating_add(u32::from(b - b'0'));
    }
    n
}

fn parse_strict<T: std::str::FromStr>(s: &[u8], kind: PacketType) -> Result<T, ParseError> {
    std::str::from_utf8(s).ok().and_then(|s| s.trim().parse().ok()).ok_or(ParseError::BadNumber(kind))
}

fn args<const N: usize>(frame: &Frame) -> Result<[Bytes; N], ParseError> {
    split_args(&frame.body).ok_or(ParseError::MissingArguments(frame.kind))
}

fn flag(b: bool) -> &'static [u8] {
    if b {
        b"1"
    } else {
        b"0"
    }
}

impl Request {
    pub fn parse(frame: &Frame) -> Result<Request, ParseError> {
        use PacketType as T;
        let kind = frame.kind;
        if frame.magic != Magic::Request {
            return Err(ParseError::WrongMagic(kind));
        }
        let submit = |priority, background| -> Result<Request, ParseError> {
            let [function, unique, data] = args(frame)?;
            Ok(Request::SubmitJob { function, unique, data, priority, background })
        };
        Ok(match kind {
            T::CanDo => Request::CanDo { function: trim_nul(&frame.body) },
            T::CanDoTimeout => {
                let [function, timeout] = args(frame)?;
                Request::CanDoTimeout { function, timeout: parse_strict(&timeout, kind)? }
            }
            T::CantDo => Request::CantDo { function: trim_nul(&frame.body) },
            T::ResetAbilities => Request::ResetAbilities,
            T::PreSleep => Request::PreSleep,
            T::SubmitJob => submit(Priority::Normal, false)?,
            T::SubmitJobBg => submit(Priority::Normal, true)?,
            T::SubmitJobHigh => submit(Priority::High, false)?,
            T::SubmitJobHighBg => submit(Priority::High, true)?,
            T::SubmitJobLow => submit(Priority::Low, false)?,
            T::SubmitJobLowBg => submit(Priority::Low, true)?,
            T::SubmitJobEpoch => {
                let [function, unique, epoch, data] = args(frame)?;
                Request::SubmitJobEpoch { function, unique, epoch: parse_strict(&epoch, kind)?, data }
            }
            T::SubmitJobSched => {
                let [function, unique, minute, hour, day_of_month, month, day_of_week, data] = args(frame)?;
                let schedule = Schedule { minute, hour, day_of_month, month, day_of_week };
                Request::SubmitJobSched { function, unique, schedule, data }
            }
            T::SubmitReduceJob | T::SubmitReduceJobBackground => {
                let [function, unique, reducer, data] = args(frame)?;
                let background = kind == T::SubmitReduceJobBackground;
                Request::SubmitReduceJob { function, unique, reducer, data, background }
            }
            T::GrabJob => Request::GrabJob(GrabKind::Plain),
            T::GrabJobUniq => Request::GrabJob(GrabKind::Uniq),
            T::GrabJobAll => Request::GrabJob(GrabKind::All),
            T::WorkStatus => {
                let [handle, num, den] = args(frame)?;
                Request::WorkStatus { handle, numerator: parse_u32_lenient(&num), denominator: parse_u32_lenient(&den) }
            }
            T::WorkComplete => {
                let [handle, data] = args(frame)?;
                Request::WorkComplete { handle, data }
            }
            // Some workers send a trailing NUL after the handle; tolerate it.
            T::WorkFail => Request::WorkFail { handle: trim_nul(&frame.body) },
            T::WorkException => {
                let [handle, data] = args(frame)?;
                Request::WorkException { handle, data }
            }
            T::WorkData => {
                let [handle, data] = args(frame)?;
                Request::WorkData { handle, data }
            }
            T::WorkWarning => {
                let [handle, data] = args(frame)?;
                Request::WorkWarning { handle, data }
            }
            T::GetStatus => Request::GetStatus { handle: trim_nul(&frame.body) },
            T::GetStatusUnique => Request::GetStatusUnique { unique: trim_nul(&frame.body) },
            T::EchoReq => Request::EchoReq { data: frame.body.clone() },
            T::OptionReq => Request::OptionReq { option: trim_nul(&frame.body) },
            T::SetClientId => Request::SetClientId { id: trim_nul(&frame.body) },
            T::AllYours => Request::AllYours,
            T::Noop
            | T::JobCreated
            | T::NoJob
            | T::JobAssign
            | T::EchoRes
            | T::Error
            | T::StatusRes
            | T::OptionRes
            | T::JobAssignUniq
            | T::JobAssignAll
            | T::StatusResUnique => return Err(ParseError::WrongDirection(kind)),
        })
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        use PacketType as T;
        let mut put = |kind, args: &[&[u8]]| encode_packet(buf, Magic::Request, kind, args);
        match self {
            Request::CanDo { function } => put(T::CanDo, &[function]),
            Request::CanDoTimeout { function, timeout } => {
                put(T::CanDoTimeout, &[function, timeout.to_string().as_bytes()])
            }
            Request::CantDo { function } => put(T::CantDo, &[function]),
            Request::ResetAbilities => put(T::ResetAbilities, &[]),
            Request::PreSleep => put(T::PreSleep, &[]),
            Request::SubmitJob { function, unique, data, priority, background } => {
                let kind = match (priority, background) {
                    (Priority::High, false) => T::SubmitJobHigh,
                    (Priority::High, true) => T::SubmitJobHighBg,
                    (Priority::Normal, false) => T::SubmitJob,
                    (Priority::Normal, true) => T::SubmitJobBg,
                    (Priority::Low, false) => T::SubmitJobLow,
                    (Priority::Low, true) => T::SubmitJobLowBg,
                };
                put(kind, &[function, unique, data])
            }
            Request::SubmitJobEpoch { function, unique, epoch, data } => {
                put(T::SubmitJobEpoch, &[function, unique, epoch.to_string().as_bytes(), data])
            }
            Request::SubmitJobSched { function, unique, schedule: s, data } => put(
                T::SubmitJobSched,
                &[function, unique, &s.minute, &s.hour, &s.day_of_month, &s.month, &s.day_of_week, data],
            ),
            Request::SubmitReduceJob { function, unique, reducer, data, background } => {
                let kind = if *background { T::SubmitReduceJobBackground } else { T::SubmitReduceJob };
                put(kind, &[function, unique, reducer, data])
            }
            Request::GrabJob(GrabKind::Plain) => put(T::GrabJob, &[]),
            Request::GrabJob(GrabKind::Uniq) => put(T::GrabJobUniq, &[]),
            Request::GrabJob(GrabKind::All) => put(T::GrabJobAll, &[]),
            Request::WorkStatus { handle, numerator, denominator } => {
                put(T::WorkStatus, &[handle, numerator.to_string().as_bytes(), denominator.to_string().as_bytes()])
            }
            Request::WorkComplete { handle, data } => put(T::WorkComplete, &[handle, data]),
            Request::WorkFail { handle } => put(T::WorkFail, &[handle]),
            Request::WorkException { handle, data } => put(T::WorkException, &[handle, data]),
            Request::WorkData { handle, data } => put(T::WorkData, &[handle, data]),
            Request::WorkWarning { handle, data } => put(T::WorkWarning, &[handle, data]),
            Request::GetStatus { handle } => put(T::GetStatus, &[handle]),
            Request::GetStatusUnique { unique } => put(T::GetStatusUnique, &[unique]),
            Request::EchoReq { data } => put(T::EchoReq, &[data]),
            Request::OptionReq { option } => put(T::OptionReq, &[option]),
            Request::SetClientId { id } => put(T::SetClientId, &[id]),
            Request::AllYours => put(T::AllYours, &[]),
        }
    }
}

fn trim_nul(b: &Bytes) -> Bytes {
    match b.iter().position(|&c| c == 0) {
        Some(end) => b.slice(..end),
        None => b.clone(),
    }
}

impl Response {
    pub fn parse(frame: &Frame) -> Result<Response, ParseError> {
        use PacketType as T;
        let kind = frame.kind;
        if frame.magic != Magic::Response {
            return Err(ParseError::WrongMagic(kind));
        }
        let num = |b: &Bytes| parse_u32_lenient(b);
        Ok(match kind {
            T::Noop => Response::Noop,
            T::NoJob => Response::NoJob,
            T::JobCreated => Response::JobCreated { handle: frame.body.clone() },
            T::JobAssign => {
                let [handle, function, data] = args(frame)?;
                Response::JobAssign { handle, function, data }
            }
            T::JobAssignUniq => {
                let [handle, function, unique, data] = args(frame)?;
                Response::JobAssignUniq { handle, function, unique, data }
            }
            T::JobAssignAll => {
                let [handle, function, unique, reducer, data] = args(frame)?;
                Response::JobAssignAll { handle, function, unique, reducer, data }
            }
            T::WorkStatus => {
                let [handle, n, d] = args(frame)?;
                Response::WorkStatus { handle, numerator: num(&n), denominator: num(&d) }
            }
            T::WorkComplete => {
                let [handle, data] = args(frame)?;
                Response::WorkComplete { handle, data }
            }
            T::WorkFail => Response::WorkFail { handle: trim_nul(&frame.body) },
            T::WorkException => {
                let [handle, data] = args(frame)?;
                Response::WorkException { handle, data }
            }
            T::WorkData => {
                let [handle, data] = args(frame)?;
                Response::WorkData { handle, data }
            }
            T::WorkWarning => {
                let [handle, data] = args(frame)?;
                Response::WorkWarning { handle, data }
            }
            T::StatusRes => {
                let [handle, known, running, n, d] = args(frame)?;
                Response::StatusRes {
                    handle,
                    known: num(&known) != 0,
                    running: num(&running) != 0,
                    numerator: num(&n),
                    denominator: num(&d),
                }
            }
            T::StatusResUnique => {
                let [unique, known, running, n, d, waiting] = args(frame)?;
                Response::StatusResUnique {
                    unique,
                    known: num(&known) != 0,
                    running: num(&running) != 0,
                    numerator: num(&n),
                    denominator: num(&d),
                    waiting_clients: num(&waiting),
                }
            }
            T::EchoRes => Response::EchoRes { data: frame.body.clone() },
            T::Error => {
                let [code, text] = args(frame)?;
                Response::Error { code, text }
            }
            T::OptionRes => Response::OptionRes { option: frame.body.clone() },
            _ => return Err(ParseError::WrongDirection(kind)),
        })
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        use PacketType as T;
        let mut put = |kind, args: &[&[u8]]| encode_packet(buf, Magic::Response, kind, args);
        let s = |n: &u32| n.to_string();
        match self {
            Response::Noop => put(T::Noop, &[]),
            Response::NoJob => put(T::NoJob, &[]),
            Response::JobCreated { handle } => put(T::JobCreated, &[handle]),
            Response::JobAssign { handle, function, data } => put(T::JobAssign, &[handle, function, data]),
            Response::JobAssignUniq { handle, function, unique, data } => {
                put(T::JobAssignUniq, &[handle, function, unique, data])
            }
            Response::JobAssignAll { handle, function, unique, reducer, data } => {
                put(T::JobAssignAll, &[handle, function, unique, reducer, data])
            }
            Response::WorkStatus { handle, numerator, denominator } => {
                put(T::WorkStatus, &[handle, s(numerator).as_bytes(), s(denominator).as_bytes()])
            }
            Response::WorkComplete { handle, data } => put(T::WorkComplete, &[handle, data]),
            Response::WorkFail { handle } => put(T::WorkFail, &[handle]),
            Response::WorkException { handle, data } => put(T::WorkException, &[handle, data]),
            Response::WorkData { handle, data } => put(T::WorkData, &[handle, data]),
            Response::WorkWarning { handle, data } => put(T::WorkWarning, &[handle, data]),
            Response::StatusRes { handle, known, running, numerator, denominator } => put(
                T::StatusRes,
                &[handle, flag(*known), flag(*running), s(numerator).as_bytes(), s(denominator).as_bytes()],
            ),
            Response::StatusResUnique { unique, known, running, numerator, denominator, waiting_clients } => put(
                T::StatusResUnique,
                &[
                    unique,
                    flag(*known),
                    flag(*running),
                    s(numerator).as_bytes(),
                    s(denominator).as_bytes(),
                    s(waiting_clients).as_bytes(),
                ],
            ),
            Response::EchoRes { data } => put(T::EchoRes, &[data]),
            Response::Error { code, text } => put(T::Error, &[code, text]),
            Response::OptionRes { option } => put(T::OptionRes, &[option]),
        }
    }
}
