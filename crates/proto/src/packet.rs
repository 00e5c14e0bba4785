//! Binary packets: `\0REQ`/`\0RES` magic, big-endian type and size, NUL-separated arguments.

use bytes::{BufMut, Bytes, BytesMut};

/// Length of the fixed packet header: magic, type and body size.
pub const HEADER_LEN: usize = 12;

const MAGIC_REQ: &[u8; 4] = b"\0REQ";
const MAGIC_RES: &[u8; 4] = b"\0RES";

/// Who sent a packet: requests go to the server, responses come from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Magic {
    Request,
    Response,
}

impl Magic {
    pub fn bytes(self) -> &'static [u8; 4] {
        match self {
            Magic::Request => MAGIC_REQ,
            Magic::Response => MAGIC_RES,
        }
    }

    pub fn from_bytes(b: &[u8]) -> Option<Magic> {
        match b {
            b"\0REQ" => Some(Magic::Request),
            b"\0RES" => Some(Magic::Response),
            _ => None,
        }
    }
}

macro_rules! packet_types {
    ($($name:ident = $num:literal;)*) => {
        /// Every packet type of the Gearman protocol, with its number on the wire.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum PacketType {
            $($name = $num,)*
        }

        impl PacketType {
            pub fn from_u32(n: u32) -> Option<PacketType> {
                match n {
                    $($num => Some(PacketType::$name),)*
                    _ => None,
                }
            }
        }
    };
}

packet_types! {
    CanDo = 1;
    CantDo = 2;
    ResetAbilities = 3;
    PreSleep = 4;
    Noop = 6;
    SubmitJob = 7;
    JobCreated = 8;
    GrabJob = 9;
    NoJob = 10;
    JobAssign = 11;
    WorkStatus = 12;
    WorkComplete = 13;
    WorkFail = 14;
    GetStatus = 15;
    EchoReq = 16;
    EchoRes = 17;
    SubmitJobBg = 18;
    Error = 19;
    StatusRes = 20;
    SubmitJobHigh = 21;
    SetClientId = 22;
    CanDoTimeout = 23;
    AllYours = 24;
    WorkException = 25;
    OptionReq = 26;
    OptionRes = 27;
    WorkData = 28;
    WorkWarning = 29;
    GrabJobUniq = 30;
    JobAssignUniq = 31;
    SubmitJobHighBg = 32;
    SubmitJobLow = 33;
    SubmitJobLowBg = 34;
    SubmitJobSched = 35;
    SubmitJobEpoch = 36;
    SubmitReduceJob = 37;
    SubmitReduceJobBackground = 38;
    GrabJobAll = 39;
    JobAssignAll = 40;
    GetStatusUnique = 41;
    StatusResUnique = 42;
}

/// One binary packet as it travels: the body is kept whole and split into arguments on demand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub magic: Magic,
    pub kind: PacketType,
    pub body: Bytes,
}

impl Frame {
    /// Splits the body into exactly `N` arguments; the last one takes the rest, NULs included.
    /// `None` when the body has fewer separators than `N - 1`.
    pub fn args<const N: usize>(&self) -> Option<[Bytes; N]> {
        split_args(&self.body)
    }
}

/// Splits `body` into exactly `N` arguments (see [`Frame::args`]).
pub fn split_args<const N: usize>(body: &Bytes) -> Option<[Bytes; N]> {
    if N == 0 {
        return body.is_empty().then(|| std::array::from_fn(|_| Bytes::new()));
    }
    let mut out: [Bytes; N] = std::array::from_fn(|_| Bytes::new());
    let mut start = 0;
    for slot in out.iter_mut().take(N - 1) {
        let nul = memchr(0, &body[start..])?;
        *slot = body.slice(start..start + nul);
        start += nul + 1;
    }
    out[N - 1] = body.slice(start..);
    Some(out)
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// Appends one packet to `buf`: header, then `args` joined by NUL.
/// The hot path of the server: no allocation beyond growing `buf`.
pub fn encode_packet(buf: &mut BytesMut, magic: Magic, kind: PacketType, args: &[&[u8]]) {
    let body_len: usize = args.iter().map(|a| a.len()).sum::<usize>() + args.len().saturating_sub(1);
    buf.reserve(HEADER_LEN + body_len);
    buf.put_slice(magic.bytes());
    buf.put_u32(kind as u32);
    buf.put_u32(body_len as u32);
    for (i, arg) in args.iter().enumerate() {
        if i > 0 {
            buf.put_u8(0);
        }
        buf.put_slice(arg);
    }
}

impl Frame {
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(HEADER_LEN + self.body.len());
        buf.put_slice(self.magic.bytes());
        buf.put_u32(self.kind as u32);
        buf.put_u32(self.body.len() as u32);
        buf.put_slice(&self.body);
    }
}
