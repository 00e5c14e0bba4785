//! Incremental decoding of a byte stream that mixes binary packets and admin lines.

use bytes::{Buf, Bytes, BytesMut};

use crate::packet::{Frame, Magic, PacketType, HEADER_LEN};

/// Default cap on a packet body: larger length headers are refused before anything is allocated.
pub const DEFAULT_MAX_PACKET: u32 = 64 * 1024 * 1024;
/// Longest admin line accepted, terminator included.
pub const MAX_ADMIN_LINE: usize = 8 * 1024;

/// One message read off a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Packet(Frame),
    /// An admin protocol line without its CRLF or LF terminator.
    AdminLine(Bytes),
}

/// Why a stream cannot be decoded further. Each is detected as soon as the offending bytes
/// arrive, so a caller never waits for more input on a message already known to be bad.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad packet magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unknown packet type {0}")]
    UnknownType(u32),
    #[error("packet body of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: u32, max: u32 },
    #[error("admin line longer than {MAX_ADMIN_LINE} bytes")]
    LineTooLong,
}

/// Stateless apart from its limit: everything not yet decoded stays in the caller's buffer.
#[derive(Clone, Copy, Debug)]
pub struct Decoder {
    max_packet: u32,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_PACKET)
    }
}

impl Decoder {
    pub fn new(max_packet: u32) -> Decoder {
        Decoder { max_packet }
    }

    /// Takes one message off the front of `buf`. `Ok(None)` means more bytes are needed.
    /// A message starting with NUL is binary; any other first byte starts an admin line.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        if first == 0 {
            self.decode_packet(buf)
        } else {
            decode_line(buf)
        }
    }

    fn decode_packet(&self, buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        // Check each header field as soon as it is complete.
        let magic_len = buf.len().min(4);
        if !(b"\0REQ".starts_with(&buf[..magic_len]) || b"\0RES".starts_with(&buf[..magic_len])) {
            let mut bad = [0u8; 4];
            bad[..magic_len].copy_from_slice(&buf[..magic_len]);
            return Err(DecodeError::BadMagic(bad));
        }
        if buf.len() < 8 {
            return Ok(None);
        }
        let magic = Magic::from_bytes(&buf[..4]).expect("checked above");
        let type_num = u32::from_be_bytes(buf[4..8].try_into().unwrap());
        let kind = PacketType::from_u32(type_num).ok_or(DecodeError::UnknownType(type_num))?;
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let size = u32::from_be_bytes(buf[8..12].try_into().unwrap());
        if size > self.max_packet {
            return Err(DecodeError::TooLarge { size, max: self.max_packet });
        }
        let total = HEADER_LEN + size as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let body = buf.split_to(size as usize).freeze();
        Ok(Some(Message::Packet(Frame { magic, kind, body })))
    }
}

fn decode_line(buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
    let scan = buf.len().min(MAX_ADMIN_LINE);
    match buf[..scan].iter().position(|&b| b == b'\n') {
        Some(nl) => {
            let mut line = buf.split_to(nl + 1);
            line.truncate(nl);
            if line.last() == Some(&b'\r') {
                line.truncate(nl - 1);
            }
            Ok(Some(Message::AdminLine(line.freeze())))
        }
        None if buf.len() >= MAX_ADMIN_LINE => Err(DecodeError::LineTooLong),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::encode_packet;

    fn decode_all(d: &Decoder, buf: &mut BytesMut) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(m) = d.decode(buf).unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn packets_and_lines_alternate_on_one_stream() {
        let mut buf = BytesMut::new();
        encode_packet(&mut buf, Magic::Request, PacketType::EchoReq, &[b"hi"]);
        buf.extend_from_slice(b"status\r\nworkers\n");
        encode_packet(&mut buf, Magic::Request, PacketType::GrabJob, &[]);
        let msgs = decode_all(&Decoder::default(), &mut buf);
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[1], Message::AdminLine(Bytes::from_static(b"status")));
        assert_eq!(msgs[2], Message::AdminLine(Bytes::from_static(b"workers")));
        match &msgs[3] {
            Message::Packet(f) => assert_eq!(f.kind, PacketType::GrabJob),
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_magic_is_reported_from_the_first_bytes() {
        let mut buf = BytesMut::from(&b"\0RE"[..]);
        assert_eq!(Decoder::default().decode(&mut buf), Ok(None));
        let mut buf = BytesMut::from(&b"\0XY"[..]);
        assert!(matches!(Decoder::default().decode(&mut buf), Err(DecodeError::BadMagic(_))));
    }

    #[test]
    fn unknown_type_is_reported_before_the_size_arrives() {
        let mut buf = BytesMut::from(&b"\0REQ\0\0\0\x05"[..]);
        assert_eq!(Decoder::default().decode(&mut buf), Err(DecodeError::UnknownType(5)));
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut buf = BytesMut::from(&b"\0REQ\0\0\0\x07\x10\0\0\0"[..]);
        assert_eq!(Decoder::new(1024).decode(&mut buf), Err(DecodeError::TooLarge { size: 0x1000_0000, max: 1024 }));
    }

    #[test]
    fn long_admin_line_is_refused() {
        let mut buf = BytesMut::from(&vec![b'a'; MAX_ADMIN_LINE][..]);
        assert_eq!(Decoder::default().decode(&mut buf), Err(DecodeError::LineTooLong));
        let mut buf = BytesMut::from(&vec![b'a'; MAX_ADMIN_LINE - 1][..]);
        assert_eq!(Decoder::default().decode(&mut buf), Ok(None));
    }

    #[test]
    fn last_argument_keeps_its_nuls() {
        let mut buf = BytesMut::new();
        encode_packet(&mut buf, Magic::Request, PacketType::SubmitJob, &[b"f", b"u", b"a\0b\0"]);
        let Some(Message::Packet(f)) = Decoder::default().decode(&mut buf).unwrap() else { panic!("no packet") };
        let [func, uniq, data] = f.args::<3>().unwrap();
        assert_eq!((&func[..], &uniq[..], &data[..]), (&b"f"[..], &b"u"[..], &b"a\0b\0"[..]));
        assert!(f.args::<4>().is_some());
        let two = Frame { body: Bytes::from_static(b"noseparator"), ..f };
        assert!(two.args::<2>().is_none());
    }
}
